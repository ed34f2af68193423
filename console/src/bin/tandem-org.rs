//! `tandem-org`: the organisation key and technician certificates, on the administrator's and the
//! technicians' own machines (never on the relay). Thin glue over `tandem-org` (the library).

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use tandem_session::tandem_org::{
    CertRequest, Certificate, DEFAULT_VALIDITY, DeviceCert, DeviceRequest, Issue, KeyPair,
    MAX_VALIDITY, OrgPublic, Permissions, RevocationBody, RevocationList, read_text, unix_now,
    write_private,
};

#[derive(Parser, Debug)]
#[command(
    name = "tandem-org",
    version,
    about = "Tandem organisation keys: technicians that agents verify themselves",
    long_about = "Tandem organisation keys. The administrator makes the organisation key once \
(`init`, kept encrypted on the administrator's machine, never on the relay) and pins its public \
line in every agent (org = \"tandem-org-v1:…\" in tandem-agent.toml). Each technician makes their \
own key and a request (`request`); the administrator signs it into a short-lived certificate \
(`issue`), which the technician's console proves in every session. `revoke` signs a revocation \
list agents keep (newest wins).",
    after_help = "Example, on one machine:\n  \
  tandem-org init --name 'ACME IT' --key org.key          # prints the agents' org = line\n  \
  tandem-org request --name alice                         # technician: key + request\n  \
  tandem-org issue --key org.key --request alice.req --permissions view,control --out alice.cert\n  \
  tandem-console --cert alice.cert --cert-key ~/.config/tandem/technician.key …\n  \
  tandem-org enroll --key org.key --request pc.req --group office --out pc.cert   # a managed PC\n\n\
The passphrase comes from TANDEM_ORG_PASSPHRASE, --passphrase-file, or a prompt."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Make the organisation key (encrypted with a passphrase) and print its public line.
    Init {
        /// The organisation's name, as agents will show it ("verified by ACME IT's key").
        #[arg(long)]
        name: String,
        /// Where to keep the key (mode 0600; keep a backup offline).
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Print the organisation's public line and fingerprint (for tandem-agent.toml).
    Show {
        #[arg(long)]
        key: PathBuf,
        /// The organisation's name (as given to init).
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Technician: make your own key and a certificate request to send to your administrator.
    Request {
        /// Your name, as users will see it.
        #[arg(long)]
        name: String,
        /// Where to keep your key (mode 0600). [default: technician.key in
        /// $XDG_CONFIG_HOME/tandem or ~/.config/tandem, where tandem-console finds it]
        #[arg(long)]
        key: Option<PathBuf>,
        /// Write the request here too (it is also printed).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Administrator: sign a technician's request into a certificate.
    Issue {
        #[arg(long)]
        key: PathBuf,
        /// The request (file, or `-` for standard input).
        #[arg(long)]
        request: PathBuf,
        /// What the technician may do: view, control, files, unattended (comma separated; all).
        #[arg(long, default_value = "view,control")]
        permissions: String,
        /// Device groups for unattended access (comma separated).
        #[arg(long, default_value = "")]
        groups: String,
        /// How long the certificate is valid (e.g. 12h, 3d; at most 7 days).
        #[arg(long, default_value = "12h")]
        validity: humantime::Duration,
        /// Write the certificate here (it is also printed).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Administrator: add certificates or technician keys to the revocation list (its serial
    /// grows; agents keep the newest).
    Revoke {
        #[arg(long)]
        key: PathBuf,
        /// The revocation list file to update (made if missing).
        #[arg(long)]
        list: PathBuf,
        /// Revoke these certificates (files).
        #[arg(long)]
        cert: Vec<PathBuf>,
        /// Revoke every certificate of the technician key these certificates name.
        #[arg(long)]
        technician_of: Vec<PathBuf>,
        /// Revoke enrolled devices (their device certificates, files): consoles refuse them.
        #[arg(long)]
        device: Vec<PathBuf>,
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Administrator: approve an agent's enrollment (`tandem-agent enroll` printed the request)
    /// into a device certificate for one device group.
    Enroll {
        #[arg(long)]
        key: PathBuf,
        /// The device request (file, or `-` for standard input).
        #[arg(long)]
        request: PathBuf,
        /// The device group technicians' certificates name (`--groups` of `issue`).
        #[arg(long)]
        group: String,
        /// The name technicians see [default: the computer's host name, from the request].
        #[arg(long)]
        name: Option<String>,
        /// Write the device certificate here (it is also printed).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Show what a certificate, request, revocation list or organisation line says (unchecked).
    Inspect { file: PathBuf },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem-org: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn passphrase(file: Option<&Path>, confirm: bool) -> Result<String> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the passphrase file {}", f.display()))?;
        return Ok(text.lines().next().unwrap_or_default().to_string());
    }
    if let Ok(p) = std::env::var("TANDEM_ORG_PASSPHRASE") {
        return Ok(p);
    }
    if !std::io::stdin().is_terminal() {
        bail!("no passphrase: set TANDEM_ORG_PASSPHRASE or use --passphrase-file");
    }
    let p = rpassword::prompt_password("Organisation key passphrase: ")?;
    if confirm {
        if p.chars().count() < 8 {
            bail!("the passphrase is too short (at least 8 characters)");
        }
        let again = rpassword::prompt_password("Again: ")?;
        if again != p {
            bail!("the passphrases differ");
        }
    }
    Ok(p)
}

fn org_key(path: &Path, pass_file: Option<&Path>) -> Result<KeyPair> {
    let text = read_text(path)?;
    let pass = passphrase(pass_file, false)?;
    KeyPair::unseal(&text, &pass).with_context(|| format!("cannot open {}", path.display()))
}

/// The organisation's name is kept beside its key (`<key>.name`): public, not secret.
fn name_file(key: &Path) -> PathBuf {
    key.with_extension("name")
}

fn org_name(key: &Path, given: Option<&str>) -> Result<String> {
    if let Some(n) = given {
        return Ok(n.to_string());
    }
    let f = name_file(key);
    Ok(std::fs::read_to_string(&f)
        .with_context(|| format!("cannot read {} (or give --name)", f.display()))?
        .trim()
        .to_string())
}

fn read_input(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .take(tandem_session::tandem_org::MAX_TEXT as u64 + 1)
            .read_to_string(&mut s)?;
        return Ok(s.trim().to_string());
    }
    Ok(read_text(path)?)
}

fn default_tech_key() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|d| d.join("tandem").join("technician.key"))
}

fn print_org(org: &OrgPublic) {
    println!("organisation: {}", org.name);
    println!("fingerprint:  {}", org.fingerprint());
    println!("for tandem-agent.toml:");
    println!("org = \"{}\"", org.to_text());
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Init {
            name,
            key,
            passphrase_file,
        } => {
            if key.exists() {
                bail!(
                    "{} exists already: an organisation key is made once (agents pin it)",
                    key.display()
                );
            }
            let pair = KeyPair::generate()?;
            let org = OrgPublic::new(&name, pair.public())?;
            let pass = passphrase(passphrase_file.as_deref(), true)?;
            write_private(&key, &pair.seal(&pass)?)?;
            std::fs::write(name_file(&key), format!("{name}\n"))
                .with_context(|| format!("cannot write {}", name_file(&key).display()))?;
            print_org(&org);
            eprintln!(
                "The key is in {} (encrypted). Keep it and its passphrase off the relay, with a \
                 backup offline.",
                key.display()
            );
        }
        Cmd::Show {
            key,
            name,
            passphrase_file,
        } => {
            let pair = org_key(&key, passphrase_file.as_deref())?;
            let org = OrgPublic::new(&org_name(&key, name.as_deref())?, pair.public())?;
            print_org(&org);
        }
        Cmd::Request { name, key, out } => {
            let path = key
                .or_else(default_tech_key)
                .context("no place for the key: use --key")?;
            let pair = if path.exists() {
                eprintln!("Using the existing key {}.", path.display());
                KeyPair::from_text(&read_text(&path)?)?
            } else {
                let p = KeyPair::generate()?;
                write_private(&path, &p.to_text())?;
                eprintln!(
                    "Your key is in {} (it never leaves this computer).",
                    path.display()
                );
                p
            };
            let req = CertRequest::new(&name, &pair)?.to_text();
            if let Some(o) = out {
                std::fs::write(&o, format!("{req}\n"))
                    .with_context(|| format!("cannot write {}", o.display()))?;
            }
            eprintln!("Send this request to your administrator (it holds no secret):");
            println!("{req}");
        }
        Cmd::Issue {
            key,
            request,
            permissions,
            groups,
            validity,
            out,
            passphrase_file,
        } => {
            let req = CertRequest::from_text(&read_input(&request)?)
                .context("invalid certificate request")?;
            let validity = validity.as_secs();
            if validity > MAX_VALIDITY {
                bail!(
                    "--validity is at most 7 days (certificates are short-lived; issue a new one)"
                );
            }
            let what = Issue {
                permissions: Permissions::parse(&permissions).map_err(anyhow::Error::msg)?,
                groups: groups
                    .split(',')
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(String::from)
                    .collect(),
                validity: if validity == 0 {
                    DEFAULT_VALIDITY
                } else {
                    validity
                },
            };
            let pair = org_key(&key, passphrase_file.as_deref())?;
            let cert = Certificate::issue(&pair, &org_name(&key, None)?, &req, &what, unix_now())?;
            let body = cert.read_unchecked()?;
            let text = cert.to_text();
            if let Some(o) = out {
                std::fs::write(&o, format!("{text}\n"))
                    .with_context(|| format!("cannot write {}", o.display()))?;
            }
            eprintln!(
                "Certificate {} for {} ({}; may {}), valid {} h.",
                body.id_hex(),
                body.technician,
                body.key.fingerprint(),
                body.permissions,
                what.validity / 3600
            );
            println!("{text}");
        }
        Cmd::Revoke {
            key,
            list,
            cert,
            technician_of,
            device,
            passphrase_file,
        } => {
            let pair = org_key(&key, passphrase_file.as_deref())?;
            let org = OrgPublic::new(&org_name(&key, None)?, pair.public())?;
            let mut body = if list.exists() {
                RevocationList::from_text(&read_text(&list)?)?.check(&org)?
            } else {
                RevocationBody {
                    org_key: org.key,
                    serial: 0,
                    issued_at: 0,
                    certs: vec![],
                    keys: vec![],
                }
            };
            for c in &cert {
                let id = Certificate::from_text(&read_text(c)?)?.read_unchecked()?.id;
                if !body.certs.contains(&id) {
                    body.certs.push(id);
                }
            }
            for c in &technician_of {
                let k = Certificate::from_text(&read_text(c)?)?
                    .read_unchecked()?
                    .key;
                if !body.keys.contains(&k) {
                    body.keys.push(k);
                }
            }
            for d in &device {
                let k = DeviceCert::from_text(&read_text(d)?)?
                    .check(&org)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("{}", d.display()))?
                    .key;
                if !body.keys.contains(&k) {
                    body.keys.push(k);
                }
            }
            body.serial += 1;
            body.issued_at = unix_now();
            let signed = RevocationList::sign(&pair, &body)?;
            write_private(&list, &signed.to_text())?;
            eprintln!(
                "Revocation list {} (serial {}): {} certificates, {} keys (technicians, devices). \
                 Give it to your technicians' consoles and agents (--revocation), and publish it \
                 on the relay (its data directory, file `revocation`); the newest wins.",
                list.display(),
                body.serial,
                body.certs.len(),
                body.keys.len()
            );
        }
        Cmd::Enroll {
            key,
            request,
            group,
            name,
            out,
            passphrase_file,
        } => {
            let req = DeviceRequest::from_text(&read_input(&request)?).context(
                "invalid device request (copy the whole line `tandem-agent enroll` printed)",
            )?;
            let pair = org_key(&key, passphrase_file.as_deref())?;
            let cert = DeviceCert::issue(
                &pair,
                &org_name(&key, None)?,
                &req,
                name.as_deref(),
                &group,
                unix_now(),
            )?;
            let text = cert.to_text();
            if let Some(o) = out {
                std::fs::write(&o, format!("{text}\n"))
                    .with_context(|| format!("cannot write {}", o.display()))?;
            }
            eprintln!(
                "Device {} ({}) enrolled in group {group}. On that computer: tandem-agent enroll \
                 --cert <this file>.",
                name.as_deref().unwrap_or(&req.name),
                req.device_id(),
            );
            println!("{text}");
        }
        Cmd::Inspect { file } => {
            let text = read_input(&file)?;
            if let Ok(c) = Certificate::from_text(&text) {
                let b = c.read_unchecked()?;
                let left = b.not_after as i64 - unix_now() as i64;
                println!("certificate {}", b.id_hex());
                println!("  technician:   {} ({})", b.technician, b.key.fingerprint());
                println!(
                    "  organisation: {} ({})",
                    b.organisation,
                    b.org_key.fingerprint()
                );
                println!("  may:          {}", b.permissions);
                println!("  groups:       {}", b.groups.join(", "));
                if left > 0 {
                    println!("  valid for:    {} min more", left / 60);
                } else {
                    println!("  EXPIRED {} min ago", -left / 60);
                }
            } else if let Ok(r) = CertRequest::from_text(&text) {
                println!(
                    "certificate request of {} ({})",
                    r.technician,
                    r.key.fingerprint()
                );
            } else if let Ok(d) = DeviceCert::from_text(&text) {
                let b = d.check_self().map_err(anyhow::Error::msg)?;
                println!("device {} ({})", b.name, b.id);
                println!(
                    "  organisation: {} ({})",
                    b.organisation,
                    b.org_key.fingerprint()
                );
                println!("  group:        {}", b.group);
            } else if let Ok(r) = DeviceRequest::from_text(&text) {
                println!("device request of {} ({})", r.name, r.device_id());
            } else if let Ok(o) = OrgPublic::from_text(&text) {
                print_org(&o);
            } else if let Ok(l) = RevocationList::from_text(&text) {
                let b = l.read_unchecked()?;
                println!(
                    "revocation list serial {} of {}: {} certificates, {} technician keys",
                    b.serial,
                    b.org_key.fingerprint(),
                    b.certs.len(),
                    b.keys.len()
                );
            } else {
                bail!("{} is no Tandem organisation object", file.display());
            }
        }
    }
    Ok(())
}
