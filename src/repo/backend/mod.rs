//! The storage seam under the repository: where its files live. A repository is a
//! set of named objects (`config`, `keyring`, `chunks/ab/<id>`, `points/<id>/...`)
//! in a local directory ([`local::LocalDir`], the format's original home) or in
//! an S3-compatible bucket ([`s3::S3Store`]).
//!
//! Owns object reads and writes, the repository lock and the commit of a restore
//! point (its files first, its manifest last: a point exists once its manifest
//! does). It knows nothing of the format: what the bytes mean belongs to
//! [`crate::repo`], and must not creep in here.

pub mod local;
pub mod object_lock;
pub mod s3;
mod s3_http;

use super::lock::{LockMode, RepoLock};
use super::{RepoError, Result};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Object Lock retention mode (S3 terms): under `governance` an identity
/// with `s3:BypassGovernanceRetention` can still shorten or remove it; under
/// `compliance` nobody can until the date passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetentionMode {
    /// Removable by a privileged identity.
    Governance,
    /// Removable by nobody.
    Compliance,
}

impl RetentionMode {
    /// The S3 header value.
    pub fn s3_name(self) -> &'static str {
        match self {
            RetentionMode::Governance => "GOVERNANCE",
            RetentionMode::Compliance => "COMPLIANCE",
        }
    }
}

impl std::fmt::Display for RetentionMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RetentionMode::Governance => "governance",
            RetentionMode::Compliance => "compliance",
        })
    }
}

impl std::str::FromStr for RetentionMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "governance" => Ok(RetentionMode::Governance),
            "compliance" => Ok(RetentionMode::Compliance),
            other => Err(format!("{other}: use governance or compliance")),
        }
    }
}

/// An object's retention: kept unchanged and undeletable until `until`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Retention {
    /// Mode.
    pub mode: RetentionMode,
    /// Unix seconds (UTC).
    pub until: i64,
}

/// Length of a retention generation: retention dates are rounded up to a
/// multiple of it, so that consecutive backups share one date and an
/// incremental need not extend the lock of every chunk it reuses.
pub const RETENTION_GENERATION_SECS: i64 = 7 * 86_400;

/// The retention date of a point made at `now` (Unix seconds) that must stay
/// immutable for at least `days`: `now + days`, rounded up to the next
/// generation boundary (so at most 7 days more than asked).
pub fn retention_until(now: i64, days: u32) -> i64 {
    let at_least = now + days as i64 * 86_400;
    let g = RETENTION_GENERATION_SECS;
    (at_least + g - 1).div_euclid(g) * g
}

/// Unix seconds as RFC 3339 (UTC), for reports.
pub fn format_unix(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

/// One stored object as a listing shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the repository root, `/`-separated (`chunks/ab/ab12...`).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// When the store last wrote it (Unix seconds, on the store's clock).
    pub modified: Option<i64>,
}

/// Where a repository's files live. Every implementation passes the same
/// contract tests (`tests/backend_contract.rs`).
pub trait Backend: Send + Sync {
    /// One line for operators: kind and place (`local directory /srv/repo`,
    /// `S3 bucket b, prefix p, at https://...`).
    fn describe(&self) -> String;
    /// Short kind name for reports: `local` or `s3`.
    fn kind(&self) -> &'static str;
    /// Where `key` lives, for error messages: a path, or an `s3://` URL.
    fn location(&self, key: &str) -> PathBuf;

    /// Whether the repository location holds nothing yet (init refuses otherwise).
    fn is_empty(&self) -> Result<bool>;
    /// Create whatever a new or opened repository needs (directories).
    fn prepare(&self) -> Result<()>;

    /// An object's bytes, or `None` when it does not exist. Refuses an object
    /// larger than `max` without reading it.
    fn read(&self, key: &str, max: u64) -> Result<Option<Vec<u8>>>;
    /// Up to the first `n` bytes of an object and its whole size, or `None`.
    fn read_head(&self, key: &str, n: usize) -> Result<Option<(Vec<u8>, u64)>>;
    /// A large object as a local file to read sequentially (the file itself, or
    /// an unnamed temporary copy downloaded with bounded memory), with its size.
    fn open(&self, key: &str) -> Result<Option<(File, u64)>>;
    /// Whether an object exists.
    fn exists(&self, key: &str) -> Result<bool>;

    /// Store a new object; never replaces one: returns false (and writes
    /// nothing) when `key` exists. The object is never visible half-written.
    fn create(&self, key: &str, data: &[u8]) -> Result<bool>;
    /// Store an object, atomically replacing any earlier one (config, keyring).
    fn replace(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Move an object to a key that does not exist (quarantine).
    fn rename(&self, from: &str, to: &str) -> Result<()>;
    /// Delete an object; an absent one is not an error.
    fn delete(&self, key: &str) -> Result<()>;
    /// Every object whose key starts with `prefix` (a directory-like prefix
    /// ending in `/`), in no particular order.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    /// Make everything written so far durable (local: `syncfs`; object stores
    /// acknowledge a write only once it is durable).
    fn sync(&self) -> Result<()>;

    /// Whether objects can be kept immutable here (S3 Object Lock on the
    /// bucket): `Ok` or an error that says why not and what to do.
    fn check_object_lock(&self) -> Result<()> {
        Err(RepoError::Invalid(format!(
            "{}: immutable restore points need S3 Object Lock; a local directory cannot enforce them (use a bucket with Object Lock, or WORM storage underneath without --immutable-days)",
            self.describe()
        )))
    }
    /// [`Backend::create`] with a retention on the new object.
    fn create_retained(&self, key: &str, data: &[u8], retention: &Retention) -> Result<bool> {
        let _ = (key, data, retention);
        self.check_object_lock().map(|_| false)
    }
    /// Extend an existing object's retention to `retention` (never shortens it).
    fn extend_retention(&self, key: &str, retention: &Retention) -> Result<()> {
        let _ = (key, retention);
        self.check_object_lock()
    }
    /// An object's retention, `None` when it has none (or does not exist).
    fn retention(&self, key: &str) -> Result<Option<Retention>> {
        let _ = key;
        Ok(None)
    }

    /// The fewest pipeline workers backups and restores should use here: each
    /// worker has one request in flight at a time (0: no minimum, cores decide).
    fn min_workers(&self) -> usize {
        0
    }

    /// Take the lock `name` (`repo`, `keyring`) in `mode`, waiting up to `wait`.
    fn lock(&self, name: &str, mode: LockMode, operation: &str, wait: Duration)
        -> Result<RepoLock>;

    /// Start writing restore point `id`: its files go in first, its manifest
    /// last, each with `retention` when given. Dropping the stage without
    /// committing removes what it wrote (what retention allows).
    fn stage_point(
        &self,
        id: &str,
        retention: Option<Retention>,
    ) -> Result<Box<dyn PointStage + '_>>;
    /// Remove a committed point: its manifest first (from then on the point
    /// does not exist), then its other files. Needs the exclusive lock.
    fn remove_point(&self, id: &str) -> Result<()>;
    /// Remove what interrupted writers left behind (staging files, uncommitted
    /// point files). Needs the exclusive lock.
    fn collect_debris(&self) -> Result<()>;
}

/// A restore point being written. See [`Backend::stage_point`].
pub trait PointStage {
    /// A file to write the point file `name` into (an index).
    fn create_file(&mut self, name: &str) -> Result<File>;
    /// `file`, written in full, becomes the point's file `name`.
    fn finish_file(&mut self, name: &str, file: File) -> Result<()>;
    /// Write the manifest and make the point visible. Everything the point
    /// references (chunks, its files) must be durable before this is called.
    fn commit(self: Box<Self>, manifest: &[u8]) -> Result<()>;
}

/// A repository location as an operator writes it: a directory path, or
/// `s3://BUCKET[/PREFIX]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A local directory.
    Local(PathBuf),
    /// A bucket and a key prefix (no leading or trailing `/`, maybe empty).
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix inside the bucket.
        prefix: String,
    },
}

impl Location {
    /// Parse a repository location.
    pub fn parse(path: &Path) -> Result<Location> {
        let Some(s) = path.to_str() else {
            return Ok(Location::Local(path.to_path_buf()));
        };
        let Some(rest) = s.strip_prefix("s3://") else {
            if s.contains("://") {
                return Err(RepoError::Invalid(format!(
                    "repository location {s}: only local paths and s3://BUCKET/PREFIX are supported"
                )));
            }
            return Ok(Location::Local(path.to_path_buf()));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/').to_string();
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid_bucket {
            return Err(RepoError::Invalid(format!(
                "repository location {s}: {bucket:?} is not a valid S3 bucket name (3 to 63 lower-case letters, digits, '-' or '.')"
            )));
        }
        if !prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
        {
            return Err(RepoError::Invalid(format!(
                "repository location {s}: the prefix may hold letters, digits, '-', '_', '.' and '/' only"
            )));
        }
        if prefix
            .split('/')
            .any(|c| c.is_empty() && !prefix.is_empty() || c == "." || c == "..")
        {
            return Err(RepoError::Invalid(format!(
                "repository location {s}: the prefix must not hold empty, '.' or '..' components"
            )));
        }
        Ok(Location::S3 {
            bucket: bucket.to_string(),
            prefix,
        })
    }
}

/// Open the backend for `path` (a directory or `s3://...`); S3 settings come
/// from the environment ([`s3::S3Settings::from_env`]).
pub fn connect(path: &Path) -> Result<Box<dyn Backend>> {
    match Location::parse(path)? {
        Location::Local(p) => Ok(Box::new(local::LocalDir::new(p))),
        Location::S3 { bucket, prefix } => Ok(Box::new(s3::S3Store::connect(
            &bucket,
            &prefix,
            &s3::S3Settings::from_env()?,
        )?)),
    }
}

/// Key of a chunk object.
pub fn chunk_key(hex: &str) -> String {
    format!("chunks/{}/{hex}", &hex[..2.min(hex.len())])
}

/// Key of a point's file.
pub fn point_key(id: &str, name: &str) -> String {
    format!("points/{id}/{name}")
}

/// Point ids in a listing of `points/`: those whose manifest exists.
pub fn committed_points(listing: &[ObjectInfo]) -> Vec<String> {
    let mut ids: Vec<String> = listing
        .iter()
        .filter_map(|o| {
            let rest = o.key.strip_prefix("points/")?;
            let (id, name) = rest.split_once('/')?;
            (name == "manifest" && !id.starts_with('.') && !id.is_empty()).then(|| id.to_string())
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(
            Location::parse(Path::new("/srv/repo")).unwrap(),
            Location::Local("/srv/repo".into())
        );
        assert_eq!(
            Location::parse(Path::new("s3://backups/tenant-a/")).unwrap(),
            Location::S3 {
                bucket: "backups".into(),
                prefix: "tenant-a".into()
            }
        );
        assert_eq!(
            Location::parse(Path::new("s3://backups")).unwrap(),
            Location::S3 {
                bucket: "backups".into(),
                prefix: "".into()
            }
        );
        for bad in [
            "s3://B",
            "s3://ab",
            "s3://ok-bucket/a//b",
            "s3://ok-bucket/../x",
            "s3://ok-bucket/a b",
            "s3://ok-bucket/a?b",
            "gs://x/y",
        ] {
            assert!(Location::parse(Path::new(bad)).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_location_parses_or_is_refused(s in "(s3://)?[ -~]{0,80}") {
            // Never a panic; an accepted S3 location has a valid bucket and a
            // prefix that needs no encoding in a URL.
            if let Ok(Location::S3 { bucket, prefix }) = Location::parse(Path::new(&s)) {
                proptest::prop_assert!((3..=63).contains(&bucket.len()));
                proptest::prop_assert!(prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b)));
                proptest::prop_assert!(!prefix.starts_with('/') && !prefix.ends_with('/'));
            }
        }

        #[test]
        fn credentials_files_never_panic(text in r"[ -~\n\[\]=]{0,300}", profile in "[a-z]{0,8}") {
            let _ = s3::tests_support::profile(&text, &profile);
        }
    }

    #[test]
    fn retention_dates_round_up_to_a_generation() {
        let day = 86_400;
        let g = RETENTION_GENERATION_SECS;
        for now in [0, 1, g - 1, g, 5 * g + 3 * day + 17, 1_765_000_000] {
            for days in [0u32, 1, 6, 7, 30, 365] {
                let u = retention_until(now, days);
                assert_eq!(u % g, 0, "{now} {days}");
                assert!(u >= now + days as i64 * day, "{now} {days}");
                assert!(u < now + days as i64 * day + g, "{now} {days}");
            }
        }
        // Two backups a day apart share a date (most of the time).
        assert_eq!(retention_until(g, 30), retention_until(g + day, 30));
    }

    #[test]
    fn committed_points_need_a_manifest() {
        let l = |k: &str| ObjectInfo {
            key: k.into(),
            size: 1,
            modified: None,
        };
        let ids = committed_points(&[
            l("points/p2/manifest"),
            l("points/p2/disk-0.idx"),
            l("points/p1/manifest"),
            l("points/p3/disk-0.idx"),
            l("points/.x/manifest"),
        ]);
        assert_eq!(ids, ["p1", "p2"]);
    }
}
