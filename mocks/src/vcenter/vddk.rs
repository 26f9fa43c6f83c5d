//! What ESXi and vCenter do for VDDK, for the mock VDDK (`mocks/vddk`, the
//! `libvixDiskLib` cdylib): JSON endpoints under `/mockvddk/` on the mock vCenter's
//! HTTPS server, authenticated by the `vmware_soap_session` cookie of a live SOAP
//! session. They open a VM's snapshot disk (or a live disk, for restores over the
//! network) with one transport, serve NBD/NBD-SSL reads and writes as HTTPS range
//! requests, hot-add through the same ReconfigVM rules and device entries as the
//! SOAP face (so a `hotadd` open really attaches the disk to the proxy VM, and the
//! mock VDDK reads and writes the device file locally), answer allocated extents,
//! clean up leftovers, keep an
//! **audit log** of every open, close, hot-add, detach and refusal, and apply the
//! VDDK fault plan (read errors, a connection dying mid-disk, slow reads).
//!
//! `hotadd` always needs a snapshot, as on vSphere ("With SAN/HotAdd, opening for
//! write requires a pre-existing snapshot"): read-only it serves the snapshot's
//! frozen disk; writable it writes the snapshot's base disk (VDDK's restore
//! procedure), and what was written is in the disk once the snapshot is removed.
//! A `hotadd` open without a snapshot is refused (VIX_E_FAIL) and audited.
//!
//! Errors are answered as `{"vix": <VDDK error code>, "error": "<message>"}` with a
//! 4xx status; the codes are the ones a real VDDK returns (see docs/mocks.md, "The mock
//! VDDK"). Owns the VDDK handle table, audit log and VDDK faults; it must not bypass
//! the inventory's hot-add rules (it calls [`World::reconfigure`]) nor share types
//! with the mock VDDK (the wire format is the contract).

use super::disk::{Disk, Frozen, ReaderKind};
use super::ids;
use super::inventory::{AddDisk, DeviceChange, ReconfigSpec, READ_ONLY_MODE, SCSI_KEY};
use super::server::{AppState, ConnInfo};
use super::session;
use super::world::{lock, World};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// VDDK error codes the endpoints answer with (low 16 bits of `VixError`).
pub mod vix {
    /// Unknown error (also a refused transport and a thumbprint mismatch).
    pub const FAIL: u32 = 1;
    /// Invalid argument.
    pub const INVALID_ARG: u32 = 3;
    /// No such disk file.
    pub const FILE_NOT_FOUND: u32 = 4;
    /// Not supported.
    pub const NOT_SUPPORTED: u32 = 6;
    /// A file error (an injected read error).
    pub const FILE_ERROR: u32 = 7;
    /// Write to a read-only disk.
    pub const FILE_READ_ONLY: u32 = 11;
    /// Locked (attached elsewhere).
    pub const FILE_ALREADY_LOCKED: u32 = 15;
    /// Unknown handle.
    pub const INVALID_HANDLE: u32 = 1000;
    /// Dead or unknown session.
    pub const HOST_USER_PERMISSIONS: u32 = 3014;
    /// No such VM.
    pub const VM_NOT_FOUND: u32 = 4000;
    /// No such snapshot.
    pub const SNAPSHOT_NOTFOUND: u32 = 13003;
    /// Outside the disk.
    pub const DISK_OUTOFRANGE: u32 = 16007;
}

/// Largest read or write one request may carry.
pub const MAX_IO: u64 = 8 << 20;

/// An injected VDDK fault: applies to the next `count` opens of a matching disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VddkFault {
    /// Only disks of this VM (name or moref id); all when absent.
    #[serde(default)]
    pub vm: Option<String>,
    /// Only this disk: device key (`2000`), label (`Hard disk 1`) or datastore path.
    #[serde(default)]
    pub disk: Option<String>,
    /// How many opens it applies to (default 1).
    #[serde(default = "one")]
    pub count: u32,
    /// Reads covering this byte offset fail with VIX_E_FILE_ERROR (7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_error_at: Option<u64>,
    /// The connection dies (TCP closed, VIX_E_HOST_TCP_CONN_LOST 14011 in the VDDK)
    /// when a read would take the bytes read through the handle past this many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub die_after: Option<u64>,
    /// Every read is delayed this long.
    #[serde(default)]
    pub delay_ms: u64,
    /// Open the disk in this mode instead of the one asked for and report it from
    /// `GetTransportMode` (VMware documents that an unavailable advanced mode
    /// falls back to NBD-SSL at Open): ferry must close such a disk and refuse it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_as: Option<String>,
}

fn one() -> u32 {
    1
}

/// One audit log entry: an open, close, hot-add, detach, refusal, cleanup or access
/// notification by the mock VDDK.
#[derive(Clone, Debug, Serialize)]
pub struct AuditEntry {
    /// Sequence number (from 1).
    pub seq: u64,
    /// Time (xsd:dateTime).
    pub time: String,
    /// `open`, `close`, `hotadd`, `detach`, `refused`, `cleanup`, `prepare-access`,
    /// `end-access`.
    pub op: String,
    /// Session user.
    pub user: String,
    /// The proxy VM the mock VDDK runs in (moref), when it said.
    pub proxy_vm: Option<String>,
    /// The proxy VM's key provider.
    pub proxy_key_provider: Option<String>,
    /// Source VM moref.
    pub vm: String,
    /// Snapshot moref (absent: the live disk).
    pub snapshot: Option<String>,
    /// Disk path as given to `VixDiskLib_Open`.
    pub disk_path: String,
    /// Disk device key, when resolved.
    pub disk_key: Option<i32>,
    /// Transport mode (`hotadd`, `nbdssl`, `nbd`).
    pub mode: String,
    /// Opened read-only.
    pub read_only: bool,
    /// The disk is encrypted.
    pub encrypted: bool,
    /// The disk's key provider.
    pub disk_key_provider: Option<String>,
    /// VDDK error code of the outcome (0 = success).
    pub vix: u32,
    /// What happened (refusal reason).
    pub message: String,
    /// Handle id.
    pub handle: Option<String>,
}

/// What a handle reads.
enum Src {
    /// A snapshot's frozen content over NBD (keeps the snapshot open).
    Frozen(Arc<Frozen>),
    /// A live disk over NBD (restores).
    Live(Arc<Disk>),
    /// Hot-added: the mock VDDK reads the device file; the server only answers
    /// allocation and detaches at close.
    HotAdd { disk: Arc<Disk>, snap: Option<u64> },
}

struct OpenDisk {
    audit: AuditEntry,
    src: Src,
    capacity: u64,
    read_only: bool,
    /// (proxy VM moref, device key) of a hot-added disk.
    attached: Option<(String, i32)>,
    /// The device entry a writable hot-add writes through (folded into the disk
    /// at close, see [`fold_written`]).
    written_through: Option<std::path::PathBuf>,
    fault: Option<VddkFault>,
    served: u64,
}

/// The VDDK side of the world: open handles, audit log, fault plan.
#[derive(Default)]
pub struct VddkState {
    handles: HashMap<String, OpenDisk>,
    audit: Vec<AuditEntry>,
    faults: Vec<VddkFault>,
}

impl VddkState {
    fn log(&mut self, mut e: AuditEntry) {
        e.seq = self.audit.len() as u64 + 1;
        e.time = ids::now();
        tracing::info!(op = %e.op, vm = %e.vm, disk = %e.disk_path, mode = %e.mode, vix = e.vix, "mock VDDK: {}", e.message);
        self.audit.push(e);
    }

    /// The audit log, oldest first.
    pub fn audit(&self) -> Vec<AuditEntry> {
        self.audit.clone()
    }

    /// Add a fault (ignored when `count` is 0).
    pub fn add_fault(&mut self, f: VddkFault) {
        if f.count > 0 {
            self.faults.push(f);
        }
    }

    /// Remove every VDDK fault.
    pub fn clear_faults(&mut self) {
        self.faults.clear();
    }

    /// Pending faults.
    pub fn faults(&self) -> Vec<VddkFault> {
        self.faults.clone()
    }

    /// Number of open handles.
    pub fn open_handles(&self) -> usize {
        self.handles.len()
    }

    fn take_fault(&mut self, vm: (&str, &str), disk: (i32, &str, &str)) -> Option<VddkFault> {
        let key = disk.0.to_string();
        let i = self.faults.iter().position(|f| {
            f.vm.as_deref().is_none_or(|v| v == vm.0 || v == vm.1)
                && f.disk
                    .as_deref()
                    .is_none_or(|d| d == key || d == disk.1 || d == disk.2)
        })?;
        let f = &mut self.faults[i];
        f.count -= 1;
        let out = f.clone();
        if f.count == 0 {
            self.faults.remove(i);
        }
        Some(out)
    }
}

/// A refusal: VDDK code and message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("VDDK error {code}: {msg}")]
pub struct VixError {
    /// VDDK error code.
    pub code: u32,
    /// Message.
    pub msg: String,
}

fn verr(code: u32, msg: impl Into<String>) -> VixError {
    VixError {
        code,
        msg: msg.into(),
    }
}

impl IntoResponse for VixError {
    fn into_response(self) -> Response {
        let status = match self.code {
            vix::HOST_USER_PERMISSIONS => StatusCode::UNAUTHORIZED,
            vix::FILE_NOT_FOUND
            | vix::VM_NOT_FOUND
            | vix::SNAPSHOT_NOTFOUND
            | vix::INVALID_HANDLE => StatusCode::NOT_FOUND,
            vix::INVALID_ARG | vix::DISK_OUTOFRANGE => StatusCode::BAD_REQUEST,
            _ => StatusCode::CONFLICT,
        };
        (
            status,
            Json(serde_json::json!({"vix": self.code, "error": self.msg})),
        )
            .into_response()
    }
}

/// `/mockvddk/*` routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/session", post(session_check))
        .route("/access", post(access))
        .route("/open", post(open))
        .route("/close", post(close))
        .route("/read", get(read))
        .route("/write", post(write))
        .route("/allocated", get(allocated))
        .route("/cleanup", post(cleanup))
}

fn cookie(h: &HeaderMap) -> Option<String> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(session::cookie_key)
}

/// The user of the live session named by the request's cookie.
fn user(world: &World, h: &HeaderMap) -> Result<String, VixError> {
    let c = cookie(h);
    lock(&world.sessions)
        .active(c.as_deref())
        .map(|s| s.user.clone())
        .map_err(|_| {
            verr(
                vix::HOST_USER_PERMISSIONS,
                "Insufficient permissions in the host operating system: the session cookie is not a live vCenter session (logged out or expired)",
            )
        })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VixError> + Send + 'static,
) -> Result<T, VixError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(verr(vix::FAIL, format!("internal error: {e}"))))
}

async fn session_check(State(st): State<AppState>, h: HeaderMap) -> Response {
    match user(&st.world, &h) {
        Ok(u) => Json(serde_json::json!({"user": u})).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessBody {
    vm: String,
    identity: String,
    end: bool,
    #[serde(default)]
    proxy_vm: Option<String>,
}

async fn access(State(st): State<AppState>, h: HeaderMap, Json(b): Json<AccessBody>) -> Response {
    let user = match user(&st.world, &h) {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let known = lock(&st.world.inv).vm_lookup(&b.vm).is_some();
    let (code, msg) = if known {
        (
            0,
            format!(
                "{} by {:?}",
                if b.end {
                    "EndAccess"
                } else {
                    "PrepareForAccess"
                },
                b.identity
            ),
        )
    } else {
        (vix::VM_NOT_FOUND, format!("no VM {:?}", b.vm))
    };
    lock(&st.world.vddk).log(AuditEntry {
        op: if b.end {
            "end-access"
        } else {
            "prepare-access"
        }
        .into(),
        user,
        proxy_vm: b.proxy_vm,
        vm: b.vm,
        vix: code,
        message: msg.clone(),
        ..blank()
    });
    if code == 0 {
        StatusCode::NO_CONTENT.into_response()
    } else {
        verr(code, msg).into_response()
    }
}

fn blank() -> AuditEntry {
    AuditEntry {
        seq: 0,
        time: String::new(),
        op: String::new(),
        user: String::new(),
        proxy_vm: None,
        proxy_key_provider: None,
        vm: String::new(),
        snapshot: None,
        disk_path: String::new(),
        disk_key: None,
        mode: String::new(),
        read_only: false,
        encrypted: false,
        disk_key_provider: None,
        vix: 0,
        message: String::new(),
        handle: None,
    }
}

/// `POST /mockvddk/open` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenBody {
    vm: String,
    #[serde(default)]
    snapshot: Option<String>,
    path: String,
    mode: String,
    read_only: bool,
    #[serde(default)]
    proxy_vm: Option<String>,
}

/// What the inventory says about the disk to open.
struct Resolved {
    vm_id: String,
    vm_name: String,
    key: i32,
    label: String,
    disk: Arc<Disk>,
    snap: Option<u64>,
    file: String,
    capacity: u64,
    provider: Option<String>,
    uuid: String,
    proxy: Option<(usize, Option<String>, Arc<std::sync::Mutex<()>>)>,
}

fn resolve(world: &World, b: &OpenBody, a: &mut AuditEntry) -> Result<Resolved, VixError> {
    let inv = lock(&world.inv);
    let proxy = match &b.proxy_vm {
        Some(p) => {
            let pi = inv.vm_lookup(p).ok_or_else(|| {
                verr(
                    vix::VM_NOT_FOUND,
                    format!("the proxy VM {p:?} (mock.proxyVmMoref) does not exist"),
                )
            })?;
            let pv = &inv.vms[pi];
            a.proxy_key_provider = pv.crypto.as_ref().map(|c| c.provider.clone());
            Some((
                pi,
                pv.crypto.as_ref().map(|c| c.provider.clone()),
                pv.op.clone(),
            ))
        }
        None => None,
    };
    let vi = inv.vm_lookup(&b.vm).ok_or_else(|| {
        verr(
            vix::VM_NOT_FOUND,
            format!("The virtual machine {:?} cannot be found", b.vm),
        )
    })?;
    let vm = &inv.vms[vi];
    a.vm = vm.id.clone();
    let d = vm
        .disks
        .iter()
        .find(|d| d.disk.find_file(&b.path).is_some())
        .ok_or_else(|| {
            verr(
                vix::FILE_NOT_FOUND,
                format!(
                    "The file specified was not found: {} is not a disk of VM {}",
                    b.path, vm.name
                ),
            )
        })?;
    a.disk_key = Some(d.key);
    let (snap, crypto, uuid) = match &b.snapshot {
        Some(sid) => {
            let s = vm.snapshots.iter().find(|s| &s.id == sid).ok_or_else(|| {
                verr(
                    vix::SNAPSHOT_NOTFOUND,
                    format!(
                        "The snapshot does not exist: VM {} has no snapshot {sid}",
                        vm.name
                    ),
                )
            })?;
            let sd = s.disks.iter().find(|x| x.key == d.key).ok_or_else(|| {
                verr(
                    vix::FILE_NOT_FOUND,
                    format!(
                        "The file specified was not found: snapshot {sid} has no disk {}",
                        b.path
                    ),
                )
            })?;
            (Some(sd.snap), sd.crypto.clone(), sd.uuid.clone())
        }
        None => (None, d.crypto.clone(), d.uuid.clone()),
    };
    let (file, capacity) = match snap {
        Some(s) => (
            d.disk
                .frozen_file_name(s)
                .map_err(|e| verr(vix::FILE_NOT_FOUND, e.to_string()))?,
            d.disk
                .snapshot_capacity(s)
                .map_err(|e| verr(vix::FILE_NOT_FOUND, e.to_string()))?,
        ),
        None => (d.disk.live_file_name(), d.disk.capacity()),
    };
    a.encrypted = crypto.is_some();
    a.disk_key_provider = crypto.as_ref().map(|c| c.provider.clone());
    Ok(Resolved {
        vm_id: vm.id.clone(),
        vm_name: vm.name.clone(),
        key: d.key,
        label: d.label.clone(),
        disk: d.disk.clone(),
        snap,
        file,
        capacity,
        provider: crypto.map(|c| c.provider),
        uuid,
        proxy,
    })
}

fn hotadd_refusal(path: &str, f: &super::codec::Fault) -> VixError {
    match f.obj.ty {
        "GenericVmConfigFault" => verr(
            vix::FAIL,
            format!(
                "Cannot use mode hotadd to access {path}: crypto fault, key provider mismatch ({})",
                f.message
            ),
        ),
        "FileLocked" => verr(
            vix::FILE_ALREADY_LOCKED,
            format!("Cannot use mode hotadd to access {path}: {}", f.message),
        ),
        "FileNotFound" => verr(vix::FILE_NOT_FOUND, f.message.clone()),
        _ => verr(
            vix::FAIL,
            format!(
                "Cannot use mode hotadd to access {path}: {} ({})",
                f.message, f.obj.ty
            ),
        ),
    }
}

fn open_disk(world: &World, user: String, mut b: OpenBody) -> Result<serde_json::Value, VixError> {
    let mut a = AuditEntry {
        op: "open".into(),
        user,
        proxy_vm: b.proxy_vm.clone(),
        vm: b.vm.clone(),
        snapshot: b.snapshot.clone(),
        disk_path: b.path.clone(),
        mode: b.mode.clone(),
        read_only: b.read_only,
        ..blank()
    };
    let refuse = |world: &World, mut a: AuditEntry, e: VixError| {
        a.op = "refused".into();
        a.vix = e.code;
        a.message = e.msg.clone();
        lock(&world.vddk).log(a);
        e
    };
    let r = match resolve(world, &b, &mut a) {
        Ok(r) => r,
        Err(e) => return Err(refuse(world, a, e)),
    };
    // A snapshot's disk is frozen for the network modes: always read-only,
    // whatever the flags say. HotAdd is VDDK's way to write a VM's base disk:
    // with a snapshot (see below), and only with one.
    let read_only = b.read_only || (r.snap.is_some() && b.mode != "hotadd");
    a.read_only = read_only;
    match b.mode.as_str() {
        "hotadd" | "nbdssl" => {}
        "nbd" => {
            if let Some(p) = &r.provider {
                let e = verr(
                    vix::FAIL,
                    format!(
                        "Cannot use mode nbd to access {}: the disk is encrypted (key provider {p}); ESXi serves encrypted disks only over nbdssl or hotadd",
                        b.path
                    ),
                );
                return Err(refuse(world, a, e));
            }
        }
        other => {
            let e = verr(
                vix::FAIL,
                format!("Cannot use mode {other} to access {}: the mock VDDK serves hotadd, nbdssl and nbd", b.path),
            );
            return Err(refuse(world, a, e));
        }
    }
    let fault = lock(&world.vddk).take_fault((&r.vm_id, &r.vm_name), (r.key, &r.label, &b.path));
    if let Some(m) = fault.as_ref().and_then(|f| f.open_as.clone()) {
        // A silent fallback, as real VDDK may do: the audit says what happened.
        a.message = format!("asked for {}, opened as {m}", b.mode);
        a.mode = m.clone();
        b.mode = m;
    }
    let handle = ids::token(16);
    a.handle = Some(handle.clone());
    let mut out = serde_json::json!({
        "handle": handle,
        "capacity": r.capacity,
        "mode": b.mode,
        "read_only": read_only,
        "uuid": r.uuid,
        "encrypted": r.provider.is_some(),
    });
    let mut written_through = None;
    let (src, attached) = if b.mode == "hotadd" {
        let Some((pi, _, op)) = &r.proxy else {
            let e = verr(
                vix::FAIL,
                format!("Cannot use mode hotadd to access {}: the mock VDDK does not know its proxy VM (set mock.proxyVmMoref in the InitEx config file)", b.path),
            );
            return Err(refuse(world, a, e));
        };
        if r.snap.is_none() {
            // VMware's rule: "With SAN/HotAdd, opening for write requires a
            // pre-existing snapshot" (restores snapshot the VM, open the base disk
            // for write by HotAdd, then remove or revert to the snapshot); reads
            // hot-add a snapshot's disk too.
            let e = if read_only {
                verr(
                    vix::FAIL,
                    format!("Cannot use mode hotadd to access {} read-only without a snapshot: open a snapshot's disk (pass its moref to ConnectEx)", b.path),
                )
            } else {
                verr(
                    vix::FAIL,
                    format!("Cannot use mode hotadd to open {} for writing without a snapshot: with SAN/HotAdd, opening for write requires a pre-existing snapshot of VM {} (take one and pass its moref to ConnectEx, or write by nbdssl)", b.path, r.vm_name),
                )
            };
            return Err(refuse(world, a, e));
        }
        // The snapshot's base disk, attached through the inventory's ReconfigVM
        // rules (key provider, datastore, locks). The inventory attaches a
        // snapshot's file only non-persistent; a writable handle writes through
        // the device entry and what it wrote is folded into the disk at close.
        let spec = ReconfigSpec {
            cbt: None,
            changes: vec![DeviceChange::Add(AddDisk {
                key: -1,
                controller_key: SCSI_KEY,
                unit: None,
                file_name: r.file.clone(),
                disk_mode: READ_ONLY_MODE.into(),
            })],
        };
        let done = {
            let _serial = lock(op);
            world.reconfigure(*pi, &spec)
        };
        if let Err(f) = done {
            return Err(refuse(world, a, hotadd_refusal(&b.path, &f)));
        }
        let found = {
            let inv = lock(&world.inv);
            let pv = &inv.vms[*pi];
            pv.attached
                .iter()
                .find(|x| {
                    x.source_vm == r.vm_id
                        && x.source_disk_key == r.key
                        && x.source_snapshot == b.snapshot.as_deref().unwrap_or("")
                })
                .map(|x| (pv.id.clone(), x.key, x.entry.clone()))
        };
        let Some((proxy_id, dev_key, entry)) = found else {
            return Err(refuse(world, a, verr(vix::FAIL, "hot-added disk vanished")));
        };
        let mut ha = a.clone();
        ha.op = "hotadd".into();
        ha.message = format!(
            "{} attached to proxy VM {proxy_id} as device {dev_key}",
            r.file
        );
        lock(&world.vddk).log(ha);
        let Some(entry) = entry else {
            detach(world, &proxy_id, dev_key, &a);
            return Err(refuse(
                world,
                a,
                verr(vix::FAIL, format!("Cannot use mode hotadd to access {}: proxy VM {proxy_id} has no device directory", b.path)),
            ));
        };
        out["device"] = serde_json::json!(entry.display().to_string());
        if !read_only {
            written_through = Some(entry.clone());
        }
        if let Some(f) = &fault {
            out["fault"] = serde_json::to_value(f).unwrap_or_default();
        }
        (
            Src::HotAdd {
                disk: r.disk.clone(),
                snap: r.snap,
            },
            Some((proxy_id, dev_key)),
        )
    } else {
        match r.snap {
            Some(s) => match r.disk.open_frozen(s, ReaderKind::Nbd) {
                Ok(f) => (Src::Frozen(Arc::new(f)), None),
                Err(e) => {
                    return Err(refuse(
                        world,
                        a,
                        verr(vix::FILE_ALREADY_LOCKED, e.to_string()),
                    ))
                }
            },
            None => {
                if !read_only {
                    if let Some(by) = lock(&world.inv)
                        .live_attached_by(&r.disk)
                        .map(str::to_string)
                    {
                        let e = verr(
                            vix::FILE_ALREADY_LOCKED,
                            format!("{} is locked: it is hot-added to VM {by}", b.path),
                        );
                        return Err(refuse(world, a, e));
                    }
                }
                (Src::Live(r.disk.clone()), None)
            }
        }
    };
    let opened = format!("opened {} ({}) with {}", b.path, r.file, b.mode);
    a.message = if a.message.is_empty() {
        opened
    } else {
        format!("{}; {opened}", a.message)
    };
    let mut st = lock(&world.vddk);
    st.log(a.clone());
    st.handles.insert(
        handle,
        OpenDisk {
            audit: a,
            src,
            capacity: r.capacity,
            read_only,
            attached,
            written_through,
            fault,
            served: 0,
        },
    );
    Ok(out)
}

/// What a writable hot-add wrote through its device entry `dev` into the base
/// disk of snapshot `snap`, made part of `disk`: every 64 KiB block whose device
/// content differs from the snapshot's content is written into the disk's chain.
/// The mock's layers keep their own allocation maps and only the live layer takes
/// writes, so the blocks land in the live delta above the snapshot; removing the
/// snapshot consolidates them into the base, which then holds what was written
/// (as on ESXi, where the base was written in place). A guest write to the same
/// block after the snapshot is overwritten (on ESXi it would stay on top); ferry
/// writes only new disks this way, which no guest has written. Returns the number
/// of blocks kept.
fn fold_written(
    dev: &std::path::Path,
    disk: &Disk,
    snap: u64,
    capacity: u64,
) -> Result<u64, String> {
    use std::os::unix::fs::FileExt;
    const STEP: u64 = super::disk::BLOCK;
    let f = std::fs::File::open(dev).map_err(|e| format!("{}: {e}", dev.display()))?;
    let (mut mine, mut theirs) = (vec![0u8; STEP as usize], vec![0u8; STEP as usize]);
    let mut kept = 0;
    let mut pos = 0;
    while pos < capacity {
        let n = (capacity - pos).min(STEP) as usize;
        f.read_exact_at(&mut mine[..n], pos)
            .map_err(|e| format!("{}: {e}", dev.display()))?;
        disk.read(Some(snap), pos, &mut theirs[..n])
            .map_err(|e| e.to_string())?;
        if mine[..n] != theirs[..n] {
            disk.write(pos, &mine[..n]).map_err(|e| e.to_string())?;
            kept += 1;
        }
        pos += n as u64;
    }
    Ok(kept)
}

/// Detach a disk the mock VDDK hot-added; logs it. True when it is gone.
fn detach(world: &World, proxy: &str, key: i32, a: &AuditEntry) -> bool {
    let (pi, op) = {
        let inv = lock(&world.inv);
        match inv.vm_index(proxy) {
            Some(pi) => (pi, inv.vms[pi].op.clone()),
            None => return false,
        }
    };
    let spec = ReconfigSpec {
        cbt: None,
        changes: vec![DeviceChange::Remove { key }],
    };
    let r = {
        let _serial = lock(&op);
        world.reconfigure(pi, &spec)
    };
    let mut e = a.clone();
    e.op = "detach".into();
    match &r {
        Ok(()) => e.message = format!("device {key} removed from proxy VM {proxy}"),
        Err(f) => {
            e.vix = vix::FAIL;
            e.message = format!("removing device {key} from proxy VM {proxy}: {}", f.message);
        }
    }
    lock(&world.vddk).log(e);
    r.is_ok()
}

async fn open(State(st): State<AppState>, h: HeaderMap, Json(b): Json<OpenBody>) -> Response {
    let world = st.world.clone();
    let r = blocking(move || {
        let u = match user(&world, &h) {
            Ok(u) => u,
            Err(e) => {
                let a = AuditEntry {
                    op: "refused".into(),
                    proxy_vm: b.proxy_vm.clone(),
                    vm: b.vm.clone(),
                    snapshot: b.snapshot.clone(),
                    disk_path: b.path.clone(),
                    mode: b.mode.clone(),
                    read_only: b.read_only,
                    vix: e.code,
                    message: e.msg.clone(),
                    ..blank()
                };
                lock(&world.vddk).log(a);
                return Err(e);
            }
        };
        open_disk(&world, u, b)
    })
    .await;
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HandleBody {
    handle: String,
}

async fn close(State(st): State<AppState>, Json(b): Json<HandleBody>) -> Response {
    let world = st.world.clone();
    let r = blocking(move || {
        let d = lock(&world.vddk).handles.remove(&b.handle);
        let Some(d) = d else {
            return Err(verr(
                vix::INVALID_HANDLE,
                format!(
                    "no open disk handle {:?} (closed, or removed by Cleanup)",
                    b.handle
                ),
            ));
        };
        let mut ok = true;
        let mut folded = None;
        if let (
            Some(dev),
            Src::HotAdd {
                disk,
                snap: Some(s),
            },
        ) = (&d.written_through, &d.src)
        {
            // Before the detach removes the device entry.
            folded = Some(fold_written(dev, disk, *s, d.capacity));
        }
        if let Some((proxy, key)) = &d.attached {
            ok = detach(&world, proxy, *key, &d.audit);
        }
        let mut e = d.audit.clone();
        e.op = "close".into();
        e.message = format!("closed {}", e.disk_path);
        match folded {
            Some(Ok(n)) => e.message.push_str(&format!(
                "; {n} block(s) written through the hot-added device are in the disk"
            )),
            Some(Err(m)) => {
                e.vix = vix::FILE_ERROR;
                e.message
                    .push_str(&format!("; the writes could not be kept: {m}"));
                ok = false;
            }
            None => {}
        }
        drop(d);
        lock(&world.vddk).log(e);
        if ok {
            Ok(())
        } else {
            Err(verr(
                vix::FAIL,
                "the hot-added disk could not be removed from the proxy VM",
            ))
        }
    })
    .await;
    match r {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct IoQuery {
    handle: String,
    offset: u64,
    #[serde(default)]
    len: u64,
}

enum ReadSrc {
    Frozen(Arc<Frozen>),
    Live(Arc<Disk>),
}

async fn read(
    State(st): State<AppState>,
    ConnectInfo(conn): ConnectInfo<ConnInfo>,
    Query(q): Query<IoQuery>,
) -> Response {
    let plan = {
        let mut s = lock(&st.world.vddk);
        let Some(d) = s.handles.get_mut(&q.handle) else {
            return verr(
                vix::INVALID_HANDLE,
                format!("no open disk handle {:?}", q.handle),
            )
            .into_response();
        };
        if q.len > MAX_IO || q.offset.checked_add(q.len).is_none_or(|e| e > d.capacity) {
            return verr(
                vix::DISK_OUTOFRANGE,
                format!("You have requested access to an area of the virtual disk that is out of bounds ({} + {} > {})", q.offset, q.len, d.capacity),
            )
            .into_response();
        }
        let src = match &d.src {
            Src::Frozen(f) => ReadSrc::Frozen(f.clone()),
            Src::Live(l) => ReadSrc::Live(l.clone()),
            Src::HotAdd { .. } => return verr(
                vix::NOT_SUPPORTED,
                "a hot-added disk is read from its device on the proxy VM, not over the network",
            )
            .into_response(),
        };
        let mut delay = 0;
        let mut die = false;
        let mut bad = false;
        if let Some(f) = &mut d.fault {
            delay = f.delay_ms;
            if let Some(n) = f.die_after {
                if d.served + q.len > n {
                    die = true;
                    f.die_after = None;
                }
            }
            if let Some(at) = f.read_error_at {
                bad = q.len > 0 && at >= q.offset && at < q.offset + q.len;
            }
        }
        if !die && !bad {
            d.served += q.len;
        }
        (src, delay, die, bad)
    };
    let (src, delay, die, bad) = plan;
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if die {
        tracing::info!(handle = %q.handle, "mock VDDK: dropping the NBD connection mid-disk (fault injection)");
        conn.kill();
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    if bad {
        return verr(
            vix::FILE_ERROR,
            format!(
                "A file error was encountered: injected read error at byte {}",
                q.offset
            ),
        )
        .into_response();
    }
    let r = blocking(move || {
        let mut buf = vec![0u8; q.len as usize];
        let res = match &src {
            ReadSrc::Frozen(f) => f.read(q.offset, &mut buf).map_err(|e| e.to_string()),
            ReadSrc::Live(d) => d.read(None, q.offset, &mut buf).map_err(|e| e.to_string()),
        };
        res.map(|_| buf).map_err(|m| verr(vix::FILE_ERROR, m))
    })
    .await;
    match r {
        Ok(buf) => ([(header::CONTENT_TYPE, "application/octet-stream")], buf).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn write(State(st): State<AppState>, Query(q): Query<IoQuery>, body: Bytes) -> Response {
    let disk = {
        let s = lock(&st.world.vddk);
        let Some(d) = s.handles.get(&q.handle) else {
            return verr(
                vix::INVALID_HANDLE,
                format!("no open disk handle {:?}", q.handle),
            )
            .into_response();
        };
        if d.read_only {
            return verr(
                vix::FILE_READ_ONLY,
                "The file is read-only: the disk was opened read-only (or is a snapshot's disk)",
            )
            .into_response();
        }
        if q.offset
            .checked_add(body.len() as u64)
            .is_none_or(|e| e > d.capacity)
        {
            return verr(
                vix::DISK_OUTOFRANGE,
                "You have requested access to an area of the virtual disk that is out of bounds",
            )
            .into_response();
        }
        match &d.src {
            Src::Live(l) => l.clone(),
            _ => {
                return verr(
                    vix::NOT_SUPPORTED,
                    "this handle is not written over the network",
                )
                .into_response()
            }
        }
    };
    let r = blocking(move || {
        disk.write(q.offset, &body)
            .map(|_| ())
            .map_err(|e| verr(vix::FILE_ERROR, e.to_string()))
    })
    .await;
    match r {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn allocated(State(st): State<AppState>, Query(q): Query<IoQuery>) -> Response {
    enum A {
        F(Arc<Frozen>),
        D(Arc<Disk>, Option<u64>),
    }
    let (a, cap) = {
        let s = lock(&st.world.vddk);
        let Some(d) = s.handles.get(&q.handle) else {
            return verr(
                vix::INVALID_HANDLE,
                format!("no open disk handle {:?}", q.handle),
            )
            .into_response();
        };
        let a = match &d.src {
            Src::Frozen(f) => A::F(f.clone()),
            Src::Live(l) => A::D(l.clone(), None),
            Src::HotAdd { disk, snap } => A::D(disk.clone(), *snap),
        };
        (a, d.capacity)
    };
    let r = blocking(move || {
        let end = q.offset.saturating_add(q.len).min(cap);
        let ext: Vec<(u64, u64)> = match &a {
            A::F(f) => f.allocated(q.offset, q.len),
            A::D(d, snap) => d
                .allocated(*snap)
                .map_err(|e| verr(vix::FILE_ERROR, e.to_string()))?
                .into_iter()
                .filter_map(|(o, l)| {
                    let s = o.max(q.offset);
                    let e = (o + l).min(end);
                    (s < e).then_some((s, e - s))
                })
                .collect(),
        };
        Ok(ext)
    })
    .await;
    match r {
        Ok(ext) => Json(serde_json::json!({"capacity": cap, "extents": ext})).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CleanupBody {
    #[serde(default)]
    proxy_vm: Option<String>,
}

async fn cleanup(State(st): State<AppState>, h: HeaderMap, Json(b): Json<CleanupBody>) -> Response {
    let world = st.world.clone();
    let r = blocking(move || {
        let user = user(&world, &h)?;
        let Some(proxy) = b.proxy_vm else {
            return Ok((0u32, 0u32));
        };
        let proxy_id = {
            let inv = lock(&world.inv);
            inv.vm_lookup(&proxy).map(|i| inv.vms[i].id.clone())
        }
        .ok_or_else(|| verr(vix::VM_NOT_FOUND, format!("no proxy VM {proxy:?}")))?;
        let left: Vec<OpenDisk> = {
            let mut s = lock(&world.vddk);
            let keys: Vec<String> = s
                .handles
                .iter()
                .filter(|(_, d)| d.attached.as_ref().is_some_and(|(p, _)| *p == proxy_id))
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter().filter_map(|k| s.handles.remove(k)).collect()
        };
        let (mut cleaned, mut remaining) = (0u32, 0u32);
        for d in left {
            if let Some((p, key)) = &d.attached {
                if detach(&world, p, *key, &d.audit) {
                    cleaned += 1;
                } else {
                    remaining += 1;
                }
            }
        }
        lock(&world.vddk).log(AuditEntry {
            op: "cleanup".into(),
            user,
            proxy_vm: Some(proxy_id),
            message: format!("Cleanup: {cleaned} hot-added disks removed, {remaining} remaining"),
            vix: if remaining == 0 { 0 } else { vix::FAIL },
            ..blank()
        });
        Ok((cleaned, remaining))
    })
    .await;
    match r {
        Ok((c, rem)) => Json(serde_json::json!({"cleaned": c, "remaining": rem})).into_response(),
        Err(e) => e.into_response(),
    }
}
