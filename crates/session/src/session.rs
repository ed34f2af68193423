//! A confirmed end-to-end session and its channels.
//!
//! | channel | transport | rule |
//! |---|---|---|
//! | control | the bidirectional stream the PAKE ran on, length-framed [`ControlMsg`] | ordered, reliable; `Hello` (version, capabilities) first |
//! | video | one unidirectional stream per frame, oldest first, at most 3 unacknowledged (the sender waits) | in order, none skipped (P-frames reference their predecessor); the receiver still never goes backwards |
//! | input events | one unidirectional stream, length-framed | buttons and keys: reliable, ordered |
//! | pointer | DATAGRAM frames with a sequence number | only the newest matters; older or lost ones are skipped |
//! | chat | control messages ([`ControlMsg::Chat`]) | works before consent: the user may ask who is calling |
//! | clipboard | one unidirectional stream per update (kind byte, format byte, data) | newest wins; text above video, images below; agent: only after consent |
//! | files | one bidirectional stream per file (kind byte, then `tandem_toolbox`'s transfer protocol) | below video; agent: only after consent |
//! | unknown kinds | | refused without harm |
//!
//! A supervisor task watches the relay link: it reports the peer's suspension and return, reconnects
//! and resumes this side's link within the relay's grace period, and ends the session on both sides
//! (inner connection closed with a reason) when the link cannot be resumed. There are no half-open
//! sessions: the inner connection closing ends the relay session, and the relay ending the session
//! closes the inner connection.

use crate::carrier::{Carrier, CarrierStats};
use crate::direct::{PathKind, PeerCandidates, Relink};
use crate::inner::close;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use quinn::{Connection, RecvStream, SendStream, VarInt};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tandem_client::tandem_net::{Transport, TransportCell};
use tandem_client::{ClientError, ConnectOptions, RelayLink};
use tandem_proto::{
    EndReason, ErrorCode, FRAME_HEADER, MAX_CONTROL_FRAME, ProtoError, RelayMsg, ResumeToken,
    Validate, decode_body, encode_frame, frame_len,
};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio::task::AbortHandle;

/// Version of the session protocol (sent in `Hello`).
/// (2: the organisation proof follows `Hello`.)
pub const SESSION_VERSION: u16 = 2;
/// Largest video frame accepted (and sent). OpenH264's output buffer for a picture is the size of
/// the raw I420 picture (`COMPRESS_RATIO_THR` 1.0), 3.1 MB at 1920×1080, so no 1080p frame is
/// larger; real screen frames are far smaller (keyframes of full-screen text: 100–400 KB).
pub const MAX_VIDEO_FRAME: usize = 4 * 1024 * 1024;
/// Video frames being read at once. With the frames waiting for the decoder
/// ([`VIDEO_QUEUE`]) this bounds what a peer can make the console hold:
/// (4 + 3) × [`MAX_VIDEO_FRAME`] = 28 MiB. An honest agent never has more than
/// [`MAX_FRAMES_IN_FLIGHT`] frames in flight, so it never waits for a permit.
const VIDEO_READERS: usize = MAX_FRAMES_IN_FLIGHT + 1;
/// Frames read but not yet taken by [`Session::recv_video`].
const VIDEO_QUEUE: usize = MAX_FRAMES_IN_FLIGHT;
/// The most video a peer can make this side hold, in frames read or queued; QUIC's flow control
/// ([`crate::inner::INNER_RECEIVE_WINDOW`]) bounds what waits unread.
pub const MAX_VIDEO_HELD: usize = (VIDEO_READERS + VIDEO_QUEUE) * MAX_VIDEO_FRAME;
/// Largest input event or pointer message.
pub const MAX_INPUT_MSG: usize = 4096;

const KIND_VIDEO: u8 = 1;
const KIND_INPUT: u8 = 2;
const KIND_CLIPBOARD: u8 = 3;
const KIND_FILE: u8 = 4;
/// Largest chat message, in bytes of UTF-8.
pub const MAX_CHAT: usize = 2000;
/// Largest clipboard text (UTF-8 bytes).
pub const MAX_CLIP_TEXT: usize = 1 << 20;
/// Largest clipboard image (PNG bytes).
pub const MAX_CLIP_IMAGE: usize = 16 << 20;
/// File streams the peer may have waiting to be taken by [`Session::accept_transfer`]; more are
/// refused (the peer retries when one is done).
const TRANSFER_QUEUE: usize = 8;
/// Capability names of the toolbox (in `Hello`): a side sends chat, clipboard or files only to a
/// peer that announced them (an older peer would close the session on a message it cannot read).
pub const CAP_CHAT: &str = "chat/v1";
pub const CAP_CLIPBOARD: &str = "clipboard/v1";
pub const CAP_FILES: &str = "files/v1";
/// The session layer's own: direct paths ([`crate::direct`]).
pub const CAP_DIRECT: &str = "direct/v1";
/// Most candidates in one [`ControlMsg::PathCandidates`].
pub const MAX_PATH_CANDIDATES: usize = 16;
const DGRAM_POINTER: u8 = 1;

/// Which end this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Agent,
    Console,
}

/// The user's answer to the consent prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consent {
    AllowControl,
    ViewOnly,
    Deny,
}

/// Control-channel messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMsg {
    /// First message each way.
    Hello {
        version: u16,
        software: String,
        capabilities: Vec<String>,
    },
    /// Agent → console: what the user decided.
    Consent { decision: Consent },
    /// Agent → console: the user changed what the technician may do.
    Permissions { view_only: bool },
    /// Console → agent: the quality the technician asks for.
    Quality { max_kbps: u32, max_fps: u16 },
    /// Console → agent: the decoder needs a keyframe.
    KeyframeRequest,
    /// Either way: measurements for the stats line. The agent's answer carries the frames and
    /// bytes it sent and the median time from capture to encoded bytes (`pipeline_us`).
    Stats {
        rtt_us: u32,
        fps: u16,
        kbps: u32,
        pipeline_us: u32,
        /// How the sender's relay link travels now (QUIC, or a TCP link).
        transport: Transport,
    },
    /// Either way: the sender ends the session.
    End { reason: EndReason },
    /// Agent → console: where the pointer is on the shared monitor, in its pixels.
    Cursor {
        x: i32,
        y: i32,
        visible: bool,
        screen_w: u32,
        screen_h: u32,
    },
    /// Agent → console: the pointer's image (premultiplied RGBA, at most
    /// [`MAX_CURSOR_SIDE`] pixels a side); each pixel covers `scale × scale` screen pixels.
    CursorShape {
        width: u16,
        height: u16,
        hot_x: u16,
        hot_y: u16,
        scale: u8,
        rgba: Vec<u8>,
    },
    /// Agent → console: the monitors the user has, and which one is shared.
    Monitors {
        monitors: Vec<MonitorInfo>,
        current: u8,
    },
    /// Console → agent: share another monitor.
    SelectMonitor { index: u8 },
    /// Agent → console, right after `Hello`: prove your organisation certificate on this
    /// connection ([`tandem_org::CHALLENGE_LEN`] random bytes).
    OrgChallenge { nonce: Vec<u8> },
    /// Console → agent, the answer: the technician's certificate and proof (none without a
    /// certificate), and the newest revocation list the console carries.
    OrgCredentials {
        cert: Option<String>,
        proof: Vec<u8>,
        revocation: Option<String>,
    },
    /// Agent → console: what the agent made of it. `refused`: the agent's policy requires a
    /// verified technician, and the session ends.
    OrgVerdict {
        verified: bool,
        refused: bool,
        detail: String,
    },
    /// Console → agent, after `Hello`, unattended: the device the console wants, and a challenge
    /// for the agent to prove it is that device ([`tandem_org::CHALLENGE_LEN`] random bytes).
    DeviceChallenge { device: String, nonce: Vec<u8> },
    /// Agent → console, the answer: its device certificate and the device key's signature over
    /// this connection's exporter and the challenge.
    DeviceProof { cert: String, proof: Vec<u8> },
    /// Either way, also before consent: a chat line (at most [`MAX_CHAT`] bytes). Shown escaped
    /// ([`crate::names::printable`]); kept only for the session.
    Chat { text: String },
    /// Either way (peers with [`CAP_DIRECT`]): where this side may be reached directly (at most
    /// [`MAX_PATH_CANDIDATES`]); replaces what it sent before. `relay_only`: this side (or its
    /// relay) does not take direct paths; do not probe. Handled by the session layer itself.
    PathCandidates {
        candidates: Vec<(std::net::SocketAddr, crate::direct::CandidateKind)>,
        relay_only: bool,
    },
}

/// Largest cursor image side sent (larger cursors are sent downscaled).
pub const MAX_CURSOR_SIDE: u16 = 48;
/// Most monitors listed.
pub const MAX_MONITORS: usize = 16;

/// One monitor of the agent's machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorInfo {
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub primary: bool,
}

impl Validate for ControlMsg {
    fn validate(&self) -> Result<(), ProtoError> {
        match self {
            ControlMsg::Hello {
                software,
                capabilities,
                ..
            } => {
                if software.len() > 128
                    || capabilities.len() > 64
                    || capabilities.iter().any(|c| c.len() > 64)
                {
                    return Err(ProtoError::TextTooLong);
                }
                Ok(())
            }
            ControlMsg::End { reason } => reason.validate(),
            ControlMsg::Chat { text } if text.len() > MAX_CHAT => Err(ProtoError::TextTooLong),
            ControlMsg::PathCandidates { candidates, .. }
                if candidates.len() > MAX_PATH_CANDIDATES =>
            {
                Err(ProtoError::Invalid("too many path candidates"))
            }
            ControlMsg::OrgChallenge { nonce } if nonce.len() != tandem_org::CHALLENGE_LEN => {
                Err(ProtoError::Invalid("organisation challenge"))
            }
            ControlMsg::OrgCredentials {
                cert,
                proof,
                revocation,
            } if cert.as_ref().is_some_and(|c| c.len() > 4096)
                || proof.len() > 128
                || revocation
                    .as_ref()
                    .is_some_and(|r| r.len() > tandem_org::MAX_TEXT) =>
            {
                Err(ProtoError::Invalid("organisation credentials"))
            }
            ControlMsg::OrgVerdict { detail, .. } if detail.len() > 512 => {
                Err(ProtoError::TextTooLong)
            }
            ControlMsg::DeviceChallenge { device, nonce }
                if !tandem_org::is_device_id(device)
                    || nonce.len() != tandem_org::CHALLENGE_LEN =>
            {
                Err(ProtoError::Invalid("device challenge"))
            }
            ControlMsg::DeviceProof { cert, proof } if cert.len() > 2048 || proof.len() > 128 => {
                Err(ProtoError::Invalid("device proof"))
            }
            ControlMsg::CursorShape {
                width,
                height,
                hot_x,
                hot_y,
                scale,
                rgba,
            } => {
                if *width == 0
                    || *height == 0
                    || *width > MAX_CURSOR_SIDE
                    || *height > MAX_CURSOR_SIDE
                    || hot_x >= width
                    || hot_y >= height
                    || !matches!(scale, 1 | 2 | 4 | 8)
                    || rgba.len() != *width as usize * *height as usize * 4
                {
                    return Err(ProtoError::Invalid("cursor image"));
                }
                Ok(())
            }
            ControlMsg::Monitors { monitors, current } => {
                if monitors.len() > MAX_MONITORS
                    || monitors.iter().any(|m| m.name.len() > 64)
                    || (!monitors.is_empty() && *current as usize >= monitors.len())
                {
                    return Err(ProtoError::Invalid("monitor list"));
                }
                Ok(())
            }
            ControlMsg::Cursor {
                screen_w, screen_h, ..
            } if *screen_w > 65_536 || *screen_h > 65_536 => {
                Err(ProtoError::Invalid("cursor position"))
            }
            _ => Ok(()),
        }
    }
}

/// What the other side said about itself, and (agent side) who the relay says the technician is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub software: String,
    pub capabilities: Vec<String>,
    pub version: u16,
    /// The technician and organisation as the relay named them, bound into the PAKE: on the agent,
    /// who connected; on the console, who the user was shown (this side's own name, as the relay
    /// reported it). Show them through [`crate::names`].
    pub technician: Option<String>,
    pub organisation: Option<String>,
    /// The organisation check ([`OrgCheck`]): on the agent, what it verified itself; on the
    /// console, what the agent said.
    pub org: OrgCheck,
    /// Unattended sessions: the enrolled device (on the console, the one it verified; on the
    /// agent, itself). `None` for attended sessions (a code and the user's consent).
    pub device: Option<tandem_org::DeviceBody>,
}

/// Whether the technician is verified by the organisation's key (DESIGN.md "Trust: the
/// organisation's key").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrgCheck {
    /// Agent: the technician's certificate chains to the pinned organisation key, is valid now,
    /// not revoked, and its key signed this connection's challenge.
    Verified(tandem_org::Verified),
    /// Console: the agent verified this side's certificate.
    AcceptedByAgent,
    /// Not verified, and why (in words).
    NotVerified(String),
}

impl OrgCheck {
    pub fn is_verified(&self) -> bool {
        !matches!(self, OrgCheck::NotVerified(_))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Relay(#[from] ClientError),
    #[error(
        "wrong session code: check the code with the user (a wrong code cannot be retried; the user gets a new one, after a pause that grows with each wrong try)"
    )]
    WrongCode,
    #[error("the session could not be set up: {0}")]
    Setup(String),
    /// The agent accepts only technicians verified by its organisation's key.
    #[error("this computer accepts only technicians verified by its organisation's key: {0}")]
    Unverified(String),
    /// Unattended: the computer that answered is not the enrolled device asked for.
    #[error("the computer that answered is not the enrolled device: {0}")]
    DeviceUnverified(String),
    #[error("the session protocol was broken by the other side: {0}")]
    Protocol(String),
    #[error("the session has ended: {0}")]
    Ended(SessionEnd),
    #[error(transparent)]
    Inner(#[from] crate::inner::InnerError),
    #[error("a video frame of {0} bytes is over the session's limit of {MAX_VIDEO_FRAME} bytes")]
    FrameTooLarge(usize),
}

/// How and why a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionEnd {
    pub reason: EndReason,
    /// True when this side ended it.
    pub local: bool,
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.reason)
    }
}

/// Relay-level happenings during a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// The other side lost its relay link; it has `grace` to come back.
    PeerSuspended {
        grace: Duration,
    },
    PeerResumed,
    /// This side lost its relay link and is reconnecting.
    LinkLost,
    /// This side's relay link is back.
    LinkResumed,
}

/// A video frame as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VideoFrame {
    pub seq: u64,
    pub data: Bytes,
}

/// An input message as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputItem {
    /// A reliable, ordered event (button, key, text).
    Event(Bytes),
    /// The newest pointer position (older ones were skipped).
    Pointer(Bytes),
}

/// Encodes an [`EndReason`] as an inner close reason.
pub(crate) fn close_reason(reason: &EndReason) -> Vec<u8> {
    postcard::to_stdvec(reason).unwrap_or_default()
}

/// Reads how an inner connection ended.
pub(crate) fn end_of(e: &quinn::ConnectionError) -> SessionEnd {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let code = c.error_code.into_inner();
            let reason = postcard::from_bytes::<EndReason>(&c.reason)
                .ok()
                .filter(|r| r.validate().is_ok())
                .unwrap_or(match code as u32 {
                    close::WRONG_CODE => EndReason::WrongCode,
                    close::LINK_LOST => EndReason::PeerDisconnected,
                    _ => EndReason::Other("the other side closed the session".into()),
                });
            SessionEnd {
                reason,
                local: false,
            }
        }
        quinn::ConnectionError::LocallyClosed => SessionEnd {
            reason: EndReason::Other("closed by this side".into()),
            local: true,
        },
        quinn::ConnectionError::TimedOut => SessionEnd {
            reason: EndReason::PeerDisconnected,
            local: false,
        },
        other => SessionEnd {
            reason: EndReason::Other(other.to_string()),
            local: false,
        },
    }
}

pub(crate) async fn write_frame<T: Serialize>(
    s: &mut SendStream,
    m: &T,
) -> Result<(), SessionError> {
    let f =
        encode_frame(m, MAX_CONTROL_FRAME).map_err(|e| SessionError::Protocol(e.to_string()))?;
    s.write_all(&f)
        .await
        .map_err(|e| SessionError::Setup(e.to_string()))
}

pub(crate) async fn read_frame<T>(r: &mut RecvStream) -> Result<T, SessionError>
where
    T: for<'de> Deserialize<'de> + Validate,
{
    let mut h = [0u8; FRAME_HEADER];
    r.read_exact(&mut h)
        .await
        .map_err(|e| SessionError::Setup(e.to_string()))?;
    let len = frame_len(h, MAX_CONTROL_FRAME).map_err(|e| SessionError::Protocol(e.to_string()))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .await
        .map_err(|e| SessionError::Setup(e.to_string()))?;
    decode_body(&body).map_err(|e| SessionError::Protocol(e.to_string()))
}

/// What a side needs to keep (or get back) its relay link during a session.
pub(crate) struct LinkCtx {
    pub link: RelayLink,
    pub opts: ConnectOptions,
    pub token: ResumeToken,
    /// How long to try to resume a lost link (the relay's grace period).
    pub grace: Duration,
}

/// A confirmed session.
pub struct Session {
    role: Role,
    conn: Connection,
    ctl_send: Arc<Mutex<SendStream>>,
    ctl_rx: Mutex<mpsc::Receiver<Result<ControlMsg, SessionError>>>,
    video_rx: Mutex<mpsc::Receiver<VideoFrame>>,
    input_rx: Mutex<mpsc::Receiver<InputItem>>,
    clip_rx: Mutex<mpsc::Receiver<ClipItem>>,
    transfer_rx: Mutex<mpsc::Receiver<TransferStream>>,
    events_rx: Mutex<mpsc::Receiver<SessionEvent>>,
    end_tx: mpsc::Sender<EndReason>,
    peer: PeerInfo,
    carrier: Arc<Carrier>,
    tasks: Vec<AbortHandle>,
    _endpoint: quinn::Endpoint,
    /// The key the PAKE confirmed (bound to this connection).
    session_key: [u8; 32],
    /// Why the session ended, when this side knows better than the inner close code.
    end_info: EndInfo,
    /// Agent: whether input is accepted (set when the consent answer was sent).
    input_open: Arc<InputGate>,
    /// Console: bytes of video frames read and not yet taken by [`Session::recv_video`].
    video_held: Arc<AtomicUsize>,
    /// Follows this side's relay link (replaced when the link is replaced).
    transport: LinkTransport,
}

/// The transport of whatever relay link the session uses now.
pub(crate) type LinkTransport = Arc<std::sync::Mutex<TransportCell>>;

/// Agent: input is accepted once the user's consent answer was sent; before, it is dropped.
#[derive(Default)]
struct InputGate {
    open: AtomicBool,
    dropped: AtomicU64,
    /// Set with `open`, for the direct path's driver (which waits for it).
    consented: Arc<AtomicBool>,
}

impl InputGate {
    /// Whether an item read now may be queued; counts it as dropped otherwise.
    fn admit(&self) -> bool {
        let open = self.open.load(Ordering::SeqCst);
        if !open {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        open
    }
}

/// Shared record of how the session ended, written before the inner connection is closed.
pub(crate) type EndInfo = Arc<std::sync::Mutex<Option<SessionEnd>>>;

fn record(info: &EndInfo, end: SessionEnd) {
    let mut g = info.lock().unwrap_or_else(|e| e.into_inner());
    if g.is_none() {
        *g = Some(end);
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.role)
            .field("peer", &self.peer)
            .finish()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub(crate) struct Parts {
    pub role: Role,
    pub conn: Connection,
    pub ctl_send: SendStream,
    pub ctl_recv: RecvStream,
    pub peer: PeerInfo,
    pub carrier: Arc<Carrier>,
    pub endpoint: quinn::Endpoint,
    pub link: LinkCtx,
    pub session_key: [u8; 32],
}

impl Session {
    /// Wires up the channels and the supervisor of a confirmed connection.
    pub(crate) fn start(p: Parts) -> Session {
        let mut tasks = Vec::new();
        let (ctl_tx, ctl_rx) = mpsc::channel(64);
        let (peer_tx, peer_rx) = mpsc::channel(1);
        let (relink_tx, relink_rx) = mpsc::channel(4);
        tasks.push(tokio::spawn(control_reader(p.ctl_recv, ctl_tx, peer_tx)).abort_handle());
        // Control messages (consent, end, stats, cursor) go before any video: video streams take
        // priorities up to the frame number, so on a slow path control would otherwise wait
        // behind seconds of frames.
        let _ = p.ctl_send.set_priority(i32::MAX);
        let ctl_send = Arc::new(Mutex::new(p.ctl_send));
        // Input is accepted only once the user answered the consent prompt (the agent's
        // `send_control(Consent)` opens it); what arrives before is dropped, never queued.
        let input_open = Arc::new(InputGate::default());
        let direct = crate::direct::DirectCtx {
            carrier: p.carrier.clone(),
            role: match p.role {
                Role::Agent => 0,
                Role::Console => 1,
            },
            session_key: p.session_key,
            allowed_here: p.link.opts.direct,
            peer_capable: p.peer.capabilities.iter().any(|c| c == CAP_DIRECT),
            ctl_send: ctl_send.clone(),
            consented: (p.role == Role::Agent).then(|| input_open.consented.clone()),
        };
        tasks.push(
            tokio::spawn(crate::direct::run(
                direct,
                peer_rx,
                relink_rx,
                Relink {
                    port: p.link.link.direct_port(),
                    info: p.link.link.path_info(),
                    speaks_paths: p.link.link.speaks_paths(),
                },
                p.link.link.remote().is_ipv6(),
            ))
            .abort_handle(),
        );
        let (video_tx, video_rx) = mpsc::channel(VIDEO_QUEUE);
        let (input_tx, input_rx) = mpsc::channel(1024);
        let video_held = Arc::new(AtomicUsize::new(0));
        // Each side accepts only the channels the other side may send: video to the console,
        // input to the agent.
        let accepts = match p.role {
            Role::Agent => Accepts::Input {
                tx: input_tx.clone(),
                open: input_open.clone(),
            },
            Role::Console => Accepts::Video {
                tx: video_tx,
                held: video_held.clone(),
            },
        };
        // The toolbox's streams: on the agent, refused until the user answered.
        let gate = (p.role == Role::Agent).then(|| input_open.clone());
        let (clip_tx, clip_rx) = mpsc::channel(4);
        let (transfer_tx, transfer_rx) = mpsc::channel(TRANSFER_QUEUE);
        let clip = ToolboxIn {
            tx: clip_tx,
            gate: gate.clone(),
        };
        tasks.push(tokio::spawn(accept_streams(p.conn.clone(), accepts, clip)).abort_handle());
        let files = ToolboxIn {
            tx: transfer_tx,
            gate,
        };
        tasks.push(tokio::spawn(accept_transfers(p.conn.clone(), files)).abort_handle());
        if p.role == Role::Agent {
            tasks.push(
                tokio::spawn(read_pointer(p.conn.clone(), input_tx, input_open.clone()))
                    .abort_handle(),
            );
        }
        let (events_tx, events_rx) = mpsc::channel(32);
        let (end_tx, end_rx) = mpsc::channel(1);
        let end_info: EndInfo = Arc::default();
        let transport: LinkTransport =
            Arc::new(std::sync::Mutex::new(p.link.link.transport_cell()));
        tasks.push(
            tokio::spawn(supervise(
                p.link,
                transport.clone(),
                p.carrier.clone(),
                p.conn.clone(),
                Tell {
                    events: events_tx,
                    relink: relink_tx,
                },
                end_rx,
                end_info.clone(),
            ))
            .abort_handle(),
        );
        Session {
            role: p.role,
            conn: p.conn,
            ctl_send,
            ctl_rx: Mutex::new(ctl_rx),
            video_rx: Mutex::new(video_rx),
            input_rx: Mutex::new(input_rx),
            clip_rx: Mutex::new(clip_rx),
            transfer_rx: Mutex::new(transfer_rx),
            events_rx: Mutex::new(events_rx),
            end_tx,
            peer: p.peer,
            carrier: p.carrier,
            tasks,
            _endpoint: p.endpoint,
            session_key: p.session_key,
            end_info,
            input_open,
            video_held,
            transport,
        }
    }

    /// How this side's relay link travels now.
    pub fn link_transport(&self) -> Transport {
        self.transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get()
    }

    pub fn role(&self) -> Role {
        self.role
    }
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }
    /// The inner QUIC connection (RTT, congestion window, statistics).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
    pub fn carrier_stats(&self) -> &CarrierStats {
        &self.carrier.stats
    }
    /// The path this side's inner packets take now ("relay", "direct, LAN", ...).
    pub fn path(&self) -> PathKind {
        self.carrier.current_path()
    }
    /// Follows [`Session::path`].
    pub fn path_watch(&self) -> tokio::sync::watch::Receiver<PathKind> {
        self.carrier.path()
    }
    /// A key both sides share, confirmed by the PAKE and bound to this connection.
    pub fn session_key(&self) -> &[u8; 32] {
        &self.session_key
    }

    /// Sends a control message. On the agent, sending the user's consent (allow control or view
    /// only) opens the input channel: input that arrived before is dropped, not queued, so nothing
    /// the console sent while the user was still deciding runs at the moment they answer.
    pub async fn send_control(&self, msg: &ControlMsg) -> Result<(), SessionError> {
        let mut s = self.ctl_send.lock().await;
        write_frame(&mut s, msg).await.map_err(|_| self.ended())?;
        drop(s);
        // The readers check the flag before they queue an item, so nothing that was read before
        // this point is ever queued.
        if let ControlMsg::Consent { decision } = msg
            && self.role == Role::Agent
            && *decision != Consent::Deny
        {
            self.input_open.open.store(true, Ordering::SeqCst);
            self.input_open.consented.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Agent: input items that arrived before the consent answer and were dropped.
    pub fn input_dropped_before_consent(&self) -> u64 {
        self.input_open.dropped.load(Ordering::Relaxed)
    }

    /// The next control message. Cancel-safe.
    pub async fn recv_control(&self) -> Result<ControlMsg, SessionError> {
        let r = self.ctl_rx.lock().await.recv().await;
        match r {
            Some(r) => r,
            None => Err(self.wait_ended().await),
        }
    }

    /// The next video frame (never older than one already returned). Cancel-safe.
    pub async fn recv_video(&self) -> Result<VideoFrame, SessionError> {
        let r = self.video_rx.lock().await.recv().await;
        match r {
            Some(f) => {
                self.video_held.fetch_sub(f.data.len(), Ordering::Relaxed);
                Ok(f)
            }
            None => Err(self.wait_ended().await),
        }
    }

    /// Console: bytes of video this side holds, read and not yet taken by
    /// [`Session::recv_video`]; at most [`MAX_VIDEO_HELD`] whatever the peer sends.
    pub fn video_bytes_held(&self) -> usize {
        self.video_held.load(Ordering::Relaxed)
    }

    /// The next input item. Cancel-safe.
    pub async fn recv_input(&self) -> Result<InputItem, SessionError> {
        let r = self.input_rx.lock().await.recv().await;
        match r {
            Some(i) => Ok(i),
            None => Err(self.wait_ended().await),
        }
    }

    /// Whether the peer announced capability `cap` (e.g. [`CAP_CHAT`]) in its `Hello`.
    pub fn peer_can(&self, cap: &str) -> bool {
        self.peer.capabilities.iter().any(|c| c == cap)
    }

    /// Sends a clipboard update on a stream of its own. Text goes before video, images after it.
    pub async fn send_clipboard(
        &self,
        format: ClipFormat,
        data: &[u8],
    ) -> Result<(), SessionError> {
        if data.len() > format.limit() {
            return Err(SessionError::Protocol(format!(
                "clipboard {format:?} of {} bytes is over the limit of {}",
                data.len(),
                format.limit()
            )));
        }
        let mut s = self
            .conn
            .open_uni()
            .await
            .map_err(|e| SessionError::Ended(end_of(&e)))?;
        let _ = s.set_priority(match format {
            ClipFormat::Text => i32::MAX - 1,
            ClipFormat::Png => i32::MIN + 1,
        });
        s.write_all(&[KIND_CLIPBOARD, format.byte()])
            .await
            .map_err(|e| SessionError::Protocol(e.to_string()))?;
        s.write_all(data)
            .await
            .map_err(|e| SessionError::Protocol(e.to_string()))?;
        let _ = s.finish();
        Ok(())
    }

    /// The peer's next clipboard update (on the agent, only those sent after the user's answer).
    /// Cancel-safe.
    pub async fn recv_clipboard(&self) -> Result<ClipItem, SessionError> {
        let r = self.clip_rx.lock().await.recv().await;
        match r {
            Some(c) => Ok(c),
            None => Err(self.wait_ended().await),
        }
    }

    /// Opens file transfer streams (cheap to clone; for the tasks that send files).
    pub fn transfer_opener(&self) -> TransferOpener {
        TransferOpener {
            conn: self.conn.clone(),
        }
    }

    /// The peer's next file transfer stream (on the agent, only those opened after the user's
    /// answer). Cancel-safe.
    pub async fn accept_transfer(&self) -> Result<TransferStream, SessionError> {
        let r = self.transfer_rx.lock().await.recv().await;
        match r {
            Some(t) => Ok(t),
            None => Err(self.wait_ended().await),
        }
    }

    /// The next relay-level event. Cancel-safe; pends forever once the session is over.
    pub async fn next_event(&self) -> SessionEvent {
        let r = self.events_rx.lock().await.recv().await;
        match r {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }

    /// A sender of video frames (cheap to clone; use from the encoder's task).
    pub fn video_sender(&self) -> VideoSender {
        VideoSender {
            conn: self.conn.clone(),
            in_flight: Arc::new(Mutex::new(VecDeque::new())),
        }
    }

    /// A sender of input (console side).
    pub fn input_sender(&self) -> InputSender {
        InputSender {
            conn: self.conn.clone(),
            events: Arc::new(Mutex::new(None)),
            pointer_seq: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Ends the session: tells the peer (control channel and relay) and closes the inner connection.
    pub async fn end(&self, reason: EndReason) {
        record(
            &self.end_info,
            SessionEnd {
                reason: reason.clone(),
                local: true,
            },
        );
        // End is the last control message: finish the stream and wait (bounded) until the peer has
        // read it, because closing the connection would discard it if still unsent.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let mut s = self.ctl_send.lock().await;
            if write_frame(
                &mut s,
                &ControlMsg::End {
                    reason: reason.clone(),
                },
            )
            .await
            .is_ok()
                && s.finish().is_ok()
            {
                let _ = s.stopped().await;
            }
        })
        .await;
        let _ = self.end_tx.try_send(reason.clone());
        // The supervisor closes the inner connection after telling the relay; give it a moment,
        // then close regardless.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.conn.closed()).await;
        self.conn
            .close(VarInt::from_u32(close::ENDED), &close_reason(&reason));
    }

    /// Waits until the session is over and says why.
    pub async fn closed(&self) -> SessionEnd {
        let e = self.conn.closed().await;
        if let Some(end) = self
            .end_info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return end;
        }
        end_of(&e)
    }

    /// Closes this side's relay link as a network cut would (tests and diagnostics); the supervisor
    /// then reconnects and resumes the session within the grace period.
    pub fn simulate_link_loss(&self) {
        self.carrier.close_link();
    }

    fn ended(&self) -> SessionError {
        if let Some(end) = self
            .end_info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return SessionError::Ended(end);
        }
        match self.conn.close_reason() {
            Some(e) => SessionError::Ended(end_of(&e)),
            None => SessionError::Ended(SessionEnd {
                reason: EndReason::Other("control channel closed".into()),
                local: false,
            }),
        }
    }

    async fn wait_ended(&self) -> SessionError {
        SessionError::Ended(self.closed().await)
    }
}

async fn control_reader(
    mut recv: RecvStream,
    tx: mpsc::Sender<Result<ControlMsg, SessionError>>,
    direct: mpsc::Sender<PeerCandidates>,
) {
    loop {
        let m = read_frame::<ControlMsg>(&mut recv).await;
        // The session layer's own message: the direct path's driver takes it.
        if let Ok(ControlMsg::PathCandidates {
            candidates,
            relay_only,
        }) = m
        {
            // A full queue: the driver has a set it has not taken yet; this one waits for the
            // peer's next (the driver takes one set per few seconds anyway).
            let _ = direct.try_send(PeerCandidates {
                candidates,
                relay_only,
            });
            continue;
        }
        let fatal = m.is_err();
        if tx.send(m).await.is_err() || fatal {
            return;
        }
    }
}

/// What a clipboard update holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipFormat {
    /// UTF-8 text (at most [`MAX_CLIP_TEXT`] bytes; checked to be UTF-8 when read).
    Text,
    /// A PNG image (at most [`MAX_CLIP_IMAGE`] bytes; starts with the PNG signature).
    Png,
}

impl ClipFormat {
    fn byte(self) -> u8 {
        match self {
            ClipFormat::Text => 1,
            ClipFormat::Png => 2,
        }
    }
    fn of(b: u8) -> Option<ClipFormat> {
        match b {
            1 => Some(ClipFormat::Text),
            2 => Some(ClipFormat::Png),
            _ => None,
        }
    }
    /// The most bytes of this format accepted.
    pub fn limit(self) -> usize {
        match self {
            ClipFormat::Text => MAX_CLIP_TEXT,
            ClipFormat::Png => MAX_CLIP_IMAGE,
        }
    }
}

/// A clipboard update from the peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClipItem {
    pub format: ClipFormat,
    pub data: Bytes,
}

/// One file transfer's stream (both halves), for `tandem_toolbox`'s protocol.
#[derive(Debug)]
pub struct TransferStream {
    pub send: SendStream,
    pub recv: RecvStream,
}

/// Opens a file transfer's stream (below video in priority).
#[derive(Clone, Debug)]
pub struct TransferOpener {
    conn: Connection,
}

impl TransferOpener {
    pub async fn open(&self) -> Result<TransferStream, SessionError> {
        let (mut send, recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| SessionError::Ended(end_of(&e)))?;
        let _ = send.set_priority(i32::MIN);
        send.write_all(&[KIND_FILE])
            .await
            .map_err(|e| SessionError::Protocol(e.to_string()))?;
        Ok(TransferStream { send, recv })
    }
}

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

/// Why a stream was refused (application error code on stop/reset).
const STREAM_REFUSED: u32 = 1;

/// The streams one side accepts from the other.
#[derive(Clone)]
enum Accepts {
    /// The console: video frames.
    Video {
        tx: mpsc::Sender<VideoFrame>,
        held: Arc<AtomicUsize>,
    },
    /// The agent: input events, delivered once `open` is set.
    Input {
        tx: mpsc::Sender<InputItem>,
        open: Arc<InputGate>,
    },
}

/// Accepts the peer's unidirectional streams and routes them by their kind byte; a kind this side
/// does not accept from its peer is stopped.
async fn accept_streams(conn: Connection, accepts: Accepts, clip: ToolboxIn<ClipItem>) {
    let newest = Arc::new(AtomicU64::new(0));
    let permits = Arc::new(Semaphore::new(VIDEO_READERS));
    let mut readers = tokio::task::JoinSet::new();
    loop {
        let mut recv = tokio::select! {
            s = conn.accept_uni() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
            Some(_) = readers.join_next(), if !readers.is_empty() => continue,
        };
        let (accepts, newest, permits) = (accepts.clone(), newest.clone(), permits.clone());
        let clip = clip.clone();
        readers.spawn(async move {
            let mut kind = [0u8; 1];
            if recv.read_exact(&mut kind).await.is_err() {
                return;
            }
            match (kind[0], accepts) {
                (KIND_VIDEO, Accepts::Video { tx, held }) => {
                    read_video(recv, tx, newest, permits, held).await
                }
                (KIND_INPUT, Accepts::Input { tx, open }) => {
                    read_input_events(recv, tx, open).await
                }
                (KIND_CLIPBOARD, _) => read_clipboard(recv, clip).await,
                _ => {
                    // A channel this side does not take from its peer, or one this version does
                    // not know (a newer peer): refuse it politely.
                    let _ = recv.stop(VarInt::from_u32(0));
                }
            }
        });
    }
}

/// Where one kind of toolbox item goes, and (agent) the consent gate it waits for.
struct ToolboxIn<T> {
    tx: mpsc::Sender<T>,
    gate: Option<Arc<InputGate>>,
}

impl<T> Clone for ToolboxIn<T> {
    fn clone(&self) -> Self {
        ToolboxIn {
            tx: self.tx.clone(),
            gate: self.gate.clone(),
        }
    }
}

impl<T> ToolboxIn<T> {
    /// Agent: nothing of the toolbox but chat before the user's answer.
    fn open(&self) -> bool {
        self.gate
            .as_ref()
            .is_none_or(|g| g.open.load(Ordering::SeqCst))
    }
}

async fn read_clipboard(mut recv: RecvStream, clip: ToolboxIn<ClipItem>) {
    let mut f = [0u8; 1];
    if recv.read_exact(&mut f).await.is_err() {
        return;
    }
    let Some(format) = ClipFormat::of(f[0]) else {
        let _ = recv.stop(VarInt::from_u32(STREAM_REFUSED));
        return;
    };
    if !clip.open() {
        let _ = recv.stop(VarInt::from_u32(STREAM_REFUSED));
        return;
    }
    let data = match recv.read_to_end(format.limit()).await {
        Ok(d) => d,
        Err(quinn::ReadToEndError::TooLong) => {
            tracing::warn!(?format, "clipboard update over the size limit dropped");
            let _ = recv.stop(VarInt::from_u32(close::PROTOCOL));
            return;
        }
        Err(_) => return,
    };
    let valid = match format {
        ClipFormat::Text => std::str::from_utf8(&data).is_ok(),
        ClipFormat::Png => data.starts_with(&PNG_SIGNATURE),
    };
    if !valid {
        tracing::warn!(?format, "malformed clipboard update dropped");
        return;
    }
    // Newest wins: if the consumer lags, older updates are the ones that go.
    let _ = clip.tx.try_send(ClipItem {
        format,
        data: Bytes::from(data),
    });
}

/// Accepts the peer's bidirectional streams: file transfers (kind byte first).
async fn accept_transfers(conn: Connection, files: ToolboxIn<TransferStream>) {
    let mut readers = tokio::task::JoinSet::new();
    loop {
        let (mut send, mut recv) = tokio::select! {
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
            Some(_) = readers.join_next(), if !readers.is_empty() => continue,
        };
        let files = files.clone();
        readers.spawn(async move {
            let mut kind = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut kind));
            if !matches!(read.await, Ok(Ok(()))) {
                return;
            }
            let refuse = |send: &mut SendStream, recv: &mut RecvStream| {
                let _ = recv.stop(VarInt::from_u32(STREAM_REFUSED));
                let _ = send.reset(VarInt::from_u32(STREAM_REFUSED));
            };
            if kind[0] != KIND_FILE || !files.open() {
                refuse(&mut send, &mut recv);
                return;
            }
            let _ = send.set_priority(i32::MIN);
            if let Err(
                mpsc::error::TrySendError::Full(mut t) | mpsc::error::TrySendError::Closed(mut t),
            ) = files.tx.try_send(TransferStream { send, recv })
            {
                refuse(&mut t.send, &mut t.recv);
            }
        });
    }
}

async fn read_video(
    mut recv: RecvStream,
    tx: mpsc::Sender<VideoFrame>,
    newest: Arc<AtomicU64>,
    permits: Arc<Semaphore>,
    held: Arc<AtomicUsize>,
) {
    // A permit before reading, held until the frame is queued for the decoder: at most
    // VIDEO_READERS frames are read at once, the rest wait in the peer's flow control.
    let Ok(_permit) = permits.acquire_owned().await else {
        return;
    };
    let mut seq = [0u8; 8];
    if recv.read_exact(&mut seq).await.is_err() {
        return;
    }
    let seq = u64::from_be_bytes(seq);
    if seq <= newest.load(Ordering::Acquire) {
        // Already overtaken by a newer frame: not worth reading.
        let _ = recv.stop(VarInt::from_u32(0));
        return;
    }
    let data = match recv.read_to_end(MAX_VIDEO_FRAME).await {
        Ok(d) => d,
        Err(quinn::ReadToEndError::TooLong) => {
            tracing::warn!(seq, "video frame over {MAX_VIDEO_FRAME} bytes dropped");
            let _ = recv.stop(VarInt::from_u32(close::PROTOCOL));
            return;
        }
        Err(_) => return,
    };
    // Deliver only frames newer than any delivered: a frame that completes late is dropped.
    let len = data.len();
    held.fetch_add(len, Ordering::Relaxed);
    let prev = newest.fetch_max(seq, Ordering::AcqRel);
    let queued = seq > prev
        && tx
            .send(VideoFrame {
                seq,
                data: Bytes::from(data),
            })
            .await
            .is_ok();
    if !queued {
        held.fetch_sub(len, Ordering::Relaxed);
    }
}

async fn read_input_events(
    mut recv: RecvStream,
    tx: mpsc::Sender<InputItem>,
    open: Arc<InputGate>,
) {
    let mut h = [0u8; FRAME_HEADER];
    let mut buf = Vec::new();
    loop {
        if recv.read_exact(&mut h).await.is_err() {
            return;
        }
        let Ok(len) = frame_len(h, MAX_INPUT_MSG) else {
            let _ = recv.stop(VarInt::from_u32(close::PROTOCOL));
            return;
        };
        buf.resize(len, 0);
        if recv.read_exact(&mut buf).await.is_err() {
            return;
        }
        if !open.admit() {
            // Before the user's answer: dropped, never kept for later.
            continue;
        }
        if tx
            .send(InputItem::Event(Bytes::copy_from_slice(&buf)))
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn read_pointer(conn: Connection, tx: mpsc::Sender<InputItem>, open: Arc<InputGate>) {
    let mut newest: Option<u32> = None;
    while let Ok(mut d) = conn.read_datagram().await {
        if d.len() < 5 || d.len() > MAX_INPUT_MSG || d[0] != DGRAM_POINTER || !open.admit() {
            continue;
        }
        d.advance(1);
        let seq = d.get_u32();
        // Wrapping comparison: newer if within half the sequence space ahead.
        if let Some(n) = newest
            && seq.wrapping_sub(n) as i32 <= 0
        {
            continue;
        }
        newest = Some(seq);
        // Only the newest matters: if the consumer lags, drop rather than queue.
        let _ = tx.try_send(InputItem::Pointer(d));
    }
}

/// Most video frames sent but not yet acknowledged; [`VideoSender::send`] waits beyond that.
pub const MAX_FRAMES_IN_FLIGHT: usize = 3;

/// Sends video frames in order, never more than [`MAX_FRAMES_IN_FLIGHT`] unacknowledged.
///
/// H.264 P-frames reference the frame before them: a frame that is skipped or overtaken breaks
/// the picture until the next keyframe (which is large, so on a slow path it makes things worse).
/// So frames are sent oldest first (each stream's priority is below the previous one's, all below
/// control and input) and never reset; a sender that gets ahead of the path waits here, and the
/// agent's next capture then carries everything that changed meanwhile. Measured with the
/// glass-to-glass bench: with newest-first priority and resets, heavy 1080p scenes (scrolling,
/// dragging) delivered no decodable frame at all.
#[derive(Clone)]
pub struct VideoSender {
    conn: Connection,
    in_flight: Arc<Mutex<VecDeque<(u64, SendStream)>>>,
}

impl VideoSender {
    /// Sends frame `seq` (increasing, starting at 1) on a stream of its own; waits while
    /// [`MAX_FRAMES_IN_FLIGHT`] earlier frames are unacknowledged.
    pub async fn send(&self, seq: u64, data: &[u8]) -> Result<(), SessionError> {
        if data.len() > MAX_VIDEO_FRAME {
            return Err(SessionError::FrameTooLarge(data.len()));
        }
        let mut q = self.in_flight.lock().await;
        while q.len() >= MAX_FRAMES_IN_FLIGHT {
            if let Some((_, old)) = q.pop_front() {
                // Acknowledged, stopped by the peer, or the connection is gone: either way done.
                let _ = old.stopped().await;
            }
        }
        let mut s = self
            .conn
            .open_uni()
            .await
            .map_err(|e| SessionError::Ended(end_of(&e)))?;
        // Older frames first: priority falls with the frame number (wrapping after ~400 days at
        // 30 fps, when one frame briefly goes first).
        let _ = s.set_priority(-((seq & 0x3fff_ffff) as i32));
        let mut header = BytesMut::with_capacity(9);
        header.put_u8(KIND_VIDEO);
        header.put_u64(seq);
        s.write_all(&header)
            .await
            .map_err(|e| SessionError::Protocol(e.to_string()))?;
        s.write_all(data)
            .await
            .map_err(|e| SessionError::Protocol(e.to_string()))?;
        let _ = s.finish();
        q.push_back((seq, s));
        Ok(())
    }
}

/// Sends input: events reliably and in order, pointer moves newest-wins.
#[derive(Clone)]
pub struct InputSender {
    conn: Connection,
    events: Arc<Mutex<Option<SendStream>>>,
    pointer_seq: Arc<AtomicU32>,
}

impl InputSender {
    /// A button, key or text event: reliable and ordered.
    pub async fn send_event(&self, msg: &[u8]) -> Result<(), SessionError> {
        if msg.len() > MAX_INPUT_MSG {
            return Err(SessionError::Protocol("input message too large".into()));
        }
        let mut guard = self.events.lock().await;
        if guard.is_none() {
            let mut s = self
                .conn
                .open_uni()
                .await
                .map_err(|e| SessionError::Ended(end_of(&e)))?;
            // Input goes before video.
            let _ = s.set_priority(i32::MAX);
            s.write_all(&[KIND_INPUT])
                .await
                .map_err(|e| SessionError::Protocol(e.to_string()))?;
            *guard = Some(s);
        }
        let s = guard
            .as_mut()
            .ok_or_else(|| SessionError::Protocol("input stream missing".into()))?;
        let mut b = BytesMut::with_capacity(FRAME_HEADER + msg.len());
        b.put_u32(msg.len() as u32);
        b.put_slice(msg);
        s.write_all(&b)
            .await
            .map_err(|e| SessionError::Protocol(e.to_string()))
    }

    /// A pointer position: sent as a datagram; if it is lost, the next one supersedes it.
    pub fn send_pointer(&self, msg: &[u8]) -> Result<(), SessionError> {
        if msg.len() + 5 > MAX_INPUT_MSG {
            return Err(SessionError::Protocol("pointer message too large".into()));
        }
        let seq = self
            .pointer_seq
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        let mut b = BytesMut::with_capacity(msg.len() + 5);
        b.put_u8(DGRAM_POINTER);
        b.put_u32(seq);
        b.put_slice(msg);
        match self.conn.send_datagram(b.freeze()) {
            Ok(()) => Ok(()),
            Err(quinn::SendDatagramError::ConnectionLost(e)) => {
                Err(SessionError::Ended(end_of(&e)))
            }
            Err(e) => Err(SessionError::Protocol(e.to_string())),
        }
    }
}

/// Whom the supervisor tells about the relay link: the session's user, and the direct path.
struct Tell {
    events: mpsc::Sender<SessionEvent>,
    relink: mpsc::Sender<Relink>,
}

/// Keeps the relay link of a session: reports and survives link loss, and ends the session on both
/// layers together.
async fn supervise(
    mut ctx: LinkCtx,
    transport: LinkTransport,
    carrier: Arc<Carrier>,
    inner: Connection,
    tell: Tell,
    mut end_rx: mpsc::Receiver<EndReason>,
    end_info: EndInfo,
) {
    let Tell { events, relink } = tell;
    let mut path = carrier.path();
    let mut reported = Reported::default();
    let mut report_tick = tokio::time::interval(PATH_REPORT_EVERY);
    report_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = path.changed() => {
                report_path(&mut ctx.link, &carrier, &mut reported, false).await;
            }
            _ = report_tick.tick() => {
                report_path(&mut ctx.link, &carrier, &mut reported, false).await;
            }
            m = ctx.link.recv() => match m {
                Ok(RelayMsg::SessionEnded { reason }) => {
                    tracing::info!(reason = reason.label(), "the relay ended the session");
                    record(&end_info, SessionEnd { reason: reason.clone(), local: false });
                    inner.close(VarInt::from_u32(close::ENDED), &close_reason(&reason));
                    ctx.link.close().await;
                    return;
                }
                Ok(RelayMsg::PeerSuspended { grace_secs }) => {
                    let _ = events.try_send(SessionEvent::PeerSuspended {
                        grace: Duration::from_secs(grace_secs.into()),
                    });
                }
                Ok(RelayMsg::PeerResumed) => {
                    let _ = events.try_send(SessionEvent::PeerResumed);
                }
                Ok(_) => {}
                Err(e) => {
                    // This side's relay link is gone (relay restart, network change, relay shutting
                    // down): resume within the grace period, or end the session.
                    tracing::warn!(error = %e, "lost the relay link; trying to resume the session");
                    carrier.detach();
                    let _ = events.try_send(SessionEvent::LinkLost);
                    match reconnect(&ctx, &inner).await {
                        Ok(link) => {
                            carrier.attach(link.connection().clone(), link.channel());
                            let _ = relink.try_send(Relink {
                                port: link.direct_port(),
                                info: link.path_info(),
                                speaks_paths: link.speaks_paths(),
                            });
                            // Report again on the new link.
                            reported = Reported::default();
                            *transport.lock().unwrap_or_else(|e| e.into_inner()) = link.transport_cell();
                            ctx.link = link;
                            tracing::info!("relay link resumed");
                            let _ = events.try_send(SessionEvent::LinkResumed);
                        }
                        Err(why) => {
                            tracing::warn!("could not resume the session: {why}");
                            let reason = EndReason::Other(format!("lost the connection to the relay: {why}"));
                            record(&end_info, SessionEnd { reason: reason.clone(), local: true });
                            inner.close(VarInt::from_u32(close::LINK_LOST), &close_reason(&reason));
                            return;
                        }
                    }
                }
            },
            r = end_rx.recv() => {
                let reason = r.unwrap_or(EndReason::Other("session dropped".into()));
                report_path(&mut ctx.link, &carrier, &mut reported, true).await;
                let _ = ctx.link.end(reason.clone()).await;
                inner.close(VarInt::from_u32(close::ENDED), &close_reason(&reason));
                ctx.link.close().await;
                return;
            }
            e = inner.closed() => {
                // The inner connection ended (the peer ended it, or it timed out): end the relay
                // session too, so nothing stays half-open.
                let end = end_of(&e);
                report_path(&mut ctx.link, &carrier, &mut reported, true).await;
                let _ = ctx.link.end(end.reason.clone()).await;
                ctx.link.close().await;
                return;
            }
        }
    }
}

/// How often a side on a direct path tells the relay how many bytes it sent there.
const PATH_REPORT_EVERY: Duration = Duration::from_secs(5);
/// Reports are at least this far apart (a path that flaps must not flood the relay).
const PATH_REPORT_GAP: Duration = Duration::from_secs(1);

/// What the relay was last told.
#[derive(Default)]
struct Reported {
    direct: bool,
    bytes: u64,
    at: Option<Instant>,
}

/// Tells the relay the path and the direct bytes, when either changed since the last report.
/// `last`: the session is ending (sent whatever the gap).
async fn report_path(link: &mut RelayLink, carrier: &Carrier, reported: &mut Reported, last: bool) {
    if !link.speaks_paths() {
        // An older relay would take the message for a protocol error.
        return;
    }
    let direct = carrier.current_path().is_direct();
    let bytes = carrier.stats.direct_bytes.load(Ordering::Relaxed);
    if (direct, bytes) == (reported.direct, reported.bytes)
        || (!direct && bytes == 0)
        || (!last && reported.at.is_some_and(|t| t.elapsed() < PATH_REPORT_GAP))
    {
        return;
    }
    *reported = Reported {
        direct,
        bytes,
        at: Some(Instant::now()),
    };
    let _ = link
        .send(&tandem_proto::ClientMsg::PathReport {
            direct,
            direct_bytes: bytes,
        })
        .await;
}

/// Reconnects to the relay and resumes the session within the grace period.
async fn reconnect(ctx: &LinkCtx, inner: &Connection) -> Result<RelayLink, String> {
    let deadline = Instant::now() + ctx.grace;
    let mut backoff = Duration::from_millis(200);
    let mut last = String::from("no attempt");
    while Instant::now() < deadline {
        if inner.close_reason().is_some() {
            return Err("the session ended meanwhile".into());
        }
        let attempt = async {
            let mut link = RelayLink::connect(&ctx.opts).await?;
            link.resume(&ctx.token).await?;
            Ok::<_, ClientError>(link)
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left.max(Duration::from_millis(100)), attempt).await {
            Ok(Ok(link)) => return Ok(link),
            Ok(Err(e)) => {
                if e.code() == Some(ErrorCode::SessionGone) {
                    return Err(e.to_string());
                }
                last = e.to_string();
            }
            Err(_) => last = "timed out".into(),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(backoff.min(left)).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    Err(last)
}
