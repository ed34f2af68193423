//! `tandem-relay`: the QUIC relay an MSP runs. Thin glue over `tandem-relay-server`: configuration
//! (TOML file, flags, environment), admin commands, logging, signals.

mod config;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use config::{Config, FileConfig};
use std::path::PathBuf;
use tandem_relay_server::Store;

#[derive(Parser, Debug)]
#[command(
    name = "tandem-relay",
    version,
    about = "Tandem relay: pairs agents and consoles by session code and forwards their end-to-end encrypted traffic",
    long_about = "Tandem relay: both agents (the user's PC) and consoles (the technician) dial out to it over \
QUIC, so both may sit behind NAT. It authenticates technicians, pairs a console with the agent whose code \
it names, and forwards their end-to-end encrypted traffic without being able to read it.

Configuration comes from a TOML file (--config), environment variables and flags; flags win over the \
environment, which wins over the file. On first start the relay creates its data directory, a private CA \
and a relay certificate, and prints the pin that agents and consoles use to trust it.

Without a command, `serve` runs.",
    after_help = "Examples:
  tandem-relay                                   run with defaults (UDP 0.0.0.0:4433, metrics on 127.0.0.1:9733)
  tandem-relay --config /etc/tandem/relay.toml   run with a configuration file (see relay/dist/relay.toml)
  tandem-relay technician add --org 'ACME IT' --name alice
  tandem-relay audit --json --limit 20"
)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(short, long, env = "TANDEM_RELAY_CONFIG", global = true)]
    config: Option<PathBuf>,

    /// Data directory: certificates, database. [default: $STATE_DIRECTORY, else ~/.local/share/tandem-relay]
    #[arg(long, env = "TANDEM_RELAY_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,

    /// UDP address to listen on. [default: 0.0.0.0:4433]
    #[arg(long, env = "TANDEM_RELAY_LISTEN", global = true)]
    listen: Option<String>,

    /// TCP address for /metrics and /health; "off" disables. [default: 127.0.0.1:9733]
    #[arg(long, env = "TANDEM_RELAY_METRICS_LISTEN", global = true)]
    metrics_listen: Option<String>,
    /// TCP address for clients whose network drops UDP (TLS over TCP and WebSocket on the same
    /// port); repeat for several, `off` for none. [default: the --listen address, same port number]
    #[arg(
        long = "tcp-listen",
        env = "TANDEM_RELAY_TCP_LISTEN",
        value_delimiter = ',',
        global = true
    )]
    tcp_listen: Vec<String>,

    /// Which path sessions may take: `auto` (agent and console go straight to each other when
    /// they can reach each other; the relay stays as the fallback) or `relay-only` (every byte
    /// through this relay: networks where peer-to-peer traffic is forbidden). [default: auto]
    #[arg(
        long,
        env = "TANDEM_RELAY_PATH",
        global = true,
        value_name = "auto|relay-only"
    )]
    path: Option<String>,

    /// Extra DNS name or IP address for the generated relay certificate (repeatable).
    #[arg(long = "name", env = "TANDEM_RELAY_NAMES", value_delimiter = ',')]
    names: Vec<String>,

    /// Use this PEM certificate chain (leaf first) instead of the generated one. Needs --key.
    #[arg(long, env = "TANDEM_RELAY_CERT", requires = "key", global = true)]
    cert: Option<PathBuf>,

    /// PEM private key of --cert.
    #[arg(long, env = "TANDEM_RELAY_KEY", requires = "cert", global = true)]
    key: Option<PathBuf>,

    /// Log format: text or json.
    #[arg(long, env = "TANDEM_RELAY_LOG_FORMAT", global = true)]
    log_format: Option<String>,

    /// Where technicians, devices and the audit log live: sqlite:///path/relay.db, or
    /// postgres://user:password@host:5432/database?sslmode=require for several relay nodes
    /// sharing one database. [default: relay.db in the data directory]
    #[arg(
        long,
        env = "TANDEM_RELAY_STORE",
        global = true,
        hide_env_values = true
    )]
    store: Option<String>,

    /// PEM file of the CA that signed the PostgreSQL server's certificate. [default: the system's]
    #[arg(long, env = "TANDEM_RELAY_STORE_CA", global = true)]
    store_ca: Option<PathBuf>,

    /// This relay's name among nodes sharing a PostgreSQL store. [default: the host name]
    #[arg(long, env = "TANDEM_RELAY_NODE", global = true)]
    node: Option<String>,

    /// With a PostgreSQL store: the address (host:port) agents and consoles reach this node at;
    /// other nodes send consoles here for the codes this node holds. [default: the first --name
    /// and the listen port]
    #[arg(long, env = "TANDEM_RELAY_ADVERTISE", global = true)]
    advertise: Option<String>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the relay (the default).
    Serve,
    /// Print the relay certificate's pin (creating the certificate if needed).
    Fingerprint,
    /// Manage technicians (the accounts consoles authenticate with).
    #[command(subcommand)]
    Technician(TechCmd),
    /// Show the audit log of sessions (metadata only), newest first.
    Audit {
        /// Print JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
        /// How many rows.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Enrolled devices (unattended access): online or not, last seen, host, OS and user, as they
    /// announced themselves (their organisation's key enrolled them; the relay only lists them).
    #[command(subcommand)]
    Devices(DeviceCmd),
    /// Print the effective configuration as TOML.
    PrintConfig,
    /// The store: where it is and what it holds, or copy a lone relay's SQLite store into the
    /// PostgreSQL store a cluster shares.
    #[command(subcommand)]
    Store(StoreCmd),
    /// Make a ready agent for this relay: the tandem-agent program with this relay's address,
    /// its pin and your organisation key appended, as one file your users download and run.
    /// Nobody types a relay address or a pin; a ready agent altered after this does not run.
    AgentBundle(BundleArgs),
    /// Check this relay's setup and exit 0 when nothing is wrong: configuration, data directory,
    /// certificate (expiry, pin), database, the UDP and TCP ports (free, or held by this relay),
    /// and the system clock. Changes nothing (run it as the relay's user).
    Doctor,
    /// Ask the running relay's /health (on the metrics address of this configuration) and exit 0
    /// when it serves, 1 otherwise: for container health checks and monitoring scripts.
    Health,
}

#[derive(clap::Args, Debug)]
struct BundleArgs {
    /// Address the users' agents reach this relay at, HOST:PORT; for a cluster, its nodes
    /// separated by commas (agents try them in order). [default: the first --name (or `names` in
    /// the configuration) and the UDP listen port]
    #[arg(long)]
    address: Option<String>,
    /// The tandem-agent program to use. [default: tandem-agent next to this program, else
    /// /usr/bin/tandem-agent]
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Organisation key the agents trust (tandem-org-v1:…, printed by `tandem-org init`).
    /// [default: the one `[devices] organisations` line, if there is exactly one]
    #[arg(long)]
    org: Option<String>,
    /// More agent settings to include (a TOML file with `[toolbox]`, `[unattended]`, … as in
    /// tandem-agent.toml; relay, relay_pin and org come from here and may not be in it).
    #[arg(long)]
    extra: Option<PathBuf>,
    /// Where to write the ready agent. [default: tandem-agent-HOST in this folder]
    #[arg(long, short)]
    out: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum StoreCmd {
    /// Where the store is, whether it answers, its schema version and how many rows it holds.
    Status,
    /// Copy every technician, organisation, audit row and device of another store (e.g. this
    /// relay's SQLite file before it joins a cluster) into the configured store, which must be
    /// empty. Tokens keep working. Stop the relay that writes the source first.
    Copy {
        /// The store to copy from: sqlite:///var/lib/tandem-relay/relay.db (or postgres://…).
        #[arg(long)]
        from: String,
    },
}

#[derive(Subcommand, Debug)]
enum DeviceCmd {
    /// List the devices the relay has seen.
    List {
        /// Print JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Forget a device (it reappears when it comes online again, unless its key is revoked).
    Remove {
        /// The device id.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum TechCmd {
    /// Add a technician; prints its token once.
    Add {
        /// Organisation (created if new).
        #[arg(long)]
        org: String,
        /// Technician name, as shown to the user in the consent prompt.
        #[arg(long)]
        name: String,
    },
    /// List technicians.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Disable a technician: authentication fails from now on.
    Disable {
        /// Name or numeric id.
        who: String,
        #[arg(long)]
        org: Option<String>,
    },
    /// Enable a disabled technician.
    Enable {
        who: String,
        #[arg(long)]
        org: Option<String>,
    },
    /// Replace a technician's token; prints the new one once. The old one stops working.
    RotateToken {
        who: String,
        #[arg(long)]
        org: Option<String>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem-relay: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let file = match &cli.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let cfg = Config::resolve(
        file,
        config::Overrides {
            data_dir: cli.data_dir.clone(),
            listen: cli.listen.clone(),
            metrics_listen: cli.metrics_listen.clone(),
            tcp_listen: cli.tcp_listen.clone(),
            path: cli.path.clone(),
            names: cli.names.clone(),
            cert: cli.cert.clone(),
            key: cli.key.clone(),
            log_format: cli.log_format.clone(),
            store: cli.store.clone().map(config::StoreUrl),
            store_ca: cli.store_ca.clone(),
            node: cli.node.clone(),
            advertise: cli.advertise.clone(),
        },
    )?;
    init_logging(&cfg.log_format)?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cfg),
        Command::Fingerprint => {
            let id = cfg.identity()?;
            println!("{}", id.fingerprint());
            Ok(())
        }
        Command::PrintConfig => {
            print!("{}", cfg.to_toml()?);
            Ok(())
        }
        Command::Technician(t) => technician(&cfg, t),
        Command::Audit { json, limit } => audit(&cfg, json, limit),
        Command::Devices(d) => devices(&cfg, d),
        Command::Store(c) => store_cmd(&cfg, c),
        Command::AgentBundle(b) => agent_bundle(&cfg, b),
        Command::Health => health(&cfg),
        Command::Doctor => doctor(&cfg),
    }
}

/// One line of `tandem-relay doctor`.
struct Doctor {
    failed: usize,
    warned: usize,
}

impl Doctor {
    fn line(&mut self, verdict: &str, what: &str, detail: impl std::fmt::Display) {
        match verdict {
            "FAIL" => self.failed += 1,
            "WARN" => self.warned += 1,
            _ => {}
        }
        println!("  {verdict:<5} {what:<12} {detail}");
    }
}

/// `tandem-relay doctor`: looks, never creates or changes anything.
fn doctor(cfg: &Config) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut d = Doctor {
        failed: 0,
        warned: 0,
    };
    println!("Tandem relay {} — doctor", env!("CARGO_PKG_VERSION"));
    d.line(
        "OK",
        "config",
        "read; flags > TANDEM_RELAY_* > file > defaults",
    );

    // Data directory.
    let dir = &cfg.data_dir;
    let mut dir_ok = false;
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            dir_ok = true;
            let mode = m.permissions().mode() & 0o777;
            let probe = dir.join(format!(".doctor-{}", std::process::id()));
            let writable = std::fs::write(&probe, b"").is_ok();
            let _ = std::fs::remove_file(&probe);
            if !writable {
                d.line(
                    "FAIL",
                    "data dir",
                    format!(
                        "{} is not writable by this user: run the doctor as the relay's user \
                         (sudo -u tandem-relay …)",
                        dir.display()
                    ),
                );
            } else if mode & 0o077 != 0 {
                d.line(
                    "WARN",
                    "data dir",
                    format!(
                        "{} is mode {mode:o}: others can read the relay's key; chmod 700 it",
                        dir.display()
                    ),
                );
            } else {
                d.line(
                    "OK",
                    "data dir",
                    format!("{} (mode {mode:o})", dir.display()),
                );
            }
        }
        Ok(_) => d.line(
            "FAIL",
            "data dir",
            format!("{} is not a directory", dir.display()),
        ),
        Err(_) => d.line(
            "WARN",
            "data dir",
            format!(
                "{} does not exist yet (the first start creates it)",
                dir.display()
            ),
        ),
    }

    // Certificate.
    let cert_path = match &cfg.cert {
        Some((c, _)) => Some(c.clone()),
        None => {
            let p = dir.join(tandem_certs::RELAY_CERT_FILE);
            p.exists().then_some(p)
        }
    };
    match cert_path {
        None => d.line(
            "WARN",
            "certificate",
            "none yet (the first start makes one and prints its pin)",
        ),
        Some(p) => {
            match tandem_certs::load_certs(&p) {
                Ok(chain) if !chain.is_empty() => {
                    let leaf = &chain[0];
                    let pin = tandem_certs::Fingerprint::of(leaf.as_ref());
                    match x509_parser::parse_x509_certificate(leaf.as_ref()) {
                        Ok((_, x)) => {
                            let now = std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map(|d| d.as_secs() as i64)
                                .unwrap_or(0);
                            let not_after = x.validity().not_after.timestamp();
                            let not_before = x.validity().not_before.timestamp();
                            let days = (not_after - now) / 86_400;
                            let detail = format!("{} ({pin}), expires in {days} days", p.display());
                            if now < not_before {
                                d.line(
                                "FAIL",
                                "certificate",
                                format!("{detail}; not valid before its start date: is the clock right?"),
                            );
                            } else if days < 0 {
                                d.line(
                                    "FAIL",
                                    "certificate",
                                    format!("{detail}: EXPIRED; renew it"),
                                );
                            } else if days < 30 {
                                d.line("WARN", "certificate", format!("{detail}: renew it soon (a new key changes the pin: make new ready agents)"));
                            } else {
                                d.line("OK", "certificate", detail);
                            }
                        }
                        Err(e) => d.line(
                            "FAIL",
                            "certificate",
                            format!("{}: unreadable ({e})", p.display()),
                        ),
                    }
                }
                Ok(_) => d.line(
                    "FAIL",
                    "certificate",
                    format!("{}: no certificate in it", p.display()),
                ),
                Err(e) => d.line("FAIL", "certificate", e),
            }
        }
    }

    // Database (a SQLite file is opened only if it exists: the doctor makes nothing).
    match &cfg.store {
        tandem_relay_server::store::StoreLocation::Sqlite(db) => {
            if !dir_ok || !db.exists() {
                d.line(
                    "WARN",
                    "database",
                    format!("{} does not exist yet", db.display()),
                );
            } else {
                match Store::open_at(&cfg.store).and_then(|s| s.list_technicians()) {
                    Ok(t) => d.line(
                        "OK",
                        "database",
                        format!("{} ({} technicians)", db.display(), t.len()),
                    ),
                    Err(e) => d.line("FAIL", "database", format!("{}: {e}", db.display())),
                }
            }
        }
        tandem_relay_server::store::StoreLocation::Postgres(pg) => {
            match Store::open_at(&cfg.store).and_then(|s| s.list_technicians()) {
                Ok(t) => d.line(
                    "OK",
                    "database",
                    format!(
                        "{pg} answers ({} technicians), node {:?}",
                        t.len(),
                        cfg.node
                    ),
                ),
                Err(e) => d.line("FAIL", "database", e),
            }
        }
    }

    // Ports: free, or held by this relay (it answers /health).
    let running = health_quiet(cfg);
    match std::net::UdpSocket::bind(cfg.listen) {
        Ok(_) => d.line(
            "OK",
            "UDP",
            format!("{} free (the relay is not running)", cfg.listen),
        ),
        Err(_) if running => d.line("OK", "UDP", format!("{} served by this relay", cfg.listen)),
        Err(e) => d.line(
            "FAIL",
            "UDP",
            format!(
                "{} cannot be used ({e}): another program holds it?",
                cfg.listen
            ),
        ),
    }
    for a in &cfg.tcp.listen {
        match std::net::TcpListener::bind(a) {
            Ok(_) => d.line("OK", "TCP", format!("{a} free (the relay is not running)")),
            Err(_) if running => d.line("OK", "TCP", format!("{a} served by this relay")),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => d.line(
                "FAIL",
                "TCP",
                format!("{a}: not allowed ({e}); ports below 1024 need CAP_NET_BIND_SERVICE"),
            ),
            Err(e) => d.line(
                "FAIL",
                "TCP",
                format!("{a} cannot be used ({e}): another program holds it?"),
            ),
        }
    }
    if running {
        d.line("OK", "health", "the running relay answers /health");
    }

    // Clock: technicians' certificates and revocation lists are checked against it.
    match clock_synchronized() {
        Some(true) => d.line("OK", "clock", "synchronised (NTP)"),
        Some(false) => d.line(
            "WARN",
            "clock",
            "not synchronised: turn on NTP (timedatectl set-ntp true); certificates are checked against it",
        ),
        None => d.line("WARN", "clock", "cannot tell whether the clock is synchronised (no timedatectl)"),
    }

    println!();
    if d.failed > 0 {
        bail!(
            "{} problem(s) above need fixing ({} warning(s))",
            d.failed,
            d.warned
        );
    }
    println!("Summary: no problems ({} warning(s))", d.warned);
    Ok(())
}

/// Whether the relay of this configuration answers /health (quietly).
fn health_quiet(cfg: &Config) -> bool {
    health_addr(cfg).is_some_and(|addr| {
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1)).is_ok()
    })
}

/// Where this configuration's relay answers /health from this machine (a wildcard listen
/// address is reached on loopback); `None` when metrics are off.
fn health_addr(cfg: &Config) -> Option<std::net::SocketAddr> {
    let mut addr = cfg.metrics_listen?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Some(addr)
}

/// NTP synchronisation as systemd reports it; `None` when it cannot be asked.
fn clock_synchronized() -> Option<bool> {
    let out = std::process::Command::new("timedatectl")
        .args(["show", "-p", "NTPSynchronized", "--value"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// `tandem-relay health`.
fn health(cfg: &Config) -> Result<()> {
    use std::io::{Read, Write};
    let addr = health_addr(cfg).context(
        "metrics and health are switched off (metrics_listen = \"off\"); nothing to ask",
    )?;
    let timeout = std::time::Duration::from_secs(3);
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("no relay answers on {addr} (is it running?)"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .with_context(|| format!("cannot ask {addr}"))?;
    let mut reply = Vec::new();
    s.take(64 * 1024)
        .read_to_end(&mut reply)
        .with_context(|| format!("no answer from {addr}"))?;
    let reply = String::from_utf8_lossy(&reply);
    let status = reply.lines().next().unwrap_or_default();
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim();
    if status.split_whitespace().nth(1) == Some("200") {
        println!("{body}");
        Ok(())
    } else {
        bail!("the relay on {addr} is not serving: {status} {body}")
    }
}

/// `tandem-relay agent-bundle`.
fn agent_bundle(cfg: &Config, args: BundleArgs) -> Result<()> {
    let port = cfg.listen.port();
    let address = match args.address {
        Some(a) => a,
        None => match cfg.names.first() {
            Some(n) if n.contains(':') && !n.starts_with('[') => format!("[{n}]:{port}"),
            Some(n) => format!("{n}:{port}"),
            None => bail!(
                "which address do your users' agents reach this relay at? Give --address \
                 relay.example.com:{port} (or set names = [\"relay.example.com\"] in the \
                 relay's configuration)"
            ),
        },
    };
    // A cluster's nodes: HOST:PORT,HOST:PORT,… (agents try them in order; the first is the
    // preferred node and names the TCP targets below).
    let mut hosts = Vec::new();
    for one in address.split(',').map(str::trim) {
        hosts.push(split_address(one).with_context(|| {
            format!(
                "--address {one:?} is not HOST:PORT (for example relay.example.com:{port}; a \
                 cluster's nodes separated by commas)"
            )
        })?);
    }
    let address = address
        .split(',')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(",");
    let first = address.split(',').next().unwrap_or(&address).to_string();
    let host = hosts.swap_remove(0);
    let agent = match args.agent {
        Some(p) => p,
        None => default_agent_program().context(
            "no tandem-agent program found next to tandem-relay or in /usr/bin: install the \
             tandem-agent package or give --agent PATH",
        )?,
    };
    let org = match args.org {
        Some(o) => Some(o),
        None if cfg.device_organisations.len() == 1 => cfg.device_organisations.first().cloned(),
        None => None,
    };
    if let Some(o) = &org {
        tandem_org::OrgPublic::from_text(o).with_context(
            || "--org is not an organisation key (tandem-org-v1:…, from `tandem-org init`)",
        )?;
    }
    let identity = cfg.identity()?;
    let pin = identity.fingerprint();
    // TCP fronts on other ports than the UDP one (the agent tries the UDP port and 443 itself).
    let tcp: Vec<toml::Value> = cfg
        .tcp
        .listen
        .iter()
        .map(|a| a.port())
        .filter(|p| *p != port)
        .map(|p| format!("{}:{p}", host_for_port(&first, &host)).into())
        .collect();
    let mut table = toml::Table::new();
    table.insert("relay".into(), address.clone().into());
    table.insert("relay_pin".into(), pin.to_string().into());
    if !tcp.is_empty() {
        table.insert("relay_tcp".into(), toml::Value::Array(tcp));
    }
    if let Some(o) = &org {
        table.insert("org".into(), o.clone().into());
    }
    let mut config = format!(
        "# A ready agent for the Tandem relay at {address}, made by `tandem-relay agent-bundle`.\n{}",
        toml::to_string(&table).context("cannot write the agent's configuration")?
    );
    if let Some(extra) = &args.extra {
        let text = std::fs::read_to_string(extra)
            .with_context(|| format!("cannot read {}", extra.display()))?;
        let table: toml::Table = text
            .parse()
            .with_context(|| format!("{} is not valid TOML", extra.display()))?;
        for k in ["relay", "relay_pin", "relay_ca", "org"] {
            if table.contains_key(k) {
                bail!(
                    "{} sets {k}, which agent-bundle writes itself; remove it from the file",
                    extra.display()
                );
            }
        }
        // Top-level keys first would land inside the last table of the generated part: there is
        // none, so the file is appended as it is.
        config.push_str("\n# From ");
        config.push_str(&extra.display().to_string());
        config.push('\n');
        config.push_str(&text);
        if !text.ends_with('\n') {
            config.push('\n');
        }
    }
    config
        .parse::<toml::Table>()
        .context("the agent settings do not combine (a key given twice?)")?;
    let out = args.out.unwrap_or_else(|| {
        let safe: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        PathBuf::from(format!("tandem-agent-{safe}"))
    });
    tandem_bundle::write_file(&agent, &config, &out).context("cannot make the ready agent")?;
    let sha = tandem_bundle::file_sha256(&out).context("cannot hash the ready agent")?;
    println!("Ready agent written to {}", out.display());
    println!("  relay:   {address}");
    println!("  pin:     {pin}");
    match &org {
        Some(o) => println!(
            "  org key: {}",
            tandem_org::OrgPublic::from_text(o)
                .map(|o| o.fingerprint())
                .unwrap_or_default()
        ),
        None => println!("  org key: none (technicians are checked by the relay only)"),
    }
    println!("  SHA-256: {sha}");
    println!();
    println!("Give your users this file (publish the SHA-256 beside it). They run it; nothing to");
    println!("install or type. If this relay's certificate changes, make the ready agent again.");
    if cfg.cert.is_some() {
        println!(
            "Note: the relay uses your own certificate (--cert): when it is renewed with a new key,\n\
             the pin changes and ready agents made before stop connecting."
        );
    }
    Ok(())
}

/// The host of HOST:PORT or [IPv6]:PORT.
fn split_address(address: &str) -> Option<String> {
    let (host, port) = address.rsplit_once(':')?;
    port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let host = match host.strip_prefix('[') {
        Some(h) => h.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    (!host.is_empty() && !host.contains(char::is_whitespace)).then(|| host.to_string())
}

/// `address`'s host in a form that takes a `:port` (IPv6 in brackets).
fn host_for_port(address: &str, host: &str) -> String {
    if address.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn default_agent_program() -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("tandem-agent")));
    beside
        .into_iter()
        .chain([PathBuf::from("/usr/bin/tandem-agent")])
        .find(|p| p.is_file())
}

fn init_logging(format: &str) -> Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TANDEM_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        "json" => b.json().init(),
        "text" => b.init(),
        other => bail!("unknown log format {other:?}: use text or json"),
    }
    Ok(())
}

fn open_store(cfg: &Config) -> Result<Store> {
    // Readable by the relay's user only: it holds the relay's key and the technicians' database.
    tandem_certs::create_private_dir(&cfg.data_dir)
        .with_context(|| format!("cannot create data directory {}", cfg.data_dir.display()))?;
    Store::open_at(&cfg.store)
        .map(|s| s.with_node(&cfg.node))
        .with_context(|| format!("cannot open the store {}", cfg.store))
}

/// `tandem-relay store …`.
fn store_cmd(cfg: &Config, cmd: StoreCmd) -> Result<()> {
    match cmd {
        StoreCmd::Status => {
            let store = open_store(cfg)?;
            store.ping().context("the store does not answer")?;
            let technicians = store.list_technicians()?.len();
            let devices = store.devices()?.len();
            println!("store:          {}", cfg.store);
            println!("engine:         {}", store.engine());
            println!("node:           {}", cfg.node);
            println!(
                "schema version: {} (this relay writes {})",
                store.schema_version()?,
                tandem_relay_server::store::SCHEMA_VERSION
            );
            println!("technicians:    {technicians}");
            println!("devices:        {devices}");
            Ok(())
        }
        StoreCmd::Copy { from } => {
            let src_loc =
                tandem_relay_server::store::StoreLocation::parse(&from, cfg.store_ca.clone())
                    .context("invalid --from")?;
            if src_loc.to_string() == cfg.store.to_string() {
                bail!("--from is the configured store itself; give the store to copy from");
            }
            if let tandem_relay_server::store::StoreLocation::Sqlite(p) = &src_loc
                && !p.exists()
            {
                bail!("{} does not exist", p.display());
            }
            let src = Store::open_at(&src_loc)
                .with_context(|| format!("cannot open the store to copy from, {src_loc}"))?;
            let mut dst = open_store(cfg)?;
            let report = dst
                .copy_from(&src)
                .with_context(|| format!("cannot copy {src_loc} into {}", cfg.store))?;
            println!(
                "copied {} organisations, {} technicians, {} audit rows and {} devices from {src_loc} into {}",
                report.organisations,
                report.technicians,
                report.sessions,
                report.devices,
                cfg.store
            );
            println!("technicians' tokens keep working; point every relay node at the new store");
            Ok(())
        }
    }
}

fn serve(cfg: Config) -> Result<()> {
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        let identity = cfg.identity()?;
        let fp = identity.fingerprint();
        println!("Tandem relay {}", env!("CARGO_PKG_VERSION"));
        println!("  data directory:  {}", cfg.data_dir.display());
        println!("  certificate:     {}", identity.chain_path.display());
        println!("  fingerprint:     {fp}");
        println!("  pin it with:     --relay-pin {fp}");
        if let Some(ca) = &identity.ca_path {
            println!("  or trust the CA: --relay-ca {}", ca.display());
        }
        let server_cfg = cfg.server_config()?;
        let handle = tandem_relay_server::start(server_cfg, &identity)
            .await
            .context("cannot start the relay")?;
        println!("  listening on:    {} (UDP)", handle.addr());
        for a in handle.tcp_addrs() {
            match &cfg.tcp.websocket_path {
                Some(p) => println!("                   {a} (TCP: TLS, and WebSocket at {p})"),
                None => println!("                   {a} (TCP: TLS)"),
            }
        }
        if let Some(m) = handle.metrics_addr() {
            println!("  metrics:         http://{m}/metrics  health: http://{m}/health");
        }
        wait_for_signal().await?;
        handle.shutdown().await;
        Ok(())
    })
}

async fn wait_for_signal() -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    Ok(())
}

fn technician(cfg: &Config, cmd: TechCmd) -> Result<()> {
    let mut store = open_store(cfg)?;
    match cmd {
        TechCmd::Add { org, name } => {
            let (row, token) = store.add_technician(&org, &name)?;
            println!(
                "added technician {:?} (id {}) of {:?}",
                row.name, row.id, row.organisation
            );
            println!("token (shown once; store it in the console): {token}");
        }
        TechCmd::List { json } => {
            let rows = store.list_technicians()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:>4}  {:<24} {:<24} {:<8} {:<20} {:<20}",
                    "id", "name", "organisation", "state", "created", "last login"
                );
                for r in rows {
                    println!(
                        "{:>4}  {:<24} {:<24} {:<8} {:<20} {:<20}",
                        r.id,
                        r.name,
                        r.organisation,
                        if r.disabled { "disabled" } else { "active" },
                        fmt_secs(r.created_at),
                        r.last_login_at
                            .map(fmt_secs)
                            .unwrap_or_else(|| "never".into())
                    );
                }
            }
        }
        TechCmd::Disable { who, org } => {
            let t = store.find_technician(&who, org.as_deref())?;
            store.set_disabled(t.id, true)?;
            println!("disabled technician {:?} of {:?}", t.name, t.organisation);
        }
        TechCmd::Enable { who, org } => {
            let t = store.find_technician(&who, org.as_deref())?;
            store.set_disabled(t.id, false)?;
            println!("enabled technician {:?} of {:?}", t.name, t.organisation);
        }
        TechCmd::RotateToken { who, org } => {
            let t = store.find_technician(&who, org.as_deref())?;
            let token = store.rotate_token(t.id)?;
            println!(
                "new token for {:?} of {:?} (shown once): {token}",
                t.name, t.organisation
            );
        }
    }
    Ok(())
}

fn fmt_secs(s: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn fmt_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Text a device chose about itself (checked, but arbitrary), made safe for a terminal: control and
/// bidirectional-formatting characters become `?`, at most 40 characters.
fn shown(s: &str) -> String {
    s.chars()
        .map(|c| {
            let bidi = matches!(c, '\u{200E}' | '\u{200F}' | '\u{061C}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi { '?' } else { c }
        })
        .take(40)
        .collect()
}

fn devices(cfg: &Config, cmd: DeviceCmd) -> Result<()> {
    let store = open_store(cfg)?;
    match cmd {
        DeviceCmd::List { json } => {
            let rows = store.devices()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            println!(
                "{:<20} {:<20} {:<16} {:<12} {:<20} {:<12} {:<8} last seen",
                "id", "name", "organisation", "group", "host", "user", "state"
            );
            for r in rows {
                println!(
                    "{:<20} {:<20} {:<16} {:<12} {:<20} {:<12} {:<8} {}",
                    r.id,
                    shown(&r.name),
                    shown(&r.organisation),
                    shown(&r.group),
                    shown(&r.hostname),
                    shown(&r.user),
                    if r.online { "online" } else { "offline" },
                    fmt_ms(r.last_seen.saturating_mul(1000))
                );
            }
        }
        DeviceCmd::Remove { id } => {
            if store.remove_device(&id)? {
                println!(
                    "device {id} forgotten (a running relay forgets it at its next start; it \
                     reappears if it comes online again, unless its key is revoked)"
                );
            } else {
                bail!("no device {id}");
            }
        }
    }
    Ok(())
}

fn audit(cfg: &Config, json: bool, limit: usize) -> Result<()> {
    let store = open_store(cfg)?;
    let rows = store.audit(limit)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:>5}  {:<20} {:<16} {:<16} {:<9} {:<21} {:<21} {:>9} {:>12} {:>12} {:>12}  ended",
        "id",
        "started",
        "technician",
        "organisation",
        "slot",
        "agent",
        "console",
        "seconds",
        "agent→con B",
        "con→agent B",
        "direct B"
    );
    for r in rows {
        let secs = r
            .ended_at_ms
            .map(|e| format!("{:.1}", (e - r.started_at_ms) as f64 / 1000.0))
            .unwrap_or_else(|| "running".into());
        println!(
            "{:>5}  {:<20} {:<16} {:<16} {:<9} {:<21} {:<21} {:>9} {:>12} {:>12} {:>12}  {}",
            r.id,
            fmt_ms(r.started_at_ms),
            r.technician,
            r.organisation,
            r.slot,
            r.agent_addr,
            r.console_addr,
            secs,
            r.bytes_agent_to_console,
            r.bytes_console_to_agent,
            if r.went_direct {
                r.bytes_direct.to_string()
            } else {
                "-".into()
            },
            r.end_reason.unwrap_or_default()
        );
    }
    Ok(())
}
