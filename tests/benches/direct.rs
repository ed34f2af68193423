//! Direct paths, in one run:
//!   1. The NAT matrix (`tandem_tests::nat`; root only): for every pair of NAT behaviours of the
//!      agent's and the console's networks, whole sessions between the real `tandem-agent` and
//!      `tandem-console` through the real relay: direct or relay, and when the console's packets
//!      went direct, counted from its first picture (negative: before it).
//!   2. Load on the relay: N library sessions on this machine (each streaming video frames of
//!      `--frame` bytes at 30 per second, both ways a little control) through the real relay,
//!      once with direct paths allowed and once relay-only, alternating, `--rounds` times: the
//!      relay's CPU seconds and forwarded bytes over the same window. On one machine the direct
//!      path is the LAN path between two local addresses; with no address but loopback, none.
//!
//!     cargo bench -p tandem-tests --bench direct [-- --runs 1 --sessions 20 --seconds 10
//!                                                   --rounds 2 --frame 4500 --skip-matrix]
#![allow(clippy::unwrap_used, clippy::print_literal)]

use std::time::{Duration, Instant};
use tandem_session::{Fallback, Session};
use tandem_tests::nat::{Nat, RELAY_A, RELAY_C, World, session};
use tandem_tests::nsprocs::start_relay;
use tandem_tests::{bench_arg, bench_main, percentile, write_bench_json};

struct PairResult {
    agent: Nat,
    console: Nat,
    direct: usize,
    runs: usize,
    /// Console's switch to direct, ms after its first picture, per run that went direct.
    switch_ms: Vec<f64>,
}

async fn matrix(runs: usize) -> Vec<PairResult> {
    let mut out = Vec::new();
    for a in Nat::ALL {
        for c in Nat::ALL {
            let mut r = PairResult {
                agent: a,
                console: c,
                direct: 0,
                runs,
                switch_ms: vec![],
            };
            for _ in 0..runs {
                let w = World::new(a, c);
                let relay = start_relay(&w.i, &[]).await;
                let o = session(
                    &relay,
                    (&w.a, RELAY_A),
                    (&w.c, RELAY_C),
                    "wait 1000\nkey h\nwait 500\n",
                    3,
                    &[],
                    async |_| {},
                )
                .await;
                if let Some((_, ms)) = o.went_direct() {
                    r.direct += 1;
                    r.switch_ms.push(ms);
                }
            }
            eprintln!(
                "  {} ↔ {}: {}/{} direct",
                a.name(),
                c.name(),
                r.direct,
                r.runs
            );
            out.push(r);
        }
    }
    out
}

/// Sum of every sample of a metric family (all label sets).
fn family_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| {
            l.rsplit_once(' ')
                .and_then(|(_, v)| v.trim().parse::<f64>().ok())
        })
        .sum()
}

struct LoadRow {
    direct_allowed: bool,
    went_direct: usize,
    relay_cpu_s: f64,
    relay_bytes: f64,
    delivered_bytes: u64,
}

/// Streams video on every session for `secs`; returns the bytes the consoles received.
async fn stream(pairs: &[(Session, Session)], secs: f64, frame: usize) -> u64 {
    let stop = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for (agent, _) in pairs {
        let v = agent.video_sender();
        tasks.push(tokio::spawn(async move {
            let data = vec![0x5au8; frame];
            let mut seq = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(33));
            while Instant::now() < stop {
                tick.tick().await;
                seq += 1;
                if v.send(seq, &data).await.is_err() {
                    break;
                }
            }
        }));
    }
    let mut got = 0u64;
    let deadline = tokio::time::Instant::from_std(stop + Duration::from_millis(500));
    let counts = futures_util::future::join_all(pairs.iter().map(|(_, console)| async move {
        let mut n = 0u64;
        while let Ok(Ok(f)) = tokio::time::timeout_at(deadline, console.recv_video()).await {
            n += f.data.len() as u64;
        }
        n
    }))
    .await;
    got += counts.iter().sum::<u64>();
    for t in tasks {
        let _ = t.await;
    }
    got
}

async fn load(
    relay: &tandem_tests::RelayProcess,
    token: &tandem_proto::Secret,
    direct: bool,
    n: usize,
    secs: f64,
    frame: usize,
) -> LoadRow {
    let mut opts = relay.opts();
    opts.direct = direct;
    let mut pairs = Vec::new();
    for _ in 0..n {
        let (a, c, _) = tandem_tests::session_pair(&opts, token, Fallback::Fragment).await;
        pairs.push((a, c));
    }
    // Let the paths settle (punching takes a round trip or two).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let went_direct = pairs
        .iter()
        .filter(|(a, c)| a.path().is_direct() && c.path().is_direct())
        .count();
    let (_, m0) = tandem_tests::http_get(relay.metrics, "/metrics").await;
    let cpu0 = relay.cpu_seconds().unwrap_or(0.0);
    let delivered = stream(&pairs, secs, frame).await;
    let cpu1 = relay.cpu_seconds().unwrap_or(0.0);
    let (_, m1) = tandem_tests::http_get(relay.metrics, "/metrics").await;
    for (a, _) in &pairs {
        a.end(tandem_proto::EndReason::EndedByUser).await;
    }
    let name = "tandem_relay_forwarded_bytes_total";
    LoadRow {
        direct_allowed: direct,
        went_direct,
        relay_cpu_s: cpu1 - cpu0,
        relay_bytes: family_sum(&m1, name) - family_sum(&m0, name),
        delivered_bytes: delivered,
    }
}

fn main() {
    bench_main(async {
        let runs: usize = bench_arg("--runs", 1);
        let sessions: usize = bench_arg("--sessions", 20);
        let secs: f64 = bench_arg("--seconds", 10.0);
        let rounds: usize = bench_arg("--rounds", 2);
        let frame: usize = bench_arg("--frame", 4500);
        let skip_matrix = std::env::args().any(|a| a == "--skip-matrix");
        let mut json = serde_json::json!({});

        // 1. The NAT matrix.
        if skip_matrix {
            eprintln!("NAT matrix: skipped (--skip-matrix)");
        } else if let Some(why) = tandem_tests::netns::skip_reason() {
            eprintln!("NAT matrix: skipped ({why})");
        } else {
            eprintln!("NAT matrix ({runs} run(s) per pair):");
            let m = matrix(runs).await;
            println!(
                "\n{:<16} {:<16} {:>8} {:>9} {:>22}",
                "agent NAT", "console NAT", "expected", "direct", "switch ms (p50, max)"
            );
            let mut all_switch = Vec::new();
            for r in &m {
                all_switch.extend_from_slice(&r.switch_ms);
                println!(
                    "{:<16} {:<16} {:>8} {:>6}/{:<2} {:>22}",
                    r.agent.name(),
                    r.console.name(),
                    if Nat::direct_expected(r.agent, r.console) {
                        "direct"
                    } else {
                        "relay"
                    },
                    r.direct,
                    r.runs,
                    if r.switch_ms.is_empty() {
                        "-".to_string()
                    } else {
                        format!(
                            "{:.0}, {:.0}",
                            percentile(&r.switch_ms, 0.5),
                            percentile(&r.switch_ms, 1.0)
                        )
                    }
                );
            }
            println!(
                "switch to direct, ms after the first picture, all direct runs: p50 {:.0}, p99 {:.0} ({} runs)",
                percentile(&all_switch, 0.5),
                percentile(&all_switch, 0.99),
                all_switch.len()
            );
            json["matrix"] = serde_json::json!(
                m.iter()
                    .map(|r| serde_json::json!({
                        "agent": r.agent.name(), "console": r.console.name(),
                        "expected_direct": Nat::direct_expected(r.agent, r.console),
                        "direct_runs": r.direct, "runs": r.runs, "switch_ms": r.switch_ms,
                    }))
                    .collect::<Vec<_>>()
            );
            json["switch_ms_p50"] = serde_json::json!(percentile(&all_switch, 0.5));
        }

        // 2. Relay load, direct allowed against relay-only, alternating.
        let dir = tempfile::tempdir().unwrap();
        let (relay, token) = tandem_tests::load_relay(dir.path(), "Bench").await;
        let mut rows = Vec::new();
        for _ in 0..rounds {
            for direct in [false, true] {
                let r = load(&relay, &token, direct, sessions, secs, frame).await;
                rows.push(r);
            }
        }
        println!(
            "\n{sessions} sessions, {:.0} kbit/s of video each, {secs} s per row:",
            frame as f64 * 8.0 * 30.0 / 1000.0
        );
        println!(
            "{:<14} {:>12} {:>14} {:>16} {:>16}",
            "mode", "went direct", "relay CPU s", "relay MB fwd", "delivered MB"
        );
        for r in &rows {
            println!(
                "{:<14} {:>9}/{:<2} {:>14.3} {:>16.2} {:>16.2}",
                if r.direct_allowed {
                    "direct"
                } else {
                    "relay-only"
                },
                r.went_direct,
                sessions,
                r.relay_cpu_s,
                r.relay_bytes / 1e6,
                r.delivered_bytes as f64 / 1e6
            );
        }
        let sum = |d: bool, f: &dyn Fn(&LoadRow) -> f64| -> f64 {
            rows.iter().filter(|r| r.direct_allowed == d).map(f).sum()
        };
        let cpu_ratio = sum(true, &|r| r.relay_cpu_s) / sum(false, &|r| r.relay_cpu_s).max(1e-9);
        let bytes_ratio = sum(true, &|r| r.relay_bytes) / sum(false, &|r| r.relay_bytes).max(1.0);
        println!("direct / relay-only: relay CPU ×{cpu_ratio:.3}, relay bytes ×{bytes_ratio:.4}");
        json["load"] = serde_json::json!({
            "sessions": sessions, "seconds": secs, "frame_bytes": frame,
            "rows": rows.iter().map(|r| serde_json::json!({
                "direct_allowed": r.direct_allowed, "went_direct": r.went_direct,
                "relay_cpu_s": r.relay_cpu_s, "relay_bytes": r.relay_bytes,
                "delivered_bytes": r.delivered_bytes,
            })).collect::<Vec<_>>(),
            "relay_cpu_ratio": cpu_ratio, "relay_bytes_ratio": bytes_ratio,
        });
        println!("{}", serde_json::to_string(&json).unwrap());
        write_bench_json("direct", &json);
        relay.terminate().await;
    });
}
