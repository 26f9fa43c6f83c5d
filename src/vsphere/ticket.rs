//! NBD tickets: `SessionManager.AcquireGenericServiceTicket` with an
//! `nbd://<host>/<vm>/<snapshot>/<disk key>` URL, as VSPHERE-CONTRACT.md fixes. The
//! ticket id is the NBD export name on the host's NBD service; it is a credential
//! until it expires and is never logged.

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

/// Body of `AcquireGenericServiceTicket` for `url`.
pub fn ticket_body(session_manager: &MoRef, url: &str) -> String {
    soap::envelope("AcquireGenericServiceTicket", session_manager, |b| {
        b.open_typed("spec", "SessionManagerHttpServiceRequestSpec")
            .leaf("method", "httpGet")
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
        let resp = self
            .invoke("AcquireGenericServiceTicket", &body, Replay::Safe, &doing)
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
    }
}
