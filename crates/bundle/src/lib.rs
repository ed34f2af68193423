//! A ready agent: one file that is the `tandem-agent` program with its configuration
//! (`tandem-agent.toml`: relay address, pin, organisation key, policy) appended.
//!
//! ```text
//! [ the program, as built ][ configuration (UTF-8 TOML) ][ trailer, 64 bytes ]
//! trailer = "TANDEM-BUNDLE-v1" (16) | program length u64 LE | configuration length u64 LE
//!         | SHA-256 of program ‖ configuration (32)
//! ```
//!
//! ELF (and PE) loaders ignore bytes after the sections they map, so the file still runs as the
//! program; at start the agent reads its own file, finds the trailer and checks the hash before
//! it uses anything of the configuration.
//!
//! What the hash does and does not do: a bundle damaged in transit, truncated, or edited (a relay
//! address changed in a hex editor or by a script that rewrites downloads) is refused with a clear
//! message. Whoever can replace the whole file can also recompute the hash; that attacker is
//! stopped by what surrounds the file (the download over HTTPS from the MSP's own server, the
//! SHA-256 the MSP publishes next to it, operating-system code signing where a platform has it),
//! not by anything inside it. No key in the bundle could change that: the agent would have to
//! trust the key from somewhere other than the bundle.
//!
//! Pure: bytes in, bytes out; [`read_file`] and [`write_file`] are thin wrappers.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use ring::digest::{Context, SHA256};

/// Marks a bundle's trailer.
pub const MAGIC: &[u8; 16] = b"TANDEM-BUNDLE-v1";
/// Size of the trailer.
pub const TRAILER: usize = 64;
/// The most configuration a bundle carries (an agent configuration is a few KiB).
pub const MAX_CONFIG: u64 = 1 << 20;

/// Why a bundle is refused or cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(
        "this ready agent was altered or damaged after it was made (its check does not match); \
         download it again from your IT provider"
    )]
    Tampered,
    #[error(
        "this ready agent is cut short or malformed ({0}); download it again from your IT provider"
    )]
    Malformed(&'static str),
    #[error("the configuration is not UTF-8 text")]
    NotText,
    #[error("the configuration is {0} bytes; at most {MAX_CONFIG}")]
    ConfigTooLarge(u64),
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: io::Error },
}

/// The configuration found in a bundle, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundled {
    /// The configuration, as the relay's administrator made it.
    pub config: String,
    /// Length of the program part of the file.
    pub program_len: u64,
    /// SHA-256 of program ‖ configuration, hex (what `tandem-relay agent-bundle` printed).
    pub sha256: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn trailer(program_len: u64, config_len: u64, digest: &[u8]) -> [u8; TRAILER] {
    let mut t = [0u8; TRAILER];
    t[..16].copy_from_slice(MAGIC);
    t[16..24].copy_from_slice(&program_len.to_le_bytes());
    t[24..32].copy_from_slice(&config_len.to_le_bytes());
    t[32..].copy_from_slice(digest);
    t
}

struct Parsed {
    program_len: u64,
    config_len: u64,
    digest: [u8; 32],
}

/// Reads a trailer: `None` when the file carries none (a plain program).
fn parse_trailer(t: &[u8; TRAILER], file_len: u64) -> Result<Option<Parsed>, BundleError> {
    if &t[..16] != MAGIC {
        return Ok(None);
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&t[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let (program_len, config_len) = (u64_at(16), u64_at(24));
    if config_len > MAX_CONFIG {
        return Err(BundleError::Malformed("configuration too large"));
    }
    let expected = program_len
        .checked_add(config_len)
        .and_then(|n| n.checked_add(TRAILER as u64));
    if expected != Some(file_len) {
        return Err(BundleError::Malformed("lengths do not add up"));
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(&t[32..]);
    Ok(Some(Parsed {
        program_len,
        config_len,
        digest,
    }))
}

/// The program part of `file`: the whole of it, or what precedes a bundle's configuration (so a
/// ready agent can be re-bundled with another configuration).
pub fn program_part(file: &[u8]) -> Result<&[u8], BundleError> {
    let Some(t) = file
        .len()
        .checked_sub(TRAILER)
        .and_then(|at| <&[u8; TRAILER]>::try_from(&file[at..]).ok())
    else {
        return Ok(file);
    };
    match parse_trailer(t, file.len() as u64)? {
        None => Ok(file),
        Some(p) => usize::try_from(p.program_len)
            .ok()
            .and_then(|n| file.get(..n))
            .ok_or(BundleError::Malformed("lengths do not add up")),
    }
}

/// Makes a bundle of `program` (a plain agent, or a bundle whose old configuration is replaced)
/// and `config`.
pub fn make(program: &[u8], config: &str) -> Result<(Vec<u8>, String), BundleError> {
    let program = program_part(program)?;
    let config_len = config.len() as u64;
    if config_len > MAX_CONFIG {
        return Err(BundleError::ConfigTooLarge(config_len));
    }
    let mut ctx = Context::new(&SHA256);
    ctx.update(program);
    ctx.update(config.as_bytes());
    let digest = ctx.finish();
    let mut out = Vec::with_capacity(program.len() + config.len() + TRAILER);
    out.extend_from_slice(program);
    out.extend_from_slice(config.as_bytes());
    out.extend_from_slice(&trailer(program.len() as u64, config_len, digest.as_ref()));
    Ok((out, hex(digest.as_ref())))
}

/// Checks a bundle held in memory: `Ok(None)` for a plain program.
pub fn open(file: &[u8]) -> Result<Option<Bundled>, BundleError> {
    let mut cursor = io::Cursor::new(file);
    open_reader(&mut cursor, file.len() as u64).map_err(|e| match e {
        ReadError::Bundle(b) => b,
        ReadError::Io(_) => BundleError::Malformed("cut short"),
    })
}

enum ReadError {
    Bundle(BundleError),
    Io(io::Error),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

fn open_reader<R: Read + Seek>(r: &mut R, len: u64) -> Result<Option<Bundled>, ReadError> {
    if len < TRAILER as u64 {
        return Ok(None);
    }
    let mut t = [0u8; TRAILER];
    r.seek(SeekFrom::Start(len - TRAILER as u64))?;
    r.read_exact(&mut t)?;
    let Some(p) = parse_trailer(&t, len).map_err(ReadError::Bundle)? else {
        return Ok(None);
    };
    r.seek(SeekFrom::Start(0))?;
    let mut ctx = Context::new(&SHA256);
    let mut left = p.program_len;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        r.read_exact(&mut buf[..n])?;
        ctx.update(&buf[..n]);
        left -= n as u64;
    }
    let mut config = vec![0u8; usize::try_from(p.config_len).unwrap_or(0)];
    r.read_exact(&mut config)?;
    ctx.update(&config);
    let digest = ctx.finish();
    // Not secret: a plain comparison is fine.
    if digest.as_ref() != p.digest {
        return Err(ReadError::Bundle(BundleError::Tampered));
    }
    let config = String::from_utf8(config).map_err(|_| ReadError::Bundle(BundleError::NotText))?;
    Ok(Some(Bundled {
        config,
        program_len: p.program_len,
        sha256: hex(&p.digest),
    }))
}

/// Checks the bundle at `path` (the running agent's own file): `Ok(None)` for a plain program.
pub fn read_file(path: &Path) -> Result<Option<Bundled>, BundleError> {
    let read_err = |source| BundleError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let len = f.metadata().map_err(read_err)?.len();
    open_reader(&mut f, len).map_err(|e| match e {
        ReadError::Bundle(b) => b,
        ReadError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            BundleError::Malformed("cut short")
        }
        ReadError::Io(e) => read_err(e),
    })
}

/// Writes a bundle of the program at `program` and `config` to `out` (executable), returns its
/// SHA-256 (hex) for the administrator to publish.
pub fn write_file(program: &Path, config: &str, out: &Path) -> Result<String, BundleError> {
    let bytes = std::fs::read(program).map_err(|source| BundleError::Read {
        path: program.display().to_string(),
        source,
    })?;
    let (bundle, sha) = make(&bytes, config)?;
    let write_err = |source| BundleError::Write {
        path: out.display().to_string(),
        source,
    };
    let tmp = out.with_extension("partial");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o755)
            .open(&tmp)
            .map_err(write_err)?;
        f.write_all(&bundle).map_err(write_err)?;
        f.sync_all().map_err(write_err)?;
    }
    std::fs::rename(&tmp, out).map_err(write_err)?;
    Ok(sha)
}

/// SHA-256 of a whole file, hex (the digest of the download as served; printed beside the
/// bundle's own check).
pub fn file_sha256(path: &Path) -> Result<String, BundleError> {
    let mut f = File::open(path).map_err(|source| BundleError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|source| BundleError::Read {
            path: path.display().to_string(),
            source,
        })?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex(ctx.finish().as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROGRAM: &[u8] = b"\x7fELF pretend program bytes";
    const CONFIG: &str = "relay = \"relay.example.com:4433\"\nrelay_pin = \"sha256:ab\"\n";

    #[test]
    fn round_trip_and_plain_programs() {
        let (b, sha) = make(PROGRAM, CONFIG).unwrap();
        assert_eq!(&b[..PROGRAM.len()], PROGRAM);
        let got = open(&b).unwrap().unwrap();
        assert_eq!(got.config, CONFIG);
        assert_eq!(got.program_len, PROGRAM.len() as u64);
        assert_eq!(got.sha256, sha);
        assert_eq!(open(PROGRAM).unwrap(), None);
        assert_eq!(open(b"").unwrap(), None);
    }

    #[test]
    fn rebundling_replaces_the_configuration() {
        let (b, _) = make(PROGRAM, CONFIG).unwrap();
        let (c, _) = make(&b, "relay = \"other:1\"\n").unwrap();
        assert_eq!(c.len(), PROGRAM.len() + 18 + TRAILER);
        assert_eq!(open(&c).unwrap().unwrap().config, "relay = \"other:1\"\n");
    }

    #[test]
    fn any_changed_byte_is_refused() {
        let (b, _) = make(PROGRAM, CONFIG).unwrap();
        // Every byte of program and configuration, and the stored digest.
        for i in (0..b.len() - TRAILER).chain(b.len() - 32..b.len()) {
            let mut t = b.clone();
            t[i] ^= 0x20;
            assert!(
                matches!(open(&t), Err(BundleError::Tampered)),
                "byte {i} changed and accepted"
            );
        }
    }

    #[test]
    fn same_length_edit_of_the_relay_is_refused() {
        let (b, _) = make(PROGRAM, CONFIG).unwrap();
        let (from, to) = (b"relay.example.com", b"evil.example.org!");
        let at = b.windows(from.len()).position(|w| w == from).unwrap();
        let mut t = b.clone();
        t[at..at + to.len()].copy_from_slice(to);
        assert_eq!(t.len(), b.len());
        assert!(matches!(open(&t), Err(BundleError::Tampered)));
    }

    #[test]
    fn lengths_and_truncation_are_checked() {
        let (b, _) = make(PROGRAM, CONFIG).unwrap();
        // Cut off at the front (the trailer intact) or a byte added in the middle.
        assert!(matches!(open(&b[1..]), Err(BundleError::Malformed(_))));
        let mut longer = b.clone();
        longer.insert(3, 0);
        assert!(matches!(open(&longer), Err(BundleError::Malformed(_))));
        // A huge configuration length.
        let mut huge = b.clone();
        let at = huge.len() - TRAILER + 24;
        huge[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(open(&huge), Err(BundleError::Malformed(_))));
        // Lengths whose sum overflows.
        let mut over = b.clone();
        let at = over.len() - TRAILER + 16;
        over[at..at + 8].copy_from_slice(&(u64::MAX - 10).to_le_bytes());
        assert!(matches!(open(&over), Err(BundleError::Malformed(_))));
        assert!(matches!(
            make(PROGRAM, &"x".repeat(MAX_CONFIG as usize + 1)),
            Err(BundleError::ConfigTooLarge(_))
        ));
    }

    #[test]
    fn files_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("tandem-agent");
        std::fs::write(&prog, PROGRAM).unwrap();
        let out = dir.path().join("tandem-agent-acme");
        let sha = write_file(&prog, CONFIG, &out).unwrap();
        let got = read_file(&out).unwrap().unwrap();
        assert_eq!((got.config.as_str(), got.sha256), (CONFIG, sha));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(mode & 0o111, 0o111, "executable");
        assert_eq!(read_file(&prog).unwrap(), None);
        assert_eq!(file_sha256(&prog).unwrap().len(), 64);
    }
}
