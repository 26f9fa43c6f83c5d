//! `files get`: copy a file or a directory tree out of a [`FileSystem`] into a
//! local directory, with modification times and permission bits where the file
//! system has them. One damaged file is reported and the rest still restore.
//!
//! Must not: overwrite an existing file; change the target directory's own
//! mode or times; write outside the target directory
//! (names are checked one by one, never re-parsed from paths); keep a partly
//! written file after an error; restore set-user-ID or set-group-ID bits (the
//! restoring user owns the files, not the original owner).

use super::{Entry, EntryKind, FileError, FileSystem, MAX_DEPTH};
use crate::progress::Progress;
use serde::Serialize;
use std::fs::{self, File, FileTimes, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

/// One file that did not restore.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct GetFailure {
    /// Path inside the volume.
    pub path: String,
    /// Why.
    pub error: String,
    /// Whether the cause is damaged data (as opposed to a local write error).
    pub damage: bool,
}

/// What `get` did.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct GetReport {
    /// Regular files written.
    pub files: u64,
    /// Directories created (or found in place).
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Devices, FIFOs and sockets skipped.
    pub skipped: u64,
    /// Bytes of file data written.
    pub bytes: u64,
    /// What did not restore.
    pub failures: Vec<GetFailure>,
    /// Where the restored tree starts.
    #[schema(value_type = String)]
    pub target: PathBuf,
}

/// Whether `name` is safe as one path component on this machine.
fn safe_name(name: &str) -> bool {
    !(name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0'))
}

/// Restore `path` of `fs` into directory `out_dir` (created if missing): a file
/// becomes `out_dir/<name>`, a directory `out_dir/<name>/...`, the root
/// directory's contents land in `out_dir` itself. `progress.total` is set to
/// the bytes to copy and `progress.done` follows; cancellation stops between
/// files.
pub fn get(
    fs: &mut dyn FileSystem,
    path: &str,
    out_dir: &Path,
    progress: &Progress,
) -> Result<GetReport, FileError> {
    let root = fs.stat(path)?;
    let output = |p: &Path, e: std::io::Error| FileError::Output {
        path: p.to_path_buf(),
        source: e,
    };
    fs::create_dir_all(out_dir).map_err(|e| output(out_dir, e))?;
    let target = if root.name.is_empty() {
        out_dir.to_path_buf()
    } else if safe_name(&root.name) {
        out_dir.join(&root.name)
    } else {
        return Err(FileError::Read {
            path: root.path,
            detail: "the name cannot be used as a local file name".into(),
        });
    };
    let mut report = GetReport {
        target: target.clone(),
        ..GetReport::default()
    };
    let mut plan = Vec::new();
    collect(fs, root, target, 0, &mut plan, &mut report);
    let total: u64 = plan
        .iter()
        .filter(|(e, _)| e.kind == EntryKind::File)
        .map(|(e, _)| e.size)
        .sum();
    progress.total.fetch_add(total, Ordering::Relaxed);
    // Directories not restored: nothing is written under them (one could be a
    // symlink that a file below would be written through).
    let mut not_restored: std::collections::HashSet<PathBuf> = Default::default();
    for (entry, dest) in &plan {
        if progress.cancelled() {
            break;
        }
        if dest.parent().is_some_and(|p| not_restored.contains(p)) {
            not_restored.insert(dest.clone());
            report.failures.push(GetFailure {
                path: entry.path.clone(),
                damage: false,
                error: format!(
                    "{}: its directory was not restored, so neither is it",
                    dest.display()
                ),
            });
            continue;
        }
        if let Err(e) = restore_one(fs, entry, dest, &mut report, progress) {
            if entry.kind == EntryKind::Dir {
                not_restored.insert(dest.clone());
            }
            tracing::warn!(path = %entry.path, error = %e, "file not restored");
            report.failures.push(GetFailure {
                path: entry.path.clone(),
                damage: e.is_damage(),
                error: e.to_string(),
            });
        }
    }
    // Directory times and modes last, deepest first, so that writing their
    // contents neither changed the times nor needed a mode they lack.
    for (entry, dest) in plan.iter().rev() {
        // The operator's own --out directory keeps its mode and times (a 0700
        // restore area must not become 0755 because the volume's root is).
        let real_dir = fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir());
        if entry.kind == EntryKind::Dir && real_dir && dest != out_dir {
            if let Err(e) = set_attributes(entry, dest) {
                report.failures.push(GetFailure {
                    path: entry.path.clone(),
                    damage: false,
                    error: format!("{}: setting times and mode: {e}", dest.display()),
                });
            }
        }
    }
    Ok(report)
}

/// Walk the tree under `entry`, parents before children, pairing each entry
/// with its local destination.
fn collect(
    fs: &mut dyn FileSystem,
    entry: Entry,
    dest: PathBuf,
    depth: usize,
    plan: &mut Vec<(Entry, PathBuf)>,
    report: &mut GetReport,
) {
    let is_dir = entry.kind == EntryKind::Dir;
    let dir_path = entry.path.clone();
    plan.push((entry, dest.clone()));
    if !is_dir {
        return;
    }
    if depth >= MAX_DEPTH {
        report.failures.push(GetFailure {
            path: dir_path,
            error: format!("directories nested deeper than {MAX_DEPTH} levels (a loop?)"),
            damage: true,
        });
        return;
    }
    match fs.list(&dir_path) {
        Ok(children) => {
            for child in children {
                if !safe_name(&child.name) {
                    report.failures.push(GetFailure {
                        path: child.path.clone(),
                        error: "the name cannot be used as a local file name".into(),
                        damage: true,
                    });
                    continue;
                }
                let d = dest.join(&child.name);
                collect(fs, child, d, depth + 1, plan, report);
            }
        }
        Err(e) => report.failures.push(GetFailure {
            path: dir_path,
            damage: e.is_damage(),
            error: e.to_string(),
        }),
    }
}

fn restore_one(
    fs: &mut dyn FileSystem,
    entry: &Entry,
    dest: &Path,
    report: &mut GetReport,
    progress: &Progress,
) -> Result<(), FileError> {
    let output = |e: std::io::Error| FileError::Output {
        path: dest.to_path_buf(),
        source: e,
    };
    match entry.kind {
        EntryKind::Dir => {
            match fs::create_dir(dest) {
                Ok(()) => {}
                // An existing directory is merged into; a symlink there is
                // never followed (it could lead out of the restore area: a
                // link restored earlier, then a directory of that name).
                Err(e)
                    if e.kind() == std::io::ErrorKind::AlreadyExists
                        && fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    return Err(output(std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "exists and is not a directory (a symlink is not followed)",
                    )))
                }
                Err(e) => return Err(output(e)),
            }
            report.dirs += 1;
        }
        EntryKind::File => {
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dest)
                .map_err(output)?;
            let mut w = BufWriter::with_capacity(1 << 20, Counting { file, progress });
            let copied = fs.copy_to(&entry.path, &mut w).and_then(|n| {
                let file = w.into_inner().map_err(|e| output(e.into_error()))?.file;
                file.sync_all().map_err(output)?;
                Ok(n)
            });
            match copied {
                Ok(n) => {
                    report.files += 1;
                    report.bytes += n;
                    set_attributes(entry, dest).map_err(output)?;
                }
                Err(e) => {
                    // Never leave half a file behind.
                    let _ = fs::remove_file(dest);
                    return Err(e);
                }
            }
        }
        EntryKind::Symlink => {
            let target = entry.link_target.as_deref().unwrap_or_default();
            std::os::unix::fs::symlink(target, dest).map_err(output)?;
            report.symlinks += 1;
        }
        EntryKind::Other => report.skipped += 1,
    }
    Ok(())
}

/// A file writer that counts bytes into the progress.
struct Counting<'a> {
    file: File,
    progress: &'a Progress,
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        Progress::add(&self.progress.done, n as u64);
        Progress::add(&self.progress.written, n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Apply the modification time, then the mode bits (without set-user/group-ID).
fn set_attributes(entry: &Entry, dest: &Path) -> std::io::Result<()> {
    if let Some(secs) = entry.mtime {
        let at = if secs >= 0 {
            UNIX_EPOCH + Duration::new(secs as u64, entry.mtime_nanos)
        } else {
            UNIX_EPOCH
                .checked_sub(Duration::from_secs(secs.unsigned_abs()))
                .unwrap_or(UNIX_EPOCH)
        };
        let times = FileTimes::new().set_modified(at);
        // Times first: the file still has the mode it was created with, so it
        // opens whatever mode it gets next (changing the mode keeps mtime).
        File::open(dest)?.set_times(times)?;
    }
    if let Some(mode) = entry.mode {
        fs::set_permissions(dest, fs::Permissions::from_mode(mode & 0o1777))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::FsKind;
    use std::collections::BTreeMap;

    /// A volume in memory: paths to entries (and file contents).
    struct MemFs(BTreeMap<String, (Entry, Vec<u8>)>);

    impl MemFs {
        fn new(items: &[(&str, EntryKind, &str)]) -> MemFs {
            let mut m = BTreeMap::new();
            let root = entry("", "/", EntryKind::Dir, None);
            m.insert("/".to_string(), (root, vec![]));
            for (path, kind, data) in items {
                let name = path.rsplit('/').next().unwrap();
                let link = (*kind == EntryKind::Symlink).then(|| data.to_string());
                let e = entry(name, path, *kind, link);
                m.insert(path.to_string(), (e, data.as_bytes().to_vec()));
            }
            MemFs(m)
        }
    }

    fn entry(name: &str, path: &str, kind: EntryKind, link: Option<String>) -> Entry {
        Entry {
            name: name.into(),
            path: path.into(),
            kind,
            size: 0,
            mode: None,
            uid: None,
            gid: None,
            mtime: None,
            mtime_nanos: 0,
            link_target: link,
        }
    }

    impl FileSystem for MemFs {
        fn kind(&self) -> FsKind {
            FsKind::Ext
        }
        fn stat(&mut self, path: &str) -> Result<Entry, FileError> {
            self.0
                .get(path)
                .map(|(e, d)| Entry {
                    size: d.len() as u64,
                    ..e.clone()
                })
                .ok_or_else(|| FileError::NotFound { path: path.into() })
        }
        fn list(&mut self, path: &str) -> Result<Vec<Entry>, FileError> {
            let prefix = if path == "/" {
                "/".to_string()
            } else {
                format!("{path}/")
            };
            Ok(self
                .0
                .iter()
                .filter(|(p, _)| {
                    p.len() > prefix.len()
                        && p.starts_with(&prefix)
                        && !p[prefix.len()..].contains('/')
                })
                .map(|(_, (e, d))| Entry {
                    size: d.len() as u64,
                    ..e.clone()
                })
                .collect())
        }
        fn copy_to(&mut self, path: &str, out: &mut dyn std::io::Write) -> Result<u64, FileError> {
            let d = &self.0[path].1;
            out.write_all(d).unwrap();
            Ok(d.len() as u64)
        }
    }

    #[test]
    fn a_symlink_restored_earlier_is_never_followed_by_a_later_restore() {
        let area = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let progress = Progress::default();
        // First restore: a volume whose `x` is a symlink leading out of the area.
        let target = outside.path().to_str().unwrap().to_string();
        let mut first = MemFs::new(&[("/x", EntryKind::Symlink, &target)]);
        let r = get(&mut first, "/x", area.path(), &progress).unwrap();
        assert_eq!(r.symlinks, 1);
        // Second restore into the same area: a directory `x` with a file.
        let mut second = MemFs::new(&[
            ("/x", EntryKind::Dir, ""),
            ("/x/evil", EntryKind::File, "payload"),
        ]);
        let r = get(&mut second, "/x", area.path(), &progress).unwrap();
        assert_eq!(r.files, 0, "nothing written through the link");
        assert!(!r.failures.is_empty());
        assert!(
            r.failures[0].error.contains("not followed"),
            "{:?}",
            r.failures
        );
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn names_that_would_escape_are_refused() {
        for bad in ["", ".", "..", "a/b", "x\0"] {
            assert!(!safe_name(bad), "{bad:?}");
        }
        for good in ["a", "b c", "é", "...", ".hidden"] {
            assert!(safe_name(good), "{good:?}");
        }
    }
}
