//! rustls client configuration shared by every TLS client in ferry (NBD-SSL, KMIP,
//! vCenter SOAP):
//! a pinned CA file (no system roots: ferry talks to infrastructure it was told to
//! trust), an optional client certificate, TLS 1.2 and 1.3 with the ring provider.
//! Verification is always on: either a pinned CA, or (vSphere style) a pinned SHA-256
//! certificate thumbprint with the handshake signature still checked.
//!
//! [`server`]: the server side (rustls server configuration and a TLS listener
//! for axum) shared by the agent API and the console.

pub mod server;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// TLS setup errors, naming the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing or unreadable.
    #[error("{path}: {detail}")]
    File {
        /// File.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A [`TlsError::File`] for `p`.
pub(crate) fn file_err(p: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: p.display().to_string(),
        detail: e.to_string(),
    }
}

/// Build a client configuration trusting only the certificates in `ca` and, when
/// given, authenticating with `client` = (certificate chain PEM, private key PEM).
pub fn client_config(
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let identity = match client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| file_err(cert, e))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
            Some((chain, key))
        }
        None => None,
    };
    client_config_with_identity(ca, identity)
}

/// Like [`client_config`], with the client certificate chain and key already in
/// memory (e.g. from [`load_pkcs12`]).
pub fn client_config_with_identity(
    ca: &Path,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| file_err(ca, e))? {
        roots
            .add(c.map_err(|e| file_err(ca, e))?)
            .map_err(|e| file_err(ca, e))?;
    }
    if roots.is_empty() {
        return Err(file_err(ca, "no CA certificate in the file"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let cfg = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(format!("client certificate: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// Read a PKCS#12 bundle (`.p12`/`.pfx`, as `openssl pkcs12 -export` writes it)
/// holding one private key and its certificate (plus optionally its CA chain).
/// Returns the chain, leaf first, and the key (PKCS#8). The password and the
/// decrypted key bytes are not kept beyond the returned key.
pub fn load_pkcs12(
    path: &Path,
    password: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let data = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| file_err(path, e))?);
    let store = p12_keystore::KeyStore::from_pkcs12(
        &data,
        password,
        p12_keystore::Pkcs12ImportPolicy::Relaxed,
    )
    .map_err(|e| {
        file_err(
            path,
            format!("not a readable PKCS#12 bundle (wrong password?): {e}"),
        )
    })?;
    let (_, chain) = store
        .private_key_chain()
        .ok_or_else(|| file_err(path, "the PKCS#12 bundle holds no private key"))?;
    let certs: Vec<CertificateDer<'static>> = chain
        .certs()
        .iter()
        .map(|c| CertificateDer::from(c.as_der().to_vec()))
        .collect();
    if certs.is_empty() {
        return Err(file_err(
            path,
            "the PKCS#12 bundle holds no certificate for its private key",
        ));
    }
    let key = PrivateKeyDer::Pkcs8(chain.key().as_der().to_vec().into());
    Ok((certs, key))
}

// ---------------------------------------------------------------------------------
// Certificate thumbprint pinning (vSphere style).
// ---------------------------------------------------------------------------------

/// Parse a SHA-256 certificate fingerprint written as 64 hex digits, colons (and
/// spaces) allowed, any case: `AA:BB:...` as `openssl x509 -fingerprint -sha256` and
/// vSphere print it.
pub fn parse_sha256_thumbprint(s: &str) -> Result<[u8; 32], TlsError> {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    let mut out = [0u8; 32];
    if hex.len() != 64 || hex::decode_to_slice(&hex, &mut out).is_err() {
        return Err(TlsError::Config(format!(
            "{s:?} is not a SHA-256 certificate thumbprint (64 hex digits, colons allowed)"
        )));
    }
    Ok(out)
}

/// Format a fingerprint as upper-case hex pairs joined by colons.
pub fn format_thumbprint(digest: &[u8]) -> String {
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// SHA-256 fingerprint of a DER certificate.
pub fn sha256_fingerprint(cert_der: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(cert_der).into()
}

/// SHA-1 fingerprint of a DER certificate (what older vSphere screens and ESXi NBD
/// tickets show; informational only, ferry never pins SHA-1).
pub fn sha1_fingerprint(cert_der: &[u8]) -> [u8; 20] {
    use sha1::Digest;
    sha1::Sha1::digest(cert_der).into()
}

/// Verifier that accepts exactly one server certificate, identified by the SHA-256
/// of its DER encoding, as vSphere clients pin vCenter and ESXi thumbprints. The
/// certificate's name, issuer and validity dates are not checked (the pin replaces
/// them); the handshake signature **is** checked, so the server must hold the
/// pinned certificate's private key.
#[derive(Debug)]
struct ThumbprintVerifier {
    sha256: [u8; 32],
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for ThumbprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let got = sha256_fingerprint(end_entity.as_ref());
        if got == self.sha256 {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate thumbprint {} does not match the pinned {}",
                format_thumbprint(&got),
                format_thumbprint(&self.sha256)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Build a client configuration that trusts exactly the server certificate whose
/// SHA-256 fingerprint is `sha256` (see [`parse_sha256_thumbprint`]). No client
/// certificate.
pub fn thumbprint_client_config(sha256: [u8; 32]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algs = provider.signature_verification_algorithms;
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ThumbprintVerifier { sha256, algs }))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Verifier used only to *read* a server's certificate (`ferry vsphere thumbprint`):
/// accepts any certificate but records it, and still checks the handshake signature
/// so the recorded certificate is the one whose key the server holds. Nothing is ever
/// sent over a connection made with it.
#[derive(Debug)]
struct RecordingVerifier {
    seen: std::sync::Mutex<Option<CertificateDer<'static>>>,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Ok(mut s) = self.seen.lock() {
            *s = Some(end_entity.clone().into_owned());
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// What a TLS server presents, as read by [`fetch_server_certificate`].
#[derive(Debug, Clone)]
pub struct ServerCertificate {
    /// The end-entity certificate (DER).
    pub der: Vec<u8>,
    /// Its SHA-256 fingerprint, `AA:BB:...` (what `[vcenter] thumbprint` pins).
    pub sha256: String,
    /// Its SHA-1 fingerprint (informational: older vSphere screens show it).
    pub sha1: String,
    /// Set when the server sent this certificate but the handshake then failed, e.g.
    /// its signature could not be verified because the key is too weak (RSA below
    /// 2048 bits): ferry would refuse to connect to it even with the thumbprint
    /// pinned.
    pub handshake_error: Option<String>,
}

/// Connect to `host:port`, complete a TLS handshake and return the server's
/// certificate and fingerprints, without trusting it and without sending any
/// application data. For operators who want to pin a thumbprint: compare it with
/// the one shown on the server's console before trusting it.
pub async fn fetch_server_certificate(
    host: &str,
    port: u16,
    timeout: std::time::Duration,
) -> Result<ServerCertificate, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algs = provider.signature_verification_algorithms;
    let verifier = Arc::new(RecordingVerifier {
        seen: std::sync::Mutex::new(None),
        algs,
    });
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
        .map_err(|e| TlsError::Config(format!("{host}: {e}")))?;
    let addr = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr))
        .await
        .map_err(|_| TlsError::Config(format!("{addr}: no TCP connection within {timeout:?}")))?
        .map_err(|e| TlsError::Config(format!("connecting to {addr}: {e}")))?;
    let handshake = tokio::time::timeout(
        timeout,
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .map_err(|_| TlsError::Config(format!("{addr}: no TLS handshake within {timeout:?}")))?;
    let der = verifier.seen.lock().ok().and_then(|mut s| s.take());
    let handshake_error = match handshake {
        Ok(_) => None,
        Err(e) => match &der {
            // The certificate arrived but the handshake failed afterwards.
            Some(_) => Some(explain_tls_error(&e.to_string())),
            None => return Err(TlsError::Config(format!("TLS handshake with {addr}: {e}"))),
        },
    };
    let der = der.ok_or_else(|| TlsError::Config(format!("{addr} presented no certificate")))?;
    Ok(ServerCertificate {
        sha256: format_thumbprint(&sha256_fingerprint(der.as_ref())),
        sha1: format_thumbprint(&sha1_fingerprint(der.as_ref())),
        der: der.as_ref().to_vec(),
        handshake_error,
    })
}

/// Add the likely cause to a rustls error message an operator will read.
pub fn explain_tls_error(msg: &str) -> String {
    if msg.contains("BadSignature") {
        format!(
            "{msg} (the server's handshake signature did not verify: its key is probably too weak; \
             ferry requires RSA of at least 2048 bits or ECDSA P-256/P-384, as current vCenter certificates are)"
        )
    } else {
        msg.to_string()
    }
}

#[cfg(test)]
mod thumbprint_tests {
    use super::*;

    #[test]
    fn thumbprints_parse_with_or_without_colons_and_round_trip() {
        let d: [u8; 32] = core::array::from_fn(|i| (i * 7) as u8);
        let s = format_thumbprint(&d);
        assert_eq!(s.len(), 32 * 3 - 1);
        assert_eq!(parse_sha256_thumbprint(&s).unwrap(), d);
        assert_eq!(
            parse_sha256_thumbprint(&s.replace(':', "").to_lowercase()).unwrap(),
            d
        );
        for bad in ["", "AA:BB", &s[..s.len() - 1], &s.replace("00", "ZZ")] {
            assert!(parse_sha256_thumbprint(bad).is_err(), "{bad:?}");
        }
    }
}
