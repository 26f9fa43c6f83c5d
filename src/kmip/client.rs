//! Blocking KMIP client over mutual TLS (rustls): one kept-alive connection (TLS
//! sessions are resumed on reconnect through rustls' session cache), connect and
//! I/O timeouts, bounded retries with backoff on transport failures, version
//! negotiation with DiscoverVersions. Key material never reaches logs.

use super::message::{self as m, KeyObject, KmipError, QueryInfo, Version, KMIP_1_4};
use super::tags::*;
use super::ttlv::{self, Ttlv, Value};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where and how to reach a KMS.
#[derive(Clone, Debug)]
pub struct KmsConfig {
    /// host:port (5696 is KMIP's port).
    pub address: String,
    /// Name the server certificate must carry (default: the host).
    pub server_name: Option<String>,
    /// CA that signed the KMS server certificate (pinned).
    pub ca: PathBuf,
    /// Client certificate chain (PEM).
    pub client_cert: PathBuf,
    /// Client private key (PEM).
    pub client_key: PathBuf,
    /// Connect and I/O timeout.
    pub timeout: Duration,
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

type Conn = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A KMIP client for one KMS.
pub struct KmsClient {
    cfg: KmsConfig,
    tls: Arc<rustls::ClientConfig>,
    conn: Mutex<Option<Conn>>,
    version: Mutex<Version>,
}

const ATTEMPTS: u32 = 3;

impl KmsClient {
    /// Prepare a client (no network yet).
    pub fn new(cfg: KmsConfig) -> Result<Self, KmsError> {
        let tls = crate::tls::client_config(&cfg.ca, Some((&cfg.client_cert, &cfg.client_key)))
            .map_err(|source| KmsError::Tls {
                kms: cfg.address.clone(),
                source,
            })?;
        Ok(KmsClient {
            cfg,
            tls,
            conn: Mutex::new(None),
            version: Mutex::new(KMIP_1_4),
        })
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
                .map_err(|e| format!("TLS handshake: {e}"))?;
        }
        Ok(tls)
    }

    fn roundtrip(conn: &mut Conn, req: &[u8]) -> Result<Ttlv, String> {
        conn.write_all(req).map_err(|e| e.to_string())?;
        conn.flush().map_err(|e| e.to_string())?;
        let mut head = [0u8; 8];
        conn.read_exact(&mut head).map_err(|e| e.to_string())?;
        let total = ttlv::frame_len(&head, ttlv::MAX_MESSAGE).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; total];
        buf[..8].copy_from_slice(&head);
        conn.read_exact(&mut buf[8..]).map_err(|e| e.to_string())?;
        Ttlv::decode(&buf).map_err(|e| format!("undecodable response: {e}"))
    }

    /// Run one operation and return its response payload.
    pub fn call(&self, op: u32, payload: Vec<Ttlv>) -> Result<Ttlv, KmsError> {
        let v = *self.version.lock().unwrap_or_else(|p| p.into_inner());
        let req = m::request(v, op, payload).encode();
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                match self.connect() {
                    Ok(c) => *guard = Some(c),
                    Err(e) => {
                        last = e;
                        drop(guard);
                        std::thread::sleep(Duration::from_millis(100 << attempt));
                        continue;
                    }
                }
            }
            let conn = guard.as_mut().expect("connected above");
            match Self::roundtrip(conn, &req) {
                Ok(resp) => {
                    return m::response_payload(&resp, op).map_err(|source| KmsError::Kmip {
                        kms: self.cfg.address.clone(),
                        source,
                    });
                }
                Err(e) => {
                    tracing::warn!(kms = %self.cfg.address, op = operation_name(op), attempt, error = %e, "KMS request failed; reconnecting");
                    *guard = None;
                    last = e;
                }
            }
        }
        Err(KmsError::Unreachable {
            kms: self.cfg.address.clone(),
            detail: last,
        })
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
