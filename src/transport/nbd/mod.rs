//! NBD client [`DiskSource`]: reads an export over the NBD protocol (TCP or a Unix
//! socket), with `base:allocation` block status for sparse detection and a pool of
//! connections, each with several read requests in flight. A dropped connection
//! is re-established and the read retried (bounded). [`NbdTarget`] writes a
//! writable export the same way (restores through a vSphere write ticket).
//!
//! NBD-SSL (`nbds://`): STARTTLS, then rustls with the server certificate verified
//! against a pinned CA (`tls-certificates=DIR` holding `ca-cert.pem`, and optionally
//! `client-cert.pem` + `client-key.pem` for a client certificate: the libnbd layout).
//! rustls runs the handshake; `tls_records` then protects the records, opening
//! received ones in place.

pub mod client;
pub mod proto;
pub mod target;
mod tls_records;

pub use target::NbdTarget;

use super::{DiskSource, Extent, SourceError};
use client::{ConnError, NbdConn};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Where an export lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// host:port.
    Tcp(String),
    /// Unix socket path.
    Unix(String),
}

/// TLS settings of an `nbds` URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsOptions {
    /// Directory with `ca-cert.pem` (required) and optionally `client-cert.pem` and
    /// `client-key.pem`.
    pub certs_dir: std::path::PathBuf,
    /// Name the server certificate must carry.
    pub server_name: String,
}

/// A parsed NBD URI: `nbd[s]://host[:port]/export[?tls-certificates=DIR]` or
/// `nbd[s]+unix:///export?socket=PATH[&tls-certificates=DIR&tls-hostname=NAME]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    /// Endpoint.
    pub endpoint: Endpoint,
    /// Export name ("" = default export).
    pub export: String,
    /// TLS (NBD-SSL), when the scheme is `nbds`.
    pub tls: Option<TlsOptions>,
}

impl NbdUri {
    /// Parse a URI.
    pub fn parse(uri: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("bad NBD URI {uri:?}: {why} (nbd[s]://HOST[:PORT]/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH; TLS needs tls-certificates=DIR)")
        };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let (tls, unix) = match scheme {
            "nbd" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            _ => return Err(bad("unknown scheme")),
        };
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let param = |k: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
        };
        let (endpoint, export, host) = if unix {
            let socket = param("socket").ok_or_else(|| bad("missing socket="))?;
            let export = path.strip_prefix('/').unwrap_or(path).to_string();
            (
                Endpoint::Unix(socket.to_string()),
                export,
                "localhost".to_string(),
            )
        } else {
            let (host, export) = path.split_once('/').unwrap_or((path, ""));
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            let hp = if host
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            {
                host.to_string()
            } else {
                format!("{host}:10809")
            };
            let name = hp
                .rsplit_once(':')
                .map(|(h, _)| h)
                .unwrap_or(&hp)
                .trim_matches(['[', ']'])
                .to_string();
            (Endpoint::Tcp(hp), export.to_string(), name)
        };
        let tls = if tls {
            let dir = param("tls-certificates").ok_or_else(|| bad("nbds needs tls-certificates=DIR with ca-cert.pem: ferry always verifies the server"))?;
            Some(TlsOptions {
                certs_dir: dir.into(),
                server_name: param("tls-hostname").map(str::to_string).unwrap_or(host),
            })
        } else {
            None
        };
        Ok(NbdUri {
            endpoint,
            export,
            tls,
        })
    }
}

fn tls_config(t: &TlsOptions) -> Result<std::sync::Arc<rustls::ClientConfig>, ConnError> {
    let (cc, ck) = (
        t.certs_dir.join("client-cert.pem"),
        t.certs_dir.join("client-key.pem"),
    );
    let client = (cc.exists() && ck.exists()).then_some((cc.as_path(), ck.as_path()));
    crate::tls::client_config(&t.certs_dir.join("ca-cert.pem"), client)
        .map_err(|e| ConnError::Io(io::Error::other(e)))
}

enum Plain {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Plain {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Plain::Tcp(s) => s.read(b),
            Plain::Unix(s) => s.read(b),
        }
    }
}
impl Write for Plain {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Plain::Tcp(s) => s.write(b),
            Plain::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Plain::Tcp(s) => s.flush(),
            Plain::Unix(s) => s.flush(),
        }
    }
}

enum Stream {
    Plain(Plain),
    Tls(Box<tls_records::TlsRecords<Plain>>),
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(b),
            Stream::Tls(s) => s.read(b),
        }
    }
}
impl Stream {
    /// End the connection cleanly: TLS close_notify (best effort), so the
    /// server logs a goodbye rather than a truncated stream.
    fn close(self) {
        if let Stream::Tls(mut t) = self {
            let _ = t.close_notify();
        }
    }
}
impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(b),
            Stream::Tls(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

const IO_TIMEOUT: Duration = Duration::from_secs(60);
const READ_ATTEMPTS: usize = 3;
const STATUS_WINDOW: u64 = 1 << 30;

fn connect(uri: &NbdUri) -> Result<NbdConn<Stream>, ConnError> {
    let mut s = match &uri.endpoint {
        Endpoint::Tcp(hp) => {
            let s = TcpStream::connect(hp)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            Plain::Tcp(s)
        }
        Endpoint::Unix(p) => {
            let s = UnixStream::connect(p)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            Plain::Unix(s)
        }
    };
    client::greet(&mut s)?;
    let stream = match &uri.tls {
        None => Stream::Plain(s),
        Some(t) => {
            client::start_tls(&mut s)?;
            let name =
                rustls_pki_types::ServerName::try_from(t.server_name.clone()).map_err(|e| {
                    ConnError::Io(io::Error::other(format!(
                        "TLS server name {:?}: {e}",
                        t.server_name
                    )))
                })?;
            // Nothing is buffered yet: the server sends nothing after the STARTTLS
            // reply until our ClientHello. The handshake completes here, so
            // certificate errors surface at connect.
            let tls = tls_records::TlsRecords::connect(s, &*tls_config(t)?, name)?;
            tracing::debug!(tls = %tls.describe(), "NBD-SSL connection established");
            Stream::Tls(Box::new(tls))
        }
    };
    NbdConn::negotiate(stream, &uri.export)
}

/// An NBD export as a disk source.
pub struct NbdSource {
    uri: NbdUri,
    label: String,
    size: u64,
    has_status: bool,
    /// Transmission flags of the first connection.
    flags: u16,
    /// Idle connections, and how many exist in all (idle + in use).
    pool: Mutex<Pool>,
    ready: Condvar,
}

struct Pool {
    idle: Vec<NbdConn<Stream>>,
    live: usize,
    max: usize,
}

impl NbdSource {
    /// Connect `connections` times (at least 1; fewer if the server does not allow
    /// several connections per export).
    pub fn connect(uri: &str, connections: usize) -> Result<Self, SourceError> {
        Self::connect_labeled(uri, uri, connections)
    }

    /// [`NbdSource::connect`], naming the export `label` in logs and errors
    /// instead of `uri` (whose export name may be a credential: a vSphere ticket).
    pub fn connect_labeled(
        uri: &str,
        label: &str,
        connections: usize,
    ) -> Result<Self, SourceError> {
        let open_err = |e: &dyn std::fmt::Display| SourceError::Open {
            path: label.to_string(),
            err: io::Error::other(e.to_string()),
        };
        let parsed = NbdUri::parse(uri).map_err(|e| open_err(&e))?;
        let first = connect(&parsed).map_err(|e| open_err(&e))?;
        let (size, has_status, flags) = (first.size, first.allocation_ctx.is_some(), first.flags);
        let multi = first.flags & proto::TFLAG_CAN_MULTI_CONN != 0
            || first.flags & proto::TFLAG_READ_ONLY != 0;
        let mut pool = vec![first];
        if multi {
            for _ in 1..connections.max(1) {
                pool.push(connect(&parsed).map_err(|e| open_err(&e))?);
            }
        }
        tracing::info!(
            uri = label,
            size,
            connections = pool.len(),
            block_status = has_status,
            read_only = flags & proto::TFLAG_READ_ONLY != 0,
            "NBD export opened"
        );
        Ok(NbdSource {
            uri: parsed,
            label: label.to_string(),
            size,
            has_status,
            flags,
            pool: Mutex::new(Pool {
                live: pool.len(),
                max: pool.len(),
                idle: pool,
            }),
            ready: Condvar::new(),
        })
    }

    /// Take an idle connection, or the right to open a new one (`None`) when fewer
    /// than the maximum exist; otherwise wait for one to be returned or dropped.
    fn checkout(&self) -> Option<NbdConn<Stream>> {
        let mut p = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(c) = p.idle.pop() {
                return Some(c);
            }
            if p.live < p.max {
                p.live += 1;
                return None;
            }
            p = self.ready.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn checkin(&self, c: NbdConn<Stream>) {
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .idle
            .push(c);
        self.ready.notify_one();
    }

    /// A connection (checked out, or the right to open one) is gone.
    fn forget(&self) {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).live -= 1;
        self.ready.notify_one();
    }

    fn with_conn<T>(
        &self,
        offset: u64,
        op: &'static str,
        f: impl Fn(&mut NbdConn<Stream>) -> Result<T, ConnError>,
    ) -> Result<T, SourceError> {
        let mut last = None;
        for attempt in 0..READ_ATTEMPTS {
            let mut c = match self.checkout() {
                Some(c) => c,
                None => match connect(&self.uri) {
                    Ok(c) => c,
                    Err(e) => {
                        self.forget();
                        last = Some(e);
                        std::thread::sleep(Duration::from_millis(200 << attempt));
                        continue;
                    }
                },
            };
            match f(&mut c) {
                Ok(v) => {
                    self.checkin(c);
                    return Ok(v);
                }
                Err(ConnError::Proto(e @ proto::ProtoError::Command { .. })) => {
                    // The server answered: the connection is fine, the request failed.
                    self.checkin(c);
                    return Err(SourceError::Io {
                        source_name: self.label.clone(),
                        op,
                        offset,
                        err: io::Error::other(e.to_string()),
                    });
                }
                Err(e) => {
                    tracing::info!(uri = %self.label, offset, attempt, error = %e, "NBD connection failed; reconnecting");
                    drop(c);
                    self.forget();
                    last = Some(e);
                }
            }
        }
        Err(SourceError::Io {
            source_name: self.label.clone(),
            op,
            offset,
            err: io::Error::other(format!(
                "gave up after {READ_ATTEMPTS} attempts: {}",
                last.map(|e| e.to_string()).unwrap_or_default()
            )),
        })
    }
}

impl DiskSource for NbdSource {
    fn label(&self) -> String {
        self.label.clone()
    }
    fn read_parallelism(&self) -> usize {
        self.pool.lock().map(|p| p.max).unwrap_or(1).max(1)
    }
    fn transport(&self) -> &'static str {
        if self.uri.tls.is_some() {
            "nbdssl"
        } else {
            "nbd"
        }
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn next_allocated(&self, from: u64) -> Result<Option<Extent>, SourceError> {
        if from >= self.size {
            return Ok(None);
        }
        if !self.has_status {
            return Ok(Some(Extent {
                offset: from,
                len: self.size - from,
            }));
        }
        let mut at = from;
        let mut found: Option<Extent> = None;
        while at < self.size {
            let len = (self.size - at).min(STATUS_WINDOW) as u32;
            let ext = self
                .with_conn(at, "block status", |c| c.block_status(at, len))?
                .unwrap_or_else(|| vec![(at, len as u64, 0)]);
            if ext.is_empty() {
                return Err(SourceError::Io {
                    source_name: self.label.clone(),
                    op: "block status",
                    offset: at,
                    err: io::Error::other("server returned no extents"),
                });
            }
            for (o, l, flags) in ext {
                let end = (o + l).min(self.size);
                let data = flags & proto::STATE_ZERO == 0;
                match (&mut found, data) {
                    (None, true) => {
                        found = Some(Extent {
                            offset: o.max(from),
                            len: end - o.max(from),
                        })
                    }
                    (Some(e), true) if e.end() == o => e.len = end - e.offset,
                    (Some(e), _) => return Ok(Some(*e)),
                    (None, false) => {}
                }
                at = end;
            }
            if found.is_some() {
                // Data reaches the end of this window; the caller asks again from its end.
                return Ok(found);
            }
        }
        Ok(found)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.size)
        {
            return Err(SourceError::OutOfRange {
                source_name: self.label.clone(),
                offset,
                len: buf.len(),
                size: self.size,
            });
        }
        // Each attempt reads into the same buffer; partial data of a failed attempt is overwritten.
        let cell = std::cell::RefCell::new(buf);
        self.with_conn(offset, "read", |c| c.read(offset, &mut cell.borrow_mut()))
    }
}

impl Drop for NbdSource {
    fn drop(&mut self) {
        for c in self
            .pool
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .idle
            .drain(..)
        {
            c.disconnect().close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_parsing() {
        let tcp = NbdUri::parse("nbd://127.0.0.1:10810/disk").unwrap();
        assert_eq!(
            tcp,
            NbdUri {
                endpoint: Endpoint::Tcp("127.0.0.1:10810".into()),
                export: "disk".into(),
                tls: None
            }
        );
        assert_eq!(
            NbdUri::parse("nbd://host").unwrap().endpoint,
            Endpoint::Tcp("host:10809".into())
        );
        let unix = NbdUri::parse("nbd+unix:///?socket=/tmp/s").unwrap();
        assert_eq!(
            unix,
            NbdUri {
                endpoint: Endpoint::Unix("/tmp/s".into()),
                export: String::new(),
                tls: None
            }
        );
        let t = NbdUri::parse("nbds://127.0.0.1:10810/d?tls-certificates=/c")
            .unwrap()
            .tls
            .unwrap();
        assert_eq!(
            (t.certs_dir.to_str().unwrap(), t.server_name.as_str()),
            ("/c", "127.0.0.1")
        );
        let t = NbdUri::parse("nbds+unix:///?socket=/s&tls-certificates=/c&tls-hostname=esx1")
            .unwrap()
            .tls
            .unwrap();
        assert_eq!(t.server_name, "esx1");
        assert!(NbdUri::parse("http://x").is_err());
        assert!(NbdUri::parse("nbd+unix:///x").is_err());
        assert!(NbdUri::parse("nbds://h/x")
            .unwrap_err()
            .contains("tls-certificates"));
    }
}
