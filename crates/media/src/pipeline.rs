//! The agent's screen pipeline: capture → change detection → (downscale) → I420 → H.264.
//!
//! One call of [`ScreenPipeline::next`] captures once and, only if something changed, converts and
//! encodes. The caller drives it at the frame rate it wants and calls it again only when it is ready
//! to send: there is no queue inside, so a frame is never encoded behind newer ones.

use crate::capture::{CaptureError, Capturer, CursorState};
use crate::convert::{I420, bgrx_to_i420, bgrx_to_i420_changed, downscale_half};
use crate::encode::{EncodeError, EncodedFrame, Target, VideoEncoder};
use crate::frame::Frame;
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

pub struct ScreenPipeline<C: Capturer> {
    pub capturer: C,
    encoder: VideoEncoder,
    yuv: I420,
    half: Frame,
    halve: bool,
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
            size: (0, 0),
            pending: false,
        })
    }

    /// The session's target from what the path carries.
    pub fn set_target(&mut self, t: Target) {
        self.encoder.set_target(t);
        self.update_scale();
    }

    fn update_scale(&mut self) {
        let t = self.encoder.target();
        let (w, h) = self.size;
        if w == 0 || h == 0 {
            return;
        }
        let bpp = t.bitrate_bps as f64 / (w as f64 * h as f64 * t.max_fps.max(1.0) as f64);
        let halve = bpp < HALVE_BELOW_BITS_PER_PIXEL && w >= 640 && h >= 360;
        if halve != self.halve {
            tracing::info!(
                halve,
                bits_per_pixel = bpp,
                "video resolution follows the path"
            );
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
            downscale_half(frame, &mut self.half);
            bgrx_to_i420(&self.half, &mut self.yuv)?;
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
