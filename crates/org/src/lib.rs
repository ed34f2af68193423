//! Organisation keys: the MSP's own authority over who may connect to its endpoints, checked by the
//! agent itself, end to end, so that the relay routes but decides nothing.
//!
//! * An **organisation key** ([`KeyPair`], Ed25519 from `ring`) is made and kept by the MSP's
//!   administrator, encrypted at rest with a passphrase ([`KeyPair::seal`]: Argon2id, then
//!   AES-256-GCM). Agents pin its public half ([`OrgPublic`]) in their configuration.
//! * A **technician certificate** ([`Certificate`]) binds a technician's own Ed25519 key to a
//!   name, the organisation, [`Permissions`], device groups and a validity period (at most
//!   [`MAX_VALIDITY`]), signed by the organisation key. The technician makes the key and a
//!   request ([`CertRequest`], signed by that key to prove they hold it); the private key never
//!   leaves their machine.
//! * A **revocation list** ([`RevocationList`]) names certificates and technician keys that are no
//!   longer good, signed by the organisation key with a serial that only grows. Agents keep the
//!   newest they have seen ([`TrustStore`]) and refuse an older one, so whoever carries lists (the
//!   relay, a console) can neither forge one nor roll one back.
//! * **In a session** the agent sends a fresh challenge; the console answers with its certificate
//!   and a signature ([`prove`]) over the inner TLS connection's exporter, the challenge and the
//!   certificate; the agent checks it all ([`TrustStore::verify`]). A captured proof is worthless
//!   elsewhere: another connection has another exporter, another attempt another challenge.
//!
//! Every object travels as one line of text (`tandem-<kind>-v1:` and base64url of its postcard
//! encoding), to be copied, pasted, mailed or kept in a file. Everything here is pure and
//! deterministic given the clock value passed in, except [`TrustStore`]'s file and key generation.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The longest a technician certificate may be valid.
pub const MAX_VALIDITY: u64 = 7 * 24 * 3600;
/// The default validity of a technician certificate.
pub const DEFAULT_VALIDITY: u64 = 12 * 3600;
/// Clock difference tolerated between the administrator's machine and an agent.
pub const CLOCK_SKEW: u64 = 5 * 60;
/// Longest name (technician, organisation, group), in bytes.
pub const MAX_NAME: usize = 64;
/// Most device groups in one certificate.
pub const MAX_GROUPS: usize = 32;
/// Most entries in a revocation list (certificates are short-lived: expired ones are pruned).
pub const MAX_REVOKED: usize = 256;
/// Longest text form accepted of any object (a revocation list at its largest is ≈ 11 KB).
pub const MAX_TEXT: usize = 14 * 1024;
/// Bytes of the session challenge and of the exporter the proof is bound to.
pub const CHALLENGE_LEN: usize = 32;
/// TLS exporter label of the proof (distinct from the PAKE's).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-tandem-org-proof-v1";

const SIG_LEN: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OrgError {
    #[error("not a Tandem {0} (expected a line starting with `tandem-{0}-v1:`)")]
    NotA(&'static str),
    #[error("the {0} is damaged or truncated (copy the whole line again)")]
    Malformed(&'static str),
    #[error("{0} is too long (at most {MAX_NAME} bytes)")]
    NameTooLong(&'static str),
    #[error("{0} must not be empty or contain control characters")]
    BadName(&'static str),
    #[error("too many device groups (at most {MAX_GROUPS})")]
    TooManyGroups,
    #[error("too many revoked entries (at most {MAX_REVOKED}; prune expired certificates)")]
    TooManyRevoked,
    #[error("a certificate may be valid for at most 7 days")]
    TooLong,
    #[error("the {0} is not signed by this organisation's key")]
    BadSignature(&'static str),
    #[error("the certificate is for another key than this technician key file")]
    KeyMismatch,
    #[error("wrong passphrase for the key file (or the file is damaged)")]
    WrongPassphrase,
    #[error("cannot make a key: {0}")]
    Key(String),
    #[error("{what} {}: {reason}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
}

impl OrgError {
    fn io(what: &'static str, path: &Path, e: std::io::Error) -> OrgError {
        OrgError::Io {
            what,
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }
}

/// Why a technician is not verified. Each says what to do.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unverified {
    #[error("this computer trusts no organisation key")]
    NoTrust,
    #[error("the technician sent no certificate")]
    NoCertificate,
    #[error("the certificate is damaged: {0}")]
    Malformed(String),
    #[error("the certificate is from another organisation ({0}), not the one this computer trusts")]
    WrongOrganisation(String),
    #[error("the certificate is not signed by the organisation's key (forged or altered)")]
    Forged,
    #[error("the certificate expired {0} min ago; the technician needs a new one")]
    Expired(u64),
    #[error("the certificate is not valid yet (check the clocks)")]
    NotYetValid,
    #[error("the certificate claims more than 7 days of validity")]
    TooLong,
    #[error("the certificate was revoked by the organisation")]
    Revoked,
    #[error("the technician could not prove they hold the certificate's key")]
    BadProof,
    #[error("the certificate does not allow viewing this computer")]
    NoView,
    #[error("the certificate does not allow unattended access")]
    NoUnattended,
    #[error("the certificate does not cover this computer's device group ({0})")]
    WrongGroup(String),
    #[error("this computer does not allow unattended access by this technician ({0})")]
    NotAllowedHere(String),
}

/// What a technician may do, as the certificate says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    pub view: bool,
    pub control: bool,
    pub files: bool,
    pub unattended: bool,
}

impl Permissions {
    /// From `view,control,files,unattended` (any subset, comma separated; `all` for every one).
    pub fn parse(s: &str) -> Result<Permissions, String> {
        let mut p = Permissions::default();
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "view" => p.view = true,
                "control" => p.control = true,
                "files" => p.files = true,
                "unattended" => p.unattended = true,
                "all" => {
                    p = Permissions {
                        view: true,
                        control: true,
                        files: true,
                        unattended: true,
                    }
                }
                other => {
                    return Err(format!(
                        "unknown permission {other:?} (use view, control, files, unattended)"
                    ));
                }
            }
        }
        // Control, files and unattended access all show the screen.
        if p.control || p.files || p.unattended {
            p.view = true;
        }
        Ok(p)
    }
}

impl std::fmt::Display for Permissions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let words: Vec<&str> = [
            (self.view, "view"),
            (self.control, "control"),
            (self.files, "files"),
            (self.unattended, "unattended"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, w)| *w)
        .collect();
        if words.is_empty() {
            f.write_str("nothing")
        } else {
            f.write_str(&words.join(", "))
        }
    }
}

fn check_name(what: &'static str, s: &str) -> Result<(), OrgError> {
    if s.len() > MAX_NAME {
        return Err(OrgError::NameTooLong(what));
    }
    if s.trim().is_empty() || s.chars().any(char::is_control) {
        return Err(OrgError::BadName(what));
    }
    Ok(())
}

fn armor(kind: &str, bytes: &[u8]) -> String {
    format!("tandem-{kind}-v1:{}", B64.encode(bytes))
}

fn unarmor(kind: &'static str, text: &str) -> Result<Vec<u8>, OrgError> {
    let text = text.trim();
    if text.len() > MAX_TEXT {
        return Err(OrgError::Malformed(long_name(kind)));
    }
    let body = text
        .strip_prefix("tandem-")
        .and_then(|t| t.strip_prefix(kind))
        .and_then(|t| t.strip_prefix("-v1:"))
        .ok_or(OrgError::NotA(kind))?;
    B64.decode(body)
        .map_err(|_| OrgError::Malformed(long_name(kind)))
}

/// The words for an armor tag, in messages.
fn long_name(kind: &'static str) -> &'static str {
    match kind {
        "cert" => "certificate",
        "certreq" => "certificate request",
        "org" => "organisation key",
        "revocation" => "revocation list",
        "sealedkey" => "sealed key",
        "devreq" => "device request",
        "device" => "device certificate",
        "presence" => "presence",
        other => other,
    }
}

fn decode<T: for<'a> Deserialize<'a>>(kind: &'static str, bytes: &[u8]) -> Result<T, OrgError> {
    postcard::from_bytes(bytes).map_err(|_| OrgError::Malformed(kind))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // postcard cannot fail on these plain structs into a Vec.
    postcard::to_allocvec(v).unwrap_or_default()
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u32).to_be_bytes());
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// What each signature covers: a domain, then the signed bytes (so that no signature of one kind
/// is valid as another).
fn signed_message(domain: &[u8], body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(domain.len() + 1 + body.len());
    m.extend_from_slice(domain);
    m.push(0);
    m.extend_from_slice(body);
    m
}

const DOMAIN_CERT: &[u8] = b"tandem technician certificate v1";
const DOMAIN_REQUEST: &[u8] = b"tandem certificate request v1";
const DOMAIN_REVOCATION: &[u8] = b"tandem revocation list v1";
const DOMAIN_PROOF: &[u8] = b"tandem session proof v1";

/// An Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// `SHA256:` and the first 128 bits of the key's SHA-256 in hex groups, for reading aloud and
    /// comparing by eye.
    pub fn fingerprint(&self) -> String {
        let h = sha256(&[b"tandem key", &self.0]);
        let hex: Vec<String> = h[..16]
            .chunks(2)
            .map(|c| format!("{:02x}{:02x}", c[0], c[1]))
            .collect();
        format!("SHA256:{}", hex.join("-"))
    }

    fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        sig.len() == SIG_LEN
            && UnparsedPublicKey::new(&ED25519, &self.0[..])
                .verify(message, sig)
                .is_ok()
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

/// An Ed25519 key pair (an organisation's or a technician's).
pub struct KeyPair {
    pkcs8: Zeroizing<Vec<u8>>,
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KeyPair({}, <secret redacted>)",
            self.public().fingerprint()
        )
    }
}

/// The sealed (encrypted) form of a key file.
#[derive(Serialize, Deserialize)]
struct Sealed {
    /// Argon2id parameters: memory in KiB, passes, lanes.
    m_kib: u32,
    t: u32,
    p: u32,
    salt: [u8; 16],
    nonce: [u8; 12],
    ciphertext: Vec<u8>,
}

/// Argon2id cost of a sealed key: 64 MiB, 3 passes (a guess costs ≈ 0.2 s of a core).
const SEAL_M_KIB: u32 = 64 * 1024;
const SEAL_T: u32 = 3;

impl KeyPair {
    /// A new random key pair.
    pub fn generate() -> Result<KeyPair, OrgError> {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| OrgError::Key("the system's random generator failed".into()))?;
        KeyPair::from_pkcs8(pkcs8.as_ref())
    }

    fn from_pkcs8(pkcs8: &[u8]) -> Result<KeyPair, OrgError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| OrgError::Malformed("key"))?;
        Ok(KeyPair {
            pkcs8: Zeroizing::new(pkcs8.to_vec()),
            pair,
        })
    }

    pub fn public(&self) -> PublicKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(k)
    }

    fn sign_raw(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }

    fn sign(&self, domain: &[u8], body: &[u8]) -> Vec<u8> {
        self.pair
            .sign(&signed_message(domain, body))
            .as_ref()
            .to_vec()
    }

    /// The key in clear text (`tandem-key-v1:…`), for a technician's key file kept with mode 0600.
    pub fn to_text(&self) -> Zeroizing<String> {
        Zeroizing::new(armor("key", &self.pkcs8))
    }

    pub fn from_text(text: &str) -> Result<KeyPair, OrgError> {
        let bytes = Zeroizing::new(unarmor("key", text)?);
        KeyPair::from_pkcs8(&bytes)
    }

    fn derive(passphrase: &str, s: &Sealed) -> Result<Zeroizing<[u8; 32]>, OrgError> {
        let params = argon2::Params::new(s.m_kib, s.t, s.p, Some(32))
            .map_err(|_| OrgError::Malformed("sealed key"))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut key = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(passphrase.as_bytes(), &s.salt, &mut key[..])
            .map_err(|e| OrgError::Key(e.to_string()))?;
        Ok(key)
    }

    /// The key encrypted with `passphrase` (`tandem-sealedkey-v1:…`): Argon2id (64 MiB, 3 passes)
    /// derives an AES-256-GCM key.
    pub fn seal(&self, passphrase: &str) -> Result<String, OrgError> {
        self.seal_with(passphrase, SEAL_M_KIB, SEAL_T)
    }

    fn seal_with(&self, passphrase: &str, m_kib: u32, t: u32) -> Result<String, OrgError> {
        let rng = SystemRandom::new();
        let mut s = Sealed {
            m_kib,
            t,
            p: 1,
            salt: [0; 16],
            nonce: [0; 12],
            ciphertext: Vec::new(),
        };
        rng.fill(&mut s.salt)
            .and_then(|_| rng.fill(&mut s.nonce))
            .map_err(|_| OrgError::Key("the system's random generator failed".into()))?;
        let key = Self::derive(passphrase, &s)?;
        let aead = ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key[..])
                .map_err(|_| OrgError::Key("AES key".into()))?,
        );
        let mut data = self.pkcs8.to_vec();
        aead.seal_in_place_append_tag(
            ring::aead::Nonce::assume_unique_for_key(s.nonce),
            ring::aead::Aad::from(b"tandem sealed key v1"),
            &mut data,
        )
        .map_err(|_| OrgError::Key("encryption failed".into()))?;
        s.ciphertext = data;
        Ok(armor("sealedkey", &encode(&s)))
    }

    /// Opens a key sealed by [`KeyPair::seal`].
    pub fn unseal(text: &str, passphrase: &str) -> Result<KeyPair, OrgError> {
        let s: Sealed = decode("sealed key", &unarmor("sealedkey", text)?)?;
        // Refuse parameters that would make opening the file a denial of service.
        if s.m_kib > 1024 * 1024 || s.t > 16 || s.p == 0 || s.p > 8 {
            return Err(OrgError::Malformed("sealed key"));
        }
        let key = Self::derive(passphrase, &s)?;
        let aead = ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key[..])
                .map_err(|_| OrgError::Key("AES key".into()))?,
        );
        let mut data = Zeroizing::new(s.ciphertext.clone());
        let plain = aead
            .open_in_place(
                ring::aead::Nonce::assume_unique_for_key(s.nonce),
                ring::aead::Aad::from(b"tandem sealed key v1"),
                &mut data,
            )
            .map_err(|_| OrgError::WrongPassphrase)?;
        KeyPair::from_pkcs8(plain)
    }
}

/// An organisation's public identity, as agents pin it: its name and key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgPublic {
    pub name: String,
    pub key: PublicKey,
}

impl OrgPublic {
    pub fn new(name: &str, key: PublicKey) -> Result<OrgPublic, OrgError> {
        check_name("the organisation's name", name)?;
        Ok(OrgPublic {
            name: name.to_string(),
            key,
        })
    }

    /// `tandem-org-v1:…`, for `org = "…"` in `tandem-agent.toml`.
    pub fn to_text(&self) -> String {
        armor("org", &encode(self))
    }

    pub fn from_text(text: &str) -> Result<OrgPublic, OrgError> {
        let o: OrgPublic = decode("organisation key", &unarmor("org", text)?)?;
        check_name("the organisation's name", &o.name)?;
        Ok(o)
    }

    pub fn fingerprint(&self) -> String {
        self.key.fingerprint()
    }
}

/// A technician's request for a certificate: their name and key, signed by that key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRequest {
    pub technician: String,
    pub key: PublicKey,
    sig: Vec<u8>,
}

impl CertRequest {
    pub fn new(technician: &str, key: &KeyPair) -> Result<CertRequest, OrgError> {
        check_name("the technician's name", technician)?;
        let body = encode(&(technician, key.public()));
        Ok(CertRequest {
            technician: technician.to_string(),
            key: key.public(),
            sig: key.sign(DOMAIN_REQUEST, &body),
        })
    }

    pub fn to_text(&self) -> String {
        armor("certreq", &encode(self))
    }

    /// Reads a request and checks that whoever made it holds its key.
    pub fn from_text(text: &str) -> Result<CertRequest, OrgError> {
        let r: CertRequest = decode("certificate request", &unarmor("certreq", text)?)?;
        check_name("the technician's name", &r.technician)?;
        let body = encode(&(&r.technician, r.key));
        if !r.key.verify(&signed_message(DOMAIN_REQUEST, &body), &r.sig) {
            return Err(OrgError::BadSignature("certificate request"));
        }
        Ok(r)
    }
}

/// What a technician certificate says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertBody {
    /// Random; named in revocation lists.
    pub id: [u8; 16],
    pub organisation: String,
    /// The organisation key that signed it.
    pub org_key: PublicKey,
    pub technician: String,
    /// The technician's own key, whose holder the certificate is about.
    pub key: PublicKey,
    pub permissions: Permissions,
    /// Device groups this technician may reach unattended (empty: none).
    pub groups: Vec<String>,
    /// Unix seconds.
    pub not_before: u64,
    pub not_after: u64,
}

impl CertBody {
    /// The certificate's id in hex, for revocation commands and logs.
    pub fn id_hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A technician certificate: its body, as signed, and the organisation's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    body: Vec<u8>,
    sig: Vec<u8>,
}

/// What the administrator decides when issuing a certificate.
#[derive(Clone, Debug)]
pub struct Issue {
    pub permissions: Permissions,
    pub groups: Vec<String>,
    /// Seconds from `now`; at most [`MAX_VALIDITY`].
    pub validity: u64,
}

impl Certificate {
    /// The organisation (`org`, whose key is `org_key`) certifies the request's technician.
    pub fn issue(
        org_key: &KeyPair,
        org_name: &str,
        req: &CertRequest,
        what: &Issue,
        now: u64,
    ) -> Result<Certificate, OrgError> {
        check_name("the organisation's name", org_name)?;
        if what.validity == 0 || what.validity > MAX_VALIDITY {
            return Err(OrgError::TooLong);
        }
        if what.groups.len() > MAX_GROUPS {
            return Err(OrgError::TooManyGroups);
        }
        for g in &what.groups {
            check_name("a device group", g)?;
        }
        let mut id = [0u8; 16];
        SystemRandom::new()
            .fill(&mut id)
            .map_err(|_| OrgError::Key("the system's random generator failed".into()))?;
        let body = CertBody {
            id,
            organisation: org_name.to_string(),
            org_key: org_key.public(),
            technician: req.technician.clone(),
            key: req.key,
            permissions: what.permissions,
            groups: what.groups.clone(),
            // A little slack for agents whose clock is behind.
            not_before: now.saturating_sub(60),
            not_after: now.saturating_add(what.validity),
        };
        let bytes = encode(&body);
        Ok(Certificate {
            sig: org_key.sign(DOMAIN_CERT, &bytes),
            body: bytes,
        })
    }

    pub fn to_text(&self) -> String {
        armor("cert", &encode(self))
    }

    pub fn from_text(text: &str) -> Result<Certificate, OrgError> {
        decode("certificate", &unarmor("cert", text)?)
    }

    /// The body, unchecked: for showing a certificate to its holder (`tandem-org show`). The
    /// agent uses [`TrustStore::verify`].
    pub fn read_unchecked(&self) -> Result<CertBody, OrgError> {
        let b: CertBody = decode("certificate", &self.body)?;
        check_name("the technician's name", &b.technician)?;
        check_name("the organisation's name", &b.organisation)?;
        if b.groups.len() > MAX_GROUPS {
            return Err(OrgError::TooManyGroups);
        }
        Ok(b)
    }

    /// Checks the signature and validity against `org` at `now`; the body if good.
    pub fn check(&self, org: &OrgPublic, now: u64) -> Result<CertBody, Unverified> {
        let b = self
            .read_unchecked()
            .map_err(|e| Unverified::Malformed(e.to_string()))?;
        if b.org_key != org.key {
            return Err(Unverified::WrongOrganisation(b.organisation));
        }
        if !org
            .key
            .verify(&signed_message(DOMAIN_CERT, &self.body), &self.sig)
        {
            return Err(Unverified::Forged);
        }
        if b.not_after.saturating_sub(b.not_before) > MAX_VALIDITY + 120 {
            return Err(Unverified::TooLong);
        }
        if now > b.not_after.saturating_add(CLOCK_SKEW) {
            return Err(Unverified::Expired((now - b.not_after) / 60));
        }
        if now.saturating_add(CLOCK_SKEW) < b.not_before {
            return Err(Unverified::NotYetValid);
        }
        Ok(b)
    }

    fn digest(&self) -> [u8; 32] {
        sha256(&[&self.body, &self.sig])
    }
}

/// What a revocation list says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationBody {
    pub org_key: PublicKey,
    /// Grows with every list the organisation signs.
    pub serial: u64,
    pub issued_at: u64,
    /// Revoked certificates, by id.
    pub certs: Vec<[u8; 16]>,
    /// Revoked technician keys (every certificate of that key).
    pub keys: Vec<PublicKey>,
}

/// A signed revocation list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    body: Vec<u8>,
    sig: Vec<u8>,
}

impl RevocationList {
    pub fn sign(org_key: &KeyPair, body: &RevocationBody) -> Result<RevocationList, OrgError> {
        if body.certs.len() + body.keys.len() > MAX_REVOKED {
            return Err(OrgError::TooManyRevoked);
        }
        let bytes = encode(body);
        Ok(RevocationList {
            sig: org_key.sign(DOMAIN_REVOCATION, &bytes),
            body: bytes,
        })
    }

    pub fn to_text(&self) -> String {
        armor("revocation", &encode(self))
    }

    pub fn from_text(text: &str) -> Result<RevocationList, OrgError> {
        decode("revocation list", &unarmor("revocation", text)?)
    }

    /// The body if `org` signed it.
    pub fn check(&self, org: &OrgPublic) -> Result<RevocationBody, OrgError> {
        let b: RevocationBody = decode("revocation list", &self.body)?;
        if b.org_key != org.key
            || !org
                .key
                .verify(&signed_message(DOMAIN_REVOCATION, &self.body), &self.sig)
        {
            return Err(OrgError::BadSignature("revocation list"));
        }
        if b.certs.len() + b.keys.len() > MAX_REVOKED {
            return Err(OrgError::TooManyRevoked);
        }
        Ok(b)
    }

    /// The body, unchecked (for the administrator's own tool, which re-signs it).
    pub fn read_unchecked(&self) -> Result<RevocationBody, OrgError> {
        decode("revocation list", &self.body)
    }
}

/// What the console signs: the proof that it holds the certificate's key in this connection.
fn proof_message(
    exporter: &[u8; 32],
    challenge: &[u8; CHALLENGE_LEN],
    cert: &Certificate,
) -> Vec<u8> {
    signed_message(
        DOMAIN_PROOF,
        &sha256(&[exporter, challenge, &cert.digest()]),
    )
}

/// The console's proof for `challenge` on the connection whose exporter (label
/// [`EXPORTER_LABEL`]) is `exporter`.
pub fn prove(
    key: &KeyPair,
    cert: &Certificate,
    exporter: &[u8; 32],
    challenge: &[u8; CHALLENGE_LEN],
) -> Vec<u8> {
    key.pair
        .sign(&proof_message(exporter, challenge, cert))
        .as_ref()
        .to_vec()
}

/// A fresh challenge.
pub fn challenge() -> Result<[u8; CHALLENGE_LEN], OrgError> {
    let mut c = [0u8; CHALLENGE_LEN];
    SystemRandom::new()
        .fill(&mut c)
        .map_err(|_| OrgError::Key("the system's random generator failed".into()))?;
    Ok(c)
}

/// What a technician's console proves with: the certificate, its key, and the newest revocation
/// list the technician carries (passed on to agents, which keep it if it is newer than theirs).
#[derive(Debug)]
pub struct Credentials {
    pub cert: Certificate,
    pub key: KeyPair,
    pub revocation: Option<RevocationList>,
}

impl Credentials {
    /// Checks that `key` is the certificate's key (a mismatch would only fail in the session).
    pub fn new(
        cert: Certificate,
        key: KeyPair,
        revocation: Option<RevocationList>,
    ) -> Result<Credentials, OrgError> {
        if cert.read_unchecked()?.key != key.public() {
            return Err(OrgError::KeyMismatch);
        }
        Ok(Credentials {
            cert,
            key,
            revocation,
        })
    }
}

/// A technician the agent verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub technician: String,
    pub organisation: String,
    pub permissions: Permissions,
    pub groups: Vec<String>,
    pub not_after: u64,
    pub cert_id: String,
    /// The technician's key's fingerprint (for the agent's own log).
    pub key: String,
}

/// What a revocation list offered to the agent did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Offered {
    /// Newer than the one kept: now kept.
    Newer(u64),
    /// The one kept already.
    Same,
    /// Older than the one kept: ignored (a rollback attempt, or a stale copy).
    Older { offered: u64, kept: u64 },
}

/// The agent's trust: the pinned organisation and the newest revocation list it has seen, kept in
/// a file so that a restart does not forget it.
#[derive(Debug)]
pub struct TrustStore {
    org: OrgPublic,
    revocation: Option<(RevocationList, RevocationBody)>,
    file: Option<PathBuf>,
    /// A newer list was taken and is not written to `file` yet.
    unsaved: bool,
}

/// A revocation list to write to the trust store's file ([`TrustStore::take_unsaved`]). Writing
/// is file I/O: do it off the async executor and outside the store's lock.
#[derive(Debug)]
pub struct UnsavedRevocation {
    path: PathBuf,
    serial: u64,
    text: String,
}

impl UnsavedRevocation {
    /// Writes the list unless the file already holds one at least as new (two writers that raced
    /// cannot leave the older list on disk).
    pub fn write(self) {
        static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = WRITING.lock().unwrap_or_else(|e| e.into_inner());
        let kept = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| RevocationList::from_text(&t).ok())
            .and_then(|l| l.read_unchecked().ok())
            .map(|b| b.serial);
        if kept.is_some_and(|k| k >= self.serial) {
            return;
        }
        if let Err(e) = write_private(&self.path, &self.text) {
            tracing::warn!(error = %e, "cannot keep the newer revocation list for the next start");
        }
    }
}

impl TrustStore {
    /// Trusts `org`; reads the kept revocation list from `file` (if any, and if `org` signed it).
    pub fn new(org: OrgPublic, file: Option<PathBuf>) -> TrustStore {
        let mut s = TrustStore {
            org,
            revocation: None,
            file,
            unsaved: false,
        };
        if let Some(f) = &s.file {
            match std::fs::read_to_string(f) {
                Ok(text) => match RevocationList::from_text(&text)
                    .and_then(|l| l.check(&s.org).map(|b| (l, b)))
                {
                    Ok(kept) => s.revocation = Some(kept),
                    Err(e) => {
                        tracing::warn!(file = %f.display(), error = %e, "ignoring the kept revocation list")
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %f.display(), error = %e, "cannot read the kept revocation list")
                }
            }
        }
        s
    }

    pub fn org(&self) -> &OrgPublic {
        &self.org
    }

    /// The revocation list kept, if any.
    pub fn revocation(&self) -> Option<&RevocationBody> {
        self.revocation.as_ref().map(|(_, b)| b)
    }

    /// The serial of the list kept (0: none).
    pub fn revocation_serial(&self) -> u64 {
        self.revocation.as_ref().map_or(0, |(_, b)| b.serial)
    }

    /// Considers a revocation list from anywhere (a file, a console, the relay): kept if the
    /// organisation signed it and it is newer than the one kept.
    pub fn offer(&mut self, list: &RevocationList) -> Result<Offered, OrgError> {
        let body = list.check(&self.org)?;
        let kept = self.revocation_serial();
        if self.revocation.is_some() && body.serial < kept {
            return Ok(Offered::Older {
                offered: body.serial,
                kept,
            });
        }
        if let Some((same, _)) = &self.revocation
            && body.serial == kept
        {
            if same != list {
                tracing::warn!(
                    serial = kept,
                    "two different revocation lists carry the same serial; keeping the first seen \
                     (the administrator should sign a newer one)"
                );
            }
            return Ok(Offered::Same);
        }
        let serial = body.serial;
        // In memory: it counts at once. The file is written by whoever holds the store, outside
        // its lock ([`TrustStore::take_unsaved`]); a list that cannot be saved still counts for
        // this run.
        self.revocation = Some((list.clone(), body));
        self.unsaved = true;
        Ok(Offered::Newer(serial))
    }

    /// The newer list taken since the last call, to write to the store's file (none without a
    /// file, or if nothing changed).
    pub fn take_unsaved(&mut self) -> Option<UnsavedRevocation> {
        if !std::mem::take(&mut self.unsaved) {
            return None;
        }
        let (list, body) = self.revocation.as_ref()?;
        Some(UnsavedRevocation {
            path: self.file.clone()?,
            serial: body.serial,
            text: list.to_text(),
        })
    }

    /// Writes what [`TrustStore::take_unsaved`] returns, now (for callers that are not async).
    pub fn save_now(&mut self) {
        if let Some(u) = self.take_unsaved() {
            u.write();
        }
    }

    /// Checks a technician's certificate and proof at `now`.
    pub fn verify(
        &self,
        cert: &Certificate,
        proof: &[u8],
        exporter: &[u8; 32],
        challenge: &[u8; CHALLENGE_LEN],
        now: u64,
    ) -> Result<Verified, Unverified> {
        let b = cert.check(&self.org, now)?;
        if let Some((_, r)) = &self.revocation
            && (r.certs.contains(&b.id) || r.keys.contains(&b.key))
        {
            return Err(Unverified::Revoked);
        }
        if !b
            .key
            .verify(&proof_message(exporter, challenge, cert), proof)
        {
            return Err(Unverified::BadProof);
        }
        if !b.permissions.view {
            return Err(Unverified::NoView);
        }
        Ok(Verified {
            cert_id: b.id_hex(),
            key: b.key.fingerprint(),
            technician: b.technician,
            organisation: b.organisation,
            permissions: b.permissions,
            groups: b.groups,
            not_after: b.not_after,
        })
    }
}

/// Writes `text` to `path` readable by its owner only (atomically: a temporary file renamed).
pub fn write_private(path: &Path, text: &str) -> Result<(), OrgError> {
    tandem_certs::write_atomic(path, format!("{text}\n").as_bytes(), true)
        .map_err(|e| OrgError::io("cannot write", path, e))
}

/// Reads a one-line object file (at most [`MAX_TEXT`] bytes).
pub fn read_text(path: &Path) -> Result<String, OrgError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| OrgError::io("cannot read", path, e))?;
    let mut s = String::new();
    f.take(MAX_TEXT as u64 + 1)
        .read_to_string(&mut s)
        .map_err(|e| OrgError::io("cannot read", path, e))?;
    Ok(s.trim().to_string())
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

mod device;
pub mod log;
pub use device::*;

#[cfg(test)]
mod tests;
