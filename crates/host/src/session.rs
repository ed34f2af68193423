//! One session on the agent, from the user's answer to its end.

use crate::desktop::Desktop;
use crate::stream::{ScreenCtl, ScreenMsg, ScreenThread, start_streaming};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tandem_input::{AgentInput, Permission};
use tandem_proto::EndReason;
use tandem_session::{Consent, ControlMsg, Session, SessionError, SessionEvent, names};
use tokio::sync::mpsc;

/// What the user does during a session (in a window, on a terminal, by a signal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostCmd {
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
    /// The session ended.
    Ended {
        /// A sentence for the user (the peer's words escaped).
        text: String,
        /// A stable label (`ended_by_user`, `ended_by_technician`, …).
        reason: &'static str,
    },
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

/// Runs one session to its end after the user's `decision`: sends the decision, and unless it
/// is a denial, shares `desktop`'s screen and, if allowed, lets the technician's input into it.
///
/// Pixels leave this machine only after a decision other than [`Consent::Deny`]; the input gate
/// is on the agent (view only is enforced here, whatever the console sends). `desktop` is `None`
/// where there is nothing to share (the session still runs, for the control channel).
pub async fn run_session(
    s: Session,
    decision: Consent,
    desktop: Option<Arc<dyn Desktop>>,
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
    let outcome = async { loop {
        tokio::select! {
            end = &mut pump => {
                on(ended_by_peer(&end, end.reason.label()));
                return Ok(Outcome { quit: false });
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
            m = s.recv_control() => match m {
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
    // The screen's capturer is closed before the next session can open one.
    screen.finish().await;
    outcome
}
