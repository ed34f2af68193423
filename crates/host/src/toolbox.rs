//! The toolbox's decisions on the agent: what may cross the shared clipboard, in which direction,
//! and how often. The agent enforces them, whatever the console sends.
//!
//! * Only in a session where the user allowed control and that is not view only right now.
//! * Each direction can be switched off by policy (`[toolbox]` in the agent's configuration) and
//!   by the user during the session (the agent window's switches).
//! * Text is shared by default; an image from the technician is asked for (the user accepts it in
//!   the window; without a window it is refused unless the policy says `yes`).
//! * At most [`CLIP_BURST`] updates at once and [`CLIP_PER_MINUTE`] a minute each way: a program
//!   that rewrites the clipboard in a loop does not flood the session.
//! * Nothing is kept after the session: the X clipboard bridge is dropped with it (giving up the
//!   ownership of what the technician put there).

use crate::clipboard::{ClipContent, X11Clipboard};
use std::sync::Arc;
use std::time::Instant;
use tandem_session::{ClipFormat, ClipItem};
use tokio::sync::mpsc;

/// What to do with an image the technician puts on the clipboard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImagePolicy {
    /// Refused.
    No,
    /// The user is asked (refused where nobody can be asked).
    #[default]
    Ask,
    /// Accepted like text.
    Yes,
}

/// The clipboard's policy for sessions (the configuration's `[toolbox]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClipboardPolicy {
    /// The user's clipboard goes to the technician.
    pub to_technician: bool,
    /// The technician's clipboard comes to the user.
    pub from_technician: bool,
    pub images: ImagePolicy,
    /// Someone can answer an image question (a window).
    pub can_ask: bool,
}

impl Default for ClipboardPolicy {
    fn default() -> Self {
        ClipboardPolicy {
            to_technician: true,
            from_technician: true,
            images: ImagePolicy::Ask,
            can_ask: false,
        }
    }
}

/// Updates allowed at once, each way.
pub const CLIP_BURST: f64 = 5.0;
/// Updates allowed a minute, each way, after the burst.
pub const CLIP_PER_MINUTE: f64 = 30.0;

/// A token bucket.
#[derive(Debug)]
pub struct RateLimit {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    last: Instant,
}

impl RateLimit {
    pub fn new(burst: f64, per_minute: f64, now: Instant) -> RateLimit {
        RateLimit {
            tokens: burst,
            burst,
            per_sec: per_minute / 60.0,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What becomes of a clipboard update.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<T> {
    Pass(T),
    /// The user is asked (images from the technician).
    Ask(T),
    Refuse(&'static str),
}

/// The clipboard's state in one session.
pub struct ClipState {
    policy: ClipboardPolicy,
    /// The user's switches (start as the policy says).
    pub to_technician: bool,
    pub from_technician: bool,
    out_limit: RateLimit,
    in_limit: RateLimit,
}

impl ClipState {
    pub fn new(policy: ClipboardPolicy, now: Instant) -> ClipState {
        ClipState {
            policy,
            to_technician: policy.to_technician,
            from_technician: policy.from_technician,
            out_limit: RateLimit::new(CLIP_BURST, CLIP_PER_MINUTE, now),
            in_limit: RateLimit::new(CLIP_BURST, CLIP_PER_MINUTE, now),
        }
    }

    /// The user switches a direction; the policy's "off" stays off.
    pub fn switch(&mut self, to_technician: bool, from_technician: bool) {
        self.to_technician = to_technician && self.policy.to_technician;
        self.from_technician = from_technician && self.policy.from_technician;
    }

    /// The user's clipboard changed: whether it goes to the technician.
    pub fn outgoing(
        &mut self,
        c: ClipContent,
        control: bool,
        now: Instant,
    ) -> Verdict<(ClipFormat, Vec<u8>)> {
        if !control {
            return Verdict::Refuse("the session is view only");
        }
        if !self.to_technician {
            return Verdict::Refuse("sharing the clipboard with the technician is switched off");
        }
        let item = match c {
            ClipContent::Text(t) => (ClipFormat::Text, t.into_bytes()),
            ClipContent::Png(p) => (ClipFormat::Png, p),
        };
        if item.1.len() > item.0.limit() {
            return Verdict::Refuse("too large");
        }
        if !self.out_limit.take(now) {
            return Verdict::Refuse("the clipboard changes too often");
        }
        Verdict::Pass(item)
    }

    /// The technician sent a clipboard update: whether it is put on the user's clipboard.
    pub fn incoming(
        &mut self,
        item: ClipItem,
        control: bool,
        now: Instant,
    ) -> Verdict<ClipContent> {
        if !control {
            return Verdict::Refuse("the session is view only");
        }
        if !self.from_technician {
            return Verdict::Refuse("taking the technician's clipboard is switched off");
        }
        if !self.in_limit.take(now) {
            return Verdict::Refuse("the technician's clipboard changes too often");
        }
        match item.format {
            ClipFormat::Text => match String::from_utf8(item.data.to_vec()) {
                Ok(t) => Verdict::Pass(ClipContent::Text(t)),
                Err(_) => Verdict::Refuse("not UTF-8 text"),
            },
            ClipFormat::Png => match self.policy.images {
                ImagePolicy::No => Verdict::Refuse("images are switched off by policy"),
                ImagePolicy::Yes => Verdict::Pass(ClipContent::Png(item.data.to_vec())),
                ImagePolicy::Ask if self.policy.can_ask => {
                    Verdict::Ask(ClipContent::Png(item.data.to_vec()))
                }
                ImagePolicy::Ask => Verdict::Refuse("images need the user's answer in the window"),
            },
        }
    }
}

/// The agent's X clipboard for one session.
pub struct Bridge {
    x: Arc<X11Clipboard>,
    rx: mpsc::Receiver<ClipContent>,
}

impl Bridge {
    /// Connects to the X display's clipboard (off the async runtime).
    pub async fn start(display: Option<String>) -> Result<Bridge, String> {
        let r = tokio::task::spawn_blocking(move || X11Clipboard::start(display.as_deref())).await;
        match r {
            Ok(Ok((x, rx))) => Ok(Bridge { x: Arc::new(x), rx }),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The next change another program made. Cancel-safe.
    pub async fn changed(&mut self) -> Option<ClipContent> {
        self.rx.recv().await
    }

    /// Puts `c` on the clipboard.
    pub async fn set(&self, c: ClipContent) -> Result<(), String> {
        let x = self.x.clone();
        match tokio::task::spawn_blocking(move || x.set(c)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn text(t: &str) -> ClipItem {
        ClipItem {
            format: ClipFormat::Text,
            data: bytes::Bytes::copy_from_slice(t.as_bytes()),
        }
    }

    #[test]
    fn view_only_and_switches_refuse_both_ways() {
        let now = Instant::now();
        let mut c = ClipState::new(ClipboardPolicy::default(), now);
        assert!(matches!(
            c.incoming(text("a"), false, now),
            Verdict::Refuse(_)
        ));
        assert!(matches!(
            c.outgoing(ClipContent::Text("a".into()), false, now),
            Verdict::Refuse(_)
        ));
        assert_eq!(
            c.incoming(text("a"), true, now),
            Verdict::Pass(ClipContent::Text("a".into()))
        );
        c.switch(false, true);
        assert!(matches!(
            c.outgoing(ClipContent::Text("a".into()), true, now),
            Verdict::Refuse(_)
        ));
        c.switch(true, false);
        assert!(matches!(
            c.incoming(text("a"), true, now),
            Verdict::Refuse(_)
        ));
        // The policy's "off" cannot be switched on by the user.
        let mut off = ClipState::new(
            ClipboardPolicy {
                to_technician: false,
                ..Default::default()
            },
            now,
        );
        off.switch(true, true);
        assert!(!off.to_technician);
    }

    #[test]
    fn images_are_asked_refused_without_a_window_or_passed() {
        let now = Instant::now();
        let png = ClipItem {
            format: ClipFormat::Png,
            data: bytes::Bytes::from_static(b"\x89PNG\r\n\x1a\n...."),
        };
        let mut headless = ClipState::new(ClipboardPolicy::default(), now);
        assert!(matches!(
            headless.incoming(png.clone(), true, now),
            Verdict::Refuse(_)
        ));
        let mut window = ClipState::new(
            ClipboardPolicy {
                can_ask: true,
                ..Default::default()
            },
            now,
        );
        assert!(matches!(
            window.incoming(png.clone(), true, now),
            Verdict::Ask(_)
        ));
        let mut yes = ClipState::new(
            ClipboardPolicy {
                images: ImagePolicy::Yes,
                ..Default::default()
            },
            now,
        );
        assert!(matches!(yes.incoming(png, true, now), Verdict::Pass(_)));
    }

    #[test]
    fn a_flood_is_limited_and_the_bucket_refills() {
        let t0 = Instant::now();
        let mut c = ClipState::new(ClipboardPolicy::default(), t0);
        let passed = (0..100)
            .filter(|_| matches!(c.incoming(text("x"), true, t0), Verdict::Pass(_)))
            .count();
        assert_eq!(passed, CLIP_BURST as usize);
        // 2 s later: one more (30 a minute).
        let t1 = t0 + Duration::from_secs(2);
        assert!(matches!(c.incoming(text("x"), true, t1), Verdict::Pass(_)));
        assert!(matches!(
            c.incoming(text("x"), true, t1),
            Verdict::Refuse(_)
        ));
    }
}
