//! Desktop backends: where the agent's pixels come from and where the technician's input goes.
//!
//! A [`Desktop`] opens a screen source (a [`Capturer`]: frames with damage, the cursor as
//! metadata, the monitors) and an input sink (an [`Injector`]: pointer, physical keys, Unicode
//! text). The session logic ([`crate::run_session`]) sees only these two traits, so a backend is
//! one module.
//!
//! [`detect`] chooses the backend from the session's environment (`WAYLAND_DISPLAY`,
//! `XDG_SESSION_TYPE`, `XDG_CURRENT_DESKTOP`, `DISPLAY`); a program may override it. On a Wayland
//! session `DISPLAY` usually also exists (Xwayland), but capturing it would show only the X
//! clients on a black screen, so a Wayland session never falls back to X11 silently.

use std::fmt;
use tandem_input::{InjectError, Injector, X11Injector};
use tandem_media::capture::x11::X11Capturer;
use tandem_media::capture::{CaptureError, Capturer};

/// A way to see and control a desktop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Any X server (Xorg, Xvfb): MIT-SHM capture with XDamage, XTEST input.
    X11,
    /// A wlroots compositor (sway, Hyprland, river, …): wlr-screencopy with damage,
    /// wlr-virtual-pointer and virtual-keyboard.
    Wlroots,
    /// GNOME (Mutter): its ScreenCast and RemoteDesktop D-Bus interfaces, frames over PipeWire.
    Mutter,
    /// xdg-desktop-portal's ScreenCast and RemoteDesktop (KDE Plasma and others): the desktop
    /// asks the user in its own dialog, frames over PipeWire.
    Portal,
}

impl Backend {
    /// Every backend, in the order `--backend` lists them.
    pub const ALL: [Backend; 4] = [
        Backend::X11,
        Backend::Wlroots,
        Backend::Mutter,
        Backend::Portal,
    ];

    /// The name used on the command line, in configuration and in events.
    pub fn name(self) -> &'static str {
        match self {
            Backend::X11 => "x11",
            Backend::Wlroots => "wlroots",
            Backend::Mutter => "gnome",
            Backend::Portal => "portal",
        }
    }

    /// Parses [`Backend::name`].
    pub fn from_name(s: &str) -> Option<Backend> {
        Backend::ALL
            .into_iter()
            .find(|b| b.name().eq_ignore_ascii_case(s.trim()))
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Inject(#[from] InjectError),
    /// Nothing to share: neither a Wayland nor an X11 session.
    #[error(
        "there is no desktop to share here (neither WAYLAND_DISPLAY nor DISPLAY is set); start \
         the agent inside the desktop session, or name an X display with --display"
    )]
    NoDesktop,
    /// A session this build cannot share, in words for the user.
    #[error("{0}")]
    Unsupported(String),
}

/// The parts of the environment that decide the backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionEnv {
    pub wayland_display: Option<String>,
    /// `XDG_SESSION_TYPE`: `x11`, `wayland`, `tty`, …
    pub session_type: Option<String>,
    /// `XDG_CURRENT_DESKTOP`: a colon-separated list such as `ubuntu:GNOME` or `sway`.
    pub current_desktop: Option<String>,
    /// The X display: `--display`, else `DISPLAY`.
    pub display: Option<String>,
    /// On a Wayland session, the compositor's global interfaces, or why they could not be read.
    pub wayland_globals: Option<Result<Vec<String>, String>>,
    /// On a Wayland session without wlr-screencopy: whether GNOME's RemoteDesktop interface is
    /// on the session bus, or why not.
    pub gnome_remote_desktop: Option<Result<(), String>>,
    /// On a Wayland session with neither: what xdg-desktop-portal offers, or why it cannot be
    /// used.
    pub portal: Option<Result<crate::portal::PortalInfo, String>>,
}

impl SessionEnv {
    /// Reads the process environment; `display` (from `--display`) wins over `DISPLAY`.
    pub fn from_process(display: Option<String>) -> SessionEnv {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let mut env = SessionEnv {
            wayland_display: var("WAYLAND_DISPLAY"),
            session_type: var("XDG_SESSION_TYPE"),
            current_desktop: var("XDG_CURRENT_DESKTOP"),
            display: display.filter(|d| !d.is_empty()).or_else(|| var("DISPLAY")),
            wayland_globals: None,
            gnome_remote_desktop: None,
            portal: None,
        };
        if env.wayland_display.is_some() {
            let globals = crate::wlroots::globals();
            let wlr =
                matches!(&globals, Ok(g) if g.iter().any(|i| i == crate::wlroots::SCREENCOPY));
            env.wayland_globals = Some(globals);
            if !wlr {
                let gnome = crate::mutter::available();
                if gnome.is_err() {
                    env.portal = Some(crate::portal::available());
                }
                env.gnome_remote_desktop = Some(gnome);
            }
        }
        env
    }

    /// True when this is a Wayland session.
    pub fn is_wayland(&self) -> bool {
        self.wayland_display.is_some()
            || self
                .session_type
                .as_deref()
                .is_some_and(|t| t.eq_ignore_ascii_case("wayland"))
    }

    /// The desktop's names, lower case (`XDG_CURRENT_DESKTOP` split on `:`).
    pub fn desktops(&self) -> Vec<String> {
        self.current_desktop
            .as_deref()
            .unwrap_or("")
            .split(':')
            .map(|d| d.trim().to_ascii_lowercase())
            .filter(|d| !d.is_empty())
            .collect()
    }
}

/// The backend chosen for a session and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub backend: Backend,
    /// What led to it, for the user ("X11 display :0", "chosen with --backend").
    pub why: String,
}

/// Chooses the backend: `forced` (from `--backend`) if given, else from the session.
pub fn detect(env: &SessionEnv, forced: Option<Backend>) -> Result<Choice, BackendError> {
    if let Some(b) = forced {
        return Ok(Choice {
            backend: b,
            why: "chosen with --backend".into(),
        });
    }
    if env.is_wayland() {
        let desktop = env
            .current_desktop
            .clone()
            .unwrap_or_else(|| "an unknown compositor".into());
        let globals = match &env.wayland_globals {
            Some(Ok(g)) => g,
            Some(Err(e)) => {
                return Err(BackendError::Unsupported(format!(
                    "this is a Wayland desktop ({desktop}), but {e}"
                )));
            }
            None => {
                return Err(BackendError::Unsupported(format!(
                    "this is a Wayland desktop ({desktop}), but WAYLAND_DISPLAY is not set: \
                     start the agent from inside the desktop session"
                )));
            }
        };
        let has = |i: &str| globals.iter().any(|g| g == i);
        if has(crate::wlroots::SCREENCOPY) {
            return Ok(Choice {
                backend: Backend::Wlroots,
                why: format!("Wayland compositor {desktop} offers wlr-screencopy"),
            });
        }
        if let Some(Ok(())) = &env.gnome_remote_desktop {
            return Ok(Choice {
                backend: Backend::Mutter,
                why: format!("Wayland desktop {desktop} offers GNOME's remote desktop interface"),
            });
        }
        if let Some(Ok(p)) = &env.portal {
            return Ok(Choice {
                backend: Backend::Portal,
                why: format!("Wayland desktop {desktop} offers {}", p.describe()),
            });
        }
        if let Some(Err(e)) = &env.gnome_remote_desktop
            && env.desktops().iter().any(|d| d == "gnome")
        {
            return Err(BackendError::Unsupported(format!(
                "this is a GNOME Wayland desktop, but {e}"
            )));
        }
        return Err(BackendError::Unsupported(format!(
            "this is a Wayland desktop ({desktop}) whose compositor offers no screen sharing \
             interface this version of Tandem can use (it needs wlr-screencopy, as sway and \
             other wlroots compositors offer, GNOME's remote desktop interface, or \
             xdg-desktop-portal's screen cast{}); log in with an X11 (\"Xorg\") session, or use \
             --backend x11 --display :N to share an X server anyway",
            match &env.portal {
                Some(Err(e)) => format!(": {e}"),
                _ => String::new(),
            }
        )));
    }
    match &env.display {
        Some(d) => Ok(Choice {
            backend: Backend::X11,
            why: format!("X11 display {d}"),
        }),
        None => Err(BackendError::NoDesktop),
    }
}

/// A desktop the agent can share. Implementations are cheap handles: the screen source is opened
/// once per session after consent, the input sink on the input thread of that session.
pub trait Desktop: Send + Sync {
    fn backend(&self) -> Backend;
    /// For the user: "X11 display :0".
    fn describe(&self) -> String;
    /// Opens the screen source. Called only after the user allowed the session.
    fn open_screen(&self) -> Result<Box<dyn Capturer + Send>, BackendError>;
    /// Opens the input sink, on the thread that will use it.
    fn open_input(&self) -> Result<Box<dyn Injector>, InjectError>;
    /// The X display whose `CLIPBOARD` the session shares, if this desktop's clipboard can be
    /// shared (X11 only for now; Wayland compositors keep the clipboard to focused clients, and
    /// the portal's clipboard interface is not used yet).
    fn x11_clipboard(&self) -> Option<String> {
        None
    }
}

/// Opens the chosen backend.
pub fn open(choice: &Choice, env: &SessionEnv) -> Result<Box<dyn Desktop>, BackendError> {
    match choice.backend {
        Backend::X11 => {
            let display = env.display.clone().ok_or_else(|| {
                BackendError::Unsupported(
                    "the X11 backend needs an X display: set DISPLAY or use --display :N".into(),
                )
            })?;
            Ok(Box::new(X11Desktop::new(display)))
        }
        Backend::Wlroots => {
            if env.wayland_display.is_none() {
                return Err(BackendError::Unsupported(
                    "the wlroots backend needs a Wayland session: WAYLAND_DISPLAY is not set"
                        .into(),
                ));
            }
            Ok(Box::new(crate::wlroots::WlrootsDesktop {
                name: env.current_desktop.clone().unwrap_or_default(),
                socket: None,
            }))
        }
        Backend::Mutter => Ok(Box::new(crate::mutter::MutterDesktop::new())),
        Backend::Portal => Ok(Box::new(crate::portal::PortalDesktop::new())),
    }
}

/// An X server: capture with MIT-SHM and XDamage ([`X11Capturer`]), input with XTEST
/// ([`X11Injector`]).
#[derive(Clone, Debug)]
pub struct X11Desktop {
    display: String,
}

impl X11Desktop {
    pub fn new(display: impl Into<String>) -> X11Desktop {
        X11Desktop {
            display: display.into(),
        }
    }
}

impl Desktop for X11Desktop {
    fn backend(&self) -> Backend {
        Backend::X11
    }
    fn describe(&self) -> String {
        format!("X11 display {}", self.display)
    }
    fn x11_clipboard(&self) -> Option<String> {
        Some(self.display.clone())
    }
    fn open_screen(&self) -> Result<Box<dyn Capturer + Send>, BackendError> {
        Ok(Box::new(X11Capturer::open(Some(&self.display))?))
    }
    fn open_input(&self) -> Result<Box<dyn Injector>, InjectError> {
        Ok(Box::new(X11Injector::open(Some(&self.display))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(
        wayland: Option<&str>,
        ty: Option<&str>,
        de: Option<&str>,
        x: Option<&str>,
    ) -> SessionEnv {
        SessionEnv {
            wayland_display: wayland.map(Into::into),
            session_type: ty.map(Into::into),
            current_desktop: de.map(Into::into),
            display: x.map(Into::into),
            wayland_globals: wayland.map(|_| Ok(vec!["wl_compositor".into(), "wl_shm".into()])),
            gnome_remote_desktop: wayland.map(|_| Err("not on the bus".into())),
            portal: wayland.map(|_| Err("no portal".into())),
        }
    }

    #[test]
    fn a_wlroots_compositor_is_found_by_its_interfaces() {
        let mut e = env(Some("wayland-1"), Some("wayland"), Some("sway"), None);
        e.wayland_globals = Some(Ok(vec![
            "wl_output".into(),
            crate::wlroots::SCREENCOPY.into(),
        ]));
        assert_eq!(detect(&e, None).unwrap().backend, Backend::Wlroots);
        // Whatever it calls itself.
        e.current_desktop = Some("Hyprland".into());
        assert_eq!(detect(&e, None).unwrap().backend, Backend::Wlroots);
    }

    #[test]
    fn gnome_is_found_by_its_remote_desktop_interface() {
        let mut e = env(
            Some("wayland-0"),
            Some("wayland"),
            Some("ubuntu:GNOME"),
            Some(":0"),
        );
        e.gnome_remote_desktop = Some(Ok(()));
        assert_eq!(detect(&e, None).unwrap().backend, Backend::Mutter);
        // GNOME without the interface: said with the reason.
        e.gnome_remote_desktop = Some(Err("the bus is gone".into()));
        let err = detect(&e, None).unwrap_err().to_string();
        assert!(
            err.contains("GNOME") && err.contains("the bus is gone"),
            "{err}"
        );
    }

    #[test]
    fn an_unreachable_compositor_is_said() {
        let mut e = env(Some("wayland-9"), Some("wayland"), Some("sway"), None);
        e.wayland_globals = Some(Err("cannot connect to the Wayland compositor".into()));
        let err = detect(&e, None).unwrap_err().to_string();
        assert!(err.contains("cannot connect"), "{err}");
    }

    #[test]
    fn an_x11_session_uses_x11() {
        let c = detect(&env(None, Some("x11"), Some("XFCE"), Some(":0")), None).unwrap();
        assert_eq!(c.backend, Backend::X11);
        assert!(c.why.contains(":0"));
    }

    #[test]
    fn a_wayland_session_never_falls_back_to_xwayland_silently() {
        let e = env(
            Some("wayland-0"),
            Some("wayland"),
            Some("ubuntu:GNOME"),
            Some(":0"),
        );
        let err = detect(&e, None).unwrap_err().to_string();
        assert!(err.contains("Wayland"), "{err}");
        // Forcing X11 is the user's explicit choice.
        assert_eq!(
            detect(&e, Some(Backend::X11)).unwrap().backend,
            Backend::X11
        );
    }

    #[test]
    fn session_type_alone_marks_wayland() {
        assert!(env(None, Some("Wayland"), None, Some(":1")).is_wayland());
        assert!(!env(None, Some("x11"), None, Some(":1")).is_wayland());
    }

    #[test]
    fn no_desktop_is_said_in_words() {
        let err = detect(&env(None, Some("tty"), None, None), None).unwrap_err();
        assert!(matches!(err, BackendError::NoDesktop));
        assert!(err.to_string().contains("no desktop"));
    }

    #[test]
    fn desktops_are_split_and_lowercased() {
        let e = env(None, None, Some("ubuntu:GNOME: "), None);
        assert_eq!(e.desktops(), vec!["ubuntu", "gnome"]);
    }

    #[test]
    fn backend_names_round_trip() {
        for b in Backend::ALL {
            assert_eq!(Backend::from_name(b.name()), Some(b));
        }
        assert_eq!(Backend::from_name(" X11 "), Some(Backend::X11));
        assert_eq!(Backend::from_name("nope"), None);
    }
}
