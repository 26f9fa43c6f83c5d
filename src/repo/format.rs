//! Byte-level encoding and decoding of every repository file (see `docs/format.md`).
//!
//! Pure functions over byte slices and `Read`/`Write` streams: no paths, no locking,
//! no policy. Decoders never panic and never allocate from an unchecked length field;
//! each failure is a [`FormatError`] that the caller wraps with the file's path.

use super::codec::{self, Codec};
use crate::keys::{KeyId, SecretKey, KEY_LEN};
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use rand::RngCore;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::{Read, Write};
use zeroize::Zeroizing;

/// Current format version written in every file.
pub const VERSION: u16 = 1;
/// Magic of the repository config file.
pub const MAGIC_CONFIG: &[u8; 8] = b"FERRYCFG";
/// Magic of chunk files.
pub const MAGIC_CHUNK: &[u8; 8] = b"FERRYCHK";
/// Magic of index files.
pub const MAGIC_INDEX: &[u8; 8] = b"FERRYIDX";
/// Magic of manifests.
pub const MAGIC_MANIFEST: &[u8; 8] = b"FERRYMAN";
/// Magic of the keyring.
pub const MAGIC_KEYRING: &[u8; 8] = b"FERRYKRG";

/// Smallest allowed chunk size.
pub const MIN_CHUNK_SIZE: u32 = 256 * 1024;
/// Largest allowed chunk size (and largest chunk plaintext).
pub const MAX_CHUNK_SIZE: u32 = 8 * 1024 * 1024;
/// Default chunk size.
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;
/// Chunk file header length.
pub const CHUNK_HEADER_LEN: usize = 44;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;
/// Index header length.
pub const INDEX_HEADER_LEN: usize = 68;
/// Index entry length: chunk id + key id.
pub const INDEX_ENTRY_LEN: usize = 48;
/// Maximum index entries per disk.
pub const MAX_INDEX_ENTRIES: u64 = 1 << 32;
const MAX_CONFIG_JSON: usize = 64 * 1024;
const MAX_SEALED_HEADER: usize = 1024 * 1024;
/// Maximum size of a manifest or keyring file.
pub const MAX_SEALED_FILE: usize = 64 * 1024 * 1024;
const MAX_KEYS: usize = 1 << 20;

/// A decoding or authentication failure, without the file path (the caller adds it).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// Wrong magic: not a ferry file of the expected kind.
    #[error("not a ferry {what} file (magic {found:?})")]
    BadMagic {
        /// Kind expected.
        what: &'static str,
        /// Bytes found, lossily shown.
        found: String,
    },
    /// A version this ferry does not know.
    #[error("{what} format version {version} is not supported by this ferry (it reads version {VERSION}); upgrade ferry")]
    UnsupportedVersion {
        /// Kind.
        what: &'static str,
        /// Version found.
        version: u16,
    },
    /// The file ends early.
    #[error("{what} is truncated: needs {need} bytes, has {have}")]
    Truncated {
        /// Kind.
        what: &'static str,
        /// Bytes needed.
        need: u64,
        /// Bytes present.
        have: u64,
    },
    /// A length field or the file exceeds a hard bound.
    #[error("{what} is too large: {len} > {max}")]
    TooLarge {
        /// Field or file.
        what: &'static str,
        /// Value found.
        len: u64,
        /// Bound.
        max: u64,
    },
    /// A field holds an impossible value.
    #[error("{what}: {detail}")]
    BadField {
        /// Field.
        what: &'static str,
        /// Detail.
        detail: String,
    },
    /// Checksum mismatch: the file was modified or damaged.
    #[error("{what} checksum mismatch: the file is damaged")]
    BadChecksum {
        /// Kind.
        what: &'static str,
    },
    /// AES-GCM authentication failed: damaged, tampered with, or wrong key.
    #[error("{what} failed authentication: the file is damaged or was modified")]
    AuthFailed {
        /// Kind.
        what: &'static str,
    },
    /// The chunk was sealed with a key this reader does not have.
    #[error("chunk sealed with data key {0} which this restore point does not carry")]
    UnknownKey(KeyId),
    /// The compressed payload is invalid or decodes to the wrong length.
    #[error("chunk payload does not decompress: {0}")]
    Decompress(String),
    /// The chunk decrypted but its content does not match its id.
    #[error("chunk content does not match its id")]
    IdMismatch,
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn check_magic_version(b: &[u8], magic: &[u8; 8], what: &'static str) -> Result<(), FormatError> {
    if b.len() < 10 {
        return Err(FormatError::Truncated {
            what,
            need: 10,
            have: b.len() as u64,
        });
    }
    if &b[..8] != magic {
        return Err(FormatError::BadMagic {
            what,
            found: String::from_utf8_lossy(&b[..8]).into_owned(),
        });
    }
    let v = be_u16(b, 8);
    if v != VERSION {
        return Err(FormatError::UnsupportedVersion { what, version: v });
    }
    Ok(())
}

/// A 32-byte chunk id (keyed BLAKE3 of the plaintext).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The marker stored in indexes for all-zero chunks.
    pub const ZERO: ChunkId = ChunkId([0; 32]);
    /// Compute the id of `data` under `id_key`.
    pub fn compute(id_key: &SecretKey, data: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(id_key.expose(), data).as_bytes())
    }
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    /// Parse 64 hex digits.
    pub fn from_hex(s: &str) -> Option<ChunkId> {
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).ok()?;
        Some(ChunkId(b))
    }
    /// Whether this is the zero marker.
    pub fn is_zero_marker(&self) -> bool {
        self.0 == [0; 32]
    }
}
impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}
impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// True if every byte of `data` is zero (fast path over 16-byte words).
pub fn is_all_zero(data: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (pre, mid, post) = unsafe { data.align_to::<u128>() };
    pre.iter().all(|&b| b == 0) && post.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0)
}

// ---------------------------------------------------------------- config

/// Repository configuration (plaintext, checksummed).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RepoConfig {
    /// Random repository id, 32 hex digits.
    pub repo_id: String,
    /// Chunk size for new backups.
    pub chunk_size: u32,
    /// RFC 3339 creation time.
    pub created: String,
    /// Tenant name.
    pub tenant: String,
    /// Codec for new chunks (absent in repositories made before zstd: LZ4).
    /// Changing it affects new chunks only; every chunk records its own.
    #[serde(default)]
    pub compression: Codec,
    /// Immutable restore points (S3 Object Lock): every new point's objects are
    /// kept unchangeable for at least this long. Absent: no retention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub immutability: Option<Immutability>,
}

/// A repository's default for immutable restore points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Immutability {
    /// Days each new point stays immutable (at least; dates are rounded up to
    /// a 7-day generation, docs/format.md).
    pub days: u32,
    /// Object Lock mode.
    pub mode: crate::repo::backend::RetentionMode,
}

/// Check that a chunk size is allowed.
pub fn validate_chunk_size(cs: u32) -> Result<(), FormatError> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) || !cs.is_power_of_two() {
        return Err(FormatError::BadField {
            what: "chunk size",
            detail: format!("{cs} is not a power of two between 256 KiB and 8 MiB"),
        });
    }
    Ok(())
}

/// Encode `config`.
pub fn encode_config(c: &RepoConfig) -> Vec<u8> {
    let json = serde_json::to_vec(c).expect("config serializes");
    let mut out = Vec::with_capacity(14 + json.len() + 32);
    out.extend_from_slice(MAGIC_CONFIG);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    let h = blake3::hash(&out);
    out.extend_from_slice(h.as_bytes());
    out
}

/// Decode `config`.
pub fn decode_config(b: &[u8]) -> Result<RepoConfig, FormatError> {
    const W: &str = "config";
    check_magic_version(b, MAGIC_CONFIG, W)?;
    if b.len() < 14 + 32 {
        return Err(FormatError::Truncated {
            what: W,
            need: 46,
            have: b.len() as u64,
        });
    }
    let len = be_u32(b, 10) as usize;
    if len > MAX_CONFIG_JSON {
        return Err(FormatError::TooLarge {
            what: "config JSON",
            len: len as u64,
            max: MAX_CONFIG_JSON as u64,
        });
    }
    let need = 14 + len + 32;
    if b.len() != need {
        return Err(FormatError::Truncated {
            what: W,
            need: need as u64,
            have: b.len() as u64,
        });
    }
    if blake3::hash(&b[..14 + len]).as_bytes() != &b[14 + len..] {
        return Err(FormatError::BadChecksum { what: W });
    }
    let c: RepoConfig =
        serde_json::from_slice(&b[14..14 + len]).map_err(|e| FormatError::BadField {
            what: "config JSON",
            detail: e.to_string(),
        })?;
    validate_chunk_size(c.chunk_size)?;
    Ok(c)
}

// ---------------------------------------------------------------- chunks

/// Reusable AES-256-GCM cipher for one data key (key schedule done once) and the
/// codec new chunks are compressed with.
pub struct ChunkSealer {
    key_id: KeyId,
    cipher: Aes256Gcm,
    codec: Codec,
}

impl ChunkSealer {
    /// Prepare a sealer for `key` compressing with LZ4.
    pub fn new(key: &SecretKey) -> Self {
        Self::with_codec(key, Codec::Lz4)
    }
    /// Prepare a sealer for `key` compressing with `codec`.
    pub fn with_codec(key: &SecretKey, codec: Codec) -> Self {
        ChunkSealer {
            key_id: key.id,
            cipher: cipher_for(key),
            codec,
        }
    }
    /// The key id this sealer uses.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }
    /// The codec this sealer compresses with.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// Seal a chunk: compressed with the sealer's codec when that shrinks the
    /// data (raw otherwise), then AES-256-GCM. `out` is overwritten with the
    /// whole chunk file and reused between calls.
    pub fn seal(&self, id: &ChunkId, plain: &[u8], out: &mut Vec<u8>) {
        assert!(!plain.is_empty() && plain.len() <= MAX_CHUNK_SIZE as usize);
        let max = codec::max_compressed_len(plain.len());
        // No clear(): every byte up to the final length is overwritten below, so only
        // growth is zero-filled (a 4 MiB memset per chunk otherwise).
        out.resize(CHUNK_HEADER_LEN + max + TAG_LEN, 0);
        let (flags, payload_len) = codec::compress(self.codec, plain, &mut out[CHUNK_HEADER_LEN..]);
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        out[..8].copy_from_slice(MAGIC_CHUNK);
        out[8..10].copy_from_slice(&VERSION.to_be_bytes());
        out[10] = flags;
        out[11] = 0;
        out[12..28].copy_from_slice(&self.key_id.0);
        out[28..40].copy_from_slice(&nonce);
        out[40..44].copy_from_slice(&(plain.len() as u32).to_be_bytes());
        let mut aad = [0u8; CHUNK_HEADER_LEN + 32];
        aad[..CHUNK_HEADER_LEN].copy_from_slice(&out[..CHUNK_HEADER_LEN]);
        aad[CHUNK_HEADER_LEN..].copy_from_slice(&id.0);
        let (_, body) = out.split_at_mut(CHUNK_HEADER_LEN);
        let tag = self
            .cipher
            .encrypt_inout_detached(&Nonce::from(nonce), &aad, (&mut body[..payload_len]).into())
            .expect("AES-GCM encryption of <= 8 MiB cannot fail");
        let end = CHUNK_HEADER_LEN + payload_len;
        out[end..end + TAG_LEN].copy_from_slice(&tag);
        out.truncate(end + TAG_LEN);
    }
}

/// Parsed fixed header of a chunk file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Codec of the payload: 0 raw, 1 LZ4, 2 zstd (see [`codec`]).
    pub flags: u8,
    /// Data key that sealed the chunk.
    pub key_id: KeyId,
    /// Nonce.
    pub nonce: [u8; 12],
    /// Plaintext length.
    pub plain_len: u32,
}

/// Parse and bound-check a chunk header; `file_len` is the chunk file's size.
pub fn parse_chunk_header(b: &[u8], file_len: u64) -> Result<ChunkHeader, FormatError> {
    const W: &str = "chunk";
    check_magic_version(b, MAGIC_CHUNK, W)?;
    if b.len() < CHUNK_HEADER_LEN {
        return Err(FormatError::Truncated {
            what: W,
            need: CHUNK_HEADER_LEN as u64,
            have: b.len() as u64,
        });
    }
    let flags = b[10];
    if flags > codec::FLAG_ZSTD || b[11] != 0 {
        return Err(FormatError::BadField {
            what: "chunk flags",
            detail: format!("unknown flags {flags:#x}/{:#x}", b[11]),
        });
    }
    let mut key_id = [0u8; 16];
    key_id.copy_from_slice(&b[12..28]);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&b[28..40]);
    let plain_len = be_u32(b, 40);
    if plain_len == 0 || plain_len > MAX_CHUNK_SIZE {
        return Err(FormatError::TooLarge {
            what: "chunk plaintext length",
            len: plain_len as u64,
            max: MAX_CHUNK_SIZE as u64,
        });
    }
    let min = (CHUNK_HEADER_LEN + TAG_LEN + 1) as u64;
    let max = (CHUNK_HEADER_LEN + TAG_LEN) as u64 + plain_len as u64;
    if file_len < min {
        return Err(FormatError::Truncated {
            what: W,
            need: min,
            have: file_len,
        });
    }
    if file_len > max {
        return Err(FormatError::TooLarge {
            what: "chunk file",
            len: file_len,
            max,
        });
    }
    if flags == 0 && file_len != max {
        return Err(FormatError::Truncated {
            what: W,
            need: max,
            have: file_len,
        });
    }
    Ok(ChunkHeader {
        flags,
        key_id: KeyId(key_id),
        nonce,
        plain_len,
    })
}

/// Open a chunk file's bytes `data` (modified in place) into `out`: authenticate,
/// decompress, and check the content against `id`. `key_for` maps a key id to the
/// data key; `id_key` is the repository id-key.
pub fn open_chunk<'k>(
    data: &mut [u8],
    id: &ChunkId,
    key_for: impl Fn(KeyId) -> Option<&'k Aes256Gcm>,
    id_key: &SecretKey,
    out: &mut Vec<u8>,
) -> Result<ChunkHeader, FormatError> {
    let h = parse_chunk_header(data, data.len() as u64)?;
    out.clear();
    out.resize(h.plain_len as usize, 0);
    open_chunk_into(data, id, key_for, id_key, out)
}

/// Like [`open_chunk`], but decodes into `out`, which must be exactly the
/// plaintext length the header announces (callers know it from the index).
pub fn open_chunk_into<'k>(
    data: &mut [u8],
    id: &ChunkId,
    key_for: impl Fn(KeyId) -> Option<&'k Aes256Gcm>,
    id_key: &SecretKey,
    out: &mut [u8],
) -> Result<ChunkHeader, FormatError> {
    let h = parse_chunk_header(data, data.len() as u64)?;
    if out.len() != h.plain_len as usize {
        return Err(FormatError::BadField {
            what: "chunk length",
            detail: format!("{} bytes where {} are expected", h.plain_len, out.len()),
        });
    }
    let cipher = key_for(h.key_id).ok_or(FormatError::UnknownKey(h.key_id))?;
    let mut aad = [0u8; CHUNK_HEADER_LEN + 32];
    aad[..CHUNK_HEADER_LEN].copy_from_slice(&data[..CHUNK_HEADER_LEN]);
    aad[CHUNK_HEADER_LEN..].copy_from_slice(&id.0);
    let (_, rest) = data.split_at_mut(CHUNK_HEADER_LEN);
    let (payload, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
    cipher
        .decrypt_inout_detached(
            &Nonce::from(h.nonce),
            &aad,
            (&mut *payload).into(),
            &tag_of(tag),
        )
        .map_err(|_| FormatError::AuthFailed { what: "chunk" })?;
    codec::decompress(h.flags, payload, out).map_err(|e| FormatError::Decompress(e.to_string()))?;
    if ChunkId::compute(id_key, out) != *id {
        return Err(FormatError::IdMismatch);
    }
    Ok(h)
}

/// Build the AES-GCM cipher for a data key (for [`open_chunk`]'s `key_for`).
pub fn cipher_for(key: &SecretKey) -> Aes256Gcm {
    Aes256Gcm::new(&(*key.expose()).into())
}

fn tag_of(b: &[u8]) -> Tag {
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(b);
    Tag::from(t)
}

// ---------------------------------------------------------------- index

/// Header of an index file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexHeader {
    /// Point id (<= 32 ASCII bytes).
    pub point_id: String,
    /// Disk number.
    pub disk: u32,
    /// Chunk size used.
    pub chunk_size: u32,
    /// Disk size in bytes.
    pub disk_size: u64,
}

impl IndexHeader {
    /// Number of entries: ceil(disk_size / chunk_size).
    pub fn entries(&self) -> u64 {
        self.disk_size.div_ceil(self.chunk_size as u64)
    }
    /// Length of chunk `i` (the last may be short).
    pub fn chunk_len(&self, i: u64) -> usize {
        let start = i * self.chunk_size as u64;
        (self.disk_size - start).min(self.chunk_size as u64) as usize
    }
    /// Exact size of the index file.
    pub fn file_len(&self) -> u64 {
        INDEX_HEADER_LEN as u64 + self.entries() * INDEX_ENTRY_LEN as u64 + 32
    }
    fn encode(&self) -> [u8; INDEX_HEADER_LEN] {
        let mut b = [0u8; INDEX_HEADER_LEN];
        b[..8].copy_from_slice(MAGIC_INDEX);
        b[8..10].copy_from_slice(&VERSION.to_be_bytes());
        let pid = self.point_id.as_bytes();
        b[12..12 + pid.len().min(32)].copy_from_slice(&pid[..pid.len().min(32)]);
        b[44..48].copy_from_slice(&self.disk.to_be_bytes());
        b[48..52].copy_from_slice(&self.chunk_size.to_be_bytes());
        b[52..60].copy_from_slice(&self.disk_size.to_be_bytes());
        b[60..68].copy_from_slice(&self.entries().to_be_bytes());
        b
    }
    /// Decode and validate a header; `file_len` must match exactly.
    pub fn decode(b: &[u8], file_len: u64) -> Result<IndexHeader, FormatError> {
        const W: &str = "index";
        check_magic_version(b, MAGIC_INDEX, W)?;
        if b.len() < INDEX_HEADER_LEN {
            return Err(FormatError::Truncated {
                what: W,
                need: INDEX_HEADER_LEN as u64,
                have: b.len() as u64,
            });
        }
        if be_u16(b, 10) != 0 {
            return Err(FormatError::BadField {
                what: "index reserved field",
                detail: "not zero".into(),
            });
        }
        let pid_raw = &b[12..44];
        let pid_len = pid_raw.iter().position(|&c| c == 0).unwrap_or(32);
        let point_id = std::str::from_utf8(&pid_raw[..pid_len])
            .map_err(|_| FormatError::BadField {
                what: "index point id",
                detail: "not ASCII".into(),
            })?
            .to_string();
        let h = IndexHeader {
            point_id,
            disk: be_u32(b, 44),
            chunk_size: be_u32(b, 48),
            disk_size: be_u64(b, 52),
        };
        validate_chunk_size(h.chunk_size)?;
        let entries = be_u64(b, 60);
        if entries != h.entries() {
            return Err(FormatError::BadField {
                what: "index entry count",
                detail: format!("{entries} does not match disk size {}", h.disk_size),
            });
        }
        if entries > MAX_INDEX_ENTRIES {
            return Err(FormatError::TooLarge {
                what: "index entries",
                len: entries,
                max: MAX_INDEX_ENTRIES,
            });
        }
        if file_len != h.file_len() {
            return Err(FormatError::Truncated {
                what: W,
                need: h.file_len(),
                have: file_len,
            });
        }
        Ok(h)
    }
}

/// One index entry: chunk id (or zero marker) and the key that sealed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// Chunk id, or [`ChunkId::ZERO`].
    pub id: ChunkId,
    /// Sealing key (zero for zero chunks).
    pub key: KeyId,
}

impl IndexEntry {
    /// An all-zero chunk.
    pub const ZERO: IndexEntry = IndexEntry {
        id: ChunkId::ZERO,
        key: KeyId([0; 16]),
    };
}

/// Streaming writer of an index file; hashes as it writes.
pub struct IndexWriter<W: Write> {
    w: W,
    hasher: blake3::Hasher,
    header: IndexHeader,
    written: u64,
}

impl<W: Write> IndexWriter<W> {
    /// Start an index: writes the header.
    pub fn new(mut w: W, header: IndexHeader) -> std::io::Result<Self> {
        let hb = header.encode();
        let mut hasher = blake3::Hasher::new();
        hasher.update(&hb);
        w.write_all(&hb)?;
        Ok(IndexWriter {
            w,
            hasher,
            header,
            written: 0,
        })
    }
    /// Append the next entry.
    pub fn push(&mut self, e: &IndexEntry) -> std::io::Result<()> {
        let mut b = [0u8; INDEX_ENTRY_LEN];
        b[..32].copy_from_slice(&e.id.0);
        b[32..].copy_from_slice(&e.key.0);
        self.hasher.update(&b);
        self.written += 1;
        self.w.write_all(&b)
    }
    /// Write the checksum; returns the writer and BLAKE3 of the whole file.
    pub fn finish(mut self) -> std::io::Result<(W, [u8; 32])> {
        if self.written != self.header.entries() {
            return Err(std::io::Error::other(format!(
                "index has {} entries, expected {}",
                self.written,
                self.header.entries()
            )));
        }
        let check = *self.hasher.finalize().as_bytes();
        self.w.write_all(&check)?;
        let file_hash = file_hash_from_check(&check);
        Ok((self.w, file_hash))
    }
}

/// The "index hash" recorded in manifests: BLAKE3 of the index's own checksum, which
/// itself covers every preceding byte. Keyed authentication comes from the manifest.
pub fn file_hash_from_check(check: &[u8; 32]) -> [u8; 32] {
    *blake3::hash(check).as_bytes()
}

/// Streaming reader of an index file. Entries are delivered as read; the checksum
/// is verified when the last entry has been read (call [`IndexReader::finish`]).
/// Callers that must not act on unverified entries verify the file first with
/// [`verify_index`].
pub struct IndexReader<R: Read> {
    r: R,
    hasher: blake3::Hasher,
    /// The parsed header.
    pub header: IndexHeader,
    remaining: u64,
    buf: Vec<u8>,
    pos: usize,
    filled: usize,
}

impl<R: Read> IndexReader<R> {
    /// Open an index stream of `file_len` bytes.
    pub fn new(mut r: R, file_len: u64) -> Result<Self, IndexReadError> {
        let mut hb = [0u8; INDEX_HEADER_LEN];
        read_exact_or_truncated(&mut r, &mut hb, "index", file_len)?;
        let header = IndexHeader::decode(&hb, file_len)?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&hb);
        Ok(IndexReader {
            r,
            hasher,
            remaining: header.entries(),
            header,
            buf: vec![0u8; INDEX_ENTRY_LEN * 4096],
            pos: 0,
            filled: 0,
        })
    }

    /// Next entry, or `None` after the last.
    pub fn next_entry(&mut self) -> Result<Option<IndexEntry>, IndexReadError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        if self.pos == self.filled {
            let n = (self.remaining.min(4096) as usize) * INDEX_ENTRY_LEN;
            read_exact_or_truncated(&mut self.r, &mut self.buf[..n], "index", 0)?;
            self.hasher.update(&self.buf[..n]);
            self.pos = 0;
            self.filled = n;
        }
        let b = &self.buf[self.pos..self.pos + INDEX_ENTRY_LEN];
        let mut id = [0u8; 32];
        id.copy_from_slice(&b[..32]);
        let mut key = [0u8; 16];
        key.copy_from_slice(&b[32..]);
        self.pos += INDEX_ENTRY_LEN;
        self.remaining -= 1;
        Ok(Some(IndexEntry {
            id: ChunkId(id),
            key: KeyId(key),
        }))
    }

    /// Read and check the trailing checksum; returns the index hash for manifests.
    pub fn finish(mut self) -> Result<[u8; 32], IndexReadError> {
        while self.next_entry()?.is_some() {}
        let mut check = [0u8; 32];
        read_exact_or_truncated(&mut self.r, &mut check, "index", 0)?;
        if self.hasher.finalize().as_bytes() != &check {
            return Err(FormatError::BadChecksum { what: "index" }.into());
        }
        let mut extra = [0u8; 1];
        if self.r.read(&mut extra).map_err(IndexReadError::Io)? != 0 {
            return Err(FormatError::TooLarge {
                what: "index file",
                len: self.header.file_len() + 1,
                max: self.header.file_len(),
            }
            .into());
        }
        Ok(file_hash_from_check(&check))
    }
}

/// Read a whole index stream, checking its checksum; returns header and index hash.
pub fn verify_index<R: Read>(
    r: R,
    file_len: u64,
) -> Result<(IndexHeader, [u8; 32]), IndexReadError> {
    let rd = IndexReader::new(r, file_len)?;
    let h = rd.header.clone();
    let hash = rd.finish()?;
    Ok((h, hash))
}

/// Failure reading an index: I/O or format.
#[derive(Debug, thiserror::Error)]
pub enum IndexReadError {
    /// I/O error.
    #[error("{0}")]
    Io(std::io::Error),
    /// Format error.
    #[error("{0}")]
    Format(#[from] FormatError),
}

fn read_exact_or_truncated<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
    file_len: u64,
) -> Result<(), IndexReadError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            IndexReadError::Format(FormatError::Truncated {
                what,
                need: buf.len() as u64,
                have: file_len,
            })
        } else {
            IndexReadError::Io(e)
        }
    })
}

// ---------------------------------------------------------------- sealed documents

/// Plaintext body of a sealed document (manifest or keyring) after opening.
pub struct OpenedBody<B> {
    /// The JSON part.
    pub body: B,
    /// Data keys carried.
    pub keys: Vec<SecretKey>,
    /// The repository id-key.
    pub id_key: SecretKey,
}

/// Encode a sealed document: public JSON header (authenticated) and a body sealed
/// with `seal_key` holding JSON, data keys and the id-key.
pub fn encode_sealed<H: Serialize, B: Serialize>(
    magic: &[u8; 8],
    header: &H,
    body: &B,
    keys: &[SecretKey],
    id_key: &SecretKey,
    seal_key: &SecretKey,
) -> Vec<u8> {
    let hjson = serde_json::to_vec(header).expect("header serializes");
    let bjson = serde_json::to_vec(body).expect("body serializes");
    let mut out = Vec::with_capacity(14 + hjson.len() + 12 + bjson.len() + 64 * keys.len() + 64);
    out.extend_from_slice(magic);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&(hjson.len() as u32).to_be_bytes());
    out.extend_from_slice(&hjson);
    let aad_len = out.len();
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    out.extend_from_slice(&nonce);
    let mut plain = Zeroizing::new(Vec::with_capacity(8 + bjson.len() + 48 * keys.len() + 32));
    plain.extend_from_slice(&(bjson.len() as u32).to_be_bytes());
    plain.extend_from_slice(&bjson);
    plain.extend_from_slice(&(keys.len() as u32).to_be_bytes());
    for k in keys {
        plain.extend_from_slice(&k.id.0);
        plain.extend_from_slice(k.expose());
    }
    plain.extend_from_slice(id_key.expose());
    let cipher = cipher_for(seal_key);
    let (aad, _) = out.split_at(aad_len);
    let aad = aad.to_vec();
    let tag = cipher
        .encrypt_inout_detached(&Nonce::from(nonce), &aad, (&mut plain[..]).into())
        .expect("sealing a document cannot fail");
    out.extend_from_slice(&plain);
    out.extend_from_slice(&tag);
    out
}

/// Read the public header of a sealed document; returns it and the offset of the nonce.
pub fn read_sealed_header<H: DeserializeOwned>(
    magic: &[u8; 8],
    what: &'static str,
    b: &[u8],
) -> Result<(H, usize), FormatError> {
    check_magic_version(b, magic, what)?;
    if b.len() > MAX_SEALED_FILE {
        return Err(FormatError::TooLarge {
            what,
            len: b.len() as u64,
            max: MAX_SEALED_FILE as u64,
        });
    }
    if b.len() < 14 {
        return Err(FormatError::Truncated {
            what,
            need: 14,
            have: b.len() as u64,
        });
    }
    let hlen = be_u32(b, 10) as usize;
    if hlen > MAX_SEALED_HEADER {
        return Err(FormatError::TooLarge {
            what: "header",
            len: hlen as u64,
            max: MAX_SEALED_HEADER as u64,
        });
    }
    let min = 14 + hlen + 12 + TAG_LEN;
    if b.len() < min {
        return Err(FormatError::Truncated {
            what,
            need: min as u64,
            have: b.len() as u64,
        });
    }
    let h = serde_json::from_slice(&b[14..14 + hlen]).map_err(|e| FormatError::BadField {
        what: "header JSON",
        detail: e.to_string(),
    })?;
    Ok((h, 14 + hlen))
}

/// Open the sealed body of a document whose header ends at `nonce_at`.
pub fn open_sealed<B: DeserializeOwned>(
    what: &'static str,
    b: &[u8],
    nonce_at: usize,
    seal_key: &SecretKey,
) -> Result<OpenedBody<B>, FormatError> {
    if b.len() < nonce_at + 12 + TAG_LEN {
        return Err(FormatError::Truncated {
            what,
            need: (nonce_at + 12 + TAG_LEN) as u64,
            have: b.len() as u64,
        });
    }
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&b[nonce_at..nonce_at + 12]);
    let sealed = &b[nonce_at + 12..];
    let (ct, tag) = sealed.split_at(sealed.len() - TAG_LEN);
    let mut plain = Zeroizing::new(ct.to_vec());
    cipher_for(seal_key)
        .decrypt_inout_detached(
            &Nonce::from(nonce),
            &b[..nonce_at],
            (&mut plain[..]).into(),
            &tag_of(tag),
        )
        .map_err(|_| FormatError::AuthFailed { what })?;
    parse_body(what, &plain)
}

fn parse_body<B: DeserializeOwned>(
    what: &'static str,
    p: &[u8],
) -> Result<OpenedBody<B>, FormatError> {
    let bad = |d: &str| FormatError::BadField {
        what,
        detail: d.to_string(),
    };
    if p.len() < 4 {
        return Err(bad("body too short"));
    }
    let jlen = be_u32(p, 0) as usize;
    let rest = p.len() - 4;
    if jlen > rest {
        return Err(bad("body JSON length exceeds body"));
    }
    let body: B =
        serde_json::from_slice(&p[4..4 + jlen]).map_err(|e| bad(&format!("body JSON: {e}")))?;
    let mut at = 4 + jlen;
    if p.len() < at + 4 {
        return Err(bad("missing key count"));
    }
    let n = be_u32(p, at) as usize;
    at += 4;
    if n > MAX_KEYS || n * 48 + 32 != p.len() - at {
        return Err(bad("key count does not match body size"));
    }
    let mut keys = Vec::with_capacity(n);
    for _ in 0..n {
        let mut id = [0u8; 16];
        id.copy_from_slice(&p[at..at + 16]);
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        k.copy_from_slice(&p[at + 16..at + 48]);
        keys.push(SecretKey::from_bytes(KeyId(id), &k));
        at += 48;
    }
    let mut k = Zeroizing::new([0u8; KEY_LEN]);
    k.copy_from_slice(&p[at..at + 32]);
    Ok(OpenedBody {
        body,
        keys,
        id_key: SecretKey::from_bytes(KeyId([0; 16]), &k),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> RepoConfig {
        RepoConfig {
            repo_id: "00112233445566778899aabbccddeeff".into(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            created: "2026-11-23T00:00:00Z".into(),
            tenant: "acme".into(),
            compression: Codec::Lz4,
            immutability: None,
        }
    }

    #[test]
    fn config_with_immutability_round_trips_and_old_configs_read() {
        let mut c = cfg();
        c.immutability = Some(Immutability {
            days: 30,
            mode: crate::repo::backend::RetentionMode::Compliance,
        });
        let back = decode_config(&encode_config(&c)).unwrap();
        assert_eq!(back.immutability, c.immutability);
        // A config without the field (every repository made before it) reads
        // as "off", and one without it is written without it.
        let plain = encode_config(&cfg());
        assert!(!String::from_utf8_lossy(&plain).contains("immutability"));
        assert_eq!(decode_config(&plain).unwrap().immutability, None);
    }

    #[test]
    fn config_roundtrip_and_damage() {
        let b = encode_config(&cfg());
        assert_eq!(decode_config(&b).unwrap(), cfg());
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 0x10;
            assert!(decode_config(&d).is_err(), "flip at {i} not detected");
        }
        assert!(matches!(
            decode_config(&b[..b.len() - 1]),
            Err(FormatError::Truncated { .. })
        ));
        let mut v2 = b.clone();
        v2[9] = 2;
        assert!(matches!(
            decode_config(&v2),
            Err(FormatError::UnsupportedVersion { version: 2, .. })
        ));
    }

    #[test]
    fn chunk_seal_open_roundtrip_compressible_and_raw() {
        let dk = SecretKey::generate();
        let idk = SecretKey::generate();
        let sealer = ChunkSealer::new(&dk);
        let c = cipher_for(&dk);
        for plain in [
            vec![7u8; 300_000],
            (0..300_000u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ] {
            let id = ChunkId::compute(&idk, &plain);
            let mut file = Vec::new();
            sealer.seal(&id, &plain, &mut file);
            let mut out = Vec::new();
            let mut f2 = file.clone();
            let h =
                open_chunk(&mut f2, &id, |k| (k == dk.id).then_some(&c), &idk, &mut out).unwrap();
            assert_eq!(out, plain);
            assert_eq!(h.key_id, dk.id);
            // every byte flip is detected
            for i in (0..file.len())
                .step_by(997)
                .chain([0, 10, 12, 40, file.len() - 1])
            {
                let mut d = file.clone();
                d[i] ^= 1;
                assert!(
                    open_chunk(&mut d, &id, |k| (k == dk.id).then_some(&c), &idk, &mut out)
                        .is_err()
                );
            }
            // wrong id
            let mut d = file.clone();
            let other = ChunkId([9; 32]);
            assert!(open_chunk(
                &mut d,
                &other,
                |k| (k == dk.id).then_some(&c),
                &idk,
                &mut out
            )
            .is_err());
        }
    }

    #[test]
    fn compressible_chunk_is_smaller() {
        let dk = SecretKey::generate();
        let mut file = Vec::new();
        ChunkSealer::new(&dk).seal(&ChunkId([1; 32]), &[3u8; 1 << 20], &mut file);
        assert!(file.len() < 10_000);
    }

    #[test]
    fn index_roundtrip() {
        let h = IndexHeader {
            point_id: "20261123T000000Z-deadbeef".into(),
            disk: 1,
            chunk_size: MIN_CHUNK_SIZE,
            disk_size: MIN_CHUNK_SIZE as u64 * 5000 + 17,
        };
        let mut w = IndexWriter::new(Vec::new(), h.clone()).unwrap();
        let entries: Vec<IndexEntry> = (0..h.entries())
            .map(|i| IndexEntry {
                id: ChunkId([(i % 251) as u8; 32]),
                key: KeyId([(i % 7) as u8; 16]),
            })
            .collect();
        for e in &entries {
            w.push(e).unwrap();
        }
        let (file, hash) = w.finish().unwrap();
        assert_eq!(file.len() as u64, h.file_len());
        let mut r = IndexReader::new(&file[..], file.len() as u64).unwrap();
        assert_eq!(r.header, h);
        for e in &entries {
            assert_eq!(r.next_entry().unwrap().unwrap(), *e);
        }
        assert_eq!(r.finish().unwrap(), hash);
        let mut bad = file.clone();
        bad[INDEX_HEADER_LEN + 48 * 4100] ^= 4;
        assert!(verify_index(&bad[..], bad.len() as u64).is_err());
        assert!(IndexReader::new(&file[..file.len() - 1], file.len() as u64 - 1).is_err());
    }

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct H {
        a: String,
    }

    #[test]
    fn sealed_roundtrip_and_flips() {
        let seal = SecretKey::generate();
        let idk = SecretKey::generate();
        let keys = vec![SecretKey::generate(), SecretKey::generate()];
        let b = encode_sealed(
            MAGIC_MANIFEST,
            &H { a: "x".into() },
            &H { a: "body".into() },
            &keys,
            &idk,
            &seal,
        );
        let (h, at): (H, usize) = read_sealed_header(MAGIC_MANIFEST, "manifest", &b).unwrap();
        assert_eq!(h.a, "x");
        let o: OpenedBody<H> = open_sealed("manifest", &b, at, &seal).unwrap();
        assert_eq!(o.body.a, "body");
        assert_eq!(o.keys.len(), 2);
        assert_eq!(o.keys[1].expose(), keys[1].expose());
        assert_eq!(o.id_key.expose(), idk.expose());
        for i in 0..b.len() {
            let mut d = b.clone();
            d[i] ^= 0x40;
            let r = read_sealed_header::<H>(MAGIC_MANIFEST, "manifest", &d)
                .and_then(|(_, at)| open_sealed::<H>("manifest", &d, at, &seal).map(|_| ()));
            assert!(r.is_err(), "flip at {i} undetected");
        }
        let wrong = SecretKey::generate();
        assert!(matches!(
            open_sealed::<H>("manifest", &b, at, &wrong),
            Err(FormatError::AuthFailed { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_config(&data);
            let _ = parse_chunk_header(&data, data.len() as u64);
            let _ = IndexHeader::decode(&data, data.len() as u64);
            let _ = IndexReader::new(&data[..], data.len() as u64).map(|r| r.finish());
            let _ = read_sealed_header::<H>(MAGIC_MANIFEST, "m", &data);
            let k = SecretKey::generate();
            let _ = open_sealed::<H>("m", &data, data.len().min(14), &k);
            let mut d = data.clone();
            let c = cipher_for(&k);
            let _ = open_chunk(&mut d, &ChunkId::ZERO, |_| Some(&c), &k, &mut Vec::new());
        }

        #[test]
        fn decoders_never_panic_with_valid_prefix(tail in proptest::collection::vec(any::<u8>(), 0..200), which in 0u8..4) {
            let mut data = match which {
                0 => MAGIC_CONFIG.to_vec(), 1 => MAGIC_CHUNK.to_vec(), 2 => MAGIC_INDEX.to_vec(), _ => MAGIC_MANIFEST.to_vec(),
            };
            data.extend_from_slice(&VERSION.to_be_bytes());
            data.extend_from_slice(&tail);
            let _ = decode_config(&data);
            let _ = parse_chunk_header(&data, data.len() as u64);
            let _ = IndexReader::new(&data[..], data.len() as u64).map(|r| r.finish());
            let _ = read_sealed_header::<H>(MAGIC_MANIFEST, "m", &data);
        }

        #[test]
        fn config_roundtrips(tenant in "[a-z0-9-]{0,40}", shift in 18u32..24) {
            let c = RepoConfig { tenant, chunk_size: 1 << shift, ..cfg() };
            prop_assert_eq!(decode_config(&encode_config(&c)).unwrap(), c);
        }

        #[test]
        fn chunk_roundtrips(plain in proptest::collection::vec(0u8..4, 1..5000)) {
            let dk = SecretKey::generate();
            let idk = SecretKey::generate();
            let id = ChunkId::compute(&idk, &plain);
            let mut f = Vec::new();
            ChunkSealer::new(&dk).seal(&id, &plain, &mut f);
            let c = cipher_for(&dk);
            let mut out = Vec::new();
            open_chunk(&mut f, &id, |_| Some(&c), &idk, &mut out).unwrap();
            prop_assert_eq!(out, plain);
        }
    }
}
