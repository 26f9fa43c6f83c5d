//! [`VddkError`]: every way the VDDK layer fails, with messages an operator can
//! act on (what was tried, which symbol, which VIX code and VDDK's own text).
//!
//! Owns: the error type and its mapping into [`crate::transport::SourceError`] /
//! `std::io::Error`. Must not: call the library (error texts are fetched by the
//! loader before an error is built).

use std::path::PathBuf;

/// An error of ferry's VDDK layer.
#[derive(Debug, thiserror::Error)]
pub enum VddkError {
    /// No `libvixDiskLib.so.8`/`.so.7` under the configured directory.
    #[error(
        "VDDK (libvixDiskLib) not found under {}: tried {}; install VDDK 7.0.3 or 8.0.x there \
         (the directory that holds lib64/) or point `[vddk] libdir` / `--vddk-libdir` at it",
        libdir.display(),
        tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    LibraryMissing {
        /// The configured directory.
        libdir: PathBuf,
        /// Every path probed, in order.
        tried: Vec<PathBuf>,
    },
    /// A VDDK of a version ferry does not support.
    #[error(
        "unsupported VDDK version {version} ({}): ferry supports 7.0.3 and 8.0.x",
        path.display()
    )]
    UnsupportedVersion {
        /// The version found (`6`, `9`, `7.0.1`, ...).
        version: String,
        /// The file that shows it.
        path: PathBuf,
    },
    /// The file exists but the dynamic loader refused it.
    #[error(
        "cannot load {}: {reason}; it must be VDDK's x86_64 libvixDiskLib with its lib64/ \
         libraries beside it",
        path.display()
    )]
    NotLoadable {
        /// The file.
        path: PathBuf,
        /// `dlerror()`'s text.
        reason: String,
    },
    /// A function ferry needs is not exported by the library.
    #[error(
        "{} does not export {symbol}: not a VDDK 7.0.3/8.0.x libvixDiskLib",
        path.display()
    )]
    MissingSymbol {
        /// The missing symbol.
        symbol: &'static str,
        /// The library.
        path: PathBuf,
    },
    /// `VixDiskLib_InitEx` failed.
    #[error("VixDiskLib_InitEx failed: VIX error {} ({text})", code & 0xFFFF)]
    Init {
        /// The full `VixError`.
        code: u64,
        /// VDDK's text for it.
        text: String,
    },
    /// A VDDK call failed.
    #[error("{call} failed: VIX error {} ({text})", code & 0xFFFF)]
    Vix {
        /// The function (`VixDiskLib_Open`, ...).
        call: &'static str,
        /// The full `VixError`.
        code: u64,
        /// VDDK's text for it.
        text: String,
    },
    /// VDDK opened the disk with another transport than the one ferry chose.
    #[error(
        "VDDK opened {disk} with transport {got:?} but ferry asked for {asked:?}; ferry never \
         lets VDDK choose another transport (the disk was closed)"
    )]
    ModeMismatch {
        /// The disk path.
        disk: String,
        /// The mode ferry chose.
        asked: String,
        /// What `VixDiskLib_GetTransportMode` reported.
        got: String,
    },
    /// A caller-side argument is invalid (nothing was sent to VDDK).
    #[error("invalid VDDK argument: {0}")]
    InvalidArgument(String),
    /// The library broke its own contract (an impossible count, a request that
    /// never completed); the handle is no longer used.
    #[error("VDDK misbehaved in {call}: {detail}")]
    Protocol {
        /// The function.
        call: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// `VixDiskLib_Exit` already ran in this process; VDDK cannot be initialised again.
    #[error(
        "VDDK was shut down in this process (VixDiskLib_Exit) and cannot be initialised again"
    )]
    ShutDown,
}

impl VddkError {
    /// The VIX error number (low 16 bits) of a failed call, if this is one.
    pub fn vix_code(&self) -> Option<u64> {
        match self {
            VddkError::Vix { code, .. } | VddkError::Init { code, .. } => Some(code & 0xFFFF),
            _ => None,
        }
    }

    /// As an `io::Error` (kind `Other`, this error as its source), prefixed with
    /// `context` (disk, mode).
    pub fn into_io(self, context: &str) -> std::io::Error {
        std::io::Error::other(WithContext {
            context: context.to_string(),
            err: self,
        })
    }
}

/// A [`VddkError`] with the disk and mode it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {err}")]
pub struct WithContext {
    /// `vddk:nbdssl:[ds1] vm/vm.vmdk`.
    pub context: String,
    /// The error (kept out of `source()` so chains do not print it twice;
    /// reach it with `downcast_ref::<WithContext>()`).
    pub err: VddkError,
}
