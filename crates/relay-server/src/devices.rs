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
use std::collections::{BTreeSet, HashMap};
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

/// How the device book is bounded (from the relay's `[limits]`).
#[derive(Clone, Debug)]
pub struct DeviceLimits {
    /// Devices kept at most (online or not); beyond it new devices are refused until old ones are
    /// forgotten (existing devices are never pushed out by newcomers).
    pub max_known: usize,
    /// Devices never seen before that one source address may bring, per hour.
    pub new_per_hour_per_address: u32,
    /// Devices not seen online for this long are forgotten.
    pub retention: std::time::Duration,
    /// Organisation keys whose devices this relay hosts (empty: any).
    pub organisations: Vec<PublicKey>,
}

impl Default for DeviceLimits {
    fn default() -> Self {
        DeviceLimits {
            max_known: 100_000,
            new_per_hour_per_address: 600,
            retention: std::time::Duration::from_secs(90 * 24 * 3600),
            organisations: Vec::new(),
        }
    }
}

/// Why a device is not taken.
#[derive(Debug, PartialEq, Eq)]
pub enum NotTaken {
    /// Its organisation is not hosted here.
    Organisation,
    /// The relay keeps as many devices as it may.
    Full,
    /// Too many new devices from this address lately.
    Budget,
}

/// Every device the relay has seen, indexed by organisation (sorted by name for pages).
#[derive(Default)]
pub struct DeviceBook {
    known: HashMap<String, Known>,
    by_org: HashMap<PublicKey, BTreeSet<(String, String)>>,
    limits: DeviceLimits,
    /// New devices per source address: (tokens, last refill).
    new_by_addr: HashMap<std::net::IpAddr, (f64, std::time::Instant)>,
}

/// Room left in a [`tandem_proto::RelayMsg::Devices`] frame for its entries.
const PAGE_BYTES: usize = MAX_CONTROL_FRAME - 1024;

/// Checks an agent's announcement (`cert`, `presence`, and the device key's `proof` over this
/// connection's `exporter`) at `now` (Unix seconds).
pub fn check_announce(
    cert: &str,
    presence: &str,
    proof: &[u8],
    exporter: &[u8; 32],
    now: u64,
) -> Result<Announced, String> {
    let device = DeviceCert::from_text(cert)
        .map_err(|e| e.to_string())?
        .check_self()
        .map_err(|e| e.to_string())?;
    if !tandem_org::check_announce_proof(&device, cert, presence, proof, exporter) {
        return Err("the connection does not hold the device's key".into());
    }
    let presence = Presence::from_text(presence)
        .map_err(|e| e.to_string())?
        .check_fresh(&device, now)
        .map_err(|e| e.to_string())?;
    Ok(Announced { device, presence })
}

/// Whether the revocation list `list` (text), if its signature is by the device's organisation,
/// names the device's key.
pub fn revoked(a: &Announced, list: &str) -> bool {
    let Ok(org) = tandem_org::OrgPublic::new(&a.device.organisation, a.device.org_key) else {
        return false;
    };
    tandem_org::RevocationList::from_text(list)
        .and_then(|l| l.check(&org))
        .is_ok_and(|b| b.keys.contains(&a.device.key))
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
    pub fn load(rows: Vec<DeviceRow>, limits: DeviceLimits) -> DeviceBook {
        let mut b = DeviceBook {
            limits,
            ..DeviceBook::default()
        };
        for r in rows {
            // Rows are the relay's own writes; one that no longer checks, or of an organisation
            // no longer hosted, is skipped (and forgotten by the next sweep of the store).
            let Ok(cert) = DeviceCert::from_text(&r.cert) else {
                continue;
            };
            let Ok(device) = cert.check_self() else {
                continue;
            };
            if !b.hosts(&device.org_key) {
                continue;
            }
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

    /// Whether this relay hosts devices of `org_key`.
    fn hosts(&self, org_key: &PublicKey) -> bool {
        self.limits.organisations.is_empty() || self.limits.organisations.contains(org_key)
    }

    /// The cheap refusals, before any signature is checked: an organisation not hosted here, or a
    /// device never seen before when the book is full. `cert` is the certificate's text, unchecked.
    pub fn precheck(&self, cert: &str) -> Result<(), NotTaken> {
        let Ok(claimed) = DeviceCert::from_text(cert).and_then(|c| c.read_unchecked()) else {
            // Garbage: the full check says why.
            return Ok(());
        };
        if !self.hosts(&claimed.org_key) {
            return Err(NotTaken::Organisation);
        }
        if !self.known.contains_key(&claimed.id) && self.known.len() >= self.limits.max_known {
            return Err(NotTaken::Full);
        }
        Ok(())
    }

    /// Whether a checked device may come online here: [`DeviceBook::precheck`] again, and a
    /// device never seen before takes from its address's budget (after its signatures checked, so
    /// that garbage costs an address nothing).
    pub fn admit(
        &mut self,
        a: &Announced,
        from: std::net::IpAddr,
        now: std::time::Instant,
    ) -> Result<(), NotTaken> {
        if !self.hosts(&a.device.org_key) {
            return Err(NotTaken::Organisation);
        }
        if self.known.contains_key(&a.device.id) {
            return Ok(());
        }
        if self.known.len() >= self.limits.max_known {
            return Err(NotTaken::Full);
        }
        let per_hour = f64::from(self.limits.new_per_hour_per_address);
        if self.new_by_addr.len() > 100_000 {
            // Only full buckets would be forgotten by a sweep; under such a spread of addresses
            // starting afresh is as good.
            self.new_by_addr.clear();
        }
        let (tokens, last) = self.new_by_addr.entry(from).or_insert((per_hour, now));
        *tokens = (*tokens
            + now.saturating_duration_since(*last).as_secs_f64() * per_hour / 3600.0)
            .min(per_hour);
        *last = now;
        if *tokens < 1.0 {
            return Err(NotTaken::Budget);
        }
        *tokens -= 1.0;
        Ok(())
    }

    /// Devices not seen online since `now - retention` (Unix seconds), and devices of
    /// organisations no longer hosted: candidates for [`DeviceBook::forget`] (the caller leaves out
    /// those online now).
    pub fn stale(&self, now: u64) -> Vec<String> {
        let cutoff = now.saturating_sub(self.limits.retention.as_secs());
        self.known
            .iter()
            .filter(|(_, k)| k.last_seen < cutoff || !self.hosts(&k.org_key))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Forgets `ids`; those forgotten.
    pub fn forget(&mut self, ids: Vec<String>) -> Vec<String> {
        ids.into_iter().filter(|id| self.remove(id)).collect()
    }

    /// Forgets devices not seen online since `now - retention` (Unix seconds), and those of
    /// organisations no longer hosted, unless `online(id)`; their ids.
    pub fn forget_stale(&mut self, now: u64, online: impl Fn(&str) -> bool) -> Vec<String> {
        let stale: Vec<String> = self
            .stale(now)
            .into_iter()
            .filter(|id| !online(id))
            .collect();
        self.forget(stale)
    }

    /// Forgets a device (an administrator's command); whether it was known.
    pub fn remove(&mut self, id: &str) -> bool {
        let Some(k) = self.known.remove(id) else {
            return false;
        };
        if let Some(set) = self.by_org.get_mut(&k.org_key) {
            set.remove(&(k.name.clone(), id.to_string()));
            if set.is_empty() {
                self.by_org.remove(&k.org_key);
            }
        }
        true
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
        // Its name or organisation may have changed (a new enrollment of the same key).
        self.remove(&a.device.id);
        self.by_org
            .entry(a.device.org_key)
            .or_default()
            .insert((a.device.name.clone(), a.device.id.clone()));
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

    /// Every device id known.
    pub fn ids(&self) -> impl Iterator<Item = &String> {
        self.known.keys()
    }

    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// A page of the devices of `org_key` in `groups` (`None`: every group) matching `query`
    /// (case-insensitive, in name, host, group, user or id), by name, from `offset`, at most
    /// [`tandem_proto::DEVICES_PER_PAGE`] entries and what fits one control frame. Returns the
    /// entries (their ids, to ask whether each is online) and how many match in all. Costs the
    /// organisation's devices, not the relay's.
    pub fn page(
        &self,
        org_key: &PublicKey,
        groups: Option<&[String]>,
        query: &str,
        offset: u32,
    ) -> (Vec<(String, DeviceListing)>, u32) {
        let query = query.trim().to_lowercase();
        let Some(set) = self.by_org.get(org_key) else {
            return (Vec::new(), 0);
        };
        let matching = set.iter().filter_map(|(_, id)| {
            let k = self.known.get(id)?;
            let in_group = groups.is_none_or(|g| g.contains(&k.group));
            (in_group && k.haystack.contains(&query)).then_some((id, k))
        });
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut total = 0u32;
        // Entries are taken in order until one does not fit: the next page starts right after
        // the last one taken (the console moves its offset by the entries it got).
        let mut full = false;
        for (i, (id, k)) in matching.enumerate() {
            total += 1;
            if i < offset as usize || full {
                continue;
            }
            let size = k.cert.len() + k.presence.len() + 32;
            if out.len() >= tandem_proto::DEVICES_PER_PAGE || bytes + size > PAGE_BYTES {
                full = true;
                continue;
            }
            bytes += size;
            out.push((
                id.clone(),
                DeviceListing {
                    cert: k.cert.clone(),
                    presence: k.presence.clone(),
                    online: false,
                    in_session: false,
                    last_seen: k.last_seen,
                },
            ));
        }
        (out, total)
    }
}

/// Fills in a page's online state (`state(id)`: `None` offline, `Some(in_session)` online), with
/// `now` as last seen for devices online.
pub fn with_state(
    page: Vec<(String, DeviceListing)>,
    now: u64,
    state: impl Fn(&str) -> Option<bool>,
) -> Vec<DeviceListing> {
    page.into_iter()
        .map(|(id, mut l)| {
            let st = state(&id);
            l.online = st.is_some();
            l.in_session = st == Some(true);
            if l.online {
                l.last_seen = now;
            }
            l
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tandem_org::{DeviceRequest, KeyPair, OrgPublic};

    const NOW: u64 = 1_800_000_000;

    /// The exporter of "this" connection in these tests.
    const EXPORTER: [u8; 32] = [5; 32];

    /// An enrolled device's certificate, presence and proof for [`EXPORTER`].
    fn enroll(org: &KeyPair, org_name: &str, name: &str, group: &str) -> (String, String, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let req = DeviceRequest::new(name, &key).unwrap();
        let cert = DeviceCert::issue(org, org_name, &req, None, group, NOW).unwrap();
        let p = Presence::sign(&key, name, "Debian 12", "bob", NOW).unwrap();
        let (c, p) = (cert.to_text(), p.to_text());
        let proof = tandem_org::prove_announce(&key, &c, &p, &EXPORTER);
        (c, p, proof)
    }

    fn check(c: &str, p: &str, proof: &[u8], now: u64) -> Result<Announced, String> {
        check_announce(c, p, proof, &EXPORTER, now)
    }

    fn page(
        book: &DeviceBook,
        org: &PublicKey,
        groups: Option<&[String]>,
        query: &str,
        offset: u32,
    ) -> (Vec<DeviceListing>, u32) {
        let (p, total) = book.page(org, groups, query, offset);
        (with_state(p, NOW, |_| None), total)
    }

    #[test]
    fn lists_only_the_organisation_and_its_groups_pages_and_searches() {
        let acme = KeyPair::generate().unwrap();
        let evil = KeyPair::generate().unwrap();
        let mut book = DeviceBook::default();
        let t0 = std::time::Instant::now();
        let from: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        for i in 0..30 {
            let group = if i % 3 == 0 { "servers" } else { "office" };
            let (c, p, proof) = enroll(&acme, "ACME IT", &format!("pc-{i:02}"), group);
            let a = check(&c, &p, &proof, NOW).unwrap();
            book.admit(&a, from, t0).unwrap();
            book.online(&a, c, p, "a".into(), NOW);
        }
        let (c, p, proof) = enroll(&evil, "Evil", "evil-pc", "office");
        let a = check(&c, &p, &proof, NOW).unwrap();
        book.online(&a, c, p, "a".into(), NOW);
        let org = OrgPublic::new("ACME IT", acme.public()).unwrap();
        let (first, total) = page(&book, &org.key, None, "", 0);
        assert_eq!(total, 30);
        assert_eq!(first.len(), tandem_proto::DEVICES_PER_PAGE);
        let frame = tandem_proto::encode_frame(
            &tandem_proto::RelayMsg::Devices {
                entries: first.clone(),
                offset: 0,
                total,
            },
            MAX_CONTROL_FRAME,
        );
        assert!(frame.is_ok());
        let mut names = Vec::new();
        for e in &first {
            let d = tandem_org::DeviceEntry {
                cert: &e.cert,
                presence: &e.presence,
            }
            .check(&org, None)
            .unwrap();
            names.push(d.device.name);
        }
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        let (found, _) = page(&book, &org.key, None, "PC-2", 0);
        assert_eq!(found.len(), 10);
        let (found, total) = page(&book, &org.key, None, "evil", 0);
        assert_eq!((found.len(), total), (0, 0));
        let (last, _) = page(&book, &org.key, None, "", 24);
        assert_eq!(last.len(), 6);
        // A certificate for the group "servers" sees those only.
        let servers = ["servers".to_string()];
        let (_, total) = page(&book, &org.key, Some(&servers), "", 0);
        assert_eq!(total, 10);
        // Online state comes from the registry.
        let (p, _) = book.page(&org.key, None, "pc-00", 0);
        let l = with_state(p, NOW + 5, |_| Some(true));
        assert!(l[0].online && l[0].in_session && l[0].last_seen == NOW + 5);
    }

    #[test]
    fn pages_follow_one_another_without_gaps_when_entries_are_large() {
        let acme = KeyPair::generate().unwrap();
        let mut book = DeviceBook::default();
        // Long names make some entries larger than others: a page ends at the first that does
        // not fit, and the next starts there.
        for i in 0..40 {
            let name = if i % 5 == 2 {
                format!("pc-{i:02}-{}", "x".repeat(50))
            } else {
                format!("pc-{i:02}")
            };
            let (c, mut p, proof) = enroll(&acme, "ACME IT", &name, "office");
            let a = check(&c, &p, &proof, NOW).unwrap();
            // Pad the presence as a device holding its key could (the book takes it as text).
            if i % 5 == 2 {
                p.push_str(&" ".repeat(5000));
            }
            book.online(&a, c, p, "a".into(), NOW);
        }
        let org = acme.public();
        let mut offset = 0;
        let mut seen = Vec::new();
        loop {
            let (page, total) = book.page(&org, None, "", offset);
            assert_eq!(total, 40);
            if page.is_empty() {
                break;
            }
            offset += page.len() as u32;
            seen.extend(page.into_iter().map(|(id, _)| id));
        }
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        assert_eq!((seen.len(), unique.len()), (40, 40));
    }

    #[test]
    fn the_book_is_bounded_hosts_only_its_organisations_and_forgets_the_stale() {
        let acme = KeyPair::generate().unwrap();
        let stranger = KeyPair::generate().unwrap();
        let mut book = DeviceBook {
            limits: DeviceLimits {
                max_known: 5,
                new_per_hour_per_address: 3,
                retention: std::time::Duration::from_secs(3600),
                organisations: vec![acme.public()],
            },
            ..DeviceBook::default()
        };
        let t0 = std::time::Instant::now();
        let a_ip: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let b_ip: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        let take = |book: &mut DeviceBook, key: &KeyPair, ip, name: &str, t| {
            let (c, p, proof) = enroll(key, "ACME IT", name, "office");
            let a = check(&c, &p, &proof, NOW).unwrap();
            book.admit(&a, ip, t)?;
            book.online(&a, c, p, "a".into(), NOW);
            Ok::<_, NotTaken>(a)
        };
        assert_eq!(
            take(&mut book, &stranger, a_ip, "x", t0).err(),
            Some(NotTaken::Organisation)
        );
        // The cheap check refuses a foreign organisation before any signature.
        let (fc, _, _) = enroll(&stranger, "X", "x", "office");
        assert_eq!(book.precheck(&fc), Err(NotTaken::Organisation));
        let first = take(&mut book, &acme, a_ip, "d1", t0).unwrap();
        take(&mut book, &acme, a_ip, "d2", t0).unwrap();
        take(&mut book, &acme, a_ip, "d3", t0).unwrap();
        // Three new devices an hour from one address; a known device comes back at any time.
        assert_eq!(
            take(&mut book, &acme, a_ip, "d4", t0).err(),
            Some(NotTaken::Budget)
        );
        assert!(book.admit(&first, a_ip, t0).is_ok());
        take(&mut book, &acme, b_ip, "d4", t0).unwrap();
        take(&mut book, &acme, b_ip, "d5", t0).unwrap();
        let later = t0 + std::time::Duration::from_secs(3600);
        assert_eq!(
            take(&mut book, &acme, b_ip, "d6", later).err(),
            Some(NotTaken::Full)
        );
        let (c7, _, _) = enroll(&acme, "ACME IT", "d7", "office");
        assert_eq!(book.precheck(&c7), Err(NotTaken::Full));
        // Devices unseen for longer than the retention are forgotten, unless online now.
        book.seen(&first.device.id, NOW + 7200);
        let online = book
            .ids()
            .find(|id| **id != first.device.id)
            .unwrap()
            .clone();
        let gone = book.forget_stale(NOW + 7200, |id| id == online);
        assert_eq!(gone.len(), 3);
        assert_eq!(book.len(), 2);
        book.forget(vec![online]);
        assert_eq!(book.len(), 1);
        let org = OrgPublic::new("ACME IT", acme.public()).unwrap();
        assert_eq!(book.page(&org.key, None, "", 0).1, 1);
        assert!(book.remove(&first.device.id));
        assert!(book.is_empty());
        assert_eq!(book.page(&org.key, None, "", 0).1, 0);
    }

    #[test]
    fn garbage_stale_moved_and_replayed_announcements_are_refused() {
        let acme = KeyPair::generate().unwrap();
        let (c, p, proof) = enroll(&acme, "ACME IT", "pc", "office");
        assert!(check(&c, &p, &proof, NOW).is_ok());
        assert!(check(&c, &p, &proof, NOW + tandem_org::PRESENCE_MAX_AGE + 1).is_err());
        assert!(check("tandem-device-v1:AAAA", &p, &proof, NOW).is_err());
        let (c2, p2, proof2) = enroll(&acme, "ACME IT", "pc2", "office");
        assert!(check(&c, &p2, &proof2, NOW).is_err());
        assert!(check(&c2, &p2, &proof2, NOW).is_ok());
        // A copied certificate and presence (what the device list hands any technician of the
        // organisation) on another connection: the proof is for the device's own connection.
        let e = check_announce(&c, &p, &proof, &[6; 32], NOW).unwrap_err();
        assert!(e.contains("does not hold the device's key"), "{e}");
        // Another organisation certifying the same public device key: no proof without the key.
        let evil = KeyPair::generate().unwrap();
        let key = KeyPair::generate().unwrap();
        let req = DeviceRequest::new("pc", &key).unwrap();
        let stolen_cert = DeviceCert::issue(&evil, "Evil", &req, None, "office", NOW)
            .unwrap()
            .to_text();
        let presence = Presence::sign(&key, "pc", "Debian 12", "bob", NOW)
            .unwrap()
            .to_text();
        let wrong_key_proof = tandem_org::prove_announce(&evil, &stolen_cert, &presence, &EXPORTER);
        assert!(check(&stolen_cert, &presence, &wrong_key_proof, NOW).is_err());
    }
}
