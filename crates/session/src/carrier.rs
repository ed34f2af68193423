//! The virtual UDP socket that carries the inner QUIC connection as opaque payloads over the outer
//! relay link, and the carrier that owns the outer link's payload path.
//!
//! # Sizes
//! Inner QUIC sends packets of 1200 bytes and more; the outer connection's DATAGRAM frames hold only
//! ≈1162 bytes until outer path-MTU discovery raised it (≈1414 on a 1500-byte path). A packet that does
//! not fit is carried by the [`Fallback`]:
//! * [`Fallback::Fragment`] (default) splits it into datagrams with a 5-byte header and reassembles them
//!   (bounded: 64 packets in reassembly, 8 parts each). Loss of a part loses the packet, which inner QUIC
//!   recovers like any loss; nothing queues behind it.
//! * [`Fallback::Stream`] sends it on the relay's length-framed payload stream: reliable and ordered, so
//!   a lost outer packet delays the packets behind it (head-of-line blocking).
//!
//! The session benchmark measures both (setup time and throughput); see the README.
//!
//! # Pacing
//! quinn drops the oldest queued datagram when its send buffer is full, silently. The socket reports
//! `WouldBlock` instead when the outer datagram buffer lacks room, and its poller waits for room, so
//! inner QUIC's own pacing and congestion control see back-pressure rather than invisible loss.

use crate::direct::PathKind;
use bytes::{BufMut, Bytes, BytesMut};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Connection, UdpPoller};
use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tandem_client::LinkChannel;
use tandem_client::tandem_net::channel;
use tandem_client::tandem_net::direct::{ChannelReceiver, DirectPort};
use tandem_proto::{FRAME_HEADER, MAX_PAYLOAD_FRAME, frame_len};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// How an inner packet larger than the outer datagram size travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Fallback {
    #[default]
    Fragment,
    Stream,
}

const KIND_WHOLE: u8 = 0;
const KIND_FRAGMENT: u8 = 1;
const FRAG_HEADER: usize = 5;
const MAX_PARTS: u8 = 8;
const MAX_REASSEMBLY: usize = 64;
/// Largest inner packet accepted from the peer.
pub const MAX_INNER_PACKET: usize = 2048;
/// Largest direct-path data packet sent: inner QUIC's packets (at most 1380 bytes, see
/// `inner::transport`) and the 1-byte header fit a 1500-byte path over IPv6 with room for a tunnel.
const MAX_DIRECT_DATA: usize = 1400;
const CHANNEL_HEADER: usize = channel::HEADER;
/// Inner packets quinn may hand the virtual socket at once (it batches them for GSO); on the relay
/// channel they leave in one send.
const GSO_SEGMENTS: usize = 10;
/// Inner packets queued towards quinn before new ones are dropped (as a full UDP buffer would).
const INBOUND_QUEUE: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters of the carrier (for stats and the benchmark).
#[derive(Debug, Default)]
pub struct CarrierStats {
    pub sent_whole: AtomicU64,
    pub sent_fragmented: AtomicU64,
    pub sent_stream: AtomicU64,
    pub received: AtomicU64,
    pub dropped_inbound: AtomicU64,
    pub bad_inbound: AtomicU64,
    pub blocked: AtomicU64,
    /// Inner packets sent and received on the direct path, and the bytes sent there.
    pub sent_direct: AtomicU64,
    pub received_direct: AtomicU64,
    pub direct_bytes: AtomicU64,
    /// Inner packets sent on the relay channel.
    pub sent_channel: AtomicU64,
}

/// Hellos on a channel until the peer answers: ten a second for [`FAST_HELLOS`], then one.
const HELLO_EVERY: Duration = Duration::from_millis(100);
const FAST_HELLOS: u32 = 30;
/// On a working channel, a hello once nothing came from the peer for this long...
const PROBE_AFTER: Duration = Duration::from_millis(300);
/// ...and back to DATAGRAMs once nothing came for this long.
const DEAD_AFTER: Duration = Duration::from_millis(1500);

/// Whether a relay channel works both ways. Inner packets go on it only once a hello of this
/// side's was answered (the answer proves this side → relay → peer → relay → this side); while
/// on it, a side that hears nothing from the peer for [`PROBE_AFTER`] asks again, and after
/// [`DEAD_AFTER`] of silence goes back to DATAGRAM frames (a peer that resumed over TCP, a
/// channel the relay closed, a NAT that moved the address). Pure: time comes in as arguments.
#[derive(Debug, Default)]
pub(crate) struct ChannelCheck {
    armed: bool,
    last_heard: Option<Instant>,
    last_hello: Option<Instant>,
    unanswered: u32,
    last_answer: Option<Instant>,
}

impl ChannelCheck {
    /// A new token: nothing is known about the peer on it.
    fn reset(&mut self) {
        *self = ChannelCheck::default();
    }

    /// Anything from the peer on the channel.
    fn heard(&mut self, now: Instant) {
        self.last_heard = Some(now);
    }

    /// The peer answered a hello: the channel works both ways.
    fn answered(&mut self, now: Instant) {
        self.heard(now);
        self.armed = true;
        self.unanswered = 0;
    }

    /// The peer's hello: whether to answer it (at most ten answers a second, whatever the peer
    /// sends).
    fn answer(&mut self, now: Instant) -> bool {
        self.heard(now);
        if self
            .last_answer
            .is_some_and(|t| now.saturating_duration_since(t) < HELLO_EVERY)
        {
            return false;
        }
        self.last_answer = Some(now);
        true
    }

    /// Whether to send a hello now; leaves the channel when the peer went silent.
    fn tick(&mut self, now: Instant, heard: Option<Instant>) -> bool {
        if let Some(h) = heard
            && self.last_heard.is_none_or(|l| h > l)
        {
            self.last_heard = Some(h);
        }
        let silent = |after: Duration| {
            self.last_heard
                .is_none_or(|h| now.saturating_duration_since(h) >= after)
        };
        if self.armed && silent(DEAD_AFTER) {
            self.armed = false;
            self.unanswered = 0;
        }
        let every = if self.armed {
            if !silent(PROBE_AFTER) {
                return false;
            }
            HELLO_EVERY * 3
        } else if self.unanswered < FAST_HELLOS {
            HELLO_EVERY
        } else {
            HELLO_EVERY * 10
        };
        if self
            .last_hello
            .is_some_and(|t| now.saturating_duration_since(t) < every)
        {
            return false;
        }
        self.last_hello = Some(now);
        if !self.armed {
            self.unanswered = self.unanswered.saturating_add(1);
        }
        true
    }

    fn armed(&self) -> bool {
        self.armed
    }
}

/// The channel's receiving end: on the socket's receive path, straight into the inner socket's
/// queue. Hellos are answered; answers arm the channel.
struct ChannelIn(std::sync::Weak<Carrier>);

impl ChannelReceiver for ChannelIn {
    fn receive(&self, payload: &[u8]) -> bool {
        let Some(c) = self.0.upgrade() else {
            return false;
        };
        if payload == channel::HELLO {
            let answer = lock(&c.check).answer(Instant::now());
            if answer {
                c.send_channel_control(channel::READY);
            }
            return true;
        }
        if payload == channel::READY {
            let mut check = lock(&c.check);
            check.answered(Instant::now());
            c.armed.store(check.armed(), Ordering::SeqCst);
            return true;
        }
        // Cheap per packet: the checker reads it at its next tick.
        c.heard_ms
            .store(c.epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
        c.deliver(Bytes::copy_from_slice(payload));
        true
    }
}

/// Where channel packets go: the link's socket, the relay, this side's token.
#[derive(Clone)]
struct ChannelOut {
    port: DirectPort,
    relay: SocketAddr,
    token: u64,
}

/// Reassembly of fragmented packets.
#[derive(Default)]
struct Reassembly {
    partial: HashMap<u16, Partial>,
}

struct Partial {
    parts: Vec<Option<Bytes>>,
    have: usize,
    first: Instant,
}

impl Reassembly {
    /// Feeds one fragment; returns the whole packet when complete.
    fn feed(&mut self, id: u16, index: u8, count: u8, part: Bytes) -> Option<Bytes> {
        if count == 0 || count > MAX_PARTS || index >= count {
            return None;
        }
        if !self.partial.contains_key(&id) && self.partial.len() >= MAX_REASSEMBLY {
            // Forget the oldest incomplete packet.
            if let Some(old) = self
                .partial
                .iter()
                .min_by_key(|(_, p)| p.first)
                .map(|(k, _)| *k)
            {
                self.partial.remove(&old);
            }
        }
        let p = self.partial.entry(id).or_insert_with(|| Partial {
            parts: vec![None; count as usize],
            have: 0,
            first: Instant::now(),
        });
        if p.parts.len() != count as usize {
            // Inconsistent with earlier fragments of this id: start over.
            self.partial.remove(&id);
            return None;
        }
        let slot = &mut p.parts[index as usize];
        if slot.is_none() {
            *slot = Some(part);
            p.have += 1;
        }
        if p.have < count as usize {
            return None;
        }
        let p = self.partial.remove(&id)?;
        let total: usize = p.parts.iter().flatten().map(|b| b.len()).sum();
        if total > MAX_INNER_PACKET {
            return None;
        }
        let mut out = BytesMut::with_capacity(total);
        for b in p.parts.into_iter().flatten() {
            out.put_slice(&b);
        }
        Some(out.freeze())
    }
}

/// Decodes one outer datagram into an inner packet (or a fragment of one).
fn decode_datagram(d: Bytes, reasm: &mut Reassembly) -> Result<Option<Bytes>, ()> {
    match d.first() {
        Some(&KIND_WHOLE) if d.len() > 1 && d.len() - 1 <= MAX_INNER_PACKET => {
            Ok(Some(d.slice(1..)))
        }
        Some(&KIND_FRAGMENT) if d.len() > FRAG_HEADER => {
            let id = u16::from_be_bytes([d[1], d[2]]);
            Ok(reasm.feed(id, d[3], d[4], d.slice(FRAG_HEADER..)))
        }
        _ => Err(()),
    }
}

/// Owns the outer link's payload path for one session: sends inner packets, and feeds the ones that
/// arrive to the virtual socket. The outer connection can be swapped (resume after a lost link).
pub struct Carrier {
    conn: Mutex<Option<Connection>>,
    stream_tx: Mutex<Option<mpsc::UnboundedSender<Bytes>>>,
    tasks: Mutex<Vec<AbortHandle>>,
    inbound_tx: mpsc::Sender<Bytes>,
    inbound_rx: Mutex<Option<mpsc::Receiver<Bytes>>>,
    fallback: Fallback,
    next_id: AtomicU16,
    /// Where inner packets go instead of the relay, while a direct path answers.
    direct: Mutex<Option<(DirectPort, SocketAddr)>>,
    /// The relay channel of the current link, once the relay gave this side its token.
    channel: Mutex<Option<ChannelOut>>,
    /// Whether the channel works both ways (inner packets go there only then): a mirror of
    /// `check`, read on every send.
    armed: AtomicBool,
    check: Mutex<ChannelCheck>,
    /// When an inner packet last came on the channel (ms since `epoch`, plus one; 0: never).
    heard_ms: AtomicU64,
    epoch: Instant,
    path: tokio::sync::watch::Sender<PathKind>,
    pub stats: CarrierStats,
}

impl fmt::Debug for Carrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Carrier")
            .field("fallback", &self.fallback)
            .field("attached", &lock(&self.conn).is_some())
            .finish()
    }
}

impl Carrier {
    pub fn new(fallback: Fallback) -> Arc<Carrier> {
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        Arc::new(Carrier {
            conn: Mutex::new(None),
            stream_tx: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
            inbound_tx,
            inbound_rx: Mutex::new(Some(inbound_rx)),
            fallback,
            next_id: AtomicU16::new(0),
            direct: Mutex::new(None),
            channel: Mutex::new(None),
            armed: AtomicBool::new(false),
            check: Mutex::new(ChannelCheck::default()),
            heard_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            path: tokio::sync::watch::channel(PathKind::Relay).0,
            stats: CarrierStats::default(),
        })
    }

    /// Starts carrying over `conn` (a paired outer connection), replacing any previous one, and
    /// over its relay channel once the relay gives this side its token.
    pub fn attach(self: &Arc<Self>, conn: Connection, channel: Option<LinkChannel>) {
        self.detach();
        let mut tasks = Vec::new();
        if let Some(LinkChannel {
            port,
            relay,
            mut token,
        }) = channel
        {
            let me = self.clone();
            tasks.push(
                tokio::spawn(async move {
                    let sink: Arc<dyn ChannelReceiver> = Arc::new(ChannelIn(Arc::downgrade(&me)));
                    let mut current: Option<u64> = None;
                    loop {
                        // A new token comes when a side resumed on a new link: the peer must
                        // answer on the channel again before anything is sent on it.
                        let t = *token.borrow_and_update();
                        if t != current {
                            current = t;
                            if let Some(token) = t {
                                me.armed.store(false, Ordering::SeqCst);
                                lock(&me.check).reset();
                                let old = lock(&me.channel).replace(ChannelOut {
                                    port: port.clone(),
                                    relay,
                                    token,
                                });
                                port.set_channel(relay, token, sink.clone());
                                if let Some(old) = old.filter(|o| o.token != token) {
                                    old.port.clear_channel(old.token);
                                }
                            }
                        }
                        if current.is_some() {
                            let heard = match me.heard_ms.load(Ordering::Relaxed) {
                                0 => None,
                                ms => me.epoch.checked_add(Duration::from_millis(ms - 1)),
                            };
                            let (hello, armed) = {
                                let mut check = lock(&me.check);
                                let hello = check.tick(Instant::now(), heard);
                                (hello, check.armed())
                            };
                            me.armed.store(armed, Ordering::SeqCst);
                            if hello {
                                me.send_channel_control(channel::HELLO);
                            }
                        }
                        tokio::select! {
                            r = token.changed() => if r.is_err() { return },
                            _ = tokio::time::sleep(HELLO_EVERY) => {}
                        }
                    }
                })
                .abort_handle(),
            );
        }
        // Datagrams in.
        let me = self.clone();
        let c = conn.clone();
        tasks.push(
            tokio::spawn(async move {
                let mut reasm = Reassembly::default();
                while let Ok(d) = c.read_datagram().await {
                    match decode_datagram(d, &mut reasm) {
                        Ok(Some(p)) => me.deliver(p),
                        Ok(None) => {}
                        Err(()) => {
                            me.stats.bad_inbound.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
            .abort_handle(),
        );
        // Payload streams in (the peer's stream fallback).
        let me = self.clone();
        let c = conn.clone();
        tasks.push(
            tokio::spawn(async move {
                let mut readers = tokio::task::JoinSet::new();
                loop {
                    tokio::select! {
                        s = c.accept_uni() => match s {
                            Ok(recv) => {
                                let me = me.clone();
                                readers.spawn(read_payload_stream(recv, me));
                            }
                            Err(_) => return,
                        },
                        Some(_) = readers.join_next(), if !readers.is_empty() => {}
                    }
                }
            })
            .abort_handle(),
        );
        // Stream fallback out: one writer owning the payload stream.
        if self.fallback == Fallback::Stream {
            let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
            let c = conn.clone();
            tasks.push(
                tokio::spawn(async move {
                    let Ok(mut s) = c.open_uni().await else {
                        return;
                    };
                    while let Some(p) = rx.recv().await {
                        let len = (p.len() as u32).to_be_bytes();
                        if s.write_all(&len).await.is_err() || s.write_all(&p).await.is_err() {
                            return;
                        }
                    }
                })
                .abort_handle(),
            );
            *lock(&self.stream_tx) = Some(tx);
        }
        *lock(&self.tasks) = tasks;
        *lock(&self.conn) = Some(conn);
    }

    /// Stops carrying (the outer link is gone); inner packets are dropped until [`Carrier::attach`].
    pub fn detach(&self) {
        // The tasks first: the channel's task could otherwise put a channel back.
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
        self.armed.store(false, Ordering::SeqCst);
        lock(&self.check).reset();
        if let Some(c) = lock(&self.channel).take() {
            c.port.clear_channel(c.token);
        }
        *lock(&self.conn) = None;
        *lock(&self.stream_tx) = None;
    }

    /// Sends a hello or its answer on the channel, if there is one.
    fn send_channel_control(&self, what: &[u8]) {
        let Some(ch) = lock(&self.channel).clone() else {
            return;
        };
        let mut b = [0u8; CHANNEL_HEADER + 16];
        let b = &mut b[..CHANNEL_HEADER + what.len().min(16)];
        channel::write_header(b, ch.token);
        b[CHANNEL_HEADER..].copy_from_slice(&what[..what.len().min(16)]);
        let _ = ch.port.send_to(ch.relay, b);
    }

    /// The channel to send on: only once the peer was heard on it.
    fn sending_channel(&self) -> Option<ChannelOut> {
        if !self.armed.load(Ordering::SeqCst) {
            return None;
        }
        lock(&self.channel).clone()
    }

    /// Closes the current outer connection (simulates a cut link; see `Session::simulate_link_loss`).
    pub fn close_link(&self) {
        if let Some(c) = lock(&self.conn).as_ref() {
            c.close(quinn::VarInt::from_u32(0), b"link cut");
        }
    }

    /// Sends inner packets on a direct path (`Some`), or through the relay again (`None`).
    pub(crate) fn set_direct(&self, to: Option<(DirectPort, SocketAddr)>, kind: PathKind) {
        *lock(&self.direct) = to;
        self.path.send_if_modified(|p| {
            let changed = *p != kind;
            *p = kind;
            changed
        });
    }

    /// Follows the path inner packets take.
    pub fn path(&self) -> tokio::sync::watch::Receiver<PathKind> {
        self.path.subscribe()
    }

    /// The path inner packets take now.
    pub fn current_path(&self) -> PathKind {
        *self.path.borrow()
    }

    /// An inner packet that came on the direct path.
    pub(crate) fn deliver_direct(&self, p: Bytes) {
        self.stats.received_direct.fetch_add(1, Ordering::Relaxed);
        self.deliver(p);
    }

    /// Sends on the direct path if there is one (true: sent, or lost there); false if the packet
    /// must go through the relay (no direct path, or too large for it).
    fn send_direct(&self, pkt: &[u8]) -> bool {
        let Some((port, to)) = lock(&self.direct).clone() else {
            return false;
        };
        if pkt.len() + 1 > MAX_DIRECT_DATA {
            return false;
        }
        // On the stack: this runs for every inner packet.
        let mut buf = [0u8; MAX_DIRECT_DATA];
        let b = &mut buf[..pkt.len() + 1];
        b[0] = crate::direct::DATA;
        b[1..].copy_from_slice(pkt);
        match port.send_to(to, b) {
            Ok(()) => {
                self.stats.sent_direct.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .direct_bytes
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
                true
            }
            // Unreachable network, refused by a firewall: lost, as on any dead path (the prober
            // notices and goes back to the relay). Not retried through the relay: its buffer may
            // be full, and a WouldBlock here while the poller says "writable" would spin.
            Err(_) => true,
        }
    }

    fn deliver(&self, p: Bytes) {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        if self.inbound_tx.try_send(p).is_err() {
            self.stats.dropped_inbound.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends on the relay channel if there is one and the packet fits the path (true: sent, or
    /// lost there).
    fn send_channel(&self, pkt: &[u8], max_datagram: usize) -> bool {
        match self.sending_channel() {
            Some(ch) => self.channel_out(&ch, pkt, pkt.len(), max_datagram),
            None => false,
        }
    }

    /// Sends a batch of inner packets of `seg` bytes each (the last may be shorter) on the relay
    /// channel in one send (GSO) if there is a channel, no direct path, and they fit (true: sent,
    /// or lost there).
    fn send_channel_batch(&self, contents: &[u8], seg: usize) -> bool {
        if lock(&self.direct).is_some() {
            return false;
        }
        let Some(ch) = self.sending_channel() else {
            return false;
        };
        let max = match lock(&self.conn).as_ref() {
            Some(c) => c.max_datagram_size().unwrap_or(0),
            None => return false,
        };
        self.channel_out(&ch, contents, seg, max)
    }

    /// Writes inner packets of `seg` bytes each (one, or a batch whose last may be shorter) with
    /// the channel's header and sends them, as few sends as the socket allows; false (nothing sent)
    /// if they do not fit a path whose DATAGRAM frames hold `max_datagram` bytes.
    fn channel_out(
        &self,
        ch: &ChannelOut,
        contents: &[u8],
        seg: usize,
        max_datagram: usize,
    ) -> bool {
        if seg == 0 || seg > channel::max_payload(max_datagram) || seg > MAX_DIRECT_DATA {
            return false;
        }
        let stride = seg + CHANNEL_HEADER;
        let per_send = ch.port.max_segments().clamp(1, GSO_SEGMENTS);
        // On the stack: this runs for every inner packet or batch.
        let mut buf = [0u8; GSO_SEGMENTS * (MAX_DIRECT_DATA + CHANNEL_HEADER)];
        for group in contents.chunks(seg * per_send) {
            let mut len = 0;
            for p in group.chunks(seg) {
                let b = &mut buf[len..len + p.len() + CHANNEL_HEADER];
                channel::write_header(b, ch.token);
                b[CHANNEL_HEADER..].copy_from_slice(p);
                len += b.len();
            }
            // A full socket buffer or an unreachable relay: lost, as on any UDP path.
            let _ = ch.port.send_segments(ch.relay, &buf[..len], stride);
            self.stats
                .sent_channel
                .fetch_add(group.len().div_ceil(seg) as u64, Ordering::Relaxed);
        }
        true
    }

    /// Whether inner packets bypass the outer connection's datagram buffer (a direct path or a
    /// relay channel).
    fn bypassing(&self) -> bool {
        lock(&self.direct).is_some() || self.on_channel()
    }

    /// Whether inner packets cross the relay as channel packets now.
    pub fn on_channel(&self) -> bool {
        self.armed.load(Ordering::SeqCst) && lock(&self.channel).is_some()
    }

    /// Room in the outer datagram send buffer (0 when detached).
    fn room(&self) -> usize {
        if self.bypassing() {
            return usize::MAX;
        }
        lock(&self.conn)
            .as_ref()
            .map(|c| c.datagram_send_buffer_space())
            .unwrap_or(usize::MAX)
    }

    /// Sends one inner packet.
    fn send_packet(&self, pkt: &[u8]) -> io::Result<()> {
        if self.send_direct(pkt) {
            return Ok(());
        }
        let conn = match lock(&self.conn).as_ref() {
            Some(c) => c.clone(),
            // No outer link right now (reconnecting): the packet is lost, as on a dead path.
            None => return Ok(()),
        };
        let max = conn.max_datagram_size().unwrap_or(0);
        if max == 0 {
            return Err(io::Error::other(
                "the relay connection does not support datagrams",
            ));
        }
        if self.send_channel(pkt, max) {
            return Ok(());
        }
        if conn.datagram_send_buffer_space() < pkt.len() + 2 * FRAG_HEADER {
            self.stats.blocked.fetch_add(1, Ordering::Relaxed);
            if self.bypassing() {
                // The poller says "writable" while packets bypass this buffer: lost rather than
                // WouldBlock, which would spin quinn's send loop.
                return Ok(());
            }
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if pkt.len() < max {
            let mut b = BytesMut::with_capacity(pkt.len() + 1);
            b.put_u8(KIND_WHOLE);
            b.put_slice(pkt);
            self.stats.sent_whole.fetch_add(1, Ordering::Relaxed);
            return send(&conn, b.freeze());
        }
        match self.fallback {
            Fallback::Stream => {
                if let Some(tx) = lock(&self.stream_tx).as_ref() {
                    let _ = tx.send(Bytes::copy_from_slice(pkt));
                }
                self.stats.sent_stream.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Fallback::Fragment => {
                let room = max - FRAG_HEADER;
                let count = pkt.len().div_ceil(room);
                if count > MAX_PARTS as usize {
                    return Err(io::Error::other("inner packet too large to fragment"));
                }
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                // Equal-sized parts rather than one full and one tiny.
                let part_len = pkt.len().div_ceil(count);
                for (i, part) in pkt.chunks(part_len).enumerate() {
                    let mut b = BytesMut::with_capacity(part.len() + FRAG_HEADER);
                    b.put_u8(KIND_FRAGMENT);
                    b.put_u16(id);
                    b.put_u8(i as u8);
                    b.put_u8(count as u8);
                    b.put_slice(part);
                    send(&conn, b.freeze())?;
                }
                self.stats.sent_fragmented.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// A virtual UDP socket over this carrier, for one inner endpoint. `local` and `peer` are
    /// placeholders quinn needs; nothing is ever sent to them.
    pub fn socket(self: &Arc<Self>, local: SocketAddr, peer: SocketAddr) -> Option<VirtualSocket> {
        let rx = lock(&self.inbound_rx).take()?;
        Some(VirtualSocket {
            carrier: self.clone(),
            inbound: Mutex::new(rx),
            local,
            peer,
        })
    }
}

impl Drop for Carrier {
    fn drop(&mut self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

fn send(conn: &Connection, b: Bytes) -> io::Result<()> {
    match conn.send_datagram(b) {
        Ok(()) => Ok(()),
        // A shrunken path MTU or a closing link: lost like any packet.
        Err(quinn::SendDatagramError::TooLarge)
        | Err(quinn::SendDatagramError::ConnectionLost(_)) => Ok(()),
        Err(e) => Err(io::Error::other(e.to_string())),
    }
}

async fn read_payload_stream(mut recv: quinn::RecvStream, carrier: Arc<Carrier>) {
    let mut header = [0u8; FRAME_HEADER];
    let mut buf = Vec::new();
    loop {
        if recv.read_exact(&mut header).await.is_err() {
            return;
        }
        let Ok(len) = frame_len(header, MAX_PAYLOAD_FRAME) else {
            return;
        };
        buf.resize(len, 0);
        if recv.read_exact(&mut buf).await.is_err() {
            return;
        }
        if len <= MAX_INNER_PACKET {
            carrier.deliver(Bytes::copy_from_slice(&buf));
        } else {
            carrier.stats.bad_inbound.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// quinn's view of the carrier: a UDP socket with one peer.
pub struct VirtualSocket {
    carrier: Arc<Carrier>,
    inbound: Mutex<mpsc::Receiver<Bytes>>,
    local: SocketAddr,
    peer: SocketAddr,
}

impl fmt::Debug for VirtualSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtualSocket")
            .field("local", &self.local)
            .field("peer", &self.peer)
            .finish()
    }
}

/// Waits for room in the outer datagram buffer (quinn offers no notification, so it re-checks every
/// millisecond while blocked; unblocked, it answers at once).
struct Poller {
    carrier: Arc<Carrier>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl fmt::Debug for Poller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Poller")
    }
}

impl UdpPoller for Poller {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        loop {
            if self.carrier.room() >= MAX_INNER_PACKET + 2 * FRAG_HEADER {
                self.sleep = None;
                return Poll::Ready(Ok(()));
            }
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(1))));
            match sleep.as_mut().poll(cx) {
                Poll::Ready(()) => self.sleep = None,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

use std::future::Future;

impl AsyncUdpSocket for VirtualSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller {
            carrier: self.carrier.clone(),
            sleep: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        match transmit.segment_size {
            Some(seg) if seg < transmit.contents.len() => {
                if self.carrier.send_channel_batch(transmit.contents, seg) {
                    return Ok(());
                }
                for (i, p) in transmit.contents.chunks(seg).enumerate() {
                    match self.carrier.send_packet(p) {
                        Ok(()) => {}
                        // Some of the batch went: quinn would send all of it again, so the rest
                        // is lost instead (QUIC recovers it like any loss).
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock && i > 0 => return Ok(()),
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            _ => self.carrier.send_packet(transmit.contents),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut rx = lock(&self.inbound);
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let p = if n == 0 {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(p)) => p,
                    // The carrier is gone: no more packets, ever.
                    Poll::Ready(None) | Poll::Pending => return Poll::Pending,
                }
            } else {
                match rx.try_recv() {
                    Ok(p) => p,
                    Err(_) => break,
                }
            };
            let len = p.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&p[..len]);
            meta[n] = RecvMeta {
                addr: self.peer,
                len,
                stride: len,
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn max_transmit_segments(&self) -> usize {
        // Batches only where they leave in one send: on the relay channel.
        if self.carrier.on_channel() && lock(&self.carrier.direct).is_none() {
            GSO_SEGMENTS
        } else {
            1
        }
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_channel_is_used_only_when_a_hello_was_answered_and_left_when_silent() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut c = ChannelCheck::default();
        // Hellos ten a second while unanswered; hearing the peer's own hello does not arm
        // (it proves only the way from the peer).
        assert!(c.tick(ms(0), None));
        assert!(!c.tick(ms(50), None));
        assert!(c.answer(ms(60)));
        assert!(!c.answer(ms(70)), "at most ten answers a second");
        assert!(!c.armed());
        assert!(c.tick(ms(100), None));
        c.answered(ms(120));
        assert!(c.armed());
        // Inner packets keep it alive; silence brings a hello, then the way back to DATAGRAMs.
        assert!(!c.tick(ms(400), Some(ms(390))));
        assert!(!c.tick(ms(600), None));
        assert!(c.tick(ms(700), None), "300 ms of silence: ask");
        assert!(!c.tick(ms(800), None));
        c.answered(ms(850));
        assert!(!c.tick(ms(1000), None));
        assert!(c.armed());
        c.tick(ms(2300), None);
        assert!(c.armed(), "1.45 s of silence: still on it");
        c.tick(ms(2400), None);
        assert!(!c.armed(), "1.5 s without a word from the peer");
        // Unanswered hellos slow down after the first burst.
        let mut c = ChannelCheck::default();
        let sent = (0..100).filter(|i| c.tick(ms(i * 100), None)).count();
        assert_eq!(sent, FAST_HELLOS as usize + 7);
        // A new token forgets everything.
        c.answered(ms(10_000));
        c.reset();
        assert!(!c.armed());
    }

    #[test]
    fn reassembly_in_any_order_with_duplicates() {
        let mut r = Reassembly::default();
        let a = Bytes::from_static(b"hello ");
        let b = Bytes::from_static(b"world");
        assert_eq!(r.feed(7, 1, 2, b.clone()), None);
        assert_eq!(r.feed(7, 1, 2, b), None, "duplicate part");
        assert_eq!(r.feed(7, 0, 2, a).as_deref(), Some(&b"hello world"[..]));
        assert!(r.partial.is_empty());
    }

    #[test]
    fn reassembly_is_bounded_and_rejects_nonsense() {
        let mut r = Reassembly::default();
        for id in 0..(MAX_REASSEMBLY as u16 + 10) {
            r.feed(id, 0, 2, Bytes::from_static(b"x"));
        }
        assert_eq!(r.partial.len(), MAX_REASSEMBLY);
        assert_eq!(r.feed(1000, 0, 0, Bytes::new()), None);
        assert_eq!(r.feed(1000, 9, 9, Bytes::new()), None);
        assert_eq!(r.feed(1000, 3, 2, Bytes::new()), None);
        // Inconsistent count for a known id resets it.
        r.feed(2000, 0, 2, Bytes::from_static(b"a"));
        assert_eq!(r.feed(2000, 1, 3, Bytes::from_static(b"b")), None);
        assert!(!r.partial.contains_key(&2000));
    }

    #[test]
    fn datagram_decoding() {
        let mut r = Reassembly::default();
        assert_eq!(
            decode_datagram(Bytes::from_static(&[0, 1, 2]), &mut r),
            Ok(Some(Bytes::from_static(&[1, 2])))
        );
        assert_eq!(decode_datagram(Bytes::new(), &mut r), Err(()));
        assert_eq!(
            decode_datagram(Bytes::from_static(&[9, 1]), &mut r),
            Err(())
        );
        assert_eq!(decode_datagram(Bytes::from_static(&[0]), &mut r), Err(()));
        assert_eq!(
            decode_datagram(Bytes::from_static(&[1, 0, 0, 0]), &mut r),
            Err(())
        );
        let big = vec![0u8; MAX_INNER_PACKET + 2];
        assert_eq!(decode_datagram(Bytes::from(big), &mut r), Err(()));
    }
}
