//! `tandem-agent`: runs on the user's PC. Shows a one-time code, asks the user's consent when a
//! technician joins, and holds the end-to-end session. Thin glue over `tandem-session`.
//!
//! This build has the session, consent and control channel; screen streaming and remote input are
//! the screen-pipeline and remote-input libraries' work and plug into the session's video and input
//! channels.

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use serde::Deserialize;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tandem_client::tandem_certs::RelayTrust;
use tandem_client::{ConnectOptions, EventOut};
use tandem_input::{AgentInput, Injector, Permission, X11Injector};
use tandem_media::capture::x11::X11Capturer;
use tandem_media::{ScreenPipeline, Target};
use tandem_proto::EndReason;
use tandem_session::{
    AgentEvent, AgentHost, CodeChange, Consent, ControlMsg, Session, SessionConfig, SessionEvent,
};

/// Name of the configuration file an MSP ships next to the binary.
const SHIPPED_CONFIG: &str = "tandem-agent.toml";

#[derive(Parser, Debug)]
#[command(
    name = "tandem-agent",
    version,
    about = "Tandem agent: lets a technician see and control this PC, with your consent",
    long_about = "Tandem agent: shows a one-time code to read to your technician. When the technician \
joins, you decide: allow control, view only, or deny. Nothing is shown to anyone before you allow it, and \
you can end the session at any time.

The relay address and its pin come from flags, environment variables, or a tandem-agent.toml file next \
to this program (so that your IT provider can hand out a ready agent).

Never read the code to someone who called you unexpectedly.",
    after_help = "Example:
  tandem-agent --relay relay.example.com:4433 --relay-pin sha256:3f2a…"
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
    /// How consent is asked: `tty` asks on this terminal (denied after 60 s without an answer).
    /// `deny`, `view-only` and `allow` answer without asking: for demonstrations and tests on
    /// machines without a person in front of them.
    #[arg(long, value_enum, default_value_t = ConsentMode::Tty)]
    consent: ConsentMode,
    /// Print events as JSON lines on stdout (for scripts and tests).
    #[arg(long)]
    json: bool,
    /// Exit after the first session ends instead of showing a new code.
    #[arg(long)]
    once: bool,
    /// X display whose input the technician may control. [default: $DISPLAY; without one, the
    /// session is view-only]
    #[arg(long)]
    display: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ConsentMode {
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
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem-agent: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let file = match cli.config.clone().or_else(shipped_config) {
        Some(p) => load_config(&p)?,
        None => FileConfig::default(),
    };
    let relay = cli.relay.clone().or(file.relay).context(
        "no relay given: use --relay HOST:PORT (or a tandem-agent.toml next to the program)",
    )?;
    let pin = cli.relay_pin.clone().or(file.relay_pin);
    let ca = cli.relay_ca.clone().or(file.relay_ca);
    let trust = RelayTrust::from_options(pin.as_deref(), ca.as_deref())?;
    if cli.consent == ConsentMode::Tty && !std::io::stdin().is_terminal() {
        bail!(
            "--consent tty needs a terminal; run it in one, or choose --consent deny|view-only|allow"
        );
    }
    if matches!(cli.consent, ConsentMode::Allow | ConsentMode::ViewOnly) {
        eprintln!(
            "tandem-agent: WARNING: --consent {:?} answers the consent prompt without asking anyone",
            cli.consent
        );
    }
    let out = EventOut { json: cli.json };
    let mut opts = ConnectOptions::new(relay.clone(), trust);
    opts.software = format!("tandem-agent {}", env!("CARGO_PKG_VERSION"));
    let cfg = SessionConfig {
        software: opts.software.clone(),
        capabilities: vec!["control/v1".into()],
        ..SessionConfig::default()
    };
    let mut host = AgentHost::connect(opts, cfg)
        .await
        .with_context(|| format!("cannot connect to the relay at {relay}"))?;
    out.event(
        "connected",
        &format!("Connected to relay {relay}"),
        serde_json::json!({"relay": relay}),
    );
    loop {
        match host.next().await? {
            AgentEvent::Code {
                code,
                expires_in,
                why,
            } => {
                let prefix = match why {
                    CodeChange::New => "Your session code",
                    CodeChange::WrongCode => {
                        "Someone tried a wrong code; it is no longer valid. Your new code"
                    }
                    CodeChange::Expired => "The code expired. Your new code",
                    CodeChange::SetupFailed(_) => "The connection attempt failed. Your new code",
                };
                // The code goes to the user's screen only, never to a log.
                out.event(
                    "code",
                    &format!(
                        "{prefix}: {}   (valid {} min; read it only to a technician you contacted)",
                        code.grouped(),
                        expires_in.as_secs() / 60
                    ),
                    serde_json::json!({"code": code.grouped(), "expires_in_secs": expires_in.as_secs()}),
                );
            }
            AgentEvent::Joining {
                technician,
                organisation,
            } => out.event(
                "joining",
                &format!("{technician} of {organisation} is connecting…"),
                serde_json::json!({"technician": technician, "organisation": organisation}),
            ),
            AgentEvent::Session(s) => {
                run_session(*s, cli.consent, cli.display.clone(), &out).await?;
                if cli.once {
                    return Ok(());
                }
            }
        }
    }
}

async fn ask_consent(mode: ConsentMode, technician: &str, organisation: &str) -> Consent {
    match mode {
        ConsentMode::Deny => Consent::Deny,
        ConsentMode::ViewOnly => Consent::ViewOnly,
        ConsentMode::Allow => Consent::AllowControl,
        ConsentMode::Tty => {
            println!();
            println!("  {technician} of {organisation} wants to connect to this computer.");
            println!(
                "  Only continue if YOU contacted them. Nobody legitimate calls you out of the blue."
            );
            print!("  [a] allow control   [v] view only   [d] deny   (denied in 60 s): ");
            let _ = std::io::stdout().flush();
            let answer = tokio::task::spawn_blocking(|| {
                let mut line = String::new();
                let _ = std::io::stdin().lock().read_line(&mut line);
                line
            });
            match tokio::time::timeout(Duration::from_secs(60), answer).await {
                Ok(Ok(a)) => match a.trim().to_lowercase().as_str() {
                    "a" | "allow" => Consent::AllowControl,
                    "v" | "view" | "view only" => Consent::ViewOnly,
                    _ => Consent::Deny,
                },
                _ => Consent::Deny,
            }
        }
    }
}

/// Streams the screen of `display` into the session until `stop` is set: capture → change detection
/// → H.264, at most `fps` frames a second. Runs on its own thread (X11 and the encoder block). A
/// frame is sent before the next is captured, so nothing queues behind a slow path: the next frame
/// simply comes later, carrying everything that changed meanwhile.
/// The video bitrate the path carries: half of what the inner connection's congestion window
/// allows per round trip (the rest is headroom for input, control and retransmissions), between
/// 300 kbit/s and 8 Mbit/s.
fn path_bitrate(inner: &quinn::Connection) -> u32 {
    let rtt = inner.rtt().as_secs_f64().max(0.001);
    let cwnd = inner.stats().path.cwnd as f64;
    ((cwnd * 8.0 / rtt) * 0.5).clamp(300_000.0, 8_000_000.0) as u32
}

fn start_streaming(
    display: String,
    inner: quinn::Connection,
    video: tandem_session::VideoSender,
    keyframe: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    stats: Arc<StreamStats>,
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
            while !stop.load(Ordering::Relaxed) {
                let started = std::time::Instant::now();
                step_no += 1;
                if step_no.is_multiple_of(15) {
                    // The encoder follows what the path carries (inner QUIC's window and RTT),
                    // with hysteresis so that small swings do not re-tune it.
                    let want = path_bitrate(&inner);
                    if want.abs_diff(bitrate) > bitrate / 4 {
                        bitrate = want;
                        pipeline.set_target(Target {
                            bitrate_bps: bitrate,
                            max_fps: 30.0,
                        });
                    }
                }
                if keyframe.swap(false, Ordering::Relaxed) {
                    pipeline.request_keyframe();
                }
                match pipeline.step() {
                    Ok(step) => {
                        if let Some(frame) = step.encoded {
                            seq += 1;
                            stats.frames.fetch_add(1, Ordering::Relaxed);
                            stats
                                .bytes
                                .fetch_add(frame.data.len() as u64, Ordering::Relaxed);
                            if rt.block_on(video.send(seq, &frame.data)).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "screen capture failed");
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
                if let Some(rest) = interval.checked_sub(started.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        })
        .context("cannot start the screen thread")?;
    Ok(h)
}

#[derive(Default)]
struct StreamStats {
    frames: AtomicU64,
    bytes: AtomicU64,
}

struct StopOnDrop(Arc<AtomicBool>);
impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
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

async fn run_session(
    s: Session,
    mode: ConsentMode,
    display: Option<String>,
    out: &EventOut,
) -> Result<()> {
    let technician = s.peer().technician.clone().unwrap_or_default();
    let organisation = s.peer().organisation.clone().unwrap_or_default();
    let decision = ask_consent(mode, &technician, &organisation).await;
    s.send_control(&ControlMsg::Consent { decision }).await?;
    if decision == Consent::Deny {
        out.event(
            "denied",
            "You denied the request; nothing was shared.",
            serde_json::json!({}),
        );
        s.end(EndReason::Denied).await;
        return Ok(());
    }
    let display = display.or_else(|| std::env::var("DISPLAY").ok());
    // Pixels leave this machine only now, after the user's consent.
    let keyframe = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let stream_stats = Arc::new(StreamStats::default());
    let _streaming = match &display {
        Some(d) => match start_streaming(
            d.clone(),
            s.connection().clone(),
            s.video_sender(),
            keyframe.clone(),
            stop.clone(),
            stream_stats.clone(),
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
    let _stop_guard = StopOnDrop(stop.clone());
    let input = open_input(display);
    let control_possible = input.is_some();
    let view_only = decision == Consent::ViewOnly || !control_possible;
    if let Some(i) = &input {
        i.set_permission(if view_only {
            Permission::ViewOnly
        } else {
            Permission::Control
        });
    }
    if !control_possible && decision == Consent::AllowControl {
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
    out.event(
        "session",
        &format!(
            "Session active: {technician} of {organisation} may {}. Press Ctrl-C to end it.",
            if view_only { "view your screen" } else { "view and control your screen" }
        ),
        serde_json::json!({"technician": technician, "organisation": organisation, "view_only": view_only}),
    );
    loop {
        tokio::select! {
            end = &mut pump => {
                out.event("ended", &format!("Session ended: {end}."), serde_json::json!({"reason": end.reason.label()}));
                return Ok(());
            }
            m = s.recv_control() => match m {
                Ok(ControlMsg::End { reason }) => {
                    out.event("ended", &format!("Session ended: {reason}."), serde_json::json!({"reason": reason.label()}));
                    return Ok(());
                }
                Ok(ControlMsg::KeyframeRequest) => keyframe.store(true, Ordering::Relaxed),
                Ok(ControlMsg::Stats { .. }) => {
                    // Echo: the console measures the session's round-trip time with it.
                    let _ = s
                        .send_control(&ControlMsg::Stats {
                            rtt_us: 0,
                            fps: stream_stats.frames.load(Ordering::Relaxed).min(u16::MAX as u64) as u16,
                            kbps: (stream_stats.bytes.load(Ordering::Relaxed) / 125).min(u32::MAX as u64) as u32,
                        })
                        .await;
                }
                Ok(_) => {}
                Err(_) => {
                    let end = s.closed().await;
                    out.event("ended", &format!("Session ended: {end}."), serde_json::json!({"reason": end.reason.label()}));
                    return Ok(());
                }
            },
            e = s.next_event() => match e {
                SessionEvent::PeerSuspended { grace } => out.event("peer_suspended", &format!("The technician's connection dropped; waiting up to {} s.", grace.as_secs()), serde_json::json!({})),
                SessionEvent::PeerResumed => out.event("peer_resumed", "The technician is back.", serde_json::json!({})),
                SessionEvent::LinkLost => out.event("link_lost", "Connection to the relay lost; reconnecting…", serde_json::json!({})),
                SessionEvent::LinkResumed => out.event("link_resumed", "Reconnected.", serde_json::json!({})),
            },
            _ = tokio::signal::ctrl_c() => {
                s.end(EndReason::EndedByUser).await;
                out.event("ended", "You ended the session.", serde_json::json!({"reason": "ended_by_user"}));
                return Ok(());
            }
        }
    }
}
