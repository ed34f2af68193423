//! Physical keys: USB HID usages (page 7) to Linux evdev codes. On X servers with the evdev keymap
//! (Xorg, Xvfb, Xwayland) the X keycode is the evdev code + 8.

/// Well-known HID usages, for the console and for tests.
pub mod usage {
    pub const A: u16 = 0x04;
    pub const C: u16 = 0x06;
    pub const V: u16 = 0x19;
    pub const Z: u16 = 0x1D;
    pub const DIGIT_1: u16 = 0x1E;
    pub const ENTER: u16 = 0x28;
    pub const ESCAPE: u16 = 0x29;
    pub const BACKSPACE: u16 = 0x2A;
    pub const TAB: u16 = 0x2B;
    pub const SPACE: u16 = 0x2C;
    pub const F4: u16 = 0x3D;
    pub const PRINT_SCREEN: u16 = 0x46;
    pub const DELETE: u16 = 0x4C;
    pub const LEFT_CTRL: u16 = 0xE0;
    pub const LEFT_SHIFT: u16 = 0xE1;
    pub const LEFT_ALT: u16 = 0xE2;
    pub const LEFT_GUI: u16 = 0xE3;
    pub const RIGHT_CTRL: u16 = 0xE4;
    pub const RIGHT_SHIFT: u16 = 0xE5;
    pub const RIGHT_ALT: u16 = 0xE6;
    pub const RIGHT_GUI: u16 = 0xE7;
}

/// The evdev code of a HID usage, if it is a key Tandem forwards.
pub fn hid_to_evdev(usage: u16) -> Option<u16> {
    let code = match usage {
        // Letters a..z: HID 0x04..0x1D.
        0x04..=0x1D => {
            const LETTERS: [u16; 26] = [
                30, 48, 46, 32, 18, 33, 34, 35, 23, 36, 37, 38, 50, 49, 24, 25, 16, 19, 31, 20, 22,
                47, 17, 45, 21, 44,
            ];
            LETTERS[(usage - 0x04) as usize]
        }
        // Digits 1..9, 0: HID 0x1E..0x27 → evdev 2..11.
        0x1E..=0x27 => usage - 0x1E + 2,
        0x28 => 28, // Enter
        0x29 => 1,  // Escape
        0x2A => 14, // Backspace
        0x2B => 15, // Tab
        0x2C => 57, // Space
        0x2D => 12, // Minus
        0x2E => 13, // Equal
        0x2F => 26, // [
        0x30 => 27, // ]
        0x31 => 43, // Backslash
        0x32 => 43, // Non-US # (same position as backslash on ISO)
        0x33 => 39, // ;
        0x34 => 40, // '
        0x35 => 41, // `
        0x36 => 51, // ,
        0x37 => 52, // .
        0x38 => 53, // /
        0x39 => 58, // Caps Lock
        // F1..F10: HID 0x3A..0x43 → evdev 59..68; F11, F12.
        0x3A..=0x43 => usage - 0x3A + 59,
        0x44 => 87,
        0x45 => 88,
        0x46 => 99,  // Print Screen (SysRq)
        0x47 => 70,  // Scroll Lock
        0x48 => 119, // Pause
        0x49 => 110, // Insert
        0x4A => 102, // Home
        0x4B => 104, // Page Up
        0x4C => 111, // Delete
        0x4D => 107, // End
        0x4E => 109, // Page Down
        0x4F => 106, // Right
        0x50 => 105, // Left
        0x51 => 108, // Down
        0x52 => 103, // Up
        0x53 => 69,  // Num Lock
        0x54 => 98,  // Keypad /
        0x55 => 55,  // Keypad *
        0x56 => 74,  // Keypad -
        0x57 => 78,  // Keypad +
        0x58 => 96,  // Keypad Enter
        // Keypad 1..9, 0.
        0x59 => 79,
        0x5A => 80,
        0x5B => 81,
        0x5C => 75,
        0x5D => 76,
        0x5E => 77,
        0x5F => 71,
        0x60 => 72,
        0x61 => 73,
        0x62 => 82,
        0x63 => 83,  // Keypad .
        0x64 => 86,  // Non-US backslash (ISO key left of Z)
        0x65 => 127, // Application / Compose (menu key)
        0x67 => 117, // Keypad =
        // F13..F24: HID 0x68..0x73 → evdev 183..194.
        0x68..=0x73 => usage - 0x68 + 183,
        0x7F => 113, // Mute
        0x80 => 115, // Volume up
        0x81 => 114, // Volume down
        0xE0 => 29,  // Left Ctrl
        0xE1 => 42,  // Left Shift
        0xE2 => 56,  // Left Alt
        0xE3 => 125, // Left GUI (Super)
        0xE4 => 97,  // Right Ctrl
        0xE5 => 54,  // Right Shift
        0xE6 => 100, // Right Alt (AltGr)
        0xE7 => 126, // Right GUI
        _ => return None,
    };
    Some(code)
}

/// The HID usage of a key by name: letters and digits, egui's key names (`Enter`, `Escape`,
/// `ArrowUp` or `Up`, `PageDown`, `F5`, `Minus`, `Backtick`, …) and the modifiers `Ctrl`, `Shift`,
/// `Alt`, `Super` (left ones; `RightCtrl` etc. for the others). Case does not matter. Used by the
/// console's window (egui keys) and its input scripts.
pub fn usage_by_name(name: &str) -> Option<u16> {
    let n = name.trim().to_ascii_lowercase();
    let b = n.as_bytes();
    if b.len() == 1 {
        return match b[0] {
            c @ b'a'..=b'z' => Some(0x04 + (c - b'a') as u16),
            b'0' => Some(0x27),
            c @ b'1'..=b'9' => Some(0x1E + (c - b'1') as u16),
            b'-' => Some(0x2D),
            b'=' => Some(0x2E),
            b'[' => Some(0x2F),
            b']' => Some(0x30),
            b'\\' => Some(0x31),
            b';' => Some(0x33),
            b'\'' => Some(0x34),
            b'`' => Some(0x35),
            b',' => Some(0x36),
            b'.' => Some(0x37),
            b'/' => Some(0x38),
            _ => None,
        };
    }
    if let Some(num) = n.strip_prefix('f').and_then(|d| d.parse::<u16>().ok()) {
        return match num {
            1..=12 => Some(0x3A + num - 1),
            13..=24 => Some(0x68 + num - 13),
            _ => None,
        };
    }
    if let Some(d) = n.strip_prefix("num").and_then(|d| d.parse::<u16>().ok()) {
        return match d {
            0 => Some(0x27),
            1..=9 => Some(0x1E + d - 1),
            _ => None,
        };
    }
    Some(match n.as_str() {
        "enter" | "return" => 0x28,
        "escape" | "esc" => 0x29,
        "backspace" => 0x2A,
        "tab" => 0x2B,
        "space" => 0x2C,
        "minus" => 0x2D,
        "equals" | "plus" => 0x2E,
        "openbracket" => 0x2F,
        "closebracket" => 0x30,
        "backslash" => 0x31,
        "semicolon" => 0x33,
        "quote" => 0x34,
        "backtick" => 0x35,
        "comma" => 0x36,
        "period" => 0x37,
        "slash" => 0x38,
        "capslock" => 0x39,
        "printscreen" => 0x46,
        "scrolllock" => 0x47,
        "pause" => 0x48,
        "insert" => 0x49,
        "home" => 0x4A,
        "pageup" => 0x4B,
        "delete" => 0x4C,
        "end" => 0x4D,
        "pagedown" => 0x4E,
        "right" | "arrowright" => 0x4F,
        "left" | "arrowleft" => 0x50,
        "down" | "arrowdown" => 0x51,
        "up" | "arrowup" => 0x52,
        "menu" | "contextmenu" => 0x65,
        "ctrl" | "control" => usage::LEFT_CTRL,
        "shift" => usage::LEFT_SHIFT,
        "alt" => usage::LEFT_ALT,
        "super" | "win" | "meta" | "command" => usage::LEFT_GUI,
        "rightctrl" => usage::RIGHT_CTRL,
        "rightshift" => usage::RIGHT_SHIFT,
        "rightalt" | "altgr" => usage::RIGHT_ALT,
        "rightsuper" => usage::RIGHT_GUI,
        _ => return None,
    })
}

/// The X11 keycode of a HID usage (evdev keymap).
pub fn hid_to_x11(usage: u16) -> Option<u8> {
    hid_to_evdev(usage).and_then(|c| u8::try_from(c + 8).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_keys() {
        // X keycodes as `xev` prints them on an evdev keymap.
        assert_eq!(hid_to_x11(usage::A), Some(38));
        assert_eq!(hid_to_x11(usage::Z), Some(52));
        assert_eq!(hid_to_x11(usage::ESCAPE), Some(9));
        assert_eq!(hid_to_x11(usage::DIGIT_1), Some(10));
        assert_eq!(hid_to_x11(0x27), Some(19)); // 0
        assert_eq!(hid_to_x11(usage::ENTER), Some(36));
        assert_eq!(hid_to_x11(usage::LEFT_CTRL), Some(37));
        assert_eq!(hid_to_x11(usage::LEFT_SHIFT), Some(50));
        assert_eq!(hid_to_x11(usage::LEFT_ALT), Some(64));
        assert_eq!(hid_to_x11(usage::LEFT_GUI), Some(133));
        assert_eq!(hid_to_x11(usage::DELETE), Some(119));
        assert_eq!(hid_to_x11(0x3A), Some(67)); // F1
        assert_eq!(hid_to_x11(0x45), Some(96)); // F12
        assert_eq!(hid_to_x11(0x68), Some(191)); // F13
        assert_eq!(hid_to_x11(0x50), Some(113)); // Left arrow
        assert_eq!(hid_to_x11(0x00), None);
        assert_eq!(hid_to_x11(0xFFFF), None);
    }

    #[test]
    fn letters_are_distinct() {
        let mut seen = std::collections::HashSet::new();
        for u in 0x04..=0x1Du16 {
            assert!(seen.insert(hid_to_evdev(u).unwrap()));
        }
    }

    #[test]
    fn names_map_to_forwarded_keys() {
        assert_eq!(usage_by_name("a"), Some(usage::A));
        assert_eq!(usage_by_name("Z"), Some(usage::Z));
        assert_eq!(usage_by_name("1"), Some(usage::DIGIT_1));
        assert_eq!(usage_by_name("Num1"), Some(usage::DIGIT_1));
        assert_eq!(usage_by_name("0"), Some(0x27));
        assert_eq!(usage_by_name("Enter"), Some(usage::ENTER));
        assert_eq!(usage_by_name("ArrowUp"), usage_by_name("up"));
        assert_eq!(usage_by_name("F4"), Some(usage::F4));
        assert_eq!(usage_by_name("F13"), Some(0x68));
        assert_eq!(usage_by_name("ctrl"), Some(usage::LEFT_CTRL));
        assert_eq!(usage_by_name("F25"), None);
        assert_eq!(usage_by_name("nonsense"), None);
        for name in [
            "Escape", "Tab", "Space", "Minus", "Backtick", "Delete", "PageDown", "Home", "Super",
            "RightAlt", "Slash", ";", "\\",
        ] {
            let u = usage_by_name(name).unwrap_or_else(|| panic!("{name}"));
            assert!(hid_to_evdev(u).is_some(), "{name} is not forwarded");
        }
    }
}
