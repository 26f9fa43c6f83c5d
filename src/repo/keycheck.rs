//! Disaster-recovery key check (`ferry repo import`): for every restore point, which
//! tenant key it needs and whether the configured key sources can open it *with that
//! point's own wrapped key* (no keyring), as after the loss of the backup server.
//! Read-only; never changes the repository.

use super::{RepoError, Repository};
use crate::keys::{KeyRef, KeySource};
use serde::Serialize;

/// Whether a point can be opened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PointKeyStatus {
    /// The point's own key unwraps with the configured sources.
    Opens,
    /// No configured source holds the key; `why` says what failed.
    KeyMissing {
        /// Detail.
        why: String,
    },
    /// The point's manifest is damaged.
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
    /// Outcome.
    pub status: PointKeyStatus,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct KeyCheckReport {
    /// Whether the keyring opens with the configured sources (then every point does).
    pub keyring_opens: bool,
    /// Why not, if it does not.
    pub keyring_error: Option<String>,
    /// Per point.
    pub points: Vec<PointKeys>,
}

impl KeyCheckReport {
    /// Distinct keys that no configured source holds, with the points needing them.
    pub fn missing_keys(&self) -> Vec<(KeyRef, Vec<String>)> {
        let mut out: Vec<(KeyRef, Vec<String>)> = Vec::new();
        for p in &self.points {
            if let (PointKeyStatus::KeyMissing { .. }, Some(k)) = (&p.status, &p.key) {
                match out.iter_mut().find(|(x, _)| x.fingerprint == k.fingerprint) {
                    Some((_, v)) => v.push(p.point_id.clone()),
                    None => out.push((k.clone(), vec![p.point_id.clone()])),
                }
            }
        }
        out
    }
}

/// Check every point of `repo` against `keys`. A key store that cannot be used
/// at all (KMS down, TLS refused) is an error, not a list of missing keys.
pub fn check(repo: &Repository, keys: &dyn KeySource) -> Result<KeyCheckReport, RepoError> {
    let (keyring_opens, keyring_error) = match repo.load_keyring(keys) {
        Ok(_) => (true, None),
        Err(RepoError::Key(e)) if e.is_unavailable() => return Err(RepoError::Key(e)),
        Err(e) => (false, Some(e.to_string())),
    };
    let mut points = Vec::new();
    for id in repo.point_ids()? {
        let header = repo.read_manifest(&id).map(|(_, h, _)| h);
        let (source, created, key) = match &header {
            Ok(h) => (
                Some(h.source.clone()),
                Some(h.created.clone()),
                Some(h.wrapped_key.key_ref.clone()),
            ),
            Err(_) => (None, None, None),
        };
        let status = match header {
            Err(e) => PointKeyStatus::Damaged { why: e.to_string() },
            Ok(_) => match repo.open_point(&id, keys, None) {
                Ok(_) => PointKeyStatus::Opens,
                Err(RepoError::Key(e)) if e.is_unavailable() => return Err(RepoError::Key(e)),
                Err(RepoError::Key(e)) => PointKeyStatus::KeyMissing { why: e.to_string() },
                Err(e) => PointKeyStatus::Damaged { why: e.to_string() },
            },
        };
        points.push(PointKeys {
            point_id: id,
            source,
            created,
            key,
            status,
        });
    }
    Ok(KeyCheckReport {
        keyring_opens,
        keyring_error,
        points,
    })
}
