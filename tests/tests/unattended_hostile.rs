//! Unattended access against a hostile relay (the test's fake relay: it believes every
//! certificate, lists what it likes, pairs anyone with anyone, or puts itself in the middle of the
//! inner connection). Only the organisation's keys decide: the agent checks the technician's
//! certificate itself, the console checks the device itself.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;
use tandem_proto::{DeviceListing, Secret};
use tandem_session::tandem_org::{
    CertRequest, Certificate, Credentials, DeviceCert, DeviceRequest, Enrollment, Issue, KeyPair,
    OrgPublic, Permissions, Presence, RevocationBody, RevocationList, TrustStore, unix_now,
};
use tandem_session::{
    DeviceEvent, DeviceHost, DeviceInfo, SessionConfig, SessionError, UnattendedPolicy,
};
use tandem_tests::fake_relay::{FakeRelay, Mode, Tamper};

const T: Duration = Duration::from_secs(30);

struct Org {
    key: KeyPair,
    public: OrgPublic,
}

fn org(name: &str) -> Org {
    let key = KeyPair::generate().unwrap();
    let public = OrgPublic::new(name, key.public()).unwrap();
    Org { key, public }
}

/// A technician of `o` with `perms` for `groups`, valid from `start` for an hour.
fn technician(o: &Org, perms: &str, groups: &[&str], start: u64) -> Credentials {
    let key = KeyPair::generate().unwrap();
    let req = CertRequest::new("alice", &key).unwrap();
    let cert = Certificate::issue(
        &o.key,
        &o.public.name,
        &req,
        &Issue {
            permissions: Permissions::parse(perms).unwrap(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            validity: 3600,
        },
        start,
    )
    .unwrap();
    Credentials::new(cert, key, None).unwrap()
}

fn enroll(o: &Org, group: &str) -> Enrollment {
    let key = KeyPair::generate().unwrap();
    let req = DeviceRequest::new("pc-7", &key).unwrap();
    let cert = DeviceCert::issue(&o.key, &o.public.name, &req, None, group, unix_now()).unwrap();
    Enrollment::new(key, cert, &o.public).unwrap()
}

fn agent_cfg(o: &Org) -> SessionConfig {
    SessionConfig {
        trust: Some(Arc::new(std::sync::Mutex::new(TrustStore::new(
            o.public.clone(),
            None,
        )))),
        setup_timeout: Duration::from_secs(10),
        ..SessionConfig::default()
    }
}

/// An enrolled agent online on `relay`; its events after "online" come through the channel.
fn device(
    relay: &FakeRelay,
    cfg: SessionConfig,
    e: Enrollment,
    policy: UnattendedPolicy,
) -> tokio::sync::mpsc::UnboundedReceiver<DeviceEvent> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut host = DeviceHost::new(
        relay.opts(),
        cfg,
        Arc::new(e),
        policy,
        DeviceInfo::default(),
    );
    tokio::spawn(async move {
        loop {
            match host.next().await {
                Ok(ev) => {
                    if tx.send(ev).is_err() {
                        return;
                    }
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    rx
}

async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<DeviceEvent>) -> DeviceEvent {
    tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap()
}

/// A console with `creds` connects to `id` through `relay`.
async fn connect(
    relay: &FakeRelay,
    id: &str,
    creds: Option<Credentials>,
) -> Result<tandem_session::Session, SessionError> {
    let cfg = SessionConfig {
        credentials: creds.map(Arc::new),
        setup_timeout: Duration::from_secs(10),
        ..SessionConfig::default()
    };
    tokio::time::timeout(
        T,
        tandem_session::connect_device(&relay.opts(), &Secret::new("tnd_1_x"), id, &cfg),
    )
    .await
    .unwrap()
}

/// What the agent made of the attempt (once it is back online for the next one).
async fn refusal(rx: &mut tokio::sync::mpsc::UnboundedReceiver<DeviceEvent>) -> String {
    let reason = loop {
        match next(rx).await {
            DeviceEvent::Refused { reason } => break reason,
            DeviceEvent::Online { .. } => continue,
            DeviceEvent::Session(_) => panic!("the agent accepted a session"),
        }
    };
    match next(rx).await {
        DeviceEvent::Online { .. } => reason,
        other => panic!("not back online: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_certificate_for_the_group_opens_the_device_whatever_the_relay_says() {
    tandem_tests::init_logs();
    let acme = org("ACME IT");
    let relay = FakeRelay::start(Mode::Forward(Tamper::default())).await;
    let dev = enroll(&acme, "servers");
    let id = dev.body.id.clone();
    let mut rx = device(&relay, agent_cfg(&acme), dev, UnattendedPolicy::default());
    assert!(matches!(next(&mut rx).await, DeviceEvent::Online { .. }));

    // The relay believes anything; the agent does not. Each attempt: the console hears the agent's
    // reason, the agent reports a refusal and comes back online.
    let now = unix_now();
    let cases: Vec<(&str, Option<Credentials>, &str)> = vec![
        (
            "no unattended permission",
            Some(technician(&acme, "view,control", &["servers"], now)),
            "does not allow unattended access",
        ),
        (
            "another group",
            Some(technician(&acme, "all", &["laptops"], now)),
            "device group (servers)",
        ),
        (
            "expired",
            Some(technician(&acme, "all", &["servers"], now - 3 * 3600)),
            "expired",
        ),
    ];
    for (what, creds, why) in cases {
        let r = connect(&relay, &id, creds).await;
        // The device is genuine, so the console reaches the agent's verdict and hears it.
        match r {
            Err(SessionError::Unverified(d)) => assert!(d.contains(why), "{what}: {d}"),
            other => panic!("{what}: {:?}", other.map(|_| "a session")),
        }
        let reason = refusal(&mut rx).await;
        assert!(reason.contains(why), "{what}: {reason}");
    }

    // What a stolen relay can mint: its own organisation with the same name. Its console does not
    // even accept the genuine device (the device is not of its organisation), so it proves nothing
    // (the agent's own check of a foreign certificate is in the attended tests and unit tests).
    let mallory = technician(&org("ACME IT"), "all", &["*"], now);
    match connect(&relay, &id, Some(mallory)).await {
        Err(SessionError::DeviceUnverified(d)) => {
            assert!(d.contains("another organisation"), "{d}")
        }
        other => panic!("{:?}", other.map(|_| "a session")),
    }
    refusal(&mut rx).await;

    // A revoked technician key, with the list arriving through the console itself.
    let alice = technician(&acme, "all", &["servers"], now);
    let list = RevocationList::sign(
        &acme.key,
        &RevocationBody {
            org_key: acme.key.public(),
            serial: 1,
            issued_at: now,
            certs: vec![],
            keys: vec![alice.cert.read_unchecked().unwrap().key],
        },
    )
    .unwrap();
    let revoked = Credentials::new(alice.cert.clone(), alice.key, Some(list)).unwrap();
    match connect(&relay, &id, Some(revoked)).await {
        Err(SessionError::Unverified(d)) => assert!(d.contains("revoked"), "{d}"),
        other => panic!("{:?}", other.map(|_| "a session")),
    }
    refusal(&mut rx).await;

    // The local policy names technicians: a valid certificate of someone else is refused. (On a
    // relay of its own: the fake relay holds one agent at a time.)
    let relay2 = FakeRelay::start(Mode::Forward(Tamper::default())).await;
    let dev2 = enroll(&acme, "servers");
    let id2 = dev2.body.id.clone();
    let mut rx2 = device(
        &relay2,
        agent_cfg(&acme),
        dev2,
        UnattendedPolicy {
            technicians: vec!["bob".into()],
        },
    );
    assert!(matches!(next(&mut rx2).await, DeviceEvent::Online { .. }));
    match connect(
        &relay2,
        &id2,
        Some(technician(&acme, "all", &["servers"], now)),
    )
    .await
    {
        Err(SessionError::Unverified(d)) => {
            assert!(d.contains("does not allow unattended access by"), "{d}")
        }
        other => panic!("{:?}", other.map(|_| "a session")),
    }

    // And the one that is right gets in, through the same relay.
    let good = technician(&acme, "view,control,unattended", &["servers"], now);
    let s = connect(&relay, &id, Some(good)).await.unwrap();
    assert_eq!(s.peer().device.as_ref().unwrap().id, id);
    loop {
        match next(&mut rx).await {
            DeviceEvent::Session(a) => {
                assert!(a.peer().org.is_verified());
                assert_eq!(a.session_key(), s.session_key());
                break;
            }
            DeviceEvent::Online { .. } => continue,
            DeviceEvent::Refused { reason } => panic!("{reason}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_in_the_middle_or_posing_as_the_device_opens_nothing() {
    tandem_tests::init_logs();
    let acme = org("ACME IT");
    let now = unix_now();

    // In the middle of the inner connection, relaying every frame faithfully: the device's proof
    // is bound to the relay's connection with the agent, not to the console's, so the console
    // refuses it; the agent never sees a technician's proof at all.
    let relay = FakeRelay::start(Mode::Mitm).await;
    let dev = enroll(&acme, "servers");
    let id = dev.body.id.clone();
    let mut rx = device(&relay, agent_cfg(&acme), dev, UnattendedPolicy::default());
    assert!(matches!(next(&mut rx).await, DeviceEvent::Online { .. }));
    let alice = technician(&acme, "all", &["servers"], now);
    match connect(&relay, &id, Some(alice)).await {
        Err(SessionError::DeviceUnverified(d)) => assert!(d.contains("could not prove"), "{d}"),
        other => panic!("{:?}", other.map(|_| "a session")),
    }
    let reason = refusal(&mut rx).await;
    assert!(!reason.is_empty());
    // What the relay carried: a device proof and challenges, never a technician's certificate
    // proof it could replay (the console stopped before sending one).
    let frames = relay.seen.lock().unwrap().mitm_frames.len();
    assert!((2..=6).contains(&frames), "{frames} frames");

    // A relay that answers as the device itself (an agent of its own, enrolled by nobody, or by
    // another organisation): the console refuses it before proving anything.
    let relay = FakeRelay::start(Mode::Forward(Tamper::default())).await;
    let evil = org("ACME IT");
    let fake = enroll(&evil, "servers");
    let mut rx = device(&relay, agent_cfg(&evil), fake, UnattendedPolicy::default());
    assert!(matches!(next(&mut rx).await, DeviceEvent::Online { .. }));
    let alice = technician(&acme, "all", &["servers"], now);
    // It is paired for the real device's id, which it is not: it cannot prove it, and the real
    // device's key is not on the relay.
    assert!(connect(&relay, &id, Some(alice)).await.is_err());
    let reason = refusal(&mut rx).await;
    assert!(reason.contains("asked for device"), "{reason}");

    // A console without any certificate cannot even try.
    let e = connect(&relay, &id, None).await.err().unwrap();
    assert!(e.to_string().contains("technician certificate"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_or_foreign_device_list_entry_is_rejected_by_the_console() {
    tandem_tests::init_logs();
    let acme = org("ACME IT");
    let other = org("Other MSP");
    let relay = FakeRelay::start(Mode::Forward(Tamper::default())).await;
    let now = unix_now();
    let listing = |e: &Enrollment, presence_key: &KeyPair| DeviceListing {
        cert: e.cert.to_text(),
        presence: Presence::sign(presence_key, "pc-7", "Debian 12", "bob", now)
            .unwrap()
            .to_text(),
        online: true,
        in_session: false,
        last_seen: now,
    };
    let good = enroll(&acme, "servers");
    let foreign = enroll(&other, "servers");
    let moved = enroll(&acme, "servers");
    let thief = KeyPair::generate().unwrap();
    relay.set_devices(vec![
        listing(&good, &good.key),
        // Another organisation's device.
        listing(&foreign, &foreign.key),
        // A genuine certificate with a presence the relay made up.
        listing(&moved, &thief),
        // Garbage.
        DeviceListing {
            cert: "tandem-device-v1:AAAA".into(),
            presence: "x".into(),
            online: true,
            in_session: false,
            last_seen: now,
        },
    ]);
    let cfg = SessionConfig {
        credentials: Some(Arc::new(technician(&acme, "all", &["*"], now))),
        ..SessionConfig::default()
    };
    let list = tokio::time::timeout(
        T,
        tandem_session::list_devices(&relay.opts(), &Secret::new("tnd_1_x"), &cfg, ""),
    )
    .await
    .unwrap()
    .unwrap();
    let ids: Vec<_> = list
        .devices
        .iter()
        .map(|d| d.checked.device.id.clone())
        .collect();
    assert_eq!(ids, vec![good.body.id.clone()]);
    assert_eq!(list.rejected.len(), 3, "{:?}", list.rejected);
    assert!(
        list.rejected
            .iter()
            .any(|r| r.contains("another organisation")),
        "{:?}",
        list.rejected
    );
    assert!(
        list.rejected.iter().any(|r| r.contains("presence")),
        "{:?}",
        list.rejected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_agent_takes_no_code() {
    tandem_tests::init_logs();
    let acme = org("ACME IT");
    let relay = FakeRelay::start(Mode::Forward(Tamper::default())).await;
    let mut rx = device(
        &relay,
        agent_cfg(&acme),
        enroll(&acme, "servers"),
        UnattendedPolicy::default(),
    );
    assert!(matches!(next(&mut rx).await, DeviceEvent::Online { .. }));
    // The relay pairs an attended console (a code, the PAKE) with the enrolled agent: the agent
    // answers the device handshake only, and nobody gets a session.
    let code = tandem_session::SessionCode::generate(tandem_proto::Slot::new("999999999").unwrap())
        .unwrap();
    let cfg = SessionConfig {
        credentials: Some(Arc::new(technician(&acme, "all", &["*"], unix_now()))),
        setup_timeout: Duration::from_secs(10),
        ..SessionConfig::default()
    };
    let r = tokio::time::timeout(
        T,
        tandem_session::join(&relay.opts(), &Secret::new("tnd_1_x"), &code, &cfg),
    )
    .await
    .unwrap();
    assert!(r.is_err());
    let reason = refusal(&mut rx).await;
    assert!(!reason.is_empty());
}
