//! The relay's brain as a pure state machine: connections, slots, pairing, sessions and the limits a
//! stranger can hit. No sockets, no clocks, no randomness of its own: the caller passes `now` and a
//! random source, so every rule here is tested deterministically (see the tests at the bottom).
//!
//! Decisions written down:
//! * A slot is 3 to 9 random digits. Its length adapts: the shortest length whose space is less than
//!   half used (counting slots in use *and* quarantined ones) is picked, then a uniformly random free
//!   value of that length. Slots are short for dictation on a small relay and never run out on a big one.
//! * A slot lives for `slot_ttl` (10 min) from registration unless a console joins it first. The agent's
//!   keep-alives keep its connection, and thereby the slot, until then; after expiry the agent registers
//!   again and gets a new slot (and makes a new secret, so a new code).
//! * A slot that ended (expired, agent left, code burned, session over) is quarantined until its original
//!   expiry (at least one minute), so it is not reused within its expiry and a late join gets a precise
//!   error instead of "unknown".
//! * A source address is an IPv4 address or an IPv6 /56 ([`address_key`]). Connections are capped per
//!   address and, stacked on that, per network ([`network_keys`]): an IPv4 /24 or IPv6 /48 holds at
//!   most [`SMALL_NETWORK_FACTOR`] addresses' worth, an IPv6 /32 [`LARGE_NETWORK_FACTOR`]; the
//!   probation allowance ([`PROBATION_PER_ADDRESS`]) is stacked the same way. So the 256 /56s of a
//!   free /48 cannot reach the global limits, while an office (one /48, or one IPv4 address) keeps
//!   its full per-address allowance.
//! * Every join attempt counts against two token buckets, the technician's and the source address's,
//!   successful ones included. Authentication attempts count against a per-address bucket;
//!   registrations (new codes) against a per-connection and a per-address bucket.
//! * The relay calls [`Registry::open`] only for a peer whose source address QUIC has validated
//!   (Retry), so forged addresses never count against a limit.
//! * A share of the connections ([`Limits::console_reserve`]) is kept for technicians: agents and
//!   connections that have not identified yet share the rest. When that share is full, a new
//!   connection is still admitted into the reserve *on probation* (a few per address): it may
//!   authenticate or resume, never register.
//! * An agent connection that holds neither a slot nor a session (its slot expired, it gave up its
//!   code, or its session ended) and does not register again within [`AGENT_IDLE_GRACE`] is reported
//!   by [`Registry::tick`] in [`Tick::idle_agents`], once, for the relay to close. It stays counted
//!   until the relay closes it. A legitimate agent registers again at once after `SlotExpired` and
//!   leaves the relay after a session or while it shows no code.
//! * Nothing a stranger triggers scans every slot: the slot space in use is counted per length, a
//!   free slot is found by a bounded number of random draws, and quarantined slots are kept in the
//!   order their quarantine ends, at most [`Limits::max_quarantined_slots`] of them (the one that
//!   would be released first goes when the cap is reached).

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tandem_proto::{EndReason, ErrorCode, ResumeToken, SLOT_MAX_DIGITS, SLOT_MIN_DIGITS, Slot};

/// Everything a stranger can cause is bounded by one of these.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections in total.
    pub max_connections: usize,
    /// Connections per source address (IPv6: per /56). Networks get multiples of it: see
    /// [`SMALL_NETWORK_FACTOR`] and [`LARGE_NETWORK_FACTOR`].
    pub max_connections_per_address: usize,
    /// Of `max_connections`, how many only authenticated consoles may hold: agents and connections
    /// that have not identified yet get at most `max_connections - console_reserve`, so a flood of
    /// agents cannot lock technicians out.
    pub console_reserve: usize,
    /// Time from connection to a successful register or authenticate.
    pub handshake_timeout: Duration,
    /// How long a slot waits for a console.
    pub slot_ttl: Duration,
    /// Concurrent paired sessions.
    pub max_sessions: usize,
    /// Join attempts per technician per minute.
    pub joins_per_minute_per_technician: u32,
    /// Join attempts per source address per minute.
    pub joins_per_minute_per_address: u32,
    /// Authentication attempts per source address per minute.
    pub auths_per_minute_per_address: u32,
    /// Token verifications (Argon2id) that may wait for a verification thread; beyond it a login is
    /// answered "busy, retry in N s" at once.
    pub auth_queue: usize,
    /// Registrations (new codes) per connection per minute.
    pub registers_per_minute_per_connection: u32,
    /// Registrations per source address per minute.
    pub registers_per_minute_per_address: u32,
    /// Quarantined (ended) slots kept at most; beyond it the one whose quarantine ends first is
    /// released early.
    pub max_quarantined_slots: usize,
    /// Optional cap on forwarded bytes per second, per session and direction.
    pub session_bytes_per_second: Option<u64>,
    /// How long a paired session waits for a side that lost its connection to resume; zero ends
    /// the session at once.
    pub resume_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_connections_per_address: 64,
            console_reserve: 1_000,
            handshake_timeout: Duration::from_secs(10),
            slot_ttl: Duration::from_secs(600),
            max_sessions: 5_000,
            joins_per_minute_per_technician: 5,
            joins_per_minute_per_address: 5,
            auths_per_minute_per_address: 10,
            auth_queue: 64,
            registers_per_minute_per_connection: 6,
            registers_per_minute_per_address: 60,
            max_quarantined_slots: 20_000,
            session_bytes_per_second: None,
            resume_grace: Duration::from_secs(15),
        }
    }
}

pub type ConnId = u64;
pub type SessionId = u64;
pub type TechnicianId = i64;

/// A source of uniform random numbers (the OS CSPRNG in the relay, a fixed sequence in tests).
pub trait SlotRng {
    /// A uniformly random number in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64;
}

/// A technician as the store authenticated them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Technician {
    pub id: TechnicianId,
    pub name: String,
    pub organisation: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Connected, not yet registered or authenticated.
    New,
    Agent {
        slot: Option<Slot>,
        session: Option<SessionId>,
    },
    Console {
        technician: Technician,
        session: Option<SessionId>,
    },
}

#[derive(Clone, Debug)]
struct Conn {
    addr_key: IpAddr,
    role: Role,
    /// Admitted into the console reserve: may authenticate or resume, not register.
    probation: bool,
    /// Registrations of this connection (created at its first).
    registers: Option<Bucket>,
    /// Set exactly while the role is an agent with neither slot nor session: when the registry
    /// gives up on it. While it is also in [`Registry::idle_agents`] it has not been reported yet.
    idle_until: Option<Instant>,
}

/// Whether `role` is an agent that holds neither a slot nor a session.
fn is_idle_agent(role: &Role) -> bool {
    matches!(
        role,
        Role::Agent {
            slot: None,
            session: None
        }
    )
}

#[derive(Clone, Debug)]
enum SlotState {
    Waiting { agent: ConnId, expires_at: Instant },
    Paired { expires_at: Instant },
}

/// Why a slot is quarantined; decides the error a late join gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tomb {
    Expired,
    AgentGone,
    Burned,
    /// The session on it is over (or the agent replaced the code).
    Ended,
}

impl Tomb {
    fn code(self) -> ErrorCode {
        match self {
            Tomb::Expired | Tomb::Ended => ErrorCode::ExpiredSlot,
            Tomb::AgentGone => ErrorCode::AgentGone,
            Tomb::Burned => ErrorCode::CodeBurned,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Agent,
    Console,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub id: SessionId,
    /// The agent's connection (stale while the agent is the suspended side).
    pub agent: ConnId,
    /// The console's connection (stale while the console is the suspended side).
    pub console: ConnId,
    pub slot: Slot,
    /// The device's id when the agent is an enrolled device reached without a code.
    pub device: Option<String>,
    pub technician: Technician,
    pub agent_token: ResumeToken,
    pub console_token: ResumeToken,
    /// Set while one side has lost its connection: which, and until when it may resume.
    pub suspended: Option<(Side, Instant)>,
}

impl Session {
    fn conn_of(&self, side: Side) -> ConnId {
        match side {
            Side::Agent => self.agent,
            Side::Console => self.console,
        }
    }
}

/// What closing a connection did to its session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Closed {
    /// It was in no session.
    Nothing,
    /// Its session ended (no grace, or both sides are gone).
    Ended(Ended),
    /// Its session waits for it to resume; `notify` is told.
    Suspended {
        session: SessionId,
        notify: ConnId,
        grace: Duration,
    },
}

/// A successful resume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resumed {
    pub session: Session,
    pub side: Side,
    /// A connection of the same side that was still attached and is now replaced (to be closed).
    pub replaced: Option<ConnId>,
    /// The other side, to be told that its peer is back (if attached).
    pub notify: Option<ConnId>,
}

/// What housekeeping found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tick {
    pub expired: Vec<Expired>,
    /// Sessions whose suspended side did not come back in time.
    pub ended: Vec<Ended>,
    /// Agent connections that held neither a slot nor a session for [`AGENT_IDLE_GRACE`]: the relay
    /// closes them ([`ErrorCode::IdleTimeout`]). Each is reported once; it stays counted against
    /// the limits until the relay calls [`Registry::close`] for it.
    pub idle_agents: Vec<ConnId>,
}

/// A successful join.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paired {
    pub session: Session,
}

/// A session that ended, and whom to tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    pub session: Session,
    pub reason: EndReason,
    /// The side that did not cause the end and must be told (None if both are gone).
    pub notify: Option<ConnId>,
}

/// An agent whose slot expired unused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expired {
    pub agent: ConnId,
    pub slot: Slot,
}

/// A token bucket refilled continuously at `per_second`, holding at most `burst`. The registry's
/// limits are per minute with a burst of a minute's worth ([`Bucket::full`], [`Bucket::try_take`]);
/// the server's per-connection budgets use [`Bucket::new`] and [`Bucket::take`].
#[derive(Clone, Debug)]
pub(crate) struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket of `burst` tokens.
    pub(crate) fn new(burst: f64, now: Instant) -> Self {
        Bucket {
            tokens: burst,
            last: now,
        }
    }
    fn refill(&mut self, burst: f64, per_second: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * per_second).min(burst);
        self.last = now;
    }
    /// Takes a token if there is one.
    pub(crate) fn take(&mut self, burst: f64, per_second: f64, now: Instant) -> bool {
        self.refill(burst, per_second, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
    fn full(per_minute: u32, now: Instant) -> Self {
        Self::new(per_minute as f64, now)
    }
    fn try_take(&mut self, per_minute: u32, now: Instant) -> bool {
        self.take(per_minute as f64, per_minute as f64 / 60.0, now)
    }
    fn refill_per_minute(&mut self, per_minute: u32, now: Instant) {
        self.refill(per_minute as f64, per_minute as f64 / 60.0, now);
    }
    fn would_allow(&mut self, per_minute: u32, now: Instant) -> bool {
        self.refill_per_minute(per_minute, now);
        self.tokens >= 1.0
    }
}

/// Which limit refused something (for metrics and logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitHit {
    Connections,
    ConnectionsPerAddress,
    /// Too many connections from one network (IPv4 /24, IPv6 /48 or /32).
    ConnectionsPerNetwork,
    Sessions,
    JoinsPerTechnician,
    JoinsPerAddress,
    AuthsPerAddress,
    /// Agents and unidentified connections fill their share; the rest is kept for consoles.
    AgentShare,
    /// Too many connections of one address wait in the console reserve.
    ReservePerAddress,
    /// Too many connections of one network wait in the console reserve.
    ReservePerNetwork,
    RegistersPerConnection,
    RegistersPerAddress,
    /// The token verification queue is full.
    AuthQueue,
}

impl LimitHit {
    pub fn label(self) -> &'static str {
        match self {
            LimitHit::Connections => "connections",
            LimitHit::ConnectionsPerAddress => "connections_per_address",
            LimitHit::ConnectionsPerNetwork => "connections_per_network",
            LimitHit::Sessions => "sessions",
            LimitHit::JoinsPerTechnician => "joins_per_technician",
            LimitHit::JoinsPerAddress => "joins_per_address",
            LimitHit::AuthsPerAddress => "auths_per_address",
            LimitHit::AgentShare => "agent_share",
            LimitHit::ReservePerAddress => "reserve_per_address",
            LimitHit::ReservePerNetwork => "reserve_per_network",
            LimitHit::RegistersPerConnection => "registers_per_connection",
            LimitHit::RegistersPerAddress => "registers_per_address",
            LimitHit::AuthQueue => "auth_queue",
        }
    }
    pub fn code(self) -> ErrorCode {
        match self {
            LimitHit::Connections | LimitHit::AgentShare => ErrorCode::TooManyConnections,
            LimitHit::ConnectionsPerAddress
            | LimitHit::ConnectionsPerNetwork
            | LimitHit::ReservePerAddress
            | LimitHit::ReservePerNetwork => ErrorCode::TooManyConnectionsFromAddress,
            LimitHit::Sessions => ErrorCode::TooManySessions,
            LimitHit::RegistersPerConnection | LimitHit::RegistersPerAddress => {
                ErrorCode::RegisterRateLimited
            }
            LimitHit::AuthQueue => ErrorCode::Busy,
            LimitHit::JoinsPerTechnician
            | LimitHit::JoinsPerAddress
            | LimitHit::AuthsPerAddress => ErrorCode::RateLimited,
        }
    }
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A protocol-order violation: the connection must be closed with this code.
    Fatal(ErrorCode),
    /// The request is refused; the connection stays usable.
    Refused(ErrorCode),
    /// A limit refused it.
    Limit(LimitHit),
}

impl Refusal {
    pub fn code(self) -> ErrorCode {
        match self {
            Refusal::Fatal(c) | Refusal::Refused(c) => c,
            Refusal::Limit(l) => l.code(),
        }
    }
}

/// Groups IPv6 addresses by /56 (what ISPs commonly delegate to one subscriber, who can then use
/// 256 different /64s); IPv4 as is.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let seg = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(
                seg[0],
                seg[1],
                seg[2],
                seg[3] & 0xff00,
                0,
                0,
                0,
                0,
            ))
        }
    }
}

/// A network wider than one address key: its first `len` bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetworkKey {
    pub prefix: IpAddr,
    pub len: u8,
}

/// How many addresses' worth of connections (and of probation) an IPv4 /24 or an IPv6 /48 may hold.
/// An office is one IPv4 address or one IPv6 /48 (of which it uses a /56 or a few /64s): it keeps its
/// full per-address allowance, and a few neighbours on the same /24 or offices in the same /48 have
/// room beside it. A stranger with a free /48 (a tunnel broker hands them out) gets 4 × 64 = 256
/// connections and 4 × 4 = 16 on probation, not 256 times the per-address limit (16,384, more than
/// the agents' share, and 1,024 on probation, more than the console reserve).
pub const SMALL_NETWORK_FACTOR: usize = 4;
/// The same for an IPv6 /32 (one provider's or hoster's allocation, shared by many customers):
/// 16 × 64 = 1,024 connections and 16 × 4 = 64 on probation, a tenth of the global limits by default.
pub const LARGE_NETWORK_FACTOR: usize = 16;

/// The networks an address key (see [`address_key`]) belongs to, each with its factor: IPv4 /24;
/// IPv6 /48 and /32.
pub fn network_keys(key: IpAddr) -> [Option<(NetworkKey, usize)>; 2] {
    match key {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            let prefix = IpAddr::V4(std::net::Ipv4Addr::new(o[0], o[1], o[2], 0));
            [
                Some((NetworkKey { prefix, len: 24 }, SMALL_NETWORK_FACTOR)),
                None,
            ]
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let p48 = IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0));
            let p32 = IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], 0, 0, 0, 0, 0, 0));
            [
                Some((
                    NetworkKey {
                        prefix: p48,
                        len: 48,
                    },
                    SMALL_NETWORK_FACTOR,
                )),
                Some((
                    NetworkKey {
                        prefix: p32,
                        len: 32,
                    },
                    LARGE_NETWORK_FACTOR,
                )),
            ]
        }
    }
}

/// Subtracts one from `map[key]`, forgetting the entry at zero.
fn uncount<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// The relay's pairing state.
#[derive(Debug)]
pub struct Registry {
    limits: Limits,
    conns: HashMap<ConnId, Conn>,
    per_address: HashMap<IpAddr, usize>,
    /// Connections per network (see [`network_keys`]).
    per_network: HashMap<NetworkKey, usize>,
    slots: HashMap<Slot, SlotState>,
    tombs: HashMap<Slot, (Tomb, Instant)>,
    /// The tombs by the end of their quarantine (lifted and evicted from the front).
    tomb_order: BTreeSet<(Instant, Slot)>,
    /// Whose slot each tomb was (the agent's address key), and each owner's tombs by the end of
    /// their quarantine: beyond [`MAX_TOMBS_PER_ADDRESS`] an owner's own first tomb goes, so a
    /// flood of re-registers cannot evict other people's quarantines.
    tomb_owner: HashMap<Slot, IpAddr>,
    owner_tombs: HashMap<IpAddr, BTreeSet<(Instant, Slot)>>,
    /// Slots in use (waiting, paired or quarantined), per number of digits.
    used_by_len: [u64; SLOT_MAX_DIGITS + 1],
    /// Connections with the console role.
    consoles: usize,
    /// Connections on probation in the console reserve, per address.
    probation_by_addr: HashMap<IpAddr, usize>,
    /// Connections on probation in the console reserve, per network.
    probation_by_network: HashMap<NetworkKey, usize>,
    /// Agents with neither slot nor session, not reported yet, by when they are given up.
    idle_agents: BTreeSet<(Instant, ConnId)>,
    sessions: HashMap<SessionId, Session>,
    tokens: HashMap<ResumeToken, (SessionId, Side)>,
    join_by_tech: HashMap<TechnicianId, Bucket>,
    join_by_addr: HashMap<IpAddr, Bucket>,
    auth_by_addr: HashMap<IpAddr, Bucket>,
    register_by_addr: HashMap<IpAddr, Bucket>,
    next_conn: ConnId,
    next_session: SessionId,
    /// Online enrolled devices: each holds a slot of [`SLOT_MAX_DIGITS`] digits (never shown, never
    /// joinable by code, never expiring), reached by [`Registry::connect_device`].
    device_slots: HashMap<String, Slot>,
    slot_devices: HashMap<Slot, String>,
}

/// A device's slot lives as long as its connection (the expiry is only a bound far in the future).
const DEVICE_SLOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Quarantined slots one address's agents may hold (an office re-registers a few codes an hour;
/// a flood at the register budget, 60 a minute for 10 minutes, would hold 600 and evict everyone
/// else's once the global cap is reached).
pub const MAX_TOMBS_PER_ADDRESS: usize = 100;

/// Minimum time an ended slot stays quarantined.
const MIN_QUARANTINE: Duration = Duration::from_secs(60);
/// Connections of one address that may wait on probation in the console reserve (technicians
/// behind one office address authenticating at the same moment while agents fill their share).
/// Networks get multiples of it (see [`SMALL_NETWORK_FACTOR`]).
pub const PROBATION_PER_ADDRESS: usize = 4;
/// How long an agent connection may hold neither a slot nor a session before the relay closes it.
/// A legitimate agent registers again at once after its slot expired (one round trip), and leaves
/// the relay after a session or while it shows no code; 30 s is generous.
pub const AGENT_IDLE_GRACE: Duration = Duration::from_secs(30);
/// Random draws for a free slot of one length before trying the next length (each draw is free
/// with probability above 1/2, so 64 fail together with probability below 2^-64).
const SLOT_DRAWS: usize = 64;

impl Registry {
    pub fn new(limits: Limits) -> Self {
        Registry {
            limits,
            conns: HashMap::new(),
            per_address: HashMap::new(),
            per_network: HashMap::new(),
            slots: HashMap::new(),
            tombs: HashMap::new(),
            tomb_order: BTreeSet::new(),
            tomb_owner: HashMap::new(),
            owner_tombs: HashMap::new(),
            used_by_len: [0; SLOT_MAX_DIGITS + 1],
            consoles: 0,
            probation_by_addr: HashMap::new(),
            probation_by_network: HashMap::new(),
            idle_agents: BTreeSet::new(),
            sessions: HashMap::new(),
            tokens: HashMap::new(),
            join_by_tech: HashMap::new(),
            join_by_addr: HashMap::new(),
            auth_by_addr: HashMap::new(),
            register_by_addr: HashMap::new(),
            next_conn: 1,
            next_session: 1,
            device_slots: HashMap::new(),
            slot_devices: HashMap::new(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }
    /// Slots with an agent waiting.
    /// Agents waiting with a code (online devices are counted by [`Registry::device_count`]).
    pub fn waiting_count(&self) -> usize {
        self.slots
            .iter()
            .filter(|(slot, s)| {
                matches!(s, SlotState::Waiting { .. }) && !self.slot_devices.contains_key(*slot)
            })
            .count()
    }
    pub fn role(&self, conn: ConnId) -> Option<&Role> {
        self.conns.get(&conn).map(|c| &c.role)
    }
    pub fn session(&self, id: SessionId) -> Option<&Session> {
        self.sessions.get(&id)
    }

    /// Connections on probation in the console reserve.
    pub fn probation_count(&self) -> usize {
        self.probation_by_addr.values().sum()
    }
    /// Quarantined slots.
    pub fn quarantined_count(&self) -> usize {
        self.tombs.len()
    }

    /// Admits a new connection from `ip` (whose address the transport has validated), or says
    /// which limit refuses it. When agents and unidentified connections fill their share, the
    /// connection is admitted on probation into the console reserve.
    pub fn open(&mut self, ip: IpAddr) -> Result<ConnId, LimitHit> {
        let key = address_key(ip);
        if self.conns.len() >= self.limits.max_connections {
            return Err(LimitHit::Connections);
        }
        let per_address = self.limits.max_connections_per_address;
        if self.per_address.get(&key).copied().unwrap_or(0) >= per_address {
            return Err(LimitHit::ConnectionsPerAddress);
        }
        let nets = network_keys(key);
        for (net, factor) in nets.iter().flatten() {
            if self.per_network.get(net).copied().unwrap_or(0) >= factor.saturating_mul(per_address)
            {
                return Err(LimitHit::ConnectionsPerNetwork);
            }
        }
        let share = self
            .limits
            .max_connections
            .saturating_sub(self.limits.console_reserve);
        let probation = self.conns.len() - self.consoles >= share;
        if probation {
            if self.probation_by_addr.get(&key).copied().unwrap_or(0) >= PROBATION_PER_ADDRESS {
                return Err(LimitHit::ReservePerAddress);
            }
            for (net, factor) in nets.iter().flatten() {
                if self.probation_by_network.get(net).copied().unwrap_or(0)
                    >= factor * PROBATION_PER_ADDRESS
                {
                    return Err(LimitHit::ReservePerNetwork);
                }
            }
            // Every check passed: count in all maps (uncounted in `end_probation`).
            *self.probation_by_addr.entry(key).or_insert(0) += 1;
            for (net, _) in nets.iter().flatten() {
                *self.probation_by_network.entry(*net).or_insert(0) += 1;
            }
        }
        // Uncounted in `close`.
        *self.per_address.entry(key).or_insert(0) += 1;
        for (net, _) in nets.iter().flatten() {
            *self.per_network.entry(*net).or_insert(0) += 1;
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn {
                addr_key: key,
                role: Role::New,
                probation,
                registers: None,
                idle_until: None,
            },
        );
        Ok(id)
    }

    /// Ends `conn`'s probation (it authenticated or resumed, or it is gone).
    fn end_probation(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !std::mem::take(&mut c.probation) {
            return;
        }
        let key = c.addr_key;
        uncount(&mut self.probation_by_addr, &key);
        for (net, _) in network_keys(key).iter().flatten() {
            uncount(&mut self.probation_by_network, net);
        }
    }

    /// Sets a connection's role, keeping the console count. An agent left with neither slot nor
    /// session goes through [`Registry::set_idle_agent`] instead; any other role ends the idle
    /// deadline.
    fn set_role(&mut self, conn: ConnId, role: Role) {
        debug_assert!(!is_idle_agent(&role), "use set_idle_agent");
        if let Some(c) = self.conns.get_mut(&conn) {
            let was = matches!(c.role, Role::Console { .. });
            let is = matches!(role, Role::Console { .. });
            c.role = role;
            match (was, is) {
                (false, true) => self.consoles += 1,
                (true, false) => self.consoles -= 1,
                _ => {}
            }
            if let Some(until) = c.idle_until.take() {
                self.idle_agents.remove(&(until, conn));
            }
        }
    }

    /// Leaves `conn` an agent with neither slot nor session: unless it registers again (or goes)
    /// within [`AGENT_IDLE_GRACE`], [`Registry::tick`] reports it for closing. An agent already idle
    /// keeps its first deadline.
    fn set_idle_agent(&mut self, conn: ConnId, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if matches!(c.role, Role::Console { .. }) {
            self.consoles -= 1;
        }
        c.role = Role::Agent {
            slot: None,
            session: None,
        };
        if c.idle_until.is_none() {
            let until = now + AGENT_IDLE_GRACE;
            c.idle_until = Some(until);
            self.idle_agents.insert((until, conn));
        }
    }

    /// Forgets a connection. If it was in a session, the session waits for it to resume (grace
    /// period), or ends if there is no grace or the other side is gone too.
    pub fn close(&mut self, conn: ConnId, now: Instant) -> Closed {
        self.end_probation(conn);
        let Some(c) = self.conns.remove(&conn) else {
            return Closed::Nothing;
        };
        if matches!(c.role, Role::Console { .. }) {
            self.consoles -= 1;
        }
        if let Some(until) = c.idle_until {
            self.idle_agents.remove(&(until, conn));
        }
        uncount(&mut self.per_address, &c.addr_key);
        for (net, _) in network_keys(c.addr_key).iter().flatten() {
            uncount(&mut self.per_network, net);
        }
        let (sid, side) = match c.role {
            Role::Agent {
                session: Some(s), ..
            } => (s, Side::Agent),
            Role::Console {
                session: Some(s), ..
            } => (s, Side::Console),
            Role::Agent {
                slot: Some(slot), ..
            } => {
                self.bury(slot, Tomb::AgentGone, now, Some(c.addr_key));
                return Closed::Nothing;
            }
            _ => return Closed::Nothing,
        };
        let tomb = match side {
            Side::Agent => Tomb::AgentGone,
            Side::Console => Tomb::Ended,
        };
        let grace = self.limits.resume_grace;
        let Some(session) = self.sessions.get_mut(&sid) else {
            return Closed::Nothing;
        };
        if session.suspended.is_some() || grace.is_zero() {
            // Both sides gone, or no grace: the session is over.
            return match self.end_session(sid, conn, EndReason::PeerDisconnected, tomb, now) {
                Some(e) => Closed::Ended(e),
                None => Closed::Nothing,
            };
        }
        session.suspended = Some((side, now + grace));
        let notify = match side {
            Side::Agent => session.console,
            Side::Console => session.agent,
        };
        Closed::Suspended {
            session: sid,
            notify,
            grace,
        }
    }

    /// A fresh connection re-attaches to the session `token` was issued for.
    pub fn resume(
        &mut self,
        conn: ConnId,
        token: &ResumeToken,
        now: Instant,
    ) -> Result<Resumed, Refusal> {
        let role = self
            .conns
            .get(&conn)
            .map(|c| c.role.clone())
            .ok_or(Refusal::Fatal(ErrorCode::Internal))?;
        if role != Role::New {
            return Err(Refusal::Fatal(ErrorCode::AlreadyAuthenticated));
        }
        let Some(&(sid, side)) = self.tokens.get(token) else {
            return Err(Refusal::Refused(ErrorCode::SessionGone));
        };
        let Some(session) = self.sessions.get_mut(&sid) else {
            return Err(Refusal::Refused(ErrorCode::SessionGone));
        };
        if let Some((_, until)) = session.suspended
            && until <= now
        {
            return Err(Refusal::Refused(ErrorCode::SessionGone));
        }
        let old = session.conn_of(side);
        let replaced = match session.suspended {
            Some((s, _)) if s == side => None,
            // The relay still holds a connection for this side (it has not noticed its loss yet):
            // the new one takes over.
            _ => Some(old),
        };
        if session.suspended.map(|(s, _)| s) == Some(side) {
            session.suspended = None;
        }
        match side {
            Side::Agent => session.agent = conn,
            Side::Console => session.console = conn,
        }
        let other_side = match side {
            Side::Agent => Side::Console,
            Side::Console => Side::Agent,
        };
        let other_attached = session.suspended.map(|(s, _)| s) != Some(other_side);
        let notify = other_attached.then(|| session.conn_of(other_side));
        let session = session.clone();
        let new_role = match side {
            Side::Agent => Role::Agent {
                slot: Some(session.slot.clone()),
                session: Some(sid),
            },
            Side::Console => Role::Console {
                technician: session.technician.clone(),
                session: Some(sid),
            },
        };
        self.end_probation(conn);
        self.set_role(conn, new_role);
        if let Some(r) = replaced {
            // Detached: closing it later must not touch the session.
            self.set_role(r, Role::New);
        }
        Ok(Resumed {
            session,
            side,
            replaced,
            notify,
        })
    }

    /// Agent asks for a slot. A waiting agent asking again gets a fresh slot; the old one is buried.
    pub fn register(
        &mut self,
        conn: ConnId,
        now: Instant,
        rng: &mut dyn SlotRng,
    ) -> Result<Slot, Refusal> {
        self.register_inner(conn, now, rng, None)
    }

    /// The code `conn` was just given turned out to be held by another node of the cluster (the
    /// slot directory said so): it stays out of this node's allocation until it would have
    /// expired, and `conn` gets another slot, with the same expiry, without counting as a
    /// registration. `None` when `conn` no longer waits on `slot` (it registered again or left).
    ///
    /// The new slot is at least `min_digits` long: a cluster whose shortest codes are taken on
    /// other nodes (each node sizes codes by its own use) moves to longer ones.
    pub fn reallocate(
        &mut self,
        conn: ConnId,
        slot: &Slot,
        min_digits: usize,
        rng: &mut dyn SlotRng,
    ) -> Result<Option<Slot>, Refusal> {
        match self.conns.get(&conn).map(|c| &c.role) {
            Some(Role::Agent {
                slot: Some(s),
                session: None,
            }) if s == slot && !self.slot_devices.contains_key(slot) => {}
            _ => return Ok(None),
        }
        let expires_at = match self.slots.get(slot) {
            Some(SlotState::Waiting { agent, expires_at }) if *agent == conn => *expires_at,
            _ => return Ok(None),
        };
        self.remove_slot(slot);
        self.insert_tomb(slot.clone(), Tomb::Ended, expires_at, None);
        let fresh = self
            .allocate_slot(rng, min_digits.clamp(SLOT_MIN_DIGITS, SLOT_MAX_DIGITS))
            .ok_or(Refusal::Limit(LimitHit::Connections))?;
        self.insert_slot(
            fresh.clone(),
            SlotState::Waiting {
                agent: conn,
                expires_at,
            },
        );
        self.set_role(
            conn,
            Role::Agent {
                slot: Some(fresh.clone()),
                session: None,
            },
        );
        Ok(Some(fresh))
    }

    /// An enrolled agent comes online as `device` (its id, checked by the caller). It takes a
    /// register from the same budgets as a code. Returns its (internal) slot, and the connection
    /// that was online as the same device before, if any (to be closed: the newer one wins, as a
    /// computer whose network dropped comes back before the relay notices the old connection died).
    pub fn announce(
        &mut self,
        conn: ConnId,
        device: &str,
        now: Instant,
        rng: &mut dyn SlotRng,
    ) -> Result<(Slot, Option<ConnId>), Refusal> {
        let slot = self.register_inner(conn, now, rng, Some(device))?;
        let previous = self
            .device_slots
            .insert(device.to_string(), slot.clone())
            .and_then(|old| match self.slots.get(&old) {
                Some(SlotState::Waiting { agent, .. }) if *agent != conn => Some(*agent),
                _ => None,
            });
        self.slot_devices.insert(slot.clone(), device.to_string());
        Ok((slot, previous))
    }

    /// Whether `device` is online, and whether it is in a session.
    pub fn device_state(&self, device: &str) -> Option<bool> {
        let slot = self.device_slots.get(device)?;
        Some(matches!(
            self.slots.get(slot),
            Some(SlotState::Paired { .. })
        ))
    }

    /// The connection online as `device`.
    pub fn device_conn(&self, device: &str) -> Option<ConnId> {
        let slot = self.device_slots.get(device)?;
        match self.slots.get(slot)? {
            SlotState::Waiting { agent, .. } => Some(*agent),
            // In a session: the agent's side of it (found by its slot; sessions are few).
            SlotState::Paired { .. } => self
                .sessions
                .values()
                .find(|s| &s.slot == slot)
                .map(|s| s.agent),
        }
    }

    /// Online devices.
    pub fn device_count(&self) -> usize {
        self.device_slots.len()
    }

    fn register_inner(
        &mut self,
        conn: ConnId,
        now: Instant,
        rng: &mut dyn SlotRng,
        device: Option<&str>,
    ) -> Result<Slot, Refusal> {
        let (role, probation, addr_key) = self
            .conns
            .get(&conn)
            .map(|c| (c.role.clone(), c.probation, c.addr_key))
            .ok_or(Refusal::Fatal(ErrorCode::Internal))?;
        match role {
            Role::New if probation => return Err(Refusal::Limit(LimitHit::AgentShare)),
            Role::New => {}
            Role::Agent {
                session: None,
                slot,
            } => {
                // The old code dies whatever happens next (a re-register may be a burn).
                if let Some(old) = slot {
                    self.bury(old, Tomb::Ended, now, Some(addr_key));
                    self.set_idle_agent(conn, now);
                }
            }
            Role::Agent {
                session: Some(_), ..
            } => return Err(Refusal::Fatal(ErrorCode::UnexpectedMessage)),
            Role::Console { .. } => return Err(Refusal::Fatal(ErrorCode::AlreadyAuthenticated)),
        }
        // Both budgets must allow it; take from both only then.
        let (pc, pa) = (
            self.limits.registers_per_minute_per_connection,
            self.limits.registers_per_minute_per_address,
        );
        let cb_ok = self
            .conns
            .get_mut(&conn)
            .map(|c| {
                c.registers
                    .get_or_insert_with(|| Bucket::full(pc, now))
                    .would_allow(pc, now)
            })
            .unwrap_or(false);
        if !cb_ok {
            return Err(Refusal::Limit(LimitHit::RegistersPerConnection));
        }
        let ab = self
            .register_by_addr
            .entry(addr_key)
            .or_insert_with(|| Bucket::full(pa, now));
        if !ab.try_take(pa, now) {
            return Err(Refusal::Limit(LimitHit::RegistersPerAddress));
        }
        if let Some(b) = self.conns.get_mut(&conn).and_then(|c| c.registers.as_mut()) {
            b.try_take(pc, now);
        }
        // Devices take the longest slots: they are never typed, and must not lengthen codes.
        let (digits, ttl) = match device {
            Some(_) => (SLOT_MAX_DIGITS, DEVICE_SLOT_TTL),
            None => (SLOT_MIN_DIGITS, self.limits.slot_ttl),
        };
        let slot = self
            .allocate_slot(rng, digits)
            .ok_or(Refusal::Limit(LimitHit::Connections))?;
        self.insert_slot(
            slot.clone(),
            SlotState::Waiting {
                agent: conn,
                expires_at: now + ttl,
            },
        );
        self.set_role(
            conn,
            Role::Agent {
                slot: Some(slot.clone()),
                session: None,
            },
        );
        Ok(slot)
    }

    fn slot_in_use(&self, s: &Slot) -> bool {
        self.slots.contains_key(s) || self.tombs.contains_key(s)
    }

    fn count_used(&mut self, s: &Slot, delta: i64) {
        if let Some(n) = self.used_by_len.get_mut(s.as_str().len()) {
            *n = n.saturating_add_signed(delta);
        }
    }

    /// Inserts or updates a live slot, counting it as used.
    fn insert_slot(&mut self, slot: Slot, state: SlotState) {
        if !self.slot_in_use(&slot) {
            self.count_used(&slot, 1);
        }
        self.slots.insert(slot, state);
    }

    fn remove_slot(&mut self, slot: &Slot) -> Option<SlotState> {
        let st = self.slots.remove(slot)?;
        if let Some(device) = self.slot_devices.remove(slot)
            && self.device_slots.get(&device) == Some(slot)
        {
            self.device_slots.remove(&device);
        }
        if !self.tombs.contains_key(slot) {
            self.count_used(slot, -1);
        }
        Some(st)
    }

    /// Quarantines `slot` (which was `owner`'s) until `until`; beyond the owner's cap its own tomb
    /// whose quarantine ends first goes, beyond the global cap anyone's.
    fn insert_tomb(&mut self, slot: Slot, tomb: Tomb, until: Instant, owner: Option<IpAddr>) {
        if !self.slot_in_use(&slot) {
            self.count_used(&slot, 1);
        }
        self.unlink_tomb(&slot);
        self.tombs.insert(slot.clone(), (tomb, until));
        self.tomb_order.insert((until, slot.clone()));
        if let Some(owner) = owner {
            self.tomb_owner.insert(slot.clone(), owner);
            let mine = self.owner_tombs.entry(owner).or_default();
            mine.insert((until, slot));
            let over = mine.len() > MAX_TOMBS_PER_ADDRESS;
            if over && let Some((_, first)) = mine.first().cloned() {
                self.remove_tomb(&first);
            }
        }
        while self.tombs.len() > self.limits.max_quarantined_slots {
            let Some((_, first)) = self.tomb_order.pop_first() else {
                break;
            };
            self.remove_tomb(&first);
        }
    }

    /// Takes `slot`'s tomb out of every index, counts untouched; whether there was one.
    fn unlink_tomb(&mut self, slot: &Slot) -> bool {
        let Some((_, until)) = self.tombs.remove(slot) else {
            return false;
        };
        self.tomb_order.remove(&(until, slot.clone()));
        if let Some(owner) = self.tomb_owner.remove(slot)
            && let Some(mine) = self.owner_tombs.get_mut(&owner)
        {
            mine.remove(&(until, slot.clone()));
            if mine.is_empty() {
                self.owner_tombs.remove(&owner);
            }
        }
        true
    }

    fn remove_tomb(&mut self, slot: &Slot) {
        if self.unlink_tomb(slot) && !self.slots.contains_key(slot) {
            self.count_used(slot, -1);
        }
    }

    /// A free slot: the shortest length whose space is less than half used, then random draws of
    /// that length. No scan: the use per length is counted as slots come and go.
    fn allocate_slot(&self, rng: &mut dyn SlotRng, shortest: usize) -> Option<Slot> {
        for digits in shortest..=SLOT_MAX_DIGITS {
            let space = 10u64.pow(digits as u32);
            let used = self.used_by_len.get(digits).copied().unwrap_or(u64::MAX);
            if used.saturating_mul(2) >= space {
                continue;
            }
            // Less than half used: a random pick is free with probability > 1/2 each time.
            for _ in 0..SLOT_DRAWS {
                let n = rng.below(space);
                let Ok(slot) = Slot::new(format!("{n:0digits$}")) else {
                    continue;
                };
                if !self.slot_in_use(&slot) {
                    return Some(slot);
                }
            }
        }
        None
    }

    /// Checks and counts an authentication attempt from `conn`'s address.
    pub fn auth_attempt(&mut self, conn: ConnId, now: Instant) -> Result<(), Refusal> {
        let c = self
            .conns
            .get(&conn)
            .ok_or(Refusal::Fatal(ErrorCode::Internal))?;
        if c.role != Role::New {
            return Err(Refusal::Fatal(ErrorCode::AlreadyAuthenticated));
        }
        let per_min = self.limits.auths_per_minute_per_address;
        let b = self
            .auth_by_addr
            .entry(c.addr_key)
            .or_insert_with(|| Bucket::full(per_min, now));
        if b.try_take(per_min, now) {
            Ok(())
        } else {
            Err(Refusal::Limit(LimitHit::AuthsPerAddress))
        }
    }

    /// Gives back an authentication attempt the relay did not serve (its verification queue was
    /// full), so that a technician told "busy, retry" does not use up the address's budget.
    pub fn auth_refund(&mut self, conn: ConnId) {
        let per_min = self.limits.auths_per_minute_per_address as f64;
        if let Some(c) = self.conns.get(&conn)
            && let Some(b) = self.auth_by_addr.get_mut(&c.addr_key)
        {
            b.tokens = (b.tokens + 1.0).min(per_min);
        }
    }

    /// Records a successful authentication.
    pub fn authenticated(&mut self, conn: ConnId, technician: Technician) -> Result<(), Refusal> {
        let c = self
            .conns
            .get_mut(&conn)
            .ok_or(Refusal::Fatal(ErrorCode::Internal))?;
        if c.role != Role::New {
            return Err(Refusal::Fatal(ErrorCode::AlreadyAuthenticated));
        }
        self.end_probation(conn);
        self.set_role(
            conn,
            Role::Console {
                technician,
                session: None,
            },
        );
        Ok(())
    }

    /// Console asks to pair with the agent on `slot`.
    pub fn join(
        &mut self,
        conn: ConnId,
        slot: &Slot,
        now: Instant,
        tokens: (ResumeToken, ResumeToken),
    ) -> Result<Paired, Refusal> {
        self.pair(conn, slot, now, tokens, false)
    }

    /// Console asks to pair with the online device `device` (the caller checked that the console
    /// proved a certificate of the device's organisation). Counted like a join.
    pub fn connect_device(
        &mut self,
        conn: ConnId,
        device: &str,
        now: Instant,
        tokens: (ResumeToken, ResumeToken),
    ) -> Result<Paired, Refusal> {
        // A made-up slot: an offline device is refused after the join budgets are charged.
        let slot = match self.device_slots.get(device) {
            Some(s) => s.clone(),
            None => Slot::new("000").map_err(|_| Refusal::Fatal(ErrorCode::Internal))?,
        };
        self.pair(conn, &slot, now, tokens, true)
    }

    fn pair(
        &mut self,
        conn: ConnId,
        slot: &Slot,
        now: Instant,
        tokens: (ResumeToken, ResumeToken),
        device: bool,
    ) -> Result<Paired, Refusal> {
        let c = self
            .conns
            .get(&conn)
            .ok_or(Refusal::Fatal(ErrorCode::Internal))?;
        let (technician, addr_key) = match &c.role {
            Role::Console {
                technician,
                session: None,
            } => (technician.clone(), c.addr_key),
            Role::Console {
                session: Some(_), ..
            } => return Err(Refusal::Fatal(ErrorCode::UnexpectedMessage)),
            Role::New => return Err(Refusal::Fatal(ErrorCode::NotAuthenticated)),
            Role::Agent { .. } => return Err(Refusal::Fatal(ErrorCode::NotAuthenticated)),
        };
        // Both buckets must have a token; take from both only if both allow, so that one limit
        // does not silently drain the other.
        let (pt, pa) = (
            self.limits.joins_per_minute_per_technician,
            self.limits.joins_per_minute_per_address,
        );
        let tb = self
            .join_by_tech
            .entry(technician.id)
            .or_insert_with(|| Bucket::full(pt, now));
        if !tb.would_allow(pt, now) {
            return Err(Refusal::Limit(LimitHit::JoinsPerTechnician));
        }
        let ab = self
            .join_by_addr
            .entry(addr_key)
            .or_insert_with(|| Bucket::full(pa, now));
        if !ab.would_allow(pa, now) {
            return Err(Refusal::Limit(LimitHit::JoinsPerAddress));
        }
        ab.try_take(pa, now);
        if let Some(tb) = self.join_by_tech.get_mut(&technician.id) {
            tb.try_take(pt, now);
        }

        if device != self.slot_devices.contains_key(slot) {
            // A device is not reachable by a code, nor a code by a device id.
            return Err(Refusal::Refused(if device {
                ErrorCode::DeviceOffline
            } else {
                ErrorCode::UnknownSlot
            }));
        }
        let (agent, expires_at) = match self.slots.get(slot) {
            Some(SlotState::Waiting { agent, expires_at }) if *expires_at > now => {
                (*agent, *expires_at)
            }
            Some(SlotState::Waiting { .. }) => {
                return Err(Refusal::Refused(ErrorCode::ExpiredSlot));
            }
            Some(SlotState::Paired { .. }) => return Err(Refusal::Refused(ErrorCode::SlotBusy)),
            None => {
                return Err(Refusal::Refused(
                    self.tombs
                        .get(slot)
                        .map(|(t, _)| t.code())
                        .unwrap_or(ErrorCode::UnknownSlot),
                ));
            }
        };
        if self.sessions.len() >= self.limits.max_sessions {
            return Err(Refusal::Limit(LimitHit::Sessions));
        }
        let id = self.next_session;
        self.next_session += 1;
        let session = Session {
            id,
            agent,
            console: conn,
            slot: slot.clone(),
            device: self.slot_devices.get(slot).cloned(),
            technician,
            agent_token: tokens.0,
            console_token: tokens.1,
            suspended: None,
        };
        self.tokens.insert(tokens.0, (id, Side::Agent));
        self.tokens.insert(tokens.1, (id, Side::Console));
        self.insert_slot(slot.clone(), SlotState::Paired { expires_at });
        self.sessions.insert(id, session.clone());
        if let Some(Conn {
            role: Role::Agent { session: s, .. },
            ..
        }) = self.conns.get_mut(&agent)
        {
            *s = Some(id);
        }
        if let Some(Conn {
            role: Role::Console { session: s, .. },
            ..
        }) = self.conns.get_mut(&conn)
        {
            *s = Some(id);
        }
        Ok(Paired { session })
    }

    /// A side ends its session (or an agent gives up its waiting slot). `WrongCode` from the agent burns
    /// the slot. Returns the ended session, if there was one.
    pub fn end(&mut self, conn: ConnId, reason: EndReason, now: Instant) -> Option<Ended> {
        let role = self.conns.get(&conn)?.role.clone();
        match role {
            Role::Agent {
                session: Some(s), ..
            }
            | Role::Console {
                session: Some(s), ..
            } => {
                let tomb = if reason == EndReason::WrongCode {
                    Tomb::Burned
                } else {
                    Tomb::Ended
                };
                self.end_session(s, conn, reason, tomb, now)
            }
            Role::Agent {
                slot: Some(slot),
                session: None,
            } => {
                let tomb = if reason == EndReason::WrongCode {
                    Tomb::Burned
                } else {
                    Tomb::AgentGone
                };
                let owner = self.conns.get(&conn).map(|c| c.addr_key);
                self.bury(slot, tomb, now, owner);
                self.set_idle_agent(conn, now);
                None
            }
            _ => None,
        }
    }

    fn end_session(
        &mut self,
        id: SessionId,
        by: ConnId,
        reason: EndReason,
        tomb: Tomb,
        now: Instant,
    ) -> Option<Ended> {
        let session = self.sessions.remove(&id)?;
        self.tokens.remove(&session.agent_token);
        self.tokens.remove(&session.console_token);
        let owner = self.conns.get(&session.agent).map(|c| c.addr_key);
        self.bury(session.slot.clone(), tomb, now, owner);
        if let Some(Conn {
            role: Role::Agent { session: s, .. },
            ..
        }) = self.conns.get(&session.agent)
            && *s == Some(id)
        {
            self.set_idle_agent(session.agent, now);
        }
        if let Some(Conn {
            role: Role::Console { session: s, .. },
            ..
        }) = self.conns.get_mut(&session.console)
            && *s == Some(id)
        {
            *s = None;
        }
        let other = if by == session.agent {
            session.console
        } else {
            session.agent
        };
        let notify = self.conns.contains_key(&other).then_some(other);
        Some(Ended {
            session,
            reason,
            notify,
        })
    }

    /// Ends a session from the relay's side (shutdown, rate abuse): both sides are to be told.
    pub fn end_by_relay(
        &mut self,
        id: SessionId,
        reason: EndReason,
        now: Instant,
    ) -> Option<Session> {
        let s = self.sessions.get(&id)?.clone();
        // `by` = 0 is never a connection id, so neither side is treated as the cause.
        self.end_session(id, 0, reason, Tomb::Ended, now)?;
        Some(s)
    }

    fn bury(&mut self, slot: Slot, tomb: Tomb, now: Instant, owner: Option<IpAddr>) {
        if self.slot_devices.contains_key(&slot) {
            // A device's slot is no code: nobody can mistype or guess their way into it, so it
            // needs no quarantine.
            self.remove_slot(&slot);
            return;
        }
        let expires_at = match self.remove_slot(&slot) {
            Some(SlotState::Waiting { expires_at, .. } | SlotState::Paired { expires_at, .. }) => {
                expires_at
            }
            None => now,
        };
        let until = expires_at.max(now + MIN_QUARANTINE);
        self.insert_tomb(slot, tomb, until, owner);
    }

    /// Periodic housekeeping: expires waiting slots (returns the agents to tell), ends sessions whose
    /// grace ran out, reports agents idle past [`AGENT_IDLE_GRACE`] (to close), lifts quarantines,
    /// and forgets full rate buckets.
    pub fn tick(&mut self, now: Instant) -> Tick {
        let lapsed: Vec<(SessionId, ConnId, Side)> = self
            .sessions
            .values()
            .filter_map(|s| match s.suspended {
                Some((side, until)) if until <= now => Some((s.id, s.conn_of(side), side)),
                _ => None,
            })
            .collect();
        let mut ended = Vec::with_capacity(lapsed.len());
        for (id, gone, side) in lapsed {
            let tomb = match side {
                Side::Agent => Tomb::AgentGone,
                Side::Console => Tomb::Ended,
            };
            if let Some(e) = self.end_session(id, gone, EndReason::PeerDisconnected, tomb, now) {
                ended.push(e);
            }
        }
        let due: Vec<(Slot, ConnId)> = self
            .slots
            .iter()
            .filter_map(|(s, st)| match st {
                SlotState::Waiting { agent, expires_at } if *expires_at <= now => {
                    Some((s.clone(), *agent))
                }
                _ => None,
            })
            .collect();
        let mut out = Vec::with_capacity(due.len());
        for (slot, agent) in due {
            self.remove_slot(&slot);
            let owner = self.conns.get(&agent).map(|c| c.addr_key);
            self.insert_tomb(slot.clone(), Tomb::Expired, now + MIN_QUARANTINE, owner);
            self.set_idle_agent(agent, now);
            out.push(Expired { agent, slot });
        }
        // Agents idle past their grace, reported once; they stay counted until closed.
        let mut idle_agents = Vec::new();
        while let Some(&(until, conn)) = self.idle_agents.first()
            && until <= now
        {
            self.idle_agents.pop_first();
            idle_agents.push(conn);
        }
        let out = Tick {
            expired: out,
            ended,
            idle_agents,
        };
        while let Some((until, slot)) = self.tomb_order.first().cloned()
            && until <= now
        {
            self.remove_tomb(&slot);
        }
        let l = &self.limits;
        let (pt, pa, pu, pr) = (
            l.joins_per_minute_per_technician,
            l.joins_per_minute_per_address,
            l.auths_per_minute_per_address,
            l.registers_per_minute_per_address,
        );
        self.join_by_tech.retain(|_, b| {
            b.refill_per_minute(pt, now);
            b.tokens < pt as f64
        });
        self.join_by_addr.retain(|_, b| {
            b.refill_per_minute(pa, now);
            b.tokens < pa as f64
        });
        self.auth_by_addr.retain(|_, b| {
            b.refill_per_minute(pu, now);
            b.tokens < pu as f64
        });
        self.register_by_addr.retain(|_, b| {
            b.refill_per_minute(pr, now);
            b.tokens < pr as f64
        });
        out
    }

    /// All live sessions (for shutdown).
    pub fn session_ids(&self) -> Vec<SessionId> {
        self.sessions.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// Deterministic "random": a counter mixed with a multiplier.
    struct SeqRng(u64);
    impl SlotRng for SeqRng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 11) % n
        }
    }

    /// Joins with fresh, distinct resume tokens.
    fn join(r: &mut Registry, c: ConnId, s: &Slot, now: Instant) -> Result<Paired, Refusal> {
        use std::sync::atomic::{AtomicU8, Ordering};
        static N: AtomicU8 = AtomicU8::new(0);
        let n = N.fetch_add(2, Ordering::Relaxed);
        r.join(
            c,
            s,
            now,
            (ResumeToken([n; 16]), ResumeToken([n.wrapping_add(1); 16])),
        )
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }
    fn tech(id: i64) -> Technician {
        Technician {
            id,
            name: format!("tech{id}"),
            organisation: "ACME".into(),
        }
    }

    struct Fixture {
        r: Registry,
        rng: SeqRng,
        t0: Instant,
    }
    impl Fixture {
        fn new(limits: Limits) -> Self {
            Fixture {
                r: Registry::new(limits),
                rng: SeqRng(7),
                t0: Instant::now(),
            }
        }
        fn agent(&mut self, n: u8) -> (ConnId, Slot) {
            let c = self.r.open(ip(n)).unwrap();
            let s = self.r.register(c, self.t0, &mut self.rng).unwrap();
            (c, s)
        }
        fn console(&mut self, n: u8, t: i64) -> ConnId {
            let c = self.r.open(ip(n)).unwrap();
            self.r.auth_attempt(c, self.t0).unwrap();
            self.r.authenticated(c, tech(t)).unwrap();
            c
        }
    }

    #[test]
    fn devices_are_reached_by_id_only_and_the_newest_connection_wins() {
        let mut f = Fixture::new(Limits::default());
        let a = f.r.open(ip(1)).unwrap();
        let (slot, replaced) = f.r.announce(a, "dev1", f.t0, &mut f.rng).unwrap();
        assert_eq!((slot.as_str().len(), replaced), (SLOT_MAX_DIGITS, None));
        // An attended code still gets the shortest slot.
        let (_, code) = f.agent(2);
        assert_eq!(code.as_str().len(), SLOT_MIN_DIGITS);
        assert_eq!(f.r.device_state("dev1"), Some(false));
        assert_eq!(f.r.device_conn("dev1"), Some(a));
        let c = f.console(3, 1);
        // Not by its slot as a code, and an unknown device is offline.
        assert_eq!(
            join(&mut f.r, c, &slot, f.t0),
            Err(Refusal::Refused(ErrorCode::UnknownSlot))
        );
        let toks = (ResumeToken([90; 16]), ResumeToken([91; 16]));
        assert_eq!(
            f.r.connect_device(c, "nope", f.t0, toks),
            Err(Refusal::Refused(ErrorCode::DeviceOffline))
        );
        // A code is not reachable as a device.
        let p = f.r.connect_device(c, "dev1", f.t0, toks).unwrap();
        assert_eq!(p.session.device.as_deref(), Some("dev1"));
        assert_eq!(f.r.device_state("dev1"), Some(true));
        // In a session, the device is still known to be on its connection.
        assert_eq!(f.r.device_conn("dev1"), Some(a));
        let c2 = f.console(4, 2);
        assert_eq!(
            f.r.connect_device(
                c2,
                "dev1",
                f.t0,
                (ResumeToken([92; 16]), ResumeToken([93; 16]))
            ),
            Err(Refusal::Refused(ErrorCode::SlotBusy))
        );
        // The session ends: the device slot is gone without quarantine.
        f.r.end(c, EndReason::EndedByTechnician, f.t0).unwrap();
        assert_eq!(f.r.device_state("dev1"), None);
        assert_eq!(f.r.quarantined_count(), 0);
        // Online again, then again on another connection: the first is to be closed, and its
        // close does not take the device offline.
        let (_, replaced) = f.r.announce(a, "dev1", f.t0, &mut f.rng).unwrap();
        assert_eq!(replaced, None);
        let b = f.r.open(ip(5)).unwrap();
        let (_, replaced) = f.r.announce(b, "dev1", f.t0, &mut f.rng).unwrap();
        assert_eq!(replaced, Some(a));
        f.r.close(a, f.t0);
        assert_eq!(f.r.device_conn("dev1"), Some(b));
        f.r.close(b, f.t0);
        assert_eq!(f.r.device_state("dev1"), None);
        assert_eq!(f.r.device_count(), 0);
    }

    #[test]
    fn a_code_another_node_holds_is_replaced_without_counting_a_registration() {
        let limits = Limits {
            registers_per_minute_per_connection: 1,
            ..Limits::default()
        };
        let mut f = Fixture::new(limits);
        let (a, taken) = f.agent(1);
        let fresh = f.r.reallocate(a, &taken, 3, &mut f.rng).unwrap().unwrap();
        assert_ne!(fresh, taken);
        assert_eq!(fresh.as_str().len(), SLOT_MIN_DIGITS);
        // The taken code is not this node's: a join to it is refused here (the relay then asks
        // the directory), and it is never handed out again here before it expires.
        let c = f.console(2, 1);
        assert_eq!(
            join(&mut f.r, c, &taken, f.t0),
            Err(Refusal::Refused(ErrorCode::ExpiredSlot))
        );
        assert_eq!(join(&mut f.r, c, &fresh, f.t0).unwrap().session.agent, a);
        // Only a waiting agent's current code is replaced; anything else is left alone.
        assert_eq!(f.r.reallocate(a, &fresh, 3, &mut f.rng), Ok(None));
        let (b, other) = f.agent(3);
        assert_eq!(f.r.reallocate(b, &taken, 3, &mut f.rng), Ok(None));
        // One registration per minute was allowed, and the replacement did not use it up; asked
        // for longer codes, it gets one.
        let longer = f.r.reallocate(b, &other, 5, &mut f.rng).unwrap().unwrap();
        assert_eq!(longer.as_str().len(), 5);
        assert_eq!(
            f.r.register(b, f.t0, &mut f.rng),
            Err(Refusal::Limit(LimitHit::RegistersPerConnection))
        );
    }

    #[test]
    fn register_join_pair_and_end() {
        let mut f = Fixture::new(Limits::default());
        let (a, slot) = f.agent(1);
        assert_eq!(slot.as_str().len(), 3);
        let c = f.console(2, 1);
        let p = join(&mut f.r, c, &slot, f.t0).unwrap();
        assert_eq!(p.session.agent, a);
        assert_eq!(p.session.console, c);
        assert_eq!(f.r.session_count(), 1);
        // A second console gets "busy".
        let c2 = f.console(3, 2);
        assert_eq!(
            join(&mut f.r, c2, &slot, f.t0),
            Err(Refusal::Refused(ErrorCode::SlotBusy))
        );
        let e = f.r.end(c, EndReason::EndedByTechnician, f.t0).unwrap();
        assert_eq!(e.notify, Some(a));
        assert_eq!(f.r.session_count(), 0);
        // The slot is not reusable; a late join hears it has ended.
        assert_eq!(
            join(&mut f.r, c2, &slot, f.t0),
            Err(Refusal::Refused(ErrorCode::ExpiredSlot))
        );
        // Both sides are idle again: the agent may register anew, the console may join again.
        assert!(f.r.register(a, f.t0, &mut f.rng).is_ok());
    }

    #[test]
    fn join_requires_authentication() {
        let mut f = Fixture::new(Limits::default());
        let (_, slot) = f.agent(1);
        let c = f.r.open(ip(2)).unwrap();
        assert_eq!(
            join(&mut f.r, c, &slot, f.t0),
            Err(Refusal::Fatal(ErrorCode::NotAuthenticated))
        );
        let (a2, _) = f.agent(3);
        assert_eq!(
            join(&mut f.r, a2, &slot, f.t0),
            Err(Refusal::Fatal(ErrorCode::NotAuthenticated))
        );
    }

    #[test]
    fn out_of_order_messages_are_fatal() {
        let mut f = Fixture::new(Limits::default());
        let c = f.console(1, 1);
        assert_eq!(
            f.r.register(c, f.t0, &mut f.rng),
            Err(Refusal::Fatal(ErrorCode::AlreadyAuthenticated))
        );
        assert_eq!(
            f.r.auth_attempt(c, f.t0),
            Err(Refusal::Fatal(ErrorCode::AlreadyAuthenticated))
        );
        let (a, _) = f.agent(2);
        assert_eq!(
            f.r.authenticated(a, tech(3)),
            Err(Refusal::Fatal(ErrorCode::AlreadyAuthenticated))
        );
    }

    #[test]
    fn unknown_expired_gone_and_burned_slots_have_distinct_errors() {
        let mut f = Fixture::new(Limits::default());
        let c = f.console(9, 1);
        let unknown = Slot::new("999999999").unwrap();
        assert_eq!(
            join(&mut f.r, c, &unknown, f.t0),
            Err(Refusal::Refused(ErrorCode::UnknownSlot))
        );

        let (_, expiring) = f.agent(1);
        let later = f.t0 + Duration::from_secs(601);
        let expired = f.r.tick(later).expired;
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].slot, expiring);
        // Joins at `later` would be rate limited by now-earlier attempts; use a fresh console.
        let c2 = f.console(10, 2);
        assert_eq!(
            join(&mut f.r, c2, &expiring, later),
            Err(Refusal::Refused(ErrorCode::ExpiredSlot))
        );

        let (a, gone) = f.agent(2);
        f.r.close(a, later);
        let c3 = f.console(11, 3);
        assert_eq!(
            join(&mut f.r, c3, &gone, later),
            Err(Refusal::Refused(ErrorCode::AgentGone))
        );

        let a = f.r.open(ip(3)).unwrap();
        let burned = f.r.register(a, later, &mut f.rng).unwrap();
        let c4 = f.console(12, 4);
        join(&mut f.r, c4, &burned, later).unwrap();
        let e = f.r.end(a, EndReason::WrongCode, later).unwrap();
        assert_eq!(e.notify, Some(c4));
        let c5 = f.console(13, 5);
        assert_eq!(
            join(&mut f.r, c5, &burned, later),
            Err(Refusal::Refused(ErrorCode::CodeBurned))
        );
    }

    #[test]
    fn expiry_is_checked_at_join_time_even_before_tick() {
        let mut f = Fixture::new(Limits::default());
        let (_, slot) = f.agent(1);
        let c = f.console(2, 1);
        assert_eq!(
            join(&mut f.r, c, &slot, f.t0 + Duration::from_secs(600)),
            Err(Refusal::Refused(ErrorCode::ExpiredSlot))
        );
    }

    #[test]
    fn join_rate_limits_per_technician_and_per_address() {
        let mut f = Fixture::new(Limits::default());
        let bad = Slot::new("000").unwrap();
        // One technician from five addresses: the sixth attempt in a minute is refused.
        let consoles: Vec<_> = (0..6).map(|i| f.console(20 + i, 1)).collect();
        for c in &consoles[..5] {
            assert_eq!(
                join(&mut f.r, *c, &bad, f.t0).unwrap_err().code(),
                ErrorCode::UnknownSlot
            );
        }
        assert_eq!(
            join(&mut f.r, consoles[5], &bad, f.t0),
            Err(Refusal::Limit(LimitHit::JoinsPerTechnician))
        );
        // Tokens come back at 5 a minute: one after 12 s.
        assert_eq!(
            join(&mut f.r, consoles[5], &bad, f.t0 + Duration::from_secs(12))
                .unwrap_err()
                .code(),
            ErrorCode::UnknownSlot
        );
        // Five technicians from one address: the address limit.
        let mut f = Fixture::new(Limits::default());
        let consoles: Vec<_> = (0..6).map(|i| f.console(1, 100 + i)).collect();
        for c in &consoles[..5] {
            assert!(join(&mut f.r, *c, &bad, f.t0).is_err());
        }
        assert_eq!(
            join(&mut f.r, consoles[5], &bad, f.t0),
            Err(Refusal::Limit(LimitHit::JoinsPerAddress))
        );
    }

    #[test]
    fn auth_attempts_limited_per_address() {
        let mut f = Fixture::new(Limits {
            auths_per_minute_per_address: 3,
            ..Limits::default()
        });
        let c = f.r.open(ip(1)).unwrap();
        for _ in 0..3 {
            f.r.auth_attempt(c, f.t0).unwrap();
        }
        assert_eq!(
            f.r.auth_attempt(c, f.t0),
            Err(Refusal::Limit(LimitHit::AuthsPerAddress))
        );
        // An attempt the relay was too busy to serve is given back.
        f.r.auth_refund(c);
        f.r.auth_attempt(c, f.t0).unwrap();
        assert!(f.r.auth_attempt(c, f.t0).is_err());
        // Another address is unaffected.
        let c2 = f.r.open(ip(2)).unwrap();
        f.r.auth_attempt(c2, f.t0).unwrap();
    }

    #[test]
    fn connection_limits() {
        let mut f = Fixture::new(Limits {
            max_connections: 3,
            max_connections_per_address: 2,
            ..Limits::default()
        });
        let a = f.r.open(ip(1)).unwrap();
        f.r.open(ip(1)).unwrap();
        assert_eq!(f.r.open(ip(1)), Err(LimitHit::ConnectionsPerAddress));
        f.r.open(ip(2)).unwrap();
        assert_eq!(f.r.open(ip(3)), Err(LimitHit::Connections));
        f.r.close(a, f.t0);
        f.r.open(ip(1)).unwrap();
    }

    #[test]
    fn ipv6_grouped_by_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        // Another /64 of the same /56: one subscriber, one key.
        let c: IpAddr = "2001:db8:1:ff::1".parse().unwrap();
        let d: IpAddr = "2001:db8:1:100::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_eq!(address_key(a), address_key(c));
        assert_ne!(address_key(a), address_key(d));
        // So 256 /64s of one /56 share the per-address connection limit.
        let mut r = Registry::new(Limits {
            max_connections_per_address: 2,
            ..Limits::default()
        });
        r.open(a).unwrap();
        r.open(c).unwrap();
        assert_eq!(r.open(b), Err(LimitHit::ConnectionsPerAddress));
        r.open(d).unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(address_key(mapped), ip(1));
    }

    #[test]
    fn session_limit() {
        let mut f = Fixture::new(Limits {
            max_sessions: 1,
            ..Limits::default()
        });
        let (_, s1) = f.agent(1);
        let (_, s2) = f.agent(2);
        let c1 = f.console(3, 1);
        let c2 = f.console(4, 2);
        join(&mut f.r, c1, &s1, f.t0).unwrap();
        assert_eq!(
            join(&mut f.r, c2, &s2, f.t0),
            Err(Refusal::Limit(LimitHit::Sessions))
        );
    }

    #[test]
    fn disconnect_suspends_then_ends_after_grace() {
        let mut f = Fixture::new(Limits::default());
        let (a, slot) = f.agent(1);
        let c = f.console(2, 1);
        join(&mut f.r, c, &slot, f.t0).unwrap();
        match f.r.close(a, f.t0) {
            Closed::Suspended { notify, grace, .. } => {
                assert_eq!(notify, c);
                assert_eq!(grace, Duration::from_secs(15));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(f.r.session_count(), 1, "waits for the agent");
        assert!(f.r.tick(f.t0 + Duration::from_secs(14)).ended.is_empty());
        let t = f.r.tick(f.t0 + Duration::from_secs(15));
        assert_eq!(t.ended.len(), 1);
        assert_eq!(t.ended[0].notify, Some(c));
        assert_eq!(t.ended[0].reason, EndReason::PeerDisconnected);
        assert_eq!(
            f.r.role(c),
            Some(&Role::Console {
                technician: tech(1),
                session: None
            })
        );
        assert_eq!(f.r.close(c, f.t0), Closed::Nothing);
        assert_eq!(f.r.connection_count(), 0);
        // The slot is dead: a late join hears the agent is gone.
        let c2 = f.console(3, 2);
        assert_eq!(
            join(&mut f.r, c2, &slot, f.t0 + Duration::from_secs(16)),
            Err(Refusal::Refused(ErrorCode::AgentGone))
        );
    }

    #[test]
    fn no_grace_ends_at_once_and_both_gone_ends() {
        let mut f = Fixture::new(Limits {
            resume_grace: Duration::ZERO,
            ..Limits::default()
        });
        let (a, slot) = f.agent(1);
        let c = f.console(2, 1);
        join(&mut f.r, c, &slot, f.t0).unwrap();
        assert!(matches!(f.r.close(a, f.t0), Closed::Ended(_)));

        let mut f = Fixture::new(Limits::default());
        let (a, slot) = f.agent(1);
        let c = f.console(2, 1);
        join(&mut f.r, c, &slot, f.t0).unwrap();
        assert!(matches!(f.r.close(a, f.t0), Closed::Suspended { .. }));
        match f.r.close(c, f.t0) {
            Closed::Ended(e) => assert_eq!(e.notify, None),
            other => panic!("{other:?}"),
        }
        assert_eq!(f.r.session_count(), 0);
    }

    #[test]
    fn resume_reattaches_within_grace() {
        let mut f = Fixture::new(Limits::default());
        let (a, slot) = f.agent(1);
        let c = f.console(2, 1);
        let p = join(&mut f.r, c, &slot, f.t0).unwrap();
        let tok = p.session.agent_token;
        f.r.close(a, f.t0);
        let a2 = f.r.open(ip(1)).unwrap();
        let r = f.r.resume(a2, &tok, f.t0 + Duration::from_secs(5)).unwrap();
        assert_eq!(r.side, Side::Agent);
        assert_eq!(r.replaced, None);
        assert_eq!(r.notify, Some(c));
        assert_eq!(r.session.agent, a2);
        assert_eq!(r.session.suspended, None);
        assert!(f.r.tick(f.t0 + Duration::from_secs(60)).ended.is_empty());
        // The console's token on a live console connection: takes over, the old one is detached.
        let c2 = f.r.open(ip(2)).unwrap();
        let r = f.r.resume(c2, &p.session.console_token, f.t0).unwrap();
        assert_eq!(r.replaced, Some(c));
        assert_eq!(f.r.role(c), Some(&Role::New));
        assert_eq!(
            f.r.close(c, f.t0),
            Closed::Nothing,
            "detached connection ends nothing"
        );
        // Ending removes the tokens.
        f.r.end(c2, EndReason::EndedByTechnician, f.t0).unwrap();
        let a3 = f.r.open(ip(1)).unwrap();
        assert_eq!(
            f.r.resume(a3, &tok, f.t0),
            Err(Refusal::Refused(ErrorCode::SessionGone))
        );
    }

    #[test]
    fn resume_refused_after_grace_or_with_unknown_token() {
        let mut f = Fixture::new(Limits::default());
        let (a, slot) = f.agent(1);
        let c = f.console(2, 1);
        let p = join(&mut f.r, c, &slot, f.t0).unwrap();
        f.r.close(a, f.t0);
        let a2 = f.r.open(ip(1)).unwrap();
        assert_eq!(
            f.r.resume(a2, &p.session.agent_token, f.t0 + Duration::from_secs(15)),
            Err(Refusal::Refused(ErrorCode::SessionGone))
        );
        assert_eq!(
            f.r.resume(a2, &ResumeToken([0xEE; 16]), f.t0),
            Err(Refusal::Refused(ErrorCode::SessionGone))
        );
        // Only a fresh connection may resume.
        assert_eq!(
            f.r.resume(c, &p.session.console_token, f.t0),
            Err(Refusal::Fatal(ErrorCode::AlreadyAuthenticated))
        );
    }

    #[test]
    fn reregister_replaces_slot() {
        let mut f = Fixture::new(Limits::default());
        let (a, s1) = f.agent(1);
        let s2 = f.r.register(a, f.t0, &mut f.rng).unwrap();
        assert_ne!(s1, s2);
        assert_eq!(f.r.waiting_count(), 1);
        let c = f.console(2, 1);
        assert_eq!(
            join(&mut f.r, c, &s1, f.t0),
            Err(Refusal::Refused(ErrorCode::ExpiredSlot))
        );
        join(&mut f.r, c, &s2, f.t0).unwrap();
    }

    #[test]
    fn slots_unique_and_grow_when_space_fills() {
        let mut f = Fixture::new(Limits {
            max_connections: 100_000,
            max_connections_per_address: 100_000,
            registers_per_minute_per_address: 1_000_000,
            ..Limits::default()
        });
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2_000 {
            let (_, s) = f.agent(1);
            assert!(seen.insert(s.clone()), "slot {s} reused");
        }
        let short = seen.iter().filter(|s| s.as_str().len() == 3).count();
        assert_eq!(short, 500, "3-digit space used up to half");
        assert!(seen.iter().all(|s| s.as_str().len() <= 4));
    }

    #[test]
    fn quarantine_lifts_and_buckets_are_forgotten() {
        let mut f = Fixture::new(Limits::default());
        let (a, slot) = f.agent(1);
        f.r.close(a, f.t0);
        assert!(f.r.slot_in_use(&slot));
        f.r.tick(f.t0 + Duration::from_secs(601));
        assert!(!f.r.slot_in_use(&slot));
        let c = f.console(2, 1);
        let _ = join(&mut f.r, c, &slot, f.t0 + Duration::from_secs(601));
        assert_eq!(f.r.join_by_tech.len(), 1);
        f.r.tick(f.t0 + Duration::from_secs(700));
        assert!(f.r.join_by_tech.is_empty());
        assert!(f.r.join_by_addr.is_empty());
    }

    /// Slots in use, counted by brute force (what the per-length counters must agree with).
    fn used_by_len_brute(r: &Registry) -> [u64; SLOT_MAX_DIGITS + 1] {
        let mut n = [0u64; SLOT_MAX_DIGITS + 1];
        let all: std::collections::HashSet<&Slot> = r.slots.keys().chain(r.tombs.keys()).collect();
        for s in all {
            n[s.as_str().len()] += 1;
        }
        n
    }

    #[test]
    fn console_reserve_keeps_room_for_technicians() {
        let mut f = Fixture::new(Limits {
            max_connections: 14,
            max_connections_per_address: 100,
            console_reserve: 7,
            ..Limits::default()
        });
        // Agents (and unidentified connections) get 7 of the 12.
        for i in 0..6 {
            f.agent(i);
        }
        let idle = f.r.open(ip(50)).unwrap();
        assert_eq!(f.r.probation_count(), 0);
        // The share is full: the next ones are admitted on probation, and cannot register.
        let p = f.r.open(ip(60)).unwrap();
        assert_eq!(f.r.probation_count(), 1);
        assert_eq!(
            f.r.register(p, f.t0, &mut f.rng),
            Err(Refusal::Limit(LimitHit::AgentShare))
        );
        // A technician on probation authenticates and joins as usual.
        f.r.auth_attempt(p, f.t0).unwrap();
        f.r.authenticated(p, tech(1)).unwrap();
        assert_eq!(f.r.probation_count(), 0);
        // At most a few on probation per address.
        let mut held = vec![];
        for _ in 0..PROBATION_PER_ADDRESS {
            held.push(f.r.open(ip(70)).unwrap());
        }
        assert_eq!(f.r.open(ip(70)), Err(LimitHit::ReservePerAddress));
        assert_eq!(f.r.connection_count(), 12);
        held.push(f.r.open(ip(71)).unwrap());
        held.push(f.r.open(ip(72)).unwrap());
        assert_eq!(f.r.open(ip(73)), Err(LimitHit::Connections));
        // An unidentified connection leaving frees the share for an agent again.
        for c in held {
            f.r.close(c, f.t0);
        }
        f.r.close(idle, f.t0);
        let a = f.r.open(ip(80)).unwrap();
        f.r.register(a, f.t0, &mut f.rng).unwrap();
        // Consoles do not count against the agents' share.
        let c = f.console(81, 2);
        f.r.close(c, f.t0);
        assert_eq!(f.r.consoles, 1);
    }

    #[test]
    fn register_budget_per_connection_and_per_address() {
        let mut f = Fixture::new(Limits {
            registers_per_minute_per_connection: 3,
            registers_per_minute_per_address: 4,
            ..Limits::default()
        });
        let (a, _) = f.agent(1);
        f.r.register(a, f.t0, &mut f.rng).unwrap();
        let last = f.r.register(a, f.t0, &mut f.rng).unwrap();
        assert_eq!(
            f.r.register(a, f.t0, &mut f.rng),
            Err(Refusal::Limit(LimitHit::RegistersPerConnection))
        );
        assert_eq!(
            Refusal::Limit(LimitHit::RegistersPerConnection).code(),
            ErrorCode::RegisterRateLimited
        );
        // The refused re-register still ended the old code (it may have been a burn).
        assert_eq!(
            f.r.role(a),
            Some(&Role::Agent {
                slot: None,
                session: None
            })
        );
        assert!(f.r.slot_in_use(&last) && !f.r.slots.contains_key(&last));
        // 3 a minute: one back after 20 s.
        f.r.register(a, f.t0 + Duration::from_secs(20), &mut f.rng)
            .unwrap();
        // The address's budget: 4 a minute over all its connections (4 used above, 1⅓ back).
        let b = f.r.open(ip(1)).unwrap();
        f.r.register(b, f.t0 + Duration::from_secs(20), &mut f.rng)
            .unwrap();
        let c = f.r.open(ip(1)).unwrap();
        assert_eq!(
            f.r.register(c, f.t0 + Duration::from_secs(20), &mut f.rng),
            Err(Refusal::Limit(LimitHit::RegistersPerAddress))
        );
        // Another address is unaffected; full buckets are forgotten.
        f.agent(2);
        f.r.tick(f.t0 + Duration::from_secs(200));
        assert!(f.r.register_by_addr.is_empty());
    }

    #[test]
    fn quarantine_is_capped_and_counts_stay_exact() {
        let mut f = Fixture::new(Limits {
            registers_per_minute_per_connection: 1_000_000,
            registers_per_minute_per_address: 1_000_000,
            max_quarantined_slots: 50,
            ..Limits::default()
        });
        let (a, first) = f.agent(1);
        let mut t = f.t0;
        for i in 0..2_000u64 {
            t += Duration::from_millis(10);
            f.r.register(a, t, &mut f.rng).unwrap();
            if i % 97 == 0 {
                // Some agents come and go too.
                let (b, _) = f.agent(2);
                f.r.close(b, t);
            }
            assert!(f.r.quarantined_count() <= 50);
        }
        // The oldest were released first: the very first code is free again.
        assert!(!f.r.slot_in_use(&first));
        assert_eq!(f.r.used_by_len, used_by_len_brute(&f.r));
        assert_eq!(f.r.tomb_order.len(), f.r.tombs.len());
        // Still only 3-digit slots: the flood did not push codes to more digits.
        assert_eq!(f.r.used_by_len[3], 51);
        // The waiting slot expires into quarantine, then every quarantine lifts.
        f.r.tick(t + Duration::from_secs(3_600));
        f.r.tick(t + Duration::from_secs(7_200));
        assert_eq!(f.r.quarantined_count(), 0);
        assert!(f.r.tomb_order.is_empty());
        assert_eq!(f.r.used_by_len, used_by_len_brute(&f.r));
    }

    #[test]
    fn slot_allocation_does_not_scan() {
        // 40,000 waiting agents: with a scan of every slot per registration this is ~10^9 steps
        // (tens of seconds); counted per length it is a few draws each.
        let mut f = Fixture::new(Limits {
            max_connections: 100_000,
            max_connections_per_address: 100_000,
            registers_per_minute_per_address: 1_000_000,
            ..Limits::default()
        });
        let start = std::time::Instant::now();
        for _ in 0..40_000 {
            f.agent(1);
        }
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "40,000 registrations took {took:?}"
        );
        assert_eq!(f.r.used_by_len, used_by_len_brute(&f.r));
        assert_eq!(f.r.waiting_count(), 40_000);
    }

    #[test]
    fn end_by_relay_notifies_both() {
        let mut f = Fixture::new(Limits::default());
        let (a, slot) = f.agent(1);
        let c = f.console(2, 1);
        let p = join(&mut f.r, c, &slot, f.t0).unwrap();
        let s =
            f.r.end_by_relay(p.session.id, EndReason::RelayShutdown, f.t0)
                .unwrap();
        assert_eq!((s.agent, s.console), (a, c));
        assert_eq!(f.r.session_count(), 0);
    }

    fn v6(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Every count the registry keeps, recomputed by brute force from the connections.
    fn assert_counts_exact(r: &Registry) {
        let mut per_address: HashMap<IpAddr, usize> = HashMap::new();
        let mut per_network: HashMap<NetworkKey, usize> = HashMap::new();
        let mut prob_addr: HashMap<IpAddr, usize> = HashMap::new();
        let mut prob_net: HashMap<NetworkKey, usize> = HashMap::new();
        let mut consoles = 0;
        let mut unreported = BTreeSet::new();
        for (id, c) in &r.conns {
            *per_address.entry(c.addr_key).or_default() += 1;
            for (net, _) in network_keys(c.addr_key).into_iter().flatten() {
                *per_network.entry(net).or_default() += 1;
                if c.probation {
                    *prob_net.entry(net).or_default() += 1;
                }
            }
            if c.probation {
                *prob_addr.entry(c.addr_key).or_default() += 1;
            }
            if matches!(c.role, Role::Console { .. }) {
                consoles += 1;
            }
            assert_eq!(
                c.idle_until.is_some(),
                is_idle_agent(&c.role),
                "conn {id}: idle deadline iff idle agent ({:?})",
                c.role
            );
            if let Some(t) = c.idle_until
                && r.idle_agents.contains(&(t, *id))
            {
                unreported.insert((t, *id));
            }
        }
        assert_eq!(r.per_address, per_address);
        assert_eq!(r.per_network, per_network);
        assert_eq!(r.probation_by_addr, prob_addr);
        assert_eq!(r.probation_by_network, prob_net);
        assert_eq!(r.consoles, consoles);
        assert_eq!(r.idle_agents, unreported, "idle set holds only idle agents");
        assert_eq!(r.used_by_len, used_by_len_brute(r));
        assert_tombs_indexed(r);
    }

    /// Every tomb is in the order index; owned ones in their owner's, within its cap.
    fn assert_tombs_indexed(r: &Registry) {
        assert_eq!(r.tomb_order.len(), r.tombs.len());
        let owned: usize = r.owner_tombs.values().map(|m| m.len()).sum();
        assert_eq!(owned, r.tomb_owner.len());
        for (owner, mine) in &r.owner_tombs {
            assert!(!mine.is_empty() && mine.len() <= MAX_TOMBS_PER_ADDRESS);
            for (until, slot) in mine {
                assert_eq!(r.tomb_owner.get(slot), Some(owner));
                assert_eq!(r.tombs.get(slot).map(|t| t.1), Some(*until));
            }
        }
    }

    /// A register flood from one address evicts its own quarantined codes, not an office's burned
    /// one (which would then answer a late join "unknown" instead of "burned", and could be handed
    /// to another agent within seconds).
    #[test]
    fn a_register_flood_evicts_its_own_quarantines_first() {
        let mut f = Fixture::new(Limits {
            registers_per_minute_per_connection: 1_000_000,
            registers_per_minute_per_address: 1_000_000,
            max_quarantined_slots: 150,
            ..Limits::default()
        });
        let (office, burned) = f.agent(1);
        f.r.end(office, EndReason::WrongCode, f.t0);
        let (flood, _) = f.agent(2);
        let mut t = f.t0;
        for _ in 0..2_000 {
            t += Duration::from_millis(10);
            f.r.register(flood, t, &mut f.rng).unwrap();
            assert_tombs_indexed(&f.r);
        }
        assert!(
            f.r.slot_in_use(&burned),
            "the office's burned code was evicted"
        );
        assert!(f.r.quarantined_count() <= MAX_TOMBS_PER_ADDRESS + 1);
        assert_eq!(f.r.used_by_len, used_by_len_brute(&f.r));
        // Lifting quarantines empties every index.
        f.r.tick(t + Duration::from_secs(7_200));
        assert!(f.r.tombs.is_empty() || f.r.quarantined_count() <= 1);
        assert_tombs_indexed(&f.r);
    }

    #[test]
    fn network_keys_group_by_prefix() {
        let k = |s: &str| {
            network_keys(address_key(v6(s)))
                .into_iter()
                .flatten()
                .map(|(n, f)| (n.prefix, n.len, f))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            k("2001:db8:1:2:aaaa::1"),
            vec![
                (v6("2001:db8:1::"), 48, SMALL_NETWORK_FACTOR),
                (v6("2001:db8::"), 32, LARGE_NETWORK_FACTOR)
            ]
        );
        assert_eq!(
            k("10.1.2.3"),
            vec![(v6("10.1.2.0"), 24, SMALL_NETWORK_FACTOR)]
        );
        // An IPv4-mapped address is grouped as IPv4.
        assert_eq!(k("::ffff:10.1.2.3"), k("10.1.2.3"));
    }

    #[test]
    fn network_caps_stack_on_address_caps() {
        // Defaults: 64 per address, so 256 per /48 and per IPv4 /24, 1,024 per /32.
        let mut r = Registry::new(Limits::default());
        let per = r.limits().max_connections_per_address;
        let mut held = vec![];
        // Four /56s of one /48 get their full allowance...
        for sub in 0..SMALL_NETWORK_FACTOR {
            for _ in 0..per {
                held.push(r.open(v6(&format!("2001:db8:1:{:x}00::1", sub))).unwrap());
            }
        }
        // ...a fifth /56 of the same /48 does not.
        assert_eq!(
            r.open(v6("2001:db8:1:ff00::1")),
            Err(LimitHit::ConnectionsPerNetwork)
        );
        // Other /48s of the same /32, up to the /32's cap.
        for net in 2..(LARGE_NETWORK_FACTOR / SMALL_NETWORK_FACTOR + 1) {
            for sub in 0..SMALL_NETWORK_FACTOR {
                for _ in 0..per {
                    r.open(v6(&format!("2001:db8:{net:x}:{sub:x}00::1")))
                        .unwrap();
                }
            }
        }
        assert_eq!(r.connection_count(), LARGE_NETWORK_FACTOR * per);
        assert_eq!(
            r.open(v6("2001:db8:ffff:100::1")),
            Err(LimitHit::ConnectionsPerNetwork)
        );
        // Another /32 is unaffected; a connection leaving frees room in its networks.
        r.open(v6("2001:db9::1")).unwrap();
        r.close(held[0], Instant::now());
        r.open(v6("2001:db8:ffff:100::1")).unwrap();
        // IPv4: four addresses of a /24, then the /24 is full; another /24 is not.
        for host in 1..=SMALL_NETWORK_FACTOR as u8 {
            for _ in 0..per {
                r.open(IpAddr::V4(Ipv4Addr::new(192, 0, 2, host))).unwrap();
            }
        }
        assert_eq!(
            r.open(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 200))),
            Err(LimitHit::ConnectionsPerNetwork)
        );
        assert_eq!(
            LimitHit::ConnectionsPerNetwork.code(),
            ErrorCode::TooManyConnectionsFromAddress
        );
        r.open(IpAddr::V4(Ipv4Addr::new(192, 0, 3, 1))).unwrap();
        assert_counts_exact(&r);
    }

    #[test]
    fn probation_is_capped_per_network() {
        let mut f = Fixture::new(Limits {
            max_connections: 2_000,
            max_connections_per_address: 1_000,
            console_reserve: 1_000,
            ..Limits::default()
        });
        // Fill the agents' share from one address.
        for _ in 0..1_000 {
            f.r.open(ip(1)).unwrap();
        }
        // On probation: 4 per /56, 16 per /48...
        for sub in 0..SMALL_NETWORK_FACTOR {
            for _ in 0..PROBATION_PER_ADDRESS {
                f.r.open(v6(&format!("2001:db8:1:{sub:x}00::1"))).unwrap();
            }
        }
        assert_eq!(
            f.r.open(v6("2001:db8:1:ff00::1")),
            Err(LimitHit::ReservePerNetwork)
        );
        // ...64 per /32...
        for net in 2..(LARGE_NETWORK_FACTOR / SMALL_NETWORK_FACTOR + 1) {
            for sub in 0..SMALL_NETWORK_FACTOR {
                for _ in 0..PROBATION_PER_ADDRESS {
                    f.r.open(v6(&format!("2001:db8:{net:x}:{sub:x}00::1")))
                        .unwrap();
                }
            }
        }
        assert_eq!(
            f.r.probation_count(),
            LARGE_NETWORK_FACTOR * PROBATION_PER_ADDRESS
        );
        assert_eq!(
            f.r.open(v6("2001:db8:ffff::1")),
            Err(LimitHit::ReservePerNetwork)
        );
        // ...and 16 per IPv4 /24.
        for host in 1..=SMALL_NETWORK_FACTOR as u8 {
            for _ in 0..PROBATION_PER_ADDRESS {
                f.r.open(IpAddr::V4(Ipv4Addr::new(192, 0, 2, host)))
                    .unwrap();
            }
        }
        assert_eq!(
            f.r.open(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 200))),
            Err(LimitHit::ReservePerNetwork)
        );
        // A technician from elsewhere still gets in and authenticates.
        let c = f.console(2, 1);
        assert_eq!(
            f.r.role(c).map(|r| matches!(r, Role::Console { .. })),
            Some(true)
        );
        assert_counts_exact(&f.r);
    }

    #[test]
    fn a_free_48_cannot_lock_out_agents_or_technicians() {
        // Finding 4: every connection one /48 can open (256 /56s), with the default limits.
        let mut f = Fixture::new(Limits::default());
        let mut admitted = 0;
        for sub in 0..256u32 {
            for _ in 0..64 {
                if f.r
                    .open(v6(&format!("2001:db8:1:{:x}::1", sub << 8)))
                    .is_ok()
                {
                    admitted += 1;
                }
            }
        }
        assert_eq!(admitted, SMALL_NETWORK_FACTOR * 64);
        assert_eq!(f.r.probation_count(), 0);
        // An agent elsewhere still registers; a technician still authenticates.
        f.agent(1);
        f.console(2, 1);
        assert_counts_exact(&f.r);
    }

    #[test]
    fn agents_without_slot_or_session_are_closed_after_grace() {
        let mut f = Fixture::new(Limits::default());
        let t0 = f.t0;
        let expiry = t0 + Duration::from_secs(600);
        // a: its slot expires and it never registers again.
        let (a, _) = f.agent(1);
        // b: its slot expires and it registers again at once.
        let (b, _) = f.agent(2);
        // c: its session ends (the technician ended it); d: its console.
        let (c, slot) = f.agent(3);
        let d = f.console(4, 1);
        join(&mut f.r, d, &slot, t0).unwrap();
        // e: gives up its code.
        let (e, _) = f.agent(5);
        f.r.end(e, EndReason::EndedByUser, t0);
        assert_counts_exact(&f.r);

        let t = f.r.tick(t0 + AGENT_IDLE_GRACE - Duration::from_millis(1));
        assert!(t.idle_agents.is_empty());
        let t = f.r.tick(t0 + AGENT_IDLE_GRACE);
        assert_eq!(t.idle_agents, vec![e]);

        let expired = f.r.tick(expiry).expired;
        assert_eq!(expired.len(), 2, "a and b (c's slot is paired)");
        f.r.register(b, expiry + Duration::from_secs(1), &mut f.rng)
            .unwrap();
        f.r.end(
            d,
            EndReason::EndedByTechnician,
            expiry + Duration::from_secs(2),
        )
        .unwrap();
        assert_counts_exact(&f.r);
        assert!(
            f.r.tick(expiry + Duration::from_secs(29))
                .idle_agents
                .is_empty()
        );
        assert_eq!(f.r.tick(expiry + AGENT_IDLE_GRACE).idle_agents, vec![a]);
        assert_eq!(
            f.r.tick(expiry + Duration::from_secs(32)).idle_agents,
            vec![c]
        );
        // Reported once; they stay counted until the relay closes them.
        assert!(
            f.r.tick(expiry + Duration::from_secs(40))
                .idle_agents
                .is_empty()
        );
        assert_eq!(f.r.connection_count(), 5);
        assert_counts_exact(&f.r);
        for id in [a, c, e] {
            assert_eq!(
                f.r.close(id, expiry + Duration::from_secs(41)),
                Closed::Nothing
            );
        }
        assert_counts_exact(&f.r);
        // b holds a slot, d is a console: neither is ever reported.
        assert!(
            f.r.tick(expiry + Duration::from_secs(500))
                .idle_agents
                .is_empty()
        );
        assert_eq!(f.r.connection_count(), 2);
    }

    #[test]
    fn agent_left_after_lapsed_session_is_closed_after_grace() {
        let mut f = Fixture::new(Limits::default());
        let (a, slot) = f.agent(1);
        let c = f.console(2, 1);
        join(&mut f.r, c, &slot, f.t0).unwrap();
        // The console goes; its grace lapses; the agent is left alone.
        assert!(matches!(f.r.close(c, f.t0), Closed::Suspended { .. }));
        let lapse = f.t0 + f.r.limits().resume_grace;
        assert_eq!(f.r.tick(lapse).ended.len(), 1);
        assert_counts_exact(&f.r);
        assert!(
            f.r.tick(lapse + Duration::from_secs(29))
                .idle_agents
                .is_empty()
        );
        assert_eq!(f.r.tick(lapse + AGENT_IDLE_GRACE).idle_agents, vec![a]);
    }

    #[test]
    fn refused_registers_do_not_extend_the_idle_grace() {
        let mut f = Fixture::new(Limits {
            registers_per_minute_per_connection: 2,
            ..Limits::default()
        });
        let t0 = f.t0;
        let (b, _) = f.agent(1);
        f.r.register(b, t0, &mut f.rng).unwrap();
        // The third code in a minute is refused, and the second is buried: b is idle from t0.
        assert_eq!(
            f.r.register(b, t0, &mut f.rng),
            Err(Refusal::Limit(LimitHit::RegistersPerConnection))
        );
        assert_eq!(
            f.r.register(b, t0 + Duration::from_secs(20), &mut f.rng),
            Err(Refusal::Limit(LimitHit::RegistersPerConnection))
        );
        assert_counts_exact(&f.r);
        assert_eq!(f.r.tick(t0 + AGENT_IDLE_GRACE).idle_agents, vec![b]);
        // A successful register (before the relay closed it) ends the idle state.
        f.r.register(b, t0 + AGENT_IDLE_GRACE, &mut f.rng).unwrap();
        assert_counts_exact(&f.r);
        assert!(f.r.idle_agents.is_empty());
    }

    #[test]
    fn connection_counts_stay_exact() {
        // Churn through every path that opens, closes or moves a connection between classes
        // (probation, agent, idle agent, console, session, suspension, resume, expiry), from IPv4
        // and IPv6 addresses of a few networks, checking every count against a recount.
        let mut f = Fixture::new(Limits {
            max_connections: 48,
            max_connections_per_address: 6,
            console_reserve: 20,
            registers_per_minute_per_connection: 1_000,
            registers_per_minute_per_address: 1_000,
            joins_per_minute_per_technician: 1_000,
            joins_per_minute_per_address: 1_000,
            auths_per_minute_per_address: 1_000,
            slot_ttl: Duration::from_secs(20),
            ..Limits::default()
        });
        // Five addresses of one IPv4 /24 (one IPv4-mapped) and five /56s of one IPv6 /48, so that
        // the network caps are hit too, and a few others.
        let addrs: Vec<IpAddr> = vec![
            ip(1),
            ip(2),
            ip(3),
            ip(4),
            v6("::ffff:10.0.0.5"),
            IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1)),
            v6("2001:db8:1::1"),
            v6("2001:db8:1:100::1"),
            v6("2001:db8:1:200::1"),
            v6("2001:db8:1:300::1"),
            v6("2001:db8:1:400::1"),
            v6("2001:db8:2::1"),
            v6("2001:db9::1"),
        ];
        let mut rng = SeqRng(99);
        let mut live: Vec<ConnId> = vec![];
        let mut slots: Vec<Slot> = vec![];
        let mut tokens: Vec<ResumeToken> = vec![];
        let mut now = f.t0;
        // How often the rarer paths were taken.
        let (mut probation, mut resumed, mut idle) = (0, 0, 0);
        let mut refused: HashMap<LimitHit, usize> = HashMap::new();
        for step in 0..20_000u32 {
            now += Duration::from_millis(250);
            let pick = |rng: &mut SeqRng, n: usize| rng.below(n as u64) as usize;
            match rng.below(10) {
                0 | 1 => {
                    let a = addrs[pick(&mut rng, addrs.len())];
                    match f.r.open(a) {
                        Ok(id) => {
                            live.push(id);
                            probation += usize::from(f.r.conns[&id].probation);
                        }
                        Err(l) => *refused.entry(l).or_default() += 1,
                    }
                }
                2 if !live.is_empty() => {
                    let id = live.swap_remove(pick(&mut rng, live.len()));
                    f.r.close(id, now);
                }
                3 if !live.is_empty() => {
                    let id = live[pick(&mut rng, live.len())];
                    if let Ok(s) = f.r.register(id, now, &mut f.rng) {
                        slots.push(s);
                    }
                }
                4 if !live.is_empty() => {
                    let id = live[pick(&mut rng, live.len())];
                    if f.r.auth_attempt(id, now).is_ok() {
                        let _ = f.r.authenticated(id, tech(i64::from(step % 7)));
                    }
                }
                5 if !live.is_empty() && !slots.is_empty() => {
                    let id = live[pick(&mut rng, live.len())];
                    // Mostly a recent code (likely still waiting), sometimes any.
                    let back = pick(&mut rng, slots.len().min(4));
                    let s = slots[slots.len() - 1 - back].clone();
                    if let Ok(p) = join(&mut f.r, id, &s, now) {
                        tokens.push(p.session.agent_token);
                        tokens.push(p.session.console_token);
                    }
                }
                6 if !live.is_empty() => {
                    let id = live[pick(&mut rng, live.len())];
                    let reason = if rng.below(4) == 0 {
                        EndReason::WrongCode
                    } else {
                        EndReason::EndedByUser
                    };
                    f.r.end(id, reason, now);
                }
                7 if !live.is_empty() && !tokens.is_empty() => {
                    let id = live[pick(&mut rng, live.len())];
                    let tok = tokens[tokens.len() - 1 - pick(&mut rng, tokens.len().min(4))];
                    if let Ok(r) = f.r.resume(id, &tok, now) {
                        resumed += 1;
                        if let Some(old) = r.replaced {
                            live.retain(|&c| c != old);
                            f.r.close(old, now);
                        }
                    }
                }
                8 => {
                    let t = f.r.tick(now);
                    // The relay closes what tick reports.
                    for id in t.idle_agents {
                        idle += 1;
                        assert!(is_idle_agent(f.r.role(id).unwrap()));
                        live.retain(|&c| c != id);
                        f.r.close(id, now);
                    }
                }
                _ => {
                    if let Some(id) = f.r.session_ids().first().copied() {
                        f.r.end_by_relay(id, EndReason::RelayShutdown, now);
                    }
                }
            }
            assert_counts_exact(&f.r);
        }
        // Every kind of path was taken on the way.
        assert!(f.r.next_conn > 1_000 && f.r.next_session > 50);
        assert!(probation > 20 && resumed > 20 && idle > 20);
        assert!(refused.get(&LimitHit::ConnectionsPerNetwork) > Some(&0));
        assert!(refused.get(&LimitHit::ReservePerAddress) > Some(&0));
        for id in live {
            f.r.close(id, now);
        }
        assert_counts_exact(&f.r);
        assert!(f.r.per_address.is_empty() && f.r.per_network.is_empty());
        assert!(f.r.probation_by_addr.is_empty() && f.r.probation_by_network.is_empty());
        assert!(f.r.idle_agents.is_empty());
        assert_eq!(f.r.consoles, 0);
    }
}
