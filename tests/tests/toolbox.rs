//! The technician's toolbox with the real programs: chat (before consent too), clipboard both
//! ways through a real X clipboard, and files both ways (hash checked, resumed after a cut,
//! hostile names refused, quota).
#![allow(clippy::unwrap_used)]

use tandem_tests::org::{Agent, relay_for_org_tests};

fn index_of(ev: &[serde_json::Value], kind: &str) -> Option<usize> {
    ev.iter().position(|e| e["event"] == kind)
}

/// A real agent on `x` that allows the session at once (`--consent allow`), with `extra` flags.
async fn agent_allowing(
    relay: &tandem_tests::RelayProcess,
    x: &tandem_tests::x11::Xvfb,
    extra: &[&str],
) -> Agent {
    let mut args = vec!["--consent", "allow", "--display", &x.display];
    args.extend_from_slice(extra);
    Agent::start_unattended(relay, &args, tempfile::tempdir().unwrap()).await
}

/// The user can ask "who are you?" before deciding, and the technician's hello arrives before
/// anything is shared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_works_before_consent_both_ways() {
    let (_dir, relay, token, _cfg) = relay_for_org_tests().await;
    let mut agent = Agent::start_unattended(
        &relay,
        &["--consent", "lines"],
        tempfile::tempdir().unwrap(),
    )
    .await;
    let code = agent.code().await;
    let console = {
        let (addr, pin, token, code) = (
            relay.addr.clone(),
            relay.pin.to_string(),
            token.clone(),
            code,
        );
        tokio::spawn(async move {
            tandem_tests::org::console_at(
                &addr,
                &pin,
                &token,
                &[
                    "--code",
                    &code,
                    "--chat",
                    "Hello, Bob from IT here",
                    "--seconds",
                    "6",
                ],
            )
            .await
        })
    };
    let hello = agent.next("chat").await;
    assert_eq!(hello["text"], "Hello, Bob from IT here");
    assert_eq!(hello["from"], "technician");
    agent.type_line("say who are you? \u{1b}[2J").await;
    let sent = agent.next("chat_sent").await;
    assert_eq!(sent["sent"], true, "{sent}");
    agent.type_line("a").await;
    agent.next("session").await;
    let (rc, ev, err) = console.await.unwrap();
    assert_eq!(rc, 0, "{err}");
    let user = ev
        .iter()
        .find(|e| e["event"] == "chat")
        .unwrap_or_else(|| panic!("the user's line: {ev:?}"));
    // The escape sequence arrives escaped, never as a live control character.
    assert_eq!(user["text"], "who are you? \\u{1b}[2J", "{user}");
    assert!(
        index_of(&ev, "chat").unwrap() < index_of(&ev, "consent").unwrap(),
        "the question came before the answer: {ev:?}"
    );
}

/// Runs `xclip` on `display` with `args`, feeding `input`; returns its output.
fn xclip(display: &str, args: &[&str], input: Option<&[u8]>) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("xclip")
        .args(["-display", display, "-selection", "clipboard"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("xclip (scripts/deps.sh installs it)");
    let mut stdin = child.stdin.take().unwrap();
    if let Some(i) = input {
        stdin.write_all(i).unwrap();
    }
    drop(stdin);
    if input.is_some() {
        // xclip -i stays in the background serving the selection; its output is nothing.
        std::mem::forget(child);
        return Vec::new();
    }
    child.wait_with_output().unwrap().stdout
}

/// Polls `f` until it returns `Some` (at most 15 s).
async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn spawn_console(
    relay: &tandem_tests::RelayProcess,
    token: &str,
    args: Vec<String>,
) -> tokio::task::JoinHandle<(i32, Vec<serde_json::Value>, String)> {
    let (addr, pin, token) = (relay.addr.clone(), relay.pin.to_string(), token.to_owned());
    tokio::spawn(async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tandem_tests::org::console_at(&addr, &pin, &token, &args).await
    })
}

fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgba);
    let mut wr = enc.write_header().unwrap();
    let data: Vec<u8> = (0..w * h * 4).map(|i| (i * 7 % 251) as u8).collect();
    wr.write_image_data(&data).unwrap();
    wr.finish().unwrap();
    out
}

/// Text both ways through a real X clipboard: the technician's text is pasted by an X client on
/// the user's screen, and what the user copies there reaches the technician.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clipboard_text_both_ways_through_the_x_clipboard() {
    let (_dir, relay, token, _cfg) = relay_for_org_tests().await;
    let x = tandem_tests::x11::Xvfb::start(640, 480);
    let mut agent = agent_allowing(&relay, &x, &[]).await;
    let code = agent.code().await;
    let out = tempfile::tempdir().unwrap();
    let got = out.path().join("clip.txt");
    let sent = "sudo systemctl restart cups # from the technician ✓";
    let console = spawn_console(
        &relay,
        &token,
        vec![
            "--code".into(),
            code,
            "--clipboard-set".into(),
            sent.into(),
            "--clipboard-get".into(),
            got.to_str().unwrap().into(),
            "--seconds".into(),
            "8".into(),
        ],
    );
    let ev = agent.next("clipboard").await;
    assert_eq!(ev["to_technician"], false, "{ev}");
    let pasted = xclip(&x.display, &["-o"], None);
    assert_eq!(String::from_utf8_lossy(&pasted), sent);
    // The user copies something: it reaches the technician.
    xclip(&x.display, &["-i"], Some(b"lpstat output from the user"));
    let ev = agent.next("clipboard").await;
    assert_eq!(ev["to_technician"], true, "{ev}");
    let text = eventually("the console wrote the user's clipboard", || {
        std::fs::read_to_string(&got).ok()
    })
    .await;
    assert_eq!(text, "lpstat output from the user");
    let (rc, ev, err) = console.await.unwrap();
    assert_eq!(rc, 0, "{err}");
    let c = ev.iter().find(|e| e["event"] == "clipboard").unwrap();
    assert_eq!(c["image"], false);
}

/// Images both ways: the technician's PNG (policy `yes`) is what an X client pastes, byte for
/// byte; the user's PNG reaches the technician.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clipboard_images_both_ways() {
    let (_dir, relay, token, _cfg) = relay_for_org_tests().await;
    let x = tandem_tests::x11::Xvfb::start(640, 480);
    let mut agent = agent_allowing(&relay, &x, &["--clipboard-images", "yes"]).await;
    let code = agent.code().await;
    let out = tempfile::tempdir().unwrap();
    let got = out.path().join("clip.png");
    let tech_png = png_bytes(300, 200);
    let tech_file = out.path().join("tech.png");
    std::fs::write(&tech_file, &tech_png).unwrap();
    let console = spawn_console(
        &relay,
        &token,
        vec![
            "--code".into(),
            code,
            "--clipboard-set-png".into(),
            tech_file.to_str().unwrap().into(),
            "--clipboard-get".into(),
            got.to_str().unwrap().into(),
            "--seconds".into(),
            "8".into(),
        ],
    );
    let ev = agent.next("clipboard").await;
    assert_eq!(ev["image"], true, "{ev}");
    assert_eq!(
        xclip(&x.display, &["-o", "-t", "image/png"], None),
        tech_png
    );
    let user_png = png_bytes(120, 90);
    xclip(&x.display, &["-i", "-t", "image/png"], Some(&user_png));
    let got_png = eventually("the console wrote the user's image", || {
        std::fs::read(&got)
            .ok()
            .filter(|d| d.len() == user_png.len())
    })
    .await;
    assert_eq!(got_png, user_png);
    let (rc, _ev, err) = console.await.unwrap();
    assert_eq!(rc, 0, "{err}");
}

/// View only: the console does not send, the agent does not share (nothing reaches the X
/// clipboard, nothing of the user's reaches the technician). Switched off by the user's policy:
/// the agent refuses what arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clipboard_is_refused_in_view_only_and_when_switched_off() {
    let (_dir, relay, token, _cfg) = relay_for_org_tests().await;
    let x = tandem_tests::x11::Xvfb::start(640, 480);
    for (consent, extra) in [("view-only", None), ("allow", Some("--no-clipboard"))] {
        let mut args = vec!["--consent", consent, "--display", &x.display];
        args.extend(extra);
        let mut agent = Agent::start_unattended(&relay, &args, tempfile::tempdir().unwrap()).await;
        let code = agent.code().await;
        let out = tempfile::tempdir().unwrap();
        let got = out.path().join("clip.txt");
        let console = spawn_console(
            &relay,
            &token,
            vec![
                "--code".into(),
                code,
                "--clipboard-set".into(),
                "rm -rf ~".into(),
                "--clipboard-get".into(),
                got.to_str().unwrap().into(),
                "--seconds".into(),
                "4".into(),
            ],
        );
        agent.next("session").await;
        xclip(&x.display, &["-i"], Some(b"the user's private text"));
        let (rc, ev, err) = console.await.unwrap();
        assert_eq!(rc, 0, "{err}");
        assert!(
            !got.exists(),
            "{consent}: nothing of the user's clipboard arrived"
        );
        let pasted = xclip(&x.display, &["-o"], None);
        assert_ne!(String::from_utf8_lossy(&pasted), "rm -rf ~", "{consent}");
        if consent == "view-only" {
            assert!(
                ev.iter().any(|e| e["event"] == "clipboard_not_sent"),
                "the console said why: {ev:?}"
            );
        } else {
            let r = agent.next("clipboard_refused").await;
            assert_eq!(r["to_technician"], false, "{r}");
        }
    }
}

/// A file of `mb` MiB of varied bytes.
fn big_file(path: &std::path::Path, mb: usize, seed: u8) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut block = vec![0u8; 1 << 20];
    for i in 0..mb {
        for (j, b) in block.iter_mut().enumerate() {
            *b = (j as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(i as u32 * 31 + seed as u32)
                .to_le_bytes()[1];
        }
        f.write_all(&block).unwrap();
    }
    f.flush().unwrap();
}

fn hash_of(path: &std::path::Path) -> String {
    blake3::hash(&std::fs::read(path).unwrap())
        .to_hex()
        .to_string()
}

/// 200 MB to the user and 50 MB from the user in one session, each checked by its hash on
/// arrival; the user's folder gets exactly the files, no partials left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_both_ways_arrive_whole_and_verified() {
    let (_dir, relay, token, _cfg) = relay_for_org_tests().await;
    // A desktop: without one the session is view only, and the user takes no files.
    let x = tandem_tests::x11::Xvfb::start(320, 240);
    let work = tempfile::tempdir().unwrap();
    let tech_file = work.path().join("driver-installer.bin");
    let user_file = work.path().join("cups-error_log");
    big_file(&tech_file, 200, 1);
    big_file(&user_file, 50, 2);
    let user_dl = work.path().join("user-downloads");
    let tech_dl = work.path().join("tech-downloads");
    let mut agent = agent_allowing(
        &relay,
        &x,
        &[
            "--downloads",
            user_dl.to_str().unwrap(),
            "--send",
            user_file.to_str().unwrap(),
        ],
    )
    .await;
    let code = agent.code().await;
    let (rc, ev, err) = tandem_tests::org::console_with(
        &relay,
        &token,
        &[
            "--code",
            &code,
            "--send",
            tech_file.to_str().unwrap(),
            "--downloads",
            tech_dl.to_str().unwrap(),
            "--end-when-done",
            "--seconds",
            "25",
        ],
    )
    .await;
    assert_eq!(rc, 0, "{err}");
    let done: Vec<_> = ev
        .iter()
        .filter(|e| e["event"] == "transfer_done")
        .collect();
    assert_eq!(done.len(), 2, "{ev:?}");
    assert_eq!(
        hash_of(&user_dl.join("driver-installer.bin")),
        hash_of(&tech_file)
    );
    assert_eq!(
        hash_of(&tech_dl.join("cups-error_log")),
        hash_of(&user_file)
    );
    for d in [&user_dl, &tech_dl] {
        let names: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "only the file, no partial: {names:?}");
    }
    let agent_done = agent.next("transfer_done").await;
    assert!(
        agent_done["hash"].as_str().unwrap().len() == 64,
        "{agent_done}"
    );
}

/// Hostile names from a technician's console are refused by the agent with nothing written, a
/// file over the session's quota is refused, and an existing file is never overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_and_existing_names_are_respected() {
    let (_dir, relay, token, _cfg) = relay_for_org_tests().await;
    // A desktop: without one the session is view only, and the user takes no files.
    let x = tandem_tests::x11::Xvfb::start(320, 240);
    let work = tempfile::tempdir().unwrap();
    let user_dl = work.path().join("dl");
    std::fs::create_dir_all(&user_dl).unwrap();
    std::fs::write(user_dl.join("notes.txt"), "the user's own notes").unwrap();
    let notes = work.path().join("notes.txt");
    std::fs::write(&notes, "the technician's notes").unwrap();
    let big = work.path().join("big.bin");
    big_file(&big, 3, 3);
    let mut agent = agent_allowing(
        &relay,
        &x,
        &[
            "--downloads",
            user_dl.to_str().unwrap(),
            "--file-quota-mib",
            "2",
        ],
    )
    .await;
    let code = agent.code().await;
    let (rc, ev, err) = tandem_tests::org::console_with(
        &relay,
        &token,
        &[
            "--code",
            &code,
            "--send",
            notes.to_str().unwrap(),
            "--send",
            big.to_str().unwrap(),
            "--end-when-done",
            "--seconds",
            "20",
        ],
    )
    .await;
    assert_eq!(rc, 0, "{err}");
    let failed = ev
        .iter()
        .find(|e| e["event"] == "transfer_failed")
        .unwrap_or_else(|| panic!("{ev:?}"));
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("may only receive"),
        "{failed}"
    );
    assert_eq!(
        std::fs::read_to_string(user_dl.join("notes.txt")).unwrap(),
        "the user's own notes"
    );
    assert_eq!(
        std::fs::read_to_string(user_dl.join("notes (1).txt")).unwrap(),
        "the technician's notes"
    );
    assert!(!user_dl.join("big.bin").exists());
    let _ = agent.next("transfer_failed").await;
}

/// The relay dies while a file moves: the session ends, the partial file stays, and the same
/// file sent in the next session resumes where the first stopped (not from zero) and arrives
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_cut_by_a_relay_restart_resumes_in_the_next_session() {
    let (dir, relay, token, cfg) = relay_for_org_tests().await;
    let x = tandem_tests::x11::Xvfb::start(320, 240);
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("backup.tar");
    big_file(&file, 400, 4);
    let user_dl = work.path().join("dl");
    let mut agent = agent_allowing(&relay, &x, &["--downloads", user_dl.to_str().unwrap()]).await;
    let code = agent.code().await;
    let args = |code: String| {
        vec![
            "--code".to_string(),
            code,
            "--send".into(),
            file.to_str().unwrap().into(),
            "--end-when-done".into(),
            "--seconds".into(),
            "25".into(),
            // The cut is the relay's restart: the session stays on the relay path (a direct
            // session would carry on without it).
            "--path".into(),
            "relay-only".into(),
        ]
    };
    let first = spawn_console(&relay, &token, args(code));
    // Cut while the file is on its way.
    let cut_at = loop {
        let e = agent.next("transfer").await;
        let done = e["progress"]["done"].as_u64().unwrap();
        if e["progress"]["stage"] == "receiving" && done > 0 {
            break done;
        }
    };
    let cfg_s = cfg.to_str().unwrap().to_owned();
    let relay = relay
        .crash_and_restart_with(dir.path(), &["--config", &cfg_s])
        .await;
    let (_rc, _ev, _err) = first.await.unwrap();
    let code = agent.code().await;
    let second = args(code);
    let second: Vec<&str> = second.iter().map(String::as_str).collect();
    let (rc, ev, err) = tandem_tests::org::console_with(&relay, &token, &second).await;
    assert_eq!(rc, 0, "{err}");
    let done = ev
        .iter()
        .find(|e| e["event"] == "transfer_done")
        .unwrap_or_else(|| panic!("{ev:?}"));
    let resumed = done["resumed_from"].as_u64().unwrap();
    assert!(
        resumed > 0 && resumed < 400 << 20,
        "resumed, not restarted (cut after {cut_at} bytes): {done}"
    );
    assert_eq!(
        done["transferred"].as_u64().unwrap() + resumed,
        400 << 20,
        "only the rest crossed: {done}"
    );
    assert_eq!(hash_of(&user_dl.join("backup.tar")), hash_of(&file));
    let left: Vec<_> = std::fs::read_dir(&user_dl).unwrap().collect();
    assert_eq!(left.len(), 1, "the partial is gone");
}

/// The technician's link is cut for three seconds at about a third of a 300 MB file: the session
/// resumes within the relay's grace period and the transfer goes on from where it was (every byte
/// crossed once, nothing started over), verified at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_mid_transfer_pauses_it_and_it_goes_on() {
    use tandem_tests::impair::{ImpairProxy, Impairment};
    let (_dir, relay, token, _cfg) = relay_for_org_tests().await;
    let x = tandem_tests::x11::Xvfb::start(320, 240);
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("logs.tar");
    big_file(&file, 300, 5);
    let user_dl = work.path().join("dl");
    let mut agent = agent_allowing(&relay, &x, &["--downloads", user_dl.to_str().unwrap()]).await;
    let code = agent.code().await;
    let proxy = ImpairProxy::start(
        relay.addr.parse().unwrap(),
        Impairment::default(),
        Impairment::default(),
    )
    .await;
    let console = {
        let (addr, pin, token) = (proxy.addr.to_string(), relay.pin.to_string(), token.clone());
        let file = file.to_str().unwrap().to_owned();
        tokio::spawn(async move {
            tandem_tests::org::console_at(
                &addr,
                &pin,
                &token,
                &[
                    "--code",
                    &code,
                    "--send",
                    &file,
                    "--end-when-done",
                    "--seconds",
                    "40",
                    // The cut is on the relay path: the session stays on it.
                    "--path",
                    "relay-only",
                ],
            )
            .await
        })
    };
    loop {
        let e = agent.next("transfer").await;
        let (done, total) = (
            e["progress"]["done"].as_u64().unwrap(),
            e["progress"]["total"].as_u64().unwrap(),
        );
        if e["progress"]["stage"] == "receiving" && done * 3 >= total {
            break;
        }
    }
    proxy.cut(true);
    agent.next("peer_suspended").await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    proxy.cut(false);
    agent.next("peer_resumed").await;
    let (rc, ev, err) = console.await.unwrap();
    assert_eq!(rc, 0, "{err}");
    let done = ev
        .iter()
        .find(|e| e["event"] == "transfer_done")
        .unwrap_or_else(|| panic!("{ev:?}"));
    assert_eq!(
        done["resumed_from"], 0,
        "one transfer, not started over: {done}"
    );
    assert_eq!(done["transferred"].as_u64().unwrap(), 300 << 20, "{done}");
    assert_eq!(
        ev.iter().filter(|e| e["event"] == "transfer_done").count(),
        1
    );
    assert_eq!(hash_of(&user_dl.join("logs.tar")), hash_of(&file));
}
