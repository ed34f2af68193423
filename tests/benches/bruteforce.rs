//! Code brute force through a relay with its default limits: an attacker with one technician
//! account and one address tries to join live codes as fast as the relay lets them, for a while.
//! Every join the relay accepts is one guess of a 6-digit secret (the PAKE allows one try; the
//! agent then burns the code). Reports guesses per hour and the resulting chance of success.
//!
//!
//! `--hostile-relay`: the relay itself is the attacker. It plays the console against one waiting
//! agent and guesses as fast as the agent answers; the relay's limits do not apply to it, only the
//! agent's own (pauses of 30 s, 60 s, then no code until the user asks). Reports the guesses the
//! agent allowed, per hour, next to a baseline agent without its own limit run in the same process.
//!
//!     cargo bench -p tandem-tests --bench bruteforce [-- --seconds 120] [--hostile-relay]
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};
use tandem_client::RelayLink;
use tandem_proto::Secret;
use tandem_session::{AgentEvent, AgentHost, GuessLimit, SessionCode, SessionConfig};
use tandem_tests::fake_relay::{FakeRelay, Mode, Tamper};
use tandem_tests::{TestRelay, bench_arg, write_bench_json};

fn main() {
    let secs: u64 = bench_arg("--seconds", 120);
    let rt = tokio::runtime::Runtime::new().unwrap();
    if std::env::args().any(|a| a == "--hostile-relay") {
        rt.block_on(hostile_relay(Duration::from_secs(secs)));
    } else {
        rt.block_on(run(Duration::from_secs(secs)));
    }
}

/// Guesses a relay playing the console gets against one waiting agent in `for_`.
async fn guesses_against(limit: GuessLimit, for_: Duration) -> (u64, Vec<f64>) {
    let relay = std::sync::Arc::new(FakeRelay::start(Mode::Forward(Tamper::default())).await);
    let cfg = SessionConfig {
        guesses: limit,
        ..SessionConfig::default()
    };
    let mut host = AgentHost::connect(relay.opts(), cfg).await.unwrap();
    let start = Instant::now();
    let attacker = {
        let relay = relay.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < for_ {
                let Some(slot) = relay.agent_slot() else {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                };
                let guess =
                    SessionCode::from_parts(slot, &format!("{:06}", n % 1_000_000)).unwrap();
                n += 1;
                let _ = tandem_session::join(
                    &relay.opts(),
                    &Secret::new("tnd_1_any"),
                    &guess,
                    &SessionConfig::default(),
                )
                .await;
            }
        })
    };
    let mut joins = vec![];
    let agent = async {
        loop {
            if let Ok(AgentEvent::Joining { .. }) = host.next().await {
                joins.push(start.elapsed().as_secs_f64());
            }
        }
    };
    let _ = tokio::time::timeout(for_, agent).await;
    attacker.abort();
    relay.close();
    (joins.len() as u64, joins)
}

async fn hostile_relay(for_: Duration) {
    let baseline_for = Duration::from_secs(10);
    let (base, _) = guesses_against(
        GuessLimit {
            first_pause: Duration::ZERO,
            max_pause: Duration::ZERO,
            lock_after: u32::MAX,
        },
        baseline_for,
    )
    .await;
    let (limited, at) = guesses_against(GuessLimit::default(), for_).await;
    let base_hour = base as f64 / baseline_for.as_secs_f64() * 3600.0;
    let limited_hour = limited as f64 / for_.as_secs_f64() * 3600.0;
    println!();
    println!(
        "A hostile relay playing the console against one waiting agent, guessing as fast as the agent answers"
    );
    println!("| agent | run (s) | guesses | guesses/hour | when (s) |");
    println!("|---|---|---|---|---|");
    println!(
        "| without its own limit (baseline) | {:.0} | {base} | {base_hour:.0} | |",
        baseline_for.as_secs_f64()
    );
    println!(
        "| with the default limit | {:.0} | {limited} | {limited_hour:.0} (then 0 until the user asks) | {} |",
        for_.as_secs_f64(),
        at.iter()
            .map(|t| format!("{t:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "chance per waiting agent: {:.1e} per hour without the limit, {:.1e} in total with it (3 guesses × 10^-6) until the user asks for a new code",
        1.0 - (1.0 - 1e-6f64).powf(base_hour),
        limited as f64 * 1e-6
    );
    let json = serde_json::json!({"baseline_seconds": baseline_for.as_secs_f64(), "baseline_guesses": base,
        "baseline_guesses_per_hour": base_hour, "seconds": for_.as_secs_f64(), "guesses": limited,
        "guesses_per_hour": limited_hour, "guess_times_s": at});
    write_bench_json("bruteforce-hostile-relay", &json);
}

async fn run(for_: Duration) {
    // Every user's agent registers from this machine's one address here: the per-address register
    // budget (meant for one office) is lifted; the limits under test stay at their defaults.
    let relay = TestRelay::start_with(tandem_relay_server::Limits {
        registers_per_minute_per_address: 1_000_000,
        ..tandem_relay_server::Limits::default()
    })
    .await;
    let opts = relay.opts();
    let start = Instant::now();
    let (mut accepted, mut refused_auth, mut refused_join, mut attempts) = (0u64, 0u64, 0u64, 0u64);
    let mut agents = vec![];
    while start.elapsed() < for_ {
        // A live code shown by some user: the attacker knows the slot (slots are not secret).
        let mut agent = RelayLink::connect(&opts).await.unwrap();
        let (slot, _) = agent.register().await.unwrap();
        attempts += 1;
        let mut attacker = RelayLink::connect(&opts).await.unwrap();
        if attacker.authenticate(&relay.token).await.is_err() {
            refused_auth += 1;
        } else if attacker.join(&slot).await.is_ok() {
            accepted += 1;
        } else {
            refused_join += 1;
        }
        agents.push(agent);
        if agents.len() > 50 {
            agents.remove(0);
        }
        // As fast as the relay answers, but not a busy loop on refusals.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let per_hour = accepted as f64 / secs * 3600.0;
    let p_hour = 1.0 - (1.0 - 1e-6f64).powf(per_hour);
    let days_to_even = 0.5f64.ln() / (1.0 - 1e-6f64).ln() / per_hour.max(1e-9) / 24.0;
    println!();
    println!("Code brute force through the relay (default limits, one account, one address)");
    println!(
        "{attempts} attempts in {secs:.0} s: {accepted} joins accepted (= guesses), {refused_auth} refused at authentication, {refused_join} refused at join"
    );
    println!(
        "guesses per hour: {per_hour:.0} (the first minute includes the token bucket's burst)"
    );
    println!(
        "chance of hitting a live code: 10^-6 per guess → {:.3} % per hour; 50 % after {days_to_even:.0} days of continuous guessing, each failure replacing a user's code",
        p_hour * 100.0
    );
    let json = serde_json::json!({"seconds": secs, "attempts": attempts, "accepted": accepted,
        "refused_auth": refused_auth, "refused_join": refused_join, "guesses_per_hour": per_hour,
        "success_probability_per_hour": p_hour, "days_to_50_percent": days_to_even});
    write_bench_json("bruteforce", &json);
    drop(agents);
    relay.shutdown().await;
}
