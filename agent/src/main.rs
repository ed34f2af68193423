//! `tandem-agent`: runs on the user's PC. Shows a one-time code, asks the user's consent when a
//! technician joins, and holds the end-to-end session. Thin glue over `tandem-session`.
//!
//! With a display it opens a small window ([`ui`]): the code, the consent prompt, and while a
//! session runs an indicator with End and a view-only switch. `--headless` runs without windows
//! (consent on the terminal or answered by a flag) for servers and tests; events then go to stdout,
//! as text or JSON lines.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tandem_client::tandem_certs::RelayTrust;
use tandem_client::{ConnectOptions, EventOut};
use tandem_host::desktop::{self, Backend, SessionEnv};
use tandem_host::{Desktop, HostCmd, HostEvent, UserCommands};
use tandem_session::names;
use tandem_session::tandem_org::log::{MODE_ATTENDED, MODE_UNATTENDED, Record, SessionLog};
use tandem_session::tandem_org::{self as org, Enrollment};
use tandem_session::{
    AgentEvent, AgentHost, CodeChange, Consent, DeviceEvent, DeviceHost, DeviceInfo, OrgCheck,
    Session, SessionConfig, SessionEvent, UnattendedPolicy,
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
    /// without a person in front of them. `lines` reads the answer (a, v or d) and chat lines
    /// (`say …`) from standard input without a terminal: for scripts driving the agent.
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
    /// How the desktop is seen and controlled: `x11`, `wlroots` (sway and other wlroots
    /// compositors), `gnome` (Mutter) or `portal` (xdg-desktop-portal: KDE Plasma and others; the
    /// desktop shows its own sharing dialog). [default: chosen from the session
    /// ($WAYLAND_DISPLAY, $XDG_SESSION_TYPE, $XDG_CURRENT_DESKTOP, $DISPLAY)]
    #[arg(long, env = "TANDEM_BACKEND", value_parser = parse_backend)]
    backend: Option<Backend>,
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
    /// Check the connection and exit: DNS, UDP, TCP and proxy paths to the relay, its
    /// certificate, and the desktop found; one line at the end to read out to your IT provider.
    /// Exits 0 when the relay can be reached.
    #[arg(long)]
    check: bool,
    /// The organisation key this computer trusts (`tandem-org-v1:…`, from `tandem-org init`; or
    /// `org = "…"` in tandem-agent.toml): technicians with a valid certificate of that
    /// organisation are shown as verified, and their certificate's permissions limit what they may
    /// do.
    #[arg(long, env = "TANDEM_ORG")]
    org: Option<String>,
    /// Refuse technicians the organisation's key does not verify (before anything is asked or
    /// shared). Needs --org.
    #[arg(long)]
    require_verified: bool,
    /// A revocation list of the organisation (`tandem-org revoke`) to take if it is newer than the
    /// one kept in the state directory.
    #[arg(long)]
    revocation: Option<PathBuf>,
    /// Run as an enrolled device for unattended access (also `[unattended] enabled = true` in
    /// tandem-agent.toml): no code; online on the relay for the organisation's technicians whose
    /// certificate allows unattended access to this device's group. Needs `tandem-agent enroll`.
    #[arg(long)]
    unattended: bool,
    /// Do not share the clipboard with the technician in either direction (also `[toolbox]
    /// clipboard_to_technician` / `clipboard_from_technician = false`).
    #[arg(long)]
    no_clipboard: bool,
    /// An image the technician puts on the clipboard: `ask` (the window asks; refused without a
    /// window), `yes` or `no`. [default: ask; `[toolbox] clipboard_images`]
    #[arg(long, value_enum)]
    clipboard_images: Option<ImagesArg>,
    /// Where files the technician sends are saved. [default: `[toolbox] downloads`, else
    /// $XDG_DOWNLOAD_DIR, else ~/Downloads]
    #[arg(long)]
    downloads: Option<PathBuf>,
    /// Refuse files from the technician (also `[toolbox] receive_files = false`).
    #[arg(long)]
    no_receive_files: bool,
    /// The most bytes the technician may send in one session, in MiB. [default: 4096;
    /// `[toolbox] quota_mib`]
    #[arg(long)]
    file_quota_mib: Option<u64>,
    /// Send this file or folder to the technician once a session runs (repeatable). In a
    /// session, also `send PATH` on the terminal, or a drop on the window.
    #[arg(long, value_name = "PATH")]
    send: Vec<PathBuf>,
    #[command(flatten)]
    network: tandem_client::NetworkArgs,
    #[command(subcommand)]
    command: Option<AgentCmd>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ImagesArg {
    Ask,
    Yes,
    No,
}

/// `[toolbox]` in tandem-agent.toml: what the technician's tools may do here.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolboxFile {
    clipboard_to_technician: Option<bool>,
    clipboard_from_technician: Option<bool>,
    clipboard_images: Option<tandem_host::toolbox::ImagePolicy>,
    receive_files: Option<bool>,
    downloads: Option<PathBuf>,
    quota_mib: Option<u64>,
}

/// The toolbox's policy: flags over `[toolbox]` over defaults.
fn tools(cli: &Cli, file: Option<&ToolboxFile>, windowed: bool) -> tandem_host::Tools {
    use tandem_host::toolbox::{ClipboardPolicy, ImagePolicy};
    let f = |g: fn(&ToolboxFile) -> Option<bool>| file.and_then(g).unwrap_or(true);
    tandem_host::Tools {
        clipboard: ClipboardPolicy {
            to_technician: !cli.no_clipboard && f(|t| t.clipboard_to_technician),
            from_technician: !cli.no_clipboard && f(|t| t.clipboard_from_technician),
            images: match cli.clipboard_images {
                Some(ImagesArg::Ask) => ImagePolicy::Ask,
                Some(ImagesArg::Yes) => ImagePolicy::Yes,
                Some(ImagesArg::No) => ImagePolicy::No,
                None => file.and_then(|t| t.clipboard_images).unwrap_or_default(),
            },
            can_ask: windowed,
        },
        files: tandem_host::session::FilesPolicy {
            receive: !cli.no_receive_files && f(|t| t.receive_files),
            downloads: cli
                .downloads
                .clone()
                .or_else(|| file.and_then(|t| t.downloads.clone()))
                .unwrap_or_else(downloads_dir),
            quota: cli
                .file_quota_mib
                .or_else(|| file.and_then(|t| t.quota_mib))
                .map_or(tandem_toolbox::DEFAULT_QUOTA, |m| m.saturating_mul(1 << 20)),
        },
    }
}

/// The user's downloads folder: `$XDG_DOWNLOAD_DIR`, else `~/Downloads`, else `./Downloads`.
fn downloads_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DOWNLOAD_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h).join("Downloads"),
        None => PathBuf::from("Downloads"),
    }
}

#[derive(Subcommand, Debug)]
enum AgentCmd {
    /// Enroll this computer in the organisation for unattended access. Without --cert: makes the
    /// device key (kept in the state directory, never sent anywhere) and prints the request for
    /// the administrator (`tandem-org enroll`). With --cert: installs the device certificate the
    /// administrator made from it.
    Enroll {
        /// The device certificate from `tandem-org enroll` (a file, `tandem-device-v1:…`).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// The name to ask for [default: this computer's host name].
        #[arg(long)]
        name: Option<String>,
    },
    /// Print the signed log of sessions on this computer and check it (exit 1 if it was altered).
    Log,
}

/// The organisation trust from flags and the configuration file: the pinned key, the kept
/// revocation list (in the state directory), and a shipped list if newer.
fn org_trust(
    cli: &Cli,
    file: &FileConfig,
) -> Result<Option<tandem_session::tandem_org::TrustStore>> {
    use tandem_session::tandem_org::{OrgPublic, RevocationList, TrustStore, read_text};
    let Some(text) = cli.org.as_deref().or(file.org.as_deref()) else {
        if cli.require_verified || file.require_verified == Some(true) {
            anyhow::bail!(
                "--require-verified needs the organisation key: add org = \"tandem-org-v1:…\" to \
                 tandem-agent.toml (the administrator prints it with `tandem-org init` or \
                 `tandem-org show`)"
            );
        }
        return Ok(None);
    };
    let org = OrgPublic::from_text(text).context(
        "invalid organisation key (org = … in tandem-agent.toml or --org); copy the whole \
         `tandem-org-v1:…` line again from `tandem-org show`",
    )?;
    let kept = state_dir(cli).map(|d| d.join("revocation"));
    let mut store = TrustStore::new(org, kept);
    if let Some(path) = cli.revocation.as_ref().or(file.revocation.as_ref()) {
        let list = read_text(path)
            .and_then(|t| RevocationList::from_text(&t))
            .with_context(|| format!("invalid revocation list {}", path.display()))?;
        store
            .offer(&list)
            .with_context(|| format!("revocation list {}", path.display()))?;
        store.save_now();
    }
    Ok(Some(store))
}

fn parse_backend(s: &str) -> Result<Backend, String> {
    Backend::from_name(s).ok_or_else(|| {
        let names: Vec<_> = Backend::ALL.iter().map(|b| b.name()).collect();
        format!("unknown backend {s:?}; one of: {}", names.join(", "))
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ConsentMode {
    Window,
    Tty,
    /// Like `tty`, from standard input as it is (a script's pipe), without a prompt.
    Lines,
    Deny,
    ViewOnly,
    Allow,
}

/// What the consent prompt says about who the technician is.
#[derive(Clone, Debug)]
pub struct Trust {
    pub verified: bool,
    /// "verified by ACME IT's key (SHA256:…)" or "not verified by an organisation key: …".
    pub text: String,
}

impl Trust {
    fn of(
        peer: &tandem_session::PeerInfo,
        org: Option<&tandem_session::tandem_org::OrgPublic>,
    ) -> Trust {
        match (&peer.org, org) {
            (OrgCheck::Verified(v), Some(o)) => Trust {
                verified: true,
                text: format!(
                    "verified by {}'s key ({}); may {}",
                    names::printable(&o.name, 48),
                    o.fingerprint(),
                    v.permissions
                ),
            },
            (OrgCheck::NotVerified(why), _) => Trust {
                verified: false,
                text: format!(
                    "NOT verified by an organisation key ({}): name and organisation as the \
                     relay reports them",
                    names::printable(why, 160)
                ),
            },
            _ => Trust {
                verified: false,
                text: "name and organisation as the relay reports them".into(),
            },
        }
    }
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
    /// `auto` or `relay-only` (see `--path`).
    path: Option<String>,
    /// The desktop backend (see --backend).
    backend: Option<String>,
    /// The organisation key this computer trusts (see --org).
    org: Option<String>,
    /// Refuse technicians the organisation's key does not verify (see --require-verified).
    require_verified: Option<bool>,
    /// A revocation list shipped with the agent (see --revocation).
    revocation: Option<PathBuf>,
    /// Unattended access (an enrolled device).
    unattended: Option<UnattendedFile>,
    /// The technician's tools (clipboard, files).
    toolbox: Option<ToolboxFile>,
}

/// `[unattended]` in tandem-agent.toml: the endpoint's policy, owned by whoever administers this
/// computer (the file should be writable by root only when the agent runs as a service).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UnattendedFile {
    /// Off unless set: a computer is reachable without a code only if its administrator says so.
    #[serde(default)]
    enabled: bool,
    /// Technicians allowed, by name or key fingerprint (SHA256:…); empty: every technician whose
    /// certificate allows unattended access to this device's group.
    #[serde(default)]
    technicians: Vec<String>,
    /// Whether the user at the screen is asked first: `then-connect` (ask; connect if nobody
    /// answers within `ask_timeout_secs`; the default), `never-without-user` (ask; refuse if
    /// nobody answers) or `no` (connect without asking: servers). The banner shows either way.
    ask: Option<String>,
    /// Seconds to wait for the user's answer. [default: 30]
    ask_timeout_secs: Option<u64>,
    /// `required` (the default: an unattended session needs the banner on the screen, and ends if
    /// it is closed and cannot be shown again) or `optional` (computers without a screen).
    banner: Option<String>,
}

/// What happens when an unattended technician connects while someone may be at the screen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AskPolicy {
    ThenConnect,
    NeverWithoutUser,
    No,
}

/// The unattended policy as the agent runs it.
#[derive(Clone, Debug)]
struct Unattended {
    ask: AskPolicy,
    timeout: Duration,
    /// Where the banner is shown (an X display), if any.
    display: Option<String>,
    /// Without the banner, nobody connects (`banner = "required"`, the default).
    banner_required: bool,
}

impl FileConfig {
    fn network(&self) -> tandem_client::NetworkArgs {
        tandem_client::NetworkArgs {
            transport: self.transport.clone(),
            relay_tcp: self.relay_tcp.clone(),
            relay_websocket: self.relay_websocket.clone(),
            proxy: self.proxy.clone(),
            path: self.path.clone(),
        }
    }
}

fn load_config(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read configuration file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid configuration file {}", path.display()))
}

/// The configuration: `--config`, else the one a ready agent carries (checked; a ready agent
/// that was altered or damaged does not run), else tandem-agent.toml next to the program.
fn file_config(cli: &Cli) -> Result<FileConfig> {
    if let Some(p) = &cli.config {
        return load_config(p);
    }
    if let Some(text) = bundled_config()? {
        return toml::from_str(&text).context(
            "this ready agent carries a configuration this version cannot use; ask your IT \
             provider for a new download",
        );
    }
    Ok(match shipped_config() {
        Some(p) => load_config(&p)?,
        None => FileConfig::default(),
    })
}

/// The configuration appended to this program by `tandem-relay agent-bundle`, if any, after its
/// check. Never logged: it may carry the organisation's key (public, but still not log noise).
fn bundled_config() -> Result<Option<String>> {
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("cannot find this program's own file ({e}); no ready-agent settings");
            return Ok(None);
        }
    };
    match tandem_bundle::read_file(&exe) {
        Ok(b) => Ok(b.map(|b| b.config)),
        Err(tandem_bundle::BundleError::Read { path, source }) => {
            tracing::warn!(%path, "cannot read this program's own file ({source}); no ready-agent settings");
            Ok(None)
        }
        Err(e) => Err(anyhow::Error::new(e)),
    }
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
    /// Enrolled, unattended: online for the organisation's technicians (or trying to be).
    Online {
        text: String,
    },
    Consent {
        technician: String,
        organisation: String,
        /// The names were escaped: they could imitate another name.
        suspicious: bool,
        /// Whether the organisation's key vouches for them, in words.
        trust: Trust,
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

/// One chat line, as both windows show it.
#[derive(Clone, Debug)]
pub struct ChatLine {
    /// Local time, `HH:MM`.
    pub at: String,
    /// From the technician (else from the user).
    pub technician: bool,
    pub text: String,
}

/// The toolbox's part of the window: chat, clipboard switches, file transfers. Emptied when a
/// session starts and when it ends: nothing of a session is kept for the next.
#[derive(Debug, Default)]
pub struct ToolboxView {
    pub chat: Vec<ChatLine>,
    /// The clipboard switches (to the technician, from the technician); `None` where the
    /// clipboard is not shared in this session.
    pub clipboard: Option<(bool, bool)>,
    /// An image the technician wants to put on the clipboard (its size), waiting for the user.
    pub image_offered: Option<usize>,
    /// File transfers of this session.
    pub transfers: tandem_toolbox::TransferList,
}

/// Most chat lines kept (the oldest go).
const MAX_CHAT_LINES: usize = 500;

impl ToolboxView {
    fn push_chat(&mut self, technician: bool, text: String) {
        if self.chat.len() >= MAX_CHAT_LINES {
            self.chat.remove(0);
        }
        self.chat.push(ChatLine {
            at: clock(),
            technician,
            text,
        });
    }
}

/// ", resumed at 12 MB" for a transfer that resumed.
fn resumed_note(from: u64) -> String {
    if from > 0 {
        format!(", resumed at {}", tandem_toolbox::human_bytes(from))
    } else {
        String::new()
    }
}

/// The local time as chat lines show it.
pub fn clock() -> String {
    chrono::Local::now().format("%H:%M").to_string()
}

/// State shared by the session logic and the window.
pub struct Shared {
    pub state: Mutex<State>,
    pub toolbox: Mutex<ToolboxView>,
    /// The window's "Check connection".
    pub check: Mutex<CheckView>,
    ctx: Option<eframe::egui::Context>,
}

/// What the window's "Check connection" needs and found.
#[derive(Default)]
pub struct CheckView {
    /// How this agent reaches its relay (known once the settings are read).
    pub opts: Option<ConnectOptions>,
    /// Where the result is also reported (a `check` event).
    pub out: Option<EventOut>,
    pub running: bool,
    pub report: Option<tandem_client::check::Report>,
}

impl Shared {
    /// Runs the connection check on a thread of its own (the session logic is not disturbed);
    /// the window shows the report when it is there.
    pub fn start_check(self: &Arc<Self>) {
        let (opts, out) = {
            let mut c = lock(&self.check);
            if c.running {
                return;
            }
            let Some(o) = c.opts.clone() else { return };
            c.running = true;
            (o, c.out)
        };
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("tandem-check".into())
            .spawn(move || {
                let report = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|rt| rt.block_on(tandem_client::check::check(&opts)));
                if let (Some(out), Ok(r)) = (&out, &report) {
                    out.event(
                        "check",
                        &format!("Connection check: {}", r.summary),
                        serde_json::to_value(r).unwrap_or_default(),
                    );
                }
                let mut c = lock(&me.check);
                c.running = false;
                c.report = report.ok();
                drop(c);
                me.repaint();
            });
        if spawned.is_err() {
            lock(&self.check).running = false;
        }
    }
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
    /// Say something to the technician.
    Chat(String),
    /// The clipboard switches (to the technician, from the technician).
    Clipboard(bool, bool),
    /// The answer about the technician's image.
    AcceptImage(bool),
    /// Send this file or folder to the technician.
    SendFiles(PathBuf),
    /// Cancel a transfer.
    CancelTransfer(u64),
}

/// A terminal line that is chat (`say …`), not a command.
fn chat_line(l: &str) -> Option<String> {
    let t = l.trim_start();
    let rest = t.strip_prefix("say ").or_else(|| t.strip_prefix("say\t"))?;
    let rest = rest.trim();
    (!rest.is_empty()).then(|| rest.to_owned())
}

/// Reports every step to stdout (text or JSON lines) and to the window.
struct Report {
    out: EventOut,
    shared: Arc<Shared>,
    /// The toolbox's policy for every session.
    tools: tandem_host::Tools,
    /// Files to send once a session runs (`--send`).
    send: Vec<PathBuf>,
}

impl Report {
    fn event(&self, kind: &str, text: &str, data: serde_json::Value) {
        self.out.event(kind, text, data);
    }
    fn phase(&self, p: Phase) {
        self.shared.set_phase(p);
    }
    /// The user's own chat line: into the window's log and reported (`sent`: whether the
    /// technician's console can show chat).
    fn said(&self, text: &str, sent: bool) {
        let text = names::printable(text, tandem_session::MAX_CHAT);
        if sent {
            lock(&self.shared.toolbox).push_chat(false, text.clone());
        }
        self.event(
            "chat_sent",
            &if sent {
                format!("[{}] You: {text}", clock())
            } else {
                "The technician's console cannot show chat.".to_owned()
            },
            serde_json::json!({"text": text, "sent": sent}),
        );
        self.shared.repaint();
    }
    /// The technician's chat line.
    fn heard(&self, text: String) {
        let at = clock();
        self.event(
            "chat",
            &format!("[{at}] Technician: {text}"),
            serde_json::json!({"from": "technician", "text": text}),
        );
        lock(&self.shared.toolbox).push_chat(true, text);
        self.shared.repaint();
    }
    /// A transfer event on stdout: progress with --json (about ten a second), every end.
    fn transfer(&self, e: &tandem_toolbox::TransferEvent) {
        use tandem_toolbox::TransferEvent;
        let data = serde_json::to_value(e).unwrap_or_default();
        match e {
            TransferEvent::Progress { progress, .. } => {
                if self.out.json || progress.done == progress.total {
                    self.event("transfer", &progress.line(), data);
                }
            }
            TransferEvent::Done {
                direction,
                stored_as,
                path,
                size,
                resumed_from,
                ..
            } => {
                let text = match (direction, path) {
                    (tandem_toolbox::Direction::Incoming, Some(p)) => format!(
                        "Received {} from the technician: saved as {} (checked){}.",
                        tandem_toolbox::human_bytes(*size),
                        p.display(),
                        resumed_note(*resumed_from)
                    ),
                    _ => format!(
                        "Sent {} to the technician: saved there as {stored_as} (checked){}.",
                        tandem_toolbox::human_bytes(*size),
                        resumed_note(*resumed_from)
                    ),
                };
                self.event("transfer_done", &text, data);
            }
            TransferEvent::Failed { name, error, .. } => {
                self.event("transfer_failed", &format!("{name}: {error}"), data);
            }
        }
    }
    /// Forgets everything of the session's toolbox (chat, transfers).
    fn clear_toolbox(&self) {
        *lock(&self.shared.toolbox) = ToolboxView::default();
        self.shared.repaint();
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
    match &cli.command {
        Some(AgentCmd::Enroll { cert, name }) => {
            return finish(enroll(&cli, cert.as_deref(), name.as_deref()));
        }
        Some(AgentCmd::Log) => {
            return match show_log(&cli) {
                Ok(true) => std::process::ExitCode::SUCCESS,
                Ok(false) => std::process::ExitCode::FAILURE,
                Err(e) => finish(Err(e)),
            };
        }
        None => {}
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tandem-agent: cannot start: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if cli.check {
        return match rt.block_on(check_connection(&cli)) {
            Ok(report) => {
                if cli.json {
                    println!("{}", serde_json::to_string(&report).unwrap_or_default());
                } else {
                    println!("Tandem connection check");
                    print!("{}", report.text());
                }
                if report.reachable {
                    std::process::ExitCode::SUCCESS
                } else {
                    std::process::ExitCode::FAILURE
                }
            }
            Err(e) => finish(Err(e)),
        };
    }
    // The window opens on $DISPLAY (the user's desktop); `--display` only chooses what is shared.
    let windowed = !cli.headless && std::env::var_os("DISPLAY").is_some_and(|d| !d.is_empty());
    let (tx, rx) = mpsc::unbounded_channel();
    if !windowed {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                phase: Phase::Connecting,
                relay: String::new(),
            }),
            toolbox: Mutex::default(),
            check: Mutex::default(),
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
        toolbox: Mutex::default(),
        check: Mutex::default(),
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
                    text: names::printable(&window_words(&format!("{e:#}")), 400),
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

fn connect_options(
    cli: &Cli,
    file_network: &tandem_client::NetworkArgs,
    relay: String,
    trust: RelayTrust,
) -> Result<ConnectOptions> {
    let mut opts = ConnectOptions::new(relay, trust);
    opts.software = format!("tandem-agent {}", env!("CARGO_PKG_VERSION"));
    cli.network
        .clone()
        .or(file_network)
        .apply(&mut opts)
        .context(
            "invalid network settings (--transport, --relay-tcp, --relay-websocket, --proxy)",
        )?;
    Ok(opts)
}

/// An error as the agent's window says it: what the user can do (tell the IT provider, press
/// "Check connection", get the ready download), not which flag to give. The terminal keeps the
/// full text with flags. The original follows in brackets for the IT provider.
fn window_words(text: &str) -> String {
    let advice = if text.contains("does not match the pinned fingerprint") {
        "The relay's certificate has changed, so this agent does not trust it. Do not continue: \
         tell your IT provider (their relay was replaced, or something on this network \
         intercepts the connection)."
    } else if text.contains("the relay must be pinned") || text.contains("no relay given") {
        "This Tandem agent is not set up for your IT provider's relay. Ask them for their ready \
         Tandem download, and run that one instead."
    } else if text.contains("no answer from the relay") || text.contains("cannot resolve relay") {
        "Cannot reach your IT provider's relay. Press \"Check connection\" and read the summary \
         line to your IT provider."
    } else if text.contains("tandem-agent.toml") || text.contains("invalid network settings") {
        "This Tandem agent's settings are wrong. Ask your IT provider for their ready Tandem \
         download."
    } else {
        return text.to_owned();
    };
    format!("{advice} ({text})")
}

/// `--check`: the connection report, and the desktop this agent would share.
async fn check_connection(cli: &Cli) -> Result<tandem_client::check::Report> {
    use tandem_client::check::Verdict;
    let file = file_config(cli)?;
    let relay = cli.relay.clone().or(file.relay.clone()).context(
        "no relay configured: this agent does not know which relay to use; ask your IT provider \
         for their ready agent (or give --relay HOST:PORT --relay-pin sha256:…)",
    )?;
    let pin = cli.relay_pin.clone().or(file.relay_pin.clone());
    let ca = cli.relay_ca.clone().or(file.relay_ca.clone());
    let trust = RelayTrust::from_options(pin.as_deref(), ca.as_deref())?;
    let opts = connect_options(cli, &file.network(), relay, trust)?;
    let mut report = tandem_client::check::check(&opts).await;
    let forced = match (cli.backend, file.backend.as_deref()) {
        (Some(b), _) => Some(b),
        (None, Some(name)) => parse_backend(name).ok(),
        (None, None) => None,
    };
    let env = SessionEnv::from_process(cli.display.clone());
    match desktop::detect(&env, forced) {
        // Found, not opened: opening a portal backend would ask the user to share the screen.
        Ok(choice) => report.push(
            "display",
            Verdict::Ok,
            format!("{} ({})", choice.backend.name(), choice.why),
        ),
        Err(e) => report.push("display", Verdict::Fail, e.to_string()),
    }
    if report
        .steps
        .last()
        .is_some_and(|s| s.verdict == Verdict::Fail)
    {
        report.summary.push_str("; the screen cannot be shared");
    }
    Ok(report)
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
    let file = file_config(&cli)?;
    let file_network = file.network();
    let relay = match cli.relay.clone().or(file.relay.clone()) {
        Some(r) => r,
        // In the window's words for a user who double-clicked a plain agent.
        None if shared.ctx.is_some() => bail!(
            "This Tandem agent does not know which relay to use. Ask your IT provider for their \
             ready Tandem download, and run that one instead."
        ),
        None => bail!(
            "no relay given: use --relay HOST:PORT --relay-pin sha256:… (or run the ready agent \
             your IT provider made with `tandem-relay agent-bundle`)"
        ),
    };
    lock(&shared.state).relay = relay.clone();
    let pin = cli.relay_pin.clone().or(file.relay_pin.clone());
    let ca = cli.relay_ca.clone().or(file.relay_ca.clone());
    let trust = RelayTrust::from_options(pin.as_deref(), ca.as_deref())?;
    let windowed = shared.ctx.is_some();
    // Unattended, the endpoint's policy ([unattended] ask) decides how the user is asked; the
    // attended --consent modes do not apply (a service has no terminal).
    let unattended_on = cli.unattended || file.unattended.as_ref().is_some_and(|u| u.enabled);
    if unattended_on && cli.consent.is_some() {
        bail!(
            "--consent is for attended sessions; unattended ones follow [unattended] ask in \
             tandem-agent.toml (then-connect, never-without-user or no)"
        );
    }
    let consent = cli.consent.unwrap_or(if windowed {
        ConsentMode::Window
    } else {
        ConsentMode::Tty
    });
    if consent == ConsentMode::Window && !windowed {
        bail!("--consent window needs a window; without a display use --consent tty");
    }
    if consent == ConsentMode::Tty && !unattended_on && !std::io::stdin().is_terminal() {
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
        tools: tools(&cli, file.toolbox.as_ref(), shared.ctx.is_some()),
        send: cli.send.clone(),
        shared,
    };
    let desktop = choose_desktop(&cli, file.backend.as_deref(), &report)?;
    let opts = connect_options(&cli, &file_network, relay.clone(), trust)?;
    {
        let mut c = lock(&report.shared.check);
        c.opts = Some(opts.clone());
        c.out = Some(report.out);
    }
    let trust = org_trust(&cli, &file)?;
    let org_public = trust.as_ref().map(|t| t.org().clone());
    if let Some(o) = &org_public {
        report.event(
            "organisation",
            &format!(
                "Technicians of {} are verified by its key {}{}.",
                names::printable(&o.name, 48),
                o.fingerprint(),
                if cli.require_verified || file.require_verified == Some(true) {
                    "; others are refused"
                } else {
                    ""
                }
            ),
            serde_json::json!({"organisation": o.name, "fingerprint": o.fingerprint()}),
        );
    }
    let cfg = SessionConfig {
        software: opts.software.clone(),
        capabilities: vec![
            "control/v1".into(),
            "cursor/v1".into(),
            tandem_session::CAP_CHAT.into(),
            tandem_session::CAP_CLIPBOARD.into(),
            tandem_session::CAP_FILES.into(),
        ],
        guesses: tandem_session::GuessLimit {
            first_pause: Duration::from_secs(cli.wrong_code_pause),
            ..Default::default()
        },
        trust: trust.map(|t| Arc::new(std::sync::Mutex::new(t))),
        require_verified: cli.require_verified || file.require_verified == Some(true),
        ..SessionConfig::default()
    };
    let enrollment = match &org_public {
        Some(o) => load_enrollment(&cli, o)?,
        None => None,
    };
    let mut log = enrollment.as_ref().and_then(|e| open_log(&cli, e));
    if unattended_on {
        let Some(enrollment) = enrollment else {
            bail!(
                "unattended access needs an enrolled device and the organisation key: run \
                 `tandem-agent enroll` (and put org = \"tandem-org-v1:…\" in tandem-agent.toml)"
            );
        };
        let u = unattended_policy(file.unattended.as_ref(), &cli)?;
        let policy = UnattendedPolicy {
            technicians: file
                .unattended
                .as_ref()
                .map(|u| u.technicians.clone())
                .unwrap_or_default(),
        };
        let ctx = UnattendedRun {
            desktop,
            org: org_public.as_ref(),
            report: &report,
            u,
        };
        return run_unattended(opts, cfg, Arc::new(enrollment), policy, ctx, log, &mut cmds).await;
    }
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
                    CodeChange::RelayLost => Some(
                        "The connection to your IT provider's relay was lost; the old code no longer works.",
                    ),
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
                // Attended: the user is there and decides; a log that cannot be written is
                // warned about, not a reason to refuse them help.
                let _ = log_start(&mut log, &s, MODE_ATTENDED);
                let quit = run_session(
                    *s,
                    consent,
                    None,
                    desktop.clone(),
                    org_public.as_ref(),
                    &report,
                    &mut cmds,
                )
                .await;
                log_end(&mut log, &quit);
                let quit = quit?;
                if cli.once || quit {
                    return Ok(());
                }
            }
        }
    }
}

/// Chooses and opens the desktop backend before any code is shown, so that a desktop this agent
/// cannot share is said at once, not after the technician joined. Without any desktop (a server,
/// a test) the agent still runs and says that nothing can be shared.
fn choose_desktop(
    cli: &Cli,
    file_backend: Option<&str>,
    report: &Report,
) -> Result<Option<Arc<dyn Desktop>>> {
    let forced = match (cli.backend, file_backend) {
        (Some(b), _) => Some(b),
        (None, Some(name)) => Some(
            parse_backend(name)
                .map_err(anyhow::Error::msg)
                .context("invalid `backend` in the configuration file")?,
        ),
        (None, None) => None,
    };
    let env = SessionEnv::from_process(cli.display.clone());
    let choice = match desktop::detect(&env, forced) {
        Ok(c) => c,
        Err(desktop::BackendError::NoDesktop) => {
            let text = desktop::BackendError::NoDesktop.to_string();
            eprintln!("tandem-agent: warning: {text}");
            report.event(
                "desktop",
                &format!("Nothing can be shared: {text}"),
                serde_json::json!({"backend": null}),
            );
            return Ok(None);
        }
        Err(e) => return Err(anyhow::Error::new(e).context("this desktop cannot be shared")),
    };
    let d = desktop::open(&choice, &env).context("this desktop cannot be shared")?;
    report.event(
        "desktop",
        &format!("Sharing {} ({})", d.describe(), choice.why),
        serde_json::json!({"backend": choice.backend.name(), "desktop": d.describe()}),
    );
    Ok(Some(Arc::from(d)))
}

/// The warning shown with names that were escaped.
pub const SUSPICIOUS_NAME: &str = "this name contains unusual or invisible characters that can make \
it look like another name; they are shown as \\u{…} codes. Deny unless you are sure.";

/// The file that keeps the count of failed attempts across restarts.
fn tries_file(cli: &Cli) -> Option<PathBuf> {
    Some(state_dir(cli)?.join("agent-tries.toml"))
}

/// Where the agent keeps what must survive a restart (failed attempts, the newest revocation
/// list).
fn state_dir(cli: &Cli) -> Option<PathBuf> {
    cli.state_dir.clone().or_else(|| {
        std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
            .map(|d| d.join("tandem"))
    })
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

/// The user's chat line before the answer: sent, shown and reported.
async fn user_says(s: &Session, report: &Report, text: String) {
    let sent = tandem_host::say_before_consent(s, text.clone()).await;
    report.said(&text, sent);
}

/// Waits for the user's answer; denied after 60 s.
#[allow(clippy::too_many_arguments)] // the prompt's words and the two channels it listens to
async fn ask_consent(
    s: &Session,
    mode: ConsentMode,
    technician: &str,
    organisation: &str,
    suspicious: bool,
    trust: &Trust,
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
            println!("  ({})", trust.text);
            if suspicious {
                println!("  WARNING: {SUSPICIOUS_NAME}");
            }
            println!(
                "  Only continue if YOU contacted them. Nobody legitimate calls you out of the blue."
            );
            println!("  [a] allow control   [v] view only   [d] deny   (denied in 60 s)");
            println!("  (To ask them something first, type: say <your question>)");
        }
        ConsentMode::Window | ConsentMode::Lines => {}
    }
    report.event(
        "consent_asked",
        &format!("Asking you whether {technician} of {organisation} may connect…"),
        serde_json::json!({"technician": technician, "organisation": organisation, "suspicious_name": suspicious, "verified": trust.verified, "trust": trust.text}),
    );
    report.phase(Phase::Consent {
        technician: technician.to_owned(),
        organisation: organisation.to_owned(),
        suspicious,
        trust: trust.clone(),
        deadline: Instant::now() + wait,
    });
    let answer = async {
        while let Some(c) = cmds.recv().await {
            match c {
                UiCmd::Consent(c) => return c,
                UiCmd::Chat(t) => user_says(s, report, t).await,
                UiCmd::Line(l) => {
                    if let Some(t) = chat_line(&l) {
                        user_says(s, report, t).await;
                        continue;
                    }
                    return match l.trim().to_lowercase().as_str() {
                        "a" | "allow" => Consent::AllowControl,
                        "v" | "view" | "view only" => Consent::ViewOnly,
                        _ => Consent::Deny,
                    };
                }
                UiCmd::End => return Consent::Deny,
                UiCmd::ViewOnly(_)
                | UiCmd::NewCode
                | UiCmd::Clipboard(..)
                | UiCmd::AcceptImage(_)
                | UiCmd::SendFiles(_)
                | UiCmd::CancelTransfer(_) => {}
            }
        }
        Consent::Deny
    };
    tokio::time::timeout(wait, answer)
        .await
        .unwrap_or(Consent::Deny)
}

/// The user's commands during a session: the window's buttons, terminal lines, Ctrl-C; and, in an
/// unattended session, what the [`Watch`] ends it for.
struct AgentCmds<'a> {
    rx: &'a mut mpsc::UnboundedReceiver<UiCmd>,
    watch: Option<&'a mut Watch>,
    report: &'a Report,
    /// The watch's clock: made once, so that the session's other work (cursor moves, the
    /// console's messages), which starts `next` over each time, cannot keep it from ticking.
    tick: tokio::time::Interval,
    /// Commands given before the session ran (`--send`), played first.
    queued: std::collections::VecDeque<HostCmd>,
}

impl<'a> AgentCmds<'a> {
    fn new(
        rx: &'a mut mpsc::UnboundedReceiver<UiCmd>,
        watch: Option<&'a mut Watch>,
        report: &'a Report,
    ) -> Self {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        AgentCmds {
            rx,
            watch,
            report,
            tick,
            queued: report
                .send
                .iter()
                .cloned()
                .map(HostCmd::SendFiles)
                .collect(),
        }
    }
}

impl UserCommands for AgentCmds<'_> {
    async fn next(&mut self) -> HostCmd {
        if let Some(c) = self.queued.pop_front() {
            return c;
        }
        loop {
            tokio::select! {
                c = self.rx.recv() => match c {
                    Some(UiCmd::ViewOnly(v)) => return HostCmd::ViewOnly(v),
                    Some(UiCmd::Chat(t)) => return HostCmd::Chat(t),
                    Some(UiCmd::Clipboard(to_technician, from_technician)) => {
                        let mut v = lock(&self.report.shared.toolbox);
                        if v.clipboard.is_some() {
                            v.clipboard = Some((to_technician, from_technician));
                        }
                        return HostCmd::Clipboard { to_technician, from_technician };
                    }
                    Some(UiCmd::SendFiles(p)) => return HostCmd::SendFiles(p),
                    Some(UiCmd::CancelTransfer(id)) => return HostCmd::CancelTransfer(id),
                    Some(UiCmd::Line(l)) if l.trim_start().starts_with("send ") => {
                        let p = l.trim_start()["send ".len()..].trim();
                        if !p.is_empty() {
                            return HostCmd::SendFiles(PathBuf::from(p));
                        }
                    }
                    Some(UiCmd::AcceptImage(yes)) => {
                        lock(&self.report.shared.toolbox).image_offered = None;
                        return HostCmd::AcceptImage(yes);
                    }
                    Some(UiCmd::Line(l)) if chat_line(&l).is_some() => {
                        if let Some(t) = chat_line(&l) {
                            return HostCmd::Chat(t);
                        }
                    }
                    Some(UiCmd::Line(l)) => match l.trim().to_lowercase().as_str() {
                        "v" | "view" | "view only" => return HostCmd::ViewOnly(true),
                        "c" | "control" => return HostCmd::ViewOnly(false),
                        "e" | "end" => return HostCmd::End,
                        "quit" => return HostCmd::Quit,
                        _ => {}
                    },
                    Some(UiCmd::End) | None => return HostCmd::End,
                    Some(UiCmd::Consent(_) | UiCmd::NewCode) => {}
                },
                _ = tokio::signal::ctrl_c() => return HostCmd::Quit,
                _ = self.tick.tick(), if self.watch.is_some() => {
                    if let Some(w) = self.watch.as_deref_mut()
                        && let Some(cmd) = w.check(self.report)
                    {
                        return cmd;
                    }
                }
            }
        }
    }
}

/// How often an unattended session's banner and certificate are checked.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// What keeps an unattended session honest while it runs: the banner stays on the screen (shown
/// again if someone closes it; the session ends if it cannot be), and the session ends when the
/// technician's certificate does.
struct Watch {
    banner: Option<tandem_host::banner::Banner>,
    display: Option<String>,
    text: String,
    required: bool,
    until: Option<std::time::SystemTime>,
    /// Times the banner had to be shown again in this session.
    reshown: u32,
}

/// Times a banner is shown again before it counts as one that cannot be kept (someone keeps
/// closing it).
const MAX_RESHOWN: u32 = 5;

impl Watch {
    fn check(&mut self, report: &Report) -> Option<HostCmd> {
        if self
            .until
            .is_some_and(|t| std::time::SystemTime::now() >= t)
        {
            report.event(
                "certificate_expired",
                "The technician's certificate has expired: the session ends.",
                serde_json::json!({}),
            );
            return Some(HostCmd::EndBecause(
                "the technician's certificate has expired",
            ));
        }
        if self.banner.as_ref().is_some_and(|b| !b.is_active()) {
            self.reshown += 1;
            let shown = if self.reshown > MAX_RESHOWN {
                Err("it was closed too often".to_string())
            } else {
                tandem_host::banner::Banner::show(self.display.as_deref(), &self.text)
                    .map_err(|e| e.to_string())
            };
            match shown {
                Ok(b) => {
                    report.event(
                        "banner",
                        "The session banner was closed; it is shown again.",
                        serde_json::json!({"shown": true, "again": true}),
                    );
                    self.banner = Some(b);
                }
                Err(e) => {
                    self.banner = None;
                    report.event(
                        "banner_lost",
                        &format!("The session banner was closed and cannot be shown again ({e})."),
                        serde_json::json!({"error": e}),
                    );
                    if self.required {
                        return Some(HostCmd::EndBecause(
                            "the session banner was closed and cannot be shown again",
                        ));
                    }
                }
            }
        }
        None
    }
}

/// Runs one session to its end. Returns whether the program should quit (the window was closed).
async fn run_session(
    s: Session,
    mode: ConsentMode,
    unattended: Option<&Unattended>,
    desktop: Option<Arc<dyn Desktop>>,
    org: Option<&tandem_session::tandem_org::OrgPublic>,
    report: &Report,
    cmds: &mut mpsc::UnboundedReceiver<UiCmd>,
) -> Result<bool> {
    // The names as the certificate or the relay gives them, escaped where they could imitate
    // another name.
    let shown = names::ShownPeer::of(s.peer());
    let suspicious = shown.suspicious();
    let (technician, organisation) = (shown.technician.text, shown.organisation.text);
    let trust = Trust::of(s.peer(), org);
    report.event(
        "technician",
        &format!("{technician} of {organisation}: {}.", trust.text),
        serde_json::json!({"technician": technician, "organisation": organisation,
            "verified": trust.verified, "trust": trust.text}),
    );
    // Unattended: the banner shows from now until the session ends, whatever is decided; without
    // it (unless the policy makes it optional) nobody gets in.
    let mut watch = unattended.map(|u| {
        let (banner, text) = show_banner(u, &technician, &organisation, report);
        let until = match &s.peer().org {
            OrgCheck::Verified(v) => Some(
                std::time::UNIX_EPOCH
                    + Duration::from_secs(v.not_after.saturating_add(org::CLOCK_SKEW)),
            ),
            _ => None,
        };
        Watch {
            banner,
            display: u.display.clone(),
            text,
            required: u.banner_required,
            until,
            reshown: 0,
        }
    });
    let may = |v: bool| {
        if v {
            "view your screen"
        } else {
            "view and control your screen"
        }
    };
    let windowed = report.shared.ctx.is_some();
    let mut on = |e: HostEvent| {
        match e {
        HostEvent::Denied => {
            let text = "You denied the request; nothing was shared.";
            report.event("denied", text, serde_json::json!({}));
            report.phase(Phase::Ended { text: text.into() });
        }
        HostEvent::ScreenUnavailable(why) => {
            eprintln!("tandem-agent: the screen cannot be shared: {why}");
        }
        HostEvent::InputUnavailable(why) => {
            eprintln!("tandem-agent: remote control is unavailable: {why}");
        }
        HostEvent::Started {
            view_only,
            control_possible,
        } => {
            report.event(
                "session",
                &format!(
                    "Session active: {technician} of {organisation} may {}. {}",
                    may(view_only),
                    if mode == ConsentMode::Tty {
                        "Type v + Enter for view only, c for control, e to end."
                    } else if windowed {
                        "End it in the window."
                    } else {
                        "Press Ctrl-C to end it."
                    }
                ),
                serde_json::json!({"technician": technician, "organisation": organisation, "view_only": view_only}),
            );
            lock(&report.shared.toolbox).clipboard = control_possible.then_some((
                report.tools.clipboard.to_technician,
                report.tools.clipboard.from_technician,
            ));
            report.phase(Phase::InSession {
                technician: technician.clone(),
                organisation: organisation.clone(),
                view_only,
                control_possible,
                note: None,
            });
        }
        HostEvent::ControlNotAllowed => report.event(
            "permissions",
            "Control was not allowed for this session; it stays view only.",
            serde_json::json!({"view_only": true}),
        ),
        HostEvent::Permissions { view_only } => {
            report.update_session(|vo, _| *vo = view_only);
            report.event(
                "permissions",
                &format!("{technician} may now {}.", may(view_only)),
                serde_json::json!({"view_only": view_only}),
            );
        }
        HostEvent::VideoTarget { kbps, halved, load } => report.event(
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
        HostEvent::Link(e) => {
            let (kind, text) = match e {
                SessionEvent::PeerSuspended { grace } => (
                    "peer_suspended",
                    format!(
                        "The technician's connection dropped; waiting up to {} s.",
                        grace.as_secs()
                    ),
                ),
                SessionEvent::PeerResumed => ("peer_resumed", "The technician is back.".into()),
                SessionEvent::LinkLost => (
                    "link_lost",
                    "Connection to the relay lost; reconnecting…".into(),
                ),
                SessionEvent::LinkResumed => ("link_resumed", "Reconnected.".into()),
            };
            report.event(kind, &text, serde_json::json!({}));
            let resumed = matches!(kind, "peer_resumed" | "link_resumed");
            report.update_session(|_, note| *note = (!resumed).then_some(text));
        }
        HostEvent::Chat { text } => report.heard(text),
        HostEvent::Clipboard { to_technician, image, bytes } => {
            let what = if image { "An image" } else { "Text" };
            report.event(
                "clipboard",
                &if to_technician {
                    format!("{what} from your clipboard went to the technician ({bytes} bytes).")
                } else {
                    format!("{what} from the technician is on your clipboard ({bytes} bytes).")
                },
                serde_json::json!({"to_technician": to_technician, "image": image, "bytes": bytes}),
            );
        }
        HostEvent::ClipboardRefused { to_technician, why } => report.event(
            "clipboard_refused",
            &format!(
                "{} not shared: {why}.",
                if to_technician { "Your clipboard was" } else { "The technician's clipboard was" }
            ),
            serde_json::json!({"to_technician": to_technician, "reason": why}),
        ),
        HostEvent::ImageOffered { bytes } => {
            lock(&report.shared.toolbox).image_offered = Some(bytes);
            report.event(
                "clipboard_image_offered",
                &format!("The technician wants to put an image ({bytes} bytes) on your clipboard."),
                serde_json::json!({"bytes": bytes}),
            );
            report.shared.repaint();
        }
        HostEvent::Transfer(e) => {
            lock(&report.shared.toolbox).transfers.apply(&e);
            report.shared.repaint();
            report.transfer(&e);
        }
        HostEvent::SendProblem(why) => report.event("send_problem", &why, serde_json::json!({})),
        HostEvent::ClipboardUnavailable(why) => {
            lock(&report.shared.toolbox).clipboard = None;
            report.event("clipboard_unavailable", &why, serde_json::json!({}));
        }
        HostEvent::ChatSent { text, delivered } => report.said(&text, delivered),
        HostEvent::Ended { text, reason } => {
            report.event("ended", &text, serde_json::json!({"reason": reason}));
            report.phase(Phase::Ended { text });
        }
    }
    };
    let no_banner = watch
        .as_ref()
        .is_some_and(|w| w.required && w.banner.is_none());
    report.clear_toolbox();
    let decide = async {
        match unattended {
            Some(_) if no_banner => {
                report.event(
                    "unattended_refused",
                    "The session banner cannot be shown, so nobody may connect unattended (set \
                 [unattended] banner = \"optional\" for computers without a screen).",
                    serde_json::json!({"reason": "no banner"}),
                );
                Consent::Deny
            }
            Some(u) => {
                ask_unattended(&s, u, &technician, &organisation, &trust, report, cmds).await
            }
            None => {
                ask_consent(
                    &s,
                    mode,
                    &technician,
                    &organisation,
                    suspicious,
                    &trust,
                    report,
                    cmds,
                )
                .await
            }
        }
    };
    let (mut decision, pending) = match tandem_host::await_decision(&s, decide, &mut on).await {
        tandem_host::Decision::Decided { consent, pending } => (consent, pending),
        tandem_host::Decision::Ended => {
            report.clear_toolbox();
            return Ok(false);
        }
    };
    // Answering for nobody (`--consent allow`) on a computer that trusts an organisation: control
    // only for technicians its key verified; the others get view only.
    if org.is_some()
        && mode == ConsentMode::Allow
        && decision == Consent::AllowControl
        && !s.peer().org.is_verified()
    {
        decision = Consent::ViewOnly;
        report.event(
            "certificate_limits",
            "The technician is not verified by the organisation's key: view only (nobody was \
             asked).",
            serde_json::json!({"permissions": "view"}),
        );
    }
    // A verified certificate's permissions bound what the user can grant (enforced here, on the
    // agent, like the user's own choice).
    if let OrgCheck::Verified(v) = &s.peer().org
        && decision == Consent::AllowControl
        && !v.permissions.control
    {
        decision = Consent::ViewOnly;
        report.event(
            "certificate_limits",
            "The technician's certificate allows viewing only: control is not possible.",
            serde_json::json!({"permissions": v.permissions.to_string()}),
        );
    }
    let outcome = tandem_host::run_session(
        s,
        decision,
        pending,
        desktop,
        &report.tools,
        &mut AgentCmds::new(cmds, watch.as_mut(), report),
        &mut on,
    )
    .await;
    report.clear_toolbox();
    Ok(outcome?.quit)
}

/// Files of an enrolled device, in the state directory.
const DEVICE_KEY: &str = "device.key";
const DEVICE_CERT: &str = "device.cert";
const SESSION_LOG: &str = "sessions.log";

fn device_dir(cli: &Cli) -> Result<PathBuf> {
    state_dir(cli).context("no state directory: use --state-dir (or set $HOME)")
}

/// What the computer says about itself while online (signed into its presence).
fn device_info() -> DeviceInfo {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| std::env::consts::OS.to_string());
    let user = std::env::var("TANDEM_DEVICE_USER")
        .ok()
        .or_else(|| {
            std::fs::read("/run/utmp")
                .ok()
                .and_then(|b| logged_in_user(&b))
        })
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_default();
    DeviceInfo { hostname, os, user }
}

/// The user logged in at the computer's screen, from utmp records (glibc layout on Linux: 384
/// bytes each; type at 0, line at 8, user at 44): a graphical session (line `:0`, `seat0`, `tty7`
/// …) first, else any user process.
fn logged_in_user(utmp: &[u8]) -> Option<String> {
    const RECORD: usize = 384;
    const USER_PROCESS: i16 = 7;
    let field = |b: &[u8]| {
        let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    let mut any = None;
    for r in utmp.chunks_exact(RECORD) {
        if i16::from_ne_bytes([r[0], r[1]]) != USER_PROCESS {
            continue;
        }
        let (line, user) = (field(&r[8..40]), field(&r[44..76]));
        if user.is_empty() {
            continue;
        }
        if line.starts_with(':') || line.starts_with("seat") || line.starts_with("tty") {
            return Some(user);
        }
        any.get_or_insert(user);
    }
    any
}

/// `tandem-agent enroll`: the device key and request, or the certificate installed.
fn enroll(cli: &Cli, cert: Option<&Path>, name: Option<&str>) -> Result<()> {
    let dir = device_dir(cli)?;
    let key_path = dir.join(DEVICE_KEY);
    let Some(cert) = cert else {
        let key = if key_path.exists() {
            org::KeyPair::from_text(&org::read_text(&key_path)?)
                .with_context(|| format!("cannot read the device key {}", key_path.display()))?
        } else {
            let k = org::KeyPair::generate()?;
            org::write_private(&key_path, &k.to_text())?;
            k
        };
        let name = name
            .map(str::to_owned)
            .unwrap_or_else(|| device_info().hostname);
        let name = if name.is_empty() {
            "computer".into()
        } else {
            name
        };
        let req = org::DeviceRequest::new(&name, &key)?;
        eprintln!(
            "The device key is in {} (it never leaves this computer). Send the line below to your \
             administrator, who approves it with\n  tandem-org enroll --key org.key --request \
             <file> --group <group> --out device.cert\nthen install the certificate here:\n  \
             tandem-agent enroll --cert device.cert",
            key_path.display()
        );
        println!("{}", req.to_text());
        return Ok(());
    };
    let file = file_config(cli)?;
    let text = cli.org.as_deref().or(file.org.as_deref()).context(
        "enrollment needs the organisation key this agent trusts: org = \"tandem-org-v1:…\" in \
         tandem-agent.toml (or --org)",
    )?;
    let o = org::OrgPublic::from_text(text).context("invalid organisation key")?;
    let key = org::read_text(&key_path)
        .and_then(|t| org::KeyPair::from_text(&t))
        .with_context(|| {
            format!(
                "no device key in {}: run `tandem-agent enroll` first (without --cert)",
                dir.display()
            )
        })?;
    let dc = org::DeviceCert::from_text(&org::read_text(cert)?)
        .with_context(|| format!("{} is not a device certificate", cert.display()))?;
    let e = Enrollment::new(key, dc.clone(), &o).context(
        "the certificate does not fit: it must be made by `tandem-org enroll` from THIS \
         computer's request, with the organisation key this agent trusts",
    )?;
    org::write_private(&dir.join(DEVICE_CERT), &dc.to_text())?;
    let on = file.unattended.as_ref().is_some_and(|u| u.enabled);
    println!(
        "Enrolled as {} ({}) in group {} of {}. Unattended access is {} in tandem-agent.toml \
         ([unattended] enabled = true; see --help).",
        e.body.name,
        e.body.id,
        e.body.group,
        e.body.organisation,
        if on { "on" } else { "off" }
    );
    Ok(())
}

/// The enrollment kept in the state directory, if this computer is enrolled.
fn load_enrollment(cli: &Cli, o: &org::OrgPublic) -> Result<Option<Enrollment>> {
    let Some(dir) = state_dir(cli) else {
        return Ok(None);
    };
    let cert_path = dir.join(DEVICE_CERT);
    if !cert_path.exists() {
        return Ok(None);
    }
    let key = org::read_text(&dir.join(DEVICE_KEY))
        .and_then(|t| org::KeyPair::from_text(&t))
        .context("the device certificate is there but not the device key: enroll again")?;
    let cert = org::DeviceCert::from_text(&org::read_text(&cert_path)?)?;
    Ok(Some(Enrollment::new(key, cert, o).context(
        "the kept device certificate does not fit this computer's key or organisation: enroll again \
         (tandem-agent enroll)",
    )?))
}

fn open_log(cli: &Cli, e: &Enrollment) -> Option<SessionLog> {
    let path = state_dir(cli)?.join(SESSION_LOG);
    match SessionLog::open(&path, &e.key, org::unix_now()) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "cannot keep the signed session log");
            None
        }
    }
}

/// Records the start of a session; whether it is recorded (true without a log: attended sessions
/// on a computer that is not enrolled).
fn log_start(log: &mut Option<SessionLog>, s: &Session, mode: &str) -> bool {
    let Some(l) = log else { return true };
    let (technician, organisation, cert) = match &s.peer().org {
        OrgCheck::Verified(v) => (
            v.technician.clone(),
            v.organisation.clone(),
            v.cert_id.clone(),
        ),
        _ => (
            s.peer().technician.clone().unwrap_or_default(),
            s.peer().organisation.clone().unwrap_or_default(),
            String::new(),
        ),
    };
    let r = Record {
        event: org::log::EVENT_START.into(),
        technician,
        organisation,
        cert,
        mode: mode.into(),
        detail: if s.peer().org.is_verified() {
            "verified".into()
        } else {
            "not verified".into()
        },
    };
    match l.append(&r, org::unix_now()) {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot write the signed session log");
            false
        }
    }
}

fn log_end(log: &mut Option<SessionLog>, r: &Result<bool>) {
    let Some(l) = log else { return };
    let rec = Record {
        event: org::log::EVENT_END.into(),
        detail: match r {
            Ok(_) => "ended".into(),
            Err(e) => format!("{e:#}"),
        },
        ..Record::default()
    };
    if let Err(e) = l.append(&rec, org::unix_now()) {
        tracing::warn!(error = %e, "cannot write the signed session log");
    }
}

/// `tandem-agent log`: prints the signed session log and checks it.
fn show_log(cli: &Cli) -> Result<bool> {
    let dir = device_dir(cli)?;
    let key = org::read_text(&dir.join(DEVICE_KEY))
        .and_then(|t| org::KeyPair::from_text(&t))
        .context("this computer is not enrolled (no device key): there is no signed log")?;
    let path = dir.join(SESSION_LOG);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        match org::log::LogEntry::from_line(line) {
            Ok(e) => println!(
                "{:>5} {} {:<6} {:<10} {} {} {} {}",
                e.seq,
                e.time,
                e.event,
                e.mode,
                names::printable(&e.technician, 48),
                names::printable(&e.organisation, 48),
                e.cert,
                names::printable(&e.detail, 80)
            ),
            Err(why) => println!("      (not an entry: {why})"),
        }
    }
    let report = org::log::verify_log(&bytes, &key.public());
    for p in &report.problems {
        println!("PROBLEM {p}");
    }
    println!(
        "{} entries; {}",
        report.entries,
        if report.is_intact() {
            "every entry is signed by this device's key and none is missing or altered (entries \
             removed from the end cannot be told; the relay's audit log is the other record)"
        } else {
            "THE LOG WAS ALTERED"
        }
    );
    Ok(report.is_intact())
}

fn unattended_policy(f: Option<&UnattendedFile>, cli: &Cli) -> Result<Unattended> {
    let ask = match f.and_then(|u| u.ask.as_deref()) {
        None | Some("then-connect") => AskPolicy::ThenConnect,
        Some("never-without-user") => AskPolicy::NeverWithoutUser,
        Some("no") => AskPolicy::No,
        Some(other) => bail!(
            "[unattended] ask = {other:?} in tandem-agent.toml: use \"then-connect\", \
             \"never-without-user\" or \"no\""
        ),
    };
    let secs = f.and_then(|u| u.ask_timeout_secs).unwrap_or(30);
    if !(1..=3600).contains(&secs) {
        bail!("[unattended] ask_timeout_secs must be 1 to 3600");
    }
    let display = cli
        .display
        .clone()
        .or_else(|| std::env::var("DISPLAY").ok())
        .filter(|d| !d.is_empty());
    let banner_required = match f.and_then(|u| u.banner.as_deref()) {
        None | Some("required") => true,
        Some("optional") => false,
        Some(other) => bail!(
            "[unattended] banner = {other:?} in tandem-agent.toml: use \"required\" or \"optional\""
        ),
    };
    Ok(Unattended {
        ask,
        timeout: Duration::from_secs(secs),
        display,
        banner_required,
    })
}

/// What the unattended loop passes to every session.
struct UnattendedRun<'a> {
    desktop: Option<Arc<dyn Desktop>>,
    org: Option<&'a org::OrgPublic>,
    report: &'a Report,
    u: Unattended,
}

/// Longest wait between two attempts to get back online.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest pause after refused unattended attempts.
const MAX_REFUSED_PAUSE: Duration = Duration::from_secs(60);

/// The enrolled device's loop: online, sessions, and back online after any loss (network, relay
/// restart), with a growing pause between attempts.
async fn run_unattended(
    opts: ConnectOptions,
    cfg: SessionConfig,
    enrollment: Arc<Enrollment>,
    policy: UnattendedPolicy,
    ctx: UnattendedRun<'_>,
    mut log: Option<SessionLog>,
    cmds: &mut mpsc::UnboundedReceiver<UiCmd>,
) -> Result<()> {
    let report = ctx.report;
    let b = &enrollment.body;
    report.event(
        "device",
        &format!(
            "This computer is {} ({}) in group {} of {}; unattended access is on (the user is {}).",
            names::printable(&b.name, 48),
            b.id,
            names::printable(&b.group, 48),
            names::printable(&b.organisation, 48),
            match ctx.u.ask {
                AskPolicy::ThenConnect => format!(
                    "asked first; technicians connect if nobody answers in {} s",
                    ctx.u.timeout.as_secs()
                ),
                AskPolicy::NeverWithoutUser =>
                    "asked first; nobody connects without an answer".into(),
                AskPolicy::No => "not asked; a banner shows while anyone is connected".into(),
            }
        ),
        serde_json::json!({"device": b.id, "name": b.name, "group": b.group,
            "organisation": b.organisation}),
    );
    // What cannot work as the policy says, said at once.
    let windowed = report.shared.ctx.is_some();
    if ctx.u.ask != AskPolicy::No && !windowed && !std::io::stdin().is_terminal() {
        report.event(
            "policy_note",
            &match ctx.u.ask {
                AskPolicy::NeverWithoutUser => "Nobody can answer here (no window, no terminal): \
                    every unattended connection will be refused."
                    .to_string(),
                _ => format!(
                    "Nobody can answer here (no window, no terminal): technicians connect after \
                     {} s.",
                    ctx.u.timeout.as_secs()
                ),
            },
            serde_json::json!({}),
        );
    }
    if let Some(name) = policy
        .technicians
        .iter()
        .find(|t| !t.starts_with("SHA256:"))
    {
        report.event(
            "policy_note",
            &format!(
                "[unattended] technicians names {}: any certificate of the organisation with that \
                 name matches; a key fingerprint (SHA256:…) names exactly one technician.",
                names::printable(name, 48)
            ),
            serde_json::json!({}),
        );
    }
    if log.is_none() {
        bail!(
            "the signed session log cannot be kept in the state directory; unattended access needs \
             it (check the state directory's permissions)"
        );
    }
    let mut host = DeviceHost::new(opts, cfg, enrollment.clone(), policy, device_info());
    let mut backoff = Duration::from_secs(1);
    // After a refused attempt the device waits before it is reachable again (growing, reset by a
    // session), so that whoever keeps trying without the right certificate gets few tries.
    let mut refused_pause = Duration::ZERO;
    loop {
        if !host.is_online() {
            // Who is logged in may have changed since the last announcement.
            host.set_info(device_info());
        }
        let ev = {
            let next = host.next();
            tokio::pin!(next);
            loop {
                tokio::select! {
                    ev = &mut next => break ev,
                    c = cmds.recv() => match c {
                        None => return Ok(()),
                        Some(UiCmd::Line(l)) if l.trim() == "quit" => return Ok(()),
                        Some(_) => {}
                    },
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
        };
        match ev {
            Ok(DeviceEvent::Online { device }) => {
                backoff = Duration::from_secs(1);
                let text = "Online: your IT provider's technicians can connect to this computer; \
                            a red banner shows while anyone is connected.";
                report.event("online", text, serde_json::json!({"device": device}));
                report.phase(Phase::Online { text: text.into() });
            }
            Ok(DeviceEvent::Refused { reason }) => {
                refused_pause =
                    (refused_pause * 2).clamp(Duration::from_secs(1), MAX_REFUSED_PAUSE);
                report.event(
                    "unattended_refused",
                    &format!(
                        "Someone tried to connect and was refused: {}. Reachable again in {} s.",
                        names::printable(&reason, 200),
                        refused_pause.as_secs()
                    ),
                    serde_json::json!({"reason": reason, "pause_secs": refused_pause.as_secs()}),
                );
                report.phase(Phase::Online {
                    text: format!(
                        "Someone was refused; this computer is reachable again in {} s.",
                        refused_pause.as_secs()
                    ),
                });
                if pause_or_quit(refused_pause, cmds).await {
                    return Ok(());
                }
            }
            Ok(DeviceEvent::Session(s)) => {
                refused_pause = Duration::ZERO;
                if !log_start(&mut log, &s, MODE_UNATTENDED) {
                    // No record, no session.
                    s.end(tandem_proto::EndReason::Other(
                        "the computer cannot record the session".into(),
                    ))
                    .await;
                    report.event(
                        "unattended_refused",
                        "The session could not be written to the signed log: refused.",
                        serde_json::json!({"reason": "log"}),
                    );
                    continue;
                }
                let r = run_session(
                    *s,
                    ConsentMode::Window,
                    Some(&ctx.u),
                    ctx.desktop.clone(),
                    ctx.org,
                    report,
                    cmds,
                )
                .await;
                log_end(&mut log, &r);
                if r? {
                    return Ok(());
                }
            }
            Err(e) => {
                let text = format!(
                    "Not online ({}); trying again in {} s.",
                    names::printable(&e.to_string(), 200),
                    backoff.as_secs()
                );
                report.event(
                    "offline",
                    &text,
                    serde_json::json!({"error": e.to_string(), "retry_in_secs": backoff.as_secs()}),
                );
                report.phase(Phase::Online { text });
                if pause_or_quit(backoff, cmds).await {
                    return Ok(());
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Waits `pause`; whether the program is to quit meanwhile (the window closed, `quit`, Ctrl-C).
async fn pause_or_quit(pause: Duration, cmds: &mut mpsc::UnboundedReceiver<UiCmd>) -> bool {
    let until = tokio::time::Instant::now() + pause;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return false,
            _ = tokio::signal::ctrl_c() => return true,
            c = cmds.recv() => match c {
                None => return true,
                Some(UiCmd::Line(l)) if l.trim() == "quit" => return true,
                Some(_) => {}
            },
        }
    }
}

/// The always-visible banner of an unattended session, on the shared X display.
fn show_banner(
    u: &Unattended,
    technician: &str,
    organisation: &str,
    report: &Report,
) -> (Option<tandem_host::banner::Banner>, String) {
    let text = format!(
        "Remote session: {technician} of {organisation} is connected to this computer (unattended \
         access, verified by the organisation's key)"
    );
    let Some(display) = u.display.as_deref() else {
        report.event(
            "banner",
            "No X display: the session banner cannot be shown on this desktop.",
            serde_json::json!({"shown": false}),
        );
        return (None, text);
    };
    match tandem_host::banner::Banner::show(Some(display), &text) {
        Ok(b) => {
            report.event("banner", &text, serde_json::json!({"shown": true}));
            (Some(b), text)
        }
        Err(e) => {
            report.event(
                "banner",
                &format!("The session banner cannot be shown: {e}"),
                serde_json::json!({"shown": false, "error": e.to_string()}),
            );
            (None, text)
        }
    }
}

/// Unattended: asks the user at the screen per the policy; nobody answering connects
/// (`then-connect`) or refuses (`never-without-user`).
async fn ask_unattended(
    s: &Session,
    u: &Unattended,
    technician: &str,
    organisation: &str,
    trust: &Trust,
    report: &Report,
    cmds: &mut mpsc::UnboundedReceiver<UiCmd>,
) -> Consent {
    let on_silence = match u.ask {
        AskPolicy::No => {
            report.event(
                "consent_skipped",
                &format!(
                    "{technician} of {organisation} connected unattended; nobody was asked \
                     (policy)."
                ),
                serde_json::json!({"technician": technician, "organisation": organisation}),
            );
            return Consent::AllowControl;
        }
        AskPolicy::ThenConnect => Consent::AllowControl,
        AskPolicy::NeverWithoutUser => Consent::Deny,
    };
    let secs = u.timeout.as_secs();
    report.event(
        "consent_asked",
        &format!(
            "{technician} of {organisation} wants to connect unattended ({}). Allow (a), view only \
             (v) or deny (d)? {}",
            trust.text,
            if on_silence == Consent::Deny {
                format!("Refused in {secs} s if nobody answers.")
            } else {
                format!("Connects in {secs} s if nobody answers.")
            }
        ),
        serde_json::json!({"technician": technician, "organisation": organisation,
            "verified": trust.verified, "trust": trust.text, "unattended": true,
            "timeout_secs": secs,
            "if_nobody_answers": if on_silence == Consent::Deny { "deny" } else { "allow" }}),
    );
    report.phase(Phase::Consent {
        technician: technician.to_owned(),
        organisation: organisation.to_owned(),
        suspicious: false,
        trust: trust.clone(),
        deadline: Instant::now() + u.timeout,
    });
    let answer = async {
        while let Some(c) = cmds.recv().await {
            match c {
                UiCmd::Consent(c) => return c,
                UiCmd::Chat(t) => user_says(s, report, t).await,
                UiCmd::Line(l) if chat_line(&l).is_some() => {
                    if let Some(t) = chat_line(&l) {
                        user_says(s, report, t).await;
                    }
                }
                UiCmd::Line(l) => match l.trim().to_lowercase().as_str() {
                    "a" | "allow" => return Consent::AllowControl,
                    "v" | "view" | "view only" => return Consent::ViewOnly,
                    "d" | "deny" => return Consent::Deny,
                    _ => {}
                },
                UiCmd::End => return Consent::Deny,
                UiCmd::ViewOnly(_)
                | UiCmd::NewCode
                | UiCmd::Clipboard(..)
                | UiCmd::AcceptImage(_)
                | UiCmd::SendFiles(_)
                | UiCmd::CancelTransfer(_) => {}
            }
        }
        Consent::Deny
    };
    match tokio::time::timeout(u.timeout, answer).await {
        Ok(c) => c,
        Err(_) => {
            report.event(
                "consent_timeout",
                if on_silence == Consent::Deny {
                    "Nobody answered: refused."
                } else {
                    "Nobody answered: the technician connects (the banner stays on)."
                },
                serde_json::json!({"decision": if on_silence == Consent::Deny { "deny" } else { "allow" }}),
            );
            on_silence
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_errors_say_what_to_do_in_the_window() {
        let pin = tandem_certs::pin_mismatch_message(&fp(1), &fp(2));
        let w = window_words(&pin);
        assert!(w.starts_with("The relay's certificate has changed"), "{w}");
        let w = window_words(
            "no answer from the relay at 10.0.0.1:4433 within 10 s: check that it runs and that \
             UDP port 4433 is reachable",
        );
        assert!(w.contains("Press \"Check connection\""), "{w}");
        assert_eq!(
            window_words("the technician ended the session"),
            "the technician ended the session"
        );
    }

    fn fp(b: u8) -> tandem_certs::Fingerprint {
        format!("sha256:{}", format!("{b:02x}").repeat(32))
            .parse()
            .unwrap()
    }

    fn report() -> Report {
        Report {
            out: EventOut { json: true },
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    phase: Phase::Connecting,
                    relay: String::new(),
                }),
                toolbox: Mutex::default(),
                check: Mutex::default(),
                ctx: None,
            }),
            tools: tandem_host::Tools::default(),
            send: Vec::new(),
        }
    }

    /// The watch ends a session when the certificate does, even while the session keeps starting
    /// `next` over (as cursor moves and the console's messages do, many times a second).
    #[tokio::test]
    async fn the_watch_ends_the_session_with_the_certificate_however_busy_the_session() {
        let report = report();
        let mut watch = Watch {
            banner: None,
            display: None,
            text: String::new(),
            required: false,
            until: Some(std::time::SystemTime::now() + Duration::from_millis(1200)),
            reshown: 0,
        };
        let (_tx, mut rx) = mpsc::unbounded_channel();
        let mut cmds = AgentCmds::new(&mut rx, Some(&mut watch), &report);
        let started = tokio::time::Instant::now();
        let ended = loop {
            // A busy session: `next` dropped after 100 ms, again and again.
            if let Ok(c) = tokio::time::timeout(Duration::from_millis(100), cmds.next()).await {
                break c;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the watch never ended the session"
            );
        };
        assert_eq!(
            ended,
            HostCmd::EndBecause("the technician's certificate has expired")
        );
    }

    fn record(kind: i16, line: &str, user: &str) -> Vec<u8> {
        let mut r = vec![0u8; 384];
        r[..2].copy_from_slice(&kind.to_ne_bytes());
        r[8..8 + line.len()].copy_from_slice(line.as_bytes());
        r[44..44 + user.len()].copy_from_slice(user.as_bytes());
        r
    }

    #[test]
    fn the_user_at_the_screen_comes_from_utmp() {
        let mut utmp = record(2, "~", "reboot");
        utmp.extend(record(7, "pts/3", "admin"));
        utmp.extend(record(7, "seat0", "bob"));
        assert_eq!(logged_in_user(&utmp).as_deref(), Some("bob"));
        let ssh_only = record(7, "pts/0", "admin");
        assert_eq!(logged_in_user(&ssh_only).as_deref(), Some("admin"));
        assert_eq!(logged_in_user(&record(8, "tty1", "gone")), None);
        // A truncated record is ignored.
        assert_eq!(logged_in_user(&utmp[..500]), None);
    }
}
