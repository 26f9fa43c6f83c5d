//! ferry-mocks: the things ferry is tested and demonstrated against.
//!
//! - [`diskgen`]: deterministic disk images (zero / compressible / incompressible
//!   regions, seeded, sparse) for tests, benchmarks and the demo.
//! - [`fixtures`]: shared test fixtures (tenant RSA key pairs in PEM files, TLS layouts).
//! - [`pki`]: an in-process test CA (rcgen) issuing server and client certificates.
//! - [`demo`]: the `ferry-sim demo` scenario.
//! - [`vcenter`]: the mock vCenter (vim25 SOAP over HTTPS, scenarios, snapshots, CBT,
//!   hot-add rules, NBD tickets, admin API).
//!
//! Mock ESXi NBD server and mock KMS join this crate in later work.

pub mod demo;
pub mod diskgen;
pub mod fixtures;
pub mod pki;
pub mod vcenter;
