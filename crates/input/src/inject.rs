//! Injectors: where [`Action`]s happen. X11 through enigo (x11rb backend, no per-event delay), and a
//! recorder for tests.

use crate::event::MouseButton;
use crate::gate::{Action, DisplayRect, ScrollAxis};
use enigo::{Axis, Button, Coordinate, Direction, Enigo, Keyboard, Mouse, Settings};

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("cannot open the X display {display}: {reason}")]
    Open { display: String, reason: String },
    #[error("input injection failed: {0}")]
    Inject(String),
}

/// Performs actions on the user's machine.
pub trait Injector {
    fn apply(&mut self, a: &Action) -> Result<(), InjectError>;
    /// The whole screen (the display shared when no monitor is chosen).
    fn screen(&self) -> Result<DisplayRect, InjectError>;
}

/// X11 injection with enigo's x11rb backend (XTEST).
pub struct X11Injector {
    enigo: Enigo,
}

impl X11Injector {
    /// Opens `display` (e.g. `:0`), or `$DISPLAY` when `None`.
    pub fn open(display: Option<&str>) -> Result<Self, InjectError> {
        let settings = Settings {
            // enigo's default waits 12 ms per event (a click would take 25 ms).
            linux_delay: 0,
            x11_display: display.map(str::to_string),
            release_keys_when_dropped: true,
            ..Settings::default()
        };
        let enigo = Enigo::new(&settings).map_err(|e| InjectError::Open {
            display: display
                .map(str::to_string)
                .or_else(|| std::env::var("DISPLAY").ok())
                .unwrap_or_default(),
            reason: e.to_string(),
        })?;
        Ok(X11Injector { enigo })
    }
}

fn dir(pressed: bool) -> Direction {
    if pressed {
        Direction::Press
    } else {
        Direction::Release
    }
}

fn button(b: MouseButton) -> Button {
    match b {
        MouseButton::Left => Button::Left,
        MouseButton::Middle => Button::Middle,
        MouseButton::Right => Button::Right,
        MouseButton::Back => Button::Back,
        MouseButton::Forward => Button::Forward,
    }
}

impl Injector for X11Injector {
    fn apply(&mut self, a: &Action) -> Result<(), InjectError> {
        let r = match a {
            Action::MoveTo { x, y } => self.enigo.move_mouse(*x, *y, Coordinate::Abs),
            Action::Button { button: b, pressed } => self.enigo.button(button(*b), dir(*pressed)),
            Action::Scroll { axis, clicks } => self.enigo.scroll(
                *clicks,
                match axis {
                    ScrollAxis::Vertical => Axis::Vertical,
                    ScrollAxis::Horizontal => Axis::Horizontal,
                },
            ),
            Action::Key { keycode, pressed } => self.enigo.raw(*keycode as u16, dir(*pressed)),
            Action::Text(t) => self.enigo.text(t),
        };
        r.map_err(|e| InjectError::Inject(e.to_string()))
    }

    fn screen(&self) -> Result<DisplayRect, InjectError> {
        let (w, h) = self
            .enigo
            .main_display()
            .map_err(|e| InjectError::Inject(e.to_string()))?;
        Ok(DisplayRect {
            x: 0,
            y: 0,
            width: w.max(1) as u32,
            height: h.max(1) as u32,
        })
    }
}

/// Records actions instead of performing them (tests, dry runs).
#[derive(Default, Debug)]
pub struct Recorder {
    pub actions: std::sync::Arc<std::sync::Mutex<Vec<Action>>>,
    pub screen: Option<DisplayRect>,
}

impl Injector for Recorder {
    fn apply(&mut self, a: &Action) -> Result<(), InjectError> {
        self.actions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(a.clone());
        Ok(())
    }
    fn screen(&self) -> Result<DisplayRect, InjectError> {
        Ok(self.screen.unwrap_or(DisplayRect {
            x: 0,
            y: 0,
            width: 1920,
            height: 1080,
        }))
    }
}
