#![allow(clippy::unwrap_used)]

use super::*;

const NOW: u64 = 1_800_000_000;

fn rec(event: &str, technician: &str) -> Record {
    Record {
        event: event.into(),
        technician: technician.into(),
        organisation: "ACME IT".into(),
        cert: "00112233445566778899aabbccddeeff".into(),
        mode: MODE_UNATTENDED.into(),
        detail: "view, control".into(),
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn lines(path: &Path) -> Vec<String> {
    String::from_utf8(read(path))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

fn append_raw(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(bytes).unwrap();
}

fn problems(path: &Path, key: &PublicKey) -> Vec<LogProblem> {
    verify_log(read(path), key).problems
}

fn p(line: usize, problem: Problem) -> LogProblem {
    LogProblem { line, problem }
}

/// A log of 5 entries (seq 0..=4, times NOW..NOW+4), written by two `SessionLog`s in turn.
fn five(dir: &tempfile::TempDir, key: &KeyPair) -> PathBuf {
    let path = dir.path().join("state/sessions.log");
    let mut log = SessionLog::open(&path, key, NOW).unwrap();
    assert!(!path.exists(), "opening alone creates nothing");
    for (i, ev) in [EVENT_START, EVENT_END, EVENT_START].iter().enumerate() {
        log.append(&rec(ev, "alice"), NOW + i as u64).unwrap();
    }
    drop(log);
    let mut log = SessionLog::open(&path, key, NOW + 3).unwrap();
    assert_eq!(log.next_seq(), 3);
    log.append(&rec(EVENT_END, "alice"), NOW + 3).unwrap();
    log.append(&rec(EVENT_START, "bob"), NOW + 4).unwrap();
    path
}

#[test]
fn appends_continue_the_chain_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let path = five(&dir, &key);
    let ls = lines(&path);
    assert_eq!(ls.len(), 5);
    let mut prev = "0".repeat(64);
    for (i, l) in ls.iter().enumerate() {
        let e = LogEntry::from_line(l.as_bytes()).unwrap();
        assert_eq!(e.seq, i as u64);
        assert_eq!(e.time, NOW + i as u64);
        assert_eq!(e.prev, prev, "line {}", i + 1);
        assert!(e.is_signed_by(&key.public()));
        // Plain SHA-256 of the line's bytes, as `sha256sum` would print it.
        prev = hex(ring::digest::digest(&ring::digest::SHA256, l.as_bytes()).as_ref());
    }
    assert!(ls[0].starts_with(r#"{"seq":0,"time":1800000000,"event":"start","technician":"alice","organisation":"ACME IT","cert":"00112233445566778899aabbccddeeff","mode":"unattended","detail":"view, control","prev":"0000"#));
    let report = verify_log(read(&path), &key.public());
    assert_eq!(
        report,
        LogReport {
            entries: 5,
            first_time: Some(NOW),
            last_time: Some(NOW + 4),
            problems: vec![],
        }
    );
    assert!(report.is_intact());
    // The same text as &str.
    assert!(verify_log(ls.join("\n"), &key.public()).is_intact());
    assert!(verify_log("", &key.public()).is_intact());
}

#[cfg(unix)]
#[test]
fn the_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let path = five(&dir, &key);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);
}

#[test]
fn an_altered_line_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let path = five(&dir, &key);
    let mut ls = lines(&path);
    assert!(ls[1].contains(r#""technician":"alice""#));
    ls[1] = ls[1].replace(r#""technician":"alice""#, r#""technician":"mallory""#);
    write_lines(&path, &ls);
    assert_eq!(
        problems(&path, &key.public()),
        vec![
            p(2, Problem::BadSignature),
            p(3, Problem::Missing { first: 1, last: 1 })
        ]
    );
    // Also a changed time, numbers only.
    let mut ls = lines(&five(&tempfile::tempdir().unwrap(), &key));
    ls[4] = ls[4].replace(&format!(r#""time":{}"#, NOW + 4), r#""time":1"#);
    assert_eq!(
        verify_log(ls.join("\n"), &key.public()).problems,
        vec![p(5, Problem::BadSignature)]
    );
}

#[test]
fn a_removed_line_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let path = five(&dir, &key);
    let mut ls = lines(&path);
    ls.remove(2);
    write_lines(&path, &ls);
    let report = verify_log(read(&path), &key.public());
    assert_eq!(
        report.problems,
        vec![p(3, Problem::Missing { first: 2, last: 2 })]
    );
    assert_eq!(report.entries, 4);
    // Two in a row.
    let mut ls = lines(&five(&tempfile::tempdir().unwrap(), &key));
    ls.drain(1..3);
    assert_eq!(
        verify_log(ls.join("\n"), &key.public()).problems,
        vec![p(2, Problem::Missing { first: 1, last: 2 })]
    );
    // The last lines: not detectable by the chain (documented).
    let mut ls = lines(&five(&tempfile::tempdir().unwrap(), &key));
    ls.truncate(3);
    assert!(verify_log(ls.join("\n"), &key.public()).is_intact());
}

#[test]
fn reordered_lines_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let path = five(&dir, &key);
    let mut ls = lines(&path);
    ls.swap(2, 3);
    write_lines(&path, &ls);
    assert_eq!(
        problems(&path, &key.public()),
        vec![
            p(
                3,
                Problem::OutOfOrder {
                    expected: 2,
                    found: 3
                }
            ),
            p(
                4,
                Problem::OutOfOrder {
                    expected: 4,
                    found: 2
                }
            ),
            p(5, Problem::ChainBroken),
        ]
    );
    // A line repeated.
    let mut ls = lines(&path);
    ls.swap(2, 3);
    let again = ls[1].clone();
    ls.push(again);
    assert_eq!(
        verify_log(ls.join("\n"), &key.public()).problems,
        vec![p(
            6,
            Problem::OutOfOrder {
                expected: 5,
                found: 1
            }
        )]
    );
}

#[test]
fn a_line_signed_by_another_key_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let other = KeyPair::generate().unwrap();
    let path = five(&dir, &key);
    let ls = lines(&path);

    // Appended at the end, numbered and chained correctly.
    let prev = line_hash(ls[4].as_bytes());
    let forged = LogEntry::sign(&other, 5, NOW + 5, &rec(EVENT_START, "mallory"), &prev);
    let mut with_forged = ls.clone();
    with_forged.push(String::from_utf8(forged.to_json().unwrap()).unwrap());
    assert_eq!(
        verify_log(with_forged.join("\n"), &key.public()).problems,
        vec![p(6, Problem::BadSignature)]
    );

    // In place of line 2.
    let prev = line_hash(ls[0].as_bytes());
    let forged = LogEntry::sign(&other, 1, NOW + 1, &rec(EVENT_END, "mallory"), &prev);
    let mut replaced = ls.clone();
    replaced[1] = String::from_utf8(forged.to_json().unwrap()).unwrap();
    assert_eq!(
        verify_log(replaced.join("\n"), &key.public()).problems,
        vec![
            p(2, Problem::BadSignature),
            p(3, Problem::Missing { first: 1, last: 1 })
        ]
    );

    // The whole log checked with another device's key.
    assert_eq!(
        verify_log(read(&path), &other.public()).problems,
        (1..=5)
            .map(|l| p(l, Problem::BadSignature))
            .collect::<Vec<_>>()
    );
}

#[test]
fn text_inserted_in_the_middle_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let mut ls = lines(&five(&dir, &key));
    ls.insert(2, "hello".into());
    ls.insert(4, String::new());
    let problems = verify_log(ls.join("\n"), &key.public()).problems;
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(matches!(
        &problems[0],
        LogProblem {
            line: 3,
            problem: Problem::NotAnEntry {
                recorded: false,
                ..
            }
        }
    ));
    assert_eq!(
        problems[1],
        p(
            5,
            Problem::NotAnEntry {
                reason: "an empty line".into(),
                recorded: false
            }
        )
    );
    // A control character in a field, however escaped, is not an entry's.
    let bell = ls[0].replace(r#""alice""#, r#""al\u0007ice""#);
    assert_eq!(
        LogEntry::from_line(bell.as_bytes()),
        Err("its technician contains control characters".to_string())
    );
    // Nor an unknown field (it would not be signed).
    let extra = ls[0].replacen('{', r#"{"admin":true,"#, 1);
    assert!(LogEntry::from_line(extra.as_bytes()).is_err());
}

#[test]
fn a_partial_last_line_is_kept_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let path = dir.path().join("sessions.log");
    let mut log = SessionLog::open(&path, &key, NOW).unwrap();
    for i in 0..3 {
        log.append(&rec(EVENT_START, "alice"), NOW + i).unwrap();
    }
    drop(log);
    // A crash in the middle of the fourth write.
    let partial = br#"{"seq":3,"time":1800000003,"event":"st"#;
    append_raw(&path, partial);
    let before = read(&path);
    let before_open = problems(&path, &key.public());
    assert_eq!(before_open.len(), 1, "{before_open:?}");
    assert!(matches!(
        &before_open[0],
        LogProblem { line: 4, problem: Problem::NotAnEntry { reason, recorded: false } }
            if reason.starts_with("not an entry's JSON")
    ));

    let mut log = SessionLog::open(&path, &key, NOW + 10).unwrap();
    let after = read(&path);
    assert!(after.starts_with(&before), "nothing was truncated");
    let ls = lines(&path);
    assert_eq!(ls.len(), 5);
    assert_eq!(ls[3].as_bytes(), partial);
    let damage = LogEntry::from_line(ls[4].as_bytes()).unwrap();
    assert_eq!(damage.seq, 3);
    assert_eq!(damage.time, NOW + 10);
    assert_eq!(damage.event, EVENT_LOG_DAMAGED);
    assert_eq!(damage.detail, damage_detail(1, partial.len() as u64));
    assert_eq!(damage.prev, hex(&line_hash(ls[2].as_bytes())));
    assert_eq!(log.next_seq(), 4);

    log.append(&rec(EVENT_END, "alice"), NOW + 11).unwrap();
    drop(log);
    // Opening an undamaged log again writes nothing.
    let len = read(&path).len();
    drop(SessionLog::open(&path, &key, NOW + 12).unwrap());
    assert_eq!(read(&path).len(), len);

    let report = verify_log(read(&path), &key.public());
    assert_eq!(report.entries, 5);
    assert_eq!(report.last_time, Some(NOW + 11));
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(matches!(
        report.problems[0],
        LogProblem {
            line: 4,
            problem: Problem::NotAnEntry { recorded: true, .. }
        }
    ));
    assert!(
        report.problems[0]
            .to_string()
            .starts_with("line 4: not a log entry")
    );

    // The same damage, but text added next to it by hand: no longer what the agent recorded.
    let mut ls = lines(&path);
    ls.insert(3, "extra".into());
    let problems = verify_log(ls.join("\n"), &key.public()).problems;
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems.iter().all(|p| matches!(
        p.problem,
        Problem::NotAnEntry {
            recorded: false,
            ..
        }
    )));
}

#[test]
fn a_long_damaged_tail_is_found_beyond_the_first_window() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let path = dir.path().join("sessions.log");
    let mut log = SessionLog::open(&path, &key, NOW).unwrap();
    for i in 0..3 {
        log.append(&rec(EVENT_START, "alice"), NOW + i).unwrap();
    }
    drop(log);
    // More than the first window read, without a newline, then whole garbage lines.
    let garbage = vec![b'x'; 100_000];
    append_raw(&path, &garbage);
    append_raw(&path, b"\n");
    for _ in 0..200 {
        append_raw(&path, &[b'y'; 600]);
        append_raw(&path, b"\n");
    }
    append_raw(&path, b"{\"seq\"");
    let mut log = SessionLog::open(&path, &key, NOW + 5).unwrap();
    assert_eq!(log.next_seq(), 4);
    log.append(&rec(EVENT_END, "alice"), NOW + 6).unwrap();
    let ls = lines(&path);
    assert_eq!(ls.len(), 3 + 1 + 200 + 1 + 2);
    let damage = LogEntry::from_line(ls[205].as_bytes()).unwrap();
    assert_eq!(damage.detail, damage_detail(202, 100_000 + 200 * 600 + 6));
    let report = verify_log(read(&path), &key.public());
    assert_eq!(report.entries, 5);
    assert_eq!(report.problems.len(), 202);
    assert!(
        report
            .problems
            .iter()
            .all(|p| matches!(p.problem, Problem::NotAnEntry { recorded: true, .. }))
    );
    assert_eq!(report.problems[0].line, 4);
}

#[test]
fn a_last_line_without_its_newline_is_ended() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let path = five(&dir, &key);
    let mut bytes = read(&path);
    assert_eq!(bytes.pop(), Some(b'\n'));
    std::fs::write(&path, &bytes).unwrap();
    assert!(verify_log(&bytes, &key.public()).is_intact());
    let mut log = SessionLog::open(&path, &key, NOW + 5).unwrap();
    assert_eq!(log.next_seq(), 5);
    log.append(&rec(EVENT_END, "bob"), NOW + 5).unwrap();
    assert_eq!(lines(&path).len(), 6);
    assert!(verify_log(read(&path), &key.public()).is_intact());
}

#[test]
fn a_failed_write_is_recovered_before_the_next_entry() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let path = dir.path().join("sessions.log");
    let mut log = SessionLog::open(&path, &key, NOW).unwrap();
    log.append(&rec(EVENT_START, "alice"), NOW).unwrap();
    // As if a write had stopped part way (disk full) and reported an error.
    append_raw(&path, br#"{"seq":1,"ti"#);
    log.dirty = true;
    log.append(&rec(EVENT_END, "alice"), NOW + 1).unwrap();
    let ls = lines(&path);
    assert_eq!(ls.len(), 4);
    assert_eq!(
        LogEntry::from_line(ls[2].as_bytes()).unwrap().event,
        EVENT_LOG_DAMAGED
    );
    assert_eq!(LogEntry::from_line(ls[3].as_bytes()).unwrap().seq, 2);
    let problems = problems(&path, &key.public());
    assert_eq!(problems.len(), 1);
    assert!(matches!(
        problems[0],
        LogProblem {
            line: 2,
            problem: Problem::NotAnEntry { recorded: true, .. }
        }
    ));
}

#[test]
fn a_new_device_key_starts_a_new_chain_after_the_old_lines() {
    let dir = tempfile::tempdir().unwrap();
    let old = KeyPair::generate().unwrap();
    let new = KeyPair::generate().unwrap();
    let path = five(&dir, &old);
    let old_bytes: u64 = lines(&path).iter().map(|l| l.len() as u64).sum();
    let mut log = SessionLog::open(&path, &new, NOW + 5).unwrap();
    log.append(&rec(EVENT_START, "carol"), NOW + 6).unwrap();
    let ls = lines(&path);
    let damage = LogEntry::from_line(ls[5].as_bytes()).unwrap();
    assert_eq!(
        (damage.seq, damage.prev.as_str()),
        (0, "0".repeat(64).as_str())
    );
    assert_eq!(damage.detail, damage_detail(5, old_bytes));
    // Old lines are not the new key's; new lines are not the old key's.
    assert_eq!(
        problems(&path, &new.public()),
        (1..=5)
            .map(|l| p(l, Problem::BadSignature))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        problems(&path, &old.public()),
        vec![p(6, Problem::BadSignature), p(7, Problem::BadSignature)]
    );
}

#[test]
fn text_is_bounded_and_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    let key = KeyPair::generate().unwrap();
    let path = dir.path().join("sessions.log");
    let mut log = SessionLog::open(&path, &key, NOW).unwrap();
    let mut r = rec(EVENT_START, "al\u{1b}[31mice\u{202E}\n");
    r.detail = "é".repeat(1000);
    let e = log.append(&r, NOW).unwrap();
    assert_eq!(e.technician, "al\u{FFFD}[31mice\u{FFFD}\u{FFFD}");
    assert!(e.detail.len() <= MAX_FIELD, "{}", e.detail.len());
    assert!(e.detail.ends_with("é…"));
    assert_eq!(lines(&path).len(), 1);
    assert_eq!(LogEntry::from_line(lines(&path)[0].as_bytes()), Ok(e));
    assert!(verify_log(read(&path), &key.public()).is_intact());
    assert_eq!(bounded("short"), "short");
}
