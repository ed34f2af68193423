//! Writes a PNG of an X display's screen: `tandem-screenshot DISPLAY FILE.png`. Uses Tandem's own
//! capture (private MIT-SHM), so tests and the README's screenshot need no extra X tools.

use anyhow::{Context, Result};
use tandem_media::capture::Capturer;
use tandem_media::capture::x11::X11Capturer;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(display), Some(path)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: tandem-screenshot DISPLAY FILE.png");
    };
    let mut c = X11Capturer::open(Some(&display))?;
    let cap = c.capture()?;
    let f = cap.frame;
    let row = f.width as usize * 4;
    let mut rgba = Vec::with_capacity(row * f.height as usize);
    for y in 0..f.height as usize {
        for px in f.data[y * f.stride..][..row].chunks_exact(4) {
            rgba.extend_from_slice(&[px[2], px[1], px[0], 255]);
        }
    }
    let file = std::fs::File::create(&path).with_context(|| format!("cannot create {path}"))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), f.width, f.height);
    enc.set_color(png::ColorType::Rgba);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(&rgba)?;
    Ok(())
}
