//! `tessera train --workers N` as processes on loopback: 1, 2 and 4 workers over the same 4
//! parts train the same model; a job whose worker is SIGKILLed mid-epoch recovers from its
//! checkpoint on the survivors and ends where an uninterrupted run ends, and so does one whose
//! worker gets SIGTERM (it checkpoints the step and leaves); `tessera train` alone stops on
//! SIGTERM with exit code 143 and a checkpoint `--resume` continues from; the ranks of a
//! launcher's environment (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT) form one job.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A `tessera train` process; killed (with its workers, which exit when it does) when dropped.
struct Run {
    child: Child,
    lines: mpsc::Receiver<String>,
    deadline: Instant,
    seen: Vec<String>,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Run {
    fn start(args: &[&str], envs: &[(&str, &str)], limit: Duration) -> Run {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .arg("train")
            .args(args)
            .envs(envs.iter().copied())
            .env("TESSERA_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Run {
            child,
            lines,
            deadline: Instant::now() + limit,
            seen: Vec::new(),
        }
    }

    /// The next stdout line (None at the end of output); panics past the deadline.
    fn line(&mut self) -> Option<String> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => {
                self.seen.push(line.clone());
                Some(line)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "no end within the limit; output so far:\n{}",
                self.seen.join("\n")
            ),
        }
    }

    /// Reads to the end; the exit status and the whole output.
    fn ended(mut self) -> (std::process::ExitStatus, String) {
        while self.line().is_some() {}
        (self.child.wait().unwrap(), self.seen.join("\n"))
    }

    /// Reads to the end; the whole output, after checking the process succeeded.
    fn finish(self) -> String {
        let (status, out) = self.ended();
        assert!(status.success(), "tessera train failed:\n{out}");
        out
    }
}

/// A loopback port nothing listens on now (the launcher's MASTER_PORT).
fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string()
}

/// What a launcher (torchrun, PyTorchJob) sets for `rank` of 2 on this machine.
fn launcher_env<'a>(port: &'a str, rank: &'a str) -> [(&'a str, &'a str); 5] {
    [
        ("WORLD_SIZE", "2"),
        ("RANK", rank),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", port),
        ("POD_IP", "127.0.0.1"),
    ]
}

fn simulate(store: &Path, cells: &str, genes: &str) {
    let made = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "simulate",
            store.to_str().unwrap(),
            "--cells",
            cells,
            "--genes",
            genes,
        ])
        .env("TESSERA_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
}

/// `train` arguments for a store, a config file and an output folder.
fn train_args<'a>(store: &'a Path, config: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "--data",
        store.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
}

/// (train loss, validation loss) per epoch from history.csv.
fn losses(out: &Path) -> Vec<(f64, f64)> {
    let csv = std::fs::read_to_string(out.join("history.csv")).unwrap();
    let mut rows = csv.lines();
    let header: Vec<&str> = rows.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (t, v) = (col("train_loss"), col("validation_loss"));
    rows.map(|r| {
        let f: Vec<&str> = r.split(',').collect();
        (f[t].parse().unwrap(), f[v].parse().unwrap())
    })
    .collect()
}

/// Every epoch's train and validation loss within `rel` of the reference's.
fn assert_same_losses(reference: &[(f64, f64)], other: &[(f64, f64)], rel: f64, what: &str) {
    assert_eq!(reference.len(), other.len(), "{what}: epochs");
    let close = |a: f64, b: f64| (a - b).abs() <= rel * a.abs().max(b.abs());
    for (epoch, (a, b)) in reference.iter().zip(other).enumerate() {
        assert!(
            close(a.0, b.0) && close(a.1, b.1),
            "{what}, epoch {epoch}: {b:?} vs {a:?}"
        );
    }
}

#[test]
fn one_two_and_four_worker_processes_train_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    let toml = "[model]\nn_hidden = 16\n\
                [train]\nmax_epochs = 3\nkl_warmup_epochs = 2\nbatch_size = 64\nlr = 0.01\nparts = 4\n";
    std::fs::write(&config, toml).unwrap();
    let mut results = Vec::new();
    for workers in ["1", "2", "4"] {
        let (store, out) = (
            dir.path().join(format!("w{workers}.zarr")),
            dir.path().join(format!("out{workers}")),
        );
        simulate(&store, "2000", "100");
        let mut args = train_args(&store, &config, &out);
        args.extend(["--workers", workers]);
        let text = Run::start(&args, &[], Duration::from_secs(240)).finish();
        assert_eq!(
            text.matches(": pid ").count(),
            workers.parse::<usize>().unwrap(),
            "{text}"
        );
        assert!(
            text.contains("SUCCEEDED") && text.contains("epoch 3/3"),
            "{text}"
        );
        results.push(losses(&out));
    }
    assert_eq!(results[0].len(), 3);
    assert_same_losses(&results[0], &results[1], 1e-5, "2 workers vs 1");
    assert_same_losses(&results[0], &results[2], 1e-5, "4 workers vs 1");
}

/// Trains with 3 workers and sends `signal` to the second once epoch 2 is reported (the ranks
/// are then inside epoch 3); returns the output and the (train, validation) loss per epoch.
fn train_and_signal_a_worker(
    store: &Path,
    config: &Path,
    out: &Path,
    signal: &str,
) -> (String, Vec<(f64, f64)>) {
    let mut args = train_args(store, config, out);
    args.extend(["--workers", "3"]);
    let mut run = Run::start(&args, &[], Duration::from_secs(300));
    let mut pids = Vec::new();
    while let Some(line) = run.line() {
        if let Some(pid) = line.split(": pid ").nth(1) {
            pids.push(pid.trim().to_string());
        }
        if line.starts_with("epoch 2/5") {
            assert!(
                Command::new("kill")
                    .args([signal, &pids[1]])
                    .status()
                    .unwrap()
                    .success()
            );
            break;
        }
    }
    let text = run.finish();
    assert!(
        text.contains("SUCCEEDED") && text.contains("epoch 5/5"),
        "{text}"
    );
    let history = losses(out);
    assert_eq!(history.len(), 5, "every epoch once in the history:\n{text}");
    (text, history)
}

#[test]
fn a_worker_killed_or_stopped_mid_epoch_leaves_the_job_ending_where_an_uninterrupted_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    let toml = "[model]\nn_hidden = 64\n\
                [train]\nmax_epochs = 5\nkl_warmup_epochs = 3\nparts = 3\ncheckpoint_every = 1\n";
    std::fs::write(&config, toml).unwrap();
    let stores: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| dir.path().join(format!("{n}.zarr")))
        .collect();
    for store in &stores {
        simulate(store, "12000", "300");
    }
    let out_a = dir.path().join("out-a");
    let mut args = train_args(&stores[0], &config, &out_a);
    args.extend(["--workers", "3"]);
    Run::start(&args, &[], Duration::from_secs(300)).finish();
    let uninterrupted = losses(&out_a);

    let (text, killed) =
        train_and_signal_a_worker(&stores[1], &config, &dir.path().join("out-b"), "-KILL");
    assert!(
        text.contains("RECOVERING (lost worker"),
        "the coordinator noticed the lost worker:\n{text}"
    );
    // Epoch 2's checkpoint is announced just after the epoch ends: the kill may come first.
    assert!(
        text.contains("resuming from the checkpoint after epoch 2")
            || text.contains("resuming from the checkpoint after epoch 1"),
        "{text}"
    );
    // Same parts, so the same model whether 3 or 2 workers trained the last epochs.
    assert_same_losses(
        &uninterrupted,
        &killed,
        1e-4,
        "after the kill vs uninterrupted",
    );

    // SIGTERM: the group finishes the step, rank 0 checkpoints it within epoch 3, the worker
    // leaves at once and the survivors resume from that step (no epoch trained twice).
    let (text, stopped) =
        train_and_signal_a_worker(&stores[2], &config, &dir.path().join("out-c"), "-TERM");
    assert!(
        text.contains(" left; resuming from the checkpoint after epoch 2 at step"),
        "the worker left after rank 0 checkpointed its step:\n{text}"
    );
    assert!(!text.contains("lost worker"), "{text}");
    assert_same_losses(
        &uninterrupted,
        &stopped,
        1e-4,
        "after the stop vs uninterrupted",
    );
}

#[test]
fn sigterm_stops_training_alone_with_a_checkpoint_that_resume_continues() {
    let dir = tempfile::tempdir().unwrap();
    let (store, config, out) = (
        dir.path().join("s.zarr"),
        dir.path().join("c.toml"),
        dir.path().join("out"),
    );
    simulate(&store, "2000", "100");
    // Epochs of milliseconds: enough of them that the signal comes long before the end.
    let toml = "[model]\nn_hidden = 16\n\
                [train]\nmax_epochs = 300\nearly_stopping_patience = 1000\nbatch_size = 64\n";
    std::fs::write(&config, toml).unwrap();
    let args = train_args(&store, &config, &out);
    // Each finished epoch is logged at debug level on stderr: the signal comes after the first.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("train")
        .args(&args)
        .env("TESSERA_LOG", "warn,tessera::train=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, first_epoch) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let mut line = String::new();
        while stderr.read_line(&mut line).unwrap() > 0 {
            if line.contains("DEBUG") && line.contains("tessera::train") {
                let _ = tx.send(());
            }
            text.push_str(&line);
            line.clear();
        }
        text
    });
    let signalled = first_epoch.recv_timeout(Duration::from_secs(120)).is_ok();
    if signalled {
        assert!(
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    } else {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let text = reader.join().unwrap();
    assert!(signalled, "no epoch logged within 2 minutes:\n{text}");
    assert_eq!(status.code(), Some(143), "{text}");
    assert!(
        text.contains("stopped on request") && text.contains("continue with --resume"),
        "{text}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/state.json")).unwrap())
            .unwrap();
    assert!(
        state["epochs_done"].as_u64().unwrap() >= 1
            && state["within_epoch"]["steps"].as_u64().unwrap() >= 1,
        "{state}"
    );
    assert!(
        !out.join("history.csv").exists(),
        "no outputs from a stopped run"
    );

    let mut resume = args.clone();
    resume.extend(["--resume", "--overwrite"]);
    let resumed = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("train")
        .args(&resume)
        .env("TESSERA_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(
        losses(&out).len(),
        300,
        "the resumed run finishes every epoch once"
    );
}

#[test]
fn ranks_of_a_launcher_environment_form_one_job() {
    let dir = tempfile::tempdir().unwrap();
    let (store, config, out) = (
        dir.path().join("s.zarr"),
        dir.path().join("c.toml"),
        dir.path().join("out"),
    );
    simulate(&store, "1500", "80");
    std::fs::write(
        &config,
        "[model]\nn_hidden = 16\n[train]\nmax_epochs = 2\nbatch_size = 64\n",
    )
    .unwrap();
    let port = free_port();
    // Every pod runs the same command; only RANK differs (torchrun / PyTorchJob environment).
    let args = train_args(&store, &config, &out);
    let env = |rank| launcher_env(&port, rank);
    let worker = Run::start(&args, &env("1"), Duration::from_secs(180));
    let rank0 = Run::start(&args, &env("0"), Duration::from_secs(180));
    let text = rank0.finish();
    assert!(
        text.contains("SUCCEEDED, ") && text.contains("epoch 2/2") && text.contains("trained on"),
        "{text}"
    );
    assert_eq!(worker.finish().trim(), "rank 1 of 2: the job ended");
    assert_eq!(losses(&out).len(), 2);
}

#[test]
fn a_stopped_rank_0_restarted_with_resume_continues_the_job_from_its_step() {
    let dir = tempfile::tempdir().unwrap();
    let (store, config, out) = (
        dir.path().join("s.zarr"),
        dir.path().join("c.toml"),
        dir.path().join("out"),
    );
    simulate(&store, "12000", "300");
    std::fs::write(
        &config,
        "[model]\nn_hidden = 64\n[train]\nmax_epochs = 5\nkl_warmup_epochs = 3\n",
    )
    .unwrap();
    let port = free_port();
    let mut args = train_args(&store, &config, &out);
    args.push("--resume");
    let env = |rank| launcher_env(&port, rank);
    let worker = Run::start(&args, &env("1"), Duration::from_secs(300));
    let mut rank0 = Run::start(&args, &env("0"), Duration::from_secs(300));
    // Rank 0 (and the job's coordinator in it) gets SIGTERM inside epoch 3.
    while let Some(line) = rank0.line() {
        if line.starts_with("epoch 2/5") {
            assert!(
                Command::new("kill")
                    .args(["-TERM", &rank0.child.id().to_string()])
                    .status()
                    .unwrap()
                    .success()
            );
            break;
        }
    }
    let (status, text) = rank0.ended();
    assert_eq!(status.code(), Some(143), "{text}");
    assert!(
        text.contains("starting from the beginning"),
        "the first run had no checkpoint:\n{text}"
    );
    // Its replacement (the same command) resubmits the job from the step it checkpointed; rank 1
    // re-registers with the new coordinator and the job ends with every epoch once.
    let text = Run::start(&args, &env("0"), Duration::from_secs(300)).finish();
    assert!(
        text.contains("resuming from")
            && text.contains("epoch-000002-step-")
            && text.contains("(2 epochs done"),
        "{text}"
    );
    assert!(
        text.contains("SUCCEEDED") && text.contains("epoch 5/5"),
        "{text}"
    );
    assert_eq!(worker.finish().trim(), "rank 1 of 2: the job ended");
    assert_eq!(losses(&out).len(), 5, "every epoch once in the history");
}

#[test]
fn launcher_environment_errors_name_the_variable() {
    let bad = |envs: &[(&str, &str)], expected: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["train", "--data", "/nonexistent.zarr"])
            .envs(envs.iter().copied())
            .env("TESSERA_LOG", "warn")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(expected),
            "{envs:?}: {err}"
        );
    };
    bad(&[("WORLD_SIZE", "2")], "WORLD_SIZE=2 without RANK");
    bad(
        &[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "x")],
        "RANK=2 with WORLD_SIZE=2",
    );
    bad(
        &[("WORLD_SIZE", "two")],
        "WORLD_SIZE=\"two\": expected a whole number",
    );
    bad(&[("WORLD_SIZE", "2"), ("RANK", "0")], "without MASTER_ADDR");
}

#[test]
fn a_reader_that_leaves_stdout_early_does_not_kill_the_job() {
    // `tessera train --workers 2 ... | head -0`: every line printed after the reader left
    // meets a broken pipe, which used to panic the parent (exit 101) and end the job.
    let dir = tempfile::tempdir().unwrap();
    let (store, out, config) = (
        dir.path().join("s.zarr"),
        dir.path().join("out"),
        dir.path().join("c.toml"),
    );
    simulate(&store, "300", "50");
    std::fs::write(&config, "[model]\nn_hidden = 16\n[train]\nmax_epochs = 2\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("train")
        .args(train_args(&store, &config, &out))
        .args(["--workers", "2"])
        .env("TESSERA_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let finished = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&finished.stderr);
    assert!(finished.status.success(), "{:?}: {stderr}", finished.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(losses(&out).len(), 2, "both epochs trained");
}

/// Whether the process `pid` has ended (gone, or a zombie nobody reaped yet).
fn ended(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// Polls until every pid has ended, up to `limit`; whether they all did.
fn all_end_within(pids: &[String], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if pids.iter().all(|p| ended(p)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Starts `train --workers 2` and reads until both workers' pids and epoch 1 are printed.
fn started_with_workers(args: &[&str]) -> (Run, Vec<String>) {
    let mut run = Run::start(args, &[], Duration::from_secs(240));
    let mut pids = Vec::new();
    while let Some(line) = run.line() {
        if let Some(pid) = line.split(": pid ").nth(1) {
            pids.push(pid.trim().to_string());
        }
        if line.starts_with("epoch 1/") {
            break;
        }
    }
    assert_eq!(pids.len(), 2, "{}", run.seen.join("\n"));
    (run, pids)
}

#[test]
fn the_workers_end_with_their_parent_and_a_stop_request_reaches_them() {
    let dir = tempfile::tempdir().unwrap();
    let (store, config) = (dir.path().join("s.zarr"), dir.path().join("c.toml"));
    simulate(&store, "2000", "100");
    let toml = "[model]\nn_hidden = 16\n\
                [train]\nmax_epochs = 200\nearly_stopping_patience = 1000\nbatch_size = 64\n";
    std::fs::write(&config, toml).unwrap();

    // SIGKILL of the parent (which held the job's coordinator): the workers go with it.
    let out = dir.path().join("killed");
    let mut args = train_args(&store, &config, &out);
    args.extend(["--workers", "2"]);
    let (mut run, pids) = started_with_workers(&args);
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    assert!(
        all_end_within(&pids, Duration::from_secs(20)),
        "workers outlived their parent"
    );

    // SIGTERM: handed on to the workers, which checkpoint their step; the parent exits 143.
    let out = dir.path().join("stopped");
    let mut args = train_args(&store, &config, &out);
    args.extend(["--workers", "2"]);
    let (run, pids) = started_with_workers(&args);
    assert!(
        Command::new("kill")
            .args(["-TERM", &run.child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let (status, text) = run.ended();
    assert_eq!(status.code(), Some(143), "{text}");
    assert!(all_end_within(&pids, Duration::from_secs(20)), "{text}");
    let checkpoints: Vec<_> = std::fs::read_dir(out.join("checkpoint"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("-step-"))
        .collect();
    assert_eq!(
        checkpoints.len(),
        1,
        "the stopped step is checkpointed:\n{text}"
    );
    args.extend(["--resume", "--overwrite"]);
    Run::start(&args, &[], Duration::from_secs(240)).finish();
    assert_eq!(
        losses(&out).len(),
        200,
        "the resumed run finishes every epoch once"
    );
}
