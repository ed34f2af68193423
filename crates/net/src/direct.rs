//! The UDP socket a session's direct path uses: the same socket as the outer QUIC link where there is
//! one, so that the NAT mapping the relay observed is the mapping the peer's probes reach.
//!
//! # Telling the two kinds of packet apart
//! Every QUIC packet has the "fixed bit" (0x40 of the first byte) set, unless the receiver
//! advertised `grease_quic_bit`. Client endpoints made by [`crate::client_endpoint`] do not
//! advertise it ([`client_endpoint_config`]), so a packet from the relay always has the bit set.
//! Direct-path packets ([`is_direct_packet`]) have it clear: the [`TapSocket`] under the outer
//! endpoint hands those to the [`DirectPort`]'s subscriber and everything else to quinn.
//!
//! Nothing here authenticates anything: the session layer's probes carry a MAC, and the data they
//! carry is the inner QUIC connection's own encrypted packets.

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// Direct-path packets queued for the session before new ones are dropped.
const QUEUE: usize = 2048;
/// Largest direct-path packet accepted (bigger ones are dropped: the session never sends them).
pub const MAX_DIRECT_PACKET: usize = 2048;

/// Whether a UDP payload is a direct-path packet rather than QUIC (fixed bit clear).
pub fn is_direct_packet(p: &[u8]) -> bool {
    p.first().is_some_and(|b| b & 0x40 == 0)
}

/// Moves the QUIC packets (fixed bit set) among the `stride`-sized segments of `buf` to its front,
/// in order, and returns their length: the other packets were taken already. The segments keep
/// their size, so only the last one can be short, as GRO leaves them.
pub fn keep_quic(buf: &mut [u8], stride: usize) -> usize {
    let stride = stride.max(1);
    let mut kept = 0;
    let mut at = 0;
    while at < buf.len() {
        let end = (at + stride).min(buf.len());
        if !is_direct_packet(&buf[at..end]) {
            if kept != at {
                buf.copy_within(at..end, kept);
            }
            kept += end - at;
        }
        at = end;
    }
    kept
}

/// The endpoint configuration of clients: no QUIC-bit greasing, so direct-path packets and the
/// relay's QUIC packets can share one socket.
pub fn client_endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    c.grease_quic_bit(false);
    c
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One received direct-path packet and where it came from.
pub type DirectPacket = (Bytes, SocketAddr);

struct PortInner {
    /// A non-blocking handle of the socket (the outer endpoint's, or one of its own): sends at
    /// once, where tokio's `try_*` refuse until the reactor has seen the socket writable.
    sender: std::net::UdpSocket,
    /// quinn-udp's view of it, for sends of several packets in one call (GSO).
    state: Option<quinn::udp::UdpSocketState>,
    /// Shared with the outer QUIC endpoint.
    shared: bool,
    local: SocketAddr,
    sub: Mutex<Option<mpsc::Sender<DirectPacket>>>,
    received: AtomicU64,
    dropped: AtomicU64,
    reader: Mutex<Option<tokio::task::AbortHandle>>,
    /// Relay channels of sessions on this socket, by token: the relay's address and where the
    /// payloads go (straight to the session's inner socket, no task in between).
    channels: Mutex<HashMap<u64, ChannelSink>>,
    channel_received: AtomicU64,
}

struct ChannelSink {
    relay: SocketAddr,
    sink: Arc<dyn ChannelReceiver>,
}

/// Takes the payloads of one relay channel as they arrive (on the receive path of the socket:
/// quick, never blocking). False: dropped.
pub trait ChannelReceiver: Send + Sync {
    fn receive(&self, payload: &[u8]) -> bool;
}

impl ChannelReceiver for mpsc::Sender<Bytes> {
    fn receive(&self, payload: &[u8]) -> bool {
        self.try_send(Bytes::copy_from_slice(payload)).is_ok()
    }
}

impl Drop for PortInner {
    fn drop(&mut self) {
        if let Some(r) = lock(&self.reader).take() {
            r.abort();
        }
    }
}

/// Sends and receives direct-path packets on one UDP socket. Cheap to clone. One session at a time
/// subscribes to what arrives ([`DirectPort::subscribe`]).
#[derive(Clone)]
pub struct DirectPort(Arc<PortInner>);

impl fmt::Debug for DirectPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectPort")
            .field("local", &self.0.local)
            .field("shared", &self.0.shared)
            .finish()
    }
}

impl DirectPort {
    fn new(sender: std::net::UdpSocket, shared: bool, local: SocketAddr) -> DirectPort {
        // Only on the outer endpoint's socket, whose reader (quinn) takes coalesced receives: the
        // state switches on GRO, which the plain reader of a port's own socket could not split.
        let state = shared
            .then(|| quinn::udp::UdpSocketState::new((&sender).into()).ok())
            .flatten();
        DirectPort(Arc::new(PortInner {
            sender,
            state,
            shared,
            local,
            sub: Mutex::new(None),
            received: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            reader: Mutex::new(None),
            channels: Mutex::new(HashMap::new()),
            channel_received: AtomicU64::new(0),
        }))
    }

    /// A port on a UDP socket of its own, bound to `local` (for a session whose relay link has no
    /// UDP socket: it runs over TCP).
    pub fn bind(local: SocketAddr) -> Result<DirectPort, crate::NetError> {
        let std = crate::bind_udp(local)?;
        let err = |source| crate::NetError::Bind {
            addr: local,
            source,
        };
        std.set_nonblocking(true).map_err(err)?;
        let local = std.local_addr().map_err(err)?;
        let sender = std.try_clone().map_err(err)?;
        let sock = tokio::net::UdpSocket::from_std(std).map_err(err)?;
        let port = DirectPort::new(sender, false, local);
        let weak = Arc::downgrade(&port.0);
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DIRECT_PACKET + 1];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    // ICMP errors surface here on some systems; the socket stays usable.
                    tokio::task::yield_now().await;
                    continue;
                };
                let Some(port) = weak.upgrade() else { return };
                if is_direct_packet(&buf[..n]) {
                    port.deliver(&buf[..n], from);
                }
            }
        });
        *lock(&port.0.reader) = Some(reader.abort_handle());
        Ok(port)
    }

    /// The socket's local address (its port is the one the peer's probes must reach).
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local
    }

    /// Whether this port shares the outer QUIC link's socket.
    pub fn is_shared(&self) -> bool {
        self.0.shared
    }

    /// Sends one packet (which must be a direct-path packet) to `dest`. A full socket buffer loses
    /// the packet, as UDP does.
    pub fn send_to(&self, dest: SocketAddr, payload: &[u8]) -> io::Result<()> {
        debug_assert!(is_direct_packet(payload));
        let dest = self.reachable(dest);
        match self.0.sender.send_to(payload, dest).map(|_| ()) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            r => r,
        }
    }

    /// How many packets one [`DirectPort::send_segments`] call may carry.
    pub fn max_segments(&self) -> usize {
        self.0.state.as_ref().map_or(1, |s| s.max_gso_segments())
    }

    /// Sends `buf`, packets of `stride` bytes each (the last may be shorter), to `dest` in one
    /// call where the system can (GSO), one by one otherwise. A full socket buffer loses them,
    /// as UDP does.
    pub fn send_segments(&self, dest: SocketAddr, buf: &[u8], stride: usize) -> io::Result<()> {
        let stride = stride.max(1);
        let Some(state) = self
            .0
            .state
            .as_ref()
            .filter(|s| s.max_gso_segments() >= buf.len().div_ceil(stride))
        else {
            for p in buf.chunks(stride) {
                self.send_to(dest, p)?;
            }
            return Ok(());
        };
        let t = Transmit {
            destination: self.reachable(dest),
            ecn: None,
            contents: buf,
            segment_size: (buf.len() > stride).then_some(stride),
            src_ip: None,
        };
        match state.send((&self.0.sender).into(), &t) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            r => r,
        }
    }

    /// `dest` as this socket reaches it (a dual-stack socket reaches IPv4 peers through mapped
    /// addresses).
    fn reachable(&self, dest: SocketAddr) -> SocketAddr {
        match (self.0.local, dest) {
            (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            _ => dest,
        }
    }

    /// Takes what arrives from now on. `None` while another session holds it.
    pub fn subscribe(&self) -> Option<mpsc::Receiver<DirectPacket>> {
        let mut sub = lock(&self.0.sub);
        if sub.as_ref().is_some_and(|s| !s.is_closed()) {
            return None;
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        *sub = Some(tx);
        Some(rx)
    }

    /// Takes a relay channel's packets from now on: those from `relay` with `token` (see
    /// [`crate::channel`]), their payloads to `sink`.
    pub fn set_channel(&self, relay: SocketAddr, token: u64, sink: Arc<dyn ChannelReceiver>) {
        let relay = SocketAddr::new(relay.ip().to_canonical(), relay.port());
        lock(&self.0.channels).insert(token, ChannelSink { relay, sink });
    }

    /// Stops taking the packets of the channel with `token` (its session's link is gone, or the
    /// relay gave a new token).
    pub fn clear_channel(&self, token: u64) {
        lock(&self.0.channels).remove(&token);
    }

    /// Channel payloads delivered so far.
    pub fn channel_received(&self) -> u64 {
        self.0.channel_received.load(Ordering::Relaxed)
    }

    /// Direct-path packets received (delivered or not) and dropped (nobody subscribed, or the
    /// queue was full).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.0.received.load(Ordering::Relaxed),
            self.0.dropped.load(Ordering::Relaxed),
        )
    }
}

impl PortInner {
    fn deliver(&self, p: &[u8], from: SocketAddr) {
        self.received.fetch_add(1, Ordering::Relaxed);
        if p.len() > MAX_DIRECT_PACKET {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        if let Some((token, payload)) = crate::channel::parse(p) {
            let sink = lock(&self.channels)
                .get(&token)
                .filter(|c| c.relay == from)
                .map(|c| c.sink.clone());
            let ok = sink.is_some_and(|s| s.receive(payload));
            if ok {
                self.channel_received.fetch_add(1, Ordering::Relaxed);
            } else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let ok = lock(&self.sub)
            .as_ref()
            .is_some_and(|s| s.try_send((Bytes::copy_from_slice(p), from)).is_ok());
        if !ok {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The outer endpoint's socket: QUIC packets to quinn, direct-path packets to the [`DirectPort`].
pub struct TapSocket {
    udp: Arc<dyn AsyncUdpSocket>,
    port: DirectPort,
}

impl fmt::Debug for TapSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TapSocket")
            .field("local", &self.port.0.local)
            .finish()
    }
}

impl TapSocket {
    /// Wraps `udp` (bound) for a quinn endpoint; the port shares it.
    pub fn new(udp: std::net::UdpSocket) -> io::Result<(Arc<TapSocket>, DirectPort)> {
        let local = udp.local_addr()?;
        let sender = udp.try_clone()?;
        let udp = quinn::TokioRuntime.wrap_udp_socket(udp)?;
        // quinn made the socket non-blocking; the clone shares that.
        sender.set_nonblocking(true)?;
        let port = DirectPort::new(sender, true, local);
        Ok((
            Arc::new(TapSocket {
                udp,
                port: port.clone(),
            }),
            port,
        ))
    }
}

use quinn::Runtime as _;

impl AsyncUdpSocket for TapSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.udp.clone().create_io_poller()
    }

    fn try_send(&self, t: &Transmit) -> io::Result<()> {
        self.udp.try_send(t)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let n = match self.udp.poll_recv(cx, bufs, meta) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        for (m, b) in meta.iter_mut().zip(bufs.iter_mut()).take(n) {
            let len = m.len.min(b.len());
            let stride = m.stride.max(1);
            let data = &mut b[..len];
            // One flow's segments (GRO coalesces only same-source datagrams, of one size but the
            // last): direct-path and QUIC packets of one 5-tuple may share a buffer.
            if !data.chunks(stride).any(is_direct_packet) {
                continue;
            }
            for seg in data.chunks(stride) {
                if is_direct_packet(seg) {
                    self.port.0.deliver(seg, m.addr);
                }
            }
            // The QUIC packets go on to quinn (an empty datagram it skips).
            m.len = keep_quic(data, stride);
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.udp.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.udp.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.udp.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixed_bit_tells_the_packets_apart() {
        assert!(is_direct_packet(&[0x01, 0xff]));
        assert!(is_direct_packet(&[0x3f]));
        assert!(!is_direct_packet(&[0x40]));
        assert!(!is_direct_packet(&[0xc3, 0, 0, 0, 1]));
        assert!(!is_direct_packet(&[]));
    }

    #[test]
    fn quic_segments_are_kept_in_order_and_the_rest_taken_out() {
        // Three 4-byte segments and a short last one: QUIC, direct, QUIC, direct.
        let mut b = [0x40, 1, 1, 1, 0x04, 2, 2, 2, 0xc0, 3, 3, 3, 0x03, 4];
        let n = keep_quic(&mut b, 4);
        assert_eq!(&b[..n], &[0x40, 1, 1, 1, 0xc0, 3, 3, 3]);
        // A short QUIC packet last stays last.
        let mut b = [0x04, 2, 2, 2, 0x41, 9];
        let n = keep_quic(&mut b, 4);
        assert_eq!(&b[..n], &[0x41, 9]);
        let mut b = [0x04, 2, 2, 2];
        assert_eq!(keep_quic(&mut b, 4), 0);
    }

    #[tokio::test]
    async fn own_ports_exchange_direct_packets_and_ignore_the_rest() {
        let a = DirectPort::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let b = DirectPort::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut rx = b.subscribe().unwrap();
        assert!(b.subscribe().is_none(), "one subscriber at a time");
        // A QUIC-looking packet is not a direct-path packet: dropped by the port.
        let raw = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        raw.send_to(&[0xc0, 1, 2], b.local_addr()).unwrap();
        a.send_to(b.local_addr(), &[0x03, 9, 9]).unwrap();
        let (p, from) = tokio::time::timeout(std::time::Duration::from_secs(2), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&p[..], &[0x03, 9, 9]);
        assert_eq!(from, a.local_addr());
        assert_eq!(b.counts().0, 1);
        drop(rx);
        assert!(
            b.subscribe().is_some(),
            "a dropped subscriber frees the port"
        );
    }
}
