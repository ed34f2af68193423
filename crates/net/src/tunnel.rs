//! QUIC over TCP: the outer link's packets carried as records on a TLS stream, for networks that
//! drop UDP.
//!
//! Nothing above this module changes with the transport: the relay and its clients still speak QUIC
//! to each other (the same control stream, DATAGRAMs and payload streams, the same certificate
//! check), only the packets travel as records on a TCP connection instead of UDP datagrams. quinn
//! lets an endpoint run on any [`AsyncUdpSocket`]; [`MuxSocket`] is one that carries packets on TCP
//! links (and, on the relay, on its real UDP socket as well), so:
//!
//! * the relay runs **one** QUIC endpoint for every transport. A TCP link gets an address of its own
//!   that no real UDP peer can have ([`is_link_address`]: 240.0.0.0/4, reserved), and quinn sees it
//!   as one more peer. Packets from real UDP sources in that range are dropped.
//! * a client whose link started on TCP can move to UDP without ending anything: it rebinds its
//!   endpoint to a UDP socket ([`quinn::Endpoint::rebind_abstract`]) and the relay sees an ordinary
//!   QUIC connection migration.
//!
//! Two framings of the same packets ([`native_framing`], [`websocket_framing`]):
//! * **TLS over TCP**: after the TLS handshake the client writes [`PREAMBLE`]; then each packet is a
//!   2-byte big-endian length and the packet.
//! * **WebSocket** (RFC 6455) over HTTPS, one binary message per packet, so that the relay can sit
//!   behind a reverse proxy (nginx, Caddy, HAProxy) on port 443 next to other sites.
//!
//! Latency over TCP. A UDP path drops what it cannot carry and QUIC slows down; TCP instead queues
//! it, and a picture sent into a queue arrives late. So a link keeps the queue short on purpose:
//! the kernel holds at most [`NOTSENT_LOWAT`] bytes not yet sent (`TCP_NOTSENT_LOWAT`), and the
//! link's own queue ([`SendQueue`]) drops a packet that waited longer than [`QueueLimits::max_delay`]
//! or would grow it beyond [`QueueLimits::max_bytes`]. QUIC sees that as loss and its congestion
//! control backs off, as on a congested UDP path; the video pipeline above adapts its rate to what
//! QUIC carries. Inbound, a link reads only while the endpoint has taken what it read before
//! ([`LINK_INBOUND_BYTES`]): TCP's own flow control then slows the sender.

use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

/// How a relay link travels.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Transport {
    /// QUIC over UDP.
    #[default]
    Quic,
    /// QUIC packets over TLS over TCP.
    Tcp,
    /// QUIC packets in WebSocket messages over HTTPS (possibly through a reverse proxy).
    WebSocket,
}

impl Transport {
    /// Short name for logs, metrics labels and JSON: `quic`, `tcp`, `websocket`.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
            Transport::WebSocket => "websocket",
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Transport::Quic => 0,
            Transport::Tcp => 1,
            Transport::WebSocket => 2,
        }
    }

    fn from_u8(v: u8) -> Transport {
        match v {
            1 => Transport::Tcp,
            2 => Transport::WebSocket,
            _ => Transport::Quic,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The transport a link uses now; shared, because a link can move from TCP to QUIC while it runs.
#[derive(Clone, Debug)]
pub struct TransportCell(Arc<std::sync::atomic::AtomicU8>);

impl TransportCell {
    pub fn new(t: Transport) -> Self {
        TransportCell(Arc::new(std::sync::atomic::AtomicU8::new(t.to_u8())))
    }
    pub fn get(&self) -> Transport {
        Transport::from_u8(self.0.load(Ordering::Relaxed))
    }
    pub fn set(&self, t: Transport) {
        self.0.store(t.to_u8(), Ordering::Relaxed);
    }
}

/// What a TLS-over-TCP client writes first, after the TLS handshake (a WebSocket client starts with
/// `GET ` instead, which is how the relay tells the two apart).
pub const PREAMBLE: &[u8; 4] = b"TQ1\n";
/// ALPN of TLS-over-TCP links (WebSocket links use `http/1.1`, or none through a proxy).
pub const TUNNEL_ALPN: &[u8] = b"tandem-tcp/1";
/// Largest packet a link carries: quinn's largest UDP payload (its receive buffers are this big;
/// its path MTU discovery stops at 1452). Anything larger is a protocol error and ends the link.
pub const MAX_TUNNEL_PACKET: usize = 1472;
/// Smallest packet a link carries: no QUIC packet is shorter than 21 bytes (a short header with
/// an empty connection id needs 1 + 4 bytes before its 16-byte header-protection sample). Smaller
/// ones are a protocol error: they would cost the relay per-packet work for no QUIC traffic.
pub const MIN_TUNNEL_PACKET: usize = 21;
/// What a queued inbound packet is charged beyond its bytes (queue entry, reference counts), so that
/// budgets hold for floods of tiny packets too.
pub const PACKET_OVERHEAD: usize = 64;
/// Unsent bytes the kernel may hold for a link (`TCP_NOTSENT_LOWAT`).
pub const NOTSENT_LOWAT: u32 = 16 * 1024;
/// Bytes one link may have read and not yet handed to the QUIC endpoint (charged with
/// [`PACKET_OVERHEAD`]).
pub const LINK_INBOUND_BYTES: usize = 64 * 1024;
/// Bytes all links of an endpoint together may have waiting for it.
pub const HUB_INBOUND_BYTES: usize = 8 * 1024 * 1024;
/// Packets written to the stream before it is flushed.
const WRITE_BATCH: usize = 16;

/// Limits of a link's send queue.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    /// A packet that would make the queue longer than this is dropped.
    pub max_bytes: usize,
    /// A packet that waited longer than this is dropped instead of sent.
    pub max_delay: Duration,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            max_bytes: 256 * 1024,
            max_delay: Duration::from_millis(40),
        }
    }
}

/// A link's send queue: drop-tail on size, drop-head on age (pure; the caller gives the time).
#[derive(Debug)]
pub struct SendQueue {
    items: VecDeque<(Instant, Bytes)>,
    bytes: usize,
    limits: QueueLimits,
    dropped: u64,
}

impl SendQueue {
    pub fn new(limits: QueueLimits) -> Self {
        SendQueue {
            items: VecDeque::new(),
            bytes: 0,
            limits,
            dropped: 0,
        }
    }

    /// Queues a packet; `false` (and counted as dropped) when it does not fit. Packets already too
    /// old to be sent are dropped first, so a writer that is stuck holds no more than fresh ones.
    pub fn push(&mut self, now: Instant, packet: Bytes) -> bool {
        while let Some((at, p)) = self.items.front() {
            if now.saturating_duration_since(*at) <= self.limits.max_delay {
                break;
            }
            self.bytes -= p.len();
            self.items.pop_front();
            self.dropped += 1;
        }
        if self.bytes + packet.len() > self.limits.max_bytes {
            self.dropped += 1;
            return false;
        }
        self.bytes += packet.len();
        self.items.push_back((now, packet));
        true
    }

    /// The oldest packet still fresh enough to send; older ones are dropped on the way.
    pub fn pop(&mut self, now: Instant) -> Option<Bytes> {
        while let Some((at, p)) = self.items.pop_front() {
            self.bytes -= p.len();
            if now.saturating_duration_since(at) > self.limits.max_delay {
                self.dropped += 1;
                continue;
            }
            return Some(p);
        }
        None
    }

    /// Bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Packets dropped so far (too old or no room).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// Whether `addr` is a TCP link's address (240.0.0.0/4, reserved: never a real peer's source).
pub fn is_link_address(addr: SocketAddr) -> bool {
    let v4 = match addr.ip() {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(a) => a,
            None => return false,
        },
    };
    v4.octets()[0] & 0xf0 == 240
}

/// The `n`th link address, in the family of the endpoint's socket.
fn link_address(n: u64, v6: bool) -> SocketAddr {
    let port = (n % 65_535 + 1) as u16;
    let host = (n / 65_535) as u32 & 0x0fff_ffff;
    let ip = Ipv4Addr::from(0xf000_0000 | host);
    if v6 {
        SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), port)
    } else {
        SocketAddr::new(IpAddr::V4(ip), port)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters of a link, for metrics and the benchmarks.
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub packets_in: AtomicU64,
    pub packets_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// One TCP link as the endpoint sees it.
pub struct Link {
    /// The address quinn knows this link by.
    addr: SocketAddr,
    /// Who is at the other end (the TCP peer, or the client a trusted reverse proxy named).
    peer: SocketAddr,
    transport: Transport,
    out: Mutex<SendQueue>,
    out_ready: Notify,
    /// Packets read from this link, not yet taken by the endpoint.
    inbound: Mutex<Inbound>,
    /// Wakes this link's reader when the endpoint took some of its packets.
    space: Notify,
    /// QUIC connections that use this link ([`Link::used`]).
    users: AtomicUsize,
    /// Since when no connection has used the link (None while one does).
    unused_since: Mutex<Option<Instant>>,
    closed: AtomicBool,
    closed_notify: Notify,
    pub counters: LinkCounters,
}

/// A link's packets waiting for the endpoint.
#[derive(Default)]
struct Inbound {
    packets: VecDeque<Bytes>,
    /// Charged bytes ([`PACKET_OVERHEAD`] each on top).
    charged: usize,
    /// Whether the link is in the hub's ready list.
    listed: bool,
}

/// Marks a link as carrying a QUIC connection while it lives (see [`Link::used`]).
pub struct LinkUse(Arc<Link>);

impl Drop for LinkUse {
    fn drop(&mut self) {
        if self.0.users.fetch_sub(1, Ordering::SeqCst) == 1 {
            *lock(&self.0.unused_since) = Some(Instant::now());
        }
    }
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("addr", &self.addr)
            .field("peer", &self.peer)
            .field("transport", &self.transport)
            .finish()
    }
}

impl Link {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }
    pub fn transport(&self) -> Transport {
        self.transport
    }
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
    /// Counts a QUIC connection on this link until the returned guard is dropped.
    pub fn used(self: &Arc<Self>) -> LinkUse {
        self.users.fetch_add(1, Ordering::SeqCst);
        *lock(&self.unused_since) = None;
        LinkUse(self.clone())
    }

    /// How long no QUIC connection has used this link (zero while one does).
    pub fn unused_for(&self, now: Instant) -> Duration {
        lock(&self.unused_since).map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }

    /// Packets the send queue dropped (too old or no room).
    pub fn dropped(&self) -> u64 {
        lock(&self.out).dropped()
    }
    /// Ends the link (its tasks stop and the TCP connection closes).
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            self.closed_notify.notify_waiters();
            self.out_ready.notify_one();
        }
    }
    /// Resolves when the link has ended.
    pub async fn closed(&self) {
        loop {
            let n = self.closed_notify.notified();
            if self.is_closed() {
                return;
            }
            n.await;
        }
    }

    fn send(&self, packet: Bytes) {
        if self.is_closed() {
            return;
        }
        let queued = lock(&self.out).push(Instant::now(), packet);
        if queued {
            self.out_ready.notify_one();
        }
    }
}

/// The TCP links of one endpoint and the packets they read.
pub struct Hub {
    links: Mutex<HashMap<SocketAddr, Arc<Link>>>,
    /// Links with packets waiting, served round robin (one flooding link cannot starve others).
    ready: Mutex<VecDeque<Arc<Link>>>,
    /// Charged bytes waiting across all links.
    inbound_bytes: AtomicUsize,
    /// Wakes the endpoint when a packet arrives.
    waker: futures_util::task::AtomicWaker,
    /// Wakes readers waiting for the hub-wide budget (rare: only when it was exhausted).
    space: Notify,
    next: AtomicU64,
    v6: bool,
    /// A relay's hub (links get link addresses) rather than a client's.
    server: bool,
    limits: QueueLimits,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("links", &lock(&self.links).len())
            .finish()
    }
}

/// Packet streams of one link, whatever the framing.
pub type PacketRx = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;
pub type PacketTx = Pin<Box<dyn Sink<Bytes, Error = io::Error> + Send>>;

impl Hub {
    /// A relay's hub, whose link addresses are IPv6-mapped when `v6` (the endpoint's socket is
    /// IPv6).
    pub fn server(v6: bool, limits: QueueLimits) -> Arc<Hub> {
        Self::make(v6, true, limits)
    }

    /// A client's hub: its link is known by the relay's address.
    pub fn client(limits: QueueLimits) -> Arc<Hub> {
        Self::make(false, false, limits)
    }

    fn make(v6: bool, server: bool, limits: QueueLimits) -> Arc<Hub> {
        Arc::new(Hub {
            links: Mutex::new(HashMap::new()),
            ready: Mutex::new(VecDeque::new()),
            inbound_bytes: AtomicUsize::new(0),
            waker: futures_util::task::AtomicWaker::new(),
            space: Notify::new(),
            next: AtomicU64::new(0),
            v6,
            server,
            limits,
        })
    }

    /// Links open now.
    pub fn link_count(&self) -> usize {
        lock(&self.links).len()
    }

    /// Who is behind a link address, and over what.
    pub fn peer_of(&self, addr: SocketAddr) -> Option<(SocketAddr, Transport)> {
        lock(&self.links).get(&addr).map(|l| (l.peer, l.transport))
    }

    /// Adds a link and starts moving its packets. `addr` is the address quinn knows it by (a
    /// client gives the relay's address; a relay passes `None` and gets a fresh link address).
    /// The link ends when the stream ends or fails, when nothing arrives for `idle`, or on
    /// [`Link::close`]; it is then removed.
    pub fn add_link(
        self: &Arc<Self>,
        addr: Option<SocketAddr>,
        peer: SocketAddr,
        transport: Transport,
        (rx, tx): (PacketRx, PacketTx),
        idle: Duration,
    ) -> Arc<Link> {
        let addr = addr.unwrap_or_else(|| {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            link_address(n, self.v6)
        });
        let link = Arc::new(Link {
            addr,
            peer,
            transport,
            out: Mutex::new(SendQueue::new(self.limits)),
            out_ready: Notify::new(),
            inbound: Mutex::new(Inbound::default()),
            space: Notify::new(),
            users: AtomicUsize::new(0),
            unused_since: Mutex::new(Some(Instant::now())),
            closed: AtomicBool::new(false),
            closed_notify: Notify::new(),
            counters: LinkCounters::default(),
        });
        lock(&self.links).insert(addr, link.clone());
        let hub = self.clone();
        let l = link.clone();
        tokio::spawn(async move {
            let reason = tokio::select! {
                r = read_packets(&hub, &l, rx, idle) => r,
                r = write_packets(&l, tx) => r,
                _ = l.closed() => Ok(()),
            };
            if let Err(e) = reason {
                tracing::debug!(addr = %l.addr, transport = %l.transport, error = %e, "link ended");
            }
            l.close();
            let mut links = lock(&hub.links);
            if links.get(&l.addr).is_some_and(|x| Arc::ptr_eq(x, &l)) {
                links.remove(&l.addr);
            }
        });
        link
    }

    /// The link known by `addr`, if it is open.
    pub fn link(&self, addr: &SocketAddr) -> Option<Arc<Link>> {
        // A relay's links all have link addresses, so a real peer's needs no lookup (a client's
        // one link is known by the relay's real address).
        if self.server && !is_link_address(*addr) {
            return None;
        }
        lock(&self.links).get(addr).cloned()
    }

    /// Moves queued packets into quinn's buffers, one per ready link in turn; registers the waker
    /// first so that a packet queued meanwhile wakes the endpoint.
    fn poll_into(&self, cx: &Context, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        self.waker.register(cx.waker());
        let mut n = 0;
        let mut freed = 0;
        let mut ready = lock(&self.ready);
        while n < bufs.len().min(meta.len()) {
            let Some(link) = ready.pop_front() else {
                break;
            };
            let packet = {
                let mut inb = lock(&link.inbound);
                let p = inb.packets.pop_front();
                if let Some(p) = &p {
                    inb.charged -= p.len() + PACKET_OVERHEAD;
                    freed += p.len() + PACKET_OVERHEAD;
                }
                if inb.packets.is_empty() {
                    inb.listed = false;
                    if inb.packets.capacity() > 64 {
                        inb.packets.shrink_to(16);
                    }
                } else {
                    ready.push_back(link.clone());
                }
                p
            };
            link.space.notify_one();
            let Some(p) = packet else {
                continue;
            };
            if p.len() > bufs[n].len() {
                continue;
            }
            bufs[n][..p.len()].copy_from_slice(&p);
            meta[n] = RecvMeta {
                addr: link.addr,
                len: p.len(),
                stride: p.len(),
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        if ready.is_empty() && ready.capacity() > 1024 {
            ready.shrink_to(64);
        }
        drop(ready);
        if freed > 0 {
            let before = self.inbound_bytes.fetch_sub(freed, Ordering::SeqCst);
            if before > HUB_INBOUND_BYTES.saturating_sub(LINK_INBOUND_BYTES) {
                // Readers may be waiting for the hub-wide budget.
                self.space.notify_waiters();
            }
        }
        n
    }

    /// Waits until `link` may queue a packet charged `charge`, and reserves it hub-wide.
    async fn room(&self, link: &Link, charge: usize) {
        loop {
            let own = link.space.notified();
            let hub = self.space.notified();
            tokio::pin!(own, hub);
            own.as_mut().enable();
            hub.as_mut().enable();
            let link_ok = lock(&link.inbound).charged + charge <= LINK_INBOUND_BYTES;
            if link_ok
                && self
                    .inbound_bytes
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                        (b + charge <= HUB_INBOUND_BYTES).then_some(b + charge)
                    })
                    .is_ok()
            {
                return;
            }
            tokio::select! {
                _ = own => {}
                _ = hub => {}
            }
        }
    }

    /// Queues a packet whose charge [`Hub::room`] reserved.
    fn deliver(&self, link: &Arc<Link>, p: Bytes) {
        let charge = p.len() + PACKET_OVERHEAD;
        let list = {
            let mut inb = lock(&link.inbound);
            inb.packets.push_back(p);
            inb.charged += charge;
            !std::mem::replace(&mut inb.listed, true)
        };
        if list {
            lock(&self.ready).push_back(link.clone());
        }
        self.waker.wake();
    }
}

async fn read_packets(
    hub: &Hub,
    link: &Arc<Link>,
    mut rx: PacketRx,
    idle: Duration,
) -> io::Result<()> {
    loop {
        let p = match tokio::time::timeout(idle, rx.next()).await {
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "idle")),
            Ok(None) => return Ok(()),
            Ok(Some(p)) => p?,
        };
        if p.len() < MIN_TUNNEL_PACKET || p.len() > MAX_TUNNEL_PACKET {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("packet of {} bytes on a link", p.len()),
            ));
        }
        // A copy of exactly its size: the framing's read buffer is not kept alive by it.
        let p = Bytes::copy_from_slice(&p);
        hub.room(link, p.len() + PACKET_OVERHEAD).await;
        link.counters.packets_in.fetch_add(1, Ordering::Relaxed);
        link.counters
            .bytes_in
            .fetch_add(p.len() as u64, Ordering::Relaxed);
        hub.deliver(link, p);
    }
}

async fn write_packets(link: &Link, mut tx: PacketTx) -> io::Result<()> {
    loop {
        let mut batch = 0;
        while batch < WRITE_BATCH {
            let Some(p) = lock(&link.out).pop(Instant::now()) else {
                break;
            };
            link.counters.packets_out.fetch_add(1, Ordering::Relaxed);
            link.counters
                .bytes_out
                .fetch_add(p.len() as u64, Ordering::Relaxed);
            tx.feed(p).await?;
            batch += 1;
        }
        if batch > 0 {
            tx.flush().await?;
            continue;
        }
        if link.is_closed() {
            let _ = tx.close().await;
            return Ok(());
        }
        // notify_one keeps a permit, so a packet queued between the pop and here is not missed.
        link.out_ready.notified().await;
    }
}

/// The QUIC endpoint's socket: TCP links, and a real UDP socket when there is one.
pub struct MuxSocket {
    udp: Option<Arc<dyn AsyncUdpSocket>>,
    hub: Arc<Hub>,
    local: SocketAddr,
    /// Whose turn it is to be read first (so that neither starves the other).
    hub_first: AtomicBool,
    /// Datagrams received on the UDP socket (from `count_from` only, when set).
    udp_received: AtomicU64,
    count_from: Option<SocketAddr>,
    /// Takes the UDP socket's non-QUIC packets (the relay's channels, [`crate::channel`]).
    tap: Option<Arc<dyn PacketTap>>,
}

/// What a relay does with a UDP packet that is not QUIC (fixed bit clear): it may rewrite the
/// packet in place and name where it goes, or drop it (`None`). Called on quinn's receive path for
/// every such packet, so it must be quick and must not block.
pub trait PacketTap: Send + Sync + fmt::Debug {
    /// Where the packet goes on, if anywhere.
    fn packet(&self, p: &mut [u8], from: SocketAddr) -> Option<Onward>;
    /// A forwarded packet the socket would not take (its send buffer was full).
    fn send_failed(&self) {}
}

impl fmt::Debug for MuxSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuxSocket")
            .field("local", &self.local)
            .field("udp", &self.udp.is_some())
            .field("hub", &self.hub)
            .finish()
    }
}

impl MuxSocket {
    /// A socket over a UDP socket and the links of `hub` (the relay; or a client on UDP, which
    /// counts what it receives).
    pub fn with_udp(udp: std::net::UdpSocket, hub: Arc<Hub>) -> io::Result<Arc<MuxSocket>> {
        Self::make_udp(udp, hub, None, None)
    }

    /// Like [`MuxSocket::with_udp`], with non-QUIC packets on the UDP socket handed to `tap` and
    /// sent on where it says, before quinn sees anything (the relay's channels). Its endpoint must
    /// not advertise `grease_quic_bit` ([`crate::relay_endpoint_config`]), so that every QUIC
    /// packet has the fixed bit set.
    pub fn with_udp_tap(
        udp: std::net::UdpSocket,
        hub: Arc<Hub>,
        tap: Arc<dyn PacketTap>,
    ) -> io::Result<Arc<MuxSocket>> {
        Self::make_udp(udp, hub, None, Some(tap))
    }

    /// Like [`MuxSocket::with_udp`], counting only datagrams from `from` (a client that wants to
    /// know whether the relay answers over UDP).
    pub fn with_udp_from(
        udp: std::net::UdpSocket,
        hub: Arc<Hub>,
        from: SocketAddr,
    ) -> io::Result<Arc<MuxSocket>> {
        Self::make_udp(udp, hub, Some(from), None)
    }

    fn make_udp(
        udp: std::net::UdpSocket,
        hub: Arc<Hub>,
        count_from: Option<SocketAddr>,
        tap: Option<Arc<dyn PacketTap>>,
    ) -> io::Result<Arc<MuxSocket>> {
        let local = udp.local_addr()?;
        let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
        let udp = runtime.wrap_udp_socket(udp)?;
        Ok(Arc::new(MuxSocket {
            udp: Some(udp),
            hub,
            local,
            hub_first: AtomicBool::new(false),
            udp_received: AtomicU64::new(0),
            count_from,
            tap,
        }))
    }

    /// A socket over the links of `hub` only (a client on TCP). `local` is what quinn is told.
    pub fn links_only(hub: Arc<Hub>, local: SocketAddr) -> Arc<MuxSocket> {
        Arc::new(MuxSocket {
            udp: None,
            hub,
            local,
            hub_first: AtomicBool::new(false),
            udp_received: AtomicU64::new(0),
            count_from: None,
            tap: None,
        })
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Datagrams received on the UDP socket so far.
    pub fn udp_received(&self) -> u64 {
        self.udp_received.load(Ordering::Relaxed)
    }

    fn poll_udp(
        &self,
        udp: &Arc<dyn AsyncUdpSocket>,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let r = udp.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(n)) = &r {
            for (m, b) in meta.iter_mut().zip(bufs.iter_mut()).take(*n) {
                if is_link_address(m.addr) {
                    // A forged source in the links' range: quinn skips an empty datagram.
                    m.len = 0;
                    continue;
                }
                let len = m.len.min(b.len());
                let tapped = self.tap.as_ref().filter(|_| {
                    b[..len]
                        .chunks(m.stride.max(1))
                        .any(crate::direct::is_direct_packet)
                });
                if let Some(tap) = tapped {
                    // Forwarded; what is left (QUIC packets of the same flow) goes on to quinn,
                    // which skips an empty datagram.
                    m.len = tap_datagrams(&**tap, &**udp, m, &mut b[..len]);
                }
                if self.count_from.is_none_or(|f| {
                    f.port() == m.addr.port() && f.ip().to_canonical() == m.addr.ip().to_canonical()
                }) {
                    self.udp_received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        r
    }
}

/// Where a tapped packet goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Onward {
    pub to: SocketAddr,
    /// From which of this host's addresses (`None`: the system's choice).
    pub src: Option<IpAddr>,
    /// Whether it may leave in one send with others of its flow (GSO): its size is known to fit
    /// the path.
    pub batch: bool,
}

/// Hands one received buffer's non-QUIC packets (several when the kernel coalesced a flow's
/// datagrams: GRO) to the tap and sends them on: in one `sendmsg` (GSO) when the whole buffer
/// goes to one place, as a flow's packets do. Returns the length of the QUIC packets left, moved
/// to the buffer's front.
fn tap_datagrams(
    tap: &dyn PacketTap,
    udp: &dyn AsyncUdpSocket,
    m: &RecvMeta,
    buf: &mut [u8],
) -> usize {
    let stride = m.stride.max(1);
    let mut dests: [Option<Onward>; 64] = [None; 64];
    let mut count = 0;
    for (i, seg) in buf.chunks_mut(stride).enumerate() {
        let to = if crate::direct::is_direct_packet(seg) {
            tap.packet(seg, m.addr)
        } else {
            None
        };
        if let Some(d) = dests.get_mut(i) {
            *d = to;
        }
        count = i + 1;
    }
    let first = dests[0];
    let one_place = count > 1
        && count <= dests.len()
        && count <= udp.max_transmit_segments()
        && first.is_some_and(|f| f.batch)
        && dests[..count].iter().all(|d| *d == first);
    match first {
        Some(to) if one_place => {
            send_on(tap, udp, to, buf, Some(stride));
            return 0;
        }
        _ => {
            for (i, seg) in buf.chunks(stride).enumerate() {
                if let Some(Some(to)) = dests.get(i) {
                    send_on(tap, udp, *to, seg, None);
                }
            }
        }
    }
    crate::direct::keep_quic(buf, stride)
}

fn send_on(
    tap: &dyn PacketTap,
    udp: &dyn AsyncUdpSocket,
    onward: Onward,
    contents: &[u8],
    segment_size: Option<usize>,
) {
    let t = Transmit {
        destination: onward.to,
        ecn: None,
        contents,
        segment_size,
        src_ip: onward.src,
    };
    if udp.try_send(&t).is_err() {
        tap.send_failed();
    }
}

#[derive(Debug)]
struct AlwaysWritable;
impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for MuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        match &self.udp {
            Some(u) => u.clone().create_io_poller(),
            None => Box::pin(AlwaysWritable),
        }
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        if let Some(link) = self.hub.link(&t.destination) {
            let seg = t.segment_size.unwrap_or(t.contents.len()).max(1);
            for chunk in t.contents.chunks(seg) {
                link.send(Bytes::copy_from_slice(chunk));
            }
            return Ok(());
        }
        match &self.udp {
            Some(u) if !is_link_address(t.destination) => u.try_send(t),
            // A link that is gone: the packet is lost, as on a dead UDP path.
            _ => Ok(()),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let Some(udp) = &self.udp else {
            let n = self.hub.poll_into(cx, bufs, meta);
            return if n > 0 {
                Poll::Ready(Ok(n))
            } else {
                Poll::Pending
            };
        };
        let hub_first = !self.hub_first.fetch_xor(true, Ordering::Relaxed);
        if hub_first {
            let n = self.hub.poll_into(cx, bufs, meta);
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            self.poll_udp(udp, cx, bufs, meta)
        } else {
            match self.poll_udp(udp, cx, bufs, meta) {
                Poll::Pending => {}
                r => return r,
            }
            let n = self.hub.poll_into(cx, bufs, meta);
            if n > 0 {
                Poll::Ready(Ok(n))
            } else {
                Poll::Pending
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn max_transmit_segments(&self) -> usize {
        self.udp.as_ref().map_or(1, |u| u.max_transmit_segments())
    }

    fn max_receive_segments(&self) -> usize {
        self.udp.as_ref().map_or(1, |u| u.max_receive_segments())
    }

    fn may_fragment(&self) -> bool {
        self.udp.as_ref().is_some_and(|u| u.may_fragment())
    }
}

/// Sets the options every link's TCP socket gets: no Nagle delay, a small unsent backlog.
pub fn tune_tcp(s: &tokio::net::TcpStream) {
    let _ = s.set_nodelay(true);
    let sock = socket2::SockRef::from(s);
    if let Err(e) = sock.set_tcp_notsent_lowat(NOTSENT_LOWAT) {
        tracing::debug!(error = %e, "TCP_NOTSENT_LOWAT not available");
    }
}

/// TLS-over-TCP framing of a stream (after the preamble): 2-byte length, packet.
pub fn native_framing<S>(stream: S) -> (PacketRx, PacketTx)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let codec = tokio_util::codec::LengthDelimitedCodec::builder()
        .length_field_length(2)
        .max_frame_length(MAX_TUNNEL_PACKET)
        .new_codec();
    let (r, w) = tokio::io::split(stream);
    let rx = tokio_util::codec::FramedRead::new(r, codec.clone()).map(|r| r.map(|b| b.freeze()));
    let tx = tokio_util::codec::FramedWrite::new(w, codec);
    (Box::pin(rx), Box::pin(tx))
}

/// WebSocket settings of links: messages no larger than a packet, small write buffer.
pub fn websocket_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(64 * 1024)
        .max_message_size(Some(MAX_TUNNEL_PACKET))
        .max_frame_size(Some(MAX_TUNNEL_PACKET))
}

/// WebSocket framing: one binary message per packet; pings are answered by the library, text is a
/// protocol error, a close ends the stream.
pub fn websocket_framing<S>(ws: tokio_tungstenite::WebSocketStream<S>) -> (PacketRx, PacketTx)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tokio_tungstenite::tungstenite::{Error as WsError, Message};
    let (w, r) = ws.split();
    let ws_err = |e: WsError| match e {
        WsError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    };
    let rx = r.filter_map(move |m| async move {
        match m {
            Ok(Message::Binary(b)) => Some(Ok(b)),
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => None,
            Ok(Message::Close(_)) | Err(WsError::ConnectionClosed) => None,
            Ok(Message::Text(_)) => Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "text message on a link",
            ))),
            Err(e) => Some(Err(ws_err(e))),
        }
    });
    let tx = w
        .sink_map_err(ws_err)
        .with(|b: Bytes| std::future::ready(Ok::<_, io::Error>(Message::Binary(b))));
    (Box::pin(rx), Box::pin(tx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_drops_on_size_and_age() {
        let t0 = Instant::now();
        let mut q = SendQueue::new(QueueLimits {
            max_bytes: 3000,
            max_delay: Duration::from_millis(40),
        });
        assert!(q.push(t0, Bytes::from(vec![0; 1200])));
        assert!(q.push(t0, Bytes::from(vec![1; 1200])));
        // A third would exceed 3000 bytes.
        assert!(!q.push(t0, Bytes::from(vec![2; 1200])));
        assert_eq!(q.dropped(), 1);
        let t1 = t0 + Duration::from_millis(10);
        assert!(q.push(t1, Bytes::from(vec![3; 500])));
        // 50 ms later the first two are stale, the third (queued at t1) is 40 ms old: still sent.
        let t2 = t0 + Duration::from_millis(50);
        let p = q.pop(t2).expect("fresh packet");
        assert_eq!(p[0], 3);
        assert_eq!(q.dropped(), 3);
        assert_eq!(q.bytes(), 0);
        assert!(q.pop(t2).is_none());
    }

    #[test]
    fn link_addresses_are_reserved_and_distinct() {
        let a = link_address(0, false);
        let b = link_address(65_535, false);
        let c = link_address(65_536, true);
        assert!(is_link_address(a) && is_link_address(b) && is_link_address(c));
        assert_ne!(a, b);
        assert!(c.is_ipv6());
        assert!(!is_link_address("203.0.113.7:4433".parse().expect("addr")));
        assert!(!is_link_address(
            "[2001:db8::1]:4433".parse().expect("addr")
        ));
        assert!(!is_link_address(
            "[::ffff:10.0.0.1]:4433".parse().expect("addr")
        ));
        assert!(is_link_address(
            "[::ffff:240.0.0.9]:1".parse().expect("addr")
        ));
        // The counter never leaves the range.
        assert!(is_link_address(link_address(u64::MAX, false)));
    }

    #[tokio::test]
    async fn native_framing_round_trip_and_oversize() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (_arx, mut atx) = native_framing(a);
        let (mut brx, _btx) = native_framing(b);
        atx.send(Bytes::from_static(b"hello")).await.expect("send");
        assert_eq!(&brx.next().await.expect("item").expect("ok")[..], b"hello");
        // A frame announcing more than MAX_TUNNEL_PACKET is an error, not an allocation.
        let (mut c, d) = tokio::io::duplex(1024);
        let (mut drx, _dtx) = native_framing(d);
        use tokio::io::AsyncWriteExt;
        c.write_all(&[0xff, 0xff, 1, 2, 3]).await.expect("write");
        assert!(drx.next().await.expect("item").is_err());
    }
}
