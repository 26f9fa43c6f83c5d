//! In-process test PKI (rcgen): a CA that issues server and client certificates, so
//! the mocks, `ferry-sim` and tests get real X.509 certificates with no openssl
//! command and no setup. ECDSA P-256 keys throughout (every peer here accepts them;
//! PyKMIP's TLS 1.2 cipher list needs them).
//!
//! For tests and the simulator only: keys are written unencrypted (mode 0600).

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use std::path::Path;

/// PKI errors.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Gen(#[from] rcgen::Error),
    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
}

/// A certificate and its private key, PEM encoded (key as PKCS#8).
#[derive(Clone)]
pub struct Issued {
    /// Certificate PEM.
    pub cert_pem: String,
    /// Private key PEM (PKCS#8). Test material only.
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Issued(<certificate and key>)")
    }
}

/// A test certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    key_pem: String,
}

fn ten_years(p: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(3650);
}

impl Ca {
    /// A fresh self-signed CA named `cn`.
    pub fn new(cn: &str) -> Result<Ca, PkiError> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ten_years(&mut p);
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let issuer = CertifiedIssuer::self_signed(p, key)?;
        Ok(Ca { issuer, key_pem })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA private key (PEM).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    fn issue(
        &self,
        cn: &str,
        names: &[&str],
        eku: ExtendedKeyUsagePurpose,
    ) -> Result<Issued, PkiError> {
        let now = time::OffsetDateTime::now_utc();
        self.issue_valid(
            cn,
            names,
            eku,
            now - time::Duration::days(1),
            now + time::Duration::days(3650),
        )
    }

    fn issue_valid(
        &self,
        cn: &str,
        names: &[&str],
        eku: ExtendedKeyUsagePurpose,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Result<Issued, PkiError> {
        let mut p =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        // keyEncipherment too: qemu-nbd refuses certificates without it.
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![eku];
        p.use_authority_key_identifier_extension = true;
        p.not_before = not_before;
        p.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for `names` (DNS names or IP addresses; the first is
    /// also the common name).
    pub fn server(&self, names: &[&str]) -> Result<Issued, PkiError> {
        let cn = names.first().copied().unwrap_or("localhost");
        self.issue(cn, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with common name `cn`.
    pub fn client(&self, cn: &str) -> Result<Issued, PkiError> {
        self.issue(cn, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A client certificate with common name `cn` that expired yesterday (valid for
    /// one day a month ago), to test that servers refuse it.
    pub fn expired_client(&self, cn: &str) -> Result<Issued, PkiError> {
        let now = time::OffsetDateTime::now_utc();
        self.issue_valid(
            cn,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        )
    }

    /// Write the libnbd/GnuTLS layout into `dir`: `ca-cert.pem`, `ca-key.pem`,
    /// `server-cert.pem`, `server-key.pem` (for `server_names`), `client-cert.pem`,
    /// `client-key.pem` (common name `client_cn`).
    pub fn write_layout(
        &self,
        dir: &Path,
        server_names: &[&str],
        client_cn: &str,
    ) -> Result<(), PkiError> {
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let server = self.server(server_names)?;
        let client = self.client(client_cn)?;
        write(dir, "ca-cert.pem", &self.cert_pem(), false)?;
        write(dir, "ca-key.pem", &self.key_pem, true)?;
        write(dir, "server-cert.pem", &server.cert_pem, false)?;
        write(dir, "server-key.pem", &server.key_pem, true)?;
        write(dir, "client-cert.pem", &client.cert_pem, false)?;
        write(dir, "client-key.pem", &client.key_pem, true)?;
        Ok(())
    }
}

/// Write `text` to `dir/name`; private files get mode 0600.
pub fn write(dir: &Path, name: &str, text: &str, private: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let io = |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_loads_into_rustls_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("t").unwrap();
        ca.write_layout(dir.path(), &["localhost", "127.0.0.1"], "c")
            .unwrap();
        // ferry's own client config accepts the CA and the client pair.
        ferry::tls::client_config(
            &dir.path().join("ca-cert.pem"),
            Some((
                &dir.path().join("client-cert.pem"),
                &dir.path().join("client-key.pem"),
            )),
        )
        .unwrap();
        let key_mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("server-key.pem"))
                .unwrap()
                .permissions(),
        );
        assert_eq!(key_mode & 0o777, 0o600);
    }
}
