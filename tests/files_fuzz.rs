//! Damaged file systems never crash ferry: real ext4, FAT and NTFS images (built
//! by the real tools) with random bytes flipped in their metadata are opened,
//! walked and every file copied; each case must come back with a result (typed
//! errors are fine) in bounded time. Panics inside the third-party readers are
//! caught by `files::open`'s guard and must surface as errors, never unwind
//! into the caller.

mod common;

use common::fsimage::{self, TreeSpec, MIB};
use common::World;
use ferry::files::{self, EntryKind, FileSystem, ReadAt};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Open, walk and read everything; count what was seen.
fn exercise(img: Vec<u8>) -> usize {
    let disk: Arc<dyn ReadAt> = Arc::new(img);
    let Ok(mut fs) = files::open(disk, None) else {
        return 0;
    };
    let Ok(root) = fs.stat("/") else { return 0 };
    let mut entries = Vec::new();
    files::walk(
        &mut *fs,
        &root,
        &mut |e| entries.push(e.clone()),
        &mut |_| {},
    );
    let fs: &mut dyn FileSystem = &mut *fs;
    for e in &entries {
        if e.kind == EntryKind::File {
            let _ = fs.copy_to(&e.path, &mut std::io::sink());
        }
    }
    entries.len()
}

#[test]
fn flipped_metadata_bytes_give_errors_not_crashes() {
    let w = World::new();
    let tree = w.path("tree");
    fsimage::source_tree(
        &tree,
        TreeSpec {
            symlinks: false,
            sparse: false,
            dirs: true,
            large: 256 << 10,
        },
    );
    let flat = w.path("flat");
    fsimage::source_tree(
        &flat,
        TreeSpec {
            symlinks: false,
            sparse: false,
            dirs: false,
            large: 256 << 10,
        },
    );
    let mut images = Vec::new();
    let ext = w.path("ext.img");
    fsimage::ext4_volume(&tree, &ext, 8 * MIB);
    images.push(("ext4", std::fs::read(&ext).unwrap()));
    let fat = w.path("fat.img");
    fsimage::fat_volume(&tree, &fat, 8 * MIB);
    images.push(("fat", std::fs::read(&fat).unwrap()));
    let ntfs = w.path("ntfs.img");
    fsimage::ntfs_volume(&flat, &ntfs, 8 * MIB);
    images.push(("ntfs", std::fs::read(&ntfs).unwrap()));

    // Undamaged, each image is read whole.
    for (name, img) in &images {
        assert!(exercise(img.clone()) >= 5, "{name}");
    }
    // The hook would print every caught panic; the test reports them itself.
    std::panic::set_hook(Box::new(|_| {}));
    let cases: u64 = std::env::var("FERRY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    for (name, img) in &images {
        // Metadata lives at the start (ext: superblock, group descriptors,
        // bitmaps, inode table; FAT: boot sector, FATs, root directory) and,
        // for NTFS, in the MFT: flip bytes where the readers look.
        let hot: Vec<usize> = (0..img.len())
            .step_by(512)
            .filter(|o| img[*o..*o + 512].iter().any(|b| *b != 0))
            .collect();
        let mut deep = 0u64;
        for seed in 0..cases {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut bad = img.clone();
            for _ in 0..rng.gen_range(1..48) {
                let sector = hot[rng.gen_range(0..hot.len())];
                let at = sector + rng.gen_range(0..512);
                bad[at] = rng.gen();
            }
            let started = Instant::now();
            let outcome = std::panic::catch_unwind(|| exercise(bad));
            match outcome {
                Ok(n) if n > 1 => deep += 1,
                Ok(_) => {}
                Err(_) => panic!("{name} seed {seed}: a panic escaped the file-system guard"),
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{name} seed {seed}: took {:?}",
                started.elapsed()
            );
        }
        eprintln!("{name}: {deep} of {cases} damaged images still opened and were walked");
        // The damage must not all be caught at the door: some cases go deep.
        assert!(
            deep * 10 >= cases,
            "{name}: only {deep} of {cases} cases got past opening"
        );
    }
    let _ = std::panic::take_hook();
}
