//! The console's sandboxed video decoder (tandem-sandbox) with the real console binary as the
//! decoder process: what the process can do, what it costs, and how the console survives it
//! dying, hanging or lying. (The whole console with a decoder killed mid-session is in
//! `programs.rs`.)
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tandem_media::{I420, Target, VideoDecoder, VideoEncoder, bgrx_to_i420};
use tandem_sandbox::{
    Decoded, RestartPolicy, SandboxError, SandboxedDecoder, WorkerCommand, WorkerProcess,
};
use tandem_tests::binary;

fn console_worker() -> WorkerCommand {
    WorkerCommand {
        program: binary("tandem-console"),
        args: vec![tandem_sandbox::WORKER_ARG.into()],
    }
}

/// `/proc/PID/status` as key → value.
fn status(pid: u32) -> BTreeMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// A 1080p screen-like sequence: a keyframe then `n - 1` frames with a moving block and text-like
/// stripes.
fn stream(w: u32, h: u32, n: usize) -> Vec<Vec<u8>> {
    let mut enc = VideoEncoder::new(Target {
        bitrate_bps: 8_000_000,
        max_fps: 30.0,
    })
    .unwrap();
    let mut frame = tandem_media::Frame::new(w, h);
    let mut yuv = I420::default();
    let mut out = vec![];
    for i in 0..n {
        for (j, p) in frame.data.chunks_exact_mut(4).enumerate() {
            let (x, y) = (j as u32 % w, j as u32 / w);
            let block = (x / 64 + i as u32).is_multiple_of(7) && (y / 48) % 5 == 1;
            let stripe = (y % 18 < 2) && (x / 9 + y / 18 + i as u32).is_multiple_of(3);
            let v = if block {
                30
            } else if stripe {
                20
            } else {
                235
            };
            p.copy_from_slice(&[v, (v as u32 * 7 / 8) as u8, (x % 256) as u8, 0]);
        }
        bgrx_to_i420(&frame, &mut yuv).unwrap();
        if let Some(e) = enc.encode(&yuv).unwrap() {
            out.push(e.data.to_vec());
        }
    }
    out
}

/// The decoder process runs with no_new_privs and a seccomp filter, an address-space limit, no
/// environment, and only its three descriptors.
#[test]
fn the_decoder_process_is_locked_down() {
    let w = WorkerProcess::spawn(&console_worker(), &RestartPolicy::default()).unwrap();
    let pid = w.pid();
    let s = status(pid);
    assert_eq!(s["NoNewPrivs"], "1", "{s:?}");
    assert_eq!(s["Seccomp"], "2", "{s:?}");
    assert_eq!(s["Seccomp_filters"], "2", "{s:?}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let as_line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))
        .unwrap();
    assert!(as_line.contains("1073741824"), "{as_line}");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(environ.is_empty(), "environment passed on");
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    fds.sort();
    assert_eq!(fds, ["0", "1", "2"]);
    let picture = std::fs::read_link(format!("/proc/{pid}/fd/1")).unwrap();
    assert!(
        picture
            .to_string_lossy()
            .contains("memfd:tandem-decoded-picture"),
        "{picture:?}"
    );
    // The kernel enforces landlock here (a kernel without it is logged, and seccomp still holds).
    assert_eq!(w.landlock(), tandem_sandbox::protocol::Landlock::Fully);
}

/// Locked down like a decoder, the process cannot open a file, connect, bind a socket or
/// allocate past its limit, and trying to start a program kills it.
#[test]
fn the_decoder_process_cannot_open_files_sockets_or_programs() {
    use std::os::unix::process::ExitStatusExt;
    let out = std::process::Command::new(binary("tandem-console"))
        .args([
            tandem_sandbox::WORKER_ARG,
            tandem_sandbox::worker::PROBE_ARG,
        ])
        .env_clear()
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stderr);
    let line = |k: &str| {
        report
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
            .unwrap_or_else(|| panic!("no {k:?} in {report}"))
            .to_owned()
    };
    assert!(line("landlock").starts_with("Fully"), "{report}");
    for k in [
        "open after landlock",
        "connect after landlock",
        "open after seccomp",
        "create after seccomp",
        "socket after seccomp",
        "allocate 2 GiB",
    ] {
        assert!(line(k).starts_with("refused"), "{k}: {report}");
    }
    assert!(
        line("open after seccomp").contains("os error 1"),
        "{report}"
    );
    assert!(!report.contains("ALLOWED"), "{report}");
    assert_eq!(out.status.signal(), Some(31), "killed by SIGSYS: {report}");
}

/// Decoding in the sandbox gives the same pictures as decoding in the process, and costs little
/// more at 1080p (the numbers are printed: `--nocapture`).
#[test]
fn sandboxed_decoding_matches_and_costs_little() {
    let frames = stream(1920, 1080, 40);
    let mut inproc = VideoDecoder::new().unwrap();
    let mut boxed = SandboxedDecoder::start(console_worker(), RestartPolicy::default()).unwrap();
    let (mut t_in, mut t_box, mut waits, mut converts) = (vec![], vec![], vec![], vec![]);
    for _round in 0..2 {
        for f in &frames {
            let t = Instant::now();
            let a = inproc.decode(f).unwrap();
            t_in.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let b = boxed.decode(f).unwrap();
            t_box.push(t.elapsed().as_secs_f64() * 1e3);
            waits.push(boxed.last_wait.as_secs_f64() * 1e3);
            converts.push(boxed.last_convert.as_secs_f64() * 1e3);
            match (a, b) {
                (Some(a), Decoded::Frame(b)) => {
                    assert_eq!((a.width, a.height), (b.width, b.height));
                    assert!(a.rgba == b.rgba, "sandboxed picture differs");
                }
                (None, Decoded::Nothing) => {}
                (a, b) => panic!("in process {:?}, sandboxed {b:?}", a.map(|f| f.width)),
            }
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (m_in, m_box) = (med(&mut t_in), med(&mut t_box));
    eprintln!(
        "1080p decode to RGBA, median of {}: in process {m_in:.2} ms; sandboxed {m_box:.2} ms \
         (request to answer {:.2} ms, picture read + RGBA {:.2} ms); overhead {:.2} ms; \
         decoder start {:.1} ms",
        t_in.len(),
        med(&mut waits),
        med(&mut converts),
        m_box - m_in,
        boxed.last_start.as_secs_f64() * 1e3
    );
    // Generous for a busy 2-core machine; the typical overhead is printed above.
    assert!(
        m_box < m_in + 10.0,
        "sandboxed {m_box:.2} ms vs {m_in:.2} ms"
    );
}

/// A decoder process killed mid-stream: the next frame reports the loss, a new process is
/// running at once, and the stream decodes again from the next keyframe.
#[test]
fn a_killed_decoder_is_restarted_and_decodes_from_the_next_keyframe() {
    let frames = stream(640, 360, 6);
    let mut d = SandboxedDecoder::start(console_worker(), RestartPolicy::default()).unwrap();
    for f in &frames[..3] {
        assert!(matches!(d.decode(f).unwrap(), Decoded::Frame(_)));
    }
    let old = d.pid().unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-9", &old.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    match d.decode(&frames[3]).unwrap() {
        Decoded::Lost(why) => assert!(why.contains("signal 9"), "{why}"),
        other => panic!("{other:?}"),
    }
    let restart = t.elapsed();
    let new = d.pid().expect("restarted at once");
    assert_ne!(new, old);
    assert_eq!(status(new)["Seccomp"], "2");
    eprintln!(
        "loss noticed and decoder restarted in {:.1} ms (start {:.1} ms)",
        restart.as_secs_f64() * 1e3,
        d.last_start.as_secs_f64() * 1e3
    );
    // A P-frame without its reference does not give a picture; the keyframe does.
    assert!(!matches!(d.decode(&frames[4]).unwrap(), Decoded::Frame(_)));
    assert!(matches!(d.decode(&frames[0]).unwrap(), Decoded::Frame(_)));
    assert!(matches!(d.decode(&frames[1]).unwrap(), Decoded::Frame(_)));
}

/// A stand-in decoder process written in shell: says it is ready, then does `then`.
fn fake_worker(then: &str) -> WorkerCommand {
    // Answers go to the channel, fd 0.
    let ready = r"printf 'R\000\000\000\002\000\000\000\001\000\000\000' >&0";
    WorkerCommand {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), format!("{ready}; {then}").into()],
    }
}

/// A decoder that hangs is killed after the frame timeout; one that answers with an impossible
/// picture is killed as broken; one that keeps dying ends the session with a clear error.
#[test]
fn hung_or_lying_decoders_are_killed_and_repeated_crashes_end_it() {
    let policy = RestartPolicy {
        frame_timeout: Duration::from_millis(300),
        pause: Duration::from_millis(10),
        max_pause: Duration::from_millis(20),
        max_crashes: 3,
        ..RestartPolicy::default()
    };
    let mut d = SandboxedDecoder::start(fake_worker("sleep 30"), policy.clone()).unwrap();
    let hung = d.pid().unwrap();
    let t = Instant::now();
    match d.decode(b"frame").unwrap() {
        Decoded::Lost(why) => assert!(why.contains("did not answer"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(
        !std::path::Path::new(&format!("/proc/{hung}/status")).exists()
            || status(hung)["State"].starts_with('Z'),
        "the hung process still runs"
    );
    // One that trickles its answer a byte every 200 ms (each read within the timeout, the whole
    // answer not): killed after the frame timeout too, not waited for byte by byte.
    let trickle = fake_worker(
        r"printf N >&0; for i in 1 2 3 4 5 6 7 8 9 10 11; do sleep 0.2; printf '\000' >&0; done; sleep 30",
    );
    let mut d = SandboxedDecoder::start(trickle, policy.clone()).unwrap();
    let t = Instant::now();
    match d.decode(b"frame").unwrap() {
        Decoded::Lost(why) => assert!(why.contains("did not answer"), "{why}"),
        other => panic!("a trickling decoder was waited for: {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // A 65535x65535 picture: refused, not allocated.
    let liar = fake_worker(r"printf 'F\000\000\000\377\377\000\000\377\377\000\000' >&0; sleep 30");
    let mut d = SandboxedDecoder::start(liar, policy).unwrap();
    let mut lost = vec![];
    let end = loop {
        match d.decode(b"frame") {
            Ok(Decoded::Lost(why)) => lost.push(why),
            Ok(Decoded::Skipped) => std::thread::sleep(Duration::from_millis(5)),
            Ok(other) => panic!("{other:?}"),
            Err(e) => break e,
        }
    };
    assert!(lost[0].contains("broke the protocol"), "{lost:?}");
    assert!(
        matches!(end, SandboxError::GaveUp { crashes: 3, .. }),
        "{end}"
    );
    assert!(end.to_string().contains("session was ended"));
}
