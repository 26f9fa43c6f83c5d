//! ferry-mocks: the things ferry is tested and demonstrated against.
//!
//! - [`diskgen`]: deterministic disk images (zero / compressible / incompressible
//!   regions, seeded, sparse) for tests, benchmarks and the demo.
//! - [`fixtures`]: shared test fixtures (tenant RSA key pairs in PEM files, TLS layouts).
//! - [`pki`]: an in-process test CA (rcgen) issuing server and client certificates.
//! - [`console`]: the web console on a simulated world, with its accounts.
//! - [`demo`]: the `ferry-sim demo` scenario.
//! - [`night`]: `ferry-sim night`, one measured backup night over a generated world.
//! - [`vcenter`]: the mock vCenter (vim25 SOAP over HTTPS, scenarios, snapshots, CBT,
//!   hot-add rules, NBD tickets, admin API).
//! - [`esxi`]: the mock ESXi NBD service (TLS required, exports by name/ticket,
//!   fault injection).
//! - [`world`]: the whole simulated provider (mock vCenter, mock ESXi, tenants,
//!   agents per proxy VM, orchestrator) for `ferry-sim` and end-to-end tests.
//! - [`scale`], [`provider`]: generated worlds for scale tests and benchmarks (the
//!   whitepaper provider with n VMs; a provider with N VMs, H hosts, T tenants and
//!   P proxies).
//! - [`kms`]: the mock KMS (KMIP 1.4 over mutual TLS, RSA key pairs with states,
//!   ReKeyKeyPair, persistence, fault injection).

pub mod console;
pub mod demo;
pub mod diskgen;
pub mod esxi;
pub mod fixtures;
pub mod kms;
pub mod night;
pub mod pki;
pub mod provider;
pub mod scale;
pub mod vcenter;
pub mod world;
