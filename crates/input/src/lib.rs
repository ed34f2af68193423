//! Remote input for Tandem: what the technician does with mouse and keyboard happens on the user's
//! PC exactly, at once, and never when the user has not allowed it.
//!
//! * [`event`]: the event model (display-relative positions, physical keys, Unicode text, named
//!   combinations) and its encoding.
//! * [`keymap`]: USB HID usages to evdev / X11 keycodes.
//! * [`gate`]: the agent-side gate (consent, view-only, held-key tracking, wheel accumulation), pure.
//! * [`inject`]: injection on X11 with enigo (x11rb backend, no delay), and a recorder.
//! * [`pump`]: the session glue for the agent ([`AgentInput`]) and the console ([`InputClient`]).
//!
//! # Keyboard layouts
//! Keys travel as physical positions, so shortcuts and games work as on a local keyboard and the
//! user's layout decides the character: with a German user layout, the technician's `Y` key types
//! `z`. That is the behaviour of RDP and VNC's raw mode, and it is what a technician fixing a PC
//! expects from shortcuts. When the technician means a specific character (a password, a path), the
//! console sends it as text, which the agent types as Unicode whatever the user's layout (enigo maps
//! the character to a spare keycode when the layout lacks it).

pub mod event;
pub mod gate;
pub mod inject;
pub mod keymap;
pub mod pump;

pub use event::{Combo, InputEvent, MouseButton, Pos};
pub use gate::{Action, DisplayRect, InputGate, Permission};
pub use inject::{InjectError, Injector, Recorder, X11Injector};
pub use pump::{AgentInput, InputClient, InputStats};
