//! End-to-end session benchmark, in one run through the real `tandem-relay` on loopback:
//!   1. join-to-confirmed setup time (console starts joining → both sides hold a confirmed session),
//!      for both fallbacks of oversized inner packets (fragmenting datagrams, payload stream);
//!   2. inner throughput (video frames on the inner connection) vs the outer link alone (the relay's
//!      payload stream between the same two clients), as a ratio;
//!   3. inner round-trip time (control message echo) vs the outer link alone (datagram echo).
//!
//!     cargo bench -p tandem-tests --bench session [-- --quick]
#![allow(clippy::unwrap_used, clippy::print_literal)]

use bytes::Bytes;
use std::time::{Duration, Instant};
use tandem_certs::RelayTrust;
use tandem_client::{ConnectOptions, RelayLink};
use tandem_session::{ControlMsg, Fallback, Session};
use tandem_tests::percentile;

/// Reliable-stream throughput of the inner connection: 4,000-byte messages on the session's input
/// event stream (one ordered stream, like the outer payload stream it is compared with). Video
/// frames are not used: their supersede rule drops frames on purpose.
async fn inner_throughput(agent: &Session, console: &Session, mib: usize) -> f64 {
    const MSG: usize = 4000;
    let n = mib * 1024 * 1024 / MSG;
    let sender = console.input_sender();
    let t = Instant::now();
    let send = tokio::spawn(async move {
        let buf = vec![0x33u8; MSG];
        for _ in 0..n {
            sender.send_event(&buf).await.unwrap();
        }
    });
    let mut bytes = 0usize;
    let mut got = 0;
    while got < n {
        if let tandem_session::InputItem::Event(b) = agent.recv_input().await.unwrap() {
            bytes += b.len();
            got += 1;
        }
    }
    send.await.unwrap();
    bytes as f64 / t.elapsed().as_secs_f64() / 1e6
}

async fn outer_throughput(a: &RelayLink, c: &RelayLink, mib: usize) -> f64 {
    const FRAME: usize = 16 * 1024;
    let frames = mib * 1024 * 1024 / FRAME;
    let mut s = a.open_payload_stream().await.unwrap();
    let t = Instant::now();
    let sender = tokio::spawn(async move {
        let buf = vec![0x44u8; FRAME];
        for _ in 0..frames {
            s.send(&buf).await.unwrap();
        }
        s.finish();
    });
    let mut r = c.accept_payload_stream().await.unwrap();
    let mut bytes = 0;
    for _ in 0..frames {
        bytes += r.recv().await.unwrap().unwrap().len();
    }
    sender.await.unwrap();
    bytes as f64 / t.elapsed().as_secs_f64() / 1e6
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    tandem_tests::bench_main(run(quick));
}

async fn run(quick: bool) {
    let (setups, mib, rtts) = if quick { (15, 16, 300) } else { (60, 64, 2000) };
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("relay.toml");
    std::fs::write(
        &cfg,
        "[limits]\nmax_connections_per_address = 100000\njoins_per_minute_per_technician = 1000000\n\
         joins_per_minute_per_address = 1000000\nauths_per_minute_per_address = 1000000\n\
         registers_per_minute_per_address = 1000000\n",
    )
    .unwrap();
    let (relay, token) =
        tandem_tests::bench_relay(dir.path(), &["--config", cfg.to_str().unwrap()]).await;
    let opts = ConnectOptions::new(relay.addr.clone(), RelayTrust::Pin(relay.pin));

    // ---- setup time, both fallbacks interleaved ----
    let (mut frag_ms, mut stream_ms) = (vec![], vec![]);
    for _ in 0..setups {
        for fb in [Fallback::Fragment, Fallback::Stream] {
            let (a, c, ms) = tandem_tests::session_pair(&opts, &token, fb).await;
            match fb {
                Fallback::Fragment => frag_ms.push(ms),
                Fallback::Stream => stream_ms.push(ms),
            }
            c.end(tandem_proto::EndReason::EndedByTechnician).await;
            let _ = a.closed().await;
        }
    }

    // ---- throughput and RTT: inner (both fallbacks) vs outer alone ----
    let mut rows = vec![];
    for fb in [Fallback::Fragment, Fallback::Stream] {
        let (agent, console, _) = tandem_tests::session_pair(&opts, &token, fb).await;
        let tp = inner_throughput(&agent, &console, mib).await;
        let load = |s: &Session| {
            let st = s.carrier_stats();
            (
                st.sent_fragmented
                    .load(std::sync::atomic::Ordering::Relaxed)
                    + st.sent_stream.load(std::sync::atomic::Ordering::Relaxed),
                st.sent_whole.load(std::sync::atomic::Ordering::Relaxed),
                st.blocked.load(std::sync::atomic::Ordering::Relaxed),
            )
        };
        let (agent_big, agent_whole, agent_blocked) = load(&agent);
        // Control echo on the agent.
        let echo = tokio::spawn(async move {
            while let Ok(m) = agent.recv_control().await {
                if agent.send_control(&m).await.is_err() {
                    return;
                }
            }
        });
        let mut rtt = vec![];
        for i in 0..rtts {
            let t = Instant::now();
            console
                .send_control(&ControlMsg::Stats {
                    rtt_us: i,
                    fps: 0,
                    kbps: 0,
                    pipeline_us: 0,
                    transport: console.link_transport(),
                })
                .await
                .unwrap();
            let _ = console.recv_control().await.unwrap();
            rtt.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let quinn_rtt = console.connection().rtt().as_secs_f64() * 1e6;
        let (console_big, _, _) = load(&console);
        rows.push((
            fb,
            tp,
            percentile(&rtt, 0.5),
            percentile(&rtt, 0.99),
            quinn_rtt,
            agent_big + console_big,
            (agent_whole, agent_blocked),
        ));
        console
            .end(tandem_proto::EndReason::EndedByTechnician)
            .await;
        echo.abort();
    }

    // Outer alone: two relay links paired directly.
    let mut a = RelayLink::connect(&opts).await.unwrap();
    let (slot, _) = a.register().await.unwrap();
    let mut c = RelayLink::connect(&opts).await.unwrap();
    c.authenticate(&token).await.unwrap();
    c.join(&slot).await.unwrap();
    a.wait_paired().await.unwrap();
    let outer_tp = outer_throughput(&a, &c, mib).await;
    let cc = c.connection().clone();
    tokio::spawn(async move {
        while let Ok(d) = cc.read_datagram().await {
            let _ = cc.send_datagram(d);
        }
    });
    let mut ortt = vec![];
    let mut seq = 0u64;
    while ortt.len() < rtts as usize {
        seq += 1;
        let t = Instant::now();
        a.send_datagram(Bytes::copy_from_slice(&seq.to_le_bytes()))
            .unwrap();
        if let Ok(Ok(d)) = tokio::time::timeout(Duration::from_millis(200), a.recv_datagram()).await
            && d[..] == seq.to_le_bytes()
        {
            ortt.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let o50 = percentile(&ortt, 0.5);
    let o99 = percentile(&ortt, 0.99);

    let f50 = percentile(&frag_ms, 0.5);
    let f99 = percentile(&frag_ms, 0.99);
    let s50 = percentile(&stream_ms, 0.5);
    let s99 = percentile(&stream_ms, 0.99);
    println!();
    println!("Tandem session benchmark (through tandem-relay on loopback, {setups} setups each)");
    println!("{:<44} {:>12} {:>12}", "measure", "fragment", "stream");
    println!(
        "{:<44} {:>12.1} {:>12.1}   ms (target ≤ 50)",
        "join → confirmed p50", f50, s50
    );
    println!(
        "{:<44} {:>12.1} {:>12.1}   ms",
        "join → confirmed p99", f99, s99
    );
    for (fb, tp, r50, r99, qr, frag, vs) in &rows {
        println!(
            "{:<44} {:>12.1} MB/s  = {:.2} × outer ({:.1} MB/s)",
            format!("inner throughput ({fb:?})"),
            tp,
            tp / outer_tp,
            outer_tp
        );
        println!(
            "{:<44} {:>12.1} µs p99 {:.1}  = {:.2} × outer datagram echo p50 ({:.1} µs, p99 {:.1}); quinn srtt {:.0} µs; oversized inner packets {frag} (agent sent {} whole, blocked {} times)",
            format!("inner control echo p50 ({fb:?})"),
            r50,
            r99,
            r50 / o50,
            o50,
            o99,
            qr,
            vs.0,
            vs.1
        );
    }
    let json = serde_json::json!({
        "bench": "session",
        "setup_ms": {"fragment": {"p50": f50, "p99": f99, "all": frag_ms}, "stream": {"p50": s50, "p99": s99, "all": stream_ms}},
        "outer": {"throughput_mb_s": outer_tp, "datagram_echo_us_p50": o50, "datagram_echo_us_p99": o99},
        "inner": rows.iter().map(|(fb, tp, r50, r99, qr, frag, vs)| serde_json::json!({
            "fallback": format!("{fb:?}"), "throughput_mb_s": tp, "throughput_ratio": tp / outer_tp,
            "control_echo_us_p50": r50, "control_echo_us_p99": r99, "rtt_ratio_p50": r50 / o50,
            "quinn_srtt_us": qr, "oversized_inner_packets": frag, "agent_packets_whole": vs.0, "agent_blocked": vs.1,
        })).collect::<Vec<_>>(),
    });
    let out = serde_json::to_string_pretty(&json).unwrap();
    println!("\n{out}");
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&target);
    let _ = std::fs::write(target.join("session.json"), &out);
    relay.terminate().await;
}
