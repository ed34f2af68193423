//! Several relay nodes sharing one PostgreSQL (Debian's, a cluster of the test's own): the store's
//! two engines agree, a lone relay's SQLite store moves into PostgreSQL, technicians and codes are
//! the cluster's, a console that reaches another node than the agent's is sent there, a node's
//! loss and a database restart end or keep what they must.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::{Duration, Instant};
use tandem_client::RelayLink;
use tandem_proto::{ErrorCode, Secret};
use tandem_relay_server::Store;
use tandem_relay_server::store::{AuthOutcome, DeviceRow, SessionStart, StoreLocation};
use tandem_tests::postgres::Postgres;
use tandem_tests::{RelayProcess, binary, count_color, free_port, token_from_output};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const T: Duration = Duration::from_secs(30);

fn pg_store(pg: &Postgres) -> Store {
    Store::open_at(&StoreLocation::parse(&pg.url(), None).unwrap()).unwrap()
}

/// The PostgreSQL store, used from an async test: the store blocks (it is made for the relay's
/// blocking threads), so every call runs in a blocking section.
struct Blocking(Store);

impl Blocking {
    fn open(pg: &Postgres) -> Blocking {
        tokio::task::block_in_place(|| Blocking(pg_store(pg)))
    }
    fn run<T>(&mut self, f: impl FnOnce(&mut Store) -> T) -> T {
        tokio::task::block_in_place(|| f(&mut self.0))
    }
}

fn device(id: &str) -> DeviceRow {
    DeviceRow {
        id: id.into(),
        org_key: "k".into(),
        organisation: "ACME IT".into(),
        name: "front desk".into(),
        group: "reception".into(),
        hostname: "pc-1".into(),
        os: "linux".into(),
        user: "ann".into(),
        cert: "c".into(),
        presence: "p".into(),
        address: "192.0.2.7".into(),
        first_seen: 100,
        last_seen: 200,
        online: true,
    }
}

/// The same story on a store, whatever its engine; what it read back, for comparison.
fn exercise(mut s: Store) -> Vec<String> {
    let mut seen = Vec::new();
    let (alice, token) = s.add_technician("ACME IT", "alice").unwrap();
    let (bob, _) = s.add_technician("ACME IT", "bob").unwrap();
    assert!(matches!(
        s.add_technician("ACME IT", "alice"),
        Err(tandem_relay_server::store::StoreError::Exists { .. })
    ));
    assert_eq!(bob.id, alice.id + 1);
    assert!(matches!(
        s.authenticate(&token).unwrap(),
        AuthOutcome::Ok(_)
    ));
    s.set_disabled(alice.id, true).unwrap();
    assert_eq!(s.authenticate(&token).unwrap(), AuthOutcome::Disabled);
    s.set_disabled(alice.id, false).unwrap();
    let rotated = s.rotate_token(alice.id).unwrap();
    assert_eq!(s.authenticate(&token).unwrap(), AuthOutcome::BadToken);
    let AuthOutcome::Ok(tech) = s.authenticate(&rotated).unwrap() else {
        panic!("the new token works")
    };
    for t in s.list_technicians().unwrap() {
        seen.push(format!(
            "tech {} {} {} {}",
            t.id, t.name, t.organisation, t.disabled
        ));
    }
    let row = s
        .audit_start(&SessionStart {
            technician: &tech,
            slot: "417",
            agent_addr: "192.0.2.1:5000".into(),
            console_addr: "198.51.100.2:6000".into(),
            key: None,
        })
        .unwrap();
    s.audit_end(row, 1_000_000, 2_000, "ended_by_user", Some(500))
        .unwrap();
    // The same start written twice (a retry after the database went away mid-write): one row.
    let keyed = SessionStart {
        technician: &tech,
        slot: "419",
        agent_addr: "a".into(),
        console_addr: "c".into(),
        key: Some("run-1:7"),
    };
    let first = s.audit_start(&keyed).unwrap();
    assert_eq!(s.audit_start(&keyed).unwrap(), first);
    s.audit_end(first, 1, 1, "ended_by_user", None).unwrap();
    let open = s
        .audit_start(&SessionStart {
            technician: &tech,
            slot: "418",
            agent_addr: "a".into(),
            console_addr: "c".into(),
            key: None,
        })
        .unwrap();
    assert_eq!(s.close_dangling().unwrap(), 1);
    for a in s.audit(10).unwrap() {
        seen.push(format!(
            "audit {} {} {} {} {} {:?} {} {} {}",
            a.technician,
            a.slot,
            a.bytes_agent_to_console,
            a.bytes_console_to_agent,
            a.ended_at_ms.is_some(),
            a.end_reason,
            a.went_direct,
            a.bytes_direct,
            a.id == open
        ));
    }
    s.device_online(&device("d1")).unwrap();
    s.device_online(&device("d2")).unwrap();
    s.device_offline("d2", 300).unwrap();
    assert!(s.remove_device("d1").unwrap());
    assert!(!s.remove_device("d1").unwrap());
    for d in s.devices().unwrap() {
        seen.push(format!("device {} {} {}", d.id, d.online, d.last_seen));
    }
    // The slot directory: a code is one node's until it expires (the database's clock).
    assert!(s.slot_claim("417", "relay-1", "n1:4433", 60_000).unwrap());
    assert!(!s.slot_claim("417", "relay-2", "n2:4433", 60_000).unwrap());
    seen.push(format!("{:?}", s.slot_lookup("417").unwrap()));
    // Expired (claimed again by its node with a life already over): anyone's.
    assert!(s.slot_claim("417", "relay-1", "n1:4433", -1_000).unwrap());
    assert_eq!(s.slot_lookup("417").unwrap(), None);
    assert!(s.slot_claim("417", "relay-2", "n2:4433", 60_000).unwrap());
    seen.push(format!("{:?}", s.slot_lookup("417").unwrap()));
    // The cluster-wide join count.
    let allowed: Vec<i64> = (0..4).map(|_| s.join_attempt(7).unwrap()).collect();
    seen.push(format!("{allowed:?}"));
    seen
}

#[test]
fn the_two_engines_read_back_the_same() {
    let Some(pg) = Postgres::start() else { return };
    let sqlite = exercise(Store::open_in_memory().unwrap());
    let postgres = exercise(pg_store(&pg));
    assert_eq!(sqlite, postgres);
    // Lost nodes, on PostgreSQL: rows of a node silent past the cutoff end as node_lost.
    let s = pg_store(&pg).with_node("relay-9");
    let tech = tandem_relay_server::registry::Technician {
        id: 1,
        name: "alice".into(),
        organisation: "ACME IT".into(),
    };
    let start = |slot: &str| {
        s.audit_start(&SessionStart {
            technician: &tech,
            slot,
            agent_addr: "a".into(),
            console_addr: "c".into(),
            key: None,
        })
        .unwrap()
    };
    let before = start("999");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        s.node_join("relay-9", "n9:4433", "boot-a", 15_000).unwrap(),
        Ok(())
    );
    // A second node of the same name is refused while the first is alive.
    assert!(
        s.node_join("relay-9", "n9:4433", "boot-b", 15_000)
            .unwrap()
            .is_err()
    );
    assert!(
        s.node_heartbeat("relay-9", "n9:4433", "boot-a").unwrap(),
        "known"
    );
    assert!(s.slot_claim("555", "relay-9", "n9:4433", 600_000).unwrap());
    let after = start("998");
    assert_eq!(
        s.close_lost_nodes(60_000).unwrap(),
        0,
        "heard of within the minute"
    );
    assert_eq!(s.slot_lookup("555").unwrap().unwrap().0, "relay-9");
    // Silent "for -60 s": lost now.
    assert_eq!(s.close_lost_nodes(-60_000).unwrap(), 2);
    let rows = s.audit(50).unwrap();
    let row = |id| rows.iter().find(|a| a.id == id).unwrap();
    assert_eq!(row(before).end_reason.as_deref(), Some("node_lost"));
    let ended = row(before).ended_at_ms.unwrap();
    assert!(
        ended > row(before).started_at_ms,
        "ended when the node was last seen: {:?}",
        row(before)
    );
    // A row started after the node's last heartbeat ends when it started, not before.
    assert_eq!(row(after).ended_at_ms, Some(row(after).started_at_ms));
    // Its codes went with it; it was forgotten, and hears so at its next heartbeat.
    assert_eq!(s.slot_lookup("555").unwrap(), None);
    assert!(!s.node_heartbeat("relay-9", "n9:4433", "boot-a").unwrap());
}

/// Where a node's programs and data are.
struct Node {
    relay: Option<RelayProcess>,
    dir: tempfile::TempDir,
    port: u16,
    args: Vec<String>,
}

struct Cluster {
    pg: Postgres,
    nodes: Vec<Node>,
    pin: tandem_client::tandem_certs::Fingerprint,
}

impl Cluster {
    /// `n` relay nodes on one PostgreSQL, sharing one certificate (so one pin).
    async fn start(n: usize) -> Option<Cluster> {
        tandem_tests::init_logs();
        let pg = Postgres::start()?;
        let ids = pg.dir().join("identity");
        std::fs::create_dir_all(&ids).unwrap();
        let identity = tandem_client::tandem_certs::ensure_identity(&ids, &[]).unwrap();
        let cert = ids.join(tandem_client::tandem_certs::RELAY_CERT_FILE);
        let key = ids.join(tandem_client::tandem_certs::RELAY_KEY_FILE);
        let mut nodes = Vec::new();
        for i in 1..=n {
            let port = free_port();
            let args: Vec<String> = [
                "--store",
                &pg.url(),
                "--node",
                &format!("relay-{i}"),
                "--advertise",
                &format!("127.0.0.1:{port}"),
                "--cert",
                cert.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let dir = tempfile::tempdir().unwrap();
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let relay = RelayProcess::start_on(dir.path(), &a, port).await;
            nodes.push(Node {
                relay: Some(relay),
                dir,
                port,
                args,
            });
        }
        Some(Cluster {
            pg,
            nodes,
            pin: identity.fingerprint(),
        })
    }

    fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[i].port)
    }

    /// Every node, as a client's relay list.
    fn list(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.addr(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn opts(&self, relay: &str) -> tandem_client::ConnectOptions {
        tandem_client::ConnectOptions::new(
            relay,
            tandem_client::tandem_certs::RelayTrust::Pin(self.pin),
        )
    }

    /// An admin command run with node `i`'s configuration.
    fn admin(&self, i: usize, args: &[&str]) -> std::process::Output {
        std::process::Command::new(binary("tandem-relay"))
            .arg("--data-dir")
            .arg(self.nodes[i].dir.path())
            .args(&self.nodes[i].args)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn admin_ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.admin(i, args);
        assert!(
            out.status.success(),
            "tandem-relay {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn relay(&self, i: usize) -> &RelayProcess {
        self.nodes[i].relay.as_ref().unwrap()
    }

    async fn health(&self, i: usize) -> serde_json::Value {
        let (_, body) = tandem_tests::http_get(self.relay(i).metrics, "/health").await;
        serde_json::from_str(&body).unwrap()
    }
}

async fn login(
    c: &Cluster,
    node: usize,
    token: &Secret,
) -> Result<RelayLink, tandem_client::ClientError> {
    let mut link = RelayLink::connect(&c.opts(&c.addr(node))).await?;
    link.authenticate(token).await?;
    Ok(link)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn technicians_and_codes_are_the_clusters() {
    let Some(c) = Cluster::start(3).await else {
        return;
    };
    // Added through node 2's configuration, logs in on node 1 at once.
    let out = c.admin_ok(
        1,
        &["technician", "add", "--org", "ACME IT", "--name", "alice"],
    );
    let token = token_from_output(&out);
    login(&c, 0, &token)
        .await
        .expect("node 1 knows the technician added through node 2");
    // Disabled through node 3: refused on node 1 and node 2 at the next login.
    c.admin_ok(2, &["technician", "disable", "alice"]);
    for node in [0, 1] {
        let e = login(&c, node, &token).await.err().expect("refused");
        assert_eq!(e.code(), Some(ErrorCode::TechnicianDisabled), "{e}");
    }
    c.admin_ok(0, &["technician", "enable", "alice"]);
    login(&c, 2, &token).await.expect("enabled again");
    // Codes of different nodes never collide, and each is found on the node holding it.
    let mut store = Blocking::open(&c.pg);
    let mut agents = Vec::new();
    let mut slots = std::collections::HashSet::new();
    for i in 0..30 {
        let node = i % 3;
        let mut link = RelayLink::connect(&c.opts(&c.addr(node))).await.unwrap();
        let (slot, _) = link.register().await.unwrap();
        assert!(
            slots.insert(slot.as_str().to_string()),
            "code {slot:?} given twice"
        );
        let (holder, address) = store
            .run(|s| s.slot_lookup(slot.as_str()))
            .unwrap()
            .expect("in the directory");
        assert_eq!(holder, format!("relay-{}", node + 1));
        assert_eq!(address, c.addr(node));
        agents.push(link);
    }
    // Health and metrics say which store, per node.
    for i in 0..3 {
        let h = c.health(i).await;
        assert_eq!(h["status"], "ok", "{h}");
        assert_eq!(h["store"]["engine"], "postgres", "{h}");
        assert_eq!(h["store"]["state"], "ok", "{h}");
    }
    let status = c.admin_ok(0, &["store", "status"]);
    assert!(status.contains("engine:         postgres"), "{status}");
    assert!(status.contains("technicians:    1"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_relays_sqlite_store_moves_into_postgres() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = tandem_tests::relay_admin(
        dir.path(),
        &["technician", "add", "--org", "ACME IT", "--name", "alice"],
    );
    let token = token_from_output(&out);
    tandem_tests::relay_admin(
        dir.path(),
        &["technician", "add", "--org", "Other", "--name", "bob"],
    );
    {
        let s = Store::open(dir.path()).unwrap();
        let AuthOutcome::Ok(tech) = s.authenticate(token.expose()).unwrap() else {
            panic!()
        };
        let row = s
            .audit_start(&SessionStart {
                technician: &tech,
                slot: "123",
                agent_addr: "a".into(),
                console_addr: "c".into(),
                key: None,
            })
            .unwrap();
        s.audit_end(row, 10, 20, "ended_by_user", None).unwrap();
        s.device_online(&device("d1")).unwrap();
    }
    let from = format!("sqlite://{}/relay.db", dir.path().display());
    let copy = |args: &[&str]| {
        std::process::Command::new(binary("tandem-relay"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--store", &pg.url()])
            .args(args)
            .output()
            .unwrap()
    };
    let out = copy(&["store", "copy", "--from", &from]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("2 organisations, 2 technicians, 1 audit rows and 1 devices"),
        "{said}"
    );
    // Into a store that has rows: refused, nothing changes.
    let again = copy(&["store", "copy", "--from", &from]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("copy into an empty database"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // The old token works against PostgreSQL; new technicians get the next ids.
    let mut s = Blocking::open(&pg);
    assert!(matches!(
        s.run(|s| s.authenticate(token.expose())).unwrap(),
        AuthOutcome::Ok(_)
    ));
    let listed = copy(&["technician", "list", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2, "{rows}");
    let audit = copy(&["audit", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    assert_eq!(rows[0]["slot"], "123", "{rows}");
    assert_eq!(rows[0]["bytes_console_to_agent"], 20, "{rows}");
    let (carol, _) = s.run(|s| s.add_technician("ACME IT", "carol")).unwrap();
    assert_eq!(carol.id, 3);
    // A relay on the new store lets the technician in with the old token.
    let port = free_port();
    let relay = RelayProcess::start_on(
        dir.path(),
        &[
            "--store",
            &pg.url(),
            "--node",
            "relay-1",
            "--advertise",
            &format!("127.0.0.1:{port}"),
        ],
        port,
    )
    .await;
    let mut link = RelayLink::connect(&relay.opts()).await.unwrap();
    link.authenticate(&token).await.unwrap();
}

/// An agent (real program) on an X display, reaching the relay list `relay`.
async fn agent(
    c: &Cluster,
    relay: &str,
    display: &str,
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    tempfile::TempDir,
) {
    let state = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(binary("tandem-agent"));
    for v in [
        "DISPLAY",
        "WAYLAND_DISPLAY",
        "XDG_SESSION_TYPE",
        "XDG_CURRENT_DESKTOP",
    ] {
        cmd.env_remove(v);
    }
    let mut child = cmd
        .env("TANDEM_AGENT_STATE_DIR", state.path())
        .args(["--display", display])
        .args(["--relay", relay, "--relay-pin", &c.pin.to_string()])
        .args(["--consent", "allow", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines, state)
}

async fn next_event(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    kind: &str,
    within: Duration,
) -> serde_json::Value {
    tokio::time::timeout(within, async {
        loop {
            let line = lines.next_line().await.unwrap().expect("agent exited");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v["event"] == kind {
                return v;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind} event from the agent"))
}

fn console(c: &Cluster, node: usize, token: &str, code: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(binary("tandem-console"));
    cmd.args(["--relay", &c.addr(node), "--relay-pin", &c.pin.to_string()])
        .args(["--token", token, "--code", code])
        .args(["--headless", "--json", "--no-remember"])
        .args(extra)
        .stderr(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// The node the directory says holds `code`'s agent.
fn holder(store: &mut Blocking, code: &str) -> String {
    let code = tandem_session::SessionCode::parse(code).unwrap();
    store
        .run(|s| s.slot_lookup(code.slot().as_str()))
        .unwrap()
        .expect("the code is in the directory")
        .0
}

fn events(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Agent on node 1, console on node 3: the console is sent to node 1 and the session runs with
/// pixels and input. Then node 1 dies mid-session: the session ends with a reason on both sides,
/// the agent shows a new code from another node, and the other nodes close the audit row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_on_another_node_reaches_the_agent_and_a_lost_node_is_survived() {
    let Some(mut c) = Cluster::start(3).await else {
        return;
    };
    let token = token_from_output(&c.admin_ok(
        1,
        &["technician", "add", "--org", "ACME IT", "--name", "alice"],
    ))
    .expose()
    .to_string();
    let x = tandem_tests::x11::Xvfb::start(800, 600);
    let rec = tandem_tests::x11::XRecorder::start_drawing(&x);
    let (mut agent_proc, mut agent_ev, _state) = agent(&c, &c.list(), &x.display).await;
    let code = next_event(&mut agent_ev, "code", T).await["code"]
        .as_str()
        .unwrap()
        .to_string();
    let mut store = Blocking::open(&c.pg);
    assert_eq!(
        holder(&mut store, &code),
        "relay-1",
        "the agent is on node 1"
    );

    let work = tempfile::tempdir().unwrap();
    let script = work.path().join("script.txt");
    std::fs::write(
        &script,
        "click left 400 300\nwait 100\nkey h\nkey i\ntype !\nkey Enter\nwait 1500\n",
    )
    .unwrap();
    let png = work.path().join("seen.png");
    let out = tokio::time::timeout(
        T,
        console(
            &c,
            2,
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
        .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let ev = events(&out);
    assert!(out.status.success(), "{ev:?}");
    let got = rec.keys_and_buttons();
    let press = got
        .iter()
        .find(|e| e.kind == tandem_tests::x11::Kind::ButtonPress)
        .expect("the click reached the agent's X server");
    assert_eq!((press.detail, press.x, press.y), (1, 400, 300));
    let seen = tandem_tests::read_png(&png);
    assert!(
        count_color(&seen, 0xff00ff, 40, (380, 280, 40, 40)) > 1000,
        "the click's block is in the console's picture"
    );
    assert!(
        count_color(&seen, 0x00c000, 40, (20, 20, 200, 16)) >= 600,
        "the keys' blocks are in the console's picture"
    );
    // The redirect is counted by node 3.
    let (_, metrics) = tandem_tests::http_get(c.relay(2).metrics, "/metrics").await;
    assert!(
        tandem_tests::metric(
            &metrics,
            "tandem_relay_directory_events_total{reason=\"redirect\"}"
        ) >= 1.0,
        "{metrics}"
    );

    // A second session, on the relay path, and node 1 dies in it.
    let code = next_event(&mut agent_ev, "code", T).await["code"]
        .as_str()
        .unwrap()
        .to_string();
    let mut cmd = console(
        &c,
        1,
        &token,
        &code,
        &["--seconds", "60", "--path", "relay-only"],
    );
    let running = tokio::spawn(async move { cmd.output().await });
    next_event(&mut agent_ev, "session", T).await;
    // Past one checkpoint of the running session's bytes (every 10 s).
    tokio::time::sleep(Duration::from_secs(11)).await;
    let killed_at = Instant::now();
    let mut dead = c.nodes[0].relay.take().unwrap();
    dead.child.kill().await.unwrap();
    // The console notices the lost link (QUIC idle timeout), tries to resume for the grace
    // period, then ends.
    let out = tokio::time::timeout(T * 2, running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let ev = events(&out);
    assert!(!out.status.success(), "the console's session ended: {ev:?}");
    let ended = ev.iter().find(|e| e["event"] == "ended").expect("ended");
    assert!(
        ended["message"].as_str().unwrap().len() > 20,
        "a reason: {ended:?}"
    );
    next_event(&mut agent_ev, "ended", T).await;
    let again = next_event(&mut agent_ev, "code", T).await;
    let back_on = holder(&mut store, again["code"].as_str().unwrap());
    assert_ne!(back_on, "relay-1", "the agent came back on a live node");
    eprintln!(
        "agent back on {back_on} with a new code {:.1} s after node 1 died",
        killed_at.elapsed().as_secs_f64()
    );
    // The live nodes notice node 1's silence and close its session's audit row.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let rows = store.run(|s| s.audit(10)).unwrap();
        let lost: Vec<_> = rows
            .iter()
            .filter(|r| r.end_reason.as_deref() == Some("node_lost"))
            .collect();
        if let Some(r) = lost.first() {
            assert!(r.ended_at_ms.unwrap() >= r.started_at_ms, "{r:?}");
            assert_eq!(r.technician, "alice");
            // Checkpointed while it ran: the picture went through node 1 before it died.
            assert!(r.bytes_agent_to_console > 10_000, "{r:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no node_lost row: {rows:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = agent_proc.kill().await;
    for n in c.nodes.iter_mut() {
        if let Some(r) = n.relay.take() {
            r.terminate().await;
        }
    }
}

/// PostgreSQL restarts under a paired session: the session keeps forwarding, logins are answered
/// "busy, retry" meanwhile, `/health` says degraded, and the audit row written while it was down
/// arrives once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_does_not_stop_sessions_or_lose_audit_rows() {
    let Some(c) = Cluster::start(2).await else {
        return;
    };
    let token = token_from_output(&c.admin_ok(
        0,
        &["technician", "add", "--org", "ACME IT", "--name", "alice"],
    ));
    let opts = c.opts(&c.addr(0));
    let mut agent = RelayLink::connect(&opts).await.unwrap();
    let (slot, _) = agent.register().await.unwrap();
    let mut console = RelayLink::connect(&opts).await.unwrap();
    console.authenticate(&token).await.unwrap();
    console.join(&slot).await.unwrap();
    agent.wait_paired().await.unwrap();
    tandem_tests::datagram_arrives(&agent, &console, 900).await;

    c.pg.stop();
    // Forwarding never waits on the database.
    for _ in 0..5 {
        tandem_tests::datagram_arrives(&agent, &console, 900).await;
        tandem_tests::datagram_arrives(&console, &agent, 300).await;
    }
    let e = login(&c, 1, &token)
        .await
        .err()
        .expect("no login without the database");
    assert_eq!(e.code(), Some(ErrorCode::Busy), "{e}");
    assert!(e.retry_after().is_some(), "{e}");
    // The session ends while the database is down: its audit row waits.
    agent
        .end(tandem_proto::EndReason::EndedByUser)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let h = c.health(0).await;
        if h["store"]["state"] == "unavailable" {
            assert_eq!(h["status"], "degraded", "{h}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "health never said the store is down: {h}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    c.pg.start_again();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = Blocking::open(&c.pg).run(|s| s.audit(5)).unwrap();
        if rows.first().is_some_and(|r| r.ended_at_ms.is_some()) {
            assert_eq!(
                rows[0].end_reason.as_deref(),
                Some("ended_by_user"),
                "{rows:?}"
            );
            assert!(rows[0].bytes_agent_to_console >= 900 * 6, "{rows:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the audit row never arrived: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Logins work again, on both nodes.
    login(&c, 0, &token).await.unwrap();
    login(&c, 1, &token).await.unwrap();
    let h = c.health(0).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut h = h;
    while h["store"]["state"] != "ok" {
        assert!(Instant::now() < deadline, "{h}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        h = c.health(0).await;
    }
    assert_eq!(h["status"], "ok");
}
