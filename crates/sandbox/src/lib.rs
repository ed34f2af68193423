//! The technician's console decodes a stranger's video: OpenH264 is C++ and has had memory bugs
//! found here (fuzz/README.md). This crate runs the decoder in a child process that can do nothing
//! else, so a bug exploited through a hostile agent's bytes reaches neither the technician's token
//! nor their files, network or other processes.
//!
//! * The child is the console binary itself, started again with [`WORKER_ARG`] (the console's
//!   `main` hands it to [`worker::main`] before anything else), with an empty environment, `/` as
//!   its directory and exactly three descriptors: a socket for requests and answers (fd 0), the
//!   picture memory (fd 1) and a pipe for its log lines (fd 2).
//! * Before it reads a byte of video it locks itself down ([`lockdown`]): an address-space limit
//!   (1 GiB), `no_new_privs`, a landlock ruleset with no filesystem or TCP access and no signals
//!   or abstract sockets outside itself, and a seccomp allow-list of 20-odd system calls, most of
//!   them bound to its own descriptors. Anything else kills it, or fails with `EPERM` for opening
//!   files and sockets.
//! * Compressed frames go to it over the socket, length-prefixed and capped ([`protocol`]);
//!   pictures come back through shared memory (a sealed memfd) as I420, and the console makes
//!   RGBA of them.
//! * [`SandboxedDecoder`] restarts a child that crashed, hung or broke the protocol, with a
//!   growing pause, and gives up after [`RestartPolicy::max_crashes`] crashes in a short time.
//!
//! # Why pread/pwrite on a memfd, not a mapping, not the socket
//! Measured on the reference 2-core machine, one 1080p picture from the child to the console
//! (200 pictures, three runs, the machine busy with other builds):
//!
//! | way | I420 (3.1 MB) | RGBA (8.3 MB) |
//! |---|---|---|
//! | pipe | 0.8–6.1 ms | 2.3–5.5 ms |
//! | memfd, `pwrite` in the child, `pread` here | 0.37–0.6 ms | 1.4–2.9 ms |
//! | memfd mapped in both | 0.13–0.32 ms | 0.48–0.84 ms |
//!
//! Sending I420 and converting here (≈0.6 ms, as before) beats sending RGBA in every row. The
//! mapping would save a further ≈0.25 ms a frame but needs `unsafe` on both sides and, worse, a
//! mapping the child can write while the console reads it is a data race the compiler may
//! assume away; `pread` copies under the kernel's control, with no `unsafe` anywhere. At ≈2.8 ms
//! of decoding a frame, 0.25 ms was not worth that.
//!
//! The whole round trip, release build, 1080p screen-like stream, median of 52 frames
//! (`tests/tests/decoder_sandbox.rs`, `sandboxed_decoding_matches_and_costs_little`): decoding to
//! RGBA in the console's process 3.48 ms; sandboxed 4.29 ms (request to answer 3.73 ms: decode,
//! packing and `pwrite` in the child; `pread` and RGBA here 0.59 ms), so ≈0.8 ms a frame for the
//! sandbox. Starting a decoder process (spawn until locked down and ready): 3.4–4 ms.

pub mod lockdown;
pub mod protocol;
pub mod shm;
mod supervisor;
pub mod worker;

pub use supervisor::{
    Decoded, Replied, RestartPolicy, SandboxError, SandboxedDecoder, WorkerCommand, WorkerProcess,
    pause_after,
};

/// The hidden first argument that makes the console binary a decoder process.
pub const WORKER_ARG: &str = "--decode-worker";
