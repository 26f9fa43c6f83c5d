//! NTFS through the `ntfs` crate (read-only, pure Rust): names are looked up
//! case-insensitively through the volume's $UpCase table, as Windows does;
//! listings show long names only (not the 8.3 aliases) and hide the NTFS
//! metadata files ($MFT, $Bitmap, ...).
//!
//! Must not: write; show 8.3 duplicates or metadata files.

use super::source::Window;
use super::{Entry, EntryKind, FileError, FileSystem, FsKind};
use ::ntfs::indexes::NtfsFileNameIndex;
use ::ntfs::structured_values::NtfsFileNamespace;
use ::ntfs::{Ntfs, NtfsError, NtfsFile, NtfsReadSeek};

/// Record number of the root directory.
const ROOT: u64 = 5;
/// Records below this number are reserved for NTFS metadata files.
const FIRST_USER_RECORD: u64 = 24;

/// An NTFS volume.
pub(super) struct NtfsFs {
    ntfs: Ntfs,
    disk: Window,
    partition: u32,
}

impl NtfsFs {
    /// Read the boot sector and the $UpCase table of `volume`.
    pub(super) fn open(mut volume: Window, partition: u32) -> Result<Self, FileError> {
        let fail = |e: NtfsError| FileError::FileSystem {
            fs: FsKind::Ntfs,
            partition,
            detail: e.to_string(),
        };
        let mut ntfs = Ntfs::new(&mut volume).map_err(fail)?;
        ntfs.read_upcase_table(&mut volume).map_err(fail)?;
        Ok(NtfsFs {
            ntfs,
            disk: volume,
            partition,
        })
    }

    fn err(&self, path: &str, e: NtfsError) -> FileError {
        FileError::Read {
            path: path.into(),
            detail: format!("NTFS on partition {}: {e}", self.partition),
        }
    }

    /// The file record number of `path`.
    fn lookup(&mut self, path: &str) -> Result<u64, FileError> {
        let mut record = ROOT;
        let mut walked = String::new();
        for name in super::components(path) {
            walked.push('/');
            walked.push_str(name);
            let dir = self
                .ntfs
                .file(&mut self.disk, record)
                .map_err(|e| self.err(&walked, e))?;
            if !dir.is_directory() {
                return Err(FileError::NotADirectory {
                    path: walked
                        .rsplit_once('/')
                        .map(|(p, _)| p)
                        .unwrap_or("/")
                        .into(),
                });
            }
            let index = dir
                .directory_index(&mut self.disk)
                .map_err(|e| self.err(&walked, e))?;
            let mut finder = index.finder();
            let found = NtfsFileNameIndex::find(&mut finder, &self.ntfs, &mut self.disk, name);
            record = match found {
                None => return Err(FileError::NotFound { path: walked }),
                Some(Err(e)) => return Err(self.err(&walked, e)),
                Some(Ok(entry)) => entry.file_reference().file_record_number(),
            };
        }
        Ok(record)
    }

    fn entry(&mut self, path: &str, name: &str, record: u64) -> Result<Entry, FileError> {
        let file = self
            .ntfs
            .file(&mut self.disk, record)
            .map_err(|e| self.err(path, e))?;
        let kind = if file.is_directory() {
            EntryKind::Dir
        } else {
            EntryKind::File
        };
        let size = if kind == EntryKind::File {
            data_len(&file, &mut self.disk).map_err(|e| self.err(path, e))?
        } else {
            0
        };
        let (mtime, mtime_nanos) = match file.info() {
            Ok(info) => {
                let (s, n) = super::from_nt_time(info.modification_time().nt_timestamp());
                (Some(s), n)
            }
            Err(_) => (None, 0),
        };
        Ok(Entry {
            name: name.to_string(),
            path: path.to_string(),
            kind,
            size,
            mode: None,
            uid: None,
            gid: None,
            mtime,
            mtime_nanos,
            link_target: None,
        })
    }
}

/// Length of the unnamed $DATA stream (0 when there is none).
fn data_len(file: &NtfsFile<'_>, disk: &mut Window) -> Result<u64, NtfsError> {
    match file.data(disk, "") {
        None => Ok(0),
        Some(item) => Ok(item?.to_attribute()?.value_length()),
    }
}

impl FileSystem for NtfsFs {
    fn kind(&self) -> FsKind {
        FsKind::Ntfs
    }

    fn stat(&mut self, path: &str) -> Result<Entry, FileError> {
        let path = super::normalize(path);
        let record = self.lookup(&path)?;
        let name = super::components(&path)
            .last()
            .copied()
            .unwrap_or("")
            .to_string();
        self.entry(&path, &name, record)
    }

    fn list(&mut self, path: &str) -> Result<Vec<Entry>, FileError> {
        let path = super::normalize(path);
        let record = self.lookup(&path)?;
        let mut names: Vec<(String, u64)> = Vec::new();
        {
            let dir = self
                .ntfs
                .file(&mut self.disk, record)
                .map_err(|e| self.err(&path, e))?;
            if !dir.is_directory() {
                return Err(FileError::NotADirectory { path });
            }
            let index = dir
                .directory_index(&mut self.disk)
                .map_err(|e| self.err(&path, e))?;
            let mut entries = index.entries();
            while let Some(entry) = entries.next(&mut self.disk) {
                let entry = entry.map_err(|e| self.err(&path, e))?;
                let child = entry.file_reference().file_record_number();
                let Some(key) = entry.key() else { continue };
                let key = key.map_err(|e| self.err(&path, e))?;
                if key.namespace() == NtfsFileNamespace::Dos {
                    continue;
                }
                let name = key.name().to_string_lossy();
                if name == "." || (child < FIRST_USER_RECORD && name.starts_with('$')) {
                    continue;
                }
                names.push((name, child));
            }
        }
        let mut out = Vec::with_capacity(names.len());
        for (name, child) in names {
            let child_path = super::join(&path, &name);
            out.push(self.entry(&child_path, &name, child)?);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn copy_to(&mut self, path: &str, out: &mut dyn std::io::Write) -> Result<u64, FileError> {
        let path = super::normalize(path);
        let record = self.lookup(&path)?;
        let file = self
            .ntfs
            .file(&mut self.disk, record)
            .map_err(|e| self.err(&path, e))?;
        if file.is_directory() {
            return Err(FileError::Read {
                path,
                detail: "not a regular file".into(),
            });
        }
        let item = match file.data(&mut self.disk, "") {
            None => return Ok(0),
            Some(item) => item.map_err(|e| self.err(&path, e))?,
        };
        let attribute = item.to_attribute().map_err(|e| self.err(&path, e))?;
        let mut value = attribute
            .value(&mut self.disk)
            .map_err(|e| self.err(&path, e))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = value
                .read(&mut self.disk, &mut buf)
                .map_err(|e| self.err(&path, e))?;
            if n == 0 {
                return Ok(total);
            }
            out.write_all(&buf[..n]).map_err(|e| FileError::Output {
                path: path.clone().into(),
                source: e,
            })?;
            total += n as u64;
        }
    }
}
