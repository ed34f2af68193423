//! File transfer benchmark, in one run through the real `tandem-relay` on loopback:
//!
//!   1. the inner session's raw stream: one transfer stream of the session carrying N MiB of
//!      bytes with no protocol on top (the ceiling a file can reach through this relay);
//!   2. a file of N MiB through the same kind of session with the toolbox's protocol (hash the
//!      file, offer, BLAKE3-checked chunks, write, verify, rename);
//!   3. `scp` of the same file over loopback to a local `sshd` (installed and started by the
//!      bench when it runs as root; otherwise the column is left out and the command printed).
//!
//! Rounds alternate 1, 2, 3 so the shared machine's noise hits all alike; the ratio file ÷ raw is
//! taken round by round. Prints a table and writes `target/bench/toolbox.json`.
//!
//!     cargo bench -p tandem-tests --bench toolbox [-- --mib 256 --rounds 5]
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Instant;
use tandem_certs::RelayTrust;
use tandem_client::ConnectOptions;
use tandem_session::{Fallback, Session};
use tandem_tests::{bench_arg, percentile, write_bench_json};

fn main() {
    tandem_tests::bench_main(run());
}

/// MB/s of one raw stream of `bytes` from the console to the agent.
async fn raw(agent: &Session, console: &Session, bytes: u64) -> f64 {
    let t = Instant::now();
    let mut out = console.transfer_opener().open().await.unwrap();
    let send = tokio::spawn(async move {
        let buf = vec![0x5au8; 256 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            out.send.write_all(&buf[..n]).await.unwrap();
            left -= n as u64;
        }
        out.send.finish().unwrap();
        let _ = out.send.stopped().await;
    });
    let mut t_in = agent.accept_transfer().await.unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while let Some(n) = t_in.recv.read(&mut buf).await.unwrap() {
        got += n as u64;
    }
    assert_eq!(got, bytes);
    send.await.unwrap();
    bytes as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// MB/s of one file through the toolbox's protocol (the time includes hashing the file first
/// and verifying it at the end). `paced`: as the programs send, paced by the session's RTT
/// (`tandem_toolbox::Pacer`); otherwise as fast as the stream takes it.
async fn file(agent: &Session, console: &Session, src: &Path, inbox: &Path, paced: bool) -> f64 {
    let size = std::fs::metadata(src).unwrap().len();
    let ib = tandem_toolbox::Inbox::new(
        inbox,
        tandem_toolbox::InboxOptions {
            quota: u64::MAX / 2,
            ..Default::default()
        },
    )
    .unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let t = Instant::now();
    let out = console.transfer_opener().open().await.unwrap();
    let item = tandem_toolbox::Outgoing::new(src, "bench.bin", size);
    let mut options = tandem_toolbox::SendOptions::default();
    if paced {
        let conn = console.connection().clone();
        options.pacer = Some(std::sync::Arc::new(tandem_toolbox::Pacer::new(
            std::sync::Arc::new(move || conn.rtt()),
        )));
    }
    let hashed = std::sync::Mutex::new(None);
    let send = tandem_toolbox::send_file(
        out.recv,
        out.send,
        &item,
        &options,
        |p: &tandem_toolbox::Progress| {
            if p.stage != tandem_toolbox::Stage::Hashing {
                hashed.lock().unwrap().get_or_insert(t.elapsed());
            }
        },
        &cancel,
    );
    let received_all = std::sync::Mutex::new(None);
    let recv = async {
        let t_in = agent.accept_transfer().await.unwrap();
        tandem_toolbox::receive_file(
            t_in.recv,
            t_in.send,
            &ib,
            |p: &tandem_toolbox::Progress| {
                if p.done == p.total {
                    received_all.lock().unwrap().get_or_insert(t.elapsed());
                }
            },
            &cancel,
        )
        .await
    };
    let (s, r) = tokio::join!(send, recv);
    s.unwrap();
    let got = r.unwrap();
    let mbs = size as f64 / t.elapsed().as_secs_f64() / 1e6;
    if std::env::var_os("TOOLBOX_BENCH_TRACE").is_some() {
        eprintln!(
            "file: hashed and offered after {:?}, all chunks read by the receiver {:?}, total {:?}",
            hashed.lock().unwrap(),
            received_all.lock().unwrap(),
            t.elapsed()
        );
    }
    std::fs::remove_file(got.path).unwrap();
    mbs
}

/// A throwaway sshd on loopback and an scp command line to reach it; `None` (and why) where
/// there is no sshd.
struct Ssh {
    child: std::process::Child,
    port: u16,
    key: PathBuf,
}

fn start_sshd(dir: &Path) -> Result<Ssh, String> {
    let sshd = Path::new("/usr/sbin/sshd");
    if !sshd.exists() {
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if !root {
            return Err("no sshd: sudo apt-get install -y openssh-server".into());
        }
        let ok = std::process::Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "openssh-server",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok || !sshd.exists() {
            return Err("openssh-server could not be installed".into());
        }
    }
    let key = dir.join("id");
    let host = dir.join("host");
    for (k, t) in [(&key, "ed25519"), (&host, "ed25519")] {
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", t, "-N", "", "-f"])
            .arg(k)
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err("ssh-keygen failed".into());
        }
    }
    let auth = dir.join("authorized_keys");
    std::fs::copy(dir.join("id.pub"), &auth).map_err(|e| e.to_string())?;
    let port = tandem_tests::free_port();
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             PidFile {}\nStrictModes no\nUsePAM no\nPermitRootLogin yes\n\
             PasswordAuthentication no\nSubsystem sftp internal-sftp\n",
            host.display(),
            auth.display(),
            dir.join("sshd.pid").display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let _ = std::fs::create_dir_all("/run/sshd");
    let child = std::process::Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(&cfg)
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    // Wait until it listens.
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(Ssh { child, port, key });
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err("sshd did not start".into())
}

impl Ssh {
    /// MB/s of `scp src dest` over loopback.
    fn scp(&self, src: &Path, dest: &Path) -> f64 {
        let size = std::fs::metadata(src).unwrap().len();
        let t = Instant::now();
        let st = std::process::Command::new("scp")
            .args(["-q", "-P", &self.port.to_string(), "-i"])
            .arg(&self.key)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
            ])
            .arg(src)
            .arg(format!("root@127.0.0.1:{}", dest.display()))
            .status()
            .unwrap();
        assert!(st.success(), "scp failed");
        let mbs = size as f64 / t.elapsed().as_secs_f64() / 1e6;
        let _ = std::fs::remove_file(dest);
        mbs
    }
}

impl Drop for Ssh {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn run() {
    let mib: u64 = bench_arg("--mib", 256);
    let rounds: usize = bench_arg("--rounds", 5);
    let dir = tempfile::tempdir().unwrap();
    let (relay, token) = tandem_tests::bench_relay(dir.path(), &[]).await;
    let opts = ConnectOptions::new(relay.addr.clone(), RelayTrust::Pin(relay.pin));
    let src = dir.path().join("src.bin");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).unwrap());
        let mut block = vec![0u8; 1 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..mib {
            for b in block.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            f.write_all(&block).unwrap();
        }
        f.flush().unwrap();
    }
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let ssh = start_sshd(dir.path());
    if let Err(e) = &ssh {
        eprintln!("scp column left out: {e}");
    }
    let bytes = mib << 20;
    let (mut raws, mut files, mut unpaced, mut scps, mut ratios) =
        (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        // A fresh session each round, as each transfer in real use has its own.
        let (agent, console, _) =
            tandem_tests::session_pair(&opts, &token, Fallback::default()).await;
        let r = raw(&agent, &console, bytes).await;
        let f = file(&agent, &console, &src, &inbox, true).await;
        unpaced.push(file(&agent, &console, &src, &inbox, false).await);
        raws.push(r);
        files.push(f);
        ratios.push(f / r);
        drop((agent, console));
        if let Ok(s) = &ssh {
            let dest = dir.path().join("scp-dest.bin");
            scps.push(s.scp(&src, &dest));
        }
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!();
    println!(
        "Tandem file transfer, {mib} MiB per transfer, {rounds} rounds ({cores} cores; relay as a \
         release process, both session ends in this process, loopback)"
    );
    println!("{:<44} {:>10} {:>10}", "", "p50", "p99");
    let row = |name: &str, v: &[f64], unit: &str| {
        println!(
            "{:<44} {:>7.1} {unit} {:>7.1} {unit}",
            name,
            percentile(v, 0.5),
            percentile(v, 0.99)
        );
    };
    row("inner session raw stream (ceiling), MB/s", &raws, "");
    row("file as the programs send it (paced), MB/s", &files, "");
    row("file unpaced (protocol alone), MB/s", &unpaced, "");
    if !scps.is_empty() {
        row("scp over loopback, MB/s", &scps, "");
    }
    println!(
        "{:<44} {:>10.2} {:>10.2}   (round by round; target ≥ 0.80)",
        "file ÷ raw",
        percentile(&ratios, 0.5),
        percentile(&ratios, 0.01)
    );
    let r: Vec<f64> = unpaced.iter().zip(&raws).map(|(u, r)| u / r).collect();
    println!(
        "{:<44} {:>10.2} {:>10.2}",
        "file unpaced ÷ raw",
        percentile(&r, 0.5),
        percentile(&r, 0.01)
    );
    if !scps.is_empty() {
        let r: Vec<f64> = files.iter().zip(&scps).map(|(f, s)| f / s).collect();
        println!(
            "{:<44} {:>10.2} {:>10.2}",
            "file ÷ scp",
            percentile(&r, 0.5),
            percentile(&r, 0.01)
        );
    }
    write_bench_json(
        "toolbox",
        &serde_json::json!({
            "mib": mib, "rounds": rounds, "cores": cores,
            "raw_mb_s": raws, "file_mb_s": files, "file_unpaced_mb_s": unpaced, "scp_mb_s": scps,
            "file_over_raw": ratios,
            "file_over_raw_p50": percentile(&ratios, 0.5),
        }),
    );
    relay.terminate().await;
}
