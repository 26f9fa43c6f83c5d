//! The chain keyring: every data key and the id-key, sealed under a fresh keyring
//! key that is wrapped by the newest tenant key. Encoding only; reading, unwrapping
//! and atomic replacement live in [`super::Repository`].

use super::format::{self, FormatError, OpenedBody, MAGIC_KEYRING};
use crate::keys::{KeyId, KeyRef, RecoveryKey, SecretKey, WrappedKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Public keyring header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyringHeader {
    /// Incremented on every rewrite.
    pub generation: u64,
    /// RFC 3339 time of the rewrite.
    pub updated: String,
    /// Id of the keyring key.
    pub keyring_key_id: KeyId,
    /// The keyring key wrapped by the newest tenant key.
    pub wrapped_key: WrappedKey,
    /// Key-loss protection: while set, every new point's data key is also wrapped
    /// by this provider recovery public key. Public (readable without keys, so
    /// `repo info` can say it) and authenticated with the keyring: changing it
    /// takes the tenant key. Absent: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoveryKey>,
}

/// What the keyring knows about one data key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataKeyInfo {
    /// RFC 3339 creation time.
    pub created: String,
    /// Point the key was made for (may never have been committed).
    pub point: String,
    /// Tenant key that wrapped it in that point's manifest.
    pub wrapped_by: KeyRef,
}

/// Sealed keyring JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyringBody {
    /// Data keys by id.
    pub keys: BTreeMap<KeyId, DataKeyInfo>,
}

/// An opened keyring.
pub struct Keyring {
    /// Header as read.
    pub header: KeyringHeader,
    /// Metadata of data keys.
    pub body: KeyringBody,
    /// Data keys.
    pub keys: Vec<SecretKey>,
    /// Repository id-key.
    pub id_key: SecretKey,
}

impl Keyring {
    /// Look up a data key.
    pub fn key(&self, id: KeyId) -> Option<&SecretKey> {
        self.keys.iter().find(|k| k.id == id)
    }
}

/// Encode a keyring sealed under `keyring_key`.
pub fn encode(
    header: &KeyringHeader,
    body: &KeyringBody,
    keys: &[SecretKey],
    id_key: &SecretKey,
    keyring_key: &SecretKey,
) -> Vec<u8> {
    format::encode_sealed(MAGIC_KEYRING, header, body, keys, id_key, keyring_key)
}

/// Decode the public header.
pub fn decode_header(b: &[u8]) -> Result<(KeyringHeader, usize), FormatError> {
    format::read_sealed_header(MAGIC_KEYRING, "keyring", b)
}

/// Open the sealed body.
pub fn open_body(
    b: &[u8],
    at: usize,
    keyring_key: &SecretKey,
) -> Result<OpenedBody<KeyringBody>, FormatError> {
    format::open_sealed("keyring", b, at, keyring_key)
}
