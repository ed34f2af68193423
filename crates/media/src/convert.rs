//! Colour conversion: BGRX → I420 for the encoder, I420 → RGBA for display, with the `yuv` crate
//! (SIMD: AVX2/SSE on x86-64, chosen at run time), BT.601 limited range as OpenH264 expects.
//! The pipeline benchmark compares it with OpenH264's own converter; see the README.

use crate::frame::{Frame, Rect};
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
    let (w, h) = check_frame(frame)?;
    out.resize(w, h);
    convert_rows(frame, out, 0, h)
}

/// Brings `out`, the conversion of the previous version of `frame`, up to date by converting only
/// the rows of the `changed` rectangles (whole-width bands, widened to even rows). Converts the
/// whole frame when `out` is of another size. The result is the same as [`bgrx_to_i420`]'s.
pub fn bgrx_to_i420_changed(
    frame: &Frame,
    out: &mut I420,
    changed: &[Rect],
) -> Result<(), ConvertError> {
    let (w, h) = check_frame(frame)?;
    if out.width != w || out.height != h {
        return bgrx_to_i420(frame, out);
    }
    let mut bands: Vec<(u32, u32)> = changed
        .iter()
        .map(|r| (r.y & !1, ((r.y + r.h + 1) & !1).min(h)))
        .filter(|(a, b)| a < b)
        .collect();
    bands.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(bands.len());
    for (a, b) in bands {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    for (a, b) in merged {
        convert_rows(frame, out, a, b)?;
    }
    Ok(())
}

/// The even dimensions a frame converts at.
fn check_frame(frame: &Frame) -> Result<(u32, u32), ConvertError> {
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
    Ok((w, h))
}

/// Converts rows `y0..y1` (both even, within `out`'s height) of `frame` into `out`.
fn convert_rows(frame: &Frame, out: &mut I420, y0: u32, y1: u32) -> Result<(), ConvertError> {
    let (w, rows) = (out.width, y1 - y0);
    let cw = out.chroma_width();
    let (luma, chroma) = (y0 as usize * w as usize, (y0 / 2) as usize * cw as usize);
    let (luma_len, chroma_len) = (
        rows as usize * w as usize,
        (rows / 2) as usize * cw as usize,
    );
    let mut planar = YuvPlanarImageMut {
        y_plane: yuv::BufferStoreMut::Borrowed(&mut out.y[luma..luma + luma_len]),
        y_stride: w,
        u_plane: yuv::BufferStoreMut::Borrowed(&mut out.u[chroma..chroma + chroma_len]),
        u_stride: cw,
        v_plane: yuv::BufferStoreMut::Borrowed(&mut out.v[chroma..chroma + chroma_len]),
        v_stride: cw,
        width: w,
        height: rows,
    };
    let src = &frame.data[y0 as usize * frame.stride..];
    bgra_to_yuv420(
        &mut planar,
        src,
        frame.stride as u32,
        YuvRange::Limited,
        YuvStandardMatrix::Bt601,
        YuvConversionMode::Balanced,
    )
    .map_err(|e| ConvertError::Size {
        width: frame.width,
        height: frame.height,
        reason: e.to_string(),
    })
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
    downscale_rows(src, dst, 0, h);
}

/// Brings `dst`, the halved previous version of `src`, up to date by halving only the rows of the
/// `changed` rectangles (whole-width bands); returns what changed in `dst`'s coordinates. Halves
/// everything when `dst` is of another size. The result is the same as [`downscale_half`]'s.
pub fn downscale_half_changed(src: &Frame, dst: &mut Frame, changed: &[Rect]) -> Vec<Rect> {
    let (w, h) = (src.width / 2, src.height / 2);
    if dst.width != w || dst.height != h {
        downscale_half(src, dst);
        return vec![Rect { x: 0, y: 0, w, h }];
    }
    let mut out = Vec::with_capacity(changed.len());
    for r in changed {
        let (x0, y0) = ((r.x / 2).min(w), (r.y / 2).min(h));
        let (x1, y1) = (
            (r.x + r.w).div_ceil(2).min(w),
            (r.y + r.h).div_ceil(2).min(h),
        );
        if x0 < x1 && y0 < y1 {
            downscale_rows(src, dst, y0, y1);
            out.push(Rect {
                x: x0,
                y: y0,
                w: x1 - x0,
                h: y1 - y0,
            });
        }
    }
    out
}

/// Halves source rows `2·y0..2·y1` into rows `y0..y1` of `dst` (sized half of `src`).
fn downscale_rows(src: &Frame, dst: &mut Frame, y0: u32, y1: u32) {
    let w = dst.width as usize;
    for y in y0 as usize..y1 as usize {
        let r0 = &src.data[2 * y * src.stride..][..8 * w];
        let r1 = &src.data[(2 * y + 1) * src.stride..][..8 * w];
        let out = &mut dst.data[y * dst.stride..][..4 * w];
        for ((a, b), o) in r0
            .chunks_exact(8)
            .zip(r1.chunks_exact(8))
            .zip(out.chunks_exact_mut(4))
        {
            for c in 0..4 {
                let s = a[c] as u16 + a[c + 4] as u16 + b[c] as u16 + b[c + 4] as u16;
                o[c] = ((s + 2) >> 2) as u8;
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

    /// Converting only the changed rows gives exactly what converting the whole frame gives,
    /// for rectangles at odd rows, at the bottom edge and overlapping, on an odd-sized frame.
    #[test]
    fn converting_changed_rows_equals_converting_everything() {
        let mut f = gradient(321, 241);
        let mut partial = I420::default();
        bgrx_to_i420(&f, &mut partial).unwrap();
        let changed = [
            Rect {
                x: 5,
                y: 3,
                w: 40,
                h: 7,
            },
            Rect {
                x: 100,
                y: 8,
                w: 3,
                h: 4,
            },
            Rect {
                x: 200,
                y: 230,
                w: 121,
                h: 11,
            },
        ];
        for (n, r) in changed.iter().enumerate() {
            for y in r.y..r.y + r.h {
                for x in r.x..r.x + r.w {
                    let i = y as usize * f.stride + x as usize * 4;
                    f.data[i..i + 3].copy_from_slice(&[(n * 90) as u8, 255 - x as u8, y as u8]);
                }
            }
        }
        bgrx_to_i420_changed(&f, &mut partial, &changed).unwrap();
        let mut full = I420::default();
        bgrx_to_i420(&f, &mut full).unwrap();
        assert_eq!((partial.width, partial.height), (320, 240));
        assert!(partial.y == full.y && partial.u == full.u && partial.v == full.v);
        // Nothing changed: nothing converted, still equal. Another size: everything converted.
        bgrx_to_i420_changed(&f, &mut partial, &[]).unwrap();
        assert!(partial.y == full.y);
        let small = gradient(64, 48);
        bgrx_to_i420_changed(&small, &mut partial, &[]).unwrap();
        let mut small_full = I420::default();
        bgrx_to_i420(&small, &mut small_full).unwrap();
        assert!(partial.y == small_full.y && partial.u == small_full.u);
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
    fn halving_changed_rows_equals_halving_everything() {
        let (w, h) = (37u32, 23u32);
        let mut src = gradient(w, h);
        let mut half = Frame::new(0, 0);
        // Another size: everything, reported as one rectangle.
        let all = downscale_half_changed(&src, &mut half, &[]);
        assert_eq!(
            all,
            vec![Rect {
                x: 0,
                y: 0,
                w: 18,
                h: 11
            }]
        );
        let changes = [
            Rect {
                x: 3,
                y: 5,
                w: 1,
                h: 1,
            },
            Rect {
                x: 30,
                y: 20,
                w: 7,
                h: 3,
            },
        ];
        for r in &changes {
            for y in r.y..r.y + r.h {
                for x in r.x..r.x + r.w {
                    let i = y as usize * src.stride + x as usize * 4;
                    src.data[i..i + 3].copy_from_slice(&[9, 200, 77]);
                }
            }
        }
        let reported = downscale_half_changed(&src, &mut half, &changes);
        let mut fresh = Frame::new(0, 0);
        downscale_half(&src, &mut fresh);
        assert_eq!(half.data, fresh.data);
        // The reported rectangles cover every halved pixel that differs from before, clipped.
        assert_eq!(
            reported[0],
            Rect {
                x: 1,
                y: 2,
                w: 1,
                h: 1
            }
        );
        assert_eq!(
            reported[1],
            Rect {
                x: 15,
                y: 10,
                w: 3,
                h: 1
            }
        );
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
