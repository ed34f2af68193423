//! Relay channels: the relay's side of [`tandem_net::channel`]. A paired session's two sides get a
//! token each; their channel packets are forwarded by the endpoint's own receive path
//! ([`tandem_net::tunnel::PacketTap`]): one table lookup, an address check, a rate check, the
//! peer's token written in place, and the packet goes out again, with no QUIC decryption or
//! encryption and no task wake-up per packet. The table is pure apart from the clock of the rate
//! limit: tested without sockets.
//!
//! A packet is forwarded only if its token is one the relay gave, it comes from the address of
//! the QUIC connection the token was given on, its payload is between [`MIN_PAYLOAD`] and
//! [`channel::MAX_PACKET`], and its direction of the session has budget left: the session's
//! limit if the operator set one, and always [`CHANNEL_BYTES_PER_SECOND`] with
//! [`PACKET_OVERHEAD`] charged per packet (a pair of clients cannot make the relay send tiny
//! packets without end). It goes to the peer's QUIC connection address only, from the relay
//! address that connection uses.
//!
//! # Moved connections
//! A client whose NAT gives it a new address migrates its QUIC connection; quinn follows the new
//! address at once and validates it within three PTOs (at least 2 s), going back if that fails.
//! A forged packet from someone else's address can therefore move a connection's address for a
//! moment. The table follows a connection's new address only once it has held for
//! [`FOLLOW_AFTER`] ([`Channels::refresh`], called by the relay's ticker), so a forged migration
//! never points a session's traffic at a third party; a real one interrupts the channel for that
//! long.

use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tandem_net::channel;
use tandem_net::tunnel::Onward;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Shortest payload forwarded: a channel hello ([`channel::HELLO`]); every QUIC packet is longer.
pub const MIN_PAYLOAD: usize = channel::HELLO.len();
/// Bytes charged per packet besides its payload (headers on the wire).
pub const PACKET_OVERHEAD: usize = 48;
/// Least charged per packet (with the overhead): a flood of tiny packets costs the relay a send
/// each, so one direction gets at most [`CHANNEL_BYTES_PER_SECOND`] / 512 packets a second
/// (≈ 131,000), far above a session's needs (its ACKs are a fraction of its packets).
pub const MIN_CHARGE: usize = 512;
/// Most bytes per second one direction of a session may send through its channel, whatever the
/// operator's session limit (a pair of clients flooding the relay).
pub const CHANNEL_BYTES_PER_SECOND: f64 = 64.0 * 1024.0 * 1024.0;
/// How long a connection's new address must hold before the channel follows it.
pub const FOLLOW_AFTER: Duration = Duration::from_secs(4);

/// Where a side's QUIC connection is now (its packets come from there; the peer's go there), and
/// the relay's address it uses.
pub trait Addressed: Send + Sync {
    fn address(&self) -> SocketAddr;
    fn local_ip(&self) -> Option<IpAddr>;
    /// The largest UDP payload its path is known to carry.
    fn max_udp_payload(&self) -> usize;
}

impl Addressed for quinn::Connection {
    fn address(&self) -> SocketAddr {
        self.remote_address()
    }
    fn local_ip(&self) -> Option<IpAddr> {
        quinn::Connection::local_ip(self)
    }
    fn max_udp_payload(&self) -> usize {
        // A DATAGRAM frame's payload plus the least a packet spends around it.
        self.max_datagram_size().map_or(1200, |d| d + 22)
    }
}

/// One direction of a session: takes `n` bytes if its budget allows, and counts them.
pub trait Leg: Send + Sync {
    fn admit(&self, n: usize) -> bool;
}

fn same(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// One side's address as the channel uses it.
#[derive(Clone, Copy)]
struct Side {
    /// Where its packets come from and the peer's go (as the socket reports it).
    addr: SocketAddr,
    /// The relay's address its connection uses (the source of what goes to it).
    local: Option<IpAddr>,
    /// A new address its connection reports, and since when.
    moving: Option<(SocketAddr, Instant)>,
    /// The largest packet its path is known to carry (taken again by [`Channels::refresh`]):
    /// larger ones still go, but never in a batched send, which the system would refuse whole
    /// (and quinn-udp would then stop batching on the relay's socket for good).
    max_packet: usize,
}

/// The always-on byte budget of one direction.
struct Budget {
    tokens: f64,
    last: Instant,
}

impl Budget {
    fn take(&mut self, n: usize, rate: f64, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * rate).min(rate);
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }
}

/// A session's two sides: 0 and 1 (agent and console; the table does not care which).
struct Pair<C> {
    conns: [C; 2],
    tokens: [u64; 2],
    sides: Mutex<[Side; 2]>,
    /// The direction *from* each side: the session's counters and limit, and the channel's own.
    legs: [Arc<dyn Leg>; 2],
    budgets: [Mutex<Budget>; 2],
}

/// Why a channel packet was not forwarded (counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Not a channel packet, or too short or long.
    Malformed,
    /// A token the relay did not give, or no longer holds.
    UnknownToken,
    /// A token's packet from somewhere other than its connection.
    WrongSource,
    /// Over the session's byte rate.
    RateLimited,
}

impl Dropped {
    pub fn label(self) -> &'static str {
        match self {
            Dropped::Malformed => "channel_malformed",
            Dropped::UnknownToken => "channel_unknown_token",
            Dropped::WrongSource => "channel_wrong_source",
            Dropped::RateLimited => "rate_limited",
        }
    }
}

/// Counters of what the table drops (plain counters: a flood of garbage costs no lookup of labels).
#[derive(Default)]
pub struct DropCounters {
    pub malformed: Counter,
    pub unknown_token: Counter,
    pub wrong_source: Counter,
    pub rate_limited: Counter,
    pub send_failed: Counter,
}

impl DropCounters {
    fn count(&self, d: Dropped) {
        match d {
            Dropped::Malformed => self.malformed.inc(),
            Dropped::UnknownToken => self.unknown_token.inc(),
            Dropped::WrongSource => self.wrong_source.inc(),
            Dropped::RateLimited => self.rate_limited.inc(),
        };
    }
}

/// Tokens are drawn from the system's random generator and never chosen by a client, so they
/// are their own hash: no SipHash per packet, and nobody can aim tokens at one bucket.
#[derive(Default)]
struct TokenHasher(u64);

impl std::hash::Hasher for TokenHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type TokenMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<TokenHasher>>;

/// The relay's channels: token → session side.
pub struct Channels<C> {
    map: Mutex<TokenMap<(Arc<Pair<C>>, usize)>>,
    pub drops: DropCounters,
    /// Bytes per second per direction ([`CHANNEL_BYTES_PER_SECOND`]; tests set less).
    rate: f64,
}

impl<C> fmt::Debug for Channels<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channels")
            .field("tokens", &lock(&self.map).len())
            .finish()
    }
}

impl<C: Addressed> Default for Channels<C> {
    fn default() -> Self {
        Channels::new(DropCounters::default())
    }
}

impl<C: Addressed> Channels<C> {
    /// An empty table that counts its drops in `drops`.
    pub fn new(drops: DropCounters) -> Self {
        Channels {
            map: Mutex::new(TokenMap::default()),
            drops,
            rate: CHANNEL_BYTES_PER_SECOND,
        }
    }

    /// The same with another per-direction rate.
    pub fn with_rate(drops: DropCounters, rate: f64) -> Self {
        Channels {
            rate,
            ..Channels::new(drops)
        }
    }
}

impl<C: Addressed + 'static> Channels<C> {
    /// Opens a session's channel between two connections with fresh `tokens` (distinct, and new
    /// to the table: the caller draws them at random; a clash refuses the channel). `legs[i]` is
    /// the direction from side `i`.
    pub fn open(&self, conns: [C; 2], tokens: [u64; 2], legs: [Arc<dyn Leg>; 2]) -> bool {
        let mut map = lock(&self.map);
        if tokens[0] == tokens[1] || tokens.iter().any(|t| map.contains_key(t)) {
            return false;
        }
        let side = |c: &C| Side {
            addr: c.address(),
            local: c.local_ip(),
            moving: None,
            max_packet: c.max_udp_payload(),
        };
        let sides = [side(&conns[0]), side(&conns[1])];
        let budget = || {
            Mutex::new(Budget {
                tokens: self.rate,
                last: Instant::now(),
            })
        };
        let pair = Arc::new(Pair {
            conns,
            tokens,
            sides: Mutex::new(sides),
            legs,
            budgets: [budget(), budget()],
        });
        for (i, t) in tokens.iter().enumerate() {
            map.insert(*t, (pair.clone(), i));
        }
        true
    }

    /// Closes a session's channel (its tokens stop working at once).
    pub fn close(&self, tokens: [u64; 2]) {
        let mut map = lock(&self.map);
        for t in tokens {
            map.remove(&t);
        }
    }

    /// Tokens in the table.
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Follows connections that moved: a side's new address is taken once its connection has
    /// reported it for [`FOLLOW_AFTER`] (see the module's doc). Called by the relay's ticker.
    pub fn refresh(&self, now: Instant) {
        let pairs: Vec<Arc<Pair<C>>> = lock(&self.map)
            .values()
            .filter(|(_, i)| *i == 0)
            .map(|(p, _)| p.clone())
            .collect();
        for p in pairs {
            let now_at = [p.conns[0].address(), p.conns[1].address()];
            let max = [p.conns[0].max_udp_payload(), p.conns[1].max_udp_payload()];
            let mut sides = lock(&p.sides);
            for (i, side) in sides.iter_mut().enumerate() {
                side.max_packet = max[i];
                let a = now_at[i];
                if same(a, side.addr) {
                    side.moving = None;
                    continue;
                }
                match side.moving {
                    Some((m, since)) if same(m, a) => {
                        if now.saturating_duration_since(since) >= FOLLOW_AFTER {
                            side.addr = a;
                            side.local = p.conns[i].local_ip();
                            side.moving = None;
                        }
                    }
                    _ => side.moving = Some((a, now)),
                }
            }
        }
    }

    /// One packet from `from`: where it goes and from which relay address (rewritten in place
    /// for the peer), or why not.
    pub fn forward(&self, p: &mut [u8], from: SocketAddr, now: Instant) -> Result<Onward, Dropped> {
        let Some((token, payload)) = channel::parse(p) else {
            return Err(Dropped::Malformed);
        };
        if payload.len() < MIN_PAYLOAD {
            return Err(Dropped::Malformed);
        }
        let payload = payload.len();
        // Everything under the table's lock (taken by the endpoint's receive path, and briefly
        // when a session starts or ends): no reference count touched per packet.
        let map = lock(&self.map);
        let Some((pair, i)) = map.get(&token) else {
            return Err(Dropped::UnknownToken);
        };
        let i = *i;
        let to = {
            let sides = lock(&pair.sides);
            if !same(sides[i].addr, from) {
                return Err(Dropped::WrongSource);
            }
            sides[1 - i]
        };
        let charge = (payload + PACKET_OVERHEAD).max(MIN_CHARGE);
        if !lock(&pair.budgets[i]).take(charge, self.rate, now) || !pair.legs[i].admit(payload) {
            return Err(Dropped::RateLimited);
        }
        channel::write_header(p, pair.tokens[1 - i]);
        Ok(Onward {
            to: to.addr,
            src: to.local,
            batch: p.len() <= to.max_packet,
        })
    }
}

impl<C: Addressed + 'static> tandem_net::tunnel::PacketTap for Channels<C> {
    fn packet(&self, p: &mut [u8], from: SocketAddr) -> Option<Onward> {
        match self.forward(p, from, Instant::now()) {
            Ok(to) => Some(to),
            Err(d) => {
                self.drops.count(d);
                None
            }
        }
    }

    fn send_failed(&self) {
        self.drops.send_failed.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Clone)]
    struct At(Arc<Mutex<SocketAddr>>);
    impl Addressed for At {
        fn address(&self) -> SocketAddr {
            *lock(&self.0)
        }
        fn local_ip(&self) -> Option<IpAddr> {
            Some("192.0.2.100".parse().unwrap())
        }
        fn max_udp_payload(&self) -> usize {
            1200
        }
    }
    fn at(s: &str) -> At {
        At(Arc::new(Mutex::new(s.parse().unwrap())))
    }

    #[derive(Default)]
    struct Budget {
        left: AtomicU64,
        taken: AtomicU64,
    }
    impl Leg for Budget {
        fn admit(&self, n: usize) -> bool {
            let n = n as u64;
            if self.left.load(Ordering::SeqCst) < n {
                return false;
            }
            self.left.fetch_sub(n, Ordering::SeqCst);
            self.taken.fetch_add(n, Ordering::SeqCst);
            true
        }
    }
    fn budget(n: u64) -> Arc<Budget> {
        let b = Budget::default();
        b.left.store(n, Ordering::SeqCst);
        Arc::new(b)
    }

    /// A channel packet with `token` whose payload is `body` padded to the shortest payload.
    fn packet(token: u64, body: &[u8]) -> Vec<u8> {
        let len = body.len().max(MIN_PAYLOAD);
        let mut p = vec![0u8; channel::HEADER + len];
        channel::write_header(&mut p, token);
        p[channel::HEADER..channel::HEADER + body.len()].copy_from_slice(body);
        p
    }

    const A: &str = "198.51.100.1:4000";
    const C: &str = "203.0.113.2:5000";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn go(t: &Channels<At>, p: &mut [u8], from: &str) -> Result<SocketAddr, Dropped> {
        t.forward(p, addr(from), Instant::now()).map(|o| o.to)
    }

    #[test]
    fn forwards_between_the_two_sides_with_the_peers_token() {
        let t: Channels<At> = Channels::default();
        let (ba, bc) = (budget(1 << 20), budget(1 << 20));
        assert!(t.open([at(A), at(C)], [11, 22], [ba.clone(), bc.clone()]));
        let mut p = packet(11, b"inner packet");
        let o = t.forward(&mut p, addr(A), Instant::now()).unwrap();
        assert_eq!(
            (o.to, o.src),
            (addr(C), Some("192.0.2.100".parse().unwrap()))
        );
        assert!(o.batch);
        // Larger than the peer's path is known to carry: sent, but never in a batch.
        let mut big = packet(11, &[7; 1300]);
        assert!(!t.forward(&mut big, addr(A), Instant::now()).unwrap().batch);
        assert_eq!(channel::parse(&p), Some((22, &b"inner packet"[..])));
        let mut p = packet(22, b"back");
        assert_eq!(go(&t, &mut p, C), Ok(addr(A)));
        assert_eq!(channel::parse(&p).unwrap().0, 11);
        assert_eq!(ba.taken.load(Ordering::SeqCst), 12 + 1300);
        assert_eq!(bc.taken.load(Ordering::SeqCst), 12);
        // An IPv4-mapped source is the same address.
        assert!(go(&t, &mut packet(11, b"x"), "[::ffff:198.51.100.1]:4000").is_ok());
    }

    #[test]
    fn strangers_wrong_sources_and_closed_sessions_get_nothing() {
        let t: Channels<At> = Channels::default();
        assert!(t.open([at(A), at(C)], [11, 22], [budget(1 << 20), budget(1 << 20)]));
        // A guessed token.
        assert_eq!(go(&t, &mut packet(12, b"x"), A), Err(Dropped::UnknownToken));
        // A real token from another address (someone who saw it, or forged the source badly).
        assert_eq!(
            go(&t, &mut packet(11, b"x"), "192.0.2.9:4000"),
            Err(Dropped::WrongSource)
        );
        // The console using the agent's token from its own address.
        assert_eq!(go(&t, &mut packet(11, b"x"), C), Err(Dropped::WrongSource));
        // Too short to be a hello or a QUIC packet, or not a channel packet.
        let mut short = packet(11, b"x");
        short.truncate(channel::HEADER + MIN_PAYLOAD - 1);
        assert_eq!(go(&t, &mut short, A), Err(Dropped::Malformed));
        let mut other = packet(11, b"x");
        other[0] = 0x03;
        assert_eq!(go(&t, &mut other, A), Err(Dropped::Malformed));
        let mut long = vec![0u8; channel::MAX_PACKET + 1];
        channel::write_header(&mut long, 11);
        assert_eq!(go(&t, &mut long, A), Err(Dropped::Malformed));
        t.close([11, 22]);
        assert!(t.is_empty());
        assert_eq!(go(&t, &mut packet(11, b"x"), A), Err(Dropped::UnknownToken));
    }

    #[test]
    fn a_moved_connection_is_followed_only_once_its_address_held() {
        let t: Channels<At> = Channels::default();
        let (a, c) = (at(A), at(C));
        assert!(t.open(
            [a.clone(), c.clone()],
            [11, 22],
            [budget(1 << 20), budget(1 << 20)]
        ));
        let moved = "198.51.100.1:4999";
        let t0 = Instant::now();
        // A forged packet moves the agent's QUIC connection to a third party for a moment:
        // nothing follows it, and quinn's failed validation moves it back.
        *lock(&a.0) = addr(moved);
        t.refresh(t0);
        assert_eq!(go(&t, &mut packet(22, b"y"), C), Ok(addr(A)));
        assert_eq!(
            go(&t, &mut packet(11, b"x"), moved),
            Err(Dropped::WrongSource)
        );
        *lock(&a.0) = addr(A);
        t.refresh(t0 + Duration::from_secs(3));
        *lock(&a.0) = addr(moved);
        t.refresh(t0 + Duration::from_secs(5));
        assert_eq!(
            go(&t, &mut packet(22, b"y"), C),
            Ok(addr(A)),
            "the clock restarted"
        );
        // A real move holds: followed after FOLLOW_AFTER.
        t.refresh(t0 + Duration::from_secs(5) + FOLLOW_AFTER);
        assert_eq!(go(&t, &mut packet(11, b"x"), moved), Ok(addr(C)));
        assert_eq!(go(&t, &mut packet(11, b"x"), A), Err(Dropped::WrongSource));
        assert_eq!(go(&t, &mut packet(22, b"y"), C), Ok(addr(moved)));
    }

    #[test]
    fn budgets_apply_per_direction_and_tokens_never_clash() {
        // The session's own limit (the leg).
        let t: Channels<At> = Channels::default();
        assert!(t.open([at(A), at(C)], [11, 22], [budget(12), budget(1 << 20)]));
        assert!(go(&t, &mut packet(11, b""), A).is_ok());
        assert_eq!(go(&t, &mut packet(11, b""), A), Err(Dropped::RateLimited));
        assert!(
            go(&t, &mut packet(22, b""), C).is_ok(),
            "the other direction"
        );
        assert!(!t.open([at(A), at(C)], [11, 33], [budget(1), budget(1)]));
        assert!(!t.open([at(A), at(C)], [44, 44], [budget(1), budget(1)]));
        assert_eq!(t.len(), 2);
        // The channel's own: tiny packets are charged their overhead too.
        let rate = 10.0 * MIN_CHARGE as f64;
        let t: Channels<At> = Channels::with_rate(DropCounters::default(), rate);
        assert!(t.open([at(A), at(C)], [11, 22], [budget(1 << 20), budget(1 << 20)]));
        let now = Instant::now();
        let sent = (0..100)
            .filter(|_| t.forward(&mut packet(11, b""), addr(A), now).is_ok())
            .count();
        assert_eq!(sent, 10);
        // A second later there is room again.
        assert!(
            t.forward(&mut packet(11, b""), addr(A), now + Duration::from_secs(1))
                .is_ok()
        );
    }
}
