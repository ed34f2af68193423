//! A ready agent (`tandem-relay agent-bundle`): one file, copied alone into an empty folder and
//! run with no arguments and no environment but PATH and HOME, reaches the relay it was made for
//! and pairs with a technician; the same file with its configuration altered does not run.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tandem_tests::org::relay_for_org_tests;
use tandem_tests::{binary, relay_admin};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const T: Duration = Duration::from_secs(30);

/// Runs `agent-bundle` for `relay`; returns the ready agent's path and what the command printed.
fn make_bundle(data_dir: &Path, relay_addr: &str, out: &Path, extra: &[&str]) -> String {
    let agent = binary("tandem-agent");
    let mut args = vec![
        "agent-bundle",
        "--address",
        relay_addr,
        "--agent",
        agent.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    relay_admin(data_dir, &args)
}

/// A folder with nothing in it but the ready agent (no tandem-agent.toml next to it).
fn lone_copy(bundle: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tandem-agent-for-acme");
    std::fs::copy(bundle, &p).unwrap();
    (dir, p)
}

/// Starts `program` with no arguments and an empty environment (PATH and a fresh HOME only).
fn start_bare(program: &Path, home: &Path) -> tokio::process::Child {
    bare(Command::new(program), home)
}

/// The same on a terminal of its own (util-linux `script`), as a user starts it: the agent asks
/// on a terminal by default.
fn start_bare_on_a_terminal(program: &Path, home: &Path) -> tokio::process::Child {
    let mut cmd = Command::new("script");
    cmd.args(["-q", "-f", "-e", "-c"])
        .arg(program)
        .arg("/dev/null");
    bare(cmd, home)
}

fn bare(mut cmd: Command, home: &Path) -> tokio::process::Child {
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home)
        .current_dir(home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_agent_alone_reaches_its_relay_with_no_arguments() {
    let (dir, relay, token, _cfg) = relay_for_org_tests().await;
    let work = tempfile::tempdir().unwrap();
    let bundle = work.path().join("tandem-agent-acme");
    let printed = make_bundle(dir.path(), &relay.addr, &bundle, &[]);
    assert!(printed.contains(&relay.pin.to_string()), "{printed}");
    let sha = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("SHA-256:"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(sha, tandem_bundle::file_sha256(&bundle).unwrap());

    let (home, program) = lone_copy(&bundle);
    let mut agent = start_bare_on_a_terminal(&program, home.path());
    let mut out = BufReader::new(agent.stdout.take().unwrap()).lines();
    // The code: three groups of three digits, printed on the terminal.
    let code = tokio::time::timeout(T, async {
        loop {
            let line = out.next_line().await.unwrap().expect("agent exited");
            if let Some(code) = line.split_whitespace().find(|w| {
                w.len() == 11
                    && w.split('-')
                        .all(|g| g.len() == 3 && g.bytes().all(|b| b.is_ascii_digit()))
            }) {
                return code.to_string();
            }
        }
    })
    .await
    .expect("no code from the ready agent");

    // A technician joins with it: the user is asked (so both met through the pinned relay).
    let console = {
        let (addr, pin, token, code) = (relay.addr.clone(), relay.pin.to_string(), token, code);
        tokio::spawn(async move {
            tandem_tests::org::console_at(
                &addr,
                &pin,
                &token,
                &["--code", &code, "--seconds", "20"],
            )
            .await
        })
    };
    tokio::time::timeout(T, async {
        loop {
            let line = out.next_line().await.unwrap().expect("agent exited");
            if line.contains("wants to connect") {
                assert!(line.contains("alice"), "{line}");
                return;
            }
        }
    })
    .await
    .expect("the technician never reached the user");
    let mut stdin = agent.stdin.take().unwrap();
    stdin.write_all(b"d\n").await.unwrap();
    let (rc, events, err) = console.await.unwrap();
    assert_eq!(rc, 16, "the user denied: {events:?} {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_altered_ready_agent_does_not_run() {
    let (dir, relay, _token, _cfg) = relay_for_org_tests().await;
    let work = tempfile::tempdir().unwrap();
    let bundle = work.path().join("tandem-agent-acme");
    make_bundle(dir.path(), &relay.addr, &bundle, &[]);
    let bytes = std::fs::read(&bundle).unwrap();
    let b = tandem_bundle::open(&bytes).unwrap().unwrap();
    assert!(b.config.contains(&relay.addr));

    // Point it at another relay, same length, trailer untouched: what a tamperer would do.
    let (host, port) = relay.addr.rsplit_once(':').unwrap();
    let other = format!(
        "{host}:{}",
        if port.ends_with('1') {
            port.replace('1', "2")
        } else {
            format!("{}1", &port[..port.len() - 1])
        }
    );
    assert_eq!(other.len(), relay.addr.len());
    let start = b.program_len as usize;
    let mut tampered = bytes.clone();
    let config = String::from_utf8(tampered[start..start + b.config.len()].to_vec()).unwrap();
    let altered = config.replace(&relay.addr, &other);
    tampered[start..start + b.config.len()].copy_from_slice(altered.as_bytes());
    let (home, program) = lone_copy(&bundle);
    std::fs::write(&program, &tampered).unwrap();

    let agent = start_bare(&program, home.path());
    let out = tokio::time::timeout(T, agent.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("altered or damaged"), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("code"));

    // Cut short (a broken download): refused too.
    std::fs::write(&program, &bytes[..bytes.len() - 100]).unwrap();
    let out = start_bare(&program, home.path())
        .wait_with_output()
        .await
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test]
async fn agent_bundle_explains_what_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("x");
    let run = |args: &[&str]| {
        std::process::Command::new(binary("tandem-relay"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap()
    };
    // No address known.
    let o = run(&["agent-bundle", "--out", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--address"));
    // Extra settings may not override the relay.
    let extra = work.path().join("extra.toml");
    std::fs::write(&extra, "relay = \"evil:1\"\n").unwrap();
    let agent = binary("tandem-agent");
    let o = run(&[
        "agent-bundle",
        "--address",
        "relay.example.com:4433",
        "--agent",
        agent.to_str().unwrap(),
        "--extra",
        extra.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("sets relay"));
    // Extra settings that are fine go in, after the generated lines.
    std::fs::write(&extra, "[toolbox]\nreceive_files = false\n").unwrap();
    let o = run(&[
        "agent-bundle",
        "--address",
        "relay.example.com:4433",
        "--agent",
        agent.to_str().unwrap(),
        "--extra",
        extra.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b = tandem_bundle::read_file(&out).unwrap().unwrap();
    assert!(b.config.contains("relay = \"relay.example.com:4433\""));
    assert!(b.config.contains("receive_files = false"));
    let parsed: toml::Table = b.config.parse().unwrap();
    assert_eq!(parsed["relay_pin"].as_str().unwrap().len(), 71);
}
