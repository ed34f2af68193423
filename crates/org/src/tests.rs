#![allow(clippy::unwrap_used)]

use super::*;

const NOW: u64 = 1_800_000_000;

struct Org {
    key: KeyPair,
    public: OrgPublic,
}

fn org(name: &str) -> Org {
    let key = KeyPair::generate().unwrap();
    let public = OrgPublic::new(name, key.public()).unwrap();
    Org { key, public }
}

fn tech(org: &Org, perms: &str, validity: u64) -> (KeyPair, Certificate) {
    let key = KeyPair::generate().unwrap();
    let req = CertRequest::from_text(&CertRequest::new("alice", &key).unwrap().to_text()).unwrap();
    let cert = Certificate::issue(
        &org.key,
        &org.public.name,
        &req,
        &Issue {
            permissions: Permissions::parse(perms).unwrap(),
            groups: vec!["servers".into()],
            validity,
        },
        NOW,
    )
    .unwrap();
    (key, Certificate::from_text(&cert.to_text()).unwrap())
}

fn proof_for(key: &KeyPair, cert: &Certificate) -> ([u8; 32], [u8; 32], Vec<u8>) {
    let exporter = [7u8; 32];
    let ch = challenge().unwrap();
    let p = prove(key, cert, &exporter, &ch);
    (exporter, ch, p)
}

#[test]
fn a_certificate_and_its_proof_verify() {
    let o = org("ACME IT");
    let (key, cert) = tech(&o, "view,control", DEFAULT_VALIDITY);
    let store = TrustStore::new(OrgPublic::from_text(&o.public.to_text()).unwrap(), None);
    let (exp, ch, proof) = proof_for(&key, &cert);
    let v = store.verify(&cert, &proof, &exp, &ch, NOW + 60).unwrap();
    assert_eq!(v.technician, "alice");
    assert_eq!(v.organisation, "ACME IT");
    assert!(v.permissions.control && v.permissions.view && !v.permissions.unattended);
    assert_eq!(v.groups, ["servers"]);
    assert_eq!(v.not_after, NOW + DEFAULT_VALIDITY);
}

#[test]
fn a_proof_is_bound_to_its_connection_challenge_and_certificate() {
    let o = org("ACME IT");
    let (key, cert) = tech(&o, "view", 3600);
    let (_, other) = tech(&o, "view", 3600);
    let store = TrustStore::new(o.public.clone(), None);
    let (exp, ch, proof) = proof_for(&key, &cert);
    // Another connection (exporter), another challenge: a captured proof is worthless.
    assert_eq!(
        store.verify(&cert, &proof, &[8u8; 32], &ch, NOW),
        Err(Unverified::BadProof)
    );
    assert_eq!(
        store.verify(&cert, &proof, &exp, &challenge().unwrap(), NOW),
        Err(Unverified::BadProof)
    );
    // Someone else's certificate with this key's proof, and a proof by a key without the
    // certificate.
    assert_eq!(
        store.verify(&other, &proof, &exp, &ch, NOW),
        Err(Unverified::BadProof)
    );
    let stranger = KeyPair::generate().unwrap();
    let p = prove(&stranger, &cert, &exp, &ch);
    assert_eq!(
        store.verify(&cert, &p, &exp, &ch, NOW),
        Err(Unverified::BadProof)
    );
    assert_eq!(
        store.verify(&cert, &proof[..63], &exp, &ch, NOW),
        Err(Unverified::BadProof)
    );
}

#[test]
fn expired_early_wrong_organisation_forged_and_too_long_are_refused() {
    let o = org("ACME IT");
    let (key, cert) = tech(&o, "view", 3600);
    let store = TrustStore::new(o.public.clone(), None);
    let (exp, ch, proof) = proof_for(&key, &cert);
    // Within the clock skew: still good; beyond it: expired, in minutes.
    assert!(
        store
            .verify(&cert, &proof, &exp, &ch, NOW + 3600 + CLOCK_SKEW)
            .is_ok()
    );
    assert_eq!(
        store.verify(&cert, &proof, &exp, &ch, NOW + 3600 + 3600),
        Err(Unverified::Expired(60))
    );
    assert_eq!(
        store.verify(&cert, &proof, &exp, &ch, NOW - 3600),
        Err(Unverified::NotYetValid)
    );
    // Another organisation's certificate, even under the same name.
    let evil = org("ACME IT");
    let (ekey, ecert) = tech(&evil, "all", 3600);
    let (exp, ch, eproof) = proof_for(&ekey, &ecert);
    assert_eq!(
        store.verify(&ecert, &eproof, &exp, &ch, NOW),
        Err(Unverified::WrongOrganisation("ACME IT".into()))
    );
    // A body altered after signing (the attacker sets our org key and more rights).
    let mut body = ecert.read_unchecked().unwrap();
    body.org_key = o.public.key;
    let forged = Certificate {
        body: encode(&body),
        sig: ecert.sig.clone(),
    };
    let p = prove(&ekey, &forged, &exp, &ch);
    assert_eq!(
        store.verify(&forged, &p, &exp, &ch, NOW),
        Err(Unverified::Forged)
    );
    // Validity beyond 7 days is refused at issue and at check.
    let req = CertRequest::new("bob", &key).unwrap();
    let long = Issue {
        permissions: Permissions::parse("view").unwrap(),
        groups: vec![],
        validity: MAX_VALIDITY + 1,
    };
    assert_eq!(
        Certificate::issue(&o.key, "ACME IT", &req, &long, NOW).err(),
        Some(OrgError::TooLong)
    );
    let mut body = cert.read_unchecked().unwrap();
    body.not_after = body.not_before + 30 * 24 * 3600;
    let bytes = encode(&body);
    let long = Certificate {
        sig: o.key.sign(DOMAIN_CERT, &bytes),
        body: bytes,
    };
    let p = prove(&key, &long, &exp, &ch);
    assert_eq!(
        store.verify(&long, &p, &exp, &ch, NOW),
        Err(Unverified::TooLong)
    );
}

#[test]
fn revocation_by_id_or_key_newest_wins_and_no_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state/revocation");
    let o = org("ACME IT");
    let (key, cert) = tech(&o, "view", 3600);
    let (key2, cert2) = tech(&o, "view", 3600);
    let mut store = TrustStore::new(o.public.clone(), Some(file.clone()));
    let (exp, ch, proof) = proof_for(&key, &cert);
    let (exp2, ch2, proof2) = proof_for(&key2, &cert2);
    assert!(store.verify(&cert, &proof, &exp, &ch, NOW).is_ok());

    let list = |serial, certs: Vec<[u8; 16]>, keys: Vec<PublicKey>| {
        RevocationList::sign(
            &o.key,
            &RevocationBody {
                org_key: o.public.key,
                serial,
                issued_at: NOW,
                certs,
                keys,
            },
        )
        .unwrap()
    };
    let id = cert.read_unchecked().unwrap().id;
    let l1 = list(1, vec![id], vec![]);
    assert_eq!(
        store
            .offer(&RevocationList::from_text(&l1.to_text()).unwrap())
            .unwrap(),
        Offered::Newer(1)
    );
    assert_eq!(
        store.verify(&cert, &proof, &exp, &ch, NOW),
        Err(Unverified::Revoked)
    );
    assert!(store.verify(&cert2, &proof2, &exp2, &ch2, NOW).is_ok());
    // Revoking the key revokes its every certificate.
    let l2 = list(2, vec![id], vec![key2.public()]);
    assert_eq!(store.offer(&l2).unwrap(), Offered::Newer(2));
    assert_eq!(
        store.verify(&cert2, &proof2, &exp2, &ch2, NOW),
        Err(Unverified::Revoked)
    );
    // An older list (serial 1, or an empty serial-0 list) does not undo it.
    let empty = list(0, vec![], vec![]);
    assert_eq!(
        store.offer(&l1).unwrap(),
        Offered::Older {
            offered: 1,
            kept: 2
        }
    );
    assert_eq!(
        store.offer(&empty).unwrap(),
        Offered::Older {
            offered: 0,
            kept: 2
        }
    );
    assert_eq!(store.offer(&l2).unwrap(), Offered::Same);
    assert_eq!(
        store.verify(&cert2, &proof2, &exp2, &ch2, NOW),
        Err(Unverified::Revoked)
    );
    // A list not signed by the organisation is refused (a relay cannot make one).
    let evil = org("ACME IT");
    let forged = RevocationList::sign(
        &evil.key,
        &RevocationBody {
            org_key: o.public.key,
            serial: 99,
            issued_at: NOW,
            certs: vec![],
            keys: vec![],
        },
    )
    .unwrap();
    assert_eq!(
        store.offer(&forged),
        Err(OrgError::BadSignature("revocation list"))
    );
    // Nothing is written until the holder saves (outside its lock); two saves that race in the
    // wrong order leave the newest list on disk.
    assert!(!file.exists());
    let newest = store.take_unsaved().unwrap();
    assert!(store.take_unsaved().is_none());
    let mut older = TrustStore::new(o.public.clone(), Some(file.clone()));
    older.offer(&l1).unwrap();
    let stale = older.take_unsaved().unwrap();
    newest.write();
    stale.write();
    // After a restart the kept list still holds (file, owner only).
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let store = TrustStore::new(o.public.clone(), Some(file));
    assert_eq!(store.revocation_serial(), 2);
    assert_eq!(
        store.verify(&cert, &proof, &exp, &ch, NOW),
        Err(Unverified::Revoked)
    );
}

#[test]
fn a_sealed_key_opens_only_with_its_passphrase() {
    let k = KeyPair::generate().unwrap();
    let sealed = k.seal_with("correct horse", 1024, 1).unwrap();
    assert!(sealed.starts_with("tandem-sealedkey-v1:"));
    let back = KeyPair::unseal(&sealed, "correct horse").unwrap();
    assert_eq!(back.public(), k.public());
    assert_eq!(
        KeyPair::unseal(&sealed, "wrong").err(),
        Some(OrgError::WrongPassphrase)
    );
    // The default cost works too.
    let sealed = k.seal("pw").unwrap();
    assert_eq!(KeyPair::unseal(&sealed, "pw").unwrap().public(), k.public());
    // The clear form round-trips; the secret never shows in Debug.
    let text = k.to_text();
    assert_eq!(KeyPair::from_text(&text).unwrap().public(), k.public());
    assert!(!format!("{k:?}").contains(&text[20..40]));
}

#[test]
fn damaged_text_is_refused_in_words() {
    let o = org("ACME IT");
    let (_, cert) = tech(&o, "view", 3600);
    let text = cert.to_text();
    assert_eq!(
        Certificate::from_text(&text[..text.len() - 10]).err(),
        Some(OrgError::Malformed("certificate"))
    );
    assert_eq!(
        Certificate::from_text(&o.public.to_text()).err(),
        Some(OrgError::NotA("cert"))
    );
    assert_eq!(
        OrgPublic::from_text("hello").err(),
        Some(OrgError::NotA("org"))
    );
    assert_eq!(
        Certificate::from_text(&format!("tandem-cert-v1:{}", "A".repeat(MAX_TEXT))).err(),
        Some(OrgError::Malformed("certificate"))
    );
    // A request whose signature does not match its key.
    let a = KeyPair::generate().unwrap();
    let b = KeyPair::generate().unwrap();
    let mut r = CertRequest::new("alice", &a).unwrap();
    r.key = b.public();
    assert_eq!(
        CertRequest::from_text(&r.to_text()).err(),
        Some(OrgError::BadSignature("certificate request"))
    );
    assert!(OrgPublic::new("bad\nname", a.public()).is_err());
    assert!(OrgPublic::new(&"x".repeat(MAX_NAME + 1), a.public()).is_err());
}

#[test]
fn permissions_parse_and_imply_view() {
    let p = Permissions::parse("control").unwrap();
    assert!(p.view && p.control && !p.files);
    assert_eq!(p.to_string(), "view, control");
    assert!(Permissions::parse("root").is_err());
    assert_eq!(Permissions::parse("").unwrap().to_string(), "nothing");
    let o = org("ACME IT");
    let (key, cert) = tech(&o, "", 3600);
    let store = TrustStore::new(o.public.clone(), None);
    let (exp, ch, proof) = proof_for(&key, &cert);
    assert_eq!(
        store.verify(&cert, &proof, &exp, &ch, NOW),
        Err(Unverified::NoView)
    );
}

#[test]
fn fingerprints_are_stable_and_distinct() {
    let a = KeyPair::generate().unwrap().public();
    let b = KeyPair::generate().unwrap().public();
    assert_eq!(a.fingerprint(), a.fingerprint());
    assert_ne!(a.fingerprint(), b.fingerprint());
    assert!(a.fingerprint().starts_with("SHA256:"));
    assert_eq!(a.fingerprint().len(), "SHA256:".len() + 8 * 4 + 7);
}

#[test]
fn a_newer_list_counts_even_when_it_cannot_be_saved() {
    let o = org("ACME IT");
    let (key, cert) = tech(&o, "view", 3600);
    let (exp, ch, proof) = proof_for(&key, &cert);
    // A file that cannot be written (its directory is a file).
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, "x").unwrap();
    let mut store = TrustStore::new(o.public.clone(), Some(blocker.join("revocation")));
    let list = RevocationList::sign(
        &o.key,
        &RevocationBody {
            org_key: o.public.key,
            serial: 3,
            issued_at: NOW,
            certs: vec![cert.read_unchecked().unwrap().id],
            keys: vec![],
        },
    )
    .unwrap();
    assert_eq!(store.offer(&list).unwrap(), Offered::Newer(3));
    assert_eq!(
        store.verify(&cert, &proof, &exp, &ch, NOW),
        Err(Unverified::Revoked)
    );
}

fn enroll(org: &Org, group: &str) -> (KeyPair, DeviceCert) {
    let key = KeyPair::generate().unwrap();
    let req =
        DeviceRequest::from_text(&DeviceRequest::new("pc-42", &key).unwrap().to_text()).unwrap();
    let cert = DeviceCert::issue(&org.key, &org.public.name, &req, None, group, NOW).unwrap();
    (key, DeviceCert::from_text(&cert.to_text()).unwrap())
}

#[test]
fn a_device_is_enrolled_listed_and_proven() {
    let o = org("ACME IT");
    let (key, cert) = enroll(&o, "servers");
    let id = device_id(&key.public());
    assert!(is_device_id(&id));
    let e = Enrollment::new(
        KeyPair::from_text(&key.to_text()).unwrap(),
        cert.clone(),
        &o.public,
    )
    .unwrap();
    assert_eq!(
        (e.body.id.as_str(), e.body.group.as_str()),
        (id.as_str(), "servers")
    );
    // The presence checks with the certificate; the relay's freshness rule holds.
    let p = Presence::sign(&key, "pc-42\n", "Debian 12", "bob", NOW).unwrap();
    let entry = DeviceEntry {
        cert: &cert.to_text(),
        presence: &p.to_text(),
    };
    let checked = entry.check(&o.public, None).unwrap();
    assert_eq!(checked.presence.hostname, "pc-42?");
    assert!(p.check_fresh(&checked.device, NOW + 60).is_ok());
    assert!(matches!(
        p.check_fresh(&checked.device, NOW + PRESENCE_MAX_AGE + 1),
        Err(DeviceUnverified::Stale(_))
    ));
    // The in-session proof: bound to the exporter, the challenge and the device asked for.
    let (exp, ch) = ([3u8; 32], challenge().unwrap());
    let proof = prove_device(&key, &cert, &exp, &ch);
    let t = cert.to_text();
    assert!(check_device(&o.public, None, &id, &t, &proof, &exp, &ch).is_ok());
    assert_eq!(
        check_device(&o.public, None, &id, &t, &proof, &[4u8; 32], &ch),
        Err(DeviceUnverified::BadProof)
    );
    assert_eq!(
        check_device(
            &o.public,
            None,
            &id,
            &t,
            &proof,
            &exp,
            &challenge().unwrap()
        ),
        Err(DeviceUnverified::BadProof)
    );
    assert!(matches!(
        check_device(
            &o.public,
            None,
            "00000000000000000000",
            &t,
            &proof,
            &exp,
            &ch
        ),
        Err(DeviceUnverified::WrongDevice { .. })
    ));
    let revoked = RevocationBody {
        org_key: o.key.public(),
        serial: 1,
        issued_at: NOW,
        certs: vec![],
        keys: vec![key.public()],
    };
    assert_eq!(
        check_device(&o.public, Some(&revoked), &id, &t, &proof, &exp, &ch),
        Err(DeviceUnverified::Revoked)
    );
    assert_eq!(
        entry.check(&o.public, Some(&revoked)),
        Err(DeviceUnverified::Revoked)
    );
}

#[test]
fn forged_and_foreign_devices_are_refused() {
    let o = org("ACME IT");
    let other = org("Evil Corp");
    let (key, cert) = enroll(&o, "servers");
    let (_, foreign) = enroll(&other, "servers");
    assert!(matches!(
        foreign.check(&o.public),
        Err(DeviceUnverified::WrongOrganisation(_))
    ));
    // A presence signed by another key, or one moved onto another device's certificate.
    let thief = KeyPair::generate().unwrap();
    let p = Presence::sign(&thief, "pc-42", "Debian", "", NOW).unwrap();
    let entry = DeviceEntry {
        cert: &cert.to_text(),
        presence: &p.to_text(),
    };
    assert_eq!(
        entry.check(&o.public, None),
        Err(DeviceUnverified::ForgedPresence)
    );
    // A certificate whose body was altered (another group) fails the organisation's signature.
    let mut body: DeviceBody = decode("x", &cert.body).unwrap();
    body.group = "everything".into();
    let altered = DeviceCert {
        body: encode(&body),
        sig: cert.sig.clone(),
    };
    assert_eq!(altered.check(&o.public), Err(DeviceUnverified::Forged));
    // An enrollment whose certificate is for another key.
    assert_eq!(
        Enrollment::new(thief, cert.clone(), &o.public).unwrap_err(),
        OrgError::KeyMismatch
    );
    let _ = key;
    // A request with an altered name fails its own signature.
    let mut req = DeviceRequest::new("pc-1", &KeyPair::generate().unwrap()).unwrap();
    req.name = "pc-2".into();
    assert!(DeviceRequest::from_text(&req.to_text()).is_err());
}

#[test]
fn unattended_needs_the_permission_and_the_group() {
    let o = org("ACME IT");
    let store = TrustStore::new(o.public.clone(), None);
    let (key, cert) = tech(&o, "view,control,unattended", 3600);
    let (exp, ch, proof) = proof_for(&key, &cert);
    let v = store.verify(&cert, &proof, &exp, &ch, NOW).unwrap();
    assert!(allows_unattended(&v, "servers").is_ok());
    assert_eq!(
        allows_unattended(&v, "laptops"),
        Err(Unverified::WrongGroup("laptops".into()))
    );
    let (key, cert) = tech(&o, "view,control", 3600);
    let (exp, ch, proof) = proof_for(&key, &cert);
    let v = store.verify(&cert, &proof, &exp, &ch, NOW).unwrap();
    assert_eq!(
        allows_unattended(&v, "servers"),
        Err(Unverified::NoUnattended)
    );
    let mut any = v.clone();
    any.permissions.unattended = true;
    any.groups = vec![ANY_GROUP.into()];
    assert!(allows_unattended(&any, "laptops").is_ok());
}

#[test]
fn membership_proofs_bind_the_connection() {
    let o = org("ACME IT");
    let (key, cert) = tech(&o, "view,unattended", 3600);
    let exp = [9u8; 32];
    let p = prove_membership(&key, &cert, &exp);
    let b = check_membership(&cert.to_text(), &p, &exp, NOW).unwrap();
    assert_eq!(b.org_key, o.key.public());
    assert_eq!(
        check_membership(&cert.to_text(), &p, &[8u8; 32], NOW),
        Err(Unverified::BadProof)
    );
    // A session proof is no membership proof.
    let sp = prove(&key, &cert, &exp, &[0u8; 32]);
    assert!(check_membership(&cert.to_text(), &sp, &exp, NOW).is_err());
    assert!(matches!(
        check_membership(&cert.to_text(), &p, &exp, NOW + 4000 + CLOCK_SKEW),
        Err(Unverified::Expired(_))
    ));
}
