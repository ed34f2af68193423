//! Enrolled devices: computers an organisation manages, reachable without a code.
//!
//! * The agent makes its own **device key** (Ed25519, kept in its state directory, mode 0600) and a
//!   [`DeviceRequest`] signed by it (its host name). The administrator approves it with the
//!   organisation key: [`DeviceCert::issue`] binds the device key to a stable [`device_id`] (derived
//!   from the key, so nobody can claim another device's id), a name and one device group. The relay
//!   never issues or approves anything.
//! * While online the agent tells the relay who and where it is with a [`Presence`] (host name, OS,
//!   user logged in, time), signed by the device key. The relay keeps it to list devices; consoles
//!   check both signatures themselves ([`DeviceEntry::check`]), so a relay cannot add, alter or move
//!   a device in a technician's list.
//! * In an unattended session the agent proves it holds the device key by signing the inner TLS
//!   exporter and the console's fresh challenge ([`prove_device`]); the console checks the proof, the
//!   device certificate against its organisation's key and the id it asked for
//!   ([`check_device`]). The technician then proves their certificate as in attended sessions, and
//!   the agent requires the `unattended` permission for its group ([`allows_unattended`]).

use super::*;

/// Hex digits of a device id.
pub const DEVICE_ID_LEN: usize = 20;
/// How old a presence may be when the relay takes it (the agent signs a fresh one per connection).
pub const PRESENCE_MAX_AGE: u64 = 10 * 60;
/// TLS exporter label of the device's proof in an unattended session.
pub const DEVICE_EXPORTER_LABEL: &[u8] = b"EXPORTER-tandem-device-proof-v1";
/// The group wildcard in a technician certificate: every device group.
pub const ANY_GROUP: &str = "*";

const DOMAIN_DEVICE_REQUEST: &[u8] = b"tandem device request v1";
const DOMAIN_DEVICE_CERT: &[u8] = b"tandem device certificate v1";
const DOMAIN_PRESENCE: &[u8] = b"tandem device presence v1";
const DOMAIN_DEVICE_PROOF: &[u8] = b"tandem device proof v1";

/// The stable id of the device holding `key`: the first 80 bits of its SHA-256, in hex.
pub fn device_id(key: &PublicKey) -> String {
    let h = sha256(&[b"tandem device id", &key.0]);
    h[..DEVICE_ID_LEN / 2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `s` looks like a device id (for messages from the network).
pub fn is_device_id(s: &str) -> bool {
    s.len() == DEVICE_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Why a device, its presence or its proof is not good. Each says what it means.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceUnverified {
    #[error("the device certificate is damaged: {0}")]
    Malformed(String),
    #[error("the device belongs to another organisation ({0})")]
    WrongOrganisation(String),
    #[error("the device certificate is not signed by the organisation's key (forged or altered)")]
    Forged,
    #[error("the device's presence is not signed by the device's key (forged or altered)")]
    ForgedPresence,
    #[error("the device answered as {got}, not the device {wanted} that was asked for")]
    WrongDevice { wanted: String, got: String },
    #[error("the computer could not prove it holds the enrolled device's key")]
    BadProof,
    #[error("the device was revoked by the organisation")]
    Revoked,
    #[error("the presence is stale ({0} s old) or from the future")]
    Stale(u64),
}

/// An agent's request to be enrolled: its name and device key, signed by that key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRequest {
    pub name: String,
    pub key: PublicKey,
    sig: Vec<u8>,
}

impl DeviceRequest {
    pub fn new(name: &str, key: &KeyPair) -> Result<DeviceRequest, OrgError> {
        check_name("the device's name", name)?;
        let body = encode(&(name, key.public()));
        Ok(DeviceRequest {
            name: name.to_string(),
            key: key.public(),
            sig: key.sign(DOMAIN_DEVICE_REQUEST, &body),
        })
    }

    pub fn to_text(&self) -> String {
        armor("devreq", &encode(self))
    }

    /// Reads a request and checks that whoever made it holds its key.
    pub fn from_text(text: &str) -> Result<DeviceRequest, OrgError> {
        let r: DeviceRequest = decode("device request", &unarmor("devreq", text)?)?;
        check_name("the device's name", &r.name)?;
        let body = encode(&(&r.name, r.key));
        if !r
            .key
            .verify(&signed_message(DOMAIN_DEVICE_REQUEST, &body), &r.sig)
        {
            return Err(OrgError::BadSignature("device request"));
        }
        Ok(r)
    }

    pub fn device_id(&self) -> String {
        device_id(&self.key)
    }
}

/// What a device certificate says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceBody {
    pub id: String,
    pub organisation: String,
    pub org_key: PublicKey,
    /// The device's own key.
    pub key: PublicKey,
    pub name: String,
    /// The device group technicians' certificates name.
    pub group: String,
    pub issued_at: u64,
}

/// A device certificate: the organisation's approval of an enrollment (valid until the device key
/// is revoked; the key never leaves the computer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCert {
    pub(crate) body: Vec<u8>,
    pub(crate) sig: Vec<u8>,
}

impl DeviceCert {
    pub fn issue(
        org_key: &KeyPair,
        org_name: &str,
        req: &DeviceRequest,
        name: Option<&str>,
        group: &str,
        now: u64,
    ) -> Result<DeviceCert, OrgError> {
        check_name("the organisation's name", org_name)?;
        check_name("the device group", group)?;
        if group == ANY_GROUP {
            return Err(OrgError::BadName(
                "the device group (`*` is for certificates)",
            ));
        }
        let name = name.unwrap_or(&req.name);
        check_name("the device's name", name)?;
        let body = DeviceBody {
            id: device_id(&req.key),
            organisation: org_name.to_string(),
            org_key: org_key.public(),
            key: req.key,
            name: name.to_string(),
            group: group.to_string(),
            issued_at: now,
        };
        let bytes = encode(&body);
        Ok(DeviceCert {
            sig: org_key.sign(DOMAIN_DEVICE_CERT, &bytes),
            body: bytes,
        })
    }

    pub fn to_text(&self) -> String {
        armor("device", &encode(self))
    }

    pub fn from_text(text: &str) -> Result<DeviceCert, OrgError> {
        decode("device certificate", &unarmor("device", text)?)
    }

    /// The body, unchecked (for cheap refusals before any signature is checked).
    pub fn read_unchecked(&self) -> Result<DeviceBody, OrgError> {
        decode("device certificate", &self.body)
    }

    /// The body if it is well formed and signed by the organisation key it names (the relay's
    /// check: it pins no organisation, but a certificate whose signature does not match its own
    /// organisation key is garbage).
    pub fn check_self(&self) -> Result<DeviceBody, DeviceUnverified> {
        let b: DeviceBody = decode("device certificate", &self.body)
            .map_err(|e| DeviceUnverified::Malformed(e.to_string()))?;
        for (what, s) in [
            ("the device's name", &b.name),
            ("the organisation's name", &b.organisation),
            ("the device group", &b.group),
        ] {
            check_name(what, s).map_err(|e| DeviceUnverified::Malformed(e.to_string()))?;
        }
        if b.id != device_id(&b.key) {
            return Err(DeviceUnverified::Forged);
        }
        if !b
            .org_key
            .verify(&signed_message(DOMAIN_DEVICE_CERT, &self.body), &self.sig)
        {
            return Err(DeviceUnverified::Forged);
        }
        Ok(b)
    }

    /// The body if `org` signed it. (Another organisation's certificate is told apart before any
    /// signature is checked: a flood of foreign entries costs no cryptography.)
    pub fn check(&self, org: &OrgPublic) -> Result<DeviceBody, DeviceUnverified> {
        let claimed: DeviceBody = decode("device certificate", &self.body)
            .map_err(|e| DeviceUnverified::Malformed(e.to_string()))?;
        if claimed.org_key != org.key {
            return Err(DeviceUnverified::WrongOrganisation(claimed.organisation));
        }
        self.check_self()
    }
}

/// What a device says about itself while online.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceBody {
    pub device: String,
    pub hostname: String,
    pub os: String,
    /// The user logged in at the screen ("" if nobody).
    pub user: String,
    pub time: u64,
}

/// A presence, signed by the device key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    body: Vec<u8>,
    sig: Vec<u8>,
}

/// Longest free text in a presence; longer values are cut, control characters replaced.
pub const MAX_PRESENCE_TEXT: usize = 64;

fn clean(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    while out.len() > MAX_PRESENCE_TEXT {
        out.pop();
    }
    out
}

impl Presence {
    pub fn sign(
        key: &KeyPair,
        hostname: &str,
        os: &str,
        user: &str,
        now: u64,
    ) -> Result<Presence, OrgError> {
        let body = PresenceBody {
            device: device_id(&key.public()),
            hostname: clean(hostname),
            os: clean(os),
            user: clean(user),
            time: now,
        };
        let bytes = encode(&body);
        Ok(Presence {
            sig: key.sign(DOMAIN_PRESENCE, &bytes),
            body: bytes,
        })
    }

    pub fn to_text(&self) -> String {
        armor("presence", &encode(self))
    }

    pub fn from_text(text: &str) -> Result<Presence, OrgError> {
        decode("presence", &unarmor("presence", text)?)
    }

    /// The body if the device `cert` names signed it (not checking its age).
    pub fn check(&self, device: &DeviceBody) -> Result<PresenceBody, DeviceUnverified> {
        let b: PresenceBody = decode("presence", &self.body)
            .map_err(|e| DeviceUnverified::Malformed(e.to_string()))?;
        if b.device != device.id
            || !device
                .key
                .verify(&signed_message(DOMAIN_PRESENCE, &self.body), &self.sig)
        {
            return Err(DeviceUnverified::ForgedPresence);
        }
        for s in [&b.hostname, &b.os, &b.user] {
            if s.len() > MAX_PRESENCE_TEXT || s.chars().any(char::is_control) {
                return Err(DeviceUnverified::ForgedPresence);
            }
        }
        Ok(b)
    }

    /// Like [`Presence::check`], and not older than [`PRESENCE_MAX_AGE`] nor from the future (the
    /// relay's check when a device comes online).
    pub fn check_fresh(
        &self,
        device: &DeviceBody,
        now: u64,
    ) -> Result<PresenceBody, DeviceUnverified> {
        let b = self.check(device)?;
        if b.time > now.saturating_add(CLOCK_SKEW) || now.saturating_sub(b.time) > PRESENCE_MAX_AGE
        {
            return Err(DeviceUnverified::Stale(now.abs_diff(b.time)));
        }
        Ok(b)
    }
}

/// A device as a console lists it, after checking: the organisation signed the device, the device
/// signed its presence. `online`, `in_session` and `last_seen` are the relay's word (nobody can sign
/// "offline").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedDevice {
    pub device: DeviceBody,
    pub presence: PresenceBody,
}

/// An entry of the relay's device list, as text, for [`CheckedDevice`].
pub struct DeviceEntry<'a> {
    pub cert: &'a str,
    pub presence: &'a str,
}

impl DeviceEntry<'_> {
    /// Checks an entry against the technician's organisation (and its revocation list).
    pub fn check(
        &self,
        org: &OrgPublic,
        revocation: Option<&RevocationBody>,
    ) -> Result<CheckedDevice, DeviceUnverified> {
        let device = DeviceCert::from_text(self.cert)
            .map_err(|e| DeviceUnverified::Malformed(e.to_string()))?
            .check(org)?;
        if revocation.is_some_and(|r| r.keys.contains(&device.key)) {
            return Err(DeviceUnverified::Revoked);
        }
        let presence = Presence::from_text(self.presence)
            .map_err(|_| DeviceUnverified::ForgedPresence)?
            .check(&device)?;
        Ok(CheckedDevice { device, presence })
    }
}

fn device_proof_message(
    exporter: &[u8; 32],
    challenge: &[u8; CHALLENGE_LEN],
    cert: &DeviceCert,
) -> Vec<u8> {
    signed_message(
        DOMAIN_DEVICE_PROOF,
        &sha256(&[exporter, challenge, &cert.body, &cert.sig]),
    )
}

/// The agent's proof that it is the enrolled device, on the connection whose exporter (label
/// [`DEVICE_EXPORTER_LABEL`]) is `exporter`, for the console's `challenge`.
pub fn prove_device(
    key: &KeyPair,
    cert: &DeviceCert,
    exporter: &[u8; 32],
    challenge: &[u8; CHALLENGE_LEN],
) -> Vec<u8> {
    key.sign_raw(&device_proof_message(exporter, challenge, cert))
}

/// The console's check of the device it reached: enrolled by `org`, the one it asked for
/// (`wanted`), not revoked, and holding the device key on this very connection.
pub fn check_device(
    org: &OrgPublic,
    revocation: Option<&RevocationBody>,
    wanted: &str,
    cert_text: &str,
    proof: &[u8],
    exporter: &[u8; 32],
    challenge: &[u8; CHALLENGE_LEN],
) -> Result<DeviceBody, DeviceUnverified> {
    let cert =
        DeviceCert::from_text(cert_text).map_err(|e| DeviceUnverified::Malformed(e.to_string()))?;
    let b = cert.check(org)?;
    if b.id != wanted {
        return Err(DeviceUnverified::WrongDevice {
            wanted: wanted.to_string(),
            got: b.id,
        });
    }
    if revocation.is_some_and(|r| r.keys.contains(&b.key)) {
        return Err(DeviceUnverified::Revoked);
    }
    if !b
        .key
        .verify(&device_proof_message(exporter, challenge, &cert), proof)
    {
        return Err(DeviceUnverified::BadProof);
    }
    Ok(b)
}

/// Whether a verified technician may connect unattended to a device of `group`.
pub fn allows_unattended(v: &Verified, group: &str) -> Result<(), Unverified> {
    if !v.permissions.unattended {
        return Err(Unverified::NoUnattended);
    }
    if !v.groups.iter().any(|g| g == group || g == ANY_GROUP) {
        return Err(Unverified::WrongGroup(group.to_string()));
    }
    Ok(())
}

/// What an enrolled agent keeps: its key and the organisation's approval.
#[derive(Debug)]
pub struct Enrollment {
    pub key: KeyPair,
    pub cert: DeviceCert,
    pub body: DeviceBody,
}

impl Enrollment {
    /// Checks that `cert` is for `key` and signed by `org`.
    pub fn new(key: KeyPair, cert: DeviceCert, org: &OrgPublic) -> Result<Enrollment, OrgError> {
        let body = cert.check(org).map_err(|e| match e {
            DeviceUnverified::WrongOrganisation(_) | DeviceUnverified::Forged => {
                OrgError::BadSignature("device certificate")
            }
            _ => OrgError::Malformed("device certificate"),
        })?;
        if body.key != key.public() {
            return Err(OrgError::KeyMismatch);
        }
        Ok(Enrollment { key, cert, body })
    }
}

const DOMAIN_MEMBERSHIP: &[u8] = b"tandem relay membership proof v1";
/// TLS exporter label of a console's membership proof to the relay (outer connection).
pub const MEMBERSHIP_EXPORTER_LABEL: &[u8] = b"EXPORTER-tandem-relay-membership-v1";

fn membership_message(exporter: &[u8; 32], cert: &Certificate) -> Vec<u8> {
    signed_message(DOMAIN_MEMBERSHIP, &sha256(&[exporter, &cert.digest()]))
}

/// A console's proof to the relay that it holds a certificate of its organisation, bound to the
/// outer connection's exporter (label [`MEMBERSHIP_EXPORTER_LABEL`]). Its own domain: it is worth
/// nothing to an agent.
pub fn prove_membership(key: &KeyPair, cert: &Certificate, exporter: &[u8; 32]) -> Vec<u8> {
    key.sign_raw(&membership_message(exporter, cert))
}

/// The relay's check of a membership proof: the certificate is signed by the organisation key it
/// names, valid at `now`, and the console holds its key on this connection. The relay pins no
/// organisation: this scopes which devices it lists and routes, nothing more.
pub fn check_membership(
    cert_text: &str,
    proof: &[u8],
    exporter: &[u8; 32],
    now: u64,
) -> Result<CertBody, Unverified> {
    let cert =
        Certificate::from_text(cert_text).map_err(|e| Unverified::Malformed(e.to_string()))?;
    let b = cert
        .read_unchecked()
        .map_err(|e| Unverified::Malformed(e.to_string()))?;
    let org = OrgPublic::new(&b.organisation, b.org_key)
        .map_err(|e| Unverified::Malformed(e.to_string()))?;
    let b = cert.check(&org, now)?;
    if !b.key.verify(&membership_message(exporter, &cert), proof) {
        return Err(Unverified::BadProof);
    }
    Ok(b)
}

const DOMAIN_ANNOUNCE: &[u8] = b"tandem device announce v1";
/// TLS exporter label of a device's announcement to the relay (outer connection).
pub const ANNOUNCE_EXPORTER_LABEL: &[u8] = b"EXPORTER-tandem-device-announce-v1";

fn announce_message(exporter: &[u8; 32], cert: &str, presence: &str) -> Vec<u8> {
    signed_message(
        DOMAIN_ANNOUNCE,
        &sha256(&[exporter, cert.as_bytes(), presence.as_bytes()]),
    )
}

/// The device's proof, on its own connection to the relay, that it holds the device key: a
/// copied certificate and presence (any technician of the organisation can list them) cannot
/// take the device's place on the relay.
pub fn prove_announce(key: &KeyPair, cert: &str, presence: &str, exporter: &[u8; 32]) -> Vec<u8> {
    key.sign_raw(&announce_message(exporter, cert, presence))
}

/// The relay's check of [`prove_announce`] for the device `device` (from the certificate).
pub fn check_announce_proof(
    device: &DeviceBody,
    cert: &str,
    presence: &str,
    proof: &[u8],
    exporter: &[u8; 32],
) -> bool {
    device
        .key
        .verify(&announce_message(exporter, cert, presence), proof)
}
