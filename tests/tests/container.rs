//! The relay's container image (relay/dist/container): this machine type runs no Docker engine
//! (`docker` is only the client), so the image is validated without building it: every file the
//! Dockerfile copies exists in the build context and is not excluded by .dockerignore, the compose
//! file points at that Dockerfile and volume, and the runtime contract holds with the real relay:
//! started with exactly the image's ENV, ENTRYPOINT and CMD (ports and the volume moved to free
//! ones), its HEALTHCHECK command reports healthy, then unhealthy once it stops, and a restart on
//! the same volume keeps the certificate (same pin). Where `docker info` answers, the image is also
//! built and its health check run for real.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tandem_tests::binary;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                cur.push_str(part);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                let (k, v) = cur.split_once(' ').unwrap();
                out.push((k.to_uppercase(), v.trim().to_string()));
                cur.clear();
            }
        }
    }
    out
}

/// The final stage's instructions (after the last FROM).
fn final_stage(all: &[(String, String)]) -> Vec<(String, String)> {
    let last = all.iter().rposition(|(k, _)| k == "FROM").unwrap();
    all[last..].to_vec()
}

fn json_array(v: &str) -> Vec<String> {
    serde_json::from_str(v).unwrap_or_else(|e| panic!("not an exec-form array ({e}): {v}"))
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_build_context_has_what_the_dockerfile_copies() {
    let text = std::fs::read_to_string(root().join("relay/dist/container/Dockerfile")).unwrap();
    let all = instructions(&text);
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let mut copies = 0;
    for (k, v) in &all {
        if k != "COPY" || v.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = v.split_whitespace().collect();
        for src in &parts[..parts.len() - 1] {
            copies += 1;
            if *src == "." {
                continue;
            }
            assert!(
                root().join(src).exists(),
                "COPY {src}: not in the build context"
            );
            assert!(
                !ignored
                    .iter()
                    .any(|i| src.starts_with(i.trim_end_matches('/'))),
                "COPY {src}: excluded by .dockerignore"
            );
        }
    }
    assert!(copies >= 2);
    // The build stage builds the relay from sources that are in the context (target/ is not).
    assert!(ignored.contains(&"target/"));
    assert!(root().join("Cargo.lock").exists() && root().join("relay/Cargo.toml").exists());

    let compose =
        std::fs::read_to_string(root().join("relay/dist/container/compose.yaml")).unwrap();
    assert!(compose.contains("dockerfile: relay/dist/container/Dockerfile"));
    let stage = final_stage(&all);
    let volume = json_array(&stage.iter().find(|(k, _)| k == "VOLUME").unwrap().1);
    assert!(
        compose.contains(&format!("relay-data:{}", volume[0])),
        "compose mounts the image's volume"
    );
    for port in ["4433:4433/udp", "4433:4433/tcp"] {
        assert!(compose.contains(port));
    }
}

/// Starts the relay as the image would, with `env`; returns it and its printed pin.
fn start_as_image(
    entry: &[String],
    env: &BTreeMap<String, String>,
) -> (std::process::Child, String) {
    let mut cmd = Command::new(binary("tandem-relay"));
    cmd.args(&entry[1..])
        .env_clear()
        .envs(env)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut pin = None;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(p) = line.trim().strip_prefix("fingerprint:") {
                pin = Some(p.trim().to_string());
            }
            if line.trim_start().starts_with("metrics:") {
                let _ = tx.send(pin.take());
            }
        }
    });
    let pin = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the relay did not start")
        .expect("no pin printed");
    (child, pin)
}

fn healthcheck(cmd: &[String], env: &BTreeMap<String, String>) -> std::process::Output {
    assert_eq!(cmd[0], "tandem-relay");
    Command::new(binary("tandem-relay"))
        .args(&cmd[1..])
        .env_clear()
        .envs(env)
        .output()
        .unwrap()
}

#[test]
fn the_image_contract_holds_with_the_real_relay() {
    let text = std::fs::read_to_string(root().join("relay/dist/container/Dockerfile")).unwrap();
    let stage = final_stage(&instructions(&text));
    let get = |k: &str| stage.iter().find(|(i, _)| i == k).unwrap().1.clone();
    // ENV a=b \ c=d (joined).
    let mut env: BTreeMap<String, String> = get("ENV")
        .split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    let entry: Vec<String> = json_array(&get("ENTRYPOINT"))
        .into_iter()
        .chain(json_array(&get("CMD")))
        .collect();
    assert_eq!(entry, ["tandem-relay", "serve"]);
    let health = get("HEALTHCHECK");
    let health_cmd = json_array(health.split_once("CMD").unwrap().1.trim());
    let volume = json_array(&get("VOLUME"))[0].clone();
    assert_eq!(
        env["TANDEM_RELAY_DATA_DIR"], volume,
        "the data directory is the volume"
    );
    assert!(env["TANDEM_RELAY_METRICS_LISTEN"].starts_with("127.0.0.1:"));

    // The volume and the ports, moved to free ones on this machine.
    let data = tempfile::tempdir().unwrap();
    env.insert(
        "TANDEM_RELAY_DATA_DIR".into(),
        data.path().to_str().unwrap().into(),
    );
    env.insert(
        "TANDEM_RELAY_LISTEN".into(),
        format!("127.0.0.1:{}", tandem_tests::free_port()),
    );
    env.insert(
        "TANDEM_RELAY_METRICS_LISTEN".into(),
        format!("127.0.0.1:{}", free_tcp_port()),
    );

    let (mut relay, pin) = start_as_image(&entry, &env);
    let out = healthcheck(&health_cmd, &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["status"], "ok");
    let _ = relay.kill();
    let _ = relay.wait();
    let out = healthcheck(&health_cmd, &env);
    assert!(!out.status.success(), "a stopped relay is unhealthy");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no relay answers"));

    // A new container on the same volume: the same certificate.
    let (mut again, pin2) = start_as_image(&entry, &env);
    assert_eq!(pin, pin2);
    let _ = again.kill();
    let _ = again.wait();
}

#[test]
fn the_image_builds_and_turns_healthy_where_docker_runs() {
    let info = Command::new("docker").arg("info").output();
    match info {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "SKIPPED: no Docker engine here (docker info: {}); the image is validated by the \
                 other tests of this file",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            return;
        }
        Err(e) => {
            eprintln!("SKIPPED: no docker command ({e})");
            return;
        }
    }
    let tag = format!("tandem-relay-test:{}", std::process::id());
    let st = Command::new("docker")
        .args([
            "build",
            "-q",
            "-f",
            "relay/dist/container/Dockerfile",
            "-t",
            &tag,
            ".",
        ])
        .current_dir(root())
        .status()
        .unwrap();
    assert!(st.success(), "docker build failed");
    let name = format!("tandem-relay-test-{}", std::process::id());
    let st = Command::new("docker")
        .args(["run", "-d", "--rm", "--name", &name, &tag])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = Command::new("docker")
            .args(["exec", &name, "tandem-relay", "health"])
            .output()
            .unwrap();
        if o.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the container never turned healthy"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = Command::new("docker").args(["rm", "-f", &name]).status();
    let _ = Command::new("docker").args(["rmi", &tag]).status();
}
