//! `ferry bench`: measure each data-plane stage (zero check, chunk id, LZ4,
//! AES-256-GCM, decode) on synthetic chunks in memory, so operators can see what a
//! proxy's CPU can sustain. End-to-end figures come from backing up a real image.

use crate::keys::SecretKey;
use crate::repo::format::{cipher_for, is_all_zero, open_chunk, ChunkId, ChunkSealer};
use serde::Serialize;
use std::time::Instant;

/// One stage's throughput.
#[derive(Clone, Debug, Serialize)]
pub struct StageResult {
    /// Stage name.
    pub stage: String,
    /// Data profile.
    pub data: String,
    /// MiB/s on one core.
    pub mib_per_sec: f64,
}

fn profile(name: &str, len: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    match name {
        "incompressible" => (0..len).map(|_| next() as u8).collect(),
        // Text-like: small alphabet, runs; LZ4 gets roughly 2-3x.
        _ => (0..len)
            .map(|i| {
                if (i / 64) % 3 == 0 {
                    b' '
                } else {
                    b'a' + (next() % 8) as u8
                }
            })
            .collect(),
    }
}

fn time_it(bytes: usize, seconds: f64, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed().as_secs_f64() < seconds {
        f();
        n += 1;
    }
    (n * bytes) as f64 / start.elapsed().as_secs_f64() / (1024.0 * 1024.0)
}

/// Run the stage benchmarks for `seconds` each on chunks of `chunk_size`.
pub fn stages(chunk_size: usize, seconds: f64) -> Vec<StageResult> {
    let dk = SecretKey::generate();
    let idk = SecretKey::generate();
    let sealer = ChunkSealer::new(&dk);
    let cipher = cipher_for(&dk);
    let mut out = Vec::new();
    let mut res = Vec::new();
    let zeros = vec![0u8; chunk_size];
    res.push(StageResult {
        stage: "zero-check".into(),
        data: "zeros".into(),
        mib_per_sec: time_it(chunk_size, seconds, || {
            assert!(is_all_zero(std::hint::black_box(&zeros)))
        }),
    });
    for p in ["compressible", "incompressible"] {
        let data = profile(p, chunk_size);
        let id = ChunkId::compute(&idk, &data);
        let mut add = |stage: &str, v: f64| {
            res.push(StageResult {
                stage: stage.into(),
                data: p.into(),
                mib_per_sec: v,
            })
        };
        add(
            "chunk-id (keyed BLAKE3)",
            time_it(chunk_size, seconds, || {
                std::hint::black_box(ChunkId::compute(&idk, &data));
            }),
        );
        add(
            "lz4+aes-gcm seal",
            time_it(chunk_size, seconds, || sealer.seal(&id, &data, &mut out)),
        );
        sealer.seal(&id, &data, &mut out);
        let sealed = out.clone();
        let mut buf = Vec::new();
        let mut plain = Vec::new();
        add(
            "open (gcm+lz4+id check)",
            time_it(chunk_size, seconds, || {
                buf.clear();
                buf.extend_from_slice(&sealed);
                open_chunk(&mut buf, &id, |_| Some(&cipher), &idk, &mut plain)
                    .expect("bench chunk opens");
            }),
        );
        add(
            "full backup stage (id+seal)",
            time_it(chunk_size, seconds, || {
                let id = ChunkId::compute(&idk, &data);
                sealer.seal(&id, &data, &mut out);
            }),
        );
    }
    res
}
