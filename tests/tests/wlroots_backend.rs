//! The wlroots backend against a real sway (headless, software rendering), started by the test:
//! the captured picture is what a Wayland client drew, an idle screen reports nothing, a drawn
//! rectangle arrives as damage, a new resolution is followed, and the virtual pointer and
//! keyboard reach the client (physical keys through the layout, Unicode text).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};
use tandem_host::wlroots::{WlrCapturer, WlrInjector};
use tandem_input::gate::{Action, ScrollAxis};
use tandem_input::{Injector, MouseButton};
use tandem_media::capture::Capturer;
use tandem_media::frame::Rect;
use tandem_tests::wayland::{Sway, WaylandClient, frame_diff, pattern_frame, sway_available};

const T: Duration = Duration::from_secs(10);

fn skip() -> bool {
    if !sway_available() {
        eprintln!("skipped: sway is not installed (apt-get install sway)");
        return true;
    }
    false
}

fn socket(sway: &Sway) -> std::path::PathBuf {
    sway.runtime_dir().join(sway.wayland_display())
}

/// Captures until the picture has the client's drawing (or fails after a while).
fn capture_until(c: &mut WlrCapturer, want: &tandem_media::frame::Frame) {
    let deadline = Instant::now() + T;
    loop {
        c.wait_for_change(Duration::from_millis(100));
        let cap = c.capture().unwrap();
        let d = frame_diff(cap.frame, want, 2);
        if d.pixels == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the capture never showed the client's picture: {} pixels differ, first {:?}",
            d.pixels,
            d.first
        );
    }
}

#[test]
fn capture_is_exact_idle_is_free_damage_is_precise_and_resize_is_followed() {
    if skip() {
        return;
    }
    let mut sway = Sway::start(1280, 720);
    let mut client = WaylandClient::start(&sway);
    client.wait_drawn(1280, 720, 0, T);
    let mut cap = WlrCapturer::open(Some(&socket(&sway))).unwrap();
    assert_eq!(cap.size(), (1280, 720));
    let monitors = cap.monitors();
    assert_eq!(monitors.len(), 1);
    assert_eq!(monitors[0].name, sway.output());
    capture_until(&mut cap, &pattern_frame(1280, 720, 0));

    // Idle: once the client's start-up redraws are over (it may draw twice while sway settles
    // its fullscreen state), no frame comes for a whole second, and a capture reports nothing.
    let deadline = Instant::now() + T;
    loop {
        let t = Instant::now();
        if !cap.wait_for_change(Duration::from_millis(1000)) {
            assert!(t.elapsed() >= Duration::from_millis(900), "did not wait");
            break;
        }
        cap.capture().unwrap();
        assert!(
            Instant::now() < deadline,
            "the idle screen keeps sending frames"
        );
    }
    assert!(cap.capture().unwrap().damage.is_empty());
    assert!(!cap.wait_for_change(Duration::from_millis(500)));

    // A keyframe request reports the whole (unchanged) picture.
    cap.request_full();
    let full = cap.capture().unwrap().damage;
    assert_eq!(
        full,
        vec![Rect {
            x: 0,
            y: 0,
            w: 1280,
            h: 720
        }]
    );

    // A rectangle drawn by the client arrives as damage around it, with its pixels.
    client.send("rect 300 200 100 50 255 0 0");
    client.next_event("drawn_rect", T);
    assert!(cap.wait_for_change(T), "no frame after drawing");
    let c = cap.capture().unwrap();
    let area: u64 = c.damage.iter().map(|r| r.area()).sum();
    assert!(
        c.damage.iter().any(|r| r.contains(310, 210)),
        "{:?}",
        c.damage
    );
    assert!(
        area < 1280 * 720 / 4,
        "damage should be local, got {:?}",
        c.damage
    );
    assert_eq!(c.frame.pixel(320, 220), (0, 0, 255), "(b, g, r): red");

    // A new resolution: the capture follows, the picture is the client's redraw.
    sway.set_mode(1024, 768);
    client.wait_drawn(1024, 768, 0, T);
    let deadline = Instant::now() + T;
    let mut resized = false;
    loop {
        cap.wait_for_change(Duration::from_millis(100));
        let c = cap.capture().unwrap();
        resized |= c.resized;
        if (c.frame.width, c.frame.height) == (1024, 768)
            && frame_diff(c.frame, &pattern_frame(1024, 768, 0), 2).pixels == 0
        {
            break;
        }
        assert!(Instant::now() < deadline, "resolution change not followed");
    }
    assert!(resized, "the pipeline was not told of the new size");
    assert_eq!(cap.size(), (1024, 768));
}

#[test]
fn virtual_pointer_and_keyboard_reach_a_wayland_client() {
    if skip() {
        return;
    }
    let sway = Sway::start(1280, 720);
    let mut client = WaylandClient::start(&sway);
    client.wait_drawn(1280, 720, 0, T);
    let mut input = WlrInjector::open(Some(&socket(&sway))).unwrap();
    let screen = input.screen().unwrap();
    assert_eq!((screen.width, screen.height), (1280, 720));

    // The headless seat has no pointer or keyboard until the virtual ones appear; the client
    // binds them when told, so the first events can pass before it listens (a desktop with real
    // devices has them already). Nudge until the client has both.
    let deadline = Instant::now() + T;
    loop {
        input.apply(&Action::MoveTo { x: 10, y: 10 }).unwrap();
        input.apply(&Action::MoveTo { x: 11, y: 11 }).unwrap();
        input
            .apply(&Action::Key {
                keycode: 50,
                pressed: true,
            })
            .unwrap();
        input
            .apply(&Action::Key {
                keycode: 50,
                pressed: false,
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let seen = client.events_so_far();
        let has = |k: &str| seen.iter().any(|e| e["event"] == k);
        if has("pointer_enter") && has("keyboard_enter") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the client never got the pointer/keyboard"
        );
    }

    input.apply(&Action::MoveTo { x: 400, y: 300 }).unwrap();
    for pressed in [true, false] {
        input
            .apply(&Action::Button {
                button: MouseButton::Left,
                pressed,
            })
            .unwrap();
    }
    let b = client.next_event_where("button", T, |v| v["pressed"] == true);
    assert_eq!(b["button"], 0x110);
    assert!(
        (b["x"].as_f64().unwrap() - 400.0).abs() < 1.0
            && (b["y"].as_f64().unwrap() - 300.0).abs() < 1.0,
        "{b}"
    );
    input
        .apply(&Action::Scroll {
            axis: ScrollAxis::Vertical,
            clicks: 2,
        })
        .unwrap();
    let a = client.next_event("axis", T);
    assert!(a["value"].as_f64().unwrap() > 0.0, "down is positive: {a}");

    // Physical keys (X keycodes): shift + h, i → "H", "i".
    let key = |input: &mut WlrInjector, code: u8, pressed: bool| {
        input
            .apply(&Action::Key {
                keycode: code,
                pressed,
            })
            .unwrap()
    };
    key(&mut input, 50, true); // Shift_L
    key(&mut input, 43, true); // h
    key(&mut input, 43, false);
    key(&mut input, 50, false);
    key(&mut input, 31, true); // i
    key(&mut input, 31, false);
    let typed = |client: &mut WaylandClient, n: usize| -> String {
        (0..n)
            .map(|_| {
                client.next_event_where("key", T, |v| {
                    v["pressed"] == true && v["utf8"].as_str().is_some_and(|s| !s.is_empty())
                })["utf8"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    assert_eq!(typed(&mut client, 2), "Hi");

    // Unicode text whatever the layout, then physical keys still follow the layout.
    input.apply(&Action::Text("é€😀ж".into())).unwrap();
    assert_eq!(typed(&mut client, 4), "é€😀ж");
    key(&mut input, 38, true); // a
    key(&mut input, 38, false);
    assert_eq!(typed(&mut client, 1), "a");
}

/// The real programs on sway: the agent finds the wlroots backend by itself (no flag), says so
/// before its code, the console's picture is what the Wayland client drew, and the console's
/// clicks and typing reach the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_with_the_real_programs_on_sway() {
    if skip() {
        return;
    }
    tandem_tests::init_logs();
    let sway = Sway::start(1280, 720);
    let mut client = WaylandClient::start(&sway);
    client.wait_drawn(1280, 720, 0, T);
    // A first move lets the headless seat gain its pointer and keyboard before the click.
    let s = tandem_tests::desktop_session(
        &sway.env(),
        "move 10 10\nwait 300\nmove 12 12\nkey Shift\nwait 300\nclick left 640 360\nwait 200\n\
         key h\nkey i\ntype ✓é\nwait 1500\n",
        6,
    )
    .await;
    assert_eq!(s.desktop["backend"], "wlroots", "{}", s.desktop);
    // What the technician saw is what the client drew.
    assert_eq!((s.seen.width, s.seen.height), (1280, 720));
    let psnr = tandem_media::luma_psnr(&pattern_frame(1280, 720, 0), &s.seen);
    assert!(
        psnr >= 35.0,
        "console picture vs the client's: {psnr:.1} dB"
    );

    // What the technician did reached the client.
    let b = client.next_event_where("button", T, |v| v["pressed"] == true);
    assert_eq!(b["button"], 0x110);
    assert!(
        (b["x"].as_f64().unwrap() - 640.0).abs() <= 1.0
            && (b["y"].as_f64().unwrap() - 360.0).abs() <= 1.0,
        "{b}"
    );
    let typed: String = (0..4)
        .map(|_| {
            client.next_event_where("key", T, |v| {
                v["pressed"] == true && v["utf8"].as_str().is_some_and(|s| !s.is_empty())
            })["utf8"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(typed, "hi✓é");
}
