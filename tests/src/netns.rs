//! Real networks for firewall tests: Linux network namespaces joined by veth pairs, nftables rules
//! inside them, and programs started in them with `ip netns exec` (root only).
//!
//! Every namespace is named after this process's id and a counter, so that tests running in
//! parallel (threads or processes) never share one; dropping a [`Netns`] kills what still runs in
//! it and deletes it. Namespaces left by a test process that died without cleaning up (SIGKILL
//! by a test runner's timeout) are deleted by the next test that creates one.
//!
//! Only private addresses are used, and only inside these namespaces: the machine's own network
//! (the root namespace) is never touched. X11 works across namespaces through the filesystem
//! socket in `/tmp/.X11-unix`, so an Xvfb started in the root namespace serves an agent in one.

use std::ffi::OsStr;
use std::process::{Command, Stdio};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Prefix of every namespace these tests create: `tndfw<pid>x<n><tag>`.
const PREFIX: &str = "tndfw";

/// Why namespace tests cannot run here (not root, no `ip netns`), or `None` when they can.
pub fn skip_reason() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .unwrap_or("?");
    if euid != "0" {
        return Some(format!(
            "network namespace tests need root (effective uid {euid})"
        ));
    }
    match Command::new("ip")
        .args(["netns", "list"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "`ip netns` does not work here: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("`ip` (iproute2) is not available: {e}")),
    }
}

/// Runs a command to completion; panics with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args))
}

/// A network namespace with its loopback up; deleted (with everything still running in it) when
/// dropped.
pub struct Netns {
    pub name: String,
    /// Short name used for the interface names of its peers (`v<tag>`).
    pub tag: String,
}

impl Netns {
    /// A new namespace; `tag` is a few letters that say what it is (`r` for the relay, …).
    pub fn new(tag: &str) -> Netns {
        static STALE: Once = Once::new();
        STALE.call_once(delete_stale);
        static NEXT: AtomicU32 = AtomicU32::new(0);
        assert!(
            tag.len() <= 8 && tag.chars().all(|c| c.is_ascii_alphanumeric()),
            "short alphanumeric tag: {tag:?}"
        );
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}x{n}{tag}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name,
            tag: tag.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME args…`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut v = vec!["-n", &self.name];
        v.extend_from_slice(args);
        ip(&v)
    }

    /// A command that runs `program` in this namespace (`ip netns exec NAME program`; the
    /// process is `program` itself, `ip` execs it). Killed when dropped.
    pub fn command(&self, program: impl AsRef<OsStr>) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .arg(program)
            .kill_on_drop(true);
        c
    }

    /// A blocking command that runs `program` in this namespace.
    pub fn std_command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `program args…` in this namespace to completion; panics if it fails.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        run(self.std_command(program).args(args))
    }

    /// Sets a sysctl of this namespace (e.g. `net.ipv4.ip_forward`, `1`).
    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")]);
    }

    /// Loads nftables rules (the text of `nft -f`, one rule per line) into this namespace.
    pub fn nft(&self, rules: &str) {
        use std::io::Write;
        let mut child = self
            .std_command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft (nftables) is not installed: run scripts/deps.sh");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft in {} refused the rules: {}\n{rules}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Adds a default route via `gateway`.
    pub fn default_route(&self, gateway: &str) {
        self.ip(&["route", "add", "default", "via", gateway]);
    }

    /// A plain HTTP GET from inside this namespace (bash's /dev/tcp, so that nothing but bash is
    /// needed); returns (status line, body).
    pub fn http_get(&self, addr: &str, path: &str) -> (String, String) {
        let (host, port) = addr.rsplit_once(':').unwrap();
        let script = format!(
            "exec 3<>/dev/tcp/{host}/{port} && \
             printf 'GET {path} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n' >&3 && \
             cat <&3"
        );
        let out = self.exec("timeout", &["10", "bash", "-c", &script]);
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (
            head.lines().next().unwrap_or("").to_string(),
            body.to_string(),
        )
    }

    /// Waits (bounded) until something accepts TCP connections at `addr` inside this namespace.
    pub async fn wait_listening(&self, addr: &str, within: Duration) {
        let (host, port) = addr.rsplit_once(':').unwrap();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let ok = self
                .command("bash")
                .args(["-c", &format!("exec 3<>/dev/tcp/{host}/{port}")])
                .stderr(Stdio::null())
                .status()
                .await
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nothing listens on {addr} in {} after {within:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Process ids of everything running in this namespace.
    pub fn pids(&self) -> Vec<u32> {
        pids_in(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_and_delete(&self.name);
    }
}

/// Joins `a` and `b` with a veth pair (named `v<b's tag>` in `a` and `v<a's tag>` in `b`) and
/// gives the ends the addresses `a_cidr` and `b_cidr` (e.g. `10.231.1.1/30`).
pub fn link(a: &Netns, a_cidr: &str, b: &Netns, b_cidr: &str) {
    let a_if = format!("v{}", b.tag);
    let b_if = format!("v{}", a.tag);
    // Both ends are created inside their namespaces: nothing appears in the root namespace.
    ip(&[
        "link", "add", &a_if, "netns", &a.name, "type", "veth", "peer", "name", &b_if, "netns",
        &b.name,
    ]);
    for (ns, ifname, cidr) in [(a, &a_if, a_cidr), (b, &b_if, b_cidr)] {
        ns.ip(&["addr", "add", cidr, "dev", ifname]);
        ns.ip(&["link", "set", ifname, "up"]);
    }
}

fn pids_in(name: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", name])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process in namespace `name` (they are the test's own: the namespace was made for
/// it), then deletes the namespace.
fn kill_and_delete(name: &str) {
    for _ in 0..50 {
        let pids = pids_in(name);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("ip")
        .args(["netns", "delete", name])
        .stderr(Stdio::null())
        .status();
}

/// Deletes namespaces of earlier test processes that are gone.
fn delete_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            kill_and_delete(name);
        }
    }
}
