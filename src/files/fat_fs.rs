//! FAT12/16/32 through the `fatfs` crate, with long file names. FAT records
//! local time without a zone: ferry reports it as if it were UTC. Names are
//! matched case-insensitively, as on Windows.
//!
//! Must not: write (the crate only writes to mark a volume dirty, which reading
//! never does, and the [`Window`] refuses writes anyway).

use super::source::Window;
use super::{Entry, EntryKind, FileError, FileSystem, FsKind};

/// FAT allows at most 65,536 entries per directory; a longer listing means a
/// cluster chain that loops.
const MAX_DIR_ENTRIES: usize = 65_536;

type Fs = fatfs::FileSystem<Window>;
type Dir<'a> = fatfs::Dir<'a, Window>;
type DirEntry<'a> = fatfs::DirEntry<'a, Window>;

/// A FAT volume.
pub(super) struct FatFs {
    fs: Fs,
    partition: u32,
}

impl FatFs {
    /// Read the boot sector of `volume`.
    pub(super) fn open(volume: Window, partition: u32) -> Result<Self, FileError> {
        let fs = fatfs::FileSystem::new(volume, fatfs::FsOptions::new()).map_err(|e| {
            FileError::FileSystem {
                fs: FsKind::Fat,
                partition,
                detail: e.to_string(),
            }
        })?;
        Ok(FatFs { fs, partition })
    }
}

fn read_err(partition: u32, path: &str, e: std::io::Error) -> FileError {
    FileError::Read {
        path: path.into(),
        detail: format!("FAT on partition {partition}: {e}"),
    }
}

/// The entries of `dir`, bounded, without `.` and `..`.
fn entries<'a>(dir: &Dir<'a>, partition: u32, path: &str) -> Result<Vec<DirEntry<'a>>, FileError> {
    let mut out = Vec::new();
    for e in dir.iter() {
        let e = e.map_err(|e| read_err(partition, path, e))?;
        let name = e.file_name();
        if name == "." || name == ".." {
            continue;
        }
        if out.len() >= MAX_DIR_ENTRIES {
            return Err(FileError::Read {
                path: path.into(),
                detail: format!("more than {MAX_DIR_ENTRIES} entries (a looping cluster chain?)"),
            });
        }
        out.push(e);
    }
    Ok(out)
}

/// Find `path`: `Ok(None)` is the root directory.
fn lookup<'a>(fs: &'a Fs, partition: u32, path: &str) -> Result<Option<DirEntry<'a>>, FileError> {
    let mut dir = fs.root_dir();
    let mut found: Option<DirEntry<'a>> = None;
    let mut walked = String::new();
    for name in super::components(path) {
        if let Some(e) = &found {
            if !e.is_dir() {
                return Err(FileError::NotADirectory { path: walked });
            }
            dir = e.to_dir();
        }
        walked.push('/');
        walked.push_str(name);
        let want = name.to_lowercase();
        let hit = entries(&dir, partition, &walked)?.into_iter().find(|e| {
            e.file_name().to_lowercase() == want || e.short_file_name().to_lowercase() == want
        });
        match hit {
            Some(e) => found = Some(e),
            None => return Err(FileError::NotFound { path: walked }),
        }
    }
    Ok(found)
}

fn unix_time(dt: fatfs::DateTime) -> Option<(i64, u32)> {
    let month = time::Month::try_from(dt.date.month as u8).ok()?;
    let date =
        time::Date::from_calendar_date(dt.date.year as i32, month, dt.date.day as u8).ok()?;
    let t = time::Time::from_hms_milli(
        dt.time.hour as u8,
        dt.time.min as u8,
        dt.time.sec as u8,
        dt.time.millis,
    )
    .ok()?;
    let at = time::PrimitiveDateTime::new(date, t).assume_utc();
    Some((at.unix_timestamp(), at.nanosecond()))
}

fn entry(path: &str, e: &DirEntry<'_>) -> Entry {
    let kind = if e.is_dir() {
        EntryKind::Dir
    } else {
        EntryKind::File
    };
    let (mtime, mtime_nanos) = match unix_time(e.modified()) {
        Some((s, n)) => (Some(s), n),
        None => (None, 0),
    };
    Entry {
        name: e.file_name(),
        path: path.to_string(),
        kind,
        size: if kind == EntryKind::File { e.len() } else { 0 },
        mode: None,
        uid: None,
        gid: None,
        mtime,
        mtime_nanos,
        link_target: None,
    }
}

fn root_entry() -> Entry {
    Entry {
        name: String::new(),
        path: "/".into(),
        kind: EntryKind::Dir,
        size: 0,
        mode: None,
        uid: None,
        gid: None,
        mtime: None,
        mtime_nanos: 0,
        link_target: None,
    }
}

impl FileSystem for FatFs {
    fn kind(&self) -> FsKind {
        FsKind::Fat
    }

    fn stat(&mut self, path: &str) -> Result<Entry, FileError> {
        let path = super::normalize(path);
        Ok(match lookup(&self.fs, self.partition, &path)? {
            None => root_entry(),
            Some(e) => entry(&path, &e),
        })
    }

    fn list(&mut self, path: &str) -> Result<Vec<Entry>, FileError> {
        let path = super::normalize(path);
        let dir = match lookup(&self.fs, self.partition, &path)? {
            None => self.fs.root_dir(),
            Some(e) if e.is_dir() => e.to_dir(),
            Some(_) => return Err(FileError::NotADirectory { path }),
        };
        let mut out: Vec<Entry> = entries(&dir, self.partition, &path)?
            .iter()
            .map(|e| entry(&super::join(&path, &e.file_name()), e))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn copy_to(&mut self, path: &str, out: &mut dyn std::io::Write) -> Result<u64, FileError> {
        let path = super::normalize(path);
        let e = match lookup(&self.fs, self.partition, &path)? {
            Some(e) if e.is_file() => e,
            _ => {
                return Err(FileError::Read {
                    path,
                    detail: "not a regular file".into(),
                })
            }
        };
        let mut file = e.to_file();
        super::copy_stream(&mut file, out, &path)
    }
}
