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

/// Write a test PKI into `dir` with the `openssl` command, in the layout qemu-nbd,
/// nbdkit (GnuTLS), libnbd and ferry's NBD client expect: `ca-cert.pem`,
/// `ca-key.pem`, `server-cert.pem`/`server-key.pem` (localhost, 127.0.0.1) and
/// `client-cert.pem`/`client-key.pem` (clientAuth). RSA 2048, 10 years.
pub fn tls_certs(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let run = |args: &[&str]| openssl(dir, args);
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "3650",
        "-subj",
        "/CN=ferry test CA",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ])?;
    std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n")?;
    std::fs::write(
        dir.join("client.ext"),
        "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n",
    )?;
    for (who, cn) in [("server", "localhost"), ("client", "ferry-agent")] {
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{who}-key.pem"),
            "-out",
            &format!("{who}.csr"),
        ])?;
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{who}.csr"),
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            &format!("{who}.ext"),
            "-out",
            &format!("{who}-cert.pem"),
        ])?;
        std::fs::remove_file(dir.join(format!("{who}.csr")))?;
        std::fs::remove_file(dir.join(format!("{who}.ext")))?;
    }
    Ok(())
}

/// Replace the server certificate in `dir` (made by [`tls_certs`]) with an ECDSA
/// P-256 one signed by the same CA: PyKMIP's TLS 1.2 cipher list has no
/// ECDHE-RSA-GCM suite, so rustls peers need ECDSA there (shared/PEERS.md).
pub fn ec_server_cert(dir: &Path) -> std::io::Result<()> {
    let run = |args: &[&str]| openssl(dir, args);
    std::fs::write(dir.join("ec.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n")?;
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server-key.pem",
        "-out",
        "ec.csr",
    ])?;
    run(&[
        "x509",
        "-req",
        "-in",
        "ec.csr",
        "-CA",
        "ca-cert.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-days",
        "3650",
        "-extfile",
        "ec.ext",
        "-out",
        "server-cert.pem",
    ])?;
    std::fs::remove_file(dir.join("ec.csr"))?;
    std::fs::remove_file(dir.join("ec.ext"))?;
    Ok(())
}

/// Run `openssl ARGS` in `dir`, turning a failure into an error with its stderr.
fn openssl(dir: &Path, args: &[&str]) -> std::io::Result<()> {
    let o = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()?;
    if !o.status.success() {
        return Err(std::io::Error::other(format!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        )));
    }
    Ok(())
}
