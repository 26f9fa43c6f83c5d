//! Chunk compression codecs: which one a repository uses for new chunks
//! ([`Codec`], in its `config`), and compressing / decompressing one chunk
//! payload. The chunk header's flag byte records the codec of each chunk, so a
//! repository may hold chunks of every codec and old repositories (LZ4 only)
//! keep working.
//!
//! Pure in-memory work on caller buffers; zstd contexts are kept per thread so
//! the pipeline's workers never allocate one per chunk. No I/O, no keys.

use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::fmt;

/// Chunk flag: payload stored as is.
pub const FLAG_RAW: u8 = 0;
/// Chunk flag: LZ4 block.
pub const FLAG_LZ4: u8 = 1;
/// Chunk flag: one zstd frame.
pub const FLAG_ZSTD: u8 = 2;

/// zstd level used when none is given: fast, about LZ4's ratio plus a quarter.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// `auto` first compresses this much of a chunk with LZ4 to see whether it is
/// worth compressing at all.
const PROBE_LEN: usize = 64 << 10;

/// How new chunks of a repository are compressed. Whatever the codec, a chunk
/// whose compressed form is not smaller is stored raw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "codec", rename_all = "lowercase")]
pub enum Codec {
    /// LZ4: the fastest; what every repository used before zstd.
    #[default]
    Lz4,
    /// zstd at `level` (1 = fast, 3 = zstd's default, up to 19).
    Zstd {
        /// Compression level.
        level: i32,
    },
    /// Per chunk: a quick LZ4 probe of its start; zstd at `level` when that
    /// shrinks, raw when it does not (already compressed or encrypted data
    /// costs nothing then).
    Auto {
        /// zstd level for the chunks worth compressing.
        level: i32,
    },
}

/// A codec name that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("unknown compression {0:?}: use lz4, zstd, zstd:LEVEL (1-19), auto or auto:LEVEL")]
pub struct BadCodec(pub String);

impl std::str::FromStr for Codec {
    type Err = BadCodec;
    fn from_str(s: &str) -> Result<Self, BadCodec> {
        let bad = || BadCodec(s.to_string());
        let (name, level) = match s.split_once(':') {
            Some((n, l)) => (n, Some(l.parse::<i32>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let level = level.unwrap_or(DEFAULT_ZSTD_LEVEL);
        if !(1..=19).contains(&level) {
            return Err(bad());
        }
        match (name, s.contains(':')) {
            ("lz4", false) => Ok(Codec::Lz4),
            ("zstd", _) => Ok(Codec::Zstd { level }),
            ("auto", _) => Ok(Codec::Auto { level }),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Codec::Lz4 => f.write_str("lz4"),
            Codec::Zstd { level } => write!(f, "zstd:{level}"),
            Codec::Auto { level } => write!(f, "auto:{level}"),
        }
    }
}

/// Largest compressed payload any codec may produce for `len` plain bytes (the
/// seal buffer is sized by it).
pub fn max_compressed_len(len: usize) -> usize {
    lz4_flex::block::get_maximum_output_size(len)
        .max(zstd::zstd_safe::compress_bound(len))
        .max(len)
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

fn zstd_into(level: i32, plain: &[u8], out: &mut [u8]) -> Option<usize> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().map(|(l, _)| *l) != Some(level) {
            *c = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, comp) = c.as_mut()?;
        comp.compress_to_buffer(plain, out).ok()
    })
}

fn lz4_into(plain: &[u8], out: &mut [u8]) -> Option<usize> {
    lz4_flex::block::compress_into(plain, out).ok()
}

/// Compress `plain` into `out` (at least [`max_compressed_len`] bytes) with
/// `codec`; returns the chunk flag and the payload length. A payload that would
/// not be smaller is copied raw ([`FLAG_RAW`]).
pub fn compress(codec: Codec, plain: &[u8], out: &mut [u8]) -> (u8, usize) {
    let tried = match codec {
        Codec::Lz4 => lz4_into(plain, out).map(|n| (FLAG_LZ4, n)),
        Codec::Zstd { level } => zstd_into(level, plain, out).map(|n| (FLAG_ZSTD, n)),
        Codec::Auto { level } => {
            let probe = &plain[..plain.len().min(PROBE_LEN)];
            // 1/32 saved on the probe, or it is not worth a zstd pass.
            match lz4_into(probe, out) {
                Some(n) if n + probe.len() / 32 < probe.len() => {
                    zstd_into(level, plain, out).map(|n| (FLAG_ZSTD, n))
                }
                _ => None,
            }
        }
    };
    match tried {
        Some((flag, n)) if n < plain.len() => (flag, n),
        _ => {
            out[..plain.len()].copy_from_slice(plain);
            (FLAG_RAW, plain.len())
        }
    }
}

/// Why a payload did not decompress.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    /// Unknown codec flag.
    #[error("unknown codec flag {0:#x}")]
    UnknownCodec(u8),
    /// The codec refused the payload, or it decoded to another length.
    #[error("{codec}: {detail}")]
    Corrupt {
        /// Codec name.
        codec: &'static str,
        /// What went wrong.
        detail: String,
    },
}

/// Decompress a `flag` payload into `out`, which must be exactly the chunk's
/// plaintext length (never more is written, whatever the payload claims).
pub fn decompress(flag: u8, payload: &[u8], out: &mut [u8]) -> Result<(), DecompressError> {
    let (codec, n) = match flag {
        FLAG_RAW => {
            if payload.len() != out.len() {
                return Err(DecompressError::Corrupt {
                    codec: "raw",
                    detail: format!("{} bytes instead of {}", payload.len(), out.len()),
                });
            }
            out.copy_from_slice(payload);
            return Ok(());
        }
        FLAG_LZ4 => (
            "lz4",
            lz4_flex::block::decompress_into(payload, out).map_err(|e| e.to_string()),
        ),
        FLAG_ZSTD => (
            "zstd",
            DECOMPRESSOR.with(|d| {
                let mut d = d.borrow_mut();
                if d.is_none() {
                    *d = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
                }
                let d = d.as_mut().expect("set just above");
                d.decompress_to_buffer(payload, out)
                    .map_err(|e| e.to_string())
            }),
        ),
        other => return Err(DecompressError::UnknownCodec(other)),
    };
    match n {
        Ok(n) if n == out.len() => Ok(()),
        Ok(n) => Err(DecompressError::Corrupt {
            codec,
            detail: format!("{n} bytes instead of {}", out.len()),
        }),
        Err(detail) => Err(DecompressError::Corrupt { codec, detail }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text(n: usize) -> Vec<u8> {
        (0..n).map(|i| b"ferry backs up vSphere "[i % 23]).collect()
    }

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn roundtrip(codec: Codec, plain: &[u8]) -> (u8, usize) {
        let mut out = vec![0u8; max_compressed_len(plain.len())];
        let (flag, n) = compress(codec, plain, &mut out);
        let mut back = vec![0u8; plain.len()];
        decompress(flag, &out[..n], &mut back).unwrap();
        assert_eq!(back, plain);
        (flag, n)
    }

    #[test]
    fn every_codec_round_trips_and_stores_noise_raw() {
        for codec in [
            Codec::Lz4,
            Codec::Zstd { level: 1 },
            Codec::Zstd { level: 3 },
            Codec::Auto { level: 1 },
        ] {
            let (flag, n) = roundtrip(codec, &text(1 << 20));
            assert_ne!(flag, FLAG_RAW, "{codec}");
            assert!(n < 1 << 16, "{codec}: {n}");
            let (flag, n) = roundtrip(codec, &noise(1 << 20, 7));
            assert_eq!((flag, n), (FLAG_RAW, 1 << 20), "{codec}");
        }
        assert_eq!(
            roundtrip(Codec::Zstd { level: 1 }, &text(4096)).0,
            FLAG_ZSTD
        );
    }

    #[test]
    fn zstd_is_denser_than_lz4_on_mixed_data() {
        let mut plain = text(1 << 19);
        plain.extend(noise(1 << 18, 3).iter().map(|b| b & 0x0f));
        let lz4 = roundtrip(Codec::Lz4, &plain).1;
        let zstd = roundtrip(Codec::Zstd { level: 3 }, &plain).1;
        assert!(zstd < lz4, "zstd {zstd} lz4 {lz4}");
    }

    #[test]
    fn names_parse_and_print() {
        for (s, c) in [
            ("lz4", Codec::Lz4),
            ("zstd", Codec::Zstd { level: 1 }),
            ("zstd:7", Codec::Zstd { level: 7 }),
            ("auto", Codec::Auto { level: 1 }),
            ("auto:3", Codec::Auto { level: 3 }),
        ] {
            assert_eq!(s.parse::<Codec>().unwrap(), c);
            assert_eq!(c.to_string().parse::<Codec>().unwrap(), c);
        }
        for bad in ["", "gzip", "zstd:0", "zstd:20", "zstd:x", "lz4:2"] {
            assert!(bad.parse::<Codec>().is_err(), "{bad}");
        }
        let j = serde_json::to_string(&Codec::Zstd { level: 3 }).unwrap();
        assert_eq!(j, r#"{"codec":"zstd","level":3}"#);
    }

    proptest! {
        /// Whatever a damaged or hostile payload holds, decompression returns
        /// an error or exactly `out.len()` bytes; it never panics or writes more.
        #[test]
        fn arbitrary_payloads_never_panic(flag in 0u8..4, payload in proptest::collection::vec(any::<u8>(), 0..2048), len in 1usize..8192) {
            let mut out = vec![0u8; len];
            let _ = decompress(flag, &payload, &mut out);
            prop_assert_eq!(out.len(), len);
        }

        #[test]
        fn truncated_zstd_frames_are_errors(cut in 1usize..200) {
            let plain = text(1 << 16);
            let mut out = vec![0u8; max_compressed_len(plain.len())];
            let (flag, n) = compress(Codec::Zstd { level: 1 }, &plain, &mut out);
            prop_assert_eq!(flag, FLAG_ZSTD);
            let mut back = vec![0u8; plain.len()];
            let cut = cut.min(n - 1);
            prop_assert!(decompress(flag, &out[..n - cut], &mut back).is_err());
        }
    }
}
