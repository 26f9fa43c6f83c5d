//! Finding, loading and initialising VMware's `libvixDiskLib` at run time.
//!
//! Owns: the probe of the configured directory (`<libdir>/lib64/libvixDiskLib.so.8`,
//! `<libdir>/libvixDiskLib.so.8`, then `.so.7` likewise), the version policy (7.0.3
//! and 8.0.x), `dlopen`/`dlsym` through `libloading`, the resolved function table
//! [`Api`], the process-wide [`Vddk`] handle (one `VixDiskLib_InitEx` per process,
//! one explicit `VixDiskLib_Exit`), VDDK's log callbacks (forwarded to `tracing`)
//! and error texts.
//!
//! Must not: be linked at build time (ferry builds, tests and runs without VDDK),
//! choose a transport, or keep a library handle it could `dlclose` while VDDK's
//! threads may still run its code: once initialised, the library stays loaded
//! until the process ends.

use super::error::VddkError;
use super::ffi;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Soname majors ferry loads, newest first.
pub const SUPPORTED_MAJORS: [u32; 2] = [8, 7];

/// The library file name for a soname major.
fn soname(major: u32) -> String {
    format!("libvixDiskLib.so.{major}")
}

/// Candidate paths under `libdir`, in probe order.
pub fn candidates(libdir: &Path) -> Vec<(PathBuf, u32)> {
    SUPPORTED_MAJORS
        .iter()
        .flat_map(|&m| {
            [
                (libdir.join("lib64").join(soname(m)), m),
                (libdir.join(soname(m)), m),
            ]
        })
        .collect()
}

/// A VDDK version as far as the file names show it: the soname major always,
/// minor and patch when the real file is named `libvixDiskLib.so.8.0.3` (the
/// library exposes no version call).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VddkVersion {
    /// Soname major (7, 8).
    pub major: u32,
    /// Further numbers of the real file name (`[0, 3]` for 7.0.3), possibly empty.
    pub rest: Vec<u32>,
}

impl std::fmt::Display for VddkVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.major)?;
        for n in &self.rest {
            write!(f, ".{n}")?;
        }
        Ok(())
    }
}

impl VddkVersion {
    /// Parse `libvixDiskLib.so.N[.N...]`; `None` for any other name.
    pub fn from_file_name(name: &str) -> Option<VddkVersion> {
        let tail = name.strip_prefix("libvixDiskLib.so.")?;
        let mut nums = tail.split('.').map(|p| p.parse::<u32>().ok());
        let major = nums.next()??;
        let rest: Option<Vec<u32>> = nums.collect();
        Some(VddkVersion { major, rest: rest? })
    }

    /// Whether ferry supports this version: 7.0.3 (or a later 7.0.x) and 8.0.x.
    /// Unknown minor/patch (only the soname is visible) counts as supported.
    pub fn supported(&self) -> bool {
        match (self.major, self.rest.as_slice()) {
            (7, []) | (7, [0]) => true,
            (7, [0, patch, ..]) => *patch >= 3,
            (8, []) | (8, [0, ..]) => true,
            _ => false,
        }
    }
}

/// Find the library to load under `libdir`: the first existing candidate, or a
/// typed error saying what is there instead.
pub fn probe(libdir: &Path) -> Result<(PathBuf, VddkVersion), VddkError> {
    let cands = candidates(libdir);
    for (path, major) in &cands {
        if path.exists() {
            // The real file behind the soname link tells the point release.
            let version = std::fs::canonicalize(path)
                .ok()
                .and_then(|real| {
                    real.file_name()
                        .and_then(|n| n.to_str())
                        .and_then(VddkVersion::from_file_name)
                })
                .filter(|v| v.major == *major)
                .unwrap_or(VddkVersion {
                    major: *major,
                    rest: vec![],
                });
            if !version.supported() {
                return Err(VddkError::UnsupportedVersion {
                    version: version.to_string(),
                    path: path.clone(),
                });
            }
            return Ok((path.clone(), version));
        }
    }
    // Nothing loadable: is another version there?
    let mut others: Vec<(VddkVersion, PathBuf)> = [libdir.join("lib64"), libdir.to_path_buf()]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let v = VddkVersion::from_file_name(name.to_str()?)?;
            Some((v, e.path()))
        })
        .collect();
    others.sort_by(|a, b| (a.0.major, &a.0.rest).cmp(&(b.0.major, &b.0.rest)));
    if let Some((v, path)) = others.pop() {
        return Err(VddkError::UnsupportedVersion {
            version: v.to_string(),
            path,
        });
    }
    Err(VddkError::LibraryMissing {
        libdir: libdir.to_path_buf(),
        tried: cands.into_iter().map(|(p, _)| p).collect(),
    })
}

/// The resolved VDDK functions. Required ones are plain function pointers;
/// optional ones are `None` when the library does not export them.
#[derive(Clone, Copy)]
pub struct Api {
    /// `VixDiskLib_InitEx`.
    pub init_ex: ffi::InitExFn,
    /// `VixDiskLib_Exit`.
    pub exit: ffi::ExitFn,
    /// `VixDiskLib_PrepareForAccess`.
    pub prepare_for_access: ffi::AccessFn,
    /// `VixDiskLib_EndAccess`.
    pub end_access: ffi::AccessFn,
    /// `VixDiskLib_ConnectEx`.
    pub connect_ex: ffi::ConnectExFn,
    /// `VixDiskLib_Disconnect`.
    pub disconnect: ffi::DisconnectFn,
    /// `VixDiskLib_Cleanup`.
    pub cleanup: ffi::CleanupFn,
    /// `VixDiskLib_Open`.
    pub open: ffi::OpenFn,
    /// `VixDiskLib_Close`.
    pub close: ffi::HandleFn,
    /// `VixDiskLib_GetInfo`.
    pub get_info: ffi::GetInfoFn,
    /// `VixDiskLib_FreeInfo`.
    pub free_info: ffi::FreeInfoFn,
    /// `VixDiskLib_GetTransportMode`.
    pub get_transport_mode: ffi::GetTransportModeFn,
    /// `VixDiskLib_Read`.
    pub read: ffi::ReadFn,
    /// `VixDiskLib_Write`.
    pub write: ffi::WriteFn,
    /// `VixDiskLib_FreeConnectParams`.
    pub free_connect_params: ffi::FreeConnectParamsFn,
    /// `VixDiskLib_GetErrorText`.
    pub get_error_text: ffi::GetErrorTextFn,
    /// `VixDiskLib_FreeErrorText`.
    pub free_error_text: ffi::FreeErrorTextFn,
    /// `VixDiskLib_ReadAsync` (6.0+).
    pub read_async: Option<ffi::ReadAsyncFn>,
    /// `VixDiskLib_WriteAsync` (6.0+).
    pub write_async: Option<ffi::WriteAsyncFn>,
    /// `VixDiskLib_Wait` (6.5+).
    pub wait: Option<ffi::HandleFn>,
    /// `VixDiskLib_Flush`.
    pub flush: Option<ffi::HandleFn>,
    /// `VixDiskLib_QueryAllocatedBlocks` (6.7+).
    pub query_allocated_blocks: Option<ffi::QueryAllocatedBlocksFn>,
    /// `VixDiskLib_FreeBlockList` (6.7+).
    pub free_block_list: Option<ffi::FreeBlockListFn>,
    /// `VixDiskLib_AllocateConnectParams` (6.7+).
    pub allocate_connect_params: Option<ffi::AllocateConnectParamsFn>,
    /// `VixDiskLib_ListTransportModes`.
    pub list_transport_modes: Option<ffi::ListTransportModesFn>,
}

impl Api {
    /// Whether the asynchronous I/O calls (ReadAsync, WriteAsync and Wait) exist.
    pub fn has_async(&self) -> bool {
        self.read_async.is_some() && self.write_async.is_some() && self.wait.is_some()
    }
    /// Whether QueryAllocatedBlocks and FreeBlockList exist.
    pub fn has_query_allocated(&self) -> bool {
        self.query_allocated_blocks.is_some() && self.free_block_list.is_some()
    }
}

/// A loaded (not yet initialised) libvixDiskLib.
pub struct LoadedLibrary {
    /// Keeps the mapping alive; see [`Vddk`] for why it is never closed once
    /// initialised.
    _lib: libloading::os::unix::Library,
    /// The functions.
    pub api: Api,
    /// The file loaded.
    pub path: PathBuf,
    /// Its version.
    pub version: VddkVersion,
    /// The configured directory (VDDK's `libDir`).
    pub libdir: PathBuf,
}

/// Resolve `name` in `lib` as a `T`.
///
/// # Safety
/// `T` must be the function pointer type of `name` as VDDK declares it.
unsafe fn symbol<T: Copy>(lib: &libloading::os::unix::Library, name: &str) -> Option<T> {
    // SAFETY: the caller guarantees `T` is the symbol's type; copying the pointer
    // out is sound as long as the library stays loaded, which `LoadedLibrary`
    // (and `Vddk` after it) guarantees.
    unsafe { lib.get::<T>(name).ok().map(|s| *s) }
}

/// Probe `libdir`, `dlopen` the library found (`RTLD_NOW | RTLD_LOCAL`) and
/// resolve every symbol. Does not call into VDDK.
pub fn load_library(libdir: &Path) -> Result<LoadedLibrary, VddkError> {
    let (path, version) = probe(libdir)?;
    use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
    // SAFETY: loading runs the library's initialisers; libvixDiskLib's are VMware's
    // and expected to be sound. The file was chosen from the operator's configured
    // VDDK directory.
    let lib = unsafe { Library::open(Some(&path), RTLD_NOW | RTLD_LOCAL) }.map_err(|e| {
        VddkError::NotLoadable {
            path: path.clone(),
            reason: e.to_string(),
        }
    })?;
    macro_rules! req {
        ($name:literal, $ty:ty) => {
            // SAFETY: `$ty` is the signature of `$name` in vixDiskLib.h (see ffi.rs).
            match unsafe { symbol::<$ty>(&lib, $name) } {
                Some(f) => f,
                None => {
                    return Err(VddkError::MissingSymbol {
                        symbol: $name,
                        path: path.clone(),
                    })
                }
            }
        };
    }
    macro_rules! opt {
        ($name:literal, $ty:ty) => {
            // SAFETY: `$ty` is the signature of `$name` in vixDiskLib.h (see ffi.rs).
            unsafe { symbol::<$ty>(&lib, $name) }
        };
    }
    let api = Api {
        init_ex: req!("VixDiskLib_InitEx", ffi::InitExFn),
        exit: req!("VixDiskLib_Exit", ffi::ExitFn),
        prepare_for_access: req!("VixDiskLib_PrepareForAccess", ffi::AccessFn),
        end_access: req!("VixDiskLib_EndAccess", ffi::AccessFn),
        connect_ex: req!("VixDiskLib_ConnectEx", ffi::ConnectExFn),
        disconnect: req!("VixDiskLib_Disconnect", ffi::DisconnectFn),
        cleanup: req!("VixDiskLib_Cleanup", ffi::CleanupFn),
        open: req!("VixDiskLib_Open", ffi::OpenFn),
        close: req!("VixDiskLib_Close", ffi::HandleFn),
        get_info: req!("VixDiskLib_GetInfo", ffi::GetInfoFn),
        free_info: req!("VixDiskLib_FreeInfo", ffi::FreeInfoFn),
        get_transport_mode: req!("VixDiskLib_GetTransportMode", ffi::GetTransportModeFn),
        read: req!("VixDiskLib_Read", ffi::ReadFn),
        write: req!("VixDiskLib_Write", ffi::WriteFn),
        free_connect_params: req!("VixDiskLib_FreeConnectParams", ffi::FreeConnectParamsFn),
        get_error_text: req!("VixDiskLib_GetErrorText", ffi::GetErrorTextFn),
        free_error_text: req!("VixDiskLib_FreeErrorText", ffi::FreeErrorTextFn),
        read_async: opt!("VixDiskLib_ReadAsync", ffi::ReadAsyncFn),
        write_async: opt!("VixDiskLib_WriteAsync", ffi::WriteAsyncFn),
        wait: opt!("VixDiskLib_Wait", ffi::HandleFn),
        flush: opt!("VixDiskLib_Flush", ffi::HandleFn),
        query_allocated_blocks: opt!(
            "VixDiskLib_QueryAllocatedBlocks",
            ffi::QueryAllocatedBlocksFn
        ),
        free_block_list: opt!("VixDiskLib_FreeBlockList", ffi::FreeBlockListFn),
        allocate_connect_params: opt!(
            "VixDiskLib_AllocateConnectParams",
            ffi::AllocateConnectParamsFn
        ),
        list_transport_modes: opt!("VixDiskLib_ListTransportModes", ffi::ListTransportModesFn),
    };
    Ok(LoadedLibrary {
        _lib: lib,
        api,
        path,
        version,
        libdir: libdir.to_path_buf(),
    })
}

/// The API version ferry declares to `VixDiskLib_InitEx`.
///
/// The two numbers tell VDDK which API revision the caller was written against;
/// newer libraries keep serving older declared revisions. ferry declares **7.0**:
/// it is the oldest revision ferry supports (7.0.3) and the one whose layouts
/// ferry binds (the 64-byte `VixDiskLibInfo` with sector sizes appeared in 7.0),
/// it is not newer than any library ferry loads (an InitEx that declares a
/// revision newer than the library may be refused), and VMware's own Go binding
/// (`vmware/virtual-disks`) initialises with 7.0 too. nbdkit declares 6.5 for
/// compatibility with 6.x libraries, which ferry does not load.
pub const INIT_MAJOR: u32 = 7;
/// See [`INIT_MAJOR`].
pub const INIT_MINOR: u32 = 0;

/// Longest VDDK log line kept (longer ones are cut, never overrun).
const LOG_LINE_MAX: usize = 2048;

#[cfg(target_arch = "x86_64")]
extern "C" {
    /// C's `vsnprintf`. The `libc` crate does not declare the `va_list` family on
    /// Linux; on x86_64 SysV a `va_list` argument is passed as a pointer to its
    /// `__va_list_tag`, exactly what VDDK's callback received.
    fn vsnprintf(buf: *mut c_char, n: usize, fmt: *const c_char, ap: *mut c_void) -> c_int;
}

/// Format VDDK's `printf`-style message into a bounded buffer.
///
/// # Safety
/// `fmt` and `ap` must be the arguments VDDK passed to a log callback, used once.
unsafe fn format_message(fmt: *const c_char, ap: *mut c_void) -> String {
    if fmt.is_null() {
        return String::new();
    }
    #[cfg(target_arch = "x86_64")]
    {
        let mut buf = [0u8; LOG_LINE_MAX];
        // SAFETY: `buf` has LOG_LINE_MAX writable bytes and vsnprintf writes at most
        // that many including the NUL; fmt/ap are VDDK's, consumed once.
        let n = unsafe { vsnprintf(buf.as_mut_ptr().cast(), buf.len(), fmt, ap) };
        if n < 0 {
            return String::from("(unformattable VDDK message)");
        }
        let len = (n as usize).min(LOG_LINE_MAX - 1);
        let mut s = String::from_utf8_lossy(&buf[..len]).into_owned();
        if n as usize >= LOG_LINE_MAX {
            s.push_str("...");
        }
        s
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ap;
        // SAFETY: fmt is a NUL-terminated string from VDDK; bounded read.
        unsafe { bounded_c_string(fmt, LOG_LINE_MAX) }
    }
}

/// Copy a C string of at most `max` bytes (lossy UTF-8); empty for NULL.
///
/// # Safety
/// `p` is NULL or points to readable memory up to its NUL or `max` bytes.
pub(crate) unsafe fn bounded_c_string(p: *const c_char, max: usize) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: per the contract, strnlen reads at most `max` bytes of `p`.
    let len = unsafe { libc::strnlen(p, max) };
    // SAFETY: the first `len` bytes were just found readable.
    let bytes = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) };
    String::from_utf8_lossy(bytes).into_owned()
}

#[derive(Clone, Copy)]
enum LogLevel {
    Log,
    Warn,
    Panic,
}

/// VDDK 7+ noise that is not worth a warning.
fn is_noise(msg: &str) -> bool {
    msg.contains("Get CEIP status failed") || msg.contains("VDDK_PhoneHome:")
}

fn forward(level: LogLevel, fmt: *const c_char, ap: *mut c_void) {
    // Never unwind into C.
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: the arguments are VDDK's callback arguments, used once here.
        let msg = unsafe { format_message(fmt, ap) };
        let msg = msg.trim_end();
        if msg.is_empty() {
            return;
        }
        match level {
            LogLevel::Log => tracing::debug!(target: "ferry::vddk", "{msg}"),
            LogLevel::Warn | LogLevel::Panic if is_noise(msg) => {
                tracing::debug!(target: "ferry::vddk", "{msg}")
            }
            LogLevel::Warn => tracing::warn!(target: "ferry::vddk", "{msg}"),
            LogLevel::Panic => tracing::error!(target: "ferry::vddk", "VDDK panic: {msg}"),
        }
    });
}

unsafe extern "C" fn log_cb(fmt: *const c_char, ap: *mut c_void) {
    forward(LogLevel::Log, fmt, ap)
}
unsafe extern "C" fn warn_cb(fmt: *const c_char, ap: *mut c_void) {
    forward(LogLevel::Warn, fmt, ap)
}
unsafe extern "C" fn panic_cb(fmt: *const c_char, ap: *mut c_void) {
    forward(LogLevel::Panic, fmt, ap)
}

/// Which layer will carry disks, checked without loading the library: `native`
/// without a VDDK directory, else `vddk <version> (<library>)` or `vddk
/// unavailable: <why>`. For `GET /v1/info`, `plan` and `--dry-run`.
pub fn data_path(libdir: Option<&Path>) -> String {
    let Some(dir) = libdir else {
        return "native".into();
    };
    match probe(dir) {
        Ok((path, version)) => format!("vddk {version} ({})", path.display()),
        Err(e) => format!("vddk unavailable: {e}"),
    }
}

/// An initialised VDDK library.
///
/// `VixDiskLib_InitEx` runs once per loaded library ([`Vddk::init`]); every later
/// `init` with the same directory returns the same handle. A production agent
/// has one VDDK directory, so InitEx runs once per process as VMware requires;
/// ferry's simulator runs several proxies in one process, each with its own copy
/// of the library in its own directory (separate files are separate library
/// instances to the dynamic loader, as separate proxy VMs would be).
/// `VixDiskLib_Exit` runs only on [`Vddk::shutdown`] (agent stop), never
/// implicitly on drop: an Exit on "last user gone" would make the next job
/// fail. The library is never unloaded.
pub struct Vddk {
    lib: LoadedLibrary,
    /// Serialises ConnectEx, Disconnect, Open, Close, PrepareForAccess,
    /// EndAccess and Cleanup, as VMware's threading rules (and nbdkit) require.
    open_lock: Mutex<()>,
    exited: AtomicBool,
}

enum LibState {
    Ready(Arc<Vddk>),
    /// InitEx failed; kept loaded (it may have started threads), and the same
    /// error is returned to every later `init`.
    InitFailed(#[allow(dead_code)] Arc<Vddk>, u64, String),
    /// Exit ran; the handle is kept so the library is never unloaded.
    Exited(#[allow(dead_code)] Arc<Vddk>),
}

/// Every VDDK directory loaded in this process.
static PROCESS: Mutex<BTreeMap<PathBuf, LibState>> = Mutex::new(BTreeMap::new());

fn process_state() -> MutexGuard<'static, BTreeMap<PathBuf, LibState>> {
    PROCESS.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vddk {
    /// Load VDDK from `libdir` and initialise it (once per directory). `config_file`
    /// is VDDK's own configuration file (`tmpDirectory`, log levels, NFC timeouts).
    /// A second call with the same `libdir` returns the same handle.
    pub fn init(libdir: &Path, config_file: Option<&Path>) -> Result<Arc<Vddk>, VddkError> {
        let mut state = process_state();
        match state.get(libdir) {
            Some(LibState::Ready(v)) => return Ok(v.clone()),
            Some(LibState::InitFailed(_, code, text)) => {
                return Err(VddkError::Init {
                    code: *code,
                    text: text.clone(),
                })
            }
            Some(LibState::Exited(_)) => return Err(VddkError::ShutDown),
            None => {}
        }
        let lib = load_library(libdir)?;
        warn_if_not_on_library_path(&lib.path);
        let c_libdir = path_cstring(libdir)?;
        let c_config = config_file.map(path_cstring).transpose()?;
        // SAFETY: InitEx with our static callbacks (valid for the whole process),
        // NUL-terminated strings that outlive the call, and NULL for no config file.
        let code = unsafe {
            (lib.api.init_ex)(
                INIT_MAJOR,
                INIT_MINOR,
                Some(log_cb),
                Some(warn_cb),
                Some(panic_cb),
                c_libdir.as_ptr(),
                c_config.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        };
        let vddk = Arc::new(Vddk {
            lib,
            open_lock: Mutex::new(()),
            exited: AtomicBool::new(false),
        });
        if code != ffi::VIX_OK {
            let text = vddk.error_text(code);
            // Keep the library loaded: InitEx may have started threads.
            vddk.exited.store(true, Ordering::SeqCst);
            state.insert(
                libdir.to_path_buf(),
                LibState::InitFailed(vddk, code, text.clone()),
            );
            return Err(VddkError::Init { code, text });
        }
        tracing::info!(
            library = %vddk.lib.path.display(),
            version = %vddk.lib.version,
            async_io = vddk.lib.api.has_async(),
            query_allocated = vddk.lib.api.has_query_allocated(),
            "VDDK initialised"
        );
        state.insert(libdir.to_path_buf(), LibState::Ready(vddk.clone()));
        Ok(vddk)
    }

    /// The initialised handle of `libdir`, if [`Vddk::init`] succeeded and no
    /// shutdown ran.
    pub fn get(libdir: &Path) -> Option<Arc<Vddk>> {
        match process_state().get(libdir) {
            Some(LibState::Ready(v)) => Some(v.clone()),
            _ => None,
        }
    }

    /// Call `VixDiskLib_Exit` on every initialised library (agent stop).
    /// Refused while connections or access guards still hold a handle.
    /// Afterwards VDDK cannot be used again in this process. A no-op when VDDK
    /// was never initialised.
    pub fn shutdown() -> Result<(), VddkError> {
        let mut state = process_state();
        let ready: Vec<(PathBuf, Arc<Vddk>)> = state
            .iter()
            .filter_map(|(d, s)| match s {
                LibState::Ready(v) => Some((d.clone(), v.clone())),
                _ => None,
            })
            .collect();
        // The state's Arc and ours.
        let users: usize = ready
            .iter()
            .map(|(_, v)| Arc::strong_count(v).saturating_sub(2))
            .sum();
        if users > 0 {
            return Err(VddkError::InvalidArgument(format!(
                "VDDK is still used by {users} connection(s) or handle(s); close them before shutdown"
            )));
        }
        for (dir, vddk) in ready {
            vddk.exited.store(true, Ordering::SeqCst);
            {
                let _g = vddk.lock();
                // SAFETY: InitEx succeeded and nothing else holds the handle.
                unsafe { (vddk.lib.api.exit)() };
            }
            tracing::info!(libdir = %dir.display(), "VDDK shut down (VixDiskLib_Exit)");
            state.insert(dir, LibState::Exited(vddk));
        }
        Ok(())
    }

    /// The resolved functions.
    pub fn api(&self) -> &Api {
        &self.lib.api
    }
    /// The library file loaded.
    pub fn library_path(&self) -> &Path {
        &self.lib.path
    }
    /// The configured VDDK directory.
    pub fn libdir(&self) -> &Path {
        &self.lib.libdir
    }
    /// The version loaded.
    pub fn version(&self) -> &VddkVersion {
        &self.lib.version
    }

    /// VDDK's list of the transport modes it knows (`"file:san:hotadd:nbd"`), when
    /// it exports `VixDiskLib_ListTransportModes`. Informational only: ferry never
    /// hands VDDK a list.
    pub fn transport_modes(&self) -> Option<String> {
        let f = self.lib.api.list_transport_modes?;
        // SAFETY: returns a static string owned by the library (or NULL).
        let p = unsafe { f() };
        // SAFETY: NULL or a NUL-terminated static string; the read is bounded.
        Some(unsafe { bounded_c_string(p, 256) })
    }

    /// VDDK's text for `code` (`GetErrorText`, freed with `FreeErrorText`).
    pub fn error_text(&self, code: ffi::VixError) -> String {
        // SAFETY: locale must be NULL; the result is NULL or a library heap string.
        let p = unsafe { (self.lib.api.get_error_text)(code, std::ptr::null()) };
        if p.is_null() {
            return format!("no text from VDDK for error {}", ffi::vix_error_code(code));
        }
        // SAFETY: non-NULL NUL-terminated string from GetErrorText, read bounded.
        let text = unsafe { bounded_c_string(p, 4096) };
        // SAFETY: `p` came from GetErrorText and is freed exactly once.
        unsafe { (self.lib.api.free_error_text)(p) };
        text.trim().to_string()
    }

    /// `Err(Vix{call, code, text})` unless `code` is `VIX_OK`.
    pub(crate) fn check(&self, call: &'static str, code: ffi::VixError) -> Result<(), VddkError> {
        if code == ffi::VIX_OK {
            Ok(())
        } else {
            Err(self.vix(call, code))
        }
    }

    /// The typed error for a failed `call`.
    pub(crate) fn vix(&self, call: &'static str, code: ffi::VixError) -> VddkError {
        VddkError::Vix {
            call,
            code,
            text: self.error_text(code),
        }
    }

    /// Take the global open/close lock; refused after shutdown.
    pub(crate) fn lock(&self) -> MutexGuard<'_, ()> {
        self.open_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Err(ShutDown)` once Exit ran.
    pub(crate) fn ensure_live(&self) -> Result<(), VddkError> {
        if self.exited.load(Ordering::SeqCst) {
            Err(VddkError::ShutDown)
        } else {
            Ok(())
        }
    }
}

fn path_cstring(p: &Path) -> Result<CString, VddkError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        VddkError::InvalidArgument(format!("path {} contains a NUL byte", p.display()))
    })
}

/// VDDK loads its own bundled libraries (OpenSSL, libstdc++, plugins) by name:
/// their directory must be on the agent's `LD_LIBRARY_PATH` (and only the
/// agent's: never the system library path). Warn when it is not.
fn warn_if_not_on_library_path(lib: &Path) {
    let Some(dir) = lib.parent() else { return };
    let on_path = std::env::var_os("LD_LIBRARY_PATH").is_some_and(|v| {
        std::env::split_paths(&v)
            .any(|p| p == dir || std::fs::canonicalize(&p).ok() == std::fs::canonicalize(dir).ok())
    });
    if !on_path {
        tracing::warn!(
            dir = %dir.display(),
            "VDDK's directory is not on LD_LIBRARY_PATH; VDDK may fail to load its own \
             libraries (set LD_LIBRARY_PATH for the agent only, see docs/vddk.md)"
        );
    }
}

/// A C string for a message argument to VDDK, refusing interior NULs.
pub(crate) fn cstring(what: &str, s: &str) -> Result<CString, VddkError> {
    CString::new(s).map_err(|_| VddkError::InvalidArgument(format!("{what} contains a NUL byte")))
}

/// Read a C string VDDK returned (static storage), bounded.
///
/// # Safety
/// As [`bounded_c_string`].
pub(crate) unsafe fn static_str(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        // SAFETY: forwarded contract.
        Some(unsafe { bounded_c_string(p, 256) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names_parse() {
        let v = VddkVersion::from_file_name("libvixDiskLib.so.8.0.3").unwrap();
        assert_eq!(v.major, 8);
        assert_eq!(v.rest, vec![0, 3]);
        assert_eq!(v.to_string(), "8.0.3");
        assert_eq!(
            VddkVersion::from_file_name("libvixDiskLib.so.7")
                .unwrap()
                .major,
            7
        );
        assert!(VddkVersion::from_file_name("libvixDiskLib.so").is_none());
        assert!(VddkVersion::from_file_name("libvixDiskLib.so.x").is_none());
        assert!(VddkVersion::from_file_name("libz.so.1").is_none());
    }

    #[test]
    fn version_policy() {
        let v = |s: &str| VddkVersion::from_file_name(&format!("libvixDiskLib.so.{s}")).unwrap();
        for ok in ["7", "7.0", "7.0.3", "7.0.3.1", "8", "8.0", "8.0.0", "8.0.2"] {
            assert!(v(ok).supported(), "{ok}");
        }
        for bad in [
            "6", "6.7.0", "7.0.2", "7.0.0", "7.1.0", "8.1.0", "9", "9.0.0",
        ] {
            assert!(!v(bad).supported(), "{bad}");
        }
    }

    #[test]
    fn candidates_are_probed_newest_first_lib64_first() {
        let c = candidates(Path::new("/opt/vddk"));
        let names: Vec<String> = c.iter().map(|(p, _)| p.display().to_string()).collect();
        assert_eq!(
            names,
            [
                "/opt/vddk/lib64/libvixDiskLib.so.8",
                "/opt/vddk/libvixDiskLib.so.8",
                "/opt/vddk/lib64/libvixDiskLib.so.7",
                "/opt/vddk/libvixDiskLib.so.7",
            ]
        );
    }

    #[test]
    fn a_missing_directory_names_what_was_tried() {
        let d = tempfile::tempdir().unwrap();
        let libdir = d.path().join("nope");
        let e = load_library(&libdir).err().unwrap();
        assert!(matches!(e, VddkError::LibraryMissing { ref tried, .. } if tried.len() == 4));
        let msg = e.to_string();
        assert!(msg.contains("lib64/libvixDiskLib.so.8"), "{msg}");
        assert!(msg.contains("--vddk-libdir"), "{msg}");
    }

    #[test]
    fn an_old_or_new_vddk_alone_is_an_unsupported_version() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("lib64")).unwrap();
        std::fs::write(d.path().join("lib64/libvixDiskLib.so.6"), b"x").unwrap();
        let e = load_library(d.path()).err().unwrap();
        assert!(matches!(e, VddkError::UnsupportedVersion { ref version, .. } if version == "6"));
        assert!(
            e.to_string().contains("ferry supports 7.0.3 and 8.0.x"),
            "{e}"
        );

        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("libvixDiskLib.so.9.0.0.0"), b"x").unwrap();
        std::os::unix::fs::symlink(
            "libvixDiskLib.so.9.0.0.0",
            d.path().join("libvixDiskLib.so.9"),
        )
        .unwrap();
        let e = load_library(d.path()).err().unwrap();
        assert!(e.to_string().contains("unsupported VDDK version 9"), "{e}");
    }

    #[test]
    fn a_soname_link_to_an_old_point_release_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("libvixDiskLib.so.7.0.1"), b"x").unwrap();
        std::os::unix::fs::symlink(
            "libvixDiskLib.so.7.0.1",
            d.path().join("libvixDiskLib.so.7"),
        )
        .unwrap();
        let e = load_library(d.path()).err().unwrap();
        assert!(
            e.to_string().contains("unsupported VDDK version 7.0.1"),
            "{e}"
        );
        // A 9.x library renamed .so.8 shows itself through the real file name.
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("lib64")).unwrap();
        std::fs::write(d.path().join("lib64/libvixDiskLib.so.9.0.0"), b"x").unwrap();
        std::os::unix::fs::symlink(
            "libvixDiskLib.so.9.0.0",
            d.path().join("lib64/libvixDiskLib.so.8"),
        )
        .unwrap();
        // Real name major (9) differs from the soname (8): the soname counts.
        let (p, v) = probe(d.path()).unwrap();
        assert_eq!(v.major, 8);
        assert!(p.ends_with("lib64/libvixDiskLib.so.8"));
    }

    #[test]
    fn a_file_that_is_not_a_library_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("lib64")).unwrap();
        std::fs::write(
            d.path().join("lib64/libvixDiskLib.so.8"),
            b"not an ELF file",
        )
        .unwrap();
        let e = load_library(d.path()).err().unwrap();
        assert!(matches!(e, VddkError::NotLoadable { .. }), "{e}");
        assert!(e.to_string().contains("cannot load"), "{e}");
    }

    /// Any shared library of the system, e.g. libz.
    fn some_system_library() -> Option<PathBuf> {
        [
            "/lib/x86_64-linux-gnu/libz.so.1",
            "/usr/lib/x86_64-linux-gnu/libz.so.1",
            "/lib64/libz.so.1",
            "/usr/lib64/libz.so.1",
            "/lib/x86_64-linux-gnu/libm.so.6",
            "/usr/lib/x86_64-linux-gnu/libm.so.6",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    }

    #[test]
    fn a_real_library_without_vddk_symbols_names_the_missing_symbol() {
        let Some(sys) = some_system_library() else {
            eprintln!("no system shared library found; skipped");
            return;
        };
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("lib64")).unwrap();
        let target = d.path().join("lib64/libvixDiskLib.so.8");
        std::fs::copy(&sys, &target).unwrap();
        let e = load_library(d.path()).err().unwrap();
        match &e {
            VddkError::MissingSymbol { symbol, path } => {
                assert_eq!(*symbol, "VixDiskLib_InitEx");
                assert_eq!(path, &target);
            }
            other => panic!("{other}"),
        }
        assert!(
            e.to_string().contains("does not export VixDiskLib_InitEx"),
            "{e}"
        );
    }

    #[test]
    fn log_messages_are_formatted_within_bounds() {
        assert!(is_noise("Get CEIP status failed: x"));
        assert!(!is_noise("NBD_ClientOpen: attempting to create connection"));
        // SAFETY: NULL pointer is handled before any read.
        assert_eq!(unsafe { bounded_c_string(std::ptr::null(), 10) }, "");
        let s = CString::new("abcdef").unwrap();
        // SAFETY: a valid C string, bounded read.
        assert_eq!(unsafe { bounded_c_string(s.as_ptr(), 3) }, "abc");
    }
}
