//! The always-visible "someone is connected" banner on the agent's X11 screen.
//!
//! In an unattended session nobody clicked "accept", so the logged-in user must still be able to
//! see, at any moment, that a technician is connected. [`Banner::show`] puts a red bar across the
//! top of the X screen and keeps it there until the [`Banner`] is dropped.
//!
//! Decisions:
//!
//! * **Override-redirect window.** No window manager sees it, so none can move, iconify, tile or
//!   decorate it, and it never takes the focus. The price is that nobody else keeps it on top
//!   either: the banner does that itself (below).
//! * **Staying on top.** The window is raised (`ConfigureWindow` with `stack_mode = Above`) when
//!   it is exposed or its visibility changes (a window was raised over it), and, belt and braces,
//!   every [`RAISE_EVERY`]: under a compositing manager visibility events are not reliable, and
//!   another override-redirect window (a menu, a tooltip, a locker) does not tell anybody when it
//!   goes on top. If another client unmaps the banner it is mapped again.
//! * **Not stealing input.** The banner selects no input events and its *input* shape is set to
//!   empty (SHAPE ≥ 1.1), so clicks in the strip go to the window below it, as if the banner were
//!   not there: the top panel, a title bar or a maximised application stay usable by the user and
//!   by the technician. Without SHAPE the strip swallows clicks (they go to the root window); that
//!   is logged, not fatal.
//! * **Drawing.** A solid [`BANNER_RGB`] background (the window's background pixel, so the server
//!   repaints it without us) and the text in white with the core font `fixed`, which every X
//!   server has (Xvfb included) and needs no font library. `ImageText8` takes Latin-1, so other
//!   characters are transliterated ([`to_latin1`]) and the text is truncated with `...` to the
//!   screen's width, centred when it fits. If the font cannot be opened the bar is drawn without
//!   text: a red bar still says "session", and refusing to show anything would be worse.
//! * **Screen size.** The bar spans the root window's width, re-read when the root window is
//!   reconfigured (which is how the server reports a RandR screen-size change to every client
//!   that selects `StructureNotify` on the root window, without needing the RandR extension).
//! * **Its own connection and thread.** The banner has its own [`RustConnection`], so it works the
//!   same whoever else talks to the X server and a slow capturer cannot delay it. The thread
//!   sleeps on its command channel at most 50 ms at a time, so text changes and the stop are
//!   handled at once and X events within 50 ms. Setting up (connection, window, first drawing)
//!   happens in [`Banner::show`] itself, so a failure is returned to the caller, and when `show`
//!   returns the bar is on the screen.
//! * **Losing the banner.** If the connection breaks or someone destroys the window, the thread
//!   logs a warning and ends; [`Banner::is_active`] then says `false`, and the owner decides
//!   whether the session may go on.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use x11rb::connection::{Connection, RequestConnection};
use x11rb::errors::{ConnectError, ConnectionError, ReplyError, ReplyOrIdError};
use x11rb::protocol::Event;
use x11rb::protocol::shape::{self, ConnectionExt as _};
use x11rb::protocol::xproto::{
    AtomEnum, ChangeWindowAttributesAux, ClipOrdering, ConfigureWindowAux, ConnectionExt as _,
    CreateGCAux, CreateWindowAux, EventMask, Font, Gcontext, PropMode, StackMode, Visibility,
    Window, WindowClass,
};
use x11rb::rust_connection::RustConnection;
use x11rb::wrapper::ConnectionExt as _;

/// The bar's height in pixels: the 13 px `fixed` font with some air, and not more of the user's
/// screen than a title bar.
pub const BANNER_HEIGHT: u16 = 24;

/// The bar's colour, `0xRRGGBB` (Material red 800: readable white text, unmistakably "alert").
pub const BANNER_RGB: u32 = 0xC6_28_28;

/// How often the banner raises itself even when no event told it to.
pub const RAISE_EVERY: Duration = Duration::from_millis(500);

/// The longest the banner's thread waits before looking at the X events (and at the stop).
const POLL: Duration = Duration::from_millis(50);

/// How long dropping a [`Banner`] waits for its thread.
const JOIN_TIMEOUT: Duration = Duration::from_secs(1);

/// The space left and right of the text when it must be truncated.
const MARGIN: u16 = 8;

/// `ImageText8` draws at most 255 characters.
const MAX_TEXT8: usize = 255;

/// Why the banner cannot be shown.
#[derive(Debug, thiserror::Error)]
pub enum BannerError {
    /// No connection to the X server.
    #[error("cannot open the X display {display} to show the session banner: {source}")]
    Connect {
        display: String,
        #[source]
        source: ConnectError,
    },
    /// The connection names a screen the server does not have.
    #[error("the X display {display} has no screen {screen} to show the session banner on")]
    NoScreen { display: String, screen: usize },
    /// A request the banner needs failed (the server refused it or the connection broke).
    #[error("cannot {action} on the X display {display} for the session banner: {source}")]
    Request {
        display: String,
        action: &'static str,
        #[source]
        source: ReplyOrIdError,
    },
    /// The banner's thread could not be started.
    #[error("cannot start the session banner's thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// What the owner tells the banner's thread.
#[derive(Debug)]
enum Cmd {
    /// New text, already in Latin-1.
    SetText(Vec<u8>),
    Stop,
}

/// A red bar across the top of an X screen, on top of everything, for as long as this value
/// lives. See the [module documentation](self) for how it stays visible.
#[derive(Debug)]
pub struct Banner {
    tx: Sender<Cmd>,
    thread: Option<JoinHandle<()>>,
}

impl Banner {
    /// Shows `text` in a bar across the top of the X screen of `display` (`None`: `$DISPLAY`)
    /// until the returned value is dropped.
    ///
    /// Returns once the bar is mapped, raised and drawn (the X server has processed it).
    pub fn show(display: Option<&str>, text: &str) -> Result<Banner, BannerError> {
        let bar = Bar::create(display, to_latin1(text))?;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("session-banner".into())
            .spawn(move || bar.run(rx))
            .map_err(BannerError::Thread)?;
        Ok(Banner {
            tx,
            thread: Some(thread),
        })
    }

    /// Replaces the text (e.g. "Remote session: alice — ACME IT (verified), view only"); the bar
    /// is redrawn at once by the banner's thread.
    pub fn set_text(&self, text: &str) {
        // If the thread has ended the banner is gone (already logged); nothing to update.
        let _ = self.tx.send(Cmd::SetText(to_latin1(text)));
    }

    /// Whether the banner is still kept on the screen: `false` once its thread has ended because
    /// the X connection broke or the window was destroyed by another client.
    pub fn is_active(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Banner {
    /// Removes the window and waits for the thread, at most 1 s: a hung X server must not hang
    /// the end of a session. A thread left behind still removes the window (and closes
    /// its connection, which removes it too) as soon as it runs again.
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Stop);
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + JOIN_TIMEOUT;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            tracing::warn!(
                "the session banner's thread did not stop within {JOIN_TIMEOUT:?}; leaving it behind"
            );
        }
    }
}

/// The `fixed` font's metrics that the layout needs.
#[derive(Clone, Copy, Debug)]
struct FontMetrics {
    /// The widest character's advance (`fixed` is monospaced; for another font this is a
    /// conservative bound, so truncation never overflows).
    char_width: u16,
    ascent: i16,
    descent: i16,
}

/// The banner's window and its connection, owned by the banner's thread.
struct Bar {
    conn: RustConnection,
    display: String,
    root: Window,
    window: Window,
    gc: Gcontext,
    font: Option<(Font, FontMetrics)>,
    width: u16,
    text: Vec<u8>,
}

impl Bar {
    /// Connects, creates the window, maps, raises and draws it, and waits until the server has
    /// done all that.
    fn create(display: Option<&str>, text: Vec<u8>) -> Result<Bar, BannerError> {
        let display_name = match display {
            Some(d) => d.to_owned(),
            None => std::env::var("DISPLAY").unwrap_or_else(|_| "($DISPLAY is not set)".into()),
        };
        let (conn, screen_num) =
            RustConnection::connect(display).map_err(|source| BannerError::Connect {
                display: display_name.clone(),
                source,
            })?;
        let fail = |action: &'static str| {
            let display = display_name.clone();
            move |source: ReplyOrIdError| BannerError::Request {
                display,
                action,
                source,
            }
        };
        let screen =
            conn.setup()
                .roots
                .get(screen_num)
                .cloned()
                .ok_or_else(|| BannerError::NoScreen {
                    display: display_name.clone(),
                    screen: screen_num,
                })?;
        let root = screen.root;
        let width = screen.width_in_pixels;

        let red = alloc_red(&conn, screen.default_colormap);
        let window = conn.generate_id().map_err(fail("allocate an X id"))?;
        let attrs = CreateWindowAux::new()
            .background_pixel(red)
            .border_pixel(red)
            .override_redirect(1)
            // Output events only: selecting no input event is part of "never steal input".
            .event_mask(
                EventMask::EXPOSURE | EventMask::VISIBILITY_CHANGE | EventMask::STRUCTURE_NOTIFY,
            );
        conn.create_window(
            x11rb::COPY_DEPTH_FROM_PARENT,
            window,
            root,
            0,
            0,
            width,
            BANNER_HEIGHT,
            0,
            WindowClass::INPUT_OUTPUT,
            x11rb::COPY_FROM_PARENT,
            &attrs,
        )
        .map_err(ReplyOrIdError::from)
        .map_err(fail("create the window"))?
        .check()
        .map_err(ReplyOrIdError::from)
        .map_err(fail("create the window"))?;

        // Names for `xwininfo -tree` and friends; not needed for anything else.
        let _ = conn.change_property8(
            PropMode::REPLACE,
            window,
            AtomEnum::WM_NAME,
            AtomEnum::STRING,
            b"Tandem session banner",
        );
        let _ = conn.change_property8(
            PropMode::REPLACE,
            window,
            AtomEnum::WM_CLASS,
            AtomEnum::STRING,
            b"tandem-banner\0Tandem\0",
        );

        // The root window's ConfigureNotify tells of screen-size changes (RandR).
        if let Err(e) = conn
            .change_window_attributes(
                root,
                &ChangeWindowAttributesAux::new().event_mask(EventMask::STRUCTURE_NOTIFY),
            )
            .map_err(ReplyError::from)
            .and_then(|c| c.check())
        {
            tracing::debug!(error = %e, "session banner: cannot follow the screen size");
        }

        pass_input_through(&conn, window);

        let font = open_fixed(&conn);
        let gc = conn.generate_id().map_err(fail("allocate an X id"))?;
        let mut gc_attrs = CreateGCAux::new()
            .foreground(screen.white_pixel)
            .background(red)
            .graphics_exposures(0);
        if let Some((f, _)) = font {
            gc_attrs = gc_attrs.font(f);
        }
        conn.create_gc(gc, window, &gc_attrs)
            .map_err(ReplyOrIdError::from)
            .map_err(fail("create a graphics context"))?
            .check()
            .map_err(ReplyOrIdError::from)
            .map_err(fail("create a graphics context"))?;

        let bar = Bar {
            conn,
            display: display_name.clone(),
            root,
            window,
            gc,
            font,
            width,
            text,
        };
        // Drawing right after MapWindow is fine: the server handles requests in order, so the
        // window is viewable (background painted) by the time the text request arrives.
        bar.conn
            .map_window(window)
            .map_err(ReplyOrIdError::from)
            .map_err(fail("map the window"))?;
        bar.raise()
            .map_err(ReplyOrIdError::from)
            .map_err(fail("raise the window"))?;
        bar.draw()
            .map_err(ReplyOrIdError::from)
            .map_err(fail("draw the banner"))?;
        bar.conn
            .sync()
            .map_err(ReplyOrIdError::from)
            .map_err(fail("show the window"))?;
        Ok(bar)
    }

    /// The thread: commands, events, the periodic raise, until told to stop.
    fn run(mut self, rx: Receiver<Cmd>) {
        let mut last_raise = Instant::now();
        loop {
            let result = match rx.recv_timeout(POLL) {
                Ok(Cmd::SetText(text)) => {
                    self.text = text;
                    self.draw()
                }
                Ok(Cmd::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => Ok(()),
            };
            match result.and_then(|()| self.pump(&mut last_raise)) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(
                        display = %self.display,
                        "the session banner's window was destroyed by another X client; the \
                         banner is no longer shown"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(
                        display = %self.display,
                        error = %e,
                        "lost the X connection of the session banner; the banner is no longer shown"
                    );
                    return;
                }
            }
        }
        self.close();
    }

    /// Handles the pending events and raises the window when needed. `Ok(false)`: the window is
    /// gone.
    fn pump(&mut self, last_raise: &mut Instant) -> Result<bool, ConnectionError> {
        let mut raise = false;
        let mut redraw = false;
        while let Some(event) = self.conn.poll_for_event()? {
            match event {
                Event::Expose(e) if e.window == self.window => {
                    raise = true;
                    redraw |= e.count == 0;
                }
                Event::VisibilityNotify(e) if e.window == self.window => {
                    raise |= e.state != Visibility::UNOBSCURED;
                }
                Event::UnmapNotify(e) if e.window == self.window => {
                    tracing::warn!(
                        "another X client unmapped the session banner; mapping it again"
                    );
                    self.conn.map_window(self.window)?;
                    raise = true;
                    redraw = true;
                }
                Event::DestroyNotify(e) if e.window == self.window => return Ok(false),
                Event::ConfigureNotify(e) if e.window == self.root && e.width != self.width => {
                    self.width = e.width;
                    self.conn.configure_window(
                        self.window,
                        &ConfigureWindowAux::new()
                            .x(0)
                            .y(0)
                            .width(u32::from(e.width)),
                    )?;
                    raise = true;
                    redraw = true;
                }
                Event::Error(e) => {
                    tracing::debug!(error = ?e, "X error on the session banner's connection");
                }
                _ => {}
            }
        }
        if raise || last_raise.elapsed() >= RAISE_EVERY {
            self.raise()?;
            *last_raise = Instant::now();
        }
        if redraw {
            self.draw()?;
        }
        self.conn.flush()?;
        Ok(true)
    }

    fn raise(&self) -> Result<(), ConnectionError> {
        self.conn.configure_window(
            self.window,
            &ConfigureWindowAux::new().stack_mode(StackMode::ABOVE),
        )?;
        Ok(())
    }

    /// Repaints the background and draws the text (if there is a font). Flushes.
    fn draw(&self) -> Result<(), ConnectionError> {
        self.conn.clear_area(false, self.window, 0, 0, 0, 0)?;
        if let Some((_, m)) = self.font {
            let (text, x) = fit(&self.text, self.width, m.char_width);
            if !text.is_empty() {
                let text_height = m.ascent.saturating_add(m.descent);
                let top = (BANNER_HEIGHT as i16 - text_height).max(0) / 2;
                let y = top.saturating_add(m.ascent);
                self.conn.image_text8(self.window, self.gc, x, y, &text)?;
            }
        }
        self.conn.flush()
    }

    /// Removes the window and waits until the server has done it, so the screen is clean when
    /// `Drop` returns.
    fn close(self) {
        let _ = self.conn.destroy_window(self.window);
        let _ = self.conn.free_gc(self.gc);
        if let Some((f, _)) = self.font {
            let _ = self.conn.close_font(f);
        }
        let _ = self.conn.sync();
    }
}

/// The pixel for [`BANNER_RGB`] in the default colormap (exact on TrueColor; the server's
/// nearest otherwise). Falls back to the raw value, right for the usual 24-bit TrueColor.
fn alloc_red(conn: &RustConnection, colormap: u32) -> u32 {
    let [_, r, g, b] = BANNER_RGB.to_be_bytes();
    let scale = |c: u8| u16::from(c) * 0x101;
    match conn
        .alloc_color(colormap, scale(r), scale(g), scale(b))
        .map_err(ReplyError::from)
        .and_then(|c| c.reply())
    {
        Ok(reply) => reply.pixel,
        Err(e) => {
            tracing::debug!(error = %e, "session banner: AllocColor failed; using the raw RGB");
            BANNER_RGB
        }
    }
}

/// Sets the window's input shape to empty, so pointer events go to whatever is below it.
fn pass_input_through(conn: &RustConnection, window: Window) {
    let result = (|| -> Result<bool, ReplyError> {
        if conn
            .extension_information(shape::X11_EXTENSION_NAME)?
            .is_none()
        {
            return Ok(false);
        }
        let version = conn.shape_query_version()?.reply()?;
        // The input shape kind came with SHAPE 1.1.
        if (version.major_version, version.minor_version) < (1, 1) {
            return Ok(false);
        }
        conn.shape_rectangles(
            shape::SO::SET,
            shape::SK::INPUT,
            ClipOrdering::UNSORTED,
            window,
            0,
            0,
            &[],
        )?
        .check()?;
        Ok(true)
    })();
    match result {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            "the X server has no SHAPE 1.1: clicks in the session banner's strip will not reach \
             the windows below it"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "cannot make the session banner click-through: clicks in its strip will not reach \
             the windows below it"
        ),
    }
}

/// Opens the core font `fixed` and reads its metrics; `None` (logged) if the server has no such
/// font, and the bar is then drawn without text.
fn open_fixed(conn: &RustConnection) -> Option<(Font, FontMetrics)> {
    let result = (|| -> Result<(Font, FontMetrics), ReplyOrIdError> {
        let font = conn.generate_id()?;
        conn.open_font(font, b"fixed")?.check()?;
        let info = match conn
            .query_font(font)
            .map_err(ReplyError::from)
            .and_then(|c| c.reply())
        {
            Ok(info) => info,
            Err(e) => {
                let _ = conn.close_font(font);
                return Err(e.into());
            }
        };
        let metrics = FontMetrics {
            char_width: u16::try_from(info.max_bounds.character_width)
                .unwrap_or(0)
                .max(1),
            ascent: info.font_ascent,
            descent: info.font_descent,
        };
        Ok((font, metrics))
    })();
    match result {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot open the X core font \"fixed\"; the session banner is shown without text"
            );
            None
        }
    }
}

/// The text as `ImageText8` wants it: Latin-1, one byte a character. Dashes become `-`, the
/// ellipsis `...`, control characters a space (the `fixed` font has line-drawing glyphs there),
/// and anything else outside Latin-1 `?`.
pub fn to_latin1(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{2010}'..='\u{2015}' | '\u{2212}' => out.push(b'-'),
            '\u{2026}' => out.extend_from_slice(b"..."),
            c if c.is_control() => out.push(b' '),
            c => out.push(u8::try_from(u32::from(c)).unwrap_or(b'?')),
        }
    }
    out
}

/// Lays `text` out in a bar `width` pixels wide with `char_width`-pixel characters: the text,
/// truncated with `...` when it does not fit (or is longer than `ImageText8` allows), and the x
/// of its first character (centred when it fits, else `MARGIN`).
fn fit(text: &[u8], width: u16, char_width: u16) -> (Vec<u8>, i16) {
    let char_width = char_width.max(1);
    let room = usize::from(width.saturating_sub(2 * MARGIN) / char_width).min(MAX_TEXT8);
    let shown = if text.len() <= room {
        text.to_vec()
    } else if room > 3 {
        let mut t = text[..room - 3].to_vec();
        t.extend_from_slice(b"...");
        t
    } else {
        text[..room].to_vec()
    };
    // `shown.len() <= room`, so the pixel width fits in `width` and the subtraction cannot wrap.
    let used = u16::try_from(shown.len())
        .unwrap_or(u16::MAX)
        .saturating_mul(char_width);
    let x = width.saturating_sub(used) / 2;
    (shown, i16::try_from(x).unwrap_or(i16::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_text_is_transliterated_to_latin1() {
        assert_eq!(
            to_latin1("Remote session: alice — ACME IT (verified), view only"),
            b"Remote session: alice - ACME IT (verified), view only".to_vec()
        );
        assert_eq!(to_latin1("Jürgen"), b"J\xFCrgen".to_vec());
        assert_eq!(to_latin1("李 ✓"), b"? ?".to_vec());
        assert_eq!(to_latin1("a\nb…"), b"a b...".to_vec());
    }

    #[test]
    fn banner_text_is_centred_or_truncated() {
        // 100 px, 6 px characters: (100 - 16) / 6 = 14 characters of room.
        let (t, x) = fit(b"hello", 100, 6);
        assert_eq!(t, b"hello");
        assert_eq!(x, (100 - 30) / 2);
        let (t, x) = fit(b"abcdefghijklmnopqrstuvwxyz", 100, 6);
        assert_eq!(t, b"abcdefghijk...");
        assert_eq!(x, (100 - 14 * 6) / 2);
        assert!(x >= MARGIN as i16);
        let long = vec![b'a'; 1000];
        let (t, _) = fit(&long, 10_000, 6);
        assert_eq!(t.len(), MAX_TEXT8);
        let (t, x) = fit(b"abc", 10, 6);
        assert!(t.is_empty());
        assert_eq!(x, 5);
    }
}
