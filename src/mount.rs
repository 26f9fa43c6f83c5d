//! `ferry mount`: a restore point's disks as read-only files in a FUSE file
//! system (`disk0.img`, `disk1.img`, ...), so an operator can loop-mount with
//! the operating system's own drivers what [`crate::files`] does not read (XFS,
//! LVM, BitLocker with its recovery key...). Reads go through the same
//! on-demand chunk path as `ferry export` and `ferry files`.
//!
//! Must not: accept writes (the mount is read-only and every write-side call
//! is refused by FUSE's defaults); know about repositories (it serves any
//! [`ReadAt`]).

use crate::files::ReadAt;
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, LockOwner,
    MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, Request,
};
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How long the kernel may cache attributes: the contents never change.
const TTL: Duration = Duration::from_secs(3600);

/// One file of the mount.
pub struct MountedDisk {
    /// File name (for example `disk0.img`).
    pub name: String,
    /// Its contents.
    pub disk: Arc<dyn ReadAt>,
}

/// The FUSE file system: a root directory holding one file per disk.
pub struct DiskMount {
    disks: Vec<MountedDisk>,
    time: SystemTime,
    uid: u32,
    gid: u32,
}

impl DiskMount {
    /// Serve `disks`, with `time` (the point's time) as every file's time.
    pub fn new(disks: Vec<MountedDisk>, time: SystemTime) -> Self {
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        DiskMount {
            disks,
            time,
            uid,
            gid,
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, size, perm, nlink) = if ino == 1 {
            (FileType::Directory, 0, 0o555, 2)
        } else {
            let d = self.disks.get(ino.checked_sub(2)? as usize)?;
            (FileType::RegularFile, d.disk.size(), 0o444, 1)
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.time,
            mtime: self.time,
            ctime: self.time,
            crtime: self.time,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 1 << 20,
            flags: 0,
        })
    }

    /// Mount at `dir` and serve in the background until the returned session is
    /// dropped or unmounted. `allow_other` lets other users (and root, for a
    /// loop mount by a non-root operator) read the files.
    pub fn spawn(self, dir: &Path, allow_other: bool) -> std::io::Result<fuser::BackgroundSession> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::RO,
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::FSName("ferry".into()),
            MountOption::Subtype("ferry".into()),
        ];
        if allow_other {
            config.acl = fuser::SessionACL::All;
        }
        config.n_threads = Some(4);
        fuser::spawn_mount(self, dir, &config)
    }
}

impl Filesystem for DiskMount {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if u64::from(parent) != 1 {
            return reply.error(Errno::ENOENT);
        }
        let found = self
            .disks
            .iter()
            .position(|d| OsStr::new(&d.name) == name)
            .and_then(|i| self.attr(i as u64 + 2));
        match found {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.into()) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(d) = u64::from(ino)
            .checked_sub(2)
            .and_then(|i| self.disks.get(i as usize))
        else {
            return reply.error(Errno::ENOENT);
        };
        let total = d.disk.size();
        if offset >= total {
            return reply.data(&[]);
        }
        // The kernel asks for at most max_read (128 KiB by default) at a time.
        let n = (size as u64).min(total - offset) as usize;
        let mut buf = vec![0u8; n];
        match d.disk.read_at(offset, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(e) => {
                tracing::error!(file = %d.name, offset, error = %e, "read failed");
                reply.error(Errno::EIO)
            }
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if u64::from(ino) != 1 {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries: Vec<(u64, FileType, &str)> = vec![
            (1, FileType::Directory, "."),
            (1, FileType::Directory, ".."),
        ];
        for (i, d) in self.disks.iter().enumerate() {
            entries.push((i as u64 + 2, FileType::RegularFile, &d.name));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            // The offset handed back is the index of the next entry.
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok()
    }
}
