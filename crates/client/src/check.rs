//! "Check connection": every way to the relay tried on its own, and one line a user can read
//! out on the phone ("UDP blocked, using TCP 443: OK").
//!
//! Each step is a real attempt with the caller's settings (trust, proxy, TCP targets), not a
//! guess: DNS, QUIC over UDP, then TLS over TCP (or WebSocket) to each TCP target, directly or
//! through the proxy the agent would use. A certificate that does not match the pin is reported
//! as such and never as "unreachable". Nothing is registered at the relay (no code is used up).

use std::fmt;
use std::time::{Duration, Instant};

use crate::{ClientError, ConnectOptions, ProxyChoice, RelayLink, Transports};

/// How long each attempt may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(4);

/// The outcome of one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Works, with a caveat (e.g. TCP only).
    Warn,
    Fail,
    /// Not tried (nothing to try, or an earlier step made it pointless).
    Skipped,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, so that widths in format strings apply.
        f.pad(match self {
            Verdict::Ok => "OK",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
            Verdict::Skipped => "--",
        })
    }
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Step {
    /// What was checked ("DNS", "UDP 4433", "TCP 443", "certificate", …).
    pub what: String,
    #[serde(serialize_with = "verdict_text")]
    pub verdict: Verdict,
    /// What happened, in words.
    pub detail: String,
}

fn verdict_text<S: serde::Serializer>(v: &Verdict, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}

/// A whole check.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub steps: Vec<Step>,
    /// One line for the phone.
    pub summary: String,
    /// A session can reach the relay by some way.
    pub reachable: bool,
}

impl Report {
    /// Adds a step found by the caller (the agent adds its display backend).
    pub fn push(&mut self, what: impl Into<String>, verdict: Verdict, detail: impl Into<String>) {
        self.steps.push(Step {
            what: what.into(),
            verdict,
            detail: detail.into(),
        });
    }

    /// The report as text: one line per step, the summary last.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for st in &self.steps {
            s.push_str(&format!(
                "  {:<5} {:<14} {}\n",
                st.verdict, st.what, st.detail
            ));
        }
        s.push_str(&format!("Summary: {}\n", self.summary));
        s
    }
}

/// What one transport attempt found.
enum Attempt {
    Ok {
        ms: u128,
        rtt: Duration,
        /// The relay's clock against ours, or why it could not be asked.
        clock: Result<(i64, u64), String>,
    },
    PinMismatch(String),
    Failed(String),
}

fn classify(e: &ClientError) -> Attempt {
    let text = e.to_string();
    match e {
        // A TCP-only attempt: what TCP met says it all (not the QUIC advice).
        ClientError::Unreachable { tcp, .. } if !tcp.is_empty() && !tcp.contains("pin") => {
            Attempt::Failed(tcp.clone())
        }
        ClientError::Tls(_) if text.contains("pin") || text.contains("certificate") => {
            Attempt::PinMismatch(text)
        }
        _ if text.contains("does not match the pinned") || text.contains("pinned fingerprint") => {
            Attempt::PinMismatch(text)
        }
        _ => Attempt::Failed(text),
    }
}

async fn attempt(opts: ConnectOptions) -> Attempt {
    let t = Instant::now();
    match tokio::time::timeout(
        STEP_TIMEOUT + Duration::from_secs(1),
        RelayLink::connect(&opts),
    )
    .await
    {
        Ok(Ok(mut link)) => {
            let rtt = link.connection().rtt();
            let ms = t.elapsed().as_millis();
            let clock = match tokio::time::timeout(STEP_TIMEOUT, link.clock_offset()).await {
                Ok(Ok(o)) => Ok(o),
                Ok(Err(e)) => Err(format!(
                    "the relay did not tell its time ({e}); an older relay"
                )),
                Err(_) => Err("the relay did not tell its time".to_string()),
            };
            link.close().await;
            Attempt::Ok { ms, rtt, clock }
        }
        Ok(Err(e)) => classify(&e),
        Err(_) => Attempt::Failed(format!("no answer within {} s", STEP_TIMEOUT.as_secs())),
    }
}

/// A short name of a TCP target for the summary ("TCP 443", "WebSocket").
fn tcp_name(t: &tandem_net::dial::TcpTarget) -> String {
    match t {
        tandem_net::dial::TcpTarget::Tls { port, .. } => format!("TCP {port}"),
        tandem_net::dial::TcpTarget::WebSocket { port, .. } => format!("WebSocket {port}"),
    }
}

/// Checks every way to the relay that `opts` allows.
pub async fn check(opts: &ConnectOptions) -> Report {
    let mut r = Report {
        steps: Vec::new(),
        summary: String::new(),
        reachable: false,
    };
    // The first node of a cluster list (the others are checked the same way by naming them).
    let base = ConnectOptions {
        timeout: STEP_TIMEOUT,
        alternates: Vec::new(),
        ..opts.clone()
    };
    let udp_port = crate::relay_host(&opts.relay).map(|(_, p)| p).ok();

    // DNS.
    let t = Instant::now();
    match crate::resolve(&opts.relay, STEP_TIMEOUT).await {
        Ok((addr, host)) => r.push(
            "DNS",
            Verdict::Ok,
            format!("{host} is {} ({} ms)", addr.ip(), t.elapsed().as_millis()),
        ),
        Err(e) => {
            r.push("DNS", Verdict::Fail, e.to_string());
            // TCP through a proxy resolves at the proxy: still worth trying below.
        }
    }

    // QUIC over UDP.
    let mut pin_mismatch: Option<String> = None;
    let mut clock: Option<Result<(i64, u64), String>> = None;
    let udp_name = udp_port.map_or("UDP".to_string(), |p| format!("UDP {p}"));
    let udp_ok = if opts.transports == Transports::Tcp {
        r.push(
            &udp_name,
            Verdict::Skipped,
            "transport = tcp: UDP is not used",
        );
        false
    } else {
        let o = ConnectOptions {
            transports: Transports::Quic,
            ..base.clone()
        };
        match attempt(o).await {
            Attempt::Ok { ms, rtt, clock: c } => {
                clock = Some(c);
                r.push(
                    &udp_name,
                    Verdict::Ok,
                    format!(
                        "QUIC connected in {ms} ms, round trip {} ms",
                        rtt.as_millis()
                    ),
                );
                true
            }
            Attempt::PinMismatch(e) => {
                r.push(&udp_name, Verdict::Fail, e.clone());
                pin_mismatch = Some(e);
                false
            }
            Attempt::Failed(e) => {
                r.push(
                    &udp_name,
                    Verdict::Fail,
                    format!("{e} (UDP blocked on this network, or the relay is down)"),
                );
                false
            }
        }
    };

    // TCP targets, each on its own, through the proxy the program would use.
    let proxy_note = match &opts.proxy {
        ProxyChoice::Direct => String::new(),
        ProxyChoice::Use(p) => format!(" via proxy {p}"),
        ProxyChoice::FromEnvironment => {
            match tandem_net::proxy::Proxy::from_env(
                crate::relay_host(&opts.relay)
                    .map(|(h, _)| h)
                    .unwrap_or_default()
                    .as_str(),
            ) {
                Ok(Some(p)) => format!(" via proxy {p} (HTTPS_PROXY)"),
                Ok(None) => String::new(),
                Err(e) => {
                    r.push("proxy", Verdict::Fail, e.to_string());
                    String::new()
                }
            }
        }
    };
    let mut tcp_ok: Option<String> = None;
    // Steps of TCP ports that did not answer (not those with a wrong certificate).
    let mut tcp_failed: Vec<usize> = Vec::new();
    if opts.transports == Transports::Quic {
        r.push("TCP", Verdict::Skipped, "transport = quic: TCP is not used");
    } else if opts.tcp.is_empty() {
        r.push("TCP", Verdict::Skipped, "no TCP address to try");
    }
    for target in opts
        .tcp
        .iter()
        .filter(|_| opts.transports != Transports::Quic)
    {
        let name = tcp_name(target);
        let o = ConnectOptions {
            transports: Transports::Tcp,
            tcp: vec![target.clone()],
            ..base.clone()
        };
        match attempt(o).await {
            Attempt::Ok { ms, clock: c, .. } => {
                if !matches!(clock, Some(Ok(_))) {
                    clock = Some(c);
                }
                r.push(
                    &name,
                    Verdict::Ok,
                    format!("{target}{proxy_note}: TLS connected in {ms} ms"),
                );
                tcp_ok.get_or_insert(name);
            }
            Attempt::PinMismatch(e) => {
                r.push(&name, Verdict::Fail, format!("{target}{proxy_note}: {e}"));
                pin_mismatch.get_or_insert(e);
            }
            Attempt::Failed(e) => {
                // Most dial errors name the target already (sometimes twice: "T: cannot
                // connect to T").
                let t = target.to_string();
                let e = match e.strip_prefix(&format!("{t}: ")) {
                    Some(rest) if rest.contains(&t) => rest.to_owned(),
                    _ => e,
                };
                let detail = if e.contains(&t) {
                    format!("{e}{proxy_note}")
                } else {
                    format!("{t}{proxy_note}: {e}")
                };
                tcp_failed.push(r.steps.len());
                r.push(&name, Verdict::Fail, detail);
            }
        }
    }
    // A TCP port that failed while the relay was reached another way is a caveat (the relay may
    // not listen there; a network that later blocks UDP needs it), not a failure.
    if udp_ok || tcp_ok.is_some() {
        for i in tcp_failed {
            if let Some(st) = r.steps.get_mut(i) {
                st.verdict = Verdict::Warn;
                st.detail
                    .push_str(" (not needed now; the relay may not listen there)");
            }
        }
    }

    // The certificate, over whatever got through.
    let trust = match &opts.trust {
        tandem_certs::RelayTrust::Pin(p) => format!("pin {}", short_pin(&p.to_string())),
        _ => "the configured CA".to_string(),
    };
    match (&pin_mismatch, udp_ok || tcp_ok.is_some()) {
        (Some(_), _) => r.push(
            "certificate",
            Verdict::Fail,
            format!(
                "the relay's certificate does not match {trust}: the relay was replaced or \
                 reinstalled, or something on this network intercepts the connection"
            ),
        ),
        (None, true) => r.push("certificate", Verdict::Ok, format!("matches {trust}")),
        (None, false) => r.push("certificate", Verdict::Skipped, "nothing reached the relay"),
    }

    // The clock, against the relay's.
    let clock_note = match &clock {
        Some(Ok((offset, uncertainty))) => {
            let (verdict, detail) = clock_verdict(*offset, *uncertainty);
            r.push("clock", verdict, detail);
            (verdict != Verdict::Ok).then(|| clock_summary(*offset))
        }
        Some(Err(e)) => {
            r.push("clock", Verdict::Skipped, e.clone());
            None
        }
        None => {
            r.push("clock", Verdict::Skipped, "nothing reached the relay");
            None
        }
    };

    r.reachable = udp_ok || tcp_ok.is_some();
    r.summary = match (udp_ok, &tcp_ok, &pin_mismatch) {
        (_, _, Some(_)) if !r.reachable => {
            "relay certificate does not match the pin: do not connect; tell your IT provider"
                .to_string()
        }
        (true, _, _) => format!("{udp_name} OK: connected over QUIC"),
        (false, Some(t), _) if opts.transports == Transports::Tcp => format!("{t}: OK"),
        (false, Some(t), _) => format!("UDP blocked, using {t}: OK"),
        (false, None, _) if r.steps.first().is_some_and(|s| s.verdict == Verdict::Fail) => {
            "cannot find the relay's address (DNS): check the internet connection".to_string()
        }
        (false, None, _) => format!(
            "relay not reachable: no answer over {udp_name} or TCP ({}); check the internet \
             connection or ask your IT provider",
            opts.tcp.iter().map(tcp_name).collect::<Vec<_>>().join(", ")
        ),
    };
    if let Some(note) = clock_note {
        r.summary.push_str("; ");
        r.summary.push_str(&note);
    }
    r
}

/// Clock differences up to this are fine (certificates and signed records allow for it).
pub const CLOCK_OK: Duration = Duration::from_secs(60);
/// Clock differences above this break certificate and signature times: a failure.
pub const CLOCK_BAD: Duration = Duration::from_secs(3600);

/// How far the relay's clock is ahead of ours (ms, negative: behind) and the uncertainty (half
/// the round trip), from our clock when we asked (`sent`), when it answered (`received`), and
/// the relay's clock in its answer. Assumes the answer was made half-way through the round trip.
pub fn clock_offset(sent: u64, received: u64, relay: u64) -> (i64, u64) {
    let received = received.max(sent);
    let half = (received - sent) / 2;
    let mid = i128::from(sent) + i128::from(half);
    let offset = (i128::from(relay) - mid).clamp(i128::from(i64::MIN), i128::from(i64::MAX));
    (offset as i64, half)
}

/// "4 min", "3 h", "2 days": a clock difference for people, rounded to the nearest unit (a
/// clock 3 h off measures a few milliseconds under or over 3 h and must read "3 h", not "2 h").
fn span(ms: u64) -> String {
    let s = ms.saturating_add(500) / 1000;
    let nearest = |unit: u64| s.saturating_add(unit / 2) / unit;
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", nearest(60)),
        7200..=172_799 => format!("{} h", nearest(3600)),
        _ => format!("{} days", nearest(86_400)),
    }
}

/// The clock step: OK within [`CLOCK_OK`] (beyond what the measurement cannot tell apart),
/// WARN up to [`CLOCK_BAD`], FAIL beyond.
pub fn clock_verdict(offset: i64, uncertainty: u64) -> (Verdict, String) {
    let off = offset.unsigned_abs();
    // Only what is certainly off counts: the round trip hides up to `uncertainty`.
    let sure = off.saturating_sub(uncertainty);
    let side = if offset > 0 { "behind" } else { "ahead of" };
    if u128::from(sure) <= CLOCK_OK.as_millis() {
        (
            Verdict::Ok,
            format!("within {} of the relay's clock", span(off.max(1000))),
        )
    } else if u128::from(sure) <= CLOCK_BAD.as_millis() {
        (
            Verdict::Warn,
            format!(
                "this computer's clock is {} {side} the relay's: turn on \"set time automatically\"",
                span(off)
            ),
        )
    } else {
        (
            Verdict::Fail,
            format!(
                "this computer's clock is {} {side} the relay's: certificates will look expired \
                 or not yet valid; fix the date and time",
                span(off)
            ),
        )
    }
}

/// The clock's part of the summary line.
fn clock_summary(offset: i64) -> String {
    let side = if offset > 0 { "slow" } else { "fast" };
    format!(
        "clock {} {side}: fix the date and time",
        span(offset.unsigned_abs())
    )
}

fn short_pin(p: &str) -> String {
    match p.char_indices().nth(19) {
        Some((i, _)) => format!("{}…", &p[..i]),
        None => p.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_text_lists_steps_and_summary() {
        let mut r = Report {
            steps: vec![],
            summary: "UDP blocked, using TCP 443: OK".into(),
            reachable: true,
        };
        r.push("UDP 4433", Verdict::Fail, "no answer");
        r.push(
            "TCP 443",
            Verdict::Ok,
            "tls://relay:443: TLS connected in 40 ms",
        );
        let t = r.text();
        assert!(t.contains("FAIL  UDP 4433"));
        assert!(t.contains("OK    TCP 443"));
        assert!(t.ends_with("Summary: UDP blocked, using TCP 443: OK\n"));
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["steps"][0]["verdict"], "FAIL");
    }

    #[test]
    fn clock_offset_takes_the_middle_of_the_round_trip() {
        // Asked at 1000, answered at 1100, relay said 1050: in step, uncertain by 50 ms.
        assert_eq!(clock_offset(1000, 1100, 1050), (0, 50));
        // Relay 2 h ahead.
        assert_eq!(clock_offset(1000, 1100, 7_201_050), (7_200_000, 50));
        // Relay behind (our clock fast).
        assert_eq!(clock_offset(10_000, 10_000, 4_000), (-6_000, 0));
        // A wall clock that stepped back while waiting is not a negative round trip.
        assert_eq!(clock_offset(1000, 900, 1000), (0, 0));
        // Absurd values saturate instead of overflowing.
        assert_eq!(clock_offset(u64::MAX, u64::MAX, 0).0, i64::MIN);
    }

    #[test]
    fn clock_verdicts() {
        assert_eq!(clock_verdict(1_200, 20).0, Verdict::Ok);
        assert_eq!(clock_verdict(-59_000, 20).0, Verdict::Ok);
        // 70 s off but the round trip was 30 s long: cannot be sure it is over a minute.
        assert_eq!(clock_verdict(70_000, 15_000).0, Verdict::Ok);
        let (v, d) = clock_verdict(-240_000, 20);
        assert_eq!(v, Verdict::Warn);
        assert!(d.contains("4 min ahead of the relay's"), "{d}");
        let (v, d) = clock_verdict(3 * 3_600_000, 20);
        assert_eq!(v, Verdict::Fail);
        assert!(d.contains("3 h behind the relay's"), "{d}");
        assert!(d.contains("fix the date and time"), "{d}");
        assert_eq!(
            clock_summary(3 * 3_600_000),
            "clock 3 h slow: fix the date and time"
        );
        assert_eq!(span(3 * 86_400_000), "3 days");
        // Measured a little under or over a whole unit: the nearest one (CI saw "2 h" for a
        // relay set 3 h ahead, measured 2 h 59 min 59.9 s).
        assert_eq!(span(3 * 3_600_000 - 100), "3 h");
        assert_eq!(span(3 * 3_600_000 + 100), "3 h");
        assert_eq!(span(4 * 60_000 - 300), "4 min");
        assert_eq!(span(59_600), "60 s");
        assert_eq!(span(3 * 86_400_000 - 5_000), "3 days");
    }

    #[test]
    fn pins_are_shortened_for_the_phone() {
        assert_eq!(
            short_pin("sha256:0123456789abcdef0123"),
            "sha256:0123456789ab…"
        );
        assert_eq!(short_pin("sha256:01"), "sha256:01");
    }
}
