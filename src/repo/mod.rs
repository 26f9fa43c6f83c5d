//! The repository: one directory per tenant holding chunks, restore points and the
//! keyring, in the format of `docs/format.md`.
//!
//! Owns paths, locking, atomic commits and reading/writing every repository file.
//! It does not decide *what* to back up (see [`crate::job`]) and never sees plaintext
//! keys outside zeroizing types.

pub mod codec;
pub mod format;
pub mod fsutil;
pub mod gc;
pub mod keycheck;
pub mod keyring;
pub mod lock;
pub mod manifest;
pub mod retention;
pub mod verify;

use crate::keys::{unwrap_secret, KeyError, KeyId, KeySource, RecoveryKey, SecretKey};
use format::{
    ChunkId, FormatError, IndexHeader, IndexReader, RepoConfig, CHUNK_HEADER_LEN, TAG_LEN,
};
use keyring::{Keyring, KeyringBody, KeyringHeader};
use lock::{LockError, LockMode, RepoLock};
use manifest::{ManifestBody, ManifestHeader};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Current time as RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// Repository errors. Every variant names the file or object concerned.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// I/O error on a path.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Error.
        source: io::Error,
    },
    /// The file system is full (or over quota).
    #[error("no space left on the repository file system while writing {path}; free space or prune, the repository is unharmed")]
    NoSpace {
        /// Path being written.
        path: PathBuf,
    },
    /// A repository file is damaged, truncated, of unknown version, or tampered with.
    #[error("{path}: {source}")]
    Damaged {
        /// File.
        path: PathBuf,
        /// What is wrong.
        source: FormatError,
    },
    /// Not a repository.
    #[error("{0} is not a ferry repository (no config file); create one with 'ferry repo init'")]
    NotARepository(PathBuf),
    /// init on a non-empty directory.
    #[error("{0} already exists and is not empty; refusing to initialise a repository there")]
    AlreadyExists(PathBuf),
    /// Lock conflict or lock I/O error.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// Key error.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Unknown restore point.
    #[error("no restore point {0} in this repository; see 'ferry points list'")]
    PointNotFound(String),
    /// The point has no such disk.
    #[error("restore point {point} has no disk {disk}")]
    DiskNotFound {
        /// Point.
        point: String,
        /// Disk.
        disk: u32,
    },
    /// A data key needed by a chunk is not in the keyring or the point.
    #[error("chunk {chunk} is sealed with data key {key} that neither the keyring nor the restore point carries")]
    MissingDataKey {
        /// Chunk.
        chunk: ChunkId,
        /// Key.
        key: KeyId,
    },
    /// The operation was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// Invalid argument.
    #[error("{0}")]
    Invalid(String),
}

impl RepoError {
    /// Wrap an I/O error with its path, classifying ENOSPC.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if fsutil::is_no_space(&source) {
            RepoError::NoSpace { path }
        } else {
            RepoError::Io { path, source }
        }
    }
    /// Whether this is damage (as opposed to an environment problem).
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            RepoError::Damaged { .. } | RepoError::MissingDataKey { .. }
        )
    }
}

/// Result alias.
pub type Result<T, E = RepoError> = std::result::Result<T, E>;

/// An open repository.
pub struct Repository {
    root: PathBuf,
    /// Its configuration.
    pub config: RepoConfig,
}

/// A restore point opened with its keys.
pub struct OpenPoint {
    /// Public header.
    pub header: ManifestHeader,
    /// Sealed body.
    pub body: ManifestBody,
    /// Data keys the point carries.
    pub keys: Vec<SecretKey>,
    /// Repository id-key.
    pub id_key: SecretKey,
}

impl OpenPoint {
    /// Find a data key.
    pub fn key(&self, id: KeyId) -> Option<&SecretKey> {
        self.keys.iter().find(|k| k.id == id)
    }
}

/// A way to obtain a restore point's data key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyPath {
    /// The tenant key that wrapped it in the point's manifest.
    OwnKey,
    /// The keyring, opened with the newest tenant key (it holds every data key).
    Keyring,
    /// The provider's recovery key (key-loss protection).
    RecoveryKey,
}

impl KeyPath {
    /// Words for reports.
    pub fn describe(&self) -> &'static str {
        match self {
            KeyPath::OwnKey => "its own key",
            KeyPath::Keyring => "the keyring",
            KeyPath::RecoveryKey => "the recovery key",
        }
    }
}

/// One line of `points list`: the header, or why it could not be read.
pub struct PointListing {
    /// Point id (directory name).
    pub id: String,
    /// Header or error.
    pub header: Result<ManifestHeader>,
}

impl Repository {
    /// Create a new repository at `path` (which must not exist or be empty) and write
    /// its keyring (id-key, no data keys yet) wrapped by `keys`' current key.
    pub fn init(path: &Path, chunk_size: u32, tenant: &str, keys: &dyn KeySource) -> Result<Self> {
        Self::init_with(path, chunk_size, tenant, keys, codec::Codec::Lz4)
    }

    /// [`Repository::init`] with the codec new chunks are compressed with.
    pub fn init_with(
        path: &Path,
        chunk_size: u32,
        tenant: &str,
        keys: &dyn KeySource,
        compression: codec::Codec,
    ) -> Result<Self> {
        format::validate_chunk_size(chunk_size).map_err(|e| RepoError::Invalid(e.to_string()))?;
        if path.exists() {
            let mut it = fs::read_dir(path).map_err(|e| RepoError::io(path, e))?;
            if it.next().is_some() {
                return Err(RepoError::AlreadyExists(path.to_path_buf()));
            }
        }
        for d in ["", "chunks", "points", "locks", "tmp"] {
            let p = path.join(d);
            fs::create_dir_all(&p).map_err(|e| RepoError::io(&p, e))?;
        }
        let mut rid = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut rid);
        let config = RepoConfig {
            repo_id: hex::encode(rid),
            chunk_size,
            created: now_rfc3339(),
            tenant: tenant.to_string(),
            compression,
        };
        let repo = Repository {
            root: path.to_path_buf(),
            config,
        };
        let id_key = SecretKey::generate();
        repo.write_keyring(keys, 0, &KeyringBody::default(), &[], &id_key, None)?;
        fsutil::atomic_write(
            &repo.tmp_path("config"),
            &path.join("config"),
            &format::encode_config(&repo.config),
        )
        .map_err(|e| RepoError::io(path.join("config"), e))?;
        fsutil::fsync_dir(path).map_err(|e| RepoError::io(path, e))?;
        Ok(repo)
    }

    /// Open an existing repository.
    pub fn open(path: &Path) -> Result<Self> {
        let cp = path.join("config");
        let b = match fs::read(&cp) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(RepoError::NotARepository(path.to_path_buf()))
            }
            Err(e) => return Err(RepoError::io(&cp, e)),
        };
        let config =
            format::decode_config(&b).map_err(|source| RepoError::Damaged { path: cp, source })?;
        for d in ["chunks", "points", "locks", "tmp"] {
            let p = path.join(d);
            fs::create_dir_all(&p).map_err(|e| RepoError::io(&p, e))?;
        }
        Ok(Repository {
            root: path.to_path_buf(),
            config,
        })
    }

    /// Change the codec of new chunks (rewrites `config` atomically under the
    /// exclusive lock). Chunks already stored keep theirs: each records it.
    pub fn set_compression(&mut self, compression: codec::Codec) -> Result<()> {
        let _l = self.lock(
            LockMode::Exclusive,
            "set compression",
            Duration::from_secs(30),
        )?;
        self.config.compression = compression;
        let path = self.root.join("config");
        fsutil::atomic_write(
            &self.tmp_path("config"),
            &path,
            &format::encode_config(&self.config),
        )
        .map_err(|e| RepoError::io(&path, e))
    }

    /// Repository root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Take the repository lock (waits up to `wait`).
    pub fn lock(&self, mode: LockMode, operation: &str, wait: Duration) -> Result<RepoLock> {
        Ok(lock::acquire(&self.lock_path(), mode, operation, wait)?)
    }

    /// Take the shared lock for an operation that writes (backup): refused at
    /// once on read-only media, before any key store is asked anything.
    pub fn lock_for_writing(&self, operation: &str, wait: Duration) -> Result<RepoLock> {
        let l = self.lock(LockMode::Shared, operation, wait)?;
        l.require_writable(&self.lock_path(), operation)?;
        Ok(l)
    }

    fn lock_path(&self) -> PathBuf {
        self.root.join("locks/repo.lock")
    }

    /// A unique path under `tmp/`.
    pub fn tmp_path(&self, prefix: &str) -> PathBuf {
        let mut r = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut r);
        self.root.join("tmp").join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            hex::encode(r)
        ))
    }

    // ------------------------------------------------------------ chunks

    /// Path of a chunk file.
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let h = id.to_hex();
        self.root.join("chunks").join(&h[..2]).join(h)
    }

    /// Read a chunk file (bounded by the format's maximum size).
    pub fn read_chunk(&self, id: &ChunkId, buf: &mut Vec<u8>) -> Result<()> {
        let p = self.chunk_path(id);
        let mut f = File::open(&p).map_err(|e| RepoError::io(&p, e))?;
        let len = f.metadata().map_err(|e| RepoError::io(&p, e))?.len();
        let max = (CHUNK_HEADER_LEN + TAG_LEN) as u64 + format::MAX_CHUNK_SIZE as u64;
        if len > max {
            return Err(RepoError::Damaged {
                path: p,
                source: FormatError::TooLarge {
                    what: "chunk file",
                    len,
                    max,
                },
            });
        }
        buf.clear();
        buf.reserve(len as usize);
        f.read_to_end(buf).map_err(|e| RepoError::io(&p, e))?;
        Ok(())
    }

    /// Key id of an existing chunk, or `None` if the chunk is not stored.
    pub fn chunk_key(&self, id: &ChunkId) -> Result<Option<KeyId>> {
        let p = self.chunk_path(id);
        let mut f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(RepoError::io(&p, e)),
        };
        let len = f.metadata().map_err(|e| RepoError::io(&p, e))?.len();
        let mut h = [0u8; CHUNK_HEADER_LEN];
        let n = read_up_to(&mut f, &mut h).map_err(|e| RepoError::io(&p, e))?;
        let hdr = format::parse_chunk_header(&h[..n], len)
            .map_err(|source| RepoError::Damaged { path: p, source })?;
        Ok(Some(hdr.key_id))
    }

    /// Store a sealed chunk unless a chunk with that id exists. Returns whether it was
    /// written. The data goes into an unnamed file (`O_TMPFILE`) that is linked into
    /// place only when complete, so a crash never leaves a partial chunk under its
    /// final name and leaves no debris either. File systems without `O_TMPFILE` get a
    /// named file under `tmp/` instead.
    pub fn put_chunk(&self, id: &ChunkId, data: &[u8]) -> Result<bool> {
        let dst = self.chunk_path(id);
        let dir = dst.parent().expect("chunk path has a parent");
        let r = match fsutil::link_new_file(dir, &dst, data) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(dir).map_err(|e| RepoError::io(dir, e))?;
                fsutil::link_new_file(dir, &dst, data)
            }
            Err(e) if fsutil::is_unsupported(&e) => {
                let tmp = self.tmp_path("chunk");
                let r = fsutil::write_then_link(&tmp, &dst, data);
                let _ = fs::remove_file(&tmp);
                r
            }
            other => other,
        };
        match r {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(RepoError::io(&dst, e)),
        }
    }

    /// Directory of chunk files `ferry verify --repair` took out of use.
    pub fn damaged_dir(&self) -> PathBuf {
        self.root.join("damaged")
    }

    /// Take a damaged or missing chunk out of use: its file moves to
    /// `damaged/<chunk id>.<data key id>` (`.1`, `.2`... appended rather than
    /// replacing an earlier copy; kept for inspection; an empty file records a
    /// chunk that was missing), so that no backup deduplicates against
    /// it and the next backup that meets the same data stores it again, sealed
    /// with `key` (the data key the indexes name for it), which mends every point
    /// that references it.
    /// Returns false when there was nothing to do (missing, and already recorded).
    pub fn quarantine_chunk(&self, id: &ChunkId, key: KeyId) -> Result<bool> {
        let dir = self.damaged_dir();
        if !dir.exists() {
            fs::create_dir_all(&dir).map_err(|e| RepoError::io(&dir, e))?;
            fsutil::fsync_dir(&self.root).map_err(|e| RepoError::io(&self.root, e))?;
        }
        let src = self.chunk_path(id);
        let base = format!("{}.{key}", id.to_hex());
        if !src.exists() {
            // Missing: one marker is enough (an earlier repair's copy is kept).
            let marker = dir.join(&base);
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&marker)
            {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
                Err(e) => return Err(RepoError::io(&marker, e)),
            }
        } else {
            // Never replace an earlier copy: the first free of BASE, BASE.1, ...
            let dst = (0..)
                .map(|n| match n {
                    0 => dir.join(&base),
                    n => dir.join(format!("{base}.{n}")),
                })
                .find(|p| !p.exists())
                .expect("an unbounded range has a free name");
            fs::rename(&src, &dst).map_err(|e| RepoError::io(&src, e))?;
        }
        for d in [&dir, src.parent().unwrap_or(&self.root)] {
            fsutil::fsync_dir(d).map_err(|e| RepoError::io(d, e))?;
        }
        Ok(true)
    }

    /// Chunks taken out of use by `verify --repair` and not stored again since,
    /// with the data key their index entries name: backups must not reuse them
    /// from a previous index without reading the data.
    pub fn chunks_to_rewrite(&self) -> Result<HashMap<ChunkId, KeyId>> {
        let dir = self.damaged_dir();
        let it = match fs::read_dir(&dir) {
            Ok(it) => it,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashMap::new()),
            Err(e) => return Err(RepoError::io(&dir, e)),
        };
        let mut out = HashMap::new();
        for e in it {
            let e = e.map_err(|e| RepoError::io(&dir, e))?;
            let name = e.file_name();
            // <chunk id>.<key id>[.<n>]
            let Some((id, key)) = name.to_str().and_then(|n| {
                let mut parts = n.split('.');
                let (c, k) = (parts.next()?, parts.next()?);
                Some((ChunkId::from_hex(c)?, KeyId::from_hex(k)?))
            }) else {
                continue;
            };
            if !self.chunk_path(&id).exists() {
                out.insert(id, key);
            }
        }
        Ok(out)
    }

    /// Make every chunk written so far durable (one `syncfs`).
    pub fn sync_all(&self) -> Result<()> {
        fsutil::syncfs(&self.root).map_err(|e| RepoError::io(&self.root, e))
    }

    // ------------------------------------------------------------ points

    /// Directory of a committed point.
    pub fn point_dir(&self, id: &str) -> PathBuf {
        self.root.join("points").join(id)
    }

    /// Ids of all committed points, sorted (oldest first).
    pub fn point_ids(&self) -> Result<Vec<String>> {
        let p = self.root.join("points");
        let mut ids = Vec::new();
        for e in fs::read_dir(&p).map_err(|e| RepoError::io(&p, e))? {
            let e = e.map_err(|e| RepoError::io(&p, e))?;
            if let Some(n) = e.file_name().to_str() {
                if !n.starts_with('.') {
                    ids.push(n.to_string());
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Read a point's manifest bytes and public header.
    pub fn read_manifest(&self, id: &str) -> Result<(Vec<u8>, ManifestHeader, usize)> {
        if id.contains('/') || id.starts_with('.') || id.is_empty() {
            return Err(RepoError::PointNotFound(id.to_string()));
        }
        let p = self.point_dir(id).join("manifest");
        let b = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !self.point_dir(id).exists() => {
                return Err(RepoError::PointNotFound(id.to_string()))
            }
            Err(e) => return Err(RepoError::io(&p, e)),
        };
        let (h, at) = manifest::decode_header(&b).map_err(|source| RepoError::Damaged {
            path: p.clone(),
            source,
        })?;
        if h.point_id != id {
            return Err(RepoError::Damaged {
                path: p,
                source: FormatError::BadField {
                    what: "manifest point id",
                    detail: format!("says {} but lives in {id}", h.point_id),
                },
            });
        }
        Ok((b, h, at))
    }

    /// Every point with its header (or the error reading it).
    pub fn list_points(&self) -> Result<Vec<PointListing>> {
        Ok(self
            .point_ids()?
            .into_iter()
            .map(|id| PointListing {
                header: self.read_manifest(&id).map(|(_, h, _)| h),
                id,
            })
            .collect())
    }

    /// The newest committed point of `source`, if any (damaged manifests skipped).
    pub fn latest_point_of(&self, source: &str) -> Result<Option<ManifestHeader>> {
        Ok(self
            .list_points()?
            .into_iter()
            .rev()
            .filter_map(|p| p.header.ok())
            .find(|h| h.source == source))
    }

    /// The newest point of a backup's chain, its parent: with a VM `identity`,
    /// the newest point of that identity, or, when it has none yet, the newest
    /// point of `name` recorded without an identity (points written before
    /// identities were; the chain continues across the upgrade). Without an
    /// identity (images), the newest point of `name` without one. Points of
    /// another identity never count, whatever their name.
    pub fn chain_head(&self, identity: Option<&str>, name: &str) -> Result<Option<ManifestHeader>> {
        let headers: Vec<ManifestHeader> = self
            .list_points()?
            .into_iter()
            .rev()
            .filter_map(|p| p.header.ok())
            .collect();
        if let Some(id) = identity {
            if let Some(h) = headers.iter().find(|h| h.identity.as_deref() == Some(id)) {
                return Ok(Some(h.clone()));
            }
        }
        Ok(headers
            .into_iter()
            .find(|h| h.identity.is_none() && h.source == name))
    }

    /// A point id, or `latest:<source>` resolved to the newest point of that source.
    pub fn resolve_point(&self, spec: &str) -> Result<String> {
        match spec.strip_prefix("latest:") {
            Some(name) => self
                .latest_point_of(name)?
                .map(|h| h.point_id)
                .ok_or_else(|| RepoError::PointNotFound(spec.to_string())),
            None => Ok(spec.to_string()),
        }
    }

    /// Open a point: its data key from `keyring` when given and holding it, else
    /// unwrapped with `keys` by the tenant key that wrapped it, else (key-loss
    /// protection) by the provider's recovery key when `keys` holds that.
    pub fn open_point(
        &self,
        id: &str,
        keys: &dyn KeySource,
        keyring: Option<&Keyring>,
    ) -> Result<OpenPoint> {
        let (b, header, at) = self.read_manifest(id)?;
        let from_keyring = keyring.and_then(|k| k.key(header.data_key_id)).cloned();
        let dk = match from_keyring {
            Some(k) => k,
            None => match self.point_key_via(&header, keys, None, KeyPath::OwnKey) {
                Ok(k) => k,
                Err(own) => match &header.recovery_wrapped_key {
                    Some(r) if keys.holds(&r.key_ref) => {
                        tracing::info!(point = %id, error = %own, "the tenant key does not open this point; trying the provider's recovery key");
                        self.point_key_via(&header, keys, None, KeyPath::RecoveryKey)?
                    }
                    _ => return Err(own),
                },
            },
        };
        self.open_manifest(id, b, header, at, &dk)
    }

    /// Open a point through exactly one key path (for the disaster-recovery
    /// report, which says every way a point opens).
    pub fn open_point_via(
        &self,
        id: &str,
        keys: &dyn KeySource,
        keyring: Option<&Keyring>,
        via: KeyPath,
    ) -> Result<OpenPoint> {
        let (b, header, at) = self.read_manifest(id)?;
        let dk = self.point_key_via(&header, keys, keyring, via)?;
        self.open_manifest(id, b, header, at, &dk)
    }

    /// A point's data key through one path. `Keyring` needs `keyring`; a path the
    /// point does not have (no recovery wrap) is a [`KeyError::WrongKey`].
    fn point_key_via(
        &self,
        header: &ManifestHeader,
        keys: &dyn KeySource,
        keyring: Option<&Keyring>,
        via: KeyPath,
    ) -> Result<SecretKey> {
        let id = &header.point_id;
        let wrapped = match via {
            KeyPath::Keyring => {
                return keyring
                    .and_then(|k| k.key(header.data_key_id))
                    .cloned()
                    .ok_or_else(|| {
                        RepoError::Key(KeyError::CannotUnwrap {
                            source_name: "keyring".into(),
                            why: format!(
                                "the keyring is not open or does not hold data key {}",
                                header.data_key_id
                            ),
                        })
                    })
            }
            KeyPath::OwnKey => &header.wrapped_key,
            KeyPath::RecoveryKey => header.recovery_wrapped_key.as_ref().ok_or_else(|| {
                RepoError::Key(KeyError::CannotUnwrap {
                    source_name: "recovery key".into(),
                    why: format!("point {id} was made without key-loss protection"),
                })
            })?,
        };
        unwrap_secret(keys, wrapped, header.data_key_id).map_err(|e| match e {
            KeyError::UnwrapFailed { .. } => RepoError::Damaged {
                path: self.point_dir(id).join("manifest"),
                source: FormatError::AuthFailed {
                    what: "manifest wrapped data key",
                },
            },
            other => RepoError::Key(other),
        })
    }

    fn open_manifest(
        &self,
        id: &str,
        b: Vec<u8>,
        header: ManifestHeader,
        at: usize,
        dk: &SecretKey,
    ) -> Result<OpenPoint> {
        let opened = manifest::open_body(&b, at, dk).map_err(|source| RepoError::Damaged {
            path: self.point_dir(id).join("manifest"),
            source,
        })?;
        Ok(OpenPoint {
            header,
            body: opened.body,
            keys: opened.keys,
            id_key: opened.id_key,
        })
    }

    /// Open a disk index of an opened point after checking its hash against the
    /// authenticated manifest; the returned reader yields authenticated entries.
    pub fn open_index(&self, point: &OpenPoint, disk: u32) -> Result<IndexReader<BufReader<File>>> {
        let rec = point
            .body
            .disks
            .iter()
            .find(|d| d.disk == disk)
            .ok_or_else(|| RepoError::DiskNotFound {
                point: point.header.point_id.clone(),
                disk,
            })?;
        if rec.index.contains('/') {
            return Err(RepoError::Invalid(format!(
                "bad index name {:?}",
                rec.index
            )));
        }
        let p = self.point_dir(&point.header.point_id).join(&rec.index);
        let open = || -> Result<(BufReader<File>, u64)> {
            let f = File::open(&p).map_err(|e| RepoError::io(&p, e))?;
            let len = f.metadata().map_err(|e| RepoError::io(&p, e))?.len();
            Ok((BufReader::with_capacity(1 << 20, f), len))
        };
        let damaged = |source| RepoError::Damaged {
            path: p.clone(),
            source,
        };
        let (r, len) = open()?;
        let (h, hash) = format::verify_index(r, len).map_err(|e| match e {
            format::IndexReadError::Io(e) => RepoError::io(&p, e),
            format::IndexReadError::Format(f) => damaged(f),
        })?;
        if hex::encode(hash) != rec.index_blake3 {
            return Err(damaged(FormatError::AuthFailed {
                what: "index (hash differs from the manifest)",
            }));
        }
        if h.point_id != point.header.point_id
            || h.disk != disk
            || h.disk_size != rec.size
            || h.chunk_size != point.body.chunk_size
        {
            return Err(damaged(FormatError::BadField {
                what: "index header",
                detail: "does not match the manifest".into(),
            }));
        }
        let (r, len) = open()?;
        IndexReader::new(r, len).map_err(|e| match e {
            format::IndexReadError::Io(e) => RepoError::io(&p, e),
            format::IndexReadError::Format(f) => damaged(f),
        })
    }

    // ------------------------------------------------------------ keyring

    fn keyring_path(&self) -> PathBuf {
        self.root.join("keyring")
    }

    /// Whether a keyring file exists.
    pub fn has_keyring(&self) -> bool {
        self.keyring_path().exists()
    }

    /// The keyring's public header (which tenant key wraps it, generation), without
    /// unwrapping anything.
    pub fn keyring_header(&self) -> Result<KeyringHeader> {
        let p = self.keyring_path();
        let b = fs::read(&p).map_err(|e| RepoError::io(&p, e))?;
        keyring::decode_header(&b)
            .map(|(h, _)| h)
            .map_err(|source| RepoError::Damaged { path: p, source })
    }

    /// Read and open the keyring with `keys`.
    pub fn load_keyring(&self, keys: &dyn KeySource) -> Result<Keyring> {
        let p = self.keyring_path();
        let b = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(RepoError::Invalid(format!(
                    "the keyring {} is missing: backups need it (it holds the repository id-key); restore it from a copy of the repository. Restores and verify still work with each point's own key",
                    p.display()
                )))
            }
            Err(e) => return Err(RepoError::io(&p, e)),
        };
        let damaged = |source| RepoError::Damaged {
            path: p.clone(),
            source,
        };
        let (header, at) = keyring::decode_header(&b).map_err(damaged)?;
        let kk =
            unwrap_secret(keys, &header.wrapped_key, header.keyring_key_id).map_err(
                |e| match e {
                    KeyError::UnwrapFailed { .. } => damaged(FormatError::AuthFailed {
                        what: "keyring wrapped key",
                    }),
                    other => RepoError::Key(other),
                },
            )?;
        let opened = keyring::open_body(&b, at, &kk).map_err(damaged)?;
        Ok(Keyring {
            header,
            body: opened.body,
            keys: opened.keys,
            id_key: opened.id_key,
        })
    }

    fn write_keyring(
        &self,
        keys: &dyn KeySource,
        generation: u64,
        body: &KeyringBody,
        data_keys: &[SecretKey],
        id_key: &SecretKey,
        recovery: Option<RecoveryKey>,
    ) -> Result<KeyringHeader> {
        let kk = SecretKey::generate();
        let header = KeyringHeader {
            generation,
            updated: now_rfc3339(),
            keyring_key_id: kk.id,
            wrapped_key: keys.wrap(kk.expose())?,
            recovery,
        };
        let bytes = keyring::encode(&header, body, data_keys, id_key, &kk);
        let p = self.keyring_path();
        fsutil::atomic_write(&self.tmp_path("keyring"), &p, &bytes)
            .map_err(|e| RepoError::io(&p, e))?;
        Ok(header)
    }

    /// Read-modify-write the keyring under its own lock, re-wrapping it with the
    /// current tenant key. Returns the keyring as written.
    pub fn update_keyring(
        &self,
        keys: &dyn KeySource,
        f: impl FnOnce(&mut Keyring) -> Result<()>,
    ) -> Result<Keyring> {
        let _l = lock::acquire(
            &self.root.join("locks/keyring.lock"),
            LockMode::Exclusive,
            "keyring update",
            Duration::from_secs(60),
        )?;
        let mut kr = self.load_keyring(keys)?;
        f(&mut kr)?;
        kr.header = self.write_keyring(
            keys,
            kr.header.generation + 1,
            &kr.body,
            &kr.keys,
            &kr.id_key,
            kr.header.recovery.clone(),
        )?;
        Ok(kr)
    }

    /// Turn key-loss protection on with `recovery`, or off with `None`. New
    /// points only: existing points keep what their manifest records. Refuses a
    /// recovery key that is the tenant's own current key.
    pub fn set_recovery(
        &self,
        keys: &dyn KeySource,
        recovery: Option<RecoveryKey>,
    ) -> Result<Keyring> {
        if let Some(r) = &recovery {
            if let Some(why) = crate::keys::recovery::shared_with_tenant(r, &keys.current_key()?) {
                return Err(RepoError::Invalid(format!(
                    "{why}; use a key pair the provider keeps apart from the tenant's KMS"
                )));
            }
        }
        self.update_keyring(keys, |kr| {
            kr.header.recovery = recovery;
            Ok(())
        })
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Header of an index file, for callers that only need sizes.
pub fn index_header_of(point: &OpenPoint, disk: u32) -> Option<IndexHeader> {
    point
        .body
        .disks
        .iter()
        .find(|d| d.disk == disk)
        .map(|d| IndexHeader {
            point_id: point.header.point_id.clone(),
            disk,
            chunk_size: point.body.chunk_size,
            disk_size: d.size,
        })
}
