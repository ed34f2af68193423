//! The two database engines behind [`super::Store`]: SQLite (embedded, the default) and PostgreSQL
//! (shared by the nodes of a cluster). The store's queries are written once, in the SQL both
//! engines understand (`INSERT … ON CONFLICT`, `RETURNING`), with `?N` placeholders that become
//! `$N` for PostgreSQL; only the schema differs ([`super::SQLITE_MIGRATIONS`],
//! [`super::POSTGRES_MIGRATIONS`]). Rows come back as owned [`Row`]s of a few value kinds, read by
//! position.
//!
//! PostgreSQL is driven by `tokio-postgres` from the blocking threads that use the store (the
//! relay's verification threads and audit writer, or an admin command's main thread): each call is
//! `block_on` on the relay's runtime (or on a small runtime of the store's own when there is none),
//! bounded by [`PG_CALL_TIMEOUT`]. A connection that broke (the database restarted) is replaced at
//! the next call, and a call that failed on a connection that had served earlier calls is tried
//! once more on the new one.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::StoreError;

/// Longest a single database call may take before the connection is dropped and the call fails
/// as "unavailable" (a store on the other side of a dead network must not hang a relay thread).
pub const PG_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection attempt may take.
const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the store lives (`store = "…"` in relay.toml).
#[derive(Clone)]
pub enum StoreLocation {
    /// The SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL database shared by relay nodes.
    Postgres(Box<PgLocation>),
}

/// A PostgreSQL address (`postgres://user:password@host:port/database?sslmode=require`) and the CA
/// its server certificate is checked against. The URL may hold a password: it is never shown;
/// `Display` and `Debug` print it without one.
#[derive(Clone)]
pub struct PgLocation {
    config: tokio_postgres::Config,
    ca: Option<PathBuf>,
}

impl StoreLocation {
    /// The default: `relay.db` in the data directory.
    pub fn in_data_dir(data_dir: &Path) -> Self {
        StoreLocation::Sqlite(data_dir.join(super::DB_FILE))
    }

    /// Parses `sqlite:///path/relay.db`, `sqlite:relative/relay.db` or
    /// `postgres://…` / `postgresql://…`. `ca`: PEM file of the CA that signed the PostgreSQL
    /// server's certificate (otherwise the system's roots).
    ///
    /// Decision: a PostgreSQL server that is not on this machine (loopback or a Unix socket) must
    /// be reached with `sslmode=require`; the relay refuses to send technicians' token hashes and
    /// the audit log over the network in clear, and never falls back from TLS. With TLS, the
    /// server's certificate and name are always verified (what libpq calls `verify-full`).
    pub fn parse(s: &str, ca: Option<PathBuf>) -> Result<Self, StoreError> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(StoreError::BadLocation(
                    "sqlite: needs a file, e.g. sqlite:///var/lib/tandem-relay/relay.db".into(),
                ));
            }
            return Ok(StoreLocation::Sqlite(PathBuf::from(path)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            let config: tokio_postgres::Config = s.parse().map_err(|e| {
                StoreError::BadLocation(format!("not a PostgreSQL address ({e}); expected postgres://user:password@host:5432/database?sslmode=require"))
            })?;
            if config.get_hosts().is_empty() {
                return Err(StoreError::BadLocation(
                    "the PostgreSQL address names no host".into(),
                ));
            }
            let loc = PgLocation { config, ca };
            if !loc.is_local()
                && loc.config.get_ssl_mode() != tokio_postgres::config::SslMode::Require
            {
                return Err(StoreError::BadLocation(format!(
                    "the PostgreSQL server {} is not on this machine: add ?sslmode=require to the address (and store_ca = \"…\" if its certificate is not signed by a CA this system trusts)",
                    loc.hosts()
                )));
            }
            return Ok(StoreLocation::Postgres(Box::new(loc)));
        }
        Err(StoreError::BadLocation(format!(
            "unknown store {:?}: use sqlite:///path/relay.db or postgres://user@host/database",
            redact_password(s)
        )))
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, StoreLocation::Postgres(_))
    }

    /// `sqlite` or `postgres` (metrics, health).
    pub fn engine(&self) -> &'static str {
        match self {
            StoreLocation::Sqlite(_) => "sqlite",
            StoreLocation::Postgres(_) => "postgres",
        }
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Sqlite(p) => write!(f, "sqlite://{}", p.display()),
            StoreLocation::Postgres(p) => p.fmt(f),
        }
    }
}
impl fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An address as given, with any password (in the user part or as `password=` among the
/// parameters) replaced by `…`.
pub fn redact_password(s: &str) -> String {
    let s = &redact_param(s);
    match (s.find("://"), s.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme && s[scheme + 3..at].contains(':') => {
            let userinfo = &s[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:…{}", &s[..scheme + 3], &s[at..])
        }
        _ => s.to_string(),
    }
}

/// `password=…` among a URL's query parameters (or key=value words) replaced by `password=…`.
fn redact_param(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.to_ascii_lowercase().find("password=") {
        out.push_str(&rest[..i + "password=".len()]);
        out.push('…');
        let after = &rest[i + "password=".len()..];
        let end = after.find(['&', ' ']).unwrap_or(after.len());
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

impl PgLocation {
    fn hosts(&self) -> String {
        use tokio_postgres::config::Host;
        let ports = self.config.get_ports();
        self.config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                match h {
                    Host::Tcp(name) => format!("{name}:{port}"),
                    #[cfg(unix)]
                    Host::Unix(path) => format!("{}", path.display()),
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every host is a Unix socket or a loopback name/address (and so is every `hostaddr`, which
    /// is where the connection really goes when given).
    fn is_local(&self) -> bool {
        use tokio_postgres::config::Host;
        if self.config.get_hostaddrs().iter().any(|a| !a.is_loopback()) {
            return false;
        }
        self.config.get_hosts().iter().all(|h| match h {
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .trim_matches(|c| c == '[' || c == ']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            #[cfg(unix)]
            Host::Unix(_) => true,
        })
    }

    /// The address without its password, e.g. for `doctor` and `/health`.
    pub fn describe(&self) -> String {
        let user = self.config.get_user().unwrap_or("");
        let db = self.config.get_dbname().unwrap_or(user);
        format!("postgres://{user}@{}/{db}", self.hosts())
    }

    fn tls(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca {
            Some(path) => {
                let certs = tandem_certs::load_certs(path)
                    .map_err(|e| StoreError::BadLocation(format!("store_ca: {e}")))?;
                for c in certs {
                    roots.add(c).map_err(|e| {
                        StoreError::BadLocation(format!(
                            "store_ca {}: not a usable CA certificate ({e})",
                            path.display()
                        ))
                    })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for c in found.certs {
                    let _ = roots.add(c);
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::BadLocation(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }
}

impl fmt::Display for PgLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}
impl fmt::Debug for PgLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// A value bound to a statement's placeholder.
#[derive(Debug, Clone, Copy)]
pub enum Val<'a> {
    I64(i64),
    Text(&'a str),
    Bool(bool),
    OptI64(Option<i64>),
    OptText(Option<&'a str>),
}

/// One column's value in a [`Row`].
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    I64(i64),
    Text(String),
    Bool(bool),
}

/// One result row, read by column position.
#[derive(Debug, Clone)]
pub struct Row(Vec<Cell>);

impl Row {
    fn cell(&self, i: usize) -> Result<&Cell, StoreError> {
        self.0
            .get(i)
            .ok_or_else(|| StoreError::Column(format!("no column {i}")))
    }
    pub fn i64(&self, i: usize) -> Result<i64, StoreError> {
        match self.cell(i)? {
            Cell::I64(v) => Ok(*v),
            Cell::Bool(b) => Ok(*b as i64),
            c => Err(StoreError::Column(format!(
                "column {i} is {c:?}, not a number"
            ))),
        }
    }
    pub fn opt_i64(&self, i: usize) -> Result<Option<i64>, StoreError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            _ => self.i64(i).map(Some),
        }
    }
    pub fn text(&self, i: usize) -> Result<String, StoreError> {
        match self.cell(i)? {
            Cell::Text(s) => Ok(s.clone()),
            c => Err(StoreError::Column(format!("column {i} is {c:?}, not text"))),
        }
    }
    pub fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            _ => self.text(i).map(Some),
        }
    }
    pub fn bool(&self, i: usize) -> Result<bool, StoreError> {
        match self.cell(i)? {
            Cell::Bool(b) => Ok(*b),
            Cell::I64(v) => Ok(*v != 0),
            c => Err(StoreError::Column(format!(
                "column {i} is {c:?}, not a flag"
            ))),
        }
    }
}

/// `?N` placeholders as PostgreSQL's `$N` (the store's SQL has no `?` elsewhere).
fn pg_sql(sql: &str) -> String {
    sql.replace('?', "$")
}

/// A connection to one of the two engines.
pub enum Db {
    Sqlite(rusqlite::Connection),
    Postgres(Box<PgConn>),
}

/// The runtime PostgreSQL calls are driven on.
enum Rt {
    /// The relay's runtime (the store is used from its blocking threads).
    Shared(tokio::runtime::Handle),
    /// A runtime of the store's own (admin commands, which have none).
    Own(tokio::runtime::Runtime),
}

impl Rt {
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        match self {
            Rt::Shared(h) => h.block_on(f),
            Rt::Own(rt) => rt.block_on(f),
        }
    }
    fn spawn<F>(&self, f: F)
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self {
            Rt::Shared(h) => {
                h.spawn(f);
            }
            Rt::Own(rt) => {
                rt.spawn(f);
            }
        }
    }
}

pub struct PgConn {
    location: PgLocation,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    rt: Rt,
    client: Option<Arc<tokio_postgres::Client>>,
    /// Connections made so far (tells whether the connection changed under a transaction).
    generation: u64,
    /// The connection a transaction in progress runs on: no statement of it may go to another
    /// one (it would run outside the transaction), so nothing is retried then.
    transaction: Option<u64>,
}

impl PgConn {
    /// Connects. Must not be called on an async task (it blocks): the relay opens its stores on
    /// blocking threads.
    pub fn connect(location: &PgLocation) -> Result<PgConn, StoreError> {
        let rt = match tokio::runtime::Handle::try_current() {
            Ok(h) => Rt::Shared(h),
            Err(_) => Rt::Own(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| StoreError::Unavailable(format!("cannot start a runtime: {e}")))?,
            ),
        };
        let mut conn = PgConn {
            location: location.clone(),
            tls: location.tls()?,
            rt,
            client: None,
            generation: 0,
            transaction: None,
        };
        conn.client()?;
        Ok(conn)
    }

    fn unavailable(&self, e: impl fmt::Display) -> StoreError {
        StoreError::Unavailable(format!("PostgreSQL store {}: {e}", self.location))
    }

    /// The connection, made anew if there is none or it broke; whether it was made now.
    fn client(&mut self) -> Result<(Arc<tokio_postgres::Client>, bool), StoreError> {
        let mut fresh = false;
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if let Some(tx) = self.transaction
            && (self.client.is_none() || tx != self.generation)
        {
            return Err(self.unavailable("the connection broke during a transaction"));
        }
        if self.client.is_none() {
            let mut config = self.location.config.clone();
            if config.get_connect_timeout().is_none() {
                config.connect_timeout(PG_CONNECT_TIMEOUT);
            }
            config.keepalives(true);
            config.keepalives_idle(Duration::from_secs(30));
            if config.get_application_name().is_none() {
                config.application_name("tandem-relay");
            }
            let tls = self.tls.clone();
            let r = self.rt.block_on(async move {
                tokio::time::timeout(PG_CALL_TIMEOUT, config.connect(tls)).await
            });
            let (client, connection) = match r {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => return Err(self.unavailable(e)),
                Err(_) => return Err(self.unavailable("connecting timed out")),
            };
            self.rt.spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %e, "the connection to the PostgreSQL store ended");
                }
            });
            self.client = Some(Arc::new(client));
            self.generation += 1;
            fresh = true;
        }
        match &self.client {
            Some(c) => Ok((c.clone(), fresh)),
            None => Err(StoreError::Unavailable("no connection".into())),
        }
    }

    /// Runs `op` on the connection. When a connection that had served earlier calls turns out to
    /// be broken (the usual sign of a database restart between calls), it is replaced and `op`
    /// tried once more on the new one.
    fn call<T, F, Fut>(&mut self, op: F) -> Result<T, StoreError>
    where
        F: Fn(Arc<tokio_postgres::Client>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    {
        for _ in 0..2 {
            let (client, fresh) = self.client()?;
            let fut = op(client);
            let r = self
                .rt
                .block_on(async { tokio::time::timeout(PG_CALL_TIMEOUT, fut).await });
            match r {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if e.is_closed() => {
                    self.client = None;
                    if !fresh && self.transaction.is_none() {
                        continue;
                    }
                    return Err(self.unavailable(e));
                }
                Ok(Err(e)) => {
                    let e = pg_error(e);
                    if matches!(e, StoreError::Unavailable(_)) {
                        self.client = None;
                    }
                    return Err(e);
                }
                Err(_) => {
                    // The connection's state is unknown after a call that did not finish.
                    self.client = None;
                    return Err(self.unavailable("no answer within the call timeout"));
                }
            }
        }
        Err(self.unavailable("connection lost"))
    }
}

/// A database error, or "unavailable" when the cause is the connection or the server's state
/// (shutting down, starting, too many connections, a read-only standby after a failover, a
/// serialization conflict): worth trying again later, on a new connection.
fn pg_error(e: tokio_postgres::Error) -> StoreError {
    if e.is_closed() {
        return StoreError::Unavailable(format!("PostgreSQL store: {e}"));
    }
    match e.as_db_error() {
        Some(db) if transient(db.code().code()) => StoreError::Unavailable(format!(
            "PostgreSQL store: {} ({})",
            db.message(),
            db.code().code()
        )),
        Some(db) => StoreError::Postgres(format!("{}: {}", db.code().code(), db.message())),
        None => StoreError::Postgres(e.to_string()),
    }
}

/// SQLSTATEs after which the same statement may succeed later: connection exceptions (class
/// 08), admin/crash shutdown and "cannot connect now" (57P01–57P03), too many connections
/// (53300), a read-only transaction (25006: a standby after failover), serialization failure and
/// deadlock (40001, 40P01).
fn transient(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "53300" | "25006" | "40001" | "40P01"
        )
}

fn sqlite_params<'a>(params: &'a [Val<'a>]) -> Vec<&'a dyn rusqlite::ToSql> {
    params
        .iter()
        .map(|v| match v {
            Val::I64(x) => x as &dyn rusqlite::ToSql,
            Val::Text(s) => s as &dyn rusqlite::ToSql,
            Val::Bool(b) => b as &dyn rusqlite::ToSql,
            Val::OptI64(o) => o as &dyn rusqlite::ToSql,
            Val::OptText(o) => o as &dyn rusqlite::ToSql,
        })
        .collect()
}

type PgParam = Box<dyn tokio_postgres::types::ToSql + Sync + Send>;

fn pg_params(params: &[Val<'_>]) -> Vec<PgParam> {
    params
        .iter()
        .map(|v| -> PgParam {
            match *v {
                Val::I64(x) => Box::new(x),
                Val::Text(s) => Box::new(s.to_string()),
                Val::Bool(b) => Box::new(b),
                Val::OptI64(o) => Box::new(o),
                Val::OptText(o) => Box::new(o.map(str::to_string)),
            }
        })
        .collect()
}

/// The parameters as tokio-postgres takes them.
fn pg_refs(params: &[PgParam]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}

fn pg_row(r: &tokio_postgres::Row) -> Result<Row, StoreError> {
    use tokio_postgres::types::Type;
    let mut cells = Vec::with_capacity(r.len());
    for (i, col) in r.columns().iter().enumerate() {
        let t = col.type_();
        let cell = if *t == Type::INT8 {
            r.try_get::<_, Option<i64>>(i)
                .map(|v| v.map_or(Cell::Null, Cell::I64))
        } else if *t == Type::INT4 {
            r.try_get::<_, Option<i32>>(i)
                .map(|v| v.map_or(Cell::Null, |v| Cell::I64(v.into())))
        } else if *t == Type::BOOL {
            r.try_get::<_, Option<bool>>(i)
                .map(|v| v.map_or(Cell::Null, Cell::Bool))
        } else if *t == Type::TEXT || *t == Type::VARCHAR || *t == Type::NAME {
            r.try_get::<_, Option<String>>(i)
                .map(|v| v.map_or(Cell::Null, Cell::Text))
        } else {
            return Err(StoreError::Column(format!(
                "column {} has type {t}, which the store does not read",
                col.name()
            )));
        };
        cells.push(cell.map_err(pg_error)?);
    }
    Ok(Row(cells))
}

fn sqlite_row(r: &rusqlite::Row<'_>, n: usize) -> Result<Row, rusqlite::Error> {
    use rusqlite::types::ValueRef;
    let mut cells = Vec::with_capacity(n);
    for i in 0..n {
        cells.push(match r.get_ref(i)? {
            ValueRef::Null => Cell::Null,
            ValueRef::Integer(v) => Cell::I64(v),
            ValueRef::Text(t) => Cell::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Real(v) => Cell::I64(v as i64),
            ValueRef::Blob(_) => Cell::Null,
        });
    }
    Ok(Row(cells))
}

impl Db {
    pub fn engine(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    /// The database's clock, in Unix milliseconds, as an SQL expression. Times that several relay
    /// nodes compare (code expiry, a node's last sign of life) are the database's, so that nodes
    /// whose clocks differ still agree.
    pub fn now_sql(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
            Db::Postgres(_) => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    /// Runs a statement; the number of rows it changed.
    pub fn execute(&mut self, sql: &str, params: &[Val<'_>]) -> Result<u64, StoreError> {
        match self {
            Db::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                Ok(st.execute(sqlite_params(params).as_slice())? as u64)
            }
            Db::Postgres(pg) => {
                let sql = pg_sql(sql);
                let params = pg_params(params);
                pg.call(|client| {
                    let sql = sql.clone();
                    let refs = pg_refs(&params);
                    async move { client.execute(sql.as_str(), &refs).await }
                })
            }
        }
    }

    /// Runs a query; its rows.
    pub fn query(&mut self, sql: &str, params: &[Val<'_>]) -> Result<Vec<Row>, StoreError> {
        match self {
            Db::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let n = st.column_count();
                let rows = st
                    .query_map(sqlite_params(params).as_slice(), |r| sqlite_row(r, n))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(rows)
            }
            Db::Postgres(pg) => {
                let sql = pg_sql(sql);
                let params = pg_params(params);
                let rows = pg.call(|client| {
                    let sql = sql.clone();
                    let refs = pg_refs(&params);
                    async move { client.query(sql.as_str(), &refs).await }
                })?;
                rows.iter().map(pg_row).collect()
            }
        }
    }

    /// The first row of a query, if any.
    pub fn query_opt(&mut self, sql: &str, params: &[Val<'_>]) -> Result<Option<Row>, StoreError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    /// Runs several statements without parameters (schema changes).
    pub fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Db::Postgres(pg) => pg.call(|client| {
                let sql = sql.to_string();
                async move { client.batch_execute(sql.as_str()).await }
            }),
        }
    }

    /// Runs `f` in a transaction: committed if it returns `Ok`, rolled back otherwise.
    pub fn transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Db) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let begin = match self {
            Db::Sqlite(_) => "BEGIN IMMEDIATE",
            Db::Postgres(_) => "BEGIN",
        };
        self.batch(begin)?;
        if let Db::Postgres(pg) = self {
            pg.transaction = Some(pg.generation);
        }
        let r = match f(self) {
            Ok(v) => self.batch("COMMIT").map(|()| v),
            Err(e) => {
                // A broken connection has no transaction left to roll back.
                let _ = self.batch("ROLLBACK");
                Err(e)
            }
        };
        if let Db::Postgres(pg) = self {
            pg.transaction = None;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_and_never_show_a_password() {
        let l = StoreLocation::parse("sqlite:///var/lib/x/relay.db", None).unwrap();
        assert!(matches!(&l, StoreLocation::Sqlite(p) if p == Path::new("/var/lib/x/relay.db")));
        let l =
            StoreLocation::parse("postgres://tandem:hunter2@127.0.0.1:5433/relay", None).unwrap();
        let shown = format!("{l} {l:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("postgres://tandem@127.0.0.1:5433/relay"),
            "{shown}"
        );
        // Not on this machine: TLS is required, and the error does not echo the password.
        let e = StoreLocation::parse("postgres://tandem:hunter2@db.example.com/relay", None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("sslmode=require"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        assert!(
            StoreLocation::parse(
                "postgres://tandem:hunter2@db.example.com/relay?sslmode=require",
                None
            )
            .is_ok()
        );
        // prefer would fall back to plaintext: refused for a remote server.
        assert!(
            StoreLocation::parse("postgres://t@db.example.com/relay?sslmode=prefer", None).is_err()
        );
        let e = StoreLocation::parse("mysql://root:hunter2@db/relay", None)
            .err()
            .unwrap()
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(StoreLocation::parse("sqlite:", None).is_err());
        // hostaddr is where the connection goes: a remote one needs TLS whatever the host says.
        assert!(
            StoreLocation::parse("postgres://t@localhost/relay?hostaddr=203.0.113.5", None)
                .is_err()
        );
        assert!(
            StoreLocation::parse("postgres://t@localhost/relay?hostaddr=127.0.0.1", None).is_ok()
        );
        assert_eq!(
            redact_password("postgres://t@db/relay?sslmode=require&password=hunter2&x=1"),
            "postgres://t@db/relay?sslmode=require&password=…&x=1"
        );
    }

    #[test]
    fn placeholders_become_postgres_ones() {
        assert_eq!(
            pg_sql("UPDATE t SET a = ?1 WHERE id = ?2 AND b = ?1"),
            "UPDATE t SET a = $1 WHERE id = $2 AND b = $1"
        );
    }
}
