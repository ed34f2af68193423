//! The relay's store: organisations, technicians, enrolled devices and the audit log, in an
//! embedded SQLite file (the default) or in PostgreSQL shared by the nodes of a cluster
//! ([`StoreLocation`]; the engines are in [`db`]).
//!
//! * Technician tokens look like `tnd_<id>_<64 hex digits>`: the id finds the row, the 256-bit secret is
//!   checked against its SHA-256 (`sha256$<hex>`), compared in constant time. The token itself is
//!   never stored and is printed once. A slow password hash buys nothing for a 256-bit random
//!   secret (nobody can try 2^255 of them, with any hash) and cost an Argon2 per login, which let a
//!   stranger with made-up tokens of existing ids (ids are row numbers) keep the verification
//!   threads busy for everyone. Tokens issued before are Argon2id hashes: they still work, are
//!   checked on the verification threads, and are rehashed to SHA-256 at their first login.
//! * The id is not secret (it is a row number, printed in `technician list`): a token whose id names
//!   no technician is refused at once, without Argon2 ([`Store::lookup`]), so a flood of made-up
//!   tokens costs a primary-key lookup each. The timing difference tells only whether an id exists,
//!   which is no secret; the secret part is compared only after the (slow) hash, in constant time.
//! * The audit log holds session metadata only: who, which organisation, slot, source addresses, start,
//!   end, bytes each way and how it ended. Never content, never the secret part of a code.
//! * Schema changes are numbered migrations, the same steps for both engines, tracked in
//!   `PRAGMA user_version` (SQLite) or the `tandem_schema` table (PostgreSQL).

use crate::registry::{Technician, TechnicianId};
use argon2::Argon2;
use argon2::password_hash::PasswordHash;
use argon2::{Algorithm, Block, Params, Version};
use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::Connection;
use serde::Serialize;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub mod db;
use db::{Db, PgConn, Row, Val};
pub use db::{PgLocation, StoreLocation};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "relay.db";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "cannot create the database {path}: {source}; check that the data directory is writable by the relay's user"
    )]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("PostgreSQL error {0}")]
    Postgres(String),
    /// The database cannot be reached now (PostgreSQL down or restarting, network): worth retrying.
    #[error("{0}")]
    Unavailable(String),
    #[error("store: {0}")]
    BadLocation(String),
    #[error("unexpected database value: {0}")]
    Column(String),
    #[error(
        "the destination store already has {rows} rows in {table}; copy into an empty database"
    )]
    NotEmpty { table: String, rows: i64 },
    #[error(
        "another relay node named {node:?} is running (heard of {secs} s ago): give each node its own name (node = \"…\"); if that was this node before a crash, it starts once it has been silent for {wait} s"
    )]
    NodeTaken { node: String, secs: i64, wait: i64 },
    #[error(
        "database schema version {found} is newer than this relay understands ({known}); upgrade tandem-relay"
    )]
    TooNew { found: i64, known: i64 },
    #[error("no technician {0:?}")]
    NoSuchTechnician(String),
    #[error("technician name {0:?} exists in several organisations; give --org")]
    Ambiguous(String),
    #[error("technician {name:?} already exists in organisation {organisation:?}")]
    Exists { name: String, organisation: String },
    #[error("{0} must be 1 to 128 printable characters")]
    BadName(&'static str),
    #[error("the operating system's random generator failed")]
    Random,
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// Result of checking a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    Ok(Technician),
    BadToken,
    Disabled,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TechnicianRow {
    pub id: TechnicianId,
    pub name: String,
    pub organisation: String,
    pub disabled: bool,
    /// Unix seconds.
    pub created_at: i64,
    pub last_login_at: Option<i64>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AuditRow {
    pub id: i64,
    pub technician: String,
    pub organisation: String,
    pub slot: String,
    pub agent_addr: String,
    pub console_addr: String,
    /// Unix milliseconds.
    pub started_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    pub bytes_agent_to_console: i64,
    pub bytes_console_to_agent: i64,
    pub end_reason: Option<String>,
    /// The two sides said the session took a direct path at some point.
    pub went_direct: bool,
    /// Bytes the two sides said they sent on direct paths (not through the relay).
    pub bytes_direct: i64,
}

/// What the relay records when a session starts.
#[derive(Debug, Clone)]
pub struct SessionStart<'a> {
    pub technician: &'a Technician,
    pub slot: &'a str,
    pub agent_addr: String,
    pub console_addr: String,
    /// Unique per session and relay start: writing the same start twice (a retry after the
    /// database went away mid-write) gives back the same row instead of a second one.
    pub key: Option<&'a str>,
}

/// SQLite's schema, one numbered migration each (tracked in `PRAGMA user_version`).
const SQLITE_MIGRATIONS: &[&str] = &[
    // 1: initial schema
    "CREATE TABLE organisations (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE technicians (
        id INTEGER PRIMARY KEY,
        organisation_id INTEGER NOT NULL REFERENCES organisations(id),
        name TEXT NOT NULL,
        token_hash TEXT NOT NULL,
        disabled INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        last_login_at INTEGER,
        UNIQUE (organisation_id, name)
    );
    CREATE TABLE sessions (
        id INTEGER PRIMARY KEY,
        technician_id INTEGER REFERENCES technicians(id),
        technician TEXT NOT NULL,
        organisation TEXT NOT NULL,
        slot TEXT NOT NULL,
        agent_addr TEXT NOT NULL,
        console_addr TEXT NOT NULL,
        started_at_ms INTEGER NOT NULL,
        ended_at_ms INTEGER,
        bytes_agent_to_console INTEGER NOT NULL DEFAULT 0,
        bytes_console_to_agent INTEGER NOT NULL DEFAULT 0,
        end_reason TEXT
    );
    CREATE INDEX sessions_started ON sessions (started_at_ms);",
    // 2: enrolled devices (presence). `cert` and `presence` are the signed texts consoles check;
    // the other columns are read from them for listing and the admin commands.
    "CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        org_key TEXT NOT NULL,
        organisation TEXT NOT NULL,
        name TEXT NOT NULL,
        device_group TEXT NOT NULL,
        hostname TEXT NOT NULL,
        os TEXT NOT NULL,
        user_name TEXT NOT NULL,
        cert TEXT NOT NULL,
        presence TEXT NOT NULL,
        address TEXT NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        online INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX devices_org ON devices (org_key);",
    // 3: direct paths. What the two sides reported: whether the session left the relay for a
    // direct path at some point, and the bytes they sent on it (which did not cross the relay).
    "ALTER TABLE sessions ADD COLUMN went_direct INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN bytes_direct INTEGER NOT NULL DEFAULT 0;",
    // 4: clusters. Which relay node wrote a session row or last saw a device, so that a node
    // closing the rows a crash left open, or marking its devices offline, touches only its own.
    "ALTER TABLE sessions ADD COLUMN node TEXT NOT NULL DEFAULT '';
    ALTER TABLE devices ADD COLUMN node TEXT NOT NULL DEFAULT '';
    CREATE INDEX sessions_open ON sessions (node) WHERE ended_at_ms IS NULL;",
    // 5: the slot directory of a cluster: which node holds the agent waiting on a code, and
    // where consoles reach that node (`tandem_relay_server::directory`).
    "CREATE TABLE slots (
        slot TEXT PRIMARY KEY,
        node TEXT NOT NULL,
        address TEXT NOT NULL,
        expires_at_ms INTEGER NOT NULL
    );
    CREATE INDEX slots_node ON slots (node);
    CREATE TABLE nodes (
        node TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        boot TEXT NOT NULL,
        seen_at_ms INTEGER NOT NULL
    );
    CREATE TABLE join_attempts (
        technician_id INTEGER NOT NULL,
        minute INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        PRIMARY KEY (technician_id, minute)
    );
    ALTER TABLE sessions ADD COLUMN start_key TEXT;
    CREATE UNIQUE INDEX sessions_start_key ON sessions (start_key);",
];

/// PostgreSQL's schema: the same tables and the same numbered steps as SQLite's (tracked in
/// `tandem_schema`), in PostgreSQL's types (`BIGINT` identities, `BOOLEAN` flags).
const POSTGRES_MIGRATIONS: &[&str] = &[
    "CREATE TABLE organisations (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE technicians (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        organisation_id BIGINT NOT NULL REFERENCES organisations(id),
        name TEXT NOT NULL,
        token_hash TEXT NOT NULL,
        disabled BOOLEAN NOT NULL DEFAULT FALSE,
        created_at BIGINT NOT NULL,
        last_login_at BIGINT,
        UNIQUE (organisation_id, name)
    );
    CREATE TABLE sessions (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        technician_id BIGINT REFERENCES technicians(id),
        technician TEXT NOT NULL,
        organisation TEXT NOT NULL,
        slot TEXT NOT NULL,
        agent_addr TEXT NOT NULL,
        console_addr TEXT NOT NULL,
        started_at_ms BIGINT NOT NULL,
        ended_at_ms BIGINT,
        bytes_agent_to_console BIGINT NOT NULL DEFAULT 0,
        bytes_console_to_agent BIGINT NOT NULL DEFAULT 0,
        end_reason TEXT
    );
    CREATE INDEX sessions_started ON sessions (started_at_ms);",
    "CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        org_key TEXT NOT NULL,
        organisation TEXT NOT NULL,
        name TEXT NOT NULL,
        device_group TEXT NOT NULL,
        hostname TEXT NOT NULL,
        os TEXT NOT NULL,
        user_name TEXT NOT NULL,
        cert TEXT NOT NULL,
        presence TEXT NOT NULL,
        address TEXT NOT NULL,
        first_seen BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        online BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE INDEX devices_org ON devices (org_key);",
    "ALTER TABLE sessions ADD COLUMN went_direct BOOLEAN NOT NULL DEFAULT FALSE;
    ALTER TABLE sessions ADD COLUMN bytes_direct BIGINT NOT NULL DEFAULT 0;",
    "ALTER TABLE sessions ADD COLUMN node TEXT NOT NULL DEFAULT '';
    ALTER TABLE devices ADD COLUMN node TEXT NOT NULL DEFAULT '';
    CREATE INDEX sessions_open ON sessions (node) WHERE ended_at_ms IS NULL;",
    "CREATE TABLE slots (
        slot TEXT PRIMARY KEY,
        node TEXT NOT NULL,
        address TEXT NOT NULL,
        expires_at_ms BIGINT NOT NULL
    );
    CREATE INDEX slots_node ON slots (node);
    CREATE TABLE nodes (
        node TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        boot TEXT NOT NULL,
        seen_at_ms BIGINT NOT NULL
    );
    CREATE TABLE join_attempts (
        technician_id BIGINT NOT NULL,
        minute BIGINT NOT NULL,
        attempts BIGINT NOT NULL,
        PRIMARY KEY (technician_id, minute)
    );
    ALTER TABLE sessions ADD COLUMN start_key TEXT;
    CREATE UNIQUE INDEX sessions_start_key ON sessions (start_key);",
];

/// The schema version this relay writes (both engines).
pub const SCHEMA_VERSION: i64 = SQLITE_MIGRATIONS.len() as i64;

const _: () = assert!(SQLITE_MIGRATIONS.len() == POSTGRES_MIGRATIONS.len());

fn check_version(found: i64) -> Result<(), StoreError> {
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// Key of the advisory lock under which a node migrates a shared PostgreSQL schema (nodes that
/// start together take turns).
const PG_MIGRATION_LOCK: i64 = 0x7461_6e64_656d;

/// An enrolled device as the relay last saw it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceRow {
    pub id: String,
    /// Fingerprint of the organisation key that enrolled it.
    pub org_key: String,
    pub organisation: String,
    pub name: String,
    pub group: String,
    pub hostname: String,
    pub os: String,
    pub user: String,
    #[serde(skip)]
    pub cert: String,
    #[serde(skip)]
    pub presence: String,
    pub address: String,
    /// Unix seconds.
    pub first_seen: i64,
    pub last_seen: i64,
    pub online: bool,
}

/// A technician row a token's id names, before its secret is checked.
pub struct Candidate {
    pub id: TechnicianId,
    name: String,
    organisation: String,
    disabled: bool,
    token_hash: String,
}

impl Candidate {
    /// Whether checking this token needs the slow hash (a token issued before tokens were stored
    /// as SHA-256): run it on a verification thread, not where logins are looked up.
    pub fn needs_slow_check(&self) -> bool {
        !self.token_hash.starts_with(FAST_PREFIX)
    }
}

/// How a token's SHA-256 is stored.
const FAST_PREFIX: &str = "sha256$";

/// The stored form of a token's secret: `sha256$<hex>`.
fn fast_hash(secret: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, secret);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{FAST_PREFIX}{hex}")
}

/// Equal strings, compared in time that depends only on their lengths.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl std::fmt::Debug for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Candidate")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The secret part of a token (redacted `Debug`).
pub struct TokenSecret(String);

impl std::fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSecret(<redacted>)")
    }
}

pub struct Store {
    db: RefCell<Db>,
    /// Which relay node this is (written into session and device rows; empty for a lone relay).
    node: String,
    rng: SystemRandom,
    /// Argon2 working memory, allocated once and reused by every verification on this store (the
    /// crate's own verifier allocates ~19 MiB per call, which the allocator then keeps around).
    blocks: RefCell<Vec<Block>>,
    /// Argon2 verifications run by this store.
    hashes: std::cell::Cell<u64>,
    /// [`Store::with_deferred_logins`].
    defer_logins: bool,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn check_name(s: &str, what: &'static str) -> Result<(), StoreError> {
    if s.is_empty() || s.len() > 128 || s.chars().any(|c| c.is_control()) {
        Err(StoreError::BadName(what))
    } else {
        Ok(())
    }
}

fn technician_row(r: &Row) -> Result<TechnicianRow, StoreError> {
    Ok(TechnicianRow {
        id: r.i64(0)?,
        name: r.text(1)?,
        organisation: r.text(2)?,
        disabled: r.bool(3)?,
        created_at: r.i64(4)?,
        last_login_at: r.opt_i64(5)?,
    })
}

fn device_row(r: &Row) -> Result<DeviceRow, StoreError> {
    Ok(DeviceRow {
        id: r.text(0)?,
        org_key: r.text(1)?,
        organisation: r.text(2)?,
        name: r.text(3)?,
        group: r.text(4)?,
        hostname: r.text(5)?,
        os: r.text(6)?,
        user: r.text(7)?,
        cert: r.text(8)?,
        presence: r.text(9)?,
        address: r.text(10)?,
        first_seen: r.i64(11)?,
        last_seen: r.i64(12)?,
        online: r.bool(13)?,
    })
}

fn audit_row(r: &Row) -> Result<AuditRow, StoreError> {
    Ok(AuditRow {
        id: r.i64(0)?,
        technician: r.text(1)?,
        organisation: r.text(2)?,
        slot: r.text(3)?,
        agent_addr: r.text(4)?,
        console_addr: r.text(5)?,
        started_at_ms: r.i64(6)?,
        ended_at_ms: r.opt_i64(7)?,
        bytes_agent_to_console: r.i64(8)?,
        bytes_console_to_agent: r.i64(9)?,
        end_reason: r.opt_text(10)?,
        went_direct: r.bool(11)?,
        bytes_direct: r.i64(12)?,
    })
}

const DEVICE_COLUMNS: &str =
    "id, org_key, organisation, name, device_group, hostname, os, user_name, cert,
                    presence, address, first_seen, last_seen, online";
const AUDIT_COLUMNS: &str = "id, technician, organisation, slot, agent_addr, console_addr, started_at_ms, ended_at_ms,
                    bytes_agent_to_console, bytes_console_to_agent, end_reason, went_direct, bytes_direct";

impl Store {
    /// Opens (creating if needed) the SQLite database in `data_dir` and applies pending migrations.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        Self::open_at(&StoreLocation::in_data_dir(data_dir))
    }

    /// Opens the store at `location` and applies pending migrations. For PostgreSQL this blocks
    /// (connecting, migrating): call it from a blocking thread, never on an async task.
    pub fn open_at(location: &StoreLocation) -> Result<Self, StoreError> {
        match location {
            StoreLocation::Sqlite(path) => Self::open_sqlite(path),
            StoreLocation::Postgres(pg) => {
                let db = Db::Postgres(Box::new(PgConn::connect(pg)?));
                Self::init(db)
            }
        }
    }

    fn open_sqlite(path: &Path) -> Result<Self, StoreError> {
        // Holds token hashes and the audit log: owner only, from the moment it exists (SQLite would
        // create it with the umask's mode, readable by others until a chmod). An empty file is an
        // empty database; SQLite gives its journal and WAL files the database file's mode.
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(StoreError::Create {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
        }
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::init_sqlite(conn)
    }

    /// An in-memory store (tests).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init_sqlite(Connection::open_in_memory()?)
    }

    fn init_sqlite(conn: Connection) -> Result<Self, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "foreign_keys", true)?;
        // WAL lets admin commands run while the relay writes; ignored for in-memory databases.
        let _: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Self::init(Db::Sqlite(conn))
    }

    fn init(mut db: Db) -> Result<Self, StoreError> {
        if let Db::Sqlite(conn) = &mut db {
            let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            check_version(version)?;
            for (i, sql) in SQLITE_MIGRATIONS.iter().enumerate().skip(version as usize) {
                let tx = conn.transaction()?;
                tx.execute_batch(sql)?;
                tx.pragma_update(None, "user_version", (i + 1) as i64)?;
                tx.commit()?;
                tracing::info!(version = i + 1, "applied database migration");
            }
        } else {
            db.transaction(|db| {
                // Nodes starting together migrate one after the other (the lock is taken before
                // anything is created: concurrent CREATE … IF NOT EXISTS can collide).
                db.execute(
                    "SELECT pg_advisory_xact_lock(?1)",
                    &[Val::I64(PG_MIGRATION_LOCK)],
                )?;
                db.batch("CREATE TABLE IF NOT EXISTS tandem_schema (version BIGINT NOT NULL)")?;
                let version = match db.query_opt("SELECT version FROM tandem_schema", &[])? {
                    Some(r) => r.i64(0)?,
                    None => {
                        db.execute("INSERT INTO tandem_schema (version) VALUES (0)", &[])?;
                        0
                    }
                };
                check_version(version)?;
                for (i, sql) in POSTGRES_MIGRATIONS
                    .iter()
                    .enumerate()
                    .skip(version as usize)
                {
                    db.batch(sql)?;
                    db.execute(
                        "UPDATE tandem_schema SET version = ?1",
                        &[Val::I64((i + 1) as i64)],
                    )?;
                    tracing::info!(version = i + 1, "applied database migration");
                }
                Ok(())
            })?;
        }
        Ok(Store {
            db: RefCell::new(db),
            node: String::new(),
            rng: SystemRandom::new(),
            blocks: RefCell::new(Vec::new()),
            hashes: std::cell::Cell::new(0),
            defer_logins: false,
        })
    }

    /// Names the relay node this store writes for (cluster rows; see migration 4).
    pub fn with_node(mut self, node: &str) -> Self {
        self.node = node.to_string();
        self
    }

    /// `sqlite` or `postgres`.
    pub fn engine(&self) -> &'static str {
        self.db.borrow().engine()
    }

    fn execute(&self, sql: &str, params: &[Val<'_>]) -> Result<u64, StoreError> {
        self.db.borrow_mut().execute(sql, params)
    }

    fn query(&self, sql: &str, params: &[Val<'_>]) -> Result<Vec<Row>, StoreError> {
        self.db.borrow_mut().query(sql, params)
    }

    /// Asks the database something trivial: `Ok` when it answers.
    pub fn ping(&self) -> Result<(), StoreError> {
        self.query("SELECT 1", &[]).map(|_| ())
    }

    pub fn schema_version(&self) -> Result<i64, StoreError> {
        let mut db = self.db.borrow_mut();
        if let Db::Sqlite(conn) = &*db {
            return Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?);
        }
        match db.query_opt("SELECT version FROM tandem_schema", &[])? {
            Some(r) => r.i64(0),
            None => Ok(0),
        }
    }

    fn new_secret(&self) -> Result<(String, String), StoreError> {
        let mut secret = [0u8; 32];
        self.rng.fill(&mut secret).map_err(|_| StoreError::Random)?;
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let hash = fast_hash(hex.as_bytes());
        Ok((hex, hash))
    }

    /// Adds a technician (creating the organisation if new) and returns it with its token, which is
    /// shown once and never stored.
    pub fn add_technician(
        &mut self,
        organisation: &str,
        name: &str,
    ) -> Result<(TechnicianRow, String), StoreError> {
        check_name(organisation, "organisation")?;
        check_name(name, "technician name")?;
        let (secret, hash) = self.new_secret()?;
        let now = now_secs();
        let id = self.db.get_mut().transaction(|db| {
            db.execute(
                "INSERT INTO organisations (name, created_at) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
                &[Val::Text(organisation), Val::I64(now)],
            )?;
            let org_id = db
                .query_opt(
                    "SELECT id FROM organisations WHERE name = ?1",
                    &[Val::Text(organisation)],
                )?
                .ok_or_else(|| StoreError::Column("the organisation vanished".into()))?
                .i64(0)?;
            let inserted = db.query_opt(
                "INSERT INTO technicians (organisation_id, name, token_hash, created_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (organisation_id, name) DO NOTHING RETURNING id",
                &[Val::I64(org_id), Val::Text(name), Val::Text(&hash), Val::I64(now)],
            )?;
            match inserted {
                Some(r) => r.i64(0),
                None => Err(StoreError::Exists {
                    name: name.into(),
                    organisation: organisation.into(),
                }),
            }
        })?;
        let row = TechnicianRow {
            id,
            name: name.into(),
            organisation: organisation.into(),
            disabled: false,
            created_at: now,
            last_login_at: None,
        };
        Ok((row, format!("tnd_{id}_{secret}")))
    }

    pub fn list_technicians(&self) -> Result<Vec<TechnicianRow>, StoreError> {
        self.query(
            "SELECT t.id, t.name, o.name, t.disabled, t.created_at, t.last_login_at
             FROM technicians t JOIN organisations o ON o.id = t.organisation_id ORDER BY o.name, t.name",
            &[],
        )?
        .iter()
        .map(technician_row)
        .collect()
    }

    /// Finds a technician by numeric id or by name (optionally within an organisation).
    pub fn find_technician(
        &self,
        who: &str,
        organisation: Option<&str>,
    ) -> Result<TechnicianRow, StoreError> {
        let all = self.list_technicians()?;
        if let Ok(id) = who.parse::<i64>()
            && let Some(t) = all.iter().find(|t| t.id == id)
        {
            return Ok(t.clone());
        }
        let matches: Vec<_> = all
            .into_iter()
            .filter(|t| t.name == who && organisation.is_none_or(|o| t.organisation == o))
            .collect();
        match matches.len() {
            0 => Err(StoreError::NoSuchTechnician(who.into())),
            1 => Ok(matches
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::NoSuchTechnician(who.into()))?),
            _ => Err(StoreError::Ambiguous(who.into())),
        }
    }

    pub fn set_disabled(&self, id: TechnicianId, disabled: bool) -> Result<(), StoreError> {
        let n = self.execute(
            "UPDATE technicians SET disabled = ?1 WHERE id = ?2",
            &[Val::Bool(disabled), Val::I64(id)],
        )?;
        if n == 0 {
            return Err(StoreError::NoSuchTechnician(id.to_string()));
        }
        Ok(())
    }

    /// Replaces a technician's token; the old one stops working at once. Returns the new token.
    pub fn rotate_token(&self, id: TechnicianId) -> Result<String, StoreError> {
        let (secret, hash) = self.new_secret()?;
        let n = self.execute(
            "UPDATE technicians SET token_hash = ?1 WHERE id = ?2",
            &[Val::Text(&hash), Val::I64(id)],
        )?;
        if n == 0 {
            return Err(StoreError::NoSuchTechnician(id.to_string()));
        }
        Ok(format!("tnd_{id}_{secret}"))
    }

    /// Checks a token. Slow on purpose (Argon2id) when its id names a technician: call it off the
    /// async executor.
    pub fn authenticate(&self, token: &str) -> Result<AuthOutcome, StoreError> {
        match self.lookup(token)? {
            Some((candidate, secret)) => self.verify_candidate(&candidate, &secret),
            None => Ok(AuthOutcome::BadToken),
        }
    }

    /// The fast half of [`Store::authenticate`]: parses the token and finds the technician its id
    /// names. `None` (malformed token, unknown id) means "bad token", decided without Argon2.
    pub fn lookup(&self, token: &str) -> Result<Option<(Candidate, TokenSecret)>, StoreError> {
        let Some((id, secret)) = parse_token(token) else {
            return Ok(None);
        };
        let row = self.query(
            "SELECT t.token_hash, t.disabled, t.name, o.name
             FROM technicians t JOIN organisations o ON o.id = t.organisation_id WHERE t.id = ?1",
            &[Val::I64(id)],
        )?;
        let Some(r) = row.first() else {
            return Ok(None);
        };
        let candidate = Candidate {
            id,
            token_hash: r.text(0)?,
            disabled: r.bool(1)?,
            name: r.text(2)?,
            organisation: r.text(3)?,
        };
        Ok(Some((candidate, TokenSecret(secret.to_string()))))
    }

    /// The slow half of [`Store::authenticate`]: checks the secret against the candidate's Argon2id
    /// hash; records the login.
    pub fn verify_candidate(
        &self,
        c: &Candidate,
        secret: &TokenSecret,
    ) -> Result<AuthOutcome, StoreError> {
        let fast = fast_hash(secret.0.as_bytes());
        if c.needs_slow_check() {
            if !self.verify(secret.0.as_bytes(), &c.token_hash) {
                return Ok(AuthOutcome::BadToken);
            }
            // A token from before SHA-256 storage: from now on it is checked fast.
            self.execute(
                "UPDATE technicians SET token_hash = ?1 WHERE id = ?2 AND token_hash = ?3",
                &[Val::Text(&fast), Val::I64(c.id), Val::Text(&c.token_hash)],
            )?;
        } else if !same(fast.as_bytes(), c.token_hash.as_bytes()) {
            return Ok(AuthOutcome::BadToken);
        }
        if c.disabled {
            return Ok(AuthOutcome::Disabled);
        }
        if !self.defer_logins {
            self.record_login(c.id, now_secs())?;
        }
        Ok(AuthOutcome::Ok(Technician {
            id: c.id,
            name: c.name.clone(),
            organisation: c.organisation.clone(),
        }))
    }

    /// Records a technician's login time.
    pub fn record_login(&self, id: TechnicianId, unix_secs: i64) -> Result<(), StoreError> {
        self.execute(
            "UPDATE technicians SET last_login_at = ?1 WHERE id = ?2",
            &[Val::I64(unix_secs), Val::I64(id)],
        )?;
        Ok(())
    }

    /// Leaves recording the login time to the caller ([`Store::record_login`]): the relay writes
    /// it from its audit queue, off the login's path (a round trip to PostgreSQL saved per login).
    pub fn with_deferred_logins(mut self) -> Self {
        self.defer_logins = true;
        self
    }

    /// Argon2 verifications this store has run.
    pub fn hashes_run(&self) -> u64 {
        self.hashes.get()
    }

    /// Checks `secret` against a PHC-format Argon2 hash, reusing this store's working memory.
    fn verify(&self, secret: &[u8], phc: &str) -> bool {
        self.hashes.set(self.hashes.get() + 1);
        let Ok(h) = PasswordHash::new(phc) else {
            return false;
        };
        let Ok(alg) = Algorithm::try_from(h.algorithm) else {
            return false;
        };
        let version = match h.version {
            Some(v) => match Version::try_from(v) {
                Ok(v) => v,
                Err(_) => return false,
            },
            None => Version::V0x13,
        };
        let Ok(params) = Params::try_from(&h) else {
            return false;
        };
        let (Some(salt), Some(expected)) = (h.salt, h.hash) else {
            return false;
        };
        let mut salt_buf = [0u8; 64];
        let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
            return false;
        };
        // Hashes are written by this relay; refuse absurd costs rather than allocate them.
        let blocks = params.block_count();
        if blocks > 1 << 20 {
            return false;
        }
        let mut out = vec![0u8; expected.len()];
        let mut mem = self.blocks.borrow_mut();
        if mem.len() < blocks {
            mem.resize(blocks, Block::default());
        }
        let argon = Argon2::new(alg, version, params);
        if argon
            .hash_password_into_with_memory(secret, salt, &mut out, &mut mem[..blocks])
            .is_err()
        {
            return false;
        }
        // Constant-time comparison.
        out.iter()
            .zip(expected.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
            && out.len() == expected.len()
    }

    /// Records the start of a session; returns the audit row id.
    pub fn audit_start(&self, s: &SessionStart<'_>) -> Result<i64, StoreError> {
        let rows = self.query(
            "INSERT INTO sessions (technician_id, technician, organisation, slot, agent_addr, console_addr, started_at_ms, node, start_key)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (start_key) DO UPDATE SET start_key = excluded.start_key RETURNING id",
            &[
                Val::I64(s.technician.id),
                Val::Text(&s.technician.name),
                Val::Text(&s.technician.organisation),
                Val::Text(s.slot),
                Val::Text(&s.agent_addr),
                Val::Text(&s.console_addr),
                Val::I64(now_ms()),
                Val::Text(&self.node),
                Val::OptText(s.key),
            ],
        )?;
        rows.first()
            .ok_or_else(|| StoreError::Column("the new audit row has no id".into()))?
            .i64(0)
    }

    /// Records how many bytes a running session has forwarded so far (a cluster node checkpoints
    /// them, so that the row of a session on a node that dies still says how much went through).
    pub fn audit_progress(
        &self,
        row: i64,
        agent_to_console: u64,
        console_to_agent: u64,
    ) -> Result<(), StoreError> {
        self.execute(
            "UPDATE sessions SET bytes_agent_to_console = ?1, bytes_console_to_agent = ?2
             WHERE id = ?3 AND ended_at_ms IS NULL",
            &[
                Val::I64(agent_to_console.min(i64::MAX as u64) as i64),
                Val::I64(console_to_agent.min(i64::MAX as u64) as i64),
                Val::I64(row),
            ],
        )?;
        Ok(())
    }

    /// Records the end of a session.
    pub fn audit_end(
        &self,
        row: i64,
        agent_to_console: u64,
        console_to_agent: u64,
        reason: &str,
        direct: Option<u64>,
    ) -> Result<(), StoreError> {
        self.execute(
            "UPDATE sessions SET ended_at_ms = ?1, bytes_agent_to_console = ?2, bytes_console_to_agent = ?3, end_reason = ?4,
                    went_direct = ?6, bytes_direct = ?7
             WHERE id = ?5",
            &[
                Val::I64(now_ms()),
                Val::I64(agent_to_console.min(i64::MAX as u64) as i64),
                Val::I64(console_to_agent.min(i64::MAX as u64) as i64),
                Val::Text(reason),
                Val::I64(row),
                Val::Bool(direct.is_some()),
                Val::I64(direct.unwrap_or(0).min(i64::MAX as u64) as i64),
            ],
        )?;
        Ok(())
    }

    /// Records a device that came online (or refreshes it).
    pub fn device_online(&self, d: &DeviceRow) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO devices (id, org_key, organisation, name, device_group, hostname, os, user_name,
                                  cert, presence, address, first_seen, last_seen, online, node)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12, ?13, ?14)
             ON CONFLICT (id) DO UPDATE SET org_key = ?2, organisation = ?3, name = ?4,
                device_group = ?5, hostname = ?6, os = ?7, user_name = ?8, cert = ?9, presence = ?10,
                address = ?11, last_seen = ?12, online = ?13, node = ?14",
            &[
                Val::Text(&d.id),
                Val::Text(&d.org_key),
                Val::Text(&d.organisation),
                Val::Text(&d.name),
                Val::Text(&d.group),
                Val::Text(&d.hostname),
                Val::Text(&d.os),
                Val::Text(&d.user),
                Val::Text(&d.cert),
                Val::Text(&d.presence),
                Val::Text(&d.address),
                Val::I64(d.last_seen),
                Val::Bool(true),
                Val::Text(&self.node),
            ],
        )?;
        Ok(())
    }

    /// Records that a device went offline at `last_seen` (unless another node has seen it since).
    pub fn device_offline(&self, id: &str, last_seen: i64) -> Result<(), StoreError> {
        self.execute(
            "UPDATE devices SET online = ?3, last_seen = ?2 WHERE id = ?1 AND node = ?4",
            &[
                Val::Text(id),
                Val::I64(last_seen),
                Val::Bool(false),
                Val::Text(&self.node),
            ],
        )?;
        Ok(())
    }

    /// Marks every device this node had online offline (at start: none is connected yet).
    pub fn devices_all_offline(&self) -> Result<u64, StoreError> {
        self.execute(
            "UPDATE devices SET online = ?1 WHERE online = ?2 AND (node = ?3 OR node = '')",
            &[Val::Bool(false), Val::Bool(true), Val::Text(&self.node)],
        )
    }

    /// Every device, by name.
    pub fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        self.query(
            &format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY organisation, name, id"),
            &[],
        )?
        .iter()
        .map(device_row)
        .collect()
    }

    /// Forgets a device (admin command); whether it was known.
    pub fn remove_device(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.execute("DELETE FROM devices WHERE id = ?1", &[Val::Text(id)])? > 0)
    }

    /// Closes audit rows this node left open when it stopped without draining (rows from before
    /// nodes were named count as this node's).
    pub fn close_dangling(&self) -> Result<u64, StoreError> {
        self.execute(
            "UPDATE sessions SET ended_at_ms = ?1, end_reason = 'relay_stopped'
             WHERE ended_at_ms IS NULL AND (node = ?2 OR node = '')",
            &[Val::I64(now_ms()), Val::Text(&self.node)],
        )
    }

    // The cluster's shared state below compares times written by different nodes: every such
    // time is the database's clock ([`Db::now_sql`]), so that nodes whose clocks differ agree on
    // what has expired and which node is silent.

    /// Claims `slot` for `node` (reachable at `address`) for `life_ms`, unless another node holds
    /// it unexpired: whether this node has it now.
    pub fn slot_claim(
        &self,
        slot: &str,
        node: &str,
        address: &str,
        life_ms: i64,
    ) -> Result<bool, StoreError> {
        let now = self.db.borrow().now_sql();
        let rows = self.query(
            &format!(
                "INSERT INTO slots (slot, node, address, expires_at_ms) VALUES (?1, ?2, ?3, {now} + ?4)
                 ON CONFLICT (slot) DO UPDATE SET node = ?2, address = ?3, expires_at_ms = {now} + ?4
                 WHERE slots.expires_at_ms < {now} OR slots.node = ?2
                 RETURNING slot"
            ),
            &[
                Val::Text(slot),
                Val::Text(node),
                Val::Text(address),
                Val::I64(life_ms),
            ],
        )?;
        Ok(!rows.is_empty())
    }

    /// The node holding `slot` and its address, unless the row expired.
    pub fn slot_lookup(&self, slot: &str) -> Result<Option<(String, String)>, StoreError> {
        let now = self.db.borrow().now_sql();
        let rows = self.query(
            &format!("SELECT node, address FROM slots WHERE slot = ?1 AND expires_at_ms >= {now}"),
            &[Val::Text(slot)],
        )?;
        match rows.first() {
            Some(r) => Ok(Some((r.text(0)?, r.text(1)?))),
            None => Ok(None),
        }
    }

    /// Forgets the slots `node` held (it starts again: its agents are gone).
    pub fn slots_forget_node(&self, node: &str) -> Result<u64, StoreError> {
        self.execute("DELETE FROM slots WHERE node = ?1", &[Val::Text(node)])
    }

    /// A node joins the cluster's list as `boot` (random, per start). Refused (with the seconds
    /// since it was last heard of) while another start of a node of the same name is alive: two
    /// nodes of one name would close each other's sessions and take each other's codes.
    pub fn node_join(
        &self,
        node: &str,
        address: &str,
        boot: &str,
        lost_after_ms: i64,
    ) -> Result<Result<(), i64>, StoreError> {
        let now = self.db.borrow().now_sql();
        let rows = self.query(
            &format!("SELECT boot, {now} - seen_at_ms FROM nodes WHERE node = ?1"),
            &[Val::Text(node)],
        )?;
        if let Some(r) = rows.first() {
            let (other, ago) = (r.text(0)?, r.i64(1)?);
            if other != boot && ago < lost_after_ms {
                return Ok(Err(ago));
            }
        }
        self.node_heartbeat(node, address, boot)?;
        Ok(Ok(()))
    }

    /// Says that `node` (this start of it, `boot`) is alive now. `false` when its row had gone
    /// (the other nodes took it for dead while it could not reach the database).
    pub fn node_heartbeat(
        &self,
        node: &str,
        address: &str,
        boot: &str,
    ) -> Result<bool, StoreError> {
        let now = self.db.borrow().now_sql();
        let n = self.execute(
            &format!(
                "UPDATE nodes SET address = ?2, seen_at_ms = {now} WHERE node = ?1 AND boot = ?3"
            ),
            &[Val::Text(node), Val::Text(address), Val::Text(boot)],
        )?;
        if n > 0 {
            return Ok(true);
        }
        self.execute(
            &format!(
                "INSERT INTO nodes (node, address, boot, seen_at_ms) VALUES (?1, ?2, ?3, {now})
                 ON CONFLICT (node) DO UPDATE SET address = ?2, boot = ?3, seen_at_ms = {now}"
            ),
            &[Val::Text(node), Val::Text(address), Val::Text(boot)],
        )?;
        Ok(false)
    }

    /// A node that stopped cleanly leaves the cluster's list.
    pub fn node_leave(&self, node: &str) -> Result<(), StoreError> {
        self.execute("DELETE FROM nodes WHERE node = ?1", &[Val::Text(node)])?;
        Ok(())
    }

    /// Closes what nodes silent for `lost_after_ms` left open (they died without draining): their
    /// sessions' audit rows end when the node was last seen (not before they started), as
    /// `node_lost`; their codes are forgotten (so consoles are not sent to a dead node) and their
    /// devices marked offline. Returns the audit rows closed.
    pub fn close_lost_nodes(&self, lost_after_ms: i64) -> Result<u64, StoreError> {
        let now = self.db.borrow().now_sql();
        let lost = format!("SELECT node FROM nodes WHERE seen_at_ms < {now} - ?1");
        self.db.borrow_mut().transaction(|db| {
            let closed = db.execute(
                &format!(
                    "UPDATE sessions SET end_reason = 'node_lost',
                        ended_at_ms = CASE
                            WHEN started_at_ms > (SELECT seen_at_ms FROM nodes WHERE nodes.node = sessions.node)
                            THEN started_at_ms
                            ELSE (SELECT seen_at_ms FROM nodes WHERE nodes.node = sessions.node) END
                     WHERE ended_at_ms IS NULL AND node IN ({lost})"
                ),
                &[Val::I64(lost_after_ms)],
            )?;
            db.execute(
                &format!("DELETE FROM slots WHERE node IN ({lost})"),
                &[Val::I64(lost_after_ms)],
            )?;
            db.execute(
                &format!("UPDATE devices SET online = ?2 WHERE online = ?3 AND node IN ({lost})"),
                &[Val::I64(lost_after_ms), Val::Bool(false), Val::Bool(true)],
            )?;
            db.execute(
                &format!("DELETE FROM nodes WHERE seen_at_ms < {now} - ?1"),
                &[Val::I64(lost_after_ms)],
            )?;
            Ok(closed)
        })
    }

    /// Counts a join attempt of `technician` in this minute (the database's), across every node
    /// of the cluster: the attempts this minute so far, this one included.
    pub fn join_attempt(&self, technician: TechnicianId) -> Result<i64, StoreError> {
        let now = self.db.borrow().now_sql();
        let rows = self.query(
            &format!(
                "INSERT INTO join_attempts (technician_id, minute, attempts) VALUES (?1, {now} / 60000, 1)
                 ON CONFLICT (technician_id, minute) DO UPDATE SET attempts = join_attempts.attempts + 1
                 RETURNING attempts"
            ),
            &[Val::I64(technician)],
        )?;
        rows.first().map_or(Ok(1), |r| r.i64(0))
    }

    /// Deletes directory rows that expired more than `older_than_ms` ago.
    pub fn slots_sweep(&self, older_than_ms: i64) -> Result<u64, StoreError> {
        let now = self.db.borrow().now_sql();
        self.execute(
            &format!("DELETE FROM join_attempts WHERE minute < ({now} - ?1) / 60000"),
            &[Val::I64(older_than_ms)],
        )?;
        self.execute(
            &format!("DELETE FROM slots WHERE expires_at_ms < {now} - ?1"),
            &[Val::I64(older_than_ms)],
        )
    }

    /// The newest `limit` audit rows, newest first.
    pub fn audit(&self, limit: usize) -> Result<Vec<AuditRow>, StoreError> {
        self.query(
            &format!("SELECT {AUDIT_COLUMNS} FROM sessions ORDER BY id DESC LIMIT ?1"),
            &[Val::I64(limit.min(i64::MAX as usize) as i64)],
        )?
        .iter()
        .map(audit_row)
        .collect()
    }
}

/// What [`Store::copy_from`] copied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CopyReport {
    pub organisations: u64,
    pub technicians: u64,
    pub sessions: u64,
    pub devices: u64,
}

impl Store {
    /// Copies everything of `src` (an existing relay's store, e.g. its SQLite file) into this one,
    /// which must hold no organisations, technicians, sessions or devices yet. Ids are kept, so
    /// technicians' tokens (which carry their id) go on working; one transaction, so a failure
    /// leaves this store as it was.
    pub fn copy_from(&mut self, src: &Store) -> Result<CopyReport, StoreError> {
        let count = |table: &str| -> Result<i64, StoreError> {
            let r = self.query(&format!("SELECT COUNT(*) FROM {table}"), &[])?;
            r.first().map_or(Ok(0), |r| r.i64(0))
        };
        for table in ["organisations", "technicians", "sessions", "devices"] {
            let n = count(table)?;
            if n > 0 {
                return Err(StoreError::NotEmpty {
                    table: table.into(),
                    rows: n,
                });
            }
        }
        let orgs = src.query(
            "SELECT id, name, created_at FROM organisations ORDER BY id",
            &[],
        )?;
        let techs = src.query(
            "SELECT id, organisation_id, name, token_hash, disabled, created_at, last_login_at
             FROM technicians ORDER BY id",
            &[],
        )?;
        let sessions = src.query(
            &format!("SELECT {AUDIT_COLUMNS}, technician_id, node FROM sessions ORDER BY id"),
            &[],
        )?;
        let devices = src.query(
            &format!("SELECT {DEVICE_COLUMNS}, node FROM devices ORDER BY id"),
            &[],
        )?;
        let postgres = self.engine() == "postgres";
        self.db.get_mut().transaction(|db| {
            for r in &orgs {
                db.execute(
                    "INSERT INTO organisations (id, name, created_at) VALUES (?1, ?2, ?3)",
                    &[Val::I64(r.i64(0)?), Val::Text(&r.text(1)?), Val::I64(r.i64(2)?)],
                )?;
            }
            for r in &techs {
                db.execute(
                    "INSERT INTO technicians (id, organisation_id, name, token_hash, disabled, created_at, last_login_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    &[
                        Val::I64(r.i64(0)?),
                        Val::I64(r.i64(1)?),
                        Val::Text(&r.text(2)?),
                        Val::Text(&r.text(3)?),
                        Val::Bool(r.bool(4)?),
                        Val::I64(r.i64(5)?),
                        Val::OptI64(r.opt_i64(6)?),
                    ],
                )?;
            }
            for r in &sessions {
                let a = audit_row(r)?;
                db.execute(
                    "INSERT INTO sessions (id, technician, organisation, slot, agent_addr, console_addr, started_at_ms,
                        ended_at_ms, bytes_agent_to_console, bytes_console_to_agent, end_reason, went_direct,
                        bytes_direct, technician_id, node)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                    &[
                        Val::I64(a.id),
                        Val::Text(&a.technician),
                        Val::Text(&a.organisation),
                        Val::Text(&a.slot),
                        Val::Text(&a.agent_addr),
                        Val::Text(&a.console_addr),
                        Val::I64(a.started_at_ms),
                        Val::OptI64(a.ended_at_ms),
                        Val::I64(a.bytes_agent_to_console),
                        Val::I64(a.bytes_console_to_agent),
                        Val::OptText(a.end_reason.as_deref()),
                        Val::Bool(a.went_direct),
                        Val::I64(a.bytes_direct),
                        Val::OptI64(r.opt_i64(13)?),
                        Val::Text(&r.text(14)?),
                    ],
                )?;
            }
            for r in &devices {
                let d = device_row(r)?;
                db.execute(
                    "INSERT INTO devices (id, org_key, organisation, name, device_group, hostname, os, user_name,
                        cert, presence, address, first_seen, last_seen, online, node)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                    &[
                        Val::Text(&d.id),
                        Val::Text(&d.org_key),
                        Val::Text(&d.organisation),
                        Val::Text(&d.name),
                        Val::Text(&d.group),
                        Val::Text(&d.hostname),
                        Val::Text(&d.os),
                        Val::Text(&d.user),
                        Val::Text(&d.cert),
                        Val::Text(&d.presence),
                        Val::Text(&d.address),
                        Val::I64(d.first_seen),
                        Val::I64(d.last_seen),
                        Val::Bool(false),
                        Val::Text(&r.text(14)?),
                    ],
                )?;
            }
            if postgres {
                // Rows were given their ids: new rows continue after the highest.
                for table in ["organisations", "technicians", "sessions"] {
                    db.execute(
                        &format!(
                            "SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE(MAX(id), 0) + 1, false) FROM {table}"
                        ),
                        &[],
                    )?;
                }
            }
            Ok(())
        })?;
        Ok(CopyReport {
            organisations: orgs.len() as u64,
            technicians: techs.len() as u64,
            sessions: sessions.len() as u64,
            devices: devices.len() as u64,
        })
    }
}

/// Splits `tnd_<id>_<secret>`.
fn parse_token(token: &str) -> Option<(i64, &str)> {
    let rest = token.trim().strip_prefix("tnd_")?;
    let (id, secret) = rest.split_once('_')?;
    let id = id.parse::<i64>().ok()?;
    if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((id, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_without_argon2_and_old_ones_are_rehashed() {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let mut s = Store::open_in_memory().unwrap();
        let (row, token) = s.add_technician("ACME IT", "alice").unwrap();
        let before = s.hashes_run();
        assert!(matches!(
            s.authenticate(&token).unwrap(),
            AuthOutcome::Ok(_)
        ));
        assert_eq!(s.hashes_run(), before, "a new token needs no Argon2");
        // A token issued before (stored as Argon2id) still works, once slowly, then fast.
        let secret = &token[token.len() - 64..];
        let salt = SaltString::encode_b64(&[7u8; 16]).unwrap();
        let old = Argon2::default()
            .hash_password(secret.as_bytes(), &salt)
            .unwrap()
            .to_string();
        s.execute(
            "UPDATE technicians SET token_hash = ?1 WHERE id = ?2",
            &[Val::Text(&old), Val::I64(row.id)],
        )
        .unwrap();
        let (c, _) = s.lookup(&token).unwrap().unwrap();
        assert!(c.needs_slow_check());
        assert!(matches!(
            s.authenticate(&token).unwrap(),
            AuthOutcome::Ok(_)
        ));
        assert_eq!(s.hashes_run(), before + 1);
        let (c, _) = s.lookup(&token).unwrap().unwrap();
        assert!(!c.needs_slow_check(), "rehashed at its first login");
        assert!(matches!(
            s.authenticate(&token).unwrap(),
            AuthOutcome::Ok(_)
        ));
        assert_eq!(s.hashes_run(), before + 1);
        // A wrong secret for an old-style row is refused and does not rehash it.
        s.execute(
            "UPDATE technicians SET token_hash = ?1 WHERE id = ?2",
            &[Val::Text(&old), Val::I64(row.id)],
        )
        .unwrap();
        let mut wrong = token.clone();
        wrong.pop();
        wrong.push(if token.ends_with('0') { '1' } else { '0' });
        assert_eq!(s.authenticate(&wrong).unwrap(), AuthOutcome::BadToken);
        let (c, _) = s.lookup(&token).unwrap().unwrap();
        assert!(c.needs_slow_check());
    }

    #[cfg(unix)]
    #[test]
    fn the_database_is_created_for_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        drop(s);
        let mode = std::fs::metadata(dir.path().join(DB_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "database readable by others: {mode:o}");
        // Opening it again keeps it (an existing database is not replaced).
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn add_authenticate_disable_rotate() {
        let mut s = Store::open_in_memory().unwrap();
        let (row, token) = s.add_technician("ACME IT", "alice").unwrap();
        assert!(token.starts_with(&format!("tnd_{}_", row.id)));
        match s.authenticate(&token).unwrap() {
            AuthOutcome::Ok(t) => {
                assert_eq!(t.name, "alice");
                assert_eq!(t.organisation, "ACME IT");
            }
            other => panic!("{other:?}"),
        }
        // The token is stored only as a hash.
        let stored = s.query("SELECT token_hash FROM technicians", &[]).unwrap()[0]
            .text(0)
            .unwrap();
        assert!(stored.starts_with("sha256$"), "{stored}");
        assert!(!stored.contains(&token[token.len() - 64..]));

        let mut wrong = token.clone();
        wrong.pop();
        wrong.push(if token.ends_with('0') { '1' } else { '0' });
        assert_eq!(s.authenticate(&wrong).unwrap(), AuthOutcome::BadToken);
        assert_eq!(s.authenticate("garbage").unwrap(), AuthOutcome::BadToken);
        assert_eq!(
            s.authenticate(&format!("tnd_999_{}", "0".repeat(64)))
                .unwrap(),
            AuthOutcome::BadToken
        );

        s.set_disabled(row.id, true).unwrap();
        assert_eq!(s.authenticate(&token).unwrap(), AuthOutcome::Disabled);
        // A wrong token for a disabled account says "bad token", not "disabled".
        assert_eq!(s.authenticate(&wrong).unwrap(), AuthOutcome::BadToken);
        s.set_disabled(row.id, false).unwrap();

        let new = s.rotate_token(row.id).unwrap();
        assert_eq!(s.authenticate(&token).unwrap(), AuthOutcome::BadToken);
        assert!(matches!(s.authenticate(&new).unwrap(), AuthOutcome::Ok(_)));
        assert!(
            s.list_technicians().unwrap()[0].last_login_at.is_some(),
            "login time recorded"
        );
    }

    #[test]
    fn duplicate_and_lookup() {
        let mut s = Store::open_in_memory().unwrap();
        s.add_technician("A", "bob").unwrap();
        assert!(matches!(
            s.add_technician("A", "bob"),
            Err(StoreError::Exists { .. })
        ));
        s.add_technician("B", "bob").unwrap();
        assert!(matches!(
            s.find_technician("bob", None),
            Err(StoreError::Ambiguous(_))
        ));
        assert_eq!(
            s.find_technician("bob", Some("B")).unwrap().organisation,
            "B"
        );
        assert_eq!(s.find_technician("1", None).unwrap().organisation, "A");
        assert!(matches!(
            s.find_technician("carol", None),
            Err(StoreError::NoSuchTechnician(_))
        ));
        assert!(s.add_technician("", "x").is_err());
        assert!(s.add_technician("A", "bad\nname").is_err());
    }

    #[test]
    fn audit_rows() {
        let mut s = Store::open_in_memory().unwrap();
        let (row, _) = s.add_technician("ACME", "alice").unwrap();
        let tech = Technician {
            id: row.id,
            name: row.name,
            organisation: row.organisation,
        };
        let id = s
            .audit_start(&SessionStart {
                technician: &tech,
                slot: "417",
                agent_addr: "10.0.0.1:5000".into(),
                console_addr: "10.0.0.2:6000".into(),
                key: None,
            })
            .unwrap();
        let open = s.audit(10).unwrap();
        assert_eq!(open[0].ended_at_ms, None);
        s.audit_end(id, 1000, 20, "ended_by_user", Some(5000))
            .unwrap();
        let rows = s.audit(10).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].bytes_agent_to_console, 1000);
        assert_eq!(rows[0].bytes_console_to_agent, 20);
        assert!(rows[0].went_direct);
        assert_eq!(rows[0].bytes_direct, 5000);
        assert_eq!(rows[0].end_reason.as_deref(), Some("ended_by_user"));
        assert!(rows[0].ended_at_ms.unwrap() >= rows[0].started_at_ms);
    }

    #[test]
    fn reopen_keeps_data_and_closes_dangling_rows() {
        let dir = tempfile::tempdir().unwrap();
        let token;
        {
            let mut s = Store::open(dir.path()).unwrap();
            let (row, t) = s.add_technician("ACME", "alice").unwrap();
            token = t;
            let tech = Technician {
                id: row.id,
                name: row.name,
                organisation: row.organisation,
            };
            s.audit_start(&SessionStart {
                technician: &tech,
                slot: "123",
                agent_addr: "a".into(),
                console_addr: "c".into(),
                key: None,
            })
            .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert!(matches!(
            s.authenticate(&token).unwrap(),
            AuthOutcome::Ok(_)
        ));
        assert_eq!(s.close_dangling().unwrap(), 1);
        assert_eq!(
            s.audit(1).unwrap()[0].end_reason.as_deref(),
            Some("relay_stopped")
        );
    }

    #[test]
    fn unknown_id_is_refused_without_argon2() {
        let mut s = Store::open_in_memory().unwrap();
        let (row, token) = s.add_technician("ACME", "alice").unwrap();
        let secret = &token[token.len() - 64..];
        let wrong_secret = format!("tnd_{}_{}", row.id, "0".repeat(64));
        let unknown_id = format!("tnd_{}_{secret}", row.id + 1000);
        let time = |t: &str| {
            (0..3)
                .map(|_| {
                    let start = std::time::Instant::now();
                    assert_eq!(s.authenticate(t).unwrap(), AuthOutcome::BadToken);
                    start.elapsed()
                })
                .min()
                .unwrap()
        };
        let before = s.hashes_run();
        time(&unknown_id);
        time("tnd_x_y");
        assert_eq!(s.hashes_run(), before, "no Argon2 for an unknown id");
        // Nor for a wrong secret of a known id: tokens are stored as SHA-256 (an Argon2 per
        // attempt let made-up tokens of guessable ids keep the verification threads busy).
        time(&wrong_secret);
        assert_eq!(s.hashes_run(), before, "no Argon2 for a known id either");
        assert!(format!("{:?}", s.lookup(&token).unwrap().unwrap()).contains("redacted"));
    }
}
