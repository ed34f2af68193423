//! A hostile relay for tests: it speaks the relay protocol well enough to pair one agent with one
//! console, holds a valid certificate (clients pin it, as they would a compromised relay's), and then
//! either forwards payloads while recording and altering them, or puts itself in the middle of the
//! inner connection.

use bytes::Bytes;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_certs::{Fingerprint, RelayTrust};
use tandem_client::ConnectOptions;
use tandem_proto::{
    ALPN, ClientMsg, FRAME_HEADER, FrameDecoder, MAX_CONTROL_FRAME, RelayMsg, ResumeToken, Slot,
    decode_body, encode_frame,
};
use tandem_session::carrier::{Carrier, Fallback};
use tandem_session::inner;
use tokio::sync::mpsc;

/// What the hostile relay does with a paired session.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tamper {
    /// Flip one bit in every n-th datagram.
    pub flip_every: Option<u64>,
    /// Send every n-th datagram twice (replay).
    pub duplicate_every: Option<u64>,
    /// Drop every n-th datagram.
    pub drop_every: Option<u64>,
    /// Swap every pair of consecutive datagrams (one left without a partner goes alone after
    /// a few milliseconds).
    pub reorder: bool,
}

#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Forward (record everything, alter as told).
    Forward(Tamper),
    /// Terminate the inner QUIC connection towards both sides and relay their PAKE faithfully.
    Mitm,
}

/// Who the relay says the technician is, to each side.
#[derive(Clone, Debug)]
pub struct Story {
    /// Told to the console when it authenticates.
    pub to_console: (String, String),
    /// Told to the agent when the console pairs.
    pub to_agent: (String, String),
}

impl Default for Story {
    fn default() -> Self {
        let mallory = ("mallory".to_string(), "Evil Relay Ltd".to_string());
        Story {
            to_console: mallory.clone(),
            to_agent: mallory,
        }
    }
}

#[derive(Default)]
struct State {
    /// The waiting agent's connection and message queue.
    agent: Option<(quinn::Connection, mpsc::UnboundedSender<RelayMsg>)>,
    /// The waiting agent's slot.
    slot: Option<Slot>,
    next_slot: u32,
    story: Story,
    /// What it lists to consoles that ask for devices (forged or not: the test decides).
    devices: Vec<tandem_proto::DeviceListing>,
}

/// Everything the relay saw of the session payloads, both directions.
#[derive(Default, Debug)]
pub struct Seen {
    pub bytes: Vec<u8>,
    pub datagrams: u64,
    /// MITM mode: the PAKE-stream frames that went console → agent and back.
    pub mitm_frames: Vec<Vec<u8>>,
}

pub struct FakeRelay {
    pub addr: std::net::SocketAddr,
    pub pin: Fingerprint,
    pub seen: Arc<Mutex<Seen>>,
    endpoint: quinn::Endpoint,
    state: Arc<Mutex<State>>,
    _dir: tempfile::TempDir,
}

impl FakeRelay {
    pub async fn start(mode: Mode) -> FakeRelay {
        Self::start_with(mode, Story::default()).await
    }

    /// The slot of the agent waiting now, if one is.
    pub fn agent_slot(&self) -> Option<Slot> {
        let s = self.state.lock().unwrap();
        s.agent.as_ref().and(s.slot.clone())
    }

    /// Like [`FakeRelay::start`], telling the two sides `story`.
    pub async fn start_with(mode: Mode, story: Story) -> FakeRelay {
        let dir = tempfile::tempdir().unwrap();
        let id = tandem_certs::ensure_identity(dir.path(), &[]).unwrap();
        let tls = tandem_certs::server_config(&id, ALPN).unwrap();
        let mut sc = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
        ));
        sc.transport_config(Arc::new(tandem_net::transport_config(false)));
        let endpoint = tandem_net::server_endpoint("127.0.0.1:0".parse().unwrap(), sc).unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let state = Arc::new(Mutex::new(State {
            next_slot: 417,
            story,
            ..State::default()
        }));
        let ep = endpoint.clone();
        let state2 = state.clone();
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Some(inc) = ep.accept().await {
                let (state, seen) = (state.clone(), seen2.clone());
                tokio::spawn(async move {
                    if let Ok(conn) = inc.await {
                        serve(conn, state, seen, mode).await;
                    }
                });
            }
        });
        FakeRelay {
            addr: endpoint.local_addr().unwrap(),
            pin: id.fingerprint(),
            seen,
            endpoint,
            state: state2,
            _dir: dir,
        }
    }

    /// The device list it gives consoles from now on.
    pub fn set_devices(&self, devices: Vec<tandem_proto::DeviceListing>) {
        self.state.lock().unwrap().devices = devices;
    }

    /// Options that reach it, "relay only": these tests are about what a relay can do with the
    /// traffic it carries, so every byte must cross it (the direct path's own attacks are tested
    /// in `tandem_session::direct` and `direct_netns`).
    pub fn opts(&self) -> ConnectOptions {
        let mut o = ConnectOptions::new(self.addr.to_string(), RelayTrust::Pin(self.pin));
        o.direct = false;
        o
    }

    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"bye");
    }
}

async fn serve(
    conn: quinn::Connection,
    state: Arc<Mutex<State>>,
    seen: Arc<Mutex<Seen>>,
    mode: Mode,
) {
    let Ok((mut send, mut recv)) = conn.accept_bi().await else {
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<RelayMsg>();
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let f = encode_frame(&m, MAX_CONTROL_FRAME).unwrap();
            if send.write_all(&f).await.is_err() {
                return;
            }
        }
    });
    let mut dec = FrameDecoder::new(MAX_CONTROL_FRAME);
    let mut peer: Option<mpsc::UnboundedSender<RelayMsg>> = None;
    loop {
        let body = match dec.next_frame() {
            Ok(Some(b)) => b,
            Ok(None) => match recv.read_chunk(4096, true).await {
                Ok(Some(c)) => {
                    dec.push(&c.bytes);
                    continue;
                }
                _ => return,
            },
            Err(_) => return,
        };
        let Ok(msg) = decode_body::<ClientMsg>(&body) else {
            return;
        };
        match msg {
            // An enrolled agent: waits like a registered one (the relay takes anything).
            ClientMsg::Announce { .. } => {
                let mut s = state.lock().unwrap();
                s.agent = Some((conn.clone(), tx.clone()));
                s.slot = Some(Slot::new("999999999").unwrap());
                let _ = tx.send(RelayMsg::Online {
                    device: "whatever".into(),
                });
            }
            // A hostile relay believes every certificate and lists what it likes.
            ClientMsg::ProveOrg { .. } => {
                let _ = tx.send(RelayMsg::OrgProven {
                    organisation: "anything".into(),
                    revocation: None,
                });
            }
            ClientMsg::ListDevices { offset, .. } => {
                let entries = state.lock().unwrap().devices.clone();
                let total = entries.len() as u32;
                let _ = tx.send(RelayMsg::Devices {
                    entries,
                    offset,
                    total,
                });
            }
            ClientMsg::Register { .. } => {
                let slot = {
                    let mut s = state.lock().unwrap();
                    s.agent = Some((conn.clone(), tx.clone()));
                    s.next_slot += 1;
                    let slot = Slot::new((s.next_slot - 1).to_string()).unwrap();
                    s.slot = Some(slot.clone());
                    slot
                };
                let _ = tx.send(RelayMsg::Registered {
                    slot,
                    expires_in_secs: 600,
                });
            }
            ClientMsg::Authenticate { .. } => {
                let (technician, organisation) = state.lock().unwrap().story.to_console.clone();
                let _ = tx.send(RelayMsg::Authenticated {
                    technician,
                    organisation,
                });
            }
            m @ (ClientMsg::Join { .. } | ClientMsg::Connect { .. }) => {
                let slot = match m {
                    ClientMsg::Join { slot } => slot,
                    _ => Slot::new("999999999").unwrap(),
                };
                let (agent, (technician, organisation)) = {
                    let mut s = state.lock().unwrap();
                    (s.agent.take(), s.story.to_agent.clone())
                };
                let Some((agent_conn, agent_tx)) = agent else {
                    let _ = tx.send(RelayMsg::Refused {
                        code: tandem_proto::ErrorCode::UnknownSlot,
                        message: "no agent".into(),
                    });
                    continue;
                };
                let _ = agent_tx.send(RelayMsg::Paired {
                    technician,
                    organisation,
                    resume: ResumeToken([1; 16]),
                });
                let _ = tx.send(RelayMsg::Joined {
                    slot,
                    resume: ResumeToken([2; 16]),
                });
                peer = Some(agent_tx.clone());
                // The agent's serve loop learns its peer through the message it gets; store the
                // console's queue for it via a small side channel: End from the agent is answered
                // by the test's timeouts, so only console → agent ends are forwarded here.
                match mode {
                    Mode::Forward(t) => {
                        tokio::spawn(forward(agent_conn.clone(), conn.clone(), t, seen.clone()));
                        tokio::spawn(forward(conn.clone(), agent_conn, t, seen.clone()));
                    }
                    Mode::Mitm => {
                        tokio::spawn(mitm(conn.clone(), agent_conn, seen.clone()));
                    }
                }
            }
            // A hostile relay learns nothing from it, and believing it changes nothing.
            ClientMsg::PathReport { .. } => {}
            ClientMsg::Ping { nonce } => {
                let _ = tx.send(RelayMsg::Pong { nonce });
            }
            ClientMsg::Time { nonce } => {
                let unix_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let _ = tx.send(RelayMsg::Time { nonce, unix_ms });
            }
            ClientMsg::End { reason } => {
                if let Some(p) = peer.take() {
                    let _ = p.send(RelayMsg::SessionEnded { reason });
                }
            }
            ClientMsg::Resume { .. } => return,
        }
    }
}

/// How long a datagram held back for reordering waits for the next one before it goes alone.
const REORDER_HOLD: Duration = Duration::from_millis(5);

/// Forwards datagrams (and payload streams) from `from` to `to`, recording and tampering.
async fn forward(
    from: quinn::Connection,
    to: quinn::Connection,
    t: Tamper,
    seen: Arc<Mutex<Seen>>,
) {
    let (f2, t2, s2) = (from.clone(), to.clone(), seen.clone());
    tokio::spawn(async move {
        while let Ok(mut r) = f2.accept_uni().await {
            let (t2, s2) = (t2.clone(), s2.clone());
            tokio::spawn(async move {
                let Ok(mut w) = t2.open_uni().await else {
                    return;
                };
                while let Ok(Some(c)) = r.read_chunk(65536, true).await {
                    s2.lock().unwrap().bytes.extend_from_slice(&c.bytes);
                    if w.write_all(&c.bytes).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut n: u64 = 0;
    let mut held: Option<Bytes> = None;
    loop {
        // A reordering network delays a packet; it does not keep it until the next one comes.
        // Holding it without a bound turned a tail packet (and the ACK-only packet that answers
        // it) into a loss that only a backed-off PTO ended: in a CI run on a loaded machine a
        // 400 kB transfer did not finish in 30 s.
        let next = if held.is_some() {
            tokio::time::timeout(REORDER_HOLD, from.read_datagram()).await
        } else {
            Ok(from.read_datagram().await)
        };
        let d = match next {
            Ok(Ok(d)) => d,
            Ok(Err(_)) => return,
            Err(_) => {
                if let Some(h) = held.take() {
                    let _ = to.send_datagram(h);
                }
                continue;
            }
        };
        n += 1;
        {
            let mut s = seen.lock().unwrap();
            s.bytes.extend_from_slice(&d);
            s.datagrams += 1;
        }
        let hit = |every: Option<u64>| every.is_some_and(|k| n.is_multiple_of(k));
        if hit(t.drop_every) {
            continue;
        }
        let d = if hit(t.flip_every) && !d.is_empty() {
            let mut v = d.to_vec();
            let bit = (n as usize * 13) % (v.len() * 8);
            v[bit / 8] ^= 1 << (bit % 8);
            Bytes::from(v)
        } else {
            d
        };
        let mut out = vec![d.clone()];
        if hit(t.duplicate_every) {
            out.push(d);
        }
        if t.reorder {
            match held.take() {
                None => {
                    held = out.pop();
                }
                Some(h) => out.push(h),
            }
        }
        for d in out {
            let _ = to.send_datagram(d);
        }
    }
}

/// Terminates the console's inner connection (as the "agent") and the agent's (as the "console"),
/// and relays the PAKE stream between them unchanged, frame by frame.
async fn mitm(console: quinn::Connection, agent: quinn::Connection, seen: Arc<Mutex<Seen>>) {
    let here: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let there: std::net::SocketAddr = "127.0.0.1:2".parse().unwrap();
    let to_console = Carrier::new(Fallback::Fragment);
    to_console.attach(console, None);
    let server = inner::agent_endpoint(to_console.socket(here, there).unwrap()).unwrap();
    let to_agent = Carrier::new(Fallback::Fragment);
    to_agent.attach(agent, None);
    let client = inner::console_endpoint(to_agent.socket(there, here).unwrap()).unwrap();
    let (c_conn, a_conn) = tokio::join!(
        async { server.accept().await.unwrap().await.unwrap() },
        async {
            client
                .connect(here, inner::SERVER_NAME)
                .unwrap()
                .await
                .unwrap()
        }
    );
    let (mut c_send, mut c_recv) = c_conn.accept_bi().await.unwrap();
    let (mut a_send, mut a_recv) = a_conn.open_bi().await.unwrap();
    // Relay frames both ways until either side stops.
    let s1 = seen.clone();
    let up = async move {
        while let Some(f) = read_raw_frame(&mut c_recv).await {
            s1.lock().unwrap().mitm_frames.push(f.clone());
            if a_send.write_all(&f).await.is_err() {
                return;
            }
        }
    };
    let s2 = seen.clone();
    let down = async move {
        while let Some(f) = read_raw_frame(&mut a_recv).await {
            s2.lock().unwrap().mitm_frames.push(f.clone());
            if c_send.write_all(&f).await.is_err() {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(up, down) }).await;
    // Keep the endpoints alive until both sides are done with them.
    let _ = tokio::time::timeout(Duration::from_secs(5), c_conn.closed()).await;
    drop((to_console, to_agent, server, client));
}

/// One length-prefixed frame, header included.
async fn read_raw_frame(r: &mut quinn::RecvStream) -> Option<Vec<u8>> {
    let mut h = [0u8; FRAME_HEADER];
    r.read_exact(&mut h).await.ok()?;
    let len = u32::from_be_bytes(h) as usize;
    if len > MAX_CONTROL_FRAME {
        return None;
    }
    let mut f = vec![0u8; FRAME_HEADER + len];
    f[..FRAME_HEADER].copy_from_slice(&h);
    r.read_exact(&mut f[FRAME_HEADER..]).await.ok()?;
    Some(f)
}
