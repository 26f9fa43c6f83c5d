//! Exit codes (documented in docs/operations.md and `ferry --help`) and the mapping
//! from library errors to them.

use ferry::job::JobError;
use ferry::keys::KeyError;
use ferry::pipeline::PipelineError;
use ferry::repo::RepoError;

pub const OK: u8 = 0;
pub const FAILED: u8 = 1;
pub const DAMAGED: u8 = 3;
pub const LOCKED: u8 = 4;
pub const KEY: u8 = 5;
pub const NO_SPACE: u8 = 6;
pub const CANCELLED: u8 = 130;

pub fn repo_exit(e: &RepoError) -> u8 {
    match e {
        RepoError::Damaged { .. } | RepoError::MissingDataKey { .. } => DAMAGED,
        RepoError::Lock(ferry::repo::lock::LockError::Busy(_)) => LOCKED,
        RepoError::Key(_) => KEY,
        RepoError::NoSpace { .. } => NO_SPACE,
        RepoError::Cancelled => CANCELLED,
        _ => FAILED,
    }
}

/// The exit code for an error from any command.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    for c in e.chain() {
        if let Some(f) = c.downcast_ref::<ferry::files::FileError>() {
            return if f.is_damage() { DAMAGED } else { FAILED };
        }
        if let Some(r) = c.downcast_ref::<RepoError>() {
            return repo_exit(r);
        }
        let job = c
            .downcast_ref::<JobError>()
            .or_else(|| match c.downcast_ref() {
                Some(ferry::job::vm::VmJobError::Job(j)) => Some(j),
                _ => None,
            });
        if let Some(j) = job {
            return match j {
                JobError::Repo(r) => repo_exit(r),
                JobError::Pipeline(PipelineError::Repo(r)) => repo_exit(r),
                JobError::Pipeline(PipelineError::Cancelled) => CANCELLED,
                JobError::Pipeline(PipelineError::UnknownChunkKey { .. }) => DAMAGED,
                JobError::Key(_) => KEY,
                _ => FAILED,
            };
        }
        if c.downcast_ref::<KeyError>().is_some()
            || c.downcast_ref::<ferry::kmip::client::KmsError>().is_some()
        {
            return KEY;
        }
        if let Some(r) = c.downcast_ref::<ferry::agent::RunError>() {
            return match r {
                ferry::agent::RunError::Cancelled => CANCELLED,
                ferry::agent::RunError::Key(_) => KEY,
                _ => FAILED,
            };
        }
        if let Some(s) = c.downcast_ref::<ferry::keys::sync::SyncError>() {
            return match s {
                ferry::keys::sync::SyncError::Key(_) => KEY,
                ferry::keys::sync::SyncError::Repo(r) => repo_exit(r),
            };
        }
    }
    FAILED
}
