//! Client side of the outer relay link, shared by the agent and the console.
//!
//! [`RelayLink::connect`] dials the relay over QUIC, verifies it with a [`RelayTrust`] (pin or CA, never
//! "accept anything"), opens the control stream and starts a reader task, so that [`RelayLink::recv`]
//! is cancel-safe and can sit in a `tokio::select!`. After pairing, payloads go through
//! [`RelayLink::connection`] as DATAGRAM frames, or through a payload stream
//! ([`RelayLink::open_payload_stream`] / [`RelayLink::accept_payload_stream`]) when larger than
//! [`RelayLink::max_datagram_size`].

use bytes::Bytes;
use quinn::{Connection, ConnectionError, RecvStream, SendStream, VarInt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tandem_certs::RelayTrust;
use tandem_proto::{
    ALPN, ClientInfo, ClientMsg, EndReason, ErrorCode, FRAME_HEADER, MAX_CONTROL_FRAME,
    MAX_PAYLOAD_FRAME, RelayMsg, ResumeToken, Secret, Slot, decode_body, encode_frame, frame_len,
};
use tokio::sync::mpsc;

pub use tandem_certs;
pub use tandem_proto;

/// How to reach and trust a relay.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// `host:port` (host: DNS name or IP address; IPv6 in brackets).
    pub relay: String,
    pub trust: RelayTrust,
    /// Name and version of the program, for the relay's log.
    pub software: String,
    /// How long to wait for the relay to answer.
    pub timeout: Duration,
}

impl ConnectOptions {
    pub fn new(relay: impl Into<String>, trust: RelayTrust) -> Self {
        ConnectOptions {
            relay: relay.into(),
            trust,
            software: format!("tandem-client {}", env!("CARGO_PKG_VERSION")),
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("relay address {0:?} is not host:port")]
    BadAddress(String),
    #[error("cannot resolve relay address {addr:?}: {reason}")]
    Resolve { addr: String, reason: String },
    #[error(
        "no answer from the relay at {addr} within {secs} s: check that it runs and that UDP port {port} is reachable"
    )]
    Unreachable { addr: String, secs: u64, port: u16 },
    #[error("TLS handshake with the relay failed: {0}")]
    Tls(String),
    #[error("the relay closed the connection: {reason} [{}]", code.map(|c| c.label()).unwrap_or("unknown"))]
    Closed {
        code: Option<ErrorCode>,
        reason: String,
    },
    #[error("{} [{}]", code.explain(), code.label())]
    Refused { code: ErrorCode },
    #[error("lost the connection to the relay: {0}")]
    Lost(String),
    #[error("the relay sent something unexpected: {0}")]
    Protocol(String),
    #[error(transparent)]
    Certs(#[from] tandem_certs::CertError),
    #[error(transparent)]
    Net(#[from] tandem_net::NetError),
}

impl ClientError {
    /// The relay's reason code, when the relay gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Closed { code, .. } => *code,
            ClientError::Refused { code } => Some(*code),
            _ => None,
        }
    }

    /// How long the relay asked to wait before trying again ([`ErrorCode::Busy`]: "retry in N s").
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Closed {
                code: Some(ErrorCode::Busy),
                reason,
            } => Some(Duration::from_secs(
                tandem_proto::retry_after_secs(reason).unwrap_or(5).into(),
            )),
            _ => None,
        }
    }

    fn from_connection(e: &ConnectionError) -> Self {
        match e {
            ConnectionError::ApplicationClosed(c) => {
                let n = u32::try_from(c.error_code.into_inner()).ok();
                ClientError::Closed {
                    code: n.and_then(ErrorCode::from_u32),
                    reason: String::from_utf8_lossy(&c.reason).into_owned(),
                }
            }
            ConnectionError::TransportError(t)
                if t.code.to_string().contains("crypto") || is_tls(&t.reason) =>
            {
                ClientError::Tls(t.reason.clone())
            }
            ConnectionError::ConnectionClosed(c) if is_tls(&String::from_utf8_lossy(&c.reason)) => {
                ClientError::Tls(String::from_utf8_lossy(&c.reason).into_owned())
            }
            other => ClientError::Lost(other.to_string()),
        }
    }
}

fn is_tls(reason: &str) -> bool {
    reason.contains("certificate") || reason.contains("pinned") || reason.contains("ALPN")
}

/// One control-plane event from the relay, or the end of the link.
type Incoming = Result<RelayMsg, ClientError>;

/// A live, verified connection to the relay.
pub struct RelayLink {
    endpoint: quinn::Endpoint,
    conn: Connection,
    send: SendStream,
    events: mpsc::Receiver<Incoming>,
    software: String,
    remote: SocketAddr,
    /// True when this link made its endpoint (and so waits for it to go idle on close).
    owns_endpoint: bool,
}

/// A client endpoint configured to dial the relay of `opts` (address family of `relay_addr`).
pub fn client_endpoint(
    opts: &ConnectOptions,
    relay_addr: SocketAddr,
) -> Result<quinn::Endpoint, ClientError> {
    let tls = opts.trust.client_config(ALPN)?;
    let quic_tls = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic_tls));
    cfg.transport_config(Arc::new(tandem_net::transport_config(true)));
    Ok(tandem_net::client_endpoint(relay_addr, cfg)?)
}

async fn resolve(relay: &str) -> Result<(SocketAddr, String), ClientError> {
    let (host, _port) = relay
        .rsplit_once(':')
        .ok_or_else(|| ClientError::BadAddress(relay.to_string()))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err(ClientError::BadAddress(relay.to_string()));
    }
    let mut addrs = tokio::net::lookup_host(relay)
        .await
        .map_err(|e| ClientError::Resolve {
            addr: relay.to_string(),
            reason: e.to_string(),
        })?;
    let addr = addrs.next().ok_or_else(|| ClientError::Resolve {
        addr: relay.to_string(),
        reason: "no addresses".into(),
    })?;
    Ok((addr, host))
}

impl RelayLink {
    /// Dials and verifies the relay, and opens the control stream.
    pub async fn connect(opts: &ConnectOptions) -> Result<RelayLink, ClientError> {
        let (addr, _) = resolve(&opts.relay).await?;
        let endpoint = client_endpoint(opts, addr)?;
        let mut link = Self::connect_on(&endpoint, opts).await?;
        link.owns_endpoint = true;
        Ok(link)
    }

    /// Like [`RelayLink::connect`], on an existing endpoint from [`client_endpoint`] (many links can
    /// share one UDP socket: load tools, benchmarks).
    pub async fn connect_on(
        endpoint: &quinn::Endpoint,
        opts: &ConnectOptions,
    ) -> Result<RelayLink, ClientError> {
        let endpoint = endpoint.clone();
        let (addr, host) = resolve(&opts.relay).await?;
        let unreachable = || ClientError::Unreachable {
            addr: opts.relay.clone(),
            secs: opts.timeout.as_secs(),
            port: addr.port(),
        };
        let connecting = endpoint
            .connect(addr, &host)
            .map_err(|e| ClientError::Lost(e.to_string()))?;
        let conn = match tokio::time::timeout(opts.timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(ConnectionError::TimedOut)) | Err(_) => return Err(unreachable()),
            Ok(Err(e)) => return Err(ClientError::from_connection(&e)),
        };
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| ClientError::from_connection(&e))?;
        let (tx, events) = mpsc::channel(64);
        tokio::spawn(reader(conn.clone(), recv, tx));
        Ok(RelayLink {
            endpoint,
            conn,
            send,
            events,
            software: opts.software.clone(),
            remote: addr,
            owns_endpoint: false,
        })
    }

    /// The relay's address.
    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// Sends one control message.
    pub async fn send(&mut self, msg: &ClientMsg) -> Result<(), ClientError> {
        let frame = encode_frame(msg, MAX_CONTROL_FRAME)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.send
            .write_all(&frame)
            .await
            .map_err(|_| self.closed_error())
    }

    /// Sends raw bytes on the control stream (tests of the relay's input handling).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.send
            .write_all(bytes)
            .await
            .map_err(|_| self.closed_error())
    }

    fn closed_error(&self) -> ClientError {
        match self.conn.close_reason() {
            Some(e) => ClientError::from_connection(&e),
            None => ClientError::Lost("control stream closed".into()),
        }
    }

    /// The next control message from the relay. Cancel-safe.
    pub async fn recv(&mut self) -> Result<RelayMsg, ClientError> {
        match self.events.recv().await {
            Some(r) => r,
            None => Err(self.closed_error()),
        }
    }

    /// Waits for the answer to a request, skipping notifications about an earlier session that may
    /// still be in flight (its end, the peer's suspension) and keep-alive answers.
    async fn reply(&mut self) -> Result<RelayMsg, ClientError> {
        loop {
            match self.recv().await? {
                RelayMsg::Pong { .. }
                | RelayMsg::PeerSuspended { .. }
                | RelayMsg::PeerResumed
                | RelayMsg::SessionEnded { .. }
                | RelayMsg::SlotExpired { .. } => continue,
                other => return Ok(other),
            }
        }
    }

    /// Agent: asks for a slot; returns it and its lifetime.
    pub async fn register(&mut self) -> Result<(Slot, Duration), ClientError> {
        let client = ClientInfo {
            software: self.software.clone(),
        };
        self.send(&ClientMsg::Register { client }).await?;
        match self.reply().await? {
            RelayMsg::Registered {
                slot,
                expires_in_secs,
            } => Ok((slot, Duration::from_secs(expires_in_secs.into()))),
            RelayMsg::Refused { code, .. } => Err(ClientError::Refused { code }),
            other => Err(unexpected(other)),
        }
    }

    /// Console: authenticates as a technician; returns (technician, organisation).
    pub async fn authenticate(&mut self, token: &Secret) -> Result<(String, String), ClientError> {
        let client = ClientInfo {
            software: self.software.clone(),
        };
        self.send(&ClientMsg::Authenticate {
            token: token.clone(),
            client,
        })
        .await?;
        match self.reply().await? {
            RelayMsg::Authenticated {
                technician,
                organisation,
            } => Ok((technician, organisation)),
            other => Err(unexpected(other)),
        }
    }

    /// Console: joins the agent waiting on `slot`. On success payloads flow; the token resumes the
    /// session on a new connection if this one is lost.
    pub async fn join(&mut self, slot: &Slot) -> Result<ResumeToken, ClientError> {
        self.send(&ClientMsg::Join { slot: slot.clone() }).await?;
        match self.reply().await? {
            RelayMsg::Joined { resume, .. } => Ok(resume),
            RelayMsg::Refused { code, .. } => Err(ClientError::Refused { code }),
            other => Err(unexpected(other)),
        }
    }

    /// Agent: waits until a technician joins; returns (technician, organisation, resume token).
    pub async fn wait_paired(&mut self) -> Result<(String, String, ResumeToken), ClientError> {
        loop {
            match self.recv().await? {
                RelayMsg::Paired {
                    technician,
                    organisation,
                    resume,
                } => return Ok((technician, organisation, resume)),
                RelayMsg::Pong { .. } => continue,
                RelayMsg::SlotExpired { .. } => {
                    return Err(ClientError::Refused {
                        code: ErrorCode::ExpiredSlot,
                    });
                }
                other => return Err(unexpected(other)),
            }
        }
    }

    /// On a fresh link: re-attaches to the session `token` was issued for.
    pub async fn resume(&mut self, token: &ResumeToken) -> Result<(), ClientError> {
        self.send(&ClientMsg::Resume { token: *token }).await?;
        match self.reply().await? {
            RelayMsg::Resumed => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Ends the current session (or gives up the slot), telling the peer why.
    pub async fn end(&mut self, reason: EndReason) -> Result<(), ClientError> {
        self.send(&ClientMsg::End { reason }).await
    }

    /// The QUIC connection to the relay (for DATAGRAM frames).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Largest payload that fits a DATAGRAM frame right now (grows after path MTU discovery).
    pub fn max_datagram_size(&self) -> usize {
        self.conn.max_datagram_size().unwrap_or(0)
    }

    /// Sends a payload as a DATAGRAM frame.
    pub fn send_datagram(&self, payload: Bytes) -> Result<(), ClientError> {
        self.conn
            .send_datagram(payload)
            .map_err(|e| ClientError::Lost(e.to_string()))
    }

    /// Receives a payload DATAGRAM frame.
    pub async fn recv_datagram(&self) -> Result<Bytes, ClientError> {
        self.conn
            .read_datagram()
            .await
            .map_err(|e| ClientError::from_connection(&e))
    }

    /// Opens the large-payload stream towards the peer.
    pub async fn open_payload_stream(&self) -> Result<PayloadSender, ClientError> {
        let s = self
            .conn
            .open_uni()
            .await
            .map_err(|e| ClientError::from_connection(&e))?;
        Ok(PayloadSender { send: s })
    }

    /// Accepts the peer's large-payload stream (relayed).
    pub async fn accept_payload_stream(&self) -> Result<PayloadReceiver, ClientError> {
        let r = self
            .conn
            .accept_uni()
            .await
            .map_err(|e| ClientError::from_connection(&e))?;
        Ok(PayloadReceiver {
            recv: r,
            buf: Vec::new(),
        })
    }

    /// Closes the link politely and waits (bounded) for the relay to acknowledge.
    pub async fn close(mut self) {
        // Let what was written (an End, say) reach the relay before the connection goes: closing
        // a QUIC connection discards unsent stream data.
        if self.send.finish().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.send.stopped()).await;
        }
        self.conn
            .close(VarInt::from_u32(ErrorCode::Normal as u32), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

fn unexpected(m: RelayMsg) -> ClientError {
    match m {
        RelayMsg::Refused { code, .. } => ClientError::Refused { code },
        RelayMsg::ShuttingDown => ClientError::Closed {
            code: Some(ErrorCode::ShuttingDown),
            reason: ErrorCode::ShuttingDown.explain().into(),
        },
        other => ClientError::Protocol(format!("{other:?}")),
    }
}

async fn reader(conn: Connection, mut recv: RecvStream, tx: mpsc::Sender<Incoming>) {
    let mut header = [0u8; FRAME_HEADER];
    let err = |conn: &Connection| match conn.close_reason() {
        Some(e) => ClientError::from_connection(&e),
        None => ClientError::Lost("control stream closed by the relay".into()),
    };
    loop {
        if recv.read_exact(&mut header).await.is_err() {
            // Wait for the connection to finish closing so that the reason is known.
            let e = conn.closed().await;
            let _ = tx.send(Err(ClientError::from_connection(&e))).await;
            return;
        }
        let len = match frame_len(header, MAX_CONTROL_FRAME) {
            Ok(l) => l,
            Err(e) => {
                let _ = tx.send(Err(ClientError::Protocol(e.to_string()))).await;
                conn.close(
                    VarInt::from_u32(ErrorCode::Oversized as u32),
                    b"oversized frame",
                );
                return;
            }
        };
        let mut body = vec![0u8; len];
        if recv.read_exact(&mut body).await.is_err() {
            let _ = tx.send(Err(err(&conn))).await;
            return;
        }
        let msg = decode_body::<RelayMsg>(&body).map_err(|e| ClientError::Protocol(e.to_string()));
        let fatal = msg.is_err();
        if tx.send(msg).await.is_err() || fatal {
            return;
        }
    }
}

/// Writes length-prefixed payloads on the large-payload stream.
pub struct PayloadSender {
    send: SendStream,
}

impl PayloadSender {
    pub async fn send(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        if payload.len() > MAX_PAYLOAD_FRAME {
            return Err(ClientError::Protocol(format!(
                "payload of {} bytes exceeds {MAX_PAYLOAD_FRAME}",
                payload.len()
            )));
        }
        let len = (payload.len() as u32).to_be_bytes();
        self.send
            .write_all(&len)
            .await
            .map_err(|e| ClientError::Lost(e.to_string()))?;
        self.send
            .write_all(payload)
            .await
            .map_err(|e| ClientError::Lost(e.to_string()))
    }

    /// Sends raw bytes (tests of the relay's limits).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.send
            .write_all(bytes)
            .await
            .map_err(|e| ClientError::Lost(e.to_string()))
    }

    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}

/// Reads length-prefixed payloads from the peer's large-payload stream.
pub struct PayloadReceiver {
    recv: RecvStream,
    buf: Vec<u8>,
}

impl PayloadReceiver {
    /// The next payload, or `None` when the peer finished the stream.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, ClientError> {
        let mut header = [0u8; FRAME_HEADER];
        match self.recv.read_exact(&mut header).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(e) => return Err(ClientError::Lost(e.to_string())),
        }
        let len = frame_len(header, MAX_PAYLOAD_FRAME)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.buf.resize(len, 0);
        self.recv
            .read_exact(&mut self.buf)
            .await
            .map_err(|e| ClientError::Lost(e.to_string()))?;
        Ok(Some(Bytes::copy_from_slice(&self.buf)))
    }
}

/// How the terminal programs report what happens: one line of text per event for a person, or one
/// JSON object per line (`{"event": kind, "message": text, …}`) for scripts and tests.
#[derive(Clone, Copy, Debug)]
pub struct EventOut {
    pub json: bool,
}

impl EventOut {
    /// Prints one event; `extra` (a JSON object) adds fields in JSON mode.
    pub fn event(&self, kind: &str, text: &str, extra: serde_json::Value) {
        use std::io::Write;
        if self.json {
            let mut v = serde_json::json!({"event": kind, "message": text});
            if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
                o.extend(e);
            }
            println!("{v}");
        } else {
            println!("{text}");
        }
        let _ = std::io::stdout().flush();
    }
}
