//! The coordinator's state machine under a seeded simulation: workers that crash, restart and
//! join late, messages delayed and delivered out of order. After every event the invariants
//! hold (`Coordinator::check`: one group per worker, members agree with their job, every
//! completed epoch counted exactly the job's training cells, no checkpoint ahead of the
//! completed epochs); every run ends with the job succeeded within bounded simulated time.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use tessera_coordinator::{
    Assignment, Checkpoint, Config, Coordinator, Directive, EpochSummary, JobId, JobSpec, JobState,
    Millis, Progress, WorkerId,
};

const TRAIN_CELLS: u64 = 10_007;
const EPOCHS: u32 = 6;
/// Cells a rank trains per wake-up.
const CHUNK: u64 = 700;

/// A worker process as the coordinator sees it through its messages.
#[derive(Debug, Default)]
struct Agent {
    alive: bool,
    id: Option<WorkerId>,
    assignment: Option<Assignment>,
    epoch: u32,
    cells: u64,
    /// Rank 0's checkpoint waiting to be accepted (the coordinator may not have every rank's
    /// epoch report yet).
    checkpoint: Option<Checkpoint>,
    next_heartbeat: Millis,
}

/// Messages in flight; each is applied when delivered, its reply straight back to the agent.
#[derive(Debug, Clone)]
enum Msg {
    Heartbeat {
        agent: usize,
        worker: WorkerId,
        generation: u64,
    },
    Join {
        agent: usize,
        worker: WorkerId,
    },
    Progress {
        worker: WorkerId,
        p: Progress,
    },
    Checkpoint {
        agent: usize,
        worker: WorkerId,
        job: JobId,
        generation: u64,
        c: Checkpoint,
    },
    Leave {
        worker: WorkerId,
    },
}

/// This rank's cells of each epoch: the training cells split evenly over the world.
fn share(rank: u32, world: u32) -> u64 {
    TRAIN_CELLS * u64::from(rank + 1) / u64::from(world)
        - TRAIN_CELLS * u64::from(rank) / u64::from(world)
}

struct Sim {
    rng: Xoshiro256PlusPlus,
    now: Millis,
    coord: Coordinator,
    agents: Vec<Agent>,
    /// (delivery time, sequence) → message: random delays reorder them.
    inflight: BTreeMap<(Millis, u64), Msg>,
    seq: u64,
    job: JobId,
    crashes: usize,
    leaves: usize,
    restarts: usize,
}

impl Sim {
    fn send(&mut self, msg: Msg) {
        let delay = self.rng.random_range(1..400);
        self.seq += 1;
        self.inflight.insert((self.now + delay, self.seq), msg);
    }

    fn deliver(&mut self, msg: Msg) {
        let now = self.now;
        match msg {
            Msg::Heartbeat {
                agent,
                worker,
                generation,
            } => {
                let d = self.coord.heartbeat(now, worker, generation);
                let a = &mut self.agents[agent];
                if a.id != Some(worker) || !a.alive {
                    return; // a reply to a previous life of the agent
                }
                match d {
                    Directive::Continue => {}
                    Directive::Rejoin | Directive::Stop => a.assignment = None,
                    Directive::Register => (a.id, a.assignment) = (None, None),
                }
            }
            Msg::Join { agent, worker } => {
                let placed = self.coord.join(now, worker);
                let a = &mut self.agents[agent];
                if let Ok(Some(assignment)) = placed
                    && a.alive
                    && a.id == Some(worker)
                    && a.assignment
                        .as_ref()
                        .is_none_or(|old| old.generation != assignment.generation)
                {
                    a.epoch = assignment.resume_from.as_ref().map_or(0, |c| c.epochs_done);
                    (a.cells, a.checkpoint) = (0, None);
                    a.assignment = Some(assignment);
                }
            }
            // Reports of a dissolved generation are refused; that is the point of generations.
            Msg::Progress { worker, p } => drop(self.coord.progress(now, worker, &p)),
            // Its agent is gone already; a Leave that comes after the coordinator dropped it is
            // refused as unknown and changes nothing.
            Msg::Leave { worker } => drop(self.coord.leave(now, worker)),
            Msg::Checkpoint {
                agent,
                worker,
                job,
                generation,
                c,
            } => {
                if self
                    .coord
                    .checkpoint(now, worker, job, generation, c.clone())
                    .is_ok()
                    && self.agents[agent].checkpoint.as_ref() == Some(&c)
                {
                    self.agents[agent].checkpoint = None;
                }
            }
        }
    }

    /// One agent's turn: register, heartbeat, join, or train a chunk and report.
    fn wake(&mut self, i: usize) {
        let now = self.now;
        if !self.agents[i].alive {
            return;
        }
        let Some(worker) = self.agents[i].id else {
            let id = self
                .coord
                .register(now, format!("10.0.0.{i}:7000"), "cpu".into());
            self.agents[i].id = Some(id);
            return;
        };
        if now >= self.agents[i].next_heartbeat {
            self.agents[i].next_heartbeat = now + self.coord.config().heartbeat_interval_ms;
            let generation = self.agents[i]
                .assignment
                .as_ref()
                .map_or(0, |a| a.generation);
            self.send(Msg::Heartbeat {
                agent: i,
                worker,
                generation,
            });
        }
        let Some(a) = self.agents[i].assignment.clone() else {
            self.send(Msg::Join { agent: i, worker });
            return;
        };
        // The ring fails when a peer is dead: the worker leaves and joins again.
        let peers_alive = (0..a.world_size as usize).all(|r| {
            self.agents.iter().any(|g| {
                g.alive
                    && g.assignment
                        .as_ref()
                        .is_some_and(|x| x.generation == a.generation && x.rank == r as u32)
            })
        });
        if !peers_alive {
            self.agents[i].assignment = None;
            return;
        }
        if let Some(c) = self.agents[i].checkpoint.clone() {
            self.send(Msg::Checkpoint {
                agent: i,
                worker,
                job: a.job,
                generation: a.generation,
                c,
            });
        }
        let ag = &mut self.agents[i];
        if ag.epoch >= EPOCHS {
            return;
        }
        let mine = share(a.rank, a.world_size);
        ag.cells = (ag.cells + CHUNK).min(mine);
        let done = ag.cells == mine;
        let p = Progress {
            job: a.job,
            generation: a.generation,
            epoch: ag.epoch,
            step: 0,
            cells: ag.cells,
            epoch_done: done,
            ..Progress::default()
        };
        if done {
            ag.epoch += 1;
            ag.cells = 0;
            if a.rank == 0 {
                ag.checkpoint = Some(Checkpoint {
                    epochs_done: ag.epoch,
                    step: 0,
                    location: format!("ckpt/gen{}/epoch{}", a.generation, ag.epoch),
                });
            }
        }
        self.send(Msg::Progress { worker, p });
    }

    fn chaos(&mut self) {
        let alive: Vec<usize> = (0..self.agents.len())
            .filter(|&i| self.agents[i].alive)
            .collect();
        let roll: f64 = self.rng.random();
        if roll < 0.008 && alive.len() > 1 && self.crashes < 6 {
            // SIGKILL: no more messages from it; its in-flight ones still arrive. Or SIGTERM:
            // the same, after a Leave.
            let victim = alive[self.rng.random_range(0..alive.len())];
            if self.rng.random::<bool>()
                && let Some(worker) = self.agents[victim].id
            {
                self.send(Msg::Leave { worker });
                self.leaves += 1;
            }
            self.agents[victim] = Agent::default();
            self.crashes += 1;
        } else if roll < 0.011 {
            // A dead worker's pod restarts (a new registration), or a new one joins late.
            if let Some(i) = (0..self.agents.len()).find(|&i| !self.agents[i].alive) {
                self.agents[i] = Agent {
                    alive: true,
                    ..Agent::default()
                };
            }
        } else if roll < 0.014 && self.restarts < 2 {
            // The coordinator crashes and restarts from its last saved snapshot; the workers
            // learn it from their next heartbeat (Register) or a refused report.
            let config = self.coord.config().clone();
            self.coord = Coordinator::restore(config, self.now, self.coord.snapshot());
            self.restarts += 1;
        }
    }
}

/// What a run did: its crashes (a leave counts as one), leaves and coordinator restarts.
#[derive(Debug, Clone, Copy)]
struct Chaos {
    crashes: usize,
    leaves: usize,
    restarts: usize,
}

fn run(seed: u64, workers: usize, world: u32) -> (Coordinator, JobId, Chaos) {
    let config = Config {
        heartbeat_interval_ms: 500,
        heartbeat_timeout_ms: 2_000,
        regroup_grace_ms: 1_500,
    };
    let mut coord = Coordinator::new(config);
    let spec = JobSpec {
        data_url: "file:///data.zarr".into(),
        config_toml: String::new(),
        world_size: world,
        batch_key: "batch".into(),
        label_key: String::new(),
        output_url: "file:///out".into(),
        train_cells: TRAIN_CELLS,
        epochs: EPOCHS,
        ..JobSpec::default()
    };
    let job = coord.submit(spec).unwrap();
    let mut sim = Sim {
        rng: Xoshiro256PlusPlus::seed_from_u64(seed),
        now: 0,
        coord,
        agents: (0..workers + 2)
            .map(|i| Agent {
                alive: i < workers,
                ..Agent::default()
            })
            .collect(),
        inflight: BTreeMap::new(),
        seq: 0,
        job,
        crashes: 0,
        leaves: 0,
        restarts: 0,
    };
    let horizon: Millis = 600_000;
    while sim.now < horizon && !sim.coord.job(sim.job).unwrap().state.ended() {
        sim.now += 50;
        // Everything due by now, in delivery order (which random delays have shuffled).
        while let Some((&(at, seq), _)) = sim.inflight.first_key_value() {
            if at > sim.now {
                break;
            }
            let msg = sim.inflight.remove(&(at, seq)).unwrap();
            sim.deliver(msg);
            sim.coord
                .check()
                .unwrap_or_else(|e| panic!("seed {seed} at {} ms after a delivery: {e}", sim.now));
        }
        for i in 0..sim.agents.len() {
            if sim.rng.random::<f64>() < 0.7 {
                sim.wake(i);
            }
        }
        sim.chaos();
        sim.coord.tick(sim.now);
        sim.coord
            .check()
            .unwrap_or_else(|e| panic!("seed {seed} at {} ms after a tick: {e}", sim.now));
    }
    let chaos = Chaos {
        crashes: sim.crashes,
        leaves: sim.leaves,
        restarts: sim.restarts,
    };
    (sim.coord, job, chaos)
}

#[test]
fn jobs_finish_with_every_epoch_counted_once_despite_crashes_and_reordering() {
    let (mut crashed_runs, mut left_runs, mut regrouped_smaller, mut restarted_runs) = (0, 0, 0, 0);
    for seed in 0..60 {
        let (coord, job, chaos) = run(seed, 4, 4);
        let j = coord.job(job).unwrap();
        assert_eq!(
            j.state,
            JobState::Succeeded,
            "seed {seed}: {:?} ({}), {chaos:?}",
            j.state,
            j.message
        );
        assert_eq!(j.epochs_done, EPOCHS);
        assert!(
            j.epoch_cells.values().all(|&c| c == TRAIN_CELLS),
            "seed {seed}: {:?}",
            j.epoch_cells
        );
        crashed_runs += usize::from(chaos.crashes > 0);
        left_runs += usize::from(chaos.leaves > 0);
        restarted_runs += usize::from(chaos.restarts > 0);
        regrouped_smaller += usize::from(j.world < 4);
    }
    assert!(
        restarted_runs >= 10,
        "and coordinator restarts: {restarted_runs} of 60 runs"
    );
    assert!(
        left_runs >= 10,
        "and workers leaving on SIGTERM: {left_runs} of 60 runs"
    );
    assert!(
        crashed_runs >= 20,
        "the simulation must exercise recovery: {crashed_runs} of 60 runs had a crash"
    );
    assert!(
        regrouped_smaller >= 10,
        "and finishing with fewer ranks: {regrouped_smaller} of 60 runs"
    );
}

#[test]
fn a_lost_worker_regroups_the_survivors_after_the_grace() {
    let config = Config {
        heartbeat_interval_ms: 100,
        heartbeat_timeout_ms: 300,
        regroup_grace_ms: 300,
    };
    let mut c = Coordinator::new(config);
    let spec = JobSpec {
        data_url: String::new(),
        config_toml: String::new(),
        world_size: 2,
        batch_key: String::new(),
        label_key: String::new(),
        output_url: String::new(),
        train_cells: 10,
        epochs: 2,
        ..JobSpec::default()
    };
    let job = c.submit(spec).unwrap();
    let (a, b) = (
        c.register(0, "a:1".into(), "cpu".into()),
        c.register(0, "b:1".into(), "cpu".into()),
    );
    assert_eq!(
        c.join(0, a).unwrap(),
        None,
        "one of two workers: the job waits"
    );
    let second = c.join(1, b).unwrap().unwrap();
    let first = c.join(2, a).unwrap().unwrap();
    assert_eq!(
        (first.rank, second.rank, first.world_size, first.generation),
        (0, 1, 2, second.generation)
    );
    assert_eq!(first.peers, vec!["a:1".to_string(), "b:1".to_string()]);
    for (w, cells) in [(a, 5), (b, 5)] {
        c.progress(
            3,
            w,
            &Progress {
                job,
                generation: first.generation,
                epoch: 0,
                step: 4,
                cells,
                epoch_done: true,
                ..Progress::default()
            },
        )
        .unwrap();
    }
    assert_eq!(c.job(job).unwrap().epochs_done, 1);
    c.checkpoint(
        4,
        a,
        job,
        first.generation,
        Checkpoint {
            epochs_done: 1,
            step: 4,
            location: "ckpt/1".into(),
        },
    )
    .unwrap();
    // b goes silent; a keeps heart-beating.
    for t in (100..=500).step_by(100) {
        // b is removed at the tick of 400 ms (last heard at 3 ms); a hears of it next.
        assert_eq!(
            c.heartbeat(t, a, first.generation),
            if t <= 400 {
                Directive::Continue
            } else {
                Directive::Rejoin
            },
            "at {t} ms"
        );
        c.tick(t);
    }
    assert_eq!(c.job(job).unwrap().state, JobState::Recovering);
    assert_eq!(
        c.heartbeat(600, b, first.generation),
        Directive::Register,
        "a removed worker must register again"
    );
    assert_eq!(
        c.join(600, a).unwrap(),
        None,
        "within the grace the job waits for a replacement"
    );
    c.heartbeat(750, a, 0);
    c.tick(750);
    let alone = c.join(800, a).unwrap().unwrap();
    assert_eq!((alone.world_size, alone.rank), (1, 0));
    assert!(alone.generation > first.generation);
    assert_eq!(
        alone.resume_from.map(|c| c.epochs_done),
        Some(1),
        "resumes after the checkpointed epoch"
    );
    // A late report from the old generation is refused and changes nothing.
    assert!(
        c.progress(
            801,
            a,
            &Progress {
                job,
                generation: first.generation,
                epoch: 1,
                step: 5,
                cells: 10,
                epoch_done: true,
                ..Progress::default()
            }
        )
        .is_err()
    );
    c.progress(
        802,
        a,
        &Progress {
            job,
            generation: alone.generation,
            epoch: 1,
            step: 9,
            cells: 10,
            epoch_done: true,
            ..Progress::default()
        },
    )
    .unwrap();
    assert_eq!(c.job(job).unwrap().state, JobState::Succeeded);
    assert_eq!(c.heartbeat(803, a, alone.generation), Directive::Stop);
    c.check().unwrap();
}

#[test]
fn a_leaving_worker_regroups_its_job_at_once_from_the_step_checkpoint() {
    let config = Config {
        heartbeat_interval_ms: 100,
        heartbeat_timeout_ms: 10_000,
        regroup_grace_ms: 300,
    };
    let mut c = Coordinator::new(config);
    let spec = JobSpec {
        world_size: 2,
        train_cells: 10,
        epochs: 3,
        ..JobSpec::default()
    };
    let job = c.submit(spec).unwrap();
    let (a, b) = (
        c.register(0, "a:1".into(), "cpu".into()),
        c.register(0, "b:1".into(), "cpu".into()),
    );
    assert_eq!(c.join(0, a).unwrap(), None);
    let g = c.join(1, b).unwrap().unwrap().generation;
    for (w, cells) in [(a, 6), (b, 4)] {
        c.progress(
            2,
            w,
            &Progress {
                job,
                generation: g,
                epoch: 0,
                step: 4,
                cells,
                epoch_done: true,
                ..Progress::default()
            },
        )
        .unwrap();
    }
    c.checkpoint(
        3,
        a,
        job,
        g,
        Checkpoint {
            epochs_done: 1,
            step: 4,
            location: "ckpt/epoch-1".into(),
        },
    )
    .unwrap();
    // b got SIGTERM in epoch 1: rank 0 checkpoints step 6 (one epoch done, part of the next),
    // then b leaves. An older announcement arriving late does not replace it.
    c.checkpoint(
        4,
        a,
        job,
        g,
        Checkpoint {
            epochs_done: 1,
            step: 6,
            location: "ckpt/epoch-1-step-6".into(),
        },
    )
    .unwrap();
    c.checkpoint(
        5,
        a,
        job,
        g,
        Checkpoint {
            epochs_done: 1,
            step: 4,
            location: "ckpt/epoch-1".into(),
        },
    )
    .unwrap();
    c.leave(6, b).unwrap();
    let j = c.job(job).unwrap();
    assert_eq!(
        j.state,
        JobState::Recovering,
        "no heartbeat timeout to wait for"
    );
    assert_eq!(
        j.message,
        format!("worker {b} left; resuming from the checkpoint after epoch 1 at step 6")
    );
    assert_eq!(c.heartbeat(7, a, g), Directive::Rejoin);
    assert!(
        c.leave(8, b)
            .unwrap_err()
            .to_string()
            .contains(&format!("unknown worker {b}")),
        "leaving twice"
    );
    assert_eq!(c.heartbeat(8, b, g), Directive::Register);
    c.tick(400);
    let alone = c.join(400, a).unwrap().unwrap();
    assert_eq!(
        (
            alone.world_size,
            alone
                .resume_from
                .map(|r| (r.epochs_done, r.step, r.location))
        ),
        (1, Some((1, 6, "ckpt/epoch-1-step-6".to_string())))
    );
    // The resumed rank counts the whole epoch, the cells before the checkpoint included.
    c.progress(
        401,
        a,
        &Progress {
            job,
            generation: alone.generation,
            epoch: 1,
            step: 8,
            cells: 10,
            epoch_done: true,
            ..Progress::default()
        },
    )
    .unwrap();
    assert_eq!(c.job(job).unwrap().epochs_done, 2);
    c.check().unwrap();
}

#[test]
fn a_job_resubmitted_from_a_checkpoint_counts_its_epochs_and_hands_the_checkpoint_out() {
    let mut c = Coordinator::new(Config::default());
    let spec = JobSpec {
        world_size: 1,
        train_cells: 10,
        epochs: 4,
        ..JobSpec::default()
    };
    let step = Checkpoint {
        epochs_done: 2,
        step: 9,
        location: "out/checkpoint/epoch-000002-step-9".into(),
    };
    let job = c.submit_from(spec.clone(), Some(step.clone())).unwrap();
    let j = c.job(job).unwrap();
    assert_eq!(
        (j.epochs_done, j.epoch_cells.len(), j.message.as_str()),
        (2, 2, "resuming from the checkpoint after epoch 2 at step 9")
    );
    c.check().unwrap();
    let w = c.register(0, "w:1".into(), "cpu".into());
    let a = c.join(0, w).unwrap().unwrap();
    assert_eq!(a.resume_from, Some(step));
    // The resumed epoch is counted whole (the rank counts the cells before the checkpoint too).
    c.progress(
        1,
        w,
        &Progress {
            job,
            generation: a.generation,
            epoch: 2,
            step: 12,
            cells: 10,
            epoch_done: true,
            ..Progress::default()
        },
    )
    .unwrap();
    assert_eq!(c.job(job).unwrap().epochs_done, 3);
    c.check().unwrap();
    // A checkpoint that finished the job leaves nothing to train.
    let done = Checkpoint {
        epochs_done: 4,
        step: 20,
        location: "x".into(),
    };
    assert!(
        c.submit_from(spec, Some(done))
            .unwrap_err()
            .to_string()
            .contains("nothing left to train")
    );
}

#[test]
fn wrong_cell_counts_fail_the_job_and_bad_requests_are_named() {
    let mut c = Coordinator::new(Config::default());
    let spec = JobSpec {
        data_url: String::new(),
        config_toml: String::new(),
        world_size: 1,
        batch_key: String::new(),
        label_key: String::new(),
        output_url: String::new(),
        train_cells: 100,
        epochs: 3,
        ..JobSpec::default()
    };
    assert!(
        c.submit(JobSpec {
            world_size: 0,
            ..spec.clone()
        })
        .unwrap_err()
        .to_string()
        .contains("world_size 0")
    );
    let job = c.submit(spec).unwrap();
    let w = c.register(0, "w:1".into(), "cpu".into());
    let g = c.join(0, w).unwrap().unwrap().generation;
    assert!(
        c.checkpoint(
            1,
            w,
            job,
            g,
            Checkpoint {
                epochs_done: 1,
                step: 1,
                location: "x".into()
            }
        )
        .unwrap_err()
        .to_string()
        .contains("only 0 epochs are complete")
    );
    c.progress(
        2,
        w,
        &Progress {
            job,
            generation: g,
            epoch: 0,
            step: 1,
            cells: 99,
            epoch_done: true,
            ..Progress::default()
        },
    )
    .unwrap();
    let j = c.job(job).unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert!(
        j.message.contains("trained 99 cells, the epoch has 100"),
        "{}",
        j.message
    );
    assert!(
        c.join(3, 999)
            .unwrap_err()
            .to_string()
            .contains("unknown worker 999")
    );
    assert!(
        c.cancel(77)
            .unwrap_err()
            .to_string()
            .contains("unknown job 77")
    );
    c.check().unwrap();
}

#[test]
fn early_stopping_ends_the_job_and_a_rank_failure_fails_it() {
    let mut c = Coordinator::new(Config::default());
    let spec = JobSpec {
        world_size: 2,
        train_cells: 100,
        epochs: 10,
        ..JobSpec::default()
    };
    let job = c.submit(spec.clone()).unwrap();
    let (a, b) = (
        c.register(0, "a:1".into(), "cpu".into()),
        c.register(0, "b:1".into(), "cpu".into()),
    );
    assert!(c.join(0, a).unwrap().is_none());
    let g = c.join(0, b).unwrap().unwrap().generation;
    let summary = EpochSummary {
        train: [5.0, 4.0, 1.0, 0.0, 0.0],
        validation: Some([6.0, 5.0, 1.0, 0.0, 0.0]),
        cells_per_second: 1e3,
    };
    let done = |epoch, cells, last| Progress {
        job,
        generation: g,
        epoch,
        step: 1,
        cells,
        epoch_done: true,
        last,
        summary: Some(summary),
        ..Progress::default()
    };
    c.progress(1, a, &done(0, 60, false)).unwrap();
    c.progress(1, b, &done(0, 40, false)).unwrap();
    // Both ranks stop early after epoch 1 (they share the validation loss): the job is done.
    c.progress(2, b, &done(1, 40, true)).unwrap();
    assert_eq!(c.job(job).unwrap().state, JobState::Running);
    c.progress(2, a, &done(1, 60, true)).unwrap();
    let j = c.job(job).unwrap();
    assert_eq!(
        (j.state, j.epochs_done, j.summary),
        (JobState::Succeeded, 2, Some(summary))
    );
    assert_eq!(c.heartbeat(3, a, g), Directive::Stop);
    c.check().unwrap();

    // A rank that cannot train (bad data, non-finite loss) fails the job with its reason.
    let job = c.submit(spec).unwrap();
    assert!(c.join(4, a).unwrap().is_none());
    let g = c.join(4, b).unwrap().unwrap().generation;
    c.progress(
        5,
        b,
        &Progress {
            job,
            generation: g,
            failure: Some("step 7: the KL divergence is NaN".into()),
            ..Progress::default()
        },
    )
    .unwrap();
    let j = c.job(job).unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.message, "rank 1: step 7: the KL divergence is NaN");
    c.check().unwrap();
}
