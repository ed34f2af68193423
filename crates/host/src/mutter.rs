//! The GNOME backend (Mutter on Wayland): the screen through Mutter's `org.gnome.Mutter.ScreenCast`
//! D-Bus interface and PipeWire, the input through `org.gnome.Mutter.RemoteDesktop`.
//!
//! **Session.** Screen and input share one remote desktop session of Mutter's (what
//! gnome-remote-desktop uses; GNOME Shell shows its sharing indicator while it runs). It is
//! created when the screen or the input is first opened: a `RemoteDesktop` session, a `ScreenCast`
//! session linked to it, one stream per monitor (`RecordMonitor`, the cursor as metadata, not
//! drawn into the frames), then `Start`. Mutter answers each stream with a PipeWire node
//! (`PipeWireStreamAdded`). The session stops when both the screen and the input are closed (and
//! Mutter ends it by itself if the agent's bus connection goes away).
//!
//! **Screen.** The selected monitor's node is consumed by a PipeWire stream on a thread of its own
//! (PipeWire objects are tied to their thread; the capturer is `Send`), with shared-memory buffers
//! only (memfd; never DMA-BUF, which would need a GPU context to read) in BGRx/BGRA (RGBx/RGBA are
//! swapped on the way in). Mutter sends a buffer only when the monitor was redrawn or the pointer
//! moved, so an idle screen costs nothing: the thread sleeps in PipeWire's loop and
//! [`Capturer::wait_for_change`] on a condition variable. Each buffer goes through the same change
//! detector as the other backends, limited to the damaged rectangles when Mutter says which
//! (`SPA_META_VideoDamage`, Mutter 45 and later), the whole frame otherwise (Mutter 43/44: the
//! detector finds the changed tiles). The cursor comes as metadata (`SPA_META_Cursor`): its
//! position on the monitor with every move, its image (premultiplied RGBA) when it changes.
//!
//! **Input.** `NotifyPointerMotionAbsolute` places the pointer on a stream (a monitor) in that
//! stream's pixels: a position in the layout of the [`Monitor`] list this backend reports is
//! mapped to the monitor it falls on. Buttons and keys are evdev codes (X keycodes − 8); the wheel
//! goes in discrete notches; text goes as keysyms (`NotifyKeyboardKeysym`), which Mutter types
//! with the user's current layout, adding Shift or AltGr as the layout needs.
//!
//! **Monitor changes.** Mutter 43 does not resize a monitor stream: when a monitor changes mode or
//! position it closes the stream, and with it the whole session. The backend then starts a new
//! session over the new layout by itself (the capture reports `resized`). A session that ended
//! while the layout stayed as it was was stopped on purpose (from GNOME's sharing indicator): that
//! is reported as an error and never restarted behind the user's back.
//!
//! **Limits (Mutter 43).** No damage metadata (every redraw is compared whole, ~1 ms per 1080p
//! frame). Text can only type characters of the user's current keyboard layout (Mutter drops
//! other keysyms with "No keycode found for keyval" in its log). Headless Mutter 43.8 sends the
//! cursor's position but an empty image, and now and then stops recording after a window's map
//! animation until the next input or redraw (the stream then shows the previous picture). With a
//! scaled monitor (`scale ≠ 1`), monitor positions are in Mutter's logical layout, sizes in pixels.

use crate::desktop::BackendError;
use futures_util::{FutureExt, StreamExt};
use pipewire as pw;
use pw::spa;
use spa::buffer::meta::{MetaCursor, MetaHeader, MetaHeaderFlags, MetaVideoDamage};
use spa::param::video::{VideoFormat, VideoInfoRaw};
use spa::pod::{Object, Pod, Property, PropertyFlags, Value};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};
use tandem_input::gate::{Action, ScrollAxis};
use tandem_input::{DisplayRect, InjectError, Injector, MouseButton};
use tandem_media::capture::{CaptureError, Captured, Capturer, CursorShape, CursorState, Monitor};
use tandem_media::frame::{ChangeDetector, Frame, Rect};
use xkbcommon::xkb;
use zbus::blocking::Connection;
use zbus::zvariant::{OwnedObjectPath, OwnedValue};

const RD_NAME: &str = "org.gnome.Mutter.RemoteDesktop";
const RD_PATH: &str = "/org/gnome/Mutter/RemoteDesktop";
const RD_SESSION: &str = "org.gnome.Mutter.RemoteDesktop.Session";
const SC_NAME: &str = "org.gnome.Mutter.ScreenCast";
const SC_PATH: &str = "/org/gnome/Mutter/ScreenCast";
const SC_SESSION: &str = "org.gnome.Mutter.ScreenCast.Session";
const SC_STREAM: &str = "org.gnome.Mutter.ScreenCast.Stream";
const DC_NAME: &str = "org.gnome.Mutter.DisplayConfig";
const DC_PATH: &str = "/org/gnome/Mutter/DisplayConfig";
/// `cursor-mode` of `RecordMonitor`: 0 hidden, 1 embedded, 2 metadata.
const CURSOR_MODE_METADATA: u32 = 2;
/// How long Mutter may take to announce the PipeWire nodes of a new session.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long opening the screen (or switching monitors) waits for the first picture.
const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a stream that gave no first picture is connected again. Mutter sends a monitor's
/// picture when its stream starts and then only what is redrawn: a first picture lost (seen once
/// on a loaded CI machine) would leave a still screen blank until something on it changed.
const FIRST_FRAME_RETRIES: u32 = 3;
/// Frames a second asked of Mutter at most (it sends fewer: only what is redrawn).
const MAX_FPS: u32 = 60;
/// The largest cursor image accepted, per side (Mutter's own limit is 384).
const CURSOR_MAX: usize = 384;
/// Damage rectangles kept per capture before they are merged into their bounding box.
const MAX_DAMAGE_RECTS: usize = 64;

/// Why the GNOME backend cannot work, in words for the user.
#[derive(Debug, thiserror::Error)]
pub enum MutterError {
    #[error(
        "cannot reach the desktop session's D-Bus (the session bus): {0}; start the agent from \
         inside the GNOME session"
    )]
    Bus(String),
    #[error(
        "GNOME's {what} interface is not available on the session bus ({name}): {reason}; is \
         this a GNOME (Mutter) Wayland session?"
    )]
    Unavailable {
        what: &'static str,
        name: &'static str,
        reason: String,
    },
    #[error("GNOME refused to {what}: {reason}")]
    Refused { what: &'static str, reason: String },
    #[error("GNOME reports no monitor to share")]
    NoMonitor,
    #[error(
        "GNOME did not start the screen stream within {} s (no PipeWire node was announced)",
        .0.as_secs()
    )]
    NoStream(Duration),
    #[error("cannot receive the screen through PipeWire: {0}")]
    PipeWire(String),
    #[error(
        "the remote desktop session was ended on the GNOME desktop (from its screen sharing \
         indicator, or by GNOME itself)"
    )]
    Ended,
    #[error(
        "the desktop has no screen sharing portal: {0}; install xdg-desktop-portal and the \
         portal of this desktop (xdg-desktop-portal-kde, -gnome, -wlr, …), or log in with an X11 \
         (\"Xorg\") session"
    )]
    PortalUnavailable(String),
    #[error("screen sharing was declined in the desktop's sharing dialog")]
    PortalDeclined,
    #[error(
        "the desktop's sharing dialog was not answered within {} s",
        .0.as_secs()
    )]
    PortalTimeout(Duration),
    #[error("the desktop's screen sharing portal failed to {what}: {reason}")]
    PortalFailed { what: &'static str, reason: String },
    #[error(
        "remote control was not allowed in the desktop's sharing dialog (the screen is shared, \
         view only)"
    )]
    NoRemoteInput,
    #[error("the screen is shared view only: remote control was not asked of the desktop")]
    ViewOnlyAsked,
    #[error(
        "screen sharing was stopped on the desktop (from its sharing indicator, or by the desktop \
         itself)"
    )]
    PortalEnded,
}

impl From<MutterError> for CaptureError {
    fn from(e: MutterError) -> CaptureError {
        CaptureError::Unsupported(e.to_string())
    }
}

impl From<MutterError> for InjectError {
    fn from(e: MutterError) -> InjectError {
        InjectError::Inject(e.to_string())
    }
}

impl From<MutterError> for BackendError {
    fn from(e: MutterError) -> BackendError {
        BackendError::Unsupported(e.to_string())
    }
}

/// Whether GNOME's remote desktop and screen cast interfaces are on the session bus (to choose
/// this backend); the reason in words when not.
pub fn available() -> Result<(), String> {
    available_on(None)
}

/// Like [`available`], on the bus at `address` (`None`: the session bus).
pub fn available_on(address: Option<&str>) -> Result<(), String> {
    let conn = connect(address).map_err(|e| e.to_string())?;
    for (what, name) in [("remote desktop", RD_NAME), ("screen cast", SC_NAME)] {
        let owned = conn
            .call_method(
                Some("org.freedesktop.DBus"),
                "/org/freedesktop/DBus",
                Some("org.freedesktop.DBus"),
                "NameHasOwner",
                &name,
            )
            .and_then(|m| m.body().deserialize::<bool>())
            .map_err(|e| format!("cannot ask the session bus about {name}: {e}"))?;
        if !owned {
            return Err(MutterError::Unavailable {
                what,
                name,
                reason: "nobody owns that name".into(),
            }
            .to_string());
        }
    }
    Ok(())
}

fn connect(address: Option<&str>) -> Result<Connection, MutterError> {
    let r = match address {
        Some(a) => zbus::blocking::connection::Builder::address(a).and_then(|b| b.build()),
        None => Connection::session(),
    };
    r.map_err(|e| MutterError::Bus(e.to_string()))
}

/// The GNOME (Mutter) desktop of the session bus.
#[derive(Debug, Default)]
pub struct MutterDesktop {
    /// `None`: the session bus of the environment.
    bus: Option<String>,
    /// `None`: PipeWire's default socket (`$PIPEWIRE_REMOTE`, `$XDG_RUNTIME_DIR/pipewire-0`).
    pipewire: Option<PathBuf>,
    /// The session the screen and the input share while either is open.
    link: Mutex<Weak<Link>>,
}

impl MutterDesktop {
    /// The desktop of this process's session bus and PipeWire.
    pub fn new() -> MutterDesktop {
        MutterDesktop::default()
    }

    /// The desktop whose session bus is at `address` (`unix:path=…`), for tests and tools that run
    /// outside the session; PipeWire still from the environment unless [`Self::pipewire_socket`].
    pub fn with_bus(address: impl Into<String>) -> MutterDesktop {
        MutterDesktop {
            bus: Some(address.into()),
            ..MutterDesktop::default()
        }
    }

    /// Uses the PipeWire daemon listening at `path` (e.g. `$XDG_RUNTIME_DIR/pipewire-0` of the
    /// session).
    pub fn pipewire_socket(mut self, path: impl Into<PathBuf>) -> MutterDesktop {
        self.pipewire = Some(path.into());
        self
    }

    fn link(&self) -> Arc<Link> {
        let mut weak = self.link.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = weak.upgrade() {
            return l;
        }
        let l = Arc::new(Link::new(self.bus.clone(), Flavor::Mutter));
        *weak = Arc::downgrade(&l);
        l
    }

    /// Opens the screen (starting the shared session if the input has not).
    pub fn open_capturer(&self) -> Result<MutterCapturer, MutterError> {
        MutterCapturer::open(self.link(), self.pipewire.clone())
    }

    /// Opens the input (starting the shared session if the screen has not).
    pub fn open_injector(&self) -> Result<MutterInjector, MutterError> {
        MutterInjector::open(self.link())
    }
}

// Waits for `Backend::Mutter` in desktop.rs: delete this `cfg` line when it exists.
impl crate::desktop::Desktop for MutterDesktop {
    fn backend(&self) -> crate::desktop::Backend {
        crate::desktop::Backend::Mutter
    }
    fn describe(&self) -> String {
        match &self.bus {
            None => "the GNOME desktop (Mutter)".into(),
            Some(a) => format!("the GNOME desktop (Mutter) on the bus {a}"),
        }
    }
    fn open_screen(&self) -> Result<Box<dyn Capturer + Send>, BackendError> {
        Ok(Box::new(self.open_capturer()?))
    }
    fn open_input(&self) -> Result<Box<dyn Injector>, InjectError> {
        Ok(Box::new(self.open_injector()?))
    }
}

// ---------------------------------------------------------------------------------------------
// D-Bus: the session

/// A monitor as Mutter lays it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Screen {
    pub(crate) connector: String,
    /// Position in Mutter's layout (logical pixels).
    pub(crate) x: i32,
    pub(crate) y: i32,
    /// Size of its stream, in pixels.
    pub(crate) width: u32,
    pub(crate) height: u32,
    pub(crate) primary: bool,
}

type MonitorSpec = (String, String, String, String);
type ModeInfo = (
    String,
    i32,
    i32,
    f64,
    f64,
    Vec<f64>,
    HashMap<String, OwnedValue>,
);
type PhysicalMonitor = (MonitorSpec, Vec<ModeInfo>, HashMap<String, OwnedValue>);
type LogicalMonitor = (
    i32,
    i32,
    f64,
    u32,
    bool,
    Vec<MonitorSpec>,
    HashMap<String, OwnedValue>,
);
type DisplayState = (
    u32,
    Vec<PhysicalMonitor>,
    Vec<LogicalMonitor>,
    HashMap<String, OwnedValue>,
);

fn flag(props: &HashMap<String, OwnedValue>, key: &str) -> bool {
    props
        .get(key)
        .and_then(|v| bool::try_from(v).ok())
        .unwrap_or(false)
}

/// The monitors of `DisplayConfig.GetCurrentState`, primary first, then left to right and top to
/// bottom. A logical monitor showing several physical ones (mirroring) counts once.
fn screens_of(state: &DisplayState) -> Vec<Screen> {
    // The stream of a monitor is its mode's size, in a logical layout (sizes divided by the
    // scale) as in a physical one.
    let (_, physical, logical, _) = state;
    let mut out = Vec::new();
    for (x, y, _scale, transform, primary, specs, _) in logical {
        let Some(spec) = specs.first() else { continue };
        let Some((_, modes, _)) = physical.iter().find(|(s, _, _)| s.0 == spec.0) else {
            continue;
        };
        let Some(mode) = modes.iter().find(|m| flag(&m.6, "is-current")) else {
            continue;
        };
        let (mut w, mut h) = (mode.1.max(0) as u32, mode.2.max(0) as u32);
        // Transforms 1, 3, 5, 7 turn the monitor by 90° or 270°.
        if transform % 2 == 1 {
            std::mem::swap(&mut w, &mut h);
        }
        out.push(Screen {
            connector: spec.0.clone(),
            x: (*x).max(0),
            y: (*y).max(0),
            width: w,
            height: h,
            primary: *primary,
        });
    }
    out.sort_by_key(|s| (!s.primary, s.y, s.x));
    out
}

fn method_error_name(e: &zbus::Error) -> Option<&str> {
    match e {
        zbus::Error::MethodError(name, _, _) => Some(name.as_str()),
        _ => None,
    }
}

/// A failed call to Mutter, in words.
fn refused(what: &'static str, iface: (&'static str, &'static str), e: zbus::Error) -> MutterError {
    match method_error_name(&e) {
        Some(
            "org.freedesktop.DBus.Error.ServiceUnknown"
            | "org.freedesktop.DBus.Error.NameHasNoOwner"
            | "org.freedesktop.DBus.Error.UnknownObject",
        ) => MutterError::Unavailable {
            what: iface.0,
            name: iface.1,
            reason: e.to_string(),
        },
        _ => MutterError::Refused {
            what,
            reason: e.to_string(),
        },
    }
}

/// Whether a failed call means the session is gone (closed by Mutter).
pub(crate) fn session_gone(e: &zbus::Error) -> bool {
    matches!(
        method_error_name(e),
        Some(
            "org.freedesktop.DBus.Error.UnknownObject"
                | "org.freedesktop.DBus.Error.UnknownMethod"
                | "org.freedesktop.DBus.Error.UnknownInterface"
        )
    )
}

fn display_state(conn: &Connection) -> Result<Vec<Screen>, MutterError> {
    let state: DisplayState = conn
        .call_method(
            Some(DC_NAME),
            DC_PATH,
            Some(DC_NAME),
            "GetCurrentState",
            &(),
        )
        .and_then(|m| m.body().deserialize())
        .map_err(|e| refused("list its monitors", ("display configuration", DC_NAME), e))?;
    Ok(screens_of(&state))
}

/// One monitor's stream in a session.
#[derive(Clone, Debug)]
pub(crate) struct StreamInfo {
    pub(crate) screen: Screen,
    /// Mutter's stream object (empty for a portal's stream).
    pub(crate) path: OwnedObjectPath,
    pub(crate) node: u32,
}

/// Whose session it is.
pub(crate) enum Api {
    /// Mutter's own interfaces: the remote desktop session's object path.
    Mutter { rd_path: OwnedObjectPath },
    /// xdg-desktop-portal's.
    Portal(crate::portal::Started),
}

/// A started remote desktop session (Mutter's, or a portal's); stopped when dropped.
pub(crate) struct Session {
    conn: Connection,
    pub(crate) api: Api,
    pub(crate) streams: Vec<StreamInfo>,
    /// Counts the sessions of a [`Link`], to tell a stale one from its replacement.
    generation: u64,
    /// The session's `Closed` signal.
    closed_signal: Mutex<ClosedSignal>,
    closed: AtomicBool,
}

impl Session {
    /// Creates and starts a session recording every monitor.
    fn start(conn: &Connection, generation: u64) -> Result<Session, MutterError> {
        let screens = display_state(conn)?;
        if screens.is_empty() {
            return Err(MutterError::NoMonitor);
        }
        let rd: OwnedObjectPath = conn
            .call_method(
                Some(RD_NAME),
                RD_PATH,
                Some("org.gnome.Mutter.RemoteDesktop"),
                "CreateSession",
                &(),
            )
            .and_then(|m| m.body().deserialize())
            .map_err(|e| {
                refused(
                    "start a remote desktop session",
                    ("remote desktop", RD_NAME),
                    e,
                )
            })?;
        let closed_rule = match closed_signal(conn, RD_NAME, rd.as_str(), RD_SESSION) {
            Ok(r) => r,
            Err(e) => {
                let _ = conn.call_method(Some(RD_NAME), rd.as_str(), Some(RD_SESSION), "Stop", &());
                return Err(MutterError::Bus(e.to_string()));
            }
        };
        let rd_path = rd.clone();
        // From here on, dropping `session` stops it in Mutter.
        let mut session = Session {
            conn: conn.clone(),
            api: Api::Mutter { rd_path: rd },
            streams: Vec::new(),
            generation,
            closed_signal: Mutex::new(closed_rule),
            closed: AtomicBool::new(false),
        };
        let id: OwnedValue = conn
            .call_method(
                Some(RD_NAME),
                rd_path.as_str(),
                Some("org.freedesktop.DBus.Properties"),
                "Get",
                &(RD_SESSION, "SessionId"),
            )
            .and_then(|m| m.body().deserialize())
            .map_err(|e| {
                refused(
                    "name its remote desktop session",
                    ("remote desktop", RD_NAME),
                    e,
                )
            })?;
        let id = String::try_from(id).map_err(|e| MutterError::Refused {
            what: "name its remote desktop session",
            reason: e.to_string(),
        })?;
        let mut props: HashMap<&str, zbus::zvariant::Value> = HashMap::new();
        props.insert("remote-desktop-session-id", id.as_str().into());
        let sc: OwnedObjectPath = conn
            .call_method(
                Some(SC_NAME),
                SC_PATH,
                Some("org.gnome.Mutter.ScreenCast"),
                "CreateSession",
                &props,
            )
            .and_then(|m| m.body().deserialize())
            .map_err(|e| refused("start a screen cast session", ("screen cast", SC_NAME), e))?;
        let mut paths = Vec::new();
        for s in &screens {
            let mut props: HashMap<&str, zbus::zvariant::Value> = HashMap::new();
            props.insert("cursor-mode", CURSOR_MODE_METADATA.into());
            let path: OwnedObjectPath = conn
                .call_method(
                    Some(SC_NAME),
                    sc.as_str(),
                    Some(SC_SESSION),
                    "RecordMonitor",
                    &(s.connector.as_str(), props),
                )
                .and_then(|m| m.body().deserialize())
                .map_err(|e| refused("record a monitor", ("screen cast", SC_NAME), e))?;
            paths.push(path);
        }
        // Listen before starting: the nodes are announced as the streams start.
        let added = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender(SC_NAME)
            .and_then(|b| b.interface(SC_STREAM))
            .and_then(|b| b.member("PipeWireStreamAdded"))
            .map(|b| b.build())
            .and_then(|rule| zbus::blocking::MessageIterator::for_match_rule(rule, conn, Some(64)))
            .map_err(|e| MutterError::Bus(e.to_string()))?;
        conn.call_method(
            Some(RD_NAME),
            rd_path.as_str(),
            Some(RD_SESSION),
            "Start",
            &(),
        )
        .map_err(|e| {
            refused(
                "start the remote desktop session",
                ("remote desktop", RD_NAME),
                e,
            )
        })?;
        let nodes = wait_for_nodes(added.into_inner(), &paths, STREAM_TIMEOUT)?;
        session.streams = screens
            .into_iter()
            .zip(paths)
            .zip(nodes)
            .map(|((screen, path), node)| StreamInfo { screen, path, node })
            .collect();
        tracing::info!(
            session = rd_path.as_str(),
            streams = ?session.streams.iter().map(|s| (&s.screen.connector, s.node)).collect::<Vec<_>>(),
            "GNOME remote desktop session started"
        );
        Ok(session)
    }

    /// Whether Mutter said the session closed (does not wait).
    fn is_closed(&self) -> bool {
        if self.closed.load(Ordering::Relaxed) {
            return true;
        }
        let mut signals = self.closed_signal.lock().unwrap_or_else(|e| e.into_inner());
        // `Some(Some(_))`: the signal; `Some(None)`: the connection ended.
        if signals.next().now_or_never().is_some() {
            self.closed.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Waits (at most `timeout`) for Mutter to say the session closed: it closes a session around
    /// the time its streams end.
    fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.is_closed() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    fn screens(&self) -> Vec<Screen> {
        self.streams.iter().map(|s| s.screen.clone()).collect()
    }

    /// Calls a method of Mutter's remote desktop session.
    fn notify<B>(&self, rd_path: &OwnedObjectPath, method: &str, body: &B) -> Result<(), SendError>
    where
        B: zbus::export::serde::Serialize + zbus::zvariant::DynamicType,
    {
        self.conn
            .call_method(
                Some(RD_NAME),
                rd_path.as_str(),
                Some(RD_SESSION),
                method,
                body,
            )
            .map(drop)
            .map_err(|e| {
                if session_gone(&e) {
                    SendError::Gone
                } else {
                    SendError::Refused(e.to_string())
                }
            })
    }

    /// Sends one input event into the session.
    fn input(&self, call: &Call) -> Result<(), SendError> {
        let rd = match &self.api {
            Api::Mutter { rd_path } => rd_path,
            Api::Portal(p) => return p.input(&self.streams, call),
        };
        match *call {
            Call::Motion(x, y) => match locate(&self.streams, x, y) {
                Some((s, px, py)) => self.notify(
                    rd,
                    "NotifyPointerMotionAbsolute",
                    &(s.path.as_str(), px, py),
                ),
                None => Ok(()),
            },
            Call::Button(b, pressed) => self.notify(rd, "NotifyPointerButton", &(b, pressed)),
            Call::Axis(axis, steps) => self.notify(rd, "NotifyPointerAxisDiscrete", &(axis, steps)),
            Call::Keycode(k, pressed) => self.notify(rd, "NotifyKeyboardKeycode", &(k, pressed)),
            Call::Keysym(k, pressed) => self.notify(rd, "NotifyKeyboardKeysym", &(k, pressed)),
        }
    }

    fn name(&self) -> String {
        match &self.api {
            Api::Mutter { rd_path } => rd_path.to_string(),
            Api::Portal(p) => p.name(),
        }
    }
}

/// Why an input event did not reach the desktop.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The session is gone (closed by the desktop).
    Gone,
    Refused(String),
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.closed.load(Ordering::Relaxed) {
            // Also ends the linked screen cast session. Fails harmlessly if it was closed.
            match &self.api {
                Api::Mutter { rd_path } => {
                    let _ = self.notify(rd_path, "Stop", &());
                }
                Api::Portal(p) => p.close(),
            }
        }
        tracing::info!(session = self.name(), "remote desktop session stopped");
    }
}

/// A session's `Closed` signal: an item, or the end of the stream (the bus connection ended).
pub(crate) type ClosedSignal = std::pin::Pin<Box<dyn futures_util::Stream<Item = ()> + Send>>;

/// Subscribes to the `Closed` signal of a session object.
pub(crate) fn closed_signal(
    conn: &Connection,
    sender: &str,
    path: &str,
    interface: &str,
) -> Result<ClosedSignal, zbus::Error> {
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(sender)?
        .path(path)?
        .interface(interface)?
        .member("Closed")?
        .build();
    let stream = zbus::blocking::MessageIterator::for_match_rule(rule, conn, Some(4))?.into_inner();
    Ok(Box::pin(stream.map(|_| ())))
}

impl Session {
    /// A started portal session (see [`crate::portal`]).
    pub(crate) fn portal(
        conn: &Connection,
        started: crate::portal::Started,
        streams: Vec<StreamInfo>,
        closed_signal: ClosedSignal,
        generation: u64,
    ) -> Session {
        Session {
            conn: conn.clone(),
            api: Api::Portal(started),
            streams,
            generation,
            closed_signal: Mutex::new(closed_signal),
            closed: AtomicBool::new(false),
        }
    }
}

/// Waits for the `PipeWireStreamAdded` of each of `paths`; their node ids in that order.
fn wait_for_nodes(
    mut signals: zbus::MessageStream,
    paths: &[OwnedObjectPath],
    timeout: Duration,
) -> Result<Vec<u32>, MutterError> {
    let mut nodes: Vec<Option<u32>> = vec![None; paths.len()];
    let deadline = Instant::now() + timeout;
    async_io::block_on(async {
        let mut timer = async_io::Timer::at(deadline);
        while nodes.iter().any(Option::is_none) {
            let next = futures_util::future::select(signals.next(), &mut timer).await;
            let msg = match next {
                futures_util::future::Either::Left((Some(Ok(m)), _)) => m,
                futures_util::future::Either::Left((Some(Err(e)), _)) => {
                    return Err(MutterError::Bus(e.to_string()));
                }
                futures_util::future::Either::Left((None, _)) => {
                    return Err(MutterError::Bus("the connection closed".into()));
                }
                futures_util::future::Either::Right(_) => {
                    return Err(MutterError::NoStream(timeout));
                }
            };
            let header = msg.header();
            let Some(path) = header.path() else { continue };
            let Some(i) = paths.iter().position(|p| p.as_str() == path.as_str()) else {
                continue;
            };
            if let Ok(node) = msg.body().deserialize::<u32>() {
                nodes[i] = Some(node);
            }
        }
        Ok(nodes.into_iter().flatten().collect())
    })
}

/// What the screen and the input of one agent session share: the live session, replaced when
/// Mutter closed it for a monitor change.
pub(crate) struct Link {
    bus: Option<String>,
    flavor: Flavor,
    state: Mutex<LinkState>,
}

/// Which interfaces a [`Link`] starts its sessions with.
pub(crate) enum Flavor {
    Mutter,
    Portal(crate::portal::Options),
}

#[derive(Default)]
struct LinkState {
    conn: Option<Connection>,
    session: Option<Arc<Session>>,
    generation: u64,
    /// Ended on the desktop: never restarted.
    ended: bool,
}

impl Link {
    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn new(bus: Option<String>, flavor: Flavor) -> Link {
        Link {
            bus,
            flavor,
            state: Mutex::new(LinkState::default()),
        }
    }

    fn ended(&self) -> MutterError {
        match self.flavor {
            Flavor::Mutter => MutterError::Ended,
            Flavor::Portal(_) => MutterError::PortalEnded,
        }
    }

    /// The live session, started if there is none.
    fn session(&self) -> Result<Arc<Session>, MutterError> {
        let mut st = self.lock();
        if st.ended {
            return Err(self.ended());
        }
        if let Some(s) = &st.session {
            return Ok(s.clone());
        }
        self.start(&mut st)
    }

    fn start(&self, st: &mut LinkState) -> Result<Arc<Session>, MutterError> {
        let conn = match &st.conn {
            Some(c) => c.clone(),
            None => {
                let c = connect(self.bus.as_deref())?;
                st.conn = Some(c.clone());
                c
            }
        };
        st.generation += 1;
        let s = Arc::new(match &self.flavor {
            Flavor::Mutter => Session::start(&conn, st.generation)?,
            Flavor::Portal(o) => crate::portal::start(&conn, o, st.generation)?,
        });
        st.session = Some(s.clone());
        Ok(s)
    }

    /// Session `stale` ended: its replacement if the monitors changed (Mutter 43 closes a session
    /// whose monitor changed mode or position), [`MutterError::Ended`] if they did not (the user
    /// stopped it).
    fn renew(&self, stale: u64) -> Result<Arc<Session>, MutterError> {
        let mut st = self.lock();
        if st.ended {
            return Err(self.ended());
        }
        if let Some(s) = &st.session
            && s.generation != stale
        {
            return Ok(s.clone());
        }
        if matches!(self.flavor, Flavor::Portal(_)) {
            // A portal session is the user's choice in the desktop's dialog: never started again
            // behind their back (a new one would ask again anyway).
            tracing::info!("the portal's screen sharing session was closed");
            st.session = None;
            st.ended = true;
            return Err(MutterError::PortalEnded);
        }
        let old = st.session.take();
        let before = old.as_ref().map(|s| s.screens());
        drop(old);
        let conn = match &st.conn {
            Some(c) => c.clone(),
            None => connect(self.bus.as_deref())?,
        };
        let now = display_state(&conn)?;
        if before.is_some_and(|b| b == now) {
            tracing::info!("the GNOME remote desktop session was ended on the desktop");
            st.ended = true;
            return Err(MutterError::Ended);
        }
        tracing::info!("GNOME's monitors changed: starting a new remote desktop session");
        self.start(&mut st)
    }
}

// ---------------------------------------------------------------------------------------------
// PipeWire: the selected monitor's stream

/// Where a frame's pixels sit, per the negotiated format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// B, G, R, X in memory: as the pipeline wants.
    Bgrx,
    /// R, G, B, X in memory: red and blue swapped on the way in.
    Rgbx,
}

fn layout_of(f: VideoFormat) -> Option<Layout> {
    match f {
        VideoFormat::BGRx | VideoFormat::BGRA => Some(Layout::Bgrx),
        VideoFormat::RGBx | VideoFormat::RGBA => Some(Layout::Rgbx),
        _ => None,
    }
}

/// The cursor as the stream last described it.
#[derive(Debug, Default)]
struct CursorMirror {
    x: i32,
    y: i32,
    /// On this monitor and shown.
    visible: bool,
    /// The current image (`None`: none seen yet, or an empty one).
    shape: Option<CursorShape>,
    serial: u32,
}

/// What the PipeWire thread hands to the capturer.
struct Pw {
    /// The latest picture.
    mirror: Frame,
    detector: ChangeDetector,
    /// Changed tiles of `mirror` since the capturer last looked.
    damage: Vec<Rect>,
    /// Pictures received on the current connection.
    frames: u64,
    cursor: CursorMirror,
    /// Something changed since the capturer last looked.
    news: bool,
    /// The stream ended (or could not start), with why.
    gone: Option<String>,
    /// Which connection the thread serves (callbacks of an older one are ignored).
    connection: u64,
}

struct Shared {
    pw: Mutex<Pw>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pw> {
        self.pw.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn gone(&self, connection: u64, why: String) {
        let mut pw = self.lock();
        if pw.connection == connection && pw.gone.is_none() {
            tracing::debug!(why, "GNOME screen stream ended");
            pw.gone = Some(why);
            pw.news = true;
            self.cond.notify_all();
        }
    }
}

/// One buffer's cursor metadata.
#[derive(Debug, PartialEq, Eq)]
enum CursorMeta {
    /// Not on this monitor, or hidden.
    Hidden,
    Moved {
        x: i32,
        y: i32,
    },
    /// Moved, with a new image (`None`: an empty one).
    Shape {
        x: i32,
        y: i32,
        shape: Option<(u32, u32, u32, u32, Vec<u8>)>,
    },
}

/// Size of a cursor metadata block holding a `w`×`h` image (Mutter's `CURSOR_META_SIZE`).
const fn cursor_meta_size(w: usize, h: usize) -> usize {
    std::mem::size_of::<spa::sys::spa_meta_cursor>()
        + std::mem::size_of::<spa::sys::spa_meta_bitmap>()
        + w * h * 4
}

/// Converts a cursor image to premultiplied RGBA (Mutter sends premultiplied RGBA already).
fn cursor_rgba(
    format: VideoFormat,
    w: usize,
    h: usize,
    stride: usize,
    data: &[u8],
) -> Option<Vec<u8>> {
    // Byte positions of R, G, B, A in a source pixel.
    let order = match format {
        VideoFormat::RGBA => [0, 1, 2, 3],
        VideoFormat::BGRA => [2, 1, 0, 3],
        VideoFormat::ARGB => [1, 2, 3, 0],
        VideoFormat::ABGR => [3, 2, 1, 0],
        _ => return None,
    };
    if stride < w * 4 || data.len() < stride * (h - 1) + w * 4 {
        return None;
    }
    let mut out = Vec::with_capacity(w * h * 4);
    for row in data.chunks(stride).take(h) {
        for p in row[..w * 4].chunks_exact(4) {
            out.extend(order.map(|i| p[i]));
        }
    }
    Some(out)
}

fn read_cursor(c: &MetaCursor) -> CursorMeta {
    if c.id() == 0 {
        return CursorMeta::Hidden;
    }
    let (x, y) = (c.position().x, c.position().y);
    let offset = c.bitmap_offset() as usize;
    if offset == 0 {
        return CursorMeta::Moved { x, y };
    }
    // The block is exactly this large (a fixed size is asked for in `buffer_params`).
    let limit = cursor_meta_size(CURSOR_MAX, CURSOR_MAX);
    if offset + std::mem::size_of::<spa::sys::spa_meta_bitmap>() > limit
        || !offset.is_multiple_of(std::mem::align_of::<spa::sys::spa_meta_bitmap>())
    {
        return CursorMeta::Moved { x, y };
    }
    let Some(bm) = c.bitmap() else {
        return CursorMeta::Moved { x, y };
    };
    let (w, h) = (bm.size().width as usize, bm.size().height as usize);
    if w == 0 || h == 0 || !bm.is_valid() {
        return CursorMeta::Shape { x, y, shape: None };
    }
    let stride = bm.stride().unsigned_abs() as usize;
    if w > CURSOR_MAX
        || h > CURSOR_MAX
        || bm.stride() < 0
        || offset + bm.offset() as usize + stride * h > limit
    {
        return CursorMeta::Moved { x, y };
    }
    let Some(rgba) = bm
        .bitmap_data()
        .and_then(|d| cursor_rgba(bm.format(), w, h, stride, d))
    else {
        return CursorMeta::Moved { x, y };
    };
    let hot = c.hotspot();
    CursorMeta::Shape {
        x,
        y,
        shape: Some((
            w as u32,
            h as u32,
            (hot.x.max(0) as u32).min(w as u32 - 1),
            (hot.y.max(0) as u32).min(h as u32 - 1),
            rgba,
        )),
    }
}

impl Pw {
    /// Takes a cursor update; whether anything changed.
    fn cursor_update(&mut self, meta: CursorMeta) -> bool {
        let c = &mut self.cursor;
        let before = (c.x, c.y, c.visible, c.serial);
        match meta {
            CursorMeta::Hidden => c.visible = false,
            CursorMeta::Moved { x, y } => {
                (c.x, c.y) = (x, y);
                c.visible = c.shape.is_some();
            }
            CursorMeta::Shape { x, y, shape } => {
                (c.x, c.y) = (x, y);
                match shape {
                    None => c.visible = false,
                    Some((width, height, hot_x, hot_y, rgba)) => {
                        let same = c.shape.as_ref().is_some_and(|s| {
                            (s.width, s.height, s.hot_x, s.hot_y) == (width, height, hot_x, hot_y)
                                && s.rgba == rgba
                        });
                        if !same {
                            c.serial = c.serial.wrapping_add(1).max(1);
                            c.shape = Some(CursorShape {
                                serial: c.serial,
                                width,
                                height,
                                hot_x,
                                hot_y,
                                rgba,
                            });
                        }
                        c.visible = true;
                    }
                }
            }
        }
        before != (c.x, c.y, c.visible, c.serial)
    }

    /// Takes a picture (`data`: the buffer, rows `stride` bytes apart from `offset`), limited to
    /// `damage` when given.
    fn picture(
        &mut self,
        layout: Layout,
        data: &[u8],
        offset: usize,
        stride: usize,
        damage: Option<Vec<Rect>>,
        scratch: &mut Vec<u8>,
    ) {
        let (w, h) = (self.mirror.width, self.mirror.height);
        let full = Rect { x: 0, y: 0, w, h };
        let regions = match damage {
            Some(d) if !d.is_empty() && !self.detector.needs_full(w, h) => d,
            _ => vec![full],
        };
        let mut changed = Vec::new();
        for r in regions {
            let start = offset + r.y as usize * stride + r.x as usize * 4;
            let (src, src_stride) = match layout {
                Layout::Bgrx => (&data[start..], stride),
                Layout::Rgbx => {
                    let row = r.w as usize * 4;
                    scratch.clear();
                    for y in 0..r.h as usize {
                        let s = &data[start + y * stride..start + y * stride + row];
                        scratch.extend(s.chunks_exact(4).flat_map(|p| [p[2], p[1], p[0], p[3]]));
                    }
                    (&scratch[..], row)
                }
            };
            if self.detector.needs_full(w, h) {
                changed.extend(self.detector.update_from(src, src_stride, &mut self.mirror));
            } else {
                changed.extend(
                    self.detector
                        .update_region(src, src_stride, r, &mut self.mirror),
                );
            }
        }
        self.frames += 1;
        if !changed.is_empty() {
            self.damage.extend(changed);
            if self.damage.len() > MAX_DAMAGE_RECTS {
                let b = bounding_box(&self.damage);
                self.damage = vec![b];
            }
            self.news = true;
        }
    }
}

fn bounding_box(rects: &[Rect]) -> Rect {
    let x0 = rects.iter().map(|r| r.x).min().unwrap_or(0);
    let y0 = rects.iter().map(|r| r.y).min().unwrap_or(0);
    let x1 = rects.iter().map(|r| r.x + r.w).max().unwrap_or(0);
    let y1 = rects.iter().map(|r| r.y + r.h).max().unwrap_or(0);
    Rect {
        x: x0,
        y: y0,
        w: x1 - x0,
        h: y1 - y0,
    }
}

/// Damage rectangles clipped to a `w`×`h` frame.
fn clip(rects: impl Iterator<Item = (i32, i32, u32, u32)>, w: u32, h: u32) -> Vec<Rect> {
    rects
        .filter_map(|(x, y, rw, rh)| {
            let x0 = (x.max(0) as u32).min(w);
            let y0 = (y.max(0) as u32).min(h);
            let x1 = (x.saturating_add(rw.min(i32::MAX as u32) as i32).max(0) as u32).min(w);
            let y1 = (y.saturating_add(rh.min(i32::MAX as u32) as i32).max(0) as u32).min(h);
            (x1 > x0 && y1 > y0).then_some(Rect {
                x: x0,
                y: y0,
                w: x1 - x0,
                h: y1 - y0,
            })
        })
        .collect()
}

/// Messages to the PipeWire thread.
enum Cmd {
    /// Consume node `node` (a connection numbered `connection`), `size` expected.
    Connect {
        node: u32,
        size: (u32, u32),
        connection: u64,
    },
    Quit,
}

/// The thread that runs PipeWire's loop.
struct PwThread {
    tx: pw::channel::Sender<Cmd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for PwThread {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Quit);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A stream's own state, in its callbacks.
struct Local {
    shared: Arc<Shared>,
    connection: u64,
    format: Option<Layout>,
    scratch: Vec<u8>,
    streamed: bool,
}

fn pod(obj: Object) -> Result<Vec<u8>, String> {
    spa::pod::serialize::PodSerializer::serialize(
        std::io::Cursor::new(Vec::new()),
        &Value::Object(obj),
    )
    .map(|(c, _)| c.into_inner())
    .map_err(|e| format!("cannot describe the stream's format: {e:?}"))
}

fn prop(key: u32, value: Value) -> Property {
    Property {
        key,
        flags: PropertyFlags::empty(),
        value,
    }
}

/// The formats asked of Mutter: raw BGRx/BGRA/RGBx/RGBA of any size, no modifier (so shared
/// memory, never DMA-BUF), at most [`MAX_FPS`].
fn format_param(size: (u32, u32)) -> Result<Vec<u8>, String> {
    use spa::param::format::{FormatProperties, MediaSubtype, MediaType};
    use spa::utils::{Choice, ChoiceEnum, ChoiceFlags, Fraction, Id, Rectangle};
    let id = |v: u32| Id(v);
    pod(Object {
        type_: spa::utils::SpaTypes::ObjectParamFormat.as_raw(),
        id: spa::param::ParamType::EnumFormat.as_raw(),
        properties: vec![
            prop(
                FormatProperties::MediaType.as_raw(),
                Value::Id(id(MediaType::Video.as_raw())),
            ),
            prop(
                FormatProperties::MediaSubtype.as_raw(),
                Value::Id(id(MediaSubtype::Raw.as_raw())),
            ),
            prop(
                FormatProperties::VideoFormat.as_raw(),
                Value::Choice(spa::pod::ChoiceValue::Id(Choice(
                    ChoiceFlags::empty(),
                    ChoiceEnum::Enum {
                        default: id(VideoFormat::BGRx.as_raw()),
                        alternatives: [
                            VideoFormat::BGRx,
                            VideoFormat::BGRA,
                            VideoFormat::RGBx,
                            VideoFormat::RGBA,
                        ]
                        .iter()
                        .map(|f| id(f.as_raw()))
                        .collect(),
                    },
                ))),
            ),
            prop(
                FormatProperties::VideoSize.as_raw(),
                Value::Choice(spa::pod::ChoiceValue::Rectangle(Choice(
                    ChoiceFlags::empty(),
                    ChoiceEnum::Range {
                        default: Rectangle {
                            width: size.0.max(1),
                            height: size.1.max(1),
                        },
                        min: Rectangle {
                            width: 1,
                            height: 1,
                        },
                        max: Rectangle {
                            width: 16384,
                            height: 16384,
                        },
                    },
                ))),
            ),
            prop(
                FormatProperties::VideoFramerate.as_raw(),
                Value::Choice(spa::pod::ChoiceValue::Fraction(Choice(
                    ChoiceFlags::empty(),
                    ChoiceEnum::Range {
                        default: Fraction { num: 0, denom: 1 },
                        min: Fraction { num: 0, denom: 1 },
                        max: Fraction {
                            num: 1000,
                            denom: 1,
                        },
                    },
                ))),
            ),
            prop(
                FormatProperties::VideoMaxFramerate.as_raw(),
                Value::Choice(spa::pod::ChoiceValue::Fraction(Choice(
                    ChoiceFlags::empty(),
                    ChoiceEnum::Range {
                        default: Fraction {
                            num: MAX_FPS,
                            denom: 1,
                        },
                        min: Fraction { num: 1, denom: 1 },
                        max: Fraction {
                            num: MAX_FPS,
                            denom: 1,
                        },
                    },
                ))),
            ),
        ],
    })
}

/// Buffers in shared memory, and the metadata wanted with them.
fn buffer_params() -> Result<Vec<Vec<u8>>, String> {
    use spa::utils::{Choice, ChoiceEnum, ChoiceFlags, Id};
    let sys = spa::sys::SPA_DATA_MemFd;
    let data_types = (1i32 << sys) | (1i32 << spa::sys::SPA_DATA_MemPtr);
    let meta = |ty: u32, size: Value| {
        pod(Object {
            type_: spa::utils::SpaTypes::ObjectParamMeta.as_raw(),
            id: spa::param::ParamType::Meta.as_raw(),
            properties: vec![
                prop(spa::sys::SPA_PARAM_META_type, Value::Id(Id(ty))),
                prop(spa::sys::SPA_PARAM_META_size, size),
            ],
        })
    };
    let region = std::mem::size_of::<spa::sys::spa_meta_region>() as i32;
    let range = |default: i32, min: i32, max: i32| {
        Value::Choice(spa::pod::ChoiceValue::Int(Choice(
            ChoiceFlags::empty(),
            ChoiceEnum::Range { default, min, max },
        )))
    };
    Ok(vec![
        pod(Object {
            type_: spa::utils::SpaTypes::ObjectParamBuffers.as_raw(),
            id: spa::param::ParamType::Buffers.as_raw(),
            properties: vec![prop(
                spa::sys::SPA_PARAM_BUFFERS_dataType,
                Value::Choice(spa::pod::ChoiceValue::Int(Choice(
                    ChoiceFlags::empty(),
                    ChoiceEnum::Flags {
                        default: data_types,
                        flags: Vec::new(),
                    },
                ))),
            )],
        })?,
        meta(
            spa::sys::SPA_META_Header,
            Value::Int(std::mem::size_of::<spa::sys::spa_meta_header>() as i32),
        )?,
        // A fixed size, not a range: the metadata block is then exactly this large, which is
        // what `read_cursor` checks the compositor's offsets against (PipeWire's API does not
        // tell the consumer the negotiated size). Mutter and KWin offer ranges that include it.
        meta(
            spa::sys::SPA_META_Cursor,
            Value::Int(cursor_meta_size(CURSOR_MAX, CURSOR_MAX) as i32),
        )?,
        meta(
            spa::sys::SPA_META_VideoDamage,
            range(region * 16, region, region * 16),
        )?,
    ])
}

fn pods(bytes: &[Vec<u8>]) -> Vec<&Pod> {
    bytes.iter().filter_map(|b| Pod::from_bytes(b)).collect()
}

/// The stream's `param_changed`: a new format (first, or after Mutter renegotiated).
fn on_format(stream: &pw::stream::Stream, local: &mut Local, param: &Pod) {
    let mut info = VideoInfoRaw::new();
    if info.parse(param).is_err() {
        return;
    }
    let Some(layout) = layout_of(info.format()) else {
        local.shared.gone(
            local.connection,
            format!(
                "GNOME offers the screen only in pixel format {:?}",
                info.format()
            ),
        );
        return;
    };
    let (w, h) = (info.size().width, info.size().height);
    if w == 0 || h == 0 || w > 16384 || h > 16384 {
        local.shared.gone(
            local.connection,
            format!("GNOME described an impossible picture ({w}×{h})"),
        );
        return;
    }
    local.format = Some(layout);
    {
        let mut pw = local.shared.lock();
        if pw.connection != local.connection {
            return;
        }
        if (pw.mirror.width, pw.mirror.height) != (w, h) {
            pw.mirror = Frame::new(w, h);
            pw.detector.reset();
            pw.damage.clear();
            pw.news = true;
        }
    }
    match buffer_params() {
        Ok(params) => {
            if let Err(e) = stream.update_params(&mut pods(&params)) {
                tracing::warn!(error = %e, "PipeWire: cannot ask for shared-memory buffers");
            }
        }
        Err(e) => tracing::warn!(error = e, "PipeWire"),
    }
}

/// The stream's `process`: takes every waiting buffer.
fn on_process(stream: &pw::stream::Stream, local: &mut Local) {
    while let Some(mut buffer) = stream.dequeue_buffer() {
        let cursor = buffer.find_meta::<MetaCursor>().map(read_cursor);
        let corrupted = buffer
            .find_meta::<MetaHeader>()
            .is_some_and(|h| h.flags().contains(MetaHeaderFlags::CORRUPTED));
        let damage: Option<Vec<(i32, i32, u32, u32)>> =
            buffer.find_meta::<MetaVideoDamage>().map(|d| {
                d.iter()
                    .map(|r| {
                        (
                            r.position().x,
                            r.position().y,
                            r.size().width,
                            r.size().height,
                        )
                    })
                    .collect()
            });
        let Local {
            shared,
            connection,
            format,
            scratch,
            ..
        } = local;
        let mut pw = shared.lock();
        if pw.connection != *connection {
            return;
        }
        if let Some(c) = cursor
            && pw.cursor_update(c)
        {
            pw.news = true;
        }
        let Some(layout) = *format else { continue };
        if corrupted {
            continue;
        }
        let Some(d) = buffer.datas_mut().first_mut() else {
            continue;
        };
        let chunk = d.chunk();
        let (size, offset, chunk_stride) = (
            chunk.size() as usize,
            chunk.offset() as usize,
            chunk.stride(),
        );
        // Mutter sends cursor-only updates as empty, "corrupted" chunks.
        if size == 0 || chunk.flags().contains(spa::buffer::ChunkFlags::CORRUPTED) {
            continue;
        }
        let (w, h) = (pw.mirror.width, pw.mirror.height);
        let stride = if chunk_stride > 0 {
            chunk_stride as usize
        } else {
            w as usize * 4
        };
        let Some(data) = d.data() else { continue };
        let need = offset + stride * (h as usize - 1) + w as usize * 4;
        if stride < w as usize * 4 || data.len() < need || offset + size < need {
            tracing::debug!(
                len = data.len(),
                offset,
                stride,
                size,
                "PipeWire buffer too small for the picture"
            );
            continue;
        }
        let damage = damage.map(|d| clip(d.into_iter(), w, h));
        pw.picture(layout, data, offset, stride, damage, scratch);
        drop(pw);
        shared.cond.notify_all();
    }
    local.shared.cond.notify_all();
}

/// Where the PipeWire daemon is.
enum Remote {
    /// `$PIPEWIRE_REMOTE`, `$XDG_RUNTIME_DIR/pipewire-0`.
    Default,
    Socket(PathBuf),
    /// A connection the portal opened (it shows only the session's streams).
    Fd(OwnedFd),
}

/// The PipeWire thread: connects to the daemon, then consumes the node it is told to.
fn pw_main(
    remote: Remote,
    rx: pw::channel::Receiver<Cmd>,
    shared: Arc<Shared>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let fail = |e: String| {
        let _ = ready.send(Err(e));
    };
    pw::init();
    let mainloop = match pw::main_loop::MainLoopRc::new(None) {
        Ok(m) => m,
        Err(e) => return fail(format!("cannot start PipeWire's loop: {e}")),
    };
    let context = match pw::context::ContextRc::new(&mainloop, None) {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start PipeWire: {e}")),
    };
    let core = match remote {
        Remote::Fd(fd) => context.connect_fd_rc(fd, None),
        Remote::Socket(path) => match UnixStream::connect(&path) {
            Ok(s) => context.connect_fd_rc(OwnedFd::from(s), None),
            Err(e) => {
                return fail(format!(
                    "cannot connect to the PipeWire daemon at {}: {e}",
                    path.display()
                ));
            }
        },
        Remote::Default => context.connect_rc(None),
    };
    let core = match core {
        Ok(c) => c,
        Err(e) => {
            return fail(format!(
                "cannot connect to the PipeWire daemon of the session (is pipewire running?): {e}"
            ));
        }
    };
    let core_shared = shared.clone();
    let _core_listener = core
        .add_listener_local()
        .error(move |id, _seq, res, message| {
            // Errors of the core object (id 0) end the connection.
            if id == 0 {
                let c = core_shared.lock().connection;
                core_shared.gone(c, format!("PipeWire: {message} ({res})"));
            }
        })
        .register();
    type Current = Option<(pw::stream::StreamRc, pw::stream::StreamListener<Local>)>;
    let current: std::rc::Rc<std::cell::RefCell<Current>> = Default::default();
    let ml = mainloop.clone();
    let cmd_current = current.clone();
    let cmd_core = core.clone();
    let _receiver = rx.attach(mainloop.loop_(), move |cmd| match cmd {
        Cmd::Quit => {
            cmd_current.borrow_mut().take();
            ml.quit();
        }
        Cmd::Connect {
            node,
            size,
            connection,
        } => {
            // The old stream first: its callbacks stop with its listener.
            cmd_current.borrow_mut().take();
            match connect_stream(&cmd_core, &shared, node, size, connection) {
                Ok(s) => *cmd_current.borrow_mut() = Some(s),
                Err(e) => shared.gone(connection, e),
            }
        }
    });
    let _ = ready.send(Ok(()));
    mainloop.run();
    current.borrow_mut().take();
}

fn connect_stream(
    core: &pw::core::CoreRc,
    shared: &Arc<Shared>,
    node: u32,
    size: (u32, u32),
    connection: u64,
) -> Result<(pw::stream::StreamRc, pw::stream::StreamListener<Local>), String> {
    let props = pw::properties::properties! {
        *pw::keys::MEDIA_TYPE => "Video",
        *pw::keys::MEDIA_CATEGORY => "Capture",
        *pw::keys::MEDIA_ROLE => "Screen",
    };
    let stream = pw::stream::StreamRc::new(core.clone(), "tandem-screen", props)
        .map_err(|e| format!("cannot create a PipeWire stream: {e}"))?;
    let local = Local {
        shared: shared.clone(),
        connection,
        format: None,
        scratch: Vec::new(),
        streamed: false,
    };
    let listener = stream
        .add_local_listener_with_user_data(local)
        .state_changed(|_, local, _old, new| {
            tracing::debug!(state = ?new, "GNOME screen stream");
            match new {
                pw::stream::StreamState::Error(e) => local
                    .shared
                    .gone(local.connection, format!("the screen stream failed: {e}")),
                pw::stream::StreamState::Streaming => local.streamed = true,
                pw::stream::StreamState::Unconnected if local.streamed => local
                    .shared
                    .gone(local.connection, "the screen stream was closed".into()),
                _ => {}
            }
        })
        .param_changed(|stream, local, id, param| {
            if id == spa::param::ParamType::Format.as_raw()
                && let Some(p) = param
            {
                on_format(stream, local, p);
            }
        })
        .process(on_process)
        .register()
        .map_err(|e| format!("cannot listen to the PipeWire stream: {e}"))?;
    let format = format_param(size)?;
    stream
        .connect(
            spa::utils::Direction::Input,
            Some(node),
            pw::stream::StreamFlags::AUTOCONNECT
                | pw::stream::StreamFlags::MAP_BUFFERS
                | pw::stream::StreamFlags::DONT_RECONNECT,
            &mut pods(&[format]),
        )
        .map_err(|e| format!("cannot connect to GNOME's screen stream (node {node}): {e}"))?;
    Ok((stream, listener))
}

// ---------------------------------------------------------------------------------------------
// Screen

/// The screen of a GNOME session, one monitor at a time.
pub struct MutterCapturer {
    link: Arc<Link>,
    session: Arc<Session>,
    selected: usize,
    shared: Arc<Shared>,
    thread: PwThread,
    connection: u64,
    frame: Frame,
    /// Whether `frame` holds a picture of the current stream.
    has_picture: bool,
    full: bool,
    resized: bool,
    cursor_sent: u32,
    /// When the current stream was connected, and how often it was connected again for want of
    /// a first picture (see [`FIRST_FRAME_RETRIES`]).
    connected_at: Instant,
    first_frame_retries: u32,
}

impl MutterCapturer {
    pub(crate) fn open(
        link: Arc<Link>,
        pipewire: Option<PathBuf>,
    ) -> Result<MutterCapturer, MutterError> {
        let session = link.session()?;
        let remote = match (&session.api, pipewire) {
            (Api::Portal(p), _) => Remote::Fd(p.pipewire_remote()?),
            (Api::Mutter { .. }, Some(path)) => Remote::Socket(path),
            (Api::Mutter { .. }, None) => Remote::Default,
        };
        let shared = Arc::new(Shared {
            pw: Mutex::new(Pw {
                mirror: Frame::new(1, 1),
                detector: ChangeDetector::new(),
                damage: Vec::new(),
                frames: 0,
                cursor: CursorMirror::default(),
                news: false,
                gone: None,
                connection: 0,
            }),
            cond: Condvar::new(),
        });
        let (tx, rx) = pw::channel::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tandem-pipewire".into())
            .spawn(move || pw_main(remote, rx, thread_shared, ready_tx))
            .map_err(|e| MutterError::PipeWire(format!("cannot start a thread: {e}")))?;
        let thread = PwThread {
            tx,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(MutterError::PipeWire(e)),
            Err(_) => {
                return Err(MutterError::PipeWire(
                    "PipeWire did not answer within 10 s".into(),
                ));
            }
        }
        let mut c = MutterCapturer {
            link,
            session,
            selected: 0,
            shared,
            thread,
            connection: 0,
            frame: Frame::new(1, 1),
            has_picture: false,
            full: true,
            resized: false,
            cursor_sent: 0,
            connected_at: Instant::now(),
            first_frame_retries: 0,
        };
        c.connect()?;
        Ok(c)
    }

    fn stream(&self) -> Option<&StreamInfo> {
        self.session.streams.get(self.selected)
    }

    /// Consumes the selected monitor's node and waits (bounded) for its first picture.
    fn connect(&mut self) -> Result<(), MutterError> {
        let Some(s) = self.stream() else {
            return Err(MutterError::NoMonitor);
        };
        let (node, size) = (s.node, (s.screen.width, s.screen.height));
        self.connection += 1;
        {
            let mut pw = self.shared.lock();
            pw.connection = self.connection;
            pw.gone = None;
            pw.frames = 0;
            pw.damage.clear();
            pw.detector.reset();
            pw.cursor.visible = false;
            pw.news = false;
        }
        self.thread
            .tx
            .send(Cmd::Connect {
                node,
                size,
                connection: self.connection,
            })
            .map_err(|_| MutterError::PipeWire("the PipeWire thread ended".into()))?;
        self.has_picture = false;
        self.full = true;
        self.connected_at = Instant::now();
        let deadline = self.connected_at + FIRST_FRAME_TIMEOUT;
        let mut pw = self.shared.lock();
        while pw.frames == 0 && pw.gone.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!("no picture from GNOME's screen stream yet");
                break;
            }
            pw = self
                .shared
                .cond
                .wait_timeout(pw, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        // A failure stays in `gone`: the next capture tries again.
        match &pw.gone {
            Some(why) => Err(MutterError::PipeWire(why.clone())),
            None => Ok(()),
        }
    }

    /// After the stream ended: a new session if Mutter closed this one for a monitor change, the
    /// same stream again if only PipeWire failed.
    fn recover(&mut self, why: &str) -> Result<(), MutterError> {
        tracing::info!(why, "GNOME screen stream ended");
        if !self.session.wait_closed(Duration::from_secs(1)) {
            tracing::warn!(why, "GNOME's screen stream failed: connecting again");
            return self.connect();
        }
        let connector = self.stream().map(|s| s.screen.connector.clone());
        self.session = self.link.renew(self.session.generation)?;
        self.selected = self
            .session
            .streams
            .iter()
            .position(|s| Some(&s.screen.connector) == connector.as_ref())
            .unwrap_or(0);
        self.resized = true;
        self.connect()
    }
}

impl Capturer for MutterCapturer {
    fn monitors(&self) -> Vec<Monitor> {
        self.session
            .streams
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (width, height) = if i == self.selected && self.has_picture {
                    (self.frame.width, self.frame.height)
                } else {
                    (s.screen.width, s.screen.height)
                };
                Monitor {
                    name: s.screen.connector.clone(),
                    x: s.screen.x.max(0) as u32,
                    y: s.screen.y.max(0) as u32,
                    width,
                    height,
                    primary: s.screen.primary,
                }
            })
            .collect()
    }

    fn size(&self) -> (u32, u32) {
        if self.has_picture {
            return (self.frame.width, self.frame.height);
        }
        self.stream()
            .map_or((0, 0), |s| (s.screen.width, s.screen.height))
    }

    fn select(&mut self, index: usize) -> Result<(), CaptureError> {
        if index >= self.session.streams.len() {
            return Err(CaptureError::NoSuchMonitor(index));
        }
        if index != self.selected {
            self.selected = index;
            self.resized = true;
            self.first_frame_retries = 0;
            self.connect()?;
        }
        self.full = true;
        Ok(())
    }

    fn request_full(&mut self) {
        self.full = true;
    }

    fn capture(&mut self) -> Result<Captured<'_>, CaptureError> {
        let (gone, no_picture) = {
            let pw = self.shared.lock();
            (pw.gone.clone(), pw.frames == 0)
        };
        if let Some(why) = gone {
            self.first_frame_retries = 0;
            self.recover(&why)?;
        } else if self.session.is_closed() {
            self.first_frame_retries = 0;
            self.recover("GNOME closed the remote desktop session")?;
        } else if no_picture
            && self.first_frame_retries < FIRST_FRAME_RETRIES
            && self.connected_at.elapsed() >= FIRST_FRAME_TIMEOUT
        {
            self.first_frame_retries += 1;
            tracing::warn!(
                attempt = self.first_frame_retries,
                "no picture from GNOME's screen stream: connecting it again"
            );
            self.connect()?;
        }
        let mut damage = Vec::new();
        let mut pw = self.shared.lock();
        pw.news = false;
        if pw.frames > 0 {
            let (w, h) = (pw.mirror.width, pw.mirror.height);
            if (self.frame.width, self.frame.height) != (w, h) {
                self.resized |= self.has_picture;
                self.frame = Frame::new(w, h);
                self.frame.data.copy_from_slice(&pw.mirror.data);
                pw.damage.clear();
                self.has_picture = true;
                self.full = true;
            } else {
                let rects = std::mem::take(&mut pw.damage);
                let row = |r: &Rect| (r.x as usize * 4, (r.x + r.w) as usize * 4);
                for r in &rects {
                    let (a, b) = row(r);
                    for y in r.y..r.y + r.h {
                        let s = y as usize * w as usize * 4;
                        self.frame.data[s + a..s + b]
                            .copy_from_slice(&pw.mirror.data[s + a..s + b]);
                    }
                }
                if !self.has_picture {
                    self.full = true;
                }
                self.has_picture = true;
                damage = rects;
            }
        }
        let c = &pw.cursor;
        let inside = c.x >= 0
            && c.y >= 0
            && (c.x as u32) < self.frame.width
            && (c.y as u32) < self.frame.height;
        let shape = c
            .shape
            .as_ref()
            .filter(|s| s.serial != self.cursor_sent)
            .cloned();
        let cursor = CursorState {
            x: c.x,
            y: c.y,
            visible: c.visible && inside,
            shape,
        };
        drop(pw);
        if let Some(s) = &cursor.shape {
            self.cursor_sent = s.serial;
        }
        if self.full && self.has_picture {
            self.full = false;
            damage = vec![Rect {
                x: 0,
                y: 0,
                w: self.frame.width,
                h: self.frame.height,
            }];
        }
        Ok(Captured {
            frame: &self.frame,
            damage,
            cursor,
            resized: std::mem::take(&mut self.resized),
        })
    }

    fn wait_for_change(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut pw = self.shared.lock();
        while !pw.news {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            pw = self
                .shared
                .cond
                .wait_timeout(pw, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

// ---------------------------------------------------------------------------------------------
// Input

/// Input into a GNOME session through its remote desktop session.
pub struct MutterInjector {
    link: Arc<Link>,
    session: Arc<Session>,
    /// Pressed and not yet released, to release when closed: evdev key codes, button codes.
    keys: Vec<u32>,
    buttons: Vec<i32>,
}

pub(crate) fn evdev_button(b: MouseButton) -> i32 {
    match b {
        MouseButton::Left => 0x110,
        MouseButton::Right => 0x111,
        MouseButton::Middle => 0x112,
        MouseButton::Back => 0x113,
        MouseButton::Forward => 0x114,
    }
}

/// The keysym a character types.
fn char_keysym(c: char) -> xkb::Keysym {
    match c {
        '\n' | '\r' => xkb::Keysym::Return,
        '\t' => xkb::Keysym::Tab,
        '\u{8}' => xkb::Keysym::BackSpace,
        '\u{1b}' => xkb::Keysym::Escape,
        _ => xkb::utf32_to_keysym(c as u32),
    }
}

/// The stream a layout position falls on and the position in it; off every monitor, the nearest
/// monitor's nearest pixel.
pub(crate) fn locate(streams: &[StreamInfo], x: i32, y: i32) -> Option<(&StreamInfo, f64, f64)> {
    streams
        .iter()
        .filter(|s| s.screen.width > 0 && s.screen.height > 0)
        .map(|s| {
            let r = &s.screen;
            let cx = x.clamp(r.x, r.x + r.width as i32 - 1);
            let cy = y.clamp(r.y, r.y + r.height as i32 - 1);
            let d = (x - cx).unsigned_abs() as u64 + (y - cy).unsigned_abs() as u64;
            (d, s, cx - r.x, cy - r.y)
        })
        .min_by_key(|(d, ..)| *d)
        .map(|(_, s, px, py)| (s, px as f64, py as f64))
}

/// The bounding box of the monitors.
fn bounds(streams: &[StreamInfo]) -> DisplayRect {
    let rects: Vec<Rect> = streams
        .iter()
        .map(|s| Rect {
            x: s.screen.x.max(0) as u32,
            y: s.screen.y.max(0) as u32,
            w: s.screen.width,
            h: s.screen.height,
        })
        .filter(|r| r.w > 0 && r.h > 0)
        .collect();
    if rects.is_empty() {
        return DisplayRect {
            x: 0,
            y: 0,
            width: 1,
            height: 1,
        };
    }
    let b = bounding_box(&rects);
    DisplayRect {
        x: b.x as i32,
        y: b.y as i32,
        width: b.w,
        height: b.h,
    }
}

/// One call to the remote desktop session.
pub(crate) enum Call {
    Motion(i32, i32),
    Button(i32, bool),
    Axis(u32, i32),
    Keycode(u32, bool),
    Keysym(u32, bool),
}

impl MutterInjector {
    pub(crate) fn open(link: Arc<Link>) -> Result<MutterInjector, MutterError> {
        let session = link.session()?;
        if let Api::Portal(p) = &session.api {
            p.check_input()?;
        }
        Ok(MutterInjector {
            link,
            session,
            keys: Vec::new(),
            buttons: Vec::new(),
        })
    }

    /// Sends `call`; once again on a new session if Mutter replaced it (a monitor change).
    fn call(&mut self, call: Call) -> Result<(), InjectError> {
        if self.session.is_closed() {
            self.session = self.link.renew(self.session.generation)?;
        }
        let refused = |e: SendError| match e {
            SendError::Gone => InjectError::Inject("the remote desktop session is gone".into()),
            SendError::Refused(e) => {
                InjectError::Inject(format!("the desktop refused the input: {e}"))
            }
        };
        match self.session.input(&call) {
            Ok(()) => Ok(()),
            Err(SendError::Gone) if self.session.wait_closed(Duration::from_secs(1)) => {
                self.session = self.link.renew(self.session.generation)?;
                self.session.input(&call).map_err(refused)
            }
            Err(e) => Err(refused(e)),
        }
    }
}

impl Injector for MutterInjector {
    fn apply(&mut self, a: &Action) -> Result<(), InjectError> {
        match a {
            Action::MoveTo { x, y } => self.call(Call::Motion(*x, *y)),
            Action::Button { button, pressed } => {
                let b = evdev_button(*button);
                self.buttons.retain(|&p| p != b);
                if *pressed {
                    self.buttons.push(b);
                }
                self.call(Call::Button(b, *pressed))
            }
            Action::Scroll { axis, clicks } => {
                if *clicks == 0 {
                    return Ok(());
                }
                let axis = match axis {
                    ScrollAxis::Vertical => 0,
                    ScrollAxis::Horizontal => 1,
                };
                self.call(Call::Axis(axis, *clicks))
            }
            Action::Key { keycode, pressed } => {
                // X keycodes are evdev codes + 8.
                let Some(code) = u32::from(*keycode).checked_sub(8) else {
                    return Ok(());
                };
                self.keys.retain(|&k| k != code);
                if *pressed {
                    self.keys.push(code);
                }
                self.call(Call::Keycode(code, *pressed))
            }
            Action::Text(text) => {
                for c in text.chars() {
                    let k = char_keysym(c).raw();
                    if k == 0 {
                        continue;
                    }
                    self.call(Call::Keysym(k, true))?;
                    self.call(Call::Keysym(k, false))?;
                }
                Ok(())
            }
        }
    }

    fn screen(&self) -> Result<DisplayRect, InjectError> {
        Ok(bounds(&self.session.streams))
    }
}

impl Drop for MutterInjector {
    fn drop(&mut self) {
        // Nothing stays pressed after the technician is gone (the session may live on for the
        // screen).
        for k in std::mem::take(&mut self.keys) {
            let _ = self.session.input(&Call::Keycode(k, false));
        }
        for b in std::mem::take(&mut self.buttons) {
            let _ = self.session.input(&Call::Button(b, false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(w: i32, h: i32, current: bool) -> ModeInfo {
        let mut props = HashMap::new();
        props.insert("is-current".to_string(), OwnedValue::from(current));
        (format!("{w}x{h}@60"), w, h, 60.0, 1.0, vec![1.0], props)
    }

    fn spec(c: &str) -> MonitorSpec {
        (c.into(), "v".into(), "p".into(), "s".into())
    }

    #[test]
    fn monitors_come_from_the_display_state_primary_first() {
        let state: DisplayState = (
            1,
            vec![
                (
                    spec("DP-1"),
                    vec![mode(1920, 1080, false), mode(2560, 1440, true)],
                    HashMap::new(),
                ),
                (spec("eDP-1"), vec![mode(1280, 800, true)], HashMap::new()),
                (spec("HDMI-1"), vec![mode(1024, 768, true)], HashMap::new()),
            ],
            vec![
                (0, 0, 1.0, 0, false, vec![spec("DP-1")], HashMap::new()),
                (2560, 0, 1.0, 0, true, vec![spec("eDP-1")], HashMap::new()),
                // Turned by 90°.
                (3840, 0, 1.0, 1, false, vec![spec("HDMI-1")], HashMap::new()),
            ],
            HashMap::new(),
        );
        let s = screens_of(&state);
        let names: Vec<_> = s.iter().map(|s| s.connector.as_str()).collect();
        assert_eq!(names, ["eDP-1", "DP-1", "HDMI-1"]);
        assert_eq!((s[1].width, s[1].height), (2560, 1440));
        assert_eq!((s[0].x, s[0].primary), (2560, true));
        assert_eq!((s[2].width, s[2].height), (768, 1024));
    }

    fn stream(c: &str, x: i32, y: i32, w: u32, h: u32) -> StreamInfo {
        StreamInfo {
            screen: Screen {
                connector: c.into(),
                x,
                y,
                width: w,
                height: h,
                primary: false,
            },
            path: OwnedObjectPath::try_from("/s").unwrap(),
            node: 1,
        }
    }

    #[test]
    fn positions_map_to_the_monitor_under_them() {
        let s = [
            stream("A", 0, 0, 1920, 1080),
            stream("B", 1920, 0, 1280, 1024),
        ];
        let (m, x, y) = locate(&s, 2000, 50).unwrap();
        assert_eq!((m.screen.connector.as_str(), x, y), ("B", 80.0, 50.0));
        let (m, x, y) = locate(&s, 10, 20).unwrap();
        assert_eq!((m.screen.connector.as_str(), x, y), ("A", 10.0, 20.0));
        // Below B's bottom edge but beside A: A's pixel is nearer? No: B is nearer (on its column).
        let (m, _, y) = locate(&s, 2000, 1050).unwrap();
        assert_eq!((m.screen.connector.as_str(), y), ("B", 1023.0));
        // Far off everything: clamped.
        let (m, x, y) = locate(&s, -50, 5000).unwrap();
        assert_eq!((m.screen.connector.as_str(), x, y), ("A", 0.0, 1079.0));
        assert!(locate(&[], 0, 0).is_none());
        let b = bounds(&s);
        assert_eq!((b.x, b.y, b.width, b.height), (0, 0, 3200, 1080));
    }

    #[test]
    fn cursor_images_become_premultiplied_rgba() {
        // 2×1, stride 12 (padding).
        let data = [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0];
        assert_eq!(
            cursor_rgba(VideoFormat::RGBA, 2, 1, 12, &data).unwrap(),
            [1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(
            cursor_rgba(VideoFormat::BGRA, 2, 1, 12, &data).unwrap(),
            [3, 2, 1, 4, 7, 6, 5, 8]
        );
        assert_eq!(
            cursor_rgba(VideoFormat::ARGB, 1, 1, 4, &data).unwrap(),
            [2, 3, 4, 1]
        );
        assert!(cursor_rgba(VideoFormat::RGBA, 4, 1, 16, &data).is_none());
        assert!(cursor_rgba(VideoFormat::RGBA, 2, 1, 4, &data).is_none());
        assert!(cursor_rgba(VideoFormat::NV12, 1, 1, 4, &data).is_none());
    }

    fn pw(w: u32, h: u32) -> Pw {
        Pw {
            mirror: Frame::new(w, h),
            detector: ChangeDetector::new(),
            damage: Vec::new(),
            frames: 0,
            cursor: CursorMirror::default(),
            news: false,
            gone: None,
            connection: 0,
        }
    }

    #[test]
    fn cursor_serials_change_with_the_image_only() {
        let mut p = pw(8, 8);
        let img = |v: u8| Some((2, 2, 1, 1, vec![v; 16]));
        assert!(p.cursor_update(CursorMeta::Shape {
            x: 3,
            y: 4,
            shape: img(9)
        }));
        let first = p.cursor.serial;
        assert!(p.cursor.visible);
        assert!(p.cursor_update(CursorMeta::Moved { x: 5, y: 4 }));
        assert!(!p.cursor_update(CursorMeta::Moved { x: 5, y: 4 }));
        // The same image again (a new stream): same serial, nothing new.
        assert!(!p.cursor_update(CursorMeta::Shape {
            x: 5,
            y: 4,
            shape: img(9)
        }));
        assert!(p.cursor_update(CursorMeta::Shape {
            x: 5,
            y: 4,
            shape: img(7)
        }));
        assert_ne!(p.cursor.serial, first);
        assert!(p.cursor_update(CursorMeta::Hidden));
        assert!(!p.cursor.visible);
        assert!(
            p.cursor_update(CursorMeta::Shape {
                x: 5,
                y: 4,
                shape: None
            }) || !p.cursor.visible
        );
    }

    #[test]
    fn pictures_report_changed_tiles_and_swap_rgbx() {
        let (w, h) = (130, 70);
        let mut p = pw(w, h);
        let mut scratch = Vec::new();
        let stride = w as usize * 4 + 8;
        let mut buf = vec![0u8; 16 + stride * h as usize];
        p.picture(Layout::Bgrx, &buf, 16, stride, None, &mut scratch);
        assert_eq!(p.damage, vec![Rect { x: 0, y: 0, w, h }]);
        p.damage.clear();
        // Unchanged: nothing.
        p.picture(Layout::Bgrx, &buf, 16, stride, None, &mut scratch);
        assert!(p.damage.is_empty());
        // One pixel in the second tile column, given as RGBx.
        let i = 16 + 5 * stride + 70 * 4;
        buf[i..i + 4].copy_from_slice(&[10, 20, 30, 0]);
        p.picture(Layout::Rgbx, &buf, 16, stride, None, &mut scratch);
        assert_eq!(
            p.damage,
            vec![Rect {
                x: 64,
                y: 0,
                w: 64,
                h: 64
            }]
        );
        assert_eq!(p.mirror.pixel(70, 5), (30, 20, 10));
        // Damage metadata limits what is read.
        p.damage.clear();
        let i = 16 + 60 * stride + 2 * 4;
        buf[i] = 99;
        let outside = vec![Rect {
            x: 100,
            y: 0,
            w: 30,
            h: 10,
        }];
        p.picture(Layout::Bgrx, &buf, 16, stride, Some(outside), &mut scratch);
        assert!(p.damage.is_empty());
        let inside = clip([(0, 50, 10, 40)].into_iter(), w, h);
        assert_eq!(
            inside,
            vec![Rect {
                x: 0,
                y: 50,
                w: 10,
                h: 20
            }]
        );
        p.picture(Layout::Bgrx, &buf, 16, stride, Some(inside), &mut scratch);
        assert_eq!(
            p.damage,
            vec![Rect {
                x: 0,
                y: 50,
                w: 10,
                h: 14
            }]
        );
    }

    #[test]
    fn damage_is_clipped() {
        let r = clip(
            [
                (-5, -5, 10, 10),
                (95, 95, 10, 10),
                (200, 0, 5, 5),
                (0, 0, 0, 3),
            ]
            .into_iter(),
            100,
            100,
        );
        assert_eq!(
            r,
            vec![
                Rect {
                    x: 0,
                    y: 0,
                    w: 5,
                    h: 5
                },
                Rect {
                    x: 95,
                    y: 95,
                    w: 5,
                    h: 5
                }
            ]
        );
    }

    #[test]
    fn the_stream_parameters_serialize() {
        let f = format_param((1280, 720)).unwrap();
        assert!(Pod::from_bytes(&f).is_some());
        let b = buffer_params().unwrap();
        assert_eq!(pods(&b).len(), 4);
    }

    #[test]
    fn characters_have_keysyms() {
        assert_eq!(char_keysym('a').raw(), 0x61);
        assert_eq!(char_keysym('\n'), xkb::Keysym::Return);
        assert_eq!(char_keysym('€').raw(), 0x20ac);
    }

    #[test]
    fn errors_are_in_words() {
        let e = MutterError::Unavailable {
            what: "remote desktop",
            name: RD_NAME,
            reason: "nobody owns that name".into(),
        };
        assert!(e.to_string().starts_with(
            "GNOME's remote desktop interface is not available on the session bus \
             (org.gnome.Mutter.RemoteDesktop)"
        ));
    }
}
