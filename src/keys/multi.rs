//! [`MultiKeySource`]: several tenant key sources seen as one. New secrets are
//! wrapped by the first (current) source; unwrapping goes to the sources that hold
//! the key named in the wrapped key, in order, until one succeeds (a KMS whose key
//! was destroyed, then the same key exported by hand as PEM). Used for chains that
//! span key rotations or mix key stores, and for disaster recovery with keys
//! exported by hand.

use super::{KeyError, KeyRef, KeySource, WrappedKey};
use zeroize::Zeroizing;

/// An ordered list of key sources; the first one is current.
pub struct MultiKeySource {
    sources: Vec<Box<dyn KeySource>>,
}

impl MultiKeySource {
    /// Combine `sources` (at least one; the first wraps new secrets).
    pub fn new(sources: Vec<Box<dyn KeySource>>) -> Result<Self, KeyError> {
        if sources.is_empty() {
            return Err(KeyError::CannotUnwrap {
                source_name: "multi".into(),
                why: "no key source configured".into(),
            });
        }
        Ok(MultiKeySource { sources })
    }
}

impl KeySource for MultiKeySource {
    fn name(&self) -> String {
        self.sources
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(" + ")
    }
    fn current_key(&self) -> Result<KeyRef, KeyError> {
        self.sources[0].current_key()
    }
    fn wrap(&self, secret: &[u8]) -> Result<WrappedKey, KeyError> {
        self.sources[0].wrap(secret)
    }
    fn unwrap(&self, wrapped: &WrappedKey) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let mut first_err = None;
        for s in self.sources.iter().filter(|s| s.holds(&wrapped.key_ref)) {
            match s.unwrap(wrapped) {
                Ok(k) => return Ok(k),
                Err(e) => {
                    tracing::debug!(source = %s.name(), error = %e, "key source could not unwrap; trying the next one");
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| KeyError::WrongKey {
            wanted: wrapped.key_ref.to_string(),
            have: self.name(),
        }))
    }
    fn holds(&self, key: &KeyRef) -> bool {
        self.sources.iter().any(|s| s.holds(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{generate_pem_pair, PemKeySource};

    #[test]
    fn wraps_with_first_unwraps_with_holder() {
        let d = tempfile::tempdir().unwrap();
        let (pa, ka) = generate_pem_pair(d.path(), "a", 2048).unwrap();
        let (pb, kb) = generate_pem_pair(d.path(), "b", 2048).unwrap();
        let a = PemKeySource::open(Some(&pa), Some(&ka)).unwrap();
        let b = PemKeySource::open(Some(&pb), Some(&kb)).unwrap();
        let wb = b.wrap(&[5u8; 32]).unwrap();
        let m = MultiKeySource::new(vec![Box::new(a), Box::new(b)]).unwrap();
        let wa = m.wrap(&[6u8; 32]).unwrap();
        assert_eq!(&m.unwrap(&wa).unwrap()[..], &[6u8; 32]);
        assert_eq!(&m.unwrap(&wb).unwrap()[..], &[5u8; 32]);
        let (pc, _) = generate_pem_pair(d.path(), "c", 2048).unwrap();
        let c = PemKeySource::open(Some(&pc), None).unwrap();
        let wc = c.wrap(&[7u8; 32]).unwrap();
        assert!(matches!(m.unwrap(&wc), Err(KeyError::WrongKey { .. })));
    }
}
