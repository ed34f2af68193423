//! Colour conversion: BGRX → I420 for the encoder, I420 → RGBA for display, with the `yuv` crate
//! (SIMD: AVX2/SSE on x86-64, chosen at run time), BT.601 limited range as OpenH264 expects.
//! The pipeline benchmark compares it with OpenH264's own converter; see the README.

use crate::frame::Frame;
use yuv::{
    YuvConversionMode, YuvPlanarImage, YuvPlanarImageMut, YuvRange, YuvStandardMatrix,
    bgra_to_yuv420, yuv420_to_rgba,
};

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("frame of {width}x{height} cannot be converted: {reason}")]
    Size {
        width: u32,
        height: u32,
        reason: String,
    },
}

/// A planar YUV 4:2:0 image with even dimensions.
#[derive(Clone, Debug, Default)]
pub struct I420 {
    pub width: u32,
    pub height: u32,
    pub y: Vec<u8>,
    pub u: Vec<u8>,
    pub v: Vec<u8>,
}

impl I420 {
    fn resize(&mut self, width: u32, height: u32) {
        if self.width != width || self.height != height {
            self.width = width;
            self.height = height;
            let cw = width.div_ceil(2) as usize;
            let ch = height.div_ceil(2) as usize;
            self.y = vec![0; width as usize * height as usize];
            self.u = vec![0; cw * ch];
            self.v = vec![0; cw * ch];
        }
    }

    fn chroma_width(&self) -> u32 {
        self.width.div_ceil(2)
    }
}

impl openh264::formats::YUVSource for I420 {
    fn dimensions(&self) -> (usize, usize) {
        (self.width as usize, self.height as usize)
    }
    fn strides(&self) -> (usize, usize, usize) {
        let c = self.chroma_width() as usize;
        (self.width as usize, c, c)
    }
    fn y(&self) -> &[u8] {
        &self.y
    }
    fn u(&self) -> &[u8] {
        &self.u
    }
    fn v(&self) -> &[u8] {
        &self.v
    }
}

/// Converts a BGRX frame into `out` (reusing its buffers). Odd widths or heights lose their last
/// column or row (H.264 macroblocks are even).
pub fn bgrx_to_i420(frame: &Frame, out: &mut I420) -> Result<(), ConvertError> {
    let (w, h) = (frame.width & !1, frame.height & !1);
    let err = |reason: &str| ConvertError::Size {
        width: frame.width,
        height: frame.height,
        reason: reason.into(),
    };
    if w == 0 || h == 0 {
        return Err(err("empty"));
    }
    if frame.data.len() < frame.stride * (h as usize - 1) + w as usize * 4 {
        return Err(err("buffer shorter than its dimensions"));
    }
    out.resize(w, h);
    let cw = out.chroma_width();
    let mut planar = YuvPlanarImageMut {
        y_plane: yuv::BufferStoreMut::Borrowed(&mut out.y),
        y_stride: w,
        u_plane: yuv::BufferStoreMut::Borrowed(&mut out.u),
        u_stride: cw,
        v_plane: yuv::BufferStoreMut::Borrowed(&mut out.v),
        v_stride: cw,
        width: w,
        height: h,
    };
    bgra_to_yuv420(
        &mut planar,
        &frame.data,
        frame.stride as u32,
        YuvRange::Limited,
        YuvStandardMatrix::Bt601,
        YuvConversionMode::Balanced,
    )
    .map_err(|e| err(&e.to_string()))
}

/// Converts planes (strides in bytes) to packed RGBA.
#[allow(clippy::too_many_arguments)]
pub fn i420_to_rgba(
    width: u32,
    height: u32,
    y: &[u8],
    y_stride: u32,
    u: &[u8],
    v: &[u8],
    uv_stride: u32,
    rgba: &mut Vec<u8>,
) -> Result<(), ConvertError> {
    let planar = YuvPlanarImage {
        y_plane: y,
        y_stride,
        u_plane: u,
        u_stride: uv_stride,
        v_plane: v,
        v_stride: uv_stride,
        width,
        height,
    };
    rgba.resize(width as usize * height as usize * 4, 0);
    yuv420_to_rgba(
        &planar,
        rgba,
        width * 4,
        YuvRange::Limited,
        YuvStandardMatrix::Bt601,
    )
    .map_err(|e| ConvertError::Size {
        width,
        height,
        reason: e.to_string(),
    })
}

/// Halves a frame in both directions (2×2 box filter), for paths too slow to carry full resolution.
pub fn downscale_half(src: &Frame, dst: &mut Frame) {
    let (w, h) = (src.width / 2, src.height / 2);
    if dst.width != w || dst.height != h {
        *dst = Frame::new(w, h);
    }
    for y in 0..h as usize {
        let r0 = &src.data[2 * y * src.stride..];
        let r1 = &src.data[(2 * y + 1) * src.stride..];
        let out = &mut dst.data[y * dst.stride..y * dst.stride + w as usize * 4];
        for x in 0..w as usize {
            for c in 0..4 {
                let i = 8 * x + c;
                let s = r0[i] as u16 + r0[i + 4] as u16 + r1[i] as u16 + r1[i + 4] as u16;
                out[4 * x + c] = ((s + 2) / 4) as u8;
            }
        }
    }
}

/// Packs RGBA into a BGRX frame (for comparing decoded output with captured input).
pub fn rgba_to_frame(width: u32, height: u32, rgba: &[u8]) -> Frame {
    let mut f = Frame::new(width, height);
    for (d, s) in f.data.chunks_exact_mut(4).zip(rgba.chunks_exact(4)) {
        d[0] = s[2];
        d[1] = s[1];
        d[2] = s[0];
        d[3] = 0;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::luma_psnr;

    fn gradient(w: u32, h: u32) -> Frame {
        let mut f = Frame::new(w, h);
        for y in 0..h {
            for x in 0..w {
                let i = y as usize * f.stride + x as usize * 4;
                f.data[i] = (x * 255 / w) as u8;
                f.data[i + 1] = (y * 255 / h) as u8;
                f.data[i + 2] = ((x + y) % 256) as u8;
            }
        }
        f
    }

    #[test]
    fn round_trip_keeps_luma() {
        let f = gradient(320, 240);
        let mut yuv = I420::default();
        bgrx_to_i420(&f, &mut yuv).unwrap();
        let mut rgba = Vec::new();
        i420_to_rgba(320, 240, &yuv.y, 320, &yuv.u, &yuv.v, 160, &mut rgba).unwrap();
        let back = rgba_to_frame(320, 240, &rgba);
        let p = luma_psnr(&f, &back);
        assert!(p > 40.0, "psnr {p}");
    }

    #[test]
    fn odd_sizes_and_short_buffers() {
        let f = gradient(321, 241);
        let mut yuv = I420::default();
        bgrx_to_i420(&f, &mut yuv).unwrap();
        assert_eq!((yuv.width, yuv.height), (320, 240));
        let bad = Frame {
            width: 100,
            height: 100,
            stride: 400,
            data: vec![0; 100],
        };
        assert!(bgrx_to_i420(&bad, &mut yuv).is_err());
        assert!(bgrx_to_i420(&Frame::new(1, 1), &mut yuv).is_err());
    }

    #[test]
    fn downscale_averages() {
        let mut f = Frame::new(4, 2);
        f.data[0] = 100; // (0,0) blue
        f.data[4] = 200; // (1,0)
        let mut d = Frame::new(1, 1);
        downscale_half(&f, &mut d);
        assert_eq!((d.width, d.height), (2, 1));
        assert_eq!(d.data[0], 75);
    }
}
