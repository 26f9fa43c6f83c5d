//! `ferry bench`: measure each data-plane stage (zero check, chunk id, each chunk
//! codec with AES-256-GCM, decode) on synthetic chunks in memory, so operators can
//! see what a proxy's CPU can sustain and what each codec stores. End-to-end
//! figures, per codec, come from backing up a real image.

use crate::keys::SecretKey;
use crate::repo::codec::Codec;
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
    /// Stored bytes per plain byte (sealing stages only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored_ratio: Option<f64>,
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

/// Run the stage benchmarks for `seconds` each on chunks of `chunk_size`, sealing
/// with each of `codecs`.
pub fn stages(chunk_size: usize, seconds: f64, codecs: &[Codec]) -> Vec<StageResult> {
    let dk = SecretKey::generate();
    let idk = SecretKey::generate();
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
        stored_ratio: None,
    });
    for p in ["compressible", "incompressible"] {
        let data = profile(p, chunk_size);
        let id = ChunkId::compute(&idk, &data);
        let mut add = |stage: String, v: f64, ratio: Option<f64>| {
            res.push(StageResult {
                stage,
                data: p.into(),
                mib_per_sec: v,
                stored_ratio: ratio,
            })
        };
        add(
            "chunk-id (keyed BLAKE3)".into(),
            time_it(chunk_size, seconds, || {
                std::hint::black_box(ChunkId::compute(&idk, &data));
            }),
            None,
        );
        for &codec in codecs {
            let sealer = ChunkSealer::with_codec(&dk, codec);
            let v = time_it(chunk_size, seconds, || sealer.seal(&id, &data, &mut out));
            sealer.seal(&id, &data, &mut out);
            add(
                format!("{codec}+aes-gcm seal"),
                v,
                Some(out.len() as f64 / chunk_size as f64),
            );
            let sealed = out.clone();
            let mut buf = Vec::new();
            let mut plain = Vec::new();
            add(
                format!("open (gcm+{codec}+id check)"),
                time_it(chunk_size, seconds, || {
                    buf.clear();
                    buf.extend_from_slice(&sealed);
                    open_chunk(&mut buf, &id, |_| Some(&cipher), &idk, &mut plain)
                        .expect("bench chunk opens");
                }),
                None,
            );
            add(
                format!("full backup stage (id+{codec} seal)"),
                time_it(chunk_size, seconds, || {
                    let id = ChunkId::compute(&idk, &data);
                    sealer.seal(&id, &data, &mut out);
                }),
                None,
            );
        }
    }
    res
}

/// Result of reading a whole source.
#[derive(Clone, Debug, Serialize)]
pub struct ReadResult {
    /// What was read.
    pub source: String,
    /// Transport.
    pub transport: String,
    /// Disk size.
    pub size: u64,
    /// Bytes actually read (allocated extents).
    pub bytes_read: u64,
    /// Seconds.
    pub seconds: f64,
    /// MiB/s of bytes read.
    pub mib_per_sec: f64,
}

/// Read every allocated byte of `source` with `threads` readers in `block`-sized
/// requests and discard it: the transport's raw read speed, nothing else.
pub fn read_source(
    source: &dyn crate::transport::DiskSource,
    threads: usize,
    block: usize,
) -> Result<ReadResult, crate::transport::SourceError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    let start = Instant::now();
    // Work list: allocated extents cut into blocks, handed out from a shared cursor.
    let mut work = Vec::new();
    let mut at = 0;
    while let Some(e) = source.next_allocated(at)? {
        let mut o = e.offset;
        while o < e.end() {
            let n = (e.end() - o).min(block as u64);
            work.push((o, n as usize));
            o += n;
        }
        at = e.end();
    }
    let next = AtomicU64::new(0);
    let read = AtomicU64::new(0);
    let err = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut buf = vec![0u8; block];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(&(o, n)) = work.get(i) else { break };
                    if let Err(e) = source.read_at(o, &mut buf[..n]) {
                        *err.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        break;
                    }
                    std::hint::black_box(&buf);
                    read.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    if let Some(e) = err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let seconds = start.elapsed().as_secs_f64();
    let bytes_read = read.into_inner();
    Ok(ReadResult {
        source: source.label(),
        transport: source.transport().to_string(),
        size: source.size(),
        bytes_read,
        seconds,
        mib_per_sec: bytes_read as f64 / seconds.max(1e-9) / 1048576.0,
    })
}
