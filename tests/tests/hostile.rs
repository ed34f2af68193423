//! The relay is not trusted. A relay that sits in the middle of the inner connection, or that flips,
//! replays, reorders and drops payloads, or that records everything it forwards, gets no session
//! data and cannot alter any.
#![allow(clippy::unwrap_used)]

use std::time::Duration;
use tandem_proto::{EndReason, Secret};
use tandem_session::pake::PakeMsg;
use tandem_session::{
    AgentEvent, AgentHost, CodeChange, ControlMsg, InputItem, Session, SessionCode, SessionConfig,
    SessionError,
};
use tandem_tests::fake_relay::{FakeRelay, Mode, Tamper};

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
    match agent {
        AgentEvent::Code { why, code: new, .. } => {
            assert_eq!(why, CodeChange::WrongCode);
            assert_ne!(new.slot(), code.slot(), "the code was burned");
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
    console.end(EndReason::EndedByTechnician).await;
    let seen = relay.seen.lock().unwrap();
    assert!(seen.bytes.len() > 200_000, "the relay saw the traffic");
    let hay = &seen.bytes;
    let find = |needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    assert!(!find(PIXELS), "pixels visible to the relay");
    assert!(!find(TYPED), "typed text visible to the relay");
    assert!(
        !find(code.grouped().as_bytes()),
        "the code visible to the relay"
    );
    assert!(!find(
        format!("{}{}", code.slot(), code.secret().digits()).as_bytes()
    ));
    relay.close();
}
