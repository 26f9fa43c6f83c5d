//! ferry's own declarations of VMware's VDDK C API (`vixDiskLib.h`) for x86_64
//! Linux (LP64): the `#[repr(C)]` structures whose layout must match the library
//! byte for byte, the constants ferry uses, and the function pointer types that
//! [`super::loader`] resolves with `dlsym`.
//!
//! Owns: layouts and signatures only. Must not: call anything, allocate, or hold
//! policy; every call goes through [`super::loader::Vddk`] and the safe wrappers
//! above it. Layouts follow VMware's published header for VDDK 7.0 and later
//! (`ConnectParams` 128 bytes, `Info` 64 bytes); the unit tests below pin every
//! field offset.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_long, c_void};

/// `VixError`: a 64-bit code; the error number is in the low 16 bits.
pub type VixError = u64;
/// `VixDiskLibSectorType`: a count or offset in 512-byte sectors.
pub type SectorType = u64;
/// `Bool` (`char` in `vm_basic_types.h`).
pub type Bool = c_char;
/// `VixDiskLibConnection`: an opaque pointer owned by the library.
pub type Connection = *mut c_void;
/// `VixDiskLibHandle`: an opaque pointer owned by the library.
pub type Handle = *mut c_void;

/// `VIX_OK`.
pub const VIX_OK: VixError = 0;
/// `VIX_E_FAIL` ("Unknown error"; also a thumbprint mismatch at Open).
pub const VIX_E_FAIL: VixError = 1;
/// `VIX_E_INVALID_ARG`.
pub const VIX_E_INVALID_ARG: VixError = 3;
/// `VIX_E_FILE_NOT_FOUND`.
pub const VIX_E_FILE_NOT_FOUND: VixError = 4;
/// `VIX_E_NOT_SUPPORTED`.
pub const VIX_E_NOT_SUPPORTED: VixError = 6;
/// `VIX_E_FILE_ACCESS_ERROR`.
pub const VIX_E_FILE_ACCESS_ERROR: VixError = 13;
/// `VIX_E_OBJECT_NOT_FOUND`.
pub const VIX_E_OBJECT_NOT_FOUND: VixError = 25;
/// `VIX_E_HOST_CONNECTION_LOST`.
pub const VIX_E_HOST_CONNECTION_LOST: VixError = 36;
/// `VIX_E_SNAPSHOT_NOTFOUND`.
pub const VIX_E_SNAPSHOT_NOTFOUND: VixError = 13003;
/// `VIX_E_HOST_NETWORK_CONN_REFUSED` (ESXi TCP 902 unreachable).
pub const VIX_E_HOST_NETWORK_CONN_REFUSED: VixError = 14009;
/// `VIX_E_DISK_OUTOFRANGE`.
pub const VIX_E_DISK_OUTOFRANGE: VixError = 16007;
/// `VIX_E_DISK_NOLICENSE` (also missing vCenter privileges).
pub const VIX_E_DISK_NOLICENSE: VixError = 16064;
/// `VIX_ASYNC`: ReadAsync/WriteAsync queued the request (success).
pub const VIX_ASYNC: VixError = 25000;
/// `VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED`: sync and async I/O on one handle.
pub const VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED: VixError = 26000;

/// The error number of a `VixError` (`VIX_ERROR_CODE`: the low 16 bits).
pub const fn vix_error_code(err: VixError) -> u64 {
    err & 0xFFFF
}

/// `VIXDISKLIB_SECTOR_SIZE`.
pub const SECTOR_SIZE: u64 = 512;
/// `VIXDISKLIB_MIN_CHUNK_SIZE`: smallest QueryAllocatedBlocks chunk, in sectors.
pub const MIN_CHUNK_SIZE: SectorType = 128;
/// `VIXDISKLIB_MAX_CHUNK_NUMBER`: most chunks one QueryAllocatedBlocks call covers.
pub const MAX_CHUNK_NUMBER: SectorType = 512 * 1024;

/// `VIXDISKLIB_FLAG_OPEN_UNBUFFERED`.
pub const FLAG_OPEN_UNBUFFERED: u32 = 1;
/// `VIXDISKLIB_FLAG_OPEN_SINGLE_LINK`.
pub const FLAG_OPEN_SINGLE_LINK: u32 = 2;
/// `VIXDISKLIB_FLAG_OPEN_READ_ONLY`.
pub const FLAG_OPEN_READ_ONLY: u32 = 4;

/// `VIXDISKLIB_CRED_UID` (user name and password; ferry does not use it).
pub const CRED_UID: c_int = 1;
/// `VIXDISKLIB_CRED_SESSIONID` (an existing vCenter session's cookie).
pub const CRED_SESSIONID: c_int = 2;
/// `VIXDISKLIB_CRED_TICKETID` (internal use).
pub const CRED_TICKETID: c_int = 3;
/// `VIXDISKLIB_SPEC_VMX`: `vmxSpec` names a VM.
pub const SPEC_VMX: c_int = 0;
/// `VIXDISKLIB_SPEC_VSTORAGE_OBJECT`: a first-class disk.
pub const SPEC_VSTORAGE_OBJECT: c_int = 1;

/// `VixDiskLibGeometry` (12 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u32,
    /// Heads.
    pub heads: u32,
    /// Sectors per track.
    pub sectors: u32,
}

/// `creds.uid` of `VixDiskLibConnectParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UidCreds {
    /// User name.
    pub user_name: *mut c_char,
    /// Password.
    pub password: *mut c_char,
}

/// `creds.sessionId` of `VixDiskLibConnectParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SessionIdCreds {
    /// The `vmware_soap_session` cookie of an authenticated vCenter session.
    pub cookie: *mut c_char,
    /// User name (may be empty; never NULL).
    pub user_name: *mut c_char,
    /// Key (empty for ferry; never NULL).
    pub key: *mut c_char,
}

/// The `creds` union of `VixDiskLibConnectParams` (24 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub union Creds {
    /// `VIXDISKLIB_CRED_UID`.
    pub uid: UidCreds,
    /// `VIXDISKLIB_CRED_SESSIONID`.
    pub session_id: SessionIdCreds,
    /// `VIXDISKLIB_CRED_TICKETID` (internal).
    pub ticket_id: *mut c_void,
}

/// `VixDiskLibVStorageObjectSpec` (24 bytes; first-class disks).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VStorageObjectSpec {
    /// Disk id.
    pub id: *mut c_char,
    /// Datastore moref.
    pub datastore_mo_ref: *mut c_char,
    /// Snapshot id.
    pub ss_id: *mut c_char,
}

/// The `spec` union of `VixDiskLibConnectParams` (24 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub union Spec {
    /// `VIXDISKLIB_SPEC_VSTORAGE_OBJECT`.
    pub v_storage_obj_spec: VStorageObjectSpec,
}

/// `VixDiskLibConnectParams`, VDDK 6.7+ layout (128 bytes, align 8).
#[repr(C)]
pub struct ConnectParams {
    /// `"moref=vm-16"`.
    pub vmx_spec: *mut c_char,
    /// vCenter (or ESXi) host name or address.
    pub server_name: *mut c_char,
    /// SHA-1 thumbprint of the server's certificate, `AA:BB:..`.
    pub thumb_print: *mut c_char,
    /// Ignored by the library.
    pub private_use: c_long,
    /// `VixDiskLibCredType`.
    pub cred_type: c_int,
    /// Credentials, by `cred_type`.
    pub creds: Creds,
    /// vCenter/ESXi port (0: 443).
    pub port: u32,
    /// NFC port on ESXi (902).
    pub nfc_host_port: u32,
    /// Not used.
    pub vim_api_ver: *mut c_char,
    /// Internal use only.
    pub reserved: [c_char; 8],
    /// Internal use only (why 6.7+ wants `AllocateConnectParams`).
    pub state: *mut c_void,
    /// Spec, by `spec_type`.
    pub spec: Spec,
    /// `VixDiskLibSpecType`.
    pub spec_type: c_int,
}

/// `VixDiskLibInfo`, VDDK 7.0+ layout (64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Info {
    /// BIOS geometry.
    pub bios_geo: Geometry,
    /// Physical geometry.
    pub phys_geo: Geometry,
    /// Capacity in 512-byte sectors.
    pub capacity: SectorType,
    /// `VixDiskLibAdapterType`.
    pub adapter_type: c_int,
    /// Base disk plus redo logs.
    pub num_links: c_int,
    /// Parent file name hint (may be NULL).
    pub parent_file_name_hint: *mut c_char,
    /// UUID (may be NULL).
    pub uuid: *mut c_char,
    /// Logical sector size (7.0+).
    pub logical_sector_size: u32,
    /// Physical sector size (7.0+).
    pub physical_sector_size: u32,
}

/// `VixDiskLibBlock`: an allocated range, in sectors (16 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Block {
    /// First sector.
    pub offset: SectorType,
    /// Sectors.
    pub length: SectorType,
}

/// `VixDiskLibBlockList` header: `num_blocks` entries start at byte 8
/// ([`BLOCK_LIST_BLOCKS_OFFSET`]); the declared one-element array is only the
/// first of them.
#[repr(C)]
#[derive(Debug)]
pub struct BlockList {
    /// Number of entries in `blocks`.
    pub num_blocks: u32,
    /// The first entry of a variable-length array.
    pub blocks: [Block; 1],
}

/// Byte offset of `BlockList::blocks`.
pub const BLOCK_LIST_BLOCKS_OFFSET: usize = 8;

/// `VixDiskLibGenericLogFunc`. On x86_64 SysV `va_list` is `__va_list_tag[1]`,
/// which decays to a pointer when passed: the second argument is that pointer,
/// handed unchanged to `vsnprintf`.
pub type LogFunc = unsafe extern "C" fn(fmt: *const c_char, args: *mut c_void);
/// `VixDiskLibCompletionCB` (two arguments, VDDK 6.0+).
pub type CompletionCb = unsafe extern "C" fn(cb_data: *mut c_void, result: VixError);

/// `VixDiskLib_InitEx`.
pub type InitExFn = unsafe extern "C" fn(
    major: u32,
    minor: u32,
    log: Option<LogFunc>,
    warn: Option<LogFunc>,
    panic: Option<LogFunc>,
    lib_dir: *const c_char,
    config_file: *const c_char,
) -> VixError;
/// `VixDiskLib_Exit`.
pub type ExitFn = unsafe extern "C" fn();
/// `VixDiskLib_ListTransportModes` (static string).
pub type ListTransportModesFn = unsafe extern "C" fn() -> *const c_char;
/// `VixDiskLib_PrepareForAccess` and `VixDiskLib_EndAccess`.
pub type AccessFn =
    unsafe extern "C" fn(params: *const ConnectParams, identity: *const c_char) -> VixError;
/// `VixDiskLib_ConnectEx`.
pub type ConnectExFn = unsafe extern "C" fn(
    params: *const ConnectParams,
    read_only: Bool,
    snapshot_ref: *const c_char,
    transport_modes: *const c_char,
    connection: *mut Connection,
) -> VixError;
/// `VixDiskLib_Disconnect`.
pub type DisconnectFn = unsafe extern "C" fn(connection: Connection) -> VixError;
/// `VixDiskLib_Cleanup`.
pub type CleanupFn = unsafe extern "C" fn(
    params: *const ConnectParams,
    num_cleaned_up: *mut u32,
    num_remaining: *mut u32,
) -> VixError;
/// `VixDiskLib_Open`.
pub type OpenFn = unsafe extern "C" fn(
    connection: Connection,
    path: *const c_char,
    flags: u32,
    handle: *mut Handle,
) -> VixError;
/// `VixDiskLib_Close`, `VixDiskLib_Flush`, `VixDiskLib_Wait`.
pub type HandleFn = unsafe extern "C" fn(handle: Handle) -> VixError;
/// `VixDiskLib_GetInfo`.
pub type GetInfoFn = unsafe extern "C" fn(handle: Handle, info: *mut *mut Info) -> VixError;
/// `VixDiskLib_FreeInfo`.
pub type FreeInfoFn = unsafe extern "C" fn(info: *mut Info);
/// `VixDiskLib_GetTransportMode` (static string).
pub type GetTransportModeFn = unsafe extern "C" fn(handle: Handle) -> *const c_char;
/// `VixDiskLib_Read`.
pub type ReadFn = unsafe extern "C" fn(
    handle: Handle,
    start_sector: SectorType,
    num_sectors: SectorType,
    buf: *mut u8,
) -> VixError;
/// `VixDiskLib_Write`.
pub type WriteFn = unsafe extern "C" fn(
    handle: Handle,
    start_sector: SectorType,
    num_sectors: SectorType,
    buf: *const u8,
) -> VixError;
/// `VixDiskLib_ReadAsync`.
pub type ReadAsyncFn = unsafe extern "C" fn(
    handle: Handle,
    start_sector: SectorType,
    num_sectors: SectorType,
    buf: *mut u8,
    callback: Option<CompletionCb>,
    cb_data: *mut c_void,
) -> VixError;
/// `VixDiskLib_WriteAsync`.
pub type WriteAsyncFn = unsafe extern "C" fn(
    handle: Handle,
    start_sector: SectorType,
    num_sectors: SectorType,
    buf: *const u8,
    callback: Option<CompletionCb>,
    cb_data: *mut c_void,
) -> VixError;
/// `VixDiskLib_QueryAllocatedBlocks`.
pub type QueryAllocatedBlocksFn = unsafe extern "C" fn(
    handle: Handle,
    start_sector: SectorType,
    num_sectors: SectorType,
    chunk_size: SectorType,
    block_list: *mut *mut BlockList,
) -> VixError;
/// `VixDiskLib_FreeBlockList`.
pub type FreeBlockListFn = unsafe extern "C" fn(block_list: *mut BlockList) -> VixError;
/// `VixDiskLib_AllocateConnectParams`.
pub type AllocateConnectParamsFn = unsafe extern "C" fn() -> *mut ConnectParams;
/// `VixDiskLib_FreeConnectParams`.
pub type FreeConnectParamsFn = unsafe extern "C" fn(params: *mut ConnectParams);
/// `VixDiskLib_GetErrorText` (heap string; free with `FreeErrorText`).
pub type GetErrorTextFn = unsafe extern "C" fn(err: VixError, locale: *const c_char) -> *mut c_char;
/// `VixDiskLib_FreeErrorText`.
pub type FreeErrorTextFn = unsafe extern "C" fn(text: *mut c_char);

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    #[test]
    fn basic_types_match_the_header() {
        assert_eq!(size_of::<VixError>(), 8);
        assert_eq!(size_of::<SectorType>(), 8);
        assert_eq!(size_of::<Bool>(), 1);
        assert_eq!(size_of::<Connection>(), 8);
        assert_eq!(size_of::<Handle>(), 8);
        assert_eq!(size_of::<Option<LogFunc>>(), 8);
        assert_eq!(size_of::<Option<CompletionCb>>(), 8);
        assert_eq!(vix_error_code(0xABCD_0000_0000_3E8F), 0x3E8F);
        assert_eq!(MIN_CHUNK_SIZE * SECTOR_SIZE, 64 << 10);
        assert_eq!(MAX_CHUNK_NUMBER, 524_288);
    }

    #[test]
    fn geometry_layout() {
        assert_eq!(size_of::<Geometry>(), 12);
        assert_eq!(align_of::<Geometry>(), 4);
        assert_eq!(offset_of!(Geometry, cylinders), 0);
        assert_eq!(offset_of!(Geometry, heads), 4);
        assert_eq!(offset_of!(Geometry, sectors), 8);
    }

    #[test]
    fn connect_params_layout() {
        assert_eq!(size_of::<ConnectParams>(), 128);
        assert_eq!(align_of::<ConnectParams>(), 8);
        assert_eq!(offset_of!(ConnectParams, vmx_spec), 0);
        assert_eq!(offset_of!(ConnectParams, server_name), 8);
        assert_eq!(offset_of!(ConnectParams, thumb_print), 16);
        assert_eq!(offset_of!(ConnectParams, private_use), 24);
        assert_eq!(offset_of!(ConnectParams, cred_type), 32);
        assert_eq!(offset_of!(ConnectParams, creds), 40);
        assert_eq!(offset_of!(ConnectParams, port), 64);
        assert_eq!(offset_of!(ConnectParams, nfc_host_port), 68);
        assert_eq!(offset_of!(ConnectParams, vim_api_ver), 72);
        assert_eq!(offset_of!(ConnectParams, reserved), 80);
        assert_eq!(offset_of!(ConnectParams, state), 88);
        assert_eq!(offset_of!(ConnectParams, spec), 96);
        assert_eq!(offset_of!(ConnectParams, spec_type), 120);
    }

    #[test]
    fn creds_and_spec_unions_layout() {
        assert_eq!(size_of::<Creds>(), 24);
        assert_eq!(size_of::<UidCreds>(), 16);
        assert_eq!(offset_of!(UidCreds, user_name), 0);
        assert_eq!(offset_of!(UidCreds, password), 8);
        assert_eq!(size_of::<SessionIdCreds>(), 24);
        assert_eq!(offset_of!(SessionIdCreds, cookie), 0);
        assert_eq!(offset_of!(SessionIdCreds, user_name), 8);
        assert_eq!(offset_of!(SessionIdCreds, key), 16);
        assert_eq!(offset_of!(Creds, uid), 0);
        assert_eq!(offset_of!(Creds, session_id), 0);
        assert_eq!(offset_of!(Creds, ticket_id), 0);
        assert_eq!(size_of::<Spec>(), 24);
        assert_eq!(size_of::<VStorageObjectSpec>(), 24);
        assert_eq!(offset_of!(VStorageObjectSpec, id), 0);
        assert_eq!(offset_of!(VStorageObjectSpec, datastore_mo_ref), 8);
        assert_eq!(offset_of!(VStorageObjectSpec, ss_id), 16);
        assert_eq!(offset_of!(Spec, v_storage_obj_spec), 0);
    }

    #[test]
    fn info_layout_is_the_7_0_one() {
        assert_eq!(size_of::<Info>(), 64);
        assert_eq!(align_of::<Info>(), 8);
        assert_eq!(offset_of!(Info, bios_geo), 0);
        assert_eq!(offset_of!(Info, phys_geo), 12);
        assert_eq!(offset_of!(Info, capacity), 24);
        assert_eq!(offset_of!(Info, adapter_type), 32);
        assert_eq!(offset_of!(Info, num_links), 36);
        assert_eq!(offset_of!(Info, parent_file_name_hint), 40);
        assert_eq!(offset_of!(Info, uuid), 48);
        assert_eq!(offset_of!(Info, logical_sector_size), 56);
        assert_eq!(offset_of!(Info, physical_sector_size), 60);
    }

    #[test]
    fn block_list_layout() {
        assert_eq!(size_of::<Block>(), 16);
        assert_eq!(offset_of!(Block, offset), 0);
        assert_eq!(offset_of!(Block, length), 8);
        assert_eq!(offset_of!(BlockList, num_blocks), 0);
        assert_eq!(offset_of!(BlockList, blocks), BLOCK_LIST_BLOCKS_OFFSET);
        assert_eq!(size_of::<BlockList>(), 24);
    }
}
