//! The Debian packages (scripts/package.sh, cargo-deb) on a clean Debian 12 root made with
//! debootstrap: tandem-relay installs (system user, data directory, conffile, unit), its relay
//! starts as that user from the packaged configuration and answers /health, an upgrade keeps the
//! technicians and the certificate (same pin), purge removes data, user and configuration;
//! tandem-agent and tandem-console install with their library dependencies from Debian, run, and
//! bring their desktop entries and icons. Root only (chroot); elsewhere the test says why and
//! passes.
//!
//! The clean root is made once and kept as `target/debroot-bookworm.tar` (about 1 minute from the
//! Debian mirror); every run unpacks a fresh copy.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn skip_reason() -> Option<String> {
    // SAFETY-free check: `id -u`.
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("needs root (chroot into a Debian root)".into());
    }
    for tool in ["debootstrap", "dpkg-shlibdeps"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !found {
            return Some(format!("{tool} missing (scripts/deps.sh installs it)"));
        }
    }
    None
}

/// A fresh clean Debian root in a temporary folder (unpacked from the cached tarball).
fn clean_root() -> tempfile::TempDir {
    let cache = workspace().join("target/debroot-bookworm.tar");
    if !cache.exists() {
        let build = tempfile::tempdir().unwrap();
        run(Command::new("debootstrap").args([
            "--variant=minbase",
            "--include=adduser,init-system-helpers,ca-certificates",
            "bookworm",
            build.path().to_str().unwrap(),
            "http://deb.debian.org/debian",
        ]));
        let partial = cache.with_extension("partial");
        run(Command::new("tar")
            .arg("-C")
            .arg(build.path())
            .arg("-cf")
            .arg(&partial)
            .arg("."));
        std::fs::rename(&partial, &cache).unwrap();
    }
    let root = tempfile::tempdir().unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(root.path())
        .arg("-xf")
        .arg(&cache));
    root
}

/// Builds the packages from the debug binaries, as `version` when given; returns their paths
/// by package name.
fn packages(version: Option<&str>) -> Vec<(String, PathBuf)> {
    let out = format!("target/debian-test-{}", version.unwrap_or("default"));
    let mut cmd = Command::new(workspace().join("scripts/package.sh"));
    cmd.arg("--dev")
        .current_dir(workspace())
        .env("TANDEM_DEB_OUT", &out);
    if let Some(v) = version {
        cmd.env("TANDEM_DEB_VERSION", v);
    }
    let listed = run(&mut cmd);
    ["tandem-relay", "tandem-agent", "tandem-console"]
        .iter()
        .map(|name| {
            let v = version.unwrap_or("0.1.0-1");
            let file = format!("{out}/{name}_{v}_amd64.deb");
            assert!(listed.contains(&file), "{file} not built: {listed}");
            (name.to_string(), workspace().join(file))
        })
        .collect()
}

struct Chroot<'a>(&'a Path);

impl Chroot<'_> {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("chroot");
        c.arg(self.0).args(args).env_clear().env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
        c.env("DEBIAN_FRONTEND", "noninteractive");
        c
    }
    fn ok(&self, args: &[&str]) -> String {
        run(&mut self.cmd(args))
    }
    fn succeeds(&self, args: &[&str]) -> bool {
        self.cmd(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }
    /// Copies a package into the root's /tmp; returns its path inside the root.
    fn put(&self, deb: &Path) -> String {
        let name = deb.file_name().unwrap().to_str().unwrap();
        std::fs::copy(deb, self.0.join("tmp").join(name)).unwrap();
        format!("/tmp/{name}")
    }
    fn as_relay_user(&self, args: &[&str]) -> Command {
        let mut c = Command::new("/usr/sbin/chroot");
        c.arg("--userspec=tandem-relay:tandem-relay")
            .arg(self.0)
            .arg("/usr/bin/tandem-relay")
            .args(["--config", "/etc/tandem/relay.toml"])
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin");
        c
    }
}

fn mode_owner(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    (m.mode() & 0o7777, m.uid())
}

/// Starts the packaged relay as its user, waits for /health, returns the pin it printed.
fn relay_answers_health(root: &Chroot) -> String {
    let port = tandem_tests::free_port();
    let mport = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = root
        .as_relay_user(&[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--tcp-listen",
            "off",
            "--metrics-listen",
            &format!("127.0.0.1:{mport}"),
            "serve",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let health = loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", mport)) {
            use std::io::{Read, Write};
            s.write_all(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the packaged relay never listened"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        health.starts_with("HTTP/1.0 200") || health.starts_with("HTTP/1.1 200"),
        "{health}"
    );
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(printed.contains("/var/lib/tandem-relay"), "{printed}");
    printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("fingerprint:"))
        .unwrap_or_else(|| panic!("no pin printed: {printed}"))
        .trim()
        .to_string()
}

#[test]
fn packages_install_start_upgrade_and_purge_on_a_clean_debian() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let v1 = packages(None);
    let v2 = packages(Some("0.1.0+2"));
    let dir = clean_root();
    let root = Chroot(dir.path());
    let deb = |set: &[(String, PathBuf)], name: &str| {
        root.put(&set.iter().find(|(n, _)| n == name).unwrap().1)
    };

    // ---- tandem-relay: install ----
    let relay1 = deb(&v1, "tandem-relay");
    let said = root.ok(&["dpkg", "-i", &relay1]);
    assert!(said.contains("agent-bundle"), "{said}");
    assert!(root.succeeds(&["getent", "passwd", "tandem-relay"]));
    let uid: u32 = root
        .ok(&["id", "-u", "tandem-relay"])
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        mode_owner(&dir.path().join("var/lib/tandem-relay")),
        (0o700, uid)
    );
    assert_eq!(
        mode_owner(&dir.path().join("etc/tandem/relay.toml")).0,
        0o640
    );
    assert!(
        dir.path()
            .join("usr/lib/systemd/system/tandem-relay.service")
            .exists()
    );
    // Enabled for the next boot (the root has no running systemd to start it now).
    // (A link to an absolute path inside the root: looked at, not followed.)
    assert!(
        dir.path()
            .join("etc/systemd/system/multi-user.target.wants/tandem-relay.service")
            .symlink_metadata()
            .is_ok()
    );

    // Runs as its user from the packaged configuration; admin commands share its data.
    let pin = relay_answers_health(&root);
    let added =
        run(&mut root.as_relay_user(&["technician", "add", "--org", "ACME IT", "--name", "alice"]));
    assert!(added.contains("tnd_"), "{added}");

    // ---- upgrade keeps data ----
    let relay2 = deb(&v2, "tandem-relay");
    root.ok(&["dpkg", "-i", &relay2]);
    assert!(
        root.ok(&["dpkg-query", "-W", "tandem-relay"])
            .contains("0.1.0+2")
    );
    let listed = run(&mut root.as_relay_user(&["technician", "list"]));
    assert!(
        listed.contains("alice"),
        "technicians survive the upgrade: {listed}"
    );
    assert_eq!(
        relay_answers_health(&root),
        pin,
        "same certificate after the upgrade"
    );

    // ---- purge removes it all ----
    root.ok(&["dpkg", "--purge", "tandem-relay"]);
    assert!(!dir.path().join("var/lib/tandem-relay").exists());
    assert!(!dir.path().join("etc/tandem/relay.toml").exists());
    assert!(!dir.path().join("usr/bin/tandem-relay").exists());
    assert!(!root.succeeds(&["getent", "passwd", "tandem-relay"]));

    // ---- agent and console: dependencies from Debian, they run, desktop entries ----
    root.ok(&["apt-get", "update", "-qq"]);
    for name in ["tandem-agent", "tandem-console"] {
        let p = deb(&v1, name);
        root.ok(&[
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            &p,
        ]);
        let version = root.ok(&[name, "--version"]);
        assert!(version.contains("0.1.0"), "{version}");
        assert!(
            dir.path()
                .join(format!("usr/share/applications/{name}.desktop"))
                .exists()
        );
        assert!(
            dir.path()
                .join(format!("usr/share/icons/hicolor/scalable/apps/{name}.svg"))
                .exists()
        );
        let p2 = deb(&v2, name);
        root.ok(&["dpkg", "-i", &p2]);
        root.ok(&["dpkg", "--purge", name]);
        assert!(!dir.path().join(format!("usr/bin/{name}")).exists());
    }
    assert!(!root.succeeds(&["tandem-org", "--help"]));
}
