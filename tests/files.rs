//! File-level restore end to end: disks with GPT and MBR partition tables
//! holding ext4, FAT and NTFS volumes built by the real tools, backed up, then
//! listed, searched and copied out with `ferry files` and compared with the
//! source tree byte for byte (names with spaces and non-ASCII, deep
//! directories, sparse and large files, symlinks, modes and times). Damaged
//! inputs give errors that name the partition, file system or file, and the
//! other files still restore.

mod common;

use common::fsimage::{self, Part, TreeSpec, MIB};
use common::{text, World};
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What a local tree holds, relative path → description (kind, content hash,
/// link target, mode, mtime as asked).
fn describe(root: &Path, modes: bool, mtime_tolerance: Option<i64>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mut s = if m.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                stack.push(p.clone());
                "dir".to_string()
            } else {
                format!("file {}", blake3::hash(&std::fs::read(&p).unwrap()))
            };
            if modes && !m.file_type().is_symlink() {
                s += &format!(" mode {:o}", m.permissions().mode() & 0o7777);
            }
            if let (Some(tol), false) = (mtime_tolerance, m.file_type().is_symlink()) {
                // Rounded to the tolerance so FAT's 2-second times compare.
                s += &format!(" mtime {}", m.mtime() / tol.max(1));
            }
            out.insert(rel, s);
        }
    }
    out
}

struct Disks {
    world: World,
    tree: PathBuf,
    fat_tree: PathBuf,
    ntfs_tree: PathBuf,
}

fn trees(w: &World) -> (PathBuf, PathBuf, PathBuf) {
    let tree = w.path("tree");
    fsimage::source_tree(
        &tree,
        TreeSpec {
            symlinks: true,
            sparse: true,
            dirs: true,
            large: 12 << 20,
        },
    );
    let fat_tree = w.path("fat-tree");
    fsimage::source_tree(
        &fat_tree,
        TreeSpec {
            symlinks: false,
            sparse: false,
            dirs: true,
            large: 3 << 20,
        },
    );
    let ntfs_tree = w.path("ntfs-tree");
    fsimage::source_tree(
        &ntfs_tree,
        TreeSpec {
            symlinks: false,
            sparse: false,
            dirs: false,
            large: 5 << 20,
        },
    );
    (tree, fat_tree, ntfs_tree)
}

/// A GPT disk: 1 ext4, 2 FAT32, 3 NTFS; backed up as point "gpt".
fn gpt_world() -> Disks {
    let world = World::new();
    let (tree, fat_tree, ntfs_tree) = trees(&world);
    let ext = world.path("ext.img");
    fsimage::ext4_volume(&tree, &ext, 64 * MIB);
    let fat = world.path("fat.img");
    fsimage::fat_volume(&fat_tree, &fat, 64 * MIB);
    let ntfs = world.path("ntfs.img");
    fsimage::ntfs_volume(&ntfs_tree, &ntfs, 16 * MIB);
    let disk = world.path("gpt.img");
    fsimage::disk(
        &disk,
        "gpt",
        &[
            Part {
                volume: Some(&ext),
                size: 64 * MIB,
                sfdisk_type: "L",
            },
            Part {
                volume: Some(&fat),
                size: 64 * MIB,
                sfdisk_type: "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
            },
            Part {
                volume: Some(&ntfs),
                size: 16 * MIB,
                sfdisk_type: "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
            },
        ],
    );
    world.backup("gpt", &[&disk]);
    Disks {
        world,
        tree,
        fat_tree,
        ntfs_tree,
    }
}

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

fn ok(w: &World, args: &[&str]) -> serde_json::Value {
    let o = w.ferry(args);
    assert!(o.status.success(), "{}", text(&o));
    if args.contains(&"--json") {
        json(&o)
    } else {
        serde_json::Value::Null
    }
}

#[test]
fn ext4_fat_and_ntfs_on_gpt_restore_byte_for_byte() {
    let d = gpt_world();
    let w = &d.world;
    let v = ok(w, &["--json", "files", "volumes", "latest:gpt"]);
    let fs: Vec<(u64, String)> = v["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["partition"].as_u64().unwrap(),
                v["fs"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        fs,
        vec![(1, "ext".into()), (2, "fat".into()), (3, "ntfs".into())],
        "{v}"
    );
    // Several readable volumes: the operator must choose.
    let o = w.ferry(&["files", "ls", "latest:gpt", "/"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("--partition"), "{}", text(&o));

    // ext4: everything, with modes, times and symlinks; the --out directory
    // itself keeps its own mode (a private restore area stays private).
    let out = w.path("out-ext");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o700)).unwrap();
    let r = ok(
        w,
        &[
            "--json",
            "files",
            "get",
            "latest:gpt",
            "--partition",
            "1",
            "/",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(
        r["restored"][0]["failures"].as_array().unwrap().is_empty(),
        "{r}"
    );
    let want = describe(&d.tree, true, Some(1));
    let mut got = describe(&out, true, Some(1));
    // mke2fs adds lost+found; it is in the volume, not in the source.
    assert!(got.remove("lost+found").is_some());
    assert_eq!(got, want);
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let sparse = std::fs::metadata(out.join("sparse.img")).unwrap();
    assert_eq!(sparse.len(), 32 * MIB);

    // FAT: contents, names and times (2-second resolution); no modes or links.
    let out = w.path("out-fat");
    ok(
        w,
        &[
            "files",
            "get",
            "latest:gpt",
            "--partition",
            "2",
            "/",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(
        describe(&out, false, Some(2)),
        describe(&d.fat_tree, false, Some(2))
    );

    // NTFS: contents and names at the root.
    let out = w.path("out-ntfs");
    ok(
        w,
        &[
            "files",
            "get",
            "latest:gpt",
            "--partition",
            "3",
            "/",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(
        describe(&out, false, None),
        describe(&d.ntfs_tree, false, None)
    );

    // ls shows one directory with sizes and link targets.
    let l = ok(
        w,
        &[
            "--json",
            "files",
            "ls",
            "latest:gpt",
            "--partition",
            "1",
            "/docs",
        ],
    );
    let names: Vec<&str> = l["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["notes 2024.txt", "Übersicht.md"]);
    let root = ok(
        w,
        &["--json", "files", "ls", "latest:gpt", "--partition", "1"],
    );
    let link = root["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "link to hello")
        .unwrap();
    assert_eq!(link["kind"], "symlink");
    assert_eq!(link["link_target"], "hello.txt");
    let large = root["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "large.bin")
        .unwrap();
    assert_eq!(large["size"], 12 << 20);
    // A listing reads a handful of chunks, not the disk.
    assert!(root["chunks_read"].as_u64().unwrap() <= 8, "{root}");

    // find by pattern, on each file system (FAT and NTFS names compare as written).
    for part in ["1", "2"] {
        let f = ok(
            w,
            &[
                "--json",
                "files",
                "find",
                "latest:gpt",
                "--partition",
                part,
                "*.txt",
            ],
        );
        let mut paths: Vec<&str> = f["matches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap())
            .collect();
        paths.sort();
        assert_eq!(
            paths,
            vec![
                "/docs/notes 2024.txt",
                "/hello.txt",
                "/rapport final é ü ñ 日本.txt"
            ],
            "partition {part}"
        );
    }
    let f = ok(
        w,
        &[
            "--json",
            "files",
            "find",
            "latest:gpt",
            "--partition",
            "3",
            "*.bin",
        ],
    );
    assert_eq!(f["matches"][0]["path"], "/large.bin");

    // Single files and a directory by path; an existing file is never overwritten.
    let out = w.path("out-one");
    ok(
        w,
        &[
            "files",
            "get",
            "latest:gpt",
            "--partition",
            "1",
            "/deep/a/b/c/d/e/f/g/h/i/j/leaf.bin",
            "/docs",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read(out.join("leaf.bin")).unwrap(),
        std::fs::read(d.tree.join("deep/a/b/c/d/e/f/g/h/i/j/leaf.bin")).unwrap()
    );
    assert_eq!(
        std::fs::read(out.join("docs/Übersicht.md")).unwrap(),
        b"# summary\n"
    );
    let o = w.ferry(&[
        "files",
        "get",
        "latest:gpt",
        "--partition",
        "1",
        "/docs",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("File exists"), "{}", text(&o));
    // NTFS looks names up case-insensitively, as Windows does.
    let out = w.path("out-case");
    ok(
        w,
        &[
            "files",
            "get",
            "latest:gpt",
            "--partition",
            "3",
            "/HELLO.TXT",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read(out.join("HELLO.TXT")).unwrap(),
        b"hello, file-level restore\n"
    );
    // Paths that do not exist are named.
    let o = w.ferry(&["files", "ls", "latest:gpt", "--partition", "1", "/no/such"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("/no/such: no such file or directory"),
        "{}",
        text(&o)
    );
}

#[test]
fn mbr_with_a_logical_partition() {
    let world = World::new();
    let (tree, fat_tree, _) = trees(&world);
    let fat = world.path("fat16.img");
    fsimage::fat_volume(&fat_tree, &fat, 32 * MIB);
    let ext = world.path("ext.img");
    fsimage::ext4_volume(&tree, &ext, 64 * MIB);
    let disk = world.path("mbr.img");
    // 1 FAT16, 2 empty, 3 empty, extended holding 5 (empty) and 6 (ext4).
    fsimage::disk(
        &disk,
        "dos",
        &[
            Part {
                volume: Some(&fat),
                size: 32 * MIB,
                sfdisk_type: "6",
            },
            Part {
                volume: None,
                size: MIB,
                sfdisk_type: "83",
            },
            Part {
                volume: None,
                size: MIB,
                sfdisk_type: "83",
            },
            Part {
                volume: None,
                size: 2 * MIB,
                sfdisk_type: "83",
            },
            Part {
                volume: Some(&ext),
                size: 64 * MIB,
                sfdisk_type: "83",
            },
        ],
    );
    world.backup("mbr", &[&disk]);
    let v = ok(&world, &["--json", "files", "volumes", "latest:mbr"]);
    let parts: Vec<(u64, &str)> = v["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["partition"].as_u64().unwrap(), v["fs"].as_str().unwrap()))
        .collect();
    assert_eq!(
        parts,
        vec![
            (1, "fat"),
            (2, "unknown"),
            (3, "unknown"),
            (5, "unknown"),
            (6, "ext")
        ],
        "{v}"
    );
    let out = world.path("out");
    ok(
        &world,
        &[
            "files",
            "get",
            "latest:mbr",
            "--partition",
            "6",
            "/rapport final é ü ñ 日本.txt",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(out.join("rapport final é ü ñ 日本.txt")).unwrap(),
        "données non-ASCII\n"
    );
    let l = ok(
        &world,
        &[
            "--json",
            "files",
            "ls",
            "latest:mbr",
            "--partition",
            "1",
            "/docs",
        ],
    );
    assert_eq!(l["fs"], "fat");
    assert_eq!(l["entries"].as_array().unwrap().len(), 2, "{l}");
}

/// The chunk ids of disk 0 of `point`, by position.
fn chunk_at(w: &World, point: &str, offset: u64) -> PathBuf {
    let repo = w.repo();
    let id = repo.resolve_point(point).unwrap();
    let p = repo.open_point(&id, &w.source(), None).unwrap();
    let mut r = repo.open_index(&p, 0).unwrap();
    let pos = offset / common::CS as u64;
    let mut i = 0;
    while let Some(e) = r.next_entry().unwrap() {
        if i == pos {
            assert!(!e.id.is_zero_marker());
            return repo.chunk_path(&e.id);
        }
        i += 1;
    }
    panic!("no chunk at {offset}");
}

/// Physical block of logical block `n` of `file` in an ext4 image (debugfs,
/// from e2fsprogs).
fn ext4_block(image: &Path, file: &str, n: u64) -> u64 {
    let o = std::process::Command::new("debugfs")
        .args([
            "-R",
            &format!("bmap \"{file}\" {n}"),
            image.to_str().unwrap(),
        ])
        .output()
        .expect("debugfs (e2fsprogs)");
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{}", text(&o)))
}

#[test]
fn damaged_chunk_table_and_superblock_are_named_and_the_rest_restores() {
    let world = World::new();
    let (tree, _, _) = trees(&world);
    let ext = world.path("ext.img");
    fsimage::ext4_volume(&tree, &ext, 64 * MIB);
    let disk = world.path("disk.img");
    let starts = fsimage::disk(
        &disk,
        "gpt",
        &[Part {
            volume: Some(&ext),
            size: 64 * MIB,
            sfdisk_type: "L",
        }],
    );
    world.backup("vm", &[&disk]);

    // A chunk under large.bin fails authentication: that file is named, is not
    // left half-written, and every other file restores.
    // 6 MiB into the 12 MiB file: the whole chunk around it is large.bin's.
    let block = ext4_block(&ext, "/large.bin", 1536);
    let chunk = chunk_at(&world, "latest:vm", starts[0] + block * 4096);
    let mut bytes = std::fs::read(&chunk).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 0x40;
    std::fs::write(&chunk, &bytes).unwrap();
    let out = world.path("out");
    let o = world.ferry(&[
        "--json",
        "files",
        "get",
        "latest:vm",
        "/",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let r = json(&o);
    let failures = r["restored"][0]["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{r}");
    assert_eq!(failures[0]["path"], "/large.bin");
    assert!(failures[0]["damage"].as_bool().unwrap());
    assert!(!out.join("large.bin").exists());
    let mut want = describe(&tree, true, Some(1));
    want.remove("large.bin");
    let mut got = describe(&out, true, Some(1));
    got.remove("lost+found");
    assert_eq!(got, want);
    bytes[n - 20] ^= 0x40;
    std::fs::write(&chunk, &bytes).unwrap();

    // A damaged superblock (its checksum no longer matches).
    let mut img = std::fs::read(&disk).unwrap();
    let sb = (starts[0] + 1024) as usize;
    img[sb + 0x0C] ^= 0x01; // s_free_blocks_count
    std::fs::write(world.path("bad-sb.img"), &img).unwrap();
    world.backup("bad-sb", &[&world.path("bad-sb.img")]);
    let o = world.ferry(&["files", "ls", "latest:bad-sb", "/"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        text(&o).contains("ext2/3/4 file system on partition 1"),
        "{}",
        text(&o)
    );

    // Both GPT headers damaged: the partition table is named.
    let mut img = std::fs::read(&disk).unwrap();
    img[512 + 8] ^= 0xFF;
    let last = img.len() - 512;
    img[last + 8] ^= 0xFF;
    std::fs::write(world.path("bad-gpt.img"), &img).unwrap();
    world.backup("bad-gpt", &[&world.path("bad-gpt.img")]);
    let o = world.ferry(&["files", "ls", "latest:bad-gpt", "/"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        text(&o).contains("partition table damaged: primary GPT"),
        "{}",
        text(&o)
    );
    // Only the primary damaged: the backup is used.
    img[last + 8] ^= 0xFF;
    std::fs::write(world.path("half-gpt.img"), &img).unwrap();
    world.backup("half-gpt", &[&world.path("half-gpt.img")]);
    let l = ok(
        &world,
        &["--json", "files", "ls", "latest:half-gpt", "/docs"],
    );
    assert_eq!(l["entries"].as_array().unwrap().len(), 2);

    // A file system ferry does not read is named, with the way out.
    let mut img = std::fs::read(&disk).unwrap();
    let p = starts[0] as usize;
    img[p..p + 4].copy_from_slice(b"XFSB");
    img[p + 1080..p + 1082].fill(0);
    std::fs::write(world.path("xfs.img"), &img).unwrap();
    world.backup("xfs", &[&world.path("xfs.img")]);
    let o = world.ferry(&["files", "ls", "latest:xfs", "/"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("holds XFS"), "{}", text(&o));
    assert!(text(&o).contains("ferry mount"), "{}", text(&o));
}
