//! A mock VMware VDDK: `libvixDiskLib.so` with VDDK's C API (the backup/restore
//! subset of `vixDiskLib.h`), serving the mock vCenter's snapshot disks so ferry's
//! real VDDK loader can be tested without VMware's library.
//!
//! It reaches the mock world only as a real VDDK would: through ConnectParams
//! (server, port, thumbprint, session cookie, `moref=vm-N`), the snapshot moref, the
//! transport mode and the disk path, talking HTTPS to the mock vCenter's
//! `/mockvddk/` endpoints (`ferry_mocks::vcenter::vddk`). The InitEx config file names
//! the proxy VM it "runs in" (`mock.proxyVmMoref`) and a call log (`mock.callLog`).
//! See docs/mocks.md, "The mock VDDK".
//!
//! This file owns the exported symbols only: pointer checks, copying strings out
//! of caller memory during the call, `catch_unwind` around every entry point (a
//! panic becomes `VIX_E_FAIL`, never an unwind into C), the call log, and memory
//! handed to the caller (always `malloc`ed, freed only by the matching `Free*`).
//! It must not share types with ferry's bindings; behaviour lives in [`vddk`], the
//! ABI in [`types`], the wire in [`client`].

#![allow(non_snake_case)]

pub mod client;
pub mod types;
pub mod vddk;

use serde_json::json;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use types::{code, Block, BlockList, CompletionCb, ConnectParams, Geometry, Info, VixError};
use vddk::{fail, log_call, Failure, Params};

/// Run an entry point; a panic is `VIX_E_FAIL`.
fn guard(f: impl FnOnce() -> VixError) -> VixError {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(code::VIX_E_FAIL)
}

fn result(r: Result<(), Failure>) -> VixError {
    match r {
        Ok(()) => code::VIX_OK,
        Err(f) => f.code,
    }
}

/// Copy a C string (NULL → `None`).
///
/// # Safety
/// `p` is NULL or a NUL-terminated string valid for the call.
unsafe fn cstr(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        Some(CStr::from_ptr(p).to_string_lossy().into_owned())
    }
}

/// Copy what the mock needs out of a ConnectParams (NULL → `None`).
///
/// # Safety
/// `p` is NULL or points to a VixDiskLibConnectParams whose string fields are NULL
/// or valid C strings.
unsafe fn params(p: *const ConnectParams) -> Option<Params> {
    let p = p.as_ref()?;
    let cookie = if p.cred_type == types::CRED_SESSIONID {
        cstr(p.creds.session_id.cookie)
    } else {
        None
    };
    Some(Params {
        vmx_spec: cstr(p.vmx_spec),
        server: cstr(p.server_name),
        thumbprint: cstr(p.thumb_print),
        cred_type: p.cred_type,
        cookie,
        port: p.port,
    })
}

fn handle_ptr(id: usize) -> *mut c_void {
    std::ptr::without_provenance_mut(id)
}

fn invalid(what: &str) -> Failure {
    fail(
        code::VIX_E_INVALID_ARG,
        format!("{what} is NULL or invalid"),
    )
}

fn ro_json(p: &Option<Params>) -> serde_json::Value {
    match p {
        None => json!({}),
        Some(p) => {
            json!({"server": p.server, "port": p.port, "vmxSpec": p.vmx_spec, "credType": p.cred_type})
        }
    }
}

fn disk_json(id: usize) -> serde_json::Value {
    match vddk::disk(id) {
        Ok(d) => json!({
            "handle": id,
            "path": d.path,
            "vm": d.vm,
            "snapshot": d.snapshot,
            "mode": d.mode().to_str().unwrap_or(""),
        }),
        Err(_) => json!({"handle": id}),
    }
}

/// `VixError VixDiskLib_InitEx(uint32 major, uint32 minor, log, warn, panic, const
/// char *libDir, const char *configFile)`. The log callbacks are accepted and not
/// called (a `va_list` cannot be built from Rust). The config file may name
/// `mock.proxyVmMoref` and `mock.callLog`.
///
/// # Safety
/// `libDir` and `configFile` are NULL or valid C strings.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_InitEx(
    major: u32,
    minor: u32,
    _log: *const c_void,
    _warn: *const c_void,
    _panic: *const c_void,
    lib_dir: *const c_char,
    config_file: *const c_char,
) -> VixError {
    guard(|| {
        let cfg = cstr(config_file);
        let r = result(vddk::init(major, cfg.clone()));
        log_call(
            "VixDiskLib_InitEx",
            json!({"major": major, "minor": minor, "libDir": cstr(lib_dir), "configFile": cfg}),
            r,
        );
        r
    })
}

/// `void VixDiskLib_Exit(void)`.
#[no_mangle]
pub extern "C" fn VixDiskLib_Exit() {
    guard(|| {
        vddk::exit();
        log_call("VixDiskLib_Exit", json!({}), 0);
        vddk::close_call_log();
        0
    });
}

/// `const char *VixDiskLib_ListTransportModes(void)`: a static string.
#[no_mangle]
pub extern "C" fn VixDiskLib_ListTransportModes() -> *const c_char {
    let _ = catch_unwind(|| log_call("VixDiskLib_ListTransportModes", json!({}), 0));
    c"hotadd:nbdssl:nbd".as_ptr()
}

/// `VixError VixDiskLib_PrepareForAccess(const VixDiskLibConnectParams *, const char
/// *identity)`.
///
/// # Safety
/// `connectParams` is NULL or a valid ConnectParams; `identity` NULL or a C string.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_PrepareForAccess(
    connect_params: *const ConnectParams,
    identity: *const c_char,
) -> VixError {
    access(
        "VixDiskLib_PrepareForAccess",
        connect_params,
        identity,
        false,
    )
}

/// `VixError VixDiskLib_EndAccess(const VixDiskLibConnectParams *, const char
/// *identity)`.
///
/// # Safety
/// As [`VixDiskLib_PrepareForAccess`].
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_EndAccess(
    connect_params: *const ConnectParams,
    identity: *const c_char,
) -> VixError {
    access("VixDiskLib_EndAccess", connect_params, identity, true)
}

unsafe fn access(
    name: &str,
    cp: *const ConnectParams,
    identity: *const c_char,
    end: bool,
) -> VixError {
    guard(|| {
        let p = params(cp);
        let id = cstr(identity);
        let r = match (&p, &id) {
            (Some(p), Some(i)) => result(vddk::access(p.clone(), i, end)),
            (None, _) => invalid("connectParams").code,
            (_, None) => invalid("identity").code,
        };
        let mut f = ro_json(&p);
        f["identity"] = json!(id);
        log_call(name, f, r);
        r
    })
}

/// `VixError VixDiskLib_ConnectEx(const VixDiskLibConnectParams *, Bool readOnly,
/// const char *snapshotRef, const char *transportModes, VixDiskLibConnection *)`.
///
/// # Safety
/// `connectParams` is NULL or valid; strings NULL or valid; `connection` NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_ConnectEx(
    connect_params: *const ConnectParams,
    read_only: c_char,
    snapshot_ref: *const c_char,
    transport_modes: *const c_char,
    connection: *mut *mut c_void,
) -> VixError {
    guard(|| {
        let p = params(connect_params);
        let snap = cstr(snapshot_ref);
        let modes = cstr(transport_modes);
        let r = if connection.is_null() {
            invalid("connection").code
        } else {
            match &p {
                None => {
                    fail(
                        code::VIX_E_NOT_SUPPORTED,
                        "connectParams is NULL: the mock VDDK has no local disks",
                    )
                    .code
                }
                Some(p) => {
                    match vddk::connect(p.clone(), read_only != 0, snap.clone(), modes.clone()) {
                        Ok(id) => {
                            *connection = handle_ptr(id);
                            code::VIX_OK
                        }
                        Err(f) => f.code,
                    }
                }
            }
        };
        let mut f = ro_json(&p);
        f["snapshot"] = json!(snap);
        f["modes"] = json!(modes);
        f["readOnly"] = json!(read_only != 0);
        log_call("VixDiskLib_ConnectEx", f, r);
        r
    })
}

/// `VixError VixDiskLib_Disconnect(VixDiskLibConnection)`.
#[no_mangle]
pub extern "C" fn VixDiskLib_Disconnect(connection: *mut c_void) -> VixError {
    guard(|| {
        let r = result(vddk::disconnect(connection.addr()));
        log_call(
            "VixDiskLib_Disconnect",
            json!({"connection": connection.addr()}),
            r,
        );
        r
    })
}

/// `VixError VixDiskLib_Cleanup(const VixDiskLibConnectParams *, uint32
/// *numCleanedUp, uint32 *numRemaining)`: removes the disks this proxy's mock VDDK
/// left hot-added. Out-parameters may be NULL.
///
/// # Safety
/// `connectParams` NULL or valid; out-parameters NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Cleanup(
    connect_params: *const ConnectParams,
    num_cleaned_up: *mut u32,
    num_remaining: *mut u32,
) -> VixError {
    guard(|| {
        let p = params(connect_params);
        let (r, c, rem) = match &p {
            None => (invalid("connectParams").code, 0, 0),
            Some(p) => match vddk::cleanup(p.clone()) {
                Ok((c, rem)) => (code::VIX_OK, c, rem),
                Err(f) => (f.code, 0, 0),
            },
        };
        if !num_cleaned_up.is_null() {
            *num_cleaned_up = c;
        }
        if !num_remaining.is_null() {
            *num_remaining = rem;
        }
        let mut f = ro_json(&p);
        f["cleaned"] = json!(c);
        f["remaining"] = json!(rem);
        log_call("VixDiskLib_Cleanup", f, r);
        r
    })
}

/// `VixError VixDiskLib_Open(const VixDiskLibConnection, const char *path, uint32
/// flags, VixDiskLibHandle *)`.
///
/// # Safety
/// `path` NULL or a C string; `diskHandle` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Open(
    connection: *mut c_void,
    path: *const c_char,
    flags: u32,
    disk_handle: *mut *mut c_void,
) -> VixError {
    guard(|| {
        let p = cstr(path);
        let mut fields = json!({"connection": connection.addr(), "path": p, "flags": flags});
        let r = match (&p, disk_handle.is_null()) {
            (None, _) => invalid("path").code,
            (_, true) => invalid("diskHandle").code,
            (Some(path), false) => match vddk::open(connection.addr(), path, flags) {
                Ok(id) => {
                    *disk_handle = handle_ptr(id);
                    fields = disk_json(id);
                    fields["flags"] = json!(flags);
                    code::VIX_OK
                }
                Err(f) => {
                    fields["error"] = json!(f.msg);
                    f.code
                }
            },
        };
        log_call("VixDiskLib_Open", fields, r);
        r
    })
}

/// `VixError VixDiskLib_Close(VixDiskLibHandle)`: a hot-added disk is detached.
#[no_mangle]
pub extern "C" fn VixDiskLib_Close(disk_handle: *mut c_void) -> VixError {
    guard(|| {
        let f = disk_json(disk_handle.addr());
        let r = result(vddk::close(disk_handle.addr()));
        log_call("VixDiskLib_Close", f, r);
        r
    })
}

/// `VixError VixDiskLib_GetInfo(VixDiskLibHandle, VixDiskLibInfo **)`: the 7.0+
/// (64-byte) layout, freed with [`VixDiskLib_FreeInfo`].
///
/// # Safety
/// `info` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_GetInfo(
    disk_handle: *mut c_void,
    info: *mut *mut Info,
) -> VixError {
    guard(|| {
        let r = if info.is_null() {
            invalid("info").code
        } else {
            match vddk::disk(disk_handle.addr()) {
                Err(f) => f.code,
                Ok(d) => {
                    let p = libc::calloc(1, std::mem::size_of::<Info>()) as *mut Info;
                    if p.is_null() {
                        code::VIX_E_OUT_OF_MEMORY
                    } else {
                        let sectors = d.capacity().div_ceil(types::SECTOR_SIZE);
                        let cyl = (sectors / (255 * 63)).min(u32::MAX as u64) as u32;
                        let geo = Geometry {
                            cylinders: cyl,
                            heads: 255,
                            sectors: 63,
                        };
                        (*p).bios_geo = geo;
                        (*p).phys_geo = geo;
                        (*p).capacity = sectors;
                        (*p).adapter_type = types::ADAPTER_SCSI_LSILOGIC;
                        (*p).num_links = 1;
                        (*p).parent_file_name_hint = std::ptr::null_mut();
                        (*p).uuid = malloc_str(d.uuid());
                        (*p).logical_sector_size = 512;
                        (*p).physical_sector_size = 512;
                        *info = p;
                        code::VIX_OK
                    }
                }
            }
        };
        log_call("VixDiskLib_GetInfo", disk_json(disk_handle.addr()), r);
        r
    })
}

/// A `malloc`ed copy of `s` (NULL when out of memory).
fn malloc_str(s: &str) -> *mut c_char {
    let bytes: Vec<u8> = s.bytes().filter(|b| *b != 0).collect();
    // SAFETY: malloc of len + 1 bytes, filled and NUL-terminated below.
    unsafe {
        let p = libc::malloc(bytes.len() + 1) as *mut u8;
        if p.is_null() {
            return std::ptr::null_mut();
        }
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
        *p.add(bytes.len()) = 0;
        p as *mut c_char
    }
}

/// `void VixDiskLib_FreeInfo(VixDiskLibInfo *)`; NULL is accepted.
///
/// # Safety
/// `info` NULL or returned by [`VixDiskLib_GetInfo`] and not freed yet.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_FreeInfo(info: *mut Info) {
    guard(|| {
        if !info.is_null() {
            libc::free((*info).uuid as *mut c_void);
            libc::free((*info).parent_file_name_hint as *mut c_void);
            libc::free(info as *mut c_void);
        }
        log_call("VixDiskLib_FreeInfo", json!({}), 0);
        0
    });
}

/// `const char *VixDiskLib_GetTransportMode(VixDiskLibHandle)`: a static string
/// (`hotadd`, `nbdssl`, `nbd`); an unknown handle gives `""`.
#[no_mangle]
pub extern "C" fn VixDiskLib_GetTransportMode(disk_handle: *mut c_void) -> *const c_char {
    catch_unwind(|| {
        let p = match vddk::disk(disk_handle.addr()) {
            Ok(d) => d.mode().as_ptr(),
            Err(_) => c"".as_ptr(),
        };
        log_call(
            "VixDiskLib_GetTransportMode",
            disk_json(disk_handle.addr()),
            0,
        );
        p
    })
    .unwrap_or(c"".as_ptr())
}

unsafe fn io(
    name: &str,
    h: *mut c_void,
    start: u64,
    sectors: u64,
    buf: *mut u8,
    write: bool,
    asynchronous: bool,
) -> Result<(), Failure> {
    let len = sectors
        .checked_mul(types::SECTOR_SIZE)
        .and_then(|l| usize::try_from(l).ok())
        .ok_or_else(|| {
            fail(
                code::VIX_E_DISK_OUTOFRANGE,
                format!("{name}: {sectors} sectors is too many"),
            )
        })?;
    if buf.is_null() && len > 0 {
        return Err(invalid("buffer"));
    }
    let d = vddk::disk(h.addr())?;
    if len == 0 {
        return Ok(());
    }
    if write {
        let data = std::slice::from_raw_parts(buf as *const u8, len);
        d.write(start, data, asynchronous)
    } else {
        let data = std::slice::from_raw_parts_mut(buf, len);
        d.read(start, data, asynchronous)
    }
}

fn io_log(name: &str, h: *mut c_void, start: u64, sectors: u64, r: VixError) {
    let mut f = disk_json(h.addr());
    f["start"] = json!(start);
    f["sectors"] = json!(sectors);
    log_call(name, f, r);
}

/// `VixError VixDiskLib_Read(VixDiskLibHandle, VixDiskLibSectorType start,
/// VixDiskLibSectorType numSectors, uint8 *readBuffer)`.
///
/// # Safety
/// `readBuffer` holds `numSectors * 512` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Read(
    h: *mut c_void,
    start: u64,
    sectors: u64,
    buf: *mut u8,
) -> VixError {
    guard(|| {
        let r = result(io("Read", h, start, sectors, buf, false, false));
        io_log("VixDiskLib_Read", h, start, sectors, r);
        r
    })
}

/// `VixError VixDiskLib_Write(VixDiskLibHandle, VixDiskLibSectorType start,
/// VixDiskLibSectorType numSectors, const uint8 *writeBuffer)`.
///
/// # Safety
/// `writeBuffer` holds `numSectors * 512` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_Write(
    h: *mut c_void,
    start: u64,
    sectors: u64,
    buf: *const u8,
) -> VixError {
    guard(|| {
        let r = result(io("Write", h, start, sectors, buf as *mut u8, true, false));
        io_log("VixDiskLib_Write", h, start, sectors, r);
        r
    })
}

#[allow(clippy::too_many_arguments)]
unsafe fn async_io(
    name: &str,
    h: *mut c_void,
    start: u64,
    sectors: u64,
    buf: *mut u8,
    write: bool,
    cb: CompletionCb,
    cb_data: *mut c_void,
) -> VixError {
    let Some(cb) = cb else {
        let r = invalid("callback").code;
        io_log(name, h, start, sectors, r);
        return r;
    };
    // Argument and handle errors come back directly (no callback), as in VDDK.
    if let Err(f) = vddk::disk(h.addr()) {
        io_log(name, h, start, sectors, f.code);
        return f.code;
    }
    if buf.is_null() && sectors > 0 {
        let r = invalid("buffer").code;
        io_log(name, h, start, sectors, r);
        return r;
    }
    let r = result(io(name, h, start, sectors, buf, write, true));
    if r == code::VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED {
        io_log(name, h, start, sectors, r);
        return r;
    }
    io_log(name, h, start, sectors, r);
    // The I/O ran synchronously; completion is reported before returning VIX_ASYNC.
    cb(cb_data, r);
    code::VIX_ASYNC
}

/// `VixError VixDiskLib_ReadAsync(VixDiskLibHandle, start, numSectors, uint8 *buf,
/// VixDiskLibCompletionCB, void *cbData)`: runs the read, calls the callback with
/// its result, returns `VIX_ASYNC`.
///
/// # Safety
/// `buf` holds `numSectors * 512` writable bytes; `callback` is a valid function.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_ReadAsync(
    h: *mut c_void,
    start: u64,
    sectors: u64,
    buf: *mut u8,
    callback: CompletionCb,
    cb_data: *mut c_void,
) -> VixError {
    guard(|| {
        async_io(
            "VixDiskLib_ReadAsync",
            h,
            start,
            sectors,
            buf,
            false,
            callback,
            cb_data,
        )
    })
}

/// `VixError VixDiskLib_WriteAsync(VixDiskLibHandle, start, numSectors, const uint8
/// *buf, VixDiskLibCompletionCB, void *cbData)`.
///
/// # Safety
/// `buf` holds `numSectors * 512` readable bytes; `callback` is a valid function.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_WriteAsync(
    h: *mut c_void,
    start: u64,
    sectors: u64,
    buf: *const u8,
    callback: CompletionCb,
    cb_data: *mut c_void,
) -> VixError {
    guard(|| {
        async_io(
            "VixDiskLib_WriteAsync",
            h,
            start,
            sectors,
            buf as *mut u8,
            true,
            callback,
            cb_data,
        )
    })
}

/// `VixError VixDiskLib_Wait(VixDiskLibHandle)`: every callback has already run.
#[no_mangle]
pub extern "C" fn VixDiskLib_Wait(h: *mut c_void) -> VixError {
    guard(|| {
        let r = result(vddk::disk(h.addr()).map(|_| ()));
        log_call("VixDiskLib_Wait", disk_json(h.addr()), r);
        r
    })
}

/// `VixError VixDiskLib_Flush(VixDiskLibHandle)`.
#[no_mangle]
pub extern "C" fn VixDiskLib_Flush(h: *mut c_void) -> VixError {
    guard(|| {
        let r = result(vddk::disk(h.addr()).and_then(|d| d.flush()));
        log_call("VixDiskLib_Flush", disk_json(h.addr()), r);
        r
    })
}

/// `VixError VixDiskLib_QueryAllocatedBlocks(VixDiskLibHandle, start, numSectors,
/// chunkSize, VixDiskLibBlockList **)`: chunk-granular allocated blocks of the disk
/// as of its snapshot; freed with [`VixDiskLib_FreeBlockList`].
///
/// # Safety
/// `blockList` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_QueryAllocatedBlocks(
    h: *mut c_void,
    start: u64,
    sectors: u64,
    chunk: u64,
    block_list: *mut *mut BlockList,
) -> VixError {
    guard(|| {
        let mut n = 0usize;
        let r = if block_list.is_null() {
            invalid("blockList").code
        } else {
            match vddk::disk(h.addr()).and_then(|d| d.allocated(start, sectors, chunk)) {
                Err(f) => f.code,
                Ok(blocks) => {
                    n = blocks.len();
                    let bytes = 8 + std::mem::size_of::<Block>() * blocks.len().max(1);
                    let p = libc::calloc(1, bytes) as *mut BlockList;
                    if p.is_null() || u32::try_from(n).is_err() {
                        libc::free(p as *mut c_void);
                        code::VIX_E_OUT_OF_MEMORY
                    } else {
                        (*p).num_blocks = n as u32;
                        let first = std::ptr::addr_of_mut!((*p).blocks) as *mut Block;
                        for (i, b) in blocks.iter().enumerate() {
                            first.add(i).write(*b);
                        }
                        *block_list = p;
                        code::VIX_OK
                    }
                }
            }
        };
        let mut f = disk_json(h.addr());
        f["start"] = json!(start);
        f["sectors"] = json!(sectors);
        f["chunk"] = json!(chunk);
        f["blocks"] = json!(n);
        log_call("VixDiskLib_QueryAllocatedBlocks", f, r);
        r
    })
}

/// `VixError VixDiskLib_FreeBlockList(VixDiskLibBlockList *)`; NULL is accepted.
///
/// # Safety
/// `blockList` NULL or returned by [`VixDiskLib_QueryAllocatedBlocks`], not freed.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_FreeBlockList(block_list: *mut BlockList) -> VixError {
    guard(|| {
        libc::free(block_list as *mut c_void);
        log_call("VixDiskLib_FreeBlockList", json!({}), 0);
        code::VIX_OK
    })
}

/// `VixDiskLibConnectParams *VixDiskLib_AllocateConnectParams(void)`: zeroed, 128
/// bytes; freed with [`VixDiskLib_FreeConnectParams`] (which frees only the struct,
/// not strings the caller put in it).
#[no_mangle]
pub extern "C" fn VixDiskLib_AllocateConnectParams() -> *mut ConnectParams {
    let p = catch_unwind(|| {
        // SAFETY: plain calloc.
        unsafe { libc::calloc(1, std::mem::size_of::<ConnectParams>()) as *mut ConnectParams }
    })
    .unwrap_or(std::ptr::null_mut());
    log_call(
        "VixDiskLib_AllocateConnectParams",
        json!({}),
        if p.is_null() { 2 } else { 0 },
    );
    p
}

/// `void VixDiskLib_FreeConnectParams(VixDiskLibConnectParams *)`; NULL is accepted.
///
/// # Safety
/// `p` NULL or returned by [`VixDiskLib_AllocateConnectParams`], not freed.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_FreeConnectParams(p: *mut ConnectParams) {
    guard(|| {
        libc::free(p as *mut c_void);
        log_call("VixDiskLib_FreeConnectParams", json!({}), 0);
        0
    });
}

/// `char *VixDiskLib_GetErrorText(VixError err, const char *locale)`: a `malloc`ed
/// string naming the error (`"VIX_E_FAIL (1): Unknown error. ..."`, with the mock's
/// last message for that code); free with [`VixDiskLib_FreeErrorText`].
#[no_mangle]
pub extern "C" fn VixDiskLib_GetErrorText(err: VixError, _locale: *const c_char) -> *mut c_char {
    catch_unwind(|| {
        let (name, text) = types::describe(err);
        let mut s = format!("{name} ({}): {text}", err & 0xFFFF);
        if let Some(d) = vddk::detail(err).filter(|_| err != 0) {
            s.push_str(" [");
            s.push_str(&d);
            s.push(']');
        }
        malloc_str(&s)
    })
    .unwrap_or(std::ptr::null_mut())
}

/// `void VixDiskLib_FreeErrorText(char *)`; NULL is accepted.
///
/// # Safety
/// `msg` NULL or returned by [`VixDiskLib_GetErrorText`], not freed.
#[no_mangle]
pub unsafe extern "C" fn VixDiskLib_FreeErrorText(msg: *mut c_char) {
    guard(|| {
        libc::free(msg as *mut c_void);
        0
    });
}
