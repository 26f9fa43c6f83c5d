//! Snapshots: create (`CreateSnapshot_Task`, memory never included), remove
//! (`RemoveSnapshot_Task`, children kept, consolidation on), read the disks frozen in
//! a snapshot (`VirtualMachineSnapshot.config`), and find ferry's leftover snapshots
//! (named `ferry-*`) for the orphan sweep.

use super::client::{Client, Replay};
use super::error::{from_fault, VsphereError};
use super::soap;
use super::types::{decode_devices, decode_snapshot_info, MoRef, SnapshotNode, VirtualDisk, Vm};
use serde::Serialize;

/// Prefix of every snapshot ferry creates (`ferry-<job id>`).
pub const SNAPSHOT_PREFIX: &str = "ferry-";
/// Start of the description of every snapshot ferry creates.
pub const SNAPSHOT_DESCRIPTION_PREFIX: &str = "ferry backup";

/// The snapshot name for a backup job.
pub fn snapshot_name(job_id: &str) -> String {
    format!("{SNAPSHOT_PREFIX}{job_id}")
}

/// Is this snapshot one of ferry's (by name)?
pub fn is_ferry_snapshot(name: &str) -> bool {
    name.starts_with(SNAPSHOT_PREFIX)
}

/// A ferry snapshot still present on a VM (orphan sweep candidate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeftoverSnapshot {
    /// The VM.
    pub vm: MoRef,
    /// The VM's name.
    pub vm_name: String,
    /// The snapshot.
    pub snapshot: MoRef,
    /// Its name (`ferry-<job id>`).
    pub name: String,
    /// Its description.
    pub description: String,
    /// Creation time (xsd:dateTime as vCenter wrote it).
    pub create_time: String,
}

/// The snapshots of `roots` named `name` (depth first).
pub fn find_snapshots<'a>(roots: &'a [SnapshotNode], name: &str) -> Vec<&'a SnapshotNode> {
    fn walk<'a>(n: &'a [SnapshotNode], name: &str, out: &mut Vec<&'a SnapshotNode>) {
        for s in n {
            if s.name == name {
                out.push(s);
            }
            walk(&s.children, name, out);
        }
    }
    let mut out = Vec::new();
    walk(roots, name, &mut out);
    out
}

impl Client {
    /// Take a snapshot of `vm` (never with memory); returns the snapshot. `quiesce`
    /// asks VMware Tools for an application-consistent one.
    pub async fn create_snapshot(
        &self,
        vm: &Vm,
        name: &str,
        description: &str,
        quiesce: bool,
    ) -> Result<MoRef, VsphereError> {
        let doing = format!(
            "creating snapshot {name:?} of VM {} ({})",
            vm.name, vm.moref.value
        );
        let body = soap::envelope("CreateSnapshot_Task", &vm.moref, |b| {
            b.leaf("name", name)
                .leaf("description", description)
                .leaf("memory", "false")
                .leaf("quiesce", quiesce);
        });
        let resp = self
            .invoke("CreateSnapshot_Task", &body, Replay::Unsafe, &doing)
            .await?
            .map_err(|f| from_fault(&f, &self.ctx(&doing)))?;
        let task = self.task_ref(&resp, &doing)?;
        let info = self.wait_task(&task, &doing).await?;
        let snap = info.result.ok_or_else(|| {
            self.malformed(
                &doing,
                "CreateSnapshot_Task succeeded without a snapshot result",
            )
        })?;
        tracing::info!(vm = %vm.name, snapshot = %snap.value, %name, "snapshot created");
        Ok(snap)
    }

    /// Remove `snapshot` (its children are kept; the disks are consolidated).
    pub async fn remove_snapshot(&self, snapshot: &MoRef) -> Result<(), VsphereError> {
        let doing = format!("removing snapshot {}", snapshot.value);
        let body = soap::envelope("RemoveSnapshot_Task", snapshot, |b| {
            b.leaf("removeChildren", "false")
                .leaf("consolidate", "true");
        });
        let resp = self
            .invoke("RemoveSnapshot_Task", &body, Replay::Unsafe, &doing)
            .await?
            .map_err(|f| from_fault(&f, &self.ctx(&doing)))?;
        let task = self.task_ref(&resp, &doing)?;
        self.wait_task(&task, &doing).await?;
        tracing::info!(snapshot = %snapshot.value, "snapshot removed");
        Ok(())
    }

    /// The virtual disks as frozen in `snapshot` (`config.hardware.device`): their
    /// `fileName` is the snapshot's view of the disk and `changeId` the CBT change id
    /// at snapshot time.
    pub async fn snapshot_disks(&self, snapshot: &MoRef) -> Result<Vec<VirtualDisk>, VsphereError> {
        let doing = format!("reading the disks of snapshot {}", snapshot.value);
        let objs = self
            .collect_objects(
                std::slice::from_ref(snapshot),
                "VirtualMachineSnapshot",
                &["config.hardware.device"],
                &doing,
            )
            .await?;
        let o = objs.iter().find(|o| &o.obj == snapshot).ok_or_else(|| {
            VsphereError::ObjectNotFound {
                vcenter: self.url().to_string(),
                doing: doing.clone(),
                object: snapshot.to_string(),
            }
        })?;
        match o.prop("config.hardware.device") {
            Some(v) => decode_devices(v)
                .map(|(_, d)| d)
                .map_err(|e| self.malformed(&doing, e)),
            None => Err(self.malformed(&doing, "the snapshot has no configuration")),
        }
    }

    /// Every snapshot named `ferry-*` on any VM: what a crashed or killed job left
    /// behind. The caller decides which are really orphaned (e.g. not owned by a
    /// running job) before removing them.
    pub async fn ferry_snapshots(&self) -> Result<Vec<LeftoverSnapshot>, VsphereError> {
        let doing = "looking for leftover ferry snapshots";
        let objs = self
            .collect("VirtualMachine", &["name", "snapshot"], doing)
            .await?;
        let mut out = Vec::new();
        for o in &objs {
            let Some(info) = o.prop("snapshot") else {
                continue;
            };
            let (roots, _) = decode_snapshot_info(info).map_err(|e| self.malformed(doing, e))?;
            let vm_name = o
                .prop("name")
                .map(|v| v.text.trim().to_string())
                .unwrap_or_default();
            let mut stack: Vec<&SnapshotNode> = roots.iter().collect();
            while let Some(s) = stack.pop() {
                if is_ferry_snapshot(&s.name) {
                    out.push(LeftoverSnapshot {
                        vm: o.obj.clone(),
                        vm_name: vm_name.clone(),
                        snapshot: s.snapshot.clone(),
                        name: s.name.clone(),
                        description: s.description.clone(),
                        create_time: s.create_time.clone(),
                    });
                }
                stack.extend(s.children.iter());
            }
        }
        out.sort_by(|a, b| (&a.vm_name, &a.create_time).cmp(&(&b.vm_name, &b.create_time)));
        Ok(out)
    }
}
