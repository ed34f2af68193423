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
const PROBE_LEN: usize = 2 + 8 + MAC_LEN;

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

    fn probe(&self, kind: u8, role: u8, txid: u64) -> Vec<u8> {
        let mut p = Vec::with_capacity(PROBE_LEN);
        p.push(kind);
        p.push(role);
        p.extend_from_slice(&txid.to_be_bytes());
        let mac = self.mac(&p);
        p.extend_from_slice(&mac);
        p
    }

    /// The probe's (kind, role, txid) if its MAC is right.
    fn open(&self, p: &[u8]) -> Option<(u8, u8, u64)> {
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
        let txid = u64::from_be_bytes(body[2..10].try_into().ok()?);
        Some((body[0], body[1], txid))
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
    salt: u64,
    counter: u64,
    remotes: Vec<Remote>,
    pending: VecDeque<(u64, SocketAddr, Instant)>,
    active: Option<SocketAddr>,
    /// The current round of punching ends then.
    punch_until: Option<Instant>,
    /// When the last round began.
    round_began: Option<Instant>,
    /// When the path in use was chosen.
    pub became_direct: Option<Instant>,
    pub stats: ProberStats,
}

impl Prober {
    /// `role`: 0 for the agent, 1 for the console (a side answers only the other's probes);
    /// `salt`: random, so that transaction ids are unguessable.
    pub fn new(key: ProbeKey, role: u8, salt: u64) -> Prober {
        Prober {
            key,
            role,
            salt,
            counter: 0,
            remotes: Vec::new(),
            pending: VecDeque::new(),
            active: None,
            punch_until: None,
            round_began: None,
            became_direct: None,
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
        if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_multicast() {
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

    fn txid(&mut self) -> u64 {
        self.counter += 1;
        // Unique per probe, unguessable without the salt.
        self.counter.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ self.salt
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
                self.became_direct = None;
                self.stats.fallbacks += 1;
                self.start_round(now);
            }
        }
        if self.punch_until.is_some_and(|t| now >= t) {
            self.punch_until = None;
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
        for (i, interval) in due {
            let txid = self.txid();
            let addr = self.remotes[i].addr;
            self.remotes[i].next_ping = now + interval;
            if self.pending.len() >= MAX_PENDING {
                self.pending.pop_front();
            }
            self.pending.push_back((txid, addr, now));
            self.stats.pings_sent += 1;
            out.push((addr, self.key.probe(PING, self.role, txid)));
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
                let Some((kind, role, txid)) = self.key.open(&p) else {
                    self.stats.bad_packets += 1;
                    return Handled::Nothing;
                };
                if role == self.role {
                    // Our own probe, reflected.
                    self.stats.bad_packets += 1;
                    return Handled::Nothing;
                }
                if kind == PING {
                    if self.add(from, CandidateKind::PeerReflexive, now) && self.active.is_none() {
                        // A new way in: probe it at once.
                        if self.punch_until.is_none() {
                            self.start_round(now);
                        }
                    }
                    if let Some(r) = self.remotes.iter_mut().find(|r| r.addr == from) {
                        r.heard = Some(now);
                    }
                    Handled::Reply(from, self.key.probe(PONG, self.role, txid))
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
            let first = self.active.is_none();
            self.active = Some(from);
            self.stats.switches += 1;
            if first {
                self.became_direct = Some(now);
            }
            tracing::info!(
                path = self.path().label(),
                "direct path answers; switching to it"
            );
        }
    }
}

/// What the driver is told while it runs.
pub(crate) enum DirectCmd {
    /// The peer's candidates ([`crate::ControlMsg::PathCandidates`]).
    Peer {
        candidates: Vec<(SocketAddr, CandidateKind)>,
        relay_only: bool,
    },
    /// This side's relay link was replaced (resumed): its socket and the relay's view changed.
    Relink {
        port: Option<DirectPort>,
        info: watch::Receiver<Option<PathInfo>>,
    },
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
}

/// How long the driver waits for the relay's [`PathInfo`] before deciding without it (a relay
/// older than direct paths never sends one).
const PATH_INFO_WAIT: Duration = Duration::from_secs(3);

async fn decide(
    ctx: &DirectCtx,
    info: &mut watch::Receiver<Option<PathInfo>>,
) -> (bool, Option<SocketAddr>) {
    let got = tokio::time::timeout(PATH_INFO_WAIT, info.wait_for(|i| i.is_some()))
        .await
        .ok()
        .and_then(|r| r.ok().and_then(|g| *g));
    let relay_allows = got.is_none_or(|i| i.direct_allowed);
    (
        ctx.allowed_here && relay_allows,
        got.and_then(|i| i.observed),
    )
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

async fn offer(ctx: &DirectCtx, candidates: Vec<(SocketAddr, CandidateKind)>, relay_only: bool) {
    let msg = crate::ControlMsg::PathCandidates {
        candidates,
        relay_only,
    };
    let mut s = ctx.ctl_send.lock().await;
    let _ = crate::session::write_frame(&mut s, &msg).await;
}

/// Drives the direct path of one session side until the session ends (the task is aborted).
pub(crate) async fn run(
    ctx: DirectCtx,
    mut cmds: mpsc::Receiver<DirectCmd>,
    link_port: Option<DirectPort>,
    mut info: watch::Receiver<Option<PathInfo>>,
    relay_v6: bool,
) {
    if !ctx.peer_capable {
        return;
    }
    let (allowed, observed) = decide(&ctx, &mut info).await;
    if !allowed {
        tracing::info!("direct paths are off (relay only); every packet goes through the relay");
        offer(&ctx, Vec::new(), true).await;
        return;
    }
    let Some((mut port, mut rx)) = port_for(link_port, relay_v6) else {
        offer(&ctx, Vec::new(), true).await;
        return;
    };
    let observed_here = |port: &DirectPort, o: Option<SocketAddr>| {
        // The relay saw the link's socket; a fresh socket has another mapping.
        if port.is_shared() { o } else { None }
    };
    offer(
        &ctx,
        gather(port.local_addr(), observed_here(&port, observed)),
        false,
    )
    .await;
    let mut salt = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt);
    let mut prober = Prober::new(
        ProbeKey::derive(&ctx.session_key),
        ctx.role,
        u64::from_be_bytes(salt),
    );
    let mut peer: Vec<(SocketAddr, CandidateKind)> = Vec::new();
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
            c = cmds.recv() => match c {
                None => return,
                Some(DirectCmd::Peer { candidates, relay_only }) => {
                    peer = if relay_only { Vec::new() } else { candidates };
                    prober.set_candidates(&peer, Instant::now());
                }
                Some(DirectCmd::Relink { port: new_port, mut info }) => {
                    let (_, observed) = decide(&ctx, &mut info).await;
                    if let Some((p, r)) = port_for(new_port, relay_v6) {
                        port = p;
                        rx = r;
                    }
                    offer(&ctx, gather(port.local_addr(), observed_here(&port, observed)), false)
                        .await;
                    prober.set_candidates(&peer, Instant::now());
                }
            },
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

    fn pair() -> (Prober, Prober) {
        let k = [7u8; 32];
        (
            Prober::new(ProbeKey::derive(&k), 0, 11),
            Prober::new(ProbeKey::derive(&k), 1, 22),
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
        let mut stranger = Prober::new(ProbeKey::derive(&[8u8; 32]), 1, 5);
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
