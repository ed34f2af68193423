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
//! [`TcpConfig::trusted_proxies`], the client's address is the last entry of the last
//! `X-Forwarded-For` line (the one the proxy added), so that per-address limits apply to clients and
//! not to the proxy; from any other peer the header is ignored. A proxy that passes TCP through
//! (HAProxy in TCP mode, SNI routing) cannot name the client: all its clients then share its
//! address's limits, so use HTTP mode with WebSocket.
//!
//! A link must carry a QUIC connection the relay admitted: one that carries none for
//! [`TcpConfig::handshake_timeout`] is closed, so frames that merely trickle hold no slot.
//! WebSocket upgrades that carry an `Origin` header (a browser, driven by some web page) are
//! refused, and the request head is read with a limit of [`MAX_REQUEST_HEAD`] bytes before the
//! WebSocket library sees it.

use crate::metrics::Metrics;
use crate::registry::{NetworkKey, address_key, network_keys};
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
    /// Per address key (an IPv4 address, an IPv6 /56), as the registry groups addresses.
    per_key: HashMap<IpAddr, usize>,
    /// Per wider network (IPv4 /24, IPv6 /48 and /32), allowed a multiple of the per-address
    /// share as the registry's connection limits are.
    per_net: HashMap<NetworkKey, usize>,
}

fn dec<K: std::hash::Hash + Eq>(m: &mut HashMap<K, usize>, k: &K) {
    if let Some(n) = m.get_mut(k) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            m.remove(k);
        }
    }
}

/// Holds one slot of the counts while a connection lives.
struct Slot {
    front: Arc<Front>,
    /// The address key whose share this slot holds, if any.
    key: Option<IpAddr>,
    total: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.front.counts.lock().unwrap_or_else(|e| e.into_inner());
        if self.total {
            c.total = c.total.saturating_sub(1);
        }
        if let Some(key) = self.key {
            dec(&mut c.per_key, &key);
            for (net, _) in network_keys(key).into_iter().flatten() {
                dec(&mut c.per_net, &net);
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

    /// Takes a slot of the total (`total`) and of `ip`'s share (`per_ip`: its address key and its
    /// networks), or says which limit it hit. A trusted proxy's connection takes only the total;
    /// its client, named after the upgrade, only the per-address share.
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
        let key = per_ip.then(|| address_key(ip));
        if let Some(key) = key {
            let share = self.cfg.links_per_address;
            if c.per_key.get(&key).copied().unwrap_or(0) >= share {
                return Err("tcp_links_per_address");
            }
            for (net, factor) in network_keys(key).into_iter().flatten() {
                if c.per_net.get(&net).copied().unwrap_or(0) >= share.saturating_mul(factor) {
                    return Err("tcp_links_per_network");
                }
            }
            *c.per_key.entry(key).or_insert(0) += 1;
            for (net, _) in network_keys(key).into_iter().flatten() {
                *c.per_net.entry(net).or_insert(0) += 1;
            }
        }
        if total {
            c.total += 1;
        }
        Ok(Slot {
            front: self.clone(),
            key,
            total,
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
                    // A link lives while it carries a QUIC connection the relay admitted; one
                    // that carries none for the handshake timeout is closed (a link that only
                    // trickles frames must not hold a slot).
                    let unused_limit = front.cfg.handshake_timeout;
                    loop {
                        tokio::select! {
                            _ = link.closed() => break,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                        if link.unused_for(std::time::Instant::now()) > unused_limit {
                            front.metrics.tcp_handshake_failed("no_quic");
                            link.close();
                            break;
                        }
                    }
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
    // The rest of the request head, bounded (the WebSocket library would read up to 64 KiB).
    let mut head = b"GET ".to_vec();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST_HEAD {
            return Err(HandshakeError::WebSocket("request head too long".into()));
        }
        let n = tls.read(&mut chunk).await?;
        if n == 0 {
            return Err(HandshakeError::WebSocket(
                "closed during the request".into(),
            ));
        }
        head.extend_from_slice(&chunk[..n]);
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
        Prefixed::new(head, tls),
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
        if req.headers().contains_key("origin") {
            // A browser: a web page must not be able to open links from its visitors' machines.
            let mut r = tokio_tungstenite::tungstenite::handshake::server::ErrorResponse::new(
                Some("forbidden".into()),
            );
            *r.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::FORBIDDEN;
            return Err(r);
        }
        if self.trusted {
            // The last hop of the last X-Forwarded-For line: what the trusted proxy itself added
            // (nginx's $proxy_add_x_forwarded_for appends to the line, HAProxy adds a line).
            // Anything the client wrote comes before it and is ignored.
            let last = req
                .headers()
                .get_all("x-forwarded-for")
                .iter()
                .next_back()
                .and_then(|v| forwarded_client(v.as_bytes()));
            *self.client.lock().unwrap_or_else(|e| e.into_inner()) = last;
        }
        Ok(resp)
    }
}

/// The client's address from an `X-Forwarded-For` line: its last entry, which the trusted proxy
/// appended (entries before it are whatever the client claimed, possibly not even text).
pub(crate) fn forwarded_client(header: &[u8]) -> Option<IpAddr> {
    let last = header.rsplit(|b| *b == b',').next()?;
    let last = std::str::from_utf8(last).ok()?.trim();
    // `[v6]:port`, `v4:port` and bare addresses.
    if let Ok(sa) = last.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    last.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Longest WebSocket request head accepted (browsers send 1–2 KiB; a reverse proxy adds a few
/// headers).
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// A stream whose first bytes were already read: gives them back, then reads on.
struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(prefix: Vec<u8>, inner: S) -> Self {
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
            forwarded_client(b"203.0.113.9"),
            Some("203.0.113.9".parse().expect("ip"))
        );
        // The client claimed 1.2.3.4; the proxy appended what it saw.
        assert_eq!(
            forwarded_client(b"1.2.3.4, 198.51.100.7"),
            Some("198.51.100.7".parse().expect("ip"))
        );
        assert_eq!(
            forwarded_client(b"[2001:db8::5]:4711"),
            Some("2001:db8::5".parse().expect("ip"))
        );
        assert_eq!(
            forwarded_client(b"198.51.100.7:1234"),
            Some("198.51.100.7".parse().expect("ip"))
        );
        assert_eq!(forwarded_client(b"unknown"), None);
        assert_eq!(forwarded_client(b""), None);
        // A client's bytes that are not text before the proxy's entry do not hide it.
        assert_eq!(
            forwarded_client(b"\x80\xff, 198.51.100.7"),
            Some("198.51.100.7".parse().expect("ip"))
        );
    }

    #[tokio::test]
    async fn prefixed_gives_back_the_prefix() {
        let (mut a, b) = tokio::io::duplex(64);
        use tokio::io::AsyncWriteExt;
        a.write_all(b"/path HTTP/1.1").await.expect("write");
        drop(a);
        let mut p = Prefixed::new(b"GET ".to_vec(), b);
        let mut s = String::new();
        p.read_to_string(&mut s).await.expect("read");
        assert_eq!(s, "GET /path HTTP/1.1");
    }
}
