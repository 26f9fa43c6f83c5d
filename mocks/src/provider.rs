//! A service provider of any size for scale tests and benchmarks (issue 21): `N`
//! VMs (up to 10,000 and more), `H` hosts in `C` clusters, `T` tenants each with
//! its own key provider, and `P` proxies — a HotAdd proxy per tenant where there
//! are enough (encrypted under the tenant's key provider, on the tenant's home
//! cluster) and shared NBD-SSL proxies (plain) for the rest. Seeded: the same
//! [`ProviderSpec`] gives the same world, name for name.
//!
//! Layout:
//! - Cluster `c<NN>` has hosts `esx-c<NN>-h<NN>` and two datastores
//!   `ds-c<NN>-a`/`-b` that only its hosts see; `ds-shared` is seen by every host.
//!   So a proxy sees the datastores of its own cluster only: HotAdd works for the
//!   VMs of its tenant on its cluster, not for the others.
//! - Tenant `t<NNN>` has key provider `KMS-t<NNN>` and a home cluster
//!   (round-robin). Its VMs `t<NNN>-vm<NNNNN>` (tenants round-robin) run on its
//!   home cluster (nine in ten; the others elsewhere, reachable by NBD-SSL only),
//!   [`ProviderSpec::encrypted_pct`] percent encrypted under its key provider on
//!   a cluster datastore, the rest plain (on `ds-shared` or a cluster datastore).
//!   One in three VMs has a second disk, on the other datastore of its cluster.
//! - Disks are 1 MiB and empty (sparse files): the control plane is what is
//!   measured, not the data path.
//!
//! The world is a [`Scenario`] for the mock vCenter only; no KMS is started (the
//! key providers are names vCenter reports, which is all inventory and placement
//! look at). [`Provider::orchestrator_toml`] writes the orchestrator's tenants,
//! agents and one job per tenant; [`Provider::agent_infos`] answers what each
//! proxy's agent would answer on `/v1/info`, read from vCenter the way agents read
//! it (their proxy VM's host and the datastores that host sees), so the
//! orchestrator's plan can run without starting 60 agents.
//!
//! Must not: start anything itself, or depend on wall-clock time or a global
//! random source (reproducibility).

use crate::scale::Rng;
use crate::vcenter::scenario::{
    ClusterSpec, Content, DatacenterSpec, DatastoreSpec, DiskSpecToml, HostSpec, KeyProviderSpec,
    ProxySpec, Scenario, VmSpec,
};
use ferry::agent::api::{Info, KeySourceKind, PolicySpec, Slots, TenantView};
use ferry::orchestrator::plan::AgentStatus;
use ferry::transport::select::{Mode, Policy};
use std::collections::BTreeMap;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderSpec {
    /// Workload VMs.
    pub vms: usize,
    /// ESXi hosts (at least one per cluster).
    pub hosts: usize,
    /// Clusters.
    pub clusters: usize,
    /// Tenants, each with its own key provider.
    pub tenants: usize,
    /// Proxies (agents): HotAdd proxies for the first tenants, at least one shared
    /// NBD-SSL proxy.
    pub proxies: usize,
    /// Percentage of VMs encrypted under their tenant's key provider.
    pub encrypted_pct: u64,
    /// Slots each agent reports.
    pub slots: u32,
    /// Seed.
    pub seed: u64,
}

impl ProviderSpec {
    /// `vms` VMs, `tenants` tenants, `proxies` proxies; one host per 50 VMs (4 to
    /// 200), one cluster per 8 hosts, 60% encrypted, 4 slots per agent.
    pub fn new(vms: usize, tenants: usize, proxies: usize, seed: u64) -> ProviderSpec {
        let hosts = (vms / 50).clamp(4, 200);
        ProviderSpec {
            vms,
            hosts,
            clusters: hosts.div_ceil(8).max(1),
            tenants: tenants.max(1),
            proxies: proxies.max(1),
            encrypted_pct: 60,
            slots: 4,
            seed,
        }
    }
}

/// One generated tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderTenant {
    /// `t001`.
    pub name: String,
    /// `KMS-t001`.
    pub key_provider: String,
    /// Its home cluster `c01`.
    pub cluster: String,
    /// Agents (proxy names) serving it: its HotAdd proxy if it has one, then the
    /// shared proxies.
    pub agents: Vec<String>,
}

/// One generated proxy (agent id = proxy VM name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderProxy {
    /// `hotadd-t001` or `shared-nbd-01`.
    pub name: String,
    /// The tenant it is dedicated to (`None`: shared).
    pub tenant: Option<String>,
    /// Key provider its VM is encrypted under.
    pub key_provider: Option<String>,
    /// Modes its agent enables.
    pub modes: Vec<Mode>,
}

/// A generated provider.
#[derive(Debug, Clone)]
pub struct Provider {
    /// What it was generated from.
    pub spec: ProviderSpec,
    /// The mock vCenter's world.
    pub scenario: Scenario,
    /// Tenants in order.
    pub tenants: Vec<ProviderTenant>,
    /// Proxies in order (tenants' HotAdd proxies first).
    pub proxies: Vec<ProviderProxy>,
}

fn disk(datastore: Option<String>) -> DiskSpecToml {
    DiskSpecToml {
        size_mib: 1,
        datastore,
        encrypted: None,
        content: Content::Empty,
        data_pct: 0,
        seed: Some(0),
    }
}

/// Generate the provider `spec` describes (module documentation).
pub fn generate(spec: &ProviderSpec) -> Provider {
    let clusters = spec.clusters.max(1);
    let hosts_total = spec.hosts.max(clusters);
    let mut rng = Rng(spec.seed ^ 0x5EED_0021);
    let cname = |c: usize| format!("c{:02}", c + 1);
    let mut hosts_of: Vec<Vec<String>> = vec![Vec::new(); clusters];
    for h in 0..hosts_total {
        let c = h % clusters;
        let n = hosts_of[c].len() + 1;
        hosts_of[c].push(format!("esx-{}-h{n:02}", cname(c)));
    }
    let ds = |c: usize, x: &str| format!("ds-{}-{x}", cname(c));
    let mut datastores = vec![DatastoreSpec {
        name: "ds-shared".into(),
        dir: None,
        capacity_gib: 65536,
    }];
    let mut hosts = Vec::new();
    for (c, cluster_hosts) in hosts_of.iter().enumerate() {
        for x in ["a", "b"] {
            datastores.push(DatastoreSpec {
                name: ds(c, x),
                dir: None,
                capacity_gib: 65536,
            });
        }
        for h in cluster_hosts {
            hosts.push(HostSpec {
                name: h.clone(),
                cluster: cname(c),
                datastores: vec![ds(c, "a"), ds(c, "b"), "ds-shared".into()],
                address: "127.0.0.1".into(),
            });
        }
    }
    let t = spec.tenants.max(1);
    let p = spec.proxies.max(1);
    let shared = if p > t { p - t } else { 1 };
    let hotadd = p - shared;
    let mut tenants: Vec<ProviderTenant> = (0..t)
        .map(|i| {
            let name = format!("t{:03}", i + 1);
            ProviderTenant {
                key_provider: format!("KMS-{name}"),
                cluster: cname(i % clusters),
                agents: Vec::new(),
                name,
            }
        })
        .collect();
    let mut proxies = Vec::new();
    let mut proxy_specs = Vec::new();
    for (i, tn) in tenants.iter_mut().enumerate().take(hotadd) {
        let c = i % clusters;
        let name = format!("hotadd-{}", tn.name);
        tn.agents.push(name.clone());
        proxy_specs.push(ProxySpec {
            name: name.clone(),
            host: hosts_of[c][(i / clusters) % hosts_of[c].len()].clone(),
            datastore: Some(ds(c, "a")),
            key_provider: Some(tn.key_provider.clone()),
            device_dir: None,
            disks: vec![disk(None)],
        });
        proxies.push(ProviderProxy {
            name,
            tenant: Some(tn.name.clone()),
            key_provider: Some(tn.key_provider.clone()),
            modes: vec![Mode::HotAdd, Mode::NbdSsl],
        });
    }
    for s in 0..shared {
        let c = s % clusters;
        let name = format!("shared-nbd-{:02}", s + 1);
        for tn in tenants.iter_mut() {
            tn.agents.push(name.clone());
        }
        proxy_specs.push(ProxySpec {
            name: name.clone(),
            host: hosts_of[c][(s / clusters) % hosts_of[c].len()].clone(),
            datastore: Some("ds-shared".into()),
            key_provider: None,
            device_dir: None,
            disks: vec![disk(None)],
        });
        proxies.push(ProviderProxy {
            name,
            tenant: None,
            key_provider: None,
            modes: vec![Mode::NbdSsl, Mode::Nbd],
        });
    }
    let mut vms = Vec::with_capacity(spec.vms);
    for i in 0..spec.vms {
        let ti = i % t;
        let home = ti % clusters;
        let c = if clusters > 1 && rng.below(10) == 0 {
            (home + 1 + rng.below(clusters as u64 - 1) as usize) % clusters
        } else {
            home
        };
        let host = hosts_of[c][rng.below(hosts_of[c].len() as u64) as usize].clone();
        let encrypted = rng.below(100) < spec.encrypted_pct;
        let (first, second) = if rng.below(2) == 0 {
            ("a", "b")
        } else {
            ("b", "a")
        };
        let home_ds = if encrypted || rng.below(2) == 0 {
            ds(c, first)
        } else {
            "ds-shared".into()
        };
        let mut disks = vec![disk(None)];
        if rng.below(3) == 0 {
            disks.push(disk(Some(ds(c, second))));
        }
        vms.push(VmSpec {
            name: format!("{}-vm{:05}", tenants[ti].name, i + 1),
            host,
            datastore: Some(home_ds),
            key_provider: encrypted.then(|| tenants[ti].key_provider.clone()),
            cbt: false,
            tools: Default::default(),
            quiesce: Default::default(),
            disks,
        });
    }
    let scenario = Scenario {
        name: format!(
            "provider-{}vms-{}tenants-{}proxies-seed{}",
            spec.vms, t, p, spec.seed
        ),
        auth: Default::default(),
        datacenter: DatacenterSpec { name: "DC0".into() },
        clusters: (0..clusters)
            .map(|c| ClusterSpec { name: cname(c) })
            .collect(),
        hosts,
        datastores,
        key_providers: tenants
            .iter()
            .map(|t| KeyProviderSpec {
                id: t.key_provider.clone(),
            })
            .collect(),
        vms,
        proxies: proxy_specs,
    };
    Provider {
        spec: spec.clone(),
        scenario,
        tenants,
        proxies,
    }
}

impl Provider {
    /// The orchestrator's configuration for this provider: `[[vcenter]] vc1` at
    /// `url` (password in `password_file`, CA `ca`), one `[[tenant]]` and one
    /// `[[job]]` (its VMs by name) per tenant, one `[[agent]]` per proxy (at
    /// `https://127.0.0.1:<port>`, token `token_file`: planning never calls them).
    pub fn orchestrator_toml(
        &self,
        state_dir: &std::path::Path,
        url: &str,
        password_file: &std::path::Path,
        ca: &std::path::Path,
        token_file: &std::path::Path,
    ) -> String {
        let q = |p: &std::path::Path| toml::Value::String(p.display().to_string()).to_string();
        let mut s = format!(
            "[orchestrator]\nstate_dir = {}\n\n[[vcenter]]\nname = \"vc1\"\nurl = \"{url}\"\nuser = \"{}\"\npassword_file = {}\nca = {}\n\n",
            q(state_dir),
            self.scenario.auth.user,
            q(password_file),
            q(ca),
        );
        for t in &self.tenants {
            let agents: Vec<String> = t.agents.iter().map(|a| format!("{a:?}")).collect();
            s.push_str(&format!(
                "[[tenant]]\nname = \"{}\"\nkey_provider = \"{}\"\nagents = [{}]\n\n",
                t.name,
                t.key_provider,
                agents.join(", ")
            ));
        }
        for (i, p) in self.proxies.iter().enumerate() {
            s.push_str(&format!(
                "[[agent]]\nid = \"{}\"\nurl = \"https://127.0.0.1:{}\"\ntoken_file = {}\nca = {}\n\n",
                p.name,
                20000 + i,
                q(token_file),
                q(ca)
            ));
        }
        for t in &self.tenants {
            s.push_str(&format!(
                "[[job]]\nname = \"{0}-nightly\"\ntenant = \"{0}\"\nvcenter = \"vc1\"\nvms = [\"{0}-vm*\"]\n\n",
                t.name
            ));
        }
        s
    }

    /// What each proxy's agent would answer on `/v1/info`, as agents learn it
    /// (their proxy VM's host, the datastores that host sees, its key provider:
    /// read from vCenter through `client`), with [`ProviderSpec::slots`] free.
    pub async fn agent_infos(
        &self,
        client: &ferry::vsphere::Client,
    ) -> Result<BTreeMap<String, AgentStatus>, ferry::vsphere::VsphereError> {
        let hosts = client.hosts().await?;
        let names: Vec<&str> = self.proxies.iter().map(|p| p.name.as_str()).collect();
        // Names of every VM, then the proxies' VMs only.
        let refs: Vec<ferry::vsphere::MoRef> = client
            .vm_names()
            .await?
            .into_iter()
            .filter(|(_, n)| names.contains(&n.as_str()))
            .map(|(r, _)| r)
            .collect();
        let vms = client
            .vms_by_ref(&refs, "reading the proxy VMs")
            .await?
            .into_iter()
            .map(|v| (v.name.clone(), v))
            .collect::<BTreeMap<_, _>>();
        let mut out = BTreeMap::new();
        for p in &self.proxies {
            let vm = vms.get(&p.name);
            let host = vm.and_then(|v| v.host.clone());
            let datastores = host
                .as_ref()
                .and_then(|h| hosts.iter().find(|x| &x.moref == h))
                .map(|h| h.datastores.iter().map(|d| d.value.clone()).collect())
                .unwrap_or_default();
            let tenants = self
                .tenants
                .iter()
                .filter(|t| t.agents.contains(&p.name))
                .map(|t| TenantView {
                    name: t.name.clone(),
                    key_provider: Some(t.key_provider.clone()),
                    key_source: KeySourceKind::Kms,
                    kms: None,
                })
                .collect();
            let info = Info {
                id: p.name.clone(),
                version: "provider-sim".into(),
                is_vm: vm.is_some(),
                host: host.map(|h| h.value),
                key_provider: vm
                    .and_then(|v| v.key_id.as_ref())
                    .and_then(|k| k.provider_id.clone()),
                datastores,
                reachable_hosts: None,
                modes: p.modes.clone(),
                data_path: "native".into(),
                slots: Slots {
                    total: self.spec.slots,
                    used: 0,
                    free: self.spec.slots,
                },
                tenants,
                policy: PolicySpec::from(&Policy::default()),
            };
            out.insert(
                p.name.clone(),
                AgentStatus::Up {
                    info: Box::new(info),
                },
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_sized_and_laid_out() {
        let spec = ProviderSpec::new(2000, 50, 60, 21);
        let a = generate(&spec);
        let b = generate(&spec);
        // Name, host, datastore, key provider and disk count of every VM.
        let key = |p: &Provider| -> Vec<String> {
            p.scenario
                .vms
                .iter()
                .map(|v| {
                    format!(
                        "{} {} {:?} {:?} {}",
                        v.name,
                        v.host,
                        v.datastore,
                        v.key_provider,
                        v.disks.len()
                    )
                })
                .collect()
        };
        assert_eq!(key(&a), key(&b), "reproducible");
        assert_ne!(
            key(&a),
            key(&generate(&ProviderSpec {
                seed: 22,
                ..spec.clone()
            })),
            "seeded"
        );
        // Valid for the mock vCenter (every cross reference resolves).
        let text_check = Scenario::parse(&scenario_toml(&a.scenario), std::path::Path::new("x"));
        assert!(text_check.is_ok(), "{text_check:?}");
        assert_eq!(a.scenario.vms.len(), 2000);
        assert_eq!(a.tenants.len(), 50);
        assert_eq!(a.proxies.len(), 60);
        assert_eq!(a.proxies.iter().filter(|p| p.tenant.is_some()).count(), 50);
        assert_eq!(a.scenario.key_providers.len(), 50);
        assert!(a.tenants.iter().all(|t| t.agents.len() == 11));
        let enc = a
            .scenario
            .vms
            .iter()
            .filter(|v| v.key_provider.is_some())
            .count();
        assert!((1000..1400).contains(&enc), "about 60% encrypted: {enc}");
        for v in &a.scenario.vms {
            if let Some(kp) = &v.key_provider {
                assert!(
                    kp.ends_with(&v.name[..4]),
                    "{} under its tenant's provider",
                    v.name
                );
            }
        }
        // Datastores are seen by their cluster's hosts only.
        let h = &a.scenario.hosts[0];
        assert!(a
            .scenario
            .hosts
            .iter()
            .filter(|x| x.cluster != h.cluster)
            .all(|x| !x.datastores.contains(&h.datastores[0])));
        assert!(a
            .scenario
            .vms
            .iter()
            .all(|v| v.disks.iter().all(|d| d.size_mib == 1)));
        // Fewer proxies than tenants: HotAdd proxies for the first, one shared.
        let few = generate(&ProviderSpec::new(100, 10, 4, 1));
        assert_eq!(few.proxies.iter().filter(|p| p.tenant.is_some()).count(), 3);
        assert_eq!(few.tenants[9].agents, ["shared-nbd-01"]);
    }

    /// The scenario back as TOML (through serde's view of it), to run the
    /// scenario validation on it.
    fn scenario_toml(s: &Scenario) -> String {
        let mut out = format!("name = {:?}\n[datacenter]\nname = \"DC0\"\n", s.name);
        for c in &s.clusters {
            out += &format!("[[cluster]]\nname = {:?}\n", c.name);
        }
        for d in &s.datastores {
            out += &format!("[[datastore]]\nname = {:?}\n", d.name);
        }
        for h in &s.hosts {
            out += &format!(
                "[[host]]\nname = {:?}\ncluster = {:?}\ndatastores = {:?}\n",
                h.name, h.cluster, h.datastores
            );
        }
        for k in &s.key_providers {
            out += &format!("[[key_provider]]\nid = {:?}\n", k.id);
        }
        for v in &s.vms {
            out += &format!("[[vm]]\nname = {:?}\nhost = {:?}\n", v.name, v.host);
            if let Some(d) = &v.datastore {
                out += &format!("datastore = {d:?}\n");
            }
            if let Some(k) = &v.key_provider {
                out += &format!("key_provider = {k:?}\n");
            }
            for d in &v.disks {
                out += "[[vm.disk]]\nsize_mib = 1\ncontent = \"empty\"\n";
                if let Some(ds) = &d.datastore {
                    out += &format!("datastore = {ds:?}\n");
                }
            }
        }
        for p in &s.proxies {
            out += &format!("[[proxy]]\nname = {:?}\nhost = {:?}\n", p.name, p.host);
            if let Some(k) = &p.key_provider {
                out += &format!("key_provider = {k:?}\n");
            }
        }
        out
    }
}
