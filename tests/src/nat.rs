//! Two private networks behind NATs made with nftables, and a relay on the "internet" between
//! them, in Linux network namespaces (root only): for the direct-path tests and benchmark.
//!
//! ```text
//!   agent   A 192.168.10.2 ── .10.1 NA 10.240.1.2 ── 10.240.1.1 ┐
//!                                                               I  relay; routes between NA and NC
//!   console C 192.168.20.2 ── .20.1 NC 10.240.2.2 ── 10.240.2.1 ┘
//! ```
//!
//! The NATs ([`Nat`]): endpoint-independent mapping (Linux keeps the source port) with no filtering
//! ("full cone"), filtering by the addresses the inside host sent to ("restricted"), or by address
//! and port (conntrack alone: "port-restricted"); and endpoint-dependent mapping with a random port
//! for every destination ("symmetric").

use crate::binary;
use crate::netns::{self, Netns};
use crate::nsprocs::{Events, PORT, Relay, clean_env};
use std::process::Stdio;
use std::time::Duration;

pub const RELAY_A: &str = "10.240.1.1";
pub const RELAY_C: &str = "10.240.2.1";
pub const NAT_A: &str = "10.240.1.2";
pub const NAT_C: &str = "10.240.2.2";
pub const HOST_A: &str = "192.168.10.2";
pub const HOST_C: &str = "192.168.20.2";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    FullCone,
    Restricted,
    PortRestricted,
    Symmetric,
}

impl Nat {
    pub const ALL: [Nat; 4] = [
        Nat::FullCone,
        Nat::Restricted,
        Nat::PortRestricted,
        Nat::Symmetric,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Nat::FullCone => "full cone",
            Nat::Restricted => "restricted",
            Nat::PortRestricted => "port-restricted",
            Nat::Symmetric => "symmetric",
        }
    }

    /// The nftables rules of a NAT between `lan` and `wan` (device names) for the one host
    /// `host` inside.
    pub fn rules(self, lan: &str, wan: &str, host: &str) -> String {
        // Inbound UDP nobody asked for: forwarded to the host (full cone), forwarded if the host
        // sent to that address before (restricted), or left to conntrack (the others).
        let inbound = match self {
            Nat::FullCone => format!("iifname \"{wan}\" meta l4proto udp dnat to {host}"),
            Nat::Restricted => {
                format!("iifname \"{wan}\" meta l4proto udp ip saddr @contacted dnat to {host}")
            }
            Nat::PortRestricted | Nat::Symmetric => String::new(),
        };
        let random = if self == Nat::Symmetric {
            " random"
        } else {
            ""
        };
        format!(
            "table ip tnd_nat {{\n\
             set contacted {{\n\
             type ipv4_addr\n\
             flags dynamic,timeout\n\
             timeout 2m\n\
             }}\n\
             chain fwdc {{\n\
             type filter hook forward priority 0; policy accept;\n\
             iifname \"{lan}\" meta l4proto udp update @contacted {{ ip daddr }}\n\
             }}\n\
             chain prec {{\n\
             type nat hook prerouting priority dstnat; policy accept;\n\
             {inbound}\n\
             }}\n\
             chain postc {{\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
             oifname \"{wan}\" masquerade{random}\n\
             }}\n\
             chain inc {{\n\
             type filter hook input priority 0; policy accept;\n\
             iifname \"{wan}\" meta l4proto udp drop\n\
             }}\n\
             }}\n"
        )
    }

    /// Whether a pair should go direct.
    pub fn direct_expected(a: Nat, c: Nat) -> bool {
        !matches!(
            (a, c),
            (Nat::Symmetric, Nat::Symmetric)
                | (Nat::Symmetric, Nat::PortRestricted)
                | (Nat::PortRestricted, Nat::Symmetric)
        )
    }
}

/// The namespaces of one test (see the module's picture).
pub struct World {
    pub i: Netns,
    pub a: Netns,
    pub c: Netns,
    pub na: Netns,
    pub nc: Netns,
}

impl World {
    pub fn new(nat_a: Nat, nat_c: Nat) -> World {
        let i = Netns::new("inet");
        let na = Netns::new("nata");
        let nc = Netns::new("natc");
        let a = Netns::new("a");
        let c = Netns::new("c");
        netns::link(&i, &format!("{RELAY_A}/24"), &na, &format!("{NAT_A}/24"));
        netns::link(&i, &format!("{RELAY_C}/24"), &nc, &format!("{NAT_C}/24"));
        netns::link(&na, "192.168.10.1/24", &a, &format!("{HOST_A}/24"));
        netns::link(&nc, "192.168.20.1/24", &c, &format!("{HOST_C}/24"));
        for n in [&i, &na, &nc] {
            n.sysctl("net.ipv4.ip_forward", "1");
        }
        na.default_route(RELAY_A);
        nc.default_route(RELAY_C);
        a.default_route("192.168.10.1");
        c.default_route("192.168.20.1");
        na.nft(&nat_a.rules(&format!("v{}", a.tag), &format!("v{}", i.tag), HOST_A));
        nc.nft(&nat_c.rules(&format!("v{}", c.tag), &format!("v{}", i.tag), HOST_C));
        World { i, a, c, na, nc }
    }

    /// Cuts (or restores) the path between the two NATs; the relay stays reachable from both.
    pub fn cut_between_nats(&self, cut: bool) {
        if cut {
            self.i.nft(&format!(
                "table ip tnd_cut {{\n\
                 chain fwdc {{\n\
                 type filter hook forward priority 0; policy accept;\n\
                 ip saddr {NAT_A} ip daddr {NAT_C} drop\n\
                 ip saddr {NAT_C} ip daddr {NAT_A} drop\n\
                 }}\n\
                 }}\n"
            ));
        } else {
            self.i.exec("nft", &["delete", "table", "ip", "tnd_cut"]);
        }
    }
}

pub fn start_agent(
    ns: &Netns,
    relay_ip: &str,
    relay: &Relay,
    display: &str,
    extra: &[&str],
) -> Events {
    let state = tempfile::tempdir().unwrap().keep();
    let mut cmd = ns.command(binary("tandem-agent"));
    clean_env(&mut cmd);
    cmd.env("TANDEM_AGENT_STATE_DIR", state)
        .args(["--relay", &format!("{relay_ip}:{PORT}")])
        .args(["--relay-pin", &relay.pin])
        .args(["--display", display, "--headless", "--json"])
        .args(["--consent", "allow", "--once"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    Events::new(cmd.spawn().unwrap(), "agent")
}

pub fn start_console(
    ns: &Netns,
    relay_ip: &str,
    relay: &Relay,
    code: &str,
    extra: &[&str],
) -> Events {
    crate::nsprocs::start_console_in(ns, relay_ip, relay, code, extra)
}

/// Paints a ticking square on the display (a frame every 50 ms) until dropped.
pub struct Ticker(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Ticker {
    pub fn start(display: &str, window: u32) -> Ticker {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let display = display.to_string();
        std::thread::spawn(move || {
            let mut p = crate::x11::Painter::new(&display);
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let c = p.rnd() & 0xffffff;
                p.fill_on(window, c, 700, 500, 64, 64);
                p.sync();
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Ticker(stop)
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What one session showed.
pub struct Outcome {
    /// The console's path events, in order: (route, ms after the first picture; negative: before).
    pub paths: Vec<(String, f64)>,
    pub events: Vec<serde_json::Value>,
    pub keys: usize,
}

impl Outcome {
    pub fn went_direct(&self) -> Option<(&str, f64)> {
        self.paths
            .iter()
            .find(|(r, _)| r != "relay")
            .map(|(r, t)| (r.as_str(), *t))
    }
}

pub fn path_events(ev: &[serde_json::Value]) -> Vec<(String, f64)> {
    let first_frame_ms = ev
        .iter()
        .find(|e| e["event"] == "first_frame")
        .and_then(|e| e["join_to_first_frame_ms"].as_f64())
        .unwrap_or(0.0);
    ev.iter()
        .filter(|e| e["event"] == "path")
        .map(|e| {
            (
                e["route"].as_str().unwrap_or("?").to_string(),
                e["after_join_ms"].as_f64().unwrap_or(0.0) - first_frame_ms,
            )
        })
        .collect()
}

/// [`session`] with the two-key script, 4 s, nothing done during it: the agent in A, the console
/// in `console` (C, or A for one LAN) with `console_extra`.
pub async fn plain_session(
    w: &World,
    relay: &Relay,
    console: (&Netns, &str),
    console_extra: &[&str],
) -> Outcome {
    session(
        relay,
        (&w.a, RELAY_A),
        console,
        "wait 1500\nkey h\nkey i\nwait 1000\n",
        4,
        console_extra,
        async |_| {},
    )
    .await
}

/// A whole session: the agent in `agent_ns` on an Xvfb screen with a ticking square, the console
/// in `console_ns` clicking and typing `keys` letters; `during` runs once the console reported its
/// first picture.
pub async fn session(
    relay: &Relay,
    (agent_ns, agent_relay): (&Netns, &str),
    (console_ns, console_relay): (&Netns, &str),
    script: &str,
    seconds: u32,
    console_extra: &[&str],
    during: impl AsyncFnOnce(&mut Events),
) -> Outcome {
    let x = crate::x11::Xvfb::start(800, 600);
    let rec = crate::x11::XRecorder::start(&x);
    let _tick = Ticker::start(&x.display, rec.window);
    let mut agent = start_agent(agent_ns, agent_relay, relay, &x.display, &[]);
    let code = agent.next("code").await["code"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = tempfile::tempdir().unwrap();
    let script_file = dir.path().join("script.txt");
    std::fs::write(&script_file, script).unwrap();
    let secs = seconds.to_string();
    let mut args = vec![
        "--input-script",
        script_file.to_str().unwrap(),
        "--seconds",
        &secs,
    ];
    args.extend_from_slice(console_extra);
    let mut console = start_console(console_ns, console_relay, relay, &code, &args);
    console.next("first_frame").await;
    during(&mut console).await;
    let (rc, events) = console.finish().await;
    assert_eq!(rc, 0, "{events:?}");
    let keys = rec
        .keys_and_buttons()
        .iter()
        .filter(|e| e.kind == crate::x11::Kind::KeyPress)
        .count();
    agent.next("ended").await;
    Outcome {
        paths: path_events(&events),
        events,
        keys,
    }
}
