//! [`KmsKeySource`]: the tenant's RSA key pair held in its KMS, over KMIP.
//!
//! Backups wrap with the public key fetched by Get (wrapping is local). Unwrapping
//! asks the KMS to decrypt (RSA-OAEP SHA-1, private key never leaves the KMS); if the
//! server cannot (PyKMIP decrypts symmetric keys only), the private key is fetched
//! with Get, used in memory for that one unwrap and zeroized (seed 000). ferry never
//! rotates or destroys tenant keys on its own.

use super::wrap::{fingerprint_spki, rsa_oaep_unwrap, wrap_for, wrapped_bytes};
use super::{KeyError, KeyRef, KeySource, WrappedKey};
use crate::kmip::client::{KmsClient, KmsError};
use crate::kmip::tags::*;
use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::{RsaPrivateKey, RsaPublicKey};
use std::sync::atomic::{AtomicBool, Ordering};
use zeroize::Zeroizing;

/// A key pair on a KMS, located by name.
pub struct KmsKeySource {
    client: KmsClient,
    name: String,
    public: RsaPublicKey,
    key_ref: KeyRef,
    decrypt_works: AtomicBool,
}

fn backend(kms: &str, e: impl std::fmt::Display) -> KeyError {
    KeyError::Backend {
        kms: kms.to_string(),
        detail: e.to_string(),
    }
}

/// Parse an RSA public key in whichever format the server returned.
pub fn public_from(format: u32, der: &[u8]) -> Result<RsaPublicKey, String> {
    match format {
        FMT_PKCS1 => RsaPublicKey::from_pkcs1_der(der).map_err(|e| e.to_string()),
        FMT_X509 => RsaPublicKey::from_public_key_der(der).map_err(|e| e.to_string()),
        f => RsaPublicKey::from_pkcs1_der(der)
            .or_else(|_| RsaPublicKey::from_public_key_der(der))
            .map_err(|_| format!("public key in unsupported format {f}")),
    }
}

fn private_from(format: u32, der: &[u8]) -> Result<RsaPrivateKey, String> {
    match format {
        FMT_PKCS8 => RsaPrivateKey::from_pkcs8_der(der).map_err(|e| e.to_string()),
        FMT_PKCS1 => RsaPrivateKey::from_pkcs1_der(der).map_err(|e| e.to_string()),
        f => RsaPrivateKey::from_pkcs8_der(der)
            .or_else(|_| RsaPrivateKey::from_pkcs1_der(der))
            .map_err(|_| format!("private key in unsupported format {f}")),
    }
}

impl KmsKeySource {
    /// Locate the active key pair `name` (e.g. `ferry/<tenant>/<repository>`); create
    /// and activate one of `bits` when absent and `create` is set.
    pub fn open(client: KmsClient, name: &str, create: bool, bits: i32) -> Result<Self, KeyError> {
        let kms = client.address().to_string();
        let be = |e: KmsError| backend(&kms, e);
        let mut privs = client
            .locate(name, OBJ_PRIVATE_KEY, Some(STATE_ACTIVE))
            .map_err(be)?;
        let mut pubs = client
            .locate(name, OBJ_PUBLIC_KEY, Some(STATE_ACTIVE))
            .map_err(be)?;
        if privs.is_empty() || pubs.is_empty() {
            if !create {
                return Err(backend(&kms, format!("no active key pair named {name:?} (create it on the KMS, or allow ferry to create it)")));
            }
            let (p, q) = client.create_rsa_key_pair(name, bits).map_err(be)?;
            client.activate(&p).map_err(be)?;
            client.activate(&q).map_err(be)?;
            tracing::info!(kms = %kms, name, private = %p, public = %q, "created and activated tenant key pair");
            privs = vec![p];
            pubs = vec![q];
        }
        // Several active pairs: the most recent one (highest id by length, then value).
        let newest = |v: &mut Vec<String>| {
            v.sort_by(|a, b| a.len().cmp(&b.len()).then(a.cmp(b)));
            v.pop().expect("non-empty")
        };
        let (priv_id, pub_id) = (newest(&mut privs), newest(&mut pubs));
        let k = client.get(&pub_id, None).map_err(be)?;
        let public = public_from(k.format, &k.material)
            .map_err(|e| backend(&kms, format!("public key {pub_id}: {e}")))?;
        let fingerprint = fingerprint_spki(&public);
        let key_ref = KeyRef {
            source: "kmip".into(),
            kms: kms.clone(),
            key_id: priv_id,
            key_version: 0,
            fingerprint,
        };
        let _ = pub_id;
        Ok(KmsKeySource {
            client,
            name: name.to_string(),
            public,
            key_ref,
            decrypt_works: AtomicBool::new(true),
        })
    }

    /// The client (for `ferry keys` commands).
    pub fn client(&self) -> &KmsClient {
        &self.client
    }

    /// The key pair's name on the KMS.
    pub fn key_name(&self) -> &str {
        &self.name
    }

    fn unwrap_with(
        &self,
        id: &str,
        wrapped: &[u8],
        label: &str,
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let kms = self.client.address();
        if self.decrypt_works.load(Ordering::Relaxed) {
            match self.client.decrypt_rsa_oaep_sha1(id, wrapped) {
                Ok(d) => return Ok(d),
                Err(e) => match e.reason() {
                    // The key is gone: say so, do not fall back. (Other refusals, even
                    // "Permission Denied" as PyKMIP answers for RSA, mean the server
                    // will not decrypt: fall back to Get, which reports its own error.)
                    Some(0x01) => return Err(backend(kms, format!("key {id}: {e}"))),
                    Some(_) => {
                        tracing::info!(kms, key = id, error = %e, "KMS cannot decrypt RSA-OAEP; using Get(private key) in memory instead");
                        self.decrypt_works.store(false, Ordering::Relaxed);
                    }
                    None => return Err(backend(kms, e)),
                },
            }
        }
        let k = self.client.get(id, None).map_err(|e| backend(kms, e))?;
        let sk = private_from(k.format, &k.material)
            .map_err(|e| backend(kms, format!("private key {id}: {e}")))?;
        drop(k); // the DER bytes are zeroized on drop
        rsa_oaep_unwrap(&sk, wrapped, label)
        // `sk` dropped here: rsa zeroizes it.
    }
}

impl KeySource for KmsKeySource {
    fn name(&self) -> String {
        format!("kmip:{}/{}", self.client.address(), self.name)
    }
    fn current_key(&self) -> Result<KeyRef, KeyError> {
        Ok(self.key_ref.clone())
    }
    fn wrap(&self, secret: &[u8]) -> Result<WrappedKey, KeyError> {
        wrap_for(&self.public, &self.key_ref, secret)
    }
    fn unwrap(&self, wrapped: &WrappedKey) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let bytes = wrapped_bytes(wrapped, self.holds(&wrapped.key_ref), &self.key_ref)?;
        self.unwrap_with(
            &wrapped.key_ref.key_id,
            &bytes,
            &wrapped.key_ref.to_string(),
        )
    }
    fn holds(&self, key: &KeyRef) -> bool {
        // Any key on this KMS can be asked for; the KMS says if it is gone.
        key.source == "kmip" && key.kms == self.key_ref.kms
    }
}
