//! Helpers for Tandem's end-to-end tests and benchmarks: an in-process relay on loopback with a fresh
//! data directory, clients that trust it by pin, and a way to run the real `tandem-relay` binary.
#![allow(clippy::unwrap_used)]

pub mod content;
pub mod fake_relay;
pub mod impair;
pub mod mutter;
pub mod nat;
pub mod netns;
pub mod nsprocs;
pub mod org;
pub mod postgres;
pub mod scenes;
pub mod wayland;
pub mod x11;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tandem_certs::{Fingerprint, RelayTrust};
use tandem_client::{ConnectOptions, RelayLink};
use tandem_proto::{Secret, Slot};
use tandem_relay_server::{Limits, RelayHandle, ServerConfig, Store};

/// Installs a test log subscriber once (`TANDEM_LOG=debug` to see the relay's logs).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A relay running in this process on 127.0.0.1 with an ephemeral port.
pub struct TestRelay {
    pub handle: Option<RelayHandle>,
    pub dir: tempfile::TempDir,
    pub pin: Fingerprint,
    /// Token of the technician "alice" of "ACME IT".
    pub token: Secret,
}

impl TestRelay {
    pub async fn start() -> TestRelay {
        Self::start_with(Limits::default()).await
    }

    pub async fn start_with(limits: Limits) -> TestRelay {
        Self::start_full(
            limits,
            tandem_relay_server::TcpConfig {
                listen: vec!["127.0.0.1:0".parse().unwrap()],
                ..Default::default()
            },
        )
        .await
    }

    /// With its TCP front configured too (`listen` port 0: the UDP port's number).
    pub async fn start_full(limits: Limits, tcp: tandem_relay_server::TcpConfig) -> TestRelay {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let identity = tandem_certs::ensure_identity(dir.path(), &[]).unwrap();
        let token = {
            let mut store = Store::open(dir.path()).unwrap();
            Secret::new(store.add_technician("ACME IT", "alice").unwrap().1)
        };
        let cfg = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            tcp,
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            data_dir: dir.path().to_path_buf(),
            store: tandem_relay_server::store::StoreLocation::in_data_dir(dir.path()),
            node: String::new(),
            advertise: None,
            limits,
            drain_timeout: Duration::from_secs(1),
            devices: Default::default(),
            allow_direct: true,
        };
        let handle = tandem_relay_server::start(cfg, &identity).await.unwrap();
        TestRelay {
            pin: identity.fingerprint(),
            handle: Some(handle),
            dir,
            token,
        }
    }

    pub fn handle(&self) -> &RelayHandle {
        self.handle.as_ref().unwrap()
    }

    pub fn addr(&self) -> String {
        self.handle().addr().to_string()
    }

    pub fn opts(&self) -> ConnectOptions {
        ConnectOptions::new(self.addr(), RelayTrust::Pin(self.pin))
    }

    pub fn store(&self) -> Store {
        Store::open(self.dir.path()).unwrap()
    }

    pub fn add_technician(&self, org: &str, name: &str) -> Secret {
        Secret::new(self.store().add_technician(org, name).unwrap().1)
    }

    pub async fn connect(&self) -> RelayLink {
        RelayLink::connect(&self.opts()).await.unwrap()
    }

    /// A registered agent and its slot.
    pub async fn agent(&self) -> (RelayLink, Slot) {
        let mut l = self.connect().await;
        let (slot, _) = l.register().await.unwrap();
        (l, slot)
    }

    /// A console authenticated as `token`.
    pub async fn console_as(&self, token: &Secret) -> RelayLink {
        let mut l = self.connect().await;
        l.authenticate(token).await.unwrap();
        l
    }

    pub async fn console(&self) -> RelayLink {
        self.console_as(&self.token).await
    }

    /// A paired (agent, console).
    pub async fn pair(&self) -> (RelayLink, RelayLink) {
        let (mut agent, slot) = self.agent().await;
        let mut console = self.console().await;
        console.join(&slot).await.unwrap();
        agent.wait_paired().await.unwrap();
        (agent, console)
    }

    /// GET a path of the metrics listener; returns (status line, body).
    pub async fn http_get(&self, path: &str) -> (String, String) {
        http_get(self.handle().metrics_addr().unwrap(), path).await
    }

    pub async fn shutdown(mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }
}

/// A minimal HTTP/1.1 GET (tests only).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// Value of one Prometheus sample line (`name{labels} value`), 0 if absent.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Path of a binary built by this workspace (`tandem-relay`, …), building it if needed.
pub fn binary(name: &str) -> PathBuf {
    // `TANDEM_BIN_TANDEM_RELAY=/path/to/old/tandem-relay` runs a benchmark against another build.
    let var = format!("TANDEM_BIN_{}", name.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    // Integration tests live in target/<profile>/deps; binaries in target/<profile>.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(name);
    if !path.exists() {
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args(["build", "--workspace", "--bin", name]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().unwrap();
        assert!(status.success(), "cannot build {name}");
    }
    path
}

/// A real `tandem-relay` process, killed when dropped.
pub struct RelayProcess {
    pub child: tokio::process::Child,
    pub addr: String,
    pub pin: Fingerprint,
    pub metrics: std::net::SocketAddr,
}

/// Free TCP and UDP port on loopback (best effort: bind, read, release).
pub fn free_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

/// Runs `tandem-relay` with `args` (admin commands) against `data_dir`; returns stdout.
pub fn relay_admin(data_dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(binary("tandem-relay"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tandem-relay {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The token printed by `tandem-relay technician add`.
pub fn token_from_output(out: &str) -> Secret {
    let t = out
        .split_whitespace()
        .find(|w| w.starts_with("tnd_"))
        .unwrap();
    Secret::new(t)
}

impl RelayProcess {
    /// Starts the relay binary and waits until it printed its listening address.
    pub async fn start(data_dir: &Path) -> RelayProcess {
        Self::start_with(data_dir, &[]).await
    }

    /// Starts the relay binary with extra arguments (e.g. `--config FILE`).
    pub async fn start_with(data_dir: &Path, extra: &[&str]) -> RelayProcess {
        Self::start_on_port(data_dir, extra, free_port()).await
    }

    /// Starts the relay binary with extra arguments and environment (e.g. libfaketime's).
    pub async fn start_with_env(
        data_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> RelayProcess {
        Self::start_on_port_env(data_dir, extra, free_port(), env).await
    }

    /// Kills the relay (SIGKILL: no drain, no goodbye) and starts it again on the same address.
    pub async fn crash_and_restart(self, data_dir: &Path) -> RelayProcess {
        self.crash_and_restart_with(data_dir, &[]).await
    }

    /// Like [`RelayProcess::crash_and_restart`], with extra arguments for the new process.
    pub async fn crash_and_restart_with(mut self, data_dir: &Path, extra: &[&str]) -> RelayProcess {
        let _ = self.child.kill().await;
        let port: u16 = self
            .addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap();
        Self::start_on_port(data_dir, extra, port).await
    }

    /// Starts the relay binary on UDP `port` (a cluster node must know its address before it
    /// starts: `--advertise`).
    pub async fn start_on(data_dir: &Path, extra: &[&str], port: u16) -> RelayProcess {
        Self::start_on_port(data_dir, extra, port).await
    }

    async fn start_on_port(data_dir: &Path, extra: &[&str], port: u16) -> RelayProcess {
        Self::start_on_port_env(data_dir, extra, port, &[]).await
    }

    async fn start_on_port_env(
        data_dir: &Path,
        extra: &[&str],
        port: u16,
        env: &[(&str, &str)],
    ) -> RelayProcess {
        use tokio::io::AsyncBufReadExt;
        let mport = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = tokio::process::Command::new(binary("tandem-relay"))
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{mport}"))
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut pin = None;
        let fut = async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(p) = line.trim().strip_prefix("fingerprint:") {
                    pin = Some(p.trim().parse::<Fingerprint>().unwrap());
                }
                if line.contains("listening on") {
                    return;
                }
            }
            panic!("relay exited before listening");
        };
        tokio::time::timeout(Duration::from_secs(30), fut)
            .await
            .expect("relay did not start in time");
        // Keep draining stdout so the relay never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        RelayProcess {
            child,
            addr: format!("127.0.0.1:{port}"),
            pin: pin.unwrap(),
            metrics: format!("127.0.0.1:{mport}").parse().unwrap(),
        }
    }

    pub fn opts(&self) -> ConnectOptions {
        ConnectOptions::new(self.addr.clone(), RelayTrust::Pin(self.pin))
    }

    /// Resident memory of the relay process, in bytes (Linux).
    pub fn rss_bytes(&self) -> Option<u64> {
        let pid = self.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// CPU time (user + system) the relay process used so far, in seconds (Linux).
    pub fn cpu_seconds(&self) -> Option<f64> {
        let pid = self.child.id()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some(ticks / 100.0)
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("relay did not exit after SIGTERM")
            .unwrap()
    }
}

/// `--name VALUE` from a benchmark's command line, or `default` (cargo bench adds its own flags,
/// which are ignored).
pub fn bench_arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile (0 ≤ p ≤ 1, nearest rank) of `v` (any order); NaN when `v` is empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize]
}

/// Runs a benchmark's body on the runtime all benchmarks use (two workers, like the machine).
pub fn bench_main<F: std::future::Future>(body: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(body)
}

/// Writes a benchmark's results to `target/bench/<name>.json`.
pub fn write_bench_json(name: &str, v: &serde_json::Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(v).unwrap(),
    )
    .unwrap();
}

/// A relay process with its limits raised for load from one address (benchmarks), and the token
/// of a technician of `org`.
pub async fn load_relay(dir: &Path, org: &str) -> (RelayProcess, Secret) {
    let cfg = dir.join("relay.toml");
    let mut limits = String::from(
        "[limits]\nmax_connections = 100000\nmax_connections_per_address = 100000\nmax_sessions = 100000\n\
         joins_per_minute_per_technician = 1000000\njoins_per_minute_per_address = 1000000\n\
         auths_per_minute_per_address = 1000000\n",
    );
    // TANDEM_BENCH_BASELINE=1: the relay (another build, see `binary`) predates these keys.
    if std::env::var_os("TANDEM_BENCH_BASELINE").is_none() {
        limits.push_str("registers_per_minute_per_address = 1000000\nauth_queue = 100000\n");
    }
    std::fs::write(&cfg, limits).unwrap();
    bench_relay_of(dir, org, &["--config", cfg.to_str().unwrap()]).await
}

/// The relay binary on `dir` with one technician ("bench" of "Bench") and extra arguments; the
/// technician's token. What every session bench starts with.
pub async fn bench_relay(dir: &Path, extra: &[&str]) -> (RelayProcess, Secret) {
    bench_relay_of(dir, "Bench", extra).await
}

async fn bench_relay_of(dir: &Path, org: &str, extra: &[&str]) -> (RelayProcess, Secret) {
    let out = relay_admin(dir, &["technician", "add", "--org", org, "--name", "bench"]);
    let token = token_from_output(&out);
    (RelayProcess::start_with(dir, extra).await, token)
}

/// Counts pixels of a BGRX frame within `tol` of 0xRRGGBB in the given rectangle.
pub fn count_color(
    f: &tandem_media::Frame,
    rgb: u32,
    tol: i32,
    area: (u32, u32, u32, u32),
) -> usize {
    let (x0, y0, w, h) = area;
    let (r, g, b) = (
        (rgb >> 16) as i32,
        ((rgb >> 8) & 0xff) as i32,
        (rgb & 0xff) as i32,
    );
    let mut n = 0;
    for y in y0..(y0 + h).min(f.height) {
        let row = &f.data[y as usize * f.stride..];
        for x in x0..(x0 + w).min(f.width) {
            let p = &row[x as usize * 4..][..4];
            if (p[2] as i32 - r).abs() <= tol
                && (p[1] as i32 - g).abs() <= tol
                && (p[0] as i32 - b).abs() <= tol
            {
                n += 1;
            }
        }
    }
    n
}

/// Reads a PNG the console wrote (`--png`) as a frame.
pub fn read_png(path: &Path) -> tandem_media::Frame {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    tandem_media::rgba_to_frame(info.width, info.height, &buf[..info.buffer_size()])
}

/// Sends a datagram of `len` patterned bytes from `from` until one arrives at `to` (datagrams may
/// be lost; bounded by 20 s), and checks that it arrived unchanged.
pub async fn datagram_arrives(from: &RelayLink, to: &RelayLink, len: usize) {
    let payload: bytes::Bytes = (0..len)
        .map(|i| (i * 13 + len) as u8)
        .collect::<Vec<_>>()
        .into();
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            from.send_datagram(payload.clone()).unwrap();
            if let Ok(Ok(d)) =
                tokio::time::timeout(Duration::from_millis(200), to.recv_datagram()).await
            {
                return d;
            }
        }
    })
    .await
    .expect("no datagram arrived within 20 s");
    assert_eq!(got, payload);
}

/// What [`desktop_session`] saw.
pub struct DesktopSession {
    /// The agent's `desktop` event (which backend it chose), said before its code.
    pub desktop: serde_json::Value,
    /// The console's last decoded picture.
    pub seen: tandem_media::frame::Frame,
}

/// A whole session with the real programs on a desktop described by `env` (a Wayland
/// compositor's variables): a relay, `tandem-agent` that must find the backend by itself, a
/// headless `tandem-console` that plays `script` for `seconds` and saves its last picture.
pub async fn desktop_session(
    env: &[(String, String)],
    script: &str,
    seconds: u32,
) -> DesktopSession {
    use tokio::io::AsyncBufReadExt;
    let t = Duration::from_secs(15);
    let dir = tempfile::tempdir().unwrap();
    let out = relay_admin(
        dir.path(),
        &["technician", "add", "--org", "ACME IT", "--name", "alice"],
    );
    let token = token_from_output(&out).expose().to_string();
    let relay = RelayProcess::start(dir.path()).await;
    let mut agent = tokio::process::Command::new(binary("tandem-agent"));
    for v in [
        "DISPLAY",
        "TANDEM_BACKEND",
        "XDG_CURRENT_DESKTOP",
        "XDG_SESSION_TYPE",
    ] {
        agent.env_remove(v);
    }
    agent
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("XDG_SESSION_TYPE", "wayland")
        .env("TANDEM_AGENT_STATE_DIR", dir.path())
        .args([
            "--relay",
            &relay.addr,
            "--relay-pin",
            &relay.pin.to_string(),
        ])
        .args(["--headless", "--json", "--consent", "allow", "--once"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    let mut agent = agent.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(agent.stdout.take().unwrap()).lines();
    let mut desktop = None;
    let code = tokio::time::timeout(t, async {
        while let Some(l) = lines.next_line().await.unwrap() {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            if v["event"] == "desktop" {
                desktop = Some(v.clone());
            }
            if v["event"] == "code" {
                return v["code"].as_str().unwrap().to_string();
            }
        }
        panic!("the agent ended without a code");
    })
    .await
    .expect("no code from the agent");
    let desktop = desktop.expect("the agent said which desktop it shares, before the code");
    let script_path = dir.path().join("script.txt");
    std::fs::write(&script_path, script).unwrap();
    let png_path = dir.path().join("seen.png");
    let console = tokio::process::Command::new(binary("tandem-console"))
        .args([
            "--relay",
            &relay.addr,
            "--relay-pin",
            &relay.pin.to_string(),
        ])
        .args(["--token", &token, "--code", &code, "--headless", "--json"])
        .args(["--no-remember", "--seconds", &seconds.to_string()])
        .arg("--input-script")
        .arg(&script_path)
        .arg("--png")
        .arg(&png_path)
        .stderr(Stdio::null())
        .output();
    let out = tokio::time::timeout(t + Duration::from_secs(seconds as u64), console)
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "console: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let bytes = std::fs::read(&png_path).unwrap();
    let seen = wayland::decode_png(&bytes);
    let _ = agent.kill().await;
    relay.terminate().await;
    DesktopSession { desktop, seen }
}

/// An agent and a console session through the relay at `opts`, the user's consent (allow
/// control) already sent; and the setup time in ms (join → both confirmed).
pub async fn session_pair(
    opts: &tandem_client::ConnectOptions,
    token: &tandem_proto::Secret,
    fallback: tandem_session::Fallback,
) -> (tandem_session::Session, tandem_session::Session, f64) {
    let cfg = tandem_session::SessionConfig {
        fallback,
        ..tandem_session::SessionConfig::default()
    };
    let mut host = tandem_session::AgentHost::connect(opts.clone(), cfg.clone())
        .await
        .unwrap();
    let code = match host.next().await.unwrap() {
        tandem_session::AgentEvent::Code { code, .. } => code,
        other => panic!("{other:?}"),
    };
    let t = std::time::Instant::now();
    let (o, tk, c2) = (opts.clone(), token.clone(), cfg.clone());
    let console = tokio::spawn(async move { tandem_session::join(&o, &tk, &code, &c2).await });
    let agent = loop {
        match host.next().await.unwrap() {
            tandem_session::AgentEvent::Joining { .. } => continue,
            tandem_session::AgentEvent::Session(s) => break *s,
            other => panic!("{other:?}"),
        }
    };
    let console = console.await.unwrap().unwrap();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    // Input (the throughput test's stream) is accepted once the user's answer was sent.
    agent
        .send_control(&tandem_session::ControlMsg::Consent {
            decision: tandem_session::Consent::AllowControl,
        })
        .await
        .unwrap();
    (agent, console, ms)
}

/// A headless `tandem-agent` for the benchmarks: on X display `display`, consent given, one
/// session, JSON events; `relay_args` say how it reaches the relay (`--relay …`, `--relay-pin …`,
/// transport flags), `extra` anything more. Returns the process and its session code; its later
/// output is drained so it never blocks.
pub async fn bench_agent(
    state_dir: &Path,
    display: &str,
    relay_args: &[String],
    extra: &[String],
) -> (tokio::process::Child, String) {
    use tokio::io::AsyncBufReadExt;
    let mut agent = tokio::process::Command::new(binary("tandem-agent"))
        .env("TANDEM_AGENT_STATE_DIR", state_dir)
        .arg("--headless")
        .args(relay_args)
        .args([
            "--consent",
            "allow",
            "--json",
            "--once",
            "--display",
            display,
        ])
        .args(extra)
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .env_remove("XDG_SESSION_TYPE")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(agent.stdout.take().unwrap()).lines();
    let code = loop {
        let l = lines.next_line().await.unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        if v["event"] == "code" {
            break v["code"].as_str().unwrap().to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (agent, code)
}
