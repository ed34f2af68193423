//! Organisation keys with the real programs: `tandem-org` makes the organisation key, a
//! technician's key and request, and signs certificates and revocation lists; `tandem-agent` pins
//! the organisation and verifies the console's certificate itself, inside the end-to-end session.
//! The relay in these tests is a real one that knows nothing of the organisation key: what it
//! says about the technician never makes the agent say "verified".
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use tandem_tests::org::*;
use tandem_tests::{RelayProcess, binary};

async fn setup() -> (tempfile::TempDir, RelayProcess, String) {
    let (dir, relay, token, _) = relay_for_org_tests().await;
    (dir, relay, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certified_technician_is_verified_by_the_agent_and_others_are_not() {
    let (dir, relay, token) = setup().await;
    let acme = make_org(dir.path(), "ACME IT");
    assert!(acme.line.starts_with("tandem-org-v1:"), "{}", acme.line);
    // The key file is encrypted and private.
    use std::os::unix::fs::PermissionsExt;
    let key_text = std::fs::read_to_string(&acme.key).unwrap();
    assert!(key_text.starts_with("tandem-sealedkey-v1:"));
    assert_eq!(
        std::fs::metadata(&acme.key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (cert, key) = technician(dir.path(), &acme, "alice", "view,control");
    let mut agent = Agent::start(&relay, &["--org", &acme.line]).await;
    let o = agent.next("organisation").await;
    assert_eq!(o["fingerprint"], acme.fingerprint.as_str());

    // With the certificate: verified, on both sides, with the certificate's rights.
    let code = agent.code().await;
    let (rc, ev, err) = console_certified(&relay, &token, &code, (&cert, &key)).await;
    assert_eq!(rc, 0, "{ev:?}\n{err}");
    assert_eq!(event(&ev, "joined")["verified"], true, "{ev:?}");
    let asked = agent.next("technician").await;
    assert_eq!(asked["verified"], true, "{asked}");
    let trust = asked["trust"].as_str().unwrap();
    assert!(
        trust.contains("verified by ACME IT's key") && trust.contains(&acme.fingerprint),
        "{trust}"
    );
    assert_eq!(event(&ev, "consent")["decision"], "AllowControl");

    // Without a certificate: the relay's names, plainly "NOT verified".
    let code = agent.code().await;
    let (rc, ev, err) = console(&relay, &token, &code, &[]).await;
    assert_eq!(rc, 0, "{ev:?}\n{err}");
    assert_eq!(event(&ev, "joined")["verified"], false);
    // Nobody answers on this agent (`--consent allow`): an unverified technician gets view only.
    assert_eq!(event(&ev, "consent")["decision"], "ViewOnly", "{ev:?}");
    let asked = agent.next("technician").await;
    assert_eq!(asked["verified"], false);
    assert!(
        asked["trust"].as_str().unwrap().contains("NOT verified")
            && asked["trust"].as_str().unwrap().contains("no certificate"),
        "{asked}"
    );

    // Another organisation that calls itself "ACME IT" too (what a stolen relay would mint):
    // not verified, and said why.
    let evil = make_org(&mkdir(dir.path().join("evil")), "ACME IT");
    let (ecert, ekey) = technician(&dir.path().join("evil"), &evil, "alice", "all");
    let code = agent.code().await;
    let (rc, ev, _) = console_certified(&relay, &token, &code, (&ecert, &ekey)).await;
    assert_eq!(rc, 0);
    assert_eq!(event(&ev, "joined")["verified"], false);
    let asked = agent.next("technician").await;
    assert_eq!(asked["verified"], false);
    assert!(
        asked["trust"]
            .as_str()
            .unwrap()
            .contains("another organisation"),
        "{asked}"
    );

    // A certificate with someone else's key (a copied certificate without its key): refused by
    // the console before it connects.
    let (_, other_key) = technician(dir.path(), &acme, "bob", "view");
    let code = agent.code().await;
    let (rc, _, err) = console_certified(&relay, &token, &code, (&cert, &other_key)).await;
    assert_ne!(rc, 0);
    assert!(err.contains("do not belong together"), "{err}");
    relay.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_permissions_and_revocation_are_enforced_by_the_agent() {
    let (dir, relay, token) = setup().await;
    let acme = make_org(dir.path(), "ACME IT");
    let (cert, key) = technician(dir.path(), &acme, "alice", "view,control");
    let (vcert, vkey) = technician(dir.path(), &acme, "victor", "view");

    // --require-verified: a console without a certificate is refused before any prompt, and told.
    let mut agent = Agent::start(&relay, &["--org", &acme.line, "--require-verified"]).await;
    let code = agent.code().await;
    let (rc, ev, err) = console(&relay, &token, &code, &[]).await;
    assert_eq!(rc, 15, "{ev:?}\n{err}");
    assert!(
        err.contains("accepts only technicians verified by its organisation's key"),
        "{err}"
    );
    // The agent asked nothing and shows a new code (after its pause).
    let next = agent.code().await;
    // A verified technician gets in.
    let (rc, ev, err) = console_certified(&relay, &token, &next, (&cert, &key)).await;
    assert_eq!(rc, 0, "{ev:?}\n{err}");
    assert_eq!(event(&ev, "consent")["decision"], "AllowControl");

    // A view-only certificate: the user's "allow control" becomes view only, on the agent.
    let code = agent.code().await;
    let (rc, ev, err) = console_certified(&relay, &token, &code, (&vcert, &vkey)).await;
    assert_eq!(rc, 0, "{ev:?}\n{err}");
    assert_eq!(event(&ev, "consent")["decision"], "ViewOnly", "{ev:?}");
    agent.next("certificate_limits").await;
    drop(agent);

    // Revocation: the administrator revokes alice's certificate; an agent given the list refuses
    // it, and keeps the list across a restart even when started without it.
    let list = dir.path().join("revocation");
    org(&[
        "revoke",
        "--key",
        s(&acme.key),
        "--list",
        s(&list),
        "--cert",
        s(&cert),
    ]);
    let state = tempfile::tempdir().unwrap();
    let mut agent = Agent::start_in(
        &relay,
        &["--org", &acme.line, "--revocation", s(&list)],
        state,
    )
    .await;
    let code = agent.code().await;
    let (_, ev, _) = console_certified(&relay, &token, &code, (&cert, &key)).await;
    assert_eq!(event(&ev, "joined")["verified"], false);
    let asked = agent.next("technician").await;
    assert!(
        asked["trust"].as_str().unwrap().contains("revoked"),
        "{asked}"
    );
    let kept = agent.state.path().join("revocation");
    assert!(kept.exists());
    let state = std::mem::replace(&mut agent.state, tempfile::tempdir().unwrap());
    drop(agent);
    let mut agent = Agent::start_in(&relay, &["--org", &acme.line], state).await;
    let code = agent.code().await;
    let (_, ev, _) = console_certified(&relay, &token, &code, (&cert, &key)).await;
    assert_eq!(
        event(&ev, "joined")["verified"],
        false,
        "revocation forgotten"
    );

    // A newer list (serial 2: victor's key revoked too) arrives with victor's own console, as
    // the relay or any console may carry it: victor is refused now.
    org(&[
        "revoke",
        "--key",
        s(&acme.key),
        "--list",
        s(&list),
        "--technician-of",
        s(&vcert),
    ]);
    let code = agent.code().await;
    let (_, ev, _) = console(
        &relay,
        &token,
        &code,
        &[
            "--cert",
            s(&vcert),
            "--cert-key",
            s(&vkey),
            "--revocation",
            s(&list),
        ],
    )
    .await;
    assert_eq!(event(&ev, "joined")["verified"], false);
    let asked = agent.next("technician").await;
    assert!(
        asked["trust"].as_str().unwrap().contains("revoked"),
        "{asked}"
    );
    // An older list (a fresh one: serial 1, nothing revoked) cannot roll the agent back.
    let stale = dir.path().join("stale");
    org(&["revoke", "--key", s(&acme.key), "--list", s(&stale)]);
    let code = agent.code().await;
    let (_, ev, _) = console(
        &relay,
        &token,
        &code,
        &[
            "--cert",
            s(&cert),
            "--cert-key",
            s(&key),
            "--revocation",
            s(&stale),
        ],
    )
    .await;
    assert_eq!(
        event(&ev, "joined")["verified"],
        false,
        "a stale list rolled the agent back"
    );
    drop(agent);
    relay.terminate().await;
}

/// The administrator publishes the list on the relay (`<data_dir>/revocation`); every agent gets it
/// when it registers, checks the organisation's signature and keeps it: a revoked technician who
/// carries no list is refused all the same. A relay cannot undo it by sending an older list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_carries_revocation_lists_it_cannot_forge_or_roll_back() {
    let (dir, relay, token) = setup().await;
    let acme = make_org(dir.path(), "ACME IT");
    let (cert, key) = technician(dir.path(), &acme, "alice", "view,control");
    let work = mkdir(dir.path().join("admin"));
    let list = work.join("revocation");
    org(&[
        "revoke",
        "--key",
        s(&acme.key),
        "--list",
        s(&list),
        "--cert",
        s(&cert),
    ]);
    let newer = std::fs::read_to_string(&list).unwrap();
    // An older list (serial 1, nothing revoked) made before, from a copy.
    let stale = work.join("stale");
    org(&["revoke", "--key", s(&acme.key), "--list", s(&stale)]);
    org(&[
        "revoke",
        "--key",
        s(&acme.key),
        "--list",
        s(&list),
        "--cert",
        s(&cert),
    ]);
    let newer2 = std::fs::read_to_string(&list).unwrap();
    assert_ne!(newer, newer2);
    std::fs::write(dir.path().join("revocation"), &newer2).unwrap();

    let mut agent = Agent::start(&relay, &["--org", &acme.line]).await;
    let code = agent.code().await;
    let (_, ev, _) = console_certified(&relay, &token, &code, (&cert, &key)).await;
    assert_eq!(event(&ev, "joined")["verified"], false, "{ev:?}");
    let t = agent.next("technician").await;
    assert!(t["trust"].as_str().unwrap().contains("revoked"), "{t}");
    assert!(agent.state.path().join("revocation").exists());

    // The relay now hands out the stale list (serial 1 < 2): the agent keeps its own.
    std::fs::copy(&stale, dir.path().join("revocation")).unwrap();
    let code = agent.code().await;
    let (_, ev, _) = console_certified(&relay, &token, &code, (&cert, &key)).await;
    assert_eq!(
        event(&ev, "joined")["verified"],
        false,
        "the relay rolled the list back"
    );
    // And garbage from the relay changes nothing either.
    std::fs::write(dir.path().join("revocation"), "tandem-revocation-v1:AAAA").unwrap();
    let code = agent.code().await;
    let (_, ev, _) = console_certified(&relay, &token, &code, (&cert, &key)).await;
    assert_eq!(event(&ev, "joined")["verified"], false);
    relay.terminate().await;
}

#[test]
fn the_org_tool_refuses_what_it_must() {
    let dir = tempfile::tempdir().unwrap();
    let acme = make_org(dir.path(), "ACME IT");
    // A wrong passphrase opens nothing.
    let out = std::process::Command::new(binary("tandem-org"))
        .args(["show", "--key", s(&acme.key)])
        .env("TANDEM_ORG_PASSPHRASE", "wrong")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"));
    // The key is made once.
    let out = std::process::Command::new(binary("tandem-org"))
        .args(["init", "--name", "ACME IT", "--key", s(&acme.key)])
        .env("TANDEM_ORG_PASSPHRASE", PASS)
        .output()
        .unwrap();
    assert!(!out.status.success());
    // More than 7 days is refused.
    let key = dir.path().join("t.key");
    let req = dir.path().join("t.req");
    org(&["request", "--name", "t", "--key", s(&key), "--out", s(&req)]);
    let out = std::process::Command::new(binary("tandem-org"))
        .args([
            "issue",
            "--key",
            s(&acme.key),
            "--request",
            s(&req),
            "--validity",
            "8d",
        ])
        .env("TANDEM_ORG_PASSPHRASE", PASS)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 7 days"));
    // Show prints the same line init did.
    assert!(org(&["show", "--key", s(&acme.key)]).contains(&acme.line));
}
