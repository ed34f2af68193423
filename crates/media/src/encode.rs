//! H.264 encoding with OpenH264 in screen-content real-time mode.
//!
//! * Bitrate and frame rate follow a target the session sets from what the path carries
//!   ([`VideoEncoder::set_target`]); changing them does not restart the stream.
//! * A keyframe comes on request ([`VideoEncoder::request_keyframe`]), e.g. when the console's decoder
//!   lost a frame.
//! * The encoder's rate control may skip a frame to hold the bitrate; `encode` then returns `None`.
//! * Resolution changes (a resized screen, or the pipeline halving the resolution on a slow path)
//!   re-initialise the encoder, which starts with a keyframe.

use crate::convert::I420;
use openh264::OpenH264API;
use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, QpRange,
    RateControlMode, UsageType,
};
use openh264::formats::YUVSource;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("cannot create the H.264 encoder: {0}")]
    Create(String),
    #[error("H.264 encoding failed: {0}")]
    Encode(String),
}

/// What the session asks of the encoder.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Target {
    pub bitrate_bps: u32,
    pub max_fps: f32,
}

impl Default for Target {
    fn default() -> Self {
        Target {
            bitrate_bps: 2_000_000,
            max_fps: 30.0,
        }
    }
}

/// One encoded frame (Annex B byte stream, with SPS/PPS on keyframes).
#[derive(Clone, Debug)]
pub struct EncodedFrame {
    pub data: Vec<u8>,
    pub keyframe: bool,
    pub width: u32,
    pub height: u32,
}

pub struct VideoEncoder {
    enc: Option<Encoder>,
    target: Target,
    size: (u32, u32),
    qp_ceiling: u8,
    want_key: bool,
    threads: u16,
    started: std::time::Instant,
}

impl std::fmt::Debug for VideoEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoEncoder")
            .field("target", &self.target)
            .field("size", &self.size)
            .finish()
    }
}

/// The quantiser ceiling for a budget of `bits_per_pixel` per frame. Text needs a fine quantiser to
/// stay crisp (luma PSNR ≥ 38 dB on a full terminal screen needs QP ≤ 18); on slower paths the
/// ceiling rises so that rate control can hold the bitrate (below 0.02 bit/pixel the pipeline
/// halves the resolution first; the coarsest bands apply to pictures already halved or small).
/// Measured on a 1 Mbit/s path with full-page changes: with a ceiling of 36 a 1280×720 text page
/// stayed ~280 KB, more than two seconds of the path per frame.
pub fn max_qp(bits_per_pixel: f64) -> u8 {
    match bits_per_pixel {
        b if b >= 0.06 => 18,
        b if b >= 0.03 => 24,
        b if b >= 0.015 => 30,
        b if b >= 0.0075 => 38,
        _ => 44,
    }
}

/// Encoder threads: OpenH264 splits the picture into slices and encodes them in parallel. Measured
/// with the glass-to-glass bench at 1080p on 2 cores: 2 threads cut the compute floor from 38 to 25
/// ms (typing) and from 100 to 68 ms (full motion), glass-to-glass p50 from 53 to 41 ms (typing).
fn encoder_threads() -> u16 {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4) as u16)
}

fn config(t: Target, max_qp: u8, threads: u16) -> EncoderConfig {
    EncoderConfig::new()
        .usage_type(UsageType::ScreenContentRealTime)
        .rate_control_mode(RateControlMode::Bitrate)
        .bitrate(BitRate::from_bps(t.bitrate_bps))
        .max_frame_rate(FrameRate::from_hz(t.max_fps))
        .skip_frames(true)
        .complexity(Complexity::Low)
        // Neither is supported for screen content (OpenH264 turns them off and logs a warning).
        .adaptive_quantization(false)
        .background_detection(false)
        .qp(QpRange::new(10, max_qp))
        // Keyframes on request and on scene changes only: a periodic one is a burst the path may
        // not carry, and lost frames are answered with a requested keyframe.
        .intra_frame_period(IntraFramePeriod::from_num_frames(0))
        .num_threads(threads)
}

impl VideoEncoder {
    pub fn new(target: Target) -> Result<Self, EncodeError> {
        Ok(VideoEncoder {
            enc: None,
            target,
            size: (0, 0),
            qp_ceiling: 0,
            want_key: false,
            threads: encoder_threads(),
            started: std::time::Instant::now(),
        })
    }

    /// Encoder threads from the next (re-)initialisation on; the default is one per core, up to 4.
    /// Benchmarks use 1 to measure the cost on one core.
    pub fn set_threads(&mut self, threads: u16) {
        if threads.max(1) != self.threads {
            self.threads = threads.max(1);
            self.enc = None;
        }
    }

    pub fn target(&self) -> Target {
        self.target
    }

    /// The next frame will be a keyframe.
    pub fn request_keyframe(&mut self) {
        self.want_key = true;
    }

    fn ceiling_for(&self, size: (u32, u32)) -> u8 {
        let px = size.0 as f64 * size.1 as f64 * self.target.max_fps.max(1.0) as f64;
        max_qp(self.target.bitrate_bps as f64 / px.max(1.0))
    }

    /// Changes bitrate and frame rate in place (a new quantiser band re-initialises the encoder,
    /// which then starts with a keyframe).
    pub fn set_target(&mut self, t: Target) {
        if t == self.target {
            return;
        }
        self.target = t;
        if self.enc.is_some() && self.ceiling_for(self.size) != self.qp_ceiling {
            self.enc = None;
        } else if let Some(enc) = self.enc.as_mut() {
            set_rate(enc, t);
        }
    }

    /// The quantiser ceiling in use.
    pub fn qp_ceiling(&self) -> u8 {
        self.qp_ceiling
    }

    /// Encodes one picture, timestamped now; `None` when rate control skipped it.
    pub fn encode(&mut self, img: &I420) -> Result<Option<EncodedFrame>, EncodeError> {
        let ms = self.started.elapsed().as_millis() as u64;
        self.encode_at(img, ms)
    }

    /// Encodes one picture with a timestamp in milliseconds (rate control paces by it; benchmarks
    /// replay scenes faster than real time with the timestamps of real time).
    pub fn encode_at(&mut self, img: &I420, ms: u64) -> Result<Option<EncodedFrame>, EncodeError> {
        let (w, h) = (img.width, img.height);
        if self.enc.is_none() || self.size != (w, h) {
            self.qp_ceiling = self.ceiling_for((w, h));
            let api = OpenH264API::from_source();
            let enc =
                Encoder::with_api_config(api, config(self.target, self.qp_ceiling, self.threads))
                    .map_err(|e| EncodeError::Create(e.to_string()))?;
            self.enc = Some(enc);
            self.size = (w, h);
            self.want_key = false; // a fresh encoder starts with one
        }
        let enc = self
            .enc
            .as_mut()
            .ok_or_else(|| EncodeError::Create("encoder missing".into()))?;
        if std::mem::take(&mut self.want_key) {
            enc.force_intra_frame();
        }
        let ts = openh264::Timestamp::from_millis(ms);
        let bs = enc
            .encode_at(img, ts)
            .map_err(|e| EncodeError::Encode(e.to_string()))?;
        let keyframe = match bs.frame_type() {
            FrameType::Skip | FrameType::Invalid => return Ok(None),
            FrameType::IDR | FrameType::I => true,
            _ => false,
        };
        let data = bs.to_vec();
        if data.is_empty() {
            return Ok(None);
        }
        let (dw, dh) = img.dimensions();
        Ok(Some(EncodedFrame {
            data,
            keyframe,
            width: dw as u32,
            height: dh as u32,
        }))
    }
}

/// Sets bitrate and maximum frame rate on a running encoder.
#[allow(unsafe_code)]
fn set_rate(enc: &mut Encoder, t: Target) {
    use openh264_sys2::{
        ENCODER_OPTION_BITRATE, ENCODER_OPTION_FRAME_RATE, SBitrateInfo, SPATIAL_LAYER_ALL,
    };
    let mut br = SBitrateInfo {
        iLayer: SPATIAL_LAYER_ALL,
        iBitrate: t.bitrate_bps.min(i32::MAX as u32) as i32,
    };
    let mut fps: f32 = t.max_fps;
    // SAFETY: the encoder is initialised (it exists only after `with_api_config` succeeded);
    // ENCODER_OPTION_BITRATE reads one `SBitrateInfo` and ENCODER_OPTION_FRAME_RATE one `float`
    // through the pointers, which point to live, correctly typed locals for the whole call. These
    // options change rate control targets only, which the encoder supports at run time.
    unsafe {
        let api = enc.raw_api();
        let _ = api.set_option(ENCODER_OPTION_BITRATE, (&raw mut br).cast());
        let _ = api.set_option(ENCODER_OPTION_FRAME_RATE, (&raw mut fps).cast());
    }
}
