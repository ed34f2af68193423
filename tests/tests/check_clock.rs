//! "Check connection"'s clock step against real relays: one in step with this machine, one whose
//! clock is three hours ahead (the relay run under libfaketime, as a server with a wrong clock).
//! The report says whose clock is off and by how much, and the session stays reachable (a wrong
//! clock is a problem to fix, not a reason to call the relay unreachable).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Stdio;

use tandem_tests::{RelayProcess, binary};

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

async fn agent_check(relay: &RelayProcess) -> (i32, serde_json::Value) {
    let out = tokio::process::Command::new(binary("tandem-agent"))
        .args(["--relay", &relay.addr])
        .args(["--relay-pin", &relay.pin.to_string()])
        .args(["--check", "--json"])
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let r = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("not a JSON report ({e}): {text}"));
    (out.status.code().unwrap_or(-1), r)
}

fn step<'a>(r: &'a serde_json::Value, what: &str) -> &'a serde_json::Value {
    r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["what"] == what)
        .unwrap_or_else(|| panic!("no step {what}: {r}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_tells_a_clock_hours_off() {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} missing: run scripts/deps.sh (package faketime)"
    );

    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(dir.path()).await;
    let (rc, r) = agent_check(&relay).await;
    assert_eq!(rc, 0, "{r}");
    assert_eq!(step(&r, "clock")["verdict"], "OK", "{r}");
    assert!(!r["summary"].as_str().unwrap().contains("clock"), "{r}");
    drop(relay);

    // The relay's clock three hours ahead: this computer's clock is the one that looks slow.
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start_with_env(
        dir.path(),
        &[],
        &[
            ("LD_PRELOAD", LIBFAKETIME),
            ("FAKETIME", "+3h"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    )
    .await;
    let (rc, r) = agent_check(&relay).await;
    assert_eq!(
        rc, 0,
        "a wrong clock does not make the relay unreachable: {r}"
    );
    assert_eq!(r["reachable"], true, "{r}");
    let clock = step(&r, "clock");
    assert_eq!(clock["verdict"], "FAIL", "{r}");
    let detail = clock["detail"].as_str().unwrap();
    assert!(detail.contains("3 h behind the relay's"), "{r}");
    let summary = r["summary"].as_str().unwrap();
    assert!(summary.starts_with("UDP"), "{r}");
    // (Then "the screen cannot be shared": the test has no display.)
    assert!(
        summary.contains("; clock 3 h slow: fix the date and time"),
        "{r}"
    );
}
