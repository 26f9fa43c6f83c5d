//! Test support for the mock VDDK: dlopen of the built `libvixDiskLib.so` with the C
//! signatures declared here, independently of the cdylib's own types (ConnectParams,
//! Info and BlockList are read and written at the byte offsets of the published
//! layout), a mock vCenter with a small world, and a minimal SOAP client for Login
//! and CreateSnapshot_Task. Test support only; it must not reach into the cdylib's
//! source.

#![allow(dead_code)]

use ferry_mocks::vcenter::{Scenario, VcenterMock, VcenterOptions};
use std::ffi::{c_char, c_void, CStr, CString};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The library's state is per process: tests take turns.
pub fn serial() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where cargo put the cdylib (beside the test executable in `deps/`, or in
/// `target/<profile>/`).
pub fn lib_path() -> PathBuf {
    ferry_mocks::fixtures::mock_vddk_library()
        .expect("libvixDiskLib.so is missing: cargo test -p ferry-mock-vddk builds it")
}

pub const VIX_OK: u64 = 0;
pub const VIX_E_FAIL: u64 = 1;
pub const VIX_E_INVALID_ARG: u64 = 3;
pub const VIX_E_FILE_NOT_FOUND: u64 = 4;
pub const VIX_E_FILE_ERROR: u64 = 7;
pub const VIX_E_FILE_READ_ONLY: u64 = 11;
pub const VIX_E_INVALID_HANDLE: u64 = 1000;
pub const VIX_E_HOST_USER_PERMISSIONS: u64 = 3014;
pub const VIX_E_SNAPSHOT_NOTFOUND: u64 = 13003;
pub const VIX_E_HOST_TCP_CONN_LOST: u64 = 14011;
pub const VIX_E_DISK_OUTOFRANGE: u64 = 16007;
pub const VIX_ASYNC: u64 = 25000;
pub const VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED: u64 = 26000;
pub const FLAG_READ_ONLY: u32 = 4;

type InitEx = unsafe extern "C" fn(
    u32,
    u32,
    *const c_void,
    *const c_void,
    *const c_void,
    *const c_char,
    *const c_char,
) -> u64;
type Exit = unsafe extern "C" fn();
type StrFn = unsafe extern "C" fn() -> *const c_char;
type Access = unsafe extern "C" fn(*const c_void, *const c_char) -> u64;
type ConnectEx = unsafe extern "C" fn(
    *const c_void,
    c_char,
    *const c_char,
    *const c_char,
    *mut *mut c_void,
) -> u64;
type HandleFn = unsafe extern "C" fn(*mut c_void) -> u64;
type Cleanup = unsafe extern "C" fn(*const c_void, *mut u32, *mut u32) -> u64;
type Open = unsafe extern "C" fn(*mut c_void, *const c_char, u32, *mut *mut c_void) -> u64;
type GetInfo = unsafe extern "C" fn(*mut c_void, *mut *mut c_void) -> u64;
type FreePtr = unsafe extern "C" fn(*mut c_void);
type Mode = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type Rw = unsafe extern "C" fn(*mut c_void, u64, u64, *mut u8) -> u64;
pub type Cb = unsafe extern "C" fn(*mut c_void, u64);
type RwAsync = unsafe extern "C" fn(*mut c_void, u64, u64, *mut u8, Option<Cb>, *mut c_void) -> u64;
type Qab = unsafe extern "C" fn(*mut c_void, u64, u64, u64, *mut *mut c_void) -> u64;
type FreeBl = unsafe extern "C" fn(*mut c_void) -> u64;
type Alloc = unsafe extern "C" fn() -> *mut u8;
type ErrText = unsafe extern "C" fn(u64, *const c_char) -> *mut c_char;

/// Every symbol ferry needs, by exact name.
pub const SYMBOLS: &[&str] = &[
    "VixDiskLib_InitEx",
    "VixDiskLib_Exit",
    "VixDiskLib_ListTransportModes",
    "VixDiskLib_PrepareForAccess",
    "VixDiskLib_EndAccess",
    "VixDiskLib_ConnectEx",
    "VixDiskLib_Disconnect",
    "VixDiskLib_Cleanup",
    "VixDiskLib_Open",
    "VixDiskLib_Close",
    "VixDiskLib_GetInfo",
    "VixDiskLib_FreeInfo",
    "VixDiskLib_GetTransportMode",
    "VixDiskLib_Read",
    "VixDiskLib_Write",
    "VixDiskLib_ReadAsync",
    "VixDiskLib_WriteAsync",
    "VixDiskLib_Wait",
    "VixDiskLib_Flush",
    "VixDiskLib_QueryAllocatedBlocks",
    "VixDiskLib_FreeBlockList",
    "VixDiskLib_AllocateConnectParams",
    "VixDiskLib_FreeConnectParams",
    "VixDiskLib_GetErrorText",
    "VixDiskLib_FreeErrorText",
];

/// The loaded library.
pub struct Vddk {
    lib: libloading::Library,
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// ConnectParams allocated by the library, filled at the published offsets.
pub struct Params {
    pub ptr: *mut u8,
    strings: Vec<CString>,
}

/// Info fields read at the published offsets.
#[derive(Debug)]
pub struct DiskInfo {
    pub capacity_sectors: u64,
    pub adapter: i32,
    pub num_links: i32,
    pub uuid: String,
    pub logical: u32,
    pub physical: u32,
}

impl Vddk {
    pub fn load() -> Vddk {
        let lib = unsafe { libloading::Library::new(lib_path()) }.expect("dlopen libvixDiskLib.so");
        Vddk { lib }
    }

    fn sym<T: Copy>(&self, name: &str) -> T {
        unsafe {
            *self
                .lib
                .get::<T>(name.as_bytes())
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        }
    }

    pub fn has(&self, name: &str) -> bool {
        unsafe { self.lib.get::<*const c_void>(name.as_bytes()).is_ok() }
    }

    pub fn init(&self, config: Option<&Path>) -> u64 {
        let f: InitEx = self.sym("VixDiskLib_InitEx");
        let cfg = config.map(|p| c(p.to_str().unwrap()));
        unsafe {
            f(
                6,
                5,
                std::ptr::null(),
                std::ptr::null(),
                std::ptr::null(),
                std::ptr::null(),
                cfg.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        }
    }

    pub fn exit(&self) {
        let f: Exit = self.sym("VixDiskLib_Exit");
        unsafe { f() }
    }

    pub fn transport_modes(&self) -> String {
        let f: StrFn = self.sym("VixDiskLib_ListTransportModes");
        unsafe { CStr::from_ptr(f()).to_string_lossy().into_owned() }
    }

    /// Params for `server:port`, session cookie, `moref=<vm>`.
    pub fn params(
        &self,
        server: &str,
        port: u16,
        thumb: Option<&str>,
        cookie: &str,
        vm: &str,
    ) -> Params {
        let alloc: Alloc = self.sym("VixDiskLib_AllocateConnectParams");
        let ptr = unsafe { alloc() };
        assert!(!ptr.is_null());
        assert!(
            unsafe { std::slice::from_raw_parts(ptr, 128) }
                .iter()
                .all(|b| *b == 0),
            "zeroed"
        );
        let vmx = c(&format!("moref={vm}"));
        let srv = c(server);
        let th = thumb.map(c);
        let ck = c(cookie);
        unsafe {
            (ptr as *mut *const c_char).write(vmx.as_ptr());
            (ptr.add(8) as *mut *const c_char).write(srv.as_ptr());
            (ptr.add(16) as *mut *const c_char)
                .write(th.as_ref().map_or(std::ptr::null(), |t| t.as_ptr()));
            (ptr.add(32) as *mut i32).write(2); // VIXDISKLIB_CRED_SESSIONID
            (ptr.add(40) as *mut *const c_char).write(ck.as_ptr());
            (ptr.add(64) as *mut u32).write(port as u32);
            (ptr.add(68) as *mut u32).write(902);
            (ptr.add(120) as *mut i32).write(0); // VIXDISKLIB_SPEC_VMX
        }
        let mut strings = vec![vmx, srv, ck];
        strings.extend(th);
        Params { ptr, strings }
    }

    pub fn free_params(&self, p: Params) {
        let f: FreePtr = self.sym("VixDiskLib_FreeConnectParams");
        unsafe { f(p.ptr as *mut c_void) };
        drop(p.strings);
    }

    pub fn prepare(&self, p: &Params, end: bool) -> u64 {
        let f: Access = self.sym(if end {
            "VixDiskLib_EndAccess"
        } else {
            "VixDiskLib_PrepareForAccess"
        });
        let id = c("ferry-test");
        unsafe { f(p.ptr as *const c_void, id.as_ptr()) }
    }

    pub fn connect(
        &self,
        p: &Params,
        read_only: bool,
        snap: Option<&str>,
        modes: &str,
    ) -> Result<*mut c_void, u64> {
        let f: ConnectEx = self.sym("VixDiskLib_ConnectEx");
        let s = snap.map(c);
        let m = c(modes);
        let mut conn = std::ptr::null_mut();
        let r = unsafe {
            f(
                p.ptr as *const c_void,
                read_only as c_char,
                s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
                m.as_ptr(),
                &mut conn,
            )
        };
        if r == VIX_OK {
            assert!(!conn.is_null());
            Ok(conn)
        } else {
            Err(r)
        }
    }

    pub fn disconnect(&self, conn: *mut c_void) -> u64 {
        let f: HandleFn = self.sym("VixDiskLib_Disconnect");
        unsafe { f(conn) }
    }

    pub fn cleanup(&self, p: &Params) -> (u64, u32, u32) {
        let f: Cleanup = self.sym("VixDiskLib_Cleanup");
        let (mut a, mut b) = (99, 99);
        let r = unsafe { f(p.ptr as *const c_void, &mut a, &mut b) };
        (r, a, b)
    }

    pub fn open(&self, conn: *mut c_void, path: &str, flags: u32) -> Result<*mut c_void, u64> {
        let f: Open = self.sym("VixDiskLib_Open");
        let p = c(path);
        let mut h = std::ptr::null_mut();
        let r = unsafe { f(conn, p.as_ptr(), flags, &mut h) };
        if r == VIX_OK {
            Ok(h)
        } else {
            Err(r)
        }
    }

    pub fn close(&self, h: *mut c_void) -> u64 {
        let f: HandleFn = self.sym("VixDiskLib_Close");
        unsafe { f(h) }
    }

    pub fn info(&self, h: *mut c_void) -> DiskInfo {
        let f: GetInfo = self.sym("VixDiskLib_GetInfo");
        let free: FreePtr = self.sym("VixDiskLib_FreeInfo");
        let mut p: *mut c_void = std::ptr::null_mut();
        assert_eq!(unsafe { f(h, &mut p) }, VIX_OK);
        let b = p as *const u8;
        let i = unsafe {
            let uuid = *(b.add(48) as *const *const c_char);
            DiskInfo {
                capacity_sectors: *(b.add(24) as *const u64),
                adapter: *(b.add(32) as *const i32),
                num_links: *(b.add(36) as *const i32),
                uuid: if uuid.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(uuid).to_string_lossy().into_owned()
                },
                logical: *(b.add(56) as *const u32),
                physical: *(b.add(60) as *const u32),
            }
        };
        unsafe { free(p) };
        i
    }

    pub fn mode(&self, h: *mut c_void) -> String {
        let f: Mode = self.sym("VixDiskLib_GetTransportMode");
        unsafe { CStr::from_ptr(f(h)).to_string_lossy().into_owned() }
    }

    pub fn read(&self, h: *mut c_void, start: u64, buf: &mut [u8]) -> u64 {
        let f: Rw = self.sym("VixDiskLib_Read");
        unsafe { f(h, start, buf.len() as u64 / 512, buf.as_mut_ptr()) }
    }

    pub fn write(&self, h: *mut c_void, start: u64, buf: &[u8]) -> u64 {
        let f: Rw = self.sym("VixDiskLib_Write");
        unsafe { f(h, start, buf.len() as u64 / 512, buf.as_ptr() as *mut u8) }
    }

    /// ReadAsync + Wait: (return code, callback result).
    pub fn read_async(&self, h: *mut c_void, start: u64, buf: &mut [u8]) -> (u64, Option<u64>) {
        unsafe extern "C" fn done(data: *mut c_void, r: u64) {
            let slot = &*(data as *const Mutex<Option<u64>>);
            *slot.lock().unwrap() = Some(r);
        }
        let f: RwAsync = self.sym("VixDiskLib_ReadAsync");
        let wait: HandleFn = self.sym("VixDiskLib_Wait");
        let slot = Arc::new(Mutex::new(None::<u64>));
        let r = unsafe {
            f(
                h,
                start,
                buf.len() as u64 / 512,
                buf.as_mut_ptr(),
                Some(done),
                Arc::as_ptr(&slot) as *mut c_void,
            )
        };
        if r == VIX_ASYNC {
            assert_eq!(unsafe { wait(h) }, VIX_OK);
        }
        let got = *slot.lock().unwrap();
        (r, got)
    }

    /// QueryAllocatedBlocks: `(offset, length)` in sectors.
    pub fn allocated(
        &self,
        h: *mut c_void,
        start: u64,
        n: u64,
        chunk: u64,
    ) -> Result<Vec<(u64, u64)>, u64> {
        let f: Qab = self.sym("VixDiskLib_QueryAllocatedBlocks");
        let free: FreeBl = self.sym("VixDiskLib_FreeBlockList");
        let mut p: *mut c_void = std::ptr::null_mut();
        let r = unsafe { f(h, start, n, chunk, &mut p) };
        if r != VIX_OK {
            assert_eq!(
                unsafe { free(std::ptr::null_mut()) },
                VIX_OK,
                "FreeBlockList(NULL)"
            );
            return Err(r);
        }
        let b = p as *const u8;
        let out = unsafe {
            let num = *(b as *const u32) as usize;
            (0..num)
                .map(|i| {
                    let e = b.add(8 + 16 * i) as *const u64;
                    (*e, *e.add(1))
                })
                .collect()
        };
        assert_eq!(unsafe { free(p) }, VIX_OK);
        Ok(out)
    }

    pub fn error_text(&self, err: u64) -> String {
        let f: ErrText = self.sym("VixDiskLib_GetErrorText");
        let free: FreePtr = self.sym("VixDiskLib_FreeErrorText");
        let p = unsafe { f(err, std::ptr::null()) };
        assert!(!p.is_null());
        let s = unsafe { CStr::from_ptr(p).to_string_lossy().into_owned() };
        unsafe { free(p as *mut c_void) };
        s
    }
}

/// A small world: VMs under KMS-A and KMS-B, an unencrypted VM, a VM on a datastore
/// the proxies' host cannot see, a KMS-A proxy and an unencrypted proxy.
pub const SCENARIO: &str = r#"
name = "vddk"
[[cluster]]
name = "C1"
[[host]]
name = "esx-01"
cluster = "C1"
datastores = ["ds-a", "ds-b", "ds-shared"]
[[host]]
name = "esx-02"
cluster = "C1"
datastores = ["ds-local"]
[[datastore]]
name = "ds-a"
[[datastore]]
name = "ds-b"
[[datastore]]
name = "ds-shared"
[[datastore]]
name = "ds-local"
[[key_provider]]
id = "KMS-A"
[[key_provider]]
id = "KMS-B"
[[vm]]
name = "enc-a"
host = "esx-01"
datastore = "ds-a"
key_provider = "KMS-A"
[[vm.disk]]
size_mib = 4
content = "mixed"
[[vm.disk]]
size_mib = 8
content = "sparse"
data_pct = 25
[[vm]]
name = "enc-b"
host = "esx-01"
datastore = "ds-b"
key_provider = "KMS-B"
[[vm.disk]]
size_mib = 4
content = "mixed"
[[vm]]
name = "plain"
host = "esx-01"
datastore = "ds-shared"
[[vm.disk]]
size_mib = 4
content = "mixed"
[[vm]]
name = "far"
host = "esx-02"
datastore = "ds-local"
[[vm.disk]]
size_mib = 2
content = "mixed"
[[proxy]]
name = "proxy-a"
host = "esx-01"
datastore = "ds-shared"
key_provider = "KMS-A"
[[proxy]]
name = "proxy-plain"
host = "esx-01"
datastore = "ds-shared"
"#;

/// A running mock vCenter with a logged-in session.
pub struct World {
    pub mock: VcenterMock,
    pub cookie: String,
    pub dir: tempfile::TempDir,
}

impl World {
    pub fn start() -> World {
        let sc = Scenario::parse(SCENARIO, Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
        let mock = VcenterMock::start(VcenterOptions::new(sc)).unwrap();
        let cookie = login(&mock);
        World {
            mock,
            cookie,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn port(&self) -> u16 {
        self.mock.addr().port()
    }

    pub fn moref(&self, vm: &str) -> String {
        self.mock.admin().state().vm(vm).unwrap().moref.clone()
    }

    /// Datastore path of a VM's disk (its live file; the base until a snapshot).
    pub fn disk_file(&self, vm: &str, i: usize) -> String {
        self.mock.admin().state().vm(vm).unwrap().disks[i]
            .file_name
            .clone()
    }

    /// Take a snapshot through SOAP; its moref.
    pub fn snapshot(&self, vm: &str) -> String {
        let id = self.moref(vm);
        let body = call(
            &self.mock,
            Some(&self.cookie),
            &format!(
                "<CreateSnapshot_Task xmlns=\"urn:vim25\"><_this type=\"VirtualMachine\">{id}</_this><name>ferry-vddk</name><memory>false</memory><quiesce>false</quiesce></CreateSnapshot_Task>"
            ),
        );
        self.wait_task(&body);
        let st = self.mock.admin().state();
        st.vm(vm).unwrap().snapshots.last().unwrap().moref.clone()
    }

    /// Remove a snapshot through SOAP (consolidating its delta), and wait for it.
    pub fn remove_snapshot(&self, snapshot: &str) {
        let body = call(
            &self.mock,
            Some(&self.cookie),
            &format!(
                "<RemoveSnapshot_Task xmlns=\"urn:vim25\"><_this type=\"VirtualMachineSnapshot\">{snapshot}</_this><removeChildren>false</removeChildren><consolidate>true</consolidate></RemoveSnapshot_Task>"
            ),
        );
        self.wait_task(&body);
    }

    /// Wait until the task a SOAP call answered with succeeded.
    fn wait_task(&self, body: &str) {
        let task = between(body, "<returnval type=\"Task\">", "</returnval>").expect("task moref");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = call(
                &self.mock,
                Some(&self.cookie),
                &format!("<Fetch xmlns=\"urn:vim25\"><_this type=\"Task\">{task}</_this><prop>info</prop></Fetch>"),
            );
            if info.contains("<state>success</state>") {
                break;
            }
            assert!(!info.contains("<state>error</state>"), "{info}");
            assert!(Instant::now() < deadline, "snapshot task did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Write a config file for InitEx.
    pub fn config(&self, proxy: Option<&str>, name: &str) -> (PathBuf, PathBuf) {
        let log = self.dir.path().join(format!("{name}.jsonl"));
        let cfg = self.dir.path().join(format!("{name}.cfg"));
        let mut text = String::from("# mock VDDK config\ntmpDirectory = \"/tmp\"\n");
        if let Some(p) = proxy {
            text.push_str(&format!("mock.proxyVmMoref = \"{}\"\n", self.moref(p)));
        }
        text.push_str(&format!("mock.callLog = \"{}\"\n", log.display()));
        std::fs::write(&cfg, text).unwrap();
        (cfg, log)
    }
}

fn between<'a>(s: &'a str, a: &str, b: &str) -> Option<&'a str> {
    let i = s.find(a)? + a.len();
    let j = s[i..].find(b)? + i;
    Some(&s[i..j])
}

fn tls(mock: &VcenterMock) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(mock.ca_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// POST a SOAP body to `/sdk` (CA pinned): (status, set-cookie, body).
fn post(mock: &VcenterMock, cookie: Option<&str>, inner: &str) -> (u16, Option<String>, String) {
    let env = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\"><soapenv:Body>{inner}</soapenv:Body></soapenv:Envelope>"
    );
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(tls(mock), name).unwrap();
    let tcp = std::net::TcpStream::connect(mock.addr()).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut req = format!(
        "POST /sdk HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/xml; charset=utf-8\r\nSOAPAction: urn:vim25/8.0.3.0\r\nConnection: close\r\nContent-Length: {}\r\n",
        env.len()
    );
    if let Some(c) = cookie {
        req.push_str(&format!("Cookie: vmware_soap_session=\"{c}\"\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(env.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let cookie = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie:")
                .then(|| l.to_string())
        })
        .and_then(|l| between(&l, "vmware_soap_session=\"", "\"").map(str::to_string));
    (status, cookie, body.to_string())
}

fn call(mock: &VcenterMock, cookie: Option<&str>, inner: &str) -> String {
    let (status, _, body) = post(mock, cookie, inner);
    assert_eq!(status, 200, "{body}");
    body
}

/// Log in with the scenario's credentials: the session cookie value.
pub fn login(mock: &VcenterMock) -> String {
    let (status, cookie, body) = post(
        mock,
        None,
        &format!(
            "<Login xmlns=\"urn:vim25\"><_this type=\"SessionManager\">SessionManager</_this><userName>{}</userName><password>{}</password></Login>",
            mock.user(),
            mock.password()
        ),
    );
    assert_eq!(status, 200, "{body}");
    cookie.expect("Login sets vmware_soap_session")
}

/// The call log as JSON values.
pub fn calls(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
