//! Files are scavenger traffic: they take what the session's screen and input leave.
//!
//! The inner connection's own congestion control fills whatever queue sits on the path (a slow
//! uplink's buffer, a busy relay, a machine whose CPU the transfer itself keeps busy), and the
//! screen's frames then wait in that queue behind file data. Stream priorities cannot help with a
//! queue that is outside the sender. So the sender of a file paces itself by the delay it causes,
//! as LEDBAT (RFC 6817) does: it tracks the lowest RTT seen lately (the path without a queue),
//! treats anything above it as queueing delay, and steers its rate so that the queueing delay
//! stays under [`TARGET`]: faster while below, slower (multiplicatively) while above.
//!
//! [`Scavenger`] is the pure controller (time and RTT samples in, a wait before the next chunk
//! out), tested without sockets or sleeps; [`Pacer`] drives it from an RTT source and tokio's
//! clock, shared by all of a session's outgoing transfers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Queueing delay the transfer may add to the path.
pub const TARGET: Duration = Duration::from_millis(15);
/// Rate at the start and after a long idle time, bytes per second.
pub const START_RATE: f64 = 8e6;
/// The slowest a transfer goes, however long the queue: it always finishes.
pub const MIN_RATE: f64 = 256e3;
/// No limit above this (far beyond any link a session runs on).
pub const MAX_RATE: f64 = 4e9;
/// How often the rate is steered.
const STEP: Duration = Duration::from_millis(25);
/// The base RTT is the lowest over this many buckets of [`BUCKET`] each (routes change).
const BUCKETS: usize = 10;
const BUCKET: Duration = Duration::from_secs(6);
/// Growth per step at zero queueing delay (×1.25); shrinking at twice the target is ×0.5.
const GAIN_UP: f64 = 0.25;
const GAIN_DOWN: f64 = 0.5;
/// Credit never exceeds this many seconds of the current rate (no bursts after a pause).
const BURST: f64 = 0.02;

/// LEDBAT-style rate controller for one session's outgoing files.
#[derive(Debug, Clone)]
pub struct Scavenger {
    rate: f64,
    /// Bytes that may go now (negative: owed).
    credit: f64,
    last: Instant,
    last_step: Instant,
    /// Minimum RTT per bucket, newest last: (bucket start, minimum).
    minima: VecDeque<(Instant, Duration)>,
    /// The newest sample.
    rtt: Option<Duration>,
}

impl Scavenger {
    pub fn new(now: Instant) -> Scavenger {
        Scavenger {
            rate: START_RATE,
            credit: 0.0,
            last: now,
            last_step: now,
            minima: VecDeque::with_capacity(BUCKETS + 1),
            rtt: None,
        }
    }

    /// The current rate, bytes per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The lowest RTT seen in the last minute: the path without a queue.
    pub fn base_rtt(&self) -> Option<Duration> {
        self.minima.iter().map(|&(_, m)| m).min()
    }

    /// Queueing delay now: the newest RTT above the base.
    pub fn queueing_delay(&self) -> Option<Duration> {
        Some(self.rtt?.saturating_sub(self.base_rtt()?))
    }

    /// A new RTT sample of the session's connection.
    pub fn on_rtt(&mut self, now: Instant, rtt: Duration) {
        self.rtt = Some(rtt);
        match self.minima.back_mut() {
            Some((start, m)) if now.saturating_duration_since(*start) < BUCKET => {
                *m = (*m).min(rtt);
            }
            _ => {
                self.minima.push_back((now, rtt));
                while self.minima.len() > BUCKETS {
                    self.minima.pop_front();
                }
            }
        }
        let since = now.saturating_duration_since(self.last_step);
        if since < STEP {
            return;
        }
        self.last_step = now;
        if since > 10 * BUCKET {
            // Idle for long: start over gently.
            self.rate = START_RATE;
            return;
        }
        let Some(queued) = self.queueing_delay() else {
            return;
        };
        // +1 with no queue, 0 at the target, negative above it.
        let off = 1.0 - queued.as_secs_f64() / TARGET.as_secs_f64();
        let factor = if off >= 0.0 {
            1.0 + GAIN_UP * off
        } else {
            (1.0 + GAIN_DOWN * off).max(0.5)
        };
        self.rate = (self.rate * factor).clamp(MIN_RATE, MAX_RATE);
    }

    /// How long to wait before sending `bytes` more (zero: go now). The bytes are then counted
    /// as sent.
    pub fn reserve(&mut self, now: Instant, bytes: usize) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.credit = (self.credit + elapsed * self.rate).min(self.rate * BURST);
        self.credit -= bytes as f64;
        if self.credit >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.credit / self.rate)
        }
    }
}

/// Where a [`Pacer`] reads the session's RTT (`quinn::Connection::rtt`, in the programs).
pub type RttSource = Arc<dyn Fn() -> Duration + Send + Sync>;

/// A [`Scavenger`] fed from an RTT source, shared by a session's outgoing transfers.
pub struct Pacer {
    rtt: RttSource,
    state: Mutex<Scavenger>,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("Pacer")
            .field("rate", &s.rate())
            .field("base_rtt", &s.base_rtt())
            .finish()
    }
}

impl Pacer {
    pub fn new(rtt: RttSource) -> Pacer {
        Pacer {
            rtt,
            state: Mutex::new(Scavenger::new(Instant::now())),
        }
    }

    /// Waits until `bytes` more may go. Samples the RTT on the way, so a queue that builds
    /// while the transfer waits is seen.
    pub async fn wait(&self, bytes: usize) {
        let mut bytes = bytes;
        loop {
            let wait = {
                let now = Instant::now();
                let rtt = (self.rtt)();
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                s.on_rtt(now, rtt);
                s.reserve(now, std::mem::take(&mut bytes))
            };
            if wait.is_zero() {
                return;
            }
            // Short sleeps, so that a rate change applies to what is still owed.
            tokio::time::sleep(wait.min(STEP)).await;
            if wait <= STEP {
                return;
            }
        }
    }

    /// The current rate, bytes per second.
    pub fn rate(&self) -> f64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).rate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds `rtt` every 5 ms for `for_ms` while sending as fast as allowed; returns bytes sent.
    fn run(s: &mut Scavenger, t: &mut Instant, for_ms: u64, rtt: impl Fn(f64) -> Duration) -> f64 {
        let mut sent = 0.0;
        let end = *t + Duration::from_millis(for_ms);
        while *t < end {
            s.on_rtt(*t, rtt(s.rate()));
            let mut wait = s.reserve(*t, 0);
            while wait.is_zero() {
                sent += 64e3;
                wait = s.reserve(*t, 64 << 10);
            }
            *t += 5 * MS;
        }
        sent
    }

    #[test]
    fn grows_without_a_queue() {
        let mut t = Instant::now();
        let mut s = Scavenger::new(t);
        run(&mut s, &mut t, 2000, |_| 2 * MS);
        assert!(s.rate() > 100.0 * START_RATE, "rate {}", s.rate());
        assert_eq!(s.queueing_delay(), Some(Duration::ZERO));
    }

    #[test]
    fn settles_where_the_queue_is_at_the_target() {
        // A 10 MB/s bottleneck with 20 ms of base RTT: above it, the queue grows with the rate.
        let mut t = Instant::now();
        let mut s = Scavenger::new(t);
        let capacity = 10e6;
        let path = |rate: f64| {
            let excess = (rate / capacity - 1.0).max(0.0);
            20 * MS + Duration::from_secs_f64((excess * 0.05).min(2.0))
        };
        run(&mut s, &mut t, 5000, path);
        let q = s.queueing_delay().unwrap();
        assert!(q <= 2 * TARGET, "queueing delay {q:?}");
        assert!(s.rate() > 0.8 * capacity, "rate {} too timid", s.rate());
        assert!(s.rate() < 1.5 * capacity, "rate {}", s.rate());
    }

    #[test]
    fn backs_off_fast_when_the_queue_grows_and_never_stops() {
        let mut t = Instant::now();
        let mut s = Scavenger::new(t);
        run(&mut s, &mut t, 1000, |_| 5 * MS);
        let fast = s.rate();
        // Someone else fills the queue: +200 ms.
        run(&mut s, &mut t, 250, |_| 205 * MS);
        assert!(s.rate() < fast / 100.0, "{} after {fast}", s.rate());
        run(&mut s, &mut t, 5000, |_| 205 * MS);
        assert_eq!(s.rate(), MIN_RATE);
        let sent = run(&mut s, &mut t, 1000, |_| 205 * MS);
        assert!(
            sent >= 0.9 * MIN_RATE,
            "sent {sent} in a second at the floor"
        );
        // The queue drains: the rate comes back.
        run(&mut s, &mut t, 2000, |_| 5 * MS);
        assert!(s.rate() > 10.0 * MIN_RATE);
    }

    #[test]
    fn the_base_rtt_follows_a_route_change_within_a_minute() {
        let mut t = Instant::now();
        let mut s = Scavenger::new(t);
        run(&mut s, &mut t, 1000, |_| 5 * MS);
        // The path now has 60 ms more propagation delay: treated as queue, then as base.
        run(
            &mut s,
            &mut t,
            (BUCKETS as u64 + 1) * BUCKET.as_millis() as u64,
            |_| 65 * MS,
        );
        assert_eq!(s.base_rtt(), Some(65 * MS));
        assert_eq!(s.queueing_delay(), Some(Duration::ZERO));
    }

    #[test]
    fn no_burst_after_a_pause() {
        let mut t = Instant::now();
        let mut s = Scavenger::new(t);
        s.on_rtt(t, 10 * MS);
        t += Duration::from_secs(5);
        let rate = s.rate();
        let mut burst = 0.0;
        while s.reserve(t, 1024).is_zero() {
            burst += 1024.0;
        }
        assert!(burst <= rate * BURST + 1024.0, "burst {burst}");
    }
}
