//! `tandem-console`: the technician's side. Joins a session by code and drives it.
//!
//! With a display it opens a window ([`gui`]); `--headless` (or no display) runs for scripts and
//! tests ([`headless`]): events as text or JSON lines, frames as PNG, an input script, exit codes
//! that say why. Both drive the session through [`driver`].

use anyhow::{Context, Result};
use clap::Parser;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};
use tandem_client::ClientError;
use tandem_client::tandem_certs::RelayTrust;
use tandem_client::{ConnectOptions, EventOut};
use tandem_proto::{ErrorCode, Secret};
use tandem_session::{Session, SessionCode, SessionConfig, SessionError};

mod driver;
mod gui;
mod headless;
mod toolbox;

/// Exit codes: each failure a script may want to tell apart.
pub mod exit {
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

With a display it opens a window: a login form (filled from flags or the remembered login; with \
--code it connects at once), then the remote screen with a toolbar and a stats line. With --headless \
(or without a display) it runs for scripts: events on stdout, --png, --input-script, exit codes.

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
    /// Technician token (from `tandem-relay technician add`). Other users of this computer can read
    /// a program's command line: prefer --token-file, the TANDEM_TOKEN variable, or the remembered
    /// login.
    #[arg(long, env = "TANDEM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the technician token from this file (first line), or from standard input with `-`.
    #[arg(long, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// The session code the user reads out (dashes, spaces and surrounding text are fine). `-`
    /// reads it from standard input, which keeps it off the command line other users can read.
    #[arg(long)]
    code: Option<String>,
    /// Run without a window (the default when there is no display): events on stdout, frames to
    /// --png, input from --input-script.
    #[arg(long)]
    headless: bool,
    /// Headless: play this input script once the user allowed control (see the README for the
    /// commands: move, click, type, key, combo, scroll, wait).
    #[arg(long)]
    input_script: Option<PathBuf>,
    /// Print events as JSON lines.
    #[arg(long)]
    json: bool,
    /// End the session after this many seconds (a window then closes and the exit code says how
    /// the session went).
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
    /// Headless: say this to the user as soon as the session starts, before they answer (repeat
    /// for several lines). The user's lines are printed as `chat` events.
    #[arg(long, value_name = "TEXT")]
    chat: Vec<String>,
    /// Headless: put this text on the user's clipboard once they allowed control.
    #[arg(long, value_name = "TEXT")]
    clipboard_set: Option<String>,
    /// Headless: put this PNG image on the user's clipboard once they allowed control (the
    /// user's agent asks them, or its policy decides).
    #[arg(long, value_name = "FILE")]
    clipboard_set_png: Option<PathBuf>,
    /// Headless: write the user's clipboard (text, or a PNG image) to this file each time it
    /// changes during the session.
    #[arg(long, value_name = "FILE")]
    clipboard_get: Option<PathBuf>,
    /// Headless: send this file or folder to the user once they allowed control (repeatable).
    /// In the window: drop files on the remote screen, or use the toolbox panel.
    #[arg(long, value_name = "PATH")]
    send: Vec<PathBuf>,
    /// Where files the user sends are saved. [default: $XDG_DOWNLOAD_DIR, else ~/Downloads]
    #[arg(long, value_name = "DIR")]
    downloads: Option<PathBuf>,
    /// The most bytes the user may send in one session, in MiB. [default: 4096]
    #[arg(long, value_name = "MIB")]
    file_quota_mib: Option<u64>,
    /// Headless: end the session once every file transfer is over (after at least one, and
    /// when none started for a second and a half).
    #[arg(long)]
    end_when_done: bool,
    /// Check the connection to the relay and exit: DNS, UDP, TCP and proxy paths, the relay's
    /// certificate against the pin, with one line to sum it up. Exits 0 when the relay can be
    /// reached, 13 when not, 14 when its certificate does not match.
    #[arg(long)]
    check: bool,
    /// End the session after this many decoded frames.
    #[arg(long)]
    frames: Option<u64>,
    /// Your technician certificate (`tandem-org issue`), proven to agents that trust your
    /// organisation's key. [default: technician.cert beside the configuration file, if present]
    #[arg(long, env = "TANDEM_CERT")]
    cert: Option<PathBuf>,
    /// Your technician key (`tandem-org request`); it never leaves this computer.
    /// [default: technician.key beside the configuration file]
    #[arg(long, env = "TANDEM_CERT_KEY")]
    cert_key: Option<PathBuf>,
    /// Your organisation's newest revocation list, passed on to agents (they keep it if newer).
    /// [default: revocation beside the configuration file, if present]
    #[arg(long)]
    revocation: Option<PathBuf>,
    /// Connect to this enrolled device (its id, or its exact name) without a code: unattended
    /// access, for technicians whose certificate allows it for the device's group.
    #[arg(long, conflicts_with = "code")]
    device: Option<String>,
    /// List your organisation's enrolled devices (optionally those matching QUERY in name, host,
    /// group or user), each checked against your organisation's key, and exit.
    #[arg(long, value_name = "QUERY", num_args = 0..=1, default_missing_value = "")]
    list_devices: Option<String>,
    #[command(flatten)]
    network: tandem_client::NetworkArgs,
}

/// The technician's certificate, key and revocation list, from flags or beside the configuration
/// file; none if there is no certificate.
fn credentials(cli: &Cli) -> Result<Option<Arc<tandem_session::tandem_org::Credentials>>> {
    use tandem_session::tandem_org::{
        Certificate, Credentials, KeyPair, RevocationList, read_text,
    };
    let beside = |name: &str| config_path(cli).and_then(|p| p.parent().map(|d| d.join(name)));
    let cert_path = match &cli.cert {
        Some(p) => p.clone(),
        None => match beside("technician.cert").filter(|p| p.exists()) {
            Some(p) => p,
            None => return Ok(None),
        },
    };
    let cert = read_text(&cert_path)
        .and_then(|t| Certificate::from_text(&t))
        .with_context(|| format!("invalid technician certificate {}", cert_path.display()))?;
    let key_path = cli
        .cert_key
        .clone()
        .or_else(|| beside("technician.key"))
        .context("no technician key: use --cert-key (the file `tandem-org request` wrote)")?;
    let key = read_text(&key_path)
        .and_then(|t| KeyPair::from_text(&t))
        .with_context(|| format!("invalid technician key {}", key_path.display()))?;
    let revocation = match cli
        .revocation
        .clone()
        .or_else(|| beside("revocation").filter(|p| p.exists()))
    {
        Some(p) => Some(
            read_text(&p)
                .and_then(|t| RevocationList::from_text(&t))
                .with_context(|| format!("invalid revocation list {}", p.display()))?,
        ),
        None => None,
    };
    let creds = Credentials::new(cert, key, revocation).with_context(|| {
        format!(
            "{} and {} do not belong together",
            cert_path.display(),
            key_path.display()
        )
    })?;
    Ok(Some(Arc::new(creds)))
}

/// What the agent made of this technician's certificate, in words.
pub fn org_note(peer: &tandem_session::PeerInfo) -> (bool, String) {
    match &peer.org {
        tandem_session::OrgCheck::NotVerified(why) => (
            false,
            format!("not verified by an organisation key ({why})"),
        ),
        _ => (true, "verified by your organisation's key".into()),
    }
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

/// Writes the remembered login (it holds the token): readable only by this user from the moment
/// it exists, replaced atomically ([`tandem_certs::write_atomic`]).
fn save(path: &Path, r: &Remembered) -> Result<()> {
    let text = toml::to_string(r)?;
    tandem_certs::write_atomic(path, text.as_bytes(), true)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The first line of a file, or of standard input for `-`, trimmed.
fn read_secret(path: &Path, what: &str) -> Result<String> {
    let text = if path == Path::new("-") {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .with_context(|| format!("cannot read the {what} from standard input"))?;
        line
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the {what} from {}", path.display()))?
    };
    let first = text.lines().next().unwrap_or_default().trim().to_owned();
    if first.is_empty() {
        anyhow::bail!("no {what} in {}", path.display());
    }
    Ok(first)
}

/// A failure with its exit code.
pub struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    /// A mistake in how the console was called (exit code 2).
    fn usage(error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            code: exit::USAGE,
            error: error.into(),
        }
    }
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
                Some(ErrorCode::UnknownSlot | ErrorCode::AgentGone | ErrorCode::DeviceOffline) => {
                    exit::NO_SUCH_CODE
                }
                Some(
                    ErrorCode::BadToken
                    | ErrorCode::TechnicianDisabled
                    | ErrorCode::BadCertificate
                    | ErrorCode::NotProven,
                ) => exit::NOT_AUTHORISED,
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
        SessionError::Unverified(_) | SessionError::DeviceUnverified(_) => exit::NOT_AUTHORISED,
        _ => exit::OTHER,
    }
}

/// How to log in, besides the form's fields.
#[derive(Clone)]
pub struct Login {
    ca: Option<PathBuf>,
    pub(crate) cfg_path: Option<PathBuf>,
    remember: bool,
    timeout: Duration,
    network: tandem_client::NetworkArgs,
    credentials: Option<Arc<tandem_session::tandem_org::Credentials>>,
    /// Errors are shown in the window: say what to do there (fields), not which flags to give.
    window: bool,
}

/// "No relay": in the window's words or the command line's.
pub fn missing_relay(window: bool) -> String {
    if window {
        "Enter the relay address (host:port; your administrator has it)".into()
    } else {
        "no relay given: use --relay HOST:PORT".into()
    }
}

/// The relay connection options and session settings of a login.
fn connect_options(
    relay: &str,
    form: &gui::Form,
    login: &Login,
) -> Result<(ConnectOptions, SessionConfig), Failure> {
    let pin = Some(form.pin.trim().to_owned()).filter(|p| !p.is_empty());
    if login.window && pin.is_none() && login.ca.is_none() {
        return Err(Failure::usage(anyhow::anyhow!(
            "Enter the relay pin (sha256:…; your administrator reads it with `tandem-relay \
             fingerprint`): Tandem never connects to a relay it cannot verify"
        )));
    }
    let trust = RelayTrust::from_options(pin.as_deref(), login.ca.as_deref())
        .map_err(|e| Failure::usage(anyhow::anyhow!(pin_words(&e.to_string(), login.window))))?;
    let mut opts = ConnectOptions::new(relay.to_owned(), trust);
    opts.software = format!("tandem-console {}", env!("CARGO_PKG_VERSION"));
    opts.timeout = login.timeout;
    login.network.apply(&mut opts).map_err(Failure::usage)?;
    let cfg = SessionConfig {
        software: opts.software.clone(),
        capabilities: vec![
            "control/v1".into(),
            "cursor/v1".into(),
            tandem_session::CAP_CHAT.into(),
            tandem_session::CAP_CLIPBOARD.into(),
            tandem_session::CAP_FILES.into(),
        ],
        credentials: login.credentials.clone(),
        ..SessionConfig::default()
    };
    Ok((opts, cfg))
}

/// A pin error in the window's words: the "Relay pin" field instead of `--relay-pin`.
pub fn pin_words(text: &str, window: bool) -> String {
    if window {
        text.replace("--relay-pin", "the Relay pin field")
    } else {
        text.to_owned()
    }
}

fn no_certificate() -> Failure {
    Failure::usage(anyhow::anyhow!(
        "unattended access needs your technician certificate: --cert and --cert-key (or \
         technician.cert and technician.key beside console.toml)"
    ))
}

/// A device id as given, or the id of the one device whose name is exactly `name`.
async fn resolve_device(
    opts: &ConnectOptions,
    token: &Secret,
    cfg: &SessionConfig,
    name: &str,
) -> Result<String, Failure> {
    if cfg.credentials.is_none() {
        return Err(no_certificate());
    }
    if tandem_session::tandem_org::is_device_id(name) {
        return Ok(name.to_owned());
    }
    let list = tandem_session::list_devices(opts, token, cfg, name)
        .await
        .map_err(|e| Failure {
            code: classify(&e),
            error: e.into(),
        })?;
    let mut same: Vec<_> = list
        .devices
        .iter()
        .filter(|d| d.checked.device.name == name)
        .collect();
    match (same.pop(), same.is_empty()) {
        (Some(d), true) => Ok(d.checked.device.id.clone()),
        (Some(_), false) => Err(Failure::usage(anyhow::anyhow!(
            "several devices are named {name:?}: give the device id (--list-devices shows them)"
        ))),
        (None, _) => Err(Failure {
            code: exit::NO_SUCH_CODE,
            error: anyhow::anyhow!(
                "no device of your organisation is named {name:?} (--list-devices shows them)"
            ),
        }),
    }
}

/// `--list-devices`: the organisation's devices, checked, as a table or JSON events.
async fn list_devices(
    form: &gui::Form,
    login: &Login,
    query: &str,
    out: &EventOut,
) -> Result<(), Failure> {
    let relay = form.relay.trim().to_owned();
    if relay.is_empty() {
        return Err(Failure::usage(anyhow::anyhow!(
            "no relay given: use --relay HOST:PORT"
        )));
    }
    if login.credentials.is_none() {
        return Err(no_certificate());
    }
    let (opts, cfg) = connect_options(&relay, form, login)?;
    let list = tandem_session::list_devices(&opts, &Secret::new(form.token.trim()), &cfg, query)
        .await
        .map_err(|e| Failure {
            code: classify(&e),
            error: e.into(),
        })?;
    let now = tandem_session::tandem_org::unix_now();
    for d in &list.devices {
        let (dev, p) = (&d.checked.device, &d.checked.presence);
        let state = if d.in_session {
            "in session".to_string()
        } else if d.online {
            "online".to_string()
        } else {
            format!(
                "offline, seen {} min ago",
                now.saturating_sub(d.last_seen) / 60
            )
        };
        out.event(
            "device",
            &format!(
                "{:<24} {:<20} {:<12} {:<28} {}",
                tandem_session::names::printable(&dev.name, 24),
                dev.id,
                tandem_session::names::printable(&dev.group, 12),
                tandem_session::names::printable(
                    &format!("{} {} {}", p.hostname, p.user, p.os),
                    28
                ),
                state
            ),
            serde_json::json!({"id": dev.id, "name": dev.name, "group": dev.group,
                "hostname": p.hostname, "os": p.os, "user": p.user, "online": d.online,
                "in_session": d.in_session, "last_seen": d.last_seen}),
        );
    }
    for why in &list.rejected {
        out.event(
            "device_rejected",
            &format!(
                "The relay listed a device that does not check, left out: {}",
                tandem_session::names::printable(why, 200)
            ),
            serde_json::json!({"reason": why}),
        );
    }
    out.event(
        "devices",
        &format!(
            "{} devices of your organisation{}",
            list.devices.len(),
            if list.rejected.is_empty() {
                String::new()
            } else {
                format!("; {} entries rejected", list.rejected.len())
            }
        ),
        serde_json::json!({"count": list.devices.len(), "rejected": list.rejected.len()}),
    );
    Ok(())
}

/// Connects, authenticates and joins the session the code names; remembers the login on success.
pub async fn join(form: &gui::Form, login: &Login) -> Result<Session, Failure> {
    let relay = form.relay.trim().to_owned();
    if relay.is_empty() {
        return Err(Failure::usage(anyhow::anyhow!(missing_relay(login.window))));
    }
    let token = form.token.trim().to_owned();
    if token.is_empty() {
        return Err(Failure::usage(anyhow::anyhow!(if login.window {
            "Enter your technician token (your administrator makes it with `tandem-relay \
             technician add`)"
        } else {
            "no technician token given: use --token (from `tandem-relay technician add`)"
        })));
    }
    let device = form.device.trim().to_owned();
    if form.code.trim().is_empty() && device.is_empty() {
        return Err(Failure::usage(anyhow::anyhow!(if login.window {
            "Enter the session code the user reads out (like 417-382-905), or pick a computer \
             from the device list"
        } else {
            "no session code given: use --code 417-382-905 (or --device for an enrolled computer)"
        })));
    }
    let (opts, cfg) = connect_options(&relay, form, login)?;
    let pin = Some(form.pin.trim().to_owned()).filter(|p| !p.is_empty());
    let secret = Secret::new(token.clone());
    let session = if device.is_empty() {
        let code = SessionCode::parse(&form.code).map_err(Failure::usage)?;
        tandem_session::join(&opts, &secret, &code, &cfg).await
    } else {
        let id = resolve_device(&opts, &secret, &cfg, &device).await?;
        tandem_session::connect_device(&opts, &secret, &id, &cfg).await
    }
    .map_err(|e| Failure {
        code: classify(&e),
        error: e.into(),
    })?;
    if login.remember
        && let Some(p) = &login.cfg_path
        && let Err(e) = save(
            p,
            &Remembered {
                relay: Some(relay),
                relay_pin: pin,
                relay_ca: login.ca.clone(),
                token: Some(token),
            },
        )
    {
        eprintln!("tandem-console: warning: could not remember the login: {e:#}");
    }
    Ok(session)
}

fn main() -> std::process::ExitCode {
    // Started again as the sandboxed video decoder (tandem_sandbox): nothing else runs first.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == tandem_sandbox::WORKER_ARG)
    {
        let rest: Vec<_> = std::env::args_os().skip(2).collect();
        return tandem_sandbox::worker::main(&rest);
    }
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
    let fail = |f: Failure| {
        if json {
            println!(
                "{}",
                serde_json::json!({"event": "error", "exit_code": f.code, "message": format!("{:#}", f.error)})
            );
        }
        eprintln!("tandem-console: error: {:#}", f.error);
        std::process::ExitCode::from(f.code)
    };
    let (form, mut login) = match setup(&cli) {
        Ok(x) => x,
        Err(f) => return fail(f),
    };
    let out = EventOut { json: cli.json };
    if cli.check {
        if form.relay.trim().is_empty() {
            return fail(Failure::usage(anyhow::anyhow!(
                "no relay to check: give --relay HOST:PORT --relay-pin sha256:… (or log in once)"
            )));
        }
        let opts = match connect_options(form.relay.trim(), &form, &login) {
            Ok((o, _)) => o,
            Err(f) => return fail(f),
        };
        let report = rt.block_on(tandem_client::check::check(&opts));
        if cli.json {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
        } else {
            println!("Tandem connection check");
            print!("{}", report.text());
        }
        let pin_failed = report
            .steps
            .iter()
            .any(|s| s.what == "certificate" && s.verdict == tandem_client::check::Verdict::Fail);
        return std::process::ExitCode::from(if report.reachable {
            exit::OK
        } else if pin_failed {
            exit::RELAY_NOT_TRUSTED
        } else {
            exit::RELAY_UNREACHABLE
        });
    }
    let windowed = !cli.headless
        && cli.list_devices.is_none()
        && std::env::var_os("DISPLAY").is_some_and(|d| !d.is_empty());
    if !windowed {
        return match rt.block_on(run_headless(&cli, form, login, out)) {
            Ok(()) => std::process::ExitCode::from(exit::OK),
            Err(f) => fail(f),
        };
    }
    login.window = true;
    let code = Arc::new(AtomicU8::new(exit::OK));
    let handle = rt.handle().clone();
    let seconds = cli.seconds;
    let app_code = code.clone();
    let r = eframe::run_native(
        "tandem-console",
        gui::options(),
        Box::new(move |cc| {
            Ok(Box::new(gui::ConsoleApp::new(
                handle,
                form,
                login,
                out,
                seconds,
                app_code,
                &cc.egui_ctx,
            )))
        }),
    );
    if let Err(e) = r {
        return fail(Failure {
            code: exit::OTHER,
            error: anyhow::anyhow!("cannot open a window ({e}); use --headless"),
        });
    }
    std::process::ExitCode::from(code.load(Ordering::Relaxed))
}

/// The form's fields from flags and the remembered login.
fn setup(cli: &Cli) -> Result<(gui::Form, Login), Failure> {
    let cfg_path = config_path(cli);
    let remembered: Remembered = match &cfg_path {
        Some(p) if p.exists() => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))
                .map_err(Failure::usage)?;
            toml::from_str(&text)
                .with_context(|| format!("invalid {}", p.display()))
                .map_err(Failure::usage)?
        }
        _ => Remembered::default(),
    };
    let token = match &cli.token_file {
        Some(p) => Some(read_secret(p, "token").map_err(Failure::usage)?),
        None => cli.token.clone(),
    };
    let code = match cli.code.as_deref() {
        Some("-") => read_secret(Path::new("-"), "session code").map_err(Failure::usage)?,
        other => other.unwrap_or_default().to_owned(),
    };
    let form = gui::Form {
        relay: cli.relay.clone().or(remembered.relay).unwrap_or_default(),
        pin: cli
            .relay_pin
            .clone()
            .or(remembered.relay_pin)
            .unwrap_or_default(),
        token: token.or(remembered.token).unwrap_or_default(),
        code,
        device: cli.device.clone().unwrap_or_default(),
        downloads: Some(downloads(cli)),
    };
    let login = Login {
        ca: cli.relay_ca.clone().or(remembered.relay_ca),
        cfg_path,
        remember: !cli.no_remember,
        timeout: Duration::from_secs(cli.connect_timeout.max(1)),
        network: cli.network.clone(),
        credentials: credentials(cli).map_err(Failure::usage)?,
        window: false,
    };
    Ok((form, login))
}

async fn run_headless(
    cli: &Cli,
    form: gui::Form,
    login: Login,
    out: EventOut,
) -> Result<(), Failure> {
    let script = match &cli.input_script {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the input script {}", p.display()))
                .map_err(Failure::usage)?;
            Some(headless::parse_script(&text).map_err(Failure::usage)?)
        }
        None => None,
    };
    if let Some(query) = &cli.list_devices {
        return list_devices(&form, &login, query, &out).await;
    }
    let started = Instant::now();
    let session = join(&form, &login).await?;
    let setup_ms = started.elapsed().as_secs_f64() * 1e3;
    out.event(
        "joined",
        &format!(
            "Joined; waiting for the user to answer ({setup_ms:.0} ms to a confirmed session). \
             The user sees you as {}, as the relay reports it; {}.",
            tandem_session::names::ShownPeer::of(session.peer()),
            org_note(session.peer()).1,
        ),
        serde_json::json!({"setup_ms": setup_ms, "agent": session.peer().software,
            "device": session.peer().device.as_ref().map(|d| serde_json::json!({"id": d.id, "name": d.name, "group": d.group})),
            "verified": org_note(session.peer()).0, "org": org_note(session.peer()).1,
            "shown_as": {"technician": session.peer().technician, "organisation": session.peer().organisation}}),
    );
    headless::run(
        session,
        started,
        headless::Options {
            seconds: cli.seconds,
            frames: cli.frames,
            png: cli.png.clone(),
            script,
            chat: cli.chat.clone(),
            clipboard_set: clipboard_set(cli)?,
            clipboard_get: cli.clipboard_get.clone(),
            send: cli.send.clone(),
            downloads: downloads(cli),
            end_when_done: cli.end_when_done,
        },
        out,
    )
    .await
}

/// The local time as chat lines show it.
pub fn clock() -> String {
    chrono::Local::now().format("%H:%M").to_string()
}

/// Where received files (and saved chat transcripts) go by default: `$XDG_DOWNLOAD_DIR`, else
/// `~/Downloads`, else the current directory.
pub fn downloads_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DOWNLOAD_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h).join("Downloads"),
        None => PathBuf::from("."),
    }
}

/// The clipboard content `--clipboard-set` and `--clipboard-set-png` give.
fn clipboard_set(cli: &Cli) -> Result<Vec<(tandem_session::ClipFormat, Vec<u8>)>, Failure> {
    use tandem_session::ClipFormat;
    let mut v = Vec::new();
    if let Some(t) = &cli.clipboard_set {
        if t.len() > ClipFormat::Text.limit() {
            return Err(Failure::usage(anyhow::anyhow!(
                "--clipboard-set: the text is over the clipboard's limit of 1 MiB"
            )));
        }
        v.push((ClipFormat::Text, t.clone().into_bytes()));
    }
    if let Some(p) = &cli.clipboard_set_png {
        let data = std::fs::read(p)
            .with_context(|| format!("--clipboard-set-png: cannot read {}", p.display()))
            .map_err(Failure::usage)?;
        if !data.starts_with(b"\x89PNG\r\n\x1a\n") || data.len() > ClipFormat::Png.limit() {
            return Err(Failure::usage(anyhow::anyhow!(
                "--clipboard-set-png: {} is not a PNG image of at most 16 MiB",
                p.display()
            )));
        }
        v.push((ClipFormat::Png, data));
    }
    Ok(v)
}

/// Where the user's files go, and how much one session may bring.
fn downloads(cli: &Cli) -> driver::Downloads {
    driver::Downloads {
        dir: cli.downloads.clone().unwrap_or_else(downloads_dir),
        quota: cli
            .file_quota_mib
            .map_or(tandem_toolbox::DEFAULT_QUOTA, |m| m.saturating_mul(1 << 20)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_remembered_login_is_written_atomically_and_only_for_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tandem/console.toml");
        let r = Remembered {
            relay: Some("relay:4433".into()),
            token: Some("tnd_1_secret".into()),
            ..Remembered::default()
        };
        save(&path, &r).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        // A file that someone made readable is replaced by a new one, not rewritten in place.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        save(&path, &r).unwrap();
        assert_eq!(mode(&path), 0o600);
        let back: Remembered = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(back.token.as_deref(), Some("tnd_1_secret"));
        // Nothing else is left in the directory (no temporary files).
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn secrets_are_read_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "  tnd_7_abc  \nignored\n").unwrap();
        assert_eq!(read_secret(&p, "token").unwrap(), "tnd_7_abc");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_secret(&p, "token").is_err());
        assert!(read_secret(&dir.path().join("missing"), "token").is_err());
    }
}
