//! NBD client [`DiskSource`]: reads an export over the NBD protocol (TCP or a Unix
//! socket), with `base:allocation` block status for sparse detection and a pool of
//! connections so that several reads are in flight at once. A dropped connection
//! is re-established and the read retried (bounded).
//!
//! TLS (NBD-SSL, `nbds://`) plugs in under [`client::NbdConn`] through STARTTLS.

pub mod client;
pub mod proto;

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

/// A parsed NBD URI: `nbd://host[:port]/export` or `nbd+unix:///export?socket=PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    /// Endpoint.
    pub endpoint: Endpoint,
    /// Export name ("" = default export).
    pub export: String,
}

impl NbdUri {
    /// Parse a URI.
    pub fn parse(uri: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("bad NBD URI {uri:?}: {why} (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)")
        };
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path, query) = rest
                .split_once('?')
                .ok_or_else(|| bad("missing ?socket="))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| bad("missing socket="))?;
            let export = path.strip_prefix('/').unwrap_or(path).to_string();
            return Ok(NbdUri {
                endpoint: Endpoint::Unix(socket.to_string()),
                export,
            });
        }
        if let Some(rest) = uri.strip_prefix("nbd://") {
            let (host, export) = rest.split_once('/').unwrap_or((rest, ""));
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            let host = if host
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            {
                host.to_string()
            } else {
                format!("{host}:10809")
            };
            return Ok(NbdUri {
                endpoint: Endpoint::Tcp(host),
                export: export.to_string(),
            });
        }
        if uri.starts_with("nbds://") || uri.starts_with("nbds+unix://") {
            return Err(bad("TLS (nbds) is not supported by this build yet"));
        }
        Err(bad("unknown scheme"))
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
}
impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

const IO_TIMEOUT: Duration = Duration::from_secs(60);
const READ_ATTEMPTS: usize = 3;
const STATUS_WINDOW: u64 = 1 << 30;

fn connect(uri: &NbdUri) -> Result<NbdConn<Stream>, ConnError> {
    let s = match &uri.endpoint {
        Endpoint::Tcp(hp) => {
            let s = TcpStream::connect(hp)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            Stream::Tcp(s)
        }
        Endpoint::Unix(p) => {
            let s = UnixStream::connect(p)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            Stream::Unix(s)
        }
    };
    NbdConn::handshake(s, &uri.export)
}

/// An NBD export as a disk source.
pub struct NbdSource {
    uri: NbdUri,
    label: String,
    size: u64,
    has_status: bool,
    pool: Mutex<Vec<NbdConn<Stream>>>,
    ready: Condvar,
}

impl NbdSource {
    /// Connect `connections` times (at least 1; fewer if the server does not allow
    /// several connections per export).
    pub fn connect(uri: &str, connections: usize) -> Result<Self, SourceError> {
        let open_err = |e: &dyn std::fmt::Display| SourceError::Open {
            path: uri.to_string(),
            err: io::Error::other(e.to_string()),
        };
        let parsed = NbdUri::parse(uri).map_err(|e| open_err(&e))?;
        let first = connect(&parsed).map_err(|e| open_err(&e))?;
        let (size, has_status) = (first.size, first.allocation_ctx.is_some());
        let multi = first.flags & proto::TFLAG_CAN_MULTI_CONN != 0
            || first.flags & proto::TFLAG_READ_ONLY != 0;
        let mut pool = vec![first];
        if multi {
            for _ in 1..connections.max(1) {
                pool.push(connect(&parsed).map_err(|e| open_err(&e))?);
            }
        }
        tracing::info!(
            uri,
            size,
            connections = pool.len(),
            block_status = has_status,
            "NBD export opened"
        );
        Ok(NbdSource {
            uri: parsed,
            label: uri.to_string(),
            size,
            has_status,
            pool: Mutex::new(pool),
            ready: Condvar::new(),
        })
    }

    fn with_conn<T>(
        &self,
        offset: u64,
        op: &'static str,
        f: impl Fn(&mut NbdConn<Stream>) -> Result<T, ConnError>,
    ) -> Result<T, SourceError> {
        let mut last = None;
        for attempt in 0..READ_ATTEMPTS {
            let mut conn = {
                let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(c) = pool.pop() {
                        break Some(c);
                    }
                    if attempt > 0 {
                        break None; // a broken connection was dropped: make a new one
                    }
                    pool = self.ready.wait(pool).unwrap_or_else(|p| p.into_inner());
                }
            };
            if conn.is_none() {
                match connect(&self.uri) {
                    Ok(c) => conn = Some(c),
                    Err(e) => {
                        last = Some(e);
                        std::thread::sleep(Duration::from_millis(200 << attempt));
                        continue;
                    }
                }
            }
            let mut c = conn.expect("connection present");
            match f(&mut c) {
                Ok(v) => {
                    self.pool.lock().unwrap_or_else(|p| p.into_inner()).push(c);
                    self.ready.notify_one();
                    return Ok(v);
                }
                Err(ConnError::Proto(e @ proto::ProtoError::Command { .. })) => {
                    // The server answered: the connection is fine, the request failed.
                    self.pool.lock().unwrap_or_else(|p| p.into_inner()).push(c);
                    self.ready.notify_one();
                    return Err(SourceError::Io {
                        source_name: self.label.clone(),
                        op,
                        offset,
                        err: io::Error::other(e.to_string()),
                    });
                }
                Err(e) => {
                    tracing::warn!(uri = %self.label, offset, attempt, error = %e, "NBD connection failed; reconnecting");
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
    fn transport(&self) -> &'static str {
        "nbd"
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
            .iter_mut()
        {
            c.disconnect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_parsing() {
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1:10810/disk").unwrap(),
            NbdUri {
                endpoint: Endpoint::Tcp("127.0.0.1:10810".into()),
                export: "disk".into()
            }
        );
        assert_eq!(
            NbdUri::parse("nbd://host").unwrap().endpoint,
            Endpoint::Tcp("host:10809".into())
        );
        assert_eq!(
            NbdUri::parse("nbd+unix:///?socket=/tmp/s").unwrap(),
            NbdUri {
                endpoint: Endpoint::Unix("/tmp/s".into()),
                export: String::new()
            }
        );
        assert!(NbdUri::parse("http://x").is_err());
        assert!(NbdUri::parse("nbd+unix:///x").is_err());
        assert!(NbdUri::parse("nbds://h/x").unwrap_err().contains("TLS"));
    }
}
