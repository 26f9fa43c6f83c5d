//! The live inventory: [`Inventory`] over ferry's vim25 SOAP client, for
//! `[[vcenter]]` entries with a `url`.
//!
//! Owns one short session per inventory read (login, property collector, logout)
//! and the mapping from vCenter's VMs to the selector's view
//! ([`crate::job::vm::vm_info`], the same mapping the agents use at job start).
//! Must not: cache inventory between runs (the agents re-read the VM anyway), or
//! list templates as backup candidates.
//!
//! Folders: each VM's folder path (`/<datacenter>/vm/<folder>...`) is read from
//! the `parent` chain, so jobs' `folders` selections work against live vCenters.

use super::config::VcenterConfig;
use super::inventory::{BoxFuture, Inventory, InventoryError, InventoryVm};
use crate::config::VcenterSection;
use crate::vsphere::{Client, ClientConfig};
use std::time::Duration;

/// Reads VMs from live vCenters with the SOAP client.
#[derive(Debug, Clone, Default)]
pub struct VsphereInventory;

impl VsphereInventory {
    fn client_config(v: &VcenterConfig) -> Result<ClientConfig, InventoryError> {
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
        Ok(c)
    }
}

impl Inventory for VsphereInventory {
    fn vms<'a>(
        &'a self,
        vcenter: &'a VcenterConfig,
    ) -> BoxFuture<'a, Result<Vec<InventoryVm>, InventoryError>> {
        Box::pin(async move {
            let unavailable = |message: String| InventoryError::Unavailable {
                vcenter: vcenter.name.clone(),
                message,
            };
            let cfg = Self::client_config(vcenter)?;
            let client = Client::connect(cfg)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            let vms = client.vms().await;
            let folders = match &vms {
                Ok(vms) => client.vm_folder_paths(vms).await,
                Err(_) => Ok(Default::default()),
            };
            client.logout().await;
            let vms = vms.map_err(|e| unavailable(e.to_string()))?;
            let folders = folders.map_err(|e| unavailable(e.to_string()))?;
            Ok(vms
                .iter()
                .filter(|v| !v.template)
                .map(|v| InventoryVm {
                    folder: folders.get(&v.moref).cloned().unwrap_or_else(|| "/".into()),
                    vm: crate::job::vm::vm_info(v),
                })
                .collect())
        })
    }
}
