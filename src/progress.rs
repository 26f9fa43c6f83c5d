//! Lock-free progress counters shared between the data plane and whatever renders
//! them (terminal progress bar, JSON, the agent API). No rendering here.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// Counters for one operation. Cheap to update from many threads.
#[derive(Debug)]
pub struct Progress {
    /// Total bytes to process (disk sizes).
    pub total: AtomicU64,
    /// Bytes processed (positions done, including zero and unchanged chunks).
    pub done: AtomicU64,
    /// Bytes actually read from sources / chunk files.
    pub read: AtomicU64,
    /// Bytes written (new chunk files, or restored data).
    pub written: AtomicU64,
    /// Set to request cancellation; every stage checks it.
    pub cancel: AtomicBool,
    started: Instant,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
            started: Instant::now(),
        }
    }
}

/// A point-in-time view of [`Progress`].
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Snapshot {
    /// Total bytes.
    pub total: u64,
    /// Bytes done.
    pub done: u64,
    /// Bytes read.
    pub read: u64,
    /// Bytes written.
    pub written: u64,
    /// Seconds since start.
    pub elapsed_secs: f64,
    /// Bytes done per second.
    pub rate: f64,
    /// Estimated seconds remaining, if a rate is known.
    pub eta_secs: Option<f64>,
}

impl Progress {
    /// Add to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    /// Whether cancellation was requested.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
    /// Request cancellation.
    pub fn request_cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
    /// Current values with rate and ETA.
    pub fn snapshot(&self) -> Snapshot {
        let total = self.total.load(Ordering::Relaxed);
        let done = self.done.load(Ordering::Relaxed);
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            done as f64 / elapsed
        } else {
            0.0
        };
        Snapshot {
            total,
            done,
            read: self.read.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            elapsed_secs: elapsed,
            rate,
            eta_secs: (rate > 0.0).then(|| total.saturating_sub(done) as f64 / rate),
        }
    }
}
