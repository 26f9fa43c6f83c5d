//! File-level restore: read the partition table and the file systems on a
//! restore point's disk (or a raw image) and list, find and copy out files,
//! without restoring the disk and without root.
//!
//! Layers, lowest first: [`source`] (random access to a disk), [`partition`]
//! (MBR/GPT, pure parsing), [`probe`] (which file system a volume holds), one
//! adapter per file system behind the [`FileSystem`] trait (ext2/3/4 through
//! `ext4-view`, NTFS through `ntfs`, FAT through `fatfs`), and [`restore`]
//! (writing files out with their times and permissions).
//!
//! Must not: know about repositories, keys or the network (the caller hands in
//! a [`ReadAt`]); write to the disk it reads; trust any on-disk length.

mod ext_fs;
mod fat_fs;
mod ntfs_fs;
pub mod partition;
pub mod probe;
pub mod restore;
pub mod source;

pub use partition::{Partition, PartitionTable, Scheme};
pub use probe::FsKind;
pub use source::{ImageFile, ReadAt, Window};

use serde::{Deserialize, Serialize};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// Why a file-level operation failed. Every variant names what an operator
/// needs: the partition, the file system or the file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The disk could not be read (for a restore point: a chunk failed to load
    /// or to authenticate).
    #[error("reading the disk: {0}")]
    Disk(#[source] std::io::Error),
    /// The MBR or GPT is damaged.
    #[error("partition table damaged: {0}")]
    PartitionTable(String),
    /// `--partition N` names no partition.
    #[error("no partition {number} on this disk (volumes: {available})")]
    NoPartition {
        /// The number asked for.
        number: u32,
        /// The volumes there are.
        available: String,
    },
    /// Several volumes hold a file system and none was chosen.
    #[error("the disk has several volumes, choose one with --partition: {available}")]
    ChoosePartition {
        /// The volumes there are.
        available: String,
    },
    /// A file system ferry does not read itself.
    #[error("partition {partition} holds {what}, which ferry cannot read file by file; use `ferry mount` and the operating system's own driver")]
    Unsupported {
        /// Partition number (0: the whole disk).
        partition: u32,
        /// What was recognised.
        what: &'static str,
    },
    /// Nothing recognised.
    #[error("no file system recognised on partition {partition} (not ext2/3/4, NTFS or FAT)")]
    UnknownFileSystem {
        /// Partition number (0: the whole disk).
        partition: u32,
    },
    /// The file system's own structures are damaged or use features the
    /// reader does not support.
    #[error("{fs} file system on partition {partition}: {detail}")]
    FileSystem {
        /// Which file system.
        fs: FsKind,
        /// Partition number.
        partition: u32,
        /// What the reader said.
        detail: String,
    },
    /// No such path.
    #[error("{path}: no such file or directory")]
    NotFound {
        /// The path asked for.
        path: String,
    },
    /// A directory operation on a file.
    #[error("{path}: not a directory")]
    NotADirectory {
        /// The path asked for.
        path: String,
    },
    /// Reading one file (or directory) failed: damaged data under it.
    #[error("{path}: {detail}")]
    Read {
        /// The file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// Writing a restored file failed.
    #[error("{path}: {source}")]
    Output {
        /// Where ferry was writing.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl FileError {
    /// Whether the error means damaged data (as opposed to a wrong path or an
    /// unsupported file system): the CLI exits with its damage code.
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            FileError::Disk(_)
                | FileError::PartitionTable(_)
                | FileError::FileSystem { .. }
                | FileError::Read { .. }
        )
    }
}

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A device, FIFO or socket (listed, not restored).
    Other,
}

/// One file or directory as the file system records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Entry {
    /// Name in its directory ("" for the root). Names that are not UTF-8 are
    /// shown with U+FFFD.
    pub name: String,
    /// Absolute path inside the volume, `/`-separated.
    pub path: String,
    /// File, directory, symlink or other.
    pub kind: EntryKind,
    /// Size in bytes (0 for directories).
    pub size: u64,
    /// Unix permission bits, where the file system has them (ext).
    pub mode: Option<u32>,
    /// Owner, where the file system has one (ext).
    pub uid: Option<u32>,
    /// Group, where the file system has one (ext).
    pub gid: Option<u32>,
    /// Last modification, seconds since the Unix epoch (FAT: local time taken
    /// as UTC).
    pub mtime: Option<i64>,
    /// Nanoseconds of `mtime`.
    pub mtime_nanos: u32,
    /// Target of a symlink.
    pub link_target: Option<String>,
}

/// A file system opened on one volume. Paths are absolute and `/`-separated;
/// `.` and `..` are resolved lexically and never climb above the root.
pub trait FileSystem {
    /// Which file system this is.
    fn kind(&self) -> FsKind;
    /// The entry at `path` (symlinks are not followed).
    fn stat(&mut self, path: &str) -> Result<Entry, FileError>;
    /// The entries of directory `path`, sorted by name, without `.` and `..`.
    fn list(&mut self, path: &str) -> Result<Vec<Entry>, FileError>;
    /// Copy the contents of regular file `path` to `out`; returns the bytes
    /// copied. Errors name the file.
    fn copy_to(&mut self, path: &str, out: &mut dyn std::io::Write) -> Result<u64, FileError>;
}

/// One volume of a disk: a partition (or the whole disk) and what it holds.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VolumeInfo {
    /// Partition number as Linux numbers them (1–4 primary, 5+ logical; GPT
    /// entry index + 1); 0 is the whole disk when there is no partition table.
    pub partition: u32,
    /// First byte on the disk.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// Partition type as the table records it ("0x83", a GPT type name).
    pub part_type: String,
    /// Partition name (GPT) or "".
    pub label: String,
    /// The file system found.
    pub fs: FsKind,
}

impl VolumeInfo {
    fn describe(&self) -> String {
        format!("{} ({})", self.partition, self.fs)
    }
}

/// The volumes of `disk`: its partitions, or the whole disk when it has no
/// partition table, each with the file system found on it.
pub fn volumes(disk: &Arc<dyn ReadAt>) -> Result<Vec<VolumeInfo>, FileError> {
    let table = partition::read(&**disk)?;
    let parts: Vec<Partition> = match table.scheme {
        Scheme::None => vec![Partition::whole(disk.size())],
        _ => table.partitions,
    };
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        let window = Window::new(disk.clone(), p.start, p.size);
        let fs = probe::probe(&window).map_err(FileError::Disk)?;
        out.push(VolumeInfo {
            partition: p.number,
            start: p.start,
            size: p.size,
            part_type: p.type_name,
            label: p.label,
            fs,
        });
    }
    Ok(out)
}

/// Open the file system on partition `partition` of `disk` (`None`: the only
/// volume that holds a readable file system).
pub fn open(
    disk: Arc<dyn ReadAt>,
    partition: Option<u32>,
) -> Result<Box<dyn FileSystem>, FileError> {
    open_volume(disk, partition).map(|o| o.fs)
}

/// A file system opened by [`open_volume`], with the volume it is on and all
/// the volumes of the disk.
pub struct OpenVolume {
    /// The volume opened.
    pub volume: VolumeInfo,
    /// Every volume of the disk.
    pub volumes: Vec<VolumeInfo>,
    /// Its file system.
    pub fs: Box<dyn FileSystem>,
}

/// [`open`], also saying which volume was chosen.
pub fn open_volume(disk: Arc<dyn ReadAt>, partition: Option<u32>) -> Result<OpenVolume, FileError> {
    let vols = volumes(&disk)?;
    let available = || {
        if vols.is_empty() {
            "none".to_string()
        } else {
            vols.iter()
                .map(VolumeInfo::describe)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let vol = match partition {
        Some(n) => {
            vols.iter()
                .find(|v| v.partition == n)
                .ok_or_else(|| FileError::NoPartition {
                    number: n,
                    available: available(),
                })?
        }
        None => {
            let readable: Vec<&VolumeInfo> = vols.iter().filter(|v| v.fs.is_readable()).collect();
            match readable.as_slice() {
                [one] => *one,
                [] if vols.len() == 1 => &vols[0],
                _ => {
                    return Err(FileError::ChoosePartition {
                        available: available(),
                    })
                }
            }
        }
    };
    let window = Window::new(disk, vol.start, vol.size);
    let n = vol.partition;
    let fs: Box<dyn FileSystem> = match vol.fs {
        FsKind::Ext => Box::new(guard(n, FsKind::Ext, || ext_fs::ExtFs::open(window, n))?),
        FsKind::Ntfs => Box::new(guard(n, FsKind::Ntfs, || ntfs_fs::NtfsFs::open(window, n))?),
        FsKind::Fat => Box::new(guard(n, FsKind::Fat, || fat_fs::FatFs::open(window, n))?),
        FsKind::Unknown => return Err(FileError::UnknownFileSystem { partition: n }),
        other => {
            return Err(FileError::Unsupported {
                partition: n,
                what: other.describe(),
            })
        }
    };
    let volume = vol.clone();
    Ok(OpenVolume {
        volume,
        volumes: vols,
        fs: Box::new(Guarded {
            inner: fs,
            partition: n,
        }),
    })
}

/// Run a file-system reader call, turning a panic inside a third-party reader
/// (a bug it has on hostile input) into a typed error instead of a crash.
fn guard<T>(
    partition: u32,
    fs: FsKind,
    f: impl FnOnce() -> Result<T, FileError>,
) -> Result<T, FileError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        Err(FileError::FileSystem {
            fs,
            partition,
            detail: "the reader stopped on structures it could not handle (damaged file system?)"
                .into(),
        })
    })
}

/// A [`FileSystem`] whose every call runs under [`guard`].
struct Guarded {
    inner: Box<dyn FileSystem>,
    partition: u32,
}

impl FileSystem for Guarded {
    fn kind(&self) -> FsKind {
        self.inner.kind()
    }
    fn stat(&mut self, path: &str) -> Result<Entry, FileError> {
        let (n, k) = (self.partition, self.inner.kind());
        guard(n, k, || self.inner.stat(path))
    }
    fn list(&mut self, path: &str) -> Result<Vec<Entry>, FileError> {
        let (n, k) = (self.partition, self.inner.kind());
        guard(n, k, || self.inner.list(path))
    }
    fn copy_to(&mut self, path: &str, out: &mut dyn std::io::Write) -> Result<u64, FileError> {
        let (n, k) = (self.partition, self.inner.kind());
        guard(n, k, || self.inner.copy_to(path, out))
    }
}

/// The components of `path` with `.` and `..` resolved lexically (never above
/// the root).
pub fn components(path: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// `path` in canonical form: `/` plus its [`components`].
pub fn normalize(path: &str) -> String {
    format!("/{}", components(path).join("/"))
}

/// `dir` joined with `name`.
pub fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// Deepest directory nesting [`walk`] follows (a damaged file system can
/// contain directory loops).
pub const MAX_DEPTH: usize = 256;

/// Visit `root` and everything under it, depth first, parents before their
/// children. A directory that cannot be listed is reported to `on_error` and
/// skipped; the walk goes on.
pub fn walk(
    fs: &mut dyn FileSystem,
    root: &Entry,
    visit: &mut dyn FnMut(&Entry),
    on_error: &mut dyn FnMut(FileError),
) {
    fn inner(
        fs: &mut dyn FileSystem,
        dir: &Entry,
        depth: usize,
        visit: &mut dyn FnMut(&Entry),
        on_error: &mut dyn FnMut(FileError),
    ) {
        if depth > MAX_DEPTH {
            on_error(FileError::Read {
                path: dir.path.clone(),
                detail: format!("directories nested deeper than {MAX_DEPTH} levels (a loop?)"),
            });
            return;
        }
        match fs.list(&dir.path) {
            Ok(entries) => {
                for e in entries {
                    visit(&e);
                    if e.kind == EntryKind::Dir {
                        inner(fs, &e, depth + 1, visit, on_error);
                    }
                }
            }
            Err(e) => on_error(e),
        }
    }
    visit(root);
    if root.kind == EntryKind::Dir {
        inner(fs, root, 0, visit, on_error);
    }
}

/// Entries under `root` (itself included) whose name matches the glob
/// `pattern` (see [`crate::glob`]); unreadable directories go to `errors`.
pub fn find(
    fs: &mut dyn FileSystem,
    root: &str,
    pattern: &str,
    errors: &mut Vec<FileError>,
) -> Result<Vec<Entry>, FileError> {
    let start = fs.stat(root)?;
    let mut found = Vec::new();
    walk(
        fs,
        &start,
        &mut |e| {
            if crate::glob::glob(pattern, &e.name) {
                found.push(e.clone());
            }
        },
        &mut |e| errors.push(e),
    );
    Ok(found)
}

/// Copy a reader to a writer in 1 MiB steps; a read error names the file, a
/// write error is an output error.
pub(crate) fn copy_stream(
    from: &mut dyn std::io::Read,
    to: &mut dyn std::io::Write,
    path: &str,
) -> Result<u64, FileError> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(FileError::Read {
                    path: path.to_string(),
                    detail: e.to_string(),
                })
            }
        };
        to.write_all(&buf[..n]).map_err(|e| FileError::Output {
            path: path.into(),
            source: e,
        })?;
        total += n as u64;
    }
}

/// Seconds and nanoseconds since the Unix epoch of an NT time (100 ns ticks
/// since 1601-01-01).
pub(crate) fn from_nt_time(ticks: u64) -> (i64, u32) {
    const EPOCH_DIFF_SECS: i64 = 11_644_473_600;
    let secs = (ticks / 10_000_000) as i64 - EPOCH_DIFF_SECS;
    let nanos = ((ticks % 10_000_000) * 100) as u32;
    (secs, nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_lexically_and_never_above_the_root() {
        assert_eq!(normalize("/a/./b/../c/"), "/a/c");
        assert_eq!(normalize("../../etc"), "/etc");
        assert_eq!(normalize(""), "/");
        assert_eq!(components("//x//y"), vec!["x", "y"]);
        assert_eq!(join("/", "a"), "/a");
        assert_eq!(join("/a", "b c"), "/a/b c");
    }

    #[test]
    fn nt_times_convert_to_unix() {
        // 2001-09-09T01:46:40Z = 1_000_000_000 s after the Unix epoch.
        let ticks = (1_000_000_000u64 + 11_644_473_600) * 10_000_000 + 5;
        assert_eq!(from_nt_time(ticks), (1_000_000_000, 500));
    }

    #[test]
    fn a_disk_with_nothing_on_it_says_so() {
        let disk: Arc<dyn ReadAt> = Arc::new(vec![0u8; 1 << 20]);
        let vols = volumes(&disk).unwrap();
        assert_eq!(vols.len(), 1);
        assert_eq!(vols[0].fs, FsKind::Unknown);
        let err = open(disk, None).err().unwrap();
        assert!(
            matches!(err, FileError::UnknownFileSystem { partition: 0 }),
            "{err}"
        );
    }
}
