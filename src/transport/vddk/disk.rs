//! [`VddkDisk`]: one virtual disk opened through a VDDK [`Connection`]:
//! `Open` (and the transport check), `GetInfo`, `QueryAllocatedBlocks`, reads,
//! writes, `Flush`, `Close`.
//!
//! Owns: the disk handle and every call on it. Reads and writes go through a
//! 4096-aligned bounce window owned here: a request is cut into sector-aligned
//! pieces, issued with `ReadAsync`/`WriteAsync` (several in flight, then `Wait`)
//! when the library has them, otherwise with `Read`/`Write`; a handle never
//! mixes the two. Allocation queries follow VDDK's chunk rules (the pure
//! [`plan_allocated_queries`]).
//!
//! Must not: accept a transport other than the connection's (a mismatch closes
//! the disk), trust a count from the library without a bound, or let VDDK write
//! into memory that may be freed (a request that never completed leaks its
//! window instead and the handle is retired).

use super::error::VddkError;
use super::ffi::{self, Block, SectorType, SECTOR_SIZE};
use super::loader::static_str;
use super::session::Connection;
use crate::transport::select::Mode;
use crate::transport::Extent;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Bytes of one bounce window (the most one locked I/O round covers).
pub const WINDOW_BYTES: usize = 4 << 20;
/// Bytes of one asynchronous request.
pub const REQUEST_BYTES: usize = 256 << 10;
/// Asynchronous requests in flight at most (one window).
pub const MAX_IN_FLIGHT: usize = WINDOW_BYTES / REQUEST_BYTES;
/// Bytes one `QueryAllocatedBlocks` chunk covers (64 KiB).
pub const CHUNK_BYTES: u64 = ffi::MIN_CHUNK_SIZE * SECTOR_SIZE;

/// Largest capacity accepted from GetInfo (1 PiB; VMDKs end at 62 TB): a larger
/// value is a library fault, refused before it sizes any loop or plan.
pub const MAX_CAPACITY_BYTES: u64 = 1 << 50;

/// A completion slot's value while the request is outstanding.
const PENDING: u64 = u64::MAX;

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Page([u8; 4096]);

/// One bounce window and the completion slots of its requests. Boxed so the
/// addresses handed to VDDK stay put; leaked (never freed) if a request may
/// still complete after the handle gave up on it.
struct Inflight {
    pages: Vec<Page>,
    slots: [AtomicU64; MAX_IN_FLIGHT],
}

impl Inflight {
    fn new() -> Box<Inflight> {
        Box::new(Inflight {
            pages: vec![Page([0; 4096]); WINDOW_BYTES / 4096],
            slots: std::array::from_fn(|_| AtomicU64::new(PENDING)),
        })
    }
    fn bytes(&mut self) -> &mut [u8] {
        let len = self.pages.len() * std::mem::size_of::<Page>();
        // SAFETY: `Page` is a padding-free, 4096-byte `repr(C)` wrapper of a byte
        // array, so the Vec's pages are `len` contiguous initialised bytes.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_mut_ptr().cast::<u8>(), len) }
    }
}

struct IoState {
    inflight: Option<Box<Inflight>>,
    /// Why the handle was retired (no further I/O).
    broken: Option<String>,
}

/// The raw handle, closed on drop (after `Wait` on async handles).
struct HandleGuard {
    conn: Arc<Connection>,
    raw: ffi::Handle,
    async_io: bool,
}

impl Drop for HandleGuard {
    fn drop(&mut self) {
        let vddk = self.conn.vddk();
        if vddk.ensure_live().is_err() {
            return;
        }
        if self.async_io {
            if let Some(wait) = vddk.api().wait {
                // SAFETY: a valid open handle; waits for outstanding async requests.
                let _ = unsafe { wait(self.raw) };
            }
        }
        let code = {
            let _g = vddk.lock();
            // SAFETY: `raw` came from Open and is closed exactly once.
            unsafe { (vddk.api().close)(self.raw) }
        };
        if let Err(e) = vddk.check("VixDiskLib_Close", code) {
            tracing::warn!(error = %e, "VDDK Close failed");
        }
    }
}

/// A virtual disk opened through VDDK.
pub struct VddkDisk {
    h: HandleGuard,
    path: String,
    mode: Mode,
    read_only: bool,
    capacity: SectorType,
    size: u64,
    logical_sector_size: u32,
    physical_sector_size: u32,
    io: Mutex<IoState>,
    /// Cleared after QueryAllocatedBlocks failed once (then all is allocated).
    query_allocated: AtomicBool,
}

// SAFETY: the raw handle is used only under `io` (I/O, queries) or, for Close,
// with exclusive access in drop; VDDK handles are not bound to a thread.
unsafe impl Send for VddkDisk {}
// SAFETY: as above; shared access goes through the `io` mutex.
unsafe impl Sync for VddkDisk {}

/// A sector range for one `QueryAllocatedBlocks` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    /// First sector (a multiple of 128).
    pub start: SectorType,
    /// Sectors (a multiple of 128, at most 128 × 524288).
    pub count: SectorType,
}

/// How to answer "what is allocated in [offset, offset+len)" with VDDK's rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllocPlan {
    /// The request clipped to the disk, in bytes (`None` if empty).
    pub clip: Option<Extent>,
    /// The calls to make, chunk-aligned, each within the disk's whole chunks.
    pub queries: Vec<SectorRange>,
    /// The part past the last whole chunk, reported allocated without asking.
    pub tail: Option<Extent>,
}

/// Plan `QueryAllocatedBlocks` calls for the byte range `[offset, offset+len)` of
/// a disk of `capacity` sectors: clip to the disk; align the start down and the
/// end up to 128-sector chunks, but never past the disk's last whole chunk;
/// at most 524288 chunks per call; the unaligned tail is treated as allocated.
pub fn plan_allocated_queries(offset: u64, len: u64, capacity: SectorType) -> AllocPlan {
    let size = capacity.saturating_mul(SECTOR_SIZE);
    let end = offset.saturating_add(len).min(size);
    if offset >= end {
        return AllocPlan::default();
    }
    let chunk = ffi::MIN_CHUNK_SIZE;
    let whole_end = capacity / chunk * chunk; // sectors
    let start = offset / SECTOR_SIZE / chunk * chunk;
    let want_end = end
        .div_ceil(SECTOR_SIZE)
        .div_ceil(chunk)
        .saturating_mul(chunk);
    let q_end = want_end.min(whole_end);
    let max = ffi::MAX_CHUNK_NUMBER * chunk;
    let mut queries = Vec::new();
    let mut s = start;
    while s < q_end {
        let count = (q_end - s).min(max);
        queries.push(SectorRange { start: s, count });
        s += count;
    }
    let tail_start = whole_end * SECTOR_SIZE;
    let tail = (end > tail_start).then(|| {
        let from = offset.max(tail_start);
        Extent {
            offset: from,
            len: end - from,
        }
    });
    AllocPlan {
        clip: Some(Extent {
            offset,
            len: end - offset,
        }),
        queries,
        tail,
    }
}

/// Turn the blocks of one query into byte extents inside both the query and
/// `clip`; out-of-range, empty or overflowing blocks are dropped.
pub fn blocks_to_extents(blocks: &[Block], query: SectorRange, clip: Extent) -> Vec<Extent> {
    let q_start = query.start.saturating_mul(SECTOR_SIZE);
    let q_end = query
        .start
        .saturating_add(query.count)
        .saturating_mul(SECTOR_SIZE);
    let lo = q_start.max(clip.offset);
    let hi = q_end.min(clip.end());
    blocks
        .iter()
        .filter_map(|b| {
            let s = b.offset.checked_mul(SECTOR_SIZE)?;
            let e = b.offset.checked_add(b.length)?.checked_mul(SECTOR_SIZE)?;
            let (s, e) = (s.max(lo), e.min(hi));
            (s < e).then_some(Extent {
                offset: s,
                len: e - s,
            })
        })
        .collect()
}

/// Sort and merge overlapping or touching extents.
pub fn merge_extents(mut v: Vec<Extent>) -> Vec<Extent> {
    v.retain(|e| e.len > 0);
    v.sort_by_key(|e| e.offset);
    let mut out: Vec<Extent> = Vec::with_capacity(v.len());
    for e in v {
        match out.last_mut() {
            Some(last) if e.offset <= last.end() => {
                let end = last.end().max(e.end());
                last.len = end - last.offset;
            }
            _ => out.push(e),
        }
    }
    out
}

/// The sector-aligned window that covers the first bytes of `[pos, pos+remaining)`:
/// (first sector, byte skip inside it, bytes of the request served, window bytes).
fn window(pos: u64, remaining: usize) -> (SectorType, usize, usize, usize) {
    let first = pos / SECTOR_SIZE;
    let skip = (pos % SECTOR_SIZE) as usize;
    let take = remaining.min(WINDOW_BYTES - skip);
    let bytes = (skip + take).div_ceil(SECTOR_SIZE as usize) * SECTOR_SIZE as usize;
    (first, skip, take, bytes)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

/// Completion callback of ReadAsync/WriteAsync: record the result in the slot.
unsafe extern "C" fn on_complete(cb_data: *mut c_void, result: ffi::VixError) {
    if cb_data.is_null() {
        return;
    }
    // SAFETY: `cb_data` is the address of a slot inside a boxed `Inflight` that is
    // kept alive (or leaked) until every request on it has completed.
    let slot = unsafe { &*(cb_data as *const AtomicU64) };
    // A result equal to PENDING would look outstanding; map it to a failure.
    let r = if result == PENDING {
        ffi::VIX_E_FAIL
    } else {
        result
    };
    slot.store(r, Ordering::Release);
}

impl VddkDisk {
    /// Open `path` (`"[datastore] vm/vm.vmdk"`) on `conn`: read-only (and
    /// unbuffered) for backups, read-write for restores. The disk is accepted only
    /// if `GetTransportMode` reports the connection's mode; otherwise it is closed
    /// and [`VddkError::ModeMismatch`] returned.
    pub fn open(
        conn: &Arc<Connection>,
        path: &str,
        read_only: bool,
    ) -> Result<VddkDisk, VddkError> {
        let vddk = conn.vddk();
        vddk.ensure_live()?;
        if !read_only && conn.read_only() {
            return Err(VddkError::InvalidArgument(format!(
                "{path}: cannot open for writing on a read-only VDDK connection"
            )));
        }
        let c_path = super::loader::cstring("disk path", path)?;
        let mut flags = ffi::FLAG_OPEN_UNBUFFERED;
        if read_only {
            flags |= ffi::FLAG_OPEN_READ_ONLY;
        }
        let mut raw: ffi::Handle = std::ptr::null_mut();
        let code = {
            let _g = vddk.lock();
            // SAFETY: a live connection, a NUL-terminated path, a valid out-param.
            unsafe { (vddk.api().open)(conn.raw(), c_path.as_ptr(), flags, &mut raw) }
        };
        vddk.check("VixDiskLib_Open", code)?;
        if raw.is_null() {
            return Err(VddkError::Protocol {
                call: "VixDiskLib_Open",
                detail: "succeeded but returned no handle".into(),
            });
        }
        let async_io = vddk.api().has_async();
        let h = HandleGuard {
            conn: conn.clone(),
            raw,
            async_io,
        };
        // From here on, returning drops `h`, which closes the disk.
        let asked = conn.mode();
        // SAFETY: a valid handle; the result is a static string or NULL.
        let got = unsafe { static_str((vddk.api().get_transport_mode)(raw)) };
        match got {
            Some(ref g) if g.trim().eq_ignore_ascii_case(asked.as_str()) => {}
            other => {
                return Err(VddkError::ModeMismatch {
                    disk: path.to_string(),
                    asked: asked.as_str().to_string(),
                    got: other.unwrap_or_else(|| "(none)".into()),
                })
            }
        }
        let mut info: *mut ffi::Info = std::ptr::null_mut();
        // SAFETY: a valid handle and out-param.
        let code = unsafe { (vddk.api().get_info)(raw, &mut info) };
        vddk.check("VixDiskLib_GetInfo", code)?;
        if info.is_null() {
            return Err(VddkError::Protocol {
                call: "VixDiskLib_GetInfo",
                detail: "succeeded but returned no info".into(),
            });
        }
        // SAFETY: a non-NULL VixDiskLibInfo from GetInfo; the 7.0+ layout (64 bytes)
        // is what every library ferry loads (7.0.3, 8.0.x) returns. Copied out, then
        // freed exactly once with FreeInfo.
        let copy = unsafe { *info };
        // SAFETY: `info` came from GetInfo and is freed exactly once.
        unsafe { (vddk.api().free_info)(info) };
        let size = copy
            .capacity
            .checked_mul(SECTOR_SIZE)
            .filter(|&b| b <= MAX_CAPACITY_BYTES)
            .ok_or(VddkError::Protocol {
                call: "VixDiskLib_GetInfo",
                detail: format!("implausible capacity of {} sectors", copy.capacity),
            })?;
        tracing::info!(disk = path, mode = %asked, size, read_only, async_io, "VDDK disk open");
        Ok(VddkDisk {
            h,
            path: path.to_string(),
            mode: asked,
            read_only,
            capacity: copy.capacity,
            size,
            logical_sector_size: copy.logical_sector_size,
            physical_sector_size: copy.physical_sector_size,
            io: Mutex::new(IoState {
                inflight: None,
                broken: None,
            }),
            query_allocated: AtomicBool::new(vddk.api().has_query_allocated()),
        })
    }

    /// The disk path given to Open.
    pub fn path(&self) -> &str {
        &self.path
    }
    /// The transport VDDK confirmed (always the connection's mode).
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// Whether opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    /// Capacity in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> SectorType {
        self.capacity
    }
    /// (logical, physical) sector sizes VDDK reports (0 when unknown).
    pub fn sector_sizes(&self) -> (u32, u32) {
        (self.logical_sector_size, self.physical_sector_size)
    }
    /// Whether I/O uses ReadAsync/WriteAsync (else Read/Write).
    pub fn async_io(&self) -> bool {
        self.h.async_io
    }

    fn state(&self) -> MutexGuard<'_, IoState> {
        self.io.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), VddkError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(VddkError::InvalidArgument(format!(
                "{}: {len} bytes at {offset} lie beyond the disk size {}",
                self.path, self.size
            ))),
        }
    }

    /// Fill `buf` from byte `offset` (any alignment; the covering sectors are read).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), VddkError> {
        self.check_range(offset, buf.len())?;
        let mut st = self.state();
        let mut pos = offset;
        let mut done = 0usize;
        while done < buf.len() {
            let (first, skip, take, bytes) = window(pos, buf.len() - done);
            let win = self.round(&mut st, Op::Read, first, bytes, |_| {})?;
            buf[done..done + take].copy_from_slice(&win[skip..skip + take]);
            done += take;
            pos += take as u64;
        }
        Ok(())
    }

    /// Write `data` at byte `offset` (restores). Unaligned edges are
    /// read-modify-written through the same handle and mode.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), VddkError> {
        if self.read_only {
            return Err(VddkError::InvalidArgument(format!(
                "{}: opened read-only",
                self.path
            )));
        }
        self.check_range(offset, data.len())?;
        let mut st = self.state();
        let mut pos = offset;
        let mut done = 0usize;
        while done < data.len() {
            let (first, skip, take, bytes) = window(pos, data.len() - done);
            if skip != 0 || take != bytes {
                // Partial first or last sector: fetch the covering sectors first.
                self.round(&mut st, Op::Read, first, bytes, |_| {})?;
            }
            let src = &data[done..done + take];
            self.round(&mut st, Op::Write, first, bytes, |win| {
                win[skip..skip + take].copy_from_slice(src)
            })?;
            done += take;
            pos += take as u64;
        }
        Ok(())
    }

    /// Wait for outstanding writes and flush them to the disk.
    pub fn flush(&self) -> Result<(), VddkError> {
        let st = self.state();
        if let Some(why) = &st.broken {
            return Err(self.retired(why));
        }
        let api = self.h.conn.vddk().api();
        let vddk = self.h.conn.vddk();
        if self.h.async_io {
            if let Some(wait) = api.wait {
                // SAFETY: a valid handle, used under the I/O lock.
                vddk.check("VixDiskLib_Wait", unsafe { wait(self.h.raw) })?;
            }
        }
        if let Some(flush) = api.flush {
            // SAFETY: a valid handle, used under the I/O lock.
            vddk.check("VixDiskLib_Flush", unsafe { flush(self.h.raw) })?;
        }
        drop(st);
        Ok(())
    }

    fn retired(&self, why: &str) -> VddkError {
        VddkError::Protocol {
            call: "disk handle",
            detail: format!("{} is no longer usable: {why}", self.path),
        }
    }

    /// One I/O round on the bounce window: `prepare` fills it before a write; the
    /// window is returned after a read. `bytes` is a multiple of 512 and at most
    /// [`WINDOW_BYTES`].
    fn round<'s>(
        &self,
        st: &'s mut IoState,
        op: Op,
        first: SectorType,
        bytes: usize,
        prepare: impl FnOnce(&mut [u8]),
    ) -> Result<&'s mut [u8], VddkError> {
        if let Some(why) = &st.broken {
            return Err(self.retired(why));
        }
        let infl = st.inflight.get_or_insert_with(Inflight::new);
        prepare(&mut infl.bytes()[..bytes]);
        let sectors = (bytes as u64) / SECTOR_SIZE;
        let result = if self.h.async_io {
            self.round_async(infl, op, first, sectors)
        } else {
            self.round_sync(infl, op, first, sectors)
        };
        match result {
            Ok(()) => {}
            Err((e, leak)) => {
                if leak {
                    // Requests may still complete into this window: never free it.
                    if let Some(b) = st.inflight.take() {
                        let _ = Box::leak(b);
                    }
                    st.broken = Some(e.to_string());
                }
                return Err(e);
            }
        }
        match st.inflight.as_mut() {
            Some(infl) => Ok(&mut infl.bytes()[..bytes]),
            None => Err(self.retired("bounce window lost")),
        }
    }

    fn round_sync(
        &self,
        infl: &mut Inflight,
        op: Op,
        first: SectorType,
        sectors: SectorType,
    ) -> Result<(), (VddkError, bool)> {
        let vddk = self.h.conn.vddk();
        let buf = infl.bytes().as_mut_ptr();
        let (call, code) = match op {
            // SAFETY: `buf` holds at least `sectors * 512` bytes (bytes ≤ window) and
            // stays valid for the synchronous call; the range lies inside the disk.
            Op::Read => ("VixDiskLib_Read", unsafe {
                (vddk.api().read)(self.h.raw, first, sectors, buf)
            }),
            // SAFETY: as above, read by the library during the call.
            Op::Write => ("VixDiskLib_Write", unsafe {
                (vddk.api().write)(self.h.raw, first, sectors, buf)
            }),
        };
        vddk.check(call, code).map_err(|e| (e, false))
    }

    fn round_async(
        &self,
        infl: &mut Inflight,
        op: Op,
        first: SectorType,
        sectors: SectorType,
    ) -> Result<(), (VddkError, bool)> {
        let vddk = self.h.conn.vddk();
        let api = vddk.api();
        let (Some(read_async), Some(write_async), Some(wait)) =
            (api.read_async, api.write_async, api.wait)
        else {
            return Err((
                VddkError::Protocol {
                    call: "VixDiskLib_ReadAsync",
                    detail: "async calls vanished".into(),
                },
                false,
            ));
        };
        let per = (REQUEST_BYTES as u64) / SECTOR_SIZE;
        let n = sectors.div_ceil(per) as usize;
        let base = infl.bytes().as_mut_ptr();
        for s in &infl.slots {
            s.store(PENDING, Ordering::Relaxed);
        }
        let call = match op {
            Op::Read => "VixDiskLib_ReadAsync",
            Op::Write => "VixDiskLib_WriteAsync",
        };
        let mut submitted = 0usize;
        let mut submit_err = None;
        for i in 0..n.min(MAX_IN_FLIGHT) {
            let start = (i as u64) * per;
            let count = per.min(sectors - start);
            let slot = &infl.slots[i] as *const AtomicU64 as *mut c_void;
            // SAFETY: the pointer stays inside the boxed window (start*512 + count*512
            // ≤ bytes ≤ WINDOW_BYTES); the window and `slot` outlive the request
            // (we Wait below, and leak both if a request may still be outstanding).
            let ptr = unsafe { base.add((start * SECTOR_SIZE) as usize) };
            let code = match op {
                // SAFETY: see above; the callback only stores into `slot`.
                Op::Read => unsafe {
                    read_async(
                        self.h.raw,
                        first + start,
                        count,
                        ptr,
                        Some(on_complete),
                        slot,
                    )
                },
                // SAFETY: see above.
                Op::Write => unsafe {
                    write_async(
                        self.h.raw,
                        first + start,
                        count,
                        ptr,
                        Some(on_complete),
                        slot,
                    )
                },
            };
            // Only the low 16 bits are the code; VDDK may set higher bits.
            match ffi::vix_error_code(code) {
                c if c == ffi::vix_error_code(ffi::VIX_ASYNC) => submitted += 1,
                c if c == ffi::VIX_OK => {
                    // Completed synchronously; the callback may or may not have run.
                    let _ = infl.slots[i].compare_exchange(
                        PENDING,
                        ffi::VIX_OK,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    submitted += 1;
                }
                _ => {
                    submit_err = Some(code);
                    break;
                }
            }
        }
        // Always wait, also after a refused submission: a request VDDK took while
        // reporting an error must not outlive this buffer.
        // SAFETY: a valid handle; blocks until every request on it completed.
        let wait_code = unsafe { wait(self.h.raw) };
        if let Some(i) = infl.slots[..submitted]
            .iter()
            .position(|s| s.load(Ordering::Acquire) == PENDING)
        {
            let detail = format!(
                "request {i} of {submitted} did not complete after VixDiskLib_Wait (returned {})",
                ffi::vix_error_code(wait_code)
            );
            return Err((VddkError::Protocol { call, detail }, true));
        }
        vddk.check("VixDiskLib_Wait", wait_code)
            .map_err(|e| (e, false))?;
        if let Some(code) = submit_err {
            return Err((vddk.vix(call, code), false));
        }
        for s in &infl.slots[..submitted] {
            let r = s.load(Ordering::Acquire);
            if r != ffi::VIX_OK {
                return Err((vddk.vix(call, r), false));
            }
        }
        Ok(())
    }

    /// The allocated byte ranges within `[offset, offset+len)` (clipped to the
    /// disk), sorted and merged. Without `QueryAllocatedBlocks`, or after it
    /// failed once on this disk, everything is reported allocated (never less).
    pub fn allocated(&self, offset: u64, len: u64) -> Result<Vec<Extent>, VddkError> {
        let plan = plan_allocated_queries(offset, len, self.capacity);
        let Some(clip) = plan.clip else {
            return Ok(vec![]);
        };
        if !self.query_allocated.load(Ordering::Relaxed) {
            return Ok(vec![clip]);
        }
        let mut out = Vec::new();
        for q in &plan.queries {
            match self.query(*q, clip) {
                Ok(mut v) => out.append(&mut v),
                Err(e) => {
                    tracing::warn!(disk = %self.path, error = %e, "QueryAllocatedBlocks failed; reading the whole disk");
                    self.query_allocated.store(false, Ordering::Relaxed);
                    return Ok(vec![clip]);
                }
            }
        }
        out.extend(plan.tail);
        Ok(merge_extents(out))
    }

    fn query(&self, q: SectorRange, clip: Extent) -> Result<Vec<Extent>, VddkError> {
        let vddk = self.h.conn.vddk();
        let (Some(qab), Some(free)) = (
            vddk.api().query_allocated_blocks,
            vddk.api().free_block_list,
        ) else {
            return Ok(vec![clip]);
        };
        let st = self.state();
        if let Some(why) = &st.broken {
            return Err(self.retired(why));
        }
        let mut bl: *mut ffi::BlockList = std::ptr::null_mut();
        // SAFETY: a valid handle (under the I/O lock), chunk-aligned arguments
        // within the disk, a valid out-param.
        let code = unsafe { qab(self.h.raw, q.start, q.count, ffi::MIN_CHUNK_SIZE, &mut bl) };
        if code != ffi::VIX_OK {
            if !bl.is_null() {
                // SAFETY: a list returned by the library, freed once.
                let _ = unsafe { free(bl) };
            }
            return Err(vddk.vix("VixDiskLib_QueryAllocatedBlocks", code));
        }
        if bl.is_null() {
            return Err(VddkError::Protocol {
                call: "VixDiskLib_QueryAllocatedBlocks",
                detail: "succeeded but returned no list".into(),
            });
        }
        // SAFETY: `bl` is a non-NULL BlockList from the library; the header is read.
        let n = unsafe { (*bl).num_blocks } as u64;
        let max = q.count / ffi::MIN_CHUNK_SIZE;
        let result = if n > max {
            Err(VddkError::Protocol {
                call: "VixDiskLib_QueryAllocatedBlocks",
                detail: format!("returned {n} blocks for a query of {max} chunks"),
            })
        } else {
            // SAFETY: the list holds `n` (bounded above) Block entries starting at
            // byte 8, as the header declares; they are copied before the free.
            let blocks = unsafe {
                let first = bl
                    .cast::<u8>()
                    .add(ffi::BLOCK_LIST_BLOCKS_OFFSET)
                    .cast::<Block>();
                std::slice::from_raw_parts(first, n as usize).to_vec()
            };
            Ok(blocks_to_extents(&blocks, q, clip))
        };
        // SAFETY: freed exactly once.
        let _ = unsafe { free(bl) };
        drop(st);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CH: u64 = ffi::MIN_CHUNK_SIZE; // sectors per chunk
    const MAXQ: u64 = ffi::MAX_CHUNK_NUMBER * CH; // sectors per query

    #[test]
    fn whole_aligned_disk_is_one_query() {
        let cap = 1024 * CH; // 64 MiB
        let p = plan_allocated_queries(0, cap * 512, cap);
        assert_eq!(
            p.queries,
            vec![SectorRange {
                start: 0,
                count: cap
            }]
        );
        assert_eq!(p.tail, None);
        assert_eq!(
            p.clip,
            Some(Extent {
                offset: 0,
                len: cap * 512
            })
        );
    }

    #[test]
    fn large_disks_are_split_at_524288_chunks() {
        let cap = 2 * MAXQ + 5 * CH; // just over 64 GiB
        let p = plan_allocated_queries(0, u64::MAX, cap);
        assert_eq!(
            p.queries,
            vec![
                SectorRange {
                    start: 0,
                    count: MAXQ
                },
                SectorRange {
                    start: MAXQ,
                    count: MAXQ
                },
                SectorRange {
                    start: 2 * MAXQ,
                    count: 5 * CH
                },
            ]
        );
        for q in &p.queries {
            assert_eq!(q.start % CH, 0);
            assert_eq!(q.count % CH, 0);
            assert!(q.count / CH <= ffi::MAX_CHUNK_NUMBER);
        }
        assert_eq!(p.clip.unwrap().end(), cap * 512);
    }

    #[test]
    fn unaligned_requests_are_widened_to_chunks_and_clipped() {
        let cap = 100 * CH;
        // 1000 bytes at 70000 (inside chunk 1).
        let p = plan_allocated_queries(70_000, 1000, cap);
        assert_eq!(
            p.queries,
            vec![SectorRange {
                start: CH,
                count: CH
            }]
        );
        assert_eq!(
            p.clip,
            Some(Extent {
                offset: 70_000,
                len: 1000
            })
        );
        // Beyond the end: clipped; past it: empty.
        let p = plan_allocated_queries(cap * 512 - 10, 100, cap);
        assert_eq!(p.clip.unwrap().len, 10);
        assert_eq!(
            plan_allocated_queries(cap * 512, 1, cap),
            AllocPlan::default()
        );
        assert_eq!(plan_allocated_queries(0, 0, cap), AllocPlan::default());
    }

    #[test]
    fn an_unaligned_tail_is_allocated_without_a_query() {
        let cap = 10 * CH + 7; // 7 sectors past the last whole chunk
        let p = plan_allocated_queries(0, u64::MAX, cap);
        assert_eq!(
            p.queries,
            vec![SectorRange {
                start: 0,
                count: 10 * CH
            }]
        );
        assert_eq!(
            p.tail,
            Some(Extent {
                offset: 10 * CH * 512,
                len: 7 * 512
            })
        );
        // A request entirely in the tail makes no query.
        let p = plan_allocated_queries(10 * CH * 512 + 512, 512, cap);
        assert!(p.queries.is_empty());
        assert_eq!(
            p.tail,
            Some(Extent {
                offset: 10 * CH * 512 + 512,
                len: 512
            })
        );
        // A disk smaller than one chunk.
        let p = plan_allocated_queries(0, u64::MAX, 3);
        assert!(p.queries.is_empty());
        assert_eq!(
            p.tail,
            Some(Extent {
                offset: 0,
                len: 1536
            })
        );
    }

    #[test]
    fn blocks_become_clipped_byte_extents() {
        let q = SectorRange {
            start: 0,
            count: 4 * CH,
        };
        let clip = Extent {
            offset: 1000,
            len: 4 * CH * 512 - 2000,
        };
        let blocks = [
            Block {
                offset: 0,
                length: CH,
            },
            Block {
                offset: 2 * CH,
                length: CH,
            },
            Block {
                offset: 3 * CH,
                length: 0,
            },
            Block {
                offset: u64::MAX,
                length: 5,
            },
            Block {
                offset: 3 * CH,
                length: 10 * CH,
            },
        ];
        let v = blocks_to_extents(&blocks, q, clip);
        assert_eq!(
            v,
            vec![
                Extent {
                    offset: 1000,
                    len: CH * 512 - 1000
                },
                Extent {
                    offset: 2 * CH * 512,
                    len: CH * 512
                },
                Extent {
                    offset: 3 * CH * 512,
                    len: CH * 512 - 1000
                },
            ]
        );
        let m = merge_extents(v);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].offset, 2 * CH * 512);
        assert_eq!(m[1].end(), clip.end());
    }

    #[test]
    fn windows_cover_unaligned_requests() {
        assert_eq!(window(0, 4096), (0, 0, 4096, 4096));
        assert_eq!(window(100, 10), (0, 100, 10, 512));
        assert_eq!(window(1000, 100), (1, 488, 100, 1024));
        let (f, s, t, b) = window(513, 10 << 20);
        assert_eq!((f, s), (1, 1));
        assert_eq!(t, WINDOW_BYTES - 1);
        assert_eq!(b, WINDOW_BYTES);
        let (_, s, t, b) = window(512, 1);
        assert_eq!((s, t, b), (0, 1, 512));
    }

    #[test]
    fn bounce_windows_are_page_aligned() {
        let mut i = Inflight::new();
        let b = i.bytes();
        assert_eq!(b.len(), WINDOW_BYTES);
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert_eq!(MAX_IN_FLIGHT, 16);
    }
}
