//! Shared helpers for ferry's end-to-end tests: a scratch world with a tenant key
//! pair, a repository and generated images, plus helpers to run the `ferry` binary.
#![allow(dead_code)]

pub mod faultproxy;
pub mod fsimage;
pub mod s3;
pub mod vcsim;
pub mod vsphere;

use ferry::job::{self, BackupReport, BackupRequest, DiskInput};
use ferry::keys::PemKeySource;
use ferry::pipeline::PipelineConfig;
use ferry::progress::Progress;
use ferry::repo::Repository;
use ferry::transport::file::FileSource;
use ferry_mocks::diskgen::{self, DiskSpec};
use ferry_mocks::fixtures::{self, PemPair};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

pub const CS: u32 = 256 * 1024;

pub struct World {
    pub dir: tempfile::TempDir,
    pub keys: PemPair,
    /// The repository location: a directory, or `s3://bucket/prefix`.
    pub repo_dir: PathBuf,
    /// For a repository on S3: the server's settings, used by [`World::repo`],
    /// and the environment the `ferry` binary gets in [`World::command`].
    pub s3: Option<(ferry::repo::backend::s3::S3Settings, Vec<(String, String)>)>,
}

impl World {
    pub fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let keys = fixtures::pem_pair(dir.path(), "tenant", 2048).unwrap();
        let repo_dir = dir.path().join("repo");
        let w = World {
            dir,
            keys,
            repo_dir,
            s3: None,
        };
        Repository::init(&w.repo_dir, CS, "tenant", &w.source()).unwrap();
        w
    }

    /// A world whose repository lives in a new bucket of `server`, under a
    /// prefix.
    pub fn on_s3(server: &s3::S3Server, bucket: &str) -> World {
        Self::on_s3_with(server, bucket, None)
    }

    /// [`World::on_s3`] with immutable points (a bucket with Object Lock).
    pub fn on_s3_with(
        server: &s3::S3Server,
        bucket: &str,
        immutability: Option<ferry::repo::format::Immutability>,
    ) -> World {
        use ferry::repo::backend::s3::S3Store;
        server.create_bucket(bucket, immutability.is_some());
        let dir = tempfile::tempdir().unwrap();
        let keys = fixtures::pem_pair(dir.path(), "tenant", 2048).unwrap();
        let (settings, env) = (server.settings(), server.env());
        let w = World {
            dir,
            keys,
            repo_dir: PathBuf::from(format!("s3://{bucket}/tenant-a")),
            s3: Some((settings.clone(), env)),
        };
        let store = S3Store::connect(bucket, "tenant-a", &settings).unwrap();
        Repository::init_in(
            Box::new(store),
            CS,
            "tenant",
            &w.source(),
            Default::default(),
            immutability,
        )
        .unwrap();
        w
    }

    /// [`World::on_s3`], but every later request (the library's through
    /// [`World::repo`], the binary's through [`World::command`]) goes to
    /// `endpoint` instead of the server (a proxy in front of it); the
    /// repository is created directly on the server.
    pub fn on_s3_at(server: &s3::S3Server, bucket: &str, endpoint: &str) -> World {
        let mut w = Self::on_s3(server, bucket);
        let (settings, env) = w.s3.as_mut().unwrap();
        settings.endpoint = Some(endpoint.to_string());
        for (k, v) in env.iter_mut() {
            if k == "FERRY_S3_ENDPOINT" {
                *v = endpoint.to_string();
            }
        }
        w
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn source(&self) -> PemKeySource {
        PemKeySource::open(Some(&self.keys.public), Some(&self.keys.private)).unwrap()
    }
    pub fn repo(&self) -> Repository {
        match &self.s3 {
            None => Repository::open(&self.repo_dir).unwrap(),
            Some((settings, _)) => {
                let loc = ferry::repo::backend::Location::parse(&self.repo_dir).unwrap();
                let ferry::repo::backend::Location::S3 { bucket, prefix } = loc else {
                    unreachable!()
                };
                let store =
                    ferry::repo::backend::s3::S3Store::connect(&bucket, &prefix, settings).unwrap();
                Repository::open_in(Box::new(store)).unwrap()
            }
        }
    }
    /// Generate a mixed image.
    pub fn image(&self, name: &str, size: u64, seed: u64) -> PathBuf {
        let p = self.path(name);
        diskgen::generate(&p, &DiskSpec::mixed(size, seed)).unwrap();
        p
    }
    pub fn backup(&self, name: &str, images: &[&Path]) -> BackupReport {
        self.try_backup(name, images).unwrap()
    }
    /// [`World::backup`] that returns the error.
    pub fn try_backup(
        &self,
        name: &str,
        images: &[&Path],
    ) -> Result<BackupReport, ferry::job::JobError> {
        let repo = self.repo();
        let disks = images
            .iter()
            .map(|p| DiskInput {
                source: Box::new(FileSource::open(p).unwrap()),
                label: p.display().to_string(),
                transport_reason: "test".into(),
                change_id: None,
                read: Default::default(),
            })
            .collect();
        job::backup(
            &repo,
            &self.source(),
            BackupRequest {
                source_name: name.into(),
                identity: None,
                disks,
                pipeline: PipelineConfig::new(Some(2), CS, 16 << 20),
                lock_wait: Duration::from_secs(10),
                snapshot: None,
            },
            &Progress::default(),
        )
    }
    /// Restore and return the result (the target path is removed first).
    pub fn restore(
        &self,
        point: &str,
        disk: u32,
        target: &Path,
    ) -> Result<(), ferry::job::JobError> {
        let _ = std::fs::remove_file(target);
        job::restore(
            &self.repo(),
            &self.source(),
            point,
            disk,
            target,
            PipelineConfig::new(Some(2), CS, 16 << 20),
            &Progress::default(),
        )
        .map(|_| ())
    }
    /// The ferry binary with the world's repo and keys in the environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.args(args)
            .env("FERRY_REPO", &self.repo_dir)
            .env("FERRY_PUBLIC_KEY", &self.keys.public)
            .env("FERRY_PRIVATE_KEY", &self.keys.private)
            .env_remove("RUST_LOG");
        if let Some((_, env)) = &self.s3 {
            c.envs(env.iter().map(|(k, v)| (k, v)));
        }
        c
    }
    /// Run the ferry binary to completion.
    pub fn ferry(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }
}

pub fn hash(p: &Path) -> blake3::Hash {
    diskgen::hash_file(p).unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// All regular files under `dir`, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A mount made by a test, lazily unmounted on drop.
pub struct Mount(pub PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Root is needed to mount; CI runs as root. Elsewhere the caller says so and
/// stops.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Run `mount` with `args`; panics with what failed (the caller checked root).
pub fn mount(args: &[&std::ffi::OsStr]) {
    let st = Command::new("mount").args(args).status().unwrap();
    assert!(
        st.success(),
        "mount {args:?} failed although running as root"
    );
}

/// `ferry restore --point latest:NAME --target TARGET` through `run` (the world's
/// binary and environment, or a variant of it); asserts success, returns TARGET.
pub fn restore_latest(run: impl Fn(&[&str]) -> Output, name: &str, target: &Path) -> PathBuf {
    let point = format!("latest:{name}");
    let o = run(&[
        "restore",
        "--point",
        &point,
        "--target",
        target.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    target.to_path_buf()
}
