//! The live inventory: [`Inventory`] over ferry's vim25 SOAP client, for
//! `[[vcenter]]` entries with a `url`, kept **incrementally**.
//!
//! Owns, per vCenter, one session with a private property collector, a container
//! view of VMs, folders and datacenters and property filters over it
//! ([`crate::vsphere::updates`]; one filter for VMs, one for folders and
//! datacenters), the VMs as last read, and the mapping from
//! vCenter's VMs to the selector's view ([`crate::job::vm::vm_info`], the same
//! mapping the agents use at job start). The first read of a vCenter is a full
//! read (`WaitForUpdatesEx` from an empty version: every object, in parts of
//! `maxObjectUpdates`); every later read asks `WaitForUpdatesEx` (`maxWaitSeconds`
//! 0) for what changed since and applies it: VMs entered are decoded from the
//! update, VMs that left are dropped, and a VM's changed properties are applied
//! to it when they are the watched paths themselves, else the VM is read again.
//! On any doubt — the session was renewed (vCenter restarted, the session
//! expired), `InvalidCollectorVersion`, the collector or a VM is gone, an answer
//! that does not decode, a configuration change — the watch is dropped and the
//! read is a full one again, with a log line saying why.
//!
//! Why caching is safe here: the inventory only places VMs (which agent, which
//! mode); it never authorises anything. Every agent re-reads the VM from vCenter
//! at job start and runs the selector again with itself as the only candidate, so
//! a placement made from an inventory one change behind is refused or corrected
//! there, never executed blindly. And the cache is not a guess: each read still
//! asks vCenter for every change since the previous one.
//!
//! Must not: list templates as backup candidates; keep a watch across a session
//! renewal (filters die with their session, and a new session's collector would
//! report nothing); serve a cached inventory when vCenter cannot be asked (an
//! unreachable vCenter is an error, as before).
//!
//! Folders: each VM's folder path (`/<datacenter>/vm/<folder>...`) is computed
//! from the `parent` chain of the watched folders and datacenters, so jobs'
//! `folders` selections work against live vCenters.

use super::config::VcenterConfig;
use super::inventory::{BoxFuture, Inventory, InventoryError, InventoryVm};
use crate::config::VcenterSection;
use crate::vsphere::inventory::{folder_paths, Container};
use crate::vsphere::types::{DecodeError, ObjectContent};
use crate::vsphere::updates::{ObjectUpdate, PropertyChange, UpdateKind, Watch};
use crate::vsphere::{Client, ClientConfig, MoRef, Vm, VsphereError};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The VM properties the orchestrator's inventory watches (what
/// [`crate::job::vm::vm_info`] and the folder path need, plus the instance UUID).
/// Snapshots, power state and CBT are not watched: they change every night and
/// the placement does not depend on them.
pub const INVENTORY_VM_PATHS: &[&str] = &[
    "name",
    "config.instanceUuid",
    "config.template",
    "config.hardware.device",
    "config.keyId",
    "runtime.host",
    "parent",
];

/// Folder and datacenter properties watched (for folder paths).
const CONTAINER_PATHS: &[&str] = &["name", "parent"];

/// Objects per `WaitForUpdatesEx` part and per re-read page (default).
pub const PAGE: u32 = 1000;

/// How an inventory read went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadKind {
    /// Every object was read: the first read, or after `reason`.
    Full {
        /// Why the previous watch was dropped (`None`: there was none).
        reason: Option<String>,
    },
    /// Only the changes since the previous read.
    Incremental {
        /// Object updates vCenter reported.
        updates: usize,
        /// VMs read again because a change could not be applied in place.
        reread: usize,
    },
}

/// The last read of one vCenter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadReport {
    /// Full or incremental.
    pub kind: ReadKind,
    /// VMs listed (templates excluded).
    pub vms: usize,
    /// Time the read took.
    pub elapsed: Duration,
}

/// One vCenter's session, watch and VMs.
struct Live {
    /// The configuration the session was made with.
    key: String,
    client: Client,
    watch: Watch,
    vms: HashMap<MoRef, Vm>,
    folders: HashMap<MoRef, Container>,
    dcs: HashMap<MoRef, Container>,
}

type Slot = Arc<tokio::sync::Mutex<Option<Live>>>;

/// Reads VMs from live vCenters with the SOAP client, incrementally (module
/// documentation). One per orchestrator; cheap to share (`Arc`).
pub struct VsphereInventory {
    live: Mutex<HashMap<String, Slot>>,
    reports: Mutex<HashMap<String, ReadReport>>,
    page: u32,
}

impl Default for VsphereInventory {
    fn default() -> Self {
        VsphereInventory {
            live: Mutex::default(),
            reports: Mutex::default(),
            page: PAGE,
        }
    }
}

impl std::fmt::Debug for VsphereInventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsphereInventory").finish_non_exhaustive()
    }
}

fn config_key(v: &VcenterConfig) -> String {
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}",
        v.url, v.user, v.password_file, v.ca, v.thumbprint
    )
}

impl VsphereInventory {
    /// A new inventory with no session yet.
    pub fn new() -> VsphereInventory {
        VsphereInventory::default()
    }

    /// Objects per `WaitForUpdatesEx` part and per page of VMs read again
    /// (`maxObjectUpdates`, `maxObjects`; default [`PAGE`]).
    pub fn with_page_size(mut self, page: u32) -> VsphereInventory {
        self.page = page.max(1);
        self
    }

    /// How the last read of vCenter `name` went.
    pub fn last_read(&self, name: &str) -> Option<ReadReport> {
        self.reports.lock().ok()?.get(name).cloned()
    }

    /// The client configuration of a `[[vcenter]]` entry.
    pub fn client_config(v: &VcenterConfig, page: u32) -> Result<ClientConfig, InventoryError> {
        let unavailable = |message: String| InventoryError::Unavailable {
            vcenter: v.name.clone(),
            message,
        };
        let (Some(url), Some(user), Some(password_file)) = (&v.url, &v.user, &v.password_file)
        else {
            return Err(unavailable(
                "a live vCenter needs url, user and password_file".into(),
            ));
        };
        let section = VcenterSection {
            url: url.clone(),
            user: user.clone(),
            password_file: password_file.clone(),
            ca: v.ca.clone(),
            thumbprint: v.thumbprint.clone(),
            proxy_vm: None,
            timeout_secs: 60,
        };
        let mut c = ClientConfig::from_section(&section).map_err(|e| unavailable(e.to_string()))?;
        c.backoff = Duration::from_millis(500);
        c.page_size = page.max(1);
        Ok(c)
    }

    fn slot(&self, name: &str) -> Slot {
        let mut m = self.live.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(name.to_string()).or_default().clone()
    }

    fn report(&self, name: &str, r: ReadReport) {
        if let Ok(mut m) = self.reports.lock() {
            m.insert(name.to_string(), r);
        }
    }

    async fn read(&self, vcenter: &VcenterConfig) -> Result<Vec<InventoryVm>, InventoryError> {
        let t0 = Instant::now();
        let slot = self.slot(&vcenter.name);
        let mut guard = slot.lock().await;
        let key = config_key(vcenter);
        let reason = match guard.as_mut() {
            None => None,
            Some(live) if live.key != key => Some("the vCenter's configuration changed".into()),
            Some(live) => match live.refresh(self.page).await {
                Ok((updates, reread)) => {
                    let out = live.output();
                    self.report(
                        &vcenter.name,
                        ReadReport {
                            kind: ReadKind::Incremental { updates, reread },
                            vms: out.len(),
                            elapsed: t0.elapsed(),
                        },
                    );
                    tracing::debug!(vcenter = %vcenter.name, updates, reread, vms = out.len(), "inventory changes applied");
                    return Ok(out);
                }
                Err(why) => Some(why),
            },
        };
        if let Some(old) = guard.take() {
            // Best effort, in the background: the session may be gone already.
            tokio::spawn(async move {
                old.client.destroy_watch(&old.watch).await;
                old.client.logout().await;
            });
        }
        match &reason {
            Some(r) => {
                tracing::info!(vcenter = %vcenter.name, reason = %r, "full inventory read instead of changes")
            }
            None => tracing::debug!(vcenter = %vcenter.name, "first inventory read (full)"),
        }
        let live = Live::open(vcenter, key, self.page).await?;
        let out = live.output();
        *guard = Some(live);
        self.report(
            &vcenter.name,
            ReadReport {
                kind: ReadKind::Full { reason },
                vms: out.len(),
                elapsed: t0.elapsed(),
            },
        );
        Ok(out)
    }
}

impl Inventory for VsphereInventory {
    fn vms<'a>(
        &'a self,
        vcenter: &'a VcenterConfig,
    ) -> BoxFuture<'a, Result<Vec<InventoryVm>, InventoryError>> {
        Box::pin(self.read(vcenter))
    }

    /// Destroy every watch and log out of every vCenter (a one-shot `plan` or
    /// `run --once` must not leave sessions behind until vCenter's idle expiry).
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let slots: Vec<Slot> = {
                let m = self.live.lock().unwrap_or_else(|e| e.into_inner());
                m.values().cloned().collect()
            };
            for slot in slots {
                if let Some(live) = slot.lock().await.take() {
                    live.client.destroy_watch(&live.watch).await;
                    live.client.logout().await;
                }
            }
        })
    }
}

/// Why a change could not be applied: the watch is dropped and the read is full.
type Doubt = String;

fn describe(e: &VsphereError) -> String {
    match e {
        VsphereError::Fault { fault_type, .. } if fault_type == "InvalidCollectorVersion" => {
            format!("vCenter no longer knows the collector version ({e})")
        }
        VsphereError::ObjectNotFound { .. } => format!(
            "the property collector, its filter or a changed VM is gone (session lost, or the VM was deleted meanwhile): {e}"
        ),
        VsphereError::NotAuthenticated { .. } => format!("the session was lost: {e}"),
        _ => e.to_string(),
    }
}

impl Live {
    async fn open(vcenter: &VcenterConfig, key: String, page: u32) -> Result<Live, InventoryError> {
        let unavailable = |e: VsphereError| InventoryError::Unavailable {
            vcenter: vcenter.name.clone(),
            message: e.to_string(),
        };
        let cfg = VsphereInventory::client_config(vcenter, page)?;
        let client = Client::connect(cfg).await.map_err(unavailable)?;
        let opened = async {
            let mut watch = client
                .create_watch(
                    &["VirtualMachine", "Folder", "Datacenter"],
                    &[
                        &[("VirtualMachine", INVENTORY_VM_PATHS)],
                        &[("Folder", CONTAINER_PATHS), ("Datacenter", CONTAINER_PATHS)],
                    ],
                )
                .await?;
            let updates = client.wait_for_updates(&mut watch, page).await?;
            Ok::<_, VsphereError>((watch, updates))
        }
        .await;
        let (watch, updates) = match opened {
            Ok(x) => x,
            Err(e) => {
                client.logout().await;
                return Err(unavailable(e));
            }
        };
        let mut live = Live {
            key,
            client,
            watch,
            vms: HashMap::new(),
            folders: HashMap::new(),
            dcs: HashMap::new(),
        };
        if let Err(why) = live.apply(updates, page).await {
            live.client.logout().await;
            return Err(InventoryError::Unavailable {
                vcenter: vcenter.name.clone(),
                message: format!("reading the inventory: {why}"),
            });
        }
        Ok(live)
    }

    /// Ask for and apply the changes since the last read: `(updates, VMs re-read)`.
    async fn refresh(&mut self, page: u32) -> Result<(usize, usize), Doubt> {
        if !self.watch.is_current(&self.client) {
            return Err("the vCenter session was renewed (vCenter restarted or the session expired); the property filter died with it".into());
        }
        let updates = self
            .client
            .wait_for_updates(&mut self.watch, page)
            .await
            .map_err(|e| describe(&e))?;
        if !self.watch.is_current(&self.client) {
            return Err("the vCenter session was renewed while changes were read".into());
        }
        let n = updates.len();
        let reread = self.apply(updates, page).await?;
        Ok((n, reread))
    }

    /// Apply object updates; returns how many VMs had to be read again.
    async fn apply(&mut self, updates: Vec<ObjectUpdate>, page: u32) -> Result<usize, Doubt> {
        let mut reread: Vec<MoRef> = Vec::new();
        let mut queued: HashSet<MoRef> = HashSet::new();
        for u in updates {
            if u.kind == UpdateKind::Leave {
                self.vms.remove(&u.obj);
                self.folders.remove(&u.obj);
                self.dcs.remove(&u.obj);
                if queued.remove(&u.obj) {
                    reread.retain(|r| r != &u.obj);
                }
                continue;
            }
            match u.obj.kind.as_str() {
                "VirtualMachine" => {
                    let applied = if u.kind == UpdateKind::Enter {
                        let vm = decode_vm(&u.content())
                            .map_err(|e| format!("{} in an update does not decode: {e}", u.obj))?;
                        self.vms.insert(u.obj.clone(), vm);
                        true
                    } else if let Some(vm) = self.vms.get_mut(&u.obj) {
                        let mut all = true;
                        for c in &u.changes {
                            let done = apply_change(vm, c).map_err(|e| {
                                format!("{}: change of {} does not decode: {e}", u.obj, c.name)
                            })?;
                            if !done {
                                all = false;
                                break;
                            }
                        }
                        all
                    } else {
                        false
                    };
                    if !applied && queued.insert(u.obj.clone()) {
                        reread.push(u.obj.clone());
                    }
                }
                "Folder" | "Datacenter" => {
                    let map = if u.obj.kind == "Folder" {
                        &mut self.folders
                    } else {
                        &mut self.dcs
                    };
                    let c = map.entry(u.obj.clone()).or_insert_with(|| Container {
                        name: String::new(),
                        parent: None,
                    });
                    for ch in &u.changes {
                        let val = ch.val.as_ref().filter(|_| ch.op == "assign");
                        match ch.name.as_str() {
                            "name" => {
                                c.name = val.map(|v| v.text.trim().to_string()).unwrap_or_default()
                            }
                            "parent" => c.parent = val.and_then(|v| MoRef::decode(v).ok()),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        let n = reread.len();
        for chunk in reread.chunks(page.max(1) as usize) {
            let objs = self
                .client
                .collect_objects(
                    chunk,
                    "VirtualMachine",
                    INVENTORY_VM_PATHS,
                    "reading changed VMs again",
                )
                .await
                .map_err(|e| describe(&e))?;
            for o in objs {
                let vm = decode_vm(&o).map_err(|e| format!("{}: {e}", o.obj))?;
                self.vms.insert(o.obj.clone(), vm);
            }
        }
        Ok(n)
    }

    /// The VMs as the orchestrator sees them: templates left out, sorted by name
    /// (then reference), each with its folder path.
    fn output(&self) -> Vec<InventoryVm> {
        let mut list: Vec<&Vm> = self.vms.values().filter(|v| !v.template).collect();
        list.sort_by(|a, b| a.name.cmp(&b.name).then(a.moref.cmp(&b.moref)));
        let parents: Vec<(MoRef, Option<MoRef>)> = list
            .iter()
            .map(|v| (v.moref.clone(), v.parent.clone()))
            .collect();
        let paths = folder_paths(&parents, &self.folders, &self.dcs);
        list.into_iter()
            .map(|v| InventoryVm {
                folder: paths.get(&v.moref).cloned().unwrap_or_else(|| "/".into()),
                vm: crate::job::vm::vm_info(v),
            })
            .collect()
    }
}

/// Decode a VM of the watched paths, without what the inventory does not keep.
fn decode_vm(oc: &ObjectContent) -> Result<Vm, DecodeError> {
    let mut vm = Vm::decode(oc)?;
    vm.devices = Vec::new();
    Ok(vm)
}

/// Apply one property change to a VM in place. `Ok(false)`: not a watched path
/// as such (a nested path, an `add`...): the VM must be read again. Pure.
pub fn apply_change(vm: &mut Vm, c: &PropertyChange) -> Result<bool, DecodeError> {
    if c.op != "assign" && c.op != "remove" {
        return Ok(false);
    }
    let oc = ObjectContent {
        obj: vm.moref.clone(),
        props: match (&c.val, c.op.as_str()) {
            (Some(v), "assign") => vec![(c.name.clone(), v.clone())],
            _ => Vec::new(),
        },
        missing: Vec::new(),
    };
    let d = Vm::decode(&oc)?;
    match c.name.as_str() {
        "name" => vm.name = d.name,
        "config.instanceUuid" => vm.instance_uuid = d.instance_uuid,
        "config.template" => vm.template = d.template,
        "config.hardware.device" => vm.disks = d.disks,
        "config.keyId" => vm.key_id = d.key_id,
        "runtime.host" => vm.host = d.host,
        "parent" => vm.parent = d.parent,
        _ => return Ok(false),
    }
    Ok(true)
}

/// The inventory as a full read with `RetrievePropertiesEx` gives it (paged
/// container views, the way ferry read it before the watch): the reference the
/// incremental inventory is tested against.
pub async fn full_read(client: &Client) -> Result<Vec<InventoryVm>, VsphereError> {
    let vms = client.vms().await?;
    let folders = client.vm_folder_paths(&vms).await?;
    Ok(vms
        .iter()
        .filter(|v| !v.template)
        .map(|v| InventoryVm {
            folder: folders.get(&v.moref).cloned().unwrap_or_else(|| "/".into()),
            vm: crate::job::vm::vm_info(v),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vsphere::xml::{parse, Limits};

    fn el(x: &str) -> crate::vsphere::xml::Element {
        parse(x.as_bytes(), &Limits::default()).unwrap()
    }

    #[test]
    fn changes_of_watched_paths_apply_in_place_others_ask_for_a_read() {
        let obj = MoRef::new("VirtualMachine", "vm-1");
        let mut vm = Vm::decode(&ObjectContent {
            obj: obj.clone(),
            props: vec![
                ("name".into(), el("<val>a</val>")),
                (
                    "runtime.host".into(),
                    el(r#"<val type="HostSystem">host-1</val>"#),
                ),
            ],
            missing: vec![],
        })
        .unwrap();
        let ch = |name: &str, op: &str, val: Option<&str>| PropertyChange {
            name: name.into(),
            op: op.into(),
            val: val.map(el),
        };
        assert!(apply_change(&mut vm, &ch("name", "assign", Some("<val>b</val>"))).unwrap());
        assert_eq!(vm.name, "b");
        assert!(apply_change(
            &mut vm,
            &ch(
                "runtime.host",
                "assign",
                Some(r#"<val type="HostSystem">host-2</val>"#)
            )
        )
        .unwrap());
        assert_eq!(vm.host, Some(MoRef::new("HostSystem", "host-2")));
        assert!(apply_change(
            &mut vm,
            &ch(
                "config.keyId",
                "assign",
                Some("<val><keyId>k</keyId><providerId><id>KMS-A</id></providerId></val>")
            )
        )
        .unwrap());
        assert_eq!(
            vm.key_id.as_ref().unwrap().provider_id.as_deref(),
            Some("KMS-A")
        );
        assert!(apply_change(&mut vm, &ch("config.keyId", "remove", None)).unwrap());
        assert!(vm.key_id.is_none());
        assert!(!apply_change(
            &mut vm,
            &ch(
                "config.hardware.device[2000].backing",
                "assign",
                Some("<val/>")
            )
        )
        .unwrap());
        assert!(!apply_change(&mut vm, &ch("name", "add", Some("<val>c</val>"))).unwrap());
        assert_eq!(vm.name, "b");
    }
}
