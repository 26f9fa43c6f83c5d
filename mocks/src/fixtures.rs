//! Shared test fixtures: tenant RSA key pairs written as PEM files (mode 0600),
//! made with ferry's own generator. One place for every test, benchmark and the demo.

use std::path::{Path, PathBuf};

/// Paths of a generated key pair.
#[derive(Clone, Debug)]
pub struct PemPair {
    /// SPKI public key PEM.
    pub public: PathBuf,
    /// PKCS#8 private key PEM.
    pub private: PathBuf,
}

/// Generate an RSA key pair of `bits` as `<name>.pub.pem` / `<name>.key.pem` in `dir`.
pub fn pem_pair(dir: &Path, name: &str, bits: usize) -> Result<PemPair, ferry::keys::KeyError> {
    let (public, private) = ferry::keys::generate_pem_pair(dir, name, bits)?;
    Ok(PemPair { public, private })
}
