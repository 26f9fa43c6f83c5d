//! Blocking KMIP client over mutual TLS (rustls): one kept-alive connection (TLS
//! sessions are resumed on reconnect through the client configuration's session
//! cache, which lives as long as the client), connect and I/O timeouts, bounded
//! retries with backoff on transient failures, version negotiation with
//! DiscoverVersions. The client certificate comes from PEM files or a PKCS#12
//! bundle. Key material never reaches logs.
//!
//! Retries: a failure before the request was sent (connect, handshake) or on a
//! kept-alive connection the server had closed is retried for every operation; a
//! failure after the request went out on a fresh connection is retried only for
//! operations that change nothing (Locate, Get, GetAttributes, Query,
//! DiscoverVersions, Decrypt), so a lost answer never creates a second key pair.
//! TLS authentication refusals (wrong CA, unknown or expired client certificate)
//! are never retried: [`KmsError::TlsRefused`] says what to fix.

use super::message::{
    self as m, KeyObject, KmipError, ObjectAttributes, QueryInfo, Version, KMIP_1_4,
};
use super::tags::*;
use super::ttlv::{self, Ttlv, Value};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How ferry proves its identity to the KMS.
#[derive(Clone, Debug)]
pub enum ClientIdentity {
    /// Certificate chain and private key in PEM files.
    Pem {
        /// Client certificate chain (PEM, leaf first).
        cert: PathBuf,
        /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
    },
    /// A PKCS#12 bundle holding the certificate and key, as KMS vendors issue them
    /// (seed 003: `openssl pkcs12 -export ...`).
    Pkcs12 {
        /// The `.p12` / `.pfx` file.
        bundle: PathBuf,
        /// File whose first line is the bundle password (none: empty password).
        password_file: Option<PathBuf>,
    },
}

/// Where and how to reach a KMS.
#[derive(Clone, Debug)]
pub struct KmsConfig {
    /// host:port (5696 is KMIP's port).
    pub address: String,
    /// Name the server certificate must carry (default: the host).
    pub server_name: Option<String>,
    /// CA that signed the KMS server certificate (pinned).
    pub ca: PathBuf,
    /// Client certificate and key.
    pub identity: ClientIdentity,
    /// Connect and I/O timeout.
    pub timeout: Duration,
}

impl KmsConfig {
    /// A configuration with a PEM client certificate and key and a 30 s timeout.
    pub fn pem(
        address: impl Into<String>,
        ca: impl Into<PathBuf>,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        KmsConfig {
            address: address.into(),
            server_name: None,
            ca: ca.into(),
            identity: ClientIdentity::Pem {
                cert: cert.into(),
                key: key.into(),
            },
            timeout: Duration::from_secs(30),
        }
    }
}

/// KMS client errors; each names the KMS.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// TLS configuration (certificate files).
    #[error("KMS {kms}: {source}")]
    Tls {
        /// KMS.
        kms: String,
        /// Cause.
        source: crate::tls::TlsError,
    },
    /// Network or TLS handshake failure after retries.
    #[error("KMS {kms} unreachable: {detail} (check the address, that the KMS runs, and that its certificate is signed by the configured CA)")]
    Unreachable {
        /// KMS.
        kms: String,
        /// Cause.
        detail: String,
    },
    /// The TLS handshake failed on certificates: retrying cannot help.
    #[error("KMS {kms} refused the TLS connection: {detail} ({fix})")]
    TlsRefused {
        /// KMS.
        kms: String,
        /// rustls' reason.
        detail: String,
        /// What to change.
        fix: &'static str,
    },
    /// The server answered with a failure or malformed data.
    #[error("KMS {kms}: {source}")]
    Kmip {
        /// KMS.
        kms: String,
        /// Cause.
        source: KmipError,
    },
}

impl KmsError {
    /// The KMIP result reason, when the server reported a failure.
    pub fn reason(&self) -> Option<u32> {
        match self {
            KmsError::Kmip {
                source: KmipError::Failed { reason, .. },
                ..
            } => Some(*reason),
            _ => None,
        }
    }
}

/// If `detail` (a rustls or I/O message) says the peers refused each other's
/// certificates, what the operator should change.
pub fn tls_refusal_fix(detail: &str) -> Option<&'static str> {
    let d = detail;
    if d.contains("UnknownIssuer") || d.contains("BadSignature") && d.contains("peer certificate") {
        Some("the KMS server certificate is not signed by the CA given as the KMS CA: configure the CA that issued it")
    } else if d.contains("NotValidForName") {
        Some("the KMS server certificate does not carry the name ferry connects to: set the KMS server name to a name in the certificate")
    } else if d.contains("invalid peer certificate: Expired") {
        Some("the KMS server certificate has expired: renew it on the KMS")
    } else if d.contains("CertificateExpired") {
        Some(
            "the KMS refused ferry's client certificate as expired: issue a new client certificate",
        )
    } else if d.contains("UnknownCA")
        || d.contains("BadCertificate")
        || d.contains("CertificateUnknown")
        || d.contains("CertificateRequired")
        || d.contains("DecryptError")
        || d.contains("AccessDenied")
    {
        Some("the KMS refused ferry's client certificate: use a client certificate signed by a CA the KMS trusts (and its matching key)")
    } else {
        None
    }
}

/// Operations that change nothing on the server: safe to send twice.
fn idempotent(op: u32) -> bool {
    matches!(
        op,
        OP_DISCOVER_VERSIONS | OP_QUERY | OP_LOCATE | OP_GET | OP_GET_ATTRIBUTES | OP_DECRYPT
    )
}

/// Why one attempt failed.
enum Attempt {
    /// Nothing reached the server (connect or handshake failed).
    NotSent(String),
    /// Sent on a connection the server may have closed while idle.
    Stale(String),
    /// Sent on a fresh connection; the server may have acted on it.
    Sent(String),
}

type Conn = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A KMIP client for one KMS.
pub struct KmsClient {
    cfg: KmsConfig,
    tls: Arc<rustls::ClientConfig>,
    conn: Mutex<Option<Conn>>,
    version: Mutex<Version>,
    handshakes: AtomicU64,
    resumed: AtomicU64,
}

/// Connection counters of one client (for tests and diagnostics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// TLS handshakes completed.
    pub handshakes: u64,
    /// Of which resumed an earlier session.
    pub resumed: u64,
}

const ATTEMPTS: u32 = 3;

impl KmsClient {
    /// Prepare a client (no network yet).
    pub fn new(cfg: KmsConfig) -> Result<Self, KmsError> {
        let tls_err = |source| KmsError::Tls {
            kms: cfg.address.clone(),
            source,
        };
        let tls = match &cfg.identity {
            ClientIdentity::Pem { cert, key } => {
                crate::tls::client_config(&cfg.ca, Some((cert, key))).map_err(tls_err)?
            }
            ClientIdentity::Pkcs12 {
                bundle,
                password_file,
            } => {
                let password = match password_file {
                    Some(p) => crate::config::read_secret_file(p).map_err(|e| {
                        tls_err(crate::tls::TlsError::File {
                            path: p.display().to_string(),
                            detail: e.to_string(),
                        })
                    })?,
                    None => zeroize::Zeroizing::new(String::new()),
                };
                let (chain, key) = crate::tls::load_pkcs12(bundle, &password).map_err(tls_err)?;
                crate::tls::client_config_with_identity(&cfg.ca, Some((chain, key)))
                    .map_err(tls_err)?
            }
        };
        Ok(KmsClient {
            cfg,
            tls,
            conn: Mutex::new(None),
            version: Mutex::new(KMIP_1_4),
            handshakes: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
        })
    }

    /// Handshake counters since the client was made.
    pub fn stats(&self) -> ClientStats {
        ClientStats {
            handshakes: self.handshakes.load(Ordering::Relaxed),
            resumed: self.resumed.load(Ordering::Relaxed),
        }
    }

    /// Drop the kept-alive connection (the next call reconnects, resuming the TLS
    /// session when the server allows it).
    pub fn disconnect(&self) {
        let mut g = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut c) = g.take() {
            c.conn.send_close_notify();
            let _ = c.conn.complete_io(&mut c.sock);
        }
    }

    /// The KMS address, for messages.
    pub fn address(&self) -> &str {
        &self.cfg.address
    }

    fn connect(&self) -> Result<Conn, String> {
        let addr = self
            .cfg
            .address
            .to_socket_addrs()
            .map_err(|e| format!("resolving {}: {e}", self.cfg.address))?
            .next()
            .ok_or_else(|| format!("{} resolves to nothing", self.cfg.address))?;
        let sock =
            TcpStream::connect_timeout(&addr, self.cfg.timeout).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(self.cfg.timeout))
            .map_err(|e| e.to_string())?;
        sock.set_write_timeout(Some(self.cfg.timeout))
            .map_err(|e| e.to_string())?;
        sock.set_nodelay(true).map_err(|e| e.to_string())?;
        let host = self.cfg.server_name.clone().unwrap_or_else(|| {
            self.cfg
                .address
                .rsplit_once(':')
                .map(|(h, _)| h)
                .unwrap_or(&self.cfg.address)
                .trim_matches(['[', ']'])
                .to_string()
        });
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("server name {host:?}: {e}"))?;
        let c = rustls::ClientConnection::new(self.tls.clone(), name).map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(c, sock);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| format!("TLS handshake: {}", self.io_detail(&e)))?;
        }
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        if tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            self.resumed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(kms = %self.cfg.address, "TLS session resumed");
        }
        Ok(tls)
    }

    fn io_detail(&self, e: &std::io::Error) -> String {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                "no answer within {:?} (the KMS is slow or hung)",
                self.cfg.timeout
            ),
            std::io::ErrorKind::UnexpectedEof => {
                "the KMS closed the connection without answering".to_string()
            }
            _ => e.to_string(),
        }
    }

    /// Send `req` and read one answer. The error says whether any of the answer
    /// arrived (`true`: the connection is unusable but the server has acted).
    fn roundtrip(&self, conn: &mut Conn, req: &[u8]) -> Result<Ttlv, (bool, String)> {
        let io = |e: std::io::Error| (false, self.io_detail(&e));
        conn.write_all(req).map_err(io)?;
        conn.flush().map_err(io)?;
        let mut head = [0u8; 8];
        conn.read_exact(&mut head).map_err(io)?;
        let total = ttlv::frame_len(&head, ttlv::MAX_MESSAGE).map_err(|e| (true, e.to_string()))?;
        let mut buf = vec![0u8; total];
        buf[..8].copy_from_slice(&head);
        conn.read_exact(&mut buf[8..])
            .map_err(|e| (true, self.io_detail(&e)))?;
        Ttlv::decode(&buf).map_err(|e| (true, format!("undecodable response: {e}")))
    }

    /// Run one operation and return its response payload.
    pub fn call(&self, op: u32, payload: Vec<Ttlv>) -> Result<Ttlv, KmsError> {
        let v = *self.version.lock().unwrap_or_else(|p| p.into_inner());
        let req = m::request(v, op, payload).encode();
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(100 << attempt));
            }
            let failure = match self.attempt(op, &req) {
                Ok(resp) => {
                    return m::response_payload(&resp, op).map_err(|source| KmsError::Kmip {
                        kms: self.cfg.address.clone(),
                        source,
                    });
                }
                Err(f) => f,
            };
            let (retry, detail) = match failure {
                Attempt::NotSent(d) => {
                    if let Some(fix) = tls_refusal_fix(&d) {
                        return Err(KmsError::TlsRefused {
                            kms: self.cfg.address.clone(),
                            detail: d,
                            fix,
                        });
                    }
                    (true, d)
                }
                Attempt::Stale(d) => (true, d),
                Attempt::Sent(d) => {
                    // TLS 1.3: a refused client certificate shows on the first read.
                    if let Some(fix) = tls_refusal_fix(&d) {
                        return Err(KmsError::TlsRefused {
                            kms: self.cfg.address.clone(),
                            detail: d,
                            fix,
                        });
                    }
                    (idempotent(op), d)
                }
            };
            // A retry that then succeeds needs no attention; the final failure
            // is the caller's error (and its job's warning).
            tracing::info!(kms = %self.cfg.address, op = operation_name(op), attempt, error = %detail, retry, "KMS request failed");
            last = detail;
            if !retry {
                break;
            }
        }
        Err(KmsError::Unreachable {
            kms: self.cfg.address.clone(),
            detail: last,
        })
    }

    fn attempt(&self, op: u32, req: &[u8]) -> Result<Ttlv, Attempt> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let reused = guard.is_some();
        if guard.is_none() {
            *guard = Some(self.connect().map_err(Attempt::NotSent)?);
        }
        let conn = guard.as_mut().expect("connected above");
        match self.roundtrip(conn, req) {
            Ok(r) => Ok(r),
            Err((answered, e)) => {
                *guard = None;
                tracing::debug!(kms = %self.cfg.address, op = operation_name(op), reused, answered, "dropping the KMS connection");
                Err(if reused && !answered {
                    Attempt::Stale(e)
                } else {
                    Attempt::Sent(e)
                })
            }
        }
    }

    fn kmip<T>(&self, r: Result<T, KmipError>) -> Result<T, KmsError> {
        r.map_err(|source| KmsError::Kmip {
            kms: self.cfg.address.clone(),
            source,
        })
    }

    /// DiscoverVersions; adopts the newest common 1.x version (1.4, else 1.3, 1.2).
    pub fn discover_versions(&self) -> Result<Vec<Version>, KmsError> {
        let offered = [(1, 4), (1, 3), (1, 2)];
        let p = self.call(OP_DISCOVER_VERSIONS, m::discover_versions(&offered))?;
        let versions = self.kmip(m::parse_versions(&p))?;
        if let Some(v) = versions.iter().find(|v| offered.contains(v)) {
            *self.version.lock().unwrap_or_else(|p| p.into_inner()) = *v;
        }
        Ok(versions)
    }

    /// The protocol version in use.
    pub fn version(&self) -> Version {
        *self.version.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Query operations, object types and server information.
    pub fn query(&self) -> Result<QueryInfo, KmsError> {
        let p = self.call(
            OP_QUERY,
            m::query(&[QUERY_OPERATIONS, QUERY_OBJECTS, QUERY_SERVER_INFORMATION]),
        )?;
        self.kmip(m::parse_query(&p))
    }

    /// Create an RSA key pair; returns (private id, public id).
    pub fn create_rsa_key_pair(&self, name: &str, bits: i32) -> Result<(String, String), KmsError> {
        let p = self.call(OP_CREATE_KEY_PAIR, m::create_rsa_key_pair(name, bits))?;
        self.kmip(m::parse_key_pair_ids(&p))
    }

    /// Locate objects by name, type and optional state.
    pub fn locate(
        &self,
        name: &str,
        object_type: u32,
        state: Option<u32>,
    ) -> Result<Vec<String>, KmsError> {
        let p = self.call(OP_LOCATE, m::locate(name, object_type, state))?;
        self.kmip(m::parse_ids(&p))
    }

    /// Get a key object.
    pub fn get(&self, id: &str, format: Option<u32>) -> Result<KeyObject, KmsError> {
        let p = self.call(OP_GET, m::get(id, format))?;
        self.kmip(m::parse_key(&p))
    }

    /// GetAttributes.
    pub fn get_attributes(
        &self,
        id: &str,
        names: &[&str],
    ) -> Result<Vec<(String, Ttlv)>, KmsError> {
        let p = self.call(OP_GET_ATTRIBUTES, m::get_attributes(id, names))?;
        self.kmip(m::parse_attributes(&p))
    }

    /// The object's State attribute.
    pub fn state(&self, id: &str) -> Result<u32, KmsError> {
        let attrs = self.get_attributes(id, &["State"])?;
        let v = attrs
            .iter()
            .find(|(n, _)| n == "State")
            .map(|(_, v)| v.clone());
        match v.map(|v| v.value) {
            Some(Value::Enumeration(s)) => Ok(s),
            _ => Err(KmsError::Kmip {
                kms: self.cfg.address.clone(),
                source: KmipError::Unexpected(format!("no State attribute for {id}")),
            }),
        }
    }

    /// GetAttributes for the attributes ferry follows rotations with.
    pub fn object_attributes(&self, id: &str) -> Result<ObjectAttributes, KmsError> {
        let attrs = self.get_attributes(id, m::OBJECT_ATTRIBUTE_NAMES)?;
        self.kmip(m::object_attributes(id, &attrs))
    }

    /// ReKeyKeyPair: the server makes a replacement of the pair whose private key
    /// is `private_id` (linked to the old one); returns (private id, public id).
    /// Only on an operator's request: ferry never rotates keys by itself.
    pub fn rekey_key_pair(&self, private_id: &str) -> Result<(String, String), KmsError> {
        let p = self.call(OP_REKEY_KEY_PAIR, m::rekey_key_pair(private_id))?;
        self.kmip(m::parse_key_pair_ids(&p))
    }

    /// Activate.
    pub fn activate(&self, id: &str) -> Result<(), KmsError> {
        self.call(OP_ACTIVATE, m::by_id(id)).map(|_| ())
    }

    /// Revoke.
    pub fn revoke(&self, id: &str, reason: u32, message: Option<&str>) -> Result<(), KmsError> {
        self.call(OP_REVOKE, m::revoke(id, reason, message))
            .map(|_| ())
    }

    /// Destroy.
    pub fn destroy(&self, id: &str) -> Result<(), KmsError> {
        self.call(OP_DESTROY, m::by_id(id)).map(|_| ())
    }

    /// Server-side RSA-OAEP(SHA-1) decryption with the private key `id`.
    pub fn decrypt_rsa_oaep_sha1(
        &self,
        id: &str,
        data: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, KmsError> {
        let p = self.call(OP_DECRYPT, m::decrypt_rsa_oaep_sha1(id, data))?;
        self.kmip(m::parse_data(&p))
    }
}
