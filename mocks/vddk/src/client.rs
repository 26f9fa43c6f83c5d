//! The mock VDDK's wire to the mock vCenter: one TLS connection (rustls) carrying
//! HTTP/1.1 keep-alive requests to `/mockvddk/`, with the session cookie, plus the
//! SHA-1 thumbprint of the server's leaf certificate.
//!
//! Owns sockets and framing only. It deliberately does not verify the certificate
//! chain or name: as in VDDK, the thumbprint is the pin, and comparing it is the
//! caller's job ([`crate::vddk`]). It must not panic on anything the server sends.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Why a request failed.
#[derive(Debug)]
pub enum ClientError {
    /// TCP connect or TLS handshake failed.
    Connect(String),
    /// The connection broke (closed, reset, timed out) during a request.
    Lost(String),
    /// The server answered something that is not HTTP/1.1 as expected.
    Protocol(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Connect(m) => write!(f, "cannot connect: {m}"),
            ClientError::Lost(m) => write!(f, "connection lost: {m}"),
            ClientError::Protocol(m) => write!(f, "bad answer: {m}"),
        }
    }
}

/// Accepts any certificate; the thumbprint check happens after the handshake.
#[derive(Debug)]
struct PinnedByThumbprint(Arc<CryptoProvider>);

impl ServerCertVerifier for PinnedByThumbprint {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn config() -> Result<Arc<ClientConfig>, String> {
    static CFG: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    CFG.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedByThumbprint(provider)))
            .with_no_client_auth();
        Ok(Arc::new(cfg))
    })
    .clone()
}

/// SHA-1 of a DER certificate as VDDK prints thumbprints: uppercase hex pairs
/// joined by `:`.
pub fn thumbprint(der: &[u8]) -> String {
    use sha1::Digest;
    sha1::Sha1::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One HTTPS connection to the mock vCenter.
pub struct Https {
    stream: StreamOwned<ClientConnection, TcpStream>,
    host: String,
    cookie: Option<String>,
    leftover: Vec<u8>,
    /// Thumbprint of the certificate the server presented.
    pub thumbprint: String,
}

/// An HTTP answer.
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Body.
    pub body: Vec<u8>,
}

impl Https {
    /// Connect to `server:port` and complete the TLS handshake.
    pub fn connect(server: &str, port: u16, cookie: Option<&str>) -> Result<Https, ClientError> {
        let cfg = config().map_err(ClientError::Connect)?;
        let addr = (server, port)
            .to_socket_addrs()
            .map_err(|e| ClientError::Connect(format!("{server}:{port}: {e}")))?
            .next()
            .ok_or_else(|| ClientError::Connect(format!("{server}:{port}: no address")))?;
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| ClientError::Connect(format!("{addr}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(300)));
        let _ = tcp.set_write_timeout(Some(Duration::from_secs(300)));
        let name = ServerName::try_from(server.to_string())
            .map_err(|e| ClientError::Connect(format!("server name {server:?}: {e}")))?;
        let conn = ClientConnection::new(cfg, name)
            .map_err(|e| ClientError::Connect(format!("TLS: {e}")))?;
        let mut stream = StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .map_err(|e| ClientError::Connect(format!("TLS handshake with {addr}: {e}")))?;
        }
        let thumbprint = stream
            .conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| thumbprint(c.as_ref()))
            .unwrap_or_default();
        Ok(Https {
            stream,
            host: format!("{server}:{port}"),
            cookie: cookie.map(str::to_string),
            leftover: Vec::new(),
            thumbprint,
        })
    }

    /// Send one request and read the answer (Content-Length framed).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Answer, ClientError> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ferry-mock-vddk\r\nContent-Length: {}\r\n",
            self.host,
            body.len()
        );
        if let Some(c) = &self.cookie {
            head.push_str(&format!("Cookie: vmware_soap_session=\"{c}\"\r\n"));
        }
        if let Some(t) = content_type {
            head.push_str(&format!("Content-Type: {t}\r\n"));
        }
        head.push_str("\r\n");
        let lost = |e: io::Error| ClientError::Lost(e.to_string());
        self.stream.write_all(head.as_bytes()).map_err(lost)?;
        self.stream.write_all(body).map_err(lost)?;
        self.stream.flush().map_err(lost)?;
        self.read_answer()
    }

    fn fill(&mut self) -> Result<(), ClientError> {
        let mut tmp = [0u8; 64 * 1024];
        match self.stream.read(&mut tmp) {
            Ok(0) => Err(ClientError::Lost("the server closed the connection".into())),
            Ok(n) => {
                self.leftover.extend_from_slice(&tmp[..n]);
                Ok(())
            }
            Err(e) => Err(ClientError::Lost(e.to_string())),
        }
    }

    fn read_answer(&mut self) -> Result<Answer, ClientError> {
        let end = loop {
            if let Some(i) = self.leftover.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if self.leftover.len() > 64 * 1024 {
                return Err(ClientError::Protocol("response header too long".into()));
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.leftover[..end]).to_string();
        self.leftover.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| ClientError::Protocol(format!("status line of {head:?}")))?;
        let mut len = 0usize;
        for l in lines {
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let k = k.trim().to_ascii_lowercase();
            if k == "content-length" {
                len = v
                    .trim()
                    .parse()
                    .map_err(|_| ClientError::Protocol(format!("content-length {v:?}")))?;
            } else if k == "transfer-encoding" && v.trim().eq_ignore_ascii_case("chunked") {
                return Err(ClientError::Protocol(
                    "chunked answers are not expected".into(),
                ));
            }
        }
        if len > 64 << 20 {
            return Err(ClientError::Protocol(format!("answer of {len} bytes")));
        }
        while self.leftover.len() < len {
            self.fill()?;
        }
        let body: Vec<u8> = self.leftover.drain(..len).collect();
        Ok(Answer { status, body })
    }
}
