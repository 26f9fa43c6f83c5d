//! Key sources built from a tenant's section of the configuration file
//! (`[tenant.kms]` or `[tenant.pem]`): the KMIP client (PEM or PKCS#12 client
//! certificate) and the rotation-aware [`KmsKeySource`], or a [`PemKeySource`].
//! What the agent calls at each job start.
//!
//! Reads certificate and key files only when asked; never logs secrets.

use super::{KeyError, KeySource, KmsFailure, KmsKeySource, PemKeySource};
use crate::config::{KmsSection, TenantSection};
use crate::kmip::client::{ClientIdentity, KmsClient, KmsConfig};
use std::time::Duration;

/// The KMIP client configuration of `[tenant.kms]`.
pub fn kms_config(k: &KmsSection) -> Result<KmsConfig, KeyError> {
    let identity = match (&k.pkcs12, &k.client_cert, &k.client_key) {
        (Some(bundle), _, _) => ClientIdentity::Pkcs12 {
            bundle: bundle.clone(),
            password_file: k.pkcs12_password_file.clone(),
        },
        (None, Some(cert), Some(key)) => ClientIdentity::Pem {
            cert: cert.clone(),
            key: key.clone(),
        },
        _ => {
            return Err(KeyError::Kms {
                kms: k.address.clone(),
                key: k.key_name.clone(),
                kind: KmsFailure::Config,
                detail: "no client certificate configured".into(),
                fix: "set client_cert + client_key, or pkcs12 (+ pkcs12_password_file)".into(),
            })
        }
    };
    Ok(KmsConfig {
        address: k.address.clone(),
        server_name: k.server_name.clone(),
        ca: k.ca.clone(),
        identity,
        timeout: Duration::from_secs(k.timeout_secs.max(1)),
    })
}

/// A KMIP client for `[tenant.kms]` (no network yet).
pub fn kms_client(k: &KmsSection) -> Result<KmsClient, KeyError> {
    KmsClient::new(kms_config(k)?)
        .map_err(|e| super::kms_error(e, &k.key_name, "preparing the KMS client"))
}

/// Open the tenant's KMS key source, following rotations: the newest Active
/// version of `key_name` is current (created first when `create_key` is set and
/// the KMS has none).
pub fn open_kms_source(k: &KmsSection) -> Result<KmsKeySource, KeyError> {
    KmsKeySource::open(kms_client(k)?, &k.key_name, k.create_key, k.key_bits as i32)
}

/// Open the tenant's key source at job start: its KMS key (rotation-aware), or
/// its PEM key files.
pub fn open_key_source(t: &TenantSection) -> Result<Box<dyn KeySource>, KeyError> {
    match (&t.kms, &t.pem) {
        (Some(k), _) => Ok(Box::new(open_kms_source(k)?)),
        (None, Some(p)) => Ok(Box::new(PemKeySource::open(
            Some(&p.public_key),
            p.private_key.as_deref(),
        )?)),
        (None, None) => Err(KeyError::CannotUnwrap {
            source_name: format!("tenant {}", t.name),
            why: "the tenant has no key source: configure [tenant.kms] or [tenant.pem]".into(),
        }),
    }
}

/// Where a tenant's key lives, for messages and key-sync reports (never secret).
pub fn describe(t: &TenantSection) -> String {
    match (&t.kms, &t.pem) {
        (Some(k), _) => format!("KMS {} key {:?}", k.address, k.key_name),
        (None, Some(p)) => format!("PEM key {}", p.public_key.display()),
        (None, None) => "no key source".into(),
    }
}
