//! The relay is not trusted. A relay that sits in the middle of the inner connection, or that flips,
//! replays, reorders and drops payloads, or that records everything it forwards, gets no session
//! data and cannot alter any.
#![allow(clippy::unwrap_used)]

use std::time::Duration;
use tandem_proto::{EndReason, Secret};
use tandem_session::pake::PakeMsg;
use tandem_session::{
    AgentEvent, AgentHost, CodeChange, Consent, ControlMsg, GuessLimit, InputItem, Session,
    SessionCode, SessionConfig, SessionError,
};
use tandem_tests::fake_relay::{FakeRelay, Mode, Story, Tamper};

const T: Duration = Duration::from_secs(30);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(T, f).await.expect("timed out")
}

async fn first_code(host: &mut AgentHost) -> SessionCode {
    match within(host.next()).await.unwrap() {
        AgentEvent::Code { code, .. } => code,
        other => panic!("{other:?}"),
    }
}

/// Agent and console through the fake relay; returns the console's result and the agent's next
/// event after the join.
async fn attempt(relay: &FakeRelay) -> (Result<Session, SessionError>, AgentEvent, SessionCode) {
    tandem_tests::init_logs();
    let mut host = within(AgentHost::connect(relay.opts(), SessionConfig::default()))
        .await
        .unwrap();
    let code = first_code(&mut host).await;
    let opts = relay.opts();
    let c = code.clone();
    let console = tokio::spawn(async move {
        tandem_session::join(
            &opts,
            &Secret::new("tnd_1_any"),
            &c,
            &SessionConfig::default(),
        )
        .await
    });
    let agent_event = loop {
        match within(host.next()).await.unwrap() {
            AgentEvent::Joining { technician, .. } => {
                // The consent prompt would show whom the relay vouches for: here, the attacker.
                assert_eq!(technician, "mallory");
            }
            other => break other,
        }
    };
    (within(console).await.unwrap(), agent_event, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_in_the_middle_of_the_inner_connection_fails_the_pake_on_both_sides() {
    let relay = FakeRelay::start(Mode::Mitm).await;
    let (console, agent, code) = attempt(&relay).await;
    // The relay knew the slot, not the secret; it forwarded every PAKE message faithfully, but it
    // terminated TLS on both sides, so the exporters differ and confirmation fails everywhere.
    assert!(
        matches!(console, Err(SessionError::WrongCode)),
        "{console:?}"
    );
    let _ = code;
    match agent {
        // The code was burned; the next one follows after the agent's pause.
        AgentEvent::Paused { why, failures, .. } => {
            assert_eq!(why, CodeChange::WrongCode);
            assert_eq!(failures, 1);
        }
        AgentEvent::Session(_) => panic!("the agent accepted a session through a MITM"),
        other => panic!("{other:?}"),
    }
    // Only PAKE messages crossed, and no confirmation from the console: no session data at all.
    let seen = relay.seen.lock().unwrap();
    assert!(!seen.mitm_frames.is_empty());
    for f in &seen.mitm_frames {
        match tandem_proto::decode_body::<PakeMsg>(&f[4..]) {
            Ok(PakeMsg::Start { .. } | PakeMsg::Reply { .. } | PakeMsg::Fail) => {}
            other => panic!("unexpected frame through the MITM: {other:?}"),
        }
    }
    relay.close();
}

/// The agent's user allows control (input is accepted only after that).
async fn allow(agent: &Session) {
    agent
        .send_control(&ControlMsg::Consent {
            decision: Consent::AllowControl,
        })
        .await
        .unwrap();
}

fn session(e: AgentEvent) -> Session {
    match e {
        AgentEvent::Session(s) => *s,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_relay_never_gets_altered_data_delivered() {
    let relay = FakeRelay::start(Mode::Forward(Tamper {
        flip_every: Some(7),
        duplicate_every: Some(5),
        drop_every: Some(11),
        reorder: true,
    }))
    .await;
    let (console, agent, _) = attempt(&relay).await;
    let console = console.unwrap();
    let agent = session(agent);
    allow(&agent).await;
    assert_eq!(
        within(console.recv_control()).await.unwrap(),
        ControlMsg::Consent {
            decision: Consent::AllowControl
        }
    );
    // A large frame (many packets, several of them flipped, duplicated, dropped, reordered).
    let frame: Vec<u8> = (0..400_000u32).map(|i| (i * 31 % 253) as u8).collect();
    agent.video_sender().send(1, &frame).await.unwrap();
    let got = within(console.recv_video()).await.unwrap();
    assert_eq!(got.data.len(), frame.len());
    assert!(got.data[..] == frame[..], "altered video delivered");
    let input = console.input_sender();
    for i in 0..300u32 {
        input
            .send_event(format!("event {i}").as_bytes())
            .await
            .unwrap();
    }
    for i in 0..300u32 {
        loop {
            match within(agent.recv_input()).await.unwrap() {
                InputItem::Event(b) => {
                    assert_eq!(&b[..], format!("event {i}").as_bytes());
                    break;
                }
                InputItem::Pointer(_) => continue,
            }
        }
    }
    agent
        .send_control(&ControlMsg::Permissions { view_only: false })
        .await
        .unwrap();
    assert_eq!(
        within(console.recv_control()).await.unwrap(),
        ControlMsg::Permissions { view_only: false }
    );
    assert!(relay.seen.lock().unwrap().datagrams > 100);
    relay.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_relay_never_sees_pixels_keystrokes_or_the_code() {
    let relay = FakeRelay::start(Mode::Forward(Tamper::default())).await;
    let (console, agent, code) = attempt(&relay).await;
    let console = console.unwrap();
    let agent = session(agent);
    allow(&agent).await;
    const PIXELS: &[u8] = b"PIXEL-MARKER-7f3a9c1e-";
    const TYPED: &[u8] = b"TYPED-TEXT-MARKER-b81d";
    let frame: Vec<u8> = PIXELS.iter().copied().cycle().take(200_000).collect();
    agent.video_sender().send(1, &frame).await.unwrap();
    assert_eq!(
        within(console.recv_video()).await.unwrap().data.len(),
        frame.len()
    );
    console.input_sender().send_event(TYPED).await.unwrap();
    console.input_sender().send_pointer(TYPED).unwrap();
    loop {
        if let InputItem::Event(b) = within(agent.recv_input()).await.unwrap() {
            assert_eq!(&b[..], TYPED);
            break;
        }
    }
    // The toolbox: a chat line, a clipboard text and a file (whose name is a marker too).
    const CHAT: &str = "CHAT-MARKER-5e0d21";
    const CLIP: &[u8] = b"CLIPBOARD-MARKER-93c7aa";
    const FILE: &[u8] = b"FILE-CONTENT-MARKER-44f1b0-";
    const FILE_NAME: &str = "FILENAME-MARKER-1c9e.txt";
    console
        .send_control(&ControlMsg::Chat { text: CHAT.into() })
        .await
        .unwrap();
    loop {
        if let ControlMsg::Chat { text } = within(agent.recv_control()).await.unwrap() {
            assert_eq!(text, CHAT);
            break;
        }
    }
    console
        .send_clipboard(tandem_session::ClipFormat::Text, CLIP)
        .await
        .unwrap();
    assert_eq!(
        &within(agent.recv_clipboard()).await.unwrap().data[..],
        CLIP
    );
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let content: Vec<u8> = FILE.iter().copied().cycle().take(300_000).collect();
    std::fs::write(&src, &content).unwrap();
    let inbox_dir = dir.path().join("inbox");
    std::fs::create_dir(&inbox_dir).unwrap();
    let inbox = tandem_toolbox::Inbox::new(&inbox_dir, Default::default()).unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let out = console.transfer_opener().open().await.unwrap();
    let item = tandem_toolbox::Outgoing::new(&src, FILE_NAME, content.len() as u64);
    let options = tandem_toolbox::SendOptions::default();
    let send = tandem_toolbox::send_file(
        out.recv,
        out.send,
        &item,
        &options,
        |_: &tandem_toolbox::Progress| {},
        &cancel,
    );
    let recv = async {
        let t = within(agent.accept_transfer()).await.unwrap();
        tandem_toolbox::receive_file(
            t.recv,
            t.send,
            &inbox,
            |_: &tandem_toolbox::Progress| {},
            &cancel,
        )
        .await
    };
    let (sent, got) = tokio::join!(send, recv);
    sent.unwrap();
    assert_eq!(std::fs::read(got.unwrap().path).unwrap(), content);
    console.end(EndReason::EndedByTechnician).await;
    let seen = relay.seen.lock().unwrap();
    assert!(seen.bytes.len() > 500_000, "the relay saw the traffic");
    let hay = &seen.bytes;
    let find = |needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(!find(PIXELS), "pixels visible to the relay");
    assert!(!find(TYPED), "typed text visible to the relay");
    assert!(!find(CHAT.as_bytes()), "chat visible to the relay");
    assert!(!find(CLIP), "clipboard visible to the relay");
    assert!(!find(FILE), "file content visible to the relay");
    assert!(
        !find(FILE_NAME.as_bytes()),
        "file name visible to the relay"
    );
    assert!(
        !find(code.grouped().as_bytes()),
        "the code visible to the relay"
    );
    assert!(!find(
        format!("{}{}", code.slot(), code.secret().digits()).as_bytes()
    ));
    relay.close();
}

/// An agent whose guess limit is shortened for the test (the default pauses are 30 s and 60 s).
fn quick_limit() -> SessionConfig {
    SessionConfig {
        guesses: GuessLimit {
            first_pause: Duration::from_millis(300),
            max_pause: Duration::from_secs(10),
            lock_after: 3,
        },
        ..SessionConfig::default()
    }
}

/// The relay plays the console: it joins every code the agent shows, as fast as it can, each time
/// with a new guess of the secret. The agent itself allows three guesses, with growing pauses
/// between them, and then none until its user asks for a new code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_playing_the_console_gets_three_guesses_then_none_until_the_user_asks() {
    tandem_tests::init_logs();
    let relay = std::sync::Arc::new(FakeRelay::start(Mode::Forward(Tamper::default())).await);
    let mut host = within(AgentHost::connect(relay.opts(), quick_limit()))
        .await
        .unwrap();
    let requester = host.code_requester();
    let start = std::time::Instant::now();
    // The attacker: whenever an agent waits, join it with a guess.
    let attacker = {
        let relay = relay.clone();
        tokio::spawn(async move {
            let mut guesses = 0u32;
            let until = std::time::Instant::now() + Duration::from_secs(4);
            while std::time::Instant::now() < until {
                let Some(slot) = relay.agent_slot() else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let guess =
                    SessionCode::from_parts(slot, &format!("{:06}", 100_000 + guesses)).unwrap();
                guesses += 1;
                let r = tandem_session::join(
                    &relay.opts(),
                    &Secret::new("tnd_1_any"),
                    &guess,
                    &SessionConfig::default(),
                )
                .await;
                assert!(r.is_err(), "a guess succeeded");
            }
            guesses
        })
    };
    // The agent, with nobody in front of it, for the same 4 s.
    let mut events = vec![];
    let agent = async {
        loop {
            let ev = host.next().await.unwrap();
            events.push((start.elapsed(), ev));
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(4), agent).await;
    let guesses = within(attacker).await.unwrap();
    let joins: Vec<Duration> = events
        .iter()
        .filter(|(_, e)| matches!(e, AgentEvent::Joining { .. }))
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(joins.len(), 3, "handshakes the agent ran: {events:?}");
    assert!(guesses <= 3, "{guesses} guesses reached the agent");
    // Pauses of 300 ms, then 600 ms, between the attempts; then the lock.
    assert!(
        joins[1] - joins[0] >= Duration::from_millis(300),
        "{joins:?}"
    );
    assert!(
        joins[2] - joins[1] >= Duration::from_millis(600),
        "{joins:?}"
    );
    let pauses: Vec<(u32, Duration)> = events
        .iter()
        .filter_map(|(_, e)| match e {
            AgentEvent::Paused {
                failures, pause, ..
            } => Some((*failures, *pause)),
            _ => None,
        })
        .collect();
    assert_eq!(pauses.len(), 2, "{events:?}");
    assert_eq!(pauses[0].0, 1);
    assert!(pauses[1].1 > pauses[0].1);
    assert!(
        matches!(
            events.last(),
            Some((
                _,
                AgentEvent::Locked {
                    failures: 3,
                    why: CodeChange::WrongCode
                }
            ))
        ),
        "{events:?}"
    );
    assert_eq!(host.code(), None, "no code while locked");
    // The user asks for a new code: one appears at once.
    requester.request();
    match within(host.next()).await.unwrap() {
        AgentEvent::Code { why, .. } => assert_eq!(why, CodeChange::Requested),
        other => panic!("{other:?}"),
    }
    relay.close();
}

/// The relay tells the agent "Alice of ACME IT" while the console authenticated as someone else:
/// the names are part of the PAKE identities, so the handshake fails even with the right code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_tells_the_two_sides_different_names_gets_no_session() {
    tandem_tests::init_logs();
    let story = Story {
        to_console: ("mallory".into(), "Evil Relay Ltd".into()),
        to_agent: ("Alice".into(), "ACME IT".into()),
    };
    let relay = FakeRelay::start_with(Mode::Forward(Tamper::default()), story).await;
    let mut host = within(AgentHost::connect(relay.opts(), quick_limit()))
        .await
        .unwrap();
    let code = first_code(&mut host).await;
    let (opts, c) = (relay.opts(), code.clone());
    let console = tokio::spawn(async move {
        tandem_session::join(
            &opts,
            &Secret::new("tnd_1_any"),
            &c,
            &SessionConfig::default(),
        )
        .await
    });
    let agent_event = loop {
        match within(host.next()).await.unwrap() {
            AgentEvent::Joining { technician, .. } => assert_eq!(technician, "Alice"),
            other => break other,
        }
    };
    let console = within(console).await.unwrap();
    assert!(
        matches!(console, Err(SessionError::WrongCode)),
        "{console:?}"
    );
    match agent_event {
        AgentEvent::Paused { why, failures, .. } => {
            assert_eq!(why, CodeChange::WrongCode);
            assert_eq!(failures, 1);
        }
        other => {
            panic!("the agent accepted a session under a name the console does not hold: {other:?}")
        }
    }
    relay.close();
}

/// A handshake dropped halfway (the application's `select!` took another branch) leaves the code
/// burned and the attempt counted: the relay cannot pair again with the same secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_handshake_burns_the_code() {
    tandem_tests::init_logs();
    let relay = FakeRelay::start(Mode::Forward(Tamper::default())).await;
    let mut host = within(AgentHost::connect(relay.opts(), quick_limit()))
        .await
        .unwrap();
    let code = first_code(&mut host).await;
    // The relay pairs a "console" that never starts the inner handshake.
    let mut link = within(tandem_client::RelayLink::connect(&relay.opts()))
        .await
        .unwrap();
    within(link.authenticate(&Secret::new("tnd_1_any")))
        .await
        .unwrap();
    within(link.join(code.slot())).await.unwrap();
    assert!(matches!(
        within(host.next()).await.unwrap(),
        AgentEvent::Joining { .. }
    ));
    // The handshake starts and is dropped.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), host.next())
            .await
            .is_err()
    );
    assert_eq!(host.code(), None, "the interrupted code is burned");
    assert_eq!(host.failures(), 1, "and the attempt counted");
    // A pause (unless it passed already), then a new code on a new slot.
    loop {
        match within(host.next()).await.unwrap() {
            AgentEvent::Paused { failures: 1, .. } => continue,
            AgentEvent::Code { code: new, why, .. } => {
                assert_ne!(new.slot(), code.slot());
                assert!(matches!(why, CodeChange::SetupFailed(_)), "{why:?}");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    relay.close();
}

/// A hostile agent cannot make the console hold more than a few frames: frames are read only with
/// a permit, each at most `MAX_VIDEO_FRAME`; a larger one is refused and the stream goes on. And
/// the agent takes no video from a console.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_video_is_bounded_and_only_the_console_takes_video() {
    let relay = FakeRelay::start(Mode::Forward(Tamper::default())).await;
    let (console, agent, _) = attempt(&relay).await;
    let console = console.unwrap();
    let agent = session(agent);
    // Raw frame streams, as a hostile agent would open them: kind 1 (video), sequence, payload.
    async fn raw_frame(conn: &quinn::Connection, seq: u64, len: usize) -> quinn::SendStream {
        let mut s = conn.open_uni().await.unwrap();
        // The console may stop the stream part way (too large, or already overtaken).
        let mut frame = vec![1u8];
        frame.extend_from_slice(&seq.to_be_bytes());
        frame.resize(9 + len, 0x5a);
        if s.write_all(&frame).await.is_ok() {
            let _ = s.finish();
        }
        s
    }
    // One frame over the limit: refused, nothing delivered; the next normal frame is delivered.
    let big = raw_frame(
        agent.connection(),
        1,
        tandem_session::session::MAX_VIDEO_FRAME + 1,
    )
    .await;
    assert!(within(big.stopped()).await.is_ok());
    agent.video_sender().send(2, b"small frame").await.unwrap();
    assert_eq!(within(console.recv_video()).await.unwrap().seq, 2);
    // Twenty 3 MiB frames (60 MiB), one after the other, while nobody takes frames off the
    // console: a few are read and held, then the sender is held back by flow control.
    const FRAME: usize = 3 * 1024 * 1024;
    let flood = {
        let conn = agent.connection().clone();
        tokio::spawn(async move {
            for seq in 3..23 {
                raw_frame(&conn, seq, FRAME).await;
            }
        })
    };
    // For 3 s, what the console holds never passes the bound (before, every frame was read into
    // memory and waited there: 60 MiB), and the flood did reach it.
    let bound = tandem_session::session::MAX_VIDEO_HELD;
    let mut most = 0;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        most = most.max(console.video_bytes_held());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("the console held at most {most} bytes of video without a reader");
    assert!(most > 0, "no frame arrived at all");
    assert!(most <= bound, "{most} bytes of video held (bound {bound})");
    flood.abort();
    // A console sending video to the agent: refused, never delivered.
    let s = raw_frame(console.connection(), 1, 1000).await;
    let _ = within(s.stopped()).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), agent.recv_video())
            .await
            .is_err(),
        "the agent took video from the console"
    );
    relay.close();
}
