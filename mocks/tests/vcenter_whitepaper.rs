//! The whitepaper's multi-KMS world (seed 004, `scenarios/whitepaper.toml`, disks
//! shrunk to keep CI fast): 10 VMs under KMS-A, 10 under KMS-B, a HotAdd proxy per
//! tenant KMS and a shared unencrypted NBD proxy. vSphere's rule, as the mock
//! enforces it: a proxy can hot-add exactly the disks of its own key provider; every
//! other attempt ends in a cryptographic error; NBD tickets work for every VM.

mod vcenter_common;

use ferry_mocks::vcenter::{Scenario, VcenterMock, VcenterOptions};
use std::path::Path;
use vcenter_common::Soap;

#[test]
fn each_proxy_hot_adds_exactly_its_own_tenant() {
    let mut sc =
        Scenario::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/whitepaper.toml"))
            .unwrap();
    for d in sc.vms.iter_mut().flat_map(|v| v.disks.iter_mut()) {
        d.size_mib = 2;
    }
    let mock = VcenterMock::start(VcenterOptions::new(sc)).unwrap();
    let state = mock.admin().state();
    let tenants: Vec<_> = state.vms.iter().filter(|v| !v.proxy).cloned().collect();
    let proxies: Vec<_> = state.vms.iter().filter(|v| v.proxy).cloned().collect();
    assert_eq!(tenants.len(), 20);
    for kms in ["KMS-A", "KMS-B"] {
        assert_eq!(
            tenants
                .iter()
                .filter(|v| v.key_provider.as_deref() == Some(kms))
                .count(),
            10
        );
    }
    assert_eq!(
        proxies
            .iter()
            .map(|p| (p.name.as_str(), p.key_provider.as_deref()))
            .collect::<Vec<_>>(),
        [
            ("proxy-kms-a", Some("KMS-A")),
            ("proxy-kms-b", Some("KMS-B")),
            ("proxy-nbd", None)
        ]
    );

    let mut soap = Soap::new(&mock);
    soap.login();
    let mut accepted = std::collections::BTreeMap::new();
    let mut crypto_refusals = 0;
    for vm in &tenants {
        let snap = soap.snapshot(&vm.moref, "ferry-wp");
        let disk = soap.snapshot_disks(&snap).remove(0);
        let file = disk
            .child("backing")
            .and_then(|b| b.text_of("fileName"))
            .unwrap()
            .to_string();
        for p in &proxies {
            match soap.hot_add(&p.moref, &file) {
                Ok(()) => {
                    assert_eq!(p.key_provider, vm.key_provider, "{} -> {}", vm.name, p.name);
                    *accepted.entry(p.name.clone()).or_insert(0) += 1;
                    let key = mock.admin().state().vm(&p.name).unwrap().attached[0].key;
                    soap.detach(&p.moref, key).unwrap();
                }
                Err((ty, msg)) => {
                    assert_eq!(ty, "GenericVmConfigFault", "{msg}");
                    assert!(msg.starts_with("Cryptographic error"), "{msg}");
                    assert_ne!(p.key_provider, vm.key_provider);
                    crypto_refusals += 1;
                }
            }
        }
        // NBD needs no key provider match: a ticket is always available.
        let host = soap
            .fetch(("VirtualMachine", &vm.moref), "runtime.host")
            .unwrap()
            .unwrap()
            .text
            .clone();
        let t = soap.ticket(&host, &vm.moref, &snap, 2000).unwrap();
        assert!(mock
            .export_provider()
            .open(t.text_of("id").unwrap())
            .is_ok());
        soap.remove(&snap).unwrap();
    }
    assert_eq!(accepted.get("proxy-kms-a"), Some(&10));
    assert_eq!(accepted.get("proxy-kms-b"), Some(&10));
    assert_eq!(accepted.get("proxy-nbd"), None);
    assert_eq!(crypto_refusals, 40);
    let st = mock.admin().state();
    assert_eq!(
        st.snapshot_count() + st.attached_count() + st.open_nbd_exports,
        0
    );
}
