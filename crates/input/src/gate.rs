//! The agent's input gate: a pure state machine between the console's events and the injector.
//!
//! * Nothing passes before the user allowed control, nor in view-only mode: the gate drops it, whatever
//!   the console sends. This is checked here, on the agent.
//! * It remembers every key and button it pressed, so that [`InputGate::release_all`] (session end,
//!   lost link, switch to view-only) leaves nothing stuck; a release for something it did not press is
//!   ignored, so the technician cannot release the user's own keys.
//! * Wheel fractions (smooth scrolling) accumulate into whole notches, which is what X11 has.
//! * Pointer positions are mapped to pixels of the shared display; repeated positions are skipped.

use crate::event::{Combo, InputEvent, MouseButton, Pos};
use crate::keymap::{hid_to_x11, usage};
use std::collections::BTreeSet;

/// What the user allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    /// Not (yet) allowed: consent pending or denied.
    None,
    ViewOnly,
    Control,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScrollAxis {
    Vertical,
    Horizontal,
}

/// What to do on the user's machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Move the pointer to this absolute screen position.
    MoveTo {
        x: i32,
        y: i32,
    },
    Button {
        button: MouseButton,
        pressed: bool,
    },
    /// Wheel notches; positive is down / right.
    Scroll {
        axis: ScrollAxis,
        clicks: i32,
    },
    /// An X11 keycode.
    Key {
        keycode: u8,
        pressed: bool,
    },
    Text(String),
}

/// The shared display, in screen coordinates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DisplayRect {
    pub x: i32,
    pub y: i32,
    pub width: u32,
    pub height: u32,
}

/// At most this many wheel notches from one event (a hostile console cannot spin the wheel forever).
const MAX_CLICKS: i32 = 100;

#[derive(Debug)]
pub struct InputGate {
    permission: Permission,
    display: DisplayRect,
    held_keys: Vec<u8>,
    held_buttons: BTreeSet<MouseButton>,
    wheel: (f32, f32),
    last: Option<(i32, i32)>,
    /// Events dropped because input was not allowed.
    pub refused: u64,
    /// Keys the agent does not know (not forwarded).
    pub unknown_keys: u64,
}

impl InputGate {
    pub fn new(display: DisplayRect) -> Self {
        InputGate {
            permission: Permission::None,
            display,
            held_keys: Vec::new(),
            held_buttons: BTreeSet::new(),
            wheel: (0.0, 0.0),
            last: None,
            refused: 0,
            unknown_keys: 0,
        }
    }

    pub fn permission(&self) -> Permission {
        self.permission
    }

    /// Changes what the technician may do. Leaving `Control` releases everything held.
    pub fn set_permission(&mut self, p: Permission) -> Vec<Action> {
        self.permission = p;
        if p == Permission::Control {
            Vec::new()
        } else {
            self.release_all()
        }
    }

    pub fn set_display(&mut self, d: DisplayRect) {
        self.display = d;
        self.last = None;
    }

    fn allowed(&mut self) -> bool {
        if self.permission == Permission::Control {
            true
        } else {
            self.refused += 1;
            false
        }
    }

    fn move_to(&mut self, at: Pos, out: &mut Vec<Action>) {
        let (px, py) = at.to_pixel(self.display.width, self.display.height);
        let p = (self.display.x + px as i32, self.display.y + py as i32);
        if self.last != Some(p) {
            self.last = Some(p);
            out.push(Action::MoveTo { x: p.0, y: p.1 });
        }
    }

    /// A pointer position (newest-wins channel).
    pub fn pointer(&mut self, at: Pos) -> Vec<Action> {
        let mut out = Vec::new();
        if self.allowed() {
            self.move_to(at, &mut out);
        }
        out
    }

    /// An event from the reliable channel.
    pub fn event(&mut self, e: &InputEvent) -> Vec<Action> {
        let mut out = Vec::new();
        if *e == InputEvent::ReleaseAll {
            return self.release_all();
        }
        if !self.allowed() {
            return out;
        }
        match e {
            InputEvent::Button {
                button,
                pressed,
                at,
            } => {
                self.move_to(*at, &mut out);
                let changed = if *pressed {
                    self.held_buttons.insert(*button)
                } else {
                    self.held_buttons.remove(button)
                };
                if changed {
                    out.push(Action::Button {
                        button: *button,
                        pressed: *pressed,
                    });
                }
            }
            InputEvent::Wheel { dx, dy, at } => {
                self.move_to(*at, &mut out);
                for (axis, acc, d) in [
                    (ScrollAxis::Vertical, &mut self.wheel.1, *dy),
                    (ScrollAxis::Horizontal, &mut self.wheel.0, *dx),
                ] {
                    *acc = (*acc + d).clamp(-(MAX_CLICKS as f32), MAX_CLICKS as f32);
                    let clicks = acc.trunc() as i32;
                    if clicks != 0 {
                        *acc -= clicks as f32;
                        out.push(Action::Scroll { axis, clicks });
                    }
                }
            }
            InputEvent::Key { usage, pressed } => match hid_to_x11(*usage) {
                Some(keycode) => {
                    if *pressed {
                        if !self.held_keys.contains(&keycode) {
                            self.held_keys.push(keycode);
                        }
                        out.push(Action::Key {
                            keycode,
                            pressed: true,
                        });
                    } else if let Some(i) = self.held_keys.iter().position(|k| *k == keycode) {
                        self.held_keys.remove(i);
                        out.push(Action::Key {
                            keycode,
                            pressed: false,
                        });
                    }
                }
                None => self.unknown_keys += 1,
            },
            InputEvent::Text { text } => {
                if !text.is_empty() {
                    out.push(Action::Text(text.clone()));
                }
            }
            InputEvent::Combo { combo } => {
                let keys: &[u16] = match combo {
                    Combo::CtrlAltDel => &[usage::LEFT_CTRL, usage::LEFT_ALT, usage::DELETE],
                    Combo::AltTab => &[usage::LEFT_ALT, usage::TAB],
                    Combo::AltShiftTab => &[usage::LEFT_ALT, usage::LEFT_SHIFT, usage::TAB],
                    Combo::AltF4 => &[usage::LEFT_ALT, usage::F4],
                    Combo::Super => &[usage::LEFT_GUI],
                    Combo::CtrlEsc => &[usage::LEFT_CTRL, usage::ESCAPE],
                    Combo::CtrlShiftEsc => &[usage::LEFT_CTRL, usage::LEFT_SHIFT, usage::ESCAPE],
                    Combo::PrintScreen => &[usage::PRINT_SCREEN],
                };
                let codes: Vec<u8> = keys.iter().filter_map(|u| hid_to_x11(*u)).collect();
                for k in &codes {
                    out.push(Action::Key {
                        keycode: *k,
                        pressed: true,
                    });
                }
                for k in codes.iter().rev() {
                    out.push(Action::Key {
                        keycode: *k,
                        pressed: false,
                    });
                }
            }
            InputEvent::ReleaseAll => {}
        }
        out
    }

    /// Releases every key (newest first) and button the technician holds.
    pub fn release_all(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(k) = self.held_keys.pop() {
            out.push(Action::Key {
                keycode: k,
                pressed: false,
            });
        }
        for b in std::mem::take(&mut self.held_buttons) {
            out.push(Action::Button {
                button: b,
                pressed: false,
            });
        }
        self.wheel = (0.0, 0.0);
        out
    }

    /// Keys and buttons currently held by the technician.
    pub fn held(&self) -> (usize, usize) {
        (self.held_keys.len(), self.held_buttons.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: DisplayRect = DisplayRect {
        x: 0,
        y: 0,
        width: 1280,
        height: 800,
    };

    fn at(x: u32, y: u32) -> Pos {
        Pos::from_pixel(x, y, D.width, D.height)
    }

    fn key(u: u16, pressed: bool) -> InputEvent {
        InputEvent::Key { usage: u, pressed }
    }

    #[test]
    fn nothing_passes_before_consent_or_in_view_only() {
        let mut g = InputGate::new(D);
        let events = [
            key(usage::A, true),
            InputEvent::Button {
                button: MouseButton::Left,
                pressed: true,
                at: at(1, 1),
            },
            InputEvent::Text { text: "x".into() },
            InputEvent::Combo {
                combo: Combo::AltTab,
            },
        ];
        for e in &events {
            assert!(g.event(e).is_empty());
        }
        assert!(g.pointer(at(5, 5)).is_empty());
        assert_eq!(g.set_permission(Permission::ViewOnly), vec![]);
        for e in &events {
            assert!(g.event(e).is_empty());
        }
        assert_eq!(g.refused, 9);
        g.set_permission(Permission::Control);
        assert_eq!(
            g.event(&key(usage::A, true)),
            vec![Action::Key {
                keycode: 38,
                pressed: true
            }]
        );
    }

    #[test]
    fn leaving_control_releases_held_keys_and_buttons() {
        let mut g = InputGate::new(D);
        g.set_permission(Permission::Control);
        g.event(&key(usage::LEFT_SHIFT, true));
        g.event(&key(usage::A, true));
        g.event(&InputEvent::Button {
            button: MouseButton::Right,
            pressed: true,
            at: at(10, 10),
        });
        assert_eq!(g.held(), (2, 1));
        let r = g.set_permission(Permission::ViewOnly);
        assert_eq!(
            r,
            vec![
                Action::Key {
                    keycode: 38,
                    pressed: false
                },
                Action::Key {
                    keycode: 50,
                    pressed: false
                },
                Action::Button {
                    button: MouseButton::Right,
                    pressed: false
                },
            ]
        );
        assert_eq!(g.held(), (0, 0));
        assert!(g.release_all().is_empty());
    }

    #[test]
    fn releases_of_keys_not_pressed_by_the_technician_are_ignored() {
        let mut g = InputGate::new(D);
        g.set_permission(Permission::Control);
        assert!(g.event(&key(usage::LEFT_CTRL, false)).is_empty());
        assert!(
            g.event(&InputEvent::Button {
                button: MouseButton::Left,
                pressed: false,
                at: at(0, 0)
            })
            .iter()
            .all(|a| matches!(a, Action::MoveTo { .. }))
        );
    }

    #[test]
    fn clicks_move_first_and_land_on_the_pixel() {
        let mut g = InputGate::new(DisplayRect {
            x: 1920,
            y: 0,
            width: 1280,
            height: 800,
        });
        g.set_permission(Permission::Control);
        let a = g.event(&InputEvent::Button {
            button: MouseButton::Left,
            pressed: true,
            at: at(200, 100),
        });
        assert_eq!(
            a,
            vec![
                Action::MoveTo { x: 2120, y: 100 },
                Action::Button {
                    button: MouseButton::Left,
                    pressed: true
                }
            ]
        );
        // Same place again: no second move.
        let a = g.event(&InputEvent::Button {
            button: MouseButton::Left,
            pressed: false,
            at: at(200, 100),
        });
        assert_eq!(
            a,
            vec![Action::Button {
                button: MouseButton::Left,
                pressed: false
            }]
        );
    }

    #[test]
    fn smooth_wheel_accumulates_and_is_bounded() {
        let mut g = InputGate::new(D);
        g.set_permission(Permission::Control);
        let w = |dx: f32, dy: f32| InputEvent::Wheel {
            dx,
            dy,
            at: at(0, 0),
        };
        let scrolls = |v: Vec<Action>| -> Vec<Action> {
            v.into_iter()
                .filter(|a| matches!(a, Action::Scroll { .. }))
                .collect()
        };
        assert!(scrolls(g.event(&w(0.0, 0.4))).is_empty());
        assert!(scrolls(g.event(&w(0.0, 0.4))).is_empty());
        assert_eq!(
            scrolls(g.event(&w(0.0, 0.4))),
            vec![Action::Scroll {
                axis: ScrollAxis::Vertical,
                clicks: 1
            }]
        );
        assert_eq!(
            scrolls(g.event(&w(-2.0, 0.0))),
            vec![Action::Scroll {
                axis: ScrollAxis::Horizontal,
                clicks: -2
            }]
        );
        assert_eq!(
            scrolls(g.event(&w(0.0, 1e9))),
            vec![Action::Scroll {
                axis: ScrollAxis::Vertical,
                clicks: 100
            }]
        );
    }

    #[test]
    fn combos_press_and_release_in_order() {
        let mut g = InputGate::new(D);
        g.set_permission(Permission::Control);
        let a = g.event(&InputEvent::Combo {
            combo: Combo::CtrlAltDel,
        });
        let codes: Vec<(u8, bool)> = a
            .iter()
            .map(|x| match x {
                Action::Key { keycode, pressed } => (*keycode, *pressed),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            codes,
            vec![
                (37, true),
                (64, true),
                (119, true),
                (119, false),
                (64, false),
                (37, false)
            ]
        );
        assert_eq!(g.held(), (0, 0), "combos hold nothing afterwards");
    }

    #[test]
    fn unknown_keys_are_counted_not_injected() {
        let mut g = InputGate::new(D);
        g.set_permission(Permission::Control);
        assert!(g.event(&key(0x0000, true)).is_empty());
        assert_eq!(g.unknown_keys, 1);
    }
}
