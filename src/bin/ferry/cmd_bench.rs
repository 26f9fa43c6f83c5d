//! `ferry bench`: data-plane stage throughput, end-to-end backup/restore of an
//! image, or the read speed of one source.

use crate::args::*;
use crate::exit;
use crate::render::{self, human_bytes, Output};
use clap::Args;
use ferry::job::{self, BackupRequest, DiskInput};
use ferry::keys::PemKeySource;
use ferry::progress::Progress;
use ferry::repo::Repository;
use ferry::transport::file::FileSource;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct BenchArgs {
    /// Chunk size for the stage benchmarks.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Seconds per stage.
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// Also back up and restore this image end to end in a scratch repository.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Scratch directory for --image (default: system temp dir).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Only read this source (an image/device path or an nbd[s]:// URI): every
    /// allocated byte, discarded; reports the transport's read speed.
    #[arg(long)]
    pub read: Option<String>,
    /// Readers (and NBD connections) for --read.
    #[arg(long, default_value_t = 4)]
    pub readers: usize,
    /// Codecs to compare (stages, and with --image one end-to-end run each):
    /// lz4, zstd[:LEVEL], auto[:LEVEL]. Repeatable or comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [ferry::repo::codec::Codec::Lz4, ferry::repo::codec::Codec::Zstd { level: 1 }])]
    pub compression: Vec<ferry::repo::codec::Codec>,
    #[command(flatten)]
    pub pipe: PipeArgs,
}

/// Run `ferry bench`.
pub fn bench(a: BenchArgs, out: &Output, progress: &Arc<Progress>) -> anyhow::Result<u8> {
    let cs = a.chunk_size as usize;
    if let Some(what) = &a.read {
        let src: Box<dyn ferry::transport::DiskSource> = if what.starts_with("nbd") {
            Box::new(ferry::transport::nbd::NbdSource::connect(what, a.readers)?)
        } else {
            Box::new(FileSource::open(std::path::Path::new(what))?)
        };
        let r = ferry::bench::read_source(src.as_ref(), a.readers, cs)?;
        out.result(&r, || {
            format!(
                "read {} of {} from {} ({}) in {:.2}s: {:.1} MiB/s",
                human_bytes(r.bytes_read),
                human_bytes(r.size),
                r.source,
                r.transport,
                r.seconds,
                r.mib_per_sec
            )
        });
        return Ok(exit::OK);
    }
    let stages = ferry::bench::stages(cs, a.seconds, &a.compression);
    let mut e2e = Vec::new();
    if let Some(img) = &a.image {
        for &codec in &a.compression {
            e2e.push(end_to_end(&a, img, codec, progress)?);
        }
    }
    let v = serde_json::json!({"chunk_size": cs, "stages": stages, "end_to_end": e2e});
    out.result(&v, || render::bench_summary(&v));
    Ok(exit::OK)
}

/// Back up `img` into a scratch repository using `codec`, then restore it.
fn end_to_end(
    a: &BenchArgs,
    img: &std::path::Path,
    codec: ferry::repo::codec::Codec,
    progress: &Arc<Progress>,
) -> anyhow::Result<serde_json::Value> {
    let cs = a.chunk_size as usize;
    let scratch = tempfile::Builder::new()
        .prefix("ferry-bench-")
        .tempdir_in(a.scratch.clone().unwrap_or_else(std::env::temp_dir))?;
    let (public, private) = render::generate_pem(scratch.path(), "bench", 2048)?;
    let ks = PemKeySource::open(Some(&public), Some(&private))?;
    let repo_dir = scratch.path().join("repo");
    let repo = Repository::init_with(&repo_dir, cs as u32, "bench", &ks, codec)?;
    let src = FileSource::open(img)?;
    let size = ferry::transport::DiskSource::size(&src);
    let t = std::time::Instant::now();
    let rep = job::backup(
        &repo,
        &ks,
        BackupRequest {
            source_name: "bench".into(),
            identity: None,
            disks: vec![DiskInput {
                source: Box::new(src),
                label: img.display().to_string(),
                transport_reason: "bench".into(),
                change_id: None,
                read: Default::default(),
            }],
            pipeline: a.pipe.config(cs as u32),
            lock_wait: Duration::from_secs(5),
            snapshot: None,
        },
        progress,
    )?;
    let backup_s = t.elapsed().as_secs_f64();
    let target = scratch.path().join("restored.img");
    let t = std::time::Instant::now();
    job::restore(
        &repo,
        &ks,
        &rep.point_id,
        0,
        &target,
        a.pipe.config(cs as u32),
        &Progress::default(),
    )?;
    let restore_s = t.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "image": img, "size": size, "compression": codec.to_string(),
        "backup_seconds": backup_s, "backup_mib_s": size as f64 / backup_s / 1048576.0,
        "restore_seconds": restore_s, "restore_mib_s": size as f64 / restore_s / 1048576.0,
        "stored_bytes": rep.disks[0].bytes_new_stored,
    }))
}
