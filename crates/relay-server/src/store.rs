//! The relay's embedded store (SQLite): organisations, technicians and the audit log.
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
//! * Schema changes are numbered migrations tracked in `PRAGMA user_version`.

use crate::registry::{Technician, TechnicianId};
use argon2::Argon2;
use argon2::password_hash::PasswordHash;
use argon2::{Algorithm, Block, Params, Version};
use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

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
}

const MIGRATIONS: &[&str] = &[
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
];

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
    conn: Connection,
    rng: SystemRandom,
    /// Argon2 working memory, allocated once and reused by every verification on this store (the
    /// crate's own verifier allocates ~19 MiB per call, which the allocator then keeps around).
    blocks: RefCell<Vec<Block>>,
    /// Argon2 verifications run by this store.
    hashes: std::cell::Cell<u64>,
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

impl Store {
    /// Opens (creating if needed) the database in `data_dir` and applies pending migrations.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join(DB_FILE);
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
                .open(&path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(StoreError::Create {
                        path: path.clone(),
                        source,
                    });
                }
            }
        }
        let conn = Connection::open(&path).map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        Self::init(conn)
    }

    /// An in-memory store (tests).
    pub fn open_in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Self, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "foreign_keys", true)?;
        // WAL lets admin commands run while the relay writes; ignored for in-memory databases.
        let _: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                found: version,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
            tracing::info!(version = i + 1, "applied database migration");
        }
        Ok(Store {
            conn,
            rng: SystemRandom::new(),
            blocks: RefCell::new(Vec::new()),
            hashes: std::cell::Cell::new(0),
        })
    }

    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?)
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
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO organisations (name, created_at) VALUES (?1, ?2)",
            params![organisation, now],
        )?;
        let org_id: i64 = tx.query_row(
            "SELECT id FROM organisations WHERE name = ?1",
            [organisation],
            |r| r.get(0),
        )?;
        let res = tx.execute(
            "INSERT INTO technicians (organisation_id, name, token_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![org_id, name, hash, now],
        );
        match res {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(StoreError::Exists {
                    name: name.into(),
                    organisation: organisation.into(),
                });
            }
            r => {
                r?;
            }
        }
        let id = tx.last_insert_rowid();
        tx.commit()?;
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
        let mut st = self.conn.prepare(
            "SELECT t.id, t.name, o.name, t.disabled, t.created_at, t.last_login_at
             FROM technicians t JOIN organisations o ON o.id = t.organisation_id ORDER BY o.name, t.name",
        )?;
        let rows = st
            .query_map([], |r| {
                Ok(TechnicianRow {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    organisation: r.get(2)?,
                    disabled: r.get(3)?,
                    created_at: r.get(4)?,
                    last_login_at: r.get(5)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
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
        let n = self.conn.execute(
            "UPDATE technicians SET disabled = ?1 WHERE id = ?2",
            params![disabled, id],
        )?;
        if n == 0 {
            return Err(StoreError::NoSuchTechnician(id.to_string()));
        }
        Ok(())
    }

    /// Replaces a technician's token; the old one stops working at once. Returns the new token.
    pub fn rotate_token(&self, id: TechnicianId) -> Result<String, StoreError> {
        let (secret, hash) = self.new_secret()?;
        let n = self.conn.execute(
            "UPDATE technicians SET token_hash = ?1 WHERE id = ?2",
            params![hash, id],
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
        let row = self
            .conn
            .query_row(
                "SELECT t.token_hash, t.disabled, t.name, o.name
                 FROM technicians t JOIN organisations o ON o.id = t.organisation_id WHERE t.id = ?1",
                [id],
                |r| {
                    Ok(Candidate {
                        id,
                        token_hash: r.get(0)?,
                        disabled: r.get(1)?,
                        name: r.get(2)?,
                        organisation: r.get(3)?,
                    })
                },
            )
            .optional()?;
        Ok(row.map(|c| (c, TokenSecret(secret.to_string()))))
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
            self.conn.execute(
                "UPDATE technicians SET token_hash = ?1 WHERE id = ?2 AND token_hash = ?3",
                params![fast, c.id, c.token_hash],
            )?;
        } else if !same(fast.as_bytes(), c.token_hash.as_bytes()) {
            return Ok(AuthOutcome::BadToken);
        }
        if c.disabled {
            return Ok(AuthOutcome::Disabled);
        }
        self.conn.execute(
            "UPDATE technicians SET last_login_at = ?1 WHERE id = ?2",
            params![now_secs(), c.id],
        )?;
        Ok(AuthOutcome::Ok(Technician {
            id: c.id,
            name: c.name.clone(),
            organisation: c.organisation.clone(),
        }))
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
        self.conn.execute(
            "INSERT INTO sessions (technician_id, technician, organisation, slot, agent_addr, console_addr, started_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                s.technician.id,
                s.technician.name,
                s.technician.organisation,
                s.slot,
                s.agent_addr,
                s.console_addr,
                now_ms()
            ],
        )?;
        Ok(self.conn.last_insert_rowid())
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
        self.conn.execute(
            "UPDATE sessions SET ended_at_ms = ?1, bytes_agent_to_console = ?2, bytes_console_to_agent = ?3, end_reason = ?4,
                    went_direct = ?6, bytes_direct = ?7
             WHERE id = ?5",
            params![
                now_ms(),
                agent_to_console as i64,
                console_to_agent as i64,
                reason,
                row,
                direct.is_some(),
                direct.unwrap_or(0).min(i64::MAX as u64) as i64
            ],
        )?;
        Ok(())
    }

    /// Records a device that came online (or refreshes it).
    pub fn device_online(&self, d: &DeviceRow) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO devices (id, org_key, organisation, name, device_group, hostname, os, user_name,
                                  cert, presence, address, first_seen, last_seen, online)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12, 1)
             ON CONFLICT (id) DO UPDATE SET org_key = ?2, organisation = ?3, name = ?4,
                device_group = ?5, hostname = ?6, os = ?7, user_name = ?8, cert = ?9, presence = ?10,
                address = ?11, last_seen = ?12, online = 1",
            params![
                d.id,
                d.org_key,
                d.organisation,
                d.name,
                d.group,
                d.hostname,
                d.os,
                d.user,
                d.cert,
                d.presence,
                d.address,
                d.last_seen
            ],
        )?;
        Ok(())
    }

    /// Records that a device went offline at `last_seen`.
    pub fn device_offline(&self, id: &str, last_seen: i64) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE devices SET online = 0, last_seen = ?2 WHERE id = ?1",
            params![id, last_seen],
        )?;
        Ok(())
    }

    /// Marks every device offline (at start: none is connected yet).
    pub fn devices_all_offline(&self) -> Result<usize, StoreError> {
        Ok(self
            .conn
            .execute("UPDATE devices SET online = 0 WHERE online = 1", [])?)
    }

    /// Every device, by name.
    pub fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT id, org_key, organisation, name, device_group, hostname, os, user_name, cert,
                    presence, address, first_seen, last_seen, online
             FROM devices ORDER BY organisation, name, id",
        )?;
        let rows = st
            .query_map([], |r| {
                Ok(DeviceRow {
                    id: r.get(0)?,
                    org_key: r.get(1)?,
                    organisation: r.get(2)?,
                    name: r.get(3)?,
                    group: r.get(4)?,
                    hostname: r.get(5)?,
                    os: r.get(6)?,
                    user: r.get(7)?,
                    cert: r.get(8)?,
                    presence: r.get(9)?,
                    address: r.get(10)?,
                    first_seen: r.get(11)?,
                    last_seen: r.get(12)?,
                    online: r.get::<_, i64>(13)? != 0,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Forgets a device (admin command); whether it was known.
    pub fn remove_device(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM devices WHERE id = ?1", [id])?
            > 0)
    }

    /// Closes audit rows left open by a relay that stopped without draining.
    pub fn close_dangling(&self) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "UPDATE sessions SET ended_at_ms = ?1, end_reason = 'relay_stopped' WHERE ended_at_ms IS NULL",
            [now_ms()],
        )?)
    }

    /// The newest `limit` audit rows, newest first.
    pub fn audit(&self, limit: usize) -> Result<Vec<AuditRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT id, technician, organisation, slot, agent_addr, console_addr, started_at_ms, ended_at_ms,
                    bytes_agent_to_console, bytes_console_to_agent, end_reason, went_direct, bytes_direct
             FROM sessions ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = st
            .query_map([limit as i64], |r| {
                Ok(AuditRow {
                    id: r.get(0)?,
                    technician: r.get(1)?,
                    organisation: r.get(2)?,
                    slot: r.get(3)?,
                    agent_addr: r.get(4)?,
                    console_addr: r.get(5)?,
                    started_at_ms: r.get(6)?,
                    ended_at_ms: r.get(7)?,
                    bytes_agent_to_console: r.get(8)?,
                    bytes_console_to_agent: r.get(9)?,
                    end_reason: r.get(10)?,
                    went_direct: r.get(11)?,
                    bytes_direct: r.get(12)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
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
        s.conn
            .execute(
                "UPDATE technicians SET token_hash = ?1 WHERE id = ?2",
                params![old, row.id],
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
        s.conn
            .execute(
                "UPDATE technicians SET token_hash = ?1 WHERE id = ?2",
                params![old, row.id],
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
        let stored: String = s
            .conn
            .query_row("SELECT token_hash FROM technicians", [], |r| r.get(0))
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
            })
            .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len() as i64);
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
