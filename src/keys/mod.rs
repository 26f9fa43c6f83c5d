//! Envelope encryption keys: data keys, key references, wrapped keys and the
//! [`KeySource`] trait that tenant key stores (PEM files, a KMS over KMIP)
//! implement; KMS key rotation ([`lineage`], [`sync`]) and key sources built from
//! the configuration file ([`tenant`]).
//!
//! Owns key material in memory (always zeroized on drop) and RSA-OAEP(SHA-1)
//! wrapping. Must not write key material anywhere, and must never format key bytes
//! into `Debug`/`Display` output.

mod kms;
pub mod lineage;
mod multi;
mod passphrase;
mod pem;
pub mod recovery;
pub mod sync;
pub mod tenant;
mod wrap;

pub use kms::{kms_error, public_from as kms_public_from, KmsKeySource};
pub use lineage::{KeyLineage, KmsKeyPair};
pub use multi::MultiKeySource;
pub use passphrase::{PassphraseKeySource, WRAP_SCHEME_PASSPHRASE};
pub use pem::{generate_pem_pair, PemKeySource};
pub use recovery::RecoveryKey;
pub use wrap::{fingerprint_spki, rsa_oaep_unwrap, rsa_oaep_wrap, WRAP_SCHEME_RSA_OAEP_SHA1};

use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::fmt;
use zeroize::Zeroizing;

/// Errors from key handling. Each names the key involved so an operator can act.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read.
    #[error("cannot read key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A key file is not a PEM RSA key in a format ferry understands.
    #[error("{path} is not a usable RSA {what} key: {detail} (expected PEM: PKCS#1 'RSA PUBLIC/PRIVATE KEY', SPKI 'PUBLIC KEY' or PKCS#8 'PRIVATE KEY')")]
    BadKeyFile {
        /// The file.
        path: String,
        /// "public" or "private".
        what: &'static str,
        /// Parser message.
        detail: String,
    },
    /// RSA key too small or too large for ferry's policy.
    #[error("RSA key {key} has {bits} bits; ferry accepts 2048 to 4096")]
    KeySize {
        /// Key reference.
        key: String,
        /// Modulus size.
        bits: usize,
    },
    /// The wrapped key names a tenant key this source does not hold.
    #[error(
        "wrong key: the data was wrapped by {wanted} but the configured key source holds {have}"
    )]
    WrongKey {
        /// The key ref wanted (display form).
        wanted: String,
        /// What this source holds.
        have: String,
    },
    /// This key source cannot unwrap (e.g. only a public key was configured).
    #[error("key source {source_name} cannot unwrap keys: {why}")]
    CannotUnwrap {
        /// The source.
        source_name: String,
        /// Why, and what to configure.
        why: String,
    },
    /// RSA unwrap failed although the key matched: the wrapped bytes are damaged.
    #[error("unwrapping the data key with {key} failed: the wrapped key is damaged")]
    UnwrapFailed {
        /// The key used.
        key: String,
    },
    /// The wrapping scheme is unknown to this version of ferry.
    #[error("unknown key wrapping scheme {0:?}")]
    UnknownScheme(String),
    /// Generic crypto failure while wrapping.
    #[error("wrapping with {key} failed: {detail}")]
    WrapFailed {
        /// Key used.
        key: String,
        /// Detail.
        detail: String,
    },
    /// A KMS operation on a tenant key failed: which KMS, which key, what the KMS
    /// (or the network) said, and what to do about it.
    #[error("KMS {kms}, key {key}: {detail}; fix: {fix}")]
    Kms {
        /// KMS address.
        kms: String,
        /// Key name or KMIP unique identifier.
        key: String,
        /// Kind of failure.
        kind: KmsFailure,
        /// What happened.
        detail: String,
        /// What the operator should do.
        fix: String,
    },
}

impl KeyError {
    /// Whether the key store could not be used at all (down, unreachable, TLS
    /// refused): nothing can be concluded about individual keys.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            KeyError::Kms {
                kind: KmsFailure::Unreachable | KmsFailure::TlsRefused | KmsFailure::Config,
                ..
            }
        )
    }
}

/// Kinds of [`KeyError::Kms`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KmsFailure {
    /// Client-side configuration (certificate files, flags).
    Config,
    /// The KMS did not answer (down, wrong address, timeout).
    Unreachable,
    /// The TLS handshake failed on certificates.
    TlsRefused,
    /// No such key (never created, destroyed, or hidden from this client).
    KeyNotFound,
    /// The key exists but no version of it is active.
    NotActive,
    /// The KMS refused the operation (permissions, state, unsupported).
    Refused,
    /// The KMS answered something ferry cannot use.
    BadAnswer,
}

/// Length of AES-256 keys and of the id-key.
pub const KEY_LEN: usize = 32;

/// A 16-byte random identifier of a data key, shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 16]);

impl KeyId {
    /// A fresh random id.
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut b);
        KeyId(b)
    }
    /// Parse from 32 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut b = [0u8; 16];
        hex::decode_to_slice(s, &mut b).ok()?;
        Some(KeyId(b))
    }
    /// Hex form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.to_hex())
    }
}
impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}
impl<'de> Deserialize<'de> for KeyId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        KeyId::from_hex(&s).ok_or_else(|| serde::de::Error::custom("key id must be 32 hex digits"))
    }
}

/// A 256-bit secret (data key, id-key or keyring key) with its id. Zeroized on drop;
/// `Debug` shows only the id.
#[derive(Clone)]
pub struct SecretKey {
    /// Identifier (random; for the id-key it is unused and zero).
    pub id: KeyId,
    key: Zeroizing<[u8; KEY_LEN]>,
}

impl SecretKey {
    /// A fresh random key from the OS CSPRNG.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        SecretKey {
            id: KeyId::random(),
            key,
        }
    }
    /// Build from bytes (copied; the caller zeroizes its copy).
    pub fn from_bytes(id: KeyId, bytes: &[u8; KEY_LEN]) -> Self {
        SecretKey {
            id,
            key: Zeroizing::new(*bytes),
        }
    }
    /// The raw key bytes. Never log these.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.key
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}, <redacted>)", self.id)
    }
}

/// Names the tenant key that wrapped a secret: enough for an operator (and `repo
/// import`) to know which key a restore point needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRef {
    /// Kind of key store: "pem", "kmip", "passphrase".
    pub source: String,
    /// Which key store: KMS id (host:port or configured name) or key file path.
    pub kms: String,
    /// Key identifier inside the key store (KMIP unique identifier, or fingerprint).
    pub key_id: String,
    /// Key version as the key store reports it (rotation count); 0 if none.
    #[serde(default)]
    pub key_version: u32,
    /// SHA-256 of the public key's SubjectPublicKeyInfo DER (hex).
    pub fingerprint: String,
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} key {} v{} on {} (fingerprint {})",
            self.source,
            self.key_id,
            self.key_version,
            self.kms,
            &self.fingerprint[..self.fingerprint.len().min(16)]
        )
    }
}

/// A secret wrapped by a tenant key, as stored in manifests and the keyring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// Wrapping scheme, e.g. [`WRAP_SCHEME_RSA_OAEP_SHA1`].
    pub scheme: String,
    /// The tenant key used.
    pub key_ref: KeyRef,
    /// The wrapped bytes, hex.
    pub wrapped: String,
}

/// A tenant key store. Backups call [`KeySource::wrap`] with the current key;
/// restores (and backups, to open the keyring) call [`KeySource::unwrap`].
///
/// Implementations: [`PemKeySource`] (files); the KMIP source plugs in here.
pub trait KeySource: Send + Sync {
    /// Human-readable name of the source for messages (never secret).
    fn name(&self) -> String;
    /// The key new secrets are wrapped with (the newest tenant key).
    fn current_key(&self) -> Result<KeyRef, KeyError>;
    /// Wrap a secret with the current tenant key.
    fn wrap(&self, secret: &[u8]) -> Result<WrappedKey, KeyError>;
    /// Unwrap a secret. Fails with [`KeyError::WrongKey`] when the wrapped key names a
    /// key this source does not hold, [`KeyError::CannotUnwrap`] when the source has
    /// no unwrap capability.
    fn unwrap(&self, wrapped: &WrappedKey) -> Result<Zeroizing<Vec<u8>>, KeyError>;
    /// Whether this source can (try to) unwrap secrets wrapped by `key`.
    fn holds(&self, key: &KeyRef) -> bool;
}

/// Unwrap a 32-byte secret and check its length.
pub fn unwrap_secret(
    src: &dyn KeySource,
    wrapped: &WrappedKey,
    id: KeyId,
) -> Result<SecretKey, KeyError> {
    let bytes = src.unwrap(wrapped)?;
    let arr: &[u8; KEY_LEN] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| KeyError::UnwrapFailed {
            key: wrapped.key_ref.to_string(),
        })?;
    Ok(SecretKey::from_bytes(id, arr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_key_bytes() {
        let k = SecretKey::from_bytes(KeyId([1; 16]), &[0xAB; 32]);
        let s = format!("{k:?}");
        assert!(!s.to_lowercase().contains("abab"), "{s}");
        assert!(s.contains("redacted"));
    }

    #[test]
    fn key_id_hex_roundtrip() {
        let id = KeyId::random();
        assert_eq!(KeyId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(KeyId::from_hex("zz"), None);
    }
}
