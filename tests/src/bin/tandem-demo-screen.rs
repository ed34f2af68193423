//! Draws something to look at on an X display (for the demo on machines without a desktop): a
//! desktop colour, a window with a title bar and a terminal-like text, and a clock line that changes
//! every second. Runs until killed.
//!
//!     tandem-demo-screen :99
#![allow(clippy::unwrap_used)]

use std::time::Duration;
use x11rb::connection::Connection;
use x11rb::protocol::xproto::{ChangeGCAux, ConnectionExt, CreateGCAux, Rectangle};
use x11rb::rust_connection::RustConnection;
use x11rb::wrapper::ConnectionExt as _;

fn main() {
    let display = std::env::args().nth(1);
    let (conn, n) = RustConnection::connect(display.as_deref()).expect("cannot open the X display");
    let screen = &conn.setup().roots[n];
    let (root, w, h) = (screen.root, screen.width_in_pixels, screen.height_in_pixels);
    let gc = conn.generate_id().unwrap();
    conn.create_gc(gc, root, &CreateGCAux::new()).unwrap();
    let font = conn.generate_id().unwrap();
    conn.open_font(font, b"fixed").unwrap();
    let text = conn.generate_id().unwrap();
    conn.create_gc(
        text,
        root,
        &CreateGCAux::new()
            .font(font)
            .foreground(0x101010)
            .background(0xffffff),
    )
    .unwrap();
    let title = conn.generate_id().unwrap();
    conn.create_gc(
        title,
        root,
        &CreateGCAux::new()
            .font(font)
            .foreground(0xffffff)
            .background(0x2d5fa0),
    )
    .unwrap();
    let fill = |color: u32, x: i16, y: i16, cw: u16, ch: u16| {
        conn.change_gc(gc, &ChangeGCAux::new().foreground(color))
            .unwrap();
        conn.poly_fill_rectangle(
            root,
            gc,
            &[Rectangle {
                x,
                y,
                width: cw,
                height: ch,
            }],
        )
        .unwrap();
    };
    fill(0x1f6f6f, 0, 0, w, h);
    let (wx, wy, ww, wh) = (w as i16 / 8, h as i16 / 8, w * 3 / 4, h * 3 / 4);
    fill(0x2d5fa0, wx, wy, ww, 22);
    fill(0xffffff, wx, wy + 22, ww, wh - 22);
    conn.image_text8(root, title, wx + 8, wy + 15, b"Printer queue - Tandem demo")
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
        conn.image_text8(root, text, wx + 10, wy + 44 + 16 * i as i16, l.as_bytes())
            .unwrap();
    }
    conn.sync().unwrap();
    let start = std::time::Instant::now();
    loop {
        let s = start.elapsed().as_secs();
        let clock = format!(
            "uptime {:02}:{:02}  (this line changes every second)",
            s / 60,
            s % 60
        );
        conn.image_text8(root, text, wx + 10, wy + wh as i16 - 12, clock.as_bytes())
            .unwrap();
        conn.sync().unwrap();
        std::thread::sleep(Duration::from_secs(1));
    }
}
