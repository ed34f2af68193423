//! Certificate tooling of the Tandem relay.
//!
//! * On first start the relay creates, under its data directory, a private CA (`ca.pem`, `ca.key`) and a
//!   relay certificate signed by it (`relay.pem` = relay certificate followed by the CA, `relay.key`).
//!   Private keys are written with mode 0600.
//! * Clients trust the relay in one of two ways, never "accept anything" ([`RelayTrust`]):
//!   - **pin**: `sha256:<64 hex digits>`, the SHA-256 of the relay certificate (DER). The TLS handshake
//!     signature is still verified against that certificate's key, so a copied certificate is useless
//!     without its private key.
//!   - **CA**: a PEM file of trust anchors (the relay's private `ca.pem`, or a public CA bundle when the MSP
//!     uses a certificate from a public CA); full WebPKI path and host-name validation.
//! * An MSP can instead bring its own PEM chain and key ([`load_identity`]).

use ring::digest;
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// File names inside the relay's data directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const RELAY_CERT_FILE: &str = "relay.pem";
pub const RELAY_KEY_FILE: &str = "relay.key";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} contains no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} contains no usable PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("invalid PEM in {path}: {reason}")]
    BadPem { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error(
        "invalid pin {0:?}: expected `sha256:` followed by 64 hexadecimal digits (colons allowed), as printed by `tandem-relay fingerprint`"
    )]
    BadPin(String),
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    TrustChoice(&'static str),
    #[error("{path}: no trust anchor could be used: {reason}")]
    BadTrustAnchors { path: PathBuf, reason: String },
}

/// SHA-256 fingerprint of a DER certificate. Displays (and parses) as `sha256:<hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn of(cert_der: &[u8]) -> Self {
        let d = digest::digest(&digest::SHA256, cert_der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// Colon-separated upper-case hex, as `openssl x509 -fingerprint -sha256` prints it.
    pub fn openssl_style(&self) -> String {
        self.0
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}
impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = CertError;
    /// Accepts `sha256:<hex>`, with or without colons between bytes, any case, surrounding spaces.
    fn from_str(s: &str) -> Result<Self, CertError> {
        let t = s.trim();
        let hex = t
            .strip_prefix("sha256:")
            .or_else(|| t.strip_prefix("SHA256:"))
            .ok_or_else(|| CertError::BadPin(s.to_string()))?;
        let digits: Vec<u8> = hex.bytes().filter(|b| *b != b':').collect();
        if digits.len() != 64 {
            return Err(CertError::BadPin(s.to_string()));
        }
        let mut out = [0u8; 32];
        for (i, pair) in digits.chunks(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or_else(|| CertError::BadPin(s.to_string()))?;
            let lo = hex_val(pair[1]).ok_or_else(|| CertError::BadPin(s.to_string()))?;
            out[i] = hi << 4 | lo;
        }
        Ok(Fingerprint(out))
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The relay's TLS identity: its certificate chain (leaf first) and private key.
#[derive(Debug)]
pub struct RelayIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Where the chain came from (for messages).
    pub chain_path: PathBuf,
    /// The private CA's certificate file, when the relay made its own.
    pub ca_path: Option<PathBuf>,
    /// True when this call created the files.
    pub created: bool,
}

impl RelayIdentity {
    /// Fingerprint of the leaf certificate: the value clients pin.
    pub fn fingerprint(&self) -> Fingerprint {
        // `chain` is never empty: both constructors check.
        Fingerprint::of(self.chain.first().map(|c| c.as_ref()).unwrap_or_default())
    }
}

/// Creates `dir` (and missing parents) readable by this user only (mode 0700): it holds private
/// keys. A directory that exists is left as it is.
pub fn create_private_dir(dir: &Path) -> Result<(), CertError> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir).map_err(|source| CertError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// Loads the relay identity from `data_dir`, creating a private CA and a relay certificate there if
/// none exist. `names` are the DNS names and IP addresses the certificate is valid for (always
/// including `localhost`, `127.0.0.1` and `::1`).
pub fn ensure_identity(data_dir: &Path, names: &[String]) -> Result<RelayIdentity, CertError> {
    let cert_path = data_dir.join(RELAY_CERT_FILE);
    let key_path = data_dir.join(RELAY_KEY_FILE);
    if cert_path.exists() && key_path.exists() {
        let mut id = load_identity(&cert_path, &key_path)?;
        let ca = data_dir.join(CA_CERT_FILE);
        id.ca_path = ca.exists().then_some(ca);
        return Ok(id);
    }
    create_private_dir(data_dir)?;
    let generated = generate(names)?;
    write_file(
        &data_dir.join(CA_CERT_FILE),
        generated.ca_pem.as_bytes(),
        false,
    )?;
    write_file(
        &data_dir.join(CA_KEY_FILE),
        generated.ca_key_pem.as_bytes(),
        true,
    )?;
    write_file(&key_path, generated.relay_key_pem.as_bytes(), true)?;
    let chain_pem = format!("{}{}", generated.relay_pem, generated.ca_pem);
    write_file(&cert_path, chain_pem.as_bytes(), false)?;
    tracing::info!(path = %data_dir.display(), "created private CA and relay certificate");
    let mut id = load_identity(&cert_path, &key_path)?;
    id.ca_path = Some(data_dir.join(CA_CERT_FILE));
    id.created = true;
    Ok(id)
}

/// PEM material of a freshly generated CA and relay certificate.
pub struct Generated {
    pub ca_pem: String,
    pub ca_key_pem: String,
    pub relay_pem: String,
    pub relay_key_pem: String,
}

/// Generates a private CA (ECDSA P-256, 20 years) and a relay certificate it signs (5 years) for
/// `names` plus the loopback names.
pub fn generate(names: &[String]) -> Result<Generated, CertError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, date_time_ymd,
    };
    let year = current_year();
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Tandem relay private CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = date_time_ymd(year - 1, 1, 1);
    ca_params.not_after = date_time_ymd(year + 20, 1, 1);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let mut all_names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for n in names {
        if !all_names.contains(n) {
            all_names.push(n.clone());
        }
    }
    let mut leaf = CertificateParams::new(all_names)?;
    leaf.distinguished_name
        .push(DnType::CommonName, "Tandem relay");
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = date_time_ymd(year - 1, 1, 1);
    leaf.not_after = date_time_ymd(year + 5, 1, 1);
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;
    Ok(Generated {
        ca_key_pem: issuer.key().serialize_pem(),
        ca_pem,
        relay_pem: leaf_cert.pem(),
        relay_key_pem: leaf_key.serialize_pem(),
    })
}

fn current_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), CertError> {
    write_atomic(path, bytes, private).map_err(|source| CertError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `bytes` to `path` as a new file with its final mode from creation (`private`: 0600, in a
/// directory created 0700 if missing; otherwise 0644), then renamed over the old one: a secret is
/// never readable by others, not even for a moment, and a crash leaves the old file or the new one
/// whole. Used for keys here and for the programs' own secrets (the console's remembered login, the
/// agent's count of failed attempts).
pub fn write_atomic(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut b = fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(if private { 0o700 } else { 0o755 });
        }
        b.create(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let written = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads all PEM certificates of a file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::BadPem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Loads a PEM chain (leaf first) and a PEM private key, e.g. the MSP's own certificate.
pub fn load_identity(chain_path: &Path, key_path: &Path) -> Result<RelayIdentity, CertError> {
    let chain = load_certs(chain_path)?;
    let key_bytes = read(key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|_| CertError::NoKey {
        path: key_path.to_path_buf(),
    })?;
    Ok(RelayIdentity {
        chain,
        key,
        chain_path: chain_path.to_path_buf(),
        ca_path: None,
        created: false,
    })
}

/// The ring crypto provider, the only one Tandem uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How a client decides that it talks to the real relay.
#[derive(Clone, Debug)]
pub enum RelayTrust {
    /// The relay certificate's SHA-256 fingerprint.
    Pin(Fingerprint),
    /// Trust anchors (PEM file contents): the relay's private CA, or a public CA bundle.
    Ca {
        path: PathBuf,
        roots: Vec<CertificateDer<'static>>,
    },
}

impl RelayTrust {
    /// Parses a pin string (`sha256:…`).
    pub fn pin(s: &str) -> Result<Self, CertError> {
        Ok(RelayTrust::Pin(s.parse()?))
    }
    /// From the usual options: a pin (`sha256:…`) or a CA file; exactly one.
    pub fn from_options(pin: Option<&str>, ca: Option<&Path>) -> Result<Self, CertError> {
        match (pin, ca) {
            (Some(p), None) => Self::pin(p),
            (None, Some(c)) => Self::ca_file(c),
            (Some(_), Some(_)) => Err(CertError::TrustChoice(
                "give either a relay pin or a relay CA file, not both",
            )),
            (None, None) => Err(CertError::TrustChoice(
                "the relay must be pinned (--relay-pin sha256:…, printed by `tandem-relay fingerprint`) \
                 or its CA given (--relay-ca FILE); Tandem never trusts a relay unverified",
            )),
        }
    }

    /// Loads trust anchors from a PEM file.
    pub fn ca_file(path: &Path) -> Result<Self, CertError> {
        Ok(RelayTrust::Ca {
            path: path.to_path_buf(),
            roots: load_certs(path)?,
        })
    }

    /// A rustls client configuration (TLS 1.3 only, ring provider) that verifies the relay this way.
    pub fn client_config(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, CertError> {
        let provider = provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let mut cfg = match self {
            RelayTrust::Pin(fp) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedVerifier::new(*fp)))
                .with_no_client_auth(),
            RelayTrust::Ca { path, roots } => {
                let mut store = rustls::RootCertStore::empty();
                let (added, _ignored) = store.add_parsable_certificates(roots.iter().cloned());
                if added == 0 {
                    return Err(CertError::BadTrustAnchors {
                        path: path.clone(),
                        reason: "none of its certificates parsed as a trust anchor".into(),
                    });
                }
                builder.with_root_certificates(store).with_no_client_auth()
            }
        };
        cfg.alpn_protocols = vec![alpn.to_vec()];
        Ok(cfg)
    }
}

/// Which certificates a [`PinnedVerifier`] accepts. Either way the peer must prove it holds the
/// certificate's key (the TLS handshake signature is verified).
#[derive(Clone, Copy, Debug)]
enum Accept {
    /// Exactly the certificate with this fingerprint.
    Pin(Fingerprint),
    /// Any certificate: for a channel that is authenticated afterwards by other means bound to this
    /// TLS connection (Tandem's inner session: SPAKE2 over the TLS exporter). Never for the relay.
    AuthenticatedLater,
}

/// Accepts exactly the certificate whose SHA-256 is pinned (or, see [`PinnedVerifier::authenticated_later`],
/// any certificate), and checks that the peer holds its key.
#[derive(Debug)]
pub struct PinnedVerifier {
    accept: Accept,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    pub fn new(pin: Fingerprint) -> Self {
        PinnedVerifier {
            accept: Accept::Pin(pin),
            provider: provider(),
        }
    }

    /// A verifier for a TLS connection whose peer is authenticated afterwards, bound to this
    /// connection (e.g. by a PAKE over the TLS exporter): it accepts any certificate but still
    /// checks that the peer holds its key. Must not be used where the certificate is the only
    /// authentication.
    pub fn authenticated_later() -> Self {
        PinnedVerifier {
            accept: Accept::AuthenticatedLater,
            provider: provider(),
        }
    }
}

/// Text of the handshake error when the relay presents another certificate than the pinned one.
pub fn pin_mismatch_message(presented: &Fingerprint, pinned: &Fingerprint) -> String {
    format!(
        "relay certificate {presented} does not match the pinned fingerprint {pinned}; if the relay was \
         re-installed, get its new pin with `tandem-relay fingerprint` and update --relay-pin"
    )
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pin = match self.accept {
            Accept::AuthenticatedLater => return Ok(ServerCertVerified::assertion()),
            Accept::Pin(pin) => pin,
        };
        let presented = Fingerprint::of(end_entity.as_ref());
        if presented == pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(pin_mismatch_message(
                &presented, &pin,
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A rustls server configuration (TLS 1.3, ring) for the relay identity.
pub fn server_config(id: &RelayIdentity, alpn: &[u8]) -> Result<rustls::ServerConfig, CertError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg.max_early_data_size = 0;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_display_parse_roundtrip() {
        let fp = Fingerprint::of(b"hello");
        let s = fp.to_string();
        assert!(s.starts_with("sha256:"));
        assert_eq!(s.len(), 7 + 64);
        assert_eq!(s.parse::<Fingerprint>().unwrap(), fp);
        let colons = format!("SHA256:{}", fp.openssl_style());
        assert_eq!(colons.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(format!("  {s}\n").parse::<Fingerprint>().unwrap(), fp);
    }

    #[test]
    fn bad_pins_rejected() {
        for bad in [
            "",
            "sha256:",
            "md5:00",
            "sha256:zz",
            &format!("sha256:{}", "0".repeat(63)),
            &format!("sha256:{}", "g".repeat(64)),
            &"0".repeat(64),
        ] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn identity_created_once_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let a = ensure_identity(dir.path(), &["relay.example.com".into()]).unwrap();
        assert!(a.created);
        assert_eq!(a.chain.len(), 2, "leaf then CA");
        let b = ensure_identity(dir.path(), &[]).unwrap();
        assert!(!b.created);
        assert_eq!(a.fingerprint(), b.fingerprint());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in [CA_KEY_FILE, RELAY_KEY_FILE] {
                let mode = fs::metadata(dir.path().join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o077, 0, "{f} is readable by others: {mode:o}");
            }
        }
        // Both trust modes build a client config; the server config builds too.
        RelayTrust::Pin(a.fingerprint())
            .client_config(b"x")
            .unwrap();
        RelayTrust::ca_file(&dir.path().join(CA_CERT_FILE))
            .unwrap()
            .client_config(b"x")
            .unwrap();
        server_config(&a, b"x").unwrap();
    }

    #[test]
    fn pinned_verifier_rejects_other_certificate() {
        let g = generate(&[]).unwrap();
        let cert = CertificateDer::from_pem_slice(g.relay_pem.as_bytes()).unwrap();
        let other = CertificateDer::from_pem_slice(g.ca_pem.as_bytes()).unwrap();
        let v = PinnedVerifier::new(Fingerprint::of(&cert));
        let name = ServerName::try_from("localhost").unwrap();
        assert!(
            v.verify_server_cert(&cert, &[], &name, &[], UnixTime::now())
                .is_ok()
        );
        let err = v
            .verify_server_cert(&other, &[], &name, &[], UnixTime::now())
            .unwrap_err();
        assert!(err.to_string().contains("does not match the pinned"));
    }

    #[test]
    fn authenticated_later_accepts_any_certificate_but_only_there() {
        let g = generate(&[]).unwrap();
        let cert = CertificateDer::from_pem_slice(g.relay_pem.as_bytes()).unwrap();
        let other = CertificateDer::from_pem_slice(g.ca_pem.as_bytes()).unwrap();
        let name = ServerName::try_from("x").unwrap();
        let v = PinnedVerifier::authenticated_later();
        for c in [&cert, &other] {
            assert!(
                v.verify_server_cert(c, &[], &name, &[], UnixTime::now())
                    .is_ok()
            );
        }
        // The relay is never trusted this way: RelayTrust has no such variant, and a pin still pins.
        let pinned = PinnedVerifier::new(Fingerprint::of(&cert));
        assert!(
            pinned
                .verify_server_cert(&other, &[], &name, &[], UnixTime::now())
                .is_err()
        );
    }

    #[test]
    fn missing_files_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_identity(&dir.path().join("nope.pem"), &dir.path().join("k")).unwrap_err();
        assert!(err.to_string().contains("nope.pem"));
        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "not pem").unwrap();
        assert!(matches!(
            load_certs(&empty),
            Err(CertError::NoCertificate { .. })
        ));
    }
}
