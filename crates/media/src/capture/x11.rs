//! X11 capture with x11rb: MIT-SHM through a segment the X server creates and hands over as a file
//! descriptor (MIT-SHM 1.2, `ShmCreateSegment`).
//!
//! Such a segment is an anonymous memory file: it has no System V key, does not appear in `ipcs -m`,
//! and only processes holding the descriptor (this one and the X server) can map it. scrap 0.5 instead
//! creates a System V segment with mode 0777 that any local user can attach to and read the screen;
//! Tandem never does that. Servers without MIT-SHM 1.2 fall back to plain `GetImage` (a copy through
//! the socket: slower, equally private).
//!
//! The cursor comes from XFixes (position every frame, image only when its shape changed); monitors
//! from RandR; a resolution change is noticed at the next capture and handled without a restart.

use super::{CaptureError, Captured, Capturer, CursorShape, CursorState, Monitor};
use crate::frame::{ChangeDetector, Frame, Rect};
use std::os::fd::OwnedFd;
use x11rb::connection::{Connection, RequestConnection};
use x11rb::protocol::damage::{ConnectionExt as _, ReportLevel};
use x11rb::protocol::randr::ConnectionExt as _;
use x11rb::protocol::shm::ConnectionExt as _;
use x11rb::protocol::xfixes::{ConnectionExt as _, CursorNotifyMask};
use x11rb::protocol::xproto::{
    ChangeWindowAttributesAux, ConnectionExt as _, EventMask, ImageFormat, Rectangle, Window,
};
use x11rb::rust_connection::RustConnection;

struct Shm {
    seg: u32,
    map: memmap2::Mmap,
    size: usize,
}

/// Maps a segment's descriptor read-only.
#[allow(unsafe_code)]
fn map_segment(fd: OwnedFd, size: usize) -> std::io::Result<memmap2::Mmap> {
    let file = std::fs::File::from(fd);
    // SAFETY: the mapping is read-only and private to this process; the only other writer is the
    // X server, which writes into it only during our own ShmGetImage requests, each of which we
    // complete (wait for its reply) before reading the memory and never while a slice of it is
    // borrowed. The file is a server-created anonymous segment of exactly `size` bytes.
    unsafe { memmap2::MmapOptions::new().len(size).map(&file) }
}

pub struct X11Capturer {
    conn: RustConnection,
    root: Window,
    screen: (u32, u32),
    monitors: Vec<Monitor>,
    selected: usize,
    shm: Option<Shm>,
    shm_supported: bool,
    frame: Frame,
    detector: ChangeDetector,
    cursor_serial: u32,
    cursor_dirty: bool,
    xfixes: bool,
    /// The root window was reconfigured (a resolution change) since the last capture.
    resize_pending: bool,
    /// Captures since the screen size was last read from the server (a safety net for a missed
    /// event).
    since_geometry: u32,
    /// XDamage object on the root window (None without the extension): the server tells us when
    /// something was drawn, so [`Capturer::wait_for_change`] wakes at once instead of polling.
    damage: Option<u32>,
    /// Something was drawn since the last capture.
    damaged: bool,
    /// An XFixes region that receives what was drawn when the damage is taken (None without
    /// XFixes): captures then read only those areas.
    damage_parts: Option<u32>,
    /// Pixels read by the last capture.
    last_read: u64,
    /// Captures since the whole monitor was last read.
    since_full: u32,
    /// A capture failed after the server's record of what was drawn had been taken: that record
    /// is lost, so the next capture reads the whole monitor.
    reread_all: bool,
    /// The server's damage reports are trusted to cover every drawing. Cleared (for the rest of
    /// this capturer's life) when a safety-net full read finds a change nobody reported.
    trust_damage: bool,
    /// Drawn areas reported since the last full read (monitor coordinates), for that check;
    /// `None` once too many to keep.
    reported: Option<Vec<Rect>>,
    /// XDamage object that reports each drawing (None without the extension).
    drawings: Option<u32>,
    /// When the latest drawing since the last capture was reported (read from the connection).
    drawn_last_at: Option<std::time::Instant>,
    /// Drawing reports received: one per rectangle of every drawing.
    reports: u64,
}

impl std::fmt::Debug for X11Capturer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X11Capturer")
            .field("screen", &self.screen)
            .field("shm", &self.shm.is_some())
            .finish()
    }
}

fn check_size(got: usize, want: usize, w: u32, h: u32) -> Result<(), CaptureError> {
    if got == want {
        Ok(())
    } else {
        Err(CaptureError::Unsupported(format!(
            "unexpected image size {got} for {w}x{h}"
        )))
    }
}

/// At most this many drawn areas are read one by one; more (a busy screen) read the whole monitor.
const MAX_REGION_READS: usize = 16;

/// A capture waits until no drawing has been reported for this long (see [`settle_wait`]).
const QUIET: std::time::Duration = std::time::Duration::from_micros(500);

/// … and at most this long after the wait began (an application that draws without pause is
/// captured anyway).
const SETTLE_MAX: std::time::Duration = std::time::Duration::from_millis(3);

/// While the capture waits, a report that wakes it is read this much later, so a burst of
/// drawings costs a few wake-ups, not one each: they compete with the drawing application and
/// the X server for the CPU (glass bench, 40 rectangles a frame: drawn in 1.22–1.32 ms with the
/// old rule, 1.44–1.68 ms with a wake-up for each report, 1.42–1.45 ms with this).
const SETTLE_BATCH: std::time::Duration = std::time::Duration::from_micros(100);

/// How much longer a capture should wait at `now` for the drawing to finish, given when the wait
/// began and when the latest drawing since the last capture was reported; `None`: capture now.
///
/// Applications draw a frame in several requests, and a capture in the middle sends part of the
/// frame now and the rest only with the next frame. A fixed 1.5 ms after the first report was
/// the rule before; waiting for a quiet moment instead starts most captures ≈0.8 ms sooner
/// (glass bench at 1080p, the scene drawn then its frame counter, A/B: drawn → capture 1.5–1.8
/// → 0.6–0.9 ms for typing, scrolling and dragging; glass-to-glass p50 1–2 ms lower) and waits
/// longer for a long drawing: full-screen motion, drawn in 1.2–2.3 ms, was at times captured
/// before its end by the old rule (drawn → capture 0.6–0.7 → 0.8–0.9 ms).
///
/// Reports count from when they are read, not sent (up to ≈0.15 ms later while the capture
/// waits). A drawing read while the caller was busy (during the previous capture) and followed
/// by nothing has had its quiet time: captured at once. The cap counts from when the wait began,
/// not from the first report, which may have been read long before.
fn settle_wait(
    now: std::time::Instant,
    began: std::time::Instant,
    last: std::time::Instant,
) -> Option<std::time::Duration> {
    let waited = now.saturating_duration_since(began);
    let since_last = now.saturating_duration_since(last);
    if since_last >= QUIET || waited >= SETTLE_MAX {
        return None;
    }
    Some((QUIET - since_last).min(SETTLE_MAX - waited))
}

/// Every this many captures the whole monitor is read even when the server reported only parts
/// (every 2.5–5 s: the agent looks at the screen 30–60 times a second). If such a read finds a
/// change the server did not report (some drivers render without telling XDamage), reports are
/// no longer trusted and every capture reads the whole monitor, as before XDamage was used.
const FULL_READ_EVERY: u32 = 150;

/// At most this many reported areas are remembered between full reads for that check.
const MAX_REPORTED: usize = 4096;

/// The drawn rectangles (root coordinates) that fall on monitor `m`, relative to it.
fn clip_to_monitor(drawn: &[Rectangle], m: &Monitor) -> Vec<Rect> {
    let (mx0, my0) = (m.x as i64, m.y as i64);
    let (mx1, my1) = (mx0 + m.width as i64, my0 + m.height as i64);
    drawn
        .iter()
        .filter_map(|r| {
            let (x0, y0) = ((r.x as i64).max(mx0), (r.y as i64).max(my0));
            let x1 = (r.x as i64 + r.width as i64).min(mx1);
            let y1 = (r.y as i64 + r.height as i64).min(my1);
            (x1 > x0 && y1 > y0).then(|| Rect {
                x: (x0 - mx0) as u32,
                y: (y0 - my0) as u32,
                w: (x1 - x0) as u32,
                h: (y1 - y0) as u32,
            })
        })
        .collect()
}

fn xerr(e: impl std::fmt::Display) -> CaptureError {
    CaptureError::X11(e.to_string())
}

impl X11Capturer {
    /// Connects to `display` (or `$DISPLAY`).
    pub fn open(display: Option<&str>) -> Result<Self, CaptureError> {
        let (conn, n) = RustConnection::connect(display).map_err(|e| CaptureError::Open {
            display: display
                .map(str::to_string)
                .or_else(|| std::env::var("DISPLAY").ok())
                .unwrap_or_default(),
            reason: e.to_string(),
        })?;
        let screen = &conn.setup().roots[n];
        let root = screen.root;
        let size = (
            screen.width_in_pixels as u32,
            screen.height_in_pixels as u32,
        );
        if screen.root_depth != 24 && screen.root_depth != 32 {
            return Err(CaptureError::Unsupported(format!(
                "screen depth {} (24 or 32 needed)",
                screen.root_depth
            )));
        }
        let shm_supported = conn
            .extension_information(x11rb::protocol::shm::X11_EXTENSION_NAME)
            .ok()
            .flatten()
            .is_some()
            && conn
                .shm_query_version()
                .ok()
                .and_then(|c| c.reply().ok())
                .is_some_and(|v| (v.major_version, v.minor_version) >= (1, 2));
        let xfixes = conn
            .xfixes_query_version(4, 0)
            .ok()
            .and_then(|c| c.reply().ok())
            .is_some();
        if xfixes {
            let _ = conn.xfixes_select_cursor_input(root, CursorNotifyMask::DISPLAY_CURSOR);
        }
        // Resolution changes arrive as ConfigureNotify on the root window.
        let _ = conn.change_window_attributes(
            root,
            &ChangeWindowAttributesAux::new().event_mask(EventMask::STRUCTURE_NOTIFY),
        );
        let damage_object = |level| {
            let id = conn.generate_id().ok()?;
            conn.damage_create(id, root, level).ok()?.check().ok()?;
            Some(id)
        };
        // The object whose region a capture fetches: it reports once, when something is drawn
        // after a capture.
        let damage = conn
            .damage_query_version(1, 1)
            .ok()
            .and_then(|c| c.reply().ok())
            .and_then(|_| damage_object(ReportLevel::NON_EMPTY));
        // A second object that reports every drawing, not only the first since the last capture,
        // so a capture can wait until the drawing stops. Raw rectangles, not deltas: a drawing
        // over an area already drawn since the last capture (text on a cleared field) adds no new
        // area and would not be reported as a delta. The server keeps no region for it; one
        // report (32 bytes) per rectangle of each drawing.
        let drawings = damage.and_then(|_| damage_object(ReportLevel::RAW_RECTANGLES));
        let damage_parts = damage.filter(|_| xfixes).and_then(|_| {
            let id = conn.generate_id().ok()?;
            conn.xfixes_create_region(id, &[]).ok()?.check().ok()?;
            Some(id)
        });
        let mut c = X11Capturer {
            conn,
            root,
            screen: size,
            monitors: Vec::new(),
            selected: 0,
            shm: None,
            shm_supported,
            frame: Frame::new(0, 0),
            detector: ChangeDetector::new(),
            cursor_serial: 0,
            cursor_dirty: true,
            xfixes,
            resize_pending: false,
            since_geometry: 0,
            damage,
            damaged: true,
            damage_parts,
            last_read: 0,
            since_full: 0,
            reread_all: false,
            trust_damage: true,
            reported: Some(Vec::new()),
            drawings,
            drawn_last_at: None,
            reports: 0,
        };
        c.monitors = c.read_monitors()?;
        if !shm_supported {
            tracing::warn!("X server lacks MIT-SHM 1.2: capturing with GetImage (slower)");
        }
        Ok(c)
    }

    /// True when frames come through a private shared-memory segment.
    pub fn uses_shm(&self) -> bool {
        self.shm_supported
    }

    fn read_monitors(&self) -> Result<Vec<Monitor>, CaptureError> {
        let whole = Monitor {
            name: "screen".into(),
            x: 0,
            y: 0,
            width: self.screen.0,
            height: self.screen.1,
            primary: true,
        };
        let reply = self
            .conn
            .randr_get_monitors(self.root, true)
            .ok()
            .and_then(|c| c.reply().ok());
        let Some(reply) = reply else {
            return Ok(vec![whole]);
        };
        let mut out = Vec::new();
        for m in reply.monitors {
            let name = self
                .conn
                .get_atom_name(m.name)
                .ok()
                .and_then(|c| c.reply().ok())
                .map(|r| String::from_utf8_lossy(&r.name).into_owned())
                .unwrap_or_else(|| format!("monitor {}", out.len()));
            // Clip to the screen: a monitor must never reach outside what can be captured.
            let x = (m.x.max(0) as u32).min(self.screen.0);
            let y = (m.y.max(0) as u32).min(self.screen.1);
            let w = (m.width as u32).min(self.screen.0 - x);
            let h = (m.height as u32).min(self.screen.1 - y);
            if w >= 2 && h >= 2 {
                out.push(Monitor {
                    name,
                    x,
                    y,
                    width: w,
                    height: h,
                    primary: m.primary,
                });
            }
        }
        if out.is_empty() {
            out.push(whole);
        }
        Ok(out)
    }

    fn ensure_shm(&mut self, bytes: usize) -> Result<(), CaptureError> {
        if !self.shm_supported || self.shm.as_ref().is_some_and(|s| s.size >= bytes) {
            return Ok(());
        }
        if let Some(old) = self.shm.take() {
            let _ = self.conn.shm_detach(old.seg);
        }
        let seg = self.conn.generate_id().map_err(xerr)?;
        let size = u32::try_from(bytes)
            .map_err(|_| CaptureError::Unsupported("screen too large".into()))?;
        let reply = self
            .conn
            .shm_create_segment(seg, size, false)
            .map_err(xerr)?
            .reply()
            .map_err(xerr)?;
        let map = map_segment(reply.shm_fd, bytes).map_err(xerr)?;
        self.shm = Some(Shm {
            seg,
            map,
            size: bytes,
        });
        Ok(())
    }

    /// Reads only what was drawn, when the server told us what (`drawn`, root coordinates) and it
    /// is a small part of the monitor; `None` when the whole monitor must be read instead (and
    /// compared with the last frame). As a safety net against a drawing the server did not
    /// report, every `FULL_READ_EVERY`-th capture reads the whole monitor anyway; so does one
    /// after a failed capture (`force_full`).
    fn read_drawn(
        &mut self,
        drawn: Option<Vec<Rectangle>>,
        m: &Monitor,
        force_full: bool,
    ) -> Result<Option<Vec<Rect>>, CaptureError> {
        self.since_full += 1;
        let Some(drawn) = drawn else {
            return Ok(None);
        };
        let rects = clip_to_monitor(&drawn, m);
        if let Some(reported) = &mut self.reported {
            reported.extend_from_slice(&rects);
            if reported.len() > MAX_REPORTED {
                self.reported = None;
            }
        }
        if !self.trust_damage
            || force_full
            || self.detector.needs_full(m.width, m.height)
            || self.since_full >= FULL_READ_EVERY
        {
            return Ok(None);
        }
        let area: u64 = rects.iter().map(Rect::area).sum();
        if rects.len() > MAX_REGION_READS || area * 2 >= m.width as u64 * m.height as u64 {
            return Ok(None);
        }
        self.read_regions(m, &rects)
    }

    /// Reads the drawn `rects` of monitor `m` (relative to it) into the frame: all requests go out
    /// at once, each into its own part of the shared segment, then the replies are awaited. Returns
    /// the tiles that really changed (a drawing may repaint the same pixels).
    fn read_regions(
        &mut self,
        m: &Monitor,
        rects: &[Rect],
    ) -> Result<Option<Vec<Rect>>, CaptureError> {
        let Some(shm) = &self.shm else {
            return Ok(None);
        };
        let total: u64 = rects.iter().map(|r| r.area() * 4).sum();
        if total > shm.size as u64 {
            return Ok(None);
        }
        let mut pending = Vec::with_capacity(rects.len());
        let mut offset = 0usize;
        for r in rects {
            let len = r.area() as usize * 4;
            let cookie = self
                .conn
                .shm_get_image(
                    self.root,
                    (m.x + r.x) as i16,
                    (m.y + r.y) as i16,
                    r.w as u16,
                    r.h as u16,
                    u32::MAX,
                    ImageFormat::Z_PIXMAP.into(),
                    shm.seg,
                    offset as u32,
                )
                .map_err(xerr)?;
            pending.push((cookie, *r, offset, len));
            offset += len;
        }
        let mut replies = Vec::with_capacity(pending.len());
        for (cookie, r, offset, len) in pending {
            let reply = cookie.reply().map_err(xerr)?;
            check_size(reply.size as usize, len, r.w, r.h)?;
            replies.push((r, offset, len));
        }
        let mut damage = Vec::new();
        for (r, offset, len) in replies {
            let src = &shm.map[offset..offset + len];
            damage.extend(
                self.detector
                    .update_region(src, r.w as usize * 4, r, &mut self.frame),
            );
        }
        self.last_read = total / 4;
        Ok(Some(damage))
    }

    /// Pixels read from the X server by the last capture (the whole monitor, only what was
    /// drawn, or none on an idle screen).
    pub fn last_read_pixels(&self) -> u64 {
        self.last_read
    }

    /// Handles pending X events: cursor changes and root reconfiguration.
    fn drain_events(&mut self) {
        while let Ok(Some(ev)) = self.conn.poll_for_event() {
            match ev {
                x11rb::protocol::Event::XfixesCursorNotify(_) => self.cursor_dirty = true,
                x11rb::protocol::Event::DamageNotify(ev) => {
                    self.damaged = true;
                    if self.drawings.is_none_or(|d| d == ev.damage) {
                        self.drawn_last_at = Some(std::time::Instant::now());
                        self.reports += 1;
                    }
                }
                x11rb::protocol::Event::ConfigureNotify(c) if c.window == self.root => {
                    self.resize_pending = true
                }
                _ => {}
            }
        }
    }

    /// Waits until the drawing reported so far has finished (see [`settle_wait`]).
    fn settle(&mut self) {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        // Nothing reported (a resize alone): nothing to wait for.
        let began = std::time::Instant::now();
        while let Some(wait) = self
            .drawn_last_at
            .and_then(|last| settle_wait(std::time::Instant::now(), began, last))
        {
            let ts = Timespec {
                tv_sec: wait.as_secs() as _,
                tv_nsec: wait.subsec_nanos() as _,
            };
            let mut fds = [PollFd::new(self.conn.stream(), PollFlags::IN)];
            let readable = poll(&mut fds, Some(&ts));
            // Something to read, or an interrupted poll: read it (after a short batch) and
            // decide again. The batch never runs past the cap.
            let cap_left = SETTLE_MAX.saturating_sub(began.elapsed());
            match readable {
                Ok(0) => {}
                Ok(_) => std::thread::sleep(SETTLE_BATCH.min(cap_left)),
                Err(_) => std::thread::sleep(SETTLE_BATCH.min(cap_left).min(wait)),
            }
            self.drain_events();
        }
    }

    /// Drawing reports received so far: one per rectangle of every drawing (for tests).
    pub fn drawing_reports(&self) -> u64 {
        self.reports
    }

    /// Re-reads the screen size when the root window was reconfigured (or, as a safety net, every
    /// 300 captures); on a change, re-reads monitors and starts over.
    fn check_resize(&mut self) -> Result<bool, CaptureError> {
        self.drain_events();
        self.since_geometry += 1;
        if !self.resize_pending && self.since_geometry < 300 {
            return Ok(false);
        }
        self.resize_pending = false;
        self.since_geometry = 0;
        let g = self
            .conn
            .get_geometry(self.root)
            .map_err(xerr)?
            .reply()
            .map_err(xerr)?;
        let size = (g.width as u32, g.height as u32);
        if size == self.screen {
            return Ok(false);
        }
        tracing::info!(from = ?self.screen, to = ?size, "screen resolution changed");
        self.screen = size;
        self.monitors = self.read_monitors()?;
        if self.selected >= self.monitors.len() {
            self.selected = 0;
        }
        self.detector.reset();
        Ok(true)
    }

    fn cursor(&mut self, m: &Monitor) -> CursorState {
        self.drain_events();
        let mut state = CursorState::default();
        if self.xfixes
            && self.cursor_dirty
            && let Some(img) = self
                .conn
                .xfixes_get_cursor_image()
                .ok()
                .and_then(|c| c.reply().ok())
        {
            self.cursor_dirty = false;
            if img.cursor_serial != self.cursor_serial {
                self.cursor_serial = img.cursor_serial;
                let rgba = img
                    .cursor_image
                    .iter()
                    .flat_map(|p| {
                        let [b, g, r, a] = p.to_le_bytes();
                        [r, g, b, a]
                    })
                    .collect();
                state.shape = Some(CursorShape {
                    serial: img.cursor_serial,
                    width: img.width as u32,
                    height: img.height as u32,
                    hot_x: img.xhot as u32,
                    hot_y: img.yhot as u32,
                    rgba,
                });
            }
        }
        if let Some(p) = self
            .conn
            .query_pointer(self.root)
            .ok()
            .and_then(|c| c.reply().ok())
        {
            state.x = p.root_x as i32 - m.x as i32;
            state.y = p.root_y as i32 - m.y as i32;
            state.visible = state.x >= 0
                && state.y >= 0
                && (state.x as u32) < m.width
                && (state.y as u32) < m.height;
        }
        state
    }
}

impl Capturer for X11Capturer {
    fn monitors(&self) -> Vec<Monitor> {
        self.monitors.clone()
    }

    fn size(&self) -> (u32, u32) {
        self.monitors
            .get(self.selected)
            .map_or((0, 0), |m| (m.width, m.height))
    }

    fn select(&mut self, index: usize) -> Result<(), CaptureError> {
        if index >= self.monitors.len() {
            return Err(CaptureError::NoSuchMonitor(index));
        }
        self.selected = index;
        self.detector.reset();
        Ok(())
    }

    fn request_full(&mut self) {
        self.detector.reset();
    }

    fn wait_for_change(&mut self, timeout: std::time::Duration) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        if self.damage.is_none() {
            std::thread::sleep(timeout);
            return true;
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            // Events already read into the connection's buffer do not make the socket readable:
            // take them first, then sleep on the socket.
            self.drain_events();
            if self.damaged || self.resize_pending {
                self.settle();
                return true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            let ts = Timespec {
                tv_sec: left.as_secs() as _,
                tv_nsec: left.subsec_nanos() as _,
            };
            let mut fds = [PollFd::new(self.conn.stream(), PollFlags::IN)];
            if poll(&mut fds, Some(&ts)).is_err() {
                std::thread::sleep(left.min(std::time::Duration::from_millis(5)));
            }
        }
    }

    fn capture(&mut self) -> Result<Captured<'_>, CaptureError> {
        let mut drawn: Option<Vec<Rectangle>> = None;
        if let Some(d) = self.damage {
            // Re-arm the notification before reading pixels: a change drawn while we read is
            // reported again and captured next time. Notifications already queued are about
            // what this capture reads, so they are taken first.
            self.drain_events();
            self.damaged = false;
            self.drawn_last_at = None;
            let parts = self.damage_parts.unwrap_or(x11rb::NONE);
            let _ = self.conn.damage_subtract(d, x11rb::NONE, parts);
            if parts != x11rb::NONE {
                drawn = self
                    .conn
                    .xfixes_fetch_region(parts)
                    .ok()
                    .and_then(|c| c.reply().ok())
                    .map(|r| r.rectangles);
            }
        }
        // Until this capture succeeds, what the server reported is only in `drawn`: if anything
        // below fails, the next capture must read everything.
        let force_full = std::mem::replace(&mut self.reread_all, true);
        let resized = self.check_resize()?;
        let m = self.monitors[self.selected].clone();
        let (w, h) = (m.width, m.height);
        let bytes = w as usize * h as usize * 4;
        if self.frame.width != w || self.frame.height != h {
            self.frame = Frame::new(w, h);
        }
        self.ensure_shm(bytes)?;
        let drawn_known = drawn.is_some();
        let region_read = self.read_drawn(drawn, &m, force_full);
        if let Some(damage) = region_read? {
            self.reread_all = false;
            let cursor = self.cursor(&m);
            return Ok(Captured {
                frame: &self.frame,
                damage,
                cursor,
                resized,
            });
        }
        self.last_read = w as u64 * h as u64;
        let safety_net = drawn_known
            && self.trust_damage
            && self.since_full >= FULL_READ_EVERY
            && !self.detector.needs_full(w, h);
        self.since_full = 0;
        // Reported since the previous full read, this capture's areas included.
        let reported = self.reported.replace(Vec::new());
        let plane_mask = u32::MAX;
        let row = w as usize * 4;
        let damage = if let Some(shm) = &self.shm {
            let r = self
                .conn
                .shm_get_image(
                    self.root,
                    m.x as i16,
                    m.y as i16,
                    w as u16,
                    h as u16,
                    plane_mask,
                    ImageFormat::Z_PIXMAP.into(),
                    shm.seg,
                    0,
                )
                .map_err(xerr)?
                .reply()
                .map_err(xerr)?;
            check_size(r.size as usize, bytes, w, h)?;
            self.detector
                .update_from(&shm.map[..bytes], row, &mut self.frame)
        } else {
            let r = self
                .conn
                .get_image(
                    ImageFormat::Z_PIXMAP,
                    self.root,
                    m.x as i16,
                    m.y as i16,
                    w as u16,
                    h as u16,
                    plane_mask,
                )
                .map_err(xerr)?
                .reply()
                .map_err(xerr)?;
            check_size(r.data.len(), bytes, w, h)?;
            self.detector.update_from(&r.data, row, &mut self.frame)
        };
        if safety_net
            && let Some(reported) = reported
            && damage
                .iter()
                .any(|d| !reported.iter().any(|r| overlaps(d, r)))
        {
            tracing::warn!(
                "the X server did not report a change on screen (XDamage); reading the whole \
                 screen on every capture from now on"
            );
            self.trust_damage = false;
        }
        self.reread_all = false;
        let cursor = self.cursor(&m);
        Ok(Captured {
            frame: &self.frame,
            damage,
            cursor,
            resized,
        })
    }
}

fn overlaps(a: &Rect, b: &Rect) -> bool {
    a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn a_single_drawing_is_captured_after_the_quiet_time() {
        let t0 = Instant::now();
        assert_eq!(settle_wait(t0, t0, t0), Some(QUIET));
        assert_eq!(settle_wait(t0 + us(200), t0, t0), Some(QUIET - us(200)));
        assert_eq!(settle_wait(t0 + QUIET, t0, t0), None);
    }

    #[test]
    fn each_drawing_restarts_the_quiet_time() {
        let t0 = Instant::now();
        // Drawings every 300 µs: the capture keeps waiting.
        for k in 1..8u64 {
            let last = t0 + us(300 * k);
            assert_eq!(settle_wait(last + us(100), t0, last), Some(QUIET - us(100)));
        }
        // The last one, then quiet.
        let last = t0 + us(2100);
        assert_eq!(settle_wait(last + QUIET, t0, last), None);
    }

    #[test]
    fn drawing_without_pause_is_captured_at_the_limit() {
        let t0 = Instant::now();
        let last = t0 + SETTLE_MAX - us(100);
        assert_eq!(settle_wait(last, t0, last), Some(us(100)));
        assert_eq!(settle_wait(t0 + SETTLE_MAX, t0, t0 + SETTLE_MAX), None);
    }

    #[test]
    fn a_drawing_seen_long_ago_is_captured_at_once() {
        let t0 = Instant::now();
        assert_eq!(settle_wait(t0 + us(5000), t0, t0 + us(100)), None);
    }
}
