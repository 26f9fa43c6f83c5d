//! The orchestrator's own TOML file (documented in docs/orchestrator.md):
//! `[orchestrator]`, `[key_sync]`, `[dispatch]`, `[[vcenter]]`, `[[tenant]]`, `[[agent]]`,
//! `[[job]]`. Parsing and validation only, with the same rules as the agent
//! config: unknown keys are errors, relative paths resolve against the file's
//! directory, secrets live in `*_file` files. Holds no key material: agents own
//! the tenant KMS credentials.

use crate::agent::api::{RetentionSpec, Validate};
use crate::config::ConfigError;
use crate::job::quiesce::QuiescePolicy;
use crate::transport::select::Policy;
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrchestratorConfig {
    /// `[orchestrator]`.
    pub orchestrator: OrchestratorSection,
    /// `[key_sync]`: the key sync system job.
    #[serde(default)]
    pub key_sync: KeySyncSection,
    /// `[dispatch]`: snapshot caps per host and per datastore.
    #[serde(default)]
    pub dispatch: DispatchSection,
    /// `[[vcenter]]`.
    #[serde(default, rename = "vcenter")]
    pub vcenters: Vec<VcenterConfig>,
    /// `[[tenant]]`.
    #[serde(default, rename = "tenant")]
    pub tenants: Vec<TenantConfig>,
    /// `[[agent]]`.
    #[serde(default, rename = "agent")]
    pub agents: Vec<AgentConfig>,
    /// `[[job]]`.
    #[serde(default, rename = "job")]
    pub jobs: Vec<JobConfig>,
    /// `[console]`: the web console (docs/console.md); absent: no console.
    #[serde(default)]
    pub console: Option<ConsoleSection>,
    /// Where the file was read from.
    #[serde(skip)]
    pub path: PathBuf,
}

/// `[orchestrator]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrchestratorSection {
    /// Directory of the orchestrator's SQLite history.
    pub state_dir: PathBuf,
    /// How often running agent jobs are polled, e.g. `"5s"`.
    #[serde(default = "default_poll", with = "duration")]
    pub poll_interval: Duration,
    /// How often the scheduler looks for due jobs, e.g. `"30s"`.
    #[serde(default = "default_tick", with = "duration")]
    pub schedule_tick: Duration,
    /// Agents tried per VM per run before the VM fails.
    #[serde(default = "default_attempts")]
    pub dispatch_attempts: u32,
    /// Timeout of each HTTP request to an agent.
    #[serde(default = "default_timeout", with = "duration")]
    pub request_timeout: Duration,
    /// Consecutive failed polls after which a dispatched job is given up.
    #[serde(default = "default_poll_failures")]
    pub max_poll_failures: u32,
    /// Longest a run may take before its unfinished VMs are marked failed.
    #[serde(default = "default_run_timeout", with = "duration")]
    pub run_timeout: Duration,
}

fn default_poll() -> Duration {
    Duration::from_secs(5)
}
fn default_tick() -> Duration {
    Duration::from_secs(30)
}
fn default_attempts() -> u32 {
    3
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_poll_failures() -> u32 {
    12
}
fn default_run_timeout() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// `[console]`: the web console that `ferry orchestrator run` serves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSection {
    /// Address and port, e.g. `"0.0.0.0:8443"` (with TLS) or
    /// `"127.0.0.1:8480"` (plain HTTP: loopback only, behind a TLS proxy).
    pub listen: std::net::SocketAddr,
    /// TLS certificate chain (PEM); with `tls_key`.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); with `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// A session ends after this long without a request, e.g. `"30m"`.
    #[serde(default = "default_session_idle", with = "duration")]
    pub session_idle: Duration,
    /// A session ends this long after login whatever happens, e.g. `"12h"`.
    #[serde(default = "default_session_max", with = "duration")]
    pub session_max: Duration,
    /// How long one read of the world (plan, inventory, agents) serves pages.
    #[serde(default = "default_console_refresh", with = "duration")]
    pub refresh: Duration,
}

fn default_session_idle() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_session_max() -> Duration {
    Duration::from_secs(12 * 3600)
}
fn default_console_refresh() -> Duration {
    Duration::from_secs(10)
}

/// `[dispatch]`: how many VMs may have a backup running (a snapshot: the VM
/// is stunned when it is taken and when it is removed) at once per ESXi host
/// and per datastore, across every job and tenant of this orchestrator. A VM
/// whose host or one of whose datastores is at its cap waits in the queue (it
/// does not fail) and its run item records why. `0`: no cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatchSection {
    /// VMs with a backup running at once per ESXi host.
    #[serde(default = "default_per_host")]
    pub max_snapshots_per_host: u32,
    /// VMs with a backup running at once per datastore (a VM counts on every
    /// datastore holding one of its disks).
    #[serde(default = "default_per_datastore")]
    pub max_snapshots_per_datastore: u32,
}

impl Default for DispatchSection {
    fn default() -> Self {
        DispatchSection {
            max_snapshots_per_host: default_per_host(),
            max_snapshots_per_datastore: default_per_datastore(),
        }
    }
}

impl DispatchSection {
    /// The caps as the dispatch queue takes them.
    pub fn caps(&self) -> super::dispatch::Caps {
        super::dispatch::Caps {
            per_host: self.max_snapshots_per_host,
            per_datastore: self.max_snapshots_per_datastore,
        }
    }
}

/// Default `max_snapshots_per_host`: 4 (a host's VMs are stunned one by one,
/// not all at once).
fn default_per_host() -> u32 {
    4
}
/// Default `max_snapshots_per_datastore`: 4, the usual limit of backup
/// products (snapshot deltas and consolidation load the datastore).
fn default_per_datastore() -> u32 {
    4
}

/// `[key_sync]`: the key sync system job (seed 001: Veeam runs it every 24 h and
/// needs a support call to change that; here it is one key).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySyncSection {
    /// Run it at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Interval, e.g. `"24h"`, `"6h"`, `"90m"`.
    #[serde(default = "default_key_sync", with = "duration")]
    pub every: Duration,
}

impl Default for KeySyncSection {
    fn default() -> Self {
        KeySyncSection {
            enabled: true,
            every: default_key_sync(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_key_sync() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// `[[vcenter]]`: where the inventory comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcenterConfig {
    /// Name jobs refer to.
    pub name: String,
    /// SDK URL, e.g. `https://vc.example.com/sdk`.
    #[serde(default)]
    pub url: Option<String>,
    /// User name.
    #[serde(default)]
    pub user: Option<String>,
    /// File holding the password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA certificate (PEM) of the vCenter certificate.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Or the SHA-256 thumbprint of the vCenter certificate.
    #[serde(default)]
    pub thumbprint: Option<String>,
    /// Instead of a vCenter: a JSON inventory file (offline planning, tests).
    #[serde(default)]
    pub inventory_file: Option<PathBuf>,
}

/// `[[tenant]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Tenant name (as in the agents' `[[tenant]]`).
    pub name: String,
    /// The tenant's vSphere key provider: an encrypted VM under any other
    /// provider is never backed up for this tenant.
    #[serde(default)]
    pub key_provider: Option<String>,
    /// Agents (ids) that serve this tenant.
    pub agents: Vec<String>,
}

/// `[[agent]]`: how to reach one agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Proxy id; must match the agent's `[agent] id`.
    pub id: String,
    /// Base URL, `https://host:port`.
    pub url: String,
    /// File holding the agent's bearer token.
    pub token_file: PathBuf,
    /// CA (PEM) the agent's certificate chains to.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) when the agent requires one.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// Client key (PEM).
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Allow an `http://` URL (loopback tests only: the token travels in clear).
    #[serde(default)]
    pub insecure_http: bool,
}

/// How often a job runs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Schedule {
    /// Every interval after the previous run started, e.g. `"6h"`.
    Every(#[serde(with = "duration")] Duration),
    /// Once a day at `HH:MM` UTC.
    Daily(String),
}

/// `[[job]]`: which VMs, when, how.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// Job name.
    pub name: String,
    /// Tenant whose agents and repository serve the VMs.
    pub tenant: String,
    /// vCenter (name) the VMs live in.
    pub vcenter: String,
    /// VM name globs (`*`, `?`); a VM is selected if it matches one (and a folder).
    #[serde(default)]
    pub vms: Vec<String>,
    /// Folder paths; a VM is selected if its folder is one of them or below.
    #[serde(default)]
    pub folders: Vec<String>,
    /// VM name globs to leave out.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// When to run; without it the job runs only with `run --once`.
    #[serde(default)]
    pub schedule: Option<Schedule>,
    /// Retention the agent applies after each successful backup
    /// (`keep_last`, `keep_daily`, `keep_weekly`, `keep_monthly`).
    #[serde(default)]
    pub retention: Option<RetentionSpec>,
    /// Transport policy (failover to network, clear text, forced mode).
    #[serde(default)]
    pub policy: Policy,
    /// Force full backups.
    #[serde(default)]
    pub full: bool,
    /// When a VM may use a lesser mode instead of waiting for its best proxy
    /// and mode when that one has no free slot: `"never"` (default: wait),
    /// `"after=10m"` (after waiting that long), `"when-idle"` (only to an agent
    /// that would otherwise sit idle, and only when the VM would miss `window`).
    #[serde(default)]
    pub lesser_mode: super::scheduler::LesserMode,
    /// The backup window of a run, from its start (`"6h"`); default: the
    /// orchestrator's `run_timeout`. Used by `lesser_mode = "when-idle"`.
    #[serde(default, with = "opt_duration")]
    pub window: Option<Duration>,
    /// Snapshot consistency of the job's VMs: `"off"` (default: crash-consistent),
    /// `"prefer"` (quiesced through VMware Tools, crash-consistent when the guest
    /// cannot be quiesced), `"require"` (quiesced, or the VM's backup fails).
    #[serde(default)]
    pub quiesce: QuiescePolicy,
    /// Per-VM quiesce policies (`[[job.quiesce_override]]`), first match wins;
    /// VMs no override matches take [`Self::quiesce`].
    #[serde(default)]
    pub quiesce_override: Vec<QuiesceOverride>,
}

/// `[[job.quiesce_override]]`: a quiesce policy for some of a job's VMs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuiesceOverride {
    /// VM name globs (`*`, `?`) this policy applies to.
    pub vms: Vec<String>,
    /// The policy for those VMs.
    pub quiesce: QuiescePolicy,
}

impl JobConfig {
    /// The quiesce policy of VM `vm`: the first override whose globs match it,
    /// else the job's.
    pub fn quiesce_for(&self, vm: &str) -> QuiescePolicy {
        self.quiesce_override
            .iter()
            .find(|o| o.vms.iter().any(|g| crate::glob::glob(g, vm)))
            .map(|o| o.quiesce)
            .unwrap_or(self.quiesce)
    }
}

/// Parse `"90s"`, `"15m"`, `"6h"`, `"1d"`, `"1h30m"`, `"250ms"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total: u128 = 0;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        if c == 'm' && chars.peek() == Some(&'s') {
            unit.push(chars.next().unwrap_or('s'));
        }
        if num.is_empty() {
            return Err(format!("{s:?}: a number must come before {unit:?}"));
        }
        let n: u128 = num
            .parse()
            .map_err(|_| format!("{s:?}: number too large"))?;
        num.clear();
        let ms = match unit.as_str() {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => {
                return Err(format!(
                    "{s:?}: unknown unit {other:?} (use ms, s, m, h, d)"
                ))
            }
        };
        total = total.saturating_add(n.saturating_mul(ms));
        any = true;
    }
    if !num.is_empty() || !any {
        return Err(format!(
            "{s:?}: give a unit, e.g. \"30s\", \"15m\", \"24h\""
        ));
    }
    if total == 0 {
        return Err(format!("{s:?}: must be more than zero"));
    }
    if total > 366 * 86_400_000 {
        return Err(format!("{s:?}: at most 366 days"));
    }
    Ok(Duration::from_millis(total as u64))
}

/// Serde adapter for durations written as strings.
pub mod duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    /// Deserialize `"30s"` and friends.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

/// Serde helper: optional durations as strings.
pub mod opt_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    /// Deserialize an optional `"30s"` and friends.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = Option::<String>::deserialize(d)?;
        s.map(|s| super::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Parse `HH:MM` (24 h clock) into minutes after midnight.
pub fn parse_daily(s: &str) -> Result<u32, String> {
    let (h, m) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: use HH:MM (UTC), e.g. \"02:30\""))?;
    let h: u32 = h
        .parse()
        .map_err(|_| format!("{s:?}: hour is not a number"))?;
    let m: u32 = m
        .parse()
        .map_err(|_| format!("{s:?}: minute is not a number"))?;
    if h > 23 || m > 59 || s.len() != 5 {
        return Err(format!("{s:?}: use HH:MM between 00:00 and 23:59 (UTC)"));
    }
    Ok(h * 60 + m)
}

impl OrchestratorConfig {
    /// Read, parse, resolve paths and validate.
    pub fn load(path: &Path) -> Result<OrchestratorConfig, ConfigError> {
        Self::parse(&crate::config::read_text(path)?, path)
    }

    /// Parse `text` as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<OrchestratorConfig, ConfigError> {
        let (mut c, base): (OrchestratorConfig, PathBuf) = crate::config::parse_toml(text, path)?;
        c.path = path.to_path_buf();
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut c.orchestrator.state_dir);
        for v in &mut c.vcenters {
            for p in [&mut v.password_file, &mut v.ca, &mut v.inventory_file]
                .into_iter()
                .flatten()
            {
                fix(p);
            }
        }
        if let Some(con) = &mut c.console {
            for p in [&mut con.tls_cert, &mut con.tls_key].into_iter().flatten() {
                fix(p);
            }
        }
        for a in &mut c.agents {
            fix(&mut a.token_file);
            for p in [&mut a.ca, &mut a.client_cert, &mut a.client_key]
                .into_iter()
                .flatten()
            {
                fix(p);
            }
        }
        c.validate()?;
        Ok(c)
    }

    fn invalid(&self, key: String, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            key,
            message: message.into(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(con) = &self.console {
            match (&con.tls_cert, &con.tls_key) {
                (Some(_), None) | (None, Some(_)) => {
                    return Err(self.invalid(
                        "console.tls_cert".into(),
                        "give both tls_cert and tls_key, or neither",
                    ))
                }
                (None, None) if !con.listen.ip().is_loopback() => {
                    return Err(self.invalid(
                        "console.listen".into(),
                        format!(
                            "{} is not a loopback address: without tls_cert and tls_key the console serves plain HTTP, \
                             which is allowed on 127.0.0.1/::1 only (put a TLS proxy in front, or configure TLS)",
                            con.listen
                        ),
                    ))
                }
                _ => {}
            }
            if con.session_idle.is_zero() || con.session_max < con.session_idle {
                return Err(self.invalid(
                    "console.session_max".into(),
                    "session_idle must be positive and session_max at least session_idle",
                ));
            }
        }
        let o = &self.orchestrator;
        if o.dispatch_attempts == 0 {
            return Err(self.invalid(
                "orchestrator.dispatch_attempts".into(),
                "must be at least 1",
            ));
        }
        if o.max_poll_failures == 0 {
            return Err(self.invalid(
                "orchestrator.max_poll_failures".into(),
                "must be at least 1",
            ));
        }
        let unique = |what: &str, names: Vec<&str>| -> Result<BTreeSet<String>, ConfigError> {
            let mut seen = BTreeSet::new();
            for (i, n) in names.iter().enumerate() {
                if n.trim().is_empty() {
                    return Err(self.invalid(format!("{what}[{i}]"), "name must not be empty"));
                }
                if !seen.insert(n.to_string()) {
                    return Err(
                        self.invalid(format!("{what}[{i}]"), format!("{n:?} is defined twice"))
                    );
                }
            }
            Ok(seen)
        };
        let vcenters = unique(
            "vcenter",
            self.vcenters.iter().map(|v| v.name.as_str()).collect(),
        )?;
        let tenants = unique(
            "tenant",
            self.tenants.iter().map(|t| t.name.as_str()).collect(),
        )?;
        let agents = unique("agent", self.agents.iter().map(|a| a.id.as_str()).collect())?;
        unique("job", self.jobs.iter().map(|j| j.name.as_str()).collect())?;
        for (i, v) in self.vcenters.iter().enumerate() {
            match (&v.url, &v.inventory_file) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(self.invalid(
                        format!("vcenter[{i}].url"),
                        "give either url (+ user, password_file) or inventory_file",
                    ))
                }
                (Some(u), None) => {
                    if !u.starts_with("https://") {
                        return Err(self.invalid(
                            format!("vcenter[{i}].url"),
                            "must be an https:// URL such as https://vcenter.example.com/sdk",
                        ));
                    }
                    if v.user.is_none() || v.password_file.is_none() {
                        return Err(self.invalid(
                            format!("vcenter[{i}].user"),
                            "a vCenter url needs user and password_file",
                        ));
                    }
                }
                (None, Some(_)) => {}
            }
        }
        for (i, t) in self.tenants.iter().enumerate() {
            if t.agents.is_empty() {
                return Err(self.invalid(
                    format!("tenant[{i}].agents"),
                    "name at least one agent that serves this tenant",
                ));
            }
            for a in &t.agents {
                if !agents.contains(a) {
                    return Err(self.invalid(
                        format!("tenant[{i}].agents"),
                        format!("no [[agent]] with id {a:?}"),
                    ));
                }
            }
            if t.key_provider
                .as_deref()
                .is_some_and(|k| k.trim().is_empty())
            {
                return Err(self.invalid(
                    format!("tenant[{i}].key_provider"),
                    "must not be empty (omit it if the tenant's VMs are not encrypted)",
                ));
            }
        }
        for (i, a) in self.agents.iter().enumerate() {
            let https = a.url.starts_with("https://");
            let http = a.url.starts_with("http://");
            if !(https || (http && a.insecure_http)) {
                return Err(self.invalid(
                    format!("agent[{i}].url"),
                    if http {
                        "http:// sends the token in clear text: use https:// (or insecure_http = true on loopback)"
                    } else {
                        "must be an https:// URL such as https://proxy-a1.example.com:7443"
                    },
                ));
            }
            if https && a.ca.is_none() {
                return Err(self.invalid(
                    format!("agent[{i}].ca"),
                    "an https agent needs the CA (PEM) its certificate chains to",
                ));
            }
            if a.client_cert.is_some() != a.client_key.is_some() {
                return Err(self.invalid(
                    format!("agent[{i}].client_cert"),
                    "client_cert and client_key go together",
                ));
            }
        }
        for (i, j) in self.jobs.iter().enumerate() {
            if !tenants.contains(&j.tenant) {
                return Err(self.invalid(
                    format!("job[{i}].tenant"),
                    format!("no [[tenant]] named {:?}", j.tenant),
                ));
            }
            if !vcenters.contains(&j.vcenter) {
                return Err(self.invalid(
                    format!("job[{i}].vcenter"),
                    format!("no [[vcenter]] named {:?}", j.vcenter),
                ));
            }
            if j.vms.is_empty() && j.folders.is_empty() {
                return Err(self.invalid(
                    format!("job[{i}].vms"),
                    "select VMs with vms (name globs; \"*\" for all) and/or folders",
                ));
            }
            if let Some(Schedule::Daily(t)) = &j.schedule {
                parse_daily(t).map_err(|m| self.invalid(format!("job[{i}].schedule.daily"), m))?;
            }
            if let Some(r) = &j.retention {
                r.validate()
                    .map_err(|e| self.invalid(format!("job[{i}].retention"), e.message))?;
            }
            for (k, o) in j.quiesce_override.iter().enumerate() {
                if o.vms.is_empty() || o.vms.iter().any(|g| g.trim().is_empty()) {
                    return Err(self.invalid(
                        format!("job[{i}].quiesce_override[{k}].vms"),
                        "name the VMs (globs such as \"db-*\") this quiesce policy applies to",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The tenant named `name`.
    pub fn tenant(&self, name: &str) -> Option<&TenantConfig> {
        self.tenants.iter().find(|t| t.name == name)
    }

    /// The vCenter named `name`.
    pub fn vcenter(&self, name: &str) -> Option<&VcenterConfig> {
        self.vcenters.iter().find(|v| v.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = r#"
[orchestrator]
state_dir = "state"
poll_interval = "2s"

[key_sync]
every = "12h"

[[vcenter]]
name = "vc1"
url = "https://vc.example.com/sdk"
user = "backup@vsphere.local"
password_file = "vc.password"

[[vcenter]]
name = "lab"
inventory_file = "inventory.json"

[[tenant]]
name = "tenant-a"
key_provider = "KMS-A"
agents = ["proxy-a1", "shared-nbd"]

[[agent]]
id = "proxy-a1"
url = "https://proxy-a1.example.com:7443"
token_file = "tokens/proxy-a1"
ca = "pki/agents-ca.pem"

[[agent]]
id = "shared-nbd"
url = "https://nbd.example.com:7443"
token_file = "tokens/shared-nbd"
ca = "pki/agents-ca.pem"
client_cert = "pki/orch.pem"
client_key = "pki/orch.key"

[[job]]
name = "a-nightly"
tenant = "tenant-a"
vcenter = "vc1"
vms = ["web-*", "db-??"]
folders = ["/DC1/vm/tenant-a"]
exclude = ["*-template"]
schedule = { daily = "02:30" }
retention = { keep_last = 14, keep_weekly = 8 }
policy = { failover_to_network = true, allow_cleartext_nbd = false }
quiesce = "prefer"

[[job.quiesce_override]]
vms = ["db-??"]
quiesce = "require"

[[job.quiesce_override]]
vms = ["web-legacy*"]
quiesce = "off"

[[job]]
name = "a-hourly"
tenant = "tenant-a"
vcenter = "lab"
vms = ["*"]
schedule = { every = "1h" }
"#;

    #[test]
    fn example_parses_with_defaults_and_resolved_paths() {
        let c = OrchestratorConfig::parse(EXAMPLE, Path::new("/etc/ferry/orch.toml")).unwrap();
        assert_eq!(c.orchestrator.state_dir, PathBuf::from("/etc/ferry/state"));
        assert_eq!(c.orchestrator.poll_interval, Duration::from_secs(2));
        assert_eq!(c.orchestrator.dispatch_attempts, 3);
        assert_eq!(c.key_sync.every, Duration::from_secs(12 * 3600));
        assert!(c.key_sync.enabled);
        assert_eq!(
            c.agents[1].client_key.as_deref(),
            Some(Path::new("/etc/ferry/pki/orch.key"))
        );
        assert_eq!(c.jobs[0].schedule, Some(Schedule::Daily("02:30".into())));
        assert_eq!(
            c.jobs[1].schedule,
            Some(Schedule::Every(Duration::from_secs(3600)))
        );
        assert_eq!(c.jobs[0].retention.as_ref().unwrap().keep_last, Some(14));
        assert!(!c.jobs[0].policy.allow_cleartext_nbd);
        // Quiesce: the job's policy, per-VM overrides first match first; off by default.
        assert_eq!(c.jobs[0].quiesce_for("web-01"), QuiescePolicy::Prefer);
        assert_eq!(c.jobs[0].quiesce_for("db-01"), QuiescePolicy::Require);
        assert_eq!(c.jobs[0].quiesce_for("web-legacy-1"), QuiescePolicy::Off);
        assert_eq!(c.jobs[1].quiesce_for("db-01"), QuiescePolicy::Off);
        assert_eq!(
            c.vcenter("lab").unwrap().inventory_file.as_deref(),
            Some(Path::new("/etc/ferry/inventory.json"))
        );
        // Key sync defaults to every 24 hours.
        let min = "[orchestrator]\nstate_dir = \"s\"\n";
        let c = OrchestratorConfig::parse(min, Path::new("x.toml")).unwrap();
        assert_eq!(c.key_sync.every, Duration::from_secs(86400));
        // Snapshot caps default to 4 per host and 4 per datastore.
        assert_eq!(c.dispatch, DispatchSection::default());
        assert_eq!(c.dispatch.caps().per_host, 4);
        assert_eq!(c.dispatch.caps().per_datastore, 4);
        let text = format!(
            "{min}[dispatch]\nmax_snapshots_per_host = 1\nmax_snapshots_per_datastore = 0\n"
        );
        let c = OrchestratorConfig::parse(&text, Path::new("x.toml")).unwrap();
        assert_eq!(c.dispatch.max_snapshots_per_host, 1);
        assert_eq!(c.dispatch.caps().per_datastore, 0, "0: no cap");
        let bad = format!("{min}[dispatch]\nmax_snapshots = 1\n");
        assert!(OrchestratorConfig::parse(&bad, Path::new("x.toml")).is_err());
    }

    #[test]
    fn console_section() {
        let text = "[orchestrator]\nstate_dir = \"s\"\n[console]\nlisten = \"127.0.0.1:8480\"\n";
        let c = OrchestratorConfig::parse(text, Path::new("/etc/ferry/o.toml")).unwrap();
        let con = c.console.unwrap();
        assert_eq!(con.listen.port(), 8480);
        assert_eq!(con.session_idle, Duration::from_secs(1800));
        let text = "[orchestrator]\nstate_dir = \"s\"\n[console]\nlisten = \"[::]:8443\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n";
        let con = OrchestratorConfig::parse(text, Path::new("/etc/ferry/o.toml"))
            .unwrap()
            .console
            .unwrap();
        assert_eq!(con.tls_cert.unwrap(), Path::new("/etc/ferry/c.pem"));
    }

    #[test]
    fn invalid_values_name_the_key() {
        let base = "[orchestrator]\nstate_dir = \"s\"\n";
        let agent =
            "[[agent]]\nid = \"p\"\nurl = \"https://p:1\"\ntoken_file = \"t\"\nca = \"c\"\n";
        let tenant = "[[tenant]]\nname = \"t\"\nagents = [\"p\"]\n";
        let vc = "[[vcenter]]\nname = \"v\"\ninventory_file = \"i.json\"\n";
        let cases = [
            (format!("{base}[[vcenter]]\nname = \"v\"\n"), "vcenter[0].url"),
            (format!("{base}[[vcenter]]\nname = \"v\"\nurl = \"http://vc\"\nuser = \"u\"\npassword_file = \"p\"\n"), "vcenter[0].url"),
            (format!("{base}[[tenant]]\nname = \"t\"\nagents = [\"nope\"]\n"), "tenant[0].agents"),
            (format!("{base}[[agent]]\nid = \"p\"\nurl = \"http://p:1\"\ntoken_file = \"t\"\n"), "agent[0].url"),
            (format!("{base}[[agent]]\nid = \"p\"\nurl = \"https://p:1\"\ntoken_file = \"t\"\n"), "agent[0].ca"),
            (format!("{base}{agent}{agent}"), "agent[1]"),
            (format!("{base}{agent}{tenant}{vc}[[job]]\nname = \"j\"\ntenant = \"t\"\nvcenter = \"v\"\n"), "job[0].vms"),
            (format!("{base}{agent}{tenant}{vc}[[job]]\nname = \"j\"\ntenant = \"x\"\nvcenter = \"v\"\nvms = [\"*\"]\n"), "job[0].tenant"),
            (format!("{base}{agent}{tenant}{vc}[[job]]\nname = \"j\"\ntenant = \"t\"\nvcenter = \"v\"\nvms = [\"*\"]\nschedule = {{ daily = \"25:00\" }}\n"), "job[0].schedule.daily"),
            (format!("{base}{agent}{tenant}{vc}[[job]]\nname = \"j\"\ntenant = \"t\"\nvcenter = \"v\"\nvms = [\"*\"]\nretention = {{}}\n"), "job[0].retention"),
            (format!("{base}{agent}{tenant}{vc}[[job]]\nname = \"j\"\ntenant = \"t\"\nvcenter = \"v\"\nvms = [\"*\"]\n[[job.quiesce_override]]\nvms = []\nquiesce = \"require\"\n"), "job[0].quiesce_override[0].vms"),
            ("[orchestrator]\nstate_dir = \"s\"\ndispatch_attempts = 0\n".to_string(), "orchestrator.dispatch_attempts"),
            (format!("{base}[console]\nlisten = \"0.0.0.0:8480\"\n"), "console.listen"),
            (format!("{base}[console]\nlisten = \"0.0.0.0:8443\"\ntls_cert = \"c.pem\"\n"), "console.tls_cert"),
            (format!("{base}[console]\nlisten = \"127.0.0.1:8480\"\nsession_idle = \"2h\"\nsession_max = \"1h\"\n"), "console.session_max"),
        ];
        for (text, key) in cases {
            match OrchestratorConfig::parse(&text, Path::new("x.toml")) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: expected Invalid({key}), got {other:?}"),
            }
        }
        for bad in [
            "[orchestrator]\nstate_dir = \"s\"\npoll_interval = \"5\"\n",
            "[orchestrator]\nstate_dir = \"s\"\npoll_interval = \"0s\"\n",
            "[orchestrator]\nstate_dir = \"s\"\nsurprise = 1\n",
            "[orchestrator]\nstate_dir = \"s\"\n[key_sync]\nevery = \"1y\"\n",
            "[orchestrator]\nstate_dir = \"s\"\n[[tenant]]\nname = \"t\"\nagents = []\n[[job]]\nname = \"j\"\ntenant = \"t\"\nvcenter = \"v\"\nquiesce = \"yes\"\n",
        ] {
            assert!(matches!(
                OrchestratorConfig::parse(bad, Path::new("x.toml")),
                Err(ConfigError::Parse { .. })
            ));
        }
    }

    #[test]
    fn a_bad_quiesce_policy_names_the_key_and_the_choices() {
        let text = "[orchestrator]\nstate_dir = \"s\"\n[[job]]\nname = \"j\"\ntenant = \"t\"\nvcenter = \"v\"\nvms = [\"*\"]\nquiesce = \"always\"\n";
        match OrchestratorConfig::parse(text, Path::new("x.toml")) {
            Err(e @ ConfigError::Parse { .. }) => {
                let m = e.to_string();
                for want in ["quiesce", "always", "off", "prefer", "require"] {
                    assert!(m.contains(want), "{want:?} in {m}");
                }
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn durations_and_daily_times() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86400));
        for bad in [
            "",
            "5",
            "h",
            "0s",
            "3x",
            "1h5",
            "400d",
            "99999999999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_daily("02:30").unwrap(), 150);
        assert_eq!(parse_daily("23:59").unwrap(), 1439);
        for bad in ["2:30", "24:00", "12:60", "ab:cd", "1230"] {
            assert!(parse_daily(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn duration_parser_never_panics(s in ".{0,24}") {
            let _ = parse_duration(&s);
            let _ = parse_daily(&s);
        }
    }
}
