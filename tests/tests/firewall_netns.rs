//! Reaching the relay through real firewalls and proxies: the real `tandem-relay`, `tandem-agent`
//! and `tandem-console` in Linux network namespaces, nftables dropping UDP (silently, as firewalls
//! do) or everything but TCP 443, tinyproxy as the HTTP CONNECT proxy and nginx as the reverse
//! proxy configured from `relay/dist/nginx-tandem.conf` as shipped. Root only: elsewhere each test
//! says why it is skipped and passes. Every test builds its own networks:
//!
//! ```text
//!   agent   A 10.231.1.2 ── 10.231.1.1 ┐
//!                                      R  relay (nginx, when there is one)
//!   console C 10.231.2.2 ── 10.231.2.1 ┘
//!   proxy   P 10.231.3.2 ── 10.231.3.1    (R routes between A and P)
//! ```
//!
//! The firewalls sit on R's end of a client's cable (nftables, netdev ingress): what they drop
//! leaves the client and is never answered.
//!
//! The agent shares an Xvfb screen of the root namespace (X11 reaches it through the filesystem
//! socket); the console is headless and reports JSON events, whose `stats` name each side's link.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tandem_tests::netns::{self, Netns};
use tandem_tests::nsprocs::{
    Events, METRICS, PORT, Relay, T, clean_env, start_console_in, start_relay,
};
use tandem_tests::{binary, count_color, metric, relay_admin};
/// The relay as the agent's network sees it.
const RELAY_A: &str = "10.231.1.1";
const AGENT: &str = "10.231.1.2";
/// The relay as the console's network sees it.
const RELAY_C: &str = "10.231.2.1";
const PROXY: &str = "10.231.3.2";

/// Prints why and returns from the test when namespaces cannot be made here (not root).
macro_rules! skip_without_netns {
    () => {
        if let Some(why) = netns::skip_reason() {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
}

/// The namespaces of one test (see the module's picture).
struct Net {
    r: Netns,
    a: Netns,
    c: Netns,
    p: Option<Netns>,
}

impl Net {
    fn new(with_proxy: bool) -> Net {
        let r = Netns::new("r");
        let a = Netns::new("a");
        let c = Netns::new("c");
        netns::link(&r, "10.231.1.1/30", &a, "10.231.1.2/30");
        netns::link(&r, "10.231.2.1/30", &c, "10.231.2.2/30");
        a.default_route(RELAY_A);
        c.default_route(RELAY_C);
        let p = with_proxy.then(|| {
            let p = Netns::new("p");
            netns::link(&r, "10.231.3.1/30", &p, "10.231.3.2/30");
            p.default_route("10.231.3.1");
            r.sysctl("net.ipv4.ip_forward", "1");
            p
        });
        Net { r, a, c, p }
    }

    /// A firewall on the uplink of a client's network (`client`: A or C), with nftables `rules`
    /// (one a line) for the IPv4 packets the client sends; ARP and the like pass. The rules sit on
    /// R's end of the client's cable (netdev ingress hook), so what they drop leaves the client and
    /// vanishes, as at a firewall on the way: a drop in the client's own output hook would fail its
    /// send at once with EPERM, which no firewall on the way does.
    fn firewall(&self, client: &Netns, rules: &str) {
        let dev = format!("v{}", client.tag);
        self.r.nft(&format!(
            "table netdev tnd_fw_{dev} {{\n\
             chain uplink {{\n\
             type filter hook ingress device \"{dev}\" priority 0; policy accept;\n\
             meta protocol != ip accept\n\
             {rules}\n\
             }}\n\
             }}\n"
        ));
    }

    /// Waits (bounded) until the relay's metric `name` (with its labels) is `value`; returns all
    /// metrics.
    async fn wait_metric(&self, name: &str, value: f64) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, m) = self.r.http_get(METRICS, "/metrics");
            if metric(&m, name) == value {
                return m;
            }
            assert!(Instant::now() < deadline, "{name} is not {value}: {m}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Takes the firewall of `client`'s uplink away.
    fn open_firewall(&self, client: &Netns) {
        let table = format!("tnd_fw_v{}", client.tag);
        self.r.exec("nft", &["delete", "table", "netdev", &table]);
    }
}

/// Firewall rules: UDP to the relay is dropped.
fn drop_udp_to(relay: &str) -> String {
    format!("ip daddr {relay} meta l4proto udp drop")
}

/// Firewall rules: nothing gets through but TCP to port 443.
const ONLY_TCP_443: &str = "tcp dport 443 accept\ndrop";

/// A headless agent in A that shares `display` and allows control by itself.
fn start_agent(
    net: &Net,
    relay: &Relay,
    display: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    state: &Path,
) -> Events {
    let mut cmd = net.a.command(binary("tandem-agent"));
    clean_env(&mut cmd);
    cmd.env("TANDEM_AGENT_STATE_DIR", state)
        .args(["--relay", &format!("{RELAY_A}:{PORT}")])
        .args(["--relay-pin", &relay.pin])
        .args(["--display", display, "--headless", "--json"])
        .args(["--consent", "allow"])
        .args(extra)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    Events::new(cmd.spawn().unwrap(), "agent")
}

/// A headless console in C that joins `code` (JSON events on its stdout).
fn start_console(net: &Net, relay: &Relay, code: &str, extra: &[&str]) -> Events {
    start_console_in(&net.c, RELAY_C, relay, code, extra)
}

fn stats(ev: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    ev.iter().filter(|e| e["event"] == "stats").collect()
}

/// Every stats event names these transports (console's link, agent's link), and there is one.
fn assert_transports(ev: &[serde_json::Value], console: &str, agent: &str) {
    let s = stats(ev);
    assert!(!s.is_empty(), "no stats from the console: {ev:?}");
    for e in &s {
        assert_eq!(
            (
                e["console_transport"].as_str(),
                e["agent_transport"].as_str()
            ),
            (Some(console), Some(agent)),
            "{e}"
        );
    }
    let path = if console == agent {
        format!("relay ({console})")
    } else {
        format!("relay (console {console}, agent {agent})")
    };
    assert_eq!(s[0]["path"], path.as_str(), "{}", s[0]);
}

/// What a whole session showed.
struct Session {
    /// The console's events.
    events: Vec<serde_json::Value>,
    /// Agent start → connected to the relay (the race between QUIC and TCP, when UDP is dropped).
    agent_connect: Duration,
    /// The console's `join_to_first_frame_ms` (counted from its start, its own connection to the
    /// relay included).
    first_frame_ms: f64,
    /// The agent, still running (with a new code).
    _agent: Events,
}

/// A whole session with pixels and input: the agent in A shares an Xvfb screen with a window that
/// draws what it receives; the console in C joins, clicks and types, and keeps the last picture.
/// Checks that the click and keys reached the agent's X server and that the console's picture
/// shows what they drew.
async fn full_session(
    net: &Net,
    relay: &Relay,
    agent_extra: &[&str],
    agent_env: &[(&str, &str)],
) -> Session {
    let x = tandem_tests::x11::Xvfb::start(800, 600);
    let rec = tandem_tests::x11::XRecorder::start_drawing(&x);
    let state = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let mut agent = start_agent(net, relay, &x.display, agent_extra, agent_env, state.path());
    agent.next("connected").await;
    let agent_connect = t0.elapsed();
    let code = agent.next("code").await["code"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.txt");
    std::fs::write(
        &script,
        "click left 400 300\nwait 100\nkey h\nkey i\ntype !\nkey Enter\nwait 1500\n",
    )
    .unwrap();
    let png = dir.path().join("seen.png");
    let args = [
        "--input-script",
        script.to_str().unwrap(),
        "--seconds",
        "5",
        "--png",
        png.to_str().unwrap(),
    ];
    let mut console = start_console(net, relay, &code, &args);
    let first = console.next("first_frame").await;
    let first_frame_ms = first["join_to_first_frame_ms"].as_f64().unwrap();
    let (rc, events) = console.finish().await;
    assert_eq!(rc, 0, "{events:?}");
    assert!(
        events.iter().any(|e| e["event"] == "script"),
        "the input script ran: {events:?}"
    );
    // The input reached the agent's X server…
    let got = rec.keys_and_buttons();
    let press = got
        .iter()
        .find(|e| e.kind == tandem_tests::x11::Kind::ButtonPress)
        .expect("the click reached the agent's X server");
    assert_eq!((press.detail, press.x, press.y), (1, 400, 300));
    let keys = got
        .iter()
        .filter(|e| e.kind == tandem_tests::x11::Kind::KeyPress)
        .count();
    assert!(keys >= 4, "h, i, ! and Enter: {got:?}");
    // …and the technician saw what it drew: the click's magenta block and the keys' green ones.
    let seen = tandem_tests::read_png(&png);
    assert_eq!((seen.width, seen.height), (800, 600));
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
    assert_eq!(agent.next("ended").await["reason"], "ended_by_technician");
    agent.next("code").await;
    Session {
        events,
        agent_connect,
        first_frame_ms,
        _agent: agent,
    }
}

/// UDP from the agent's network to the relay is dropped without an answer: the agent's QUIC
/// attempt hears nothing, TCP (started 300 ms later) wins the race, and the whole session runs
/// with the agent on TLS over TCP and the console on QUIC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_with_udp_dropped_gets_a_session_over_tcp() {
    skip_without_netns!();
    let net = Net::new(false);
    let relay = start_relay(&net.r, &[]).await;
    net.firewall(&net.a, &drop_udp_to(RELAY_A));
    let s = full_session(&net, &relay, &[], &[]).await;
    assert_transports(&s.events, "quic", "tcp");
    eprintln!(
        "UDP dropped: agent start -> connected over TCP {:.0} ms; join -> first frame {:.0} ms",
        s.agent_connect.as_secs_f64() * 1e3,
        s.first_frame_ms
    );
    // Decided by the race, not by QUIC's 10 s connect timeout.
    assert!(
        s.agent_connect < Duration::from_secs(5),
        "the agent took {:?} to reach the relay",
        s.agent_connect
    );
    assert!(
        s.first_frame_ms < 5000.0,
        "first frame after {} ms",
        s.first_frame_ms
    );
    // The agent, waiting with a new code, holds one TLS-over-TCP link (its new connection's).
    net.wait_metric("tandem_relay_tcp_links{transport=\"tcp\"}", 1.0)
        .await;
}

/// The relay serves QUIC on UDP 4433 and TCP only on 443; both sides' networks let nothing out
/// but TCP to port 443. Given only `--relay R:4433`, each side tries QUIC, then TCP on 4433
/// (dropped), then TCP on 443, and the session runs with both on TLS over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_with_only_tcp_443_open() {
    skip_without_netns!();
    let net = Net::new(false);
    let relay = start_relay(&net.r, &["--tcp-listen", "0.0.0.0:443"]).await;
    net.firewall(&net.a, ONLY_TCP_443);
    net.firewall(&net.c, ONLY_TCP_443);
    let s = full_session(&net, &relay, &[], &[]).await;
    assert_transports(&s.events, "tcp", "tcp");
    eprintln!(
        "only TCP 443: agent start -> connected {:.0} ms; join -> first frame {:.0} ms",
        s.agent_connect.as_secs_f64() * 1e3,
        s.first_frame_ms
    );
    assert!(
        s.agent_connect < Duration::from_secs(5),
        "{:?}",
        s.agent_connect
    );
    assert!(s.first_frame_ms < 5000.0, "{}", s.first_frame_ms);
}

/// The agent's network reaches nothing but an HTTP proxy (tinyproxy), named by `HTTPS_PROXY`: the
/// agent's link is TLS over TCP through the proxy's CONNECT tunnel, and the proxy's log shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_http_proxy_reachable() {
    skip_without_netns!();
    let net = Net::new(true);
    let p = net.p.as_ref().unwrap();
    let relay = start_relay(&net.r, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("tinyproxy.log");
    let conf = dir.path().join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "Port 8888\nListen {PROXY}\nTimeout 600\nAllow 10.231.0.0/16\nConnectPort {PORT}\n\
             MaxClients 50\nLogLevel Connect\nLogFile \"{}\"\n",
            log.display()
        ),
    )
    .unwrap();
    let _proxy = p
        .command("tinyproxy")
        .arg("-d")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("tinyproxy is not installed: run scripts/deps.sh");
    p.wait_listening(&format!("{PROXY}:8888"), Duration::from_secs(10))
        .await;
    // Nothing leaves A but TCP to the proxy.
    net.firewall(
        &net.a,
        &format!("ip daddr {PROXY} tcp dport 8888 accept\ndrop"),
    );
    let proxy_url = format!("http://{PROXY}:8888");
    let s = full_session(&net, &relay, &[], &[("HTTPS_PROXY", &proxy_url)]).await;
    assert_transports(&s.events, "quic", "tcp");
    eprintln!(
        "through tinyproxy: agent start -> connected {:.0} ms; join -> first frame {:.0} ms",
        s.agent_connect.as_secs_f64() * 1e3,
        s.first_frame_ms
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains(&format!("CONNECT {RELAY_A}:{PORT}")),
        "tinyproxy carried no CONNECT to the relay: {text}"
    );
    // The agent, waiting with a new code, holds one TLS-over-TCP link through the proxy.
    net.wait_metric("tandem_relay_tcp_links{transport=\"tcp\"}", 1.0)
        .await;
}

/// nginx in R terminates TLS on 443 with its own certificate (from a CA the agent trusts through
/// SSL_CERT_FILE) and passes the WebSocket at /tandem to the relay's TCP port on loopback, as
/// `relay/dist/nginx-tandem.conf` says. The agent's network allows only TCP 443; the relay trusts
/// nginx's X-Forwarded-For and so knows the agent's real address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_behind_nginx_with_websocket() {
    skip_without_netns!();
    let net = Net::new(false);
    let dir = tempfile::tempdir().unwrap();
    let relay_cfg = dir.path().join("relay.toml");
    std::fs::write(
        &relay_cfg,
        format!("[tcp]\nlisten = [\"127.0.0.1:{PORT}\"]\ntrusted_proxies = [\"127.0.0.1\"]\n"),
    )
    .unwrap();
    let relay = start_relay(&net.r, &["--config", relay_cfg.to_str().unwrap()]).await;

    // nginx's certificate for 10.231.1.1, from a CA of the test's own.
    let certs = tandem_certs::generate(&[RELAY_A.to_string()]).unwrap();
    let ca = dir.path().join("test-ca.pem");
    std::fs::write(&ca, &certs.ca_pem).unwrap();
    std::fs::write(dir.path().join("proxy-cert.pem"), &certs.relay_pem).unwrap();
    std::fs::write(dir.path().join("proxy-key.pem"), &certs.relay_key_pem).unwrap();
    let conf = nginx_config(dir.path());
    let _ = net.r.exec(
        "nginx",
        &[
            "-t",
            "-q",
            "-p",
            &dir_arg(dir.path()),
            "-c",
            &conf,
            "-e",
            &format!("{}/error.log", dir.path().display()),
        ],
    );
    let _nginx = net
        .r
        .command("nginx")
        .args(["-p", &dir_arg(dir.path()), "-c", &conf])
        .arg("-e")
        .arg(dir.path().join("error.log"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("nginx is not installed: run scripts/deps.sh");
    net.r
        .wait_listening("127.0.0.1:443", Duration::from_secs(10))
        .await;
    net.firewall(&net.a, ONLY_TCP_443);

    let ca_path = ca.to_str().unwrap();
    let ws = format!("wss://{RELAY_A}/tandem");
    let s = full_session(
        &net,
        &relay,
        &["--relay-websocket", &ws],
        &[("SSL_CERT_FILE", ca_path)],
    )
    .await;
    assert_transports(&s.events, "quic", "websocket");
    eprintln!(
        "through nginx: agent start -> connected {:.0} ms; join -> first frame {:.0} ms",
        s.agent_connect.as_secs_f64() * 1e3,
        s.first_frame_ms
    );
    // The agent, waiting with a new code, holds one WebSocket link; none is TLS over TCP.
    let m = net
        .wait_metric("tandem_relay_tcp_links{transport=\"websocket\"}", 1.0)
        .await;
    assert!(
        metric(
            &m,
            "tandem_relay_connections_accepted_total{transport=\"websocket\"}"
        ) >= 2.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "tandem_relay_tcp_links{transport=\"tcp\"}"),
        0.0,
        "{m}"
    );
    // The relay's TCP port listens on loopback only: the WebSocket came through nginx, whose
    // X-Forwarded-For named the agent.
    let audit: serde_json::Value =
        serde_json::from_str(&relay_admin(relay.dir.path(), &["audit", "--json"])).unwrap();
    let row = &audit[0];
    let agent_addr = row["agent_addr"].as_str().unwrap();
    assert!(
        agent_addr.starts_with(&format!("{AGENT}:")) && agent_addr.contains("websocket"),
        "the relay's audit log names the agent's own address: {row}"
    );
    assert!(
        row["console_addr"]
            .as_str()
            .unwrap()
            .starts_with("10.231.2.2:"),
        "{row}"
    );
}

/// `-p` wants the prefix with a trailing slash.
fn dir_arg(dir: &Path) -> String {
    format!("{}/", dir.display())
}

/// An nginx main configuration in `dir` that includes `relay/dist/nginx-tandem.conf` with the
/// test's certificate paths and relay port put in; returns its path.
fn nginx_config(dir: &Path) -> String {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../relay/dist/nginx-tandem.conf");
    let mut site = std::fs::read_to_string(&shipped).unwrap();
    for (from, to) in [
        (
            "/etc/letsencrypt/live/remote.example.com/fullchain.pem".to_string(),
            dir.join("proxy-cert.pem").display().to_string(),
        ),
        (
            "/etc/letsencrypt/live/remote.example.com/privkey.pem".to_string(),
            dir.join("proxy-key.pem").display().to_string(),
        ),
        (
            "proxy_pass https://127.0.0.1:4433;".to_string(),
            format!("proxy_pass https://127.0.0.1:{PORT};"),
        ),
    ] {
        assert!(
            site.contains(&from),
            "{} no longer contains {from:?}; update this test with it",
            shipped.display()
        );
        site = site.replace(&from, &to);
    }
    if !Path::new("/proc/sys/net/ipv6").exists() {
        // A kernel without IPv6 cannot bind [::]:443.
        site = site.replace("listen [::]:443 ssl;", "");
    }
    std::fs::write(dir.join("tandem.conf"), site).unwrap();
    let d = dir.display();
    let main = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log info;\nevents {{ worker_connections 256; }}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n\
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n\
         scgi_temp_path {d}/scgi;\n  include {d}/tandem.conf;\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, main).unwrap();
    path.display().to_string()
}

/// The agent starts with UDP dropped, so its link is TLS over TCP; then the firewall opens. The
/// link's next UDP probe (5 s after it connected, then 10 and 20 s after the one before) succeeds,
/// it moves to QUIC (a connection migration) and, once UDP has kept answering for 10 s, says so:
/// the console's stats show it within 45 s (15 s when the firewall opens before the first probe,
/// as it does here), the agent closes its TCP link, frames keep coming and nothing ends or drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_unblocked_during_a_session_moves_to_quic() {
    skip_without_netns!();
    let net = Net::new(false);
    let relay = start_relay(&net.r, &[]).await;
    net.firewall(&net.a, &drop_udp_to(RELAY_A));
    // A screen that changes every second (the demo desktop's clock), so frames keep coming.
    let x = tandem_tests::x11::Xvfb::start(640, 480);
    let mut scene = std::process::Command::new(binary("tandem-demo-screen"))
        .arg(&x.display)
        .spawn()
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut agent = start_agent(&net, &relay, &x.display, &[], &[], state.path());
    agent.next("connected").await;
    let connected = Instant::now();
    let code = agent.next("code").await["code"]
        .as_str()
        .unwrap()
        .to_string();
    let mut console = start_console(&net, &relay, &code, &["--seconds", "120"]);
    // Frames flow with the agent's link on TCP.
    let on_tcp = console
        .until("frames with the agent on TCP", T, |e| {
            e["event"] == "stats"
                && e["agent_transport"] == "tcp"
                && e["frames"].as_u64().is_some_and(|f| f >= 2)
        })
        .await;
    assert_eq!(on_tcp["console_transport"], "quic", "{on_tcp}");
    net.open_firewall(&net.a);
    let opened = Instant::now();
    eprintln!(
        "UDP opened {:.1} s after the agent connected over TCP",
        (opened - connected).as_secs_f64()
    );
    let moved = console
        .until(
            "stats with the agent on QUIC",
            Duration::from_secs(45),
            |e| e["event"] == "stats" && e["agent_transport"] == "quic",
        )
        .await;
    let took = opened.elapsed();
    eprintln!(
        "UDP opened -> agent's link on QUIC after {:.1} s",
        took.as_secs_f64()
    );
    assert_eq!(moved["path"], "relay (quic)", "{moved}");
    // Frames came while the agent's link was on TCP.
    let on_tcp_frames = stats(&console.seen)
        .iter()
        .filter(|e| e["agent_transport"] == "tcp")
        .filter_map(|e| e["frames"].as_u64())
        .max()
        .unwrap_or(0);
    assert!(on_tcp_frames >= 3, "frames over TCP: {on_tcp_frames}");
    // Frames keep coming after the move.
    let at_move = moved["frames"].as_u64().unwrap();
    console
        .until("frames after the move", Duration::from_secs(15), |e| {
            e["event"] == "stats" && e["frames"].as_u64().is_some_and(|f| f >= at_move + 3)
        })
        .await;
    // The agent closed its TCP link (after a while for packets already on their way), so the
    // session's packets all travel over UDP now, and the session is still the one it was.
    let m = net
        .wait_metric("tandem_relay_tcp_links{transport=\"tcp\"}", 0.0)
        .await;
    assert_eq!(metric(&m, "tandem_relay_sessions"), 1.0, "{m}");
    assert_eq!(
        metric(&m, "tandem_relay_sessions_started_total"),
        1.0,
        "{m}"
    );
    // The technician ends the session: it ran through the move without a break.
    let pid = console.child.id().unwrap();
    netns::run(std::process::Command::new("kill").args(["-INT", &pid.to_string()]));
    let (rc, ev) = console.finish().await;
    assert_eq!(rc, 0, "{ev:?}");
    assert!(
        !ev.iter().any(|e| e["event"] == "link"),
        "the console's link dropped: {ev:?}"
    );
    let after: Vec<_> = stats(&ev)
        .into_iter()
        .skip_while(|e| e["agent_transport"] != "quic")
        .collect();
    assert!(
        after.iter().all(|e| e["agent_transport"] == "quic"),
        "the link went back to TCP: {after:?}"
    );
    let ended = agent.next("ended").await;
    assert_eq!(ended["reason"], "ended_by_technician", "{ended}");
    for e in &agent.seen {
        assert!(
            !matches!(
                e["event"].as_str(),
                Some("link_lost" | "link_resumed" | "peer_suspended")
            ),
            "the session broke during the move: {:?}",
            agent.seen
        );
    }
    let _ = scene.kill();
    let _ = scene.wait();
}

/// `tandem-agent --check` in A with the given firewall state and pin; (exit code, JSON report).
async fn agent_check(net: &Net, pin: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let mut cmd = net.a.command(binary("tandem-agent"));
    clean_env(&mut cmd);
    cmd.args(["--relay", &format!("{RELAY_A}:{PORT}")])
        .args(["--relay-pin", pin])
        .args(["--check", "--json"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let out = tokio::time::timeout(T, cmd.output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("not a JSON report ({e}): {text}"));
    (out.status.code().unwrap_or(-1), report)
}

fn verdict<'a>(report: &'a serde_json::Value, what: &str) -> &'a str {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["what"] == what)
        .unwrap_or_else(|| panic!("no step {what}: {report}"))["verdict"]
        .as_str()
        .unwrap()
}

/// `--check` tells an open network, a network that drops UDP, one where only TCP 443 is open
/// and a relay whose certificate does not match the pin apart, in the words a user reads out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_udp_blocked_and_a_wrong_pin() {
    skip_without_netns!();
    let net = Net::new(false);
    let relay = start_relay(
        &net.r,
        &["--tcp-listen", &format!("0.0.0.0:{PORT},0.0.0.0:443")],
    )
    .await;

    let (rc, r) = agent_check(&net, &relay.pin, &[]).await;
    assert_eq!(rc, 0, "{r}");
    assert!(
        r["summary"]
            .as_str()
            .unwrap()
            .starts_with(&format!("UDP {PORT} OK: connected over QUIC")),
        "{r}"
    );
    assert_eq!(verdict(&r, "certificate"), "OK");
    assert_eq!(verdict(&r, "TCP 443"), "OK");
    assert_eq!(verdict(&r, "clock"), "OK");
    // No display in the test's environment: said, without failing the connection.
    assert_eq!(verdict(&r, "display"), "FAIL");

    net.firewall(&net.a, &drop_udp_to(RELAY_A));
    let (rc, r) = agent_check(&net, &relay.pin, &[]).await;
    assert_eq!(rc, 0, "{r}");
    assert_eq!(verdict(&r, &format!("UDP {PORT}")), "FAIL");
    assert!(
        r["summary"]
            .as_str()
            .unwrap()
            .starts_with(&format!("UDP blocked, using TCP {PORT}: OK")),
        "{r}"
    );
    // The relay's clock is asked over TCP too.
    assert_eq!(verdict(&r, "clock"), "OK");

    net.open_firewall(&net.a);
    net.firewall(&net.a, ONLY_TCP_443);
    let (rc, r) = agent_check(&net, &relay.pin, &[]).await;
    assert_eq!(rc, 0, "{r}");
    // Blocked, but the relay was reached on 443: a caveat, not a failure.
    assert_eq!(verdict(&r, &format!("TCP {PORT}")), "WARN");
    assert!(
        r["summary"]
            .as_str()
            .unwrap()
            .starts_with("UDP blocked, using TCP 443: OK"),
        "{r}"
    );

    // Another relay's pin (as if the relay had been swapped): never "unreachable".
    let wrong = format!("sha256:{}", "ab".repeat(32));
    net.open_firewall(&net.a);
    let (rc, r) = agent_check(&net, &wrong, &[]).await;
    assert_eq!(rc, 1, "{r}");
    assert_eq!(verdict(&r, "certificate"), "FAIL");
    assert!(
        r["summary"]
            .as_str()
            .unwrap()
            .contains("does not match the pin"),
        "{r}"
    );

    // The console's --check: the same report; exit codes 0 and 14 (relay not trusted).
    for (pin, expected) in [(relay.pin.as_str(), 0), (wrong.as_str(), 14)] {
        let mut cmd = net.c.command(binary("tandem-console"));
        clean_env(&mut cmd);
        let cfg = tempfile::tempdir().unwrap();
        cmd.args(["--relay", &format!("{RELAY_C}:{PORT}")])
            .args(["--relay-pin", pin])
            .args(["--check", "--json", "--headless"])
            .arg("--config")
            .arg(cfg.path().join("console.toml"))
            .stdin(Stdio::null());
        let out = tokio::time::timeout(T, cmd.output())
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(expected), "{text}");
        let r: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(r["reachable"], expected == 0, "{r}");
    }
}
