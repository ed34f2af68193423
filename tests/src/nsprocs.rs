//! Tandem's programs in network namespaces: a relay, and agents and consoles whose stdout is JSON
//! events (the firewall and direct-path tests share these).

use crate::netns::Netns;
use crate::{binary, relay_admin, token_from_output};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

/// How long any one step may take.
pub const T: Duration = Duration::from_secs(30);
/// The relay's UDP port (and, unless a test says otherwise, its TCP port).
pub const PORT: u16 = 4433;
/// Where the relay serves metrics, inside its namespace.
pub const METRICS: &str = "127.0.0.1:9733";

/// A process whose stdout is JSON events, one a line.
pub struct Events {
    pub child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    /// Every event read so far.
    pub seen: Vec<serde_json::Value>,
    what: &'static str,
}

impl Events {
    pub fn new(mut child: Child, what: &'static str) -> Events {
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Events {
            child,
            lines,
            seen: vec![],
            what,
        }
    }

    /// The next event for which `pred` holds, within `within`.
    pub async fn until(
        &mut self,
        what: &str,
        within: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let (lines, seen, me) = (&mut self.lines, &mut self.seen, self.what);
        let found = tokio::time::timeout(within, async {
            while let Some(l) = lines.next_line().await.unwrap() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) else {
                    continue;
                };
                seen.push(v.clone());
                if pred(&v) {
                    return Some(v);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(v)) => v,
            Ok(None) => panic!("the {me} exited before {what}: {seen:?}"),
            Err(_) => panic!("no {what} from the {me} within {within:?}: {seen:?}"),
        }
    }

    pub async fn next(&mut self, kind: &str) -> serde_json::Value {
        self.until(kind, T, |v| v["event"] == kind).await
    }

    /// Reads the remaining events and waits for the exit; returns (exit code, all events).
    pub async fn finish(mut self) -> (i32, Vec<serde_json::Value>) {
        let (lines, seen) = (&mut self.lines, &mut self.seen);
        tokio::time::timeout(T, async {
            while let Ok(Some(l)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str(&l) {
                    seen.push(v);
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the {} did not end", self.what));
        let status = tokio::time::timeout(T, self.child.wait())
            .await
            .unwrap()
            .unwrap();
        (status.code().unwrap_or(-1), self.seen)
    }
}

/// A `tandem-relay` process in a namespace, listening on UDP 0.0.0.0:[`PORT`] (TCP as `args` or its
/// default), metrics on [`METRICS`]; a technician `alice` of `ACME IT` added.
pub struct Relay {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub pin: String,
    pub token: String,
}

pub async fn start_relay(r: &Netns, args: &[&str]) -> Relay {
    let dir = tempfile::tempdir().unwrap();
    let out = relay_admin(
        dir.path(),
        &["technician", "add", "--org", "ACME IT", "--name", "alice"],
    );
    let token = token_from_output(&out).expose().to_string();
    let mut child = r
        .command(binary("tandem-relay"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--listen", &format!("0.0.0.0:{PORT}")])
        .args(["--metrics-listen", METRICS])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut pin = None;
    let mut printed = String::new();
    let started = tokio::time::timeout(T, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            printed.push_str(&line);
            printed.push('\n');
            if let Some(p) = line.trim().strip_prefix("fingerprint:") {
                pin = Some(p.trim().to_string());
            }
            // The last line of the start-up report, after the UDP and TCP addresses.
            if line.trim_start().starts_with("metrics:") {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(started, Ok(true)),
        "the relay did not start: {printed}"
    );
    // Keep draining stdout so the relay never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Relay {
        child,
        dir,
        pin: pin.expect("the relay printed no fingerprint"),
        token,
    }
}

/// Removes settings from the test runner's environment that would change how clients connect.
/// A headless `tandem-console` in `ns` that joins `code` through the relay at `relay_ip` (JSON
/// events on its stdout).
pub fn start_console_in(
    ns: &Netns,
    relay_ip: &str,
    relay: &Relay,
    code: &str,
    extra: &[&str],
) -> Events {
    let mut cmd = ns.command(binary("tandem-console"));
    clean_env(&mut cmd);
    cmd.args(["--relay", &format!("{relay_ip}:{PORT}")])
        .args(["--relay-pin", &relay.pin])
        .args(["--token", &relay.token, "--code", code])
        .args(["--headless", "--json", "--no-remember"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    Events::new(cmd.spawn().unwrap(), "console")
}

pub fn clean_env(cmd: &mut tokio::process::Command) {
    for v in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "TANDEM_PROXY",
        "TANDEM_TRANSPORT",
        "TANDEM_RELAY_TCP",
        "TANDEM_RELAY_WEBSOCKET",
        "TANDEM_PATH",
        "DISPLAY",
        "WAYLAND_DISPLAY",
        "XDG_SESSION_TYPE",
        "TANDEM_BACKEND",
        // Only a test that means to trust a reverse proxy's certificate names a trust store.
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    ] {
        cmd.env_remove(v);
    }
}
