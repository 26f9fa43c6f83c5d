//! NBD tickets: `SessionManager.AcquireGenericServiceTicket`, as the contract in
//! docs/vsphere.md ("NBD tickets") fixes:
//! - read a snapshot's disk: method `httpGet`, URL
//!   `nbd://<host>/<vm>/<snapshot>/<disk key>`, a read-only export;
//! - write a VM's live disk (a restore's new disk): method `httpPut`, URL
//!   `nbd://<host>/<vm>/<disk key>` (no snapshot), a writable export.
//!
//! The ticket id is the NBD export name on the host's NBD service; it is a
//! credential until it expires and is never logged.

use super::client::{Client, Replay};
use super::error::{from_fault, VsphereError};
use super::soap;
use super::types::{MoRef, NbdTicket};

/// The ticket URL for one snapshot disk.
pub fn ticket_url(host: &MoRef, vm: &MoRef, snapshot: &MoRef, device_key: i32) -> String {
    format!(
        "nbd://{}/{}/{}/{device_key}",
        host.value, vm.value, snapshot.value
    )
}

/// The ticket URL to write a VM's live disk.
pub fn write_ticket_url(host: &MoRef, vm: &MoRef, device_key: i32) -> String {
    format!("nbd://{}/{}/{device_key}", host.value, vm.value)
}

/// Body of `AcquireGenericServiceTicket` for reading `url`.
pub fn ticket_body(session_manager: &MoRef, url: &str) -> String {
    ticket_body_method(session_manager, url, "httpGet")
}

/// Body of `AcquireGenericServiceTicket` for `url` with `method` (`httpGet` to
/// read, `httpPut` to write).
pub fn ticket_body_method(session_manager: &MoRef, url: &str, method: &str) -> String {
    soap::envelope("AcquireGenericServiceTicket", session_manager, |b| {
        b.open_typed("spec", "SessionManagerHttpServiceRequestSpec")
            .leaf("method", method)
            .leaf("url", url)
            .close("spec");
    })
}

impl Client {
    /// A ticket to read disk `device_key` of `snapshot` of `vm` over NBD from `host`
    /// (the VM's `runtime.host`).
    pub async fn nbd_ticket(
        &self,
        host: &MoRef,
        vm: &MoRef,
        snapshot: &MoRef,
        device_key: i32,
    ) -> Result<NbdTicket, VsphereError> {
        let doing = format!(
            "acquiring an NBD ticket for disk {device_key} of VM {} snapshot {} on host {}",
            vm.value, snapshot.value, host.value
        );
        let body = ticket_body(
            &self.service_content().session_manager,
            &ticket_url(host, vm, snapshot, device_key),
        );
        self.acquire(&body, &doing).await
    }

    /// A ticket to write the live disk `device_key` of `vm` over NBD on `host` (the
    /// VM's `runtime.host`): restores into a disk they created.
    pub async fn nbd_write_ticket(
        &self,
        host: &MoRef,
        vm: &MoRef,
        device_key: i32,
    ) -> Result<NbdTicket, VsphereError> {
        let doing = format!(
            "acquiring an NBD write ticket for disk {device_key} of VM {} on host {}",
            vm.value, host.value
        );
        let body = ticket_body_method(
            &self.service_content().session_manager,
            &write_ticket_url(host, vm, device_key),
            "httpPut",
        );
        self.acquire(&body, &doing).await
    }

    async fn acquire(&self, body: &str, doing: &str) -> Result<NbdTicket, VsphereError> {
        let doing = doing.to_string();
        let resp = self
            .invoke("AcquireGenericServiceTicket", body, Replay::Safe, &doing)
            .await?
            .map_err(|f| from_fault(&f, &self.ctx(&doing)))?;
        let rv = resp
            .child("returnval")
            .ok_or_else(|| self.malformed(&doing, "no returnval"))?;
        NbdTicket::decode(rv).map_err(|e| self.malformed(&doing, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_request_matches_the_contract() {
        let url = ticket_url(
            &MoRef::new("HostSystem", "host-12"),
            &MoRef::new("VirtualMachine", "vm-42"),
            &MoRef::new("VirtualMachineSnapshot", "snapshot-7"),
            2000,
        );
        assert_eq!(url, "nbd://host-12/vm-42/snapshot-7/2000");
        let b = ticket_body(&MoRef::new("SessionManager", "SessionManager"), &url);
        assert!(b.contains("<spec xsi:type=\"SessionManagerHttpServiceRequestSpec\"><method>httpGet</method><url>nbd://host-12/vm-42/snapshot-7/2000</url></spec>"));
        let w = write_ticket_url(
            &MoRef::new("HostSystem", "host-12"),
            &MoRef::new("VirtualMachine", "vm-42"),
            2003,
        );
        assert_eq!(w, "nbd://host-12/vm-42/2003");
        let b = ticket_body_method(
            &MoRef::new("SessionManager", "SessionManager"),
            &w,
            "httpPut",
        );
        assert!(b.contains("<method>httpPut</method><url>nbd://host-12/vm-42/2003</url>"));
    }
}
