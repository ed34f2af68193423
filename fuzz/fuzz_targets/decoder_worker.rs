//! The sandboxed decoder process's input path (tandem-sandbox): the bytes as the request stream
//! on its socket, through the framing and the decoder, as the process serves them; then what it
//! answered, and the same bytes as answers of a hostile decoder process, through the console's
//! checks. Any bytes: answers or errors, never a panic; the process's own answers always parse.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::io::{self, Read, Write};
use tandem_media::{DecodedFrame, I420, VideoDecoder};
use tandem_sandbox::protocol::{self, Answer, AnswerLimits};
use tandem_sandbox::shm::MemSink;

/// Picture memory of the fuzzed process: 4 MiB, a little more than 1080p needs.
const CAPACITY: u64 = 4 << 20;

struct Duplex<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for Duplex<'_> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.input.read(b)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.output.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = AnswerLimits {
        max_pixels: CAPACITY * 2 / 3,
        capacity: CAPACITY,
    };
    // A fresh decoder per input: a stateful finding reproduces from its one input.
    if let Ok(mut dec) = VideoDecoder::new() {
        dec.max_pixels = limits.max_pixels;
        let mut io = Duplex {
            input: data,
            output: Vec::new(),
        };
        let mut sink = MemSink {
            capacity: CAPACITY,
            bytes: Vec::new(),
        };
        let _ = tandem_sandbox::worker::serve(&mut dec, &mut io, &mut sink);
        let mut r = &io.output[..];
        let mut last = None;
        while !r.is_empty() {
            match protocol::read_answer(&mut r, &limits) {
                Ok(Answer::Frame { width, height }) => last = Some((width, height)),
                Ok(_) => {}
                Err(e) => panic!("the decoder process's own answer does not parse: {e}"),
            }
        }
        if let Some((w, h)) = last {
            let (y, c) = ((w * h) as usize, (w.div_ceil(2) * h.div_ceil(2)) as usize);
            let b = &sink.bytes;
            assert_eq!(b.len(), y + 2 * c);
            let pic = I420 {
                width: w,
                height: h,
                y: b[..y].to_vec(),
                u: b[y..y + c].to_vec(),
                v: b[y + c..].to_vec(),
            };
            DecodedFrame::from_i420(&pic, false).expect("a decoded picture converts");
        }
    }
    // A hostile decoder process answering these bytes: checked, never trusted.
    let mut r = data;
    while let Ok(a) = protocol::read_answer(&mut r, &limits) {
        if let Answer::Frame { width, height } = a {
            assert!(width as u64 * height as u64 <= limits.max_pixels);
            assert!(protocol::i420_len(width, height) <= limits.capacity);
        }
    }
});
