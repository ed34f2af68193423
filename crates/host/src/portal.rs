//! The portal backend: the screen and the input through xdg-desktop-portal's `ScreenCast` and
//! `RemoteDesktop` interfaces, for Wayland desktops without wlr-screencopy or Mutter's own
//! interfaces (KDE Plasma, and any desktop whose portal implements them).
//!
//! **Session.** When the screen or the input is first opened, the backend asks the portal for a
//! remote desktop session (keyboard and pointer) with every monitor as screen cast sources
//! (`multiple`, the cursor as metadata where the portal offers it, else drawn into the picture).
//! The portal then shows the desktop's own dialog, in which the user picks what to share and
//! whether to allow remote interaction; the agent waits for that answer (at most
//! [`Options::dialog_timeout`]). This comes on top of Tandem's own consent, which was given
//! before anything here runs. Where the portal has no `RemoteDesktop` interface
//! (xdg-desktop-portal-wlr, for instance), the session is a screen cast only and the technician
//! sees the screen without control.
//!
//! **Restore token.** A portal may return a restore token with which the next session starts
//! without its dialog (the user's "remember" choice). The backend keeps the newest one in a file
//! of the user's own (mode 0600, [`default_token_file`]), never in a log, and offers it with the
//! next session. `RemoteDesktop` sessions persist from version 2 of that interface; version 1
//! (xdg-desktop-portal ≤ 1.16, GNOME 43) cannot, so a session with control asks every time,
//! while a screen cast only session persists from `ScreenCast` version 4.
//!
//! **Screen and input** run exactly as in the GNOME backend ([`crate::mutter`]), whose PipeWire
//! consumer and input mapping this backend shares: frames over a PipeWire connection the portal
//! opens (`OpenPipeWireRemote`, which shows only this session's streams), input as
//! `Notify*` calls positioned on a stream (a monitor). A session closed on the desktop (from its
//! sharing indicator) ends the sharing; it is never started again behind the user's back.
//!
//! D-Bus calls go through `ashpd` (its `async-io` flavour, driven by `async_io::block_on` on the
//! backend's own threads, never on the agent's runtime).

use crate::mutter::{
    Call, ClosedSignal, Flavor, Link, MutterCapturer, MutterError, MutterInjector, Screen,
    SendError, Session, StreamInfo, locate,
};
use ashpd::desktop::remote_desktop::{
    Axis, DeviceType, KeyState, RemoteDesktop, SelectDevicesOptions,
};
use ashpd::desktop::screencast::{CursorMode, Screencast, SelectSourcesOptions, SourceType};
use ashpd::desktop::{PersistMode, ResponseError};
use ashpd::enumflags2::BitFlags;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tandem_input::{InjectError, Injector};
use tandem_media::capture::Capturer;
use zbus::blocking::Connection;
use zbus::zvariant::OwnedObjectPath;

/// How long the user has, by default, to answer the desktop's sharing dialog.
pub const DIALOG_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a portal call that shows nothing may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// xdg-desktop-portal's bus name.
const PORTAL_NAME: &str = "org.freedesktop.portal.Desktop";
/// The longest restore token kept (portals use UUIDs).
const MAX_TOKEN: usize = 1024;

/// What the portal of a session offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortalInfo {
    /// `org.freedesktop.portal.ScreenCast`'s version.
    pub screencast: u32,
    /// `org.freedesktop.portal.RemoteDesktop`'s version, if the portal has it.
    pub remote_desktop: Option<u32>,
}

impl PortalInfo {
    /// In words, for the agent's log and `--check`.
    pub fn describe(&self) -> String {
        match self.remote_desktop {
            Some(v) => format!(
                "xdg-desktop-portal with ScreenCast v{} and RemoteDesktop v{v}",
                self.screencast
            ),
            None => format!(
                "xdg-desktop-portal with ScreenCast v{} (no RemoteDesktop: view only)",
                self.screencast
            ),
        }
    }
}

fn connect(address: Option<&str>) -> Result<Connection, MutterError> {
    let r = match address {
        Some(a) => zbus::blocking::connection::Builder::address(a).and_then(|b| b.build()),
        None => Connection::session(),
    };
    r.map_err(|e| MutterError::Bus(e.to_string()))
}

/// Runs `f` to its end, at most `timeout`.
fn within<T>(timeout: Duration, f: impl Future<Output = T>) -> Option<T> {
    async_io::block_on(async {
        let timer = async { async_io::Timer::after(timeout).await };
        futures_util::pin_mut!(f);
        futures_util::pin_mut!(timer);
        match futures_util::future::select(f, timer).await {
            futures_util::future::Either::Left((t, _)) => Some(t),
            futures_util::future::Either::Right(_) => None,
        }
    })
}

fn failed(what: &'static str) -> impl Fn(ashpd::Error) -> MutterError {
    move |e| match e {
        ashpd::Error::Response(ResponseError::Cancelled) => MutterError::PortalDeclined,
        e => MutterError::PortalFailed {
            what,
            reason: e.to_string(),
        },
    }
}

/// Whether the portal of the session bus at `address` (`None`: this session's) can share the
/// screen; what it offers, or why not in words.
pub fn available_on(address: Option<&str>) -> Result<PortalInfo, String> {
    let conn = connect(address).map_err(|e| e.to_string())?;
    let conn = conn.inner().clone();
    let probe = async {
        let sc = Screencast::with_connection(conn.clone()).await;
        let rd = RemoteDesktop::with_connection(conn).await;
        (sc, rd)
    };
    let (sc, rd) = within(CALL_TIMEOUT, probe)
        .ok_or_else(|| "the portal did not answer within 10 s".to_string())?;
    let sc = sc.map_err(|e| {
        MutterError::PortalUnavailable(format!("no ScreenCast portal ({e})")).to_string()
    })?;
    Ok(PortalInfo {
        screencast: sc.version(),
        remote_desktop: rd.ok().map(|r| r.version()),
    })
}

/// [`available_on`] this session's bus.
pub fn available() -> Result<PortalInfo, String> {
    available_on(None)
}

/// Where the restore token is kept by default: `$XDG_STATE_HOME/tandem/portal-restore-token`
/// (`~/.local/state/…` without `XDG_STATE_HOME`); `None` without a home.
pub fn default_token_file() -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|h| h.join(".local/state"))
        })?;
    Some(state.join("tandem").join("portal-restore-token"))
}

/// How the backend talks to the portal.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    pub(crate) token_file: Option<PathBuf>,
    pub(crate) dialog_timeout: Duration,
    /// Ask for remote input where the portal offers it.
    pub(crate) control: bool,
}

/// Reads a kept restore token; `None` if there is none or it is not one (never an error: the
/// portal then asks the user again).
fn read_token(path: &Path) -> Option<String> {
    use std::io::Read;
    let f = std::fs::File::open(path).ok()?;
    let mut buf = String::new();
    f.take(MAX_TOKEN as u64 + 1).read_to_string(&mut buf).ok()?;
    let t = buf.trim();
    let ok = !t.is_empty() && t.len() <= MAX_TOKEN && t.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| t.to_string())
}

/// Keeps `token` for the next session (readable by the user only). Failing to is not fatal:
/// the next session then shows the dialog again.
fn write_token(path: &Path, token: &str) {
    if token.is_empty() || token.len() > MAX_TOKEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return;
    }
    let result = tandem_certs::write_atomic(path, token.as_bytes(), true);
    match result {
        Ok(()) => tracing::info!(file = %path.display(), "portal restore token kept"),
        Err(e) => tracing::warn!(
            file = %path.display(),
            error = %e,
            "cannot keep the portal's restore token; the desktop will ask again next time"
        ),
    }
}

/// The portal's session object, of either kind.
enum Kind {
    Remote {
        rd: RemoteDesktop,
        session: ashpd::desktop::Session<RemoteDesktop>,
        devices: BitFlags<DeviceType>,
    },
    Cast {
        session: ashpd::desktop::Session<Screencast>,
        /// Whether remote input was left out on purpose ([`PortalDesktop::control`]), not for
        /// want of a RemoteDesktop portal.
        view_only: bool,
    },
}

/// A started portal session (held by [`Session`]).
pub(crate) struct Started {
    kind: Kind,
    sc: Screencast,
    /// When it started, to name it in logs (the session handle is the portal's business).
    since: Instant,
}

impl Started {
    pub(crate) fn name(&self) -> String {
        let kind = match self.kind {
            Kind::Remote { .. } => "remote desktop",
            Kind::Cast { .. } => "screen cast",
        };
        format!("portal {kind} session of {:.0?} ago", self.since.elapsed())
    }

    /// A PipeWire connection that shows this session's streams.
    pub(crate) fn pipewire_remote(&self) -> Result<OwnedFd, MutterError> {
        let fd = match &self.kind {
            Kind::Remote { session, .. } => within(
                CALL_TIMEOUT,
                self.sc.open_pipe_wire_remote(session, Default::default()),
            ),
            Kind::Cast { session, .. } => within(
                CALL_TIMEOUT,
                self.sc.open_pipe_wire_remote(session, Default::default()),
            ),
        };
        match fd {
            Some(Ok(fd)) => Ok(fd),
            Some(Err(e)) => Err(failed("open the PipeWire connection")(e)),
            None => Err(MutterError::PortalFailed {
                what: "open the PipeWire connection",
                reason: "no answer within 10 s".into(),
            }),
        }
    }

    /// Whether the user let the technician's input in.
    pub(crate) fn check_input(&self) -> Result<(), MutterError> {
        match &self.kind {
            Kind::Remote { devices, .. }
                if devices.contains(DeviceType::Keyboard | DeviceType::Pointer) =>
            {
                Ok(())
            }
            Kind::Remote { .. } => Err(MutterError::NoRemoteInput),
            Kind::Cast {
                view_only: true, ..
            } => Err(MutterError::ViewOnlyAsked),
            Kind::Cast { .. } => Err(MutterError::PortalFailed {
                what: "offer remote control",
                reason: "this desktop's portal has no RemoteDesktop interface (view only)".into(),
            }),
        }
    }

    /// Sends one input event.
    pub(crate) fn input(&self, streams: &[StreamInfo], call: &Call) -> Result<(), SendError> {
        let Kind::Remote { rd, session, .. } = &self.kind else {
            return Err(SendError::Refused("no remote input in this session".into()));
        };
        let state = |p: bool| {
            if p {
                KeyState::Pressed
            } else {
                KeyState::Released
            }
        };
        let call = async {
            match *call {
                Call::Motion(x, y) => match locate(streams, x, y) {
                    Some((s, px, py)) => {
                        rd.notify_pointer_motion_absolute(
                            session,
                            s.node,
                            px,
                            py,
                            Default::default(),
                        )
                        .await
                    }
                    None => Ok(()),
                },
                Call::Button(b, p) => {
                    rd.notify_pointer_button(session, b, state(p), Default::default())
                        .await
                }
                Call::Axis(axis, steps) => {
                    let axis = if axis == 0 {
                        Axis::Vertical
                    } else {
                        Axis::Horizontal
                    };
                    rd.notify_pointer_axis_discrete(session, axis, steps, Default::default())
                        .await
                }
                Call::Keycode(k, p) => {
                    let k = i32::try_from(k).unwrap_or(0);
                    rd.notify_keyboard_keycode(session, k, state(p), Default::default())
                        .await
                }
                Call::Keysym(k, p) => {
                    let k = i32::try_from(k).unwrap_or(0);
                    rd.notify_keyboard_keysym(session, k, state(p), Default::default())
                        .await
                }
            }
        };
        match within(CALL_TIMEOUT, call) {
            Some(Ok(())) => Ok(()),
            Some(Err(ashpd::Error::Zbus(e))) if crate::mutter::session_gone(&e) => {
                Err(SendError::Gone)
            }
            Some(Err(ashpd::Error::Zbus(zbus::Error::MethodError(name, msg, _))))
                if name.as_str() == "org.freedesktop.DBus.Error.AccessDenied"
                    && msg.as_deref().is_some_and(|m| m.contains("ession")) =>
            {
                // xdg-desktop-portal refuses calls on a session it closed.
                Err(SendError::Gone)
            }
            Some(Err(e)) => Err(SendError::Refused(e.to_string())),
            None => Err(SendError::Refused(
                "the portal did not answer within 10 s".into(),
            )),
        }
    }

    /// Closes the session (the desktop's sharing indicator goes away).
    pub(crate) fn close(&self) {
        let r = match &self.kind {
            Kind::Remote { session, .. } => within(CALL_TIMEOUT, session.close()),
            Kind::Cast { session, .. } => within(CALL_TIMEOUT, session.close()),
        };
        if let Some(Err(e)) = r {
            tracing::debug!(error = %e, "closing the portal session");
        }
    }
}

/// What the portal's Start answered.
struct Answer {
    streams: Vec<ashpd::desktop::screencast::Stream>,
    restore_token: Option<String>,
    devices: BitFlags<DeviceType>,
}

/// Starts a portal session (showing the desktop's dialog unless a restore token spares it).
pub(crate) fn start(
    conn: &Connection,
    o: &Options,
    generation: u64,
) -> Result<Session, MutterError> {
    let aconn = conn.inner().clone();
    let token = o.token_file.as_deref().and_then(read_token);
    let (sc, rd) = within(CALL_TIMEOUT, async {
        let sc = Screencast::with_connection(aconn.clone()).await;
        let rd = if o.control {
            RemoteDesktop::with_connection(aconn).await.ok()
        } else {
            None
        };
        (sc, rd)
    })
    .ok_or_else(|| MutterError::PortalUnavailable("no answer within 10 s".into()))?;
    let sc =
        sc.map_err(|e| MutterError::PortalUnavailable(format!("no ScreenCast portal ({e})")))?;
    let cursor = within(CALL_TIMEOUT, sc.available_cursor_modes())
        .and_then(Result::ok)
        .map(|m| {
            if m.contains(CursorMode::Metadata) {
                CursorMode::Metadata
            } else if m.contains(CursorMode::Embedded) {
                CursorMode::Embedded
            } else {
                CursorMode::Hidden
            }
        })
        .unwrap_or(CursorMode::Embedded);
    let sources = SelectSourcesOptions::default()
        .set_sources(BitFlags::from(SourceType::Monitor))
        .set_multiple(true)
        .set_cursor_mode(cursor);
    tracing::info!(
        remote_desktop = rd.as_ref().map(|r| r.version()),
        screencast = sc.version(),
        restore = token.is_some(),
        "asking the desktop's portal to share the screen (it may show a dialog)"
    );
    let (kind, answer, closed) = match rd {
        Some(rd) => {
            let persist = rd.version() >= 2;
            let session = within(CALL_TIMEOUT, rd.create_session(Default::default()))
                .ok_or_else(|| timeout("create a session"))?
                .map_err(failed("create a remote desktop session"))?;
            let mut devices = SelectDevicesOptions::default()
                .set_devices(DeviceType::Keyboard | DeviceType::Pointer);
            if persist {
                devices = devices
                    .set_persist_mode(PersistMode::ExplicitlyRevoked)
                    .set_restore_token(token.as_deref());
            }
            let answer = (|| {
                within(CALL_TIMEOUT, rd.select_devices(&session, devices))
                    .ok_or_else(|| timeout("select the input devices"))?
                    .and_then(|r| r.response())
                    .map_err(failed("select the input devices"))?;
                within(CALL_TIMEOUT, sc.select_sources(&session, sources))
                    .ok_or_else(|| timeout("select the monitors"))?
                    .and_then(|r| r.response())
                    .map_err(failed("select the monitors"))?;
                let r = within(
                    o.dialog_timeout,
                    rd.start(&session, None, Default::default()),
                )
                .ok_or(MutterError::PortalTimeout(o.dialog_timeout))?
                .and_then(|r| r.response())
                .map_err(failed("start the remote desktop session"))?;
                Ok::<_, MutterError>(Answer {
                    streams: r.streams().to_vec(),
                    restore_token: r.restore_token().map(str::to_string),
                    devices: r.devices(),
                })
            })();
            let answer = match answer {
                Ok(a) => a,
                Err(e) => {
                    let _ = within(CALL_TIMEOUT, session.close());
                    return Err(e);
                }
            };
            let closed = closed_of(conn, &session);
            (
                Kind::Remote {
                    rd,
                    session,
                    devices: answer.devices,
                },
                answer,
                closed,
            )
        }
        None => {
            let persist = sc.version() >= 4;
            let session = within(CALL_TIMEOUT, sc.create_session(Default::default()))
                .ok_or_else(|| timeout("create a session"))?
                .map_err(failed("create a screen cast session"))?;
            let sources = if persist {
                sources
                    .set_persist_mode(PersistMode::ExplicitlyRevoked)
                    .set_restore_token(token.as_deref())
            } else {
                sources
            };
            let answer = (|| {
                within(CALL_TIMEOUT, sc.select_sources(&session, sources))
                    .ok_or_else(|| timeout("select the monitors"))?
                    .and_then(|r| r.response())
                    .map_err(failed("select the monitors"))?;
                let r = within(
                    o.dialog_timeout,
                    sc.start(&session, None, Default::default()),
                )
                .ok_or(MutterError::PortalTimeout(o.dialog_timeout))?
                .and_then(|r| r.response())
                .map_err(failed("start the screen cast session"))?;
                Ok::<_, MutterError>(Answer {
                    streams: r.streams().to_vec(),
                    restore_token: r.restore_token().map(str::to_string),
                    devices: BitFlags::empty(),
                })
            })();
            let answer = match answer {
                Ok(a) => a,
                Err(e) => {
                    let _ = within(CALL_TIMEOUT, session.close());
                    return Err(e);
                }
            };
            let closed = closed_of(conn, &session);
            (
                Kind::Cast {
                    session,
                    view_only: !o.control,
                },
                answer,
                closed,
            )
        }
    };
    let started = Started {
        kind,
        sc,
        since: Instant::now(),
    };
    if let (Some(file), Some(t)) = (&o.token_file, &answer.restore_token) {
        write_token(file, t);
    }
    let streams = streams_of(&answer.streams);
    tracing::info!(
        monitors = streams.len(),
        control = started.check_input().is_ok(),
        "the desktop's portal is sharing the screen"
    );
    // From here on, dropping the session closes it.
    let session = Session::portal(conn, started, streams, closed, generation);
    if session.streams.is_empty() {
        return Err(MutterError::NoMonitor);
    }
    Ok(session)
}

fn timeout(what: &'static str) -> MutterError {
    MutterError::PortalFailed {
        what,
        reason: "no answer within 10 s".into(),
    }
}

/// The session's `Closed` signal; without a subscription, a stream that never says closed (a
/// closed session still shows up as its PipeWire stream ending).
fn closed_of<T: ashpd::desktop::SessionPortal>(
    conn: &Connection,
    session: &ashpd::desktop::Session<T>,
) -> ClosedSignal {
    // ashpd keeps the session's object path to itself; it serialises as that path.
    let path = serde_json::to_value(session)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string));
    let signal = path
        .ok_or_else(|| zbus::Error::Failure("no session path".into()))
        .and_then(|p| {
            crate::mutter::closed_signal(conn, PORTAL_NAME, &p, "org.freedesktop.portal.Session")
        });
    match signal {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot follow the portal session's Closed signal");
            Box::pin(futures_util::stream::pending())
        }
    }
}

/// The monitors the user shared, laid out as the portal says (left to right where it does not).
fn streams_of(streams: &[ashpd::desktop::screencast::Stream]) -> Vec<StreamInfo> {
    let mut next_x = 0i32;
    let root = OwnedObjectPath::try_from("/").ok();
    streams
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let (w, h) = s.size().unwrap_or((0, 0));
            let (w, h) = (w.clamp(0, 16384) as u32, h.clamp(0, 16384) as u32);
            let (x, y) = s.position().unwrap_or((next_x, 0));
            next_x = next_x.max(x.saturating_add(w as i32));
            Some(StreamInfo {
                screen: Screen {
                    connector: format!("screen {}", i + 1),
                    x,
                    y,
                    width: w,
                    height: h,
                    primary: i == 0,
                },
                path: root.clone()?,
                node: s.pipe_wire_node_id(),
            })
        })
        .collect()
}

/// The desktop behind xdg-desktop-portal (KDE Plasma and others).
#[derive(Debug)]
pub struct PortalDesktop {
    bus: Option<String>,
    options: Options,
    link: Mutex<Weak<Link>>,
}

impl Default for PortalDesktop {
    fn default() -> Self {
        PortalDesktop {
            bus: None,
            options: Options {
                token_file: default_token_file(),
                dialog_timeout: DIALOG_TIMEOUT,
                control: true,
            },
            link: Mutex::new(Weak::new()),
        }
    }
}

impl PortalDesktop {
    /// The portal of this process's session bus, keeping its restore token in
    /// [`default_token_file`].
    pub fn new() -> PortalDesktop {
        PortalDesktop::default()
    }

    /// The portal of the session bus at `address` (`unix:path=…`).
    pub fn with_bus(address: impl Into<String>) -> PortalDesktop {
        PortalDesktop {
            bus: Some(address.into()),
            ..PortalDesktop::default()
        }
    }

    /// Keeps the restore token in `path` (`None`: not kept; the dialog every time).
    pub fn token_file(mut self, path: Option<PathBuf>) -> PortalDesktop {
        self.options.token_file = path;
        self
    }

    /// How long the user has to answer the desktop's dialog.
    pub fn dialog_timeout(mut self, t: Duration) -> PortalDesktop {
        self.options.dialog_timeout = t;
        self
    }

    /// Whether to ask for remote control (`false`: a screen cast session only, which portals
    /// can remember).
    pub fn control(mut self, on: bool) -> PortalDesktop {
        self.options.control = on;
        self
    }

    fn link(&self) -> Arc<Link> {
        let mut weak = self.link.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = weak.upgrade() {
            return l;
        }
        let l = Arc::new(Link::new(
            self.bus.clone(),
            Flavor::Portal(self.options.clone()),
        ));
        *weak = Arc::downgrade(&l);
        l
    }

    /// Opens the screen (starting the shared session, and the desktop's dialog, if the input
    /// has not).
    pub fn open_capturer(&self) -> Result<MutterCapturer, MutterError> {
        MutterCapturer::open(self.link(), None)
    }

    /// Opens the input (starting the shared session if the screen has not).
    pub fn open_injector(&self) -> Result<MutterInjector, MutterError> {
        MutterInjector::open(self.link())
    }
}

impl crate::desktop::Desktop for PortalDesktop {
    fn backend(&self) -> crate::desktop::Backend {
        crate::desktop::Backend::Portal
    }
    fn describe(&self) -> String {
        match &self.bus {
            None => "the desktop (through xdg-desktop-portal)".into(),
            Some(a) => format!("the desktop (through xdg-desktop-portal on the bus {a})"),
        }
    }
    fn open_screen(&self) -> Result<Box<dyn Capturer + Send>, crate::desktop::BackendError> {
        Ok(Box::new(self.open_capturer()?))
    }
    fn open_input(&self) -> Result<Box<dyn Injector>, InjectError> {
        Ok(Box::new(self.open_injector()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_token_is_kept_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state/tandem/portal-restore-token");
        assert_eq!(read_token(&file), None);
        write_token(&file, "7b894a06-1c0e-4a7d-9d5e-1f2a3b4c5d6e");
        assert_eq!(
            read_token(&file).as_deref(),
            Some("7b894a06-1c0e-4a7d-9d5e-1f2a3b4c5d6e")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(file.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o077, 0);
    }

    #[test]
    fn a_token_file_that_holds_no_token_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "a b\n").unwrap();
        assert_eq!(read_token(&file), None);
        std::fs::write(&file, "x".repeat(MAX_TOKEN + 1)).unwrap();
        assert_eq!(read_token(&file), None);
        std::fs::write(&file, "\n  abc-1 \n").unwrap();
        assert_eq!(read_token(&file).as_deref(), Some("abc-1"));
        // Not written either.
        write_token(&file, "bad\ntoken");
        assert_eq!(read_token(&file).as_deref(), Some("abc-1"));
    }
}
