//! rustls server configuration for NBD-SSL servers (`ferry export`, the mock ESXi
//! host): a certificate chain and key in PEM, optionally a CA that client
//! certificates must chain to. The directory layout is the one qemu-nbd, nbdkit and
//! libnbd use (`server-cert.pem`, `server-key.pem`, `ca-cert.pem`), so one
//! directory serves every peer. TLS 1.2 and 1.3, ring provider.

use crate::tls::TlsError;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

fn file_err(p: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: p.display().to_string(),
        detail: e.to_string(),
    }
}

/// A server configuration from PEM text: `cert_pem` (leaf first, then any
/// intermediates), `key_pem` (PKCS#8, PKCS#1 or SEC1) and, when client
/// certificates are required, `client_ca_pem`.
pub fn server_config_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let pem_err = |what: &str, e: &dyn std::fmt::Display| TlsError::Config(format!("{what}: {e}"));
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err("server certificate", &e))?;
    if chain.is_empty() {
        return Err(TlsError::Config(
            "no certificate in the server certificate PEM".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| pem_err("server key", &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca) {
                roots
                    .add(c.map_err(|e| pem_err("client CA", &e))?)
                    .map_err(|e| pem_err("client CA", &e))?;
            }
            if roots.is_empty() {
                return Err(TlsError::Config(
                    "no certificate in the client CA PEM".into(),
                ));
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| pem_err("client verifier", &e))?;
            builder.with_client_cert_verifier(v)
        }
    };
    let cfg = builder
        .with_single_cert(chain, key)
        .map_err(|e| pem_err("server certificate and key", &e))?;
    Ok(Arc::new(cfg))
}

/// A server configuration from a certificates directory in the libnbd layout:
/// `server-cert.pem` and `server-key.pem`; with `verify_clients`, clients must
/// present a certificate signed by `ca-cert.pem`.
pub fn server_config_from_dir(
    dir: &Path,
    verify_clients: bool,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read(&p).map_err(|e| file_err(&p, e))
    };
    let cert = read("server-cert.pem")?;
    let key = read("server-key.pem")?;
    let ca = if verify_clients {
        Some(read("ca-cert.pem")?)
    } else {
        None
    };
    server_config_from_pem(&cert, &key, ca.as_deref()).map_err(|e| match e {
        TlsError::Config(d) => TlsError::File {
            path: dir.display().to_string(),
            detail: d,
        },
        other => other,
    })
}
