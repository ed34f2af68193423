//! When the machine, not the path, is too slow: the screen pipeline's own overuse detector.
//!
//! The pipeline halves the picture when the path cannot carry full resolution
//! ([`crate::pipeline::HALVE_BELOW_BITS_PER_PIXEL`]). This is the other reason: the agent's CPU cannot
//! capture and encode full-resolution frames as fast as the screen changes. Measured at 1920×1080
//! on the reference 2-core machine with the console beside the agent (the glass bench), a screen
//! full of motion gave the technician 10 frames a second, each ≈100 ms old; halved, it costs about
//! a quarter and keeps 30 frames a second, 19–20 ms glass-to-glass.
//!
//! The rule (as WebRTC's CPU-overuse detector, with thresholds chosen for screen content, where
//! sharp text matters more than frame rate):
//! * **Down** when the median capture → encoded time of the last [`WINDOW`] frames at full
//!   resolution exceeds one and a half frame intervals (under 20 frames a second at a 30 fps
//!   target). A scene that is merely expensive (scrolling text, 20–40 ms a frame under load)
//!   stays sharp: halved, a 15-pixel scroll becomes a 7.5-pixel one that the encoder's scroll
//!   detection cannot follow, and the text blurs (measured: with the threshold at one interval the
//!   scrolling scene switched back and forth, each switch a keyframe, 4.9 Mbit/s at 17 fps).
//!   When each of the last [`FAST`] frames took that long, and each began within [`IN_A_ROW`]
//!   frame intervals of the end of the one before, that decides at once: a screen that suddenly
//!   fills with motion would otherwise show the technician a window's worth of slow frames first.
//!   Two slow frames with a still screen between them are two single changes (a page drawn, then
//!   a second later another), not motion the machine cannot keep up with.
//! * **Down** also on motion: when each of [`WINDOW`] frames that followed one another (each began
//!   within [`IN_A_ROW`] intervals of the end of the one before) changed most of the screen (half
//!   of it or more, in the change detector's 64-pixel tiles) without the encoder finding it
//!   scrolled, and their median cost is over half a frame interval. That is a video, a game, a
//!   map being panned or a large window dragged or resized over the whole screen for a third of a
//!   second or more. The agent's own frames keep up with it, but at 1080p (15–25 ms a frame on
//!   the reference machine) they queue behind each other as soon as anything else wants the CPU:
//!   in the glass bench, where the console shares the 2 cores, full-screen motion ran at 25–38 ms
//!   p50 and reached 66–76 ms p99 in the busier runs. Halved it costs a quarter. What stays sharp:
//!   a vertical scroll (the encoder's scroll detector, which finds vertical moves of up to 511
//!   lines, misses some frames of a scroll but not all of them; a scroll is marked after its frame
//!   is measured, so the rule looks at the frames before the newest), a window's opening
//!   animation (shorter), expensive changes with still moments between them (a slideshow, pages
//!   of a PDF, windows switched), and whatever changes a smaller part of the screen (typing, a
//!   dragged window). Below [`LATENCY_FIRST_BPS`](crate::encode::LATENCY_FIRST_BPS) OpenH264 also
//!   runs the feature search on frames that are not scrolls, which then do not count as motion
//!   either: the rule errs towards sharp there (and the path halves the picture below about
//!   1.2 Mbit/s at 1080p anyway).
//! * **Up** when the same frames at full resolution would cost under half the interval (estimated
//!   from the halved frames: four times the encode, the rest as measured) and the picture has been
//!   halved for at least the hold time, or when the screen rests: the pipeline's refinement of
//!   a motion comes at full resolution ([`LoadGovernor::rested`]), and a picture still for
//!   [`QUIET`] with no refinement due comes back too (the switch is a keyframe).
//! * The hold time starts at [`HOLD_MIN`] and doubles (up to [`HOLD_MAX`]) each time the picture
//!   has to be halved again within [`RELAPSE`] of coming back: content that flips between cheap and
//!   expensive does not become a stream of keyframes.
//! * After a switch the window starts empty, so a decision always rests on [`WINDOW`] frames
//!   measured at the current resolution: no flapping on a single slow frame.
//!
//! The pipeline applies the decision to screens of at least
//! [`LOAD_HALVE_MIN`](crate::pipeline::LOAD_HALVE_MIN) only.
//!
//! Pure logic: time comes in as arguments, tested without clocks or X.

use crate::pipeline::StageTimes;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Frames a decision rests on.
pub const WINDOW: usize = 9;
/// Frames that decide at once when each takes over one and a half frame intervals. Measured with
/// the glass bench (1080p, console beside the agent), a screen suddenly full of motion: the
/// agent's first frames took 49, 58, 86, 63, 55 ms; with the earlier rule (three frames each over
/// two intervals) the window's median decided only after the fifth, and those frames, each
/// 70–115 ms glass to glass, alone made the scene's p99.
pub const FAST: usize = 2;
/// Frames count as in a row for [`FAST`] when each one's capture began within this many frame
/// intervals of the end of the one before: the screen was not still between them. (The gap is
/// measured from the end of one frame to the start of the next, so a frame that itself takes
/// several intervals still follows the one before it at once.)
pub const IN_A_ROW: u32 = 4;
/// A halved picture comes back to full resolution after the screen has been still this long.
pub const QUIET: Duration = Duration::from_secs(1);
/// The shortest time a picture stays halved before light frames bring it back.
pub const HOLD_MIN: Duration = Duration::from_secs(2);
pub const HOLD_MAX: Duration = Duration::from_secs(60);
/// Halving again this soon after coming back doubles the hold time.
pub const RELAPSE: Duration = Duration::from_secs(10);

/// One measured frame.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// The end of its capture → encoded time.
    at: Instant,
    /// Capture → encoded (a full-resolution estimate when halved).
    cost: Duration,
    /// Most of the screen changed and it was not a scroll.
    motion: bool,
}

#[derive(Debug)]
pub struct LoadGovernor {
    interval: Duration,
    halved: bool,
    /// Recent frames at the current resolution.
    recent: VecDeque<Measured>,
    last_frame: Option<Instant>,
    hold: Duration,
    /// When the picture was last halved, and last came back.
    halved_at: Option<Instant>,
    restored_at: Option<Instant>,
}

impl LoadGovernor {
    /// `interval`: the time between frames at the target frame rate.
    pub fn new(interval: Duration) -> Self {
        LoadGovernor {
            interval,
            halved: false,
            recent: VecDeque::with_capacity(WINDOW),
            last_frame: None,
            hold: HOLD_MIN,
            halved_at: None,
            restored_at: None,
        }
    }

    /// Whether the load asks for half resolution.
    pub fn halved(&self) -> bool {
        self.halved
    }

    pub fn set_interval(&mut self, interval: Duration) {
        self.interval = interval;
    }

    /// How long the picture stays halved at least (it grows when halving keeps coming back).
    pub fn hold(&self) -> Duration {
        self.hold
    }

    fn switch(&mut self, halved: bool, now: Instant) -> bool {
        if halved {
            let relapse = self
                .restored_at
                .is_some_and(|t| now.saturating_duration_since(t) < RELAPSE);
            self.hold = if relapse {
                (self.hold * 2).min(HOLD_MAX)
            } else {
                HOLD_MIN
            };
            self.halved_at = Some(now);
        } else {
            self.restored_at = Some(now);
        }
        self.halved = halved;
        self.recent.clear();
        true
    }

    /// A frame slower than this cannot hold the frame rate (under 20 frames a second at 30).
    fn too_slow(&self) -> Duration {
        self.interval * 3 / 2
    }

    /// The newest [`WINDOW`] frames (or fewer).
    fn window(&self) -> impl Iterator<Item = &Measured> {
        self.recent
            .iter()
            .skip(self.recent.len().saturating_sub(WINDOW))
    }

    fn median<'a>(frames: impl Iterator<Item = &'a Measured>) -> Duration {
        let mut v: Vec<Duration> = frames.map(|m| m.cost).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }

    /// Whether `next` began within [`IN_A_ROW`] frame intervals of the end of `prev`: the screen
    /// was not still between them. (From the end of one frame to the start of the next one's
    /// capture, so frames that each take several intervals still follow each other.)
    fn follows(&self, prev: &Measured, next: &Measured) -> bool {
        next.at
            .saturating_duration_since(prev.at)
            .saturating_sub(next.cost)
            <= self.interval * IN_A_ROW
    }

    /// The motion rule (see the module), over the [`WINDOW`] frames before the newest, whose
    /// scroll marks are final ([`Self::scrolled`] comes after a frame is measured).
    fn motion_overloads(&self) -> bool {
        if self.recent.len() <= WINDOW {
            return false;
        }
        let settled = || self.recent.iter().take(WINDOW);
        settled().all(|m| m.motion)
            && settled()
                .zip(settled().skip(1))
                .all(|(a, b)| self.follows(a, b))
            && Self::median(settled()) > self.interval / 2
    }

    /// One encoded frame: its stage times, whether it was encoded at half resolution (for any
    /// reason) and whether most of the screen changed. Returns true when the decision changed.
    pub fn frame(
        &mut self,
        t: StageTimes,
        picture_halved: bool,
        most_changed: bool,
        now: Instant,
    ) -> bool {
        self.last_frame = Some(now);
        let cost = if picture_halved {
            if !self.halved {
                // Halved for the path: says nothing about full-resolution cost.
                self.recent.clear();
                return false;
            }
            t.capture + t.convert + t.encode * 4
        } else {
            t.capture + t.convert + t.encode
        };
        if self.recent.len() > WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(Measured {
            at: now,
            cost,
            motion: most_changed,
        });
        // Too slow twice in a row: enough to decide.
        let n = self.recent.len();
        let last = || self.recent.range(n.saturating_sub(FAST)..);
        let in_a_row = n >= FAST
            && last().all(|m| m.cost > self.too_slow())
            && last().zip(last().skip(1)).all(|(a, b)| self.follows(a, b));
        if !self.halved && in_a_row {
            return self.switch(true, now);
        }
        if n < WINDOW {
            return false;
        }
        let m = Self::median(self.window());
        let held = self
            .halved_at
            .is_none_or(|t| now.saturating_duration_since(t) >= self.hold);
        if !self.halved && (m > self.too_slow() || self.motion_overloads()) {
            self.switch(true, now)
        } else if self.halved && held && m < self.interval / 2 {
            self.switch(false, now)
        } else {
            false
        }
    }

    /// The frame just measured was a scroll (the encoder found the content moved): not motion.
    pub fn scrolled(&mut self) {
        if let Some(m) = self.recent.back_mut() {
            m.motion = false;
        }
    }

    /// The screen has rested after a motion and its picture is about to be refined: a picture
    /// halved for the load comes back now, so the refinement is the way back to full resolution
    /// (one sharp keyframe) instead of a coarse full-resolution picture after [`QUIET`] and its
    /// refinement after that — unless it came back within [`RELAPSE`] before: content that
    /// pauses and moves again (a drag with short stops) would otherwise cost a sharp
    /// full-resolution keyframe at every stop and a halved one when it moves again; it is
    /// refined at half resolution, and comes back after [`QUIET`]. Returns true when the
    /// decision changed.
    pub fn rested(&mut self, now: Instant) -> bool {
        let flipping = self
            .restored_at
            .is_some_and(|t| now.saturating_duration_since(t) < RELAPSE);
        self.halved && !flipping && self.switch(false, now)
    }

    /// A look at the screen that found nothing to encode. Returns true when the decision changed
    /// (the screen was still for [`QUIET`] with the picture halved).
    pub fn idle(&mut self, now: Instant) -> bool {
        let still = self
            .last_frame
            .is_some_and(|t| now.saturating_duration_since(t) >= QUIET);
        if self.halved && still {
            return self.switch(false, now);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: Duration = Duration::from_millis(33);

    fn times(capture: u64, convert: u64, encode: u64) -> StageTimes {
        StageTimes {
            capture: Duration::from_millis(capture),
            convert: Duration::from_millis(convert),
            encode: Duration::from_millis(encode),
        }
    }

    /// Feeds up to `n` frames 33 ms apart, stopping at the first change of the decision; returns
    /// that frame's index.
    fn feed(g: &mut LoadGovernor, t0: &mut Instant, n: usize, t: StageTimes) -> Option<usize> {
        for i in 0..n {
            *t0 += FRAME;
            let halved = g.halved();
            if g.frame(t, halved, false, *t0) {
                return Some(i);
            }
        }
        None
    }

    #[test]
    fn expensive_but_sustainable_frames_stay_sharp() {
        let mut g = LoadGovernor::new(FRAME);
        let mut t = Instant::now();
        // Scrolling text under load: 45 ms a frame, 22 frames a second, stays sharp.
        assert_eq!(feed(&mut g, &mut t, 100, times(2, 1, 42)), None);
        assert!(!g.halved());
    }

    #[test]
    fn motion_the_cpu_cannot_keep_up_with_halves_after_two_frames_and_stays() {
        let mut g = LoadGovernor::new(FRAME);
        let mut t = Instant::now();
        assert_eq!(feed(&mut g, &mut t, 20, times(3, 2, 55)), Some(FAST - 1));
        assert!(g.halved());
        // Halved, the same motion costs a quarter to encode: 3 + 2 + 4×14 = 61 ms estimated at
        // full resolution, so it stays halved.
        assert_eq!(feed(&mut g, &mut t, 100, times(3, 2, 14)), None);
        assert!(g.halved());
    }

    /// A video over the whole screen that the agent keeps up with (19 ms a frame) but that leaves
    /// the machine little else: halved after a window (and the frame whose scroll mark settles
    /// it), and it stays halved (3 + 4 + 4 × 4 = 23 ms estimated at full resolution).
    #[test]
    fn motion_over_most_of_the_screen_halves_after_a_window() {
        let mut g = LoadGovernor::new(FRAME);
        let mut t = Instant::now();
        let mut switched = None;
        for i in 0..30 {
            t += FRAME;
            if g.frame(times(3, 1, 15), false, true, t) {
                switched = Some(i);
                break;
            }
        }
        assert_eq!(switched, Some(WINDOW));
        for _ in 0..200 {
            t += FRAME;
            assert!(!g.frame(times(3, 4, 4), true, true, t));
        }
        assert!(g.halved());
    }

    /// A slideshow, pages of a PDF, windows switched: expensive changes of the whole screen with
    /// still moments between them are not motion.
    #[test]
    fn full_screen_changes_with_still_moments_between_are_not_motion() {
        let mut g = LoadGovernor::new(FRAME);
        let mut t = Instant::now();
        for _ in 0..50 {
            t += Duration::from_millis(500);
            assert!(!g.frame(times(3, 1, 25), false, true, t));
        }
        assert!(!g.halved());
    }

    /// Scrolling is as large and as expensive as motion, but the encoder finds it moved: it stays
    /// sharp. The scroll mark of a frame comes after the frame is measured, and still counts: one
    /// detected scroll in every 9 frames is enough (the detector reports about two in three).
    #[test]
    fn scrolling_stays_sharp_with_its_marks_after_the_frames() {
        let mut g = LoadGovernor::new(FRAME);
        let mut t = Instant::now();
        for i in 0..200 {
            t += FRAME;
            assert!(!g.frame(times(3, 1, 15), false, true, t), "frame {i}");
            if i % WINDOW == WINDOW - 1 {
                g.scrolled();
            }
        }
    }

    /// Animations of a few frames over the whole screen, and expensive changes to part of it,
    /// stay sharp.
    #[test]
    fn animations_and_smaller_changes_stay_sharp() {
        let mut g = LoadGovernor::new(FRAME);
        let mut t = Instant::now();
        // Animations of 8 frames with a small change (a keystroke) between them.
        for _ in 0..10 {
            t += FRAME;
            assert!(!g.frame(times(1, 1, 3), false, false, t));
            for _ in 0..WINDOW - 1 {
                t += FRAME;
                assert!(!g.frame(times(3, 1, 15), false, true, t));
            }
        }
        for _ in 0..200 {
            t += FRAME;
            assert!(!g.frame(times(3, 1, 30), false, false, t));
        }
        assert!(!g.halved());
    }

    #[test]
    fn too_slow_frames_decide_after_two() {
        let mut g = LoadGovernor::new(FRAME);
        let mut t = Instant::now();
        assert_eq!(feed(&mut g, &mut t, 20, times(3, 2, 48)), Some(FAST - 1));
        assert!(g.halved());
        // Slow frames that come one at a time among fast ones do not.
        let mut g = LoadGovernor::new(FRAME);
        for i in 0..60 {
            let e = if i % 3 == 0 { 90 } else { 5 };
            t += FRAME;
            assert!(!g.frame(times(1, 1, e), false, false, t));
        }
    }

    /// A page drawn, the screen still for a second and a half, then motion the machine cannot keep
    /// up with: the page and the first motion frame are not two in a row; the second motion frame
    /// is.
    #[test]
    fn slow_frames_with_a_still_screen_between_are_not_in_a_row() {
        let mut g = LoadGovernor::new(FRAME);
        let mut t = Instant::now();
        assert_eq!(feed(&mut g, &mut t, 20, times(1, 1, 5)), None);
        t += FRAME;
        assert!(!g.frame(times(4, 1, 50), false, false, t));
        for _ in 0..45 {
            t += FRAME;
            assert!(!g.idle(t));
        }
        t += FRAME;
        assert!(!g.frame(times(4, 1, 50), false, false, t));
        assert!(!g.halved());
        // Two intervals later (the first took 55 ms): in a row.
        t += FRAME * 2;
        assert!(g.frame(times(4, 1, 50), false, false, t));
        assert!(g.halved());
    }

    /// Frames so slow that each ends several intervals after the one before still come in a row
    /// (the machine never rested between them): two decide.
    #[test]
    fn very_slow_frames_back_to_back_are_in_a_row() {
        let mut g = LoadGovernor::new(FRAME);
        let mut t = Instant::now();
        assert_eq!(feed(&mut g, &mut t, 20, times(1, 1, 5)), None);
        t += Duration::from_millis(200);
        assert!(!g.frame(times(10, 5, 180), false, false, t));
        // Begun 5 ms after the last ended, 195 ms long.
        t += Duration::from_millis(200);
        assert!(g.frame(times(10, 5, 180), false, false, t));
        assert!(g.halved());
    }

    /// Slow and bearable frames taking turns: never two slow ones in a row, but the window's
    /// median is slow.
    #[test]
    fn mostly_slow_frames_halve_after_a_window() {
        let mut g = LoadGovernor::new(FRAME);
        let mut t = Instant::now();
        let mut switched = None;
        for i in 0..30 {
            t += FRAME;
            let e = if i % 2 == 0 { 55 } else { 30 };
            if g.frame(times(3, 2, e), false, false, t) {
                switched = Some(i);
                break;
            }
        }
        assert_eq!(switched, Some(WINDOW - 1));
        assert!(g.halved());
    }

    #[test]
    fn one_slow_frame_decides_nothing() {
        let mut g = LoadGovernor::new(FRAME);
        let mut t = Instant::now();
        for i in 0..50 {
            let e = if i % 5 == 0 { 200 } else { 5 };
            t += FRAME;
            assert!(!g.frame(times(1, 1, e), false, false, t));
        }
        assert!(!g.halved());
    }

    #[test]
    fn light_work_after_motion_returns_to_full_resolution() {
        let mut g = LoadGovernor::new(FRAME);
        let mut t = Instant::now();
        feed(&mut g, &mut t, WINDOW, times(3, 2, 60));
        assert!(g.halved());
        // Typing at half resolution: 1 + 2 + 4×2 = 11 ms < 16.5 ms estimated, but not before the
        // hold time (2 s = 61 frames) is over.
        let back = feed(&mut g, &mut t, 100, times(1, 2, 2)).unwrap();
        assert!(!g.halved());
        assert_eq!(
            back,
            HOLD_MIN.as_millis().div_ceil(FRAME.as_millis()) as usize - 1
        );
    }

    #[test]
    fn content_that_keeps_flipping_is_held_halved_longer_each_time() {
        let mut g = LoadGovernor::new(FRAME);
        let mut t = Instant::now();
        let mut holds = vec![];
        for _ in 0..8 {
            assert!(feed(&mut g, &mut t, WINDOW, times(3, 2, 60)).is_some());
            holds.push(g.hold());
            assert!(feed(&mut g, &mut t, 3000, times(1, 2, 2)).is_some());
        }
        assert_eq!(holds[0], HOLD_MIN);
        assert_eq!(holds[1], HOLD_MIN * 2);
        assert_eq!(holds[2], HOLD_MIN * 4);
        assert_eq!(*holds.last().unwrap(), HOLD_MAX);
        // Calm for longer than RELAPSE: the next halving starts from the shortest hold again.
        feed(&mut g, &mut t, 400, times(1, 1, 3));
        assert!(feed(&mut g, &mut t, WINDOW, times(3, 2, 60)).is_some());
        assert_eq!(g.hold(), HOLD_MIN);
    }

    #[test]
    fn a_still_screen_returns_to_full_resolution() {
        let mut g = LoadGovernor::new(FRAME);
        let mut t = Instant::now();
        feed(&mut g, &mut t, WINDOW, times(3, 2, 60));
        assert!(g.halved());
        assert!(!g.idle(t + QUIET / 2));
        assert!(g.halved());
        assert!(g.idle(t + QUIET));
        assert!(!g.halved());
        // Not halved: idling changes nothing.
        assert!(!g.idle(t + QUIET * 5));
    }

    #[test]
    fn frames_halved_for_the_path_do_not_count() {
        let mut g = LoadGovernor::new(FRAME);
        let mut t = Instant::now();
        for _ in 0..50 {
            t += FRAME;
            assert!(!g.frame(times(3, 2, 60), true, false, t));
        }
        assert!(!g.halved());
        // Full-resolution frames after that are measured on their own.
        assert_eq!(feed(&mut g, &mut t, 20, times(3, 2, 60)), Some(FAST - 1));
    }

    #[test]
    fn a_longer_interval_tolerates_slower_frames() {
        let mut g = LoadGovernor::new(Duration::from_millis(100));
        let mut t = Instant::now();
        assert_eq!(feed(&mut g, &mut t, 30, times(3, 2, 60)), None);
        // The frames measured so far count for the new interval: the next one decides.
        g.set_interval(FRAME);
        assert_eq!(feed(&mut g, &mut t, 30, times(3, 2, 60)), Some(0));
    }

    /// A rest brings the picture back, but not when it came back shortly before (a drag with
    /// short stops stays halved through them; the refinement is then at half resolution).
    #[test]
    fn a_rest_restores_the_picture_unless_it_flips() {
        let t0 = Instant::now();
        let mut g = LoadGovernor::new(FRAME);
        assert!(!g.rested(t0), "not halved");
        g.switch(true, t0);
        let back = t0 + FRAME * 10;
        assert!(g.rested(back));
        assert!(!g.halved());
        // Halved again soon after: the next rest keeps it halved.
        g.switch(true, back + FRAME);
        assert!(!g.rested(back + FRAME * 20));
        assert!(g.halved());
        // Long after the last return it comes back again.
        assert!(g.rested(back + RELAPSE));
    }
}
