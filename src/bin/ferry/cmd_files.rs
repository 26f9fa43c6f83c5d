//! `ferry files`: list, find and copy out single files of a restore point's
//! disk (ext2/3/4, NTFS, FAT), reading only the chunks they need.

use crate::args::*;
use crate::exit;
use crate::render::{human_bytes, Output};
use clap::{Args, Subcommand};
use ferry::export::PointExport;
use ferry::files::{self, Entry, EntryKind, FileSystem, ReadAt};
use ferry::progress::Progress;
use ferry::repo::Repository;
use std::path::PathBuf;
use std::sync::Arc;

/// Where the files come from: one disk (and volume) of a restore point.
#[derive(Args)]
pub struct PointDisk {
    #[command(flatten)]
    pub repo: RepoArg,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Restore point id, or "latest:<name>".
    pub point: String,
    /// Disk number.
    #[arg(long, default_value_t = 0)]
    pub disk: u32,
    /// Partition number as Linux numbers them (1-4 primary, 5+ logical, GPT
    /// entry + 1; 0 = whole disk without a partition table). Default: the only
    /// partition with a readable file system (`ferry files volumes` lists them).
    #[arg(long)]
    pub partition: Option<u32>,
    /// Memory for decoded chunks, in MiB.
    #[arg(long, default_value_t = 64)]
    pub cache_mib: u64,
}

#[derive(Subcommand)]
pub enum FilesCmd {
    /// List the partitions of a disk and the file system on each.
    Volumes(PointDisk),
    /// List a directory (or show one file).
    Ls {
        #[command(flatten)]
        at: PointDisk,
        /// Path inside the volume.
        #[arg(default_value = "/")]
        path: String,
    },
    /// Copy files or whole directories out, with times and permissions where
    /// the file system has them. Existing files are never overwritten.
    Get {
        #[command(flatten)]
        at: PointDisk,
        /// Paths inside the volume.
        #[arg(required = true)]
        paths: Vec<String>,
        /// Local directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Find files and directories by name pattern (`*`, `?`).
    Find {
        #[command(flatten)]
        at: PointDisk,
        /// Name pattern, matched against each name (not the whole path).
        pattern: String,
        /// Search under this directory only.
        #[arg(long, default_value = "/")]
        under: String,
    },
}

/// An opened disk: the export (for its chunk counters) and the disk as the
/// file readers see it.
struct Opened {
    export: Arc<PointExport>,
    point: String,
}

impl Opened {
    fn open(a: &PointDisk) -> anyhow::Result<Opened> {
        let repo = Repository::open(&a.repo.repo)?;
        let ks = a.keys.unwrap_source()?;
        let point = resolve_point(&repo, &a.point)?;
        drop(repo);
        let export = Arc::new(open_point_disk(
            &a.repo.repo,
            &*ks,
            &point,
            a.disk,
            a.cache_mib,
        )?);
        Ok(Opened { export, point })
    }

    fn disk(&self) -> Arc<dyn ReadAt> {
        self.export.clone()
    }

    fn fs(&self, partition: Option<u32>) -> anyhow::Result<Box<dyn FileSystem>> {
        Ok(files::open(self.disk(), partition)?)
    }

    fn export_chunk_size(&self) -> u64 {
        self.export.chunk_size()
    }

    fn chunks_read(&self) -> u64 {
        self.export.stats().chunks_decoded
    }
}

/// `ferry files ...`.
pub fn run(cmd: FilesCmd, out: &Output, progress: &Arc<Progress>) -> anyhow::Result<u8> {
    match cmd {
        FilesCmd::Volumes(at) => volumes(at, out),
        FilesCmd::Ls { at, path } => ls(at, &path, out),
        FilesCmd::Get {
            at,
            paths,
            out: dir,
        } => get(at, &paths, &dir, out, progress),
        FilesCmd::Find { at, pattern, under } => find(at, &pattern, &under, out),
    }
}

fn volumes(at: PointDisk, out: &Output) -> anyhow::Result<u8> {
    let o = Opened::open(&at)?;
    let vols = files::volumes(&o.disk())?;
    out.result(
        &serde_json::json!({"point": o.point, "disk": at.disk, "volumes": vols, "chunks_read": o.chunks_read()}),
        || {
            let mut s = format!("{:>9}  {:>12}  {:>10}  {:<22}  {:<10}  label\n", "partition", "start", "size", "type", "fs");
            for v in &vols {
                s += &format!(
                    "{:>9}  {:>12}  {:>10}  {:<22}  {:<10}  {}\n",
                    v.partition,
                    v.start,
                    human_bytes(v.size),
                    v.part_type,
                    v.fs.to_string(),
                    v.label
                );
            }
            s.trim_end().to_string()
        },
    );
    Ok(exit::OK)
}

fn mode_text(e: &Entry) -> String {
    let t = match e.kind {
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        EntryKind::File => '-',
        EntryKind::Other => '?',
    };
    let Some(m) = e.mode else {
        return format!("{t}---------");
    };
    let mut s = String::from(t);
    for shift in [6u32, 3, 0] {
        let b = (m >> shift) & 7;
        s.push(if b & 4 != 0 { 'r' } else { '-' });
        s.push(if b & 2 != 0 { 'w' } else { '-' });
        s.push(if b & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn time_text(e: &Entry) -> String {
    e.mtime
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}",
                t.year(),
                t.month() as u8,
                t.day(),
                t.hour(),
                t.minute()
            )
        })
        .unwrap_or_else(|| "-".repeat(16))
}

/// `ls -l`-like lines.
fn entries_table(entries: &[Entry], full_path: bool) -> String {
    let mut s = String::new();
    for e in entries {
        let name = if full_path { &e.path } else { &e.name };
        let link = match &e.link_target {
            Some(t) => format!(" -> {t}"),
            None => String::new(),
        };
        s += &format!(
            "{}  {:>12}  {}  {}{}\n",
            mode_text(e),
            e.size,
            time_text(e),
            name,
            link
        );
    }
    s.trim_end().to_string()
}

fn ls(at: PointDisk, path: &str, out: &Output) -> anyhow::Result<u8> {
    let o = Opened::open(&at)?;
    let mut fs = o.fs(at.partition)?;
    let entry = fs.stat(path)?;
    let entries = if entry.kind == EntryKind::Dir {
        fs.list(&entry.path)?
    } else {
        vec![entry.clone()]
    };
    out.result(
        &serde_json::json!({
            "point": o.point, "disk": at.disk, "fs": fs.kind(), "path": entry.path,
            "entries": entries, "chunks_read": o.chunks_read(),
        }),
        || entries_table(&entries, false),
    );
    Ok(exit::OK)
}

fn find(at: PointDisk, pattern: &str, under: &str, out: &Output) -> anyhow::Result<u8> {
    let o = Opened::open(&at)?;
    let mut fs = o.fs(at.partition)?;
    let mut errors = Vec::new();
    let found = files::find(&mut *fs, under, pattern, &mut errors)?;
    let errs: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    for e in &errs {
        eprintln!("warning: {e}");
    }
    out.result(
        &serde_json::json!({
            "point": o.point, "disk": at.disk, "fs": fs.kind(), "pattern": pattern,
            "matches": found, "errors": errs, "chunks_read": o.chunks_read(),
        }),
        || entries_table(&found, true),
    );
    Ok(if errors.iter().any(|e| e.is_damage()) {
        exit::DAMAGED
    } else if errors.is_empty() {
        exit::OK
    } else {
        exit::FAILED
    })
}

fn get(
    at: PointDisk,
    paths: &[String],
    dir: &std::path::Path,
    out: &Output,
    progress: &Arc<Progress>,
) -> anyhow::Result<u8> {
    let o = Opened::open(&at)?;
    let mut fs = o.fs(at.partition)?;
    let started = std::time::Instant::now();
    let _bar = out.progress_bar(progress.clone(), "restoring files");
    let mut reports = Vec::new();
    for p in paths {
        reports.push(files::restore::get(&mut *fs, p, dir, progress)?);
    }
    drop(_bar);
    let secs = started.elapsed().as_secs_f64();
    let failures: Vec<_> = reports.iter().flat_map(|r| r.failures.iter()).collect();
    let bytes: u64 = reports.iter().map(|r| r.bytes).sum();
    let chunks = o.chunks_read();
    let chunk_bytes = chunks * o.export_chunk_size();
    out.result(
        &serde_json::json!({
            "point": o.point, "disk": at.disk, "fs": fs.kind(), "restored": reports,
            "chunks_read": chunks, "chunk_bytes_read": chunk_bytes, "seconds": secs,
        }),
        || {
            let mut s = String::new();
            for r in &reports {
                s += &format!(
                    "{}: {} files, {} directories, {} symlinks, {}{}\n",
                    r.target.display(),
                    r.files,
                    r.dirs,
                    r.symlinks,
                    human_bytes(r.bytes),
                    if r.skipped > 0 {
                        format!(", {} special files skipped", r.skipped)
                    } else {
                        String::new()
                    }
                );
            }
            for f in &failures {
                s += &format!("FAILED {}\n", f.error);
            }
            s += &format!(
                "{} in {secs:.2} s; {chunks} chunks ({}) read from the repository",
                human_bytes(bytes),
                human_bytes(chunk_bytes)
            );
            s
        },
    );
    Ok(if progress.cancelled() {
        exit::CANCELLED
    } else if failures.iter().any(|f| f.damage) {
        exit::DAMAGED
    } else if failures.is_empty() {
        exit::OK
    } else {
        exit::FAILED
    })
}
