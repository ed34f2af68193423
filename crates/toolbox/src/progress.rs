//! Progress reports: throttled, with a rate over a sliding window and an estimate of the time left.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Reports are at most this frequent (plus one at each change of stage and one at the end).
pub const REPORT_INTERVAL: Duration = Duration::from_millis(100);
/// The rate is measured over about this long.
pub const RATE_WINDOW: Duration = Duration::from_secs(1);

/// What a transfer is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The sender reads the file once to compute its hash before offering it.
    Hashing,
    /// Chunks are going out.
    Sending,
    /// Chunks are coming in.
    Receiving,
    /// Finished and verified.
    Done,
}

/// One progress report, for a progress bar or a JSON event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Progress {
    /// The file's relative name as offered (`folder/file.txt`).
    pub name: String,
    /// What is happening.
    pub stage: Stage,
    /// Bytes done, counting those a resumed transfer already had.
    pub done: u64,
    /// Size of the file.
    pub total: u64,
    /// Where this transfer resumed (0 for a fresh one).
    pub resumed_from: u64,
    /// Bytes per second over about the last second.
    pub rate: f64,
    /// Seconds left at the current rate, when there is a rate to go by.
    pub eta_secs: Option<f64>,
}

impl Progress {
    /// Fraction done, 0.0 ..= 1.0 (1.0 for an empty file).
    pub fn fraction(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.done as f64 / self.total as f64
        }
    }

    /// A one-line summary: `report.pdf: 12.0 MB of 20.0 MB, 3.4 MB/s, 3 s left`.
    pub fn line(&self) -> String {
        let mut line = format!(
            "{}: {} of {}",
            self.name,
            human_bytes(self.done),
            human_bytes(self.total)
        );
        match self.stage {
            Stage::Hashing => line.push_str(" checked"),
            Stage::Done => line.push_str(", done"),
            Stage::Sending | Stage::Receiving => {
                line.push_str(", ");
                line.push_str(&human_rate(self.rate));
                if let Some(eta) = self.eta_secs {
                    line.push_str(&format!(", {} left", human_duration(eta)));
                }
            }
        }
        line
    }
}

/// `999 B`, `1.2 kB`, `3.4 MB`, `1.2 GB` (decimal units, as file managers show them).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["kB", "MB", "GB", "TB", "PB", "EB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    while value >= 999.95 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `1.2 MB/s`; `0 B/s` for a rate that is not a positive number.
pub fn human_rate(bytes_per_sec: f64) -> String {
    let rate = if bytes_per_sec.is_finite() && bytes_per_sec > 0.0 {
        bytes_per_sec.round() as u64
    } else {
        0
    };
    format!("{}/s", human_bytes(rate))
}

/// `42 s`, `3 min 05 s`, `2 h 07 min`.
pub fn human_duration(secs: f64) -> String {
    let secs = if secs.is_finite() && secs > 0.0 {
        secs.ceil() as u64
    } else {
        0
    };
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min {:02} s", secs / 60, secs % 60),
        _ => format!("{} h {:02} min", secs / 3600, secs % 3600 / 60),
    }
}

/// Rate over a sliding window, from (time, bytes done) samples.
#[derive(Debug, Clone)]
pub(crate) struct RateMeter {
    samples: VecDeque<(Instant, u64)>,
}

impl RateMeter {
    pub(crate) fn new(now: Instant, done: u64) -> Self {
        Self {
            samples: VecDeque::from([(now, done)]),
        }
    }

    /// Records a sample and returns the rate in bytes/s over about [`RATE_WINDOW`].
    pub(crate) fn observe(&mut self, now: Instant, done: u64) -> f64 {
        self.samples.push_back((now, done));
        // Keep exactly one sample at least a window old as the base.
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|&(t, _)| now.duration_since(t) >= RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        let (Some(&(t0, d0)), Some(&(t1, d1))) = (self.samples.front(), self.samples.back()) else {
            return 0.0;
        };
        let dt = t1.duration_since(t0).as_secs_f64();
        if dt < 0.01 {
            0.0
        } else {
            d1.saturating_sub(d0) as f64 / dt
        }
    }
}

/// Remaining seconds at `rate`, when there is one.
pub(crate) fn eta(done: u64, total: u64, rate: f64) -> Option<f64> {
    (rate > 0.0).then(|| total.saturating_sub(done) as f64 / rate)
}

/// Calls the user's callback at most every [`REPORT_INTERVAL`], always on a change of stage and
/// at the end.
pub(crate) struct Reporter<P> {
    callback: P,
    current: Progress,
    meter: RateMeter,
    last: Option<Instant>,
}

impl<P: FnMut(&Progress)> Reporter<P> {
    pub(crate) fn new(callback: P, name: String, total: u64) -> Self {
        let current = Progress {
            name,
            stage: Stage::Hashing,
            done: 0,
            total,
            resumed_from: 0,
            rate: 0.0,
            eta_secs: None,
        };
        Self {
            callback,
            current,
            meter: RateMeter::new(Instant::now(), 0),
            last: None,
        }
    }

    /// Starts a stage at `done` bytes (resets the rate).
    pub(crate) fn stage(&mut self, stage: Stage, done: u64, resumed_from: u64) {
        self.current.stage = stage;
        self.current.resumed_from = resumed_from;
        self.meter = RateMeter::new(Instant::now(), done);
        self.last = None;
        self.update(done);
    }

    /// Reports `done` if the last report is old enough.
    pub(crate) fn update(&mut self, done: u64) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < REPORT_INTERVAL)
        {
            return;
        }
        self.emit(now, done);
    }

    /// Reports the end of a successful transfer.
    pub(crate) fn done(&mut self, done: u64) {
        self.current.stage = Stage::Done;
        self.emit(Instant::now(), done);
    }

    fn emit(&mut self, now: Instant, done: u64) {
        self.last = Some(now);
        self.current.done = done;
        self.current.rate = self.meter.observe(now, done);
        self.current.eta_secs = match self.current.stage {
            Stage::Done => Some(0.0),
            _ => eta(done, self.current.total, self.current.rate),
        };
        (self.callback)(&self.current);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1000), "1.0 kB");
        assert_eq!(human_bytes(1_234_567), "1.2 MB");
        assert_eq!(human_bytes(999_999), "1.0 MB");
        assert_eq!(human_bytes(3_400_000_000), "3.4 GB");
        assert_eq!(human_bytes(u64::MAX), "18.4 EB");
        assert_eq!(human_rate(12_300_000.0), "12.3 MB/s");
        assert_eq!(human_rate(f64::NAN), "0 B/s");
        assert_eq!(human_rate(-5.0), "0 B/s");
        assert_eq!(human_duration(41.2), "42 s");
        assert_eq!(human_duration(185.0), "3 min 05 s");
        assert_eq!(human_duration(7620.0), "2 h 07 min");
    }

    #[test]
    fn rate_uses_about_the_last_second() {
        let t0 = Instant::now();
        let mut m = RateMeter::new(t0, 0);
        let ms = Duration::from_millis;
        // 1 MB/s for two seconds...
        for i in 1..=20u64 {
            m.observe(t0 + ms(100 * i), 100_000 * i);
        }
        // ...then 10 MB/s: after one more second the old rate is gone.
        let mut rate = 0.0;
        for i in 1..=10u64 {
            rate = m.observe(t0 + ms(2000 + 100 * i), 2_000_000 + 1_000_000 * i);
        }
        assert!((rate - 10_000_000.0).abs() < 1.0, "{rate}");
        assert_eq!(eta(0, 20_000_000, 10_000_000.0), Some(2.0));
        assert_eq!(eta(0, 1, 0.0), None);
    }

    #[test]
    fn reporter_throttles_but_reports_stage_changes_and_the_end() {
        let mut seen = Vec::new();
        let mut r = Reporter::new(|p: &Progress| seen.push((p.stage, p.done)), "f".into(), 100);
        r.stage(Stage::Sending, 10, 10);
        for done in 11..100 {
            r.update(done);
        }
        r.done(100);
        drop(r);
        assert_eq!(seen.first(), Some(&(Stage::Sending, 10)));
        assert_eq!(seen.last(), Some(&(Stage::Done, 100)));
        assert!(seen.len() < 10, "{seen:?}");
    }

    #[test]
    fn progress_serialises_to_json() {
        let p = Progress {
            name: "a.txt".into(),
            stage: Stage::Receiving,
            done: 5,
            total: 10,
            resumed_from: 2,
            rate: 1.5,
            eta_secs: Some(3.3),
        };
        let json = serde_json::to_string(&p).unwrap_or_default();
        assert!(json.contains(r#""stage":"receiving""#), "{json}");
        assert!(json.contains(r#""resumed_from":2"#), "{json}");
        assert_eq!(p.fraction(), 0.5);
        assert!(
            p.line().starts_with("a.txt: 5 B of 10 B, 2 B/s"),
            "{}",
            p.line()
        );
    }
}
