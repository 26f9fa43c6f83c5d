//! VDDK's C types, constants and error codes, written from the published API
//! (`vixDiskLib.h` as documented in /work/vddk-api.md §1, §2, §4) for x86_64 Linux.
//!
//! Owns the ABI of the mock: every `#[repr(C)]` layout is pinned by compile-time
//! size and offset assertions. It must not import anything from ferry's bindings
//! (`src/transport/vddk/`): the two sides are written independently so a layout
//! mistake on either shows up as a failing test instead of cancelling out.

use std::ffi::{c_char, c_int, c_long, c_void};
use std::mem::{offset_of, size_of};

/// `VixError`: a 64-bit value whose low 16 bits are the code.
pub type VixError = u64;
/// `VixDiskLibSectorType`: sectors of 512 bytes.
pub type SectorType = u64;
/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;

/// `VixDiskLibCompletionCB` (VDDK >= 6.0, two arguments).
pub type CompletionCb = Option<unsafe extern "C" fn(cb_data: *mut c_void, result: VixError)>;

/// `VIXDISKLIB_FLAG_OPEN_READ_ONLY`.
pub const FLAG_OPEN_READ_ONLY: u32 = 4;
/// `VIXDISKLIB_CRED_UID`.
pub const CRED_UID: c_int = 1;
/// `VIXDISKLIB_CRED_SESSIONID`.
pub const CRED_SESSIONID: c_int = 2;
/// `VIXDISKLIB_MIN_CHUNK_SIZE` (sectors).
pub const MIN_CHUNK_SIZE: u64 = 128;
/// `VIXDISKLIB_MAX_CHUNK_NUMBER`.
pub const MAX_CHUNK_NUMBER: u64 = 512 * 1024;
/// `VIXDISKLIB_ADAPTER_SCSI_LSILOGIC`.
pub const ADAPTER_SCSI_LSILOGIC: c_int = 3;

/// `creds.uid`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UidCreds {
    /// `userName`.
    pub user_name: *mut c_char,
    /// `password`.
    pub password: *mut c_char,
}

/// `creds.sessionId`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SessionIdCreds {
    /// `cookie`: the `vmware_soap_session` cookie value.
    pub cookie: *mut c_char,
    /// `userName`.
    pub user_name: *mut c_char,
    /// `key`.
    pub key: *mut c_char,
}

/// The `creds` union (24 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub union Creds {
    /// `VIXDISKLIB_CRED_UID`.
    pub uid: UidCreds,
    /// `VIXDISKLIB_CRED_SESSIONID`.
    pub session_id: SessionIdCreds,
    /// `VIXDISKLIB_CRED_TICKETID` (internal use).
    pub ticket_id: *mut c_void,
}

/// `VixDiskLibVStorageObjectSpec` (24 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VStorageObjectSpec {
    /// `id`.
    pub id: *mut c_char,
    /// `datastoreMoRef`.
    pub datastore_mo_ref: *mut c_char,
    /// `ssId`.
    pub ss_id: *mut c_char,
}

/// The `spec` union (24 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub union Spec {
    /// `vStorageObjSpec`.
    pub v_storage_obj_spec: VStorageObjectSpec,
}

/// `VixDiskLibConnectParams` (VDDK >= 6.7 layout, 128 bytes).
#[repr(C)]
pub struct ConnectParams {
    /// `vmxSpec` ("moref=vm-16").
    pub vmx_spec: *mut c_char,
    /// `serverName`.
    pub server_name: *mut c_char,
    /// `thumbPrint` ("AA:BB:..." SHA-1).
    pub thumb_print: *mut c_char,
    /// `privateUse` (ignored).
    pub private_use: c_long,
    /// `credType`.
    pub cred_type: c_int,
    /// `creds`.
    pub creds: Creds,
    /// `port` (0 = 443).
    pub port: u32,
    /// `nfcHostPort`.
    pub nfc_host_port: u32,
    /// `vimApiVer` (unused).
    pub vim_api_ver: *mut c_char,
    /// `reserved`.
    pub reserved: [c_char; 8],
    /// `state` (internal).
    pub state: *mut c_void,
    /// `spec`.
    pub spec: Spec,
    /// `specType` (`VIXDISKLIB_SPEC_VMX` = 0).
    pub spec_type: c_int,
}

/// `VixDiskLibGeometry`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u32,
    /// Heads.
    pub heads: u32,
    /// Sectors per track.
    pub sectors: u32,
}

/// `VixDiskLibInfo` (VDDK >= 7.0 layout, 64 bytes).
#[repr(C)]
pub struct Info {
    /// `biosGeo`.
    pub bios_geo: Geometry,
    /// `physGeo`.
    pub phys_geo: Geometry,
    /// `capacity` in sectors.
    pub capacity: SectorType,
    /// `adapterType`.
    pub adapter_type: c_int,
    /// `numLinks`.
    pub num_links: c_int,
    /// `parentFileNameHint`.
    pub parent_file_name_hint: *mut c_char,
    /// `uuid`.
    pub uuid: *mut c_char,
    /// `logicalSectorSize`.
    pub logical_sector_size: u32,
    /// `physicalSectorSize`.
    pub physical_sector_size: u32,
}

/// `VixDiskLibBlock` (sectors).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// `offset`.
    pub offset: SectorType,
    /// `length`.
    pub length: SectorType,
}

/// `VixDiskLibBlockList`: `numBlocks` then the blocks at offset 8.
#[repr(C)]
pub struct BlockList {
    /// `numBlocks`.
    pub num_blocks: u32,
    /// `blocks[1]` (really `numBlocks` long).
    pub blocks: [Block; 1],
}

const _: () = {
    assert!(size_of::<Creds>() == 24);
    assert!(size_of::<Spec>() == 24);
    assert!(size_of::<ConnectParams>() == 128);
    assert!(offset_of!(ConnectParams, vmx_spec) == 0);
    assert!(offset_of!(ConnectParams, server_name) == 8);
    assert!(offset_of!(ConnectParams, thumb_print) == 16);
    assert!(offset_of!(ConnectParams, private_use) == 24);
    assert!(offset_of!(ConnectParams, cred_type) == 32);
    assert!(offset_of!(ConnectParams, creds) == 40);
    assert!(offset_of!(ConnectParams, port) == 64);
    assert!(offset_of!(ConnectParams, nfc_host_port) == 68);
    assert!(offset_of!(ConnectParams, vim_api_ver) == 72);
    assert!(offset_of!(ConnectParams, reserved) == 80);
    assert!(offset_of!(ConnectParams, state) == 88);
    assert!(offset_of!(ConnectParams, spec) == 96);
    assert!(offset_of!(ConnectParams, spec_type) == 120);
    assert!(size_of::<Geometry>() == 12);
    assert!(size_of::<Info>() == 64);
    assert!(offset_of!(Info, phys_geo) == 12);
    assert!(offset_of!(Info, capacity) == 24);
    assert!(offset_of!(Info, adapter_type) == 32);
    assert!(offset_of!(Info, num_links) == 36);
    assert!(offset_of!(Info, parent_file_name_hint) == 40);
    assert!(offset_of!(Info, uuid) == 48);
    assert!(offset_of!(Info, logical_sector_size) == 56);
    assert!(offset_of!(Info, physical_sector_size) == 60);
    assert!(size_of::<Block>() == 16);
    assert!(offset_of!(BlockList, blocks) == 8);
};

/// VDDK error codes (low 16 bits), §4.
pub mod code {
    /// Success.
    pub const VIX_OK: u64 = 0;
    /// Unknown error.
    pub const VIX_E_FAIL: u64 = 1;
    /// Out of memory.
    pub const VIX_E_OUT_OF_MEMORY: u64 = 2;
    /// Invalid argument.
    pub const VIX_E_INVALID_ARG: u64 = 3;
    /// File not found.
    pub const VIX_E_FILE_NOT_FOUND: u64 = 4;
    /// Not supported.
    pub const VIX_E_NOT_SUPPORTED: u64 = 6;
    /// File error.
    pub const VIX_E_FILE_ERROR: u64 = 7;
    /// Read-only file.
    pub const VIX_E_FILE_READ_ONLY: u64 = 11;
    /// Access rights.
    pub const VIX_E_FILE_ACCESS_ERROR: u64 = 13;
    /// Locked.
    pub const VIX_E_FILE_ALREADY_LOCKED: u64 = 15;
    /// Host connection lost.
    pub const VIX_E_HOST_CONNECTION_LOST: u64 = 36;
    /// Invalid handle.
    pub const VIX_E_INVALID_HANDLE: u64 = 1000;
    /// Insufficient permissions (dead session).
    pub const VIX_E_HOST_USER_PERMISSIONS: u64 = 3014;
    /// VM not found.
    pub const VIX_E_VM_NOT_FOUND: u64 = 4000;
    /// Snapshot not found.
    pub const VIX_E_SNAPSHOT_NOTFOUND: u64 = 13003;
    /// Connection refused.
    pub const VIX_E_HOST_NETWORK_CONN_REFUSED: u64 = 14009;
    /// TCP connection lost.
    pub const VIX_E_HOST_TCP_CONN_LOST: u64 = 14011;
    /// Library not initialised.
    pub const VIX_E_DISK_NOINIT: u64 = 16001;
    /// Out of bounds.
    pub const VIX_E_DISK_OUTOFRANGE: u64 = 16007;
    /// Invalid connection.
    pub const VIX_E_DISK_INVALID_CONNECTION: u64 = 16054;
    /// Cannot connect to host.
    pub const VIX_E_CANNOT_CONNECT_TO_HOST: u64 = 18000;
    /// Asynchronous operation started.
    pub const VIX_ASYNC: u64 = 25000;
    /// Sync and async I/O on one handle.
    pub const VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED: u64 = 26000;
}

/// `(name, text)` of a code (low 16 bits), VDDK's wording where known.
pub fn describe(err: VixError) -> (&'static str, &'static str) {
    match err & 0xFFFF {
        0 => ("VIX_OK", "The operation was successful."),
        1 => ("VIX_E_FAIL", "Unknown error."),
        2 => (
            "VIX_E_OUT_OF_MEMORY",
            "Memory allocation failed: out of memory.",
        ),
        3 => ("VIX_E_INVALID_ARG", "One of the parameters was invalid."),
        4 => ("VIX_E_FILE_NOT_FOUND", "A file was not found."),
        5 => (
            "VIX_E_OBJECT_IS_BUSY",
            "This function cannot be performed because the handle is executing another function.",
        ),
        6 => ("VIX_E_NOT_SUPPORTED", "The operation is not supported."),
        7 => (
            "VIX_E_FILE_ERROR",
            "A file access error occurred on the host or guest operating system.",
        ),
        11 => ("VIX_E_FILE_READ_ONLY", "The file is write-protected."),
        13 => (
            "VIX_E_FILE_ACCESS_ERROR",
            "You do not have access rights to this file.",
        ),
        15 => ("VIX_E_FILE_ALREADY_LOCKED", "The file is already in use."),
        25 => (
            "VIX_E_OBJECT_NOT_FOUND",
            "The request refers to an object that does not exist.",
        ),
        36 => (
            "VIX_E_HOST_CONNECTION_LOST",
            "The connection to the host was lost.",
        ),
        1000 => (
            "VIX_E_INVALID_HANDLE",
            "The handle is not a valid VIX object.",
        ),
        3014 => (
            "VIX_E_HOST_USER_PERMISSIONS",
            "Insufficient permissions in the host operating system.",
        ),
        4000 => ("VIX_E_VM_NOT_FOUND", "The virtual machine cannot be found."),
        13003 => ("VIX_E_SNAPSHOT_NOTFOUND", "The snapshot does not exist."),
        14009 => (
            "VIX_E_HOST_NETWORK_CONN_REFUSED",
            "Cannot connect to the host: the connection was refused.",
        ),
        14011 => (
            "VIX_E_HOST_TCP_CONN_LOST",
            "The TCP connection to the host was lost.",
        ),
        16001 => (
            "VIX_E_DISK_NOINIT",
            "The disk library has not been initialized.",
        ),
        16007 => (
            "VIX_E_DISK_OUTOFRANGE",
            "You have requested access to an area of the virtual disk that is out of bounds.",
        ),
        16054 => (
            "VIX_E_DISK_INVALID_CONNECTION",
            "Invalid connection handle.",
        ),
        18000 => ("VIX_E_CANNOT_CONNECT_TO_HOST", "Cannot connect to host."),
        25000 => (
            "VIX_ASYNC",
            "Success on operation that completes asynchronously.",
        ),
        26000 => (
            "VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED",
            "Synchronous and asynchronous I/O on the same disk handle is not allowed.",
        ),
        _ => ("VIX_E_UNKNOWN", "Unknown error code."),
    }
}
