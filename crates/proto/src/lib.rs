//! Tandem's relay control plane: the typed messages an agent or a console exchanges with the relay on
//! the *outer* QUIC connection, and their framing.
//!
//! This crate is pure: no sockets, no clocks, no tasks. Everything here can be tested (and fuzzed)
//! deterministically. The I/O lives in `tandem-relay-server` and `tandem-client`.
//!
//! # Wire format
//! * The QUIC connection negotiates ALPN [`ALPN`] (`tandem-relay/4`); the number is the protocol version.
//!   Version 2 adds [`RelayMsg::PathInfo`] and [`ClientMsg::PathReport`] (direct paths), version 3
//!   [`RelayMsg::Channel`] (relay channels), version 4 [`RelayMsg::Redirect`] (relay clusters). Relays and clients offer all of [`ALPNS`], and neither
//!   sends a message on a link that negotiated an older version than the message's (so an agent
//!   download from before direct paths keeps working with a newer relay, and the other way round).
//!   A peer speaking another version fails the TLS handshake instead of misreading messages.
//! * The client opens exactly one bidirectional stream, the *control stream*. Each message on it is a
//!   frame: a 4-byte big-endian length followed by that many bytes of [postcard]-encoded message.
//!   Frames are limited to [`MAX_CONTROL_FRAME`] bytes; a larger length closes the connection with
//!   [`ErrorCode::Oversized`] before anything is buffered.
//! * After pairing, opaque payloads travel as QUIC DATAGRAM frames, or, when larger than the current
//!   datagram size, on a unidirectional *payload stream* with the same 4-byte length framing, limited to
//!   [`MAX_PAYLOAD_FRAME`]; or, on version 3 links, as relay-channel packets beside the QUIC
//!   connection ([`RelayMsg::Channel`], `tandem_net::channel`). The relay never looks inside a
//!   payload.

use serde::{Deserialize, Serialize};
use std::fmt;

/// ALPN protocol name of the outer relay link; the trailing number is the protocol version.
pub const ALPN: &[u8] = b"tandem-relay/4";
/// The version before relay clusters.
pub const ALPN_V3: &[u8] = b"tandem-relay/3";
/// The version before relay channels.
pub const ALPN_V2: &[u8] = b"tandem-relay/2";
/// The version before direct paths.
pub const ALPN_V1: &[u8] = b"tandem-relay/1";
/// What relays and clients offer, newest first.
pub const ALPNS: [&[u8]; 4] = [ALPN, ALPN_V3, ALPN_V2, ALPN_V1];
/// Version of the control protocol (also carried in [`ALPN`]).
pub const PROTOCOL_VERSION: u16 = 4;

/// The protocol version a link that negotiated `alpn` speaks (`None`: not ours).
pub fn version(alpn: Option<&[u8]>) -> Option<u16> {
    let v = alpn?.strip_prefix(b"tandem-relay/")?;
    let v: u16 = std::str::from_utf8(v).ok()?.parse().ok()?;
    (1..=PROTOCOL_VERSION).contains(&v).then_some(v)
}

/// Whether a link that negotiated `alpn` speaks version 2 or later (direct-path messages).
pub fn speaks_paths(alpn: Option<&[u8]>) -> bool {
    version(alpn).is_some_and(|v| v >= 2)
}

/// Whether a link that negotiated `alpn` speaks version 3 or later (relay channels).
pub fn speaks_channels(alpn: Option<&[u8]>) -> bool {
    version(alpn).is_some_and(|v| v >= 3)
}

/// Whether a link that negotiated `alpn` speaks version 4 or later (redirects between the nodes
/// of a relay cluster).
pub fn speaks_redirects(alpn: Option<&[u8]>) -> bool {
    version(alpn).is_some_and(|v| v >= 4)
}
/// Largest control frame body either side accepts.
pub const MAX_CONTROL_FRAME: usize = 16 * 1024;
/// Largest payload frame body on the payload stream.
pub const MAX_PAYLOAD_FRAME: usize = 64 * 1024;
/// Length of the frame header (big-endian `u32` body length).
pub const FRAME_HEADER: usize = 4;
/// Longest free-text field (names, reasons, software strings) accepted in a message.
pub const MAX_TEXT: usize = 256;
/// Longest token accepted in [`ClientMsg::Authenticate`].
pub const MAX_TOKEN: usize = 256;

/// Shortest and longest slot, in decimal digits.
pub const SLOT_MIN_DIGITS: usize = 3;
pub const SLOT_MAX_DIGITS: usize = 9;

/// A slot: the short, relay-allocated part of a session code (`417` in `417-382-905`).
/// Always 3 to 9 ASCII digits; validated on construction and on deserialization.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Slot(String);

impl Slot {
    pub fn new(digits: impl Into<String>) -> Result<Self, ProtoError> {
        let s = digits.into();
        if (SLOT_MIN_DIGITS..=SLOT_MAX_DIGITS).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_digit())
        {
            Ok(Slot(s))
        } else {
            Err(ProtoError::InvalidSlot)
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Slot {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Slot::new(s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Slot({})", self.0)
    }
}

/// A bearer secret (technician token). Its `Debug` never shows the value, so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}
impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Lets a side that lost its relay connection re-attach to its session within the grace period.
/// Random, 128 bits, one per side and session; a bearer secret, so its `Debug` is redacted.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ResumeToken(pub [u8; 16]);

impl fmt::Debug for ResumeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResumeToken(<redacted>)")
    }
}

/// What a client says about itself; for logs and the audit trail only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClientInfo {
    /// e.g. `tandem-agent 0.1.0`
    pub software: String,
}

/// Messages from an agent or a console to the relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// Agent: ask for a slot (no account needed: attended support). Sent again while waiting, it
    /// releases the current slot and allocates a fresh one (used to burn a code).
    Register { client: ClientInfo },
    /// Console: prove to be a technician of the relay.
    Authenticate { token: Secret, client: ClientInfo },
    /// Console (authenticated): pair with the agent waiting on `slot`.
    Join { slot: Slot },
    /// Keep-alive / round-trip probe; answered with [`RelayMsg::Pong`].
    Ping { nonce: u64 },
    /// End the current session (or give up the slot) and tell the peer why.
    End { reason: EndReason },
    /// On a fresh connection: re-attach to the session this token was given for.
    Resume { token: ResumeToken },
    /// Enrolled agent: come online as a device of its organisation, reachable without a code.
    /// `device` is its certificate (`tandem-device-v1:…`, signed by the organisation key),
    /// `presence` what it says about itself (`tandem-presence-v1:…`, signed by the device key).
    /// `proof`: the device key's signature over this connection's exporter, the certificate and
    /// the presence (a copied certificate and presence cannot take the device's place).
    Announce {
        client: ClientInfo,
        device: String,
        presence: String,
        proof: Vec<u8>,
    },
    /// Console (authenticated): prove membership of an organisation with a technician certificate
    /// (`tandem-cert-v1:…`) and its key's signature over this outer connection's exporter. It only
    /// scopes what the relay lists and routes; agents check the certificate again themselves.
    ProveOrg { cert: String, proof: Vec<u8> },
    /// Console (proven): the organisation's devices whose name, host, group or user contains
    /// `query` (empty: all), from entry `offset` on.
    ListDevices { query: String, offset: u32 },
    /// Console (proven): pair with the online device `device` (its id).
    Connect { device: String },
    /// Asks for the relay's clock; answered with [`RelayMsg::Time`]. "Check connection" compares
    /// it with the local clock: certificates and signed device records are judged by time, so a
    /// clock hours off fails in ways that look like something else.
    Time { nonce: u64 },
    /// In a session: which path this side's inner packets take now (`direct`: straight to the
    /// peer, not through the relay), and how many bytes it has sent on direct paths so far in this
    /// session. Only this client's word; for the relay's metrics and audit.
    PathReport { direct: bool, direct_bytes: u64 },
}

/// Longest certificate or presence text carried in a device message.
pub const MAX_DEVICE_TEXT: usize = 1024;
/// Most entries in one [`RelayMsg::Devices`] page (they must fit [`MAX_CONTROL_FRAME`]).
pub const DEVICES_PER_PAGE: usize = 12;

/// One device in a [`RelayMsg::Devices`] page. `cert` and `presence` are signed (consoles check
/// them); `online`, `in_session` and `last_seen` are only the relay's word.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceListing {
    pub cert: String,
    pub presence: String,
    pub online: bool,
    pub in_session: bool,
    /// Unix seconds when the relay last saw it online.
    pub last_seen: u64,
}

/// Messages from the relay to an agent or a console.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayMsg {
    /// Agent: your slot, valid for `expires_in_secs` unless a console joins it first.
    Registered {
        slot: Slot,
        expires_in_secs: u32,
    },
    /// Console: the relay knows you as this technician of this organisation.
    Authenticated {
        technician: String,
        organisation: String,
    },
    /// Console: you are paired with the agent on `slot`; payloads now flow. `resume` re-attaches to
    /// this session after a lost connection.
    Joined {
        slot: Slot,
        resume: ResumeToken,
    },
    /// Agent: a technician joined your slot; payloads now flow. Names are as the relay
    /// authenticated them (for the consent prompt).
    Paired {
        technician: String,
        organisation: String,
        resume: ResumeToken,
    },
    /// Answer to [`ClientMsg::Resume`]: re-attached; payloads flow again.
    Resumed,
    /// The peer lost its relay connection; the session waits `grace_secs` for it to resume.
    PeerSuspended {
        grace_secs: u32,
    },
    /// The peer is back.
    PeerResumed,
    Pong {
        nonce: u64,
    },
    /// Agent: your slot expired before anyone joined. Register again for a new one.
    SlotExpired {
        slot: Slot,
    },
    /// The session ended: the peer ended it, or its connection was lost.
    SessionEnded {
        reason: EndReason,
    },
    /// A request was refused; the connection stays usable (e.g. a join to a wrong slot).
    Refused {
        code: ErrorCode,
        message: String,
    },
    /// The relay is shutting down; the connection will be closed.
    ShuttingDown,
    /// Agent, after `Registered`: the organisation's newest revocation list the relay was given
    /// (one line of text, `tandem-revocation-v1:…`). The relay only carries it: agents check the
    /// organisation's signature and keep it only if its serial is newer than theirs.
    Revocation {
        list: String,
    },
    /// Agent, after `Announce`: online as this device; technicians may connect.
    Online {
        device: String,
    },
    /// Console, after `ProveOrg`: the relay lists and routes this organisation's devices for you.
    /// `revocation`: the newest revocation list the administrator published on the relay (the
    /// console keeps it if its organisation signed it and it is newer than its own).
    OrgProven {
        organisation: String,
        revocation: Option<String>,
    },
    /// Console: a page of the device list (`total` matching, this page from `offset`).
    Devices {
        entries: Vec<DeviceListing>,
        offset: u32,
        total: u32,
    },
    /// Answer to [`ClientMsg::Time`]: the relay's clock when it answered, in milliseconds since
    /// the Unix epoch.
    Time {
        nonce: u64,
        unix_ms: u64,
    },
    /// Right after `Paired`, `Joined` or `Resumed`: the address this connection comes from as the
    /// relay sees it (none over a TCP link), for the client's direct-path candidates, and whether
    /// this relay lets sessions leave it (`direct_allowed: false`: "relay only" by the operator).
    PathInfo {
        observed: Option<std::net::SocketAddr>,
        direct_allowed: bool,
    },
    /// After `PathInfo`, to a side on a QUIC link (version 3): its token for the session's relay
    /// channel. From now on it may send the session's payloads as UDP channel packets from this
    /// link's own address and port, and receives the peer's that way (`tandem_net::channel`);
    /// DATAGRAM frames and payload streams still work. Sent again with a new token after a resume.
    Channel {
        token: u64,
    },
    /// Console, answering [`ClientMsg::Join`] (version 4): the code's agent waits on another node
    /// of this relay's cluster, reachable at `relay` (`host:port`). The console connects there
    /// (trusting it exactly as it trusts this node: same pin or CA), authenticates and joins
    /// again. The join counted here as an attempt; nothing else happened.
    Redirect {
        relay: String,
    },
}

/// Longest revocation list a relay carries (its text form).
pub const MAX_REVOCATION_TEXT: usize = 14 * 1024;

/// Why a session ended. Relay-originated reasons and the ones a peer sends are in one type so that
/// both ends and the audit log speak the same words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    /// Ended normally by the agent's user.
    EndedByUser,
    /// Ended normally by the technician.
    EndedByTechnician,
    /// The user denied consent.
    Denied,
    /// Key confirmation failed: the code was wrong. The agent burns it.
    WrongCode,
    /// The peer's connection to the relay was lost and not resumed.
    PeerDisconnected,
    /// The relay is shutting down.
    RelayShutdown,
    /// Anything else, as free text (bounded by [`MAX_TEXT`]).
    Other(String),
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::EndedByUser => f.write_str("ended by the user"),
            EndReason::EndedByTechnician => f.write_str("ended by the technician"),
            EndReason::Denied => f.write_str("the user denied the request"),
            EndReason::WrongCode => f.write_str("wrong session code"),
            EndReason::PeerDisconnected => f.write_str("the other side lost its connection"),
            EndReason::RelayShutdown => f.write_str("the relay is shutting down"),
            EndReason::Other(s) => write!(f, "{s}"),
        }
    }
}

impl EndReason {
    /// Short stable label for metrics and the audit log.
    pub fn label(&self) -> &'static str {
        match self {
            EndReason::EndedByUser => "ended_by_user",
            EndReason::EndedByTechnician => "ended_by_technician",
            EndReason::Denied => "denied",
            EndReason::WrongCode => "wrong_code",
            EndReason::PeerDisconnected => "peer_disconnected",
            EndReason::RelayShutdown => "relay_shutdown",
            EndReason::Other(_) => "other",
        }
    }
}

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $name:ident = $num:literal, $label:literal, $msg:literal; )*) => {
        /// Reasons the relay refuses a request or closes a connection. The number is also the QUIC
        /// application close code, so a client can tell the reason even when the control stream is gone.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[repr(u32)]
        pub enum ErrorCode {
            $( $(#[$doc])* $name = $num, )*
        }
        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];
            /// Stable snake_case label (metrics, logs, JSON).
            pub fn label(self) -> &'static str {
                match self { $(ErrorCode::$name => $label,)* }
            }
            /// A sentence for a person: what went wrong and what to do.
            pub fn explain(self) -> &'static str {
                match self { $(ErrorCode::$name => $msg,)* }
            }
            pub fn from_u32(n: u32) -> Option<ErrorCode> {
                match n { $($num => Some(ErrorCode::$name),)* _ => None }
            }
        }
    };
}

error_codes! {
    /// Closed normally.
    Normal = 0, "normal", "closed normally";
    Malformed = 1, "malformed", "the peer sent a message that could not be decoded";
    Oversized = 2, "oversized", "the peer sent a message larger than the limit";
    UnexpectedMessage = 3, "unexpected_message", "the peer sent a message that is not allowed at this point";
    HandshakeTimeout = 4, "handshake_timeout", "nothing was registered or authenticated in time";
    NotAuthenticated = 5, "not_authenticated", "authenticate as a technician before joining a session";
    BadToken = 6, "bad_token", "the technician token is not valid; ask the relay administrator for a new one (tandem-relay technician rotate-token)";
    TechnicianDisabled = 7, "technician_disabled", "this technician account is disabled; ask the relay administrator";
    UnknownSlot = 8, "unknown_slot", "no agent is waiting with that code; check the code with the user";
    ExpiredSlot = 9, "expired_slot", "that code has expired; ask the user for the new code shown by the agent";
    SlotBusy = 10, "slot_busy", "another technician is already connected to that code";
    AgentGone = 11, "agent_gone", "the agent with that code has disconnected; ask the user to start it again";
    RateLimited = 12, "rate_limited", "too many attempts; wait a minute and try again";
    TooManyConnections = 13, "too_many_connections", "the relay is at its connection limit; try again later";
    TooManyConnectionsFromAddress = 14, "too_many_connections_from_address", "too many connections from your address; close some and try again";
    TooManySessions = 15, "too_many_sessions", "the relay is at its session limit; try again later";
    ShuttingDown = 16, "shutting_down", "the relay is shutting down; try again in a moment";
    Internal = 17, "internal", "the relay hit an internal error; see its log";
    AlreadyAuthenticated = 18, "already_authenticated", "this connection already registered or authenticated";
    IdleTimeout = 19, "idle_timeout", "the connection was idle for too long";
    CodeBurned = 20, "code_burned", "the code was used with a wrong secret and is no longer valid; ask the user for the new code";
    SessionGone = 21, "session_gone", "there is no session to resume: it ended or its grace period ran out";
    SessionTakenOver = 22, "session_taken_over", "this session was resumed on another connection";
    /// Logins are queued for verification beyond what the relay checks in a few seconds. The close
    /// reason says how long to wait ("retry in N s"); see [`retry_after_secs`].
    Busy = 23, "busy", "the relay is busy checking logins; try again in a few seconds";
    /// An agent asked for new codes faster than its budget (per connection and per address).
    RegisterRateLimited = 24, "register_rate_limited", "new codes were requested too often; wait a minute and try again";
    /// The device's certificate or presence did not check (forged, stale, or damaged).
    BadDevice = 25, "bad_device", "the device's enrollment did not check; enroll the agent again (tandem-agent enroll)";
    /// A console asked for devices without proving an organisation certificate first.
    NotProven = 26, "not_proven", "prove an organisation certificate first (the console needs --cert and --cert-key)";
    /// The technician certificate did not check, or does not allow unattended access there.
    BadCertificate = 27, "bad_certificate", "the technician certificate is not valid for this (expired, forged, or without unattended access to the device's group)";
    /// No such device is online.
    DeviceOffline = 28, "device_offline", "that device is not online (or not enrolled in your organisation)";
    /// Another connection came online as the same device: this one is replaced.
    DeviceReplaced = 29, "device_replaced", "this device came online again on another connection";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.explain())
    }
}

/// The close reason of an [`ErrorCode::Busy`] answer: "…; retry in N s".
pub fn busy_reason(retry_after_secs: u32) -> String {
    format!("the relay is busy checking logins; retry in {retry_after_secs} s")
}

/// The wait a close reason asks for ("retry in N s"), if it asks for one.
pub fn retry_after_secs(reason: &str) -> Option<u32> {
    let rest = &reason[reason.rfind("retry in ")? + "retry in ".len()..];
    rest.strip_suffix(" s")?.parse().ok()
}

/// Errors of this crate: decoding and validation. None of them carries untrusted bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized { len: usize, max: usize },
    #[error("message could not be decoded")]
    Malformed,
    #[error("a slot is 3 to 9 decimal digits")]
    InvalidSlot,
    #[error("text field longer than {MAX_TEXT} bytes")]
    TextTooLong,
    #[error("invalid {0}")]
    Invalid(&'static str),
}

impl ProtoError {
    /// The close code the relay uses for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::Oversized { .. } => ErrorCode::Oversized,
            _ => ErrorCode::Malformed,
        }
    }
}

/// Bounded-length checks of free-text fields, applied after decoding.
pub trait Validate {
    fn validate(&self) -> Result<(), ProtoError>;
}

fn text_ok(s: &str, max: usize) -> Result<(), ProtoError> {
    if s.len() <= max {
        Ok(())
    } else {
        Err(ProtoError::TextTooLong)
    }
}

impl Validate for EndReason {
    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            EndReason::Other(s) => text_ok(s, MAX_TEXT),
            _ => Ok(()),
        }
    }
}

impl Validate for ClientMsg {
    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            ClientMsg::Register { client } => text_ok(&client.software, MAX_TEXT),
            ClientMsg::Authenticate { token, client } => {
                text_ok(token.expose(), MAX_TOKEN)?;
                text_ok(&client.software, MAX_TEXT)
            }
            ClientMsg::End { reason } => reason.validate(),
            ClientMsg::Announce {
                client,
                device,
                presence,
                proof,
            } => {
                if proof.len() > 64 {
                    return Err(ProtoError::Invalid("proof"));
                }
                text_ok(&client.software, MAX_TEXT)?;
                text_ok(device, MAX_DEVICE_TEXT)?;
                text_ok(presence, MAX_DEVICE_TEXT)
            }
            ClientMsg::ProveOrg { cert, proof } => {
                text_ok(cert, MAX_DEVICE_TEXT * 2)?;
                if proof.len() > 64 {
                    return Err(ProtoError::Invalid("proof"));
                }
                Ok(())
            }
            ClientMsg::ListDevices { query, .. } => text_ok(query, MAX_TEXT),
            ClientMsg::Connect { device } => text_ok(device, 64),
            ClientMsg::Join { .. }
            | ClientMsg::Ping { .. }
            | ClientMsg::Time { .. }
            | ClientMsg::Resume { .. }
            | ClientMsg::PathReport { .. } => Ok(()),
        }
    }
}

impl Validate for RelayMsg {
    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            RelayMsg::Authenticated {
                technician,
                organisation,
            }
            | RelayMsg::Paired {
                technician,
                organisation,
                ..
            } => {
                text_ok(technician, MAX_TEXT)?;
                text_ok(organisation, MAX_TEXT)
            }
            RelayMsg::SessionEnded { reason } => reason.validate(),
            RelayMsg::Refused { message, .. } => text_ok(message, MAX_TEXT * 2),
            RelayMsg::Revocation { list }
                if list.len() > MAX_REVOCATION_TEXT
                    || !list.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Err(ProtoError::Invalid("revocation list"))
            }
            RelayMsg::Online { device } => text_ok(device, 64),
            RelayMsg::Redirect { relay }
                if relay.is_empty()
                    || relay.len() > MAX_TEXT
                    || !relay.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Err(ProtoError::Invalid("redirect address"))
            }
            RelayMsg::OrgProven {
                organisation,
                revocation,
            } => {
                text_ok(organisation, MAX_TEXT)?;
                match revocation {
                    Some(r) if r.len() > MAX_REVOCATION_TEXT => {
                        Err(ProtoError::Invalid("revocation list"))
                    }
                    _ => Ok(()),
                }
            }
            RelayMsg::Devices { entries, .. } => {
                if entries.len() > DEVICES_PER_PAGE {
                    return Err(ProtoError::Invalid("device list"));
                }
                for e in entries {
                    text_ok(&e.cert, MAX_DEVICE_TEXT)?;
                    text_ok(&e.presence, MAX_DEVICE_TEXT)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Encodes `msg` as one frame (header + body). Fails only if the message is over the limit.
pub fn encode_frame<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, ProtoError> {
    let mut out = vec![0u8; FRAME_HEADER];
    out = postcard::to_extend(msg, out).map_err(|_| ProtoError::Malformed)?;
    let len = out.len() - FRAME_HEADER;
    if len > max {
        return Err(ProtoError::Oversized { len, max });
    }
    let len32 = u32::try_from(len).map_err(|_| ProtoError::Oversized { len, max })?;
    out[..FRAME_HEADER].copy_from_slice(&len32.to_be_bytes());
    Ok(out)
}

/// Reads a frame header and checks the announced length against `max` before any body is read.
pub fn frame_len(header: [u8; FRAME_HEADER], max: usize) -> Result<usize, ProtoError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        Err(ProtoError::Oversized { len, max })
    } else {
        Ok(len)
    }
}

/// Decodes a frame body and validates it. Trailing bytes are malformed.
pub fn decode_body<T>(body: &[u8]) -> Result<T, ProtoError>
where
    T: for<'de> Deserialize<'de> + Validate,
{
    let (msg, rest): (T, &[u8]) =
        postcard::take_from_bytes(body).map_err(|_| ProtoError::Malformed)?;
    if !rest.is_empty() {
        return Err(ProtoError::Malformed);
    }
    msg.validate()?;
    Ok(msg)
}

/// Incremental frame splitter over a byte buffer (for callers that read arbitrary chunks and for
/// fuzzing). Never buffers more than one header plus `max` bytes.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl FrameDecoder {
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            max,
        }
    }

    /// Appends bytes and returns the next complete frame body, if any. Call [`FrameDecoder::next`]
    /// until it returns `Ok(None)` to drain.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Returns the next complete frame body, `Ok(None)` if more bytes are needed, or an error if the
    /// announced length is over the limit (the stream is then unusable).
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ProtoError> {
        if self.buf.len() < FRAME_HEADER {
            return Ok(None);
        }
        let mut header = [0u8; FRAME_HEADER];
        header.copy_from_slice(&self.buf[..FRAME_HEADER]);
        let len = frame_len(header, self.max)?;
        if self.buf.len() < FRAME_HEADER + len {
            return Ok(None);
        }
        let body = self.buf[FRAME_HEADER..FRAME_HEADER + len].to_vec();
        self.buf.drain(..FRAME_HEADER + len);
        Ok(Some(body))
    }

    /// Bytes buffered and not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip_client(m: ClientMsg) {
        let frame = encode_frame(&m, MAX_CONTROL_FRAME).unwrap();
        let mut d = FrameDecoder::new(MAX_CONTROL_FRAME);
        d.push(&frame);
        let body = d.next_frame().unwrap().unwrap();
        assert_eq!(decode_body::<ClientMsg>(&body).unwrap(), m);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn client_messages_roundtrip() {
        roundtrip_client(ClientMsg::Register {
            client: ClientInfo {
                software: "tandem-agent 0.1".into(),
            },
        });
        roundtrip_client(ClientMsg::Authenticate {
            token: Secret::new("tnd_1_abc"),
            client: ClientInfo::default(),
        });
        roundtrip_client(ClientMsg::Join {
            slot: Slot::new("417").unwrap(),
        });
        roundtrip_client(ClientMsg::Ping { nonce: u64::MAX });
        roundtrip_client(ClientMsg::Time { nonce: 7 });
        roundtrip_client(ClientMsg::PathReport {
            direct: true,
            direct_bytes: 1 << 40,
        });
        roundtrip_client(ClientMsg::Resume {
            token: ResumeToken([1; 16]),
        });
        roundtrip_client(ClientMsg::End {
            reason: EndReason::Other("bye".into()),
        });
    }

    #[test]
    fn relay_messages_roundtrip() {
        let all = vec![
            RelayMsg::Registered {
                slot: Slot::new("123456789").unwrap(),
                expires_in_secs: 600,
            },
            RelayMsg::Paired {
                technician: "Alice".into(),
                organisation: "ACME IT".into(),
                resume: ResumeToken([7; 16]),
            },
            RelayMsg::PeerSuspended { grace_secs: 15 },
            RelayMsg::Time {
                nonce: 7,
                unix_ms: 1_796_000_000_000,
            },
            RelayMsg::Revocation {
                list: "tandem-revocation-v1:AAAA".into(),
            },
            RelayMsg::Refused {
                code: ErrorCode::SlotBusy,
                message: ErrorCode::SlotBusy.explain().into(),
            },
            RelayMsg::SessionEnded {
                reason: EndReason::WrongCode,
            },
            RelayMsg::ShuttingDown,
            RelayMsg::PathInfo {
                observed: Some("[2001:db8::1]:4433".parse().unwrap()),
                direct_allowed: false,
            },
            RelayMsg::PathInfo {
                observed: None,
                direct_allowed: true,
            },
            RelayMsg::Channel { token: u64::MAX },
        ];
        for m in all {
            let frame = encode_frame(&m, MAX_CONTROL_FRAME).unwrap();
            assert_eq!(decode_body::<RelayMsg>(&frame[FRAME_HEADER..]).unwrap(), m);
        }
    }

    #[test]
    fn frames_split_across_pushes() {
        let a = encode_frame(&ClientMsg::Ping { nonce: 1 }, MAX_CONTROL_FRAME).unwrap();
        let b = encode_frame(&ClientMsg::Ping { nonce: 2 }, MAX_CONTROL_FRAME).unwrap();
        let all: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        let mut d = FrameDecoder::new(MAX_CONTROL_FRAME);
        let mut got = vec![];
        for byte in all {
            d.push(&[byte]);
            while let Some(body) = d.next_frame().unwrap() {
                got.push(decode_body::<ClientMsg>(&body).unwrap());
            }
        }
        assert_eq!(
            got,
            vec![ClientMsg::Ping { nonce: 1 }, ClientMsg::Ping { nonce: 2 }]
        );
    }

    #[test]
    fn oversized_header_rejected_before_buffering() {
        let mut d = FrameDecoder::new(100);
        d.push(&101u32.to_be_bytes());
        assert_eq!(
            d.next_frame(),
            Err(ProtoError::Oversized { len: 101, max: 100 })
        );
        assert_eq!(
            frame_len(u32::MAX.to_be_bytes(), MAX_CONTROL_FRAME)
                .unwrap_err()
                .code(),
            ErrorCode::Oversized
        );
    }

    #[test]
    fn malformed_bodies_rejected() {
        assert_eq!(decode_body::<ClientMsg>(&[]), Err(ProtoError::Malformed));
        assert_eq!(decode_body::<ClientMsg>(&[200]), Err(ProtoError::Malformed));
        // valid message followed by garbage
        let mut f = encode_frame(&ClientMsg::Ping { nonce: 5 }, 100).unwrap();
        f.push(0);
        assert_eq!(
            decode_body::<ClientMsg>(&f[FRAME_HEADER..]),
            Err(ProtoError::Malformed)
        );
    }

    #[test]
    fn invalid_slot_in_message_rejected() {
        // Hand-craft a Join with a non-digit slot: variant index 2, then a string.
        let bad = postcard::to_stdvec(&(2u8, "41a")).unwrap();
        assert_eq!(decode_body::<ClientMsg>(&bad), Err(ProtoError::Malformed));
        assert!(Slot::new("12").is_err());
        assert!(Slot::new("1234567890").is_err());
        assert!(Slot::new("٣٣٣").is_err());
    }

    #[test]
    fn long_text_rejected() {
        let m = ClientMsg::End {
            reason: EndReason::Other("x".repeat(MAX_TEXT + 1)),
        };
        let f = encode_frame(&m, MAX_CONTROL_FRAME).unwrap();
        assert_eq!(
            decode_body::<ClientMsg>(&f[FRAME_HEADER..]),
            Err(ProtoError::TextTooLong)
        );
    }

    #[test]
    fn token_never_in_debug_output() {
        let m = ClientMsg::Authenticate {
            token: Secret::new("super-secret-token"),
            client: ClientInfo::default(),
        };
        assert!(!format!("{m:?}").contains("super-secret"));
    }

    #[test]
    fn busy_reason_round_trips() {
        assert_eq!(retry_after_secs(&busy_reason(7)), Some(7));
        assert_eq!(retry_after_secs("closed normally"), None);
        assert_eq!(retry_after_secs("retry in x s"), None);
    }

    #[test]
    fn error_codes_are_distinct_and_roundtrip() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(*c as u32));
            assert_eq!(ErrorCode::from_u32(*c as u32), Some(*c));
            assert!(!c.explain().is_empty());
        }
        assert_eq!(ErrorCode::from_u32(9999), None);
    }
}
