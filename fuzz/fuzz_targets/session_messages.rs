//! Session control, PAKE and input messages from an untrusted peer.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tandem_input::event::decode_pointer;
use tandem_input::{DisplayRect, InputEvent, InputGate, Permission};
use tandem_proto::decode_body;
use tandem_session::ControlMsg;
use tandem_session::pake::PakeMsg;

fuzz_target!(|data: &[u8]| {
    let _ = decode_body::<ControlMsg>(data);
    let _ = decode_body::<PakeMsg>(data);
    let mut gate = InputGate::new(DisplayRect { x: 0, y: 0, width: 1920, height: 1080 });
    gate.set_permission(Permission::Control);
    if let Ok(e) = InputEvent::decode(data) {
        let _ = gate.event(&e);
    }
    if let Ok(p) = decode_pointer(data) {
        let _ = gate.pointer(p);
    }
    let _ = gate.release_all();
});
