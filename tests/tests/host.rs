//! The agent's session logic (`tandem-host`) over a desktop made in memory: the trait boundary a
//! backend implements, with the real session through a relay on loopback. Consent before any
//! pixel (the screen is not even opened on a denial), input reaching the desktop only while
//! control is allowed, view only enforced on the agent, and the user's commands.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_host::desktop::Backend;
use tandem_host::{BackendError, Desktop, HostCmd, HostEvent, UserCommands, run_session};
use tandem_input::gate::Action;
use tandem_input::{InjectError, Injector, InputClient, InputEvent, MouseButton, Pos, Recorder};
use tandem_media::capture::{CaptureError, Captured, Capturer, CursorState, Monitor};
use tandem_media::frame::{Frame, Rect};
use tandem_proto::EndReason;
use tandem_session::{AgentEvent, AgentHost, Consent, ControlMsg, Session, SessionConfig};
use tandem_tests::TestRelay;
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(20);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(T, f).await.expect("timed out")
}

/// A still screen in memory.
struct MemScreen {
    frame: Frame,
    full: bool,
}

impl Capturer for MemScreen {
    fn monitors(&self) -> Vec<Monitor> {
        vec![Monitor {
            name: "mem".into(),
            x: 0,
            y: 0,
            width: self.frame.width,
            height: self.frame.height,
            primary: true,
        }]
    }
    fn size(&self) -> (u32, u32) {
        (self.frame.width, self.frame.height)
    }
    fn select(&mut self, i: usize) -> Result<(), CaptureError> {
        if i == 0 {
            Ok(())
        } else {
            Err(CaptureError::NoSuchMonitor(i))
        }
    }
    fn request_full(&mut self) {
        self.full = true;
    }
    fn capture(&mut self) -> Result<Captured<'_>, CaptureError> {
        let damage = if std::mem::take(&mut self.full) {
            vec![Rect {
                x: 0,
                y: 0,
                w: self.frame.width,
                h: self.frame.height,
            }]
        } else {
            vec![]
        };
        Ok(Captured {
            frame: &self.frame,
            damage,
            cursor: CursorState::default(),
            resized: false,
        })
    }
}

#[derive(Default)]
struct MemDesktop {
    screens_opened: AtomicUsize,
    inputs_opened: AtomicUsize,
    actions: Arc<Mutex<Vec<Action>>>,
}

impl Desktop for MemDesktop {
    fn backend(&self) -> Backend {
        Backend::X11
    }
    fn describe(&self) -> String {
        "a desktop in memory".into()
    }
    fn open_screen(&self) -> Result<Box<dyn Capturer + Send>, BackendError> {
        self.screens_opened.fetch_add(1, Ordering::SeqCst);
        let mut frame = Frame::new(320, 240);
        for (i, px) in frame.data.chunks_exact_mut(4).enumerate() {
            px[..3].copy_from_slice(&[(i % 251) as u8, 128, 40]);
        }
        Ok(Box::new(MemScreen { frame, full: true }))
    }
    fn open_input(&self) -> Result<Box<dyn Injector>, InjectError> {
        self.inputs_opened.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(Recorder {
            actions: self.actions.clone(),
            screen: None,
        }))
    }
}

struct Cmds(mpsc::UnboundedReceiver<HostCmd>);
impl UserCommands for Cmds {
    async fn next(&mut self) -> HostCmd {
        self.0.recv().await.unwrap_or(HostCmd::End)
    }
}

/// A confirmed (agent, console) pair through `relay`.
async fn pair(relay: &TestRelay) -> (Session, Session) {
    let cfg = SessionConfig {
        software: "host test".into(),
        capabilities: vec!["control/v1".into()],
        ..SessionConfig::default()
    };
    let mut host = within(AgentHost::connect(relay.opts(), cfg.clone()))
        .await
        .unwrap();
    let code = match within(host.next()).await.unwrap() {
        AgentEvent::Code { code, .. } => code,
        other => panic!("{other:?}"),
    };
    let opts = relay.opts();
    let token = relay.token.clone();
    let console =
        tokio::spawn(async move { tandem_session::join(&opts, &token, &code, &cfg).await });
    let agent = loop {
        match within(host.next()).await.unwrap() {
            AgentEvent::Joining { .. } => continue,
            AgentEvent::Session(s) => break *s,
            other => panic!("{other:?}"),
        }
    };
    (agent, within(console).await.unwrap().unwrap())
}

type Events = Arc<Mutex<Vec<String>>>;

/// Runs the agent's side on a task; returns the command sender, the events seen, and the task.
fn spawn_agent(
    s: Session,
    decision: Consent,
    desktop: Arc<MemDesktop>,
) -> (
    mpsc::UnboundedSender<HostCmd>,
    Events,
    tokio::task::JoinHandle<bool>,
) {
    spawn_agent_with(s, decision, desktop, tandem_host::Tools::default())
}

/// Like [`spawn_agent`], with the toolbox's policy `tools`.
fn spawn_agent_with(
    s: Session,
    decision: Consent,
    desktop: Arc<MemDesktop>,
    tools: tandem_host::Tools,
) -> (
    mpsc::UnboundedSender<HostCmd>,
    Events,
    tokio::task::JoinHandle<bool>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let events: Events = Arc::default();
    let ev = events.clone();
    let task = tokio::spawn(async move {
        let mut on = move |e: HostEvent| ev.lock().unwrap().push(format!("{e:?}"));
        let d: Arc<dyn Desktop> = desktop;
        run_session(
            s,
            decision,
            Vec::new(),
            Some(d),
            &tools,
            &mut Cmds(rx),
            &mut on,
        )
        .await
        .unwrap()
        .quit
    });
    (tx, events, task)
}

/// The console's next control message of interest.
async fn until_control(c: &Session, f: impl Fn(&ControlMsg) -> bool) -> ControlMsg {
    within(async {
        loop {
            let m = c.recv_control().await.unwrap();
            if f(&m) {
                return m;
            }
        }
    })
    .await
}

fn clicks(desktop: &MemDesktop) -> usize {
    desktop
        .actions
        .lock()
        .unwrap()
        .iter()
        .filter(|a| matches!(a, Action::Button { pressed: true, .. }))
        .count()
}

async fn click(input: &InputClient) {
    for pressed in [true, false] {
        input
            .send(&InputEvent::Button {
                button: MouseButton::Left,
                pressed,
                at: Pos::from_pixel(10, 10, 320, 240),
            })
            .await
            .unwrap();
    }
}

/// Waits until `n` presses reached the desktop, or fails after a while.
async fn until_clicks(d: &MemDesktop, n: usize) {
    within(async {
        while clicks(d) < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_opens_neither_screen_nor_input() {
    let relay = TestRelay::start().await;
    let (agent, console) = pair(&relay).await;
    let desktop = Arc::new(MemDesktop::default());
    let (_tx, events, task) = spawn_agent(agent, Consent::Deny, desktop.clone());
    let m = until_control(&console, |m| matches!(m, ControlMsg::Consent { .. })).await;
    assert!(matches!(
        m,
        ControlMsg::Consent {
            decision: Consent::Deny
        }
    ));
    assert!(!within(task).await.unwrap());
    let end = within(console.closed()).await;
    assert_eq!(end.reason, EndReason::Denied);
    assert_eq!(desktop.screens_opened.load(Ordering::SeqCst), 0);
    assert_eq!(desktop.inputs_opened.load(Ordering::SeqCst), 0);
    assert_eq!(*events.lock().unwrap(), vec!["Denied".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_then_view_only_then_end() {
    let relay = TestRelay::start().await;
    let (agent, console) = pair(&relay).await;
    let desktop = Arc::new(MemDesktop::default());
    let (tx, events, task) = spawn_agent(agent, Consent::AllowControl, desktop.clone());
    until_control(&console, |m| {
        matches!(
            m,
            ControlMsg::Consent {
                decision: Consent::AllowControl
            }
        )
    })
    .await;
    // The backend's monitor list and picture arrive.
    let m = until_control(&console, |m| matches!(m, ControlMsg::Monitors { .. })).await;
    let ControlMsg::Monitors { monitors, .. } = m else {
        unreachable!()
    };
    assert_eq!((monitors[0].width, monitors[0].height), (320, 240));
    let frame = within(console.recv_video()).await.unwrap();
    let mut dec = tandem_media::VideoDecoder::new().unwrap();
    let pic = dec.decode(&frame.data).unwrap().expect("a picture");
    assert_eq!((pic.width, pic.height), (320, 240));

    // Control: a click reaches the desktop.
    let input = InputClient::new(&console);
    click(&input).await;
    until_clicks(&desktop, 1).await;

    // The user switches to view only: the console is told, and clicks stop at the agent.
    tx.send(HostCmd::ViewOnly(true)).unwrap();
    until_control(&console, |m| {
        matches!(m, ControlMsg::Permissions { view_only: true })
    })
    .await;
    click(&input).await;
    // The click travels through the relay while the user's command below is local: give the
    // click time to reach the agent's gate (and be refused there) before control comes back.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Control again (the user allowed it): the next click arrives, the refused one never does.
    tx.send(HostCmd::ViewOnly(false)).unwrap();
    until_control(&console, |m| {
        matches!(m, ControlMsg::Permissions { view_only: false })
    })
    .await;
    click(&input).await;
    until_clicks(&desktop, 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(clicks(&desktop), 2, "the click made in view only arrived");

    tx.send(HostCmd::End).unwrap();
    assert!(!within(task).await.unwrap(), "End is not Quit");
    assert_eq!(
        within(console.closed()).await.reason,
        EndReason::EndedByUser
    );
    assert_eq!(desktop.screens_opened.load(Ordering::SeqCst), 1);
    let ev = events.lock().unwrap().join("\n");
    assert!(
        ev.contains("Started { view_only: false, control_possible: true }"),
        "{ev}"
    );
    assert!(ev.contains("Permissions { view_only: true }"), "{ev}");
    assert!(ev.contains("Ended"), "{ev}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_only_consent_cannot_be_turned_into_control() {
    let relay = TestRelay::start().await;
    let (agent, console) = pair(&relay).await;
    let desktop = Arc::new(MemDesktop::default());
    let (tx, events, task) = spawn_agent(agent, Consent::ViewOnly, desktop.clone());
    within(console.recv_video()).await.unwrap();
    let input = InputClient::new(&console);
    click(&input).await;
    // The user tries to give control: not allowed by this session's consent.
    tx.send(HostCmd::ViewOnly(false)).unwrap();
    within(async {
        while !events
            .lock()
            .unwrap()
            .iter()
            .any(|e| e == "ControlNotAllowed")
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    click(&input).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(clicks(&desktop), 0);
    tx.send(HostCmd::Quit).unwrap();
    assert!(within(task).await.unwrap(), "Quit asks the program to end");
    assert_eq!(
        within(console.closed()).await.reason,
        EndReason::EndedByUser
    );
}

/// A hostile console offers files under names meant to escape the download folder (the
/// ScreenConnect and SimpleHelp path-traversal bugs), through a planted symbolic link, and with a
/// name that is not UTF-8: the agent refuses every one and writes nothing anywhere. In view only,
/// it takes no file at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_file_names_are_refused_and_nothing_is_written() {
    tandem_tests::init_logs();
    let relay = TestRelay::start().await;
    let work = tempfile::tempdir().unwrap();
    let dl = work.path().join("Downloads");
    let outside = work.path().join("outside");
    std::fs::create_dir_all(&dl).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, dl.join("evil")).unwrap();
    let src = work.path().join("payload.sh");
    std::fs::write(&src, "#!/bin/sh\necho owned\n").unwrap();
    let tools = tandem_host::Tools {
        files: tandem_host::session::FilesPolicy {
            receive: true,
            downloads: dl.clone(),
            quota: 1 << 30,
        },
        ..Default::default()
    };
    for decision in [Consent::AllowControl, Consent::ViewOnly] {
        let (agent, console) = pair(&relay).await;
        let desktop = Arc::new(MemDesktop::default());
        let (tx, events, task) = spawn_agent_with(agent, decision, desktop, tools.clone());
        until_control(&console, |m| matches!(m, ControlMsg::Consent { .. })).await;
        let long = "a".repeat(300);
        let names = [
            "../../etc/passwd",
            "/etc/passwd",
            "a/../../b.sh",
            "evil/payload.sh",
            "CON",
            "nul.txt",
            "LPT1.log",
            long.as_str(),
            "report\u{202e}hs.txt",
            "bell\u{7}.txt",
            ".tandem-0123456789abcdef.part",
            "ok/./x",
            "trailing. ",
        ];
        let cancel = tokio_util::sync::CancellationToken::new();
        for name in names {
            let t = console.transfer_opener().open().await.unwrap();
            let item = tandem_toolbox::Outgoing::new(&src, name, 20);
            let r = within(tandem_toolbox::send_file(
                t.recv,
                t.send,
                &item,
                &Default::default(),
                |_: &tandem_toolbox::Progress| {},
                &cancel,
            ))
            .await;
            assert!(r.is_err(), "{name:?} was accepted ({decision:?})");
        }
        // A name that is not UTF-8, written on the wire by hand (version, length, postcard offer).
        {
            #[derive(serde::Serialize)]
            struct Offer {
                name: Vec<u8>,
                size: u64,
                hash: [u8; 32],
                chunk_size: u32,
            }
            let body = postcard::to_allocvec(&Offer {
                name: vec![b'x', 0xff, 0xfe, b'.', b's', b'h'],
                size: 20,
                hash: [7; 32],
                chunk_size: 256 * 1024,
            })
            .unwrap();
            let mut t = console.transfer_opener().open().await.unwrap();
            let mut frame = vec![tandem_toolbox::PROTOCOL_VERSION];
            frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
            frame.extend_from_slice(&body);
            t.send.write_all(&frame).await.unwrap();
            let mut len = [0u8; 4];
            within(t.recv.read_exact(&mut len)).await.unwrap();
            let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
            within(t.recv.read_exact(&mut reply)).await.unwrap();
            assert_eq!(
                reply[0], 1,
                "a Refuse (variant 1), not an Accept ({decision:?})"
            );
        }
        // The host reports a refusal after writing it: wait (bounded) for the last report before
        // ending, or the end can overtake it.
        let reported = || {
            events
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.starts_with("Transfer(Failed"))
                .count()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while reported() < names.len() + 1 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = tx.send(HostCmd::End);
        within(task).await.unwrap();
        let in_dl: Vec<_> = std::fs::read_dir(&dl)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            in_dl,
            vec![std::ffi::OsString::from("evil")],
            "only the planted link"
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        let mut top: Vec<_> = std::fs::read_dir(work.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        top.sort();
        assert_eq!(top, ["Downloads", "outside", "payload.sh"]);
        let refused = events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.starts_with("Transfer(Failed"))
            .count();
        assert_eq!(
            refused,
            names.len() + 1,
            "each refusal reported ({decision:?})"
        );
    }
}
