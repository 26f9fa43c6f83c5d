//! Worlds of any size for scale tests and benchmarks (issue 19: the console's
//! pages with 500 VMs): the whitepaper's provider (its datacenter, hosts,
//! datastores, key providers and proxies, [`crate::demo::WHITEPAPER`]) with
//! `n` generated VMs instead of its 20.
//!
//! The VMs are spread round-robin over the tenants (one per key provider) and
//! named `<tenant>-vm<NNNN>` (`tenant-a-vm0001`, `tenant-b-vm0002`, ...); about
//! three in four are encrypted under their tenant's key provider, the others
//! are plain (not encrypted, on the shared datastore). Every VM has one 1 MiB
//! disk, about one in three a second one; CBT is on. Everything (which VMs are
//! plain, hosts, second disks, disk contents) follows from `seed`: the same
//! `n` and `seed` give the same scenario.
//!
//! [`crate::world::World`] writes one job per tenant selecting the VMs
//! encrypted under its key provider; [`select_plain_vms`] adds each tenant's
//! plain VMs to its job (as an operator would edit the orchestrator's
//! configuration), so that every generated VM is planned and backed up by
//! exactly one job.

use crate::vcenter::scenario::{Content, DiskSpecToml, VmSpec};
use crate::vcenter::Scenario;
use crate::world::{tenant_name, World, WorldError};
use std::collections::BTreeMap;
use std::path::Path;

/// Percentage of generated VMs encrypted under their tenant's key provider.
pub const ENCRYPTED_PCT: u64 = 75;

/// SplitMix64: tiny, seeded and the same on every platform and crate version.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One generated VM as the tests see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleVm {
    /// VM name (`tenant-a-vm0001`).
    pub name: String,
    /// The tenant it belongs to (`tenant-a`).
    pub tenant: String,
    /// Key provider it is encrypted under; `None`: plain.
    pub key_provider: Option<String>,
    /// Number of disks.
    pub disks: usize,
}

/// The whitepaper's provider with `n` generated VMs (module documentation),
/// named `whitepaper-<n>`.
pub fn scenario(n: usize, seed: u64) -> Scenario {
    let base = Scenario::parse(crate::demo::WHITEPAPER, Path::new("whitepaper.toml"))
        .expect("the built-in whitepaper scenario is valid");
    let plain_ds = base
        .proxies
        .iter()
        .find(|p| p.key_provider.is_none())
        .and_then(|p| p.datastore.clone())
        .or_else(|| base.datastores.first().map(|d| d.name.clone()))
        .expect("the whitepaper has datastores");
    let all_hosts: Vec<String> = base.hosts.iter().map(|h| h.name.clone()).collect();
    // Per key provider: the hosts and datastore its whitepaper VMs use.
    let placement: Vec<(String, Vec<String>, String)> = base
        .key_providers
        .iter()
        .map(|kp| {
            let own: Vec<&VmSpec> = base
                .vms
                .iter()
                .filter(|v| v.key_provider.as_deref() == Some(kp.id.as_str()))
                .collect();
            let mut hosts: Vec<String> = own.iter().map(|v| v.host.clone()).collect();
            hosts.sort();
            hosts.dedup();
            if hosts.is_empty() {
                hosts = all_hosts.clone();
            }
            let ds = own
                .iter()
                .find_map(|v| v.datastore.clone())
                .unwrap_or_else(|| plain_ds.clone());
            (kp.id.clone(), hosts, ds)
        })
        .collect();
    assert!(!placement.is_empty(), "the whitepaper has key providers");
    let mut rng = Rng(seed);
    let mut vms = Vec::with_capacity(n);
    for i in 0..n {
        let (kp, hosts, ds) = &placement[i % placement.len()];
        let encrypted = rng.below(100) < ENCRYPTED_PCT;
        let host = if encrypted {
            hosts[rng.below(hosts.len() as u64) as usize].clone()
        } else {
            all_hosts[rng.below(all_hosts.len() as u64) as usize].clone()
        };
        let ndisks = if rng.below(3) == 0 { 2 } else { 1 };
        let disks = (0..ndisks)
            .map(|_| DiskSpecToml {
                size_mib: 1,
                datastore: None,
                encrypted: None,
                content: Content::Sparse,
                data_pct: 10,
                seed: Some(rng.next()),
            })
            .collect();
        vms.push(VmSpec {
            name: format!("{}-vm{:04}", tenant_name(kp), i + 1),
            host,
            datastore: Some(if encrypted {
                ds.clone()
            } else {
                plain_ds.clone()
            }),
            key_provider: encrypted.then(|| kp.clone()),
            cbt: true,
            tools: Default::default(),
            quiesce: Default::default(),
            disks,
        });
    }
    Scenario {
        name: format!("whitepaper-{n}"),
        vms,
        ..base
    }
}

/// The generated VMs of `s` (a [`scenario`]) with their tenants, in order.
pub fn vms(s: &Scenario) -> Vec<ScaleVm> {
    let tenants: Vec<String> = s.key_providers.iter().map(|k| tenant_name(&k.id)).collect();
    s.vms
        .iter()
        .filter_map(|v| {
            let tenant = tenants
                .iter()
                .filter(|t| v.name.starts_with(&format!("{t}-vm")))
                .max_by_key(|t| t.len())?;
            Some(ScaleVm {
                name: v.name.clone(),
                tenant: tenant.clone(),
                key_provider: v.key_provider.clone(),
                disks: v.disks.len(),
            })
        })
        .collect()
}

/// Add each tenant's plain VMs of `s` (the world's scenario, a [`scenario`])
/// to that tenant's job in the world's orchestrator configuration (the world
/// selects only the VMs encrypted under the tenant's key provider). Call it
/// before opening the orchestrator (`World::orchestrator`,
/// `SimConsole::start`). Returns how many VMs it added.
pub fn select_plain_vms(world: &World, s: &Scenario) -> Result<usize, WorldError> {
    let path = &world.orchestrator_config;
    let io = |source| WorldError::Io {
        path: path.clone(),
        source,
    };
    let bad = |message: String| WorldError::Start {
        component: format!("orchestrator configuration {}", path.display()),
        message,
    };
    let mut by_tenant: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for v in vms(s) {
        if v.key_provider.is_none() {
            by_tenant.entry(v.tenant).or_default().push(v.name);
        }
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    let mut cfg: toml::Table = text.parse().map_err(|e| bad(format!("{e}")))?;
    let mut added = 0;
    if let Some(toml::Value::Array(jobs)) = cfg.get_mut("job") {
        for job in jobs.iter_mut() {
            let Some(job) = job.as_table_mut() else {
                continue;
            };
            let Some(tenant) = job.get("tenant").and_then(|t| t.as_str()) else {
                continue;
            };
            let Some(plain) = by_tenant.get(tenant) else {
                continue;
            };
            let Some(toml::Value::Array(list)) = job.get_mut("vms") else {
                // No `vms`: the job selects every VM of its folders already.
                continue;
            };
            for name in plain {
                if !list.iter().any(|v| v.as_str() == Some(name.as_str())) {
                    list.push(toml::Value::String(name.clone()));
                    added += 1;
                }
            }
        }
    }
    let out = toml::to_string(&cfg).map_err(|e| bad(format!("{e}")))?;
    std::fs::write(path, out).map_err(io)?;
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_spread_and_tiny() {
        let a = scenario(60, 7);
        assert_eq!(a.vms.len(), 60);
        assert_eq!(a.proxies.len(), 3, "the whitepaper's proxies");
        let b = scenario(60, 7);
        let names = |s: &Scenario| -> Vec<(String, Option<String>, String, usize)> {
            s.vms
                .iter()
                .map(|v| {
                    (
                        v.name.clone(),
                        v.key_provider.clone(),
                        v.host.clone(),
                        v.disks.len(),
                    )
                })
                .collect()
        };
        assert_eq!(names(&a), names(&b), "deterministic");
        assert_ne!(names(&a), names(&scenario(60, 8)), "seeded");
        let v = vms(&a);
        assert_eq!(v.len(), 60);
        for t in ["tenant-a", "tenant-b"] {
            let own: Vec<&ScaleVm> = v.iter().filter(|x| x.tenant == t).collect();
            assert_eq!(own.len(), 30);
            assert!(
                own.iter().any(|x| x.key_provider.is_none()),
                "{t}: plain VMs"
            );
            assert!(
                own.iter().any(|x| x.key_provider.is_some()),
                "{t}: encrypted VMs"
            );
            for x in &own {
                if let Some(kp) = &x.key_provider {
                    assert_eq!(
                        &tenant_name(kp),
                        t,
                        "encrypted under its own tenant's provider"
                    );
                }
            }
        }
        assert!(a
            .vms
            .iter()
            .all(|v| v.disks.iter().all(|d| d.size_mib == 1)));
        assert!(v.iter().any(|x| x.disks == 2));
    }
}
