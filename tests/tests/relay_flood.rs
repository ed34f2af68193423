//! Strangers flooding the relay (issue 18, items 4–7), over real QUIC on loopback: connection
//! attempts from addresses that cannot receive (forged), agents filling the relay, re-register
//! floods, unpaired connections pushing data, and login floods. Every wait is for an event, bounded.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tandem_client::{ClientError, RelayLink};
use tandem_proto::{ErrorCode, Secret};
use tandem_relay_server::Limits;
use tandem_tests::{TestRelay, metric};

const T: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(T, f).await.expect("timed out")
}

/// Waits until `cond` holds for the relay's metrics text (bounded).
async fn until_metrics(relay: &TestRelay, cond: impl Fn(&str) -> bool) -> String {
    within(async {
        loop {
            let m = relay.http_get("/metrics").await.1;
            if cond(&m) {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A client endpoint whose packets leave from `ip` (any 127.0.0.0/8 address is loopback on Linux).
fn endpoint_from(relay: &TestRelay, ip: Ipv4Addr) -> quinn::Endpoint {
    let relay_addr: SocketAddr = relay.addr().parse().unwrap();
    let ep = tandem_client::client_endpoint(&relay.opts(), relay_addr).unwrap();
    ep.rebind(std::net::UdpSocket::bind((ip, 0)).unwrap())
        .unwrap();
    ep
}

/// A one-way UDP forwarder: what is sent to its address goes to `upstream` from a socket bound to
/// `from`, and nothing comes back. To the relay this is a sender whose source address never
/// receives anything: a forged address.
async fn blackhole_sender(upstream: SocketAddr, from: Ipv4Addr) -> SocketAddr {
    let inbound = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let outbound = tokio::net::UdpSocket::bind((from, 0)).await.unwrap();
    let addr = inbound.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, _)) = inbound.recv_from(&mut buf).await {
            let _ = outbound.send_to(&buf[..n], upstream).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_source_addresses_count_against_no_limit() {
    let relay = TestRelay::start_with(Limits {
        max_connections_per_address: 2,
        ..Limits::default()
    })
    .await;
    let office = Ipv4Addr::new(127, 0, 0, 7);
    // 40 connection attempts claiming the office's address, none of which can hear an answer.
    let forged = blackhole_sender(relay.addr().parse().unwrap(), office).await;
    let ep = tandem_client::client_endpoint(&relay.opts(), forged).unwrap();
    let attempts: Vec<_> = (0..40)
        .map(|_| ep.connect(forged, "localhost").unwrap())
        .collect();
    let m = until_metrics(&relay, |m| {
        metric(m, "tandem_relay_retries_sent_total") >= 40.0
    })
    .await;
    // Each was answered with a Retry and nothing else: none is a connection, none was refused.
    assert_eq!(metric(&m, "tandem_relay_connections"), 0.0, "{m}");
    assert_eq!(metric(&m, "tandem_relay_connections_accepted_total"), 0.0);
    assert_eq!(relay.handle().stats().connections, 0);

    // The office's real agents still get in: the per-address limit counts validated peers only.
    let ep_office = endpoint_from(&relay, office);
    let mut a = within(RelayLink::connect_on(&ep_office, &relay.opts()))
        .await
        .unwrap();
    within(a.register()).await.unwrap();
    let mut b = within(RelayLink::connect_on(&ep_office, &relay.opts()))
        .await
        .unwrap();
    within(b.register()).await.unwrap();
    // …up to the limit, which validated connections do reach.
    let third = match within(RelayLink::connect_on(&ep_office, &relay.opts())).await {
        Ok(mut l) => within(l.register()).await.err().and_then(|e| e.code()),
        Err(e) => e.code(),
    };
    assert_eq!(third, Some(ErrorCode::TooManyConnectionsFromAddress));
    assert_eq!(relay.handle().stats().connections, 2);
    drop(attempts);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn technician_gets_in_when_agents_fill_their_share() {
    let relay = TestRelay::start_with(Limits {
        max_connections: 8,
        console_reserve: 3,
        ..Limits::default()
    })
    .await;
    // Five agents (from five addresses) fill the agents' share of 8 − 3.
    let mut agents = Vec::new();
    for i in 0..5u8 {
        let ep = endpoint_from(&relay, Ipv4Addr::new(127, 0, 1, 10 + i));
        let mut l = within(RelayLink::connect_on(&ep, &relay.opts()))
            .await
            .unwrap();
        let (slot, _) = within(l.register()).await.unwrap();
        agents.push((l, slot));
    }
    // A sixth agent is admitted only into the reserve, where it may not register.
    let ep = endpoint_from(&relay, Ipv4Addr::new(127, 0, 1, 20));
    let mut extra = within(RelayLink::connect_on(&ep, &relay.opts()))
        .await
        .unwrap();
    let e = within(extra.register()).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TooManyConnections), "{e}");
    // A technician still gets in and pairs.
    let mut console = relay.console().await;
    let (agent, slot) = &mut agents[0];
    within(console.join(slot)).await.unwrap();
    within(agent.wait_paired()).await.unwrap();
    let m = relay.http_get("/metrics").await.1;
    assert_eq!(
        metric(&m, "tandem_relay_limits_hit_total{limit=\"agent_share\"}"),
        1.0
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpaired_connection_gets_no_payload_streams_and_its_datagrams_are_dropped() {
    let relay = TestRelay::start().await;
    let (mut agent, slot) = relay.agent().await;
    // Before pairing: no payload stream can be opened towards the relay…
    let opened =
        tokio::time::timeout(Duration::from_millis(500), agent.connection().open_uni()).await;
    assert!(opened.is_err(), "a payload stream opened before pairing");
    // …and DATAGRAMs are read and dropped, not buffered.
    for _ in 0..50 {
        agent
            .connection()
            .send_datagram(Bytes::from(vec![7u8; 1000]))
            .unwrap();
    }
    until_metrics(&relay, |m| {
        metric(
            m,
            "tandem_relay_dropped_datagrams_total{reason=\"no_session\"}",
        ) >= 1.0
    })
    .await;
    // Once paired, payload streams and datagrams flow.
    let mut console = relay.console().await;
    within(console.join(&slot)).await.unwrap();
    within(agent.wait_paired()).await.unwrap();
    let mut s = within(agent.connection().open_uni()).await.unwrap();
    let frame = [&4u32.to_be_bytes()[..], b"ping"].concat();
    s.write_all(&frame).await.unwrap();
    s.finish().unwrap();
    let mut r = within(console.connection().accept_uni()).await.unwrap();
    let got = within(r.read_to_end(1024)).await.unwrap();
    assert_eq!(got, frame);
    // After the session, the agent's connection is narrowed again: no new payload streams.
    within(console.end(tandem_proto::EndReason::EndedByTechnician))
        .await
        .unwrap();
    // Wait for the agent to hear of the end (the relay narrowed it before telling).
    within(async {
        loop {
            if let Ok(tandem_proto::RelayMsg::SessionEnded { .. }) = agent.recv().await {
                return;
            }
        }
    })
    .await;
    let mut streams = 0;
    let mut opened = vec![];
    while let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_millis(300), agent.connection().open_uni()).await
    {
        streams += 1;
        assert!(
            streams <= 4,
            "payload streams still granted after the session"
        );
        // Opened on credit from the session: the relay stops it rather than keep its data.
        let _ = s.write_all(&[0u8; 1000]).await;
        opened.push(s);
    }
    eprintln!("{streams} payload streams opened on the session's credit after it ended");
    for s in opened {
        let stopped = within(s.stopped()).await;
        assert!(matches!(stopped, Ok(Some(_))), "{stopped:?}");
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_flood_is_refused_and_bounded() {
    let relay = TestRelay::start().await;
    let mut agent = relay.connect().await;
    let (mut refused, mut granted) = (0, 0);
    let closed = loop {
        match within(agent.register()).await {
            Ok(_) => granted += 1,
            Err(ClientError::Refused { code }) => {
                assert_eq!(code, ErrorCode::RegisterRateLimited);
                refused += 1;
            }
            Err(e) => break e,
        }
        assert!(granted + refused < 100, "never closed");
    };
    // The per-connection budget (6 a minute) holds; a connection that keeps asking regardless is
    // closed after 3 refusals.
    assert_eq!(granted, 6, "refused {refused}");
    assert_eq!(refused, 3);
    assert_eq!(
        closed.code(),
        Some(ErrorCode::RegisterRateLimited),
        "{closed}"
    );
    // Other connections of the address share its budget (60 a minute), so 10 connections × 6.
    let mut others = Vec::new();
    let mut address_refused = 0;
    let mut address_granted = granted;
    for _ in 0..10 {
        let mut l = relay.connect().await;
        for _ in 0..7 {
            match within(l.register()).await {
                Ok(_) => address_granted += 1,
                Err(ClientError::Refused { code }) => {
                    assert_eq!(code, ErrorCode::RegisterRateLimited);
                    address_refused += 1;
                }
                // Closed after 3 refusals.
                Err(e) => {
                    assert_eq!(e.code(), Some(ErrorCode::RegisterRateLimited), "{e}");
                    address_refused += 1;
                    break;
                }
            }
        }
        others.push(l);
    }
    // The address got exactly its 60 codes a minute, whatever the number of connections.
    assert_eq!(address_granted, 60, "refused {address_refused}");
    let m = relay.http_get("/metrics").await.1;
    assert!(
        metric(
            &m,
            "tandem_relay_limits_hit_total{limit=\"registers_per_address\"}"
        ) >= 1.0
    );
    // Codes granted, each replacing the last, are all that went into quarantine.
    let quarantined = metric(&m, "tandem_relay_slots_quarantined");
    assert!(quarantined <= 60.0, "{quarantined}");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_token_ids_cost_no_argon2_and_a_full_queue_says_busy() {
    let relay = TestRelay::start_with(Limits {
        auths_per_minute_per_address: 1_000,
        auth_queue: 1,
        ..Limits::default()
    })
    .await;
    // Unknown ids: refused, and no hash is computed for them.
    for i in 0..20 {
        let mut l = relay.connect().await;
        let e = within(l.authenticate(&Secret::new(format!(
            "tnd_{}_{}",
            1000 + i,
            "ab".repeat(32)
        ))))
        .await
        .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadToken), "{e}");
    }
    let m = relay.http_get("/metrics").await.1;
    assert_eq!(metric(&m, "tandem_relay_auth_hashes_total"), 0.0);
    assert_eq!(
        metric(
            &m,
            "tandem_relay_auth_failures_total{reason=\"unknown_id\"}"
        ),
        20.0
    );

    // Made-up secrets for a known id (ids are row numbers, easy to guess): each is checked against
    // the stored SHA-256 at once, no Argon2, no queue, so they cannot make logins busy.
    let alice = relay.token.expose().split('_').nth(1).unwrap().to_string();
    let mut js = tokio::task::JoinSet::new();
    for i in 0..24 {
        let mut l = relay.connect().await;
        let fake = Secret::new(format!("tnd_{alice}_{:064x}", i));
        js.spawn(async move { within(l.authenticate(&fake)).await.map(|_| ()) });
    }
    while let Some(r) = js.join_next().await {
        let e = r.unwrap().unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadToken), "{e}");
    }
    let m = relay.http_get("/metrics").await.1;
    assert_eq!(metric(&m, "tandem_relay_auth_hashes_total"), 0.0);
    within(relay.connect().await.authenticate(&relay.token))
        .await
        .unwrap();

    // A token issued before tokens were stored as SHA-256 (an Argon2id hash in the database)
    // still needs the verification threads: 24 logins at once, two hash, one waits, the rest hear
    // "busy, retry in N s".
    {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let secret = relay.token.expose().rsplit('_').next().unwrap().to_string();
        let salt = SaltString::encode_b64(&[9u8; 16]).unwrap();
        let old = argon2::Argon2::default()
            .hash_password(secret.as_bytes(), &salt)
            .unwrap()
            .to_string();
        let db =
            rusqlite::Connection::open(relay.dir.path().join(tandem_relay_server::store::DB_FILE))
                .unwrap();
        db.execute(
            "UPDATE technicians SET token_hash = ?1 WHERE id = ?2",
            rusqlite::params![old, alice.parse::<i64>().unwrap()],
        )
        .unwrap();
    }
    let mut links = Vec::new();
    for _ in 0..24 {
        links.push(relay.connect().await);
    }
    let token = relay.token.clone();
    let mut js = tokio::task::JoinSet::new();
    for mut l in links {
        let token = token.clone();
        js.spawn(async move { within(l.authenticate(&token)).await.map(|_| ()) });
    }
    let (mut ok, mut busy) = (0, 0);
    while let Some(r) = js.join_next().await {
        match r.unwrap() {
            Ok(()) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::Busy), "{e}");
                let wait = e.retry_after().unwrap();
                assert!(wait >= Duration::from_secs(1), "{wait:?}");
                assert!(e.to_string().contains("retry in"), "{e}");
                busy += 1;
            }
        }
    }
    assert!(ok >= 1 && busy >= 1, "ok {ok}, busy {busy}");
    assert_eq!(ok + busy, 24);
    // Told to retry, the technician gets in.
    let mut l = relay.connect().await;
    within(l.authenticate(&token)).await.unwrap();
    let m = relay.http_get("/metrics").await.1;
    assert_eq!(
        metric(&m, "tandem_relay_limits_hit_total{limit=\"auth_queue\"}"),
        busy as f64
    );
    relay.shutdown().await;
}

/// A connection that keeps sending DATAGRAMs without a session is closed after a bound, rather
/// than served one by one for as long as it likes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_without_a_session_close_the_connection_after_a_bound() {
    let relay = TestRelay::start().await;
    let (agent, _slot) = relay.agent().await;
    let conn = agent.connection().clone();
    let closed = within(async {
        loop {
            for _ in 0..100 {
                if conn.send_datagram(Bytes::from_static(b"x")).is_err() {
                    return conn.close_reason();
                }
            }
            if let Some(r) = conn.close_reason() {
                return Some(r);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let reason = format!("{closed:?}");
    assert!(reason.contains("datagrams without a session"), "{reason}");
    // The relay goes on serving others.
    let (_other, _) = relay.agent().await;
}

/// A connection that floods the control stream (here with Pings) is closed once past a burst,
/// not answered message by message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_message_flood_closes_the_connection() {
    let relay = TestRelay::start().await;
    let mut l = relay.connect().await;
    for nonce in 0..200u64 {
        if l.send(&tandem_proto::ClientMsg::Ping { nonce })
            .await
            .is_err()
        {
            break;
        }
    }
    let e = within(async {
        loop {
            if let Err(e) = l.recv().await {
                return e;
            }
        }
    })
    .await;
    assert_eq!(e.code(), Some(ErrorCode::RateLimited), "{e}");
    let m = relay.http_get("/metrics").await.1;
    assert_eq!(
        metric(
            &m,
            "tandem_relay_limits_hit_total{limit=\"control_messages\"}"
        ),
        1.0
    );
    // Others are served.
    let (_agent, _slot) = relay.agent().await;
}
