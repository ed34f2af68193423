//! The console's window (eframe/egui): a login form (relay, pin and token remembered after the
//! first login) and the code, and, for technicians whose certificate is loaded, the organisation's
//! enrolled devices to connect to without a code (unattended access); then the remote screen
//! scaled to the window with its aspect kept (or 1:1, or full screen), the remote cursor drawn
//! from its position and shape, a toolbar and a stats line.
//!
//! Input: while the view has focus (click into it; click the toolbar to leave) keys go to the
//! remote as physical keys (the remote's layout decides the character), and pointer and wheel go
//! to the remote whenever the pointer is over the view. Keys are taken from egui's raw input before
//! egui sees them, so Tab, Escape and shortcuts reach the remote instead of the window. Ctrl+C/X/V
//! act on the remote's clipboard.

use crate::Login;
use crate::driver::{self, Cmd, Cursor, CursorImage, Latest, Stats, Update};
use eframe::egui::{
    self, Color32, ColorImage, Event, Modifiers, Pos2, Rect, RichText, TextureHandle,
    TextureOptions, Vec2,
};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};
use tandem_client::EventOut;
use tandem_input::keymap::{usage, usage_by_name};
use tandem_input::{Combo, InputEvent, MouseButton, Pos};
use tandem_proto::Secret;
use tandem_session::names::printable;
use tandem_session::{Consent, DeviceList, ListedDevice, MonitorInfo};
use tokio::sync::mpsc;

pub fn options() -> eframe::NativeOptions {
    eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Tandem console")
            .with_inner_size([1100.0, 720.0]),
        renderer: eframe::Renderer::Glow,
        ..Default::default()
    }
}

/// The form's fields.
#[derive(Clone, Default)]
pub struct Form {
    pub relay: String,
    pub pin: String,
    pub token: String,
    pub code: String,
    /// An enrolled device (id or exact name) to reach without a code; empty: join by `code`.
    pub device: String,
    /// Where the user's files go [default: the downloads folder, 4 GiB a session].
    pub downloads: Option<crate::driver::Downloads>,
}

enum Phase {
    Login {
        error: Option<String>,
    },
    Joining {
        rx: std_mpsc::Receiver<Result<Box<Live>, (u8, String)>>,
        since: Instant,
        /// What is being connected to, for the screen: the relay, or the device and its relay.
        target: String,
    },
    Session(Box<Live>),
    Ended {
        text: String,
    },
}

/// A running session as the window sees it.
pub struct Live {
    cmds: mpsc::UnboundedSender<Cmd>,
    updates: mpsc::UnboundedReceiver<Update>,
    latest: Arc<Latest>,
    texture: Option<TextureHandle>,
    /// The texture's size: the remote picture's, or smaller if that exceeds the GPU's limit.
    texture_size: (usize, usize),
    remote: (u32, u32),
    cursor: Cursor,
    cursor_image: Option<(TextureHandle, CursorImage)>,
    consent: Option<Consent>,
    /// "alice of ACME IT": how the user's consent prompt names this technician.
    shown_as: String,
    view_only: bool,
    monitors: Vec<MonitorInfo>,
    monitor: u8,
    stats: Option<Stats>,
    note: Option<String>,
    one_to_one: bool,
    fullscreen: bool,
    quality: u32,
    /// Where the remote screen was drawn last frame (points).
    view: Option<Rect>,
    /// Keys go to the remote.
    keyboard: bool,
    mods: Modifiers,
    buttons: Vec<MouseButton>,
    last_pointer: Option<Pos2>,
    shown: bool,
    /// Signalled when the session thread is done (ended and told the agent).
    done: std_mpsc::Receiver<()>,
    /// Chat (and the session's other tools).
    toolbox: crate::toolbox::Toolbox,
}

pub struct ConsoleApp {
    rt: tokio::runtime::Handle,
    form: Form,
    login: Login,
    phase: Phase,
    out: EventOut,
    /// End the session after this long (for scripts and the screenshot test).
    limit: Option<(Instant, Duration)>,
    exit_code: Arc<std::sync::atomic::AtomicU8>,
    /// Started with a time limit: the window closes when the session is over.
    closes_when_done: bool,
    /// The login screen's device list.
    devices: Devices,
    /// The login screen's "Check connection".
    check: Check,
}

/// "Check connection" on the login screen: the same report as `--check`, for the form's relay.
#[derive(Default)]
struct Check {
    pending: Option<std_mpsc::Receiver<tandem_client::check::Report>>,
    report: Option<tandem_client::check::Report>,
    error: Option<String>,
}

impl ConsoleApp {
    pub fn new(
        rt: tokio::runtime::Handle,
        form: Form,
        login: Login,
        out: EventOut,
        seconds: Option<u64>,
        exit_code: Arc<std::sync::atomic::AtomicU8>,
        ctx: &egui::Context,
    ) -> Self {
        // A code or a device from the command line: connect at once.
        let auto = !form.code.trim().is_empty() || !form.device.trim().is_empty();
        let mut app = ConsoleApp {
            rt,
            form,
            login,
            phase: Phase::Login { error: None },
            out,
            limit: seconds.map(|s| (Instant::now(), Duration::from_secs(s))),
            exit_code,
            closes_when_done: seconds.is_some(),
            devices: Devices::default(),
            check: Check::default(),
        };
        if auto {
            app.connect(ctx);
        }
        app
    }

    /// Joins in the background: by `form.device` if set, else by `form.code`. The device is a
    /// one-time target: it is cleared here, so the form joins by code again afterwards whatever
    /// happens to this attempt.
    fn connect(&mut self, ctx: &egui::Context) {
        let (tx, rx) = std_mpsc::channel();
        let relay = self.form.relay.trim();
        let device = self.form.device.trim();
        let target = if device.is_empty() {
            relay.to_owned()
        } else {
            format!("{} through {relay}", self.devices.name_of(device))
        };
        let form = self.form.clone();
        let downloads = form
            .downloads
            .clone()
            .unwrap_or_else(|| crate::driver::Downloads {
                dir: crate::downloads_dir(),
                quota: tandem_toolbox::DEFAULT_QUOTA,
            });
        self.form.device.clear();
        let login = self.login.clone();
        let rt = self.rt.clone();
        let ctx = ctx.clone();
        let out = self.out;
        let spawned = std::thread::Builder::new()
            .name("tandem-session".into())
            .spawn(move || {
                rt.block_on(async move {
                    let started = Instant::now();
                    let session = match crate::join(&form, &login).await {
                        Ok(s) => s,
                        Err(f) => {
                            let text = crate::pin_words(&format!("{:#}", f.error), true);
                            let _ = tx.send(Err((f.code, text)));
                            ctx.request_repaint();
                            return;
                        }
                    };
                    // How the user sees this technician: the names the relay gave this side,
                    // bound into the PAKE (the agent was told the same, or there is no session).
                    let shown_as = tandem_session::names::ShownPeer::of(session.peer()).to_string();
                    out.event(
                        "joined",
                        &format!(
                            "Joined; waiting for the user to answer. The user sees you as \
                             {shown_as}, as the relay reports it; {}.",
                            crate::org_note(session.peer()).1
                        ),
                        serde_json::json!({"setup_ms": started.elapsed().as_secs_f64() * 1e3,
                            "verified": crate::org_note(session.peer()).0,
                            "shown_as": {"technician": session.peer().technician, "organisation": session.peer().organisation}}),
                    );
                    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
                    let (up_tx, up_rx) = mpsc::unbounded_channel();
                    let latest = Arc::new(Latest::default());
                    let (done_tx, done_rx) = std_mpsc::channel();
                    let live = Live {
                        cmds: cmd_tx,
                        updates: up_rx,
                        latest: latest.clone(),
                        texture: None,
                        texture_size: (0, 0),
                        remote: (0, 0),
                        cursor: Cursor::default(),
                        cursor_image: None,
                        consent: None,
                        shown_as,
                        view_only: true,
                        monitors: vec![],
                        monitor: 0,
                        stats: None,
                        note: None,
                        one_to_one: false,
                        fullscreen: false,
                        quality: 0,
                        view: None,
                        keyboard: false,
                        mods: Modifiers::NONE,
                        buttons: vec![],
                        last_pointer: None,
                        shown: false,
                        done: done_rx,
                        toolbox: Default::default(),
                    };
                    if tx.send(Ok(Box::new(live))).is_err() {
                        session
                            .end(tandem_proto::EndReason::EndedByTechnician)
                            .await;
                        return;
                    }
                    ctx.request_repaint();
                    let c = ctx.clone();
                    driver::drive(session, started, downloads, cmd_rx, up_tx, latest, move || {
                        c.request_repaint()
                    })
                    .await;
                    let _ = done_tx.send(());
                });
            });
        self.phase = match spawned {
            Ok(_) => Phase::Joining {
                rx,
                since: Instant::now(),
                target,
            },
            Err(e) => Phase::Login {
                error: Some(format!("cannot start: {e}")),
            },
        };
    }

    /// Fetches the organisation's device list in the background; [`Devices::poll`] takes the
    /// answer.
    fn fetch_devices(&mut self, ctx: &egui::Context) {
        let (tx, rx) = std_mpsc::channel();
        let form = self.form.clone();
        let login = self.login.clone();
        let ctx = ctx.clone();
        // If the runtime is gone the task is dropped with `tx`, and the poll reports that.
        self.rt.spawn(async move {
            let _ = tx.send(fetch_devices(&form, &login).await);
            ctx.request_repaint();
        });
        self.devices.pending = Some(rx);
        self.devices.error = None;
    }

    /// Checks every way to the form's relay in the background; [`Self::check_ui`] shows it.
    fn start_check(&mut self, ctx: &egui::Context) {
        self.check.report = None;
        self.check.error = None;
        let relay = self.form.relay.trim().to_owned();
        if relay.is_empty() {
            self.check.error = Some(crate::missing_relay(true));
            return;
        }
        let opts = match crate::connect_options(&relay, &self.form, &self.login) {
            Ok((o, _)) => o,
            Err(f) => {
                self.check.error = Some(format!("{:#}", f.error));
                return;
            }
        };
        let (tx, rx) = std_mpsc::channel();
        let ctx = ctx.clone();
        let out = self.out;
        // If the runtime is gone the task is dropped with `tx`, and the poll reports that.
        self.rt.spawn(async move {
            let report = tandem_client::check::check(&opts).await;
            out.event(
                "check",
                &report.summary,
                serde_json::to_value(&report).unwrap_or_default(),
            );
            let _ = tx.send(report);
            ctx.request_repaint();
        });
        self.check.pending = Some(rx);
    }

    /// The button and, once it ran, the report: the summary line first, then each step.
    fn check_ui(&mut self, ui: &mut egui::Ui) -> bool {
        if let Some(rx) = &self.check.pending {
            match rx.try_recv() {
                Ok(r) => {
                    self.check.report = Some(r);
                    self.check.pending = None;
                }
                Err(std_mpsc::TryRecvError::Empty) => {}
                Err(std_mpsc::TryRecvError::Disconnected) => {
                    self.check.pending = None;
                    self.check.error = Some("the check stopped".into());
                }
            }
        }
        let running = self.check.pending.is_some();
        ui.add_enabled(
            !running,
            egui::Button::new(if running {
                "Checking…"
            } else {
                "Check connection"
            }),
        )
        .on_hover_text(
            "Try every way to the relay (UDP, TCP, proxy), its certificate and the clock",
        )
        .clicked()
    }

    fn check_report(&self, ui: &mut egui::Ui) {
        if let Some(e) = &self.check.error {
            ui.colored_label(Color32::from_rgb(0xd0, 0x40, 0x40), e);
        }
        if let Some(r) = &self.check.report {
            let color = if r.reachable {
                Color32::from_rgb(0x2e, 0x9e, 0x4f)
            } else {
                Color32::from_rgb(0xd0, 0x40, 0x40)
            };
            ui.label(RichText::new(&r.summary).strong().color(color));
            for st in &r.steps {
                ui.small(format!("{}  {}: {}", st.verdict, st.what, st.detail));
            }
        }
    }

    fn login_ui(&mut self, ui: &mut egui::Ui, error: Option<String>) {
        let mut go = false;
        let mut check = false;
        let mut action = None;
        let certified = self.login.credentials.is_some();
        egui::CentralPanel::default().show(ui, |ui| {
            ui.heading("Join a support session");
            ui.add_space(8.0);
            egui::Grid::new("login").num_columns(2).show(ui, |ui| {
                ui.label("Relay");
                ui.text_edit_singleline(&mut self.form.relay)
                    .on_hover_text("host:port of your relay (your administrator has it)");
                ui.end_row();
                ui.label("Relay pin");
                ui.text_edit_singleline(&mut self.form.pin).on_hover_text(
                    "sha256:…: the relay's fingerprint; your administrator reads it with \
                         `tandem-relay fingerprint`",
                );
                ui.end_row();
                ui.label("Token");
                ui.add(egui::TextEdit::singleline(&mut self.form.token).password(true))
                    .on_hover_text(
                        "your technician token; your administrator makes it with \
                         `tandem-relay technician add`",
                    );
                ui.end_row();
                ui.label("Session code");
                let r = ui.add(
                    egui::TextEdit::singleline(&mut self.form.code)
                        .hint_text("417-382-905")
                        .font(egui::TextStyle::Heading),
                );
                if r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter)) {
                    go = true;
                }
                ui.end_row();
            });
            ui.add_space(8.0);
            ui.horizontal(|ui| {
                if ui.button(RichText::new("Connect").strong()).clicked() {
                    go = true;
                }
                check = self.check_ui(ui);
            });
            if let Some(e) = &error {
                ui.add_space(8.0);
                ui.colored_label(Color32::from_rgb(0xd0, 0x40, 0x40), e);
            }
            self.check_report(ui);
            ui.add_space(8.0);
            ui.small("Relay, pin and token are remembered after the first successful login.");
            ui.add_space(8.0);
            ui.separator();
            let cert_dir = self
                .login
                .cfg_path
                .as_ref()
                .and_then(|p| p.parent())
                .map_or("the console's configuration folder".to_string(), |d| {
                    d.display().to_string()
                });
            action = self.devices.ui(ui, certified, &cert_dir);
        });
        if check {
            self.start_check(ui.ctx());
        }
        if go {
            self.form.device.clear();
            self.connect(ui.ctx());
        } else {
            match action {
                Some(DeviceAction::Fetch) => self.fetch_devices(ui.ctx()),
                Some(DeviceAction::Connect(id)) => {
                    self.form.device = id;
                    self.form.code.clear();
                    self.connect(ui.ctx());
                }
                None => {}
            }
        }
    }
}

/// How long a device listing may take before the console gives up on it.
const LIST_TIMEOUT: Duration = Duration::from_secs(60);

/// Most device rows the table shows at once (a search narrows the rest).
const MAX_ROWS: usize = 500;

/// What the technician asked of the device list.
enum DeviceAction {
    /// Fetch (again) the list.
    Fetch,
    /// Connect to the device with this id.
    Connect(String),
}

/// The login screen's list of the organisation's enrolled devices (unattended access).
#[derive(Default)]
struct Devices {
    /// The last list fetched; kept during a refresh and after a failed one.
    list: Option<Listing>,
    /// A fetch under way: its answer, or why it failed.
    pending: Option<std_mpsc::Receiver<Result<Listing, String>>>,
    /// Why the last fetch failed.
    error: Option<String>,
    /// The search box's text.
    search: String,
}

/// A device list ready to show: made in the background, off the UI thread.
struct Listing {
    /// The devices that checked, sorted by group then name.
    rows: Vec<Row>,
    /// Why each of the entries that did not check was left out (the relay's text: unprintable
    /// characters escaped).
    rejected: Vec<String>,
    /// The relay that listed them (printable).
    relay: String,
}

impl Listing {
    fn new(list: DeviceList, relay: &str) -> Listing {
        let mut rows: Vec<Row> = list.devices.iter().map(Row::of).collect();
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        Listing {
            rows,
            rejected: list.rejected.iter().map(|r| printable(r, 200)).collect(),
            relay: printable(relay, 80),
        }
    }
}

/// One device of the list, its text as shown (the relay's text, signed by the device but still
/// arbitrary: unprintable characters escaped, lengths bounded).
#[derive(Debug)]
struct Row {
    /// The device id as the relay gave it (checked), to connect with.
    id: String,
    name: String,
    group: String,
    /// "host · user · OS".
    host: String,
    online: bool,
    in_session: bool,
    /// Unix seconds.
    last_seen: u64,
    /// What the search looks in, lower case: name, host, group, user, id.
    haystack: String,
    /// The sort order: group (case-insensitive, then exact: each group stays together), name, id.
    key: (String, String, String, String),
}

/// One field's text as shown: `empty` for an empty one.
fn shown_field(text: &str, max: usize, empty: &str) -> String {
    if text.trim().is_empty() {
        empty.to_owned()
    } else {
        printable(text, max)
    }
}

impl Row {
    fn of(d: &ListedDevice) -> Row {
        let (dev, p) = (&d.checked.device, &d.checked.presence);
        Row::new(
            &dev.id,
            &dev.name,
            &dev.group,
            [&p.hostname, &p.user, &p.os],
            (d.online, d.in_session, d.last_seen),
        )
    }

    /// `who`: host name, user, OS; `state`: online, in session, last seen.
    fn new(id: &str, name: &str, group: &str, who: [&str; 3], state: (bool, bool, u64)) -> Row {
        let [hostname, user, os] = who;
        let host = [(hostname, 40), (user, 24), (os, 40)]
            .iter()
            .filter(|(t, _)| !t.trim().is_empty())
            .map(|(t, max)| printable(t, *max))
            .collect::<Vec<_>>()
            .join(" · ");
        Row {
            id: id.to_owned(),
            name: shown_field(name, 40, "(no name)"),
            group: shown_field(group, 24, "(no group)"),
            host: if host.is_empty() { "–".into() } else { host },
            online: state.0,
            in_session: state.1,
            last_seen: state.2,
            haystack: [name, hostname, group, user, id].join("\n").to_lowercase(),
            key: (
                group.to_lowercase(),
                group.to_owned(),
                name.to_lowercase(),
                id.to_owned(),
            ),
        }
    }

    /// Whether the search `needle` (lower case; empty matches all) is in any searched field.
    fn matches(&self, needle: &str) -> bool {
        self.haystack.contains(needle)
    }

    /// Whether a session can start now: online and not in a session already.
    fn reachable(&self) -> bool {
        self.online && !self.in_session
    }

    /// The state in words and its colour, at `now` (Unix seconds).
    fn state(&self, now: u64) -> (String, Color32) {
        if self.in_session {
            ("in session".into(), Color32::from_rgb(0xe0, 0x8a, 0x00))
        } else if self.online {
            ("online".into(), Color32::from_rgb(0x2e, 0x9d, 0x4a))
        } else if self.last_seen == 0 {
            ("offline, never seen".into(), Color32::GRAY)
        } else {
            let ago = ago(now.saturating_sub(self.last_seen));
            (format!("offline, seen {ago} ago"), Color32::GRAY)
        }
    }
}

/// A time span in minutes, or in hours or days once long.
fn ago(secs: u64) -> String {
    let min = secs / 60;
    match min {
        0..120 => format!("{min} min"),
        120..2880 => format!("{} h", min / 60),
        _ => format!("{} days", min / 1440),
    }
}

/// Lists the organisation's devices on the form's relay, as the technician of its token and the
/// login's certificate. Errors in words.
async fn fetch_devices(form: &Form, login: &Login) -> Result<Listing, String> {
    let relay = form.relay.trim();
    if relay.is_empty() {
        return Err("no relay given: fill in Relay above".into());
    }
    let token = form.token.trim();
    if token.is_empty() {
        return Err("no technician token given: fill in Token above".into());
    }
    let (opts, cfg) =
        crate::connect_options(relay, form, login).map_err(|f| format!("{:#}", f.error))?;
    let token = Secret::new(token);
    let listing = tandem_session::list_devices(&opts, &token, &cfg, "");
    let list = tokio::time::timeout(LIST_TIMEOUT, listing)
        .await
        .map_err(|_| {
            format!(
                "the relay did not list the devices within {} s",
                LIST_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| format!("{:#}", anyhow::Error::from(e)))?;
    Ok(Listing::new(list, relay))
}

impl Devices {
    /// Takes the answer of a fetch under way, if it came.
    fn poll(&mut self) {
        let Some(rx) = &self.pending else { return };
        match rx.try_recv() {
            Ok(Ok(list)) => {
                self.list = Some(list);
                self.error = None;
            }
            Ok(Err(e)) => self.error = Some(e),
            Err(std_mpsc::TryRecvError::Empty) => return,
            Err(std_mpsc::TryRecvError::Disconnected) => {
                self.error = Some("the device list request stopped".into());
            }
        }
        self.pending = None;
    }

    /// How the joining screen names the device `device` (an id, or a name from the command
    /// line): its name if the list has it.
    fn name_of(&self, device: &str) -> String {
        self.list
            .iter()
            .flat_map(|l| &l.rows)
            .find(|r| r.id == device)
            .map_or_else(|| printable(device, 40), |r| r.name.clone())
    }

    /// The section: a fetch button, a search box, the table. `certified`: the technician's
    /// certificate is loaded (without it the relay lists nothing).
    /// `cert_dir`: where the console looks for the technician's certificate and key.
    fn ui(&mut self, ui: &mut egui::Ui, certified: bool, cert_dir: &str) -> Option<DeviceAction> {
        self.poll();
        ui.heading("Devices");
        if !certified {
            ui.label(format!(
                "Unattended access: put the technician.cert and technician.key your administrator \
                 gave you in {cert_dir} and start the console again to see your organisation's \
                 devices"
            ));
            return None;
        }
        let mut action = None;
        ui.horizontal(|ui| {
            let label = if self.list.is_some() {
                "Refresh"
            } else {
                "Show devices"
            };
            if ui
                .add_enabled(self.pending.is_none(), egui::Button::new(label))
                .on_hover_text("ask the relay for your organisation's enrolled computers")
                .clicked()
            {
                action = Some(DeviceAction::Fetch);
            }
            if self.pending.is_some() {
                ui.spinner();
                ui.label("Loading…");
            }
            if self.list.is_some() {
                ui.add(
                    egui::TextEdit::singleline(&mut self.search)
                        .hint_text("search name, host, group, user or id"),
                );
            }
        });
        if let Some(e) = &self.error {
            ui.colored_label(
                Color32::from_rgb(0xd0, 0x40, 0x40),
                format!("Could not list the devices: {}", printable(e, 400)),
            );
        }
        if let Some(list) = &self.list
            && let Some(id) = table(ui, list, &self.search)
        {
            action = Some(DeviceAction::Connect(id));
        }
        action
    }
}

/// The device table of `list`, filtered by `search`. Returns the id of the device whose Connect
/// button was clicked.
fn table(ui: &mut egui::Ui, list: &Listing, search: &str) -> Option<String> {
    let needle = search.trim().to_lowercase();
    let rows: Vec<&Row> = list.rows.iter().filter(|r| r.matches(&needle)).collect();
    let mut picked = None;
    ui.label(format!(
        "{} devices of your organisation on {}{}",
        list.rows.len(),
        list.relay,
        if needle.is_empty() {
            String::new()
        } else {
            format!(", {} matching", rows.len())
        }
    ));
    if !list.rejected.is_empty() {
        ui.colored_label(
            Color32::from_rgb(0xe0, 0x8a, 0x00),
            format!(
                "{} entries from the relay did not check and were left out (forged, revoked or \
                 another organisation)",
                list.rejected.len()
            ),
        )
        .on_hover_text(
            list.rejected
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n"),
        );
    }
    if rows.is_empty() {
        ui.weak(if list.rows.is_empty() {
            "No devices are enrolled in your organisation."
        } else {
            "No device matches the search."
        });
        return None;
    }
    let now = tandem_session::tandem_org::unix_now();
    egui::ScrollArea::vertical()
        .id_salt("device_list")
        .auto_shrink([false, true])
        .show(ui, |ui| {
            egui::Grid::new("devices")
                .num_columns(5)
                .striped(true)
                .spacing([16.0, 4.0])
                .show(ui, |ui| {
                    for title in ["Group", "Name", "Host · user · OS", "State", ""] {
                        ui.strong(title);
                    }
                    ui.end_row();
                    let mut group = None;
                    for r in rows.iter().take(MAX_ROWS) {
                        // Each group's name on its first row only: the rows come sorted by group.
                        if group != Some(&r.key.1) {
                            ui.strong(&r.group);
                            group = Some(&r.key.1);
                        } else {
                            ui.label("");
                        }
                        ui.label(&r.name)
                            .on_hover_text(format!("device id {}", printable(&r.id, 40)));
                        ui.label(&r.host);
                        let (state, colour) = r.state(now);
                        ui.colored_label(colour, state);
                        let button = ui.add_enabled(r.reachable(), egui::Button::new("Connect"));
                        let button = if r.in_session {
                            button.on_disabled_hover_text("already in a session")
                        } else {
                            button
                                .on_hover_text("connect without a code")
                                .on_disabled_hover_text("the device is offline")
                        };
                        if button.clicked() {
                            picked = Some(r.id.clone());
                        }
                        ui.end_row();
                    }
                });
            if rows.len() > MAX_ROWS {
                ui.weak(format!(
                    "{} more not shown: narrow the search to see them",
                    rows.len() - MAX_ROWS
                ));
            }
        });
    picked
}

/// Shown while the video decoder recovers from a picture it could not decode.
const UNDECODABLE: &str = "The remote picture could not be decoded; asking for a fresh one…";

/// The largest texture side the window's GPU takes (`TANDEM_CONSOLE_MAX_TEXTURE` may lower it,
/// to test the scaling on any GPU).
fn max_texture_side(ctx: &egui::Context) -> usize {
    let gpu = ctx.input(|i| i.max_texture_side);
    std::env::var("TANDEM_CONSOLE_MAX_TEXTURE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&v| v >= 16)
        .map_or(gpu, |v| v.min(gpu))
}

/// The texture for a remote picture: the picture itself, or, when a side exceeds `max_side`
/// (the GPU's texture limit, which would abort the window), the picture shrunk by the smallest
/// whole factor that fits, each texel the average of the pixels it covers. `None` for an RGBA
/// buffer shorter than the size says.
pub fn texture_image(width: u32, height: u32, rgba: &[u8], max_side: usize) -> Option<ColorImage> {
    let (w, h) = (width as usize, height as usize);
    if w == 0 || h == 0 || rgba.len() < w.checked_mul(h)?.checked_mul(4)? {
        return None;
    }
    let max_side = max_side.max(1);
    if w <= max_side && h <= max_side {
        return Some(ColorImage::from_rgba_unmultiplied(
            [w, h],
            &rgba[..w * h * 4],
        ));
    }
    let (nw, nh, px) = shrink(w, h, rgba, max_side);
    Some(ColorImage::from_rgba_unmultiplied([nw, nh], &px))
}

/// Box-filters `rgba` (`w`×`h`) by the smallest whole factor that makes both sides at most
/// `max_side`. Returns the new size and pixels.
pub fn shrink(w: usize, h: usize, rgba: &[u8], max_side: usize) -> (usize, usize, Vec<u8>) {
    let k = w.max(h).div_ceil(max_side.max(1)).max(1);
    let (nw, nh) = (w.div_ceil(k), h.div_ceil(k));
    let mut out = vec![0u8; nw * nh * 4];
    let mut acc = vec![[0u64; 4]; nw];
    for oy in 0..nh {
        acc.iter_mut().for_each(|a| *a = [0; 4]);
        let (y0, y1) = (oy * k, ((oy + 1) * k).min(h));
        for y in y0..y1 {
            let row = &rgba[y * w * 4..(y + 1) * w * 4];
            for (x, p) in row.chunks_exact(4).enumerate() {
                let a = &mut acc[x / k];
                for c in 0..4 {
                    a[c] += p[c] as u64;
                }
            }
        }
        for (ox, a) in acc.iter().enumerate() {
            let cols = (((ox + 1) * k).min(w) - ox * k) as u64;
            let n = cols * (y1 - y0) as u64;
            let o = &mut out[(oy * nw + ox) * 4..][..4];
            for c in 0..4 {
                o[c] = ((a[c] + n / 2) / n) as u8;
            }
        }
    }
    (nw, nh, out)
}

/// Scales `size` into `avail`, keeping the aspect ratio.
pub fn fit(size: Vec2, avail: Vec2) -> Vec2 {
    if size.x <= 0.0 || size.y <= 0.0 {
        return Vec2::ZERO;
    }
    let s = (avail.x / size.x).min(avail.y / size.y);
    size * s
}

fn egui_button(b: egui::PointerButton) -> Option<MouseButton> {
    Some(match b {
        egui::PointerButton::Primary => MouseButton::Left,
        egui::PointerButton::Secondary => MouseButton::Right,
        egui::PointerButton::Middle => MouseButton::Middle,
        egui::PointerButton::Extra1 => MouseButton::Back,
        egui::PointerButton::Extra2 => MouseButton::Forward,
    })
}

impl Live {
    fn can_control(&self) -> bool {
        self.consent == Some(Consent::AllowControl) && !self.view_only
    }

    fn pos(&self, p: Pos2, view: Rect) -> Pos {
        let (w, h) = self.screen();
        Pos::from_view(
            p.x - view.min.x,
            p.y - view.min.y,
            view.width(),
            view.height(),
            w,
            h,
        )
    }

    /// The remote screen's size in its own pixels (the video may be sent at half size).
    fn screen(&self) -> (u32, u32) {
        if self.cursor.screen_w > 0 && self.cursor.screen_h > 0 {
            (self.cursor.screen_w, self.cursor.screen_h)
        } else {
            (self.remote.0.max(1), self.remote.1.max(1))
        }
    }

    fn send(&self, c: Cmd) {
        let _ = self.cmds.send(c);
    }

    fn key(&self, usage: u16, pressed: bool) {
        self.send(Cmd::Input(InputEvent::Key { usage, pressed }));
    }

    /// Takes the events meant for the remote out of egui's input. Returns whether egui keeps it.
    fn route(&mut self, e: &Event) -> bool {
        let Some(view) = self.view else { return true };
        if !self.can_control() {
            return true;
        }
        match e {
            Event::PointerMoved(p) if view.contains(*p) => {
                self.send(Cmd::Pointer(self.pos(*p, view)));
                true
            }
            Event::PointerButton {
                pos,
                button,
                pressed,
                ..
            } => {
                let Some(b) = egui_button(*button) else {
                    return true;
                };
                let inside = view.contains(*pos);
                if *pressed && inside {
                    self.keyboard = true;
                    self.buttons.push(b);
                    self.send(Cmd::Input(InputEvent::Button {
                        button: b,
                        pressed: true,
                        at: self.pos(*pos, view),
                    }));
                } else if *pressed {
                    self.keyboard = false;
                } else if let Some(i) = self.buttons.iter().position(|x| *x == b) {
                    self.buttons.remove(i);
                    let p = Pos2::new(
                        pos.x.clamp(view.min.x, view.max.x - 1.0),
                        pos.y.clamp(view.min.y, view.max.y - 1.0),
                    );
                    self.send(Cmd::Input(InputEvent::Button {
                        button: b,
                        pressed: false,
                        at: self.pos(p, view),
                    }));
                }
                true
            }
            Event::MouseWheel { unit, delta, .. } => {
                let Some(p) = self.last_pointer else {
                    return true;
                };
                if !view.contains(p) {
                    return true;
                }
                let per_notch = match unit {
                    egui::MouseWheelUnit::Point => 50.0,
                    egui::MouseWheelUnit::Line => 1.0,
                    egui::MouseWheelUnit::Page => 0.1,
                };
                // egui: positive y scrolls up; Tandem: positive dy scrolls down.
                self.send(Cmd::Input(InputEvent::Wheel {
                    dx: (-delta.x / per_notch).clamp(-100.0, 100.0),
                    dy: (-delta.y / per_notch).clamp(-100.0, 100.0),
                    at: self.pos(p, view),
                }));
                false
            }
            _ if !self.keyboard => true,
            Event::Key {
                key,
                physical_key,
                pressed,
                repeat,
                ..
            } => {
                // The remote repeats held keys itself.
                if !repeat && let Some(u) = usage_by_name(physical_key.unwrap_or(*key).name()) {
                    self.key(u, *pressed);
                }
                false
            }
            // Clipboard shortcuts arrive as commands; the key's release comes as a key event.
            Event::Copy => {
                self.key(usage::C, true);
                false
            }
            Event::Cut => {
                self.key(0x1B, true);
                false
            }
            Event::Paste(_) => {
                self.key(usage::V, true);
                false
            }
            Event::Text(_) | Event::Ime(_) => false,
            Event::ModifiersChanged(m) => {
                for (was, now, u) in [
                    (self.mods.ctrl, m.ctrl, usage::LEFT_CTRL),
                    (self.mods.shift, m.shift, usage::LEFT_SHIFT),
                    (self.mods.alt, m.alt, usage::LEFT_ALT),
                    (self.mods.mac_cmd, m.mac_cmd, usage::LEFT_GUI),
                ] {
                    if was != now {
                        self.key(u, now);
                    }
                }
                self.mods = *m;
                true
            }
            _ => true,
        }
    }
}

impl Live {
    /// Applies the driver's updates; returns the end text if the session is over.
    fn pump(&mut self, ctx: &egui::Context, out: &EventOut) -> Option<(String, u8)> {
        while let Ok(u) = self.updates.try_recv() {
            let Some(u) = self.toolbox.update(u) else {
                continue;
            };
            match u {
                Update::Chat { .. }
                | Update::ChatSent { .. }
                | Update::Clipboard(_)
                | Update::ClipboardNotSent(_)
                | Update::Transfer(_)
                | Update::SendProblem(_) => {}
                Update::Consent(c) => {
                    self.consent = Some(c);
                    self.view_only = c != Consent::AllowControl;
                    out.event(
                        "consent",
                        &format!("The user answered: {c:?}"),
                        serde_json::json!({"decision": format!("{c:?}")}),
                    );
                }
                Update::Permissions { view_only } => {
                    self.view_only = view_only;
                    if view_only {
                        self.keyboard = false;
                    }
                }
                Update::FirstFrame { width, height, ms } => out.event(
                    "first_frame",
                    &format!("Remote screen {width}x{height} after {ms:.0} ms"),
                    serde_json::json!({"width": width, "height": height, "join_to_first_frame_ms": ms}),
                ),
                Update::Frame => {
                    if let Some(f) = self.latest.lock().take() {
                        let max_side = max_texture_side(ctx);
                        let Some(img) = texture_image(f.width, f.height, &f.rgba, max_side)
                        else {
                            continue;
                        };
                        // Input maps to the remote's own pixels, whatever the texture's size.
                        self.remote = (f.width, f.height);
                        self.texture_size = (img.size[0], img.size[1]);
                        match &mut self.texture {
                            Some(t) => t.set(img, TextureOptions::LINEAR),
                            None => {
                                self.texture =
                                    Some(ctx.load_texture("remote", img, TextureOptions::LINEAR))
                            }
                        }
                    }
                }
                Update::Undecodable { reason } => {
                    tracing::warn!(%reason, "remote picture not decodable");
                    self.note = Some(UNDECODABLE.to_owned());
                    out.event(
                        "undecodable",
                        UNDECODABLE,
                        serde_json::json!({"reason": reason}),
                    );
                }
                Update::PictureBack => {
                    if self.note.as_deref() == Some(UNDECODABLE) {
                        self.note = None;
                    }
                    out.event(
                        "picture_back",
                        "The remote picture is back.",
                        serde_json::json!({}),
                    );
                }
                Update::Cursor(c) => self.cursor = c,
                Update::CursorImage(c) => {
                    let img = ColorImage::from_rgba_premultiplied(
                        [c.width as usize, c.height as usize],
                        &c.rgba,
                    );
                    let t = ctx.load_texture("cursor", img, TextureOptions::NEAREST);
                    self.cursor_image = Some((t, c));
                }
                Update::Monitors { monitors, current } => {
                    self.monitors = monitors;
                    self.monitor = current;
                }
                Update::Stats(s) => self.stats = Some(s),
                Update::Path { kind, .. } => {
                    if let Some(s) = &mut self.stats {
                        s.route = kind;
                    }
                }
                Update::Link(t) => {
                    self.note = (!matches!(t, "The user is back." | "Reconnected."))
                        .then(|| t.to_owned());
                }
                Update::Ended {
                    text,
                    reason,
                    exit_code,
                } => {
                    out.event("ended", &text, serde_json::json!({"reason": reason}));
                    return Some((text, exit_code));
                }
            }
        }
        None
    }

    fn toolbar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal_wrapped(|ui| {
            let (label, color) = match (self.consent, self.view_only) {
                (None, _) => ("Waiting for the user to answer…", Color32::GRAY),
                (Some(Consent::Deny), _) => ("Denied", Color32::RED),
                (Some(_), true) => ("View only", Color32::from_rgb(0xe0, 0x8a, 0x00)),
                (Some(_), false) => ("Control", Color32::from_rgb(0x2e, 0x9d, 0x4a)),
            };
            ui.label(RichText::new(label).color(color).strong());
            let chat = match (self.toolbox.open, self.toolbox.unread) {
                (true, _) => "Hide chat".to_owned(),
                (false, 0) => "Chat".to_owned(),
                (false, n) => format!("Chat ({n} new)"),
            };
            if ui.button(chat).clicked() {
                self.toolbox.open = !self.toolbox.open;
            }
            if self.can_control() {
                ui.label(if self.keyboard {
                    "· keys go to the remote"
                } else {
                    "· click the screen to type"
                });
            }
            ui.separator();
            let control = self.can_control();
            ui.add_enabled_ui(control, |ui| {
                if ui.button("Ctrl+Alt+Del").clicked() {
                    self.send(Cmd::Input(InputEvent::Combo {
                        combo: Combo::CtrlAltDel,
                    }));
                }
                ui.menu_button("Keys", |ui| {
                    for (name, combo) in [
                        ("Alt+Tab", Combo::AltTab),
                        ("Alt+Shift+Tab", Combo::AltShiftTab),
                        ("Alt+F4", Combo::AltF4),
                        ("Super", Combo::Super),
                        ("Ctrl+Esc", Combo::CtrlEsc),
                        ("Ctrl+Shift+Esc", Combo::CtrlShiftEsc),
                        ("Print Screen", Combo::PrintScreen),
                    ] {
                        if ui.button(name).clicked() {
                            self.send(Cmd::Input(InputEvent::Combo { combo }));
                            ui.close();
                        }
                    }
                });
            });
            if self.monitors.len() > 1 {
                let current = self
                    .monitors
                    .get(self.monitor as usize)
                    .map(|m| format!("{} {}x{}", m.name, m.width, m.height))
                    .unwrap_or_default();
                egui::ComboBox::from_id_salt("monitor")
                    .selected_text(current)
                    .show_ui(ui, |ui| {
                        for (i, m) in self.monitors.iter().enumerate() {
                            let text = format!(
                                "{} {}x{}{}",
                                m.name,
                                m.width,
                                m.height,
                                if m.primary { " (primary)" } else { "" }
                            );
                            if ui
                                .selectable_label(i == self.monitor as usize, text)
                                .clicked()
                            {
                                let _ = self.cmds.send(Cmd::Monitor(i as u8));
                            }
                        }
                    });
            }
            let qualities = [
                (0, "Auto quality"),
                (8000, "High (8 Mbit/s)"),
                (2000, "Medium (2 Mbit/s)"),
                (500, "Low (0.5 Mbit/s)"),
            ];
            let name = qualities
                .iter()
                .find(|q| q.0 == self.quality)
                .map_or("Quality", |q| q.1);
            egui::ComboBox::from_id_salt("quality")
                .selected_text(name)
                .show_ui(ui, |ui| {
                    for (kbps, name) in qualities {
                        if ui.selectable_label(self.quality == kbps, name).clicked() {
                            self.quality = kbps;
                            let _ = self.cmds.send(Cmd::Quality(kbps));
                        }
                    }
                });
            if ui
                .button("Keyframe")
                .on_hover_text("ask for a full picture")
                .clicked()
            {
                self.send(Cmd::Keyframe);
            }
            ui.toggle_value(&mut self.one_to_one, "1:1");
            if ui
                .toggle_value(&mut self.fullscreen, "Full screen")
                .changed()
            {
                ui.ctx()
                    .send_viewport_cmd(egui::ViewportCommand::Fullscreen(self.fullscreen));
            }
            if ui
                .button(RichText::new("End").color(Color32::from_rgb(0xd0, 0x40, 0x40)))
                .clicked()
            {
                self.send(Cmd::End);
            }
        });
    }

    fn stats_line(&self, ui: &mut egui::Ui) {
        let text = match &self.stats {
            Some(s) => format!(
                "{:.0} fps · glass-to-glass {} · {:.0} kbit/s · RTT {:.1} ms (control {:.1} ms) · path: {} · {}x{}",
                s.fps,
                s.glass_ms.map_or("–".into(), |g| format!("≈{g:.0} ms")),
                s.kbit_s,
                s.path_rtt_ms,
                s.rtt_ms,
                crate::headless::path_text(s),
                self.remote.0,
                self.remote.1
            ),
            None => "measuring…".into(),
        };
        ui.horizontal(|ui| {
            ui.small(text);
            if let Some(n) = &self.note {
                ui.colored_label(Color32::from_rgb(0xe0, 0x8a, 0x00), n);
            }
        });
    }

    fn screen_ui(&mut self, ui: &mut egui::Ui, out: &EventOut) {
        // Files dropped on the window go to the user (the driver checks control).
        for f in ui.ctx().input(|i| i.raw.dropped_files.clone()) {
            self.send(Cmd::SendFiles(f.path().to_path_buf()));
        }
        let Some(tex) = &self.texture else {
            self.view = None;
            ui.centered_and_justified(|ui| {
                ui.label(match self.consent {
                    None => format!(
                        "Waiting for the user to allow the session…\nThe user sees you as {}, \
                         as the relay reports it.",
                        self.shown_as
                    ),
                    Some(Consent::Deny) => "The user denied the request.".into(),
                    Some(_) => "Waiting for the first picture…".into(),
                });
            });
            return;
        };
        let (sw, sh) = self.screen();
        let natural = Vec2::new(sw as f32, sh as f32) / ui.ctx().pixels_per_point();
        let tex_id = tex.id();
        let rect = if self.one_to_one {
            let r = egui::ScrollArea::both().show(ui, |ui| {
                ui.allocate_exact_size(natural, egui::Sense::click()).0
            });
            // Only the visible part takes input.
            r.inner.intersect(r.inner_rect)
        } else {
            let avail = ui.available_size();
            let size = fit(natural, avail);
            let (r, _) = ui.allocate_exact_size(avail, egui::Sense::click());
            Rect::from_center_size(r.center(), size)
        };
        let full = if self.one_to_one {
            // The whole picture's rect (may extend beyond what is visible).
            Rect::from_min_size(rect.min, natural)
        } else {
            rect
        };
        let painter = ui.painter_at(rect);
        painter.image(
            tex_id,
            full,
            Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0)),
            Color32::WHITE,
        );
        if self.keyboard && self.can_control() {
            painter.rect_stroke(
                rect.shrink(1.0),
                0.0,
                egui::Stroke::new(2.0, Color32::from_rgb(0x2e, 0x9d, 0x4a)),
                egui::StrokeKind::Inside,
            );
        }
        // The remote cursor: its image at its position, scaled like the picture.
        if self.cursor.visible
            && let Some((ctex, img)) = &self.cursor_image
        {
            let k = full.width() / sw.max(1) as f32;
            let scale = img.scale as f32 * k;
            let at = full.min
                + Vec2::new(
                    (self.cursor.x as f32 - img.hot_x as f32 * img.scale as f32) * k,
                    (self.cursor.y as f32 - img.hot_y as f32 * img.scale as f32) * k,
                );
            let size = Vec2::new(img.width as f32, img.height as f32) * scale;
            painter.image(
                ctex.id(),
                Rect::from_min_size(at, size),
                Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0)),
                Color32::WHITE,
            );
        }
        self.view = Some(full.intersect(rect));
        if !self.shown {
            self.shown = true;
            out.event(
                "frame_shown",
                "The remote screen is on the window",
                serde_json::json!({"width": self.remote.0, "height": self.remote.1,
                    "texture_w": self.texture_size.0, "texture_h": self.texture_size.1,
                    "view_w": rect.width(), "view_h": rect.height()}),
            );
        }
    }
}

impl eframe::App for ConsoleApp {
    fn raw_input_hook(&mut self, _ctx: &egui::Context, raw: &mut egui::RawInput) {
        if let Phase::Session(live) = &mut self.phase {
            raw.events.retain(|e| {
                if let Event::PointerMoved(p) = e {
                    live.last_pointer = Some(*p);
                }
                live.route(e)
            });
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let ctx = ui.ctx().clone();
        if let Some((t0, d)) = self.limit {
            if t0.elapsed() >= d {
                match &self.phase {
                    Phase::Session(live) => live.send(Cmd::End),
                    _ => ctx.send_viewport_cmd(egui::ViewportCommand::Close),
                }
                self.limit = None;
            } else {
                ctx.request_repaint_after(d - t0.elapsed());
            }
        }
        let phase = std::mem::replace(&mut self.phase, Phase::Login { error: None });
        self.phase = match phase {
            Phase::Login { error } => {
                self.login_ui(ui, error.clone());
                if matches!(self.phase, Phase::Login { .. }) {
                    Phase::Login { error }
                } else {
                    std::mem::replace(&mut self.phase, Phase::Login { error: None })
                }
            }
            Phase::Joining { rx, since, target } => match rx.try_recv() {
                Ok(Ok(live)) => Phase::Session(live),
                Ok(Err((code, text))) => {
                    self.exit_code
                        .store(code, std::sync::atomic::Ordering::Relaxed);
                    self.out.event(
                        "error",
                        &text,
                        serde_json::json!({"exit_code": code, "message": text}),
                    );
                    if self.closes_when_done {
                        ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                    }
                    Phase::Login { error: Some(text) }
                }
                Err(std_mpsc::TryRecvError::Empty) => {
                    egui::CentralPanel::default().show(ui, |ui| {
                        ui.heading(format!(
                            "Connecting to {target} … {:.0} s",
                            since.elapsed().as_secs_f32()
                        ));
                    });
                    ctx.request_repaint_after(Duration::from_millis(200));
                    Phase::Joining { rx, since, target }
                }
                Err(std_mpsc::TryRecvError::Disconnected) => Phase::Login {
                    error: Some("the connection attempt stopped".into()),
                },
            },
            Phase::Session(mut live) => {
                if let Some((text, code)) = live.pump(&ctx, &self.out) {
                    self.exit_code
                        .store(code, std::sync::atomic::Ordering::Relaxed);
                    if live.fullscreen {
                        ctx.send_viewport_cmd(egui::ViewportCommand::Fullscreen(false));
                    }
                    if self.closes_when_done {
                        ctx.send_viewport_cmd(egui::ViewportCommand::Close);
                    }
                    Phase::Ended { text }
                } else {
                    egui::Panel::top("toolbar").show(ui, |ui| live.toolbar(ui));
                    egui::Panel::bottom("stats").show(ui, |ui| live.stats_line(ui));
                    {
                        let cmds = live.cmds.clone();
                        let control = live.can_control();
                        live.toolbox.poll_clipboard(control, &move |c| {
                            let _ = cmds.send(c);
                        });
                    }
                    if live.toolbox.open {
                        egui::Panel::right("toolbox")
                            .default_size(280.0)
                            .show(ui, |ui| {
                                let cmds = live.cmds.clone();
                                if live.toolbox.ui(ui, &move |c| {
                                    let _ = cmds.send(c);
                                }) {
                                    // Typing a message: keys stay in the chat box.
                                    live.keyboard = false;
                                }
                            });
                    }
                    egui::CentralPanel::default()
                        .frame(egui::Frame::NONE.fill(Color32::from_gray(20)))
                        .show(ui, |ui| live.screen_ui(ui, &self.out));
                    Phase::Session(live)
                }
            }
            Phase::Ended { text } => {
                let mut again = false;
                egui::CentralPanel::default().show(ui, |ui| {
                    ui.heading(&text);
                    ui.add_space(8.0);
                    if ui.button("New session").clicked() {
                        again = true;
                    }
                });
                if again {
                    self.form.code.clear();
                    self.form.device.clear();
                    // The device states changed with this session: show them as they are now.
                    if self.login.credentials.is_some()
                        && self.devices.list.is_some()
                        && self.devices.pending.is_none()
                    {
                        self.fetch_devices(&ctx);
                    }
                    Phase::Login { error: None }
                } else {
                    Phase::Ended { text }
                }
            }
        };
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        // Closing the window ends the session; wait (bounded) until the agent was told.
        if let Phase::Session(live) = &self.phase {
            live.send(Cmd::End);
            let _ = live.done.recv_timeout(Duration::from_secs(3));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A picture within the limit is the texture as it is; one wider or taller than the GPU's
    /// texture limit is shrunk to fit, keeping its aspect and its content.
    #[test]
    fn pictures_larger_than_the_texture_limit_are_scaled_to_fit() {
        // 1920x1080 fits a 2048 limit untouched.
        let px = vec![7u8; 1920 * 1080 * 4];
        let img = texture_image(1920, 1080, &px, 2048).unwrap();
        assert_eq!(img.size, [1920, 1080]);
        // 20000x600 against a 16384 limit (llvmpipe's): halved.
        let (w, h) = (20000usize, 600usize);
        let mut px = vec![0u8; w * h * 4];
        for (i, p) in px.chunks_exact_mut(4).enumerate() {
            // Left half white, right half black, opaque.
            let v = if i % w < w / 2 { 255 } else { 0 };
            p.copy_from_slice(&[v, v, v, 255]);
        }
        let img = texture_image(w as u32, h as u32, &px, 16384).unwrap();
        assert_eq!(img.size, [10000, 300]);
        assert_eq!(img.pixels[0], Color32::WHITE);
        assert_eq!(img.pixels[9999], Color32::BLACK);
        // A tall one against a small limit: each side fits.
        let px = vec![200u8; 300 * 5000 * 4];
        let img = texture_image(300, 5000, &px, 1024).unwrap();
        assert!(img.size[0] <= 1024 && img.size[1] <= 1024, "{:?}", img.size);
        assert_eq!(img.size, [60, 1000]);
        assert_eq!(
            img.pixels[0],
            Color32::from_rgba_unmultiplied(200, 200, 200, 200)
        );
        // A buffer shorter than its size is refused, not read past.
        assert!(texture_image(100, 100, &[0; 100], 4096).is_none());
        assert!(texture_image(0, 100, &[], 4096).is_none());
    }

    fn row(name: &str, group: &str, online: bool, in_session: bool, last_seen: u64) -> Row {
        Row::new(
            "0123456789abcdef0123",
            name,
            group,
            ["host-1", "Alice", "Linux"],
            (online, in_session, last_seen),
        )
    }

    /// Devices sort by group (each group together, whatever its case), then name; the search
    /// looks in name, host, group, user and id, whatever the case.
    #[test]
    fn device_rows_sort_by_group_then_name_and_search_without_case() {
        let mut rows = [
            row("zeta", "Lab", true, false, 0),
            row("Alpha", "office", true, false, 0),
            row("beta", "lab", true, false, 0),
            row("alpha", "Lab", true, false, 0),
        ];
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        let order: Vec<_> = rows
            .iter()
            .map(|r| format!("{}/{}", r.group, r.name))
            .collect();
        assert_eq!(order, ["Lab/alpha", "Lab/zeta", "lab/beta", "office/Alpha"]);
        let r = &rows[0];
        for needle in ["alp", "host-1", "lab", "alice", "89ABC", ""] {
            assert!(r.matches(&needle.to_lowercase()), "{needle}");
        }
        assert!(!r.matches("linux-box"));
        assert_eq!(r.host, "host-1 · Alice · Linux");
    }

    /// The relay's text is shown with unprintable characters escaped and its length bounded.
    #[test]
    fn device_text_from_the_relay_is_made_printable() {
        let r = row("inv\u{202e}oice\nx", "", true, false, 0);
        assert!(
            !r.name.contains('\u{202e}') && !r.name.contains('\n'),
            "{}",
            r.name
        );
        assert_eq!(r.group, "(no group)");
        assert!(
            row(&"x".repeat(500), "g", true, false, 0)
                .name
                .chars()
                .count()
                <= 41
        );
        let list = Listing::new(
            DeviceList {
                devices: vec![],
                rejected: vec!["bad\u{7}sig".into()],
            },
            "relay:4433",
        );
        assert!(!list.rejected[0].contains('\u{7}'));
    }

    /// Only online devices not in a session can be connected to; the state says why not.
    #[test]
    fn device_states() {
        let now = 1_000_000;
        let online = row("a", "g", true, false, now);
        assert!(online.reachable());
        assert_eq!(online.state(now).0, "online");
        let busy = row("a", "g", true, true, now);
        assert!(!busy.reachable());
        assert_eq!(busy.state(now).0, "in session");
        let off = row("a", "g", false, false, now - 5 * 60 - 10);
        assert!(!off.reachable());
        assert_eq!(off.state(now).0, "offline, seen 5 min ago");
        assert_eq!(
            row("a", "g", false, false, 0).state(now).0,
            "offline, never seen"
        );
        assert_eq!(ago(3 * 3600), "3 h");
        assert_eq!(ago(3 * 86400), "3 days");
        // A clock ahead of ours: not "in the future".
        assert_eq!(
            row("a", "g", false, false, now + 60).state(now).0,
            "offline, seen 0 min ago"
        );
    }

    /// Shrinking averages the pixels each texel covers, partial blocks at the edges included.
    #[test]
    fn shrinking_averages_blocks() {
        // 5x1, factor 3 (max side 2): texels cover [0..3) and [3..5).
        let px: Vec<u8> = [10u8, 20, 30, 100, 200]
            .iter()
            .flat_map(|&v| [v, v, v, 255])
            .collect();
        let (w, h, out) = shrink(5, 1, &px, 2);
        assert_eq!((w, h), (2, 1));
        assert_eq!(&out[..4], &[20, 20, 20, 255]);
        assert_eq!(&out[4..], &[150, 150, 150, 255]);
    }
}
