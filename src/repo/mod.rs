//! The repository: one directory per tenant holding chunks, restore points and the
//! keyring, in the format of `docs/format.md`.
//!
//! Owns paths, locking, atomic commits and reading/writing every repository file.
//! It does not decide *what* to back up (see [`crate::job`]) and never sees plaintext
//! keys outside zeroizing types.

pub mod backend;
pub mod codec;
pub mod copy;
pub mod format;
pub mod fsutil;
pub mod gc;
pub mod keycheck;
pub mod keyring;
pub mod lock;
pub mod manifest;
pub mod retention;
pub mod usage;
pub mod verify;

use crate::keys::{unwrap_secret, KeyError, KeyId, KeySource, RecoveryKey, SecretKey};
use backend::Backend;
use format::{
    ChunkId, FormatError, IndexHeader, IndexReader, RepoConfig, CHUNK_HEADER_LEN, TAG_LEN,
};
use keyring::{Keyring, KeyringBody, KeyringHeader};
use lock::{LockError, LockMode, RepoLock};
use manifest::{ManifestBody, ManifestHeader};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader};
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
    /// The object store failed or refused a request (after its retries).
    #[error("{object}: {detail}")]
    Remote {
        /// Object (an `s3://` URL).
        object: String,
        /// What went wrong and, where known, what to do.
        detail: String,
    },
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
    store: Box<dyn Backend>,
    /// Its configuration.
    pub config: RepoConfig,
}

/// Largest `config` or `keyring` file read (both are small; a huge one is damage).
const MAX_SMALL_FILE: u64 = 64 << 20;
/// Largest manifest read.
const MAX_MANIFEST: u64 = 256 << 20;

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
        Self::init_in(
            backend::connect(path)?,
            chunk_size,
            tenant,
            keys,
            compression,
            None,
        )
    }

    /// [`Repository::init_with`] in an explicit backend, with immutable
    /// restore points when `immutability` is given (S3 Object Lock).
    pub fn init_in(
        store: Box<dyn Backend>,
        chunk_size: u32,
        tenant: &str,
        keys: &dyn KeySource,
        compression: codec::Codec,
        immutability: Option<format::Immutability>,
    ) -> Result<Self> {
        format::validate_chunk_size(chunk_size).map_err(|e| RepoError::Invalid(e.to_string()))?;
        if immutability.is_some() {
            store.check_object_lock()?;
        }
        if !store.is_empty()? {
            return Err(RepoError::AlreadyExists(store.location("")));
        }
        store.prepare()?;
        let mut rid = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut rid);
        let config = RepoConfig {
            repo_id: hex::encode(rid),
            chunk_size,
            created: now_rfc3339(),
            tenant: tenant.to_string(),
            compression,
            immutability,
        };
        let repo = Repository { store, config };
        let id_key = SecretKey::generate();
        repo.write_keyring(keys, 0, &KeyringBody::default(), &[], &id_key, None)?;
        // The config last: a location holding one is a repository.
        repo.store
            .replace("config", &format::encode_config(&repo.config))?;
        repo.store.sync()?;
        Ok(repo)
    }

    /// Open an existing repository: a directory, or `s3://BUCKET/PREFIX` with
    /// the S3 settings of the environment.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_in(backend::connect(path)?)
    }

    /// Open the repository held by `store`.
    pub fn open_in(store: Box<dyn Backend>) -> Result<Self> {
        let Some(b) = store.read("config", MAX_SMALL_FILE)? else {
            // A listing tells a missing bucket from an empty prefix.
            store.is_empty()?;
            return Err(RepoError::NotARepository(store.location("")));
        };
        let config = format::decode_config(&b).map_err(|source| RepoError::Damaged {
            path: store.location("config"),
            source,
        })?;
        store.prepare()?;
        Ok(Repository { store, config })
    }

    /// The storage backend.
    pub fn backend(&self) -> &dyn Backend {
        &*self.store
    }

    /// Change the codec of new chunks (rewrites `config` atomically under the
    /// exclusive lock). Chunks already stored keep theirs: each records it.
    pub fn set_compression(&mut self, compression: codec::Codec) -> Result<()> {
        self.update_config("set compression", |c| c.compression = compression)
    }

    /// Change `config` with `f` and rewrite it, under the exclusive lock.
    fn update_config(&mut self, operation: &str, f: impl FnOnce(&mut RepoConfig)) -> Result<()> {
        let _l = self.lock(LockMode::Exclusive, operation, Duration::from_secs(30))?;
        f(&mut self.config);
        self.store
            .replace("config", &format::encode_config(&self.config))
    }

    /// Where the repository is, for messages: its directory or `s3://` URL.
    pub fn root(&self) -> PathBuf {
        self.store.location("")
    }

    /// Take the repository lock (waits up to `wait`).
    pub fn lock(&self, mode: LockMode, operation: &str, wait: Duration) -> Result<RepoLock> {
        self.store.lock("repo", mode, operation, wait)
    }

    /// Take the shared lock for an operation that writes (backup): refused at
    /// once on read-only media, before any key store is asked anything.
    pub fn lock_for_writing(&self, operation: &str, wait: Duration) -> Result<RepoLock> {
        let l = self.lock(LockMode::Shared, operation, wait)?;
        l.require_writable(&self.store.location("locks/repo.lock"), operation)?;
        Ok(l)
    }

    // ------------------------------------------------------------ chunks

    /// Where a chunk is stored (a file path, or an `s3://` URL).
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        self.store.location(&backend::chunk_key(&id.to_hex()))
    }

    /// Read a chunk (bounded by the format's maximum size).
    pub fn read_chunk(&self, id: &ChunkId, buf: &mut Vec<u8>) -> Result<()> {
        let key = backend::chunk_key(&id.to_hex());
        let max = (CHUNK_HEADER_LEN + TAG_LEN) as u64 + format::MAX_CHUNK_SIZE as u64;
        match self.store.read(&key, max) {
            Ok(Some(b)) => {
                *buf = b;
                Ok(())
            }
            Ok(None) => Err(RepoError::io(
                self.store.location(&key),
                io::Error::from(io::ErrorKind::NotFound),
            )),
            Err(RepoError::Damaged { path, source }) => Err(RepoError::Damaged {
                path,
                source: match source {
                    FormatError::TooLarge { len, max, .. } => FormatError::TooLarge {
                        what: "chunk file",
                        len,
                        max,
                    },
                    other => other,
                },
            }),
            Err(e) => Err(e),
        }
    }

    /// Key id of an existing chunk, or `None` if the chunk is not stored.
    pub fn chunk_key(&self, id: &ChunkId) -> Result<Option<KeyId>> {
        let key = backend::chunk_key(&id.to_hex());
        let Some((h, len)) = self.store.read_head(&key, CHUNK_HEADER_LEN)? else {
            return Ok(None);
        };
        let hdr = format::parse_chunk_header(&h, len).map_err(|source| RepoError::Damaged {
            path: self.store.location(&key),
            source,
        })?;
        Ok(Some(hdr.key_id))
    }

    /// Store a sealed chunk unless a chunk with that id exists. Returns whether it was
    /// written. A chunk is never visible half-written (see [`Backend::create`]).
    pub fn put_chunk(&self, id: &ChunkId, data: &[u8]) -> Result<bool> {
        self.store.create(&backend::chunk_key(&id.to_hex()), data)
    }

    /// Where chunk files `ferry verify --repair` took out of use go.
    pub fn damaged_dir(&self) -> PathBuf {
        self.store.location("damaged")
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
        let src = backend::chunk_key(&id.to_hex());
        let base = format!("damaged/{}.{key}", id.to_hex());
        if !self.store.exists(&src)? {
            // Missing: one marker is enough (an earlier repair's copy is kept).
            let written = self.store.create(&base, b"")?;
            self.store.sync()?;
            return Ok(written);
        }
        // Never replace an earlier copy: the first free of BASE, BASE.1, ...
        let mut n = 0u32;
        let dst = loop {
            let k = match n {
                0 => base.clone(),
                n => format!("{base}.{n}"),
            };
            if !self.store.exists(&k)? {
                break k;
            }
            n += 1;
        };
        self.store.rename(&src, &dst)?;
        Ok(true)
    }

    /// Chunks taken out of use by `verify --repair` and not stored again since,
    /// with the data key their index entries name: backups must not reuse them
    /// from a previous index without reading the data.
    pub fn chunks_to_rewrite(&self) -> Result<HashMap<ChunkId, KeyId>> {
        let mut out = HashMap::new();
        for o in self.store.list("damaged/")? {
            let name = o.key.strip_prefix("damaged/").unwrap_or(&o.key);
            // <chunk id>.<key id>[.<n>]
            let Some((id, key)) = Some(name).and_then(|n| {
                let mut parts = n.split('.');
                let (c, k) = (parts.next()?, parts.next()?);
                Some((ChunkId::from_hex(c)?, KeyId::from_hex(k)?))
            }) else {
                continue;
            };
            if !self.store.exists(&backend::chunk_key(&id.to_hex()))? {
                out.insert(id, key);
            }
        }
        Ok(out)
    }

    /// How many chunks are stored and their total size in bytes.
    pub fn chunk_usage(&self) -> Result<(u64, u64)> {
        let l = self.store.list("chunks/")?;
        Ok((l.len() as u64, l.iter().map(|o| o.size).sum()))
    }

    /// Make every chunk written so far durable (local: one `syncfs`).
    pub fn sync_all(&self) -> Result<()> {
        self.store.sync()
    }

    // ------------------------------------------------------------ points

    /// Where a committed point's files are (a directory, or an `s3://` URL).
    pub fn point_dir(&self, id: &str) -> PathBuf {
        self.store.location(&format!("points/{id}"))
    }

    /// Ids of all committed points (those with a manifest), sorted (oldest first).
    pub fn point_ids(&self) -> Result<Vec<String>> {
        Ok(backend::committed_points(&self.store.list("points/")?))
    }

    /// The files of committed point `id` other than its manifest (its indexes).
    pub fn point_files(&self, id: &str) -> Result<Vec<String>> {
        let prefix = format!("points/{id}/");
        Ok(files_by_point(self.store.list(&prefix)?)
            .remove(id)
            .unwrap_or_default())
    }

    /// Every committed point with its files other than the manifest, from one
    /// listing (prune reads every index: one request, not one per point).
    pub fn points_with_files(&self) -> Result<std::collections::BTreeMap<String, Vec<String>>> {
        let listing = self.store.list("points/")?;
        let committed: std::collections::HashSet<String> =
            backend::committed_points(&listing).into_iter().collect();
        let mut all = files_by_point(listing);
        all.retain(|id, _| committed.contains(id));
        Ok(all)
    }

    /// Start writing point `id`, its files retained by `retention` (see
    /// [`Backend::stage_point`]).
    pub fn stage_point(
        &self,
        id: &str,
        retention: Option<backend::Retention>,
    ) -> Result<Box<dyn backend::PointStage + '_>> {
        self.store.stage_point(id, retention)
    }

    /// The retention a point made at `now` (Unix seconds) gets under the
    /// repository's immutability setting, if it has one.
    pub fn point_retention(&self, now: i64) -> Option<backend::Retention> {
        self.config.immutability.map(|i| backend::Retention {
            mode: i.mode,
            until: backend::retention_until(now, i.days),
        })
    }

    /// Turn immutable restore points on (or change them) for new points, or
    /// off with `None`; the store must support it (S3 Object Lock).
    pub fn set_immutability(&mut self, im: Option<format::Immutability>) -> Result<()> {
        if im.is_some() {
            self.store.check_object_lock()?;
        }
        self.update_config("set immutability", |c| c.immutability = im)
    }

    /// [`Repository::put_chunk`] with a retention on the new chunk.
    pub fn put_chunk_retained(
        &self,
        id: &ChunkId,
        data: &[u8],
        r: &backend::Retention,
    ) -> Result<bool> {
        self.store
            .create_retained(&backend::chunk_key(&id.to_hex()), data, r)
    }

    /// Extend a stored chunk's retention to at least `r`.
    pub fn extend_chunk_retention(&self, id: &ChunkId, r: &backend::Retention) -> Result<()> {
        self.store
            .extend_retention(&backend::chunk_key(&id.to_hex()), r)
    }

    /// Remove committed point `id` (manifest first). Needs the exclusive lock.
    pub fn remove_point(&self, id: &str) -> Result<()> {
        self.store.remove_point(id)
    }

    /// Open a point's file (an index) for sequential reading, with its size.
    pub fn open_point_file(&self, id: &str, name: &str) -> Result<(File, u64)> {
        let key = backend::point_key(id, name);
        self.store.open(&key)?.ok_or_else(|| {
            RepoError::io(
                self.store.location(&key),
                io::Error::from(io::ErrorKind::NotFound),
            )
        })
    }

    /// Read a point's manifest bytes and public header. For a point copied here
    /// by `ferry repo copy`, the header's `immutable` is this repository's own
    /// record (see [`copy::read_retention_record`]), not the source's.
    pub fn read_manifest(&self, id: &str) -> Result<(Vec<u8>, ManifestHeader, usize)> {
        self.read_manifest_as(id, None)
    }

    /// [`Repository::read_manifest`]; `copied`: whether the point has a copy's
    /// retention record (known from a listing), `None`: look.
    fn read_manifest_as(
        &self,
        id: &str,
        copied: Option<bool>,
    ) -> Result<(Vec<u8>, ManifestHeader, usize)> {
        if id.contains('/') || id.starts_with('.') || id.is_empty() {
            return Err(RepoError::PointNotFound(id.to_string()));
        }
        let key = backend::point_key(id, "manifest");
        let p = self.store.location(&key);
        let Some(b) = self.store.read(&key, MAX_MANIFEST)? else {
            return Err(RepoError::PointNotFound(id.to_string()));
        };
        let (mut h, at) = manifest::decode_header(&b).map_err(|source| RepoError::Damaged {
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
        if copied != Some(false) {
            if let Some(here) = copy::read_retention_record(self.store.as_ref(), id)? {
                h.immutable = here;
            }
        }
        Ok((b, h, at))
    }

    /// Every point with its header (or the error reading it).
    pub fn list_points(&self) -> Result<Vec<PointListing>> {
        let listing = self.store.list("points/")?;
        let copied = copy::points_with_record(&listing);
        Ok(backend::committed_points(&listing)
            .into_iter()
            .map(|id| PointListing {
                header: self
                    .read_manifest_as(&id, Some(copied.contains(&id)))
                    .map(|(_, h, _)| h),
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
        let p = self
            .store
            .location(&backend::point_key(&point.header.point_id, &rec.index));
        // One open (one download from object storage), read twice: the whole
        // file is checked against the manifest before any entry is trusted.
        let (mut f, len) = self.open_point_file(&point.header.point_id, &rec.index)?;
        let damaged = |source| RepoError::Damaged {
            path: p.clone(),
            source,
        };
        let r = BufReader::with_capacity(1 << 20, f.try_clone().map_err(|e| RepoError::io(&p, e))?);
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
        std::io::Seek::rewind(&mut f).map_err(|e| RepoError::io(&p, e))?;
        IndexReader::new(BufReader::with_capacity(1 << 20, f), len).map_err(|e| match e {
            format::IndexReadError::Io(e) => RepoError::io(&p, e),
            format::IndexReadError::Format(f) => damaged(f),
        })
    }

    // ------------------------------------------------------------ keyring

    fn keyring_path(&self) -> PathBuf {
        self.store.location("keyring")
    }

    /// Whether a keyring file exists.
    pub fn has_keyring(&self) -> bool {
        self.store.exists("keyring").unwrap_or(false)
    }

    fn read_keyring_bytes(&self) -> Result<Option<Vec<u8>>> {
        self.store.read("keyring", MAX_SMALL_FILE)
    }

    /// The keyring's public header (which tenant key wraps it, generation), without
    /// unwrapping anything.
    pub fn keyring_header(&self) -> Result<KeyringHeader> {
        let p = self.keyring_path();
        let b = self
            .read_keyring_bytes()?
            .ok_or_else(|| RepoError::io(&p, io::Error::from(io::ErrorKind::NotFound)))?;
        keyring::decode_header(&b)
            .map(|(h, _)| h)
            .map_err(|source| RepoError::Damaged { path: p, source })
    }

    /// Read and open the keyring with `keys`.
    pub fn load_keyring(&self, keys: &dyn KeySource) -> Result<Keyring> {
        let p = self.keyring_path();
        let Some(b) = self.read_keyring_bytes()? else {
            return Err(RepoError::Invalid(format!(
                "the keyring {} is missing: backups need it (it holds the repository id-key); restore it from a copy of the repository. Restores and verify still work with each point's own key",
                p.display()
            )));
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
        self.store.replace("keyring", &bytes)?;
        Ok(header)
    }

    /// Read-modify-write the keyring under its own lock, re-wrapping it with the
    /// current tenant key. Returns the keyring as written.
    pub fn update_keyring(
        &self,
        keys: &dyn KeySource,
        f: impl FnOnce(&mut Keyring) -> Result<()>,
    ) -> Result<Keyring> {
        let _l = self.store.lock(
            "keyring",
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

/// Group a listing of `points/` by point id: each point's file names other
/// than `manifest`, sorted.
fn files_by_point(
    listing: Vec<backend::ObjectInfo>,
) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for o in listing {
        let Some((id, name)) = o
            .key
            .strip_prefix("points/")
            .and_then(|r| r.split_once('/'))
        else {
            continue;
        };
        let files = out.entry(id.to_string()).or_default();
        if name != "manifest" {
            files.push(name.to_string());
        }
    }
    for f in out.values_mut() {
        f.sort();
    }
    out
}

/// Read every entry of an index file without keys (its own checksums are
/// verified, its hash against a manifest is not): how prune and copy learn
/// which chunks a point references. `path` names the file in errors.
pub fn scan_index(
    path: &Path,
    f: File,
    len: u64,
    mut visit: impl FnMut(&format::IndexEntry),
) -> Result<()> {
    let err = |e| match e {
        format::IndexReadError::Io(e) => RepoError::io(path, e),
        format::IndexReadError::Format(source) => RepoError::Damaged {
            path: path.to_path_buf(),
            source,
        },
    };
    let mut r = IndexReader::new(BufReader::with_capacity(1 << 20, f), len).map_err(err)?;
    while let Some(e) = r.next_entry().map_err(err)? {
        visit(&e);
    }
    r.finish().map(|_| ()).map_err(err)
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
