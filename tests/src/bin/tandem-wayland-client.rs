//! A small Wayland test client: a fullscreen xdg-shell window that shows
//! [`tandem_tests::wayland::pattern_pixel`] and reports the input it receives.
//!
//! Standard output: one JSON object a line (flushed after each), `{"event": ...}`:
//! `configure`, `drawn` (after the commit of a full redraw: `width`, `height`, `seed`),
//! `drawn_rect`, `presented` (the compositor's frame callback for a drawing: `of` names it),
//! `pointer_enter`, `pointer_leave`, `motion`, `button`, `axis`, `axis_discrete`, `keymap`,
//! `keyboard_enter`, `keyboard_leave`, `key`, `modifiers`, `error` (a bad command).
//!
//! Standard input: one command a line: `seed N` (redraw everything with seed N),
//! `rect X Y W H R G B` (fill a rectangle, damage only it), `scroll N` (redraw everything as a
//! long page scrolled by N pixels, `drawn_scrolled`), `quit`. The client exits at the end of
//! its standard input (so it does not outlive a test that dies), when the compositor closes the
//! window, or on an error (a message on standard error, exit status 1).
//!
//! Options: `--seed N` (the first picture's seed, default 0).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::event::{PollFd, PollFlags};
use serde_json::{Value, json};
use tandem_tests::wayland::{pattern_pixel, scrolled_pixel};
use wayland_client::globals::{GlobalListContents, registry_queue_init};
use wayland_client::protocol::{
    wl_buffer, wl_callback, wl_compositor, wl_keyboard, wl_pointer, wl_registry, wl_seat, wl_shm,
    wl_shm_pool, wl_surface,
};
use wayland_client::{Connection, Dispatch, Proxy, QueueHandle, WEnum, delegate_noop};
use wayland_protocols::xdg::shell::client::{xdg_surface, xdg_toplevel, xdg_wm_base};
use xkbcommon::xkb;

const TITLE: &str = "tandem-wayland-client";
/// The size chosen when the compositor leaves it to the client (a 0×0 configure).
const DEFAULT_SIZE: (u32, u32) = (640, 480);

fn main() {
    if let Err(e) = run() {
        eprintln!("{TITLE}: error: {e}");
        std::process::exit(1);
    }
}

/// Prints one event line and flushes it.
fn emit(v: Value) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{v}").and_then(|_| out.flush()).is_err() {
        // Nobody listens any more: the test is gone.
        std::process::exit(0);
    }
}

/// A wl_shm buffer with its own memfd; `busy` from attach until the compositor releases it.
struct Buf {
    buffer: wl_buffer::WlBuffer,
    file: File,
    w: u32,
    h: u32,
    busy: Arc<AtomicBool>,
}

struct State {
    conn: Connection,
    shm: wl_shm::WlShm,
    surface: wl_surface::WlSurface,
    pointer: Option<wl_pointer::WlPointer>,
    keyboard: Option<wl_keyboard::WlKeyboard>,
    /// The size of the last toplevel configure (0 = client's choice).
    pending_size: (i32, i32),
    pending_states: Vec<&'static str>,
    /// The size of the picture in `image` (0×0 before the first drawing).
    size: (u32, u32),
    seed: u32,
    /// The window's content, XRGB8888 little-endian (B, G, R, X), `size.0 * 4` bytes a row.
    image: Vec<u8>,
    buffers: Vec<Buf>,
    pointer_pos: (f64, f64),
    xkb_context: xkb::Context,
    xkb_state: Option<xkb::State>,
    /// An error found in an event handler; the main loop exits with it.
    fatal: Option<String>,
    /// The compositor closed the window.
    closed: bool,
}

fn run() -> Result<(), String> {
    let mut seed = 0u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seed" => {
                seed = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or("--seed needs a number")?;
            }
            "-h" | "--help" => {
                println!("usage: {TITLE} [--seed N]  (see the source's header for the protocol)");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }

    let conn = Connection::connect_to_env()
        .map_err(|e| format!("cannot connect to the Wayland compositor: {e}"))?;
    let (globals, mut queue) = registry_queue_init::<State>(&conn)
        .map_err(|e| format!("cannot read the compositor's globals: {e}"))?;
    let qh = queue.handle();
    let compositor: wl_compositor::WlCompositor = globals
        .bind(&qh, 4..=6, ())
        .map_err(|e| format!("wl_compositor (version 4 or later): {e}"))?;
    let shm: wl_shm::WlShm = globals
        .bind(&qh, 1..=1, ())
        .map_err(|e| format!("wl_shm: {e}"))?;
    let wm_base: xdg_wm_base::XdgWmBase = globals
        .bind(&qh, 1..=3, ())
        .map_err(|e| format!("xdg_wm_base: {e}"))?;
    // No seat is fine (no input then).
    let _seat: Option<wl_seat::WlSeat> = globals.bind(&qh, 1..=8, ()).ok();

    let surface = compositor.create_surface(&qh, ());
    let xdg_surface = wm_base.get_xdg_surface(&surface, &qh, ());
    let toplevel = xdg_surface.get_toplevel(&qh, ());
    toplevel.set_title(TITLE.to_string());
    toplevel.set_app_id(TITLE.to_string());
    toplevel.set_fullscreen(None);
    // The initial commit without a buffer asks for the first configure.
    surface.commit();

    let mut state = State {
        conn: conn.clone(),
        shm,
        surface,
        pointer: None,
        keyboard: None,
        pending_size: (0, 0),
        pending_states: Vec::new(),
        size: (0, 0),
        seed,
        image: Vec::new(),
        buffers: Vec::new(),
        pointer_pos: (0.0, 0.0),
        xkb_context: xkb::Context::new(xkb::CONTEXT_NO_FLAGS),
        xkb_state: None,
        fatal: None,
        closed: false,
    };

    let stdin = std::io::stdin();
    let mut stdin_buf: Vec<u8> = Vec::new();
    loop {
        queue
            .dispatch_pending(&mut state)
            .map_err(|e| format!("Wayland: {e}"))?;
        if let Some(e) = state.fatal.take() {
            return Err(e);
        }
        if state.closed {
            return Ok(());
        }
        match queue.flush() {
            Ok(()) => {}
            // A full socket: poll below waits for the compositor to read.
            Err(wayland_client::backend::WaylandError::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("Wayland: {e}")),
        }
        let Some(guard) = queue.prepare_read() else {
            continue; // events already queued: dispatch them first
        };
        let (wayland_ready, stdin_ready) = {
            let cfd = guard.connection_fd();
            let mut fds = [
                PollFd::new(&cfd, PollFlags::IN),
                PollFd::new(&stdin, PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(format!("poll: {e}")),
            }
            let ready = |f: &PollFd| {
                f.revents()
                    .intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR)
            };
            (ready(&fds[0]), ready(&fds[1]))
        };
        if wayland_ready {
            match guard.read() {
                Ok(_) => {}
                Err(wayland_client::backend::WaylandError::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("reading from the compositor: {e}")),
            }
        } else {
            drop(guard);
        }
        if stdin_ready {
            let mut chunk = [0u8; 4096];
            let n = match rustix::io::read(stdin.as_fd(), &mut chunk) {
                Ok(n) => n,
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => continue,
                Err(e) => return Err(format!("reading standard input: {e}")),
            };
            if n == 0 {
                return Ok(()); // end of input: the test is gone or done
            }
            stdin_buf.extend_from_slice(&chunk[..n]);
            while let Some(pos) = stdin_buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = stdin_buf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line).trim().to_string();
                if line.is_empty() {
                    continue;
                }
                if !state.command(&line, &qh)? {
                    let _ = conn.flush();
                    return Ok(());
                }
            }
        }
    }
}

impl State {
    /// Runs one stdin command; false for `quit`.
    fn command(&mut self, line: &str, qh: &QueueHandle<State>) -> Result<bool, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let nums: Option<Vec<u32>> = words.iter().skip(1).map(|w| w.parse().ok()).collect();
        match (words.first().copied(), nums.as_deref()) {
            (Some("quit"), _) => return Ok(false),
            (Some("seed"), Some(&[seed])) => {
                self.seed = seed;
                if self.size != (0, 0) {
                    self.draw_full(qh)?;
                }
            }
            (Some("scroll"), Some(&[offset])) => {
                if self.size != (0, 0) {
                    self.draw_scrolled(qh, offset)?;
                }
            }
            (Some("rect"), Some(&[x, y, w, h, r, g, b])) => {
                if self.size == (0, 0) {
                    emit(json!({"event": "error", "message": "rect before the first configure"}));
                    return Ok(true);
                }
                self.draw_rect(qh, x, y, w, h, [r as u8, g as u8, b as u8])?;
            }
            _ => {
                eprintln!("{TITLE}: unknown command {line:?}");
                emit(json!({"event": "error", "message": format!("unknown command {line:?}")}));
            }
        }
        Ok(true)
    }

    /// Redraws the whole window at `self.size` with `self.seed`.
    fn draw_full(&mut self, qh: &QueueHandle<State>) -> Result<(), String> {
        let (w, h) = self.size;
        self.image.resize(w as usize * h as usize * 4, 0);
        for y in 0..h {
            for x in 0..w {
                let (r, g, b) = pattern_pixel(x, y, w, h, self.seed);
                let i = (y as usize * w as usize + x as usize) * 4;
                self.image[i..i + 4].copy_from_slice(&[b, g, r, 0xff]);
            }
        }
        let ev = json!({"event": "drawn", "width": w, "height": h, "seed": self.seed});
        self.present(qh, (0, 0, w, h), ev)
    }

    /// Redraws the whole window with [`scrolled_pixel`] at `offset` (a long page scrolled).
    fn draw_scrolled(&mut self, qh: &QueueHandle<State>, offset: u32) -> Result<(), String> {
        let (w, h) = self.size;
        self.image.resize(w as usize * h as usize * 4, 0);
        for y in 0..h {
            for x in 0..w {
                let (r, g, b) = scrolled_pixel(x, y, w, h, offset);
                let i = (y as usize * w as usize + x as usize) * 4;
                self.image[i..i + 4].copy_from_slice(&[b, g, r, 0xff]);
            }
        }
        let ev = json!({"event": "drawn_scrolled", "width": w, "height": h, "offset": offset});
        self.present(qh, (0, 0, w, h), ev)
    }

    fn draw_rect(
        &mut self,
        qh: &QueueHandle<State>,
        x: u32,
        y: u32,
        w: u32,
        h: u32,
        [r, g, b]: [u8; 3],
    ) -> Result<(), String> {
        let (iw, ih) = self.size;
        let (x, y) = (x.min(iw), y.min(ih));
        let (w, h) = (w.min(iw - x), h.min(ih - y));
        for yy in y..y + h {
            for xx in x..x + w {
                let i = (yy as usize * iw as usize + xx as usize) * 4;
                self.image[i..i + 4].copy_from_slice(&[b, g, r, 0xff]);
            }
        }
        let ev = json!({"event": "drawn_rect", "x": x, "y": y, "width": w, "height": h,
            "r": r, "g": g, "b": b});
        self.present(qh, (x, y, w, h), ev)
    }

    /// Copies `image` into a free buffer, attaches it, damages `damage`, asks for a frame callback,
    /// commits, flushes, and prints `ev`.
    fn present(
        &mut self,
        qh: &QueueHandle<State>,
        damage: (u32, u32, u32, u32),
        ev: Value,
    ) -> Result<(), String> {
        let (w, h) = self.size;
        // Buffers of another size are no use any more once the compositor is done with them.
        self.buffers.retain(|b| {
            let keep = (b.w, b.h) == (w, h) || b.busy.load(Ordering::Acquire);
            if !keep {
                b.buffer.destroy();
            }
            keep
        });
        let idx = match self
            .buffers
            .iter()
            .position(|b| (b.w, b.h) == (w, h) && !b.busy.load(Ordering::Acquire))
        {
            Some(i) => i,
            None => {
                let b = self.new_buffer(qh, w, h)?;
                self.buffers.push(b);
                self.buffers.len() - 1
            }
        };
        let buf = &self.buffers[idx];
        buf.file
            .write_all_at(&self.image, 0)
            .map_err(|e| format!("writing the shm buffer: {e}"))?;
        buf.busy.store(true, Ordering::Release);
        self.surface.attach(Some(&buf.buffer), 0, 0);
        let (dx, dy, dw, dh) = damage;
        self.surface
            .damage_buffer(dx as i32, dy as i32, dw as i32, dh as i32);
        let mut presented = ev.clone();
        presented["of"] = ev["event"].clone();
        presented["event"] = json!("presented");
        self.surface.frame(qh, presented);
        self.surface.commit();
        self.conn
            .flush()
            .map_err(|e| format!("sending to the compositor: {e}"))?;
        emit(ev);
        Ok(())
    }

    fn new_buffer(&self, qh: &QueueHandle<State>, w: u32, h: u32) -> Result<Buf, String> {
        let stride = w
            .checked_mul(4)
            .filter(|s| *s <= i32::MAX as u32)
            .ok_or("window too wide")?;
        let len = (stride as u64)
            .checked_mul(h as u64)
            .filter(|l| *l <= i32::MAX as u64 && *l > 0)
            .ok_or_else(|| format!("bad window size {w}×{h}"))?;
        let fd: OwnedFd =
            rustix::fs::memfd_create("tandem-wayland-client", rustix::fs::MemfdFlags::CLOEXEC)
                .map_err(|e| format!("memfd_create: {e}"))?;
        let file = File::from(fd);
        file.set_len(len)
            .map_err(|e| format!("sizing the shm file: {e}"))?;
        let pool = self.shm.create_pool(file.as_fd(), len as i32, qh, ());
        let busy = Arc::new(AtomicBool::new(false));
        let buffer = pool.create_buffer(
            0,
            w as i32,
            h as i32,
            stride as i32,
            wl_shm::Format::Xrgb8888,
            qh,
            busy.clone(),
        );
        pool.destroy();
        Ok(Buf {
            buffer,
            file,
            w,
            h,
            busy,
        })
    }

    fn key_event(&mut self, key: u32, pressed: bool) {
        let (utf8, keysym) = match &self.xkb_state {
            Some(s) => {
                let code = xkb::Keycode::new(key + 8);
                let utf8 = if pressed {
                    s.key_get_utf8(code)
                } else {
                    String::new()
                };
                (utf8, s.key_get_one_sym(code).raw())
            }
            None => (String::new(), 0),
        };
        emit(
            json!({"event": "key", "keycode": key, "pressed": pressed, "utf8": utf8,
            "keysym": keysym}),
        );
    }

    fn load_keymap(&mut self, fd: OwnedFd, size: u32) -> Result<(), String> {
        // pread from 0: the compositor may share one file (and its offset) between clients.
        let file = File::from(fd);
        let mut buf = vec![0u8; size as usize];
        file.read_exact_at(&mut buf, 0)
            .map_err(|e| format!("reading the keymap ({size} bytes): {e}"))?;
        while buf.last() == Some(&0) {
            buf.pop();
        }
        let text = String::from_utf8(buf).map_err(|_| "the keymap is not UTF-8".to_string())?;
        let keymap = xkb::Keymap::new_from_string(
            &self.xkb_context,
            text,
            xkb::KEYMAP_FORMAT_TEXT_V1,
            xkb::KEYMAP_COMPILE_NO_FLAGS,
        )
        .ok_or("xkbcommon cannot compile the compositor's keymap")?;
        self.xkb_state = Some(xkb::State::new(&keymap));
        Ok(())
    }
}

impl Dispatch<wl_registry::WlRegistry, GlobalListContents> for State {
    fn event(
        _: &mut Self,
        _: &wl_registry::WlRegistry,
        _: wl_registry::Event,
        _: &GlobalListContents,
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        // Globals that come and go later (outputs) do not matter to this client.
    }
}

delegate_noop!(State: wl_compositor::WlCompositor);
delegate_noop!(State: ignore wl_shm::WlShm);
delegate_noop!(State: wl_shm_pool::WlShmPool);
delegate_noop!(State: ignore wl_surface::WlSurface);

impl Dispatch<wl_buffer::WlBuffer, Arc<AtomicBool>> for State {
    fn event(
        _: &mut Self,
        _: &wl_buffer::WlBuffer,
        event: wl_buffer::Event,
        busy: &Arc<AtomicBool>,
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        if let wl_buffer::Event::Release = event {
            busy.store(false, Ordering::Release);
        }
    }
}

impl Dispatch<wl_callback::WlCallback, Value> for State {
    fn event(
        _: &mut Self,
        _: &wl_callback::WlCallback,
        event: wl_callback::Event,
        presented: &Value,
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        if let wl_callback::Event::Done { .. } = event {
            emit(presented.clone());
        }
    }
}

impl Dispatch<xdg_wm_base::XdgWmBase, ()> for State {
    fn event(
        _: &mut Self,
        wm_base: &xdg_wm_base::XdgWmBase,
        event: xdg_wm_base::Event,
        _: &(),
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        if let xdg_wm_base::Event::Ping { serial } = event {
            wm_base.pong(serial);
        }
    }
}

impl Dispatch<xdg_toplevel::XdgToplevel, ()> for State {
    fn event(
        state: &mut Self,
        _: &xdg_toplevel::XdgToplevel,
        event: xdg_toplevel::Event,
        _: &(),
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        match event {
            xdg_toplevel::Event::Configure {
                width,
                height,
                states,
            } => {
                state.pending_size = (width, height);
                state.pending_states = states
                    .chunks_exact(4)
                    .map(|c| match u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) {
                        1 => "maximized",
                        2 => "fullscreen",
                        3 => "resizing",
                        4 => "activated",
                        5 => "tiled_left",
                        6 => "tiled_right",
                        7 => "tiled_top",
                        8 => "tiled_bottom",
                        _ => "other",
                    })
                    .collect();
            }
            xdg_toplevel::Event::Close => state.closed = true,
            _ => {}
        }
    }
}

impl Dispatch<xdg_surface::XdgSurface, ()> for State {
    fn event(
        state: &mut Self,
        xdg_surface: &xdg_surface::XdgSurface,
        event: xdg_surface::Event,
        _: &(),
        _: &Connection,
        qh: &QueueHandle<Self>,
    ) {
        let xdg_surface::Event::Configure { serial } = event else {
            return;
        };
        xdg_surface.ack_configure(serial);
        let (pw, ph) = state.pending_size;
        let size = if pw <= 0 || ph <= 0 {
            DEFAULT_SIZE
        } else {
            (pw as u32, ph as u32)
        };
        emit(
            json!({"event": "configure", "width": size.0, "height": size.1,
            "states": state.pending_states}),
        );
        if size != state.size {
            state.size = size;
            if let Err(e) = state.draw_full(qh) {
                state.fatal = Some(e);
            }
        } else {
            // Same size: nothing to redraw, but the compositor waits for a commit after the ack.
            state.surface.commit();
        }
    }
}

impl Dispatch<wl_seat::WlSeat, ()> for State {
    fn event(
        state: &mut Self,
        seat: &wl_seat::WlSeat,
        event: wl_seat::Event,
        _: &(),
        _: &Connection,
        qh: &QueueHandle<Self>,
    ) {
        let wl_seat::Event::Capabilities {
            capabilities: WEnum::Value(caps),
        } = event
        else {
            return;
        };
        let has_pointer = caps.contains(wl_seat::Capability::Pointer);
        let has_keyboard = caps.contains(wl_seat::Capability::Keyboard);
        if has_pointer && state.pointer.is_none() {
            state.pointer = Some(seat.get_pointer(qh, ()));
        } else if !has_pointer && let Some(p) = state.pointer.take().filter(|p| p.version() >= 3) {
            p.release();
        }
        if has_keyboard && state.keyboard.is_none() {
            state.keyboard = Some(seat.get_keyboard(qh, ()));
        } else if !has_keyboard && let Some(k) = state.keyboard.take().filter(|k| k.version() >= 3)
        {
            k.release();
        }
    }
}

impl Dispatch<wl_pointer::WlPointer, ()> for State {
    fn event(
        state: &mut Self,
        _: &wl_pointer::WlPointer,
        event: wl_pointer::Event,
        _: &(),
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        match event {
            wl_pointer::Event::Enter {
                surface_x,
                surface_y,
                ..
            } => {
                state.pointer_pos = (surface_x, surface_y);
                emit(json!({"event": "pointer_enter", "x": surface_x, "y": surface_y}));
            }
            wl_pointer::Event::Leave { .. } => emit(json!({"event": "pointer_leave"})),
            wl_pointer::Event::Motion {
                surface_x,
                surface_y,
                ..
            } => {
                state.pointer_pos = (surface_x, surface_y);
                emit(json!({"event": "motion", "x": surface_x, "y": surface_y}));
            }
            wl_pointer::Event::Button {
                button,
                state: button_state,
                ..
            } => {
                let pressed =
                    matches!(button_state, WEnum::Value(wl_pointer::ButtonState::Pressed));
                let (x, y) = state.pointer_pos;
                emit(
                    json!({"event": "button", "button": button, "pressed": pressed,
                    "x": x, "y": y}),
                );
            }
            wl_pointer::Event::Axis { axis, value, .. } => {
                emit(json!({"event": "axis", "axis": wenum_u32(axis), "value": value}));
            }
            wl_pointer::Event::AxisDiscrete { axis, discrete } => {
                emit(json!({"event": "axis_discrete", "axis": wenum_u32(axis),
                    "discrete": discrete}));
            }
            _ => {}
        }
    }
}

fn wenum_u32<T: Into<u32>>(v: WEnum<T>) -> u32 {
    match v {
        WEnum::Value(v) => v.into(),
        WEnum::Unknown(n) => n,
    }
}

impl Dispatch<wl_keyboard::WlKeyboard, ()> for State {
    fn event(
        state: &mut Self,
        _: &wl_keyboard::WlKeyboard,
        event: wl_keyboard::Event,
        _: &(),
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        match event {
            wl_keyboard::Event::Keymap { format, fd, size } => {
                if format != WEnum::Value(wl_keyboard::KeymapFormat::XkbV1) {
                    eprintln!("{TITLE}: ignoring a keymap in format {format:?}");
                    state.xkb_state = None;
                    return;
                }
                match state.load_keymap(fd, size) {
                    Ok(()) => emit(json!({"event": "keymap"})),
                    Err(e) => state.fatal = Some(e),
                }
            }
            wl_keyboard::Event::Enter { keys, .. } => {
                let keys: Vec<u32> = keys
                    .chunks_exact(4)
                    .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                emit(json!({"event": "keyboard_enter", "keys": keys}));
            }
            wl_keyboard::Event::Leave { .. } => emit(json!({"event": "keyboard_leave"})),
            wl_keyboard::Event::Key {
                key,
                state: key_state,
                ..
            } => {
                let pressed = !matches!(key_state, WEnum::Value(wl_keyboard::KeyState::Released));
                state.key_event(key, pressed);
            }
            wl_keyboard::Event::Modifiers {
                mods_depressed,
                mods_latched,
                mods_locked,
                group,
                ..
            } => {
                if let Some(s) = &mut state.xkb_state {
                    s.update_mask(mods_depressed, mods_latched, mods_locked, 0, 0, group);
                }
                emit(json!({"event": "modifiers", "depressed": mods_depressed,
                    "latched": mods_latched, "locked": mods_locked, "group": group}));
            }
            _ => {}
        }
    }
}
