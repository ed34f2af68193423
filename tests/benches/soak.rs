//! Relay soak: many concurrent paired sessions through one relay process with synthetic traffic
//! averaging a given bitrate each (default 1,000 sessions × 180 kbit/s, RustDesk's published
//! average relayed session), for a bounded time. Reports per minute: traffic forwarded, relay CPU
//! and memory, forwarding latency (one clock: sender and receiver are this process) and loss; and
//! the relay's CPU cost per Mbit/s. Table on stdout, JSON in `target/bench/soak.json`.
//!
//!     cargo bench -p tandem-tests --bench soak [-- --sessions 1000 --minutes 10 --kbps 180
//!                                                  --via both --row-secs 60]
//!
//! Traffic per session: payloads of 1,100 bytes agent → console at the session's rate (video),
//! and a 64-byte payload console → agent every 100 ms (input); each carries its send time. They
//! travel as the relay forwards them (`--via`): `datagram` (DATAGRAM frames of the outer QUIC
//! connections, which the relay decrypts and encrypts again), `channel` (relay channels: plain UDP
//! beside the QUIC link, `tandem_net::channel`), or `both` (default): the same sessions switch
//! between the two every row, so the two are compared in one run on the same machine minutes.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tandem_certs::RelayTrust;
use tandem_client::{ConnectOptions, RelayLink};
use tandem_tests::{bench_arg, http_get, load_relay, metric, percentile, write_bench_json};

struct Args {
    sessions: usize,
    minutes: f64,
    kbps: f64,
    via: String,
    row_secs: f64,
}

fn args() -> Args {
    Args {
        sessions: bench_arg("--sessions", 1000),
        minutes: bench_arg("--minutes", 10.0),
        kbps: bench_arg("--kbps", 180.0),
        via: bench_arg("--via", "both".to_string()),
        row_secs: bench_arg("--row-secs", 60.0),
    }
}

/// What each row's traffic goes over.
fn row_mode(via: &str, row: usize) -> &'static str {
    match via {
        "channel" => "channel",
        "datagram" => "datagram",
        _ if row.is_multiple_of(2) => "datagram",
        _ => "channel",
    }
}

const VIDEO: usize = 1100;
const INPUT: usize = 64;

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    bytes: AtomicU64,
    send_errors: AtomicU64,
    lost_links: AtomicU64,
}

fn main() {
    let a = args();
    tandem_tests::bench_main(run(a));
}

async fn run(a: Args) {
    let dir = tempfile::tempdir().unwrap();
    let (relay, token) = load_relay(dir.path(), "Soak").await;
    let opts = ConnectOptions::new(relay.addr.clone(), RelayTrust::Pin(relay.pin));
    let idle_rss = relay.rss_bytes().unwrap_or(0);

    // ---- set up the sessions, 50 at a time, on a few client endpoints ----
    let relay_addr: std::net::SocketAddr = relay.addr.parse().unwrap();
    let eps: Vec<_> = (0..4)
        .map(|_| tandem_client::client_endpoint_with_port(&opts, relay_addr).unwrap())
        .collect();
    let t_setup = Instant::now();
    let connect_retries = Arc::new(AtomicU64::new(0));
    let mut pairs = Vec::with_capacity(a.sessions);
    for chunk in 0..a.sessions.div_ceil(50) {
        let n = 50.min(a.sessions - chunk * 50);
        let mut js = tokio::task::JoinSet::new();
        for i in 0..n {
            let e = (chunk * 50 + i) % eps.len();
            let (ep, opts, token) = (eps[e].0.clone(), opts.clone(), token.clone());
            let via = a.via.clone();
            let retries = connect_retries.clone();
            js.spawn(async move {
                // A handshake that gets no answer in 10 s (seen at setup on the busy machine, with
                // both this relay and the one before channels) is tried again, as an agent or a
                // console would; counted and printed.
                let connect = || async {
                    for _ in 0..2 {
                        match RelayLink::connect_on(&ep, &opts).await {
                            Ok(l) => return l,
                            Err(e) => {
                                eprintln!("connect failed ({e}); trying again");
                                retries.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    RelayLink::connect_on(&ep, &opts).await.unwrap()
                };
                let mut ag = connect().await;
                let (slot, _) = ag.register().await.unwrap();
                let mut co = connect().await;
                co.authenticate(&token).await.unwrap();
                co.join(&slot).await.unwrap();
                ag.wait_paired().await.unwrap();
                let mut tokens = [0u64; 2];
                // `--via datagram` also runs against a relay older than channels
                // (TANDEM_BIN_TANDEM_RELAY), which gives no token.
                if via != "datagram" {
                    for (t, link) in tokens.iter_mut().zip([&ag, &co]) {
                        let mut w = link.channel_token();
                        *t = w.wait_for(|t| t.is_some()).await.unwrap().unwrap();
                    }
                }
                (ag, co, e, tokens)
            });
        }
        while let Some(r) = js.join_next().await {
            pairs.push(r.unwrap());
        }
    }
    let setup_secs = t_setup.elapsed().as_secs_f64();
    let connect_retries = connect_retries.load(Ordering::Relaxed);
    eprintln!(
        "{} sessions set up in {setup_secs:.1} s ({connect_retries} connects tried again)",
        a.sessions
    );

    // ---- traffic ----
    let start = Instant::now();
    let counters = Arc::new(Counters::default());
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let video_interval = Duration::from_secs_f64(VIDEO as f64 * 8.0 / (a.kbps * 1000.0));
    let mut tasks = tokio::task::JoinSet::new();
    // Whether the senders use the relay channel (switched between rows).
    let on_channel = Arc::new(std::sync::atomic::AtomicBool::new(
        row_mode(&a.via, 0) == "channel",
    ));
    for (k, (ag, co, e, tokens)) in pairs.iter().enumerate() {
        let (a_conn, c_conn) = (ag.connection().clone(), co.connection().clone());
        let port = eps[*e].1.clone();
        // Senders start spread over one interval so the load is smooth.
        let offset = video_interval.mul_f64(k as f64 / a.sessions as f64);
        for (conn, size, every, token) in [
            (a_conn.clone(), VIDEO, video_interval, tokens[0]),
            (c_conn.clone(), INPUT, Duration::from_millis(100), tokens[1]),
        ] {
            let counters = counters.clone();
            let (port, on_channel) = (port.clone(), on_channel.clone());
            tasks.spawn(async move {
                tokio::time::sleep(offset).await;
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut buf = vec![0u8; size];
                let mut packet = vec![0u8; size + tandem_net::channel::HEADER];
                tandem_net::channel::write_header(&mut packet, token);
                loop {
                    tick.tick().await;
                    let ns = start.elapsed().as_nanos() as u64;
                    buf[..8].copy_from_slice(&ns.to_be_bytes());
                    if on_channel.load(Ordering::Relaxed) {
                        packet[tandem_net::channel::HEADER..].copy_from_slice(&buf);
                        match port.send_to(relay_addr, &packet) {
                            Ok(()) => counters.sent.fetch_add(1, Ordering::Relaxed),
                            Err(_) => counters.send_errors.fetch_add(1, Ordering::Relaxed),
                        };
                        continue;
                    }
                    match conn.send_datagram(bytes::Bytes::copy_from_slice(&buf)) {
                        Ok(()) => {
                            counters.sent.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            counters.send_errors.fetch_add(1, Ordering::Relaxed);
                            if conn.close_reason().is_some() {
                                counters.lost_links.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                        }
                    }
                }
            });
        }
        for (conn, token) in [(a_conn, tokens[0]), (c_conn, tokens[1])] {
            let (ch_tx, mut ch_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(256);
            port.set_channel(relay_addr, token, Arc::new(ch_tx));
            let (counters, latencies) = (counters.clone(), latencies.clone());
            tasks.spawn(async move {
                let mut n = 0u64;
                loop {
                    let d = tokio::select! {
                        d = conn.read_datagram() => match d { Ok(d) => d, Err(_) => return },
                        Some(d) = ch_rx.recv() => d,
                    };
                    counters.received.fetch_add(1, Ordering::Relaxed);
                    counters.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                    n += 1;
                    // Sample one payload in 8 for latency (keeps the lock cold).
                    if n.is_multiple_of(8) && d.len() >= 8 {
                        let sent = u64::from_be_bytes(d[..8].try_into().unwrap());
                        let now = start.elapsed().as_nanos() as u64;
                        let us = now.saturating_sub(sent) as f64 / 1e3;
                        latencies.lock().unwrap().push(us);
                    }
                }
            });
        }
    }

    // ---- per-minute (or shorter) rows ----
    let total = Duration::from_secs_f64(a.minutes * 60.0);
    let row_len = Duration::from_secs_f64(a.row_secs).min(total);
    // Per way of forwarding: (Mbit, relay CPU-s).
    let mut per_mode: std::collections::BTreeMap<&str, (f64, f64)> = Default::default();
    let mut rows = vec![];
    let mut last = (
        Instant::now(),
        relay.cpu_seconds().unwrap_or(0.0),
        0u64,
        0u64,
        0u64,
    );
    let (cpu_start, mut bytes_total) = (last.1, 0u64);
    println!();
    println!(
        "Tandem relay soak: {} sessions × {} kbit/s for {} min ({} cores, load generator on the same machine)",
        a.sessions,
        a.kbps,
        a.minutes,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{:>6} {:>9} {:>10} {:>9} {:>9} {:>11} {:>11} {:>8} {:>10}",
        "row",
        "via",
        "Mbit/s",
        "relay CPU",
        "relay MB",
        "lat p50 µs",
        "lat p99 µs",
        "loss %",
        "Mbit/s/core"
    );
    let mut minute = 0;
    while start.elapsed() < total {
        tokio::time::sleep(row_len.min(total - start.elapsed())).await;
        minute += 1;
        let now = Instant::now();
        let cpu = relay.cpu_seconds().unwrap_or(0.0);
        let sent = counters.sent.load(Ordering::Relaxed);
        let recv = counters.received.load(Ordering::Relaxed);
        let bytes = counters.bytes.load(Ordering::Relaxed);
        let secs = now.duration_since(last.0).as_secs_f64();
        let mbit = (bytes - last.4) as f64 * 8.0 / secs / 1e6;
        bytes_total = bytes;
        let cpu_pct = (cpu - last.1) / secs * 100.0;
        let rss = relay.rss_bytes().unwrap_or(0) as f64 / 1e6;
        let lat = std::mem::take(&mut *latencies.lock().unwrap());
        let p50 = percentile(&lat, 0.5);
        let p99 = percentile(&lat, 0.99);
        let (ds, dr) = (sent - last.2, recv - last.3);
        let loss = if ds > 0 {
            (ds.saturating_sub(dr)) as f64 / ds as f64 * 100.0
        } else {
            0.0
        };
        let mode = row_mode(&a.via, minute - 1);
        let per_core = mbit / (cpu_pct / 100.0).max(1e-9);
        println!(
            "{minute:>6} {mode:>9} {mbit:>10.1} {cpu_pct:>8.0}% {rss:>9.0} {p50:>11.0} {p99:>11.0} {loss:>8.2} {per_core:>10.0}"
        );
        rows.push(serde_json::json!({"row": minute, "via": mode, "seconds": secs, "mbit_s": mbit, "relay_cpu_percent": cpu_pct,
            "relay_rss_mb": rss, "latency_p50_us": p50, "latency_p99_us": p99, "loss_percent": loss,
            "mbit_s_per_relay_core": per_core}));
        let e = per_mode.entry(mode).or_default();
        e.0 += mbit * secs;
        e.1 += cpu - last.1;
        last = (now, cpu, sent, recv, bytes);
        // The next row's traffic: switched now, so that the row starts on it (a row's first
        // payloads may still be on their way the old way).
        on_channel.store(row_mode(&a.via, minute) == "channel", Ordering::Relaxed);
    }
    let cpu_total = relay.cpu_seconds().unwrap_or(0.0) - cpu_start;
    let mbit_forwarded = bytes_total as f64 * 8.0 / 1e6;
    let mbit_s_per_core = mbit_forwarded / cpu_total.max(1e-9);
    let text = http_get(relay.metrics, "/metrics").await.1;
    let sessions_now = metric(&text, "tandem_relay_sessions");
    let refused: f64 = text
        .lines()
        .filter(|l| l.starts_with("tandem_relay_connections_refused_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b);
    let loaded_rss = relay.rss_bytes().unwrap_or(0);
    println!();
    println!(
        "relay forwarded {mbit_forwarded:.0} Mbit using {cpu_total:.1} CPU-s: {mbit_s_per_core:.0} Mbit/s per relay core overall"
    );
    let mut modes = serde_json::Map::new();
    for (mode, (mbit, cpu)) in &per_mode {
        println!(
            "  via {mode}: {mbit:.0} Mbit, {cpu:.1} relay CPU-s: {:.0} Mbit/s per relay core",
            mbit / cpu.max(1e-9)
        );
        modes.insert(
            mode.to_string(),
            serde_json::json!({"mbit": mbit, "relay_cpu_seconds": cpu, "mbit_s_per_relay_core": mbit / cpu.max(1e-9)}),
        );
    }
    if let (Some(d), Some(c)) = (per_mode.get("datagram"), per_mode.get("channel")) {
        println!(
            "  channel ÷ datagram, relay CPU per Mbit: {:.3}",
            (c.1 / c.0.max(1e-9)) / (d.1 / d.0.max(1e-9))
        );
    }
    println!(
        "sessions at the end: {sessions_now} (of {}), links lost: {}, send errors: {}, refused connections: {refused}",
        a.sessions,
        counters.lost_links.load(Ordering::Relaxed),
        counters.send_errors.load(Ordering::Relaxed)
    );
    println!(
        "relay memory: {:.0} MB idle → {:.0} MB loaded ({:.0} KiB per session)",
        idle_rss as f64 / 1e6,
        loaded_rss as f64 / 1e6,
        (loaded_rss.saturating_sub(idle_rss)) as f64 / 1024.0 / a.sessions as f64
    );
    let json = serde_json::json!({
        "sessions": a.sessions, "minutes": a.minutes, "kbps_per_session": a.kbps,
        "setup_seconds": setup_secs, "setup_connect_retries": connect_retries, "rows": rows,
        "mbit_forwarded": mbit_forwarded, "relay_cpu_seconds": cpu_total,
        "mbit_s_per_relay_core": mbit_s_per_core, "sessions_at_end": sessions_now,
        "via": a.via, "per_way": modes,
        "links_lost": counters.lost_links.load(Ordering::Relaxed),
        "send_errors": counters.send_errors.load(Ordering::Relaxed),
        "relay_rss_idle_bytes": idle_rss, "relay_rss_loaded_bytes": loaded_rss,
    });
    write_bench_json("soak", &json);
    tasks.abort_all();
    drop(pairs);
    relay.terminate().await;
}
