//! The end-of-epoch policy: the learning rate on a plateau, early stopping and the checkpoint
//! cadence, decided from the epoch's monitored value alone. Pure (no I/O, no clock), so every
//! rank, given the same all-reduced value, decides the same, and a resume continues the same
//! schedule from the checkpointed state.

use tessera_models::TrainConfig;

use crate::checkpoint::FitState;

/// What the end of an epoch decides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct EpochDecision {
    /// The learning rate for the next epoch (lower than the current one after a plateau).
    pub lr: f64,
    /// Early stopping: no better monitored value for `early_stopping_patience` epochs.
    pub stop_early: bool,
    /// Training ends with this epoch (the last one, or stopping early).
    pub last: bool,
    /// A checkpoint of this epoch is due (every `checkpoint_every` epochs, and the last).
    pub checkpoint: bool,
}

/// Records epoch `epoch` (of `epochs`) with its `monitored` value (the negative ELBO, on the
/// validation cells when there are any) into `state`'s schedule and early-stopping counters.
pub(crate) fn end_of_epoch(
    state: &mut FitState,
    monitored: f64,
    epoch: usize,
    epochs: usize,
    tc: &TrainConfig,
) -> EpochDecision {
    let lr = state.plateau.observe(monitored, tc);
    let mut stop_early = false;
    if monitored < state.best {
        (state.best, state.since_best) = (monitored, 0);
    } else {
        state.since_best += 1;
        stop_early = tc
            .early_stopping_patience
            .is_some_and(|p| state.since_best >= p);
    }
    let last = stop_early || epoch + 1 == epochs;
    let due = tc
        .checkpoint_every
        .is_some_and(|k| k > 0 && (epoch + 1).is_multiple_of(k));
    EpochDecision {
        lr,
        stop_early,
        last,
        checkpoint: last || due,
    }
}

#[cfg(test)]
mod tests {
    use tessera_models::Plateau;

    use super::*;

    fn state(lr: f64) -> FitState {
        FitState {
            epochs_done: 0,
            step: 0,
            plateau: Plateau::new(lr),
            best: f64::INFINITY,
            since_best: 0,
            n_train: 0,
            history: Vec::new(),
            run: serde_json::Value::Null,
            within_epoch: None,
        }
    }

    fn config() -> TrainConfig {
        TrainConfig {
            lr: 1e-3,
            reduce_lr_on_plateau: true,
            lr_patience: 2,
            lr_factor: 0.5,
            lr_min: 1e-4,
            lr_threshold: 0.0,
            early_stopping_patience: Some(4),
            checkpoint_every: Some(3),
            ..TrainConfig::default()
        }
    }

    /// Runs `values` as consecutive epochs of a 100-epoch run; the decisions in order.
    fn run(values: &[f64], tc: &TrainConfig) -> Vec<EpochDecision> {
        let mut s = state(tc.lr);
        values
            .iter()
            .enumerate()
            .map(|(epoch, &v)| end_of_epoch(&mut s, v, epoch, 100, tc))
            .collect()
    }

    #[test]
    fn the_rate_halves_after_more_than_lr_patience_epochs_without_improvement() {
        let d = run(&[10.0, 9.0, 9.5, 9.5, 9.5, 9.5, 9.5, 9.5], &config());
        let rates: Vec<f64> = d.iter().map(|d| d.lr).collect();
        // Epochs 2, 3 and 4 bring no improvement: the third (more than 2) lowers the rate;
        // the count starts again, so epoch 7 lowers it again.
        assert_eq!(rates, [1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 2.5e-4]);
    }

    #[test]
    fn the_rate_never_falls_below_lr_min_and_stays_without_the_plateau_rule() {
        let tc = TrainConfig {
            early_stopping_patience: None,
            ..config()
        };
        let d = run(&[1.0; 40], &tc);
        assert_eq!(d.last().map(|d| d.lr), Some(1e-4));
        let fixed = TrainConfig {
            reduce_lr_on_plateau: false,
            ..tc
        };
        assert!(run(&[1.0; 40], &fixed).iter().all(|d| d.lr == 1e-3));
    }

    #[test]
    fn early_stopping_comes_after_patience_epochs_without_a_lower_value() {
        let d = run(&[5.0, 4.0, 4.0, 4.5, 3.9, 4.0, 4.0, 4.0, 4.0], &config());
        let stops: Vec<bool> = d.iter().map(|d| d.stop_early).collect();
        // 3.9 at epoch 4 resets the count; epochs 5-8 are four without improvement.
        assert_eq!(
            stops,
            [false, false, false, false, false, false, false, false, true]
        );
        assert!(
            d[8].last && d[8].checkpoint,
            "stopping early ends and saves"
        );
        let never = TrainConfig {
            early_stopping_patience: None,
            ..config()
        };
        assert!(run(&[1.0; 20], &never).iter().all(|d| !d.stop_early));
    }

    #[test]
    fn checkpoints_come_every_k_epochs_and_with_the_last() {
        let tc = TrainConfig {
            early_stopping_patience: None,
            ..config()
        };
        let mut s = state(tc.lr);
        let saved: Vec<usize> = (0..7)
            .filter(|&e| end_of_epoch(&mut s, 1.0 / (e + 1) as f64, e, 7, &tc).checkpoint)
            .collect();
        assert_eq!(saved, [2, 5, 6]);
        for none in [None, Some(0)] {
            let tc = TrainConfig {
                checkpoint_every: none,
                ..tc.clone()
            };
            let mut s = state(tc.lr);
            let saved: Vec<usize> = (0..5)
                .filter(|&e| end_of_epoch(&mut s, 1.0, e, 5, &tc).checkpoint)
                .collect();
            assert_eq!(
                saved,
                [4],
                "checkpoint_every = {none:?}: the last epoch only"
            );
        }
    }
}
