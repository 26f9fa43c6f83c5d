//! The ferry configuration file (TOML): what an agent, the CLI and the orchestrator's
//! agents need to know about vCenter, NBD, transport policy, the data plane and the
//! tenants (repository + key source) they serve. Documented key by key in
//! `docs/configuration.md`.
//!
//! Owns parsing and validation only: unknown keys are errors (a typo must not
//! silently change behaviour), relative paths are resolved against the directory of
//! the file, and secrets are never inline (passwords live in `*_file` files). Must not
//! open connections, read key material or touch repositories.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Configuration errors; each names the file and, where known, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong and where (line/column from the TOML parser).
        message: String,
    },
    /// The file parses but a value is unusable.
    #[error("config file {path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted key, e.g. `tenant[1].kms.address`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A tenant was asked for that the file does not define.
    #[error("config file {path}: no tenant named {name:?} (defined: {defined})")]
    NoSuchTenant {
        /// The file.
        path: PathBuf,
        /// The name asked for.
        name: String,
        /// Names defined, comma separated.
        defined: String,
    },
}

/// The whole file. Every section is optional; commands say which they need.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[agent]`: this proxy agent (for `ferry agent`).
    #[serde(default)]
    pub agent: Option<AgentSection>,
    /// `[vcenter]`: the vCenter this agent or CLI talks to.
    #[serde(default)]
    pub vcenter: Option<VcenterSection>,
    /// `[nbd]`: NBD / NBD-SSL client settings towards ESXi hosts.
    #[serde(default)]
    pub nbd: NbdSection,
    /// `[policy]`: transport selection policy.
    #[serde(default)]
    pub policy: crate::transport::select::Policy,
    /// `[pipeline]`: data-plane threads and memory.
    #[serde(default)]
    pub pipeline: PipelineSection,
    /// `[vddk]`: read and write disks through VMware's VDDK (`libvixDiskLib`)
    /// instead of ferry's native HotAdd (ReconfigVM) and NBD client. Absent:
    /// native.
    #[serde(default)]
    pub vddk: Option<VddkSection>,
    /// `[[tenant]]`: tenants served, each with a repository and a key source.
    #[serde(default, rename = "tenant")]
    pub tenants: Vec<TenantSection>,
    /// `[s3]`: settings of `s3://` repositories (endpoint, region,
    /// addressing, CA, retries, timeout, connections, credentials file and
    /// profile), under the environment variables of the same meaning.
    #[serde(default)]
    pub s3: Option<crate::repo::backend::s3::S3Section>,
    /// Where the file was read from (set by [`Config::load`]).
    #[serde(skip)]
    pub path: PathBuf,
}

/// `[agent]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Proxy id, unique among the orchestrator's agents.
    pub id: String,
    /// Address the HTTP API listens on, e.g. `0.0.0.0:7443`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Server certificate chain (PEM) of the API. Without it the API is refused
    /// unless `insecure_http = true`.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// CA whose client certificates are required (mutual TLS, optional).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Serve plain HTTP (tests and loopback only).
    #[serde(default)]
    pub insecure_http: bool,
    /// File holding the bearer token the orchestrator presents.
    pub token_file: PathBuf,
    /// Directory for the agent's SQLite state.
    pub state_dir: PathBuf,
    /// Concurrent disk slots.
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// Transport modes this agent offers.
    #[serde(default = "default_modes")]
    pub modes: Vec<crate::transport::select::Mode>,
    /// Where hot-added disks appear on this proxy (like `/dev/disk/by-id`).
    #[serde(default)]
    pub hotadd_device_dir: Option<PathBuf>,
    /// Whether this proxy is a VM (HotAdd needs one). Default true.
    #[serde(default = "default_true")]
    pub is_vm: bool,
    /// Key provider (vSphere KMS cluster id) the proxy VM itself is encrypted
    /// under; unset = the proxy VM is not encrypted. HotAdd of an encrypted disk
    /// needs the same provider.
    #[serde(default)]
    pub key_provider: Option<String>,
    /// ESXi host the proxy VM runs on (informational).
    #[serde(default)]
    pub host: Option<String>,
    /// Datastores the proxy's host sees (HotAdd candidates).
    #[serde(default)]
    pub datastores: Vec<String>,
    /// ESXi hosts this proxy reaches for NBD/NBD-SSL; unset = every host.
    #[serde(default)]
    pub reachable_hosts: Option<Vec<String>>,
    /// Seconds to wait for cancelled jobs to clean up at shutdown (SIGTERM).
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
}

fn default_true() -> bool {
    true
}
fn default_grace() -> u64 {
    60
}

fn default_listen() -> String {
    "127.0.0.1:7443".into()
}
fn default_slots() -> u32 {
    4
}
fn default_modes() -> Vec<crate::transport::select::Mode> {
    use crate::transport::select::Mode;
    vec![Mode::HotAdd, Mode::NbdSsl]
}

/// `[vcenter]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcenterSection {
    /// SDK URL, e.g. `https://vcenter.example.com/sdk`.
    pub url: String,
    /// User name.
    pub user: String,
    /// File holding the password (first line; trailing newline ignored).
    pub password_file: PathBuf,
    /// CA certificate (PEM) the vCenter certificate must chain to.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Alternatively, the SHA-256 fingerprint of the vCenter certificate
    /// (hex, colons allowed), as vSphere clients pin thumbprints.
    #[serde(default)]
    pub thumbprint: Option<String>,
    /// Name of this agent's own proxy VM (HotAdd attaches disks to it).
    #[serde(default)]
    pub proxy_vm: Option<String>,
    /// Seconds for connect and each request.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_timeout() -> u64 {
    30
}

/// `[nbd]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdSection {
    /// Directory with `ca-cert.pem` (and optionally `client-cert.pem` +
    /// `client-key.pem`) for NBD-SSL, the libnbd layout.
    #[serde(default)]
    pub tls_certificates: Option<PathBuf>,
    /// Connections (reads in flight) per export.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// TCP port of the ESXi hosts' NBD service (the host name comes with the
    /// ticket vCenter hands out).
    #[serde(default = "default_nbd_port")]
    pub port: u16,
}

impl Default for NbdSection {
    fn default() -> Self {
        NbdSection {
            tls_certificates: None,
            connections: default_connections(),
            port: default_nbd_port(),
        }
    }
}

fn default_connections() -> usize {
    4
}
fn default_nbd_port() -> u16 {
    10809
}

/// `[vddk]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VddkSection {
    /// The VDDK directory (`vmware-vix-disklib-distrib`, holding
    /// `lib64/libvixDiskLib.so.8` or `.so.7`).
    pub libdir: PathBuf,
    /// VDDK's own configuration file (passed to `VixDiskLib_InitEx`), if any.
    #[serde(default)]
    pub config_file: Option<PathBuf>,
    /// ESXi's NFC port for NBD / NBD-SSL through VDDK.
    #[serde(default = "default_nfc_port")]
    pub nfc_port: u16,
}

fn default_nfc_port() -> u16 {
    902
}

/// `[pipeline]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSection {
    /// Worker threads (default: number of cores).
    #[serde(default)]
    pub workers: Option<usize>,
    /// Memory budget for chunk buffers, MiB (default 128).
    #[serde(default)]
    pub memory_mib: Option<u64>,
}

/// `[[tenant]]`: one tenant served by this agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSection {
    /// Tenant name.
    pub name: String,
    /// Repository of this tenant (never shared between tenants): a directory
    /// (relative paths are relative to this file), or `s3://BUCKET/PREFIX`
    /// with the S3 settings in the agent's environment (docs/operations.md).
    pub repository: PathBuf,
    /// Key provider (vSphere KMS cluster id) of this tenant's VMs, as vCenter
    /// reports it in `keyId.providerId.id`.
    #[serde(default)]
    pub key_provider: Option<String>,
    /// The tenant's KMS; exactly one of `kms` and `pem` is required.
    #[serde(default)]
    pub kms: Option<KmsSection>,
    /// PEM key files instead of a KMS (small installations, tests).
    #[serde(default)]
    pub pem: Option<PemSection>,
    /// Key-loss protection for this tenant: the provider's recovery public key
    /// (PEM). Every backup then makes sure the repository wraps new points' data
    /// keys with it too (`ferry repo recovery enable`). Unset: the repository's
    /// own setting stands.
    #[serde(default)]
    pub recovery_public_key: Option<PathBuf>,
    /// Codec of new chunks in this tenant's repository (`lz4`, `zstd[:LEVEL]`,
    /// `auto[:LEVEL]`): used when the agent creates the repository, and set on
    /// an existing one before a backup when it differs. Unset: the repository's
    /// own setting (LZ4 for one the agent creates).
    #[serde(default, deserialize_with = "codec_from_str")]
    pub compression: Option<crate::repo::codec::Codec>,
    /// The directories under which restores requested through the agent API
    /// (`POST /v1/restores` with target kind `directory` or `files`) may write
    /// for this tenant (relative paths are relative to this file). A requested
    /// path must resolve, symlinks followed, to one of them or below. Empty
    /// (the default): such restores are refused. Restores into a VM and the
    /// local `ferry restore` are not affected.
    #[serde(default)]
    pub restore_dirs: Vec<PathBuf>,
}

fn codec_from_str<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<crate::repo::codec::Codec>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

/// `[tenant.kms]`: a KMIP server over mutual TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsSection {
    /// `host:port` (KMIP's port is 5696).
    pub address: String,
    /// Name the server certificate must carry (default: the host of `address`).
    #[serde(default)]
    pub server_name: Option<String>,
    /// CA certificate (PEM) that signed the KMS server certificate.
    pub ca: PathBuf,
    /// Client certificate chain (PEM); or use `pkcs12`.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Client certificate and key as a PKCS#12 bundle (as KMS vendors issue them).
    #[serde(default)]
    pub pkcs12: Option<PathBuf>,
    /// File holding the PKCS#12 password.
    #[serde(default)]
    pub pkcs12_password_file: Option<PathBuf>,
    /// Name of the tenant key pair, e.g. `ferry/<tenant>/<repository>`.
    pub key_name: String,
    /// Create and activate the key pair when the KMS has none of that name.
    #[serde(default)]
    pub create_key: bool,
    /// RSA size for `create_key`: 2048, 3072 or 4096.
    #[serde(default = "default_bits")]
    pub key_bits: u32,
    /// Seconds for connect and each request.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_bits() -> u32 {
    2048
}

/// `[tenant.pem]`: tenant key pair as PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PemSection {
    /// Public key (SPKI or PKCS#1 PEM).
    pub public_key: PathBuf,
    /// Private key (PKCS#8 or PKCS#1 PEM); needed to open the keyring and restore.
    #[serde(default)]
    pub private_key: Option<PathBuf>,
}

impl Config {
    /// Read, parse, resolve relative paths and validate `path`; its `[s3]`
    /// becomes this process's defaults for `s3://` repositories (under the
    /// environment).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let c = Self::parse(&read_text(path)?, path)?;
        crate::repo::backend::s3::set_config_defaults(c.s3.clone());
        Ok(c)
    }

    /// Parse `text` as if read from `path` (relative paths resolve against its
    /// directory).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let (mut c, base): (Config, PathBuf) = parse_toml(text, path)?;
        c.path = path.to_path_buf();
        c.resolve_paths(&base);
        c.validate()?;
        Ok(c)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        let fix_opt = |p: &mut Option<PathBuf>| {
            if let Some(p) = p {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        };
        if let Some(s3) = &mut self.s3 {
            fix_opt(&mut s3.ca_file);
            fix_opt(&mut s3.credentials_file);
        }
        if let Some(a) = &mut self.agent {
            fix_opt(&mut a.tls_cert);
            fix_opt(&mut a.tls_key);
            fix_opt(&mut a.client_ca);
            fix(&mut a.token_file);
            fix(&mut a.state_dir);
            fix_opt(&mut a.hotadd_device_dir);
        }
        if let Some(v) = &mut self.vcenter {
            fix(&mut v.password_file);
            fix_opt(&mut v.ca);
        }
        fix_opt(&mut self.nbd.tls_certificates);
        if let Some(v) = &mut self.vddk {
            fix(&mut v.libdir);
            fix_opt(&mut v.config_file);
        }
        for t in &mut self.tenants {
            // An object-storage location is not a path.
            if !t
                .repository
                .to_str()
                .is_some_and(|r| r.starts_with("s3://"))
            {
                fix(&mut t.repository);
            }
            fix_opt(&mut t.recovery_public_key);
            for d in &mut t.restore_dirs {
                fix(d);
            }
            if let Some(k) = &mut t.kms {
                fix(&mut k.ca);
                fix_opt(&mut k.client_cert);
                fix_opt(&mut k.client_key);
                fix_opt(&mut k.pkcs12);
                fix_opt(&mut k.pkcs12_password_file);
            }
            if let Some(p) = &mut t.pem {
                fix(&mut p.public_key);
                fix_opt(&mut p.private_key);
            }
        }
    }

    fn invalid(&self, key: String, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            key,
            message: message.into(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(a) = &self.agent {
            if a.id.trim().is_empty() {
                return Err(self.invalid("agent.id".into(), "must not be empty"));
            }
            if a.slots == 0 {
                return Err(self.invalid("agent.slots".into(), "must be at least 1"));
            }
            if a.modes.is_empty() {
                return Err(self.invalid(
                    "agent.modes".into(),
                    "name at least one of hotadd, nbdssl, nbd",
                ));
            }
            if a.tls_cert.is_some() != a.tls_key.is_some() {
                return Err(
                    self.invalid("agent.tls_cert".into(), "tls_cert and tls_key go together")
                );
            }
            if a.key_provider
                .as_deref()
                .is_some_and(|k| k.trim().is_empty())
            {
                return Err(self.invalid(
                    "agent.key_provider".into(),
                    "must not be empty (omit it for an unencrypted proxy VM)",
                ));
            }
            if a.client_ca.is_some() && a.tls_cert.is_none() {
                return Err(self.invalid(
                    "agent.client_ca".into(),
                    "client certificates need TLS: set tls_cert and tls_key",
                ));
            }
            if a.tls_cert.is_none() && !a.insecure_http {
                return Err(self.invalid(
                    "agent.tls_cert".into(),
                    "the API needs tls_cert + tls_key (or insecure_http = true for loopback tests)",
                ));
            }
        }
        if let Some(v) = &self.vcenter {
            if !(v.url.starts_with("https://") || v.url.starts_with("http://")) {
                return Err(self.invalid(
                    "vcenter.url".into(),
                    "must be an https:// URL such as https://vcenter.example.com/sdk",
                ));
            }
            if let Some(t) = &v.thumbprint {
                let hex: String = t.chars().filter(|c| *c != ':').collect();
                if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(self.invalid(
                        "vcenter.thumbprint".into(),
                        "must be a SHA-256 fingerprint: 64 hex digits, colons allowed",
                    ));
                }
            }
        }
        if self.nbd.connections == 0 || self.nbd.connections > 64 {
            return Err(self.invalid("nbd.connections".into(), "must be 1 to 64"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            let key = |k: &str| format!("tenant[{i}].{k}");
            if t.name.trim().is_empty() {
                return Err(self.invalid(key("name"), "must not be empty"));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(self.invalid(key("name"), format!("{:?} is defined twice", t.name)));
            }
            match (&t.kms, &t.pem) {
                (Some(_), Some(_)) => {
                    return Err(self.invalid(
                        key("kms"),
                        "give either [tenant.kms] or [tenant.pem], not both",
                    ))
                }
                (None, None) => {
                    return Err(self.invalid(
                        key("kms"),
                        "a tenant needs a key source: [tenant.kms] or [tenant.pem]",
                    ))
                }
                _ => {}
            }
            for (j, d) in t.restore_dirs.iter().enumerate() {
                if d.components().any(|c| c == std::path::Component::ParentDir) {
                    return Err(self.invalid(
                        key(&format!("restore_dirs[{j}]")),
                        format!("{}: must not contain `..` components", d.display()),
                    ));
                }
            }
            if let Some(k) = &t.kms {
                if !k.address.contains(':') {
                    return Err(
                        self.invalid(key("kms.address"), "must be host:port (KMIP uses 5696)")
                    );
                }
                if ![2048, 3072, 4096].contains(&k.key_bits) {
                    return Err(self.invalid(key("kms.key_bits"), "must be 2048, 3072 or 4096"));
                }
                let pem = k.client_cert.is_some() && k.client_key.is_some();
                let p12 = k.pkcs12.is_some();
                if pem == p12 {
                    return Err(self.invalid(
                        key("kms.client_cert"),
                        "give client_cert + client_key, or pkcs12 (+ pkcs12_password_file)",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The tenant named `name`, or the only tenant when `name` is `None`.
    pub fn tenant(&self, name: Option<&str>) -> Result<&TenantSection, ConfigError> {
        let defined = || {
            self.tenants
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match name {
            Some(n) => {
                self.tenants
                    .iter()
                    .find(|t| t.name == n)
                    .ok_or_else(|| ConfigError::NoSuchTenant {
                        path: self.path.clone(),
                        name: n.to_string(),
                        defined: defined(),
                    })
            }
            None if self.tenants.len() == 1 => Ok(&self.tenants[0]),
            None => Err(self.invalid(
                "tenant".into(),
                format!(
                    "{} tenants defined ({}); name one with --tenant",
                    self.tenants.len(),
                    defined()
                ),
            )),
        }
    }
}

/// The text of the configuration file `path`.
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Deserialize TOML `text` read from `path`; also returns the directory relative
/// paths in it resolve against. Errors name the file, line and column.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
) -> Result<(T, PathBuf), ConfigError> {
    let v = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim().replace('\n', " "),
    })?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok((v, base))
}

/// Read a secret from a file: the first line, without its line ending. The caller
/// must not log it.
pub fn read_secret_file(path: &Path) -> Result<zeroize::Zeroizing<String>, ConfigError> {
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
        ConfigError::Io {
            path: path.to_path_buf(),
            source,
        }
    })?);
    Ok(zeroize::Zeroizing::new(
        text.lines().next().unwrap_or("").to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
[agent]
id = "proxy-a1"
insecure_http = true
token_file = "agent.token"
state_dir = "/var/lib/ferry"
modes = ["hotadd", "nbdssl"]

[vcenter]
url = "https://vc.example.com/sdk"
user = "backup@vsphere.local"
password_file = "vc.password"
thumbprint = "AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99"
proxy_vm = "ferry-proxy-a1"

[policy]
failover_to_network = false
allow_cleartext_nbd = false

[[tenant]]
name = "tenant-a"
repository = "repos/a"
key_provider = "kms-a"
restore_dirs = ["restores/a", "/srv/restore"]
[tenant.kms]
address = "kms-a.example.com:5696"
ca = "kms-a/ca.pem"
client_cert = "kms-a/agent.pem"
client_key = "kms-a/agent.key"
key_name = "ferry/tenant-a/repo1"

[[tenant]]
name = "tenant-b"
repository = "s3://backups/tenant-b"
recovery_public_key = "provider-recovery.pub.pem"
compression = "zstd:3"
[tenant.pem]
public_key = "b.pub.pem"
"#;

    #[test]
    fn full_example_parses_and_resolves_relative_paths() {
        let c = Config::parse(FULL, Path::new("/etc/ferry/ferry.toml")).unwrap();
        let a = c.agent.as_ref().unwrap();
        assert_eq!(a.token_file, PathBuf::from("/etc/ferry/agent.token"));
        assert_eq!(a.state_dir, PathBuf::from("/var/lib/ferry"));
        assert_eq!(a.slots, 4);
        assert!(!c.policy.failover_to_network);
        let t = c.tenant(Some("tenant-a")).unwrap();
        assert_eq!(t.repository, PathBuf::from("/etc/ferry/repos/a"));
        assert_eq!(
            t.kms.as_ref().unwrap().ca,
            PathBuf::from("/etc/ferry/kms-a/ca.pem")
        );
        assert_eq!(
            c.tenant(Some("tenant-b")).unwrap().repository,
            PathBuf::from("s3://backups/tenant-b")
        );
        let b = c.tenant(Some("tenant-b")).unwrap();
        assert_eq!(
            b.recovery_public_key.as_deref(),
            Some(Path::new("/etc/ferry/provider-recovery.pub.pem"))
        );
        assert_eq!(
            b.compression,
            Some(crate::repo::codec::Codec::Zstd { level: 3 })
        );
        assert_eq!(c.tenant(Some("tenant-a")).unwrap().compression, None);
        assert_eq!(
            t.restore_dirs,
            [
                PathBuf::from("/etc/ferry/restores/a"),
                PathBuf::from("/srv/restore")
            ]
        );
        assert!(b.restore_dirs.is_empty(), "none unless configured");
        assert!(matches!(c.tenant(None), Err(ConfigError::Invalid { .. })));
        assert!(matches!(
            c.tenant(Some("nope")),
            Err(ConfigError::NoSuchTenant { .. })
        ));
    }

    #[test]
    fn a_bad_codec_names_itself() {
        let text = "[[tenant]]\nname = \"a\"\nrepository = \"r\"\ncompression = \"gzip\"\n[tenant.pem]\npublic_key = \"p\"\n";
        let e = Config::parse(text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gzip") && e.contains("zstd"), "{e}");
    }

    #[test]
    fn s3_section_parses_with_paths_resolved() {
        let text = "[s3]\nendpoint = \"https://rgw:7480\"\nca_file = \"pki/ca.pem\"\ncredentials_file = \"/etc/ferry/creds\"\nprofile = \"p\"\nconnections = 16\n";
        let c = Config::parse(text, Path::new("/etc/ferry/agent.toml")).unwrap();
        let s3 = c.s3.unwrap();
        assert_eq!(s3.endpoint.as_deref(), Some("https://rgw:7480"));
        assert_eq!(s3.ca_file.unwrap(), Path::new("/etc/ferry/pki/ca.pem"));
        assert_eq!(s3.credentials_file.unwrap(), Path::new("/etc/ferry/creds"));
        assert_eq!(s3.connections, Some(16));
        let e = Config::parse("[s3]\nsecret_access_key = \"x\"\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("secret_access_key"), "no secrets in [s3]: {e}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = Config::parse("[nbd]\nconections = 4\n", Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("conections"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let cases = [
            ("[nbd]\nconnections = 0\n", "nbd.connections"),
            ("[vcenter]\nurl = \"vc\"\nuser = \"u\"\npassword_file = \"p\"\n", "vcenter.url"),
            ("[vcenter]\nurl = \"https://vc/sdk\"\nuser = \"u\"\npassword_file = \"p\"\nthumbprint = \"abc\"\n", "vcenter.thumbprint"),
            ("[[tenant]]\nname = \"a\"\nrepository = \"r\"\n", "tenant[0].kms"),
            ("[[tenant]]\nname = \"a\"\nrepository = \"r\"\n[tenant.pem]\npublic_key = \"p\"\n[[tenant]]\nname = \"a\"\nrepository = \"r\"\n[tenant.pem]\npublic_key = \"p\"\n", "tenant[1].name"),
            ("[[tenant]]\nname = \"a\"\nrepository = \"r\"\n[tenant.kms]\naddress = \"kms\"\nca = \"c\"\nclient_cert = \"c\"\nclient_key = \"k\"\nkey_name = \"n\"\n", "tenant[0].kms.address"),
            ("[[tenant]]\nname = \"a\"\nrepository = \"r\"\n[tenant.kms]\naddress = \"kms:5696\"\nca = \"c\"\nkey_name = \"n\"\n", "tenant[0].kms.client_cert"),
            ("[agent]\nid = \"p\"\ntoken_file = \"t\"\nstate_dir = \"s\"\n", "agent.tls_cert"),
            ("[agent]\nid = \"p\"\ninsecure_http = true\ntoken_file = \"t\"\nstate_dir = \"s\"\nslots = 0\n", "agent.slots"),
            ("[agent]\nid = \"p\"\ninsecure_http = true\ntoken_file = \"t\"\nstate_dir = \"s\"\nclient_ca = \"ca.pem\"\n", "agent.client_ca"),
            ("[agent]\nid = \"p\"\ninsecure_http = true\ntoken_file = \"t\"\nstate_dir = \"s\"\nkey_provider = \" \"\n", "agent.key_provider"),
            ("[[tenant]]\nname = \"a\"\nrepository = \"r\"\nrestore_dirs = [\"/srv/r\", \"/srv/x/../etc\"]\n[tenant.pem]\npublic_key = \"p\"\n", "tenant[0].restore_dirs[1]"),
        ];
        for (text, key) in cases {
            match Config::parse(text, Path::new("x.toml")) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: expected Invalid({key}), got {other:?}"),
            }
        }
    }

    #[test]
    fn garbage_is_a_parse_error_not_a_panic() {
        for text in [
            "[[",
            "a = ",
            "\u{0}",
            "[agent]\nid = 5\n",
            "x = \"\\u{d800}\"",
        ] {
            assert!(
                Config::parse(text, Path::new("x.toml")).is_err(),
                "{text:?}"
            );
        }
    }
}
