//! Screen capture behind a small trait, one backend per platform. X11 is the first (any X server,
//! Xvfb included). Windows and macOS backends come behind `cfg` later; scrap's are candidates there,
//! its X11 one is not (it shares the screen through a world-readable segment).

use crate::frame::{Frame, Rect};

#[cfg(target_os = "linux")]
pub mod x11;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot open the X display {display:?}: {reason}")]
    Open { display: String, reason: String },
    #[error("X11 error: {0}")]
    X11(String),
    #[error("unsupported screen: {0}")]
    Unsupported(String),
    #[error("no monitor number {0}")]
    NoSuchMonitor(usize),
}

/// A monitor (or the whole screen).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Monitor {
    pub name: String,
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub primary: bool,
}

/// The cursor's image; sent when it changes, drawn by the console (never baked into frames).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CursorShape {
    pub serial: u32,
    pub width: u32,
    pub height: u32,
    pub hot_x: u32,
    pub hot_y: u32,
    /// Premultiplied RGBA, `width × height × 4` bytes.
    pub rgba: Vec<u8>,
}

/// Where the cursor is, relative to the captured monitor, and its new shape if it changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CursorState {
    pub x: i32,
    pub y: i32,
    pub visible: bool,
    pub shape: Option<CursorShape>,
}

/// One capture.
#[derive(Debug)]
pub struct Captured<'a> {
    pub frame: &'a Frame,
    /// What changed since the previous capture (everything after a reset or resize; nothing on an
    /// idle screen).
    pub damage: Vec<Rect>,
    pub cursor: CursorState,
    /// The screen's resolution changed since the previous capture.
    pub resized: bool,
}

/// A screen source: what the agent's streaming loop needs of a platform's screen (X11, a Wayland
/// compositor, …). One capturer per session, used from one thread.
pub trait Capturer {
    fn monitors(&self) -> Vec<Monitor>;
    /// The size of the monitor being captured.
    fn size(&self) -> (u32, u32);
    fn select(&mut self, index: usize) -> Result<(), CaptureError>;
    /// The next capture reports the whole frame as changed (for a keyframe).
    fn request_full(&mut self);
    fn capture(&mut self) -> Result<Captured<'_>, CaptureError>;
    /// Waits until the screen (or the cursor) may have changed, at most `timeout`; returns whether
    /// it did. Backends without change notifications wait the whole timeout and return `true`, so
    /// callers simply capture on a timer.
    fn wait_for_change(&mut self, timeout: std::time::Duration) -> bool {
        std::thread::sleep(timeout);
        true
    }
}

impl<C: Capturer + ?Sized> Capturer for Box<C> {
    fn monitors(&self) -> Vec<Monitor> {
        (**self).monitors()
    }
    fn size(&self) -> (u32, u32) {
        (**self).size()
    }
    fn select(&mut self, index: usize) -> Result<(), CaptureError> {
        (**self).select(index)
    }
    fn request_full(&mut self) {
        (**self).request_full()
    }
    fn capture(&mut self) -> Result<Captured<'_>, CaptureError> {
        (**self).capture()
    }
    fn wait_for_change(&mut self, timeout: std::time::Duration) -> bool {
        (**self).wait_for_change(timeout)
    }
}
