//! The test-only admin face of the mock vCenter, two ways with the same powers:
//! JSON endpoints under `/admin/` (bearer token) and the in-process [`Admin`] handle.
//! Write into a VM's disk as its guest would, change key providers, resize a disk or
//! reset its CBT, inject faults, expire sessions or tickets, dump the state.
//!
//! Must not bypass vSphere's rules for what the SOAP face does; it only does what a
//! guest, a vSphere administrator or a broken network would.

use super::faults::{DropConnections, FailTasks, Latency};
use super::guest::{GuestTools, SnapshotAttempt};
use super::server::AppState;
use super::vddk::{AuditEntry, VddkFault};
use super::world::{lock, AdminError, StateDump, World};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// In-process handle with the admin API's powers.
#[derive(Clone)]
pub struct Admin {
    world: Arc<World>,
}

/// A guest write request (`POST /admin/vms/{vm}/disks/{disk}/write`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WriteRequest {
    /// Byte offset (for `hex` and `fill`).
    #[serde(default)]
    pub offset: u64,
    /// Bytes to write, hex encoded.
    #[serde(default)]
    pub hex: Option<String>,
    /// Write `len` copies of this byte.
    #[serde(default)]
    pub fill: Option<u8>,
    /// Length for `fill`.
    #[serde(default)]
    pub len: Option<u64>,
    /// Overwrite a seeded random fraction of the disk instead.
    #[serde(default)]
    pub random: Option<RandomWrite>,
}

/// A seeded random write.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RandomWrite {
    /// Fraction of the disk's blocks to overwrite (0.01 = 1%).
    pub fraction: f64,
    /// Seed (same seed, same blocks and bytes).
    #[serde(default)]
    pub seed: u64,
    /// Block size in bytes (default 64 KiB).
    #[serde(default)]
    pub block: Option<u64>,
}

/// Largest explicit write accepted through the API.
pub const MAX_WRITE: u64 = 64 << 20;

fn decode_hex(s: &str) -> Result<Vec<u8>, AdminError> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) || s.len() as u64 > 2 * MAX_WRITE {
        return Err(AdminError::Invalid(
            "hex must have an even number of digits and at most 64 MiB".into(),
        ));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(s.get(i..i + 2).unwrap_or("zz"), 16)
                .map_err(|_| AdminError::Invalid(format!("bad hex at position {i}")))
        })
        .collect()
}

impl Admin {
    /// A handle on `world`.
    pub fn new(world: Arc<World>) -> Admin {
        Admin { world }
    }

    /// Write `data` at `offset` into `disk` (key such as `"2000"` or label such as
    /// `"Hard disk 1"`) of `vm` (name or moref id), as the guest would. Returns the
    /// changed range rounded to CBT blocks.
    pub fn write(
        &self,
        vm: &str,
        disk: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(u64, u64), AdminError> {
        self.world.guest_write(vm, disk, offset, data)
    }

    /// Overwrite a seeded random `fraction` of a disk in `block`-byte blocks; returns
    /// the blocks written.
    pub fn write_random(
        &self,
        vm: &str,
        disk: &str,
        fraction: f64,
        seed: u64,
        block: u64,
    ) -> Result<Vec<(u64, u64)>, AdminError> {
        self.world
            .guest_write_random(vm, disk, fraction, seed, block)
    }

    /// Apply a [`WriteRequest`].
    pub fn apply_write(
        &self,
        vm: &str,
        disk: &str,
        w: &WriteRequest,
    ) -> Result<Vec<(u64, u64)>, AdminError> {
        match (&w.hex, w.fill, &w.random) {
            (Some(h), None, None) => {
                let data = decode_hex(h)?;
                Ok(vec![self.write(vm, disk, w.offset, &data)?])
            }
            (None, Some(b), None) => {
                let len = w.len.filter(|l| *l > 0 && *l <= MAX_WRITE).ok_or_else(|| {
                    AdminError::Invalid("fill needs len (1 byte to 64 MiB)".into())
                })?;
                Ok(vec![self.write(
                    vm,
                    disk,
                    w.offset,
                    &vec![b; len as usize],
                )?])
            }
            (None, None, Some(r)) => self.write_random(
                vm,
                disk,
                r.fraction,
                r.seed,
                r.block.unwrap_or(super::disk::BLOCK),
            ),
            _ => Err(AdminError::Invalid(
                "give exactly one of hex, fill (+len) or random".into(),
            )),
        }
    }

    /// Read a disk's live content, or a snapshot's (moref id or name).
    pub fn read(
        &self,
        vm: &str,
        disk: &str,
        snapshot: Option<&str>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), AdminError> {
        self.world.read_disk(vm, disk, snapshot, offset, buf)
    }

    /// BLAKE3 (hex) and size of a disk's live or snapshot content.
    pub fn digest(
        &self,
        vm: &str,
        disk: &str,
        snapshot: Option<&str>,
    ) -> Result<(String, u64), AdminError> {
        self.world.digest(vm, disk, snapshot)
    }

    /// Change the key provider of a VM or proxy (`None`: not encrypted any more).
    pub fn set_key_provider(&self, vm: &str, provider: Option<&str>) -> Result<(), AdminError> {
        self.world.set_key_provider(vm, provider)
    }

    /// Set a VM's power state (`poweredOn`, `poweredOff`, `suspended`).
    pub fn set_power_state(&self, vm: &str, state: &str) -> Result<(), AdminError> {
        self.world.set_power_state(vm, state)
    }

    /// Rename a VM; its instance UUID (its identity) stays.
    pub fn rename_vm(&self, vm: &str, new_name: &str) -> Result<(), AdminError> {
        self.world.rename_vm(vm, new_name)
    }

    /// Move a VM to another host (vMotion).
    pub fn move_vm(&self, vm: &str, host: &str) -> Result<(), AdminError> {
        self.world.move_vm(vm, host)
    }

    /// Create a workload VM; returns its moref id.
    pub fn add_vm(&self, spec: &super::scenario::VmSpec) -> Result<String, AdminError> {
        self.world.add_vm(spec)
    }

    /// Delete a workload VM (no snapshots, no hot-added disks anywhere, no task
    /// running: later VMs' indices shift).
    pub fn remove_vm(&self, vm: &str) -> Result<(), AdminError> {
        self.world.remove_vm(vm)
    }

    /// A new instance UUID for a VM, as if it had been deleted and recreated
    /// under the same name; returns it.
    pub fn recreate_vm_identity(&self, vm: &str) -> Result<String, AdminError> {
        self.world.recreate_vm_identity(vm)
    }

    /// Lock a datastore file (`[ds] folder/file.vmdk`) on behalf of `holder`
    /// (`None` releases it): hot-add, delete and write opens get `FileLocked`.
    pub fn set_file_lock(&self, file: &str, holder: Option<&str>) {
        self.world.set_file_lock(file, holder)
    }

    /// Report `bytes` as a datastore's `summary.freeSpace` (`None`: the default,
    /// half its capacity).
    pub fn set_datastore_free_space(
        &self,
        datastore: &str,
        bytes: Option<u64>,
    ) -> Result<(), AdminError> {
        self.world.set_datastore_free_space(datastore, bytes)
    }

    /// The SOAP calls made with a session so far (`Method Type:id`), oldest first.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.world.calls).iter().cloned().collect()
    }

    /// Of [`Admin::calls`], those that change vCenter state (tasks, tickets).
    pub fn mutating_calls(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| {
                let m = c.split(' ').next().unwrap_or_default();
                super::world::MUTATING_METHODS.contains(&m)
            })
            .collect()
    }

    /// Grow a disk (refused while it has snapshots); resets its CBT.
    pub fn resize(&self, vm: &str, disk: &str, capacity: u64) -> Result<(), AdminError> {
        self.world.resize_disk(vm, disk, capacity)
    }

    /// Reset a disk's CBT: every earlier changeId becomes invalid.
    pub fn reset_cbt(&self, vm: &str, disk: &str) -> Result<(), AdminError> {
        self.world.reset_cbt(vm, disk)
    }

    /// Delay SOAP responses (`ms = 0` removes the latency).
    pub fn set_latency(&self, l: Latency) {
        lock(&self.world.faults).latency = (l.ms > 0).then_some(l);
    }

    /// Keep every task running at least `ms` milliseconds.
    pub fn set_task_delay(&self, ms: u64) {
        lock(&self.world.faults).task_ms = ms;
    }

    /// Make the next tasks fail.
    pub fn fail_tasks(&self, f: FailTasks) {
        if f.count > 0 {
            lock(&self.world.faults).fail_tasks.push(f);
        }
    }

    /// Drop the next connections.
    pub fn drop_connections(&self, d: DropConnections) {
        if d.count > 0 {
            lock(&self.world.faults).drop_connections.push(d);
        }
    }

    /// Remove every injected fault (the VDDK faults too).
    pub fn clear_faults(&self) {
        *lock(&self.world.faults) = Default::default();
        lock(&self.world.vddk).clear_faults();
    }

    /// Inject a fault for the mock VDDK's next opens of a disk (read errors, a
    /// connection dying mid-disk, slow reads).
    pub fn vddk_fault(&self, f: VddkFault) {
        lock(&self.world.vddk).add_fault(f);
    }

    /// The mock VDDK audit log (every open, close, hot-add, detach, refusal and
    /// cleanup), oldest first.
    pub fn vddk_audit(&self) -> Vec<AuditEntry> {
        lock(&self.world.vddk).audit()
    }

    /// Set VMware Tools and what a quiesce request does in VM `vm`'s guest.
    pub fn set_guest(&self, vm: &str, guest: GuestTools) -> Result<(), AdminError> {
        self.world.set_guest(vm, guest)
    }

    /// Every snapshot request the mock ran (quiesce asked, the snapshot or the
    /// fault), oldest first.
    pub fn snapshot_log(&self) -> Vec<SnapshotAttempt> {
        lock(&self.world.snapshot_log).clone()
    }

    /// Disk handles the mock VDDK holds open.
    pub fn vddk_open_handles(&self) -> usize {
        lock(&self.world.vddk).open_handles()
    }

    /// End every session now; returns how many.
    pub fn expire_sessions(&self) -> usize {
        lock(&self.world.sessions).expire_all()
    }

    /// Expire every NBD ticket now; returns how many.
    pub fn expire_tickets(&self) -> usize {
        lock(&self.world.tickets).expire_all()
    }

    /// Set the SHA-1 thumbprint handed out with NBD tickets (`AA:BB:...`).
    pub fn set_nbd_thumbprint(&self, thumbprint: Option<String>) {
        *lock(&self.world.nbd_thumbprint) = thumbprint;
    }

    /// The state dump.
    pub fn state(&self) -> StateDump {
        self.world.state()
    }
}

// ---- HTTP ------------------------------------------------------------------------

#[derive(Serialize)]
struct ErrorBody {
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fault: Option<String>,
}

fn err(e: AdminError) -> Response {
    let (status, fault) = match &e {
        AdminError::NotFound(_) => (StatusCode::NOT_FOUND, None),
        AdminError::Invalid(_) => (StatusCode::BAD_REQUEST, None),
        AdminError::Fault(f) => (StatusCode::CONFLICT, Some(f.obj.ty.to_string())),
    };
    (
        status,
        Json(ErrorBody {
            error: e.to_string(),
            fault,
        }),
    )
        .into_response()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(ErrorBody {
            error: "missing or wrong admin token (Authorization: Bearer <token>)".into(),
            fault: None,
        }),
    )
        .into_response()
}

fn authorized(st: &AppState, h: &HeaderMap) -> Option<Admin> {
    let given = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant-time comparison is not needed for a test mock, but cheap.
    let want = st.admin_token.as_bytes();
    let ok = given.len() == want.len()
        && given
            .bytes()
            .zip(want.iter())
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            == 0;
    ok.then(|| Admin::new(st.world.clone()))
}

/// `/admin/*` routes.
pub fn router(_state: AppState) -> Router<AppState> {
    Router::new()
        .route("/state", get(state))
        .route("/vms/{vm}/disks/{disk}/write", post(write))
        .route("/vms/{vm}/disks/{disk}/digest", get(digest))
        .route("/vms/{vm}/disks/{disk}/resize", post(resize))
        .route("/vms/{vm}/disks/{disk}/reset-cbt", post(reset_cbt))
        .route("/vms/{vm}/key-provider", post(key_provider))
        .route("/vms/{vm}/guest", post(guest))
        .route("/snapshots/log", get(snapshot_log))
        .route("/faults/latency", post(latency))
        .route("/faults/task-delay", post(task_delay))
        .route("/faults/fail-tasks", post(fail_tasks))
        .route("/faults/drop-connections", post(drop_connections))
        .route("/faults/clear", post(clear))
        .route("/faults/vddk", post(vddk_fault))
        .route("/vddk/audit", get(vddk_audit))
        .route("/sessions/expire", post(expire_sessions))
        .route("/tickets/expire", post(expire_tickets))
}

macro_rules! admin {
    ($st:expr, $h:expr) => {
        match authorized(&$st, &$h) {
            Some(a) => a,
            None => return unauthorized(),
        }
    };
}

async fn state(State(st): State<AppState>, h: HeaderMap) -> Response {
    let a = admin!(st, h);
    Json(a.state()).into_response()
}

#[derive(Serialize)]
struct Changed {
    changed: Vec<(u64, u64)>,
}

async fn write(
    State(st): State<AppState>,
    h: HeaderMap,
    Path((vm, disk)): Path<(String, String)>,
    Json(w): Json<WriteRequest>,
) -> Response {
    let a = admin!(st, h);
    match tokio::task::spawn_blocking(move || a.apply_write(&vm, &disk, &w)).await {
        Ok(Ok(changed)) => Json(Changed { changed }).into_response(),
        Ok(Err(e)) => err(e),
        Err(e) => err(AdminError::Invalid(e.to_string())),
    }
}

#[derive(Deserialize)]
struct DigestQuery {
    snapshot: Option<String>,
}

#[derive(Serialize)]
struct DigestBody {
    blake3: String,
    size: u64,
}

async fn digest(
    State(st): State<AppState>,
    h: HeaderMap,
    Path((vm, disk)): Path<(String, String)>,
    Query(q): Query<DigestQuery>,
) -> Response {
    let a = admin!(st, h);
    match tokio::task::spawn_blocking(move || a.digest(&vm, &disk, q.snapshot.as_deref())).await {
        Ok(Ok((blake3, size))) => Json(DigestBody { blake3, size }).into_response(),
        Ok(Err(e)) => err(e),
        Err(e) => err(AdminError::Invalid(e.to_string())),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeBody {
    capacity: u64,
}

async fn resize(
    State(st): State<AppState>,
    h: HeaderMap,
    Path((vm, disk)): Path<(String, String)>,
    Json(b): Json<ResizeBody>,
) -> Response {
    let a = admin!(st, h);
    match a.resize(&vm, &disk, b.capacity) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => err(e),
    }
}

async fn reset_cbt(
    State(st): State<AppState>,
    h: HeaderMap,
    Path((vm, disk)): Path<(String, String)>,
) -> Response {
    let a = admin!(st, h);
    match a.reset_cbt(&vm, &disk) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => err(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderBody {
    provider: Option<String>,
}

async fn key_provider(
    State(st): State<AppState>,
    h: HeaderMap,
    Path(vm): Path<String>,
    Json(b): Json<ProviderBody>,
) -> Response {
    let a = admin!(st, h);
    match a.set_key_provider(&vm, b.provider.as_deref()) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => err(e),
    }
}

async fn guest(
    State(st): State<AppState>,
    h: HeaderMap,
    Path(vm): Path<String>,
    Json(g): Json<GuestTools>,
) -> Response {
    let a = admin!(st, h);
    match a.set_guest(&vm, g) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => err(e),
    }
}

async fn snapshot_log(State(st): State<AppState>, h: HeaderMap) -> Response {
    let a = admin!(st, h);
    Json(a.snapshot_log()).into_response()
}

async fn latency(State(st): State<AppState>, h: HeaderMap, Json(l): Json<Latency>) -> Response {
    let a = admin!(st, h);
    a.set_latency(l);
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ms {
    ms: u64,
}

async fn task_delay(State(st): State<AppState>, h: HeaderMap, Json(m): Json<Ms>) -> Response {
    let a = admin!(st, h);
    a.set_task_delay(m.ms);
    StatusCode::NO_CONTENT.into_response()
}

async fn fail_tasks(
    State(st): State<AppState>,
    h: HeaderMap,
    Json(f): Json<FailTasks>,
) -> Response {
    let a = admin!(st, h);
    a.fail_tasks(f);
    StatusCode::NO_CONTENT.into_response()
}

async fn drop_connections(
    State(st): State<AppState>,
    h: HeaderMap,
    Json(d): Json<DropConnections>,
) -> Response {
    let a = admin!(st, h);
    a.drop_connections(d);
    StatusCode::NO_CONTENT.into_response()
}

async fn vddk_fault(
    State(st): State<AppState>,
    h: HeaderMap,
    Json(f): Json<VddkFault>,
) -> Response {
    let a = admin!(st, h);
    a.vddk_fault(f);
    StatusCode::NO_CONTENT.into_response()
}

async fn vddk_audit(State(st): State<AppState>, h: HeaderMap) -> Response {
    let a = admin!(st, h);
    Json(a.vddk_audit()).into_response()
}

async fn clear(State(st): State<AppState>, h: HeaderMap) -> Response {
    let a = admin!(st, h);
    a.clear_faults();
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Serialize)]
struct Expired {
    expired: usize,
}

async fn expire_sessions(State(st): State<AppState>, h: HeaderMap) -> Response {
    let a = admin!(st, h);
    Json(Expired {
        expired: a.expire_sessions(),
    })
    .into_response()
}

async fn expire_tickets(State(st): State<AppState>, h: HeaderMap) -> Response {
    let a = admin!(st, h);
    Json(Expired {
        expired: a.expire_tickets(),
    })
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex() {
        assert_eq!(decode_hex("00ff10").unwrap(), vec![0, 255, 16]);
        assert!(decode_hex("0").is_err());
        assert!(decode_hex("zz").is_err());
        assert!(decode_hex("é1").is_err());
    }
}
