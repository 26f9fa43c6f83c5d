//! Key rotation sync (`ferry keys sync`, the agent's key sync job, and job start):
//! ask the tenant's key source for its current key (for a KMS: the newest Active
//! version of the key name, see [`super::lineage`]) and re-wrap the repository's
//! chain keyring with it when it is still wrapped by an older key. Restore points
//! keep the data keys their own key wrapped: nothing else is rewritten.
//!
//! Never rotates, revokes or destroys a tenant key; reports ids and versions only,
//! never key material.

use super::lineage::KmsKeyPair;
use super::{KeyError, KeyRef, KeySource, KmsKeySource};
use crate::config::TenantSection;
use crate::repo::{RepoError, Repository};
use serde::Serialize;
use std::path::Path;

/// Sync errors.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The key source could not be opened (KMS down, key missing...).
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The repository could not be read.
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// What the sync did to the repository's keyring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum KeyringSync {
    /// Already wrapped by the current key: nothing written.
    UpToDate,
    /// Re-wrapped with the current key; it was wrapped by `from`.
    Rewrapped {
        /// The key that wrapped it before.
        from: KeyRef,
        /// Keyring generation written.
        generation: u64,
    },
    /// There is no repository at the tenant's path (yet).
    NoRepository,
    /// The keyring could not be re-wrapped (e.g. the key that wrapped it was
    /// destroyed): backups will fail until it is fixed; restores still work with
    /// each point's own key.
    Failed {
        /// Why.
        why: String,
    },
}

/// The outcome of one tenant's key sync.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeySyncReport {
    /// Tenant name (when synced from the configuration).
    pub tenant: Option<String>,
    /// Key store: KMS address, or the PEM key source name.
    pub kms: String,
    /// Key name on the KMS (empty for PEM).
    pub key_name: String,
    /// The current key (new restore points are wrapped with it).
    pub current: KeyRef,
    /// The key that wrapped the keyring before this sync, if there is a keyring.
    pub previous: Option<KeyRef>,
    /// Whether the current key differs from `previous` (a rotation since ferry last
    /// wrote the keyring).
    pub rotated: bool,
    /// What happened to the keyring.
    pub keyring: KeyringSync,
    /// Every version of the KMS key, oldest first (empty for PEM).
    pub versions: Vec<KmsKeyPair>,
}

impl KeySyncReport {
    /// Whether the keyring is usable by backups after the sync.
    pub fn ok(&self) -> bool {
        !matches!(self.keyring, KeyringSync::Failed { .. })
    }
}

fn same_key(a: &KeyRef, b: &KeyRef) -> bool {
    a.source == b.source && a.key_id == b.key_id && a.fingerprint == b.fingerprint
}

/// Re-wrap `repo`'s keyring with `keys`' current key if an older key wraps it.
/// Returns the key that wrapped it before, and what was done.
pub fn sync_keyring(
    repo: &Repository,
    keys: &dyn KeySource,
) -> Result<(Option<KeyRef>, KeyringSync), SyncError> {
    let current = keys.current_key()?;
    let previous = match repo.keyring_header() {
        Ok(h) => h.wrapped_key.key_ref,
        Err(e) => return Ok((None, KeyringSync::Failed { why: e.to_string() })),
    };
    if same_key(&previous, &current) {
        return Ok((Some(previous), KeyringSync::UpToDate));
    }
    match repo.update_keyring(keys, |_| Ok(())) {
        Ok(kr) => {
            tracing::info!(from = %previous, to = %current, generation = kr.header.generation, "keyring re-wrapped with the current tenant key");
            Ok((
                Some(previous.clone()),
                KeyringSync::Rewrapped {
                    from: previous,
                    generation: kr.header.generation,
                },
            ))
        }
        Err(e) => {
            tracing::warn!(from = %previous, to = %current, error = %e, "the keyring could not be re-wrapped with the current tenant key");
            Ok((Some(previous), KeyringSync::Failed { why: e.to_string() }))
        }
    }
}

/// Sync an opened key source against the repository at `repo_path` (which may
/// not exist yet).
pub fn sync_source(
    keys: &dyn KeySource,
    kms: Option<&KmsKeySource>,
    repo_path: &Path,
) -> Result<KeySyncReport, SyncError> {
    let current = keys.current_key()?;
    let (previous, keyring) = match Repository::open(repo_path) {
        Ok(repo) => sync_keyring(&repo, keys)?,
        Err(RepoError::NotARepository(_)) => (None, KeyringSync::NoRepository),
        Err(e) => return Err(e.into()),
    };
    let rotated = previous.as_ref().is_some_and(|p| !same_key(p, &current));
    Ok(KeySyncReport {
        tenant: None,
        kms: match kms {
            Some(k) => k.client().address().to_string(),
            None => keys.name(),
        },
        key_name: kms.map(|k| k.key_name().to_string()).unwrap_or_default(),
        current,
        previous,
        rotated,
        keyring,
        versions: kms
            .and_then(|k| k.lineage())
            .map(|l| l.pairs.clone())
            .unwrap_or_default(),
    })
}

/// The key sync of one tenant from its configuration: open its key source
/// (following KMS rotations) and re-wrap its repository's keyring with the
/// current key when needed. This is what the agent's key sync job calls.
pub fn sync_tenant(t: &TenantSection) -> Result<KeySyncReport, SyncError> {
    let mut rep = match &t.kms {
        Some(k) => {
            let src = super::tenant::open_kms_source(k)?;
            sync_source(&src, Some(&src), &t.repository)?
        }
        None => {
            let src = super::tenant::open_key_source(t)?;
            sync_source(&*src, None, &t.repository)?
        }
    };
    rep.tenant = Some(t.name.clone());
    Ok(rep)
}
