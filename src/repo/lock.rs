//! The repository lock: `flock(2)` on `locks/repo.lock`, shared or exclusive.
//!
//! The kernel releases a flock when its holder dies, so a lock left behind by a
//! crashed or killed ferry is never honoured (stale-lock detection by construction).
//! The file's content names the current holder for error messages only. On
//! read-only media a shared lock is taken on the lock file opened for reading (or
//! skipped when there is none: nothing can write there). This module must not
//! decide who needs which lock; callers do.

use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

/// Lock mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// Backup, restore, verify: many at once.
    Shared,
    /// Prune and garbage collection: alone.
    Exclusive,
}

/// Who holds a lock (informational).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockHolder {
    /// Process id.
    pub pid: u32,
    /// Host name.
    pub host: String,
    /// Operation, e.g. "backup".
    pub operation: String,
    /// RFC 3339 start time.
    pub since: String,
}

/// Lock failures.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone else holds a conflicting lock.
    #[error("repository is locked by {}", describe(.0))]
    Busy(Option<LockHolder>),
    /// The repository is on read-only media (or this user may only read it)
    /// and the operation needs to write.
    #[error("{operation} needs write access, but the repository is read-only here (read-only media, or no write permission for this user: {path}: {source}); restore, verify, export and listing still work")]
    ReadOnly {
        /// Lock file.
        path: PathBuf,
        /// What was refused, e.g. "prune".
        operation: String,
        /// Error.
        source: std::io::Error,
    },
    /// I/O error on the lock file.
    #[error("lock file {path}: {source}")]
    Io {
        /// Lock file.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
}

fn describe(h: &Option<LockHolder>) -> String {
    match h {
        Some(h) => format!(
            "'{}' (pid {} on {}, since {}); wait for it to finish",
            h.operation, h.pid, h.host, h.since
        ),
        None => "another ferry process; wait for it to finish".into(),
    }
}

/// A held lock; released on drop.
#[derive(Debug)]
pub struct RepoLock {
    /// What keeps the lock held until drop: the flocked file, or a lock
    /// object's guard ([`crate::repo::backend::object_lock`]). `None`: a shared
    /// lock on a read-only file system without a lock file, where no process can
    /// change the repository through this mount.
    _guard: Option<Box<dyn std::fmt::Debug + Send + Sync>>,
    /// Mode held.
    pub mode: LockMode,
    /// Why the lock file could not be opened for writing, when it could not: the
    /// repository is read-only here and callers that write must stop.
    pub read_only: Option<std::io::ErrorKind>,
}

impl RepoLock {
    /// A lock held by `guard` until it is dropped (lock protocols other than
    /// flock).
    pub fn held_by(guard: Box<dyn std::fmt::Debug + Send + Sync>, mode: LockMode) -> RepoLock {
        RepoLock {
            _guard: Some(guard),
            mode,
            read_only: None,
        }
    }

    /// `Err(ReadOnly)` naming `operation` when this lock was taken on read-only
    /// media: for writers, before they do anything else.
    pub fn require_writable(&self, path: &Path, operation: &str) -> Result<(), LockError> {
        match self.read_only {
            Some(kind) => Err(LockError::ReadOnly {
                path: path.to_path_buf(),
                operation: operation.to_string(),
                source: kind.into(),
            }),
            None => Ok(()),
        }
    }
}

/// The lock file could not be opened for writing because the repository is on
/// read-only media (or this user may only read it).
fn read_only(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied
    )
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Acquire a lock on `path` without waiting, or wait up to `wait` for it.
pub fn acquire(
    path: &Path,
    mode: LockMode,
    operation: &str,
    wait: std::time::Duration,
) -> Result<RepoLock, LockError> {
    let io = |source| LockError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut read_only_kind = None;
    let opened = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path);
    let mut f = match opened {
        Ok(f) => f,
        // Readers of a repository on read-only media (a replicated copy, a
        // snapshot, WORM storage) still take a shared lock: flock works on a
        // descriptor opened for reading.
        Err(e) if mode == LockMode::Shared && read_only(&e) => match File::open(path) {
            Ok(f) => {
                tracing::info!(lock = %path.display(), "repository is read-only here: shared lock taken on the existing lock file");
                read_only_kind = Some(e.kind());
                f
            }
            Err(n)
                if n.kind() == std::io::ErrorKind::NotFound
                    && e.kind() == std::io::ErrorKind::ReadOnlyFilesystem =>
            {
                // Through another, writable mount a prune could still run.
                tracing::warn!(lock = %path.display(), "repository is on a read-only file system and has no lock file: reading without a lock; make sure no prune runs on it elsewhere");
                return Ok(RepoLock {
                    _guard: None,
                    mode,
                    read_only: Some(e.kind()),
                });
            }
            Err(_) => return Err(io(e)),
        },
        Err(e) if read_only(&e) => {
            return Err(LockError::ReadOnly {
                path: path.to_path_buf(),
                operation: operation.to_string(),
                source: e,
            })
        }
        Err(e) => return Err(io(e)),
    };
    let deadline = std::time::Instant::now() + wait;
    loop {
        let r = match mode {
            LockMode::Shared => f.try_lock_shared(),
            LockMode::Exclusive => f.try_lock(),
        };
        match r {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) => {
                if std::time::Instant::now() >= deadline {
                    let mut s = String::new();
                    let _ = f.read_to_string(&mut s);
                    let holder = s.lines().next().and_then(|l| serde_json::from_str(l).ok());
                    return Err(LockError::Busy(holder));
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
    }
    if mode == LockMode::Exclusive {
        let holder = LockHolder {
            pid: std::process::id(),
            host: hostname(),
            operation: operation.to_string(),
            since: crate::repo::now_rfc3339(),
        };
        let _ = f.set_len(0);
        let _ = f.rewind();
        let _ = writeln!(f, "{}", serde_json::to_string(&holder).unwrap_or_default());
    }
    Ok(RepoLock {
        _guard: Some(Box::new(f)),
        mode,
        read_only: read_only_kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn shared_shared_ok_exclusive_blocks() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("l");
        let a = acquire(&p, LockMode::Shared, "backup", Duration::ZERO).unwrap();
        let b = acquire(&p, LockMode::Shared, "backup", Duration::ZERO).unwrap();
        assert!(matches!(
            acquire(&p, LockMode::Exclusive, "prune", Duration::ZERO),
            Err(LockError::Busy(_))
        ));
        drop((a, b));
        let x = acquire(&p, LockMode::Exclusive, "prune", Duration::ZERO).unwrap();
        let e = acquire(&p, LockMode::Shared, "backup", Duration::ZERO).unwrap_err();
        assert!(e.to_string().contains("prune"), "{e}");
        drop(x);
    }
}
