//! The Wayland fixtures themselves: a headless sway, the fullscreen test client, screenshots with
//! grim. Skipped where sway is not installed (CI installs it).
#![allow(clippy::unwrap_used)]

use std::time::Duration;
use tandem_media::frame::Frame;
use tandem_tests::wayland::{Sway, WaylandClient, frame_diff, pattern_frame, sway_available};

const WAIT: Duration = Duration::from_secs(10);
/// A channel may differ this much (the pixman renderer copies XRGB8888 as is: 0 here).
const TOLERANCE: u8 = 2;

fn skip() -> bool {
    if !sway_available() {
        eprintln!("skipped: sway not installed");
        return true;
    }
    false
}

/// Ok when `seen` is `want` within the tolerance.
fn same(seen: &Frame, want: &Frame) -> Result<(), String> {
    if (seen.width, seen.height) != (want.width, want.height) {
        return Err(format!(
            "screenshot {}×{}, expected {}×{}",
            seen.width, seen.height, want.width, want.height
        ));
    }
    let d = frame_diff(seen, want, TOLERANCE);
    if d.pixels == 0 {
        Ok(())
    } else {
        Err(format!("{} pixels differ: {d:?}", d.pixels))
    }
}

fn fill(f: &mut Frame, (x, y, w, h): (u32, u32, u32, u32), (r, g, b): (u8, u8, u8)) {
    for yy in y..y + h {
        for xx in x..x + w {
            let i = yy as usize * f.stride + xx as usize * 4;
            f.data[i..i + 3].copy_from_slice(&[b, g, r]);
        }
    }
}

#[test]
fn the_fullscreen_client_shows_the_pattern_exactly() {
    if skip() {
        return;
    }
    let sway = Sway::start(1280, 720);
    assert_eq!(sway.size(), (1280, 720));
    let mut client = WaylandClient::start(&sway);
    client.wait_drawn(1280, 720, 0, WAIT);
    let want = pattern_frame(1280, 720, 0);
    sway.screenshot_until(WAIT, |f| same(f, &want));

    // A new seed redraws everything.
    client.send("seed 7");
    client.wait_drawn(1280, 720, 7, WAIT);
    let want = pattern_frame(1280, 720, 7);
    let before = pattern_frame(1280, 720, 0);
    assert!(frame_diff(&want, &before, 0).pixels > 1280 * 720 / 2);
    sway.screenshot_until(WAIT, |f| same(f, &want));
}

#[test]
fn a_rect_command_changes_only_that_rect() {
    if skip() {
        return;
    }
    let sway = Sway::start(1280, 720);
    let mut client = WaylandClient::start_with_args(&sway, &["--seed", "3"]);
    client.wait_drawn(1280, 720, 3, WAIT);
    let mut want = pattern_frame(1280, 720, 3);
    sway.screenshot_until(WAIT, |f| same(f, &want));

    client.send("rect 100 50 200 120 255 0 0");
    let ev = client.next_event("drawn_rect", WAIT);
    assert_eq!(
        (&ev["x"], &ev["y"], &ev["width"], &ev["height"]),
        (&100.into(), &50.into(), &200.into(), &120.into()),
        "{ev}"
    );
    client.next_event_where("presented", WAIT, |v| v["of"] == "drawn_rect");
    fill(&mut want, (100, 50, 200, 120), (255, 0, 0));
    sway.screenshot_until(WAIT, |f| same(f, &want));

    // A second one, reaching past the window's edge: clipped.
    client.send("rect 1200 700 500 500 0 255 0");
    let ev = client.next_event("drawn_rect", WAIT);
    assert_eq!(
        (&ev["width"], &ev["height"]),
        (&80.into(), &20.into()),
        "{ev}"
    );
    client.next_event_where("presented", WAIT, |v| v["of"] == "drawn_rect");
    fill(&mut want, (1200, 700, 80, 20), (0, 255, 0));
    sway.screenshot_until(WAIT, |f| same(f, &want));
}

#[test]
fn a_mode_change_resizes_the_fullscreen_client() {
    if skip() {
        return;
    }
    let mut sway = Sway::start(1280, 720);
    let mut client = WaylandClient::start(&sway);
    client.wait_drawn(1280, 720, 0, WAIT);
    sway.set_mode(1024, 768);
    assert_eq!(sway.size(), (1024, 768));
    client.wait_drawn(1024, 768, 0, WAIT);
    let want = pattern_frame(1024, 768, 0);
    let shot = sway.screenshot_until(WAIT, |f| same(f, &want));
    assert_eq!((shot.width, shot.height), (1024, 768));

    // And back to a wider one.
    sway.set_mode(1920, 1080);
    client.wait_drawn(1920, 1080, 0, WAIT);
    let want = pattern_frame(1920, 1080, 0);
    sway.screenshot_until(WAIT, |f| same(f, &want));
}
