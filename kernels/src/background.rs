//! A value computed on the rayon pool while the caller goes on (host work a GPU step can hide
//! behind kernels already queued): [`Background::spawn`], then [`Background::wait`].

use std::sync::mpsc::{Receiver, sync_channel};

/// A computation running on the rayon pool.
#[derive(Debug)]
pub(crate) struct Background<T>(Receiver<T>);

impl<T: Send + 'static> Background<T> {
    pub fn spawn(f: impl FnOnce() -> T + Send + 'static) -> Background<T> {
        let (tx, rx) = sync_channel(1);
        rayon::spawn(move || {
            // A panic ends the task, not the process (rayon aborts on a spawned task's panic);
            // the receiver then sees the sender gone. A receiver gone (the batch was dropped
            // unused) leaves nothing to do.
            if let Ok(value) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                let _ = tx.send(value);
            }
        });
        Background(rx)
    }

    /// The value, once computed; None if the computation panicked (the caller computes it
    /// again in the foreground, where the panic is reported).
    pub fn wait(self) -> Option<T> {
        self.0.recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_value_arrives_and_a_panic_is_none() {
        let data: Vec<u64> = (0..100_000).collect();
        let sum = Background::spawn(move || data.iter().sum::<u64>());
        assert_eq!(sum.wait(), Some(4_999_950_000));
        let failed = Background::spawn(|| -> u8 { panic!("on purpose") });
        assert_eq!(failed.wait(), None);
        // Dropped unwaited: the task finishes without a receiver.
        drop(Background::spawn(|| 1u8));
    }
}
