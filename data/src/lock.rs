//! One writer at a time per local store: `<store>/.tessera-write.lock` holds the writing
//! process's pid, created exclusively; another writer waits for it, and a lock whose process has
//! ended is taken over. Stores behind object-store URLs are not locked (no exclusive create that
//! every backend honours); two writers there can still race.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{DataError, Result};
use crate::store::{Location, Store};

/// How long a writer waits for another to finish publishing (publishes take seconds to
/// minutes: a layer of denoised expression is the largest).
const WAIT: Duration = Duration::from_secs(600);

/// A lock file younger than this without a pid is a writer between creating and filling it.
const FRESH: Duration = Duration::from_secs(10);

/// The held lock; released (its file removed) on drop.
pub(crate) struct WriteLock(Option<PathBuf>);

impl WriteLock {
    pub(crate) fn take(store: &Store) -> Result<WriteLock> {
        Self::take_within(store, WAIT)
    }

    fn take_within(store: &Store, wait: Duration) -> Result<WriteLock> {
        let Location::Local(root) = &store.location else {
            return Ok(WriteLock(None));
        };
        let path = root.join(".tessera-write.lock");
        let failed = |e: std::io::Error| DataError::Write {
            store: store.name(),
            path: ".tessera-write.lock".into(),
            reason: e.to_string(),
        };
        let started = Instant::now();
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    write!(file, "{}", std::process::id()).map_err(failed)?;
                    return Ok(WriteLock(Some(path)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let Some(pid) = holder(&path) else {
                        // Gone meanwhile, or its writer died before writing its pid.
                        remove_stale(&path);
                        continue;
                    };
                    if started.elapsed() >= wait {
                        return Err(DataError::Locked {
                            store: store.name(),
                            pid,
                            waited_s: started.elapsed().as_secs(),
                            lock: path.display().to_string(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(failed(e)),
            }
        }
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The pid of a live holder of the lock at `path`; None when the lock is stale (its process
/// has ended, or it holds no pid and is not fresh) or gone.
fn holder(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    match text.trim().parse::<u32>() {
        Ok(pid) => alive(pid).then_some(pid),
        // Not yet written: held, unless it stayed empty too long.
        Err(_) => {
            let age = std::fs::metadata(path)
                .ok()?
                .modified()
                .ok()?
                .elapsed()
                .ok()?;
            (age < FRESH).then_some(0)
        }
    }
}

fn remove_stale(path: &Path) {
    if path.exists() {
        tracing::warn!(lock = %path.display(), "taking over a lock its writer left behind");
        let _ = std::fs::remove_file(path);
    }
}

/// Whether process `pid` is running (Linux: it has a /proc entry that is not a zombie).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> Store {
        Store::connect(dir.to_str().unwrap()).unwrap()
    }

    #[test]
    fn a_live_holder_is_waited_for_and_named_and_a_dead_one_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join(".tessera-write.lock");
        {
            let held = WriteLock::take_within(&store(dir.path()), Duration::ZERO).unwrap();
            assert_eq!(
                std::fs::read_to_string(&lock).unwrap(),
                std::process::id().to_string()
            );
            // Held by a live process (this one): the next writer is refused after its wait.
            let err = WriteLock::take_within(&store(dir.path()), Duration::ZERO)
                .err()
                .unwrap()
                .to_string();
            assert!(
                err.contains(&format!("pid {}", std::process::id())),
                "{err}"
            );
            drop(held);
        }
        assert!(!lock.exists(), "released on drop");
        // A lock left by a process that is gone (pid beyond the kernel's maximum).
        std::fs::write(&lock, "4294967294").unwrap();
        let taken = WriteLock::take_within(&store(dir.path()), Duration::ZERO).unwrap();
        assert_eq!(
            std::fs::read_to_string(&lock).unwrap(),
            std::process::id().to_string()
        );
        drop(taken);
        // Memory stores are not locked.
        let memory = Store::connect("memory://lock-test/a.zarr").unwrap();
        assert!(
            WriteLock::take_within(&memory, Duration::ZERO)
                .unwrap()
                .0
                .is_none()
        );
    }
}
