//! Screen pipeline benchmark on real Xvfb captures of scripted scenes, at 1280×720 and 1920×1080:
//! per stage (capture, convert, encode, decode, to RGBA) median and p99; per scene kbit/s at 30 fps
//! and luma PSNR. Scenes are drawn by an X client between captures; encoder timestamps advance by
//! 1/30 s per frame, so rate control sees a 30 fps stream. Baseline in the same run: OpenH264's own
//! BGRA→I420 converter against the SIMD one the pipeline uses.
//!
//!     cargo bench -p tandem-tests --bench media [-- --quick]
#![allow(clippy::unwrap_used, clippy::print_literal)]

use std::time::{Duration, Instant};
use tandem_media::capture::x11::X11Capturer;
use tandem_media::{
    Capturer, I420, Target, VideoDecoder, VideoEncoder, bgrx_to_i420_changed, plane_psnr,
};
use tandem_tests::percentile;
use tandem_tests::scenes::{Scene, draw};
use tandem_tests::x11::{Painter, Xvfb};

#[derive(Default)]
struct Samples {
    capture: Vec<f64>,
    convert: Vec<f64>,
    convert_openh264: Vec<f64>,
    encode: Vec<f64>,
    decode: Vec<f64>,
    rgba: Vec<f64>,
    cap_to_bytes: Vec<f64>,
    /// Work between frames (off the path of any frame): hashing the next reference after a scroll.
    ahead: Vec<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let frames = if quick { 45 } else { 150 };
    // The target is per core: one encoder thread unless asked otherwise.
    let threads: u16 = tandem_tests::bench_arg("--threads", 1);
    println!("encoder threads: {threads}");
    // For profiling one case: `--scene scroll` (a part of the scene's name), `--height 1080`.
    let only_scene: String = tandem_tests::bench_arg("--scene", String::new());
    let only_height: u32 = tandem_tests::bench_arg("--height", 0);
    // `--no-ahead`: the encoder's work between frames is not done there (A/B of
    // `VideoEncoder::prepare_next`; the next frame then does it first).
    let ahead = !std::env::args().any(|a| a == "--no-ahead");
    println!("hash ahead between frames: {ahead}");
    let mut json_rows = vec![];
    let mut table = vec![];
    for (w, h) in [(1280u32, 720u32), (1920, 1080)] {
        if only_height != 0 && h != only_height {
            continue;
        }
        let x = Xvfb::start(w, h);
        let mut p = Painter::new(&x.display);
        let mut cap = X11Capturer::open(Some(&x.display)).unwrap();
        let mut all = Samples::default();
        for scene in [
            Scene::Idle,
            Scene::Typing,
            Scene::Scrolling,
            Scene::Dragging,
            Scene::FullMotion,
        ] {
            if !scene.name().contains(only_scene.as_str()) {
                continue;
            }
            p.page(0);
            p.sync();
            cap.request_full();
            // A session at a comfortable LAN rate; rate control and the QP ceiling follow it.
            let mut enc = VideoEncoder::new(Target {
                bitrate_bps: 4_000_000,
                max_fps: 30.0,
            })
            .unwrap();
            enc.set_threads(threads);
            let mut dec = VideoDecoder::new().unwrap();
            dec.keep_luma = true;
            let mut yuv = I420::default();
            let mut yuv_ref = openh264::formats::YUVBuffer::new(w as usize, h as usize);
            let (mut bytes_after_first, mut psnrs, mut encoded) = (0usize, vec![], 0usize);
            let mut pending = false;
            let mut skipped = 0usize;
            let (mut scene_encode, mut scene_c2b, mut scene_cap) = (vec![], vec![], vec![]);
            for i in 0..=frames {
                if i > 0 {
                    draw(&mut p, scene, i);
                }
                let t0 = Instant::now();
                let c = cap.capture().unwrap();
                let t1 = Instant::now();
                all.capture.push(ms(t1 - t0));
                if c.damage.is_empty() && !pending {
                    continue;
                }
                // As the agent's pipeline does: only the changed rows.
                bgrx_to_i420_changed(c.frame, &mut yuv, &c.damage).unwrap();
                let t2 = Instant::now();
                // The first frame (the whole page, a large keyframe) is followed by a 3 s pause before
                // the scene starts, as when a user starts typing after the technician joined, so that
                // rate control is not still paying the keyframe off during the scene.
                let ts = if i == 0 {
                    0
                } else {
                    3000 + i as u64 * 1000 / 30
                };
                let e = enc.encode_at(&yuv, ts).unwrap();
                let t3 = Instant::now();
                all.convert.push(ms(t2 - t1));
                all.encode.push(ms(t3 - t2));
                pending = e.is_none();
                let Some(e) = e else {
                    skipped += 1;
                    continue;
                };
                // Baseline: OpenH264's own converter on the same frame (after the timed stages).
                let tb = Instant::now();
                yuv_ref.read_rgb(openh264::formats::BgraSliceU8::new(
                    &c.frame.data,
                    (w as usize, h as usize),
                ));
                all.convert_openh264.push(ms(tb.elapsed()));
                all.cap_to_bytes.push(ms(t3 - t0));
                if i > 0 {
                    scene_encode.push(ms(t3 - t2));
                    scene_cap.push(ms(t1 - t0));
                    scene_c2b.push(ms(t3 - t0));
                }
                encoded += 1;
                if i > 0 {
                    bytes_after_first += e.data.len();
                }
                let td = Instant::now();
                if let Some(d) = dec.decode(&e.data).unwrap() {
                    all.decode.push(ms(td.elapsed() - dec.last_rgba_time));
                    all.rgba.push(ms(dec.last_rgba_time));
                    psnrs.push(plane_psnr(&yuv.y, d.luma.as_ref().unwrap()));
                }
                // As the agent does once the frame is sent.
                let ta = Instant::now();
                if ahead && enc.prepare_next() {
                    all.ahead.push(ms(ta.elapsed()));
                }
            }
            let kbps = bytes_after_first as f64 * 8.0 / (frames as f64 / 30.0) / 1000.0;
            let finite: Vec<f64> = psnrs.iter().copied().filter(|p| p.is_finite()).collect();
            let psnr_avg = if finite.is_empty() {
                f64::INFINITY
            } else {
                finite.iter().sum::<f64>() / finite.len() as f64
            };
            let psnr_min = finite.iter().copied().fold(f64::INFINITY, f64::min);
            table.push(format!(
                "{:>9}  {:<24} {:>10.1} {:>9.1} {:>9.1} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                format!("{w}x{h}"),
                scene.name(),
                kbps,
                psnr_avg,
                psnr_min,
                encoded,
                percentile(&scene_encode, 0.5),
                percentile(&scene_encode, 0.99),
                percentile(&scene_c2b, 0.5),
                percentile(&scene_c2b, 0.99),
                percentile(&scene_cap, 0.5),
            ));
            json_rows.push(serde_json::json!({
                "resolution": format!("{w}x{h}"), "scene": scene.name(), "kbit_s_at_30fps": kbps,
                "psnr_avg_db": if psnr_avg.is_finite() { psnr_avg } else { 99.0 },
                "psnr_min_db": if psnr_min.is_finite() { psnr_min } else { 99.0 },
                "frames_encoded": encoded, "frames_skipped_by_rate_control": skipped, "frames": frames, "qp_ceiling": enc.qp_ceiling(),
                "encode_ms": {"p50": percentile(&scene_encode, 0.5), "p99": percentile(&scene_encode, 0.99)},
                "capture_to_encoded_ms": {"p50": percentile(&scene_c2b, 0.5), "p99": percentile(&scene_c2b, 0.99)},
                "capture_ms": {"p50": percentile(&scene_cap, 0.5), "p99": percentile(&scene_cap, 0.99)},
            }));
        }
        println!(
            "\nStages at {w}x{h} (ms over all scenes; convert baseline = OpenH264's own converter)"
        );
        println!("{:<30} {:>9} {:>9} {:>7}", "stage", "median", "p99", "n");
        for (name, v) in [
            ("capture (drawn areas, MIT-SHM)", &all.capture),
            ("convert changed rows (yuv)", &all.convert),
            ("convert baseline (OpenH264)", &all.convert_openh264),
            ("encode (OpenH264)", &all.encode),
            ("decode (OpenH264)", &all.decode),
            ("I420→RGBA", &all.rgba),
            ("capture → encoded bytes", &all.cap_to_bytes),
            ("between frames: hash ahead", &all.ahead),
        ] {
            println!(
                "{:<30} {:>9.2} {:>9.2} {:>7}",
                name,
                percentile(v, 0.5),
                percentile(v, 0.99),
                v.len()
            );
        }
        println!(
            "convert speed-up over baseline: {:.2}× (median)",
            percentile(&all.convert_openh264, 0.5) / percentile(&all.convert, 0.5).max(1e-9)
        );
        json_rows.push(serde_json::json!({
            "resolution": format!("{w}x{h}"), "stages_ms": {
                "capture": {"p50": percentile(&all.capture, 0.5), "p99": percentile(&all.capture, 0.99)},
                "convert": {"p50": percentile(&all.convert, 0.5), "p99": percentile(&all.convert, 0.99)},
                "convert_openh264_baseline": {"p50": percentile(&all.convert_openh264, 0.5), "p99": percentile(&all.convert_openh264, 0.99)},
                "encode": {"p50": percentile(&all.encode, 0.5), "p99": percentile(&all.encode, 0.99)},
                "decode": {"p50": percentile(&all.decode, 0.5), "p99": percentile(&all.decode, 0.99)},
                "to_rgba": {"p50": percentile(&all.rgba, 0.5), "p99": percentile(&all.rgba, 0.99)},
                "capture_to_encoded": {"p50": percentile(&all.cap_to_bytes, 0.5), "p99": percentile(&all.cap_to_bytes, 0.99)},
                "between_frames_hash_ahead": {"p50": percentile(&all.ahead, 0.5), "p99": percentile(&all.ahead, 0.99), "n": all.ahead.len()},
            }
        }));
    }
    println!(
        "\nScenes (4 Mbit/s target, 30 fps; kbit/s after the first frame; luma PSNR of encoded frames)"
    );
    println!(
        "{:>9}  {:<24} {:>10} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "size",
        "scene",
        "kbit/s",
        "PSNR avg",
        "PSNR min",
        "frames",
        "enc p50",
        "enc p99",
        "c→b p50",
        "c→b p99"
    );
    for r in &table {
        println!("{r}");
    }
    println!(
        "targets at 1080p: capture→bytes median ≤ 20 ms; idle ≤ 1 kbit/s; typing ≤ 150 kbit/s; scrolling ≤ 1,500 kbit/s at PSNR ≥ 38 dB"
    );
    let out = serde_json::to_string_pretty(&serde_json::json!({"bench": "media", "hash_ahead": ahead, "openh264_assembly": tandem_media::openh264_has_assembly(), "rows": json_rows})).unwrap();
    println!("\n{out}");
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&target);
    let _ = std::fs::write(target.join("media.json"), &out);
}
