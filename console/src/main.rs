//! `tandem-console`: the technician's side. Joins a session by code and drives it. Thin glue over
//! `tandem-session`.
//!
//! This build runs headless (for scripts and tests): it joins, reports the user's consent decision
//! and the session's measurements as JSON lines, and ends on request, on a time limit, or when the
//! agent ends. The remote-screen window is the screen pipeline's and GUI's work.

use anyhow::{Context, Result};
use clap::Parser;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tandem_client::ClientError;
use tandem_client::tandem_certs::RelayTrust;
use tandem_client::{ConnectOptions, EventOut};
use tandem_media::{DecodedFrame, VideoDecoder};
use tandem_proto::{EndReason, ErrorCode, Secret};
use tandem_session::{Consent, ControlMsg, SessionCode, SessionConfig, SessionError, SessionEvent};

/// Exit codes: each failure a script may want to tell apart.
mod exit {
    pub const OK: u8 = 0;
    pub const OTHER: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const WRONG_CODE: u8 = 10;
    pub const CODE_EXPIRED: u8 = 11;
    pub const NO_SUCH_CODE: u8 = 12;
    pub const RELAY_UNREACHABLE: u8 = 13;
    pub const RELAY_NOT_TRUSTED: u8 = 14;
    pub const NOT_AUTHORISED: u8 = 15;
    pub const DENIED: u8 = 16;
    pub const ENDED_BY_AGENT: u8 = 17;
    pub const RELAY_BUSY: u8 = 18;
}

#[derive(Parser, Debug)]
#[command(
    name = "tandem-console",
    version,
    about = "Tandem console: join a user's session by the code they read to you",
    long_about = "Tandem console: join a user's session by the code they read to you.

Relay, pin and token are remembered after the first successful login (in the console configuration \
file, readable only by you), so later you only give the code.",
    after_help = "Exit codes: 0 ok, 1 other error, 2 usage, 10 wrong code, 11 code expired or already used, \
12 no such code (or the agent left), 13 relay unreachable, 14 relay certificate not trusted, \
15 token refused, 16 the user denied, 17 the session was ended by the other side or lost, 18 relay busy or rate-limited.

Example:
  tandem-console --relay relay.example.com:4433 --relay-pin sha256:3f2a… --token tnd_1_… --code 417-382-905"
)]
struct Cli {
    /// Relay address, host:port.
    #[arg(long, env = "TANDEM_RELAY")]
    relay: Option<String>,
    /// The relay certificate's pin (sha256:…).
    #[arg(long, env = "TANDEM_RELAY_PIN")]
    relay_pin: Option<String>,
    /// Trust the relay through this CA file (PEM) instead of a pin.
    #[arg(long, env = "TANDEM_RELAY_CA")]
    relay_ca: Option<PathBuf>,
    /// Technician token (from `tandem-relay technician add`).
    #[arg(long, env = "TANDEM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The session code the user reads out (dashes, spaces and surrounding text are fine).
    #[arg(long)]
    code: Option<String>,
    /// Run without a window (the only mode of this build).
    #[arg(long)]
    headless: bool,
    /// Print events as JSON lines.
    #[arg(long)]
    json: bool,
    /// End the session after this many seconds.
    #[arg(long)]
    seconds: Option<u64>,
    /// Configuration file where relay, pin and token are remembered.
    /// [default: $XDG_CONFIG_HOME/tandem/console.toml or ~/.config/tandem/console.toml]
    #[arg(long, env = "TANDEM_CONSOLE_CONFIG")]
    config: Option<PathBuf>,
    /// Do not remember relay, pin and token.
    #[arg(long)]
    no_remember: bool,
    /// Seconds to wait for the relay to answer.
    #[arg(long, default_value_t = 10)]
    connect_timeout: u64,
    /// Write the last decoded frame of the remote screen to this PNG file when the session ends.
    #[arg(long)]
    png: Option<PathBuf>,
    /// End the session after this many decoded frames.
    #[arg(long)]
    frames: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Remembered {
    relay: Option<String>,
    relay_pin: Option<String>,
    relay_ca: Option<PathBuf>,
    token: Option<String>,
}

fn config_path(cli: &Cli) -> Option<PathBuf> {
    if let Some(p) = &cli.config {
        return Some(p.clone());
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("tandem/console.toml"))
}

fn save(path: &PathBuf, r: &Remembered) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = toml::to_string(r)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    use std::io::Write;
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: exit::OTHER,
            error: e.into(),
        }
    }
}

fn classify(e: &SessionError) -> u8 {
    match e {
        SessionError::WrongCode => exit::WRONG_CODE,
        SessionError::Relay(c) => match c {
            ClientError::Unreachable { .. } | ClientError::Resolve { .. } => {
                exit::RELAY_UNREACHABLE
            }
            ClientError::Tls(_) | ClientError::Certs(_) => exit::RELAY_NOT_TRUSTED,
            _ => match c.code() {
                Some(ErrorCode::ExpiredSlot | ErrorCode::CodeBurned) => exit::CODE_EXPIRED,
                Some(ErrorCode::UnknownSlot | ErrorCode::AgentGone) => exit::NO_SUCH_CODE,
                Some(ErrorCode::BadToken | ErrorCode::TechnicianDisabled) => exit::NOT_AUTHORISED,
                Some(
                    ErrorCode::RateLimited
                    | ErrorCode::TooManyConnections
                    | ErrorCode::TooManyConnectionsFromAddress
                    | ErrorCode::TooManySessions
                    | ErrorCode::SlotBusy
                    | ErrorCode::ShuttingDown,
                ) => exit::RELAY_BUSY,
                _ => exit::OTHER,
            },
        },
        SessionError::Ended(_) => exit::ENDED_BY_AGENT,
        _ => exit::OTHER,
    }
}

fn save_png(path: &std::path::Path, f: &DecodedFrame) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), f.width, f.height);
    enc.set_color(png::ColorType::Rgba);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    w.write_image_data(&f.rgba)?;
    Ok(())
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
            eprintln!("tandem-console: cannot start: {e}");
            return std::process::ExitCode::from(exit::OTHER);
        }
    };
    let json = cli.json;
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::from(exit::OK),
        Err(f) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"event": "error", "exit_code": f.code, "message": format!("{:#}", f.error)})
                );
            }
            eprintln!("tandem-console: error: {:#}", f.error);
            std::process::ExitCode::from(f.code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let usage = |e: anyhow::Error| Failure {
        code: exit::USAGE,
        error: e,
    };
    let cfg_path = config_path(&cli);
    let remembered: Remembered = match &cfg_path {
        Some(p) if p.exists() => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))
                .map_err(usage)?;
            toml::from_str(&text)
                .with_context(|| format!("invalid {}", p.display()))
                .map_err(usage)?
        }
        _ => Remembered::default(),
    };
    let relay = cli
        .relay
        .clone()
        .or(remembered.relay)
        .context("no relay given: use --relay HOST:PORT")
        .map_err(usage)?;
    let pin = cli.relay_pin.clone().or(remembered.relay_pin);
    let ca = cli.relay_ca.clone().or(remembered.relay_ca);
    let token = cli
        .token
        .clone()
        .or(remembered.token)
        .context("no technician token given: use --token (from `tandem-relay technician add`)")
        .map_err(usage)?;
    let code_text = cli
        .code
        .clone()
        .context("no session code given: use --code 417-382-905")
        .map_err(usage)?;
    let code = SessionCode::parse(&code_text).map_err(|e| usage(e.into()))?;
    let trust = RelayTrust::from_options(pin.as_deref(), ca.as_deref()).map_err(|e| Failure {
        code: exit::USAGE,
        error: e.into(),
    })?;
    let out = EventOut { json: cli.json };
    let mut opts = ConnectOptions::new(relay.clone(), trust);
    opts.software = format!("tandem-console {}", env!("CARGO_PKG_VERSION"));
    opts.timeout = Duration::from_secs(cli.connect_timeout.max(1));
    let cfg = SessionConfig {
        software: opts.software.clone(),
        capabilities: vec!["control/v1".into()],
        ..SessionConfig::default()
    };
    let started = Instant::now();
    let session = tandem_session::join(&opts, &Secret::new(token.clone()), &code, &cfg)
        .await
        .map_err(|e| Failure {
            code: classify(&e),
            error: e.into(),
        })?;
    let setup_ms = started.elapsed().as_secs_f64() * 1e3;
    if !cli.no_remember
        && let Some(p) = &cfg_path
        && let Err(e) = save(
            p,
            &Remembered {
                relay: Some(relay.clone()),
                relay_pin: pin.clone(),
                relay_ca: ca.clone(),
                token: Some(token.clone()),
            },
        )
    {
        eprintln!("tandem-console: warning: could not remember the login: {e:#}");
    }
    out.event(
        "joined",
        &format!(
            "Joined; waiting for the user to answer ({setup_ms:.0} ms to a confirmed session)"
        ),
        serde_json::json!({"setup_ms": setup_ms, "agent": session.peer().software}),
    );
    let deadline = cli
        .seconds
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let sleep_until = |d: Option<tokio::time::Instant>| async move {
        match d {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    let mut consent: Option<Consent> = None;
    let mut decoder = VideoDecoder::new().map_err(anyhow::Error::from)?;
    let mut last: Option<DecodedFrame> = None;
    let mut decoded: u64 = 0;
    let mut video_bytes: u64 = 0;
    let mut first_frame_ms: Option<f64> = None;
    let write_png = |last: &Option<DecodedFrame>, out: &EventOut| {
        if let (Some(path), Some(f)) = (&cli.png, last) {
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
        }
    };
    let mut ping = tokio::time::interval(Duration::from_secs(1));
    let mut ping_sent: Option<Instant> = None;
    loop {
        tokio::select! {
            f = session.recv_video() => match f {
                Ok(f) => {
                    video_bytes += f.data.len() as u64;
                    match decoder.decode(&f.data) {
                        Ok(Some(frame)) => {
                            decoded += 1;
                            if first_frame_ms.is_none() {
                                let ms = started.elapsed().as_secs_f64() * 1e3;
                                first_frame_ms = Some(ms);
                                out.event(
                                    "first_frame",
                                    &format!("Remote screen {}x{} after {ms:.0} ms", frame.width, frame.height),
                                    serde_json::json!({"width": frame.width, "height": frame.height, "join_to_first_frame_ms": ms}),
                                );
                            }
                            last = Some(frame);
                            if cli.frames.is_some_and(|n| decoded >= n) {
                                session.end(EndReason::EndedByTechnician).await;
                                write_png(&last, &out);
                                out.event("ended", "Frame limit reached; session ended.", serde_json::json!({"reason": "ended_by_technician", "frames": decoded}));
                                return Ok(());
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "undecodable frame; asking for a keyframe");
                            let _ = session.send_control(&ControlMsg::KeyframeRequest).await;
                        }
                    }
                }
                Err(_) => {
                    // The session is ending; the control branch reports why.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            m = session.recv_control() => match m {
                Ok(ControlMsg::Consent { decision }) => {
                    consent = Some(decision);
                    let what = match decision {
                        Consent::AllowControl => "allowed control",
                        Consent::ViewOnly => "allowed viewing only",
                        Consent::Deny => "denied the request",
                    };
                    out.event("consent", &format!("The user {what}."), serde_json::json!({"decision": format!("{decision:?}")}));
                }
                Ok(ControlMsg::Permissions { view_only }) => out.event(
                    "permissions",
                    if view_only { "The user switched to view only." } else { "The user allowed control." },
                    serde_json::json!({"view_only": view_only}),
                ),
                Ok(ControlMsg::Stats { .. }) => {
                    if let Some(t) = ping_sent.take() {
                        let rtt = t.elapsed().as_secs_f64() * 1e3;
                        let path_rtt = session.connection().rtt().as_secs_f64() * 1e3;
                        let secs = started.elapsed().as_secs_f64().max(0.001);
                        out.event("stats", &format!("round trip {rtt:.1} ms (path {path_rtt:.1} ms, via relay), {decoded} frames, {:.0} kbit/s", video_bytes as f64 * 8.0 / secs / 1000.0),
                            serde_json::json!({"rtt_ms": rtt, "path_rtt_ms": path_rtt, "path": "relay", "frames": decoded, "kbit_s": video_bytes as f64 * 8.0 / secs / 1000.0}));
                    }
                }
                Ok(ControlMsg::End { reason }) => {
                    out.event("ended", &format!("The session ended: {reason}."), serde_json::json!({"reason": reason.label()}));
                    return Err(Failure {
                        code: if reason == EndReason::Denied { exit::DENIED } else { exit::ENDED_BY_AGENT },
                        error: anyhow::anyhow!("the session ended: {reason}"),
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    let end = session.closed().await;
                    let code = if end.reason == EndReason::Denied || consent == Some(Consent::Deny) { exit::DENIED } else { exit::ENDED_BY_AGENT };
                    out.event("ended", &format!("The session ended: {end}."), serde_json::json!({"reason": end.reason.label()}));
                    return Err(Failure { code, error: anyhow::Error::from(e) });
                }
            },
            _ = ping.tick(), if consent.is_some() && ping_sent.is_none() => {
                ping_sent = Some(Instant::now());
                let _ = session.send_control(&ControlMsg::Stats { rtt_us: 0, fps: 0, kbps: 0 }).await;
            }
            e = session.next_event() => {
                let text = match e {
                    SessionEvent::PeerSuspended { .. } => "The user's connection dropped; waiting for it to come back.",
                    SessionEvent::PeerResumed => "The user is back.",
                    SessionEvent::LinkLost => "Lost the connection to the relay; reconnecting…",
                    SessionEvent::LinkResumed => "Reconnected.",
                };
                out.event("link", text, serde_json::json!({}));
            }
            _ = sleep_until(deadline) => {
                session.end(EndReason::EndedByTechnician).await;
                write_png(&last, &out);
                out.event("ended", "Time is up; session ended.", serde_json::json!({"reason": "ended_by_technician"}));
                return Ok(());
            }
            _ = tokio::signal::ctrl_c() => {
                session.end(EndReason::EndedByTechnician).await;
                write_png(&last, &out);
                out.event("ended", "You ended the session.", serde_json::json!({"reason": "ended_by_technician"}));
                return Ok(());
            }
        }
    }
}
