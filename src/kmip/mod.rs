//! KMIP (Key Management Interoperability Protocol) 1.x for tenant key servers.
//!
//! [`ttlv`] is the wire codec. The typed messages, the mutual-TLS client and the KMS
//! [`crate::keys::KeySource`] build on it (issue 4).

pub mod client;
pub mod message;
pub mod tags;
pub mod ttlv;
