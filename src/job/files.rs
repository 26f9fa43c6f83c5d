//! File-level work of the agent's runner: look into a restore point's disk
//! (`POST /v1/files/list`, `/v1/files/find`) and restore single files and
//! directories into a directory on the agent host (a restore job with a
//! `files` target). The reading itself is [`crate::files`]; this module opens
//! the tenant's repository and keys and maps errors to [`RunError`].
//!
//! Must not: write outside the target directory (see [`crate::files::restore`]);
//! hold a repository lock longer than the request or job.

use super::runner::{open_unwrap_keys, repo_err};
use crate::agent::{DiskResult, FilesAnswer, FilesQuery, JobContext, RunError, RunOutput};
use crate::config::TenantSection;
use crate::export::{ExportOptions, PointExport};
use crate::files::{self, FileError};
use crate::repo::Repository;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Decoded-chunk cache per request or job.
const CACHE_BYTES: u64 = 64 << 20;

fn file_err(e: FileError) -> RunError {
    match e {
        FileError::NotFound { .. } | FileError::NoPartition { .. } => {
            RunError::NotFound(e.to_string())
        }
        e => RunError::Failed(e.to_string()),
    }
}

/// The point's disk, opened with the tenant's keys, and its chosen volume.
fn open(
    tenant: &TenantSection,
    point: &str,
    disk: u32,
    partition: Option<u32>,
) -> Result<(Arc<PointExport>, files::OpenVolume), RunError> {
    let keys = open_unwrap_keys(tenant)?;
    let repo = Repository::open(&tenant.repository).map_err(repo_err)?;
    let point_id = repo.resolve_point(point).map_err(repo_err)?;
    let export = Arc::new(
        PointExport::open(
            repo,
            keys.as_ref(),
            &point_id,
            disk,
            ExportOptions {
                cache_bytes: CACHE_BYTES,
                ..ExportOptions::default()
            },
        )
        .map_err(repo_err)?,
    );
    let opened = files::open_volume(export.clone(), partition).map_err(file_err)?;
    Ok((export, opened))
}

/// List or search, as [`crate::agent::JobRunner::browse_files`].
pub(super) fn browse(tenant: &TenantSection, q: &FilesQuery) -> Result<FilesAnswer, RunError> {
    let (export, mut opened) = open(tenant, &q.point, q.disk, q.partition)?;
    let mut errors = Vec::new();
    let mut entries = match &q.pattern {
        None => {
            let e = opened.fs.stat(&q.path).map_err(file_err)?;
            if e.kind == files::EntryKind::Dir {
                opened.fs.list(&e.path).map_err(file_err)?
            } else {
                vec![e]
            }
        }
        Some(p) => {
            let mut errs = Vec::new();
            let found = files::find(&mut *opened.fs, &q.path, p, &mut errs).map_err(file_err)?;
            errors = errs.iter().map(|e| e.to_string()).collect();
            found
        }
    };
    let truncated = entries.len() > q.limit;
    entries.truncate(q.limit);
    Ok(FilesAnswer {
        point_id: export.point_id().to_string(),
        volume: opened.volume,
        volumes: opened.volumes,
        entries,
        truncated,
        errors,
        chunks_read: export.stats().chunks_decoded,
    })
}

/// Restore `paths` of one disk of `point` into `dir`.
pub(super) fn restore(
    ctx: &JobContext,
    point: &str,
    dir: &Path,
    disk: u32,
    partition: Option<u32>,
    paths: &[String],
) -> Result<RunOutput, RunError> {
    let started = Instant::now();
    let (export, mut opened) = open(&ctx.tenant, point, disk, partition)?;
    let mut bytes = 0;
    let (mut nfiles, mut ndirs) = (0u64, 0u64);
    let mut failures = Vec::new();
    for p in paths {
        if ctx.is_cancelled() {
            return Err(RunError::Cancelled);
        }
        let r = files::restore::get(&mut *opened.fs, p, dir, &ctx.progress).map_err(file_err)?;
        bytes += r.bytes;
        nfiles += r.files;
        ndirs += r.dirs;
        failures.extend(r.failures);
    }
    if ctx.is_cancelled() {
        return Err(RunError::Cancelled);
    }
    let summary = format!(
        "{nfiles} files and {ndirs} directories from partition {} ({}) restored to {}; {} chunks read",
        opened.volume.partition,
        opened.volume.fs,
        dir.display(),
        export.stats().chunks_decoded
    );
    if !failures.is_empty() {
        let named: Vec<String> = failures.iter().take(10).map(|f| f.error.clone()).collect();
        return Err(RunError::Failed(format!(
            "{} of the files did not restore: {}{}; the rest did: {summary}",
            failures.len(),
            named.join("; "),
            if failures.len() > 10 { "; ..." } else { "" }
        )));
    }
    tracing::info!(point = export.point_id(), disk, "{summary}");
    Ok(RunOutput {
        disks: vec![DiskResult {
            disk_key: disk as i32,
            label: format!("partition {}", opened.volume.partition),
            proxy: ctx.proxy.id.clone(),
            mode: None,
            reason: summary,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
            error: None,
            read: None,
            read_reason: None,
        }],
        point_id: Some(export.point_id().to_string()),
        notes: vec![],
    })
}
