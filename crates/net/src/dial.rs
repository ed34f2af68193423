//! Client side of a TCP link to the relay: TCP (directly or through an HTTP proxy), TLS, then the
//! preamble of TLS-over-TCP or a WebSocket upgrade.
//!
//! Certificates. A TLS-over-TCP link ends at the relay itself, so its certificate is checked exactly
//! as QUIC checks it (the pin or the CA): a proxy or firewall that inspects TLS and presents its own
//! certificate is refused, with a message that says so. A WebSocket link may end at a reverse proxy
//! (nginx, Caddy, HAProxy) with a certificate of its own, say from Let's Encrypt: it is accepted when
//! it is the relay's (pin or CA) or valid for the URL's host under the system's trust store
//! (`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured). Either way the QUIC connection inside the link
//! checks the relay's own certificate against the pin once more, end to end through the proxy, so a
//! reverse proxy can see only encrypted QUIC packets.

use crate::proxy::{Proxy, ProxyError};
use crate::tunnel::{
    PREAMBLE, PacketRx, PacketTx, TUNNEL_ALPN, Transport, native_framing, tune_tcp,
    websocket_config, websocket_framing,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tandem_certs::{Fingerprint, RelayTrust};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Where a TCP link goes.
#[derive(Clone, PartialEq, Eq)]
pub enum TcpTarget {
    /// TLS over TCP straight to the relay (`host:port`).
    Tls { host: String, port: u16 },
    /// A WebSocket URL (`wss://host[:port]/path`), usually a reverse proxy in front of the relay.
    WebSocket {
        url: String,
        host: String,
        port: u16,
    },
}

impl fmt::Debug for TcpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for TcpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TcpTarget::Tls { host, port } if host.contains(':') => {
                write!(f, "tls://[{host}]:{port}")
            }
            TcpTarget::Tls { host, port } => write!(f, "tls://{host}:{port}"),
            TcpTarget::WebSocket { url, .. } => f.write_str(url),
        }
    }
}

impl TcpTarget {
    /// Parses `wss://host[:port][/path]` (port 443 by default). Plain `ws://` is refused: the link
    /// would still be encrypted by QUIC inside, but a network that allows only the web would see
    /// unencrypted HTTP, and many proxies break it.
    pub fn websocket(url: &str) -> Result<TcpTarget, DialError> {
        let bad = |reason: &str| DialError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("wss://")
            .ok_or_else(|| bad("a WebSocket address starts with wss://"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.contains('@') {
            return Err(bad("no user name or password in a WebSocket address"));
        }
        let (host, port) =
            split_host_port(authority, 443).ok_or_else(|| bad("bad host or port"))?;
        Ok(TcpTarget::WebSocket {
            url: url.to_string(),
            host,
            port,
        })
    }

    /// TLS over TCP to `host:port` (IPv6 in brackets).
    pub fn tls(addr: &str) -> Result<TcpTarget, DialError> {
        let (host, port) = split_host_port(addr, 0)
            .filter(|(_, p)| *p != 0)
            .ok_or_else(|| DialError::BadUrl {
                url: addr.to_string(),
                reason: "expected host:port".into(),
            })?;
        Ok(TcpTarget::Tls { host, port })
    }

    pub fn host(&self) -> &str {
        match self {
            TcpTarget::Tls { host, .. } | TcpTarget::WebSocket { host, .. } => host,
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            TcpTarget::Tls { port, .. } | TcpTarget::WebSocket { port, .. } => *port,
        }
    }

    pub fn transport(&self) -> Transport {
        match self {
            TcpTarget::Tls { .. } => Transport::Tcp,
            TcpTarget::WebSocket { .. } => Transport::WebSocket,
        }
    }
}

/// `host[:port]` with IPv6 in brackets; `default` when no port is given (0: a port is required).
fn split_host_port(s: &str, default: u16) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default,
            None => return None,
        };
        (h.to_string(), port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().ok()?),
            Some(_) => return None,
            None => (s.to_string(), default),
        }
    };
    (!host.is_empty()).then_some((host, port))
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("bad relay address {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot connect to {target} over TCP: {source}")]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("no answer over TCP from {target} within {secs} s")]
    TimedOut { target: String, secs: u64 },
    #[error(
        "the certificate presented for {target} over TCP{} was refused: {reason}{}",
        via.as_ref().map(|p| format!(" (through the HTTP proxy {p})")).unwrap_or_default(),
        if *.replaced { ". Something on the way replaced the relay's certificate: a proxy or firewall that inspects TLS. Ask your network administrator to exempt the relay's address from TLS inspection; Tandem never accepts a replaced certificate" } else { "" }
    )]
    Certificate {
        target: String,
        via: Option<String>,
        reason: String,
        /// The relay's certificate was replaced by another (pin or CA mismatch).
        replaced: bool,
    },
    #[error("TLS handshake over TCP with {target} failed: {reason}")]
    Tls { target: String, reason: String },
    #[error("WebSocket upgrade at {url} failed: {reason}")]
    WebSocket { url: String, reason: String },
    #[error(transparent)]
    Certs(#[from] tandem_certs::CertError),
}

impl DialError {
    /// Whether the relay's certificate itself was refused (a TLS-inspecting proxy, a wrong pin):
    /// worth reporting over "no answer".
    pub fn is_certificate(&self) -> bool {
        matches!(self, DialError::Certificate { .. })
    }
}

/// A connected, verified TCP link, ready to carry packets.
pub struct Dialed {
    pub framing: (PacketRx, PacketTx),
    pub transport: Transport,
    /// The TCP peer (the relay, the reverse proxy or the HTTP proxy).
    pub peer: SocketAddr,
}

impl fmt::Debug for Dialed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dialed")
            .field("transport", &self.transport)
            .field("peer", &self.peer)
            .finish()
    }
}

/// Opens a TCP link to `target`, through `proxy` when given, within `timeout`.
pub async fn dial(
    target: &TcpTarget,
    proxy: Option<&Proxy>,
    trust: &RelayTrust,
    timeout: Duration,
) -> Result<Dialed, DialError> {
    match tokio::time::timeout(timeout, dial_inner(target, proxy, trust, timeout)).await {
        Ok(r) => r,
        Err(_) => Err(DialError::TimedOut {
            target: target.to_string(),
            secs: timeout.as_secs().max(1),
        }),
    }
}

async fn dial_inner(
    target: &TcpTarget,
    proxy: Option<&Proxy>,
    trust: &RelayTrust,
    timeout: Duration,
) -> Result<Dialed, DialError> {
    let tcp = match proxy {
        Some(p) => p.connect(target.host(), target.port(), timeout).await?,
        None => {
            let s = TcpStream::connect((target.host(), target.port()))
                .await
                .map_err(|source| DialError::Connect {
                    target: target.to_string(),
                    source,
                })?;
            tune_tcp(&s);
            s
        }
    };
    if proxy.is_some() {
        tune_tcp(&tcp);
    }
    let peer = tcp.peer_addr().map_err(|source| DialError::Connect {
        target: target.to_string(),
        source,
    })?;
    let tls_cfg = match target {
        TcpTarget::Tls { .. } => {
            let mut c = trust.client_config(TUNNEL_ALPN)?;
            c.alpn_protocols = vec![TUNNEL_ALPN.to_vec()];
            c
        }
        TcpTarget::WebSocket { .. } => websocket_tls(trust)?,
    };
    let name = ServerName::try_from(target.host().to_string()).map_err(|e| DialError::BadUrl {
        url: target.to_string(),
        reason: e.to_string(),
    })?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_cfg));
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| tls_error(target, proxy, &e))?;
    match target {
        TcpTarget::Tls { .. } => {
            tls.write_all(PREAMBLE)
                .await
                .map_err(|source| DialError::Connect {
                    target: target.to_string(),
                    source,
                })?;
            Ok(Dialed {
                framing: native_framing(tls),
                transport: Transport::Tcp,
                peer,
            })
        }
        TcpTarget::WebSocket { url, .. } => {
            let (ws, _resp) = tokio_tungstenite::client_async_with_config(
                url.as_str(),
                tls,
                Some(websocket_config()),
            )
            .await
            .map_err(|e| DialError::WebSocket {
                url: url.clone(),
                reason: e.to_string(),
            })?;
            Ok(Dialed {
                framing: websocket_framing(ws),
                transport: Transport::WebSocket,
                peer,
            })
        }
    }
}

fn tls_error(target: &TcpTarget, proxy: Option<&Proxy>, e: &std::io::Error) -> DialError {
    let rustls_err = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls_err {
        Some(rustls::Error::InvalidCertificate(c)) => DialError::Certificate {
            target: target.to_string(),
            via: proxy.map(|p| format!("{}:{}", p.host(), p.port())),
            reason: format!("{c:?}"),
            replaced: true,
        },
        Some(rustls::Error::General(msg)) if msg.contains("pinned") => DialError::Certificate {
            target: target.to_string(),
            via: proxy.map(|p| format!("{}:{}", p.host(), p.port())),
            reason: msg.clone(),
            replaced: true,
        },
        _ => DialError::Tls {
            target: target.to_string(),
            reason: e.to_string(),
        },
    }
}

/// The system's trust anchors, loaded once.
fn system_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut store = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!(error = %e, "while loading the system's trust anchors");
            }
            let (added, _) = store.add_parsable_certificates(found.certs);
            tracing::debug!(added, "system trust anchors");
            Arc::new(store)
        })
        .clone()
}

/// TLS configuration of a WebSocket link: the relay's own certificate (pin or CA), or one valid for
/// the host under the system's trust store.
fn websocket_tls(trust: &RelayTrust) -> Result<rustls::ClientConfig, DialError> {
    let provider = tandem_certs::provider();
    let relay: Arc<dyn ServerCertVerifier> = match trust {
        RelayTrust::Pin(fp) => Arc::new(tandem_certs::PinnedVerifier::new(*fp)),
        RelayTrust::Ca { roots, .. } => {
            let mut store = rustls::RootCertStore::empty();
            store.add_parsable_certificates(roots.iter().cloned());
            rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(store),
                provider.clone(),
            )
            .build()
            .map_err(|e| DialError::Tls {
                target: "WebSocket".into(),
                reason: e.to_string(),
            })?
        }
    };
    let roots = system_roots();
    let web = if roots.is_empty() {
        None
    } else {
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .ok()
    };
    let verifier = RelayOrWeb {
        relay,
        pin: match trust {
            RelayTrust::Pin(fp) => Some(*fp),
            RelayTrust::Ca { .. } => None,
        },
        web,
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| DialError::Tls {
            target: "WebSocket".into(),
            reason: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Accepts the relay's own certificate, or one the system's trust store vouches for.
#[derive(Debug)]
struct RelayOrWeb {
    relay: Arc<dyn ServerCertVerifier>,
    pin: Option<Fingerprint>,
    web: Option<Arc<rustls::client::WebPkiServerVerifier>>,
}

impl RelayOrWeb {
    fn primary(&self, end_entity: &CertificateDer<'_>) -> &dyn ServerCertVerifier {
        match (&self.pin, &self.web) {
            (Some(fp), Some(web)) if Fingerprint::of(end_entity.as_ref()) != *fp => web.as_ref(),
            _ => self.relay.as_ref(),
        }
    }
}

impl ServerCertVerifier for RelayOrWeb {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .relay
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Ok(v) => Ok(v),
            Err(relay_err) => match &self.web {
                Some(web) => web
                    .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
                    .map_err(|_| relay_err),
                None => Err(relay_err),
            },
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.primary(cert)
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.primary(cert)
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.relay.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            TcpTarget::tls("relay.example.com:443").expect("ok"),
            TcpTarget::Tls {
                host: "relay.example.com".into(),
                port: 443
            }
        );
        assert_eq!(
            TcpTarget::tls("[2001:db8::1]:4433").expect("ok").host(),
            "2001:db8::1"
        );
        assert!(TcpTarget::tls("relay.example.com").is_err());
        assert!(TcpTarget::tls("2001:db8::1:443").is_err());
        let ws = TcpTarget::websocket("wss://remote.example.com/tandem").expect("ok");
        assert_eq!((ws.host(), ws.port()), ("remote.example.com", 443));
        assert_eq!(ws.transport(), Transport::WebSocket);
        let ws = TcpTarget::websocket("wss://[::1]:8443/t").expect("ok");
        assert_eq!((ws.host(), ws.port()), ("::1", 8443));
        assert!(TcpTarget::websocket("ws://remote.example.com/tandem").is_err());
        assert!(TcpTarget::websocket("wss://user:pw@remote.example.com/").is_err());
        assert!(TcpTarget::websocket("wss:///path").is_err());
    }
}
