//! The sending side: [`send_file`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use rustix::fs::{FileType, Mode, OFlags};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{Party, TransferError};
use crate::name::display_text;
use crate::pace::Pacer;
use crate::plan::Outgoing;
use crate::progress::{Progress, Reporter, Stage};
use crate::tree;
use crate::wire::{
    self, CHUNK_HEADER_BYTES, ChunkHeader, DEFAULT_CHUNK_SIZE, KIND_MESSAGE, MAX_CHUNK_SIZE,
    MAX_TEXT_BYTES, MIN_CHUNK_SIZE, Offer, ReceiverMsg, SenderMsg, WireError,
};

/// Bytes hashed per blocking step before offering (between steps: progress and cancel).
const HASH_STEP: u64 = 16 << 20;
/// Read size while hashing.
const HASH_BLOCK: usize = 4 << 20;
/// How long the rest of a frame and a Cancel may take to go out after a cancel.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the receiver's explanation after the stream failed under a write.
const EXPLANATION_GRACE: Duration = Duration::from_millis(500);

/// Settings of [`send_file`].
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Chunk size, [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`] (default 256 KiB).
    pub chunk_size: u32,
    /// Paces the chunks by the delay they add to the session (files are scavenger traffic);
    /// `None` sends as fast as the stream takes them.
    pub pacer: Option<Arc<Pacer>>,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            pacer: None,
        }
    }
}

/// A file sent and verified by the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// Bytes of file data that crossed the stream in this transfer.
    pub bytes_sent: u64,
    /// Where the receiver resumed (0 for a fresh transfer).
    pub resumed_from: u64,
    /// The name the receiver stored the file under, as it reported it: display text only
    /// (cleaned of control characters, at most 1 KiB).
    pub receiver_name: String,
    /// Size of the file.
    pub size: u64,
    /// BLAKE3 of the file, hex.
    pub hash: String,
}

/// Sends one file over the stream: hashes it, offers it, sends from where the receiver asks, and
/// waits for the receiver's verdict.
///
/// The receiver is not trusted either: its resume offset must be a chunk boundary within the file,
/// its texts are cleaned for display, and its messages are read while chunks go out, so a Cancel or
/// a failure stops the transfer at once.
pub async fn send_file<R, W, P>(
    mut r: R,
    mut w: W,
    item: &Outgoing,
    options: &SendOptions,
    progress: P,
    cancel: &CancellationToken,
) -> Result<Sent, TransferError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    P: FnMut(&Progress) + Send,
{
    let chunk_size = options.chunk_size;
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        || !tree::valid_chunk_size(chunk_size)
    {
        return Err(TransferError::Options(format!(
            "the chunk size {chunk_size} is not a power of two in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}"
        )));
    }
    let path = item.path.clone();
    let file = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || open_source(&path))
            .await
            .map_err(join_error)??
    };
    let file = Arc::new(file);
    let size = file
        .metadata()
        .map_err(|e| TransferError::file(&path, e))?
        .len();
    let mut reporter = Reporter::new(progress, item.name.clone(), size);

    // 1. Hash the whole file: every chunk's hash (sent with it later) and from them the file's.
    reporter.stage(Stage::Hashing, 0, 0);
    let mut cvs: Vec<[u8; 32]> = Vec::with_capacity(size.div_ceil(u64::from(chunk_size)) as usize);
    if size == 0 {
        cvs.push(*blake3::hash(&[]).as_bytes());
    }
    let mut pos = 0u64;
    while pos < size {
        if cancel.is_cancelled() {
            return Err(TransferError::Cancelled {
                by: Party::Local,
                reason: "cancelled while checking the file".into(),
            });
        }
        let end = size.min(pos + HASH_STEP);
        let job_file = Arc::clone(&file);
        let step =
            tokio::task::spawn_blocking(move || hash_range(&job_file, pos, end, size, chunk_size))
                .await
                .map_err(join_error)?;
        cvs.extend(step.map_err(|e| source_error(&path, e))?);
        pos = end;
        reporter.update(pos);
    }
    let hash = tree::root(&cvs, size, u64::from(chunk_size))
        .ok_or_else(|| TransferError::Protocol("internal error: chunk hashes".into()))?;
    let cvs = Arc::new(cvs);

    // 2. Offer, and hear the answer.
    let offer = Offer {
        name: item.name.as_bytes().to_vec(),
        size,
        hash: *hash.as_bytes(),
        chunk_size,
    };
    let offer = wire::encode_offer(&offer).map_err(|e| TransferError::Protocol(e.to_string()))?;
    tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(cancelled_locally()),
        sent = async { w.write_all(&offer).await?; w.flush().await } => sent.map_err(TransferError::Stream)?,
    }
    let answer = {
        let reply = wire::read_message::<_, ReceiverMsg>(&mut r);
        tokio::select! {
            biased;
            () = cancel.cancelled() => None,
            answer = reply => Some(answer),
        }
    };
    let Some(answer) = answer else {
        return Err(send_cancel(&mut w, &[], cancelled_locally()).await);
    };
    let offset = match answer.map_err(|e| TransferError::from_wire(e, 0, size))? {
        ReceiverMsg::Accept { offset } => offset,
        other => return Err(unexpected(other, "before accepting")),
    };
    if offset > size || offset % u64::from(chunk_size) != 0 {
        let e = TransferError::Protocol(format!(
            "the receiver asked to resume at byte {offset}, which is not a chunk start"
        ));
        return Err(send_cancel(&mut w, &[], e).await);
    }
    // Whatever the receiver says next, during or after the data.
    let mut reply = pin!(wire::read_message::<_, ReceiverMsg>(&mut r));
    reporter.stage(Stage::Sending, offset, offset);

    // 3. Chunks: the next one is read and hashed while the current one goes out.
    let frame_capacity = CHUNK_HEADER_BYTES + chunk_size as usize;
    let mut pos = offset;
    let mut next: Option<ReadJob> = (pos < size)
        .then(|| spawn_read(&file, &cvs, pos, size, chunk_size, vec![0; frame_capacity]));
    let mut spare: Option<Vec<u8>> = None;
    while let Some(job) = next.take() {
        let (frame, len) = job
            .await
            .map_err(join_error)?
            .map_err(|e| source_error(&path, e))?;
        let end = pos + len;
        if end < size {
            let buf = spare.take().unwrap_or_else(|| vec![0; frame_capacity]);
            next = Some(spawn_read(&file, &cvs, end, size, chunk_size, buf));
        }
        let frame_len = CHUNK_HEADER_BYTES + len as usize;
        if let Some(pacer) = &options.pacer {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(send_cancel(&mut w, &[], cancelled_locally()).await),
                msg = &mut reply => return Err(midstream(msg, pos, size)),
                () = pacer.wait(frame_len) => {}
            }
        }
        let mut written = 0;
        while written < frame_len {
            tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    return Err(send_cancel(&mut w, &frame[written..frame_len], cancelled_locally()).await);
                }
                msg = &mut reply => return Err(midstream(msg, pos, size)),
                n = w.write(&frame[written..frame_len]) => match n {
                    Ok(0) => return Err(TransferError::Stream(io::ErrorKind::WriteZero.into())),
                    Ok(n) => written += n,
                    Err(e) => {
                        // The receiver may have said why it closed.
                        return Err(match tokio::time::timeout(EXPLANATION_GRACE, &mut reply).await {
                            Ok(msg @ Ok(_)) => midstream(msg, pos, size),
                            _ => TransferError::Stream(e),
                        });
                    }
                },
            }
        }
        pos = end;
        reporter.update(pos);
        spare = Some(frame);
    }
    tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(send_cancel(&mut w, &[], cancelled_locally()).await),
        msg = &mut reply => return Err(midstream(msg, pos, size)),
        flushed = w.flush() => flushed.map_err(TransferError::Stream)?,
    }

    // 4. The receiver's verdict.
    let verdict = tokio::select! {
        biased;
        () = cancel.cancelled() => return Err(send_cancel(&mut w, &[], cancelled_locally()).await),
        msg = &mut reply => msg,
    };
    match verdict.map_err(|e| TransferError::from_wire(e, size, size))? {
        ReceiverMsg::Done { name } => {
            let _ = w.shutdown().await;
            reporter.done(size);
            Ok(Sent {
                bytes_sent: size - offset,
                resumed_from: offset,
                receiver_name: display_text(&name, MAX_TEXT_BYTES),
                size,
                hash: hash.to_hex().to_string(),
            })
        }
        other => Err(unexpected(other, "at the end")),
    }
}

/// Opens the file to send without following a link at its last component, and checks that it
/// is a regular file (a FIFO or a device would never end).
fn open_source(path: &Path) -> Result<File, TransferError> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY;
    let fd = match rustix::fs::open(path, flags | OFlags::NONBLOCK, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::LOOP) => {
            return Err(TransferError::Source {
                path: path.to_owned(),
                reason: "is a symbolic link, which is not followed".into(),
            });
        }
        Err(e) => return Err(TransferError::file(path, e.into())),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| TransferError::file(path, e.into()))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(TransferError::Source {
            path: path.to_owned(),
            reason: "is not a regular file".into(),
        });
    }
    Ok(File::from(fd))
}

/// The hashes of the chunks in `pos..end` (a multiple of the chunk size apart, `end` possibly
/// the file's end).
fn hash_range(
    file: &File,
    mut pos: u64,
    end: u64,
    size: u64,
    chunk_size: u32,
) -> io::Result<Vec<[u8; 32]>> {
    let chunk = chunk_size as usize;
    let block = HASH_BLOCK.max(chunk);
    let mut buf = vec![0u8; block];
    let mut out = Vec::new();
    while pos < end {
        let n = usize::try_from(end - pos).map_or(block, |left| left.min(block));
        file.read_exact_at(&mut buf[..n], pos)?;
        for (i, c) in buf[..n].chunks(chunk).enumerate() {
            out.push(tree::chunk_hash_with(
                c,
                pos + (i * chunk) as u64,
                size,
                true,
            ));
        }
        pos += n as u64;
    }
    Ok(out)
}

type ReadJob = JoinHandle<io::Result<(Vec<u8>, u64)>>;

/// Reads the chunk at `pos` into `buf` after room for its header and writes the header with the
/// chunk's hash from the first pass (if the file changed since, the receiver finds out).
fn spawn_read(
    file: &Arc<File>,
    cvs: &Arc<Vec<[u8; 32]>>,
    pos: u64,
    size: u64,
    chunk_size: u32,
    mut buf: Vec<u8>,
) -> ReadJob {
    let (file, cvs) = (Arc::clone(file), Arc::clone(cvs));
    tokio::task::spawn_blocking(move || {
        let len = (size - pos).min(u64::from(chunk_size));
        let len32 = u32::try_from(len).map_err(io::Error::other)?;
        let end = CHUNK_HEADER_BYTES + len32 as usize;
        file.read_exact_at(&mut buf[CHUNK_HEADER_BYTES..end], pos)?;
        let index = usize::try_from(pos / u64::from(chunk_size)).map_err(io::Error::other)?;
        let hash = *cvs
            .get(index)
            .ok_or_else(|| io::Error::other("internal error: no hash for a chunk"))?;
        ChunkHeader {
            offset: pos,
            len: len32,
            hash,
        }
        .write(&mut buf[..CHUNK_HEADER_BYTES]);
        Ok((buf, len))
    })
}

fn source_error(path: &Path, e: io::Error) -> TransferError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        TransferError::Source {
            path: path.to_owned(),
            reason: "the file got shorter while it was being sent".into(),
        }
    } else {
        TransferError::file(path, e)
    }
}

fn cancelled_locally() -> TransferError {
    TransferError::Cancelled {
        by: Party::Local,
        reason: "the sender cancelled".into(),
    }
}

fn join_error(e: tokio::task::JoinError) -> TransferError {
    TransferError::Stream(io::Error::other(format!("internal error: {e}")))
}

/// Finishes the frame in flight (so the framing stays intact), sends Cancel with the error's
/// reason, closes our direction, and returns the error. Gives up after [`GOODBYE_TIMEOUT`].
async fn send_cancel<W: AsyncWrite + Unpin>(
    w: &mut W,
    rest_of_frame: &[u8],
    e: TransferError,
) -> TransferError {
    let reason = match &e {
        TransferError::Cancelled { reason, .. } => reason.clone(),
        other => display_text(&other.to_string(), MAX_TEXT_BYTES),
    };
    if let Ok(cancel) = wire::encode_message(Some(KIND_MESSAGE), &SenderMsg::Cancel { reason }) {
        let goodbye = async {
            w.write_all(rest_of_frame).await?;
            w.write_all(&cancel).await?;
            w.flush().await?;
            w.shutdown().await
        };
        if let Ok(Err(err)) | Err(err) = tokio::time::timeout(GOODBYE_TIMEOUT, goodbye)
            .await
            .map_err(io::Error::from)
        {
            tracing::debug!(error = %err, "could not send Cancel");
        }
    }
    e
}

/// A receiver message (or the end of its stream) while data is still going out.
fn midstream(msg: Result<ReceiverMsg, WireError>, done: u64, size: u64) -> TransferError {
    match msg {
        Ok(other) => unexpected(other, "before all data was sent"),
        Err(e) => TransferError::from_wire(e, done, size),
    }
}

/// The receiver's Refuse, Cancel and Failed as errors; anything else out of turn is a protocol
/// error.
fn unexpected(msg: ReceiverMsg, when: &str) -> TransferError {
    match msg {
        ReceiverMsg::Refuse { reason } => {
            TransferError::RefusedByPeer(display_text(&reason, MAX_TEXT_BYTES))
        }
        ReceiverMsg::Cancel { reason } => TransferError::Cancelled {
            by: Party::Peer,
            reason: display_text(&reason, MAX_TEXT_BYTES),
        },
        ReceiverMsg::Failed { reason } => {
            TransferError::PeerFailed(display_text(&reason, MAX_TEXT_BYTES))
        }
        ReceiverMsg::Accept { .. } => {
            TransferError::Protocol(format!("the receiver accepted again {when}"))
        }
        ReceiverMsg::Done { .. } => {
            TransferError::Protocol(format!("the receiver reported completion {when}"))
        }
    }
}
