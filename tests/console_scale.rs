//! The console with 500 VMs (issue 19): the whitepaper's provider scaled by
//! `ferry_mocks::scale` (VMs encrypted under each tenant's key provider and
//! plain ones, every VM selected by its tenant's job). The admin's overview
//! lists every VM, the plan has rows for every disk of every VM, and a
//! tenant-a account sees only tenant-a's VMs and plan. Correctness only: how
//! fast the pages are is `cargo bench --bench console_pages`.

use ferry_mocks::console::{ConsoleClient, SimConsole};
use ferry_mocks::scale::{self, ScaleVm};
use ferry_mocks::world::{World, WorldOptions};
use std::collections::{BTreeMap, BTreeSet};

const VMS: usize = 500;

/// A logged-in client of the console (mocks::console's, panicking here).
struct Client(ConsoleClient);

impl Client {
    fn login(c: &SimConsole, name: &str) -> Client {
        Client(ConsoleClient::login_as(c, name).unwrap_or_else(|e| panic!("{e}")))
    }

    fn get(&self, path: &str) -> String {
        self.0.get(path).unwrap_or_else(|e| panic!("{e}"))
    }

    fn json(&self, path: &str) -> serde_json::Value {
        self.0.json(path).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// VM name → tenant of the overview JSON's VM rows.
fn overview_vms(c: &Client) -> BTreeMap<String, String> {
    c.json("/api/overview")["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["tenant"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// VM name → plan rows (disks) of `/api/plan`, checking every row's tenant.
fn plan_rows(c: &Client, tenant: Option<&str>) -> BTreeMap<String, Vec<serde_json::Value>> {
    let mut out: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for r in c.json("/api/plan").as_array().unwrap() {
        if let Some(t) = tenant {
            assert_eq!(r["tenant"], t, "{r}");
        }
        out.entry(r["vm"].as_str().unwrap().to_string())
            .or_default()
            .push(r.clone());
    }
    out
}

#[test]
fn console_with_500_vms() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = scale::scenario(VMS, 19);
    let vms: Vec<ScaleVm> = scale::vms(&scenario);
    assert_eq!(vms.len(), VMS);
    let world = World::start(WorldOptions::new(scenario.clone(), dir.path())).unwrap();
    let added = scale::select_plain_vms(&world, &scenario).unwrap();
    let plain = vms.iter().filter(|v| v.key_provider.is_none()).count();
    assert_eq!(added, plain, "every plain VM added to its tenant's job");
    assert!(plain > 0 && plain < VMS, "a mix of plain and encrypted VMs");
    let console = SimConsole::start(&world, 0).unwrap();

    // The admin: every VM in the overview (JSON and page), with its tenant.
    let admin = Client::login(&console, "admin");
    let listed = overview_vms(&admin);
    for v in &vms {
        assert_eq!(
            listed.get(&v.name).map(String::as_str),
            Some(v.tenant.as_str()),
            "overview lists {} under {}",
            v.name,
            v.tenant
        );
    }
    let page = admin.get("/");
    for v in &vms {
        assert!(
            page.contains(&format!(">{}</a>", v.name)),
            "overview page lists {}",
            v.name
        );
    }
    assert!(page.matches("<tr data-moref=").count() >= VMS);

    // The plan: every disk of every VM, planned by its tenant's job. Nothing
    // runs and every agent is up: the first VMs are dispatched (with a proxy
    // and a mode), the rest wait for a slot (deferred), none is refused.
    let plan = plan_rows(&admin, None);
    let mut dispatched = 0;
    for v in &vms {
        let rows = plan
            .get(&v.name)
            .unwrap_or_else(|| panic!("/api/plan plans {}", v.name));
        assert_eq!(rows.len(), v.disks, "{}: a row per disk: {rows:?}", v.name);
        for r in rows {
            assert_eq!(r["tenant"], v.tenant.as_str(), "{r}");
            match r["decision"].as_str().unwrap() {
                "dispatch" => {
                    dispatched += 1;
                    assert!(!r["proxy"].as_str().unwrap().is_empty(), "{r}");
                    assert!(!r["mode"].as_str().unwrap().is_empty(), "{r}");
                }
                "deferred" => assert!(
                    r["reason"]
                        .as_str()
                        .unwrap()
                        .contains("waiting for a free slot"),
                    "{r}"
                ),
                _ => panic!("neither dispatched nor waiting for a slot: {r}"),
            }
            // HotAdd of an encrypted disk only through its own tenant's proxy.
            if r["mode"] == "hotadd" && v.key_provider.is_some() {
                assert_eq!(
                    r["proxy"].as_str().unwrap(),
                    format!("proxy-kms-{}", &v.tenant["tenant-".len()..]),
                    "{r}"
                );
            }
        }
    }
    assert!(dispatched > 0, "some disks dispatched");
    let plan_page = admin.get("/plan");
    let disks: usize = vms.iter().map(|v| v.disks).sum();
    assert!(
        plan_page.contains(&format!("{disks} disk(s)")),
        "the plan page counts every disk"
    );
    // The plan page is paged (200 rows a page); together the pages show
    // every disk once.
    let pages = disks.div_ceil(200);
    assert!(pages > 1, "{disks} disks fit one page");
    assert!(plan_page.contains(&format!("page 1 of {pages}")));
    let mut shown = 0;
    for p in 1..=pages {
        let page = admin.get(&format!("/plan?page={p}"));
        shown += page.matches("data-vm=\"").count();
        assert_eq!(page.contains("next →"), p < pages, "page {p}");
    }
    assert_eq!(shown, disks, "rows over all plan pages");

    // A tenant-a account: only tenant-a's VMs (encrypted and plain), only
    // tenant-a's plan.
    let tenant_a = Client::login(&console, "tenant-a-operator");
    let own: BTreeSet<&str> = vms
        .iter()
        .filter(|v| v.tenant == "tenant-a")
        .map(|v| v.name.as_str())
        .collect();
    let others: BTreeSet<&str> = vms
        .iter()
        .filter(|v| v.tenant != "tenant-a")
        .map(|v| v.name.as_str())
        .collect();
    assert!(own.len() >= VMS / 2 - 1 && !others.is_empty());
    let seen = overview_vms(&tenant_a);
    for (name, tenant) in &seen {
        assert_eq!(tenant, "tenant-a", "tenant-a sees {name} of {tenant:?}");
        assert!(!others.contains(name.as_str()), "tenant-a sees {name}");
    }
    for name in &own {
        assert!(seen.contains_key(*name), "tenant-a sees its {name}");
    }
    let page = tenant_a.get("/");
    for name in &others {
        assert!(
            !page.contains(&format!(">{name}</a>")),
            "tenant-a's overview shows {name}"
        );
    }
    let plan = plan_rows(&tenant_a, Some("tenant-a"));
    let planned: BTreeSet<&str> = plan.keys().map(String::as_str).collect();
    assert_eq!(planned, own, "tenant-a's plan: its VMs, all of them");
}
