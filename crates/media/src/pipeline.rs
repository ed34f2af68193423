//! The agent's screen pipeline: capture → change detection → (downscale) → I420 → H.264.
//!
//! One call of [`ScreenPipeline::step`] captures once and, only if something changed, converts and
//! encodes. The caller drives it at the frame rate it wants and calls it again only when it is ready
//! to send: there is no queue inside, so a frame is never encoded behind newer ones.

use crate::capture::{CaptureError, Capturer, CursorState};
use crate::convert::{I420, bgrx_to_i420_changed, downscale_half_changed};
use crate::encode::{EncodeError, EncodedFrame, Target, VideoEncoder};
use crate::frame::Frame;
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

/// Below this many bits per pixel per frame the picture is halved in both directions: fewer,
/// sharper pixels beat many smeared ones on a slow path.
pub const HALVE_BELOW_BITS_PER_PIXEL: f64 = 0.02;

/// The smallest screen the machine's load may halve (to 640×360). Smaller screens cost little to
/// encode, and halved their text is illegible: a machine too slow for them sends fewer frames
/// instead. (The path may halve screens down from 640×360: there the choice is between fewer
/// pixels and no picture.)
pub const LOAD_HALVE_MIN: (u32, u32) = (1280, 720);

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

    /// Halves or restores the picture when either reason changed (the next frame is then a
    /// keyframe of the whole screen at the new size).
    fn apply_scale(&mut self) {
        let (w, h) = self.size;
        let halve = (self.path_halve && w >= 640 && h >= 360)
            || (self.load.halved() && w >= LOAD_HALVE_MIN.0 && h >= LOAD_HALVE_MIN.1);
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
            // LATENCY_FIRST_BPS one the encoder found scrolled, so not motion (below it, upstream's
            // policy also searches other frames, which then do not count as motion either).
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
        if changed == 0 && !self.pending {
            if self.load.idle(t1) {
                tracing::info!("screen still: back to full resolution");
                self.apply_scale();
            }
            return Ok(Step {
                encoded: None,
                cursor,
                changed_pixels: 0,
                resized,
                times,
            });
        }
        let frame: &Frame = cap.frame;
        if self.halve {
            // Only the changed rows, halved; everything when the size changed (the switch to
            // half resolution asks the capturer for the whole screen, so nothing stale remains).
            let changed = downscale_half_changed(frame, &mut self.half, &cap.damage);
            bgrx_to_i420_changed(&self.half, &mut self.yuv, &changed)?;
        } else {
            // Only the changed rows; the whole frame when the picture was halved before (the
            // I420 buffer then has another size).
            bgrx_to_i420_changed(frame, &mut self.yuv, &cap.damage)?;
        }
        let t2 = Instant::now();
        times.convert = t2 - t1;
        let encoded = self.encoder.encode(&self.yuv)?;
        times.encode = t2.elapsed();
        self.pending = encoded.is_none();
        if size != self.size {
            self.size = size;
            self.update_scale();
        } else if encoded.is_some()
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
            full: true,
            n: 0,
        };
        let target = Target {
            bitrate_bps: 10_000_000,
            max_fps: 60.0,
        };
        ScreenPipeline::new(cap, target).unwrap()
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

    /// The pipeline's load, not the path, halves the picture, and a still screen brings it back:
    /// each switch is a keyframe at the new size. (At 60 frames a second the rule allows 25 ms a
    /// frame; the capture alone takes 30.)
    #[test]
    fn a_screen_the_machine_cannot_keep_up_with_is_halved_until_it_is_still() {
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
        std::thread::sleep(crate::load::QUIET);
        assert!(
            pipe.step().unwrap().encoded.is_none(),
            "nothing changed yet"
        );
        assert!(!pipe.halved());
        let back = pipe
            .step()
            .unwrap()
            .encoded
            .expect("the still screen, sharp");
        assert_eq!((back.width, back.keyframe), (1280, true));
        assert!(pipe.step().unwrap().encoded.is_none());
    }
}
