//! Unattended access with the real programs, as an MSP sets it up: `tandem-org` makes the
//! organisation key and a technician certificate allowing unattended access to a device group;
//! `tandem-agent enroll` makes the device key and request, `tandem-org enroll` approves it,
//! `tandem-agent enroll --cert` installs it; the agent runs with `[unattended]` in its
//! tandem-agent.toml on an Xvfb screen nobody watches. The relay is a real one that only routes.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;
use tandem_tests::org::*;
use tandem_tests::{RelayProcess, relay_admin};

/// Kills the X clients of the banners on `display` (override-redirect windows along the top edge):
/// what a technician with control could do with `xkill`. Returns how many.
fn kill_banner(display: &str) -> usize {
    use x11rb::connection::Connection;
    use x11rb::protocol::xproto::{ConnectionExt, MapState};
    use x11rb::wrapper::ConnectionExt as _;
    let (conn, screen) = x11rb::connect(Some(display)).unwrap();
    let root = conn.setup().roots[screen].root;
    let mut killed = 0;
    for w in conn.query_tree(root).unwrap().reply().unwrap().children {
        let a = conn.get_window_attributes(w).unwrap().reply().unwrap();
        let g = conn.get_geometry(w).unwrap().reply().unwrap();
        if a.override_redirect && a.map_state == MapState::VIEWABLE && g.y == 0 && g.height == 24 {
            conn.kill_client(w).unwrap();
            killed += 1;
        }
    }
    conn.sync().unwrap();
    killed
}

/// A headless console connecting to `device` (id or name) with the technician certificate and key
/// `creds`, for `seconds`; (exit code, JSON events, stderr).
async fn connect(
    relay: &RelayProcess,
    token: &str,
    device: &str,
    creds: (&Path, &Path),
    seconds: u32,
    extra: &[&str],
) -> (i32, Vec<serde_json::Value>, String) {
    let seconds = seconds.to_string();
    let mut args = vec![
        "--device",
        device,
        "--cert",
        s(creds.0),
        "--cert-key",
        s(creds.1),
        "--seconds",
        &seconds,
    ];
    args.extend_from_slice(extra);
    console_with(relay, token, &args).await
}

/// tandem-agent.toml with `[unattended]`; without a screen the banner must be optional.
fn agent_config(dir: &Path, ask: &str, timeout: u64, screen: bool) -> std::path::PathBuf {
    let p = dir.join("tandem-agent.toml");
    let banner = if screen { "required" } else { "optional" };
    std::fs::write(
        &p,
        format!(
            "[unattended]\nenabled = true\nask = \"{ask}\"\nask_timeout_secs = {timeout}\n\
             banner = \"{banner}\"\n"
        ),
    )
    .unwrap();
    p
}

/// `--list-devices` as alice: the device events.
async fn devices(
    relay: &RelayProcess,
    token: &str,
    cert: &Path,
    key: &Path,
) -> Vec<serde_json::Value> {
    let (rc, ev, err) = console_with(
        relay,
        token,
        &["--list-devices", "--cert", s(cert), "--cert-key", s(key)],
    )
    .await;
    assert_eq!(rc, 0, "{ev:?}\n{err}");
    ev.into_iter().filter(|e| e["event"] == "device").collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_agent_is_reached_without_a_code_nobody_answering_with_the_banner_shown() {
    let (dir, relay, token, _) = relay_for_org_tests().await;
    let acme = make_org(dir.path(), "ACME IT");
    let (cert, key) = technician_for(
        dir.path(),
        &acme,
        "alice",
        "view,control,unattended",
        "servers",
    );
    let state = tempfile::tempdir().unwrap();
    let id = enroll_agent(dir.path(), &acme, state.path(), "pc-7", "servers");
    assert!(tandem_session::tandem_org::is_device_id(&id), "{id}");
    // An agent of another organisation online on the same relay.
    let other = make_org(&mkdir(dir.path().join("other")), "Other MSP");
    let other_state = tempfile::tempdir().unwrap();
    let other_id = enroll_agent(
        &dir.path().join("other"),
        &other,
        other_state.path(),
        "theirs",
        "servers",
    );

    let x = tandem_tests::x11::Xvfb::start(640, 480);
    let cfg = agent_config(dir.path(), "then-connect", 2, true);
    let mut agent = Agent::start_unattended(
        &relay,
        &[
            "--org",
            &acme.line,
            "--config",
            s(&cfg),
            "--display",
            &x.display,
        ],
        state,
    )
    .await;
    let d = agent.next("device").await;
    assert_eq!(d["device"], id.as_str());
    assert_eq!(d["group"], "servers");
    agent.next("online").await;
    let other_cfg = dir.path().join("other").join("tandem-agent.toml");
    std::fs::write(
        &other_cfg,
        "[unattended]\nenabled = true\nask = \"no\"\nbanner = \"optional\"\n",
    )
    .unwrap();
    let mut theirs = Agent::start_unattended(
        &relay,
        &["--org", &other.line, "--config", s(&other_cfg)],
        other_state,
    )
    .await;
    theirs.next("online").await;

    // The device list: ours, online, checked; never the other organisation's.
    let list = devices(&relay, &token, &cert, &key).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["online"], true);
    assert_eq!(list[0]["group"], "servers");
    assert!(!format!("{list:?}").contains(&other_id));

    // Connect by name, no code: the agent asks, nobody answers in 2 s, the technician connects;
    // the banner is on the screen the technician sees. Someone closes the banner during the
    // session (kills its X client): it is shown again.
    let png = dir.path().join("screen.png");
    let console = {
        let (relay_addr, pin, token, cert, key, png) = (
            relay.addr.clone(),
            relay.pin.to_string(),
            token.clone(),
            cert.clone(),
            key.clone(),
            png.clone(),
        );
        tokio::spawn(async move {
            console_at(
                &relay_addr,
                &pin,
                &token,
                &[
                    "--device",
                    "pc-7",
                    "--cert",
                    s(&cert),
                    "--cert-key",
                    s(&key),
                    "--seconds",
                    "6",
                    "--png",
                    s(&png),
                ],
            )
            .await
        })
    };
    let banner = agent.next("banner").await;
    assert_eq!(banner["shown"], true, "{banner}");
    let asked = agent.next("consent_asked").await;
    assert_eq!(asked["unattended"], true);
    assert_eq!(asked["verified"], true);
    assert_eq!(asked["if_nobody_answers"], "allow");
    agent.next("consent_timeout").await;
    agent.next("session").await;
    assert_eq!(kill_banner(&x.display), 1);
    let again = agent.next("banner").await;
    assert_eq!(again["again"], true, "{again}");
    let (rc, ev, err) = console.await.unwrap();
    assert_eq!(rc, 0, "{ev:?}\n{err}");
    let joined = event(&ev, "joined");
    assert_eq!(joined["device"]["id"], id.as_str(), "{joined}");
    assert_eq!(joined["verified"], true);
    assert_eq!(event(&ev, "consent")["decision"], "AllowControl");
    let shot = tandem_tests::read_png(&png);
    let w = shot.width;
    let red = tandem_tests::count_color(&shot, 0xC62828, 40, (0, 0, w, 24));
    assert!(
        red > (w * 24 / 2) as usize,
        "banner: {red} red pixels of {}",
        w * 24
    );
    let below = tandem_tests::count_color(&shot, 0xC62828, 40, (0, 40, w, 200));
    assert_eq!(below, 0);
    // Back online for the next technician.
    agent.next("online").await;
    // A technician who gives up while the agent still waits for an answer: the prompt goes at
    // once (the agent reads the session while it asks), and the agent comes back online.
    let (rc, _, err) = connect(&relay, &token, &id, (&cert, &key), 1, &[]).await;
    assert_eq!(rc, 0, "{err}");
    let ended = agent.next("ended").await;
    assert!(
        ended["message"]
            .as_str()
            .unwrap_or_default()
            .contains("before it started"),
        "{ended}"
    );
    agent.next("online").await;

    // A certificate without unattended access: refused (by the relay already, and the agent
    // would refuse it too: see unattended_hostile.rs), with a clear word.
    let (vcert, vkey) = technician_for(dir.path(), &acme, "victor", "view,control", "servers");
    let (rc, _, err) = connect(&relay, &token, &id, (&vcert, &vkey), 1, &[]).await;
    assert_eq!(rc, 15, "{err}");
    assert!(err.contains("unattended"), "{err}");
    // Without any certificate: told what is missing.
    let (rc, _, err) = console_with(&relay, &token, &["--device", &id, "--seconds", "1"]).await;
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("certificate"), "{err}");
    // Another organisation's device by id: not reachable with this certificate.
    let (rc, _, err) = connect(&relay, &token, &other_id, (&cert, &key), 1, &[]).await;
    assert_eq!(rc, 12, "{err}");

    // The agent's signed log has the session; the relay's admin commands show the device and
    // the audit row names it.
    drop(agent);
    let relay_dir = dir.path();
    let devices_json = relay_admin(relay_dir, &["devices", "list", "--json"]);
    assert!(devices_json.contains(&id), "{devices_json}");
    assert!(devices_json.contains("\"hostname\""), "{devices_json}");
    let audit = relay_admin(relay_dir, &["audit", "--json"]);
    assert!(audit.contains(&format!("device {id}")), "{audit}");
    drop(theirs);
    relay.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_comes_back_online_after_the_agent_and_the_relay_restart() {
    let (dir, relay, token, relay_cfg) = relay_for_org_tests().await;
    let acme = make_org(dir.path(), "ACME IT");
    let (cert, key) = technician_for(dir.path(), &acme, "alice", "all", "*");
    let state = tempfile::tempdir().unwrap();
    let id = enroll_agent(dir.path(), &acme, state.path(), "server-1", "servers");
    let cfg = agent_config(dir.path(), "no", 30, false);
    let args = ["--org", &acme.line, "--config", s(&cfg)];
    let mut agent = Agent::start_unattended(&relay, &args, state).await;
    agent.next("online").await;

    // The service restarts (same state directory): the same device, online again.
    let state = std::mem::replace(&mut agent.state, tempfile::tempdir().unwrap());
    drop(agent);
    let mut agent = Agent::start_unattended(&relay, &args, state).await;
    assert_eq!(agent.next("device").await["device"], id.as_str());
    agent.next("online").await;
    let list = devices(&relay, &token, &cert, &key).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["online"], true, "{list:?}");
    // The relay's metrics count it (the gauges are refreshed each second).
    let mut counted = false;
    for _ in 0..30 {
        let (_, m) = tandem_tests::http_get(relay.metrics, "/metrics").await;
        if tandem_tests::metric(&m, "tandem_relay_devices_online") == 1.0
            && tandem_tests::metric(&m, "tandem_relay_devices_known") == 1.0
            && tandem_tests::metric(&m, "tandem_relay_agents_waiting") == 0.0
        {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        counted,
        "the relay's metrics do not count the online device"
    );

    // The relay dies and comes back: the agent notices, retries, and is online again.
    let relay = relay
        .crash_and_restart_with(dir.path(), &["--config", s(&relay_cfg)])
        .await;
    agent.next("offline").await;
    agent.next("online").await;
    let list = devices(&relay, &token, &cert, &key).await;
    assert_eq!(list[0]["online"], true, "{list:?}");

    // The agent stops: the relay lists the device offline, with when it was last seen.
    drop(agent);
    let mut offline = false;
    for _ in 0..50 {
        let list = devices(&relay, &token, &cert, &key).await;
        if list[0]["online"] == false {
            assert!(list[0]["last_seen"].as_u64().unwrap() > 0);
            offline = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(offline, "the relay still lists the stopped device online");
    relay.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_keeps_a_signed_log_of_its_sessions() {
    let (dir, relay, token, _) = relay_for_org_tests().await;
    let acme = make_org(dir.path(), "ACME IT");
    let (cert, key) = technician_for(dir.path(), &acme, "alice", "view,unattended", "lab");
    let state = tempfile::tempdir().unwrap();
    let state_path = state.path().to_path_buf();
    let id = enroll_agent(dir.path(), &acme, state.path(), "lab-1", "lab");
    let cfg = agent_config(dir.path(), "no", 30, false);
    let mut agent =
        Agent::start_unattended(&relay, &["--org", &acme.line, "--config", s(&cfg)], state).await;
    agent.next("online").await;
    for _ in 0..2 {
        let (rc, ev, err) = connect(&relay, &token, &id, (&cert, &key), 1, &[]).await;
        assert_eq!(rc, 0, "{ev:?}\n{err}");
        // A view-only certificate: view only, whatever the policy allows.
        assert_eq!(event(&ev, "consent")["decision"], "ViewOnly", "{ev:?}");
        agent.next("online").await;
    }
    let (ok, out, err) = agent_cmd(&state_path, &["log"]);
    assert!(ok, "{out}\n{err}");
    let events: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(events.iter().filter(|e| **e == "start").count(), 2, "{out}");
    assert_eq!(events.iter().filter(|e| **e == "end").count(), 2, "{out}");
    assert!(out.contains("unattended") && out.contains("alice"), "{out}");
    // Someone edits the log: `tandem-agent log` says so and fails.
    let log = state_path.join("sessions.log");
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, text.replacen("alice", "bob", 1)).unwrap();
    let (ok, out, _) = agent_cmd(&state_path, &["log"]);
    assert!(!ok);
    assert!(out.contains("ALTERED"), "{out}");

    // The administrator revokes the device and publishes the list on the relay (the file
    // `revocation` in its data directory): consoles take it from there (they check its signature)
    // and refuse the device, which is still online.
    let list = dir.path().join("revocation");
    org(&[
        "revoke",
        "--key",
        s(&acme.key),
        "--list",
        s(&list),
        "--device",
        s(&dir.path().join("lab-1.device")),
    ]);
    let (rc, _, err) = connect(&relay, &token, &id, (&cert, &key), 1, &[]).await;
    assert_eq!(rc, 15, "{err}");
    assert!(err.contains("revoked"), "{err}");
    let (rc, ev, _) = console_with(
        &relay,
        &token,
        &["--list-devices", "--cert", s(&cert), "--cert-key", s(&key)],
    )
    .await;
    assert_eq!(rc, 0);
    assert_eq!(event(&ev, "devices")["count"], 0, "{ev:?}");
    assert_eq!(event(&ev, "devices")["rejected"], 1, "{ev:?}");
    drop(agent);
    relay.terminate().await;
}
