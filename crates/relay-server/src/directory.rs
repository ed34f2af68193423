//! The slot directory of a relay cluster: which node holds the agent waiting on a slot, kept in
//! the shared PostgreSQL store so that a code is unique across the cluster and a console that
//! reaches another node is redirected to the agent's.
//!
//! Decisions written down:
//! * **Redirect, not node-to-node forwarding.** A console that joins on the wrong node is told the
//!   agent's node ([`tandem_proto::RelayMsg::Redirect`]) and connects there itself: one more QUIC
//!   handshake and login at join time, then the session costs one node's CPU and one hop, as on a
//!   lone relay. Forwarding between nodes would cost two nodes' CPU and a second hop of latency for
//!   the whole session, and an authenticated node-to-node link to run; the README's cluster
//!   section has the measured join times.
//! * **The directory is only asked at registration and at a join the node cannot serve itself.**
//!   Forwarding never touches it. A registration whose claim the store cannot answer (PostgreSQL
//!   restarting) goes on with the code valid on this node only (consoles that reach this node
//!   join it; others are told the code is unknown), rather than keep the user without a code.
//! * A row lives until the slot's expiry (at least [`MIN_ROW_LIFE`], the quarantine of an ended
//!   code on a lone relay), whatever happens to the slot before: so no other node hands out the
//!   same code while a late console could still type it. Rows older than an hour past expiry are
//!   swept; a node that starts forgets the rows it left.
//! * Join attempts per technician are counted across the cluster too (fixed one-minute windows in
//!   the store, on top of each node's own bucket), so a technician's limit is not multiplied by the
//!   number of nodes. While the store cannot answer, each node's own limit still holds.
//! * Times compared across nodes (a code's expiry, a node's last heartbeat) are the database's
//!   clock, never a node's: nodes whose clocks differ agree on them.
//! * Every node says it is alive every [`HEARTBEAT`]; a node silent for [`NODE_LOST_AFTER`] died
//!   without draining, and the others close its sessions' audit rows (`node_lost`, ended when it
//!   was last seen) and forget its codes. A node judges others only once its own heartbeats have
//!   gone through for longer than that (after a database outage all are silent for a while); a
//!   node that was taken for lost while it could not reach the database claims its codes again
//!   (an audit row closed as `node_lost` meanwhile gets its real end when the session ends).
//! * Each start of a node has a random id: a second node started with the name of a live one is
//!   refused (it would close the first one's sessions and take its codes).
//! * One thread with its own store connection serves the directory; requests wait at most
//!   [`ANSWER_WITHIN`] and a full queue answers "unavailable" at once (never blocks a task).

use crate::server::lock;
use crate::store::{Store, StoreError};
use std::sync::mpsc as smpsc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Requests waiting for the directory thread at most.
const QUEUE: usize = 1024;
/// Longest a task waits for the directory.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);
/// How often expired rows are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// How often a node says it is alive (the `nodes` table).
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A node not heard of for this long is taken for dead: the other nodes close the audit rows of
/// its sessions (as `node_lost`) and forget its codes.
pub const NODE_LOST_AFTER: Duration = Duration::from_secs(15);
/// A claimed slot stays reserved at least this long (a late join gets the right node).
pub const MIN_ROW_LIFE: Duration = Duration::from_secs(60);

/// Where a slot's agent waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub node: String,
    /// The node's address for clients (`advertise`).
    pub address: String,
}

enum Job {
    Claim {
        slot: String,
        life: Duration,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    Lookup {
        slot: String,
        reply: oneshot::Sender<Result<Option<Holder>, StoreError>>,
    },
    /// A join attempt to count; the cluster-wide count comes back in [`Directory::joins`].
    Join { technician: i64 },
}

/// Cluster-wide join attempts per technician in the current minute, as the store last counted
/// them, and when.
type JoinCounts =
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<i64, (std::time::Instant, i64)>>>;

pub struct Directory {
    tx: smpsc::SyncSender<Job>,
    node: String,
    joins: JoinCounts,
}

impl Directory {
    /// Starts the directory's thread on `store` (its own connection), after forgetting the rows
    /// this node left behind. Blocks: call it from a blocking thread.
    pub fn start(store: Store, node: &str, address: &str) -> Result<Directory, StoreError> {
        let boot = boot_id()?;
        let lost_after = NODE_LOST_AFTER.as_millis() as i64;
        if let Err(ago) = store.node_join(node, address, &boot, lost_after)? {
            return Err(StoreError::NodeTaken {
                node: node.to_string(),
                secs: ago / 1000,
                wait: (lost_after - ago).max(0) / 1000 + 1,
            });
        }
        let forgotten = store.slots_forget_node(node)?;
        if forgotten > 0 {
            tracing::info!(
                slots = forgotten,
                "forgot the codes this node held before it stopped"
            );
        }
        let (tx, rx) = smpsc::sync_channel::<Job>(QUEUE);
        let (node_s, address_s) = (node.to_string(), address.to_string());
        let joins = JoinCounts::default();
        let counts = joins.clone();
        std::thread::Builder::new()
            .name("tandem-directory".into())
            .spawn(move || serve(store, rx, &node_s, &address_s, &boot, &counts))
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot start the directory thread: {e}"))
            })?;
        Ok(Directory {
            tx,
            node: node.to_string(),
            joins,
        })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    async fn ask<T>(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Job,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx.try_send(job(reply)).map_err(|_| {
            StoreError::Unavailable("the slot directory is overloaded or stopped".into())
        })?;
        match tokio::time::timeout(ANSWER_WITHIN, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(StoreError::Unavailable("the slot directory stopped".into())),
            Err(_) => Err(StoreError::Unavailable(
                "the slot directory did not answer in time".into(),
            )),
        }
    }

    /// Claims `slot` for this node for `life`: `false` when another node holds it.
    pub async fn claim(&self, slot: &str, life: Duration) -> Result<bool, StoreError> {
        let slot = slot.to_string();
        self.ask(|reply| Job::Claim { slot, life, reply }).await
    }

    /// Counts a join attempt of `technician` across the cluster, without waiting for the store:
    /// whether the cluster's count as the store last gave it (within the last minute) leaves room
    /// for it. The count goes to the store in the background, so a join never waits on the
    /// database; a burst over several nodes at once may pass a few more than `per_minute` before
    /// the counts come back (each node's own limit holds regardless).
    pub fn join_allowed(&self, technician: i64, per_minute: u32) -> bool {
        let allowed = match lock(&self.joins).get(&technician) {
            Some((at, n)) => at.elapsed() >= JOIN_WINDOW || *n < i64::from(per_minute),
            None => true,
        };
        let _ = self.tx.try_send(Job::Join { technician });
        allowed
    }

    /// Which node holds `slot`, if any.
    pub async fn lookup(&self, slot: &str) -> Result<Option<Holder>, StoreError> {
        let slot = slot.to_string();
        self.ask(|reply| Job::Lookup { slot, reply }).await
    }
}

/// A random id of this start of the node (tells a node from another of the same name).
fn boot_id() -> Result<String, StoreError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| StoreError::Random)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// How long a cluster-wide join count is taken as current.
const JOIN_WINDOW: Duration = Duration::from_secs(60);

fn serve(
    store: Store,
    rx: smpsc::Receiver<Job>,
    node: &str,
    address: &str,
    boot: &str,
    joins: &JoinCounts,
) {
    use std::time::Instant;
    let mut last_sweep = Instant::now();
    let mut last_beat: Option<Instant> = None;
    let mut last_watch = Instant::now();
    // Since when this node's heartbeats have gone through without a gap: it judges others only
    // after being heard itself for longer than they may be silent (after a database outage every
    // node is silent for a while, and the first one back must not take the others for dead).
    let mut heard_since: Option<Instant> = Some(Instant::now());
    // The codes this node claimed, until they expire: claimed again if the others took this node
    // for dead (and deleted its codes) while it could not reach the database.
    let mut claimed: std::collections::HashMap<String, Instant> = Default::default();
    loop {
        match rx.recv_timeout(HEARTBEAT) {
            // Askers that gave up (their wait is over) are not served: a backlog drains fast.
            Ok(Job::Claim { reply, .. }) if reply.is_closed() => {}
            Ok(Job::Lookup { reply, .. }) if reply.is_closed() => {}
            Ok(Job::Claim { slot, life, reply }) => {
                let life = life.max(MIN_ROW_LIFE);
                let ms = life.as_millis().min(i64::MAX as u128) as i64;
                let r = store.slot_claim(&slot, node, address, ms);
                if matches!(r, Ok(true)) {
                    claimed.insert(slot, Instant::now() + life);
                }
                let _ = reply.send(r);
            }
            Ok(Job::Lookup { slot, reply }) => {
                let _ = reply.send(
                    store
                        .slot_lookup(&slot)
                        .map(|h| h.map(|(node, address)| Holder { node, address })),
                );
            }
            Ok(Job::Join { technician }) => match store.join_attempt(technician) {
                Ok(n) => {
                    let mut counts = lock(joins);
                    counts.retain(|_, (at, _)| at.elapsed() < JOIN_WINDOW);
                    counts.insert(technician, (Instant::now(), n));
                }
                Err(e) => tracing::debug!(error = %e, "could not count a join in the cluster"),
            },
            Err(smpsc::RecvTimeoutError::Timeout) => {}
            Err(smpsc::RecvTimeoutError::Disconnected) => {
                // Drained: this node's codes and its place in the cluster go.
                let _ = store.slots_forget_node(node);
                let _ = store.node_leave(node);
                return;
            }
        }
        if last_beat.is_none_or(|t| t.elapsed() >= HEARTBEAT) {
            last_beat = Some(Instant::now());
            match store.node_heartbeat(node, address, boot) {
                Ok(known) => {
                    heard_since.get_or_insert_with(Instant::now);
                    if !known {
                        claimed.retain(|_, until| *until > Instant::now());
                        tracing::warn!(
                            codes = claimed.len(),
                            "the other nodes took this node for lost while it could not reach the database; claiming its codes again"
                        );
                        for (slot, until) in &claimed {
                            let left = until.saturating_duration_since(Instant::now());
                            let ms = left.as_millis().min(i64::MAX as u128) as i64;
                            let _ = store.slot_claim(slot, node, address, ms);
                        }
                    }
                }
                Err(e) => {
                    heard_since = None;
                    tracing::debug!(error = %e, "could not tell the cluster this node is alive");
                }
            }
        }
        let judged = heard_since.is_some_and(|t| t.elapsed() > NODE_LOST_AFTER + HEARTBEAT);
        if judged && last_watch.elapsed() >= HEARTBEAT * 2 {
            last_watch = Instant::now();
            match store.close_lost_nodes(NODE_LOST_AFTER.as_millis() as i64) {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    sessions = n,
                    "a relay node stopped answering; closed the audit rows of its sessions"
                ),
                Err(e) => tracing::debug!(error = %e, "could not look for lost nodes"),
            }
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = Instant::now();
            claimed.retain(|_, until| *until > Instant::now());
            if let Err(e) = store.slots_sweep(3_600_000) {
                tracing::debug!(error = %e, "could not sweep the slot directory");
            }
        }
    }
}
