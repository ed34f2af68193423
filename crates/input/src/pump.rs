//! Session glue: the agent feeds its session's input channel through the gate into an injector that
//! runs on a thread of its own; the console sends events.

use crate::event::{InputEvent, Pos, decode_pointer, encode_pointer};
use crate::gate::{Action, DisplayRect, InputGate, Permission};
use crate::inject::{InjectError, Injector};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tandem_session::{InputItem, InputSender, Session, SessionEnd, SessionError};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters of the agent's input path.
#[derive(Debug, Default)]
pub struct InputStats {
    pub received: AtomicU64,
    pub malformed: AtomicU64,
    pub injected: AtomicU64,
    pub failed: AtomicU64,
}

/// The agent's input path for one session.
pub struct AgentInput {
    gate: Arc<Mutex<InputGate>>,
    tx: std::sync::mpsc::Sender<Vec<Action>>,
    pub stats: Arc<InputStats>,
}

impl AgentInput {
    /// Starts the injector thread; `make` opens the injector on that thread. Input is refused until
    /// [`AgentInput::set_permission`] allows control.
    pub fn start<F>(make: F) -> Result<AgentInput, InjectError>
    where
        F: FnOnce() -> Result<Box<dyn Injector>, InjectError> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<Action>>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stats = Arc::new(InputStats::default());
        let st = stats.clone();
        std::thread::Builder::new()
            .name("tandem-input".into())
            .spawn(move || {
                let mut inj = match make() {
                    Ok(i) => i,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(inj.screen());
                while let Ok(actions) = rx.recv() {
                    for a in &actions {
                        match inj.apply(a) {
                            Ok(()) => st.injected.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                tracing::warn!(error = %e, "input injection failed");
                                st.failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                }
            })
            .map_err(|e| InjectError::Inject(format!("cannot start the input thread: {e}")))?;
        let screen = ready_rx
            .recv()
            .map_err(|_| InjectError::Inject("the input thread stopped".into()))??;
        Ok(AgentInput {
            gate: Arc::new(Mutex::new(InputGate::new(screen))),
            tx,
            stats,
        })
    }

    fn send(&self, actions: Vec<Action>) {
        if !actions.is_empty() {
            let _ = self.tx.send(actions);
        }
    }

    /// What the technician may do now; leaving control releases everything they hold.
    pub fn set_permission(&self, p: Permission) {
        let a = lock(&self.gate).set_permission(p);
        self.send(a);
    }

    pub fn permission(&self) -> Permission {
        lock(&self.gate).permission()
    }

    /// The part of the screen being shared (a monitor), for mapping positions.
    pub fn set_display(&self, d: DisplayRect) {
        lock(&self.gate).set_display(d);
    }

    /// Releases everything the technician holds.
    pub fn release_all(&self) {
        let a = lock(&self.gate).release_all();
        self.send(a);
    }

    /// Events refused by the gate so far.
    pub fn refused(&self) -> u64 {
        lock(&self.gate).refused
    }

    /// Applies one item from the session's input channel.
    pub fn handle(&self, item: &InputItem) {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        let actions = match item {
            InputItem::Pointer(b) => match decode_pointer(b) {
                Ok(p) => lock(&self.gate).pointer(p),
                Err(_) => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
            InputItem::Event(b) => match InputEvent::decode(b) {
                Ok(e) => lock(&self.gate).event(&e),
                Err(e) => {
                    tracing::debug!(error = %e, "malformed input event dropped");
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            },
        };
        self.send(actions);
    }

    /// Feeds the session's input until the session ends, then releases everything held.
    pub async fn run(&self, session: &Session) -> SessionEnd {
        loop {
            match session.recv_input().await {
                Ok(item) => self.handle(&item),
                Err(e) => {
                    self.release_all();
                    return match e {
                        SessionError::Ended(end) => end,
                        _ => session.closed().await,
                    };
                }
            }
        }
    }
}

impl Drop for AgentInput {
    fn drop(&mut self) {
        self.release_all();
    }
}

/// The console's side: sends events.
#[derive(Clone)]
pub struct InputClient {
    sender: InputSender,
}

impl InputClient {
    pub fn new(session: &Session) -> Self {
        InputClient {
            sender: session.input_sender(),
        }
    }

    /// A button, key, wheel, text or combination event: reliable and in order.
    pub async fn send(&self, e: &InputEvent) -> Result<(), SessionError> {
        self.sender.send_event(&e.encode()).await
    }

    /// A pointer position: newest wins.
    pub fn pointer(&self, p: Pos) -> Result<(), SessionError> {
        self.sender.send_pointer(&encode_pointer(p))
    }
}
