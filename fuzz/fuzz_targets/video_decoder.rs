//! The video decoder path: any bytes give a frame, nothing, or an error; never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use tandem_media::VideoDecoder;

thread_local! {
    static DEC: RefCell<Option<VideoDecoder>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    DEC.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = VideoDecoder::new().ok();
        }
        if let Some(dec) = d.as_mut() {
            let _ = dec.decode(data);
        }
    });
});
