//! `tandem-agent`: runs on the user's PC. Shows a one-time code, asks the user's consent when a
//! technician joins, and holds the end-to-end session. Thin glue over `tandem-session`.
//!
//! With a display it opens a small window ([`ui`]): the code, the consent prompt, and while a
//! session runs an indicator with End and a view-only switch. `--headless` runs without windows
//! (consent on the terminal or answered by a flag) for servers and tests; events then go to stdout,
//! as text or JSON lines.

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use serde::Deserialize;
use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tandem_client::tandem_certs::RelayTrust;
use tandem_client::{ConnectOptions, EventOut};
use tandem_input::{AgentInput, DisplayRect, Injector, Permission, X11Injector};
use tandem_media::capture::x11::X11Capturer;
use tandem_media::capture::{Capturer, CursorShape};
use tandem_media::{ScreenPipeline, Target};
use tandem_proto::EndReason;
use tandem_session::names;
use tandem_session::{
    AgentEvent, AgentHost, CodeChange, Consent, ControlMsg, MAX_CURSOR_SIDE, MonitorInfo, Session,
    SessionConfig, SessionError, SessionEvent,
};
use tokio::sync::mpsc;

mod ui;

/// Name of the configuration file an MSP ships next to the binary.
const SHIPPED_CONFIG: &str = "tandem-agent.toml";

#[derive(Parser, Debug)]
#[command(
    name = "tandem-agent",
    version,
    about = "Tandem agent: lets a technician see and control this PC, with your consent",
    long_about = "Tandem agent: shows a one-time code to read to your technician. When the technician \
joins, you decide: allow control, view only, or deny. Nothing is shown to anyone before you allow it, and \
you can switch to view only or end the session at any time.

With a display it opens a small window; with --headless (or without a display) it works on the \
terminal.

The relay address and its pin come from flags, environment variables, or a tandem-agent.toml file next \
to this program (so that your IT provider can hand out a ready agent).

When UDP to the relay is blocked, the agent reaches it over TLS on TCP (its port, then 443) or a \
WebSocket URL, through the HTTP proxy in $HTTPS_PROXY if there is one; nothing to set up.

Never read the code to someone who called you unexpectedly.",
    after_help = "Example:
  tandem-agent --relay relay.example.com:4433 --relay-pin sha256:3f2a…

While a session runs on the terminal, type `v` + Enter for view only, `c` to give control back, `e` to end.
After someone tried wrong codes 3 times no new code appears until you ask: type `n` + Enter (or press
\"New code\" in the window)."
)]
struct Cli {
    /// Relay address, host:port.
    #[arg(long, env = "TANDEM_RELAY")]
    relay: Option<String>,
    /// The relay certificate's pin (sha256:…), as printed by `tandem-relay fingerprint`.
    #[arg(long, env = "TANDEM_RELAY_PIN")]
    relay_pin: Option<String>,
    /// Trust the relay through this CA file (PEM) instead of a pin.
    #[arg(long, env = "TANDEM_RELAY_CA")]
    relay_ca: Option<PathBuf>,
    /// Configuration file. [default: tandem-agent.toml next to the program, if present]
    #[arg(short, long, env = "TANDEM_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// How consent is asked: `window` (the default with a window) or `tty` (the default without;
    /// asks on this terminal). Either way it is denied after 60 s without an answer. `deny`,
    /// `view-only` and `allow` answer without asking: for demonstrations and tests on machines
    /// without a person in front of them.
    #[arg(long, value_enum)]
    consent: Option<ConsentMode>,
    /// No window: events on stdout, consent on the terminal or by --consent.
    #[arg(long)]
    headless: bool,
    /// Print events as JSON lines on stdout (for scripts and tests).
    #[arg(long)]
    json: bool,
    /// Exit after the first session ends instead of showing a new code.
    #[arg(long)]
    once: bool,
    /// X display to share and control. [default: $DISPLAY; without one, nothing can be shared]
    #[arg(long)]
    display: Option<String>,
    /// Seconds without a code after the first failed attempt to join (a wrong code, or a join that
    /// broke off); the pause doubles after the second, and after the third no new code appears
    /// until you ask for one. At least 1.
    #[arg(long, env = "TANDEM_WRONG_CODE_PAUSE", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    wrong_code_pause: u64,
    /// Where the agent keeps the count of failed attempts across restarts (so that closing and
    /// reopening it does not reset its guess limit).
    /// [default: $XDG_STATE_HOME/tandem or ~/.local/state/tandem]
    #[arg(long, env = "TANDEM_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// With a window, also print the code on stdout (for scripts that drive the window). Without
    /// it, a windowed agent keeps the code off stdout, which desktop sessions often log.
    #[arg(long)]
    print_code: bool,
    #[command(flatten)]
    network: tandem_client::NetworkArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ConsentMode {
    Window,
    Tty,
    Deny,
    ViewOnly,
    Allow,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    relay: Option<String>,
    relay_pin: Option<String>,
    relay_ca: Option<PathBuf>,
    /// `auto`, `quic` or `tcp` (see --transport).
    transport: Option<String>,
    #[serde(default)]
    relay_tcp: Vec<String>,
    relay_websocket: Option<String>,
    proxy: Option<String>,
}

impl FileConfig {
    fn network(&self) -> tandem_client::NetworkArgs {
        tandem_client::NetworkArgs {
            transport: self.transport.clone(),
            relay_tcp: self.relay_tcp.clone(),
            relay_websocket: self.relay_websocket.clone(),
            proxy: self.proxy.clone(),
        }
    }
}

fn load_config(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read configuration file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid configuration file {}", path.display()))
}

fn shipped_config() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.join(SHIPPED_CONFIG);
    p.exists().then_some(p)
}

/// What the window shows.
#[derive(Clone, Debug)]
pub enum Phase {
    Connecting,
    Waiting {
        code: String,
        expires_at: Instant,
        note: Option<String>,
    },
    /// A handshake failed: no code for a while.
    Paused {
        until: Instant,
        note: String,
    },
    /// Wrong codes were tried too often: no code until the user asks.
    Locked {
        note: String,
    },
    Joining,
    Consent {
        technician: String,
        organisation: String,
        /// The names were escaped: they could imitate another name.
        suspicious: bool,
        deadline: Instant,
    },
    InSession {
        technician: String,
        organisation: String,
        view_only: bool,
        control_possible: bool,
        note: Option<String>,
    },
    Ended {
        text: String,
    },
    Failed {
        text: String,
    },
    /// The program is ending: the window closes itself.
    Closing,
}

pub struct State {
    pub phase: Phase,
    pub relay: String,
}

/// State shared by the session logic and the window.
pub struct Shared {
    pub state: Mutex<State>,
    ctx: Option<eframe::egui::Context>,
}

impl Shared {
    fn repaint(&self) {
        if let Some(c) = &self.ctx {
            c.request_repaint();
        }
    }
    fn set_phase(&self, p: Phase) {
        lock(&self.state).phase = p;
        self.repaint();
    }
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the user did, in the window or on the terminal.
#[derive(Debug)]
pub enum UiCmd {
    Consent(Consent),
    /// The user asks for a new code after codes stopped.
    NewCode,
    ViewOnly(bool),
    End,
    /// A line typed on the terminal.
    Line(String),
}

/// Reports every step to stdout (text or JSON lines) and to the window.
struct Report {
    out: EventOut,
    shared: Arc<Shared>,
}

impl Report {
    fn event(&self, kind: &str, text: &str, data: serde_json::Value) {
        self.out.event(kind, text, data);
    }
    fn phase(&self, p: Phase) {
        self.shared.set_phase(p);
    }
    /// Updates the in-session phase's fields.
    fn update_session(&self, f: impl FnOnce(&mut bool, &mut Option<String>)) {
        let mut s = lock(&self.shared.state);
        if let Phase::InSession {
            view_only, note, ..
        } = &mut s.phase
        {
            f(view_only, note);
        }
        drop(s);
        self.shared.repaint();
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tandem-agent: cannot start: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // The window opens on $DISPLAY (the user's desktop); `--display` only chooses what is shared.
    let windowed = !cli.headless && std::env::var_os("DISPLAY").is_some_and(|d| !d.is_empty());
    let (tx, rx) = mpsc::unbounded_channel();
    if !windowed {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                phase: Phase::Connecting,
                relay: String::new(),
            }),
            ctx: None,
        });
        return finish(rt.block_on(run(cli, shared, rx, tx)));
    }
    let ctx = eframe::egui::Context::default();
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            phase: Phase::Connecting,
            relay: cli.relay.clone().unwrap_or_default(),
        }),
        ctx: Some(ctx.clone()),
    });
    let logic = {
        let (shared, tx) = (shared.clone(), tx.clone());
        rt.spawn(async move {
            let r = run(cli, shared.clone(), rx, tx).await;
            shared.set_phase(match &r {
                Ok(()) => Phase::Closing,
                Err(e) => Phase::Failed {
                    // The error may carry a relay's or peer's words: one plain, short line.
                    text: names::printable(&format!("{e:#}"), 300),
                },
            });
            r
        })
    };
    let window = eframe::run_native_ext(
        "tandem-agent",
        ui::options(),
        Some(ctx),
        Box::new({
            let (shared, tx) = (shared.clone(), tx.clone());
            move |_cc| Ok(Box::new(ui::AgentWindow::new(shared, tx)))
        }),
    );
    if let Err(e) = window {
        eprintln!(
            "tandem-agent: cannot open a window ({e}); run with --headless to use the terminal"
        );
    }
    // The window is closed: end any session (the peer is told) and stop.
    let _ = tx.send(UiCmd::End);
    let _ = tx.send(UiCmd::Line("quit".into()));
    match rt.block_on(async { tokio::time::timeout(Duration::from_secs(3), logic).await }) {
        Ok(Ok(r)) => finish(r),
        _ => std::process::ExitCode::SUCCESS,
    }
}

fn finish(r: Result<()>) -> std::process::ExitCode {
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem-agent: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(
    cli: Cli,
    shared: Arc<Shared>,
    mut cmds: mpsc::UnboundedReceiver<UiCmd>,
    cmd_tx: mpsc::UnboundedSender<UiCmd>,
) -> Result<()> {
    let file = match cli.config.clone().or_else(shipped_config) {
        Some(p) => load_config(&p)?,
        None => FileConfig::default(),
    };
    let file_network = file.network();
    let relay = cli.relay.clone().or(file.relay).context(
        "no relay given: use --relay HOST:PORT (or a tandem-agent.toml next to the program)",
    )?;
    lock(&shared.state).relay = relay.clone();
    let pin = cli.relay_pin.clone().or(file.relay_pin);
    let ca = cli.relay_ca.clone().or(file.relay_ca);
    let trust = RelayTrust::from_options(pin.as_deref(), ca.as_deref())?;
    let windowed = shared.ctx.is_some();
    let consent = cli.consent.unwrap_or(if windowed {
        ConsentMode::Window
    } else {
        ConsentMode::Tty
    });
    if consent == ConsentMode::Window && !windowed {
        bail!("--consent window needs a window; without a display use --consent tty");
    }
    if consent == ConsentMode::Tty && !std::io::stdin().is_terminal() {
        bail!(
            "--consent tty needs a terminal; run it in one, or choose --consent deny|view-only|allow"
        );
    }
    if !windowed {
        // One reader of standard input for the consent answer, the in-session commands and the
        // request for a new code (a terminal, or a script's pipe; none when it is closed).
        let tx = cmd_tx.clone();
        std::thread::Builder::new()
            .name("tandem-stdin".into())
            .spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    let Ok(line) = line else { return };
                    if tx.send(UiCmd::Line(line)).is_err() {
                        return;
                    }
                }
            })
            .context("cannot read the terminal")?;
    }
    if matches!(consent, ConsentMode::Allow | ConsentMode::ViewOnly) {
        eprintln!(
            "tandem-agent: WARNING: --consent {consent:?} answers the consent prompt without asking anyone"
        );
    }
    let report = Report {
        out: EventOut { json: cli.json },
        shared,
    };
    let mut opts = ConnectOptions::new(relay.clone(), trust);
    opts.software = format!("tandem-agent {}", env!("CARGO_PKG_VERSION"));
    cli.network
        .clone()
        .or(&file_network)
        .apply(&mut opts)
        .context(
            "invalid network settings (--transport, --relay-tcp, --relay-websocket, --proxy)",
        )?;
    let cfg = SessionConfig {
        software: opts.software.clone(),
        capabilities: vec!["control/v1".into(), "cursor/v1".into()],
        guesses: tandem_session::GuessLimit {
            first_pause: Duration::from_secs(cli.wrong_code_pause),
            ..Default::default()
        },
        ..SessionConfig::default()
    };
    let mut host = AgentHost::connect(opts, cfg)
        .await
        .with_context(|| format!("cannot connect to the relay at {relay}"))?;
    let requester = host.code_requester();
    let tries = tries_file(&cli);
    if let Some(r) = tries.as_deref().and_then(load_tries) {
        host.restore(r);
    }
    let mut saved = host.remembered();
    report.event(
        "connected",
        &format!("Connected to relay {relay}"),
        serde_json::json!({"relay": relay}),
    );
    // The code goes to the user's screen only: with a window, not to stdout (desktop sessions
    // often log it) unless asked for.
    let code_on_stdout = !windowed || cli.print_code;
    loop {
        // The host's step is never dropped for a command: a handshake under way runs to its end
        // (the host burns the code even if it were dropped, but there is no reason to).
        let ev = {
            let next = host.next();
            tokio::pin!(next);
            loop {
                tokio::select! {
                    ev = &mut next => break ev?,
                    // Between sessions only "quit" (the window was closed, or typed) and a request
                    // for a new code matter.
                    c = cmds.recv() => match c {
                        None => return Ok(()),
                        Some(UiCmd::Line(l)) if l.trim() == "quit" => return Ok(()),
                        Some(UiCmd::NewCode) => requester.request(),
                        Some(UiCmd::Line(l)) if matches!(l.trim(), "n" | "new") => requester.request(),
                        Some(_) => {}
                    },
                }
            }
        };
        // Keep the count of failed attempts for a restart, whenever it changed.
        if host.remembered() != saved {
            saved = host.remembered();
            if let Some(p) = &tries
                && let Err(e) = save_tries(p, &saved)
            {
                tracing::warn!(error = %format!("{e:#}"), "cannot keep the count of failed attempts");
            }
        }
        match ev {
            AgentEvent::Code {
                code,
                expires_in,
                why,
            } => {
                let note = match why {
                    CodeChange::New | CodeChange::Requested | CodeChange::Remembered => None,
                    CodeChange::WrongCode => {
                        Some("Someone tried a wrong code; that code is no longer valid.")
                    }
                    CodeChange::Expired => Some("The code expired."),
                    CodeChange::SetupFailed(_) => Some("The connection attempt failed."),
                };
                let prefix = if note.is_some() {
                    "Your new code"
                } else {
                    "Your session code"
                };
                // The code goes to the user's screen only, never to a log.
                let shown = if code_on_stdout {
                    code.grouped()
                } else {
                    "(shown in the window)".into()
                };
                let mut data = serde_json::json!({"expires_in_secs": expires_in.as_secs()});
                if code_on_stdout {
                    data["code"] = code.grouped().into();
                }
                report.event(
                    "code",
                    &format!(
                        "{}{prefix}: {shown}   (valid {} min; read it only to a technician you contacted)",
                        note.map(|n| format!("{n} ")).unwrap_or_default(),
                        expires_in.as_secs() / 60
                    ),
                    data,
                );
                report.phase(Phase::Waiting {
                    code: code.grouped(),
                    expires_at: Instant::now() + expires_in,
                    note: note.map(str::to_owned),
                });
            }
            AgentEvent::Joining { .. } => {
                // No names yet: they are the relay's word until the PAKE has checked that the
                // console was told the same; the consent prompt shows them after that.
                report.event(
                    "joining",
                    "A technician is connecting…",
                    serde_json::json!({}),
                );
                report.phase(Phase::Joining);
            }
            AgentEvent::Paused {
                why,
                failures,
                pause,
            } => {
                let note = format!(
                    "{} A new code appears in {} s.",
                    failure_text(&why),
                    pause.as_secs_f64().ceil().max(1.0)
                );
                report.event(
                    "paused",
                    &note,
                    serde_json::json!({"failures": failures, "pause_secs": pause.as_secs_f64()}),
                );
                report.phase(Phase::Paused {
                    until: Instant::now() + pause,
                    note,
                });
            }
            AgentEvent::Locked { why, failures } => {
                let note = format!(
                    "{}Someone tried wrong codes {failures} times. If you are not on the phone with \
                     your technician right now, close this program. Otherwise ask for a new code{}.",
                    if why == CodeChange::Remembered {
                        "(Before this program was restarted.) "
                    } else {
                        ""
                    },
                    if windowed { "" } else { " (type n + Enter)" }
                );
                report.event("locked", &note, serde_json::json!({"failures": failures}));
                report.phase(Phase::Locked { note });
            }
            AgentEvent::Session(s) => {
                let quit =
                    run_session(*s, consent, cli.display.clone(), &report, &mut cmds).await?;
                if cli.once || quit {
                    return Ok(());
                }
            }
        }
    }
}

/// The warning shown with names that were escaped.
pub const SUSPICIOUS_NAME: &str = "this name contains unusual or invisible characters that can make \
it look like another name; they are shown as \\u{…} codes. Deny unless you are sure.";

/// The file that keeps the count of failed attempts across restarts.
fn tries_file(cli: &Cli) -> Option<PathBuf> {
    let dir = cli.state_dir.clone().or_else(|| {
        std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
            .map(|d| d.join("tandem"))
    })?;
    Some(dir.join("agent-tries.toml"))
}

fn load_tries(path: &Path) -> Option<tandem_session::Remembered> {
    let text = std::fs::read_to_string(path).ok()?;
    match toml::from_str(&text) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable count of failed attempts");
            None
        }
    }
}

/// Writes the count atomically, readable by this user only.
fn save_tries(path: &Path, r: &tandem_session::Remembered) -> Result<()> {
    tandem_client::tandem_certs::write_atomic(path, toml::to_string(r)?.as_bytes(), true)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// What the user is told about a failed handshake.
fn failure_text(why: &CodeChange) -> &'static str {
    match why {
        CodeChange::WrongCode => "Someone tried a wrong code; that code is no longer valid.",
        CodeChange::Remembered => {
            "Attempts with wrong codes were made before this program restarted."
        }
        _ => "A connection attempt failed; that code is no longer valid.",
    }
}

/// Waits for the user's answer; denied after 60 s.
async fn ask_consent(
    mode: ConsentMode,
    technician: &str,
    organisation: &str,
    suspicious: bool,
    report: &Report,
    cmds: &mut mpsc::UnboundedReceiver<UiCmd>,
) -> Consent {
    let wait = Duration::from_secs(60);
    match mode {
        ConsentMode::Deny => return Consent::Deny,
        ConsentMode::ViewOnly => return Consent::ViewOnly,
        ConsentMode::Allow => return Consent::AllowControl,
        ConsentMode::Tty => {
            println!();
            println!("  {technician} of {organisation} wants to connect to this computer.");
            println!("  (name and organisation as the relay reports them)");
            if suspicious {
                println!("  WARNING: {SUSPICIOUS_NAME}");
            }
            println!(
                "  Only continue if YOU contacted them. Nobody legitimate calls you out of the blue."
            );
            println!("  [a] allow control   [v] view only   [d] deny   (denied in 60 s): ");
        }
        ConsentMode::Window => {}
    }
    report.event(
        "consent_asked",
        &format!("Asking you whether {technician} of {organisation} may connect…"),
        serde_json::json!({"technician": technician, "organisation": organisation, "suspicious_name": suspicious}),
    );
    report.phase(Phase::Consent {
        technician: technician.to_owned(),
        organisation: organisation.to_owned(),
        suspicious,
        deadline: Instant::now() + wait,
    });
    let answer = async {
        while let Some(c) = cmds.recv().await {
            match c {
                UiCmd::Consent(c) => return c,
                UiCmd::Line(l) => {
                    return match l.trim().to_lowercase().as_str() {
                        "a" | "allow" => Consent::AllowControl,
                        "v" | "view" | "view only" => Consent::ViewOnly,
                        _ => Consent::Deny,
                    };
                }
                UiCmd::End => return Consent::Deny,
                UiCmd::ViewOnly(_) | UiCmd::NewCode => {}
            }
        }
        Consent::Deny
    };
    tokio::time::timeout(wait, answer)
        .await
        .unwrap_or(Consent::Deny)
}

/// What the path carries now, bits per second: the inner connection's congestion window per
/// round trip.
fn path_rate(inner: &quinn::Connection) -> f64 {
    let rtt = inner.rtt().as_secs_f64().max(0.001);
    inner.stats().path.cwnd as f64 * 8.0 / rtt
}

/// The video bitrate for the encoder: half of what the path carries (the rest is headroom for
/// input, control and retransmissions), between 300 kbit/s and 8 Mbit/s (more buys no visible
/// quality for screen content at 30 fps).
fn path_bitrate(inner: &quinn::Connection) -> u32 {
    (path_rate(inner) * 0.5).clamp(300_000.0, 8_000_000.0) as u32
}

/// Shared between the session loop and the screen thread.
#[derive(Default)]
struct ScreenCtl {
    stop: AtomicBool,
    keyframe: AtomicBool,
    /// A monitor the technician asked for (-1: none pending).
    select: AtomicI32,
    /// The technician's ceiling in kbit/s (0: follow the path only).
    max_kbps: AtomicU32,
    frames: AtomicU64,
    bytes: AtomicU64,
    /// Median capture → encoded time of recent frames.
    pipeline_us: AtomicU32,
}

/// What the screen thread tells the session loop.
enum ScreenMsg {
    Control(ControlMsg),
    Display(DisplayRect),
    /// The encoder's new bitrate target (kbit/s) and whether frames are halved; `load`: the
    /// change came from the encoder's load rather than the path.
    Target {
        kbps: u32,
        halved: bool,
        load: bool,
    },
}

/// Downscales a cursor image by halving until it fits the protocol's limit.
fn cursor_msg(shape: &CursorShape) -> Option<ControlMsg> {
    let (mut w, mut h) = (shape.width as usize, shape.height as usize);
    if w == 0 || h == 0 || shape.rgba.len() != w * h * 4 {
        return None;
    }
    let mut rgba = shape.rgba.clone();
    let mut scale = 1u8;
    while (w > MAX_CURSOR_SIDE as usize || h > MAX_CURSOR_SIDE as usize) && scale < 8 {
        let (nw, nh) = (w.div_ceil(2), h.div_ceil(2));
        let mut out = vec![0u8; nw * nh * 4];
        for y in 0..nh {
            for x in 0..nw {
                let s = ((y * 2) * w + x * 2) * 4;
                out[(y * nw + x) * 4..][..4].copy_from_slice(&rgba[s..s + 4]);
            }
        }
        (w, h, rgba, scale) = (nw, nh, out, scale * 2);
    }
    if w > MAX_CURSOR_SIDE as usize || h > MAX_CURSOR_SIDE as usize {
        return None;
    }
    let s = scale as u32;
    Some(ControlMsg::CursorShape {
        width: w as u16,
        height: h as u16,
        hot_x: ((shape.hot_x / s) as usize).min(w - 1) as u16,
        hot_y: ((shape.hot_y / s) as usize).min(h - 1) as u16,
        scale,
        rgba,
    })
}

fn monitors_msg(c: &X11Capturer, current: usize) -> (ControlMsg, Option<DisplayRect>) {
    let ms = c.monitors();
    let rect = ms.get(current).map(|m| DisplayRect {
        x: m.x as i32,
        y: m.y as i32,
        width: m.width,
        height: m.height,
    });
    let list = ms
        .iter()
        .take(tandem_session::MAX_MONITORS)
        .map(|m| MonitorInfo {
            name: m.name.chars().take(64).collect(),
            width: m.width,
            height: m.height,
            primary: m.primary,
        })
        .collect();
    (
        ControlMsg::Monitors {
            monitors: list,
            current: current.min(255) as u8,
        },
        rect,
    )
}

/// Streams the screen of `display` into the session until stopped: capture → change detection →
/// H.264, at most 30 frames a second, plus the cursor's position and shape and the monitor list.
/// Runs on its own thread (X11 and the encoder block). A frame is sent before the next is captured,
/// so nothing queues behind a slow path: the next frame simply comes later, carrying everything
/// that changed meanwhile.
fn start_streaming(
    display: String,
    inner: quinn::Connection,
    video: tandem_session::VideoSender,
    ctl: Arc<ScreenCtl>,
    tx: mpsc::Sender<ScreenMsg>,
) -> Result<std::thread::JoinHandle<()>> {
    let rt = tokio::runtime::Handle::current();
    let capturer = X11Capturer::open(Some(&display))
        .with_context(|| format!("cannot capture the screen of display {display}"))?;
    let mut pipeline = ScreenPipeline::new(
        capturer,
        Target {
            bitrate_bps: 4_000_000,
            max_fps: 30.0,
        },
    )?;
    let h = std::thread::Builder::new()
        .name("tandem-screen".into())
        .spawn(move || {
            let interval = Duration::from_millis(33);
            let mut seq = 0u64;
            let mut step_no = 0u64;
            let mut bitrate = 4_000_000u32;
            let mut monitor = 0usize;
            let mut last_cursor = None;
            let mut recent = std::collections::VecDeque::with_capacity(31);
            let mut not_before = Instant::now();
            let mut woke_by_drawing = true;
            let mut frame_due = Instant::now();
            let announce = |pipeline: &ScreenPipeline<X11Capturer>, monitor: usize| {
                let (m, rect) = monitors_msg(&pipeline.capturer, monitor);
                let _ = tx.try_send(ScreenMsg::Control(m));
                if let Some(r) = rect {
                    let _ = tx.try_send(ScreenMsg::Display(r));
                }
            };
            announce(&pipeline, monitor);
            while !ctl.stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                step_no += 1;
                let want_monitor = ctl.select.swap(-1, Ordering::Relaxed);
                if want_monitor >= 0 {
                    match pipeline.capturer.select(want_monitor as usize) {
                        Ok(()) => {
                            monitor = want_monitor as usize;
                            pipeline.request_keyframe();
                            last_cursor = None;
                        }
                        Err(e) => tracing::warn!(error = %e, "monitor not selected"),
                    }
                    announce(&pipeline, monitor);
                }
                if step_no.is_multiple_of(15) {
                    // The encoder follows what the path carries (inner QUIC's window and RTT),
                    // below the technician's ceiling, with hysteresis so that small swings do not
                    // re-tune it.
                    let mut want = path_bitrate(&inner);
                    let cap = ctl.max_kbps.load(Ordering::Relaxed);
                    if cap > 0 {
                        want = want.min(cap.saturating_mul(1000)).max(100_000);
                    }
                    if want.abs_diff(bitrate) > bitrate / 4 {
                        bitrate = want;
                        pipeline.set_target(Target {
                            bitrate_bps: bitrate,
                            max_fps: 30.0,
                        });
                        let _ = tx.try_send(ScreenMsg::Target {
                            kbps: bitrate / 1000,
                            halved: pipeline.halved(),
                            load: false,
                        });
                    }
                }
                if ctl.keyframe.swap(false, Ordering::Relaxed) {
                    pipeline.request_keyframe();
                }
                let was_halved = pipeline.halved();
                let step = pipeline.step();
                if pipeline.halved() != was_halved {
                    let _ = tx.try_send(ScreenMsg::Target {
                        kbps: bitrate / 1000,
                        halved: pipeline.halved(),
                        load: true,
                    });
                }
                match step {
                    Ok(step) => {
                        let c = &step.cursor;
                        let pos = (c.x, c.y, c.visible);
                        if let Some(shape) = &c.shape
                            && let Some(m) = cursor_msg(shape)
                        {
                            let _ = tx.try_send(ScreenMsg::Control(m));
                        }
                        if last_cursor != Some(pos) || step.resized {
                            last_cursor = Some(pos);
                            let (w, h) = pipeline.capturer.size();
                            let _ = tx.try_send(ScreenMsg::Control(ControlMsg::Cursor {
                                x: c.x,
                                y: c.y,
                                visible: c.visible,
                                screen_w: w,
                                screen_h: h,
                            }));
                        }
                        if step.resized {
                            announce(&pipeline, monitor);
                        }
                        if let Some(frame) = step.encoded {
                            seq += 1;
                            let t = step.times;
                            if recent.len() == 31 {
                                recent.pop_front();
                            }
                            recent.push_back((t.capture + t.convert + t.encode).as_micros() as u32);
                            let mut sorted: Vec<u32> = recent.iter().copied().collect();
                            sorted.sort_unstable();
                            ctl.pipeline_us
                                .store(sorted[sorted.len() / 2], Ordering::Relaxed);
                            ctl.frames.fetch_add(1, Ordering::Relaxed);
                            ctl.bytes
                                .fetch_add(frame.data.len() as u64, Ordering::Relaxed);
                            match rt.block_on(video.send(seq, &frame.data)) {
                                Ok(()) => {}
                                Err(SessionError::FrameTooLarge(n)) => {
                                    // Never for a screen up to 1080p (the encoder's buffer is the
                                    // raw picture's size); a larger screen's worst picture is
                                    // skipped and the stream starts again from a keyframe.
                                    // Paced below as if it had been sent, so that a
                                    // screen whose keyframes never fit is not re-encoded in a
                                    // tight loop.
                                    tracing::warn!(bytes = n, "video frame too large; skipped");
                                    seq -= 1;
                                    ctl.keyframe.store(true, Ordering::Relaxed);
                                }
                                Err(_) => return,
                            }
                            // Pace by size: the next frame waits until the path has carried
                            // most of this one (at 80 % of the path's rate), so a slow path gets
                            // fewer frames instead of a queue (changes meanwhile go into the
                            // next frame). The path's rate, not the encoder's target: the target
                            // stops at 8 Mbit/s, and pacing at 1.6 × that held a full-screen
                            // change on a fast LAN (loopback in the glass bench: 60–100 KB
                            // frames) 40–60 ms before the next frame could go.
                            let airtime = frame.data.len() as f64 * 8.0
                                / (path_rate(&inner) * 0.8).max(240_000.0);
                            // Rate control must not take that wait for a still screen.
                            pipeline.path_busy_until(
                                Instant::now() + Duration::from_secs_f64(airtime.min(10.0)),
                            );
                            // At most 30 frames a second on average, as a virtual schedule
                            // (GCRA) that lets a frame go at once when the previous one was a
                            // whole interval or more ago, with one frame of burst: a fixed
                            // "33 ms since the last capture" phase-locks badly to an application
                            // drawing at 30 fps (measured: every change then waited up to a
                            // whole frame, p50 drawn → capture 16–22 ms).
                            frame_due = frame_due.max(started) + interval;
                            not_before = (frame_due - interval)
                                .max(started + Duration::from_secs_f64(airtime.min(2.0)));
                            // The frame is on its way: now the encoder's work for the next one
                            // (after a scroll, hashing the picture it will refer to), which would
                            // otherwise come first when the next frame is drawn.
                            pipeline.prepare_next();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "screen capture failed");
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
                // The frame rate limit (and the pacing) counts frames sent, not looks at the
                // screen: a capture that found nothing new (drawing reported while the previous
                // capture read it) must not hold back the next real change.
                // Looks that XDamage woke and that found nothing new are themselves limited to
                // one per 8 ms, so that drawing nobody sees (another monitor, the same pixels
                // repainted) cannot drive captures at its own rate. A look the 17 ms timeout
                // brought (the cursor) rests not at all: an 8 ms sleep there delayed the next
                // frame drawn meanwhile (glass bench, A/B alternated, 1080p p50: typing
                // 16.5–17.0 → 14.4–15.2 ms, dragging 17.9–19.8 → 15.4–15.9 ms).
                let rest = if woke_by_drawing {
                    Duration::from_millis(8)
                } else {
                    Duration::ZERO
                };
                let next_look = not_before.max(started + rest);
                if let Some(rest) = next_look.checked_duration_since(Instant::now()) {
                    std::thread::sleep(rest);
                }
                // Then capture as soon as something is drawn (XDamage), instead of on the next
                // tick: a keystroke is on its way ~16 ms sooner on average. Without a change the
                // screen is still looked at every ~17 ms (cursor position).
                woke_by_drawing = pipeline.capturer.wait_for_change(Duration::from_millis(17));
            }
        })
        .context("cannot start the screen thread")?;
    Ok(h)
}

struct StopOnDrop(Arc<ScreenCtl>);
impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Relaxed);
    }
}

/// Opens input injection on the X display, if there is one.
fn open_input(display: Option<String>) -> Option<AgentInput> {
    let display = display?;
    match AgentInput::start(move || {
        let i = X11Injector::open(Some(&display))?;
        Ok(Box::new(i) as Box<dyn Injector>)
    }) {
        Ok(i) => Some(i),
        Err(e) => {
            eprintln!("tandem-agent: remote control is unavailable: {e}");
            None
        }
    }
}

/// Runs one session to its end. Returns whether the program should quit (the window was closed).
async fn run_session(
    s: Session,
    mode: ConsentMode,
    display: Option<String>,
    report: &Report,
    cmds: &mut mpsc::UnboundedReceiver<UiCmd>,
) -> Result<bool> {
    // The names as the relay reports them, escaped where they could imitate another name.
    let shown = names::ShownPeer::of(s.peer());
    let suspicious = shown.suspicious();
    let (technician, organisation) = (shown.technician.text, shown.organisation.text);
    let decision = ask_consent(mode, &technician, &organisation, suspicious, report, cmds).await;
    s.send_control(&ControlMsg::Consent { decision }).await?;
    if decision == Consent::Deny {
        report.event(
            "denied",
            "You denied the request; nothing was shared.",
            serde_json::json!({}),
        );
        report.phase(Phase::Ended {
            text: "You denied the request; nothing was shared.".into(),
        });
        s.end(EndReason::Denied).await;
        return Ok(false);
    }
    let display = display.or_else(|| std::env::var("DISPLAY").ok().filter(|d| !d.is_empty()));
    // Pixels leave this machine only now, after the user's consent.
    let ctl = Arc::new(ScreenCtl {
        select: AtomicI32::new(-1),
        ..ScreenCtl::default()
    });
    let (screen_tx, mut screen_rx) = mpsc::channel::<ScreenMsg>(256);
    let _streaming = match &display {
        Some(d) => match start_streaming(
            d.clone(),
            s.connection().clone(),
            s.video_sender(),
            ctl.clone(),
            screen_tx,
        ) {
            Ok(h) => Some(h),
            Err(e) => {
                eprintln!("tandem-agent: the screen cannot be shared: {e:#}");
                None
            }
        },
        None => {
            eprintln!("tandem-agent: no display to share (set DISPLAY or --display)");
            None
        }
    };
    let _stop_guard = StopOnDrop(ctl.clone());
    let input = open_input(display);
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
    let may = |v: bool| {
        if v {
            "view your screen"
        } else {
            "view and control your screen"
        }
    };
    report.event(
        "session",
        &format!(
            "Session active: {technician} of {organisation} may {}. {}",
            may(view_only),
            if mode == ConsentMode::Tty {
                "Type v + Enter for view only, c for control, e to end."
            } else if report.shared.ctx.is_some() {
                "End it in the window."
            } else {
                "Press Ctrl-C to end it."
            }
        ),
        serde_json::json!({"technician": technician, "organisation": organisation, "view_only": view_only}),
    );
    report.phase(Phase::InSession {
        technician: technician.clone(),
        organisation: organisation.clone(),
        view_only,
        control_possible,
        note: None,
    });
    let ended = |text: String, reason: &str| {
        report.event("ended", &text, serde_json::json!({"reason": reason}));
        report.phase(Phase::Ended { text });
    };
    loop {
        tokio::select! {
            end = &mut pump => {
                ended(format!("Session ended: {}.", names::printable(&end.to_string(), 120)), end.reason.label());
                return Ok(false);
            }
            m = screen_rx.recv() => match m {
                Some(ScreenMsg::Control(m)) => { let _ = s.send_control(&m).await; }
                Some(ScreenMsg::Display(r)) => if let Some(i) = &input { i.set_display(r) },
                Some(ScreenMsg::Target { kbps, halved, load }) => report.event(
                    "video_target",
                    &format!(
                        "Video now aims at {kbps} kbit/s{} ({})",
                        if halved { " at half resolution" } else { "" },
                        match (load, halved) {
                            (false, _) => "follows the path",
                            (true, true) => "the screen changes faster than this computer can encode it at full resolution",
                            (true, false) => "the encoder keeps up at full resolution again",
                        },
                    ),
                    serde_json::json!({"kbps": kbps, "halved": halved, "cause": if load { "load" } else { "path" }}),
                ),
                None => {}
            },
            c = cmds.recv() => {
                let set_view_only = match c {
                    Some(UiCmd::ViewOnly(v)) => Some(v),
                    Some(UiCmd::Line(l)) => match l.trim().to_lowercase().as_str() {
                        "v" | "view" | "view only" => Some(true),
                        "c" | "control" => Some(false),
                        "e" | "end" | "quit" => {
                            s.end(EndReason::EndedByUser).await;
                            ended("You ended the session.".into(), "ended_by_user");
                            return Ok(l.trim() == "quit");
                        }
                        _ => None,
                    },
                    Some(UiCmd::End) | None => {
                        s.end(EndReason::EndedByUser).await;
                        ended("You ended the session.".into(), "ended_by_user");
                        return Ok(false);
                    }
                    Some(UiCmd::Consent(_) | UiCmd::NewCode) => None,
                };
                if let Some(v) = set_view_only
                    && v != view_only
                {
                    if !v && !control_possible {
                        report.event("permissions", "Control was not allowed for this session; it stays view only.", serde_json::json!({"view_only": true}));
                        continue;
                    }
                    view_only = v;
                    if let Some(i) = &input {
                        i.set_permission(if v { Permission::ViewOnly } else { Permission::Control });
                    }
                    let _ = s.send_control(&ControlMsg::Permissions { view_only: v }).await;
                    report.update_session(|vo, _| *vo = v);
                    report.event("permissions", &format!("{technician} may now {}.", may(v)), serde_json::json!({"view_only": v}));
                }
            }
            m = s.recv_control() => match m {
                Ok(ControlMsg::End { reason }) => {
                    ended(format!("Session ended: {}.", names::printable(&reason.to_string(), 120)), reason.label());
                    return Ok(false);
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
                    ended(format!("Session ended: {}.", names::printable(&end.to_string(), 120)), end.reason.label());
                    return Ok(false);
                }
            },
            e = s.next_event() => {
                let (kind, text) = match e {
                    SessionEvent::PeerSuspended { grace } => ("peer_suspended", format!("The technician's connection dropped; waiting up to {} s.", grace.as_secs())),
                    SessionEvent::PeerResumed => ("peer_resumed", "The technician is back.".into()),
                    SessionEvent::LinkLost => ("link_lost", "Connection to the relay lost; reconnecting…".into()),
                    SessionEvent::LinkResumed => ("link_resumed", "Reconnected.".into()),
                };
                report.event(kind, &text, serde_json::json!({}));
                let resumed = matches!(kind, "peer_resumed" | "link_resumed");
                report.update_session(|_, note| *note = (!resumed).then_some(text));
            }
            _ = tokio::signal::ctrl_c() => {
                s.end(EndReason::EndedByUser).await;
                ended("You ended the session.".into(), "ended_by_user");
                return Ok(true);
            }
        }
    }
}
