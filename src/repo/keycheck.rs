//! Disaster-recovery key check (`ferry repo import`): for every restore point,
//! every way the available keys open it — its own tenant key, the keyring
//! (wrapped by the newest tenant key and holding every data key, seed 004's .vbm
//! behaviour), the provider's recovery key (key-loss protection) — and, only for
//! points that no path opens, which key to obtain. Read-only; never changes the
//! repository.

use super::{KeyPath, RepoError, Repository};
use crate::keys::{KeyRef, KeySource};
use serde::Serialize;

/// Whether a point can be opened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PointKeyStatus {
    /// At least one path opens the point (see [`PointKeys::opens_with`]).
    Opens,
    /// No available key opens it; `why` says what each path answered.
    KeyMissing {
        /// Detail.
        why: String,
    },
    /// The point's manifest is damaged (or every key that reached it found it
    /// tampered with).
    Damaged {
        /// Detail.
        why: String,
    },
}

/// One row of the report.
#[derive(Clone, Debug, Serialize)]
pub struct PointKeys {
    /// Point id.
    pub point_id: String,
    /// Source name (VM or image).
    pub source: Option<String>,
    /// Creation time.
    pub created: Option<String>,
    /// The tenant key that wrapped the point's data key.
    pub key: Option<KeyRef>,
    /// The provider's recovery key that also wrapped it (key-loss protection
    /// was on for this point), if any.
    pub recovery_key: Option<KeyRef>,
    /// Every path that opens the point with the available keys.
    pub opens_with: Vec<KeyPath>,
    /// Outcome.
    pub status: PointKeyStatus,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct KeyCheckReport {
    /// Whether the keyring opens with the configured sources.
    pub keyring_opens: bool,
    /// Why not, if it does not.
    pub keyring_error: Option<String>,
    /// The keyring's key-loss protection setting as its header records it.
    pub recovery: Option<KeyRef>,
    /// Per point.
    pub points: Vec<PointKeys>,
}

/// A key to obtain and the points that need it.
#[derive(Clone, Debug, Serialize)]
pub struct MissingKey {
    /// The tenant key.
    pub key: KeyRef,
    /// Points that no available path opens and that this key would open.
    pub points: Vec<String>,
    /// The provider's recovery key opens these points as well (an alternative
    /// to the tenant key), when they were made under key-loss protection.
    pub or_recovery_key: Option<KeyRef>,
}

impl KeyCheckReport {
    /// Distinct tenant keys to obtain, only for points that no available path
    /// opens, with those points.
    pub fn missing_keys(&self) -> Vec<MissingKey> {
        let mut out: Vec<MissingKey> = Vec::new();
        for p in &self.points {
            if let (PointKeyStatus::KeyMissing { .. }, Some(k)) = (&p.status, &p.key) {
                match out.iter_mut().find(|m| {
                    m.key.fingerprint == k.fingerprint
                        && m.or_recovery_key.as_ref().map(|r| &r.fingerprint)
                            == p.recovery_key.as_ref().map(|r| &r.fingerprint)
                }) {
                    Some(m) => m.points.push(p.point_id.clone()),
                    None => out.push(MissingKey {
                        key: k.clone(),
                        points: vec![p.point_id.clone()],
                        or_recovery_key: p.recovery_key.clone(),
                    }),
                }
            }
        }
        out
    }

    /// Points that open, and through which path, counted per path.
    pub fn count(&self, path: KeyPath) -> usize {
        self.points
            .iter()
            .filter(|p| p.opens_with.contains(&path))
            .count()
    }
}

/// Check every point of `repo` against `keys`. A key store that cannot be used
/// at all (KMS down, TLS refused) is an error, not a list of missing keys.
pub fn check(repo: &Repository, keys: &dyn KeySource) -> Result<KeyCheckReport, RepoError> {
    let recovery = repo
        .keyring_header()
        .ok()
        .and_then(|h| h.recovery)
        .map(|r| r.key_ref);
    let (keyring, keyring_error) = match repo.load_keyring(keys) {
        Ok(k) => (Some(k), None),
        Err(RepoError::Key(e)) if e.is_unavailable() => return Err(RepoError::Key(e)),
        Err(e) => (None, Some(e.to_string())),
    };
    let mut points = Vec::new();
    for id in repo.point_ids()? {
        let header = match repo.read_manifest(&id) {
            Ok((_, h, _)) => h,
            Err(e) => {
                points.push(PointKeys {
                    point_id: id,
                    source: None,
                    created: None,
                    key: None,
                    recovery_key: None,
                    opens_with: Vec::new(),
                    status: PointKeyStatus::Damaged { why: e.to_string() },
                });
                continue;
            }
        };
        let mut paths = vec![KeyPath::OwnKey];
        if keyring.is_some() {
            paths.push(KeyPath::Keyring);
        }
        if header.recovery_wrapped_key.is_some() {
            paths.push(KeyPath::RecoveryKey);
        }
        let mut opens_with = Vec::new();
        let (mut key_errors, mut damage) = (Vec::new(), Vec::new());
        for via in paths {
            match repo.open_point_via(&id, keys, keyring.as_ref(), via) {
                Ok(_) => opens_with.push(via),
                Err(RepoError::Key(e)) if e.is_unavailable() => return Err(RepoError::Key(e)),
                Err(RepoError::Key(e)) => key_errors.push(format!("{}: {e}", via.describe())),
                Err(e) => damage.push(format!("{}: {e}", via.describe())),
            }
        }
        if keyring.is_none() {
            key_errors.push(format!(
                "the keyring: {}",
                keyring_error.as_deref().unwrap_or("not usable")
            ));
        }
        let status = if !opens_with.is_empty() {
            PointKeyStatus::Opens
        } else if !damage.is_empty() {
            PointKeyStatus::Damaged {
                why: damage.join("; "),
            }
        } else {
            PointKeyStatus::KeyMissing {
                why: key_errors.join("; "),
            }
        };
        points.push(PointKeys {
            point_id: id,
            source: Some(header.source.clone()),
            created: Some(header.created.clone()),
            key: Some(header.wrapped_key.key_ref.clone()),
            recovery_key: header.recovery_wrapped_key.map(|w| w.key_ref),
            opens_with,
            status,
        });
    }
    Ok(KeyCheckReport {
        keyring_opens: keyring.is_some(),
        keyring_error,
        recovery,
        points,
    })
}
