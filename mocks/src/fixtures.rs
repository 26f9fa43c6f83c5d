//! Shared test fixtures: tenant RSA key pairs written as PEM files (mode 0600),
//! made with ferry's own generator, and where cargo put the mock VDDK. One place
//! for every test, benchmark and the demo.

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

/// Write a test PKI into `dir` in the layout qemu-nbd, nbdkit (GnuTLS), libnbd,
/// PyKMIP and ferry's clients expect: `ca-cert.pem`, `ca-key.pem`,
/// `server-cert.pem`/`server-key.pem` (localhost, 127.0.0.1) and
/// `client-cert.pem`/`client-key.pem` (clientAuth). Keys are ECDSA P-256, which
/// every peer accepts and PyKMIP's TLS 1.2 cipher list requires (shared/PEERS.md).
pub fn tls_certs(dir: &Path) -> std::io::Result<()> {
    crate::pki::Ca::new("ferry test CA")
        .and_then(|ca| ca.write_layout(dir, &["localhost", "127.0.0.1"], "ferry-agent"))
        .map_err(std::io::Error::other)
}

/// The mock VDDK (`libvixDiskLib.so` of crate `ferry-mock-vddk`) that cargo built
/// for the running executable's profile, if it did: beside the executable or in
/// `deps/` (`cargo test --workspace` leaves it in `target/<profile>/deps/`,
/// `cargo build -p ferry-mock-vddk` in `target/<profile>/`).
pub fn mock_vddk_library() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let mut candidates = vec![
        dir.join("libvixDiskLib.so"),
        dir.join("deps/libvixDiskLib.so"),
    ];
    if let Some(up) = dir.parent() {
        candidates.push(up.join("libvixDiskLib.so"));
        candidates.push(up.join("deps/libvixDiskLib.so"));
    }
    candidates.into_iter().find(|p| p.is_file())
}
