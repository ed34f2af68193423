//! The inner QUIC connection's configuration: fresh TLS keys per session, transport settings that
//! fit inside the outer link.
//!
//! The agent is the inner QUIC *server* with a certificate generated for this one session; the console
//! is the client. The console accepts whatever certificate the agent presents (it checks that the peer
//! holds its key), because the inner TLS is authenticated by the PAKE bound to its exporter, not by a
//! certificate: a different certificate (a relay in the middle) yields a different exporter and a
//! failed PAKE. No application data flows before the PAKE has confirmed the channel.

use crate::carrier::VirtualSocket;
use quinn::{Endpoint, EndpointConfig, TokioRuntime, TransportConfig, VarInt};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::Arc;
use std::time::Duration;

/// ALPN of the inner, end-to-end connection.
pub const ALPN: &[u8] = b"tandem-session/1";
/// Server name the console uses for the agent (not verified; see the module docs).
pub const SERVER_NAME: &str = "tandem-agent";
/// The inner connection survives this long without packets: longer than the relay's resume grace
/// (15 s) plus a reconnect, so that a resumed outer link finds the inner connection alive.
pub const INNER_IDLE_TIMEOUT: Duration = Duration::from_secs(40);
/// Inner keep-alive, to notice a dead path and keep RTT estimates fresh.
pub const INNER_KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Data a peer may have in flight towards this side on the whole connection, read or not: QUIC's
/// default is unlimited, which let a hostile peer park any amount of stream data in memory.
/// Three of the largest frames (`MAX_VIDEO_FRAME`) fit, so an honest agent is never held back.
pub const INNER_RECEIVE_WINDOW: u32 = 12 * 1024 * 1024;

/// Inner QUIC application close codes.
pub mod close {
    /// Ended normally; the reason text says by whom.
    pub const ENDED: u32 = 0;
    /// Key confirmation failed.
    pub const WRONG_CODE: u32 = 1;
    /// The peer broke the session protocol.
    pub const PROTOCOL: u32 = 2;
    /// The relay link was lost and could not be resumed in time.
    pub const LINK_LOST: u32 = 3;
}

#[derive(Debug, thiserror::Error)]
pub enum InnerError {
    #[error("cannot create the session certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot create the inner QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
}

fn transport() -> TransportConfig {
    let mut t = TransportConfig::default();
    if let Ok(idle) = quinn::IdleTimeout::try_from(INNER_IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(Some(INNER_KEEP_ALIVE));
    // Inner packets start at QUIC's minimum and may grow while the outer link carries them whole.
    t.initial_mtu(1200);
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(1380);
    t.mtu_discovery_config(Some(mtud));
    t.datagram_receive_buffer_size(Some(1024 * 1024));
    t.max_concurrent_uni_streams(VarInt::from_u32(256));
    t.receive_window(VarInt::from_u32(INNER_RECEIVE_WINDOW));
    t.max_concurrent_bidi_streams(VarInt::from_u32(8));
    t
}

/// The agent's inner endpoint: a QUIC server with a certificate made for this session.
pub fn agent_endpoint(socket: VirtualSocket) -> Result<Endpoint, InnerError> {
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?.self_signed(&key)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut tls = rustls::ServerConfig::builder_with_provider(tandem_certs::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| InnerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .map_err(|e| InnerError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| InnerError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport()));
    cfg.migration(false);
    // One console per session: quinn's defaults would queue 65,536 connection attempts with up to
    // 10 MiB of packets each, which a relay could send (no valid keys needed) to pin memory on the
    // user's PC. The agent also stops accepting once its one connection is in
    // (`stop_accepting`).
    cfg.max_incoming(1);
    cfg.incoming_buffer_size(64 * 1024);
    cfg.incoming_buffer_size_total(64 * 1024);
    Endpoint::new_with_abstract_socket(
        EndpointConfig::default(),
        Some(cfg),
        Arc::new(socket),
        Arc::new(TokioRuntime),
    )
    .map_err(InnerError::Endpoint)
}

/// After its one connection: the agent's endpoint accepts no further connection attempts (they are
/// refused without state, whatever a relay sends).
pub fn stop_accepting(endpoint: &Endpoint) {
    endpoint.set_server_config(None);
}

/// The console's inner endpoint.
pub fn console_endpoint(socket: VirtualSocket) -> Result<Endpoint, InnerError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(tandem_certs::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| InnerError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(
            tandem_certs::PinnedVerifier::authenticated_later(),
        ))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| InnerError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport()));
    let mut ep = Endpoint::new_with_abstract_socket(
        EndpointConfig::default(),
        None,
        Arc::new(socket),
        Arc::new(TokioRuntime),
    )
    .map_err(InnerError::Endpoint)?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}
