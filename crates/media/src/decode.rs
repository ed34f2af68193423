//! H.264 decoding. Any byte sequence gives a frame, nothing yet, or an error; an error (or a gap in
//! the frame numbers) means the caller asks for a keyframe and keeps showing the last good frame.

use crate::convert::i420_to_rgba;
use openh264::OpenH264API;
use openh264::decoder::{Decoder, DecoderConfig};
use openh264::formats::YUVSource;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("cannot create the H.264 decoder: {0}")]
    Create(String),
    #[error("corrupt or incomplete video data: {0}")]
    Corrupt(String),
}

/// A decoded picture in RGBA.
#[derive(Clone, Debug)]
pub struct DecodedFrame {
    pub width: u32,
    pub height: u32,
    pub rgba: Vec<u8>,
    /// The decoded luma plane (width × height), when [`VideoDecoder::keep_luma`] is set.
    pub luma: Option<Vec<u8>>,
}

pub struct VideoDecoder {
    dec: Decoder,
    /// Frames larger than this are refused (a hostile stream cannot make the console allocate
    /// without bound): 8192×8192 by default.
    pub max_pixels: u64,
    /// Also return the luma plane (quality measurements).
    pub keep_luma: bool,
    /// Time the last call spent converting to RGBA (part of `decode`).
    pub last_rgba_time: std::time::Duration,
}

impl std::fmt::Debug for VideoDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VideoDecoder")
    }
}

impl VideoDecoder {
    pub fn new() -> Result<Self, DecodeError> {
        let dec = Decoder::with_api_config(OpenH264API::from_source(), DecoderConfig::new())
            .map_err(|e| DecodeError::Create(e.to_string()))?;
        Ok(VideoDecoder {
            dec,
            max_pixels: 8192 * 8192,
            keep_luma: false,
            last_rgba_time: std::time::Duration::ZERO,
        })
    }

    /// Decodes one encoded frame into RGBA.
    pub fn decode(&mut self, data: &[u8]) -> Result<Option<DecodedFrame>, DecodeError> {
        let (max, keep_luma) = (self.max_pixels, self.keep_luma);
        let yuv = match self.dec.decode(data) {
            Ok(Some(y)) => y,
            Ok(None) => return Ok(None),
            Err(e) => return Err(DecodeError::Corrupt(e.to_string())),
        };
        let (w, h) = yuv.dimensions();
        if w == 0 || h == 0 || (w as u64) * (h as u64) > max {
            return Err(DecodeError::Corrupt(format!("implausible size {w}x{h}")));
        }
        let (ys, us, _vs) = yuv.strides();
        if ys < w || us < w.div_ceil(2) || yuv.y().len() < ys * (h - 1) + w {
            return Err(DecodeError::Corrupt(format!(
                "inconsistent planes for {w}x{h} (strides {ys}, {us})"
            )));
        }
        let mut rgba = Vec::new();
        let t = std::time::Instant::now();
        i420_to_rgba(
            w as u32,
            h as u32,
            yuv.y(),
            ys as u32,
            yuv.u(),
            yuv.v(),
            us as u32,
            &mut rgba,
        )
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
        self.last_rgba_time = t.elapsed();
        let luma = keep_luma.then(|| {
            yuv.y()
                .chunks(ys)
                .take(h)
                .flat_map(|row| row[..w].iter().copied())
                .collect()
        });
        Ok(Some(DecodedFrame {
            width: w as u32,
            height: h as u32,
            rgba,
            luma,
        }))
    }
}
