//! The HTTP client under the S3 backend: hyper's HTTP/1.1 client with a pool of
//! kept-alive connections, TLS from ferry's rustls configuration, one deadline per
//! request (answer and body), and TCP connections that acknowledge what they
//! receive at once (`TCP_QUICKACK` after every read, on Linux).
//!
//! Why the last: a server that leaves Nagle's algorithm on (s3s-fs does) holds
//! the last small segment of each response until the previous one is
//! acknowledged, and a kept-alive client connection that sends its next request
//! right after a response is in Linux's "ping-pong" mode, where it delays that
//! acknowledgement up to 40 ms. Every GET of a 1 MiB chunk then waited ~40 ms
//! for its tail (docs/performance.md, "Object storage"); acknowledging at once
//! costs one `setsockopt` per read.
//!
//! Owns connections, TLS, timeouts and the mapping of transport failures to
//! object_store's error kinds. Must not sign, retry (object_store and `s3.rs`
//! do) or look into what it carries.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use object_store::client::{HttpError, HttpErrorKind, HttpResponse, HttpResponseBody};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// The pooled client: plain TCP or TLS, each connection quick-acking.
pub(super) type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<QuickAckConnector>,
    Full<Bytes>,
>;

/// A client with `tls` for `https://` endpoints (plain `http://` too).
pub(super) fn client(tls: Arc<rustls::ClientConfig>, connect_timeout: Duration) -> Client {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnector::from((QuickAckConnector(tcp), tls));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https)
}

/// Send `req`; the answer and its whole body must arrive within `timeout`.
/// `create_only` (a PUT with `If-None-Match: *`): a timed-out attempt may be
/// sent again (see `s3.rs`), so its timeout is reported as a failed request.
pub(super) async fn send(
    client: &Client,
    req: http::Request<Full<Bytes>>,
    timeout: Duration,
    create_only: bool,
) -> Result<HttpResponse, HttpError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let resp = match tokio::time::timeout_at(deadline, client.request(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let kind = if e.is_connect() {
                HttpErrorKind::Connect
            } else {
                // Resets, connections closed before the answer: retried.
                HttpErrorKind::Request
            };
            return Err(HttpError::new(kind, e));
        }
        Err(_) => {
            let kind = if create_only {
                HttpErrorKind::Request
            } else {
                HttpErrorKind::Timeout
            };
            return Err(HttpError::new(kind, TimedOut(timeout)));
        }
    };
    let (parts, body) = resp.into_parts();
    let body = Deadline {
        body,
        sleep: Box::pin(tokio::time::sleep_until(deadline)),
        timeout,
    };
    Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
}

/// No complete answer within the request timeout.
#[derive(Debug, thiserror::Error)]
#[error("operation timed out: no complete answer within {} s (FERRY_S3_TIMEOUT_SECS)", .0.as_secs())]
struct TimedOut(Duration);

/// A response body that fails once the request's deadline passes.
struct Deadline {
    body: hyper::body::Incoming,
    sleep: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, HttpError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(r) => Poll::Ready(r.map(|r| {
                // A body cut short (a reset): object_store resumes downloads.
                r.map_err(|e| HttpError::new(HttpErrorKind::Request, e))
            })),
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(HttpError::new(
                    HttpErrorKind::Timeout,
                    TimedOut(this.timeout),
                )))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// hyper's TCP connector, its connections wrapped in [`QuickAck`].
#[derive(Clone)]
pub(super) struct QuickAckConnector(HttpConnector);

impl tower_service::Service<http::Uri> for QuickAckConnector {
    type Response = QuickAck;
    type Error = <HttpConnector as tower_service::Service<http::Uri>>::Error;
    type Future = Pin<Box<dyn Future<Output = Result<QuickAck, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move { Ok(QuickAck(connecting.await?)) })
    }
}

/// A TCP connection that acknowledges received data at once: after every read
/// that returned, `TCP_QUICKACK` (Linux; it leaves delayed-ACK "ping-pong" mode
/// and sends any pending acknowledgement). Elsewhere a plain connection.
pub(super) struct QuickAck(TokioIo<tokio::net::TcpStream>);

impl QuickAck {
    fn ack_now(&self) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let one: libc::c_int = 1;
            // SAFETY: the descriptor belongs to the stream borrowed through
            // `self`, open for the whole call; the option value is a c_int
            // that outlives the call, passed with its size. A failure (a
            // closed peer) changes nothing and is ignored.
            unsafe {
                libc::setsockopt(
                    self.0.inner().as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_QUICKACK,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
}

impl Connection for QuickAck {
    fn connected(&self) -> Connected {
        self.0.connected()
    }
}

impl hyper::rt::Read for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.0).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            self.ack_now();
        }
        r
    }
}

impl hyper::rt::Write for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}
