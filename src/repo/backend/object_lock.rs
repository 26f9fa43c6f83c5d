//! The repository lock on stores without `flock` (object storage): one lock
//! object per holder, refreshed while held, stale when not refreshed.
//!
//! Protocol (docs/format.md, "Object storage"): a process that wants lock
//! `NAME` writes `locks/NAME/<mode>-<random>` (its holder record), then lists
//! `locks/NAME/`. Another holder's object conflicts when either of the two is
//! exclusive; on a conflict the newcomer deletes its own object and tries again
//! after a jittered pause, until its wait runs out. The store's listings are
//! strongly consistent, so of two processes racing, the one that lists last
//! sees the other: at most one of them proceeds, and with two exclusive
//! requests both may retreat and retry. A holder rewrites its object every
//! [`REFRESH`]; an object the store has not seen rewritten for [`STALE`]
//! (compared on the store's own clock, against the newcomer's fresh object)
//! belongs to a dead process and is deleted; so is, at once, the object of a
//! process of the same host that no longer runs (killed, crashed). The lock is
//! released by deleting the object when the guard drops.
//!
//! Owns only this protocol; which operation needs which lock is the caller's.

use super::Backend;
use crate::repo::lock::{LockError, LockHolder, LockMode, RepoLock};
use crate::repo::{RepoError, Result};
use serde::{Deserialize, Serialize};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a holder rewrites its lock object.
pub const REFRESH: Duration = Duration::from_secs(120);
/// A lock object not rewritten for this long belongs to a dead holder.
pub const STALE: Duration = Duration::from_secs(15 * 60);

/// A lock object's content.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LockRecord {
    mode: String,
    holder: LockHolder,
}

fn mode_name(m: LockMode) -> &'static str {
    match m {
        LockMode::Shared => "shared",
        LockMode::Exclusive => "exclusive",
    }
}

/// Keeps a lock object alive; deletes it on drop.
pub struct ObjectLockGuard {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    key: String,
}

impl std::fmt::Debug for ObjectLockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectLockGuard")
            .field("key", &self.key)
            .finish()
    }
}

impl Drop for ObjectLockGuard {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Acquire lock `name` in `mode` on `store`, waiting up to `wait`.
pub fn acquire(
    store: Arc<dyn Backend>,
    name: &str,
    mode: LockMode,
    operation: &str,
    wait: Duration,
) -> Result<RepoLock> {
    let dir = format!("locks/{name}/");
    let mut rnd = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut rnd);
    let key = format!("{dir}{}-{}", mode_name(mode), hex::encode(rnd));
    let record = LockRecord {
        mode: mode_name(mode).into(),
        holder: LockHolder {
            pid: std::process::id(),
            host: crate::repo::lock::hostname(),
            operation: operation.to_string(),
            since: crate::repo::now_rfc3339(),
        },
    };
    let body = serde_json::to_vec(&record).map_err(|e| RepoError::Invalid(e.to_string()))?;
    let deadline = Instant::now() + wait;
    let mut pause = Duration::from_millis(100);
    loop {
        store.replace(&key, &body)?;
        match conflict(&*store, &dir, &key, mode)? {
            None => break,
            Some(holder) => {
                store.delete(&key)?;
                if Instant::now() >= deadline {
                    return Err(LockError::Busy(holder).into());
                }
                let jitter = Duration::from_millis(rand::Rng::gen_range(
                    &mut rand::thread_rng(),
                    0..=pause.as_millis() as u64,
                ));
                std::thread::sleep((pause + jitter).min(deadline - Instant::now()));
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
    let (tx, rx) = mpsc::channel::<()>();
    let thread = {
        let (store, key, body) = (store.clone(), key.clone(), body.clone());
        std::thread::Builder::new()
            .name("ferry-lock-refresh".into())
            .spawn(move || {
                // Rewrite every REFRESH until the guard drops (the sender goes).
                while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(REFRESH) {
                    if let Err(e) = store.replace(&key, &body) {
                        tracing::warn!(lock = %key, error = %e, "could not refresh the repository lock; retrying");
                    }
                }
                if let Err(e) = store.delete(&key) {
                    tracing::warn!(lock = %key, error = %e, "could not remove the repository lock object; it goes stale by itself");
                }
            })
            .map_err(|e| RepoError::Invalid(format!("cannot start the lock refresher: {e}")))?
    };
    Ok(RepoLock::held_by(
        Box::new(ObjectLockGuard {
            stop: Some(tx),
            thread: Some(thread),
            key,
        }),
        mode,
    ))
}

/// Whether `h` is a process of this host that has ended (killed, crashed):
/// its lock need not wait [`STALE`] to go.
fn dead_here(h: &LockHolder) -> bool {
    h.host == crate::repo::lock::hostname()
        && h.pid != std::process::id()
        && !std::path::Path::new(&format!("/proc/{}", h.pid)).exists()
}

/// The first conflicting live holder among `dir`'s lock objects (deleting
/// stale ones on the way), or `None`.
fn conflict(
    store: &dyn Backend,
    dir: &str,
    mine: &str,
    mode: LockMode,
) -> Result<Option<Option<LockHolder>>> {
    let all = store.list(dir)?;
    // "Now" on the store's clock: when it saw our own object.
    let now = all
        .iter()
        .find(|o| o.key == mine)
        .and_then(|o| o.modified)
        .unwrap_or(i64::MAX);
    for o in all.iter().filter(|o| o.key != mine) {
        if o.modified
            .is_some_and(|m| now.saturating_sub(m) > STALE.as_secs() as i64)
        {
            tracing::warn!(lock = %o.key, "removing a stale repository lock (its holder stopped refreshing it)");
            store.delete(&o.key)?;
            continue;
        }
        let theirs_exclusive = o
            .key
            .rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with("exclusive-"));
        if mode == LockMode::Exclusive || theirs_exclusive {
            let holder = store
                .read(&o.key, 64 << 10)
                .ok()
                .flatten()
                .and_then(|b| serde_json::from_slice::<LockRecord>(&b).ok())
                .map(|r| r.holder);
            if let Some(h) = holder.as_ref().filter(|h| dead_here(h)) {
                tracing::warn!(lock = %o.key, pid = h.pid, operation = %h.operation, "removing the repository lock of a process of this host that no longer runs");
                store.delete(&o.key)?;
                continue;
            }
            return Ok(Some(holder));
        }
    }
    Ok(None)
}
