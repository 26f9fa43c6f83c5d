//! File-system images built with the real tools (mke2fs -d, mkntfs + ntfscp,
//! mkfs.vfat + mcopy, sfdisk) from a source tree, for the file-level restore
//! tests and benchmarks. `.ci/run` installs the tools.

use rand::{RngCore, SeedableRng};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

pub const MIB: u64 = 1 << 20;

/// Run a tool; panic with its output when it fails or is missing.
pub fn tool(cmd: &str, args: &[&str]) {
    let o = Command::new(cmd)
        .args(args)
        .env("LANG", "C.UTF-8")
        .env("LC_ALL", "C.UTF-8")
        .env("TZ", "UTC")
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!("{cmd} is needed (ntfs-3g, dosfstools, mtools, fdisk, e2fsprogs; .ci/run installs them): {e}")
        });
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn write(p: &Path, data: &[u8], mtime_secs: u64) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
    let f = std::fs::File::options().write(true).open(p).unwrap();
    f.set_modified(UNIX_EPOCH + Duration::from_secs(mtime_secs))
        .unwrap();
}

/// What a tree should exercise.
#[derive(Clone, Copy)]
pub struct TreeSpec {
    /// Symlinks (ext only).
    pub symlinks: bool,
    /// A sparse file (ext only).
    pub sparse: bool,
    /// Subdirectories (NTFS trees are flat: ntfscp cannot make directories).
    pub dirs: bool,
    /// Size of the large random file.
    pub large: usize,
}

/// A source tree: names with spaces and non-ASCII, deep directories, a large
/// random file, an empty file, modes and times, optionally symlinks and a
/// sparse file.
pub fn source_tree(dir: &Path, spec: TreeSpec) {
    std::fs::create_dir_all(dir).unwrap();
    write(
        &dir.join("hello.txt"),
        b"hello, file-level restore\n",
        1_600_000_000,
    );
    write(&dir.join("empty"), b"", 1_600_000_100);
    write(
        &dir.join("large.bin"),
        &random(spec.large, 7),
        1_650_000_000,
    );
    write(
        &dir.join("rapport final é ü ñ 日本.txt"),
        "données non-ASCII\n".as_bytes(),
        1_700_000_000,
    );
    if spec.dirs {
        let deep = dir.join("deep/a/b/c/d/e/f/g/h/i/j");
        write(&deep.join("leaf.bin"), &random(300_000, 8), 1_610_000_000);
        write(&dir.join("docs/notes 2024.txt"), b"notes\n", 1_620_000_000);
        write(
            &dir.join("docs/Übersicht.md"),
            b"# summary\n",
            1_630_000_000,
        );
        std::fs::create_dir_all(dir.join("empty dir")).unwrap();
    }
    let script = dir.join("run.sh");
    write(&script, b"#!/bin/sh\necho hi\n", 1_640_000_000);
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o750)).unwrap();
    if spec.symlinks {
        symlink("hello.txt", dir.join("link to hello")).unwrap();
        symlink("deep/a/b", dir.join("dirlink")).unwrap();
        symlink("/nowhere/absolute", dir.join("dangling")).unwrap();
    }
    if spec.sparse {
        let p = dir.join("sparse.img");
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&random(8192, 9)).unwrap();
        f.seek(SeekFrom::Start(20 * MIB)).unwrap();
        f.write_all(&random(4096, 10)).unwrap();
        f.set_len(32 * MIB).unwrap();
        f.set_modified(UNIX_EPOCH + Duration::from_secs(1_660_000_000))
            .unwrap();
    }
}

/// In `dir`: a source tree `tree/` with symlinks and subdirectories and a
/// large file of `large` bytes, and `ext.img`, an ext4 volume of `size` bytes
/// holding it. Returns (tree, image).
pub fn ext4_with_tree(dir: &Path, large: usize, size: u64) -> (PathBuf, PathBuf) {
    let tree = dir.join("tree");
    source_tree(
        &tree,
        TreeSpec {
            symlinks: true,
            sparse: false,
            dirs: true,
            large,
        },
    );
    let ext = dir.join("ext.img");
    ext4_volume(&tree, &ext, size);
    (tree, ext)
}

/// An ext4 volume of `size` bytes holding `tree` (mke2fs -d).
pub fn ext4_volume(tree: &Path, out: &Path, size: u64) {
    let _ = std::fs::remove_file(out);
    tool(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-L",
            "ferry-test",
            "-d",
            tree.to_str().unwrap(),
            out.to_str().unwrap(),
            &format!("{}k", size / 1024),
        ],
    );
}

/// A FAT volume of `size` bytes (FAT32 from 64 MiB, FAT16 from 16 MiB, else FAT12) holding `tree`
/// (mcopy -s -m keeps the times).
pub fn fat_volume(tree: &Path, out: &Path, size: u64) {
    let _ = std::fs::remove_file(out);
    let fat = if size >= 64 * MIB {
        "32"
    } else if size >= 16 * MIB {
        "16"
    } else {
        "12"
    };
    tool(
        "mkfs.vfat",
        &[
            "-F",
            fat,
            "-C",
            out.to_str().unwrap(),
            &(size / 1024).to_string(),
        ],
    );
    let mut args: Vec<String> = vec![
        "-s".into(),
        "-m".into(),
        "-i".into(),
        out.to_str().unwrap().into(),
    ];
    let mut entries: Vec<PathBuf> = std::fs::read_dir(tree)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    args.extend(entries.iter().map(|p| p.to_str().unwrap().to_string()));
    args.push("::/".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    tool("mcopy", &refs);
}

/// An NTFS volume of `size` bytes with the regular files at the top of `tree`
/// copied to its root (mkntfs + ntfscp).
pub fn ntfs_volume(tree: &Path, out: &Path, size: u64) {
    let _ = std::fs::remove_file(out);
    std::fs::File::create(out).unwrap().set_len(size).unwrap();
    tool(
        "mkntfs",
        &["-F", "-Q", "-q", "-L", "ferry-ntfs", out.to_str().unwrap()],
    );
    for e in std::fs::read_dir(tree).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            tool(
                "ntfscp",
                &[
                    "-q",
                    out.to_str().unwrap(),
                    p.to_str().unwrap(),
                    &format!("/{name}"),
                ],
            );
        }
    }
}

/// A partition of a disk built by [`disk`]: the volume image and its sfdisk
/// type ("L" Linux, "U" EFI, "0b" FAT32 ...).
pub struct Part<'a> {
    pub volume: Option<&'a Path>,
    pub size: u64,
    pub sfdisk_type: &'a str,
}

/// A disk with a `label` ("gpt" or "dos") partition table made by sfdisk and
/// the volumes copied in at 1 MiB-aligned starts. With "dos", more than four
/// parts put parts 4.. in an extended partition as logical partitions.
/// Returns the partitions' byte offsets.
pub fn disk(out: &Path, label: &str, parts: &[Part<'_>]) -> Vec<u64> {
    let mut starts = Vec::new();
    let mut at = MIB;
    let mut script = format!("label: {label}\nunit: sectors\n");
    let logical_from = if label == "dos" && parts.len() > 4 {
        3
    } else {
        usize::MAX
    };
    for (i, p) in parts.iter().enumerate() {
        if i == logical_from {
            let rest: u64 = parts[i..].iter().map(|p| p.size + MIB).sum();
            script += &format!("start={}, size={}, type=5\n", at / 512, rest / 512);
            at += MIB;
        }
        starts.push(at);
        script += &format!(
            "start={}, size={}, type={}\n",
            at / 512,
            p.size / 512,
            p.sfdisk_type
        );
        at += p.size + if i >= logical_from { MIB } else { 0 };
    }
    let total = at + 2 * MIB;
    let _ = std::fs::remove_file(out);
    std::fs::File::create(out).unwrap().set_len(total).unwrap();
    let o = Command::new("sfdisk")
        .arg("-q")
        .arg(out)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(script.as_bytes())?;
            c.wait_with_output()
        })
        .expect("sfdisk is needed (package fdisk; .ci/run installs it)");
    assert!(
        o.status.success(),
        "sfdisk failed on\n{script}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut f = std::fs::File::options().write(true).open(out).unwrap();
    for (p, start) in parts.iter().zip(&starts) {
        if let Some(v) = p.volume {
            let data = std::fs::read(v).unwrap();
            assert!(data.len() as u64 <= p.size);
            f.seek(SeekFrom::Start(*start)).unwrap();
            f.write_all(&data).unwrap();
        }
    }
    f.sync_all().unwrap();
    starts
}
