//! NBD wire format (fixed newstyle handshake, options, requests, simple and
//! structured replies, `base:allocation` block status): constants, encoders and
//! bounded decoders for both sides, ferry's client ([`super::client`]) and its
//! server ([`crate::nbd_server`]). Pure: no sockets. Decoders never panic and never
//! allocate from a length field before checking it against a bound.
//!
//! Reference: the NBD protocol, `doc/proto.md` of NetworkBlockDevice/nbd.

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

/// Option: export name (old way to enter transmission; cannot fail cleanly).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// STARTTLS.
pub const OPT_STARTTLS: u32 = 5;
/// INFO.
pub const OPT_INFO: u32 = 6;
/// GO.
pub const OPT_GO: u32 = 7;
/// STRUCTURED_REPLY.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// LIST_META_CONTEXT.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// SET_META_CONTEXT.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// EXTENDED_HEADERS (experimental; ferry does not offer it).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// SERVER reply (one export of an OPT_LIST).
pub const REP_SERVER: u32 = 2;
/// INFO reply.
pub const REP_INFO: u32 = 3;
/// META_CONTEXT reply.
pub const REP_META_CONTEXT: u32 = 4;
/// Error replies have this bit set.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Error: option unknown to the server.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Error: forbidden by server policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Error: syntactically or semantically invalid option.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Error: TLS must be negotiated first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Error: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Error: request or reply too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Info types.
pub const INFO_EXPORT: u16 = 0;
/// Canonical export name info.
pub const INFO_NAME: u16 = 1;
/// Export description info.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block size info.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: always set.
pub const TFLAG_HAS_FLAGS: u16 = 1;
/// Transmission flag: read only.
pub const TFLAG_READ_ONLY: u16 = 2;
/// Transmission flag: NBD_CMD_FLUSH understood.
pub const TFLAG_SEND_FLUSH: u16 = 4;
/// Transmission flag: NBD_CMD_FLAG_FUA understood.
pub const TFLAG_SEND_FUA: u16 = 8;
/// Transmission flag: NBD_CMD_TRIM understood.
pub const TFLAG_SEND_TRIM: u16 = 32;
/// Transmission flag: NBD_CMD_WRITE_ZEROES understood.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 64;
/// Transmission flag: NBD_CMD_FLAG_DF understood on reads (structured replies only).
pub const TFLAG_SEND_DF: u16 = 128;
/// Transmission flag: multiple connections allowed.
pub const TFLAG_CAN_MULTI_CONN: u16 = 256;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write (a payload follows the request).
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim.
pub const CMD_TRIM: u16 = 4;
/// Cache (prefetch hint).
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1;
/// Command flag: write zeroes must allocate (no hole may be punched).
pub const CMD_FLAG_NO_HOLE: u16 = 2;
/// Command flag: don't fragment the read reply.
pub const CMD_FLAG_DF: u16 = 4;
/// Command flag: one extent per context in a block status reply.
pub const CMD_FLAG_REQ_ONE: u16 = 8;

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
/// Generic error chunk.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;

/// NBD errno: operation not permitted (writes to a read-only export).
pub const EPERM: u32 = 1;
/// NBD errno: I/O error.
pub const EIO: u32 = 5;
/// NBD errno: out of memory.
pub const ENOMEM: u32 = 12;
/// NBD errno: invalid argument (bounds, flags, unknown command).
pub const EINVAL: u32 = 22;
/// NBD errno: no space.
pub const ENOSPC: u32 = 28;
/// NBD errno: value too large.
pub const EOVERFLOW: u32 = 75;
/// NBD errno: not supported.
pub const ENOTSUP: u32 = 95;
/// NBD errno: server shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Name of the one metadata context ferry knows.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Longest string (export name, context name, message) the spec allows.
pub const MAX_STRING: usize = 4096;

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
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
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

impl ReplyHeader {
    /// The cookie of the request this reply answers.
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Structured { cookie, .. } => cookie,
        }
    }
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

// ------------------------------------------------------------------ server side

/// Longest option payload a server accepts (export names and metadata queries are
/// strings of at most 4 KiB; this leaves room for several queries).
pub const MAX_OPTION_DATA: u32 = 64 * 1024;

/// The server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn greeting(flags: u16) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Header of an option request (16 bytes) as a server reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number.
    pub option: u32,
    /// Length of the option data that follows (not yet bounded).
    pub len: u32,
}

/// Parse an option request header; the caller bounds `len`.
pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader, ProtoError> {
    let m = u64_at(b, 0);
    if m != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "option request",
            found: m,
        });
    }
    Ok(OptionHeader {
        option: u32_at(b, 8),
        len: u32_at(b, 12),
    })
}

/// Encode an option reply: header and payload.
pub fn option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + payload.len());
    v.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// `s` cut to at most [`MAX_STRING`] bytes on a character boundary.
pub fn bounded_str(s: &str) -> &str {
    if s.len() <= MAX_STRING {
        return s;
    }
    let mut end = MAX_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Payload of NBD_REP_INFO / NBD_INFO_EXPORT.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = INFO_EXPORT.to_be_bytes().to_vec();
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// Payload of NBD_REP_INFO / NBD_INFO_BLOCK_SIZE.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    v.extend_from_slice(&min.to_be_bytes());
    v.extend_from_slice(&preferred.to_be_bytes());
    v.extend_from_slice(&max.to_be_bytes());
    v
}

/// Payload of NBD_REP_INFO with a string (NBD_INFO_NAME, NBD_INFO_DESCRIPTION).
pub fn info_string(kind: u16, text: &str) -> Vec<u8> {
    let mut v = kind.to_be_bytes().to_vec();
    v.extend_from_slice(bounded_str(text).as_bytes());
    v
}

/// Payload of NBD_REP_SERVER (one export of an OPT_LIST).
pub fn rep_server(name: &str) -> Vec<u8> {
    let name = bounded_str(name);
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

/// Payload of NBD_REP_META_CONTEXT.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = id.to_be_bytes().to_vec();
    v.extend_from_slice(bounded_str(name).as_bytes());
    v
}

/// The reply to NBD_OPT_EXPORT_NAME: size, transmission flags and, unless the
/// client negotiated no-zeroes, 124 bytes of zeroes.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = size.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        v.extend_from_slice(&[0u8; 124]);
    }
    v
}

fn string_at<'a>(
    d: &'a [u8],
    at: usize,
    len: usize,
    what: &'static str,
) -> Result<&'a str, ProtoError> {
    if len > MAX_STRING {
        return Err(ProtoError::TooLarge {
            what,
            len: len as u64,
            max: MAX_STRING as u64,
        });
    }
    let end = at
        .checked_add(len)
        .filter(|&e| e <= d.len())
        .ok_or(ProtoError::Truncated {
            what,
            need: at.saturating_add(len),
            have: d.len(),
        })?;
    std::str::from_utf8(&d[at..end])
        .map_err(|_| ProtoError::Invalid(format!("{what} is not UTF-8")))
}

/// An NBD_OPT_INFO / NBD_OPT_GO request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoRequest {
    /// Export name ("" = default export).
    pub name: String,
    /// Information types asked for.
    pub infos: Vec<u16>,
}

/// Parse the data of NBD_OPT_INFO / NBD_OPT_GO. The data must be exactly
/// `name length, name, info count, infos`.
pub fn parse_go(d: &[u8]) -> Result<GoRequest, ProtoError> {
    need(d, 6, "OPT_GO data")?;
    let nlen = u32_at(d, 0) as usize;
    let name = string_at(d, 4, nlen, "export name")?.to_string();
    let at = 4 + nlen;
    need(d, at + 2, "OPT_GO info count")?;
    let n = u16_at(d, at) as usize;
    if d.len() != at + 2 + 2 * n {
        return Err(ProtoError::Invalid(format!(
            "OPT_GO data of {} bytes does not hold a name of {nlen} bytes and {n} info requests",
            d.len()
        )));
    }
    let infos = (0..n).map(|i| u16_at(d, at + 2 + 2 * i)).collect();
    Ok(GoRequest { name, infos })
}

/// An NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export the contexts are for.
    pub export: String,
    /// Queries, e.g. `base:allocation`.
    pub queries: Vec<String>,
}

/// Parse the data of NBD_OPT_{LIST,SET}_META_CONTEXT; every length is checked
/// against the data actually present.
pub fn parse_meta_request(d: &[u8]) -> Result<MetaRequest, ProtoError> {
    need(d, 8, "meta context data")?;
    let nlen = u32_at(d, 0) as usize;
    let export = string_at(d, 4, nlen, "export name")?.to_string();
    let mut at = 4 + nlen;
    need(d, at + 4, "meta context query count")?;
    let n = u32_at(d, at) as usize;
    at += 4;
    // Each query takes at least 4 bytes: the count is bounded by the data.
    if n > (d.len() - at) / 4 {
        return Err(ProtoError::Invalid(format!(
            "{n} meta context queries cannot fit in {} bytes",
            d.len() - at
        )));
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        need(d, at + 4, "meta context query length")?;
        let qlen = u32_at(d, at) as usize;
        queries.push(string_at(d, at + 4, qlen, "meta context query")?.to_string());
        at += 4 + qlen;
    }
    if at != d.len() {
        return Err(ProtoError::Invalid(format!(
            "{} bytes after the meta context queries",
            d.len() - at
        )));
    }
    Ok(MetaRequest { export, queries })
}

/// A transmission request (28-byte header) as a server reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub cmd: u16,
    /// Cookie (handle) to echo.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length (for writes: payload length that follows).
    pub len: u32,
}

/// Parse a request header.
pub fn parse_request(b: &[u8; 28]) -> Result<Request, ProtoError> {
    let m = u32_at(b, 0);
    if m != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "request",
            found: m as u64,
        });
    }
    Ok(Request {
        flags: u16_at(b, 4),
        cmd: u16_at(b, 6),
        cookie: u64_at(b, 8),
        offset: u64_at(b, 16),
        len: u32_at(b, 24),
    })
}

/// Encode a simple reply header (16 bytes; read data follows on success).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Encode a structured reply chunk header (20 bytes; `len` payload bytes follow).
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// A whole structured chunk with its payload.
pub fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = chunk_header(flags, kind, cookie, payload.len() as u32).to_vec();
    v.extend_from_slice(payload);
    v
}

/// Payload of an NBD_REPLY_TYPE_ERROR chunk (message cut to 4 KiB).
pub fn error_payload(errno: u32, message: &str) -> Vec<u8> {
    let m = bounded_str(message);
    let mut v = errno.to_be_bytes().to_vec();
    v.extend_from_slice(&(m.len() as u16).to_be_bytes());
    v.extend_from_slice(m.as_bytes());
    v
}

/// Payload of an NBD_REPLY_TYPE_OFFSET_HOLE chunk.
pub fn hole_payload(offset: u64, len: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&offset.to_be_bytes());
    b[8..].copy_from_slice(&len.to_be_bytes());
    b
}

/// Payload of an NBD_REPLY_TYPE_BLOCK_STATUS chunk.
pub fn block_status_payload(ctx: u32, d: &[Descriptor]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + 8 * d.len());
    v.extend_from_slice(&ctx.to_be_bytes());
    for x in d {
        v.extend_from_slice(&x.len.to_be_bytes());
        v.extend_from_slice(&x.flags.to_be_bytes());
    }
    v
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

    #[test]
    fn server_side_codecs_round_trip_with_the_client_side() {
        // What a server encodes, ferry's client decodes.
        let g = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(parse_greeting(&g).unwrap(), 3);
        let r = option_reply(OPT_GO, REP_INFO, &info_export(1 << 30, 3));
        let h = parse_option_reply(r[..20].try_into().unwrap()).unwrap();
        assert_eq!((h.option, h.reply, h.len), (OPT_GO, REP_INFO, 12));
        assert_eq!(
            parse_info(&r[20..]).unwrap(),
            Info::Export {
                size: 1 << 30,
                flags: 3
            }
        );
        assert_eq!(
            parse_info(&info_block_size(1, 4096, 1 << 25)).unwrap(),
            Info::BlockSize {
                min: 1,
                preferred: 4096,
                max: 1 << 25
            }
        );
        assert_eq!(
            parse_meta_context(&rep_meta_context(7, BASE_ALLOCATION)).unwrap(),
            (7, BASE_ALLOCATION.to_string())
        );
        // And what the client encodes, the server decodes.
        let o = option(OPT_GO, &go_data("disk"));
        let oh = parse_option_header(o[..16].try_into().unwrap()).unwrap();
        assert_eq!(
            oh,
            OptionHeader {
                option: OPT_GO,
                len: o.len() as u32 - 16
            }
        );
        assert_eq!(
            parse_go(&o[16..]).unwrap(),
            GoRequest {
                name: "disk".into(),
                infos: vec![INFO_EXPORT, INFO_BLOCK_SIZE]
            }
        );
        let m = meta_context_data("disk", &[BASE_ALLOCATION, "qemu:dirty-bitmap:x"]);
        assert_eq!(
            parse_meta_request(&m).unwrap(),
            MetaRequest {
                export: "disk".into(),
                queries: vec![BASE_ALLOCATION.into(), "qemu:dirty-bitmap:x".into()]
            }
        );
        let q = request(CMD_FLAG_DF, CMD_READ, 9, 4096, 512);
        assert_eq!(
            parse_request(&q).unwrap(),
            Request {
                flags: CMD_FLAG_DF,
                cmd: CMD_READ,
                cookie: 9,
                offset: 4096,
                len: 512
            }
        );
        let sr = simple_reply(EPERM, 9);
        assert_eq!(
            parse_reply(SIMPLE_REPLY_MAGIC, &sr[4..]).unwrap(),
            ReplyHeader::Simple {
                error: EPERM,
                cookie: 9
            }
        );
        let c = chunk(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            9,
            &error_payload(EIO, "boom"),
        );
        assert_eq!(
            parse_reply(STRUCTURED_REPLY_MAGIC, &c[4..20]).unwrap(),
            ReplyHeader::Structured {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_ERROR,
                cookie: 9,
                len: 10
            }
        );
        assert_eq!(parse_error_payload(&c[20..]).unwrap(), (EIO, "boom".into()));
        let d = [
            Descriptor { len: 512, flags: 3 },
            Descriptor {
                len: 1024,
                flags: 0,
            },
        ];
        assert_eq!(
            parse_block_status(&block_status_payload(1, &d)).unwrap(),
            (1, d.to_vec())
        );
        assert_eq!(export_name_reply(5, 3, false).len(), 134);
        assert_eq!(export_name_reply(5, 3, true).len(), 10);
    }

    #[test]
    fn server_side_decoders_refuse_inconsistent_lengths() {
        // Name longer than the data.
        let mut d = 100u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"ab\0\0");
        assert!(matches!(parse_go(&d), Err(ProtoError::Truncated { .. })));
        // Info count that does not match the data.
        let mut d = go_data("x");
        d.push(0);
        assert!(parse_go(&d).is_err());
        // A name over 4 KiB is refused before it is copied.
        let mut d = (5000u32).to_be_bytes().to_vec();
        d.extend_from_slice(&[b'a'; 5002]);
        assert!(matches!(parse_go(&d), Err(ProtoError::TooLarge { .. })));
        // Not UTF-8.
        let mut d = 1u32.to_be_bytes().to_vec();
        d.extend_from_slice(&[0xff, 0, 0]);
        assert!(parse_go(&d).is_err());
        // A query count far beyond the data.
        let mut m = 0u32.to_be_bytes().to_vec();
        m.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&m).is_err());
        // Trailing bytes.
        let mut m = meta_context_data("", &[BASE_ALLOCATION]);
        m.push(1);
        assert!(parse_meta_request(&m).is_err());
        let mut bad = request(0, CMD_READ, 1, 0, 1);
        bad[0] ^= 1;
        assert!(matches!(
            parse_request(&bad),
            Err(ProtoError::BadMagic { .. })
        ));
        assert_eq!(bounded_str(&"é".repeat(3000)).len(), 4096);
    }

    proptest! {
        #[test]
        fn server_decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_go(&b);
            let _ = parse_meta_request(&b);
            if b.len() >= 28 {
                let _ = parse_request(b[..28].try_into().unwrap());
                let _ = parse_option_header(b[..16].try_into().unwrap());
            }
        }

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
