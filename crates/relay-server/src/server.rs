//! The relay's I/O: a quinn endpoint driving the pure [`Registry`], forwarding payloads blind, writing
//! the audit log and serving metrics.
//!
//! Tasks per connection: one, which reads this connection's control stream (and the handshake
//! deadline) and writes what other tasks queue for this connection. Per paired session: one datagram
//! forwarder and one payload-stream forwarder per direction, aborted when the session ends. One audit
//! writer and one housekeeping ticker for the whole relay.
//!
//! Against strangers:
//! * Every connection attempt whose source address QUIC has not validated is answered with a Retry
//!   (stateless: the relay keeps nothing for it) and counted nowhere; only a peer that echoes the
//!   Retry token, and so receives at its address, reaches the registry's limits. Forged source
//!   addresses therefore cannot fill the per-address limit of someone else's address. The price is
//!   one round trip more per connection (measured in `tests/benches/relay.rs`).
//! * A connection starts small ([`tandem_net::relay_transport_config`]): one control stream, no
//!   payload streams, 32 KiB of stream data in flight; DATAGRAMs that arrive while it has no running
//!   session are read and dropped. Pairing widens it, the session's end narrows it again.
//! * Logins: a token whose id names no technician is refused after a primary-key lookup; only a
//!   known id's secret is hashed (Argon2id, two threads), and at most [`Limits::auth_queue`] wait
//!   for it; beyond that the answer is [`ErrorCode::Busy`] with "retry in N s".
//! * Log lines a stranger can cause are rate-limited ([`LogLimiter`]); client-chosen strings are
//!   logged escaped and truncated, and only where an attempt budget bounds them.

use crate::channel::{Channels, Dropped, Leg};
use crate::devices::DeviceBook;
use crate::directory::Directory;
use crate::metrics::Metrics;
use crate::registry::{
    Bucket, Closed, ConnId, Ended, LimitHit, Limits, Paired, Refusal, Registry, Role, Session,
    SessionId, SlotRng, Technician,
};
use crate::store::{
    AuthOutcome, Candidate, SessionStart, Store, StoreError, StoreLocation, TokenSecret,
};
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use ring::rand::{SecureRandom, SystemRandom};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tandem_certs::RelayIdentity;
use tandem_net::Transport;
use tandem_net::tunnel::{Hub, MuxSocket, QueueLimits};
use tandem_proto::{
    ALPN, ClientMsg, EndReason, ErrorCode, FRAME_HEADER, FrameDecoder, MAX_CONTROL_FRAME,
    MAX_PAYLOAD_FRAME, ProtoError, RelayMsg, ResumeToken, Slot, busy_reason, decode_body,
    encode_frame, frame_len,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};

/// How the relay runs (the binary fills this from its TOML file, flags and environment).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// UDP address of the QUIC listener.
    pub listen: SocketAddr,
    /// TCP front (TLS over TCP, WebSocket).
    pub tcp: crate::tcp::TcpConfig,
    /// TCP address of `/metrics` and `/health` (keep it local); `None` disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// The data directory (the published revocation list; the SQLite store by default).
    pub data_dir: PathBuf,
    /// Where technicians, devices and the audit log live: SQLite (a lone relay) or PostgreSQL
    /// (shared by the nodes of a cluster).
    pub store: StoreLocation,
    /// This relay's name among the nodes sharing a store (in audit and device rows); empty for a
    /// lone relay.
    pub node: String,
    /// With a PostgreSQL store: this node's address for agents and consoles (`host:port`), where
    /// other nodes send the consoles of codes this node holds. Required then.
    pub advertise: Option<String>,
    pub limits: Limits,
    /// How long shutdown waits for peers to acknowledge the close.
    pub drain_timeout: Duration,
    /// How many enrolled devices are kept, from where, for how long, of which organisations.
    pub devices: crate::devices::DeviceLimits,
    /// Whether sessions may leave the relay for a direct path (told to both sides in
    /// [`RelayMsg::PathInfo`]; `false` is the operator's "relay only").
    pub allow_direct: bool,
}

/// The revocation list published in `<data_dir>/revocation` (`tandem-org revoke --list …`, copied
/// there by the administrator), read at each registration so that a new one goes out at once.
/// Ignored (with a warning) when it is not one line of printable text within the limit.
async fn published_revocation(data_dir: &std::path::Path) -> Option<String> {
    let path = data_dir.join("revocation");
    let bytes = match tokio::fs::read(&path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the revocation list");
            return None;
        }
    };
    let text = String::from_utf8_lossy(&bytes).trim().to_string();
    let ok = text.starts_with("tandem-revocation-v1:")
        && text.len() <= tandem_proto::MAX_REVOCATION_TEXT
        && text.bytes().all(|b| b.is_ascii_graphic());
    if !ok {
        tracing::warn!(file = %path.display(), "not a revocation list (from `tandem-org revoke`); not sent");
        return None;
    }
    Some(text)
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Certs(#[from] tandem_certs::CertError),
    #[error(transparent)]
    Net(#[from] tandem_net::NetError),
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
    #[error("cannot listen on TCP {addr}: {source}")]
    TcpListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bind metrics listener on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Cluster(String),
}

/// A message other tasks queue for a connection (boxed: the queue's slots stay pointer-sized, which
/// matters with thousands of idle connections).
type Outbound = Box<RelayMsg>;

struct ConnHandle {
    conn: Connection,
    tx: mpsc::Sender<Outbound>,
    /// Set while forwarders read this connection's DATAGRAMs; otherwise its own task drops them.
    forwarding: Arc<AtomicBool>,
}

/// Per-direction byte counters of a session.
#[derive(Default)]
struct SessionBytes {
    agent_to_console: AtomicU64,
    console_to_agent: AtomicU64,
    /// What each side last reported of its direct path ([`ClientMsg::PathReport`]).
    direct: Mutex<DirectReports>,
}

/// Most bytes per second a side's direct-path report may add (10 Gbit/s).
const DIRECT_BYTES_PER_SECOND: u64 = 1_250_000_000;

/// The two sides' reports of their direct paths in one session (their word only).
struct DirectReports {
    started: Instant,
    went_direct: bool,
    /// Bytes sent on direct paths, per side (agent, console), as last reported.
    agent_bytes: u64,
    console_bytes: u64,
}

impl Default for DirectReports {
    fn default() -> Self {
        DirectReports {
            started: Instant::now(),
            went_direct: false,
            agent_bytes: 0,
            console_bytes: 0,
        }
    }
}

struct SessionIo {
    tasks: Vec<AbortHandle>,
    bytes: Arc<SessionBytes>,
    /// The tokens of the session's relay channel, while it has one.
    channel: Option<[u64; 2]>,
    /// The byte counts last written into the audit row (cluster nodes).
    checkpointed: (u64, u64),
}

enum AuditOp {
    DeviceOnline(Box<crate::store::DeviceRow>),
    DeviceOffline {
        id: String,
        last_seen: i64,
    },
    ForgetDevices(Vec<String>),
    /// A technician logged in (its `last_login_at`).
    Login {
        technician: crate::registry::TechnicianId,
        unix_secs: i64,
    },
    Start {
        session: SessionId,
        technician: Technician,
        slot: String,
        agent_addr: String,
        console_addr: String,
    },
    /// A running session's bytes so far (cluster nodes, every [`AUDIT_PROGRESS_EVERY`]).
    Progress {
        session: SessionId,
        agent_to_console: u64,
        console_to_agent: u64,
    },
    End {
        session: SessionId,
        agent_to_console: u64,
        console_to_agent: u64,
        reason: String,
        /// Bytes sent on direct paths, if the session went direct.
        direct: Option<u64>,
    },
}

struct OsRng(SystemRandom);
impl OsRng {
    fn token(&mut self) -> ResumeToken {
        let mut t = [0u8; 16];
        // As above: the OS generator does not fail on Linux; a zero token would only let someone
        // re-attach a relay-level link, never read the end-to-end session.
        let _ = self.0.fill(&mut t);
        ResumeToken(t)
    }
}

impl SlotRng for OsRng {
    fn below(&mut self, n: u64) -> u64 {
        // Rejection sampling for a uniform value; the OS generator does not fail on Linux, and if it
        // ever did, 0 still yields a valid (if predictable) slot: the secret, not the slot, protects.
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let mut b = [0u8; 8];
            if self.0.fill(&mut b).is_err() {
                return 0;
            }
            let v = u64::from_le_bytes(b);
            if v < zone {
                return v % n;
            }
        }
    }
}

struct Shared {
    registry: Mutex<Registry>,
    conns: Mutex<HashMap<ConnId, ConnHandle>>,
    sessions: Mutex<HashMap<SessionId, SessionIo>>,
    rng: Mutex<OsRng>,
    auth: AuthPool,
    audit_tx: mpsc::UnboundedSender<AuditOp>,
    metrics: Arc<Metrics>,
    limits: Limits,
    draining: AtomicBool,
    /// Refused connections whose handshake runs so that the client hears why (at most
    /// [`MAX_EXPLAINING`]; beyond that they are refused before any TLS).
    explaining: std::sync::atomic::AtomicUsize,
    /// Where a published revocation list is read from (`<data_dir>/revocation`).
    data_dir: PathBuf,
    log_limit: Mutex<LogLimiter>,
    /// TCP links of the endpoint (who is behind a link address).
    hub: Arc<Hub>,
    /// Enrolled devices seen (online or not).
    devices: Mutex<DeviceBook>,
    /// Whether sessions may go direct ([`ServerConfig::allow_direct`]).
    allow_direct: bool,
    /// Relay channels, forwarded by the endpoint socket's receive path.
    channels: Arc<Channels<Connection>>,
    /// Whether the store answers (for `/health`).
    store_health: Arc<StoreHealth>,
    /// A cluster node's slot directory (PostgreSQL store); `None` for a lone relay.
    directory: Option<Directory>,
}

/// The stores [`start`] opens, and what it read from them.
struct OpenedStores {
    audit: Store,
    auth: Vec<Store>,
    watch: Store,
    dangling: u64,
    devices: Vec<crate::store::DeviceRow>,
    directory: Option<Directory>,
}

/// What a login is told to wait while the store does not answer.
const STORE_RETRY_SECS: u32 = 5;
/// How often the store is asked whether it answers.
const STORE_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Whether the store answered its last check. Forwarding never waits for the store: while it is
/// unreachable, paired sessions go on, audit rows wait in the writer's queue, and only what needs
/// it (logins, new audit rows) fails or waits.
pub(crate) struct StoreHealth {
    engine: &'static str,
    up: AtomicBool,
    error: Mutex<Option<String>>,
}

impl StoreHealth {
    fn new(engine: &'static str) -> Self {
        StoreHealth {
            engine,
            up: AtomicBool::new(true),
            error: Mutex::new(None),
        }
    }

    /// Checks the store every [`STORE_CHECK_INTERVAL`] on a thread of its own, until the relay
    /// that holds `health` is gone.
    fn watch(
        health: Arc<StoreHealth>,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Result<(), ServerError> {
        metrics.store_up.set(1);
        let weak = Arc::downgrade(&health);
        drop(health);
        std::thread::Builder::new()
            .name("tandem-store-watch".into())
            .spawn(move || {
                loop {
                    for _ in 0..STORE_CHECK_INTERVAL.as_secs() {
                        std::thread::sleep(Duration::from_secs(1));
                        if weak.strong_count() == 0 {
                            return;
                        }
                    }
                    let r = store.ping();
                    let Some(h) = weak.upgrade() else { return };
                    let up = r.is_ok();
                    if h.up.swap(up, Ordering::SeqCst) != up {
                        match &r {
                            Ok(()) => tracing::info!("the store answers again"),
                            Err(e) => tracing::error!(error = %e, "the store does not answer; sessions go on, logins fail until it is back"),
                        }
                    }
                    *lock(&h.error) = r.err().map(|e| e.to_string());
                    metrics.store_up.set(up as i64);
                }
            })
            .map(|_| ())
            .map_err(|e| ServerError::Quic(format!("cannot start the store's check thread: {e}")))
    }

    pub(crate) fn engine(&self) -> &'static str {
        self.engine
    }
    pub(crate) fn up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }
    pub(crate) fn error(&self) -> Option<String> {
        lock(&self.error).clone()
    }
}

/// Log lines that strangers can cause (connections, refusals, registrations): at most
/// [`LogLimiter::BURST`] at once and [`LogLimiter::PER_SECOND`] a second; the lines held back are
/// counted, and the count goes out with the next line that passes (and to a metric).
struct LogLimiter {
    bucket: Bucket,
    suppressed: u64,
}

impl LogLimiter {
    const BURST: f64 = 50.0;
    const PER_SECOND: f64 = 10.0;
    fn new(now: Instant) -> Self {
        LogLimiter {
            bucket: Bucket::new(Self::BURST, now),
            suppressed: 0,
        }
    }
    /// `Some(lines suppressed since the last one)` if a line may be written now.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.bucket.take(Self::BURST, Self::PER_SECOND, now) {
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// Whether a stranger-caused log line may be written; `Some(suppressed before it)` if so.
fn may_log(shared: &Shared) -> Option<u64> {
    let r = lock(&shared.log_limit).allow(Instant::now());
    if r.is_none() {
        shared.metrics.log_lines_suppressed.inc();
    }
    r
}

/// A client-chosen string as it may appear in a log line: at most 64 characters, escaped by `?`.
fn loggable(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Locks a mutex, recovering from poisoning (a panicking task must not take the relay down).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Snapshot of the relay's counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub connections: usize,
    pub sessions: usize,
    pub agents_waiting: usize,
}

/// A running relay.
pub struct RelayHandle {
    addr: SocketAddr,
    tcp_addrs: Vec<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    stop_tx: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
    audit_task: JoinHandle<()>,
    drain_timeout: Duration,
}

impl RelayHandle {
    /// The UDP address the relay listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// The TCP addresses of the TLS-over-TCP and WebSocket front.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }
    /// The TCP address of `/metrics` and `/health`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }
    pub fn stats(&self) -> Stats {
        stats(&self.shared)
    }

    /// Drains: stops accepting, ends every session with [`EndReason::RelayShutdown`], tells every peer
    /// and closes its connection, waits (bounded) for the closes to be acknowledged, flushes the audit
    /// log.
    pub async fn shutdown(self) {
        tracing::info!("draining: no new connections, telling peers");
        self.shared.draining.store(true, Ordering::SeqCst);
        let _ = self.stop_tx.send(true);
        self.endpoint.set_server_config(None);
        let now = Instant::now();
        let ids = lock(&self.shared.registry).session_ids();
        for id in ids {
            let ended = lock(&self.shared.registry).end_by_relay(id, EndReason::RelayShutdown, now);
            if let Some(session) = ended {
                finish_session_io(&self.shared, session.id, &EndReason::RelayShutdown);
            }
        }
        let handles: Vec<(mpsc::Sender<Outbound>, Connection)> = lock(&self.shared.conns)
            .values()
            .map(|h| (h.tx.clone(), h.conn.clone()))
            .collect();
        for (tx, _) in &handles {
            let _ = tx.try_send(Box::new(RelayMsg::ShuttingDown));
        }
        // A moment for the notices to go out; the close code says the same if one does not.
        if !handles.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (_, conn) in &handles {
            close(conn, ErrorCode::ShuttingDown, "the relay is shutting down");
        }
        let _ = tokio::time::timeout(self.drain_timeout, self.endpoint.wait_idle()).await;
        self.accept_task.abort();
        // Every connection task has ended (or been told to); dropping the shared state closes the
        // audit channel once they are gone, then the writer finishes.
        let audit_task = self.audit_task;
        drop(self.shared);
        let _ = tokio::time::timeout(AUDIT_FLUSH_GRACE + Duration::from_secs(2), audit_task).await;
        tracing::info!("relay stopped");
    }
}

fn stats(shared: &Shared) -> Stats {
    let r = lock(&shared.registry);
    Stats {
        connections: r.connection_count(),
        sessions: r.session_count(),
        agents_waiting: r.waiting_count(),
    }
}

/// A TCP listener with address reuse (a restarted relay binds at once) and a deep backlog.
fn tcp_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        let _ = sock.set_only_v6(false);
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    tokio::net::TcpListener::from_std(sock.into())
}

fn close(conn: &Connection, code: ErrorCode, reason: &str) {
    conn.close(VarInt::from_u32(code as u32), reason.as_bytes());
}

/// Starts the relay: opens the store (closing audit rows a crash left open), binds the QUIC endpoint
/// and the metrics listener, and spawns the accept loop.
pub async fn start(
    cfg: ServerConfig,
    identity: &RelayIdentity,
) -> Result<RelayHandle, ServerError> {
    let metrics = Arc::new(Metrics::new());
    // Opening a PostgreSQL store blocks (connect, migrate): on a blocking thread. Every thread that
    // uses the store gets a connection of its own.
    let cluster = match (&cfg.store, &cfg.advertise) {
        (StoreLocation::Postgres(_), Some(a)) if !cfg.node.is_empty() => Some(a.clone()),
        (StoreLocation::Postgres(_), _) => {
            return Err(ServerError::Cluster(
                "a relay on a PostgreSQL store is a cluster node: give it a node name and the \
                 address clients reach it at (node = \"relay-1\", advertise = \"relay1.example.com:4433\")"
                    .into(),
            ));
        }
        _ => None,
    };
    let (location, node) = (cfg.store.clone(), cfg.node.clone());
    let opened = tokio::task::spawn_blocking(move || -> Result<OpenedStores, StoreError> {
        let open = || Store::open_at(&location).map(|s| s.with_node(&node));
        let directory = match &cluster {
            Some(address) => Some(Directory::start(open()?, &node, address)?),
            None => None,
        };
        let audit = open()?;
        let dangling = audit.close_dangling()?;
        audit.devices_all_offline()?;
        let devices = audit.devices()?;
        // Login times are written from the audit queue, off the login's path.
        let auth = (0..=AUTH_THREADS)
            .map(|_| open().map(Store::with_deferred_logins))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(OpenedStores {
            audit,
            auth,
            watch: open()?,
            dangling,
            devices,
            directory,
        })
    })
    .await
    .map_err(|e| ServerError::Quic(format!("the store's thread failed: {e}")))??;
    tracing::info!(store = %cfg.store, node = %cfg.node, "store open");
    let OpenedStores {
        audit: audit_store,
        auth: auth_stores,
        watch: watch_store,
        dangling,
        devices,
        directory,
    } = opened;
    let auth = AuthPool::start(auth_stores, cfg.limits.auth_queue, metrics.clone())?;
    let devices = DeviceBook::load(devices, cfg.devices.clone());
    if dangling > 0 {
        tracing::warn!(
            sessions = dangling,
            "closed audit rows left open by a relay that stopped without draining"
        );
    }
    let store_health = Arc::new(StoreHealth::new(cfg.store.engine()));
    StoreHealth::watch(store_health.clone(), watch_store, metrics.clone())?;
    let mut tls = tandem_certs::server_config(identity, ALPN)?;
    tls.alpn_protocols = tandem_proto::ALPNS.iter().map(|a| a.to_vec()).collect();
    let quic_tls = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| ServerError::Quic(e.to_string()))?;
    let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(quic_tls));
    server_cfg.transport_config(Arc::new(tandem_net::relay_transport_config()));
    // Connection attempts are retried or accepted as soon as they arrive; little needs buffering.
    server_cfg.incoming_buffer_size(64 * 1024);
    server_cfg.incoming_buffer_size_total(16 * 1024 * 1024);
    // One endpoint for every transport: its socket carries the UDP socket and the TCP links.
    let hub = Hub::server(cfg.listen.is_ipv6(), QueueLimits::default());
    let drops = &metrics.dropped_datagrams;
    let channels = Arc::new(Channels::new(crate::channel::DropCounters {
        malformed: Metrics::reason(drops, Dropped::Malformed.label()),
        unknown_token: Metrics::reason(drops, Dropped::UnknownToken.label()),
        wrong_source: Metrics::reason(drops, Dropped::WrongSource.label()),
        rate_limited: Metrics::reason(drops, Dropped::RateLimited.label()),
        send_failed: Metrics::reason(drops, "channel_send_failed"),
    }));
    let socket = MuxSocket::with_udp_tap(
        tandem_net::bind_udp(cfg.listen)?,
        hub.clone(),
        channels.clone(),
    )
    .map_err(|e| ServerError::Net(tandem_net::NetError::Endpoint(e)))?;
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        tandem_net::relay_endpoint_config(),
        Some(server_cfg),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| ServerError::Net(tandem_net::NetError::Endpoint(e)))?;
    let addr = endpoint
        .local_addr()
        .map_err(|e| ServerError::Net(tandem_net::NetError::Endpoint(e)))?;
    let mut tcp_listeners = Vec::new();
    for a in &cfg.tcp.listen {
        // Port 0 means "the UDP port's number" (tests, and the default of the binary).
        let a = if a.port() == 0 {
            SocketAddr::new(a.ip(), addr.port())
        } else {
            *a
        };
        let l = tcp_listener(a).map_err(|source| ServerError::TcpListen { addr: a, source })?;
        tcp_listeners.push(l);
    }

    let (audit_tx, audit_rx) = mpsc::unbounded_channel();
    let audit_metrics = metrics.clone();
    let audit_task =
        tokio::task::spawn_blocking(move || audit_writer(audit_store, audit_rx, audit_metrics));
    let shared = Arc::new(Shared {
        registry: Mutex::new(Registry::new(cfg.limits.clone())),
        conns: Mutex::new(HashMap::new()),
        sessions: Mutex::new(HashMap::new()),
        rng: Mutex::new(OsRng(SystemRandom::new())),
        auth,
        audit_tx,
        metrics: metrics.clone(),
        limits: cfg.limits.clone(),
        draining: AtomicBool::new(false),
        explaining: std::sync::atomic::AtomicUsize::new(0),
        data_dir: cfg.data_dir.clone(),
        log_limit: Mutex::new(LogLimiter::new(Instant::now())),
        hub: hub.clone(),
        devices: Mutex::new(devices),
        allow_direct: cfg.allow_direct,
        channels,
        store_health,
        directory,
    });
    let (stop_tx, stop_rx) = watch::channel(false);

    let metrics_addr = match cfg.metrics_listen {
        Some(a) => Some(crate::http::serve(a, shared_view(&shared), stop_rx.clone()).await?),
        None => None,
    };

    let mut tcp_addrs = Vec::new();
    if !tcp_listeners.is_empty() {
        let front = crate::tcp::Front::new(
            hub,
            crate::tcp::tls_config(identity)?,
            cfg.tcp.clone(),
            metrics.clone(),
        );
        for l in tcp_listeners {
            if let Ok(a) = l.local_addr() {
                tracing::info!(addr = %a, "relay listening on TCP (TLS, WebSocket)");
                tcp_addrs.push(a);
            }
            tokio::spawn(crate::tcp::serve(l, front.clone(), stop_rx.clone()));
        }
    }
    tokio::spawn(ticker(Arc::downgrade(&shared), stop_rx.clone()));
    let accept_task = tokio::spawn(accept_loop(endpoint.clone(), shared.clone(), stop_rx));
    tracing::info!(%addr, "relay listening");
    Ok(RelayHandle {
        addr,
        tcp_addrs,
        metrics_addr,
        shared,
        endpoint,
        stop_tx,
        accept_task,
        audit_task,
        drain_timeout: cfg.drain_timeout,
    })
}

/// What the HTTP endpoint needs to see.
pub(crate) struct View {
    shared: std::sync::Weak<Shared>,
    metrics: Arc<Metrics>,
}
impl View {
    pub(crate) fn metrics_text(&self) -> String {
        if let Some(s) = self.shared.upgrade() {
            refresh_gauges(&s);
        }
        self.metrics.encode()
    }
    pub(crate) fn health(&self) -> Option<(bool, Stats, Arc<StoreHealth>)> {
        let s = self.shared.upgrade()?;
        Some((
            !s.draining.load(Ordering::SeqCst),
            stats(&s),
            s.store_health.clone(),
        ))
    }
}
fn shared_view(shared: &Arc<Shared>) -> Arc<View> {
    Arc::new(View {
        shared: Arc::downgrade(shared),
        metrics: shared.metrics.clone(),
    })
}

fn refresh_gauges(shared: &Shared) {
    let (s, probation, quarantined, online) = {
        let r = lock(&shared.registry);
        (
            Stats {
                connections: r.connection_count(),
                sessions: r.session_count(),
                agents_waiting: r.waiting_count(),
            },
            r.probation_count(),
            r.quarantined_count(),
            r.device_count(),
        )
    };
    let known = lock(&shared.devices).len();
    let m = &shared.metrics;
    m.connections.set(s.connections as i64);
    m.sessions.set(s.sessions as i64);
    m.agents_waiting.set(s.agents_waiting as i64);
    m.connections_on_probation.set(probation as i64);
    m.slots_quarantined.set(quarantined as i64);
    m.devices_online.set(online as i64);
    m.devices_known.set(known as i64);
    m.auth_queue.set(shared.auth.queued() as i64);
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => return },
            _ = stop.changed() => return,
        };
        // Address validation before anything is counted or spawned: an unvalidated source gets a
        // Retry (stateless) and nothing else. Always, not only under load: a forged address costs
        // the relay nothing and never reaches a limit, and "under load" would itself be a limit
        // that forged addresses could fill.
        // A TCP link's address was validated by TCP itself: no Retry round trip for it. An
        // attempt whose link is already gone is dropped (it could never complete, and would be
        // counted under no real address).
        let over_tcp = tandem_net::tunnel::is_link_address(incoming.remote_address());
        if over_tcp && shared.hub.link(&incoming.remote_address()).is_none() {
            incoming.ignore();
            continue;
        }
        if !incoming.remote_address_validated() && !over_tcp {
            if incoming.may_retry() {
                match incoming.retry() {
                    Ok(()) => {
                        shared.metrics.retries_sent.inc();
                    }
                    Err(e) => e.into_incoming().ignore(),
                }
            } else {
                incoming.ignore();
            }
            continue;
        }
        tokio::spawn(serve_incoming(shared.clone(), incoming));
    }
}

async fn ticker(shared: std::sync::Weak<Shared>, mut stop: watch::Receiver<bool>) {
    let mut iv = tokio::time::interval(Duration::from_millis(500));
    // Not at once: devices that were online before a restart come back first.
    let mut next_sweep = Instant::now() + DEVICE_SWEEP;
    let mut next_progress = Instant::now() + AUDIT_PROGRESS_EVERY;
    loop {
        tokio::select! {
            _ = iv.tick() => {}
            _ = stop.changed() => return,
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let tick = lock(&shared.registry).tick(Instant::now());
        for e in tick.expired {
            notify(&shared, e.agent, RelayMsg::SlotExpired { slot: e.slot });
        }
        for e in tick.ended {
            finish_session(&shared, e);
        }
        // Agents with no code and no session for a while: closed (their task then takes them
        // out of the registry, which frees their counts).
        for id in tick.idle_agents {
            let conn = lock(&shared.conns).get(&id).map(|h| h.conn.clone());
            if let Some(conn) = conn {
                shared.metrics.limit("idle_agent");
                close(
                    &conn,
                    ErrorCode::IdleTimeout,
                    "no code and no session for 30 s",
                );
            }
        }
        if Instant::now() >= next_sweep {
            next_sweep = Instant::now() + DEVICE_SWEEP;
            forget_stale_devices(&shared);
        }
        if shared.directory.is_some() && Instant::now() >= next_progress {
            next_progress = Instant::now() + AUDIT_PROGRESS_EVERY;
            audit_progress(&shared);
        }
        shared.channels.refresh(Instant::now());
        refresh_gauges(&shared);
    }
}

/// How often devices not seen for the retention period are forgotten.
const DEVICE_SWEEP: Duration = Duration::from_secs(600);

fn forget_stale_devices(shared: &Shared) {
    // The candidates under the book's lock only (usually few), then which of them are online
    // under the registry's; those are seen now, the others forgotten.
    let now = tandem_org::unix_now();
    let candidates = lock(&shared.devices).stale(now);
    if candidates.is_empty() {
        return;
    }
    let (online, stale): (Vec<String>, Vec<String>) = {
        let reg = lock(&shared.registry);
        candidates
            .into_iter()
            .partition(|id| reg.device_state(id).is_some())
    };
    let gone = {
        let mut book = lock(&shared.devices);
        for id in &online {
            book.seen(id, now);
        }
        book.forget(stale)
    };
    if !gone.is_empty() {
        tracing::info!(
            devices = gone.len(),
            "forgot devices not seen for the retention period"
        );
        // A cluster node forgets them for itself only: the shared rows are other nodes' too (a
        // device may be online on another node, or of an organisation another node hosts); an
        // administrator removes them with `tandem-relay devices remove`.
        if shared.directory.is_none() {
            let _ = shared.audit_tx.send(AuditOp::ForgetDevices(gone));
        }
    }
}

/// Refused connections that may complete a handshake at once, to be told why.
const MAX_EXPLAINING: usize = 64;
/// How long such a handshake may take.
const EXPLAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Counts one refused connection being explained while it lives.
struct Explaining<'a>(&'a std::sync::atomic::AtomicUsize);
impl Drop for Explaining<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve_incoming(shared: Arc<Shared>, incoming: quinn::Incoming) {
    // Over a TCP link, limits and logs go by the client's real address, and the link lives as
    // long as a connection uses it.
    let (remote, transport) = peer_of(&shared, incoming.remote_address());
    let _link_use = shared
        .hub
        .link(&incoming.remote_address())
        .map(|l| l.used());
    let admitted = if shared.draining.load(Ordering::SeqCst) {
        Err(None)
    } else {
        lock(&shared.registry).open(remote.ip()).map_err(Some)
    };
    // A refused connection completes its handshake so that the client hears why, but only a few
    // at a time and for a short while: beyond MAX_EXPLAINING the relay refuses before any TLS
    // (a stateless CONNECTION_REFUSED), so a validated address over its limits cannot make the
    // relay run handshakes without end.
    let _explaining = match &admitted {
        Ok(_) => None,
        Err(_) => {
            let n = shared.explaining.fetch_add(1, Ordering::SeqCst);
            let guard = Explaining(&shared.explaining);
            if n >= MAX_EXPLAINING {
                drop(guard);
                shared.metrics.limit("refused_before_tls");
                incoming.refuse();
                return;
            }
            Some(guard)
        }
    };
    let handshake_timeout = if admitted.is_ok() {
        shared.limits.handshake_timeout
    } else {
        EXPLAIN_TIMEOUT
    };
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            if let Ok(id) = admitted {
                lock(&shared.registry).close(id, Instant::now());
            }
            tracing::debug!(%remote, error = %e, "handshake failed");
            return;
        }
    };
    let conn = match tokio::time::timeout(handshake_timeout, connecting).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "handshake failed");
            if let Ok(id) = admitted {
                lock(&shared.registry).close(id, Instant::now());
            }
            return;
        }
        Err(_) => {
            shared.metrics.handshake_timeouts.inc();
            if let Ok(id) = admitted {
                lock(&shared.registry).close(id, Instant::now());
            }
            return;
        }
    };
    let id = match admitted {
        Ok(id) => id,
        Err(limit) => {
            let code = match limit {
                Some(l) => {
                    shared
                        .metrics
                        .connections_refused
                        .get_or_create(&crate::metrics::Limit {
                            limit: l.label().into(),
                        })
                        .inc();
                    shared.metrics.limit(l.label());
                    if let Some(suppressed) = may_log(&shared) {
                        tracing::info!(%remote, limit = l.label(), suppressed, "connection refused");
                    }
                    l.code()
                }
                None => ErrorCode::ShuttingDown,
            };
            close(&conn, code, code.explain());
            return;
        }
    };
    shared
        .metrics
        .connections_accepted
        .get_or_create(&crate::metrics::TransportLabel::of(transport))
        .inc();
    let (tx, rx) = mpsc::channel(16);
    let forwarding = Arc::new(AtomicBool::new(false));
    lock(&shared.conns).insert(
        id,
        ConnHandle {
            conn: conn.clone(),
            tx: tx.clone(),
            forwarding: forwarding.clone(),
        },
    );
    tracing::debug!(conn = id, %remote, %transport, "connected");

    drop(tx);
    let result = run_connection(&shared, id, &conn, rx, &forwarding).await;

    lock(&shared.conns).remove(&id);
    let closed = lock(&shared.registry).close(id, Instant::now());
    match closed {
        Closed::Nothing => {}
        Closed::Ended(e) => finish_session(&shared, e),
        Closed::Suspended {
            session,
            notify: peer,
            grace,
        } => {
            // Forwarding pauses; the byte counts and the audit row stay with the session. The side
            // still there drops what it sends meanwhile (its channel token stops working; the
            // resume gives both sides new ones).
            if let Some(io) = lock(&shared.sessions).get_mut(&session) {
                for t in io.tasks.drain(..) {
                    t.abort();
                }
                if let Some(tokens) = io.channel.take() {
                    shared.channels.close(tokens);
                }
            }
            if let Some(h) = lock(&shared.conns).get(&peer) {
                h.forwarding.store(false, Ordering::SeqCst);
                tandem_net::close_for_session(&h.conn);
            }
            tracing::info!(
                session,
                grace_secs = grace.as_secs(),
                "session suspended: a side lost its connection"
            );
            notify(
                &shared,
                peer,
                RelayMsg::PeerSuspended {
                    grace_secs: grace.as_secs() as u32,
                },
            );
        }
    }
    match result {
        Ok(()) => close(&conn, ErrorCode::Normal, "bye"),
        Err(Close::Peer) => {}
        Err(Close::With(code, why)) => {
            if let Some(suppressed) = may_log(&shared) {
                tracing::info!(conn = id, %remote, code = code.label(), suppressed, "closing connection: {why}");
            }
            close(&conn, code, &why);
        }
    }
}

/// Who is behind a QUIC peer address: itself over UDP, or the client of a TCP link.
fn peer_of(shared: &Shared, addr: SocketAddr) -> (SocketAddr, Transport) {
    if tandem_net::tunnel::is_link_address(addr) {
        // A link that is already gone counts as its link address (never a real client's).
        shared.hub.peer_of(addr).unwrap_or((addr, Transport::Tcp))
    } else {
        (addr, Transport::Quic)
    }
}

/// A peer's address for the audit log: `ip:port`, with ` (tcp)` or ` (websocket)` over a TCP link.
fn audit_addr(shared: &Shared, addr: SocketAddr) -> String {
    match peer_of(shared, addr) {
        (a, Transport::Quic) => a.to_string(),
        (a, t) => format!("{a} ({t})"),
    }
}

/// How a connection ends.
enum Close {
    /// The peer closed or the connection was lost.
    Peer,
    /// The relay closes it with this code and reason.
    With(ErrorCode, String),
}

impl Close {
    fn code(code: ErrorCode) -> Close {
        Close::With(code, code.explain().to_string())
    }
}

fn protocol_error(shared: &Shared, e: ProtoError) -> Close {
    let code = e.code();
    Metrics::inc(&shared.metrics.protocol_errors, code.label());
    Close::With(code, e.to_string())
}

async fn run_connection(
    shared: &Arc<Shared>,
    id: ConnId,
    conn: &Connection,
    mut rx: mpsc::Receiver<Outbound>,
    forwarding: &AtomicBool,
) -> Result<(), Close> {
    let deadline = tokio::time::Instant::now() + shared.limits.handshake_timeout;
    let timeout = || {
        shared.metrics.handshake_timeouts.inc();
        Close::code(ErrorCode::HandshakeTimeout)
    };
    let (mut send, mut recv) = match tokio::time::timeout_at(deadline, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return Err(Close::Peer),
        Err(_) => return Err(timeout()),
    };
    // One task per connection: it reads the control stream (cancel-safe chunk reads into a frame
    // decoder) and writes what other tasks queue for this connection.
    let mut frames = FrameDecoder::new(MAX_CONTROL_FRAME);
    let mut identified = false;
    // DATAGRAMs with no session to forward them: an honest peer sends a few at most (stragglers at
    // a session's end); past JUNK_DATAGRAMS the connection is closed rather than served.
    let junk_counter = shared
        .metrics
        .dropped_datagrams
        .get_or_create(&crate::metrics::Reason {
            reason: "no_session".into(),
        })
        .clone();
    let mut junk: u32 = 0;
    let mut budget = Bucket::new(CONTROL_BURST, Instant::now());
    let mut refused_registers: u32 = 0;
    // Console: the certificate it proved (scopes the devices it sees and reaches).
    let mut proven: Option<tandem_org::CertBody> = None;
    let mut failed_proofs: u32 = 0;
    // Device list pages have a budget of their own (a large organisation lists in hundreds of
    // pages): over it a page is refused, the connection stays.
    let mut pages = Bucket::new(LIST_BURST, Instant::now());
    // Agent: the device it is online as (marked offline when this connection ends).
    let mut _online: Option<DeviceOffline> = None;
    loop {
        let body = match frames.next_frame() {
            Ok(Some(body)) => body,
            Ok(None) => {
                tokio::select! {
                    chunk = recv.read_chunk(MAX_CONTROL_FRAME + FRAME_HEADER, true) => match chunk {
                        Ok(Some(c)) => frames.push(&c.bytes),
                        Ok(None) | Err(_) => return Err(Close::Peer),
                    },
                    Some(m) = rx.recv() => write_msg(&mut send, *m).await?,
                    _ = tokio::time::sleep_until(deadline), if !identified => return Err(timeout()),
                    // No session forwards this connection's DATAGRAMs: drop them as they come
                    // rather than let them fill the receive buffer. (A peer learns of its session
                    // from a message this task writes, after the flag is set and this arm is gone.)
                    d = conn.read_datagram(), if !forwarding.load(Ordering::SeqCst) => match d {
                        Ok(_) => {
                            junk_counter.inc();
                            junk += 1;
                            if junk > JUNK_DATAGRAMS {
                                return Err(Close::With(
                                    ErrorCode::UnexpectedMessage,
                                    "datagrams without a session".into(),
                                ));
                            }
                        }
                        Err(_) => return Err(Close::Peer),
                    },
                    // Payload streams without a session (opened on credit granted during one that
                    // has ended): stopped, their data dropped, counted like stray datagrams.
                    s = conn.accept_uni(), if !forwarding.load(Ordering::SeqCst) => match s {
                        Ok(mut s) => {
                            let _ = s.stop(VarInt::from_u32(0));
                            junk_counter.inc();
                            junk += 1;
                            if junk > JUNK_DATAGRAMS {
                                return Err(Close::With(
                                    ErrorCode::UnexpectedMessage,
                                    "payload without a session".into(),
                                ));
                            }
                        }
                        Err(_) => return Err(Close::Peer),
                    },
                }
                continue;
            }
            Err(e) => return Err(protocol_error(shared, e)),
        };
        let msg = decode_body::<ClientMsg>(&body).map_err(|e| protocol_error(shared, e))?;
        let now = Instant::now();
        if !matches!(msg, ClientMsg::ListDevices { .. })
            && !budget.take(CONTROL_BURST, CONTROL_PER_SECOND, now)
        {
            shared.metrics.limit("control_messages");
            return Err(Close::With(
                ErrorCode::RateLimited,
                "too many control messages".into(),
            ));
        }
        match msg {
            ClientMsg::Register { client } => {
                let res = {
                    let mut rng = lock(&shared.rng);
                    lock(&shared.registry).register(id, now, &mut *rng)
                };
                let slot = match res {
                    Ok(slot) => slot,
                    Err(Refusal::Limit(
                        l @ (LimitHit::RegistersPerConnection | LimitHit::RegistersPerAddress),
                    )) => {
                        // Over budget: refused, the connection stays (retrying costs a lookup,
                        // reconnecting would cost a handshake), but not for a peer that keeps
                        // asking regardless.
                        shared.metrics.limit(l.label());
                        let code = l.code();
                        refused_registers += 1;
                        if refused_registers > MAX_REFUSED_REGISTERS {
                            return Err(Close::code(code));
                        }
                        write_msg(
                            &mut send,
                            RelayMsg::Refused {
                                code,
                                message: code.explain().into(),
                            },
                        )
                        .await?;
                        continue;
                    }
                    Err(r) => return Err(refusal_close(shared, r)),
                };
                let slot = match &shared.directory {
                    Some(dir) => claim_slot(shared, dir, id, slot).await?,
                    None => slot,
                };
                identified = true;
                if let Some(suppressed) = may_log(shared) {
                    tracing::info!(conn = id, suppressed, "agent registered a slot");
                }
                tracing::debug!(conn = id, software = ?loggable(&client.software), "agent software");
                write_msg(
                    &mut send,
                    RelayMsg::Registered {
                        slot,
                        expires_in_secs: shared.limits.slot_ttl.as_secs() as u32,
                    },
                )
                .await?;
                // The organisation's revocation list, if the administrator published one: the
                // relay carries it, agents check it (it cannot forge or roll one back).
                if let Some(list) = published_revocation(&shared.data_dir).await {
                    write_msg(&mut send, RelayMsg::Revocation { list }).await?;
                }
            }
            ClientMsg::Authenticate { token, client } => {
                lock(&shared.registry)
                    .auth_attempt(id, now)
                    .map_err(|r| refusal_close(shared, r))?;
                let outcome = match authenticate(shared, token.expose().to_string()).await? {
                    AuthReply::Done(o) => o,
                    AuthReply::UnknownId => {
                        Metrics::inc(&shared.metrics.auth_failures, "unknown_id");
                        return Err(Close::code(ErrorCode::BadToken));
                    }
                    AuthReply::Busy(secs) => {
                        lock(&shared.registry).auth_refund(id);
                        shared.metrics.limit(LimitHit::AuthQueue.label());
                        Metrics::inc(&shared.metrics.auth_failures, "busy");
                        return Err(Close::With(ErrorCode::Busy, busy_reason(secs)));
                    }
                };
                match outcome {
                    AuthOutcome::Ok(tech) => {
                        let _ = shared.audit_tx.send(AuditOp::Login {
                            technician: tech.id,
                            unix_secs: tandem_org::unix_now() as i64,
                        });
                        lock(&shared.registry)
                            .authenticated(id, tech.clone())
                            .map_err(|r| refusal_close(shared, r))?;
                        identified = true;
                        tracing::info!(
                            conn = id,
                            technician = %tech.name,
                            organisation = %tech.organisation,
                            software = ?loggable(&client.software),
                            "technician authenticated"
                        );
                        write_msg(
                            &mut send,
                            RelayMsg::Authenticated {
                                technician: tech.name,
                                organisation: tech.organisation,
                            },
                        )
                        .await?;
                    }
                    AuthOutcome::BadToken => {
                        Metrics::inc(&shared.metrics.auth_failures, "bad_token");
                        return Err(Close::code(ErrorCode::BadToken));
                    }

                    AuthOutcome::Disabled => {
                        Metrics::inc(&shared.metrics.auth_failures, "disabled");
                        return Err(Close::code(ErrorCode::TechnicianDisabled));
                    }
                }
            }
            ClientMsg::Join { slot } => {
                if let Some(dir) = &shared.directory
                    && !cluster_join_allowed(shared, dir, id)
                {
                    refuse_pairing(
                        shared,
                        &mut send,
                        Refusal::Limit(LimitHit::JoinsPerTechnician),
                    )
                    .await?;
                    continue;
                }
                // Lock order everywhere: `rng` before `registry` (Register holds both in that
                // order; the other order deadlocked the relay under a register flood).
                let res = pair(shared, |reg, tokens| reg.join(id, &slot, now, tokens));
                match res {
                    Ok(p) => {
                        shared.metrics.sessions_started.inc();
                        tracing::info!(
                            session = p.session.id,
                            technician = %p.session.technician.name,
                            "session paired"
                        );
                    }
                    Err(Refusal::Refused(
                        code @ (ErrorCode::UnknownSlot | ErrorCode::ExpiredSlot),
                    )) if shared.directory.is_some() => match elsewhere(shared, &slot).await {
                        Some(holder) => redirect(shared, &mut send, conn, holder).await?,
                        None => refuse_pairing(shared, &mut send, Refusal::Refused(code)).await?,
                    },
                    Err(r) => refuse_pairing(shared, &mut send, r).await?,
                }
            }
            ClientMsg::Ping { nonce } => write_msg(&mut send, RelayMsg::Pong { nonce }).await?,
            ClientMsg::Time { nonce } => {
                let unix_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                write_msg(&mut send, RelayMsg::Time { nonce, unix_ms }).await?
            }
            ClientMsg::Resume { token } => {
                lock(&shared.registry)
                    .auth_attempt(id, now)
                    .map_err(|r| refusal_close(shared, r))?;
                let res = {
                    let mut reg = lock(&shared.registry);
                    let res = reg.resume(id, &token, now);
                    if let Ok(r) = &res {
                        spawn_forwarders(shared, &r.session);
                    }
                    res
                };
                match res {
                    Ok(r) => {
                        identified = true;
                        tracing::info!(session = r.session.id, side = ?r.side, "session resumed");
                        write_msg(&mut send, RelayMsg::Resumed).await?;
                        if let Some(m) = path_info(shared, conn) {
                            write_msg(&mut send, m).await?;
                        }
                        if let Some(peer) = r.notify {
                            notify(shared, peer, RelayMsg::PeerResumed);
                        }
                        if let Some(old) = r.replaced {
                            let old = lock(&shared.conns).get(&old).map(|h| h.conn.clone());
                            if let Some(old) = old {
                                close(
                                    &old,
                                    ErrorCode::SessionTakenOver,
                                    ErrorCode::SessionTakenOver.explain(),
                                );
                            }
                        }
                    }
                    Err(Refusal::Refused(code)) => return Err(Close::code(code)),
                    Err(r) => return Err(refusal_close(shared, r)),
                }
            }
            ClientMsg::Announce {
                client,
                device,
                presence,
                proof,
            } => {
                let unix = tandem_org::unix_now();
                // The cheap refusals first, before any signature is checked.
                let pre = lock(&shared.devices).precheck(&device);
                if let Err(why) = pre {
                    return Err(not_taken(shared, why));
                }
                let mut exporter = [0u8; 32];
                conn.export_keying_material(
                    &mut exporter,
                    tandem_org::ANNOUNCE_EXPORTER_LABEL,
                    b"",
                )
                .map_err(|_| Close::code(ErrorCode::Internal))?;
                let checked =
                    crate::devices::check_announce(&device, &presence, &proof, &exporter, unix);
                let announced = match checked {
                    Ok(a) => a,
                    Err(why) => {
                        Metrics::inc(
                            &shared.metrics.protocol_errors,
                            ErrorCode::BadDevice.label(),
                        );
                        return Err(Close::With(
                            ErrorCode::BadDevice,
                            format!("{}: {why}", ErrorCode::BadDevice.explain()),
                        ));
                    }
                };
                // A courtesy (agents and consoles decide): a device the published revocation list
                // names is not listed.
                let published = published_revocation(&shared.data_dir).await;
                if let Some(list) = &published
                    && crate::devices::revoked(&announced, list)
                {
                    shared.metrics.limit("device_revoked");
                    return Err(Close::With(
                        ErrorCode::BadDevice,
                        "this device was revoked by its organisation".into(),
                    ));
                }
                let dev = announced.device.id.clone();
                let from = peer_of(shared, conn.remote_address()).0.ip();
                let admitted = lock(&shared.devices).admit(
                    &announced,
                    crate::registry::address_key(from),
                    now,
                );
                if let Err(why) = admitted {
                    return Err(not_taken(shared, why));
                }
                let res = {
                    let mut rng = lock(&shared.rng);
                    lock(&shared.registry).announce(id, &dev, now, &mut *rng)
                };
                let replaced = match res {
                    Ok((_, replaced)) => replaced,
                    Err(Refusal::Limit(l)) => {
                        shared.metrics.limit(l.label());
                        return Err(Close::code(l.code()));
                    }
                    Err(r) => return Err(refusal_close(shared, r)),
                };
                identified = true;
                if let Some(old) = replaced {
                    let old = lock(&shared.conns).get(&old).map(|h| h.conn.clone());
                    if let Some(old) = old {
                        close(
                            &old,
                            ErrorCode::DeviceReplaced,
                            ErrorCode::DeviceReplaced.explain(),
                        );
                    }
                }
                let row = lock(&shared.devices).online(
                    &announced,
                    device,
                    presence,
                    audit_addr(shared, conn.remote_address()),
                    unix,
                );
                let _ = shared.audit_tx.send(AuditOp::DeviceOnline(Box::new(row)));
                // The same device announced again on this connection keeps its guard (a new
                // one would mark it offline when the old one is dropped).
                if _online.as_ref().is_none_or(|g| g.device != dev) {
                    _online = Some(DeviceOffline {
                        shared: shared.clone(),
                        conn: id,
                        device: dev.clone(),
                    });
                }
                if let Some(suppressed) = may_log(shared) {
                    tracing::info!(
                        conn = id,
                        device = %dev,
                        name = ?loggable(&announced.device.name),
                        suppressed,
                        "device online"
                    );
                }
                tracing::debug!(conn = id, software = ?loggable(&client.software), "agent software");
                write_msg(&mut send, RelayMsg::Online { device: dev }).await?;
                if let Some(list) = published {
                    write_msg(&mut send, RelayMsg::Revocation { list }).await?;
                }
            }
            ClientMsg::ProveOrg { cert, proof } => {
                if !matches!(
                    lock(&shared.registry).role(id),
                    Some(crate::registry::Role::Console { .. })
                ) {
                    return Err(Close::code(ErrorCode::NotAuthenticated));
                }
                let mut exporter = [0u8; 32];
                conn.export_keying_material(
                    &mut exporter,
                    tandem_org::MEMBERSHIP_EXPORTER_LABEL,
                    b"",
                )
                .map_err(|_| Close::code(ErrorCode::Internal))?;
                match tandem_org::check_membership(&cert, &proof, &exporter, tandem_org::unix_now())
                {
                    Ok(body) => {
                        tracing::info!(
                            conn = id,
                            certificate = %body.id_hex(),
                            organisation_key = %body.org_key.fingerprint(),
                            "console proved an organisation certificate"
                        );
                        let organisation = body.organisation.clone();
                        proven = Some(body);
                        // Consoles learn of revoked devices from the list the administrator
                        // published here (they check its signature; the relay only carries it).
                        let revocation = published_revocation(&shared.data_dir).await;
                        write_msg(
                            &mut send,
                            RelayMsg::OrgProven {
                                organisation,
                                revocation,
                            },
                        )
                        .await?;
                    }
                    Err(why) => {
                        Metrics::inc(
                            &shared.metrics.protocol_errors,
                            ErrorCode::BadCertificate.label(),
                        );
                        failed_proofs += 1;
                        if failed_proofs > MAX_FAILED_PROOFS {
                            return Err(Close::code(ErrorCode::BadCertificate));
                        }
                        write_msg(
                            &mut send,
                            RelayMsg::Refused {
                                code: ErrorCode::BadCertificate,
                                message: why.to_string(),
                            },
                        )
                        .await?;
                    }
                }
            }
            ClientMsg::ListDevices { query, offset } => {
                let Some(p) = &proven else {
                    return Err(Close::code(ErrorCode::NotProven));
                };
                let unix = tandem_org::unix_now();
                // Devices are listed to technicians who may reach them: unattended access, for
                // their groups, while their certificate lasts.
                if !p.permissions.unattended
                    || unix > p.not_after.saturating_add(tandem_org::CLOCK_SKEW)
                {
                    // A refusal costs the asker like any other message.
                    if !budget.take(CONTROL_BURST, CONTROL_PER_SECOND, now) {
                        shared.metrics.limit("control_messages");
                        return Err(Close::code(ErrorCode::RateLimited));
                    }
                    write_msg(
                        &mut send,
                        RelayMsg::Refused {
                            code: ErrorCode::BadCertificate,
                            message: "the certificate does not allow unattended access (or has \
                                      expired)"
                                .into(),
                        },
                    )
                    .await?;
                    continue;
                }
                if !pages.take(LIST_BURST, LIST_PER_SECOND, now) {
                    shared.metrics.limit("device_list_pages");
                    // Asking again before the pause is over costs like any other message.
                    if !budget.take(CONTROL_BURST, CONTROL_PER_SECOND, now) {
                        shared.metrics.limit("control_messages");
                        return Err(Close::code(ErrorCode::RateLimited));
                    }
                    write_msg(
                        &mut send,
                        RelayMsg::Refused {
                            code: ErrorCode::RateLimited,
                            message: ErrorCode::RateLimited.explain().into(),
                        },
                    )
                    .await?;
                    continue;
                }
                let groups = (!p.groups.iter().any(|g| g == tandem_org::ANY_GROUP))
                    .then_some(p.groups.as_slice());
                // The page under the book's lock only, then each entry's state (at most a
                // page's worth) under the registry's.
                let (page, total) = lock(&shared.devices).page(&p.org_key, groups, &query, offset);
                let entries = {
                    let reg = lock(&shared.registry);
                    crate::devices::with_state(page, unix, |d| reg.device_state(d))
                };
                write_msg(
                    &mut send,
                    RelayMsg::Devices {
                        entries,
                        offset,
                        total,
                    },
                )
                .await?;
            }
            ClientMsg::Connect { device } => {
                let Some(p) = &proven else {
                    return Err(Close::code(ErrorCode::NotProven));
                };
                // A proof made for a short-lived certificate does not outlive it.
                let allowed = if tandem_org::unix_now()
                    > p.not_after.saturating_add(tandem_org::CLOCK_SKEW)
                {
                    Err(ErrorCode::BadCertificate)
                } else {
                    match lock(&shared.devices).group_of(&device) {
                        Some((org_key, group)) => crate::devices::may_connect(p, &org_key, &group),
                        None => Err(ErrorCode::DeviceOffline),
                    }
                };
                let res = match allowed {
                    Err(code) => Err(Refusal::Refused(code)),
                    Ok(()) => pair(shared, |reg, tokens| {
                        reg.connect_device(id, &device, now, tokens)
                    }),
                };
                match res {
                    Ok(p) => {
                        shared.metrics.sessions_started.inc();
                        tracing::info!(
                            session = p.session.id,
                            technician = %p.session.technician.name,
                            device = %device,
                            "unattended session paired"
                        );
                    }
                    Err(r) => refuse_pairing(shared, &mut send, r).await?,
                }
            }
            ClientMsg::PathReport {
                direct,
                direct_bytes,
            } => path_report(shared, id, direct, direct_bytes),
            ClientMsg::End { reason } => {
                let ended = lock(&shared.registry).end(id, reason, now);
                if let Some(e) = ended {
                    finish_session(shared, e);
                }
            }
        }
    }
}

/// Pairs a console with an agent (`how`, given fresh resume tokens) and starts forwarding while
/// the registry is still locked, so that no end of the session can be processed before its
/// forwarders exist. Lock order: `rng`, then `registry`.
fn pair(
    shared: &Arc<Shared>,
    how: impl FnOnce(&mut Registry, (ResumeToken, ResumeToken)) -> Result<Paired, Refusal>,
) -> Result<Paired, Refusal> {
    let tokens = {
        let mut rng = lock(&shared.rng);
        (rng.token(), rng.token())
    };
    let mut reg = lock(&shared.registry);
    let res = how(&mut reg, tokens);
    if let Ok(p) = &res {
        start_session_io(shared, p);
    }
    res
}

/// A device the book does not take: counted, and the connection closed with the reason.
fn not_taken(shared: &Shared, why: crate::devices::NotTaken) -> Close {
    let (label, text) = match why {
        crate::devices::NotTaken::Organisation => (
            "device_organisation",
            "this relay does not host devices of that organisation",
        ),
        crate::devices::NotTaken::Full => (
            "devices_full",
            "this relay keeps as many devices as it may; ask its administrator",
        ),
        crate::devices::NotTaken::Budget => (
            "new_devices_per_address",
            "too many new devices from this address in the last hour; try later",
        ),
    };
    shared.metrics.limit(label);
    Close::With(ErrorCode::BadDevice, text.into())
}

/// A join or a connection to a device was refused: a fatal refusal closes the connection, the
/// others are answered (the connection stays) and counted.
/// Tries claiming a fresh code in the cluster's directory: a code another node holds is replaced
/// (a few tries), one the directory cannot answer for stays valid on this node only.
async fn claim_slot(
    shared: &Shared,
    dir: &Directory,
    conn: ConnId,
    mut slot: Slot,
) -> Result<Slot, Close> {
    const TRIES: usize = 6;
    for attempt in 0..TRIES {
        match dir.claim(slot.as_str(), shared.limits.slot_ttl).await {
            Ok(true) => return Ok(slot),
            Ok(false) => {
                shared.metrics.directory("conflict");
                // Taken elsewhere twice in a row: this length is crowded across the cluster
                // (each node sizes codes by its own use); one digit more.
                let min_digits = slot.as_str().len() + usize::from(attempt >= 1);
                let fresh = {
                    let mut rng = lock(&shared.rng);
                    lock(&shared.registry).reallocate(conn, &slot, min_digits, &mut *rng)
                };
                match fresh {
                    Ok(Some(s)) => slot = s,
                    // Registered again or gone meanwhile: what it has now was claimed by that.
                    Ok(None) => return Ok(slot),
                    Err(r) => return Err(refusal_close(shared, r)),
                }
            }
            Err(e) => {
                shared.metrics.directory("unavailable");
                tracing::warn!(error = %e, "the slot directory does not answer: this code works on this node only");
                return Ok(slot);
            }
        }
    }
    tracing::warn!(
        "no free code in the cluster after {TRIES} tries: this code works on this node only"
    );
    Ok(slot)
}

/// Whether the cluster's count of this console's technician's join attempts allows one more (the
/// node's own buckets are checked by the registry as well); counted without waiting for the
/// store ([`Directory::join_allowed`]).
fn cluster_join_allowed(shared: &Shared, dir: &Directory, conn: ConnId) -> bool {
    let technician = match lock(&shared.registry).role(conn) {
        Some(Role::Console { technician, .. }) => technician.id,
        _ => return true,
    };
    dir.join_allowed(technician, shared.limits.joins_per_minute_per_technician)
}

/// The node of the cluster holding `slot`, when it is another node.
async fn elsewhere(shared: &Shared, slot: &Slot) -> Option<crate::directory::Holder> {
    let dir = shared.directory.as_ref()?;
    match dir.lookup(slot.as_str()).await {
        Ok(Some(h)) if h.node != dir.node() => Some(h),
        Ok(_) => None,
        Err(e) => {
            shared.metrics.directory("unavailable");
            tracing::warn!(error = %e, "the slot directory does not answer; a join to a code of another node fails");
            None
        }
    }
}

/// Sends a console to the node holding its code: a `Redirect` on links of version 4, otherwise a
/// refusal that names the node's address.
async fn redirect(
    shared: &Shared,
    send: &mut SendStream,
    conn: &Connection,
    holder: crate::directory::Holder,
) -> Result<(), Close> {
    shared.metrics.directory("redirect");
    if tandem_proto::speaks_redirects(tandem_net::negotiated_alpn(conn).as_deref()) {
        return write_msg(
            send,
            RelayMsg::Redirect {
                relay: holder.address,
            },
        )
        .await;
    }
    Metrics::inc(
        &shared.metrics.joins_refused,
        ErrorCode::UnknownSlot.label(),
    );
    write_msg(
        send,
        RelayMsg::Refused {
            code: ErrorCode::UnknownSlot,
            message: format!(
                "that code waits on another relay node, {}; this console is too old to follow it there: update it or connect to that address",
                holder.address
            ),
        },
    )
    .await
}

async fn refuse_pairing(shared: &Shared, send: &mut SendStream, r: Refusal) -> Result<(), Close> {
    if let Refusal::Fatal(code) = r {
        Metrics::inc(&shared.metrics.protocol_errors, code.label());
        return Err(Close::code(code));
    }
    if let Refusal::Limit(l) = r {
        shared.metrics.limit(l.label());
    }
    let code = r.code();
    Metrics::inc(&shared.metrics.joins_refused, code.label());
    write_msg(
        send,
        RelayMsg::Refused {
            code,
            message: code.explain().into(),
        },
    )
    .await
}

/// Marks a device offline (last seen now) when the connection it was online on ends, unless it
/// came online again on another connection meanwhile.
struct DeviceOffline {
    shared: Arc<Shared>,
    conn: ConnId,
    device: String,
}

impl Drop for DeviceOffline {
    fn drop(&mut self) {
        // Online on another connection meanwhile: that one is the device now.
        let still_mine = !matches!(
            lock(&self.shared.registry).device_conn(&self.device),
            Some(c) if c != self.conn
        );
        let now = tandem_org::unix_now();
        lock(&self.shared.devices).seen(&self.device, now);
        if still_mine {
            let _ = self.shared.audit_tx.send(AuditOp::DeviceOffline {
                id: std::mem::take(&mut self.device),
                last_seen: now as i64,
            });
        }
    }
}

/// How long a write to a peer's control stream may wait for the peer to read: a peer that gives
/// no flow-control credit would otherwise hold its connection's task (and with it the handshake
/// deadline and the datagram drain) for ever.
const WRITE_STALL: Duration = Duration::from_secs(5);

/// Control messages a connection may send: a burst of [`CONTROL_BURST`], then
/// [`CONTROL_PER_SECOND`]. An honest client sends a handful per session (keep-alives are QUIC's); a
/// flood of Pings or refused Registers is closed instead of served one by one.
const CONTROL_BURST: f64 = 60.0;
const CONTROL_PER_SECOND: f64 = 20.0;

/// Device list pages a console may ask for: a burst of [`LIST_BURST`] (a listing of ≈ 12,000
/// devices), then [`LIST_PER_SECOND`].
const LIST_BURST: f64 = 1_000.0;
const LIST_PER_SECOND: f64 = 50.0;

/// Failed certificate proofs a connection may make before it is closed.
const MAX_FAILED_PROOFS: u32 = 3;

/// Registers refused for their budget that a connection may send before it is closed.
const MAX_REFUSED_REGISTERS: u32 = 3;

/// DATAGRAMs a connection may send while it has no session before it is closed.
const JUNK_DATAGRAMS: u32 = 1_000;

async fn write_msg(send: &mut SendStream, m: RelayMsg) -> Result<(), Close> {
    let frame = encode_frame(&m, MAX_CONTROL_FRAME).map_err(|e| {
        tracing::error!(error = %e, "cannot encode relay message");
        Close::code(ErrorCode::Internal)
    })?;
    match tokio::time::timeout(WRITE_STALL, send.write_all(&frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Close::Peer),
        Err(_) => Err(Close::With(
            ErrorCode::IdleTimeout,
            "the connection stopped reading its control stream".into(),
        )),
    }
}

fn refusal_close(shared: &Shared, r: Refusal) -> Close {
    match r {
        Refusal::Limit(l) => shared.metrics.limit(l.label()),
        Refusal::Fatal(c) | Refusal::Refused(c) => {
            Metrics::inc(&shared.metrics.protocol_errors, c.label())
        }
    }
    Close::code(r.code())
}

/// The answer to a login.
enum AuthReply {
    /// The secret was checked.
    Done(AuthOutcome),
    /// The token's id names no technician (or the token is malformed): refused without Argon2.
    UnknownId,
    /// The verification queue is full: retry in this many seconds.
    Busy(u32),
}

type AuthResult = Result<AuthReply, StoreError>;
type AuthJob = (String, oneshot::Sender<AuthResult>);
type VerifyJob = (Candidate, TokenSecret, oneshot::Sender<AuthResult>);

/// Threads that verify tokens (Argon2id, ~19 MiB and tens of ms each). A fixed pair of long-lived
/// threads, each with its own database connection: logins queue instead of starving forwarding of CPU,
/// and the hash's memory is reused by the same two threads instead of being retained by many.
const AUTH_THREADS: usize = 2;
/// Logins waiting for the lookup thread (a primary-key lookup each, so this drains fast).
const LOOKUP_QUEUE: usize = 1024;

/// Token checking in two stages: one thread looks the token's id up (fast; an unknown id is
/// answered at once), and only a known id's secret is queued for [`AUTH_THREADS`] Argon2 threads,
/// at most `queue` of them; beyond that the login is answered "busy, retry in N s".
struct AuthPool {
    lookup_tx: mpsc::Sender<AuthJob>,
    verify_tx: mpsc::Sender<VerifyJob>,
    queue: usize,
}

impl AuthPool {
    /// `stores`: one per verification thread and one for the lookup thread ([`AUTH_THREADS`] + 1).
    fn start(
        mut stores: Vec<Store>,
        queue: usize,
        metrics: Arc<Metrics>,
    ) -> Result<AuthPool, ServerError> {
        let queue = queue.max(1);
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map(|_| ())
                .map_err(|e| ServerError::Quic(format!("cannot start authentication thread: {e}")))
        };
        let Some(lookup_store) = stores.pop() else {
            return Err(ServerError::Quic(
                "no store for the authentication threads".into(),
            ));
        };
        // Mean time of one verification (µs), for the "retry in N s" estimate.
        let mean_us = Arc::new(AtomicU64::new(50_000));
        let (verify_tx, verify_rx) = mpsc::channel::<VerifyJob>(queue);
        let verify_rx = Arc::new(Mutex::new(verify_rx));
        for (i, store) in stores.into_iter().enumerate() {
            let (rx, mean_us, metrics) = (verify_rx.clone(), mean_us.clone(), metrics.clone());
            spawn(
                format!("tandem-auth-{i}"),
                Box::new(move || {
                    loop {
                        let job = lock(&rx).blocking_recv();
                        let Some((candidate, secret, reply)) = job else {
                            return;
                        };
                        let t = Instant::now();
                        let r = store.verify_candidate(&candidate, &secret);
                        let us = t.elapsed().as_micros().min(u64::MAX as u128) as u64;
                        // Exponential moving average, 1/8 weight for the newest.
                        let old = mean_us.load(Ordering::Relaxed);
                        mean_us.store(old - old / 8 + us / 8, Ordering::Relaxed);
                        metrics.auth_hashes.inc();
                        let _ = reply.send(r.map(AuthReply::Done));
                    }
                }),
            )?;
        }
        let (lookup_tx, mut lookup_rx) = mpsc::channel::<AuthJob>(LOOKUP_QUEUE);
        let store = lookup_store;
        let vtx = verify_tx.clone();
        spawn(
            "tandem-auth-lookup".into(),
            Box::new(move || {
                while let Some((token, reply)) = lookup_rx.blocking_recv() {
                    match store.lookup(&token) {
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                        Ok(None) => {
                            let _ = reply.send(Ok(AuthReply::UnknownId));
                        }
                        // Tokens stored as SHA-256 are checked here at once: no Argon2, no queue.
                        Ok(Some((candidate, secret))) if !candidate.needs_slow_check() => {
                            let r = store.verify_candidate(&candidate, &secret);
                            let _ = reply.send(r.map(AuthReply::Done));
                        }
                        Ok(Some((candidate, secret))) => {
                            match vtx.try_send((candidate, secret, reply)) {
                                Ok(()) => {}
                                Err(mpsc::error::TrySendError::Full((_, _, reply))) => {
                                    let waiting = queue as u64 + 1;
                                    let us = mean_us.load(Ordering::Relaxed);
                                    let secs = (waiting * us)
                                        .div_ceil(AUTH_THREADS as u64 * 1_000_000)
                                        .clamp(1, 60);
                                    let _ = reply.send(Ok(AuthReply::Busy(secs as u32)));
                                }
                                // Shutting down: dropping the reply says so.
                                Err(mpsc::error::TrySendError::Closed(_)) => {}
                            }
                        }
                    }
                }
            }),
        )?;
        Ok(AuthPool {
            lookup_tx,
            verify_tx,
            queue,
        })
    }

    /// Logins waiting for a verification thread.
    fn queued(&self) -> usize {
        self.queue.saturating_sub(self.verify_tx.capacity())
    }
}

async fn authenticate(shared: &Arc<Shared>, token: String) -> Result<AuthReply, Close> {
    let (reply, rx) = oneshot::channel();
    shared
        .auth
        .lookup_tx
        .send((token, reply))
        .await
        .map_err(|_| Close::code(ErrorCode::ShuttingDown))?;
    match rx.await {
        Ok(Ok(o)) => Ok(o),
        // The database restarts or cannot be reached: "busy, retry" (the console retries by
        // itself), not an internal error; the login attempt is refunded.
        Ok(Err(StoreError::Unavailable(e))) => {
            tracing::warn!(error = %e, "cannot check a login: the store does not answer");
            shared.metrics.store_errors.inc();
            Err(Close::With(
                ErrorCode::Busy,
                format!("the relay's database does not answer; retry in {STORE_RETRY_SECS} s"),
            ))
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "technician store failed");
            Err(Close::code(ErrorCode::Internal))
        }
        Err(_) => Err(Close::code(ErrorCode::ShuttingDown)),
    }
}

/// (Re)starts the forwarders of a session between its current connections; the byte counters
/// survive a resume. Called with the registry locked, so it must not block. Returns the two
/// connections and queues, or `None` if a side's connection is already gone.
#[allow(clippy::type_complexity)]
fn spawn_forwarders(
    shared: &Arc<Shared>,
    s: &Session,
) -> Option<(
    (Connection, mpsc::Sender<Outbound>),
    (Connection, mpsc::Sender<Outbound>),
)> {
    let (agent, console) = {
        let conns = lock(&shared.conns);
        match (conns.get(&s.agent), conns.get(&s.console)) {
            (Some(a), Some(c)) => {
                // From here on the forwarders read the DATAGRAMs; set before either side can hear
                // of the session, so its own task stops dropping them first.
                for h in [a, c] {
                    h.forwarding.store(true, Ordering::SeqCst);
                    tandem_net::open_for_session(&h.conn);
                }
                (
                    (a.conn.clone(), a.tx.clone()),
                    (c.conn.clone(), c.tx.clone()),
                )
            }
            // A side is already gone; its connection task will end or suspend the session.
            _ => return None,
        }
    };
    let mut sessions = lock(&shared.sessions);
    let io = sessions.entry(s.id).or_insert_with(|| SessionIo {
        tasks: Vec::new(),
        bytes: Arc::new(SessionBytes::default()),
        channel: None,
        checkpointed: (0, 0),
    });
    for t in io.tasks.drain(..) {
        t.abort();
    }
    if let Some(old) = io.channel.take() {
        shared.channels.close(old);
    }
    let m = &shared.metrics;
    let rate = shared.limits.session_bytes_per_second;
    let mut legs: Vec<Arc<Flow>> = Vec::with_capacity(2);
    for (from, to, dir) in [
        (&agent.0, &console.0, Direction::AgentToConsole),
        (&console.0, &agent.0, Direction::ConsoleToAgent),
    ] {
        let bucket = rate.map(|r| Arc::new(Mutex::new(ByteBucket::new(r))));
        let flow = Arc::new(Flow {
            bytes: io.bytes.clone(),
            dir,
            m_bytes_dgram: m.flow_bytes(dir.label(), "datagram"),
            m_bytes_stream: m.flow_bytes(dir.label(), "stream"),
            m_dgrams: m.flow_datagrams(dir.label()),
            m_bytes_channel: m.flow_bytes(dir.label(), "channel"),
            metrics: m.clone(),
            bucket,
        });
        legs.push(flow.clone());
        io.tasks.push(
            tokio::spawn(forward_datagrams(from.clone(), to.clone(), flow.clone())).abort_handle(),
        );
        io.tasks
            .push(tokio::spawn(forward_streams(from.clone(), to.clone(), flow)).abort_handle());
    }
    if let ([a2c, c2a], true) = (&legs[..], channel_capable(shared, &agent.0, &console.0)) {
        let tokens = [channel_token(), channel_token()];
        let legs: [Arc<dyn Leg>; 2] = [a2c.clone(), c2a.clone()];
        if shared
            .channels
            .open([agent.0.clone(), console.0.clone()], tokens, legs)
        {
            io.channel = Some(tokens);
            let _ = agent
                .1
                .try_send(Box::new(RelayMsg::Channel { token: tokens[0] }));
            let _ = console
                .1
                .try_send(Box::new(RelayMsg::Channel { token: tokens[1] }));
        }
    }
    Some((agent, console))
}

/// Whether a session gets a relay channel: both sides on UDP (a channel packet goes to the peer's
/// UDP address) and speaking protocol 3.
fn channel_capable(shared: &Shared, a: &Connection, b: &Connection) -> bool {
    [a, b].iter().all(|c| {
        tandem_proto::speaks_channels(tandem_net::negotiated_alpn(c).as_deref())
            && peer_of(shared, c.remote_address()).1 == Transport::Quic
    })
}

/// A random channel token (the system's generator; a failure gives no channel, never a weak token).
fn channel_token() -> u64 {
    let mut b = [0u8; 8];
    match SystemRandom::new().fill(&mut b) {
        Ok(()) => u64::from_be_bytes(b),
        // Equal tokens are refused by the table: no channel for this session.
        Err(_) => 0,
    }
}

/// Starts a freshly paired session: forwarders, audit row, and the news to both sides.
fn start_session_io(shared: &Arc<Shared>, p: &Paired) {
    let s = &p.session;
    let Some((agent, console)) = spawn_forwarders(shared, s) else {
        return;
    };
    let _ = shared.audit_tx.send(AuditOp::Start {
        session: s.id,
        technician: s.technician.clone(),
        slot: match &s.device {
            Some(d) => format!("device {d}"),
            None => s.slot.to_string(),
        },
        agent_addr: audit_addr(shared, agent.0.remote_address()),
        console_addr: audit_addr(shared, console.0.remote_address()),
    });
    let _ = agent.1.try_send(Box::new(RelayMsg::Paired {
        technician: s.technician.name.clone(),
        organisation: s.technician.organisation.clone(),
        resume: s.agent_token,
    }));
    if let Some(m) = path_info(shared, &agent.0) {
        let _ = agent.1.try_send(Box::new(m));
    }
    let _ = console.1.try_send(Box::new(RelayMsg::Joined {
        slot: s.slot.clone(),
        resume: s.console_token,
    }));
    if let Some(m) = path_info(shared, &console.0) {
        let _ = console.1.try_send(Box::new(m));
    }
}

/// What a paired connection is told about its path: where the relay sees it come from (a QUIC
/// connection only: a TCP link's address is not the one its UDP packets would come from) and
/// whether it may go direct.
fn path_info(shared: &Shared, conn: &Connection) -> Option<RelayMsg> {
    if !speaks_paths(conn) {
        return None;
    }
    let observed = match peer_of(shared, conn.remote_address()) {
        (a, Transport::Quic) => Some(SocketAddr::new(a.ip().to_canonical(), a.port())),
        _ => None,
    };
    Some(RelayMsg::PathInfo {
        observed,
        direct_allowed: shared.allow_direct,
    })
}

/// Whether a connection negotiated the protocol version with direct paths.
fn speaks_paths(conn: &Connection) -> bool {
    tandem_proto::speaks_paths(tandem_net::negotiated_alpn(conn).as_deref())
}

/// A side's report of its direct path: counted once per session when it first goes direct, and
/// the bytes it sent directly since its last report added to the relay's total.
fn path_report(shared: &Shared, conn: ConnId, direct: bool, direct_bytes: u64) {
    let (session, agent) = match lock(&shared.registry).role(conn) {
        Some(crate::registry::Role::Agent {
            session: Some(s), ..
        }) => (*s, true),
        Some(crate::registry::Role::Console {
            session: Some(s), ..
        }) => (*s, false),
        _ => return,
    };
    let bytes = match lock(&shared.sessions).get(&session) {
        Some(io) => io.bytes.clone(),
        None => return,
    };
    if !shared.allow_direct {
        // Relay only: a client that says it went direct anyway is not counted (its word only).
        return;
    }
    let mut d = lock(&bytes.direct);
    // Counters only grow; a smaller number (a confused or hostile client) adds nothing, and a
    // report adds at most what 10 Gbit/s could have carried since the session began (the counts
    // are the clients' word: bounded, never trusted).
    let bound =
        DIRECT_BYTES_PER_SECOND.saturating_mul(d.started.elapsed().as_secs().saturating_add(1));
    let direct_bytes = direct_bytes.min(bound);
    let last = if agent {
        &mut d.agent_bytes
    } else {
        &mut d.console_bytes
    };
    let added = direct_bytes.saturating_sub(*last);
    *last = (*last).max(direct_bytes);
    shared.metrics.direct_bytes.inc_by(added);
    if direct && !d.went_direct {
        d.went_direct = true;
        shared.metrics.sessions_direct.inc();
    }
}

/// Queues a message for a connection, if it is still there.
fn notify(shared: &Shared, conn: ConnId, m: RelayMsg) {
    let tx = lock(&shared.conns).get(&conn).map(|h| h.tx.clone());
    if let Some(tx) = tx {
        let _ = tx.try_send(Box::new(m));
    }
}

/// How often a cluster node writes its running sessions' byte counts into their audit rows.
const AUDIT_PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Queues the byte counts of the sessions whose counts changed since the last checkpoint.
fn audit_progress(shared: &Shared) {
    let mut sessions = lock(&shared.sessions);
    for (id, io) in sessions.iter_mut() {
        let now = (
            io.bytes.agent_to_console.load(Ordering::Relaxed),
            io.bytes.console_to_agent.load(Ordering::Relaxed),
        );
        if now == io.checkpointed {
            continue;
        }
        io.checkpointed = now;
        let _ = shared.audit_tx.send(AuditOp::Progress {
            session: *id,
            agent_to_console: now.0,
            console_to_agent: now.1,
        });
    }
}

/// Stops a session's forwarders and closes its audit row.
fn finish_session_io(shared: &Shared, id: SessionId, reason: &EndReason) {
    let io = lock(&shared.sessions).remove(&id);
    let (a2c, c2a, direct) = match io {
        Some(io) => {
            for t in io.tasks {
                t.abort();
            }
            if let Some(tokens) = io.channel {
                shared.channels.close(tokens);
            }
            let d = lock(&io.bytes.direct);
            (
                io.bytes.agent_to_console.load(Ordering::Relaxed),
                io.bytes.console_to_agent.load(Ordering::Relaxed),
                d.went_direct
                    .then(|| d.agent_bytes.saturating_add(d.console_bytes)),
            )
        }
        None => (0, 0, None),
    };
    Metrics::inc(&shared.metrics.sessions_ended, reason.label());
    let _ = shared.audit_tx.send(AuditOp::End {
        session: id,
        agent_to_console: a2c,
        console_to_agent: c2a,
        reason: reason.label().to_string(),
        direct,
    });
    tracing::info!(
        session = id,
        reason = reason.label(),
        bytes_agent_to_console = a2c,
        bytes_console_to_agent = c2a,
        "session ended"
    );
}

fn finish_session(shared: &Shared, e: Ended) {
    finish_session_io(shared, e.session.id, &e.reason);
    // The connections that stay go back to their unpaired size.
    for side in [e.session.agent, e.session.console] {
        if let Some(h) = lock(&shared.conns).get(&side) {
            h.forwarding.store(false, Ordering::SeqCst);
            tandem_net::close_for_session(&h.conn);
        }
    }
    if let Some(peer) = e.notify {
        notify(shared, peer, RelayMsg::SessionEnded { reason: e.reason });
    }
}

/// Records waiting for the store at most; beyond it the oldest are dropped (and counted).
const AUDIT_QUEUE_MAX: usize = 100_000;
/// How long a stopping relay keeps trying to write what is waiting while the store is unreachable.
const AUDIT_FLUSH_GRACE: Duration = Duration::from_secs(8);
/// Longest wait between two tries while the store is unreachable.
const AUDIT_RETRY_MAX: Duration = Duration::from_secs(2);

/// Writes audit and device records in order. While the store is unreachable (PostgreSQL
/// restarting), records wait, in order, and are written when it answers again; forwarding never
/// waits for them. A record the store refuses for another reason is logged and skipped.
fn audit_writer(store: Store, mut rx: mpsc::UnboundedReceiver<AuditOp>, metrics: Arc<Metrics>) {
    let mut rows: HashMap<SessionId, i64> = HashMap::new();
    // This relay start's id: with the session id it keys each audit row's start, so a start
    // written twice (retried after the database went away mid-write) stays one row.
    let run = {
        let mut b = [0u8; 8];
        let _ = SystemRandom::new().fill(&mut b);
        let r: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!("{:x}-{r}", crate::store::now_ms())
    };
    let mut pending: std::collections::VecDeque<AuditOp> = std::collections::VecDeque::new();
    let mut closed = false;
    let mut closed_at: Option<Instant> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        if pending.is_empty() {
            if closed {
                break;
            }
            match rx.blocking_recv() {
                Some(op) => pending.push_back(op),
                None => closed = true,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(op) => pending.push_back(op),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if pending.len() > 1 {
            // Waiting for the store: a running session's checkpoint is superseded by its end (or
            // the next checkpoint); only the records that matter wait.
            pending.retain(|op| !matches!(op, AuditOp::Progress { .. }));
        }
        while pending.len() > AUDIT_QUEUE_MAX {
            pending.pop_front();
            metrics.audit_dropped.inc();
        }
        while let Some(op) = pending.front() {
            match write_audit_op(&store, &run, &mut rows, op) {
                Err(StoreError::Unavailable(e)) => {
                    tracing::warn!(error = %e, waiting = pending.len(), "audit records wait for the store");
                    metrics.store_errors.inc();
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot write an audit or device record; skipped");
                    pending.pop_front();
                }
                Ok(()) => {
                    pending.pop_front();
                    backoff = Duration::from_millis(100);
                }
            }
        }
        metrics.audit_pending.set(pending.len() as i64);
        if pending.is_empty() {
            continue;
        }
        if closed && closed_at.get_or_insert_with(Instant::now).elapsed() >= AUDIT_FLUSH_GRACE {
            tracing::error!(
                records = pending.len(),
                "stopping while the store is unreachable: audit records lost"
            );
            metrics.audit_dropped.inc_by(pending.len() as u64);
            metrics.audit_pending.set(0);
            break;
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(AUDIT_RETRY_MAX);
    }
}

/// Writes one record; `Unavailable` means "try again later" (nothing was written).
fn write_audit_op(
    store: &Store,
    run: &str,
    rows: &mut HashMap<SessionId, i64>,
    op: &AuditOp,
) -> Result<(), StoreError> {
    match op {
        AuditOp::DeviceOnline(row) => store.device_online(row),
        AuditOp::ForgetDevices(ids) => {
            for id in ids {
                store.remove_device(id)?;
            }
            Ok(())
        }
        AuditOp::DeviceOffline { id, last_seen } => store.device_offline(id, *last_seen),
        AuditOp::Login {
            technician,
            unix_secs,
        } => store.record_login(*technician, *unix_secs),
        AuditOp::Start {
            session,
            technician,
            slot,
            agent_addr,
            console_addr,
        } => {
            let key = format!("{run}:{session}");
            let row = store.audit_start(&SessionStart {
                technician,
                slot,
                agent_addr: agent_addr.clone(),
                console_addr: console_addr.clone(),
                key: Some(&key),
            })?;
            rows.insert(*session, row);
            Ok(())
        }
        AuditOp::Progress {
            session,
            agent_to_console,
            console_to_agent,
        } => match rows.get(session) {
            Some(&row) => store.audit_progress(row, *agent_to_console, *console_to_agent),
            None => Ok(()),
        },
        AuditOp::End {
            session,
            agent_to_console,
            console_to_agent,
            reason,
            direct,
        } => {
            let Some(&row) = rows.get(session) else {
                return Ok(());
            };
            store.audit_end(row, *agent_to_console, *console_to_agent, reason, *direct)?;
            rows.remove(session);
            Ok(())
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    AgentToConsole,
    ConsoleToAgent,
}
impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::AgentToConsole => "agent_to_console",
            Direction::ConsoleToAgent => "console_to_agent",
        }
    }
}

/// Byte-rate limiter of one direction of a session (burst: one second's worth).
struct ByteBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}
impl ByteBucket {
    fn new(rate: u64) -> Self {
        ByteBucket {
            rate: rate as f64,
            tokens: rate as f64,
            last: Instant::now(),
        }
    }
    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
    }
    /// Takes `n` bytes if available.
    fn try_take(&mut self, n: usize) -> bool {
        self.refill();
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }
    /// Takes `n` bytes, possibly going into debt; returns how long to wait before sending.
    fn take_wait(&mut self, n: usize) -> Duration {
        self.refill();
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

struct Flow {
    bytes: Arc<SessionBytes>,
    dir: Direction,
    m_bytes_dgram: Counter,
    m_bytes_stream: Counter,
    m_dgrams: Counter,
    m_bytes_channel: Counter,
    metrics: Arc<Metrics>,
    bucket: Option<Arc<Mutex<ByteBucket>>>,
}

impl Leg for Flow {
    fn admit(&self, n: usize) -> bool {
        if let Some(b) = &self.bucket
            && !lock(b).try_take(n)
        {
            return false;
        }
        self.count(n);
        self.m_bytes_channel.inc_by(n as u64);
        true
    }
}

impl Flow {
    fn count(&self, n: usize) {
        let c = match self.dir {
            Direction::AgentToConsole => &self.bytes.agent_to_console,
            Direction::ConsoleToAgent => &self.bytes.console_to_agent,
        };
        c.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn forward_datagrams(from: Connection, to: Connection, flow: Arc<Flow>) {
    loop {
        let d: Bytes = match from.read_datagram().await {
            Ok(d) => d,
            Err(_) => return,
        };
        let n = d.len();
        if let Some(b) = &flow.bucket
            && !lock(b).try_take(n)
        {
            Metrics::inc(&flow.metrics.dropped_datagrams, "rate_limited");
            continue;
        }
        match to.send_datagram(d) {
            Ok(()) => {
                flow.count(n);
                flow.m_bytes_dgram.inc_by(n as u64);
                flow.m_dgrams.inc();
            }
            Err(quinn::SendDatagramError::TooLarge) => {
                Metrics::inc(&flow.metrics.dropped_datagrams, "too_large")
            }
            Err(_) => return,
        }
    }
}

async fn forward_streams(from: Connection, to: Connection, flow: Arc<Flow>) {
    let mut pipes = JoinSet::new();
    loop {
        tokio::select! {
            s = from.accept_uni() => match s {
                Ok(recv) => {
                    pipes.spawn(pipe_stream(recv, from.clone(), to.clone(), flow.clone()));
                }
                Err(_) => return,
            },
            Some(_) = pipes.join_next(), if !pipes.is_empty() => {}
        }
    }
}

/// Forwards one side's payload stream to a stream towards the other side, chunk by chunk without
/// copying. It tracks frame boundaries only to enforce [`MAX_PAYLOAD_FRAME`] and to count payload bytes;
/// the content is never looked at.
async fn pipe_stream(mut recv: RecvStream, from: Connection, to: Connection, flow: Arc<Flow>) {
    let Ok(mut send) = to.open_uni().await else {
        return;
    };
    let mut frames = FrameTracker::default();
    loop {
        let chunk = match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(c)) => c.bytes,
            Ok(None) => {
                if frames.at_boundary() {
                    let _ = send.finish();
                } else {
                    let _ = send.reset(VarInt::from_u32(0));
                }
                return;
            }
            Err(_) => {
                let _ = send.reset(VarInt::from_u32(0));
                return;
            }
        };
        let payload = match frames.feed(&chunk) {
            Ok(n) => n,
            Err(e) => {
                Metrics::inc(&flow.metrics.protocol_errors, ErrorCode::Oversized.label());
                close(&from, ErrorCode::Oversized, &e.to_string());
                return;
            }
        };
        if let Some(b) = &flow.bucket {
            let wait = lock(b).take_wait(chunk.len());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        if send.write_chunk(chunk).await.is_err() {
            return;
        }
        flow.count(payload);
        flow.m_bytes_stream.inc_by(payload as u64);
    }
}

/// Follows length-prefixed framing across arbitrary chunks.
#[derive(Default)]
struct FrameTracker {
    header: [u8; FRAME_HEADER],
    header_have: usize,
    body_left: usize,
}

impl FrameTracker {
    fn at_boundary(&self) -> bool {
        self.header_have == 0 && self.body_left == 0
    }
    /// Consumes a chunk; returns how many of its bytes are payload (not headers).
    fn feed(&mut self, mut chunk: &[u8]) -> Result<usize, ProtoError> {
        let mut payload = 0;
        while !chunk.is_empty() {
            if self.body_left > 0 {
                let take = self.body_left.min(chunk.len());
                self.body_left -= take;
                payload += take;
                chunk = &chunk[take..];
            } else {
                let take = (FRAME_HEADER - self.header_have).min(chunk.len());
                self.header[self.header_have..self.header_have + take]
                    .copy_from_slice(&chunk[..take]);
                self.header_have += take;
                chunk = &chunk[take..];
                if self.header_have == FRAME_HEADER {
                    self.body_left = frame_len(self.header, MAX_PAYLOAD_FRAME)?;
                    self.header_have = 0;
                }
            }
        }
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stranger_log_lines_are_rate_limited_and_counted() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(t0);
        let allowed = (0..200).filter(|_| l.allow(t0).is_some()).count();
        assert_eq!(allowed, LogLimiter::BURST as usize);
        // A second later: ten more, the first of which reports what was held back.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.allow(t1), Some(150));
        assert_eq!((0..20).filter(|_| l.allow(t1).is_some()).count(), 9);
        assert_eq!(loggable(&"é".repeat(100)).chars().count(), 64);
        assert_eq!(loggable("tandem-agent 0.1"), "tandem-agent 0.1");
    }

    #[test]
    fn frame_tracker_across_chunk_boundaries() {
        let mut stream = Vec::new();
        for len in [0usize, 1, 5, 1000, 70] {
            stream.extend_from_slice(&(len as u32).to_be_bytes());
            stream.extend(std::iter::repeat_n(7u8, len));
        }
        for split in [1usize, 2, 3, 4, 5, 7, 64, 10_000] {
            let mut t = FrameTracker::default();
            let mut payload = 0;
            for c in stream.chunks(split) {
                payload += t.feed(c).unwrap();
            }
            assert_eq!(payload, 1076, "split {split}");
            assert!(t.at_boundary());
        }
        let mut t = FrameTracker::default();
        t.feed(&[0, 0]).unwrap();
        assert!(!t.at_boundary());
        let mut t = FrameTracker::default();
        assert!(
            t.feed(&((MAX_PAYLOAD_FRAME as u32 + 1).to_be_bytes()))
                .is_err()
        );
    }
}
