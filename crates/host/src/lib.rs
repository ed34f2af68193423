//! The agent's side of a session, independent of the program that shows it and of the desktop it
//! shares: after the user's decision, stream the screen (capture → change detection → H.264, the
//! cursor and the monitor list) and feed the technician's input through the consent gate into the
//! desktop, until the session ends.
//!
//! * [`desktop`]: a [`Desktop`] backend opens a screen source ([`tandem_media::capture::Capturer`])
//!   and an input sink ([`tandem_input::Injector`]); [`desktop::X11Desktop`] is the X11 one,
//!   [`wlroots::WlrootsDesktop`] the wlroots one (sway and others), and [`desktop::detect`]
//!   chooses a backend from the session's environment.
//! * [`stream`]: the screen thread (frame pacing, bitrate following the path, cursor and monitors).
//! * [`session`]: [`run_session`], one session from the consent answer to its end, driven by the
//!   program's [`UserCommands`] and reported as [`HostEvent`]s.
//! * [`banner`]: the always-visible "someone is connected" bar on the agent's X11 screen.
//!
//! Nothing here knows of windows, terminals or configuration files: `tandem-agent` is the glue.

pub mod banner;
pub mod clipboard;
pub mod desktop;
pub mod mutter;
pub mod portal;
pub mod session;
pub mod stream;
pub mod toolbox;
pub mod wlroots;

pub use desktop::{Backend, BackendError, Desktop, X11Desktop};
pub use session::{
    Decision, HostCmd, HostEvent, Outcome, Tools, UserCommands, await_decision, run_session,
    say_before_consent,
};
