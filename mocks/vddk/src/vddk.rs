//! The mock VDDK's behaviour behind the C entry points: library state (InitEx config,
//! call log), connections, disk handles, transports, and the translation of every
//! outcome into a VDDK error code.
//!
//! - `hotadd`: the mock vCenter attaches the snapshot disk to the proxy VM (its real
//!   ReconfigVM rules) and answers the device entry; reads and writes go to that
//!   local file (fast). Close detaches.
//! - `nbdssl` / `nbd`: reads and writes are HTTPS range requests to `/mockvddk/`.
//!
//! Owns no C types beyond the error codes: pointers are turned into Rust values in
//! `lib.rs`. Nothing here may panic on caller input or on what the server answers;
//! every failure is a [`Failure`] with a VDDK code and a message (the message is kept
//! for `VixDiskLib_GetErrorText`).

use crate::client::{Answer, ClientError, Https};
use crate::types::{code, Block, SECTOR_SIZE};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

/// A failed call: VDDK error code and what happened.
#[derive(Debug, Clone)]
pub struct Failure {
    /// VDDK error code.
    pub code: u64,
    /// Message.
    pub msg: String,
}

/// Result of the mock's operations.
pub type R<T> = Result<T, Failure>;

/// A failure with `code` and `msg`; the message is remembered for GetErrorText.
pub fn fail(code: u64, msg: impl Into<String>) -> Failure {
    let msg = msg.into();
    lock(&DETAILS).insert(code & 0xFFFF, msg.clone());
    Failure { code, msg }
}

/// The last message recorded for an error code.
pub fn detail(err: u64) -> Option<String> {
    lock(&DETAILS).get(&(err & 0xFFFF)).cloned()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What InitEx read from its config file.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// `mock.proxyVmMoref`: the proxy VM this "process" runs in (hot-add target).
    pub proxy_vm: Option<String>,
    /// `mock.callLog`: JSON-lines call log.
    pub call_log: Option<PathBuf>,
}

static INIT: Mutex<Option<Config>> = Mutex::new(None);
static CALL_LOG: Mutex<Option<File>> = Mutex::new(None);
static DETAILS: LazyLock<Mutex<HashMap<u64, String>>> = LazyLock::new(Default::default);
static CONNS: LazyLock<Mutex<HashMap<usize, Arc<Conn>>>> = LazyLock::new(Default::default);
static DISKS: LazyLock<Mutex<HashMap<usize, Arc<DiskH>>>> = LazyLock::new(Default::default);
static NEXT: AtomicUsize = AtomicUsize::new(0x1000);

fn next_id() -> usize {
    NEXT.fetch_add(16, Ordering::SeqCst)
}

/// Append one line to the call log (when configured).
pub fn log_call(func: &str, mut fields: Value, result: u64) {
    let mut g = lock(&CALL_LOG);
    let Some(f) = g.as_mut() else { return };
    if !fields.is_object() {
        fields = json!({});
    }
    fields["fn"] = json!(func);
    fields["result"] = json!(result & 0xFFFF);
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    fields["ts_ms"] = json!(ms);
    let _ = writeln!(f, "{fields}");
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(v)
}

/// Parse a VDDK config file (`key = value` or `key = "value"`, `#` comments).
pub fn parse_config(text: &str) -> Config {
    let mut c = Config::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v = unquote(v).to_string();
        match k.trim() {
            "mock.proxyVmMoref" if !v.is_empty() => c.proxy_vm = Some(v),
            "mock.callLog" if !v.is_empty() => c.call_log = Some(PathBuf::from(v)),
            _ => {}
        }
    }
    c
}

/// VixDiskLib_InitEx.
pub fn init(major: u32, config_file: Option<String>) -> R<()> {
    if major > 8 {
        return Err(fail(
            code::VIX_E_NOT_SUPPORTED,
            format!("the mock VDDK implements the VDDK 8 API; version {major} was requested"),
        ));
    }
    let cfg = match &config_file {
        None => Config::default(),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| fail(code::VIX_E_FILE_NOT_FOUND, format!("config file {p}: {e}")))?;
            parse_config(&text)
        }
    };
    let log = match &cfg.call_log {
        None => None,
        Some(p) => Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| {
                    fail(
                        code::VIX_E_FILE_ERROR,
                        format!("call log {}: {e}", p.display()),
                    )
                })?,
        ),
    };
    *lock(&CALL_LOG) = log;
    *lock(&INIT) = Some(cfg);
    Ok(())
}

/// VixDiskLib_Exit: forget the configuration (the call log is closed after this
/// call has been logged).
pub fn exit() {
    *lock(&INIT) = None;
}

/// Close the call log (after Exit was logged).
pub fn close_call_log() {
    *lock(&CALL_LOG) = None;
}

fn config() -> R<Config> {
    lock(&INIT).clone().ok_or_else(|| {
        fail(
            code::VIX_E_DISK_NOINIT,
            "The disk library has not been initialized (call VixDiskLib_InitEx first)",
        )
    })
}

/// The parts of VixDiskLibConnectParams the mock uses, copied out of the caller's
/// memory during the call.
#[derive(Clone, Debug, Default)]
pub struct Params {
    /// `vmxSpec`.
    pub vmx_spec: Option<String>,
    /// `serverName`.
    pub server: Option<String>,
    /// `thumbPrint`.
    pub thumbprint: Option<String>,
    /// `credType`.
    pub cred_type: i32,
    /// `creds.sessionId.cookie` (credType SESSIONID).
    pub cookie: Option<String>,
    /// `port` (0 = 443).
    pub port: u32,
}

impl Params {
    fn server(&self) -> R<(String, u16)> {
        let s = self
            .server
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| fail(code::VIX_E_INVALID_ARG, "connectParams.serverName is NULL"))?;
        let port = match self.port {
            0 => 443,
            p => u16::try_from(p).map_err(|_| {
                fail(
                    code::VIX_E_INVALID_ARG,
                    format!("port {p} is not a TCP port"),
                )
            })?,
        };
        Ok((s, port))
    }

    fn cookie(&self) -> R<String> {
        if self.cred_type != crate::types::CRED_SESSIONID {
            return Err(fail(
                code::VIX_E_NOT_SUPPORTED,
                format!(
                    "credType {} is not supported by the mock VDDK: use VIXDISKLIB_CRED_SESSIONID with the vmware_soap_session cookie",
                    self.cred_type
                ),
            ));
        }
        self.cookie
            .clone()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| fail(code::VIX_E_INVALID_ARG, "creds.sessionId.cookie is NULL"))
    }

    fn vm(&self) -> R<String> {
        let spec = self.vmx_spec.clone().ok_or_else(|| {
            fail(
                code::VIX_E_NOT_SUPPORTED,
                "vmxSpec is NULL: the mock VDDK has no local disks (use vmxSpec = \"moref=vm-N\")",
            )
        })?;
        spec.split('&')
            .find_map(|p| p.strip_prefix("moref="))
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .ok_or_else(|| {
                fail(
                    code::VIX_E_VM_NOT_FOUND,
                    format!("vmxSpec {spec:?} names no VM (expected \"moref=vm-N\")"),
                )
            })
    }
}

fn connect_err(e: ClientError) -> Failure {
    match e {
        ClientError::Connect(m) => fail(code::VIX_E_CANNOT_CONNECT_TO_HOST, m),
        ClientError::Lost(m) => fail(code::VIX_E_HOST_TCP_CONN_LOST, m),
        ClientError::Protocol(m) => fail(code::VIX_E_FAIL, m),
    }
}

/// An answer's body as `Ok`, or its `{"vix", "error"}` as a failure.
fn answer(a: Answer) -> R<Vec<u8>> {
    if (200..300).contains(&a.status) {
        return Ok(a.body);
    }
    let v: Value = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
    let c = v["vix"].as_u64().unwrap_or(code::VIX_E_FAIL);
    let m = v["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("HTTP {} from the mock vCenter", a.status));
    Err(fail(c, m))
}

fn json_call(h: &mut Https, method: &str, path: &str, body: &Value) -> R<Value> {
    let a = h
        .request(
            method,
            path,
            Some("application/json"),
            body.to_string().as_bytes(),
        )
        .map_err(connect_err)?;
    let b = answer(a)?;
    if b.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&b).map_err(|e| fail(code::VIX_E_FAIL, format!("bad answer: {e}")))
}

/// A connection (VixDiskLib_ConnectEx).
pub struct Conn {
    params: Params,
    snapshot: Option<String>,
    modes: Vec<String>,
    read_only: bool,
}

/// VixDiskLib_ConnectEx: checks the session is live; modes and snapshot are
/// checked at Open, as VDDK does.
pub fn connect(
    params: Params,
    read_only: bool,
    snapshot: Option<String>,
    modes: Option<String>,
) -> R<usize> {
    config()?;
    let (server, port) = params.server()?;
    let cookie = params.cookie()?;
    params.vm()?;
    let mut h = Https::connect(&server, port, Some(&cookie)).map_err(connect_err)?;
    json_call(&mut h, "POST", "/mockvddk/session", &json!({}))?;
    let modes: Vec<String> = modes
        .unwrap_or_else(|| "file:san:hotadd:nbdssl:nbd".into())
        .split(':')
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .collect();
    if modes.is_empty() {
        return Err(fail(code::VIX_E_INVALID_ARG, "transportModes is empty"));
    }
    let id = next_id();
    lock(&CONNS).insert(
        id,
        Arc::new(Conn {
            params,
            snapshot,
            modes,
            read_only,
        }),
    );
    Ok(id)
}

/// VixDiskLib_Disconnect.
pub fn disconnect(id: usize) -> R<()> {
    lock(&CONNS).remove(&id).map(|_| ()).ok_or_else(|| {
        fail(
            code::VIX_E_DISK_INVALID_CONNECTION,
            "unknown connection handle",
        )
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum IoMode {
    None,
    Sync,
    Async,
}

#[derive(Default)]
struct LocalFault {
    read_error_at: Option<u64>,
    die_after: Option<u64>,
    delay_ms: u64,
}

/// An open disk (VixDiskLib_Open).
pub struct DiskH {
    server: String,
    port: u16,
    cookie: String,
    handle: String,
    mode: &'static CStr,
    /// Disk path given to Open.
    pub path: String,
    /// VM moref.
    pub vm: String,
    /// Snapshot moref.
    pub snapshot: Option<String>,
    capacity: u64,
    read_only: bool,
    uuid: String,
    device: Option<File>,
    http: Mutex<Option<Https>>,
    dead: AtomicBool,
    io: Mutex<IoMode>,
    fault: Mutex<LocalFault>,
    served: AtomicU64,
}

fn static_mode(m: &str) -> &'static CStr {
    match m {
        "hotadd" => c"hotadd",
        "nbdssl" => c"nbdssl",
        "nbd" => c"nbd",
        "san" => c"san",
        _ => c"file",
    }
}

/// VixDiskLib_Open: `path` with the connection's single (or colon-separated, tried
/// in order) transport.
pub fn open(conn: usize, path: &str, flags: u32) -> R<usize> {
    let cfg = config()?;
    let c = lock(&CONNS).get(&conn).cloned().ok_or_else(|| {
        fail(
            code::VIX_E_DISK_INVALID_CONNECTION,
            "unknown connection handle",
        )
    })?;
    let (server, port) = c.params.server()?;
    let cookie = c.params.cookie()?;
    let vm = c.params.vm()?;
    let mut h = Https::connect(&server, port, Some(&cookie)).map_err(connect_err)?;
    let expected = c.params.thumbprint.clone().unwrap_or_default();
    if !expected.trim().eq_ignore_ascii_case(&h.thumbprint) {
        return Err(fail(
            code::VIX_E_FAIL,
            format!(
                "SSL thumbprint mismatch for {server}:{port}: expected {:?}, the server presented {}",
                expected, h.thumbprint
            ),
        ));
    }
    let read_only = c.read_only || flags & crate::types::FLAG_OPEN_READ_ONLY != 0;
    let mut last = fail(code::VIX_E_FAIL, "no transport mode");
    for mode in &c.modes {
        let body = json!({
            "vm": vm,
            "snapshot": c.snapshot,
            "path": path,
            "mode": mode,
            "read_only": read_only,
            "proxy_vm": cfg.proxy_vm,
        });
        let v = match json_call(&mut h, "POST", "/mockvddk/open", &body) {
            Ok(v) => v,
            Err(e) => {
                last = e;
                continue;
            }
        };
        let handle = v["handle"].as_str().unwrap_or_default().to_string();
        let ro = v["read_only"].as_bool().unwrap_or(true);
        let mut fault = LocalFault::default();
        let device = match v["device"].as_str() {
            None => None,
            Some(dev) => {
                let f = &v["fault"];
                fault.read_error_at = f["read_error_at"].as_u64();
                fault.die_after = f["die_after"].as_u64();
                fault.delay_ms = f["delay_ms"].as_u64().unwrap_or(0);
                match OpenOptions::new().read(true).write(!ro).open(dev) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        let _ = json_call(
                            &mut h,
                            "POST",
                            "/mockvddk/close",
                            &json!({"handle": handle}),
                        );
                        return Err(fail(
                            code::VIX_E_FILE_ACCESS_ERROR,
                            format!("hot-added device {dev} of {path}: {e}"),
                        ));
                    }
                }
            }
        };
        let d = DiskH {
            server: server.clone(),
            port,
            cookie: cookie.clone(),
            handle,
            mode: static_mode(v["mode"].as_str().unwrap_or(mode.as_str())),
            path: path.to_string(),
            vm: vm.clone(),
            snapshot: c.snapshot.clone(),
            capacity: v["capacity"].as_u64().unwrap_or(0),
            read_only: ro,
            uuid: v["uuid"].as_str().unwrap_or_default().to_string(),
            device,
            http: Mutex::new(Some(h)),
            dead: AtomicBool::new(false),
            io: Mutex::new(IoMode::None),
            fault: Mutex::new(fault),
            served: AtomicU64::new(0),
        };
        let id = next_id();
        lock(&DISKS).insert(id, Arc::new(d));
        return Ok(id);
    }
    Err(last)
}

/// The open disk behind a handle.
pub fn disk(id: usize) -> R<Arc<DiskH>> {
    lock(&DISKS).get(&id).cloned().ok_or_else(|| {
        fail(
            code::VIX_E_INVALID_HANDLE,
            "The handle is not a valid disk handle",
        )
    })
}

impl DiskH {
    /// The transport this disk was opened with (static string).
    pub fn mode(&self) -> &'static CStr {
        self.mode
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Backing UUID.
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// A request on the handle's connection; a broken connection marks the handle
    /// dead (`VIX_E_HOST_TCP_CONN_LOST`) unless `reconnect` (control calls).
    fn request(
        &self,
        method: &str,
        path: &str,
        ctype: Option<&str>,
        body: &[u8],
        reconnect: bool,
    ) -> R<Vec<u8>> {
        let mut g = lock(&self.http);
        if g.is_none() || self.dead.load(Ordering::SeqCst) {
            if !reconnect {
                return Err(fail(
                    code::VIX_E_HOST_TCP_CONN_LOST,
                    format!("the connection carrying {} was lost", self.path),
                ));
            }
            *g = Some(
                Https::connect(&self.server, self.port, Some(&self.cookie)).map_err(connect_err)?,
            );
        }
        let Some(h) = g.as_mut() else {
            return Err(fail(code::VIX_E_FAIL, "no connection"));
        };
        match h.request(method, path, ctype, body) {
            Ok(a) => answer(a),
            Err(e) => {
                *g = None;
                if !reconnect {
                    self.dead.store(true, Ordering::SeqCst);
                }
                Err(match e {
                    ClientError::Lost(m) => fail(
                        code::VIX_E_HOST_TCP_CONN_LOST,
                        format!("the connection carrying {} was lost: {m}", self.path),
                    ),
                    other => connect_err(other),
                })
            }
        }
    }

    fn set_io(&self, asynchronous: bool) -> R<()> {
        let want = if asynchronous {
            IoMode::Async
        } else {
            IoMode::Sync
        };
        let mut g = lock(&self.io);
        if *g != IoMode::None && *g != want {
            return Err(fail(
                code::VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED,
                "Synchronous and asynchronous I/O on the same disk handle is not allowed",
            ));
        }
        *g = want;
        Ok(())
    }

    fn range(&self, start: u64, sectors: u64) -> R<(u64, u64)> {
        let off = start.checked_mul(SECTOR_SIZE);
        let len = sectors.checked_mul(SECTOR_SIZE);
        match (off, len) {
            (Some(o), Some(l)) if o.checked_add(l).is_some_and(|e| e <= self.capacity) => Ok((o, l)),
            _ => Err(fail(
                code::VIX_E_DISK_OUTOFRANGE,
                format!(
                    "You have requested access to an area of the virtual disk that is out of bounds: sectors {start}+{sectors}, capacity {} sectors",
                    self.capacity / SECTOR_SIZE
                ),
            )),
        }
    }

    /// Read `buf.len()` bytes at sector `start` (buffer length = sectors * 512).
    pub fn read(&self, start: u64, buf: &mut [u8], asynchronous: bool) -> R<()> {
        self.set_io(asynchronous)?;
        let (off, len) = self.range(start, buf.len() as u64 / SECTOR_SIZE)?;
        if len == 0 {
            return Ok(());
        }
        match &self.device {
            Some(f) => self.read_device(f, off, buf),
            None => self.read_net(off, buf),
        }
    }

    fn read_device(&self, f: &File, off: u64, buf: &mut [u8]) -> R<()> {
        let (delay, err_at, die) = {
            let mut lf = lock(&self.fault);
            let served = self.served.load(Ordering::SeqCst);
            let die = lf.die_after.is_some_and(|n| served + buf.len() as u64 > n);
            if die {
                lf.die_after = None;
            }
            (lf.delay_ms, lf.read_error_at, die)
        };
        if self.dead.load(Ordering::SeqCst) {
            return Err(fail(
                code::VIX_E_HOST_TCP_CONN_LOST,
                format!("the device of {} is gone", self.path),
            ));
        }
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        if die {
            self.dead.store(true, Ordering::SeqCst);
            return Err(fail(
                code::VIX_E_HOST_TCP_CONN_LOST,
                format!(
                    "the hot-added device of {} went away mid-disk (fault injection)",
                    self.path
                ),
            ));
        }
        if err_at.is_some_and(|a| a >= off && a < off + buf.len() as u64) {
            return Err(fail(
                code::VIX_E_FILE_ERROR,
                format!(
                    "A file error was encountered: injected read error at byte {off} of {}",
                    self.path
                ),
            ));
        }
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(fail(
                        code::VIX_E_FILE_ERROR,
                        format!("reading the hot-added device of {}: {e}", self.path),
                    ))
                }
            }
        }
        self.served.fetch_add(buf.len() as u64, Ordering::SeqCst);
        Ok(())
    }

    fn read_net(&self, off: u64, buf: &mut [u8]) -> R<()> {
        const STEP: usize = 4 << 20;
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(STEP);
            let at = off + done as u64;
            let q = format!("/mockvddk/read?handle={}&offset={at}&len={n}", self.handle);
            let b = self.request("GET", &q, None, &[], false)?;
            if b.len() != n {
                return Err(fail(
                    code::VIX_E_FAIL,
                    format!("short read: {} of {n} bytes", b.len()),
                ));
            }
            buf[done..done + n].copy_from_slice(&b);
            done += n;
        }
        Ok(())
    }

    /// Write `data` (sectors * 512 bytes) at sector `start`.
    pub fn write(&self, start: u64, data: &[u8], asynchronous: bool) -> R<()> {
        self.set_io(asynchronous)?;
        if self.read_only {
            return Err(fail(
                code::VIX_E_FILE_READ_ONLY,
                format!(
                    "The file is write-protected: {} was opened read-only",
                    self.path
                ),
            ));
        }
        let (off, len) = self.range(start, data.len() as u64 / SECTOR_SIZE)?;
        if len == 0 {
            return Ok(());
        }
        if let Some(f) = &self.device {
            return f.write_all_at(data, off).map_err(|e| {
                fail(
                    code::VIX_E_FILE_ERROR,
                    format!("writing the hot-added device of {}: {e}", self.path),
                )
            });
        }
        const STEP: usize = 4 << 20;
        let mut done = 0;
        while done < data.len() {
            let n = (data.len() - done).min(STEP);
            let q = format!(
                "/mockvddk/write?handle={}&offset={}",
                self.handle,
                off + done as u64
            );
            self.request(
                "POST",
                &q,
                Some("application/octet-stream"),
                &data[done..done + n],
                false,
            )?;
            done += n;
        }
        Ok(())
    }

    /// VixDiskLib_Flush.
    pub fn flush(&self) -> R<()> {
        if let (Some(f), false) = (&self.device, self.read_only) {
            f.sync_data().map_err(|e| {
                fail(
                    code::VIX_E_FILE_ERROR,
                    format!("flushing {}: {e}", self.path),
                )
            })?;
        }
        Ok(())
    }

    /// VixDiskLib_QueryAllocatedBlocks (arguments in sectors, checked per §3.1).
    pub fn allocated(&self, start: u64, sectors: u64, chunk: u64) -> R<Vec<Block>> {
        use crate::types::{MAX_CHUNK_NUMBER, MIN_CHUNK_SIZE};
        if chunk < MIN_CHUNK_SIZE
            || !start.is_multiple_of(chunk)
            || !sectors.is_multiple_of(chunk)
            || sectors / chunk > MAX_CHUNK_NUMBER
        {
            return Err(fail(
                code::VIX_E_INVALID_ARG,
                format!(
                    "QueryAllocatedBlocks({start}, {sectors}, chunk {chunk}): chunkSize must be >= {MIN_CHUNK_SIZE}, start and count multiples of it, at most {MAX_CHUNK_NUMBER} chunks"
                ),
            ));
        }
        let cap_sectors = self.capacity.div_ceil(SECTOR_SIZE);
        if start >= cap_sectors && sectors > 0 {
            return Err(fail(
                code::VIX_E_DISK_OUTOFRANGE,
                format!("QueryAllocatedBlocks at sector {start} is past the end ({cap_sectors} sectors)"),
            ));
        }
        if sectors == 0 {
            return Ok(Vec::new());
        }
        let q = format!(
            "/mockvddk/allocated?handle={}&offset={}&len={}",
            self.handle,
            start * SECTOR_SIZE,
            sectors.saturating_mul(SECTOR_SIZE)
        );
        let b = self.request("GET", &q, None, &[], true)?;
        let v: Value = serde_json::from_slice(&b)
            .map_err(|e| fail(code::VIX_E_FAIL, format!("bad answer: {e}")))?;
        let ext: Vec<(u64, u64)> = v["extents"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| Some((e[0].as_u64()?, e[1].as_u64()?)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(to_blocks(&ext, start, sectors, chunk))
    }

    /// VixDiskLib_Close: detaches a hot-added disk (the server side).
    pub fn close(&self) -> R<()> {
        let body = json!({"handle": self.handle}).to_string();
        match self.request(
            "POST",
            "/mockvddk/close",
            Some("application/json"),
            body.as_bytes(),
            true,
        ) {
            Ok(_) => Ok(()),
            // Already removed by VixDiskLib_Cleanup: nothing left to close.
            Err(f) if f.code == code::VIX_E_INVALID_HANDLE => Ok(()),
            Err(f) => Err(f),
        }
    }
}

/// Allocated byte extents → chunk-granular blocks (sectors) within
/// `[start, start + sectors)`, merged.
pub fn to_blocks(ext: &[(u64, u64)], start: u64, sectors: u64, chunk: u64) -> Vec<Block> {
    let cb = chunk * SECTOR_SIZE;
    let first = start / chunk;
    let last = (start + sectors) / chunk;
    let mut out: Vec<Block> = Vec::new();
    for &(o, l) in ext {
        if l == 0 {
            continue;
        }
        let c0 = (o / cb).max(first);
        let c1 = (o.saturating_add(l)).div_ceil(cb).min(last);
        if c0 >= c1 {
            continue;
        }
        if let Some(b) = out.last_mut() {
            let bend = (b.offset + b.length) / chunk;
            if c0 <= bend {
                b.length = c1.max(bend) * chunk - b.offset;
                continue;
            }
        }
        out.push(Block {
            offset: c0 * chunk,
            length: (c1 - c0) * chunk,
        });
    }
    out
}

/// VixDiskLib_Close.
pub fn close(id: usize) -> R<()> {
    let d = lock(&DISKS).remove(&id).ok_or_else(|| {
        fail(
            code::VIX_E_INVALID_HANDLE,
            "The handle is not a valid disk handle",
        )
    })?;
    d.close()
}

/// VixDiskLib_Cleanup: detach what this proxy's mock VDDK left hot-added.
pub fn cleanup(params: Params) -> R<(u32, u32)> {
    let cfg = config()?;
    let (server, port) = params.server()?;
    let cookie = params.cookie()?;
    let mut h = Https::connect(&server, port, Some(&cookie)).map_err(connect_err)?;
    let v = json_call(
        &mut h,
        "POST",
        "/mockvddk/cleanup",
        &json!({"proxy_vm": cfg.proxy_vm}),
    )?;
    Ok((
        v["cleaned"].as_u64().unwrap_or(0) as u32,
        v["remaining"].as_u64().unwrap_or(0) as u32,
    ))
}

/// VixDiskLib_PrepareForAccess / VixDiskLib_EndAccess.
pub fn access(params: Params, identity: &str, end: bool) -> R<()> {
    let cfg = config()?;
    let (server, port) = params.server()?;
    let cookie = params.cookie()?;
    let vm = params.vm()?;
    let mut h = Https::connect(&server, port, Some(&cookie)).map_err(connect_err)?;
    json_call(
        &mut h,
        "POST",
        "/mockvddk/access",
        &json!({"vm": vm, "identity": identity, "end": end, "proxy_vm": cfg.proxy_vm}),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file() {
        let c = parse_config(
            "# comment\ntmpDirectory = \"/tmp\"\nmock.proxyVmMoref = \"vm-42\"\nmock.callLog=/x/calls.jsonl\n",
        );
        assert_eq!(c.proxy_vm.as_deref(), Some("vm-42"));
        assert_eq!(c.call_log, Some(PathBuf::from("/x/calls.jsonl")));
    }

    #[test]
    fn blocks_are_chunk_granular_and_merged() {
        // 64 KiB chunks (128 sectors): bytes [0, 10) and [65536, 65546) touch chunks
        // 0 and 1 (merged); [300000, 300001) touches chunk 4.
        let b = to_blocks(&[(0, 10), (65536, 10), (300_000, 1)], 0, 1024, 128);
        assert_eq!(
            b,
            vec![
                Block {
                    offset: 0,
                    length: 256
                },
                Block {
                    offset: 512,
                    length: 128
                }
            ]
        );
        // Clipped to the request.
        let b = to_blocks(&[(0, 1 << 20)], 256, 256, 128);
        assert_eq!(
            b,
            vec![Block {
                offset: 256,
                length: 256
            }]
        );
        assert!(to_blocks(&[], 0, 128, 128).is_empty());
    }
}
