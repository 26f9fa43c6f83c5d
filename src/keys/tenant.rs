//! Opening a tenant's key source from its `[[tenant]]` configuration: the KMS
//! (`[tenant.kms]`, KMIP over mutual TLS) or PEM files (`[tenant.pem]`).
//!
//! Owns the translation from configuration to a [`KeySource`]; opening a KMS
//! source talks to the KMS (Locate + Get of the public key), so a KMS that is down
//! fails here, before a job writes anything. Must not cache sources between jobs
//! (each job start must see a rotated key) or read private key material itself.

use super::{KeyError, KeySource, KmsKeySource, PemKeySource};
use crate::config::{KmsSection, TenantSection};
use crate::kmip::client::{KmsClient, KmsConfig};
use std::time::Duration;

/// Where a tenant's key lives, for messages and key-sync reports (never secret).
pub fn describe(t: &TenantSection) -> String {
    match (&t.kms, &t.pem) {
        (Some(k), _) => format!("KMS {} key {:?}", k.address, k.key_name),
        (None, Some(p)) => format!("PEM key {}", p.public_key.display()),
        (None, None) => "no key source".into(),
    }
}

/// A KMIP client for `[tenant.kms]`.
pub fn kms_client(k: &KmsSection) -> Result<KmsClient, KeyError> {
    let be = |detail: String| KeyError::Backend {
        kms: k.address.clone(),
        detail,
    };
    let (client_cert, client_key) = match (&k.client_cert, &k.client_key, &k.pkcs12) {
        (Some(c), Some(key), _) => (c.clone(), key.clone()),
        (_, _, Some(p)) => {
            return Err(be(format!(
                "PKCS#12 client bundle {} is not supported by this build; convert it with \
                 'openssl pkcs12 -in {0} -nokeys -out client.pem' and '-nocerts -nodes -out client.key' \
                 and set client_cert/client_key",
                p.display()
            )))
        }
        _ => {
            return Err(be(
                "[tenant.kms] needs client_cert and client_key (mutual TLS)".into(),
            ))
        }
    };
    KmsClient::new(KmsConfig {
        address: k.address.clone(),
        server_name: k.server_name.clone(),
        ca: k.ca.clone(),
        client_cert,
        client_key,
        timeout: Duration::from_secs(k.timeout_secs.max(1)),
    })
    .map_err(|e| be(e.to_string()))
}

/// Open the key source of tenant `t` (its KMS, or its PEM files).
pub fn open(t: &TenantSection) -> Result<Box<dyn KeySource>, KeyError> {
    match (&t.kms, &t.pem) {
        (Some(k), _) => {
            let client = kms_client(k)?;
            let source = KmsKeySource::open(client, &k.key_name, k.create_key, k.key_bits as i32)?;
            Ok(Box::new(source))
        }
        (None, Some(p)) => Ok(Box::new(PemKeySource::open(
            Some(&p.public_key),
            p.private_key.as_deref(),
        )?)),
        (None, None) => Err(KeyError::Backend {
            kms: t.name.clone(),
            detail: format!(
                "tenant {} has neither [tenant.kms] nor [tenant.pem] in the config",
                t.name
            ),
        }),
    }
}
