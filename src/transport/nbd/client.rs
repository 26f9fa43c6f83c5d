//! One NBD connection: fixed-newstyle handshake (structured replies,
//! `base:allocation` meta context, OPT_GO), reads (split into several requests in
//! flight, replies taken out of order), block-status queries, and on a writable
//! export writes and flushes (one request in flight). Generic over the byte
//! stream so TLS plugs in underneath. Every length from the server is checked
//! before it sizes a read.

use super::proto::{self, Descriptor, Info, ProtoError, ReplyHeader};
use std::io::{self, Read, Write};

/// Connection errors.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Socket error.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Protocol violation or server error.
    #[error("{0}")]
    Proto(#[from] ProtoError),
}

/// A `base:allocation` extent: (offset, length, flags).
pub type StatusExtent = (u64, u64, u32);

/// An established NBD connection in the transmission phase.
pub struct NbdConn<S> {
    s: S,
    /// Export size.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// Context id of `base:allocation`, when the server offers it.
    pub allocation_ctx: Option<u32>,
    /// Largest request the server accepts.
    pub max_request: u32,
    cookie: u64,
}

use proto::BASE_ALLOCATION;

/// Largest request one read is split into: a 4 MiB chunk becomes four requests in
/// flight that the server can serve in parallel.
pub const READ_PIECE: usize = 1 << 20;
/// Requests one [`NbdConn::read`] keeps in flight on its connection.
pub const READ_IN_FLIGHT: usize = 16;

/// What one reply to a read request did.
struct ReadPart {
    /// The request's last reply (DONE flag, or a simple reply).
    done: bool,
    /// The server's error for the request, if it sent one.
    error: Option<ProtoError>,
}

impl ReadPart {
    fn done() -> Self {
        ReadPart {
            done: true,
            error: None,
        }
    }
    fn failed(e: ProtoError) -> Self {
        ReadPart {
            done: true,
            error: Some(e),
        }
    }
}

/// Read the server greeting and send the client flags (start of every handshake).
pub fn greet<S: Read + Write>(s: &mut S) -> Result<(), ConnError> {
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    let hflags = proto::parse_greeting(&g)?;
    let mut cflags = proto::CFLAG_FIXED_NEWSTYLE;
    if hflags & proto::FLAG_NO_ZEROES != 0 {
        cflags |= proto::CFLAG_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())?;
    Ok(())
}

/// Ask for TLS (NBD_OPT_STARTTLS) after [`greet`]; on success the caller runs the
/// TLS handshake on the same stream and continues with [`NbdConn::negotiate`].
pub fn start_tls<S: Read + Write>(s: &mut S) -> Result<(), ConnError> {
    s.write_all(&proto::option(proto::OPT_STARTTLS, &[]))?;
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    let r = proto::parse_option_reply(&h)?;
    let p = read_payload(s, r.len, proto::MAX_OPTION_REPLY, "option reply")?;
    match r.reply {
        proto::REP_ACK if r.option == proto::OPT_STARTTLS => Ok(()),
        t if t & proto::REP_FLAG_ERROR != 0 => Err(proto::option_error(&r, &p).into()),
        t => Err(ProtoError::Invalid(format!("unexpected reply {t} to STARTTLS")).into()),
    }
}
const MAX_BLOCK_STATUS_PAYLOAD: u32 = 4 + 8 * (1 << 17);
const MAX_ERROR_PAYLOAD: u32 = 6 + 4096 + 8;

fn read_payload<S: Read>(
    s: &mut S,
    len: u32,
    max: u32,
    what: &'static str,
) -> Result<Vec<u8>, ConnError> {
    if len > max {
        return Err(ProtoError::TooLarge {
            what,
            len: len as u64,
            max: max as u64,
        }
        .into());
    }
    let mut v = vec![0u8; len as usize];
    s.read_exact(&mut v)?;
    Ok(v)
}

impl<S: Read + Write> NbdConn<S> {
    /// Run the handshake on `s` (already connected, and already TLS-wrapped when TLS
    /// is wanted) and enter the transmission phase for `export`.
    pub fn handshake(mut s: S, export: &str) -> Result<Self, ConnError> {
        greet(&mut s)?;
        Self::negotiate(s, export)
    }

    /// Continue a handshake after the greeting (used after STARTTLS).
    pub fn negotiate(mut s: S, export: &str) -> Result<Self, ConnError> {
        // Structured replies (needed for block status and sparse reads).
        s.write_all(&proto::option(proto::OPT_STRUCTURED_REPLY, &[]))?;
        let mut structured = false;
        loop {
            let (r, p) = Self::option_reply(&mut s)?;
            if r.reply == proto::REP_ACK {
                structured = true;
                break;
            }
            if r.reply & proto::REP_FLAG_ERROR != 0 {
                let _ = p;
                break; // the server speaks simple replies only
            }
        }
        let mut allocation_ctx = None;
        if structured {
            s.write_all(&proto::option(
                proto::OPT_SET_META_CONTEXT,
                &proto::meta_context_data(export, &[BASE_ALLOCATION]),
            ))?;
            loop {
                let (r, p) = Self::option_reply(&mut s)?;
                match r.reply {
                    proto::REP_META_CONTEXT => {
                        let (id, name) = proto::parse_meta_context(&p)?;
                        if name == BASE_ALLOCATION {
                            allocation_ctx = Some(id);
                        }
                    }
                    proto::REP_ACK => break,
                    t if t & proto::REP_FLAG_ERROR != 0 => break, // no block status; reads still work
                    _ => {}
                }
            }
        }
        s.write_all(&proto::option(proto::OPT_GO, &proto::go_data(export)))?;
        let (mut size, mut flags, mut max_request) = (None, 0u16, 32u32 << 20);
        loop {
            let (r, p) = Self::option_reply(&mut s)?;
            match r.reply {
                proto::REP_INFO => match proto::parse_info(&p)? {
                    Info::Export { size: sz, flags: f } => {
                        size = Some(sz);
                        flags = f;
                    }
                    Info::BlockSize { max, .. } => {
                        if max > 0 {
                            max_request = max_request.min(max);
                        }
                    }
                    Info::Other(_) => {}
                },
                proto::REP_ACK => break,
                t if t & proto::REP_FLAG_ERROR != 0 => {
                    return Err(proto::option_error(&r, &p).into())
                }
                _ => {}
            }
        }
        let size = size.ok_or(ProtoError::Unsupported("export size in the OPT_GO reply"))?;
        Ok(NbdConn {
            s,
            size,
            flags,
            structured,
            allocation_ctx,
            max_request,
            cookie: 1,
        })
    }

    fn option_reply(s: &mut S) -> Result<(proto::OptionReply, Vec<u8>), ConnError> {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        let r = proto::parse_option_reply(&h)?;
        let p = read_payload(s, r.len, proto::MAX_OPTION_REPLY, "option reply")?;
        Ok((r, p))
    }

    /// The next reply header, which must answer `cookie`.
    fn next_reply(&mut self, cookie: u64) -> Result<ReplyHeader, ConnError> {
        let h = self.reply_header()?;
        if h.cookie() != cookie {
            return Err(ProtoError::UnknownCookie(h.cookie()).into());
        }
        Ok(h)
    }

    fn structured_error(&mut self, len: u32, what: &'static str) -> Result<ConnError, ConnError> {
        let p = read_payload(&mut self.s, len, MAX_ERROR_PAYLOAD, "error chunk")?;
        let (errno, message) = proto::parse_error_payload(&p)?;
        Ok(ProtoError::Command {
            what,
            errno,
            name: proto::errno_name(errno),
            message,
        }
        .into())
    }

    /// Read `buf.len()` bytes at `offset`: split into requests of at most
    /// [`READ_PIECE`] (and the server's maximum), up to [`READ_IN_FLIGHT`] of them in
    /// flight on this connection at once, their replies taken in whatever order the
    /// server sends them (structured chunks of different requests may interleave).
    /// A server error for one piece is returned once every request in flight has
    /// been answered, so the connection stays usable.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ConnError> {
        if buf.is_empty() {
            return Ok(());
        }
        let piece = (self.max_request as usize).clamp(1, READ_PIECE);
        let n = buf.len().div_ceil(piece);
        let base = self.cookie;
        self.cookie += n as u64;
        let total = buf.len();
        let range = move |i: usize| (i * piece, piece.min(total - i * piece));
        // Per piece: bytes covered so far, and whether its last reply came.
        let mut covered = vec![0usize; n];
        let mut done = vec![false; n];
        let (mut sent, mut finished) = (0usize, 0usize);
        let mut failure: Option<ProtoError> = None;
        loop {
            // Keep the window full; after a server error, only drain.
            while failure.is_none() && sent < n && sent - finished < READ_IN_FLIGHT {
                let (o, len) = range(sent);
                self.send_read(base + sent as u64, offset + o as u64, len)?;
                sent += 1;
            }
            if finished == sent {
                break;
            }
            let h = self.reply_header()?;
            let c = h.cookie();
            let i = match c.checked_sub(base).map(|i| i as usize) {
                Some(i) if i < sent && !done[i] => i,
                _ => return Err(ProtoError::UnknownCookie(c).into()),
            };
            let (o, len) = range(i);
            let part =
                self.read_part(h, offset + o as u64, &mut buf[o..o + len], &mut covered[i])?;
            if let Some(e) = part.error {
                failure.get_or_insert(e);
            }
            if part.done {
                done[i] = true;
                finished += 1;
            }
        }
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn send_read(&mut self, cookie: u64, offset: u64, len: usize) -> Result<(), ConnError> {
        self.s.write_all(&proto::request(
            0,
            proto::CMD_READ,
            cookie,
            offset,
            len as u32,
        ))?;
        Ok(())
    }

    /// The next reply header, whatever its cookie.
    fn reply_header(&mut self) -> Result<ReplyHeader, ConnError> {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m)?;
        let magic = u32::from_be_bytes(m);
        let mut rest = [0u8; 16];
        let n = proto::reply_rest_len(magic)?;
        self.s.read_exact(&mut rest[..n])?;
        Ok(proto::parse_reply(magic, &rest[..n])?)
    }

    /// Consume the body of reply `h` to the read of `buf.len()` bytes at `offset`.
    /// `covered` counts the bytes of that read answered so far. Protocol violations
    /// are errors (the connection is then unusable); a server error for the read is
    /// returned in [`ReadPart::error`].
    fn read_part(
        &mut self,
        h: ReplyHeader,
        offset: u64,
        buf: &mut [u8],
        covered: &mut usize,
    ) -> Result<ReadPart, ConnError> {
        let (flags, kind, len) = match h {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    // No data follows a simple error reply.
                    return Ok(ReadPart::failed(ProtoError::Command {
                        what: "read",
                        errno: error,
                        name: proto::errno_name(error),
                        message: String::new(),
                    }));
                }
                self.s.read_exact(buf)?;
                return Ok(ReadPart::done());
            }
            ReplyHeader::Structured {
                flags, kind, len, ..
            } => (flags, kind, len),
        };
        let mut error = None;
        match kind {
            proto::REPLY_TYPE_OFFSET_DATA => {
                if len < 8 {
                    return Err(ProtoError::Truncated {
                        what: "data chunk",
                        need: 8,
                        have: len as usize,
                    }
                    .into());
                }
                let mut o = [0u8; 8];
                self.s.read_exact(&mut o)?;
                let at = u64::from_be_bytes(o);
                let dlen = (len - 8) as usize;
                match at.checked_sub(offset).map(|x| x as usize) {
                    Some(st) if st.checked_add(dlen).is_some_and(|e| e <= buf.len()) => {
                        self.s.read_exact(&mut buf[st..st + dlen])?;
                        *covered += dlen;
                    }
                    _ => {
                        return Err(ProtoError::Invalid(format!(
                            "data chunk at {at}+{dlen} outside the request {offset}+{}",
                            buf.len()
                        ))
                        .into())
                    }
                }
            }
            proto::REPLY_TYPE_OFFSET_HOLE => {
                let p = read_payload(&mut self.s, len, 12, "hole chunk")?;
                if p.len() != 12 {
                    return Err(ProtoError::Truncated {
                        what: "hole chunk",
                        need: 12,
                        have: p.len(),
                    }
                    .into());
                }
                let at = u64::from_be_bytes(p[..8].try_into().expect("8 bytes"));
                let hlen = u32::from_be_bytes(p[8..12].try_into().expect("4 bytes")) as usize;
                match at.checked_sub(offset).map(|x| x as usize) {
                    Some(st) if st.checked_add(hlen).is_some_and(|e| e <= buf.len()) => {
                        buf[st..st + hlen].fill(0);
                        *covered += hlen;
                    }
                    _ => {
                        return Err(ProtoError::Invalid(format!(
                            "hole chunk at {at}+{hlen} outside the request"
                        ))
                        .into())
                    }
                }
            }
            proto::REPLY_TYPE_NONE => {
                if len != 0 {
                    return Err(ProtoError::Invalid("NONE chunk with a payload".into()).into());
                }
            }
            k if k & proto::REPLY_TYPE_ERROR_BIT != 0 => {
                error = Some(match self.structured_error(len, "read")? {
                    ConnError::Proto(e) => e,
                    other => return Err(other),
                });
            }
            k => {
                return Err(ProtoError::Invalid(format!(
                    "unexpected reply chunk type {k} to a read"
                ))
                .into())
            }
        }
        let done = flags & proto::REPLY_FLAG_DONE != 0;
        if done && error.is_none() && *covered != buf.len() {
            return Err(ProtoError::Invalid(format!(
                "read reply covered {covered} of {} bytes",
                buf.len()
            ))
            .into());
        }
        Ok(ReadPart { done, error })
    }

    /// Whether the server said the export is read-only.
    pub fn read_only(&self) -> bool {
        self.flags & proto::TFLAG_READ_ONLY != 0
    }

    /// Write `data` at `offset` (split into requests the server accepts); each
    /// request's reply is awaited before the next is sent.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ConnError> {
        let max = self.max_request as usize;
        let mut done = 0;
        while done < data.len() {
            let n = (data.len() - done).min(max);
            let cookie = self.cookie;
            self.cookie += 1;
            self.s.write_all(&proto::request(
                0,
                proto::CMD_WRITE,
                cookie,
                offset + done as u64,
                n as u32,
            ))?;
            self.s.write_all(&data[done..done + n])?;
            self.s.flush()?;
            self.expect_ack(cookie, "write")?;
            done += n;
        }
        Ok(())
    }

    /// NBD_CMD_FLUSH: the server makes completed writes durable.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        let cookie = self.cookie;
        self.cookie += 1;
        self.s
            .write_all(&proto::request(0, proto::CMD_FLUSH, cookie, 0, 0))?;
        self.s.flush()?;
        self.expect_ack(cookie, "flush")
    }

    /// The reply to a request without reply payload (write, flush): a simple reply,
    /// or structured chunks ending in DONE with at most an error.
    fn expect_ack(&mut self, cookie: u64, what: &'static str) -> Result<(), ConnError> {
        loop {
            match self.next_reply(cookie)? {
                ReplyHeader::Simple { error: 0, .. } => return Ok(()),
                ReplyHeader::Simple { error, .. } => {
                    return Err(ProtoError::Command {
                        what,
                        errno: error,
                        name: proto::errno_name(error),
                        message: String::new(),
                    }
                    .into())
                }
                ReplyHeader::Structured {
                    flags, kind, len, ..
                } => {
                    match kind {
                        proto::REPLY_TYPE_NONE if len == 0 => {}
                        k if k & proto::REPLY_TYPE_ERROR_BIT != 0 => {
                            return Err(self.structured_error(len, what)?)
                        }
                        k => {
                            return Err(ProtoError::Invalid(format!(
                                "unexpected reply chunk type {k} (length {len}) to a {what}"
                            ))
                            .into())
                        }
                    }
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// `base:allocation` extents from `offset` for at most `len` bytes:
    /// `(offset, length, flags)` in order. `None` if the server offers no block status.
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u32,
    ) -> Result<Option<Vec<StatusExtent>>, ConnError> {
        let Some(ctx) = self.allocation_ctx else {
            return Ok(None);
        };
        let cookie = self.cookie;
        self.cookie += 1;
        self.s.write_all(&proto::request(
            0,
            proto::CMD_BLOCK_STATUS,
            cookie,
            offset,
            len,
        ))?;
        let mut out = Vec::new();
        loop {
            match self.next_reply(cookie)? {
                ReplyHeader::Simple { error, .. } => {
                    return Err(ProtoError::Command {
                        what: "block status",
                        errno: error,
                        name: proto::errno_name(error),
                        message: "simple reply to block status".into(),
                    }
                    .into());
                }
                ReplyHeader::Structured {
                    flags,
                    kind,
                    len: plen,
                    ..
                } => {
                    match kind {
                        proto::REPLY_TYPE_BLOCK_STATUS => {
                            let p = read_payload(
                                &mut self.s,
                                plen,
                                MAX_BLOCK_STATUS_PAYLOAD,
                                "block status chunk",
                            )?;
                            let (c, ds) = proto::parse_block_status(&p)?;
                            if c == ctx {
                                let mut at = offset;
                                for Descriptor { len: l, flags: f } in ds {
                                    if l == 0 {
                                        return Err(ProtoError::Invalid(
                                            "zero-length block status extent".into(),
                                        )
                                        .into());
                                    }
                                    out.push((at, l as u64, f));
                                    at += l as u64;
                                }
                            }
                        }
                        proto::REPLY_TYPE_NONE => {}
                        k if k & proto::REPLY_TYPE_ERROR_BIT != 0 => {
                            return Err(self.structured_error(plen, "block status")?)
                        }
                        k => {
                            return Err(ProtoError::Invalid(format!(
                                "unexpected reply chunk type {k} to block status"
                            ))
                            .into())
                        }
                    }
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        return Ok(Some(out));
                    }
                }
            }
        }
    }

    /// Say goodbye (best effort): NBD_CMD_DISC. Returns the stream, for the
    /// caller to end TLS cleanly.
    pub fn disconnect(mut self) -> S {
        let _ = self
            .s
            .write_all(&proto::request(0, proto::CMD_DISC, 0, 0, 0));
        let _ = self.s.flush();
        self.s
    }
}

#[cfg(test)]
mod tests {
    //! A scripted server on a socket pair: hostile or broken replies give clean
    //! errors, never panics or oversized allocations.
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::thread;

    fn opt_reply(opt: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = proto::REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&reply.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// Serve a handshake (structured replies, base:allocation id 7, a 1 MiB export),
    /// then answer the first request with `reply(cookie)`.
    fn server(reply: impl FnOnce(u64) -> Vec<u8> + Send + 'static) -> UnixStream {
        server_batches(vec![(1, Box::new(move |r: &[Req]| reply(r[0].0)))])
    }

    /// A request as the server saw it: (cookie, offset, length).
    type Req = (u64, u64, u32);
    type Batch = (usize, Box<dyn FnOnce(&[Req]) -> Vec<u8> + Send>);

    /// The handshake of [`server`], then per batch: read that many requests, write
    /// what the batch's function makes of them.
    fn server_batches(batches: Vec<Batch>) -> UnixStream {
        let (a, mut b) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let mut g = proto::NBDMAGIC.to_be_bytes().to_vec();
            g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
            g.extend_from_slice(&3u16.to_be_bytes());
            b.write_all(&g).unwrap();
            let mut cf = [0u8; 4];
            b.read_exact(&mut cf).unwrap();
            loop {
                let mut h = [0u8; 16];
                if b.read_exact(&mut h).is_err() {
                    return;
                }
                let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let mut d = vec![0u8; len as usize];
                b.read_exact(&mut d).unwrap();
                match opt {
                    proto::OPT_STRUCTURED_REPLY => {
                        b.write_all(&opt_reply(opt, proto::REP_ACK, &[])).unwrap()
                    }
                    proto::OPT_SET_META_CONTEXT => {
                        let mut p = 7u32.to_be_bytes().to_vec();
                        p.extend_from_slice(b"base:allocation");
                        b.write_all(&opt_reply(opt, proto::REP_META_CONTEXT, &p))
                            .unwrap();
                        b.write_all(&opt_reply(opt, proto::REP_ACK, &[])).unwrap();
                    }
                    proto::OPT_GO => {
                        let mut p = proto::INFO_EXPORT.to_be_bytes().to_vec();
                        p.extend_from_slice(&(1u64 << 20).to_be_bytes());
                        p.extend_from_slice(&3u16.to_be_bytes());
                        b.write_all(&opt_reply(opt, proto::REP_INFO, &p)).unwrap();
                        b.write_all(&opt_reply(opt, proto::REP_ACK, &[])).unwrap();
                        break;
                    }
                    _ => b
                        .write_all(&opt_reply(opt, proto::REP_FLAG_ERROR | 1, &[]))
                        .unwrap(),
                }
            }
            for (n, reply) in batches {
                let mut reqs = Vec::new();
                for _ in 0..n {
                    let mut req = [0u8; 28];
                    if b.read_exact(&mut req).is_err() {
                        return;
                    }
                    reqs.push((
                        u64::from_be_bytes(req[8..16].try_into().unwrap()),
                        u64::from_be_bytes(req[16..24].try_into().unwrap()),
                        u32::from_be_bytes(req[24..28].try_into().unwrap()),
                    ));
                }
                if b.write_all(&reply(&reqs)).is_err() {
                    return;
                }
            }
        });
        a
    }

    fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8], declared: Option<u32>) -> Vec<u8> {
        let mut v = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&declared.unwrap_or(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn read_with(
        reply: impl FnOnce(u64) -> Vec<u8> + Send + 'static,
    ) -> Result<Vec<u8>, ConnError> {
        let mut c = NbdConn::handshake(server(reply), "").unwrap();
        assert_eq!(
            (c.size, c.allocation_ctx, c.structured),
            (1 << 20, Some(7), true)
        );
        let mut buf = vec![0xAA; 4096];
        c.read(0, &mut buf).map(|_| buf)
    }

    #[test]
    fn good_structured_read_with_data_and_hole() {
        let buf = read_with(|c| {
            let mut d = 0u64.to_be_bytes().to_vec();
            d.extend_from_slice(&[5u8; 1024]);
            let mut h = 1024u64.to_be_bytes().to_vec();
            h.extend_from_slice(&3072u32.to_be_bytes());
            let mut v = chunk(0, proto::REPLY_TYPE_OFFSET_DATA, c, &d, None);
            v.extend(chunk(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_HOLE,
                c,
                &h,
                None,
            ));
            v
        })
        .unwrap();
        assert!(buf[..1024].iter().all(|&b| b == 5) && buf[1024..].iter().all(|&b| b == 0));
    }

    #[test]
    fn hostile_replies_are_clean_errors() {
        // Oversized declared length: refused before any allocation.
        let e = read_with(|c| {
            chunk(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_DATA,
                c,
                &[],
                Some(u32::MAX),
            )
        })
        .unwrap_err();
        assert!(e.to_string().contains("exceeds the limit"), "{e}");
        // Wrong cookie.
        let e = read_with(|c| {
            chunk(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_NONE,
                c + 99,
                &[],
                None,
            )
        })
        .unwrap_err();
        assert!(e.to_string().contains("unknown cookie"), "{e}");
        // Data outside the requested range.
        let e = read_with(|c| {
            let mut d = 8192u64.to_be_bytes().to_vec();
            d.extend_from_slice(&[1u8; 16]);
            chunk(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_DATA,
                c,
                &d,
                None,
            )
        })
        .unwrap_err();
        assert!(e.to_string().contains("outside the request"), "{e}");
        // DONE before the whole range was covered.
        let e = read_with(|c| {
            let mut d = 0u64.to_be_bytes().to_vec();
            d.extend_from_slice(&[1u8; 16]);
            chunk(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_DATA,
                c,
                &d,
                None,
            )
        })
        .unwrap_err();
        assert!(e.to_string().contains("covered 16 of 4096"), "{e}");
        // A server error mid-stream with its message.
        let e = read_with(error_chunk).unwrap_err();
        assert!(
            e.to_string().contains("EIO") && e.to_string().contains("disk"),
            "{e}"
        );
        // Garbage instead of a reply, and a connection that just closes.
        let e = read_with(|_| b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
        let e = read_with(|_| Vec::new()).unwrap_err();
        assert!(matches!(e, ConnError::Io(_)), "{e}");
    }

    /// The server's EIO for `cookie`, with the message "disk", as the last chunk.
    fn error_chunk(cookie: u64) -> Vec<u8> {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&4u16.to_be_bytes());
        p.extend_from_slice(b"disk");
        chunk(
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_ERROR_BIT | 1,
            cookie,
            &p,
            None,
        )
    }

    /// A data chunk for `len` bytes of `byte` at `at`.
    fn data(flags: u16, cookie: u64, at: u64, byte: u8, len: usize) -> Vec<u8> {
        let mut d = at.to_be_bytes().to_vec();
        d.extend(std::iter::repeat_n(byte, len));
        chunk(flags, proto::REPLY_TYPE_OFFSET_DATA, cookie, &d, None)
    }

    #[test]
    fn a_read_is_several_requests_in_flight_answered_out_of_order() {
        // 16 KiB with a 4 KiB request limit: four requests sent before any reply;
        // the server answers them out of order with chunks interleaved.
        let stream = server_batches(vec![(
            4,
            Box::new(|r: &[Req]| {
                assert_eq!(
                    r.iter().map(|x| (x.1, x.2)).collect::<Vec<_>>(),
                    [(0, 4096), (4096, 4096), (8192, 4096), (12288, 4096)]
                );
                let done = proto::REPLY_FLAG_DONE;
                let mut v = data(done, r[3].0, 12288, 3, 4096);
                v.extend(data(0, r[1].0, 4096, 1, 2048));
                let mut h = 0u64.to_be_bytes().to_vec();
                h.extend_from_slice(&4096u32.to_be_bytes());
                v.extend(chunk(done, proto::REPLY_TYPE_OFFSET_HOLE, r[0].0, &h, None));
                v.extend(data(0, r[2].0, 8192, 2, 4096));
                v.extend(data(done, r[1].0, 6144, 1, 2048));
                v.extend(chunk(done, proto::REPLY_TYPE_NONE, r[2].0, &[], None));
                v
            }),
        )]);
        let mut c = NbdConn::handshake(stream, "").unwrap();
        c.max_request = 4096;
        let mut buf = vec![0xAA; 16384];
        c.read(0, &mut buf).unwrap();
        for (i, part) in buf.chunks(4096).enumerate() {
            assert!(part.iter().all(|&b| b == i as u8), "piece {i}");
        }
    }

    #[test]
    fn a_server_error_for_one_piece_drains_the_others_and_keeps_the_connection() {
        let done = proto::REPLY_FLAG_DONE;
        let stream = server_batches(vec![
            (
                3,
                Box::new(move |r: &[Req]| {
                    let mut v = error_chunk(r[1].0);
                    v.extend(data(done, r[0].0, 0, 7, 4096));
                    v.extend(data(done, r[2].0, 8192, 7, 4096));
                    v
                }),
            ),
            (1, Box::new(move |r: &[Req]| data(done, r[0].0, 0, 9, 4096))),
        ]);
        let mut c = NbdConn::handshake(stream, "").unwrap();
        c.max_request = 4096;
        let mut buf = vec![0u8; 3 * 4096];
        let e = c.read(0, &mut buf).unwrap_err();
        assert!(
            matches!(&e, ConnError::Proto(ProtoError::Command { .. }))
                && e.to_string().contains("disk"),
            "{e}"
        );
        // Every reply of the failed read was consumed: the next read gets its own.
        let mut buf = vec![0u8; 4096];
        c.read(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 9));
    }

    #[test]
    fn a_reply_for_a_piece_already_done_is_an_unknown_cookie() {
        let done = proto::REPLY_FLAG_DONE;
        let stream = server_batches(vec![(
            2,
            Box::new(move |r: &[Req]| {
                let mut v = data(done, r[0].0, 0, 1, 4096);
                v.extend(data(done, r[0].0, 0, 1, 4096));
                v
            }),
        )]);
        let mut c = NbdConn::handshake(stream, "").unwrap();
        c.max_request = 4096;
        let mut buf = vec![0u8; 8192];
        let e = c.read(0, &mut buf).unwrap_err();
        assert!(e.to_string().contains("unknown cookie"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
        /// Any sequence of reply chunks (right or wrong cookies, any kind, flags,
        /// declared length and payload) to a 4-request read gives Ok or a clean
        /// error, never a panic, a hang or an allocation from a length field.
        #[test]
        fn arbitrary_replies_to_a_pipelined_read_never_panic(
            chunks in proptest::collection::vec(
                (0usize..5, proptest::prelude::any::<u16>(), 0u16..4,
                 proptest::prelude::any::<u64>(), proptest::option::of(0u32..20_000),
                 proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)),
                0..12),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..32),
        ) {
            let stream = server_batches(vec![(
                4,
                Box::new(move |r: &[Req]| {
                    let mut v = Vec::new();
                    for (who, flags, kind, at, declared, payload) in chunks {
                        let cookie = r.get(who).map(|x| x.0).unwrap_or(u64::MAX);
                        let kind = [
                            proto::REPLY_TYPE_OFFSET_DATA,
                            proto::REPLY_TYPE_OFFSET_HOLE,
                            proto::REPLY_TYPE_NONE,
                            proto::REPLY_TYPE_ERROR_BIT | 1,
                        ][kind as usize];
                        let mut p = (at % 20_000).to_be_bytes().to_vec();
                        p.extend_from_slice(&payload);
                        v.extend(chunk(flags, kind, cookie, &p, declared));
                    }
                    v.extend_from_slice(&tail);
                    v
                }),
            )]);
            let mut c = NbdConn::handshake(stream, "").unwrap();
            c.max_request = 4096;
            let mut buf = vec![0u8; 16384];
            let _ = c.read(0, &mut buf);
        }
    }
}
