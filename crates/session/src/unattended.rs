//! Unattended sessions: a technician reaches an enrolled computer without a code.
//!
//! There is no code and so no PAKE. The inner TLS connection (fresh keys, through the relay) is
//! authenticated instead by two signatures over its exporter, each with a fresh challenge from the
//! other side:
//!
//! 1. console → agent: `Hello`, then `DeviceChallenge { device, nonce }`;
//! 2. agent → console: `Hello`, `DeviceProof` (its device certificate, and the device key's
//!    signature over the exporter, the nonce and the certificate), then `OrgChallenge`;
//! 3. the console checks the device: enrolled by its organisation, the one it asked for, not
//!    revoked, holding the device key on this very connection ([`tandem_org::check_device`]);
//! 4. console → agent: `OrgCredentials` (certificate, proof over the exporter and the challenge);
//! 5. the agent checks the technician ([`tandem_org::TrustStore::verify`]), the `unattended`
//!    permission for its device group ([`tandem_org::allows_unattended`]) and its own local policy
//!    ([`UnattendedPolicy`]); it answers `OrgVerdict`, and refuses anything short of all three.
//!
//! A relay in the middle terminates two TLS connections with two exporters: neither proof it
//! relays verifies on the other connection, and it holds neither key. A captured proof is worthless
//! later: the exporter and the challenge are new every time. What the user is asked, and the
//! banner, are the application's (the [`Session`] is confirmed here, nothing is shown yet).

use crate::inner::close;
use crate::pake::RelayIdentity;
use crate::session::{
    ControlMsg, LinkCtx, OrgCheck, Session, SessionError, close_reason, read_frame, write_frame,
};
use crate::setup::{
    AgentInner, Confirmed, ConsoleMode, SessionConfig, check_org, console_setup, hello,
    offer_revocation, persist_trust, read_hello,
};
use quinn::{Connection, VarInt};
use std::sync::Arc;
use tandem_client::{ClientError, ConnectOptions, RelayLink};
use tandem_org::{CheckedDevice, Credentials, DeviceEntry, Enrollment, OrgPublic, RevocationBody};
use tandem_proto::{DeviceListing, EndReason, ErrorCode, RelayMsg, ResumeToken, Secret};

/// Label of the session key of an unattended session (both sides derive it from the exporter).
const SESSION_KEY_LABEL: &[u8] = b"EXPORTER-tandem-unattended-session-v1";

/// What an enrolled agent says about the computer while online (signed into its presence).
#[derive(Clone, Debug, Default)]
pub struct DeviceInfo {
    pub hostname: String,
    pub os: String,
    /// The user logged in at the screen ("" if nobody).
    pub user: String,
}

/// The agent's own rule on top of the certificates (local administrator's config).
#[derive(Clone, Debug, Default)]
pub struct UnattendedPolicy {
    /// Technicians allowed, by name or key fingerprint (`SHA256:…`); empty: every technician whose
    /// certificate allows unattended access to this device's group.
    pub technicians: Vec<String>,
}

impl UnattendedPolicy {
    fn allows(&self, v: &tandem_org::Verified) -> Result<(), tandem_org::Unverified> {
        if self.technicians.is_empty()
            || self
                .technicians
                .iter()
                .any(|t| t == &v.technician || t == &v.key)
        {
            Ok(())
        } else {
            Err(tandem_org::Unverified::NotAllowedHere(v.technician.clone()))
        }
    }
}

/// What an enrolled agent reports.
#[derive(Debug)]
pub enum DeviceEvent {
    /// Online on the relay as this device (after a start, a reconnection or a session).
    Online { device: String },
    /// A technician connected and proved all that is needed. Nothing is shown or allowed yet:
    /// the application asks the user (or not, by policy) and shows the banner.
    Session(Box<Session>),
    /// Someone was paired with this device but did not get in (why, in words). The device goes
    /// online again by itself on the next [`DeviceHost::next`].
    Refused { reason: String },
}

/// An enrolled agent: online on the relay as its device, turning connections into sessions.
///
/// Every error of [`DeviceHost::next`] leaves the host usable: the next call connects again (the
/// caller decides how long to wait first).
pub struct DeviceHost {
    opts: ConnectOptions,
    cfg: SessionConfig,
    enrollment: Arc<Enrollment>,
    policy: UnattendedPolicy,
    info: DeviceInfo,
    link: Option<RelayLink>,
}

impl DeviceHost {
    /// Nothing is sent yet: the first [`DeviceHost::next`] connects and announces.
    pub fn new(
        opts: ConnectOptions,
        cfg: SessionConfig,
        enrollment: Arc<Enrollment>,
        policy: UnattendedPolicy,
        info: DeviceInfo,
    ) -> DeviceHost {
        DeviceHost {
            opts,
            cfg,
            enrollment,
            policy,
            info,
            link: None,
        }
    }

    pub fn device_id(&self) -> &str {
        &self.enrollment.body.id
    }

    /// Updates what the next announcement says (e.g. another user logged in).
    pub fn set_info(&mut self, info: DeviceInfo) {
        self.info = info;
    }

    /// Whether the host is online now.
    pub fn is_online(&self) -> bool {
        self.link.is_some()
    }

    /// The next thing to report; may be cancelled at any point.
    pub async fn next(&mut self) -> Result<DeviceEvent, SessionError> {
        let Some(link) = self.link.as_mut() else {
            let mut link = RelayLink::connect(&self.opts).await?;
            let presence = tandem_org::Presence::sign(
                &self.enrollment.key,
                &self.info.hostname,
                &self.info.os,
                &self.info.user,
                tandem_org::unix_now(),
            )
            .map_err(|e| SessionError::Setup(e.to_string()))?;
            let (cert, presence) = (self.enrollment.cert.to_text(), presence.to_text());
            let mut exporter = [0u8; 32];
            link.connection()
                .export_keying_material(&mut exporter, tandem_org::ANNOUNCE_EXPORTER_LABEL, b"")
                .map_err(|_| SessionError::Setup("TLS exporter unavailable".into()))?;
            let proof =
                tandem_org::prove_announce(&self.enrollment.key, &cert, &presence, &exporter);
            let device = link.announce(cert, presence, proof).await?;
            self.link = Some(link);
            return Ok(DeviceEvent::Online { device });
        };
        loop {
            let msg = match link.recv().await {
                Ok(m) => m,
                Err(e) => {
                    self.link = None;
                    return Err(e.into());
                }
            };
            match msg {
                RelayMsg::Paired {
                    technician,
                    organisation,
                    resume,
                } => {
                    let Some(link) = self.link.take() else {
                        return Err(SessionError::Setup("no relay link".into()));
                    };
                    let who = RelayIdentity {
                        technician,
                        organisation,
                    };
                    return Ok(self.handshake(link, who, resume).await);
                }
                RelayMsg::Revocation { list } => {
                    offer_revocation(&self.cfg, &list);
                    persist_trust(&self.cfg);
                }
                RelayMsg::ShuttingDown => {
                    self.link = None;
                    return Err(SessionError::Relay(ClientError::Closed {
                        code: Some(ErrorCode::ShuttingDown),
                        reason: ErrorCode::ShuttingDown.explain().into(),
                    }));
                }
                _ => continue,
            }
        }
    }

    async fn handshake(
        &self,
        mut link: RelayLink,
        who: RelayIdentity,
        token: ResumeToken,
    ) -> DeviceEvent {
        let inner = match AgentInner::open(&self.cfg, &link) {
            Ok(i) => i,
            Err(e) => {
                return DeviceEvent::Refused {
                    reason: e.to_string(),
                };
            }
        };
        // The agent's own refusal, once decided: the console may leave (and the relay say so)
        // while the verdict is still being delivered, and the refusal is the truth.
        let decided = std::sync::OnceLock::new();
        let outcome = inner
            .confirm(&mut link, self.cfg.setup_timeout, async |conn| {
                agent_handshake(conn, &self.cfg, &self.enrollment, &self.policy, &decided).await
            })
            .await;
        let failure = match outcome {
            Ok((conn, Ok(confirmed))) => {
                tracing::info!("unattended session confirmed");
                let link = LinkCtx {
                    link,
                    opts: self.opts.clone(),
                    token,
                    grace: self.cfg.resume_grace,
                };
                return DeviceEvent::Session(Box::new(inner.start(conn, confirmed, who, link)));
            }
            Ok((conn, Err(e))) => {
                conn.close(
                    VarInt::from_u32(close::PROTOCOL),
                    &close_reason(&EndReason::Other(e.to_string())),
                );
                e
            }
            Err(e) => e,
        };
        let failure = match decided.get() {
            Some(detail) => SessionError::Unverified(detail.clone()),
            None => failure,
        };
        inner.close();
        tracing::warn!(error = %failure, "an unattended connection was refused");
        let _ = link
            .end(EndReason::Other("session setup failed".into()))
            .await;
        link.close().await;
        DeviceEvent::Refused {
            reason: failure.to_string(),
        }
    }
}

fn export(conn: &Connection, label: &[u8], device: &str) -> Result<[u8; 32], SessionError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, label, device.as_bytes())
        .map_err(|_| SessionError::Setup("TLS exporter unavailable".into()))?;
    Ok(out)
}

async fn agent_handshake(
    conn: &Connection,
    cfg: &SessionConfig,
    me: &Enrollment,
    policy: &UnattendedPolicy,
    decided: &std::sync::OnceLock<String>,
) -> Result<Confirmed, SessionError> {
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| SessionError::Setup(e.to_string()))?;
    let peer = read_hello(&mut recv).await?;
    let nonce: [u8; tandem_org::CHALLENGE_LEN] = match read_frame::<ControlMsg>(&mut recv).await? {
        ControlMsg::DeviceChallenge { device, nonce } => {
            if device != me.body.id {
                return Err(SessionError::Setup(format!(
                    "the technician asked for device {device:?}, this is {}",
                    me.body.id
                )));
            }
            nonce
                .try_into()
                .map_err(|_| SessionError::Protocol("bad device challenge".into()))?
        }
        ControlMsg::OrgChallenge { .. } | ControlMsg::OrgCredentials { .. } => {
            return Err(SessionError::Protocol(
                "the technician's side tried an attended session on an enrolled device".into(),
            ));
        }
        other => {
            return Err(SessionError::Protocol(format!(
                "expected the device challenge, got {other:?}"
            )));
        }
    };
    let id = &me.body.id;
    let device_exporter = export(conn, tandem_org::DEVICE_EXPORTER_LABEL, id)?;
    write_frame(&mut send, &hello(cfg)).await?;
    write_frame(
        &mut send,
        &ControlMsg::DeviceProof {
            cert: me.cert.to_text(),
            proof: tandem_org::prove_device(&me.key, &me.cert, &device_exporter, &nonce),
        },
    )
    .await?;
    let mine = tandem_org::challenge().map_err(|e| SessionError::Setup(e.to_string()))?;
    write_frame(
        &mut send,
        &ControlMsg::OrgChallenge {
            nonce: mine.to_vec(),
        },
    )
    .await?;
    let org = match read_frame::<ControlMsg>(&mut recv).await? {
        ControlMsg::OrgCredentials {
            cert,
            proof,
            revocation,
        } => {
            let exporter = export(conn, tandem_org::EXPORTER_LABEL, id)?;
            let org = check_org(cfg, &exporter, &mine, cert, &proof, revocation);
            persist_trust(cfg);
            org
        }
        other => {
            return Err(SessionError::Protocol(format!(
                "expected the organisation credentials, got {other:?}"
            )));
        }
    };
    // Unattended: a verified certificate, the permission for this group, and the local policy.
    let verdict = match &org {
        OrgCheck::Verified(v) => tandem_org::allows_unattended(v, &me.body.group)
            .and_then(|()| policy.allows(v))
            .map(|()| {
                format!(
                    "{} of {} (certificate {}), unattended",
                    v.technician, v.organisation, v.cert_id
                )
            })
            .map_err(|e| e.to_string()),
        OrgCheck::NotVerified(why) => Err(why.clone()),
        OrgCheck::AcceptedByAgent => Err("not verified".into()),
    };
    let (verified, refused, detail) = match &verdict {
        Ok(d) => (true, false, d.clone()),
        Err(why) => (matches!(org, OrgCheck::Verified(_)), true, why.clone()),
    };
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
        let _ = decided.set(detail.clone());
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), send.stopped()).await;
        return Err(SessionError::Unverified(detail));
    }
    let key = export(conn, SESSION_KEY_LABEL, id)?;
    Ok((send, recv, peer, key, org, Some(me.body.clone())))
}

/// The console's half (see the module documentation).
pub(crate) async fn console_handshake(
    conn: &Connection,
    device: &str,
    carried: Option<&str>,
    cfg: &SessionConfig,
) -> Result<Confirmed, SessionError> {
    let creds = cfg.credentials.as_ref().ok_or_else(no_certificate)?;
    let (org, revocation) = own_org(creds, carried)?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| SessionError::Setup(e.to_string()))?;
    write_frame(&mut send, &hello(cfg)).await?;
    let nonce = tandem_org::challenge().map_err(|e| SessionError::Setup(e.to_string()))?;
    write_frame(
        &mut send,
        &ControlMsg::DeviceChallenge {
            device: device.to_string(),
            nonce: nonce.to_vec(),
        },
    )
    .await?;
    let peer = read_hello(&mut recv).await?;
    let body = match read_frame::<ControlMsg>(&mut recv).await? {
        ControlMsg::DeviceProof { cert, proof } => {
            let exporter = export(conn, tandem_org::DEVICE_EXPORTER_LABEL, device)?;
            tandem_org::check_device(
                &org,
                revocation.as_ref(),
                device,
                &cert,
                &proof,
                &exporter,
                &nonce,
            )
            .map_err(|e| SessionError::DeviceUnverified(e.to_string()))?
        }
        other => {
            return Err(SessionError::Protocol(format!(
                "expected the device's proof, got {other:?}"
            )));
        }
    };
    let challenge: [u8; tandem_org::CHALLENGE_LEN] =
        match read_frame::<ControlMsg>(&mut recv).await? {
            ControlMsg::OrgChallenge { nonce } => nonce
                .try_into()
                .map_err(|_| SessionError::Protocol("bad organisation challenge".into()))?,
            other => {
                return Err(SessionError::Protocol(format!(
                    "expected the organisation challenge, got {other:?}"
                )));
            }
        };
    let exporter = export(conn, tandem_org::EXPORTER_LABEL, device)?;
    write_frame(
        &mut send,
        &ControlMsg::OrgCredentials {
            cert: Some(creds.cert.to_text()),
            proof: tandem_org::prove(&creds.key, &creds.cert, &exporter, &challenge),
            revocation: creds.revocation.as_ref().map(|r| r.to_text()),
        },
    )
    .await?;
    match read_frame::<ControlMsg>(&mut recv).await? {
        ControlMsg::OrgVerdict {
            refused: false,
            verified: true,
            ..
        } => {}
        ControlMsg::OrgVerdict { detail, .. } => return Err(SessionError::Unverified(detail)),
        other => {
            return Err(SessionError::Protocol(format!(
                "expected the organisation verdict, got {other:?}"
            )));
        }
    }
    let key = export(conn, SESSION_KEY_LABEL, device)?;
    Ok((send, recv, peer, key, OrgCheck::AcceptedByAgent, Some(body)))
}

fn no_certificate() -> SessionError {
    SessionError::Setup(
        "unattended access needs a technician certificate (--cert and --cert-key)".into(),
    )
}

/// The organisation the console's own certificate is from, and the newest revocation list signed
/// by it among the console's own and the one the relay carried (`carried`, text).
fn own_org(
    creds: &Credentials,
    carried: Option<&str>,
) -> Result<(OrgPublic, Option<RevocationBody>), SessionError> {
    let b = creds
        .cert
        .read_unchecked()
        .map_err(|e| SessionError::Setup(format!("the technician certificate: {e}")))?;
    let org = OrgPublic::new(&b.organisation, b.org_key)
        .map_err(|e| SessionError::Setup(format!("the technician certificate: {e}")))?;
    let mine = creds.revocation.as_ref().and_then(|r| r.check(&org).ok());
    let relayed = carried.and_then(|t| {
        tandem_org::RevocationList::from_text(t)
            .and_then(|l| l.check(&org))
            .map_err(|e| tracing::warn!(error = %e, "ignoring the relay's revocation list"))
            .ok()
    });
    let newest = match (mine, relayed) {
        (Some(a), Some(b)) => Some(if b.serial > a.serial { b } else { a }),
        (a, b) => a.or(b),
    };
    Ok((org, newest))
}

/// Connects to the relay as a technician and proves the certificate (for listing and connecting).
async fn proven_link(
    opts: &ConnectOptions,
    token: &Secret,
    cfg: &SessionConfig,
) -> Result<(RelayLink, RelayIdentity, Option<String>), SessionError> {
    let creds = cfg.credentials.as_ref().ok_or_else(no_certificate)?;
    let (mut link, who) = crate::setup::log_in(opts.clone(), token.clone()).await?;
    let mut exporter = [0u8; 32];
    link.connection()
        .export_keying_material(&mut exporter, tandem_org::MEMBERSHIP_EXPORTER_LABEL, b"")
        .map_err(|_| SessionError::Setup("TLS exporter unavailable".into()))?;
    let proof = tandem_org::prove_membership(&creds.key, &creds.cert, &exporter);
    let (_, carried) = link.prove_org(creds.cert.to_text(), proof).await?;
    Ok((link, who, carried))
}

/// A device of the list, as checked by this console.
#[derive(Clone, Debug)]
pub struct ListedDevice {
    pub checked: CheckedDevice,
    /// The relay's word: online now, in a session now, last seen (Unix seconds).
    pub online: bool,
    pub in_session: bool,
    pub last_seen: u64,
}

/// The organisation's devices as the relay lists them, each checked here.
#[derive(Clone, Debug, Default)]
pub struct DeviceList {
    pub devices: Vec<ListedDevice>,
    /// Entries that did not check (forged, another organisation, revoked): why, for each.
    pub rejected: Vec<String>,
}

/// Most devices one listing fetches.
pub const MAX_LISTED: usize = 100_000;

/// Lists the organisation's devices matching `query` (every page), checking each entry against
/// the organisation of the console's own certificate.
pub async fn list_devices(
    opts: &ConnectOptions,
    token: &Secret,
    cfg: &SessionConfig,
    query: &str,
) -> Result<DeviceList, SessionError> {
    let creds = cfg.credentials.as_ref().ok_or_else(no_certificate)?;
    let (mut link, _, carried) = proven_link(opts, token, cfg).await?;
    let (org, revocation) = own_org(creds, carried.as_deref())?;
    let mut out = DeviceList::default();
    let mut seen = std::collections::HashSet::new();
    let mut offset = 0u32;
    let mut waits = 0;
    loop {
        let (entries, total) = match link.list_devices(query, offset).await {
            Ok(page) => {
                waits = 0;
                page
            }
            // The relay paces long listings: wait and ask for the same page again.
            Err(ClientError::Refused {
                code: ErrorCode::RateLimited,
            }) if waits < MAX_LIST_WAITS => {
                waits += 1;
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let n = entries.len();
        for e in entries {
            check_listing(&org, revocation.as_ref(), e, &mut seen, &mut out);
        }
        offset = offset.saturating_add(n as u32);
        if out.rejected.len() >= MAX_REJECTED {
            // A relay that lists junk by the thousand is not worth reading to the end.
            out.rejected
                .push("the relay listed too many entries that do not check; stopped".into());
            break;
        }
        if n == 0 || offset >= total || offset as usize >= MAX_LISTED {
            break;
        }
    }
    link.close().await;
    Ok(out)
}

/// How many times in a row a listing waits for the relay's pace before giving up.
const MAX_LIST_WAITS: u32 = 120;
/// Entries that do not check after which a listing stops.
const MAX_REJECTED: usize = 1_000;

fn check_listing(
    org: &OrgPublic,
    revocation: Option<&RevocationBody>,
    e: DeviceListing,
    seen: &mut std::collections::HashSet<String>,
    out: &mut DeviceList,
) {
    match (DeviceEntry {
        cert: &e.cert,
        presence: &e.presence,
    })
    .check(org, revocation)
    {
        Ok(checked) if !seen.insert(checked.device.id.clone()) => {
            out.rejected
                .push(format!("device {} listed twice", checked.device.id));
        }
        Ok(checked) => out.devices.push(ListedDevice {
            checked,
            online: e.online,
            in_session: e.in_session,
            last_seen: e.last_seen,
        }),
        Err(why) => {
            tracing::warn!(reason = %why, "the relay listed a device that does not check; left out");
            out.rejected.push(why.to_string());
        }
    }
}

/// The console side of an unattended session: connects to the device `device` (its id) as the
/// technician of `token`, proving the certificate in `cfg.credentials`.
pub async fn connect_device(
    opts: &ConnectOptions,
    token: &Secret,
    device: &str,
    cfg: &SessionConfig,
) -> Result<Session, SessionError> {
    if !tandem_org::is_device_id(device) {
        return Err(SessionError::Setup(format!(
            "{device:?} is not a device id (20 hex digits, as the device list shows)"
        )));
    }
    let (mut link, who, carried) = proven_link(opts, token, cfg).await?;
    let token = link.connect_device(device).await?;
    let mode = ConsoleMode::Device {
        device,
        revocation: carried.as_deref(),
    };
    console_setup(link, &who, opts, token, cfg, mode).await
}
