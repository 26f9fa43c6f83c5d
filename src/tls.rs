//! rustls client configuration shared by every TLS client in ferry (NBD-SSL, KMIP):
//! a pinned CA file (no system roots: ferry talks to infrastructure it was told to
//! trust), an optional client certificate, TLS 1.2 and 1.3 with the ring provider.
//! Verification is always on.

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

fn file_err(p: &Path, e: impl std::fmt::Display) -> TlsError {
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
    let cfg = match client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| file_err(cert, e))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Config(format!("client certificate: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}
