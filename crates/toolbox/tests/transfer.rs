//! End-to-end transfers over in-memory streams (`tokio::io::duplex`), with hostile peers.

#![allow(clippy::unwrap_used)]

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};
use tandem_toolbox::{
    DEFAULT_CHUNK_SIZE, Inbox, InboxOptions, NameError, Outgoing, Party, Progress, Refusal,
    SendOptions, Stage, TransferError, plan, receive_file, refuse, send_file,
};
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf, ReadHalf, WriteHalf,
};
use tokio_util::sync::CancellationToken;

// ---------- helpers ----------

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

type Half = (ReadHalf<DuplexStream>, WriteHalf<DuplexStream>);

fn streams() -> (Half, Half) {
    let (a, b) = tokio::io::duplex(256 * 1024);
    (tokio::io::split(a), tokio::io::split(b))
}

fn source_file(dir: &Path, name: &str, len: usize, seed: u64) -> (Outgoing, Vec<u8>) {
    let data = random_bytes(len, seed);
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    (Outgoing::new(path, name, len as u64), data)
}

fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let rel = entry
                .path()
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                out.push(format!("{rel}/"));
                walk(base, &entry.path(), out);
            } else {
                out.push(rel);
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn inbox(dir: &Path) -> Inbox {
    Inbox::new(dir, InboxOptions::default()).unwrap()
}

/// Options that outlive the `join!`s below.
fn opts(chunk_size: u32) -> &'static SendOptions {
    Box::leak(Box::new(SendOptions {
        chunk_size,
        ..SendOptions::default()
    }))
}

/// Counts the bytes written through it.
struct Counting<W> {
    inner: W,
    count: Arc<AtomicU64>,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Counting<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.count.fetch_add(n as u64, Ordering::Relaxed);
        }
        poll
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What a [`Tap`] does at a byte position of the stream written through it.
#[derive(Clone)]
enum TapAction {
    /// Writes fail from there on (the connection breaks).
    Cut,
    /// That byte is flipped (corruption in transit).
    Flip,
    /// The token is cancelled once that many bytes went through.
    Cancel(CancellationToken),
}

/// A writer that acts at byte `at`.
struct Tap<W> {
    inner: W,
    at: u64,
    pos: u64,
    action: TapAction,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Tap<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let (pos, at) = (this.pos, this.at);
        let poll = match &this.action {
            TapAction::Cut if pos >= at => {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            TapAction::Cut => {
                let n = buf.len().min((at - pos) as usize);
                Pin::new(&mut this.inner).poll_write(cx, &buf[..n])
            }
            TapAction::Flip if pos <= at && at < pos + buf.len() as u64 => {
                let mut copy = buf.to_vec();
                copy[(at - pos) as usize] ^= 0x40;
                Pin::new(&mut this.inner).poll_write(cx, &copy)
            }
            _ => Pin::new(&mut this.inner).poll_write(cx, buf),
        };
        if let Poll::Ready(Ok(n)) = poll {
            this.pos += n as u64;
            if let TapAction::Cancel(token) = &this.action
                && this.pos >= at
            {
                token.cancel();
            }
        }
        poll
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A reader that cancels a token once `at` bytes were read through it.
struct CancelAfterRead<R> {
    inner: R,
    at: u64,
    pos: u64,
    token: CancellationToken,
}

impl<R: AsyncRead + Unpin> AsyncRead for CancelAfterRead<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.pos += (buf.filled().len() - before) as u64;
        if self.pos >= self.at {
            self.token.cancel();
        }
        poll
    }
}

/// Sends `item` and receives it into `inbox`, both over one duplex pair.
async fn transfer(
    item: &Outgoing,
    inbox: &Inbox,
    chunk: u32,
) -> (
    Result<tandem_toolbox::Sent, TransferError>,
    Result<tandem_toolbox::Received, TransferError>,
) {
    let ((sr, sw), (rr, rw)) = streams();
    let cancel = CancellationToken::new();
    tokio::join!(
        send_file(sr, sw, item, opts(chunk), |_: &Progress| {}, &cancel),
        receive_file(rr, rw, inbox, |_: &Progress| {}, &cancel),
    )
}

/// A sender speaking the wire format by hand, for hostile offers.
#[derive(Serialize)]
struct RawOffer {
    name: Vec<u8>,
    size: u64,
    hash: [u8; 32],
    chunk_size: u32,
}

#[derive(Debug, Deserialize)]
#[allow(
    dead_code,
    reason = "mirrors the wire enum; not every field is looked at"
)]
enum RawReply {
    Accept { offset: u64 },
    Refuse { reason: String },
    Cancel { reason: String },
    Done { name: String },
    Failed { reason: String },
}

fn raw_offer(offer: &RawOffer) -> Vec<u8> {
    let body = postcard::to_allocvec(offer).unwrap();
    let mut out = vec![tandem_toolbox::PROTOCOL_VERSION];
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// A chunk frame with the chunk's hash as the protocol defines it: its BLAKE3 chaining value at
/// its offset (the whole hash for a file of one chunk).
fn raw_chunk(offset: u64, data: &[u8], size: u64) -> Vec<u8> {
    use blake3::hazmat::HasherExt;
    let mut out = vec![b'C'];
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let hash = if offset == 0 && data.len() as u64 == size {
        *blake3::hash(data).as_bytes()
    } else {
        let mut h = blake3::Hasher::new();
        h.set_input_offset(offset);
        h.update(data);
        h.finalize_non_root()
    };
    out.extend_from_slice(&hash);
    out.extend_from_slice(data);
    out
}

async fn raw_reply<R: AsyncRead + Unpin>(r: &mut R) -> Option<RawReply> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    r.read_exact(&mut body).await.ok()?;
    postcard::from_bytes(&body).ok()
}

// ---------- tests ----------

#[tokio::test]
async fn round_trip_20_mb() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let (item, data) = source_file(src.path(), "data.bin", 20_000_000, 1);
    let inbox = inbox(dst.path());
    let ((sr, sw), (rr, rw)) = streams();
    let cancel = CancellationToken::new();
    let mut sent_reports = Vec::new();
    let mut recv_reports = Vec::new();
    let (sent, received) = tokio::join!(
        send_file(
            sr,
            sw,
            &item,
            opts(DEFAULT_CHUNK_SIZE),
            |p: &Progress| sent_reports.push(p.clone()),
            &cancel
        ),
        receive_file(
            rr,
            rw,
            &inbox,
            |p: &Progress| recv_reports.push(p.clone()),
            &cancel
        ),
    );
    let sent = sent.unwrap();
    let received = received.unwrap();
    assert_eq!(std::fs::read(&received.path).unwrap(), data);
    assert_eq!(received.path, dst.path().join("data.bin"));
    assert_eq!(received.name, "data.bin");
    assert_eq!(sent.receiver_name, "data.bin");
    assert_eq!(sent.hash, received.hash);
    assert_eq!(received.hash, blake3::hash(&data).to_hex().to_string());
    assert_eq!(
        (sent.bytes_sent, sent.resumed_from, received.resumed_from),
        (20_000_000, 0, 0)
    );
    assert_eq!(listing(dst.path()), ["data.bin"], "no partial left behind");
    assert_eq!(inbox.used(), 20_000_000);

    for reports in [&sent_reports, &recv_reports] {
        let last = reports.last().unwrap();
        assert_eq!(
            (last.stage, last.done, last.total),
            (Stage::Done, 20_000_000, 20_000_000)
        );
        assert!(
            reports
                .windows(2)
                .all(|w| w[0].done <= w[1].done || w[0].stage != w[1].stage)
        );
        assert_eq!(last.name, "data.bin");
    }
    assert_eq!(sent_reports[0].stage, Stage::Hashing);
    assert!(recv_reports.iter().any(|p| p.stage == Stage::Receiving));
}

#[tokio::test]
async fn empty_file_round_trip() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let (item, _) = source_file(src.path(), "empty.txt", 0, 1);
    let (sent, received) = transfer(&item, &inbox(dst.path()), 65536).await;
    assert_eq!(sent.unwrap().bytes_sent, 0);
    assert_eq!(std::fs::read(received.unwrap().path).unwrap(), b"");
    assert_eq!(listing(dst.path()), ["empty.txt"]);
}

#[tokio::test]
async fn resumes_after_the_stream_breaks_in_a_later_session() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let size = 4_000_000;
    let chunk = 64 * 1024;
    let (item, data) = source_file(src.path(), "big.iso", size, 2);

    // First session: the connection dies at about half.
    let first = inbox(dst.path());
    let ((sr, sw), (rr, rw)) = streams();
    let cancel = CancellationToken::new();
    let cut = Tap {
        inner: sw,
        at: size as u64 / 2,
        pos: 0,
        action: TapAction::Cut,
    };
    let (sent, received) = tokio::join!(
        send_file(sr, cut, &item, opts(chunk), |_: &Progress| {}, &cancel),
        receive_file(rr, rw, &first, |_: &Progress| {}, &cancel),
    );
    assert!(matches!(sent, Err(TransferError::Stream(_))), "{sent:?}");
    let err = received.unwrap_err();
    assert!(matches!(err, TransferError::Disconnected { .. }), "{err:?}");
    assert!(err.to_string().contains("resumes"), "{err}");
    let partial = listing(dst.path());
    assert_eq!(partial.len(), 1);
    assert!(
        partial[0].starts_with(".tandem-") && partial[0].ends_with(".part"),
        "{partial:?}"
    );
    let kept = std::fs::metadata(dst.path().join(&partial[0]))
        .unwrap()
        .len();
    assert!(kept > 0 && kept.is_multiple_of(u64::from(chunk)), "{kept}");
    assert_eq!(
        first.used(),
        kept,
        "kept bytes count against the session's quota"
    );

    // Second session (new Inbox): only the rest crosses.
    let second = inbox(dst.path());
    let ((sr, sw), (rr, rw)) = streams();
    let count = Arc::new(AtomicU64::new(0));
    let counting = Counting {
        inner: sw,
        count: Arc::clone(&count),
    };
    let mut resumed_report = None;
    let (sent, received) = tokio::join!(
        send_file(sr, counting, &item, opts(chunk), |_: &Progress| {}, &cancel),
        receive_file(
            rr,
            rw,
            &second,
            |p: &Progress| {
                resumed_report.get_or_insert(p.resumed_from);
            },
            &cancel
        ),
    );
    let sent = sent.unwrap();
    let received = received.unwrap();
    assert_eq!(sent.resumed_from, kept);
    assert_eq!(received.resumed_from, kept);
    assert_eq!(resumed_report, Some(kept));
    assert_eq!(sent.bytes_sent, size as u64 - kept);
    let on_wire = count.load(Ordering::Relaxed);
    let remainder = size as u64 - kept;
    assert!(
        on_wire >= remainder && on_wire < remainder + 8 * 1024,
        "{on_wire} bytes for {remainder}"
    );
    assert_eq!(std::fs::read(&received.path).unwrap(), data);
    assert_eq!(listing(dst.path()), ["big.iso"]);
}

#[tokio::test]
async fn a_corrupted_chunk_is_detected_and_the_partial_removed() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let (item, _) = source_file(src.path(), "f.bin", 1_000_000, 3);
    let ((sr, sw), (rr, rw)) = streams();
    let cancel = CancellationToken::new();
    // Well inside the data of the third 64 KiB chunk.
    let flip = Tap {
        inner: sw,
        at: 150_000,
        pos: 0,
        action: TapAction::Flip,
    };
    let inbox = inbox(dst.path());
    let (sent, received) = tokio::join!(
        send_file(sr, flip, &item, opts(65536), |_: &Progress| {}, &cancel),
        receive_file(rr, rw, &inbox, |_: &Progress| {}, &cancel),
    );
    let err = received.unwrap_err();
    assert!(
        matches!(err, TransferError::ChunkCorrupt { offset: 131_072 }),
        "{err:?}"
    );
    let err = sent.unwrap_err();
    assert!(
        matches!(&err, TransferError::PeerFailed(r) if r.contains("corrupted")),
        "{err:?}"
    );
    assert!(listing(dst.path()).is_empty());
}

#[tokio::test]
async fn a_file_that_changed_after_hashing_fails_verification() {
    // Whole-file verification: a sender whose chunks are self-consistent but not the offered file.
    let dst = tempfile::tempdir().unwrap();
    let inbox = inbox(dst.path());
    let ((mut sr, mut sw), (rr, rw)) = streams();
    let cancel = CancellationToken::new();
    let data = random_bytes(10_000, 4);
    let raw = async {
        let offer = RawOffer {
            name: b"x.bin".to_vec(),
            size: 10_000,
            hash: [7; 32],
            chunk_size: 4096,
        };
        sw.write_all(&raw_offer(&offer)).await.unwrap();
        assert!(matches!(
            raw_reply(&mut sr).await,
            Some(RawReply::Accept { offset: 0 })
        ));
        for offset in [0usize, 4096, 8192] {
            let end = (offset + 4096).min(10_000);
            sw.write_all(&raw_chunk(offset as u64, &data[offset..end], 10_000))
                .await
                .unwrap();
        }
        raw_reply(&mut sr).await
    };
    let (reply, received) = tokio::join!(
        raw,
        receive_file(rr, rw, &inbox, |_: &Progress| {}, &cancel)
    );
    assert!(
        matches!(received, Err(TransferError::HashMismatch { .. })),
        "{received:?}"
    );
    assert!(matches!(reply, Some(RawReply::Failed { reason }) if reason.contains("checksum")));
    assert!(listing(dst.path()).is_empty());
    assert_eq!(inbox.used(), 0);
}

#[tokio::test]
async fn the_sender_cancels() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let (item, _) = source_file(src.path(), "f.bin", 4_000_000, 5);
    let ((sr, sw), (rr, rw)) = streams();
    let cancel = CancellationToken::new();
    let never = CancellationToken::new();
    let tap = Tap {
        inner: sw,
        at: 1_000_000,
        pos: 0,
        action: TapAction::Cancel(cancel.clone()),
    };
    let inbox = inbox(dst.path());
    let (sent, received) = tokio::join!(
        send_file(sr, tap, &item, opts(65536), |_: &Progress| {}, &cancel),
        receive_file(rr, rw, &inbox, |_: &Progress| {}, &never),
    );
    assert!(
        matches!(
            sent,
            Err(TransferError::Cancelled {
                by: Party::Local,
                ..
            })
        ),
        "{sent:?}"
    );
    let err = received.unwrap_err();
    assert!(
        matches!(&err, TransferError::Cancelled { by: Party::Peer, reason } if reason.contains("sender")),
        "{err:?}"
    );
    assert!(listing(dst.path()).is_empty(), "partial deleted on cancel");
    assert_eq!(inbox.used(), 0);
}

#[tokio::test]
async fn the_receiver_cancels() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let (item, _) = source_file(src.path(), "f.bin", 4_000_000, 6);
    let ((sr, sw), (rr, rw)) = streams();
    let cancel = CancellationToken::new();
    let never = CancellationToken::new();
    let tap = CancelAfterRead {
        inner: rr,
        at: 1_000_000,
        pos: 0,
        token: cancel.clone(),
    };
    let inbox = inbox(dst.path());
    let (sent, received) = tokio::join!(
        send_file(sr, sw, &item, opts(65536), |_: &Progress| {}, &never),
        receive_file(tap, rw, &inbox, |_: &Progress| {}, &cancel),
    );
    assert!(
        matches!(
            received,
            Err(TransferError::Cancelled {
                by: Party::Local,
                ..
            })
        ),
        "{received:?}"
    );
    let err = sent.unwrap_err();
    assert!(
        matches!(&err, TransferError::Cancelled { by: Party::Peer, reason } if reason.contains("receiver")),
        "{err:?}"
    );
    assert!(
        err.to_string().starts_with("the other side cancelled"),
        "{err}"
    );
    assert!(listing(dst.path()).is_empty(), "partial deleted on cancel");
    assert_eq!(inbox.used(), 0);
}

#[tokio::test]
async fn hostile_names_are_refused_and_nothing_is_written() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let (mut item, _) = source_file(src.path(), "payload", 1000, 7);
    let inbox = inbox(dst.path());
    let names = [
        "../escape.txt",
        "a/../../escape.txt",
        "/etc/cron.d/evil",
        "..\\..\\evil.bat",
        "C:\\Windows\\evil.dll",
        "dir//x",
        "./x",
        "CON",
        "aux.txt",
        "com1.log",
        "trailing.",
        "trailing ",
        "nul\0byte",
        "new\nline",
        "invoice\u{202E}fdp.exe",
        ".tandem-0123456789abcdef.part",
        "",
    ];
    for name in names {
        item.name = name.to_owned();
        let (sent, received) = transfer(&item, &inbox, 65536).await;
        assert!(
            matches!(received, Err(TransferError::Refused(Refusal::Name(_)))),
            "{name:?}: {received:?}"
        );
        let err = sent.unwrap_err();
        assert!(
            matches!(&err, TransferError::RefusedByPeer(r) if r.starts_with("refused: ")),
            "{name:?}: {err:?}"
        );
    }
    let deep = vec!["d"; 17].join("/");
    let long = "x".repeat(300);
    for name in [deep, long] {
        item.name = name;
        let (_, received) = transfer(&item, &inbox, 65536).await;
        assert!(
            matches!(received, Err(TransferError::Refused(Refusal::Name(_)))),
            "{received:?}"
        );
    }

    // Invalid UTF-8 needs a hand-made offer.
    let ((mut sr, mut sw), (rr, rw)) = streams();
    let cancel = CancellationToken::new();
    let raw = async {
        let offer = RawOffer {
            name: b"bad\xff.txt".to_vec(),
            size: 1,
            hash: [0; 32],
            chunk_size: 65536,
        };
        sw.write_all(&raw_offer(&offer)).await.unwrap();
        raw_reply(&mut sr).await
    };
    let (reply, received) = tokio::join!(
        raw,
        receive_file(rr, rw, &inbox, |_: &Progress| {}, &cancel)
    );
    assert!(matches!(
        received,
        Err(TransferError::Refused(Refusal::Name(NameError::NotUtf8)))
    ));
    assert!(matches!(reply, Some(RawReply::Refuse { reason }) if reason.contains("UTF-8")));

    assert!(listing(dst.path()).is_empty(), "{:?}", listing(dst.path()));
    assert_eq!(inbox.used(), 0);
}

#[tokio::test]
async fn a_symlink_in_the_target_folder_is_not_followed() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::write(elsewhere.path().join("victim.txt"), b"precious").unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), dst.path().join("evil")).unwrap();
    std::os::unix::fs::symlink(
        elsewhere.path().join("victim.txt"),
        dst.path().join("victim.txt"),
    )
    .unwrap();
    let (mut item, data) = source_file(src.path(), "payload", 1000, 8);
    let inbox = inbox(dst.path());

    item.name = "evil/payload.sh".into();
    let (sent, received) = transfer(&item, &inbox, 65536).await;
    assert!(
        matches!(&received, Err(TransferError::Refused(Refusal::Symlink(p))) if p == "evil"),
        "{received:?}"
    );
    assert!(sent.unwrap_err().to_string().contains("symbolic link"));

    item.name = "evil/deeper/payload.sh".into();
    let (_, received) = transfer(&item, &inbox, 65536).await;
    assert!(
        matches!(received, Err(TransferError::Refused(Refusal::Symlink(_)))),
        "{received:?}"
    );

    // A link at the final name is not written through either: the file gets a free name.
    item.name = "victim.txt".into();
    let (sent, received) = transfer(&item, &inbox, 65536).await;
    let received = received.unwrap();
    assert_eq!(received.name, "victim (1).txt");
    assert_eq!(sent.unwrap().receiver_name, "victim (1).txt");
    assert_eq!(std::fs::read(&received.path).unwrap(), data);

    assert_eq!(listing(elsewhere.path()), ["victim.txt"]);
    assert_eq!(
        std::fs::read(elsewhere.path().join("victim.txt")).unwrap(),
        b"precious"
    );
}

#[tokio::test]
async fn an_existing_file_is_not_overwritten() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    std::fs::write(dst.path().join("notes.txt"), b"old").unwrap();
    std::fs::create_dir(dst.path().join("folder")).unwrap();
    std::fs::write(dst.path().join("folder/report.tar.gz"), b"old").unwrap();
    let (mut item, data) = source_file(src.path(), "notes.txt", 5000, 9);
    let inbox = inbox(dst.path());

    let (sent, received) = transfer(&item, &inbox, 65536).await;
    let received = received.unwrap();
    assert_eq!(received.name, "notes (1).txt");
    assert_eq!(received.offered_name, "notes.txt");
    assert_eq!(sent.unwrap().receiver_name, "notes (1).txt");
    assert_eq!(std::fs::read(dst.path().join("notes.txt")).unwrap(), b"old");
    assert_eq!(
        std::fs::read(dst.path().join("notes (1).txt")).unwrap(),
        data
    );

    let (_, received) = transfer(&item, &inbox, 65536).await;
    assert_eq!(received.unwrap().name, "notes (2).txt");

    item.name = "folder/report.tar.gz".into();
    let (_, received) = transfer(&item, &inbox, 65536).await;
    let received = received.unwrap();
    assert_eq!(received.name, "folder/report (1).tar.gz");
    assert_eq!(received.path, dst.path().join("folder/report (1).tar.gz"));
    assert_eq!(
        std::fs::read(dst.path().join("folder/report.tar.gz")).unwrap(),
        b"old"
    );
}

#[tokio::test]
async fn the_quota_is_shared_by_the_session() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let inbox = Inbox::new(
        dst.path(),
        InboxOptions {
            quota: 1_000_000,
            ..InboxOptions::default()
        },
    )
    .unwrap();
    let (big, _) = source_file(src.path(), "big.bin", 1_500_000, 10);
    let (small, _) = source_file(src.path(), "small.bin", 600_000, 11);

    let (sent, received) = transfer(&big, &inbox, 65536).await;
    let err = received.unwrap_err();
    assert!(matches!(
        err,
        TransferError::Refused(Refusal::Quota {
            needed: 1_500_000,
            remaining: 1_000_000,
            ..
        })
    ));
    assert!(
        err.to_string().contains("may only receive 1.0 MB more"),
        "{err}"
    );
    assert!(
        sent.unwrap_err()
            .to_string()
            .contains("may only receive 1.0 MB more")
    );
    assert!(listing(dst.path()).is_empty());

    let (_, received) = transfer(&small, &inbox, 65536).await;
    received.unwrap();
    // A clone of the inbox shares the quota: 600 kB used, 600 kB more does not fit.
    let (_, received) = transfer(&small, &inbox.clone(), 65536).await;
    assert!(matches!(
        received,
        Err(TransferError::Refused(Refusal::Quota {
            remaining: 400_000,
            ..
        }))
    ));
    assert_eq!(listing(dst.path()), ["small.bin"]);
}

#[tokio::test]
async fn a_folder_goes_file_by_file_without_its_links() {
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let root = src.path().join("project");
    std::fs::create_dir_all(root.join("src/deep")).unwrap();
    std::fs::write(root.join("README.md"), b"readme").unwrap();
    std::fs::write(root.join("src/main.rs"), b"fn main() {}").unwrap();
    std::fs::write(root.join("src/deep/empty"), b"").unwrap();
    std::fs::write(root.join("src/deep/also-empty"), b"").unwrap();
    std::os::unix::fs::symlink("/etc/shadow", root.join("shadow")).unwrap();

    let plan = plan(&root).unwrap();
    assert_eq!(plan.files.len(), 4);
    assert_eq!(plan.skipped.len(), 1);
    assert_eq!(plan.skipped[0].path, root.join("shadow"));

    let inbox = inbox(dst.path());
    // Two files with the same content (both empty) at once: they must not share a partial file.
    let cancel = CancellationToken::new();
    let mut names = Vec::new();
    for pair in plan.files.chunks(2) {
        let mut tasks = Vec::new();
        for item in pair {
            let ((sr, sw), (rr, rw)) = streams();
            let inbox = inbox.clone();
            let item = item.clone();
            let cancel = cancel.clone();
            tasks.push(tokio::spawn(async move {
                let (s, r) = tokio::join!(
                    send_file(
                        sr,
                        sw,
                        &item,
                        opts(DEFAULT_CHUNK_SIZE),
                        |_: &Progress| {},
                        &cancel
                    ),
                    receive_file(rr, rw, &inbox, |_: &Progress| {}, &cancel),
                );
                s.unwrap();
                r.unwrap().name
            }));
        }
        for task in tasks {
            names.push(task.await.unwrap());
        }
    }
    names.sort();
    assert_eq!(
        names,
        [
            "project/README.md",
            "project/src/deep/also-empty",
            "project/src/deep/empty",
            "project/src/main.rs"
        ]
    );
    assert_eq!(
        listing(dst.path()),
        [
            "project/",
            "project/README.md",
            "project/src/",
            "project/src/deep/",
            "project/src/deep/also-empty",
            "project/src/deep/empty",
            "project/src/main.rs"
        ]
    );
    assert_eq!(
        std::fs::read(dst.path().join("project/src/main.rs")).unwrap(),
        b"fn main() {}"
    );
}

#[tokio::test]
async fn a_sender_that_sends_more_than_offered_is_stopped() {
    let dst = tempfile::tempdir().unwrap();
    let inbox = inbox(dst.path());
    let data = random_bytes(12_288, 12);
    let ((mut sr, mut sw), (rr, rw)) = streams();
    let cancel = CancellationToken::new();
    let raw = async {
        // Offers 10,000 bytes, then sends three full 4 KiB chunks.
        let offer = RawOffer {
            name: b"x.bin".to_vec(),
            size: 10_000,
            hash: [0; 32],
            chunk_size: 4096,
        };
        sw.write_all(&raw_offer(&offer)).await.unwrap();
        assert!(matches!(
            raw_reply(&mut sr).await,
            Some(RawReply::Accept { offset: 0 })
        ));
        for offset in [0usize, 4096, 8192] {
            let _ = sw
                .write_all(&raw_chunk(
                    offset as u64,
                    &data[offset..offset + 4096],
                    10_000,
                ))
                .await;
        }
        raw_reply(&mut sr).await
    };
    let (reply, received) = tokio::join!(
        raw,
        receive_file(rr, rw, &inbox, |_: &Progress| {}, &cancel)
    );
    let err = received.unwrap_err();
    assert!(
        matches!(&err, TransferError::Protocol(m) if m.contains("past the offered size")),
        "{err:?}"
    );
    assert!(
        matches!(reply, Some(RawReply::Failed { reason }) if reason.contains("past the offered size"))
    );
    assert!(listing(dst.path()).is_empty());
    assert_eq!(inbox.used(), 0);
}

#[tokio::test]
async fn malformed_offers_are_refused() {
    let dst = tempfile::tempdir().unwrap();
    let inbox = inbox(dst.path());
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // Unknown version.
        (vec![9, 0, 0, 0, 0], "version 9"),
        // A 4 GiB "message".
        (
            vec![tandem_toolbox::PROTOCOL_VERSION, 0xff, 0xff, 0xff, 0xff],
            "malformed",
        ),
        // Garbage body.
        (
            vec![tandem_toolbox::PROTOCOL_VERSION, 0, 0, 0, 2, 0xff, 0xff],
            "malformed",
        ),
        // Chunk size too large.
        (
            raw_offer(&RawOffer {
                name: b"x".to_vec(),
                size: 1,
                hash: [0; 32],
                chunk_size: 64 << 20,
            }),
            "chunk size",
        ),
    ];
    for (bytes, want) in cases {
        let ((mut sr, mut sw), (rr, rw)) = streams();
        let cancel = CancellationToken::new();
        let raw = async {
            sw.write_all(&bytes).await.unwrap();
            raw_reply(&mut sr).await
        };
        let (reply, received) = tokio::join!(
            raw,
            receive_file(rr, rw, &inbox, |_: &Progress| {}, &cancel)
        );
        assert!(
            matches!(received, Err(TransferError::Refused(_))),
            "{want}: {received:?}"
        );
        assert!(
            matches!(&reply, Some(RawReply::Refuse { reason }) if reason.contains(want)),
            "{want}: {reply:?}"
        );
    }
    assert!(listing(dst.path()).is_empty());
}

#[tokio::test]
async fn a_bad_resume_offset_from_the_receiver_is_rejected() {
    let src = tempfile::tempdir().unwrap();
    let (item, _) = source_file(src.path(), "f.bin", 100_000, 13);
    let ((sr, sw), (mut rr, mut rw)) = streams();
    let cancel = CancellationToken::new();
    let raw = async {
        let mut version = [0u8; 1];
        rr.read_exact(&mut version).await.unwrap();
        let mut len = [0u8; 4];
        rr.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        rr.read_exact(&mut body).await.unwrap();
        // Accept { offset: 12345 }: variant 0, varint 12345.
        let msg = [0u8, 0xb9, 0x60];
        rw.write_all(&(msg.len() as u32).to_be_bytes())
            .await
            .unwrap();
        rw.write_all(&msg).await.unwrap();
        let mut rest = Vec::new();
        let _ = rr.read_to_end(&mut rest).await;
        rest
    };
    let (sent, rest) = tokio::join!(
        send_file(sr, sw, &item, opts(65536), |_: &Progress| {}, &cancel),
        raw
    );
    let err = sent.unwrap_err();
    assert!(
        matches!(&err, TransferError::Protocol(m) if m.contains("12345")),
        "{err:?}"
    );
    assert_eq!(
        rest.first(),
        Some(&b'M'),
        "the sender says Cancel, and sends no data"
    );
}

#[tokio::test]
async fn policy_refusal_reads_the_offer_and_says_no() {
    let src = tempfile::tempdir().unwrap();
    let (item, _) = source_file(src.path(), "f.bin", 1000, 14);
    let ((sr, sw), (rr, rw)) = streams();
    let cancel = CancellationToken::new();
    let (sent, summary) = tokio::join!(
        send_file(
            sr,
            sw,
            &item,
            opts(DEFAULT_CHUNK_SIZE),
            |_: &Progress| {},
            &cancel
        ),
        refuse(rr, rw, "file transfer is switched off for this session"),
    );
    let summary = summary.unwrap();
    assert_eq!((summary.name.as_str(), summary.size), ("f.bin", 1000));
    let err = sent.unwrap_err();
    assert_eq!(
        err.to_string(),
        "the other side did not take the file: refused: file transfer is switched off for this session"
    );
}

#[tokio::test]
async fn a_missing_source_and_bad_options_are_reported() {
    let src = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let ((sr, sw), _) = streams();
    let item = Outgoing::new(src.path().join("missing"), "missing", 0);
    let err = send_file(
        sr,
        sw,
        &item,
        opts(DEFAULT_CHUNK_SIZE),
        |_: &Progress| {},
        &cancel,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, TransferError::File { .. }), "{err:?}");
    let ((sr, sw), _) = streams();
    let err = send_file(sr, sw, &item, opts(1), |_: &Progress| {}, &cancel)
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::Options(_)), "{err:?}");

    let link = src.path().join("link");
    std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
    let ((sr, sw), _) = streams();
    let item = Outgoing::new(&link, "link", 0);
    let err = send_file(
        sr,
        sw,
        &item,
        opts(DEFAULT_CHUNK_SIZE),
        |_: &Progress| {},
        &cancel,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
}

/// Throughput of the protocol over an in-memory pipe, per chunk size. Run with
/// `cargo test --release -p tandem-toolbox -- --ignored --nocapture throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check"]
async fn throughput() {
    let src = tempfile::tempdir().unwrap();
    let size = 256 << 20;
    let (mut item, _) = source_file(src.path(), "big.bin", size, 15);
    // Raw pipe baseline.
    let (mut a, mut b) = tokio::io::duplex(1 << 20);
    let start = std::time::Instant::now();
    let buf = vec![0u8; 256 * 1024];
    let writer = async {
        for _ in 0..size / buf.len() {
            a.write_all(&buf).await.unwrap();
        }
        drop(a);
    };
    let reader = async {
        let mut sink = vec![0u8; 256 * 1024];
        while b.read(&mut sink).await.unwrap() > 0 {}
    };
    tokio::join!(writer, reader);
    report("raw duplex", size, start.elapsed());
    for chunk in [64 * 1024, 256 * 1024, 1024 * 1024] {
        let dst = tempfile::tempdir().unwrap();
        let inbox = inbox(dst.path());
        item.name = format!("big-{chunk}.bin");
        let (a, b) = tokio::io::duplex(1 << 20);
        let ((sr, sw), (rr, rw)) = (tokio::io::split(a), tokio::io::split(b));
        let cancel = CancellationToken::new();
        let start = std::time::Instant::now();
        let (s, r) = tokio::join!(
            send_file(sr, sw, &item, opts(chunk), |_: &Progress| {}, &cancel),
            receive_file(rr, rw, &inbox, |_: &Progress| {}, &cancel),
        );
        s.unwrap();
        r.unwrap();
        report(
            &format!("chunk {} KiB (incl. hashing)", chunk / 1024),
            size,
            start.elapsed(),
        );
    }

    fn report(what: &str, size: usize, took: std::time::Duration) {
        println!("{what}: {:.0} MB/s", size as f64 / took.as_secs_f64() / 1e6);
    }
}
