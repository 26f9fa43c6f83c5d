//! A VM's chain follows its identity (vCenter instance UUID + VM instance
//! UUID), not its name (issue 21, item 4): a renamed VM continues its chain
//! incrementally (CBT from the previous point); a new VM that takes an old name
//! starts its own chain with a full read; two VMs that swap names never mix;
//! retention and `points list` keep them apart.

mod common;

use common::text;
use ferry::job::vm::VmBackupOutcome;
use ferry::repo::manifest::ReadMode;
use ferry_mocks::vcenter::{VcenterMock, VcenterOptions};
use std::path::Path;

const MIB: u64 = 1 << 20;

fn vcenter() -> VcenterMock {
    let toml = r#"
name = "identity"
[[cluster]]
name = "C1"
[[host]]
name = "esx-01.lab"
cluster = "C1"
datastores = ["ds-1"]
[[datastore]]
name = "ds-1"
[[vm]]
name = "web"
host = "esx-01.lab"
datastore = "ds-1"
[[vm.disk]]
size_mib = 8
content = "mixed"
seed = 21
[[vm]]
name = "db"
host = "esx-01.lab"
datastore = "ds-1"
[[vm.disk]]
size_mib = 8
content = "mixed"
seed = 22
"#;
    let sc = ferry_mocks::vcenter::Scenario::parse(toml, Path::new("identity.toml")).unwrap();
    VcenterMock::start(VcenterOptions::new(sc)).unwrap()
}

type Env = common::vsphere::NbdWorld;

trait IdentityEnv {
    fn backup(&self, job: &str, vm_name: &str) -> VmBackupOutcome;
    fn header(&self, point: &str) -> ferry::repo::manifest::ManifestHeader;
}

impl IdentityEnv for Env {
    fn backup(&self, job: &str, vm_name: &str) -> VmBackupOutcome {
        self.backup_vm(&self.nbd_request(job, vm_name))
    }

    fn header(&self, point: &str) -> ferry::repo::manifest::ManifestHeader {
        self.w.repo().read_manifest(point).unwrap().1
    }
}

#[test]
fn chains_follow_the_vm_identity_through_renames_recreation_and_swaps() {
    let env = Env::new(vcenter());
    let admin = env.vc.admin();
    let web1 = env.backup("j1", "web");
    let db1 = env.backup("j2", "db");
    let web_id = env.header(&web1.report.point_id).identity.unwrap();
    let db_id = env.header(&db1.report.point_id).identity.unwrap();
    assert_ne!(web_id, db_id);
    assert!(web_id.contains('/'), "{web_id}");

    // Renamed: the chain continues, incrementally.
    admin.rename_vm("web", "web-renamed").unwrap();
    admin
        .write("web-renamed", "2000", MIB, &[5u8; 4096])
        .unwrap();
    let web2 = env.backup("j3", "web-renamed");
    let h = env.header(&web2.report.point_id);
    assert_eq!(h.parent.as_deref(), Some(web1.report.point_id.as_str()));
    assert_eq!(h.source, "web-renamed");
    assert_eq!(h.identity.as_deref(), Some(web_id.as_str()));
    assert_eq!(
        web2.report.chain, web_id,
        "retention after a backup keys on this"
    );
    assert_eq!(web2.disks[0].read, ReadMode::Cbt, "{:?}", web2.disks[0]);

    // Swapped names: db now called "web", web called "db"; neither mixes.
    admin.rename_vm("db", "web").unwrap();
    admin.rename_vm("web-renamed", "db").unwrap();
    let as_web = env.backup("j4", "web"); // the db VM
    let as_db = env.backup("j5", "db"); // the web VM
    let h = env.header(&as_web.report.point_id);
    assert_eq!(h.identity.as_deref(), Some(db_id.as_str()));
    assert_eq!(h.parent.as_deref(), Some(db1.report.point_id.as_str()));
    let h = env.header(&as_db.report.point_id);
    assert_eq!(h.identity.as_deref(), Some(web_id.as_str()));
    assert_eq!(h.parent.as_deref(), Some(web2.report.point_id.as_str()));
    assert_eq!(as_web.disks[0].read, ReadMode::Cbt);
    assert_eq!(as_db.disks[0].read, ReadMode::Cbt);

    // Deleted and recreated under the same name: a new chain, read in full.
    admin.recreate_vm_identity("web").unwrap();
    let fresh = env.backup("j6", "web");
    let h = env.header(&fresh.report.point_id);
    assert_eq!(h.parent, None, "a new VM must not continue another's chain");
    assert_ne!(h.identity.as_deref(), Some(db_id.as_str()));
    assert_eq!(fresh.disks[0].read, ReadMode::Full, "{:?}", fresh.disks[0]);

    // Retention per chain: keep-last 1 on the web VM's chain leaves the others.
    let pruned = ferry::repo::gc::prune_chain(
        &env.w.repo(),
        &ferry::repo::retention::Policy {
            keep_last: Some(1),
            ..Default::default()
        },
        Some(&web_id),
        None,
        false,
        std::time::Duration::from_secs(10),
    )
    .unwrap();
    let mut removed = pruned.points_removed.clone();
    removed.sort();
    let mut want = vec![web1.report.point_id.clone(), web2.report.point_id.clone()];
    want.sort();
    assert_eq!(removed, want);
    let label = pruned.decisions.keys().next().unwrap();
    assert!(
        label.starts_with("db (") && label.contains(&web_id),
        "{label}"
    );

    // points list shows names and identities; latest:NAME is the newest of that name.
    let o = env.w.ferry(&["--json", "points", "list"]);
    assert!(o.status.success(), "{}", text(&o));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let ids: std::collections::BTreeSet<&str> =
        rows.iter().filter_map(|r| r["identity"].as_str()).collect();
    assert_eq!(ids.len(), 3, "web, db and the recreated web: {rows:?}");
    assert_eq!(
        env.w.repo().resolve_point("latest:web").unwrap(),
        fresh.report.point_id
    );
    let o = env.w.ferry(&["points", "list"]);
    let t = String::from_utf8_lossy(&o.stdout);
    let short: String = web_id
        .rsplit('/')
        .next()
        .unwrap()
        .chars()
        .take(13)
        .collect();
    assert!(t.contains(&short), "{t}");
}
