//! Scenario files: the world a mock vCenter starts with (TOML, documented in
//! `docs/mocks.md`): a datacenter, clusters, hosts with the datastores each sees,
//! datastores, key providers, VMs with their disks, and proxy VMs.
//!
//! Owns parsing and validation only (unknown keys are errors, every cross reference
//! is checked and named in the error); building the inventory is `inventory.rs`'s job.

use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Scenario errors, naming the file and the offending entry.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file cannot be read.
    #[error("cannot read scenario {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// Not valid TOML or not the schema.
    #[error("scenario {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser message with line and column.
        message: String,
    },
    /// Parses but is inconsistent.
    #[error("scenario {path}: {what}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// Entry, e.g. `vm "web-01" disk 2`.
        what: String,
        /// What is wrong.
        message: String,
    },
}

/// A whole scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Scenario name (shown in logs and the state dump).
    #[serde(default = "default_name")]
    pub name: String,
    /// Credentials the mock accepts.
    #[serde(default)]
    pub auth: Auth,
    /// The datacenter.
    #[serde(default)]
    pub datacenter: DatacenterSpec,
    /// Clusters.
    #[serde(default, rename = "cluster")]
    pub clusters: Vec<ClusterSpec>,
    /// ESXi hosts.
    #[serde(default, rename = "host")]
    pub hosts: Vec<HostSpec>,
    /// Datastores.
    #[serde(default, rename = "datastore")]
    pub datastores: Vec<DatastoreSpec>,
    /// Key providers (vSphere KMS clusters) known to vCenter.
    #[serde(default, rename = "key_provider")]
    pub key_providers: Vec<KeyProviderSpec>,
    /// Workload VMs.
    #[serde(default, rename = "vm")]
    pub vms: Vec<VmSpec>,
    /// Backup proxy VMs.
    #[serde(default, rename = "proxy")]
    pub proxies: Vec<ProxySpec>,
}

fn default_name() -> String {
    "scenario".into()
}

/// `[auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// User name for Login.
    #[serde(default = "default_user")]
    pub user: String,
    /// Password for Login.
    #[serde(default = "default_password")]
    pub password: String,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            user: default_user(),
            password: default_password(),
        }
    }
}

fn default_user() -> String {
    "administrator@vsphere.local".into()
}
fn default_password() -> String {
    "ferry-mock".into()
}

/// `[datacenter]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatacenterSpec {
    /// Datacenter name.
    #[serde(default = "default_dc")]
    pub name: String,
}

impl Default for DatacenterSpec {
    fn default() -> Self {
        DatacenterSpec { name: default_dc() }
    }
}

fn default_dc() -> String {
    "DC0".into()
}

/// `[[cluster]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Cluster name.
    pub name: String,
}

/// `[[host]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    /// Host name (as vCenter shows it).
    pub name: String,
    /// Cluster the host belongs to.
    pub cluster: String,
    /// Datastores this host sees (mounts).
    #[serde(default)]
    pub datastores: Vec<String>,
    /// Address of this host's NBD service, returned as `hostName` in NBD tickets.
    #[serde(default = "default_address")]
    pub address: String,
}

fn default_address() -> String {
    "127.0.0.1".into()
}

/// `[[datastore]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatastoreSpec {
    /// Datastore name.
    pub name: String,
    /// Directory holding its files; relative paths are relative to the mock's state
    /// directory. Default: `<state dir>/datastores/<name>`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Capacity reported in the datastore summary, GiB.
    #[serde(default = "default_ds_gib")]
    pub capacity_gib: u64,
}

fn default_ds_gib() -> u64 {
    1024
}

/// `[[key_provider]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyProviderSpec {
    /// Key provider id, as `keyId.providerId.id` shows it (e.g. `KMS-A`).
    pub id: String,
}

/// Content profile of a generated disk (see `ferry_mocks::diskgen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Content {
    /// 20% zero, 40% compressible, 40% random regions.
    #[default]
    Mixed,
    /// Mostly holes: `data_pct` percent of regions hold data.
    Sparse,
    /// All holes.
    Empty,
    /// Every region random.
    Random,
}

/// `[[vm.disk]]` / `[[proxy.disk]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpecToml {
    /// Capacity in MiB.
    pub size_mib: u64,
    /// Datastore (default: the VM's datastore).
    #[serde(default)]
    pub datastore: Option<String>,
    /// Encrypted (default: as the VM). Needs the VM to be encrypted.
    #[serde(default)]
    pub encrypted: Option<bool>,
    /// Content profile.
    #[serde(default)]
    pub content: Content,
    /// For `content = "sparse"`: percentage of 1 MiB regions holding data.
    #[serde(default = "default_data_pct")]
    pub data_pct: u8,
    /// Generator seed (default: derived from the VM name and disk index).
    #[serde(default)]
    pub seed: Option<u64>,
}

fn default_data_pct() -> u8 {
    10
}

/// `[[vm]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// VM name.
    pub name: String,
    /// Host it runs on.
    pub host: String,
    /// Home datastore (default: the first datastore its host sees).
    #[serde(default)]
    pub datastore: Option<String>,
    /// Key provider the VM is encrypted with; absent = not encrypted.
    #[serde(default)]
    pub key_provider: Option<String>,
    /// Changed block tracking on at start.
    #[serde(default)]
    pub cbt: bool,
    /// VMware Tools in the guest: `"running"` (default), `"not-running"`,
    /// `"not-installed"` (a quiesced snapshot fails with `ToolsUnavailable`).
    #[serde(default)]
    pub tools: super::guest::ToolsState,
    /// What a quiesce request does in the guest: `"ok"` (default),
    /// `"application-fault"` (`ApplicationQuiesceFault`), `"filesystem-fault"`
    /// (`FilesystemQuiesceFault`).
    #[serde(default)]
    pub quiesce: super::guest::QuiesceBehaviour,
    /// Disks, in controller order.
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskSpecToml>,
}

/// `[[proxy]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySpec {
    /// Proxy VM name.
    pub name: String,
    /// Host it runs on.
    pub host: String,
    /// Home datastore (default: the first datastore its host sees).
    #[serde(default)]
    pub datastore: Option<String>,
    /// Key provider the proxy VM is encrypted with; absent = not encrypted.
    #[serde(default)]
    pub key_provider: Option<String>,
    /// Where hot-added disks appear (the proxy's `/dev/disk/by-id`); relative paths
    /// are relative to the state directory. Default: `<state dir>/devices/<name>`.
    #[serde(default)]
    pub device_dir: Option<PathBuf>,
    /// The proxy's own disks (default: one empty 16 MiB system disk).
    #[serde(default, rename = "disk")]
    pub disks: Vec<DiskSpecToml>,
}

impl Scenario {
    /// Read and validate a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parse and validate `text` (read from `path`, used in messages).
    pub fn parse(text: &str, path: &Path) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        s.validate(path)?;
        Ok(s)
    }

    fn validate(&self, path: &Path) -> Result<(), ScenarioError> {
        let bad = |what: String, message: String| ScenarioError::Invalid {
            path: path.to_path_buf(),
            what,
            message,
        };
        let unique = |kind: &str, names: Vec<&str>| -> Result<HashSet<String>, ScenarioError> {
            let mut set = HashSet::new();
            for n in names {
                if n.is_empty() {
                    return Err(bad(
                        format!("{kind} \"\""),
                        "names must not be empty".into(),
                    ));
                }
                if !set.insert(n.to_string()) {
                    return Err(bad(format!("{kind} {n:?}"), "defined twice".into()));
                }
            }
            Ok(set)
        };
        let clusters = unique(
            "cluster",
            self.clusters.iter().map(|c| c.name.as_str()).collect(),
        )?;
        let datastores = unique(
            "datastore",
            self.datastores.iter().map(|d| d.name.as_str()).collect(),
        )?;
        let providers = unique(
            "key_provider",
            self.key_providers.iter().map(|k| k.id.as_str()).collect(),
        )?;
        unique("host", self.hosts.iter().map(|h| h.name.as_str()).collect())?;
        unique(
            "vm/proxy",
            self.vms
                .iter()
                .map(|v| v.name.as_str())
                .chain(self.proxies.iter().map(|p| p.name.as_str()))
                .collect(),
        )?;
        for d in &self.datastores {
            if d.name.contains(['[', ']', '/']) {
                return Err(bad(
                    format!("datastore {:?}", d.name),
                    "names cannot contain '[', ']' or '/'".into(),
                ));
            }
        }
        for h in &self.hosts {
            if !clusters.contains(&h.cluster) {
                return Err(bad(
                    format!("host {:?}", h.name),
                    format!("unknown cluster {:?}", h.cluster),
                ));
            }
            for d in &h.datastores {
                if !datastores.contains(d) {
                    return Err(bad(
                        format!("host {:?}", h.name),
                        format!("unknown datastore {d:?}"),
                    ));
                }
            }
        }
        let vm_like = self
            .vms
            .iter()
            .map(|v| {
                (
                    "vm",
                    &v.name,
                    &v.host,
                    &v.datastore,
                    &v.key_provider,
                    &v.disks,
                )
            })
            .chain(self.proxies.iter().map(|p| {
                (
                    "proxy",
                    &p.name,
                    &p.host,
                    &p.datastore,
                    &p.key_provider,
                    &p.disks,
                )
            }));
        for (kind, name, host, ds, kp, disks) in vm_like {
            let what = format!("{kind} {name:?}");
            if name.contains(['/', '[', ']']) {
                return Err(bad(what, "names cannot contain '/', '[' or ']'".into()));
            }
            let h = self
                .hosts
                .iter()
                .find(|h| &h.name == host)
                .ok_or_else(|| bad(what.clone(), format!("unknown host {host:?}")))?;
            let home = match ds {
                Some(d) => d.clone(),
                None => h.datastores.first().cloned().ok_or_else(|| {
                    bad(
                        what.clone(),
                        format!("host {host:?} sees no datastore; set datastore"),
                    )
                })?,
            };
            if !datastores.contains(&home) {
                return Err(bad(what, format!("unknown datastore {home:?}")));
            }
            if let Some(k) = kp {
                if !providers.contains(k) {
                    return Err(bad(what, format!("unknown key_provider {k:?}")));
                }
            }
            for (i, d) in disks.iter().enumerate() {
                let dw = format!("{what} disk {}", i + 1);
                if d.size_mib == 0 || d.size_mib > 16 << 20 {
                    return Err(bad(dw, "size_mib must be 1 to 16777216 (16 TiB)".into()));
                }
                if let Some(ds) = &d.datastore {
                    if !datastores.contains(ds) {
                        return Err(bad(dw, format!("unknown datastore {ds:?}")));
                    }
                }
                if d.encrypted == Some(true) && kp.is_none() {
                    return Err(bad(
                        dw,
                        "an encrypted disk needs an encrypted VM (set key_provider on the VM)"
                            .into(),
                    ));
                }
                if d.data_pct > 100 {
                    return Err(bad(dw, "data_pct must be 0 to 100".into()));
                }
            }
            if disks.len() > 15 {
                return Err(bad(what, "at most 15 disks (one SCSI controller)".into()));
            }
        }
        Ok(())
    }
}

impl DiskSpecToml {
    /// The generator spec for this disk (`None` for empty disks).
    pub fn generator(&self, default_seed: u64) -> Option<crate::diskgen::DiskSpec> {
        use crate::diskgen::DiskSpec;
        let size = self.size_mib << 20;
        let seed = self.seed.unwrap_or(default_seed);
        match self.content {
            Content::Empty => None,
            Content::Mixed => Some(DiskSpec::mixed(size, seed)),
            Content::Sparse => Some(DiskSpec::sparse(size, seed, self.data_pct)),
            Content::Random => Some(DiskSpec {
                size,
                seed,
                zero_pct: 0,
                compressible_pct: 0,
                region: 1 << 20,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
name = "t"
[[cluster]]
name = "C1"
[[host]]
name = "h1"
cluster = "C1"
datastores = ["ds1"]
[[datastore]]
name = "ds1"
[[key_provider]]
id = "KMS-A"
[[vm]]
name = "v1"
host = "h1"
key_provider = "KMS-A"
[[vm.disk]]
size_mib = 4
[[proxy]]
name = "p1"
host = "h1"
"#;

    #[test]
    fn parses_and_defaults() {
        let s = Scenario::parse(OK, Path::new("t.toml")).unwrap();
        assert_eq!(s.auth.user, "administrator@vsphere.local");
        assert_eq!(s.vms[0].disks[0].content, Content::Mixed);
        assert_eq!(s.hosts[0].address, "127.0.0.1");
    }

    #[test]
    fn the_shipped_scenarios_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        for f in ["small.toml", "whitepaper.toml"] {
            Scenario::load(&dir.join(f)).unwrap();
        }
    }

    #[test]
    fn names_what_is_wrong() {
        let cases = [
            (
                OK.replace("cluster = \"C1\"", "cluster = \"C9\""),
                "unknown cluster",
            ),
            (
                OK.replace("key_provider = \"KMS-A\"", "key_provider = \"KMS-Z\""),
                "unknown key_provider",
            ),
            (
                OK.replace("host = \"h1\"\nkey", "host = \"h9\"\nkey"),
                "unknown host",
            ),
            (OK.replace("size_mib = 4", "size_mib = 0"), "size_mib"),
            (
                OK.replace("key_provider = \"KMS-A\"\n", "")
                    .replace("size_mib = 4", "size_mib = 4\nencrypted = true"),
                "encrypted VM",
            ),
            (
                OK.replace("name = \"p1\"", "name = \"v1\""),
                "defined twice",
            ),
            (
                OK.replace("name = \"t\"", "name = \"t\"\nbogus = 1"),
                "unknown field",
            ),
        ];
        for (text, want) in cases {
            let e = Scenario::parse(&text, Path::new("t.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e} should mention {want}");
        }
    }
}
