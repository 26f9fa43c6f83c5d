//! The history of one tenant key name on a KMS: every key pair that carried it,
//! oldest first, with versions, states and rotation links, and which pair is
//! current. This is how ferry follows rotations it never performs itself:
//!
//! - **ReKeyKeyPair** (KMIP): the server moves the name to the new pair and links
//!   the two (the old private key gets a *Replacement Object* link to the new one,
//!   the new one a *Replaced Object* link back). The pairs that lost the name are
//!   found by walking the *Replaced Object* links back from the named one.
//! - **A new pair with the same name** (servers without ReKeyKeyPair, e.g. PyKMIP):
//!   every pair keeps the name; the newest one is current.
//!
//! Versions count pairs oldest first (1, 2, 3...), ordered by Initial Date, then
//! by identifier. The current pair is the newest *Active* one. Read-only: only
//! Locate and GetAttributes are sent.

use super::{kms_error, KeyError, KmsFailure};
use crate::kmip::client::KmsClient;
use crate::kmip::message::ObjectAttributes;
use crate::kmip::tags::*;
use serde::Serialize;
use std::collections::BTreeMap;

/// Most pairs followed for one name (a bound against link cycles and abuse).
pub const MAX_VERSIONS: usize = 256;

/// One version of a tenant key: a private key and its public key on the KMS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KmsKeyPair {
    /// Version (1 = oldest pair of the name).
    pub version: u32,
    /// KMIP unique identifier of the private key (what restore points name).
    pub private_id: String,
    /// The public key's identifier, when known (Public Key link, or by name).
    pub public_id: Option<String>,
    /// State of the private key (`None`: the KMS no longer knows it).
    pub state: Option<u32>,
    /// State name.
    pub state_name: String,
    /// Names the private key carries now (empty once a re-key moved them).
    pub names: Vec<String>,
    /// Initial Date (Unix seconds).
    pub initial_date: Option<i64>,
    /// Modulus size.
    pub bits: Option<i32>,
    /// The private key this one replaced (Replaced Object link).
    pub replaces: Option<String>,
    /// The private key that replaced this one (Replacement Object link).
    pub replaced_by: Option<String>,
    /// Whether this is the pair new data keys are wrapped with.
    pub current: bool,
}

/// Every version of one key name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyLineage {
    /// KMS address.
    pub kms: String,
    /// The key name.
    pub name: String,
    /// Pairs, oldest first.
    pub pairs: Vec<KmsKeyPair>,
}

impl KeyLineage {
    /// The current pair (newest Active one), if any.
    pub fn current(&self) -> Option<&KmsKeyPair> {
        self.pairs.iter().find(|p| p.current)
    }

    /// The pair whose private key is `id`.
    pub fn by_private_id(&self, id: &str) -> Option<&KmsKeyPair> {
        self.pairs.iter().find(|p| p.private_id == id)
    }
}

fn id_order(a: &str, b: &str) -> std::cmp::Ordering {
    // Numeric-looking ids (PyKMIP, the mock) compare as numbers; others as text.
    a.len().cmp(&b.len()).then(a.cmp(b))
}

fn lookup(client: &KmsClient, name: &str, id: &str) -> Result<Option<ObjectAttributes>, KeyError> {
    match client.object_attributes(id) {
        Ok(a) => Ok(Some(a)),
        Err(e) if e.reason() == Some(REASON_ITEM_NOT_FOUND) => Ok(None),
        Err(e) => Err(kms_error(e, name, "reading the key's attributes")),
    }
}

/// Follow key `name` on the KMS: Locate every private key of that name (any
/// state), walk the rotation links, order and number the pairs, mark the current
/// one. An empty lineage means the KMS has no key of that name.
pub fn resolve(client: &KmsClient, name: &str) -> Result<KeyLineage, KeyError> {
    let named = client
        .locate(name, OBJ_PRIVATE_KEY, None)
        .map_err(|e| kms_error(e, name, "looking the key up (Locate)"))?;
    let mut found: BTreeMap<String, Option<ObjectAttributes>> = BTreeMap::new();
    let mut todo: Vec<String> = named;
    while let Some(id) = todo.pop() {
        if found.contains_key(&id) {
            continue;
        }
        if found.len() >= MAX_VERSIONS {
            return Err(KeyError::Kms {
                kms: client.address().to_string(),
                key: name.to_string(),
                kind: KmsFailure::BadAnswer,
                detail: format!("more than {MAX_VERSIONS} key pairs in the rotation history"),
                fix: "clean up the key's history on the KMS".into(),
            });
        }
        let attrs = lookup(client, name, &id)?;
        if let Some(a) = &attrs {
            if a.object_type.is_some_and(|t| t != OBJ_PRIVATE_KEY) {
                continue;
            }
            for lt in [LINK_REPLACED, LINK_REPLACEMENT] {
                if let Some(next) = a.link(lt) {
                    todo.push(next.to_string());
                }
            }
        }
        found.insert(id, attrs);
    }
    let mut pairs: Vec<KmsKeyPair> = found
        .into_iter()
        .map(|(id, a)| {
            let a = a.unwrap_or_default();
            KmsKeyPair {
                version: 0,
                public_id: a.link(LINK_PUBLIC_KEY).map(str::to_string),
                state: a.state,
                state_name: match a.state {
                    Some(s) => state_name(s).to_string(),
                    None => "unknown to the KMS (destroyed?)".to_string(),
                },
                names: a.names.clone(),
                initial_date: a.initial_date,
                bits: a.length,
                replaces: a.link(LINK_REPLACED).map(str::to_string),
                replaced_by: a.link(LINK_REPLACEMENT).map(str::to_string),
                current: false,
                private_id: id,
            }
        })
        .collect();
    pairs.sort_by(|a, b| {
        a.initial_date
            .unwrap_or(i64::MIN)
            .cmp(&b.initial_date.unwrap_or(i64::MIN))
            .then_with(|| id_order(&a.private_id, &b.private_id))
    });
    for (i, p) in pairs.iter_mut().enumerate() {
        p.version = i as u32 + 1;
    }
    if let Some(p) = pairs
        .iter_mut()
        .rev()
        .find(|p| p.state == Some(STATE_ACTIVE))
    {
        p.current = true;
    }
    Ok(KeyLineage {
        kms: client.address().to_string(),
        name: name.to_string(),
        pairs,
    })
}

/// The public key of `pair`: its Public Key link, or (servers that keep no links)
/// the Active public key of the same name created with it.
pub fn public_id_of(client: &KmsClient, name: &str, pair: &KmsKeyPair) -> Result<String, KeyError> {
    if let Some(p) = &pair.public_id {
        return Ok(p.clone());
    }
    let ids = client
        .locate(name, OBJ_PUBLIC_KEY, Some(STATE_ACTIVE))
        .map_err(|e| kms_error(e, name, "looking the public key up (Locate)"))?;
    let mut best: Option<(bool, String)> = None;
    for id in ids {
        let Some(a) = lookup(client, name, &id)? else {
            continue;
        };
        if let Some(priv_link) = a.link(LINK_PRIVATE_KEY) {
            if priv_link == pair.private_id {
                return Ok(id);
            }
            continue; // another pair's public key
        }
        let same_date = a.initial_date.is_some() && a.initial_date == pair.initial_date;
        let better = match &best {
            None => true,
            Some((bd, bid)) => {
                (same_date && !bd) || (same_date == *bd && id_order(&id, bid).is_gt())
            }
        };
        if better {
            best = Some((same_date, id));
        }
    }
    best.map(|(_, id)| id).ok_or_else(|| KeyError::Kms {
        kms: client.address().to_string(),
        key: name.to_string(),
        kind: KmsFailure::NotActive,
        detail: format!(
            "private key {} has no active public key of that name",
            pair.private_id
        ),
        fix: "activate the public half of the key pair on the KMS".into(),
    })
}

/// Names of the private keys on the KMS that start with `prefix` (Locate by
/// object type, then the Name attribute of each: fine for a listing, too slow for
/// a job start).
pub fn names_with_prefix(client: &KmsClient, prefix: &str) -> Result<Vec<String>, KeyError> {
    let ids = client
        .call(
            OP_LOCATE,
            vec![crate::kmip::message::attribute(
                "Object Type",
                crate::kmip::ttlv::Value::Enumeration(OBJ_PRIVATE_KEY),
            )],
        )
        .and_then(|p| {
            crate::kmip::message::parse_ids(&p).map_err(|source| {
                crate::kmip::client::KmsError::Kmip {
                    kms: client.address().to_string(),
                    source,
                }
            })
        })
        .map_err(|e| kms_error(e, prefix, "listing private keys (Locate)"))?;
    let mut names = std::collections::BTreeSet::new();
    for id in ids {
        let attrs = match client.get_attributes(&id, &["Name"]) {
            Ok(a) => a,
            Err(e) if e.reason().is_some() => continue,
            Err(e) => return Err(kms_error(e, prefix, "reading key names")),
        };
        for (n, v) in attrs {
            if n != "Name" {
                continue;
            }
            if let Some(name) = v.child(NAME_VALUE).and_then(|x| x.as_text().ok()) {
                if name.starts_with(prefix) {
                    names.insert(name.to_string());
                }
            }
        }
    }
    Ok(names.into_iter().collect())
}
