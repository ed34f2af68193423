//! Desktop content for the peer bench (`--bench peers`): kinds of screens people share, rendered in
//! memory and pushed to an X screen as each frame's changed rectangles.
//!
//! Rendering in memory makes every frame reproducible: the truth for frame `n` (what the screen
//! showed when counter `n` was drawn) is rendered again after the run, exactly, and compared with
//! what each tool decoded. Text is anti-aliased (DejaVu, by fontdue) as on a real desktop;
//! pictures are procedural "photos" (smooth multi-scale noise with grain), not flat colours.
//!
//! Each content class follows a description of a real activity (the table): typing at 8
//! characters a second in a 12-pt terminal, a page scrolled a line every 50 ms, an 800×600 window
//! dragged ~30 moves a second over a wallpaper, a web page with pictures scrolled by the wheel
//! (≈10 redraws a second), a slideshow, a spreadsheet being edited, a video in a window, and
//! full-screen motion with film grain.

use std::collections::HashMap;

use crate::scenes::{COUNTER_BITS, COUNTER_BLOCK, counter_origin};

/// A picture in memory, `0x00RRGGBB` per pixel (X11's 24-bit ZPixmap on little-endian).
#[derive(Clone)]
pub struct Canvas {
    pub w: usize,
    pub h: usize,
    pub px: Vec<u32>,
}

/// A rectangle in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    pub x: usize,
    pub y: usize,
    pub w: usize,
    pub h: usize,
}

impl Rect {
    /// The part of `(x, y, w, h)` (signed) inside a `cw`×`ch` canvas, if any.
    pub fn clip(x: i64, y: i64, w: i64, h: i64, cw: usize, ch: usize) -> Option<Rect> {
        let (x0, y0) = (x.max(0), y.max(0));
        let (x1, y1) = ((x + w).min(cw as i64), (y + h).min(ch as i64));
        (x1 > x0 && y1 > y0).then(|| Rect {
            x: x0 as usize,
            y: y0 as usize,
            w: (x1 - x0) as usize,
            h: (y1 - y0) as usize,
        })
    }

    fn union(a: Rect, b: Rect) -> Rect {
        let (x0, y0) = (a.x.min(b.x), a.y.min(b.y));
        let (x1, y1) = ((a.x + a.w).max(b.x + b.w), (a.y + a.h).max(b.y + b.h));
        Rect {
            x: x0,
            y: y0,
            w: x1 - x0,
            h: y1 - y0,
        }
    }
}

fn rgb(r: u8, g: u8, b: u8) -> u32 {
    (u32::from(r) << 16) | (u32::from(g) << 8) | u32::from(b)
}

fn channels(c: u32) -> (f32, f32, f32) {
    (
        ((c >> 16) & 0xff) as f32,
        ((c >> 8) & 0xff) as f32,
        (c & 0xff) as f32,
    )
}

fn clamp8(v: f32) -> u8 {
    v.clamp(0.0, 255.0) as u8
}

impl Canvas {
    pub fn new(w: usize, h: usize, color: u32) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![color; w * h],
        }
    }

    pub fn full(&self) -> Rect {
        Rect {
            x: 0,
            y: 0,
            w: self.w,
            h: self.h,
        }
    }

    pub fn fill(&mut self, x: i64, y: i64, w: i64, h: i64, color: u32) {
        if let Some(r) = Rect::clip(x, y, w, h, self.w, self.h) {
            for row in r.y..r.y + r.h {
                self.px[row * self.w + r.x..row * self.w + r.x + r.w].fill(color);
            }
        }
    }

    /// Copies `src` (all of it) with its top-left corner at `(x, y)`, clipped.
    pub fn blit(&mut self, src: &Canvas, x: i64, y: i64) {
        self.blit_part(src, 0, 0, src.w, src.h, x, y);
    }

    /// Copies the `w`×`h` part of `src` at `(sx, sy)` to `(x, y)`, clipped to both.
    #[allow(clippy::too_many_arguments)]
    pub fn blit_part(
        &mut self,
        src: &Canvas,
        sx: usize,
        sy: usize,
        w: usize,
        h: usize,
        x: i64,
        y: i64,
    ) {
        let w = w.min(src.w.saturating_sub(sx));
        let h = h.min(src.h.saturating_sub(sy));
        let Some(r) = Rect::clip(x, y, w as i64, h as i64, self.w, self.h) else {
            return;
        };
        let (ox, oy) = ((r.x as i64 - x) as usize, (r.y as i64 - y) as usize);
        for row in 0..r.h {
            let s = (sy + oy + row) * src.w + sx + ox;
            let d = (r.y + row) * self.w + r.x;
            self.px[d..d + r.w].copy_from_slice(&src.px[s..s + r.w]);
        }
    }

    /// Full-range luma (BT.601 weights) of every pixel: what the bench compares.
    pub fn luma(&self) -> Vec<u8> {
        self.px
            .iter()
            .map(|&c| {
                let (r, g, b) = channels(c);
                (0.299 * r + 0.587 * g + 0.114 * b + 0.5) as u8
            })
            .collect()
    }

    /// The frame counter of [`crate::scenes`] (guard blocks, then 16 bits), drawn into the
    /// picture as the glass bench draws it on the screen, so that decoded frames say which
    /// frame they are.
    pub fn counter(&mut self, n: u32) -> Rect {
        let (x0, y0) = counter_origin(self.w as u16);
        let b = i64::from(COUNTER_BLOCK);
        let (x0, y0) = (i64::from(x0), i64::from(y0));
        self.fill(x0, y0, b, b, 0);
        self.fill(x0 + b, y0, b, b, 0xffffff);
        for i in 0..COUNTER_BITS {
            let bit = (n >> (COUNTER_BITS - 1 - i)) & 1;
            let c = if bit == 1 { 0 } else { 0xffffff };
            self.fill(x0 + (i64::from(i) + 2) * b, y0, b, b, c);
        }
        Rect::clip(x0, y0, (i64::from(COUNTER_BITS) + 2) * b, b, self.w, self.h).unwrap_or(Rect {
            x: 0,
            y: 0,
            w: 0,
            h: 0,
        })
    }
}

/// Reads the counter from a luma plane of a `w`×`h` screen (as [`crate::scenes::read_counter`]
/// does from RGBA). `None` when the guard blocks are not where they should be.
pub fn read_counter_luma(luma: &[u8], w: usize, h: usize) -> Option<u32> {
    let (x0, y0) = counter_origin(w as u16);
    let at = |block: u32| -> Option<u8> {
        let cx =
            x0 as usize + (block as usize * COUNTER_BLOCK as usize) + COUNTER_BLOCK as usize / 2;
        let cy = y0 as usize + COUNTER_BLOCK as usize / 2;
        (cx < w && cy < h).then(|| luma.get(cy * w + cx).copied())?
    };
    if at(0)? > 64 || at(1)? < 192 {
        return None;
    }
    let mut n = 0;
    for i in 0..COUNTER_BITS {
        n = (n << 1) | u32::from(at(i + 2)? < 128);
    }
    Some(n)
}

/// A small deterministic generator (splitmix64).
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// A hash of a position and a frame: film grain that differs every frame.
fn grain(x: usize, y: usize, t: u64) -> f32 {
    let mut z = (x as u64)
        .wrapping_mul(0x9E37_79B9)
        .wrapping_add((y as u64).wrapping_mul(0x85EB_CA6B))
        .wrapping_add(t.wrapping_mul(0xC2B2_AE35));
    z = (z ^ (z >> 15)).wrapping_mul(0x2C1B_3C6D);
    z = (z ^ (z >> 12)).wrapping_mul(0x297A_2D39);
    ((z >> 8) & 0xff) as f32 / 255.0 - 0.5
}

/// A procedural photograph: smooth colour fields at several scales, edges where they meet, and
/// fine grain, like a downscaled camera picture.
pub fn photo(w: usize, h: usize, seed: u64) -> Canvas {
    let mut rng = Rng::new(seed);
    // Octaves: cell size and weight.
    let octaves = [(240.0f32, 1.0f32), (60.0, 0.45), (15.0, 0.2), (4.0, 0.08)];
    let grids: Vec<(usize, usize, Vec<[f32; 3]>)> = octaves
        .iter()
        .map(|&(cell, _)| {
            let gw = (w as f32 / cell) as usize + 2;
            let gh = (h as f32 / cell) as usize + 2;
            let v = (0..gw * gh)
                .map(|_| [rng.unit(), rng.unit(), rng.unit()])
                .collect();
            (gw, gh, v)
        })
        .collect();
    let base = [
        rng.unit() * 0.6 + 0.2,
        rng.unit() * 0.6 + 0.2,
        rng.unit() * 0.6 + 0.2,
    ];
    let mut c = Canvas::new(w, h, 0);
    for y in 0..h {
        for x in 0..w {
            let mut acc = [0.0f32; 3];
            for (o, &(cell, weight)) in octaves.iter().enumerate() {
                let (gw, _, ref g) = grids[o];
                let (fx, fy) = (x as f32 / cell, y as f32 / cell);
                let (ix, iy) = (fx as usize, fy as usize);
                let (tx, ty) = (fx - ix as f32, fy - iy as f32);
                // Smoothstep: soft fields, not bilinear creases.
                let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
                for (k, a) in acc.iter_mut().enumerate() {
                    let v00 = g[iy * gw + ix][k];
                    let v10 = g[iy * gw + ix + 1][k];
                    let v01 = g[(iy + 1) * gw + ix][k];
                    let v11 = g[(iy + 1) * gw + ix + 1][k];
                    let top = v00 + (v10 - v00) * sx;
                    let bottom = v01 + (v11 - v01) * sx;
                    *a += (top + (bottom - top) * sy - 0.5) * weight;
                }
            }
            let n = grain(x, y, seed) * 10.0;
            let px = |k: usize| clamp8((base[k] + acc[k] * 0.55) * 255.0 + n);
            c.px[y * w + x] = rgb(px(0), px(1), px(2));
        }
    }
    c
}

/// Anti-aliased text (DejaVu Sans and Sans Mono from Debian's fonts-dejavu-core).
pub struct Fonts {
    sans: fontdue::Font,
    mono: fontdue::Font,
    cache: HashMap<(char, u32, bool), (fontdue::Metrics, Vec<u8>)>,
}

/// Where Debian puts the fonts.
pub const FONT_DIR: &str = "/usr/share/fonts/truetype/dejavu";

impl Fonts {
    pub fn load() -> Result<Fonts, String> {
        let load = |name: &str| -> Result<fontdue::Font, String> {
            let path = format!("{FONT_DIR}/{name}");
            let bytes = std::fs::read(&path)
                .map_err(|e| format!("{path}: {e} (install fonts-dejavu-core)"))?;
            fontdue::Font::from_bytes(bytes, fontdue::FontSettings::default())
                .map_err(|e| format!("{path}: {e}"))
        };
        Ok(Fonts {
            sans: load("DejaVuSans.ttf")?,
            mono: load("DejaVuSansMono.ttf")?,
            cache: HashMap::new(),
        })
    }

    /// Draws `text` with its baseline at `y`, starting at `x`; returns the x after it.
    #[allow(clippy::too_many_arguments)]
    pub fn text(
        &mut self,
        c: &mut Canvas,
        x: i64,
        y: i64,
        text: &str,
        px: u32,
        mono: bool,
        color: u32,
    ) -> i64 {
        let (fr, fg, fb) = channels(color);
        let mut pen = x as f32;
        for ch in text.chars() {
            let key = (ch, px, mono);
            if !self.cache.contains_key(&key) {
                let font = if mono { &self.mono } else { &self.sans };
                let g = font.rasterize(ch, px as f32);
                self.cache.insert(key, g);
            }
            let Some((m, bitmap)) = self.cache.get(&key) else {
                continue;
            };
            let gx = pen as i64 + i64::from(m.xmin);
            let gy = y - i64::from(m.ymin) - m.height as i64;
            for row in 0..m.height {
                let yy = gy + row as i64;
                if yy < 0 || yy >= c.h as i64 {
                    continue;
                }
                for col in 0..m.width {
                    let xx = gx + col as i64;
                    if xx < 0 || xx >= c.w as i64 {
                        continue;
                    }
                    let a = f32::from(bitmap[row * m.width + col]) / 255.0;
                    if a == 0.0 {
                        continue;
                    }
                    let i = yy as usize * c.w + xx as usize;
                    let (br, bg, bb) = channels(c.px[i]);
                    c.px[i] = rgb(
                        clamp8(br + (fr - br) * a),
                        clamp8(bg + (fg - bg) * a),
                        clamp8(bb + (fb - bb) * a),
                    );
                }
            }
            pen += m.advance_width;
        }
        pen.round() as i64
    }
}

/// Words for text that looks like text (the codec cares about glyph shapes and their density).
const WORDS: &[&str] = &[
    "the",
    "printer",
    "queue",
    "is",
    "stopped",
    "because",
    "a",
    "job",
    "failed",
    "restart",
    "spooler",
    "service",
    "and",
    "check",
    "driver",
    "version",
    "network",
    "settings",
    "on",
    "this",
    "computer",
    "open",
    "control",
    "panel",
    "select",
    "devices",
    "remove",
    "device",
    "add",
    "again",
    "update",
    "firmware",
    "from",
    "vendor",
    "website",
    "then",
    "print",
    "test",
    "page",
    "confirm",
    "works",
    "ticket",
    "closed",
    "user",
    "reported",
    "error",
    "message",
    "when",
    "opening",
    "documents",
];

fn sentence(rng: &mut Rng, words: usize) -> String {
    let mut s = String::new();
    for i in 0..words {
        if i > 0 {
            s.push(' ');
        }
        let w = WORDS[rng.below(WORDS.len() as u64) as usize];
        if i == 0 {
            let mut cs = w.chars();
            if let Some(f) = cs.next() {
                s.extend(f.to_uppercase());
                s.push_str(cs.as_str());
            }
        } else {
            s.push_str(w);
        }
    }
    s.push('.');
    s
}

/// Splits `text` into lines of at most `chars` characters at spaces.
fn wrap(text: &str, chars: usize) -> Vec<String> {
    let mut lines = vec![];
    let mut line = String::new();
    for w in text.split(' ') {
        if !line.is_empty() && line.len() + 1 + w.len() > chars {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(w);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// A desktop wallpaper: a diagonal colour gradient.
fn wallpaper(w: usize, h: usize) -> Canvas {
    let mut c = Canvas::new(w, h, 0);
    for y in 0..h {
        for x in 0..w {
            let (u, v) = (x as f32 / w as f32, y as f32 / h as f32);
            c.px[y * w + x] = rgb(
                clamp8(30.0 + 60.0 * u + 40.0 * v),
                clamp8(60.0 + 50.0 * v),
                clamp8(110.0 + 90.0 * u - 30.0 * v),
            );
        }
    }
    c
}

/// A window: title bar, light body, paragraphs of text.
fn text_window(fonts: &mut Fonts, w: usize, h: usize, title: &str, seed: u64) -> Canvas {
    let mut c = Canvas::new(w, h, rgb(0xfa, 0xfa, 0xfa));
    c.fill(0, 0, w as i64, 30, rgb(0x2f, 0x5f, 0x9f));
    fonts.text(&mut c, 10, 21, title, 15, false, 0xffffff);
    c.fill(0, 0, w as i64, 1, 0x202020);
    c.fill(0, h as i64 - 1, w as i64, 1, 0x202020);
    c.fill(0, 0, 1, h as i64, 0x202020);
    c.fill(w as i64 - 1, 0, 1, h as i64, 0x202020);
    let mut rng = Rng::new(seed);
    let mut y = 56;
    while y < h as i64 - 10 {
        for line in wrap(&sentence(&mut rng, 40), (w - 30) / 8) {
            if y >= h as i64 - 10 {
                break;
            }
            fonts.text(&mut c, 14, y, &line, 14, false, 0x202020);
            y += 20;
        }
        y += 10;
    }
    c
}

/// The content classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Idle,
    Typing,
    Scrolling,
    Dragging,
    Video,
    WebPage,
    Slideshow,
    Spreadsheet,
    VideoWindow,
}

impl Class {
    pub const ALL: [Class; 9] = [
        Class::Idle,
        Class::Typing,
        Class::Scrolling,
        Class::Dragging,
        Class::Video,
        Class::WebPage,
        Class::Slideshow,
        Class::Spreadsheet,
        Class::VideoWindow,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Class::Idle => "idle desktop",
            Class::Typing => "typing in a terminal",
            Class::Scrolling => "scrolling large text",
            Class::Dragging => "dragging a window",
            Class::Video => "full-screen video",
            Class::WebPage => "web page, wheel scroll",
            Class::Slideshow => "picture slideshow",
            Class::Spreadsheet => "spreadsheet editing",
            Class::VideoWindow => "video in a window",
        }
    }

    /// Does the screen change (a motion class whose updates are counted)?
    pub fn moves(self) -> bool {
        self != Class::Idle
    }
}

/// A content class being played: frame by frame, deterministic.
pub struct Content {
    pub class: Class,
    pub canvas: Canvas,
    /// Frames stepped so far.
    pub frame: u64,
    fonts: Fonts,
    rng: Rng,
    /// Class-specific pictures: a background, a window, a tall page, photos.
    background: Option<Canvas>,
    layer: Option<Canvas>,
    pictures: Vec<Canvas>,
    /// Class-specific position state.
    pos: (f32, f32),
    vel: (f32, f32),
    offset: usize,
    typed: usize,
}

/// The typing class's text: shell work of a technician.
const TYPED: &str = "sudo systemctl restart cups && lpstat -t | grep -i printer; journalctl -u cups --since '10 min ago' | tail -n 40; lpadmin -p office -E -v ipp://192.0.2.15/ipp/print -m everywhere; lp -d office /usr/share/cups/data/testprint; ";

impl Content {
    /// The first frame of `class` on a `w`×`h` screen.
    pub fn new(class: Class, w: usize, h: usize) -> Result<Content, String> {
        let fonts = Fonts::load()?;
        let mut c = Content {
            class,
            canvas: Canvas::new(w, h, 0),
            frame: 0,
            fonts,
            rng: Rng::new(0x7A4D_E000 + class as u64),
            background: None,
            layer: None,
            pictures: vec![],
            pos: (0.0, 0.0),
            vel: (0.0, 0.0),
            offset: 0,
            typed: 0,
        };
        c.setup();
        Ok(c)
    }

    fn setup(&mut self) {
        let (w, h) = (self.canvas.w, self.canvas.h);
        match self.class {
            Class::Idle => {
                self.canvas = wallpaper(w, h);
                let win = text_window(&mut self.fonts, 900, 600, "Notes", 1);
                self.canvas.blit(&win, 200, 150);
            }
            Class::Typing => {
                // A terminal: white, 12-pt (16 px) monospace, earlier output above the prompt.
                self.canvas = Canvas::new(w, h, 0xffffff);
                let mut rng = Rng::new(2);
                let mut y = 20;
                for _ in 0..30 {
                    let line = sentence(&mut rng, 12);
                    self.fonts
                        .text(&mut self.canvas, 8, y, &line, 16, true, 0x1e1e1e);
                    y += 19;
                }
                self.fonts.text(
                    &mut self.canvas,
                    8,
                    y,
                    "tech@office-pc:~$ ",
                    16,
                    true,
                    0x1e7e1e,
                );
                self.offset = y as usize;
            }
            Class::Scrolling => {
                self.layer = Some(self.tall_text_page(w, h * 6));
                self.draw_scrolled();
            }
            Class::Dragging => {
                let mut bg = wallpaper(w, h);
                let a = text_window(&mut self.fonts, 700, 500, "Mail", 3);
                let b = text_window(&mut self.fonts, 600, 700, "Documents", 4);
                bg.blit(&a, w as i64 / 2, 80);
                bg.blit(&b, 120, h as i64 / 3);
                self.canvas = bg.clone();
                self.background = Some(bg);
                let win = text_window(&mut self.fonts, 800, 600, "Printer settings", 5);
                self.pos = (300.0, 200.0);
                self.vel = (9.0, 4.0);
                self.canvas.blit(&win, 300, 200);
                self.layer = Some(win);
            }
            Class::Video => self.draw_video_full(),
            Class::WebPage => {
                self.layer = Some(self.web_page(w, h * 6));
                self.draw_scrolled();
            }
            Class::Slideshow => {
                self.pictures = (0..4).map(|i| photo(w, h, 100 + i)).collect();
                self.canvas = self.pictures[0].clone();
            }
            Class::Spreadsheet => self.spreadsheet(),
            Class::VideoWindow => {
                let mut bg = wallpaper(w, h);
                let a = text_window(&mut self.fonts, 700, 500, "Browser", 6);
                bg.blit(&a, 100, 100);
                self.canvas = bg.clone();
                self.background = Some(bg);
                self.pictures = vec![photo(1280, 720, 7)];
                self.draw_video_window();
            }
        }
    }

    /// Steps to the next frame (the screen is redrawn at 30 Hz); returns what changed.
    pub fn step(&mut self) -> Vec<Rect> {
        self.frame += 1;
        let i = self.frame;
        let (w, h) = (self.canvas.w, self.canvas.h);
        match self.class {
            Class::Idle => vec![],
            Class::Typing => {
                // 8 characters a second: character k appears at frame ⌊k·30/8⌋.
                let due = (i * 8 / 30) as usize;
                let mut dirty = vec![];
                while self.typed < due {
                    let ch = TYPED
                        .chars()
                        .nth(self.typed % TYPED.chars().count())
                        .unwrap_or(' ');
                    let per_line = (w - 200) / 10;
                    let col = (self.typed + 18) % per_line;
                    let line = (self.typed + 18) / per_line;
                    let y = (self.offset + line * 19) as i64;
                    let x = 8 + col as i64 * 10;
                    if y < h as i64 - 4 {
                        self.canvas.fill(x, y - 15, 12, 19, 0xffffff);
                        self.fonts.text(
                            &mut self.canvas,
                            x,
                            y,
                            &ch.to_string(),
                            16,
                            true,
                            0x1e1e1e,
                        );
                        // The cursor block after it.
                        self.canvas.fill(x + 10, y - 14, 9, 18, 0x404040);
                        if let Some(r) = Rect::clip(x, y - 15, 24, 19, w, h) {
                            dirty.push(r);
                        }
                    }
                    self.typed += 1;
                }
                dirty
            }
            Class::Scrolling => {
                // A line (30 px) every 50 ms.
                let off = ((i * 1000 / 30) / 50) as usize * 30;
                if off == self.offset {
                    return vec![];
                }
                self.offset = off;
                self.draw_scrolled();
                vec![self.canvas.full()]
            }
            Class::Dragging => {
                let old = Rect::clip(self.pos.0 as i64, self.pos.1 as i64, 800, 600, w, h);
                // 30 moves a second of 5 to 12 px, turning now and then, bouncing at the edges.
                if self.rng.below(20) == 0 {
                    let a = self.rng.unit() * std::f32::consts::TAU;
                    let s = 5.0 + self.rng.unit() * 7.0;
                    self.vel = (a.cos() * s, a.sin() * s);
                }
                let (mut nx, mut ny) = (self.pos.0 + self.vel.0, self.pos.1 + self.vel.1);
                if nx < 0.0 || nx > (w as f32 - 800.0) {
                    self.vel.0 = -self.vel.0;
                    nx = self.pos.0 + self.vel.0;
                }
                if ny < 0.0 || ny > (h as f32 - 600.0) {
                    self.vel.1 = -self.vel.1;
                    ny = self.pos.1 + self.vel.1;
                }
                self.pos = (nx, ny);
                let (Some(bg), Some(win)) = (&self.background, &self.layer) else {
                    return vec![];
                };
                if let Some(o) = old {
                    self.canvas
                        .blit_part(bg, o.x, o.y, o.w, o.h, o.x as i64, o.y as i64);
                }
                self.canvas.blit(win, nx as i64, ny as i64);
                let new = Rect::clip(nx as i64, ny as i64, 800, 600, w, h);
                match (old, new) {
                    (Some(a), Some(b)) => vec![Rect::union(a, b)],
                    (a, b) => a.into_iter().chain(b).collect(),
                }
            }
            Class::Video => {
                self.draw_video_full();
                vec![self.canvas.full()]
            }
            Class::WebPage => {
                // The wheel: a notch (100 px) drawn as one redraw every 3rd frame (10 a second).
                if !i.is_multiple_of(3) {
                    return vec![];
                }
                let max = self.layer.as_ref().map_or(0, |l| l.h - h);
                self.offset = (self.offset + 100) % max.max(1);
                self.draw_scrolled();
                vec![self.canvas.full()]
            }
            Class::Slideshow => {
                // A new picture every 2 s.
                if !i.is_multiple_of(60) {
                    return vec![];
                }
                let k = (i / 60) as usize % self.pictures.len();
                self.canvas = self.pictures[k].clone();
                vec![self.canvas.full()]
            }
            Class::Spreadsheet => self.spreadsheet_step(),
            Class::VideoWindow => {
                let r = self.draw_video_window();
                vec![r]
            }
        }
    }

    /// Draws the counter for frame value `n` (after [`Content::step`]); returns its rectangle.
    pub fn counter(&mut self, n: u32) -> Rect {
        self.canvas.counter(n)
    }

    fn tall_text_page(&mut self, w: usize, h: usize) -> Canvas {
        let mut c = Canvas::new(w, h, 0xffffff);
        let mut rng = Rng::new(8);
        let mut y = 40i64;
        while y < h as i64 - 40 {
            for line in wrap(&sentence(&mut rng, 60), (w - 160) / 12) {
                self.fonts.text(&mut c, 80, y, &line, 22, false, 0x111111);
                y += 30;
            }
            y += 30;
        }
        c
    }

    fn web_page(&mut self, w: usize, h: usize) -> Canvas {
        let mut c = Canvas::new(w, h, 0xffffff);
        let mut rng = Rng::new(9);
        let col = (w as i64 - 1000) / 2;
        let mut y = 0i64;
        // Header bar.
        c.fill(0, 0, w as i64, 70, rgb(0x1f, 0x3a, 0x60));
        self.fonts.text(
            &mut c,
            col,
            46,
            "Office Printing Guide",
            28,
            false,
            0xffffff,
        );
        y += 120;
        let mut k = 0;
        while y < h as i64 - 500 {
            self.fonts.text(
                &mut c,
                col,
                y,
                &sentence(&mut rng, 6),
                26,
                false,
                rgb(0x1f, 0x3a, 0x60),
            );
            y += 40;
            for line in wrap(&sentence(&mut rng, 70), 95) {
                self.fonts.text(&mut c, col, y, &line, 17, false, 0x222222);
                y += 26;
            }
            y += 20;
            if k % 2 == 0 {
                let p = photo(640, 400, 200 + k);
                c.blit(&p, col, y);
                // A caption beside it.
                let mut yy = y + 30;
                for line in wrap(&sentence(&mut rng, 30), 38) {
                    self.fonts
                        .text(&mut c, col + 670, yy, &line, 16, false, 0x555555);
                    yy += 24;
                }
                y += 430;
            }
            k += 1;
        }
        c
    }

    /// The visible part of the tall page at the current offset.
    fn draw_scrolled(&mut self) {
        if let Some(page) = &self.layer {
            let (w, h) = (self.canvas.w, self.canvas.h);
            let off = self.offset.min(page.h - h);
            self.canvas.blit_part(page, 0, off, w, h, 0, 0);
        }
    }

    /// Moving colour gradients with film grain over the whole screen. The waves are separable
    /// (sums of products of per-column and per-row terms), so a 1080p frame costs a few
    /// multiplications a pixel and the painter keeps 30 fps.
    fn draw_video_full(&mut self) {
        let (w, h) = (self.canvas.w, self.canvas.h);
        let t = self.frame as f32 / 30.0;
        let fx: Vec<f32> = (0..w).map(|x| x as f32 / w as f32).collect();
        let fy: Vec<f32> = (0..h).map(|y| y as f32 / h as f32).collect();
        // a = sin(3x + 0.7t); b = cos((2y − 0.5t) + x); c = sin((4x + t) + 4y).
        let a: Vec<f32> = fx.iter().map(|x| (x * 3.0 + t * 0.7).sin()).collect();
        let (bxc, bxs): (Vec<f32>, Vec<f32>) = fx.iter().map(|x| (x.cos(), x.sin())).unzip();
        let (cxs, cxc): (Vec<f32>, Vec<f32>) = fx
            .iter()
            .map(|x| ((x * 4.0 + t).sin(), (x * 4.0 + t).cos()))
            .unzip();
        for (y, fy) in fy.iter().enumerate() {
            let (byc, bys) = ((fy * 2.0 - t * 0.5).cos(), (fy * 2.0 - t * 0.5).sin());
            let (cyc, cys) = ((fy * 4.0).cos(), (fy * 4.0).sin());
            let row = &mut self.canvas.px[y * w..(y + 1) * w];
            for (x, px) in row.iter_mut().enumerate() {
                let b = byc * bxc[x] - bys * bxs[x];
                let c = cxs[x] * cyc + cxc[x] * cys;
                let g = grain(x, y, self.frame) * 14.0;
                *px = rgb(
                    clamp8(128.0 + 90.0 * a[x] + g),
                    clamp8(128.0 + 80.0 * b + g),
                    clamp8(128.0 + 70.0 * c + g),
                );
            }
        }
    }

    /// A 640×360 video in a window: a slow pan over a photo with grain; returns its rectangle.
    fn draw_video_window(&mut self) -> Rect {
        let (w, h) = (self.canvas.w, self.canvas.h);
        let (vx, vy) = (w.saturating_sub(760), 300.min(h / 2));
        let (vw, vh) = (640.min(w - vx), 360.min(h - vy));
        let Some(src) = self.pictures.first() else {
            return self.canvas.full();
        };
        // A slow camera pan (about 3 px a frame) over the picture.
        let t = self.frame as f32 / 30.0;
        let sx = ((0.5 + 0.5 * (t * 0.3).sin()) * (src.w - vw) as f32) as usize;
        let sy = ((0.5 + 0.5 * (t * 0.2).cos()) * (src.h - vh) as f32) as usize;
        let f = self.frame;
        for row in 0..vh {
            for col in 0..vw {
                let c = src.px[(sy + row) * src.w + sx + col];
                let (r, g, b) = channels(c);
                let n = grain(col, row, f) * 12.0;
                let (x, y) = (vx + col, vy + row);
                self.canvas.px[y * w + x] = rgb(clamp8(r + n), clamp8(g + n), clamp8(b + n));
            }
        }
        Rect {
            x: vx,
            y: vy,
            w: vw,
            h: vh,
        }
    }

    fn cell(&self, col: usize, row: usize) -> (i64, i64) {
        (60 + col as i64 * 110, 90 + row as i64 * 26)
    }

    fn spreadsheet(&mut self) {
        let (w, h) = (self.canvas.w, self.canvas.h);
        self.canvas = Canvas::new(w, h, 0xffffff);
        self.canvas.fill(0, 0, w as i64, 60, rgb(0x21, 0x73, 0x46));
        self.fonts.text(
            &mut self.canvas,
            20,
            40,
            "Budget 2027.xlsx",
            20,
            false,
            0xffffff,
        );
        let mut rng = Rng::new(11);
        let (cols, rows) = ((w - 60) / 110, (h - 90) / 26);
        for r in 0..rows {
            for c in 0..cols {
                let (x, y) = self.cell(c, r);
                self.canvas.fill(x, y, 110, 1, 0xd0d0d0);
                self.canvas.fill(x, y, 1, 26, 0xd0d0d0);
                if r > 0 && c < 12 && rng.below(4) != 0 {
                    let v = format!("{:.2}", rng.below(1_000_000) as f64 / 100.0);
                    self.fonts
                        .text(&mut self.canvas, x + 6, y + 19, &v, 14, false, 0x202020);
                }
            }
        }
        self.pos = (3.0, 5.0);
    }

    /// A number typed into the active cell at ~4 keys a second; Enter moves down and the total
    /// at the top of the column changes.
    fn spreadsheet_step(&mut self) -> Vec<Rect> {
        if !self.frame.is_multiple_of(8) {
            return vec![];
        }
        let (w, h) = (self.canvas.w, self.canvas.h);
        let (c, r) = (self.pos.0 as usize, self.pos.1 as usize);
        let (x, y) = self.cell(c, r);
        self.typed += 1;
        let mut dirty = vec![];
        let text: String = (0..self.typed % 7)
            .map(|k| char::from(b'0' + ((self.frame as usize + k) % 10) as u8))
            .collect();
        self.canvas.fill(x + 1, y + 1, 109, 25, 0xffffff);
        self.fonts
            .text(&mut self.canvas, x + 6, y + 19, &text, 14, false, 0x202020);
        // The selection frame.
        self.canvas.fill(x, y, 110, 2, rgb(0x21, 0x73, 0x46));
        self.canvas.fill(x, y + 24, 110, 2, rgb(0x21, 0x73, 0x46));
        dirty.extend(Rect::clip(x - 2, y - 2, 114, 30, w, h));
        if self.typed.is_multiple_of(7) {
            // Enter: clear the frame, move down, update the total.
            self.canvas.fill(x, y, 110, 2, 0xd0d0d0);
            self.canvas.fill(x, y + 24, 110, 2, 0xd0d0d0);
            self.canvas.fill(x, y + 2, 110, 1, 0xffffff);
            self.pos.1 += 1.0;
            if self.pos.1 as usize >= (h - 90) / 26 - 1 {
                self.pos = (self.pos.0 + 1.0, 5.0);
            }
            let (tx, ty) = self.cell(c, 0);
            self.canvas
                .fill(tx + 1, ty + 1, 109, 25, rgb(0xe8, 0xf0, 0xe8));
            let total = format!("{}", self.frame * 37 % 100_000);
            self.fonts.text(
                &mut self.canvas,
                tx + 6,
                ty + 19,
                &total,
                14,
                false,
                0x000000,
            );
            dirty.extend(Rect::clip(tx, ty, 110, 26, w, h));
        }
        dirty
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_deterministic_and_counters_read_back() {
        for class in Class::ALL {
            let mut a = Content::new(class, 640, 480).unwrap();
            let mut b = Content::new(class, 640, 480).unwrap();
            for n in 0..40 {
                a.step();
                b.step();
                a.counter(n);
                b.counter(n);
            }
            assert!(a.canvas.px == b.canvas.px, "{class:?} differs between runs");
            assert_eq!(read_counter_luma(&a.canvas.luma(), 640, 480), Some(39));
        }
    }

    #[test]
    fn clipping() {
        assert_eq!(
            Rect::clip(-10, -10, 20, 20, 100, 100),
            Some(Rect {
                x: 0,
                y: 0,
                w: 10,
                h: 10
            })
        );
        assert_eq!(Rect::clip(95, 0, 20, 20, 100, 100).map(|r| r.w), Some(5));
        assert_eq!(Rect::clip(100, 0, 20, 20, 100, 100), None);
    }
}
