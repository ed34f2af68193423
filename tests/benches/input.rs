//! Input latency: the console sends a key event → the X server delivers it to a client window on the
//! agent's Xvfb display, through the real `tandem-relay` on loopback (release build), end-to-end
//! encrypted session in between. Baseline in the same run: the same injection without the network
//! (agent-side gate + enigo + X server only).
//!
//!     cargo bench -p tandem-tests --bench input [-- --quick --transports quic,tcp]
//!
//! `--transports`: one session per entry, both sides on that transport (`quic`, `tcp`), against
//! the same relay and the same baseline.
#![allow(clippy::unwrap_used, clippy::print_literal)]

use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_certs::RelayTrust;
use tandem_client::ConnectOptions;
use tandem_input::keymap::usage;
use tandem_input::{AgentInput, Injector, InputClient, InputEvent, Permission, X11Injector};
use tandem_session::{AgentEvent, AgentHost, InputItem, SessionConfig};
use tandem_tests::percentile;
use tandem_tests::x11::{Kind, XRecorder, Xvfb};

/// Waits until the recorder has `n` key events; returns the arrival time of the last.
fn arrival(rec: &XRecorder, n: usize) -> Option<Instant> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        {
            let ev = rec.events.lock().unwrap();
            let keys: Vec<_> = ev
                .iter()
                .filter(|e| matches!(e.kind, Kind::KeyPress | Kind::KeyRelease))
                .collect();
            if keys.len() >= n {
                return Some(keys[n - 1].at);
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 200 } else { 1000 };
    let transports: Vec<String> = tandem_tests::bench_arg("--transports", "quic,tcp".to_string())
        .split(',')
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    tandem_tests::bench_main(run(n, transports));
}

async fn run(n: usize, transports: Vec<String>) {
    let x = Xvfb::start(1280, 800);
    let rec = Arc::new(XRecorder::start(&x));
    let display = x.display.clone();
    let input = Arc::new(
        AgentInput::start(move || {
            Ok(Box::new(X11Injector::open(Some(&display))?) as Box<dyn Injector>)
        })
        .unwrap(),
    );
    input.set_permission(Permission::Control);

    // Baseline: the agent's own path, no network.
    let mut local = vec![];
    let mut count = 0;
    for i in 0..n {
        let e = InputEvent::Key {
            usage: usage::Z,
            pressed: i % 2 == 0,
        };
        let t = Instant::now();
        input.handle(&InputItem::Event(Bytes::from(e.encode())));
        count += 1;
        let r = tokio::task::block_in_place(|| arrival(&rec, count));
        if let Some(at) = r {
            local.push(at.duration_since(t).as_secs_f64() * 1e3);
        }
    }

    // Through the relay.
    let dir = tempfile::tempdir().unwrap();
    let (relay, token) = tandem_tests::bench_relay(dir.path(), &[]).await;
    let mut passes = vec![];
    for transport in &transports {
        let mut opts = ConnectOptions::new(relay.addr.clone(), RelayTrust::Pin(relay.pin));
        tandem_client::NetworkArgs {
            transport: Some(transport.clone()),
            ..Default::default()
        }
        .apply(&mut opts)
        .unwrap();
        let mut host = AgentHost::connect(opts.clone(), SessionConfig::default())
            .await
            .unwrap();
        let code = match host.next().await.unwrap() {
            AgentEvent::Code { code, .. } => code,
            other => panic!("{other:?}"),
        };
        let console = {
            let (o, t) = (opts.clone(), token.clone());
            tokio::spawn(async move {
                tandem_session::join(&o, &t, &code, &SessionConfig::default()).await
            })
        };
        let agent = loop {
            match host.next().await.unwrap() {
                AgentEvent::Session(s) => break Arc::new(*s),
                AgentEvent::Joining { .. } => continue,
                other => panic!("{other:?}"),
            }
        };
        let console = console.await.unwrap().unwrap();
        // Input is accepted once the user's answer was sent.
        agent
            .send_control(&tandem_session::ControlMsg::Consent {
                decision: tandem_session::Consent::AllowControl,
            })
            .await
            .unwrap();
        let pump = {
            let (i, a) = (input.clone(), agent.clone());
            tokio::spawn(async move { i.run(&a).await })
        };
        let client = InputClient::new(&console);
        let mut remote = vec![];
        for i in 0..n {
            let e = InputEvent::Key {
                usage: usage::Z,
                pressed: i % 2 == 0,
            };
            let t = Instant::now();
            client.send(&e).await.unwrap();
            count += 1;
            let r = tokio::task::block_in_place(|| arrival(&rec, count));
            if let Some(at) = r {
                remote.push(at.duration_since(t).as_secs_f64() * 1e3);
            }
        }

        pump.abort();
        drop(console);
        passes.push((transport.clone(), remote));
    }
    // Passes of the same transport pooled (repeat a transport to interleave against noise).
    let mut pooled: Vec<(String, Vec<f64>)> = vec![];
    for (t, r) in passes {
        match pooled.iter_mut().find(|(x, _)| *x == t) {
            Some((_, all)) => all.extend(r),
            None => pooled.push((t, r)),
        }
    }
    let passes = pooled;
    let (l50, l99) = (percentile(&local, 0.5), percentile(&local, 0.99));
    println!();
    println!(
        "Tandem input latency ({n} key events each; console send → X server delivers to a client)"
    );
    println!("{:<40} {:>10} {:>10}", "path", "p50 ms", "p99 ms");
    println!(
        "{:<40} {:>10.3} {:>10.3}",
        "agent only (gate + enigo + X server)", l50, l99
    );
    let mut through = serde_json::Map::new();
    let mut quic = None;
    for (t, remote) in &passes {
        let (r50, r99) = (percentile(remote, 0.5), percentile(remote, 0.99));
        println!(
            "{:<40} {:>10.3} {:>10.3}   (targets: p50 ≤ 2, p99 ≤ 10)",
            format!("console → relay → agent → X ({t})"),
            r50,
            r99
        );
        println!(
            "{:<40} {:>10.3} {:>10.3}",
            format!("  added by session + relay ({t})"),
            r50 - l50,
            r99 - l99
        );
        if t == "quic" {
            quic = Some((r50, r99));
        } else if let Some((q50, q99)) = quic {
            println!("  {t} ÷ quic: p50 ×{:.2}, p99 ×{:.2}", r50 / q50, r99 / q99);
        }
        through.insert(
            t.clone(),
            serde_json::json!({"p50": r50, "p99": r99, "events": remote.len()}),
        );
    }
    let json = serde_json::json!({
        "bench": "input", "events": n,
        "local_ms": {"p50": l50, "p99": l99},
        "through_relay_ms": through.get("quic").cloned().unwrap_or_default(),
        "by_transport_ms": through,
    });
    let out = serde_json::to_string_pretty(&json).unwrap();
    println!("\n{out}");
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&target);
    let _ = std::fs::write(target.join("input.json"), &out);
    relay.terminate().await;
}
