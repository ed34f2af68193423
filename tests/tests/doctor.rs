//! `tandem-relay doctor` against real relays: a new machine (nothing yet, nothing created), a
//! running relay (its ports are "served by this relay", certificate and database read), a data
//! directory others can read, and a port another program holds.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use tandem_tests::{RelayProcess, binary, relay_admin};

fn doctor(data_dir: &Path, listen: &str, metrics: &str) -> (bool, String) {
    let out = Command::new(binary("tandem-relay"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", listen, "--metrics-listen", metrics, "doctor"])
        .env_remove("TANDEM_RELAY_CONFIG")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn line<'a>(text: &'a str, what: &str) -> &'a str {
    text.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(what))
        .unwrap_or_else(|| panic!("no {what} line: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reads_a_relay_without_changing_it() {
    let base = tempfile::tempdir().unwrap();
    let fresh = base.path().join("not-yet");
    let port = tandem_tests::free_port();
    let (ok, text) = doctor(&fresh, &format!("127.0.0.1:{port}"), "127.0.0.1:1");
    assert!(ok, "a new machine has warnings, not problems: {text}");
    assert!(line(&text, "certificate").starts_with("  WARN"), "{text}");
    assert!(!fresh.exists(), "the doctor created {}", fresh.display());

    let dir = tempfile::tempdir().unwrap();
    relay_admin(
        dir.path(),
        &["technician", "add", "--org", "ACME IT", "--name", "alice"],
    );
    let relay = RelayProcess::start(dir.path()).await;
    let metrics = relay.metrics.to_string();
    let (ok, text) = doctor(dir.path(), &relay.addr, &metrics);
    assert!(ok, "{text}");
    assert!(
        line(&text, "UDP").contains("served by this relay"),
        "{text}"
    );
    assert!(
        line(&text, "TCP").contains("served by this relay"),
        "{text}"
    );
    assert!(line(&text, "health").starts_with("  OK"), "{text}");
    let cert = line(&text, "certificate");
    assert!(
        cert.starts_with("  OK") && cert.contains(&relay.pin.to_string()),
        "{text}"
    );
    assert!(line(&text, "database").contains("1 technicians"), "{text}");

    // Others can read the key: a warning that says what to do.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_, text) = doctor(dir.path(), &relay.addr, &metrics);
    assert!(line(&text, "data").contains("chmod 700"), "{text}");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    relay.terminate().await;

    // Another program holds the UDP port: a problem, exit code 1.
    let squatter = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken = squatter.local_addr().unwrap().to_string();
    let (ok, text) = doctor(dir.path(), &taken, &metrics);
    assert!(!ok, "{text}");
    assert!(line(&text, "UDP").contains("another program"), "{text}");
}

/// A relay started on a data directory that does not exist yet makes it readable by its own user
/// only (it holds the relay's key), and its doctor has nothing to say about the mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_data_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("new").join("tandem-relay");
    let relay = RelayProcess::start(&dir).await;
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "data directory mode {mode:o}");
    let metrics = relay.metrics.to_string();
    let (ok, text) = doctor(&dir, &relay.addr, &metrics);
    assert!(ok, "{text}");
    assert!(!text.contains("chmod"), "{text}");
}
