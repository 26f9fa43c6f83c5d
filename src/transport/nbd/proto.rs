//! NBD wire format (fixed newstyle handshake, options, requests, simple and
//! structured replies, `base:allocation` block status): constants, encoders and
//! bounded decoders. Pure: no sockets. Decoders never panic and never allocate from
//! a length field before checking it against a bound.

/// "NBDMAGIC".
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT".
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Option reply magic.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no zeroes.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flag: fixed newstyle.
pub const CFLAG_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: no zeroes.
pub const CFLAG_NO_ZEROES: u32 = 2;

/// Options.
pub const OPT_ABORT: u32 = 2;
/// STARTTLS.
pub const OPT_STARTTLS: u32 = 5;
/// INFO.
pub const OPT_INFO: u32 = 6;
/// GO.
pub const OPT_GO: u32 = 7;
/// STRUCTURED_REPLY.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// SET_META_CONTEXT.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// INFO reply.
pub const REP_INFO: u32 = 3;
/// META_CONTEXT reply.
pub const REP_META_CONTEXT: u32 = 4;
/// Error replies have this bit set.
pub const REP_FLAG_ERROR: u32 = 1 << 31;

/// Info types.
pub const INFO_EXPORT: u16 = 0;
/// Block size info.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: read only.
pub const TFLAG_READ_ONLY: u16 = 2;
/// Transmission flag: multiple connections allowed.
pub const TFLAG_CAN_MULTI_CONN: u16 = 256;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Structured reply flag: last chunk.
pub const REPLY_FLAG_DONE: u16 = 1;
/// Structured reply types.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// A hole at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Block status descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Error types have bit 15 set.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

/// `base:allocation` flag: unallocated.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag: reads as zeros.
pub const STATE_ZERO: u32 = 2;

/// Longest option reply payload accepted (the spec bounds strings to 4 KiB).
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Longest structured reply chunk accepted (a read never exceeds 32 MiB here).
pub const MAX_CHUNK_PAYLOAD: u32 = 33 * 1024 * 1024;

/// Protocol errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    /// Not an NBD server or wrong magic.
    #[error("bad {what} magic {found:#x}: not speaking NBD (or the stream is out of sync)")]
    BadMagic {
        /// Which magic.
        what: &'static str,
        /// Value found.
        found: u64,
    },
    /// A field exceeds a bound.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Field.
        what: &'static str,
        /// Value.
        len: u64,
        /// Bound.
        max: u64,
    },
    /// A message is shorter than its structure.
    #[error("{what} is truncated ({have} of {need} bytes)")]
    Truncated {
        /// Message.
        what: &'static str,
        /// Needed.
        need: usize,
        /// Present.
        have: usize,
    },
    /// The server does not offer what ferry needs.
    #[error("server lacks {0}")]
    Unsupported(&'static str),
    /// The server refused an option.
    #[error("server refused option {option}: {kind} {message:?}")]
    OptionRefused {
        /// Option number.
        option: u32,
        /// Error name.
        kind: String,
        /// Server message.
        message: String,
    },
    /// A reply names a request we did not send.
    #[error("reply for unknown cookie {0:#x}")]
    UnknownCookie(u64),
    /// The server reported an error for a command.
    #[error("server error {errno} ({name}) for {what}{}", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    Command {
        /// Command.
        what: &'static str,
        /// NBD errno value.
        errno: u32,
        /// Name of the errno.
        name: &'static str,
        /// Server message.
        message: String,
    },
    /// Data beyond what was asked for.
    #[error("{0}")]
    Invalid(String),
}

fn need(b: &[u8], n: usize, what: &'static str) -> Result<(), ProtoError> {
    if b.len() < n {
        return Err(ProtoError::Truncated {
            what,
            need: n,
            have: b.len(),
        });
    }
    Ok(())
}
fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_be_bytes(a)
}

/// Name of an NBD errno.
pub fn errno_name(e: u32) -> &'static str {
    match e {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown",
    }
}

/// Name of an option error reply type.
pub fn rep_error_name(t: u32) -> &'static str {
    match t & !REP_FLAG_ERROR {
        1 => "ERR_UNSUP",
        2 => "ERR_POLICY",
        3 => "ERR_INVALID",
        4 => "ERR_PLATFORM",
        5 => "ERR_TLS_REQD",
        6 => "ERR_UNKNOWN",
        7 => "ERR_SHUTDOWN",
        8 => "ERR_BLOCK_SIZE_REQD",
        9 => "ERR_TOO_BIG",
        _ => "ERR_?",
    }
}

/// Parse the server greeting (18 bytes): returns handshake flags.
pub fn parse_greeting(b: &[u8; 18]) -> Result<u16, ProtoError> {
    let m = u64_at(b, 0);
    if m != NBDMAGIC {
        return Err(ProtoError::BadMagic {
            what: "greeting",
            found: m,
        });
    }
    let o = u64_at(b, 8);
    if o != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "newstyle (server is oldstyle?)",
            found: o,
        });
    }
    let flags = u16_at(b, 16);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::Unsupported("fixed newstyle negotiation"));
    }
    Ok(flags)
}

/// Encode an option request.
pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Data of OPT_GO / OPT_INFO asking for export and block size info.
pub fn go_data(export: &str) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&2u16.to_be_bytes());
    v.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    v.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    v
}

/// Data of OPT_SET_META_CONTEXT for the given contexts.
pub fn meta_context_data(export: &str, contexts: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
    for c in contexts {
        v.extend_from_slice(&(c.len() as u32).to_be_bytes());
        v.extend_from_slice(c.as_bytes());
    }
    v
}

/// Header of an option reply (20 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReply {
    /// Option it answers.
    pub option: u32,
    /// Reply type.
    pub reply: u32,
    /// Payload length (bounded).
    pub len: u32,
}

/// Parse an option reply header.
pub fn parse_option_reply(b: &[u8; 20]) -> Result<OptionReply, ProtoError> {
    let m = u64_at(b, 0);
    if m != REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "option reply",
            found: m,
        });
    }
    let r = OptionReply {
        option: u32_at(b, 8),
        reply: u32_at(b, 12),
        len: u32_at(b, 16),
    };
    if r.len > MAX_OPTION_REPLY {
        return Err(ProtoError::TooLarge {
            what: "option reply",
            len: r.len as u64,
            max: MAX_OPTION_REPLY as u64,
        });
    }
    Ok(r)
}

/// What an NBD_REP_INFO payload says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Info {
    /// Export size and transmission flags.
    Export {
        /// Size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// Block size constraints.
    BlockSize {
        /// Minimum.
        min: u32,
        /// Preferred.
        preferred: u32,
        /// Maximum.
        max: u32,
    },
    /// Something ferry does not use.
    Other(u16),
}

/// Parse an NBD_REP_INFO payload.
pub fn parse_info(p: &[u8]) -> Result<Info, ProtoError> {
    need(p, 2, "info reply")?;
    match u16_at(p, 0) {
        INFO_EXPORT => {
            need(p, 12, "export info")?;
            Ok(Info::Export {
                size: u64_at(p, 2),
                flags: u16_at(p, 10),
            })
        }
        INFO_BLOCK_SIZE => {
            need(p, 14, "block size info")?;
            Ok(Info::BlockSize {
                min: u32_at(p, 2),
                preferred: u32_at(p, 6),
                max: u32_at(p, 10),
            })
        }
        t => Ok(Info::Other(t)),
    }
}

/// Parse an NBD_REP_META_CONTEXT payload: (context id, name).
pub fn parse_meta_context(p: &[u8]) -> Result<(u32, String), ProtoError> {
    need(p, 4, "meta context reply")?;
    Ok((u32_at(p, 0), String::from_utf8_lossy(&p[4..]).into_owned()))
}

/// Parse an option error payload (a message).
pub fn option_error(r: &OptionReply, p: &[u8]) -> ProtoError {
    ProtoError::OptionRefused {
        option: r.option,
        kind: rep_error_name(r.reply).to_string(),
        message: String::from_utf8_lossy(p).into_owned(),
    }
}

/// Encode a transmission request (28 bytes).
pub fn request(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&cmd.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// A transmission reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// Simple reply (16 bytes read): error and cookie; data follows for reads.
    Simple {
        /// Error.
        error: u32,
        /// Cookie.
        cookie: u64,
    },
    /// Structured reply chunk (20 bytes read).
    Structured {
        /// Flags (DONE).
        flags: u16,
        /// Type.
        kind: u16,
        /// Cookie.
        cookie: u64,
        /// Payload length (bounded).
        len: u32,
    },
}

/// Length of the rest of a reply header after its 4-byte magic.
pub fn reply_rest_len(magic: u32) -> Result<usize, ProtoError> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(12),
        STRUCTURED_REPLY_MAGIC => Ok(16),
        m => Err(ProtoError::BadMagic {
            what: "reply",
            found: m as u64,
        }),
    }
}

/// Parse a reply header from its magic and the rest (12 or 16 bytes).
pub fn parse_reply(magic: u32, rest: &[u8]) -> Result<ReplyHeader, ProtoError> {
    match magic {
        SIMPLE_REPLY_MAGIC => {
            need(rest, 12, "simple reply")?;
            Ok(ReplyHeader::Simple {
                error: u32_at(rest, 0),
                cookie: u64_at(rest, 4),
            })
        }
        STRUCTURED_REPLY_MAGIC => {
            need(rest, 16, "structured reply")?;
            let len = u32_at(rest, 12);
            if len > MAX_CHUNK_PAYLOAD {
                return Err(ProtoError::TooLarge {
                    what: "structured reply chunk",
                    len: len as u64,
                    max: MAX_CHUNK_PAYLOAD as u64,
                });
            }
            Ok(ReplyHeader::Structured {
                flags: u16_at(rest, 0),
                kind: u16_at(rest, 2),
                cookie: u64_at(rest, 4),
                len,
            })
        }
        m => Err(ProtoError::BadMagic {
            what: "reply",
            found: m as u64,
        }),
    }
}

/// Parse a structured error payload: (errno, message).
pub fn parse_error_payload(p: &[u8]) -> Result<(u32, String), ProtoError> {
    need(p, 6, "error chunk")?;
    let errno = u32_at(p, 0);
    let mlen = u16_at(p, 4) as usize;
    let msg = p
        .get(6..6 + mlen)
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_default();
    Ok((errno, msg))
}

/// One block status descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Length in bytes.
    pub len: u32,
    /// Flags (`STATE_HOLE`, `STATE_ZERO`).
    pub flags: u32,
}

/// Parse a BLOCK_STATUS payload: (context id, descriptors).
pub fn parse_block_status(p: &[u8]) -> Result<(u32, Vec<Descriptor>), ProtoError> {
    need(p, 12, "block status chunk")?;
    if !(p.len() - 4).is_multiple_of(8) {
        return Err(ProtoError::Invalid(format!(
            "block status payload of {} bytes is not 4 + 8n",
            p.len()
        )));
    }
    let ctx = u32_at(p, 0);
    let d = p[4..]
        .chunks_exact(8)
        .map(|c| Descriptor {
            len: u32_at(c, 0),
            flags: u32_at(c, 4),
        })
        .collect();
    Ok((ctx, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_and_option_reply() {
        let mut g = [0u8; 18];
        g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        g[16..].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_greeting(&g).unwrap(), 3);
        g[0] = 0;
        assert!(matches!(
            parse_greeting(&g),
            Err(ProtoError::BadMagic { .. })
        ));
        let mut r = [0u8; 20];
        r[..8].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
        r[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        r[12..16].copy_from_slice(&REP_ACK.to_be_bytes());
        assert_eq!(
            parse_option_reply(&r).unwrap(),
            OptionReply {
                option: OPT_GO,
                reply: REP_ACK,
                len: 0
            }
        );
        r[16..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_option_reply(&r),
            Err(ProtoError::TooLarge { .. })
        ));
    }

    #[test]
    fn structured_reply_bounds_and_block_status() {
        let mut rest = [0u8; 16];
        rest[12..].copy_from_slice(&(64u32 << 20).to_be_bytes());
        assert!(matches!(
            parse_reply(STRUCTURED_REPLY_MAGIC, &rest),
            Err(ProtoError::TooLarge { .. })
        ));
        let mut p = vec![0, 0, 0, 1];
        p.extend_from_slice(&4096u32.to_be_bytes());
        p.extend_from_slice(&3u32.to_be_bytes());
        let (ctx, d) = parse_block_status(&p).unwrap();
        assert_eq!(
            (ctx, d),
            (
                1,
                vec![Descriptor {
                    len: 4096,
                    flags: 3
                }]
            )
        );
        assert!(parse_block_status(&p[..9]).is_err());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64), magic in any::<u32>()) {
            let _ = parse_reply(magic, &b);
            let _ = parse_reply(STRUCTURED_REPLY_MAGIC, &b);
            let _ = parse_reply(SIMPLE_REPLY_MAGIC, &b);
            let _ = parse_info(&b);
            let _ = parse_meta_context(&b);
            let _ = parse_error_payload(&b);
            let _ = parse_block_status(&b);
            if b.len() >= 20 {
                let mut h = [0u8; 20];
                h.copy_from_slice(&b[..20]);
                let _ = parse_option_reply(&h);
                let mut g = [0u8; 18];
                g.copy_from_slice(&b[..18]);
                let _ = parse_greeting(&g);
            }
        }
    }
}
