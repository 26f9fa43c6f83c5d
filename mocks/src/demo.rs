//! The `ferry-sim demo` scenario (foundation stage): generate a disk, full backup,
//! change 1% of it as a guest would, incremental backup, restore both points,
//! verify the repository and check every restore bit for bit. Uses only ferry's
//! public library API, the way an agent does.

use crate::diskgen::{self, DiskSpec};
use crate::fixtures;
use ferry::job::{self, BackupReport, BackupRequest, DiskInput};
use ferry::keys::PemKeySource;
use ferry::pipeline::PipelineConfig;
use ferry::progress::Progress;
use ferry::repo::{format, verify, Repository};
use ferry::transport::file::FileSource;
use std::path::Path;
use std::time::{Duration, Instant};

/// Demo parameters.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Seed of the disk generator.
    pub seed: u64,
    /// Fraction of the disk changed between the two backups.
    pub change: f64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            disk_size: 1 << 30,
            seed: 42,
            change: 0.01,
        }
    }
}

/// One row of the final table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DemoRow {
    /// Step.
    pub step: String,
    /// Point id.
    pub point: String,
    /// Bytes read from the source.
    pub read: u64,
    /// New bytes stored.
    pub stored: u64,
    /// Seconds.
    pub seconds: f64,
    /// MiB/s over the disk size.
    pub rate_mib_s: f64,
    /// Check result.
    pub check: String,
}

fn backup_once(
    repo: &Repository,
    keys: &PemKeySource,
    image: &Path,
) -> anyhow::Result<BackupReport> {
    let req = BackupRequest {
        source_name: "demo-vm".into(),
        disks: vec![DiskInput {
            source: Box::new(FileSource::open(image)?),
            label: "disk0".into(),
            transport_reason: "demo: local image file".into(),
            change_id: None,
            read: Default::default(),
        }],
        pipeline: PipelineConfig::new(None, repo.config.chunk_size, 128 << 20),
        lock_wait: Duration::from_secs(5),
    };
    Ok(job::backup(repo, keys, req, &Progress::default())?)
}

/// Run the demo in `work` (a scratch directory); returns the table rows.
pub fn run(
    work: &Path,
    opts: &DemoOptions,
    log: &mut dyn FnMut(&str),
) -> anyhow::Result<Vec<DemoRow>> {
    let image = work.join("disk0.img");
    let spec = DiskSpec::mixed(opts.disk_size, opts.seed);
    log(&format!(
        "generating a {} MiB mixed disk image (20% zero, 40% text, 40% random)",
        opts.disk_size >> 20
    ));
    diskgen::generate(&image, &spec)?;
    let hash_v1 = diskgen::hash_file(&image)?;
    let pair = fixtures::pem_pair(work, "tenant-a", 2048)?;
    let keys = PemKeySource::open(Some(&pair.public), Some(&pair.private))?;
    let repo = Repository::init(
        &work.join("repo"),
        format::DEFAULT_CHUNK_SIZE,
        "tenant-a",
        &keys,
    )?;
    log("repository initialised (tenant-a, RSA-2048 key in PEM files)");

    let mut rows = Vec::new();
    let rate = |s: f64| opts.disk_size as f64 / s.max(1e-9) / 1048576.0;
    let full = backup_once(&repo, &keys, &image)?;
    let d = &full.disks[0];
    rows.push(DemoRow {
        step: "full backup".into(),
        point: full.point_id.clone(),
        read: d.bytes_read,
        stored: d.bytes_new_stored,
        seconds: full.seconds,
        rate_mib_s: rate(full.seconds),
        check: String::new(),
    });
    log(&format!("full backup: point {}", full.point_id));

    let changed = diskgen::mutate(&image, opts.seed + 1, opts.change, 64 << 10)?;
    log(&format!(
        "guest wrote {} blocks of 64 KiB ({:.1}% of the disk)",
        changed.len(),
        opts.change * 100.0
    ));
    let hash_v2 = diskgen::hash_file(&image)?;
    let inc = backup_once(&repo, &keys, &image)?;
    let d = &inc.disks[0];
    rows.push(DemoRow {
        step: "incremental".into(),
        point: inc.point_id.clone(),
        read: d.bytes_read,
        stored: d.bytes_new_stored,
        seconds: inc.seconds,
        rate_mib_s: rate(inc.seconds),
        check: format!("{} new chunks of {}", d.chunks_new, d.chunks_total),
    });

    for (label, point, want) in [
        ("restore full", &full.point_id, hash_v1),
        ("restore incr", &inc.point_id, hash_v2),
    ] {
        let target = work.join(format!("{point}.img"));
        let t = Instant::now();
        let cfg = PipelineConfig::new(None, repo.config.chunk_size, 128 << 20);
        let st = job::restore(&repo, &keys, point, 0, &target, cfg, &Progress::default())?;
        let secs = t.elapsed().as_secs_f64();
        let got = diskgen::hash_file(&target)?;
        anyhow::ensure!(
            got == want,
            "{label}: restored image differs from the source"
        );
        rows.push(DemoRow {
            step: label.into(),
            point: point.clone(),
            read: 0,
            stored: st.bytes_written,
            seconds: secs,
            rate_mib_s: rate(secs),
            check: "bit-identical".into(),
        });
        std::fs::remove_file(&target)?;
    }
    let t = Instant::now();
    let rep = verify::verify(&repo, &keys, &[], 2, &Progress::default())?;
    anyhow::ensure!(rep.ok(), "verify found damage: {:?}", rep.points);
    rows.push(DemoRow {
        step: "verify".into(),
        point: format!("{} points", rep.points.len()),
        read: 0,
        stored: 0,
        seconds: t.elapsed().as_secs_f64(),
        rate_mib_s: 0.0,
        check: format!("{} chunks authenticated", rep.chunks_checked),
    });
    Ok(rows)
}
