//! Deterministic disk-image generator.
//!
//! A disk is cut into regions (default 1 MiB); each region is zero, compressible
//! (text-like, LZ4 shrinks it about 2-3×) or incompressible (random), chosen by a
//! seeded hash of its index with the given percentages. Zero regions are never
//! written, so images are sparse: a 64 GiB image with 3% data takes 2 GiB on disk.
//! The same spec always produces the same bytes. Owns only file generation and
//! mutation; knows nothing about ferry's formats.

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// What to generate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// Image size in bytes.
    pub size: u64,
    /// Seed: same seed, same image.
    pub seed: u64,
    /// Percentage of zero regions.
    pub zero_pct: u8,
    /// Percentage of compressible regions (the rest is incompressible).
    pub compressible_pct: u8,
    /// Region size in bytes.
    pub region: u64,
}

impl DiskSpec {
    /// A mixed profile: 20% zero, 40% compressible, 40% incompressible.
    pub fn mixed(size: u64, seed: u64) -> Self {
        DiskSpec {
            size,
            seed,
            zero_pct: 20,
            compressible_pct: 40,
            region: 1 << 20,
        }
    }
    /// A mostly empty disk with about `data_pct` percent of regions holding data.
    pub fn sparse(size: u64, seed: u64, data_pct: u8) -> Self {
        DiskSpec {
            size,
            seed,
            zero_pct: 100 - data_pct.min(100),
            compressible_pct: data_pct.min(100) / 2,
            region: 1 << 20,
        }
    }
}

/// Kind of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    /// All zero (a hole).
    Zero,
    /// Text-like data.
    Compressible,
    /// Random data.
    Incompressible,
}

fn mix(seed: u64, i: u64) -> u64 {
    // SplitMix64 of (seed, index): a cheap, well-distributed hash.
    let mut z = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl DiskSpec {
    /// Kind of region `i`.
    pub fn region_kind(&self, i: u64) -> Region {
        let r = (mix(self.seed, i) % 100) as u8;
        if r < self.zero_pct {
            Region::Zero
        } else if r < self.zero_pct.saturating_add(self.compressible_pct) {
            Region::Compressible
        } else {
            Region::Incompressible
        }
    }

    /// Number of regions.
    pub fn regions(&self) -> u64 {
        self.size.div_ceil(self.region)
    }

    /// Fill `buf` with region `i`'s content (`buf.len()` = region length).
    pub fn fill_region(&self, i: u64, buf: &mut [u8]) {
        let mut rng = SmallRng::seed_from_u64(mix(self.seed ^ 0xD15C, i));
        match self.region_kind(i) {
            Region::Zero => buf.fill(0),
            Region::Incompressible => rng.fill_bytes(buf),
            Region::Compressible => fill_text(&mut rng, buf),
        }
    }
}

const WORDS: &[&[u8]] = &[
    b"backup ",
    b"restore ",
    b"vSphere ",
    b"tenant ",
    b"key ",
    b"chunk ",
    b"the ",
    b"of ",
    b"and ",
    b"disk ",
    b"snapshot ",
    b"proxy ",
    b"encrypted ",
    b"\n",
    b"0000 ",
    b"log: ",
    b"ok ",
    b"error=none ",
];

fn fill_text(rng: &mut SmallRng, buf: &mut [u8]) {
    let mut at = 0;
    while at < buf.len() {
        let w = WORDS[rng.gen_range(0..WORDS.len())];
        let n = w.len().min(buf.len() - at);
        buf[at..at + n].copy_from_slice(&w[..n]);
        at += n;
        if rng.gen_ratio(1, 16) && at + 8 <= buf.len() {
            // a random number now and then, as logs have
            let v: u32 = rng.gen();
            let s = format!("{v:08x}");
            buf[at..at + 8].copy_from_slice(s.as_bytes());
            at += 8;
        }
    }
}

/// Write the image to `path` (created or truncated; zero regions left as holes).
/// Returns the number of data bytes written.
pub fn generate(path: &Path, spec: &DiskSpec) -> io::Result<u64> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.set_len(spec.size)?;
    let mut buf = vec![0u8; spec.region as usize];
    let mut written = 0;
    for i in 0..spec.regions() {
        if spec.region_kind(i) == Region::Zero {
            continue;
        }
        let off = i * spec.region;
        let len = (spec.size - off).min(spec.region) as usize;
        spec.fill_region(i, &mut buf[..len]);
        f.write_all_at(&buf[..len], off)?;
        written += len as u64;
    }
    f.sync_all()?;
    Ok(written)
}

/// Overwrite about `fraction` of the image (in blocks of `block` bytes at seeded
/// random positions) with new random data, as a guest would. Returns the changed
/// (offset, len) blocks, sorted.
pub fn mutate(path: &Path, seed: u64, fraction: f64, block: u64) -> io::Result<Vec<(u64, u64)>> {
    let f = OpenOptions::new().read(true).write(true).open(path)?;
    let size = f.metadata()?.len();
    let blocks = size / block;
    let n = ((blocks as f64) * fraction).ceil() as u64;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < n.min(blocks) {
        picked.insert(rng.gen_range(0..blocks));
    }
    let mut buf = vec![0u8; block as usize];
    let mut out = Vec::new();
    for b in picked {
        rng.fill_bytes(&mut buf);
        f.write_all_at(&buf, b * block)?;
        out.push((b * block, block));
    }
    f.sync_all()?;
    Ok(out)
}

/// BLAKE3 of a file's bytes (holes read as zeros).
pub fn hash_file(path: &Path) -> io::Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path)?)?;
    Ok(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_sparse() {
        let d = tempfile::tempdir().unwrap();
        let spec = DiskSpec::mixed(32 << 20, 7);
        let a = d.path().join("a");
        let b = d.path().join("b");
        let wa = generate(&a, &spec).unwrap();
        generate(&b, &spec).unwrap();
        assert_eq!(hash_file(&a).unwrap(), hash_file(&b).unwrap());
        assert!(wa < spec.size, "some regions must be holes");
        let kinds: Vec<Region> = (0..spec.regions()).map(|i| spec.region_kind(i)).collect();
        assert!(
            kinds.contains(&Region::Zero)
                && kinds.contains(&Region::Compressible)
                && kinds.contains(&Region::Incompressible)
        );
        let other = DiskSpec { seed: 8, ..spec };
        generate(&b, &other).unwrap();
        assert_ne!(hash_file(&a).unwrap(), hash_file(&b).unwrap());
    }

    #[test]
    fn mutate_changes_about_the_fraction() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a");
        generate(&p, &DiskSpec::mixed(16 << 20, 1)).unwrap();
        let before = hash_file(&p).unwrap();
        let ch = mutate(&p, 3, 0.01, 64 << 10).unwrap();
        assert_eq!(ch.len(), 3); // 256 blocks * 1% rounded up
        assert_ne!(before, hash_file(&p).unwrap());
    }
}
