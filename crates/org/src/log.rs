//! The agent's **session log**: a local record of the sessions that happened on an enrolled
//! computer, signed by its device key, so that an administrator can later prove what happened and
//! see that nobody removed or altered entries.
//!
//! # The file
//!
//! One entry per line, as JSON (JSON Lines), for example:
//!
//! ```text
//! {"seq":0,"time":1800000000,"event":"start","technician":"alice","organisation":"ACME IT","cert":"9f0c…","mode":"unattended","detail":"","prev":"0000…0000","sig":"Xb3…"}
//! ```
//!
//! * `seq` numbers the entries 0, 1, 2, … without gaps.
//! * `time` is the agent's clock (Unix seconds). It is what the computer believed, not a proof of
//!   when: clocks go wrong, and the verifier does not require it to grow.
//! * `event` ([`EVENT_START`], [`EVENT_END`], [`EVENT_LOG_DAMAGED`], …), `technician`,
//!   `organisation`, `cert` (the certificate id in hex), `mode` ([`MODE_ATTENDED`],
//!   [`MODE_UNATTENDED`]) and `detail` are text of at most [`MAX_FIELD`] bytes; control and
//!   bidirectional formatting characters are replaced by `�` and longer text is cut (ending in
//!   `…`) when the entry is written.
//! * `prev` is the SHA-256, in hex, of the previous line's bytes (without its newline; what
//!   `head -n1 log | tr -d '\n' | sha256sum` prints), or 64 zeros for the first entry.
//! * `sig` is the device key's Ed25519 signature (base64url, no padding) over a domain-separated
//!   encoding of every other field (domain `tandem session log entry v1`, then the postcard
//!   encoding of `(seq, time, event, technician, organisation, cert, mode, detail, prev)`).
//!
//! The file is created with mode 0600; each entry is one `write` in append mode followed by an
//! fsync. One process writes a log ([`SessionLog`]); a second writer would fork the chain, which
//! the verifier reports.
//!
//! # What verification proves
//!
//! [`verify_log`] checks, with the device's public key (from its device certificate), every
//! signature, the numbering and the chain, and reports each problem with its line number:
//!
//! * an **altered** line, or one **written with another key**: [`Problem::BadSignature`];
//! * a **removed** line in the middle: [`Problem::Missing`] at the line after the gap;
//! * **reordered** or repeated lines: [`Problem::OutOfOrder`], and [`Problem::ChainBroken`] where a
//!   line no longer follows the one it was written after;
//! * **inserted** text that is not an entry: [`Problem::NotAnEntry`].
//!
//! Lines that are not good entries (not entries, or not signed by the key) are reported and then
//! left out: the numbering and the chain are checked over the good entries only.
//!
//! **Removing the last lines cannot be detected** by a hash chain alone: what remains is a valid,
//! shorter log, and whoever controls the computer (root) can also delete the whole file. The
//! relay's audit rows (a session's start and end, kept on another machine) are the independent
//! record to compare it with; this log adds what the relay cannot see (who was verified, with
//! which certificate, attended or not) and, signed by the device key, cannot be forged by the
//! relay.
//!
//! # Crashes
//!
//! A crash or power loss during a write can leave an incomplete last line. [`SessionLog::open`]
//! never truncates: it ends that line with a newline, leaving its bytes in place, and writes a
//! [`EVENT_LOG_DAMAGED`] entry saying how many lines and bytes after the last good entry are not
//! entries, chained to that last good entry. The verifier still reports those lines, marked
//! `recorded: true` when the entry right after them accounts for exactly them.

use crate::{KeyPair, OrgError, PublicKey, encode, signed_message};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Longest text field of an entry, in bytes.
pub const MAX_FIELD: usize = 256;
/// Longest line the verifier reads as an entry (six full text fields, JSON-escaped, fit easily).
pub const MAX_LINE: usize = 8 * 1024;

/// A session started.
pub const EVENT_START: &str = "start";
/// A session ended.
pub const EVENT_END: &str = "end";
/// The agent found lines that are not entries after the last good entry when it opened the log.
pub const EVENT_LOG_DAMAGED: &str = "log-damaged";
/// Someone at the computer accepted the session.
pub const MODE_ATTENDED: &str = "attended";
/// Nobody was asked: the technician's certificate allowed unattended access.
pub const MODE_UNATTENDED: &str = "unattended";

const DOMAIN_LOG: &[u8] = b"tandem session log entry v1";
const ZERO_HASH: [u8; 32] = [0; 32];
/// How much of the end of the file is read first when opening it (doubled until a good entry is
/// found or the whole file is read).
const TAIL_WINDOW: u64 = 64 * 1024;

/// What the agent records; the log adds the number, time, chain and signature.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// [`EVENT_START`], [`EVENT_END`] or another word.
    pub event: String,
    pub technician: String,
    pub organisation: String,
    /// The technician certificate's id in hex (empty: not verified).
    pub cert: String,
    /// [`MODE_ATTENDED`] or [`MODE_UNATTENDED`] (empty where it does not apply).
    pub mode: String,
    /// Free text (a reason, the permissions granted, the relay's session id, …).
    pub detail: String,
}

/// One line of the log, as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogEntry {
    pub seq: u64,
    /// Unix seconds, by the agent's clock.
    pub time: u64,
    pub event: String,
    pub technician: String,
    pub organisation: String,
    pub cert: String,
    pub mode: String,
    pub detail: String,
    /// SHA-256 of the previous line's bytes, hex (64 zeros for the first entry).
    pub prev: String,
    /// Ed25519 signature by the device key, base64url.
    pub sig: String,
}

impl LogEntry {
    /// Makes and signs entry `seq` from `record` (its text bounded and cleaned).
    fn sign(key: &KeyPair, seq: u64, time: u64, record: &Record, prev: &[u8; 32]) -> LogEntry {
        let mut e = LogEntry {
            seq,
            time,
            event: bounded(&record.event),
            technician: bounded(&record.technician),
            organisation: bounded(&record.organisation),
            cert: bounded(&record.cert),
            mode: bounded(&record.mode),
            detail: bounded(&record.detail),
            prev: hex(prev),
            sig: String::new(),
        };
        e.sig = B64.encode(key.sign(DOMAIN_LOG, &e.signed_body()));
        e
    }

    /// What the signature covers (with [`DOMAIN_LOG`]): every field but `sig`.
    fn signed_body(&self) -> Vec<u8> {
        encode(&(
            self.seq,
            self.time,
            &self.event,
            &self.technician,
            &self.organisation,
            &self.cert,
            &self.mode,
            &self.detail,
            &self.prev,
        ))
    }

    /// Whether `key` signed this entry as it is.
    pub fn is_signed_by(&self, key: &PublicKey) -> bool {
        match B64.decode(&self.sig) {
            Ok(sig) => key.verify(&signed_message(DOMAIN_LOG, &self.signed_body()), &sig),
            Err(_) => false,
        }
    }

    /// Reads one line (without its newline) as an entry, checking its form but not its signature.
    /// The error says why it is not an entry.
    pub fn from_line(line: &[u8]) -> Result<LogEntry, String> {
        if line.is_empty() {
            return Err("an empty line".into());
        }
        if line.len() > MAX_LINE {
            return Err(format!(
                "{} bytes, longer than any entry ({MAX_LINE})",
                line.len()
            ));
        }
        let e: LogEntry =
            serde_json::from_slice(line).map_err(|err| format!("not an entry's JSON: {err}"))?;
        for (name, text) in [
            ("event", &e.event),
            ("technician", &e.technician),
            ("organisation", &e.organisation),
            ("cert", &e.cert),
            ("mode", &e.mode),
            ("detail", &e.detail),
        ] {
            if text.len() > MAX_FIELD {
                return Err(format!("its {name} is longer than {MAX_FIELD} bytes"));
            }
            if text.chars().any(is_hidden) {
                return Err(format!("its {name} contains control characters"));
            }
        }
        if e.prev.len() != 64
            || !e
                .prev
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err("its prev is not a SHA-256 in lower-case hex".into());
        }
        if B64.decode(&e.sig).map(|s| s.len()).ok() != Some(64) {
            return Err("its sig is not an Ed25519 signature in base64url".into());
        }
        Ok(e)
    }

    /// The entry as one line of JSON (without the newline).
    fn to_json(&self) -> Result<Vec<u8>, OrgError> {
        // Cannot fail for a struct of numbers and strings; no panic if it ever did.
        serde_json::to_vec(self).map_err(|_| OrgError::Malformed("session log entry"))
    }
}

/// Control characters and bidirectional formatting characters (which could make an entry read
/// differently from what it says).
fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// `s` with hidden characters replaced by `�`, cut to at most [`MAX_FIELD`] bytes (ending in `…`
/// when cut).
fn bounded(s: &str) -> String {
    let clean: String = s
        .chars()
        .map(|c| if is_hidden(c) { '\u{FFFD}' } else { c })
        .collect();
    if clean.len() <= MAX_FIELD {
        return clean;
    }
    let mut out = String::with_capacity(MAX_FIELD);
    for c in clean.chars() {
        if out.len() + c.len_utf8() > MAX_FIELD - '…'.len_utf8() {
            break;
        }
        out.push(c);
    }
    out.push('…');
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Plain SHA-256 of a line's bytes (without its newline).
fn line_hash(line: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, line).as_ref());
    out
}

/// The lines of a log: separated by newlines, the last one possibly without.
fn split_lines(bytes: &[u8]) -> Vec<&[u8]> {
    if bytes.is_empty() {
        return Vec::new();
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    body.split(|b| *b == b'\n').collect()
}

/// The `detail` of a [`EVENT_LOG_DAMAGED`] entry: exactly what the verifier expects to see above
/// it.
fn damage_detail(lines: usize, bytes: u64) -> String {
    format!(
        "{lines} line(s) of {bytes} byte(s) after the last good entry are not entries \
         (an interrupted write?); left in place above this entry"
    )
}

/// The end of an existing log, as [`SessionLog`] needs it to continue.
#[derive(Debug, Default)]
struct Tail {
    /// Number and line hash of the last good entry (well formed and signed by the device key).
    last: Option<(u64, [u8; 32])>,
    /// Lines after it (none of them a good entry) and their bytes without newlines.
    run_lines: usize,
    run_bytes: u64,
    /// The file does not end with a newline.
    unterminated: bool,
}

fn scan(path: &Path, key: &PublicKey) -> Result<Tail, OrgError> {
    let err = |e| OrgError::io("cannot read the session log", path, e);
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Tail::default()),
        Err(e) => return Err(err(e)),
    };
    let len = f.metadata().map_err(err)?.len();
    let mut window = TAIL_WINDOW;
    loop {
        let start = len.saturating_sub(window);
        f.seek(SeekFrom::Start(start)).map_err(err)?;
        let mut buf = Vec::new();
        (&mut f)
            .take(len - start)
            .read_to_end(&mut buf)
            .map_err(err)?;
        let mut tail = Tail {
            unterminated: buf.last().is_some_and(|b| *b != b'\n'),
            ..Tail::default()
        };
        // Away from the start of the file, the first line read may be the end of a longer one.
        let body = if start == 0 {
            Some(&buf[..])
        } else {
            buf.iter().position(|b| *b == b'\n').map(|i| &buf[i + 1..])
        };
        if let Some(body) = body {
            let lines = split_lines(body);
            for line in lines.iter().rev() {
                if let Ok(e) = LogEntry::from_line(line)
                    && e.is_signed_by(key)
                {
                    tail.last = Some((e.seq, line_hash(line)));
                    break;
                }
                tail.run_lines += 1;
                tail.run_bytes += line.len() as u64;
            }
        }
        if tail.last.is_some() || start == 0 {
            return Ok(tail);
        }
        window = window.saturating_mul(2);
    }
}

/// The agent's session log file, continued from where it ends (see the module documentation).
#[derive(Debug)]
pub struct SessionLog {
    path: PathBuf,
    /// The device key (the log's own copy).
    key: KeyPair,
    next_seq: u64,
    /// Hash of the last line written.
    prev: [u8; 32],
    /// A write failed part way: look at the file again before the next one.
    dirty: bool,
}

impl SessionLog {
    /// Opens the log at `path` (created with mode 0600 at the first entry), continuing the chain
    /// after its last good entry. Lines after that entry that are not good entries (an interrupted
    /// write) are left in place, ended with a newline, and recorded in a [`EVENT_LOG_DAMAGED`]
    /// entry at `now`.
    pub fn open(path: &Path, device_key: &KeyPair, now: u64) -> Result<SessionLog, OrgError> {
        let mut log = SessionLog {
            path: path.to_path_buf(),
            key: KeyPair::from_pkcs8(&device_key.pkcs8)?,
            next_seq: 0,
            prev: ZERO_HASH,
            dirty: true,
        };
        log.resume(now)?;
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The number the next entry will have.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends `record` at `now`, synced to disk when this returns; the entry written.
    pub fn append(&mut self, record: &Record, now: u64) -> Result<LogEntry, OrgError> {
        if self.dirty {
            self.resume(now)?;
        }
        let entry = LogEntry::sign(&self.key, self.next_seq, now, record, &self.prev);
        let mut line = entry.to_json()?;
        let hash = line_hash(&line);
        line.push(b'\n');
        self.write(&line)?;
        self.next_seq = self.next_seq.saturating_add(1);
        self.prev = hash;
        Ok(entry)
    }

    /// Reads the end of the file to continue after its last good entry; ends an incomplete line
    /// and records damage.
    fn resume(&mut self, now: u64) -> Result<(), OrgError> {
        let tail = scan(&self.path, &self.key.public())?;
        (self.next_seq, self.prev) = match tail.last {
            Some((seq, hash)) => (seq.saturating_add(1), hash),
            None => (0, ZERO_HASH),
        };
        let mut out = Vec::new();
        if tail.unterminated {
            out.push(b'\n');
        }
        let mut damage = None;
        if tail.run_lines > 0 {
            let record = Record {
                event: EVENT_LOG_DAMAGED.into(),
                detail: damage_detail(tail.run_lines, tail.run_bytes),
                ..Record::default()
            };
            let entry = LogEntry::sign(&self.key, self.next_seq, now, &record, &self.prev);
            let line = entry.to_json()?;
            damage = Some(line_hash(&line));
            out.extend_from_slice(&line);
            out.push(b'\n');
            tracing::warn!(
                file = %self.path.display(),
                lines = tail.run_lines,
                bytes = tail.run_bytes,
                "the session log ends with lines that are not entries (an interrupted write?); \
                 left in place and recorded"
            );
        }
        if !out.is_empty() {
            self.write(&out)?;
        }
        if let Some(hash) = damage {
            self.next_seq = self.next_seq.saturating_add(1);
            self.prev = hash;
        }
        self.dirty = false;
        Ok(())
    }

    /// Appends `bytes` in one write and syncs; on failure the file is looked at again before the
    /// next entry (it may hold part of this one).
    fn write(&mut self, bytes: &[u8]) -> Result<(), OrgError> {
        let written = append_synced(&self.path, bytes);
        if written.is_err() {
            self.dirty = true;
        }
        written.map_err(|e| OrgError::io("cannot append to the session log", &self.path, e))
    }
}

fn append_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)?;
    let mut create = OpenOptions::new();
    create.append(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        create.mode(0o600);
    }
    let (mut f, created) = match create.open(path) {
        Ok(f) => (f, true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            (OpenOptions::new().append(true).open(path)?, false)
        }
        Err(e) => return Err(e),
    };
    f.write_all(bytes)?;
    f.sync_data()?;
    if created {
        // The new file's name must survive a crash too.
        #[cfg(unix)]
        if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot sync the session log's directory");
        }
    }
    Ok(())
}

/// What is wrong with one line of a log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// Not an entry at all. `recorded`: the agent found it after its last good entry when it
    /// started and said so in the [`EVENT_LOG_DAMAGED`] entry right after it (a crash during a
    /// write); otherwise it was edited in, or the crash is not recorded yet.
    #[error("not a log entry ({reason}); {}", damage_note(*.recorded))]
    NotAnEntry { reason: String, recorded: bool },
    /// Well formed but not signed by the device key as it is.
    #[error(
        "not signed by this computer's device key: altered after it was written, or written by \
         someone else"
    )]
    BadSignature,
    /// Good entries numbered `first..=last` are nowhere in the log.
    #[error("{}", missing_note(*.first, *.last))]
    Missing { first: u64, last: u64 },
    /// Entry `found` where `expected` should come.
    #[error(
        "entry {found} where entry {expected} was expected: entries were reordered or repeated"
    )]
    OutOfOrder { expected: u64, found: u64 },
    /// Its `prev` is not the hash of the good entry before it.
    #[error(
        "does not follow the entry before it (its prev is not that line's SHA-256): lines were \
         removed, inserted or reordered"
    )]
    ChainBroken,
}

fn damage_note(recorded: bool) -> &'static str {
    if recorded {
        "the agent found this damage when it started and recorded it in the next entry"
    } else {
        "edited in, or cut short by a crash the agent has not recorded yet"
    }
}

fn missing_note(first: u64, last: u64) -> String {
    let what = if first == last {
        format!("entry {first} is")
    } else {
        format!("entries {first} to {last} are")
    };
    format!("{what} missing before this line (removed, or replaced by lines reported above)")
}

/// A problem and its line (counted from 1).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct LogProblem {
    pub line: usize,
    pub problem: Problem,
}

/// What [`verify_log`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogReport {
    /// Good entries: well formed and signed by the device key.
    pub entries: usize,
    /// Times of the first and last good entries, in file order.
    pub first_time: Option<u64>,
    pub last_time: Option<u64>,
    /// Every problem, in line order, at most one per line.
    pub problems: Vec<LogProblem>,
}

impl LogReport {
    /// No problem: every line is a good entry, numbered 0, 1, 2, … and chained. (Lines removed
    /// from the end cannot be seen; see the module documentation.)
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A line as the verifier classifies it.
enum Line {
    NotAnEntry(String),
    Forged,
    Good(LogEntry),
}

/// Checks a whole log (its file's bytes; `&str` and `String` will do) against the device's public
/// key: every signature, the numbering (0, 1, 2, … without gaps) and the chain. Every problem is
/// reported with its line number.
#[must_use]
pub fn verify_log(log: impl AsRef<[u8]>, device_key: &PublicKey) -> LogReport {
    let raw = split_lines(log.as_ref());
    let lines: Vec<Line> = raw
        .iter()
        .map(|l| match LogEntry::from_line(l) {
            Err(why) => Line::NotAnEntry(why),
            Ok(e) if !e.is_signed_by(device_key) => Line::Forged,
            Ok(e) => Line::Good(e),
        })
        .collect();
    let good_seqs: BTreeSet<u64> = lines
        .iter()
        .filter_map(|l| match l {
            Line::Good(e) => Some(e.seq),
            _ => None,
        })
        .collect();

    // Damage the agent accounted for: the run of lines that are not good entries right before a
    // log-damaged entry whose detail describes exactly that run.
    let mut recorded = vec![false; lines.len()];
    for (i, l) in lines.iter().enumerate() {
        let Line::Good(e) = l else { continue };
        if e.event != EVENT_LOG_DAMAGED {
            continue;
        }
        let run = lines[..i]
            .iter()
            .rev()
            .take_while(|l| !matches!(l, Line::Good(_)))
            .count();
        let bytes: u64 = raw[i - run..i].iter().map(|l| l.len() as u64).sum();
        if run > 0 && e.detail == damage_detail(run, bytes) {
            recorded[i - run..i].fill(true);
        }
    }

    let mut report = LogReport {
        entries: 0,
        first_time: None,
        last_time: None,
        problems: Vec::new(),
    };
    let mut expected = 0u64;
    let mut prev = hex(&ZERO_HASH);
    for (i, l) in lines.into_iter().enumerate() {
        let problem = match l {
            Line::NotAnEntry(reason) => Some(Problem::NotAnEntry {
                reason,
                recorded: recorded[i],
            }),
            Line::Forged => Some(Problem::BadSignature),
            Line::Good(e) => {
                report.entries += 1;
                report.first_time.get_or_insert(e.time);
                report.last_time = Some(e.time);
                let problem = if e.seq > expected {
                    if good_seqs.range(expected..e.seq).next().is_none() {
                        Some(Problem::Missing {
                            first: expected,
                            last: e.seq - 1,
                        })
                    } else {
                        Some(Problem::OutOfOrder {
                            expected,
                            found: e.seq,
                        })
                    }
                } else if e.seq < expected {
                    Some(Problem::OutOfOrder {
                        expected,
                        found: e.seq,
                    })
                } else if e.prev != prev {
                    Some(Problem::ChainBroken)
                } else {
                    None
                };
                expected = expected.max(e.seq.saturating_add(1));
                prev = hex(&line_hash(raw[i]));
                problem
            }
        };
        if let Some(problem) = problem {
            report.problems.push(LogProblem {
                line: i + 1,
                problem,
            });
        }
    }
    report
}

#[cfg(test)]
#[path = "log_tests.rs"]
mod tests;
