//! The HTTPS face of the mock vCenter: axum over tokio-rustls. `POST /sdk` speaks
//! vim25 SOAP, `GET /sdk/vimServiceVersions.xml` tells clients the API version, and
//! `/admin/` is the token-protected test API; `/mockvddk/` serves the mock VDDK
//! (see [`super::vddk`]). Injected latency and dropped
//! connections are applied here (a dropped connection closes the TCP stream with no
//! response at all).
//!
//! Owns transport only: parsing is the codec's job, behaviour the handlers'.

use super::codec::{self, Fault};
use super::handlers::{self, Call};
use super::session;
use super::vim;
use super::world::{lock, World};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Largest SOAP or admin request body accepted.
pub const MAX_BODY: usize = 8 << 20;

/// What every request handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The world.
    pub world: Arc<World>,
    /// Admin bearer token.
    pub admin_token: Arc<String>,
    /// Runtime for tasks.
    pub rt: tokio::runtime::Handle,
}

/// Per-connection information, with a switch that kills the connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// Client address.
    pub peer: SocketAddr,
    kill: Arc<AtomicBool>,
}

impl ConnInfo {
    /// Make the connection fail: nothing more is written, the socket closes.
    pub fn kill(&self) {
        self.kill.store(true, Ordering::SeqCst);
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for ConnInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// A TLS stream that can be killed from a request handler.
pub struct KillableStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    kill: Arc<AtomicBool>,
}

fn killed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection dropped by fault injection",
    )
}

impl AsyncRead for KillableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.kill.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.kill.load(Ordering::SeqCst) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.kill.load(Ordering::SeqCst) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.kill.load(Ordering::SeqCst) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently.
pub struct TlsListener {
    rx: mpsc::Receiver<(KillableStream, ConnInfo)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Bind `addr` and start accepting with `config`.
    pub async fn bind(
        addr: SocketAddr,
        config: Arc<rustls::ServerConfig>,
    ) -> io::Result<TlsListener> {
        let tcp = TcpListener::bind(addr).await?;
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (sock, peer) = match tcp.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("mock vCenter accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let hs = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        acceptor.accept(sock),
                    )
                    .await;
                    match hs {
                        Ok(Ok(tls)) => {
                            let kill = Arc::new(AtomicBool::new(false));
                            let _ = tx
                                .send((
                                    KillableStream {
                                        inner: tls,
                                        kill: kill.clone(),
                                    },
                                    ConnInfo { peer, kill },
                                ))
                                .await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = KillableStream;
    type Addr = ConnInfo;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(x) => x,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(ConnInfo {
            peer: self.local,
            kill: Arc::new(AtomicBool::new(false)),
        })
    }
}

/// The rustls server configuration for a certificate chain and key (PEM).
pub fn tls_config(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("server certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("server key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The whole router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/sdk", post(soap))
        .route("/sdk/vimServiceVersions.xml", get(versions))
        .nest("/admin", super::admin::router(state.clone()))
        .nest("/mockvddk", super::vddk::router())
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn versions() -> Response {
    (
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        vim::service_versions_xml(),
    )
        .into_response()
}

fn xml(status: StatusCode, body: String, cookie: Option<String>) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/xml; charset=utf-8"),
    );
    if let Some(key) = cookie {
        if let Ok(v) = header::HeaderValue::from_str(&session::set_cookie(&key)) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    r
}

fn fault_response(f: &Fault) -> Response {
    xml(StatusCode::INTERNAL_SERVER_ERROR, codec::fault(f), None)
}

async fn soap(
    State(st): State<AppState>,
    ConnectInfo(conn): ConnectInfo<ConnInfo>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = match codec::parse_request(&body) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!("malformed SOAP request: {e}");
            return fault_response(&vim::invalid_request(format!(
                "malformed SOAP request: {e}"
            )));
        }
    };
    let (latency, drop) = {
        let mut f = lock(&st.world.faults);
        (f.latency_for(&req.method), f.take_drop(&req.method))
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if drop == Some(false) {
        tracing::info!(method = %req.method, "dropping the connection before processing (fault injection)");
        conn.kill();
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(session::cookie_key);
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let peer = conn.peer.ip().to_string();
    let world = st.world.clone();
    let rt = st.rt.clone();
    let method = req.method.clone();
    let out = tokio::task::spawn_blocking(move || {
        let call = Call {
            world: &world,
            rt: &rt,
            req: &req,
            cookie,
            peer,
            user_agent,
        };
        handlers::dispatch(&call).map(|r| (codec::response(&req.method, &r.ret), r.set_cookie))
    })
    .await;
    let resp = match out {
        Ok(Ok((body, cookie))) => xml(StatusCode::OK, body, cookie),
        Ok(Err(f)) => {
            tracing::debug!(%method, fault = f.obj.ty, "{}", f.message);
            fault_response(&f)
        }
        Err(e) => fault_response(&vim::system_error(format!("internal error: {e}"))),
    };
    if drop == Some(true) {
        tracing::info!(%method, "dropping the connection after processing (fault injection)");
        conn.kill();
    }
    resp
}
