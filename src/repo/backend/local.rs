//! A repository in a local directory (or a mounted file system): the on-disk
//! layout of `docs/format.md`, unchanged since the first format.
//!
//! Owns the file-system side of the backend contract: chunks linked into place
//! from unnamed files (`O_TMPFILE`), atomic replacement by rename, restore
//! points staged under `tmp/` and renamed into `points/` once their manifest is
//! written, directory fsyncs, `syncfs`, and `flock` locks under `locks/`.

use super::{Backend, ObjectInfo, PointStage};
use crate::repo::fsutil;
use crate::repo::lock::{self, LockMode, RepoLock};
use crate::repo::{RepoError, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A repository directory.
#[derive(Debug)]
pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    /// The repository at `root` (nothing is checked until it is used).
    pub fn new(root: PathBuf) -> Self {
        LocalDir { root }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// A unique path under `tmp/`.
    fn tmp_path(&self, prefix: &str) -> PathBuf {
        let mut r = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut r);
        self.root.join("tmp").join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            hex::encode(r)
        ))
    }

    fn open_file(&self, key: &str) -> Result<Option<(File, u64)>> {
        let p = self.path(key);
        let f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(RepoError::io(&p, e)),
        };
        let len = f.metadata().map_err(|e| RepoError::io(&p, e))?.len();
        Ok(Some((f, len)))
    }

    fn fsync_dirs(&self, dirs: &[&Path]) -> Result<()> {
        for d in dirs {
            fsutil::fsync_dir(d).map_err(|e| RepoError::io(*d, e))?;
        }
        Ok(())
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

impl Backend for LocalDir {
    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }
    fn kind(&self) -> &'static str {
        "local"
    }
    fn location(&self, key: &str) -> PathBuf {
        self.path(key)
    }

    fn is_empty(&self) -> Result<bool> {
        match fs::read_dir(&self.root) {
            Ok(mut it) => Ok(it.next().is_none()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(RepoError::io(&self.root, e)),
        }
    }

    fn prepare(&self) -> Result<()> {
        for d in ["", "chunks", "points", "locks", "tmp"] {
            let p = self.root.join(d);
            if !p.is_dir() {
                fs::create_dir_all(&p).map_err(|e| RepoError::io(&p, e))?;
            }
        }
        Ok(())
    }

    fn read(&self, key: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let Some((mut f, len)) = self.open_file(key)? else {
            return Ok(None);
        };
        if len > max {
            return Err(RepoError::Damaged {
                path: self.path(key),
                source: crate::repo::format::FormatError::TooLarge {
                    what: "repository file",
                    len,
                    max,
                },
            });
        }
        let mut buf = Vec::with_capacity(len as usize);
        f.read_to_end(&mut buf)
            .map_err(|e| RepoError::io(self.path(key), e))?;
        Ok(Some(buf))
    }

    fn read_head(&self, key: &str, n: usize) -> Result<Option<(Vec<u8>, u64)>> {
        let Some((mut f, len)) = self.open_file(key)? else {
            return Ok(None);
        };
        let mut buf = vec![0u8; n];
        let got = read_up_to(&mut f, &mut buf).map_err(|e| RepoError::io(self.path(key), e))?;
        buf.truncate(got);
        Ok(Some((buf, len)))
    }

    fn open(&self, key: &str) -> Result<Option<(File, u64)>> {
        self.open_file(key)
    }

    fn exists(&self, key: &str) -> Result<bool> {
        match fs::symlink_metadata(self.path(key)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(RepoError::io(self.path(key), e)),
        }
    }

    /// The data goes into an unnamed file (`O_TMPFILE`) that is linked into
    /// place only when complete, so a crash never leaves a partial object
    /// under its final name and leaves no debris either. File systems without
    /// `O_TMPFILE` get a named file under `tmp/` instead.
    fn create(&self, key: &str, data: &[u8]) -> Result<bool> {
        let dst = self.path(key);
        let dir = dst.parent().unwrap_or(&self.root).to_path_buf();
        let r = match fsutil::link_new_file(&dir, &dst, data) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(&dir).map_err(|e| RepoError::io(&dir, e))?;
                fsutil::link_new_file(&dir, &dst, data)
            }
            Err(e) if fsutil::is_unsupported(&e) => {
                let tmp = self.tmp_path("new");
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

    fn replace(&self, key: &str, data: &[u8]) -> Result<()> {
        let p = self.path(key);
        fsutil::atomic_write(&self.tmp_path(key.replace('/', "_").as_str()), &p, data)
            .map_err(|e| RepoError::io(&p, e))
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        let (src, dst) = (self.path(from), self.path(to));
        let ddir = dst.parent().unwrap_or(&self.root).to_path_buf();
        if !ddir.is_dir() {
            fs::create_dir_all(&ddir).map_err(|e| RepoError::io(&ddir, e))?;
            self.fsync_dirs(&[ddir.parent().unwrap_or(&self.root)])?;
        }
        if dst.exists() {
            return Err(RepoError::io(
                &dst,
                io::Error::from(io::ErrorKind::AlreadyExists),
            ));
        }
        fs::rename(&src, &dst).map_err(|e| RepoError::io(&src, e))?;
        self.fsync_dirs(&[&ddir, src.parent().unwrap_or(&self.root)])
    }

    fn delete(&self, key: &str) -> Result<()> {
        let p = self.path(key);
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(RepoError::io(&p, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let dir = self.path(prefix.trim_end_matches('/'));
        let mut out = Vec::new();
        let mut stack = vec![(dir, prefix.trim_end_matches('/').to_string())];
        while let Some((d, key)) = stack.pop() {
            let it = match fs::read_dir(&d) {
                Ok(it) => it,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(RepoError::io(&d, e)),
            };
            for e in it {
                let e = e.map_err(|e| RepoError::io(&d, e))?;
                let Some(name) = e.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let k = if key.is_empty() {
                    name
                } else {
                    format!("{key}/{name}")
                };
                let ft = e.file_type().map_err(|err| RepoError::io(e.path(), err))?;
                if ft.is_dir() {
                    stack.push((e.path(), k));
                } else if ft.is_file() {
                    let meta = e.metadata().ok();
                    out.push(ObjectInfo {
                        key: k,
                        size: meta.as_ref().map_or(0, |m| m.len()),
                        modified: meta.and_then(|m| {
                            let t = m.modified().ok()?;
                            let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
                            Some(d.as_secs() as i64)
                        }),
                    });
                }
            }
        }
        Ok(out)
    }

    fn sync(&self) -> Result<()> {
        fsutil::syncfs(&self.root).map_err(|e| RepoError::io(&self.root, e))
    }

    fn lock(
        &self,
        name: &str,
        mode: LockMode,
        operation: &str,
        wait: Duration,
    ) -> Result<RepoLock> {
        let p = self.root.join("locks").join(format!("{name}.lock"));
        Ok(lock::acquire(&p, mode, operation, wait)?)
    }

    fn stage_point(
        &self,
        id: &str,
        retention: Option<super::Retention>,
    ) -> Result<Box<dyn PointStage + '_>> {
        if retention.is_some() {
            self.check_object_lock()?;
        }
        let tmp = self.tmp_path(&format!("point-{id}"));
        fs::create_dir(&tmp).map_err(|e| RepoError::io(&tmp, e))?;
        Ok(Box::new(LocalStage {
            dir: self,
            id: id.to_string(),
            tmp: Some(tmp),
        }))
    }

    /// The point's directory moves into `tmp/` first (one rename: the point is
    /// gone at once, never half-deleted), then is deleted.
    fn remove_point(&self, id: &str) -> Result<()> {
        let from = self.root.join("points").join(id);
        let to = self.tmp_path(&format!("pruned-{id}"));
        fs::rename(&from, &to).map_err(|e| RepoError::io(&from, e))?;
        let points = self.root.join("points");
        self.fsync_dirs(&[&points])?;
        let _ = fs::remove_dir_all(&to);
        Ok(())
    }

    fn collect_debris(&self) -> Result<()> {
        let tmp = self.root.join("tmp");
        let it = match fs::read_dir(&tmp) {
            Ok(it) => it,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(RepoError::io(&tmp, e)),
        };
        for e in it.flatten() {
            let p = e.path();
            let _ = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
        Ok(())
    }
}

/// A point staged in `tmp/point-<id>-...`, renamed into `points/<id>` on commit.
struct LocalStage<'a> {
    dir: &'a LocalDir,
    id: String,
    /// `None` once committed.
    tmp: Option<PathBuf>,
}

impl LocalStage<'_> {
    fn tmp(&self) -> &Path {
        self.tmp.as_deref().expect("stage used after commit")
    }
}

impl PointStage for LocalStage<'_> {
    fn create_file(&mut self, name: &str) -> Result<File> {
        let p = self.tmp().join(name);
        File::create(&p).map_err(|e| RepoError::io(&p, e))
    }

    fn finish_file(&mut self, name: &str, file: File) -> Result<()> {
        file.sync_all()
            .map_err(|e| RepoError::io(self.tmp().join(name), e))
    }

    fn commit(mut self: Box<Self>, manifest: &[u8]) -> Result<()> {
        let tmp = self.tmp().to_path_buf();
        let mpath = tmp.join("manifest");
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&mpath)
            .map_err(|e| RepoError::io(&mpath, e))?;
        f.write_all(manifest)
            .and_then(|_| f.sync_all())
            .map_err(|e| RepoError::io(&mpath, e))?;
        self.dir.fsync_dirs(&[&tmp])?;
        let final_dir = self.dir.root.join("points").join(&self.id);
        fs::rename(&tmp, &final_dir).map_err(|e| RepoError::io(&final_dir, e))?;
        self.tmp = None;
        let points = self.dir.root.join("points");
        self.dir.fsync_dirs(&[&points])
    }
}

impl Drop for LocalStage<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.tmp.take() {
            let _ = fs::remove_dir_all(t);
        }
    }
}
