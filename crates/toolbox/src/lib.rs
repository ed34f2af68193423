//! Toolbox file transfer: one file per bidirectional stream, both directions (technician → user
//! and user → technician), resumable across sessions and verified with BLAKE3.
//!
//! The protocol runs over any `AsyncRead` + `AsyncWrite` pair (in production a QUIC bidirectional
//! stream whose kind byte the session layer has already read). Each side treats the other as
//! hostile.
//!
//! * Sender: [`plan`] a file or folder into [`Outgoing`] files, then [`send_file`] each on its own
//!   stream.
//! * Receiver: one [`Inbox`] per session (target folder + quota), [`receive_file`] per stream, or
//!   [`refuse`] when policy says no.
//!
//! # Flow
//!
//! 1. The sender hashes the whole file (BLAKE3) and sends an **Offer**: name, size, hash, chunk size.
//! 2. The receiver checks the name ([`sanitise`]), the chunk size, the session quota and the free
//!    disk space. Any "no" is a **Refuse** with a reason, and nothing is written to disk.
//! 3. Otherwise it opens (or creates) the partial file `.tandem-<first 16 hex of the hash>.part`
//!    in the target folder, hashes what that file already holds, and answers **Accept** with the
//!    offset to start from: the partial's length rounded down to a chunk boundary. That is how a
//!    transfer cut off in an earlier session resumes.
//! 4. The sender seeks there and sends chunk frames, each with its offset and hash. The receiver
//!    checks each header before reading the data (the offset must be the next byte, the length
//!    must be exactly one chunk or the remainder, never past the offered size), verifies the hash,
//!    and writes the chunk. Meanwhile the sender keeps reading the receiver's direction, so a
//!    Cancel or a failure is seen at once.
//! 5. At the end, the receiver merges the chunks' hashes into the file's and compares, fsyncs, and renames the partial to
//!    the offered name. If that name exists it uses `name (1).ext`, `name (2).ext`, …, because a
//!    file is never overwritten. The rename uses `RENAME_NOREPLACE`, so a race cannot replace a
//!    file either. It answers **Done** with the name used, which both sides show.
//!
//! # What survives a failure
//!
//! The receiver keeps the partial file only when the stream breaks (end of stream or an I/O error
//! in the middle). The partial then holds verified chunks only, and offering the same file again
//! resumes from it. Its bytes stay counted against the session quota. Every other outcome deletes
//! the partial: a cancel from either side (that is the user's intent), a corrupt chunk, a protocol
//! violation, a local write error, or a whole-file hash mismatch.
//!
//! # Wire format (version 2)
//!
//! All integers are big-endian. Control messages are [postcard]-encoded, and each frame carries at
//! most [`MAX_MESSAGE_BYTES`] of them.
//!
//! Sender → receiver:
//!
//! ```text
//! offer:   [version u8 = 1][len u32][postcard Offer { name: bytes, size: u64, hash: [u8; 32], chunk_size: u32 }]
//! then any number of
//! chunk:   ['C'][offset u64][len u32][the chunk's BLAKE3 chaining value, 32 bytes][data: len bytes]
//! message: ['M'][len u32][postcard SenderMsg]        SenderMsg = Cancel { reason }
//! ```
//!
//! Receiver → sender:
//!
//! ```text
//! message: [len u32][postcard ReceiverMsg]
//! ReceiverMsg = Accept { offset } | Refuse { reason } | Cancel { reason } | Done { name } | Failed { reason }
//! ```
//!
//! Chunks are exactly `chunk_size` bytes, except the last one, which holds the rest.
//! A chunk's hash is its BLAKE3 chaining value at its offset (the subtree of BLAKE3's own tree it
//! is; for a file of a single chunk, the file's hash), so the file's hash is merged from the chunks'
//! and every byte is hashed once on each side (version 1 hashed each chunk on its own and the
//! file again: three passes instead of two; see `tree.rs`). `chunk_size` must be a power of two
//! between [`MIN_CHUNK_SIZE`] and [`MAX_CHUNK_SIZE`]; the default is
//! [`DEFAULT_CHUNK_SIZE`]. A receiver that does not know the offer's version refuses it.
//!
//! # Receiver-side safety
//!
//! Path-traversal bugs in this exact feature have been remote-code-execution bugs elsewhere
//! (ScreenConnect CVE-2024-1708, SimpleHelp CVE-2024-57727). So:
//!
//! * Names that are not plainly safe are refused, not repaired (see [`NameError`]).
//! * Every folder is opened relative to its parent with `O_NOFOLLOW | O_DIRECTORY`. A symbolic
//!   link anywhere below the target folder is refused, never followed. The partial file is opened
//!   with `O_NOFOLLOW` too (and created with `O_EXCL`), and it is `flock`ed so that two transfers
//!   never share it.
//! * Every length read from the stream is checked before anything is allocated or read.
//!
//! The free-space check does not subtract other transfers still under way into the same file
//! system; the session quota bounds that.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod error;
mod fsops;
mod manager;
mod name;
mod pace;
mod plan;
mod policy;
mod progress;
mod recv;
mod send;
mod tree;
mod wire;

pub use error::{Party, PlanError, Refusal, TransferError};
pub use manager::{Direction, PARALLEL, TransferEvent, TransferList, TransferRow, Transfers};
pub use name::{
    MAX_COMPONENT_BYTES, MAX_DEPTH, MAX_NAME_BYTES, NameError, PARTIAL_PREFIX, candidate_name,
    display_text, sanitise,
};
pub use pace::{Pacer, RttSource, Scavenger};
pub use plan::{MAX_PLAN_FILES, Outgoing, Plan, Skipped, plan};
pub use policy::{DEFAULT_FREE_SPACE_MARGIN, DEFAULT_QUOTA};
pub use progress::{Progress, Stage, human_bytes, human_duration, human_rate};
pub use recv::{Inbox, InboxOptions, OfferSummary, Received, receive_file, refuse};
pub use send::{SendOptions, Sent, send_file};
pub use wire::{
    DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MAX_MESSAGE_BYTES, MIN_CHUNK_SIZE, PROTOCOL_VERSION,
};
