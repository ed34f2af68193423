//! The wlroots backend (sway, Hyprland, river, labwc, Wayfire, …): the screen through
//! `wlr-screencopy` with damage, input through `wlr-virtual-pointer` and `virtual-keyboard`.
//!
//! **Screen.** Each capture asks the compositor for the output's next frame with
//! `copy_with_damage`: the compositor answers only once something on the output changed, with the
//! damaged rectangles, so an idle screen costs one pending request and nothing else. Frames go
//! into a shared-memory buffer the agent made (a memfd); only the damaged rows are read out of
//! it, into the same change detector the X11 backend uses. No protocol of wlroots tells a client
//! where the pointer is or what it looks like, so the compositor draws the cursor into the
//! frames (`overlay_cursor`) and the console draws none.
//!
//! **Input.** A virtual pointer moves in the compositor's layout (absolute motion over the
//! bounding box of all outputs), clicks with evdev button codes and scrolls in wheel notches. A
//! virtual keyboard sends physical keys (evdev codes) with a keymap compiled by xkbcommon from the
//! session's XKB settings (`XKB_DEFAULT_LAYOUT` and friends; the system default otherwise), so the
//! technician's keys follow the user's layout as on X11; wlroots leaves a virtual keyboard's
//! modifier state to its client, so an xkb state of the same keymap computes it and it is sent
//! along. Unicode text goes the way `wtype` does it: a small keymap holding exactly the characters to type is sent, the keys are pressed, and
//! the layout keymap is sent back.
//!
//! Output scale is taken as 1 (the compositor's logical and pixel sizes equal): with a scaled
//! output, pointer positions land proportionally wrong; headless and most desktops use 1.

use crate::desktop::{Backend, BackendError, Desktop};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::fs::{MemfdFlags, memfd_create};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tandem_input::gate::{Action, ScrollAxis};
use tandem_input::{DisplayRect, InjectError, Injector, MouseButton};
use tandem_media::capture::{CaptureError, Captured, Capturer, CursorState, Monitor};
use tandem_media::frame::{ChangeDetector, Frame, Rect};
use wayland_client::globals::{GlobalList, GlobalListContents, registry_queue_init};
use wayland_client::protocol::{
    wl_buffer, wl_output, wl_pointer, wl_registry, wl_seat, wl_shm, wl_shm_pool,
};
use wayland_client::{Connection, Dispatch, EventQueue, Proxy, QueueHandle, WEnum, delegate_noop};
use wayland_protocols_misc::zwp_virtual_keyboard_v1::client::{
    zwp_virtual_keyboard_manager_v1::ZwpVirtualKeyboardManagerV1,
    zwp_virtual_keyboard_v1::ZwpVirtualKeyboardV1,
};
use wayland_protocols_wlr::screencopy::v1::client::{
    zwlr_screencopy_frame_v1::{self, ZwlrScreencopyFrameV1},
    zwlr_screencopy_manager_v1::ZwlrScreencopyManagerV1,
};
use wayland_protocols_wlr::virtual_pointer::v1::client::{
    zwlr_virtual_pointer_manager_v1::ZwlrVirtualPointerManagerV1,
    zwlr_virtual_pointer_v1::ZwlrVirtualPointerV1,
};
use xkbcommon::xkb;

/// The globals this backend needs, by interface name.
pub const SCREENCOPY: &str = "zwlr_screencopy_manager_v1";
pub const VIRTUAL_POINTER: &str = "zwlr_virtual_pointer_manager_v1";
pub const VIRTUAL_KEYBOARD: &str = "zwp_virtual_keyboard_manager_v1";

/// The wlroots desktop of `$WAYLAND_DISPLAY`, or of the socket named.
#[derive(Clone, Debug, Default)]
pub struct WlrootsDesktop {
    /// What the compositor calls itself (`XDG_CURRENT_DESKTOP`), for messages.
    pub name: String,
    /// The compositor's socket; `None`: from the environment (`WAYLAND_DISPLAY`,
    /// `XDG_RUNTIME_DIR`), as a client of the desktop session finds it.
    pub socket: Option<PathBuf>,
}

impl Desktop for WlrootsDesktop {
    fn backend(&self) -> Backend {
        Backend::Wlroots
    }
    fn describe(&self) -> String {
        if self.name.is_empty() {
            "the Wayland desktop (wlroots)".into()
        } else {
            format!("the Wayland desktop {} (wlroots)", self.name)
        }
    }
    fn open_screen(&self) -> Result<Box<dyn tandem_media::Capturer + Send>, BackendError> {
        Ok(Box::new(WlrCapturer::open(self.socket.as_deref())?))
    }
    fn open_input(&self) -> Result<Box<dyn Injector>, InjectError> {
        Ok(Box::new(WlrInjector::open(self.socket.as_deref())?))
    }
}

/// Connects to `socket`, or to the compositor the environment names.
fn connect(socket: Option<&Path>) -> Result<Connection, String> {
    let at = |p: &Path, e: &dyn std::fmt::Display| {
        format!(
            "cannot connect to the Wayland compositor at {}: {e}",
            p.display()
        )
    };
    match socket {
        Some(p) => {
            let stream = std::os::unix::net::UnixStream::connect(p).map_err(|e| at(p, &e))?;
            Connection::from_socket(stream).map_err(|e| at(p, &e))
        }
        None => Connection::connect_to_env().map_err(|e| {
            format!("cannot connect to the Wayland compositor ($WAYLAND_DISPLAY): {e}")
        }),
    }
}

/// What the compositor said about one output.
#[derive(Clone, Debug, Default)]
struct OutputInfo {
    name: String,
    x: i32,
    y: i32,
    width: i32,
    height: i32,
}

/// The outputs, in the order the compositor announced them.
#[derive(Default)]
struct Outputs {
    list: Vec<(wl_output::WlOutput, OutputInfo)>,
    /// Bumped whenever an output's mode or position changes.
    generation: u64,
}

impl Outputs {
    fn handle(&mut self, output: &wl_output::WlOutput, event: wl_output::Event) {
        let Some((_, info)) = self.list.iter_mut().find(|(o, _)| o == output) else {
            return;
        };
        match event {
            wl_output::Event::Geometry { x, y, model, .. } => {
                if (info.x, info.y) != (x, y) {
                    self.generation += 1;
                }
                (info.x, info.y) = (x, y);
                if info.name.is_empty() {
                    info.name = model;
                }
            }
            wl_output::Event::Mode {
                flags: WEnum::Value(f),
                width,
                height,
                ..
            } if f.contains(wl_output::Mode::Current) => {
                if (info.width, info.height) != (width, height) {
                    self.generation += 1;
                }
                (info.width, info.height) = (width, height);
            }
            wl_output::Event::Name { name } => info.name = name,
            _ => {}
        }
    }

    fn bind_all<S>(globals: &GlobalList, qh: &QueueHandle<S>) -> Outputs
    where
        S: Dispatch<wl_output::WlOutput, ()> + 'static,
    {
        let mut outputs = Outputs::default();
        for g in globals.contents().clone_list() {
            if g.interface == "wl_output" {
                let o = globals.registry().bind::<wl_output::WlOutput, _, _>(
                    g.name,
                    g.version.min(4),
                    qh,
                    (),
                );
                outputs.list.push((o, OutputInfo::default()));
            }
        }
        outputs
    }

    /// The bounding box of all outputs in the compositor's layout.
    fn bounds(&self) -> DisplayRect {
        bounds_of(self.list.iter().map(|(_, i)| i))
    }
}

/// The bounding box of `outputs` (1×1 at the origin when there is none).
fn bounds_of<'a>(outputs: impl Iterator<Item = &'a OutputInfo>) -> DisplayRect {
    let (mut x0, mut y0, mut x1, mut y1) = (i32::MAX, i32::MAX, i32::MIN, i32::MIN);
    for i in outputs.filter(|i| i.width > 0 && i.height > 0) {
        x0 = x0.min(i.x);
        y0 = y0.min(i.y);
        x1 = x1.max(i.x.saturating_add(i.width));
        y1 = y1.max(i.y.saturating_add(i.height));
    }
    if x0 >= x1 || y0 >= y1 {
        return DisplayRect {
            x: 0,
            y: 0,
            width: 1,
            height: 1,
        };
    }
    DisplayRect {
        x: x0,
        y: y0,
        width: (x1 - x0) as u32,
        height: (y1 - y0) as u32,
    }
}

/// Waits until the connection has something to read, at most `timeout`, and reads it.
fn read_with_timeout<S>(
    conn: &Connection,
    queue: &mut EventQueue<S>,
    state: &mut S,
    timeout: Duration,
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("Wayland connection failed: {e}");
    conn.flush().map_err(|e| err(&e))?;
    queue.dispatch_pending(state).map_err(|e| err(&e))?;
    if let Some(guard) = conn.prepare_read() {
        let ready = {
            let fd = guard.connection_fd();
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            let ts = Timespec {
                tv_sec: timeout.as_secs() as _,
                tv_nsec: timeout.subsec_nanos() as _,
            };
            match poll(&mut fds, Some(&ts)) {
                Ok(n) => n > 0,
                Err(rustix::io::Errno::INTR) => false,
                Err(e) => return Err(err(&e)),
            }
        };
        if ready {
            match guard.read() {
                Ok(_) => {}
                Err(wayland_client::backend::WaylandError::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(err(&e)),
            }
        }
    }
    queue.dispatch_pending(state).map_err(|e| err(&e))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Screen

/// The pending screencopy frame's events.
#[derive(Debug, Default)]
struct FrameEvents {
    generation: u64,
    /// format, width, height, stride
    buffer: Option<(WEnum<wl_shm::Format>, u32, u32, u32)>,
    buffer_done: bool,
    y_invert: bool,
    damage: Vec<Rect>,
    ready: bool,
    failed: bool,
}

struct ScreenState {
    outputs: Outputs,
    frame: FrameEvents,
}

impl Dispatch<wl_registry::WlRegistry, GlobalListContents> for ScreenState {
    fn event(
        _: &mut Self,
        _: &wl_registry::WlRegistry,
        _: wl_registry::Event,
        _: &GlobalListContents,
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
    }
}

impl Dispatch<wl_output::WlOutput, ()> for ScreenState {
    fn event(
        s: &mut Self,
        o: &wl_output::WlOutput,
        e: wl_output::Event,
        _: &(),
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        s.outputs.handle(o, e);
    }
}

impl Dispatch<ZwlrScreencopyFrameV1, u64> for ScreenState {
    fn event(
        s: &mut Self,
        _: &ZwlrScreencopyFrameV1,
        e: zwlr_screencopy_frame_v1::Event,
        generation: &u64,
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        let f = &mut s.frame;
        if *generation != f.generation {
            return;
        }
        use zwlr_screencopy_frame_v1::Event;
        match e {
            Event::Buffer {
                format,
                width,
                height,
                stride,
            } => f.buffer = Some((format, width, height, stride)),
            Event::BufferDone => f.buffer_done = true,
            Event::Flags { flags } => {
                f.y_invert = matches!(flags, WEnum::Value(v) if v.contains(zwlr_screencopy_frame_v1::Flags::YInvert));
            }
            Event::Damage {
                x,
                y,
                width,
                height,
            } => f.damage.push(Rect {
                x,
                y,
                w: width,
                h: height,
            }),
            Event::Ready { .. } => f.ready = true,
            Event::Failed => f.failed = true,
            _ => {}
        }
    }
}

delegate_noop!(ScreenState: ignore ZwlrScreencopyManagerV1);
delegate_noop!(ScreenState: ignore wl_shm::WlShm);
delegate_noop!(ScreenState: ignore wl_shm_pool::WlShmPool);
delegate_noop!(ScreenState: ignore wl_buffer::WlBuffer);

/// Where the compositor copies frames to.
struct ShmBuffer {
    file: File,
    pool: wl_shm_pool::WlShmPool,
    buffer: wl_buffer::WlBuffer,
    /// format, width, height, stride
    shape: (WEnum<wl_shm::Format>, u32, u32, u32),
}

impl Drop for ShmBuffer {
    fn drop(&mut self) {
        self.buffer.destroy();
        self.pool.destroy();
    }
}

/// Where a frame's pixels sit in the buffer, per the format the compositor chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// B, G, R, X in memory (`XRGB8888`/`ARGB8888` little-endian): as the pipeline wants.
    Bgrx,
    /// R, G, B, X in memory (`XBGR8888`/`ABGR8888`): red and blue swapped on the way in.
    Rgbx,
}

fn layout(format: WEnum<wl_shm::Format>) -> Option<Layout> {
    match format {
        WEnum::Value(wl_shm::Format::Xrgb8888 | wl_shm::Format::Argb8888) => Some(Layout::Bgrx),
        WEnum::Value(wl_shm::Format::Xbgr8888 | wl_shm::Format::Abgr8888) => Some(Layout::Rgbx),
        _ => None,
    }
}

/// Screen capture through wlr-screencopy.
pub struct WlrCapturer {
    conn: Connection,
    queue: EventQueue<ScreenState>,
    qh: QueueHandle<ScreenState>,
    state: ScreenState,
    manager: ZwlrScreencopyManagerV1,
    manager_version: u32,
    shm: wl_shm::WlShm,
    selected: usize,
    /// The request in flight, if any.
    pending: Option<ZwlrScreencopyFrameV1>,
    /// Whether `pending` has been told to copy.
    copying: bool,
    buffer: Option<ShmBuffer>,
    frame: Frame,
    detector: ChangeDetector,
    scratch: Vec<u8>,
    /// The next capture reports everything (first capture, keyframe, new size).
    full: bool,
    /// The mirror holds a whole real picture (false after a new size until a full copy came).
    mirror_valid: bool,
    /// The next copy is a whole one (`copy`), not one that waits for damage: after a new buffer,
    /// a failed or a stale copy, the damage since the last copy says nothing about this buffer.
    copy_whole: bool,
    /// Whether the copy in flight is a whole one.
    copy_in_flight_whole: bool,
    /// The outputs' generation when the request in flight was made: a copy that completes after
    /// a mode change holds the old geometry and is thrown away.
    requested_gen: u64,
    resized: bool,
    outputs_seen: u64,
}

impl WlrCapturer {
    /// Connects to `socket` (or the environment's compositor) and asks for the first frame.
    pub fn open(socket: Option<&Path>) -> Result<WlrCapturer, CaptureError> {
        let unsupported = |m: String| CaptureError::Unsupported(m);
        let conn = connect(socket).map_err(unsupported)?;
        let (globals, mut queue) = registry_queue_init::<ScreenState>(&conn)
            .map_err(|e| unsupported(format!("cannot list the compositor's interfaces: {e}")))?;
        let qh = queue.handle();
        let manager: ZwlrScreencopyManagerV1 = globals.bind(&qh, 1..=3, ()).map_err(|_| {
            unsupported(
                "this Wayland compositor does not offer wlr-screencopy, so its screen cannot be \
                 captured"
                    .into(),
            )
        })?;
        let manager_version = manager.version();
        let shm: wl_shm::WlShm = globals
            .bind(&qh, 1..=1, ())
            .map_err(|_| unsupported("the compositor offers no shared memory (wl_shm)".into()))?;
        let mut state = ScreenState {
            outputs: Outputs::bind_all(&globals, &qh),
            frame: FrameEvents::default(),
        };
        queue
            .roundtrip(&mut state)
            .map_err(|e| unsupported(format!("Wayland connection failed: {e}")))?;
        if state.outputs.list.is_empty() {
            return Err(unsupported(
                "the compositor has no output to capture".into(),
            ));
        }
        let outputs_seen = state.outputs.generation;
        let mut c = WlrCapturer {
            conn,
            queue,
            qh,
            state,
            manager,
            manager_version,
            shm,
            selected: 0,
            pending: None,
            copying: false,
            buffer: None,
            frame: Frame::new(1, 1),
            detector: ChangeDetector::new(),
            scratch: Vec::new(),
            full: true,
            mirror_valid: false,
            copy_whole: true,
            copy_in_flight_whole: false,
            requested_gen: outputs_seen,
            resized: false,
            outputs_seen,
        };
        c.request()?;
        Ok(c)
    }

    fn wayland(e: impl std::fmt::Display) -> CaptureError {
        CaptureError::X11(format!("Wayland: {e}"))
    }

    /// Asks for the selected output's next frame (answered once it changed).
    fn request(&mut self) -> Result<(), CaptureError> {
        if let Some(old) = self.pending.take() {
            old.destroy();
        }
        let Some((output, _)) = self.state.outputs.list.get(self.selected) else {
            return Err(CaptureError::NoSuchMonitor(self.selected));
        };
        let generation = self.state.frame.generation + 1;
        self.state.frame = FrameEvents {
            generation,
            ..FrameEvents::default()
        };
        // The cursor is drawn into the frames: no wlroots protocol tells where it is.
        self.pending = Some(self.manager.capture_output(1, output, &self.qh, generation));
        self.requested_gen = self.state.outputs.generation;
        self.copying = false;
        self.conn.flush().map_err(Self::wayland)
    }

    /// Once the compositor described the buffer it wants, gives it one and asks for the copy.
    fn start_copy(&mut self) -> Result<(), CaptureError> {
        let f = &self.state.frame;
        if self.copying || f.failed {
            return Ok(());
        }
        let Some(shape) = f.buffer else {
            return Ok(());
        };
        // Version 3 lists every buffer kind first and ends with buffer_done.
        if self.manager_version >= 3 && !f.buffer_done {
            return Ok(());
        }
        let (format, width, height, stride) = shape;
        if layout(format).is_none() {
            return Err(CaptureError::Unsupported(format!(
                "the compositor offers frames only in pixel format {format:?}"
            )));
        }
        if width == 0
            || height == 0
            || width > 16384
            || height > 16384
            || (stride as u64) < width as u64 * 4
            || (stride as u64) > width as u64 * 8
            // wl_shm pools are sized in an i32.
            || stride as u64 * height as u64 > i32::MAX as u64
        {
            return Err(CaptureError::Unsupported(format!(
                "the compositor described an impossible frame ({width}×{height}, stride {stride})"
            )));
        }
        if self.buffer.as_ref().map(|b| b.shape) != Some(shape) {
            self.buffer = None;
            let size = stride as u64 * height as u64;
            let fd = memfd_create("tandem-screencopy", MemfdFlags::CLOEXEC)
                .map_err(|e| CaptureError::X11(format!("cannot create a frame buffer: {e}")))?;
            let file = File::from(fd);
            file.set_len(size)
                .map_err(|e| CaptureError::X11(format!("cannot size the frame buffer: {e}")))?;
            let pool = self
                .shm
                .create_pool(file.as_fd(), size as i32, &self.qh, ());
            let format = match format {
                WEnum::Value(v) => v,
                WEnum::Unknown(_) => wl_shm::Format::Xrgb8888,
            };
            let buffer = pool.create_buffer(
                0,
                width as i32,
                height as i32,
                stride as i32,
                format,
                &self.qh,
                (),
            );
            self.buffer = Some(ShmBuffer {
                file,
                pool,
                buffer,
                shape,
            });
            if (self.frame.width, self.frame.height) != (width, height) {
                self.resized = self.frame.width > 1;
                self.frame = Frame::new(width, height);
                self.detector.reset();
                self.mirror_valid = false;
                self.full = true;
            }
            self.copy_whole = true;
        }
        if let (Some(p), Some(b)) = (&self.pending, &self.buffer) {
            if self.copy_whole {
                p.copy(&b.buffer);
            } else {
                p.copy_with_damage(&b.buffer);
            }
            self.copy_in_flight_whole = self.copy_whole;
            self.copying = true;
        }
        self.conn.flush().map_err(Self::wayland)
    }

    /// Reads events for at most `timeout`; true when a frame is ready.
    fn pump(&mut self, timeout: Duration) -> Result<bool, CaptureError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.start_copy()?;
            if self.state.frame.ready && self.state.outputs.generation != self.requested_gen {
                // Copied with the geometry from before a mode change: ask again, whole.
                self.copy_whole = true;
                self.request()?;
            }
            if self.state.frame.ready {
                return Ok(true);
            }
            if self.state.frame.failed {
                // The output went away or changed: ask again, whole.
                self.copy_whole = true;
                self.request()?;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            read_with_timeout(&self.conn, &mut self.queue, &mut self.state, left)
                .map_err(CaptureError::X11)?;
            self.start_copy()?;
            if self.state.frame.ready {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
        }
    }

    /// Takes the ready frame's damaged rows into the mirror; returns what changed.
    fn take_ready(&mut self) -> Result<Vec<Rect>, CaptureError> {
        let Some(buf) = &self.buffer else {
            return Ok(Vec::new());
        };
        let (format, w, h, stride) = buf.shape;
        let lay = layout(format).unwrap_or(Layout::Bgrx);
        let f = &self.state.frame;
        let full =
            self.full || self.copy_in_flight_whole || self.detector.needs_full(w, h) || f.y_invert;
        // Damage is in buffer coordinates; merged into one band of rows per rectangle.
        let regions: Vec<Rect> = if full {
            vec![Rect { x: 0, y: 0, w, h }]
        } else {
            f.damage
                .iter()
                .filter_map(|r| {
                    let x = r.x.min(w);
                    let y = r.y.min(h);
                    let rw = r.w.min(w - x);
                    let rh = r.h.min(h - y);
                    (rw > 0 && rh > 0).then_some(Rect { x, y, w: rw, h: rh })
                })
                .collect()
        };
        let y_invert = f.y_invert;
        let mut changed = Vec::new();
        for r in regions {
            let rows = r.h as usize;
            let len = rows * stride as usize;
            self.scratch.resize(len, 0);
            let first_row = if y_invert { h - r.y - r.h } else { r.y };
            buf.file
                .read_exact_at(&mut self.scratch, first_row as u64 * stride as u64)
                .map_err(|e| CaptureError::X11(format!("cannot read the frame buffer: {e}")))?;
            if y_invert {
                let s = stride as usize;
                for i in 0..rows / 2 {
                    let (a, b) = self.scratch.split_at_mut((rows - 1 - i) * s);
                    a[i * s..(i + 1) * s].swap_with_slice(&mut b[..s]);
                }
            }
            if lay == Layout::Rgbx {
                for row in self.scratch.chunks_exact_mut(stride as usize) {
                    for px in row[..w as usize * 4].chunks_exact_mut(4) {
                        px.swap(0, 2);
                    }
                }
            }
            if full {
                changed.extend(self.detector.update_from(
                    &self.scratch,
                    stride as usize,
                    &mut self.frame,
                ));
            } else {
                let src = &self.scratch[r.x as usize * 4..];
                changed.extend(self.detector.update_region(
                    src,
                    stride as usize,
                    r,
                    &mut self.frame,
                ));
            }
        }
        self.full = false;
        self.mirror_valid = true;
        if self.copy_in_flight_whole {
            self.copy_whole = false;
        }
        Ok(changed)
    }
}

impl Capturer for WlrCapturer {
    fn monitors(&self) -> Vec<Monitor> {
        self.state
            .outputs
            .list
            .iter()
            .enumerate()
            .map(|(i, (_, o))| Monitor {
                name: if o.name.is_empty() {
                    format!("output {}", i + 1)
                } else {
                    o.name.clone()
                },
                x: o.x.max(0) as u32,
                y: o.y.max(0) as u32,
                width: o.width.max(0) as u32,
                height: o.height.max(0) as u32,
                primary: i == 0,
            })
            .collect()
    }

    fn size(&self) -> (u32, u32) {
        self.state
            .outputs
            .list
            .get(self.selected)
            .map_or((0, 0), |(_, o)| {
                (o.width.max(0) as u32, o.height.max(0) as u32)
            })
    }

    fn select(&mut self, index: usize) -> Result<(), CaptureError> {
        if index >= self.state.outputs.list.len() {
            return Err(CaptureError::NoSuchMonitor(index));
        }
        self.selected = index;
        self.buffer = None;
        self.detector.reset();
        self.mirror_valid = false;
        self.copy_whole = true;
        self.full = true;
        self.request()
    }

    fn request_full(&mut self) {
        // The mirror holds the whole current picture: the next capture reports all of it.
        self.full = true;
    }

    fn capture(&mut self) -> Result<Captured<'_>, CaptureError> {
        // Take what arrived without waiting.
        let ready = self.pump(Duration::ZERO)?;
        let mut damage = if ready {
            let d = self.take_ready()?;
            self.request()?;
            d
        } else {
            Vec::new()
        };
        if self.full && self.mirror_valid {
            // A keyframe asked for while nothing changed: the mirror is complete.
            self.full = false;
            damage = vec![Rect {
                x: 0,
                y: 0,
                w: self.frame.width,
                h: self.frame.height,
            }];
        }
        let mut resized = std::mem::take(&mut self.resized);
        if self.state.outputs.generation != self.outputs_seen {
            self.outputs_seen = self.state.outputs.generation;
            resized = true;
        }
        Ok(Captured {
            frame: &self.frame,
            damage,
            cursor: CursorState {
                x: 0,
                y: 0,
                visible: false,
                shape: None,
            },
            resized,
        })
    }

    fn wait_for_change(&mut self, timeout: Duration) -> bool {
        match self.pump(timeout) {
            Ok(ready) => ready,
            Err(e) => {
                tracing::warn!(error = %e, "wlroots capture");
                std::thread::sleep(timeout);
                true
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Input

struct InputState {
    outputs: Outputs,
}

impl Dispatch<wl_registry::WlRegistry, GlobalListContents> for InputState {
    fn event(
        _: &mut Self,
        _: &wl_registry::WlRegistry,
        _: wl_registry::Event,
        _: &GlobalListContents,
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
    }
}

impl Dispatch<wl_output::WlOutput, ()> for InputState {
    fn event(
        s: &mut Self,
        o: &wl_output::WlOutput,
        e: wl_output::Event,
        _: &(),
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
        s.outputs.handle(o, e);
    }
}

delegate_noop!(InputState: ignore wl_seat::WlSeat);
delegate_noop!(InputState: ignore ZwlrVirtualPointerManagerV1);
delegate_noop!(InputState: ignore ZwlrVirtualPointerV1);
delegate_noop!(InputState: ignore ZwpVirtualKeyboardManagerV1);
delegate_noop!(InputState: ignore ZwpVirtualKeyboardV1);

/// Input through wlroots' virtual pointer and virtual keyboard.
pub struct WlrInjector {
    conn: Connection,
    queue: EventQueue<InputState>,
    state: InputState,
    pointer: ZwlrVirtualPointerV1,
    keyboard: ZwpVirtualKeyboardV1,
    /// The layout keymap's memfd and size.
    keymap: (File, u32),
    /// The layout's state: a virtual keyboard's keys do not move the compositor's modifiers
    /// (wlroots leaves that to the client), so they are computed here and sent.
    xkb_state: xkb::State,
    /// depressed, latched, locked, group as last sent.
    mods: (u32, u32, u32, u32),
    started: Instant,
}

const XKB_V1: u32 = 1;

/// A keymap in a sealed-enough memfd for the compositor to map.
fn keymap_file(text: &str) -> Result<(File, u32), InjectError> {
    let err = |e: std::io::Error| InjectError::Inject(format!("cannot pass a keymap: {e}"));
    let fd = memfd_create("tandem-keymap", MemfdFlags::CLOEXEC)
        .map_err(|e| err(std::io::Error::from(e)))?;
    let file = File::from(fd);
    // NUL-terminated, as the protocol's consumers expect.
    let mut bytes = text.as_bytes().to_vec();
    bytes.push(0);
    file.write_all_at(&bytes, 0).map_err(err)?;
    Ok((file, bytes.len() as u32))
}

/// The layout keymap from the session's XKB settings.
fn layout_keymap() -> Result<xkb::Keymap, InjectError> {
    let ctx = xkb::Context::new(xkb::CONTEXT_NO_FLAGS);
    let km = xkb::Keymap::new_from_names(&ctx, "", "", "", "", None, xkb::KEYMAP_COMPILE_NO_FLAGS)
        .ok_or_else(|| InjectError::Open {
            display: "wayland".into(),
            reason: "cannot compile a keyboard layout (XKB_DEFAULT_LAYOUT?); is \
                         xkb-data installed?"
                .into(),
        })?;
    Ok(km)
}

/// A keymap whose keycodes 9, 10, … type `keysyms` in order (for Unicode text), checked by
/// compiling it.
pub fn text_keymap(keysyms: &[xkb::Keysym]) -> Option<String> {
    let mut codes = String::new();
    let mut syms = String::new();
    for (i, k) in keysyms.iter().enumerate() {
        let name = xkb::keysym_get_name(*k);
        if name.is_empty() || name == "NoSymbol" {
            return None;
        }
        codes.push_str(&format!("<T{i}> = {};\n", i + 9));
        syms.push_str(&format!("key <T{i}> {{ [ {name} ] }};\n"));
    }
    let text = format!(
        "xkb_keymap {{\nxkb_keycodes \"tandem\" {{ minimum = 8; maximum = {};\n{codes}}};\n\
         xkb_types \"tandem\" {{ include \"complete\" }};\n\
         xkb_compatibility \"tandem\" {{ include \"complete\" }};\n\
         xkb_symbols \"tandem\" {{\n{syms}}};\n}};\n",
        keysyms.len() + 9
    );
    let ctx = xkb::Context::new(xkb::CONTEXT_NO_FLAGS);
    xkb::Keymap::new_from_string(
        &ctx,
        text.clone(),
        xkb::KEYMAP_FORMAT_TEXT_V1,
        xkb::KEYMAP_COMPILE_NO_FLAGS,
    )?;
    Some(text)
}

/// The keysym a character types.
fn char_keysym(c: char) -> xkb::Keysym {
    match c {
        '\n' | '\r' => xkb::Keysym::Return,
        '\t' => xkb::Keysym::Tab,
        '\u{8}' => xkb::Keysym::BackSpace,
        _ => xkb::utf32_to_keysym(c as u32),
    }
}

/// Characters per text keymap (keycodes 9 … 9+n).
const TEXT_BATCH: usize = 200;

impl WlrInjector {
    /// Connects to `socket` (or the environment's compositor) and creates the virtual devices.
    pub fn open(socket: Option<&Path>) -> Result<WlrInjector, InjectError> {
        let open_err = |reason: String| InjectError::Open {
            display: std::env::var("WAYLAND_DISPLAY").unwrap_or_default(),
            reason,
        };
        let conn = connect(socket).map_err(open_err)?;
        let (globals, mut queue) = registry_queue_init::<InputState>(&conn)
            .map_err(|e| open_err(format!("cannot list the compositor's interfaces: {e}")))?;
        let qh = queue.handle();
        let seat: wl_seat::WlSeat = globals
            .bind(&qh, 1..=1, ())
            .map_err(|_| open_err("the compositor has no seat".into()))?;
        let pm: ZwlrVirtualPointerManagerV1 = globals.bind(&qh, 1..=2, ()).map_err(|_| {
            open_err("this compositor does not offer wlr-virtual-pointer: no remote mouse".into())
        })?;
        let km: ZwpVirtualKeyboardManagerV1 = globals.bind(&qh, 1..=1, ()).map_err(|_| {
            open_err("this compositor does not offer virtual-keyboard: no remote keyboard".into())
        })?;
        let pointer = pm.create_virtual_pointer(Some(&seat), &qh, ());
        let keyboard = km.create_virtual_keyboard(&seat, &qh, ());
        let layout = layout_keymap()?;
        let keymap = keymap_file(&layout.get_as_string(xkb::KEYMAP_FORMAT_TEXT_V1))?;
        keyboard.keymap(XKB_V1, keymap.0.as_fd(), keymap.1);
        let xkb_state = xkb::State::new(&layout);
        let mut state = InputState {
            outputs: Outputs::bind_all(&globals, &qh),
        };
        queue
            .roundtrip(&mut state)
            .map_err(|e| open_err(format!("Wayland connection failed: {e}")))?;
        Ok(WlrInjector {
            conn,
            queue,
            state,
            pointer,
            keyboard,
            keymap,
            xkb_state,
            mods: (0, 0, 0, 0),
            started: Instant::now(),
        })
    }

    /// Sends the modifiers the layout state has now, if they changed (or `always`).
    fn sync_modifiers(&mut self, always: bool) {
        let st = &self.xkb_state;
        let mods = (
            st.serialize_mods(xkb::STATE_MODS_DEPRESSED),
            st.serialize_mods(xkb::STATE_MODS_LATCHED),
            st.serialize_mods(xkb::STATE_MODS_LOCKED),
            st.serialize_layout(xkb::STATE_LAYOUT_EFFECTIVE),
        );
        if always || mods != self.mods {
            self.mods = mods;
            self.keyboard.modifiers(mods.0, mods.1, mods.2, mods.3);
        }
    }

    fn now(&self) -> u32 {
        self.started.elapsed().as_millis() as u32
    }

    fn failed(e: impl std::fmt::Display) -> InjectError {
        InjectError::Inject(format!("Wayland: {e}"))
    }

    fn type_text(&mut self, text: &str) -> Result<(), InjectError> {
        let chars: Vec<char> = text.chars().collect();
        for chunk in chars.chunks(TEXT_BATCH) {
            let mut syms: Vec<xkb::Keysym> = Vec::new();
            let mut order = Vec::with_capacity(chunk.len());
            for &c in chunk {
                let k = char_keysym(c);
                if k.raw() == 0 {
                    continue;
                }
                let i = syms.iter().position(|s| *s == k).unwrap_or_else(|| {
                    syms.push(k);
                    syms.len() - 1
                });
                order.push(i);
            }
            if syms.is_empty() {
                continue;
            }
            let Some(map) = text_keymap(&syms) else {
                return Err(InjectError::Inject(
                    "text contains characters no keymap can type".into(),
                ));
            };
            let (file, size) = keymap_file(&map)?;
            self.keyboard.keymap(XKB_V1, file.as_fd(), size);
            for i in order {
                let t = self.now();
                // Keycode 9 + i in XKB is evdev code 1 + i.
                self.keyboard.key(t, 1 + i as u32, 1);
                self.keyboard.key(t, 1 + i as u32, 0);
            }
            self.keyboard
                .keymap(XKB_V1, self.keymap.0.as_fd(), self.keymap.1);
            self.sync_modifiers(true);
            self.conn.flush().map_err(Self::failed)?;
        }
        Ok(())
    }
}

fn evdev_button(b: MouseButton) -> u32 {
    match b {
        MouseButton::Left => 0x110,
        MouseButton::Right => 0x111,
        MouseButton::Middle => 0x112,
        MouseButton::Back => 0x113,
        MouseButton::Forward => 0x114,
    }
}

impl Injector for WlrInjector {
    fn apply(&mut self, a: &Action) -> Result<(), InjectError> {
        // Output changes (a new resolution) before positions are mapped.
        read_with_timeout(&self.conn, &mut self.queue, &mut self.state, Duration::ZERO)
            .map_err(InjectError::Inject)?;
        let t = self.now();
        match a {
            Action::MoveTo { x, y } => {
                let b = self.state.outputs.bounds();
                let rx = (*x - b.x).clamp(0, b.width as i32 - 1) as u32;
                let ry = (*y - b.y).clamp(0, b.height as i32 - 1) as u32;
                self.pointer.motion_absolute(t, rx, ry, b.width, b.height);
                self.pointer.frame();
            }
            Action::Button { button, pressed } => {
                let state = if *pressed {
                    wl_pointer::ButtonState::Pressed
                } else {
                    wl_pointer::ButtonState::Released
                };
                self.pointer.button(t, evdev_button(*button), state);
                self.pointer.frame();
            }
            Action::Scroll { axis, clicks } => {
                let axis = match axis {
                    ScrollAxis::Vertical => wl_pointer::Axis::VerticalScroll,
                    ScrollAxis::Horizontal => wl_pointer::Axis::HorizontalScroll,
                };
                self.pointer.axis_source(wl_pointer::AxisSource::Wheel);
                // 15 units per notch, as libinput reports a wheel click.
                self.pointer
                    .axis_discrete(t, axis, *clicks as f64 * 15.0, *clicks);
                self.pointer.frame();
            }
            Action::Key { keycode, pressed } => {
                // X keycodes are evdev codes + 8.
                let Some(code) = (*keycode as u32).checked_sub(8) else {
                    return Ok(());
                };
                self.keyboard.key(t, code, u32::from(*pressed));
                let dir = if *pressed {
                    xkb::KeyDirection::Down
                } else {
                    xkb::KeyDirection::Up
                };
                self.xkb_state.update_key(xkb::Keycode::new(code + 8), dir);
                self.sync_modifiers(false);
            }
            Action::Text(s) => self.type_text(s)?,
        }
        self.conn.flush().map_err(Self::failed)
    }

    fn screen(&self) -> Result<DisplayRect, InjectError> {
        Ok(self.state.outputs.bounds())
    }
}

/// Lists the compositor's global interfaces (to choose a backend).
pub fn globals() -> Result<Vec<String>, String> {
    let conn = connect(None)?;
    let (globals, _queue) = registry_queue_init::<ProbeState>(&conn)
        .map_err(|e| format!("cannot list the compositor's interfaces: {e}"))?;
    Ok(globals
        .contents()
        .clone_list()
        .into_iter()
        .map(|g| g.interface)
        .collect())
}

struct ProbeState;
impl Dispatch<wl_registry::WlRegistry, GlobalListContents> for ProbeState {
    fn event(
        _: &mut Self,
        _: &wl_registry::WlRegistry,
        _: wl_registry::Event,
        _: &GlobalListContents,
        _: &Connection,
        _: &QueueHandle<Self>,
    ) {
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_keymaps_compile_for_any_character() {
        let syms: Vec<_> = "aé€😀\n\tЖ".chars().map(char_keysym).collect();
        let map = text_keymap(&syms).expect("compiles");
        assert!(map.contains("<T6> = 15"));
    }

    #[test]
    fn the_layout_keymap_compiles() {
        let text = layout_keymap()
            .unwrap()
            .get_as_string(xkb::KEYMAP_FORMAT_TEXT_V1);
        assert!(text.contains("xkb_keycodes"));
    }

    #[test]
    fn bounds_cover_all_outputs() {
        let info = |x, y, width, height| OutputInfo {
            name: String::new(),
            x,
            y,
            width,
            height,
        };
        assert_eq!(bounds_of([].iter()).width, 1);
        let b = bounds_of([info(0, 0, 1920, 1080), info(1920, -200, 1280, 1024)].iter());
        assert_eq!((b.x, b.y, b.width, b.height), (0, -200, 3200, 1280));
        // An output without a mode yet does not count.
        let b = bounds_of([info(0, 0, 800, 600), info(5000, 0, 0, 0)].iter());
        assert_eq!((b.width, b.height), (800, 600));
    }

    #[test]
    fn pixel_formats() {
        assert_eq!(
            layout(WEnum::Value(wl_shm::Format::Xrgb8888)),
            Some(Layout::Bgrx)
        );
        assert_eq!(
            layout(WEnum::Value(wl_shm::Format::Abgr8888)),
            Some(Layout::Rgbx)
        );
        assert_eq!(layout(WEnum::Value(wl_shm::Format::Rgb565)), None);
    }
}
