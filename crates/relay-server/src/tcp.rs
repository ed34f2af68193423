//! The relay's TCP front: TLS over TCP and WebSocket links for clients whose network drops UDP.
//!
//! Each accepted TCP connection gets a TLS handshake with the relay's one certificate (the same pin
//! as QUIC), then either the TLS-over-TCP preamble or an HTTP `GET` with a WebSocket upgrade on the
//! configured path. The link then joins the QUIC endpoint's [`Hub`] and everything else (limits,
//! pairing, forwarding) is the QUIC code path: the link only carries packets.
//!
//! Against strangers, before a link exists: at most [`TcpConfig::max_links`] links and handshakes
//! in all and [`TcpConfig::links_per_address`] per source address (counted from `accept`, so a flood
//! of idle TCP connections is bounded too); a handshake (TLS and preamble or upgrade) must finish
//! within [`TcpConfig::handshake_timeout`]; the HTTP request head is limited by the WebSocket
//! library and the framing limits every packet to [`tandem_net::tunnel::MAX_TUNNEL_PACKET`].
//!
//! Behind a reverse proxy, the TCP peer is the proxy. When its address is in
//! [`TcpConfig::trusted_proxies`], the client's address is taken from the last entry of
//! `X-Forwarded-For` (or `X-Real-IP`), so that per-address limits apply to clients and not to the
//! proxy; from any other peer those headers are ignored.

use crate::metrics::Metrics;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tandem_net::tunnel::{
    Hub, PREAMBLE, TUNNEL_ALPN, Transport, native_framing, tune_tcp, websocket_config,
    websocket_framing,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How the relay serves TCP.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// TCP addresses to listen on (TLS over TCP and WebSocket on each). Empty: no TCP.
    pub listen: Vec<SocketAddr>,
    /// Path of the WebSocket upgrade (e.g. `/tandem`); `None` refuses WebSocket.
    pub websocket_path: Option<String>,
    /// Reverse proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpAddr>,
    /// Links (and handshakes) at once.
    pub max_links: usize,
    /// Links per source address at once.
    pub links_per_address: usize,
    /// Time for TLS and the preamble or upgrade.
    pub handshake_timeout: Duration,
    /// A link with nothing received for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            listen: Vec::new(),
            websocket_path: Some("/tandem".into()),
            trusted_proxies: Vec::new(),
            max_links: 10_000,
            links_per_address: 64,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// What every TCP connection task shares.
pub(crate) struct Front {
    pub hub: Arc<Hub>,
    pub tls: tokio_rustls::TlsAcceptor,
    pub cfg: TcpConfig,
    pub metrics: Arc<Metrics>,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Holds one slot of the counts while a connection lives.
struct Slot {
    front: Arc<Front>,
    ip: IpAddr,
    total: bool,
    per_ip: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.front.counts.lock().unwrap_or_else(|e| e.into_inner());
        if self.total {
            c.total = c.total.saturating_sub(1);
        }
        if let Some(n) = c.per_ip.get_mut(&self.ip).filter(|_| self.per_ip) {
            {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.per_ip.remove(&self.ip);
                }
            }
        }
    }
}

impl Front {
    pub(crate) fn new(
        hub: Arc<Hub>,
        tls: rustls::ServerConfig,
        cfg: TcpConfig,
        metrics: Arc<Metrics>,
    ) -> Arc<Front> {
        Arc::new(Front {
            hub,
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            cfg,
            metrics,
            counts: Mutex::new(Counts::default()),
        })
    }

    /// Takes a slot of the total (`total`) and of `ip`'s share (`per_ip`), or says which limit
    /// it hit. A trusted proxy's connection takes only the total; its client, named after the
    /// upgrade, only the per-address share.
    fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        total: bool,
        per_ip: bool,
    ) -> Result<Slot, &'static str> {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if total && c.total >= self.cfg.max_links {
            return Err("tcp_links");
        }
        if per_ip {
            let n = c.per_ip.get(&ip).copied().unwrap_or(0);
            if n >= self.cfg.links_per_address {
                return Err("tcp_links_per_address");
            }
            c.per_ip.insert(ip, n + 1);
        }
        if total {
            c.total += 1;
        }
        Ok(Slot {
            front: self.clone(),
            ip,
            total,
            per_ip,
        })
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.cfg.trusted_proxies.iter().any(|t| same_ip(*t, ip))
    }
}

fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

/// Accepts TCP connections until `stop`.
pub(crate) async fn serve(
    listener: TcpListener,
    front: Arc<Front>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        // A trusted proxy carries many clients: its own address is not limited per address.
        let ip = peer.ip().to_canonical();
        let slot = match front.admit(ip, true, !front.is_trusted(ip)) {
            Ok(s) => s,
            Err(limit) => {
                front.metrics.tcp_refused(limit);
                drop(stream);
                continue;
            }
        };
        let front = front.clone();
        tokio::spawn(async move {
            let hs = front.cfg.handshake_timeout;
            match tokio::time::timeout(hs, handshake(&front, stream, peer)).await {
                Ok(Ok(Some((link_peer, transport, framing, client_slot)))) => {
                    let link = front.hub.add_link(
                        None,
                        link_peer,
                        transport,
                        framing,
                        front.cfg.idle_timeout,
                    );
                    front.metrics.tcp_link_opened(transport);
                    link.closed().await;
                    front.metrics.tcp_link_closed(transport);
                    drop(client_slot);
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    front.metrics.tcp_handshake_failed(e.kind_label());
                    tracing::debug!(%peer, error = %e, "TCP link handshake failed");
                }
                Err(_) => front.metrics.tcp_handshake_failed("timeout"),
            }
            drop(slot);
        });
    }
}

#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("TLS: {0}")]
    Tls(io::Error),
    #[error("neither the TLS-over-TCP preamble nor an HTTP GET")]
    Preamble,
    #[error("WebSocket upgrade: {0}")]
    WebSocket(String),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

impl HandshakeError {
    fn kind_label(&self) -> &'static str {
        match self {
            HandshakeError::Tls(_) => "tls",
            HandshakeError::Preamble => "preamble",
            HandshakeError::WebSocket(_) => "websocket",
            HandshakeError::Io(_) => "io",
        }
    }
}

type Framing = (tandem_net::tunnel::PacketRx, tandem_net::tunnel::PacketTx);

/// TLS, then the preamble or the WebSocket upgrade. `None`: refused by a limit after the upgrade
/// (already counted).
async fn handshake(
    front: &Arc<Front>,
    stream: TcpStream,
    peer: SocketAddr,
) -> Result<Option<(SocketAddr, Transport, Framing, Option<Slot>)>, HandshakeError> {
    tune_tcp(&stream);
    let mut tls = front
        .tls
        .accept(stream)
        .await
        .map_err(HandshakeError::Tls)?;
    let mut first = [0u8; 4];
    tls.read_exact(&mut first).await?;
    if &first == PREAMBLE {
        return Ok(Some((peer, Transport::Tcp, native_framing(tls), None)));
    }
    if &first != b"GET " {
        return Err(HandshakeError::Preamble);
    }
    let Some(path) = front.cfg.websocket_path.clone() else {
        return Err(HandshakeError::WebSocket(
            "WebSocket is switched off".into(),
        ));
    };
    let trusted = front.is_trusted(peer.ip());
    let forwarded: Arc<Mutex<Option<IpAddr>>> = Arc::default();
    let callback = Upgrade {
        path,
        trusted,
        client: forwarded.clone(),
    };
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        Prefixed::new(b"GET ", tls),
        callback,
        Some(websocket_config()),
    )
    .await
    .map_err(|e| HandshakeError::WebSocket(e.to_string()))?;
    let client = *forwarded.lock().unwrap_or_else(|e| e.into_inner());
    let (link_peer, slot) = match client {
        Some(ip) => {
            let ip = ip.to_canonical();
            match front.admit(ip, false, true) {
                Ok(s) => (SocketAddr::new(ip, 0), Some(s)),
                Err(limit) => {
                    front.metrics.tcp_refused(limit);
                    return Ok(None);
                }
            }
        }
        None if trusted => {
            // A trusted proxy that did not say who the client is: the proxy's own address, limited.
            match front.admit(peer.ip().to_canonical(), false, true) {
                Ok(s) => (peer, Some(s)),
                Err(limit) => {
                    front.metrics.tcp_refused(limit);
                    return Ok(None);
                }
            }
        }
        None => (peer, None),
    };
    Ok(Some((
        link_peer,
        Transport::WebSocket,
        websocket_framing(ws),
        slot,
    )))
}

/// Checks the upgrade request: the configured path (404 otherwise); from a trusted proxy, notes
/// the client it names.
struct Upgrade {
    path: String,
    trusted: bool,
    client: Arc<Mutex<Option<IpAddr>>>,
}

impl tokio_tungstenite::tungstenite::handshake::server::Callback for Upgrade {
    #[allow(clippy::result_large_err)] // the library's signature
    fn on_request(
        self,
        req: &tokio_tungstenite::tungstenite::handshake::server::Request,
        resp: tokio_tungstenite::tungstenite::handshake::server::Response,
    ) -> Result<
        tokio_tungstenite::tungstenite::handshake::server::Response,
        tokio_tungstenite::tungstenite::handshake::server::ErrorResponse,
    > {
        if req.uri().path() != self.path {
            let mut r = tokio_tungstenite::tungstenite::handshake::server::ErrorResponse::new(
                Some("not found".into()),
            );
            *r.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::NOT_FOUND;
            return Err(r);
        }
        if self.trusted {
            let h = req.headers();
            let xff = h
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .and_then(forwarded_client);
            let real = h
                .get("x-real-ip")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok());
            *self.client.lock().unwrap_or_else(|e| e.into_inner()) = xff.or(real);
        }
        Ok(resp)
    }
}

/// The client's address from `X-Forwarded-For`: its last entry, which the trusted proxy appended
/// (entries before it are whatever the client claimed).
pub(crate) fn forwarded_client(header: &str) -> Option<IpAddr> {
    let last = header.rsplit(',').next()?.trim();
    // `[v6]:port`, `v4:port` and bare addresses.
    if let Ok(sa) = last.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    last.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// A stream whose first bytes were already read: gives them back, then reads on.
struct Prefixed<S> {
    prefix: &'static [u8],
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(prefix: &'static [u8], inner: S) -> Self {
        Prefixed {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The TLS configuration of the TCP front: the relay's certificate; ALPN `tandem-tcp/1`,
/// `http/1.1` or none (reverse proxies often send none).
pub(crate) fn tls_config(
    identity: &tandem_certs::RelayIdentity,
) -> Result<rustls::ServerConfig, tandem_certs::CertError> {
    let mut cfg = tandem_certs::server_config(identity, TUNNEL_ALPN)?;
    cfg.alpn_protocols = vec![TUNNEL_ALPN.to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_takes_the_last_hop() {
        assert_eq!(
            forwarded_client("203.0.113.9"),
            Some("203.0.113.9".parse().expect("ip"))
        );
        // The client claimed 1.2.3.4; the proxy appended what it saw.
        assert_eq!(
            forwarded_client("1.2.3.4, 198.51.100.7"),
            Some("198.51.100.7".parse().expect("ip"))
        );
        assert_eq!(
            forwarded_client("[2001:db8::5]:4711"),
            Some("2001:db8::5".parse().expect("ip"))
        );
        assert_eq!(
            forwarded_client("198.51.100.7:1234"),
            Some("198.51.100.7".parse().expect("ip"))
        );
        assert_eq!(forwarded_client("unknown"), None);
        assert_eq!(forwarded_client(""), None);
    }

    #[tokio::test]
    async fn prefixed_gives_back_the_prefix() {
        let (mut a, b) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        a.write_all(b"/path HTTP/1.1").await.expect("write");
        drop(a);
        let mut p = Prefixed::new(b"GET ", b);
        let mut s = String::new();
        p.read_to_string(&mut s).await.expect("read");
        assert_eq!(s, "GET /path HTTP/1.1");
    }
}
