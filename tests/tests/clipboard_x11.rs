//! The agent's X11 clipboard bridge (`tandem_host::clipboard`) against real X clients on Xvfb:
//! `xclip` (Debian package `xclip`) copying and pasting, and a small owner of our own for what
//! `xclip` does not do (serving with `INCR`, refusing, never answering).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_host::clipboard::{ClipContent, MAX_TEXT, X11Clipboard};
use tandem_tests::x11::Xvfb;
use tokio::sync::mpsc::Receiver;
use x11rb::connection::Connection;
use x11rb::protocol::Event;
use x11rb::protocol::xproto::{
    AtomEnum, ChangeWindowAttributesAux, ConnectionExt as _, CreateWindowAux, EventMask, PropMode,
    Property, SELECTION_NOTIFY_EVENT, SelectionNotifyEvent, WindowClass,
};
use x11rb::rust_connection::RustConnection;
use x11rb::wrapper::ConnectionExt as _;

const T: Duration = Duration::from_secs(10);

/// A background `xclip` owning the clipboard; killed when dropped.
struct XclipIn(Child);

impl Drop for XclipIn {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `xclip` copies `data` as `target` (default `UTF8_STRING`) and serves it in the foreground.
/// Returns once xclip owns the clipboard, so that what a test does next happens after it.
fn xclip_in(x: &Xvfb, target: Option<&str>, data: &[u8]) -> XclipIn {
    let before = owner_of_clipboard(x);
    let mut cmd = Command::new("xclip");
    cmd.args([
        "-quiet",
        "-display",
        &x.display,
        "-selection",
        "clipboard",
        "-i",
    ]);
    if let Some(t) = target {
        cmd.args(["-t", t]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("xclip not installed (Debian package xclip)");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let deadline = Instant::now() + T;
    while owner_of_clipboard(x) == before {
        assert!(Instant::now() < deadline, "xclip never took the clipboard");
        std::thread::sleep(Duration::from_millis(5));
    }
    XclipIn(child)
}

/// `xclip -o` for `target`: the pasted bytes, or `None` when xclip fails (nothing to paste).
fn xclip_out(x: &Xvfb, target: &str) -> Option<Vec<u8>> {
    let mut child = Command::new("xclip")
        .args(["-display", &x.display, "-selection", "clipboard", "-o"])
        .args(["-t", target])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("xclip not installed (Debian package xclip)");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let deadline = Instant::now() + T;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("xclip -o did not finish within {T:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = reader.join().unwrap();
    status.success().then_some(out)
}

/// The next report of the clipboard, waiting at most `timeout`.
fn recv(rx: &mut Receiver<ClipContent>, timeout: Duration) -> Option<ClipContent> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(c) = rx.try_recv() {
            return Some(c);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn text(n: usize, seed: u8) -> String {
    (0..n)
        .map(|i| match i % 61 {
            60 => '\n',
            k => char::from(b'a' + ((k as u8 + seed) % 26)),
        })
        .collect()
}

fn png_image(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgba);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().unwrap();
    let data: Vec<u8> = (0..w * h * 4).map(|i| (i * 7 % 251) as u8).collect();
    writer.write_image_data(&data).unwrap();
    writer.finish().unwrap();
    out
}

fn owner_of_clipboard(x: &Xvfb) -> u32 {
    let (conn, _) = RustConnection::connect(Some(&x.display)).unwrap();
    let clipboard = conn
        .intern_atom(false, b"CLIPBOARD")
        .unwrap()
        .reply()
        .unwrap()
        .atom;
    conn.get_selection_owner(clipboard)
        .unwrap()
        .reply()
        .unwrap()
        .owner
}

/// How [`TestOwner`] answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `UTF8_STRING` in one property.
    Direct,
    /// `UTF8_STRING` with `INCR`, in pieces of this many bytes.
    Incr(usize),
    /// As `Incr`, but announcing 1 KiB (ICCCM: the announced size is only a lower bound).
    IncrUnderstated(usize),
    /// Refuses `TARGETS`, serves `UTF8_STRING` in one property.
    NoTargets,
    /// Never answers.
    Silent,
}

/// A clipboard owner of our own, serving text as told by its [`Mode`], and recording the targets
/// it was asked for and how many bytes it has written.
struct TestOwner {
    asked: Arc<Mutex<Vec<String>>>,
    sent: Arc<AtomicUsize>,
}

impl TestOwner {
    fn start(x: &Xvfb, data: Vec<u8>, mode: Mode) -> TestOwner {
        let (conn, screen) = RustConnection::connect(Some(&x.display)).unwrap();
        let atom = |name: &[u8]| conn.intern_atom(false, name).unwrap().reply().unwrap().atom;
        let (clipboard, targets, utf8, incr) = (
            atom(b"CLIPBOARD"),
            atom(b"TARGETS"),
            atom(b"UTF8_STRING"),
            atom(b"INCR"),
        );
        let root = conn.setup().roots[screen].root;
        let win = conn.generate_id().unwrap();
        conn.create_window(
            0,
            win,
            root,
            0,
            0,
            1,
            1,
            0,
            WindowClass::INPUT_ONLY,
            0,
            &CreateWindowAux::new(),
        )
        .unwrap();
        conn.set_selection_owner(win, clipboard, x11rb::CURRENT_TIME)
            .unwrap();
        conn.sync().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(AtomicUsize::new(0));
        let (a, s) = (asked.clone(), sent.clone());
        std::thread::spawn(move || {
            // (requestor, property, offset) of the INCR transfer under way.
            let mut transfer: Option<(u32, u32, usize)> = None;
            while let Ok(ev) = conn.wait_for_event() {
                match ev {
                    Event::SelectionRequest(r) => {
                        let name = conn.get_atom_name(r.target).unwrap().reply().unwrap().name;
                        let name = String::from_utf8(name).unwrap();
                        if mode == Mode::Silent {
                            a.lock().unwrap().push(name);
                            continue;
                        }
                        let ok = if r.target == targets && mode != Mode::NoTargets {
                            conn.change_property32(
                                PropMode::REPLACE,
                                r.requestor,
                                r.property,
                                AtomEnum::ATOM,
                                &[targets, utf8],
                            )
                            .unwrap();
                            true
                        } else if r.target == utf8 {
                            if let Mode::Incr(_) | Mode::IncrUnderstated(_) = mode {
                                let announced = match mode {
                                    Mode::IncrUnderstated(_) => 1024,
                                    _ => data.len() as u32,
                                };
                                conn.change_window_attributes(
                                    r.requestor,
                                    &ChangeWindowAttributesAux::new()
                                        .event_mask(EventMask::PROPERTY_CHANGE),
                                )
                                .unwrap();
                                conn.change_property32(
                                    PropMode::REPLACE,
                                    r.requestor,
                                    r.property,
                                    incr,
                                    &[announced],
                                )
                                .unwrap();
                                transfer = Some((r.requestor, r.property, 0));
                            } else {
                                conn.change_property8(
                                    PropMode::REPLACE,
                                    r.requestor,
                                    r.property,
                                    utf8,
                                    &data,
                                )
                                .unwrap();
                                s.store(data.len(), Ordering::SeqCst);
                            }
                            true
                        } else {
                            false
                        };
                        let notify = SelectionNotifyEvent {
                            response_type: SELECTION_NOTIFY_EVENT,
                            sequence: 0,
                            time: r.time,
                            requestor: r.requestor,
                            selection: r.selection,
                            target: r.target,
                            property: if ok { r.property } else { x11rb::NONE },
                        };
                        conn.send_event(false, r.requestor, EventMask::NO_EVENT, notify)
                            .unwrap();
                        let _ = conn.sync();
                        a.lock().unwrap().push(name);
                    }
                    Event::PropertyNotify(p) if p.state == Property::DELETE => {
                        let (Mode::Incr(chunk) | Mode::IncrUnderstated(chunk)) = mode else {
                            continue;
                        };
                        let Some((req, prop, offset)) = transfer else {
                            continue;
                        };
                        if p.window != req || p.atom != prop {
                            continue;
                        }
                        let end = (offset + chunk).min(data.len());
                        let _ = conn.change_property8(
                            PropMode::REPLACE,
                            req,
                            prop,
                            utf8,
                            &data[offset..end],
                        );
                        transfer = (end > offset).then_some((req, prop, end));
                        let _ = conn.sync();
                        s.store(end, Ordering::SeqCst);
                    }
                    _ => {}
                }
            }
        });
        TestOwner { asked, sent }
    }

    fn was_asked(&self, target: &str) -> bool {
        self.asked.lock().unwrap().iter().any(|t| t == target)
    }
}

#[test]
fn text_copied_by_another_client_is_reported() {
    let x = Xvfb::start(320, 200);
    let (_cb, mut rx) = X11Clipboard::start(Some(&x.display)).unwrap();
    let _xclip = xclip_in(&x, None, "héllo wörld ✓".as_bytes());
    assert_eq!(
        recv(&mut rx, T),
        Some(ClipContent::Text("héllo wörld ✓".into()))
    );
}

#[test]
fn text_set_by_the_agent_is_pasted() {
    let x = Xvfb::start(320, 200);
    let (cb, _rx) = X11Clipboard::start(Some(&x.display)).unwrap();
    cb.set(ClipContent::Text("from the technician: café ✓".into()))
        .unwrap();
    assert_eq!(
        xclip_out(&x, "UTF8_STRING").unwrap(),
        "from the technician: café ✓".as_bytes()
    );
    assert_eq!(
        xclip_out(&x, "text/plain;charset=utf-8").unwrap(),
        "from the technician: café ✓".as_bytes()
    );
    assert_eq!(
        xclip_out(&x, "STRING").unwrap(),
        b"from the technician: caf\xe9 ?"
    );
    let targets = String::from_utf8(xclip_out(&x, "TARGETS").unwrap()).unwrap();
    for t in [
        "TARGETS",
        "TIMESTAMP",
        "UTF8_STRING",
        "STRING",
        "TEXT",
        "text/plain",
    ] {
        assert!(targets.lines().any(|l| l == t), "{t} missing in {targets}");
    }
    assert!(!targets.contains("image/png"));
    assert_eq!(xclip_out(&x, "image/png"), None, "unknown target refused");

    // A new value replaces the old one.
    cb.set(ClipContent::Text("second".into())).unwrap();
    assert_eq!(xclip_out(&x, "UTF8_STRING").unwrap(), b"second");
}

#[test]
fn large_text_both_ways_with_incr() {
    let x = Xvfb::start(320, 200);
    let (cb, mut rx) = X11Clipboard::start(Some(&x.display)).unwrap();

    // Agent → xclip: 600 KiB is served with INCR.
    let out = text(600 << 10, 1);
    cb.set(ClipContent::Text(out.clone())).unwrap();
    assert_eq!(xclip_out(&x, "UTF8_STRING").unwrap(), out.as_bytes());

    // Several requestors at once.
    let pastes: Vec<_> = (0..3)
        .map(|_| {
            let display = x.display.clone();
            std::thread::spawn(move || {
                Command::new("xclip")
                    .args(["-display", &display, "-selection", "clipboard", "-o"])
                    .output()
                    .unwrap()
                    .stdout
            })
        })
        .collect();
    for p in pastes {
        assert_eq!(p.join().unwrap(), out.as_bytes());
    }

    // Another owner → agent with INCR in 64 KiB pieces.
    let incoming = text(600 << 10, 2);
    let owner = TestOwner::start(&x, incoming.clone().into_bytes(), Mode::Incr(64 << 10));
    assert_eq!(recv(&mut rx, T), Some(ClipContent::Text(incoming.clone())));
    assert_eq!(owner.sent.load(Ordering::SeqCst), incoming.len());

    // xclip → agent: 600 KiB in one property (xclip uses INCR only above the request size).
    let from_xclip = text(600 << 10, 3);
    let _xclip = xclip_in(&x, None, from_xclip.as_bytes());
    assert_eq!(recv(&mut rx, T), Some(ClipContent::Text(from_xclip)));
}

#[test]
fn png_both_ways() {
    let x = Xvfb::start(320, 200);
    let (cb, mut rx) = X11Clipboard::start(Some(&x.display)).unwrap();

    let small = png_image(32, 16);
    let xclip = xclip_in(&x, Some("image/png"), &small);
    assert_eq!(recv(&mut rx, T), Some(ClipContent::Png(small.clone())));
    drop(xclip);

    // 768 KiB of PNG (stored, hardly compressible data): served with INCR.
    let mut big = png_image(8, 8);
    big.resize(768 << 10, 0x5a);
    cb.set(ClipContent::Png(big.clone())).unwrap();
    assert_eq!(xclip_out(&x, "image/png").unwrap(), big);
    let targets = String::from_utf8(xclip_out(&x, "TARGETS").unwrap()).unwrap();
    assert!(targets.lines().any(|l| l == "image/png"));
    assert!(!targets.lines().any(|l| l == "UTF8_STRING"));
    assert_eq!(xclip_out(&x, "UTF8_STRING"), None);

    // "image/png" that is not a PNG is not passed on.
    let _fake = xclip_in(&x, Some("image/png"), b"GIF89a not a png at all");
    let owner = TestOwner::start(&x, b"after the fake".to_vec(), Mode::Direct);
    assert_eq!(
        recv(&mut rx, T),
        Some(ClipContent::Text("after the fake".into()))
    );
    assert!(owner.was_asked("UTF8_STRING"));
    assert!(rx.try_recv().is_err());
}

#[test]
fn over_the_limit_is_not_reported() {
    let x = Xvfb::start(320, 200);
    let (cb, mut rx) = X11Clipboard::start(Some(&x.display)).unwrap();
    let big = text(MAX_TEXT + (MAX_TEXT / 2), 4).into_bytes();

    // In one property: refused from its size, before its value is fetched.
    let owner = TestOwner::start(&x, big.clone(), Mode::Direct);
    wait_until("the agent to ask for the text", || {
        owner.was_asked("UTF8_STRING")
    });
    let _small = xclip_in(&x, None, b"small one");
    assert_eq!(
        recv(&mut rx, T),
        Some(ClipContent::Text("small one".into()))
    );

    // With INCR and its size announced: refused from the announcement, no piece is read.
    let chunk = 64 << 10;
    let owner = TestOwner::start(&x, big.clone(), Mode::Incr(chunk));
    wait_until("the agent to ask for the text", || {
        owner.was_asked("UTF8_STRING")
    });
    let _small = xclip_in(&x, None, b"small two");
    assert_eq!(
        recv(&mut rx, T),
        Some(ClipContent::Text("small two".into()))
    );
    assert_eq!(owner.sent.load(Ordering::SeqCst), 0);

    // With INCR and a size understated: the read stops at the piece that goes over
    // (17 × 64 KiB > 1 MiB), and the owner is not asked for more.
    let owner = TestOwner::start(&x, big.clone(), Mode::IncrUnderstated(chunk));
    wait_until("the 17th INCR piece", || {
        owner.sent.load(Ordering::SeqCst) >= 17 * chunk
    });
    let _small = xclip_in(&x, None, b"small three");
    assert_eq!(
        recv(&mut rx, T),
        Some(ClipContent::Text("small three".into()))
    );
    assert_eq!(owner.sent.load(Ordering::SeqCst), 17 * chunk);

    // The agent refuses to set it too.
    assert!(
        cb.set(ClipContent::Text(String::from_utf8(big).unwrap()))
            .is_err()
    );
}

#[test]
fn no_echo_of_what_the_agent_set() {
    let x = Xvfb::start(320, 200);
    let (cb, mut rx) = X11Clipboard::start(Some(&x.display)).unwrap();
    cb.set(ClipContent::Text("from the technician".into()))
        .unwrap();
    assert_eq!(
        xclip_out(&x, "UTF8_STRING").unwrap(),
        b"from the technician"
    );
    // A clipboard manager taking over with the same content is not echoed either.
    let _manager = xclip_in(&x, None, b"from the technician");
    wait_until("the manager to own the clipboard", || {
        xclip_out(&x, "TARGETS").is_some_and(|t| !String::from_utf8_lossy(&t).contains("TIMESTAMP"))
    });
    let _user = xclip_in(&x, None, b"from the user");
    assert_eq!(
        recv(&mut rx, T),
        Some(ClipContent::Text("from the user".into()))
    );
    assert!(rx.try_recv().is_err());
}

#[test]
fn owners_that_refuse_or_never_answer() {
    let x = Xvfb::start(320, 200);
    let (cb, mut rx) = X11Clipboard::start(Some(&x.display)).unwrap();

    // No TARGETS: UTF8_STRING is asked directly.
    let owner = TestOwner::start(&x, b"old client".to_vec(), Mode::NoTargets);
    assert_eq!(
        recv(&mut rx, T),
        Some(ClipContent::Text("old client".into()))
    );
    assert!(owner.was_asked("TARGETS"));

    // An owner that never answers blocks nothing: the agent still sets and serves, and the
    // next copy is reported.
    let silent = TestOwner::start(&x, b"never".to_vec(), Mode::Silent);
    wait_until("the agent to ask the silent owner", || {
        silent.was_asked("TARGETS")
    });
    cb.set(ClipContent::Text("still here".into())).unwrap();
    assert_eq!(xclip_out(&x, "UTF8_STRING").unwrap(), b"still here");
    let _xclip = xclip_in(&x, None, b"after the silent one");
    assert_eq!(
        recv(&mut rx, T),
        Some(ClipContent::Text("after the silent one".into()))
    );
    assert!(rx.try_recv().is_err());
}

#[test]
fn drop_gives_up_the_clipboard() {
    let x = Xvfb::start(320, 200);
    let (cb, _rx) = X11Clipboard::start(Some(&x.display)).unwrap();
    cb.set(ClipContent::Text("bye".into())).unwrap();
    assert_eq!(xclip_out(&x, "UTF8_STRING").unwrap(), b"bye");
    assert_ne!(owner_of_clipboard(&x), x11rb::NONE);
    drop(cb);
    assert_eq!(owner_of_clipboard(&x), x11rb::NONE);
    assert_eq!(xclip_out(&x, "UTF8_STRING"), None);
}

#[test]
fn losing_the_clipboard_drops_the_content() {
    let x = Xvfb::start(320, 200);
    let (cb, mut rx) = X11Clipboard::start(Some(&x.display)).unwrap();
    cb.set(ClipContent::Text("ours".into())).unwrap();
    let xclip = xclip_in(&x, None, b"theirs");
    assert_eq!(recv(&mut rx, T), Some(ClipContent::Text("theirs".into())));
    drop(xclip); // xclip gone: nobody owns the clipboard, and we do not serve "ours" again.
    wait_until("xclip to be gone", || owner_of_clipboard(&x) == x11rb::NONE);
    assert_eq!(xclip_out(&x, "UTF8_STRING"), None);
}
