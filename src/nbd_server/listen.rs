//! Listening: TCP or Unix socket, the accept loop (connection limit, one task per
//! connection, shutdown), and [`ServerThread`], a server running on its own thread
//! and tokio runtime so that synchronous callers (the CLI, tests, the mocks) can
//! start it, learn its address and stop it.

use super::{BoxedIo, NbdServer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// Where to listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bind {
    /// `HOST:PORT` (port 0 picks a free port).
    Tcp(String),
    /// A Unix socket path (must not exist, or be a stale socket).
    Unix(PathBuf),
}

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalAddr {
    /// TCP address.
    Tcp(SocketAddr),
    /// Unix socket path.
    Unix(PathBuf),
}

impl LocalAddr {
    /// The NBD URI of `export` here: `nbd[s]://HOST:PORT/EXPORT` or
    /// `nbd[s]+unix:///EXPORT?socket=PATH`, with `tls-certificates=DIR` for TLS.
    pub fn uri(&self, export: &str, tls_certificates: Option<&Path>) -> String {
        let export = percent_encode(export);
        let tls = tls_certificates.map(|d| format!("tls-certificates={}", d.display()));
        match self {
            LocalAddr::Tcp(a) => {
                let scheme = if tls.is_some() { "nbds" } else { "nbd" };
                let q = tls.map(|t| format!("?{t}")).unwrap_or_default();
                format!("{scheme}://{a}/{export}{q}")
            }
            LocalAddr::Unix(p) => {
                let scheme = if tls.is_some() {
                    "nbds+unix"
                } else {
                    "nbd+unix"
                };
                let q = tls.map(|t| format!("&{t}")).unwrap_or_default();
                format!("{scheme}:///{export}?socket={}{q}", p.display())
            }
        }
    }
}

/// Export names in URI paths: keep what a path may hold (unreserved characters,
/// sub-delimiters except `&`, `:`, `@`, `/`), escape the rest.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$'()*+,;=:@/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

fn bind(b: &Bind) -> std::io::Result<(StdListener, LocalAddr)> {
    match b {
        Bind::Tcp(addr) => {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            let a = l.local_addr()?;
            Ok((StdListener::Tcp(l), LocalAddr::Tcp(a)))
        }
        Bind::Unix(p) => {
            if let Ok(md) = std::fs::symlink_metadata(p) {
                let is_socket = std::os::unix::fs::FileTypeExt::is_socket(&md.file_type());
                if is_socket && std::os::unix::net::UnixStream::connect(p).is_err() {
                    // A socket nobody listens on: left by a server that died.
                    std::fs::remove_file(p)?;
                } else {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        format!(
                            "{} exists{}",
                            p.display(),
                            if is_socket {
                                " and a server is listening on it"
                            } else {
                                " and is not a socket"
                            }
                        ),
                    ));
                }
            }
            let l = std::os::unix::net::UnixListener::bind(p)?;
            l.set_nonblocking(true)?;
            Ok((StdListener::Unix(l, p.clone()), LocalAddr::Unix(p.clone())))
        }
    }
}

struct ConnGuard(Arc<AtomicUsize>);
impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl NbdServer {
    async fn accept_loop(
        self: Arc<Self>,
        listener: StdListener,
        mut shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        enum L {
            Tcp(tokio::net::TcpListener),
            Unix(tokio::net::UnixListener),
        }
        let l = match listener {
            StdListener::Tcp(l) => L::Tcp(tokio::net::TcpListener::from_std(l)?),
            StdListener::Unix(l, _) => L::Unix(tokio::net::UnixListener::from_std(l)?),
        };
        let active = Arc::new(AtomicUsize::new(0));
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let accepted: std::io::Result<(BoxedIo, String)> = tokio::select! {
                _ = shutdown.changed() => break,
                r = async {
                    match &l {
                        L::Tcp(l) => l.accept().await.and_then(|(s, a)| {
                            s.set_nodelay(true)?;
                            Ok((Box::new(s) as BoxedIo, a.to_string()))
                        }),
                        L::Unix(l) => l.accept().await.map(|(s, _)| (Box::new(s) as BoxedIo, "unix".to_string())),
                    }
                } => r,
            };
            while conns.try_join_next().is_some() {}
            let (io, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            if active.fetch_add(1, Ordering::SeqCst) >= self.config.max_connections {
                active.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(%peer, max = self.config.max_connections, "NBD connection refused: too many connections");
                continue;
            }
            let guard = ConnGuard(active.clone());
            let (server, rx) = (self.clone(), shutdown.clone());
            conns.spawn(async move {
                let _g = guard;
                match server.serve_connection(io, rx).await {
                    Ok(()) => tracing::debug!(%peer, "NBD connection closed"),
                    Err(e) => tracing::info!(%peer, error = %e, "NBD connection ended"),
                }
            });
        }
        // Give connections a moment to see the shutdown, then drop them.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        conns.abort_all();
        Ok(())
    }
}

/// A server running on its own thread and runtime. Dropping it stops the server.
pub struct ServerThread {
    addr: LocalAddr,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl ServerThread {
    /// Bind `bind` now (errors and the chosen port are known on return), then serve
    /// on a new thread with a runtime of `threads` async workers; blocking backend
    /// calls run on up to `blocking_threads` more.
    pub fn start(
        server: Arc<NbdServer>,
        bind_to: &Bind,
        threads: usize,
        blocking_threads: usize,
    ) -> std::io::Result<ServerThread> {
        let (listener, addr) = bind(bind_to)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .max_blocking_threads(blocking_threads.max(1))
            .thread_name("ferry-nbd")
            .enable_all()
            .build()?;
        let (stop, rx) = watch::channel(false);
        let unix_path = match &listener {
            StdListener::Unix(_, p) => Some(p.clone()),
            StdListener::Tcp(_) => None,
        };
        let thread = std::thread::Builder::new()
            .name("ferry-nbd-server".into())
            .spawn(move || {
                let r = rt.block_on(server.accept_loop(listener, rx));
                rt.shutdown_timeout(std::time::Duration::from_secs(1));
                if let Some(p) = unix_path {
                    let _ = std::fs::remove_file(p);
                }
                r
            })?;
        Ok(ServerThread {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> &LocalAddr {
        &self.addr
    }

    /// Stop accepting, close every connection, and wait for the thread.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> std::io::Result<()> {
        let _ = self.stop.send(true);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| std::io::Error::other("NBD server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let t = LocalAddr::Tcp("127.0.0.1:10809".parse().unwrap());
        assert_eq!(t.uri("a b", None), "nbd://127.0.0.1:10809/a%20b");
        assert_eq!(
            t.uri("d", Some(Path::new("/c"))),
            "nbds://127.0.0.1:10809/d?tls-certificates=/c"
        );
        let u = LocalAddr::Unix("/s".into());
        assert_eq!(u.uri("", None), "nbd+unix:///?socket=/s");
        assert_eq!(
            u.uri("x", Some(Path::new("/c"))),
            "nbds+unix:///x?socket=/s&tls-certificates=/c"
        );
    }
}
