//! Arguments shared by several commands (repository, keys, KMS, pipeline) and the
//! key source they build. Command-specific arguments live with their command.

use clap::Args;
use ferry::keys::{KeyError, KeySource, KmsFailure, MultiKeySource, PemKeySource};
use ferry::pipeline::PipelineConfig;
use ferry::repo::Repository;
use std::path::PathBuf;

#[derive(Args, Clone)]
pub struct RepoArg {
    /// Repository directory.
    #[arg(long, short = 'r', env = "FERRY_REPO")]
    pub repo: PathBuf,
}

#[derive(Args, Clone)]
pub struct KeyArgs {
    /// Tenant public key (PEM: SPKI or PKCS#1). Wraps new data keys.
    #[arg(long, env = "FERRY_PUBLIC_KEY")]
    pub public_key: Option<PathBuf>,
    /// Tenant private key (PEM: PKCS#8 or PKCS#1). Read only to unwrap, then wiped.
    #[arg(long, env = "FERRY_PRIVATE_KEY")]
    pub private_key: Option<PathBuf>,
    /// More private keys for restore points wrapped by older or other tenant keys
    /// (rotated keys, keys exported from a KMS by hand). Repeatable.
    #[arg(long = "extra-private-key")]
    pub extra_private_keys: Vec<PathBuf>,
    /// The provider's recovery private key (key-loss protection): opens every
    /// restore point made while protection was on, without the tenant's key.
    /// Keep it offline; give it only for a recovery.
    #[arg(long, env = "FERRY_RECOVERY_PRIVATE_KEY")]
    pub recovery_private_key: Option<PathBuf>,
    /// File whose first line is a tenant passphrase (at least 12 characters; keep
    /// it 0600). Wraps new data keys when neither --public-key nor --kms-key is
    /// given; otherwise it only unwraps points made with it. Chains may mix
    /// passphrase- and KMS- or PEM-wrapped points.
    #[arg(long, env = "FERRY_PASSPHRASE_FILE")]
    pub passphrase_file: Option<PathBuf>,
    #[command(flatten)]
    pub kms: KmsArgs,
}

/// The tenant's KMS (KMIP over mutual TLS). When given, it holds the tenant key.
#[derive(Args, Clone)]
pub struct KmsArgs {
    /// KMS address HOST:PORT (KMIP, usually port 5696).
    #[arg(long, env = "FERRY_KMS")]
    pub kms: Option<String>,
    /// CA certificate that signed the KMS server certificate (PEM).
    #[arg(long, env = "FERRY_KMS_CA")]
    pub kms_ca: Option<PathBuf>,
    /// Client certificate presented to the KMS (PEM).
    #[arg(long, env = "FERRY_KMS_CERT")]
    pub kms_cert: Option<PathBuf>,
    /// Client certificate's private key (PEM).
    #[arg(long, env = "FERRY_KMS_CLIENT_KEY")]
    pub kms_client_key: Option<PathBuf>,
    /// Client certificate and key as a PKCS#12 bundle (instead of --kms-cert and
    /// --kms-client-key), as KMS vendors issue them.
    #[arg(long, env = "FERRY_KMS_PKCS12", conflicts_with_all = ["kms_cert", "kms_client_key"])]
    pub kms_pkcs12: Option<PathBuf>,
    /// File whose first line is the PKCS#12 password (none: empty password).
    #[arg(long, env = "FERRY_KMS_PKCS12_PASSWORD_FILE")]
    pub kms_pkcs12_password_file: Option<PathBuf>,
    /// Name the server certificate must carry (default: the host of --kms).
    #[arg(long, env = "FERRY_KMS_SERVER_NAME")]
    pub kms_server_name: Option<String>,
    /// Name of the tenant key pair on the KMS, e.g. ferry/<tenant>/<repository>
    /// (its newest Active version is used). Needed to wrap new keys (repo init,
    /// backup); restores and `repo import` work without it.
    #[arg(long, env = "FERRY_KMS_KEY")]
    pub kms_key: Option<String>,
    /// Create (and activate) the key pair when the KMS has none of that name.
    #[arg(long)]
    pub kms_create: bool,
    /// RSA size for --kms-create: 2048, 3072 or 4096.
    #[arg(long, default_value_t = 2048)]
    pub kms_bits: i32,
}

impl KmsArgs {
    pub fn client(&self) -> Result<Option<ferry::kmip::client::KmsClient>, KeyError> {
        let Some(addr) = &self.kms else {
            return Ok(None);
        };
        let need = |v: &Option<PathBuf>, flag: &str| {
            v.clone().ok_or_else(|| KeyError::Kms {
                kms: addr.clone(),
                key: self.kms_key.clone().unwrap_or_default(),
                kind: KmsFailure::Config,
                detail: format!("{flag} is missing"),
                fix: format!("give {flag} with --kms"),
            })
        };
        let identity = match &self.kms_pkcs12 {
            Some(bundle) => ferry::kmip::client::ClientIdentity::Pkcs12 {
                bundle: bundle.clone(),
                password_file: self.kms_pkcs12_password_file.clone(),
            },
            None => ferry::kmip::client::ClientIdentity::Pem {
                cert: need(&self.kms_cert, "--kms-cert (or --kms-pkcs12)")?,
                key: need(&self.kms_client_key, "--kms-client-key (or --kms-pkcs12)")?,
            },
        };
        let cfg = ferry::kmip::client::KmsConfig {
            address: addr.clone(),
            server_name: self.kms_server_name.clone(),
            ca: need(&self.kms_ca, "--kms-ca")?,
            identity,
            timeout: std::time::Duration::from_secs(30),
        };
        ferry::kmip::client::KmsClient::new(cfg)
            .map(Some)
            .map_err(|e| {
                ferry::keys::kms_error(
                    e,
                    self.kms_key.as_deref().unwrap_or(""),
                    "preparing the KMS client",
                )
            })
    }

    /// The KMS key source: following `--kms-key` through rotations, or, without a
    /// key name, a source that only unwraps (restore, verify, `repo import` on a
    /// fresh installation: each restore point names its KMS key).
    pub fn source(&self) -> Result<Option<ferry::keys::KmsKeySource>, KeyError> {
        let Some(client) = self.client()? else {
            return Ok(None);
        };
        let Some(name) = self.kms_key.clone() else {
            return Ok(Some(ferry::keys::KmsKeySource::unwrap_only(client)));
        };
        if ![2048, 3072, 4096].contains(&self.kms_bits) {
            return Err(KeyError::KeySize {
                key: name,
                bits: self.kms_bits as usize,
            });
        }
        ferry::keys::KmsKeySource::open(client, &name, self.kms_create, self.kms_bits).map(Some)
    }
}

impl KeyArgs {
    /// Whether any key option was given (for commands where keys are optional).
    pub fn any(&self) -> bool {
        self.public_key.is_some()
            || self.private_key.is_some()
            || !self.extra_private_keys.is_empty()
            || self.recovery_private_key.is_some()
            || self.passphrase_file.is_some()
            || self.kms.kms.is_some()
    }

    /// The key source for commands that wrap new keys (repo init, backup): with a
    /// KMS, the newest Active version of --kms-key.
    pub fn source(&self) -> Result<Box<dyn KeySource>, KeyError> {
        self.build(false)
    }

    /// The key source for commands that only unwrap (restore, verify, export, repo
    /// import): with a KMS, every point's own key is asked for and the key name is
    /// not looked up, so a retired or missing current version does not matter.
    pub fn unwrap_source(&self) -> Result<Box<dyn KeySource>, KeyError> {
        self.build(true)
    }

    fn build(&self, unwrap_only: bool) -> Result<Box<dyn KeySource>, KeyError> {
        let passphrase = self
            .passphrase_file
            .as_deref()
            .map(ferry::keys::PassphraseKeySource::from_file)
            .transpose()?;
        // The passphrase is the current key when nothing else names one.
        let passphrase_current = passphrase.is_some()
            && self.public_key.is_none()
            && (self.kms.kms_key.is_none() || unwrap_only);
        let mut all: Vec<Box<dyn KeySource>> = Vec::new();
        let only_extra_keys = passphrase.is_none()
            && self.kms.kms.is_none()
            && self.public_key.is_none()
            && self.private_key.is_none()
            && (!self.extra_private_keys.is_empty() || self.recovery_private_key.is_some());
        if only_extra_keys && unwrap_only {
            // A recovery with exported or recovery keys only (the tenant's KMS
            // is gone): nothing else to open.
        } else if passphrase_current {
            all.extend(passphrase.map(|p| Box::new(p) as Box<dyn KeySource>));
            if let Some(c) = self.kms.client()? {
                all.push(Box::new(ferry::keys::KmsKeySource::unwrap_only(c)));
            }
            if let Some(p) = &self.private_key {
                all.push(Box::new(PemKeySource::open(None, Some(p))?));
            }
        } else {
            let kms = if unwrap_only {
                self.kms
                    .client()?
                    .map(ferry::keys::KmsKeySource::unwrap_only)
            } else {
                self.kms.source()?
            };
            all.push(match kms {
                Some(k) => Box::new(k),
                None => Box::new(PemKeySource::open(
                    self.public_key.as_deref(),
                    self.private_key.as_deref(),
                )?),
            });
            all.extend(passphrase.map(|p| Box::new(p) as Box<dyn KeySource>));
        }
        for p in self
            .extra_private_keys
            .iter()
            .chain(&self.recovery_private_key)
        {
            all.push(Box::new(PemKeySource::open(None, Some(p))?));
        }
        if all.len() == 1 {
            return Ok(all.pop().expect("one source"));
        }
        Ok(Box::new(MultiKeySource::new(all)?))
    }
}

#[derive(Args, Clone)]
pub struct PipeArgs {
    /// Worker threads (default: number of cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Memory budget for chunk buffers, in MiB.
    #[arg(long, default_value_t = 128)]
    pub memory_mib: u64,
}

impl PipeArgs {
    pub fn config(&self, chunk_size: u32) -> PipelineConfig {
        PipelineConfig::new(self.workers, chunk_size, self.memory_mib << 20)
    }
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K') | Some('k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') | Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('G') | Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("invalid size {s:?} (examples: 1M, 256K, 4194304)"))
}

/// Disk `disk` of the (resolved) point `point_id` in the repository at `repo`,
/// opened for on-demand reads through a cache of `cache_mib` MiB of decoded
/// chunks (`ferry export`, `ferry files`, `ferry mount`).
pub fn open_point_disk(
    repo: &std::path::Path,
    keys: &dyn KeySource,
    point_id: &str,
    disk: u32,
    cache_mib: u64,
) -> anyhow::Result<ferry::export::PointExport> {
    Ok(ferry::export::PointExport::open(
        Repository::open(repo)?,
        keys,
        point_id,
        disk,
        ferry::export::ExportOptions {
            cache_bytes: cache_mib << 20,
            ..ferry::export::ExportOptions::default()
        },
    )?)
}

/// A point id, or `latest:<name>` resolved to the newest point of that name.
pub fn resolve_point(repo: &Repository, spec: &str) -> anyhow::Result<String> {
    Ok(repo.resolve_point(spec)?)
}
