//! Remote input under Xvfb, observed through the X server by a recording client (not through the
//! injector): pixels, buttons, wheel, keys with modifiers, Unicode text, ordering, consent and
//! view-only enforced on the agent, and no key left pressed when the link drops.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use std::time::Duration;
use tandem_input::keymap::usage;
use tandem_input::{
    AgentInput, Combo, Injector, InputClient, InputEvent, MouseButton, Permission, Pos, X11Injector,
};
use tandem_proto::EndReason;
use tandem_relay_server::Limits;
use tandem_session::{AgentEvent, AgentHost, ControlMsg, InputItem, Session, SessionConfig};
use tandem_tests::TestRelay;
use tandem_tests::x11::{Kind, XRecorder, Xvfb};

const W: u32 = 1280;
const H: u32 = 800;
const T: Duration = Duration::from_secs(10);

fn agent_input(x: &Xvfb) -> AgentInput {
    let display = x.display.clone();
    AgentInput::start(move || {
        let i = X11Injector::open(Some(&display))?;
        Ok(Box::new(i) as Box<dyn Injector>)
    })
    .unwrap()
}

fn ev(e: &InputEvent) -> InputItem {
    InputItem::Event(Bytes::from(e.encode()))
}

fn at(x: u32, y: u32) -> Pos {
    Pos::from_pixel(x, y, W, H)
}

#[test]
fn injected_input_arrives_exactly_and_in_order() {
    let x = Xvfb::start(W, H);
    let rec = XRecorder::start(&x);
    let input = agent_input(&x);
    input.set_permission(Permission::Control);

    // Pointer positions from console views of different scales land on the intended pixel.
    for (vw, vh) in [
        (640.0f32, 400.0f32),
        (1280.0, 800.0),
        (1920.0, 1200.0),
        (1000.0, 700.0),
    ] {
        for (px, py) in [(0u32, 0u32), (200, 100), (1279, 799), (641, 333)] {
            let vx = (px as f32 + 0.5) * vw / W as f32;
            let vy = (py as f32 + 0.5) * vh / H as f32;
            let p = Pos::from_view(vx, vy, vw, vh, W, H);
            input.handle(&InputItem::Pointer(Bytes::copy_from_slice(
                &tandem_input::event::encode_pointer(p),
            )));
            let deadline = std::time::Instant::now() + T;
            loop {
                let got = rec.pointer();
                if got == (px as i16, py as i16) {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "view {vw}x{vh}: wanted {px},{py}, pointer at {got:?}"
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    // Every button, at its position.
    rec.clear();
    let buttons = [
        (MouseButton::Left, 1u8),
        (MouseButton::Middle, 2),
        (MouseButton::Right, 3),
        (MouseButton::Back, 8),
        (MouseButton::Forward, 9),
    ];
    for (i, (b, _)) in buttons.iter().enumerate() {
        let p = at(100 + i as u32 * 10, 50);
        input.handle(&ev(&InputEvent::Button {
            button: *b,
            pressed: true,
            at: p,
        }));
        input.handle(&ev(&InputEvent::Button {
            button: *b,
            pressed: false,
            at: p,
        }));
    }
    let got = rec.wait_for(10, T, |e| {
        matches!(e.kind, Kind::ButtonPress | Kind::ButtonRelease)
    });
    let seq: Vec<(Kind, u8, i16)> = got.iter().map(|e| (e.kind, e.detail, e.x)).collect();
    let want: Vec<(Kind, u8, i16)> = buttons
        .iter()
        .enumerate()
        .flat_map(|(i, (_, n))| {
            let x = 100 + i as i16 * 10;
            [(Kind::ButtonPress, *n, x), (Kind::ButtonRelease, *n, x)]
        })
        .collect();
    assert_eq!(seq, want);

    // Both wheel axes; smooth fractions accumulate into notches.
    rec.clear();
    let wheel = |dx: f32, dy: f32| {
        ev(&InputEvent::Wheel {
            dx,
            dy,
            at: at(10, 10),
        })
    };
    for w in [
        wheel(0.0, 1.0),
        wheel(0.0, -1.0),
        wheel(1.0, 0.0),
        wheel(-1.0, 0.0),
        wheel(0.0, 0.5),
        wheel(0.0, 0.5),
    ] {
        input.handle(&w);
    }
    let got = rec.wait_for(5, T, |e| e.kind == Kind::ButtonPress);
    let seq: Vec<u8> = got.iter().map(|e| e.detail).collect();
    assert_eq!(
        seq,
        vec![5, 4, 7, 6, 5],
        "down, up, right, left, one smooth notch down"
    );

    // A key combination with modifiers: the 'a' press carries Control and Shift.
    rec.clear();
    for (u, p) in [
        (usage::LEFT_CTRL, true),
        (usage::LEFT_SHIFT, true),
        (usage::A, true),
        (usage::A, false),
        (usage::LEFT_SHIFT, false),
        (usage::LEFT_CTRL, false),
    ] {
        input.handle(&ev(&InputEvent::Key {
            usage: u,
            pressed: p,
        }));
    }
    let got = rec.wait_for(6, T, |e| {
        matches!(e.kind, Kind::KeyPress | Kind::KeyRelease)
    });
    let seq: Vec<(Kind, u8)> = got.iter().map(|e| (e.kind, e.detail)).collect();
    assert_eq!(
        seq,
        vec![
            (Kind::KeyPress, 37),
            (Kind::KeyPress, 50),
            (Kind::KeyPress, 38),
            (Kind::KeyRelease, 38),
            (Kind::KeyRelease, 50),
            (Kind::KeyRelease, 37)
        ]
    );
    let a = &got[2];
    assert_eq!(
        a.state & 0x5,
        0x5,
        "Shift (1) and Control (4) held: state {:#x}",
        a.state
    );

    // A named combination.
    rec.clear();
    input.handle(&ev(&InputEvent::Combo {
        combo: Combo::AltTab,
    }));
    let got = rec.wait_for(4, T, |e| {
        matches!(e.kind, Kind::KeyPress | Kind::KeyRelease)
    });
    let seq: Vec<(Kind, u8)> = got.iter().map(|e| (e.kind, e.detail)).collect();
    assert_eq!(
        seq,
        vec![
            (Kind::KeyPress, 64),
            (Kind::KeyPress, 23),
            (Kind::KeyRelease, 23),
            (Kind::KeyRelease, 64)
        ]
    );

    // Unicode text, including characters that have no key on the (US) layout.
    rec.clear();
    input.handle(&ev(&InputEvent::Text {
        text: "aé€ü".into(),
    }));
    let got = rec.wait_for(4, T, |e| e.kind == Kind::KeyPress);
    let syms: Vec<u32> = got.iter().map(|e| e.keysym).collect();
    let want = [
        [0x61, 0x61],
        [0xe9, 0x10000e9],
        [0x20ac, 0x10020ac],
        [0xfc, 0x10000fc],
    ];
    assert_eq!(syms.len(), 4, "{syms:x?}");
    for (s, w) in syms.iter().zip(want) {
        assert!(w.contains(s), "typed keysyms {syms:x?}");
    }

    // Nothing stays pressed once the last release arrived.
    rec.wait_for(4, T, |e| e.kind == Kind::KeyRelease);
    assert!(rec.pressed_keys().is_empty(), "{:?}", rec.pressed_keys());
}

#[test]
fn view_only_and_no_consent_inject_nothing_and_switching_releases() {
    let x = Xvfb::start(W, H);
    let rec = XRecorder::start(&x);
    let input = agent_input(&x);
    let burst = |input: &AgentInput| {
        input.handle(&ev(&InputEvent::Key {
            usage: usage::Z,
            pressed: true,
        }));
        input.handle(&ev(&InputEvent::Key {
            usage: usage::Z,
            pressed: false,
        }));
        input.handle(&ev(&InputEvent::Button {
            button: MouseButton::Left,
            pressed: true,
            at: at(5, 5),
        }));
        input.handle(&ev(&InputEvent::Button {
            button: MouseButton::Left,
            pressed: false,
            at: at(5, 5),
        }));
        input.handle(&ev(&InputEvent::Text { text: "x".into() }));
    };
    // Before consent.
    burst(&input);
    input.set_permission(Permission::ViewOnly);
    burst(&input);
    // A marker sent once control is allowed: when it arrives, anything refused earlier would have too.
    input.set_permission(Permission::Control);
    input.handle(&ev(&InputEvent::Key {
        usage: usage::ESCAPE,
        pressed: true,
    }));
    input.handle(&ev(&InputEvent::Key {
        usage: usage::ESCAPE,
        pressed: false,
    }));
    rec.wait_for(2, T, |e| e.detail == 9);
    let seen: Vec<(Kind, u8)> = rec
        .keys_and_buttons()
        .iter()
        .map(|e| (e.kind, e.detail))
        .collect();
    assert_eq!(seen, vec![(Kind::KeyPress, 9), (Kind::KeyRelease, 9)]);
    assert_eq!(input.refused(), 10);

    // Holding keys and a button, then switching to view-only, releases them all on the X server.
    input.handle(&ev(&InputEvent::Key {
        usage: usage::LEFT_SHIFT,
        pressed: true,
    }));
    input.handle(&ev(&InputEvent::Key {
        usage: usage::V,
        pressed: true,
    }));
    input.handle(&ev(&InputEvent::Button {
        button: MouseButton::Left,
        pressed: true,
        at: at(9, 9),
    }));
    rec.wait_for(1, T, |e| e.kind == Kind::ButtonPress);
    let held = rec.pressed_keys();
    assert!(held.contains(&50) && held.contains(&55), "{held:?}");
    input.set_permission(Permission::ViewOnly);
    rec.wait_for(1, T, |e| e.kind == Kind::ButtonRelease);
    assert!(rec.pressed_keys().is_empty(), "{:?}", rec.pressed_keys());
    assert_eq!(rec.pressed_buttons(), 0);
}

async fn pair(relay: &TestRelay, grace: Duration) -> (Session, Session) {
    let cfg = SessionConfig {
        resume_grace: grace,
        ..SessionConfig::default()
    };
    let mut host = AgentHost::connect(relay.opts(), cfg.clone()).await.unwrap();
    let code = match host.next().await.unwrap() {
        AgentEvent::Code { code, .. } => code,
        other => panic!("{other:?}"),
    };
    let (opts, token) = (relay.opts(), relay.token.clone());
    let console =
        tokio::spawn(async move { tandem_session::join(&opts, &token, &code, &cfg).await });
    let agent = loop {
        match host.next().await.unwrap() {
            AgentEvent::Session(s) => break *s,
            AgentEvent::Joining { .. } => continue,
            other => panic!("{other:?}"),
        }
    };
    (agent, console.await.unwrap().unwrap())
}

/// Through a real relay: input before consent is not seen; after "allow" it is; when the link dies
/// with keys and a button held, the agent releases them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_session_consent_gates_input_and_a_dropped_link_leaves_nothing_pressed() {
    let relay = TestRelay::start_with(Limits {
        resume_grace: Duration::from_secs(1),
        ..Limits::default()
    })
    .await;
    let x = Xvfb::start(W, H);
    let rec = XRecorder::start(&x);
    let (agent, console) = pair(&relay, Duration::from_secs(1)).await;
    let input = std::sync::Arc::new(agent_input(&x));
    let agent = std::sync::Arc::new(agent);
    let pump = {
        let (input, agent) = (input.clone(), agent.clone());
        tokio::spawn(async move { input.run(&agent).await })
    };
    let client = InputClient::new(&console);

    // Before consent: sent, dropped by the agent's session (never queued for later).
    client
        .send(&InputEvent::Key {
            usage: usage::Z,
            pressed: true,
        })
        .await
        .unwrap();
    client
        .send(&InputEvent::Key {
            usage: usage::Z,
            pressed: false,
        })
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + T;
    while agent.input_dropped_before_consent() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "events did not reach the agent"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Dropped by the session, not queued for the moment the user answers.
    assert_eq!(input.refused(), 0);
    agent
        .send_control(&ControlMsg::Consent {
            decision: tandem_session::Consent::AllowControl,
        })
        .await
        .unwrap();
    input.set_permission(Permission::Control);
    for (u, p) in [(usage::LEFT_SHIFT, true), (usage::A, true)] {
        client
            .send(&InputEvent::Key {
                usage: u,
                pressed: p,
            })
            .await
            .unwrap();
    }
    client
        .send(&InputEvent::Button {
            button: MouseButton::Right,
            pressed: true,
            at: at(640, 400),
        })
        .await
        .unwrap();
    let got = tokio::task::spawn_blocking({
        let ev = rec.events.clone();
        move || {
            let deadline = std::time::Instant::now() + T;
            loop {
                let n = ev
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|e| e.kind == Kind::ButtonPress)
                    .count();
                if n > 0 || std::time::Instant::now() > deadline {
                    return n;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got, 1);
    let seen: Vec<u8> = rec
        .keys_and_buttons()
        .iter()
        .filter(|e| e.kind == Kind::KeyPress)
        .map(|e| e.detail)
        .collect();
    assert_eq!(
        seen,
        vec![50, 38],
        "the Z sent before consent never reached the X server"
    );
    assert!(rec.pressed_keys().contains(&50));

    // The relay dies; nobody can resume; the agent's session ends and everything is released.
    relay.shutdown().await;
    let end = tokio::time::timeout(Duration::from_secs(15), pump)
        .await
        .unwrap()
        .unwrap();
    assert_ne!(end.reason, EndReason::EndedByUser);
    let deadline = std::time::Instant::now() + T;
    while !rec.pressed_keys().is_empty() || rec.pressed_buttons() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "still pressed: {:?}",
            rec.pressed_keys()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(console);
}
