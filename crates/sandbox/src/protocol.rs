//! What the console and its decoder process say to each other over their socket. Both sides parse
//! the other's bytes as hostile: the child reads what a stranger's agent sent, and the console
//! reads what a child that may have been taken over answers.
//!
//! Request (console → child): `'D'`, the frame's length (u32 little-endian, at most
//! [`MAX_FRAME_BYTES`]), the frame.
//!
//! Answer (child → console): 12 bytes, `tag, 0, 0, 0, a: u32 LE, b: u32 LE`:
//! * `'R'` ready: locked down, `a` = landlock state (0 none, 1 partly, 2 fully), `b` = [`VERSION`];
//! * `'N'` nothing to show yet (e.g. parameter sets only);
//! * `'F'` a picture `a`×`b`, packed I420 at offset 0 of the picture memory;
//! * `'C'` corrupt data: `a` bytes of UTF-8 message follow (at most [`MAX_MESSAGE`]).

use std::io::{self, Read, Write};

/// Protocol version in the ready answer.
pub const VERSION: u32 = 1;
/// The largest compressed frame the console sends (a 1080p keyframe of noise is ≈2 MB).
pub const MAX_FRAME_BYTES: usize = 16 << 20;
/// The longest error message a child may send.
pub const MAX_MESSAGE: usize = 256;
/// Bytes of an answer's fixed part.
pub const HEADER: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("unknown message tag {0:#04x}")]
    Tag(u8),
    #[error("a frame of {0} bytes is larger than the limit")]
    TooLarge(u64),
    #[error("implausible picture size {0}x{1}")]
    Size(u32, u32),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// How much of the sandbox the child could set up: landlock may be missing from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Landlock {
    NotEnforced,
    Partly,
    Fully,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Ready { landlock: Landlock, version: u32 },
    Nothing,
    Frame { width: u32, height: u32 },
    Corrupt(String),
}

/// Bytes of a packed I420 picture (chroma rounded up).
pub fn i420_len(width: u32, height: u32) -> u64 {
    let (w, h) = (width as u64, height as u64);
    w * h + 2 * w.div_ceil(2) * h.div_ceil(2)
}

/// Sends one frame to decode.
pub fn write_request(w: &mut impl Write, frame: &[u8]) -> Result<(), ProtocolError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(ProtocolError::TooLarge(frame.len() as u64));
    }
    let mut head = [0u8; 5];
    head[0] = b'D';
    head[1..].copy_from_slice(&(frame.len() as u32).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(frame)?;
    Ok(())
}

/// Reads one request into `frame`; `Ok(false)` when the console closed the socket between
/// requests.
pub fn read_request(r: &mut impl Read, frame: &mut Vec<u8>) -> Result<bool, ProtocolError> {
    let mut tag = [0u8; 1];
    loop {
        match r.read(&mut tag) {
            Ok(0) => return Ok(false),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    if tag[0] != b'D' {
        return Err(ProtocolError::Tag(tag[0]));
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(ProtocolError::TooLarge(len as u64));
    }
    frame.clear();
    // Grows as bytes arrive: a length alone does not make the child allocate.
    let got = r.take(len as u64).read_to_end(frame)?;
    if got != len {
        return Err(ProtocolError::Io(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(true)
}

/// Sends one answer.
pub fn write_answer(w: &mut impl Write, a: &Answer) -> Result<(), ProtocolError> {
    let (tag, x, y, msg): (u8, u32, u32, &[u8]) = match a {
        Answer::Ready { landlock, version } => {
            let l = match landlock {
                Landlock::NotEnforced => 0,
                Landlock::Partly => 1,
                Landlock::Fully => 2,
            };
            (b'R', l, *version, &[])
        }
        Answer::Nothing => (b'N', 0, 0, &[]),
        Answer::Frame { width, height } => (b'F', *width, *height, &[]),
        Answer::Corrupt(m) => {
            let mut end = m.len().min(MAX_MESSAGE);
            while !m.is_char_boundary(end) {
                end -= 1;
            }
            (b'C', end as u32, 0, &m.as_bytes()[..end])
        }
    };
    let mut head = [0u8; HEADER];
    head[0] = tag;
    head[4..8].copy_from_slice(&x.to_le_bytes());
    head[8..12].copy_from_slice(&y.to_le_bytes());
    let mut buf = Vec::with_capacity(HEADER + msg.len());
    buf.extend_from_slice(&head);
    buf.extend_from_slice(msg);
    w.write_all(&buf)?;
    Ok(())
}

/// What the console accepts from a child.
#[derive(Clone, Copy, Debug)]
pub struct AnswerLimits {
    /// Largest picture in pixels.
    pub max_pixels: u64,
    /// Bytes of picture memory: a picture must fit.
    pub capacity: u64,
}

/// Reads and checks one answer.
pub fn read_answer(r: &mut impl Read, limits: &AnswerLimits) -> Result<Answer, ProtocolError> {
    let mut head = [0u8; HEADER];
    r.read_exact(&mut head)?;
    if head[1..4] != [0, 0, 0] {
        return Err(ProtocolError::Malformed("reserved bytes set"));
    }
    let x = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    let y = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    match head[0] {
        b'R' => {
            let landlock = match x {
                0 => Landlock::NotEnforced,
                1 => Landlock::Partly,
                2 => Landlock::Fully,
                _ => return Err(ProtocolError::Malformed("landlock state")),
            };
            Ok(Answer::Ready {
                landlock,
                version: y,
            })
        }
        b'N' if x == 0 && y == 0 => Ok(Answer::Nothing),
        b'N' => Err(ProtocolError::Malformed("arguments to 'nothing'")),
        b'F' => {
            if x == 0
                || y == 0
                || x as u64 * y as u64 > limits.max_pixels
                || i420_len(x, y) > limits.capacity
            {
                return Err(ProtocolError::Size(x, y));
            }
            Ok(Answer::Frame {
                width: x,
                height: y,
            })
        }
        b'C' => {
            if x as usize > MAX_MESSAGE || y != 0 {
                return Err(ProtocolError::Malformed("message length"));
            }
            let mut msg = vec![0u8; x as usize];
            r.read_exact(&mut msg)?;
            // It goes to the technician's log: no control or bidirectional-formatting characters
            // (no forged log lines, no reordered text).
            let msg = String::from_utf8_lossy(&msg)
                .chars()
                .map(|c| {
                    let hidden = c.is_control()
                        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
                    if hidden { '?' } else { c }
                })
                .collect();
            Ok(Answer::Corrupt(msg))
        }
        t => Err(ProtocolError::Tag(t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: AnswerLimits = AnswerLimits {
        max_pixels: 1920 * 1080,
        capacity: 1920 * 1080 * 3 / 2,
    };

    #[test]
    fn requests_round_trip_and_are_capped() {
        let mut buf = vec![];
        write_request(&mut buf, b"hello").unwrap();
        write_request(&mut buf, b"").unwrap();
        let mut r = &buf[..];
        let mut f = vec![];
        assert!(read_request(&mut r, &mut f).unwrap());
        assert_eq!(f, b"hello");
        assert!(read_request(&mut r, &mut f).unwrap());
        assert!(f.is_empty());
        assert!(!read_request(&mut r, &mut f).unwrap());
        // Too long a length is refused before anything is read or allocated.
        let mut big = vec![b'D'];
        big.extend_from_slice(&(MAX_FRAME_BYTES as u32 + 1).to_le_bytes());
        assert!(matches!(
            read_request(&mut &big[..], &mut f),
            Err(ProtocolError::TooLarge(_))
        ));
        // A truncated frame and an unknown tag are errors, not a clean end.
        let mut cut = vec![b'D'];
        cut.extend_from_slice(&10u32.to_le_bytes());
        cut.extend_from_slice(b"abc");
        assert!(read_request(&mut &cut[..], &mut f).is_err());
        assert!(matches!(
            read_request(&mut &b"X"[..], &mut f),
            Err(ProtocolError::Tag(b'X'))
        ));
        assert!(write_request(&mut vec![], &vec![0; MAX_FRAME_BYTES + 1]).is_err());
    }

    #[test]
    fn answers_round_trip() {
        for a in [
            Answer::Ready {
                landlock: Landlock::Fully,
                version: VERSION,
            },
            Answer::Nothing,
            Answer::Frame {
                width: 1920,
                height: 1080,
            },
            Answer::Corrupt("bad slice".into()),
        ] {
            let mut buf = vec![];
            write_answer(&mut buf, &a).unwrap();
            assert_eq!(read_answer(&mut &buf[..], &LIMITS).unwrap(), a);
        }
        // Long messages are cut at a character boundary.
        let mut buf = vec![];
        // A message cannot forge a log line.
        let mut forged = vec![];
        write_answer(
            &mut forged,
            &Answer::Corrupt("bad\nWARN re-pin the relay\r\u{202e}".into()),
        )
        .unwrap();
        let Answer::Corrupt(m) = read_answer(&mut &forged[..], &LIMITS).unwrap() else {
            panic!()
        };
        assert_eq!(m, "bad?WARN re-pin the relay??");
        write_answer(&mut buf, &Answer::Corrupt("é".repeat(200))).unwrap();
        let Answer::Corrupt(m) = read_answer(&mut &buf[..], &LIMITS).unwrap() else {
            panic!()
        };
        assert_eq!(m, "é".repeat(128));
    }

    /// A child's answer is checked against the console's limits.
    #[test]
    fn hostile_answers_are_refused() {
        let answer = |tag: u8, x: u32, y: u32| {
            let mut h = vec![tag, 0, 0, 0];
            h.extend_from_slice(&x.to_le_bytes());
            h.extend_from_slice(&y.to_le_bytes());
            h
        };
        for bad in [
            answer(b'F', 1921, 1080),
            answer(b'F', 0, 10),
            answer(b'F', u32::MAX, u32::MAX),
            answer(b'F', 1920 * 1080, 1),
            answer(b'C', MAX_MESSAGE as u32 + 1, 0),
            answer(b'C', 10, 0), // message missing
            answer(b'N', 1, 0),
            answer(b'R', 3, 1),
            answer(b'Z', 0, 0),
            vec![b'N', 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            vec![b'F', 0, 0],
        ] {
            assert!(read_answer(&mut &bad[..], &LIMITS).is_err(), "{bad:?}");
        }
        assert_eq!(i420_len(3, 3), 9 + 2 * 4);
    }
}
