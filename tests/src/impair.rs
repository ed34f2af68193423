//! A userspace UDP impairment proxy (netem is not available in this kernel): one-way delay, jitter
//! (which also reorders), random loss, duplication, a bandwidth cap with a bounded queue (tail
//! drop, like a router), and a switch that cuts the path entirely. Clients connect to
//! [`ImpairProxy::addr`] instead of the relay; each client address gets its own upstream socket, so
//! the relay sees an ordinary client behind a NAT.
//!
//! Randomness is a seeded xorshift: a run is repeatable up to the scheduler's timing.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What one direction of the path does to packets.
#[derive(Clone, Copy, Debug)]
pub struct Impairment {
    /// One-way delay.
    pub delay: Duration,
    /// Each packet's delay varies uniformly by ± this much (packets may overtake each other).
    pub jitter: Duration,
    /// Probability that a packet is lost.
    pub loss: f64,
    /// Probability that a packet is delivered twice.
    pub duplicate: f64,
    /// Bandwidth cap in bit/s.
    pub rate_bps: Option<u64>,
    /// Longest a packet may wait for the capped link before it is dropped.
    pub queue: Duration,
}

impl Default for Impairment {
    fn default() -> Self {
        Impairment {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            rate_bps: None,
            queue: Duration::from_millis(200),
        }
    }
}

impl Impairment {
    /// A path with this round-trip time split evenly and this loss rate each way.
    pub fn rtt_loss(rtt: Duration, loss: f64) -> Impairment {
        Impairment {
            delay: rtt / 2,
            loss,
            ..Impairment::default()
        }
    }
}

/// Counters of one proxy.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub forwarded: AtomicU64,
    pub lost: AtomicU64,
    pub queue_drops: AtomicU64,
    pub duplicated: AtomicU64,
    pub cut_drops: AtomicU64,
}

/// The pure part: decides when (and whether, and how often) a packet leaves.
struct Link {
    imp: Impairment,
    rng: u64,
    /// When the capped link has sent everything queued so far.
    link_free: Option<Instant>,
}

enum Fate {
    Lost,
    QueueFull,
    Depart(Vec<Instant>),
}

impl Link {
    fn new(imp: Impairment, seed: u64) -> Link {
        Link {
            imp,
            rng: seed | 1,
            link_free: None,
        }
    }

    fn rand(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    fn schedule(&mut self, now: Instant, len: usize) -> Fate {
        if self.imp.loss > 0.0 && self.rand() < self.imp.loss {
            return Fate::Lost;
        }
        let sent = match self.imp.rate_bps {
            Some(rate) if rate > 0 => {
                let start = self.link_free.map_or(now, |f| f.max(now));
                let done = start + Duration::from_secs_f64(len as f64 * 8.0 / rate as f64);
                if done.duration_since(now) > self.imp.queue {
                    return Fate::QueueFull;
                }
                self.link_free = Some(done);
                done
            }
            _ => now,
        };
        let copies = if self.imp.duplicate > 0.0 && self.rand() < self.imp.duplicate {
            2
        } else {
            1
        };
        let mut out = Vec::with_capacity(copies);
        for _ in 0..copies {
            let j = self.imp.jitter.as_secs_f64() * (2.0 * self.rand() - 1.0);
            let d = (self.imp.delay.as_secs_f64() + j).max(0.0);
            out.push(sent + Duration::from_secs_f64(d));
        }
        Fate::Depart(out)
    }
}

type Item = (Instant, u64, Vec<u8>);

/// Sends packets at their departure times, in departure order.
async fn pacer(
    socket: Arc<UdpSocket>,
    dest: Option<SocketAddr>,
    mut rx: mpsc::UnboundedReceiver<Item>,
) {
    let mut heap: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut bodies: HashMap<u64, Vec<u8>> = HashMap::new();
    loop {
        let next = heap.peek().map(|Reverse((t, _))| *t);
        tokio::select! {
            item = rx.recv() => match item {
                Some((t, seq, body)) => {
                    heap.push(Reverse((t, seq)));
                    bodies.insert(seq, body);
                }
                None => return,
            },
            () = async { match next { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                let now = Instant::now();
                while let Some(Reverse((t, seq))) = heap.peek().copied() {
                    if t > now {
                        break;
                    }
                    heap.pop();
                    if let Some(b) = bodies.remove(&seq) {
                        let _ = match dest {
                            Some(d) => socket.send_to(&b, d).await,
                            None => socket.send(&b).await,
                        };
                    }
                }
            }
        }
    }
}

pub struct ImpairProxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    pub stats: Arc<ProxyStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ImpairProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn udp(addr: SocketAddr) -> UdpSocket {
    let s = tandem_net::bind_udp(addr).unwrap();
    s.set_nonblocking(true).unwrap();
    UdpSocket::from_std(s).unwrap()
}

impl ImpairProxy {
    /// A proxy in front of `upstream`: `up` applies to client → upstream, `down` to the way back.
    pub async fn start(upstream: SocketAddr, up: Impairment, down: Impairment) -> ImpairProxy {
        let front = Arc::new(udp("127.0.0.1:0".parse().unwrap()));
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ProxyStats::default());
        let (c, st) = (cut.clone(), stats.clone());
        let task = tokio::spawn(async move {
            let mut clients: HashMap<SocketAddr, (Link, mpsc::UnboundedSender<Item>)> =
                HashMap::new();
            let mut tasks = tokio::task::JoinSet::new();
            let mut buf = vec![0u8; 65536];
            let mut seq = 0u64;
            loop {
                let Ok((n, from)) = front.recv_from(&mut buf).await else {
                    return;
                };
                let (link, tx) = clients.entry(from).or_insert_with(|| {
                    // A new client: its own upstream socket and a pacer each way.
                    let back = Arc::new(udp("127.0.0.1:0".parse().unwrap()));
                    let _ = back.local_addr();
                    let (up_tx, up_rx) = mpsc::unbounded_channel();
                    let (down_tx, down_rx) = mpsc::unbounded_channel();
                    let b2 = back.clone();
                    tasks.spawn(async move {
                        if b2.connect(upstream).await.is_ok() {
                            pacer(b2, None, up_rx).await;
                        }
                    });
                    tasks.spawn(pacer(front.clone(), Some(from), down_rx));
                    let (c, st) = (c.clone(), st.clone());
                    let seed = (from.port() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    tasks.spawn(async move {
                        let mut link = Link::new(down, seed ^ 0xABCD);
                        let mut buf = vec![0u8; 65536];
                        let mut seq = 1u64 << 63;
                        loop {
                            let Ok(n) = back.recv(&mut buf).await else {
                                return;
                            };
                            forward(&mut link, &c, &st, &down_tx, &mut seq, &buf[..n]);
                        }
                    });
                    (Link::new(up, seed), up_tx)
                });
                forward(link, &c, &st, tx, &mut seq, &buf[..n]);
            }
        });
        ImpairProxy {
            addr,
            cut,
            stats,
            task,
        }
    }

    /// Cuts the path in both directions (`true`) or restores it.
    pub fn cut(&self, on: bool) {
        self.cut.store(on, Ordering::Relaxed);
    }
}

fn forward(
    link: &mut Link,
    cut: &AtomicBool,
    st: &ProxyStats,
    tx: &mpsc::UnboundedSender<Item>,
    seq: &mut u64,
    body: &[u8],
) {
    if cut.load(Ordering::Relaxed) {
        st.cut_drops.fetch_add(1, Ordering::Relaxed);
        return;
    }
    match link.schedule(Instant::now(), body.len()) {
        Fate::Lost => {
            st.lost.fetch_add(1, Ordering::Relaxed);
        }
        Fate::QueueFull => {
            st.queue_drops.fetch_add(1, Ordering::Relaxed);
        }
        Fate::Depart(times) => {
            if times.len() > 1 {
                st.duplicated.fetch_add(1, Ordering::Relaxed);
            }
            for t in times {
                *seq += 1;
                st.forwarded.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send((t, *seq, body.to_vec()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_rate_and_cap_are_what_was_asked() {
        let mut l = Link::new(
            Impairment {
                loss: 0.05,
                ..Impairment::default()
            },
            7,
        );
        let now = Instant::now();
        let lost = (0..100_000)
            .filter(|_| matches!(l.schedule(now, 100), Fate::Lost))
            .count();
        assert!((4_500..5_500).contains(&lost), "{lost}");
        // 1 Mbit/s with a 200 ms queue holds 25 kB: 20 packets of 1,250 bytes, then tail drop.
        let mut l = Link::new(
            Impairment {
                rate_bps: Some(1_000_000),
                delay: Duration::from_millis(50),
                ..Impairment::default()
            },
            7,
        );
        let fates: Vec<Fate> = (0..30).map(|_| l.schedule(now, 1250)).collect();
        let sent = fates
            .iter()
            .filter(|f| matches!(f, Fate::Depart(_)))
            .count();
        assert_eq!(sent, 20);
        match &fates[19] {
            Fate::Depart(t) => assert_eq!(t[0] - now, Duration::from_millis(250)),
            _ => panic!(),
        }
    }
}
