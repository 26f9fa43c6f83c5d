//! `ferry mount`: a restore point's disks as read-only files over FUSE, until
//! Ctrl-C / SIGTERM (or an external `fusermount3 -u`).

use crate::args::*;
use crate::exit;
use crate::render::{human_bytes, Output};
use clap::Args;
use ferry::mount::{DiskMount, MountedDisk};
use ferry::progress::Progress;
use ferry::repo::Repository;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

#[derive(Args)]
#[command(
    after_help = "Each disk appears as DIR/disk<N>.img, read-only. Loop-mount what `ferry files` \
cannot read itself, for example:\n  \
ferry mount -r /repo latest:vm1 /mnt/point &\n  \
losetup --find --show --read-only --partscan /mnt/point/disk0.img\n  \
mount -o ro /dev/loop0p1 /mnt/vm1-root\n\
Unmount with Ctrl-C, SIGTERM or `fusermount3 -u DIR`. A loop mount by root of a mount made \
by another user needs --allow-other (and user_allow_other in /etc/fuse.conf)."
)]
pub struct MountArgs {
    #[command(flatten)]
    pub repo: RepoArg,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Restore point id, or "latest:<name>".
    pub point: String,
    /// Empty directory to mount on.
    pub dir: PathBuf,
    /// Only these disks (repeatable); default every disk of the point.
    #[arg(long = "disk")]
    pub disks: Vec<u32>,
    /// Let other users (root included) read the files.
    #[arg(long)]
    pub allow_other: bool,
    /// Memory for decoded chunks per disk, in MiB.
    #[arg(long, default_value_t = 64)]
    pub cache_mib: u64,
}

/// `ferry mount`.
pub fn mount(a: MountArgs, out: &Output, progress: &Arc<Progress>) -> anyhow::Result<u8> {
    let repo = Repository::open(&a.repo.repo)?;
    let point = resolve_point(&repo, &a.point)?;
    let (_, header, _) = repo.read_manifest(&point)?;
    let wanted: Vec<u32> = if a.disks.is_empty() {
        header.disks.iter().map(|d| d.disk).collect()
    } else {
        a.disks.clone()
    };
    let ks = a.keys.unwrap_source()?;
    let mut disks = Vec::new();
    let mut shown = Vec::new();
    for d in wanted {
        let export = open_point_disk(&a.repo.repo, &*ks, &point, d, a.cache_mib)?;
        let name = format!("disk{d}.img");
        shown.push(serde_json::json!({"file": a.dir.join(&name), "disk": d, "size": ferry::files::ReadAt::size(&export)}));
        disks.push(MountedDisk {
            name,
            disk: Arc::new(export),
        });
    }
    drop(ks);
    let time = UNIX_EPOCH + Duration::from_secs(header.created_unix.max(0) as u64);
    let session = DiskMount::new(disks, time)
        .spawn(&a.dir, a.allow_other)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot mount on {}: {e} (needs /dev/fuse and fusermount3 from the fuse3 package, or root; the directory must exist)",
                a.dir.display()
            )
        })?;
    out.result(
        &serde_json::json!({"point": point, "mounted": a.dir, "files": shown}),
        || {
            let mut s = format!("{point} mounted read-only on {}:\n", a.dir.display());
            for f in &shown {
                s += &format!(
                    "  {}  {}\n",
                    f["file"].as_str().unwrap_or_default(),
                    human_bytes(f["size"].as_u64().unwrap_or(0))
                );
            }
            s + "Ctrl-C or SIGTERM unmounts."
        },
    );
    tracing::info!(point = %point, dir = %a.dir.display(), "mounted");
    while !progress.cancelled() && !session.guard.is_finished() {
        std::thread::sleep(Duration::from_millis(200));
    }
    if session.guard.is_finished() {
        // Unmounted from outside (fusermount3 -u): the session ended by itself.
        let _ = session.join();
    } else {
        session.umount_and_join().map_err(|e| {
            anyhow::anyhow!(
                "cannot unmount {}: {e} (a loop device or a process still uses it; free it, then `fusermount3 -u {}`)",
                a.dir.display(),
                a.dir.display()
            )
        })?;
    }
    tracing::info!(dir = %a.dir.display(), "unmounted");
    Ok(exit::OK)
}
