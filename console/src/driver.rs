//! The console's side of a running session, shared by the window and the headless mode: decodes
//! video into the newest frame, forwards the technician's input and requests, measures the stats
//! line and reports everything the agent says as [`Update`]s.
//!
//! Frames are not queued: the newest decoded frame replaces the previous one in [`Latest`], so a
//! slow window never shows old pictures.
//!
//! Video is decoded in a sandboxed child process ([`tandem_sandbox`]): when it dies on a hostile
//! frame it is restarted, a keyframe is asked for and the technician is told the picture could
//! not be decoded ([`Update::Undecodable`]) until the next picture ([`Update::PictureBack`]); if
//! it dies too often the session ends with that reason.

use crate::exit;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tandem_client::tandem_net::Transport;
use tandem_input::{InputClient, InputEvent, Pos};
use tandem_media::DecodedFrame;
use tandem_proto::EndReason;
use tandem_sandbox::{Decoded, RestartPolicy, SandboxedDecoder, WorkerCommand};
use tandem_session::direct::PathKind;
use tandem_session::{
    ClipFormat, ClipItem, Consent, ControlMsg, MonitorInfo, Session, SessionEvent, names,
};
use tandem_toolbox::{TransferEvent, Transfers};
use tokio::sync::mpsc;

/// What the technician asks of the session.
#[derive(Debug)]
pub enum Cmd {
    Input(InputEvent),
    /// Pointer position (sent as a datagram: newest wins).
    Pointer(Pos),
    Keyframe,
    /// Ceiling for the video bitrate in kbit/s (0: follow the path).
    Quality(u32),
    Monitor(u8),
    /// Say something to the user (chat; works before their answer).
    Chat(String),
    /// Put this on the user's clipboard (sent only while the technician has control).
    Clipboard(ClipFormat, Vec<u8>),
    /// Send this file or folder to the user (only while the technician has control; the
    /// agent's policy decides too).
    SendFiles(PathBuf),
    /// Cancel a transfer (by the id in its events).
    CancelTransfer(u64),
    End,
}

/// The remote cursor.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cursor {
    pub x: i32,
    pub y: i32,
    pub visible: bool,
    pub screen_w: u32,
    pub screen_h: u32,
}

/// The remote cursor's image.
#[derive(Clone, Debug, PartialEq)]
pub struct CursorImage {
    pub width: u16,
    pub height: u16,
    pub hot_x: u16,
    pub hot_y: u16,
    pub scale: u8,
    /// Premultiplied RGBA.
    pub rgba: Vec<u8>,
}

/// Measurements for the stats line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Control-channel round trip (console → agent → console).
    pub rtt_ms: f64,
    /// The inner QUIC connection's smoothed RTT.
    pub path_rtt_ms: f64,
    /// Frames decoded per second over the last interval.
    pub fps: f64,
    pub kbit_s: f64,
    /// Agent capture → encoded median + half the path RTT + decode and conversion here (once
    /// frames flow).
    pub glass_ms: Option<f64>,
    pub decode_ms: f64,
    pub frames: u64,
    /// How each side's relay link travels (the agent's as it reported it).
    pub console_transport: Transport,
    pub agent_transport: Transport,
    /// The path this side's packets take (relay, or direct).
    pub route: PathKind,
    /// The longest time between two decoded pictures since the last stats (a freeze shows here).
    pub max_frame_gap_ms: f64,
}

#[derive(Clone, Debug)]
pub enum Update {
    Consent(Consent),
    Permissions {
        view_only: bool,
    },
    FirstFrame {
        width: u32,
        height: u32,
        ms: f64,
    },
    /// A new frame is in [`Latest`].
    Frame,
    Cursor(Cursor),
    CursorImage(CursorImage),
    Monitors {
        monitors: Vec<MonitorInfo>,
        current: u8,
    },
    Stats(Stats),
    Link(&'static str),
    /// The session's packets changed path; `after_join_ms`: since the join began (the clock of
    /// [`Update::FirstFrame`]'s `ms`).
    Path {
        kind: PathKind,
        after_join_ms: f64,
    },
    /// The video decoder died on the remote picture and was restarted; a keyframe was asked for.
    Undecodable {
        reason: String,
    },
    /// A picture was decoded again after [`Update::Undecodable`].
    PictureBack,
    /// A file transfer's progress, end or failure.
    Transfer(TransferEvent),
    /// Files could not be sent (or only some); the words say why.
    SendProblem(String),
    /// The user's clipboard changed (only while the technician has control; the agent decides).
    Clipboard(ClipItem),
    /// A clipboard update was not sent, and why.
    ClipboardNotSent(String),
    /// The user said something (escaped, bounded).
    Chat {
        text: String,
    },
    /// The technician's chat line went (`delivered`: the agent can show chat).
    ChatSent {
        text: String,
        delivered: bool,
    },
    /// The session is over; `exit_code` says why (see `exit`).
    Ended {
        text: String,
        reason: String,
        exit_code: u8,
    },
}

/// The newest decoded frame.
#[derive(Default)]
pub struct Latest {
    frame: Mutex<Option<DecodedFrame>>,
}

impl Latest {
    pub fn lock(&self) -> MutexGuard<'_, Option<DecodedFrame>> {
        self.frame.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where files from the user go.
#[derive(Clone, Debug)]
pub struct Downloads {
    pub dir: PathBuf,
    /// The most bytes one session may bring.
    pub quota: u64,
}

/// Drives `session` until it ends; `wake` is called after each update (the window repaints).
pub async fn drive(
    session: Session,
    started: Instant,
    downloads: Downloads,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    tx: mpsc::UnboundedSender<Update>,
    latest: Arc<Latest>,
    wake: impl Fn(),
) {
    let send = |u: Update| {
        let _ = tx.send(u);
        wake();
    };
    let input = InputClient::new(&session);
    let started_decoder = WorkerCommand::current_exe()
        .map_err(tandem_sandbox::SandboxError::Spawn)
        .and_then(|cmd| SandboxedDecoder::start(cmd, RestartPolicy::default()));
    let mut decoder = match started_decoder {
        Ok(d) => d,
        Err(e) => {
            session.end(EndReason::Other("console error".into())).await;
            send(Update::Ended {
                text: format!("cannot start the video decoder: {e}"),
                reason: "error".into(),
                exit_code: exit::OTHER,
            });
            return;
        }
    };
    let mut consent: Option<Consent> = None;
    let mut view_only = true;
    let (mut transfers, mut transfer_events) = Transfers::new();
    let conn = session.connection().clone();
    transfers.pace_by(std::sync::Arc::new(move || conn.rtt()));
    let mut inbox: Option<tandem_toolbox::Inbox> = None;
    let mut decoded: u64 = 0;
    let mut video_bytes: u64 = 0;
    let mut first = true;
    let mut undecodable = false;
    let mut decode_times: VecDeque<f64> = VecDeque::with_capacity(31);
    let mut ping = tokio::time::interval(Duration::from_secs(1));
    let mut ping_sent: Option<Instant> = None;
    let mut last_stats = (Instant::now(), 0u64, 0u64);
    let mut path = session.path_watch();
    if path.borrow().is_direct() {
        // Direct before this loop started: say so.
        path.mark_changed();
    }
    let mut last_frame_at: Option<Instant> = None;
    let mut max_gap = Duration::ZERO;
    let ended = |text: String, reason: &str, exit_code| Update::Ended {
        text,
        reason: reason.into(),
        exit_code,
    };
    loop {
        tokio::select! {
            f = session.recv_video() => match f {
                Ok(f) => {
                    video_bytes += f.data.len() as u64;
                    let t = Instant::now();
                    match decoder.decode(&f.data) {
                        Ok(Decoded::Frame(frame)) => {
                            decoded += 1;
                            let now = Instant::now();
                            if let Some(l) = last_frame_at.replace(now) {
                                max_gap = max_gap.max(now - l);
                            }
                            if decode_times.len() == 31 {
                                decode_times.pop_front();
                            }
                            decode_times.push_back(t.elapsed().as_secs_f64() * 1e3);
                            if first {
                                first = false;
                                send(Update::FirstFrame {
                                    width: frame.width,
                                    height: frame.height,
                                    ms: started.elapsed().as_secs_f64() * 1e3,
                                });
                            }
                            *latest.lock() = Some(frame);
                            if std::mem::take(&mut undecodable) {
                                send(Update::PictureBack);
                            }
                            send(Update::Frame);
                        }
                        Ok(Decoded::Nothing | Decoded::Skipped) => {}
                        Ok(Decoded::Corrupt(e)) => {
                            tracing::warn!(error = %e, "undecodable frame; asking for a keyframe");
                            let _ = session.send_control(&ControlMsg::KeyframeRequest).await;
                        }
                        Ok(Decoded::Lost(reason)) => {
                            undecodable = true;
                            send(Update::Undecodable { reason });
                            let _ = session.send_control(&ControlMsg::KeyframeRequest).await;
                        }
                        Err(e) => {
                            session.end(EndReason::Other("the console could not decode the video".into())).await;
                            send(ended(e.to_string(), "undecodable", exit::OTHER));
                            return;
                        }
                    }
                }
                Err(_) => {
                    // The session is ending; the control branch reports why.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            c = cmds.recv() => {
                let r = match c {
                    Some(Cmd::Input(e)) => input.send(&e).await,
                    Some(Cmd::Pointer(p)) => input.pointer(p),
                    Some(Cmd::Keyframe) => session.send_control(&ControlMsg::KeyframeRequest).await,
                    Some(Cmd::Quality(kbps)) => session.send_control(&ControlMsg::Quality { max_kbps: kbps, max_fps: 30 }).await,
                    Some(Cmd::Monitor(index)) => session.send_control(&ControlMsg::SelectMonitor { index }).await,
                    Some(Cmd::Clipboard(format, data)) => {
                        let why = if consent != Some(Consent::AllowControl) || view_only {
                            Some("the user has not allowed control")
                        } else if !session.peer_can(tandem_session::CAP_CLIPBOARD) {
                            Some("the user's agent cannot share the clipboard")
                        } else {
                            None
                        };
                        match why {
                            Some(w) => { send(Update::ClipboardNotSent(w.into())); Ok(()) }
                            None => session.send_clipboard(format, &data).await,
                        }
                    }
                    Some(Cmd::SendFiles(path)) => {
                        if consent != Some(Consent::AllowControl) || view_only {
                            send(Update::SendProblem("the user has not allowed control".into()));
                        } else if !session.peer_can(tandem_session::CAP_FILES) {
                            send(Update::SendProblem("the user's agent cannot receive files".into()));
                        } else {
                            let p = path.clone();
                            match tokio::task::spawn_blocking(move || tandem_toolbox::plan(&p)).await {
                                Ok(Ok(plan)) => {
                                    for sk in &plan.skipped {
                                        send(Update::SendProblem(format!("{} is not sent: {}", sk.path.display(), sk.reason)));
                                    }
                                    let opener = session.transfer_opener();
                                    transfers.send_all(
                                        move || {
                                            let o = opener.clone();
                                            async move { o.open().await.map(|t| (t.recv, t.send)).map_err(|e| e.to_string()) }
                                        },
                                        plan.files,
                                    );
                                }
                                Ok(Err(e)) => send(Update::SendProblem(format!("{} cannot be sent: {e}", path.display()))),
                                Err(e) => send(Update::SendProblem(e.to_string())),
                            }
                        }
                        Ok(())
                    }
                    Some(Cmd::CancelTransfer(id)) => {
                        transfers.cancel(id);
                        Ok(())
                    }
                    Some(Cmd::Chat(text)) => {
                        let text: String = text.chars().take(tandem_session::MAX_CHAT / 4).collect();
                        let delivered = session.peer_can(tandem_session::CAP_CHAT)
                            && session.send_control(&ControlMsg::Chat { text: text.clone() }).await.is_ok();
                        send(Update::ChatSent { text: names::printable(&text, tandem_session::MAX_CHAT), delivered });
                        Ok(())
                    }
                    Some(Cmd::End) | None => {
                        session.end(EndReason::EndedByTechnician).await;
                        send(ended("You ended the session.".into(), EndReason::EndedByTechnician.label(), exit::OK));
                        return;
                    }
                };
                if let Err(e) = r {
                    tracing::debug!(error = %e, "request not sent; the session is ending");
                }
            }
            m = session.recv_control() => match m {
                Ok(ControlMsg::Consent { decision }) => {
                    consent = Some(decision);
                    view_only = decision != Consent::AllowControl;
                    send(Update::Consent(decision));
                }
                Ok(ControlMsg::Permissions { view_only: v }) => {
                    view_only = v;
                    send(Update::Permissions { view_only: v });
                }
                Ok(ControlMsg::Chat { text }) => send(Update::Chat { text: names::printable(&text, tandem_session::MAX_CHAT) }),
                Ok(ControlMsg::Cursor { x, y, visible, screen_w, screen_h }) => {
                    send(Update::Cursor(Cursor { x, y, visible, screen_w, screen_h }));
                }
                Ok(ControlMsg::CursorShape { width, height, hot_x, hot_y, scale, rgba }) => {
                    send(Update::CursorImage(CursorImage { width, height, hot_x, hot_y, scale, rgba }));
                }
                Ok(ControlMsg::Monitors { monitors, current }) => send(Update::Monitors { monitors, current }),
                Ok(ControlMsg::Stats { pipeline_us, transport: agent_transport, .. }) => {
                    if let Some(t) = ping_sent.take() {
                        let now = Instant::now();
                        let secs = now.duration_since(last_stats.0).as_secs_f64().max(0.001);
                        let path_rtt_ms = session.connection().rtt().as_secs_f64() * 1e3;
                        let mut d: Vec<f64> = decode_times.iter().copied().collect();
                        d.sort_by(f64::total_cmp);
                        let decode_ms = d.get(d.len() / 2).copied().unwrap_or(0.0);
                        send(Update::Stats(Stats {
                            rtt_ms: t.elapsed().as_secs_f64() * 1e3,
                            path_rtt_ms,
                            fps: (decoded - last_stats.1) as f64 / secs,
                            kbit_s: (video_bytes - last_stats.2) as f64 * 8.0 / secs / 1000.0,
                            glass_ms: (decoded > 0 && pipeline_us > 0)
                                .then(|| pipeline_us as f64 / 1e3 + path_rtt_ms / 2.0 + decode_ms),
                            decode_ms,
                            frames: decoded,
                            console_transport: session.link_transport(),
                            agent_transport,
                            route: session.path(),
                            max_frame_gap_ms: std::mem::take(&mut max_gap).as_secs_f64() * 1e3,
                        }));
                        last_stats = (now, decoded, video_bytes);
                    }
                }
                Ok(ControlMsg::End { reason }) => {
                    let code = if reason == EndReason::Denied { exit::DENIED } else { exit::ENDED_BY_AGENT };
                    send(ended(format!("The session ended: {reason}."), reason.label(), code));
                    return;
                }
                Ok(_) => {}
                Err(_) => {
                    let end = session.closed().await;
                    let code = if end.reason == EndReason::Denied || consent == Some(Consent::Deny) { exit::DENIED } else { exit::ENDED_BY_AGENT };
                    send(ended(format!("The session ended: {end}."), end.reason.label(), code));
                    return;
                }
            },
            _ = ping.tick(), if consent.is_some() && ping_sent.is_none() => {
                ping_sent = Some(Instant::now());
                let _ = session.send_control(&ControlMsg::Stats { rtt_us: 0, fps: 0, kbps: 0, pipeline_us: 0, transport: session.link_transport() }).await;
            }
            e = transfer_events.recv() => if let Some(e) = e {
                send(Update::Transfer(e));
            },
            t = session.accept_transfer() => if let Ok(t) = t {
                // The user chose these files; the console still checks every name, the quota and
                // the free space (the agent is not trusted either).
                if inbox.is_none() {
                    let d = downloads.clone();
                    let opened = tokio::task::spawn_blocking(move || {
                        std::fs::create_dir_all(&d.dir).map_err(|e| format!("{}: {e}", d.dir.display()))?;
                        tandem_toolbox::Inbox::new(d.dir, tandem_toolbox::InboxOptions { quota: d.quota, ..Default::default() })
                            .map_err(|e| e.to_string())
                    }).await;
                    match opened {
                        Ok(Ok(i)) => inbox = Some(i),
                        Ok(Err(e)) => send(Update::SendProblem(format!("the download folder cannot be used: {e}"))),
                        Err(e) => send(Update::SendProblem(e.to_string())),
                    }
                }
                match &inbox {
                    Some(i) => { transfers.receive(t.recv, t.send, i.clone()); }
                    None => transfers.refuse(t.recv, t.send, "the technician's download folder cannot be used".into()),
                }
            },
            c = session.recv_clipboard() => if let Ok(c) = c {
                send(Update::Clipboard(c));
            },
            Ok(()) = path.changed() => {
                let kind = *path.borrow_and_update();
                send(Update::Path {
                    kind,
                    after_join_ms: started.elapsed().as_secs_f64() * 1e3,
                });
            }
            e = session.next_event() => {
                send(Update::Link(match e {
                    SessionEvent::PeerSuspended { .. } => "The user's connection dropped; waiting for it to come back.",
                    SessionEvent::PeerResumed => "The user is back.",
                    SessionEvent::LinkLost => "Lost the connection to the relay; reconnecting…",
                    SessionEvent::LinkResumed => "Reconnected.",
                }));
            }
        }
    }
}
