//! [`PassphraseKeySource`]: data keys wrapped by a key derived from a passphrase
//! (Veeam's "password" encryption, seed 001), so a chain may mix KMS-wrapped and
//! passphrase-wrapped restore points.
//!
//! Scheme `passphrase-argon2id-aes256gcm`: per wrap a random 16-byte salt and
//! 12-byte nonce; key-encryption key = Argon2id(passphrase, salt) (64 MiB, 3
//! passes); the secret is sealed with AES-256-GCM under it, the key reference's
//! fingerprint as associated data. Stored as hex of salt ‖ nonce ‖ ciphertext.
//! The key is identified by a check value: SHA-256 of Argon2id(passphrase, a
//! fixed ferry salt), which names the passphrase without revealing it (a guess
//! costs one Argon2id evaluation).
//!
//! Owns the passphrase in memory (zeroized) and the derived keys (zeroized right
//! after use). Must not write or log the passphrase or anything derived from it
//! except the check value.

use super::{KeyError, KeyRef, KeySource, WrappedKey};
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::RngCore;
use sha2::Digest;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The scheme name stored in [`WrappedKey::scheme`].
pub const WRAP_SCHEME_PASSPHRASE: &str = "passphrase-argon2id-aes256gcm";

/// Argon2id cost: memory in KiB, passes, lanes.
const M_COST_KIB: u32 = 64 * 1024;
const T_COST: u32 = 3;
const P_COST: u32 = 1;
const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 12;
/// Salt of the check value (fixed, so the same passphrase always has the same id).
const ID_SALT: &[u8] = b"ferry passphrase key id v1";
/// Shortest passphrase accepted.
pub const MIN_LEN: usize = 12;

/// A tenant passphrase as a key source.
pub struct PassphraseKeySource {
    passphrase: Zeroizing<String>,
    origin: PathBuf,
    key_ref: KeyRef,
}

fn derive(passphrase: &str, salt: &[u8]) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let params =
        Params::new(M_COST_KIB, T_COST, P_COST, Some(32)).map_err(|e| KeyError::WrapFailed {
            key: "passphrase".into(),
            detail: format!("Argon2 parameters: {e}"),
        })?;
    let mut out = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase.as_bytes(), salt, out.as_mut())
        .map_err(|e| KeyError::WrapFailed {
            key: "passphrase".into(),
            detail: format!("Argon2id: {e}"),
        })?;
    Ok(out)
}

impl PassphraseKeySource {
    /// A source for `passphrase`; `origin` names where it came from in messages.
    pub fn new(passphrase: Zeroizing<String>, origin: &Path) -> Result<Self, KeyError> {
        if passphrase.chars().count() < MIN_LEN {
            return Err(KeyError::CannotUnwrap {
                source_name: format!("passphrase {}", origin.display()),
                why: format!("the passphrase must have at least {MIN_LEN} characters"),
            });
        }
        let check = derive(&passphrase, ID_SALT)?;
        let fp = hex::encode(sha2::Sha256::digest(check.as_ref()));
        let key_ref = KeyRef {
            source: "passphrase".into(),
            kms: "passphrase".into(),
            key_id: fp[..16].to_string(),
            key_version: 0,
            fingerprint: fp,
        };
        Ok(PassphraseKeySource {
            passphrase,
            origin: origin.to_path_buf(),
            key_ref,
        })
    }

    /// Read the passphrase from the first line of `path` (keep it `0600`).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let p = crate::config::read_secret_file(path).map_err(|e| KeyError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        Self::new(p, path)
    }
}

impl KeySource for PassphraseKeySource {
    fn name(&self) -> String {
        format!("passphrase:{}", self.origin.display())
    }

    fn current_key(&self) -> Result<KeyRef, KeyError> {
        Ok(self.key_ref.clone())
    }

    fn wrap(&self, secret: &[u8]) -> Result<WrappedKey, KeyError> {
        let mut salt = [0u8; SALT_LEN];
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let kek = derive(&self.passphrase, &salt)?;
        let cipher = Aes256Gcm::new_from_slice(kek.as_ref()).map_err(|e| KeyError::WrapFailed {
            key: self.key_ref.to_string(),
            detail: e.to_string(),
        })?;
        let mut ct = Zeroizing::new(secret.to_vec());
        let tag = cipher
            .encrypt_inout_detached(
                &Nonce::from(nonce),
                self.key_ref.fingerprint.as_bytes(),
                (&mut ct[..]).into(),
            )
            .map_err(|e| KeyError::WrapFailed {
                key: self.key_ref.to_string(),
                detail: e.to_string(),
            })?;
        let ct: Vec<u8> = ct.iter().copied().chain(tag.iter().copied()).collect();
        let mut out = Vec::with_capacity(SALT_LEN + NONCE_LEN + ct.len());
        out.extend_from_slice(&salt);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(WrappedKey {
            scheme: WRAP_SCHEME_PASSPHRASE.into(),
            key_ref: self.key_ref.clone(),
            wrapped: hex::encode(out),
        })
    }

    fn unwrap(&self, wrapped: &WrappedKey) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        if wrapped.scheme != WRAP_SCHEME_PASSPHRASE {
            return Err(KeyError::UnknownScheme(wrapped.scheme.clone()));
        }
        if !self.holds(&wrapped.key_ref) {
            return Err(KeyError::WrongKey {
                wanted: wrapped.key_ref.to_string(),
                have: self.key_ref.to_string(),
            });
        }
        let failed = || KeyError::UnwrapFailed {
            key: wrapped.key_ref.to_string(),
        };
        let bytes = hex::decode(&wrapped.wrapped).map_err(|_| failed())?;
        if bytes.len() < SALT_LEN + NONCE_LEN + 16 {
            return Err(failed());
        }
        let (salt, rest) = bytes.split_at(SALT_LEN);
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let kek = derive(&self.passphrase, salt)?;
        let cipher = Aes256Gcm::new_from_slice(kek.as_ref()).map_err(|_| failed())?;
        let (body, tag) = ct.split_at(ct.len() - 16);
        let mut plain = Zeroizing::new(body.to_vec());
        let mut n = [0u8; NONCE_LEN];
        n.copy_from_slice(nonce);
        let mut t = Tag::default();
        t.copy_from_slice(tag);
        cipher
            .decrypt_inout_detached(
                &Nonce::from(n),
                wrapped.key_ref.fingerprint.as_bytes(),
                (&mut plain[..]).into(),
                &t,
            )
            .map_err(|_| failed())?;
        Ok(plain)
    }

    fn holds(&self, key: &KeyRef) -> bool {
        key.source == self.key_ref.source && key.fingerprint == self.key_ref.fingerprint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(p: &str) -> PassphraseKeySource {
        PassphraseKeySource::new(Zeroizing::new(p.into()), Path::new("test")).unwrap()
    }

    #[test]
    fn round_trip_and_wrong_passphrase() {
        let a = src("correct horse battery staple");
        let w = a.wrap(&[7u8; 32]).unwrap();
        assert_eq!(w.scheme, WRAP_SCHEME_PASSPHRASE);
        assert_eq!(&a.unwrap(&w).unwrap()[..], &[7u8; 32]);
        // Same passphrase, new source: same key id, unwraps.
        assert_eq!(
            &src("correct horse battery staple").unwrap(&w).unwrap()[..],
            &[7u8; 32]
        );
        // Another passphrase: another key, refused by name, not by a failed decryption.
        let b = src("another long passphrase");
        assert_ne!(a.current_key().unwrap(), b.current_key().unwrap());
        assert!(matches!(b.unwrap(&w), Err(KeyError::WrongKey { .. })));
        // Two wraps of the same secret differ (fresh salt and nonce).
        assert_ne!(a.wrap(&[7u8; 32]).unwrap().wrapped, w.wrapped);
    }

    #[test]
    fn tampering_and_garbage_fail_cleanly() {
        let a = src("correct horse battery staple");
        let mut w = a.wrap(&[1u8; 32]).unwrap();
        let mut b = hex::decode(&w.wrapped).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        w.wrapped = hex::encode(&b);
        assert!(matches!(a.unwrap(&w), Err(KeyError::UnwrapFailed { .. })));
        w.wrapped = "00".into();
        assert!(matches!(a.unwrap(&w), Err(KeyError::UnwrapFailed { .. })));
        w.wrapped = "zz".into();
        assert!(matches!(a.unwrap(&w), Err(KeyError::UnwrapFailed { .. })));
        w.scheme = "rsa-oaep-sha1".into();
        assert!(matches!(a.unwrap(&w), Err(KeyError::UnknownScheme(_))));
    }

    #[test]
    fn short_passphrases_are_refused_and_never_shown() {
        let e = PassphraseKeySource::new(Zeroizing::new("short".into()), Path::new("pf"))
            .err()
            .unwrap();
        assert!(!e.to_string().contains("short"), "{e}");
        let a = src("correct horse battery staple");
        let shown = format!("{} {}", a.name(), a.current_key().unwrap());
        assert!(!shown.contains("horse"), "{shown}");
    }
}
