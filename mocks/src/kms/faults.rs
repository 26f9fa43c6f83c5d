//! Fault injection and counters of the mock KMS, shared by every connection:
//! down (connections are cut), slow (latency before each answer), keys missing
//! (objects answer "Item Not Found"), Decrypt unsupported (forces ferry's
//! Get-private path), and `Attribute` elements inside `KeyValue` (as old Cosmian
//! KMS versions sent, seed 003).
//!
//! Owns the plan and the counters only: it never sleeps or closes anything itself
//! (the server and the operations read it).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Which objects the "key missing" fault hides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum MissingKeys {
    /// None (no fault).
    #[default]
    None,
    /// Every object: Locate finds nothing, every id is unknown.
    All,
    /// These unique identifiers.
    Ids(BTreeSet<String>),
}

/// The standing fault plan and the counters of one mock KMS.
#[derive(Debug, Default)]
pub struct Faults {
    down: AtomicBool,
    latency_ms: AtomicU64,
    decrypt_unsupported: AtomicBool,
    attributes_in_key_value: AtomicBool,
    missing: Mutex<MissingKeys>,
    counters: Counters,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    refused_down: AtomicU64,
    handshakes_full: AtomicU64,
    handshakes_resumed: AtomicU64,
    handshake_failures: AtomicU64,
    requests: AtomicU64,
    operations: Mutex<BTreeMap<String, u64>>,
}

/// A snapshot of a mock KMS's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KmsStats {
    /// TCP connections accepted.
    pub connections: u64,
    /// Connections cut because the KMS was down.
    pub refused_down: u64,
    /// TLS handshakes completed in full.
    pub handshakes_full: u64,
    /// TLS handshakes that resumed an earlier session (no certificate exchange).
    pub handshakes_resumed: u64,
    /// TLS handshakes that failed (certificates refused, garbage, timeouts).
    pub handshake_failures: u64,
    /// Request messages answered.
    pub requests: u64,
    /// Batch items per operation name.
    pub operations: BTreeMap<String, u64>,
}

impl Faults {
    /// Down: new connections are closed at once and kept-alive ones are closed
    /// instead of answered, as when the KMS host is gone.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
    /// Whether the KMS is down.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// Delay every answer by `latency` (zero: none).
    pub fn set_latency(&self, latency: Duration) {
        self.latency_ms
            .store(latency.as_millis() as u64, Ordering::SeqCst);
    }
    /// The current latency.
    pub fn latency(&self) -> Duration {
        Duration::from_millis(self.latency_ms.load(Ordering::SeqCst))
    }

    /// Refuse Decrypt ("Operation Not Supported") and leave it out of Query.
    pub fn set_decrypt_unsupported(&self, on: bool) {
        self.decrypt_unsupported.store(on, Ordering::SeqCst);
    }
    /// Whether Decrypt is refused.
    pub fn decrypt_unsupported(&self) -> bool {
        self.decrypt_unsupported.load(Ordering::SeqCst)
    }

    /// Put the object's attributes as `Attribute` elements inside `KeyValue` in Get
    /// answers.
    pub fn set_attributes_in_key_value(&self, on: bool) {
        self.attributes_in_key_value.store(on, Ordering::SeqCst);
    }
    /// Whether Get answers carry attributes inside `KeyValue`.
    pub fn attributes_in_key_value(&self) -> bool {
        self.attributes_in_key_value.load(Ordering::SeqCst)
    }

    /// Hide objects: they answer "Item Not Found" and Locate skips them.
    pub fn set_missing(&self, m: MissingKeys) {
        *self.missing.lock().unwrap_or_else(|p| p.into_inner()) = m;
    }
    /// Whether object `id` is hidden.
    pub fn is_missing(&self, id: &str) -> bool {
        match &*self.missing.lock().unwrap_or_else(|p| p.into_inner()) {
            MissingKeys::None => false,
            MissingKeys::All => true,
            MissingKeys::Ids(s) => s.contains(id),
        }
    }

    /// No more faults (counters are kept).
    pub fn clear(&self) {
        self.set_down(false);
        self.set_latency(Duration::ZERO);
        self.set_decrypt_unsupported(false);
        self.set_attributes_in_key_value(false);
        self.set_missing(MissingKeys::None);
    }

    /// Current counters.
    pub fn stats(&self) -> KmsStats {
        let c = &self.counters;
        KmsStats {
            connections: c.connections.load(Ordering::SeqCst),
            refused_down: c.refused_down.load(Ordering::SeqCst),
            handshakes_full: c.handshakes_full.load(Ordering::SeqCst),
            handshakes_resumed: c.handshakes_resumed.load(Ordering::SeqCst),
            handshake_failures: c.handshake_failures.load(Ordering::SeqCst),
            requests: c.requests.load(Ordering::SeqCst),
            operations: c
                .operations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    pub(crate) fn count_connection(&self) {
        self.counters.connections.fetch_add(1, Ordering::SeqCst);
    }
    pub(crate) fn count_refused_down(&self) {
        self.counters.refused_down.fetch_add(1, Ordering::SeqCst);
    }
    pub(crate) fn count_handshake(&self, resumed: bool) {
        let c = if resumed {
            &self.counters.handshakes_resumed
        } else {
            &self.counters.handshakes_full
        };
        c.fetch_add(1, Ordering::SeqCst);
    }
    pub(crate) fn count_handshake_failure(&self) {
        self.counters
            .handshake_failures
            .fetch_add(1, Ordering::SeqCst);
    }
    pub(crate) fn count_request(&self) {
        self.counters.requests.fetch_add(1, Ordering::SeqCst);
    }
    pub(crate) fn count_operation(&self, name: &str) {
        *self
            .counters
            .operations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default() += 1;
    }
}
