//! TLS for NBD-SSL data connections, with received records opened in place.
//!
//! rustls runs the handshake (its unbuffered API): cipher and version choice,
//! server certificate verification, the client certificate. It then hands over the
//! negotiated traffic keys through its kernel-TLS interface
//! ([`rustls::kernel`]), and this module protects the application records itself
//! with ring's AEADs, as kernel TLS would. Ciphertext is read from the socket in
//! large reads, opened where it lies, and copied once into the caller's buffer.
//! rustls's own record layer copies each received byte three more times (socket
//! buffer, deframer, plaintext queue, caller), which was about a quarter of
//! ferry's CPU time on the NBD-SSL read path.
//!
//! Owns: record framing for TLS 1.3 and 1.2 with AES-128-GCM, AES-256-GCM and
//! ChaCha20-Poly1305 (every suite ferry's rustls provider offers), nonces and
//! sequence numbers, alerts, and the post-handshake messages a client must handle
//! (TLS 1.3 NewSessionTicket and KeyUpdate, through rustls's `KernelConnection`;
//! a TLS 1.2 HelloRequest is ignored, renegotiation is refused).
//! Must not: negotiate, verify certificates (rustls does), or know NBD.

use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};
use std::io::{self, Read, Write};
use std::sync::Arc;
use zeroize::Zeroize;

/// Largest plaintext a record may carry (RFC 8446 §5.1, RFC 5246 §6.2.1).
const MAX_PLAINTEXT: usize = 1 << 14;
/// Largest record body accepted: TLS 1.2 allows 2048 bytes of expansion, TLS 1.3
/// 256 (checked separately).
const MAX_BODY: usize = MAX_PLAINTEXT + 2048;
const HEADER: usize = 5;
const TAG: usize = 16;
/// Bytes asked of the socket per read: one read brings in about 16 records.
const READ_BUFFER: usize = 256 * 1024;
/// Records one key may seal before TLS 1.3 switches keys (the smallest of
/// rustls's confidentiality limits, AES-256-GCM's 2^23).
const TX_KEY_LIMIT: u64 = 1 << 23;
/// Post-handshake handshake bytes buffered while a message is incomplete.
const MAX_HANDSHAKE_MESSAGE: usize = 64 * 1024;

const CT_ALERT: u8 = 21;
const CT_HANDSHAKE: u8 = 22;
const CT_APPDATA: u8 = 23;
const HS_HELLO_REQUEST: u8 = 0;
const HS_NEW_SESSION_TICKET: u8 = 4;
const HS_KEY_UPDATE: u8 = 24;

fn proto(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {}", msg.into()))
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The negotiated protocol version, as far as records are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    Tls12,
    Tls13,
}

/// One direction's key, IV and sequence number.
struct Direction {
    key: ring::aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    /// TLS 1.2 AES-GCM: the nonce is the IV's first 4 bytes and an explicit 8
    /// bytes carried in each record.
    explicit_nonce: bool,
}

impl Drop for Direction {
    fn drop(&mut self) {
        self.iv.zeroize();
    }
}

impl Direction {
    fn new(version: Version, seq: u64, secrets: ConnectionTrafficSecrets) -> io::Result<Self> {
        let (alg, key, iv, gcm) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&ring::aead::AES_128_GCM, key, iv, true)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&ring::aead::AES_256_GCM, key, iv, true)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&ring::aead::CHACHA20_POLY1305, key, iv, false)
            }
            _ => return Err(proto("the negotiated cipher is not supported")),
        };
        let key = ring::aead::UnboundKey::new(alg, key.as_ref())
            .map_err(|_| proto("bad traffic key length"))?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| proto("bad traffic IV length"))?;
        Ok(Direction {
            key: ring::aead::LessSafeKey::new(key),
            iv,
            seq,
            explicit_nonce: version == Version::Tls12 && gcm,
        })
    }

    /// IV XOR the 64-bit sequence number (RFC 8446 §5.3; RFC 7905; the TLS 1.2
    /// GCM explicit nonce ferry sends is this nonce's last 8 bytes, as rustls's).
    fn xor_nonce(&self) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    /// Open `in_out` (ciphertext then tag) in place; the plaintext part.
    fn open<'a>(
        &self,
        nonce: [u8; 12],
        aad: &[u8],
        in_out: &'a mut [u8],
    ) -> io::Result<&'a mut [u8]> {
        self.key
            .open_in_place(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(aad),
                in_out,
            )
            .map_err(|_| proto("a record failed authentication (bad_record_mac)"))
    }

    /// Encrypt `in_out` in place; the tag to append.
    fn seal(&self, nonce: [u8; 12], aad: &[u8], in_out: &mut [u8]) -> io::Result<ring::aead::Tag> {
        self.key
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(aad),
                in_out,
            )
            .map_err(|_| proto("seal failed"))
    }

    fn next_seq(&mut self) -> io::Result<()> {
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| proto("record sequence number exhausted"))?;
        Ok(())
    }
}

/// TLS 1.2 additional data: sequence number, type, version, plaintext length.
fn aad12(seq: u64, typ: u8, len: usize) -> [u8; 13] {
    let mut a = [0u8; 13];
    a[..8].copy_from_slice(&seq.to_be_bytes());
    a[8] = typ;
    a[9..11].copy_from_slice(&[3, 3]);
    a[11..].copy_from_slice(&(len as u16).to_be_bytes());
    a
}

/// A client TLS connection over `S` whose records ferry protects itself.
pub struct TlsRecords<S> {
    sock: S,
    conn: KernelConnection<ClientConnectionData>,
    version: Version,
    rx: Direction,
    tx: Direction,
    /// Received bytes: `[start..end]` not yet opened; `pt` is the opened
    /// plaintext of the current application record not yet handed out.
    rbuf: Vec<u8>,
    start: usize,
    end: usize,
    pt: std::ops::Range<usize>,
    /// Post-handshake handshake bytes of an incomplete message.
    hs: Vec<u8>,
    /// Application data rustls decrypted during the handshake (normally none).
    early: Vec<u8>,
    /// The peer sent close_notify.
    closed: bool,
    /// A record failed to open or the peer broke the protocol: the stream is dead.
    broken: Option<String>,
    /// Sealed records waiting to be written.
    wbuf: Vec<u8>,
    /// Records one transmit key may seal ([`TX_KEY_LIMIT`]; lowered by tests).
    tx_limit: u64,
}

impl<S: Read + Write> TlsRecords<S> {
    /// Run the handshake on `sock` (already connected, nothing read from it yet
    /// beyond what precedes TLS) and take over the record layer.
    pub fn connect(
        mut sock: S,
        config: &rustls::ClientConfig,
        name: rustls_pki_types::ServerName<'static>,
    ) -> io::Result<Self> {
        let mut config = config.clone();
        config.enable_secret_extraction = true;
        let mut conn = rustls::client::UnbufferedClientConnection::new(Arc::new(config), name)
            .map_err(tls_err)?;
        let mut rbuf = vec![0u8; READ_BUFFER + HEADER + MAX_BODY];
        let mut end = 0usize;
        let mut out = vec![0u8; 4096];
        let mut out_len = 0usize;
        let mut early = Vec::new();
        loop {
            let UnbufferedStatus { mut discard, state } =
                conn.process_tls_records(&mut rbuf[..end]);
            let mut done = false;
            match state.map_err(tls_err)? {
                ConnectionState::EncodeTlsData(mut st) => loop {
                    match st.encode(&mut out[out_len..]) {
                        Ok(n) => {
                            out_len += n;
                            break;
                        }
                        Err(EncodeError::InsufficientSize(e)) => {
                            out.resize(out_len + e.required_size, 0)
                        }
                        Err(EncodeError::AlreadyEncoded) => break,
                    }
                },
                ConnectionState::TransmitTlsData(st) => {
                    sock.write_all(&out[..out_len])?;
                    sock.flush()?;
                    out_len = 0;
                    st.done();
                }
                ConnectionState::BlockedHandshake => {
                    if end == rbuf.len() {
                        return Err(proto("handshake message too large"));
                    }
                    let n = sock.read(&mut rbuf[end..])?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "TLS: the server closed the connection during the handshake",
                        ));
                    }
                    end += n;
                }
                ConnectionState::ReadTraffic(mut st) => {
                    while let Some(rec) = st.next_record() {
                        let rec = rec.map_err(tls_err)?;
                        discard += rec.discard;
                        early.extend_from_slice(rec.payload);
                    }
                }
                ConnectionState::WriteTraffic(_) => done = true,
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "TLS: the server closed the connection during the handshake",
                    ))
                }
                _ => return Err(proto("unexpected handshake state")),
            }
            rbuf.copy_within(discard..end, 0);
            end -= discard;
            if done {
                break;
            }
        }
        if out_len > 0 {
            sock.write_all(&out[..out_len])?;
            sock.flush()?;
        }
        let (secrets, kconn) = conn.dangerous_into_kernel_connection().map_err(tls_err)?;
        let version = match kconn.protocol_version() {
            ProtocolVersion::TLSv1_3 => Version::Tls13,
            ProtocolVersion::TLSv1_2 => Version::Tls12,
            v => return Err(proto(format!("unsupported protocol version {v:?}"))),
        };
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        Ok(TlsRecords {
            sock,
            conn: kconn,
            version,
            rx: Direction::new(version, rx_seq, rx)?,
            tx: Direction::new(version, tx_seq, tx)?,
            rbuf,
            start: 0,
            end,
            pt: 0..0,
            hs: Vec::new(),
            early,
            closed: false,
            broken: None,
            wbuf: Vec::new(),
            tx_limit: TX_KEY_LIMIT,
        })
    }

    /// The negotiated protocol version and cipher suite, for logs.
    pub fn describe(&self) -> String {
        format!(
            "{:?} {:?}",
            self.conn.protocol_version(),
            self.conn.negotiated_cipher_suite().suite()
        )
    }

    /// Open the next record into `self.pt` (application data), or handle it
    /// (alert, handshake message). Returns false at close_notify.
    fn next_record(&mut self) -> io::Result<bool> {
        let body = loop {
            let avail = self.end - self.start;
            if avail >= HEADER {
                let h = &self.rbuf[self.start..self.start + HEADER];
                let len = u16::from_be_bytes([h[3], h[4]]) as usize;
                if len > MAX_BODY || (self.version == Version::Tls13 && len > MAX_PLAINTEXT + 256) {
                    return Err(proto(format!("record of {len} bytes is over the limit")));
                }
                if avail >= HEADER + len {
                    break len;
                }
            }
            // Move the partial record (under one record's worth) to the front
            // when the room behind it is short, so reads stay large.
            if self.rbuf.len() - self.end < READ_BUFFER / 4 {
                self.rbuf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = self.sock.read(&mut self.rbuf[self.end..])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "TLS: the server closed the connection without close_notify",
                ));
            }
            self.end += n;
        };
        let at = self.start;
        self.start += HEADER + body;
        let mut header = [0u8; HEADER];
        header.copy_from_slice(&self.rbuf[at..at + HEADER]);
        let (typ, range) = self.open(header, at + HEADER, body)?;
        // Handshake messages are not interleaved with other records, and come in
        // non-empty fragments (RFC 8446 §5.1).
        if (typ == CT_HANDSHAKE && range.is_empty()) || (typ != CT_HANDSHAKE && !self.hs.is_empty())
        {
            return Err(proto("malformed post-handshake message"));
        }
        match typ {
            CT_APPDATA => {
                self.pt = range;
                Ok(true)
            }
            CT_ALERT => self.alert(range),
            CT_HANDSHAKE => {
                if self.hs.len() + range.len() > MAX_HANDSHAKE_MESSAGE {
                    return Err(proto("post-handshake message too large"));
                }
                self.hs.extend_from_slice(&self.rbuf[range]);
                self.handshake_messages()?;
                Ok(true)
            }
            t => Err(proto(format!("unexpected record type {t}"))),
        }
    }

    /// Open the record whose body is `rbuf[at..at + len]` in place; returns its
    /// content type and plaintext range.
    fn open(
        &mut self,
        header: [u8; HEADER],
        at: usize,
        len: usize,
    ) -> io::Result<(u8, std::ops::Range<usize>)> {
        let rx = &mut self.rx;
        let out = match self.version {
            Version::Tls13 => {
                if header[0] != CT_APPDATA || len < TAG + 1 {
                    return Err(proto(format!(
                        "unexpected TLS 1.3 record (type {}, {len} bytes)",
                        header[0]
                    )));
                }
                let pt = rx.open(rx.xor_nonce(), &header, &mut self.rbuf[at..at + len])?;
                // Inner plaintext: content, then the real type, then zero padding.
                let Some(last) = pt.iter().rposition(|&b| b != 0) else {
                    return Err(proto("record without a content type"));
                };
                if last > MAX_PLAINTEXT {
                    return Err(proto("record plaintext over 16 KiB"));
                }
                (pt[last], at..at + last)
            }
            Version::Tls12 => {
                let typ = header[0];
                let (nonce, body_at) = if rx.explicit_nonce {
                    if len < 8 + TAG {
                        return Err(proto("short record"));
                    }
                    let mut n = [0u8; 12];
                    n[..4].copy_from_slice(&rx.iv[..4]);
                    n[4..].copy_from_slice(&self.rbuf[at..at + 8]);
                    (n, at + 8)
                } else {
                    if len < TAG {
                        return Err(proto("short record"));
                    }
                    (rx.xor_nonce(), at)
                };
                let plen = at + len - body_at - TAG;
                if plen > MAX_PLAINTEXT {
                    return Err(proto("record plaintext over 16 KiB"));
                }
                let aad = aad12(rx.seq, typ, plen);
                rx.open(nonce, &aad, &mut self.rbuf[body_at..at + len])?;
                (typ, body_at..body_at + plen)
            }
        };
        rx.next_seq()?;
        Ok(out)
    }

    fn alert(&mut self, range: std::ops::Range<usize>) -> io::Result<bool> {
        let a = &self.rbuf[range];
        if a.len() != 2 {
            return Err(proto("malformed alert"));
        }
        match (a[0], a[1]) {
            (_, 0) => {
                self.closed = true;
                Ok(false)
            }
            // user_canceled (close_notify follows), and TLS 1.2 warnings.
            (_, 90) => Ok(true),
            (1, d) if self.version == Version::Tls12 => {
                tracing::debug!(alert = d, "TLS: ignoring a warning alert");
                Ok(true)
            }
            (_, d) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("TLS: the server sent alert {d} (level {})", a[0]),
            )),
        }
    }

    /// Handle every complete message in `self.hs`.
    fn handshake_messages(&mut self) -> io::Result<()> {
        loop {
            if self.hs.len() < 4 {
                return Ok(());
            }
            let len = u32::from_be_bytes([0, self.hs[1], self.hs[2], self.hs[3]]) as usize;
            if 4 + len > MAX_HANDSHAKE_MESSAGE {
                return Err(proto("post-handshake message too large"));
            }
            if self.hs.len() < 4 + len {
                return Ok(());
            }
            let typ = self.hs[0];
            let msg: Vec<u8> = self.hs.drain(..4 + len).collect();
            let body = &msg[4..];
            match (self.version, typ) {
                (Version::Tls13, HS_NEW_SESSION_TICKET) => {
                    self.conn.handle_new_session_ticket(body).map_err(tls_err)?
                }
                (Version::Tls13, HS_KEY_UPDATE) => {
                    // A key change must end its record (RFC 8446 §5.1).
                    if !self.hs.is_empty() || body.len() != 1 || body[0] > 1 {
                        return Err(proto("malformed KeyUpdate"));
                    }
                    let (seq, secrets) = self.conn.update_rx_secret().map_err(tls_err)?;
                    self.rx = Direction::new(self.version, seq, secrets)?;
                    if body[0] == 1 {
                        self.update_tx_key()?;
                        self.flush_records()
                            .map_err(|e| proto(format!("sending KeyUpdate: {e}")))?;
                    }
                }
                (Version::Tls12, HS_HELLO_REQUEST) if len == 0 => {
                    tracing::debug!("TLS: ignoring a HelloRequest (no renegotiation)");
                }
                (_, t) => return Err(proto(format!("unexpected handshake message {t}"))),
            }
        }
    }

    /// TLS 1.3: send KeyUpdate(update_not_requested) under the current key, then
    /// switch to the next one.
    fn update_tx_key(&mut self) -> io::Result<()> {
        self.seal(CT_HANDSHAKE, &[HS_KEY_UPDATE, 0, 0, 1, 0])?;
        let (seq, secrets) = self.conn.update_tx_secret().map_err(tls_err)?;
        self.tx = Direction::new(self.version, seq, secrets)?;
        Ok(())
    }

    /// Append one sealed record carrying `data` (at most 16 KiB) to `wbuf`.
    fn seal(&mut self, typ: u8, data: &[u8]) -> io::Result<()> {
        debug_assert!(data.len() <= MAX_PLAINTEXT);
        if self.tx.seq >= self.tx_limit && typ == CT_APPDATA {
            if self.version == Version::Tls12 {
                return Err(proto(
                    "this TLS 1.2 key has sealed as many records as is safe; reconnect",
                ));
            }
            self.update_tx_key()?;
        }
        let tx = &mut self.tx;
        let at = self.wbuf.len();
        let nonce = tx.xor_nonce();
        // Header (and TLS 1.2 explicit nonce) and plaintext; then the additional
        // data and where the part to encrypt starts.
        let mut aad = [0u8; 13];
        let (aad_len, body) = match self.version {
            Version::Tls13 => {
                let len = data.len() + 1 + TAG;
                let header = [CT_APPDATA, 3, 3, (len >> 8) as u8, len as u8];
                self.wbuf.extend_from_slice(&header);
                self.wbuf.extend_from_slice(data);
                self.wbuf.push(typ);
                aad[..HEADER].copy_from_slice(&header);
                (HEADER, at + HEADER)
            }
            Version::Tls12 => {
                let explicit = if tx.explicit_nonce { 8 } else { 0 };
                let len = explicit + data.len() + TAG;
                self.wbuf
                    .extend_from_slice(&[typ, 3, 3, (len >> 8) as u8, len as u8]);
                if tx.explicit_nonce {
                    self.wbuf.extend_from_slice(&nonce[4..]);
                }
                self.wbuf.extend_from_slice(data);
                aad = aad12(tx.seq, typ, data.len());
                (aad.len(), at + HEADER + explicit)
            }
        };
        let tag = tx.seal(nonce, &aad[..aad_len], &mut self.wbuf[body..])?;
        self.wbuf.extend_from_slice(tag.as_ref());
        tx.next_seq()
    }

    /// Send close_notify (RFC 8446 §6.1): the peer sees a clean end, not a
    /// truncation. Nothing is sent on a stream that is already dead.
    pub fn close_notify(&mut self) -> io::Result<()> {
        if let Some(why) = &self.broken {
            return Err(proto(format!(
                "connection unusable after an earlier error: {why}"
            )));
        }
        self.seal(CT_ALERT, &[1, 0])?;
        self.flush_records()?;
        self.sock.flush()
    }

    fn flush_records(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            let r = self.sock.write_all(&self.wbuf);
            self.wbuf.clear();
            r?;
        }
        Ok(())
    }

    /// Record a read error: a timeout or interruption leaves the buffers
    /// consistent; anything else (a forged record, a protocol violation) ends the
    /// stream for good.
    fn fail(&mut self, e: io::Error) -> io::Error {
        if !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
        ) {
            self.broken = Some(e.to_string());
        }
        e
    }
}

impl<S: Read + Write> Read for TlsRecords<S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if !self.early.is_empty() {
            let n = out.len().min(self.early.len());
            out[..n].copy_from_slice(&self.early[..n]);
            self.early.drain(..n);
            return Ok(n);
        }
        loop {
            if !self.pt.is_empty() {
                let n = out.len().min(self.pt.len());
                out[..n].copy_from_slice(&self.rbuf[self.pt.start..self.pt.start + n]);
                self.pt.start += n;
                return Ok(n);
            }
            if self.closed {
                return Ok(0);
            }
            if let Some(why) = &self.broken {
                return Err(proto(format!(
                    "connection unusable after an earlier error: {why}"
                )));
            }
            match self.next_record() {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                Err(e) => return Err(self.fail(e)),
            }
        }
    }
}

impl<S: Read + Write> Write for TlsRecords<S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(why) = &self.broken {
            return Err(proto(format!(
                "connection unusable after an earlier error: {why}"
            )));
        }
        // Seal up to READ_BUFFER bytes per call and send them in one write.
        let take = data.len().min(READ_BUFFER);
        // Any failure here (even a timeout, after which part of a record may
        // have been sent) leaves the peer's view unknown: the stream is dead.
        let sealed = data[..take]
            .chunks(MAX_PLAINTEXT)
            .try_for_each(|piece| self.seal(CT_APPDATA, piece));
        match sealed.and_then(|()| self.flush_records()) {
            Ok(()) => Ok(take),
            Err(e) => {
                self.wbuf.clear();
                self.broken = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::ring::cipher_suite as cs;
    use rustls::{ServerConnection, StreamOwned, SupportedCipherSuite};
    use std::os::unix::net::UnixStream;
    use std::thread::JoinHandle;

    type Server = StreamOwned<ServerConnection, UnixStream>;

    struct Pki {
        _dir: tempfile::TempDir,
        client: Arc<rustls::ClientConfig>,
        cert: Vec<rustls_pki_types::CertificateDer<'static>>,
        key_pem: String,
    }

    fn pki() -> Pki {
        use rustls_pki_types::pem::PemObject;
        let ca = ferry_mocks::pki::Ca::new("records test CA").unwrap();
        let srv = ca.server(&["localhost"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca-cert.pem"), ca.cert_pem()).unwrap();
        let client = crate::tls::client_config(&dir.path().join("ca-cert.pem"), None).unwrap();
        let cert = rustls_pki_types::CertificateDer::pem_slice_iter(srv.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        Pki {
            _dir: dir,
            client,
            cert,
            key_pem: srv.key_pem,
        }
    }

    fn server_config(p: &Pki, suite: SupportedCipherSuite) -> Arc<rustls::ServerConfig> {
        use rustls_pki_types::pem::PemObject;
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![suite];
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(p.key_pem.as_bytes()).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[suite.version()])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(p.cert.clone(), key)
            .unwrap();
        Arc::new(cfg)
    }

    /// A client connected to a rustls server running `script` in a thread. The
    /// script starts once the client has finished its handshake and sent "go", so
    /// what the script sends reaches the record layer, not the handshake; the
    /// server answers "ok" once its side is done too (TLS 1.3 servers send their
    /// session tickets after the handshake), so a client that closes early never
    /// races those writes into a broken pipe.
    fn pair(
        suite: SupportedCipherSuite,
        script: impl FnOnce(&mut Server) + Send + 'static,
    ) -> (TlsRecords<UnixStream>, JoinHandle<()>) {
        let p = pki();
        let (a, b) = UnixStream::pair().unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
                .unwrap();
        }
        let scfg = server_config(&p, suite);
        let server = std::thread::spawn(move || {
            let mut s = StreamOwned::new(ServerConnection::new(scfg).unwrap(), b);
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock).unwrap();
            }
            let mut go = [0u8; 2];
            s.read_exact(&mut go).unwrap();
            assert_eq!(&go, b"go");
            s.write_all(b"ok").unwrap();
            s.flush().unwrap();
            script(&mut s);
        });
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut client = TlsRecords::connect(a, &p.client, name).unwrap();
        client.write_all(b"go").unwrap();
        let mut ok = [0u8; 2];
        client.read_exact(&mut ok).unwrap();
        assert_eq!(&ok, b"ok");
        (client, server)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    /// The raw TLS bytes the server would send for `data`.
    fn sealed_by(s: &mut Server, data: &[u8]) -> Vec<u8> {
        s.conn.writer().write_all(data).unwrap();
        let mut raw = Vec::new();
        while s.conn.wants_write() {
            s.conn.write_tls(&mut raw).unwrap();
        }
        raw
    }

    const SUITES: [SupportedCipherSuite; 6] = [
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ];

    #[test]
    fn every_suite_carries_data_both_ways_and_ends_at_close_notify() {
        for suite in SUITES {
            let (mut c, server) = pair(suite, |s| {
                // Echo what the client sends, then a megabyte in uneven writes.
                let mut got = vec![0u8; 100_000];
                s.read_exact(&mut got).unwrap();
                s.write_all(&got).unwrap();
                let big = pattern(1 << 20, 7);
                for piece in big.chunks(12_345) {
                    s.write_all(piece).unwrap();
                }
                s.conn.send_close_notify();
                s.conn.complete_io(&mut s.sock).unwrap();
            });
            assert!(
                c.describe().contains(&format!("{:?}", suite.suite())),
                "{}",
                c.describe()
            );
            let sent = pattern(100_000, 1);
            c.write_all(&sent).unwrap();
            let mut echo = vec![0u8; sent.len()];
            c.read_exact(&mut echo).unwrap();
            assert_eq!(echo, sent, "{suite:?}");
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).unwrap();
            assert_eq!(rest, pattern(1 << 20, 7), "{suite:?}");
            assert_eq!(c.read(&mut [0u8; 8]).unwrap(), 0, "EOF stays EOF");
            server.join().unwrap();
        }
    }

    #[test]
    fn close_notify_ends_the_stream_cleanly_for_the_server() {
        for suite in SUITES {
            let (mut c, server) = pair(suite, |s| {
                let mut got = Vec::new();
                // rustls's stream gives EOF only at close_notify; a bare
                // close would be UnexpectedEof.
                s.read_to_end(&mut got).unwrap();
                assert_eq!(got, b"bye");
            });
            c.write_all(b"bye").unwrap();
            c.close_notify().unwrap();
            drop(c);
            server.join().unwrap();
        }
    }

    #[test]
    fn key_update_requested_by_the_server_switches_both_directions() {
        let (mut c, server) = pair(cs::TLS13_AES_256_GCM_SHA384, |s| {
            s.write_all(b"before").unwrap();
            s.conn.refresh_traffic_keys().unwrap();
            s.write_all(b"after").unwrap();
            s.flush().unwrap();
            // The client's reply is sealed under its new key.
            let mut got = [0u8; 5];
            s.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"reply");
            s.write_all(b"done").unwrap();
        });
        let mut got = [0u8; 11];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"beforeafter");
        c.write_all(b"reply").unwrap();
        let mut done = [0u8; 4];
        c.read_exact(&mut done).unwrap();
        assert_eq!(&done, b"done");
        server.join().unwrap();
    }

    #[test]
    fn a_forged_record_is_refused_and_the_stream_stays_dead() {
        for suite in [
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ] {
            let (mut c, server) = pair(suite, |s| {
                let mut raw = sealed_by(s, b"attack at dawn");
                let last = raw.len() - 3;
                raw[last] ^= 0x40;
                s.sock.write_all(&raw).unwrap();
            });
            let e = c.read(&mut [0u8; 64]).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(e.to_string().contains("bad_record_mac"), "{e}");
            let again = c.read(&mut [0u8; 64]).unwrap_err();
            assert!(again.to_string().contains("unusable"), "{again}");
            assert!(c.write(b"x").is_err());
            server.join().unwrap();
        }
    }

    #[test]
    fn a_truncated_stream_is_an_error_not_eof() {
        let (mut c, server) = pair(cs::TLS13_AES_128_GCM_SHA256, |s| {
            let raw = sealed_by(s, &pattern(40_000, 3));
            // Half a record, then the connection drops without close_notify.
            s.sock.write_all(&raw[..raw.len() - 100]).unwrap();
        });
        server.join().unwrap();
        let mut buf = vec![0u8; 40_000];
        let e = c.read_exact(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }

    #[test]
    fn an_oversize_length_is_refused_before_reading_the_body() {
        for (suite, len) in [
            (cs::TLS13_AES_128_GCM_SHA256, 16_384 + 257),
            (cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, 16_384 + 2049),
        ] {
            let (mut c, server) = pair(suite, move |s| {
                s.sock
                    .write_all(&[CT_APPDATA, 3, 3, (len >> 8) as u8, len as u8])
                    .unwrap();
                // Keep the socket open: the client must not wait for the body.
                let _ = s.sock.read(&mut [0u8; 1]);
            });
            let e = c.read(&mut [0u8; 16]).unwrap_err();
            assert!(e.to_string().contains("over the limit"), "{e}");
            drop(c);
            server.join().unwrap();
        }
    }

    #[test]
    fn the_transmit_key_is_replaced_before_its_limit_tls13_or_refused_tls12() {
        let (mut c, server) = pair(cs::TLS13_AES_128_GCM_SHA256, |s| {
            let mut got = vec![0u8; 10 * MAX_PLAINTEXT];
            s.read_exact(&mut got).unwrap();
            assert_eq!(got, pattern(10 * MAX_PLAINTEXT, 5));
        });
        c.tx_limit = 3;
        c.write_all(&pattern(10 * MAX_PLAINTEXT, 5)).unwrap();
        server.join().unwrap();

        let (mut c, server) = pair(cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, |s| {
            let _ = s.read(&mut [0u8; 16]);
        });
        c.tx_limit = c.tx.seq + 2;
        let e = c.write_all(&pattern(3 * MAX_PLAINTEXT, 5)).unwrap_err();
        assert!(e.to_string().contains("reconnect"), "{e}");
        drop(c);
        server.join().unwrap();
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]
        /// Whatever follows the handshake (garbage, or valid records with bytes
        /// flipped), reading gives data, EOF or a clean error: never a panic.
        #[test]
        fn arbitrary_bytes_after_the_handshake_never_panic(
            tls12 in proptest::bool::ANY,
            garbage in proptest::collection::vec(proptest::num::u8::ANY, 0..3000),
            flips in proptest::collection::vec((0usize..4000, 1u8..=255), 0..4),
        ) {
            let suite = if tls12 {
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            } else {
                cs::TLS13_AES_256_GCM_SHA384
            };
            let (mut c, server) = pair(suite, move |s| {
                let mut raw = sealed_by(s, &pattern(3000, 9));
                for (at, x) in flips {
                    let n = raw.len();
                    raw[at % n] ^= x;
                }
                raw.extend_from_slice(&garbage);
                let _ = s.sock.write_all(&raw);
            });
            server.join().unwrap();
            let mut sink = [0u8; 1000];
            for _ in 0..100 {
                match c.read(&mut sink) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    }
}
