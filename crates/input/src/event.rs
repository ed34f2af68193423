//! The input event model: what the console sends, independent of either side's screen size and
//! keyboard layout.
//!
//! * **Positions** are normalised to the shared display: `0..=65535` across its width and height, so
//!   the console's window size and scaling do not matter. [`Pos::from_pixel`] and
//!   [`Pos::to_pixel`] round-trip exactly for displays up to 65,536 pixels wide.
//! * **Keys** are physical positions (USB HID usage page 7), not characters: the technician's `Z` key
//!   presses whatever is in that place on the user's keyboard. This is what shortcuts need and what
//!   a remote desktop feels like. For characters the user's layout does not have (or to type exactly
//!   what the technician means regardless of layout), the console sends [`InputEvent::Text`], which
//!   the agent types as Unicode.
//! * **Buttons and wheel** carry the position they happen at, so a click lands where the pointer was
//!   even if the (unreliable, newest-wins) pointer update that preceded it was lost.
//! * **Combinations** the console cannot type locally (the technician's OS would act on them) are
//!   named: [`Combo`].

use serde::{Deserialize, Serialize};

/// A position on the shared display, normalised to `0..=65535` on each axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pos {
    pub x: u16,
    pub y: u16,
}

impl Pos {
    /// The position of pixel (`px`, `py`) on a display of `w`×`h` pixels.
    pub fn from_pixel(px: u32, py: u32, w: u32, h: u32) -> Pos {
        let norm = |p: u32, n: u32| -> u16 {
            if n <= 1 {
                return 0;
            }
            let p = p.min(n - 1) as u64;
            ((p * 65535 + (n as u64 - 1) / 2) / (n as u64 - 1)) as u16
        };
        Pos {
            x: norm(px, w),
            y: norm(py, h),
        }
    }

    /// The pixel this position falls on, on a display of `w`×`h` pixels.
    pub fn to_pixel(self, w: u32, h: u32) -> (u32, u32) {
        let px = |v: u16, n: u32| -> u32 {
            if n <= 1 {
                return 0;
            }
            ((v as u64 * (n as u64 - 1) + 32767) / 65535) as u32
        };
        (px(self.x, w), px(self.y, h))
    }

    /// Maps a point in a view that shows the remote `w`×`h` display scaled to `view_w`×`view_h`
    /// (e.g. the console window) to a display position: the remote pixel under the point.
    pub fn from_view(vx: f32, vy: f32, view_w: f32, view_h: f32, w: u32, h: u32) -> Pos {
        let pixel = |v: f32, vn: f32, n: u32| -> u32 {
            if vn <= 0.0 || n == 0 {
                return 0;
            }
            ((v / vn * n as f32).floor().max(0.0) as u32).min(n - 1)
        };
        Pos::from_pixel(pixel(vx, view_w, w), pixel(vy, view_h, h), w, h)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum MouseButton {
    Left,
    Middle,
    Right,
    Back,
    Forward,
}

/// Named key combinations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Combo {
    /// Ctrl+Alt+Delete. Windows' secure attention sequence has no X11 equivalent: on X11 the keys are
    /// pressed as such (desktops usually open their log-out or task dialog).
    CtrlAltDel,
    AltTab,
    AltShiftTab,
    AltF4,
    /// The Super (Windows) key alone: opens the start menu / overview.
    Super,
    CtrlEsc,
    CtrlShiftEsc,
    PrintScreen,
}

/// One input event from the console.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum InputEvent {
    Button {
        button: MouseButton,
        pressed: bool,
        at: Pos,
    },
    /// Wheel movement in notches (lines); fractions (smooth scrolling) accumulate on the agent.
    /// Positive `dy` scrolls down, positive `dx` right.
    Wheel {
        dx: f32,
        dy: f32,
        at: Pos,
    },
    /// A physical key (USB HID usage, page 7).
    Key {
        usage: u16,
        pressed: bool,
    },
    /// Text typed as Unicode, whatever the user's layout (at most [`MAX_TEXT`] bytes).
    Text {
        text: String,
    },
    Combo {
        combo: Combo,
    },
    /// Release every key and button the technician holds.
    ReleaseAll,
}

/// Longest text in one [`InputEvent::Text`].
pub const MAX_TEXT: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("input message could not be decoded")]
    Malformed,
    #[error("text input longer than {MAX_TEXT} bytes")]
    TextTooLong,
    #[error("wheel movement is not a finite number")]
    BadWheel,
}

impl InputEvent {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes and validates an event from the session's input channel.
    pub fn decode(bytes: &[u8]) -> Result<InputEvent, EventError> {
        let (e, rest): (InputEvent, &[u8]) =
            postcard::take_from_bytes(bytes).map_err(|_| EventError::Malformed)?;
        if !rest.is_empty() {
            return Err(EventError::Malformed);
        }
        match &e {
            InputEvent::Text { text } if text.len() > MAX_TEXT => Err(EventError::TextTooLong),
            InputEvent::Wheel { dx, dy, .. } if !dx.is_finite() || !dy.is_finite() => {
                Err(EventError::BadWheel)
            }
            _ => Ok(e),
        }
    }
}

/// Encodes a pointer position for the newest-wins pointer channel.
pub fn encode_pointer(p: Pos) -> [u8; 4] {
    let mut b = [0u8; 4];
    b[..2].copy_from_slice(&p.x.to_be_bytes());
    b[2..].copy_from_slice(&p.y.to_be_bytes());
    b
}

pub fn decode_pointer(b: &[u8]) -> Result<Pos, EventError> {
    if b.len() != 4 {
        return Err(EventError::Malformed);
    }
    Ok(Pos {
        x: u16::from_be_bytes([b[0], b[1]]),
        y: u16::from_be_bytes([b[2], b[3]]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_positions_round_trip_on_common_displays() {
        for (w, h) in [
            (1, 1),
            (2, 2),
            (640, 480),
            (1280, 800),
            (1920, 1080),
            (3840, 2160),
            (7680, 4320),
        ] {
            for (px, py) in [
                (0, 0),
                (w - 1, h - 1),
                (w / 2, h / 3),
                (1.min(w - 1), 7.min(h - 1)),
            ] {
                let p = Pos::from_pixel(px, py, w, h);
                assert_eq!(p.to_pixel(w, h), (px, py), "{w}x{h} at {px},{py}");
            }
        }
    }

    #[test]
    fn every_pixel_of_a_display_round_trips() {
        let (w, h) = (1921, 1081);
        for px in 0..w {
            assert_eq!(Pos::from_pixel(px, 0, w, h).to_pixel(w, h).0, px);
        }
        for py in 0..h {
            assert_eq!(Pos::from_pixel(0, py, w, h).to_pixel(w, h).1, py);
        }
    }

    #[test]
    fn scaled_views_map_to_the_right_pixel() {
        // A 1280x800 display shown at half size, at 1.5x, and stretched.
        let (w, h) = (1280, 800);
        for (vw, vh, scale_x, scale_y) in [
            (640.0, 400.0, 0.5, 0.5),
            (1920.0, 1200.0, 1.5, 1.5),
            (1000.0, 800.0, 1000.0 / 1280.0, 1.0),
        ] {
            for (px, py) in [(0u32, 0u32), (200, 100), (1279, 799), (640, 400)] {
                // The console points at the centre of the remote pixel in its view.
                let vx = (px as f32 + 0.5) * scale_x;
                let vy = (py as f32 + 0.5) * scale_y;
                let (gx, gy) = Pos::from_view(vx, vy, vw, vh, w, h).to_pixel(w, h);
                assert_eq!((gx, gy), (px, py), "view {vw}x{vh}");
            }
        }
    }

    #[test]
    fn events_round_trip_and_bad_ones_are_refused() {
        let events = vec![
            InputEvent::Button {
                button: MouseButton::Back,
                pressed: true,
                at: Pos { x: 1, y: 2 },
            },
            InputEvent::Wheel {
                dx: -0.25,
                dy: 3.0,
                at: Pos { x: 9, y: 9 },
            },
            InputEvent::Key {
                usage: 0xE1,
                pressed: false,
            },
            InputEvent::Text {
                text: "é€ü 漢字".into(),
            },
            InputEvent::Combo {
                combo: Combo::CtrlAltDel,
            },
            InputEvent::ReleaseAll,
        ];
        for e in events {
            assert_eq!(InputEvent::decode(&e.encode()).unwrap(), e);
        }
        assert_eq!(InputEvent::decode(&[]), Err(EventError::Malformed));
        assert_eq!(InputEvent::decode(&[250, 1]), Err(EventError::Malformed));
        let long = InputEvent::Text {
            text: "x".repeat(MAX_TEXT + 1),
        };
        assert_eq!(
            InputEvent::decode(&long.encode()),
            Err(EventError::TextTooLong)
        );
        let nan = InputEvent::Wheel {
            dx: f32::NAN,
            dy: 0.0,
            at: Pos { x: 0, y: 0 },
        };
        assert_eq!(InputEvent::decode(&nan.encode()), Err(EventError::BadWheel));
        let mut trailing = InputEvent::ReleaseAll.encode();
        trailing.push(0);
        assert_eq!(InputEvent::decode(&trailing), Err(EventError::Malformed));
        assert_eq!(
            decode_pointer(&encode_pointer(Pos { x: 65535, y: 3 })),
            Ok(Pos { x: 65535, y: 3 })
        );
        assert!(decode_pointer(&[1, 2, 3]).is_err());
    }
}
