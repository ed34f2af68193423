//! End-to-end sessions through a real relay on loopback: setup keyed by the code, channels, wrong
//! codes, resume after a cut link, and ending with a reason.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};
use tandem_proto::{EndReason, ErrorCode};
use tandem_relay_server::Limits;
use tandem_session::{
    AgentEvent, AgentHost, CodeChange, ControlMsg, InputItem, Session, SessionCode, SessionConfig,
    SessionError, SessionEvent,
};
use tandem_tests::TestRelay;

const T: Duration = Duration::from_secs(20);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(T, f).await.expect("timed out")
}

fn cfg(name: &str) -> SessionConfig {
    SessionConfig {
        software: name.into(),
        capabilities: vec!["video/h264".into(), "input/v1".into()],
        ..SessionConfig::default()
    }
}

/// Starts an agent host and returns it with its first code.
async fn host(relay: &TestRelay, c: SessionConfig) -> (AgentHost, SessionCode) {
    let mut host = within(AgentHost::connect(relay.opts(), c)).await.unwrap();
    match within(host.next()).await.unwrap() {
        AgentEvent::Code { code, why, .. } => {
            assert_eq!(why, CodeChange::New);
            (host, code)
        }
        other => panic!("{other:?}"),
    }
}

/// Drives the host until it yields a session (or fails).
async fn agent_session(host: &mut AgentHost) -> Result<Session, AgentEvent> {
    loop {
        match within(host.next()).await.unwrap() {
            AgentEvent::Joining { .. } => continue,
            AgentEvent::Session(s) => return Ok(*s),
            other => return Err(other),
        }
    }
}

/// A confirmed (agent, console) pair through `relay`.
async fn pair(
    relay: &TestRelay,
    agent_cfg: SessionConfig,
    console_cfg: SessionConfig,
) -> (Session, Session) {
    let (mut host, code) = host(relay, agent_cfg).await;
    let opts = relay.opts();
    let token = relay.token.clone();
    let console =
        tokio::spawn(async move { tandem_session::join(&opts, &token, &code, &console_cfg).await });
    let agent = agent_session(&mut host).await.unwrap();
    let console = within(console).await.unwrap().unwrap();
    (agent, console)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_with_all_channels() {
    let relay = TestRelay::start().await;
    let (mut host, code) = host(&relay, cfg("tandem-agent test")).await;
    assert_eq!(code.grouped().len(), 11, "417-382-905 shape");
    // The user reads the code aloud; the technician types it with spaces.
    let typed = code.grouped().replace('-', " ");
    let parsed = SessionCode::parse(&format!("code is {typed}")).unwrap();
    let opts = relay.opts();
    let token = relay.token.clone();
    let started = Instant::now();
    let console = tokio::spawn(async move {
        tandem_session::join(&opts, &token, &parsed, &cfg("tandem-console test")).await
    });
    match within(host.next()).await.unwrap() {
        AgentEvent::Joining {
            technician,
            organisation,
        } => assert_eq!(
            (technician.as_str(), organisation.as_str()),
            ("alice", "ACME IT")
        ),
        other => panic!("{other:?}"),
    }
    let agent = match within(host.next()).await.unwrap() {
        AgentEvent::Session(s) => *s,
        other => panic!("{other:?}"),
    };
    let console = within(console).await.unwrap().unwrap();
    eprintln!("join to confirmed: {:?}", started.elapsed());
    assert_eq!(agent.peer().software, "tandem-console test");
    assert_eq!(console.peer().software, "tandem-agent test");
    assert_eq!(agent.peer().technician.as_deref(), Some("alice"));
    assert_eq!(
        agent.peer().capabilities,
        vec!["video/h264", "input/v1", tandem_session::CAP_DIRECT]
    );
    assert_eq!(agent.session_key(), console.session_key());

    // Control both ways.
    agent
        .send_control(&ControlMsg::Consent {
            decision: tandem_session::Consent::ViewOnly,
        })
        .await
        .unwrap();
    assert_eq!(
        within(console.recv_control()).await.unwrap(),
        ControlMsg::Consent {
            decision: tandem_session::Consent::ViewOnly
        }
    );
    console
        .send_control(&ControlMsg::KeyframeRequest)
        .await
        .unwrap();
    assert_eq!(
        within(agent.recv_control()).await.unwrap(),
        ControlMsg::KeyframeRequest
    );

    // Video: frames arrive whole and in increasing order; a large one too.
    let video = agent.video_sender();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    video.send(1, b"frame one").await.unwrap();
    video.send(2, &big).await.unwrap();
    // Frames go oldest first and are never skipped by the sender; the receiver never goes
    // backwards. Frames come in increasing order and the newest arrives whole.
    let mut seqs = vec![];
    let f2 = within(async {
        loop {
            let f = console.recv_video().await.unwrap();
            seqs.push(f.seq);
            if f.seq == 2 {
                return f;
            }
            assert_eq!(&f.data[..], b"frame one");
        }
    })
    .await;
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(&f2.data[..], &big[..]);

    // Input: events reliable and ordered; pointer moves newest-wins.
    let input = console.input_sender();
    for i in 0..200u32 {
        input.send_event(&i.to_be_bytes()).await.unwrap();
    }
    for i in 0..200u32 {
        match within(agent.recv_input()).await.unwrap() {
            InputItem::Event(b) => assert_eq!(&b[..], &i.to_be_bytes()),
            InputItem::Pointer(_) => continue,
        }
    }
    input.send_pointer(b"x=10,y=20").unwrap();
    let got = within(async {
        loop {
            if let InputItem::Pointer(p) = agent.recv_input().await.unwrap() {
                return p;
            }
        }
    })
    .await;
    assert_eq!(&got[..], b"x=10,y=20");

    // The technician ends; the agent hears why on the control channel and sees the session close.
    console.end(EndReason::EndedByTechnician).await;
    assert_eq!(
        within(agent.recv_control()).await.unwrap(),
        ControlMsg::End {
            reason: EndReason::EndedByTechnician
        }
    );
    let end = within(agent.closed()).await;
    assert_eq!(end.reason, EndReason::EndedByTechnician);
    assert!(!end.local);
    assert!(within(console.closed()).await.local);

    // The relay's books balance: the session is over on the relay too.
    within(async {
        loop {
            let (_, h) = relay.http_get("/health").await;
            let h: serde_json::Value = serde_json::from_str(&h).unwrap();
            if h["sessions"] == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_code_gets_exactly_one_try_then_a_new_code() {
    let relay = TestRelay::start().await;
    let agent_cfg = SessionConfig {
        guesses: tandem_session::GuessLimit {
            first_pause: Duration::from_millis(200),
            ..Default::default()
        },
        ..cfg("agent")
    };
    let (mut host, code) = host(&relay, agent_cfg).await;
    // Right slot, wrong secret.
    let d = code.secret().digits();
    let wrong_digit = if d.ends_with('0') { '1' } else { '0' };
    let wrong =
        SessionCode::from_parts(code.slot().clone(), &format!("{}{}", &d[..5], wrong_digit))
            .unwrap();
    let opts = relay.opts();
    let token = relay.token.clone();
    let console =
        tokio::spawn(
            async move { tandem_session::join(&opts, &token, &wrong, &cfg("console")).await },
        );
    // The code is burned; no code for a pause (the agent's own guess limit), then a new one.
    match agent_session(&mut host).await {
        Err(AgentEvent::Paused { why, failures, .. }) => {
            assert_eq!(why, CodeChange::WrongCode);
            assert_eq!(failures, 1);
        }
        Ok(_) => panic!("a session with a wrong code"),
        Err(other) => panic!("{other:?}"),
    }
    assert_eq!(host.code(), None);
    let new_code = match within(host.next()).await.unwrap() {
        AgentEvent::Code { code: c, why, .. } => {
            assert_eq!(why, CodeChange::WrongCode);
            c
        }
        other => panic!("{other:?}"),
    };
    let err = within(console).await.unwrap().unwrap_err();
    assert!(matches!(err, SessionError::WrongCode), "{err:?}");
    assert!(err.to_string().contains("wrong session code"), "{err}");
    assert_ne!(new_code.slot(), code.slot(), "a new slot");
    assert_ne!(new_code, code);

    // The burned code cannot be tried again, even with the right secret.
    let e = within(tandem_session::join(
        &relay.opts(),
        &relay.token,
        &code,
        &cfg("console"),
    ))
    .await
    .unwrap_err();
    match e {
        SessionError::Relay(ce) => assert_eq!(ce.code(), Some(ErrorCode::CodeBurned)),
        other => panic!("{other:?}"),
    }

    // The new code works.
    let opts = relay.opts();
    let token = relay.token.clone();
    let c2 = new_code.clone();
    let console =
        tokio::spawn(
            async move { tandem_session::join(&opts, &token, &c2, &cfg("console")).await },
        );
    let _agent = agent_session(&mut host).await.unwrap();
    let _console = within(console).await.unwrap().unwrap();
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_code_is_replaced() {
    let relay = TestRelay::start_with(Limits {
        slot_ttl: Duration::from_millis(800),
        ..Limits::default()
    })
    .await;
    let (mut host, code) = host(&relay, cfg("agent")).await;
    match within(host.next()).await.unwrap() {
        AgentEvent::Code { code: c, why, .. } => {
            assert_eq!(why, CodeChange::Expired);
            assert_ne!(c.slot(), code.slot());
        }
        other => panic!("{other:?}"),
    }
    let e = within(tandem_session::join(
        &relay.opts(),
        &relay.token,
        &code,
        &cfg("console"),
    ))
    .await
    .unwrap_err();
    match e {
        SessionError::Relay(ce) => assert_eq!(ce.code(), Some(ErrorCode::ExpiredSlot)),
        other => panic!("{other:?}"),
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_link_resumes_the_same_inner_connection() {
    let relay = TestRelay::start().await;
    let (agent, console) = pair(&relay, cfg("agent"), cfg("console")).await;
    let inner_id = agent.connection().stable_id();

    // Cut the agent's relay link: the console hears the agent is suspended, the agent reconnects
    // and resumes; the inner QUIC connection is the same one.
    agent.simulate_link_loss();
    assert_eq!(within(agent.next_event()).await, SessionEvent::LinkLost);
    assert_eq!(within(agent.next_event()).await, SessionEvent::LinkResumed);
    let mut seen = vec![];
    while seen.last() != Some(&SessionEvent::PeerResumed) {
        seen.push(within(console.next_event()).await);
    }
    assert!(
        matches!(seen[0], SessionEvent::PeerSuspended { .. }),
        "{seen:?}"
    );
    assert_eq!(agent.connection().stable_id(), inner_id);

    // Data flows over the resumed path.
    agent
        .send_control(&ControlMsg::Permissions { view_only: true })
        .await
        .unwrap();
    assert_eq!(
        within(console.recv_control()).await.unwrap(),
        ControlMsg::Permissions { view_only: true }
    );
    let v = agent.video_sender();
    v.send(1, &[7u8; 50_000]).await.unwrap();
    assert_eq!(
        within(console.recv_video()).await.unwrap().data.len(),
        50_000
    );
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_gone_ends_both_sides_with_a_reason_after_the_grace() {
    let relay = TestRelay::start_with(Limits {
        resume_grace: Duration::from_secs(1),
        ..Limits::default()
    })
    .await;
    let c = SessionConfig {
        resume_grace: Duration::from_secs(1),
        ..cfg("x")
    };
    let (agent, console) = pair(&relay, c.clone(), c).await;
    let started = Instant::now();
    relay.shutdown().await;
    for s in [&agent, &console] {
        let end = within(s.closed()).await;
        match &end.reason {
            EndReason::Other(why) => assert!(why.contains("relay"), "{why}"),
            EndReason::RelayShutdown => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_leaving_ends_the_console_session() {
    let relay = TestRelay::start().await;
    let (agent, console) = pair(&relay, cfg("agent"), cfg("console")).await;
    agent.end(EndReason::EndedByUser).await;
    let end = within(console.closed()).await;
    assert_eq!(end.reason, EndReason::EndedByUser);
    relay.shutdown().await;
}

/// Input that the console sends while the user is still deciding is dropped by the agent, not
/// queued: after "Allow control" only what was sent after the answer arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_sent_before_consent_never_arrives() {
    let relay = TestRelay::start().await;
    let (agent, console) = pair(&relay, cfg("agent"), cfg("console")).await;
    let input = console.input_sender();
    for i in 0..5 {
        input
            .send_event(format!("before {i}").as_bytes())
            .await
            .unwrap();
        input.send_pointer(&[i; 8]).unwrap();
    }
    // All five events reached the agent (pointer datagrams may be lost) and were dropped there.
    within(async {
        while agent.input_dropped_before_consent() < 5 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    agent
        .send_control(&ControlMsg::Consent {
            decision: tandem_session::Consent::AllowControl,
        })
        .await
        .unwrap();
    assert!(matches!(
        within(console.recv_control()).await.unwrap(),
        ControlMsg::Consent { .. }
    ));
    input.send_event(b"after").await.unwrap();
    match within(agent.recv_input()).await.unwrap() {
        InputItem::Event(b) => assert_eq!(&b[..], b"after"),
        other => panic!("input from before the answer: {other:?}"),
    }
    relay.shutdown().await;
}
