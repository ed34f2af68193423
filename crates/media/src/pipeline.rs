//! The agent's screen pipeline: capture → change detection → (downscale) → I420 → H.264.
//!
//! One call of [`ScreenPipeline::step`] captures once and, only if something changed, converts and
//! encodes. The caller drives it at the frame rate it wants and calls it again only when it is ready
//! to send: there is no queue inside, so a frame is never encoded behind newer ones.

use crate::capture::{CaptureError, Capturer, CursorState};
use crate::convert::{I420, bgrx_to_i420_changed, downscale_half_changed};
use crate::encode::{EncodeError, EncodedFrame, Quality, Target, VideoEncoder};
use crate::frame::{Frame, Rect};
use crate::load::LoadGovernor;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error(transparent)]
    Convert(#[from] crate::convert::ConvertError),
}

/// Time spent in each stage of one step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StageTimes {
    pub capture: Duration,
    pub convert: Duration,
    pub encode: Duration,
}

/// The result of one step.
#[derive(Debug)]
pub struct Step {
    /// `None` on an unchanged screen, or when rate control skipped the frame.
    pub encoded: Option<EncodedFrame>,
    pub cursor: CursorState,
    /// Pixels that changed.
    pub changed_pixels: u64,
    pub resized: bool,
    pub times: StageTimes,
}

impl Step {
    fn nothing(cursor: CursorState, resized: bool, times: StageTimes) -> Step {
        Step {
            encoded: None,
            cursor,
            changed_pixels: 0,
            resized,
            times,
        }
    }
}

/// Below this many bits per pixel per frame the picture is halved in both directions: fewer,
/// sharper pixels beat many smeared ones on a slow path.
pub const HALVE_BELOW_BITS_PER_PIXEL: f64 = 0.02;

/// The smallest screen the machine's load may halve (to 640×360). Smaller screens cost little to
/// encode, and halved their text is illegible: a machine too slow for them sends fewer frames
/// instead. (The path may halve screens down from 640×360: there the choice is between fewer
/// pixels and no picture.)
pub const LOAD_HALVE_MIN: (u32, u32) = (1280, 720);

/// A change of at most 1/`SMALL_CHANGE_DIVISOR` of the screen (256×256 pixels of 1080p: a word
/// typed, a cell edited, a menu opened) is encoded at final quality at once: it costs few bits
/// either way, and text that sharpens a moment after each keystroke would distract. Larger changes
/// are encoded as motion and refined once no large change has come for [`REFINE_AFTER`]; small
/// changes until then go as part of the motion.
pub const SMALL_CHANGE_DIVISOR: u64 = 32;

/// How long the screen must rest before what was sent in motion is refined: longer than the gaps
/// within a motion (a video's 33–42 ms, a scroll's wheel steps), short enough that the picture is
/// sharp well within a second.
pub const REFINE_AFTER: Duration = Duration::from_millis(200);

/// Which 16×16 macroblocks of the encoded picture did not change since the last picture the
/// encoder put out (a picture rate control skipped leaves its changes here for the next one).
#[derive(Debug, Default)]
struct ChangedMbs {
    /// Picture size in macroblocks.
    cols: u32,
    rows: u32,
    /// One byte per macroblock, raster order: 1 if it did not change (what the encoder keeps).
    keep: Vec<u8>,
}

impl ChangedMbs {
    /// Marks what `rects` cover on a `w`×`h` picture; a picture of another size changed everywhere.
    fn mark(&mut self, rects: &[Rect], (w, h): (u32, u32)) {
        let (cols, rows) = (w.div_ceil(16), h.div_ceil(16));
        if (cols, rows) != (self.cols, self.rows) {
            (self.cols, self.rows) = (cols, rows);
            self.keep.clear();
            self.keep.resize((cols * rows) as usize, 0);
            return;
        }
        for r in rects {
            let (x0, y0) = ((r.x / 16).min(cols), (r.y / 16).min(rows));
            let (x1, y1) = (
                r.x.saturating_add(r.w).div_ceil(16).min(cols),
                r.y.saturating_add(r.h).div_ceil(16).min(rows),
            );
            for y in y0..y1 {
                let row = (y * cols) as usize;
                self.keep[row + x0 as usize..row + x1 as usize].fill(0);
            }
        }
    }

    /// The macroblocks to keep as the decoder has them: those that did not change.
    fn keep(&self) -> &[u8] {
        &self.keep
    }

    /// The encoder put a picture out: it has everything so far.
    fn sent(&mut self) {
        self.keep.fill(1);
    }
}

fn frame_interval(t: Target) -> Duration {
    Duration::from_secs_f64(1.0 / f64::from(t.max_fps.clamp(1.0, 240.0)))
}

pub struct ScreenPipeline<C: Capturer> {
    pub capturer: C,
    encoder: VideoEncoder,
    yuv: I420,
    half: Frame,
    /// Halved, for either reason below.
    halve: bool,
    /// The path cannot carry full resolution.
    path_halve: bool,
    /// The CPU cannot encode full resolution at the frame rate.
    load: LoadGovernor,
    size: (u32, u32),
    /// A change was captured but rate control skipped its frame: encode again even if nothing
    /// new changes, or the change would never reach the technician.
    pending: bool,
    /// A picture went as motion: refine it when the screen has rested until then.
    refine_due: Option<Instant>,
    /// What changed since the encoder's last picture: everything else is kept as it is.
    changed_mbs: ChangedMbs,
}

impl<C: Capturer> ScreenPipeline<C> {
    pub fn new(capturer: C, target: Target) -> Result<Self, PipelineError> {
        Ok(ScreenPipeline {
            capturer,
            encoder: VideoEncoder::new(target)?,
            yuv: I420::default(),
            half: Frame::new(0, 0),
            halve: false,
            path_halve: false,
            load: LoadGovernor::new(frame_interval(target)),
            size: (0, 0),
            pending: false,
            refine_due: None,
            changed_mbs: ChangedMbs::default(),
        })
    }

    /// The session's target from what the path carries.
    pub fn set_target(&mut self, t: Target) {
        self.encoder.set_target(t);
        self.load.set_interval(frame_interval(t));
        self.update_scale();
    }

    fn update_scale(&mut self) {
        let t = self.encoder.target();
        let (w, h) = self.size;
        if w == 0 || h == 0 {
            return;
        }
        let bpp = t.bitrate_bps as f64 / (w as f64 * h as f64 * t.max_fps.max(1.0) as f64);
        let path_halve = bpp < HALVE_BELOW_BITS_PER_PIXEL && w >= 640 && h >= 360;
        if path_halve != self.path_halve {
            tracing::info!(
                halve = path_halve,
                bits_per_pixel = bpp,
                "video resolution follows the path"
            );
            self.path_halve = path_halve;
        }
        self.apply_scale();
    }

    /// Whether either reason asks for half resolution of a `(w, h)` screen.
    fn wants_halve((w, h): (u32, u32), path_halve: bool, load_halved: bool) -> bool {
        (path_halve && w >= 640 && h >= 360)
            || (load_halved && w >= LOAD_HALVE_MIN.0 && h >= LOAD_HALVE_MIN.1)
    }

    /// Halves or restores the picture when either reason changed (the next frame is then a
    /// keyframe of the whole screen at the new size).
    fn apply_scale(&mut self) {
        let halve = Self::wants_halve(self.size, self.path_halve, self.load.halved());
        if halve != self.halve {
            self.halve = halve;
            self.capturer.request_full();
        }
    }

    /// Whether frames are currently sent at half resolution.
    pub fn halved(&self) -> bool {
        self.halve
    }

    /// The next frame is a keyframe of the whole screen.
    pub fn request_keyframe(&mut self) {
        self.capturer.request_full();
        self.encoder.request_keyframe();
    }

    /// Work for the time between frames, to call once a frame is on its way (see
    /// [`VideoEncoder::prepare_next`]): after a scroll, the encoder's hashes of the picture just
    /// encoded, which the next frame would otherwise compute first. Returns whether it worked.
    pub fn prepare_next(&mut self) -> bool {
        let scrolled = self.encoder.prepare_next();
        if scrolled {
            // Only a frame that used the feature search has something to prepare: at or above
            // LATENCY_FIRST_BPS one the encoder found scrolled or a moved region (at most half
            // the screen, which the load rule does not count as motion anyway), so not motion
            // (below it, upstream's policy also searches other frames, which then do not count as
            // motion either).
            self.load.scrolled();
        }
        scrolled
    }

    /// The path carries what was sent until `t` (see [`VideoEncoder::path_busy_until`]).
    pub fn path_busy_until(&mut self, t: Instant) {
        self.encoder.path_busy_until(t);
    }

    pub fn step(&mut self) -> Result<Step, PipelineError> {
        let t0 = Instant::now();
        let cap = self.capturer.capture()?;
        let t1 = Instant::now();
        let changed: u64 = cap.damage.iter().map(|r| r.area()).sum();
        let resized = cap.resized;
        let cursor = cap.cursor.clone();
        let size = (cap.frame.width, cap.frame.height);
        let mut times = StageTimes {
            capture: t1 - t0,
            ..StageTimes::default()
        };
        let refine_due = self.refine_due.is_some_and(|due| t1 >= due) && self.yuv.width > 0;
        if changed == 0 && !self.pending {
            if self.load.idle(t1) {
                // The whole screen comes next at full resolution, as motion; refined after it.
                tracing::info!("screen still: back to full resolution");
                self.apply_scale();
                return Ok(Step::nothing(cursor, resized, times));
            }
            if !(refine_due && size == self.size) {
                return Ok(Step::nothing(cursor, resized, times));
            }
        }
        let screen = u64::from(size.0) * u64::from(size.1);
        let small = changed.saturating_mul(SMALL_CHANGE_DIVISOR) <= screen
            && !(self.pending && self.encoder.quality() == Quality::Motion);
        if refine_due && small && size == self.size && self.load.rested(t1) {
            // Halved for the load during the motion: the refinement comes at full resolution.
            // The whole frame is converted below (the I420 picture changes size), so the
            // capturer is not asked for it again: that would be a full-screen change, i.e. a
            // coarse motion picture after the sharp one.
            self.halve = Self::wants_halve(self.size, self.path_halve, self.load.halved());
            tracing::info!(
                halve = self.halve,
                "screen at rest: refined at full resolution"
            );
        }
        let frame: &Frame = cap.frame;
        if self.halve {
            // Only the changed rows, halved; everything when the size changed (the switch to
            // half resolution asks the capturer for the whole screen, so nothing stale remains).
            let changed = downscale_half_changed(frame, &mut self.half, &cap.damage);
            bgrx_to_i420_changed(&self.half, &mut self.yuv, &changed)?;
            self.changed_mbs
                .mark(&changed, (self.yuv.width, self.yuv.height));
        } else {
            // Only the changed rows; the whole frame when the picture was halved before (the
            // I420 buffer then has another size).
            bgrx_to_i420_changed(frame, &mut self.yuv, &cap.damage)?;
            self.changed_mbs
                .mark(&cap.damage, (self.yuv.width, self.yuv.height));
        }
        let t2 = Instant::now();
        times.convert = t2 - t1;
        // A large change is motion, and so is what is left of one whose frame rate control
        // skipped (a small change since then carries it).
        // Once the large changes have rested (small ones such as a blinking cursor or a clock may
        // go on), the picture is sent again finely, with whatever small change came with it.
        let quality = if !small {
            Quality::Motion
        } else if refine_due {
            Quality::Refine
        } else if changed == 0 {
            // What rate control skipped, as it was meant.
            self.encoder.quality()
        } else if self.refine_due.is_some() {
            // A small change while a motion has not yet rested is part of it (the refinement
            // comes for both): at final quality, the first small change after a picture sent as
            // motion re-coded much of that picture finely (212 KB after a 107 KB photo, and the
            // two frames together made the load governor halve a slideshow).
            Quality::Motion
        } else {
            Quality::Final
        };
        if changed.saturating_mul(SMALL_CHANGE_DIVISOR) > screen {
            // Only large changes keep a motion going: a ticking clock must not hold off the
            // refinement for ever.
            self.refine_due = Some(t2 + REFINE_AFTER);
        }
        self.encoder.set_quality(quality);
        // What did not change stays exactly as sent, except in a refinement, whose point is to
        // code again what was sent coarsely.
        let keep = (quality != Quality::Refine).then(|| self.changed_mbs.keep());
        let encoded = self.encoder.encode_keeping(&self.yuv, keep)?;
        if encoded.is_some() {
            self.changed_mbs.sent();
        }
        if quality == Quality::Refine && encoded.is_some() {
            self.refine_due = None;
        }
        tracing::trace!(
            ?quality,
            changed,
            bytes = encoded.as_ref().map_or(0, |e| e.data.len()),
            "picture encoded"
        );
        times.encode = t2.elapsed();
        self.pending = encoded.is_none();
        if size != self.size {
            self.size = size;
            self.update_scale();
        } else if encoded.is_some()
            && quality != Quality::Refine
            && self.load.frame(
                times,
                self.halve,
                changed * 2 >= u64::from(size.0) * u64::from(size.1),
                Instant::now(),
            )
        {
            tracing::info!(
                halve = self.load.halved(),
                capture_to_encoded_ms =
                    (times.capture + times.convert + times.encode).as_secs_f64() * 1e3,
                "video resolution follows the encoder's load"
            );
            self.apply_scale();
        }
        Ok(Step {
            encoded,
            cursor,
            changed_pixels: changed,
            resized,
            times,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{Captured, Monitor};
    use crate::frame::Rect;

    /// A screen in memory: while `moving`, every capture is a new picture that takes 30 ms to
    /// capture (a machine too slow for the frame rate, deterministically); nothing new otherwise.
    struct Moving {
        frame: Frame,
        moving: bool,
        /// While not moving: a 16×16 corner changes at every capture (a ticking clock).
        ticking: bool,
        full: bool,
        n: u8,
    }

    impl Capturer for Moving {
        fn monitors(&self) -> Vec<Monitor> {
            vec![]
        }
        fn size(&self) -> (u32, u32) {
            (self.frame.width, self.frame.height)
        }
        fn select(&mut self, _: usize) -> Result<(), CaptureError> {
            Ok(())
        }
        fn request_full(&mut self) {
            self.full = true;
        }
        fn capture(&mut self) -> Result<Captured<'_>, CaptureError> {
            let all = Rect {
                x: 0,
                y: 0,
                w: self.frame.width,
                h: self.frame.height,
            };
            if self.moving {
                self.n = self.n.wrapping_add(1);
                let w = self.frame.width as usize;
                for (i, px) in self.frame.data.chunks_exact_mut(4).enumerate() {
                    let (x, y) = ((i % w) as u8, (i / w) as u8);
                    px[..3].copy_from_slice(&[x ^ self.n, y.wrapping_add(self.n), x ^ y]);
                }
                std::thread::sleep(Duration::from_millis(30));
            }
            let damage = if self.moving || std::mem::take(&mut self.full) {
                vec![all]
            } else if self.ticking {
                self.n = self.n.wrapping_add(1);
                let w = self.frame.width as usize;
                for y in 0..16 {
                    for x in 0..16 {
                        let i = (y * w + x) * 4;
                        self.frame.data[i..i + 3].fill(self.n.wrapping_mul(37));
                    }
                }
                vec![Rect {
                    x: 0,
                    y: 0,
                    w: 16,
                    h: 16,
                }]
            } else {
                vec![]
            };
            Ok(Captured {
                frame: &self.frame,
                damage,
                cursor: CursorState::default(),
                resized: false,
            })
        }
    }

    /// A pipeline at 60 frames a second over a moving screen of `w`×`h` whose captures take 30 ms
    /// each (the rule allows 25).
    fn too_slow(w: u32, h: u32) -> ScreenPipeline<Moving> {
        let cap = Moving {
            frame: Frame::new(w, h),
            moving: true,
            ticking: false,
            full: true,
            n: 0,
        };
        let target = Target {
            bitrate_bps: 10_000_000,
            max_fps: 60.0,
        };
        ScreenPipeline::new(cap, target).unwrap()
    }

    /// A large change goes as motion and, once the screen has rested for [`REFINE_AFTER`], the
    /// same picture goes again as a refinement, once; small changes go at final quality at once
    /// and ask for no refinement.
    #[test]
    fn motion_is_refined_once_the_screen_rests() {
        let mut pipe = too_slow(640, 360);
        pipe.capturer.moving = true;
        let mut first = None;
        for _ in 0..3 {
            if let Some(e) = pipe.step().unwrap().encoded {
                first.get_or_insert(e.data.len());
            }
        }
        assert!(first.is_some());
        assert_eq!(pipe.encoder.quality(), Quality::Motion);
        pipe.capturer.moving = false;
        // Rate control may have skipped the last moving frame: that one goes first.
        let _ = pipe.step().unwrap();
        assert!(pipe.step().unwrap().encoded.is_none(), "not yet");
        std::thread::sleep(REFINE_AFTER);
        let refined = pipe.step().unwrap().encoded.expect("the refinement");
        assert!(!refined.keyframe);
        assert_eq!(pipe.encoder.quality(), Quality::Refine);
        assert!(pipe.step().unwrap().encoded.is_none(), "refined once");
        std::thread::sleep(REFINE_AFTER);
        assert!(pipe.step().unwrap().encoded.is_none(), "refined once");
    }

    /// A small change that goes on (a clock, a blinking cursor) neither holds off the refinement
    /// of a motion nor is itself refined: it goes as part of the motion until the refinement,
    /// at final quality after it.
    #[test]
    fn a_ticking_clock_does_not_hold_off_the_refinement() {
        let mut pipe = too_slow(640, 360);
        for _ in 0..3 {
            let _ = pipe.step().unwrap();
        }
        pipe.capturer.moving = false;
        pipe.capturer.ticking = true;
        let started = Instant::now();
        let mut seen = vec![];
        while started.elapsed() < REFINE_AFTER * 3 {
            let step = pipe.step().unwrap();
            if step.encoded.is_some() {
                seen.push(pipe.encoder.quality());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let refined = seen.iter().position(|q| *q == Quality::Refine);
        let Some(at) = refined else {
            panic!("never refined: {seen:?}")
        };
        assert!(seen[..at].iter().all(|q| *q == Quality::Motion), "{seen:?}");
        assert!(
            seen[at + 1..].iter().all(|q| *q == Quality::Final),
            "{seen:?}"
        );
        assert!(seen.len() > at + 3, "{seen:?}");
    }

    /// After the refinement, a ticking clock costs only itself: every picture keeps the rest of
    /// the screen exactly as the refinement left it (none is coded again, coarser).
    #[test]
    fn after_a_refinement_a_ticking_clock_keeps_the_rest_as_it_is() {
        let mut pipe = too_slow(640, 360);
        let mut dec = crate::decode::VideoDecoder::new().unwrap();
        let mut out = crate::convert::I420::default();
        let mut step = |pipe: &mut ScreenPipeline<Moving>, out: &mut crate::convert::I420| {
            let e = pipe.step().unwrap().encoded?;
            assert!(dec.decode_i420(&e.data, out).unwrap());
            Some((pipe.encoder.quality(), e.data.len()))
        };
        for _ in 0..3 {
            step(&mut pipe, &mut out);
        }
        pipe.capturer.moving = false;
        pipe.capturer.ticking = true;
        let started = Instant::now();
        let mut refined: Option<Vec<u8>> = None;
        let mut after = vec![];
        while started.elapsed() < REFINE_AFTER * 4 {
            match step(&mut pipe, &mut out) {
                Some((Quality::Refine, _)) => refined = Some(out.y.clone()),
                Some((q, bytes)) if refined.is_some() => {
                    assert_eq!(q, Quality::Final);
                    after.push(bytes);
                    let was = refined.as_deref().unwrap_or_default();
                    // All but the first macroblock row (the clock is in its first macroblock).
                    let row = 16 * out.width as usize;
                    assert!(
                        out.y[row..] == was[row..],
                        "the picture changed beyond the clock"
                    );
                    // And the clock itself is shown as it is now (its macroblock is coded).
                    let w = out.width as usize;
                    let se: u64 = (0..16)
                        .flat_map(|r| (0..16).map(move |x| r * w + x))
                        .map(|i| u64::from(out.y[i].abs_diff(pipe.yuv.y[i])).pow(2))
                        .sum();
                    assert!(se <= 256 * 4, "the clock is not shown as it is: SSE {se}");
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(refined.is_some() && after.len() >= 3, "{after:?}");
        assert!(after.iter().all(|&b| b < 600), "bytes per tick: {after:?}");
    }

    /// A small screen stays whole however slow the machine: fewer frames, legible text.
    #[test]
    fn the_load_does_not_halve_a_small_screen() {
        let mut pipe = too_slow(1024, 768);
        let mut widths = vec![];
        for _ in 0..12 {
            if let Some(e) = pipe.step().unwrap().encoded {
                widths.push(e.width);
            }
        }
        assert!(widths.len() >= 6, "{widths:?}");
        assert!(widths.iter().all(|&w| w == 1024), "{widths:?}");
        assert!(!pipe.halved());
    }

    /// The map of changed macroblocks: rectangles cover every macroblock they touch, a new size
    /// changes everything, and what the encoder put out is no longer a change.
    #[test]
    fn changed_macroblocks_are_what_the_rectangles_touch() {
        let mut m = ChangedMbs::default();
        m.mark(&[], (100, 40));
        assert_eq!((m.cols, m.rows), (7, 3));
        assert!(m.keep().iter().all(|&k| k == 0), "a new size: all changed");
        m.sent();
        assert!(m.keep().iter().all(|&k| k == 1));
        // 15..17 touches columns 0 and 1; rows 16..18 only row 1.
        m.mark(
            &[Rect {
                x: 15,
                y: 16,
                w: 2,
                h: 2,
            }],
            (100, 40),
        );
        // A rectangle past the edge is clipped to the picture.
        m.mark(
            &[Rect {
                x: 96,
                y: 32,
                w: 50,
                h: 50,
            }],
            (100, 40),
        );
        let changed: Vec<usize> = m
            .keep()
            .iter()
            .enumerate()
            .filter(|(_, k)| **k == 0)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(changed, vec![7, 8, 20]);
        // Not sent (rate control skipped the picture): the changes add up.
        m.mark(
            &[Rect {
                x: 0,
                y: 0,
                w: 1,
                h: 1,
            }],
            (100, 40),
        );
        assert_eq!(m.keep().iter().filter(|&&k| k == 0).count(), 4);
        m.sent();
        assert!(m.keep().iter().all(|&k| k == 1));
    }

    /// The pipeline's load, not the path, halves the picture, and the screen at rest brings it
    /// back: the refinement of the motion is one keyframe at full resolution, and nothing comes
    /// after it (not a coarse full-screen picture, not a second refinement). (At 60 frames a
    /// second the rule allows 25 ms a frame; the capture alone takes 30.)
    #[test]
    fn a_screen_the_machine_cannot_keep_up_with_is_halved_until_it_rests() {
        let mut pipe = too_slow(1280, 720);
        let mut sizes = vec![];
        // (Rate control may skip a frame now and then; the rule counts encoded frames.)
        for _ in 0..40 {
            if let Some(e) = pipe.step().unwrap().encoded {
                sizes.push((e.width, e.keyframe));
            }
            if sizes.iter().filter(|s| s.0 == 640).count() == 3 {
                break;
            }
        }
        assert!(pipe.halved(), "{sizes:?}");
        let first_half = sizes.iter().position(|s| s.0 == 640).unwrap();
        assert!(sizes[first_half].1, "the first halved frame is a keyframe");
        assert!(sizes[..first_half].iter().all(|s| s.0 == 1280));
        assert!(sizes[first_half..].iter().all(|s| s.0 == 640));

        pipe.capturer.moving = false;
        // (A frame rate control skipped is encoded again first.)
        let mut settled = false;
        for _ in 0..10 {
            if pipe.step().unwrap().encoded.is_none() {
                settled = true;
                break;
            }
        }
        assert!(settled && pipe.halved());
        std::thread::sleep(REFINE_AFTER);
        let back = pipe
            .step()
            .unwrap()
            .encoded
            .expect("the still screen, sharp");
        assert_eq!((back.width, back.keyframe), (1280, true));
        assert_eq!(pipe.encoder.quality(), Quality::Refine);
        assert!(!pipe.halved());
        assert!(pipe.step().unwrap().encoded.is_none());
        std::thread::sleep(crate::load::QUIET);
        assert!(pipe.step().unwrap().encoded.is_none(), "nothing after it");
        assert!(pipe.step().unwrap().encoded.is_none(), "nothing after it");
    }
}
