//! The mock KMS's network face: TCP + TLS (tokio-rustls) with client certificates
//! required (verified against a CA), TLS 1.2 and 1.3, session resumption (a session
//! cache and stateless tickets, so a client reconnecting resumes without a full
//! handshake; resumed handshakes are counted), and KMIP message framing (8-byte
//! TTLV header, bounded length) around [`super::ops::handle`].
//!
//! Owns transport and the down/slow faults; what an answer says is the
//! operations' business. A connection that sends garbage gets an "Invalid Message"
//! answer (or is closed when its framing cannot be trusted); nothing panics.

use super::ops::{self, Backend};
use ferry::kmip::ttlv;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request accepted (KMIP requests ferry and PyKMIP send are below 4 KiB).
pub const MAX_REQUEST: usize = 256 << 10;
/// Time allowed for a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// A connection idle this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Build the server TLS configuration: `cert_pem`/`key_pem` as the server
/// certificate, client certificates required and verified against
/// `client_ca_pem`, TLS 1.2 and 1.3, resumption by session cache and tickets.
pub fn tls_config(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("server certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("server key: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(client_ca_pem.as_bytes()) {
        roots
            .add(c.map_err(|e| format!("client CA: {e}"))?)
            .map_err(|e| format!("client CA: {e}"))?;
    }
    if roots.is_empty() {
        return Err("client CA: no certificate".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("client verifier: {e}"))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("server certificate: {e}"))?;
    // Resumption (seed 003: clients reuse KMIP connections through TLS session
    // resumption): a session cache for TLS 1.2 session ids, tickets for both.
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(1024);
    cfg.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| format!("ticketer: {e}"))?;
    Ok(Arc::new(cfg))
}

/// Accept connections until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    backend: Arc<Backend>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let acceptor = acceptor.clone();
                    let backend = backend.clone();
                    tokio::spawn(async move {
                        connection(tcp, peer, acceptor, backend).await;
                    });
                }
                Err(e) => {
                    tracing::warn!("mock KMS accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn connection(
    tcp: TcpStream,
    peer: std::net::SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    backend: Arc<Backend>,
) {
    let faults = backend.faults.clone();
    faults.count_connection();
    if faults.is_down() {
        faults.count_refused_down();
        return; // dropped: the client sees the connection closed
    }
    let _ = tcp.set_nodelay(true);
    let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            faults.count_handshake_failure();
            tracing::info!(%peer, "mock KMS: TLS handshake refused: {e}");
            return;
        }
        Err(_) => {
            faults.count_handshake_failure();
            return;
        }
    };
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    faults.count_handshake(resumed);
    tracing::debug!(%peer, resumed, "mock KMS: TLS session established");
    loop {
        let mut head = [0u8; 8];
        match tokio::time::timeout(IDLE_TIMEOUT, tls.read_exact(&mut head)).await {
            Ok(Ok(_)) => {}
            _ => return, // closed, broken or idle
        }
        let total = match ttlv::frame_len(&head, MAX_REQUEST) {
            Ok(t) => t,
            Err(e) => {
                // The framing cannot be trusted any more: answer and close.
                let resp = ops::refusal(&format!("request refused: {e}"));
                let _ = tls.write_all(&resp).await;
                let _ = tls.shutdown().await;
                return;
            }
        };
        let mut buf = vec![0u8; total];
        buf[..8].copy_from_slice(&head);
        match tokio::time::timeout(IDLE_TIMEOUT, tls.read_exact(&mut buf[8..])).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let latency = faults.latency();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if faults.is_down() {
            faults.count_refused_down();
            return; // gone before answering
        }
        let b = backend.clone();
        let resp = match tokio::task::spawn_blocking(move || ops::handle(&b, &buf)).await {
            Ok(r) => r,
            Err(_) => return,
        };
        if tls.write_all(&resp).await.is_err() || tls.flush().await.is_err() {
            return;
        }
    }
}
