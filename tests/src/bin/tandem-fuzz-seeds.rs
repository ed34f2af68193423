//! Writes seed inputs for the fuzz targets into `fuzz/corpus/<target>/` (real messages, codes and an
//! H.264 stream), so that fuzzing starts from valid inputs.
//!
//!     cargo run -p tandem-tests --bin tandem-fuzz-seeds
#![allow(clippy::unwrap_used)]

use std::path::Path;
use tandem_input::{Combo, InputEvent, MouseButton, Pos};
use tandem_proto::*;
use tandem_session::ControlMsg;
use tandem_session::pake::PakeMsg;

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let slot = Slot::new("417").unwrap();
    let client = [
        ClientMsg::Register {
            client: ClientInfo {
                software: "tandem-agent 0.1".into(),
            },
        },
        ClientMsg::Authenticate {
            token: Secret::new("tnd_1_00"),
            client: ClientInfo::default(),
        },
        ClientMsg::Join { slot: slot.clone() },
        ClientMsg::Ping { nonce: 7 },
        ClientMsg::Time { nonce: 8 },
        ClientMsg::End {
            reason: EndReason::Other("bye".into()),
        },
        ClientMsg::Resume {
            token: ResumeToken([3; 16]),
        },
    ];
    for (i, m) in client.iter().enumerate() {
        put(
            "relay_control",
            &format!("client-{i}"),
            &encode_frame(m, MAX_CONTROL_FRAME).unwrap(),
        );
    }
    let relay = [
        RelayMsg::Registered {
            slot: slot.clone(),
            expires_in_secs: 600,
        },
        RelayMsg::Paired {
            technician: "alice".into(),
            organisation: "ACME".into(),
            resume: ResumeToken([1; 16]),
        },
        RelayMsg::Refused {
            code: ErrorCode::SlotBusy,
            message: "busy".into(),
        },
        RelayMsg::SessionEnded {
            reason: EndReason::WrongCode,
        },
    ];
    for (i, m) in relay.iter().enumerate() {
        put(
            "relay_control",
            &format!("relay-{i}"),
            &encode_frame(m, MAX_CONTROL_FRAME).unwrap(),
        );
    }
    let ctl = [
        ControlMsg::Hello {
            version: 1,
            software: "x".into(),
            capabilities: vec!["video/h264".into()],
        },
        ControlMsg::KeyframeRequest,
        ControlMsg::Stats {
            rtt_us: 1,
            fps: 30,
            kbps: 100,
            pipeline_us: 20_000,
            transport: tandem_client::tandem_net::Transport::Tcp,
        },
        ControlMsg::Cursor {
            x: 10,
            y: 20,
            visible: true,
            screen_w: 1920,
            screen_h: 1080,
        },
        ControlMsg::CursorShape {
            width: 2,
            height: 2,
            hot_x: 1,
            hot_y: 0,
            scale: 1,
            rgba: vec![255; 16],
        },
        ControlMsg::Monitors {
            monitors: vec![tandem_session::MonitorInfo {
                name: "screen".into(),
                width: 1920,
                height: 1080,
                primary: true,
            }],
            current: 0,
        },
        ControlMsg::SelectMonitor { index: 0 },
        ControlMsg::End {
            reason: EndReason::EndedByUser,
        },
    ];
    for (i, m) in ctl.iter().enumerate() {
        put(
            "session_messages",
            &format!("control-{i}"),
            &postcard::to_stdvec(m).unwrap(),
        );
    }
    put(
        "session_messages",
        "pake-start",
        &postcard::to_stdvec(&PakeMsg::Start {
            version: 1,
            pake_a: vec![9; 33],
        })
        .unwrap(),
    );
    let events = [
        InputEvent::Button {
            button: MouseButton::Left,
            pressed: true,
            at: Pos { x: 100, y: 200 },
        },
        InputEvent::Wheel {
            dx: 0.5,
            dy: -1.0,
            at: Pos { x: 1, y: 2 },
        },
        InputEvent::Key {
            usage: 0x04,
            pressed: true,
        },
        InputEvent::Text {
            text: "héllo €".into(),
        },
        InputEvent::Combo {
            combo: Combo::CtrlAltDel,
        },
    ];
    for (i, e) in events.iter().enumerate() {
        put("session_messages", &format!("input-{i}"), &e.encode());
    }
    put(
        "session_messages",
        "pointer",
        &tandem_input::event::encode_pointer(Pos { x: 1000, y: 2000 }),
    );
    for (i, t) in [
        "417-382-905",
        "code: 4173 829 051, thanks",
        "12-34",
        "١٢٣-456-789",
    ]
    .iter()
    .enumerate()
    {
        put("code_parser", &format!("code-{i}"), t.as_bytes());
    }
    // A small real H.264 stream: a keyframe and a P-frame of a 64x48 picture.
    let mut f = tandem_media::Frame::new(64, 48);
    for (i, b) in f.data.iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    let mut yuv = tandem_media::I420::default();
    tandem_media::bgrx_to_i420(&f, &mut yuv).unwrap();
    let mut enc = tandem_media::VideoEncoder::new(tandem_media::Target::default()).unwrap();
    let key = enc.encode_at(&yuv, 0).unwrap().unwrap();
    put("video_decoder", "keyframe", &key.data);
    f.data[100] ^= 0xff;
    tandem_media::bgrx_to_i420(&f, &mut yuv).unwrap();
    let p = enc.encode_at(&yuv, 33).unwrap();
    if let Some(p) = &p {
        put("video_decoder", "pframe", &p.data);
    }
    // The decoder process's socket: requests carrying a keyframe, a P-frame and garbage, and (as
    // what a hostile decoder process might answer) each answer kind.
    let mut stream = vec![];
    tandem_sandbox::protocol::write_request(&mut stream, &key.data).unwrap();
    if let Some(p) = &p {
        tandem_sandbox::protocol::write_request(&mut stream, &p.data).unwrap();
    }
    put("decoder_worker", "key-then-p", &stream);
    tandem_sandbox::protocol::write_request(&mut stream, b"\0\0\0\x01\x65garbage").unwrap();
    put("decoder_worker", "key-p-garbage", &stream);
    let mut answers = vec![];
    for a in [
        tandem_sandbox::protocol::Answer::Nothing,
        tandem_sandbox::protocol::Answer::Frame {
            width: 64,
            height: 48,
        },
        tandem_sandbox::protocol::Answer::Corrupt("bad slice".into()),
    ] {
        tandem_sandbox::protocol::write_answer(&mut answers, &a).unwrap();
    }
    put("decoder_worker", "answers", &answers);
    println!("seeds written to fuzz/corpus/");
}
