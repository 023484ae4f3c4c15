//! What a [`VaeConfig`] alone can say about itself before any data is read: every loss weight
//! usable, every enabled head given the obs columns it reads.

use crate::vae::VaeConfig;

/// A configuration that cannot train; the message names the key and what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Widest hidden or latent layer a configuration may ask for (scvi-tools' models use 128-1,024).
pub const MAX_WIDTH: usize = 1 << 16;
/// Deepest encoder/decoder a configuration may ask for.
pub const MAX_LAYERS: usize = 64;

impl VaeConfig {
    /// Checks every loss weight (finite, >= 0) and that each head with a positive weight names
    /// its obs columns.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, w) in [
            ("mmd_batch_weight", self.mmd_batch_weight),
            ("prior_mmd_weight", self.prior_mmd_weight),
            ("jeffreys_weight", self.jeffreys_weight),
            ("adversarial_batch_weight", self.adversarial_batch_weight),
            ("contrastive_weight", self.contrastive_weight),
            ("classifier_weight", self.classifier_weight),
            ("regression_weight", self.regression_weight),
            ("cox_weight", self.cox_weight),
            ("cycle_weight", self.cycle_weight),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(ConfigError(format!(
                    "{name} = {w}: expected a finite weight >= 0"
                )));
            }
        }
        self.validate_sizes()?;
        if !(self.var_eps.is_finite() && self.var_eps >= 0.0) {
            return Err(ConfigError(format!(
                "var_eps = {}: expected a finite variance floor >= 0",
                self.var_eps
            )));
        }
        if self.regression_weight > 0.0 && self.regression_keys.is_empty() {
            return Err(ConfigError(
                "regression_weight > 0 needs regression_keys (numeric obs columns)".into(),
            ));
        }
        if self.cox_weight > 0.0
            && (self.survival_time_key.is_none() || self.survival_event_key.is_none())
        {
            return Err(ConfigError(
                "cox_weight > 0 needs survival_time_key and survival_event_key (obs columns)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Layer widths and depth within 1..=their limit (a width of 10^9 would try to allocate
    /// terabytes), dropout a probability below 1.
    fn validate_sizes(&self) -> Result<(), ConfigError> {
        for (name, value, limit) in [
            ("n_hidden", self.n_hidden, MAX_WIDTH),
            ("n_latent", self.n_latent, MAX_WIDTH),
            ("n_layers", self.n_layers, MAX_LAYERS),
        ] {
            if !(1..=limit).contains(&value) {
                return Err(ConfigError(format!(
                    "{name} = {value}: expected 1 to {limit}"
                )));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ConfigError(format!(
                "dropout = {}: expected a probability in [0, 1)",
                self.dropout
            )));
        }
        Ok(())
    }

    /// The numeric obs columns the enabled heads read, in the order a batch carries them: the
    /// regression targets, then the survival time and event.
    pub fn head_columns(&self) -> Vec<String> {
        let mut columns = Vec::new();
        if self.regression_weight > 0.0 {
            columns.extend(self.regression_keys.iter().cloned());
        }
        if self.cox_weight > 0.0 {
            columns.extend(self.survival_time_key.iter().cloned());
            columns.extend(self.survival_event_key.iter().cloned());
        }
        columns
    }

    /// Whether a head reads cell labels (the classifier, the contrastive loss).
    pub fn needs_labels(&self) -> bool {
        self.classifier_weight > 0.0 || self.contrastive_weight > 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_must_be_finite_and_non_negative() {
        assert_eq!(VaeConfig::default().validate(), Ok(()));
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let c = VaeConfig {
                jeffreys_weight: bad,
                ..VaeConfig::default()
            };
            assert_eq!(
                c.validate(),
                Err(ConfigError(format!(
                    "jeffreys_weight = {bad}: expected a finite weight >= 0"
                )))
            );
        }
    }

    #[test]
    fn sizes_and_dropout_out_of_range_are_refused_by_name() {
        let refused = |c: VaeConfig| c.validate().unwrap_err().0;
        let base = VaeConfig::default;
        assert_eq!(
            refused(VaeConfig {
                n_latent: 0,
                ..base()
            }),
            "n_latent = 0: expected 1 to 65536"
        );
        assert!(
            refused(VaeConfig {
                n_layers: 0,
                ..base()
            })
            .starts_with("n_layers = 0")
        );
        assert!(
            refused(VaeConfig {
                n_hidden: 1_000_000_000,
                ..base()
            })
            .starts_with("n_hidden = 1000000000")
        );
        for dropout in [1.5, 1.0, -0.1, f32::NAN] {
            assert!(refused(VaeConfig { dropout, ..base() }).starts_with("dropout"));
        }
        assert_eq!(
            VaeConfig {
                n_hidden: MAX_WIDTH,
                n_layers: MAX_LAYERS,
                dropout: 0.0,
                ..base()
            }
            .validate(),
            Ok(())
        );
    }

    #[test]
    fn heads_name_their_columns_in_batch_order() {
        let regression = VaeConfig {
            regression_weight: 1.0,
            ..VaeConfig::default()
        };
        assert!(
            regression
                .validate()
                .unwrap_err()
                .0
                .contains("regression_keys")
        );
        let cox = VaeConfig {
            cox_weight: 1.0,
            survival_time_key: Some("time".into()),
            ..VaeConfig::default()
        };
        assert!(cox.validate().unwrap_err().0.contains("survival_event_key"));
        let both = VaeConfig {
            regression_keys: vec!["age".into(), "bmi".into()],
            survival_event_key: Some("event".into()),
            ..VaeConfig {
                regression_weight: 0.5,
                ..cox
            }
        };
        assert_eq!(both.validate(), Ok(()));
        assert_eq!(both.head_columns(), ["age", "bmi", "time", "event"]);
        // Keys of a head that is off are not read.
        let off = VaeConfig {
            regression_weight: 0.0,
            cox_weight: 0.0,
            ..both
        };
        assert!(off.head_columns().is_empty());
        assert!(!off.needs_labels());
        assert!(
            VaeConfig {
                contrastive_weight: 0.1,
                ..off
            }
            .needs_labels()
        );
    }
}
