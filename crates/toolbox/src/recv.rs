//! The receiving side: [`Inbox`], [`receive_file`] and [`refuse`].

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{Party, Refusal, TransferError};
use crate::fsops::{self, DirError};
use crate::name::{ShowName, display_text};
use crate::policy::{
    self, DEFAULT_FREE_SPACE_MARGIN, DEFAULT_QUOTA, Quota, Reservation, ValidOffer, resume_offset,
    validate_offer,
};
use crate::progress::{Progress, Reporter, Stage};
use crate::tree;
use crate::wire::{
    self, CHUNK_HEADER_BYTES, ChunkHeader, KIND_CHUNK, KIND_MESSAGE, MAX_TEXT_BYTES, Offer,
    PROTOCOL_VERSION, ReceiverMsg, SenderMsg, WireError,
};

/// How long a last word (Refuse, Cancel, Failed) may take to go out before we give up on it.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(5);
/// Block size for hashing a resumed prefix.
const PREFIX_BLOCK: usize = 1 << 20;

/// Settings of an [`Inbox`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxOptions {
    /// Bytes the session may receive in total, over all its transfers (default 4 GiB).
    pub quota: u64,
    /// Room to leave free on the target file system (default 64 MiB, at most 1 % of its size).
    pub free_space_margin: u64,
}

impl Default for InboxOptions {
    fn default() -> Self {
        Self {
            quota: DEFAULT_QUOTA,
            free_space_margin: DEFAULT_FREE_SPACE_MARGIN,
        }
    }
}

/// Where one session's incoming files go, with the session's quota. Cheap to clone; clones share
/// the quota.
#[derive(Clone)]
pub struct Inbox {
    inner: Arc<InboxInner>,
}

struct InboxInner {
    dir: PathBuf,
    root: OwnedFd,
    quota: Arc<Quota>,
    margin: u64,
}

impl fmt::Debug for Inbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbox")
            .field("dir", &self.inner.dir)
            .field("quota", &self.inner.quota.limit())
            .field("used", &self.inner.quota.used())
            .finish()
    }
}

impl Inbox {
    /// Opens the target folder (which must exist; it may itself be a symbolic link, nothing
    /// inside it is followed).
    pub fn new(dir: impl Into<PathBuf>, options: InboxOptions) -> Result<Self, TransferError> {
        let dir = dir.into();
        let root = fsops::open_root(&dir).map_err(|e| TransferError::file(&dir, e))?;
        Ok(Self {
            inner: Arc::new(InboxInner {
                dir,
                root,
                quota: Quota::new(options.quota),
                margin: options.free_space_margin,
            }),
        })
    }

    /// The target folder.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The session's quota in bytes.
    pub fn quota(&self) -> u64 {
        self.inner.quota.limit()
    }

    /// Bytes received (including partial files kept for resuming) or reserved by running
    /// transfers.
    pub fn used(&self) -> u64 {
        self.inner.quota.used()
    }
}

/// A file received and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Where it is now.
    pub path: PathBuf,
    /// Its relative name as stored (`folder/report (1).pdf` when `report.pdf` existed).
    pub name: String,
    /// The name the sender offered (`folder/report.pdf`).
    pub offered_name: String,
    /// Its size.
    pub size: u64,
    /// Where this transfer resumed (0 for a fresh one).
    pub resumed_from: u64,
    /// BLAKE3 of the file, hex.
    pub hash: String,
}

/// What an offer that [`refuse`] turned down said (display text only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferSummary {
    /// The offered name, made safe to show.
    pub name: String,
    /// The offered size.
    pub size: u64,
}

/// Reads an offer and turns it down with `reason` (view-only session, the user switched file
/// transfer off, …). Nothing touches the disk.
pub async fn refuse<R, W>(mut r: R, mut w: W, reason: &str) -> Result<OfferSummary, TransferError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let offer = read_offer(&mut r).await;
    let refusal = Refusal::Policy(display_text(reason, MAX_TEXT_BYTES));
    say_goodbye(
        &mut w,
        &ReceiverMsg::Refuse {
            reason: refusal.peer_text(),
        },
    )
    .await;
    match offer {
        Ok(offer) => Ok(OfferSummary {
            name: ShowName(&offer.name).to_string(),
            size: offer.size,
        }),
        Err(OfferError::Refuse(_)) => Ok(OfferSummary {
            name: String::new(),
            size: 0,
        }),
        Err(OfferError::Fail(e)) => Err(e),
    }
}

/// Receives one file from the stream into `inbox`.
///
/// The sender is treated as hostile: the offered name is checked with [`crate::sanitise`], the
/// quota and the free space are checked before anything is written, folders are created and
/// opened without following links, every length is bounded, every chunk is verified, and the
/// whole file is verified before it gets its final name, which never replaces an existing file
/// (`name (1).ext`, … instead).
///
/// The partial file, `.tandem-<16 hex of the hash>.part` next to the final name, survives only a
/// broken stream: the same file offered again (even in a later session) resumes from it. Every
/// other failure, a refusal, a cancel from either side, a corrupt chunk or a protocol violation,
/// removes it.
pub async fn receive_file<R, W, P>(
    mut r: R,
    mut w: W,
    inbox: &Inbox,
    progress: P,
    cancel: &CancellationToken,
) -> Result<Received, TransferError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    P: FnMut(&Progress) + Send,
{
    let offer = tokio::select! {
        biased;
        () = cancel.cancelled() => {
            return Err(TransferError::Cancelled { by: Party::Local, reason: "cancelled before a file was offered".into() });
        }
        offer = read_offer(&mut r) => offer,
    };
    let offer = match offer.and_then(|offer| validate_offer(offer).map_err(OfferError::Refuse)) {
        Ok(offer) => offer,
        Err(OfferError::Refuse(refusal)) => return Err(refuse_offer(&mut w, refusal).await),
        Err(OfferError::Fail(e)) => return Err(e),
    };
    tracing::debug!(name = %offer.display_name(), size = offer.size, "file offered");

    let prepared = {
        let inbox = inbox.clone();
        let offer = offer.clone();
        tokio::task::spawn_blocking(move || prepare(&inbox, &offer)).await
    };
    let target = match prepared.map_err(join_error) {
        Ok(Ok(target)) => target,
        Ok(Err(TransferError::Refused(refusal))) => return Err(refuse_offer(&mut w, refusal).await),
        Ok(Err(e)) | Err(e) => {
            say_goodbye(
                &mut w,
                &ReceiverMsg::Failed {
                    reason: peer_text(&e),
                },
            )
            .await;
            return Err(e);
        }
    };

    let mut reporter = Reporter::new(progress, offer.display_name(), offer.size);
    let result = transfer(&mut r, &mut w, &offer, &target, &mut reporter, cancel).await;
    match result {
        Ok(received) => {
            target.reservation.keep(offer.size - target.offset);
            say_goodbye(
                &mut w,
                &ReceiverMsg::Done {
                    name: received.name.clone(),
                },
            )
            .await;
            reporter.done(offer.size);
            Ok(received)
        }
        Err((e, done)) => {
            if e.keeps_partial() {
                tracing::info!(name = %offer.display_name(), done, "transfer broke off; keeping the partial file");
                target.reservation.keep(done - target.offset);
            } else {
                if let Err(rm) = fsops::remove(&*target.parent, &target.partial_name) {
                    tracing::warn!(error = %rm, "could not remove a partial file");
                }
                match &e {
                    TransferError::Cancelled {
                        by: Party::Local,
                        reason,
                    } => {
                        say_goodbye(
                            &mut w,
                            &ReceiverMsg::Cancel {
                                reason: reason.clone(),
                            },
                        )
                        .await;
                    }
                    TransferError::Cancelled {
                        by: Party::Peer, ..
                    } => {}
                    other => {
                        say_goodbye(
                            &mut w,
                            &ReceiverMsg::Failed {
                                reason: peer_text(other),
                            },
                        )
                        .await
                    }
                }
            }
            Err(e)
        }
    }
}

/// Why reading the offer stopped.
enum OfferError {
    /// Answer with a refusal.
    Refuse(Refusal),
    /// Give up (stream ended or failed).
    Fail(TransferError),
}

/// Reads `[version][len][postcard Offer]`.
async fn read_offer<R: AsyncRead + Unpin>(r: &mut R) -> Result<Offer, OfferError> {
    let fail = |e| OfferError::Fail(TransferError::from_wire(e, 0, 0));
    let version = wire::read_byte(r).await.map_err(fail)?;
    if version != PROTOCOL_VERSION {
        return Err(OfferError::Refuse(Refusal::Version(version)));
    }
    match wire::read_message(r).await {
        Ok(offer) => Ok(offer),
        Err(e @ (WireError::TooLarge(_) | WireError::Malformed(_))) => Err(OfferError::Refuse(
            Refusal::Offer(format!("the offer is malformed ({e})")),
        )),
        Err(e) => Err(fail(e)),
    }
}

async fn refuse_offer<W: AsyncWrite + Unpin>(w: &mut W, refusal: Refusal) -> TransferError {
    tracing::info!(%refusal, "refusing a file");
    say_goodbye(
        w,
        &ReceiverMsg::Refuse {
            reason: refusal.peer_text(),
        },
    )
    .await;
    TransferError::Refused(refusal)
}

/// Sends a last message and closes our direction, giving up after [`GOODBYE_TIMEOUT`].
async fn say_goodbye<W: AsyncWrite + Unpin>(w: &mut W, msg: &ReceiverMsg) {
    let Ok(frame) = wire::encode_message(None, msg) else {
        return;
    };
    let send = async {
        w.write_all(&frame).await?;
        w.flush().await?;
        w.shutdown().await
    };
    if let Ok(Err(e)) | Err(e) = tokio::time::timeout(GOODBYE_TIMEOUT, send)
        .await
        .map_err(io::Error::from)
    {
        tracing::debug!(error = %e, "could not send the last message");
    }
}

/// What the sender is told about our failure: no local paths.
fn peer_text(e: &TransferError) -> String {
    let text = match e {
        TransferError::File { source, .. } => format!("could not write the file: {source}"),
        other => other.to_string(),
    };
    display_text(&text, MAX_TEXT_BYTES)
}

fn join_error(e: tokio::task::JoinError) -> TransferError {
    TransferError::Stream(io::Error::other(format!("internal error: {e}")))
}

/// The partial file, opened and locked, and what it takes to finish.
struct Target {
    parent: Arc<OwnedFd>,
    /// The folder of the file, for messages.
    parent_path: PathBuf,
    /// The folders part of the stored name (`folder/`), empty at the top.
    dir_prefix: String,
    partial_name: String,
    file: Arc<File>,
    offset: u64,
    reservation: Reservation,
}

/// Everything between a valid offer and Accept: folders, partial file, quota, free space.
fn prepare(inbox: &Inbox, offer: &ValidOffer) -> Result<Target, TransferError> {
    let inner = &inbox.inner;
    let (_, dirs) = offer
        .components
        .split_last()
        .ok_or_else(|| TransferError::Protocol("empty name".into()))?;
    let parent_path = dirs.iter().fold(inner.dir.clone(), |p, d| p.join(d));
    let file_err = |e: io::Error| TransferError::file(&parent_path, e);
    let dir_refusal = |depth: usize, e: DirError| match e {
        DirError::Symlink => TransferError::Refused(Refusal::Symlink(dirs[..=depth].join("/"))),
        DirError::NotAFolder => {
            TransferError::Refused(Refusal::NotAFolder(dirs[..=depth].join("/")))
        }
        DirError::Io(e) => TransferError::file(
            dirs[..=depth]
                .iter()
                .fold(inner.dir.clone(), |p, d| p.join(d)),
            e,
        ),
    };

    // Look, without creating anything: a refusal must leave no trace.
    let mut dir = fsops::reopen(&inner.root).map_err(file_err)?;
    let mut missing_from = None;
    for (depth, name) in dirs.iter().enumerate() {
        match fsops::open_subdir(&dir, name).map_err(|e| dir_refusal(depth, e))? {
            Some(sub) => dir = sub,
            None => {
                missing_from = Some(depth);
                break;
            }
        }
    }
    let partial_base = format!(
        ".tandem-{}.part",
        &blake3::Hash::from_bytes(offer.hash).to_hex()[..16]
    );
    let existing = if missing_from.is_none() {
        fsops::regular_len(&dir, &partial_base)
    } else {
        0
    };
    let estimate = resume_offset(existing, offer.size, offer.chunk_size);
    let mut reservation = inner
        .quota
        .reserve(offer.size - estimate)
        .map_err(over_quota)?;
    let (free, total) = fsops::space(&dir).map_err(file_err)?;
    if let Err((free, needed)) =
        policy::check_space(free, total, offer.size - estimate, inner.margin)
    {
        return Err(TransferError::Refused(Refusal::Space {
            dir: parent_path,
            free,
            needed,
        }));
    }

    // Accepted: create what is missing.
    if let Some(from) = missing_from {
        for (depth, name) in dirs.iter().enumerate().skip(from) {
            dir = fsops::create_subdir(&dir, name).map_err(|e| dir_refusal(depth, e))?;
        }
    }
    let partial = fsops::open_partial(&dir, &partial_base).map_err(file_err)?;
    let len = partial.file.metadata().map_err(file_err)?.len();
    let offset = resume_offset(len, offer.size, offer.chunk_size);
    if offset != estimate
        && let Err(e) = reservation.resize(offer.size - offset)
    {
        if partial.created {
            let _ = fsops::remove(&dir, &partial.name);
        }
        return Err(over_quota(e));
    }
    partial.file.set_len(offset).map_err(file_err)?;
    Ok(Target {
        parent: Arc::new(dir),
        parent_path,
        dir_prefix: dirs.iter().map(|d| format!("{d}/")).collect(),
        partial_name: partial.name,
        file: Arc::new(partial.file),
        offset,
        reservation,
    })
}

fn over_quota(e: policy::OverQuota) -> TransferError {
    TransferError::Refused(Refusal::Quota {
        needed: e.needed,
        remaining: e.remaining,
        limit: e.limit,
    })
}

/// Accept, receive, verify, store. On failure, also says how far the verified data got.
async fn transfer<R, W, P>(
    r: &mut R,
    w: &mut W,
    offer: &ValidOffer,
    target: &Target,
    reporter: &mut Reporter<P>,
    cancel: &CancellationToken,
) -> Result<Received, (TransferError, u64)>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    P: FnMut(&Progress),
{
    let offset = target.offset;
    let fail = |e| (e, offset);
    let partial_path = target.parent_path.join(&target.partial_name);

    // Hash what we already have, then say where to start.
    let hasher = {
        let file = Arc::clone(&target.file);
        let cancel = cancel.clone();
        let (size, chunk) = (offer.size, offer.chunk_size);
        tokio::task::spawn_blocking(move || hash_prefix(&file, offset, size, chunk, &cancel)).await
    };
    let hasher = match hasher.map_err(join_error).map_err(fail)? {
        Ok(Some(hasher)) => hasher,
        Ok(None) => return Err(fail(cancelled_locally())),
        Err(e) => return Err(fail(TransferError::file(&partial_path, e))),
    };
    let accept = wire::encode_message(None, &ReceiverMsg::Accept { offset })
        .map_err(|e| fail(TransferError::Protocol(e.to_string())))?;
    tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(fail(cancelled_locally())),
        sent = async { w.write_all(&accept).await?; w.flush().await } => sent.map_err(|e| fail(TransferError::Stream(e)))?,
    }
    reporter.stage(Stage::Receiving, offset, offset);

    let (cvs, done) = receive_chunks(r, offer, target, hasher, reporter, cancel).await?;
    let actual = match cvs {
        // An empty file has no chunk: its hash is BLAKE3 of nothing.
        cvs if offer.size == 0 && cvs.is_empty() => blake3::hash(&[]),
        cvs => tree::root(&cvs, offer.size, u64::from(offer.chunk_size)).ok_or_else(|| {
            (
                TransferError::Protocol("the chunks do not add up to the offered size".into()),
                done,
            )
        })?,
    };
    if actual.as_bytes() != &offer.hash {
        let e = TransferError::HashMismatch {
            expected: blake3::Hash::from_bytes(offer.hash).to_hex().to_string(),
            actual: actual.to_hex().to_string(),
        };
        return Err((e, done));
    }

    // Durable, then visible under a name that replaces nothing.
    let file_name = offer.components.last().cloned().unwrap_or_default();
    let stored = {
        let file = Arc::clone(&target.file);
        let parent = Arc::clone(&target.parent);
        let partial = target.partial_name.clone();
        tokio::task::spawn_blocking(move || -> io::Result<String> {
            file.sync_all()?;
            let name = fsops::rename_to_free_name(&*parent, &partial, &file_name)?;
            fsops::sync_dir(&*parent)?;
            Ok(name)
        })
        .await
    };
    let stored = match stored.map_err(join_error).map_err(|e| (e, done))? {
        Ok(name) => name,
        Err(e) => return Err((TransferError::file(&partial_path, e), done)),
    };
    tracing::info!(name = %offer.display_name(), stored = %stored, size = offer.size, resumed_from = offset, "file received");
    Ok(Received {
        path: target.parent_path.join(&stored),
        name: format!("{}{stored}", target.dir_prefix),
        offered_name: offer.display_name(),
        size: offer.size,
        resumed_from: offset,
        hash: actual.to_hex().to_string(),
    })
}

fn cancelled_locally() -> TransferError {
    TransferError::Cancelled {
        by: Party::Local,
        reason: "the receiver cancelled".into(),
    }
}

/// The chunk hashes of the first `len` bytes of the partial file (whole chunks of a file of
/// `size` bytes); `None` if cancelled meanwhile.
fn hash_prefix(
    file: &File,
    len: u64,
    size: u64,
    chunk_size: u32,
    cancel: &CancellationToken,
) -> io::Result<Option<Vec<[u8; 32]>>> {
    let chunk = chunk_size as usize;
    let block = PREFIX_BLOCK.max(chunk);
    let mut cvs = Vec::new();
    let mut buf = vec![0u8; block.min(usize::try_from(len).unwrap_or(block))];
    let mut pos = 0u64;
    while pos < len {
        if cancel.is_cancelled() {
            return Ok(None);
        }
        let n = usize::try_from(len - pos).map_or(buf.len(), |left| left.min(buf.len()));
        file.read_exact_at(&mut buf[..n], pos)?;
        for (i, c) in buf[..n].chunks(chunk).enumerate() {
            cvs.push(tree::chunk_hash(c, pos + (i * chunk) as u64, size));
        }
        pos += n as u64;
    }
    Ok(Some(cvs))
}

/// Checks a chunk header against what the offer allows next.
pub(crate) fn check_chunk(
    header: &ChunkHeader,
    expected: u64,
    size: u64,
    chunk_size: u32,
) -> Result<(), TransferError> {
    let remaining = size.saturating_sub(expected);
    let want = remaining.min(u64::from(chunk_size));
    let len = u64::from(header.len);
    if header.offset != expected {
        return Err(TransferError::Protocol(format!(
            "a chunk starts at byte {}, the next expected byte is {expected}",
            header.offset
        )));
    }
    if len > remaining {
        return Err(TransferError::Protocol(format!(
            "a chunk of {len} bytes at byte {expected} goes past the offered size of {size} bytes"
        )));
    }
    if len != want {
        return Err(TransferError::Protocol(format!(
            "a chunk of {len} bytes at byte {expected}; expected {want}"
        )));
    }
    Ok(())
}

/// The part of the receive state that moves into the blocking writer and back.
struct Sink {
    file: Arc<File>,
    /// The hashes of the chunks on disk, in order.
    cvs: Vec<[u8; 32]>,
    size: u64,
}

type WriteJob = JoinHandle<(Sink, Vec<u8>, Result<(), TransferError>)>;

/// Verifies and writes one chunk (blocking).
fn write_chunk(
    mut sink: Sink,
    buf: Vec<u8>,
    header: ChunkHeader,
    path: &Path,
) -> (Sink, Vec<u8>, Result<(), TransferError>) {
    let data = &buf[..header.len as usize];
    let hash = tree::chunk_hash(data, header.offset, sink.size);
    if hash != header.hash {
        return (
            sink,
            buf,
            Err(TransferError::ChunkCorrupt {
                offset: header.offset,
            }),
        );
    }
    sink.cvs.push(hash);
    let written = sink
        .file
        .write_all_at(data, header.offset)
        .map_err(|e| TransferError::file(path, e));
    (sink, buf, written)
}

/// Reads chunk frames until the offered size has arrived, verifying and writing each (the write
/// of one overlaps the read of the next). Returns the whole-file hasher and the size, or the error
/// and how many bytes are safely on disk.
async fn receive_chunks<R, P>(
    r: &mut R,
    offer: &ValidOffer,
    target: &Target,
    cvs: Vec<[u8; 32]>,
    reporter: &mut Reporter<P>,
    cancel: &CancellationToken,
) -> Result<(Vec<[u8; 32]>, u64), (TransferError, u64)>
where
    R: AsyncRead + Unpin + Send,
    P: FnMut(&Progress),
{
    let size = offer.size;
    let chunk_len = offer.chunk_size as usize;
    let path = Arc::new(target.parent_path.join(&target.partial_name));
    let mut sink = Some(Sink {
        file: Arc::clone(&target.file),
        cvs,
        size,
    });
    let mut spare: Vec<Vec<u8>> = Vec::with_capacity(2);
    let mut job: Option<(WriteJob, u64)> = None;
    let mut received = target.offset;
    let mut on_disk = target.offset;

    let outcome: Result<(), TransferError> = loop {
        if received == size {
            break Ok(());
        }
        let mut buf = spare.pop().unwrap_or_else(|| vec![0u8; chunk_len]);
        let frame = tokio::select! {
            biased;
            () = cancel.cancelled() => Err(cancelled_locally()),
            frame = read_chunk(r, &mut buf, received, size, offer.chunk_size) => frame,
        };
        let header = match frame {
            Ok(header) => header,
            Err(e) => break Err(e),
        };
        if let Some((previous, end)) = job.take() {
            match previous.await {
                Ok((s, b, Ok(()))) => {
                    sink = Some(s);
                    spare.push(b);
                    on_disk = end;
                }
                Ok((_, _, Err(e))) => break Err(e),
                Err(e) => break Err(join_error(e)),
            }
        }
        let Some(s) = sink.take() else {
            break Err(TransferError::Protocol("internal error: no writer".into()));
        };
        let path = Arc::clone(&path);
        received += u64::from(header.len);
        job = Some((
            tokio::task::spawn_blocking(move || write_chunk(s, buf, header, &path)),
            received,
        ));
        reporter.update(received);
    };

    // Let the last write finish before anything is decided about the file.
    let mut outcome = outcome;
    if let Some((last, end)) = job.take() {
        match last.await {
            Ok((s, _, Ok(()))) => {
                sink = Some(s);
                on_disk = end;
            }
            Ok((_, _, Err(e))) => outcome = Err(e),
            Err(e) => outcome = Err(join_error(e)),
        }
    }
    match (outcome, sink) {
        (Ok(()), Some(sink)) => Ok((sink.cvs, on_disk)),
        (Ok(()), None) => Err((
            TransferError::Protocol("internal error: no writer".into()),
            on_disk,
        )),
        (Err(e), _) => Err((e, on_disk)),
    }
}

/// Reads the next frame: a chunk into `buf` (after checking its header), or the sender's Cancel.
async fn read_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    expected: u64,
    size: u64,
    chunk_size: u32,
) -> Result<ChunkHeader, TransferError> {
    let wire_err = |e| TransferError::from_wire(e, expected, size);
    match wire::read_byte(r).await.map_err(wire_err)? {
        KIND_CHUNK => {
            let mut raw = [0u8; CHUNK_HEADER_BYTES - 1];
            wire::read_full(r, &mut raw).await.map_err(wire_err)?;
            let header = ChunkHeader::parse(&raw);
            check_chunk(&header, expected, size, chunk_size)?;
            let data = buf
                .get_mut(..header.len as usize)
                .ok_or_else(|| TransferError::Protocol("chunk larger than the buffer".into()))?;
            wire::read_full(r, data).await.map_err(wire_err)?;
            Ok(header)
        }
        KIND_MESSAGE => {
            let len = wire::read_length(r).await.map_err(wire_err)?;
            match wire::read_body(r, len).await.map_err(wire_err)? {
                SenderMsg::Cancel { reason } => Err(TransferError::Cancelled {
                    by: Party::Peer,
                    reason: display_text(&reason, MAX_TEXT_BYTES),
                }),
            }
        }
        other => Err(TransferError::from_wire(
            WireError::UnknownKind(other),
            expected,
            size,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(offset: u64, len: u32) -> ChunkHeader {
        ChunkHeader {
            offset,
            len,
            hash: [0; 32],
        }
    }

    #[test]
    fn chunk_headers_are_bounded_by_the_offer() {
        assert!(check_chunk(&header(0, 4096), 0, 10_000, 4096).is_ok());
        assert!(check_chunk(&header(8192, 1808), 8192, 10_000, 4096).is_ok());
        let msg = |r: Result<(), TransferError>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg(check_chunk(&header(4096, 4096), 0, 10_000, 4096)).contains("starts at byte 4096")
        );
        assert!(
            msg(check_chunk(&header(8192, 4096), 8192, 10_000, 4096))
                .contains("past the offered size")
        );
        assert!(msg(check_chunk(&header(0, 8192), 0, 10_000, 4096)).contains("expected 4096"));
        assert!(msg(check_chunk(&header(0, 100), 0, 10_000, 4096)).contains("expected 4096"));
        assert!(
            msg(check_chunk(&header(0, u32::MAX), 0, 10_000, 4096))
                .contains("past the offered size")
        );
    }
}
