//! The agent's end of the shared clipboard on X11: follows the `CLIPBOARD` selection of a display
//! and can set it, for UTF-8 text and PNG images.
//!
//! [`X11Clipboard::start`] connects to the display and starts a thread; every change of the
//! clipboard made by *another* X client is read and sent on the returned receiver.
//! [`X11Clipboard::set`] makes the agent the clipboard's owner, serving the given content to every
//! client that pastes, until another client copies something or the [`X11Clipboard`] is dropped.
//!
//! Decisions:
//!
//! * **Change detection.** XFIXES `SelectSelectionInput` on a hidden, never-mapped `InputOnly`
//!   window of our own: the server tells us of every owner change, no polling. For a new owner we
//!   ask `TARGETS`, then the chosen target, with the owner's own selection timestamp as the
//!   conversion time (so an answer that arrives late from an earlier owner is recognised by its
//!   time and ignored), into one of two properties on our window used in turn.
//! * **What is read.** Text first: `UTF8_STRING`, else `text/plain;charset=utf-8`, else `STRING`
//!   (Latin-1). `image/png` is taken only when none of those text targets is offered: an office
//!   suite or a browser that offers both for a selection of text or cells means the text, while
//!   image editors and "copy image" in browsers offer no plain-text target. An owner that refuses
//!   `TARGETS` is asked for `UTF8_STRING` directly. A PNG must start with the PNG signature;
//!   invalid UTF-8 is repaired with U+FFFD; empty content and trailing NULs are dropped.
//! * **Limits.** [`MAX_TEXT`] and [`MAX_IMAGE`] are enforced while reading: a property's size is
//!   asked before its value is fetched, an `INCR` size announcement over the limit ends the read at
//!   once, and an `INCR` transfer stops at the first piece that would go over. Nothing is
//!   reported then; a debug line says so (sizes only, never contents — the module logs no
//!   clipboard content anywhere, and [`ClipContent`]'s `Debug` shows only the kind and length).
//! * **Timeouts.** Each step of a read (`TARGETS`, the data, each `INCR` piece) must be answered
//!   within [`CONVERT_TIMEOUT`], and a whole read ends after [`READ_TIMEOUT`]; the thread never
//!   blocks on another client (only on replies of the X server itself), it sleeps in `poll` on the
//!   X connection and a wake-up socket until the next deadline.
//! * **Newest wins.** A new owner change abandons a read in progress. A report that finds the
//!   receiver full is kept (only the newest such one) and retried.
//! * **No echo.** Our own ownership changes (from [`X11Clipboard::set`]) are recognised by the
//!   owner window and produce no message. In addition, content read back from another client that
//!   is exactly what we last set (a clipboard manager taking over our selection) is not reported
//!   until something different has been.
//! * **Serving.** `TARGETS`, `TIMESTAMP` and, for text, `UTF8_STRING`, `text/plain;charset=utf-8`,
//!   `text/plain`, `TEXT` (answered as `UTF8_STRING`) and `STRING` (Latin-1, `?` for other
//!   characters); for an image `image/png`. Other targets, `MULTIPLE` included, are refused.
//!   Data above 256 KiB (or above the server's maximum request size, less a margin) goes with the
//!   `INCR` protocol, to any number of requestors at once; a requestor that stops deleting the
//!   property for [`CONVERT_TIMEOUT`] is abandoned. Ownership is taken with a real server
//!   timestamp (a zero-length property append), as ICCCM asks.
//! * **Losing the clipboard.** On `SelectionClear` (another client copied) the content is
//!   dropped; `INCR` transfers already under way are finished. On drop the thread gives up the
//!   ownership, destroys its window and ends; nothing of the content is kept.
//! * **Threading.** One thread owns the X connection. [`X11Clipboard::set`] hands the content over
//!   a channel, wakes the thread through a socket pair and waits for the answer (normally a couple
//!   of round trips to the X server; at most [`SET_TIMEOUT`]).

use std::hash::{BuildHasher, RandomState};
use std::io::{Read as _, Write as _};
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::mpsc::{
    self as std_mpsc, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError,
};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use tokio::sync::mpsc;
use x11rb::connection::{Connection, RequestConnection};
use x11rb::errors::{ConnectError, ConnectionError, ReplyError, ReplyOrIdError};
use x11rb::protocol::Event;
use x11rb::protocol::xfixes::{self, ConnectionExt as _, SelectionEventMask};
use x11rb::protocol::xproto::{
    Atom, AtomEnum, ChangeWindowAttributesAux, ConnectionExt as _, CreateWindowAux, EventMask,
    GetPropertyReply, PropMode, Property, PropertyNotifyEvent, SELECTION_NOTIFY_EVENT,
    SelectionNotifyEvent, SelectionRequestEvent, Timestamp, Window, WindowClass,
};
use x11rb::rust_connection::RustConnection;
use x11rb::wrapper::ConnectionExt as _;
use x11rb::{CURRENT_TIME, NONE};

/// The largest text taken from or given to the clipboard, in bytes of UTF-8.
pub const MAX_TEXT: usize = 1 << 20;

/// The largest PNG image taken from or given to the clipboard, in bytes.
pub const MAX_IMAGE: usize = 16 << 20;

/// How long another client has to answer one step of a transfer (a conversion, an `INCR` piece).
pub const CONVERT_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest a whole read of the clipboard may take, `INCR` pieces included.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest [`X11Clipboard::set`] waits for the clipboard's thread.
pub const SET_TIMEOUT: Duration = Duration::from_secs(3);

/// The first bytes of every PNG file.
pub const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];

/// Above this size data is served with `INCR` (and never more in one piece), whatever the
/// server's maximum request size.
const INCR_ABOVE: usize = 256 << 10;

/// What is kept free of a request for its header when data is sized to the maximum request.
const REQUEST_MARGIN: usize = 1024;

/// The longest the thread sleeps when nothing is due.
const IDLE: Duration = Duration::from_secs(1);

/// How soon a report that found the receiver full is retried.
const RETRY_REPORT: Duration = Duration::from_millis(20);

/// How many reports may wait in the receiver.
const CHANNEL_BOUND: usize = 4;

/// At most this many `INCR` transfers to requestors at once; more requests are refused.
const MAX_TRANSFERS: usize = 32;

/// How long dropping an [`X11Clipboard`] waits for its thread.
const JOIN_TIMEOUT: Duration = Duration::from_secs(1);

/// The size of a `TARGETS` list we are willing to read (thousands of atoms).
const MAX_TARGETS_BYTES: usize = 64 << 10;

/// Content of the clipboard.
///
/// `Debug` shows the kind and the size only: clipboard contents are never logged.
#[derive(Clone, PartialEq, Eq)]
pub enum ClipContent {
    /// UTF-8 text, at most [`MAX_TEXT`] bytes.
    Text(String),
    /// A PNG image (starting with [`PNG_SIGNATURE`]), at most [`MAX_IMAGE`] bytes.
    Png(Vec<u8>),
}

impl std::fmt::Debug for ClipContent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClipContent::Text(t) => write!(f, "Text({} bytes)", t.len()),
            ClipContent::Png(p) => write!(f, "Png({} bytes)", p.len()),
        }
    }
}

/// Why the clipboard cannot be followed or set.
#[derive(Debug, thiserror::Error)]
pub enum ClipboardError {
    /// No connection to the X server.
    #[error("cannot open the X display {display} for the clipboard: {source}")]
    Connect {
        display: String,
        #[source]
        source: ConnectError,
    },
    /// The connection names a screen the server does not have.
    #[error("the X display {display} has no screen {screen} for the clipboard")]
    NoScreen { display: String, screen: usize },
    /// The server lacks the XFIXES extension, needed to learn of clipboard changes.
    #[error("the X display {display} has no XFIXES extension, needed to follow the clipboard")]
    NoXfixes { display: String },
    /// A request the clipboard needs failed (the server refused it or the connection broke).
    #[error("cannot {action} on the X display {display} for the clipboard: {source}")]
    Request {
        display: String,
        action: &'static str,
        #[source]
        source: ReplyOrIdError,
    },
    /// The clipboard's thread or its wake-up socket could not be set up.
    #[error("cannot start the clipboard's thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The content is over [`MAX_TEXT`] or [`MAX_IMAGE`].
    #[error("the clipboard {kind} of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    /// The image does not start with the PNG signature.
    #[error("the clipboard image is not a PNG")]
    NotPng,
    /// Another X client became the clipboard's owner with a later time.
    #[error("another X client took the clipboard at the same time")]
    NotOwner,
    /// The clipboard's thread did not answer in time.
    #[error("the clipboard's thread did not answer within {0:?}")]
    Timeout(Duration),
    /// The clipboard's thread has ended (the X connection was lost; logged).
    #[error("the clipboard is no longer followed: its X connection was lost")]
    Stopped,
}

/// What the owner tells the clipboard's thread.
enum Cmd {
    Set {
        payload: Payload,
        reply: SyncSender<Result<(), ClipboardError>>,
    },
    Stop,
}

/// The agent's end of the X11 `CLIPBOARD` selection; see the [module documentation](self).
#[derive(Debug)]
pub struct X11Clipboard {
    cmds: Sender<Cmd>,
    wake: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl X11Clipboard {
    /// Connects to `display` (`None`: `$DISPLAY`) and starts the clipboard's thread; changes of
    /// the clipboard made by other X clients are sent on the returned receiver (the current
    /// content at start is not).
    pub fn start(
        display: Option<&str>,
    ) -> Result<(X11Clipboard, mpsc::Receiver<ClipContent>), ClipboardError> {
        let (tx, rx) = mpsc::channel(CHANNEL_BOUND);
        let (wake, wake_rx) = UnixStream::pair().map_err(ClipboardError::Thread)?;
        wake.set_nonblocking(true).map_err(ClipboardError::Thread)?;
        wake_rx
            .set_nonblocking(true)
            .map_err(ClipboardError::Thread)?;
        let (cmds, cmds_rx) = std_mpsc::channel();
        let worker = Worker::create(display, cmds_rx, wake_rx, tx)?;
        let thread = std::thread::Builder::new()
            .name("x11-clipboard".into())
            .spawn(move || worker.run())
            .map_err(ClipboardError::Thread)?;
        Ok((
            X11Clipboard {
                cmds,
                wake,
                thread: Some(thread),
            },
            rx,
        ))
    }

    /// Makes the agent the owner of `CLIPBOARD`, serving `c` to any client that asks until
    /// another client takes the clipboard or this value is dropped.
    ///
    /// Blocks until the X server has confirmed the ownership: normally a few round trips, at most
    /// [`SET_TIMEOUT`] (from async code, call it in `spawn_blocking`).
    pub fn set(&self, c: ClipContent) -> Result<(), ClipboardError> {
        let payload = Payload::new(c)?;
        let (reply, answer) = std_mpsc::sync_channel(1);
        self.cmds
            .send(Cmd::Set { payload, reply })
            .map_err(|_| ClipboardError::Stopped)?;
        self.wake();
        match answer.recv_timeout(SET_TIMEOUT) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(ClipboardError::Timeout(SET_TIMEOUT)),
            Err(RecvTimeoutError::Disconnected) => Err(ClipboardError::Stopped),
        }
    }

    fn wake(&self) {
        // A full socket already holds a wake-up; nothing else can fail that matters here.
        let _ = (&self.wake).write(&[1]);
    }
}

impl Drop for X11Clipboard {
    /// Stops the thread, which gives up the ownership and destroys its window; waits for it at
    /// most 1 s (a thread left behind does the same as soon as it runs again).
    fn drop(&mut self) {
        let _ = self.cmds.send(Cmd::Stop);
        self.wake();
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + JOIN_TIMEOUT;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            tracing::warn!(
                "the clipboard's thread did not stop within {JOIN_TIMEOUT:?}; leaving it behind"
            );
        }
    }
}

x11rb::atom_manager! {
    Atoms: AtomsCookie {
        CLIPBOARD,
        TARGETS,
        TIMESTAMP,
        MULTIPLE,
        INCR,
        UTF8_STRING,
        TEXT,
        TEXT_PLAIN_UTF8: b"text/plain;charset=utf-8",
        TEXT_PLAIN: b"text/plain",
        IMAGE_PNG: b"image/png",
        TANDEM_CLIP_0,
        TANDEM_CLIP_1,
        TANDEM_CLIP_2,
        TANDEM_CLIP_3,
        TANDEM_TIME,
    }
}

// Predefined atoms (fixed by the core protocol: `AtomEnum::STRING` and so on).
const ATOM: Atom = 4;
const INTEGER: Atom = 19;
const STRING: Atom = 31;

/// Content ready to be served: validated, in shareable buffers (several `INCR` transfers).
#[derive(Clone)]
enum Payload {
    /// UTF-8.
    Text(Arc<[u8]>),
    Png(Arc<[u8]>),
}

impl Payload {
    fn new(c: ClipContent) -> Result<Payload, ClipboardError> {
        match c {
            ClipContent::Text(t) if t.len() > MAX_TEXT => Err(ClipboardError::TooLarge {
                kind: "text",
                len: t.len(),
                max: MAX_TEXT,
            }),
            ClipContent::Text(t) => Ok(Payload::Text(t.into_bytes().into())),
            ClipContent::Png(p) if p.len() > MAX_IMAGE => Err(ClipboardError::TooLarge {
                kind: "image",
                len: p.len(),
                max: MAX_IMAGE,
            }),
            ClipContent::Png(p) if !p.starts_with(&PNG_SIGNATURE) => Err(ClipboardError::NotPng),
            ClipContent::Png(p) => Ok(Payload::Png(p.into())),
        }
    }

    fn fingerprint(&self, hasher: &RandomState) -> u64 {
        match self {
            Payload::Text(b) => hasher.hash_one((0u8, &b[..])),
            Payload::Png(b) => hasher.hash_one((1u8, &b[..])),
        }
    }
}

fn fingerprint(c: &ClipContent, hasher: &RandomState) -> u64 {
    match c {
        ClipContent::Text(t) => hasher.hash_one((0u8, t.as_bytes())),
        ClipContent::Png(p) => hasher.hash_one((1u8, &p[..])),
    }
}

/// How the bytes of a target are to be understood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Utf8,
    Latin1,
    Png,
}

impl Kind {
    fn limit(self) -> usize {
        match self {
            Kind::Utf8 | Kind::Latin1 => MAX_TEXT,
            Kind::Png => MAX_IMAGE,
        }
    }
}

/// The target to ask of an owner that offers `offered`; see the module documentation.
fn choose_target(offered: &[Atom], atoms: &Atoms) -> Option<(Atom, Kind)> {
    [
        (atoms.UTF8_STRING, Kind::Utf8),
        (atoms.TEXT_PLAIN_UTF8, Kind::Utf8),
        (STRING, Kind::Latin1),
        (atoms.IMAGE_PNG, Kind::Png),
    ]
    .into_iter()
    .find(|(t, _)| offered.contains(t))
}

/// Why content read from another client is not reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rejected {
    TooLarge { limit: usize },
    NotPng,
    Empty,
}

/// Content of one target being read, in one piece or `INCR` pieces, within the kind's limit.
#[derive(Debug)]
struct Assembly {
    kind: Kind,
    buf: Vec<u8>,
}

impl Assembly {
    fn new(kind: Kind) -> Assembly {
        Assembly {
            kind,
            buf: Vec::new(),
        }
    }

    /// Whether `more` bytes may still come (an announced size or the next piece).
    fn admit(&self, more: usize) -> Result<(), Rejected> {
        let limit = self.kind.limit();
        if self.buf.len().saturating_add(more) > limit {
            Err(Rejected::TooLarge { limit })
        } else {
            Ok(())
        }
    }

    fn push(&mut self, piece: &[u8]) -> Result<(), Rejected> {
        self.admit(piece.len())?;
        self.buf.extend_from_slice(piece);
        Ok(())
    }

    fn finish(self) -> Result<ClipContent, Rejected> {
        decode(self.kind, self.buf)
    }
}

/// The content of a complete target.
fn decode(kind: Kind, mut bytes: Vec<u8>) -> Result<ClipContent, Rejected> {
    let limit = kind.limit();
    if bytes.len() > limit {
        return Err(Rejected::TooLarge { limit });
    }
    let text = match kind {
        Kind::Png => {
            return if bytes.starts_with(&PNG_SIGNATURE) {
                Ok(ClipContent::Png(bytes))
            } else {
                Err(Rejected::NotPng)
            };
        }
        Kind::Utf8 => {
            while bytes.last() == Some(&0) {
                bytes.pop();
            }
            match String::from_utf8(bytes) {
                Ok(s) => s,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            }
        }
        Kind::Latin1 => bytes
            .iter()
            .take_while(|&&b| b != 0)
            .map(|&b| char::from(b))
            .collect(),
    };
    if text.is_empty() {
        Err(Rejected::Empty)
    } else if text.len() > limit {
        // Repaired UTF-8 or Latin-1 made longer in UTF-8.
        Err(Rejected::TooLarge { limit })
    } else {
        Ok(ClipContent::Text(text))
    }
}

/// Text as Latin-1 (the `STRING` target), `?` for characters outside it.
fn to_latin1(utf8: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(utf8)
        .chars()
        .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
        .collect()
}

/// The answer to a `SelectionRequest` for `target`.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Refuse,
    Atoms(Vec<Atom>),
    Timestamp(Timestamp),
    Data { type_: Atom, bytes: Arc<[u8]> },
}

fn targets_of(payload: &Payload, atoms: &Atoms) -> Vec<Atom> {
    let mut t = vec![atoms.TARGETS, atoms.TIMESTAMP];
    match payload {
        Payload::Text(_) => t.extend([
            atoms.UTF8_STRING,
            atoms.TEXT_PLAIN_UTF8,
            atoms.TEXT_PLAIN,
            atoms.TEXT,
            STRING,
        ]),
        Payload::Png(_) => t.push(atoms.IMAGE_PNG),
    }
    t
}

fn answer(payload: &Payload, time: Timestamp, target: Atom, atoms: &Atoms) -> Answer {
    if target == atoms.TARGETS {
        return Answer::Atoms(targets_of(payload, atoms));
    }
    if target == atoms.TIMESTAMP {
        return Answer::Timestamp(time);
    }
    match payload {
        Payload::Text(b) => {
            if target == atoms.UTF8_STRING
                || target == atoms.TEXT_PLAIN_UTF8
                || target == atoms.TEXT_PLAIN
            {
                Answer::Data {
                    type_: target,
                    bytes: b.clone(),
                }
            } else if target == atoms.TEXT {
                Answer::Data {
                    type_: atoms.UTF8_STRING,
                    bytes: b.clone(),
                }
            } else if target == STRING {
                Answer::Data {
                    type_: STRING,
                    bytes: to_latin1(b).into(),
                }
            } else {
                Answer::Refuse
            }
        }
        Payload::Png(b) if target == atoms.IMAGE_PNG => Answer::Data {
            type_: atoms.IMAGE_PNG,
            bytes: b.clone(),
        },
        Payload::Png(_) => Answer::Refuse,
    }
}

/// Above how many bytes data is served with `INCR`, and the size of its pieces.
fn incr_threshold(maximum_request_bytes: usize) -> usize {
    INCR_ABOVE.min(
        maximum_request_bytes
            .saturating_sub(REQUEST_MARGIN)
            .max(4096),
    )
}

/// An `INCR` transfer to one requestor.
struct Transfer {
    requestor: Window,
    property: Atom,
    type_: Atom,
    data: Arc<[u8]>,
    offset: usize,
    deadline: Instant,
}

impl Transfer {
    /// The next piece to write once the requestor deleted the property, and whether it is the
    /// final, empty one.
    fn next_piece(&mut self, chunk: usize) -> (Range<usize>, bool) {
        let start = self.offset;
        let end = start.saturating_add(chunk).min(self.data.len());
        self.offset = end;
        (start..end, start == end)
    }
}

/// The properties of our window that conversions go to, used in turn; one that an owner may
/// still write into (a read abandoned half-way) is skipped for [`QUARANTINE`], so that the
/// late writes of an old owner cannot mix with the answer of a new one.
struct Properties {
    atoms: [Atom; 4],
    free_at: [Option<Instant>; 4],
    next: usize,
}

/// How long a property of an abandoned read is not used.
const QUARANTINE: Duration = Duration::from_secs(60);

impl Properties {
    fn new(atoms: [Atom; 4]) -> Properties {
        Properties {
            atoms,
            free_at: [None; 4],
            next: 0,
        }
    }

    /// The next free property (or, if all are quarantined, the one free soonest).
    fn pick(&mut self, now: Instant) -> Atom {
        let n = self.atoms.len();
        let free = (0..n)
            .map(|k| (self.next + k) % n)
            .find(|&i| self.free_at[i].is_none_or(|t| t <= now));
        let i = free.unwrap_or_else(|| {
            (0..n)
                .min_by_key(|&i| self.free_at[i].unwrap_or(now))
                .unwrap_or(0)
        });
        self.free_at[i] = None;
        self.next = (i + 1) % n;
        self.atoms[i]
    }

    fn quarantine(&mut self, property: Atom, now: Instant) {
        if let Some(i) = self.atoms.iter().position(|&a| a == property) {
            self.free_at[i] = Some(now + QUARANTINE);
        }
    }
}

/// What the clipboard currently serves.
struct Owned {
    time: Timestamp,
    payload: Payload,
}

/// A `set` waiting for a server timestamp.
struct PendingSet {
    payload: Payload,
    reply: SyncSender<Result<(), ClipboardError>>,
    deadline: Instant,
}

/// A read of the clipboard from another owner.
struct ReadState {
    /// The owner's selection time, used as the conversion time.
    time: Timestamp,
    property: Atom,
    stage: Stage,
    deadline: Instant,
    give_up: Instant,
}

enum Stage {
    Targets,
    Convert { target: Atom, kind: Kind },
    Incr(Assembly),
}

/// The clipboard's thread, with its connection and window.
struct Worker {
    conn: RustConnection,
    display: String,
    atoms: Atoms,
    window: Window,
    incr_threshold: usize,
    cmds: Receiver<Cmd>,
    wake: UnixStream,
    out: mpsc::Sender<ClipContent>,
    owned: Option<Owned>,
    pending_set: Option<PendingSet>,
    read: Option<ReadState>,
    properties: Properties,
    transfers: Vec<Transfer>,
    unsent: Option<ClipContent>,
    hasher: RandomState,
    /// Fingerprint of what we last set, until something different was reported.
    echo_guard: Option<u64>,
}

type Fatal = ReplyOrIdError;

impl Worker {
    fn create(
        display: Option<&str>,
        cmds: Receiver<Cmd>,
        wake: UnixStream,
        out: mpsc::Sender<ClipContent>,
    ) -> Result<Worker, ClipboardError> {
        let display_name = match display {
            Some(d) => d.to_owned(),
            None => std::env::var("DISPLAY").unwrap_or_else(|_| "($DISPLAY is not set)".into()),
        };
        let (conn, screen_num) =
            RustConnection::connect(display).map_err(|source| ClipboardError::Connect {
                display: display_name.clone(),
                source,
            })?;
        let fail = |action: &'static str| {
            let display = display_name.clone();
            move |source: ReplyOrIdError| ClipboardError::Request {
                display,
                action,
                source,
            }
        };
        let root = conn
            .setup()
            .roots
            .get(screen_num)
            .map(|s| s.root)
            .ok_or_else(|| ClipboardError::NoScreen {
                display: display_name.clone(),
                screen: screen_num,
            })?;
        let has_xfixes = conn
            .extension_information(xfixes::X11_EXTENSION_NAME)
            .map_err(ReplyOrIdError::from)
            .map_err(fail("look for XFIXES"))?
            .is_some();
        if !has_xfixes {
            return Err(ClipboardError::NoXfixes {
                display: display_name,
            });
        }
        conn.xfixes_query_version(5, 0)
            .map_err(ReplyOrIdError::from)
            .and_then(|c| c.reply().map_err(ReplyOrIdError::from))
            .map_err(fail("initialise XFIXES"))?;
        let atoms = Atoms::new(&conn)
            .map_err(ReplyOrIdError::from)
            .and_then(|c| c.reply().map_err(ReplyOrIdError::from))
            .map_err(fail("intern atoms"))?;
        let window = conn.generate_id().map_err(fail("allocate an X id"))?;
        conn.create_window(
            x11rb::COPY_DEPTH_FROM_PARENT,
            window,
            root,
            -10,
            -10,
            1,
            1,
            0,
            WindowClass::INPUT_ONLY,
            x11rb::COPY_FROM_PARENT,
            &CreateWindowAux::new().event_mask(EventMask::PROPERTY_CHANGE),
        )
        .map_err(ReplyOrIdError::from)
        .and_then(|c| c.check().map_err(ReplyOrIdError::from))
        .map_err(fail("create the clipboard window"))?;
        let _ = conn.change_property8(
            PropMode::REPLACE,
            window,
            AtomEnum::WM_NAME,
            AtomEnum::STRING,
            b"Tandem clipboard",
        );
        conn.xfixes_select_selection_input(
            window,
            atoms.CLIPBOARD,
            SelectionEventMask::SET_SELECTION_OWNER
                | SelectionEventMask::SELECTION_WINDOW_DESTROY
                | SelectionEventMask::SELECTION_CLIENT_CLOSE,
        )
        .map_err(ReplyOrIdError::from)
        .and_then(|c| c.check().map_err(ReplyOrIdError::from))
        .map_err(fail("follow the clipboard"))?;
        let incr_threshold = incr_threshold(conn.maximum_request_bytes());
        Ok(Worker {
            conn,
            display: display_name,
            atoms,
            window,
            incr_threshold,
            cmds,
            wake,
            out,
            owned: None,
            pending_set: None,
            read: None,
            properties: Properties::new([
                atoms.TANDEM_CLIP_0,
                atoms.TANDEM_CLIP_1,
                atoms.TANDEM_CLIP_2,
                atoms.TANDEM_CLIP_3,
            ]),
            transfers: Vec::new(),
            unsent: None,
            hasher: RandomState::new(),
            echo_guard: None,
        })
    }

    fn run(mut self) {
        if let Err(e) = self.serve() {
            tracing::warn!(
                display = %self.display,
                error = %e,
                "lost the X connection of the clipboard; the clipboard is no longer shared"
            );
        }
        self.close();
    }

    /// The loop: commands, X events, deadlines, until told to stop or the connection breaks.
    fn serve(&mut self) -> Result<(), Fatal> {
        loop {
            loop {
                match self.cmds.try_recv() {
                    Ok(Cmd::Set { payload, reply }) => self.begin_set(payload, reply)?,
                    Ok(Cmd::Stop) | Err(TryRecvError::Disconnected) => return Ok(()),
                    Err(TryRecvError::Empty) => break,
                }
            }
            while let Some(event) = self.conn.poll_for_event()? {
                self.event(event)?;
            }
            let now = Instant::now();
            self.expire(now);
            self.flush_report();
            self.conn.flush()?;
            // Flushing may have read events; poll(2) would not see those.
            if let Some(event) = self.conn.poll_for_event()? {
                self.event(event)?;
                continue;
            }
            let timeout = self.next_deadline(now).saturating_duration_since(now);
            self.sleep(timeout)?;
        }
    }

    /// Waits until the X connection or the wake-up socket is readable, or `timeout`.
    fn sleep(&self, timeout: Duration) -> Result<(), Fatal> {
        let timeout = Timespec::try_from(timeout).unwrap_or(Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        });
        let mut fds = [
            PollFd::new(self.conn.stream(), PollFlags::IN),
            PollFd::new(&self.wake, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(ConnectionError::IoError(e.into()).into()),
        }
        let mut buf = [0u8; 64];
        while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
        Ok(())
    }

    fn next_deadline(&self, now: Instant) -> Instant {
        let mut next = now + IDLE;
        if self.unsent.is_some() {
            next = next.min(now + RETRY_REPORT);
        }
        if let Some(r) = &self.read {
            next = next.min(r.deadline).min(r.give_up);
        }
        if let Some(p) = &self.pending_set {
            next = next.min(p.deadline);
        }
        for t in &self.transfers {
            next = next.min(t.deadline);
        }
        next
    }

    /// Handles one event; X errors in replies are not fatal (a client went away meanwhile).
    fn event(&mut self, event: Event) -> Result<(), Fatal> {
        let result = match event {
            Event::XfixesSelectionNotify(e) if e.selection == self.atoms.CLIPBOARD => {
                self.owner_changed(e.owner, e.selection_timestamp)
            }
            Event::SelectionNotify(e) if e.requestor == self.window => self.converted(&e),
            Event::PropertyNotify(e) => self.property_changed(&e),
            Event::SelectionRequest(e) => self.requested(&e),
            Event::SelectionClear(e) if e.selection == self.atoms.CLIPBOARD => self.cleared(),
            Event::Error(e) => {
                tracing::debug!(
                    error_kind = ?e.error_kind,
                    request = ?e.request_name,
                    "clipboard: X error (a requestor or owner went away?)"
                );
                Ok(())
            }
            _ => Ok(()),
        };
        match result {
            Err(ReplyOrIdError::X11Error(e)) => {
                tracing::debug!(
                    error_kind = ?e.error_kind,
                    request = ?e.request_name,
                    "clipboard: X error (a requestor or owner went away?)"
                );
                Ok(())
            }
            other => other,
        }
    }

    // ---- Reading the clipboard of other clients ----

    fn owner_changed(&mut self, owner: Window, time: Timestamp) -> Result<(), Fatal> {
        if self.read.is_some() {
            tracing::debug!("clipboard: the owner changed during a read; the newest wins");
            self.abandon_read();
        }
        if owner == self.window || owner == NONE {
            // Ours (from `set`): no echo. None: the owner went away, nothing to read.
            return Ok(());
        }
        let now = Instant::now();
        let property = self.properties.pick(now);
        self.conn.delete_property(self.window, property)?;
        self.conn.convert_selection(
            self.window,
            self.atoms.CLIPBOARD,
            self.atoms.TARGETS,
            property,
            time,
        )?;
        self.read = Some(ReadState {
            time,
            property,
            stage: Stage::Targets,
            deadline: now + CONVERT_TIMEOUT,
            give_up: now + READ_TIMEOUT,
        });
        Ok(())
    }

    /// The answer of an owner to one of our conversions.
    fn converted(&mut self, e: &SelectionNotifyEvent) -> Result<(), Fatal> {
        let Some(read) = self.read.as_mut() else {
            return Ok(());
        };
        if e.selection != self.atoms.CLIPBOARD || (e.time != read.time && e.time != CURRENT_TIME) {
            return Ok(()); // a late answer to an earlier read
        }
        let expected = match read.stage {
            Stage::Targets => self.atoms.TARGETS,
            Stage::Convert { target, .. } => target,
            Stage::Incr(_) => return Ok(()),
        };
        if e.target != expected {
            return Ok(());
        }
        let (property, time) = (read.property, read.time);
        if e.property != property {
            // Refused (NONE), or an owner that wrote elsewhere: treated alike.
            if expected == self.atoms.TARGETS {
                tracing::debug!("clipboard: the owner refused TARGETS; asking for UTF8_STRING");
                self.convert(property, time, self.atoms.UTF8_STRING, Kind::Utf8)?;
            } else {
                tracing::debug!("clipboard: the owner refused the conversion; nothing read");
                self.read = None;
            }
            return Ok(());
        }
        match read.stage {
            Stage::Targets => {
                let (_, size) = self.property_header(property)?;
                if size > MAX_TARGETS_BYTES {
                    tracing::debug!(size, "clipboard: TARGETS list too long; nothing read");
                    self.read = None;
                    return Ok(());
                }
                let reply = self.take_property(property, size)?;
                let offered: Vec<Atom> = reply.value32().map(|v| v.collect()).unwrap_or_default();
                match choose_target(&offered, &self.atoms) {
                    Some((target, kind)) => self.convert(property, time, target, kind)?,
                    None => {
                        tracing::debug!(
                            targets = offered.len(),
                            "clipboard: no text or PNG target offered; nothing read"
                        );
                        self.read = None;
                    }
                }
            }
            Stage::Convert { kind, .. } => {
                let (type_, size) = self.property_header(property)?;
                let assembly = Assembly::new(kind);
                if type_ == self.atoms.INCR {
                    let announced = self
                        .conn
                        .get_property(false, self.window, property, AtomEnum::ANY, 0, 1)?
                        .reply()?
                        .value32()
                        .and_then(|mut v| v.next())
                        .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX));
                    if let Err(why) = assembly.admit(announced) {
                        // The property is left alone: deleting it would ask for the first piece.
                        self.abandon_read();
                        self.rejected(why, announced);
                        return Ok(());
                    }
                    // Deleting the property starts the transfer.
                    self.conn.delete_property(self.window, property)?;
                    if let Some(read) = self.read.as_mut() {
                        read.stage = Stage::Incr(assembly);
                        read.deadline = Instant::now() + CONVERT_TIMEOUT;
                    }
                } else {
                    if let Err(why) = assembly.admit(size) {
                        self.conn.delete_property(self.window, property)?;
                        self.rejected(why, size);
                        return Ok(());
                    }
                    let reply = self.take_property(property, size)?;
                    self.read = None;
                    match decode(kind, reply.value) {
                        Ok(c) => self.report(c),
                        Err(why) => self.rejected(why, size),
                    }
                }
            }
            Stage::Incr(_) => {}
        }
        Ok(())
    }

    fn convert(
        &mut self,
        property: Atom,
        time: Timestamp,
        target: Atom,
        kind: Kind,
    ) -> Result<(), Fatal> {
        self.conn
            .convert_selection(self.window, self.atoms.CLIPBOARD, target, property, time)?;
        if let Some(read) = self.read.as_mut() {
            read.stage = Stage::Convert { target, kind };
            read.deadline = Instant::now() + CONVERT_TIMEOUT;
        }
        Ok(())
    }

    /// The next `INCR` piece on our window.
    fn incr_piece(&mut self, property: Atom) -> Result<(), Fatal> {
        let Some(read) = self.read.as_ref() else {
            return Ok(());
        };
        let Stage::Incr(assembly) = &read.stage else {
            return Ok(());
        };
        if read.property != property {
            return Ok(());
        }
        let (_, size) = self.property_header(property)?;
        if let Err(why) = assembly.admit(size) {
            let got = assembly.buf.len();
            self.abandon_read();
            self.rejected(why, got.saturating_add(size));
            return Ok(());
        }
        // Reading with delete asks the owner for the next piece.
        let reply = self.take_property(property, size)?;
        let Some(mut read) = self.read.take() else {
            return Ok(());
        };
        let Stage::Incr(mut assembly) = std::mem::replace(&mut read.stage, Stage::Targets) else {
            return Ok(());
        };
        if reply.value.is_empty() {
            let len = assembly.buf.len();
            match assembly.finish() {
                Ok(c) => self.report(c),
                Err(why) => self.rejected(why, len),
            }
            return Ok(());
        }
        if let Err(why) = assembly.push(&reply.value) {
            self.properties.quarantine(read.property, Instant::now());
            self.rejected(why, assembly.buf.len().saturating_add(reply.value.len()));
            return Ok(());
        }
        read.stage = Stage::Incr(assembly);
        read.deadline = Instant::now() + CONVERT_TIMEOUT;
        self.read = Some(read);
        Ok(())
    }

    /// Ends a read before the owner has finished: the owner may still write into the property
    /// (an `INCR` owner waiting for a deletion, a late answer), so it is not used for a while.
    fn abandon_read(&mut self) {
        if let Some(read) = self.read.take() {
            self.properties.quarantine(read.property, Instant::now());
        }
    }

    fn rejected(&mut self, why: Rejected, size: usize) {
        self.read = None;
        match why {
            Rejected::TooLarge { limit } => {
                tracing::debug!(size, limit, "clipboard: content over the limit; not shared")
            }
            Rejected::NotPng => {
                tracing::debug!(size, "clipboard: image/png data is not a PNG; not shared")
            }
            Rejected::Empty => tracing::debug!("clipboard: empty content; not shared"),
        }
    }

    /// The type and size in bytes of a property of our window.
    fn property_header(&self, property: Atom) -> Result<(Atom, usize), Fatal> {
        let r = self
            .conn
            .get_property(false, self.window, property, AtomEnum::ANY, 0, 0)?
            .reply()?;
        Ok((
            r.type_,
            usize::try_from(r.bytes_after).unwrap_or(usize::MAX),
        ))
    }

    /// Reads (at least `size` bytes of) a property of our window and deletes it.
    fn take_property(&self, property: Atom, size: usize) -> Result<GetPropertyReply, Fatal> {
        let longs = u32::try_from(size.div_ceil(4)).unwrap_or(u32::MAX / 4);
        let reply = self
            .conn
            .get_property(true, self.window, property, AtomEnum::ANY, 0, longs)?
            .reply()?;
        if reply.bytes_after > 0 {
            // Grew meanwhile: not deleted by the server; do it ourselves.
            self.conn.delete_property(self.window, property)?;
        }
        Ok(reply)
    }

    fn report(&mut self, c: ClipContent) {
        let print = fingerprint(&c, &self.hasher);
        if self.echo_guard == Some(print) {
            tracing::debug!(
                "clipboard: another client serves what we set (a clipboard manager?); not echoed"
            );
            return;
        }
        self.echo_guard = None;
        tracing::debug!(content = ?c, "clipboard: changed by another client");
        self.unsent = Some(c);
        self.flush_report();
    }

    fn flush_report(&mut self) {
        let Some(c) = self.unsent.take() else {
            return;
        };
        match self.out.try_send(c) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(c)) => self.unsent = Some(c),
        }
    }

    // ---- Owning the clipboard ----

    fn begin_set(
        &mut self,
        payload: Payload,
        reply: SyncSender<Result<(), ClipboardError>>,
    ) -> Result<(), Fatal> {
        if let Some(older) = self.pending_set.take() {
            // Superseded before it took effect: newest wins.
            let _ = older.reply.send(Ok(()));
        }
        // A zero-length append: the PropertyNotify carries the server's time.
        self.conn.change_property8(
            PropMode::APPEND,
            self.window,
            self.atoms.TANDEM_TIME,
            AtomEnum::STRING,
            &[],
        )?;
        self.pending_set = Some(PendingSet {
            payload,
            reply,
            deadline: Instant::now() + CONVERT_TIMEOUT,
        });
        Ok(())
    }

    fn take_ownership(&mut self, time: Timestamp) -> Result<(), Fatal> {
        let Some(p) = self.pending_set.take() else {
            return Ok(());
        };
        self.conn
            .set_selection_owner(self.window, self.atoms.CLIPBOARD, time)?;
        let owner = self
            .conn
            .get_selection_owner(self.atoms.CLIPBOARD)?
            .reply()?
            .owner;
        if owner == self.window {
            self.echo_guard = Some(p.payload.fingerprint(&self.hasher));
            self.owned = Some(Owned {
                time,
                payload: p.payload,
            });
            let _ = p.reply.send(Ok(()));
        } else {
            let _ = p.reply.send(Err(ClipboardError::NotOwner));
        }
        Ok(())
    }

    fn cleared(&mut self) -> Result<(), Fatal> {
        let owner = self
            .conn
            .get_selection_owner(self.atoms.CLIPBOARD)?
            .reply()?
            .owner;
        if owner != self.window && self.owned.take().is_some() {
            tracing::debug!("clipboard: another client took the clipboard; content dropped");
        }
        Ok(())
    }

    fn property_changed(&mut self, e: &PropertyNotifyEvent) -> Result<(), Fatal> {
        if e.window == self.window {
            if e.state != Property::NEW_VALUE {
                return Ok(());
            }
            if e.atom == self.atoms.TANDEM_TIME {
                return self.take_ownership(e.time);
            }
            return self.incr_piece(e.atom);
        }
        if e.state != Property::DELETE {
            return Ok(());
        }
        let Some(i) = self
            .transfers
            .iter()
            .position(|t| t.requestor == e.window && t.property == e.atom)
        else {
            return Ok(());
        };
        let chunk = self.incr_threshold;
        let t = &mut self.transfers[i];
        let (range, last) = t.next_piece(chunk);
        t.deadline = Instant::now() + CONVERT_TIMEOUT;
        let (requestor, property, type_) = (t.requestor, t.property, t.type_);
        let piece = t.data.get(range).unwrap_or(&[]);
        self.conn
            .change_property8(PropMode::REPLACE, requestor, property, type_, piece)?;
        if last {
            self.end_transfer(i)?;
        }
        Ok(())
    }

    fn end_transfer(&mut self, i: usize) -> Result<(), Fatal> {
        let t = self.transfers.swap_remove(i);
        if !self.transfers.iter().any(|o| o.requestor == t.requestor) {
            self.conn.change_window_attributes(
                t.requestor,
                &ChangeWindowAttributesAux::new().event_mask(EventMask::NO_EVENT),
            )?;
        }
        Ok(())
    }

    // ---- Serving ----

    fn requested(&mut self, e: &SelectionRequestEvent) -> Result<(), Fatal> {
        // ICCCM: a NONE property comes from an obsolete client; use the target's name.
        let property = if e.property == NONE {
            e.target
        } else {
            e.property
        };
        let reply = match &self.owned {
            Some(o) if e.selection == self.atoms.CLIPBOARD && e.owner == self.window => {
                answer(&o.payload, o.time, e.target, &self.atoms)
            }
            _ => Answer::Refuse,
        };
        let ok = match reply {
            Answer::Refuse => false,
            Answer::Atoms(list) => {
                self.conn.change_property32(
                    PropMode::REPLACE,
                    e.requestor,
                    property,
                    ATOM,
                    &list,
                )?;
                true
            }
            Answer::Timestamp(t) => {
                self.conn.change_property32(
                    PropMode::REPLACE,
                    e.requestor,
                    property,
                    INTEGER,
                    &[t],
                )?;
                true
            }
            Answer::Data { type_, bytes } if bytes.len() <= self.incr_threshold => {
                self.conn.change_property8(
                    PropMode::REPLACE,
                    e.requestor,
                    property,
                    type_,
                    &bytes,
                )?;
                true
            }
            Answer::Data { type_, bytes } => {
                self.start_transfer(e.requestor, property, type_, bytes)?
            }
        };
        let notify = SelectionNotifyEvent {
            response_type: SELECTION_NOTIFY_EVENT,
            sequence: 0,
            time: e.time,
            requestor: e.requestor,
            selection: e.selection,
            target: e.target,
            property: if ok { property } else { NONE },
        };
        self.conn
            .send_event(false, e.requestor, EventMask::NO_EVENT, notify)?;
        Ok(())
    }

    fn start_transfer(
        &mut self,
        requestor: Window,
        property: Atom,
        type_: Atom,
        data: Arc<[u8]>,
    ) -> Result<bool, Fatal> {
        if let Some(i) = self
            .transfers
            .iter()
            .position(|t| t.requestor == requestor && t.property == property)
        {
            self.transfers.swap_remove(i);
        }
        if self.transfers.len() >= MAX_TRANSFERS {
            tracing::debug!("clipboard: too many transfers at once; request refused");
            return Ok(false);
        }
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        // Follow the requestor's deletions before it can see the INCR property.
        self.conn.change_window_attributes(
            requestor,
            &ChangeWindowAttributesAux::new().event_mask(EventMask::PROPERTY_CHANGE),
        )?;
        self.conn.change_property32(
            PropMode::REPLACE,
            requestor,
            property,
            self.atoms.INCR,
            &[len],
        )?;
        tracing::debug!(size = data.len(), "clipboard: serving with INCR");
        self.transfers.push(Transfer {
            requestor,
            property,
            type_,
            data,
            offset: 0,
            deadline: Instant::now() + CONVERT_TIMEOUT,
        });
        Ok(true)
    }

    // ---- Time and the end ----

    fn expire(&mut self, now: Instant) {
        if let Some(r) = &self.read
            && (r.deadline <= now || r.give_up <= now)
        {
            tracing::debug!("clipboard: the owner did not answer in time; nothing read");
            self.abandon_read();
        }
        if let Some(p) = self.pending_set.take() {
            if p.deadline <= now {
                let _ = p.reply.send(Err(ClipboardError::Timeout(CONVERT_TIMEOUT)));
            } else {
                self.pending_set = Some(p);
            }
        }
        let mut i = 0;
        while i < self.transfers.len() {
            if self.transfers[i].deadline <= now {
                tracing::debug!("clipboard: a requestor stopped taking INCR pieces; abandoned");
                // Errors here surface as X error events (the requestor is gone, probably).
                if self.end_transfer(i).is_err() {
                    return;
                }
            } else {
                i += 1;
            }
        }
    }

    /// Gives up the ownership and the window; the content is dropped with `self`.
    fn close(mut self) {
        self.owned = None;
        self.transfers.clear();
        self.unsent = None;
        if let Some(p) = self.pending_set.take() {
            let _ = p.reply.send(Err(ClipboardError::Stopped));
        }
        let ours = self
            .conn
            .get_selection_owner(self.atoms.CLIPBOARD)
            .map_err(ReplyError::from)
            .and_then(|c| c.reply())
            .is_ok_and(|r| r.owner == self.window);
        if ours {
            let _ = self
                .conn
                .set_selection_owner(NONE, self.atoms.CLIPBOARD, CURRENT_TIME);
        }
        let _ = self.conn.destroy_window(self.window);
        let _ = self.conn.sync();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn atoms() -> Atoms {
        Atoms {
            CLIPBOARD: 100,
            TARGETS: 101,
            TIMESTAMP: 102,
            MULTIPLE: 103,
            INCR: 104,
            UTF8_STRING: 105,
            TEXT: 106,
            TEXT_PLAIN_UTF8: 107,
            TEXT_PLAIN: 108,
            IMAGE_PNG: 109,
            TANDEM_CLIP_0: 110,
            TANDEM_CLIP_1: 111,
            TANDEM_CLIP_2: 112,
            TANDEM_CLIP_3: 113,
            TANDEM_TIME: 114,
        }
    }

    fn png(extra: usize) -> Vec<u8> {
        let mut p = PNG_SIGNATURE.to_vec();
        p.resize(8 + extra, 7);
        p
    }

    #[test]
    fn target_choice_prefers_utf8_text_then_png() {
        let a = atoms();
        let pick = |offered: &[Atom]| choose_target(offered, &a);
        assert_eq!(
            pick(&[a.TARGETS, STRING, a.UTF8_STRING, a.IMAGE_PNG]),
            Some((a.UTF8_STRING, Kind::Utf8))
        );
        assert_eq!(
            pick(&[a.TEXT_PLAIN_UTF8, a.IMAGE_PNG]),
            Some((a.TEXT_PLAIN_UTF8, Kind::Utf8))
        );
        assert_eq!(pick(&[STRING]), Some((STRING, Kind::Latin1)));
        assert_eq!(pick(&[a.IMAGE_PNG, STRING]), Some((STRING, Kind::Latin1)));
        assert_eq!(
            pick(&[a.TARGETS, a.TIMESTAMP, a.IMAGE_PNG]),
            Some((a.IMAGE_PNG, Kind::Png))
        );
        assert_eq!(pick(&[a.TARGETS, a.TEXT_PLAIN, 999]), None);
        assert_eq!(pick(&[]), None);
    }

    #[test]
    fn assembly_enforces_the_limits_while_reading() {
        let mut t = Assembly::new(Kind::Utf8);
        assert_eq!(
            t.admit(MAX_TEXT + 1),
            Err(Rejected::TooLarge { limit: MAX_TEXT })
        );
        t.push(&vec![b'a'; MAX_TEXT - 10]).unwrap();
        t.push(&[b'b'; 10]).unwrap();
        assert_eq!(t.push(b"c"), Err(Rejected::TooLarge { limit: MAX_TEXT }));
        let ClipContent::Text(s) = t.finish().unwrap() else {
            panic!("not text")
        };
        assert_eq!(s.len(), MAX_TEXT);

        let mut i = Assembly::new(Kind::Png);
        i.push(&png(100)).unwrap();
        assert!(i.admit(MAX_IMAGE).is_err());
        i.push(&[1; 1000]).unwrap();
        assert_eq!(
            i.finish(),
            Ok(ClipContent::Png({
                let mut p = png(100);
                p.extend([1; 1000]);
                p
            }))
        );
    }

    #[test]
    fn decoding_checks_png_and_repairs_text() {
        assert_eq!(
            decode(Kind::Png, b"GIF89a....".to_vec()),
            Err(Rejected::NotPng)
        );
        assert_eq!(decode(Kind::Png, png(0)), Ok(ClipContent::Png(png(0))));
        assert_eq!(
            decode(Kind::Utf8, b"caf\xc3\xa9\0\0".to_vec()),
            Ok(ClipContent::Text("café".into()))
        );
        assert_eq!(
            decode(Kind::Utf8, b"a\xffb".to_vec()),
            Ok(ClipContent::Text("a\u{fffd}b".into()))
        );
        assert_eq!(
            decode(Kind::Latin1, b"caf\xe9".to_vec()),
            Ok(ClipContent::Text("café".into()))
        );
        assert_eq!(decode(Kind::Utf8, Vec::new()), Err(Rejected::Empty));
        assert_eq!(decode(Kind::Utf8, vec![0]), Err(Rejected::Empty));
        // Latin-1 that grows past the limit in UTF-8.
        assert_eq!(
            decode(Kind::Latin1, vec![0xe9; MAX_TEXT]),
            Err(Rejected::TooLarge { limit: MAX_TEXT })
        );
        assert_eq!(
            decode(Kind::Utf8, vec![b'x'; MAX_TEXT + 1]),
            Err(Rejected::TooLarge { limit: MAX_TEXT })
        );
    }

    #[test]
    fn answers_for_text() {
        let a = atoms();
        let p = Payload::new(ClipContent::Text("café ✓".into())).unwrap();
        let Answer::Atoms(targets) = answer(&p, 42, a.TARGETS, &a) else {
            panic!("no targets")
        };
        for t in [
            a.TARGETS,
            a.TIMESTAMP,
            a.UTF8_STRING,
            a.TEXT_PLAIN_UTF8,
            a.TEXT_PLAIN,
            a.TEXT,
            STRING,
        ] {
            assert!(targets.contains(&t));
        }
        assert!(!targets.contains(&a.IMAGE_PNG));
        assert_eq!(answer(&p, 42, a.TIMESTAMP, &a), Answer::Timestamp(42));
        let utf8: Arc<[u8]> = "café ✓".as_bytes().into();
        assert_eq!(
            answer(&p, 42, a.UTF8_STRING, &a),
            Answer::Data {
                type_: a.UTF8_STRING,
                bytes: utf8.clone()
            }
        );
        assert_eq!(
            answer(&p, 42, a.TEXT, &a),
            Answer::Data {
                type_: a.UTF8_STRING,
                bytes: utf8.clone()
            }
        );
        assert_eq!(
            answer(&p, 42, a.TEXT_PLAIN_UTF8, &a),
            Answer::Data {
                type_: a.TEXT_PLAIN_UTF8,
                bytes: utf8
            }
        );
        assert_eq!(
            answer(&p, 42, STRING, &a),
            Answer::Data {
                type_: STRING,
                bytes: b"caf\xe9 ?".to_vec().into()
            }
        );
        assert_eq!(answer(&p, 42, a.IMAGE_PNG, &a), Answer::Refuse);
        assert_eq!(answer(&p, 42, a.MULTIPLE, &a), Answer::Refuse);
        assert_eq!(answer(&p, 42, 9999, &a), Answer::Refuse);
    }

    #[test]
    fn answers_for_png() {
        let a = atoms();
        let p = Payload::new(ClipContent::Png(png(10))).unwrap();
        assert_eq!(
            answer(&p, 1, a.TARGETS, &a),
            Answer::Atoms(vec![a.TARGETS, a.TIMESTAMP, a.IMAGE_PNG])
        );
        assert_eq!(
            answer(&p, 1, a.IMAGE_PNG, &a),
            Answer::Data {
                type_: a.IMAGE_PNG,
                bytes: png(10).into()
            }
        );
        assert_eq!(answer(&p, 1, a.UTF8_STRING, &a), Answer::Refuse);
        assert_eq!(answer(&p, 1, STRING, &a), Answer::Refuse);
    }

    #[test]
    fn set_validates_content() {
        assert!(matches!(
            Payload::new(ClipContent::Text("x".repeat(MAX_TEXT + 1))),
            Err(ClipboardError::TooLarge { .. })
        ));
        assert!(Payload::new(ClipContent::Text("x".repeat(MAX_TEXT))).is_ok());
        assert!(matches!(
            Payload::new(ClipContent::Png(b"not a png".to_vec())),
            Err(ClipboardError::NotPng)
        ));
        assert!(matches!(
            Payload::new(ClipContent::Png(png(MAX_IMAGE))),
            Err(ClipboardError::TooLarge { .. })
        ));
        assert!(Payload::new(ClipContent::Png(png(MAX_IMAGE - 8))).is_ok());
    }

    #[test]
    fn incr_pieces_end_with_an_empty_one() {
        assert_eq!(incr_threshold(16 << 20), 256 << 10);
        assert_eq!(incr_threshold(256 << 10), (256 << 10) - REQUEST_MARGIN);
        let chunk = 256 << 10;
        let mut t = Transfer {
            requestor: 1,
            property: 2,
            type_: 3,
            data: vec![0u8; 600 << 10].into(),
            offset: 0,
            deadline: Instant::now(),
        };
        assert_eq!(t.next_piece(chunk), (0..chunk, false));
        assert_eq!(t.next_piece(chunk), (chunk..2 * chunk, false));
        assert_eq!(t.next_piece(chunk), (2 * chunk..600 << 10, false));
        assert_eq!(t.next_piece(chunk), (600 << 10..600 << 10, true));
    }

    #[test]
    fn properties_of_abandoned_reads_rest() {
        let now = Instant::now();
        let mut p = Properties::new([1, 2, 3, 4]);
        assert_eq!(p.pick(now), 1);
        assert_eq!(p.pick(now), 2);
        p.quarantine(3, now);
        assert_eq!(p.pick(now), 4);
        assert_eq!(p.pick(now), 1);
        assert_eq!(p.pick(now), 2);
        assert_eq!(p.pick(now), 4);
        for a in [1, 2, 4] {
            p.quarantine(a, now + Duration::from_secs(1));
        }
        assert_eq!(p.pick(now), 3, "all resting: the one free soonest");
        assert_eq!(p.pick(now + QUARANTINE), 3, "the only one free");
        assert_eq!(p.pick(now + QUARANTINE + Duration::from_secs(2)), 4);
    }

    #[test]
    fn predefined_atoms() {
        assert_eq!(STRING, u32::from(AtomEnum::STRING));
        assert_eq!(ATOM, u32::from(AtomEnum::ATOM));
        assert_eq!(INTEGER, u32::from(AtomEnum::INTEGER));
    }

    #[test]
    fn latin1_and_debug_hide_nothing_but_content() {
        assert_eq!(to_latin1("añ€".as_bytes()), b"a\xf1?".to_vec());
        let shown = format!("{:?}", ClipContent::Text("secret password".into()));
        assert!(!shown.contains("secret"));
        assert_eq!(shown, "Text(15 bytes)");
    }
}
