//! X11 test fixtures: an Xvfb server per test, and a client that records the input events the X server
//! delivers (so that tests observe injected input through the X server, not through the injector).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use x11rb::connection::Connection;
use x11rb::protocol::Event;
use x11rb::protocol::xproto::CreateGCAux as CreateWindowAuxGc;
use x11rb::protocol::xproto::{ConnectionExt, CreateWindowAux, EventMask, InputFocus, WindowClass};
use x11rb::rust_connection::RustConnection;
use x11rb::wrapper::ConnectionExt as _;

/// An Xvfb server on a free display, killed when dropped.
pub struct Xvfb {
    child: std::process::Child,
    pub display: String,
    pub width: u32,
    pub height: u32,
}

impl Xvfb {
    pub fn start(width: u32, height: u32) -> Xvfb {
        let seed = std::process::id() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() as u64)
                .unwrap_or(0);
        for attempt in 0..50u64 {
            let mixed = (seed ^ attempt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let n = 200 + (mixed >> 33) % 30000;
            if std::path::Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
                || std::path::Path::new(&format!("/tmp/.X{n}-lock")).exists()
            {
                continue;
            }
            let mut child = std::process::Command::new("Xvfb")
                .arg(format!(":{n}"))
                .args(["-screen", "0", &format!("{width}x{height}x24")])
                .args(["-nolisten", "tcp", "-noreset"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("Xvfb not installed: run scripts/deps.sh");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // display taken; try another
                }
                if std::path::Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
                    && RustConnection::connect(Some(&format!(":{n}"))).is_ok()
                {
                    return Xvfb {
                        child,
                        display: format!(":{n}"),
                        width,
                        height,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start Xvfb");
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        // SIGTERM lets Xvfb remove its lock file and socket; SIGKILL only if it does not exit.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    KeyPress,
    KeyRelease,
    ButtonPress,
    ButtonRelease,
    Motion,
}

/// One input event as the X server delivered it to the recorder's window.
#[derive(Clone, Debug)]
pub struct XEv {
    pub kind: Kind,
    /// Keycode or button number.
    pub detail: u8,
    pub x: i16,
    pub y: i16,
    /// Modifier and button mask at the time.
    pub state: u16,
    /// For keys: the keysym the keycode had when the event arrived.
    pub keysym: u32,
    pub at: Instant,
}

/// A full-screen window that records the input events it receives (and, started with
/// [`XRecorder::start_drawing`], draws what it gets: a 40×40 magenta block centred on each click
/// and a 16×16 green block per key press, left to right from (20, 20)).
pub struct XRecorder {
    conn: Arc<RustConnection>,
    pub events: Arc<Mutex<Vec<XEv>>>,
    root: u32,
    /// The full-screen window (others may draw on it: [`Painter::fill_on`]).
    pub window: u32,
}

impl XRecorder {
    pub fn start(x: &Xvfb) -> XRecorder {
        Self::start_with(x, false)
    }

    /// A recorder that draws what it gets (see the type's description).
    pub fn start_drawing(x: &Xvfb) -> XRecorder {
        Self::start_with(x, true)
    }

    fn start_with(x: &Xvfb, draw: bool) -> XRecorder {
        let (conn, screen_num) = RustConnection::connect(Some(&x.display)).unwrap();
        let conn = Arc::new(conn);
        let screen = &conn.setup().roots[screen_num];
        let root = screen.root;
        let win = conn.generate_id().unwrap();
        conn.create_window(
            screen.root_depth,
            win,
            root,
            0,
            0,
            x.width as u16,
            x.height as u16,
            0,
            WindowClass::INPUT_OUTPUT,
            screen.root_visual,
            &CreateWindowAux::new()
                .override_redirect(1)
                .background_pixel(0xffffff)
                .event_mask(
                    EventMask::KEY_PRESS
                        | EventMask::KEY_RELEASE
                        | EventMask::BUTTON_PRESS
                        | EventMask::BUTTON_RELEASE
                        | EventMask::POINTER_MOTION,
                ),
        )
        .unwrap();
        conn.map_window(win).unwrap();
        conn.sync().unwrap();
        conn.set_input_focus(InputFocus::POINTER_ROOT, win, x11rb::CURRENT_TIME)
            .unwrap();
        conn.sync().unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let gc = conn.generate_id().unwrap();
        conn.create_gc(gc, win, &CreateWindowAuxGc::new()).unwrap();
        let (c, ev) = (conn.clone(), events.clone());
        let mut keys_drawn = 0i16;
        // A second connection for keysym look-ups while the first waits for events.
        let (lookup, _) = RustConnection::connect(Some(&x.display)).unwrap();
        std::thread::spawn(move || {
            let min = lookup.setup().min_keycode;
            while let Ok(e) = c.wait_for_event() {
                let at = Instant::now();
                let keysym = |code: u8| -> u32 {
                    lookup
                        .get_keyboard_mapping(code, 1)
                        .ok()
                        .and_then(|r| r.reply().ok())
                        .and_then(|r| r.keysyms.first().copied())
                        .unwrap_or(0)
                };
                let _ = min;
                let rec = match e {
                    Event::KeyPress(k) => Some(XEv {
                        kind: Kind::KeyPress,
                        detail: k.detail,
                        x: k.event_x,
                        y: k.event_y,
                        state: k.state.into(),
                        keysym: keysym(k.detail),
                        at,
                    }),
                    Event::KeyRelease(k) => Some(XEv {
                        kind: Kind::KeyRelease,
                        detail: k.detail,
                        x: k.event_x,
                        y: k.event_y,
                        state: k.state.into(),
                        keysym: keysym(k.detail),
                        at,
                    }),
                    Event::ButtonPress(b) => Some(XEv {
                        kind: Kind::ButtonPress,
                        detail: b.detail,
                        x: b.event_x,
                        y: b.event_y,
                        state: b.state.into(),
                        keysym: 0,
                        at,
                    }),
                    Event::ButtonRelease(b) => Some(XEv {
                        kind: Kind::ButtonRelease,
                        detail: b.detail,
                        x: b.event_x,
                        y: b.event_y,
                        state: b.state.into(),
                        keysym: 0,
                        at,
                    }),
                    Event::MotionNotify(m) => Some(XEv {
                        kind: Kind::Motion,
                        detail: 0,
                        x: m.event_x,
                        y: m.event_y,
                        state: m.state.into(),
                        keysym: 0,
                        at,
                    }),
                    _ => None,
                };
                if let Some(r) = rec {
                    if draw {
                        use x11rb::protocol::xproto::{ChangeGCAux, Rectangle};
                        let block = match r.kind {
                            Kind::ButtonPress => Some((0xff00ff, r.x - 20, r.y - 20, 40)),
                            Kind::KeyPress => {
                                keys_drawn += 1;
                                Some((0x00c000, 20 * keys_drawn, 20, 16))
                            }
                            _ => None,
                        };
                        if let Some((color, x, y, side)) = block {
                            let _ = c.change_gc(gc, &ChangeGCAux::new().foreground(color));
                            let _ = c.poly_fill_rectangle(
                                win,
                                gc,
                                &[Rectangle {
                                    x,
                                    y,
                                    width: side,
                                    height: side,
                                }],
                            );
                            let _ = c.flush();
                        }
                    }
                    ev.lock().unwrap().push(r);
                }
            }
        });
        XRecorder {
            conn,
            events,
            root,
            window: win,
        }
    }

    /// Waits until `n` events matching `pred` were recorded; returns them.
    pub fn wait_for(&self, n: usize, timeout: Duration, pred: impl Fn(&XEv) -> bool) -> Vec<XEv> {
        let deadline = Instant::now() + timeout;
        loop {
            let got: Vec<XEv> = self
                .events
                .lock()
                .unwrap()
                .iter()
                .filter(|e| pred(e))
                .cloned()
                .collect();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Input events recorded so far (keys and buttons; motion left out).
    pub fn keys_and_buttons(&self) -> Vec<XEv> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.kind != Kind::Motion)
            .cloned()
            .collect()
    }

    pub fn clear(&self) {
        self.events.lock().unwrap().clear();
    }

    /// The pointer position, from the X server.
    pub fn pointer(&self) -> (i16, i16) {
        let r = self.conn.query_pointer(self.root).unwrap().reply().unwrap();
        (r.root_x, r.root_y)
    }

    /// Keycodes the X server considers pressed.
    pub fn pressed_keys(&self) -> Vec<u8> {
        let r = self.conn.query_keymap().unwrap().reply().unwrap();
        let mut out = vec![];
        for (i, byte) in r.keys.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    out.push((i * 8 + bit) as u8);
                }
            }
        }
        out
    }

    /// Pointer buttons the X server considers pressed (mask bits 8..12 of the pointer state).
    pub fn pressed_buttons(&self) -> u16 {
        let r = self.conn.query_pointer(self.root).unwrap().reply().unwrap();
        u16::from(r.mask) & 0x1f00
    }
}

/// Draws on the root window of a display: filled rectangles and text in the server's built-in
/// `fixed` font (scenes for capture tests, benchmarks and the demo screen).
pub struct Painter {
    pub conn: RustConnection,
    pub root: u32,
    pub gc: u32,
    pub text_gc: u32,
    pub w: u16,
    pub h: u16,
    depth: u8,
    seed: u32,
}

/// Words for terminal-like text.
pub const WORDS: [&str; 14] = [
    "printer",
    "queue",
    "status",
    "error:",
    "spooler",
    "restart",
    "driver",
    "C:\\Users",
    "ok",
    "tandem",
    "ping",
    "192.168.1.20",
    "--help",
    "fn main() {",
];

impl Painter {
    pub fn new(display: &str) -> Painter {
        use x11rb::protocol::xproto::ConnectionExt as _;
        let (conn, n) = RustConnection::connect(Some(display)).unwrap();
        let screen = &conn.setup().roots[n];
        let (root, w, h) = (screen.root, screen.width_in_pixels, screen.height_in_pixels);
        let depth = screen.root_depth;
        let gc = conn.generate_id().unwrap();
        conn.create_gc(gc, root, &CreateWindowAuxGc::new()).unwrap();
        let font = conn.generate_id().unwrap();
        conn.open_font(font, b"fixed").unwrap();
        let text_gc = conn.generate_id().unwrap();
        conn.create_gc(
            text_gc,
            root,
            &CreateWindowAuxGc::new()
                .font(font)
                .foreground(0x101010)
                .background(0xffffff),
        )
        .unwrap();
        Painter {
            conn,
            root,
            gc,
            text_gc,
            w,
            h,
            depth,
            seed: 1,
        }
    }

    pub fn rnd(&mut self) -> u32 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 17;
        self.seed ^= self.seed << 5;
        self.seed
    }

    /// Fills a rectangle of the root window with 0xRRGGBB.
    pub fn fill(&self, color: u32, x: i16, y: i16, w: u16, h: u16) {
        self.fill_on(self.root, color, x, y, w, h);
    }

    /// Fills a rectangle of `drawable` (the root window or a pixmap of its depth) with 0xRRGGBB.
    pub fn fill_on(&self, drawable: u32, color: u32, x: i16, y: i16, w: u16, h: u16) {
        use x11rb::protocol::xproto::{ChangeGCAux, ConnectionExt as _, Rectangle};
        self.conn
            .change_gc(self.gc, &ChangeGCAux::new().foreground(color))
            .unwrap();
        self.conn
            .poly_fill_rectangle(
                drawable,
                self.gc,
                &[Rectangle {
                    x,
                    y,
                    width: w,
                    height: h,
                }],
            )
            .unwrap();
    }

    /// Draws `paint` into an off-screen pixmap of `w`×`h` and copies it to the root window at
    /// (`x`, `y`) in one request, as double-buffered applications present a frame: a capture sees
    /// all of it or none of it.
    pub fn present(&self, x: i16, y: i16, w: u16, h: u16, paint: impl FnOnce(&Painter, u32)) {
        use x11rb::protocol::xproto::ConnectionExt as _;
        let pixmap = self.conn.generate_id().unwrap();
        self.conn
            .create_pixmap(self.depth, pixmap, self.root, w, h)
            .unwrap();
        paint(self, pixmap);
        self.conn
            .copy_area(pixmap, self.root, self.gc, 0, 0, x, y, w, h)
            .unwrap();
        self.conn.free_pixmap(pixmap).unwrap();
    }

    /// Draws text (at most 255 bytes) with its baseline at `y`.
    pub fn text(&self, x: i16, y: i16, s: &str) {
        use x11rb::protocol::xproto::ConnectionExt as _;
        let b = &s.as_bytes()[..s.len().min(255)];
        self.conn
            .image_text8(self.root, self.text_gc, x, y, b)
            .unwrap();
    }

    /// One line of terminal-like text with its baseline at `y`, clearing the line first.
    pub fn line(&mut self, y: i16, n: usize) {
        let mut line = format!("{n:5}  ");
        while line.len() < (self.w as usize / 6).saturating_sub(12).min(240) {
            let i = (self.rnd() as usize) % WORDS.len();
            line.push_str(WORDS[i]);
            line.push(' ');
        }
        self.fill(0xffffff, 0, y - 12, self.w, 15);
        self.text(4, y, &line);
    }

    /// A whole screen of terminal-like text, lines numbered from `first`.
    pub fn page(&mut self, first: usize) {
        self.fill(0xffffff, 0, 0, self.w, self.h);
        for (i, y) in (14..self.h as i16).step_by(15).enumerate() {
            self.line(y, first + i);
        }
    }

    pub fn sync(&self) {
        self.conn.sync().unwrap();
    }
}
