//! Wayland test fixtures: a headless sway per test ([`Sway`]), a test picture ([`pattern_pixel`]),
//! and a fullscreen client that shows it and reports the input it receives ([`WaylandClient`],
//! the `tandem-wayland-client` binary).
//!
//! Everything here is synchronous (std threads and channels), for sync and tokio tests alike.
//! Every wait has a timeout and panics with the last lines sway and the client wrote to stderr.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_media::frame::Frame;

/// How long [`Sway::start`] and [`Sway::set_mode`] wait.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a helper program (swaymsg, grim) may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of stderr kept for panic messages.
const TAIL_LINES: usize = 60;

/// The last lines a process wrote to stderr, collected by a thread.
#[derive(Clone, Default)]
pub struct StderrTail(Arc<Mutex<VecDeque<String>>>);

impl StderrTail {
    fn collect(stream: impl Read + Send + 'static) -> StderrTail {
        let tail = StderrTail::default();
        let t = tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let mut q = t.0.lock().unwrap();
                if q.len() == TAIL_LINES {
                    q.pop_front();
                }
                q.push_back(line);
            }
        });
        tail
    }

    /// The kept lines, one per line.
    pub fn text(&self) -> String {
        let q = self.0.lock().unwrap();
        q.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// Whether `name` is an executable file on `PATH`.
pub fn in_path(name: &str) -> bool {
    find_in_path(name).is_some()
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Whether sway is installed (tests skip themselves without it).
pub fn sway_available() -> bool {
    in_path("sway")
}

/// The uid and gid of `nobody` from /etc/passwd (65534 if not found).
fn nobody_ids() -> (u32, u32) {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 3 && f[0] == "nobody")
                    .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                    .flatten()
            })
        })
        .unwrap_or((65534, 65534))
}

/// The output of a helper program; an error if it cannot start or takes more than
/// [`TOOL_TIMEOUT`] (then it is killed).
fn run_tool(cmd: &mut Command, what: &str) -> Result<std::process::Output, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{what} did not finish within {TOOL_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(std::process::Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    })
}

/// A headless sway (wlroots headless backend, pixman renderer, no input devices, one output, no
/// Xwayland) in a fresh directory, killed with its children when dropped. As root, sway runs as
/// `nobody` (it refuses to run as root); root still reaches its sockets.
pub struct Sway {
    child: Child,
    dir: tempfile::TempDir,
    runtime_dir: PathBuf,
    wayland_display: String,
    ipc_socket: PathBuf,
    output: String,
    size: (u32, u32),
    stderr: StderrTail,
}

impl Sway {
    /// Starts sway with one output of `width`×`height` and waits (at most 10 s) until a Wayland
    /// client can connect and the output has that mode. Panics if sway is not installed
    /// (Debian package `sway`).
    pub fn start(width: u32, height: u32) -> Sway {
        let sway = find_in_path("sway").unwrap_or_else(|| {
            panic!("sway not found on PATH: install the Debian package `sway` (and `grim`)")
        });
        let dir = tempfile::Builder::new()
            .prefix("tandem-sway-")
            .tempdir()
            .unwrap();
        let as_root = rustix::process::geteuid().is_root();
        let (uid, gid) = nobody_ids();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let runtime_dir = dir.path().join("run");
        let home = dir.path().join("home");
        for d in [&runtime_dir, &home] {
            std::fs::create_dir(d).unwrap();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
            if as_root {
                std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
            }
        }
        let config = dir.path().join("config");
        std::fs::write(
            &config,
            format!(
                "output * mode {width}x{height} bg #336699 solid_color\n\
                 default_border none\n\
                 xwayland disable\n"
            ),
        )
        .unwrap();

        let mut cmd = if as_root {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg(&sway);
            c
        } else {
            Command::new(&sway)
        };
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
        cmd.arg("-c")
            .arg(&config)
            .env_clear()
            .env("PATH", path)
            .env("HOME", &home)
            .env("XDG_RUNTIME_DIR", &runtime_dir)
            .env("WLR_BACKENDS", "headless")
            .env("WLR_RENDERER", "pixman")
            .env("WLR_LIBINPUT_NO_DEVICES", "1")
            .env("WLR_HEADLESS_OUTPUTS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group, so that Drop also ends swaybg and anything else it started.
            .process_group(0);
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start sway ({}{}): {e}",
                sway.display(),
                if as_root {
                    " through setpriv, Debian package util-linux"
                } else {
                    ""
                }
            )
        });
        let stderr = StderrTail::collect(child.stderr.take().unwrap());
        let mut sway = Sway {
            child,
            dir,
            runtime_dir,
            wayland_display: String::new(),
            ipc_socket: PathBuf::new(),
            output: String::new(),
            size: (width, height),
            stderr,
        };
        sway.wait_ready(width, height);
        sway
    }

    fn wait_ready(&mut self, width: u32, height: u32) {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_output = None;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "sway exited during start-up ({status}); its stderr:\n{}",
                    self.stderr.text()
                );
            }
            if self.wayland_display.is_empty() || self.ipc_socket.as_os_str().is_empty() {
                self.find_sockets();
            }
            if !self.wayland_display.is_empty()
                && !self.ipc_socket.as_os_str().is_empty()
                && self.client_connects(deadline.saturating_duration_since(Instant::now()))
            {
                last_output = self.try_output();
                if let Some((name, w, h)) = &last_output
                    && (*w, *h) == (width, height)
                {
                    self.output = name.clone();
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "sway not ready after {START_TIMEOUT:?} (display {:?}, IPC {:?}, output {:?}); \
                     its stderr:\n{}",
                    self.wayland_display,
                    self.ipc_socket,
                    last_output,
                    self.stderr.text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn find_sockets(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.runtime_dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let is_socket = std::os::unix::fs::FileTypeExt::is_socket(&e.file_type().unwrap());
            if !is_socket {
                continue;
            }
            if name.starts_with("wayland-") && !name.ends_with(".lock") {
                self.wayland_display = name;
            } else if name.starts_with("sway-ipc.") && name.ends_with(".sock") {
                self.ipc_socket = e.path();
            }
        }
    }

    /// A Wayland round trip on a fresh connection, within `timeout`.
    fn client_connects(&self, timeout: Duration) -> bool {
        let Ok(stream) =
            std::os::unix::net::UnixStream::connect(self.runtime_dir.join(&self.wayland_display))
        else {
            return false;
        };
        // On a thread: the round trip has no timeout of its own. A thread left waiting on a sway
        // that hangs ends when Drop kills sway.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let ok = wayland_client::Connection::from_socket(stream)
                .map(|conn| conn.roundtrip().is_ok())
                .unwrap_or(false);
            let _ = tx.send(ok);
        });
        rx.recv_timeout(timeout).unwrap_or(false)
    }

    /// The first active output: name, width, height (None if IPC does not answer yet).
    fn try_output(&self) -> Option<(String, u32, u32)> {
        if self.ipc_socket.as_os_str().is_empty() {
            return None;
        }
        let out = run_tool(
            Command::new("swaymsg")
                .arg("-s")
                .arg(&self.ipc_socket)
                .args(["-r", "-t", "get_outputs"]),
            "swaymsg -t get_outputs",
        )
        .unwrap_or_else(|e| panic!("{e}; sway's stderr:\n{}", self.stderr.text()));
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?.iter().find_map(|o| {
            if o["active"] != Value::Bool(true) {
                return None;
            }
            let m = &o["current_mode"];
            Some((
                o["name"].as_str()?.to_string(),
                m["width"].as_u64()? as u32,
                m["height"].as_u64()? as u32,
            ))
        })
    }

    /// The name of the Wayland socket in [`Self::runtime_dir`] (`WAYLAND_DISPLAY`).
    pub fn wayland_display(&self) -> &str {
        &self.wayland_display
    }

    /// `XDG_RUNTIME_DIR` of this sway: its Wayland and IPC sockets.
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    /// The sway IPC socket (`SWAYSOCK`, `swaymsg -s`).
    pub fn ipc_socket(&self) -> &Path {
        &self.ipc_socket
    }

    /// The directory of this sway (config, home, runtime dir), removed when dropped.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The name of the output (`HEADLESS-1`).
    pub fn output(&self) -> &str {
        &self.output
    }

    /// The output's current mode.
    pub fn size(&self) -> (u32, u32) {
        self.size
    }

    /// The environment a Wayland client of this sway needs: `XDG_RUNTIME_DIR`, `WAYLAND_DISPLAY`
    /// (and `SWAYSOCK`).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "XDG_RUNTIME_DIR".into(),
                self.runtime_dir.to_string_lossy().into_owned(),
            ),
            ("WAYLAND_DISPLAY".into(), self.wayland_display.clone()),
            (
                "SWAYSOCK".into(),
                self.ipc_socket.to_string_lossy().into_owned(),
            ),
        ]
    }

    /// The last lines sway wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        self.stderr.text()
    }

    fn stderr_handle(&self) -> StderrTail {
        self.stderr.clone()
    }

    /// Runs `swaymsg -s <ipc> <args…>` and returns its stdout; panics if it fails.
    pub fn swaymsg(&self, args: &[&str]) -> String {
        let out = run_tool(
            Command::new("swaymsg")
                .arg("-s")
                .arg(&self.ipc_socket)
                .args(args),
            "swaymsg",
        )
        .unwrap_or_else(|e| panic!("{e}; sway's stderr:\n{}", self.stderr.text()));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "swaymsg {args:?} failed ({}): {stdout}{}; sway's stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.stderr.text()
        );
        stdout
    }

    /// Changes the output's mode and waits (at most 10 s) until sway reports it. A fullscreen
    /// client then gets a configure with the new size.
    pub fn set_mode(&mut self, width: u32, height: u32) {
        let out = self.swaymsg(&["output", &self.output, "mode", &format!("{width}x{height}")]);
        assert!(
            !out.contains("\"success\": false"),
            "sway refused mode {width}x{height}: {out}"
        );
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let now = self.try_output();
            if let Some((_, w, h)) = now
                && (w, h) == (width, height)
            {
                self.size = (width, height);
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "output still {now:?} {START_TIMEOUT:?} after setting {width}x{height}; \
                     sway's stderr:\n{}",
                    self.stderr.text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The output's picture now, taken with grim (Debian package `grim`), as a BGRX frame.
    pub fn screenshot(&self) -> Frame {
        assert!(
            in_path("grim"),
            "grim not found on PATH: install the Debian package `grim`"
        );
        let mut cmd = Command::new("grim");
        cmd.args(["-t", "png", "-o", &self.output, "-"]);
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        let out = run_tool(&mut cmd, "grim")
            .unwrap_or_else(|e| panic!("{e}; sway's stderr:\n{}", self.stderr.text()));
        assert!(
            out.status.success(),
            "grim failed ({}): {}; sway's stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.stderr.text()
        );
        decode_png(&out.stdout)
    }

    /// Takes screenshots until `ok` accepts one (returns it) or `timeout` passes (panics with the
    /// message `ok` gave for the last one).
    pub fn screenshot_until(
        &self,
        timeout: Duration,
        mut ok: impl FnMut(&Frame) -> Result<(), String>,
    ) -> Frame {
        let deadline = Instant::now() + timeout;
        loop {
            let f = self.screenshot();
            match ok(&f) {
                Ok(()) => return f,
                Err(why) if Instant::now() > deadline => panic!(
                    "the screen did not become as expected within {timeout:?}: {why}; \
                     sway's stderr:\n{}",
                    self.stderr.text()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for Sway {
    fn drop(&mut self) {
        let pgid = rustix::process::Pid::from_child(&self.child);
        let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Whatever is left of the group (sway itself if TERM did not end it, swaybg).
        let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        let _ = self.child.wait();
        // swaybg was in the group too; once sway is gone it is reparented to init, which reaps it
        // (a `<defunct>` swaybg seen for a moment afterwards is dead already).
    }
}

/// Decodes a PNG (8-bit RGB or RGBA, or anything that normalises to it) into a BGRX frame.
pub fn decode_png(bytes: &[u8]) -> Frame {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().expect("a PNG header");
    let mut buf = vec![0; reader.output_buffer_size().expect("a sane PNG size")];
    let info = reader.next_frame(&mut buf).expect("PNG data");
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    let mut f = Frame::new(info.width, info.height);
    for y in 0..info.height as usize {
        let row = &buf[y * info.line_size..];
        for x in 0..info.width as usize {
            let p = &row[x * channels..];
            let (r, g, b) = if channels >= 3 {
                (p[0], p[1], p[2])
            } else {
                (p[0], p[0], p[0])
            };
            let i = y * f.stride + x * 4;
            f.data[i..i + 4].copy_from_slice(&[b, g, r, 0]);
        }
    }
    f
}

fn mix(mut z: u64) -> u64 {
    // splitmix64's finaliser.
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A long page (8 windows tall, seed 1) seen through a `w`×`h` window scrolled down by `offset`
/// pixels: what a scrolled document looks like to the encoder (the rows move up).
pub fn scrolled_pixel(x: u32, y: u32, w: u32, h: u32, offset: u32) -> (u8, u8, u8) {
    pattern_pixel(x, (y + offset) % (h * 8), w, h * 8, 1)
}

/// The test picture at (x, y) of a `w`×`h` window, as (r, g, b): 32-pixel blocks in a checker;
/// the "smooth" blocks show a gradient across the whole window (red left to right, green top to
/// bottom, blue tinted by `seed`), the others a text-like two-colour glyph (dark 2×2-pixel dots
/// covering a quarter of a light background, a 2-pixel margin) that depends on the block and
/// `seed`. Smooth
/// areas and sharp edges both, so a video codec's PSNR against it means something.
pub fn pattern_pixel(x: u32, y: u32, w: u32, h: u32, seed: u32) -> (u8, u8, u8) {
    let (w, h) = (w.max(2), h.max(2));
    let gx = (x.min(w - 1) as u64 * 255 / (w - 1) as u64) as u8;
    let gy = (y.min(h - 1) as u64 * 255 / (h - 1) as u64) as u8;
    let (bx, by) = (x / 32, y / 32);
    if (bx + by) % 2 == 0 {
        let tint = (mix(seed as u64) % 128) as u8;
        return (gx, gy, tint + gx / 4 + gy / 4);
    }
    let block = mix(((seed as u64) << 40) ^ ((by as u64) << 20) ^ bx as u64);
    let bg = (
        200 + (block & 0x3f) as u8 % 56,
        200 + ((block >> 6) & 0x3f) as u8 % 56,
        200 + ((block >> 12) & 0x3f) as u8 % 56,
    );
    let fg = (
        ((block >> 18) & 0x7f) as u8,
        ((block >> 25) & 0x7f) as u8,
        ((block >> 32) & 0x7f) as u8,
    );
    let (cx, cy) = (x % 32, y % 32);
    if !(2..30).contains(&cx) || !(2..30).contains(&cy) {
        return bg;
    }
    // A 14×14 grid of 2×2-pixel cells, a quarter of them ink (like text, mostly background); a
    // row's cells are the bits of two hashes.
    let (col, row) = ((cx - 2) / 2, (cy - 2) / 2);
    let ink = mix(block ^ row as u64) & mix(block ^ (row as u64 + 64));
    if ink >> col & 1 == 1 { fg } else { bg }
}

/// The whole test picture as a BGRX frame.
pub fn pattern_frame(w: u32, h: u32, seed: u32) -> Frame {
    let mut f = Frame::new(w, h);
    for y in 0..h {
        for x in 0..w {
            let (r, g, b) = pattern_pixel(x, y, w, h, seed);
            let i = y as usize * f.stride + x as usize * 4;
            f.data[i..i + 4].copy_from_slice(&[b, g, r, 0]);
        }
    }
    f
}

/// How two frames differ (the fourth byte of each pixel is ignored).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrameDiff {
    /// The largest difference of one colour channel.
    pub max: u8,
    /// Pixels with a channel that differs by more than the tolerance.
    pub pixels: u64,
    /// The first such pixel, row by row.
    pub first: Option<PixelDiff>,
}

/// One differing pixel of a [`FrameDiff`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PixelDiff {
    pub x: u32,
    pub y: u32,
    /// The first frame's pixel as (b, g, r).
    pub a: (u8, u8, u8),
    /// The second frame's pixel as (b, g, r).
    pub b: (u8, u8, u8),
}

/// Compares two frames of the same size; a channel difference up to `tolerance` does not count as
/// a differing pixel. Panics if the sizes differ.
pub fn frame_diff(a: &Frame, b: &Frame, tolerance: u8) -> FrameDiff {
    assert_eq!(
        (a.width, a.height),
        (b.width, b.height),
        "frames of different sizes"
    );
    let mut d = FrameDiff::default();
    for y in 0..a.height {
        let (ra, rb) = (a.row(y), b.row(y));
        for x in 0..a.width as usize {
            let (pa, pb) = (&ra[x * 4..x * 4 + 3], &rb[x * 4..x * 4 + 3]);
            let m = (0..3).map(|c| pa[c].abs_diff(pb[c])).max().unwrap_or(0);
            d.max = d.max.max(m);
            if m > tolerance {
                d.pixels += 1;
                if d.first.is_none() {
                    d.first = Some(PixelDiff {
                        x: x as u32,
                        y,
                        a: (pa[0], pa[1], pa[2]),
                        b: (pb[0], pb[1], pb[2]),
                    });
                }
            }
        }
    }
    d
}

/// A running `tandem-wayland-client` (see its source for the protocol): a fullscreen window with
/// the test picture that prints JSON events; killed when dropped.
pub struct WaylandClient {
    child: Child,
    stdin: Option<ChildStdin>,
    rx: Receiver<Value>,
    /// Every event received so far.
    seen: Vec<Value>,
    /// Index in `seen` of the first event [`Self::next_event`] has not passed yet.
    cursor: usize,
    stderr: StderrTail,
    sway_stderr: StderrTail,
}

impl WaylandClient {
    /// Starts the client on `sway` with seed 0.
    pub fn start(sway: &Sway) -> WaylandClient {
        Self::start_with_args(sway, &[])
    }

    /// Starts the client with extra arguments (`--seed N`).
    pub fn start_with_args(sway: &Sway, args: &[&str]) -> WaylandClient {
        let bin = crate::binary("tandem-wayland-client");
        let mut cmd = Command::new(&bin);
        cmd.args(args)
            .env_remove("DISPLAY")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in sway.env() {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let stderr = StderrTail::collect(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({"event": "unparsed", "line": line}));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        WaylandClient {
            child,
            stdin,
            rx,
            seen: Vec::new(),
            cursor: 0,
            stderr,
            sway_stderr: sway.stderr_handle(),
        }
    }

    /// The next event of `kind` (`"drawn"`, `"key"`, …) after the last one this returned; events
    /// of other kinds in between are passed over (they stay in [`Self::events_so_far`]). Panics
    /// after `timeout`.
    pub fn next_event(&mut self, kind: &str, timeout: Duration) -> Value {
        self.next_event_where(kind, timeout, |_| true)
    }

    /// Like [`Self::next_event`], for the next event of `kind` that `pred` accepts.
    pub fn next_event_where(
        &mut self,
        kind: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some(v) = self.try_next_event_where(kind, timeout, pred) {
            return v;
        }
        let exited = match self.child.try_wait() {
            Ok(Some(s)) => {
                // Let the stderr thread read the client's last words.
                std::thread::sleep(Duration::from_millis(100));
                format!(" (the client exited: {s})")
            }
            _ => String::new(),
        };
        panic!(
            "no {kind:?} event from tandem-wayland-client within {timeout:?}{exited}\n\
             events so far (last 30):\n  {}\nclient's stderr:\n{}\nsway's stderr:\n{}",
            self.seen
                .iter()
                .rev()
                .take(30)
                .rev()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join("\n  "),
            self.stderr.text(),
            self.sway_stderr.text()
        )
    }

    /// Like [`Self::next_event_where`], None after `timeout` (to check that something does not
    /// happen).
    pub fn try_next_event_where(
        &mut self,
        kind: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let matches = |v: &Value| v["event"] == kind && pred(v);
        if let Some(i) = self.seen[self.cursor..].iter().position(matches) {
            self.cursor += i + 1;
            return Some(self.seen[self.cursor - 1].clone());
        }
        self.cursor = self.seen.len();
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    self.cursor = self.seen.len();
                    if matches(&v) {
                        return Some(v);
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Every event received so far (including those [`Self::next_event`] passed over).
    pub fn events_so_far(&mut self) -> Vec<Value> {
        while let Ok(v) = self.rx.try_recv() {
            self.seen.push(v);
        }
        self.seen.clone()
    }

    /// Sends one command line (`seed 3`, `rect 10 10 50 50 255 0 0`, `quit`).
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        if let Err(e) = stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
        {
            panic!(
                "cannot send {line:?} to tandem-wayland-client: {e}; its stderr:\n{}",
                self.stderr.text()
            );
        }
    }

    /// The last lines the client wrote to stderr.
    pub fn stderr_tail(&self) -> String {
        self.stderr.text()
    }

    /// The client's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the `drawn` event of a full redraw at `width`×`height` with `seed`, then for the
    /// compositor's frame callback for it (the picture is on screen then).
    pub fn wait_drawn(&mut self, width: u32, height: u32, seed: u32, timeout: Duration) {
        let is = |v: &Value| v["width"] == width && v["height"] == height && v["seed"] == seed;
        self.next_event_where("drawn", timeout, is);
        self.next_event_where("presented", timeout, |v| v["of"] == "drawn" && is(v));
    }
}

impl Drop for WaylandClient {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
