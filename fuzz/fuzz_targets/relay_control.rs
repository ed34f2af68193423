//! Relay control messages: arbitrary bytes through the frame decoder and the message decoder, both
//! directions. Must return frames or errors, never panic, never buffer past the limit.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tandem_proto::{ClientMsg, FrameDecoder, MAX_CONTROL_FRAME, RelayMsg, decode_body};

fuzz_target!(|data: &[u8]| {
    let mut d = FrameDecoder::new(MAX_CONTROL_FRAME);
    for chunk in data.chunks(7) {
        d.push(chunk);
        loop {
            match d.next_frame() {
                Ok(Some(body)) => {
                    let _ = decode_body::<ClientMsg>(&body);
                    let _ = decode_body::<RelayMsg>(&body);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(d.buffered() <= MAX_CONTROL_FRAME + 4 + 7);
    }
    let _ = decode_body::<ClientMsg>(data);
    let _ = decode_body::<RelayMsg>(data);
});
