//! RSA-OAEP (SHA-1, MGF1-SHA-1) wrapping of small secrets by a tenant RSA key, and
//! public key fingerprints. Pure functions: no files, no logging.

use super::{KeyError, KeyRef, WrappedKey};
use rsa::pkcs8::EncodePublicKey;
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};
use sha2::Digest;
use zeroize::Zeroizing;

/// The scheme name stored in [`super::WrappedKey::scheme`].
pub const WRAP_SCHEME_RSA_OAEP_SHA1: &str = "rsa-oaep-sha1";

/// Wrap `secret` by `key` (RSA-OAEP-SHA1) into the stored form naming `key_ref`.
pub fn wrap_for(
    key: &RsaPublicKey,
    key_ref: &KeyRef,
    secret: &[u8],
) -> Result<WrappedKey, KeyError> {
    let w = rsa_oaep_wrap(key, secret, &key_ref.to_string())?;
    Ok(WrappedKey {
        scheme: WRAP_SCHEME_RSA_OAEP_SHA1.into(),
        key_ref: key_ref.clone(),
        wrapped: hex::encode(w),
    })
}

/// Check that `wrapped` is RSA-OAEP-SHA1 and held by a source whose current key is
/// `have` (`holds` says whether it can unwrap it); return the wrapped bytes.
pub fn wrapped_bytes(
    wrapped: &WrappedKey,
    holds: bool,
    have: &KeyRef,
) -> Result<Vec<u8>, KeyError> {
    // Another key store's key (a passphrase, another KMS) is a missing key, not
    // an unknown scheme: check who holds it first.
    if !holds {
        return Err(KeyError::WrongKey {
            wanted: wrapped.key_ref.to_string(),
            have: have.to_string(),
        });
    }
    if wrapped.scheme != WRAP_SCHEME_RSA_OAEP_SHA1 {
        return Err(KeyError::UnknownScheme(wrapped.scheme.clone()));
    }
    hex::decode(&wrapped.wrapped).map_err(|_| KeyError::UnwrapFailed {
        key: wrapped.key_ref.to_string(),
    })
}

/// SHA-256 of the SubjectPublicKeyInfo DER of `key`, as hex.
pub fn fingerprint_spki(key: &RsaPublicKey) -> String {
    let der = key
        .to_public_key_der()
        .expect("encoding an in-memory RSA public key to DER cannot fail");
    hex::encode(sha2::Sha256::digest(der.as_bytes()))
}

/// Wrap `secret` with RSA-OAEP-SHA1.
pub fn rsa_oaep_wrap(key: &RsaPublicKey, secret: &[u8], name: &str) -> Result<Vec<u8>, KeyError> {
    key.encrypt(&mut rand::rngs::OsRng, Oaep::new::<sha1::Sha1>(), secret)
        .map_err(|e| KeyError::WrapFailed {
            key: name.to_string(),
            detail: e.to_string(),
        })
}

/// Unwrap RSA-OAEP-SHA1 ciphertext. The result is zeroized on drop.
pub fn rsa_oaep_unwrap(
    key: &RsaPrivateKey,
    wrapped: &[u8],
    name: &str,
) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    key.decrypt(Oaep::new::<sha1::Sha1>(), wrapped)
        .map(Zeroizing::new)
        .map_err(|_| KeyError::UnwrapFailed {
            key: name.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unwrap_roundtrip_and_tamper() {
        let sk = RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
        let pk = RsaPublicKey::from(&sk);
        let w = rsa_oaep_wrap(&pk, &[7u8; 32], "t").unwrap();
        assert_eq!(w.len(), 256);
        assert_eq!(&rsa_oaep_unwrap(&sk, &w, "t").unwrap()[..], &[7u8; 32]);
        let mut bad = w.clone();
        bad[100] ^= 1;
        assert!(matches!(
            rsa_oaep_unwrap(&sk, &bad, "t"),
            Err(KeyError::UnwrapFailed { .. })
        ));
        assert_eq!(fingerprint_spki(&pk).len(), 64);
    }
}
