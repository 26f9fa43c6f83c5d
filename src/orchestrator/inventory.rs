//! The orchestrator's inventory seam: which VMs a vCenter has, as the transport
//! selector sees them ([`VmInfo`]) plus their folder. The vSphere SOAP client
//! implements [`Inventory`]; [`FileInventory`] reads a JSON file (offline
//! planning, labs, tests) and [`StaticInventory`] holds a fixed list.

use super::config::VcenterConfig;
use crate::transport::select::VmInfo;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

/// A boxed, sendable future (the seams are object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One VM of the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryVm {
    /// Folder path, e.g. `/DC1/vm/tenant-a`.
    pub folder: String,
    /// The VM (name, moref, host, encryption, key provider, disks).
    #[serde(flatten)]
    pub vm: VmInfo,
}

/// Inventory errors.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The vCenter cannot be reached or refused the login.
    #[error("vCenter {vcenter}: {message}")]
    Unavailable {
        /// vCenter name.
        vcenter: String,
        /// What happened and what to check.
        message: String,
    },
    /// An inventory file is unreadable or malformed.
    #[error("inventory file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Where VMs come from. Called once per run and per `plan`.
pub trait Inventory: Send + Sync {
    /// Every VM of `vcenter` (the orchestrator filters by job).
    fn vms<'a>(
        &'a self,
        vcenter: &'a VcenterConfig,
    ) -> BoxFuture<'a, Result<Vec<InventoryVm>, InventoryError>>;

    /// Release what is kept between reads (the live inventory's vCenter
    /// sessions), before the process exits. Reads after it start over.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// A fixed list, whatever the vCenter.
#[derive(Debug, Clone, Default)]
pub struct StaticInventory(pub Vec<InventoryVm>);

impl Inventory for StaticInventory {
    fn vms<'a>(
        &'a self,
        _vcenter: &'a VcenterConfig,
    ) -> BoxFuture<'a, Result<Vec<InventoryVm>, InventoryError>> {
        let v = self.0.clone();
        Box::pin(async move { Ok(v) })
    }
}

/// The largest inventory file read.
const FILE_MAX: u64 = 64 << 20;

/// Reads `inventory_file` of the vCenter entry: `{"vms": [InventoryVm...]}`.
#[derive(Debug, Clone, Default)]
pub struct FileInventory;

/// The JSON inventory file format.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryFile {
    /// The VMs.
    pub vms: Vec<InventoryVm>,
}

impl FileInventory {
    /// Read one file.
    pub fn read(path: &std::path::Path) -> Result<Vec<InventoryVm>, InventoryError> {
        let err = |message: String| InventoryError::File {
            path: path.to_path_buf(),
            message,
        };
        let len = std::fs::metadata(path)
            .map_err(|e| err(e.to_string()))?
            .len();
        if len > FILE_MAX {
            return Err(err(format!("larger than {FILE_MAX} bytes")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let f: InventoryFile = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        Ok(f.vms)
    }
}

impl Inventory for FileInventory {
    fn vms<'a>(
        &'a self,
        vcenter: &'a VcenterConfig,
    ) -> BoxFuture<'a, Result<Vec<InventoryVm>, InventoryError>> {
        Box::pin(async move {
            let Some(p) = vcenter.inventory_file.clone() else {
                return Err(InventoryError::Unavailable {
                    vcenter: vcenter.name.clone(),
                    message: "no inventory_file configured".into(),
                });
            };
            tokio::task::spawn_blocking(move || FileInventory::read(&p))
                .await
                .map_err(|e| InventoryError::Unavailable {
                    vcenter: vcenter.name.clone(),
                    message: format!("reading the inventory file failed: {e}"),
                })?
        })
    }
}

/// What the orchestrator uses: `inventory_file` entries are read from their
/// file; `url` entries go to `vsphere`, the vSphere client's implementation,
/// when this build has one.
#[derive(Clone, Default)]
pub struct ConfigInventory {
    /// The live vCenter inventory (the vSphere SOAP client).
    pub vsphere: Option<Arc<dyn Inventory>>,
}

impl Inventory for ConfigInventory {
    fn close(&self) -> BoxFuture<'_, ()> {
        match &self.vsphere {
            Some(v) => v.close(),
            None => Box::pin(async {}),
        }
    }

    fn vms<'a>(
        &'a self,
        vcenter: &'a VcenterConfig,
    ) -> BoxFuture<'a, Result<Vec<InventoryVm>, InventoryError>> {
        if vcenter.inventory_file.is_some() {
            return FileInventory.vms(vcenter);
        }
        match &self.vsphere {
            Some(v) => v.vms(vcenter),
            None => Box::pin(async move {
                Err(InventoryError::Unavailable {
                    vcenter: vcenter.name.clone(),
                    message: "no live vCenter inventory was given to this orchestrator; use inventory_file".into(),
                })
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_format_flattens_the_vm() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("inv.json");
        std::fs::write(
            &p,
            r#"{"vms": [{"folder": "/DC/vm/a", "name": "a01", "moref": "vm-1", "host": "esx-1",
                 "encrypted": true, "key_provider": "KMS-A",
                 "disks": [{"key": 2000, "label": "Hard disk 1", "datastore": "ds-a", "encrypted": true}]}]}"#,
        )
        .unwrap();
        let vms = FileInventory::read(&p).unwrap();
        assert_eq!(vms[0].folder, "/DC/vm/a");
        assert_eq!(vms[0].vm.key_provider.as_deref(), Some("KMS-A"));
        std::fs::write(&p, r#"{"vms": [], "x": 1}"#).unwrap();
        assert!(matches!(
            FileInventory::read(&p),
            Err(InventoryError::File { .. })
        ));
        assert!(FileInventory::read(&dir.path().join("missing")).is_err());
    }
}
