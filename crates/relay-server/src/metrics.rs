//! Prometheus metrics of the relay (text exposition format).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Limit {
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Flow {
    /// `agent_to_console` or `console_to_agent`
    pub direction: String,
    /// `datagram` or `stream`
    pub path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    /// `quic`, `tcp` (TLS over TCP) or `websocket`
    pub transport: String,
}

impl TransportLabel {
    pub fn of(t: tandem_net::Transport) -> Self {
        TransportLabel {
            transport: t.label().into(),
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub connections_accepted: Family<TransportLabel, Counter>,
    pub tcp_links: Family<TransportLabel, Gauge>,
    pub tcp_links_refused: Family<Limit, Counter>,
    pub tcp_handshake_failures: Family<Reason, Counter>,
    pub connections_refused: Family<Limit, Counter>,
    pub agents_waiting: Gauge,
    pub sessions: Gauge,
    pub sessions_started: Counter,
    pub sessions_direct: Counter,
    pub direct_bytes: Counter,
    pub sessions_ended: Family<Reason, Counter>,
    pub forwarded_bytes: Family<Flow, Counter>,
    pub forwarded_datagrams: Family<Flow, Counter>,
    pub dropped_datagrams: Family<Reason, Counter>,
    pub auth_failures: Family<Reason, Counter>,
    pub joins_refused: Family<Reason, Counter>,
    pub limits_hit: Family<Limit, Counter>,
    pub protocol_errors: Family<Reason, Counter>,
    pub handshake_timeouts: Counter,
    pub retries_sent: Counter,
    pub log_lines_suppressed: Counter,
    pub auth_hashes: Counter,
    pub auth_queue: Gauge,
    pub connections_on_probation: Gauge,
    pub slots_quarantined: Gauge,
    pub devices_online: Gauge,
    pub devices_known: Gauge,
    pub store_up: Gauge,
    pub store_errors: Counter,
    pub audit_pending: Gauge,
    pub audit_dropped: Counter,
    pub directory_events: Family<Reason, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("tandem_relay"),
            connections: Gauge::default(),
            connections_accepted: Family::default(),
            tcp_links: Family::default(),
            tcp_links_refused: Family::default(),
            tcp_handshake_failures: Family::default(),
            connections_refused: Family::default(),
            agents_waiting: Gauge::default(),
            sessions: Gauge::default(),
            sessions_started: Counter::default(),
            sessions_direct: Counter::default(),
            direct_bytes: Counter::default(),
            sessions_ended: Family::default(),
            forwarded_bytes: Family::default(),
            forwarded_datagrams: Family::default(),
            dropped_datagrams: Family::default(),
            auth_failures: Family::default(),
            joins_refused: Family::default(),
            limits_hit: Family::default(),
            protocol_errors: Family::default(),
            handshake_timeouts: Counter::default(),
            retries_sent: Counter::default(),
            log_lines_suppressed: Counter::default(),
            auth_hashes: Counter::default(),
            auth_queue: Gauge::default(),
            connections_on_probation: Gauge::default(),
            slots_quarantined: Gauge::default(),
            devices_online: Gauge::default(),
            devices_known: Gauge::default(),
            store_up: Gauge::default(),
            store_errors: Counter::default(),
            audit_pending: Gauge::default(),
            audit_dropped: Counter::default(),
            directory_events: Family::default(),
        };
        let r = &mut m.registry;
        r.register(
            "connections",
            "Open QUIC connections",
            m.connections.clone(),
        );
        r.register(
            "connections_accepted",
            "QUIC connections admitted, by transport (quic: UDP; tcp, websocket: over a TCP link)",
            m.connections_accepted.clone(),
        );
        r.register(
            "tcp_links",
            "Open TCP links (TLS over TCP, WebSocket) carrying QUIC packets",
            m.tcp_links.clone(),
        );
        r.register(
            "tcp_links_refused",
            "TCP connections refused by a limit before TLS",
            m.tcp_links_refused.clone(),
        );
        r.register(
            "tcp_handshake_failures",
            "TCP connections closed during TLS, preamble or WebSocket upgrade, by stage",
            m.tcp_handshake_failures.clone(),
        );
        r.register(
            "connections_refused",
            "Connections refused by a limit",
            m.connections_refused.clone(),
        );
        r.register(
            "agents_waiting",
            "Agents waiting on a slot",
            m.agents_waiting.clone(),
        );
        r.register("sessions", "Paired sessions", m.sessions.clone());
        r.register(
            "sessions_started",
            "Sessions paired",
            m.sessions_started.clone(),
        );
        r.register(
            "sessions_direct",
            "Sessions whose sides reported a direct path (their packets stopped crossing the relay)",
            m.sessions_direct.clone(),
        );
        r.register(
            "direct_bytes",
            "Bytes sessions' sides reported sending on direct paths instead of through the relay",
            m.direct_bytes.clone(),
        );
        r.register(
            "sessions_ended",
            "Sessions ended, by reason",
            m.sessions_ended.clone(),
        );
        r.register(
            "forwarded_bytes",
            "Payload bytes forwarded",
            m.forwarded_bytes.clone(),
        );
        r.register(
            "forwarded_datagrams",
            "Payload datagrams forwarded",
            m.forwarded_datagrams.clone(),
        );
        r.register(
            "dropped_datagrams",
            "Datagrams not forwarded, by reason",
            m.dropped_datagrams.clone(),
        );
        r.register(
            "auth_failures",
            "Failed technician authentications, by reason",
            m.auth_failures.clone(),
        );
        r.register(
            "joins_refused",
            "Refused joins, by reason",
            m.joins_refused.clone(),
        );
        r.register(
            "limits_hit",
            "Requests refused by a limit",
            m.limits_hit.clone(),
        );
        r.register(
            "protocol_errors",
            "Connections closed for bad control messages, by kind",
            m.protocol_errors.clone(),
        );
        r.register(
            "handshake_timeouts",
            "Connections dropped for not registering or authenticating in time",
            m.handshake_timeouts.clone(),
        );
        r.register(
            "retries_sent",
            "QUIC Retry packets sent to validate a source address (unvalidated attempts count nowhere else)",
            m.retries_sent.clone(),
        );
        r.register(
            "log_lines_suppressed",
            "Log lines a stranger could cause, held back by the log rate limit",
            m.log_lines_suppressed.clone(),
        );
        r.register(
            "auth_hashes",
            "Token secrets checked with Argon2id (unknown token ids are refused without)",
            m.auth_hashes.clone(),
        );
        r.register(
            "auth_queue",
            "Logins waiting for an Argon2id verification thread",
            m.auth_queue.clone(),
        );
        r.register(
            "connections_on_probation",
            "Connections admitted into the console reserve while agents fill their share",
            m.connections_on_probation.clone(),
        );
        r.register(
            "slots_quarantined",
            "Ended slots held back from reuse",
            m.slots_quarantined.clone(),
        );
        r.register(
            "devices_online",
            "Enrolled devices online (reachable without a code), in a session or not",
            m.devices_online.clone(),
        );
        r.register(
            "devices_known",
            "Enrolled devices the relay has seen (online or not)",
            m.devices_known.clone(),
        );
        r.register(
            "store_up",
            "1 while the store (SQLite or PostgreSQL) answered its last check, 0 while it does not",
            m.store_up.clone(),
        );
        r.register(
            "store_errors",
            "Store calls that failed because the database could not be reached",
            m.store_errors.clone(),
        );
        r.register(
            "audit_pending",
            "Audit and device records waiting to be written (they wait while the store is unreachable)",
            m.audit_pending.clone(),
        );
        r.register(
            "audit_dropped",
            "Audit and device records given up on (the waiting queue was full, or shutdown came while the store was unreachable)",
            m.audit_dropped.clone(),
        );
        r.register(
            "directory_events",
            "Cluster slot directory: redirect (a console sent to the node holding its code), conflict (a fresh code another node held, replaced), unavailable (the directory did not answer)",
            m.directory_events.clone(),
        );
        m
    }

    /// The counter for one flow (kept by forwarders, so the hot path does no label lookup).
    pub fn flow_bytes(&self, direction: &str, path: &str) -> Counter {
        self.forwarded_bytes
            .get_or_create(&Flow {
                direction: direction.into(),
                path: path.into(),
            })
            .clone()
    }
    pub fn flow_datagrams(&self, direction: &str) -> Counter {
        self.forwarded_datagrams
            .get_or_create(&Flow {
                direction: direction.into(),
                path: "datagram".into(),
            })
            .clone()
    }

    /// The counter of one reason (kept, so that counting costs no label lookup).
    pub fn reason(family: &Family<Reason, Counter>, reason: &str) -> Counter {
        family
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .clone()
    }

    pub fn inc(family: &Family<Reason, Counter>, reason: &str) {
        family
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc();
    }
    pub fn directory(&self, reason: &str) {
        self.directory_events
            .get_or_create(&Reason {
                reason: reason.into(),
            })
            .inc();
    }

    pub fn limit(&self, limit: &str) {
        self.limits_hit
            .get_or_create(&Limit {
                limit: limit.into(),
            })
            .inc();
    }

    pub fn tcp_refused(&self, limit: &str) {
        self.tcp_links_refused
            .get_or_create(&Limit {
                limit: limit.into(),
            })
            .inc();
    }
    pub fn tcp_handshake_failed(&self, stage: &str) {
        Self::inc(&self.tcp_handshake_failures, stage);
    }
    pub fn tcp_link_opened(&self, t: tandem_net::Transport) {
        self.tcp_links.get_or_create(&TransportLabel::of(t)).inc();
    }
    pub fn tcp_link_closed(&self, t: tandem_net::Transport) {
        self.tcp_links.get_or_create(&TransportLabel::of(t)).dec();
    }

    /// Text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
