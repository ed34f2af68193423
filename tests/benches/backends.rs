//! The agent's desktop backends side by side, in one run, X11 as the baseline: for each, a real
//! display server at 1920×1080 (Xvfb; sway headless with software rendering; Mutter headless with
//! PipeWire) showing the same picture, the agent's screen pipeline on the
//! backend's screen source (capture → change detection → H.264) and the console's decoder.
//!
//! * **typing**: a glyph-sized block drawn every 125 ms (8 characters a second) at the next
//!   position of a line; **scrolling**: a long page of text-like blocks and gradients moved up by
//!   54 pixels every 100 ms, the whole screen redrawn each time.
//!   Measured from the moment the drawing is issued (X11: the X server has drawn it; Wayland: the
//!   command is sent to the client, which draws and commits, and the compositor composites) until
//!   the decoded picture shows it: drawn → decoded, p50 / p99. The network between agent and
//!   console is the same code for every backend and is left out (the glass bench measures it).
//! * **idle**: 5 s with nothing drawn: bytes encoded and the process's CPU time per second.
//!
//!     cargo bench -p tandem-tests --bench backends [-- --quick] [-- --backends x11,wlroots,gnome]
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};
use tandem_media::capture::Capturer;
use tandem_media::frame::Frame;
use tandem_media::{ScreenPipeline, Target, VideoDecoder};
use tandem_tests::percentile;
use tandem_tests::wayland::{Sway, WaylandClient, pattern_frame, scrolled_pixel};
use tandem_tests::x11::{Painter, Xvfb};

const W: u32 = 1920;
const H: u32 = 1080;

/// A display server showing the test picture, and a way to draw on it.
trait Screen {
    fn capturer(&self) -> Box<dyn Capturer + Send>;
    /// Fills a rectangle with 0xRRGGBB.
    fn fill(&mut self, x: u32, y: u32, w: u32, h: u32, rgb: u32);
    /// Redraws the whole screen with the test picture of `seed`.
    fn full(&mut self, seed: u32);
    /// Redraws the whole screen as the long page scrolled by `offset` pixels.
    fn scroll(&mut self, offset: u32);
}

struct X11Screen {
    _x: Xvfb,
    display: String,
    p: Painter,
}

impl X11Screen {
    fn start() -> X11Screen {
        let x = Xvfb::start(W, H);
        let p = Painter::new(&x.display);
        let mut s = X11Screen {
            display: x.display.clone(),
            _x: x,
            p,
        };
        s.full(0);
        s
    }
}

impl Screen for X11Screen {
    fn capturer(&self) -> Box<dyn Capturer + Send> {
        Box::new(tandem_media::capture::x11::X11Capturer::open(Some(&self.display)).unwrap())
    }
    fn fill(&mut self, x: u32, y: u32, w: u32, h: u32, rgb: u32) {
        self.p.fill(rgb, x as i16, y as i16, w as u16, h as u16);
        self.p.sync();
    }
    fn full(&mut self, seed: u32) {
        self.put(&pattern_frame(W, H, seed));
    }
    fn scroll(&mut self, offset: u32) {
        self.put(&scrolled_frame(offset));
    }
}

impl X11Screen {
    /// Puts `f` on the root window.
    fn put(&mut self, f: &Frame) {
        use x11rb::connection::RequestConnection as _;
        use x11rb::protocol::xproto::{ConnectionExt as _, ImageFormat};
        // In bands that fit a request; the whole picture is on the root window before sync
        // returns.
        let rows = (self.p.conn.maximum_request_bytes() / 2 / f.stride).max(1) as u32;
        let mut y = 0;
        while y < H {
            let n = rows.min(H - y);
            let data = &f.data[y as usize * f.stride..(y + n) as usize * f.stride];
            self.p
                .conn
                .put_image(
                    ImageFormat::Z_PIXMAP,
                    self.p.root,
                    self.p.gc,
                    W as u16,
                    n as u16,
                    0,
                    y as i16,
                    0,
                    24,
                    data,
                )
                .unwrap();
            y += n;
        }
        self.p.sync();
    }
}

struct SwayScreen {
    sway: Sway,
    client: WaylandClient,
    seed: u32,
}

impl SwayScreen {
    fn start() -> SwayScreen {
        let sway = Sway::start(W, H);
        let mut client = WaylandClient::start(&sway);
        client.wait_drawn(W, H, 0, Duration::from_secs(10));
        SwayScreen {
            sway,
            client,
            seed: 0,
        }
    }
}

impl Screen for SwayScreen {
    fn capturer(&self) -> Box<dyn Capturer + Send> {
        let socket = self.sway.runtime_dir().join(self.sway.wayland_display());
        Box::new(tandem_host::wlroots::WlrCapturer::open(Some(&socket)).unwrap())
    }
    fn fill(&mut self, x: u32, y: u32, w: u32, h: u32, rgb: u32) {
        self.client.send(&format!(
            "rect {x} {y} {w} {h} {} {} {}",
            rgb >> 16,
            (rgb >> 8) & 0xff,
            rgb & 0xff
        ));
    }
    fn full(&mut self, seed: u32) {
        self.seed = seed;
        self.client.send(&format!("seed {seed}"));
    }
    fn scroll(&mut self, offset: u32) {
        self.client.send(&format!("scroll {offset}"));
    }
}

struct GnomeScreen {
    m: tandem_tests::mutter::Mutter,
    client: tandem_tests::mutter::MutterClient,
}

impl GnomeScreen {
    fn start() -> GnomeScreen {
        let m = tandem_tests::mutter::Mutter::start(W, H);
        let mut client = tandem_tests::mutter::MutterClient::start(&m, &[]);
        client.next("drawn", Duration::from_secs(20), |v| {
            v["width"] == W && v["height"] == H
        });
        GnomeScreen { m, client }
    }
}

impl Screen for GnomeScreen {
    fn capturer(&self) -> Box<dyn Capturer + Send> {
        Box::new(self.m.desktop().open_capturer().unwrap())
    }
    fn fill(&mut self, x: u32, y: u32, w: u32, h: u32, rgb: u32) {
        self.client.send(&format!(
            "rect {x} {y} {w} {h} {} {} {}",
            rgb >> 16,
            (rgb >> 8) & 0xff,
            rgb & 0xff
        ));
    }
    fn full(&mut self, seed: u32) {
        self.client.send(&format!("seed {seed}"));
    }
    fn scroll(&mut self, offset: u32) {
        self.client.send(&format!("scroll {offset}"));
    }
}

/// The scrolled page as a frame (BGRX).
fn scrolled_frame(offset: u32) -> Frame {
    let mut f = Frame::new(W, H);
    for y in 0..H {
        for x in 0..W {
            let (r, g, b) = scrolled_pixel(x, y, W, H, offset);
            let i = y as usize * f.stride + x as usize * 4;
            f.data[i..i + 4].copy_from_slice(&[b, g, r, 0]);
        }
    }
    f
}

/// The process's CPU time (user + system) so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_secs_f64(ticks as f64 / 100.0)
}

struct Run {
    pipe: ScreenPipeline<Box<dyn Capturer + Send>>,
    dec: VideoDecoder,
    /// The last decoded picture, BGRX.
    seen: Frame,
    bytes: u64,
}

impl Run {
    /// One look at the screen as the agent's loop takes it: wait for a change (at most 17 ms),
    /// capture, encode, decode. Returns whether a picture was decoded.
    fn look(&mut self) -> bool {
        self.pipe
            .capturer
            .wait_for_change(Duration::from_millis(17));
        let step = self.pipe.step().unwrap();
        let Some(e) = step.encoded else {
            return false;
        };
        self.bytes += e.data.len() as u64;
        self.pipe.prepare_next();
        if let Some(d) = self.dec.decode(&e.data).unwrap() {
            self.seen = tandem_media::rgba_to_frame(d.width, d.height, &d.rgba);
            return true;
        }
        false
    }

    /// Looks until `shows` holds for the decoded picture; the time it took.
    fn until(&mut self, t0: Instant, shows: impl Fn(&Frame) -> bool) -> Option<f64> {
        while t0.elapsed() < Duration::from_secs(3) {
            if self.look() && shows(&self.seen) {
                return Some(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        None
    }
}

fn near(a: (u8, u8, u8), rgb: u32) -> bool {
    let want = ((rgb & 0xff) as u8, (rgb >> 8) as u8, (rgb >> 16) as u8);
    a.0.abs_diff(want.0) < 40 && a.1.abs_diff(want.1) < 40 && a.2.abs_diff(want.2) < 40
}

struct Row {
    backend: String,
    typing: Vec<f64>,
    scrolling: Vec<f64>,
    missed: usize,
    idle_kbps: f64,
    idle_cpu_ms_per_s: f64,
}

fn measure(name: &str, screen: &mut dyn Screen, quick: bool) -> Row {
    let pipe = ScreenPipeline::new(
        screen.capturer(),
        Target {
            bitrate_bps: 4_000_000,
            max_fps: 30.0,
        },
    )
    .unwrap();
    let mut run = Run {
        pipe,
        dec: VideoDecoder::new().unwrap(),
        seen: Frame::new(1, 1),
        bytes: 0,
    };
    // The first picture.
    let t0 = Instant::now();
    run.until(t0, |f| f.width == W && f.height == H).unwrap();
    let mut row = Row {
        backend: name.into(),
        typing: vec![],
        scrolling: vec![],
        missed: 0,
        idle_kbps: 0.0,
        idle_cpu_ms_per_s: 0.0,
    };
    let n = if quick { 20 } else { 60 };
    // Typing: blocks along a line, alternating colours.
    for i in 0..n {
        let (x, y) = (100 + (i % 150) * 11, 500 + (i / 150) * 20);
        let rgb = if i % 2 == 0 { 0x102030 } else { 0xf0e0d0 };
        let t0 = Instant::now();
        screen.fill(x, y, 9, 16, rgb);
        match run.until(t0, |f| near(f.pixel(x + 4, y + 8), rgb)) {
            Some(ms) => row.typing.push(ms),
            None => row.missed += 1,
        }
        let rest = Duration::from_millis(125).saturating_sub(t0.elapsed());
        let end = Instant::now() + rest;
        while Instant::now() < end {
            run.look();
        }
    }
    // Scrolling: the page moves up by three 18-pixel lines every 100 ms (a wheel scroll).
    screen.scroll(0);
    let settle = Instant::now() + Duration::from_millis(800);
    while Instant::now() < settle {
        run.look();
    }
    for i in 1..=n {
        let offset = i * 54;
        // A point whose colour changes with this step, and its new colour.
        let (px, py, rgb) = (40..H - 40)
            .step_by(7)
            .flat_map(|y| (40..W - 40).step_by(13).map(move |x| (x, y)))
            .find_map(|(x, y)| {
                let (a, b) = (
                    scrolled_pixel(x, y, W, H, offset - 54),
                    scrolled_pixel(x, y, W, H, offset),
                );
                let d =
                    a.0.abs_diff(b.0) as u32 + a.1.abs_diff(b.1) as u32 + a.2.abs_diff(b.2) as u32;
                (d > 200).then_some((x, y, (b.0 as u32) << 16 | (b.1 as u32) << 8 | b.2 as u32))
            })
            .unwrap();
        let t0 = Instant::now();
        screen.scroll(offset);
        match run.until(t0, |f| near(f.pixel(px, py), rgb)) {
            Some(ms) => row.scrolling.push(ms),
            None => row.missed += 1,
        }
        let end = t0 + Duration::from_millis(100);
        while Instant::now() < end {
            run.look();
        }
    }
    // Idle: let the last frames settle, then 5 s of nothing.
    let settle = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < settle {
        run.look();
    }
    let (b0, c0, t0) = (run.bytes, cpu_time(), Instant::now());
    while t0.elapsed() < Duration::from_secs(5) {
        run.look();
    }
    let secs = t0.elapsed().as_secs_f64();
    row.idle_kbps = (run.bytes - b0) as f64 * 8.0 / 1000.0 / secs;
    row.idle_cpu_ms_per_s = (cpu_time() - c0).as_secs_f64() * 1e3 / secs;
    row
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let which: String = tandem_tests::bench_arg("--backends", "x11,wlroots,gnome".to_string());
    let mut rows = vec![];
    for b in which.split(',') {
        let row = match b {
            "x11" => measure("x11", &mut X11Screen::start(), quick),
            "wlroots" => {
                if !tandem_tests::wayland::sway_available() {
                    println!("wlroots: skipped, sway is not installed");
                    continue;
                }
                measure("wlroots (sway)", &mut SwayScreen::start(), quick)
            }
            "gnome" => {
                if !tandem_tests::mutter::mutter_available() {
                    println!("gnome: skipped, mutter is not installed");
                    continue;
                }
                measure("gnome (mutter)", &mut GnomeScreen::start(), quick)
            }
            other => panic!("unknown backend {other}"),
        };
        rows.push(row);
    }
    let base = rows
        .first()
        .map(|r| (percentile(&r.typing, 0.5), percentile(&r.scrolling, 0.5)));
    println!(
        "\n{:<16} {:>22} {:>22} {:>8} {:>12} {:>14}",
        "backend",
        "typing p50/p99 ms",
        "scrolling p50/p99 ms",
        "missed",
        "idle kbit/s",
        "idle CPU ms/s"
    );
    let mut json = vec![];
    for r in &rows {
        let (t50, t99) = (percentile(&r.typing, 0.5), percentile(&r.typing, 0.99));
        let (s50, s99) = (
            percentile(&r.scrolling, 0.5),
            percentile(&r.scrolling, 0.99),
        );
        let (rt, rs) = base.map_or((f64::NAN, f64::NAN), |(bt, bs)| (t50 / bt, s50 / bs));
        println!(
            "{:<16} {:>9.1} / {:>5.1} ×{:<4.2} {:>9.1} / {:>5.1} ×{:<4.2} {:>8} {:>12.2} {:>14.1}",
            r.backend, t50, t99, rt, s50, s99, rs, r.missed, r.idle_kbps, r.idle_cpu_ms_per_s
        );
        json.push(serde_json::json!({
            "backend": r.backend,
            "typing_p50_ms": t50, "typing_p99_ms": t99, "typing_ratio_p50": rt,
            "scrolling_p50_ms": s50, "scrolling_p99_ms": s99, "scrolling_ratio_p50": rs,
            "missed": r.missed, "idle_kbps": r.idle_kbps, "idle_cpu_ms_per_s": r.idle_cpu_ms_per_s,
        }));
    }
    println!("{}", serde_json::json!({"bench": "backends", "rows": json}));
}
