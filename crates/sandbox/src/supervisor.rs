//! The console's side: starts decoder processes, talks to them, and restarts them when they die.

use crate::protocol::{self, Answer, AnswerLimits, Landlock, ProtocolError};
use crate::{WORKER_ARG, shm};
use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, Read};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tandem_media::{DecodedFrame, I420};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot start the decoder process: {0}")]
    Spawn(io::Error),
    #[error("the decoder process did not start: {0}")]
    Start(String),
    #[error("the decoder process {0}")]
    Died(String),
    #[error(
        "the remote picture crashed the video decoder {crashes} times within {secs} s; \
         the session was ended to protect this computer"
    )]
    GaveUp { crashes: usize, secs: u64 },
}

/// How to start a decoder process.
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl WorkerCommand {
    /// This executable again, with [`WORKER_ARG`] (its `main` must hand that to
    /// [`crate::worker::main`]).
    pub fn current_exe() -> io::Result<WorkerCommand> {
        // /proc/self/exe is the running binary even after an upgrade replaced the file on disk
        // (a restart then starts the same version, not whatever now sits at the path).
        let proc_exe = PathBuf::from("/proc/self/exe");
        let program = if proc_exe.exists() {
            proc_exe
        } else {
            std::env::current_exe()?
        };
        Ok(WorkerCommand {
            program,
            args: vec![WORKER_ARG.into()],
        })
    }
}

/// Limits and pauses of [`SandboxedDecoder`].
#[derive(Clone, Debug)]
pub struct RestartPolicy {
    /// This many crashes within `window` end the session.
    pub max_crashes: usize,
    pub window: Duration,
    /// Pause before the restart after the second crash in the window (the first restarts at
    /// once), doubling with each further crash up to `max_pause`.
    pub pause: Duration,
    pub max_pause: Duration,
    /// A decoder that does not answer a frame within this long is killed.
    pub frame_timeout: Duration,
    /// A decoder that is not ready within this long is killed.
    pub start_timeout: Duration,
    /// The largest picture, in pixels.
    pub max_pixels: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_crashes: 5,
            window: Duration::from_secs(60),
            pause: Duration::from_millis(250),
            max_pause: Duration::from_secs(4),
            frame_timeout: Duration::from_secs(2),
            start_timeout: Duration::from_secs(5),
            // OpenH264 decodes up to level 5.2: 36,864 macroblocks of 256 pixels (4096×2304,
            // 8192×1152, …); a child that claims more is lying.
            max_pixels: 36_864 * 256,
        }
    }
}

/// What one frame gave.
#[derive(Debug)]
pub enum Replied {
    Picture,
    Nothing,
    Corrupt(String),
}

/// The channel with one deadline for a whole exchange: each read and write may take only what is
/// left of it.
struct Deadline<'a> {
    s: &'a mut UnixStream,
    until: Instant,
}

impl<'a> Deadline<'a> {
    fn new(s: &'a mut UnixStream, within: Duration) -> Self {
        Deadline {
            s,
            until: Instant::now() + within,
        }
    }

    fn left(&self) -> io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the decoder took too long",
            ))
        } else {
            Ok(left)
        }
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.s.set_read_timeout(Some(left))?;
        self.s.read(buf)
    }
}

impl io::Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.s.set_write_timeout(Some(left))?;
        self.s.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.s.flush()
    }
}

/// One running decoder process.
pub struct WorkerProcess {
    child: Child,
    channel: UnixStream,
    shm: File,
    limits: AnswerLimits,
    landlock: Landlock,
    frame_timeout: Duration,
}

impl std::fmt::Debug for WorkerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WorkerProcess({})", self.child.id())
    }
}

impl WorkerProcess {
    /// Starts a decoder process and waits until it is locked down and ready.
    pub fn spawn(
        cmd: &WorkerCommand,
        policy: &RestartPolicy,
    ) -> Result<WorkerProcess, SandboxError> {
        let limits = AnswerLimits {
            max_pixels: policy.max_pixels,
            capacity: policy.max_pixels * 3 / 2 + (1 << 20),
        };
        let (ours, theirs) = UnixStream::pair().map_err(SandboxError::Spawn)?;
        let shm = shm::create(limits.capacity).map_err(SandboxError::Spawn)?;
        let theirs_shm = shm.try_clone().map_err(SandboxError::Spawn)?;
        // Only fds 0-2 are passed on (everything else is close-on-exec), and no environment.
        let mut child = Command::new(&cmd.program)
            .args(&cmd.args)
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::from(theirs_shm))
            .stderr(Stdio::piped())
            .spawn()
            .map_err(SandboxError::Spawn)?;
        let pid = child.id();
        if let Some(err) = child.stderr.take() {
            let spawned = std::thread::Builder::new()
                .name("decoder-log".into())
                .spawn(move || relay_log(pid, err));
            if let Err(e) = spawned {
                tracing::debug!(error = %e, "decoder log thread not started");
            }
        }
        let mut w = WorkerProcess {
            child,
            channel: ours,
            shm,
            limits,
            landlock: Landlock::NotEnforced,
            frame_timeout: policy.frame_timeout,
        };
        let ready = protocol::read_answer(
            &mut Deadline::new(&mut w.channel, policy.start_timeout),
            &w.limits,
        );
        match ready {
            Ok(Answer::Ready { landlock, version }) if version == protocol::VERSION => {
                w.landlock = landlock;
            }
            Ok(a) => {
                return Err(SandboxError::Start(format!(
                    "unexpected first answer {a:?}"
                )));
            }
            Err(e) => return Err(SandboxError::Start(w.why_dead(&e, policy.start_timeout))),
        }
        Ok(w)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How much of landlock the kernel enforced.
    pub fn landlock(&self) -> Landlock {
        self.landlock
    }

    /// Decodes one frame into `pic`. An error means this process is no good any more (it died,
    /// hung or broke the protocol) and was killed.
    pub fn decode(&mut self, data: &[u8], pic: &mut I420) -> Result<Replied, SandboxError> {
        // One deadline for the whole exchange, not per read: a child that trickles a byte at a
        // time is as dead as a silent one.
        let mut d = Deadline::new(&mut self.channel, self.frame_timeout);
        let r = protocol::write_request(&mut d, data)
            .and_then(|()| protocol::read_answer(&mut d, &self.limits));
        let answer = match r {
            Ok(a) => a,
            // Too large to send: the frame's fault, not the process's.
            Err(ProtocolError::TooLarge(n)) => {
                return Ok(Replied::Corrupt(format!("frame of {n} bytes is too large")));
            }
            Err(e) => return Err(SandboxError::Died(self.why_dead(&e, self.frame_timeout))),
        };
        match answer {
            Answer::Frame { width, height } => {
                shm::read_picture(&self.shm, width, height, pic)
                    .map_err(|e| SandboxError::Died(format!("gave no picture ({e})")))?;
                Ok(Replied::Picture)
            }
            Answer::Nothing => Ok(Replied::Nothing),
            Answer::Corrupt(m) => Ok(Replied::Corrupt(m)),
            Answer::Ready { .. } => Err(SandboxError::Died(self.why_dead(
                &ProtocolError::Malformed("'ready' in the middle of a session"),
                self.frame_timeout,
            ))),
        }
    }

    /// Kills the process (if it still runs) and says what happened to it.
    fn why_dead(&mut self, e: &ProtocolError, timeout: Duration) -> String {
        // A process that closed its end is usually exiting: give it a moment to be reaped.
        let deadline = Instant::now() + Duration::from_millis(200);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => break None,
            }
        };
        match status {
            Some(s) => match s.signal() {
                Some(libc::SIGSYS) => {
                    "was killed by its sandbox (a forbidden system call)".to_owned()
                }
                Some(sig) => format!("was killed by signal {sig}"),
                None => format!("exited with {s}"),
            },
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let timed_out = matches!(e, ProtocolError::Io(io)
                    if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut));
                if timed_out {
                    format!("did not answer within {timeout:?} and was killed")
                } else {
                    format!("broke the protocol ({e}) and was killed")
                }
            }
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Logs what a decoder process writes on stderr: escaped, lines cut at 300 bytes, at most 50
/// lines (it may be hostile).
fn relay_log(pid: u32, err: std::process::ChildStderr) {
    let mut r = io::BufReader::new(err.take(64 * 1024));
    let mut line = Vec::new();
    for _ in 0..50 {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        line.truncate(300);
        let text = String::from_utf8_lossy(&line);
        tracing::warn!(pid, "decoder process: {}", text.trim_end().escape_debug());
    }
}

/// What [`SandboxedDecoder::decode`] gave.
#[derive(Debug)]
pub enum Decoded {
    Frame(DecodedFrame),
    /// Nothing to show yet.
    Nothing,
    /// The frame was corrupt: ask for a keyframe and keep the last picture.
    Corrupt(String),
    /// The decoder process died on this frame (crash, hang, broken protocol); a new one is
    /// started. Ask for a keyframe and tell the technician the picture could not be decoded.
    Lost(String),
    /// Dropped: pausing before the next restart.
    Skipped,
}

/// H.264 decoding in a sandboxed process that is restarted when it dies.
pub struct SandboxedDecoder {
    cmd: WorkerCommand,
    policy: RestartPolicy,
    worker: Option<WorkerProcess>,
    crashes: VecDeque<Instant>,
    not_before: Option<Instant>,
    pic: I420,
    /// Also return the luma plane.
    pub keep_luma: bool,
    /// How long the last start of a decoder process took (spawn until ready).
    pub last_start: Duration,
    /// Time the last frame spent in the decoder process (request sent until answer read).
    pub last_wait: Duration,
    /// Time the last picture took to read from the picture memory and convert to RGBA.
    pub last_convert: Duration,
}

impl std::fmt::Debug for SandboxedDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SandboxedDecoder({:?})", self.worker)
    }
}

impl SandboxedDecoder {
    /// Starts the first decoder process now, so that a system where it cannot be sandboxed fails
    /// before the session shows anything.
    pub fn start(cmd: WorkerCommand, policy: RestartPolicy) -> Result<Self, SandboxError> {
        let t = Instant::now();
        let worker = WorkerProcess::spawn(&cmd, &policy)?;
        if worker.landlock() != Landlock::Fully {
            tracing::warn!(landlock = ?worker.landlock(), "the decoder process runs without full landlock (seccomp applies)");
        }
        Ok(SandboxedDecoder {
            cmd,
            policy,
            worker: Some(worker),
            crashes: VecDeque::new(),
            not_before: None,
            pic: I420::default(),
            keep_luma: false,
            last_start: t.elapsed(),
            last_wait: Duration::ZERO,
            last_convert: Duration::ZERO,
        })
    }

    /// The running decoder process, if one runs.
    pub fn pid(&self) -> Option<u32> {
        self.worker.as_ref().map(WorkerProcess::pid)
    }

    /// Decodes one frame. `Err` only when the decoder died too often: end the session then.
    pub fn decode(&mut self, data: &[u8]) -> Result<Decoded, SandboxError> {
        if self.worker.is_none() {
            if self.not_before.is_some_and(|t| Instant::now() < t) {
                return Ok(Decoded::Skipped);
            }
            if let Err(e) = self.restart() {
                return self.crashed(e.to_string());
            }
        }
        let Some(w) = self.worker.as_mut() else {
            return Ok(Decoded::Skipped);
        };
        let t = Instant::now();
        let r = w.decode(data, &mut self.pic);
        self.last_wait = t.elapsed();
        match r {
            Ok(Replied::Picture) => {
                let t = Instant::now();
                let f = DecodedFrame::from_i420(&self.pic, self.keep_luma);
                self.last_convert = t.elapsed();
                Ok(match f {
                    Ok(f) => Decoded::Frame(f),
                    Err(e) => Decoded::Corrupt(e.to_string()),
                })
            }
            Ok(Replied::Nothing) => Ok(Decoded::Nothing),
            Ok(Replied::Corrupt(m)) => Ok(Decoded::Corrupt(m)),
            Err(e) => {
                self.worker = None;
                self.crashed(e.to_string())
            }
        }
    }

    fn restart(&mut self) -> Result<(), SandboxError> {
        let t = Instant::now();
        let w = WorkerProcess::spawn(&self.cmd, &self.policy)?;
        self.last_start = t.elapsed();
        tracing::info!(
            pid = w.pid(),
            ms = self.last_start.as_secs_f64() * 1e3,
            "decoder process restarted"
        );
        self.worker = Some(w);
        self.not_before = None;
        Ok(())
    }

    /// Counts a crash: gives up after too many, else restarts now (the first in a while) or
    /// after a pause.
    fn crashed(&mut self, why: String) -> Result<Decoded, SandboxError> {
        let now = Instant::now();
        tracing::warn!("{why}");
        self.crashes.push_back(now);
        while self
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.policy.window)
        {
            self.crashes.pop_front();
        }
        let n = self.crashes.len();
        if n >= self.policy.max_crashes {
            return Err(SandboxError::GaveUp {
                crashes: n,
                secs: self.policy.window.as_secs(),
            });
        }
        let pause = pause_after(&self.policy, n);
        if pause.is_zero() {
            if let Err(e) = self.restart() {
                // Counted at the next frame, after the pause of one more crash.
                tracing::warn!(error = %e, "decoder process not restarted");
                self.not_before = Some(now + pause_after(&self.policy, n + 1));
            }
        } else {
            self.not_before = Some(now + pause);
        }
        Ok(Decoded::Lost(why))
    }
}

/// The pause before restarting after the `n`th crash within the window.
pub fn pause_after(policy: &RestartPolicy, n: usize) -> Duration {
    if n <= 1 {
        return Duration::ZERO;
    }
    let doublings = (n - 2).min(16) as u32;
    (policy.pause * 2u32.pow(doublings)).min(policy.max_pause)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_and_are_capped() {
        let p = RestartPolicy::default();
        let ms: Vec<u128> = (1..=7).map(|n| pause_after(&p, n).as_millis()).collect();
        assert_eq!(ms, [0, 250, 500, 1000, 2000, 4000, 4000]);
    }

    /// A program that is not a decoder fails to start with a reason, and a decoder that keeps
    /// failing makes the supervisor give up.
    #[test]
    fn a_decoder_that_never_starts_is_given_up_on() {
        let cmd = WorkerCommand {
            program: "/bin/false".into(),
            args: vec![],
        };
        let policy = RestartPolicy {
            pause: Duration::ZERO,
            max_crashes: 3,
            ..RestartPolicy::default()
        };
        let e = SandboxedDecoder::start(cmd.clone(), policy.clone()).unwrap_err();
        assert!(e.to_string().contains("exited"), "{e}");
        // Started by hand with a broken program: crashes are counted until it gives up.
        let mut d = SandboxedDecoder {
            cmd,
            policy,
            worker: None,
            crashes: VecDeque::new(),
            not_before: None,
            pic: I420::default(),
            keep_luma: false,
            last_start: Duration::ZERO,
            last_wait: Duration::ZERO,
            last_convert: Duration::ZERO,
        };
        let mut lost = 0;
        let gave_up = loop {
            match d.decode(b"x") {
                Ok(Decoded::Lost(_)) => lost += 1,
                Ok(Decoded::Skipped) => std::thread::sleep(Duration::from_millis(5)),
                Ok(other) => panic!("{other:?}"),
                Err(e) => break e,
            }
        };
        assert!(matches!(gave_up, SandboxError::GaveUp { crashes: 3, .. }));
        assert_eq!(lost, 2);
    }
}
