//! The session banner on a real X server (its own Xvfb): it is red with white text, stays on top
//! of a window raised over it, lets clicks through, follows `set_text`, and goes away when dropped.

// Test code: a failed X request is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tandem_host::banner::{BANNER_HEIGHT, BANNER_RGB, Banner, BannerError};
use x11rb::connection::Connection;
use x11rb::protocol::Event;
use x11rb::protocol::xproto::{
    ConfigureWindowAux, ConnectionExt as _, CreateWindowAux, EventMask, ImageFormat, StackMode,
    Window, WindowClass,
};
use x11rb::protocol::xtest::ConnectionExt as _;
use x11rb::rust_connection::RustConnection;

const WIDTH: u16 = 640;
const HEIGHT: u16 = 200;
const WHITE: u32 = 0xFF_FF_FF;
const GREEN: u32 = 0x00_C0_00;

/// An Xvfb on a free display in 970..999, killed when dropped (also when the test panics).
struct Xvfb {
    child: Child,
    display: String,
}

impl Xvfb {
    fn start() -> Xvfb {
        let offset = std::process::id() % 30;
        for i in 0..30 {
            let n = 970 + (offset + i) % 30;
            if Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
                || Path::new(&format!("/tmp/.X{n}-lock")).exists()
            {
                continue;
            }
            let mut child = Command::new("/usr/bin/Xvfb")
                .arg(format!(":{n}"))
                .args(["-screen", "0", &format!("{WIDTH}x{HEIGHT}x24")])
                .args(["-nolisten", "tcp", "-noreset"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("cannot start /usr/bin/Xvfb");
            let display = format!(":{n}");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the display was taken meanwhile: try the next one
                }
                if Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
                    && RustConnection::connect(Some(&display)).is_ok()
                {
                    return Xvfb { child, display };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start Xvfb on any display in :970..:999");
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The top `rows` rows of the screen as 0xRRGGBB.
fn grab(conn: &RustConnection, root: Window, rows: u16) -> Vec<u32> {
    let reply = conn
        .get_image(ImageFormat::Z_PIXMAP, root, 0, 0, WIDTH, rows, !0)
        .unwrap()
        .reply()
        .unwrap();
    assert_eq!(reply.depth, 24);
    let pixels = usize::from(WIDTH) * usize::from(rows);
    assert_eq!(reply.data.len(), pixels * 4, "expected 32 bits per pixel");
    let little = conn.setup().image_byte_order == x11rb::protocol::xproto::ImageOrder::LSB_FIRST;
    reply
        .data
        .chunks_exact(4)
        .map(|p| {
            let b = [p[0], p[1], p[2], p[3]];
            let v = if little {
                u32::from_le_bytes(b)
            } else {
                u32::from_be_bytes(b)
            };
            v & 0xFF_FF_FF
        })
        .collect()
}

fn share(pixels: &[u32], colour: u32) -> f64 {
    pixels.iter().filter(|&&p| p == colour).count() as f64 / pixels.len() as f64
}

fn count(pixels: &[u32], colour: u32) -> usize {
    pixels.iter().filter(|&&p| p == colour).count()
}

/// Polls `cond` on the banner strip for up to `timeout`; returns the last grab and whether it held.
fn wait_for(
    conn: &RustConnection,
    root: Window,
    timeout: Duration,
    cond: impl Fn(&[u32]) -> bool,
) -> (Vec<u32>, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let px = grab(conn, root, BANNER_HEIGHT);
        if cond(&px) {
            return (px, true);
        }
        if Instant::now() >= deadline {
            return (px, false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_banner(px: &[u32]) -> bool {
    share(px, BANNER_RGB) > 0.6 && count(px, WHITE) > 20
}

#[test]
fn banner_stays_on_top_lets_clicks_through_and_goes_away() {
    let started = Instant::now();
    let x = Xvfb::start();
    let (conn, screen_num) = RustConnection::connect(Some(&x.display)).unwrap();
    let root = conn.setup().roots[screen_num].root;

    let banner = Banner::show(
        Some(&x.display),
        "Remote session: alice — ACME IT (verified), view only",
    )
    .unwrap();
    assert!(banner.is_active());

    // Red with white text, right away (show returns once drawn), and only BANNER_HEIGHT high.
    let px = grab(&conn, root, BANNER_HEIGHT);
    assert!(
        share(&px, BANNER_RGB) > 0.6,
        "top rows are {:.0} % banner red",
        share(&px, BANNER_RGB) * 100.0
    );
    let white = count(&px, WHITE);
    assert!(white > 20, "only {white} white pixels: no text drawn");
    assert!(
        share(&px, BANNER_RGB) + share(&px, WHITE) > 0.99,
        "the bar has other colours than red and white"
    );
    let below = grab(&conn, root, BANNER_HEIGHT + 8);
    let below = &below[usize::from(WIDTH) * usize::from(BANNER_HEIGHT + 2)..];
    assert!(
        share(below, BANNER_RGB) < 0.01,
        "the bar is higher than BANNER_HEIGHT"
    );
    let first_text = px;

    // A window at y = 0, raised over the banner: the banner must come back on top.
    let other = conn.generate_id().unwrap();
    conn.create_window(
        x11rb::COPY_DEPTH_FROM_PARENT,
        other,
        root,
        0,
        0,
        WIDTH,
        100,
        0,
        WindowClass::INPUT_OUTPUT,
        x11rb::COPY_FROM_PARENT,
        &CreateWindowAux::new()
            .background_pixel(GREEN)
            .override_redirect(1)
            .event_mask(EventMask::BUTTON_PRESS),
    )
    .unwrap()
    .check()
    .unwrap();
    conn.map_window(other).unwrap();
    conn.configure_window(
        other,
        &ConfigureWindowAux::new().stack_mode(StackMode::ABOVE),
    )
    .unwrap();
    conn.sync_now();
    let raised_at = Instant::now();
    let (px, ok) = wait_for(&conn, root, Duration::from_millis(1500), is_banner);
    assert!(
        ok,
        "the banner did not come back on top within 1.5 s: {:.0} % red, {:.0} % green",
        share(&px, BANNER_RGB) * 100.0,
        share(&px, GREEN) * 100.0
    );
    eprintln!("banner back on top after {:?}", raised_at.elapsed());
    // The other window is mapped and visible below the bar.
    let rows = grab(&conn, root, 60);
    assert!(share(&rows[usize::from(WIDTH) * 40..], GREEN) > 0.99);

    // Clicks in the strip go through the banner to the window below it.
    conn.xtest_fake_input(6, 0, 0, root, 100, 5, 0).unwrap(); // MotionNotify
    conn.xtest_fake_input(4, 1, 0, root, 0, 0, 0).unwrap(); // ButtonPress 1
    conn.xtest_fake_input(5, 1, 0, root, 0, 0, 0).unwrap(); // ButtonRelease 1
    conn.sync_now();
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut clicked = false;
    while !clicked && Instant::now() < deadline {
        while let Some(ev) = conn.poll_for_event().unwrap() {
            if let Event::ButtonPress(b) = ev {
                clicked |= b.event == other && b.event_y < BANNER_HEIGHT as i16;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        clicked,
        "a click on the banner did not reach the window below"
    );

    // New text: different pixels, still a banner.
    banner.set_text("Remote session: bob — full control");
    let (px, ok) = wait_for(&conn, root, Duration::from_secs(1), |px| {
        is_banner(px) && px != first_text.as_slice()
    });
    assert!(ok, "set_text did not change the banner");
    assert_ne!(px, first_text);

    // Dropped: the strip shows the window below (green), no more red.
    drop(banner);
    let (px, ok) = wait_for(&conn, root, Duration::from_secs(1), |px| {
        share(px, BANNER_RGB) < 0.01
    });
    assert!(
        ok,
        "the banner is still there after drop: {:.0} % red",
        share(&px, BANNER_RGB) * 100.0
    );
    assert!(share(&px, GREEN) > 0.99);
    eprintln!("banner test took {:?}", started.elapsed());
}

#[test]
fn banner_on_a_missing_display_is_a_clear_error() {
    let err = Banner::show(Some(":9876"), "x").unwrap_err();
    assert!(matches!(err, BannerError::Connect { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("cannot open the X display :9876 to show the session banner: "),
        "{msg}"
    );
}

/// `sync` from x11rb's wrapper, as a helper that panics (test code).
trait SyncNow {
    fn sync_now(&self);
}

impl SyncNow for RustConnection {
    fn sync_now(&self) {
        self.get_input_focus().unwrap().reply().unwrap();
    }
}
