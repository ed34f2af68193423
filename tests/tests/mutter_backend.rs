//! The GNOME backend (`tandem_host::mutter`) against a real headless Mutter with its own D-Bus,
//! PipeWire and WirePlumber: frames of the right size and content, nothing while the screen is
//! idle, the cursor as metadata, and pointer, buttons, keys, text and the wheel arriving at a
//! Wayland client. Skipped (with a message) where Mutter is not installed.
#![allow(clippy::unwrap_used)]

use std::sync::Mutex;
use std::time::{Duration, Instant};
use tandem_input::gate::{Action, ScrollAxis};
use tandem_input::{Injector, MouseButton};
use tandem_media::capture::{Capturer, CursorShape};
use tandem_media::frame::{Frame, Rect};
use tandem_tests::mutter::{Mutter, MutterClient, cpu_seconds_of, mutter_available};
use tandem_tests::wayland::{frame_diff, pattern_frame};

/// One GNOME stack at a time: each is a compositor, PipeWire and a session manager.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const WAIT: Duration = Duration::from_secs(20);

fn skip() -> bool {
    if mutter_available() {
        return false;
    }
    eprintln!("skipped: mutter is not installed");
    true
}

/// Captures (waking on changes) until `done` accepts a capture; panics after `timeout`.
fn capture_until(
    c: &mut dyn Capturer,
    timeout: Duration,
    what: &str,
    mut done: impl FnMut(&Frame, &[Rect], &tandem_media::capture::CursorState) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        c.wait_for_change(Duration::from_millis(50));
        let cap = c.capture().unwrap();
        if done(cap.frame, &cap.damage, &cap.cursor) {
            return;
        }
        let cursor = &cap.cursor;
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?} (last damage {:?}, cursor at ({}, {}), visible {}, \
             shape {:?})",
            cap.damage,
            cursor.x,
            cursor.y,
            cursor.visible,
            cursor.shape.as_ref().map(|s| (s.serial, s.width, s.height))
        );
    }
}

/// Captures until the frame is exactly `want`; after `timeout`, how it differs.
fn wait_picture(c: &mut dyn Capturer, want: &Frame, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        c.wait_for_change(Duration::from_millis(50));
        let cap = c.capture().unwrap();
        let d = frame_diff(cap.frame, want, 0);
        if d.pixels == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "not within {timeout:?}: {} pixels differ (at most by {}), the first {:?}",
                d.pixels, d.max, d.first
            ));
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn screen_cursor_input_and_an_idle_screen() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if skip() {
        return;
    }
    tandem_tests::init_logs();
    let (w, h) = (1280, 720);
    let m = Mutter::start(w, h);
    let desktop = m.desktop();

    // The screen: one monitor, its size, a whole first frame.
    let t = Instant::now();
    let mut cap: Box<dyn Capturer + Send> = Box::new(
        desktop
            .open_capturer()
            .unwrap_or_else(|e| panic!("{e}\n{}", m.logs())),
    );
    let open_ms = t.elapsed().as_secs_f64() * 1000.0;
    let mons = cap.monitors();
    assert_eq!(mons.len(), 1, "{mons:?}");
    assert_eq!(
        (mons[0].x, mons[0].y, mons[0].width, mons[0].height),
        (0, 0, w, h)
    );
    assert!(mons[0].primary);
    assert_eq!(cap.size(), (w, h));
    {
        let first = cap.capture().unwrap();
        assert_eq!((first.frame.width, first.frame.height), (w, h));
        assert_eq!(first.damage, vec![Rect { x: 0, y: 0, w, h }]);
    }
    assert_eq!(m.remote_desktop_sessions().len(), 1);

    // A client shows the test picture: the captured frame is exactly that picture.
    let mut client = MutterClient::start(&m, &[]);
    client.next("drawn", WAIT, |v| v["width"] == w && v["height"] == h);
    let want = pattern_frame(w, h, 0);
    if let Err(e) = wait_picture(&mut *cap, &want, Duration::from_secs(3)) {
        // Headless Mutter 43.8 now and then records nothing after the window's map animation
        // (the client has its presentation feedback, yet no buffer comes, not even to a newly
        // connected stream) until the next input or redraw: a redraw brings the picture.
        eprintln!("note: the mapped window was not recorded ({e}); the client draws again");
        client.send("seed 0");
        wait_picture(&mut *cap, &want, WAIT)
            .unwrap_or_else(|e| panic!("the test picture: {e}\n{}", m.logs()));
    }

    // Redraws: each arrives with its damage; time from the client's command to the capture.
    let (mut latency, mut drawing) = (Vec::new(), Vec::new());
    for seed in 1..=8 {
        let want = pattern_frame(w, h, seed);
        let t = Instant::now();
        client.send(&format!("seed {seed}"));
        // The client's own drawing: until it reports the picture committed.
        client.next("drawn", WAIT, |v| v["seed"] == seed);
        let drawn = t.elapsed().as_secs_f64() * 1000.0;
        // The time the capture came back with damage (before the slow comparison of this test).
        let mut at = 0.0;
        capture_until(&mut *cap, WAIT, "a redraw", |f, d, _| {
            if d.is_empty() {
                return false;
            }
            at = t.elapsed().as_secs_f64() * 1000.0;
            frame_diff(f, &want, 0).pixels == 0
        });
        latency.push(at - drawn);
        drawing.push(drawn);
    }
    // A small change: damage only around it (whole 64-pixel tiles).
    client.send("rect 200 100 30 20 255 0 0");
    capture_until(&mut *cap, WAIT, "a small rectangle", |f, d, _| {
        f.pixel(210, 110) == (0, 0, 255)
            && !d.is_empty()
            && d.iter()
                .all(|r| r.x <= 200 && r.y <= 100 && r.area() <= 64 * 64 * 4)
    });

    // Idle: nothing arrives, nothing is reported, the waiting costs nothing.
    while cap.wait_for_change(Duration::from_millis(300)) {
        cap.capture().unwrap();
    }
    assert!(!cap.wait_for_change(Duration::from_secs(1)));
    assert!(cap.capture().unwrap().damage.is_empty());
    let me = std::process::id();
    let cpu = |pid: Option<u32>| pid.and_then(cpu_seconds_of).unwrap_or(0.0);
    let (a0, m0, p0) = (cpu(Some(me)), cpu(m.pid("mutter")), cpu(m.pid("pipewire")));
    let idle = Instant::now();
    let mut looks = 0;
    while idle.elapsed() < Duration::from_secs(2) {
        // As the screen thread does: a look every 17 ms at most.
        if cap.wait_for_change(Duration::from_millis(17)) {
            panic!("a change on an idle screen");
        }
        assert!(cap.capture().unwrap().damage.is_empty());
        looks += 1;
    }
    let secs = idle.elapsed().as_secs_f64();
    let idle_cpu = (
        (cpu(Some(me)) - a0) / secs * 100.0,
        (cpu(m.pid("mutter")) - m0) / secs * 100.0,
        (cpu(m.pid("pipewire")) - p0) / secs * 100.0,
    );

    // Input, through the same remote desktop session. The cursor comes as metadata: its position
    // with every move, its image once.
    let mut input: Box<dyn Injector> = Box::new(desktop.open_injector().unwrap());
    assert_eq!(m.remote_desktop_sessions().len(), 1);
    let s = input.screen().unwrap();
    assert_eq!((s.x, s.y, s.width, s.height), (0, 0, w, h));
    input.apply(&Action::MoveTo { x: 101, y: 201 }).unwrap();
    let mut shape: Option<CursorShape> = None;
    capture_until(&mut *cap, WAIT, "the cursor at (101, 201)", |_, _, c| {
        if let Some(s) = &c.shape {
            shape = Some(s.clone());
        }
        (c.x, c.y) == (101, 201)
    });
    // Headless Mutter 43.8 sends the position but an empty image (its empty-sprite metadata, while
    // the same Mutter draws the arrow into frames with cursor-mode "embedded"); an image, when one
    // comes, is checked.
    match &shape {
        Some(shape) => {
            assert!(shape.width > 0 && shape.height > 0 && shape.serial != 0);
            assert!(shape.hot_x < shape.width && shape.hot_y < shape.height);
            assert_eq!(shape.rgba.len(), (shape.width * shape.height * 4) as usize);
            // Premultiplied: no colour channel above its alpha.
            assert!(
                shape
                    .rgba
                    .chunks_exact(4)
                    .all(|p| p[0] <= p[3] && p[1] <= p[3] && p[2] <= p[3])
            );
        }
        None => eprintln!("note: GNOME sent no cursor image (headless Mutter 43 sends none)"),
    }
    let mut moves = Vec::new();
    for i in 0..10 {
        let t = Instant::now();
        input
            .apply(&Action::MoveTo {
                x: 300 + i * 10,
                y: 300,
            })
            .unwrap();
        capture_until(&mut *cap, WAIT, "the cursor moving", |_, _, c| {
            (c.x, c.y) == (300 + i * 10, 300)
        });
        moves.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    input.apply(&Action::MoveTo { x: 640, y: 360 }).unwrap();
    capture_until(&mut *cap, WAIT, "the cursor at (640, 360)", |_, _, c| {
        assert!(
            c.shape.is_none() || shape.is_none(),
            "the same image is sent once"
        );
        (c.x, c.y) == (640, 360) && c.visible == shape.is_some()
    });
    // Outside the screen: clamped to its edge.
    input.apply(&Action::MoveTo { x: 5000, y: -20 }).unwrap();
    capture_until(&mut *cap, WAIT, "the cursor at the edge", |_, _, c| {
        (c.x, c.y) == (w as i32 - 1, 0)
    });

    // Over the client: it gets the pointer; GNOME shows no cursor there (the client set none).
    input.apply(&Action::MoveTo { x: 100, y: 200 }).unwrap();
    client.next("pointer_enter", WAIT, |_| true);
    input.apply(&Action::MoveTo { x: 101, y: 201 }).unwrap();
    client.next("motion", WAIT, |v| v["x"] == 101.0 && v["y"] == 201.0);
    capture_until(&mut *cap, WAIT, "the cursor over the client", |_, _, c| {
        (c.x, c.y) == (101, 201) && !c.visible
    });
    for pressed in [true, false] {
        input
            .apply(&Action::Button {
                button: MouseButton::Left,
                pressed,
            })
            .unwrap();
        client.next("button", WAIT, |v| {
            v["button"] == 0x110 && v["pressed"] == pressed && v["x"] == 101.0 && v["y"] == 201.0
        });
    }
    // Mutter creates the session's keyboard with its first key; a seat without a keyboard before
    // (headless) announces one then, and the client takes it: Shift first.
    for pressed in [true, false] {
        input
            .apply(&Action::Key {
                keycode: 50,
                pressed,
            })
            .unwrap();
    }
    client.next("keyboard_enter", WAIT, |_| true);
    // X keycode 38 is evdev 30, the A key.
    for pressed in [true, false] {
        input
            .apply(&Action::Key {
                keycode: 38,
                pressed,
            })
            .unwrap();
        client.next("key", WAIT, |v| {
            v["keycode"] == 30 && v["pressed"] == pressed
        });
    }
    input.apply(&Action::Text("Hi!\n".into())).unwrap();
    for ch in ["H", "i", "!", "\r"] {
        client.next("key", WAIT, |v| v["pressed"] == true && v["utf8"] == ch);
    }
    input
        .apply(&Action::Scroll {
            axis: ScrollAxis::Vertical,
            clicks: 2,
        })
        .unwrap();
    client.next("axis", WAIT, |v| {
        v["axis"] == 0 && v["value"].as_f64() > Some(0.0)
    });
    input
        .apply(&Action::Scroll {
            axis: ScrollAxis::Horizontal,
            clicks: -1,
        })
        .unwrap();
    client.next("axis", WAIT, |v| {
        v["axis"] == 1 && v["value"].as_f64() < Some(0.0)
    });

    // The session outlives the input while the screen is shared, and ends with both.
    drop(input);
    client.send("seed 9");
    let want = pattern_frame(w, h, 9);
    capture_until(
        &mut *cap,
        WAIT,
        "a redraw after the input closed",
        |f, _, _| frame_diff(f, &want, 0).pixels == 0,
    );
    assert_eq!(m.remote_desktop_sessions().len(), 1);
    drop(cap);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !m.remote_desktop_sessions().is_empty() {
        assert!(Instant::now() < deadline, "the session was not stopped");
        std::thread::sleep(Duration::from_millis(20));
    }

    eprintln!(
        "mutter backend: open {open_ms:.0} ms; client's commit → captured frame p50 {:.1} ms \
         (client drawing {:.1} ms, of {}); pointer move → cursor position p50 {:.1} ms; idle for \
         {secs:.1} s ({looks} looks): agent {:.2} %, mutter {:.2} %, pipewire {:.2} % of a core",
        median(&mut latency),
        median(&mut drawing),
        latency.len(),
        median(&mut moves),
        idle_cpu.0,
        idle_cpu.1,
        idle_cpu.2
    );
}

#[test]
fn unavailable_is_said_in_words() {
    if skip() {
        return;
    }
    // A bus without Mutter on it.
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("unix:path={}", dir.path().join("bus").display());
    let mut bus = std::process::Command::new("dbus-daemon")
        .args(["--session", "--nofork", "--nopidfile"])
        .arg(format!("--address={addr}"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !dir.path().join("bus").exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = tandem_host::mutter::available_on(Some(&addr)).unwrap_err();
    assert!(
        err.contains("GNOME's remote desktop interface is not available"),
        "{err}"
    );
    let desktop = tandem_host::mutter::MutterDesktop::with_bus(addr.clone());
    let err = desktop.open_capturer().err().unwrap().to_string();
    assert!(err.contains("org.gnome.Mutter"), "{err}");
    let err = tandem_host::mutter::MutterDesktop::with_bus("unix:path=/nonexistent/bus")
        .open_injector()
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("session bus"), "{err}");
    let _ = bus.kill();
    let _ = bus.wait();
}

/// Applies a layout of `(connector, mode, x)` side by side, the first primary (a temporary
/// configuration, as Settings applies before asking to keep it).
fn apply_layout(m: &Mutter, monitors: &[(&str, &str, u32)]) {
    let state = m.gdbus_call(
        "org.gnome.Mutter.DisplayConfig",
        "/org/gnome/Mutter/DisplayConfig",
        "org.gnome.Mutter.DisplayConfig.GetCurrentState",
        &[],
    );
    let serial: u32 = state
        .trim_start_matches("(uint32 ")
        .split(',')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no serial in {state}"));
    let logical: Vec<String> = monitors
        .iter()
        .enumerate()
        .map(|(i, (connector, mode, x))| {
            format!(
                "({x}, 0, 1.0, 0, {}, [('{connector}', '{mode}', @a{{sv}} {{}})])",
                i == 0
            )
        })
        .collect();
    m.gdbus_call(
        "org.gnome.Mutter.DisplayConfig",
        "/org/gnome/Mutter/DisplayConfig",
        "org.gnome.Mutter.DisplayConfig.ApplyMonitorsConfig",
        &[
            &serial.to_string(),
            "1",
            &format!("[{}]", logical.join(", ")),
            "@a{sv} {}",
        ],
    );
}

#[test]
fn two_monitors_and_a_layout_change() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if skip() {
        return;
    }
    tandem_tests::init_logs();
    let m = Mutter::start_monitors(&[(800, 600), (640, 480)]);
    let desktop = m.desktop();
    let mut cap: Box<dyn Capturer + Send> = Box::new(
        desktop
            .open_capturer()
            .unwrap_or_else(|e| panic!("{e}\n{}", m.logs())),
    );
    let layout = |cap: &dyn Capturer| {
        cap.monitors()
            .iter()
            .map(|m| (m.name.clone(), m.x, m.y, m.width, m.height, m.primary))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        layout(&*cap),
        [
            ("Meta-0".to_string(), 0, 0, 800, 600, true),
            ("Meta-1".to_string(), 800, 0, 640, 480, false)
        ]
    );
    assert_eq!(cap.size(), (800, 600));
    let mut input: Box<dyn Injector> = Box::new(desktop.open_injector().unwrap());
    let s = input.screen().unwrap();
    assert_eq!((s.x, s.y, s.width, s.height), (0, 0, 1440, 600));

    // The pointer on the second monitor: not on the first one's stream.
    input.apply(&Action::MoveTo { x: 900, y: 100 }).unwrap();
    input.apply(&Action::MoveTo { x: 901, y: 101 }).unwrap();
    capture_until(
        &mut *cap,
        WAIT,
        "the cursor off the first monitor",
        |_, _, c| !c.visible,
    );
    cap.select(1).unwrap();
    assert_eq!(cap.size(), (640, 480));
    let mut resized = false;
    // The whole new picture, and the pointer where it is on this monitor: not necessarily in the
    // same capture (under load the cursor's position may come a frame after the picture, and
    // nothing changes after that; CI once waited for both together in vain).
    let (mut whole, mut pointer) = (false, false);
    let mut sizes = std::collections::BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    loop {
        cap.wait_for_change(Duration::from_millis(50));
        let c = cap.capture().unwrap();
        resized |= c.resized;
        sizes.insert((c.frame.width, c.frame.height));
        if (c.frame.width, c.frame.height) == (640, 480) {
            whole |= c.damage
                == vec![Rect {
                    x: 0,
                    y: 0,
                    w: 640,
                    h: 480,
                }];
            pointer |= (c.cursor.x, c.cursor.y) == (101, 101);
        }
        if whole && pointer {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second monitor's stream: whole picture {whole}, pointer at (101, 101) {pointer}, \
             picture sizes seen {sizes:?}\n{}",
            m.logs()
        );
    }
    assert!(resized, "a new size is reported as such");

    // Settings swaps the monitors: Mutter 43 closes the session; the backend starts another one
    // over the new layout and stays on the same monitor.
    apply_layout(
        &m,
        &[
            ("Meta-1", "640x480@60.000", 0),
            ("Meta-0", "800x600@60.000", 640),
        ],
    );
    let deadline = Instant::now() + WAIT;
    loop {
        cap.wait_for_change(Duration::from_millis(50));
        let c = cap
            .capture()
            .unwrap_or_else(|e| panic!("after the layout change: {e}\n{}", m.logs()));
        if c.resized {
            break;
        }
        assert!(Instant::now() < deadline, "no new session after the change");
    }
    assert_eq!(
        layout(&*cap),
        [
            ("Meta-1".to_string(), 0, 0, 640, 480, true),
            ("Meta-0".to_string(), 640, 0, 800, 600, false)
        ]
    );
    assert_eq!(cap.size(), (640, 480));
    assert_eq!(m.remote_desktop_sessions().len(), 1);
    // The input follows into the new session: (700, 100) is now on Meta-0, at (60, 100).
    input.apply(&Action::MoveTo { x: 700, y: 100 }).unwrap();
    cap.select(1).unwrap();
    assert_eq!(cap.size(), (800, 600));
    capture_until(&mut *cap, WAIT, "the cursor on Meta-0", |_, _, c| {
        (c.x, c.y) == (60, 100)
    });
    // Its picture: headless Mutter 43.8 sometimes records nothing for a new stream of a still
    // monitor (seen once in CI under load: the cursor's metadata came, no frame in 20 s) until
    // something redraws; then the backend keeps the old monitor's frame, which the check below
    // reports as such instead of failing the layout part of the test.
    let mut got = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && got != (800, 600) {
        cap.wait_for_change(Duration::from_millis(50));
        let c = cap.capture().unwrap();
        got = (c.frame.width, c.frame.height);
    }
    if got != (800, 600) {
        eprintln!(
            "note: Mutter sent no frame of the still monitor Meta-0 yet (known headless quirk)"
        );
    }
    assert_eq!(m.remote_desktop_sessions().len(), 1);
    drop(input);
    drop(cap);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !m.remote_desktop_sessions().is_empty() {
        assert!(Instant::now() < deadline, "the session was not stopped");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The real programs on GNOME: the agent finds the GNOME backend by itself (no flag) and says so
/// before its code, the console's picture is what the Wayland client drew, and the console's
/// click and typing reach the client.
#[test]
fn a_session_with_the_real_programs_on_gnome() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if skip() {
        return;
    }
    tandem_tests::init_logs();
    let (w, h) = (1280, 720);
    let m = Mutter::start(w, h);
    let mut client = MutterClient::start(&m, &[]);
    client.next("drawn", WAIT, |v| v["width"] == w && v["height"] == h);
    // Mutter creates its virtual keyboard on the first key (a real seat has one already): a
    // Shift first. Then a redraw, in case headless Mutter missed the window's first frame.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(tandem_tests::desktop_session(
        &m.env(),
        "move 10 10\nkey Shift\nwait 300\nclick left 640 360\nwait 200\nkey h\nkey i\n\
         type !\nwait 2500\n",
        7,
    ));
    assert_eq!(s.desktop["backend"], "gnome", "{}", s.desktop);
    assert_eq!((s.seen.width, s.seen.height), (w, h));
    let psnr = tandem_media::luma_psnr(&pattern_frame(w, h, 0), &s.seen);
    assert!(
        psnr >= 35.0,
        "console picture vs the client's: {psnr:.1} dB\n{}",
        m.logs()
    );
    let b = client.next("button", WAIT, |v| v["pressed"] == true);
    assert_eq!(b["button"], 0x110);
    assert!(
        (b["x"].as_f64().unwrap() - 640.0).abs() <= 1.0
            && (b["y"].as_f64().unwrap() - 360.0).abs() <= 1.0,
        "{b}"
    );
    let typed: String = (0..3)
        .map(|_| {
            client.next("key", WAIT, |v| {
                v["pressed"] == true && v["utf8"].as_str().is_some_and(|s| !s.is_empty())
            })["utf8"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(typed, "hi!");
}
