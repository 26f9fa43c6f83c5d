//! Mock ESXi NBD service: ferry's NBD server ([`ferry::nbd_server`]) with TLS
//! required, exporting whatever an [`ExportProvider`] resolves (the mock vCenter's
//! tickets: snapshot disks read-only, live disks writable for restores;
//! [`FileExports`], a name → raw image map, read-only or writable, for tests), plus
//! runtime fault injection ([`Faults`]): cut connections after N bytes sent or
//! received, slow reads.
//!
//! Start it in process with [`MockEsxi::start`] (port 0 = a free port) and stop it
//! with [`MockEsxi::stop`] or by dropping it. Knows nothing about vCenter: tickets
//! are the provider's business.

use ferry::nbd_server::{
    BoxedIo, ExportBackend, ExportProvider, ExportRefused, NbdServer, ServerConfig, ServerThread,
    SourceBackend,
};
use ferry::transport::file::FileSource;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Errors starting the mock.
#[derive(Debug, thiserror::Error)]
pub enum EsxiError {
    /// Certificate or key unusable.
    #[error("mock ESXi TLS: {0}")]
    Tls(#[from] ferry::tls::TlsError),
    /// Binding or reading files failed.
    #[error("mock ESXi: {0}")]
    Io(#[from] std::io::Error),
}

/// The server certificate (and optionally a CA for client certificates).
#[derive(Clone)]
pub struct ServerTls {
    /// Certificate chain PEM, leaf first.
    pub cert_pem: String,
    /// Private key PEM.
    pub key_pem: String,
    /// When set, clients must present a certificate signed by this CA.
    pub client_ca_pem: Option<String>,
}

impl ServerTls {
    /// From a certificate issued by [`crate::pki::Ca::server`].
    pub fn from_issued(server: &crate::pki::Issued) -> Self {
        ServerTls {
            cert_pem: server.cert_pem.clone(),
            key_pem: server.key_pem.clone(),
            client_ca_pem: None,
        }
    }

    /// From a directory in the libnbd layout (`server-cert.pem`, `server-key.pem`;
    /// `ca-cert.pem` when `verify_clients`), e.g. written by
    /// [`crate::fixtures::tls_certs`].
    pub fn from_dir(dir: &Path, verify_clients: bool) -> std::io::Result<Self> {
        let read = |n: &str| std::fs::read_to_string(dir.join(n));
        Ok(ServerTls {
            cert_pem: read("server-cert.pem")?,
            key_pem: read("server-key.pem")?,
            client_ca_pem: if verify_clients {
                Some(read("ca-cert.pem")?)
            } else {
                None
            },
        })
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls(<certificate and key>)")
    }
}

/// Runtime fault injection and counters, shared by every connection of one mock.
#[derive(Debug, Default)]
pub struct Faults {
    /// (bytes, connections): the next `connections` accepted connections are cut
    /// after the server has sent `bytes` bytes on them.
    drop_after: Mutex<Option<(u64, usize)>>,
    /// The same, counting bytes received from the client (writes carry payloads).
    drop_after_received: Mutex<Option<(u64, usize)>>,
    read_latency_us: AtomicU64,
    connections: AtomicU64,
    dropped: AtomicU64,
    reads: AtomicU64,
    reads_now: AtomicUsize,
    reads_max: AtomicUsize,
    writes: AtomicU64,
    bytes_written: AtomicU64,
}

/// A snapshot of a mock's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections cut by [`Faults::drop_connections_after`].
    pub dropped: u64,
    /// Backend reads served.
    pub reads: u64,
    /// Most backend reads running at the same time.
    pub max_concurrent_reads: usize,
    /// Backend writes served (write and write-zeroes requests).
    pub writes: u64,
    /// Bytes written through the backend.
    pub bytes_written: u64,
}

impl Faults {
    /// Cut each of the next `connections` accepted connections once the server has
    /// sent `bytes` bytes on it (greeting, option replies and TLS records included),
    /// as a network failure mid-read would.
    pub fn drop_connections_after(&self, bytes: u64, connections: usize) {
        *self.drop_after.lock().unwrap_or_else(|p| p.into_inner()) = Some((bytes, connections));
    }

    /// Cut each of the next `connections` accepted connections once the server has
    /// received `bytes` bytes on it (TLS records included): a network failure in
    /// the middle of a restore's writes.
    pub fn drop_connections_after_received(&self, bytes: u64, connections: usize) {
        *self
            .drop_after_received
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((bytes, connections));
    }

    /// Delay every backend read by `latency` (zero: no delay).
    pub fn set_read_latency(&self, latency: Duration) {
        self.read_latency_us
            .store(latency.as_micros() as u64, Ordering::SeqCst);
    }

    /// No more faults (counters are kept).
    pub fn clear(&self) {
        *self.drop_after.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self
            .drop_after_received
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        self.set_read_latency(Duration::ZERO);
    }

    /// Current counters.
    pub fn stats(&self) -> FaultStats {
        FaultStats {
            connections: self.connections.load(Ordering::SeqCst),
            dropped: self.dropped.load(Ordering::SeqCst),
            reads: self.reads.load(Ordering::SeqCst),
            max_concurrent_reads: self.reads_max.load(Ordering::SeqCst),
            writes: self.writes.load(Ordering::SeqCst),
            bytes_written: self.bytes_written.load(Ordering::SeqCst),
        }
    }

    /// Take one connection's budget from a `(bytes, connections)` plan.
    fn take(plan: &Mutex<Option<(u64, usize)>>) -> Option<u64> {
        let mut g = plan.lock().unwrap_or_else(|p| p.into_inner());
        match g.as_mut() {
            Some((bytes, n)) if *n > 0 => {
                *n -= 1;
                let left = *bytes;
                if *n == 0 {
                    *g = None;
                }
                Some(left)
            }
            _ => None,
        }
    }

    fn wrap(self: &Arc<Self>, io: BoxedIo) -> BoxedIo {
        self.connections.fetch_add(1, Ordering::SeqCst);
        let send = Self::take(&self.drop_after);
        let recv = Self::take(&self.drop_after_received);
        if send.is_none() && recv.is_none() {
            return io;
        }
        Box::new(CutAfter {
            inner: io,
            left: send.unwrap_or(u64::MAX),
            left_in: recv.unwrap_or(u64::MAX),
            faults: self.clone(),
            counted: false,
        })
    }
}

/// A stream that fails once `left` bytes have been sent or `left_in` bytes
/// received.
struct CutAfter {
    inner: BoxedIo,
    left: u64,
    left_in: u64,
    faults: Arc<Faults>,
    counted: bool,
}

impl CutAfter {
    fn cut(&mut self) -> std::io::Error {
        if !self.counted {
            self.counted = true;
            self.faults.dropped.fetch_add(1, Ordering::SeqCst);
        }
        std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "mock ESXi fault: connection cut",
        )
    }
}

impl AsyncRead for CutAfter {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.left_in == 0 {
            let e = self.cut();
            return Poll::Ready(Err(e));
        }
        if buf.remaining() as u64 <= self.left_in {
            let before = buf.filled().len();
            let r = Pin::new(&mut self.inner).poll_read(cx, buf);
            if let Poll::Ready(Ok(())) = &r {
                self.left_in -= (buf.filled().len() - before) as u64;
            }
            return r;
        }
        // Close to the cut: read no more than what is left.
        let mut tmp = vec![0u8; self.left_in as usize];
        let mut small = ReadBuf::new(&mut tmp);
        let r = Pin::new(&mut self.inner).poll_read(cx, &mut small);
        if let Poll::Ready(Ok(())) = &r {
            let n = small.filled().len();
            buf.put_slice(&tmp[..n]);
            self.left_in -= n as u64;
        }
        r
    }
}

impl AsyncWrite for CutAfter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.left == 0 {
            let e = self.cut();
            return Poll::Ready(Err(e));
        }
        let n = (buf.len() as u64).min(self.left) as usize;
        match Pin::new(&mut self.inner).poll_write(cx, &buf[..n]) {
            Poll::Ready(Ok(k)) => {
                self.left -= k as u64;
                Poll::Ready(Ok(k))
            }
            other => other,
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A backend with the mock's read latency and counters.
struct Faulty {
    inner: Arc<dyn ExportBackend>,
    faults: Arc<Faults>,
}

impl ExportBackend for Faulty {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let f = &self.faults;
        let now = f.reads_now.fetch_add(1, Ordering::SeqCst) + 1;
        f.reads_max.fetch_max(now, Ordering::SeqCst);
        let us = f.read_latency_us.load(Ordering::SeqCst);
        if us > 0 {
            // Runs on a blocking thread: sleeping here delays only this request.
            std::thread::sleep(Duration::from_micros(us));
        }
        let r = self.inner.read_at(offset, buf);
        f.reads.fetch_add(1, Ordering::SeqCst);
        f.reads_now.fetch_sub(1, Ordering::SeqCst);
        r
    }
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u32)>> {
        self.inner.block_status(offset, len)
    }
    fn writable(&self) -> bool {
        self.inner.writable()
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let r = self.inner.write_at(offset, data);
        self.faults.writes.fetch_add(1, Ordering::SeqCst);
        self.faults
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::SeqCst);
        r
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let r = self.inner.write_zeroes(offset, len);
        self.faults.writes.fetch_add(1, Ordering::SeqCst);
        r
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct FaultyProvider {
    inner: Arc<dyn ExportProvider>,
    faults: Arc<Faults>,
}

impl ExportProvider for FaultyProvider {
    fn open(&self, name: &str) -> Result<Arc<dyn ExportBackend>, ExportRefused> {
        let inner = self.inner.open(name)?;
        Ok(Arc::new(Faulty {
            inner,
            faults: self.faults.clone(),
        }))
    }
    fn list(&self) -> Option<Vec<String>> {
        self.inner.list()
    }
}

/// A simple provider: export names mapped to raw image files (opened on each
/// connection; holes in sparse files are reported as such), read-only unless
/// inserted with [`FileExports::insert_writable`].
#[derive(Default)]
pub struct FileExports {
    map: RwLock<BTreeMap<String, (PathBuf, bool)>>,
}

impl FileExports {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }
    /// Export `path` read-only as `name` (replacing any previous one).
    pub fn insert(&self, name: &str, path: &Path) {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), (path.to_path_buf(), false));
    }
    /// Export `path` writable as `name` (replacing any previous one): clients may
    /// write, write zeroes and flush (`fsync`).
    pub fn insert_writable(&self, name: &str, path: &Path) {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), (path.to_path_buf(), true));
    }
    /// Stop exporting `name` (open connections keep their file).
    pub fn remove(&self, name: &str) {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}

/// A raw image file served writable: reads and block status through
/// [`FileSource`], writes with `pwrite`, flush with `fsync`.
struct WritableFile {
    read: SourceBackend<FileSource>,
    file: std::fs::File,
}

impl ExportBackend for WritableFile {
    fn size(&self) -> u64 {
        self.read.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.read.read_at(offset, buf)
    }
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u32)>> {
        self.read.block_status(offset, len)
    }
    fn writable(&self) -> bool {
        true
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, data, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.file.sync_all()
    }
}

impl ExportProvider for FileExports {
    fn open(&self, name: &str) -> Result<Arc<dyn ExportBackend>, ExportRefused> {
        let (path, writable) = self
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| ExportRefused(format!("no disk is exported as {name:?}")))?;
        let src = FileSource::open(&path).map_err(|e| ExportRefused(e.to_string()))?;
        if !writable {
            return Ok(Arc::new(SourceBackend(src)));
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| ExportRefused(format!("{}: {e}", path.display())))?;
        Ok(Arc::new(WritableFile {
            read: SourceBackend(src),
            file,
        }))
    }
    fn list(&self) -> Option<Vec<String>> {
        Some(
            self.map
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned()
                .collect(),
        )
    }
}

/// A running mock ESXi NBD service.
pub struct MockEsxi {
    thread: ServerThread,
    addr: SocketAddr,
    faults: Arc<Faults>,
}

impl MockEsxi {
    /// Start on 127.0.0.1 with a free port, TLS required.
    pub fn start(
        provider: Arc<dyn ExportProvider>,
        tls: &ServerTls,
    ) -> Result<MockEsxi, EsxiError> {
        Self::start_on("127.0.0.1:0", provider, tls)
    }

    /// Start on `bind` (`HOST:PORT`), TLS required.
    pub fn start_on(
        bind: &str,
        provider: Arc<dyn ExportProvider>,
        tls: &ServerTls,
    ) -> Result<MockEsxi, EsxiError> {
        let tls_cfg = ferry::nbd_server::tls::server_config_from_pem(
            tls.cert_pem.as_bytes(),
            tls.key_pem.as_bytes(),
            tls.client_ca_pem.as_deref().map(str::as_bytes),
        )?;
        let faults = Arc::new(Faults::default());
        let hook_faults = faults.clone();
        let config = ServerConfig {
            tls: Some(tls_cfg),
            stream_hook: Some(Arc::new(move |io| hook_faults.wrap(io))),
            ..ServerConfig::default()
        };
        let provider = Arc::new(FaultyProvider {
            inner: provider,
            faults: faults.clone(),
        });
        let server = NbdServer::new(provider, config);
        let thread = ServerThread::start(
            server,
            &ferry::nbd_server::Bind::Tcp(bind.to_string()),
            2,
            32,
        )?;
        let addr = match thread.local_addr() {
            ferry::nbd_server::LocalAddr::Tcp(a) => *a,
            ferry::nbd_server::LocalAddr::Unix(_) => unreachable!("bound to TCP"),
        };
        tracing::info!(%addr, "mock ESXi NBD service listening (TLS required)");
        Ok(MockEsxi {
            thread,
            addr,
            faults,
        })
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Listening port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `nbds://ADDR/EXPORT?tls-certificates=DIR`, the URI ferry, nbdinfo and
    /// nbdcopy use (DIR holds `ca-cert.pem`, and a client certificate if required).
    pub fn uri(&self, export: &str, certs_dir: &Path) -> String {
        ferry::nbd_server::LocalAddr::Tcp(self.addr).uri(export, Some(certs_dir))
    }

    /// Fault injection and counters.
    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    /// Stop: close every connection and the listener.
    pub fn stop(self) -> std::io::Result<()> {
        self.thread.stop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry::transport::nbd::NbdSource;
    use ferry::transport::DiskSource;

    #[test]
    fn serves_a_file_over_tls_and_refuses_clear_text_and_unknown_names() {
        let d = tempfile::tempdir().unwrap();
        let certs = d.path().join("certs");
        crate::fixtures::tls_certs(&certs).unwrap();
        let img = d.path().join("disk.img");
        crate::diskgen::generate(&img, &crate::diskgen::DiskSpec::mixed(4 << 20, 1)).unwrap();
        let exports = Arc::new(FileExports::new());
        exports.insert("snap-1", &img);
        let esx = MockEsxi::start(
            exports.clone(),
            &ServerTls::from_dir(&certs, false).unwrap(),
        )
        .unwrap();
        let src = NbdSource::connect(&esx.uri("snap-1", &certs), 2).unwrap();
        assert_eq!(src.transport(), "nbdssl");
        let mut all = vec![0u8; 4 << 20];
        src.read_at(0, &mut all).unwrap();
        assert_eq!(blake3::hash(&all), crate::diskgen::hash_file(&img).unwrap());
        drop(src);
        let e = NbdSource::connect(&format!("nbd://{}/snap-1", esx.addr()), 1)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("ERR_TLS_REQD"), "{e}");
        exports.remove("snap-1");
        let e = NbdSource::connect(&esx.uri("snap-1", &certs), 1)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("ERR_UNKNOWN") && e.contains("snap-1"), "{e}");
        assert!(esx.faults().stats().connections >= 3);
        esx.stop().unwrap();
    }
}
