//! Key-loss protection: the provider's recovery public key, which wraps every new
//! restore point's data key a second time so that the provider can still open the
//! point when the tenant's KMS (or its key) is lost for good — Veeam's "password
//! loss protection". The private half is kept offline by the provider and given to
//! `ferry restore` / `ferry repo import` only when needed (`--recovery-private-key`,
//! any [`super::PemKeySource`] holding it unwraps).
//!
//! Owns the setting's stored form (it lives in the keyring's authenticated header,
//! see [`crate::repo::keyring::KeyringHeader::recovery`]) and the wrapping. Pure:
//! no files, no logging. Only the public key is ever stored.

use super::pem::{check_size, parse_public_pem};
use super::wrap::{fingerprint_spki, wrap_for};
use super::{KeyError, KeyRef, WrappedKey};
use rsa::RsaPublicKey;
use serde::{Deserialize, Serialize};

/// `KeyRef::source` of recovery keys, so messages and reports can tell them from
/// tenant keys.
pub const RECOVERY_SOURCE: &str = "recovery";

/// The provider's recovery public key as a repository records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryKey {
    /// The public key (PEM, SPKI): not secret.
    pub public_pem: String,
    /// How wrapped keys name it (source `"recovery"`, fingerprint of the key).
    pub key_ref: KeyRef,
    /// RFC 3339 time protection was turned on with this key.
    pub since: String,
}

impl RecoveryKey {
    /// Read a recovery public key from PEM text (SPKI or PKCS#1; 2048 to 4096
    /// bits). `label` names it in messages (e.g. the file it came from, or
    /// "provider key on kms.example:5696").
    pub fn from_public_pem(text: &str, label: &str, since: &str) -> Result<Self, KeyError> {
        let key = parse_public_pem(text, label)?;
        check_size(&key, label)?;
        let fingerprint = fingerprint_spki(&key);
        let public_pem =
            rsa::pkcs8::EncodePublicKey::to_public_key_pem(&key, rsa::pkcs8::LineEnding::LF)
                .map_err(|e| KeyError::BadKeyFile {
                    path: label.to_string(),
                    what: "public",
                    detail: e.to_string(),
                })?;
        Ok(RecoveryKey {
            public_pem,
            key_ref: KeyRef {
                source: RECOVERY_SOURCE.into(),
                kms: label.to_string(),
                key_id: fingerprint[..16].to_string(),
                key_version: 0,
                fingerprint,
            },
            since: since.to_string(),
        })
    }

    /// The public key, checked against the recorded fingerprint (a keyring
    /// header whose key and fingerprint disagree is refused, not used).
    fn public(&self) -> Result<RsaPublicKey, KeyError> {
        let key = parse_public_pem(&self.public_pem, &self.key_ref.kms)?;
        if fingerprint_spki(&key) != self.key_ref.fingerprint {
            return Err(KeyError::WrapFailed {
                key: self.key_ref.to_string(),
                detail: "the stored recovery public key does not match its fingerprint".into(),
            });
        }
        Ok(key)
    }

    /// Wrap a data key for the provider (RSA-OAEP-SHA1, as tenant keys).
    pub fn wrap(&self, secret: &[u8]) -> Result<WrappedKey, KeyError> {
        wrap_for(&self.public()?, &self.key_ref, secret)
    }

    /// Short form for messages: fingerprint prefix and where it came from.
    pub fn describe(&self) -> String {
        format!(
            "recovery key {} ({}), since {}",
            &self.key_ref.fingerprint[..16],
            self.key_ref.kms,
            self.since
        )
    }
}

/// Why a recovery key must not be used for a tenant whose current key is
/// `tenant`: it is the tenant's own key, or it lives on the tenant's own KMS
/// (then losing that KMS loses both, which protects nothing).
pub fn shared_with_tenant(recovery: &RecoveryKey, tenant: &KeyRef) -> Option<String> {
    if recovery.key_ref.fingerprint == tenant.fingerprint {
        return Some(format!(
            "the recovery key is the tenant's own key ({tenant}): it protects nothing when that key is lost"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{generate_pem_pair, KeySource, PemKeySource};

    #[test]
    fn wraps_for_the_holder_of_the_private_half_only() {
        let d = tempfile::tempdir().unwrap();
        let (rp, rk) = generate_pem_pair(d.path(), "rec", 2048).unwrap();
        let (tp, _) = generate_pem_pair(d.path(), "tenant", 2048).unwrap();
        let text = std::fs::read_to_string(&rp).unwrap();
        let r = RecoveryKey::from_public_pem(&text, "provider", "2026-12-07T00:00:00Z").unwrap();
        assert_eq!(r.key_ref.source, RECOVERY_SOURCE);
        let w = r.wrap(&[9u8; 32]).unwrap();
        let holder = PemKeySource::open(None, Some(&rk)).unwrap();
        assert!(holder.holds(&w.key_ref));
        assert_eq!(&holder.unwrap(&w).unwrap()[..], &[9u8; 32]);
        let tenant = PemKeySource::open(Some(&tp), None).unwrap();
        assert!(!tenant.holds(&w.key_ref));
        assert!(shared_with_tenant(&r, &tenant.current_key().unwrap()).is_none());
        let same = PemKeySource::open(Some(&rp), None).unwrap();
        assert!(shared_with_tenant(&r, &same.current_key().unwrap()).is_some());
    }

    #[test]
    fn a_tampered_stored_key_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let (rp, _) = generate_pem_pair(d.path(), "rec", 2048).unwrap();
        let (op, _) = generate_pem_pair(d.path(), "other", 2048).unwrap();
        let mut r =
            RecoveryKey::from_public_pem(&std::fs::read_to_string(&rp).unwrap(), "provider", "t")
                .unwrap();
        r.public_pem = std::fs::read_to_string(&op).unwrap();
        assert!(matches!(r.wrap(&[1; 32]), Err(KeyError::WrapFailed { .. })));
        assert!(RecoveryKey::from_public_pem("not a key", "x", "t").is_err());
    }
}
