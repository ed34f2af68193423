//! Direct paths through real NATs: the real `tandem-relay`, `tandem-agent` and `tandem-console` in
//! Linux network namespaces, each side behind its own NAT made with nftables. Root only: elsewhere
//! each test says why it is skipped and passes.
//!
//! ```text
//!   agent   A 192.168.10.2 ── .10.1 NA 10.240.1.2 ── 10.240.1.1 ┐
//!                                                               I  relay; routes between NA and NC
//!   console C 192.168.20.2 ── .20.1 NC 10.240.2.2 ── 10.240.2.1 ┘
//! ```
//!
//! The NATs ([`Nat`]): endpoint-independent mapping (Linux keeps the source port) with no filtering
//! ("full cone"), filtering by the addresses the inside host sent to ("restricted"), or by address
//! and port (conntrack alone: "port-restricted"); and endpoint-dependent mapping with a random port
//! for every destination ("symmetric"). For every pair a whole session runs (pixels and input);
//! the console's events say whether and when it went direct. Expected: direct for every pair but
//! symmetric↔symmetric and symmetric↔port-restricted, which no hole punching without a port
//! prediction can open.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};
use tandem_tests::nat::{Nat, RELAY_A, RELAY_C, World, plain_session, session};
use tandem_tests::netns;
use tandem_tests::nsprocs::{METRICS, T, start_relay};
use tandem_tests::{metric, relay_admin};

macro_rules! skip_without_netns {
    () => {
        if let Some(why) = netns::skip_reason() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

/// One pair of the matrix: a session, and whether it went direct as expected.
async fn matrix_pair(nat_a: Nat, nat_c: Nat) {
    let w = World::new(nat_a, nat_c);
    let relay = start_relay(&w.i, &[]).await;
    let out = plain_session(&w, &relay, (&w.c, RELAY_C), &[]).await;
    let direct = out.went_direct();
    eprintln!(
        "MATRIX agent={} console={} -> {} (switch {} ms after the first picture)",
        nat_a.name(),
        nat_c.name(),
        direct.map_or("relay", |d| d.0),
        direct.map_or("-".into(), |d| format!("{:.0}", d.1)),
    );
    assert!(out.keys >= 2, "the keys reached the agent: {}", out.keys);
    let stats: Vec<_> = out
        .events
        .iter()
        .filter(|e| e["event"] == "stats")
        .collect();
    assert!(
        stats
            .iter()
            .filter(|s| s["fps"].as_f64() > Some(0.0))
            .count()
            >= 2,
        "frames kept flowing: {stats:?}"
    );
    if Nat::direct_expected(nat_a, nat_c) {
        let (route, _) = direct.unwrap_or_else(|| {
            panic!(
                "{} ↔ {} did not go direct: {:?}",
                nat_a.name(),
                nat_c.name(),
                out.events
            )
        });
        assert_eq!(route, "direct-nat");
        // The relay's metrics count it.
        let (_, m) = w.i.http_get(METRICS, "/metrics");
        assert!(
            metric(&m, "tandem_relay_sessions_direct_total") >= 1.0,
            "{m}"
        );
    } else {
        assert!(direct.is_none(), "{:?}", out.paths);
    }
}

macro_rules! matrix {
    ($($name:ident: $a:expr, $c:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            skip_without_netns!();
            matrix_pair($a, $c).await;
        }
    )*};
}

matrix! {
    nat_full_cone_to_full_cone: Nat::FullCone, Nat::FullCone;
    nat_full_cone_to_restricted: Nat::FullCone, Nat::Restricted;
    nat_full_cone_to_port_restricted: Nat::FullCone, Nat::PortRestricted;
    nat_full_cone_to_symmetric: Nat::FullCone, Nat::Symmetric;
    nat_restricted_to_full_cone: Nat::Restricted, Nat::FullCone;
    nat_restricted_to_restricted: Nat::Restricted, Nat::Restricted;
    nat_restricted_to_port_restricted: Nat::Restricted, Nat::PortRestricted;
    nat_restricted_to_symmetric: Nat::Restricted, Nat::Symmetric;
    nat_port_restricted_to_full_cone: Nat::PortRestricted, Nat::FullCone;
    nat_port_restricted_to_restricted: Nat::PortRestricted, Nat::Restricted;
    nat_port_restricted_to_port_restricted: Nat::PortRestricted, Nat::PortRestricted;
    nat_port_restricted_to_symmetric: Nat::PortRestricted, Nat::Symmetric;
    nat_symmetric_to_full_cone: Nat::Symmetric, Nat::FullCone;
    nat_symmetric_to_restricted: Nat::Symmetric, Nat::Restricted;
    nat_symmetric_to_port_restricted: Nat::Symmetric, Nat::PortRestricted;
    nat_symmetric_to_symmetric: Nat::Symmetric, Nat::Symmetric;
}

#[test]
fn every_pair_of_the_matrix_has_a_test() {
    // The macro above names 16 pairs; this keeps the list and `Nat::ALL` in step.
    assert_eq!(Nat::ALL.len() * Nat::ALL.len(), 16);
}

/// Agent and console on the same network, behind one NAT: direct, and over the LAN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_lan_goes_direct_over_the_lan() {
    skip_without_netns!();
    let w = World::new(Nat::PortRestricted, Nat::PortRestricted);
    let relay = start_relay(&w.i, &[]).await;
    let out = plain_session(&w, &relay, (&w.a, RELAY_A), &[]).await;
    assert_eq!(
        out.went_direct().map(|d| d.0),
        Some("direct-lan"),
        "{:?}",
        out.events
    );
    assert!(out.keys >= 2);
}

/// The direct path is cut mid-session: both sides go back through the relay within about a
/// second, the pictures keep coming (no gap over 1.5 s), and keys typed after the cut arrive.
/// When the path comes back, the session goes direct again. The relay's audit records that the
/// session went direct and the bytes that did not cross it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_direct_path_falls_back_to_the_relay_and_comes_back() {
    skip_without_netns!();
    let w = World::new(Nat::FullCone, Nat::PortRestricted);
    let relay = start_relay(&w.i, &[]).await;
    let cut_at = std::sync::Mutex::new(None);
    let script = "wait 4000\nkey a\nkey b\nkey c\nwait 6000\n";
    let out = session(
        &relay,
        (&w.a, RELAY_A),
        (&w.c, RELAY_C),
        script,
        12,
        &[],
        async |console| {
            let direct = |e: &serde_json::Value| e["event"] == "path" && e["route"] != "relay";
            // It may have gone direct before the first picture.
            if !console.seen.iter().any(direct) {
                console.until("a direct path", T, direct).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            w.cut_between_nats(true);
            let t = Instant::now();
            *cut_at.lock().unwrap() = Some(t);
            console
                .until("the fallback", T, |e| {
                    e["event"] == "path" && e["route"] == "relay"
                })
                .await;
            let fallback = t.elapsed();
            eprintln!(
                "fell back to the relay {} ms after the cut",
                fallback.as_millis()
            );
            assert!(
                fallback < Duration::from_millis(1500),
                "fell back after {fallback:?}"
            );
            tokio::time::sleep(Duration::from_secs(4)).await;
            w.cut_between_nats(false);
        },
    )
    .await;
    assert!(cut_at.lock().unwrap().is_some());
    // Direct, relay, direct again.
    let routes: Vec<&str> = out.paths.iter().map(|(r, _)| r.as_str()).collect();
    assert!(
        routes
            .windows(3)
            .any(|w| w[0] != "relay" && w[1] == "relay" && w[2] != "relay"),
        "{routes:?}"
    );
    assert!(
        out.keys >= 3,
        "keys typed after the cut arrived: {}",
        out.keys
    );
    let stats: Vec<_> = out
        .events
        .iter()
        .filter(|e| e["event"] == "stats")
        .collect();
    let worst = stats
        .iter()
        .filter_map(|s| s["max_frame_gap_ms"].as_f64())
        .fold(0.0, f64::max);
    eprintln!("longest gap between pictures: {worst:.0} ms");
    assert!(worst < 1500.0, "a picture gap of {worst} ms: {stats:?}");
    // The audit row: direct, with bytes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows: serde_json::Value =
            serde_json::from_str(&relay_admin(relay.dir.path(), &["audit", "--json"])).unwrap();
        let row = &rows[0];
        if row["ended_at_ms"].is_number() {
            assert_eq!(row["went_direct"], true, "{row}");
            assert!(row["bytes_direct"].as_i64() > Some(10_000), "{row}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the audit row did not close: {rows}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A session between two full-cone NATs (which would go direct) with `relay_args` and
/// `console_extra`: it stays on the relay, keys arrive, and the relay counts no direct session.
async fn stays_on_the_relay(relay_args: &[&str], console_extra: &[&str]) {
    let w = World::new(Nat::FullCone, Nat::FullCone);
    let relay = start_relay(&w.i, relay_args).await;
    let out = plain_session(&w, &relay, (&w.c, RELAY_C), console_extra).await;
    assert!(out.paths.is_empty(), "{:?}", out.paths);
    assert!(out.keys >= 2);
    let (_, m) = w.i.http_get(METRICS, "/metrics");
    assert_eq!(metric(&m, "tandem_relay_sessions_direct_total"), 0.0);
    // Through NATs on both sides, the session's packets crossed the relay on its channel (plain
    // UDP, the QUIC link's 5-tuple), not as DATAGRAM frames.
    let bytes = |dir: &str, path: &str| {
        metric(
            &m,
            &format!("tandem_relay_forwarded_bytes_total{{direction=\"{dir}\",path=\"{path}\"}}"),
        )
    };
    for dir in ["agent_to_console", "console_to_agent"] {
        let (ch, dg) = (bytes(dir, "channel"), bytes(dir, "datagram"));
        // Both directions used the channel; the first packets (the inner handshake, the PAKE,
        // sent before a side's hello was answered) went as DATAGRAMs.
        assert!(
            ch > 1_000.0 && dg < 30_000.0,
            "{dir}: channel {ch}, datagram {dg}"
        );
    }
    let (ch, dg) = (
        bytes("agent_to_console", "channel"),
        bytes("agent_to_console", "datagram"),
    );
    // Most of the picture: the handshake and at times the first picture's start go before the
    // agent's hello was answered.
    assert!(
        ch > 2.0 * dg && ch > 10_000.0,
        "the picture went on the channel: {ch} vs {dg}"
    );
    assert_eq!(
        metric(
            &m,
            "tandem_relay_dropped_datagrams_total{reason=\"channel_wrong_source\"}"
        ),
        0.0
    );
}

/// "Relay only" on the relay: the sides never probe each other, although they could.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_only_on_the_relay_keeps_every_byte_on_it() {
    skip_without_netns!();
    stays_on_the_relay(&["--path", "relay-only"], &[]).await;
}

/// "Relay only" on one side (the console): neither side probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_only_on_one_side_keeps_every_byte_on_the_relay() {
    skip_without_netns!();
    stays_on_the_relay(&[], &["--path", "relay-only"]).await;
}

/// UDP blocked entirely on the agent's side: the agent reaches the relay over TCP, the session
/// runs through the relay, and no direct path is claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_blocked_entirely_stays_on_the_relay_over_tcp() {
    skip_without_netns!();
    let w = World::new(Nat::FullCone, Nat::FullCone);
    // The agent's NAT drops every UDP packet from inside.
    w.na.nft(
        "table ip tnd_noudp {\n\
         chain fwdc {\n\
         type filter hook forward priority -10; policy accept;\n\
         meta l4proto udp iifname != \"vinet\" drop\n\
         }\n\
         }\n",
    );
    let relay = start_relay(&w.i, &[]).await;
    let out = plain_session(&w, &relay, (&w.c, RELAY_C), &[]).await;
    assert!(out.went_direct().is_none(), "{:?}", out.paths);
    assert!(out.keys >= 2);
    let stats: Vec<_> = out
        .events
        .iter()
        .filter(|e| e["event"] == "stats")
        .collect();
    assert!(
        stats.iter().any(|s| s["agent_transport"] == "tcp"),
        "the agent is on TCP: {stats:?}"
    );
    // A side on TCP has no UDP address to send channel packets to: no channel.
    let (_, m) = w.i.http_get(METRICS, "/metrics");
    assert_eq!(
        metric(
            &m,
            "tandem_relay_forwarded_bytes_total{direction=\"agent_to_console\",path=\"channel\"}"
        ),
        0.0
    );
}
