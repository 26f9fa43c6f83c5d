//! ferry's own VDDK layer: VMware's `libvixDiskLib` loaded at run time from a
//! configured directory, never linked at build time, driven through ferry's own
//! bindings of the published C API.
//!
//! - [`ffi`]: `#[repr(C)]` layouts, constants, function pointer types.
//! - [`loader`]: finding the library (VDDK 7.0.3 / 8.0.x), `dlopen`, symbols, the
//!   process-wide [`Vddk`] (InitEx once, Exit on shutdown), logs, error texts.
//! - [`session`]: connection parameters from ferry's vCenter session,
//!   PrepareForAccess/EndAccess, ConnectEx/Disconnect, Cleanup, thumbprints.
//! - [`disk`]: Open with the transport check, GetInfo, QueryAllocatedBlocks,
//!   aligned (async) reads and writes.
//! - [`source`]: [`VddkSource`] / [`VddkTarget`] behind the transport traits.
//!
//! Must not: decide the transport. The selector's mode is the only one VDDK is
//! given (`ConnectEx` gets exactly that string), and a disk VDDK opened any other
//! way is closed and refused ([`VddkError::ModeMismatch`]).

pub mod disk;
pub mod error;
pub mod ffi;
pub mod loader;
pub mod session;
pub mod source;

pub use disk::VddkDisk;
pub use error::VddkError;
pub use loader::{Vddk, VddkVersion};
pub use session::{cleanup, AccessGuard, CleanupSpec, ConnectSpec, Connection};
pub use source::{vddk_error, VddkSource, VddkTarget};
