//! Restore point manifests: the public header, the sealed body and their
//! (de)serialization on top of [`super::format`]'s sealed documents. No file I/O.

use super::format::{self, FormatError, OpenedBody, MAGIC_MANIFEST};
use crate::keys::{KeyId, SecretKey, WrappedKey};
use serde::{Deserialize, Serialize};

/// Public summary of one disk (readable without keys).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSummary {
    /// Disk number within the point.
    pub disk: u32,
    /// Size in bytes.
    pub size: u64,
    /// Label (device label, file name).
    pub label: String,
}

/// Public, authenticated manifest header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestHeader {
    /// Point id.
    pub point_id: String,
    /// RFC 3339 creation time (UTC).
    pub created: String,
    /// Creation time as Unix seconds (for retention).
    pub created_unix: i64,
    /// Source label: VM name or image name. Points of one source form a chain.
    pub source: String,
    /// Previous point of the same source, if any.
    pub parent: Option<String>,
    /// Disks.
    pub disks: Vec<DiskSummary>,
    /// Id of this point's data key.
    pub data_key_id: KeyId,
    /// The data key wrapped by the tenant key.
    pub wrapped_key: WrappedKey,
}

/// Per-disk record in the sealed body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    /// Disk number.
    pub disk: u32,
    /// Index file name inside the point directory.
    pub index: String,
    /// Index hash (see `format::file_hash_from_check`), hex.
    pub index_blake3: String,
    /// Size in bytes.
    pub size: u64,
    /// Chunk positions.
    pub chunks_total: u64,
    /// All-zero chunk positions.
    pub chunks_zero: u64,
    /// Chunks newly stored by this point.
    pub chunks_new: u64,
    /// Bytes of new chunk files written.
    pub bytes_new_stored: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Change id (CBT) at snapshot time, if known.
    pub change_id: Option<String>,
    /// Transport used ("file", "nbdssl", "hotadd", ...).
    pub transport: String,
    /// Why that transport was chosen.
    pub transport_reason: String,
}

/// Sealed body JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestBody {
    /// Chunk size used by every index of the point.
    pub chunk_size: u32,
    /// Disks.
    pub disks: Vec<DiskRecord>,
}

/// Encode a manifest. `keys` must contain every data key the indexes reference.
pub fn encode(
    header: &ManifestHeader,
    body: &ManifestBody,
    keys: &[SecretKey],
    id_key: &SecretKey,
    data_key: &SecretKey,
) -> Vec<u8> {
    format::encode_sealed(MAGIC_MANIFEST, header, body, keys, id_key, data_key)
}

/// Decode the public header; returns it and the sealed body's offset.
pub fn decode_header(b: &[u8]) -> Result<(ManifestHeader, usize), FormatError> {
    format::read_sealed_header(MAGIC_MANIFEST, "manifest", b)
}

/// Open the sealed body with the point's data key.
pub fn open_body(
    b: &[u8],
    at: usize,
    data_key: &SecretKey,
) -> Result<OpenedBody<ManifestBody>, FormatError> {
    format::open_sealed("manifest", b, at, data_key)
}
