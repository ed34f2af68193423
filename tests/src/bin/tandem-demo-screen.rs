//! Draws something to look at on an X display (for the demo on machines without a desktop): a
//! desktop colour, a window with a title bar and terminal-like text, and a line that changes every
//! second. Runs until killed.
//!
//!     tandem-demo-screen :99
#![allow(clippy::unwrap_used)]

use std::time::Duration;
use tandem_tests::x11::Painter;
use x11rb::connection::Connection;
use x11rb::protocol::xproto::{ConnectionExt, CreateGCAux};

fn main() {
    let display = std::env::args()
        .nth(1)
        .unwrap_or_else(|| std::env::var("DISPLAY").unwrap_or_default());
    let p = Painter::new(&display);
    let (w, h) = (p.w, p.h);
    let title = p.conn.generate_id().unwrap();
    let font = p.conn.generate_id().unwrap();
    p.conn.open_font(font, b"fixed").unwrap();
    p.conn
        .create_gc(
            title,
            p.root,
            &CreateGCAux::new()
                .font(font)
                .foreground(0xffffff)
                .background(0x2d5fa0),
        )
        .unwrap();
    p.fill(0x1f6f6f, 0, 0, w, h);
    let (wx, wy, ww, wh) = (w as i16 / 8, h as i16 / 8, w * 3 / 4, h * 3 / 4);
    p.fill(0x2d5fa0, wx, wy, ww, 22);
    p.fill(0xffffff, wx, wy + 22, ww, wh - 22);
    p.conn
        .image_text8(
            p.root,
            title,
            wx + 8,
            wy + 15,
            b"Printer queue - Tandem demo",
        )
        .unwrap();
    let lines = [
        "C:\\> lpstat -p",
        "printer office-laser is idle. enabled since Sat 28 Nov 2026",
        "printer reception-inkjet disabled since Fri 27 Nov 2026 -",
        "        paper jam in tray 2",
        "C:\\> cancel -a reception-inkjet",
        "C:\\> cupsenable reception-inkjet",
        "C:\\> lpstat -p reception-inkjet",
        "printer reception-inkjet is idle. enabled since Sat 28 Nov 2026",
    ];
    for (i, l) in lines.iter().enumerate() {
        p.text(wx + 10, wy + 44 + 16 * i as i16, l);
    }
    p.sync();
    let start = std::time::Instant::now();
    loop {
        let s = start.elapsed().as_secs();
        p.text(
            wx + 10,
            wy + wh as i16 - 12,
            &format!(
                "uptime {:02}:{:02}  (this line changes every second)",
                s / 60,
                s % 60
            ),
        );
        p.sync();
        std::thread::sleep(Duration::from_secs(1));
    }
}
