//! Scripted screen scenes drawn by an X client (for the media and glass-to-glass benchmarks), and a
//! machine-readable frame counter drawn into the picture and read back from decoded frames.

use crate::x11::Painter;
use x11rb::protocol::xproto::ConnectionExt;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scene {
    Idle,
    Typing,
    Scrolling,
    Dragging,
    FullMotion,
}

impl Scene {
    pub fn name(self) -> &'static str {
        match self {
            Scene::Idle => "idle desktop",
            Scene::Typing => "typing in a terminal",
            Scene::Scrolling => "scrolling a long page",
            Scene::Dragging => "dragging a window",
            Scene::FullMotion => "full-screen motion",
        }
    }
}

/// Draws frame `i` of a scene (after the page drawn at setup).
pub fn draw(p: &mut Painter, scene: Scene, i: usize) {
    match scene {
        Scene::Idle => {}
        Scene::Typing => {
            // About 7 characters a second at 30 fps: one every 4th frame, on the bottom line.
            if i.is_multiple_of(4) {
                let col = (i / 4) % 100;
                let y = p.h as i16 - 20;
                let c = [b'a' + (i % 26) as u8];
                p.conn
                    .image_text8(p.root, p.text_gc, 4 + 6 * col as i16, y, &c)
                    .unwrap();
            }
        }
        Scene::Scrolling => {
            // One line (15 px) a frame: copy the page up and draw a new bottom line.
            p.conn
                .copy_area(p.root, p.root, p.gc, 0, 15, 0, 0, p.w, p.h - 15)
                .unwrap();
            let y = (p.h as i16 / 15) * 15 - 1;
            p.line(y, 1000 + i);
        }
        Scene::Dragging => {
            // A 400×300 window moving 8 px right and 4 px down a frame over the page.
            let (ox, oy) = (40 + 8 * i as i16, 40 + 4 * i as i16);
            let (nx, ny) = (ox + 8, oy + 4);
            // What the window uncovers: the page is redrawn there (as the desktop would).
            p.fill(0xffffff, ox, oy, 8, 300);
            p.fill(0xffffff, ox, oy, 400, 4);
            p.fill(0x3060a0, nx, ny, 400, 24);
            p.fill(0xf8f8f8, nx, ny + 24, 400, 276);
            p.fill(0x202020, nx + 20, ny + 50, 300, 2);
        }
        Scene::FullMotion => {
            for _ in 0..40 {
                let (x, y) = ((p.rnd() % p.w as u32) as i16, (p.rnd() % p.h as u32) as i16);
                let c = p.rnd() & 0xffffff;
                p.fill(c, x, y, 200, 150);
            }
        }
    }
    p.sync();
}

/// Side of one counter block in pixels.
pub const COUNTER_BLOCK: u16 = 16;
/// Bits of the counter.
pub const COUNTER_BITS: u32 = 16;

/// Where the counter sits: the top-right corner, `(x, y)` of its first block.
pub fn counter_origin(w: u16) -> (i16, i16) {
    (
        w as i16 - ((COUNTER_BITS + 2) as i16 * COUNTER_BLOCK as i16),
        0,
    )
}

/// Draws frame counter `n` (mod 2^16) as a barcode: a black and a white guard block, then 16 bits,
/// most significant first, black for 1. The barcode is presented in one request, so a capture
/// never sees half of it (which would read as another number).
pub fn draw_counter(p: &Painter, n: u32) {
    let (x0, y0) = counter_origin(p.w);
    let b = COUNTER_BLOCK;
    let blocks = (COUNTER_BITS + 2) as u16;
    p.present(x0, y0, blocks * b, b, |p, pm| {
        p.fill_on(pm, 0x000000, 0, 0, b, b);
        p.fill_on(pm, 0xffffff, b as i16, 0, b, b);
        for i in 0..COUNTER_BITS {
            let bit = (n >> (COUNTER_BITS - 1 - i)) & 1;
            let color = if bit == 1 { 0x000000 } else { 0xffffff };
            p.fill_on(pm, color, (i + 2) as i16 * b as i16, 0, b, b);
        }
    });
}

/// Reads the counter from a decoded RGBA picture of a screen `screen_w` pixels wide (the picture
/// may be scaled). `None` when the guard blocks are not where they should be.
pub fn read_counter(rgba: &[u8], width: u32, height: u32, screen_w: u32) -> Option<u32> {
    if width == 0 || height == 0 || screen_w == 0 {
        return None;
    }
    let k = width as f64 / screen_w as f64;
    let (x0, y0) = counter_origin(screen_w as u16);
    let luma = |block: u32| -> Option<u8> {
        let cx = ((x0 as f64 + (block as f64 + 0.5) * COUNTER_BLOCK as f64) * k) as u32;
        let cy = ((y0 as f64 + 0.5 * COUNTER_BLOCK as f64) * k) as u32;
        if cx >= width || cy >= height {
            return None;
        }
        let i = (cy as usize * width as usize + cx as usize) * 4;
        let px = rgba.get(i..i + 3)?;
        Some(((px[0] as u32 * 299 + px[1] as u32 * 587 + px[2] as u32 * 114) / 1000) as u8)
    };
    if luma(0)? > 64 || luma(1)? < 192 {
        return None;
    }
    let mut n = 0;
    for i in 0..COUNTER_BITS {
        n = (n << 1) | u32::from(luma(i + 2)? < 128);
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paints the counter the way `draw_counter` does, into an RGBA buffer, optionally halved.
    fn picture(n: u32, w: u32, h: u32, scale: u32) -> Vec<u8> {
        let (pw, ph) = (w / scale, h / scale);
        let mut rgba = vec![128u8; (pw * ph * 4) as usize];
        let (x0, _) = counter_origin(w as u16);
        for block in 0..COUNTER_BITS + 2 {
            let black = match block {
                0 => true,
                1 => false,
                b => (n >> (COUNTER_BITS - 1 - (b - 2))) & 1 == 1,
            };
            let v = if black { 0 } else { 255 };
            for y in 0..COUNTER_BLOCK as u32 / scale {
                for x in 0..COUNTER_BLOCK as u32 / scale {
                    let px = (x0 as u32 + block * COUNTER_BLOCK as u32) / scale + x;
                    let i = ((y * pw + px) * 4) as usize;
                    rgba[i..i + 3].fill(v);
                }
            }
        }
        rgba
    }

    #[test]
    fn counter_reads_back_at_full_and_half_size() {
        for n in [0, 1, 0x8000, 0xffff, 12345] {
            assert_eq!(
                read_counter(&picture(n, 1920, 1080, 1), 1920, 1080, 1920),
                Some(n)
            );
            assert_eq!(
                read_counter(&picture(n, 1920, 1080, 2), 960, 540, 1920),
                Some(n)
            );
        }
        // No guard blocks, no counter.
        assert_eq!(
            read_counter(&vec![128; 1920 * 1080 * 4], 1920, 1080, 1920),
            None
        );
    }
}
