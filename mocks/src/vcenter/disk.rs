//! One virtual disk as ESXi keeps it: a chain of sparse layer files (the base, then one
//! delta per snapshot), snapshots that freeze everything below the current delta, and
//! changed block tracking (CBT).
//!
//! - A snapshot freezes the current top layer and opens a new empty delta on top;
//!   later guest writes go to that delta (copy-on-write per [`BLOCK`]).
//! - Removing a snapshot consolidates: the delta above the frozen layer is merged
//!   into it, as ESXi does, and the frozen layer keeps its file name.
//! - CBT: an epoch (a UUID, new at enable, reset and resize) and a sequence number;
//!   a snapshot issues a new point, and writes are logged under the current point,
//!   so the extents changed between any point and a snapshot are exact unions.
//! - Readers of a frozen snapshot ([`Frozen`], used by the NBD ticket provider and
//!   hot-add devices) block the snapshot's removal while they exist.
//!
//! Owns the files of the disk and nothing else: it knows no VM, no SOAP, no session.
//! Every length and offset is checked against the capacity; nothing here panics on
//! caller input.

use super::extents::RangeSet;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// Allocation, copy-on-write and CBT granularity (64 KiB, a common CBT block size).
pub const BLOCK: u64 = 64 * 1024;

/// Largest single copy buffer used when merging or materialising.
const COPY_CHUNK: u64 = 1 << 20;

/// What went wrong with a disk operation; every variant names the disk file.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A file operation failed.
    #[error("disk file {path}: {source}")]
    Io {
        /// File on the mock's disk.
        path: String,
        /// OS error.
        source: io::Error,
    },
    /// The snapshot id is not (or no longer) part of this disk's chain.
    #[error("disk {disk}: no snapshot with id {id} (already removed?)")]
    NoSuchSnapshot {
        /// Disk file name.
        disk: String,
        /// Internal snapshot id.
        id: u64,
    },
    /// The file is in use (attached to a VM, exported over NBD, being removed).
    #[error("disk {file} is locked: {why}")]
    Locked {
        /// Datastore path of the locked file.
        file: String,
        /// By what.
        why: String,
    },
    /// Changed block tracking is off for this disk (or was off at snapshot time).
    #[error("changed block tracking is not enabled for disk {file} (enable it with ReconfigVM changeTrackingEnabled=true, then take a new snapshot)")]
    CbtDisabled {
        /// Disk file name.
        file: String,
    },
    /// The changeId is unknown: wrong epoch (CBT was reset), or not a point of this disk.
    #[error("disk {file}: changeId {change_id:?} is not valid for this disk (CBT was reset or the id belongs to another disk): read the whole disk")]
    UnknownChangeId {
        /// Disk file name.
        file: String,
        /// As given.
        change_id: String,
    },
    /// An offset outside the disk.
    #[error("disk {file}: offset {offset} is outside the disk (capacity {capacity})")]
    OutOfRange {
        /// Disk file name.
        file: String,
        /// Offset asked for.
        offset: u64,
        /// Disk capacity.
        capacity: u64,
    },
    /// The operation is not allowed in the disk's state.
    #[error("disk {file}: {why}")]
    Invalid {
        /// Disk file name.
        file: String,
        /// Why.
        why: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One layer file: the base disk or a snapshot delta.
pub struct Layer {
    path: PathBuf,
    name: String,
    file: File,
    /// Allocated blocks (indices of [`BLOCK`]-sized blocks).
    alloc: RwLock<RangeSet>,
}

impl Layer {
    fn create(path: PathBuf, name: String, capacity: u64) -> Result<Layer, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_err(&path))?;
        file.set_len(capacity).map_err(io_err(&path))?;
        Ok(Layer {
            path,
            name,
            file,
            alloc: RwLock::new(RangeSet::new()),
        })
    }

    fn has(&self, block: u64) -> bool {
        self.alloc
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(block)
    }

    fn mark(&self, start: u64, end: u64) {
        self.alloc
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(start, end);
    }

    fn alloc_within(&self, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        self.alloc
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .within(lo, hi)
    }
}

/// A CBT point: epoch and sequence number, printed as a vSphere changeId.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CbtPoint {
    /// Epoch UUID in vSphere's spaced form.
    pub epoch: String,
    /// Sequence number within the epoch.
    pub seq: u64,
}

impl CbtPoint {
    /// `<epoch>/<seq>`, the changeId format vSphere uses.
    pub fn change_id(&self) -> String {
        format!("{}/{}", self.epoch, self.seq)
    }
}

/// Parse `<epoch>/<seq>`; `None` when malformed.
pub fn parse_change_id(s: &str) -> Option<(String, u64)> {
    let (epoch, seq) = s.rsplit_once('/')?;
    if epoch.is_empty() || epoch.len() > 128 {
        return None;
    }
    Some((epoch.to_string(), seq.parse().ok()?))
}

/// A new epoch in vSphere's changeId style: 16 bytes as
/// `"52 xx xx xx xx xx xx xx-xx xx xx xx xx xx xx xx"`.
fn new_epoch() -> String {
    let b: [u8; 16] = rand::random();
    let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}", hex[..8].join(" "), hex[8..].join(" "))
}

struct Cbt {
    epoch: String,
    first: u64,
    current: u64,
    /// Blocks written while each point was current.
    log: BTreeMap<u64, RangeSet>,
}

impl Cbt {
    fn new() -> Cbt {
        let mut log = BTreeMap::new();
        log.insert(1, RangeSet::new());
        Cbt {
            epoch: new_epoch(),
            first: 1,
            current: 1,
            log,
        }
    }
    fn point(&self) -> CbtPoint {
        CbtPoint {
            epoch: self.epoch.clone(),
            seq: self.current,
        }
    }
}

/// Who is reading a frozen snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReaderKind {
    /// An NBD export opened by ticket.
    Nbd,
    /// A disk hot-added to a proxy VM.
    HotAdd,
}

#[derive(Default)]
struct Readers {
    nbd: AtomicUsize,
    hotadd: AtomicUsize,
}

impl Readers {
    fn counter(&self, k: ReaderKind) -> &AtomicUsize {
        match k {
            ReaderKind::Nbd => &self.nbd,
            ReaderKind::HotAdd => &self.hotadd,
        }
    }
}

struct SnapEntry {
    id: u64,
    capacity: u64,
    cbt: Option<CbtPoint>,
    readers: Arc<Readers>,
    removing: bool,
}

struct Chain {
    capacity: u64,
    /// `layers[k]` is frozen by `snaps[k]`; the last layer is the live delta.
    layers: Vec<Arc<Layer>>,
    snaps: Vec<SnapEntry>,
    cbt: Option<Cbt>,
    next_delta: u32,
    next_snap: u64,
}

impl Chain {
    fn index(&self, id: u64, disk: &str) -> Result<usize, DiskError> {
        self.snaps
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| DiskError::NoSuchSnapshot {
                disk: disk.to_string(),
                id,
            })
    }
}

/// Where a disk's files live.
#[derive(Clone, Debug)]
pub struct DiskLocation {
    /// Datastore directory on the mock's file system.
    pub datastore_dir: PathBuf,
    /// Datastore name, as in `[name] folder/file.vmdk`.
    pub datastore: String,
    /// Folder inside the datastore (the VM's name).
    pub folder: String,
    /// File stem (`vm` for `vm.vmdk`, `vm_1` for the second disk).
    pub stem: String,
}

impl DiskLocation {
    fn file(&self, suffix: &str) -> (PathBuf, String) {
        let file = format!("{}{suffix}.vmdk", self.stem);
        (
            self.datastore_dir.join(&self.folder).join(&file),
            format!("[{}] {}/{}", self.datastore, self.folder, file),
        )
    }
}

/// Changed areas of a disk between a changeId and a snapshot, for one call of
/// QueryChangedDiskAreas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeInfo {
    /// Where this answer starts.
    pub start: u64,
    /// How much of the disk this answer covers from `start`.
    pub length: u64,
    /// Changed `(offset, length)` areas inside `[start, start + length)`.
    pub areas: Vec<(u64, u64)>,
}

/// Role of a datastore file in a disk chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileRole {
    /// The live top layer the guest writes to.
    Live,
    /// The layer frozen by the snapshot with this id.
    Frozen(u64),
}

/// A virtual disk (see the module documentation).
pub struct Disk {
    loc: DiskLocation,
    base_name: String,
    inner: Mutex<Chain>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Disk({})", self.base_name)
    }
}

impl Disk {
    /// Create the base file (sparse, `capacity` bytes) and fill it with `content`
    /// when given (zero regions stay holes).
    pub fn create(
        loc: DiskLocation,
        capacity: u64,
        content: Option<&crate::diskgen::DiskSpec>,
    ) -> Result<Disk, DiskError> {
        let folder = loc.datastore_dir.join(&loc.folder);
        std::fs::create_dir_all(&folder).map_err(io_err(&folder))?;
        remove_stale_deltas(&folder, &loc.stem)?;
        let (path, name) = loc.file("");
        let layer = match content {
            Some(spec) => {
                let spec = crate::diskgen::DiskSpec {
                    size: capacity,
                    ..spec.clone()
                };
                crate::diskgen::generate(&path, &spec).map_err(io_err(&path))?;
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                let mut alloc = RangeSet::new();
                for i in 0..spec.regions() {
                    if spec.region_kind(i) != crate::diskgen::Region::Zero {
                        let s = i * spec.region;
                        let e = (s + spec.region).min(capacity);
                        alloc.insert(s / BLOCK, e.div_ceil(BLOCK));
                    }
                }
                Layer {
                    path,
                    name: name.clone(),
                    file,
                    alloc: RwLock::new(alloc),
                }
            }
            None => Layer::create(path, name.clone(), capacity)?,
        };
        Ok(Disk {
            loc,
            base_name: name,
            inner: Mutex::new(Chain {
                capacity,
                layers: vec![Arc::new(layer)],
                snaps: Vec::new(),
                cbt: None,
                next_delta: 1,
                next_snap: 1,
            }),
        })
    }

    /// The base file's datastore path (stable name for messages).
    pub fn base_name(&self) -> &str {
        &self.base_name
    }

    /// Current capacity in bytes.
    pub fn capacity(&self) -> u64 {
        lock(&self.inner).capacity
    }

    /// Datastore path of the live (top) layer: what the VM's disk backing shows.
    pub fn live_file_name(&self) -> String {
        let c = lock(&self.inner);
        c.layers.last().map(|l| l.name.clone()).unwrap_or_default()
    }

    /// Path of the live (top) layer file on the mock's file system.
    pub fn live_path(&self) -> PathBuf {
        let c = lock(&self.inner);
        c.layers.last().map(|l| l.path.clone()).unwrap_or_default()
    }

    /// Every layer file of the disk (to delete them when the disk is destroyed).
    pub fn files(&self) -> Vec<PathBuf> {
        lock(&self.inner)
            .layers
            .iter()
            .map(|l| l.path.clone())
            .collect()
    }

    /// After the live layer file was written directly (a disk hot-added writable
    /// to a proxy writes through its device entry): mark every block holding a
    /// non-zero byte as allocated, and log newly allocated blocks as changed when
    /// CBT is on. Only for a disk without snapshots (the live layer is the base).
    /// Returns the number of blocks newly marked.
    pub fn rescan_live(&self) -> Result<u64, DiskError> {
        let mut c = lock(&self.inner);
        if c.layers.len() != 1 {
            return Err(DiskError::Invalid {
                file: self.base_name.clone(),
                why: "written directly while it has snapshots".into(),
            });
        }
        let layer = c.layers[0].clone();
        let capacity = c.capacity;
        let mut buf = vec![0u8; COPY_CHUNK as usize];
        let mut fresh = RangeSet::new();
        let mut pos = 0u64;
        while pos < capacity {
            let n = (capacity - pos).min(COPY_CHUNK) as usize;
            layer
                .file
                .read_exact_at(&mut buf[..n], pos)
                .map_err(io_err(&layer.path))?;
            for (i, blk) in buf[..n].chunks(BLOCK as usize).enumerate() {
                let b = pos / BLOCK + i as u64;
                if !layer.has(b) && blk.iter().any(|&x| x != 0) {
                    fresh.insert(b, b + 1);
                }
            }
            pos += n as u64;
        }
        let mut count = 0;
        for (s, e) in fresh.iter() {
            layer.mark(s, e);
            count += e - s;
        }
        if let Some(cbt) = c.cbt.as_mut() {
            let cur = cbt.current;
            cbt.log.entry(cur).or_default().union_with(&fresh);
        }
        Ok(count)
    }

    /// The live changeId, when CBT is on.
    pub fn live_change_id(&self) -> Option<String> {
        lock(&self.inner)
            .cbt
            .as_ref()
            .map(|c| c.point().change_id())
    }

    /// True when CBT is on.
    pub fn cbt_enabled(&self) -> bool {
        lock(&self.inner).cbt.is_some()
    }

    /// Turn CBT on (a new epoch) if it is off; no-op when already on.
    pub fn enable_cbt(&self) {
        let mut c = lock(&self.inner);
        if c.cbt.is_none() {
            c.cbt = Some(Cbt::new());
        }
    }

    /// Turn CBT off; every changeId becomes invalid.
    pub fn disable_cbt(&self) {
        lock(&self.inner).cbt = None;
    }

    /// Reset CBT (new epoch) as vSphere does after a resize or a CBT reset: every
    /// earlier changeId becomes invalid. No-op when CBT is off.
    pub fn reset_cbt(&self) {
        let mut c = lock(&self.inner);
        if c.cbt.is_some() {
            c.cbt = Some(Cbt::new());
        }
    }

    /// Write `data` at `offset` as the guest would: into the live layer, copying the
    /// rest of each touched block from below first. Returns the touched byte range
    /// rounded to blocks.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(u64, u64), DiskError> {
        let mut c = lock(&self.inner);
        let len = data.len() as u64;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= c.capacity)
            .ok_or_else(|| DiskError::OutOfRange {
                file: self.base_name.clone(),
                offset: offset.saturating_add(len),
                capacity: c.capacity,
            })?;
        if len == 0 {
            return Ok((offset, 0));
        }
        let capacity = c.capacity;
        let top = c.layers.last().cloned().expect("a disk has a base layer");
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        for blk in first..=last {
            let bs = blk * BLOCK;
            let be = (bs + BLOCK).min(capacity);
            let ws = offset.max(bs);
            let we = end.min(be);
            let src = &data[(ws - offset) as usize..(we - offset) as usize];
            if top.has(blk) {
                top.file.write_all_at(src, ws).map_err(io_err(&top.path))?;
            } else {
                let mut buf = vec![0u8; (be - bs) as usize];
                read_chain(&c.layers, bs, &mut buf)?;
                buf[(ws - bs) as usize..(we - bs) as usize].copy_from_slice(src);
                top.file.write_all_at(&buf, bs).map_err(io_err(&top.path))?;
                top.mark(blk, blk + 1);
            }
        }
        if let Some(cbt) = c.cbt.as_mut() {
            let cur = cbt.current;
            cbt.log.entry(cur).or_default().insert(first, last + 1);
        }
        let rs = first * BLOCK;
        Ok((rs, ((last + 1) * BLOCK).min(capacity) - rs))
    }

    /// Read the live content (what the guest sees) or a snapshot's frozen content.
    pub fn read(
        &self,
        snapshot: Option<u64>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), DiskError> {
        let c = lock(&self.inner);
        let (layers, cap) = match snapshot {
            None => (&c.layers[..], c.capacity),
            Some(id) => {
                let k = c.index(id, &self.base_name)?;
                (&c.layers[..=k], c.snaps[k].capacity)
            }
        };
        if offset.checked_add(buf.len() as u64).is_none_or(|e| e > cap) {
            return Err(DiskError::OutOfRange {
                file: self.base_name.clone(),
                offset,
                capacity: cap,
            });
        }
        read_chain(layers, offset, buf)
    }

    /// Freeze the current content: a new empty delta becomes the live layer. Returns
    /// the snapshot's id (for this disk).
    pub fn snapshot(&self) -> Result<u64, DiskError> {
        let mut c = lock(&self.inner);
        let n = c.next_delta;
        let (path, name) = self.loc.file(&format!("-{n:06}"));
        let layer = Layer::create(path, name, c.capacity)?;
        c.next_delta += 1;
        let id = c.next_snap;
        c.next_snap += 1;
        let cbt = c.cbt.as_mut().map(|cbt| {
            cbt.current += 1;
            let cur = cbt.current;
            cbt.log.insert(cur, RangeSet::new());
            cbt.point()
        });
        let capacity = c.capacity;
        c.snaps.push(SnapEntry {
            id,
            capacity,
            cbt,
            readers: Arc::new(Readers::default()),
            removing: false,
        });
        c.layers.push(Arc::new(layer));
        Ok(id)
    }

    /// Snapshot ids of this disk, oldest first.
    pub fn snapshot_ids(&self) -> Vec<u64> {
        lock(&self.inner).snaps.iter().map(|s| s.id).collect()
    }

    /// Datastore path of the layer frozen by snapshot `id`.
    pub fn frozen_file_name(&self, id: u64) -> Result<String, DiskError> {
        let c = lock(&self.inner);
        let k = c.index(id, &self.base_name)?;
        Ok(c.layers[k].name.clone())
    }

    /// The changeId recorded when snapshot `id` was taken (CBT on at that time).
    pub fn snapshot_change_id(&self, id: u64) -> Result<Option<String>, DiskError> {
        let c = lock(&self.inner);
        let k = c.index(id, &self.base_name)?;
        Ok(c.snaps[k].cbt.as_ref().map(CbtPoint::change_id))
    }

    /// Capacity of snapshot `id`.
    pub fn snapshot_capacity(&self, id: u64) -> Result<u64, DiskError> {
        let c = lock(&self.inner);
        let k = c.index(id, &self.base_name)?;
        Ok(c.snaps[k].capacity)
    }

    /// Which snapshot (if any) freezes the datastore file `name`, or whether it is
    /// the live layer; `None` when the file is not part of this disk.
    pub fn find_file(&self, name: &str) -> Option<FileRole> {
        let c = lock(&self.inner);
        let k = c.layers.iter().position(|l| l.name == name)?;
        if k + 1 == c.layers.len() {
            Some(FileRole::Live)
        } else {
            Some(FileRole::Frozen(c.snaps[k].id))
        }
    }

    /// Open snapshot `id` for reading. Refused while the snapshot is being removed.
    pub fn open_frozen(&self, id: u64, kind: ReaderKind) -> Result<Frozen, DiskError> {
        let c = lock(&self.inner);
        let k = c.index(id, &self.base_name)?;
        let s = &c.snaps[k];
        if s.removing {
            return Err(DiskError::Locked {
                file: c.layers[k].name.clone(),
                why: "its snapshot is being removed".into(),
            });
        }
        s.readers.counter(kind).fetch_add(1, Ordering::SeqCst);
        Ok(Frozen {
            layers: c.layers[..=k].to_vec(),
            capacity: s.capacity,
            name: c.layers[k].name.clone(),
            readers: s.readers.clone(),
            kind,
        })
    }

    /// Number of open readers of kind `kind` on snapshot `id` (0 once it is gone).
    pub fn readers(&self, id: u64, kind: ReaderKind) -> usize {
        let c = lock(&self.inner);
        c.snaps
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.readers.counter(kind).load(Ordering::SeqCst))
            .unwrap_or(0)
    }

    /// First step of a snapshot removal: refuse when the frozen disk is hot-added
    /// somewhere, else mark it so no new reader opens it.
    pub fn begin_remove(&self, id: u64) -> Result<(), DiskError> {
        let mut c = lock(&self.inner);
        let k = c.index(id, &self.base_name)?;
        let name = c.layers[k].name.clone();
        let s = &mut c.snaps[k];
        if s.removing {
            return Err(DiskError::Locked {
                file: name,
                why: "the snapshot is already being removed".into(),
            });
        }
        let hot = s.readers.hotadd.load(Ordering::SeqCst);
        if hot > 0 {
            return Err(DiskError::Locked {
                file: name,
                why: format!("it is attached to {hot} VM(s) (hot-add); detach it first"),
            });
        }
        s.removing = true;
        Ok(())
    }

    /// Undo [`Disk::begin_remove`] (the removal failed).
    pub fn abort_remove(&self, id: u64) {
        let mut c = lock(&self.inner);
        if let Some(s) = c.snaps.iter_mut().find(|s| s.id == id) {
            s.removing = false;
        }
    }

    /// Consolidate: merge the delta above snapshot `id`'s frozen layer into it and
    /// drop the snapshot. Call after [`Disk::begin_remove`] once no reader is left.
    pub fn finish_remove(&self, id: u64) -> Result<(), DiskError> {
        let mut c = lock(&self.inner);
        let k = c.index(id, &self.base_name)?;
        let readers = c.snaps[k].readers.nbd.load(Ordering::SeqCst)
            + c.snaps[k].readers.hotadd.load(Ordering::SeqCst);
        if readers > 0 {
            c.snaps[k].removing = false;
            return Err(DiskError::Locked {
                file: c.layers[k].name.clone(),
                why: format!("{readers} reader(s) still have the snapshot open"),
            });
        }
        let lower = c.layers[k].clone();
        let upper = c.layers[k + 1].clone();
        let ranges: Vec<(u64, u64)> = upper
            .alloc
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .collect();
        let capacity = c.capacity;
        let mut buf = Vec::new();
        for (s, e) in ranges {
            let mut pos = s * BLOCK;
            let end = (e * BLOCK).min(capacity);
            while pos < end {
                let n = (end - pos).min(COPY_CHUNK);
                buf.resize(n as usize, 0);
                upper
                    .file
                    .read_exact_at(&mut buf, pos)
                    .map_err(io_err(&upper.path))?;
                lower
                    .file
                    .write_all_at(&buf, pos)
                    .map_err(io_err(&lower.path))?;
                pos += n;
            }
            lower.mark(s, e);
        }
        c.layers.remove(k + 1);
        c.snaps.remove(k);
        match std::fs::remove_file(&upper.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&upper.path)(e)),
        }
    }

    /// Grow the disk to `capacity` bytes (vSphere: only without snapshots, never
    /// shrinking). Resets CBT.
    pub fn resize(&self, capacity: u64) -> Result<(), DiskError> {
        let mut c = lock(&self.inner);
        let invalid = |why: &str| DiskError::Invalid {
            file: self.base_name.clone(),
            why: why.into(),
        };
        if !c.snaps.is_empty() {
            return Err(invalid(
                "cannot resize a disk that has snapshots (remove them first)",
            ));
        }
        if capacity < c.capacity {
            return Err(invalid("virtual disks can grow but not shrink"));
        }
        let top = c.layers.last().cloned().expect("a disk has a base layer");
        top.file.set_len(capacity).map_err(io_err(&top.path))?;
        c.capacity = capacity;
        if c.cbt.is_some() {
            c.cbt = Some(Cbt::new());
        }
        Ok(())
    }

    /// Allocated byte ranges of snapshot `id`'s frozen content (or the live disk).
    pub fn allocated(&self, snapshot: Option<u64>) -> Result<Vec<(u64, u64)>, DiskError> {
        let c = lock(&self.inner);
        let (layers, cap) = match snapshot {
            None => (&c.layers[..], c.capacity),
            Some(id) => {
                let k = c.index(id, &self.base_name)?;
                (&c.layers[..=k], c.snaps[k].capacity)
            }
        };
        Ok(to_bytes(
            &union_alloc(layers, 0, cap.div_ceil(BLOCK)),
            0,
            cap,
        ))
    }

    /// QueryChangedDiskAreas for snapshot `id`: the areas changed between
    /// `change_id` (or, for `"*"`, every allocated area) and the snapshot, from
    /// `start`, at most `max_areas` areas per answer.
    pub fn changed_areas(
        &self,
        id: u64,
        start: u64,
        change_id: &str,
        max_areas: usize,
    ) -> Result<ChangeInfo, DiskError> {
        let c = lock(&self.inner);
        let k = c.index(id, &self.base_name)?;
        let snap = &c.snaps[k];
        let file = c.layers[k].name.clone();
        if start >= snap.capacity {
            return Err(DiskError::OutOfRange {
                file,
                offset: start,
                capacity: snap.capacity,
            });
        }
        let (Some(point), Some(cbt)) = (snap.cbt.as_ref(), c.cbt.as_ref()) else {
            return Err(DiskError::CbtDisabled { file });
        };
        let blocks = if change_id == "*" {
            union_alloc(&c.layers[..=k], 0, snap.capacity.div_ceil(BLOCK))
        } else {
            let unknown = || DiskError::UnknownChangeId {
                file: file.clone(),
                change_id: change_id.to_string(),
            };
            let (epoch, seq) = parse_change_id(change_id).ok_or_else(unknown)?;
            if epoch != cbt.epoch || point.epoch != cbt.epoch || seq < cbt.first || seq > point.seq
            {
                return Err(unknown());
            }
            let mut set = RangeSet::new();
            for (_, changed) in cbt.log.range(seq..point.seq) {
                set.union_with(changed);
            }
            set
        };
        let mut areas = to_bytes(&blocks, start, snap.capacity);
        let length = if areas.len() > max_areas.max(1) {
            areas.truncate(max_areas.max(1));
            let (s, l) = areas[areas.len() - 1];
            s + l - start
        } else {
            snap.capacity - start
        };
        Ok(ChangeInfo {
            start,
            length,
            areas,
        })
    }
}

/// Delete `<stem>-NNNNNN.vmdk` deltas left in `folder` by an earlier run.
fn remove_stale_deltas(folder: &Path, stem: &str) -> Result<(), DiskError> {
    let rd = std::fs::read_dir(folder).map_err(io_err(folder))?;
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let is_delta = name
            .strip_prefix(stem)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.strip_suffix(".vmdk"))
            .is_some_and(|n| n.len() == 6 && n.bytes().all(|b| b.is_ascii_digit()));
        if is_delta {
            let p = e.path();
            std::fs::remove_file(&p).map_err(io_err(&p))?;
        }
    }
    Ok(())
}

/// Union of the allocation of `layers` within block range `[lo, hi)`.
fn union_alloc(layers: &[Arc<Layer>], lo: u64, hi: u64) -> RangeSet {
    let mut set = RangeSet::new();
    for l in layers {
        for (s, e) in l.alloc_within(lo, hi) {
            set.insert(s, e);
        }
    }
    set
}

/// Block ranges to `(offset, length)` byte areas clipped to `[from, capacity)`.
fn to_bytes(blocks: &RangeSet, from: u64, capacity: u64) -> Vec<(u64, u64)> {
    blocks
        .within(from / BLOCK, capacity.div_ceil(BLOCK))
        .into_iter()
        .filter_map(|(s, e)| {
            let bs = (s * BLOCK).max(from);
            let be = (e * BLOCK).min(capacity);
            (bs < be).then_some((bs, be - bs))
        })
        .collect()
}

/// The topmost layer holding `block`.
fn source_of(layers: &[Arc<Layer>], block: u64) -> Option<usize> {
    (0..layers.len()).rev().find(|&i| layers[i].has(block))
}

/// Read `buf.len()` bytes at `offset` through the chain (holes read as zeros).
fn read_chain(layers: &[Arc<Layer>], offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
    let end = offset + buf.len() as u64;
    let mut pos = offset;
    while pos < end {
        let blk = pos / BLOCK;
        let src = source_of(layers, blk);
        let mut run_end = ((blk + 1) * BLOCK).min(end);
        while run_end < end {
            let nb = run_end / BLOCK;
            if source_of(layers, nb) != src {
                break;
            }
            run_end = ((nb + 1) * BLOCK).min(end);
        }
        let out = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
        match src {
            Some(i) => layers[i]
                .file
                .read_exact_at(out, pos)
                .map_err(io_err(&layers[i].path))?,
            None => out.fill(0),
        }
        pos = run_end;
    }
    Ok(())
}

/// A snapshot's frozen content, open for reading. While it lives the snapshot cannot
/// be removed (the reader is counted on the snapshot).
pub struct Frozen {
    layers: Vec<Arc<Layer>>,
    capacity: u64,
    name: String,
    readers: Arc<Readers>,
    kind: ReaderKind,
}

impl std::fmt::Debug for Frozen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Frozen({}, {:?})", self.name, self.kind)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.readers
            .counter(self.kind)
            .fetch_sub(1, Ordering::SeqCst);
    }
}

impl Frozen {
    /// Capacity of the frozen disk.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Datastore path of the frozen layer.
    pub fn file_name(&self) -> &str {
        &self.name
    }

    /// The single file holding all of the content, when the frozen chain is the base
    /// alone (a hot-add device can then point straight at it).
    pub fn single_file(&self) -> Option<&Path> {
        (self.layers.len() == 1).then(|| self.layers[0].path.as_path())
    }

    /// Read the frozen content.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.capacity)
        {
            return Err(DiskError::OutOfRange {
                file: self.name.clone(),
                offset,
                capacity: self.capacity,
            });
        }
        read_chain(&self.layers, offset, buf)
    }

    /// Allocated `(offset, length)` ranges intersecting `[offset, offset + len)`,
    /// clipped to it.
    pub fn allocated(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let end = offset.saturating_add(len).min(self.capacity);
        if offset >= end {
            return Vec::new();
        }
        let set = union_alloc(&self.layers, offset / BLOCK, end.div_ceil(BLOCK));
        to_bytes(&set, offset, end)
    }

    /// Write the frozen content to a new sparse file at `path`.
    pub fn materialize(&self, path: &Path) -> Result<(), DiskError> {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err(path))?;
        f.set_len(self.capacity).map_err(io_err(path))?;
        let mut buf = Vec::new();
        for (s, l) in self.allocated(0, self.capacity) {
            let mut pos = s;
            while pos < s + l {
                let n = (s + l - pos).min(COPY_CHUNK);
                buf.resize(n as usize, 0);
                read_chain(&self.layers, pos, &mut buf)?;
                f.write_all_at(&buf, pos).map_err(io_err(path))?;
                pos += n;
            }
        }
        Ok(())
    }
}

impl ferry::nbd_server::ExportBackend for Frozen {
    fn size(&self) -> u64 {
        self.capacity
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read(offset, buf).map_err(io::Error::other)
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u32)>> {
        let end = offset.saturating_add(len).min(self.capacity);
        if offset >= end {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("block status at {offset} outside {}", self.name),
            ));
        }
        let mut runs = Vec::new();
        let mut pos = offset;
        for (s, l) in self.allocated(offset, end - offset) {
            if s > pos {
                runs.push((s - pos, 3));
            }
            runs.push((l, 0));
            pos = s + l;
        }
        if pos < end {
            runs.push((end - pos, 3));
        }
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diskgen::DiskSpec;
    use ferry::nbd_server::ExportBackend;

    fn loc(dir: &Path) -> DiskLocation {
        DiskLocation {
            datastore_dir: dir.to_path_buf(),
            datastore: "ds1".into(),
            folder: "vm1".into(),
            stem: "vm1".into(),
        }
    }

    fn all(d: &Disk, snap: Option<u64>) -> Vec<u8> {
        let cap = match snap {
            Some(id) => d.snapshot_capacity(id).unwrap(),
            None => d.capacity(),
        };
        let mut b = vec![0u8; cap as usize];
        d.read(snap, 0, &mut b).unwrap();
        b
    }

    #[test]
    fn a_new_disk_clears_deltas_of_an_earlier_run() {
        let t = tempfile::tempdir().unwrap();
        let d = Disk::create(loc(t.path()), 1 << 20, None).unwrap();
        d.snapshot().unwrap();
        d.snapshot().unwrap();
        drop(d);
        std::fs::write(t.path().join("vm1/vm1_1.vmdk"), b"other disk").unwrap();
        let d = Disk::create(loc(t.path()), 1 << 20, None).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(t.path().join("vm1"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["vm1.vmdk", "vm1_1.vmdk"]);
        assert_eq!(d.snapshot_ids(), Vec::<u64>::new());
    }

    #[test]
    fn base_matches_the_generator_and_is_sparse() {
        let t = tempfile::tempdir().unwrap();
        let spec = DiskSpec::mixed(8 << 20, 3);
        let d = Disk::create(loc(t.path()), 8 << 20, Some(&spec)).unwrap();
        let expect = std::fs::read(t.path().join("vm1/vm1.vmdk")).unwrap();
        assert_eq!(all(&d, None), expect);
        let alloc = d.allocated(None).unwrap();
        let data: u64 = alloc.iter().map(|a| a.1).sum();
        let zero_regions = (0..spec.regions())
            .filter(|&i| spec.region_kind(i) == crate::diskgen::Region::Zero)
            .count() as u64;
        assert_eq!(data, (8 << 20) - zero_regions * (1 << 20));
        assert_eq!(d.live_file_name(), "[ds1] vm1/vm1.vmdk");
    }

    #[test]
    fn snapshot_freezes_writes_go_to_delta_and_remove_consolidates() {
        let t = tempfile::tempdir().unwrap();
        let d = Disk::create(loc(t.path()), 4 << 20, Some(&DiskSpec::mixed(0, 9))).unwrap();
        let before = all(&d, None);
        let s1 = d.snapshot().unwrap();
        assert_eq!(d.live_file_name(), "[ds1] vm1/vm1-000001.vmdk");
        assert_eq!(d.frozen_file_name(s1).unwrap(), "[ds1] vm1/vm1.vmdk");
        // A write straddling two blocks, unaligned.
        let w = vec![0xAB; 70_000];
        d.write(BLOCK - 100, &w).unwrap();
        let mut live = before.clone();
        live[(BLOCK - 100) as usize..(BLOCK - 100) as usize + w.len()].copy_from_slice(&w);
        assert_eq!(all(&d, None), live, "live view has the write");
        assert_eq!(all(&d, Some(s1)), before, "the snapshot is frozen");
        // The base file itself is untouched while the snapshot exists.
        assert_eq!(
            std::fs::read(t.path().join("vm1/vm1.vmdk")).unwrap(),
            before
        );
        let s2 = d.snapshot().unwrap();
        d.write(3 << 20, b"second").unwrap();
        let mut live2 = live.clone();
        live2[3 << 20..(3 << 20) + 6].copy_from_slice(b"second");
        assert_eq!(all(&d, Some(s2)), live);
        // Remove the older snapshot: its delta merges into the base; s2 now freezes
        // the base file and still reads the same.
        d.begin_remove(s1).unwrap();
        d.finish_remove(s1).unwrap();
        assert_eq!(d.frozen_file_name(s2).unwrap(), "[ds1] vm1/vm1.vmdk");
        assert_eq!(all(&d, Some(s2)), live);
        assert_eq!(all(&d, None), live2);
        assert!(!t.path().join("vm1/vm1-000001.vmdk").exists());
        d.begin_remove(s2).unwrap();
        d.finish_remove(s2).unwrap();
        assert_eq!(d.live_file_name(), "[ds1] vm1/vm1.vmdk");
        assert_eq!(std::fs::read(t.path().join("vm1/vm1.vmdk")).unwrap(), live2);
        assert!(d.snapshot_ids().is_empty());
    }

    #[test]
    fn cbt_reports_exactly_the_changed_blocks() {
        let t = tempfile::tempdir().unwrap();
        let cap = 10 * BLOCK + 1000; // a partial last block
        let d = Disk::create(loc(t.path()), cap, None).unwrap();
        d.write(0, b"x").unwrap();
        let s0 = d.snapshot().unwrap();
        assert!(matches!(
            d.changed_areas(s0, 0, "*", 100),
            Err(DiskError::CbtDisabled { .. })
        ));
        d.begin_remove(s0).unwrap();
        d.finish_remove(s0).unwrap();
        d.enable_cbt();
        let c0 = d.live_change_id().unwrap();
        d.write(5 * BLOCK + 10, &[1; 20]).unwrap();
        d.write(10 * BLOCK, &[2; 1000]).unwrap();
        let s1 = d.snapshot().unwrap();
        let c1 = d.snapshot_change_id(s1).unwrap().unwrap();
        assert_ne!(c0, c1);
        let r = d.changed_areas(s1, 0, &c0, 100).unwrap();
        assert_eq!(r.areas, vec![(5 * BLOCK, BLOCK), (10 * BLOCK, 1000)]);
        assert_eq!(r.length, cap);
        // "*" = all allocated blocks, including the write made before CBT.
        let star = d.changed_areas(s1, 0, "*", 100).unwrap();
        assert_eq!(
            star.areas,
            vec![(0, BLOCK), (5 * BLOCK, BLOCK), (10 * BLOCK, 1000)]
        );
        // Writes after the snapshot belong to the next point.
        d.write(2 * BLOCK, &[3; 5]).unwrap();
        d.write(3 * BLOCK, &[3; 5]).unwrap();
        let s2 = d.snapshot().unwrap();
        let r = d.changed_areas(s2, 0, &c1, 100).unwrap();
        assert_eq!(r.areas, vec![(2 * BLOCK, 2 * BLOCK)]);
        let r = d.changed_areas(s2, 0, &c0, 100).unwrap();
        assert_eq!(
            r.areas,
            vec![
                (2 * BLOCK, 2 * BLOCK),
                (5 * BLOCK, BLOCK),
                (10 * BLOCK, 1000)
            ]
        );
        // Paging: one area per answer, from an unaligned start.
        let p = d.changed_areas(s2, 2 * BLOCK + 7, &c0, 1).unwrap();
        assert_eq!(p.areas, vec![(2 * BLOCK + 7, 2 * BLOCK - 7)]);
        assert_eq!(p.start + p.length, 4 * BLOCK);
        // The snapshot's own changeId: nothing changed; a later one is unknown for s1.
        let c2 = d.snapshot_change_id(s2).unwrap().unwrap();
        assert!(d.changed_areas(s2, 0, &c2, 9).unwrap().areas.is_empty());
        assert!(matches!(
            d.changed_areas(s1, 0, &c2, 9),
            Err(DiskError::UnknownChangeId { .. })
        ));
        for bad in ["junk", "52 00/1", "", "/"] {
            assert!(matches!(
                d.changed_areas(s2, 0, bad, 9),
                Err(DiskError::UnknownChangeId { .. })
            ));
        }
        assert!(matches!(
            d.changed_areas(s2, cap, "*", 9),
            Err(DiskError::OutOfRange { .. })
        ));
        // Reset: every old id is refused.
        d.reset_cbt();
        assert!(matches!(
            d.changed_areas(s2, 0, &c1, 9),
            Err(DiskError::UnknownChangeId { .. })
        ));
    }

    #[test]
    fn readers_block_removal_and_resize_rules() {
        let t = tempfile::tempdir().unwrap();
        let d = Disk::create(loc(t.path()), 1 << 20, None).unwrap();
        d.write(100, b"abc").unwrap();
        let s = d.snapshot().unwrap();
        let h = d.open_frozen(s, ReaderKind::HotAdd).unwrap();
        assert!(matches!(d.begin_remove(s), Err(DiskError::Locked { .. })));
        drop(h);
        let n = d.open_frozen(s, ReaderKind::Nbd).unwrap();
        d.begin_remove(s).unwrap();
        assert!(d.open_frozen(s, ReaderKind::Nbd).is_err(), "no new readers");
        assert_eq!(d.readers(s, ReaderKind::Nbd), 1);
        assert!(matches!(d.finish_remove(s), Err(DiskError::Locked { .. })));
        drop(n);
        d.begin_remove(s).unwrap();
        assert!(matches!(d.resize(2 << 20), Err(DiskError::Invalid { .. })));
        d.finish_remove(s).unwrap();
        assert!(matches!(d.resize(1000), Err(DiskError::Invalid { .. })));
        d.enable_cbt();
        let c = d.live_change_id().unwrap();
        d.resize(2 << 20).unwrap();
        assert_eq!(d.capacity(), 2 << 20);
        assert_ne!(d.live_change_id().unwrap(), c, "resize resets CBT");
        let mut b = vec![0; 3];
        d.read(None, 100, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        assert!(d.write((2 << 20) - 1, b"xy").is_err());
    }

    #[test]
    fn frozen_backend_reads_and_block_status() {
        let t = tempfile::tempdir().unwrap();
        let d = Disk::create(loc(t.path()), 3 * BLOCK, None).unwrap();
        d.write(BLOCK + 5, b"hello").unwrap();
        let s = d.snapshot().unwrap();
        d.write(BLOCK + 5, b"HELLO").unwrap();
        let f = d.open_frozen(s, ReaderKind::Nbd).unwrap();
        assert_eq!(f.size(), 3 * BLOCK);
        let mut b = [0u8; 5];
        f.read_at(BLOCK + 5, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert_eq!(
            f.block_status(10, 3 * BLOCK - 10).unwrap(),
            vec![(BLOCK - 10, 3), (BLOCK, 0), (BLOCK, 3)]
        );
        assert!(f.read_at(3 * BLOCK - 1, &mut b).is_err());
        let out = t.path().join("flat");
        f.materialize(&out).unwrap();
        let m = std::fs::read(&out).unwrap();
        assert_eq!(m.len() as u64, 3 * BLOCK);
        assert_eq!(&m[(BLOCK + 5) as usize..(BLOCK + 10) as usize], b"hello");
    }
}
