//! The direct path: the inner QUIC connection's packets go straight to the peer when the two sides
//! can reach each other, and back through the relay when they cannot.
//!
//! # How
//! 1. **Candidates.** Each side sends the other, inside the end-to-end session
//!    ([`ControlMsg::PathCandidates`](crate::ControlMsg::PathCandidates)), the addresses it may be
//!    reached at: its interfaces' addresses with the port of its relay socket ("host"), and the
//!    address the relay sees that socket come from ("reflexive", from
//!    [`RelayMsg::PathInfo`](tandem_proto::RelayMsg::PathInfo)). The relay learns nothing new.
//! 2. **Punching.** Both sides send probes ([`PING`]) to every candidate of the other at once, from
//!    the socket they use for the relay (so the NAT mapping the relay saw is the one the peer's
//!    probes reach), every [`PUNCH_INTERVAL`] for [`PUNCH_FOR`]. A probe is answered ([`PONG`]) to
//!    the address it came from; a probe from an address not among the candidates (a NAT that maps
//!    each destination to its own port) makes that address a candidate too ("peer-reflexive").
//!    Probes carry an HMAC-SHA256 under a key derived from the PAKE-confirmed session key: a
//!    stranger cannot make a side send anywhere, and a side's own probes reflected back are not
//!    answered (each carries its sender's role).
//! 3. **Switch.** The first answered probe makes its address the path; a host candidate that answers
//!    later replaces a reflexive one. The inner packets then go there ([`DATA`]); quinn does not
//!    see the change at all (the virtual socket keeps one peer address), so the connection, its
//!    streams and its congestion state go on. Data is accepted only from addresses that sent a
//!    valid probe or answer; the inner QUIC connection authenticates every packet anyway.
//! 4. **Fallback.** The path is probed every [`KEEPALIVE`]; with no answer for [`DEAD_AFTER`] the
//!    packets go back through the relay (which stays open all along) and punching starts again. A
//!    side that did not get direct keeps trying every [`RETRY_EVERY`].
//!
//! The state machine ([`Prober`]) is pure: time comes in as arguments and packets go out as return
//! values, so it is tested without sockets or sleeps. [`run`] drives it.

use crate::carrier::Carrier;
use bytes::Bytes;
use ring::hmac;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_client::PathInfo;
use tandem_client::tandem_net::direct::DirectPort;
use tokio::sync::{mpsc, watch};

/// Probe ("are you there?").
pub const PING: u8 = 0x01;
/// Answer to a probe.
pub const PONG: u8 = 0x02;
/// An inner QUIC packet on the direct path.
pub const DATA: u8 = 0x03;
const MAC_LEN: usize = 16;
/// kind, role, sequence number, transaction id, MAC.
const PROBE_LEN: usize = 2 + 8 + 8 + MAC_LEN;
/// Probes a side sends per second at most, all candidates together (and a burst of this many).
pub const PROBES_PER_SECOND: f64 = 50.0;
const PROBE_BURST: f64 = 20.0;
/// Addresses learnt from the peer's probes (not among its candidates) per round at most.
const PEER_REFLEXIVE_PER_ROUND: u8 = 2;
/// Sequence numbers of the peer's probes remembered below the highest (replay window).
const REPLAY_WINDOW: u64 = 64;

/// Time between probes to each candidate while punching.
pub const PUNCH_INTERVAL: Duration = Duration::from_millis(100);
/// How long one round of punching lasts.
pub const PUNCH_FOR: Duration = Duration::from_secs(5);
/// A side that is not direct starts another round this long after the last one began.
pub const RETRY_EVERY: Duration = Duration::from_secs(15);
/// Probes on the path in use (also keeps NAT bindings open).
pub const KEEPALIVE: Duration = Duration::from_millis(200);
/// The path is given up after this long without an answer.
pub const DEAD_AFTER: Duration = Duration::from_millis(800);
/// Most candidates kept (the peer's, and peer-reflexive ones).
pub const MAX_CANDIDATES: usize = 16;
/// Probes awaiting an answer that are remembered.
const MAX_PENDING: usize = 256;

/// Which path the inner packets take now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum PathKind {
    /// Through the relay.
    #[default]
    Relay,
    /// Straight to the peer's own interface address (same network).
    DirectLan,
    /// Straight to the peer through the NATs between them.
    DirectNat,
}

impl PathKind {
    /// As the stats line shows it.
    pub fn label(self) -> &'static str {
        match self {
            PathKind::Relay => "relay",
            PathKind::DirectLan => "direct, LAN",
            PathKind::DirectNat => "direct, through NAT",
        }
    }
    /// Short machine-readable name (JSON events, metrics).
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Relay => "relay",
            PathKind::DirectLan => "direct-lan",
            PathKind::DirectNat => "direct-nat",
        }
    }
    pub fn is_direct(self) -> bool {
        self != PathKind::Relay
    }
}

/// Where a candidate address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CandidateKind {
    /// An interface address of the peer.
    Host,
    /// The peer's address as the relay sees it.
    Reflexive,
    /// An address a valid probe came from.
    PeerReflexive,
}

impl CandidateKind {
    fn path(self) -> PathKind {
        match self {
            CandidateKind::Host => PathKind::DirectLan,
            _ => PathKind::DirectNat,
        }
    }
    /// Higher is preferred.
    fn rank(self) -> u8 {
        match self {
            CandidateKind::Host => 2,
            _ => 1,
        }
    }
}

/// The key probes are authenticated with, derived from the session key both sides confirmed.
pub struct ProbeKey(hmac::Key);

impl ProbeKey {
    pub fn derive(session_key: &[u8; 32]) -> ProbeKey {
        let k = hmac::Key::new(hmac::HMAC_SHA256, session_key);
        let tag = hmac::sign(&k, b"tandem direct path probes v1");
        ProbeKey(hmac::Key::new(hmac::HMAC_SHA256, tag.as_ref()))
    }

    fn mac(&self, body: &[u8]) -> [u8; MAC_LEN] {
        let t = hmac::sign(&self.0, body);
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&t.as_ref()[..MAC_LEN]);
        out
    }

    fn probe(&self, kind: u8, role: u8, seq: u64, txid: u64) -> Vec<u8> {
        let mut p = Vec::with_capacity(PROBE_LEN);
        p.push(kind);
        p.push(role);
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&txid.to_be_bytes());
        let mac = self.mac(&p);
        p.extend_from_slice(&mac);
        p
    }

    /// The probe's (kind, role, sequence number, txid) if its MAC is right.
    fn open(&self, p: &[u8]) -> Option<(u8, u8, u64, u64)> {
        if p.len() != PROBE_LEN {
            return None;
        }
        let (body, mac) = p.split_at(PROBE_LEN - MAC_LEN);
        let full = hmac::sign(&self.0, body);
        // Constant time: the difference of every byte, folded.
        let diff = full.as_ref()[..MAC_LEN]
            .iter()
            .zip(mac)
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff != 0 {
            return None;
        }
        let seq = u64::from_be_bytes(body[2..10].try_into().ok()?);
        let txid = u64::from_be_bytes(body[10..18].try_into().ok()?);
        Some((body[0], body[1], seq, txid))
    }
}

struct Remote {
    addr: SocketAddr,
    kind: CandidateKind,
    next_ping: Instant,
    /// Last answer to one of our probes from it.
    last_pong: Option<Instant>,
    /// Last valid probe or answer from it (data from it is accepted).
    heard: Option<Instant>,
    rtt: Option<Duration>,
}

/// What [`Prober::handle`] made of a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Handled {
    /// An inner packet from the peer.
    Data(Bytes),
    /// Send this answer there.
    Reply(SocketAddr, Vec<u8>),
    /// Nothing to do (a probe answered, or a packet dropped).
    Nothing,
}

/// Counters of a prober (for stats and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProberStats {
    pub pings_sent: u64,
    pub pongs_received: u64,
    pub bad_packets: u64,
    pub switches: u64,
    pub fallbacks: u64,
}

/// The direct path's state machine for one session side.
pub struct Prober {
    key: ProbeKey,
    role: u8,
    /// Unguessable transaction ids (a secure random source; a counter in tests).
    rng: Box<dyn FnMut() -> u64 + Send>,
    /// This side's probe sequence number (in every probe it sends, under the MAC).
    seq: u64,
    remotes: Vec<Remote>,
    pending: VecDeque<(u64, SocketAddr, Instant)>,
    /// The peer's highest probe sequence number, and which of the [`REPLAY_WINDOW`] below it
    /// were seen: a probe replayed (by someone who saw it, from a forged source) is dropped.
    peer_seq: Option<u64>,
    peer_window: u64,
    /// Probe budget ([`PROBES_PER_SECOND`]) and when it was last refilled.
    tokens: f64,
    refilled: Option<Instant>,
    /// Peer-reflexive candidates added in this round.
    learnt_this_round: u8,
    active: Option<SocketAddr>,
    /// The current round of punching ends then.
    punch_until: Option<Instant>,
    /// When the last round began.
    round_began: Option<Instant>,
    pub stats: ProberStats,
}

impl Prober {
    /// `role`: 0 for the agent, 1 for the console (a side answers only the other's probes);
    /// `rng`: transaction ids, which must be unguessable (the peer knows the key, so only they
    /// keep it from forging answers from addresses it does not hold).
    pub fn new(key: ProbeKey, role: u8, rng: Box<dyn FnMut() -> u64 + Send>) -> Prober {
        Prober {
            key,
            role,
            rng,
            seq: 0,
            remotes: Vec::new(),
            pending: VecDeque::new(),
            peer_seq: None,
            peer_window: 0,
            tokens: PROBE_BURST,
            refilled: None,
            learnt_this_round: 0,
            active: None,
            punch_until: None,
            round_began: None,
            stats: ProberStats::default(),
        }
    }

    /// The peer's candidates (replacing earlier ones: the peer's socket changed); starts punching.
    pub fn set_candidates(&mut self, cands: &[(SocketAddr, CandidateKind)], now: Instant) {
        let was = self.path();
        self.remotes.clear();
        self.pending.clear();
        self.active = None;
        if was.is_direct() {
            self.stats.fallbacks += 1;
        }
        for &(addr, kind) in cands {
            self.add(canonical(addr), kind, now);
        }
        self.start_round(now);
    }

    fn add(&mut self, addr: SocketAddr, kind: CandidateKind, now: Instant) -> bool {
        // Only what a peer can be reached at: no loopback, link-local, broadcast or well-known
        // ports (a peer must not make this side probe the services around it).
        if !probeable(addr) {
            return false;
        }
        if let Some(r) = self.remotes.iter_mut().find(|r| r.addr == addr) {
            if kind.rank() > r.kind.rank() {
                r.kind = kind;
            }
            return false;
        }
        if self.remotes.len() >= MAX_CANDIDATES {
            return false;
        }
        self.remotes.push(Remote {
            addr,
            kind,
            next_ping: now,
            last_pong: None,
            heard: None,
            rtt: None,
        });
        true
    }

    fn start_round(&mut self, now: Instant) {
        if self.remotes.is_empty() {
            return;
        }
        self.punch_until = Some(now + PUNCH_FOR);
        self.round_began = Some(now);
        self.learnt_this_round = 0;
        for r in &mut self.remotes {
            r.next_ping = now;
        }
    }

    /// The path in use.
    pub fn path(&self) -> PathKind {
        match self
            .active
            .and_then(|a| self.remotes.iter().find(|r| r.addr == a))
        {
            Some(r) => r.kind.path(),
            None => PathKind::Relay,
        }
    }

    /// Where inner packets go now (`None`: through the relay).
    pub fn active(&self) -> Option<SocketAddr> {
        self.active
    }

    /// Round-trip time of the path in use, as the probes measured it.
    pub fn rtt(&self) -> Option<Duration> {
        let a = self.active?;
        self.remotes.iter().find(|r| r.addr == a)?.rtt
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Whether the peer's probe sequence number is new (and remembers it).
    fn fresh(&mut self, seq: u64) -> bool {
        match self.peer_seq {
            None => {
                self.peer_seq = Some(seq);
                self.peer_window = 1;
                true
            }
            Some(max) if seq > max => {
                let shift = seq - max;
                self.peer_window = if shift >= REPLAY_WINDOW {
                    1
                } else {
                    (self.peer_window << shift) | 1
                };
                self.peer_seq = Some(seq);
                true
            }
            Some(max) => {
                let back = max - seq;
                if back >= REPLAY_WINDOW || self.peer_window & (1 << back) != 0 {
                    return false;
                }
                self.peer_window |= 1 << back;
                true
            }
        }
    }

    /// Probes due now, and the path given up if it stopped answering.
    pub fn poll(&mut self, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
        // Liveness of the path in use.
        if let Some(a) = self.active {
            let alive = self
                .remotes
                .iter()
                .find(|r| r.addr == a)
                .and_then(|r| r.last_pong)
                .is_some_and(|t| now.saturating_duration_since(t) < DEAD_AFTER);
            if !alive {
                tracing::info!("the direct path stopped answering; back through the relay");
                self.active = None;
                self.stats.fallbacks += 1;
                self.start_round(now);
            }
        }
        if self.punch_until.is_some_and(|t| now >= t) {
            self.punch_until = None;
            // Addresses learnt from probes that never answered ours are forgotten (so a forged
            // one costs at most one round of probes).
            let active = self.active;
            self.remotes.retain(|r| {
                r.kind != CandidateKind::PeerReflexive
                    || r.last_pong.is_some()
                    || Some(r.addr) == active
            });
        }
        if self.active.is_none()
            && self.punch_until.is_none()
            && self
                .round_began
                .is_some_and(|t| now.saturating_duration_since(t) >= RETRY_EVERY)
        {
            self.start_round(now);
        }
        let punching = self.punch_until.is_some();
        let mut out = Vec::new();
        let mut due = Vec::new();
        for (i, r) in self.remotes.iter().enumerate() {
            let interval = if Some(r.addr) == self.active {
                KEEPALIVE
            } else if punching {
                PUNCH_INTERVAL
            } else {
                continue;
            };
            if now >= r.next_ping {
                due.push((i, interval));
            }
        }
        // The budget: refilled with time, spent per probe.
        let last = self.refilled.replace(now).unwrap_or(now);
        self.tokens = (self.tokens
            + now.saturating_duration_since(last).as_secs_f64() * PROBES_PER_SECOND)
            .min(PROBE_BURST);
        for (i, interval) in due {
            if self.tokens < 1.0 {
                // Over budget: this candidate waits its turn.
                self.remotes[i].next_ping = now + Duration::from_secs_f64(1.0 / PROBES_PER_SECOND);
                continue;
            }
            self.tokens -= 1.0;
            let txid = (self.rng)();
            let seq = self.next_seq();
            let addr = self.remotes[i].addr;
            self.remotes[i].next_ping = now + interval;
            if self.pending.len() >= MAX_PENDING {
                self.pending.pop_front();
            }
            self.pending.push_back((txid, addr, now));
            self.stats.pings_sent += 1;
            out.push((addr, self.key.probe(PING, self.role, seq, txid)));
        }
        out
    }

    /// When [`Prober::poll`] next has something to do.
    pub fn next_wake(&self) -> Option<Instant> {
        let punching = self.punch_until.is_some();
        let mut t: Option<Instant> = None;
        let mut at = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        for r in &self.remotes {
            if Some(r.addr) == self.active || punching {
                at(r.next_ping);
            }
        }
        if let Some(a) = self.active
            && let Some(p) = self
                .remotes
                .iter()
                .find(|r| r.addr == a)
                .and_then(|r| r.last_pong)
        {
            at(p + DEAD_AFTER);
        }
        if let Some(u) = self.punch_until {
            at(u);
        } else if self.active.is_none()
            && let Some(b) = self.round_began
        {
            at(b + RETRY_EVERY);
        }
        t
    }

    /// One packet that arrived on the direct-path socket from `from`.
    pub fn handle(&mut self, from: SocketAddr, p: Bytes, now: Instant) -> Handled {
        let from = canonical(from);
        match p.first() {
            Some(&DATA) => {
                let known = self
                    .remotes
                    .iter()
                    .any(|r| r.addr == from && r.heard.is_some());
                if known && p.len() > 1 {
                    Handled::Data(p.slice(1..))
                } else {
                    self.stats.bad_packets += 1;
                    Handled::Nothing
                }
            }
            Some(&PING) | Some(&PONG) => {
                let Some((kind, role, seq, txid)) = self.key.open(&p) else {
                    self.stats.bad_packets += 1;
                    return Handled::Nothing;
                };
                if role == self.role {
                    // Our own probe, reflected.
                    self.stats.bad_packets += 1;
                    return Handled::Nothing;
                }
                if !self.fresh(seq) {
                    // Replayed (or older than the window).
                    self.stats.bad_packets += 1;
                    return Handled::Nothing;
                }
                if kind == PING {
                    let known = self.remotes.iter().any(|r| r.addr == from);
                    // A new way in (the peer's NAT gave its probes another port): probe it, a
                    // few per round, and only while not direct.
                    if !known
                        && self.active.is_none()
                        && self.learnt_this_round < PEER_REFLEXIVE_PER_ROUND
                        && self.add(from, CandidateKind::PeerReflexive, now)
                    {
                        self.learnt_this_round += 1;
                        if self.punch_until.is_none() {
                            self.start_round(now);
                            self.learnt_this_round = 1;
                        }
                    }
                    if let Some(r) = self.remotes.iter_mut().find(|r| r.addr == from) {
                        r.heard = Some(now);
                    }
                    let seq = self.next_seq();
                    Handled::Reply(from, self.key.probe(PONG, self.role, seq, txid))
                } else {
                    self.on_pong(from, txid, now);
                    Handled::Nothing
                }
            }
            _ => {
                self.stats.bad_packets += 1;
                Handled::Nothing
            }
        }
    }

    fn on_pong(&mut self, from: SocketAddr, txid: u64, now: Instant) {
        let Some(i) = self.pending.iter().position(|(t, _, _)| *t == txid) else {
            self.stats.bad_packets += 1;
            return;
        };
        let (_, to, sent) = self.pending[i];
        if to != from {
            // Answered from another address than probed: not a symmetric path.
            self.stats.bad_packets += 1;
            return;
        }
        self.pending.remove(i);
        self.stats.pongs_received += 1;
        let Some(r) = self.remotes.iter_mut().find(|r| r.addr == from) else {
            return;
        };
        r.last_pong = Some(now);
        r.heard = Some(now);
        r.rtt = Some(now.saturating_duration_since(sent));
        let rank = r.kind.rank();
        let better = match self
            .active
            .and_then(|a| self.remotes.iter().find(|r| r.addr == a))
        {
            None => true,
            Some(cur) => rank > cur.kind.rank(),
        };
        if better {
            self.active = Some(from);
            self.stats.switches += 1;
            tracing::info!(
                path = self.path().label(),
                "direct path answers; switching to it"
            );
        }
    }
}

/// The peer's candidates ([`crate::ControlMsg::PathCandidates`]), as the control reader hands
/// them to the driver.
pub(crate) struct PeerCandidates {
    pub candidates: Vec<(SocketAddr, CandidateKind)>,
    pub relay_only: bool,
}

/// This side's relay link was replaced (resumed): its socket and the relay's view changed.
pub(crate) struct Relink {
    pub port: Option<DirectPort>,
    pub info: watch::Receiver<Option<PathInfo>>,
    pub speaks_paths: bool,
}

/// What the driver needs of its session.
pub(crate) struct DirectCtx {
    pub carrier: Arc<Carrier>,
    /// 0 agent, 1 console.
    pub role: u8,
    pub session_key: [u8; 32],
    /// This side's policy (`--path`).
    pub allowed_here: bool,
    /// The peer speaks [`crate::session::CAP_DIRECT`].
    pub peer_capable: bool,
    pub ctl_send: Arc<tokio::sync::Mutex<quinn::SendStream>>,
    /// Agent: set once the user answered (allowed); nothing about the path is offered or probed
    /// before (the technician learns no address of the user's before consent).
    pub consented: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// How long the driver waits for the relay's [`PathInfo`] before giving up on direct paths (a
/// relay that speaks direct paths sends it right after pairing).
const PATH_INFO_WAIT: Duration = Duration::from_secs(3);
/// The peer's candidates are taken at most this often (each set starts a round of probes).
const CANDIDATES_EVERY: Duration = Duration::from_secs(2);

/// Whether direct paths are allowed, and the relay's view of this side's address. A relay that
/// does not speak direct paths (an older one) says nothing: this side's policy decides. One that
/// does but whose word does not come in time: not allowed (its operator may have said "relay
/// only").
async fn decide(
    allowed_here: bool,
    speaks_paths: bool,
    info: &mut watch::Receiver<Option<PathInfo>>,
) -> (bool, Option<SocketAddr>) {
    if !allowed_here {
        return (false, None);
    }
    if !speaks_paths {
        return (true, None);
    }
    let got = tokio::time::timeout(PATH_INFO_WAIT, info.wait_for(|i| i.is_some()))
        .await
        .ok()
        .and_then(|r| r.ok().and_then(|g| *g));
    match got {
        Some(i) => (i.direct_allowed, i.observed),
        None => (false, None),
    }
}

/// A port for the direct path: the relay link's own socket when it has one nobody else uses, a
/// fresh one otherwise (a link over TCP: only interface addresses are offered then).
fn port_for(link_port: Option<DirectPort>, v6: bool) -> Option<(DirectPort, DirectRx)> {
    if let Some(p) = link_port
        && let Some(rx) = p.subscribe()
    {
        return Some((p, rx));
    }
    let any: SocketAddr = if v6 {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    match DirectPort::bind(any) {
        Ok(p) => {
            let rx = p.subscribe()?;
            Some((p, rx))
        }
        Err(e) => {
            tracing::warn!(error = %e, "no socket for a direct path; staying on the relay");
            None
        }
    }
}

type DirectRx = mpsc::Receiver<tandem_client::tandem_net::direct::DirectPacket>;

/// Sends this side's candidates to the peer, in the background (the control stream may be busy;
/// the driver goes on probing meanwhile).
fn offer(ctx: &DirectCtx, candidates: Vec<(SocketAddr, CandidateKind)>, relay_only: bool) {
    let msg = crate::ControlMsg::PathCandidates {
        candidates,
        relay_only,
    };
    let ctl = ctx.ctl_send.clone();
    tokio::spawn(async move {
        let mut s = ctl.lock().await;
        let _ = crate::session::write_frame(&mut s, &msg).await;
    });
}

/// The relay's view of this side's address applies to the relay link's own socket only (a fresh
/// socket has another NAT mapping).
fn observed_for(port: &DirectPort, o: Option<SocketAddr>) -> Option<SocketAddr> {
    if port.is_shared() { o } else { None }
}

/// Unguessable transaction ids.
fn secure_ids() -> Box<dyn FnMut() -> u64 + Send> {
    let rng = ring::rand::SystemRandom::new();
    let mut fallback = Instant::now();
    Box::new(move || {
        let mut b = [0u8; 8];
        match ring::rand::SecureRandom::fill(&rng, &mut b) {
            Ok(()) => u64::from_be_bytes(b),
            // The system's random source failing is not expected; a probe with a weak id only
            // risks a forged answer, never the session's secrecy.
            Err(_) => {
                fallback += Duration::from_nanos(1);
                fallback.elapsed().as_nanos() as u64
            }
        }
    })
}

/// Drives the direct path of one session side until the session ends (the task is aborted).
pub(crate) async fn run(
    ctx: DirectCtx,
    mut peer_rx: mpsc::Receiver<PeerCandidates>,
    mut relink_rx: mpsc::Receiver<Relink>,
    first: Relink,
    relay_v6: bool,
) {
    if !ctx.peer_capable {
        return;
    }
    if let Some(c) = &ctx.consented {
        while !c.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let Relink {
        port: link_port,
        mut info,
        speaks_paths,
    } = first;
    let (allowed, observed) = decide(ctx.allowed_here, speaks_paths, &mut info).await;
    if !allowed {
        tracing::info!("direct paths are off (relay only); every packet goes through the relay");
        offer(&ctx, Vec::new(), true);
        return;
    }
    let Some((mut port, mut rx)) = port_for(link_port, relay_v6) else {
        offer(&ctx, Vec::new(), true);
        return;
    };
    offer(
        &ctx,
        gather(port.local_addr(), observed_for(&port, observed)),
        false,
    );
    let mut prober = Prober::new(ProbeKey::derive(&ctx.session_key), ctx.role, secure_ids());
    let mut peer: Vec<(SocketAddr, CandidateKind)> = Vec::new();
    let mut peer_taken: Option<Instant> = None;
    let mut shown: Option<SocketAddr> = None;
    loop {
        let wake = prober
            .next_wake()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            p = rx.recv() => {
                let Some((p, from)) = p else { return };
                match prober.handle(from, p, Instant::now()) {
                    Handled::Data(d) => ctx.carrier.deliver_direct(d),
                    Handled::Reply(to, r) => {
                        let _ = port.send_to(to, &r);
                    }
                    Handled::Nothing => {}
                }
            }
            c = peer_rx.recv() => {
                let Some(PeerCandidates { candidates, relay_only }) = c else { return };
                // A peer sending candidates over and over would make this side probe over and
                // over: one set per CANDIDATES_EVERY.
                if peer_taken.is_some_and(|t| t.elapsed() < CANDIDATES_EVERY) {
                    continue;
                }
                peer_taken = Some(Instant::now());
                peer = if relay_only { Vec::new() } else { candidates };
                prober.set_candidates(&peer, Instant::now());
            }
            l = relink_rx.recv() => {
                let Some(Relink { port: new_port, mut info, speaks_paths }) = l else { return };
                let (allowed, observed) = decide(ctx.allowed_here, speaks_paths, &mut info).await;
                if !allowed {
                    ctx.carrier.set_direct(None, PathKind::Relay);
                    offer(&ctx, Vec::new(), true);
                    return;
                }
                if let Some((p, r)) = port_for(new_port, relay_v6) {
                    port = p;
                    rx = r;
                }
                offer(&ctx, gather(port.local_addr(), observed_for(&port, observed)), false);
                prober.set_candidates(&peer, Instant::now());
            }
            _ = tokio::time::sleep_until(wake) => {
                for (to, p) in prober.poll(Instant::now()) {
                    let _ = port.send_to(to, &p);
                }
            }
        }
        let active = prober.active();
        if active != shown {
            shown = active;
            ctx.carrier
                .set_direct(active.map(|a| (port.clone(), a)), prober.path());
        }
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Whether a peer's candidate may be probed: an address a peer can be reached at, on a port that
/// is not a well-known service's.
fn probeable(a: SocketAddr) -> bool {
    let ip = a.ip().to_canonical();
    let broadcast_or_this = match ip {
        IpAddr::V4(v4) => v4.is_broadcast() || v4.octets()[0] == 0,
        IpAddr::V6(_) => false,
    };
    a.port() >= 1024 && offerable(ip) && !ip.is_multicast() && !broadcast_or_this
}

/// Whether an interface address is worth offering: not loopback, link-local or unspecified.
fn offerable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified()),
        IpAddr::V6(v6) => {
            !(v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// This side's candidates for a socket on `local` (its port), with the relay's view of it.
pub fn gather(local: SocketAddr, observed: Option<SocketAddr>) -> Vec<(SocketAddr, CandidateKind)> {
    let mut out = Vec::new();
    let v6_socket = local.is_ipv6();
    if let Ok(ifs) = if_addrs::get_if_addrs() {
        for i in ifs {
            let ip = i.ip();
            if !offerable(ip) || (ip.is_ipv6() && !v6_socket) {
                continue;
            }
            let a = SocketAddr::new(ip, local.port());
            if !out.iter().any(|(x, _)| *x == a) && out.len() < MAX_CANDIDATES / 2 {
                out.push((a, CandidateKind::Host));
            }
        }
    }
    if let Some(o) = observed.map(canonical)
        && offerable(o.ip())
        && !out.iter().any(|(x, _)| *x == o)
    {
        out.push((o, CandidateKind::Reflexive));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct ids for tests (not secret).
    fn ids(seed: u64) -> Box<dyn FnMut() -> u64 + Send> {
        let mut n = seed << 32;
        Box::new(move || {
            n += 1;
            n
        })
    }

    fn pair() -> (Prober, Prober) {
        let k = [7u8; 32];
        (
            Prober::new(ProbeKey::derive(&k), 0, ids(11)),
            Prober::new(ProbeKey::derive(&k), 1, ids(22)),
        )
    }

    const A: &str = "198.51.100.1:4000";
    const B: &str = "203.0.113.2:5000";

    fn a() -> SocketAddr {
        A.parse().unwrap()
    }
    fn b() -> SocketAddr {
        B.parse().unwrap()
    }

    /// Delivers `out` (sent from `from`) to `to`, returning what `to` sends back.
    fn deliver(
        to: &mut Prober,
        from: SocketAddr,
        out: Vec<(SocketAddr, Vec<u8>)>,
        now: Instant,
    ) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut back = Vec::new();
        for (_, p) in out {
            if let Handled::Reply(dst, r) = to.handle(from, Bytes::from(p), now) {
                back.push((dst, r));
            }
        }
        back
    }

    #[test]
    fn both_sides_find_the_path_and_prefer_the_lan() {
        let (mut agent, mut console) = pair();
        let t0 = Instant::now();
        agent.set_candidates(&[(b(), CandidateKind::Reflexive)], t0);
        console.set_candidates(&[(a(), CandidateKind::Reflexive)], t0);
        let pings = agent.poll(t0);
        assert_eq!(pings.len(), 1);
        assert_eq!(pings[0].0, b());
        let pongs = deliver(&mut console, a(), pings, t0);
        assert_eq!(pongs.len(), 1);
        assert_eq!(pongs[0].0, a(), "answered where the probe came from");
        deliver(&mut agent, b(), pongs, t0 + Duration::from_millis(30));
        assert_eq!(agent.active(), Some(b()));
        assert_eq!(agent.path(), PathKind::DirectNat);
        assert_eq!(agent.rtt(), Some(Duration::from_millis(30)));
        // The console has not had an answer of its own yet: it still sends through the relay,
        // but takes data from the agent's address.
        assert_eq!(console.path(), PathKind::Relay);
        assert_eq!(
            console.handle(a(), Bytes::from_static(&[DATA, 1, 2]), t0),
            Handled::Data(Bytes::from_static(&[1, 2]))
        );
        // A LAN candidate answering later wins.
        let lan: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        agent.set_candidates(
            &[(b(), CandidateKind::Reflexive), (lan, CandidateKind::Host)],
            t0,
        );
        let pings = agent.poll(t0);
        assert_eq!(pings.len(), 2);
        let to_b: Vec<_> = pings.iter().filter(|p| p.0 == b()).cloned().collect();
        let to_lan: Vec<_> = pings.iter().filter(|p| p.0 == lan).cloned().collect();
        let back = deliver(&mut console, a(), to_b, t0);
        deliver(&mut agent, b(), back, t0);
        assert_eq!(agent.path(), PathKind::DirectNat);
        let back = deliver(&mut console, a(), to_lan, t0);
        deliver(&mut agent, lan, back, t0);
        assert_eq!(agent.path(), PathKind::DirectLan);
        assert_eq!(agent.active(), Some(lan));
    }

    #[test]
    fn a_stranger_cannot_make_a_path() {
        let (mut agent, _) = pair();
        let mut stranger = Prober::new(ProbeKey::derive(&[8u8; 32]), 1, ids(5));
        let t0 = Instant::now();
        agent.set_candidates(&[(b(), CandidateKind::Reflexive)], t0);
        stranger.set_candidates(&[(a(), CandidateKind::Reflexive)], t0);
        let evil: SocketAddr = "192.0.2.66:6666".parse().unwrap();
        // The stranger's probes (wrong key) are not answered and add no candidate.
        let pings = stranger.poll(t0);
        assert!(deliver(&mut agent, evil, pings, t0).is_empty());
        // Nor are its answers to the agent's real probes, nor a forged answer.
        let pings = agent.poll(t0);
        let forged = deliver(&mut stranger, a(), pings.clone(), t0);
        assert!(
            forged.is_empty(),
            "wrong key: the stranger cannot even answer"
        );
        for (_, mut p) in pings {
            p[0] = PONG;
            p[1] = 1;
            agent.handle(b(), Bytes::from(p), t0);
        }
        assert_eq!(agent.path(), PathKind::Relay);
        // Data from an address nobody validated is dropped.
        assert_eq!(
            agent.handle(evil, Bytes::from_static(&[DATA, 9]), t0),
            Handled::Nothing
        );
        // The agent's own probe reflected back is not answered.
        let own = agent.poll(t0 + PUNCH_INTERVAL);
        assert!(deliver(&mut agent, b(), own, t0).is_empty());
        assert!(agent.stats.bad_packets >= 4);
        // Garbage of every size is counted, never a panic.
        for n in 0..40 {
            let junk = vec![PING; n];
            assert_eq!(agent.handle(b(), Bytes::from(junk), t0), Handled::Nothing);
        }
    }

    #[test]
    fn a_replayed_probe_is_not_answered_and_a_forged_address_is_forgotten() {
        let (mut agent, mut console) = pair();
        let t0 = Instant::now();
        agent.set_candidates(&[(b(), CandidateKind::Reflexive)], t0);
        let pings = console.poll(t0);
        assert!(pings.is_empty(), "the console has no candidates");
        console.set_candidates(&[(a(), CandidateKind::Reflexive)], t0);
        let pings = console.poll(t0);
        assert_eq!(deliver(&mut agent, b(), pings.clone(), t0).len(), 1);
        // The same probe again, from a victim's address: no answer, no probes to the victim.
        let victim: SocketAddr = "192.0.2.200:53".parse().unwrap();
        assert!(deliver(&mut agent, victim, pings, t0).is_empty());
        let out = agent.poll(t0 + Duration::from_millis(1));
        assert!(out.iter().all(|(to, _)| *to != victim), "{out:?}");
        // A fresh probe from a new address (the peer's other mapping) is a candidate for one
        // round; never answering, it is forgotten when the round ends.
        let pings = console.poll(t0 + PUNCH_INTERVAL);
        let other: SocketAddr = "203.0.113.2:7777".parse().unwrap();
        assert_eq!(deliver(&mut agent, other, pings, t0).len(), 1);
        let mut now = t0;
        let mut to_other = 0;
        while now < t0 + PUNCH_FOR + Duration::from_secs(2) {
            to_other += agent
                .poll(now)
                .iter()
                .filter(|(to, _)| *to == other)
                .count();
            now += Duration::from_millis(10);
        }
        assert!(to_other > 0 && to_other <= 51, "{to_other}");
        let later: usize = (0..200)
            .map(|i| {
                let t = t0 + RETRY_EVERY + Duration::from_millis(10 * i);
                agent.poll(t).iter().filter(|(to, _)| *to == other).count()
            })
            .sum();
        assert_eq!(later, 0, "forgotten after its round");
    }

    #[test]
    fn an_answer_from_another_address_does_not_count() {
        let (mut agent, mut console) = pair();
        let t0 = Instant::now();
        agent.set_candidates(&[(b(), CandidateKind::Reflexive)], t0);
        let pings = agent.poll(t0);
        let pongs = deliver(&mut console, a(), pings, t0);
        let other: SocketAddr = "203.0.113.2:5999".parse().unwrap();
        deliver(&mut agent, other, pongs, t0);
        assert_eq!(agent.path(), PathKind::Relay);
    }

    #[test]
    fn a_probe_from_a_new_port_becomes_a_candidate() {
        // The console is behind a NAT that maps each destination to its own port: its probes come
        // from a port the relay never saw.
        let (mut agent, mut console) = pair();
        let t0 = Instant::now();
        agent.set_candidates(&[(b(), CandidateKind::Reflexive)], t0);
        console.set_candidates(&[(a(), CandidateKind::Reflexive)], t0);
        let mapped: SocketAddr = "203.0.113.2:61234".parse().unwrap();
        let pings = console.poll(t0);
        let pongs = deliver(&mut agent, mapped, pings, t0);
        assert_eq!(pongs[0].0, mapped);
        deliver(&mut console, a(), pongs, t0);
        assert_eq!(console.path(), PathKind::DirectNat);
        // The agent now probes the new address too, and its answer makes the path.
        let pings = agent.poll(t0 + Duration::from_millis(1));
        let to_mapped: Vec<_> = pings.into_iter().filter(|p| p.0 == mapped).collect();
        assert_eq!(to_mapped.len(), 1);
        let pongs = deliver(&mut console, a(), to_mapped, t0);
        deliver(&mut agent, mapped, pongs, t0);
        assert_eq!(agent.active(), Some(mapped));
    }

    #[test]
    fn a_dead_path_falls_back_within_a_second_and_recovers() {
        let (mut agent, mut console) = pair();
        let t0 = Instant::now();
        agent.set_candidates(&[(b(), CandidateKind::Reflexive)], t0);
        let pings = agent.poll(t0);
        let pongs = deliver(&mut console, a(), pings, t0);
        deliver(&mut agent, b(), pongs, t0);
        assert!(agent.path().is_direct());
        // Keep-alives answered for a while.
        let mut now = t0;
        for _ in 0..20 {
            now += Duration::from_millis(50);
            let pings = agent.poll(now);
            let pongs = deliver(&mut console, a(), pings, now);
            deliver(&mut agent, b(), pongs, now);
        }
        assert!(agent.path().is_direct());
        let cut = now;
        // The path is cut: nothing answers.
        while agent.path().is_direct() {
            now += Duration::from_millis(10);
            let _ = agent.poll(now);
            assert!(
                now - cut < Duration::from_secs(1),
                "fell back within a second"
            );
        }
        assert_eq!(agent.stats.fallbacks, 1);
        // It probes again, and goes direct when the path is back.
        now += Duration::from_millis(300);
        let pings = agent.poll(now);
        assert!(!pings.is_empty());
        let pongs = deliver(&mut console, a(), pings, now);
        deliver(&mut agent, b(), pongs, now);
        assert!(agent.path().is_direct());
    }

    #[test]
    fn punching_stops_and_retries_later() {
        let (mut agent, _) = pair();
        let t0 = Instant::now();
        agent.set_candidates(&[(b(), CandidateKind::Reflexive)], t0);
        let mut now = t0;
        let mut sent = 0;
        while now < t0 + PUNCH_FOR + Duration::from_secs(1) {
            sent += agent.poll(now).len();
            now += Duration::from_millis(10);
        }
        // One probe per interval while punching, none after.
        let per_round = (PUNCH_FOR.as_millis() / PUNCH_INTERVAL.as_millis()) as usize;
        assert!(sent >= per_round && sent <= per_round + 1, "{sent}");
        assert_eq!(agent.next_wake(), Some(t0 + RETRY_EVERY));
        assert!(!agent.poll(t0 + RETRY_EVERY).is_empty());
    }

    #[test]
    fn probes_keep_to_their_budget_and_spare_local_services() {
        let (mut agent, _) = pair();
        let t0 = Instant::now();
        let mut cands: Vec<_> = (0..16)
            .map(|i| {
                (
                    SocketAddr::new("198.51.100.7".parse().unwrap(), 40000 + i),
                    CandidateKind::Host,
                )
            })
            .collect();
        // What a hostile peer might name: loopback, link-local, broadcast, a well-known port.
        for bad in [
            "127.0.0.1:5000",
            "169.254.1.1:5000",
            "255.255.255.255:5000",
            "0.1.2.3:5000",
            "192.168.1.1:80",
            "[::1]:5000",
            "[fe80::1]:5000",
        ] {
            cands.insert(0, (bad.parse().unwrap(), CandidateKind::Host));
        }
        agent.set_candidates(&cands, t0);
        let mut sent = Vec::new();
        let mut now = t0;
        while now < t0 + Duration::from_secs(2) {
            sent.extend(agent.poll(now));
            now += Duration::from_millis(5);
        }
        assert!(sent.iter().all(|(to, _)| to.port() >= 40000), "{sent:?}");
        let limit = (2.0 * PROBES_PER_SECOND + PROBE_BURST) as usize + 1;
        assert!(sent.len() <= limit, "{} probes in 2 s", sent.len());
        assert!(
            sent.len() >= limit - 10,
            "the budget is used: {}",
            sent.len()
        );
    }

    #[test]
    fn candidates_are_bounded_and_sane() {
        let (mut agent, _) = pair();
        let t0 = Instant::now();
        let many: Vec<_> = (0..100)
            .map(|i| {
                (
                    SocketAddr::new("198.51.100.9".parse().unwrap(), 1000 + i),
                    CandidateKind::Host,
                )
            })
            .chain([
                ("0.0.0.0:5".parse().unwrap(), CandidateKind::Host),
                ("224.0.0.1:5".parse().unwrap(), CandidateKind::Host),
            ])
            .collect();
        agent.set_candidates(&many, t0);
        assert_eq!(agent.poll(t0).len(), MAX_CANDIDATES);
        let g = gather("0.0.0.0:4242".parse().unwrap(), Some(b()));
        assert!(g.iter().all(|(a, _)| !a.ip().is_loopback()));
        assert!(
            g.iter()
                .all(|(a, k)| a.port() == 4242 || *k == CandidateKind::Reflexive)
        );
        assert!(g.contains(&(b(), CandidateKind::Reflexive)));
    }
}
