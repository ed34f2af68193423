//! File names that cross the wire: validation ("sanitise") and the choice of a free final name.
//!
//! A name is a relative path with `/` separators (`folder/sub/file.txt`). The receiver treats it as
//! hostile: a name that is not plainly safe on every platform is *refused*, never "fixed", so what
//! lands on disk is exactly what the sender showed its user, or nothing.

use std::fmt;

/// Longest accepted name, all components and separators together, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;
/// Longest accepted component, in bytes (the common file-system limit).
pub const MAX_COMPONENT_BYTES: usize = 255;
/// Most components in a name (folder depth + 1).
pub const MAX_DEPTH: usize = 16;
/// Prefix of the receiver's partial files; no offered name may start with it.
pub const PARTIAL_PREFIX: &str = ".tandem-";

/// Why an offered name was refused. The text is meant for the user ("refused: …").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("refused: the name is empty")]
    Empty,
    /// The name is not valid UTF-8.
    #[error("refused: the name is not valid UTF-8 text")]
    NotUtf8,
    /// The name is longer than [`MAX_NAME_BYTES`].
    #[error("refused: the name is {0} bytes long (at most {MAX_NAME_BYTES})")]
    TooLong(usize),
    /// The name has more than [`MAX_DEPTH`] components.
    #[error("refused: the name is {0} folders deep (at most {MAX_DEPTH})")]
    TooDeep(usize),
    /// The name starts with `/`.
    #[error("refused: the name is an absolute path")]
    Absolute,
    /// The name has an empty component (`a//b`, a trailing `/`).
    #[error("refused: the name has an empty part (\"//\" or a trailing \"/\")")]
    EmptyComponent,
    /// A component is `.` or `..`.
    #[error("refused: the name contains '{0}'")]
    DotComponent(&'static str),
    /// The name contains a backslash.
    #[error("refused: the name contains a backslash")]
    Backslash,
    /// The name contains a control character (NUL, newline, escape, …).
    #[error("refused: the name contains a control character (U+{0:04X})")]
    Control(u32),
    /// The name contains a bidirectional-text control that can disguise it (`txt.exe` shown as `exe.txt`).
    #[error("refused: the name contains an invisible text-direction character (U+{0:04X})")]
    Bidi(u32),
    /// The name contains a character that Windows reserves (`< > : " | ? *`).
    #[error("refused: the name contains '{0}', which is not allowed in file names on Windows")]
    Reserved(char),
    /// A component is longer than [`MAX_COMPONENT_BYTES`].
    #[error("refused: a part of the name is {0} bytes long (at most {MAX_COMPONENT_BYTES})")]
    ComponentTooLong(usize),
    /// A component ends with a dot or a space (Windows silently strips them).
    #[error("refused: \"{0}\" ends with a dot or a space")]
    TrailingDotOrSpace(String),
    /// A component is a Windows device name (`CON`, `NUL`, `COM1`, `lpt3.txt`, …).
    #[error("refused: \"{0}\" is a reserved device name on Windows")]
    DeviceName(String),
    /// A component starts with `.tandem-`, the prefix of partial files.
    #[error(
        "refused: names starting with \"{PARTIAL_PREFIX}\" are reserved for unfinished transfers"
    )]
    PartialPrefix,
}

/// Checks an offered name and splits it into its components.
///
/// Refuses, rather than repairs, everything listed in [`NameError`]: invalid UTF-8, empty names or
/// components, `.` and `..`, absolute paths, backslashes, control and bidi-override characters,
/// Windows-reserved characters and device names, trailing dots or spaces, over-long names or
/// components, more than [`MAX_DEPTH`] levels, and the partial-file prefix `.tandem-`.
pub fn sanitise(name: &[u8]) -> Result<Vec<String>, NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong(name.len()));
    }
    let text = std::str::from_utf8(name).map_err(|_| NameError::NotUtf8)?;
    // Character checks first: they describe the most alarming problems best.
    for c in text.chars() {
        check_char(c)?;
    }
    if text.starts_with('/') {
        return Err(NameError::Absolute);
    }
    let parts: Vec<&str> = text.split('/').collect();
    if parts.len() > MAX_DEPTH {
        return Err(NameError::TooDeep(parts.len()));
    }
    parts
        .into_iter()
        .map(|part| check_component(part).map(|()| part.to_owned()))
        .collect()
}

fn check_char(c: char) -> Result<(), NameError> {
    let code = u32::from(c);
    if c.is_control() {
        return Err(NameError::Control(code));
    }
    if is_bidi(c) {
        return Err(NameError::Bidi(code));
    }
    match c {
        '\\' => Err(NameError::Backslash),
        '<' | '>' | ':' | '"' | '|' | '?' | '*' => Err(NameError::Reserved(c)),
        _ => Ok(()),
    }
}

/// Embeddings, overrides, isolates and the invisible direction marks.
fn is_bidi(c: char) -> bool {
    matches!(u32::from(c), 0x202A..=0x202E | 0x2066..=0x2069 | 0x200E | 0x200F | 0x061C)
}

fn check_component(part: &str) -> Result<(), NameError> {
    match part {
        "" => return Err(NameError::EmptyComponent),
        "." => return Err(NameError::DotComponent(".")),
        ".." => return Err(NameError::DotComponent("..")),
        _ => {}
    }
    if part.len() > MAX_COMPONENT_BYTES {
        return Err(NameError::ComponentTooLong(part.len()));
    }
    if part.ends_with('.') || part.ends_with(' ') {
        return Err(NameError::TrailingDotOrSpace(part.to_owned()));
    }
    if is_device_name(part) {
        return Err(NameError::DeviceName(part.to_owned()));
    }
    if part.starts_with(PARTIAL_PREFIX) {
        return Err(NameError::PartialPrefix);
    }
    Ok(())
}

/// `CON`, `PRN`, `AUX`, `NUL`, `COM0-9`, `LPT0-9` (and their superscript-digit forms), in any case,
/// with or without an extension; Windows also ignores spaces before the extension.
fn is_device_name(part: &str) -> bool {
    let stem = part.split('.').next().unwrap_or(part).trim_end_matches(' ');
    let upper = stem.to_ascii_uppercase();
    match upper.as_str() {
        "CON" | "PRN" | "AUX" | "NUL" | "CONIN$" | "CONOUT$" => true,
        _ => {
            let Some(rest) = upper
                .strip_prefix("COM")
                .or_else(|| upper.strip_prefix("LPT"))
            else {
                return false;
            };
            let mut chars = rest.chars();
            matches!(
                (chars.next(), chars.next()),
                (Some('0'..='9' | '¹' | '²' | '³'), None)
            )
        }
    }
}

/// The `n`-th candidate for a final file name: `n == 0` is the name itself, then `name (1).ext`,
/// `name (2).ext`, … The extension is kept (`.tar.gz` and friends as one), a leading dot is not an
/// extension (`.bashrc (1)`), and the stem is shortened so the result stays within
/// [`MAX_COMPONENT_BYTES`].
pub fn candidate_name(name: &str, n: u32) -> String {
    if n == 0 {
        return name.to_owned();
    }
    let (stem, ext) = split_extension(name);
    let suffix = format!(" ({n})");
    let budget = MAX_COMPONENT_BYTES.saturating_sub(suffix.len() + ext.len());
    let mut cut = stem.len().min(budget);
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    let stem = stem[..cut].trim_end_matches([' ', '.']);
    format!("{stem}{suffix}{ext}")
}

fn split_extension(name: &str) -> (&str, &str) {
    const DOUBLE: [&str; 6] = [
        ".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar.lz", ".tar.br",
    ];
    let lower = name.to_ascii_lowercase();
    for double in DOUBLE {
        if lower.ends_with(double) && name.len() > double.len() {
            let at = name.len() - double.len();
            return (&name[..at], &name[at..]);
        }
    }
    match name.rfind('.') {
        Some(at) if at > 0 && at + 1 < name.len() => (&name[..at], &name[at..]),
        _ => (name, ""),
    }
}

/// Text from the other side that is only ever *shown* (a reason, the name the receiver chose):
/// control and bidi characters are replaced by `�` and the text is cut to `max` bytes.
pub fn display_text(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        let c = if c.is_control() || is_bidi(c) {
            '\u{FFFD}'
        } else {
            c
        };
        if out.len() + c.len_utf8() > max {
            out.push('…');
            break;
        }
        out.push(c);
    }
    out
}

/// A lossy, display-safe rendering of raw name bytes (for logs and refusal messages).
pub(crate) struct ShowName<'a>(pub &'a [u8]);

impl fmt::Display for ShowName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lossy = String::from_utf8_lossy(self.0);
        f.write_str(&display_text(&lossy, 200))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_pass() {
        assert_eq!(sanitise(b"report.pdf").unwrap(), ["report.pdf"]);
        assert_eq!(
            sanitise(b"folder/sub/file.txt").unwrap(),
            ["folder", "sub", "file.txt"]
        );
        assert_eq!(sanitise(".bashrc".as_bytes()).unwrap(), [".bashrc"]);
        assert_eq!(
            sanitise("Ünïcödé – ok.txt".as_bytes()).unwrap(),
            ["Ünïcödé – ok.txt"]
        );
        assert_eq!(sanitise(b"CONSOLE.txt").unwrap(), ["CONSOLE.txt"]);
        assert_eq!(sanitise(b"COM10").unwrap(), ["COM10"]);
        let deep = vec!["d"; MAX_DEPTH].join("/");
        assert_eq!(sanitise(deep.as_bytes()).unwrap().len(), MAX_DEPTH);
        let long = "a".repeat(MAX_COMPONENT_BYTES);
        assert!(sanitise(long.as_bytes()).is_ok());
    }

    #[test]
    fn hostile_names_are_refused() {
        use NameError as E;
        let long_component = "a".repeat(MAX_COMPONENT_BYTES + 1);
        let long_total = vec!["a".repeat(200); 6].join("/");
        let too_deep = vec!["d"; MAX_DEPTH + 1].join("/");
        let table: Vec<(&[u8], NameError)> = vec![
            (b"", E::Empty),
            (b"..", E::DotComponent("..")),
            (b".", E::DotComponent(".")),
            (b"../etc/passwd", E::DotComponent("..")),
            (b"a/../../b", E::DotComponent("..")),
            (b"a/./b", E::DotComponent(".")),
            (b"/etc/passwd", E::Absolute),
            (b"//server/share", E::Absolute),
            (b"a//b", E::EmptyComponent),
            (b"a/", E::EmptyComponent),
            (b"..\\..\\windows\\system32", E::Backslash),
            (b"C:\\x", E::Reserved(':')),
            (b"C:x", E::Reserved(':')),
            (b"file.txt:stream", E::Reserved(':')),
            (b"a*b", E::Reserved('*')),
            (b"nul\0byte", E::Control(0)),
            (b"line\nbreak", E::Control(0x0A)),
            (b"esc\x1b[31m", E::Control(0x1B)),
            (b"del\x7f", E::Control(0x7F)),
            ("c1\u{85}".as_bytes(), E::Control(0x85)),
            ("invoice\u{202E}fdp.exe".as_bytes(), E::Bidi(0x202E)),
            ("iso\u{2066}late".as_bytes(), E::Bidi(0x2066)),
            ("mark\u{200F}".as_bytes(), E::Bidi(0x200F)),
            (b"\xff\xfe.txt", E::NotUtf8),
            (b"bad\xc3(", E::NotUtf8),
            (
                long_component.as_bytes(),
                E::ComponentTooLong(MAX_COMPONENT_BYTES + 1),
            ),
            (long_total.as_bytes(), E::TooLong(long_total.len())),
            (too_deep.as_bytes(), E::TooDeep(MAX_DEPTH + 1)),
            (b"CON", E::DeviceName("CON".into())),
            (b"con.txt", E::DeviceName("con.txt".into())),
            (b"dir/Nul.tar.gz", E::DeviceName("Nul.tar.gz".into())),
            (b"aux", E::DeviceName("aux".into())),
            (b"PRN.doc", E::DeviceName("PRN.doc".into())),
            (b"com1", E::DeviceName("com1".into())),
            (b"LPT9.txt", E::DeviceName("LPT9.txt".into())),
            ("COM\u{b9}".as_bytes(), E::DeviceName("COM\u{b9}".into())),
            (b"CON .txt", E::DeviceName("CON .txt".into())),
            (b"trailing.", E::TrailingDotOrSpace("trailing.".into())),
            (b"trailing ", E::TrailingDotOrSpace("trailing ".into())),
            (b"dir./x", E::TrailingDotOrSpace("dir.".into())),
            (b"...", E::TrailingDotOrSpace("...".into())),
            (b".tandem-0123456789abcdef.part", E::PartialPrefix),
            (b"dir/.tandem-x", E::PartialPrefix),
        ];
        for (name, want) in table {
            assert_eq!(
                sanitise(name),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(name)
            );
        }
    }

    #[test]
    fn messages_say_what_is_wrong() {
        assert_eq!(
            sanitise(b"../x").unwrap_err().to_string(),
            "refused: the name contains '..'"
        );
        assert!(sanitise(b"\xff").unwrap_err().to_string().contains("UTF-8"));
    }

    #[test]
    fn candidates_keep_the_extension() {
        assert_eq!(candidate_name("report.pdf", 0), "report.pdf");
        assert_eq!(candidate_name("report.pdf", 1), "report (1).pdf");
        assert_eq!(candidate_name("report.pdf", 12), "report (12).pdf");
        assert_eq!(candidate_name("backup.TAR.GZ", 2), "backup (2).TAR.GZ");
        assert_eq!(candidate_name("my.notes.txt", 1), "my.notes (1).txt");
        assert_eq!(candidate_name("Makefile", 1), "Makefile (1)");
        assert_eq!(candidate_name(".bashrc", 1), ".bashrc (1)");
        assert_eq!(candidate_name(".tar.gz", 1), ".tar (1).gz");
        let long = format!("{}.txt", "é".repeat(126));
        let c = candidate_name(&long, 3);
        assert!(c.len() <= MAX_COMPONENT_BYTES, "{}", c.len());
        assert!(c.ends_with(" (3).txt"));
        assert!(sanitise(c.as_bytes()).is_ok());
    }

    #[test]
    fn display_text_is_tamed() {
        assert_eq!(display_text("ok: a/b", 100), "ok: a/b");
        assert_eq!(display_text("a\u{202E}b\nc", 100), "a\u{FFFD}b\u{FFFD}c");
        assert_eq!(display_text("abcdef", 3), "abc…");
        assert_eq!(display_text("ééé", 3), "é…");
    }
}
