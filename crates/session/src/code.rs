//! The one-time session code the user reads to the technician: `417-382-905`.
//!
//! * The **slot** (`417`, 3 to 9 digits) is allocated by the relay; it only says where to meet.
//! * The **secret** (`382905`, [`SECRET_DIGITS`] digits) is drawn by the agent from the OS CSPRNG and
//!   never leaves the agent except through the user's mouth. It keys the PAKE; the relay never sees it.
//!
//! Shown as the slot, then the secret in groups of three, dash-separated. Parsed tolerantly: spaces,
//! any dashes or dots between digits, text around it ("Code: 417 382 905, thanks!"). A code is never
//! logged: its `Debug` is redacted and it has no `Display`.

use ring::rand::{SecureRandom, SystemRandom};
use std::fmt;
use tandem_proto::{SLOT_MAX_DIGITS, SLOT_MIN_DIGITS, Slot};

/// Digits of the secret part. A guess succeeds with probability 10^-6 and the agent allows one.
pub const SECRET_DIGITS: usize = 6;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodeError {
    #[error(
        "no session code found: a code has {min} to {max} digits, like 417-382-905",
        min = SLOT_MIN_DIGITS + SECRET_DIGITS,
        max = SLOT_MAX_DIGITS + SECRET_DIGITS
    )]
    NotFound,
    #[error("the operating system's random generator failed")]
    Random,
}

/// The secret part of a code. Redacted in `Debug`; compared in constant time.
#[derive(Clone)]
pub struct CodeSecret(String);

impl CodeSecret {
    /// The digits, for the PAKE only.
    pub fn digits(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CodeSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CodeSecret(<redacted>)")
    }
}

impl PartialEq for CodeSecret {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .bytes()
                .zip(other.0.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}
impl Eq for CodeSecret {}

/// Slot + secret.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionCode {
    slot: Slot,
    secret: CodeSecret,
}

impl fmt::Debug for SessionCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionCode(slot {}, secret <redacted>)", self.slot)
    }
}

/// A uniformly random decimal string of `n` digits from `rng`.
fn random_digits(rng: &dyn SecureRandom, n: usize) -> Result<String, CodeError> {
    let mut out = String::with_capacity(n);
    while out.len() < n {
        let mut b = [0u8; 1];
        rng.fill(&mut b).map_err(|_| CodeError::Random)?;
        // 250 = 25 × 10: reject 250..=255 so that every digit is equally likely.
        if b[0] < 250 {
            out.push(char::from(b'0' + b[0] % 10));
        }
    }
    Ok(out)
}

impl SessionCode {
    /// A fresh secret for `slot`, from the OS CSPRNG.
    pub fn generate(slot: Slot) -> Result<Self, CodeError> {
        Ok(SessionCode {
            slot,
            secret: CodeSecret(random_digits(&SystemRandom::new(), SECRET_DIGITS)?),
        })
    }

    /// Builds a code from its parts (tests, and the console after parsing).
    pub fn from_parts(slot: Slot, secret_digits: &str) -> Option<Self> {
        (secret_digits.len() == SECRET_DIGITS && secret_digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| SessionCode {
                slot,
                secret: CodeSecret(secret_digits.to_string()),
            })
    }

    pub fn slot(&self) -> &Slot {
        &self.slot
    }
    pub fn secret(&self) -> &CodeSecret {
        &self.secret
    }

    /// For the user to read out: `417-382-905` (slot, then the secret in groups of three).
    pub fn grouped(&self) -> String {
        let s = self.secret.digits();
        let groups: Vec<&str> = (0..s.len())
            .step_by(3)
            .map(|i| &s[i..(i + 3).min(s.len())])
            .collect();
        format!("{}-{}", self.slot, groups.join("-"))
    }

    /// Finds a code in `text`: the first run of digits and separators (spaces, dashes, dots) that
    /// holds a plausible number of digits.
    pub fn parse(text: &str) -> Result<Self, CodeError> {
        let is_sep = |c: char| {
            c == ' '
                || c == '.'
                || c == '-'
                || c == '\u{2010}'
                || c == '\u{2011}'
                || c == '\u{2012}'
                || c == '\u{2013}'
                || c == '\u{2014}'
                || c == '\u{2212}'
                || c == '\u{00a0}'
                || c == '\t'
        };
        let chars: Vec<char> = text.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            if !chars[i].is_ascii_digit() {
                i += 1;
                continue;
            }
            // A run: digits, with single separators between them.
            let mut digits = String::new();
            let mut j = i;
            while j < chars.len() {
                if chars[j].is_ascii_digit() {
                    digits.push(chars[j]);
                    j += 1;
                } else if is_sep(chars[j]) {
                    // Up to three separators between digits ("417 - 382 - 905").
                    let mut k = j;
                    while k < chars.len() && k - j < 3 && is_sep(chars[k]) {
                        k += 1;
                    }
                    if k < chars.len() && chars[k].is_ascii_digit() {
                        j = k;
                    } else {
                        break;
                    }
                } else {
                    break;
                }
            }
            let n = digits.len();
            if (SLOT_MIN_DIGITS + SECRET_DIGITS..=SLOT_MAX_DIGITS + SECRET_DIGITS).contains(&n) {
                let (slot, secret) = digits.split_at(n - SECRET_DIGITS);
                if let (Ok(slot), true) = (Slot::new(slot), secret.len() == SECRET_DIGITS) {
                    return Ok(SessionCode {
                        slot,
                        secret: CodeSecret(secret.to_string()),
                    });
                }
            }
            i = j.max(i + 1);
        }
        Err(CodeError::NotFound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(s: &str) -> Slot {
        Slot::new(s).unwrap()
    }

    #[test]
    fn grouped_and_parsed_back() {
        let c = SessionCode::from_parts(slot("417"), "382905").unwrap();
        assert_eq!(c.grouped(), "417-382-905");
        assert_eq!(SessionCode::parse("417-382-905").unwrap(), c);
        let long = SessionCode::from_parts(slot("4173"), "829051").unwrap();
        assert_eq!(long.grouped(), "4173-829-051");
        assert_eq!(SessionCode::parse(&long.grouped()).unwrap(), long);
    }

    #[test]
    fn parse_is_tolerant() {
        let want = SessionCode::from_parts(slot("417"), "382905").unwrap();
        for text in [
            "417382905",
            "417 382 905",
            "  417-382-905\n",
            "Code: 417 – 382 – 905, thanks!",
            "417.382.905",
            "417 - 382 - 905",
            "your code is 417\u{2011}382\u{2011}905.",
            "call me at 555-1234; the code is 417-382-905",
        ] {
            assert_eq!(SessionCode::parse(text).unwrap(), want, "{text:?}");
        }
    }

    #[test]
    fn parse_rejects_non_codes() {
        for text in [
            "",
            "hello",
            "417-382",
            "12345678",
            "1234567890123456",
            "4-1-7",
        ] {
            assert_eq!(
                SessionCode::parse(text),
                Err(CodeError::NotFound),
                "{text:?}"
            );
        }
    }

    #[test]
    fn generated_secrets_are_digits_and_vary() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let c = SessionCode::generate(slot("123")).unwrap();
            assert_eq!(c.secret().digits().len(), SECRET_DIGITS);
            assert!(c.secret().digits().bytes().all(|b| b.is_ascii_digit()));
            seen.insert(c.secret().digits().to_string());
        }
        assert!(seen.len() > 190, "secrets repeat too often: {}", seen.len());
    }

    #[test]
    fn digits_are_uniform_enough() {
        let s = random_digits(&SystemRandom::new(), 20_000).unwrap();
        let mut counts = [0usize; 10];
        for b in s.bytes() {
            counts[(b - b'0') as usize] += 1;
        }
        // Expected 2,000 each; ±10% is > 7 standard deviations.
        assert!(
            counts.iter().all(|&c| (1800..2200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn never_in_debug_output() {
        let c = SessionCode::from_parts(slot("417"), "382905").unwrap();
        let d = format!("{c:?}");
        assert!(!d.contains("382905") && !d.contains("382"), "{d}");
    }
}
