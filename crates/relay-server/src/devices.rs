//! Enrolled devices as the relay knows them: who came online with which signed enrollment and
//! presence, and which technicians may see and reach them.
//!
//! The relay has no authority here. It pins no organisation key: it checks that a device's
//! certificate is signed by the organisation key the certificate names and that the presence is
//! signed by the device key (garbage is refused), and lists a device only to a console that proved,
//! on its own connection, a technician certificate of that same organisation key. Consoles check
//! every entry again against their organisation, and the agent checks the technician's certificate
//! inside the end-to-end session. A relay that lies can hide devices or show stale ones; it cannot
//! add one that a console accepts, nor open one.
//!
//! Pure: no sockets, no clock (the caller passes the time), no database (the caller writes
//! [`DeviceRow`]s through).

use crate::store::DeviceRow;
use std::collections::HashMap;
use tandem_org::{CertBody, DeviceBody, DeviceCert, Presence, PresenceBody, PublicKey};
use tandem_proto::{DeviceListing, ErrorCode, MAX_CONTROL_FRAME};

/// What the relay keeps of a device (online or not).
#[derive(Clone, Debug)]
struct Known {
    org_key: PublicKey,
    name: String,
    group: String,
    /// Lower-case text searched by queries (name, host, group, user, id).
    haystack: String,
    cert: String,
    presence: String,
    last_seen: u64,
}

/// A checked announcement.
#[derive(Debug)]
pub struct Announced {
    pub device: DeviceBody,
    pub presence: PresenceBody,
}

/// Every device the relay has seen.
#[derive(Default)]
pub struct DeviceBook {
    known: HashMap<String, Known>,
}

/// Room left in a [`tandem_proto::RelayMsg::Devices`] frame for its entries.
const PAGE_BYTES: usize = MAX_CONTROL_FRAME - 1024;

/// Checks an agent's announcement (`device` certificate, `presence`) at `now` (Unix seconds).
pub fn check_announce(device: &str, presence: &str, now: u64) -> Result<Announced, String> {
    let cert = DeviceCert::from_text(device).map_err(|e| e.to_string())?;
    let device = cert.check_self().map_err(|e| e.to_string())?;
    let presence = Presence::from_text(presence)
        .map_err(|e| e.to_string())?
        .check_fresh(&device, now)
        .map_err(|e| e.to_string())?;
    Ok(Announced { device, presence })
}

/// Whether a console that proved `cert` may connect to `device`: same organisation key, the
/// `unattended` permission, and the device's group in the certificate. (The agent checks it all
/// again; this keeps strangers from even reaching a device.)
pub fn may_connect(cert: &CertBody, org_key: &PublicKey, group: &str) -> Result<(), ErrorCode> {
    if cert.org_key != *org_key {
        return Err(ErrorCode::DeviceOffline);
    }
    if !cert.permissions.unattended
        || !cert
            .groups
            .iter()
            .any(|g| g == group || g == tandem_org::ANY_GROUP)
    {
        return Err(ErrorCode::BadCertificate);
    }
    Ok(())
}

impl DeviceBook {
    /// The book as the store kept it (every device offline).
    pub fn load(rows: Vec<DeviceRow>) -> DeviceBook {
        let mut b = DeviceBook::default();
        for r in rows {
            // Rows are the relay's own writes; one that no longer checks is skipped.
            let Ok(cert) = DeviceCert::from_text(&r.cert) else {
                continue;
            };
            let Ok(device) = cert.check_self() else {
                continue;
            };
            let Ok(presence) = Presence::from_text(&r.presence).and_then(|p| {
                p.check(&device)
                    .map_err(|_| tandem_org::OrgError::Malformed("presence"))
            }) else {
                continue;
            };
            b.insert(
                &Announced { device, presence },
                r.cert,
                r.presence,
                r.last_seen.max(0) as u64,
            );
        }
        b
    }

    /// Records an announcement; the row to write to the store.
    pub fn online(
        &mut self,
        a: &Announced,
        cert: String,
        presence: String,
        address: String,
        now: u64,
    ) -> DeviceRow {
        self.insert(a, cert.clone(), presence.clone(), now);
        DeviceRow {
            id: a.device.id.clone(),
            org_key: a.device.org_key.fingerprint(),
            organisation: a.device.organisation.clone(),
            name: a.device.name.clone(),
            group: a.device.group.clone(),
            hostname: a.presence.hostname.clone(),
            os: a.presence.os.clone(),
            user: a.presence.user.clone(),
            cert,
            presence,
            address,
            first_seen: now as i64,
            last_seen: now as i64,
            online: true,
        }
    }

    fn insert(&mut self, a: &Announced, cert: String, presence: String, last_seen: u64) {
        let haystack = format!(
            "{} {} {} {} {}",
            a.device.name, a.presence.hostname, a.device.group, a.presence.user, a.device.id
        )
        .to_lowercase();
        self.known.insert(
            a.device.id.clone(),
            Known {
                org_key: a.device.org_key,
                name: a.device.name.clone(),
                group: a.device.group.clone(),
                haystack,
                cert,
                presence,
                last_seen,
            },
        );
    }

    /// Records that `device` was last seen online at `now`.
    pub fn seen(&mut self, device: &str, now: u64) {
        if let Some(k) = self.known.get_mut(device) {
            k.last_seen = now;
        }
    }

    /// The organisation key and group of a known device.
    pub fn group_of(&self, device: &str) -> Option<(PublicKey, String)> {
        self.known.get(device).map(|k| (k.org_key, k.group.clone()))
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// A page of the devices of `org_key` matching `query` (case-insensitive, in name, host,
    /// group, user or id), by name, from `offset`, at most [`tandem_proto::DEVICES_PER_PAGE`]
    /// entries and what fits one control frame. `state(id)` says whether a device is online and in
    /// a session (`None`: offline). Returns the entries and how many match in all.
    pub fn page(
        &self,
        org_key: &PublicKey,
        query: &str,
        offset: u32,
        now: u64,
        state: impl Fn(&str) -> Option<bool>,
    ) -> (Vec<DeviceListing>, u32) {
        let query = query.trim().to_lowercase();
        let mut matching: Vec<(&String, &Known)> = self
            .known
            .iter()
            .filter(|(_, k)| k.org_key == *org_key && k.haystack.contains(&query))
            .collect();
        matching.sort_by(|a, b| (&a.1.name, a.0).cmp(&(&b.1.name, b.0)));
        let total = matching.len() as u32;
        let mut out = Vec::new();
        let mut bytes = 0;
        for (id, k) in matching.into_iter().skip(offset as usize) {
            let size = k.cert.len() + k.presence.len() + 32;
            if out.len() >= tandem_proto::DEVICES_PER_PAGE || bytes + size > PAGE_BYTES {
                break;
            }
            bytes += size;
            let st = state(id);
            out.push(DeviceListing {
                cert: k.cert.clone(),
                presence: k.presence.clone(),
                online: st.is_some(),
                in_session: st == Some(true),
                last_seen: if st.is_some() { now } else { k.last_seen },
            });
        }
        (out, total)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tandem_org::{DeviceRequest, KeyPair, OrgPublic};

    const NOW: u64 = 1_800_000_000;

    fn enroll(org: &KeyPair, org_name: &str, name: &str, group: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let req = DeviceRequest::new(name, &key).unwrap();
        let cert = DeviceCert::issue(org, org_name, &req, None, group, NOW).unwrap();
        let p = Presence::sign(&key, name, "Debian 12", "bob", NOW).unwrap();
        (cert.to_text(), p.to_text())
    }

    #[test]
    fn lists_only_the_organisation_pages_and_searches() {
        let acme = KeyPair::generate().unwrap();
        let evil = KeyPair::generate().unwrap();
        let mut book = DeviceBook::default();
        for i in 0..30 {
            let (c, p) = enroll(&acme, "ACME IT", &format!("pc-{i:02}"), "office");
            let a = check_announce(&c, &p, NOW).unwrap();
            book.online(&a, c, p, "a".into(), NOW);
        }
        let (c, p) = enroll(&evil, "Evil", "evil-pc", "office");
        let a = check_announce(&c, &p, NOW).unwrap();
        book.online(&a, c, p, "a".into(), NOW);
        let org = OrgPublic::new("ACME IT", acme.public()).unwrap();
        let (page, total) = book.page(&org.key, "", 0, NOW, |_| None);
        assert_eq!(total, 30);
        assert_eq!(page.len(), tandem_proto::DEVICES_PER_PAGE);
        let frame = tandem_proto::encode_frame(
            &tandem_proto::RelayMsg::Devices {
                entries: page.clone(),
                offset: 0,
                total,
            },
            MAX_CONTROL_FRAME,
        );
        assert!(frame.is_ok());
        for e in &page {
            let d = tandem_org::DeviceEntry {
                cert: &e.cert,
                presence: &e.presence,
            }
            .check(&org, None)
            .unwrap();
            assert!(d.device.name.starts_with("pc-"));
        }
        let (page, _) = book.page(&org.key, "PC-2", 0, NOW, |_| Some(false));
        assert_eq!(page.len(), 10);
        assert!(page.iter().all(|e| e.online && !e.in_session));
        let (page, total) = book.page(&org.key, "evil", 0, NOW, |_| None);
        assert_eq!((page.len(), total), (0, 0));
        let (page, _) = book.page(&org.key, "", 24, NOW, |_| None);
        assert_eq!(page.len(), 6);
    }

    #[test]
    fn garbage_stale_and_moved_announcements_are_refused() {
        let acme = KeyPair::generate().unwrap();
        let (c, p) = enroll(&acme, "ACME IT", "pc", "office");
        assert!(check_announce(&c, &p, NOW + tandem_org::PRESENCE_MAX_AGE + 1).is_err());
        assert!(check_announce("tandem-device-v1:AAAA", &p, NOW).is_err());
        let (c2, p2) = enroll(&acme, "ACME IT", "pc2", "office");
        assert!(check_announce(&c, &p2, NOW).is_err());
        assert!(check_announce(&c2, &p2, NOW).is_ok());
    }
}
