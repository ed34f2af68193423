//! The relay over real QUIC on loopback: pairing, blind forwarding, errors, limits, hostile input,
//! audit, metrics, shutdown and restart. No sleeps used as synchronisation: every wait is for an event
//! (a message, a close, a process line), bounded by a timeout.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use std::time::{Duration, Instant};
use tandem_certs::{Fingerprint, RelayTrust};
use tandem_client::{ClientError, ConnectOptions, RelayLink};
use tandem_proto::{
    ClientInfo, ClientMsg, EndReason, ErrorCode, MAX_CONTROL_FRAME, MAX_PAYLOAD_FRAME, RelayMsg,
    Secret, Slot, encode_frame,
};
use tandem_relay_server::Limits;
use tandem_tests::{RelayProcess, TestRelay, metric, relay_admin, token_from_output};

const T: Duration = Duration::from_secs(10);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(T, f).await.expect("timed out")
}

/// Waits until the link reports the relay closed it; returns the code.
async fn closed_code(link: &mut RelayLink) -> Option<ErrorCode> {
    loop {
        match within(link.recv()).await {
            Ok(_) => continue,
            Err(e) => return e.code(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_and_forward_datagrams_both_ways() {
    let relay = TestRelay::start().await;
    let (mut agent, slot) = relay.agent().await;
    assert!((3..=9).contains(&slot.as_str().len()));
    let mut console = relay.console().await;
    within(console.join(&slot)).await.unwrap();
    let (tech, org, _) = within(agent.wait_paired()).await.unwrap();
    assert_eq!((tech.as_str(), org.as_str()), ("alice", "ACME IT"));

    // Datagrams are forwarded unchanged both ways, up to the current datagram size.
    let max = agent.max_datagram_size().min(console.max_datagram_size());
    assert!(max >= 1100, "datagram size {max}");
    for (from, to) in [(&agent, &console), (&console, &agent)] {
        for len in [1usize, 100, max] {
            tandem_tests::datagram_arrives(from, to, len).await;
        }
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payload_stream_both_ways_and_audit_row() {
    let relay = TestRelay::start().await;
    let (mut agent, mut console) = relay.pair().await;

    // Payloads larger than a datagram, and many of them, in order, both directions.
    let payloads: Vec<Vec<u8>> = (0..200)
        .map(|i| (0..(1500 + i * 37)).map(|j| (i ^ j) as u8).collect())
        .collect();
    let mut tx = within(agent.open_payload_stream()).await.unwrap();
    let p2 = payloads.clone();
    let sender = tokio::spawn(async move {
        for p in &p2 {
            tx.send(p).await.unwrap();
        }
        tx.finish();
    });
    let mut rx = within(console.accept_payload_stream()).await.unwrap();
    for p in &payloads {
        let got = within(rx.recv()).await.unwrap().unwrap();
        assert_eq!(&got[..], &p[..]);
    }
    assert!(
        within(rx.recv()).await.unwrap().is_none(),
        "stream finished"
    );
    sender.await.unwrap();

    let mut back = within(console.open_payload_stream()).await.unwrap();
    back.send(&[42u8; 5000]).await.unwrap();
    let mut rx2 = within(agent.accept_payload_stream()).await.unwrap();
    assert_eq!(
        &within(rx2.recv()).await.unwrap().unwrap()[..],
        &[42u8; 5000][..]
    );

    // The technician ends; the agent is told why.
    console.end(EndReason::EndedByTechnician).await.unwrap();
    match within(agent.recv()).await.unwrap() {
        RelayMsg::SessionEnded { reason } => assert_eq!(reason, EndReason::EndedByTechnician),
        other => panic!("{other:?}"),
    }
    let a2c: u64 = payloads.iter().map(|p| p.len() as u64).sum();
    let store = relay.store();
    relay.shutdown().await; // flushes the audit writer
    let rows = store.audit(10).unwrap();
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r.technician, "alice");
    assert_eq!(r.organisation, "ACME IT");
    assert_eq!(r.bytes_agent_to_console as u64, a2c);
    assert_eq!(r.bytes_console_to_agent, 5000);
    assert_eq!(r.end_reason.as_deref(), Some("ended_by_technician"));
    assert!(r.ended_at_ms.is_some());
    assert!(r.agent_addr.starts_with("127.0.0.1:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_join_is_refused_and_closed() {
    let relay = TestRelay::start().await;
    let (_agent, slot) = relay.agent().await;
    let mut stranger = relay.connect().await;
    stranger.send(&ClientMsg::Join { slot }).await.unwrap();
    assert_eq!(
        closed_code(&mut stranger).await,
        Some(ErrorCode::NotAuthenticated)
    );
    let m = relay.http_get("/metrics").await.1;
    assert_eq!(
        metric(
            &m,
            "tandem_relay_protocol_errors_total{reason=\"not_authenticated\"}"
        ),
        1.0
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_expired_gone_and_busy_slots_have_distinct_errors() {
    let relay = TestRelay::start_with(Limits {
        slot_ttl: Duration::from_millis(700),
        ..Limits::default()
    })
    .await;
    let mut console = relay.console().await;

    // Wrong: nobody registered it.
    let err = within(console.join(&Slot::new("987654321").unwrap()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnknownSlot));

    // Expired: the relay tells the agent; a join afterwards hears "expired".
    let (mut agent, slot) = relay.agent().await;
    match within(agent.recv()).await.unwrap() {
        RelayMsg::SlotExpired { slot: s } => assert_eq!(s, slot),
        other => panic!("{other:?}"),
    }
    let err = within(console.join(&slot)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ExpiredSlot));
    // The agent can register again on the same connection and gets a different slot.
    let (slot2, _) = within(agent.register()).await.unwrap();
    assert_ne!(slot2, slot);

    // Agent gone: its connection closed.
    let (gone, gone_slot) = relay.agent().await;
    gone.close().await;
    let err = within(console.join(&gone_slot)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AgentGone));

    // Busy: a second technician on a paired slot. (New console: the first used 3 of its 5 joins.)
    within(console.join(&slot2)).await.unwrap();
    let bob = relay.add_technician("ACME IT", "bob");
    let mut console2 = relay.console_as(&bob).await;
    let err = within(console2.join(&slot2)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::SlotBusy));
    // Refusals are not fatal: the connection still answers.
    console2.send(&ClientMsg::Ping { nonce: 9 }).await.unwrap();
    assert_eq!(
        within(console2.recv()).await.unwrap(),
        RelayMsg::Pong { nonce: 9 }
    );

    let m = relay.http_get("/metrics").await.1;
    for reason in ["unknown_slot", "expired_slot", "agent_gone", "slot_busy"] {
        assert_eq!(
            metric(
                &m,
                &format!("tandem_relay_joins_refused_total{{reason=\"{reason}\"}}")
            ),
            1.0,
            "{reason}"
        );
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_attempts_are_rate_limited_per_technician() {
    let relay = TestRelay::start().await;
    let mut console = relay.console().await;
    let wrong = Slot::new("000000001").unwrap();
    for _ in 0..5 {
        let e = within(console.join(&wrong)).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::UnknownSlot));
    }
    let e = within(console.join(&wrong)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::RateLimited));
    // A right code is refused too while limited: guessing cannot outrun the limit.
    let (_agent, slot) = relay.agent().await;
    let e = within(console.join(&slot)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::RateLimited));
    let m = relay.http_get("/metrics").await.1;
    assert!(
        metric(
            &m,
            "tandem_relay_limits_hit_total{limit=\"joins_per_technician\"}"
        ) >= 2.0
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_auth_rate_limit() {
    let relay = TestRelay::start_with(Limits {
        auths_per_minute_per_address: 3,
        ..Limits::default()
    })
    .await;
    for _ in 0..3 {
        let mut l = relay.connect().await;
        let e = within(l.authenticate(&Secret::new("tnd_1_nope")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadToken), "{e}");
    }
    // Fourth attempt from the same address within the minute: rate limited, even with a good token.
    let mut l = relay.connect().await;
    let e = within(l.authenticate(&relay.token)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::RateLimited), "{e}");
    let m = relay.http_get("/metrics").await.1;
    // Malformed tokens (like unknown ids) are refused without hashing.
    assert_eq!(
        metric(
            &m,
            "tandem_relay_auth_failures_total{reason=\"unknown_id\"}"
        ),
        3.0
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_technician_is_refused() {
    let relay = TestRelay::start().await;
    let store = relay.store();
    let t = store.find_technician("alice", None).unwrap();
    store.set_disabled(t.id, true).unwrap();
    let mut l = relay.connect().await;
    let e = within(l.authenticate(&relay.token)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TechnicianDisabled));
    assert!(e.to_string().contains("disabled"), "{e}");
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_messages_close_only_that_connection() {
    let relay = TestRelay::start().await;
    // A healthy pair that must keep working throughout.
    let (agent, console) = relay.pair().await;

    // Garbage body.
    let mut bad = relay.connect().await;
    bad.send_raw(&[0, 0, 0, 3, 0xff, 0xfe, 0xfd]).await.unwrap();
    assert_eq!(closed_code(&mut bad).await, Some(ErrorCode::Malformed));

    // A header announcing more than the limit: refused before the body is read.
    let mut big = relay.connect().await;
    big.send_raw(&((MAX_CONTROL_FRAME as u32 + 1).to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(closed_code(&mut big).await, Some(ErrorCode::Oversized));

    // Text over the field limit.
    let mut long = relay.connect().await;
    let frame = encode_frame(
        &ClientMsg::Register {
            client: ClientInfo {
                software: "x".repeat(1000),
            },
        },
        MAX_CONTROL_FRAME,
    )
    .unwrap();
    long.send_raw(&frame).await.unwrap();
    assert_eq!(closed_code(&mut long).await, Some(ErrorCode::Malformed));

    // Out of order: an agent that tries to authenticate.
    let (mut agent2, _) = relay.agent().await;
    agent2
        .send(&ClientMsg::Authenticate {
            token: relay.token.clone(),
            client: ClientInfo::default(),
        })
        .await
        .unwrap();
    assert_eq!(
        closed_code(&mut agent2).await,
        Some(ErrorCode::AlreadyAuthenticated)
    );

    // An oversized payload frame on the payload stream closes the sender's connection.
    let (sender, _rcv) = relay.pair().await;
    let mut s = sender.open_payload_stream().await.unwrap();
    s.send_raw(&((MAX_PAYLOAD_FRAME as u32 + 1).to_be_bytes()))
        .await
        .unwrap();
    let e = within(sender.connection().closed()).await;
    assert!(e.to_string().contains("exceeds"), "{e}");

    // The healthy pair still forwards.
    let got = within(async {
        loop {
            agent
                .send_datagram(Bytes::from_static(b"still here"))
                .unwrap();
            if let Ok(Ok(d)) =
                tokio::time::timeout(Duration::from_millis(200), console.recv_datagram()).await
            {
                return d;
            }
        }
    })
    .await;
    assert_eq!(&got[..], b"still here");
    let m = relay.http_get("/metrics").await.1;
    assert_eq!(
        metric(
            &m,
            "tandem_relay_protocol_errors_total{reason=\"malformed\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "tandem_relay_protocol_errors_total{reason=\"oversized\"}"
        ),
        2.0
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_dropped_on_time() {
    let timeout = Duration::from_millis(400);
    let relay = TestRelay::start_with(Limits {
        handshake_timeout: timeout,
        ..Limits::default()
    })
    .await;
    let started = Instant::now();
    let mut silent = relay.connect().await; // opens the control stream but says nothing
    assert_eq!(
        closed_code(&mut silent).await,
        Some(ErrorCode::HandshakeTimeout)
    );
    let took = started.elapsed();
    assert!(took >= timeout, "dropped early: {took:?}");
    assert!(
        took < timeout + Duration::from_secs(3),
        "dropped late: {took:?}"
    );
    // The relay counts it and forgets the connection.
    let (_, body) = relay.http_get("/metrics").await;
    assert_eq!(metric(&body, "tandem_relay_handshake_timeouts_total"), 1.0);
    let (_, health) = relay.http_get("/health").await;
    let h: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(h["connections"], 0);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_with_wrong_pin_refuses_the_relay() {
    let relay = TestRelay::start().await;
    let wrong = Fingerprint::of(b"not the relay");
    let opts = ConnectOptions::new(relay.addr(), RelayTrust::Pin(wrong));
    let err = match within(RelayLink::connect(&opts)).await {
        Err(e) => e,
        Ok(_) => panic!("connected despite a wrong pin"),
    };
    assert!(matches!(err, ClientError::Tls(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("does not match the pinned fingerprint"),
        "{msg}"
    );
    assert!(msg.contains("tandem-relay fingerprint"), "{msg}");

    // A CA that did not sign the relay is refused as well; the relay's own CA is accepted.
    let other = tempfile::tempdir().unwrap();
    tandem_certs::ensure_identity(other.path(), &[]).unwrap();
    let foreign = RelayTrust::ca_file(&other.path().join(tandem_certs::CA_CERT_FILE)).unwrap();
    let e = match within(RelayLink::connect(&ConnectOptions::new(
        relay.addr(),
        foreign,
    )))
    .await
    {
        Err(e) => e,
        Ok(_) => panic!("connected with a foreign CA"),
    };
    assert!(matches!(e, ClientError::Tls(_)), "{e:?}");
    let own = RelayTrust::ca_file(&relay.dir.path().join(tandem_certs::CA_CERT_FILE)).unwrap();
    let mut l = within(RelayLink::connect(&ConnectOptions::new(
        format!("localhost:{}", relay.handle().addr().port()),
        own,
    )))
    .await
    .unwrap();
    within(l.register()).await.unwrap();
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_per_address_gives_a_clear_error() {
    let relay = TestRelay::start_with(Limits {
        max_connections_per_address: 2,
        ..Limits::default()
    })
    .await;
    let _a = relay.agent().await;
    let _b = relay.agent().await;
    // The relay completes the handshake, then closes with the reason; depending on timing the client
    // sees it while opening its control stream or on the first read.
    let code = match within(RelayLink::connect(&relay.opts())).await {
        Ok(mut l) => closed_code(&mut l).await,
        Err(e) => e.code(),
    };
    assert_eq!(code, Some(ErrorCode::TooManyConnectionsFromAddress));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_limit_gives_a_clear_error() {
    let relay = TestRelay::start_with(Limits {
        max_sessions: 1,
        ..Limits::default()
    })
    .await;
    let _pair = relay.pair().await;
    let (_agent, slot) = relay.agent().await;
    let bob = relay.add_technician("ACME IT", "bob");
    let mut c = relay.console_as(&bob).await;
    let e = within(c.join(&slot)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TooManySessions));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_disconnect_ends_session_after_grace_and_wrong_code_burns_slot() {
    let relay = TestRelay::start_with(Limits {
        resume_grace: Duration::from_millis(600),
        ..Limits::default()
    })
    .await;
    // The agent's link drops: the console is told, and told again when the grace period is over.
    let (agent, mut console) = relay.pair().await;
    agent.close().await;
    assert_eq!(
        within(console.recv()).await.unwrap(),
        RelayMsg::PeerSuspended { grace_secs: 0 }
    );
    match within(console.recv()).await.unwrap() {
        RelayMsg::SessionEnded { reason } => assert_eq!(reason, EndReason::PeerDisconnected),
        other => panic!("{other:?}"),
    }

    // The agent reports a failed key confirmation: the slot is burned; a retry hears so.
    let (mut agent, slot) = relay.agent().await;
    within(console.join(&slot)).await.unwrap();
    within(agent.wait_paired()).await.unwrap();
    agent.end(EndReason::WrongCode).await.unwrap();
    match within(console.recv()).await.unwrap() {
        RelayMsg::SessionEnded { reason } => assert_eq!(reason, EndReason::WrongCode),
        other => panic!("{other:?}"),
    }
    let e = within(console.join(&slot)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::CodeBurned));
    // The agent gets a fresh slot on the same connection.
    let (fresh, _) = within(agent.register()).await.unwrap();
    assert_ne!(fresh, slot);
    let (_, h) = relay.http_get("/health").await;
    let h: serde_json::Value = serde_json::from_str(&h).unwrap();
    assert_eq!(h["sessions"], 0);
    assert_eq!(h["agents_waiting"], 1);
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_endpoints() {
    let relay = TestRelay::start().await;
    let (agent, console) = relay.pair().await;
    let mut s = agent.open_payload_stream().await.unwrap();
    s.send(&[1u8; 3000]).await.unwrap();
    let mut r = console.accept_payload_stream().await.unwrap();
    within(r.recv()).await.unwrap().unwrap();
    // The relay counts a chunk once its write towards the console has returned, which may be
    // just after the console has read it (CI once scraped 2,842 of the 3,000 bytes): the count
    // must reach the whole payload, and soon.
    let bytes =
        "tandem_relay_forwarded_bytes_total{direction=\"agent_to_console\",path=\"stream\"}";
    let deadline = Instant::now() + Duration::from_secs(5);
    let body = loop {
        let (status, body) = relay.http_get("/metrics").await;
        assert!(status.contains("200"), "{status}");
        if metric(&body, bytes) == 3000.0 || Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(metric(&body, bytes), 3000.0);
    assert_eq!(metric(&body, "tandem_relay_sessions"), 1.0);
    assert_eq!(metric(&body, "tandem_relay_connections"), 2.0);
    assert_eq!(metric(&body, "tandem_relay_sessions_started_total"), 1.0);
    let (status, body) = relay.http_get("/health").await;
    assert!(status.contains("200"));
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["sessions"], 1);
    let (status, _) = relay.http_get("/nope").await;
    assert!(status.contains("404"));
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_byte_rate_limit_drops_excess_datagrams() {
    let relay = TestRelay::start_with(Limits {
        session_bytes_per_second: Some(10_000),
        ..Limits::default()
    })
    .await;
    let (agent, console) = relay.pair().await;
    // 100 datagrams of 1000 bytes at once = 100 kB against a 10 kB/s budget (burst 10 kB).
    for _ in 0..100 {
        agent.send_datagram(Bytes::from(vec![0u8; 1000])).unwrap();
    }
    let mut n = 0;
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(300), console.recv_datagram()).await
    {
        n += 1;
    }
    assert!(n <= 15, "{n} datagrams passed a 10 kB/s limit");
    assert!(n >= 5, "only {n} datagrams passed");
    let m = relay.http_get("/metrics").await.1;
    assert!(
        metric(
            &m,
            "tandem_relay_dropped_datagrams_total{reason=\"rate_limited\"}"
        ) >= 80.0
    );
    relay.shutdown().await;
}

/// The real binary: admin commands, SIGTERM drain telling peers, restart keeping technicians.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_admin_drain_and_restart_keep_technicians() {
    tandem_tests::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let out = relay_admin(
        dir.path(),
        &["technician", "add", "--org", "ACME IT", "--name", "carol"],
    );
    let token = token_from_output(&out);
    let list = relay_admin(dir.path(), &["technician", "list", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(rows[0]["name"], "carol");
    assert!(!list.contains(token.expose()), "token must not be listed");

    let relay = RelayProcess::start(dir.path()).await;
    let pin_cmd = relay_admin(dir.path(), &["fingerprint"]);
    assert_eq!(pin_cmd.trim(), relay.pin.to_string());
    let mut agent = within(RelayLink::connect(&relay.opts())).await.unwrap();
    let (slot, _) = within(agent.register()).await.unwrap();
    let mut console = within(RelayLink::connect(&relay.opts())).await.unwrap();
    within(console.authenticate(&token)).await.unwrap();
    within(console.join(&slot)).await.unwrap();
    within(agent.wait_paired()).await.unwrap();

    // SIGTERM: peers hear that the relay shuts down, the process exits 0.
    let status = relay.terminate().await;
    assert!(status.success(), "{status:?}");
    for link in [&mut agent, &mut console] {
        let code = loop {
            match within(link.recv()).await {
                Ok(RelayMsg::ShuttingDown) => break Some(ErrorCode::ShuttingDown),
                Ok(RelayMsg::SessionEnded { .. }) => continue,
                Ok(other) => panic!("{other:?}"),
                Err(e) => break e.code(),
            }
        };
        assert_eq!(code, Some(ErrorCode::ShuttingDown));
    }

    // The audit row was closed by the drain.
    let audit = relay_admin(dir.path(), &["audit", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&audit).unwrap();
    assert_eq!(rows[0]["technician"], "carol");
    assert_eq!(rows[0]["end_reason"], "relay_shutdown");
    let table = relay_admin(dir.path(), &["audit"]);
    assert!(
        table.contains("carol") && table.contains("relay_shutdown"),
        "{table}"
    );

    // Restart: same pin, technician still valid; disable via admin, then refused.
    let relay = RelayProcess::start(dir.path()).await;
    let mut c = within(RelayLink::connect(&relay.opts())).await.unwrap();
    within(c.authenticate(&token)).await.unwrap();
    relay_admin(dir.path(), &["technician", "disable", "carol"]);
    let mut c2 = within(RelayLink::connect(&relay.opts())).await.unwrap();
    let e = within(c2.authenticate(&token)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TechnicianDisabled));
    // Rotating the token invalidates the old one.
    relay_admin(dir.path(), &["technician", "enable", "carol"]);
    let out = relay_admin(dir.path(), &["technician", "rotate-token", "carol"]);
    let new_token = token_from_output(&out);
    let mut c3 = within(RelayLink::connect(&relay.opts())).await.unwrap();
    assert_eq!(
        within(c3.authenticate(&token)).await.unwrap_err().code(),
        Some(ErrorCode::BadToken)
    );
    let mut c4 = within(RelayLink::connect(&relay.opts())).await.unwrap();
    within(c4.authenticate(&new_token)).await.unwrap();
    relay.terminate().await;
}

/// A side that loses its relay connection comes back on a new one with its resume token; the
/// session, its forwarding and its byte counts carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connection_resumes_within_grace() {
    let relay = TestRelay::start().await;
    let (mut agent, slot) = relay.agent().await;
    let mut console = relay.console().await;
    let console_token = within(console.join(&slot)).await.unwrap();
    let (_, _, agent_token) = within(agent.wait_paired()).await.unwrap();
    assert_ne!(agent_token, console_token);

    // The console's link dies (as on a network change).
    console.close().await;
    assert_eq!(
        within(agent.recv()).await.unwrap(),
        RelayMsg::PeerSuspended { grace_secs: 15 }
    );
    let mut console = relay.connect().await;
    within(console.resume(&console_token)).await.unwrap();
    assert_eq!(within(agent.recv()).await.unwrap(), RelayMsg::PeerResumed);

    // Payloads flow again, both ways.
    for (from, to) in [(&agent, &console), (&console, &agent)] {
        let got = within(async {
            loop {
                from.send_datagram(Bytes::from_static(b"back again"))
                    .unwrap();
                if let Ok(Ok(d)) =
                    tokio::time::timeout(Duration::from_millis(200), to.recv_datagram()).await
                {
                    return d;
                }
            }
        })
        .await;
        assert_eq!(&got[..], b"back again");
    }

    // Resuming the agent's side while its old connection is still attached takes over: the old
    // connection is closed with a reason.
    let mut agent2 = relay.connect().await;
    within(agent2.resume(&agent_token)).await.unwrap();
    assert_eq!(
        closed_code(&mut agent).await,
        Some(ErrorCode::SessionTakenOver)
    );
    let (_, h) = relay.http_get("/health").await;
    let h: serde_json::Value = serde_json::from_str(&h).unwrap();
    assert_eq!(h["sessions"], 1);

    // A token of an ended session is refused.
    console.end(EndReason::EndedByTechnician).await.unwrap();
    let mut late = relay.connect().await;
    let e = within(late.resume(&console_token)).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::SessionGone));
    relay.shutdown().await;
}

/// An MSP's own certificate chain and key instead of the generated ones; clients trust its CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msp_certificate_is_used_and_trusted_by_its_ca() {
    tandem_tests::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let own = tempfile::tempdir().unwrap();
    let g = tandem_certs::generate(&["relay.msp.example".into()]).unwrap();
    let (chain, key, ca) = (
        own.path().join("chain.pem"),
        own.path().join("key.pem"),
        own.path().join("ca.pem"),
    );
    std::fs::write(&chain, format!("{}{}", g.relay_pem, g.ca_pem)).unwrap();
    std::fs::write(&key, &g.relay_key_pem).unwrap();
    std::fs::write(&ca, &g.ca_pem).unwrap();
    let relay = RelayProcess::start_with(
        dir.path(),
        &[
            "--cert",
            chain.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    // The relay made no certificate of its own.
    assert!(!dir.path().join(tandem_certs::RELAY_CERT_FILE).exists());
    let port = relay.addr.rsplit_once(':').unwrap().1;
    let opts = ConnectOptions::new(
        format!("localhost:{port}"),
        RelayTrust::ca_file(&ca).unwrap(),
    );
    let mut agent = within(RelayLink::connect(&opts)).await.unwrap();
    within(agent.register()).await.unwrap();
    // The printed pin is the MSP certificate's.
    let leaf = tandem_certs::load_certs(&chain).unwrap().remove(0);
    assert_eq!(relay.pin, Fingerprint::of(&leaf));
    relay.terminate().await;
}

/// A client of protocol version 1 (an agent download from before direct paths) still pairs with
/// this relay, and is never sent a version-2 message it could not read; a version-2 client on the
/// same session is told its path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_1_client_pairs_and_never_sees_path_messages() {
    let relay = TestRelay::start().await;
    let mut tls = RelayTrust::Pin(relay.pin)
        .client_config(tandem_proto::ALPN_V1)
        .unwrap();
    tls.alpn_protocols = vec![tandem_proto::ALPN_V1.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let addr: std::net::SocketAddr = relay.addr().parse().unwrap();
    let ep = tandem_net::client_endpoint(addr, quinn::ClientConfig::new(std::sync::Arc::new(quic)))
        .unwrap();
    let conn = ep.connect(addr, "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let frame = encode_frame(
        &ClientMsg::Register {
            client: ClientInfo {
                software: "tandem-agent 0.0.9".into(),
            },
        },
        MAX_CONTROL_FRAME,
    )
    .unwrap();
    send.write_all(&frame).await.unwrap();
    async fn next(recv: &mut quinn::RecvStream) -> RelayMsg {
        let mut head = [0u8; 4];
        recv.read_exact(&mut head).await.unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(head) as usize];
        recv.read_exact(&mut body).await.unwrap();
        tandem_proto::decode_body(&body).unwrap()
    }
    let slot = match next(&mut recv).await {
        RelayMsg::Registered { slot, .. } => slot,
        other => panic!("{other:?}"),
    };
    let mut console = relay.console().await;
    assert!(console.speaks_paths());
    console.join(&slot).await.unwrap();
    assert!(matches!(next(&mut recv).await, RelayMsg::Paired { .. }));
    // Nothing else comes to the version-1 agent (a PathInfo would be next).
    let more = tokio::time::timeout(Duration::from_millis(500), next(&mut recv)).await;
    assert!(more.is_err(), "{more:?}");
    let info = tokio::time::timeout(
        Duration::from_secs(2),
        console.path_info().wait_for(|i| i.is_some()),
    )
    .await
    .unwrap()
    .map(|g| *g)
    .unwrap();
    let info = info.unwrap();
    assert!(info.direct_allowed);
    assert!(info.observed.is_some_and(|o| o.ip().is_loopback()));
    // A relay channel needs both sides to speak protocol 3: none for this session.
    assert!(console.channel_token().borrow().is_none());
}

/// Relay channels: a paired side's channel packets reach its peer with the peer's token; the
/// same token from any other address, a guessed token, or a token of an ended session is dropped
/// and counted, and the peer receives nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_packets_reach_the_peer_and_nobody_else_can_use_a_channel() {
    use tandem_net::channel;
    let relay = TestRelay::start().await;
    let (mut agent, console) = relay.pair().await;
    let relay_addr: std::net::SocketAddr = relay.addr().parse().unwrap();
    let token_of = |l: &RelayLink| {
        let mut w = l.channel_token();
        async move {
            tokio::time::timeout(Duration::from_secs(2), w.wait_for(|t| t.is_some()))
                .await
                .unwrap()
                .map(|t| t.unwrap())
                .unwrap()
        }
    };
    let (a_token, c_token) = (token_of(&agent).await, token_of(&console).await);
    assert_ne!(a_token, c_token);
    let (a_port, c_port) = (
        agent.channel().unwrap().port,
        console.channel().unwrap().port,
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    c_port.set_channel(relay_addr, c_token, std::sync::Arc::new(tx));
    let packet = |token: u64, body: &[u8]| {
        let mut p = vec![0u8; channel::HEADER + body.len()];
        channel::write_header(&mut p, token);
        p[channel::HEADER..].copy_from_slice(body);
        p
    };
    let dropped = |reason: &str| {
        metric(
            &relay.handle().metrics().encode(),
            &format!("tandem_relay_dropped_datagrams_total{{reason=\"{reason}\"}}"),
        )
    };
    // The agent's packet from its own link's address arrives, once.
    a_port
        .send_to(relay_addr, &packet(a_token, b"hello, console"))
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got[..], b"hello, console");
    // The agent's token from another socket of the same machine: dropped at the relay.
    let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger
        .send_to(&packet(a_token, b"forged packet"), relay_addr)
        .unwrap();
    // A guessed token from the agent's own address.
    a_port
        .send_to(relay_addr, &packet(a_token ^ 1, b"guessed token"))
        .unwrap();
    // A relayed-looking packet straight to the console from the stranger (not from the relay).
    stranger
        .send_to(&packet(c_token, b"spoofed reply"), c_port.local_addr())
        .unwrap();
    let t = Instant::now();
    while (dropped("channel_wrong_source") < 1.0 || dropped("channel_unknown_token") < 1.0)
        && t.elapsed() < Duration::from_secs(2)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(dropped("channel_wrong_source"), 1.0);
    assert_eq!(dropped("channel_unknown_token"), 1.0);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "nothing but the agent's own packet reaches the console"
    );
    let forwarded = metric(
        &relay.handle().metrics().encode(),
        "tandem_relay_forwarded_bytes_total{direction=\"agent_to_console\",path=\"channel\"}",
    );
    assert_eq!(forwarded, 14.0);
    // The session ends: the tokens stop working at once.
    agent
        .end(tandem_proto::EndReason::EndedByUser)
        .await
        .unwrap();
    let t = Instant::now();
    while relay.handle().stats().sessions > 0 && t.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a_port
        .send_to(relay_addr, &packet(a_token, b"late packet!"))
        .unwrap();
    let t = Instant::now();
    while dropped("channel_unknown_token") < 2.0 && t.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(dropped("channel_unknown_token"), 2.0);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), rx.recv())
            .await
            .is_err()
    );
}
