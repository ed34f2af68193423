//! Relay channels: the relay's side of [`tandem_net::channel`]. A paired session's two sides get a
//! token each; their channel packets are forwarded by the endpoint's own receive path
//! ([`tandem_net::tunnel::PacketTap`]): one table lookup, an address check, a rate check, the
//! peer's token written in place, and the packet goes out again, with no QUIC decryption or
//! encryption and no task wake-up per packet. The table is pure apart from the clock of the rate
//! limit: tested without sockets.
//!
//! A packet is forwarded only if its token is one the relay gave, it comes from the address of
//! the QUIC connection the token was given on (followed when that connection migrates), and its
//! direction of the session has budget left (the same limit as its DATAGRAMs). It goes to the
//! peer's QUIC connection address only.

use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use tandem_net::channel;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a side's QUIC connection is now (its packets come from there; the peer's go there).
pub trait Addressed: Send + Sync {
    fn address(&self) -> SocketAddr;
}

impl Addressed for quinn::Connection {
    fn address(&self) -> SocketAddr {
        self.remote_address()
    }
}

/// One direction of a session: takes `n` bytes if its budget allows, and counts them.
pub trait Leg: Send + Sync {
    fn admit(&self, n: usize) -> bool;
}

fn same(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// A session's two sides: 0 and 1 (agent and console; the table does not care which).
struct Pair<C> {
    conns: [C; 2],
    tokens: [u64; 2],
    /// Where each side's packets come from, as the socket reports it.
    addrs: Mutex<[SocketAddr; 2]>,
    /// The direction *from* each side.
    legs: [Arc<dyn Leg>; 2],
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
        let addrs = [conns[0].address(), conns[1].address()];
        let pair = Arc::new(Pair {
            conns,
            tokens,
            addrs: Mutex::new(addrs),
            legs,
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

    /// Takes every side's connection address again (a side that only receives while its
    /// connection migrated is reached at its new address). Called by the relay's ticker.
    pub fn refresh(&self) {
        let pairs: Vec<Arc<Pair<C>>> = lock(&self.map)
            .values()
            .filter(|(_, i)| *i == 0)
            .map(|(p, _)| p.clone())
            .collect();
        for p in pairs {
            let now = [p.conns[0].address(), p.conns[1].address()];
            *lock(&p.addrs) = now;
        }
    }

    /// One packet from `from`: where it goes (rewritten in place for the peer), or why not.
    pub fn forward(&self, p: &mut [u8], from: SocketAddr) -> Result<SocketAddr, Dropped> {
        let Some((token, _)) = channel::parse(p) else {
            return Err(Dropped::Malformed);
        };
        // Everything under the table's lock (taken by the endpoint's receive path, and briefly
        // when a session starts or ends): no reference count touched per packet.
        let map = lock(&self.map);
        let Some((pair, i)) = map.get(&token) else {
            return Err(Dropped::UnknownToken);
        };
        let i = *i;
        let to = {
            let mut addrs = lock(&pair.addrs);
            if !same(addrs[i], from) {
                // The side's connection may have moved (NAT rebinding): its QUIC connection says.
                let now = pair.conns[i].address();
                if !same(now, from) {
                    return Err(Dropped::WrongSource);
                }
                addrs[i] = now;
            }
            addrs[1 - i]
        };
        if !pair.legs[i].admit(p.len() - channel::HEADER) {
            return Err(Dropped::RateLimited);
        }
        channel::write_header(p, pair.tokens[1 - i]);
        Ok(to)
    }
}

impl<C: Addressed + 'static> tandem_net::tunnel::PacketTap for Channels<C> {
    fn packet(&self, p: &mut [u8], from: SocketAddr) -> Option<SocketAddr> {
        match self.forward(p, from) {
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

    fn packet(token: u64, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; channel::HEADER + payload.len()];
        channel::write_header(&mut p, token);
        p[channel::HEADER..].copy_from_slice(payload);
        p
    }

    const A: &str = "198.51.100.1:4000";
    const C: &str = "203.0.113.2:5000";

    #[test]
    fn forwards_between_the_two_sides_with_the_peers_token() {
        let t: Channels<At> = Channels::default();
        let (ba, bc) = (budget(1 << 20), budget(1 << 20));
        assert!(t.open([at(A), at(C)], [11, 22], [ba.clone(), bc.clone()]));
        let mut p = packet(11, b"inner");
        assert_eq!(
            t.forward(&mut p, A.parse().unwrap()),
            Ok(C.parse().unwrap())
        );
        assert_eq!(channel::parse(&p), Some((22, &b"inner"[..])));
        let mut p = packet(22, b"back");
        assert_eq!(
            t.forward(&mut p, C.parse().unwrap()),
            Ok(A.parse().unwrap())
        );
        assert_eq!(channel::parse(&p), Some((11, &b"back"[..])));
        assert_eq!(ba.taken.load(Ordering::SeqCst), 5);
        assert_eq!(bc.taken.load(Ordering::SeqCst), 4);
        // An IPv4-mapped source is the same address.
        let mut p = packet(11, b"x");
        let mapped: SocketAddr = "[::ffff:198.51.100.1]:4000".parse().unwrap();
        assert!(t.forward(&mut p, mapped).is_ok());
    }

    #[test]
    fn strangers_wrong_sources_and_closed_sessions_get_nothing() {
        let t: Channels<At> = Channels::default();
        assert!(t.open([at(A), at(C)], [11, 22], [budget(1 << 20), budget(1 << 20)]));
        let stranger: SocketAddr = "192.0.2.9:4000".parse().unwrap();
        // A guessed token.
        assert_eq!(
            t.forward(&mut packet(12, b"x"), A.parse().unwrap()),
            Err(Dropped::UnknownToken)
        );
        // A real token from another address (someone who saw it, or forged the source badly).
        assert_eq!(
            t.forward(&mut packet(11, b"x"), stranger),
            Err(Dropped::WrongSource)
        );
        // The console using the agent's token from its own address.
        assert_eq!(
            t.forward(&mut packet(11, b"x"), C.parse().unwrap()),
            Err(Dropped::WrongSource)
        );
        assert_eq!(
            t.forward(&mut [channel::RELAYED, 1, 2], A.parse().unwrap()),
            Err(Dropped::Malformed)
        );
        assert_eq!(
            t.forward(&mut [0x03, 0, 0, 0, 0, 0, 0, 0, 11, 1], A.parse().unwrap()),
            Err(Dropped::Malformed)
        );
        t.close([11, 22]);
        assert!(t.is_empty());
        assert_eq!(
            t.forward(&mut packet(11, b"x"), A.parse().unwrap()),
            Err(Dropped::UnknownToken)
        );
    }

    #[test]
    fn a_migrated_connection_is_followed_and_its_old_address_refused() {
        let t: Channels<At> = Channels::default();
        let (a, c) = (at(A), at(C));
        assert!(t.open(
            [a.clone(), c.clone()],
            [11, 22],
            [budget(1 << 20), budget(1 << 20)]
        ));
        let moved: SocketAddr = "198.51.100.1:4999".parse().unwrap();
        // Before the QUIC connection moved, the new address is a stranger.
        assert_eq!(
            t.forward(&mut packet(11, b"x"), moved),
            Err(Dropped::WrongSource)
        );
        *lock(&a.0) = moved;
        assert!(t.forward(&mut packet(11, b"x"), moved).is_ok());
        assert_eq!(
            t.forward(&mut packet(11, b"x"), A.parse().unwrap()),
            Err(Dropped::WrongSource)
        );
        // The console's packets now go to the new address.
        assert_eq!(
            t.forward(&mut packet(22, b"y"), C.parse().unwrap()),
            Ok(moved)
        );
        // A side that only receives: the ticker's refresh finds its new address.
        let c_moved: SocketAddr = "203.0.113.2:6000".parse().unwrap();
        *lock(&c.0) = c_moved;
        t.refresh();
        assert_eq!(t.forward(&mut packet(11, b"x"), moved), Ok(c_moved));
    }

    #[test]
    fn the_sessions_rate_limit_applies_and_tokens_never_clash() {
        let t: Channels<At> = Channels::default();
        assert!(t.open([at(A), at(C)], [11, 22], [budget(10), budget(1 << 20)]));
        assert!(
            t.forward(&mut packet(11, &[0; 8]), A.parse().unwrap())
                .is_ok()
        );
        assert_eq!(
            t.forward(&mut packet(11, &[0; 8]), A.parse().unwrap()),
            Err(Dropped::RateLimited)
        );
        assert!(!t.open([at(A), at(C)], [11, 33], [budget(1), budget(1)]));
        assert!(!t.open([at(A), at(C)], [44, 44], [budget(1), budget(1)]));
        assert_eq!(t.len(), 2);
    }
}
