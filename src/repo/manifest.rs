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
    /// Source label: VM name (at backup time) or image name.
    pub source: String,
    /// The VM's identity, `<vCenter instance UUID>/<VM instance UUID>`: points
    /// with the same identity form a chain whatever the VM was called. Absent
    /// for images and points written before it was recorded: their chain is
    /// their source name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Previous point of the same source, if any.
    pub parent: Option<String>,
    /// Disks.
    pub disks: Vec<DiskSummary>,
    /// Id of this point's data key.
    pub data_key_id: KeyId,
    /// The data key wrapped by the tenant key.
    pub wrapped_key: WrappedKey,
    /// Key-loss protection: the same data key also wrapped by the provider's
    /// recovery public key. Absent when protection was off for this point (and in
    /// every point written before it existed): then only the tenant key opens it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_wrapped_key: Option<WrappedKey>,
    /// How the VM snapshot behind this point was taken (absent for image backups
    /// and points written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotRecord>,
    /// Object Lock retention of every object of this point (its manifest,
    /// indexes and every chunk it references); absent when the point is not
    /// immutable. Prune keeps the point until then; verify checks the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub immutable: Option<crate::repo::backend::Retention>,
}

impl ManifestHeader {
    /// What this point's chain is keyed by: the VM identity when recorded,
    /// else the source name.
    pub fn chain_key(&self) -> &str {
        self.identity.as_deref().unwrap_or(&self.source)
    }
}

/// How a point's VM snapshot was taken, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Crash-consistent or application-consistent (quiesced).
    pub consistency: Consistency,
    /// Why: the policy, and any fallback taken (e.g. "quiesce failed: ...;
    /// policy allows a crash-consistent snapshot").
    #[serde(default)]
    pub reason: String,
}

/// Consistency of a VM snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Taken without quiescing the guest: as after a power loss.
    Crash,
    /// The guest was quiesced through VMware Tools (file systems and VSS writers).
    Application,
    /// A value written by a newer ferry (read as such, never written).
    #[serde(other)]
    Unknown,
}

impl Consistency {
    /// `"crash"`, `"application"` (or `"unknown"`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Consistency::Crash => "crash",
            Consistency::Application => "application",
            Consistency::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Consistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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
    /// Whether the disk was read in full or only its CBT-changed areas (absent in
    /// manifests written before incrementals: full).
    #[serde(default)]
    pub read: ReadMode,
    /// Why: the base of an incremental, or why a full read was needed.
    #[serde(default)]
    pub read_reason: String,
    /// Bytes CBT reported changed since the base (incremental reads only).
    #[serde(default)]
    pub changed_bytes: Option<u64>,
    /// Chunk positions taken from the base point without a read (incremental
    /// reads only; zero positions count in `chunks_zero`).
    #[serde(default)]
    pub chunks_unchanged: u64,
}

/// How a disk was read for a restore point.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadMode {
    /// Every allocated area was read.
    #[default]
    Full,
    /// Only the areas changed-block tracking reported changed since the previous
    /// point were read; every other chunk position is the previous point's.
    Cbt,
    /// A value written by a newer ferry (read as such, never written).
    #[serde(other)]
    Unknown,
}

impl ReadMode {
    /// `"full"`, `"cbt"` (or `"unknown"`).
    pub fn as_str(&self) -> &'static str {
        match self {
            ReadMode::Full => "full",
            ReadMode::Cbt => "cbt",
            ReadMode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ReadMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = r#"{"disk":0,"index":"disk-0.idx","index_blake3":"00","size":1,
        "chunks_total":1,"chunks_zero":0,"chunks_new":1,"bytes_new_stored":9,"bytes_read":1,
        "change_id":"52 aa/3","transport":"file","transport_reason":"t"}"#;

    #[test]
    fn records_without_the_read_fields_are_full_reads() {
        let r: DiskRecord = serde_json::from_str(OLD).unwrap();
        assert_eq!(r.read, ReadMode::Full);
        assert_eq!(
            (r.read_reason.as_str(), r.changed_bytes, r.chunks_unchanged),
            ("", None, 0)
        );
    }

    #[test]
    fn read_modes_round_trip_and_unknown_values_still_open() {
        let mut r: DiskRecord = serde_json::from_str(OLD).unwrap();
        r.read = ReadMode::Cbt;
        r.changed_bytes = Some(65536);
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["read"], "cbt");
        assert_eq!(serde_json::from_value::<DiskRecord>(j.clone()).unwrap(), r);
        let mut newer = j;
        newer["read"] = "something-newer".into();
        newer["field_from_the_future"] = 1.into();
        let r: DiskRecord = serde_json::from_value(newer).unwrap();
        assert_eq!(r.read, ReadMode::Unknown);
    }
}
