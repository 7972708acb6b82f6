//! Graceful shutdown: one signal that accept loops and connections watch, and a drain
//! that waits for the connections still open.
//!
//! [`Shutdown::trigger`] flips a watch channel; accept loops `select!` on
//! [`Signal::recv`] and stop accepting. Every listener task and every connection holds a
//! [`DrainGuard`]; [`Shutdown::drain`] completes when the last guard is dropped or the
//! grace period ends, whichever is first (the mini-redis pattern: an mpsc whose senders are
//! the guards, so "all dropped" is `recv() == None`).
#![forbid(unsafe_code)]

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// The owner of the shutdown signal (one per process).
#[derive(Debug)]
pub struct Shutdown {
    signal: watch::Sender<bool>,
    guard: Option<mpsc::Sender<()>>,
    drained: mpsc::Receiver<()>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        let (signal, _) = watch::channel(false);
        let (guard, drained) = mpsc::channel(1);
        Shutdown { signal, guard: Some(guard), drained }
    }

    /// A receiver of the signal, for an accept loop or a connection.
    pub fn signal(&self) -> Signal {
        Signal(self.signal.subscribe())
    }

    /// A token that keeps [`Shutdown::drain`] waiting while it lives.
    ///
    /// # Panics
    /// After [`Shutdown::drain`] has started (no new work may begin then).
    pub fn guard(&self) -> DrainGuard {
        DrainGuard(self.guard.clone().expect("guards are handed out before draining starts"))
    }

    /// Tells everyone to stop accepting.
    pub fn trigger(&self) {
        self.signal.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.signal.borrow()
    }

    /// Triggers shutdown, then waits until every guard is dropped or `grace` passes.
    /// Returns whether everything drained in time.
    pub async fn drain(&mut self, grace: Duration) -> bool {
        self.trigger();
        self.guard = None;
        tokio::time::timeout(grace, async { while self.drained.recv().await.is_some() {} })
            .await
            .is_ok()
    }
}

/// Watches for shutdown. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Signal(watch::Receiver<bool>);

impl Signal {
    /// Completes once shutdown has been triggered (at once if it already was, or if the
    /// owner is gone).
    pub async fn recv(&mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}

/// Held by work that shutdown should wait for.
#[derive(Clone, Debug)]
pub struct DrainGuard(#[allow(dead_code)] mpsc::Sender<()>);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_guards_and_times_out() {
        let mut sd = Shutdown::new();
        let mut sig = sd.signal();
        let g = sd.guard();
        let t = tokio::spawn(async move {
            sig.recv().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(g);
        });
        assert!(sd.drain(Duration::from_secs(5)).await);
        t.await.unwrap();

        let mut sd = Shutdown::new();
        let _held = sd.guard();
        assert!(!sd.drain(Duration::from_millis(50)).await);
    }
}
