//! NBD server side: what an exported disk must provide ([`ExportBackend`]), how
//! export names are resolved ([`ExportProvider`]), and the server that speaks the
//! protocol ([`NbdServer`]): fixed newstyle handshake, STARTTLS (TLS required when
//! configured, FORCEDTLS in the spec's words), OPT_GO/INFO/EXPORT_NAME/LIST,
//! structured replies, `base:allocation` block status; transmission with several
//! requests in flight per connection and several connections per export, read-only
//! unless the backend is writable (WRITE, WRITE_ZEROES, FLUSH, FUA). It serves both
//! `ferry export` (a restore point, decrypted on demand, read-only) and the mock ESXi
//! host (snapshot disks by read ticket, live disks by write ticket).
//!
//! Layout: [`handshake`] (the option state machine, pure), [`transmission`] (one
//! request → its reply bytes, pure over a backend; and the async request loop),
//! [`listen`] (listeners, accept loop, a server thread with its own runtime),
//! [`tls`] (rustls server configuration from PEM files), [`source`] (any
//! [`crate::transport::DiskSource`] as a backend).
//!
//! Must not know where the bytes come from: backends own that. Every length a
//! client sends is checked against a bound before it sizes a buffer; a hostile client
//! gets an error reply or a closed connection, never a panic.

pub mod handshake;
pub mod listen;
pub mod source;
pub mod tls;
pub mod transmission;

pub use listen::{Bind, LocalAddr, ServerThread};
pub use source::SourceBackend;

use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// A disk served over NBD, read-only unless [`ExportBackend::writable`] says
/// otherwise. Calls may come from several threads (and connections) at once; the
/// server calls it from blocking threads, never from async tasks.
pub trait ExportBackend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; the range lies inside the disk (the server checks).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Whether clients may write. Default: read-only (`NBD_FLAG_READ_ONLY` is
    /// sent and every write is refused with EPERM before reaching the backend).
    fn writable(&self) -> bool {
        false
    }
    /// Write `data` at `offset`; the range lies inside the disk (the server
    /// checks). Only called when [`ExportBackend::writable`] is true. Writes to
    /// disjoint ranges may run concurrently.
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let _ = (offset, data);
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "this export is read-only",
        ))
    }
    /// Make `[offset, offset + len)` read as zeroes (inside the disk). Default:
    /// writes zeroes through [`ExportBackend::write_at`] in bounded pieces.
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        const PIECE: u64 = 1 << 20;
        let zeros = vec![0u8; len.min(PIECE) as usize];
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(PIECE) as usize;
            self.write_at(at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }
    /// Make every completed write durable, whichever connection made it (the
    /// server advertises `NBD_FLAG_CAN_MULTI_CONN`, so a flush on one connection
    /// must cover the writes of all). Default: nothing to do.
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    /// Allocation of the range starting at `offset` (at most `len` bytes): runs of
    /// `(length, flags)` in order from `offset`, where flags are NBD
    /// `base:allocation` bits (1 = hole, 2 = reads as zeroes). May describe less than
    /// `len` but at least one byte. Backends that cannot tell return one data run.
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u32)>> {
        let _ = offset;
        Ok(vec![(len, 0)])
    }
}

/// Why an export name was refused (unknown, expired ticket, not allowed...). The
/// text goes back to the client in the NBD option error reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ExportRefused(pub String);

/// Resolves the export name a client asks for (a ticket, a disk number...) to a
/// backend.
pub trait ExportProvider: Send + Sync {
    /// The backend for `name`, or why not.
    fn open(&self, name: &str) -> Result<Arc<dyn ExportBackend>, ExportRefused>;
    /// Export names to announce for NBD_OPT_LIST, or `None` when listing is not
    /// allowed (tickets must not be enumerable). Default: not allowed.
    fn list(&self) -> Option<Vec<String>> {
        None
    }
}

/// A byte stream the server can speak NBD over (TCP, Unix socket, TLS on either,
/// or a test's in-memory pipe).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A boxed [`Io`].
pub type BoxedIo = Box<dyn Io>;

/// Wraps every accepted connection's raw stream before the server uses it (under
/// TLS). For fault injection in mocks and tests: cut connections, delay bytes.
pub type StreamHook = Arc<dyn Fn(BoxedIo) -> BoxedIo + Send + Sync>;

/// Server settings. The defaults suit `ferry export` and the mock ESXi host.
#[derive(Clone)]
pub struct ServerConfig {
    /// When set, TLS is required: every option but STARTTLS and ABORT is refused
    /// with NBD_REP_ERR_TLS_REQD until TLS is up. When unset, STARTTLS is refused
    /// with NBD_REP_ERR_POLICY and the server speaks clear text.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// Largest read (and write payload) a client may ask for; advertised as the
    /// maximum payload in NBD_INFO_BLOCK_SIZE. Larger writes are refused (their
    /// payload discarded up to [`transmission::MAX_DISCARD`], beyond which the
    /// connection is closed).
    pub max_payload: u32,
    /// Requests in flight per connection (further requests wait, unread).
    pub max_requests_per_connection: usize,
    /// Reply bytes in flight per connection.
    pub connection_budget: u64,
    /// Reply bytes in flight across all connections: bounds the server's memory.
    pub total_budget: u64,
    /// Time a client has to finish the handshake (TLS included).
    pub handshake_timeout: Duration,
    /// A reply that makes no progress for this long (a client that stopped
    /// reading) closes the connection and frees its buffers.
    pub write_timeout: Duration,
    /// Optional wrapper for accepted streams (fault injection).
    pub stream_hook: Option<StreamHook>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tls: None,
            max_connections: 64,
            max_payload: 32 << 20,
            max_requests_per_connection: 64,
            connection_budget: 64 << 20,
            total_budget: 256 << 20,
            handshake_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
            stream_hook: None,
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("tls_required", &self.tls.is_some())
            .field("max_connections", &self.max_connections)
            .field("max_payload", &self.max_payload)
            .field(
                "max_requests_per_connection",
                &self.max_requests_per_connection,
            )
            .field("connection_budget", &self.connection_budget)
            .field("total_budget", &self.total_budget)
            .finish_non_exhaustive()
    }
}

/// Why a connection ended abnormally. Logged, never sent to the client (the client
/// gets option errors or error replies for anything it can be told).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Socket or TLS failure.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol; the connection was closed.
    #[error("client protocol violation: {0}")]
    Protocol(#[from] crate::transport::nbd::proto::ProtoError),
    /// The client took too long.
    #[error("{0} timed out")]
    Timeout(&'static str),
}

/// An NBD server: a provider of exports and the settings to serve them with.
/// Serve connections with [`NbdServer::serve_connection`] or a whole listener with
/// [`NbdServer::run`] / [`ServerThread`].
pub struct NbdServer {
    provider: Arc<dyn ExportProvider>,
    config: ServerConfig,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    budget: Arc<tokio::sync::Semaphore>,
}

/// Buffer accounting unit of the reply budgets.
const BUDGET_UNIT: u64 = 64 * 1024;

impl NbdServer {
    /// A server for `provider`. Budgets are raised to hold at least one largest
    /// request.
    pub fn new(provider: Arc<dyn ExportProvider>, mut config: ServerConfig) -> Arc<Self> {
        config.max_payload = config.max_payload.clamp(4096, 1 << 30);
        let min_budget = config.max_payload as u64 + BUDGET_UNIT;
        config.connection_budget = config.connection_budget.max(min_budget);
        config.total_budget = config.total_budget.max(config.connection_budget);
        config.max_requests_per_connection = config.max_requests_per_connection.clamp(1, 4096);
        config.max_connections = config.max_connections.max(1);
        let units = (config.total_budget / BUDGET_UNIT).min(u32::MAX as u64) as usize;
        Arc::new(NbdServer {
            acceptor: config.tls.clone().map(tokio_rustls::TlsAcceptor::from),
            budget: Arc::new(tokio::sync::Semaphore::new(units)),
            provider,
            config,
        })
    }

    /// The effective settings.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Serve one connection to its end: handshake, then transmission until the
    /// client disconnects or `shutdown` turns true.
    pub async fn serve_connection(
        self: &Arc<Self>,
        io: BoxedIo,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), ServeError> {
        let io = match &self.config.stream_hook {
            Some(h) => h(io),
            None => io,
        };
        let negotiated = tokio::time::timeout(
            self.config.handshake_timeout,
            handshake::negotiate(self, io),
        )
        .await
        .map_err(|_| ServeError::Timeout("handshake"))??;
        let Some((io, export)) = negotiated else {
            return Ok(());
        };
        tracing::debug!(export = %export.name, size = export.size, structured = export.structured, "NBD transmission");
        transmission::run(self, io, export, shutdown).await
    }
}

#[cfg(test)]
mod tests;
