//! The screen pipeline under Xvfb with known content: exact capture, a private segment, change
//! detection and idle cost, encode → decode quality, cursor, resolution change, hostile bitstreams,
//! and an OpenH264 built with its assembly.
#![allow(clippy::unwrap_used)]

use std::time::Duration;
use tandem_media::capture::x11::X11Capturer;
use tandem_media::{
    Capturer, Frame, ScreenPipeline, Target, VideoDecoder, VideoEncoder, bgrx_to_i420, luma_psnr,
    rgba_to_frame,
};
use tandem_tests::x11::{Painter, Xvfb};
use x11rb::connection::Connection;
use x11rb::protocol::xproto::ConnectionExt;
use x11rb::rust_connection::RustConnection;
use x11rb::wrapper::ConnectionExt as _;

fn bgr(f: &Frame, x: u32, y: u32) -> u32 {
    let (b, g, r) = f.pixel(x, y);
    (r as u32) << 16 | (g as u32) << 8 | b as u32
}

#[test]
fn openh264_was_built_with_its_assembly() {
    // Without nasm OpenH264 silently builds a ~3x slower encoder; this must never ship.
    let _ = VideoEncoder::new(Target::default()).unwrap();
    assert!(
        tandem_media::openh264_has_assembly(),
        "OpenH264 was compiled without nasm: install nasm (scripts/deps.sh) and rebuild"
    );
}

#[test]
fn captured_frame_equals_what_was_drawn() {
    let x = Xvfb::start(640, 480);
    let p = Painter::new(&x.display);
    p.fill(0x000000, 0, 0, 640, 480);
    p.fill(0xff0000, 10, 10, 50, 40);
    p.fill(0x00ff00, 600, 400, 40, 80);
    p.fill(0x1234ab, 320, 0, 1, 480);
    p.sync();
    let mut c = X11Capturer::open(Some(&x.display)).unwrap();
    assert!(c.uses_shm(), "Xvfb offers MIT-SHM 1.2");
    let cap = c.capture().unwrap();
    let f = cap.frame;
    assert_eq!((f.width, f.height), (640, 480));
    assert_eq!(bgr(f, 10, 10), 0xff0000);
    assert_eq!(bgr(f, 59, 49), 0xff0000);
    assert_eq!(bgr(f, 60, 50), 0x000000);
    assert_eq!(bgr(f, 639, 479), 0x00ff00);
    assert_eq!(bgr(f, 320, 200), 0x1234ab);
    assert_eq!(bgr(f, 321, 200), 0x000000);
    let mons = c.monitors();
    assert!(!mons.is_empty());
    assert_eq!((mons[0].width, mons[0].height), (640, 480));
}

#[test]
fn shared_memory_segment_is_private_to_this_process() {
    let before = std::process::Command::new("ipcs")
        .arg("-m")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    let x = Xvfb::start(320, 240);
    let mut c = X11Capturer::open(Some(&x.display)).unwrap();
    c.capture().unwrap();
    assert!(c.uses_shm());
    // No System V segment was created (nothing any local user could attach to) …
    let after = std::process::Command::new("ipcs")
        .arg("-m")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    assert_eq!(before, after, "a System V segment appeared");
    // … and the mapping is of an anonymous or unlinked file: reachable only through our descriptor.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let size = 320 * 240 * 4;
    let seg: Vec<&str> = maps
        .lines()
        .filter(|l| {
            let range = l.split_whitespace().next().unwrap_or("");
            let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
            let len =
                u64::from_str_radix(b, 16).unwrap_or(0) - u64::from_str_radix(a, 16).unwrap_or(0);
            len == size && l.contains('/')
        })
        .collect();
    assert!(
        !seg.is_empty(),
        "segment mapping not found in /proc/self/maps"
    );
    for l in seg {
        let path = l.split_whitespace().skip(5).collect::<Vec<_>>().join(" ");
        assert!(
            path.starts_with("/memfd:") || path.ends_with("(deleted)"),
            "segment backed by a named file: {path}"
        );
        assert!(
            l.split_whitespace().nth(1).unwrap().starts_with("r-"),
            "mapped writable: {l}"
        );
    }
}

#[test]
fn changes_are_detected_and_an_idle_screen_encodes_nothing() {
    let x = Xvfb::start(640, 480);
    let mut p = Painter::new(&x.display);
    p.page(0);
    p.sync();
    let c = X11Capturer::open(Some(&x.display)).unwrap();
    let mut pipe = ScreenPipeline::new(c, Target::default()).unwrap();
    let first = pipe.step().unwrap();
    assert!(first.encoded.as_ref().unwrap().keyframe);
    assert_eq!(first.changed_pixels, 640 * 480);
    for _ in 0..20 {
        let s = pipe.step().unwrap();
        assert_eq!(s.changed_pixels, 0);
        assert!(s.encoded.is_none(), "an idle screen must cost nothing");
    }
    // Typing one character: one tile changes.
    p.fill(0x000000, 100, 100, 6, 10);
    p.sync();
    let cap = pipe.capturer.capture().unwrap();
    assert!(
        cap.damage
            .iter()
            .any(|r| r.contains(100, 100) && r.contains(105, 109))
    );
    let area: u64 = cap.damage.iter().map(|r| r.area()).sum();
    assert!(area <= 64 * 64 * 2, "damage {area} px for a 6x10 change");
}

#[test]
fn encode_decode_round_trip_keeps_quality() {
    let x = Xvfb::start(1280, 720);
    let mut p = Painter::new(&x.display);
    p.page(0);
    p.sync();
    let mut c = X11Capturer::open(Some(&x.display)).unwrap();
    let captured = c.capture().unwrap().frame.clone();
    let mut enc = VideoEncoder::new(Target {
        bitrate_bps: 8_000_000,
        max_fps: 30.0,
    })
    .unwrap();
    let mut dec = VideoDecoder::new().unwrap();
    dec.keep_luma = true;
    let mut yuv = tandem_media::I420::default();
    bgrx_to_i420(&captured, &mut yuv).unwrap();
    let mut last = None;
    // A keyframe; then the same picture again (P-frames of a still screen change nothing).
    for _ in 0..3 {
        if let Some(e) = enc.encode(&yuv).unwrap() {
            if let Some(d) = dec.decode(&e.data).unwrap() {
                eprintln!(
                    "frame {} bytes key {} psnr {:.1}",
                    e.data.len(),
                    e.keyframe,
                    tandem_media::plane_psnr(&yuv.y, d.luma.as_ref().unwrap())
                );
                last = Some(d);
            }
        } else {
            eprintln!("skipped");
        }
    }
    let d = last.expect("decoded a frame");
    assert_eq!((d.width, d.height), (1280, 720));
    // Luma PSNR: the encoder's Y plane against the decoder's.
    let psnr = tandem_media::plane_psnr(&yuv.y, d.luma.as_ref().unwrap());
    // And the picture as a person sees it (RGB, including 4:2:0 chroma loss), for information.
    let rgb = luma_psnr(&captured, &rgba_to_frame(d.width, d.height, &d.rgba));
    eprintln!("luma PSNR {psnr:.1} dB (RGB-derived {rgb:.1} dB)");
    assert!(psnr >= 38.0, "luma PSNR {psnr:.1} dB < 38");
}

#[test]
fn cursor_position_and_shape_are_reported() {
    let x = Xvfb::start(640, 480);
    let (conn, n) = RustConnection::connect(Some(&x.display)).unwrap();
    let root = conn.setup().roots[n].root;
    conn.warp_pointer(x11rb::NONE, root, 0, 0, 0, 0, 123, 45)
        .unwrap();
    conn.sync().unwrap();
    let mut c = X11Capturer::open(Some(&x.display)).unwrap();
    let cap = c.capture().unwrap();
    assert_eq!((cap.cursor.x, cap.cursor.y), (123, 45));
    assert!(cap.cursor.visible);
    let shape = cap
        .cursor
        .shape
        .clone()
        .expect("first capture carries the cursor shape");
    assert!(shape.width > 0 && shape.height > 0);
    assert_eq!(shape.rgba.len(), (shape.width * shape.height * 4) as usize);
    // The shape is not resent while it does not change.
    conn.warp_pointer(x11rb::NONE, root, 0, 0, 0, 0, 300, 200)
        .unwrap();
    conn.sync().unwrap();
    let cap = c.capture().unwrap();
    assert_eq!((cap.cursor.x, cap.cursor.y), (300, 200));
    assert!(cap.cursor.shape.is_none());
}

#[test]
fn resolution_change_is_followed_without_restart() {
    let x = Xvfb::start(1280, 800);
    let mut c = X11Capturer::open(Some(&x.display)).unwrap();
    assert_eq!(c.capture().unwrap().frame.width, 1280);
    let out = std::process::Command::new("xrandr")
        .args(["--display", &x.display, "--fb", "1024x768"])
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "this X server does not allow resizing; skipped: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let mut seen = None;
    for _ in 0..100 {
        let cap = c.capture().unwrap();
        if cap.frame.width == 1024 {
            seen = Some((cap.frame.height, cap.resized, cap.damage.len()));
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (h, resized, damage) = seen.expect("capture did not follow the new resolution");
    assert_eq!(h, 768);
    assert!(resized);
    assert!(damage > 0, "a resize reports the whole frame");
}

#[test]
fn hostile_bitstreams_give_errors_not_panics() {
    let mut dec = VideoDecoder::new().unwrap();
    let mut s: u64 = 0x1234_5678;
    for len in [0usize, 1, 3, 4, 5, 17, 100, 1000, 5000] {
        for _ in 0..20 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    s as u8
                })
                .collect();
            let _ = dec.decode(&bytes);
            // With an Annex B start code in front too.
            let mut nal = vec![0, 0, 0, 1];
            nal.extend_from_slice(&bytes);
            let _ = dec.decode(&nal);
        }
    }
    // A real stream, truncated and bit-flipped, then a keyframe: the decoder recovers.
    let mut frame = Frame::new(320, 240);
    for (i, b) in frame.data.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let mut yuv = tandem_media::I420::default();
    bgrx_to_i420(&frame, &mut yuv).unwrap();
    let mut enc = VideoEncoder::new(Target::default()).unwrap();
    let key = enc.encode(&yuv).unwrap().unwrap();
    let _ = dec.decode(&key.data[..key.data.len() / 2]);
    let mut flipped = key.data.clone();
    for i in (10..flipped.len()).step_by(37) {
        flipped[i] ^= 0x55;
    }
    let _ = dec.decode(&flipped);
    let mut dec2 = VideoDecoder::new().unwrap();
    enc.request_keyframe();
    let key2 = enc.encode(&yuv).unwrap().unwrap();
    assert!(key2.keyframe);
    assert!(dec2.decode(&key2.data).unwrap().is_some());
}

/// XDamage: the capturer sleeps until something is drawn (the agent then captures at once instead
/// of on its next tick), and an idle screen lets it sleep the whole timeout.
#[test]
fn drawing_wakes_the_capturer_and_an_idle_screen_does_not() {
    let x = Xvfb::start(320, 240);
    let mut c = X11Capturer::open(Some(&x.display)).unwrap();
    c.capture().unwrap();
    let t = std::time::Instant::now();
    assert!(!c.wait_for_change(Duration::from_millis(200)));
    assert!(t.elapsed() >= Duration::from_millis(190));
    let display = x.display.clone();
    let painter = std::thread::spawn(move || {
        let p = Painter::new(&display);
        std::thread::sleep(Duration::from_millis(50));
        p.fill(0xff0000, 10, 10, 20, 20);
        p.sync();
    });
    let t = std::time::Instant::now();
    assert!(c.wait_for_change(Duration::from_secs(10)));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    painter.join().unwrap();
    // The change is in the next capture, and after it the damage is re-armed.
    assert!(!c.capture().unwrap().damage.is_empty());
    assert!(!c.wait_for_change(Duration::from_millis(100)));
}

/// XDamage reports every drawing, not only the first since the last capture: the capturer waits
/// until the drawing stops, so it must see each part, including a part drawn over an area already
/// drawn (text on a field just cleared), which adds no new area; and the capture that follows has
/// the last part.
#[test]
fn every_drawing_is_reported_even_over_an_area_already_drawn() {
    let x = Xvfb::start(320, 240);
    let mut c = X11Capturer::open(Some(&x.display)).unwrap();
    c.capture().unwrap();
    let before = c.drawing_reports();
    let p = Painter::new(&x.display);
    p.fill(0xffffff, 10, 10, 40, 20);
    p.sync();
    p.fill(0x000000, 20, 15, 10, 10);
    p.sync();
    // The reports reach the capturer in their own time (a busy machine may deliver the second
    // later than the wait lasts): wait for both, up to a deadline.
    let t = std::time::Instant::now();
    while c.drawing_reports() - before < 2 && t.elapsed() < Duration::from_secs(5) {
        c.wait_for_change(Duration::from_millis(50));
    }
    assert_eq!(c.drawing_reports() - before, 2, "one report per drawing");
    let cap = c.capture().unwrap();
    assert!(
        cap.damage
            .iter()
            .any(|r| r.x <= 25 && 25 < r.x + r.w && r.y <= 20 && 20 < r.y + r.h),
        "{:?}",
        cap.damage
    );
    let f = cap.frame;
    let px = &f.data[20 * f.stride + 25 * 4..][..3];
    assert_eq!(px, [0, 0, 0], "the part drawn last is in the capture");
    assert!(!c.wait_for_change(Duration::from_millis(100)));
}

/// With XDamage and XFixes the capturer reads only what was drawn — on the root window and in a
/// client's window — and the frame it keeps is still exactly the screen (compared with a full read
/// by a second capturer); an idle screen reads nothing.
#[test]
fn only_drawn_areas_are_read_and_the_frame_stays_exact() {
    use x11rb::protocol::xproto::{CreateWindowAux, Rectangle, WindowClass};
    let x = Xvfb::start(640, 480);
    let mut p = Painter::new(&x.display);
    p.page(0);
    p.sync();
    let mut c = X11Capturer::open(Some(&x.display)).unwrap();
    c.capture().unwrap();
    assert_eq!(
        c.last_read_pixels(),
        640 * 480,
        "the first capture reads everything"
    );
    c.capture().unwrap();
    assert_eq!(c.last_read_pixels(), 0, "idle: nothing read");
    // A client window mapped over the page, then drawn into.
    let win = p.conn.generate_id().unwrap();
    p.conn
        .create_window(
            0,
            win,
            p.root,
            300,
            200,
            120,
            90,
            0,
            WindowClass::INPUT_OUTPUT,
            0,
            &CreateWindowAux::new().background_pixel(0x3060a0),
        )
        .unwrap();
    p.conn.map_window(win).unwrap();
    p.sync();
    let cap = c.capture().unwrap();
    assert!(!cap.damage.is_empty());
    assert!(
        c.last_read_pixels() <= 200 * 200,
        "{}",
        c.last_read_pixels()
    );
    let rect = |x, y, w, h| Rectangle {
        x,
        y,
        width: w,
        height: h,
    };
    p.conn
        .change_gc(
            p.gc,
            &x11rb::protocol::xproto::ChangeGCAux::new().foreground(0xffee00),
        )
        .unwrap();
    p.conn
        .poly_fill_rectangle(win, p.gc, &[rect(10, 10, 30, 20)])
        .unwrap();
    p.fill(0xcc0000, 5, 470, 40, 6);
    p.text(500, 20, "typed");
    p.sync();
    let cap = c.capture().unwrap();
    let changed: u64 = cap.damage.iter().map(|r| r.area()).sum();
    assert!(changed > 0);
    let read = c.last_read_pixels();
    assert!(read > 0 && read < 640 * 480 / 10, "read {read} pixels");
    let ours = c.capture().unwrap().frame.clone();
    let mut fresh = X11Capturer::open(Some(&x.display)).unwrap();
    let truth = fresh.capture().unwrap().frame.clone();
    assert_eq!(bgr(&truth, 320, 220), 0xffee00, "drawn in the window");
    assert_eq!(bgr(&truth, 10, 472), 0xcc0000);
    assert!(
        ours == truth,
        "the incrementally read frame differs from the screen"
    );
}
