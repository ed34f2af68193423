//! Helpers for tests of organisation keys and unattended access with the real programs:
//! `tandem-org` (keys, certificates, enrollment), a headless `tandem-agent` read as JSON events,
//! and a headless `tandem-console` run to its end.
#![allow(clippy::unwrap_used)]

use crate::{RelayProcess, binary, relay_admin, token_from_output};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const T: Duration = Duration::from_secs(30);
pub const PASS: &str = "correct horse battery staple";

/// Runs `tandem-org` with `args`; its stdout. Panics (with stderr) on failure.
pub fn org(args: &[&str]) -> String {
    let out = std::process::Command::new(binary("tandem-org"))
        .args(args)
        .env("TANDEM_ORG_PASSPHRASE", PASS)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tandem-org {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An organisation made with `tandem-org init`: its key file and the agents' `org = ` value.
pub struct Org {
    pub key: PathBuf,
    pub line: String,
    pub fingerprint: String,
}

pub fn make_org(dir: &Path, name: &str) -> Org {
    let key = dir.join(format!("{}.key", name.replace(' ', "_")));
    let out = org(&["init", "--name", name, "--key", key.to_str().unwrap()]);
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("org = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no org line in {out}"))
        .to_string();
    let fingerprint = out
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint:"))
        .unwrap()
        .trim()
        .to_string();
    Org {
        key,
        line,
        fingerprint,
    }
}

/// A technician's key and a certificate from `org` with `permissions`: (cert, key) files.
pub fn technician(dir: &Path, org_: &Org, name: &str, permissions: &str) -> (PathBuf, PathBuf) {
    technician_for(dir, org_, name, permissions, "")
}

pub struct Agent {
    pub child: Child,
    pub lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    pub state: tempfile::TempDir,
}

impl Agent {
    pub async fn start(relay: &RelayProcess, extra: &[&str]) -> Agent {
        Self::start_in(relay, extra, tempfile::tempdir().unwrap()).await
    }

    pub async fn start_in(relay: &RelayProcess, extra: &[&str], state: tempfile::TempDir) -> Agent {
        let mut args = vec!["--consent", "allow"];
        args.extend_from_slice(extra);
        Self::start_raw(relay, &args, state).await
    }

    /// An agent without `--consent` (unattended agents follow their configuration's policy).
    pub async fn start_unattended(
        relay: &RelayProcess,
        extra: &[&str],
        state: tempfile::TempDir,
    ) -> Agent {
        Self::start_raw(relay, extra, state).await
    }

    async fn start_raw(relay: &RelayProcess, extra: &[&str], state: tempfile::TempDir) -> Agent {
        let mut cmd = Command::new(binary("tandem-agent"));
        for v in [
            "DISPLAY",
            "WAYLAND_DISPLAY",
            "XDG_SESSION_TYPE",
            "XDG_CURRENT_DESKTOP",
            "TANDEM_ORG",
        ] {
            cmd.env_remove(v);
        }
        cmd.env("TANDEM_WRONG_CODE_PAUSE", "1")
            .env("TANDEM_AGENT_STATE_DIR", state.path())
            .args([
                "--relay",
                &relay.addr,
                "--relay-pin",
                &relay.pin.to_string(),
            ])
            .args(["--json", "--headless"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Agent {
            child,
            lines,
            state,
        }
    }

    pub async fn next(&mut self, kind: &str) -> serde_json::Value {
        tokio::time::timeout(T, async {
            loop {
                let line = self.lines.next_line().await.unwrap().expect("agent exited");
                if std::env::var_os("TANDEM_TEST_ECHO").is_some() {
                    eprintln!("AGENT: {line}");
                }
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                if v["event"] == kind {
                    return v;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {kind} event from the agent"))
    }

    /// Types a line on the agent's standard input (answers and `say …` with `--consent lines`).
    pub async fn type_line(&mut self, line: &str) {
        use tokio::io::AsyncWriteExt;
        let stdin = self.child.stdin.as_mut().expect("stdin piped");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    }

    pub async fn code(&mut self) -> String {
        self.next("code").await["code"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

/// A headless console joining `code` for a second; (exit code, JSON events, stderr).
pub async fn console(
    relay: &RelayProcess,
    token: &str,
    code: &str,
    extra: &[&str],
) -> (i32, Vec<serde_json::Value>, String) {
    let mut args = vec!["--code", code, "--seconds", "1"];
    args.extend_from_slice(extra);
    console_with(relay, token, &args).await
}

/// Like [`console`], proving the technician certificate and key `creds`.
pub async fn console_certified(
    relay: &RelayProcess,
    token: &str,
    code: &str,
    creds: (&Path, &Path),
) -> (i32, Vec<serde_json::Value>, String) {
    console(
        relay,
        token,
        code,
        &["--cert", s(creds.0), "--cert-key", s(creds.1)],
    )
    .await
}

/// A headless console with `args` (besides relay, pin and token) run to its end; (exit code,
/// JSON events, stderr). No configuration file is read or written.
pub async fn console_with(
    relay: &RelayProcess,
    token: &str,
    args: &[&str],
) -> (i32, Vec<serde_json::Value>, String) {
    console_at(&relay.addr, &relay.pin.to_string(), token, args).await
}

/// Like [`console_with`], for a relay given by address and pin (to run in a task of its own).
pub async fn console_at(
    addr: &str,
    pin: &str,
    token: &str,
    args: &[&str],
) -> (i32, Vec<serde_json::Value>, String) {
    let cfg = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(binary("tandem-console"));
    cmd.args(["--relay", addr, "--relay-pin", pin])
        .args(["--token", token])
        .args(["--headless", "--json", "--no-remember"])
        .arg("--config")
        .arg(cfg.path().join("console.toml"))
        .args(args)
        .env_remove("TANDEM_CERT")
        .env_remove("TANDEM_CERT_KEY")
        .kill_on_drop(true);
    // A console told to run for `--seconds N` gets N plus margin: the file transfer with a cut
    // link asks for 40 and, with 30 here, was killed in a busy run at 36 s.
    let asked = args
        .windows(2)
        .find(|w| w[0] == "--seconds")
        .and_then(|w| w[1].parse::<u64>().ok())
        .map_or(Duration::ZERO, |n| Duration::from_secs(n + 20));
    let out = tokio::time::timeout(T.max(asked), cmd.output())
        .await
        .unwrap()
        .unwrap();
    let events = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (
        out.status.code().unwrap_or(-1),
        events,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn event<'a>(ev: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    ev.iter()
        .find(|e| e["event"] == kind)
        .unwrap_or_else(|| panic!("no {kind} event in {ev:?}"))
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Like [`technician`], for device `groups` (comma separated) too.
pub fn technician_for(
    dir: &Path,
    org_: &Org,
    name: &str,
    permissions: &str,
    groups: &str,
) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let req = dir.join(format!("{name}.req"));
    let cert = dir.join(format!("{name}.cert"));
    org(&[
        "request",
        "--name",
        name,
        "--key",
        s(&key),
        "--out",
        s(&req),
    ]);
    org(&[
        "issue",
        "--key",
        s(&org_.key),
        "--request",
        s(&req),
        "--permissions",
        permissions,
        "--groups",
        groups,
        "--validity",
        "2h",
        "--out",
        s(&cert),
    ]);
    (cert, key)
}

/// Runs `tandem-agent` with `args` (a subcommand) on the state directory `state`; its exit
/// status success, stdout and stderr.
pub fn agent_cmd(state: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(binary("tandem-agent"))
        .env("TANDEM_AGENT_STATE_DIR", state)
        .env_remove("TANDEM_ORG")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Enrolls the agent whose state directory is `state` in `org_`'s `group`, the way an MSP does:
/// `tandem-agent enroll` (device key and request), `tandem-org enroll` (the administrator
/// approves), `tandem-agent enroll --cert`. Returns the device id.
pub fn enroll_agent(dir: &Path, org_: &Org, state: &Path, name: &str, group: &str) -> String {
    let (ok, req, err) = agent_cmd(state, &["enroll", "--name", name]);
    assert!(ok, "{err}");
    let req_file = dir.join(format!("{name}.devreq"));
    std::fs::write(&req_file, req.trim()).unwrap();
    let cert = dir.join(format!("{name}.device"));
    org(&[
        "enroll",
        "--key",
        s(&org_.key),
        "--request",
        s(&req_file),
        "--group",
        group,
        "--out",
        s(&cert),
    ]);
    let (ok, out, err) = agent_cmd(state, &["--org", &org_.line, "enroll", "--cert", s(&cert)]);
    assert!(ok, "{err}");
    // "Enrolled as NAME (ID) in group …"
    out.split('(')
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("no device id in {out}"))
        .to_string()
}

/// Creates `dir` (and its parents); returns it.
pub fn mkdir(dir: PathBuf) -> PathBuf {
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A real relay whose store knows "alice of ACME IT" (the relay's word, not the organisation's),
/// with join, login and registration limits raised above what these tests do in a minute (the
/// limits are not under test here): its data directory, the relay, alice's token and the relay's
/// configuration file (to restart it with).
pub async fn relay_for_org_tests() -> (tempfile::TempDir, RelayProcess, String, PathBuf) {
    crate::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let out = relay_admin(
        dir.path(),
        &["technician", "add", "--org", "ACME IT", "--name", "alice"],
    );
    let token = token_from_output(&out).expose().to_string();
    let cfg = dir.path().join("relay.toml");
    std::fs::write(
        &cfg,
        "[limits]\njoins_per_minute_per_technician = 100\njoins_per_minute_per_address = 100\n\
         auths_per_minute_per_address = 200\n",
    )
    .unwrap();
    let relay = RelayProcess::start_with(dir.path(), &["--config", s(&cfg)]).await;
    (dir, relay, token, cfg)
}
