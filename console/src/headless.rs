//! Headless mode: the session's events as text or JSON lines, decoded frames as PNG, an input
//! script played once the user allowed control, and an end after N frames or seconds.
//!
//! # Input scripts
//! One command a line; `#` starts a comment. Positions are pixels of the remote screen.
//! ```text
//! wait 200              # milliseconds
//! move 640 360          # pointer to a pixel
//! click [left|right|middle] [X Y]
//! down left | up left   # press / release a button
//! scroll 3              # wheel notches down (negative: up)
//! type Hello, world     # Unicode text
//! key Enter             # tap a key (names as in tandem_input::keymap::usage_by_name)
//! keydown Shift | keyup Shift
//! combo ctrl-alt-del    # also alt-tab, alt-shift-tab, alt-f4, super, ctrl-esc, ctrl-shift-esc, printscreen
//! keyframe
//! ```

use crate::driver::{self, Cmd, Latest, Update};
use crate::{Failure, exit};
use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_client::EventOut;
use tandem_input::keymap::usage_by_name;
use tandem_input::{Combo, InputEvent, MouseButton, Pos};
use tandem_media::DecodedFrame;
use tandem_session::ClipFormat;
use tandem_session::{Consent, Session};
use tokio::sync::mpsc;

/// One step of an input script.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Wait(Duration),
    Move(u32, u32),
    Button(MouseButton, Option<bool>, Option<(u32, u32)>),
    Scroll(f32),
    Type(String),
    Key(u16, Option<bool>),
    Combo(Combo),
    Keyframe,
}

fn button(s: Option<&str>) -> Result<MouseButton> {
    Ok(match s.unwrap_or("left") {
        "left" => MouseButton::Left,
        "right" => MouseButton::Right,
        "middle" => MouseButton::Middle,
        "back" => MouseButton::Back,
        "forward" => MouseButton::Forward,
        other => bail!("unknown button {other:?}"),
    })
}

fn combo(s: &str) -> Result<Combo> {
    Ok(match s.to_ascii_lowercase().replace('+', "-").as_str() {
        "ctrl-alt-del" | "ctrl-alt-delete" => Combo::CtrlAltDel,
        "alt-tab" => Combo::AltTab,
        "alt-shift-tab" => Combo::AltShiftTab,
        "alt-f4" => Combo::AltF4,
        "super" => Combo::Super,
        "ctrl-esc" => Combo::CtrlEsc,
        "ctrl-shift-esc" => Combo::CtrlShiftEsc,
        "printscreen" => Combo::PrintScreen,
        other => bail!("unknown combination {other:?}"),
    })
}

/// Parses a script; errors name the line.
pub fn parse_script(text: &str) -> Result<Vec<Step>> {
    let mut steps = vec![];
    for (n, raw) in text.lines().enumerate() {
        let line = match raw.split_once('#') {
            // `type` keeps everything, a `#` included, when the line starts with it.
            Some(_) if raw.trim_start().starts_with("type ") => raw.trim(),
            Some((l, _)) => l.trim(),
            None => raw.trim(),
        };
        if line.is_empty() {
            continue;
        }
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        let args: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| -> Result<u32> {
            args.get(i)
                .context("missing number")?
                .parse::<u32>()
                .context("not a number")
        };
        let step = (|| -> Result<Step> {
            Ok(match cmd {
                "wait" => Step::Wait(Duration::from_millis(num(0)? as u64)),
                "move" => Step::Move(num(0)?, num(1)?),
                "click" => {
                    let at = if args.len() >= 3 {
                        Some((num(1)?, num(2)?))
                    } else {
                        None
                    };
                    Step::Button(button(args.first().copied())?, None, at)
                }
                "down" | "up" => {
                    Step::Button(button(args.first().copied())?, Some(cmd == "down"), None)
                }
                "scroll" => Step::Scroll(
                    args.first()
                        .context("missing notches")?
                        .parse::<f32>()
                        .ok()
                        .filter(|v| v.is_finite() && v.abs() <= 100.0)
                        .context("notches: a number up to 100")?,
                ),
                "type" => Step::Type(rest.to_owned()),
                "key" | "keydown" | "keyup" => {
                    let name = args.first().context("missing key name")?;
                    let usage =
                        usage_by_name(name).with_context(|| format!("unknown key {name:?}"))?;
                    let press = match cmd {
                        "keydown" => Some(true),
                        "keyup" => Some(false),
                        _ => None,
                    };
                    Step::Key(usage, press)
                }
                "combo" => Step::Combo(combo(args.first().context("missing combination")?)?),
                "keyframe" => Step::Keyframe,
                other => bail!("unknown command {other:?}"),
            })
        })()
        .with_context(|| format!("input script line {}: {raw:?}", n + 1))?;
        steps.push(step);
    }
    Ok(steps)
}

/// Plays a script into the session; `size` is the remote screen's size in pixels.
async fn play(steps: Vec<Step>, size: (u32, u32), cmds: mpsc::UnboundedSender<Cmd>) {
    let (w, h) = size;
    let pos = |x: u32, y: u32| Pos::from_pixel(x.min(w - 1), y.min(h - 1), w, h);
    let mut at = pos(w / 2, h / 2);
    let send = |c: Cmd| cmds.send(c).is_ok();
    for step in steps {
        let ok = match step {
            Step::Wait(d) => {
                tokio::time::sleep(d).await;
                true
            }
            Step::Move(x, y) => {
                at = pos(x, y);
                send(Cmd::Pointer(at))
            }
            Step::Button(button, press, to) => {
                if let Some((x, y)) = to {
                    at = pos(x, y);
                    send(Cmd::Pointer(at));
                }
                match press {
                    Some(pressed) => send(Cmd::Input(InputEvent::Button {
                        button,
                        pressed,
                        at,
                    })),
                    None => {
                        send(Cmd::Input(InputEvent::Button {
                            button,
                            pressed: true,
                            at,
                        })) && send(Cmd::Input(InputEvent::Button {
                            button,
                            pressed: false,
                            at,
                        }))
                    }
                }
            }
            Step::Scroll(dy) => send(Cmd::Input(InputEvent::Wheel { dx: 0.0, dy, at })),
            Step::Type(text) => send(Cmd::Input(InputEvent::Text { text })),
            Step::Key(usage, press) => match press {
                Some(pressed) => send(Cmd::Input(InputEvent::Key { usage, pressed })),
                None => {
                    send(Cmd::Input(InputEvent::Key {
                        usage,
                        pressed: true,
                    })) && send(Cmd::Input(InputEvent::Key {
                        usage,
                        pressed: false,
                    }))
                }
            },
            Step::Combo(combo) => send(Cmd::Input(InputEvent::Combo { combo })),
            Step::Keyframe => send(Cmd::Keyframe),
        };
        if !ok {
            return;
        }
    }
}

/// `relay (quic)`, or `relay (console tcp, agent quic)` when the two sides' links differ.
pub fn path_label(s: &crate::driver::Stats) -> String {
    if s.route.is_direct() {
        s.route.label().to_string()
    } else if s.console_transport == s.agent_transport {
        format!("relay ({})", s.console_transport)
    } else {
        format!(
            "relay (console {}, agent {})",
            s.console_transport, s.agent_transport
        )
    }
}

/// The path for people: "via relay", and the transports when not both QUIC.
pub fn path_text(s: &crate::driver::Stats) -> String {
    use tandem_client::tandem_net::Transport;
    if s.route.is_direct() {
        return s.route.label().to_string();
    }
    let name = |t: Transport| match t {
        Transport::Quic => "QUIC",
        Transport::Tcp => "TLS over TCP",
        Transport::WebSocket => "WebSocket",
    };
    if s.console_transport == s.agent_transport {
        format!("via relay over {}", name(s.console_transport))
    } else {
        format!(
            "via relay: you over {}, the user over {}",
            name(s.console_transport),
            name(s.agent_transport)
        )
    }
}

pub fn save_png(path: &Path, f: &DecodedFrame) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), f.width, f.height);
    enc.set_color(png::ColorType::Rgba);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    w.write_image_data(&f.rgba)?;
    Ok(())
}

pub struct Options {
    pub seconds: Option<u64>,
    pub frames: Option<u64>,
    pub png: Option<PathBuf>,
    pub script: Option<Vec<Step>>,
    /// Chat lines to send as soon as the session starts (before the user's answer).
    pub chat: Vec<String>,
    /// Put on the user's clipboard once they allowed control.
    pub clipboard_set: Vec<(ClipFormat, Vec<u8>)>,
    /// Write the user's clipboard (text, or a PNG) here each time it changes.
    pub clipboard_get: Option<PathBuf>,
    /// Files or folders to send once the user allowed control.
    pub send: Vec<PathBuf>,
    /// Where files from the user go.
    pub downloads: crate::driver::Downloads,
    /// End the session once every transfer is over (after at least one).
    pub end_when_done: bool,
}

/// Writes `data` to `path` through a temporary file in the same folder (a reader never sees half).
fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, data)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Runs a joined session headless until it ends.
pub async fn run(
    session: Session,
    started: Instant,
    opts: Options,
    out: EventOut,
) -> Result<(), Failure> {
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (tx, mut updates) = mpsc::unbounded_channel();
    let latest = Arc::new(Latest::default());
    let drive = driver::drive(
        session,
        started,
        opts.downloads.clone(),
        cmd_rx,
        tx,
        latest.clone(),
        || {},
    );
    tokio::pin!(drive);
    let deadline = opts
        .seconds
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let sleep_until = |d: Option<tokio::time::Instant>| async move {
        match d {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    let write_png = || {
        if let (Some(path), Some(f)) = (&opts.png, latest.lock().as_ref()) {
            match save_png(path, f) {
                Ok(()) => out.event(
                    "png",
                    &format!(
                        "Wrote the last frame ({}x{}) to {}",
                        f.width,
                        f.height,
                        path.display()
                    ),
                    serde_json::json!({"path": path, "width": f.width, "height": f.height}),
                ),
                Err(e) => eprintln!("tandem-console: cannot write {}: {e:#}", path.display()),
            }
        } else if let Some(path) = &opts.png {
            out.event(
                "png",
                &format!(
                    "No picture arrived from the agent, so {} was not written (the user's \
                     computer may have nothing to share: no desktop, or the agent was started \
                     outside the desktop session)",
                    path.display()
                ),
                serde_json::json!({"path": path, "written": false}),
            );
        }
    };
    for line in &opts.chat {
        let _ = cmd_tx.send(Cmd::Chat(line.clone()));
    }
    let mut script = opts.script;
    let mut clipboard_set = opts.clipboard_set;
    let mut to_send = opts.send;
    // Transfers under way (by id) and whether any ran.
    let mut running = std::collections::HashSet::new();
    // --end-when-done: the session ends at this time unless another transfer starts.
    let mut quiet_until: Option<tokio::time::Instant> = None;
    let mut control = false;
    let mut screen: Option<(u32, u32)> = None;
    let mut frames = 0u64;
    let mut ending: Option<&'static str> = None;
    let mut player = tokio::task::JoinSet::new();
    let mut driver_done = false;
    loop {
        let u = tokio::select! {
            // The driver's last updates are still queued when it returns.
            () = &mut drive, if !driver_done => {
                driver_done = true;
                continue;
            }
            u = updates.recv() => match u {
                Some(u) => u,
                None => return Err(Failure { code: exit::OTHER, error: anyhow!("the session ended without a reason") }),
            },
            _ = sleep_until(deadline), if ending.is_none() => {
                ending = Some("Time is up; session ended.");
                let _ = cmd_tx.send(Cmd::End);
                continue;
            }
            _ = sleep_until(quiet_until), if quiet_until.is_some() && ending.is_none() => {
                ending = Some("Every transfer is over; session ended.");
                let _ = cmd_tx.send(Cmd::End);
                continue;
            }
            _ = tokio::signal::ctrl_c(), if ending.is_none() => {
                ending = Some("You ended the session.");
                let _ = cmd_tx.send(Cmd::End);
                continue;
            }
        };
        match u {
            Update::Consent(decision) => {
                control = decision == Consent::AllowControl;
                if control {
                    for (format, data) in std::mem::take(&mut clipboard_set) {
                        let _ = cmd_tx.send(Cmd::Clipboard(format, data));
                    }
                    for p in std::mem::take(&mut to_send) {
                        let _ = cmd_tx.send(Cmd::SendFiles(p));
                    }
                } else if !std::mem::take(&mut clipboard_set).is_empty() {
                    out.event(
                        "clipboard_not_sent",
                        "Clipboard not sent: the user has not allowed control.",
                        serde_json::json!({"reason": "the user has not allowed control"}),
                    );
                }
                let what = match decision {
                    Consent::AllowControl => "allowed control",
                    Consent::ViewOnly => "allowed viewing only",
                    Consent::Deny => "denied the request",
                };
                out.event(
                    "consent",
                    &format!("The user {what}."),
                    serde_json::json!({"decision": format!("{decision:?}")}),
                );
            }
            Update::Permissions { view_only } => {
                control = !view_only;
                out.event(
                    "permissions",
                    if view_only {
                        "The user switched to view only."
                    } else {
                        "The user allowed control."
                    },
                    serde_json::json!({"view_only": view_only}),
                );
            }
            Update::FirstFrame { width, height, ms } => {
                screen.get_or_insert((width, height));
                out.event(
                    "first_frame",
                    &format!("Remote screen {width}x{height} after {ms:.0} ms"),
                    serde_json::json!({"width": width, "height": height, "join_to_first_frame_ms": ms}),
                );
            }
            Update::Frame => {
                frames += 1;
                if opts.frames.is_some_and(|n| frames >= n) && ending.is_none() {
                    ending = Some("Frame limit reached; session ended.");
                    let _ = cmd_tx.send(Cmd::End);
                }
            }
            Update::Cursor(c) => {
                if c.screen_w > 0 && c.screen_h > 0 {
                    screen = Some((c.screen_w, c.screen_h));
                }
            }
            Update::CursorImage(_) => {}
            Update::Monitors { monitors, current } => out.event(
                "monitors",
                &format!(
                    "The user has {} monitor(s); sharing {}",
                    monitors.len(),
                    monitors
                        .get(current as usize)
                        .map_or("?", |m| m.name.as_str())
                ),
                serde_json::json!({"count": monitors.len(), "current": current,
                    "monitors": monitors.iter().map(|m| serde_json::json!({"name": m.name, "width": m.width, "height": m.height, "primary": m.primary})).collect::<Vec<_>>()}),
            ),
            Update::Stats(s) => out.event(
                "stats",
                &format!(
                    "{:.0} fps, {:.0} kbit/s, round trip {:.1} ms (path {:.1} ms, {}){}",
                    s.fps,
                    s.kbit_s,
                    s.rtt_ms,
                    s.path_rtt_ms,
                    path_text(&s),
                    s.glass_ms
                        .map(|g| format!(", glass-to-glass ≈{g:.0} ms"))
                        .unwrap_or_default()
                ),
                serde_json::json!({"rtt_ms": s.rtt_ms, "path_rtt_ms": s.path_rtt_ms, "path": path_label(&s), "route": s.route.name(), "max_frame_gap_ms": s.max_frame_gap_ms,
                    "console_transport": s.console_transport.label(), "agent_transport": s.agent_transport.label(),
                    "frames": s.frames, "fps": s.fps, "kbit_s": s.kbit_s, "glass_ms_estimate": s.glass_ms,
                    "decode_ms": s.decode_ms}),
            ),
            Update::Link(text) => out.event("link", text, serde_json::json!({})),
            Update::Path {
                kind,
                after_join_ms,
            } => out.event(
                "path",
                &format!("The session's packets now go {}", match kind {
                    tandem_session::direct::PathKind::Relay => "through the relay".to_string(),
                    k => format!("straight to the user ({})", k.label()),
                }),
                serde_json::json!({"path": kind.label(), "route": kind.name(),
                    "after_join_ms": after_join_ms}),
            ),
            Update::Clipboard(item) => {
                let image = item.format == ClipFormat::Png;
                let kept = match &opts.clipboard_get {
                    Some(path) => match write_atomically(path, &item.data) {
                        Ok(()) => Some(path.display().to_string()),
                        Err(e) => {
                            eprintln!("tandem-console: cannot write {}: {e}", path.display());
                            None
                        }
                    },
                    None => None,
                };
                out.event(
                    "clipboard",
                    &format!(
                        "The user's clipboard: {} of {} bytes{}",
                        if image { "an image" } else { "text" },
                        item.data.len(),
                        kept.as_ref().map(|p| format!(", written to {p}")).unwrap_or_else(|| " (not kept: no --clipboard-get)".into())
                    ),
                    serde_json::json!({"image": image, "bytes": item.data.len(), "path": kept}),
                );
            }
            Update::Transfer(e) => {
                use tandem_toolbox::TransferEvent;
                let data = serde_json::to_value(&e).unwrap_or_default();
                match &e {
                    TransferEvent::Progress { id, progress, .. } => {
                        running.insert(*id);
                        quiet_until = None;
                        out.event("transfer", &progress.line(), data);
                    }
                    TransferEvent::Done { id, direction, stored_as, size, resumed_from, .. } => {
                        running.remove(id);
                        let text = format!(
                            "{} {} ({}), verified{}",
                            if *direction == tandem_toolbox::Direction::Incoming { "Received" } else { "Sent" },
                            stored_as,
                            tandem_toolbox::human_bytes(*size),
                            if *resumed_from > 0 { format!(", resumed at {}", tandem_toolbox::human_bytes(*resumed_from)) } else { String::new() }
                        );
                        out.event("transfer_done", &text, data);
                    }
                    TransferEvent::Failed { id, name, error, .. } => {
                        running.remove(id);
                        out.event("transfer_failed", &format!("{name}: {error}"), data);
                    }
                }
                if opts.end_when_done && running.is_empty() && ending.is_none() {
                    quiet_until = Some(tokio::time::Instant::now() + Duration::from_millis(1500));
                }
            }
            Update::SendProblem(why) => out.event("send_problem", &why, serde_json::json!({})),
            Update::ClipboardNotSent(why) => out.event(
                "clipboard_not_sent",
                &format!("Clipboard not sent: {why}."),
                serde_json::json!({"reason": why}),
            ),
            Update::Chat { text } => out.event(
                "chat",
                &format!("[{}] User: {text}", crate::clock()),
                serde_json::json!({"from": "user", "text": text}),
            ),
            Update::ChatSent { text, delivered } => out.event(
                "chat_sent",
                &if delivered {
                    format!("[{}] You: {text}", crate::clock())
                } else {
                    "The agent cannot show chat; not sent.".to_owned()
                },
                serde_json::json!({"text": text, "sent": delivered}),
            ),
            Update::Undecodable { reason } => out.event(
                "undecodable",
                "The remote picture could not be decoded; the decoder was restarted and a fresh picture asked for.",
                serde_json::json!({"reason": reason}),
            ),
            Update::PictureBack => {
                out.event("picture_back", "The remote picture is back.", serde_json::json!({}))
            }
            Update::Ended {
                text,
                reason,
                exit_code,
            } => {
                write_png();
                let text = ending.map_or(text, str::to_owned);
                out.event(
                    "ended",
                    &text,
                    serde_json::json!({"reason": reason, "frames": frames}),
                );
                if exit_code == exit::OK {
                    return Ok(());
                }
                return Err(Failure {
                    code: exit_code,
                    error: anyhow!("{text}"),
                });
            }
        }
        // The script starts once control is allowed and the screen size is known.
        if control
            && let Some(size) = screen
            && size.0 > 0
            && size.1 > 0
            && let Some(steps) = script.take()
        {
            out.event(
                "script",
                &format!("Playing the input script ({} steps)", steps.len()),
                serde_json::json!({"steps": steps.len()}),
            );
            player.spawn(play(steps, size, cmd_tx.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_parses() {
        let s = parse_script(
            "# a test\nwait 10\nmove 5 6\nclick\nclick right 1 2\ndown left\nup left\nscroll -2.5\n\
             type a # b\nkey Enter\nkeydown shift\nkeyup Shift\ncombo Ctrl+Alt+Del\nkeyframe\n\n",
        )
        .unwrap();
        assert_eq!(s.len(), 13);
        assert_eq!(s[0], Step::Wait(Duration::from_millis(10)));
        assert_eq!(s[2], Step::Button(MouseButton::Left, None, None));
        assert_eq!(s[3], Step::Button(MouseButton::Right, None, Some((1, 2))));
        assert_eq!(s[6], Step::Scroll(-2.5));
        assert_eq!(s[7], Step::Type("a # b".into()));
        assert_eq!(s[9], Step::Key(0xE1, Some(true)));
        assert_eq!(s[11], Step::Combo(Combo::CtrlAltDel));
    }

    #[test]
    fn script_errors_name_the_line() {
        for bad in [
            "move 1",
            "click sideways",
            "key NoSuchKey",
            "scroll 1e9",
            "fly",
            "combo ctrl-z",
        ] {
            let e = parse_script(&format!("wait 1\n{bad}")).unwrap_err();
            assert!(format!("{e:#}").contains("line 2"), "{bad}: {e:#}");
        }
    }
}
