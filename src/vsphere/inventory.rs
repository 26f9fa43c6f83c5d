//! Typed inventory: VMs (by name, by glob, by reference), hosts, clusters and
//! datastores, read with the property collector. Finding a VM by name reads only
//! names first, then the full properties of the matches, so large inventories cost
//! little.

use super::client::Client;
use super::error::VsphereError;
use super::types::{
    Cluster, Datastore, Host, MoRef, Vm, CLUSTER_PATHS, DATASTORE_PATHS, HOST_PATHS, VM_PATHS,
};

/// Shell-style glob match: `*` any run, `?` one character, everything else literal.
/// At most O(pattern × name) steps (no exponential backtracking).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
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

    /// VMs whose name matches `glob` ([`glob_match`]), sorted by name.
    pub async fn vms_matching(&self, glob: &str) -> Result<Vec<Vm>, VsphereError> {
        let refs: Vec<MoRef> = self
            .vm_names()
            .await?
            .into_iter()
            .filter(|(_, n)| glob_match(glob, n))
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
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        for (p, n, m) in [
            ("*", "", true),
            ("*", "web01", true),
            ("web*", "web01", true),
            ("web*", "db01", false),
            ("*01", "web01", true),
            ("w?b0?", "web01", true),
            ("w?b0?", "web1", false),
            ("*b*1", "web01", true),
            ("web01", "web01", true),
            ("web01", "web011", false),
            ("", "", true),
            ("", "a", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
        ] {
            assert_eq!(glob_match(p, n), m, "{p:?} vs {n:?}");
        }
        // Pathological patterns stay fast.
        let long = "a".repeat(5000);
        assert!(!glob_match(&format!("{}b", "*a".repeat(100)), &long));
    }
}
