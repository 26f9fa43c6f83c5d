//! [`KmsKeySource`]: the tenant's RSA key pair held in its KMS, over KMIP.
//!
//! Opening follows the key name through rotations ([`super::lineage`]): the
//! newest Active pair is current, and its version is recorded in every key
//! reference (so restore points and the keyring say which version wrapped them).
//! Backups wrap with the current public key fetched by Get (wrapping is local).
//! Unwrapping names the private key recorded with the wrapped key (any version,
//! Deactivated ones included) and asks the KMS to decrypt (RSA-OAEP SHA-1, the
//! private key never leaves the KMS); if the server cannot (PyKMIP decrypts
//! symmetric keys only), the private key is fetched with Get, used in memory for
//! that one unwrap and zeroized (seed 000). ferry never rotates or destroys tenant
//! keys on its own.

use super::lineage::{self, KeyLineage};
use super::wrap::{fingerprint_spki, rsa_oaep_unwrap, wrap_for, wrapped_bytes};
use super::{KeyError, KeyRef, KeySource, KmsFailure, WrappedKey};
use crate::kmip::client::{KmsClient, KmsError};
use crate::kmip::message::KmipError;
use crate::kmip::tags::*;
use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::{RsaPrivateKey, RsaPublicKey};
use std::sync::atomic::{AtomicBool, Ordering};
use zeroize::Zeroizing;

/// Turn a KMS client error about `key` (a name or a unique identifier) during
/// `doing` into a [`KeyError::Kms`] that says what to do.
pub fn kms_error(e: KmsError, key: &str, doing: &str) -> KeyError {
    let (kms, kind, fix): (String, KmsFailure, String) = match &e {
        KmsError::Tls { kms, .. } => (
            kms.clone(),
            KmsFailure::Config,
            "check the KMS CA and client certificate files (paths, PEM or PKCS#12, password)".into(),
        ),
        KmsError::Unreachable { kms, .. } => (
            kms.clone(),
            KmsFailure::Unreachable,
            "check the KMS address and that the KMS runs and answers; backups fail before writing anything while it is down".into(),
        ),
        KmsError::TlsRefused { kms, fix, .. } => {
            (kms.clone(), KmsFailure::TlsRefused, (*fix).to_string())
        }
        KmsError::Kmip { kms, source } => match source {
            KmipError::Failed {
                reason: REASON_ITEM_NOT_FOUND,
                ..
            } => (
                kms.clone(),
                KmsFailure::KeyNotFound,
                "the key was destroyed on the KMS or never existed there: restore through the keyring (wrapped by the newest key), or get the private key exported by the KMS administrator and give it with --extra-private-key; 'ferry repo import' lists which restore points need which key".into(),
            ),
            KmipError::Failed {
                reason: REASON_PERMISSION_DENIED,
                ..
            } => (
                kms.clone(),
                KmsFailure::Refused,
                "the KMS does not let ferry's client certificate use this key: grant it access on the KMS".into(),
            ),
            KmipError::Failed {
                reason: REASON_OPERATION_NOT_SUPPORTED,
                ..
            } => (
                kms.clone(),
                KmsFailure::Refused,
                "the KMS does not support this operation (see 'ferry keys test')".into(),
            ),
            KmipError::Failed { .. } => (
                kms.clone(),
                KmsFailure::Refused,
                "see the KMS's reason above; 'ferry keys list' shows the key's states".into(),
            ),
            KmipError::Malformed(_) | KmipError::Unexpected(_) => (
                kms.clone(),
                KmsFailure::BadAnswer,
                "the KMS sent an answer ferry cannot read: check that it speaks KMIP 1.x (ferry keys test)".into(),
            ),
        },
    };
    KeyError::Kms {
        kms,
        key: key.to_string(),
        kind,
        detail: format!("{doing}: {e}"),
        fix,
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

/// The current key: its public half and reference.
struct Current {
    public: RsaPublicKey,
    key_ref: KeyRef,
    lineage: KeyLineage,
}

/// A key pair on a KMS, located by name and followed through rotations.
pub struct KmsKeySource {
    client: KmsClient,
    name: Option<String>,
    current: Option<Current>,
    decrypt_works: AtomicBool,
}

fn bad(kms: &str, key: &str, kind: KmsFailure, detail: String, fix: &str) -> KeyError {
    KeyError::Kms {
        kms: kms.to_string(),
        key: key.to_string(),
        kind,
        detail,
        fix: fix.to_string(),
    }
}

/// Resolve `name` to its current pair and fetch the public key.
fn load_current(client: &KmsClient, name: &str) -> Result<Current, KeyError> {
    let kms = client.address().to_string();
    let lineage = lineage::resolve(client, name)?;
    let pair = lineage.current().cloned().ok_or_else(|| {
        let have = lineage
            .pairs
            .iter()
            .map(|p| format!("{} v{} {}", p.private_id, p.version, p.state_name))
            .collect::<Vec<_>>()
            .join(", ");
        bad(
            &kms,
            name,
            KmsFailure::NotActive,
            format!("no Active key pair of that name (versions on the KMS: {have})"),
            "activate the newest key pair on the KMS, or have the KMS administrator create a new one",
        )
    })?;
    let pub_id = lineage::public_id_of(client, name, &pair)?;
    let k = client
        .get(&pub_id, None)
        .map_err(|e| kms_error(e, name, &format!("getting public key {pub_id}")))?;
    if k.object_type != OBJ_PUBLIC_KEY {
        return Err(bad(
            &kms,
            name,
            KmsFailure::BadAnswer,
            format!("object {pub_id} is not a public key"),
            "check the key pair's links on the KMS",
        ));
    }
    let public = public_from(k.format, &k.material).map_err(|e| {
        bad(
            &kms,
            name,
            KmsFailure::BadAnswer,
            format!("public key {pub_id}: {e}"),
            "the KMS returned a public key ferry cannot parse (PKCS#1 or SubjectPublicKeyInfo expected)",
        )
    })?;
    let key_ref = KeyRef {
        source: "kmip".into(),
        kms,
        key_id: pair.private_id.clone(),
        key_version: pair.version,
        fingerprint: fingerprint_spki(&public),
    };
    Ok(Current {
        public,
        key_ref,
        lineage,
    })
}

impl KmsKeySource {
    /// Follow key pair `name` (e.g. `ferry/<tenant>/<repository>`) on the KMS and
    /// use its newest Active version. When the KMS has no key of that name at all
    /// and `create` is set, create one of `bits` and activate it. A name whose
    /// versions are all inactive is an error, even with `create`: only the KMS
    /// administrator decides about keys that exist.
    pub fn open(client: KmsClient, name: &str, create: bool, bits: i32) -> Result<Self, KeyError> {
        let kms = client.address().to_string();
        let lineage = lineage::resolve(&client, name)?;
        if lineage.pairs.is_empty() {
            if !create {
                return Err(bad(
                    &kms,
                    name,
                    KmsFailure::KeyNotFound,
                    "the KMS has no key pair of that name".into(),
                    "create it ('ferry keys create' or --kms-create), or check the key name",
                ));
            }
            let be = |e: KmsError| kms_error(e, name, "creating the key pair");
            let (p, q) = client.create_rsa_key_pair(name, bits).map_err(be)?;
            client.activate(&p).map_err(be)?;
            client.activate(&q).map_err(be)?;
            tracing::info!(kms = %kms, name, private = %p, public = %q, "created and activated tenant key pair");
        }
        let current = load_current(&client, name)?;
        tracing::info!(kms = %kms, name, key = %current.key_ref.key_id, version = current.key_ref.key_version, "tenant key");
        Ok(KmsKeySource {
            client,
            name: Some(name.to_string()),
            current: Some(current),
            decrypt_works: AtomicBool::new(true),
        })
    }

    /// A source that only unwraps (restore, verify, disaster-recovery import on a
    /// fresh installation that does not know the key name): every wrapped key names
    /// its KMS private key, so no name is needed. Wrapping fails.
    pub fn unwrap_only(client: KmsClient) -> Self {
        KmsKeySource {
            client,
            name: None,
            current: None,
            decrypt_works: AtomicBool::new(true),
        }
    }

    /// Look at the KMS again (a rotation may have happened since `open`): switch
    /// to the newest Active version. Returns (old, new) key references when the
    /// current key changed.
    pub fn refresh(&mut self) -> Result<Option<(KeyRef, KeyRef)>, KeyError> {
        let Some(name) = self.name.clone() else {
            return Ok(None);
        };
        let new = load_current(&self.client, &name)?;
        let old = self.current.replace(new);
        let new_ref = self.current.as_ref().map(|c| c.key_ref.clone());
        match (old.map(|c| c.key_ref), new_ref) {
            (Some(o), Some(n)) if o.key_id != n.key_id || o.fingerprint != n.fingerprint => {
                tracing::info!(kms = %n.kms, name, old = %o.key_id, new = %n.key_id, version = n.key_version, "tenant key rotated on the KMS: new restore points use the new key");
                Ok(Some((o, n)))
            }
            _ => Ok(None),
        }
    }

    /// The client (for `ferry keys` commands).
    pub fn client(&self) -> &KmsClient {
        &self.client
    }

    /// The key pair's name on the KMS (empty for [`KmsKeySource::unwrap_only`]).
    pub fn key_name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }

    /// The key's history as seen when opened or last refreshed.
    pub fn lineage(&self) -> Option<&KeyLineage> {
        self.current.as_ref().map(|c| &c.lineage)
    }

    fn no_current(&self) -> KeyError {
        bad(
            self.client.address(),
            "(none)",
            KmsFailure::Config,
            "no key name is configured: this KMS source unwraps restore points but cannot wrap new keys".into(),
            "give the key name (--kms-key NAME, or key_name in [tenant.kms])",
        )
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
                    Some(REASON_ITEM_NOT_FOUND) => {
                        return Err(kms_error(e, id, "decrypting the data key (Decrypt)"))
                    }
                    Some(_) => {
                        tracing::info!(kms, key = id, error = %e, "KMS cannot decrypt RSA-OAEP; using Get(private key) in memory instead");
                        self.decrypt_works.store(false, Ordering::Relaxed);
                    }
                    None => return Err(kms_error(e, id, "decrypting the data key (Decrypt)")),
                },
            }
        }
        let k = self
            .client
            .get(id, None)
            .map_err(|e| kms_error(e, id, "getting the private key to unwrap in memory (Get)"))?;
        let sk = private_from(k.format, &k.material).map_err(|e| {
            bad(
                kms,
                id,
                KmsFailure::BadAnswer,
                format!("private key: {e}"),
                "the KMS returned a private key ferry cannot parse (PKCS#8 or PKCS#1 expected)",
            )
        })?;
        drop(k); // the DER bytes are zeroized on drop
        rsa_oaep_unwrap(&sk, wrapped, label)
        // `sk` dropped here: rsa zeroizes it.
    }
}

impl KeySource for KmsKeySource {
    fn name(&self) -> String {
        match &self.name {
            Some(n) => format!("kmip:{}/{}", self.client.address(), n),
            None => format!("kmip:{}", self.client.address()),
        }
    }
    fn current_key(&self) -> Result<KeyRef, KeyError> {
        self.current
            .as_ref()
            .map(|c| c.key_ref.clone())
            .ok_or_else(|| self.no_current())
    }
    fn wrap(&self, secret: &[u8]) -> Result<WrappedKey, KeyError> {
        let c = self.current.as_ref().ok_or_else(|| self.no_current())?;
        wrap_for(&c.public, &c.key_ref, secret)
    }
    fn unwrap(&self, wrapped: &WrappedKey) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let have = self
            .current
            .as_ref()
            .map(|c| c.key_ref.clone())
            .unwrap_or(KeyRef {
                source: "kmip".into(),
                kms: self.client.address().to_string(),
                key_id: "(any)".into(),
                key_version: 0,
                fingerprint: String::new(),
            });
        let bytes = wrapped_bytes(wrapped, self.holds(&wrapped.key_ref), &have)?;
        self.unwrap_with(
            &wrapped.key_ref.key_id,
            &bytes,
            &wrapped.key_ref.to_string(),
        )
    }
    fn holds(&self, key: &KeyRef) -> bool {
        // Any key on this KMS can be asked for; the KMS says if it is gone.
        key.source == "kmip" && key.kms == self.client.address()
    }
}
