//! One session on the agent, from the user's answer to its end.

use crate::clipboard::ClipContent;
use crate::desktop::Desktop;
use crate::stream::{ScreenCtl, ScreenMsg, ScreenThread, start_streaming};
use crate::toolbox::{Bridge, ClipState, ClipboardPolicy, Verdict};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tandem_input::{AgentInput, Permission};
use tandem_proto::EndReason;
use tandem_session::{Consent, ControlMsg, Session, SessionError, SessionEvent, names};
use tandem_toolbox::{TransferEvent, Transfers};
use tokio::sync::mpsc;

/// What the user does during a session (in a window, on a terminal, by a signal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostCmd {
    /// Say something to the technician (chat).
    Chat(String),
    /// The user's clipboard switches: share with the technician, take from the technician.
    Clipboard {
        to_technician: bool,
        from_technician: bool,
    },
    /// The user's answer about the image the technician put on the clipboard.
    AcceptImage(bool),
    /// Send this file or folder to the technician (the user chose it).
    SendFiles(std::path::PathBuf),
    /// Cancel a transfer (by the id in its events).
    CancelTransfer(u64),
    /// Switch to view only (`true`) or give control back (`false`).
    ViewOnly(bool),
    /// End the session.
    End,
    /// End the session for this reason (not the user's doing: e.g. the technician's certificate
    /// expired); the technician and the user are told it.
    EndBecause(&'static str),
    /// End the session and the program.
    Quit,
}

/// Where [`run_session`] gets the user's commands from. Cancel-safe: a call may be dropped when
/// something else happened first, and must not lose a command then.
pub trait UserCommands {
    fn next(&mut self) -> impl Future<Output = HostCmd> + Send;
}

/// What happened, for the program to show.
#[derive(Debug)]
pub enum HostEvent {
    /// The user denied; nothing was shared.
    Denied,
    /// The screen cannot be shared (the session goes on, showing nothing).
    ScreenUnavailable(String),
    /// Remote control cannot work here (the session is view only).
    InputUnavailable(String),
    /// The session runs.
    Started {
        view_only: bool,
        /// Whether control can be given back after view only (the user allowed it and input
        /// works).
        control_possible: bool,
    },
    /// The user asked for control, which this session's consent did not allow.
    ControlNotAllowed,
    /// The technician's permissions changed.
    Permissions { view_only: bool },
    /// The encoder's target changed (`load`: because of the encoder's load, not the path).
    VideoTarget { kbps: u32, halved: bool, load: bool },
    /// The link or the peer came and went.
    Link(SessionEvent),
    /// The technician said something (chat; escaped, at most [`tandem_session::MAX_CHAT`]
    /// bytes). Also before the user's answer.
    Chat { text: String },
    /// Clipboard content crossed (`to_technician`: the user's went out; else the technician's
    /// was put on the user's clipboard). Never the content itself.
    Clipboard {
        to_technician: bool,
        image: bool,
        bytes: usize,
    },
    /// A clipboard update was not shared, and why.
    ClipboardRefused { to_technician: bool, why: String },
    /// The technician put an image on the clipboard; the user is asked ([`HostCmd::AcceptImage`]).
    ImageOffered { bytes: usize },
    /// A file transfer's progress, end or failure.
    Transfer(TransferEvent),
    /// What the user chose to send cannot be sent as a whole (some entries were left out, or
    /// nothing could be read); the words say what.
    SendProblem(String),
    /// The clipboard cannot be shared in this session (the words say why).
    ClipboardUnavailable(String),
    /// The user's chat line went to the technician (`delivered`: the console can show chat).
    ChatSent { text: String, delivered: bool },
    /// The session ended.
    Ended {
        /// A sentence for the user (the peer's words escaped).
        text: String,
        /// A stable label (`ended_by_user`, `ended_by_technician`, …).
        reason: &'static str,
    },
}

/// The toolbox's policy for a session (from the agent's configuration).
#[derive(Clone, Debug, Default)]
pub struct Tools {
    pub clipboard: ClipboardPolicy,
    pub files: FilesPolicy,
}

/// Files from the technician.
#[derive(Clone, Debug)]
pub struct FilesPolicy {
    /// The technician may send files (only while they have control).
    pub receive: bool,
    /// Where they go (created if missing).
    pub downloads: std::path::PathBuf,
    /// The most bytes one session may bring.
    pub quota: u64,
}

impl Default for FilesPolicy {
    fn default() -> Self {
        FilesPolicy {
            receive: true,
            downloads: std::path::PathBuf::from("Downloads"),
            quota: tandem_toolbox::DEFAULT_QUOTA,
        }
    }
}

/// How a session ended, for the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The user asked the program to quit.
    pub quit: bool,
}

/// Opens the desktop's screen off the async runtime: a backend may wait on its compositor (the
/// GNOME backend waits for Mutter to announce its streams, normally ≈130 ms, at most seconds).
async fn open_screen(
    d: Arc<dyn Desktop>,
) -> Result<Box<dyn tandem_media::capture::Capturer + Send>, String> {
    match tokio::task::spawn_blocking(move || d.open_screen()).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("the screen could not be opened: {e}")),
    }
}

/// How the wait for the user's answer ended.
#[derive(Debug)]
pub enum Decision {
    /// The user (or the policy) answered; `pending` holds what the console said meanwhile (other
    /// than chat), for [`run_session`].
    Decided {
        consent: Consent,
        pending: Vec<ControlMsg>,
    },
    /// The technician left (or the session broke) before the answer: an ordinary end, reported
    /// with [`HostEvent::Ended`].
    Ended,
}

/// Waits for the user's answer (`decide`) while reading the session: the technician's chat is
/// shown at once (so the user can ask who is calling before deciding), the technician leaving
/// ends the wait, and anything else the console sends is kept for [`run_session`].
pub async fn await_decision(
    s: &Session,
    decide: impl Future<Output = Consent>,
    on: &mut (dyn FnMut(HostEvent) + Send),
) -> Decision {
    tokio::pin!(decide);
    let mut pending = Vec::new();
    loop {
        tokio::select! {
            consent = &mut decide => return Decision::Decided { consent, pending },
            m = s.recv_control() => match m {
                Ok(ControlMsg::Chat { text }) => on(HostEvent::Chat { text: chat_text(&text) }),
                Ok(ControlMsg::End { reason }) => {
                    on(HostEvent::Ended {
                        text: format!(
                            "Session ended before it started: {}.",
                            names::printable(&reason.to_string(), 120)
                        ),
                        reason: reason.label(),
                    });
                    return Decision::Ended;
                }
                Ok(m) => {
                    // A well-behaved console sends little before the answer (a quality or
                    // keyframe request); a flood is not kept.
                    if pending.len() < 64 {
                        pending.push(m);
                    }
                }
                Err(_) => {
                    let end = s.closed().await;
                    on(HostEvent::Ended {
                        text: format!(
                            "Session ended before it started: {}.",
                            names::printable(&end.to_string(), 120)
                        ),
                        reason: end.reason.label(),
                    });
                    return Decision::Ended;
                }
            },
        }
    }
}

/// A chat line as shown: control characters and lookalike tricks escaped, bounded.
fn chat_text(text: &str) -> String {
    names::printable(text, tandem_session::MAX_CHAT)
}

/// Sends a chat line if the technician's console can show it.
async fn say(s: &Session, text: String) -> bool {
    if !s.peer_can(tandem_session::CAP_CHAT) {
        return false;
    }
    let text: String = text.chars().take(tandem_session::MAX_CHAT / 4).collect();
    s.send_control(&ControlMsg::Chat { text }).await.is_ok()
}

/// Sends a chat line during the wait for the user's answer (see [`await_decision`]). Returns
/// whether it went (the console may not have chat).
pub async fn say_before_consent(s: &Session, text: String) -> bool {
    say(s, text).await
}

/// Runs one session to its end after the user's `decision`: sends the decision, and unless it
/// is a denial, shares `desktop`'s screen and, if allowed, lets the technician's input into it.
///
/// Pixels leave this machine only after a decision other than [`Consent::Deny`]; the input gate
/// is on the agent (view only is enforced here, whatever the console sends). `desktop` is `None`
/// where there is nothing to share (the session still runs, for the control channel).
pub async fn run_session(
    s: Session,
    decision: Consent,
    pending: Vec<ControlMsg>,
    desktop: Option<Arc<dyn Desktop>>,
    tools: &Tools,
    cmds: &mut impl UserCommands,
    on: &mut (dyn FnMut(HostEvent) + Send),
) -> Result<Outcome, SessionError> {
    match s.send_control(&ControlMsg::Consent { decision }).await {
        Ok(()) => {}
        // The technician left while the user (or the policy) was deciding: an ordinary end, not
        // a failure of this program.
        Err(SessionError::Ended(end)) => {
            on(HostEvent::Ended {
                text: format!(
                    "Session ended before it started: {}.",
                    names::printable(&end.to_string(), 120)
                ),
                reason: end.reason.label(),
            });
            return Ok(Outcome { quit: false });
        }
        Err(e) => return Err(e),
    }
    if decision == Consent::Deny {
        on(HostEvent::Denied);
        s.end(EndReason::Denied).await;
        return Ok(Outcome { quit: false });
    }
    // Pixels leave this machine only now, after the user's consent.
    let ctl = Arc::new(ScreenCtl::new());
    let (screen_tx, mut screen_rx) = mpsc::channel::<ScreenMsg>(256);
    let streaming = match &desktop {
        Some(d) => match open_screen(d.clone()).await.and_then(|c| {
            start_streaming(
                c,
                s.connection().clone(),
                s.video_sender(),
                ctl.clone(),
                screen_tx,
            )
            .map_err(|e| e.to_string())
        }) {
            Ok(h) => Some(h),
            Err(e) => {
                on(HostEvent::ScreenUnavailable(format!(
                    "cannot share the screen of {}: {e}",
                    d.describe()
                )));
                None
            }
        },
        None => {
            on(HostEvent::ScreenUnavailable(
                "there is no desktop to share".into(),
            ));
            None
        }
    };
    // Without a screen thread the channel is closed at once: not polled then.
    let mut screen_open = streaming.is_some();
    let screen = ScreenThread::new(ctl.clone(), streaming);
    // Input is opened only when the user allowed control (a view-only session never even holds
    // a virtual keyboard).
    let input = match &desktop {
        Some(d) if decision == Consent::AllowControl => {
            let d = d.clone();
            match AgentInput::start(move || d.open_input()) {
                Ok(i) => Some(i),
                Err(e) => {
                    on(HostEvent::InputUnavailable(e.to_string()));
                    None
                }
            }
        }
        _ => None,
    };
    let control_possible = input.is_some() && decision == Consent::AllowControl;
    let mut view_only = !control_possible;
    if let Some(i) = &input {
        i.set_permission(if view_only {
            Permission::ViewOnly
        } else {
            Permission::Control
        });
    }
    if input.is_none() && decision == Consent::AllowControl {
        let _ = s
            .send_control(&ControlMsg::Permissions { view_only: true })
            .await;
    }
    // The clipboard is shared only where the user allowed control (and never while view only).
    let mut clip = ClipState::new(tools.clipboard, Instant::now());
    let mut bridge = None;
    let mut offered_image: Option<ClipContent> = None;
    if decision == Consent::AllowControl
        && s.peer_can(tandem_session::CAP_CLIPBOARD)
        && (tools.clipboard.to_technician || tools.clipboard.from_technician)
    {
        match desktop.as_ref().and_then(|d| d.x11_clipboard()) {
            Some(display) => match Bridge::start(Some(display)).await {
                Ok(b) => bridge = Some(b),
                Err(e) => on(HostEvent::ClipboardUnavailable(format!(
                    "the clipboard cannot be shared: {e}"
                ))),
            },
            None => on(HostEvent::ClipboardUnavailable(
                "the clipboard cannot be shared on this desktop".into(),
            )),
        }
    }
    let (mut transfers, mut transfer_events) = Transfers::new();
    let conn = s.connection().clone();
    transfers.pace_by(std::sync::Arc::new(move || conn.rtt()));
    let mut inbox: Option<tandem_toolbox::Inbox> = None;
    let pump = async {
        match &input {
            Some(i) => i.run(&s).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(pump);
    on(HostEvent::Started {
        view_only,
        control_possible,
    });
    let ended_by_peer = |reason: &dyn std::fmt::Display, label: &'static str| HostEvent::Ended {
        text: format!(
            "Session ended: {}.",
            names::printable(&reason.to_string(), 120)
        ),
        reason: label,
    };
    let by_user = || HostEvent::Ended {
        text: "You ended the session.".into(),
        reason: EndReason::EndedByUser.label(),
    };
    let mut pending = std::collections::VecDeque::from(pending);
    let outcome = async { loop {
        tokio::select! {
            end = &mut pump => {
                on(ended_by_peer(&end, end.reason.label()));
                return Ok(Outcome { quit: false });
            }
            c = async { match bridge.as_mut() { Some(b) => b.changed().await, None => std::future::pending().await } } => {
                let Some(c) = c else { bridge = None; continue };
                let image = matches!(c, ClipContent::Png(_));
                match clip.outgoing(c, !view_only, Instant::now()) {
                    Verdict::Pass((format, data)) => {
                        if s.send_clipboard(format, &data).await.is_ok() {
                            on(HostEvent::Clipboard { to_technician: true, image, bytes: data.len() });
                        }
                    }
                    Verdict::Ask(_) => {}
                    Verdict::Refuse(why) => on(HostEvent::ClipboardRefused { to_technician: true, why: why.into() }),
                }
            }
            e = transfer_events.recv() => if let Some(e) = e {
                on(HostEvent::Transfer(e));
            },
            t = s.accept_transfer() => {
                let Ok(t) = t else { continue };
                let why = if !tools.files.receive {
                    Some("this computer does not take files from technicians")
                } else if view_only {
                    Some("the session is view only")
                } else {
                    None
                };
                if let Some(why) = why {
                    transfers.refuse(t.recv, t.send, why.into());
                    continue;
                }
                if inbox.is_none() {
                    match open_inbox(&tools.files).await {
                        Ok(i) => inbox = Some(i),
                        Err(e) => {
                            transfers.refuse(t.recv, t.send, format!("the download folder cannot be used: {e}"));
                            continue;
                        }
                    }
                }
                if let Some(i) = &inbox {
                    transfers.receive(t.recv, t.send, i.clone());
                }
            }
            item = s.recv_clipboard() => {
                let Ok(item) = item else { continue };
                let bytes = item.data.len();
                match (clip.incoming(item, !view_only, Instant::now()), bridge.as_ref()) {
                    (_, None) => on(HostEvent::ClipboardRefused { to_technician: false, why: "the clipboard is not shared in this session".into() }),
                    (Verdict::Pass(c), Some(b)) => {
                        let image = matches!(c, ClipContent::Png(_));
                        match b.set(c).await {
                            Ok(()) => on(HostEvent::Clipboard { to_technician: false, image, bytes }),
                            Err(e) => on(HostEvent::ClipboardRefused { to_technician: false, why: e }),
                        }
                    }
                    (Verdict::Ask(c), Some(_)) => {
                        offered_image = Some(c);
                        on(HostEvent::ImageOffered { bytes });
                    }
                    (Verdict::Refuse(why), Some(_)) => on(HostEvent::ClipboardRefused { to_technician: false, why: why.into() }),
                }
            }
            m = screen_rx.recv(), if screen_open => match m {
                Some(ScreenMsg::Control(m)) => { let _ = s.send_control(&m).await; }
                Some(ScreenMsg::Display(r)) => if let Some(i) = &input { i.set_display(r) },
                Some(ScreenMsg::Target { kbps, halved, load }) => {
                    on(HostEvent::VideoTarget { kbps, halved, load });
                }
                None => {
                    tracing::info!("the screen stopped");
                    screen_open = false;
                }
            },
            c = cmds.next() => match c {
                HostCmd::End | HostCmd::Quit => {
                    s.end(EndReason::EndedByUser).await;
                    on(by_user());
                    return Ok(Outcome { quit: c == HostCmd::Quit });
                }
                HostCmd::Clipboard { to_technician, from_technician } => {
                    clip.switch(to_technician, from_technician);
                }
                HostCmd::AcceptImage(yes) => {
                    if let (true, Some(c), Some(b)) = (yes, offered_image.take(), bridge.as_ref()) {
                        let bytes = match &c { ClipContent::Png(p) => p.len(), ClipContent::Text(t) => t.len() };
                        match b.set(c).await {
                            Ok(()) => on(HostEvent::Clipboard { to_technician: false, image: true, bytes }),
                            Err(e) => on(HostEvent::ClipboardRefused { to_technician: false, why: e }),
                        }
                    }
                    offered_image = None;
                }
                HostCmd::SendFiles(path) => {
                    if !s.peer_can(tandem_session::CAP_FILES) {
                        on(HostEvent::SendProblem("the technician's console cannot receive files".into()));
                        continue;
                    }
                    match plan_files(path).await {
                        Ok(plan) => {
                            for sk in &plan.skipped {
                                on(HostEvent::SendProblem(format!("{} is not sent: {}", sk.path.display(), sk.reason)));
                            }
                            let opener = s.transfer_opener();
                            transfers.send_all(
                                move || {
                                    let o = opener.clone();
                                    async move {
                                        o.open().await.map(|t| (t.recv, t.send)).map_err(|e| e.to_string())
                                    }
                                },
                                plan.files,
                            );
                        }
                        Err(e) => on(HostEvent::SendProblem(e)),
                    }
                }
                HostCmd::CancelTransfer(id) => {
                    transfers.cancel(id);
                }
                HostCmd::Chat(text) => {
                    let delivered = say(&s, text.clone()).await;
                    on(HostEvent::ChatSent { text, delivered });
                }
                HostCmd::EndBecause(why) => {
                    let reason = EndReason::Other(why.into());
                    s.end(reason.clone()).await;
                    on(ended_by_peer(&why, reason.label()));
                    return Ok(Outcome { quit: false });
                }
                HostCmd::ViewOnly(v) => {
                    if v == view_only {
                        continue;
                    }
                    if !v && !control_possible {
                        on(HostEvent::ControlNotAllowed);
                        continue;
                    }
                    view_only = v;
                    if let Some(i) = &input {
                        i.set_permission(if v { Permission::ViewOnly } else { Permission::Control });
                    }
                    let _ = s.send_control(&ControlMsg::Permissions { view_only: v }).await;
                    on(HostEvent::Permissions { view_only: v });
                }
            },
            m = next_control(&mut pending, &s) => match m {
                Ok(ControlMsg::Chat { text }) => on(HostEvent::Chat { text: chat_text(&text) }),
                Ok(ControlMsg::End { reason }) => {
                    on(ended_by_peer(&reason, reason.label()));
                    return Ok(Outcome { quit: false });
                }
                Ok(ControlMsg::KeyframeRequest) => ctl.keyframe.store(true, Ordering::Relaxed),
                Ok(ControlMsg::SelectMonitor { index }) => ctl.select.store(index as i32, Ordering::Relaxed),
                Ok(ControlMsg::Quality { max_kbps, .. }) => {
                    ctl.max_kbps.store(max_kbps, Ordering::Relaxed);
                }
                Ok(ControlMsg::Stats { .. }) => {
                    // Echo: the console measures the session's round-trip time with it.
                    let _ = s
                        .send_control(&ControlMsg::Stats {
                            rtt_us: s.connection().rtt().as_micros().min(u32::MAX as u128) as u32,
                            fps: ctl.frames.load(Ordering::Relaxed).min(u16::MAX as u64) as u16,
                            kbps: (ctl.bytes.load(Ordering::Relaxed) / 125).min(u32::MAX as u64) as u32,
                            pipeline_us: ctl.pipeline_us.load(Ordering::Relaxed),
                            transport: s.link_transport(),
                        })
                        .await;
                }
                Ok(_) => {}
                Err(_) => {
                    let end = s.closed().await;
                    on(ended_by_peer(&end, end.reason.label()));
                    return Ok(Outcome { quit: false });
                }
            },
            e = s.next_event() => on(HostEvent::Link(e)),
        }
    } }
    .await;
    // Transfers stop with the session's connection: a file cut short stays as a partial for a
    // later resume (cancelling them here would delete it).
    drop(transfers);
    // The screen's capturer is closed before the next session can open one.
    screen.finish().await;
    outcome
}

/// The download folder, created if missing (with the user's permissions).
async fn open_inbox(p: &FilesPolicy) -> Result<tandem_toolbox::Inbox, String> {
    let (dir, quota) = (p.downloads.clone(), p.quota);
    let r = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        tandem_toolbox::Inbox::new(
            dir,
            tandem_toolbox::InboxOptions {
                quota,
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())
    })
    .await;
    r.map_err(|e| e.to_string())?
}

/// What to send for a path the user chose (a folder is walked off the runtime).
async fn plan_files(path: std::path::PathBuf) -> Result<tandem_toolbox::Plan, String> {
    let r = tokio::task::spawn_blocking(move || {
        tandem_toolbox::plan(&path).map_err(|e| format!("{} cannot be sent: {e}", path.display()))
    })
    .await;
    r.map_err(|e| e.to_string())?
}

/// The next control message: first those kept from before the user's answer.
async fn next_control(
    pending: &mut std::collections::VecDeque<ControlMsg>,
    s: &Session,
) -> Result<ControlMsg, SessionError> {
    match pending.pop_front() {
        Some(m) => Ok(m),
        None => s.recv_control().await,
    }
}
