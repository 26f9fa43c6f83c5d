//! [`PemKeySource`]: a tenant RSA key pair held in PEM files.
//!
//! The public key wraps new data keys. The private key file is optional; it is read
//! only when something must be unwrapped, used for that one call, and dropped (the
//! `rsa` crate zeroizes private key limbs on drop; the PEM text is zeroized too).
//! Must not cache the private key or log any key material.

use super::wrap::{fingerprint_spki, rsa_oaep_unwrap, wrap_for, wrapped_bytes};
use super::{KeyError, KeyRef, KeySource, WrappedKey};
use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::traits::PublicKeyParts;
use rsa::{RsaPrivateKey, RsaPublicKey};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Tenant key pair in PEM files.
pub struct PemKeySource {
    public: RsaPublicKey,
    public_path: PathBuf,
    private_path: Option<PathBuf>,
    key_ref: KeyRef,
}

fn read_text(path: &Path) -> Result<Zeroizing<String>, KeyError> {
    std::fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })
}

/// Parse a public key in SPKI ("PUBLIC KEY") or PKCS#1 ("RSA PUBLIC KEY") PEM.
pub fn parse_public_pem(text: &str, path: &str) -> Result<RsaPublicKey, KeyError> {
    RsaPublicKey::from_public_key_pem(text)
        .or_else(|_| RsaPublicKey::from_pkcs1_pem(text))
        .map_err(|e| KeyError::BadKeyFile {
            path: path.to_string(),
            what: "public",
            detail: e.to_string(),
        })
}

/// Parse a private key in PKCS#8 ("PRIVATE KEY") or PKCS#1 ("RSA PRIVATE KEY") PEM.
pub fn parse_private_pem(text: &str, path: &str) -> Result<RsaPrivateKey, KeyError> {
    RsaPrivateKey::from_pkcs8_pem(text)
        .or_else(|_| RsaPrivateKey::from_pkcs1_pem(text))
        .map_err(|e| KeyError::BadKeyFile {
            path: path.to_string(),
            what: "private",
            detail: e.to_string(),
        })
}

pub(crate) fn check_size(key: &RsaPublicKey, name: &str) -> Result<(), KeyError> {
    let bits = key.size() * 8;
    if !(2048..=4096).contains(&bits) {
        return Err(KeyError::KeySize {
            key: name.to_string(),
            bits,
        });
    }
    Ok(())
}

impl PemKeySource {
    /// Open a key pair. `public` is required (it may also be derived from `private`
    /// when only a private key file is given); `private` is only read when unwrapping.
    pub fn open(public: Option<&Path>, private: Option<&Path>) -> Result<Self, KeyError> {
        let (pubkey, public_path) = match (public, private) {
            (Some(p), _) => (
                parse_public_pem(&read_text(p)?, &p.display().to_string())?,
                p.to_path_buf(),
            ),
            (None, Some(p)) => {
                let sk = parse_private_pem(&read_text(p)?, &p.display().to_string())?;
                (RsaPublicKey::from(&sk), p.to_path_buf())
            }
            (None, None) => {
                return Err(KeyError::CannotUnwrap {
                    source_name: "pem".into(),
                    why: "no key file configured: give --public-key and/or --private-key".into(),
                })
            }
        };
        let fp = fingerprint_spki(&pubkey);
        check_size(&pubkey, &public_path.display().to_string())?;
        let key_ref = KeyRef {
            source: "pem".into(),
            kms: public_path.display().to_string(),
            key_id: fp[..16].to_string(),
            key_version: 0,
            fingerprint: fp,
        };
        Ok(PemKeySource {
            public: pubkey,
            public_path,
            private_path: private.map(Path::to_path_buf),
            key_ref,
        })
    }

    fn load_private(&self) -> Result<RsaPrivateKey, KeyError> {
        let path = self
            .private_path
            .as_ref()
            .ok_or_else(|| KeyError::CannotUnwrap {
                source_name: self.name(),
                why: "only a public key is configured; give the private key file (--private-key) to open the keyring or restore".into(),
            })?;
        let sk = parse_private_pem(&read_text(path)?, &path.display().to_string())?;
        if fingerprint_spki(&RsaPublicKey::from(&sk)) != self.key_ref.fingerprint {
            return Err(KeyError::WrongKey {
                wanted: self.key_ref.to_string(),
                have: format!("private key {} of another key pair", path.display()),
            });
        }
        Ok(sk)
    }
}

impl KeySource for PemKeySource {
    fn name(&self) -> String {
        format!("pem:{}", self.public_path.display())
    }

    fn current_key(&self) -> Result<KeyRef, KeyError> {
        Ok(self.key_ref.clone())
    }

    fn wrap(&self, secret: &[u8]) -> Result<WrappedKey, KeyError> {
        wrap_for(&self.public, &self.key_ref, secret)
    }

    fn unwrap(&self, wrapped: &WrappedKey) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let bytes = wrapped_bytes(wrapped, self.holds(&wrapped.key_ref), &self.key_ref)?;
        let sk = self.load_private()?;
        rsa_oaep_unwrap(&sk, &bytes, &wrapped.key_ref.to_string())
        // `sk` dropped here: rsa zeroizes the private exponent and primes.
    }

    fn holds(&self, key: &KeyRef) -> bool {
        key.fingerprint == self.key_ref.fingerprint
    }
}

/// Generate an RSA key pair and write `<name>.pub.pem` (SPKI) and `<name>.key.pem`
/// (PKCS#8, mode 0600, created exclusively) into `dir`. Returns both paths.
pub fn generate_pem_pair(
    dir: &Path,
    name: &str,
    bits: usize,
) -> Result<(PathBuf, PathBuf), KeyError> {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let public = dir.join(format!("{name}.pub.pem"));
    let private = dir.join(format!("{name}.key.pem"));
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| KeyError::Io { path, source }
    };
    let fail = |detail: String| KeyError::WrapFailed {
        key: format!("new {bits}-bit key"),
        detail,
    };
    let sk = RsaPrivateKey::new(&mut rand::rngs::OsRng, bits).map_err(|e| fail(e.to_string()))?;
    let pk = RsaPublicKey::from(&sk);
    let pem = sk
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| fail(e.to_string()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&private)
        .map_err(io(&private))?;
    f.write_all(pem.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(io(&private))?;
    let pub_pem = pk
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| fail(e.to_string()))?;
    std::fs::write(&public, pub_pem).map_err(io(&public))?;
    Ok((public, private))
}
