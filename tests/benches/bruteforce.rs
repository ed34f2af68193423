//! Code brute force through a relay with its default limits: an attacker with one technician
//! account and one address tries to join live codes as fast as the relay lets them, for a while.
//! Every join the relay accepts is one guess of a 6-digit secret (the PAKE allows one try; the
//! agent then burns the code). Reports guesses per hour and the resulting chance of success.
//!
//!     cargo bench -p tandem-tests --bench bruteforce [-- --seconds 120]
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};
use tandem_client::RelayLink;
use tandem_tests::{TestRelay, bench_arg, write_bench_json};

fn main() {
    let secs: u64 = bench_arg("--seconds", 120);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(run(Duration::from_secs(secs)));
}

async fn run(for_: Duration) {
    let relay = TestRelay::start().await;
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
