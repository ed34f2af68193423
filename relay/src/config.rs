//! The relay's configuration: a TOML file (every key optional, documented in relay/dist/relay.toml),
//! overridden by environment variables and flags.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tandem_relay_server::store::StoreLocation;
use tandem_relay_server::{Limits, ServerConfig, TcpConfig};

pub const DEFAULT_LISTEN: &str = "0.0.0.0:4433";
pub const DEFAULT_METRICS: &str = "127.0.0.1:9733";

/// A store address as given (`store = "…"`, `--store`): it may hold a password, so its `Debug`
/// shows it without one.
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct StoreUrl(pub String);

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&tandem_relay_server::store::db::redact_password(&self.0))
    }
}

/// The file, as written. Unknown keys are errors (a typo must not silently fall back to a default).
#[derive(Debug, Default, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub names: Vec<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub log_format: Option<String>,
    pub drain_timeout_secs: Option<u64>,
    /// Which path sessions may take: `auto` (agent and console go straight to each other when they
    /// can; the relay carries only what cannot) or `relay-only` (the relay tells both sides to stay
    /// on it: networks where peer-to-peer traffic is forbidden). [default: auto]
    pub path: Option<String>,
    /// Where technicians, devices and the audit log live: `sqlite:///path/relay.db` (default:
    /// relay.db in data_dir) or `postgres://user:password@host:5432/database?sslmode=require`,
    /// shared by the nodes of a cluster.
    pub store: Option<StoreUrl>,
    /// PEM file of the CA that signed the PostgreSQL server's certificate (default: the system's).
    pub store_ca: Option<PathBuf>,
    /// This relay's name among the nodes that share a PostgreSQL store (in audit and device
    /// rows). [default: the host name]
    pub node: Option<String>,
    /// With a PostgreSQL store: the address agents and consoles reach this node at (host:port),
    /// where the other nodes send the consoles of codes this node holds. [default: the first of
    /// `names` and the listen port]
    pub advertise: Option<String>,
    #[serde(default)]
    pub limits: FileLimits,
    #[serde(default)]
    pub tcp: FileTcp,
    #[serde(default)]
    pub devices: FileDevices,
}

/// `[devices]`: enrolled devices (unattended access) the relay keeps and lists.
#[derive(Debug, Default, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileDevices {
    /// Organisation keys (`tandem-org-v1:…`) whose devices this relay hosts; empty or absent:
    /// any (the relay checks every device's enrollment signature either way).
    pub organisations: Option<Vec<String>>,
    /// Devices kept at most, online or not. [default: 100000]
    pub max_known: Option<usize>,
    /// New devices (never seen before) one source address may bring per hour. [default: 600]
    pub new_per_hour_per_address: Option<u32>,
    /// Devices not seen online for this many days are forgotten. [default: 90]
    pub retention_days: Option<u64>,
}

/// `[tcp]`: the TCP front (TLS over TCP and WebSocket) for clients whose network drops UDP.
#[derive(Debug, Default, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileTcp {
    /// TCP addresses; default: the QUIC listen address (same IP and port number). `[]`: no TCP.
    pub listen: Option<Vec<String>>,
    /// Path of the WebSocket upgrade; "" switches WebSocket off.
    pub websocket_path: Option<String>,
    /// Reverse proxies whose X-Forwarded-For (the last entry of its last line, which the proxy adds) names the client.
    pub trusted_proxies: Option<Vec<String>>,
    pub max_links: Option<usize>,
    pub links_per_address: Option<usize>,
    pub handshake_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    pub max_connections: Option<usize>,
    pub max_connections_per_address: Option<usize>,
    /// Of `max_connections`, how many only authenticated technicians may hold; agents and
    /// connections not yet identified share the rest.
    pub console_reserve: Option<usize>,
    pub handshake_timeout_secs: Option<u64>,
    pub slot_ttl_secs: Option<u64>,
    pub max_sessions: Option<usize>,
    pub joins_per_minute_per_technician: Option<u32>,
    pub joins_per_minute_per_address: Option<u32>,
    pub auths_per_minute_per_address: Option<u32>,
    /// Logins that may wait for token verification; beyond it they are answered "busy, retry in
    /// N s".
    pub auth_queue: Option<usize>,
    /// New codes (registrations) per agent connection per minute.
    pub registers_per_minute_per_connection: Option<u32>,
    /// New codes per source address per minute.
    pub registers_per_minute_per_address: Option<u32>,
    /// Ended codes kept in quarantine at most (the one released first goes beyond it).
    pub max_quarantined_slots: Option<usize>,
    /// 0 = unlimited.
    pub session_bytes_per_second: Option<u64>,
    /// 0 = a lost connection ends its session at once.
    pub resume_grace_secs: Option<u64>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read configuration file {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("invalid configuration file {}", path.display()))
    }
}

/// Flags and environment (clap merges the two).
#[derive(Debug, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub names: Vec<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub log_format: Option<String>,
    /// `--tcp-listen` (repeatable); `off` switches TCP off.
    pub tcp_listen: Vec<String>,
    /// `--path`: `auto` or `relay-only`.
    pub path: Option<String>,
    pub store: Option<StoreUrl>,
    pub store_ca: Option<PathBuf>,
    pub node: Option<String>,
    pub advertise: Option<String>,
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub names: Vec<String>,
    pub cert: Option<(PathBuf, PathBuf)>,
    pub log_format: String,
    pub drain_timeout: Duration,
    pub limits: Limits,
    pub devices: tandem_relay_server::devices::DeviceLimits,
    /// The `[devices] organisations` lines as given (for print-config).
    pub device_organisations: Vec<String>,
    pub tcp: TcpConfig,
    /// Whether sessions may go direct (`path = "auto"`).
    pub allow_direct: bool,
    pub store: StoreLocation,
    /// `store_ca` as given (for print-config).
    pub store_ca: Option<PathBuf>,
    /// `store` as given, password and all (for print-config only; never logged).
    store_text: Option<StoreUrl>,
    pub node: String,
    pub advertise: Option<String>,
}

fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STATE_DIRECTORY") {
        // systemd's StateDirectory=; may hold several paths separated by ':'.
        let s = d.to_string_lossy().to_string();
        if let Some(first) = s.split(':').next() {
            return PathBuf::from(first);
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".local/share/tandem-relay");
    }
    PathBuf::from("tandem-relay-data")
}

/// This machine's host name (a node's default name); empty when it cannot be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn parse_addr(what: &str, s: &str) -> Result<SocketAddr> {
    s.parse().with_context(|| {
        format!("{what} {s:?} is not an address:port such as 0.0.0.0:4433 or [::]:4433")
    })
}

impl Config {
    pub fn resolve(file: FileConfig, o: Overrides) -> Result<Config> {
        let listen = parse_addr(
            "listen address",
            o.listen
                .as_deref()
                .or(file.listen.as_deref())
                .unwrap_or(DEFAULT_LISTEN),
        )?;
        let metrics = o
            .metrics_listen
            .as_deref()
            .or(file.metrics_listen.as_deref())
            .unwrap_or(DEFAULT_METRICS);
        let metrics_listen = if metrics == "off" || metrics.is_empty() {
            None
        } else {
            Some(parse_addr("metrics address", metrics)?)
        };
        let data_dir = o
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(default_data_dir);
        let mut names = file.names;
        names.extend(o.names);
        let cert = match (o.cert.or(file.cert), o.key.or(file.key)) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => bail!("cert and key go together: give both or neither"),
        };
        let log_format = o
            .log_format
            .or(file.log_format)
            .unwrap_or_else(|| "text".into());
        let d = Limits::default();
        let l = file.limits;
        let secs = |v: Option<u64>, dflt: Duration| v.map(Duration::from_secs).unwrap_or(dflt);
        let limits = Limits {
            max_connections: l.max_connections.unwrap_or(d.max_connections),
            max_connections_per_address: l
                .max_connections_per_address
                .unwrap_or(d.max_connections_per_address),
            console_reserve: l.console_reserve.unwrap_or(d.console_reserve),
            handshake_timeout: secs(l.handshake_timeout_secs, d.handshake_timeout),
            slot_ttl: secs(l.slot_ttl_secs, d.slot_ttl),
            max_sessions: l.max_sessions.unwrap_or(d.max_sessions),
            joins_per_minute_per_technician: l
                .joins_per_minute_per_technician
                .unwrap_or(d.joins_per_minute_per_technician),
            joins_per_minute_per_address: l
                .joins_per_minute_per_address
                .unwrap_or(d.joins_per_minute_per_address),
            auths_per_minute_per_address: l
                .auths_per_minute_per_address
                .unwrap_or(d.auths_per_minute_per_address),
            auth_queue: l.auth_queue.unwrap_or(d.auth_queue),
            registers_per_minute_per_connection: l
                .registers_per_minute_per_connection
                .unwrap_or(d.registers_per_minute_per_connection),
            registers_per_minute_per_address: l
                .registers_per_minute_per_address
                .unwrap_or(d.registers_per_minute_per_address),
            max_quarantined_slots: l.max_quarantined_slots.unwrap_or(d.max_quarantined_slots),
            session_bytes_per_second: l.session_bytes_per_second.filter(|v| *v > 0),
            resume_grace: secs(l.resume_grace_secs, d.resume_grace),
        };
        if limits.handshake_timeout.is_zero() || limits.slot_ttl.is_zero() {
            bail!("limits.handshake_timeout_secs and limits.slot_ttl_secs must be at least 1");
        }
        for (name, v) in [
            (
                "joins_per_minute_per_technician",
                limits.joins_per_minute_per_technician,
            ),
            (
                "joins_per_minute_per_address",
                limits.joins_per_minute_per_address,
            ),
            (
                "auths_per_minute_per_address",
                limits.auths_per_minute_per_address,
            ),
            (
                "registers_per_minute_per_connection",
                limits.registers_per_minute_per_connection,
            ),
            (
                "registers_per_minute_per_address",
                limits.registers_per_minute_per_address,
            ),
        ] {
            if v == 0 {
                bail!("limits.{name} must be at least 1");
            }
        }
        if limits.auth_queue == 0 {
            bail!("limits.auth_queue must be at least 1");
        }
        if limits.console_reserve >= limits.max_connections {
            bail!("limits.console_reserve must be less than limits.max_connections");
        }
        let tcp = resolve_tcp(listen, &file.tcp, &o.tcp_listen, &limits)?;
        let dd = tandem_relay_server::devices::DeviceLimits::default();
        let fd = &file.devices;
        let device_organisations = fd.organisations.clone().unwrap_or_default();
        let mut organisations = Vec::new();
        for line in &device_organisations {
            let org = tandem_org::OrgPublic::from_text(line).with_context(|| {
                "invalid [devices] organisations entry: copy the whole `tandem-org-v1:…` line \
                 from `tandem-org show`"
            })?;
            organisations.push(org.key);
        }
        let devices = tandem_relay_server::devices::DeviceLimits {
            max_known: fd.max_known.unwrap_or(dd.max_known),
            new_per_hour_per_address: fd
                .new_per_hour_per_address
                .unwrap_or(dd.new_per_hour_per_address),
            retention: fd
                .retention_days
                .map(|d| Duration::from_secs(d.saturating_mul(24 * 3600)))
                .unwrap_or(dd.retention),
            organisations,
        };
        if devices.max_known == 0 || devices.new_per_hour_per_address == 0 {
            bail!("devices.max_known and devices.new_per_hour_per_address must be at least 1");
        }
        let allow_direct = match o.path.as_deref().or(file.path.as_deref()).map(str::trim) {
            None | Some("") | Some("auto") => true,
            Some("relay-only") => false,
            Some(other) => bail!("path {other:?}: use auto or relay-only"),
        };
        let store_ca = o.store_ca.or(file.store_ca);
        let store_text = o.store.or(file.store).filter(|s| !s.0.trim().is_empty());
        let store = match &store_text {
            Some(s) => StoreLocation::parse(&s.0, store_ca.clone()).context("invalid store")?,
            None => StoreLocation::in_data_dir(&data_dir),
        };
        let node = match o.node.or(file.node) {
            Some(n) => n.trim().to_string(),
            None => host_name(),
        };
        if node.len() > 64 || node.chars().any(|c| c.is_control()) {
            bail!("node {node:?}: at most 64 printable characters");
        }
        let advertise = match o.advertise.or(file.advertise) {
            Some(a) => Some(a.trim().to_string()),
            None if store.is_postgres() => names.first().map(|n| format!("{n}:{}", listen.port())),
            None => None,
        };
        if let Some(a) = &advertise {
            let ok = a
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
                && a.len() <= 200
                && a.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                bail!("advertise {a:?}: give host:port, the address clients reach this node at");
            }
        }
        Ok(Config {
            store,
            store_ca,
            store_text,
            node,
            advertise,
            allow_direct,
            listen,
            metrics_listen,
            data_dir,
            names,
            cert,
            log_format,
            drain_timeout: Duration::from_secs(file.drain_timeout_secs.unwrap_or(3)),
            limits,
            tcp,
            devices,
            device_organisations,
        })
    }

    /// The relay's TLS identity: the MSP's own chain, or the generated one (created on first use).
    pub fn identity(&self) -> Result<tandem_certs::RelayIdentity> {
        match &self.cert {
            Some((c, k)) => tandem_certs::load_identity(c, k)
                .context("cannot load the relay certificate given by cert/key"),
            None => tandem_certs::ensure_identity(&self.data_dir, &self.names).with_context(|| {
                format!(
                    "cannot create or load the relay certificate in {}",
                    self.data_dir.display()
                )
            }),
        }
    }

    pub fn server_config(&self) -> Result<ServerConfig> {
        Ok(ServerConfig {
            listen: self.listen,
            metrics_listen: self.metrics_listen,
            data_dir: self.data_dir.clone(),
            limits: self.limits.clone(),
            drain_timeout: self.drain_timeout,
            tcp: self.tcp.clone(),
            devices: self.devices.clone(),
            allow_direct: self.allow_direct,
            store: self.store.clone(),
            node: self.node.clone(),
            advertise: self.advertise.clone(),
        })
    }

    /// The effective configuration in the file's format.
    pub fn to_toml(&self) -> Result<String> {
        let l = &self.limits;
        let f = FileConfig {
            listen: Some(self.listen.to_string()),
            metrics_listen: Some(
                self.metrics_listen
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "off".into()),
            ),
            data_dir: Some(self.data_dir.clone()),
            names: self.names.clone(),
            cert: self.cert.as_ref().map(|c| c.0.clone()),
            key: self.cert.as_ref().map(|c| c.1.clone()),
            log_format: Some(self.log_format.clone()),
            drain_timeout_secs: Some(self.drain_timeout.as_secs()),
            path: Some(
                if self.allow_direct {
                    "auto"
                } else {
                    "relay-only"
                }
                .into(),
            ),
            limits: FileLimits {
                max_connections: Some(l.max_connections),
                max_connections_per_address: Some(l.max_connections_per_address),
                console_reserve: Some(l.console_reserve),
                handshake_timeout_secs: Some(l.handshake_timeout.as_secs()),
                slot_ttl_secs: Some(l.slot_ttl.as_secs()),
                max_sessions: Some(l.max_sessions),
                joins_per_minute_per_technician: Some(l.joins_per_minute_per_technician),
                joins_per_minute_per_address: Some(l.joins_per_minute_per_address),
                auths_per_minute_per_address: Some(l.auths_per_minute_per_address),
                auth_queue: Some(l.auth_queue),
                registers_per_minute_per_connection: Some(l.registers_per_minute_per_connection),
                registers_per_minute_per_address: Some(l.registers_per_minute_per_address),
                max_quarantined_slots: Some(l.max_quarantined_slots),
                session_bytes_per_second: Some(l.session_bytes_per_second.unwrap_or(0)),
                resume_grace_secs: Some(l.resume_grace.as_secs()),
            },
            tcp: FileTcp {
                listen: Some(self.tcp.listen.iter().map(|a| a.to_string()).collect()),
                websocket_path: Some(self.tcp.websocket_path.clone().unwrap_or_default()),
                trusted_proxies: Some(
                    self.tcp
                        .trusted_proxies
                        .iter()
                        .map(|a| a.to_string())
                        .collect(),
                ),
                max_links: Some(self.tcp.max_links),
                links_per_address: Some(self.tcp.links_per_address),
                handshake_timeout_secs: Some(self.tcp.handshake_timeout.as_secs()),
            },
            // The password (if the address has one) is not printed.
            store: Some(StoreUrl(match &self.store_text {
                Some(t) => tandem_relay_server::store::db::redact_password(&t.0),
                None => self.store.to_string(),
            })),
            store_ca: self.store_ca.clone(),
            node: Some(self.node.clone()),
            advertise: self.advertise.clone(),
            devices: FileDevices {
                organisations: Some(self.device_organisations.clone()),
                max_known: Some(self.devices.max_known),
                new_per_hour_per_address: Some(self.devices.new_per_hour_per_address),
                retention_days: Some(self.devices.retention.as_secs() / (24 * 3600)),
            },
        };
        Ok(toml::to_string_pretty(&f)?)
    }
}

/// The TCP front from `[tcp]` and `--tcp-listen`: by default on the QUIC address's IP and port
/// number; links per address as many as QUIC connections per address.
fn resolve_tcp(
    quic: SocketAddr,
    file: &FileTcp,
    flags: &[String],
    limits: &Limits,
) -> Result<TcpConfig> {
    let d = TcpConfig::default();
    let listen_strings: Vec<String> = if !flags.is_empty() {
        flags.to_vec()
    } else if let Some(l) = &file.listen {
        l.clone()
    } else {
        vec![quic.to_string()]
    };
    let mut listen = Vec::new();
    for s in listen_strings {
        if s == "off" {
            listen.clear();
            break;
        }
        listen.push(parse_addr("tcp listen address", &s)?);
    }
    let websocket_path = match file.websocket_path.as_deref() {
        None => d.websocket_path,
        Some("") => None,
        Some(p) if p.starts_with('/') => Some(p.to_string()),
        Some(p) => bail!("tcp.websocket_path {p:?} must start with /"),
    };
    let mut trusted_proxies = Vec::new();
    for p in file.trusted_proxies.iter().flatten() {
        trusted_proxies.push(p.parse().with_context(|| {
            format!("tcp.trusted_proxies: {p:?} is not an IP address such as 127.0.0.1")
        })?);
    }
    let tcp = TcpConfig {
        listen,
        websocket_path,
        trusted_proxies,
        max_links: file.max_links.unwrap_or(limits.max_connections),
        links_per_address: file
            .links_per_address
            .unwrap_or(limits.max_connections_per_address),
        handshake_timeout: file
            .handshake_timeout_secs
            .map(Duration::from_secs)
            .unwrap_or(d.handshake_timeout),
        idle_timeout: d.idle_timeout,
    };
    if tcp.max_links == 0 || tcp.links_per_address == 0 || tcp.handshake_timeout.is_zero() {
        bail!(
            "tcp.max_links, tcp.links_per_address and tcp.handshake_timeout_secs must be at least 1"
        );
    }
    Ok(tcp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_file_and_overrides() {
        let c = Config::resolve(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.limits.slot_ttl, Duration::from_secs(600));
        let file: FileConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:5000"
            metrics_listen = "off"
            [limits]
            slot_ttl_secs = 60
            session_bytes_per_second = 0
            "#,
        )
        .unwrap();
        let c = Config::resolve(
            file,
            Overrides {
                listen: Some("127.0.0.1:6000".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(c.listen.port(), 6000, "flag wins over file");
        assert_eq!(c.metrics_listen, None);
        assert_eq!(c.limits.slot_ttl, Duration::from_secs(60));
        assert_eq!(c.limits.session_bytes_per_second, None);
        // The printed configuration reads back.
        let again: FileConfig = toml::from_str(&c.to_toml().unwrap()).unwrap();
        assert_eq!(again.listen.as_deref(), Some("127.0.0.1:6000"));
    }

    #[test]
    fn devices_section() {
        let key = tandem_org::KeyPair::generate().unwrap();
        let org = tandem_org::OrgPublic::new("ACME IT", key.public()).unwrap();
        let file: FileConfig = toml::from_str(&format!(
            "[devices]\norganisations = [\"{}\"]\nmax_known = 50\nretention_days = 7\n",
            org.to_text()
        ))
        .unwrap();
        let c = Config::resolve(file, Overrides::default()).unwrap();
        assert_eq!(c.devices.organisations, vec![key.public()]);
        assert_eq!(c.devices.max_known, 50);
        assert_eq!(c.devices.retention, Duration::from_secs(7 * 24 * 3600));
        let again: FileConfig = toml::from_str(&c.to_toml().unwrap()).unwrap();
        assert_eq!(again.devices.max_known, Some(50));
        let bad: FileConfig =
            toml::from_str("[devices]\norganisations = [\"tandem-org-v1:nonsense\"]").unwrap();
        let e = Config::resolve(bad, Overrides::default()).unwrap_err();
        assert!(format!("{e:#}").contains("tandem-org show"), "{e:#}");
    }

    #[test]
    fn typos_and_bad_values_are_errors() {
        assert!(toml::from_str::<FileConfig>("lisen = \"x\"").is_err());
        assert!(toml::from_str::<FileConfig>("[limits]\nmax_conections = 1").is_err());
        let bad = FileConfig {
            listen: Some("nonsense".into()),
            ..FileConfig::default()
        };
        let e = Config::resolve(bad, Overrides::default()).unwrap_err();
        assert!(format!("{e:#}").contains("nonsense"));
        for bad in [
            "joins_per_minute_per_address = 0",
            "registers_per_minute_per_address = 0",
            "auth_queue = 0",
            "max_connections = 100\nconsole_reserve = 100",
        ] {
            let zero: FileConfig = toml::from_str(&format!("[limits]\n{bad}")).unwrap();
            assert!(
                Config::resolve(zero, Overrides::default()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn tcp_front_defaults_and_overrides() {
        let c = Config::resolve(FileConfig::default(), Overrides::default()).unwrap();
        assert_eq!(
            c.tcp.listen,
            vec![c.listen],
            "TCP on the QUIC address by default"
        );
        assert_eq!(c.tcp.websocket_path.as_deref(), Some("/tandem"));
        let file: FileConfig = toml::from_str(
            r#"
            listen = "0.0.0.0:4433"
            [tcp]
            listen = ["0.0.0.0:4433", "[::]:443"]
            websocket_path = ""
            trusted_proxies = ["127.0.0.1", "::1"]
            "#,
        )
        .unwrap();
        let c = Config::resolve(file.clone(), Overrides::default()).unwrap();
        assert_eq!(c.tcp.listen.len(), 2);
        assert_eq!(c.tcp.websocket_path, None);
        assert_eq!(c.tcp.trusted_proxies.len(), 2);
        let again: FileConfig = toml::from_str(&c.to_toml().unwrap()).unwrap();
        let c2 = Config::resolve(again, Overrides::default()).unwrap();
        assert_eq!(c2.tcp.listen, c.tcp.listen);
        assert_eq!(c2.tcp.websocket_path, None);
        let off = Config::resolve(
            file,
            Overrides {
                tcp_listen: vec!["off".into()],
                ..Overrides::default()
            },
        )
        .unwrap();
        assert!(off.tcp.listen.is_empty());
        let bad: FileConfig = toml::from_str("[tcp]\ntrusted_proxies = [\"nginx\"]").unwrap();
        assert!(Config::resolve(bad, Overrides::default()).is_err());
        let bad: FileConfig = toml::from_str("[tcp]\nwebsocket_path = \"tandem\"").unwrap();
        assert!(Config::resolve(bad, Overrides::default()).is_err());
    }

    #[test]
    fn a_cluster_nodes_store_and_address() {
        let file: FileConfig = toml::from_str(
            "store = \"postgres://tandem:hunter2@127.0.0.1:5432/tandem\"\nnames = [\"relay1.example.com\"]\nnode = \"relay-1\"",
        )
        .unwrap();
        let c = Config::resolve(file.clone(), Overrides::default()).unwrap();
        assert!(c.store.is_postgres());
        assert_eq!(c.node, "relay-1");
        // The advertised address defaults to the first name and the listen port.
        assert_eq!(c.advertise.as_deref(), Some("relay1.example.com:4433"));
        // print-config never shows the password.
        let shown = c.to_toml().unwrap();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("postgres://tandem:…@127.0.0.1:5432/tandem"),
            "{shown}"
        );
        let bad = Overrides {
            advertise: Some("relay1.example.com".into()),
            ..Overrides::default()
        };
        assert!(
            Config::resolve(file, bad).is_err(),
            "advertise needs a port"
        );
        // A remote database without TLS is refused.
        let remote: FileConfig =
            toml::from_str("store = \"postgres://tandem@db.example.com/tandem\"").unwrap();
        let e = Config::resolve(remote, Overrides::default()).unwrap_err();
        assert!(format!("{e:#}").contains("sslmode=require"), "{e:#}");
        // The default stays SQLite in the data directory.
        let lone = Config::resolve(FileConfig::default(), Overrides::default()).unwrap();
        assert!(!lone.store.is_postgres());
        assert_eq!(lone.advertise, None);
    }

    #[test]
    fn shipped_example_config_parses() {
        let text = include_str!("../dist/relay.toml");
        let f: FileConfig = toml::from_str(text).unwrap();
        Config::resolve(f, Overrides::default()).unwrap();
    }
}
