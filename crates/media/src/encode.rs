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

/// How fine a picture is encoded: a quality target instead of one fine quantiser for everything.
/// Screen content at the quantisers OpenH264 picks with bits to spare (12–16) measures 50–55 dB
/// luma PSNR, far above what anyone sees, and costs its bits most on the largest changes: a page
/// scrolled, a window dragged, a video. So large changes go at a coarser quantiser while they
/// move, and the picture is sent again finely once it rests, as RDP's progressive codec and VNC's
/// lossless refresh do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Quality {
    /// A small change (typing, a cell edited) or a still picture: as fine as the path allows.
    #[default]
    Final,
    /// Part of a motion (scrolling, dragging, video): quantiser at least [`MOTION_QP`].
    Motion,
    /// The unchanged picture again at [`REFINE_QP`] (or coarser on a slow path): brings what
    /// motion sent coarsely to final quality. Macroblocks that are already fine are skipped.
    Refine,
}

/// The finest quantiser for a picture in motion. Measured with the peer bench at 1080p (see
/// `tests/benches/peers.rs`).
pub const MOTION_QP: u8 = 24;
/// How much coarser than [`MOTION_QP`] rate control may go during motion, whatever the ceiling:
/// with the range closed at the ceiling (18 on a fast path) a full-screen video at 1080p came out
/// at ≈130 KB a frame, and rate control held 8 Mbit/s by dropping three pictures of every four
/// after encoding them (7–8 frames a second for a whole core).
pub const MOTION_QP_SPAN: u8 = 12;
/// The finest quantiser for final quality. Rate control in screen-content mode stays at the finest
/// it is allowed while bits are to spare, so this is what small changes cost: measured with the
/// peer bench at 1080p, 12 (OpenH264's own floor) against 16: a spreadsheet being edited 92 →
/// 24 kbit/s at the same 50.9 dB luma PSNR; a 32×32 change over a photo 6.7 → 3.4 KB.
pub const FINAL_QP: u8 = 16;
/// The quantiser of a refinement pass on a fast path (what it codes again comes out at ≈ 50 dB).
pub const REFINE_QP: u8 = 12;

fn experiment_qp(var: &str, default: u8) -> u8 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<u8>().ok())
        .map_or(default, |q| q.min(51))
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
    /// Added to the quantiser ceiling after a picture did not fit OpenH264's output buffer.
    overflow_boost: u8,
    /// Frames encoded since the boost was raised.
    since_boost: u32,
    want_key: bool,
    /// The feature-search policy in effect (`None`: not yet set on this encoder).
    feature_search_set: Option<bool>,
    /// The encoder in use took Tandem's option to turn the deblocking filter off.
    deblocking_off: bool,
    /// CABAC asked of the next encoder (`TANDEM_EXPERIMENT_CABAC=1`, A/B benches; see
    /// [`set_entropy_coding`] for why CAVLC stays the default).
    cabac: bool,
    /// The encoder in use took Tandem's entropy-coding option (codes with CABAC if `cabac`).
    entropy_set: bool,
    threads: u16,
    /// What the next picture is encoded for, and the quantisers the encoder has (`None`: not yet
    /// initialised; OpenH264 initialises with its first picture).
    quality: Quality,
    qp_range_set: Option<QpSetting>,
    /// The encoder refused Tandem's quantiser-range option (an unpatched OpenH264).
    qp_range_refused: bool,
    /// The initialised encoder refused Tandem's keep option (an unpatched OpenH264).
    keep_refused: bool,
    motion_qp: u8,
    final_qp: u8,
    refine_qp: u8,
    started: std::time::Instant,
    /// Rate control's clock (see [`VideoEncoder::path_busy_until_ms`]): the last timestamp given,
    /// the clock, and until when the path is busy carrying what was sent.
    clock_in: Option<u64>,
    clock: u64,
    busy_until_ms: u64,
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

/// From this target bitrate on, the encoder puts latency before bits: OpenH264's screen-content
/// feature search (it finds content that moved anywhere in the picture by hashing every 8×8 block
/// of the reference picture, ≈10 ms a frame at 1080p on the reference machine) runs only on frames
/// that scrolled, instead of staying on for as long as it paid off on recent frames. Measured with
/// the glass bench, a window dragged at 1080p: 22–25 → 15–17 ms glass-to-glass p50, 152 → 186–192
/// kbit/s. The cross search (a search along each unmatched macroblock's whole column and row)
/// then runs against hashed references only, i.e. on scrolled frames only
/// (`third_party/openh264-cross-search-hashed-only.patch`): full-screen motion at 1080p 10 ms a
/// frame instead of 44–83 ms whenever an earlier scroll had left thresholds behind. Below this
/// rate bits are scarcer than milliseconds and OpenH264 decides as upstream.
pub const LATENCY_FIRST_BPS: u32 = 2_000_000;

/// A picture whose changed macroblocks are more than 1/32 and at most half of it (a window
/// dragged, a dialog moved, a panel slid in: something may have moved whole) gets OpenH264's own
/// feature-search policy even above [`LATENCY_FIRST_BPS`]: the search runs while it pays off on
/// recent frames, and the hashes of the next reference are made between frames
/// ([`VideoEncoder::prepare_next`]), off the path of the next picture. Smaller changes (typing)
/// and larger ones (full-screen motion, where hashing every frame took glass-to-glass p50 from
/// 23 to 39–43 ms) keep the search to real scrolls. Measured, a 800×600 text window dragged over
/// a 1080p desktop (peer bench): 816 → 608 kbit/s at 45.4 → 47.7 dB during motion; glass bench,
/// dragging: 200 → 160 kbit/s, p50 17.1 and 15.9 ms before, 17.1 and 17.6 after (one sitting).
pub const MOVED_REGION_SHARE: (f64, f64) = (1.0 / 32.0, 0.5);

/// How much coarser the quantiser ceiling gets after a picture overflowed the encoder.
pub const OVERFLOW_BOOST: u8 = 12;
/// Frames after which a raised ceiling comes back down.
pub const BOOST_FRAMES: u32 = 300;

/// Encoder threads: OpenH264 splits the picture into slices and encodes them in parallel. Measured
/// with the glass-to-glass bench at 1080p on 2 cores: 2 threads cut the compute floor from 38 to 25
/// ms (typing) and from 100 to 68 ms (full motion), glass-to-glass p50 from 53 to 41 ms (typing).
fn encoder_threads() -> u16 {
    if let Some(n) = std::env::var("TANDEM_EXPERIMENT_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4) as u16)
}

fn config(t: Target, (min_qp, max_qp): (u8, u8), threads: u16) -> EncoderConfig {
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
        .qp(QpRange::new(min_qp, max_qp))
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
            overflow_boost: 0,
            since_boost: 0,
            want_key: false,
            feature_search_set: None,
            deblocking_off: false,
            cabac: std::env::var("TANDEM_EXPERIMENT_CABAC").is_ok_and(|v| v == "1"),
            entropy_set: false,
            threads: encoder_threads(),
            quality: Quality::Final,
            qp_range_set: None,
            qp_range_refused: false,
            // TANDEM_EXPERIMENT_KEEP=0: OpenH264 decides what changed by itself (A/B benches).
            keep_refused: std::env::var("TANDEM_EXPERIMENT_KEEP").is_ok_and(|v| v == "0"),
            motion_qp: experiment_qp("TANDEM_EXPERIMENT_MOTION_QP", MOTION_QP),
            final_qp: experiment_qp("TANDEM_EXPERIMENT_FINAL_QP", FINAL_QP),
            refine_qp: experiment_qp("TANDEM_EXPERIMENT_REFINE_QP", REFINE_QP),
            started: std::time::Instant::now(),
            clock_in: None,
            clock: 0,
            busy_until_ms: 0,
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

    /// Changes bitrate and frame rate in place, and the quantiser ceiling with them (from the next
    /// picture on; an OpenH264 without Tandem's quantiser-range option is re-initialised for a
    /// new ceiling, and then starts with a keyframe).
    pub fn set_target(&mut self, t: Target) {
        if t == self.target {
            return;
        }
        let old = std::mem::replace(&mut self.target, t);
        let ceiling = self
            .ceiling_for(self.size)
            .saturating_add(self.overflow_boost)
            .min(51);
        if self.enc.is_some() && ceiling != self.qp_ceiling {
            if self.qp_range_set.is_none() || self.qp_range_refused {
                self.enc = None;
            } else {
                self.qp_ceiling = ceiling;
            }
        }
        if let Some(enc) = self.enc.as_mut()
            && !set_rate(enc, old, t)
        {
            tracing::warn!(
                bitrate_bps = t.bitrate_bps,
                "the encoder refused the new bitrate; it is rebuilt with it"
            );
            self.enc = None;
        }
    }

    /// The quantiser ceiling in use.
    pub fn qp_ceiling(&self) -> u8 {
        self.qp_ceiling
    }

    /// What the next pictures are encoded for (until set otherwise).
    pub fn set_quality(&mut self, q: Quality) {
        self.quality = q;
    }

    pub fn quality(&self) -> Quality {
        self.quality
    }

    /// The quantisers for `q` under the ceiling `c` the path allows: motion at least `motion_qp`
    /// (the ceiling may be coarser still on a slow path), refinement at one fixed quantiser,
    /// `refine_qp` on a fast path and 6 finer than the ceiling on a slow one (a refinement that
    /// would take the path seconds is worth less than the next change). In a refinement,
    /// unchanged macroblocks coded coarser than its quantiser count as not final and are coded
    /// again if it is finer by more than 5 (upstream OpenH264 leaves anything at or below 26 as it
    /// is, and a refinement would find nothing to do). Other pictures never code an unchanged
    /// macroblock again: with the refinement's threshold every small change after a motion (a
    /// blinking cursor) re-coded the whole screen, and then again whenever rate control's
    /// quantiser swung by more than 5 (measured: 20–37 KB for each 32×32 change on a photo,
    /// ≈ 6 Mbit/s for a ticking clock); with upstream's, the first small change after a motion
    /// that rate control had taken above 26 did (212 KB after a 107 KB picture, then the
    /// refinement again).
    fn qp_setting(&self, q: Quality, c: u8) -> QpSetting {
        let refine = self.refine_qp.max(c.saturating_sub(6));
        let (min, max) = match q {
            Quality::Final => (self.final_qp.min(c), c),
            Quality::Motion => (
                self.motion_qp,
                c.max(self.motion_qp.saturating_add(MOTION_QP_SPAN)).min(51),
            ),
            Quality::Refine => (refine, refine),
        };
        QpSetting {
            min,
            max,
            static_fine: if q == Quality::Refine { refine } else { 51 },
            refine_max_sse: if q == Quality::Refine {
                REFINE_MAX_SSE
            } else {
                -1
            },
        }
    }

    /// Work for the time between two frames, to call once the encoded frame is on its way: after
    /// a scrolled frame, OpenH264's feature search needs block hashes of the picture the next
    /// frame will refer to (the one just encoded; ≈9 ms at 1080p on the reference machine). Made
    /// here, they are off the path of the next frame, which would otherwise compute them before
    /// encoding (scrolls tend to go on, so the next frame most likely needs them; when it does
    /// not, the hashes are dropped unused). The bitstream is the same either way. Returns whether
    /// it hashed.
    pub fn prepare_next(&mut self) -> bool {
        self.enc.as_mut().is_some_and(prepare_feature_search)
    }

    /// Encodes one picture, timestamped now; `None` when rate control skipped it.
    pub fn encode(&mut self, img: &I420) -> Result<Option<EncodedFrame>, EncodeError> {
        self.encode_keeping(img, None)
    }

    /// Encodes one picture, timestamped now, keeping the macroblocks `keep` marks (one byte per
    /// 16×16 macroblock of the picture in raster order, non-zero: unchanged since the last picture
    /// this encoder put out) exactly as the decoder has them: skipped, or coded as zero motion
    /// without a residual. Without it OpenH264 decides by itself which macroblocks changed, and
    /// codes again some that did not (measured in the peer bench's slideshow: after a refined
    /// photo, each frame that changed only a 32×32 counter cost 1.3–81 KB instead of ≈100 bytes
    /// and made the photo coarser again). A map of another size, a keyframe, or an OpenH264
    /// without Tandem's option ignore it.
    pub fn encode_keeping(
        &mut self,
        img: &I420,
        keep: Option<&[u8]>,
    ) -> Result<Option<EncodedFrame>, EncodeError> {
        let ms = self.started.elapsed().as_millis() as u64;
        self.encode_at_keeping(img, ms, keep)
    }

    /// The path carries what was sent until `t` (the caller's pacing estimate), in the clock of
    /// [`VideoEncoder::encode`].
    pub fn path_busy_until(&mut self, t: std::time::Instant) {
        self.path_busy_until_ms(t.saturating_duration_since(self.started).as_millis() as u64);
    }

    /// The same in the milliseconds of [`VideoEncoder::encode_at`].
    ///
    /// Tandem's OpenH264 lets a pause between pictures pay for the pictures before it
    /// (`third_party/openh264-rc-pause-drains.patch`): the path carried nothing meanwhile. That
    /// holds for a still screen, not for the time the agent waits because the path is still
    /// carrying a large frame — counted as idle, that time gave rate control budget for the next
    /// large frame, and on a 1 Mbit/s path frames grew to ≈450 KB, 4 s each (the end-to-end test
    /// `one_megabit_cap_lowers_quality_not_latency` got 3 frames in 15 s instead of 4–10). So
    /// the timestamps rate control sees skip the time the path was busy beyond one frame
    /// interval.
    pub fn path_busy_until_ms(&mut self, ms: u64) {
        self.busy_until_ms = ms;
    }

    /// Rate control's timestamp for a picture at `ms`.
    fn rc_clock(&mut self, ms: u64) -> u64 {
        let Some(last) = self.clock_in.replace(ms) else {
            return self.clock;
        };
        let gap = ms.saturating_sub(last);
        let busy = self.busy_until_ms.saturating_sub(last).min(gap);
        let interval = (1000.0 / f64::from(self.target.max_fps.max(1.0))) as u64;
        self.clock += (gap - busy).max(gap.min(interval));
        self.clock
    }

    /// Encodes one picture with a timestamp in milliseconds (rate control paces by it; benchmarks
    /// replay scenes faster than real time with the timestamps of real time).
    ///
    /// A picture that does not fit OpenH264's output buffer (the raw picture's size: a screen of
    /// noise at a fine quantiser) fails, and OpenH264 then fails every later picture too. So on
    /// any failure the encoder is rebuilt with a coarser quantiser ceiling (+[`OVERFLOW_BOOST`]) and
    /// the picture tried once more, as a keyframe; the ceiling comes back down
    /// [`BOOST_FRAMES`] frames later (one more keyframe).
    pub fn encode_at(&mut self, img: &I420, ms: u64) -> Result<Option<EncodedFrame>, EncodeError> {
        self.encode_at_keeping(img, ms, None)
    }

    /// [`VideoEncoder::encode_at`] with the map of [`VideoEncoder::encode_keeping`].
    pub fn encode_at_keeping(
        &mut self,
        img: &I420,
        ms: u64,
        keep: Option<&[u8]>,
    ) -> Result<Option<EncodedFrame>, EncodeError> {
        let ms = self.rc_clock(ms);
        match self.encode_once(img, ms, keep) {
            Ok(f) => {
                if self.overflow_boost > 0 && f.is_some() {
                    self.since_boost += 1;
                    if self.since_boost >= BOOST_FRAMES {
                        self.overflow_boost = 0;
                        self.enc = None;
                    }
                }
                Ok(f)
            }
            Err(e) => {
                self.enc = None;
                self.since_boost = 0;
                if self.overflow_boost >= 51 {
                    return Err(e);
                }
                self.overflow_boost = (self.overflow_boost + OVERFLOW_BOOST).min(51);
                tracing::warn!(error = %e, qp_ceiling_boost = self.overflow_boost, "encoder rebuilt with a coarser quantiser");
                // A fresh encoder starts with a keyframe: nothing to keep.
                self.encode_once(img, ms, None)
                    .inspect_err(|_| self.enc = None)
            }
        }
    }

    fn encode_once(
        &mut self,
        img: &I420,
        ms: u64,
        keep: Option<&[u8]>,
    ) -> Result<Option<EncodedFrame>, EncodeError> {
        let (w, h) = (img.width, img.height);
        if self.enc.is_none() || self.size != (w, h) {
            self.qp_ceiling = self
                .ceiling_for((w, h))
                .saturating_add(self.overflow_boost)
                .min(51);
            let api = OpenH264API::from_source();
            let q = self.qp_setting(self.quality, self.qp_ceiling);
            let mut enc =
                Encoder::with_api_config(api, config(self.target, (q.min, q.max), self.threads))
                    .map_err(|e| EncodeError::Create(e.to_string()))?;
            self.qp_range_set = None;
            self.deblocking_off = disable_loop_filter(&mut enc);
            self.entropy_set = set_entropy_coding(&mut enc, self.cabac);
            if !self.entropy_set {
                tracing::debug!("OpenH264 without Tandem's entropy-coding option: CAVLC");
            }
            if !self.deblocking_off {
                tracing::debug!(
                    "OpenH264 without Tandem's loop-filter option: deblocking stays on"
                );
            }
            self.enc = Some(enc);
            self.feature_search_set = None;
            self.size = (w, h);
            self.want_key = false; // a fresh encoder starts with one
        }
        let range = self.qp_setting(self.quality, self.qp_ceiling);
        let enc = self
            .enc
            .as_mut()
            .ok_or_else(|| EncodeError::Create("encoder missing".into()))?;
        if std::mem::take(&mut self.want_key) {
            enc.force_intra_frame();
        }
        // The first picture initialises OpenH264 with the configured range; later ones change it
        // in place (no keyframe).
        if let Some(set) = self.qp_range_set
            && set != range
            && !self.qp_range_refused
        {
            if set_qp_range(enc, range) {
                self.qp_range_set = Some(range);
            } else {
                tracing::debug!(
                    "OpenH264 without Tandem's quantiser-range option: one range for all pictures"
                );
                self.qp_range_refused = true;
            }
        }
        let ts = openh264::Timestamp::from_millis(ms);
        let mbs = (w.div_ceil(16) * h.div_ceil(16)) as usize;
        let keep = keep.filter(|k| k.len() == mbs);
        // Only an initialised encoder takes options (the first picture initialises it, and is a
        // keyframe, where neither the policy nor the map matters; the policy is set after it).
        let initialised = self.qp_range_set.is_some();
        // The feature-search policy for this picture.
        if initialised {
            let moved = keep.is_some_and(|k| {
                let changed = k.iter().filter(|&&b| b == 0).count() as f64 / mbs.max(1) as f64;
                changed > MOVED_REGION_SHARE.0 && changed <= MOVED_REGION_SHARE.1
            });
            let want = self.target.bitrate_bps >= LATENCY_FIRST_BPS && !moved;
            if self.feature_search_set != Some(want) && set_feature_search(enc, want) {
                self.feature_search_set = Some(want);
            }
        }
        let keeping = match keep {
            Some(k) if initialised && !self.keep_refused => {
                if set_keep_mbs(enc, Some(k)) {
                    true
                } else {
                    tracing::debug!(
                        "OpenH264 without Tandem's keep option: it decides what changed by itself"
                    );
                    self.keep_refused = true;
                    false
                }
            }
            _ => false,
        };
        let out = enc
            .encode_at(img, ts)
            .map(|bs| (bs.frame_type(), bs.to_vec()))
            .map_err(|e| EncodeError::Encode(e.to_string()));
        if keeping {
            // The encoder holds the pointer, not a copy: it must not outlive this call.
            set_keep_mbs(enc, None);
        }
        let (frame_type, data) = out?;
        if self.qp_range_set.is_none() {
            // What initialisation set: the configured range, upstream's static threshold.
            self.qp_range_set = Some(QpSetting {
                static_fine: UPSTREAM_STATIC_FINE_QP,
                refine_max_sse: -1,
                ..range
            });
        }
        // Options take effect once OpenH264 is initialised, i.e. after its first picture (which
        // is a keyframe, where the policy does not matter).
        let want = self.target.bitrate_bps >= LATENCY_FIRST_BPS;
        if self.feature_search_set.is_none() && set_feature_search(enc, want) {
            self.feature_search_set = Some(want);
        }
        let keyframe = match frame_type {
            FrameType::Skip | FrameType::Invalid => return Ok(None),
            FrameType::IDR | FrameType::I => true,
            _ => false,
        };
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

/// Tandem's OpenH264 (third_party/openh264-sys2) knows one more option than upstream's: the
/// screen-content feature search only on scrolled frames (see [`LATENCY_FIRST_BPS`]).
const ENCODER_OPTION_TANDEM_FME_ON_SCROLL_ONLY: openh264_sys2::ENCODER_OPTION =
    openh264_sys2::ENCODER_OPTION_BITS_VARY_PERCENTAGE + 1;

/// After a scrolled frame, hash the picture the next frame will refer to now (see
/// [`VideoEncoder::prepare_next`]).
const ENCODER_OPTION_TANDEM_PREPARE_FEATURE_SEARCH: openh264_sys2::ENCODER_OPTION =
    openh264_sys2::ENCODER_OPTION_BITS_VARY_PERCENTAGE + 2;

/// Sets `iLoopFilterDisableIdc` for the encoder's initialisations to come (also before the first).
const ENCODER_OPTION_TANDEM_LOOP_FILTER_DISABLE_IDC: openh264_sys2::ENCODER_OPTION =
    openh264_sys2::ENCODER_OPTION_BITS_VARY_PERCENTAGE + 3;

/// Read-only: the P frames since initialisation on which the screen-content 16x16 cross search
/// ran (see `third_party/openh264-cross-search-hashed-only.patch`).
#[cfg(test)]
const ENCODER_OPTION_TANDEM_CROSS_SEARCH_FRAMES: openh264_sys2::ENCODER_OPTION =
    openh264_sys2::ENCODER_OPTION_BITS_VARY_PERCENTAGE + 4;

/// Turns H.264's deblocking filter off (`disable_deblocking_filter_idc` = 1 in every slice; the
/// decoder follows the slice header). The filter smooths block edges, which suits camera video
/// and smears the sharp edges of text. Measured with the media bench at 1080p (same run, A/B):
/// luma PSNR at 4 Mbit/s 40.4 → 47.9 dB on the worst frame (typing 40.4 → 47.9, dragging 41.7 →
/// 49.3, full motion 52.1 → 59.5 on average) for the same or fewer bits; at 1.5 Mbit/s 34.3 →
/// 35.6 dB; at 500 kbit/s the same (29.3). Decoding is ≈8 % faster (6.4 → 5.9 ms p50), and the
/// encoder no longer filters its reconstruction either. Returns whether the encoder took it (an
/// OpenH264 without Tandem's patch refuses the unknown option and deblocks as upstream).
fn disable_loop_filter(enc: &mut Encoder) -> bool {
    set_remembered_option(enc, ENCODER_OPTION_TANDEM_LOOP_FILTER_DISABLE_IDC, 1)
}

/// Sets one of Tandem's `int32_t` options that OpenH264 remembers for its initialisations to
/// come (so also before the first); returns whether the encoder took it.
#[allow(unsafe_code)]
fn set_remembered_option(
    enc: &mut Encoder,
    option: openh264_sys2::ENCODER_OPTION,
    value: i32,
) -> bool {
    let mut value = value;
    // SAFETY: the option reads one `int32_t` through the pointer, which points to a live `i32`
    // local for the whole call; Tandem's OpenH264 takes it before initialisation (it only stores
    // it), any other refuses it with an error code without reading.
    unsafe { enc.raw_api().set_option(option, (&raw mut value).cast()) == 0 }
}

/// Chooses H.264's entropy coding: CABAC (arithmetic coding, High profile) or CAVLC (Baseline).
/// OpenH264 has both and upstream's default is CAVLC; the `openh264` crate has no setting for it.
/// Measured at 1080p (peer bench, same sitting, A/B): CABAC codes large changes in 11–30 % fewer
/// bits at the same PSNR (scrolling 941 → 791 kbit/s, dragging 598 → 521, full-screen video
/// 2,652 → 1,853, web page 999 → 889, slideshow 2,092 → 1,738) but every picture of a 1080p
/// screen pays ≈ 35 bytes for its 8,160 skip flags (typing 18 → 28 kbit/s, spreadsheet 23 → 30
/// at 30 pictures a second), and OpenH264's CABAC writer made the agent's capture → encoded time
/// 38–53 % longer (glass bench: dragging 13.7 → 22.0 ms p50, full-screen motion 13.7 → 20.0,
/// scrolling 21.4 → 25.6, typing 10.0 → 12.1). Latency first: CAVLC stays the default until a
/// picture can choose (two picture parameter sets, CAVLC for small changes and CABAC for large
/// ones, would keep both gains) and the writer is faster. Returns whether the encoder took the
/// option (an OpenH264 without Tandem's patch refuses it and codes CAVLC).
fn set_entropy_coding(enc: &mut Encoder, cabac: bool) -> bool {
    set_remembered_option(enc, ENCODER_OPTION_TANDEM_ENTROPY_CODING, i32::from(cabac))
}

/// Sets the feature-search policy; returns whether the encoder took it (an OpenH264 without
/// Tandem's patch refuses the option and decides as upstream; so does one not yet initialised).
#[allow(unsafe_code)]
fn set_feature_search(enc: &mut Encoder, on_scroll_only: bool) -> bool {
    let mut on_scroll_only = on_scroll_only;
    // SAFETY: the encoder is initialised; the option reads one C++ `bool` through the pointer,
    // which points to a live `bool` local (same size and representation) for the whole call.
    // Unknown options are refused with an error code, never read.
    unsafe {
        enc.raw_api().set_option(
            ENCODER_OPTION_TANDEM_FME_ON_SCROLL_ONLY,
            (&raw mut on_scroll_only).cast(),
        ) == 0
    }
}

/// Asks the encoder to hash the next reference picture now; returns whether it did.
#[allow(unsafe_code)]
fn prepare_feature_search(enc: &mut Encoder) -> bool {
    let mut did: i32 = 0;
    // SAFETY: the encoder is initialised; the option writes one `int32_t` through the pointer,
    // which points to a live `i32` local for the whole call. An OpenH264 without Tandem's patch
    // refuses the unknown option with an error code and touches nothing.
    let rc = unsafe {
        enc.raw_api().set_option(
            ENCODER_OPTION_TANDEM_PREPARE_FEATURE_SEARCH,
            (&raw mut did).cast(),
        )
    };
    rc == 0 && did == 1
}

/// Rate control's quantiser range and the static-macroblock threshold (see
/// [`VideoEncoder::qp_setting`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct QpSetting {
    min: u8,
    max: u8,
    static_fine: u8,
    /// In a refinement (≥ 0): an unchanged macroblock is coded again if and only if its luma as
    /// decoded so far differs from the picture by more than this sum of squared differences.
    refine_max_sse: i32,
}

/// A refinement codes again the macroblocks decoded below 45 dB luma PSNR (mean squared error
/// over 2.06 on 256 samples), whatever quantiser they had: text sent at 24 is mostly above it
/// and stays, a photo or film grain at the same quantiser is below it and is sent again.
pub const REFINE_MAX_SSE: i32 = 526;

/// OpenH264's own threshold: unchanged macroblocks coded at or below this quantiser are skipped.
const UPSTREAM_STATIC_FINE_QP: u8 = 26;

/// Tandem's OpenH264 changes rate control's quantiser range in place, and the static threshold
/// and what a refinement codes again (`int32_t[4]`: min, max, static fine, refine max SSE).
const ENCODER_OPTION_TANDEM_QP_RANGE: openh264_sys2::ENCODER_OPTION =
    openh264_sys2::ENCODER_OPTION_BITS_VARY_PERCENTAGE + 5;

/// Tandem's OpenH264 codes the macroblocks a map marks as unchanged as copies of the reference
/// (`STandemKeepMbs*`; see `third_party/openh264-keep-mbs-option.patch`).
const ENCODER_OPTION_TANDEM_KEEP_MBS: openh264_sys2::ENCODER_OPTION =
    openh264_sys2::ENCODER_OPTION_BITS_VARY_PERCENTAGE + 6;
/// Tandem's OpenH264 option: -1 as the parameters say, 0 CAVLC, 1 CABAC, for every later
/// initialisation (`third_party/openh264-entropy-coding-option.patch`).
const ENCODER_OPTION_TANDEM_ENTROPY_CODING: openh264_sys2::ENCODER_OPTION =
    openh264_sys2::ENCODER_OPTION_BITS_VARY_PERCENTAGE + 7;

/// `STandemKeepMbs` of Tandem's `codec_app_def.h`.
#[repr(C)]
struct TandemKeepMbs {
    keep: *const u8,
    count: std::ffi::c_int,
}

/// Points the encoder at `keep` for the pictures to come, or at none; returns whether it took it.
/// The caller clears it (`None`) before the slice goes away.
#[allow(unsafe_code)]
fn set_keep_mbs(enc: &mut Encoder, keep: Option<&[u8]>) -> bool {
    let mut arg = TandemKeepMbs {
        keep: keep.map_or(std::ptr::null(), <[u8]>::as_ptr),
        count: keep.map_or(0, |k| std::ffi::c_int::try_from(k.len()).unwrap_or(0)),
    };
    // SAFETY: the encoder is initialised; the option reads the struct for the call only and keeps
    // its pointer, which `encode_once` clears right after the one encode that may read it (the
    // slice is borrowed for that whole time). Unknown options are refused without reading.
    unsafe {
        enc.raw_api()
            .set_option(ENCODER_OPTION_TANDEM_KEEP_MBS, (&raw mut arg).cast())
            == 0
    }
}

/// Sets the quantisers from the next picture on; returns whether the encoder took them (an
/// OpenH264 without Tandem's patch refuses the option).
#[allow(unsafe_code)]
fn set_qp_range(enc: &mut Encoder, q: QpSetting) -> bool {
    let mut range: [i32; 4] = [
        i32::from(q.min),
        i32::from(q.max),
        i32::from(q.static_fine),
        q.refine_max_sse,
    ];
    // SAFETY: the encoder is initialised (it has encoded a picture); the option reads four
    // `int32_t` through the pointer, which points to a live `[i32; 4]` local for the whole call.
    // Unknown options are refused with an error code, never read.
    unsafe {
        enc.raw_api()
            .set_option(ENCODER_OPTION_TANDEM_QP_RANGE, range.as_mut_ptr().cast())
            == 0
    }
}

/// Sets bitrate and maximum frame rate on a running encoder (from `old`, the target it has).
///
/// The maximum bitrate moves with the target, as at initialisation (the `openh264` crate sets
/// both to the target). OpenH264 refuses a target above the maximum, but only after writing it,
/// and its frame skipping holds the stream under the maximum: the agent starts at 4 Mbit/s and
/// raises the target to what the path carries, so with the maximum left behind the encoder was
/// told 8 Mbit/s and skipped frames to stay under 4 (glass bench, 1080p full motion at full
/// resolution: 57–65 of 320 frames skipped, each change then a frame later). So the maximum goes
/// first when the target rises, and last when it falls: it is never below the target.
///
/// Two limits, out of reach while the agent stays at or below 8 Mbit/s (`path_bitrate`), to keep
/// in mind before raising that cap (found in review): OpenH264 spreads a target set for all
/// layers in `float`, which above 2^24 bit/s can round the layer's share above the maximum set
/// here (refused, so the encoder is rebuilt); and a maximum above the level the stream started
/// with raises the level only inside the encoder, not in the sequence header already sent
/// (Tandem's own decoder does not check it).
#[allow(unsafe_code)]
fn set_rate(enc: &mut Encoder, old: Target, t: Target) -> bool {
    use openh264_sys2::{
        ENCODER_OPTION_BITRATE, ENCODER_OPTION_FRAME_RATE, ENCODER_OPTION_MAX_BITRATE,
        SBitrateInfo, SPATIAL_LAYER_0, SPATIAL_LAYER_ALL,
    };
    let bps = t.bitrate_bps.min(i32::MAX as u32) as i32;
    // The frame skipping reads the layer's maximum (`iMaxSpatialBitrate`), not the total.
    let target = (ENCODER_OPTION_BITRATE, SPATIAL_LAYER_ALL);
    let max = (ENCODER_OPTION_MAX_BITRATE, SPATIAL_LAYER_0);
    let order = if t.bitrate_bps > old.bitrate_bps {
        [max, target]
    } else {
        [target, max]
    };
    let mut fps: f32 = t.max_fps;
    // SAFETY: the encoder is initialised (it exists only after `with_api_config` succeeded, and
    // the caller has encoded a picture with it); ENCODER_OPTION_BITRATE and _MAX_BITRATE read one
    // `SBitrateInfo` and ENCODER_OPTION_FRAME_RATE one `float` through the pointers, which point
    // to live, correctly typed locals for the whole call. These options change rate control
    // targets only, which the encoder supports at run time.
    unsafe {
        let api = enc.raw_api();
        // Every option is tried, in order, even after one was refused.
        let rates = order.iter().fold(true, |ok, &(option, layer)| {
            let mut br = SBitrateInfo {
                iLayer: layer,
                iBitrate: bps,
            };
            api.set_option(option, (&raw mut br).cast()) == 0 && ok
        });
        api.set_option(ENCODER_OPTION_FRAME_RATE, (&raw mut fps).cast()) == 0 && rates
    }
}

/// The encoder's target and maximum bitrate of its one layer, bits per second.
#[cfg(test)]
#[allow(unsafe_code)]
fn layer_rates(enc: &mut Encoder) -> (i32, i32) {
    use openh264_sys2::{
        ENCODER_OPTION_BITRATE, ENCODER_OPTION_MAX_BITRATE, SBitrateInfo, SPATIAL_LAYER_0,
    };
    let mut br = SBitrateInfo {
        iLayer: SPATIAL_LAYER_0,
        iBitrate: 0,
    };
    let mut max = SBitrateInfo {
        iLayer: SPATIAL_LAYER_0,
        iBitrate: 0,
    };
    // SAFETY: as in `set_rate`; the options write one `SBitrateInfo` each.
    unsafe {
        let api = enc.raw_api();
        api.get_option(ENCODER_OPTION_BITRATE, (&raw mut br).cast());
        api.get_option(ENCODER_OPTION_MAX_BITRATE, (&raw mut max).cast());
    }
    (br.iBitrate, max.iBitrate)
}
/// The P frames the encoder's cross search ran on (`None`: not initialised, or not Tandem's
/// OpenH264).
#[cfg(test)]
#[allow(unsafe_code)]
fn cross_search_frames(enc: &mut Encoder) -> Option<i32> {
    let mut n: i32 = -1;
    // SAFETY: the option writes one `int32_t` through the pointer, which points to a live `i32`
    // local for the whole call; unknown options are refused without writing.
    let rc = unsafe {
        enc.raw_api().get_option(
            ENCODER_OPTION_TANDEM_CROSS_SEARCH_FRAMES,
            (&raw mut n).cast(),
        )
    };
    (rc == 0 && n >= 0).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Frame;

    /// The payloads (after the NAL header) of the first SPS and PPS in an Annex B stream.
    fn parameter_sets(stream: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let (mut sps, mut pps) = (None, None);
        let starts: Vec<usize> = (0..stream.len().saturating_sub(3))
            .filter(|&i| stream[i..i + 3] == [0, 0, 1])
            .map(|i| i + 3)
            .collect();
        for (k, &s) in starts.iter().enumerate() {
            let end = starts.get(k + 1).map_or(stream.len(), |&n| n - 3);
            let nal = &stream[s..end];
            match nal.first().map(|h| h & 0x1f) {
                Some(7) if sps.is_none() => sps = Some(nal[1..].to_vec()),
                Some(8) if pps.is_none() => pps = Some(nal[1..].to_vec()),
                _ => {}
            }
        }
        (sps.expect("an SPS"), pps.expect("a PPS"))
    }

    /// A bit reader for the parameter sets' Exp-Golomb fields.
    struct Bits<'a> {
        data: &'a [u8],
        pos: usize,
    }

    impl Bits<'_> {
        fn bit(&mut self) -> u32 {
            let b = (self.data[self.pos / 8] >> (7 - self.pos % 8)) & 1;
            self.pos += 1;
            u32::from(b)
        }

        fn ue(&mut self) -> u32 {
            let mut zeros = 0;
            while self.bit() == 0 {
                zeros += 1;
            }
            let mut v = 0;
            for _ in 0..zeros {
                v = v << 1 | self.bit();
            }
            (1 << zeros) - 1 + v
        }
    }

    /// The vendored OpenH264 is the one linked: it knows Tandem's feature-search option, and the
    /// encoder sets it after its first picture and again when the target crosses the line.
    #[test]
    fn the_encoder_takes_the_feature_search_option() {
        let mut v = VideoEncoder::new(Target::default()).unwrap();
        v.cabac = true;
        let mut yuv = I420::default();
        crate::convert::bgrx_to_i420(&Frame::new(64, 64), &mut yuv).unwrap();
        assert_eq!(v.feature_search_set, None);
        let first = v.encode_at(&yuv, 0).unwrap().unwrap();
        assert_eq!(v.feature_search_set, Some(true));
        // And the loop-filter and entropy-coding options, before the first picture.
        assert!(v.deblocking_off);
        assert!(v.entropy_set);
        // CABAC is in the bitstream: a High profile sequence (profile_idc 100) whose picture
        // parameters say entropy_coding_mode_flag = 1.
        let (sps, pps) = parameter_sets(&first.data);
        assert_eq!(sps[0], 100, "profile_idc");
        let mut bits = Bits { data: &pps, pos: 0 };
        let _pps_id = bits.ue();
        let _sps_id = bits.ue();
        assert_eq!(bits.bit(), 1, "entropy_coding_mode_flag");
        v.set_target(Target {
            bitrate_bps: 500_000,
            ..Target::default()
        });
        v.encode_at(&yuv, 1000).unwrap();
        assert_eq!(v.feature_search_set, Some(false));
        let enc = v.enc.as_mut().unwrap();
        // An option it does not know is refused (so the check above can fail).
        let mut x = 0i32;
        #[allow(unsafe_code)]
        // SAFETY: as in `set_feature_search`; the unknown option is refused without reading.
        let refused = unsafe {
            enc.raw_api().set_option(
                ENCODER_OPTION_TANDEM_ENTROPY_CODING + 1,
                (&raw mut x).cast(),
            )
        };
        assert_ne!(refused, 0);
    }

    /// A page of pseudo-text (glyphs from a small set, so the same patterns recur elsewhere on the
    /// page, which is what the feature search finds), `w` wide.
    fn page(w: u32, h: u32) -> Frame {
        let mut f = Frame::new(w, h);
        f.data.fill(255);
        let mut seed = 7u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed >> 8
        };
        let glyphs: Vec<u64> = (0..40)
            .map(|_| u64::from(rnd()) << 24 | u64::from(rnd()))
            .collect();
        for line in 0..h / 18 {
            let mut x = 8 + rnd() % 16;
            while x + 8 < w {
                let g = glyphs[(rnd() % 40) as usize];
                for dy in 0..9 {
                    for dx in 0..6 {
                        if g >> (dy * 6 + dx) & 1 == 1 {
                            let i = (((line * 18 + 4 + dy) * w + x + dx) * 4) as usize;
                            f.data[i..i + 3].copy_from_slice(&[30, 30, 30]);
                        }
                    }
                }
                x += if rnd() % 6 == 0 { 13 } else { 7 };
            }
        }
        f
    }

    /// `h` rows of `doc` from row `top` on: the screen's view of a long document.
    fn view_of(doc: &Frame, h: u32, top: u32) -> Frame {
        let w = doc.width;
        let mut f = Frame::new(w, h);
        let (a, b) = ((top * w * 4) as usize, ((top + h) * w * 4) as usize);
        f.data.copy_from_slice(&doc.data[a..b]);
        f
    }

    /// An encoder at `bitrate_bps` and 30 fps on one thread (its output does not depend on timing).
    fn one_thread(bitrate_bps: u32) -> VideoEncoder {
        let mut v = VideoEncoder::new(Target {
            bitrate_bps,
            max_fps: 30.0,
        })
        .unwrap();
        v.set_threads(1);
        v
    }

    fn luma_psnr(a: &[u8], b: &[u8]) -> f64 {
        let se: f64 = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
            .sum();
        10.0 * (255.0f64.powi(2) / (se / a.len() as f64).max(1e-9)).log10()
    }

    /// A page of text with some texture in its white, so that the quantiser shows.
    fn textured_page(w: u32, h: u32) -> Frame {
        let mut src = page(w, h);
        for (i, px) in src.data.chunks_exact_mut(4).enumerate() {
            let (x, y) = ((i as u32 % w) as u8, (i as u32 / w) as u8);
            if px[0] == 255 {
                px[..3].copy_from_slice(&[x.wrapping_mul(3) ^ y, 200u8.wrapping_add(y / 3), x / 2]);
            }
        }
        src
    }

    /// CABAC (Tandem's entropy-coding option) decodes to what CAVLC decodes to: the same
    /// pictures through a keyframe, a motion, a refinement and kept macroblocks, within a
    /// fraction of a dB, in fewer bytes for the large pictures.
    #[test]
    fn cabac_decodes_like_cavlc_in_fewer_bytes() {
        let (w, h) = (640u32, 360u32);
        let src = textured_page(w, h);
        let mut moved = src.clone();
        moved.data.rotate_left(4 * 7 + 4 * w as usize * 3);
        let run = |cabac: bool| {
            let mut v = one_thread(20_000_000);
            v.cabac = cabac;
            let mut dec = crate::decode::VideoDecoder::new().unwrap();
            let (mut yuv, mut out) = (I420::default(), I420::default());
            let mut results = vec![];
            for (k, (pic, q)) in [
                (&src, Quality::Final),
                (&moved, Quality::Motion),
                (&moved, Quality::Refine),
                (&moved, Quality::Final),
            ]
            .into_iter()
            .enumerate()
            {
                crate::convert::bgrx_to_i420(pic, &mut yuv).unwrap();
                v.set_quality(q);
                let e = v.encode_at(&yuv, k as u64 * 200).unwrap().unwrap();
                assert!(dec.decode_i420(&e.data, &mut out).unwrap(), "picture {k}");
                results.push((e.data.len(), luma_psnr(&yuv.y, &out.y)));
            }
            assert!(v.entropy_set);
            results
        };
        let (cavlc, cabac) = (run(false), run(true));
        for (k, ((b0, p0), (b1, p1))) in cavlc.iter().zip(&cabac).enumerate() {
            assert!((p0 - p1).abs() < 0.5, "picture {k}: {p0:.2} vs {p1:.2} dB");
            if *b0 > 10_000 {
                assert!(b1 < b0, "picture {k}: {b1} vs {b0} bytes");
            }
        }
    }

    /// A picture in motion goes at a coarser quantiser, and the same picture again as a
    /// refinement sharpens it: a P frame (no keyframe), far smaller than the first picture.
    #[test]
    fn motion_is_coarser_and_a_refinement_sharpens_it_in_place() {
        let (w, h) = (640u32, 360u32);
        let src = textured_page(w, h);
        let mut yuv = I420::default();
        crate::convert::bgrx_to_i420(&src, &mut yuv).unwrap();
        let mut dec = crate::decode::VideoDecoder::new().unwrap();
        let mut out = I420::default();
        let mut v = one_thread(20_000_000);

        v.set_quality(Quality::Motion);
        let first = v.encode_at(&yuv, 0).unwrap().unwrap();
        assert!(first.keyframe);
        assert!(dec.decode_i420(&first.data, &mut out).unwrap());
        let motion = luma_psnr(&yuv.y, &out.y);
        // The motion goes on elsewhere (a P frame of the same picture): nothing to code here.
        if let Some(p) = v.encode_at(&yuv, 33).unwrap() {
            assert!(
                p.data.len() < first.data.len() / 20,
                "{} bytes after {}",
                p.data.len(),
                first.data.len()
            );
            dec.decode_i420(&p.data, &mut out).unwrap();
        }

        v.set_quality(Quality::Refine);
        let refined = v.encode_at(&yuv, 300).unwrap().unwrap();
        assert!(!v.qp_range_refused, "Tandem's OpenH264 takes the range");
        assert!(!refined.keyframe, "refined in place");
        assert!(dec.decode_i420(&refined.data, &mut out).unwrap());
        let fine = luma_psnr(&yuv.y, &out.y);
        assert!(
            motion < 45.0 && fine >= 45.0 && fine > motion + 3.0,
            "motion {motion:.1} dB, refined {fine:.1} dB"
        );

        // Refined once, the same picture again costs next to nothing: what is above 45 dB is
        // not coded again.
        let again = v.encode_at(&yuv, 600).unwrap().map_or(0, |f| f.data.len());
        assert!(again < refined.data.len() / 20, "{again} bytes");
    }

    /// Above the latency-first rate the feature search is kept to scrolls, except for pictures
    /// where a region of moderate size changed (something may have moved whole).
    #[test]
    fn a_moved_region_may_use_the_feature_search() {
        let (w, h) = (320u32, 192u32);
        let mut yuv = I420::default();
        crate::convert::bgrx_to_i420(&page(w, h), &mut yuv).unwrap();
        let mut v = one_thread(20_000_000);
        v.encode_at(&yuv, 0).unwrap();
        assert_eq!(v.feature_search_set, Some(true));
        let mbs = ((w / 16) * (h / 16)) as usize;
        for (changed, scroll_only) in [(4, true), (60, false), (mbs / 2, false), (200, true)] {
            let mut keep = vec![1u8; mbs];
            keep[..changed].fill(0);
            v.encode_at_keeping(&yuv, 33, Some(&keep)).unwrap();
            assert_eq!(
                v.feature_search_set,
                Some(scroll_only),
                "{changed} of {mbs}"
            );
        }
    }

    /// Macroblocks marked as kept are copies of what the decoder already has, whatever the
    /// picture holds there; the others are coded. (The kept region is given different pixels on
    /// purpose: an encoder that ignored the map would code them.)
    #[test]
    fn kept_macroblocks_stay_as_the_decoder_has_them() {
        let (w, h) = (320u32, 192u32);
        let mut src = page(w, h);
        let mut yuv = I420::default();
        crate::convert::bgrx_to_i420(&src, &mut yuv).unwrap();
        let mut dec = crate::decode::VideoDecoder::new().unwrap();
        let (mut first, mut second) = (I420::default(), I420::default());
        let mut v = one_thread(20_000_000);
        v.set_quality(Quality::Final);
        let key = v.encode_at(&yuv, 0).unwrap().unwrap();
        assert!(dec.decode_i420(&key.data, &mut first).unwrap());

        // The top four macroblock rows change: their text moves 8 pixels right (not so much of
        // the picture that OpenH264 calls it a new scene and sends a keyframe; and the motion
        // search may find the move, so that kept macroblocks under moved ones have a non-zero
        // predicted motion and are coded as explicit zero motion rather than skipped). Only the
        // first row is not kept.
        let stride = (w * 4) as usize;
        for row in src.data[..64 * stride].chunks_exact_mut(stride) {
            row.rotate_right(8 * 4);
        }
        crate::convert::bgrx_to_i420(&src, &mut yuv).unwrap();
        let (cols, rows) = (w / 16, h / 16);
        let mut keep = vec![1u8; (cols * rows) as usize];
        keep[..cols as usize].fill(0);
        let p = v
            .encode_at_keeping(&yuv, 33, Some(&keep))
            .unwrap()
            .expect("a picture");
        assert!(!v.keep_refused, "Tandem's OpenH264 takes the map");
        assert!(!p.keyframe);
        assert!(dec.decode_i420(&p.data, &mut second).unwrap());
        let row = (16 * w) as usize;
        assert_eq!(first.y[row..], second.y[row..], "kept rows unchanged");
        let cw = (w / 2) as usize;
        assert_eq!(first.u[8 * cw..], second.u[8 * cw..]);
        assert_eq!(first.v[8 * cw..], second.v[8 * cw..]);
        assert!(
            luma_psnr(&yuv.y[..row], &second.y[..row]) > 40.0,
            "the row not kept shows the new picture"
        );

        // The map is for that picture only: a refinement after it (no map) codes what the
        // decoder shows too far from the picture, i.e. the rows kept against the truth.
        v.set_quality(Quality::Refine);
        let q = v.encode_at(&yuv, 66).unwrap().expect("a picture");
        assert!(dec.decode_i420(&q.data, &mut second).unwrap());
        assert!(luma_psnr(&yuv.y, &second.y) > 40.0);
    }

    /// A new target moves the maximum bitrate with it, up and down, in place: OpenH264's frame
    /// skipping holds the stream under the maximum, which at first is the initial target.
    #[test]
    fn the_maximum_bitrate_follows_the_target() {
        let mut v = one_thread(4_000_000);
        let mut yuv = I420::default();
        crate::convert::bgrx_to_i420(&page(640, 360), &mut yuv).unwrap();
        v.encode_at(&yuv, 0).unwrap();
        let ceiling = v.qp_ceiling();
        for bps in [8_000_000, 5_000_000, 12_000_000] {
            v.set_target(Target {
                bitrate_bps: bps,
                max_fps: 30.0,
            });
            // The same quantiser band: the encoder was changed, not rebuilt.
            assert_eq!(v.qp_ceiling(), ceiling);
            let enc = v.enc.as_mut().expect("not rebuilt");
            assert_eq!(layer_rates(enc), (bps as i32, bps as i32));
        }
    }

    /// Text is not deblocked: the keyframe of a page of text decodes closer to the page than
    /// upstream's (deblocked) one at the same bitrate, and the option is taken before the
    /// encoder's first picture.
    #[test]
    fn text_is_not_smeared_by_the_loop_filter() {
        let (w, h) = (640u32, 360u32);
        let src = page(w, h);
        let mut yuv = I420::default();
        crate::convert::bgrx_to_i420(&src, &mut yuv).unwrap();
        let target = Target {
            bitrate_bps: 1_000_000,
            max_fps: 30.0,
        };
        let psnr = |off: bool| {
            let api = OpenH264API::from_source();
            let mut enc = Encoder::with_api_config(api, config(target, (10, 51), 1)).unwrap();
            if off {
                assert!(disable_loop_filter(&mut enc));
            }
            let data = enc
                .encode_at(&yuv, openh264::Timestamp::ZERO)
                .unwrap()
                .to_vec();
            let mut dec = crate::decode::VideoDecoder::new().unwrap();
            let f = dec.decode(&data).unwrap().unwrap();
            crate::frame::luma_psnr(&src, &crate::convert::rgba_to_frame(w, h, &f.rgba))
        };
        let (deblocked, sharp) = (psnr(false), psnr(true));
        assert!(
            sharp > deblocked + 1.0,
            "without the loop filter {sharp:.1} dB, with it {deblocked:.1} dB"
        );
    }

    /// Hashing the next reference between frames gives the same bitstream as hashing it at the
    /// start of the next frame, and happens after scrolled frames.
    #[test]
    fn preparing_the_feature_search_between_frames_changes_no_bit() {
        let (w, h) = (640u32, 360u32);
        let doc = page(w, 2000);
        let view = |top: u32| view_of(&doc, h, top);
        let mut plain = VideoEncoder::new(Target::default()).unwrap();
        let mut ahead = VideoEncoder::new(Target::default()).unwrap();
        plain.set_threads(1);
        ahead.set_threads(1);
        let mut yuv = I420::default();
        let mut prepared = 0;
        for k in 0..60u32 {
            // Still for a while, then scroll by 27 lines a frame, then type (the search thresholds
            // of a picture hashed ahead but not searched must not change what follows).
            let top = k.clamp(10, 40).saturating_sub(10) * 27;
            let mut f = view(top);
            for t in 40..k {
                let i = ((h as usize - 30) * w as usize + 8 * (t as usize - 40)) * 4;
                f.data[i..i + 16].fill(0);
            }
            crate::convert::bgrx_to_i420(&f, &mut yuv).unwrap();
            let ts = u64::from(k) * 33;
            let a = plain.encode_at(&yuv, ts).unwrap().map(|e| e.data);
            let b = ahead.encode_at(&yuv, ts).unwrap().map(|e| e.data);
            assert_eq!(a, b, "frame {k}");
            if ahead.prepare_next() {
                prepared += 1;
                assert!((10..=40).contains(&k), "only after a scroll: frame {k}");
            }
        }
        // The scroll detector reports 19 of the 30 scrolled frames here; any number near it will do.
        assert!(prepared >= 12, "prepared after {prepared} frames");
        // Nothing to do twice for the same picture.
        assert!(!ahead.prepare_next());
    }

    /// Latency first (8 Mbit/s), the cross search (a search along the whole column and row of each
    /// macroblock the diamond search could not match) runs against hashed references only, as the
    /// feature search: on scrolled frames, not on typing or motion after them. Before, a picture
    /// buffer kept a hashed picture's thresholds when it was recycled, so whether a frame ran the
    /// search depended on the session's history: at 1080p, motion after a scroll took 44–83 ms a
    /// frame instead of 10.
    #[test]
    fn the_cross_search_follows_the_feature_search() {
        let (w, h) = (960u32, 540u32);
        let doc = page(w, 2000);
        let view = |top: u32| view_of(&doc, h, top);
        let mut v = one_thread(8_000_000);
        let mut yuv = I420::default();
        let mut ts = 0u64;
        // Encodes `f` 33 ms after the last: (P frame encoded, cross-search frames so far).
        let mut step = |v: &mut VideoEncoder, f: &Frame| {
            ts += 33;
            crate::convert::bgrx_to_i420(f, &mut yuv).unwrap();
            let e = v.encode_at(&yuv, ts).unwrap();
            let p = e.is_some_and(|e| !e.keyframe);
            (p, cross_search_frames(v.enc.as_mut().unwrap()).unwrap())
        };
        let type_on = |f: &mut Frame, k: u32| {
            let i = ((h - 30) * w + 8 * k) as usize * 4;
            f.data[i..i + 16].fill(0);
        };
        let mut f = view(0);
        for k in 0..10 {
            type_on(&mut f, k);
            assert_eq!(step(&mut v, &f).1, 0, "typing");
        }
        // Scrolling: the feature search hashes the references, and the cross search runs.
        let mut searched = 0;
        for k in 1..=20 {
            f = view(k * 27);
            searched = step(&mut v, &f).1;
        }
        assert!(searched >= 5, "{searched} scrolled frames searched");
        type_on(&mut f, 0);
        let after_scroll = step(&mut v, &f).1;
        assert_eq!(after_scroll, searched, "the first frame after the scroll");
        for k in 1..10 {
            type_on(&mut f, k);
            assert_eq!(step(&mut v, &f).1, after_scroll, "typing after the scroll");
        }
        // A screen full of motion: rectangles of random colours, 15 a frame.
        let mut seed = 3u32;
        let mut p_frames = 0;
        for k in 0..10 {
            for _ in 0..15 {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let (x, y) = ((seed >> 8) % (w - 100), (seed >> 16) % (h - 75));
                let c = seed.to_le_bytes();
                for row in y..y + 75 {
                    let i = ((row * w + x) * 4) as usize;
                    for px in f.data[i..i + 400].chunks_exact_mut(4) {
                        px[..3].copy_from_slice(&c[..3]);
                    }
                }
            }
            let (p, n) = step(&mut v, &f);
            p_frames += usize::from(p);
            assert_eq!(n, after_scroll, "motion frame {k}");
        }
        assert!(
            p_frames >= 8,
            "{p_frames} of 10 motion frames encoded as P frames"
        );
    }

    /// After a pause, the pause's budget pays for the large picture before it: small changes are
    /// not skipped. (Upstream OpenH264 skipped the first 9 here: its rate control drains its
    /// frame-skip buffer per picture, not per second; Tandem's patch
    /// `third_party/openh264-rc-pause-drains.patch` drains it by time too.)
    #[test]
    fn a_pause_pays_for_the_picture_before_it() {
        let (w, h) = (1280u32, 720u32);
        let mut enc = one_thread(4_000_000);
        let mut yuv = I420::default();
        let mut f = Frame::new(w, h);
        f.data.fill(255);
        crate::convert::bgrx_to_i420(&f, &mut yuv).unwrap();
        assert!(enc.encode_at(&yuv, 0).unwrap().is_some());
        // A page of text appears (a large picture), then the screen is still for 1.5 s.
        let mut f = page(w, h);
        crate::convert::bgrx_to_i420(&f, &mut yuv).unwrap();
        let big = enc.encode_at(&yuv, 33).unwrap().map_or(0, |e| e.data.len());
        assert!(big > 100_000, "{big}");
        let mut skipped = vec![];
        for k in 0..10u64 {
            // A keystroke.
            let i = ((h as usize - 20) * w as usize + 8 * k as usize) * 4;
            f.data[i..i + 12].fill(0);
            crate::convert::bgrx_to_i420(&f, &mut yuv).unwrap();
            if enc.encode_at(&yuv, 1533 + k * 33).unwrap().is_none() {
                skipped.push(k);
            }
        }
        assert!(skipped.is_empty(), "skipped {skipped:?}");

        // The same page again, but the "pause" is the path carrying it: no budget for that time,
        // so rate control still pays the page off.
        let mut f = page(w, h);
        f.data.iter_mut().for_each(|b| *b = 255 - *b);
        crate::convert::bgrx_to_i420(&f, &mut yuv).unwrap();
        let t0 = 1533 + 10 * 33 + 33;
        let big = enc.encode_at(&yuv, t0).unwrap().map_or(0, |e| e.data.len());
        assert!(big > 100_000, "{big}");
        enc.path_busy_until_ms(t0 + 1500);
        let mut skipped = 0;
        for k in 0..10u64 {
            let i = ((h as usize - 40) * w as usize + 8 * k as usize) * 4;
            f.data[i..i + 12].fill(0);
            crate::convert::bgrx_to_i420(&f, &mut yuv).unwrap();
            if enc.encode_at(&yuv, t0 + 1500 + k * 33).unwrap().is_none() {
                skipped += 1;
            }
        }
        assert!(skipped > 0, "a busy path is not a pause");
    }

    /// OpenH264 fails a picture larger than its output buffer, and every picture after it. Found
    /// with a 1080p screen of noise at the fine quantiser text gets: before the rebuild, all six
    /// pictures here failed and the technician's view would have frozen for good.
    #[test]
    fn a_picture_too_large_for_the_encoder_does_not_break_the_stream() {
        let mut enc = VideoEncoder::new(Target {
            bitrate_bps: 8_000_000,
            max_fps: 30.0,
        })
        .unwrap();
        enc.set_threads(1);
        // CAVLC: CABAC codes this noise within OpenH264's buffer (and CAVLC is what an OpenH264
        // without Tandem's option codes).
        enc.cabac = false;
        let mut f = Frame::new(1920, 1080);
        let mut yuv = I420::default();
        let mut seed = 1u32;
        let mut out = vec![];
        for k in 0..120u64 {
            if k < 2 {
                for px in f.data.chunks_exact_mut(4) {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    px[..3].copy_from_slice(&seed.to_le_bytes()[1..]);
                }
            } else {
                f.data.fill(200);
                f.data[k as usize * 4000] = 0;
            }
            crate::convert::bgrx_to_i420(&f, &mut yuv).unwrap();
            let e = enc.encode_at(&yuv, k * 33).unwrap();
            out.push(e.map(|e| e.data.len()));
        }
        assert!(out[0].is_some_and(|n| n > 500_000), "{out:?}");
        // Rate control skips frames while it pays the 1.4 MB picture off (≈0.5 s), then the
        // stream goes on.
        assert!(
            out[60..]
                .iter()
                .filter(|n| n.is_some_and(|n| n < 10_000))
                .count()
                > 10,
            "{out:?}"
        );
        assert!(enc.qp_ceiling() > max_qp(1.0), "coarser for a while");
    }
}
