//! H.264 decoding. Any byte sequence gives a frame, nothing yet, or an error; an error (or a gap in
//! the frame numbers) means the caller asks for a keyframe and keeps showing the last good frame.

use crate::convert::{I420, i420_to_rgba};
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
        let p = Planes::check(&yuv, max)?;
        let mut rgba = Vec::new();
        let t = std::time::Instant::now();
        i420_to_rgba(
            p.w as u32,
            p.h as u32,
            yuv.y(),
            p.ys as u32,
            yuv.u(),
            yuv.v(),
            p.us as u32,
            &mut rgba,
        )
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
        self.last_rgba_time = t.elapsed();
        let luma = keep_luma.then(|| {
            yuv.y()
                .chunks(p.ys)
                .take(p.h)
                .flat_map(|row| row[..p.w].iter().copied())
                .collect()
        });
        Ok(Some(DecodedFrame {
            width: p.w as u32,
            height: p.h as u32,
            rgba,
            luma,
        }))
    }

    /// Decodes one encoded frame into `out` as I420 with packed planes (stride = width, chroma
    /// `ceil(width/2) × ceil(height/2)`), reusing its buffers. Returns whether a picture came out.
    /// This is what the sandboxed decoder process sends back; [`DecodedFrame::from_i420`] makes
    /// RGBA of it.
    pub fn decode_i420(&mut self, data: &[u8], out: &mut I420) -> Result<bool, DecodeError> {
        let max = self.max_pixels;
        let yuv = match self.dec.decode(data) {
            Ok(Some(y)) => y,
            Ok(None) => return Ok(false),
            Err(e) => return Err(DecodeError::Corrupt(e.to_string())),
        };
        let p = Planes::check(&yuv, max)?;
        let (cw, ch) = (p.w.div_ceil(2), p.h.div_ceil(2));
        out.width = p.w as u32;
        out.height = p.h as u32;
        pack(&mut out.y, yuv.y(), p.ys, p.w, p.h);
        pack(&mut out.u, yuv.u(), p.us, cw, ch);
        pack(&mut out.v, yuv.v(), p.vs, cw, ch);
        Ok(true)
    }
}

/// Copies `h` rows of `w` bytes, `stride` apart in `src`, into `dst` without gaps.
fn pack(dst: &mut Vec<u8>, src: &[u8], stride: usize, w: usize, h: usize) {
    dst.clear();
    dst.reserve(w * h);
    for row in src.chunks(stride).take(h) {
        dst.extend_from_slice(&row[..w]);
    }
}

/// The checked geometry of a decoded picture.
struct Planes {
    w: usize,
    h: usize,
    ys: usize,
    us: usize,
    vs: usize,
}

impl Planes {
    /// Refuses sizes above `max` pixels and planes shorter than their size and strides say.
    fn check(yuv: &impl YUVSource, max: u64) -> Result<Planes, DecodeError> {
        let (w, h) = yuv.dimensions();
        if w == 0 || h == 0 || (w as u64) * (h as u64) > max {
            return Err(DecodeError::Corrupt(format!("implausible size {w}x{h}")));
        }
        let (ys, us, vs) = yuv.strides();
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let fits = |len: usize, stride: usize, w: usize, h: usize| {
            stride >= w && len >= stride * (h - 1) + w
        };
        if !fits(yuv.y().len(), ys, w, h)
            || !fits(yuv.u().len(), us, cw, ch)
            || !fits(yuv.v().len(), vs, cw, ch)
        {
            return Err(DecodeError::Corrupt(format!(
                "inconsistent planes for {w}x{h} (strides {ys}, {us}, {vs})"
            )));
        }
        Ok(Planes { w, h, ys, us, vs })
    }
}

impl DecodedFrame {
    /// RGBA (and the luma plane if `keep_luma`) of a picture with packed planes, as
    /// [`VideoDecoder::decode_i420`] makes them. Refuses planes shorter than the size says.
    pub fn from_i420(f: &I420, keep_luma: bool) -> Result<DecodedFrame, DecodeError> {
        let (w, h) = (f.width as usize, f.height as usize);
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        if w == 0 || h == 0 || f.y.len() < w * h || f.u.len() < cw * ch || f.v.len() < cw * ch {
            return Err(DecodeError::Corrupt(format!(
                "planes too short for {w}x{h}"
            )));
        }
        let mut rgba = Vec::new();
        i420_to_rgba(
            f.width, f.height, &f.y, f.width, &f.u, &f.v, cw as u32, &mut rgba,
        )
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
        Ok(DecodedFrame {
            width: f.width,
            height: f.height,
            rgba,
            luma: keep_luma.then(|| f.y[..w * h].to_vec()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::bgrx_to_i420;
    use crate::frame::Frame;
    use openh264::encoder::Encoder;

    /// A picture decoded to packed I420 and then to RGBA is the picture decoded straight to RGBA.
    #[test]
    fn packed_i420_gives_the_same_rgba() {
        let (w, h) = (322u32, 182u32);
        let mut src = Frame::new(w, h);
        for (i, px) in src.data.chunks_mut(4).enumerate() {
            let (x, y) = (i as u32 % w, i as u32 / w);
            px.copy_from_slice(&[(x * 3) as u8, (y * 5) as u8, ((x ^ y) * 7) as u8, 0]);
        }
        let mut yuv = I420::default();
        bgrx_to_i420(&src, &mut yuv).unwrap();
        let mut enc = Encoder::new().unwrap();
        let data = enc.encode(&yuv).unwrap().to_vec();
        let mut a = VideoDecoder::new().unwrap();
        let mut b = VideoDecoder::new().unwrap();
        let direct = a.decode(&data).unwrap().unwrap();
        let mut packed = I420::default();
        assert!(b.decode_i420(&data, &mut packed).unwrap());
        assert_eq!((packed.width, packed.height), (direct.width, direct.height));
        let (cw, ch) = (packed.width.div_ceil(2), packed.height.div_ceil(2));
        assert_eq!(packed.y.len(), (packed.width * packed.height) as usize);
        assert_eq!(packed.u.len(), (cw * ch) as usize);
        let via = DecodedFrame::from_i420(&packed, true).unwrap();
        assert_eq!(via.rgba, direct.rgba);
        assert_eq!(via.luma.unwrap().len(), packed.y.len());
        // Short planes are refused, not read past.
        packed.v.pop();
        assert!(DecodedFrame::from_i420(&packed, false).is_err());
    }
}
