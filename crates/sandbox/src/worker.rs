//! The decoder process: locks itself down ([`crate::lockdown`]), says it is ready, then decodes
//! one frame per request until the console closes the socket. It keeps nothing but the decoder's
//! state; a crash here costs the console one restart and a keyframe.

use crate::lockdown;
use crate::protocol::{self, Answer, ProtocolError};
use crate::shm::{FdSink, PictureSink};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::process::ExitCode;
use tandem_media::{I420, VideoDecoder};

/// Flag for tests: lock down, then try what an attacker would try and report on stderr.
pub const PROBE_ARG: &str = "--probe";

/// Serves requests from `io` until it ends: decodes each frame into `sink` and answers.
/// Returns `Ok` when the console closed the channel between requests.
pub fn serve(
    dec: &mut VideoDecoder,
    io: &mut (impl Read + Write),
    sink: &mut impl PictureSink,
) -> Result<(), ProtocolError> {
    let mut frame = Vec::new();
    let mut pic = I420::default();
    while protocol::read_request(io, &mut frame)? {
        let answer = match dec.decode_i420(&frame, &mut pic) {
            Ok(true) => {
                if protocol::i420_len(pic.width, pic.height) > sink.capacity() {
                    Answer::Corrupt(format!(
                        "picture {}x{} larger than the picture memory",
                        pic.width, pic.height
                    ))
                } else {
                    sink.put(&pic)?;
                    Answer::Frame {
                        width: pic.width,
                        height: pic.height,
                    }
                }
            }
            Ok(false) => Answer::Nothing,
            Err(e) => Answer::Corrupt(e.to_string()),
        };
        protocol::write_answer(io, &answer)?;
    }
    Ok(())
}

/// The channel: standard input (fd 0), a socket, read and written with plain `read`/`write`
/// (no buffering: `Stdin`'s buffer would sit between requests).
struct Channel(io::Stdin);

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match rustix::io::read(&self.0, &mut *buf) {
                Err(rustix::io::Errno::INTR) => continue,
                r => return r.map_err(Into::into),
            }
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match rustix::io::write(&self.0, buf) {
                Err(rustix::io::Errno::INTR) => continue,
                r => return r.map_err(Into::into),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A log line to the console (fd 2, which it reads and logs).
fn log(line: &str) {
    let mut e = io::stderr().lock();
    let _ = writeln!(e, "{line}");
}

/// The decoder process's `main`: `args` are those after [`crate::WORKER_ARG`].
pub fn main(args: &[OsString]) -> ExitCode {
    let probe = args.iter().any(|a| a == PROBE_ARG);
    match run(probe) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log(&format!("decoder process: {e}"));
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum WorkerError {
    #[error("{0}")]
    Lockdown(#[from] lockdown::LockdownError),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("cannot start the decoder: {0}")]
    Decoder(#[from] tandem_media::DecodeError),
    #[error("the picture memory: {0}")]
    Picture(io::Error),
    #[error("cannot close inherited descriptors: {0}")]
    Fds(io::Error),
}

/// Closes every descriptor above 2: the console passes only 0-2, but whatever started the console
/// may have left descriptors open without close-on-exec (a build tool's jobserver pipes, a
/// desktop's sockets), and they would live on here.
#[allow(unsafe_code)]
fn close_inherited() -> Result<(), WorkerError> {
    // SAFETY: called first thing in the decoder process's `main`, on its only thread. Nothing in
    // this process owns a descriptor above 2 (the Rust runtime and libc keep none open, and no
    // `OwnedFd`/`File` was made yet), so no live object's descriptor is closed under it. The
    // system call takes three integers and touches no memory.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r != 0 {
        return Err(WorkerError::Fds(io::Error::last_os_error()));
    }
    Ok(())
}

fn run(probe: bool) -> Result<(), WorkerError> {
    close_inherited()?;
    if probe {
        return run_probe();
    }
    // Everything that needs more than the decode loop happens before the lockdown: the decoder
    // is created, the picture memory measured. Standard input is the channel (fd 0), standard
    // output the picture memory (fd 1): the console set them up so.
    let capacity = rustix::fs::fstat(io::stdout())
        .map_err(|e| WorkerError::Picture(e.into()))?
        .st_size as u64;
    let mut dec = VideoDecoder::new()?;
    let locked = lockdown::lock_down()?;
    if let Some(note) = &locked.landlock_note {
        log(&format!("warning: {note}"));
    }
    let mut io = Channel(io::stdin());
    protocol::write_answer(
        &mut io,
        &Answer::Ready {
            landlock: locked.landlock,
            version: protocol::VERSION,
        },
    )?;
    let mut sink = FdSink {
        fd: io::stdout(),
        capacity,
    };
    serve(&mut dec, &mut io, &mut sink)?;
    Ok(())
}

/// Locks down like a real decoder process, then tries to escape and reports each try on
/// stderr, one `name: result` line each; ends by trying to start a program, which kills it.
fn run_probe() -> Result<(), WorkerError> {
    let report = |what: &str, r: String| log(&format!("{what}: {r}"));
    let show = |r: io::Result<()>| match r {
        Ok(()) => "ALLOWED".to_owned(),
        Err(e) => format!("refused ({e})"),
    };
    let filters = lockdown::filters(rustix::process::getpid().as_raw_nonzero().get())?;
    lockdown::limit_resources()?;
    report("no_new_privs", "set".into());
    let (landlock, note) = lockdown::landlock();
    report(
        "landlock",
        format!("{landlock:?} {}", note.unwrap_or_default()),
    );
    // Landlock alone (before seccomp): files and TCP.
    report(
        "open after landlock",
        show(std::fs::File::open("/etc/passwd").map(drop)),
    );
    report(
        "connect after landlock",
        show(std::net::TcpStream::connect(("127.0.0.1", 9)).map(drop)),
    );
    lockdown::seccomp(&filters)?;
    report("seccomp", "on".into());
    report(
        "open after seccomp",
        show(std::fs::File::open("/etc/passwd").map(drop)),
    );
    report(
        "create after seccomp",
        show(std::fs::File::create("/tmp/tandem-probe").map(drop)),
    );
    report(
        "socket after seccomp",
        show(std::net::UdpSocket::bind(("127.0.0.1", 0)).map(drop)),
    );
    // A large allocation beyond the address-space limit fails instead of succeeding.
    let mut v: Vec<u8> = Vec::new();
    report(
        "allocate 2 GiB",
        show(v.try_reserve_exact(2 << 30).map_err(io::Error::other)),
    );
    report("exec", "trying".into());
    // Kills the process (SIGSYS): clone/execve are not on the list.
    let r = std::process::Command::new("/bin/true").status();
    report("exec", format!("ALLOWED?! {r:?}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{AnswerLimits, write_request};
    use crate::shm::MemSink;

    struct Duplex {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Duplex {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Duplex {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Garbage, then nothing: answers `Corrupt` and goes on; a clean end is `Ok`.
    #[test]
    fn the_loop_answers_every_request() {
        let mut input = vec![];
        write_request(&mut input, b"\0\0\0\x01garbage").unwrap();
        write_request(&mut input, b"").unwrap();
        let mut d = Duplex {
            input: io::Cursor::new(input),
            output: vec![],
        };
        let mut dec = VideoDecoder::new().unwrap();
        let mut sink = MemSink {
            capacity: 1 << 20,
            bytes: vec![],
        };
        serve(&mut dec, &mut d, &mut sink).unwrap();
        let limits = AnswerLimits {
            max_pixels: 1 << 20,
            capacity: 1 << 20,
        };
        let mut r = &d.output[..];
        for _ in 0..2 {
            let a = protocol::read_answer(&mut r, &limits).unwrap();
            assert!(matches!(a, Answer::Nothing | Answer::Corrupt(_)), "{a:?}");
        }
        assert!(r.is_empty());
    }
}
