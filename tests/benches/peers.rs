//! Tandem against its peers on the same screens, in one run: for each content class of
//! [`tandem_tests::content`] (rendered in memory, pushed to an Xvfb screen at 30 Hz with a frame
//! counter), each tool sends the screen and the bench measures
//!
//! * **kbit/s** from the first frame of motion to the end of the rest that follows it: Tandem's
//!   video bitstream (what the session carries, before QUIC and encryption), x264's packets;
//! * **updates/s** shown: distinct screen updates (counter values) decoded, per second of motion,
//!   and the share of all updates drawn;
//! * **luma PSNR during motion**, of every decoded frame against the exact picture the screen had
//!   when that frame's counter was drawn (rendered again after the run), p50 and p10;
//! * **PSNR at rest**: the last frame decoded one second after the motion stopped, against the
//!   final picture (does the tool refine what it sent coarsely?).
//!
//! Tools: `tandem` (real relay and headless agent as release processes, console in this process),
//! `x264-ultrafast` and `x264-veryfast` (ffmpeg's x11grab, libx264, zerolatency, CRF 23, yuv420p,
//! from Debian's ffmpeg), decoded by ffmpeg afterwards; `vnc` (x11vnc with its defaults, the
//! TigerVNC viewer full screen on a second Xvfb, bytes counted by a proxy between them, the
//! viewer's screen captured as fast as it changes).
//!
//!     cargo bench -p tandem-tests --bench peers [-- --seconds 8 --width 1920 --height 1080 --class typing,web --tools tandem,x264-ultrafast,x264-veryfast]
//!
//! Table on stdout, JSON in `target/bench/peers.json`.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_certs::RelayTrust;
use tandem_client::ConnectOptions;
use tandem_media::{VideoDecoder, plane_psnr};
use tandem_proto::Secret;
use tandem_session::SessionCode;
use tandem_tests::content::{Canvas, Class, Content, Rect, read_counter_luma};
use tandem_tests::x11::{Painter, Xvfb};
use tandem_tests::{RelayProcess, bench_arg, percentile, write_bench_json};
use x11rb::connection::{Connection, RequestConnection};
use x11rb::protocol::xproto::{ConnectionExt, ImageFormat};

struct Args {
    seconds: f64,
    rest: f64,
    settle: f64,
    width: usize,
    height: usize,
    classes: Vec<Class>,
    tools: Vec<String>,
}

fn args() -> Args {
    let filter = bench_arg("--class", String::new());
    Args {
        seconds: bench_arg("--seconds", 8.0),
        rest: bench_arg("--rest", 1.0),
        settle: bench_arg("--settle", 2.0),
        width: bench_arg("--width", 1920),
        height: bench_arg("--height", 1080),
        classes: Class::ALL
            .into_iter()
            .filter(|c| filter.is_empty() || filter.split(',').any(|w| c.name().contains(w)))
            .collect(),
        tools: bench_arg(
            "--tools",
            "tandem,x264-ultrafast,x264-veryfast,vnc".to_string(),
        )
        .split(',')
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect(),
    }
}

impl Args {
    /// What a painter thread needs (timing and size), owned.
    fn for_painter(&self) -> Args {
        Args {
            classes: vec![],
            tools: vec![],
            ..*self
        }
    }
}

/// The first counter value of the next run: after this run's frames, and back to 1 before the
/// 16-bit counter would wrap (a wrapped counter reads as a smaller value, i.e. as no frame of the
/// run).
fn next_base(base: u32, seconds: f64) -> u32 {
    let step = (seconds * 30.0) as u32 + 100;
    if base + 2 * step > 0xffff {
        1
    } else {
        base + step
    }
}

/// Pushes rectangles of `c` to the X screen (in strips that fit one request).
fn push(p: &Painter, c: &Canvas, rects: &[Rect]) {
    let max = p.conn.maximum_request_bytes().saturating_sub(64).max(4096);
    for r in rects {
        let rows_per = (max / (r.w * 4)).clamp(1, r.h);
        let mut y = r.y;
        while y < r.y + r.h {
            let n = rows_per.min(r.y + r.h - y);
            let mut data = Vec::with_capacity(r.w * n * 4);
            for row in y..y + n {
                for &px in &c.px[row * c.w + r.x..row * c.w + r.x + r.w] {
                    data.extend_from_slice(&px.to_le_bytes());
                }
            }
            p.conn
                .put_image(
                    ImageFormat::Z_PIXMAP,
                    p.root,
                    p.gc,
                    r.w as u16,
                    n as u16,
                    r.x as i16,
                    y as i16,
                    0,
                    24,
                    &data,
                )
                .unwrap();
            y += n;
        }
    }
    p.conn.flush().unwrap();
}

/// What the painter did in one run of a class.
#[derive(Default, Clone)]
struct Played {
    /// Counter values drawn, in order (first = `base`).
    drawn: u32,
    /// Wall-clock instants: motion start, motion end (rest start), rest end.
    motion_start: Option<Instant>,
    rest_start: Option<Instant>,
    rest_end: Option<Instant>,
    /// Frames the painter was late for (it could not hold 30 Hz).
    late: u32,
}

/// Plays `class` on the screen: the first picture, `settle` seconds for every tool to send it,
/// `seconds` of motion at 30 Hz with counters from `base`, then `rest` seconds still.
fn play(display: &str, class: Class, a: &Args, base: u32, out: Arc<Mutex<Played>>) {
    let p = Painter::new(display);
    let mut c = Content::new(class, a.width, a.height).unwrap();
    let full = c.canvas.full();
    push(&p, &c.canvas, &[full]);
    std::thread::sleep(Duration::from_secs_f64(a.settle));
    let tick = Duration::from_secs_f64(1.0 / 30.0);
    let t0 = Instant::now();
    out.lock().unwrap().motion_start = Some(t0);
    let mut due = t0;
    let mut n = 0u32;
    let mut late = 0;
    while t0.elapsed().as_secs_f64() < a.seconds {
        let mut dirty = c.step();
        if class.moves() {
            dirty.push(c.counter(base + n));
            n += 1;
        }
        push(&p, &c.canvas, &dirty);
        due += tick;
        match due.checked_duration_since(Instant::now()) {
            Some(d) => std::thread::sleep(d),
            None => late += 1,
        }
    }
    let rest = Instant::now();
    {
        let mut o = out.lock().unwrap();
        o.drawn = n;
        o.rest_start = Some(rest);
        o.late = late;
    }
    std::thread::sleep(Duration::from_secs_f64(a.rest));
    out.lock().unwrap().rest_end = Some(Instant::now());
}

/// What a tool delivered in one run of a class.
#[derive(Default)]
struct Delivered {
    /// Bytes from the first frame of motion to the end of the rest.
    bytes: u64,
    /// Seconds those bytes cover.
    seconds: f64,
    /// The first decoded luma of each counter value seen during motion.
    frames: HashMap<u32, Vec<u8>>,
    /// The last decoded luma at the end of the rest, with its counter.
    still: Option<(u32, Vec<u8>)>,
    /// Frames the decoder refused (none expected: nothing is dropped on the way).
    decode_errors: u32,
}

/// One row of the report.
struct Row {
    tool: String,
    class: Class,
    kbps: f64,
    updates_per_s: f64,
    shown: f64,
    psnr_p50: f64,
    psnr_p10: f64,
    psnr_still: f64,
    late: u32,
    frames_compared: usize,
}

/// Full-range luma (BT.601 weights, as [`Canvas::luma`]) of RGB pixels `step` bytes apart.
fn luma_of(px: &[u8], step: usize) -> Vec<u8> {
    px.chunks_exact(step)
        .map(|p| (0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32 + 0.5) as u8)
        .collect()
}

/// A `w`×`h` plane scaled up 2× (each sample repeated; what a halved picture looks like shown
/// at full size, near enough for PSNR and the counter).
fn double(p: &[u8], w: usize, h: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(w * h * 4);
    for y in 0..h {
        let row: Vec<u8> = p[y * w..(y + 1) * w].iter().flat_map(|&v| [v, v]).collect();
        out.extend_from_slice(&row);
        out.extend_from_slice(&row);
    }
    out
}

/// Compares what was delivered with the truth, rendered again frame by frame.
fn score(tool: &str, class: Class, a: &Args, base: u32, played: &Played, d: &Delivered) -> Row {
    let mut c = Content::new(class, a.width, a.height).unwrap();
    let mut psnr = vec![];
    for k in 0..played.drawn {
        c.step();
        let n = base + k;
        c.counter(n);
        if let Some(l) = d.frames.get(&n) {
            let truth = c.canvas.luma();
            if l.len() == truth.len() {
                psnr.push(plane_psnr(&truth, l).min(99.0));
            }
        }
    }
    // At rest: what the tool showed against the final picture, whichever frame it was.
    let still = match &d.still {
        Some((_, l)) => {
            let truth = c.canvas.luma();
            if l.len() == truth.len() {
                plane_psnr(&truth, l).min(99.0)
            } else {
                f64::NAN
            }
        }
        None => f64::NAN,
    };
    let motion = played
        .rest_start
        .zip(played.motion_start)
        .map_or(a.seconds, |(r, m)| r.duration_since(m).as_secs_f64());
    Row {
        tool: tool.to_string(),
        class,
        kbps: d.bytes as f64 * 8.0 / d.seconds.max(1e-9) / 1000.0,
        updates_per_s: d.frames.len() as f64 / motion,
        shown: d.frames.len() as f64 / f64::from(played.drawn.max(1)),
        psnr_p50: percentile(&psnr, 0.5),
        psnr_p10: percentile(&psnr, 0.1),
        psnr_still: still,
        late: played.late,
        frames_compared: psnr.len(),
    }
}

fn main() {
    let a = args();
    for tool in ["ffmpeg", "ffprobe"] {
        if a.tools.iter().any(|t| t.starts_with("x264"))
            && std::process::Command::new(tool)
                .arg("-version")
                .output()
                .is_err()
        {
            eprintln!("{tool} not found: sudo apt-get install -y ffmpeg");
            std::process::exit(2);
        }
    }
    tandem_tests::bench_main(run(a));
}

async fn run(a: Args) {
    let dir = tempfile::tempdir().unwrap();
    let (relay, token) = tandem_tests::bench_relay(dir.path(), &[]).await;
    let x = Xvfb::start(a.width as u32, a.height as u32);

    let mut rows: Vec<Row> = vec![];
    let mut base = 1u32;
    for tool in a.tools.clone() {
        let runs: Vec<(Class, u32, Played, Delivered)> = if tool == "tandem" {
            tandem(&a, dir.path(), &relay, &token, &x, &mut base).await
        } else if tool == "vnc" {
            let mut v = vec![];
            for &class in &a.classes {
                let b = base;
                base = next_base(base, a.seconds);
                let (p, d) = vnc(&a, &x, class, b).await;
                v.push((class, b, p, d));
            }
            v
        } else if let Some(preset) = tool.strip_prefix("x264-") {
            let mut v = vec![];
            for &class in &a.classes {
                let b = base;
                base = next_base(base, a.seconds);
                let (p, d) = x264(&a, &x, class, preset, b, dir.path()).await;
                v.push((class, b, p, d));
            }
            v
        } else {
            panic!("unknown tool {tool:?}: tandem, x264-ultrafast, x264-veryfast, vnc");
        };
        for (class, b, played, delivered) in runs {
            let row =
                tokio::task::block_in_place(|| score(&tool, class, &a, b, &played, &delivered));
            eprintln!(
                "{:<16} {:<24} {:>9.0} kbit/s {:>6.1} updates/s, PSNR {:.1} dB motion, {:.1} at rest",
                row.tool,
                row.class.name(),
                row.kbps,
                row.updates_per_s,
                row.psnr_p50,
                row.psnr_still
            );
            rows.push(row);
        }
    }
    relay.terminate().await;
    report(&a, &rows);
}

fn report(a: &Args, rows: &[Row]) {
    println!();
    println!(
        "Tandem and its peers at {}x{}, {} s of motion then {} s at rest per class ({} cores)",
        a.width,
        a.height,
        a.seconds,
        a.rest,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{:<24} {:<16} {:>9} {:>10} {:>7} {:>11} {:>11} {:>10} {:>6}",
        "content",
        "tool",
        "kbit/s",
        "updates/s",
        "shown",
        "PSNR p50",
        "PSNR p10",
        "at rest",
        "late"
    );
    let mut json = vec![];
    for class in &a.classes {
        for r in rows.iter().filter(|r| r.class == *class) {
            println!(
                "{:<24} {:<16} {:>9.0} {:>10.1} {:>6.0}% {:>11.1} {:>11.1} {:>10.1} {:>6}",
                r.class.name(),
                r.tool,
                r.kbps,
                r.updates_per_s,
                r.shown * 100.0,
                r.psnr_p50,
                r.psnr_p10,
                r.psnr_still,
                r.late
            );
            json.push(
                serde_json::json!({"content": r.class.name(), "tool": r.tool,
                "kbit_s": r.kbps, "updates_per_s": r.updates_per_s, "shown_share": r.shown,
                "psnr_motion_p50_db": r.psnr_p50, "psnr_motion_p10_db": r.psnr_p10,
                "psnr_at_rest_db": r.psnr_still, "painter_late_frames": r.late,
                "frames_compared": r.frames_compared}),
            );
        }
    }
    write_bench_json(
        "peers",
        &serde_json::json!({"width": a.width, "height": a.height, "motion_seconds": a.seconds,
            "rest_seconds": a.rest, "rows": json}),
    );
}

/// Every class through one Tandem session (a fresh headless agent, the console in this process).
async fn tandem(
    a: &Args,
    dir: &std::path::Path,
    relay: &RelayProcess,
    token: &Secret,
    x: &Xvfb,
    base: &mut u32,
) -> Vec<(Class, u32, Played, Delivered)> {
    let relay_args = [
        "--relay".to_string(),
        relay.addr.clone(),
        "--relay-pin".to_string(),
        relay.pin.to_string(),
    ];
    let (mut agent, code) =
        tandem_tests::bench_agent(&dir.join("agent-state"), &x.display, &relay_args, &[]).await;
    let opts = ConnectOptions::new(relay.addr.clone(), RelayTrust::Pin(relay.pin));
    let session = Arc::new(
        tandem_session::join(
            &opts,
            token,
            &SessionCode::parse(&code).unwrap(),
            &tandem_session::SessionConfig::default(),
        )
        .await
        .unwrap(),
    );
    {
        let s = session.clone();
        tokio::spawn(async move { while s.recv_control().await.is_ok() {} });
    }
    let mut dec = VideoDecoder::new().unwrap();
    let mut out = vec![];
    for &class in &a.classes {
        let b = *base;
        *base = next_base(*base, a.seconds);
        let played = Arc::new(Mutex::new(Played::default()));
        let painter = {
            let (display, played) = (x.display.clone(), played.clone());
            let a2 = a.for_painter();
            std::thread::spawn(move || play(&display, class, &a2, b, played))
        };
        let mut d = Delivered::default();
        let mut counting: Option<Instant> = None;
        let mut last: Option<(u32, Vec<u8>)> = None;
        // Frames are kept as they arrive and decoded once the class has ended, as the x264 runs'
        // files are: the console's decoding runs on the technician's machine, and here it would
        // take CPU from the agent on the same two cores (measured: full-screen video delivered at
        // 11 frames a second with live decoding, 28–30 without).
        let mut arrived: Vec<(Instant, bool, bool, Vec<u8>)> = vec![];
        loop {
            let (rest_end, motion_start, rest_start) = {
                let p = played.lock().unwrap();
                (p.rest_end, p.motion_start, p.rest_start)
            };
            if rest_end.is_some() {
                break;
            }
            let Ok(Ok(f)) =
                tokio::time::timeout(Duration::from_millis(100), session.recv_video()).await
            else {
                continue;
            };
            arrived.push((
                Instant::now(),
                motion_start.is_some(),
                rest_start.is_none(),
                f.data.to_vec(),
            ));
        }
        let ended = Instant::now();
        for (at, motion_started, in_motion, data) in arrived {
            let decoded = dec.decode(&data);
            if decoded.is_err() {
                d.decode_errors += 1;
            }
            let Ok(Some(fr)) = decoded else {
                continue;
            };
            let mut luma = luma_of(&fr.rgba, 4);
            // The agent halves the picture when its CPU or the path cannot keep up; the console
            // shows it scaled up, and so it is compared.
            if fr.width as usize * 2 == a.width && fr.height as usize * 2 == a.height {
                luma = double(&luma, fr.width as usize, fr.height as usize);
            }
            if luma.len() != a.width * a.height {
                continue;
            }
            if !motion_started {
                // The first picture (settle): not counted, but it is what an idle screen shows.
                last = Some((0, luma));
                continue;
            }
            let n = read_counter_luma(&luma, a.width, a.height);
            if counting.is_none() && (n.is_some_and(|n| n >= b) || !class.moves()) {
                counting = Some(at);
            }
            if counting.is_some() {
                d.bytes += data.len() as u64;
                if let Some(n) = n
                    && n >= b
                {
                    if in_motion {
                        d.frames.entry(n).or_insert_with(|| luma.clone());
                    }
                    last = Some((n, luma));
                } else if !class.moves() {
                    last = Some((0, luma));
                }
            }
        }
        if d.decode_errors > 0 {
            eprintln!(
                "{}: {} frames did not decode",
                class.name(),
                d.decode_errors
            );
        }
        d.seconds = counting.map_or(a.seconds + a.rest, |t| {
            ended.duration_since(t).as_secs_f64()
        });
        // Frames that arrive after the rest ended belong to the next class's settle.
        d.still = last;
        painter.join().unwrap();
        let p = played.lock().unwrap().clone();
        out.push((class, b, p, d));
    }
    session
        .end(tandem_proto::EndReason::EndedByTechnician)
        .await;
    let _ = agent.wait().await;
    out
}

/// One class through ffmpeg's x11grab and libx264 (`preset`), then decoded by ffmpeg.
async fn x264(
    a: &Args,
    x: &Xvfb,
    class: Class,
    preset: &str,
    base: u32,
    dir: &std::path::Path,
) -> (Played, Delivered) {
    let file = dir.join(format!("x264-{preset}-{}.mkv", class as u8));
    let mut ff = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(["-f", "x11grab", "-framerate", "30"])
        .args(["-video_size", &format!("{}x{}", a.width, a.height)])
        .args(["-draw_mouse", "0", "-i", &format!("{}.0", x.display)])
        .args(["-c:v", "libx264", "-preset", preset, "-tune", "zerolatency"])
        .args(["-crf", "23", "-pix_fmt", "yuv420p"])
        .arg(&file)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let played = Arc::new(Mutex::new(Played::default()));
    {
        let (display, played) = (x.display.clone(), played.clone());
        let a2 = a.for_painter();
        tokio::task::spawn_blocking(move || play(&display, class, &a2, base, played))
            .await
            .unwrap();
    }
    // Stop the capture at the end of the rest ('q' lets ffmpeg finish the file).
    if let Some(mut i) = ff.stdin.take() {
        let _ = i.write_all(b"q");
    }
    let _ = ff.wait();
    let p = played.lock().unwrap().clone();

    // Packet sizes, in decoding order (= presentation order: zerolatency has no B-frames).
    let probe = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0"])
        .args(["-show_entries", "packet=size", "-of", "csv=p=0"])
        .arg(&file)
        .output()
        .unwrap();
    let sizes: Vec<u64> = String::from_utf8_lossy(&probe.stdout)
        .lines()
        .filter_map(|l| l.trim().trim_end_matches(',').parse().ok())
        .collect();
    // Decoded pictures, one per packet.
    let mut dec = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-i"])
        .arg(&file)
        .args([
            "-fps_mode",
            "passthrough",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = dec.stdout.take().unwrap();
    let frame_bytes = a.width * a.height * 3;
    let mut buf = vec![0u8; frame_bytes];
    let mut d = Delivered::default();
    let (mut k, mut counted, mut started) = (0usize, 0usize, false);
    let mut last = None;
    let motion_frames = (a.seconds * 30.0) as usize;
    while stdout.read_exact(&mut buf).is_ok() {
        let luma = luma_of(&buf, 3);
        let n = read_counter_luma(&luma, a.width, a.height).filter(|&n| n >= base);
        // Motion starts with the first counter (idle: the settle time has passed).
        if !started && (n.is_some() || (!class.moves() && k as f64 >= a.settle * 30.0)) {
            started = true;
        }
        if started {
            d.bytes += sizes.get(k).copied().unwrap_or(0);
            counted += 1;
            if let Some(n) = n {
                if counted <= motion_frames {
                    d.frames.entry(n).or_insert_with(|| luma.clone());
                }
                last = Some((n, luma));
            } else if !class.moves() {
                last = Some((0, luma));
            }
        }
        k += 1;
    }
    let _ = dec.wait();
    d.seconds = counted as f64 / 30.0;
    d.still = last;
    let _ = std::fs::remove_file(&file);
    (p, d)
}

/// A TCP proxy that counts the bytes from `to` back to the client.
async fn counting_proxy(
    listener: tokio::net::TcpListener,
    to: std::net::SocketAddr,
    bytes: Arc<std::sync::atomic::AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((client, _)) = listener.accept().await {
        let Ok(server) = tokio::net::TcpStream::connect(to).await else {
            continue;
        };
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut cr, &mut sw).await;
        });
        let bytes = bytes.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = sr.read(&mut buf).await {
                if n == 0 || cw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                bytes.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
}

/// Stops a helper program so that it cleans up after itself (SIGTERM, SIGKILL after 3 s), then
/// removes the System V shared-memory segments it created and left with nobody attached. x11vnc
/// killed outright left 62 segments per class; a few runs of the bench used up the kernel's
/// 4,096 (`kernel.shmmni`), and x11vnc then could not start ("shmget: No space left on device")
/// — nor could anything else on the machine that uses such segments.
async fn stop_cleanly(child: &mut tokio::process::Child) {
    let Some(pid) = child.id() else {
        return;
    };
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    if tokio::time::timeout(Duration::from_secs(3), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    // /proc/sysvipc/shm: key shmid perms size cpid lpid nattch ...
    let table = std::fs::read_to_string("/proc/sysvipc/shm").unwrap_or_default();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 6 && f[4] == pid.to_string() && f[6] == "0" {
            let _ = std::process::Command::new("ipcrm")
                .args(["-m", f[1]])
                .status();
        }
    }
}

/// One class through x11vnc and the TigerVNC viewer.
async fn vnc(a: &Args, x: &Xvfb, class: Class, base: u32) -> (Played, Delivered) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let port = tandem_tests::free_port();
    let mut server = tokio::process::Command::new("x11vnc")
        .args(["-display", &x.display, "-rfbport", &port.to_string()])
        .args(["-localhost", "-forever", "-shared", "-nopw", "-quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("x11vnc: sudo apt-get install -y x11vnc");
    let to: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t = Instant::now();
    while tokio::net::TcpStream::connect(to).await.is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "x11vnc did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let bytes = Arc::new(AtomicU64::new(0));
    let proxy_task = tokio::spawn(counting_proxy(listener, to, bytes.clone()));
    let screen = Xvfb::start(a.width as u32, a.height as u32);
    let mut viewer = tokio::process::Command::new("xtigervncviewer")
        .args([
            "-FullScreen",
            "-SecurityTypes",
            "None",
            "-AlertOnFatalError=0",
        ])
        .arg(format!("127.0.0.1::{}", proxy.port()))
        .env("DISPLAY", &screen.display)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("xtigervncviewer: sudo apt-get install -y tigervnc-viewer");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let played = Arc::new(Mutex::new(Played::default()));
    let painter = {
        let (display, played) = (x.display.clone(), played.clone());
        let a2 = a.for_painter();
        std::thread::spawn(move || play(&display, class, &a2, base, played))
    };
    // The viewer's screen, captured whenever it changed, until the rest ends.
    let grab = {
        let (display, played, bytes) = (screen.display.clone(), played.clone(), bytes.clone());
        let (w, h, seconds) = (a.width, a.height, a.seconds);
        tokio::task::spawn_blocking(move || {
            use tandem_media::capture::Capturer;
            let mut cap = tandem_media::capture::x11::X11Capturer::open(Some(&display)).unwrap();
            let mut d = Delivered::default();
            let (mut b0, mut started) = (None, None::<Instant>);
            // BGRA rows: luma with the weights the other way round.
            let luma_of_frame = |f: &tandem_media::Frame| -> Option<Vec<u8>> {
                if f.width as usize != w || f.height as usize != h {
                    return None;
                }
                let mut luma = Vec::with_capacity(w * h);
                for y in 0..f.height {
                    luma.extend(f.row(y).chunks_exact(4).map(|p| {
                        (0.114 * p[0] as f32 + 0.587 * p[1] as f32 + 0.299 * p[2] as f32 + 0.5)
                            as u8
                    }));
                }
                Some(luma)
            };
            loop {
                let (ms, rs, re) = {
                    let p = played.lock().unwrap();
                    (p.motion_start, p.rest_start, p.rest_end)
                };
                if let Some(end) = re {
                    d.bytes = bytes.load(Ordering::Relaxed) - b0.unwrap_or(0);
                    d.seconds = started.map_or(seconds, |s| end.duration_since(s).as_secs_f64());
                    // What the viewer shows at the end of the rest.
                    if let Ok(c) = cap.capture()
                        && let Some(l) = luma_of_frame(c.frame)
                    {
                        d.still = Some((read_counter_luma(&l, w, h).unwrap_or(0), l));
                    }
                    break;
                }
                let Ok(c) = cap.capture() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                if c.damage.is_empty() || ms.is_none() {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                let Some(luma) = luma_of_frame(c.frame) else {
                    continue;
                };
                let n = read_counter_luma(&luma, w, h).filter(|&n| n >= base);
                if started.is_none() && (n.is_some() || !class.moves()) {
                    started = Some(Instant::now());
                    b0 = Some(bytes.load(Ordering::Relaxed));
                }
                if let Some(n) = n
                    && rs.is_none()
                {
                    d.frames.entry(n).or_insert(luma);
                }
            }
            d
        })
    };
    let d = grab.await.unwrap();
    painter.join().unwrap();
    let p = played.lock().unwrap().clone();
    stop_cleanly(&mut viewer).await;
    stop_cleanly(&mut server).await;
    proxy_task.abort();
    drop(screen);
    (p, d)
}
