//! GNOME test fixtures: a headless Mutter of its own per test ([`Mutter`]: its own D-Bus session
//! bus, PipeWire and WirePlumber, Mutter with virtual monitors, all in a fresh
//! `XDG_RUNTIME_DIR`), and `tandem-wayland-client` on it ([`MutterClient`]).
//!
//! Everything here is synchronous, with a timeout on every wait; failures panic with the tail of
//! the daemons' logs.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long [`Mutter::start`] waits for the D-Bus interfaces and the Wayland socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The Wayland display name Mutter listens on, in its runtime directory.
const WAYLAND_DISPLAY: &str = "wayland-tandem";

/// Whether `name` is an executable file on `PATH`.
fn in_path(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path).any(|d| {
        d.join(name)
            .metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// Whether Mutter is installed; tests skip themselves otherwise. (They need pipewire, wireplumber,
/// dbus-daemon and gdbus too, and fail saying so when one is missing.)
pub fn mutter_available() -> bool {
    in_path("mutter")
}

/// xdg-desktop-portal's frontend and its GNOME backend, as Debian installs them.
const PORTAL_FRONTEND: &str = "/usr/libexec/xdg-desktop-portal";
const PORTAL_GNOME: &str = "/usr/libexec/xdg-desktop-portal-gnome";

/// Whether Mutter, xdg-desktop-portal and xdg-desktop-portal-gnome are installed (Debian:
/// `mutter xdg-desktop-portal xdg-desktop-portal-gnome`); portal tests skip themselves otherwise.
pub fn portal_available() -> bool {
    mutter_available() && Path::new(PORTAL_FRONTEND).exists() && Path::new(PORTAL_GNOME).exists()
}

/// A headless GNOME compositor with everything it needs for remote desktop sessions; every
/// process is killed when dropped.
pub struct Mutter {
    /// In start order: dbus-daemon, pipewire, wireplumber, mutter (then the portal's two, if
    /// started).
    children: Vec<(&'static str, Child)>,
    dir: tempfile::TempDir,
    bus_address: String,
    monitors: Vec<(u32, u32)>,
}

impl Mutter {
    /// One virtual monitor of `width`×`height`.
    pub fn start(width: u32, height: u32) -> Mutter {
        Self::start_monitors(&[(width, height)])
    }

    /// One virtual monitor per entry, laid out left to right (the first is the primary).
    pub fn start_monitors(monitors: &[(u32, u32)]) -> Mutter {
        let dir = tempfile::Builder::new()
            .prefix("tandem-mutter-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        for d in ["home", "config", "data", "cache"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let bus_address = format!("unix:path={}", dir.path().join("bus").display());
        let mut m = Mutter {
            children: Vec::new(),
            dir,
            bus_address,
            monitors: monitors.to_vec(),
        };
        let dbus = m.spawn(
            "dbus-daemon",
            Command::new("dbus-daemon").args([
                "--session",
                "--nofork",
                "--nopidfile",
                &format!("--address={}", m.bus_address),
            ]),
        );
        m.children.push(("dbus-daemon", dbus));
        m.wait_for("the D-Bus socket", |m| m.dir.path().join("bus").exists());
        let pipewire = m.spawn("pipewire", &mut Command::new("pipewire"));
        m.children.push(("pipewire", pipewire));
        m.wait_for("PipeWire's socket", |m| m.pipewire_socket().exists());
        let wireplumber = m.spawn("wireplumber", &mut Command::new("wireplumber"));
        m.children.push(("wireplumber", wireplumber));
        let mut cmd = Command::new("mutter");
        cmd.args([
            "--headless",
            "--no-x11",
            "--wayland-display",
            WAYLAND_DISPLAY,
        ]);
        for (w, h) in monitors {
            cmd.args(["--virtual-monitor", &format!("{w}x{h}")]);
        }
        let mutter = m.spawn("mutter", &mut cmd);
        m.children.push(("mutter", mutter));
        let address = m.bus_address.clone();
        m.wait_for(
            "GNOME's remote desktop interfaces and Wayland socket",
            |m| {
                m.dir.path().join(WAYLAND_DISPLAY).exists()
                    && tandem_host::mutter::available_on(Some(&address)).is_ok()
            },
        );
        m
    }

    /// Starts xdg-desktop-portal with its GNOME backend on this session (the portal a sandboxed
    /// app or the agent's portal backend talks to): the backend first, then the frontend, each
    /// with `--replace` so that ours answer (not ones D-Bus would activate), both with the
    /// Wayland display (the backend shows its dialogs there). Returns once the portal offers
    /// ScreenCast and RemoteDesktop.
    ///
    /// The dialogs are GTK windows on the virtual monitor; tests answer them by clicking through
    /// Mutter's own remote desktop interface ([`Mutter::desktop`]), as a user would.
    pub fn start_portal(&mut self) {
        let gnome = self.spawn_with(
            "xdg-desktop-portal-gnome",
            Command::new(PORTAL_GNOME).args(["--verbose", "--replace"]),
            &[("WAYLAND_DISPLAY", WAYLAND_DISPLAY)],
        );
        self.children.push(("xdg-desktop-portal-gnome", gnome));
        // The frontend uses the GNOME backend only (not the GTK one, which D-Bus would start
        // in vain for the interfaces GNOME's lacks).
        let portals = self.dir.path().join("portals");
        std::fs::create_dir_all(&portals).unwrap();
        let def = Path::new("/usr/share/xdg-desktop-portal/portals/gnome.portal");
        if let Ok(text) = std::fs::read_to_string(def) {
            std::fs::write(portals.join("gnome.portal"), text).unwrap();
        }
        let portals = portals.display().to_string();
        let address = self.bus_address.clone();
        let owned = |name: &str| {
            Command::new("gdbus")
                .args([
                    "call",
                    "--address",
                    &address,
                    "--dest",
                    "org.freedesktop.DBus",
                ])
                .args(["--object-path", "/org/freedesktop/DBus"])
                .args(["--method", "org.freedesktop.DBus.NameHasOwner", name])
                .stdin(Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("true"))
                .unwrap_or(false)
        };
        self.wait_for("the GNOME portal backend", |_| {
            owned("org.freedesktop.impl.portal.desktop.gnome")
        });
        let frontend = self.spawn_with(
            "xdg-desktop-portal",
            Command::new(PORTAL_FRONTEND).args(["--verbose", "--replace"]),
            &[
                ("WAYLAND_DISPLAY", WAYLAND_DISPLAY),
                ("XDG_DESKTOP_PORTAL_DIR", &portals),
            ],
        );
        self.children.push(("xdg-desktop-portal", frontend));
        self.wait_for("the portal's ScreenCast and RemoteDesktop", |m| {
            owned("org.freedesktop.portal.Desktop")
                && tandem_host::portal::available_on(Some(&m.bus_address))
                    .is_ok_and(|i| i.remote_desktop.is_some())
        });
    }

    /// Portal sessions (remote desktop and screen cast) created and closed so far, from the
    /// frontend's log: `(created, closed)`.
    pub fn portal_session_counts(&self) -> (usize, usize) {
        let log = self.log("xdg-desktop-portal");
        let count = |what: &str| {
            log.lines()
                .filter(|l| l.contains("session owned by") && l.ends_with(what))
                .count()
        };
        (count(" created"), count(" closed"))
    }

    /// Starts `program` in this session's environment, its output to `<dir>/<name>.log`.
    fn spawn(&self, name: &str, cmd: &mut Command) -> Child {
        self.spawn_with(name, cmd, &[])
    }

    /// [`Self::spawn`] with `extra` variables.
    fn spawn_with(&self, name: &str, cmd: &mut Command, extra: &[(&str, &str)]) -> Child {
        let log = std::fs::File::create(self.log_path(name)).unwrap();
        let d = self.dir.path();
        cmd.env_clear();
        // `MUTTER_DEBUG=screen-cast,remote-desktop` in the test's environment: Mutter's debug log.
        if let Some(v) = std::env::var_os("MUTTER_DEBUG") {
            cmd.env("MUTTER_DEBUG", v);
        }
        cmd.env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env("HOME", d.join("home"))
        .env("XDG_RUNTIME_DIR", d)
        .env("XDG_CONFIG_HOME", d.join("config"))
        .env("XDG_DATA_HOME", d.join("data"))
        .env("XDG_CACHE_HOME", d.join("cache"))
        .env("DBUS_SESSION_BUS_ADDRESS", &self.bus_address)
        .env("GSETTINGS_BACKEND", "memory")
        .env("XDG_SESSION_TYPE", "wayland")
        .env("XDG_CURRENT_DESKTOP", "GNOME")
        .envs(extra.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Waits until `ready`, panicking (with the logs) after [`START_TIMEOUT`] or when a daemon
    /// exits.
    fn wait_for(&mut self, what: &str, ready: impl Fn(&Mutter) -> bool) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ready(self) {
                return;
            }
            let exited = self
                .children
                .iter_mut()
                .find_map(|(name, c)| c.try_wait().ok().flatten().map(|s| (*name, s)));
            if let Some((name, s)) = exited {
                panic!(
                    "{name} exited ({s}) while waiting for {what}\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {START_TIMEOUT:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of every daemon's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (name, _) in &self.children {
            let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {name} (last 40 lines)\n"));
            for l in &lines[lines.len().saturating_sub(40)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// The whole log of one daemon (`mutter`, `pipewire`, …).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// The session bus (`unix:path=…`).
    pub fn bus_address(&self) -> &str {
        &self.bus_address
    }

    pub fn runtime_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pipewire_socket(&self) -> PathBuf {
        self.dir.path().join("pipewire-0")
    }

    pub fn wayland_display(&self) -> &str {
        WAYLAND_DISPLAY
    }

    /// The virtual monitors' sizes, as started.
    pub fn monitors(&self) -> &[(u32, u32)] {
        &self.monitors
    }

    /// The process id of one daemon (`mutter`, `pipewire`, …).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| c.id())
    }

    /// The environment of a program of this session.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("DBUS_SESSION_BUS_ADDRESS".into(), self.bus_address.clone()),
            (
                "XDG_RUNTIME_DIR".into(),
                self.dir.path().display().to_string(),
            ),
            ("WAYLAND_DISPLAY".into(), WAYLAND_DISPLAY.into()),
            ("XDG_SESSION_TYPE".into(), "wayland".into()),
            ("XDG_CURRENT_DESKTOP".into(), "GNOME".into()),
        ]
    }

    /// The agent's view of this desktop.
    pub fn desktop(&self) -> tandem_host::mutter::MutterDesktop {
        tandem_host::mutter::MutterDesktop::with_bus(self.bus_address.clone())
            .pipewire_socket(self.pipewire_socket())
    }

    /// `gdbus call` on this session's bus; the reply's text. Panics on failure.
    pub fn gdbus_call(&self, dest: &str, path: &str, method: &str, args: &[&str]) -> String {
        let out = Command::new("gdbus")
            .args(["call", "--address", &self.bus_address, "--dest", dest])
            .args(["--object-path", path, "--method", method])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run gdbus (Debian: libglib2.0-bin): {e}"));
        assert!(
            out.status.success(),
            "gdbus call {method} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The object paths of Mutter's remote desktop sessions that exist now.
    pub fn remote_desktop_sessions(&self) -> Vec<String> {
        let xml = self.gdbus_call(
            "org.gnome.Mutter.RemoteDesktop",
            "/org/gnome/Mutter/RemoteDesktop/Session",
            "org.freedesktop.DBus.Introspectable.Introspect",
            &[],
        );
        xml.split("<node name=\"")
            .skip(1)
            .filter_map(|s| s.split('"').next())
            .map(|n| format!("/org/gnome/Mutter/RemoteDesktop/Session/{n}"))
            .collect()
    }

    /// CPU time (user + system) one daemon used so far, in seconds.
    pub fn cpu_seconds(&self, name: &str) -> Option<f64> {
        cpu_seconds_of(self.pid(name)?)
    }
}

/// CPU time (user + system) of process `pid` so far, in seconds (Linux).
pub fn cpu_seconds_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

impl Drop for Mutter {
    fn drop(&mut self) {
        // Mutter first: its clients and streams go before the daemons they use.
        for (_, c) in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `tandem-wayland-client` on a [`Mutter`] (see the client's source for its protocol): a
/// fullscreen window with the test picture that prints its input events; killed when dropped.
pub struct MutterClient {
    child: Child,
    stdin: Option<ChildStdin>,
    rx: Receiver<Value>,
    /// Every event so far, and those no call returned yet.
    seen: Vec<Value>,
    unread: std::collections::VecDeque<Value>,
    stderr_path: PathBuf,
}

impl MutterClient {
    pub fn start(mutter: &Mutter, args: &[&str]) -> MutterClient {
        let bin = crate::binary("tandem-wayland-client");
        let stderr_path = mutter.log_path("client");
        let mut cmd = Command::new(&bin);
        cmd.args(args)
            .env_remove("DISPLAY")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        for (k, v) in mutter.env() {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({"event": "unparsed", "line": line}));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        MutterClient {
            child,
            stdin,
            rx,
            seen: Vec::new(),
            unread: Default::default(),
            stderr_path,
        }
    }

    /// The first event of `kind` that `pred` accepts and that no earlier call returned (events
    /// it passes over stay for later calls), or None after `timeout`.
    pub fn try_next(
        &mut self,
        kind: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let matches = |v: &Value| v["event"] == kind && pred(v);
        if let Some(i) = self.unread.iter().position(matches) {
            return self.unread.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if matches(&v) {
                        return Some(v);
                    }
                    self.unread.push_back(v);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Like [`Self::try_next`], panicking after `timeout` with what the client said.
    pub fn next(&mut self, kind: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.try_next(kind, timeout, pred) {
            return v;
        }
        let exited = match self.child.try_wait() {
            Ok(Some(s)) => format!(" (the client exited: {s})"),
            _ => String::new(),
        };
        panic!(
            "no matching {kind:?} event from tandem-wayland-client within {timeout:?}{exited}\n\
             events so far (last 30):\n  {}\nits stderr:\n{}",
            self.seen
                .iter()
                .rev()
                .take(30)
                .rev()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join("\n  "),
            std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
        )
    }

    /// Sends one command line (`seed 3`, `rect 10 10 50 50 255 0 0`).
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("cannot send {line:?} to tandem-wayland-client: {e}"));
    }
}

impl Drop for MutterClient {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
