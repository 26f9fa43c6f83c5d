//! Typed inventory: VMs (by name, by glob, by reference), hosts, clusters and
//! datastores, read with the property collector. Finding a VM by name reads only
//! names first, then the full properties of the matches, so large inventories cost
//! little. VM folder paths (`/<datacenter>/vm/<folder>...`) come from the `parent`
//! chain of folders and datacenters ([`folder_paths`], pure).

use super::client::Client;
use super::error::VsphereError;
use super::types::{
    Cluster, Datastore, Host, MoRef, ObjectContent, Vm, CLUSTER_PATHS, DATASTORE_PATHS, HOST_PATHS,
    VM_PATHS,
};
use std::collections::HashMap;

/// Deepest folder nesting followed (a parent loop in a hostile answer ends here).
const MAX_FOLDER_DEPTH: usize = 64;

/// One inventory container: its name and parent, as vCenter reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// `name`.
    pub name: String,
    /// `parent` (none for the root folder).
    pub parent: Option<MoRef>,
}

/// Folder path of every VM: `/<datacenter>/<folder>/.../<folder>` following the VM's
/// `parent` up through folders to its datacenter, e.g. `/DC1/vm/tenant-a`. Pure.
/// A VM whose chain is broken, loops or reaches no datacenter gets the names it
/// could follow, rooted at `/`.
pub fn folder_paths(
    vm_parents: &[(MoRef, Option<MoRef>)],
    folders: &HashMap<MoRef, Container>,
    datacenters: &HashMap<MoRef, Container>,
) -> HashMap<MoRef, String> {
    let mut out = HashMap::new();
    for (vm, parent) in vm_parents {
        let mut names: Vec<&str> = Vec::new();
        let mut cur = parent.clone();
        for _ in 0..MAX_FOLDER_DEPTH {
            let Some(p) = cur else { break };
            if let Some(dc) = datacenters.get(&p) {
                names.push(&dc.name);
                break;
            }
            match folders.get(&p) {
                Some(f) => {
                    names.push(&f.name);
                    cur = f.parent.clone();
                }
                None => break,
            }
        }
        names.reverse();
        out.insert(vm.clone(), format!("/{}", names.join("/")));
    }
    out
}

fn containers(objs: &[ObjectContent]) -> HashMap<MoRef, Container> {
    objs.iter()
        .map(|o| {
            let c = Container {
                name: o
                    .prop("name")
                    .map(|v| v.text.trim().to_string())
                    .unwrap_or_default(),
                parent: o.prop("parent").and_then(|v| MoRef::decode(v).ok()),
            };
            (o.obj.clone(), c)
        })
        .collect()
}

impl Client {
    /// `(reference, name)` of every VM (templates included).
    pub async fn vm_names(&self) -> Result<Vec<(MoRef, String)>, VsphereError> {
        let objs = self
            .collect("VirtualMachine", &["name"], "listing VM names")
            .await?;
        Ok(objs
            .into_iter()
            .map(|o| {
                let name = o
                    .prop("name")
                    .map(|v| v.text.trim().to_string())
                    .unwrap_or_default();
                (o.obj, name)
            })
            .collect())
    }

    /// The folder path of each of `vms` (read by [`Client::vms`], whose `parent`
    /// they carry; see [`folder_paths`]). Reads only folders and datacenters.
    pub async fn vm_folder_paths(
        &self,
        vms: &[Vm],
    ) -> Result<HashMap<MoRef, String>, VsphereError> {
        let doing = "reading the VM folder tree";
        let folders = self.collect("Folder", &["name", "parent"], doing).await?;
        let dcs = self
            .collect("Datacenter", &["name", "parent"], doing)
            .await?;
        let parents: Vec<(MoRef, Option<MoRef>)> = vms
            .iter()
            .map(|v| (v.moref.clone(), v.parent.clone()))
            .collect();
        Ok(folder_paths(
            &parents,
            &containers(&folders),
            &containers(&dcs),
        ))
    }

    /// Every VM with the properties ferry needs, sorted by name.
    pub async fn vms(&self) -> Result<Vec<Vm>, VsphereError> {
        let doing = "reading the VM inventory";
        let objs = self.collect("VirtualMachine", VM_PATHS, doing).await?;
        let mut vms = objs
            .iter()
            .map(|o| Vm::decode(o).map_err(|e| self.malformed(doing, format!("{}: {e}", o.obj))))
            .collect::<Result<Vec<_>, _>>()?;
        vms.sort_by(|a, b| a.name.cmp(&b.name).then(a.moref.cmp(&b.moref)));
        Ok(vms)
    }

    /// VMs whose name matches `glob` ([`crate::glob::glob`]), sorted by name.
    pub async fn vms_matching(&self, glob: &str) -> Result<Vec<Vm>, VsphereError> {
        let refs: Vec<MoRef> = self
            .vm_names()
            .await?
            .into_iter()
            .filter(|(_, n)| crate::glob::glob(glob, n))
            .map(|(r, _)| r)
            .collect();
        self.vms_by_ref(&refs, &format!("reading VMs matching {glob:?}"))
            .await
    }

    /// Full properties of the VMs `refs`, sorted by name.
    pub async fn vms_by_ref(&self, refs: &[MoRef], doing: &str) -> Result<Vec<Vm>, VsphereError> {
        let objs = self
            .collect_objects(refs, "VirtualMachine", VM_PATHS, doing)
            .await?;
        let mut vms = objs
            .iter()
            .map(|o| Vm::decode(o).map_err(|e| self.malformed(doing, format!("{}: {e}", o.obj))))
            .collect::<Result<Vec<_>, _>>()?;
        vms.sort_by(|a, b| a.name.cmp(&b.name).then(a.moref.cmp(&b.moref)));
        Ok(vms)
    }

    /// The VM named exactly `name`. Errors when there is none or more than one.
    pub async fn vm_by_name(&self, name: &str) -> Result<Vm, VsphereError> {
        let refs: Vec<MoRef> = self
            .vm_names()
            .await?
            .into_iter()
            .filter(|(_, n)| n == name)
            .map(|(r, _)| r)
            .collect();
        let not_found = |hint: String| VsphereError::NotFound {
            vcenter: self.url().to_string(),
            kind: "VM",
            name: name.to_string(),
            hint,
        };
        match refs.len() {
            0 => Err(not_found(String::new())),
            1 => self.vm(&refs[0]).await,
            _ => Err(not_found(format!(
                "; the name is ambiguous, {} VMs carry it ({})",
                refs.len(),
                refs.iter()
                    .map(|r| r.value.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Read (or re-read) one VM.
    pub async fn vm(&self, vm: &MoRef) -> Result<Vm, VsphereError> {
        let doing = format!("reading VM {}", vm.value);
        let objs = self
            .collect_objects(std::slice::from_ref(vm), "VirtualMachine", VM_PATHS, &doing)
            .await?;
        let o = objs
            .iter()
            .find(|o| &o.obj == vm)
            .ok_or_else(|| VsphereError::ObjectNotFound {
                vcenter: self.url().to_string(),
                doing: doing.clone(),
                object: vm.to_string(),
            })?;
        Vm::decode(o).map_err(|e| self.malformed(&doing, e))
    }

    /// Every ESXi host.
    pub async fn hosts(&self) -> Result<Vec<Host>, VsphereError> {
        let doing = "reading hosts";
        let objs = self.collect("HostSystem", HOST_PATHS, doing).await?;
        objs.iter()
            .map(|o| Host::decode(o).map_err(|e| self.malformed(doing, e)))
            .collect()
    }

    /// Every cluster.
    pub async fn clusters(&self) -> Result<Vec<Cluster>, VsphereError> {
        let doing = "reading clusters";
        let objs = self
            .collect("ClusterComputeResource", CLUSTER_PATHS, doing)
            .await?;
        objs.iter()
            .map(|o| Cluster::decode(o).map_err(|e| self.malformed(doing, e)))
            .collect()
    }

    /// Every datastore.
    pub async fn datastores(&self) -> Result<Vec<Datastore>, VsphereError> {
        let doing = "reading datastores";
        let objs = self.collect("Datastore", DATASTORE_PATHS, doing).await?;
        objs.iter()
            .map(|o| Datastore::decode(o).map_err(|e| self.malformed(doing, e)))
            .collect()
    }
}

#[cfg(test)]
mod folder_tests {
    use super::*;

    #[test]
    fn folder_paths_follow_parents_to_the_datacenter() {
        let r = |k: &str, v: &str| MoRef::new(k, v);
        let c = |n: &str, p: Option<MoRef>| Container {
            name: n.into(),
            parent: p,
        };
        let folders: HashMap<MoRef, Container> = [
            (r("Folder", "group-d1"), c("Datacenters", None)),
            (
                r("Folder", "group-v3"),
                c("vm", Some(r("Datacenter", "dc-1"))),
            ),
            (
                r("Folder", "group-v9"),
                c("tenant-a", Some(r("Folder", "group-v3"))),
            ),
            (r("Folder", "loop"), c("loop", Some(r("Folder", "loop")))),
        ]
        .into_iter()
        .collect();
        let dcs: HashMap<MoRef, Container> = [(
            r("Datacenter", "dc-1"),
            c("DC1", Some(r("Folder", "group-d1"))),
        )]
        .into_iter()
        .collect();
        let vms = vec![
            (r("VirtualMachine", "vm-1"), Some(r("Folder", "group-v9"))),
            (r("VirtualMachine", "vm-2"), Some(r("Folder", "group-v3"))),
            (r("VirtualMachine", "vm-3"), Some(r("Folder", "loop"))),
            (r("VirtualMachine", "vm-4"), None),
        ];
        let p = folder_paths(&vms, &folders, &dcs);
        assert_eq!(p[&r("VirtualMachine", "vm-1")], "/DC1/vm/tenant-a");
        assert_eq!(p[&r("VirtualMachine", "vm-2")], "/DC1/vm");
        assert!(p[&r("VirtualMachine", "vm-3")].starts_with("/loop/loop"));
        assert_eq!(p[&r("VirtualMachine", "vm-4")], "/");
    }
}
