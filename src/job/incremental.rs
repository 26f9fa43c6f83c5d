//! Whether one disk of a backup is read incrementally (only what changed-block
//! tracking reports changed since the previous restore point) or in full, and why.
//!
//! Owns: the [`ChangeTracker`] seam a transport-aware caller implements (the VM job
//! asks vCenter's QueryChangedDiskAreas), the pure choice of the base (the previous
//! point's copy of the same disk, with its change id) in [`choose_base`], and the
//! reasons recorded in manifests and outcomes ([`FullReason`]).
//! Must not: talk to vCenter, read repository files, or run the pipeline; the I/O
//! around the decision is in [`super::backup`].

use crate::repo::manifest::{DiskRecord, DiskSummary};
use crate::transport::Extent;
use std::fmt;

/// Where changed and allocated areas of one snapshot disk come from (CBT).
/// Called from the backup's blocking thread, once per disk.
pub trait ChangeTracker: Send + Sync {
    /// Areas changed between `change_id` (recorded by an earlier restore point)
    /// and the snapshot being backed up.
    fn changed_since(&self, change_id: &str) -> Result<Vec<Extent>, TrackerError>;
    /// Every allocated area of the snapshot (vSphere's `changeId = "*"`), so a
    /// full read can skip what was never written.
    fn allocated(&self) -> Result<Vec<Extent>, TrackerError>;
}

/// Why a [`ChangeTracker`] could not answer.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// The change id is unknown to CBT: tracking was reset (snapshot revert,
    /// disk resize, CBT toggled, VM moved) or it belongs to another disk.
    #[error("{0}")]
    UnknownChangeId(String),
    /// Asking failed for another reason (vCenter error, malformed answer).
    #[error("{0}")]
    Failed(String),
}

/// How a disk should be read, as the caller knows it.
#[derive(Default)]
pub struct ReadRequest {
    /// Changed-block tracking of this disk at snapshot time; `None` = the source
    /// has none and is read in full.
    pub tracker: Option<Box<dyn ChangeTracker>>,
    /// Read in full even with a tracker, and why (a full backup was asked for,
    /// CBT is off); shown as the reason.
    pub full_reason: Option<String>,
}

impl ReadRequest {
    /// Read in full for `reason`, with no tracking.
    pub fn full(reason: impl Into<String>) -> Self {
        ReadRequest {
            tracker: None,
            full_reason: Some(reason.into()),
        }
    }
}

/// Why a disk was read in full. Each names what the operator would check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FullReason {
    /// The caller asked for a full read (or knows CBT is unusable), with its words.
    Requested(String),
    /// The source has no changed-block tracking (image files, NBD exports).
    NoTracking,
    /// The snapshot reports no change id for the disk.
    NoChangeIdNow,
    /// First backup of this source.
    NoPrevious {
        /// Source (VM) name.
        source: String,
    },
    /// The previous point could not be opened.
    PreviousUnreadable {
        /// Point id.
        point: String,
        /// Why.
        error: String,
    },
    /// The previous point has no disk with this label.
    NotInPrevious {
        /// Point id.
        point: String,
        /// Disk label.
        label: String,
    },
    /// The repository's chunk size differs from the previous point's.
    ChunkSizeChanged {
        /// Point id.
        point: String,
        /// Chunk size then.
        was: u32,
        /// Chunk size now.
        now: u32,
    },
    /// The disk's capacity changed.
    Resized {
        /// Point id.
        point: String,
        /// Bytes then.
        was: u64,
        /// Bytes now.
        now: u64,
    },
    /// The previous point recorded no change id for the disk.
    NoPreviousChangeId {
        /// Point id.
        point: String,
    },
    /// The previous point's index of the disk cannot be used.
    PreviousIndex {
        /// Point id.
        point: String,
        /// Why.
        error: String,
    },
    /// CBT no longer knows the previous change id.
    CbtReset {
        /// The change id asked for.
        change_id: String,
        /// The tracker's message.
        error: String,
    },
    /// Asking CBT failed otherwise.
    CbtFailed {
        /// The change id asked for.
        change_id: String,
        /// The tracker's message.
        error: String,
    },
}

impl fmt::Display for FullReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FullReason::Requested(why) => write!(f, "{why}"),
            FullReason::NoTracking => f.write_str("the source has no changed-block tracking"),
            FullReason::NoChangeIdNow => f.write_str(
                "the snapshot reports no changeId for this disk (CBT not active for it yet)",
            ),
            FullReason::NoPrevious { source } => {
                write!(f, "first backup: no earlier restore point of {source}")
            }
            FullReason::PreviousUnreadable { point, error } => {
                write!(f, "the previous restore point {point} cannot be opened ({error})")
            }
            FullReason::NotInPrevious { point, label } => {
                write!(f, "the previous restore point {point} has no disk {label:?}")
            }
            FullReason::ChunkSizeChanged { point, was, now } => write!(
                f,
                "the previous restore point {point} uses {was}-byte chunks, this backup {now}"
            ),
            FullReason::Resized { point, was, now } => write!(
                f,
                "disk resized: {was} bytes in the previous restore point {point}, {now} now"
            ),
            FullReason::NoPreviousChangeId { point } => write!(
                f,
                "the previous restore point {point} recorded no changeId for this disk"
            ),
            FullReason::PreviousIndex { point, error } => write!(
                f,
                "the index of this disk in the previous restore point {point} is unusable ({error})"
            ),
            FullReason::CbtReset { change_id, error } => write!(
                f,
                "CBT cannot answer since changeId {change_id:?}: tracking was reset (snapshot revert, disk resize, CBT toggled or VM moved) ({error})"
            ),
            FullReason::CbtFailed { change_id, error } => write!(
                f,
                "asking CBT for the changes since changeId {change_id:?} failed ({error})"
            ),
        }
    }
}

/// The previous restore point of the same source, as far as it could be opened.
pub struct Previous<'a> {
    /// Point id.
    pub point_id: &'a str,
    /// Its chunk size.
    pub chunk_size: u32,
    /// Its public disk list (labels).
    pub summaries: &'a [DiskSummary],
    /// Its sealed per-disk records (change ids, index hashes).
    pub records: &'a [DiskRecord],
}

/// This disk, as the snapshot reports it now.
pub struct Current<'a> {
    /// Label (for VM disks "Hard disk 1 (key 2000)": device label and key).
    pub label: &'a str,
    /// Capacity in bytes.
    pub size: u64,
    /// Chunk size of this backup.
    pub chunk_size: u32,
    /// Change id at snapshot time.
    pub change_id: Option<&'a str>,
}

/// The base of an incremental read: the previous point's copy of the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Base {
    /// Point id.
    pub point_id: String,
    /// Disk number in that point.
    pub disk: u32,
    /// Change id that point recorded for the disk.
    pub change_id: String,
    /// Its index hash, from the authenticated manifest.
    pub index_hash: [u8; 32],
}

/// Choose the base of an incremental read of `now`, or say why the disk must be
/// read in full. `previous`: `Ok(None)` when the source has no earlier point,
/// `Err(point, error)` when the newest one could not be opened. Pure.
pub fn choose_base(
    req: &ReadRequest,
    source: &str,
    previous: Result<Option<&Previous<'_>>, (&str, &str)>,
    now: &Current<'_>,
) -> Result<Base, FullReason> {
    if req.tracker.is_none() {
        return Err(match &req.full_reason {
            Some(r) => FullReason::Requested(r.clone()),
            None => FullReason::NoTracking,
        });
    }
    if let Some(r) = &req.full_reason {
        return Err(FullReason::Requested(r.clone()));
    }
    if now.change_id.is_none() {
        return Err(FullReason::NoChangeIdNow);
    }
    let p = match previous {
        Err((point, error)) => {
            return Err(FullReason::PreviousUnreadable {
                point: point.to_string(),
                error: error.to_string(),
            })
        }
        Ok(None) => {
            return Err(FullReason::NoPrevious {
                source: source.to_string(),
            })
        }
        Ok(Some(p)) => p,
    };
    let point = || p.point_id.to_string();
    let rec = p
        .summaries
        .iter()
        .filter(|s| s.label == now.label)
        .find_map(|s| p.records.iter().find(|r| r.disk == s.disk))
        .ok_or_else(|| FullReason::NotInPrevious {
            point: point(),
            label: now.label.to_string(),
        })?;
    if p.chunk_size != now.chunk_size {
        return Err(FullReason::ChunkSizeChanged {
            point: point(),
            was: p.chunk_size,
            now: now.chunk_size,
        });
    }
    if rec.size != now.size {
        return Err(FullReason::Resized {
            point: point(),
            was: rec.size,
            now: now.size,
        });
    }
    let change_id = rec
        .change_id
        .clone()
        .filter(|c| !c.is_empty() && c != crate::vsphere::cbt::ALL_ALLOCATED)
        .ok_or_else(|| FullReason::NoPreviousChangeId { point: point() })?;
    let index_hash = hex::decode(&rec.index_blake3)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| FullReason::PreviousIndex {
            point: point(),
            error: "the manifest's index hash is malformed".into(),
        })?;
    Ok(Base {
        point_id: point(),
        disk: rec.disk,
        change_id,
        index_hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::manifest::ReadMode;

    struct NoTracker;
    impl ChangeTracker for NoTracker {
        fn changed_since(&self, _: &str) -> Result<Vec<Extent>, TrackerError> {
            Ok(Vec::new())
        }
        fn allocated(&self) -> Result<Vec<Extent>, TrackerError> {
            Ok(Vec::new())
        }
    }

    fn tracked() -> ReadRequest {
        ReadRequest {
            tracker: Some(Box::new(NoTracker)),
            full_reason: None,
        }
    }

    fn record(disk: u32, size: u64, change_id: Option<&str>) -> DiskRecord {
        DiskRecord {
            disk,
            index: format!("disk-{disk}.idx"),
            index_blake3: hex::encode([disk as u8; 32]),
            size,
            chunks_total: 0,
            chunks_zero: 0,
            chunks_new: 0,
            bytes_new_stored: 0,
            bytes_read: 0,
            change_id: change_id.map(str::to_string),
            transport: "nbdssl".into(),
            transport_reason: String::new(),
            read: ReadMode::Full,
            read_reason: String::new(),
            changed_bytes: None,
            chunks_unchanged: 0,
        }
    }

    fn summary(disk: u32, label: &str, size: u64) -> DiskSummary {
        DiskSummary {
            disk,
            size,
            label: label.into(),
        }
    }

    const L0: &str = "Hard disk 1 (key 2000)";
    const L1: &str = "Hard disk 2 (key 2001)";

    fn now(label: &str, size: u64) -> Current<'_> {
        Current {
            label,
            size,
            chunk_size: 1 << 20,
            change_id: Some("52 aa/9"),
        }
    }

    #[test]
    fn the_same_disk_of_the_previous_point_is_the_base_matched_by_label() {
        let sums = [summary(0, L0, 64 << 20), summary(1, L1, 8 << 20)];
        let recs = [
            record(0, 64 << 20, Some("52 aa/3")),
            record(1, 8 << 20, Some("52 bb/3")),
        ];
        let p = Previous {
            point_id: "P1",
            chunk_size: 1 << 20,
            summaries: &sums,
            records: &recs,
        };
        let b = choose_base(&tracked(), "vm", Ok(Some(&p)), &now(L1, 8 << 20)).unwrap();
        assert_eq!(
            b,
            Base {
                point_id: "P1".into(),
                disk: 1,
                change_id: "52 bb/3".into(),
                index_hash: [1; 32],
            }
        );
    }

    #[test]
    fn every_reason_for_a_full_read_is_named() {
        let sums = [summary(0, L0, 64 << 20)];
        let recs = [record(0, 64 << 20, Some("52 aa/3"))];
        let p = Previous {
            point_id: "P1",
            chunk_size: 1 << 20,
            summaries: &sums,
            records: &recs,
        };
        fn full(
            req: &ReadRequest,
            prev: Result<Option<&Previous<'_>>, (&str, &str)>,
            cur: &Current<'_>,
        ) -> FullReason {
            choose_base(req, "web", prev, cur).unwrap_err()
        }
        let cur = now(L0, 64 << 20);
        assert_eq!(
            full(&ReadRequest::default(), Ok(Some(&p)), &cur),
            FullReason::NoTracking
        );
        assert_eq!(
            full(&ReadRequest::full("CBT is off"), Ok(Some(&p)), &cur),
            FullReason::Requested("CBT is off".into())
        );
        let mut forced = tracked();
        forced.full_reason = Some("a full backup was requested".into());
        assert_eq!(
            full(&forced, Ok(Some(&p)), &cur).to_string(),
            "a full backup was requested"
        );
        let mut no_id = now(L0, 64 << 20);
        no_id.change_id = None;
        assert_eq!(
            full(&tracked(), Ok(Some(&p)), &no_id),
            FullReason::NoChangeIdNow
        );
        let r = full(&tracked(), Ok(None), &cur);
        assert_eq!(
            r.to_string(),
            "first backup: no earlier restore point of web"
        );
        let r = full(&tracked(), Err(("P0", "key missing")), &cur);
        assert!(r.to_string().contains("P0") && r.to_string().contains("key missing"));
        let r = full(&tracked(), Ok(Some(&p)), &now(L1, 64 << 20));
        assert!(matches!(r, FullReason::NotInPrevious { .. }), "{r}");
        let r = full(&tracked(), Ok(Some(&p)), &now(L0, 128 << 20));
        assert_eq!(
            r.to_string(),
            format!(
                "disk resized: {} bytes in the previous restore point P1, {} now",
                64u64 << 20,
                128u64 << 20
            )
        );
        let mut cs = now(L0, 64 << 20);
        cs.chunk_size = 4 << 20;
        assert!(matches!(
            full(&tracked(), Ok(Some(&p)), &cs),
            FullReason::ChunkSizeChanged { .. }
        ));
        for id in [None, Some(""), Some("*")] {
            let recs = [record(0, 64 << 20, id)];
            let p = Previous {
                records: &recs,
                ..p
            };
            assert_eq!(
                full(&tracked(), Ok(Some(&p)), &cur),
                FullReason::NoPreviousChangeId { point: "P1".into() }
            );
        }
        let mut bad = record(0, 64 << 20, Some("52 aa/3"));
        bad.index_blake3 = "zz".into();
        let recs = [bad];
        let p = Previous {
            records: &recs,
            ..p
        };
        assert!(matches!(
            full(&tracked(), Ok(Some(&p)), &cur),
            FullReason::PreviousIndex { .. }
        ));
    }
}
