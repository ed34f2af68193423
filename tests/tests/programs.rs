//! The real programs together: `tandem-relay`, `tandem-agent` and `tandem-console` as processes,
//! talking over loopback. Each failure a technician can meet has its own message and exit code.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;
use tandem_tests::{RelayProcess, binary, count_color, relay_admin, token_from_output};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const T: Duration = Duration::from_secs(30);

struct Agent {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    /// Its own state directory (the count of failed attempts), not the user's.
    _state: tempfile::TempDir,
}

impl Agent {
    async fn start(relay: &RelayProcess, consent: &str) -> Agent {
        Self::start_on(relay, consent, None).await
    }

    async fn start_on(relay: &RelayProcess, consent: &str, display: Option<&str>) -> Agent {
        Self::start_at(&relay.addr, relay, consent, display).await
    }

    /// An agent that reaches the relay at `addr` (e.g. through an impairment proxy).
    async fn start_at(
        addr: &str,
        relay: &RelayProcess,
        consent: &str,
        display: Option<&str>,
    ) -> Agent {
        Self::start_with_state(addr, relay, consent, display, tempfile::tempdir().unwrap()).await
    }

    /// An agent that keeps its state (the count of failed attempts) in `state`.
    async fn start_with_state(
        addr: &str,
        relay: &RelayProcess,
        consent: &str,
        display: Option<&str>,
        state: tempfile::TempDir,
    ) -> Agent {
        let mut cmd = Command::new(binary("tandem-agent"));
        if let Some(d) = display {
            cmd.args(["--display", d]);
        }
        // The agent picks its desktop from the session: none here but `--display`, even when the
        // suite runs inside a Wayland desktop.
        for v in [
            "DISPLAY",
            "WAYLAND_DISPLAY",
            "XDG_SESSION_TYPE",
            "XDG_CURRENT_DESKTOP",
        ] {
            cmd.env_remove(v);
        }
        // The agent's pause after a wrong code, shortened from 30 s.
        cmd.env("TANDEM_WRONG_CODE_PAUSE", "1");
        cmd.env("TANDEM_AGENT_STATE_DIR", state.path());
        let mut child = cmd
            .args(["--relay", addr, "--relay-pin", &relay.pin.to_string()])
            .args(["--consent", consent, "--json"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Agent {
            child,
            lines,
            _state: state,
        }
    }

    /// Types a line on the agent's standard input.
    async fn type_line(&mut self, line: &str) {
        use tokio::io::AsyncWriteExt;
        let stdin = self.child.stdin.as_mut().expect("stdin piped");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    }

    /// The next JSON event of the given kind.
    async fn next(&mut self, kind: &str) -> serde_json::Value {
        tokio::time::timeout(T, async {
            loop {
                let line = self.lines.next_line().await.unwrap().expect("agent exited");
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                if v["event"] == kind {
                    return v;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {kind} event from the agent"))
    }

    async fn code(&mut self) -> String {
        self.next("code").await["code"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

/// Runs the console; returns (exit code, JSON events).
async fn console(
    relay: &RelayProcess,
    token: &str,
    code: &str,
    extra: &[&str],
) -> (i32, Vec<serde_json::Value>) {
    tokio::time::timeout(T, spawn_console(relay, token, code, extra))
        .await
        .unwrap()
        .unwrap()
}

/// A headless console (JSON events) that joins `code`, with `extra` arguments.
fn console_command(relay: &RelayProcess, token: &str, code: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(binary("tandem-console"));
    cmd.args([
        "--relay",
        &relay.addr,
        "--relay-pin",
        &relay.pin.to_string(),
    ])
    .args([
        "--token",
        token,
        "--code",
        code,
        "--headless",
        "--json",
        "--no-remember",
    ])
    .args(extra)
    .stderr(Stdio::null())
    .kill_on_drop(true);
    cmd
}

/// Starts a headless console in the background; the handle yields (exit code, JSON events).
fn spawn_console(
    relay: &RelayProcess,
    token: &str,
    code: &str,
    extra: &[&str],
) -> tokio::task::JoinHandle<(i32, Vec<serde_json::Value>)> {
    let mut cmd = console_command(relay, token, code, extra);
    tokio::spawn(async move {
        let out = cmd.output().await.unwrap();
        let events = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (out.status.code().unwrap_or(-1), events)
    })
}

fn has(events: &[serde_json::Value], kind: &str) -> bool {
    events.iter().any(|e| e["event"] == kind)
}

async fn setup() -> (tempfile::TempDir, RelayProcess, String) {
    tandem_tests::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let out = relay_admin(
        dir.path(),
        &["technician", "add", "--org", "ACME IT", "--name", "alice"],
    );
    let token = token_from_output(&out).expose().to_string();
    let relay = RelayProcess::start(dir.path()).await;
    (dir, relay, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_session_runs_and_ends_on_both_sides() {
    let (_dir, relay, token) = setup().await;
    let x = tandem_tests::x11::Xvfb::start(800, 600);
    let mut agent = Agent::start_on(&relay, "allow", Some(&x.display)).await;
    let code = agent.code().await;
    let (rc, ev) = console(&relay, &token, &code, &["--seconds", "2"]).await;
    assert_eq!(rc, 0, "{ev:?}");
    assert!(
        has(&ev, "joined") && has(&ev, "consent") && has(&ev, "stats"),
        "{ev:?}"
    );
    let consent = ev.iter().find(|e| e["event"] == "consent").unwrap();
    assert_eq!(consent["decision"], "AllowControl");
    // The console is told how the user sees it: the name the relay gave it, bound into the PAKE.
    let joined = ev.iter().find(|e| e["event"] == "joined").unwrap();
    assert_eq!(joined["shown_as"]["technician"], "alice", "{joined:?}");
    assert_eq!(joined["shown_as"]["organisation"], "ACME IT");
    // The names are shown only once the PAKE has checked them (not while joining).
    let joining = agent.next("joining").await;
    assert!(joining.get("technician").is_none(), "{joining:?}");
    let session = agent.next("session").await;
    assert_eq!(session["technician"], "alice");
    assert_eq!(session["organisation"], "ACME IT");
    assert_eq!(session["view_only"], false);
    assert_eq!(agent.next("ended").await["reason"], "ended_by_technician");
    // The agent offers a new code for the next session.
    let next = agent.code().await;
    assert_ne!(next, code);
    drop(agent.child);
    relay.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_session_streams_nothing_and_says_so() {
    let (_dir, relay, token) = setup().await;
    let x = tandem_tests::x11::Xvfb::start(640, 480);
    let mut agent = Agent::start_on(&relay, "deny", Some(&x.display)).await;
    let code = agent.code().await;
    let (rc, ev) = console(&relay, &token, &code, &["--seconds", "10"]).await;
    assert_eq!(rc, 16, "{ev:?}");
    assert!(has(&ev, "joined"), "{ev:?}");
    assert!(
        !has(&ev, "stats"),
        "no session traffic after a denial: {ev:?}"
    );
    assert!(
        !has(&ev, "first_frame"),
        "a pixel left the agent after a denial: {ev:?}"
    );
    agent.next("denied").await;
    relay.terminate().await;
}

/// An Xvfb screen of `w`×`h` with the demo scene drawn on it (kill the child when done).
fn demo_screen(w: u32, h: u32) -> (tandem_tests::x11::Xvfb, std::process::Child) {
    let x = tandem_tests::x11::Xvfb::start(w, h);
    let scene = std::process::Command::new(binary("tandem-demo-screen"))
        .arg(&x.display)
        .spawn()
        .unwrap();
    (x, scene)
}

/// A wrong code with the right slot.
fn wrong_code(code: &str) -> String {
    let (slot, secret) = code.split_once('-').unwrap();
    let last = secret.chars().last().unwrap();
    format!(
        "{slot}-{}{}",
        &secret[..secret.len() - 1],
        if last == '0' { '1' } else { '0' }
    )
}

/// Three wrong codes in a row: the agent pauses after each of the first two, then shows no code
/// at all, says why, and shows one again when the user types `n`. The console reads its token
/// from a file and the code from standard input, keeping both off its command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_wrong_codes_stop_the_codes_until_the_user_asks() {
    let (dir, relay, token) = setup().await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let mut agent = Agent::start(&relay, "allow").await;
    for attempt in 1..=3 {
        let code = agent.code().await;
        let mut cmd = Command::new(binary("tandem-console"));
        cmd.args([
            "--relay",
            &relay.addr,
            "--relay-pin",
            &relay.pin.to_string(),
        ])
        .arg("--token-file")
        .arg(&token_file)
        .args(["--code", "-", "--headless", "--json", "--no-remember"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        {
            use tokio::io::AsyncWriteExt;
            let mut stdin = child.stdin.take().unwrap();
            stdin
                .write_all(format!("{}\n", wrong_code(&code)).as_bytes())
                .await
                .unwrap();
        }
        let out = tokio::time::timeout(T, child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(10),
            "attempt {attempt}: a wrong code"
        );
        if attempt < 3 {
            let p = agent.next("paused").await;
            assert_eq!(p["failures"], attempt, "{p:?}");
        }
    }
    let locked = agent.next("locked").await;
    assert_eq!(locked["failures"], 3, "{locked:?}");
    assert!(
        locked["message"]
            .as_str()
            .unwrap()
            .contains("If you are not on the phone with your technician"),
        "{locked:?}"
    );
    // Nothing more until the user asks.
    let quiet = agent_events(&mut agent, Duration::from_secs(3)).await;
    assert!(
        !quiet.iter().any(|e| e["event"] == "code"),
        "a code appeared by itself: {quiet:?}"
    );
    // Closing and reopening the agent (or a relay that makes it exit) does not reset the count.
    let Agent {
        mut child,
        _state: state,
        ..
    } = agent;
    child.kill().await.unwrap();
    let mut agent = Agent::start_with_state(&relay.addr, &relay, "allow", None, state).await;
    let locked = agent.next("locked").await;
    assert_eq!(locked["failures"], 3, "{locked:?}");
    let quiet = agent_events(&mut agent, Duration::from_secs(2)).await;
    assert!(
        !quiet.iter().any(|e| e["event"] == "code"),
        "a restart brought a code back: {quiet:?}"
    );
    agent.type_line("n").await;
    let code = agent.code().await;
    // And it works.
    let (_, ev) = console(&relay, &token, &code, &["--seconds", "2"]).await;
    assert!(has(&ev, "joined"), "{ev:?}");
    relay.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_has_its_own_exit_code() {
    let (_dir, relay, token) = setup().await;
    let mut agent = Agent::start(&relay, "allow").await;
    let code = agent.code().await;

    // Wrong secret: 10, and the agent shows a new code.
    let (slot, secret) = code.split_once('-').unwrap();
    let last = secret.chars().last().unwrap();
    let wrong = format!(
        "{slot}-{}{}",
        &secret[..secret.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    let (rc, ev) = console(&relay, &token, &wrong, &[]).await;
    assert_eq!(rc, 10, "{ev:?}");
    let err = ev.iter().find(|e| e["event"] == "error").unwrap();
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("wrong session code"),
        "{err}"
    );
    // No code for a pause first (the agent's own guess limit), then a new one.
    let paused = agent.next("paused").await;
    assert_eq!(paused["failures"], 1, "{paused:?}");
    let new_code = agent.code().await;
    assert_ne!(new_code, code);

    // The burned code: 11.
    let (rc, _) = console(&relay, &token, &code, &[]).await;
    assert_eq!(rc, 11);
    // A code nobody holds: 12.
    let (rc, _) = console(&relay, &token, "999-999-999", &[]).await;
    assert_eq!(rc, 12);
    // A bad token: 15.
    let (rc, ev) = console(&relay, &format!("tnd_1_{}", "0".repeat(64)), &new_code, &[]).await;
    assert_eq!(rc, 15, "{ev:?}");
    // Garbage instead of a code: 2 (usage).
    let (rc, _) = console(&relay, &token, "hello", &[]).await;
    assert_eq!(rc, 2);

    // A wrong pin: 14, with the re-pin hint.
    let out = Command::new(binary("tandem-console"))
        .args([
            "--relay",
            &relay.addr,
            "--relay-pin",
            &format!("sha256:{}", "ab".repeat(32)),
        ])
        .args([
            "--token",
            &token,
            "--code",
            &new_code,
            "--json",
            "--no-remember",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(14));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tandem-relay fingerprint"));

    // No relay there: 13.
    let dead = tandem_tests::free_port();
    let out = Command::new(binary("tandem-console"))
        .args([
            "--relay",
            &format!("127.0.0.1:{dead}"),
            "--relay-pin",
            &relay.pin.to_string(),
        ])
        .args([
            "--token",
            &token,
            "--code",
            &new_code,
            "--no-remember",
            "--connect-timeout",
            "1",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(13),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    relay.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_display_control_is_refused_and_the_console_is_told() {
    let (_dir, relay, token) = setup().await;
    let mut agent = Agent::start(&relay, "allow").await;
    let code = agent.code().await;
    let (rc, ev) = console(&relay, &token, &code, &["--seconds", "1"]).await;
    assert_eq!(rc, 0, "{ev:?}");
    let p = ev
        .iter()
        .find(|e| e["event"] == "permissions")
        .expect("permissions event");
    assert_eq!(p["view_only"], true);
    assert_eq!(agent.next("session").await["view_only"], true);
    relay.terminate().await;
}

/// The console's decoded picture matches the agent's screen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sees_the_agents_screen() {
    use tandem_media::Capturer;
    let (_dir, relay, token) = setup().await;
    let (x, mut screen) = demo_screen(1024, 768);
    let mut agent = Agent::start_on(&relay, "view-only", Some(&x.display)).await;
    let code = agent.code().await;
    let png = tempfile::NamedTempFile::new().unwrap();
    let (rc, ev) = console(
        &relay,
        &token,
        &code,
        &[
            "--frames",
            "3",
            "--seconds",
            "20",
            "--png",
            png.path().to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(rc, 0, "{ev:?}");
    let first = ev
        .iter()
        .find(|e| e["event"] == "first_frame")
        .expect("a frame arrived");
    let ms = first["join_to_first_frame_ms"].as_f64().unwrap();
    assert!(ms < 5000.0, "first frame after {ms} ms");
    // Decode the console's PNG and compare it with what the X server shows.
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png.path()).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (1024, 768));
    let seen = tandem_media::rgba_to_frame(info.width, info.height, &buf[..info.buffer_size()]);
    let mut cap = tandem_media::capture::x11::X11Capturer::open(Some(&x.display)).unwrap();
    let truth = cap.capture().unwrap().frame.clone();
    let psnr = tandem_media::luma_psnr(&truth, &seen);
    assert!(
        psnr >= 35.0,
        "console picture differs from the agent's screen: {psnr:.1} dB"
    );
    let _ = screen.kill();
    let _ = screen.wait();
    relay.terminate().await;
}

/// The input script: a click and typed keys travel console → relay → agent → X server; a test
/// window draws what it gets; the console's decoded picture shows the drawing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_and_clicking_from_the_console_change_the_agents_screen() {
    let (_dir, relay, token) = setup().await;
    let x = tandem_tests::x11::Xvfb::start(800, 600);
    let rec = tandem_tests::x11::XRecorder::start_drawing(&x);
    let mut agent = Agent::start_on(&relay, "allow", Some(&x.display)).await;
    let code = agent.code().await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.txt");
    std::fs::write(
        &script,
        "# click the middle of the test window, then type\nclick left 400 300\nwait 100\n\
         key h\nkey i\ntype !\nkey Enter\nwait 1500\n",
    )
    .unwrap();
    let png = dir.path().join("seen.png");
    let (rc, ev) = console(
        &relay,
        &token,
        &code,
        &[
            "--input-script",
            script.to_str().unwrap(),
            "--seconds",
            "5",
            "--png",
            png.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(rc, 0, "{ev:?}");
    assert!(has(&ev, "script"), "{ev:?}");
    let got = rec.keys_and_buttons();
    let press = got
        .iter()
        .find(|e| e.kind == tandem_tests::x11::Kind::ButtonPress)
        .expect("the click reached the X server");
    assert_eq!((press.detail, press.x, press.y), (1, 400, 300));
    let keys = got
        .iter()
        .filter(|e| e.kind == tandem_tests::x11::Kind::KeyPress)
        .count();
    assert!(keys >= 4, "h, i, ! and Enter: {got:?}");
    // What the technician saw: the test window's drawing of the click and of the keys.
    let seen = tandem_tests::read_png(&png);
    let magenta = count_color(&seen, 0xff00ff, 40, (380, 280, 40, 40));
    assert!(
        magenta > 1000,
        "the click's block is not in the console's picture ({magenta} px)"
    );
    let green = count_color(&seen, 0x00c000, 40, (20, 20, 200, 16));
    assert!(
        green >= 3 * 200,
        "the keys' blocks are not in the console's picture ({green} px)"
    );
    relay.terminate().await;
}

/// View only: the same script changes nothing on the agent's machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_only_ignores_the_consoles_input() {
    let (_dir, relay, token) = setup().await;
    let x = tandem_tests::x11::Xvfb::start(640, 480);
    let rec = tandem_tests::x11::XRecorder::start(&x);
    let mut agent = Agent::start_on(&relay, "view-only", Some(&x.display)).await;
    let code = agent.code().await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.txt");
    std::fs::write(&script, "click left 100 100\ntype hello\ncombo alt-f4\n").unwrap();
    let (rc, ev) = console(
        &relay,
        &token,
        &code,
        &["--input-script", script.to_str().unwrap(), "--seconds", "3"],
    )
    .await;
    assert_eq!(rc, 0, "{ev:?}");
    assert!(!has(&ev, "script"), "the console does not even try: {ev:?}");
    assert!(rec.keys_and_buttons().is_empty());
    relay.terminate().await;
}

/// A console with a window on `display` (Mesa software rendering) that joins `code` and ends after
/// `seconds`; JSON events on its stdout.
fn console_window(
    relay: &RelayProcess,
    token: &str,
    code: &str,
    seconds: &str,
    display: &str,
    cfg_dir: &std::path::Path,
) -> Command {
    let mut cmd = Command::new(binary("tandem-console"));
    cmd.args([
        "--relay",
        &relay.addr,
        "--relay-pin",
        &relay.pin.to_string(),
    ])
    .args([
        "--token",
        token,
        "--code",
        code,
        "--json",
        "--seconds",
        seconds,
    ])
    .arg("--config")
    .arg(cfg_dir.join("console.toml"))
    .env("DISPLAY", display)
    .env("LIBGL_ALWAYS_SOFTWARE", "1")
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .kill_on_drop(true);
    cmd
}

/// The console's window under Xvfb (Mesa software rendering) shows the remote screen; the
/// screenshot is kept in target/screenshots/ (and copied to docs/ with TANDEM_UPDATE_DOCS=1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_window_shows_the_remote_screen() {
    let (_dir, relay, token) = setup().await;
    let (agent_screen, mut demo) = demo_screen(1024, 768);
    let mut agent = Agent::start_on(&relay, "allow", Some(&agent_screen.display)).await;
    let code = agent.code().await;
    let tech_screen = tandem_tests::x11::Xvfb::start(1280, 800);
    let cfg = tempfile::tempdir().unwrap();
    let mut child = console_window(
        &relay,
        &token,
        &code,
        "10",
        &tech_screen.display,
        cfg.path(),
    )
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut events = vec![];
    tokio::time::timeout(T, async {
        while let Some(l) = lines.next_line().await.unwrap() {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            let shown = v["event"] == "frame_shown";
            events.push(v);
            if shown {
                return;
            }
        }
        panic!("the console window never showed a frame: {events:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no frame_shown: {events:?}"));
    // The window knows how the user sees this technician (the name bound into the PAKE).
    let joined = events.iter().find(|e| e["event"] == "joined").unwrap();
    assert_eq!(joined["shown_as"]["technician"], "alice", "{joined:?}");
    // Let a few more frames paint, then look at the technician's screen.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&out_dir).unwrap();
    let path = out_dir.join("console-window.png");
    let shot = std::process::Command::new(binary("tandem-screenshot"))
        .arg(&tech_screen.display)
        .arg(&path)
        .status()
        .unwrap();
    assert!(shot.success());
    let shot = tandem_tests::read_png(&path);
    if std::env::var_os("TANDEM_UPDATE_DOCS").is_some() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
        std::fs::create_dir_all(&docs).unwrap();
        std::fs::copy(&path, docs.join("console-window.png")).unwrap();
    }
    // The demo desktop's teal background fills much of the window: the remote screen is drawn.
    let teal = count_color(&shot, 0x1f6f6f, 12, (0, 0, shot.width, shot.height));
    let share = teal as f64 / (shot.width * shot.height) as f64;
    assert!(
        share > 0.15,
        "remote screen not visible in the window ({:.1}% teal); see {}",
        share * 100.0,
        path.display()
    );
    // The window ends the session when its time is up and exits with 0.
    let status = tokio::time::timeout(T, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let ended = agent.next("ended").await;
    assert_eq!(ended["reason"], "ended_by_technician");
    let _ = demo.kill();
    let _ = demo.wait();
    relay.terminate().await;
}

/// The relay crashes mid-session and comes back: both sides say so, end with a reason (the new
/// relay process knows nothing of the old session, so there is nothing to resume), and the agent
/// reconnects and offers a new code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_crash_mid_session_ends_both_sides_with_a_reason() {
    let (dir, relay, token) = setup().await;
    let x = tandem_tests::x11::Xvfb::start(640, 480);
    let mut agent = Agent::start_on(&relay, "allow", Some(&x.display)).await;
    let code = agent.code().await;
    // On the relay path (a direct session would go on without the relay until the console's
    // resume is refused, and the agent would hear the end from the console before it noticed
    // its own link was gone).
    let console = spawn_console(
        &relay,
        &token,
        &code,
        &["--seconds", "60", "--path", "relay-only"],
    );
    agent.next("session").await;
    let started = std::time::Instant::now();
    let relay = relay.crash_and_restart(dir.path()).await;
    let (rc, ev) = tokio::time::timeout(T, console).await.unwrap().unwrap();
    assert_eq!(rc, 17, "{ev:?}");
    assert!(
        has(&ev, "link"),
        "the console said the link was lost: {ev:?}"
    );
    let ended = ev.iter().find(|e| e["event"] == "ended").expect("ended");
    assert!(
        ended["message"].as_str().unwrap().len() > 20,
        "a reason: {ended:?}"
    );
    agent.next("link_lost").await;
    let end = agent.next("ended").await;
    assert!(!end["reason"].as_str().unwrap().is_empty());
    // Well within the resume grace (15 s): the restarted relay refuses the unknown session at once.
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
    // The agent is back on the relay with a fresh code.
    let again = agent.next("code").await;
    assert!(again["code"].as_str().is_some());
    relay.terminate().await;
}

/// Clicks the left button at (x, y) with XTest, as a user would.
fn x_click(display: &str, x: i16, y: i16) {
    use x11rb::connection::Connection;
    use x11rb::protocol::xproto::{BUTTON_PRESS_EVENT, BUTTON_RELEASE_EVENT, MOTION_NOTIFY_EVENT};
    use x11rb::protocol::xtest::ConnectionExt as _;
    use x11rb::wrapper::ConnectionExt as _;
    let (conn, n) = x11rb::rust_connection::RustConnection::connect(Some(display)).unwrap();
    let root = conn.setup().roots[n].root;
    conn.xtest_fake_input(MOTION_NOTIFY_EVENT, 0, 0, root, x, y, 0)
        .unwrap();
    conn.sync().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    conn.xtest_fake_input(BUTTON_PRESS_EVENT, 1, 0, root, 0, 0, 0)
        .unwrap();
    conn.sync().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    conn.xtest_fake_input(BUTTON_RELEASE_EVENT, 1, 0, root, 0, 0, 0)
        .unwrap();
    conn.sync().unwrap();
}

/// A real agent with its window on `x` (Mesa's software renderer), events as JSON, the code
/// printed too (a windowed agent keeps it off stdout unless asked).
fn windowed_agent(relay: &RelayProcess, x: &tandem_tests::x11::Xvfb, extra: &[&str]) -> Agent {
    let state = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary("tandem-agent"))
        .env("TANDEM_AGENT_STATE_DIR", state.path())
        .args([
            "--relay",
            &relay.addr,
            "--relay-pin",
            &relay.pin.to_string(),
        ])
        .args(["--json", "--print-code"])
        .args(extra)
        .env("DISPLAY", &x.display)
        .env("LIBGL_ALWAYS_SOFTWARE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    Agent {
        child,
        lines,
        _state: state,
    }
}

/// The agent's window: it shows the code, asks for consent when the technician joins, the user's
/// click on "Allow control" starts the session, the view-only switch takes control away, and End
/// ends the session with the console told why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_window_consent_view_only_and_end() {
    let (_dir, relay, token) = setup().await;
    let x = tandem_tests::x11::Xvfb::start(1024, 768);
    let mut agent = windowed_agent(&relay, &x, &["--once"]);
    let code = agent.code().await;
    let console = spawn_console(&relay, &token, &code, &["--seconds", "25"]);
    let asked = agent.next("consent_asked").await;
    assert_eq!(asked["technician"], "alice");
    // Let the prompt paint, keep a screenshot of it, then answer with the mouse. The window sits
    // at the top-left corner (no window manager on Xvfb); the screenshots show where things are.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let shot = |name: &str| {
        let _ = std::process::Command::new(binary("tandem-screenshot"))
            .arg(&x.display)
            .arg(shots.join(name))
            .status();
    };
    shot("agent-consent.png");
    let click = |px: i16, py: i16| {
        let display = x.display.clone();
        tokio::task::spawn_blocking(move || x_click(&display, px, py))
    };
    click(54, 110).await.unwrap(); // "Allow control"
    let session = agent.next("session").await;
    assert_eq!(session["view_only"], false, "{session:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    shot("agent-in-session.png");
    click(15, 58).await.unwrap(); // "View only"
    let p = agent.next("permissions").await;
    assert_eq!(p["view_only"], true, "{p:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    click(62, 93).await.unwrap(); // "End session"
    let ended = agent.next("ended").await;
    assert_eq!(ended["reason"], "ended_by_user");
    let (rc, ev) = tokio::time::timeout(T, console).await.unwrap().unwrap();
    assert_eq!(rc, 17, "ended by the other side: {ev:?}");
    let consent = ev
        .iter()
        .find(|e| e["event"] == "consent")
        .expect("consent");
    assert_eq!(consent["decision"], "AllowControl");
    assert!(has(&ev, "first_frame"), "{ev:?}");
    let perm = ev
        .iter()
        .find(|e| e["event"] == "permissions")
        .expect("told of view only");
    assert_eq!(perm["view_only"], true);
    let end = ev.iter().find(|e| e["event"] == "ended").expect("ended");
    assert_eq!(end["reason"], "ended_by_user", "{end:?}");
    relay.terminate().await;
}

/// The console window reports a failed login like the headless mode: the message, and the exit
/// code when it was started for a script (`--seconds`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_window_reports_a_refused_token() {
    let (_dir, relay, _token) = setup().await;
    let mut agent = Agent::start(&relay, "allow").await;
    let code = agent.code().await;
    let screen = tandem_tests::x11::Xvfb::start(1024, 768);
    let cfg = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        T,
        Command::new(binary("tandem-console"))
            .args([
                "--relay",
                &relay.addr,
                "--relay-pin",
                &relay.pin.to_string(),
            ])
            .args([
                "--token",
                "tnd_1_0000000000000000000000000000000000000000000000000000000000000000",
            ])
            .args(["--code", &code, "--json", "--seconds", "20"])
            .arg("--config")
            .arg(cfg.path().join("console.toml"))
            .env("DISPLAY", &screen.display)
            .env("LIBGL_ALWAYS_SOFTWARE", "1")
            .stderr(Stdio::null())
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(out.status.code(), Some(15), "{events:?}");
    let e = events
        .iter()
        .find(|e| e["event"] == "error")
        .expect("error event");
    assert!(e["message"].as_str().unwrap().contains("token"), "{e:?}");
    assert!(
        !cfg.path().join("console.toml").exists(),
        "a refused login is not remembered"
    );
    relay.terminate().await;
}

fn stat_values(ev: &[serde_json::Value], key: &str) -> Vec<f64> {
    ev.iter()
        .filter(|e| e["event"] == "stats")
        .filter_map(|e| e[key].as_f64())
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Collects the agent's JSON events for a while.
async fn agent_events(agent: &mut Agent, for_: Duration) -> Vec<serde_json::Value> {
    let mut out = vec![];
    let _ = tokio::time::timeout(for_, async {
        while let Ok(Some(l)) = agent.lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                out.push(v);
            }
        }
    })
    .await;
    out
}

/// 100 ms RTT and 5 % loss each way on the agent's path: the session keeps streaming with bounded
/// latency, every key the technician types arrives once and nothing stays pressed, and the
/// encoder's target drops with the path instead of queueing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_slow_path_keeps_streaming_and_loses_no_input() {
    use tandem_tests::impair::{ImpairProxy, Impairment};
    let (_dir, relay, token) = setup().await;
    let imp = Impairment::rtt_loss(Duration::from_millis(100), 0.05);
    let proxy = ImpairProxy::start(relay.addr.parse().unwrap(), imp, imp).await;
    let x = tandem_tests::x11::Xvfb::start(1024, 768);
    let rec = tandem_tests::x11::XRecorder::start_drawing(&x);
    let mut agent =
        Agent::start_at(&proxy.addr.to_string(), &relay, "allow", Some(&x.display)).await;
    let code = agent.code().await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.txt");
    // 30 keys, one every 150 ms, each drawing a block on the agent's screen; the pointer wanders.
    let mut text = String::new();
    for i in 0..30 {
        text.push_str(&format!(
            "move {} {}\nkey {}\nwait 150\n",
            100 + i * 20,
            300,
            ["a", "s", "d"][i % 3]
        ));
    }
    std::fs::write(&script, text).unwrap();
    let (rc, ev) = console(
        &relay,
        &token,
        &code,
        &[
            "--input-script",
            script.to_str().unwrap(),
            "--seconds",
            "12",
            // The impairment is on the relay path: the session stays on it.
            "--path",
            "relay-only",
        ],
    )
    .await;
    assert_eq!(rc, 0, "{ev:?}");
    let presses = rec
        .keys_and_buttons()
        .iter()
        .filter(|e| e.kind == tandem_tests::x11::Kind::KeyPress)
        .count();
    assert_eq!(presses, 30, "every key arrives exactly once");
    assert!(rec.pressed_keys().is_empty(), "nothing stays pressed");
    let frames = stat_values(&ev, "frames");
    assert!(
        frames.last().copied().unwrap_or(0.0) >= 10.0,
        "frames kept coming: {frames:?}"
    );
    let rtt = stat_values(&ev, "rtt_ms");
    eprintln!("100 ms RTT, 5 % loss: frames {frames:?} rtt {rtt:?}");
    assert!(
        median(rtt.clone()) < 400.0,
        "control round trips stay bounded: {rtt:?}"
    );
    let aev = agent_events(&mut agent, Duration::from_secs(2)).await;
    let targets: Vec<f64> = aev
        .iter()
        .filter(|e| e["event"] == "video_target")
        .filter_map(|e| e["kbps"].as_f64())
        .collect();
    assert!(
        targets.iter().any(|&k| k < 4000.0),
        "the encoder's target follows the lossy path down from 4 Mbit/s: {targets:?}"
    );
    assert!(proxy.stats.lost.load(std::sync::atomic::Ordering::Relaxed) > 0);
    relay.terminate().await;
}

/// A 1 Mbit/s cap on the agent's uplink under full-screen changes (a new page of text every
/// 400 ms; one such frame is 110–450 KB, about a second of this path): the encoder's target falls
/// to what the path carries, frames are paced by their size so the stream stays within the cap,
/// fewer frames arrive instead of a queue forming, and control round trips stay bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_megabit_cap_lowers_quality_not_latency() {
    use tandem_tests::impair::{ImpairProxy, Impairment};
    let (_dir, relay, token) = setup().await;
    let up = Impairment {
        delay: Duration::from_millis(10),
        rate_bps: Some(1_000_000),
        ..Impairment::default()
    };
    let down = Impairment {
        delay: Duration::from_millis(10),
        ..Impairment::default()
    };
    let proxy = ImpairProxy::start(relay.addr.parse().unwrap(), up, down).await;
    let x = tandem_tests::x11::Xvfb::start(1280, 720);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let painter = {
        let (display, stop) = (x.display.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut p = tandem_tests::x11::Painter::new(&display);
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                p.page(n);
                p.sync();
                n += 3;
                std::thread::sleep(Duration::from_millis(400));
            }
        })
    };
    let mut agent = Agent::start_at(
        &proxy.addr.to_string(),
        &relay,
        "view-only",
        Some(&x.display),
    )
    .await;
    let code = agent.code().await;
    // The cap is on the relay path: the session stays on it.
    let (rc, ev) = console(
        &relay,
        &token,
        &code,
        &["--seconds", "15", "--path", "relay-only"],
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = painter.join();
    assert_eq!(rc, 0, "{ev:?}");
    let aev = agent_events(&mut agent, Duration::from_secs(2)).await;
    let targets: Vec<f64> = aev
        .iter()
        .filter(|e| e["event"] == "video_target")
        .filter_map(|e| e["kbps"].as_f64())
        .collect();
    assert!(
        targets.last().is_some_and(|&k| k <= 1000.0),
        "the encoder aims at what the capped path carries: {targets:?}"
    );
    let kbps = stat_values(&ev, "kbit_s");
    // A frame's bytes count when it has arrived whole, so single intervals are lumpy; over the
    // run (intervals of about a second) the stream must fit the cap.
    let mean = kbps.iter().sum::<f64>() / kbps.len().max(1) as f64;
    assert!(mean <= 1050.0, "video within the cap: {kbps:?}");
    let rtt = stat_values(&ev, "rtt_ms");
    let late_rtt: Vec<f64> = rtt.iter().skip(rtt.len() / 2).copied().collect();
    assert!(
        median(late_rtt) < 500.0,
        "no standing queue behind the video: {rtt:?}"
    );
    let frames = stat_values(&ev, "frames");
    eprintln!("1 Mbit/s cap: frames {frames:?} kbit/s {kbps:?} rtt {rtt:?} targets {targets:?}");
    assert!(
        frames.last().copied().unwrap_or(0.0) >= 4.0,
        "frames {frames:?} kbit/s {kbps:?} rtt {rtt:?} targets {targets:?}"
    );
    relay.terminate().await;
}

/// The agent's network is cut for 10 s and restored: both sides notice, the agent reconnects, the
/// same session resumes within the relay's grace period and frames flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_cut_and_restored_resumes_the_session() {
    use tandem_tests::impair::{ImpairProxy, Impairment};
    let (_dir, relay, token) = setup().await;
    let proxy = ImpairProxy::start(
        relay.addr.parse().unwrap(),
        Impairment::default(),
        Impairment::default(),
    )
    .await;
    let (x, mut demo) = demo_screen(640, 480);
    let mut agent = Agent::start_at(
        &proxy.addr.to_string(),
        &relay,
        "view-only",
        Some(&x.display),
    )
    .await;
    let code = agent.code().await;
    // The cut is on the relay path: the session stays on it.
    let console = spawn_console(
        &relay,
        &token,
        &code,
        &["--seconds", "28", "--path", "relay-only"],
    );
    agent.next("session").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.cut(true);
    agent.next("link_lost").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.cut(false);
    agent.next("link_resumed").await;
    let (rc, ev) = tokio::time::timeout(Duration::from_secs(60), console)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rc, 0, "the session survived: {ev:?}");
    let links: Vec<&str> = ev
        .iter()
        .filter(|e| e["event"] == "link")
        .filter_map(|e| e["message"].as_str())
        .collect();
    assert!(links.iter().any(|m| m.contains("dropped")), "{links:?}");
    assert!(links.iter().any(|m| m.contains("back")), "{links:?}");
    // Frames after the resume: the uptime line changes every second.
    let back = ev
        .iter()
        .position(|e| {
            e["event"] == "link" && e["message"].as_str().is_some_and(|m| m.contains("back"))
        })
        .unwrap();
    let before = stat_values(&ev[..back], "frames")
        .last()
        .copied()
        .unwrap_or(0.0);
    let after = stat_values(&ev[back..], "frames")
        .last()
        .copied()
        .unwrap_or(0.0);
    assert!(
        after > before + 3.0,
        "frames flow after the resume: {before} → {after}"
    );
    let _ = demo.kill();
    let _ = demo.wait();
    relay.terminate().await;
}

/// Killing either program mid-session: the other side notices within seconds, ends with a reason
/// (after the relay's grace period for a return), and the relay's counts go back to zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_or_console_is_noticed_and_the_relay_empties() {
    let (_dir, relay, token) = setup().await;
    let x = tandem_tests::x11::Xvfb::start(640, 480);
    // The agent is killed: the console is told it dropped, then that the session ended.
    let mut agent = Agent::start_on(&relay, "view-only", Some(&x.display)).await;
    let code = agent.code().await;
    let console = spawn_console(&relay, &token, &code, &["--seconds", "60"]);
    agent.next("session").await;
    let killed = std::time::Instant::now();
    agent.child.kill().await.unwrap();
    let (rc, ev) = tokio::time::timeout(Duration::from_secs(45), console)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rc, 17, "{ev:?}");
    assert!(has(&ev, "link") && has(&ev, "ended"), "{ev:?}");
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "{:?}",
        killed.elapsed()
    );
    // The console is killed: the agent is told, ends the session and shows a new code.
    let mut agent = Agent::start_on(&relay, "view-only", Some(&x.display)).await;
    let code = agent.code().await;
    let console = spawn_console(&relay, &token, &code, &["--seconds", "60"]);
    agent.next("session").await;
    console.abort(); // kill_on_drop: the console process dies with its task
    let _ = console.await;
    agent.next("peer_suspended").await;
    let end = agent.next("ended").await;
    assert!(!end["reason"].as_str().unwrap().is_empty());
    agent.next("code").await;
    // The relay holds nothing of either session.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = tandem_tests::http_get(relay.metrics, "/metrics").await.1;
        let sessions = tandem_tests::metric(&text, "tandem_relay_sessions");
        let conns = tandem_tests::metric(&text, "tandem_relay_connections");
        // The live agent's own connection (waiting with its new code) is the only one left.
        if sessions == 0.0 && conns <= 1.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "relay still holds sessions={sessions} connections={conns}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    relay.terminate().await;
}

/// The sandboxed video decoder of a console (`pid`): its child started with `--decode-worker`.
fn decoder_process(console: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "pid (comm) state ppid …": comm may hold anything, so split after its last ')'.
        let ppid: u32 = stat
            .rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        (ppid == console
            && cmdline
                .split(|b| *b == 0)
                .any(|a| a == tandem_sandbox::WORKER_ARG.as_bytes()))
        .then_some(pid)
    })
}

/// `NoNewPrivs` and `Seccomp` of a process, from `/proc/PID/status`.
fn sandbox_status(pid: u32) -> (String, String) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    (field("NoNewPrivs:"), field("Seccomp:"))
}

/// While a console session runs, the video is decoded in a separate process with no_new_privs
/// and a seccomp filter. Killed mid-session (SIGKILL), the decoder is restarted, the console
/// says the picture could not be decoded, asks for a keyframe, and the picture comes back; the
/// session goes on and ends normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_decodes_in_a_sandboxed_process_that_survives_being_killed() {
    let (_dir, relay, token) = setup().await;
    let (x, mut screen) = demo_screen(1024, 768);
    let mut agent = Agent::start_on(&relay, "view-only", Some(&x.display)).await;
    let code = agent.code().await;
    let mut child = console_command(&relay, &token, &code, &["--seconds", "30"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let console_pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut events = vec![];
    let mut next = async |kind: &str| -> serde_json::Value {
        tokio::time::timeout(T, async {
            while let Some(l) = lines.next_line().await.unwrap() {
                let v: serde_json::Value = serde_json::from_str(&l).unwrap();
                events.push(v.clone());
                if v["event"] == kind {
                    return v;
                }
            }
            panic!("the console ended without {kind}: {events:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("no {kind} from the console"))
    };
    next("first_frame").await;
    let decoder = decoder_process(console_pid).expect("no decoder process");
    assert_eq!(
        sandbox_status(decoder),
        ("1".to_owned(), "2".to_owned()),
        "NoNewPrivs and Seccomp of the decoder process"
    );
    // The console itself is not sandboxed (it needs its files and network): only the decoder.
    assert_ne!(decoder, console_pid);
    let killed = std::process::Command::new("kill")
        .args(["-9", &decoder.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let t = std::time::Instant::now();
    let lost = next("undecodable").await;
    assert!(
        lost["reason"].as_str().unwrap().contains("signal 9"),
        "{lost}"
    );
    next("picture_back").await;
    eprintln!(
        "decoder killed -> picture back in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let again = decoder_process(console_pid).expect("no new decoder process");
    assert_ne!(again, decoder);
    assert_eq!(sandbox_status(again), ("1".to_owned(), "2".to_owned()));
    // The session goes on: more frames, then the technician ends it normally.
    let before = next("stats").await["frames"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = next("stats").await["frames"].as_u64().unwrap();
    assert!(
        after > before,
        "no frames after the restart: {before} -> {after}"
    );
    std::process::Command::new("kill")
        .args(["-INT", &console_pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(T, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(agent.next("ended").await["reason"], "ended_by_technician");
    // The decoder process ends with the console.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(decoder_process(console_pid).is_none());
    let _ = screen.kill();
    let _ = screen.wait();
    relay.terminate().await;
}

/// A remote picture larger than the GPU's texture limit is shown scaled, not an abort of the
/// window. Mesa's limit (16384) is above any picture the agent can send, so the console's test
/// knob `TANDEM_CONSOLE_MAX_TEXTURE` lowers it to 512 for a 1024x768 screen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_window_scales_a_picture_beyond_the_texture_limit() {
    let (_dir, relay, token) = setup().await;
    let (agent_screen, mut demo) = demo_screen(1024, 768);
    let mut agent = Agent::start_on(&relay, "view-only", Some(&agent_screen.display)).await;
    let code = agent.code().await;
    let tech_screen = tandem_tests::x11::Xvfb::start(1280, 800);
    let cfg = tempfile::tempdir().unwrap();
    let mut child = console_window(&relay, &token, &code, "8", &tech_screen.display, cfg.path())
        .env("TANDEM_CONSOLE_MAX_TEXTURE", "512")
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let shown = tokio::time::timeout(T, async {
        while let Some(l) = lines.next_line().await.unwrap() {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            if v["event"] == "frame_shown" {
                return v;
            }
        }
        panic!("the console window never showed a frame");
    })
    .await
    .unwrap();
    assert_eq!(
        (shown["width"].as_u64(), shown["height"].as_u64()),
        (Some(1024), Some(768))
    );
    assert_eq!(
        (shown["texture_w"].as_u64(), shown["texture_h"].as_u64()),
        (Some(512), Some(384)),
        "{shown}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&out_dir).unwrap();
    let path = out_dir.join("console-window-scaled-texture.png");
    let shot = std::process::Command::new(binary("tandem-screenshot"))
        .arg(&tech_screen.display)
        .arg(&path)
        .status()
        .unwrap();
    assert!(shot.success());
    let shot = tandem_tests::read_png(&path);
    let teal = count_color(&shot, 0x1f6f6f, 12, (0, 0, shot.width, shot.height));
    let share = teal as f64 / (shot.width * shot.height) as f64;
    assert!(
        share > 0.15,
        "scaled remote screen not visible ({:.1}% teal); see {}",
        share * 100.0,
        path.display()
    );
    let status = tokio::time::timeout(T, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let _ = agent.next("ended").await;
    let _ = demo.kill();
    let _ = demo.wait();
    relay.terminate().await;
}

/// A desktop the agent cannot share is said in words before any code is shown; a session that
/// only looks like X11 (Xwayland's `DISPLAY` inside a Wayland session) is not shared silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_desktop_is_refused_before_a_code() {
    let (_dir, relay, _token) = setup().await;
    let state = tempfile::tempdir().unwrap();
    let out = Command::new(binary("tandem-agent"))
        .env_remove("TANDEM_BACKEND")
        .env("DISPLAY", ":77")
        .env("WAYLAND_DISPLAY", "wayland-tandem-test-none")
        .env("XDG_SESSION_TYPE", "wayland")
        .env("XDG_CURRENT_DESKTOP", "NoSuchCompositor")
        .env("TANDEM_AGENT_STATE_DIR", state.path())
        .args(["--relay", &relay.addr])
        .args(["--relay-pin", &relay.pin.to_string()])
        .args(["--headless", "--json", "--consent", "deny", "--once"])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(!stdout.contains("\"code\""), "a code was shown: {stdout}");
    assert!(stderr.contains("cannot be shared"), "{stderr}");
    assert!(stderr.contains("Wayland"), "{stderr}");
}

/// The agent window's "Check connection": one click, every way to the relay tried, the line to
/// read out shown (and reported as a `check` event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_window_checks_the_connection() {
    let (_dir, relay, _token) = setup().await;
    let x = tandem_tests::x11::Xvfb::start(1024, 768);
    let mut agent = windowed_agent(&relay, &x, &[]);
    let _ = agent.code().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let display = x.display.clone();
    // "Check connection", under the relay's address (see target/screenshots/agent-check.png).
    tokio::task::spawn_blocking(move || x_click(&display, 66, 184))
        .await
        .unwrap();
    let check = agent.next("check").await;
    checked_over_quic(&check, &x.display, "agent-check.png").await;
    relay.terminate().await;
}

/// The console's login screen: "Check connection" runs the same report as `--check` for the
/// relay in the form (screenshot in target/screenshots/console-check.png).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_window_checks_the_connection() {
    let (_dir, relay, _token) = setup().await;
    let x = tandem_tests::x11::Xvfb::start(1024, 768);
    let cfg = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary("tandem-console"))
        .args([
            "--relay",
            &relay.addr,
            "--relay-pin",
            &relay.pin.to_string(),
            "--json",
        ])
        .arg("--config")
        .arg(cfg.path().join("console.toml"))
        .env("DISPLAY", &x.display)
        .env("LIBGL_ALWAYS_SOFTWARE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let display = x.display.clone();
    // "Check connection", beside Connect (see the screenshot).
    tokio::task::spawn_blocking(move || x_click(&display, CHECK_BUTTON.0, CHECK_BUTTON.1))
        .await
        .unwrap();
    let check = tokio::time::timeout(T, async {
        loop {
            let line = lines.next_line().await.unwrap().expect("console exited");
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["event"] == "check"
            {
                return v;
            }
        }
    })
    .await
    .expect("no check event: the button was not clicked or the check hung");
    checked_over_quic(&check, &x.display, "console-check.png").await;
    relay.terminate().await;
}

/// A window's `check` event says the relay was reached over QUIC; the window with its report is
/// kept as target/screenshots/`shot`.
async fn checked_over_quic(check: &serde_json::Value, display: &str, shot: &str) {
    assert_eq!(check["reachable"], true, "{check}");
    assert!(
        check["summary"]
            .as_str()
            .unwrap()
            .contains("OK: connected over QUIC"),
        "{check}"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let _ = std::process::Command::new(binary("tandem-screenshot"))
        .arg(display)
        .arg(shots.join(shot))
        .status();
}

/// Where the console's "Check connection" button is on an empty login screen (no window manager:
/// the window sits at the top-left corner).
const CHECK_BUTTON: (i16, i16) = (139, 154);
