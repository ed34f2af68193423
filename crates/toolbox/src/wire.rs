//! Framing and messages (the format is described in the crate docs).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Version byte at the start of every Offer.
pub const PROTOCOL_VERSION: u8 = 2;
/// Largest control message (length-prefixed postcard), in bytes.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
/// Smallest chunk size a receiver accepts.
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
/// Largest chunk size a receiver accepts.
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// Chunk size senders use unless told otherwise.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;

/// Frame kind byte of a chunk frame (sender → receiver, after Accept).
pub(crate) const KIND_CHUNK: u8 = b'C';
/// Frame kind byte of a control message frame (sender → receiver, after Accept).
pub(crate) const KIND_MESSAGE: u8 = b'M';
/// Kind, offset, length, hash.
pub(crate) const CHUNK_HEADER_BYTES: usize = 1 + 8 + 4 + 32;
/// Longest reason or name text we send; longer text from the peer is cut for display.
pub(crate) const MAX_TEXT_BYTES: usize = 1024;

/// The sender's proposal; the first frame on the stream, after the version byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Offer {
    /// Relative name with `/` separators, raw bytes (the receiver refuses invalid UTF-8).
    pub name: Vec<u8>,
    /// Exact size in bytes.
    pub size: u64,
    /// BLAKE3 of the whole file.
    pub hash: [u8; 32],
    /// Every chunk but the last is exactly this long.
    pub chunk_size: u32,
}

/// Control messages from the sender after the Offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum SenderMsg {
    /// The sender stops; the receiver deletes its partial file.
    Cancel { reason: String },
}

/// Everything the receiver says. Variant order is part of the format: append only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ReceiverMsg {
    /// Send from this offset (a multiple of the chunk size, at most the size).
    Accept { offset: u64 },
    /// No; nothing was written.
    Refuse { reason: String },
    /// The receiver's user cancelled.
    Cancel { reason: String },
    /// Verified and stored under this name (display text only).
    Done { name: String },
    /// The receiver failed (bad chunk, disk error, hash mismatch, …).
    Failed { reason: String },
}

/// What can go wrong reading a frame.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    #[error("the stream ended")]
    Closed,
    #[error("the stream ended in the middle of a message")]
    Truncated,
    #[error(transparent)]
    Io(std::io::Error),
    #[error("a message of {0} bytes is larger than the limit of {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(postcard::Error),
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
}

/// `[version][len u32 BE][postcard Offer]`.
pub(crate) fn encode_offer(offer: &Offer) -> Result<Vec<u8>, postcard::Error> {
    let out = postcard::to_extend(offer, vec![PROTOCOL_VERSION, 0, 0, 0, 0])?;
    Ok(finish_length(out, 1))
}

/// `[kind][len u32 BE][postcard]` when `kind` is given, else `[len u32 BE][postcard]`.
pub(crate) fn encode_message<T: Serialize>(
    kind: Option<u8>,
    msg: &T,
) -> Result<Vec<u8>, postcard::Error> {
    let mut out = Vec::with_capacity(64);
    out.extend(kind);
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    let out = postcard::to_extend(msg, out)?;
    Ok(finish_length(out, at))
}

fn finish_length(mut out: Vec<u8>, at: usize) -> Vec<u8> {
    let len = u32::try_from(out.len() - at - 4).unwrap_or(u32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    out
}

/// Reads one byte; a clean end of stream is [`WireError::Closed`].
pub(crate) async fn read_byte<R: AsyncRead + Unpin>(r: &mut R) -> Result<u8, WireError> {
    let mut b = [0u8; 1];
    match r.read(&mut b).await {
        Ok(0) => Err(WireError::Closed),
        Ok(_) => Ok(b[0]),
        Err(e) => Err(WireError::Io(e)),
    }
}

/// Fills `buf`; an end of stream part-way is [`WireError::Truncated`].
pub(crate) async fn read_full<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> Result<(), WireError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(WireError::Truncated),
        Err(e) => Err(WireError::Io(e)),
    }
}

/// Reads `[len u32 BE][postcard]`, checking the length before allocating. `Closed` only when the
/// stream ends before the first byte.
pub(crate) async fn read_message<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
) -> Result<T, WireError> {
    let first = read_byte(r).await?;
    let mut rest = [0u8; 3];
    read_full(r, &mut rest).await?;
    let len = u32::from_be_bytes([first, rest[0], rest[1], rest[2]]) as usize;
    read_body(r, len).await
}

/// Reads a message body of `len` bytes (already announced) and decodes it.
pub(crate) async fn read_body<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    len: usize,
) -> Result<T, WireError> {
    if len > MAX_MESSAGE_BYTES {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    read_full(r, &mut body).await?;
    postcard::from_bytes(&body).map_err(WireError::Malformed)
}

/// Reads the length of a message whose kind byte was already read.
pub(crate) async fn read_length<R: AsyncRead + Unpin>(r: &mut R) -> Result<usize, WireError> {
    let mut len = [0u8; 4];
    read_full(r, &mut len).await?;
    Ok(u32::from_be_bytes(len) as usize)
}

/// Header of a chunk frame, after its kind byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkHeader {
    pub offset: u64,
    pub len: u32,
    pub hash: [u8; 32],
}

impl ChunkHeader {
    /// Writes `[kind][offset][len][hash]` into the first [`CHUNK_HEADER_BYTES`] of `out`.
    pub(crate) fn write(&self, out: &mut [u8]) {
        out[0] = KIND_CHUNK;
        out[1..9].copy_from_slice(&self.offset.to_be_bytes());
        out[9..13].copy_from_slice(&self.len.to_be_bytes());
        out[13..45].copy_from_slice(&self.hash);
    }

    /// Parses the 44 bytes after the kind byte.
    pub(crate) fn parse(raw: &[u8; CHUNK_HEADER_BYTES - 1]) -> Self {
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&raw[0..8]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&raw[8..12]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&raw[12..44]);
        Self {
            offset: u64::from_be_bytes(offset),
            len: u32::from_be_bytes(len),
            hash,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_round_trip() {
        let offer = Offer {
            name: b"a/b.txt".to_vec(),
            size: 7,
            hash: [9; 32],
            chunk_size: 4096,
        };
        let bytes = encode_offer(&offer).unwrap();
        assert_eq!(bytes[0], PROTOCOL_VERSION);
        let mut r = &bytes[1..];
        let back: Offer = read_message(&mut r).await.unwrap();
        assert_eq!(back, offer);
        assert!(r.is_empty());

        let msg = ReceiverMsg::Done {
            name: "x (1).txt".into(),
        };
        let bytes = encode_message(None, &msg).unwrap();
        let back: ReceiverMsg = read_message(&mut &bytes[..]).await.unwrap();
        assert_eq!(back, msg);

        let bytes = encode_message(
            Some(KIND_MESSAGE),
            &SenderMsg::Cancel { reason: "r".into() },
        )
        .unwrap();
        assert_eq!(bytes[0], KIND_MESSAGE);
    }

    #[tokio::test]
    async fn oversized_and_truncated_messages_fail_before_allocating() {
        let huge = [0xff, 0xff, 0xff, 0xff];
        let e = read_message::<_, ReceiverMsg>(&mut &huge[..])
            .await
            .unwrap_err();
        assert!(matches!(e, WireError::TooLarge(_)), "{e:?}");
        let short = [0, 0, 0, 9, 1];
        let e = read_message::<_, ReceiverMsg>(&mut &short[..])
            .await
            .unwrap_err();
        assert!(matches!(e, WireError::Truncated), "{e:?}");
        let e = read_message::<_, ReceiverMsg>(&mut &[][..])
            .await
            .unwrap_err();
        assert!(matches!(e, WireError::Closed), "{e:?}");
        let garbage = [0, 0, 0, 1, 200];
        let e = read_message::<_, ReceiverMsg>(&mut &garbage[..])
            .await
            .unwrap_err();
        assert!(matches!(e, WireError::Malformed(_)), "{e:?}");
    }

    #[test]
    fn chunk_header_round_trips() {
        let h = ChunkHeader {
            offset: 1 << 40,
            len: 262_144,
            hash: [7; 32],
        };
        let mut buf = [0u8; CHUNK_HEADER_BYTES];
        h.write(&mut buf);
        assert_eq!(buf[0], KIND_CHUNK);
        let mut raw = [0u8; CHUNK_HEADER_BYTES - 1];
        raw.copy_from_slice(&buf[1..]);
        assert_eq!(ChunkHeader::parse(&raw), h);
    }
}
