//! How much a repository holds (committed points, chunks, their bytes) and, for
//! a local directory, the size and free space of the file system under it: what
//! an agent reports at `GET /v1/repositories` and the console shows per tenant.
//!
//! Read-only. Counting chunks lists them (one directory walk locally, one
//! listing on S3): callers should not ask on every page view.

use super::{RepoError, Repository};
use serde::Serialize;
use std::path::Path;

/// Space of the file system holding a local repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FsSpace {
    /// Size of the file system.
    pub total_bytes: u64,
    /// Space an unprivileged writer can still use.
    pub free_bytes: u64,
}

/// A repository's usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// `local` or `s3`.
    pub backend: &'static str,
    /// Where it is stored (a directory, or an `s3://` URL; no credentials).
    pub location: String,
    /// Committed restore points.
    pub points: u64,
    /// Stored chunks.
    pub chunks: u64,
    /// Bytes of the stored chunks (compressed and encrypted, as stored).
    pub stored_bytes: u64,
    /// The file system's size and free space (local directories only).
    pub fs: Option<FsSpace>,
}

/// The usage of `repo`, opened from `path`.
pub fn usage(repo: &Repository, path: &Path) -> Result<Usage, RepoError> {
    let points = repo.point_ids()?.len() as u64;
    let (chunks, stored_bytes) = repo.chunk_usage()?;
    let backend = repo.backend().kind();
    Ok(Usage {
        backend,
        location: repo.backend().describe(),
        points,
        chunks,
        stored_bytes,
        fs: if backend == "local" {
            fs_space(path)
        } else {
            None
        },
    })
}

/// `statvfs(2)` of the file system holding `path`; `None` when it cannot be
/// asked (the path vanished, not a local path).
pub fn fs_space(path: &Path) -> Option<FsSpace> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` points to writable memory
    // of the right type; statvfs only writes into it.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    // The fields are u64 on 64-bit Linux, narrower elsewhere.
    #[allow(clippy::unnecessary_cast)]
    let (frsize, bsize, blocks, bavail) = (
        st.f_frsize as u64,
        st.f_bsize as u64,
        st.f_blocks as u64,
        st.f_bavail as u64,
    );
    let unit = if frsize > 0 { frsize } else { bsize };
    Some(FsSpace {
        total_bytes: blocks.saturating_mul(unit),
        free_bytes: bavail.saturating_mul(unit),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_space_of_a_directory_and_of_nothing() {
        let d = tempfile::tempdir().unwrap();
        let s = fs_space(d.path()).expect("statvfs of a temp dir");
        assert!(s.total_bytes > 0 && s.free_bytes <= s.total_bytes);
        assert!(fs_space(&d.path().join("missing")).is_none());
        assert!(fs_space(Path::new("bad\0path")).is_none());
    }
}
