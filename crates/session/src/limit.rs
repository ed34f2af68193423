//! How many codes the agent lets anyone try: its own limit, because the relay's join limits do not
//! bind a hostile relay, which can pair a console of its own with the agent as often as it likes.
//!
//! Every handshake that starts after a technician joined is one guess at the code's secret (the
//! agent's PAKE reply lets the other side test one guess), so every one that does not end in a
//! confirmed session counts as a failure: a wrong code, a broken or abandoned handshake, a timeout.
//! After a failure the agent shows no code for a pause that doubles each time; after
//! [`GuessLimit::lock_after`] failures in a row it shows no code at all until the user asks for one,
//! and from then on every further failure needs the user again. A confirmed session resets the
//! count. Pure: the caller supplies the clock.

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant, SystemTime};

/// How long a remembered failure counts after the last one.
pub const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What the agent keeps across restarts (in a file of its user's), so that a relay that makes the
/// agent exit, or a user who restarts it, does not get a fresh count of guesses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    /// Failed handshakes in a row.
    pub failures: u32,
    /// When the last one failed, seconds since the Unix epoch.
    pub last_failure_unix: u64,
}

/// Settings of the agent's own guess limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuessLimit {
    /// The pause after the first failure; it doubles after each further one.
    pub first_pause: Duration,
    /// The longest pause.
    pub max_pause: Duration,
    /// After this many failures in a row no new code appears until the user asks for one.
    pub lock_after: u32,
}

impl Default for GuessLimit {
    fn default() -> Self {
        GuessLimit {
            first_pause: Duration::from_secs(30),
            max_pause: Duration::from_secs(15 * 60),
            lock_after: 3,
        }
    }
}

/// What the agent does after a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterFailure {
    /// Show a new code once this much time has passed.
    Pause(Duration),
    /// Show no code until the user asks for one.
    Locked,
}

/// Whether a new code may be shown now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// Not before this instant.
    Until(Instant),
    /// Not before the user asks.
    Locked,
}

/// The count of failed handshakes and what follows from it.
#[derive(Clone, Debug)]
pub struct Tries {
    limit: GuessLimit,
    failures: u32,
    gate: Gate,
    last_failure: Option<SystemTime>,
}

impl Tries {
    pub fn new(limit: GuessLimit) -> Tries {
        Tries {
            limit,
            failures: 0,
            gate: Gate::Open,
            last_failure: None,
        }
    }

    fn pause_after(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(20);
        self.limit
            .first_pause
            .saturating_mul(1u32 << doublings)
            .min(self.limit.max_pause)
    }

    /// What to keep across restarts.
    pub fn remembered(&self) -> Remembered {
        Remembered {
            failures: self.failures,
            last_failure_unix: self
                .last_failure
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// Takes up a count kept by an earlier run: locked stays locked, a pause goes on for what is
    /// left of it; forgotten after [`FORGET_AFTER`] (or when the clock went backwards).
    pub fn restore(&mut self, r: Remembered, now_wall: SystemTime, now: Instant) {
        let last = SystemTime::UNIX_EPOCH + Duration::from_secs(r.last_failure_unix);
        let Ok(ago) = now_wall.duration_since(last) else {
            return;
        };
        if r.failures == 0 || ago >= FORGET_AFTER {
            return;
        }
        self.failures = r.failures;
        self.last_failure = Some(last);
        self.gate = if r.failures >= self.limit.lock_after.max(1) {
            Gate::Locked
        } else {
            Gate::Until(now + self.pause_after(r.failures).saturating_sub(ago))
        };
    }

    /// Failed handshakes since the last confirmed session.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Records a failure at `now` (`wall`: the same moment on the wall clock, kept across
    /// restarts) and says what follows.
    pub fn failed(&mut self, now: Instant, wall: SystemTime) -> AfterFailure {
        self.failures = self.failures.saturating_add(1);
        self.last_failure = Some(wall);
        if self.failures >= self.limit.lock_after.max(1) {
            self.gate = Gate::Locked;
            return AfterFailure::Locked;
        }
        let pause = self.pause_after(self.failures);
        self.gate = Gate::Until(now + pause);
        AfterFailure::Pause(pause)
    }

    /// A confirmed session: the count starts again.
    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.gate = Gate::Open;
        self.last_failure = None;
    }

    /// The user asked for a new code: one more code may be shown now, whatever the count (the
    /// count stays, so a further failure locks again).
    pub fn user_asked(&mut self) {
        self.gate = Gate::Open;
    }

    /// Whether a code may be shown at `now`.
    pub fn gate(&self, now: Instant) -> Gate {
        match self.gate {
            Gate::Until(t) if now >= t => Gate::Open,
            g => g,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wall clock where a test does not look at it.
    const WALL: SystemTime = SystemTime::UNIX_EPOCH;

    #[test]
    fn pauses_double_then_lock_after_three() {
        let mut t = Tries::new(GuessLimit::default());
        let t0 = Instant::now();
        assert_eq!(t.gate(t0), Gate::Open);
        assert_eq!(
            t.failed(t0, WALL),
            AfterFailure::Pause(Duration::from_secs(30))
        );
        assert_eq!(
            t.gate(t0 + Duration::from_secs(29)),
            Gate::Until(t0 + Duration::from_secs(30))
        );
        assert_eq!(t.gate(t0 + Duration::from_secs(30)), Gate::Open);
        let t1 = t0 + Duration::from_secs(31);
        assert_eq!(
            t.failed(t1, WALL),
            AfterFailure::Pause(Duration::from_secs(60))
        );
        assert_eq!(
            t.gate(t1 + Duration::from_secs(59)),
            Gate::Until(t1 + Duration::from_secs(60))
        );
        let t2 = t1 + Duration::from_secs(61);
        assert_eq!(t.failed(t2, WALL), AfterFailure::Locked);
        // Locked for good: no amount of waiting opens it.
        assert_eq!(t.gate(t2 + Duration::from_secs(86_400 * 365)), Gate::Locked);
        assert_eq!(t.failures(), 3);
    }

    #[test]
    fn after_the_lock_each_code_needs_the_user() {
        let mut t = Tries::new(GuessLimit::default());
        let now = Instant::now();
        for _ in 0..3 {
            t.failed(now, WALL);
        }
        t.user_asked();
        assert_eq!(t.gate(now), Gate::Open);
        assert_eq!(t.failed(now, WALL), AfterFailure::Locked);
        assert_eq!(t.gate(now + Duration::from_secs(3600)), Gate::Locked);
    }

    #[test]
    fn a_confirmed_session_starts_the_count_again() {
        let mut t = Tries::new(GuessLimit::default());
        let now = Instant::now();
        t.failed(now, WALL);
        t.failed(now, WALL);
        t.succeeded();
        assert_eq!(t.failures(), 0);
        assert_eq!(t.gate(now), Gate::Open);
        assert_eq!(
            t.failed(now, WALL),
            AfterFailure::Pause(Duration::from_secs(30))
        );
    }

    #[test]
    fn pauses_are_capped_and_never_overflow() {
        let mut t = Tries::new(GuessLimit {
            first_pause: Duration::from_secs(30),
            max_pause: Duration::from_secs(100),
            lock_after: u32::MAX,
        });
        let now = Instant::now();
        let mut last = Duration::ZERO;
        for _ in 0..100 {
            match t.failed(now, WALL) {
                AfterFailure::Pause(p) => {
                    assert!(p >= last && p <= Duration::from_secs(100));
                    last = p;
                }
                AfterFailure::Locked => panic!("never locks"),
            }
        }
        assert_eq!(last, Duration::from_secs(100));
    }

    #[test]
    fn a_restart_keeps_the_count() {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let now = Instant::now();
        let at = |secs_ago: u64, failures: u32| Remembered {
            failures,
            last_failure_unix: 1_800_000_000 - secs_ago,
        };
        // Locked stays locked.
        let mut t = Tries::new(GuessLimit::default());
        t.restore(at(3600, 3), wall, now);
        assert_eq!(t.gate(now + Duration::from_secs(3600)), Gate::Locked);
        assert_eq!(t.failures(), 3);
        // A pause goes on for what is left of it: the second pause is 60 s, 20 s have passed.
        let mut t = Tries::new(GuessLimit::default());
        t.restore(at(20, 2), wall, now);
        assert_eq!(t.gate(now), Gate::Until(now + Duration::from_secs(40)));
        assert_eq!(
            t.failed(now + Duration::from_secs(40), WALL),
            AfterFailure::Locked
        );
        // Forgotten after a day, or with a clock that went backwards.
        let mut t = Tries::new(GuessLimit::default());
        t.restore(at(FORGET_AFTER.as_secs(), 3), wall, now);
        assert_eq!((t.gate(now), t.failures()), (Gate::Open, 0));
        t.restore(
            Remembered {
                failures: 3,
                last_failure_unix: 1_900_000_000,
            },
            wall,
            now,
        );
        assert_eq!(t.gate(now), Gate::Open);
        // What a failure records comes back.
        let mut t = Tries::new(GuessLimit::default());
        t.failed(now, SystemTime::now());
        let r = t.remembered();
        assert_eq!(r.failures, 1);
        let mut u = Tries::new(GuessLimit::default());
        u.restore(r, SystemTime::now(), now);
        assert_eq!(u.failures(), 1);
        assert!(matches!(u.gate(now), Gate::Until(_)));
    }

    /// The guesses a hostile relay gets against one waiting agent that nobody attends, over a day.
    #[test]
    fn an_unattended_agent_allows_three_guesses_in_total() {
        let mut t = Tries::new(GuessLimit::default());
        let start = Instant::now();
        let mut now = start;
        let mut guesses = 0;
        while now < start + Duration::from_secs(86_400) {
            match t.gate(now) {
                Gate::Open => {
                    guesses += 1;
                    t.failed(now, WALL);
                }
                Gate::Until(at) => now = at,
                Gate::Locked => break,
            }
        }
        assert_eq!(guesses, 3);
        assert!(now - start >= Duration::from_secs(90));
    }
}
