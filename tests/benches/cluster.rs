//! Relay cluster against a lone relay, in one run: three `tandem-relay` nodes sharing one
//! PostgreSQL (Debian's, a server of the bench's own) and one node on SQLite.
//!
//!     cargo bench -p tandem-tests --bench cluster [-- --joins 150 --sessions 1000 --kbps 180 --secs 30]
//!
//! * **Join latency**: from the console's first packet to `Joined` (connect, log in, join), the
//!   agent waiting with a code. Three kinds, interleaved: the lone relay; the cluster with the
//!   console on the agent's node; the cluster with the console on another node, which is
//!   redirected (a second connect and login on the agent's node); and the same redirect for a
//!   console given every node, which logs in on all of them at once (`tandem_session::join`).
//!   Median and p99, and the ratio to the lone relay's median.
//! * **Soak**: `--sessions` paired sessions with 1,100-byte payloads agent → console at `--kbps`
//!   each and 64-byte ones back every 100 ms, on the lone relay, then spread over the cluster
//!   (agents round-robin, consoles on a random node, redirected), `--secs` each. During the
//!   cluster's run PostgreSQL is stopped for a third of the time and started again: what was
//!   forwarded meanwhile is reported on its own. Setup errors, loss, relay CPU.
//!
//! Table on stdout, JSON in `target/bench/cluster.json`.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tandem_certs::{Fingerprint, RelayTrust};
use tandem_client::{ClientError, ConnectOptions, RelayLink};
use tandem_proto::Secret;
use tandem_tests::postgres::Postgres;
use tandem_tests::{
    RelayProcess, bench_arg, free_port, percentile, relay_admin, token_from_output,
    write_bench_json,
};

const VIDEO: usize = 1100;
const INPUT: usize = 64;

const LIMITS: &str = "[limits]\nmax_connections = 100000\nmax_connections_per_address = 100000\n\
    max_sessions = 100000\njoins_per_minute_per_technician = 1000000\n\
    joins_per_minute_per_address = 1000000\nauths_per_minute_per_address = 1000000\n\
    registers_per_minute_per_address = 1000000\nauth_queue = 100000\n";

struct Setup {
    name: &'static str,
    nodes: Vec<RelayProcess>,
    token: Secret,
    pin: Fingerprint,
}

impl Setup {
    fn opts(&self, node: usize) -> ConnectOptions {
        ConnectOptions::new(self.nodes[node].addr.clone(), RelayTrust::Pin(self.pin))
    }
    fn cpu(&self) -> f64 {
        self.nodes.iter().filter_map(|n| n.cpu_seconds()).sum()
    }
}

async fn lone(dir: &std::path::Path) -> Setup {
    let cfg = dir.join("relay.toml");
    std::fs::write(&cfg, LIMITS).unwrap();
    let token = token_from_output(&relay_admin(
        dir,
        &["technician", "add", "--org", "Bench", "--name", "bench"],
    ));
    let relay = RelayProcess::start_with(dir, &["--config", cfg.to_str().unwrap()]).await;
    Setup {
        name: "lone (SQLite)",
        pin: relay.pin,
        nodes: vec![relay],
        token,
    }
}

async fn cluster(pg: &Postgres, root: &std::path::Path) -> Setup {
    let cfg = root.join("relay.toml");
    std::fs::write(&cfg, LIMITS).unwrap();
    let ids = root.join("identity");
    std::fs::create_dir_all(&ids).unwrap();
    let identity = tandem_certs::ensure_identity(&ids, &[]).unwrap();
    let mut nodes = Vec::new();
    let mut token = None;
    for i in 1..=3 {
        let port = free_port();
        let dir = root.join(format!("node{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let args: Vec<String> = vec![
            "--config".into(),
            cfg.display().to_string(),
            "--store".into(),
            pg.url(),
            "--node".into(),
            format!("relay-{i}"),
            "--advertise".into(),
            format!("127.0.0.1:{port}"),
            "--cert".into(),
            ids.join(tandem_certs::RELAY_CERT_FILE)
                .display()
                .to_string(),
            "--key".into(),
            ids.join(tandem_certs::RELAY_KEY_FILE).display().to_string(),
        ];
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        if token.is_none() {
            let mut admin = a.clone();
            admin.extend(["technician", "add", "--org", "Bench", "--name", "bench"]);
            token = Some(token_from_output(&relay_admin(&dir, &admin)));
        }
        nodes.push(RelayProcess::start_on(&dir, &a, port).await);
    }
    Setup {
        name: "cluster (3 nodes, PostgreSQL)",
        nodes,
        token: token.unwrap(),
        pin: identity.fingerprint(),
    }
}

/// Connect, log in and join `slot` starting at node `opts`, following a redirect (on a shared
/// client endpoint when given). Returns the console's link.
async fn console_join(
    mut opts: ConnectOptions,
    token: &Secret,
    slot: &tandem_proto::Slot,
    ep: Option<&quinn::Endpoint>,
) -> Result<RelayLink, ClientError> {
    for _ in 0..2 {
        let mut link = match ep {
            Some(ep) => RelayLink::connect_on(ep, &opts).await?,
            None => RelayLink::connect(&opts).await?,
        };
        link.authenticate(token).await?;
        match link.join(slot).await {
            Ok(_) => return Ok(link),
            Err(ClientError::Redirected { relay }) => opts = opts.for_node(&relay),
            Err(e) => return Err(e),
        }
    }
    Err(ClientError::Protocol("redirected twice".into()))
}

/// One join's latency (ms): agent on `agent_node` waits with a code, the console starts at
/// `console_node`.
async fn one_join(s: &Setup, agent_node: usize, console_node: usize) -> f64 {
    let mut agent = RelayLink::connect(&s.opts(agent_node)).await.unwrap();
    let (slot, _) = agent.register().await.unwrap();
    let t = Instant::now();
    let console = console_join(s.opts(console_node), &s.token, &slot, None)
        .await
        .unwrap();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    agent.wait_paired().await.unwrap();
    console.close().await;
    agent.close().await;
    ms
}

/// Like [`one_join`], for a console that was given every node (as `tandem_session::join` does
/// then): it logs in on all of them at once and joins on `console_node`; a redirect finds the
/// agent's node's link ready.
async fn one_join_listed(s: &Setup, agent_node: usize, console_node: usize) -> f64 {
    let mut agent = RelayLink::connect(&s.opts(agent_node)).await.unwrap();
    let (slot, _) = agent.register().await.unwrap();
    let t = Instant::now();
    let mut links: Vec<_> = (0..s.nodes.len())
        .map(|i| {
            let (o, token) = (s.opts(i), s.token.clone());
            Some(tokio::spawn(async move {
                let mut l = RelayLink::connect(&o).await.unwrap();
                l.authenticate(&token).await.unwrap();
                l
            }))
        })
        .collect();
    let mut link = links[console_node].take().unwrap().await.unwrap();
    if let Err(e) = link.join(&slot).await {
        let ClientError::Redirected { relay } = e else {
            panic!("{e}")
        };
        let i = s.nodes.iter().position(|n| n.addr == relay).unwrap();
        tokio::spawn(link.close());
        link = links[i].take().unwrap().await.unwrap();
        link.join(&slot).await.unwrap();
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    agent.wait_paired().await.unwrap();
    link.close().await;
    agent.close().await;
    for l in links.into_iter().flatten() {
        if let Ok(l) = l.await {
            l.close().await;
        }
    }
    ms
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    send_errors: AtomicU64,
}

/// Pairs `n` sessions on `s` (agents round-robin over its nodes, consoles on another node) and
/// runs traffic for `secs`; `during` runs at a third of the time (the database's stop and start).
/// Returns the JSON row.
async fn soak<F: std::future::Future<Output = ()>>(
    s: &Setup,
    n: usize,
    kbps: f64,
    secs: f64,
    during: impl FnOnce() -> F,
) -> serde_json::Value {
    let eps: Vec<quinn::Endpoint> = (0..4)
        .map(|i| {
            let o = s.opts(i % s.nodes.len());
            let addr: std::net::SocketAddr = o.relay.parse().unwrap();
            tandem_client::client_endpoint_with_port(&o, addr)
                .unwrap()
                .0
        })
        .collect();
    let setup_errors = Arc::new(AtomicU64::new(0));
    let t_setup = Instant::now();
    let mut pairs = Vec::new();
    for chunk in 0..n.div_ceil(50) {
        let mut js = tokio::task::JoinSet::new();
        for i in chunk * 50..(chunk * 50 + 50).min(n) {
            let ep = eps[i % eps.len()].clone();
            let agent_opts = s.opts(i % s.nodes.len());
            let console_opts = s.opts((i + 1) % s.nodes.len());
            let (token, errors) = (s.token.clone(), setup_errors.clone());
            let fut = async move {
                let mut ag = RelayLink::connect_on(&ep, &agent_opts).await?;
                let (slot, _) = ag.register().await?;
                let co = console_join(console_opts, &token, &slot, Some(&ep)).await?;
                ag.wait_paired().await?;
                Ok::<_, ClientError>((ag, co))
            };
            js.spawn(async move {
                let r = match tokio::time::timeout(Duration::from_secs(30), fut).await {
                    Ok(r) => r,
                    Err(_) => Err(ClientError::Protocol("set-up took over 30 s".into())),
                };
                (r, errors)
            });
        }
        while let Some(r) = js.join_next().await {
            let (r, errors) = r.unwrap();
            match r {
                Ok(p) => pairs.push(p),
                Err(e) => {
                    eprintln!("setup failed: {e}");
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    let setup_secs = t_setup.elapsed().as_secs_f64();
    let c = Arc::new(Counters::default());
    let mut tasks = tokio::task::JoinSet::new();
    let interval = Duration::from_secs_f64(VIDEO as f64 * 8.0 / (kbps * 1000.0));
    for (k, (ag, co)) in pairs.iter().enumerate() {
        let offset = interval.mul_f64(k as f64 / pairs.len().max(1) as f64);
        for (from, to, size, every) in [
            (
                ag.connection().clone(),
                co.connection().clone(),
                VIDEO,
                interval,
            ),
            (
                co.connection().clone(),
                ag.connection().clone(),
                INPUT,
                Duration::from_millis(100),
            ),
        ] {
            let c1 = c.clone();
            tasks.spawn(async move {
                tokio::time::sleep(offset).await;
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let buf = bytes::Bytes::from(vec![7u8; size]);
                loop {
                    tick.tick().await;
                    match from.send_datagram(buf.clone()) {
                        Ok(()) => c1.sent.fetch_add(1, Ordering::Relaxed),
                        Err(_) => c1.send_errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
            let c2 = c.clone();
            tasks.spawn(async move {
                while to.read_datagram().await.is_ok() {
                    c2.received.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }
    let snap = |c: &Counters| {
        (
            c.sent.load(Ordering::Relaxed),
            c.received.load(Ordering::Relaxed),
        )
    };
    let cpu0 = s.cpu();
    let t0 = Instant::now();
    let third = Duration::from_secs_f64(secs / 3.0);
    tokio::time::sleep(third).await;
    let before = snap(&c);
    let t_during = Instant::now();
    during().await;
    let during_secs = t_during.elapsed().as_secs_f64();
    let after = snap(&c);
    tokio::time::sleep(Duration::from_secs_f64(secs).saturating_sub(t0.elapsed())).await;
    // Let the last payloads land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let end = snap(&c);
    let cpu = s.cpu() - cpu0;
    let loss = |a: (u64, u64), b: (u64, u64)| {
        let sent = b.0 - a.0;
        if sent == 0 {
            0.0
        } else {
            sent.saturating_sub(b.1 - a.1) as f64 / sent as f64 * 100.0
        }
    };
    let total_loss = loss((0, 0), end);
    let during_loss = loss(before, after);
    let mbit = end.1 as f64 * VIDEO as f64 * 8.0 / 1e6;
    tasks.abort_all();
    // Dropped, not closed one by one (a graceful close waits for the relay's goodbye).
    drop(pairs);
    serde_json::json!({
        "setup": s.name, "sessions": n, "setup_seconds": setup_secs,
        "setup_errors": setup_errors.load(Ordering::Relaxed),
        "sent": end.0, "received": end.1, "send_errors": c.send_errors.load(Ordering::Relaxed),
        "loss_percent": total_loss, "loss_percent_during_event": during_loss,
        "event_seconds": during_secs, "relay_cpu_seconds": cpu, "approx_mbit": mbit,
    })
}

fn main() {
    tandem_tests::bench_main(run());
}

async fn run() {
    let joins: usize = bench_arg("--joins", 150);
    let sessions: usize = bench_arg("--sessions", 1000);
    let kbps: f64 = bench_arg("--kbps", 180.0);
    let secs: f64 = bench_arg("--secs", 30.0);
    let pg = Postgres::start().expect("PostgreSQL is needed (scripts/deps.sh installs it)");
    let lone_dir = tempfile::tempdir().unwrap();
    let cl_dir = tempfile::tempdir().unwrap();
    let lone = lone(lone_dir.path()).await;
    let cl = cluster(&pg, cl_dir.path()).await;

    // ---- join latency, interleaved ----
    let (mut l, mut same, mut other, mut listed) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..joins {
        l.push(one_join(&lone, 0, 0).await);
        let a = i % 3;
        same.push(one_join(&cl, a, a).await);
        other.push(one_join(&cl, a, (a + 1) % 3).await);
        listed.push(one_join_listed(&cl, a, (a + 1) % 3).await);
    }
    let base = percentile(&l, 0.5);
    println!();
    println!("Join latency, {joins} joins each, interleaved (connect + log in + join, loopback)");
    println!(
        "{:<46} {:>9} {:>9} {:>14}",
        "", "p50 ms", "p99 ms", "p50 ÷ lone"
    );
    let mut jrows = Vec::new();
    for (name, v) in [
        ("lone relay (SQLite)", &l),
        ("cluster, console on the agent's node", &same),
        ("cluster, console on another node (redirect)", &other),
        ("cluster, redirect, console given every node", &listed),
    ] {
        let (p50, p99) = (percentile(v, 0.5), percentile(v, 0.99));
        println!("{name:<46} {p50:>9.2} {p99:>9.2} {:>14.2}", p50 / base);
        jrows.push(serde_json::json!({"kind": name, "p50_ms": p50, "p99_ms": p99, "ratio_to_lone": p50 / base}));
    }

    // ---- soak: the lone relay, then the cluster with a database restart in the middle ----
    let lone_row = soak(&lone, sessions, kbps, secs, || async {
        tokio::time::sleep(Duration::from_secs_f64(secs / 3.0)).await;
    })
    .await;
    let pg_ref = &pg;
    let cl_row = soak(&cl, sessions, kbps, secs, || async move {
        pg_ref.stop();
        tokio::time::sleep(Duration::from_secs_f64(secs / 3.0)).await;
        pg_ref.start_again();
    })
    .await;
    println!();
    println!(
        "Soak: {sessions} sessions × {kbps} kbit/s for {secs} s each (the cluster's PostgreSQL stopped for the middle third)"
    );
    println!(
        "{:<32} {:>8} {:>10} {:>10} {:>9} {:>16} {:>10}",
        "", "setup s", "set-up err", "send err", "loss %", "loss % (middle)", "relay CPU"
    );
    for r in [&lone_row, &cl_row] {
        println!(
            "{:<32} {:>8.1} {:>10} {:>10} {:>9.3} {:>16.3} {:>9.1}s",
            r["setup"].as_str().unwrap(),
            r["setup_seconds"].as_f64().unwrap(),
            r["setup_errors"],
            r["send_errors"],
            r["loss_percent"].as_f64().unwrap(),
            r["loss_percent_during_event"].as_f64().unwrap(),
            r["relay_cpu_seconds"].as_f64().unwrap(),
        );
    }
    write_bench_json(
        "cluster",
        &serde_json::json!({"joins": jrows, "soak": [lone_row, cl_row], "kbps": kbps, "secs": secs}),
    );
    for n in lone.nodes.into_iter().chain(cl.nodes) {
        n.terminate().await;
    }
}
