//! Whole-session performance: the real relay and agent (release processes) and a console in this
//! process, on one machine, one clock. Scenes are drawn on an Xvfb screen by an X client together
//! with a 16-bit frame counter (a barcode in the top-right corner); the console decodes each frame
//! and reads the counter back, so glass-to-glass latency is "the moment frame N was drawn" to "the
//! moment the console has frame N decoded and ready to show".
//!
//! In the same run, the compute floor: capture → convert → encode → decode of the same scene in
//! this process with no network and no frame pacing; the report gives latency ÷ floor.
//!
//! Also per scene: kbit/s, delivered fps, luma PSNR (from the floor pass); join → first frame; relay
//! CPU per Mbit/s; with `--creep-minutes M` a long typing session reporting its first and last
//! minute. Table on stdout, JSON in `target/bench/glass.json`.
//!
//!     cargo bench -p tandem-tests --bench glass [-- --seconds 10 --width 1920 --height 1080 --creep-minutes 10 --scene drag,motion --trace 30 --slow 40 --transports quic,tcp,udp-dropped]
//!
//! `--scene` keeps the scenes whose names contain any of its comma-separated words. `--transports`
//! runs one whole session (a fresh agent, join, every scene) per entry, in order, and reports each,
//! with ratios of every transport's glass-to-glass against QUIC's.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem_certs::RelayTrust;
use tandem_client::ConnectOptions;
use tandem_media::capture::Capturer;
use tandem_media::capture::x11::X11Capturer;
use tandem_media::{ScreenPipeline, Target, VideoDecoder, luma_psnr};
use tandem_proto::Secret;
use tandem_session::{ControlMsg, SessionCode};
use tandem_tests::scenes::{Scene, draw, draw_counter, read_counter};
use tandem_tests::x11::{Painter, Xvfb};
use tandem_tests::{RelayProcess, bench_arg, percentile, write_bench_json};

struct Args {
    seconds: f64,
    width: u32,
    height: u32,
    creep_minutes: f64,
    /// Only the scenes whose name contains one of these comma-separated words (all by default).
    scene: String,
    /// Print the first this many frames of each scene (glass ms, size) to stderr.
    trace: usize,
    /// Also print every later frame slower than this many ms (0: none), to see what a p99 is.
    slow: f64,
    /// How agent and console reach the relay, one whole session each, in this order (repeat a
    /// name to interleave): `quic`, `tcp` (TLS over TCP), `udp-dropped` (automatic, with the
    /// relay's UDP address silently dropping everything, so the race has to find TCP),
    /// `quic+file` (QUIC, with files moving from the console to the agent all the while).
    transports: Vec<String>,
}

fn args() -> Args {
    Args {
        seconds: bench_arg("--seconds", 10.0),
        width: bench_arg("--width", 1920),
        height: bench_arg("--height", 1080),
        creep_minutes: bench_arg("--creep-minutes", 0.0),
        scene: bench_arg("--scene", String::new()),
        trace: bench_arg("--trace", 0),
        slow: bench_arg("--slow", 0.0),
        transports: bench_arg("--transports", "quic".to_string())
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect(),
    }
}

/// When each counter value was drawn.
#[derive(Default)]
struct Drawn {
    at: Mutex<HashMap<u32, Instant>>,
}

/// Draws `scene` at 30 fps with the counter until `stop`; counter values continue from `next`.
fn painter(
    display: String,
    scene: Scene,
    next: Arc<AtomicU32>,
    drawn: Arc<Drawn>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut p = Painter::new(&display);
        let mut i = 0;
        let tick = Duration::from_secs_f64(1.0 / 30.0);
        let mut due = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            draw(&mut p, scene, i);
            if scene != Scene::Idle {
                let n = next.fetch_add(1, Ordering::Relaxed) & 0xffff;
                draw_counter(&p, n);
                p.sync();
                drawn.at.lock().unwrap().insert(n, Instant::now());
            }
            i += 1;
            due += tick;
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
    })
}

/// The compute floor of a scene: draw, then at once capture → convert → encode → decode, in this
/// process; returns (latency ms per frame, luma PSNR per frame, share of frames at half
/// resolution).
fn floor(
    display: &str,
    scene: Scene,
    frames: usize,
    next: &AtomicU32,
) -> (Vec<f64>, Vec<f64>, f64) {
    let mut p = Painter::new(display);
    p.page(0);
    p.sync();
    let cap = X11Capturer::open(Some(display)).unwrap();
    let mut pipe = ScreenPipeline::new(
        cap,
        Target {
            bitrate_bps: 8_000_000,
            max_fps: 30.0,
        },
    )
    .unwrap();
    let mut dec = VideoDecoder::new().unwrap();
    // The truth for PSNR: the same screen, captured after the frame was timed (it is unchanged
    // until the next draw).
    let mut truth_cap = X11Capturer::open(Some(display)).unwrap();
    let (mut lat, mut psnr) = (vec![], vec![]);
    let mut halved = 0usize;
    for i in 0..frames {
        draw(&mut p, scene, i);
        let n = next.fetch_add(1, Ordering::Relaxed) & 0xffff;
        draw_counter(&p, n);
        p.sync();
        let t = Instant::now();
        let step = pipe.step().unwrap();
        if let Some(e) = step.encoded
            && let Ok(Some(f)) = dec.decode(&e.data)
        {
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            let truth = truth_cap.capture().unwrap().frame;
            let seen = tandem_media::rgba_to_frame(f.width, f.height, &f.rgba);
            if truth.width == seen.width {
                psnr.push(luma_psnr(truth, &seen));
            } else {
                halved += 1;
            }
        }
        // As the agent does once a frame is sent (untimed: the next draw waits for it).
        pipe.prepare_next();
        std::thread::sleep(Duration::from_millis(33));
    }
    let share = halved as f64 / lat.len().max(1) as f64;
    (lat, psnr, share)
}

struct SceneResult {
    scene: Scene,
    glass: Vec<f64>,
    fps: f64,
    kbps: f64,
    floor: Vec<f64>,
    psnr: Vec<f64>,
    /// Share of delivered frames at half resolution (the agent's pipeline halves the picture when
    /// the path or its own CPU cannot keep up), in the session and in the floor pass.
    halved: f64,
    floor_halved: f64,
    /// The agent's median capture → encoded time at the end of the scene.
    agent_ms: f64,
}

fn main() {
    let a = args();
    tandem_tests::bench_main(run(a));
}

async fn run(a: Args) {
    let dir = tempfile::tempdir().unwrap();
    let (relay, token) = tandem_tests::bench_relay(dir.path(), &[]).await;
    let x = Xvfb::start(a.width, a.height);
    Painter::new(&x.display).page(0);

    let next = Arc::new(AtomicU32::new(1));
    let mut passes: Vec<Pass> = vec![];
    let mut relay_cpu = 0.0;
    let mut total_bytes = 0u64;
    let mut creep = None;
    for (i, t) in a.transports.clone().iter().enumerate() {
        let cpu0 = relay.cpu_seconds().unwrap_or(0.0);
        let p = pass(&a, dir.path(), &relay, &token, &x, &next, t, i == 0).await;
        relay_cpu += relay.cpu_seconds().unwrap_or(0.0) - cpu0;
        total_bytes += p.bytes;
        if p.creep.is_some() {
            creep = p.creep.clone();
        }
        passes.push(p);
    }
    let relay_mbit_per_cpu_s = total_bytes as f64 * 8.0 / 1e6 / relay_cpu.max(1e-9);

    // ---- the floor, same scenes, same screen, no network ----
    let mut floors: HashMap<&'static str, (Vec<f64>, Vec<f64>, f64)> = HashMap::new();
    for r in passes.iter().flat_map(|p| p.results.iter()) {
        if r.scene == Scene::Idle || floors.contains_key(r.scene.name()) {
            continue;
        }
        let frames = (a.seconds * 30.0 / 2.0) as usize;
        floors.insert(
            r.scene.name(),
            floor(&x.display, r.scene, frames.max(30), &next),
        );
    }
    for r in passes.iter_mut().flat_map(|p| p.results.iter_mut()) {
        if let Some((lat, psnr, halved)) = floors.get(r.scene.name()) {
            r.floor = lat.clone();
            r.psnr = psnr.clone();
            r.floor_halved = *halved;
        }
    }
    // ---- report ----
    println!();
    println!(
        "Tandem glass-to-glass at {}x{} ({} cores; relay and agent as release processes, console in this process)",
        a.width,
        a.height,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let mut pass_json = vec![];
    for p in &passes {
        println!();
        println!(
            "transport {}: join → first decoded frame {:.0} ms (target ≤ 300 on QUIC, ≤ 1000 with UDP dropped); links: console {}, agent {}",
            p.transport, p.first_frame_ms, p.console_link, p.agent_link
        );
        if let Some(mb) = p.file_mb_s {
            println!("files moved to the agent during these scenes: {mb:.1} MB/s");
        }
        println!(
            "{:<24} {:>9} {:>9} {:>10} {:>10} {:>7} {:>8} {:>7} {:>9} {:>11} {:>9}",
            "scene",
            "g2g p50",
            "g2g p99",
            "floor p50",
            "floor p99",
            "ratio",
            "kbit/s",
            "fps",
            "PSNR dB",
            "half-res %",
            "agent c→e"
        );
        let mut rows = vec![];
        for r in &p.results {
            let (g50, g99) = (percentile(&r.glass, 0.5), percentile(&r.glass, 0.99));
            let (f50, f99) = (percentile(&r.floor, 0.5), percentile(&r.floor, 0.99));
            let psnr = percentile(&r.psnr, 0.5);
            println!(
                "{:<24} {:>9.1} {:>9.1} {:>10.1} {:>10.1} {:>7.2} {:>8.0} {:>7.1} {:>9.1} {:>5.0} / {:<3.0} {:>9.1}",
                r.scene.name(),
                g50,
                g99,
                f50,
                f99,
                g50 / f50,
                r.kbps,
                r.fps,
                psnr,
                r.halved * 100.0,
                r.floor_halved * 100.0,
                r.agent_ms,
            );
            rows.push(
                serde_json::json!({"scene": r.scene.name(), "glass_p50_ms": g50, "glass_p99_ms": g99,
                "floor_p50_ms": f50, "floor_p99_ms": f99, "ratio_p50": g50 / f50, "kbit_s": r.kbps,
                "fps": r.fps, "psnr_db": psnr, "frames_measured": r.glass.len(),
                "half_resolution_share": r.halved, "floor_half_resolution_share": r.floor_halved,
                "agent_capture_to_encoded_p50_ms": r.agent_ms}),
            );
        }
        pass_json.push(serde_json::json!({"transport": p.transport,
            "join_to_first_frame_ms": p.first_frame_ms, "console_link": p.console_link,
            "agent_link": p.agent_link, "file_mb_s": p.file_mb_s, "scenes": rows}));
    }
    // Every other transport against QUIC in the same run, scene by scene, with the samples of all
    // passes of a transport pooled (the passes interleave, so machine noise hits each alike).
    let pooled = |t: &str, scene: Scene| -> Vec<f64> {
        passes
            .iter()
            .filter(|p| p.transport == t)
            .flat_map(|p| p.results.iter())
            .filter(|r| r.scene == scene)
            .flat_map(|r| r.glass.iter().copied())
            .collect()
    };
    let mut ratios = vec![];
    let mut others: Vec<&str> = passes
        .iter()
        .map(|p| p.transport.as_str())
        .filter(|t| *t != "quic")
        .collect();
    others.dedup();
    others.sort_unstable();
    others.dedup();
    let scenes: Vec<Scene> = passes
        .first()
        .map(|p| p.results.iter().map(|r| r.scene).collect())
        .unwrap_or_default();
    for t in others {
        println!();
        println!("{t} ÷ quic (same run, all passes pooled):");
        for &scene in &scenes {
            let (q, o) = (pooled("quic", scene), pooled(t, scene));
            if q.is_empty() || o.is_empty() {
                continue;
            }
            let (q50, q99, o50, o99) = (
                percentile(&q, 0.5),
                percentile(&q, 0.99),
                percentile(&o, 0.5),
                percentile(&o, 0.99),
            );
            println!(
                "  {:<22} glass-to-glass p50 {o50:.1} vs {q50:.1} ms ×{:.2}, p99 {o99:.1} vs {q99:.1} ms ×{:.2} (target ≤ 1.2)",
                scene.name(),
                o50 / q50,
                o99 / q99
            );
            ratios.push(serde_json::json!({"transport": t, "scene": scene.name(),
                "glass_p50_ms": o50, "glass_p99_ms": o99, "quic_p50_ms": q50, "quic_p99_ms": q99,
                "glass_p50_ratio": o50 / q50, "glass_p99_ratio": o99 / q99,
                "frames": o.len(), "quic_frames": q.len()}));
        }
    }
    println!("relay: {relay_mbit_per_cpu_s:.0} Mbit/s forwarded per relay CPU-second");
    let mut creep_json = serde_json::Value::Null;
    if let Some((first, last)) = &creep {
        println!(
            "creep ({} min typing): first minute p50 {:.1} / p99 {:.1} ms, last minute p50 {:.1} / p99 {:.1} ms",
            a.creep_minutes,
            percentile(first, 0.5),
            percentile(first, 0.99),
            percentile(last, 0.5),
            percentile(last, 0.99)
        );
        creep_json = serde_json::json!({"minutes": a.creep_minutes,
            "first_p50_ms": percentile(first, 0.5), "first_p99_ms": percentile(first, 0.99),
            "last_p50_ms": percentile(last, 0.5), "last_p99_ms": percentile(last, 0.99)});
    }
    let first = passes.first();
    let json = serde_json::json!({"width": a.width, "height": a.height, "seconds_per_scene": a.seconds,
        "join_to_first_frame_ms": first.map(|p| p.first_frame_ms),
        "scenes": pass_json.first().map(|p| p["scenes"].clone()),
        "transports": pass_json, "ratios_vs_quic": ratios,
        "relay_mbit_per_cpu_second": relay_mbit_per_cpu_s, "creep": creep_json});
    write_bench_json("glass", &json);
    relay.terminate().await;
}

/// One whole session over one transport.
struct Pass {
    transport: String,
    first_frame_ms: f64,
    results: Vec<SceneResult>,
    bytes: u64,
    creep: Option<(Vec<f64>, Vec<f64>)>,
    /// The links' transports as the session saw them at the end.
    console_link: String,
    agent_link: String,
    /// `quic+file`: MB/s of the files that moved during the scenes.
    file_mb_s: Option<f64>,
}

/// Sends `src` to the agent again and again until `stop`; returns the bytes that arrived (the
/// agent's copies are deleted as they arrive).
async fn move_files(
    session: Arc<tandem_session::Session>,
    src: std::path::PathBuf,
    dl: std::path::PathBuf,
    stop: Arc<AtomicBool>,
) -> u64 {
    let size = std::fs::metadata(&src).unwrap().len();
    let mut moved = 0;
    let cancel = tokio_util::sync::CancellationToken::new();
    while !stop.load(Ordering::Relaxed) {
        let Ok(t) = session.transfer_opener().open().await else {
            break;
        };
        let item = tandem_toolbox::Outgoing::new(&src, "bench.bin", size);
        let options = tandem_toolbox::SendOptions::default();
        let stopper = {
            let (stop, cancel) = (stop.clone(), cancel.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                cancel.cancel();
            })
        };
        let r = tandem_toolbox::send_file(
            t.recv,
            t.send,
            &item,
            &options,
            |_: &tandem_toolbox::Progress| {},
            &cancel,
        )
        .await;
        stopper.abort();
        match r {
            Ok(sent) => moved += sent.bytes_sent,
            Err(_) => break,
        }
        for e in std::fs::read_dir(&dl).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    moved
}

/// A fresh agent over `transport`, the console joins, every scene is measured (and the creep run
/// when `with_creep`), the session ends.
#[allow(clippy::too_many_arguments)]
async fn pass(
    a: &Args,
    dir: &std::path::Path,
    relay: &RelayProcess,
    token: &Secret,
    x: &Xvfb,
    next: &Arc<AtomicU32>,
    transport: &str,
    with_creep: bool,
) -> Pass {
    // `udp-dropped`: both sides' QUIC address is a UDP socket that reads and answers nothing (a
    // firewall that drops UDP silently); their TCP target is the relay's TCP port.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (relay_addr, mode, tcp) = match transport {
        "quic" => (relay.addr.clone(), "quic", None),
        "tcp" => (relay.addr.clone(), "tcp", None),
        "quic+file" => (relay.addr.clone(), "quic", None),
        "udp-dropped" => (
            silent.local_addr().unwrap().to_string(),
            "auto",
            Some(relay.addr.clone()),
        ),
        other => panic!("unknown transport {other:?}: quic, tcp, udp-dropped or quic+file"),
    };
    let with_file = transport == "quic+file";
    let dl = dir.join("glass-downloads");
    let file_args: Vec<String> = if with_file {
        vec![
            "--downloads".into(),
            dl.display().to_string(),
            "--file-quota-mib".into(),
            "100000000".into(),
        ]
    } else {
        vec![]
    };
    let mut relay_args = vec![
        "--relay".to_string(),
        relay_addr.clone(),
        "--relay-pin".to_string(),
        relay.pin.to_string(),
        "--transport".to_string(),
        mode.to_string(),
    ];
    if let Some(t) = &tcp {
        relay_args.extend(["--relay-tcp".to_string(), t.clone()]);
    }
    let (mut agent, code) = tandem_tests::bench_agent(
        &dir.join("agent-state"),
        &x.display,
        &relay_args,
        &file_args,
    )
    .await;

    // ---- join → first frame ----
    let mut opts = ConnectOptions::new(relay_addr.clone(), RelayTrust::Pin(relay.pin));
    tandem_client::NetworkArgs {
        transport: Some(mode.into()),
        relay_tcp: tcp.iter().cloned().collect(),
        ..Default::default()
    }
    .apply(&mut opts)
    .unwrap();
    let t_join = Instant::now();
    let session = tandem_session::join(
        &opts,
        token,
        &SessionCode::parse(&code).unwrap(),
        &tandem_session::SessionConfig::default(),
    )
    .await
    .unwrap();
    let session = Arc::new(session);
    // The agent's own median capture → encoded time, from its answers to stats requests.
    let agent_pipeline_us = Arc::new(AtomicU32::new(0));
    let agent_link = Arc::new(Mutex::new(String::from("?")));
    {
        let link = agent_link.clone();
        // Drain control messages (consent, cursor, stats) so nothing backs up.
        let s = session.clone();
        let us = agent_pipeline_us.clone();
        tokio::spawn(async move {
            while let Ok(m) = s.recv_control().await {
                if let ControlMsg::Stats {
                    pipeline_us,
                    transport,
                    ..
                } = m
                {
                    us.store(pipeline_us, Ordering::Relaxed);
                    *link.lock().unwrap() = transport.to_string();
                }
            }
        });
    }
    let mut dec = VideoDecoder::new().unwrap();
    let first_frame_ms = loop {
        let f = session.recv_video().await.unwrap();
        if let Ok(Some(_)) = dec.decode(&f.data) {
            break t_join.elapsed().as_secs_f64() * 1e3;
        }
    };

    // ---- quic+file: files move from the console to the agent during every scene ----
    let file_stop = Arc::new(AtomicBool::new(false));
    let file_task = with_file.then(|| {
        let src = dir.join("glass-file.bin");
        if !src.exists() {
            let block: Vec<u8> = (0..1u32 << 20)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            let mut data = Vec::with_capacity(256 << 20);
            for k in 0..=255u8 {
                data.extend(block.iter().map(|b| b ^ k));
            }
            std::fs::write(&src, data).unwrap();
        }
        let t0 = Instant::now();
        (
            t0,
            tokio::spawn(move_files(
                session.clone(),
                src,
                dl.clone(),
                file_stop.clone(),
            )),
        )
    });

    // ---- scenes through the whole session ----
    let scenes = [
        Scene::Idle,
        Scene::Typing,
        Scene::Scrolling,
        Scene::Dragging,
        Scene::FullMotion,
    ]
    .into_iter()
    .filter(|s| a.scene.split(',').any(|w| s.name().contains(w)));
    let mut results = vec![];
    let mut total_bytes = 0u64;
    for scene in scenes {
        let (glass, fps, kbps, halved) = measure(&session, &mut dec, x, scene, a, next).await;
        // The agent's median over its last 31 frames, i.e. the end of this scene.
        agent_pipeline_us.store(0, Ordering::Relaxed);
        let _ = session
            .send_control(&ControlMsg::Stats {
                rtt_us: 0,
                fps: 0,
                kbps: 0,
                pipeline_us: 0,
                transport: session.link_transport(),
            })
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let agent_ms = if fps > 0.0 {
            f64::from(agent_pipeline_us.load(Ordering::Relaxed)) / 1e3
        } else {
            f64::NAN // no frames in this scene: the median would be older frames'
        };
        total_bytes += (kbps * 1000.0 / 8.0 * a.seconds) as u64;
        results.push(SceneResult {
            scene,
            glass,
            fps,
            kbps,
            floor: vec![],
            psnr: vec![],
            halved,
            floor_halved: 0.0,
            agent_ms,
        });
    }
    let console_link = session.link_transport().to_string();
    let file_mb_s = match file_task {
        Some((t0, task)) => {
            file_stop.store(true, Ordering::Relaxed);
            let moved = task.await.unwrap();
            Some(moved as f64 / t0.elapsed().as_secs_f64() / 1e6)
        }
        None => None,
    };

    // ---- creep: a long typing session, first and last minute ----
    let mut creep = None;
    if with_creep && a.creep_minutes > 0.0 {
        let secs = a.creep_minutes * 60.0;
        let drawn = Arc::new(Drawn::default());
        let stop = Arc::new(AtomicBool::new(false));
        let h = painter(
            x.display.clone(),
            Scene::Typing,
            next.clone(),
            drawn.clone(),
            stop.clone(),
        );
        let t0 = Instant::now();
        let (mut first, mut last) = (vec![], vec![]);
        while t0.elapsed().as_secs_f64() < secs {
            let Ok(Ok(f)) =
                tokio::time::timeout(Duration::from_millis(500), session.recv_video()).await
            else {
                continue;
            };
            if let Ok(Some(fr)) = dec.decode(&f.data)
                && let Some(n) = read_counter(&fr.rgba, fr.width, fr.height, a.width)
                && let Some(t) = drawn.at.lock().unwrap().remove(&n)
            {
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let el = t0.elapsed().as_secs_f64();
                if el < 60.0 {
                    first.push(ms);
                } else if el > secs - 60.0 {
                    last.push(ms);
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let _ = h.join();
        creep = Some((first, last));
    }
    session
        .end(tandem_proto::EndReason::EndedByTechnician)
        .await;
    let _ = agent.wait().await;

    Pass {
        transport: transport.to_string(),
        first_frame_ms,
        results,
        bytes: total_bytes,
        creep,
        console_link,
        agent_link: agent_link.lock().unwrap().clone(),
        file_mb_s,
    }
}

/// Runs one scene through the session; returns (glass-to-glass ms per counted frame, delivered
/// fps, kbit/s).
async fn measure(
    session: &tandem_session::Session,
    dec: &mut VideoDecoder,
    x: &Xvfb,
    scene: Scene,
    a: &Args,
    next: &Arc<AtomicU32>,
) -> (Vec<f64>, f64, f64, f64) {
    let (seconds, screen_w) = (a.seconds, a.width);
    let drawn = Arc::new(Drawn::default());
    let stop = Arc::new(AtomicBool::new(false));
    // A fresh page, then let its frames (and the previous scene's) drain before measuring.
    let p = Painter::new(&x.display);
    let mut p = p;
    p.page(0);
    p.sync();
    let _ = tokio::time::timeout(Duration::from_millis(1500), async {
        loop {
            if let Ok(f) = session.recv_video().await
                && dec.decode(&f.data).is_err()
            {
                let _ = session.send_control(&ControlMsg::KeyframeRequest).await;
            }
        }
    })
    .await;
    let h = painter(
        x.display.clone(),
        scene,
        next.clone(),
        drawn.clone(),
        stop.clone(),
    );
    let t0 = Instant::now();
    let (mut glass, mut frames, mut bytes, mut decode_errors) = (vec![], 0u64, 0u64, 0u64);
    let mut halved = 0u64;
    while t0.elapsed().as_secs_f64() < seconds {
        let Ok(Ok(f)) =
            tokio::time::timeout(Duration::from_millis(200), session.recv_video()).await
        else {
            continue;
        };
        bytes += f.data.len() as u64;
        let received = Instant::now();
        let decoded = dec.decode(&f.data);
        if decoded.is_err() {
            decode_errors += 1;
            let _ = session.send_control(&ControlMsg::KeyframeRequest).await;
        }
        if let Ok(Some(fr)) = decoded {
            frames += 1;
            halved += u64::from(fr.width < screen_w);
            if let Some(n) = read_counter(&fr.rgba, fr.width, fr.height, screen_w)
                && let Some(t) = drawn.at.lock().unwrap().remove(&n)
            {
                let ms = t.elapsed().as_secs_f64() * 1e3;
                glass.push(ms);
                if glass.len() <= a.trace || (a.slow > 0.0 && ms > a.slow) {
                    eprintln!(
                        "{} #{} at {:.2} s: {ms:.1} ms (received after {:.1}), {}x{}, {} bytes",
                        scene.name(),
                        glass.len(),
                        t0.elapsed().as_secs_f64(),
                        ms - received.elapsed().as_secs_f64() * 1e3,
                        fr.width,
                        fr.height,
                        f.data.len(),
                    );
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = h.join();
    let secs = t0.elapsed().as_secs_f64();
    if decode_errors > 0 {
        eprintln!(
            "{}: {decode_errors} undecodable frames (keyframes requested)",
            scene.name()
        );
    }
    (
        glass,
        frames as f64 / secs,
        bytes as f64 * 8.0 / secs / 1000.0,
        halved as f64 / frames.max(1) as f64,
    )
}
