//! Errors of a transfer, worded for the person who sees them.

use std::io;
use std::path::PathBuf;

use crate::name::NameError;
use crate::progress::human_bytes;
use crate::wire::WireError;

/// Which side did something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Party {
    /// This side.
    Local,
    /// The other side.
    Peer,
}

/// Why a receiver refused an offer. Nothing was written to disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The name is not safe (see [`crate::sanitise`]).
    #[error("{0}")]
    Name(NameError),
    /// The sender speaks another version of the protocol.
    #[error("refused: the sender uses file-transfer protocol version {0}, this side speaks version {v}", v = crate::wire::PROTOCOL_VERSION)]
    Version(u8),
    /// The offer is malformed.
    #[error("refused: {0}")]
    Offer(String),
    /// The session's quota would be exceeded.
    #[error(
        "refused: the file needs {} but this session may only receive {} more (limit {})",
        human_bytes(*needed), human_bytes(*remaining), human_bytes(*limit)
    )]
    Quota {
        /// Bytes the file still needs.
        needed: u64,
        /// Bytes the session may still receive.
        remaining: u64,
        /// The session's limit.
        limit: u64,
    },
    /// The target file system is too full.
    #[error(
        "refused: not enough free space in {}: {} free, {} needed",
        dir.display(), human_bytes(*free), human_bytes(*needed)
    )]
    Space {
        /// The folder the file would go to.
        dir: PathBuf,
        /// Bytes available.
        free: u64,
        /// Bytes needed, with the safety margin.
        needed: u64,
    },
    /// A folder on the way to the file is a symbolic link, which is never followed.
    #[error("refused: \"{0}\" in the download folder is a symbolic link; links are never followed")]
    Symlink(String),
    /// Something on the way to the file exists and is not a folder.
    #[error("refused: \"{0}\" already exists in the download folder and is not a folder")]
    NotAFolder(String),
    /// This side does not take files now (policy, view-only session, the user switched it off).
    #[error("refused: {0}")]
    Policy(String),
}

impl Refusal {
    /// The text sent to the other side: like the local one, without local paths.
    pub fn peer_text(&self) -> String {
        match self {
            Refusal::Space { free, needed, .. } => format!(
                "refused: not enough free space on the receiving computer: {} free, {} needed",
                human_bytes(*free),
                human_bytes(*needed)
            ),
            other => other.to_string(),
        }
    }
}

/// How a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// This side (the receiver) refused the offer; the other side was told why.
    #[error("{0}")]
    Refused(Refusal),
    /// The other side refused the offer.
    #[error("the other side did not take the file: {0}")]
    RefusedByPeer(String),
    /// Someone cancelled; the receiver's partial file is deleted.
    #[error("{}", match by {
        Party::Local => format!("cancelled: {reason}"),
        Party::Peer => format!("the other side cancelled: {reason}"),
    })]
    Cancelled {
        /// Who cancelled.
        by: Party,
        /// Their short reason.
        reason: String,
    },
    /// The receiver reported a failure (disk error, corrupt data, …).
    #[error("the other side could not store the file: {0}")]
    PeerFailed(String),
    /// The stream ended early. The receiver keeps what it verified; offering the file again
    /// resumes there.
    #[error(
        "the connection closed before the transfer finished ({} of {}); sending the file again resumes it",
        human_bytes(*done), human_bytes(*total)
    )]
    Disconnected {
        /// Bytes done (including a resumed prefix).
        done: u64,
        /// Size of the file (0 when the offer never arrived).
        total: u64,
    },
    /// The stream failed.
    #[error("the connection failed: {0}")]
    Stream(#[source] io::Error),
    /// The other side broke the protocol (oversized frame, wrong offset, more data than offered, …).
    #[error("the other side broke the transfer protocol: {0}")]
    Protocol(String),
    /// A chunk did not match its hash.
    #[error("the data at byte {offset} did not match its checksum: it was corrupted on the way")]
    ChunkCorrupt {
        /// Where the chunk starts.
        offset: u64,
    },
    /// The whole file did not match the offered hash; the partial file was deleted.
    #[error(
        "the received file does not match the sender's checksum (the file may have changed while it was sent); \
         it was deleted, sending it again starts over"
    )]
    HashMismatch {
        /// Offered hash, hex.
        expected: String,
        /// Hash of what arrived, hex.
        actual: String,
    },
    /// A local file operation failed.
    #[error("{}: {source}", path.display())]
    File {
        /// The file or folder concerned.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The file to send is not usable (not a regular file, changed size, …).
    #[error("{}: {reason}", path.display())]
    Source {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Invalid options (chunk size out of range).
    #[error("invalid transfer options: {0}")]
    Options(String),
}

impl TransferError {
    /// A local I/O error about `path`.
    pub(crate) fn file(path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::File {
            path: path.into(),
            source,
        }
    }

    /// Maps a wire error while `done` of `total` bytes were through.
    pub(crate) fn from_wire(e: WireError, done: u64, total: u64) -> Self {
        match e {
            WireError::Closed | WireError::Truncated => Self::Disconnected { done, total },
            WireError::Io(e) => Self::Stream(e),
            other => Self::Protocol(other.to_string()),
        }
    }

    /// Whether the receiver keeps its partial file after this error (only when the stream
    /// broke: a later offer of the same file resumes).
    pub(crate) fn keeps_partial(&self) -> bool {
        matches!(self, Self::Disconnected { .. } | Self::Stream(_))
    }
}

/// Why a folder could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The path cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// Neither a regular file nor a folder.
    #[error("{}: only files and folders can be sent", .0.display())]
    NotAFile(PathBuf),
    /// The path has no usable name (`/`, `..`) or its name is refused.
    #[error("{}: {reason}", path.display())]
    BadName {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Too many files.
    #[error("{}: more than {limit} files; send a smaller folder or an archive", path.display())]
    TooManyFiles {
        /// The folder.
        path: PathBuf,
        /// The limit.
        limit: usize,
    },
}
