//! QUIC endpoint plumbing shared by the relay and its clients.
//!
//! * UDP sockets get large kernel buffers ([`UDP_BUFFER_BYTES`], 4 MiB): with the default ~200 KiB,
//!   loopback and busy relays drop bursts of packets, which QUIC then treats as congestion.
//! * One transport configuration for the outer link: DATAGRAM frames enabled with room for a burst of
//!   video, keep-alives well inside the idle timeout so that NAT bindings stay open.
//! * The relay starts every connection small ([`relay_transport_config`]): a stranger's connection,
//!   before it paired, may open no payload stream and have at most [`UNPAIRED_RECEIVE_WINDOW`] of
//!   stream data in flight, whatever it sends. [`open_for_session`] widens a connection when it is
//!   paired, [`close_for_session`] narrows it again when the session is over.

pub mod channel;
pub mod dial;
pub mod direct;
pub mod proxy;
pub mod tunnel;

pub use tunnel::{Transport, TransportCell};

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

/// Kernel send and receive buffer asked for on every UDP socket.
pub const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// An idle outer connection is closed after this long without any packet (the relay's side).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Clients ask for a shorter idle timeout (QUIC uses the smaller of the two): with keep-alives
/// every [`KEEP_ALIVE`], a relay that crashed or a path that died is noticed within this long,
/// and the session supervisor resumes or ends the session, instead of a frozen picture for 30 s.
/// Four keep-alives fit in it, so a lossy path does not trip it.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(8);
/// Clients send a keep-alive this often, so NAT bindings and the idle timer stay fresh.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot bind UDP socket on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
}

/// Binds a UDP socket with enlarged buffers. A kernel that caps the size (net.core.rmem_max) gives
/// less; that is logged, not fatal.
pub fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, NetError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| NetError::Bind { addr, source };
    let sock =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        // Dual-stack where the OS allows it, so `[::]` serves IPv4 too.
        let _ = sock.set_only_v6(false);
    }
    for (what, res) in [
        ("receive", sock.set_recv_buffer_size(UDP_BUFFER_BYTES)),
        ("send", sock.set_send_buffer_size(UDP_BUFFER_BYTES)),
    ] {
        if let Err(e) = res {
            tracing::warn!(error = %e, "could not enlarge UDP {what} buffer");
        }
    }
    sock.bind(&addr.into()).map_err(err)?;
    Ok(sock.into())
}

/// Stream data (all streams together) a relay connection may have in flight before it is paired:
/// room for one control message (16 KiB) and its header, nothing more.
pub const UNPAIRED_RECEIVE_WINDOW: u32 = 32 * 1024;
/// Stream data in flight on a paired relay connection: several payload streams at full speed.
pub const PAIRED_RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;
/// Payload streams a paired peer may have open towards the relay at once.
pub const PAIRED_UNI_STREAMS: u32 = 4;

/// Transport settings of the outer link (relay side and client side alike).
pub fn transport_config(keep_alive: bool) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let idle = if keep_alive {
        CLIENT_IDLE_TIMEOUT
    } else {
        IDLE_TIMEOUT
    };
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle) {
        t.max_idle_timeout(Some(idle));
    }
    if keep_alive {
        t.keep_alive_interval(Some(KEEP_ALIVE));
    }
    // Room for a burst of datagrams (a keyframe) in both directions.
    t.datagram_receive_buffer_size(Some(2 * 1024 * 1024));
    t.datagram_send_buffer_size(2 * 1024 * 1024);
    // The control plane needs one bidirectional stream; payload streams are unidirectional.
    t.max_concurrent_bidi_streams(2u32.into());
    t.max_concurrent_uni_streams(4u32.into());
    t
}

/// DATAGRAM bytes the relay keeps per connection before quinn drops the oldest.
pub const RELAY_DATAGRAM_BUFFER: usize = 256 * 1024;

/// Transport settings of the relay's side of an outer link, as every connection starts: one control
/// stream, no payload streams, [`UNPAIRED_RECEIVE_WINDOW`] of stream data in flight. (DATAGRAM
/// support cannot be switched on after the handshake, so it is advertised; the relay discards what
/// arrives before pairing.)
pub fn relay_transport_config() -> quinn::TransportConfig {
    let mut t = transport_config(false);
    // The forwarders read DATAGRAMs as they come; a small buffer bounds what a peer can park
    // (quinn counts payload + 32 bytes, and tiny datagrams pin whole packets) and lets quinn drop
    // the oldest cheaply.
    t.datagram_receive_buffer_size(Some(RELAY_DATAGRAM_BUFFER));
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.receive_window(UNPAIRED_RECEIVE_WINDOW.into());
    t
}

/// Widens a relay connection for its session: payload streams and a large receive window.
pub fn open_for_session(conn: &quinn::Connection) {
    conn.set_receive_window(PAIRED_RECEIVE_WINDOW.into());
    conn.set_max_concurrent_uni_streams(PAIRED_UNI_STREAMS.into());
}

/// Narrows a relay connection whose session is over back to its unpaired size.
pub fn close_for_session(conn: &quinn::Connection) {
    conn.set_max_concurrent_uni_streams(0u32.into());
    conn.set_receive_window(UNPAIRED_RECEIVE_WINDOW.into());
}

/// The application protocol (ALPN) a connection negotiated.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
}

/// A client endpoint on an ephemeral port of the right address family.
pub fn client_endpoint(
    remote: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<quinn::Endpoint, NetError> {
    client_endpoint_with_port(remote, config).map(|(ep, _)| ep)
}

/// Like [`client_endpoint`], with the [`direct::DirectPort`] that shares its socket (a session's
/// direct path probes from the socket whose NAT mapping the relay observed).
pub fn client_endpoint_with_port(
    remote: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<(quinn::Endpoint, direct::DirectPort), NetError> {
    let local: SocketAddr = if remote.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let sock = bind_udp(local)?;
    let (tap, port) = direct::TapSocket::new(sock).map_err(NetError::Endpoint)?;
    let mut ep = quinn::Endpoint::new_with_abstract_socket(
        direct::client_endpoint_config(),
        None,
        tap,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(NetError::Endpoint)?;
    ep.set_default_client_config(config);
    Ok((ep, port))
}

/// The relay's endpoint configuration: no QUIC-bit greasing, so that every QUIC packet a client
/// sends it has the fixed bit set and channel packets ([`channel`]) can share its socket.
pub fn relay_endpoint_config() -> quinn::EndpointConfig {
    direct::client_endpoint_config()
}

/// A server endpoint bound to `addr`.
pub fn server_endpoint(
    addr: SocketAddr,
    config: quinn::ServerConfig,
) -> Result<quinn::Endpoint, NetError> {
    let sock = bind_udp(addr)?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        sock,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(NetError::Endpoint)
}
