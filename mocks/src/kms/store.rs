//! The mock KMS's managed objects (RSA public and private keys with KMIP
//! attributes and states) and their persistence: one JSON state file, replaced
//! atomically (temporary file, fsync, rename, fsync of the directory) after every
//! change, read back at start.
//!
//! Owns the data and its invariants (ids, links, states); it does not speak KMIP
//! (see `ops`) and never logs key material. The state file holds private keys in
//! clear: it is a mock KMS, for tests and demos only (docs/mocks.md).

use ferry::kmip::tags::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// Version of the state file layout.
pub const STATE_VERSION: u32 = 1;

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing the state file failed.
    #[error("mock KMS state file {path}: {detail}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
}

/// One managed object (a half of an RSA key pair).
#[derive(Clone, Serialize, Deserialize)]
pub struct Object {
    /// Unique identifier (decimal, increasing).
    pub id: String,
    /// Object Type (3 public key, 4 private key).
    pub object_type: u32,
    /// KMIP state.
    pub state: u32,
    /// Name values.
    pub names: Vec<String>,
    /// Cryptographic Algorithm.
    pub algorithm: u32,
    /// Cryptographic Length.
    pub length: i32,
    /// Cryptographic Usage Mask.
    pub usage_mask: i32,
    /// Links: (Link Type, linked object id).
    pub links: Vec<(u32, String)>,
    /// Initial Date (Unix seconds).
    pub initial_date: i64,
    /// Activation Date.
    pub activation_date: Option<i64>,
    /// Deactivation Date.
    pub deactivation_date: Option<i64>,
    /// Destroy Date.
    pub destroy_date: Option<i64>,
    /// Revocation reason code and message.
    pub revocation: Option<(u32, Option<String>)>,
    /// Key material: PKCS#1 DER, hex (public: RSAPublicKey; private:
    /// RSAPrivateKey). `None` once destroyed.
    pub material: Option<String>,
}

impl std::fmt::Debug for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Object")
            .field("id", &self.id)
            .field("object_type", &self.object_type)
            .field("state", &state_name(self.state))
            .field("names", &self.names)
            .field("links", &self.links)
            .field("material", &self.material.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Object {
    /// The object a link of `link_type` points to.
    pub fn link(&self, link_type: u32) -> Option<&str> {
        self.links
            .iter()
            .find(|(t, _)| *t == link_type)
            .map(|(_, i)| i.as_str())
    }
}

/// What is persisted.
#[derive(Default, Serialize, Deserialize)]
pub struct State {
    /// Layout version.
    pub version: u32,
    /// Last id handed out.
    pub last_id: u64,
    /// Objects by numeric id.
    pub objects: BTreeMap<u64, Object>,
}

impl State {
    /// A fresh id.
    pub fn next_id(&mut self) -> String {
        self.last_id += 1;
        self.last_id.to_string()
    }
    /// Look an object up by its identifier.
    pub fn get(&self, id: &str) -> Option<&Object> {
        id.parse::<u64>().ok().and_then(|n| self.objects.get(&n))
    }
    /// Mutable lookup.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Object> {
        id.parse::<u64>()
            .ok()
            .and_then(|n| self.objects.get_mut(&n))
    }
    /// Insert (its id must come from [`State::next_id`]).
    pub fn insert(&mut self, o: Object) {
        if let Ok(n) = o.id.parse::<u64>() {
            self.objects.insert(n, o);
        }
    }
}

/// A summary of one object for tests and `ferry-sim kms` (no key material).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObjectSummary {
    /// Unique identifier.
    pub id: String,
    /// "Public Key" or "Private Key".
    pub object_type: &'static str,
    /// State name.
    pub state: &'static str,
    /// Names.
    pub names: Vec<String>,
    /// Links (type name, id).
    pub links: Vec<(&'static str, String)>,
    /// Modulus size.
    pub length: i32,
}

/// Name of a link type.
pub fn link_name(t: u32) -> &'static str {
    match t {
        LINK_PUBLIC_KEY => "Public Key Link",
        LINK_PRIVATE_KEY => "Private Key Link",
        LINK_REPLACEMENT => "Replacement Object Link",
        LINK_REPLACED => "Replaced Object Link",
        _ => "Link",
    }
}

/// The objects, behind a lock, persisted to `path` when set.
pub struct Store {
    path: Option<PathBuf>,
    state: Mutex<State>,
}

impl Store {
    /// An empty in-memory store.
    pub fn memory() -> Store {
        Store {
            path: None,
            state: Mutex::new(State {
                version: STATE_VERSION,
                ..Default::default()
            }),
        }
    }

    /// The store persisted in `path`: read it when it exists, start empty
    /// otherwise. A damaged file is an error (never silently replaced: a KMS that
    /// forgets keys loses backups).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let err = |detail: String| StoreError::Io {
            path: path.to_path_buf(),
            detail,
        };
        let state = match std::fs::read(path) {
            Ok(b) => {
                let s: State = serde_json::from_slice(&b)
                    .map_err(|e| err(format!("unreadable ({e}); move it away to start empty")))?;
                if s.version != STATE_VERSION {
                    return Err(err(format!(
                        "layout version {} (this mock reads {STATE_VERSION})",
                        s.version
                    )));
                }
                s
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State {
                version: STATE_VERSION,
                ..Default::default()
            },
            Err(e) => return Err(err(e.to_string())),
        };
        Ok(Store {
            path: Some(path.to_path_buf()),
            state: Mutex::new(state),
        })
    }

    /// Where the state is persisted.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Lock the state (a poisoned lock is taken over: [`Store::update`] restores
    /// the previous state whenever a change does not complete).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Apply `f` to the state and persist the result. An `Err` from `f`, or a
    /// failure to persist, leaves the state as it was.
    pub fn update<T, E>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, E>,
        persist_err: impl FnOnce(StoreError) -> E,
    ) -> Result<T, E> {
        let mut g = self.lock();
        let before = serde_json::to_vec(&*g).ok();
        let restore = |g: &mut State| {
            if let Some(s) = before
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
            {
                *g = s;
            }
        };
        let out = match f(&mut g) {
            Ok(o) => o,
            Err(e) => {
                restore(&mut g);
                return Err(e);
            }
        };
        if let Some(p) = &self.path {
            if let Err(e) = save(p, &g) {
                restore(&mut g);
                return Err(persist_err(e));
            }
        }
        Ok(out)
    }

    /// Summaries of every object, oldest first.
    pub fn summaries(&self) -> Vec<ObjectSummary> {
        self.lock()
            .objects
            .values()
            .map(|o| ObjectSummary {
                id: o.id.clone(),
                object_type: if o.object_type == OBJ_PRIVATE_KEY {
                    "Private Key"
                } else {
                    "Public Key"
                },
                state: state_name(o.state),
                names: o.names.clone(),
                links: o
                    .links
                    .iter()
                    .map(|(t, i)| (link_name(*t), i.clone()))
                    .collect(),
                length: o.length,
            })
            .collect()
    }
}

fn save(path: &Path, state: &State) -> Result<(), StoreError> {
    let err = |detail: String| StoreError::Io {
        path: path.to_path_buf(),
        detail,
    };
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| err(e.to_string()))?;
    let tmp = path.with_extension("tmp");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    }
    ferry::repo::fsutil::atomic_write(&tmp, path, &bytes).map_err(|e| err(e.to_string()))?;
    // Private keys in clear: readable by the owner only.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(st: &mut State) -> Object {
        Object {
            id: st.next_id(),
            object_type: OBJ_PUBLIC_KEY,
            state: STATE_PRE_ACTIVE,
            names: vec!["n".into()],
            algorithm: ALG_RSA,
            length: 2048,
            usage_mask: 0,
            links: vec![],
            initial_date: 1,
            activation_date: None,
            deactivation_date: None,
            destroy_date: None,
            revocation: None,
            material: Some("00".into()),
        }
    }

    #[test]
    fn persists_and_rolls_back_failed_updates() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        let s = Store::open(&p).unwrap();
        s.update(
            |st| {
                let o = obj(st);
                st.insert(o);
                Ok::<_, String>(())
            },
            |e| e.to_string(),
        )
        .unwrap();
        // A failing change leaves nothing behind.
        let r: Result<(), String> = s.update(
            |st| {
                let o = obj(st);
                st.insert(o);
                Err("no".into())
            },
            |e| e.to_string(),
        );
        assert!(r.is_err());
        assert_eq!(s.summaries().len(), 1, "rolled back in memory too");
        drop(s);
        let s = Store::open(&p).unwrap();
        assert_eq!(s.summaries().len(), 1);
        assert_eq!(s.lock().get("1").unwrap().names, vec!["n".to_string()]);
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&p).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        // A damaged file is refused, not replaced.
        std::fs::write(&p, b"{not json").unwrap();
        assert!(Store::open(&p).is_err());
        assert!(!format!("{:?}", obj(&mut State::default())).contains("00\""));
    }
}
