//! Relay benchmark: in one run, on this machine,
//!   1. datagram round-trip time through the relay vs a direct quinn connection (added RTT),
//!   2. payload-stream throughput through the relay vs direct (ratio), and the same for a quinn
//!      connection whose packets cross the relay on a relay channel (`tandem_net::channel`: how a
//!      session's inner connection crosses it) against a direct one with the same packet size,
//!   3. relay resident memory with N paired idle sessions (default 1,000),
//!   4. relay resident memory with N unpaired connections (registered agents waiting, from 25
//!      loopback addresses; a fresh relay process), and what 100 unpaired agents pushing all they
//!      can (payload streams, a second stream, DATAGRAMs) add to it,
//!   5. connection setup time (QUIC handshake, which includes the relay's address-validating Retry)
//!      on loopback and through a 40 ms RTT proxy.
//!
//! The relay is the real `tandem-relay` binary in its own process (release build); the direct
//! baseline is a quinn server with the same transport settings in this process. Prints a table and
//! JSON (also written to target/bench/relay.json). `--memory-only` skips 1 and 2, `--unpaired-only`
//! measures only 4;
//! `TANDEM_BIN_TANDEM_RELAY=PATH` measures another build of the relay.
//!
//!     cargo bench -p tandem-tests --bench relay [-- --sessions 1000 --quick --memory-only]
#![allow(clippy::unwrap_used, clippy::print_literal)]

use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_certs::{Fingerprint, RelayTrust};
use tandem_client::{ConnectOptions, RelayLink};
use tandem_tests::{http_get, load_relay, percentile};

const ALPN: &[u8] = b"tandem-bench";

struct Args {
    sessions: usize,
    rtt_samples: usize,
    transfer_mib: usize,
    rounds: usize,
    memory_only: bool,
    unpaired_only: bool,
}

fn args() -> Args {
    let mut a = Args {
        sessions: 1000,
        rtt_samples: 3000,
        transfer_mib: 64,
        rounds: 5,
        memory_only: false,
        unpaired_only: false,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        match argv[i].as_str() {
            "--sessions" => {
                a.sessions = argv[i + 1].parse().unwrap();
                i += 1;
            }
            "--quick" => {
                a.sessions = 100;
                a.rtt_samples = 500;
                a.transfer_mib = 16;
                a.rounds = 3;
            }
            "--memory-only" => a.memory_only = true,
            "--unpaired-only" => a.unpaired_only = true,
            _ => {} // cargo bench passes --bench
        }
        i += 1;
    }
    a
}

/// Round trips of a 64-byte datagram; `send` and `recv` are the two ends of the measured path, the
/// echo is done by the far side.
async fn rtt_samples(a: &quinn::Connection, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    let mut seq: u64 = 0;
    let mut lost = 0;
    while out.len() < n {
        seq += 1;
        let mut p = vec![0u8; 64];
        p[..8].copy_from_slice(&seq.to_le_bytes());
        let t = Instant::now();
        a.send_datagram(Bytes::from(p)).unwrap();
        loop {
            match tokio::time::timeout(Duration::from_millis(200), a.read_datagram()).await {
                Ok(Ok(d)) if d.len() >= 8 && d[..8] == seq.to_le_bytes() => {
                    out.push(t.elapsed().as_secs_f64() * 1e6);
                    break;
                }
                Ok(Ok(_)) => continue, // a late echo of an earlier probe
                Ok(Err(e)) => panic!("connection lost: {e}"),
                Err(_) => {
                    lost += 1;
                    assert!(lost < 100, "too many lost probes");
                    break;
                }
            }
        }
    }
    out
}

fn echo_datagrams(c: quinn::Connection) {
    tokio::spawn(async move {
        while let Ok(d) = c.read_datagram().await {
            let _ = c.send_datagram(d);
        }
    });
}

/// Sends `mib` MiB as 16 KiB length-prefixed frames on a fresh uni stream of `tx`, received by `rx`;
/// returns MB/s (from first write to last byte read).
async fn transfer(tx: &quinn::Connection, rx: &quinn::Connection, mib: usize) -> f64 {
    const FRAME: usize = 16 * 1024;
    let frames = mib * 1024 * 1024 / FRAME;
    let txc = tx.clone();
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        let mut s = txc.open_uni().await.unwrap();
        let mut buf = vec![0x5au8; FRAME + 4];
        buf[..4].copy_from_slice(&(FRAME as u32).to_be_bytes());
        for _ in 0..frames {
            s.write_all(&buf).await.unwrap();
        }
        s.finish().unwrap();
        // keep the stream alive until it is acknowledged
        let _ = s.stopped().await;
    });
    let mut r = rx.accept_uni().await.unwrap();
    let mut total = 0usize;
    let want = frames * (FRAME + 4);
    let mut buf = vec![0u8; 64 * 1024];
    while total < want {
        match r.read(&mut buf).await.unwrap() {
            Some(n) => total += n,
            None => break,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = sender.await;
    assert_eq!(total, want);
    (frames * FRAME) as f64 / secs / 1e6
}

/// The bench's quinn configurations: the outer link's transport settings, packets capped at
/// `mtu_cap` bytes when given (a session's inner connection caps them at 1,380).
fn bench_configs(mtu_cap: Option<u16>) -> (quinn::ServerConfig, quinn::ClientConfig) {
    let transport = |keep_alive| {
        let mut t = tandem_net::transport_config(keep_alive);
        if let Some(cap) = mtu_cap {
            let mut m = quinn::MtuDiscoveryConfig::default();
            m.upper_bound(cap);
            t.mtu_discovery_config(Some(m));
        }
        Arc::new(t)
    };
    let g = tandem_certs::generate(&[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.pem"),
        format!("{}{}", g.relay_pem, g.ca_pem),
    )
    .unwrap();
    std::fs::write(dir.path().join("k.pem"), &g.relay_key_pem).unwrap();
    let id =
        tandem_certs::load_identity(&dir.path().join("c.pem"), &dir.path().join("k.pem")).unwrap();
    let tls = tandem_certs::server_config(&id, ALPN).unwrap();
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
    ));
    sc.transport_config(transport(false));
    let ctls = RelayTrust::Pin(id.fingerprint())
        .client_config(ALPN)
        .unwrap();
    let mut cc = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(ctls).unwrap(),
    ));
    cc.transport_config(transport(true));
    (sc, cc)
}

async fn direct_pair(
    mtu_cap: Option<u16>,
) -> (quinn::Endpoint, quinn::Connection, quinn::Connection) {
    let (sc, cc) = bench_configs(mtu_cap);
    let server = tandem_net::server_endpoint("127.0.0.1:0".parse().unwrap(), sc).unwrap();
    let addr = server.local_addr().unwrap();
    let client = tandem_net::client_endpoint(addr, cc).unwrap();
    let (c, s) = tokio::join!(
        async { client.connect(addr, "localhost").unwrap().await.unwrap() },
        async { server.accept().await.unwrap().await.unwrap() }
    );
    (client, c, s)
}

/// A quinn connection between two paired relay links whose packets cross the relay on its
/// channel (the session's carrier, as an agent and a console use it), with packets capped at
/// 1,380 bytes like a session's inner connection.
struct ChannelPair {
    _links: (RelayLink, RelayLink),
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
    client: quinn::Connection,
    server: quinn::Connection,
}

async fn channel_pair(
    opts: &ConnectOptions,
    token: &tandem_proto::Secret,
    channel: bool,
) -> ChannelPair {
    use tandem_session::carrier::Carrier;
    let mut agent = RelayLink::connect(opts).await.unwrap();
    let (slot, _) = agent.register().await.unwrap();
    let mut console = RelayLink::connect(opts).await.unwrap();
    console.authenticate(token).await.unwrap();
    console.join(&slot).await.unwrap();
    agent.wait_paired().await.unwrap();
    let (ca, cc) = (
        Carrier::new(tandem_session::Fallback::Fragment),
        Carrier::new(tandem_session::Fallback::Fragment),
    );
    if !channel {
        // The same carrier on the outer connections' DATAGRAM frames (fragments while the
        // outer datagram size is below the inner packet size), as before relay channels.
        ca.attach(agent.connection().clone(), None);
        cc.attach(console.connection().clone(), None);
    } else {
        ca.attach(agent.connection().clone(), agent.channel());
        cc.attach(console.connection().clone(), console.channel());
    }
    let t = Instant::now();
    while channel && !(ca.on_channel() && cc.on_channel()) {
        assert!(t.elapsed() < Duration::from_secs(5), "no relay channel");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (a_addr, c_addr) = (
        "192.0.2.1:1".parse().unwrap(),
        "192.0.2.2:1".parse().unwrap(),
    );
    let (sc, ccfg) = bench_configs(Some(1380));
    let rt = Arc::new(quinn::TokioRuntime);
    let server = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(sc),
        Arc::new(ca.socket(a_addr, c_addr).unwrap()),
        rt.clone(),
    )
    .unwrap();
    let mut client = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        Arc::new(cc.socket(c_addr, a_addr).unwrap()),
        rt,
    )
    .unwrap();
    client.set_default_client_config(ccfg);
    let (c, s) = tokio::join!(
        async { client.connect(a_addr, "localhost").unwrap().await.unwrap() },
        async { server.accept().await.unwrap().await.unwrap() }
    );
    ChannelPair {
        _links: (agent, console),
        _endpoints: (client, server),
        client: c,
        server: s,
    }
}

/// Times of `n` QUIC handshakes (client side: from the first Initial to the handshake's end) with
/// the relay at `target` (the relay itself, or a proxy in front of it).
async fn connect_times(opts: &ConnectOptions, target: std::net::SocketAddr, n: usize) -> Vec<f64> {
    let ep = tandem_client::client_endpoint(opts, target).unwrap();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let c = ep.connect(target, "127.0.0.1").unwrap().await.unwrap();
        out.push(t.elapsed().as_secs_f64() * 1e3);
        c.close(0u32.into(), b"");
    }
    ep.wait_idle().await;
    out
}

/// Relay RSS with no connections, at `half_n` and at `n` of them.
struct Rss {
    idle: u64,
    half: u64,
    full: u64,
    half_n: usize,
    n: usize,
}

impl Rss {
    /// Bytes per connection between half and all: free of one-off costs.
    fn marginal(&self) -> f64 {
        self.full.saturating_sub(self.half) as f64 / (self.n - self.half_n).max(1) as f64
    }
    /// Bytes per connection from none to all, one-off costs included.
    fn average(&self) -> f64 {
        self.full.saturating_sub(self.idle) as f64 / self.n.max(1) as f64
    }
}

/// Relay RSS with `n` registered agents waiting (unpaired), on a fresh relay process.
async fn unpaired_memory(n: usize) -> Rss {
    let dir = tempfile::tempdir().unwrap();
    let (relay, _) = load_relay(dir.path(), "Bench").await;
    let opts = ConnectOptions::new(relay.addr.clone(), RelayTrust::Pin(relay.pin));
    let relay_addr: std::net::SocketAddr = relay.addr.parse().unwrap();
    // 40 agents per loopback address: inside the default per-address registration budget.
    const PER_ADDRESS: usize = 40;
    let eps: Vec<_> = (0..n.div_ceil(PER_ADDRESS))
        .map(|i| {
            let ep = tandem_client::client_endpoint(&opts, relay_addr).unwrap();
            let ip = std::net::Ipv4Addr::new(127, 2, (i / 200) as u8, (i % 200 + 1) as u8);
            ep.rebind(std::net::UdpSocket::bind((ip, 0)).unwrap())
                .unwrap();
            ep
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = relay.rss_bytes().unwrap_or(0);
    let half_n = n / 2 / 50 * 50;
    let mut half = 0;
    let mut links = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(50) {
        if chunk * 50 == half_n && chunk > 0 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            half = relay.rss_bytes().unwrap_or(0);
        }
        let mut js = tokio::task::JoinSet::new();
        for i in chunk * 50..(chunk * 50 + 50).min(n) {
            let (ep, opts) = (eps[i / PER_ADDRESS].clone(), opts.clone());
            js.spawn(async move {
                let mut ag = RelayLink::connect_on(&ep, &opts).await.unwrap();
                ag.register().await.unwrap();
                ag
            });
        }
        while let Some(r) = js.join_next().await {
            links.push(r.unwrap());
        }
    }
    let h: serde_json::Value =
        serde_json::from_str(&http_get(relay.metrics, "/health").await.1).unwrap();
    assert_eq!(h["agents_waiting"].as_u64().unwrap() as usize, n, "{h}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let full = relay.rss_bytes().unwrap_or(0);
    drop(links);
    relay.terminate().await;
    Rss {
        idle,
        half,
        full,
        half_n,
        n,
    }
}

/// Unpaired connections that push data in [`hostile_unpaired_memory`].
const HOSTILE: usize = 100;

/// What an unpaired connection can make the relay hold: `n` registered agents (fresh relay) each
/// push all they can without being paired (payload streams, a second bidirectional stream, a burst
/// of DATAGRAMs), bounded by a deadline. Returns (RSS before, RSS after) of the relay.
async fn hostile_unpaired_memory(n: usize) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let (relay, _) = load_relay(dir.path(), "Bench").await;
    let opts = ConnectOptions::new(relay.addr.clone(), RelayTrust::Pin(relay.pin));
    let ep = tandem_client::client_endpoint(&opts, relay.addr.parse().unwrap()).unwrap();
    let mut links = Vec::with_capacity(n);
    for _ in 0..n {
        let mut ag = RelayLink::connect_on(&ep, &opts).await.unwrap();
        ag.register().await.unwrap();
        links.push(ag);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = relay.rss_bytes().unwrap_or(0);
    let chunk = Bytes::from(vec![0x42u8; 64 * 1024]);
    let mut js = tokio::task::JoinSet::new();
    for l in &links {
        let c = l.connection().clone();
        let chunk = chunk.clone();
        js.spawn(async move {
            let push = async {
                // 2 MiB per stream, as far as flow control lets it go.
                let mut streams = Vec::new();
                for _ in 0..4 {
                    if let Ok(s) = c.open_uni().await {
                        streams.push(s);
                    }
                }
                for s in &mut streams {
                    for _ in 0..32 {
                        if s.write_chunk(chunk.clone()).await.is_err() {
                            break;
                        }
                    }
                }
                if let Ok((mut s, _r)) = c.open_bi().await {
                    for _ in 0..32 {
                        if s.write_chunk(chunk.clone()).await.is_err() {
                            break;
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(3), push).await;
            for _ in 0..2000 {
                let _ = c.send_datagram(Bytes::from(vec![0x17u8; 1100]));
                tokio::task::yield_now().await;
            }
        });
    }
    while js.join_next().await.is_some() {}
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = relay.rss_bytes().unwrap_or(0);
    drop(links);
    relay.terminate().await;
    (before, after)
}

fn fmt_row(name: &str, direct: f64, relayed: f64, unit: &str, extra: &str) {
    println!("{name:<34} {direct:>12.1} {relayed:>12.1} {unit:<6} {extra}");
}

fn main() {
    let a = args();
    tandem_tests::bench_main(run(a));
}

async fn run(a: Args) {
    // The relay, a technician, and limits raised for a load test from one address.
    let dir = tempfile::tempdir().unwrap();
    let (relay, token) = load_relay(dir.path(), "Bench").await;
    let opts = ConnectOptions::new(relay.addr.clone(), RelayTrust::Pin(relay.pin));
    let _: Fingerprint = relay.pin;

    if a.unpaired_only {
        let (b, h) = hostile_unpaired_memory(HOSTILE).await;
        println!(
            "relay memory per hostile unpaired agent: {:.1} KiB ({:.1} → {:.1} MiB with {HOSTILE})",
            h.saturating_sub(b) as f64 / HOSTILE as f64 / 1024.0,
            b as f64 / 1048576.0,
            h as f64 / 1048576.0
        );
        let un = unpaired_memory(a.sessions).await;
        println!(
            "relay memory per unpaired agent: {:.1} KiB marginal, {:.1} KiB average ({:.1} → {:.1} → {:.1} MiB)",
            un.marginal() / 1024.0,
            un.average() / 1024.0,
            un.idle as f64 / 1048576.0,
            un.half as f64 / 1048576.0,
            un.full as f64 / 1048576.0
        );
        relay.terminate().await;
        return;
    }
    // ---- connection setup: the Retry's round trip ----
    let relay_addr: std::net::SocketAddr = relay.addr.parse().unwrap();
    let connect_lo = connect_times(&opts, relay_addr, 200).await;
    let proxy = tandem_tests::impair::ImpairProxy::start(
        relay_addr,
        tandem_tests::impair::Impairment::rtt_loss(Duration::from_millis(40), 0.0),
        tandem_tests::impair::Impairment::rtt_loss(Duration::from_millis(40), 0.0),
    )
    .await;
    let connect_40 = connect_times(&opts, proxy.addr, 20).await;
    drop(proxy);

    let paths = if a.memory_only {
        Paths::skipped()
    } else {
        paths(&a, &relay, &opts, &token).await
    };
    let paired = memory_paired(&a, &relay, &opts, &token).await;
    let unpaired = unpaired_memory(a.sessions).await;
    let hostile = hostile_unpaired_memory(HOSTILE).await;
    report(
        &a,
        Report {
            paths,
            paired,
            unpaired,
            connect_lo,
            connect_40,
            hostile,
        },
    );
    relay.terminate().await;
}

struct Report {
    paths: Paths,
    paired: Paired,
    unpaired: Rss,
    connect_lo: Vec<f64>,
    connect_40: Vec<f64>,
    /// Relay RSS before and after the hostile unpaired agents pushed.
    hostile: (u64, u64),
}

/// Datagram round trips and stream throughput, direct and through the relay.
struct Paths {
    d_rtt: Vec<f64>,
    r_rtt: Vec<f64>,
    d_tp: Vec<f64>,
    r_tp: Vec<f64>,
    /// The same through the relay with both sides' links on TLS over TCP.
    t_rtt: Vec<f64>,
    t_tp: Vec<f64>,
    mbit_per_cpu_s: f64,
    relay_cpu: f64,
    relay_time: f64,
    /// Direct quinn with packets capped at 1,380 bytes, and the same through a relay channel.
    dc_rtt: Vec<f64>,
    c_rtt: Vec<f64>,
    dc_tp: Vec<f64>,
    c_tp: Vec<f64>,
    channel_mbit_per_cpu_s: f64,
    /// The same carrier on the outer connections' DATAGRAM frames.
    g_rtt: Vec<f64>,
    g_tp: Vec<f64>,
    dgram_mbit_per_cpu_s: f64,
}

impl Paths {
    /// `--memory-only`: nothing measured.
    fn skipped() -> Paths {
        Paths {
            d_rtt: vec![],
            r_rtt: vec![],
            d_tp: vec![f64::NAN],
            r_tp: vec![f64::NAN],
            t_rtt: vec![],
            t_tp: vec![f64::NAN],
            mbit_per_cpu_s: f64::NAN,
            relay_cpu: f64::NAN,
            relay_time: f64::NAN,
            dc_rtt: vec![],
            c_rtt: vec![],
            dc_tp: vec![f64::NAN],
            c_tp: vec![f64::NAN],
            channel_mbit_per_cpu_s: f64::NAN,
            g_rtt: vec![],
            g_tp: vec![f64::NAN],
            dgram_mbit_per_cpu_s: f64::NAN,
        }
    }
}

/// Relay memory with paired idle sessions, and how long setting them up took.
struct Paired {
    rss: Rss,
    setups: Vec<f64>,
    setup_secs: f64,
}

async fn paths(
    a: &Args,
    relay: &tandem_tests::RelayProcess,
    opts: &ConnectOptions,
    token: &tandem_proto::Secret,
) -> Paths {
    let (_dep, dc, ds) = direct_pair(None).await;
    echo_datagrams(ds.clone());
    let mut agent = RelayLink::connect(opts).await.unwrap();
    let (slot, _) = agent.register().await.unwrap();
    let mut console = RelayLink::connect(opts).await.unwrap();
    console.authenticate(token).await.unwrap();
    console.join(&slot).await.unwrap();
    agent.wait_paired().await.unwrap();
    echo_datagrams(console.connection().clone());
    // The same pair with both links on TLS over TCP.
    let mut tcp_opts = opts.clone();
    tcp_opts.transports = tandem_client::Transports::Tcp;
    let mut t_agent = RelayLink::connect(&tcp_opts).await.unwrap();
    let (slot, _) = t_agent.register().await.unwrap();
    let mut t_console = RelayLink::connect(&tcp_opts).await.unwrap();
    t_console.authenticate(token).await.unwrap();
    t_console.join(&slot).await.unwrap();
    t_agent.wait_paired().await.unwrap();
    echo_datagrams(t_console.connection().clone());

    // ---- RTT, interleaved in rounds so that machine noise hits both alike ----
    let _ = rtt_samples(&dc, 200).await;
    let _ = rtt_samples(agent.connection(), 200).await;
    let per_round = a.rtt_samples / a.rounds;
    let _ = rtt_samples(t_agent.connection(), 200).await;
    let (mut d_rtt, mut r_rtt, mut t_rtt) = (vec![], vec![], vec![]);
    for _ in 0..a.rounds {
        d_rtt.extend(rtt_samples(&dc, per_round).await);
        r_rtt.extend(rtt_samples(agent.connection(), per_round).await);
        t_rtt.extend(rtt_samples(t_agent.connection(), per_round).await);
    }

    // ---- throughput, interleaved ----
    let (mut d_tp, mut r_tp, mut t_tp) = (vec![], vec![], vec![]);
    for _ in 0..a.rounds {
        t_tp.push(transfer(t_agent.connection(), t_console.connection(), a.transfer_mib).await);
    }
    t_agent.close().await;
    t_console.close().await;
    let cpu0 = relay.cpu_seconds().unwrap_or(0.0);
    let mut relay_bytes = 0.0;
    let mut relay_time = 0.0;
    for _ in 0..a.rounds {
        d_tp.push(transfer(&dc, &ds, a.transfer_mib).await);
        let t = Instant::now();
        r_tp.push(transfer(agent.connection(), console.connection(), a.transfer_mib).await);
        relay_time += t.elapsed().as_secs_f64();
        relay_bytes += (a.transfer_mib * 1024 * 1024) as f64;
    }
    let relay_cpu = relay.cpu_seconds().unwrap_or(0.0) - cpu0;
    let mbit_per_cpu_s = relay_bytes * 8.0 / 1e6 / relay_cpu.max(1e-9);
    agent.close().await;
    console.close().await;

    // ---- the relay channel against direct quinn with the same packet size, and against the
    // same carrier on the outer DATAGRAM frames; interleaved ----
    let (_cep, cdc, cds) = direct_pair(Some(1380)).await;
    echo_datagrams(cds.clone());
    let ch = channel_pair(opts, token, true).await;
    echo_datagrams(ch.server.clone());
    let dg = channel_pair(opts, token, false).await;
    echo_datagrams(dg.server.clone());
    let _ = rtt_samples(&cdc, 200).await;
    let _ = rtt_samples(&ch.client, 200).await;
    let _ = rtt_samples(&dg.client, 200).await;
    let (mut dc_rtt, mut c_rtt, mut g_rtt) = (vec![], vec![], vec![]);
    let (mut dc_tp, mut c_tp, mut g_tp) = (vec![], vec![], vec![]);
    for _ in 0..a.rounds {
        dc_rtt.extend(rtt_samples(&cdc, per_round).await);
        c_rtt.extend(rtt_samples(&ch.client, per_round).await);
        g_rtt.extend(rtt_samples(&dg.client, per_round).await);
    }
    let (mut channel_cpu, mut dgram_cpu, mut channel_bytes) = (0.0, 0.0, 0.0);
    for _ in 0..a.rounds {
        dc_tp.push(transfer(&cdc, &cds, a.transfer_mib).await);
        let cpu = relay.cpu_seconds().unwrap_or(0.0);
        c_tp.push(transfer(&ch.client, &ch.server, a.transfer_mib).await);
        let cpu2 = relay.cpu_seconds().unwrap_or(0.0);
        channel_cpu += cpu2 - cpu;
        g_tp.push(transfer(&dg.client, &dg.server, a.transfer_mib).await);
        dgram_cpu += relay.cpu_seconds().unwrap_or(0.0) - cpu2;
        channel_bytes += (a.transfer_mib * 1024 * 1024) as f64;
    }
    let dgram_mbit_per_cpu_s = channel_bytes * 8.0 / 1e6 / dgram_cpu.max(1e-9);
    let channel_mbit_per_cpu_s = channel_bytes * 8.0 / 1e6 / channel_cpu.max(1e-9);
    drop((ch, dg));
    Paths {
        dc_rtt,
        c_rtt,
        dc_tp,
        c_tp,
        channel_mbit_per_cpu_s,
        g_rtt,
        g_tp,
        dgram_mbit_per_cpu_s,
        d_rtt,
        r_rtt,
        d_tp,
        r_tp,
        t_rtt,
        t_tp,
        mbit_per_cpu_s,
        relay_cpu,
        relay_time,
    }
}

async fn memory_paired(
    a: &Args,
    relay: &tandem_tests::RelayProcess,
    opts: &ConnectOptions,
    token: &tandem_proto::Secret,
) -> Paired {
    // ---- memory with N paired idle sessions ----
    let health = |m| async move { http_get(m, "/health").await.1 };
    let idle_rss = relay.rss_bytes().unwrap_or(0);
    let ep = tandem_client::client_endpoint(opts, relay.addr.parse().unwrap()).unwrap();
    let mut links = Vec::with_capacity(a.sessions * 2);
    let t_setup = Instant::now();
    let mut setups = Vec::with_capacity(a.sessions);
    // RSS is sampled at half and at all sessions: the slope between the two is the marginal cost of a
    // session, free of one-off costs (the authentication threads' Argon2 memory, runtime warm-up).
    let mut half_rss = 0;
    for chunk in 0..a.sessions.div_ceil(50) {
        if chunk * 50 == a.sessions / 2 / 50 * 50 && half_rss == 0 && chunk > 0 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            half_rss = relay.rss_bytes().unwrap_or(0);
        }
        let n = 50.min(a.sessions - chunk * 50);
        let mut js = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (ep, opts, token) = (ep.clone(), opts.clone(), token.clone());
            js.spawn(async move {
                let t = Instant::now();
                let mut ag = RelayLink::connect_on(&ep, &opts).await.unwrap();
                let (slot, _) = ag.register().await.unwrap();
                let mut co = RelayLink::connect_on(&ep, &opts).await.unwrap();
                co.authenticate(&token).await.unwrap();
                co.join(&slot).await.unwrap();
                ag.wait_paired().await.unwrap();
                (ag, co, t.elapsed().as_secs_f64() * 1e3)
            });
        }
        while let Some(r) = js.join_next().await {
            let (ag, co, ms) = r.unwrap();
            setups.push(ms);
            links.push(ag);
            links.push(co);
        }
    }
    let setup_secs = t_setup.elapsed().as_secs_f64();
    let h: serde_json::Value = serde_json::from_str(&health(relay.metrics).await).unwrap();
    assert_eq!(h["sessions"].as_u64().unwrap() as usize, a.sessions, "{h}");
    // Let keep-alives and allocator settle, then sample.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let loaded_rss = relay.rss_bytes().unwrap_or(0);
    let half_n = a.sessions / 2 / 50 * 50;
    drop(links);
    Paired {
        rss: Rss {
            idle: idle_rss,
            half: half_rss,
            full: loaded_rss,
            half_n,
            n: a.sessions,
        },
        setups,
        setup_secs,
    }
}

fn report(a: &Args, r: Report) {
    let Report {
        paths:
            Paths {
                d_rtt,
                r_rtt,
                d_tp,
                r_tp,
                t_rtt,
                t_tp,
                mbit_per_cpu_s,
                relay_cpu,
                relay_time,
                dc_rtt,
                c_rtt,
                dc_tp,
                c_tp,
                channel_mbit_per_cpu_s,
                g_rtt,
                g_tp,
                dgram_mbit_per_cpu_s,
            },
        paired:
            Paired {
                rss: paired,
                setups,
                setup_secs,
            },
        unpaired,
        connect_lo,
        connect_40,
        hostile: (hostile_before, hostile_after),
    } = r;
    let hostile_each = hostile_after.saturating_sub(hostile_before) as f64 / HOSTILE as f64;
    // ---- report ----
    let dp50 = percentile(&d_rtt, 0.5);
    let rp50 = percentile(&r_rtt, 0.5);
    let dp99 = percentile(&d_rtt, 0.99);
    let rp99 = percentile(&r_rtt, 0.99);
    let dtp = percentile(&d_tp, 0.5);
    let rtp = percentile(&r_tp, 0.5);
    println!();
    println!(
        "Tandem relay benchmark ({} cores, {} rounds interleaved)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        a.rounds
    );
    println!(
        "{:<34} {:>12} {:>12} {:<6} {}",
        "measure", "direct", "via relay", "unit", "comparison"
    );
    fmt_row(
        "datagram RTT p50 (64 B)",
        dp50,
        rp50,
        "µs",
        &format!("added {:.1} µs (target ≤ 100)", rp50 - dp50),
    );
    fmt_row(
        "datagram RTT p99 (64 B)",
        dp99,
        rp99,
        "µs",
        &format!("added {:.1} µs", rp99 - dp99),
    );
    fmt_row(
        "stream throughput median",
        dtp,
        rtp,
        "MB/s",
        &format!("ratio {:.2} (target ≥ 0.60)", rtp / dtp),
    );
    fmt_row("stream throughput min", d_tp[0], r_tp[0], "MB/s", "");
    let (tp50, tp99, ttp) = (
        percentile(&t_rtt, 0.5),
        percentile(&t_rtt, 0.99),
        percentile(&t_tp, 0.5),
    );
    fmt_row(
        "  both links on TCP: RTT p50",
        rp50,
        tp50,
        "µs",
        &format!("×{:.2} of QUIC's via relay", tp50 / rp50),
    );
    fmt_row(
        "  both links on TCP: RTT p99",
        rp99,
        tp99,
        "µs",
        &format!("×{:.2} of QUIC's via relay", tp99 / rp99),
    );
    fmt_row(
        "  both links on TCP: throughput",
        rtp,
        ttp,
        "MB/s",
        &format!("×{:.2} of QUIC's via relay (columns: QUIC, TCP)", ttp / rtp),
    );
    println!(
        "{:<34} {:>12} {:>12.0} {:<6} relay CPU while forwarding",
        "relay Mbit/s per CPU-second", "", mbit_per_cpu_s, ""
    );
    let (dcp50, cp50, dcp99, cp99) = (
        percentile(&dc_rtt, 0.5),
        percentile(&c_rtt, 0.5),
        percentile(&dc_rtt, 0.99),
        percentile(&c_rtt, 0.99),
    );
    let (dctp, ctp) = (percentile(&dc_tp, 0.5), percentile(&c_tp, 0.5));
    let (gp50, gp99, gtp) = (
        percentile(&g_rtt, 0.5),
        percentile(&g_rtt, 0.99),
        percentile(&g_tp, 0.5),
    );
    println!(
        "a session's carrier through the relay, packets ≤ 1,380 B (columns: direct quinn, relay channel, outer DATAGRAMs):"
    );
    let row3 = |name: &str, d: f64, c: f64, g: f64, unit: &str, extra: String| {
        println!("{name:<34} {d:>12.1} {c:>12.1} {g:>12.1} {unit:<6} {extra}");
    };
    row3(
        "  datagram RTT p50 (64 B)",
        dcp50,
        cp50,
        gp50,
        "µs",
        format!("added {:.1} / {:.1} µs", cp50 - dcp50, gp50 - dcp50),
    );
    row3(
        "  datagram RTT p99 (64 B)",
        dcp99,
        cp99,
        gp99,
        "µs",
        format!("added {:.1} / {:.1} µs", cp99 - dcp99, gp99 - dcp99),
    );
    row3(
        "  stream throughput median",
        dctp,
        ctp,
        gtp,
        "MB/s",
        format!(
            "ratio to direct {:.2} / {:.2} (target ≥ 0.60)",
            ctp / dctp,
            gtp / dctp
        ),
    );
    row3(
        "  relay Mbit/s per CPU-second",
        f64::NAN,
        channel_mbit_per_cpu_s,
        dgram_mbit_per_cpu_s,
        "",
        format!(
            "channel ×{:.2} the DATAGRAMs'",
            channel_mbit_per_cpu_s / dgram_mbit_per_cpu_s
        ),
    );
    println!(
        "{:<34} {:>12} {:>12.1} {:<6} slope {}→{} sessions: {:.1} → {:.1} MiB (target ≤ 50 KB)",
        "relay memory per idle session",
        "",
        paired.marginal() / 1024.0,
        "KiB",
        paired.half_n,
        a.sessions,
        paired.half as f64 / 1048576.0,
        paired.full as f64 / 1048576.0
    );
    println!(
        "{:<34} {:>12} {:>12.1} {:<6} (idle relay {:.1} MiB → {:.1} MiB, incl. auth threads' Argon2 memory)",
        "  … average incl. fixed costs",
        "",
        paired.average() / 1024.0,
        "KiB",
        paired.idle as f64 / 1048576.0,
        paired.full as f64 / 1048576.0
    );
    println!(
        "{:<34} {:>12} {:>12.1} {:<6} slope {}→{} agents: {:.1} → {:.1} MiB (target ≤ 16 KB)",
        "relay memory per unpaired agent",
        "",
        unpaired.marginal() / 1024.0,
        "KiB",
        unpaired.half_n,
        a.sessions,
        unpaired.half as f64 / 1048576.0,
        unpaired.full as f64 / 1048576.0
    );
    println!(
        "{:<34} {:>12} {:>12.1} {:<6} (fresh relay {:.1} MiB → {:.1} MiB)",
        "  … average incl. fixed costs",
        "",
        unpaired.average() / 1024.0,
        "KiB",
        unpaired.idle as f64 / 1048576.0,
        unpaired.full as f64 / 1048576.0
    );
    println!(
        "{:<34} {:>12} {:>12.1} {:<6} {} agents pushing streams and datagrams unpaired: {:.1} → {:.1} MiB",
        "  … added by a hostile one",
        "",
        hostile_each / 1024.0,
        "KiB",
        HOSTILE,
        hostile_before as f64 / 1048576.0,
        hostile_after as f64 / 1048576.0
    );
    println!(
        "{:<34} {:>12} {:>12.2} {:<6} p99 {:.2} ms (QUIC handshake incl. Retry, loopback)",
        "connection setup p50, loopback",
        "",
        percentile(&connect_lo, 0.5),
        "ms",
        percentile(&connect_lo, 0.99)
    );
    println!(
        "{:<34} {:>12} {:>12.1} {:<6} min {:.1} ms (≈ 2 RTT with the Retry, 1 RTT without)",
        "connection setup p50, 40 ms RTT",
        "",
        percentile(&connect_40, 0.5),
        "ms",
        connect_40.iter().copied().fold(f64::INFINITY, f64::min)
    );
    println!(
        "{:<34} {:>12} {:>12.1} {:<6} p99 {:.1} ms; {} sessions in {:.1} s",
        "session setup p50 (50 at a time)",
        "",
        percentile(&setups, 0.5),
        "ms",
        percentile(&setups, 0.99),
        a.sessions,
        setup_secs
    );
    let json = serde_json::json!({
        "bench": "relay",
        "rtt_us": {"direct_p50": dp50, "direct_p99": dp99, "relay_p50": rp50, "relay_p99": rp99, "added_p50": rp50 - dp50, "added_p99": rp99 - dp99, "samples_each": d_rtt.len()},
        "throughput_mb_s": {"direct_median": dtp, "relay_median": rtp, "ratio": rtp / dtp, "direct_all": d_tp, "relay_all": r_tp, "transfer_mib": a.transfer_mib},
        "channel": {"rtt_p50_us": {"direct": dcp50, "channel": cp50}, "rtt_p99_us": {"direct": dcp99, "channel": cp99},
            "throughput_mb_s": {"direct_median": dctp, "channel_median": ctp, "ratio": ctp / dctp, "direct_all": dc_tp, "channel_all": c_tp},
            "relay_mbit_per_cpu_second": channel_mbit_per_cpu_s, "mtu_cap": 1380,
            "datagrams": {"rtt_p50_us": gp50, "rtt_p99_us": gp99, "throughput_mb_s_median": gtp, "throughput_all": g_tp,
                "ratio": gtp / dctp, "relay_mbit_per_cpu_second": dgram_mbit_per_cpu_s}},
        "both_links_tcp": {"rtt_p50_us": tp50, "rtt_p99_us": tp99, "throughput_median_mb_s": ttp, "throughput_all": t_tp, "rtt_p50_ratio_vs_quic": tp50 / rp50, "throughput_ratio_vs_quic": ttp / rtp},
        "relay_cpu": {"mbit_per_cpu_second": mbit_per_cpu_s, "cpu_seconds": relay_cpu, "wall_seconds": relay_time},
        "memory": {"sessions": a.sessions, "idle_rss_bytes": paired.idle, "half_sessions": paired.half_n, "half_rss_bytes": paired.half, "loaded_rss_bytes": paired.full, "bytes_per_session_marginal": paired.marginal(), "bytes_per_session_average": paired.average()},
        "setup_ms": {"p50": percentile(&setups, 0.5), "p99": percentile(&setups, 0.99), "total_s": setup_secs},
        "memory_unpaired": {"agents": a.sessions, "idle_rss_bytes": unpaired.idle, "half_agents": unpaired.half_n, "half_rss_bytes": unpaired.half, "loaded_rss_bytes": unpaired.full, "bytes_per_agent_marginal": unpaired.marginal(), "bytes_per_agent_average": unpaired.average(), "hostile_agents": HOSTILE, "hostile_rss_before_bytes": hostile_before, "hostile_rss_after_bytes": hostile_after, "bytes_added_per_hostile_agent": hostile_each},
        "connect_ms": {"loopback_p50": percentile(&connect_lo, 0.5), "loopback_p99": percentile(&connect_lo, 0.99), "rtt40_p50": percentile(&connect_40, 0.5), "rtt40_min": connect_40.iter().copied().fold(f64::INFINITY, f64::min)},
    });
    let out = serde_json::to_string_pretty(&json).unwrap();
    println!("\n{out}");
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let _ = std::fs::create_dir_all(&target);
    let _ = std::fs::write(target.join("relay.json"), &out);
}
