//! ext2/3/4 through the `ext4-view` crate (read-only, pure Rust, checks the
//! metadata checksums ext4 carries).
//!
//! Must not: write; follow a symlink in the last path component of `stat`.

use super::source::Window;
use super::{Entry, EntryKind, FileError, FileSystem, FsKind};
use ext4_view::{Ext4, Ext4Error, Ext4Read, Metadata};

/// The disk as `ext4-view` reads it.
struct Reader(Window);

impl Ext4Read for Reader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0.read_exact_at(start_byte, dst).map_err(Box::from)
    }
}

/// An ext2/3/4 volume.
pub(super) struct ExtFs {
    fs: Ext4,
    partition: u32,
}

impl ExtFs {
    /// Load the superblock, group descriptors and journal of `volume`.
    pub(super) fn open(volume: Window, partition: u32) -> Result<Self, FileError> {
        let fs = Ext4::load(Box::new(Reader(volume))).map_err(|e| FileError::FileSystem {
            fs: FsKind::Ext,
            partition,
            detail: e.to_string(),
        })?;
        Ok(ExtFs { fs, partition })
    }

    fn err(&self, path: &str, e: Ext4Error) -> FileError {
        match e {
            Ext4Error::NotFound => FileError::NotFound { path: path.into() },
            Ext4Error::NotADirectory => FileError::NotADirectory { path: path.into() },
            Ext4Error::Io(io) => FileError::Read {
                path: path.into(),
                detail: format!("reading the disk: {io}"),
            },
            other => FileError::Read {
                path: path.into(),
                detail: format!("ext file system on partition {}: {other}", self.partition),
            },
        }
    }

    fn entry(&self, path: &str, name: &str, m: &Metadata) -> Result<Entry, FileError> {
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_symlink() {
            EntryKind::Symlink
        } else if ft.is_regular_file() {
            EntryKind::File
        } else {
            EntryKind::Other
        };
        let link_target = if kind == EntryKind::Symlink {
            let t = self.fs.read_link(path).map_err(|e| self.err(path, e))?;
            Some(String::from_utf8_lossy(t.as_ref()).into_owned())
        } else {
            None
        };
        let mtime = m.modified();
        Ok(Entry {
            name: name.to_string(),
            path: path.to_string(),
            kind,
            size: if kind == EntryKind::Dir { 0 } else { m.len() },
            mode: Some(m.mode() as u32),
            uid: Some(m.uid()),
            gid: Some(m.gid()),
            mtime: Some(mtime.seconds()),
            mtime_nanos: mtime.nanoseconds(),
            link_target,
        })
    }
}

impl FileSystem for ExtFs {
    fn kind(&self) -> FsKind {
        FsKind::Ext
    }

    fn stat(&mut self, path: &str) -> Result<Entry, FileError> {
        let path = super::normalize(path);
        let m = self
            .fs
            .symlink_metadata(path.as_str())
            .map_err(|e| self.err(&path, e))?;
        let name = super::components(&path).last().copied().unwrap_or("");
        self.entry(&path, name, &m)
    }

    fn list(&mut self, path: &str) -> Result<Vec<Entry>, FileError> {
        let path = super::normalize(path);
        let dir = self
            .fs
            .read_dir(path.as_str())
            .map_err(|e| self.err(&path, e))?;
        let mut out = Vec::new();
        for item in dir {
            let item = item.map_err(|e| self.err(&path, e))?;
            let name = String::from_utf8_lossy(item.file_name().as_ref()).into_owned();
            if name == "." || name == ".." {
                continue;
            }
            let child = super::join(&path, &name);
            let m = item.metadata().map_err(|e| self.err(&child, e))?;
            out.push(self.entry(&child, &name, &m)?);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn copy_to(&mut self, path: &str, out: &mut dyn std::io::Write) -> Result<u64, FileError> {
        let path = super::normalize(path);
        let m = self
            .fs
            .symlink_metadata(path.as_str())
            .map_err(|e| self.err(&path, e))?;
        if !m.file_type().is_regular_file() {
            return Err(FileError::Read {
                path,
                detail: "not a regular file".into(),
            });
        }
        let mut file = self
            .fs
            .open(path.as_str())
            .map_err(|e| self.err(&path, e))?;
        super::copy_stream(&mut file, out, &path)
    }
}
