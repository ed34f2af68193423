//! Unattended access benchmark, in one run on this machine, through the real `tandem-relay` on
//! loopback:
//!   1. connect time: the real `tandem-agent`, enrolled (`tandem-agent enroll`, the organisation's
//!      signature, `tandem-agent enroll --cert`) and online in `--unattended` mode (`ask = "no"`)
//!      on an Xvfb screen; the console in this process calls `tandem_session::connect_device` and
//!      the clock runs to the confirmed session, the agent's consent, and the first decoded video
//!      frame ("click on the device → first frame"). Then the session ends and the next run waits
//!      until the agent is online again. As baseline, in the same run and interleaved: the attended
//!      path (a second real `tandem-agent` with `--consent allow`, the console joins with its code:
//!      relay login, PAKE, consent, first frame).
//!   2. relay memory per idle online device: N enrolled devices (library keys and certificates,
//!      signed presences) come online from this process (QUIC links sharing a few UDP endpoints,
//!      `--concurrency` at a time); relay RSS before, at half and at all of them. Then, for the
//!      breakdown, the same number of bare QUIC connections (handshake only, nothing announced) on a
//!      fresh relay.
//!
//! Prints a table and JSON (also written to target/bench/unattended.json).
//!
//!     cargo bench -p tandem-tests --bench unattended [-- --runs 30 --devices 10000 --concurrency 200 --only connect|memory --no-baseline --no-breakdown]
//!
//! The links of part 2 share one UDP socket per `--per-endpoint` (1,000) devices, so no file
//! descriptor limit is in the way; the relay is one process with one UDP socket.
//!
//! "consent received" is when the console's control reader saw the agent's consent; one that
//! arrived before the session was confirmed is counted at confirmation.
//!
//! Where the relay's memory goes: run part 2 with `TANDEM_BIN_TANDEM_RELAY` naming a script that
//! execs the relay under heaptrack's preload (`LD_PRELOAD=…/libheaptrack_preload.so
//! DUMP_HEAPTRACK_OUTPUT=FILE`), SIGKILL the relay once all devices are online, and read the live
//! allocations with `heaptrack_interpret < FILE | gzip > x.gz; heaptrack_print -f x.gz
//! --flamegraph-cost-type leaked -F stacks.txt`.
#![allow(clippy::unwrap_used, clippy::print_literal)]

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_certs::RelayTrust;
use tandem_client::{ClientError, ConnectOptions, RelayLink};
use tandem_media::VideoDecoder;
use tandem_proto::{EndReason, Secret};
use tandem_session::tandem_org::{
    ANNOUNCE_EXPORTER_LABEL, CertRequest, Certificate, Credentials, DeviceCert, DeviceRequest,
    Issue, KeyPair, OrgPublic, Permissions, Presence, prove_announce, unix_now,
};
use tandem_session::{ControlMsg, Session, SessionCode, SessionConfig, SessionError};
use tandem_tests::x11::{Painter, Xvfb};
use tandem_tests::{
    RelayProcess, bench_arg, binary, http_get, percentile, relay_admin, token_from_output,
    write_bench_json,
};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

/// Longest wait for any one step (an agent's event, a session, a frame).
const T: Duration = Duration::from_secs(60);
const ORG: &str = "ACME IT";
const GROUP: &str = "servers";

struct Args {
    runs: usize,
    devices: usize,
    concurrency: usize,
    per_endpoint: usize,
    width: u32,
    height: u32,
    only: String,
    baseline: bool,
    breakdown: bool,
}

fn args() -> Args {
    Args {
        runs: bench_arg("--runs", 30),
        devices: bench_arg("--devices", 10_000),
        concurrency: bench_arg("--concurrency", 200),
        per_endpoint: bench_arg("--per-endpoint", 1000),
        width: bench_arg("--width", 1920),
        height: bench_arg("--height", 1080),
        only: bench_arg("--only", String::new()),
        baseline: !std::env::args().any(|a| a == "--no-baseline"),
        breakdown: !std::env::args().any(|a| a == "--no-breakdown"),
    }
}

fn main() {
    let a = args();
    tandem_tests::bench_main(run(a));
}

async fn run(a: Args) {
    let connect = if a.only.is_empty() || a.only == "connect" {
        Some(connect_part(&a).await)
    } else {
        None
    };
    let memory = if a.only.is_empty() || a.only == "memory" {
        let devices = memory_part(&a, true).await;
        // The same number of bare QUIC connections on a fresh relay: what of a device's cost is
        // the connection itself.
        let bare = if a.breakdown {
            Some(memory_part(&a, false).await)
        } else {
            None
        };
        Some((devices, bare))
    } else {
        None
    };
    println!();
    println!(
        "Tandem unattended benchmark ({} cores; relay and agents as release processes, console and devices in this process)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let mut json = serde_json::json!({"bench": "unattended"});
    if let Some(c) = &connect {
        json["connect"] = c.report(&a);
    }
    if let Some((m, bare)) = &memory {
        json["memory"] = m.report(bare.as_ref());
    }
    let out = serde_json::to_string_pretty(&json).unwrap();
    println!("\n{out}");
    write_bench_json("unattended", &json);
}

// ---------------------------------------------------------------------------------------------
// Part 1: connect → confirmed → first frame
// ---------------------------------------------------------------------------------------------

/// A real `tandem-agent` process whose JSON events arrive on a channel.
struct AgentProc {
    _child: tokio::process::Child,
    _stdin: tokio::process::ChildStdin,
    events: mpsc::UnboundedReceiver<serde_json::Value>,
}

impl AgentProc {
    fn spawn(state: &std::path::Path, relay: &RelayProcess, display: &str, extra: &[&str]) -> Self {
        let mut cmd = tokio::process::Command::new(binary("tandem-agent"));
        for v in [
            "DISPLAY",
            "WAYLAND_DISPLAY",
            "XDG_SESSION_TYPE",
            "XDG_CURRENT_DESKTOP",
            "TANDEM_ORG",
            "TANDEM_BACKEND",
        ] {
            cmd.env_remove(v);
        }
        let mut child = cmd
            .env("TANDEM_AGENT_STATE_DIR", state)
            .args(["--headless", "--json", "--display", display])
            .args(["--relay", &relay.addr, "--relay-pin"])
            .arg(relay.pin.to_string())
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                    let _ = tx.send(v);
                }
            }
        });
        AgentProc {
            _stdin: child.stdin.take().unwrap(),
            _child: child,
            events,
        }
    }

    /// The next event of `kind` (others are skipped; "offline" ones are shown).
    async fn next(&mut self, kind: &str) -> serde_json::Value {
        tokio::time::timeout(T, async {
            loop {
                let v = self.events.recv().await.expect("the agent exited");
                if v["event"] == kind {
                    return v;
                }
                if v["event"] == "offline" || v["event"] == "unattended_refused" {
                    eprintln!("agent: {v}");
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {kind} event from the agent within {T:?}"))
    }
}

/// Times of one session, in ms from the console's first call.
struct Sample {
    confirmed: f64,
    consent: f64,
    first_frame: f64,
    /// From the console's end of the session to the agent's next "online" (or "code") event.
    back: f64,
    /// Refusals before this attempt got through (device not online yet).
    retries: usize,
}

/// Runs one session: `open` makes it; the clock starts before it.
async fn measure<F, Fut>(open: F) -> (Sample, Arc<Session>)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Session, SessionError>>,
{
    let mut dec = VideoDecoder::new().unwrap();
    let mut retries = 0;
    let (t, session) = loop {
        let t = Instant::now();
        match tokio::time::timeout(T, open())
            .await
            .expect("session setup hung")
        {
            Ok(s) => break (t, Arc::new(s)),
            // The device is not (yet) online again on the relay: try again, timing from anew.
            Err(SessionError::Relay(
                e @ (ClientError::Refused { .. } | ClientError::RefusedBecause { .. }),
            )) if retries < 100 => {
                eprintln!("refused ({:?}), trying again", e.code());
                retries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("session setup failed: {e}"),
        }
    };
    let confirmed = t.elapsed().as_secs_f64() * 1e3;
    let (ctx, mut crx) = mpsc::unbounded_channel();
    let s = session.clone();
    let drain = tokio::spawn(async move {
        while let Ok(m) = s.recv_control().await {
            if let ControlMsg::Consent { .. } = m {
                let _ = ctx.send(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    });
    let first_frame = tokio::time::timeout(T, async {
        loop {
            let f = session.recv_video().await.expect("session lost");
            if let Ok(Some(_)) = dec.decode(&f.data) {
                return t.elapsed().as_secs_f64() * 1e3;
            }
        }
    })
    .await
    .expect("no video frame");
    let consent = crx.try_recv().unwrap_or(f64::NAN);
    session.end(EndReason::EndedByTechnician).await;
    drain.abort();
    (
        Sample {
            confirmed,
            consent,
            first_frame,
            back: f64::NAN,
            retries,
        },
        session,
    )
}

/// One measure of a [`Sample`].
type Field = fn(&Sample) -> f64;

struct ConnectResult {
    unattended: Vec<Sample>,
    attended: Vec<Sample>,
    /// The first (cold) run of each, not in the samples.
    cold_unattended: Sample,
    cold_attended: Option<Sample>,
}

/// Writes an organisation-signed device certificate for the request `tandem-agent enroll` printed.
fn approve(org: &KeyPair, request: &str, out: &std::path::Path) -> String {
    let req = DeviceRequest::from_text(request.trim()).unwrap();
    let cert = DeviceCert::issue(org, ORG, &req, None, GROUP, unix_now()).unwrap();
    std::fs::write(out, cert.to_text()).unwrap();
    req.device_id()
}

fn agent_cmd(state: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(binary("tandem-agent"))
        .env("TANDEM_AGENT_STATE_DIR", state)
        .env_remove("TANDEM_ORG")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tandem-agent {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// One unattended session, and the wait until the device is online again.
async fn unattended_once(
    device: &mut AgentProc,
    opts: &ConnectOptions,
    token: &Secret,
    cfg: &SessionConfig,
    id: &str,
) -> Sample {
    let (mut s, _session) = measure(|| tandem_session::connect_device(opts, token, id, cfg)).await;
    let t = Instant::now();
    device.next("online").await;
    s.back = t.elapsed().as_secs_f64() * 1e3;
    s
}

/// One attended session with the agent's current code.
async fn attended_once(agent: &mut AgentProc, opts: &ConnectOptions, token: &Secret) -> Sample {
    let code = agent.next("code").await["code"]
        .as_str()
        .unwrap()
        .to_string();
    let code = SessionCode::parse(&code).unwrap();
    let cfg = SessionConfig::default();
    let (s, _session) = measure(|| tandem_session::join(opts, token, &code, &cfg)).await;
    s
}

async fn connect_part(a: &Args) -> ConnectResult {
    let dir = tempfile::tempdir().unwrap();
    let out = relay_admin(
        dir.path(),
        &["technician", "add", "--org", ORG, "--name", "alice"],
    );
    let token: Secret = token_from_output(&out);
    // Many sessions from one technician and one address within minutes: above the relay's default
    // rate limits, which are not what is measured here.
    let cfg = dir.path().join("relay.toml");
    std::fs::write(
        &cfg,
        "[limits]\njoins_per_minute_per_technician = 1000000\njoins_per_minute_per_address = 1000000\n\
         auths_per_minute_per_address = 1000000\nregisters_per_minute_per_address = 1000000\n",
    )
    .unwrap();
    let relay = RelayProcess::start_with(dir.path(), &["--config", cfg.to_str().unwrap()]).await;
    let opts = ConnectOptions::new(relay.addr.clone(), RelayTrust::Pin(relay.pin));
    let x = Xvfb::start(a.width, a.height);
    Painter::new(&x.display).page(0);

    // The organisation (the administrator's side, with the library: what `tandem-org` does) and
    // a technician certificate allowing unattended access to the group.
    let org_key = KeyPair::generate().unwrap();
    let org = OrgPublic::new(ORG, org_key.public()).unwrap();
    let tech_key = KeyPair::generate().unwrap();
    let cert = Certificate::issue(
        &org_key,
        ORG,
        &CertRequest::new("alice", &tech_key).unwrap(),
        &Issue {
            permissions: Permissions::parse("view,control,unattended").unwrap(),
            groups: vec![GROUP.into()],
            validity: 3 * 3600,
        },
        unix_now(),
    )
    .unwrap();
    let console_cfg = SessionConfig {
        credentials: Some(Arc::new(Credentials::new(cert, tech_key, None).unwrap())),
        ..SessionConfig::default()
    };

    // The device, enrolled the way an MSP does it with the real agent.
    let state = dir.path().join("device-state");
    std::fs::create_dir_all(&state).unwrap();
    let agent_toml = dir.path().join("tandem-agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "org = \"{}\"\n[unattended]\nenabled = true\nask = \"no\"\n",
            org.to_text()
        ),
    )
    .unwrap();
    let toml = agent_toml.to_str().unwrap();
    let request = agent_cmd(&state, &["--config", toml, "enroll", "--name", "bench-pc"]);
    let cert_file = dir.path().join("bench-pc.device");
    let id = approve(&org_key, &request, &cert_file);
    let said = agent_cmd(
        &state,
        &[
            "--config",
            toml,
            "enroll",
            "--cert",
            cert_file.to_str().unwrap(),
        ],
    );
    assert!(said.contains(&id), "{said}");
    // No `--consent`: the unattended policy (`ask = "no"`) decides.
    let mut device = AgentProc::spawn(&state, &relay, &x.display, &["--config", toml]);
    device.next("online").await;

    // The attended baseline: another agent on the same screen, answering for nobody.
    let mut attended_agent = a.baseline.then(|| {
        let st = dir.path().join("attended-state");
        std::fs::create_dir_all(&st).unwrap();
        let empty = dir.path().join("attended.toml");
        std::fs::write(&empty, "").unwrap();
        AgentProc::spawn(
            &st,
            &relay,
            &x.display,
            &["--config", empty.to_str().unwrap(), "--consent", "allow"],
        )
    });

    let cold_unattended = unattended_once(&mut device, &opts, &token, &console_cfg, &id).await;
    let cold_attended = match attended_agent.as_mut() {
        Some(ag) => Some(attended_once(ag, &opts, &token).await),
        None => None,
    };
    let (mut unattended, mut attended) = (vec![], vec![]);
    for i in 0..a.runs {
        let s = unattended_once(&mut device, &opts, &token, &console_cfg, &id).await;
        eprintln!(
            "run {}: unattended confirmed {:.1} ms, first frame {:.1} ms, online again {:.1} ms",
            i + 1,
            s.confirmed,
            s.first_frame,
            s.back
        );
        unattended.push(s);
        if let Some(ag) = attended_agent.as_mut() {
            let s = attended_once(ag, &opts, &token).await;
            eprintln!(
                "run {}: attended   confirmed {:.1} ms, first frame {:.1} ms",
                i + 1,
                s.confirmed,
                s.first_frame
            );
            attended.push(s);
        }
    }
    drop(device);
    drop(attended_agent);
    relay.terminate().await;
    drop(x);
    ConnectResult {
        unattended,
        attended,
        cold_unattended,
        cold_attended,
    }
}

fn stats(v: &[f64]) -> serde_json::Value {
    serde_json::json!({"p50": percentile(v, 0.5), "p99": percentile(v, 0.99),
        "min": v.iter().copied().fold(f64::INFINITY, f64::min),
        "max": v.iter().copied().fold(f64::NEG_INFINITY, f64::max)})
}

impl ConnectResult {
    fn report(&self, a: &Args) -> serde_json::Value {
        let col = |v: &[Sample], f: Field| v.iter().map(f).collect::<Vec<f64>>();
        let rows: [(&str, Field); 3] = [
            ("connect → confirmed session", |s| s.confirmed),
            ("connect → consent received", |s| s.consent),
            ("connect → first decoded frame", |s| s.first_frame),
        ];
        println!();
        println!(
            "1. connect time, {} runs each, interleaved (real agents on a {}x{} Xvfb screen, loopback)",
            self.unattended.len(),
            a.width,
            a.height
        );
        println!(
            "{:<34} {:>10} {:>10}   {:>10} {:>10}",
            "ms", "unatt p50", "unatt p99", "attd p50", "attd p99"
        );
        for (name, f) in rows {
            let u = col(&self.unattended, f);
            let at = col(&self.attended, f);
            println!(
                "{name:<34} {:>10.1} {:>10.1}   {:>10.1} {:>10.1}",
                percentile(&u, 0.5),
                percentile(&u, 0.99),
                percentile(&at, 0.5),
                percentile(&at, 0.99)
            );
        }
        let ff = col(&self.unattended, |s| s.first_frame);
        println!(
            "{:<34} {:>10.1} {:>10.1}   (target ≤ 300 ms p50 and p99: {})",
            "  unattended first frame",
            percentile(&ff, 0.5),
            percentile(&ff, 0.99),
            if percentile(&ff, 0.99) <= 300.0 {
                "met"
            } else {
                "NOT met"
            }
        );
        let back = col(&self.unattended, |s| s.back);
        println!(
            "{:<34} {:>10.1} {:>10.1}   (agent reconnects and announces itself)",
            "session end → device online again",
            percentile(&back, 0.5),
            percentile(&back, 0.99)
        );
        println!(
            "{:<34} {:>10.1} {:>10}   {:>10.1}   (first run of each, not in the samples)",
            "cold first run: first frame",
            self.cold_unattended.first_frame,
            "",
            self.cold_attended
                .as_ref()
                .map(|s| s.first_frame)
                .unwrap_or(f64::NAN)
        );
        let retries: usize = self.unattended.iter().map(|s| s.retries).sum();
        let one = |v: &[Sample]| {
            serde_json::json!({
                "confirmed_ms": stats(&col(v, |s| s.confirmed)),
                "consent_ms": stats(&col(v, |s| s.consent)),
                "first_frame_ms": stats(&col(v, |s| s.first_frame)),
                "first_frame_all_ms": col(v, |s| s.first_frame),
            })
        };
        let mut u = one(&self.unattended);
        u["online_again_ms"] = stats(&back);
        u["retries_device_offline"] = retries.into();
        u["cold_first_frame_ms"] = self.cold_unattended.first_frame.into();
        let baseline = if a.baseline {
            let mut b = one(&self.attended);
            b["cold_first_frame_ms"] = self.cold_attended.as_ref().map(|s| s.first_frame).into();
            b["what"] = "attended: real tandem-agent --consent allow, console joins with its code (relay login, PAKE, consent)".into();
            b
        } else {
            serde_json::json!(null)
        };
        serde_json::json!({
            "runs": self.unattended.len(), "width": a.width, "height": a.height,
            "what": "real tandem-agent --unattended (ask = \"no\") on Xvfb, console in the bench: connect_device() → confirmed session / consent / first decoded frame",
            "unattended": u,
            "baseline": baseline,
            "baseline_reason": if a.baseline { serde_json::Value::Null } else { "--no-baseline".into() },
            "target_first_frame_ms": 300,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Part 2: relay memory per idle online device
// ---------------------------------------------------------------------------------------------

struct MemoryResult {
    devices: usize,
    idle: Proc,
    half: Proc,
    half_n: usize,
    full: Proc,
    online_secs: f64,
    half_secs: f64,
    announce_ms: Vec<f64>,
    retries: usize,
    /// Relay CPU seconds per second while all devices were idle (keep-alives).
    idle_cpu: f64,
    keygen_secs: f64,
    concurrency: usize,
    /// Mean length of a device's certificate and presence texts (what the relay keeps of each).
    text_bytes: f64,
    /// UDP datagrams the kernel dropped on a full receive buffer (any socket of this machine)
    /// while the devices came online: what makes a few handshakes time out and retry.
    udp_drops: u64,
}

/// `RcvbufErrors` of /proc/net/snmp (UDP datagrams dropped on a full socket receive buffer).
fn udp_rcvbuf_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// What /proc/PID/status says of the relay.
#[derive(Clone, Copy, Default)]
struct Proc {
    rss: u64,
    anon: u64,
    file: u64,
}

fn proc_status(relay: &RelayProcess) -> Proc {
    let pid = relay.child.id().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Proc {
        rss: relay.rss_bytes().unwrap_or(0),
        anon: kb("RssAnon:"),
        file: kb("RssFile:"),
    }
}

/// Brings devices `range` online (`announce`; otherwise only connects), `concurrency` at a time;
/// their links and connect (+ announce) times.
async fn bring_online(
    announce: bool,
    range: std::ops::Range<usize>,
    creds: &Arc<Vec<(KeyPair, String, String)>>,
    eps: &[quinn::Endpoint],
    per_endpoint: usize,
    opts: &ConnectOptions,
    concurrency: usize,
) -> (Vec<RelayLink>, Vec<f64>, usize) {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut js = tokio::task::JoinSet::new();
    for i in range {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (ep, opts, creds) = (eps[i / per_endpoint].clone(), opts.clone(), creds.clone());
        js.spawn(async move {
            let _permit = permit;
            let mut retries = 0;
            loop {
                let t = Instant::now();
                let r = async {
                    let mut link = RelayLink::connect_on(&ep, &opts).await?;
                    if announce {
                        // As `DeviceHost` does: the device key signs over this connection.
                        let (key, cert, presence) = &creds[i];
                        let mut exporter = [0u8; 32];
                        link.connection()
                            .export_keying_material(&mut exporter, ANNOUNCE_EXPORTER_LABEL, b"")
                            .unwrap();
                        let proof = prove_announce(key, cert, presence, &exporter);
                        link.announce(cert.clone(), presence.clone(), proof).await?;
                    }
                    Ok::<_, ClientError>(link)
                }
                .await;
                match r {
                    Ok(link) => return (link, t.elapsed().as_secs_f64() * 1e3, retries),
                    Err(e) if retries < 5 => {
                        eprintln!("device {i}: {e}; trying again");
                        retries += 1;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => panic!("device {i} could not come online: {e}"),
                }
            }
        });
    }
    let (mut links, mut ms, mut retries) = (vec![], vec![], 0);
    while let Some(r) = js.join_next().await {
        let (l, t, n) = r.unwrap();
        links.push(l);
        ms.push(t);
        retries += n;
    }
    (links, ms, retries)
}

/// Asserts that the relay holds `n` connections and, where its metrics say, `devices` online.
async fn check_online(relay: &RelayProcess, n: usize, devices: usize) {
    let h: serde_json::Value =
        serde_json::from_str(&http_get(relay.metrics, "/health").await.1).unwrap();
    assert_eq!(h["connections"].as_u64().unwrap() as usize, n, "{h}");
    let metrics = http_get(relay.metrics, "/metrics").await.1;
    let online = metrics.lines().find_map(|l| {
        let (name, value) = l.split_once(' ')?;
        name.ends_with("devices_online")
            .then(|| value.trim().parse::<f64>().ok())?
    });
    if let Some(v) = online {
        assert_eq!(v as usize, devices, "devices online");
    }
}

async fn memory_part(a: &Args, announce: bool) -> MemoryResult {
    let n = a.devices;
    let dir = tempfile::tempdir().unwrap();
    // Every limit that would stop N devices coming online from one address within a minute.
    let cfg = dir.path().join("relay.toml");
    std::fs::write(
        &cfg,
        "[limits]\nmax_connections = 1000000\nmax_connections_per_address = 1000000\n\
         registers_per_minute_per_address = 100000000\nhandshake_timeout_secs = 600\n\
         [devices]\nmax_known = 10000000\nnew_per_hour_per_address = 100000000\n",
    )
    .unwrap();
    let relay = RelayProcess::start_with(dir.path(), &["--config", cfg.to_str().unwrap()]).await;
    let opts = ConnectOptions::new(relay.addr.clone(), RelayTrust::Pin(relay.pin));
    let relay_addr: std::net::SocketAddr = relay.addr.parse().unwrap();

    // One organisation, N devices: keys, certificates, signed presences.
    let t = Instant::now();
    let creds = tokio::task::spawn_blocking(move || {
        let org = KeyPair::generate().unwrap();
        let now = unix_now();
        (0..n)
            .map(|i| {
                let key = KeyPair::generate().unwrap();
                let name = format!("pc-{i:05}");
                let req = DeviceRequest::new(&name, &key).unwrap();
                let cert = DeviceCert::issue(&org, ORG, &req, None, GROUP, now).unwrap();
                let p = Presence::sign(&key, &name, "Debian GNU/Linux 12", "bob", now).unwrap();
                (key, cert.to_text(), p.to_text())
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let keygen_secs = t.elapsed().as_secs_f64();
    let text_bytes = creds
        .iter()
        .map(|(_, c, p)| c.len() + p.len())
        .sum::<usize>() as f64
        / n.max(1) as f64;
    let creds = Arc::new(creds);
    let eps: Vec<_> = (0..n.div_ceil(a.per_endpoint).max(1))
        .map(|_| tandem_client::client_endpoint(&opts, relay_addr).unwrap())
        .collect();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = proc_status(&relay);
    let drops0 = udp_rcvbuf_errors();
    let half_n = n / 2;
    let t = Instant::now();
    let (mut links, mut announce_ms, mut retries) = bring_online(
        announce,
        0..half_n,
        &creds,
        &eps,
        a.per_endpoint,
        &opts,
        a.concurrency,
    )
    .await;
    let half_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let half = proc_status(&relay);
    let t2 = Instant::now();
    let (more, ms, r) = bring_online(
        announce,
        half_n..n,
        &creds,
        &eps,
        a.per_endpoint,
        &opts,
        a.concurrency,
    )
    .await;
    let online_secs = half_secs + t2.elapsed().as_secs_f64();
    let udp_drops = udp_rcvbuf_errors().saturating_sub(drops0);
    links.extend(more);
    announce_ms.extend(ms);
    retries += r;
    check_online(&relay, n, if announce { n } else { 0 }).await;
    // Idle: keep-alives only; let the allocator settle.
    let cpu0 = relay.cpu_seconds().unwrap_or(0.0);
    let t3 = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let full = proc_status(&relay);
    let idle_cpu = (relay.cpu_seconds().unwrap_or(0.0) - cpu0) / t3.elapsed().as_secs_f64();
    check_online(&relay, n, if announce { n } else { 0 }).await;
    assert_eq!(links.len(), n);
    drop(links);
    relay.terminate().await;
    MemoryResult {
        devices: n,
        idle,
        half,
        half_n,
        full,
        online_secs,
        half_secs,
        announce_ms,
        retries,
        idle_cpu,
        keygen_secs,
        concurrency: a.concurrency,
        text_bytes,
        udp_drops,
    }
}

fn per(a: u64, b: u64, n: usize) -> f64 {
    b.saturating_sub(a) as f64 / n.max(1) as f64
}

impl MemoryResult {
    /// Bytes per device (or connection): from none to all, and the slope from half to all.
    fn average(&self) -> f64 {
        per(self.idle.rss, self.full.rss, self.devices)
    }
    fn marginal(&self) -> f64 {
        per(self.half.rss, self.full.rss, self.devices - self.half_n)
    }

    fn report(&self, bare: Option<&MemoryResult>) -> serde_json::Value {
        let (average, marginal) = (self.average(), self.marginal());
        let anon_avg = per(self.idle.anon, self.full.anon, self.devices);
        let mib = |b: u64| b as f64 / 1048576.0;
        println!();
        println!("2. relay memory with {} idle online devices", self.devices);
        println!(
            "{:<34} {:>10.0} bytes  (RSS {:.1} → {:.1} MiB; target ≤ 16384)",
            "per device, average",
            average,
            mib(self.idle.rss),
            mib(self.full.rss)
        );
        println!(
            "{:<34} {:>10.0} bytes  (slope {}→{} devices: {:.1} → {:.1} MiB)",
            "per device, marginal",
            marginal,
            self.half_n,
            self.devices,
            mib(self.half.rss),
            mib(self.full.rss)
        );
        println!(
            "{:<34} {:>10.0} bytes  (anonymous memory only; file-backed {:.1} → {:.1} MiB)",
            "per device, anonymous",
            anon_avg,
            mib(self.idle.file),
            mib(self.full.file)
        );
        println!(
            "{:<34} {:>10.1} s      ({:.0} devices/s; {} at a time; announce p50 {:.1} ms, p99 {:.1} ms; {} retries, {} UDP datagrams dropped by full socket buffers)",
            "time to bring all online",
            self.online_secs,
            self.devices as f64 / self.online_secs,
            self.concurrency,
            percentile(&self.announce_ms, 0.5),
            percentile(&self.announce_ms, 0.99),
            self.retries,
            self.udp_drops
        );
        println!(
            "{:<34} {:>10.1} %      (keep-alives of {} links)",
            "relay CPU while idle",
            self.idle_cpu * 100.0,
            self.devices
        );
        let bare_json = bare.map(|b| {
            println!(
                "{:<34} {:>10.0} bytes  (marginal {:.0}; {} connections that only did the QUIC handshake, fresh relay: {:.1} → {:.1} MiB)",
                "  of which a bare QUIC connection",
                b.average(),
                b.marginal(),
                b.devices,
                mib(b.idle.rss),
                mib(b.full.rss)
            );
            println!(
                "{:<34} {:>10.0} bytes  (the rest: control stream, announce, device book, registry; the texts alone are {:.0} bytes)",
                "  of which being a device",
                average - b.average(),
                self.text_bytes
            );
            serde_json::json!({"connections": b.devices,
                "bytes_per_connection_average": b.average(),
                "bytes_per_connection_marginal": b.marginal(),
                "rss_bytes": {"idle": b.idle.rss, "half": b.half.rss, "full": b.full.rss},
                "connect_ms": stats(&b.announce_ms),
                "online_seconds": b.online_secs,
                "bytes_per_device_beyond_connection": average - b.average()})
        });
        serde_json::json!({
            "bare_connections": bare_json,
            "device_text_bytes": self.text_bytes,
            "devices": self.devices,
            "bytes_per_device_average": average,
            "bytes_per_device_marginal": marginal,
            "anon_bytes_per_device_average": anon_avg,
            "rss_bytes": {"idle": self.idle.rss, "half": self.half.rss, "full": self.full.rss},
            "rss_anon_bytes": {"idle": self.idle.anon, "half": self.half.anon, "full": self.full.anon},
            "rss_file_bytes": {"idle": self.idle.file, "half": self.half.file, "full": self.full.file},
            "half_devices": self.half_n,
            "online_seconds": self.online_secs,
            "half_online_seconds": self.half_secs,
            "devices_per_second": self.devices as f64 / self.online_secs,
            "connect_announce_ms": stats(&self.announce_ms),
            "retries": self.retries,
            "udp_rcvbuf_drops": self.udp_drops,
            "relay_idle_cpu_share": self.idle_cpu,
            "keygen_seconds": self.keygen_secs,
            "target_bytes_per_device": 16384,
        })
    }
}
