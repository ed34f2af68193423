//! The transfers of one session: each file on a task of its own, reported as [`TransferEvent`]s,
//! cancelled by id or all at once. Used the same way by the agent and the console; the program
//! decides what to accept (policy) and shows the events.
//!
//! Streams come from the caller (a QUIC bidirectional stream per file in Tandem); sending a plan
//! opens one stream per file through the `open` function, at most [`PARALLEL`] at once.

use crate::error::TransferError;
use crate::pace::{Pacer, RttSource};
use crate::plan::Outgoing;
use crate::progress::Progress;
use crate::recv::{Inbox, receive_file, refuse};
use crate::send::{SendOptions, send_file};
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

/// Files sent at once (each on its own stream); more wait their turn.
pub const PARALLEL: usize = 3;

/// Which way a transfer goes, seen from this side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Outgoing,
    Incoming,
}

/// What happened to a transfer.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TransferEvent {
    /// Progress (throttled by the protocol to about ten a second).
    Progress {
        id: u64,
        direction: Direction,
        progress: Progress,
    },
    /// Finished and verified by the receiver.
    Done {
        id: u64,
        direction: Direction,
        /// The name as offered (`folder/file.txt`).
        name: String,
        /// The receiver's name for it (it never overwrites: `report (1).pdf`).
        stored_as: String,
        /// Incoming: where it was saved.
        path: Option<PathBuf>,
        size: u64,
        /// Bytes that crossed in this transfer (less than `size` when it resumed).
        transferred: u64,
        resumed_from: u64,
        /// BLAKE3 of the file, hex.
        hash: String,
    },
    /// Failed, refused or cancelled; `error` says why in words.
    Failed {
        id: u64,
        direction: Direction,
        name: String,
        error: String,
        cancelled: bool,
    },
}

impl TransferEvent {
    pub fn id(&self) -> u64 {
        match self {
            TransferEvent::Progress { id, .. }
            | TransferEvent::Done { id, .. }
            | TransferEvent::Failed { id, .. } => *id,
        }
    }
}

/// The transfers of one session.
#[derive(Clone)]
pub struct Transfers {
    tx: mpsc::UnboundedSender<TransferEvent>,
    next: Arc<AtomicU64>,
    running: Arc<Mutex<HashMap<u64, CancellationToken>>>,
    /// Cancelled when the session ends (every task stops; partial files stay for a resume).
    all: CancellationToken,
    parallel: Arc<Semaphore>,
    options: SendOptions,
}

impl Transfers {
    pub fn new() -> (Transfers, mpsc::UnboundedReceiver<TransferEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Transfers {
                tx,
                next: Arc::new(AtomicU64::new(1)),
                running: Arc::default(),
                all: CancellationToken::new(),
                parallel: Arc::new(Semaphore::new(PARALLEL)),
                options: SendOptions::default(),
            },
            rx,
        )
    }

    fn start(&self) -> (u64, CancellationToken) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let token = self.all.child_token();
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, token.clone());
        (id, token)
    }

    fn finish(&self, id: u64) {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Paces outgoing files by the session's RTT (see [`Pacer`]): they then take only what
    /// the screen and input leave. Call before sending.
    pub fn pace_by(&mut self, rtt: RttSource) {
        self.options.pacer = Some(Arc::new(Pacer::new(rtt)));
    }

    /// Transfers under way.
    pub fn active(&self) -> usize {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Cancels one transfer (the other side is told; a partial incoming file is deleted).
    pub fn cancel(&self, id: u64) -> bool {
        match self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
        {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }

    /// Stops everything (the session ends).
    pub fn stop_all(&self) {
        self.all.cancel();
    }

    fn failed(&self, id: u64, direction: Direction, name: String, e: &TransferError) {
        let _ = self.tx.send(TransferEvent::Failed {
            id,
            direction,
            name,
            error: e.to_string(),
            cancelled: matches!(e, TransferError::Cancelled { .. }),
        });
    }

    /// Sends `items`, each on a stream from `open`, at most [`PARALLEL`] at once. Returns their
    /// ids in order.
    pub fn send_all<F, Fut, R, W>(&self, open: F, items: Vec<Outgoing>) -> Vec<u64>
    where
        F: Fn() -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(R, W), String>> + Send,
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut ids = Vec::with_capacity(items.len());
        for item in items {
            let (id, cancel) = self.start();
            ids.push(id);
            let (me, open) = (self.clone(), open.clone());
            tokio::spawn(async move {
                let r = async {
                    let _permit = tokio::select! {
                        p = me.parallel.clone().acquire_owned() => p.map_err(|_| "stopped".to_string())?,
                        () = cancel.cancelled() => return Err("cancelled before it started".to_string()),
                    };
                    let (r, w) = open().await?;
                    let tx = me.tx.clone();
                    send_file(
                        r,
                        w,
                        &item,
                        &me.options,
                        |p: &Progress| {
                            let _ = tx.send(TransferEvent::Progress {
                                id,
                                direction: Direction::Outgoing,
                                progress: p.clone(),
                            });
                        },
                        &cancel,
                    )
                    .await
                    .map_err(|e| e.to_string())
                }
                .await;
                match r {
                    Ok(sent) => {
                        let _ = me.tx.send(TransferEvent::Done {
                            id,
                            direction: Direction::Outgoing,
                            name: item.name.clone(),
                            stored_as: sent.receiver_name,
                            path: None,
                            size: sent.size,
                            transferred: sent.bytes_sent,
                            resumed_from: sent.resumed_from,
                            hash: sent.hash,
                        });
                    }
                    Err(e) => {
                        let _ = me.tx.send(TransferEvent::Failed {
                            id,
                            direction: Direction::Outgoing,
                            name: item.name.clone(),
                            cancelled: cancel.is_cancelled(),
                            error: e,
                        });
                    }
                }
                me.finish(id);
            });
        }
        ids
    }

    /// Receives the file offered on this stream into `inbox`.
    pub fn receive<R, W>(&self, r: R, w: W, inbox: Inbox) -> u64
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (id, cancel) = self.start();
        let me = self.clone();
        tokio::spawn(async move {
            let tx = me.tx.clone();
            let mut name = String::new();
            let r = receive_file(
                r,
                w,
                &inbox,
                |p: &Progress| {
                    if name.is_empty() {
                        name = p.name.clone();
                    }
                    let _ = tx.send(TransferEvent::Progress {
                        id,
                        direction: Direction::Incoming,
                        progress: p.clone(),
                    });
                },
                &cancel,
            )
            .await;
            match r {
                Ok(got) => {
                    let _ = me.tx.send(TransferEvent::Done {
                        id,
                        direction: Direction::Incoming,
                        name: got.offered_name,
                        stored_as: got.name,
                        path: Some(got.path),
                        size: got.size,
                        transferred: got.size - got.resumed_from.min(got.size),
                        resumed_from: got.resumed_from,
                        hash: got.hash,
                    });
                }
                Err(e) => me.failed(id, Direction::Incoming, name, &e),
            }
            me.finish(id);
        });
        id
    }

    /// Refuses the file offered on this stream (policy: view only, switched off), reporting it
    /// as a failed incoming transfer.
    pub fn refuse<R, W>(&self, r: R, w: W, reason: String)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let name = match refuse(r, w, &reason).await {
                Ok(o) => o.name,
                Err(_) => String::new(),
            };
            let _ = tx.send(TransferEvent::Failed {
                id,
                direction: Direction::Incoming,
                name,
                error: format!("refused: {reason}"),
                cancelled: false,
            });
        });
    }
}

/// One file transfer as a window shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct TransferRow {
    pub id: u64,
    pub direction: Direction,
    pub name: String,
    pub fraction: f32,
    /// "3.4 MB of 20 MB, 2.1 MB/s, 8 s left", "done (20 MB), saved as …", or why it failed.
    pub line: String,
    pub finished: bool,
}

/// The transfers of a session as rows for a window (bounded: the oldest go).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TransferList {
    pub rows: Vec<TransferRow>,
}

/// Most rows kept.
const MAX_ROWS: usize = 200;

impl TransferList {
    /// Applies an event: a new row for a new transfer, else an update of its row.
    pub fn apply(&mut self, e: &TransferEvent) {
        let id = e.id();
        let idx = match self.rows.iter().position(|r| r.id == id) {
            Some(i) => i,
            None => {
                if self.rows.len() >= MAX_ROWS {
                    self.rows.remove(0);
                }
                let (direction, name) = match e {
                    TransferEvent::Progress {
                        direction,
                        progress,
                        ..
                    } => (*direction, progress.name.clone()),
                    TransferEvent::Done {
                        direction, name, ..
                    }
                    | TransferEvent::Failed {
                        direction, name, ..
                    } => (*direction, name.clone()),
                };
                self.rows.push(TransferRow {
                    id,
                    direction,
                    name,
                    fraction: 0.0,
                    line: String::new(),
                    finished: false,
                });
                self.rows.len() - 1
            }
        };
        let row = &mut self.rows[idx];
        match e {
            TransferEvent::Progress { progress, .. } => {
                row.fraction = progress.fraction() as f32;
                row.line = progress.line();
            }
            TransferEvent::Done {
                stored_as, size, ..
            } => {
                row.fraction = 1.0;
                row.finished = true;
                row.line = format!(
                    "done ({}), saved as {stored_as}",
                    crate::progress::human_bytes(*size)
                );
            }
            TransferEvent::Failed { error, .. } => {
                row.finished = true;
                row.line = error.clone();
            }
        }
    }
}
