//! Tandem's screen pipeline: every millisecond between a pixel changing on the user's screen and the
//! technician seeing it, except the network.
//!
//! capture ([`capture`], X11 with a private shared-memory segment) → change detection ([`frame`]:
//! an unchanged screen costs nothing) → BGRX→I420 ([`convert`], SIMD) → OpenH264 in screen-content
//! real-time mode ([`encode`]) → … → decode ([`decode`]) → RGBA.

pub mod capture;
pub mod convert;
pub mod decode;
pub mod encode;
pub mod frame;
pub mod load;
pub mod pipeline;

pub use capture::{CaptureError, Captured, Capturer, CursorShape, CursorState, Monitor};
pub use convert::{
    I420, bgrx_to_i420, bgrx_to_i420_changed, downscale_half, downscale_half_changed, i420_to_rgba,
    rgba_to_frame,
};
pub use decode::{DecodeError, DecodedFrame, VideoDecoder};
pub use encode::{EncodeError, EncodedFrame, Target, VideoEncoder};
pub use frame::{ChangeDetector, Frame, Rect, luma_psnr, plane_psnr};
pub use pipeline::{PipelineError, ScreenPipeline, StageTimes, Step};

/// True when the OpenH264 in this binary was built with its x86 assembly (nasm). Without it the
/// encoder is about three times slower; the test suite fails on such a build.
pub fn openh264_has_assembly() -> bool {
    // The assembly's symbols (e.g. `WelsSampleSad16x16_sse2`) are only linked in when nasm built
    // them. Look for one in this executable's symbol table.
    let Ok(exe) = std::fs::read("/proc/self/exe") else {
        return false;
    };
    let needle = b"WelsSampleSad16x16_sse2";
    exe.windows(needle.len()).any(|w| w == needle)
}
