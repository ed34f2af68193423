//! Setting a session up: the agent hosts a code and waits; the console joins with the code. Both run
//! the inner QUIC handshake through the relay, then the PAKE, then exchange `Hello`.

use crate::carrier::{Carrier, Fallback};
use crate::code::SessionCode;
use crate::inner::{self, close};
use crate::limit::{Gate, GuessLimit, Remembered, Tries};
use crate::pake::{
    AgentPake, Binding, ConsolePake, EXPORTER_LABEL, EXPORTER_LEN, PakeError, PakeMsg,
    RelayIdentity,
};
use crate::session::{
    ControlMsg, LinkCtx, OrgCheck, Parts, PeerInfo, Role, SESSION_VERSION, Session, SessionError,
    close_reason, end_of, read_frame, write_frame,
};
use quinn::{Connection, VarInt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tandem_client::{ClientError, ConnectOptions, RelayLink};
use tandem_proto::{EndReason, RelayMsg, ResumeToken, Secret, Slot};
use tokio::sync::Notify;

/// Placeholder addresses of the two ends on the virtual socket (never used on a network).
pub(crate) const AGENT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);
pub(crate) const CONSOLE_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 2);

/// Settings of a session, the same on both sides.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub fallback: Fallback,
    /// e.g. `tandem-agent 0.1.0`
    pub software: String,
    pub capabilities: Vec<String>,
    /// Bound on joining: inner handshake + PAKE + hello.
    pub setup_timeout: Duration,
    /// How long to try to resume a lost relay link (match the relay's `resume_grace_secs`).
    pub resume_grace: Duration,
    /// Agent: how many failed handshakes it allows, and the pauses between them.
    pub guesses: GuessLimit,
    /// Agent: the organisation it trusts and the newest revocation list seen (none: every
    /// technician is "not verified").
    pub trust: Option<Arc<std::sync::Mutex<tandem_org::TrustStore>>>,
    /// Agent: refuse technicians the organisation's key does not verify.
    pub require_verified: bool,
    /// Console: the technician's certificate and key, proven to the agent in every session.
    pub credentials: Option<Arc<tandem_org::Credentials>>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            fallback: Fallback::default(),
            software: format!("tandem-session {}", env!("CARGO_PKG_VERSION")),
            capabilities: vec![],
            setup_timeout: Duration::from_secs(15),
            resume_grace: Duration::from_secs(15),
            guesses: GuessLimit::default(),
            trust: None,
            require_verified: false,
            credentials: None,
        }
    }
}

/// Why the agent shows a (new) code, or none for a while.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CodeChange {
    /// The first code of this host, or the next after a session.
    New,
    /// Someone tried the code with a wrong secret: it was burned.
    WrongCode,
    /// Nobody joined in time.
    Expired,
    /// A technician joined but the session could not be set up; the code was burned to be safe.
    SetupFailed(String),
    /// The user asked for a new code after the agent stopped showing codes.
    Requested,
    /// Attempts failed before this program was restarted; their count goes on.
    Remembered,
    /// The connection to the relay was lost (the relay node stopped or the network dropped) and
    /// this code comes from the relay reached again (another node of a cluster, perhaps): the
    /// old code is gone with the old connection.
    RelayLost,
}

/// What the agent's host reports.
#[derive(Debug)]
pub enum AgentEvent {
    /// Show this code to the user (replacing any earlier one).
    Code {
        code: SessionCode,
        expires_in: Duration,
        why: CodeChange,
    },
    /// A technician joined the code through the relay; the end-to-end handshake runs next. The
    /// names are as the relay reports them (see [`crate::names`] before showing them).
    Joining {
        technician: String,
        organisation: String,
    },
    /// The end-to-end session is confirmed. Nothing has been shown or allowed yet: consent is the
    /// application's next step.
    Session(Box<Session>),
    /// A handshake failed (`why`): the code is burned and no code is shown for `pause`; the next
    /// [`AgentHost::next`] returns the new code when the pause is over.
    Paused {
        why: CodeChange,
        failures: u32,
        pause: Duration,
    },
    /// Handshakes failed `failures` times in a row: no code is shown until the user asks for one
    /// ([`CodeRequester::request`]). Someone may be guessing.
    Locked { why: CodeChange, failures: u32 },
}

/// Lets the user ask for a new code after the agent stopped showing codes, from another task while
/// [`AgentHost::next`] waits. A request counts only while codes are stopped.
#[derive(Clone, Debug, Default)]
pub struct CodeRequester(Arc<(AtomicBool, Notify)>);

impl CodeRequester {
    pub fn request(&self) {
        self.0.0.store(true, Ordering::SeqCst);
        self.0.1.notify_one();
    }
    fn take(&self) -> bool {
        self.0.0.swap(false, Ordering::SeqCst)
    }
    async fn wait(&self) {
        self.0.1.notified().await;
    }
}

/// The agent side: holds a code on the relay and turns joins into confirmed sessions.
///
/// Every call of [`AgentHost::next`] may be cancelled (dropped in a `select!`) at any point without
/// weakening the one-try rule: the code and the relay link are taken out of the host before a
/// handshake starts and the attempt is counted as failed until it is confirmed, so an interrupted
/// handshake leaves its code burned and its failure counted.
pub struct AgentHost {
    opts: ConnectOptions,
    cfg: SessionConfig,
    link: Option<RelayLink>,
    code: Option<SessionCode>,
    pending: Option<(String, String, ResumeToken)>,
    next_why: CodeChange,
    tries: Tries,
    /// Whether the current pause or lock was reported.
    announced: bool,
    requests: CodeRequester,
    /// When the relay link was last lost while a code showed, and the wait before reconnecting
    /// that loss got.
    last_loss: Option<Instant>,
    loss_pause: Duration,
}

impl AgentHost {
    /// Connects to the relay. The first [`AgentHost::next`] returns the first code.
    pub async fn connect(
        opts: ConnectOptions,
        cfg: SessionConfig,
    ) -> Result<AgentHost, SessionError> {
        let link = RelayLink::connect(&opts).await?;
        Ok(AgentHost {
            opts,
            tries: Tries::new(cfg.guesses),
            cfg,
            link: Some(link),
            last_loss: None,
            loss_pause: Duration::ZERO,
            code: None,
            pending: None,
            next_why: CodeChange::New,
            announced: false,
            requests: CodeRequester::default(),
        })
    }

    /// The code currently shown, if any.
    pub fn code(&self) -> Option<&SessionCode> {
        self.code.as_ref()
    }

    /// Failed handshakes since the last confirmed session.
    pub fn failures(&self) -> u32 {
        self.tries.failures()
    }

    /// A handle the user interface keeps to ask for a new code once codes have stopped.
    pub fn code_requester(&self) -> CodeRequester {
        self.requests.clone()
    }

    /// The count of failed attempts, to keep across restarts (save it after each event).
    pub fn remembered(&self) -> Remembered {
        self.tries.remembered()
    }

    /// Takes up the count an earlier run of the agent kept: a lock or pause then goes on before the
    /// first code. Call it right after [`AgentHost::connect`].
    pub fn restore(&mut self, r: Remembered) {
        self.tries
            .restore(r, std::time::SystemTime::now(), Instant::now());
        if self.tries.failures() > 0 {
            self.next_why = CodeChange::Remembered;
        }
    }

    async fn new_code(&mut self, why: CodeChange) -> Result<AgentEvent, SessionError> {
        let link = match &mut self.link {
            Some(l) => l,
            None => self.link.insert(RelayLink::connect(&self.opts).await?),
        };
        let (slot, expires_in) = link.register().await?;
        let code = SessionCode::generate(slot).map_err(|e| SessionError::Setup(e.to_string()))?;
        self.code = Some(code.clone());
        self.announced = false;
        Ok(AgentEvent::Code {
            code,
            expires_in,
            why,
        })
    }

    /// What the user is told while no code is shown.
    fn notice(&mut self, gate: Gate) -> Option<AgentEvent> {
        if self.announced {
            return None;
        }
        let why = self.next_why.clone();
        let failures = self.tries.failures();
        let ev = match gate {
            Gate::Open => return None,
            Gate::Until(t) => AgentEvent::Paused {
                why,
                failures,
                pause: t.saturating_duration_since(Instant::now()),
            },
            Gate::Locked => AgentEvent::Locked { why, failures },
        };
        self.announced = true;
        Some(ev)
    }

    /// The next thing to show or do. Call it in a loop; it returns after each step, and may be
    /// cancelled at any point.
    pub async fn next(&mut self) -> Result<AgentEvent, SessionError> {
        loop {
            let gate = self.tries.gate(Instant::now());
            if gate == Gate::Locked && self.requests.take() {
                self.tries.user_asked();
                self.next_why = CodeChange::Requested;
                continue;
            }
            if let Some(ev) = self.notice(gate) {
                return Ok(ev);
            }
            if gate != Gate::Open
                && self.code.is_none()
                && let Some(link) = self.link.take()
            {
                // No code for a while: leave the relay meanwhile (it would close an idle,
                // unregistered connection anyway); the next code connects again.
                link.close().await;
            }
            match gate {
                Gate::Open => break,
                Gate::Until(t) => tokio::time::sleep_until(t.into()).await,
                Gate::Locked => self.requests.wait().await,
            }
        }
        if self.link.is_none() || self.code.is_none() {
            let why = std::mem::replace(&mut self.next_why, CodeChange::New);
            return self.new_code(why).await;
        }
        if let Some((technician, organisation, token)) = self.pending.take() {
            return self.handshake(technician, organisation, token).await;
        }
        let link = self
            .link
            .as_mut()
            .ok_or_else(|| SessionError::Setup("no relay link".into()))?;
        loop {
            let msg = match link.recv().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "lost the relay while showing a code; getting a new one");
                    return self.code_after_loss().await;
                }
            };
            match msg {
                RelayMsg::Paired {
                    technician,
                    organisation,
                    resume,
                } => {
                    self.pending = Some((technician.clone(), organisation.clone(), resume));
                    return Ok(AgentEvent::Joining {
                        technician,
                        organisation,
                    });
                }
                RelayMsg::SlotExpired { .. } => return self.new_code(CodeChange::Expired).await,
                RelayMsg::Revocation { list } => {
                    offer_revocation(&self.cfg, &list);
                    persist_trust(&self.cfg);
                    continue;
                }
                // The relay node drains (a restart, an update): another node of a cluster, or the
                // same one back, gives a new code.
                RelayMsg::ShuttingDown => {
                    tracing::info!("the relay is shutting down; getting a new code");
                    return self.code_after_loss().await;
                }
                _ => continue,
            }
        }
    }

    /// After the relay link was lost while a code showed: the code is gone with it; connects again
    /// (any node of the list) and registers, trying for about a minute before giving up.
    async fn code_after_loss(&mut self) -> Result<AgentEvent, SessionError> {
        const TRIES: u32 = 8;
        if let Some(link) = self.link.take() {
            link.close().await;
        }
        self.code = None;
        // A relay that drops the agent again and again (right after each code) is not dialled
        // in a tight loop: losses close together wait longer and longer, up to 30 s.
        let now = Instant::now();
        self.loss_pause = match self.last_loss {
            Some(t) if now.duration_since(t) < Duration::from_secs(60) => {
                (self.loss_pause * 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
            }
            _ => Duration::ZERO,
        };
        self.last_loss = Some(now);
        tokio::time::sleep(self.loss_pause).await;
        let mut pause = Duration::from_millis(500);
        let mut tries = 0;
        loop {
            match self.new_code(CodeChange::RelayLost).await {
                Ok(ev) => return Ok(ev),
                Err(e) if tries < TRIES => {
                    tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "no relay answers yet");
                    self.link = None;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(10));
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn handshake(
        &mut self,
        technician: String,
        organisation: String,
        token: ResumeToken,
    ) -> Result<AgentEvent, SessionError> {
        // Burn first: the code and the link leave the host, and the attempt counts as failed, before
        // anything is sent. Only a confirmed session undoes the count. If this future is dropped
        // halfway, the code is gone and the failure counted.
        let (Some(code), Some(mut link)) = (self.code.take(), self.link.take()) else {
            return Err(SessionError::Setup("no code or relay link".into()));
        };
        self.tries
            .failed(Instant::now(), std::time::SystemTime::now());
        self.next_why = CodeChange::SetupFailed("the handshake was interrupted".into());
        self.announced = false;
        // A request for a new code made before this failure does not lift a lock it causes.
        self.requests.take();
        let inner = AgentInner::open(&self.cfg, &link)?;
        let cfg = self.cfg.clone();
        let who = RelayIdentity {
            technician: technician.clone(),
            organisation: organisation.clone(),
        };
        // While the handshake runs, the relay may report that the console gave up (for example it
        // found the code wrong and left before its inner close could arrive).
        let outcome = inner
            .confirm(&mut link, self.cfg.setup_timeout, async |conn| {
                agent_pake(conn, &code, &who, &cfg).await
            })
            .await;
        let failure = match outcome {
            Ok((conn, Ok(confirmed))) => {
                self.tries.succeeded();
                self.next_why = CodeChange::New;
                tracing::info!("session confirmed");
                let link = LinkCtx {
                    link,
                    opts: self.opts.clone(),
                    token,
                    grace: self.cfg.resume_grace,
                };
                let who = RelayIdentity {
                    technician,
                    organisation,
                };
                return Ok(AgentEvent::Session(Box::new(
                    inner.start(conn, confirmed, who, link),
                )));
            }
            Ok((conn, Err(e))) => {
                // The console may have closed the connection because it found the code wrong
                // (before its `Fail` could be read): its close reason is the truth.
                let e = match conn.close_reason() {
                    Some(c) if end_of(&c).reason == EndReason::WrongCode => SessionError::WrongCode,
                    _ => e,
                };
                let (code, reason) = match &e {
                    SessionError::WrongCode => (close::WRONG_CODE, EndReason::WrongCode),
                    other => (close::PROTOCOL, EndReason::Other(other.to_string())),
                };
                conn.close(VarInt::from_u32(code), &close_reason(&reason));
                e
            }
            Err(e) => e,
        };
        // Whatever went wrong after a technician joined, the code is burned: one try per code.
        inner.close();
        let why = match failure {
            SessionError::WrongCode => {
                tracing::warn!(
                    failures = self.tries.failures(),
                    "a technician tried this code with a wrong secret; the code is burned"
                );
                CodeChange::WrongCode
            }
            other => {
                tracing::warn!(error = %other, failures = self.tries.failures(), "session setup failed; the code is burned");
                CodeChange::SetupFailed(other.to_string())
            }
        };
        let reason = if why == CodeChange::WrongCode {
            EndReason::WrongCode
        } else {
            EndReason::Other("session setup failed".into())
        };
        self.next_why = why;
        // Tell the relay, then leave it: no code, and so no pairing, until the pause is over.
        let _ = link.end(reason).await;
        link.close().await;
        let gate = self.tries.gate(Instant::now());
        if gate == Gate::Locked {
            // Only a request made after the user was told of the lock lifts it.
            self.requests.take();
        }
        match self.notice(gate) {
            Some(ev) => Ok(ev),
            // The pause is already over (a zero pause): the next code at once.
            None => {
                let why = std::mem::replace(&mut self.next_why, CodeChange::New);
                self.new_code(why).await
            }
        }
    }
}

/// The agent's end of the inner connection: a carrier on the relay link and an endpoint that takes
/// the console's one connection.
pub(crate) struct AgentInner {
    carrier: Arc<Carrier>,
    endpoint: quinn::Endpoint,
}

impl AgentInner {
    pub(crate) fn open(cfg: &SessionConfig, link: &RelayLink) -> Result<AgentInner, SessionError> {
        let carrier = Carrier::new(cfg.fallback);
        carrier.attach(link.connection().clone(), link.channel());
        let socket = carrier
            .socket(AGENT_ADDR, CONSOLE_ADDR)
            .ok_or_else(|| SessionError::Setup("carrier already in use".into()))?;
        let endpoint = inner::agent_endpoint(socket)?;
        Ok(AgentInner { carrier, endpoint })
    }

    /// The console's inner connection (the only one accepted).
    pub(crate) async fn accept(&self) -> Result<Connection, SessionError> {
        let incoming = self
            .endpoint
            .accept()
            .await
            .ok_or_else(|| SessionError::Setup("inner endpoint closed".into()))?;
        inner::stop_accepting(&self.endpoint);
        incoming
            .await
            .map_err(|e| SessionError::Setup(format!("inner handshake: {e}")))
    }

    /// Runs `handshake` on the console's inner connection, bounded by `timeout`, while watching
    /// the relay link for the console giving up. The connection (to close on failure) and the
    /// handshake's result.
    pub(crate) async fn confirm(
        &self,
        link: &mut RelayLink,
        timeout: Duration,
        handshake: impl AsyncFnOnce(&Connection) -> Result<Confirmed, SessionError>,
    ) -> Result<(Connection, Result<Confirmed, SessionError>), SessionError> {
        let setup = async {
            let conn = self.accept().await?;
            let r = handshake(&conn).await;
            Ok::<_, SessionError>((conn, r))
        };
        tokio::time::timeout(timeout, async {
            tokio::select! {
                r = setup => r,
                e = watch_setup_link(link) => Err(e),
            }
        })
        .await
        .unwrap_or_else(|_| {
            Err(SessionError::Setup(
                "the technician's side did not complete the handshake in time".into(),
            ))
        })
    }

    /// The confirmed session; `who` as the relay named the technician.
    pub(crate) fn start(
        self,
        conn: Connection,
        confirmed: Confirmed,
        who: RelayIdentity,
        link: LinkCtx,
    ) -> Session {
        confirmed_session(
            Role::Agent,
            conn,
            confirmed,
            who,
            self.carrier,
            self.endpoint,
            link,
        )
    }

    /// Gives up: the endpoint closes and the carrier detaches.
    pub(crate) fn close(self) {
        self.endpoint
            .close(VarInt::from_u32(close::PROTOCOL), b"setup failed");
    }
}

/// A session both sides confirmed, on either side; `who` as the relay named the technician.
fn confirmed_session(
    role: Role,
    conn: Connection,
    confirmed: Confirmed,
    who: RelayIdentity,
    carrier: Arc<Carrier>,
    endpoint: quinn::Endpoint,
    link: LinkCtx,
) -> Session {
    let (ctl_send, ctl_recv, hello, session_key, org, device) = confirmed;
    Session::start(Parts {
        role,
        conn,
        ctl_send,
        ctl_recv,
        peer: PeerInfo {
            software: hello.software,
            capabilities: hello.capabilities,
            version: hello.version,
            technician: Some(who.technician),
            organisation: Some(who.organisation),
            org,
            device,
        },
        carrier,
        endpoint,
        link,
        session_key,
    })
}

/// A revocation list the relay carried: kept if the organisation signed it and it is newer.
pub(crate) fn offer_revocation(cfg: &SessionConfig, text: &str) {
    let Some(trust) = &cfg.trust else {
        return;
    };
    let mut trust = trust.lock().unwrap_or_else(|e| e.into_inner());
    match tandem_org::RevocationList::from_text(text).and_then(|l| trust.offer(&l)) {
        Ok(tandem_org::Offered::Newer(serial)) => {
            tracing::info!(serial, "a newer revocation list came through the relay")
        }
        Ok(tandem_org::Offered::Older { offered, kept }) => {
            tracing::warn!(
                offered,
                kept,
                "the relay sent an older revocation list; ignored"
            )
        }
        Ok(tandem_org::Offered::Same) => {}
        Err(e) => tracing::warn!(error = %e, "ignoring the relay's revocation list"),
    }
}

/// Writes a newer revocation list the trust store took to its file: off the async executor and
/// outside the store's lock.
pub(crate) fn persist_trust(cfg: &SessionConfig) {
    let unsaved = cfg
        .trust
        .as_ref()
        .and_then(|t| t.lock().unwrap_or_else(|e| e.into_inner()).take_unsaved());
    if let Some(u) = unsaved {
        tokio::task::spawn_blocking(move || u.write());
    }
}

pub(crate) struct PeerHello {
    pub(crate) software: String,
    pub(crate) capabilities: Vec<String>,
    pub(crate) version: u16,
}

pub(crate) type Confirmed = (
    quinn::SendStream,
    quinn::RecvStream,
    PeerHello,
    [u8; 32],
    OrgCheck,
    Option<tandem_org::DeviceBody>,
);

fn binding(conn: &Connection, slot: &Slot, who: &RelayIdentity) -> Result<Binding, SessionError> {
    let mut exporter = [0u8; EXPORTER_LEN];
    conn.export_keying_material(&mut exporter, EXPORTER_LABEL, slot.as_str().as_bytes())
        .map_err(|_| SessionError::Setup("TLS exporter unavailable".into()))?;
    Ok(Binding {
        slot: slot.clone(),
        who: who.clone(),
        exporter,
    })
}

pub(crate) fn hello(cfg: &SessionConfig) -> ControlMsg {
    ControlMsg::Hello {
        version: SESSION_VERSION,
        software: cfg.software.clone(),
        capabilities: {
            let mut c = cfg.capabilities.clone();
            c.push(crate::session::CAP_DIRECT.into());
            c
        },
    }
}

pub(crate) async fn read_hello(recv: &mut quinn::RecvStream) -> Result<PeerHello, SessionError> {
    match read_frame::<ControlMsg>(recv).await? {
        ControlMsg::Hello { version, .. } if version != SESSION_VERSION => {
            Err(SessionError::Protocol(format!(
                "the other side speaks session protocol {version}, this side {SESSION_VERSION}: \
                 update Tandem on both sides"
            )))
        }
        ControlMsg::Hello {
            version,
            software,
            capabilities,
        } => Ok(PeerHello {
            software,
            capabilities,
            version,
        }),
        other => Err(SessionError::Protocol(format!(
            "expected Hello first, got {other:?}"
        ))),
    }
}

/// Tells the peer the PAKE failed and waits (bounded) until it has read that, so that it learns
/// "wrong code" rather than a broken connection.
pub(crate) async fn send_fail(send: &mut quinn::SendStream) {
    if write_frame(send, &PakeMsg::Fail).await.is_ok() && send.finish().is_ok() {
        let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    }
}

fn pake_err(e: PakeError) -> SessionError {
    match e {
        PakeError::WrongCode => SessionError::WrongCode,
        other => SessionError::Protocol(other.to_string()),
    }
}

/// During setup: waits for the relay to report the end of the pairing, and says why.
pub(crate) async fn watch_setup_link(link: &mut RelayLink) -> SessionError {
    loop {
        match link.recv().await {
            Ok(RelayMsg::SessionEnded {
                reason: EndReason::WrongCode,
            }) => return SessionError::WrongCode,
            Ok(RelayMsg::SessionEnded { reason }) => {
                return SessionError::Setup(format!("the other side left: {reason}"));
            }
            Ok(_) => continue,
            Err(e) => return SessionError::Relay(e),
        }
    }
}

async fn agent_pake(
    conn: &Connection,
    code: &SessionCode,
    who: &RelayIdentity,
    cfg: &SessionConfig,
) -> Result<Confirmed, SessionError> {
    let b = binding(conn, code.slot(), who)?;
    // The first stream the console opens carries the PAKE, then the control channel. Nothing else
    // is accepted before the PAKE succeeded.
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| SessionError::Setup(e.to_string()))?;
    let start: PakeMsg = read_frame(&mut recv).await?;
    let (pake, reply) = match AgentPake::respond(code.secret(), b, start) {
        Ok(x) => x,
        Err(e) => {
            send_fail(&mut send).await;
            return Err(pake_err(e));
        }
    };
    write_frame(&mut send, &reply).await?;
    let confirm: PakeMsg = read_frame(&mut recv).await?;
    let key = pake.finish(confirm).map_err(pake_err)?.session_key;
    write_frame(&mut send, &hello(cfg)).await?;
    let nonce = tandem_org::challenge().map_err(|e| SessionError::Setup(e.to_string()))?;
    write_frame(
        &mut send,
        &ControlMsg::OrgChallenge {
            nonce: nonce.to_vec(),
        },
    )
    .await?;
    let peer = read_hello(&mut recv).await?;
    let org = match read_frame::<ControlMsg>(&mut recv).await? {
        ControlMsg::OrgCredentials {
            cert,
            proof,
            revocation,
        } => {
            let exporter = org_exporter(conn, code.slot())?;
            let org = check_org(cfg, &exporter, &nonce, cert, &proof, revocation);
            persist_trust(cfg);
            org
        }
        other => {
            return Err(SessionError::Protocol(format!(
                "expected the organisation credentials, got {other:?}"
            )));
        }
    };
    let (verified, detail) = match &org {
        OrgCheck::Verified(v) => (
            true,
            format!(
                "{} of {} (certificate {})",
                v.technician, v.organisation, v.cert_id
            ),
        ),
        OrgCheck::NotVerified(why) => (false, why.clone()),
        OrgCheck::AcceptedByAgent => (true, String::new()),
    };
    let refused = !verified && cfg.require_verified;
    write_frame(
        &mut send,
        &ControlMsg::OrgVerdict {
            verified,
            refused,
            detail: detail.clone(),
        },
    )
    .await?;
    if refused {
        // Bounded: the console reads the verdict, then the connection closes with the reason.
        let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
        return Err(SessionError::Unverified(detail));
    }
    Ok((send, recv, peer, key, org, None))
}

/// The exporter the organisation proof is bound to (distinct from the PAKE's).
fn org_exporter(conn: &Connection, slot: &Slot) -> Result<[u8; 32], SessionError> {
    let mut exporter = [0u8; 32];
    conn.export_keying_material(
        &mut exporter,
        tandem_org::EXPORTER_LABEL,
        slot.as_str().as_bytes(),
    )
    .map_err(|_| SessionError::Setup("TLS exporter unavailable".into()))?;
    Ok(exporter)
}

/// The agent's check of the console's credentials: pure but for the trust store's file.
pub(crate) fn check_org(
    cfg: &SessionConfig,
    exporter: &[u8; 32],
    nonce: &[u8; tandem_org::CHALLENGE_LEN],
    cert: Option<String>,
    proof: &[u8],
    revocation: Option<String>,
) -> OrgCheck {
    let Some(trust) = &cfg.trust else {
        return OrgCheck::NotVerified(tandem_org::Unverified::NoTrust.to_string());
    };
    let mut trust = trust.lock().unwrap_or_else(|e| e.into_inner());
    // A newer revocation list from the console is taken first (it can only revoke more).
    if let Some(text) = revocation {
        match tandem_org::RevocationList::from_text(&text).and_then(|l| trust.offer(&l)) {
            Ok(tandem_org::Offered::Newer(serial)) => {
                tracing::info!(serial, "a newer revocation list came with the technician")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "ignoring the technician's revocation list"),
        }
    }
    let Some(cert) = cert else {
        return OrgCheck::NotVerified(tandem_org::Unverified::NoCertificate.to_string());
    };
    let result = tandem_org::Certificate::from_text(&cert)
        .map_err(|e| tandem_org::Unverified::Malformed(e.to_string()))
        .and_then(|c| trust.verify(&c, proof, exporter, nonce, tandem_org::unix_now()));
    match result {
        Ok(v) => {
            tracing::info!(
                technician = %v.technician,
                certificate = %v.cert_id,
                key = %v.key,
                permissions = %v.permissions,
                "technician verified by the organisation's key"
            );
            OrgCheck::Verified(v)
        }
        Err(why) => {
            tracing::warn!(reason = %why, "technician not verified");
            OrgCheck::NotVerified(why.to_string())
        }
    }
}

/// Most redirects a join follows: a relay cluster sends a console once, to the node holding the
/// code; more would mean the nodes disagree, and the console stops rather than go round.
const MAX_REDIRECTS: usize = 2;

/// A console's link, logged in.
pub(crate) type LoggedIn = Result<(RelayLink, RelayIdentity), ClientError>;

pub(crate) async fn log_in(node: ConnectOptions, token: Secret) -> LoggedIn {
    let mut link = RelayLink::connect(&node).await?;
    let (technician, organisation) = link.authenticate(&token).await?;
    Ok((
        link,
        RelayIdentity {
            technician,
            organisation,
        },
    ))
}

/// The console side: joins the agent holding `code`, authenticated as `token`. When the relay is
/// a cluster and the agent waits on another node, the console follows the relay's redirect by
/// itself: it connects to that node (trusting it exactly as the first: same pin or CA), logs in
/// and joins there. Given the cluster's nodes ([`ConnectOptions::alternates`]), it logs in on the
/// others at the same time as on the first, so that a redirect finds its node's link ready: the
/// join then takes one connect and login, not two in a row (the spare links are closed).
pub async fn join(
    opts: &ConnectOptions,
    token: &Secret,
    code: &SessionCode,
    cfg: &SessionConfig,
) -> Result<Session, SessionError> {
    let mut spare: std::collections::HashMap<String, tokio::task::JoinHandle<LoggedIn>> = opts
        .alternates
        .iter()
        .map(|a| {
            let task = tokio::spawn(log_in(opts.for_node(a), token.clone()));
            (a.to_ascii_lowercase(), task)
        })
        .collect();
    let result = join_following(opts, token, code, cfg, &mut spare).await;
    for (_, task) in spare {
        task.abort();
    }
    result
}

async fn join_following(
    opts: &ConnectOptions,
    token: &Secret,
    code: &SessionCode,
    cfg: &SessionConfig,
    spare: &mut std::collections::HashMap<String, tokio::task::JoinHandle<LoggedIn>>,
) -> Result<Session, SessionError> {
    let mut node = opts.clone();
    let mut ready: Option<(RelayLink, RelayIdentity)> = None;
    for hop in 0..=MAX_REDIRECTS {
        let (mut link, who) = match ready.take() {
            Some(x) => x,
            None => log_in(node.clone(), token.clone()).await?,
        };
        match link.join(code.slot()).await {
            Ok(resume) => {
                return console_setup(link, &who, &node, resume, cfg, ConsoleMode::Code(code))
                    .await;
            }
            Err(ClientError::Redirected { relay }) if !opts.accepts_redirect(&relay) => {
                link.close().await;
                return Err(SessionError::Setup(format!(
                    "the relay sent this console to {relay:?}, which is not one of the relay \
                     addresses it was given; with a relay trusted by its CA, give every node \
                     (--relay node1:4433,node2:4433,…)"
                )));
            }
            Err(ClientError::Redirected { relay }) if hop < MAX_REDIRECTS => {
                tracing::info!(%relay, "the code waits on another relay node; connecting there");
                // Closed in the background: a graceful close waits for the relay's goodbye.
                tokio::spawn(link.close());
                node = opts.for_node(&relay);
                if let Some(task) = spare.remove(&relay.to_ascii_lowercase())
                    && let Ok(Ok(x)) = task.await
                {
                    ready = Some(x);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(SessionError::Setup(
        "the relay's nodes kept sending this console elsewhere; tell the relay's administrator"
            .into(),
    ))
}

/// Like [`join`], on an already authenticated relay link; `who` is what the relay answered to the
/// authentication (the agent must have been told the same, or the PAKE fails).
pub async fn join_on(
    mut link: RelayLink,
    who: &RelayIdentity,
    opts: &ConnectOptions,
    code: &SessionCode,
    cfg: &SessionConfig,
) -> Result<Session, SessionError> {
    let token = link.join(code.slot()).await?;
    console_setup(link, who, opts, token, cfg, ConsoleMode::Code(code)).await
}

/// What the console proves itself with, and what it expects of the agent.
pub(crate) enum ConsoleMode<'a> {
    /// Attended: the PAKE over the code's secret.
    Code(&'a SessionCode),
    /// Unattended: the enrolled device `device`, proven by its key; `revocation`, the list the
    /// relay carried (checked and used if newer than the console's own).
    Device {
        device: &'a str,
        revocation: Option<&'a str>,
    },
}

/// The console's side of a pairing the relay confirmed (`token` resumes it): the inner handshake
/// through the relay, then the PAKE or the device proof, then `Hello`.
pub(crate) async fn console_setup(
    mut link: RelayLink,
    who: &RelayIdentity,
    opts: &ConnectOptions,
    token: ResumeToken,
    cfg: &SessionConfig,
    mode: ConsoleMode<'_>,
) -> Result<Session, SessionError> {
    let carrier = Carrier::new(cfg.fallback);
    carrier.attach(link.connection().clone(), link.channel());
    let socket = carrier
        .socket(CONSOLE_ADDR, AGENT_ADDR)
        .ok_or_else(|| SessionError::Setup("carrier already in use".into()))?;
    let endpoint = inner::console_endpoint(socket)?;
    let setup = async {
        let conn = endpoint
            .connect(AGENT_ADDR, inner::SERVER_NAME)
            .map_err(|e| SessionError::Setup(e.to_string()))?
            .await
            .map_err(|e| match end_of(&e).reason {
                EndReason::WrongCode => SessionError::WrongCode,
                _ => SessionError::Setup(format!("inner handshake: {e}")),
            })?;
        let r = match mode {
            ConsoleMode::Code(code) => console_pake(&conn, code, who, cfg).await,
            ConsoleMode::Device { device, revocation } => {
                crate::unattended::console_handshake(&conn, device, revocation, cfg).await
            }
        };
        Ok::<_, SessionError>((conn, r))
    };
    let res = tokio::time::timeout(cfg.setup_timeout, async {
        tokio::select! {
            r = setup => r,
            e = watch_setup_link(&mut link) => Err(e),
        }
    })
    .await;
    let (conn, r) = match res {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            let _ = link
                .end(EndReason::Other("session setup failed".into()))
                .await;
            link.close().await;
            return Err(e);
        }
        Err(_) => {
            let _ = link
                .end(EndReason::Other("session setup timed out".into()))
                .await;
            link.close().await;
            return Err(SessionError::Setup(
                "the agent did not complete the handshake in time".into(),
            ));
        }
    };
    match r {
        Ok(confirmed) => Ok(confirmed_session(
            Role::Console,
            conn,
            confirmed,
            who.clone(),
            carrier,
            endpoint,
            LinkCtx {
                link,
                opts: opts.clone(),
                token,
                grace: cfg.resume_grace,
            },
        )),
        Err(e) => {
            // If the agent closed the connection, its reason is the truth (e.g. wrong code).
            let e = match (&e, conn.close_reason()) {
                (_, Some(c)) if end_of(&c).reason == EndReason::WrongCode => {
                    SessionError::WrongCode
                }
                _ => e,
            };
            let reason = match e {
                SessionError::WrongCode => EndReason::WrongCode,
                _ => EndReason::Other("session setup failed".into()),
            };
            let code = if reason == EndReason::WrongCode {
                close::WRONG_CODE
            } else {
                close::PROTOCOL
            };
            conn.close(VarInt::from_u32(code), &close_reason(&reason));
            let _ = link.end(reason).await;
            link.close().await;
            Err(e)
        }
    }
}

async fn console_pake(
    conn: &Connection,
    code: &SessionCode,
    who: &RelayIdentity,
    cfg: &SessionConfig,
) -> Result<Confirmed, SessionError> {
    let b = binding(conn, code.slot(), who)?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| SessionError::Setup(e.to_string()))?;
    let (pake, start) = ConsolePake::start(code.secret(), b);
    write_frame(&mut send, &start).await?;
    let reply: PakeMsg = read_frame(&mut recv).await?;
    let (confirmed, confirm) = match pake.finish(reply) {
        Ok(x) => x,
        Err(e) => {
            send_fail(&mut send).await;
            return Err(pake_err(e));
        }
    };
    write_frame(&mut send, &confirm).await?;
    write_frame(&mut send, &hello(cfg)).await?;
    let peer = read_hello(&mut recv).await?;
    let nonce: [u8; tandem_org::CHALLENGE_LEN] = match read_frame::<ControlMsg>(&mut recv).await? {
        ControlMsg::OrgChallenge { nonce } => nonce
            .try_into()
            .map_err(|_| SessionError::Protocol("bad organisation challenge".into()))?,
        other => {
            return Err(SessionError::Protocol(format!(
                "expected the organisation challenge, got {other:?}"
            )));
        }
    };
    let creds = match &cfg.credentials {
        Some(c) => {
            let exporter = org_exporter(conn, code.slot())?;
            ControlMsg::OrgCredentials {
                cert: Some(c.cert.to_text()),
                proof: tandem_org::prove(&c.key, &c.cert, &exporter, &nonce),
                revocation: c.revocation.as_ref().map(|r| r.to_text()),
            }
        }
        None => ControlMsg::OrgCredentials {
            cert: None,
            proof: Vec::new(),
            revocation: None,
        },
    };
    write_frame(&mut send, &creds).await?;
    let org = match read_frame::<ControlMsg>(&mut recv).await? {
        ControlMsg::OrgVerdict {
            refused: true,
            detail,
            ..
        } => {
            return Err(SessionError::Unverified(detail));
        }
        ControlMsg::OrgVerdict { verified: true, .. } => OrgCheck::AcceptedByAgent,
        ControlMsg::OrgVerdict { detail, .. } => OrgCheck::NotVerified(detail),
        other => {
            return Err(SessionError::Protocol(format!(
                "expected the organisation verdict, got {other:?}"
            )));
        }
    };
    Ok((send, recv, peer, confirmed.session_key, org, None))
}
