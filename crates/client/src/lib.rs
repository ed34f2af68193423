//! Client side of the outer relay link, shared by the agent and the console.
//!
//! [`RelayLink::connect`] dials the relay over QUIC, verifies it with a [`RelayTrust`] (pin or CA, never
//! "accept anything"), opens the control stream and starts a reader task, so that [`RelayLink::recv`]
//! is cancel-safe and can sit in a `tokio::select!`. After pairing, payloads go through
//! [`RelayLink::connection`] as DATAGRAM frames, or through a payload stream
//! ([`RelayLink::open_payload_stream`] / [`RelayLink::accept_payload_stream`]) when larger than
//! [`RelayLink::max_datagram_size`].

pub mod check;

use bytes::Bytes;
use quinn::{Connection, ConnectionError, RecvStream, SendStream, VarInt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tandem_certs::RelayTrust;
use tandem_net::dial::{DialError, TcpTarget};
use tandem_net::direct::DirectPort;
use tandem_net::proxy::{Proxy, ProxyError};
use tandem_net::tunnel::{Hub, Link, MuxSocket, QueueLimits};
use tandem_net::{Transport, TransportCell};
use tandem_proto::{
    ALPN, ClientInfo, ClientMsg, EndReason, ErrorCode, FRAME_HEADER, MAX_CONTROL_FRAME,
    MAX_PAYLOAD_FRAME, RelayMsg, ResumeToken, Secret, Slot, decode_body, encode_frame, frame_len,
};
use tokio::sync::mpsc;

pub use tandem_certs;
pub use tandem_net;
pub use tandem_proto;

/// How to reach and trust a relay.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// `host:port` (host: DNS name or IP address; IPv6 in brackets): the relay's QUIC (UDP) address.
    pub relay: String,
    /// Other nodes of the same relay cluster (`host:port` each; trusted exactly like `relay`),
    /// tried when `relay` does not answer: [`ConnectOptions::new`] takes them from a
    /// comma-separated list, `relay1.example.com:4433,relay2.example.com:4433`.
    pub alternates: Vec<String>,
    pub trust: RelayTrust,
    /// Name and version of the program, for the relay's log.
    pub software: String,
    /// How long to wait for the relay to answer.
    pub timeout: Duration,
    /// Which transports may be used.
    pub transports: Transports,
    /// Where TCP links go when QUIC does not answer, tried in this order a little apart. By default
    /// TLS over TCP to the relay's host on its QUIC port number, then on 443.
    pub tcp: Vec<TcpTarget>,
    /// The HTTP proxy for TCP links. By default from `HTTPS_PROXY` / `NO_PROXY` (as curl).
    pub proxy: ProxyChoice,
    /// How long QUIC has on its own before TCP starts in parallel ("happy eyeballs").
    pub race_delay: Duration,
    /// A link on TCP first tries QUIC again after this long, then less and less often.
    pub quic_retry: Duration,
    /// Whether sessions may take a direct path to the peer when one answers (`false`: "relay
    /// only", for networks where peer-to-peer traffic is forbidden).
    pub direct: bool,
}

/// Which transports a client uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Transports {
    /// QUIC first; TCP in parallel when QUIC has not answered within the race delay; a link that
    /// ended up on TCP moves to QUIC when UDP works again.
    #[default]
    Auto,
    /// QUIC (UDP) only.
    Quic,
    /// TCP only (tests, benchmarks, or a network known to drop UDP).
    Tcp,
}

/// Which HTTP proxy TCP links go through.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum ProxyChoice {
    /// `HTTPS_PROXY`/`https_proxy`/`ALL_PROXY`, unless `NO_PROXY` exempts the host.
    #[default]
    FromEnvironment,
    /// Directly, whatever the environment says.
    Direct,
    /// This proxy.
    Use(Proxy),
}

/// Time between the starts of attempts to two nodes of a relay cluster.
pub const NODE_STAGGER: Duration = Duration::from_secs(1);
/// Time between the starts of two TCP attempts to different targets.
const TCP_STAGGER: Duration = Duration::from_millis(250);
/// A TCP link with nothing received for this long is closed (QUIC's keep-alives run every 2 s).
const LINK_IDLE: Duration = Duration::from_secs(30);

impl ConnectOptions {
    /// `relay`: one relay's `host:port`, or the nodes of a relay cluster separated by commas (the
    /// first is tried first; see [`RelayLink::connect`]).
    pub fn new(relay: impl Into<String>, trust: RelayTrust) -> Self {
        let given = relay.into();
        let mut nodes = given
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        let relay = nodes.next().unwrap_or(given.clone());
        let alternates = nodes.collect();
        ConnectOptions {
            tcp: default_tcp_targets(&relay),
            relay,
            alternates,
            trust,
            software: format!("tandem-client {}", env!("CARGO_PKG_VERSION")),
            timeout: Duration::from_secs(10),
            transports: Transports::Auto,
            proxy: ProxyChoice::FromEnvironment,
            race_delay: Duration::from_millis(300),
            quic_retry: Duration::from_secs(5),
            direct: true,
        }
    }

    /// The same options for another node of the cluster, `relay`: its own default TCP targets
    /// (targets given for the first node name that node), no alternates.
    pub fn for_node(&self, relay: &str) -> ConnectOptions {
        ConnectOptions {
            relay: relay.to_string(),
            alternates: Vec::new(),
            tcp: default_tcp_targets(relay),
            ..self.clone()
        }
    }

    /// Whether a relay node may send this client to `relay` ([`ClientError::Redirected`]). With a
    /// pin, yes: only holders of the cluster's key answer there, so a redirect cannot lead
    /// anywhere else. With a CA (which may be a public one, vouching for any web server), only to
    /// a node this client was given: a redirect must not take the technician's token to an
    /// arbitrary host the CA vouches for.
    pub fn accepts_redirect(&self, relay: &str) -> bool {
        match self.trust {
            RelayTrust::Pin(_) => true,
            RelayTrust::Ca { .. } => {
                let same = |a: &str| a.eq_ignore_ascii_case(relay);
                same(&self.relay) || self.alternates.iter().any(|a| same(a))
            }
        }
    }

    /// The proxy for a TCP link to `host`.
    fn proxy_for(&self, host: &str) -> Result<Option<Proxy>, ClientError> {
        match &self.proxy {
            ProxyChoice::Direct => Ok(None),
            ProxyChoice::Use(p) => Ok(Some(p.clone())),
            ProxyChoice::FromEnvironment => Ok(Proxy::from_env(host)?),
        }
    }
}

/// How agent and console reach the relay besides its QUIC address: the same four settings as flags,
/// environment variables and configuration-file keys (`transport`, `relay_tcp`, `relay_websocket`,
/// `proxy`).
#[derive(clap::Args, serde::Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkArgs {
    /// How to reach the relay: `auto` (QUIC over UDP; if it has not answered within 300 ms, TLS
    /// over TCP in parallel, and back to QUIC when UDP works again), `quic` (UDP only) or `tcp`
    /// (TCP only). [default: auto]
    #[arg(long, env = "TANDEM_TRANSPORT", value_name = "auto|quic|tcp")]
    pub transport: Option<String>,
    /// Where to reach the relay over TCP (TLS), host:port; repeat or separate with commas for
    /// several. [default: the relay's host on its port number, then on 443]
    #[arg(
        long = "relay-tcp",
        env = "TANDEM_RELAY_TCP",
        value_delimiter = ',',
        value_name = "HOST:PORT"
    )]
    #[serde(default)]
    pub relay_tcp: Vec<String>,
    /// The relay's WebSocket address behind a reverse proxy (wss://host/tandem), tried over TCP
    /// (instead of TLS to the relay itself, unless --relay-tcp is given too).
    #[arg(long, env = "TANDEM_RELAY_WEBSOCKET", value_name = "URL")]
    pub relay_websocket: Option<String>,
    /// HTTP proxy for TCP (http://[user:password@]host:port), or `direct` for none.
    /// [default: $HTTPS_PROXY or $ALL_PROXY, unless $NO_PROXY names the relay]
    #[arg(long, env = "TANDEM_PROXY", value_name = "URL|direct")]
    pub proxy: Option<String>,
    /// Which path a session's packets may take: `auto` (straight to the other side when both can
    /// reach each other, through the relay otherwise, and back to the relay within a second when
    /// the direct path stops answering) or `relay-only` (always through the relay, for networks
    /// where peer-to-peer traffic is forbidden; the relay's operator can also forbid it).
    /// [default: auto]
    #[arg(long, env = "TANDEM_PATH", value_name = "auto|relay-only")]
    pub path: Option<String>,
}

impl NetworkArgs {
    /// These settings, each one not set taken from `file`.
    pub fn or(self, file: &NetworkArgs) -> NetworkArgs {
        NetworkArgs {
            transport: self.transport.or_else(|| file.transport.clone()),
            relay_tcp: if self.relay_tcp.is_empty() {
                file.relay_tcp.clone()
            } else {
                self.relay_tcp
            },
            relay_websocket: self
                .relay_websocket
                .or_else(|| file.relay_websocket.clone()),
            proxy: self.proxy.or_else(|| file.proxy.clone()),
            path: self.path.or_else(|| file.path.clone()),
        }
    }

    /// Applies the settings to `opts` (whose relay address is already set).
    pub fn apply(&self, opts: &mut ConnectOptions) -> Result<(), ClientError> {
        opts.transports = match self.transport.as_deref().map(str::trim) {
            None | Some("auto") | Some("") => Transports::Auto,
            Some("quic") | Some("udp") => Transports::Quic,
            Some("tcp") => Transports::Tcp,
            Some(other) => {
                return Err(ClientError::BadOption(format!(
                    "transport {other:?}: use auto, quic or tcp"
                )));
            }
        };
        let mut tcp = Vec::new();
        for t in &self.relay_tcp {
            tcp.push(TcpTarget::tls(t.trim())?);
        }
        if let Some(ws) = &self.relay_websocket {
            tcp.push(TcpTarget::websocket(ws.trim())?);
        }
        if !tcp.is_empty() {
            opts.tcp = tcp;
        }
        opts.proxy = match self.proxy.as_deref().map(str::trim) {
            None | Some("") => ProxyChoice::FromEnvironment,
            Some("direct") | Some("none") => ProxyChoice::Direct,
            Some(url) => ProxyChoice::Use(Proxy::parse(url)?),
        };
        opts.direct = match self.path.as_deref().map(str::trim) {
            None | Some("") | Some("auto") | Some("direct") => true,
            Some("relay-only") | Some("relay") => false,
            Some(other) => {
                return Err(ClientError::BadOption(format!(
                    "path {other:?}: use auto or relay-only"
                )));
            }
        };
        Ok(())
    }
}

/// TLS over TCP on the relay's port number and on 443.
pub fn default_tcp_targets(relay: &str) -> Vec<TcpTarget> {
    let Ok(first) = TcpTarget::tls(relay) else {
        return Vec::new();
    };
    let mut v = vec![first.clone()];
    if first.port() != 443 {
        v.push(TcpTarget::Tls {
            host: first.host().to_string(),
            port: 443,
        });
    }
    v
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("relay address {0:?} is not host:port")]
    BadAddress(String),
    #[error("cannot resolve relay address {addr:?}: {reason}")]
    Resolve { addr: String, reason: String },
    #[error(
        "no answer from the relay at {addr} within {secs} s: check that it runs and that UDP port {port} is reachable{}",
        if tcp.is_empty() { String::new() } else { format!("; over TCP: {tcp}") }
    )]
    Unreachable {
        addr: String,
        secs: u64,
        port: u16,
        /// What the TCP attempts met, when there were any.
        tcp: String,
    },
    #[error("TLS handshake with the relay failed: {0}")]
    Tls(String),
    #[error("the relay closed the connection: {reason} [{}]", code.map(|c| c.label()).unwrap_or("unknown"))]
    Closed {
        code: Option<ErrorCode>,
        reason: String,
    },
    #[error("{} [{}]", code.explain(), code.label())]
    Refused { code: ErrorCode },
    #[error("{message} [{}]", code.label())]
    RefusedBecause { code: ErrorCode, message: String },
    #[error("lost the connection to the relay: {0}")]
    Lost(String),
    /// The relay sent the console to the node of its cluster holding the code.
    #[error("the code waits on another node of the relay, {relay}")]
    Redirected { relay: String },
    #[error("the relay sent something unexpected: {0}")]
    Protocol(String),
    #[error(transparent)]
    Certs(#[from] tandem_certs::CertError),
    #[error(transparent)]
    Net(#[from] tandem_net::NetError),
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("invalid network option: {0}")]
    BadOption(String),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
}

impl ClientError {
    /// The relay's reason code, when the relay gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Closed { code, .. } => *code,
            ClientError::Refused { code } | ClientError::RefusedBecause { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// How long the relay asked to wait before trying again ([`ErrorCode::Busy`]: "retry in N s").
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Closed {
                code: Some(ErrorCode::Busy),
                reason,
            } => Some(Duration::from_secs(
                tandem_proto::retry_after_secs(reason).unwrap_or(5).into(),
            )),
            _ => None,
        }
    }

    fn from_connection(e: &ConnectionError) -> Self {
        match e {
            ConnectionError::ApplicationClosed(c) => {
                let n = u32::try_from(c.error_code.into_inner()).ok();
                ClientError::Closed {
                    code: n.and_then(ErrorCode::from_u32),
                    reason: String::from_utf8_lossy(&c.reason).into_owned(),
                }
            }
            ConnectionError::TransportError(t)
                if t.code.to_string().contains("crypto") || is_tls(&t.reason) =>
            {
                ClientError::Tls(t.reason.clone())
            }
            ConnectionError::ConnectionClosed(c) if is_tls(&String::from_utf8_lossy(&c.reason)) => {
                ClientError::Tls(String::from_utf8_lossy(&c.reason).into_owned())
            }
            other => ClientError::Lost(other.to_string()),
        }
    }
}

fn is_tls(reason: &str) -> bool {
    reason.contains("certificate") || reason.contains("pinned") || reason.contains("ALPN")
}

/// One control-plane event from the relay, or the end of the link.
type Incoming = Result<RelayMsg, ClientError>;

/// A live, verified connection to the relay.
pub struct RelayLink {
    endpoint: quinn::Endpoint,
    conn: Connection,
    send: SendStream,
    events: mpsc::Receiver<Incoming>,
    software: String,
    remote: SocketAddr,
    /// True when this link made its endpoint (and so waits for it to go idle on close).
    owns_endpoint: bool,
    transport: TransportCell,
    /// The TCP link under the connection, while there is one.
    tunnel: Option<Arc<Link>>,
    /// Moves a link on TCP to QUIC when UDP works (and watches the TCP link).
    mover: Option<tokio::task::AbortHandle>,
    /// Direct-path packets on the link's UDP socket (a link that started on QUIC).
    port: Option<DirectPort>,
    /// What the relay last said about this link's path ([`RelayMsg::PathInfo`]).
    path_info: tokio::sync::watch::Receiver<Option<PathInfo>>,
    /// This link's relay-channel token, once the relay gave one ([`RelayMsg::Channel`]).
    channel: tokio::sync::watch::Receiver<Option<u64>>,
}

/// What the relay said about a link's path: the address it sees the link come from, and whether
/// it lets sessions go direct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathInfo {
    pub observed: Option<SocketAddr>,
    pub direct_allowed: bool,
}

/// A link's relay channel (see [`RelayLink::channel`]).
#[derive(Clone, Debug)]
pub struct LinkChannel {
    pub port: DirectPort,
    pub relay: SocketAddr,
    pub token: tokio::sync::watch::Receiver<Option<u64>>,
}

impl Drop for RelayLink {
    fn drop(&mut self) {
        if let Some(m) = &self.mover {
            m.abort();
        }
        // The TCP link goes too, after a moment for the connection's close to get through it.
        if let Some(t) = self.tunnel.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                t.close();
            });
        }
    }
}

fn client_config(opts: &ConnectOptions) -> Result<quinn::ClientConfig, ClientError> {
    let mut tls = opts.trust.client_config(ALPN)?;
    tls.alpn_protocols = tandem_proto::ALPNS.iter().map(|a| a.to_vec()).collect();
    let quic_tls = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic_tls));
    cfg.transport_config(Arc::new(tandem_net::transport_config(true)));
    Ok(cfg)
}

/// A client endpoint configured to dial the relay of `opts` (address family of `relay_addr`).
pub fn client_endpoint(
    opts: &ConnectOptions,
    relay_addr: SocketAddr,
) -> Result<quinn::Endpoint, ClientError> {
    Ok(tandem_net::client_endpoint(
        relay_addr,
        client_config(opts)?,
    )?)
}

/// Like [`client_endpoint`], with the port that shares its socket (direct paths, relay channels).
pub fn client_endpoint_with_port(
    opts: &ConnectOptions,
    relay_addr: SocketAddr,
) -> Result<(quinn::Endpoint, DirectPort), ClientError> {
    Ok(tandem_net::client_endpoint_with_port(
        relay_addr,
        client_config(opts)?,
    )?)
}

/// The host part of `host:port` (IPv6 without brackets), without any DNS lookup.
fn relay_host(relay: &str) -> Result<(String, u16), ClientError> {
    let bad = || ClientError::BadAddress(relay.to_string());
    let (host, port) = relay.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// Resolves the relay's QUIC address, within `timeout`.
async fn resolve(relay: &str, timeout: Duration) -> Result<(SocketAddr, String), ClientError> {
    let (host, _) = relay_host(relay)?;
    let lookup = tokio::net::lookup_host(relay);
    let mut addrs = match tokio::time::timeout(timeout, lookup).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            return Err(ClientError::Resolve {
                addr: relay.to_string(),
                reason: e.to_string(),
            });
        }
        Err(_) => {
            return Err(ClientError::Resolve {
                addr: relay.to_string(),
                reason: format!("no answer from DNS within {} s", timeout.as_secs()),
            });
        }
    };
    let addr = addrs.next().ok_or_else(|| ClientError::Resolve {
        addr: relay.to_string(),
        reason: "no addresses".into(),
    })?;
    Ok((addr, host))
}

/// How long a TCP attempt waits for the relay's QUIC address from DNS.
const DNS_FOR_TCP: Duration = Duration::from_secs(1);

/// What quinn is told the relay's address is on a TCP link whose QUIC address is not known (a
/// network where only the proxy resolves names): a link address, never a real peer's.
fn placeholder_addr(port: u16) -> SocketAddr {
    SocketAddr::new(std::net::Ipv4Addr::new(240, 0, 0, 1).into(), port)
}

/// A connection that won the race, with what it runs on.
struct Won {
    endpoint: quinn::Endpoint,
    conn: Connection,
    /// The relay's QUIC address (resolved), or a placeholder on a TCP link.
    addr: SocketAddr,
    transport: Transport,
    /// The TCP link under the connection: closed if the link is not started after all.
    tunnel: Option<(CloseOnDrop, Arc<MuxSocket>)>,
    /// Direct-path packets on the endpoint's UDP socket (a QUIC link).
    port: Option<DirectPort>,
}

/// One way of reaching the relay that failed, for the error message.
enum Attempt {
    Quic(ClientError),
    Tcp(TcpTarget, ClientError),
}

async fn handshake(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    host: &str,
    timeout: Duration,
    relay: &str,
) -> Result<Connection, ClientError> {
    let connecting = endpoint
        .connect(addr, host)
        .map_err(|e| ClientError::Lost(e.to_string()))?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(ConnectionError::TimedOut)) | Err(_) => Err(ClientError::Unreachable {
            addr: relay.to_string(),
            secs: timeout.as_secs(),
            port: addr.port(),
            tcp: String::new(),
        }),
        Ok(Err(e)) => Err(ClientError::from_connection(&e)),
    }
}

async fn via_quic(opts: &ConnectOptions, timeout: Duration) -> Result<Won, ClientError> {
    let (addr, host) = resolve(&opts.relay, timeout).await?;
    let (endpoint, port) = tandem_net::client_endpoint_with_port(addr, client_config(opts)?)?;
    let conn = handshake(&endpoint, addr, &host, timeout, &opts.relay).await?;
    Ok(Won {
        endpoint,
        conn,
        addr,
        transport: Transport::Quic,
        tunnel: None,
        port: Some(port),
    })
}

async fn via_tcp(
    opts: &ConnectOptions,
    target: &TcpTarget,
    timeout: Duration,
) -> Result<Won, ClientError> {
    let (host, port) = relay_host(&opts.relay)?;
    // The relay's QUIC address keys the link and is where the link moves when UDP works. Where
    // only the proxy resolves names, a placeholder keys it (and the link stays on TCP).
    let addr = match resolve(&opts.relay, DNS_FOR_TCP).await {
        Ok((a, _)) => a,
        Err(_) => placeholder_addr(port),
    };
    let proxy = opts.proxy_for(target.host())?;
    let dialed = tandem_net::dial::dial(target, proxy.as_ref(), &opts.trust, timeout).await?;
    let hub = Hub::client(QueueLimits::default());
    let link = hub.add_link(
        Some(addr),
        dialed.peer,
        dialed.transport,
        dialed.framing,
        LINK_IDLE,
    );
    // If this attempt loses the race (its future is dropped) or fails, the TCP link closes at
    // once instead of lingering until its idle timeout.
    let guard = CloseOnDrop(Some(link));
    let local: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = MuxSocket::links_only(hub, local);
    let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        socket.clone(),
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| ClientError::Net(tandem_net::NetError::Endpoint(e)))?;
    endpoint.set_default_client_config(client_config(opts)?);
    let conn = handshake(&endpoint, addr, &host, timeout, &opts.relay).await?;
    Ok(Won {
        endpoint,
        conn,
        addr,
        transport: dialed.transport,
        tunnel: Some((guard, socket)),
        port: None,
    })
}

/// Closes a TCP link when dropped, unless disarmed.
struct CloseOnDrop(Option<Arc<Link>>);

impl CloseOnDrop {
    /// The link, to keep open.
    fn disarm(mut self) -> Option<Arc<Link>> {
        self.0.take()
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(l) = &self.0 {
            l.close();
        }
    }
}

/// Races QUIC against the TCP targets: QUIC starts at once, TCP after the race delay (at once if
/// QUIC failed outright), each further TCP target a little later. The first connection up wins.
async fn race(opts: &ConnectOptions) -> Result<Won, ClientError> {
    use std::future::Future;
    use std::pin::Pin;
    type Pending<'a> = Pin<Box<dyn Future<Output = Result<Won, Attempt>> + Send + 'a>>;
    let started = tokio::time::Instant::now();
    let left = move || opts.timeout.saturating_sub(started.elapsed());
    // Set when QUIC failed outright (a watch: it also tells attempts that start waiting later).
    let (quic_failed, failed_rx) = tokio::sync::watch::channel(false);
    let mut attempts: Vec<Pending<'_>> = Vec::new();
    if opts.transports != Transports::Tcp {
        attempts.push(Box::pin(async move {
            let r = via_quic(opts, opts.timeout).await;
            if r.is_err() {
                let _ = quic_failed.send(true);
            }
            r.map_err(Attempt::Quic)
        }));
    }
    if opts.transports != Transports::Quic {
        for (i, target) in opts.tcp.iter().enumerate() {
            let mut failed = failed_rx.clone();
            let head_start = match opts.transports {
                Transports::Tcp => TCP_STAGGER * i as u32,
                _ => opts.race_delay + TCP_STAGGER * i as u32,
            };
            attempts.push(Box::pin(async move {
                tokio::select! {
                    _ = tokio::time::sleep(head_start) => {}
                    _ = failed.wait_for(|f| *f) => {}
                }
                via_tcp(opts, target, left())
                    .await
                    .map_err(|e| Attempt::Tcp(target.clone(), e))
            }));
        }
    }
    let mut failures = Vec::new();
    let mut attempts: futures_util::stream::FuturesUnordered<_> = attempts.into_iter().collect();
    use futures_util::StreamExt;
    while let Some(r) = attempts.next().await {
        match r {
            Ok(won) => return Ok(won),
            Err(a) => failures.push(a),
        }
    }
    Err(worst(opts, failures))
}

/// The error to show when every attempt failed: what the relay (or something pretending to be it)
/// answered beats a refused certificate, which beats "no answer".
fn worst(opts: &ConnectOptions, failures: Vec<Attempt>) -> ClientError {
    let answered = |e: &ClientError| {
        !matches!(
            e,
            ClientError::Unreachable { .. }
                | ClientError::Dial(_)
                | ClientError::Proxy(_)
                | ClientError::Resolve { .. }
        )
    };
    let port = relay_host(&opts.relay).map(|(_, p)| p).unwrap_or(0);
    let mut tcp = Vec::new();
    let mut quic = None;
    let mut best = None;
    for f in failures {
        match f {
            Attempt::Quic(e) if answered(&e) => return e,
            Attempt::Quic(e) => quic = Some(e),
            Attempt::Tcp(_, ClientError::Dial(d)) if d.is_certificate() => {
                best = Some(ClientError::Dial(d))
            }
            Attempt::Tcp(_, e) if answered(&e) => {
                if best.is_none() {
                    best = Some(e)
                }
            }
            Attempt::Tcp(t, e) => tcp.push(format!("{t}: {e}")),
        }
    }
    if let Some(b) = best {
        return b;
    }
    let unreachable = |tcp: String| ClientError::Unreachable {
        addr: opts.relay.clone(),
        secs: opts.timeout.as_secs(),
        port,
        tcp,
    };
    match quic {
        None => unreachable(if tcp.is_empty() {
            "no TCP address to try".into()
        } else {
            tcp.join("; ")
        }),
        Some(ClientError::Unreachable { .. }) => unreachable(tcp.join("; ")),
        // DNS failed for QUIC and TCP did not get through either: the DNS error says most.
        Some(e) => e,
    }
}

impl RelayLink {
    /// Dials and verifies the relay, and opens the control stream: QUIC first, TLS over TCP (or a
    /// WebSocket) in parallel when QUIC does not answer quickly, as [`ConnectOptions`] says.
    ///
    /// With [`ConnectOptions::alternates`] (a relay cluster), the first node is tried first, the
    /// next one [`NODE_STAGGER`] later (at once when all tried so far failed), and so on; the first
    /// link up wins, so a dead node costs a second, not a timeout. Every node is trusted exactly
    /// as the first (same pin or CA). When none answers, the first node's error is returned.
    pub async fn connect(opts: &ConnectOptions) -> Result<RelayLink, ClientError> {
        if opts.alternates.is_empty() {
            return Self::connect_one(opts).await;
        }
        use futures_util::StreamExt;
        let nodes: Vec<ConnectOptions> = std::iter::once(ConnectOptions {
            alternates: Vec::new(),
            ..opts.clone()
        })
        .chain(opts.alternates.iter().map(|a| opts.for_node(a)))
        .collect();
        type Attempting<'a> = std::pin::Pin<
            Box<
                dyn std::future::Future<Output = (usize, Result<RelayLink, ClientError>)>
                    + Send
                    + 'a,
            >,
        >;
        let start = |i: usize| -> Attempting<'_> {
            let o = &nodes[i];
            Box::pin(async move { (i, Self::connect_one(o).await) })
        };
        let mut pending = futures_util::stream::FuturesUnordered::new();
        let mut errors: Vec<(usize, ClientError)> = Vec::new();
        let mut started = 1;
        pending.push(start(0));
        loop {
            tokio::select! {
                r = pending.next() => match r {
                    Some((_, Ok(link))) => return Ok(link),
                    Some((i, Err(e))) => {
                        tracing::info!(relay = %nodes[i].relay, error = %e, "relay node did not answer");
                        errors.push((i, e));
                        if pending.is_empty() {
                            if started == nodes.len() {
                                break;
                            }
                            pending.push(start(started));
                            started += 1;
                        }
                    }
                    None => break,
                },
                _ = tokio::time::sleep(NODE_STAGGER), if started < nodes.len() => {
                    pending.push(start(started));
                    started += 1;
                }
            }
        }
        errors.sort_by_key(|(i, _)| *i);
        match errors.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Err(ClientError::BadAddress(opts.relay.clone())),
        }
    }

    /// [`RelayLink::connect`] to one node.
    async fn connect_one(opts: &ConnectOptions) -> Result<RelayLink, ClientError> {
        relay_host(&opts.relay)?;
        let won = race(opts).await?;
        let mut link = Self::start(won.endpoint, won.conn, won.addr, opts).await?;
        link.owns_endpoint = true;
        link.port = won.port;
        link.transport.set(won.transport);
        if let Some((guard, socket)) = won.tunnel
            && let Some(tunnel) = guard.disarm()
        {
            tracing::info!(transport = %won.transport, "connected to the relay over TCP");
            let mover = tokio::spawn(move_to_quic(
                link.endpoint.clone(),
                link.conn.clone(),
                opts.clone(),
                tunnel.clone(),
                socket,
                link.transport.clone(),
            ));
            link.tunnel = Some(tunnel);
            link.mover = Some(mover.abort_handle());
        }
        Ok(link)
    }

    /// Like [`RelayLink::connect`], over QUIC only, on an existing endpoint from [`client_endpoint`]
    /// (many links can share one UDP socket: load tools, benchmarks).
    pub async fn connect_on(
        endpoint: &quinn::Endpoint,
        opts: &ConnectOptions,
    ) -> Result<RelayLink, ClientError> {
        let (addr, host) = resolve(&opts.relay, opts.timeout).await?;
        let conn = handshake(endpoint, addr, &host, opts.timeout, &opts.relay).await?;
        Self::start(endpoint.clone(), conn, addr, opts).await
    }

    async fn start(
        endpoint: quinn::Endpoint,
        conn: Connection,
        addr: SocketAddr,
        opts: &ConnectOptions,
    ) -> Result<RelayLink, ClientError> {
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| ClientError::from_connection(&e))?;
        let (tx, events) = mpsc::channel(64);
        let (path_tx, path_info) = tokio::sync::watch::channel(None);
        let (channel_tx, channel) = tokio::sync::watch::channel(None);
        tokio::spawn(reader(conn.clone(), recv, tx, path_tx, channel_tx));
        Ok(RelayLink {
            endpoint,
            conn,
            send,
            events,
            software: opts.software.clone(),
            remote: addr,
            owns_endpoint: false,
            transport: TransportCell::new(Transport::Quic),
            tunnel: None,
            mover: None,
            port: None,
            path_info,
            channel,
        })
    }

    /// Whether the relay speaks the protocol version with direct paths ([`RelayLink::path_info`]
    /// comes, and [`ClientMsg::PathReport`] may be sent).
    pub fn speaks_paths(&self) -> bool {
        tandem_proto::speaks_paths(tandem_net::negotiated_alpn(&self.conn).as_deref())
    }

    /// The UDP socket's direct-path port, when the link runs on a UDP socket of its own (QUIC).
    pub fn direct_port(&self) -> Option<DirectPort> {
        self.port.clone()
    }

    /// What the relay says about this link's path (`None` until it said it; a relay older than
    /// direct paths never does).
    pub fn path_info(&self) -> tokio::sync::watch::Receiver<Option<PathInfo>> {
        self.path_info.clone()
    }

    /// The session's relay channel on this link ([`tandem_net::channel`]): the link's UDP port, the
    /// relay's address, and the token the relay gives after pairing (`None` until then; never from
    /// a relay older than channels, nor on a link that started on TCP).
    pub fn channel(&self) -> Option<LinkChannel> {
        let port = self.port.clone()?;
        if !tandem_proto::speaks_channels(tandem_net::negotiated_alpn(&self.conn).as_deref()) {
            return None;
        }
        Some(LinkChannel {
            port,
            relay: self.conn.remote_address(),
            token: self.channel.clone(),
        })
    }

    /// The relay-channel token the relay gave this link (`None` until paired; see
    /// [`RelayLink::channel`]).
    pub fn channel_token(&self) -> tokio::sync::watch::Receiver<Option<u64>> {
        self.channel.clone()
    }

    /// How the link travels now (it can move from TCP to QUIC while it runs).
    pub fn transport(&self) -> Transport {
        self.transport.get()
    }

    /// A handle that follows [`RelayLink::transport`].
    pub fn transport_cell(&self) -> TransportCell {
        self.transport.clone()
    }

    /// The relay's address.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// Sends one control message.
    pub async fn send(&mut self, msg: &ClientMsg) -> Result<(), ClientError> {
        let frame = encode_frame(msg, MAX_CONTROL_FRAME)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.send
            .write_all(&frame)
            .await
            .map_err(|_| self.closed_error())
    }

    /// Sends raw bytes on the control stream (tests of the relay's input handling).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.send
            .write_all(bytes)
            .await
            .map_err(|_| self.closed_error())
    }

    fn closed_error(&self) -> ClientError {
        match self.conn.close_reason() {
            Some(e) => ClientError::from_connection(&e),
            None => ClientError::Lost("control stream closed".into()),
        }
    }

    /// The next control message from the relay. Cancel-safe.
    pub async fn recv(&mut self) -> Result<RelayMsg, ClientError> {
        match self.events.recv().await {
            Some(r) => r,
            None => Err(self.closed_error()),
        }
    }

    /// Waits for the answer to a request, skipping notifications about an earlier session that may
    /// still be in flight (its end, the peer's suspension) and keep-alive answers.
    async fn reply(&mut self) -> Result<RelayMsg, ClientError> {
        loop {
            match self.recv().await? {
                RelayMsg::Pong { .. }
                | RelayMsg::PeerSuspended { .. }
                | RelayMsg::PeerResumed
                | RelayMsg::SessionEnded { .. }
                | RelayMsg::SlotExpired { .. }
                // Sent again with every registration; only `recv` callers take it.
                | RelayMsg::Revocation { .. } => continue,
                other => return Ok(other),
            }
        }
    }

    /// Asks the relay for its clock. Returns how far the relay's clock is ahead of this computer's
    /// in milliseconds (negative: behind) and the measurement's uncertainty (half the round trip).
    pub async fn clock_offset(&mut self) -> Result<(i64, u64), ClientError> {
        let t0 = unix_ms();
        let nonce = t0;
        self.send(&ClientMsg::Time { nonce }).await?;
        loop {
            match self.reply().await? {
                RelayMsg::Time { nonce: n, unix_ms } if n == nonce => {
                    let t1 = unix_ms_now_after(t0);
                    return Ok(check::clock_offset(t0, t1, unix_ms));
                }
                RelayMsg::Time { .. } => continue,
                RelayMsg::Refused { code, .. } => return Err(ClientError::Refused { code }),
                other => return Err(unexpected(other)),
            }
        }
    }

    /// Agent: asks for a slot; returns it and its lifetime.
    pub async fn register(&mut self) -> Result<(Slot, Duration), ClientError> {
        let client = ClientInfo {
            software: self.software.clone(),
        };
        self.send(&ClientMsg::Register { client }).await?;
        match self.reply().await? {
            RelayMsg::Registered {
                slot,
                expires_in_secs,
            } => Ok((slot, Duration::from_secs(expires_in_secs.into()))),
            RelayMsg::Refused { code, .. } => Err(ClientError::Refused { code }),
            other => Err(unexpected(other)),
        }
    }

    /// Console: authenticates as a technician; returns (technician, organisation).
    pub async fn authenticate(&mut self, token: &Secret) -> Result<(String, String), ClientError> {
        let client = ClientInfo {
            software: self.software.clone(),
        };
        self.send(&ClientMsg::Authenticate {
            token: token.clone(),
            client,
        })
        .await?;
        match self.reply().await? {
            RelayMsg::Authenticated {
                technician,
                organisation,
            } => Ok((technician, organisation)),
            other => Err(unexpected(other)),
        }
    }

    /// Console: joins the agent waiting on `slot`. On success payloads flow; the token resumes the
    /// session on a new connection if this one is lost.
    /// Enrolled agent: comes online as the device of `device` (certificate text), saying
    /// `presence` (signed text), proving the device key with `proof` (over this connection's
    /// exporter: see `tandem_org::prove_announce`). Returns the device id the relay lists it under.
    pub async fn announce(
        &mut self,
        device: String,
        presence: String,
        proof: Vec<u8>,
    ) -> Result<String, ClientError> {
        let client = ClientInfo {
            software: self.software.clone(),
        };
        self.send(&ClientMsg::Announce {
            client,
            device,
            presence,
            proof,
        })
        .await?;
        match self.reply().await? {
            RelayMsg::Online { device } => Ok(device),
            RelayMsg::Refused { code, .. } => Err(ClientError::Refused { code }),
            other => Err(unexpected(other)),
        }
    }

    /// Console: proves an organisation certificate (`proof` over this connection's exporter with
    /// the membership label). Returns the organisation's name and the revocation list the relay
    /// carries, if any (unchecked: the caller checks it).
    pub async fn prove_org(
        &mut self,
        cert: String,
        proof: Vec<u8>,
    ) -> Result<(String, Option<String>), ClientError> {
        self.send(&ClientMsg::ProveOrg { cert, proof }).await?;
        match self.reply().await? {
            RelayMsg::OrgProven {
                organisation,
                revocation,
            } => Ok((organisation, revocation)),
            RelayMsg::Refused { code, message } => {
                Err(ClientError::RefusedBecause { code, message })
            }
            other => Err(unexpected(other)),
        }
    }

    /// Console (proven): one page of the organisation's devices; the entries and the total.
    pub async fn list_devices(
        &mut self,
        query: &str,
        offset: u32,
    ) -> Result<(Vec<tandem_proto::DeviceListing>, u32), ClientError> {
        self.send(&ClientMsg::ListDevices {
            query: query.to_string(),
            offset,
        })
        .await?;
        match self.reply().await? {
            RelayMsg::Devices { entries, total, .. } => Ok((entries, total)),
            RelayMsg::Refused { code, .. } => Err(ClientError::Refused { code }),
            other => Err(unexpected(other)),
        }
    }

    /// Console (proven): pairs with the online device `device`.
    pub async fn connect_device(&mut self, device: &str) -> Result<ResumeToken, ClientError> {
        self.send(&ClientMsg::Connect {
            device: device.to_string(),
        })
        .await?;
        match self.reply().await? {
            RelayMsg::Joined { resume, .. } => Ok(resume),
            RelayMsg::Refused { code, .. } => Err(ClientError::Refused { code }),
            other => Err(unexpected(other)),
        }
    }

    /// Console: pairs with the agent waiting on `slot`. [`ClientError::Redirected`]: the agent
    /// waits on another node of the relay's cluster (connect there and join again).
    pub async fn join(&mut self, slot: &Slot) -> Result<ResumeToken, ClientError> {
        self.send(&ClientMsg::Join { slot: slot.clone() }).await?;
        match self.reply().await? {
            RelayMsg::Joined { resume, .. } => Ok(resume),
            RelayMsg::Refused { code, .. } => Err(ClientError::Refused { code }),
            RelayMsg::Redirect { relay } => Err(ClientError::Redirected { relay }),
            other => Err(unexpected(other)),
        }
    }

    /// Agent: waits until a technician joins; returns (technician, organisation, resume token).
    pub async fn wait_paired(&mut self) -> Result<(String, String, ResumeToken), ClientError> {
        loop {
            match self.recv().await? {
                RelayMsg::Paired {
                    technician,
                    organisation,
                    resume,
                } => return Ok((technician, organisation, resume)),
                RelayMsg::Pong { .. } => continue,
                RelayMsg::SlotExpired { .. } => {
                    return Err(ClientError::Refused {
                        code: ErrorCode::ExpiredSlot,
                    });
                }
                other => return Err(unexpected(other)),
            }
        }
    }

    /// On a fresh link: re-attaches to the session `token` was issued for.
    pub async fn resume(&mut self, token: &ResumeToken) -> Result<(), ClientError> {
        self.send(&ClientMsg::Resume { token: *token }).await?;
        match self.reply().await? {
            RelayMsg::Resumed => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Ends the current session (or gives up the slot), telling the peer why.
    pub async fn end(&mut self, reason: EndReason) -> Result<(), ClientError> {
        self.send(&ClientMsg::End { reason }).await
    }

    /// The QUIC connection to the relay (for DATAGRAM frames).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Largest payload that fits a DATAGRAM frame right now (grows after path MTU discovery).
    pub fn max_datagram_size(&self) -> usize {
        self.conn.max_datagram_size().unwrap_or(0)
    }

    /// Sends a payload as a DATAGRAM frame.
    pub fn send_datagram(&self, payload: Bytes) -> Result<(), ClientError> {
        self.conn
            .send_datagram(payload)
            .map_err(|e| ClientError::Lost(e.to_string()))
    }

    /// Receives a payload DATAGRAM frame.
    pub async fn recv_datagram(&self) -> Result<Bytes, ClientError> {
        self.conn
            .read_datagram()
            .await
            .map_err(|e| ClientError::from_connection(&e))
    }

    /// Opens the large-payload stream towards the peer.
    pub async fn open_payload_stream(&self) -> Result<PayloadSender, ClientError> {
        let s = self
            .conn
            .open_uni()
            .await
            .map_err(|e| ClientError::from_connection(&e))?;
        Ok(PayloadSender { send: s })
    }

    /// Accepts the peer's large-payload stream (relayed).
    pub async fn accept_payload_stream(&self) -> Result<PayloadReceiver, ClientError> {
        let r = self
            .conn
            .accept_uni()
            .await
            .map_err(|e| ClientError::from_connection(&e))?;
        Ok(PayloadReceiver {
            recv: r,
            buf: Vec::new(),
        })
    }

    /// Closes the link politely and waits (bounded) for the relay to acknowledge.
    pub async fn close(mut self) {
        // Let what was written (an End, say) reach the relay before the connection goes: closing
        // a QUIC connection discards unsent stream data.
        if self.send.finish().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.send.stopped()).await;
        }
        self.conn
            .close(VarInt::from_u32(ErrorCode::Normal as u32), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        if let Some(t) = &self.tunnel {
            t.close();
        }
    }
}

/// Longest wait between two tries of QUIC on a link that runs on TCP.
const QUIC_RETRY_MAX: Duration = Duration::from_secs(60);
/// How long a probe handshake over UDP may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the relay has to answer over UDP after the move before the link goes back to TCP.
const MOVE_CONFIRM: Duration = Duration::from_secs(3);
/// After the move, the TCP link stays open this long, and the link goes back to it if UDP stops
/// (a firewall that lets the first packets through, then drops).
const MOVE_WATCH: Duration = Duration::from_secs(10);
/// During the watch, the longest silence on UDP before going back (keep-alives go every 2 s).
const MOVE_SILENCE: Duration = Duration::from_secs(3);

/// While a link runs on TCP: closes the connection at once if the TCP link dies (so that the
/// session resumes on a new link instead of waiting for the idle timeout), and tries QUIC now and
/// then. A probe handshake over UDP (pinned, as every handshake) tells whether UDP gets through;
/// then the endpoint moves to a UDP socket (a QUIC connection migration: nothing ends). The move
/// counts only once packets from the relay's address arrive on that socket within
/// [`MOVE_CONFIRM`] and keep arriving for [`MOVE_WATCH`]; otherwise the link goes back to TCP.
async fn move_to_quic(
    endpoint: quinn::Endpoint,
    conn: Connection,
    opts: ConnectOptions,
    tunnel: Arc<Link>,
    tunnel_socket: Arc<MuxSocket>,
    cell: TransportCell,
) {
    let mut wait = opts.quic_retry;
    // Only with automatic transports, and only when the relay's QUIC address is known.
    let auto = opts.transports == Transports::Auto
        && !tandem_net::tunnel::is_link_address(conn.remote_address());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait), if auto => {}
            _ = tunnel.closed() => {
                tracing::info!("the TCP link to the relay closed");
                conn.close(VarInt::from_u32(ErrorCode::Normal as u32), b"TCP link closed");
                return;
            }
            _ = conn.closed() => {
                tunnel.close();
                return;
            }
        }
        wait = (wait * 2).min(QUIC_RETRY_MAX);
        let Some(addr) = probe_udp(&opts).await else {
            tracing::debug!(next_secs = wait.as_secs(), "UDP to the relay still blocked");
            continue;
        };
        let local: SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let udp = match tandem_net::bind_udp(local).and_then(|u| {
            MuxSocket::with_udp_from(u, Hub::client(QueueLimits::default()), addr)
                .map_err(tandem_net::NetError::Endpoint)
        }) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open a UDP socket to move to QUIC");
                continue;
            }
        };
        // The connection keeps its remote address across the move: it must be the relay's.
        if !same_addr(conn.remote_address(), addr) {
            tracing::debug!("the relay's UDP address is not the link's; staying on TCP");
            continue;
        }
        if endpoint.rebind_abstract(udp.clone()).is_err() {
            continue;
        }
        if udp_keeps_answering(&udp).await {
            cell.set(Transport::Quic);
            tracing::info!("the link to the relay moved from TCP to QUIC");
            tunnel.close();
            return;
        }
        tracing::info!("UDP to the relay did not hold after the move: back to TCP");
        let _ = endpoint.rebind_abstract(tunnel_socket.clone());
    }
}

fn same_addr(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// Whether packets from the relay arrive on `udp` within [`MOVE_CONFIRM`] and then with no gap
/// longer than [`MOVE_SILENCE`] until [`MOVE_WATCH`] has passed.
async fn udp_keeps_answering(udp: &MuxSocket) -> bool {
    let start = tokio::time::Instant::now();
    let mut last_count = 0;
    let mut last_at = start;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = tokio::time::Instant::now();
        let count = udp.udp_received();
        if count > last_count {
            last_count = count;
            last_at = now;
        }
        let limit = if last_count == 0 {
            MOVE_CONFIRM
        } else {
            MOVE_SILENCE
        };
        if now.duration_since(last_at) > limit {
            return false;
        }
        if now.duration_since(start) >= MOVE_WATCH {
            return true;
        }
    }
}

/// The relay's UDP address, when a QUIC handshake with it over UDP completes now.
async fn probe_udp(opts: &ConnectOptions) -> Option<SocketAddr> {
    let (addr, host) = resolve(&opts.relay, PROBE_TIMEOUT).await.ok()?;
    let endpoint = client_endpoint(opts, addr).ok()?;
    let ok = match handshake(&endpoint, addr, &host, PROBE_TIMEOUT, &opts.relay).await {
        Ok(c) => {
            c.close(VarInt::from_u32(ErrorCode::Normal as u32), b"probe");
            true
        }
        Err(_) => false,
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
    ok.then_some(addr)
}

fn unexpected(m: RelayMsg) -> ClientError {
    match m {
        RelayMsg::Refused { code, .. } => ClientError::Refused { code },
        RelayMsg::ShuttingDown => ClientError::Closed {
            code: Some(ErrorCode::ShuttingDown),
            reason: ErrorCode::ShuttingDown.explain().into(),
        },
        other => ClientError::Protocol(format!("{other:?}")),
    }
}

async fn reader(
    conn: Connection,
    mut recv: RecvStream,
    tx: mpsc::Sender<Incoming>,
    path: tokio::sync::watch::Sender<Option<PathInfo>>,
    channel: tokio::sync::watch::Sender<Option<u64>>,
) {
    let mut header = [0u8; FRAME_HEADER];
    let err = |conn: &Connection| match conn.close_reason() {
        Some(e) => ClientError::from_connection(&e),
        None => ClientError::Lost("control stream closed by the relay".into()),
    };
    loop {
        if recv.read_exact(&mut header).await.is_err() {
            // Wait for the connection to finish closing so that the reason is known.
            let e = conn.closed().await;
            let _ = tx.send(Err(ClientError::from_connection(&e))).await;
            return;
        }
        let len = match frame_len(header, MAX_CONTROL_FRAME) {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(ClientError::Protocol(e.to_string()))).await;
                conn.close(
                    VarInt::from_u32(ErrorCode::Oversized as u32),
                    b"oversized frame",
                );
                return;
            }
        };
        let mut body = vec![0u8; len];
        if recv.read_exact(&mut body).await.is_err() {
            let _ = tx.send(Err(err(&conn))).await;
            return;
        }
        let msg = decode_body::<RelayMsg>(&body).map_err(|e| ClientError::Protocol(e.to_string()));
        if let Ok(RelayMsg::PathInfo {
            observed,
            direct_allowed,
        }) = &msg
        {
            path.send_replace(Some(PathInfo {
                observed: *observed,
                direct_allowed: *direct_allowed,
            }));
            continue;
        }
        if let Ok(RelayMsg::Channel { token }) = &msg {
            channel.send_replace(Some(*token));
            continue;
        }
        let fatal = msg.is_err();
        if tx.send(msg).await.is_err() || fatal {
            return;
        }
    }
}

/// Writes length-prefixed payloads on the large-payload stream.
pub struct PayloadSender {
    send: SendStream,
}

impl PayloadSender {
    pub async fn send(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        if payload.len() > MAX_PAYLOAD_FRAME {
            return Err(ClientError::Protocol(format!(
                "payload of {} bytes exceeds {MAX_PAYLOAD_FRAME}",
                payload.len()
            )));
        }
        let len = (payload.len() as u32).to_be_bytes();
        self.send
            .write_all(&len)
            .await
            .map_err(|e| ClientError::Lost(e.to_string()))?;
        self.send
            .write_all(payload)
            .await
            .map_err(|e| ClientError::Lost(e.to_string()))
    }

    /// Sends raw bytes (tests of the relay's limits).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.send
            .write_all(bytes)
            .await
            .map_err(|e| ClientError::Lost(e.to_string()))
    }

    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}

/// Reads length-prefixed payloads from the peer's large-payload stream.
pub struct PayloadReceiver {
    recv: RecvStream,
    buf: Vec<u8>,
}

impl PayloadReceiver {
    /// The next payload, or `None` when the peer finished the stream.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, ClientError> {
        let mut header = [0u8; FRAME_HEADER];
        match self.recv.read_exact(&mut header).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(e) => return Err(ClientError::Lost(e.to_string())),
        }
        let len = frame_len(header, MAX_PAYLOAD_FRAME)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.buf.resize(len, 0);
        self.recv
            .read_exact(&mut self.buf)
            .await
            .map_err(|e| ClientError::Lost(e.to_string()))?;
        Ok(Some(Bytes::copy_from_slice(&self.buf)))
    }
}

/// How the terminal programs report what happens: one line of text per event for a person, or one
/// JSON object per line (`{"event": kind, "message": text, …}`) for scripts and tests.
#[derive(Clone, Copy, Debug)]
pub struct EventOut {
    pub json: bool,
}

impl EventOut {
    /// Prints one event; `extra` (a JSON object) adds fields in JSON mode.
    pub fn event(&self, kind: &str, text: &str, extra: serde_json::Value) {
        use std::io::Write;
        if self.json {
            let mut v = serde_json::json!({"event": kind, "message": text});
            if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
                o.extend(e);
            }
            println!("{v}");
        } else {
            println!("{text}");
        }
        let _ = std::io::stdout().flush();
    }
}

/// This computer's clock in milliseconds since the Unix epoch (0 before 1970).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The clock now, never before `t0` (the wall clock may step back while we wait).
fn unix_ms_now_after(t0: u64) -> u64 {
    unix_ms().max(t0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_list_is_split_and_redirects_are_trusted_like_the_relay() {
        let pin = RelayTrust::Pin(tandem_certs::Fingerprint::of(b"relay"));
        let o = ConnectOptions::new("n1.example.com:4433, n2.example.com:4433,", pin);
        assert_eq!(o.relay, "n1.example.com:4433");
        assert_eq!(o.alternates, vec!["n2.example.com:4433".to_string()]);
        let n2 = o.for_node("n2.example.com:4433");
        assert_eq!(
            (n2.relay.as_str(), n2.alternates.len()),
            ("n2.example.com:4433", 0)
        );
        assert_eq!(n2.tcp, default_tcp_targets("n2.example.com:4433"));
        // Pinned: only the cluster's key answers anywhere, so any node may be named.
        assert!(o.accepts_redirect("n9.example.com:4433"));
        // A CA (perhaps a public one): only the nodes the client was given.
        let ca = RelayTrust::Ca {
            path: "ca.pem".into(),
            roots: Vec::new(),
        };
        let o = ConnectOptions::new("n1.example.com:4433,n2.example.com:4433", ca);
        assert!(o.accepts_redirect("N2.example.com:4433"));
        assert!(!o.accepts_redirect("attacker.example.net:4433"));
    }
}
