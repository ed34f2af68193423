//! Names the relay reports (technician, organisation) as the agent shows them to the user.
//!
//! The relay is not trusted with them: it could pick "ACME IT" in Cyrillic letters, or hide a
//! right-to-left override that makes "Evil Ltd\u{202E}TI EMCA" read as something else. A name that
//! could deceive is never shown as it is: [`shown`] escapes every character that is not plain
//! printable text of one script, and says so, so the prompt can warn that the name is not what it
//! seems. (Names also travel inside the PAKE identities; that check compares bytes, so escaping
//! here changes nothing there.)
//!
//! What counts as deceptive (UTS #39, with the `unicode-security` crate where it has the data):
//! * control characters, bidirectional formatting characters and invisible characters;
//! * letters of more than one script in one name (Latin "ACME" with a Cyrillic "С"), so-called
//!   mixed-script confusables;
//! * a name whose letters are all in another script and whose letters' confusable skeleton is plain
//!   ASCII (whole-script confusables such as Cyrillic "АСМЕ ІТ®": symbols, digits and punctuation
//!   around the letters do not hide them);
//! * an empty name, or one of blanks only.
//!
//! Names are also cut to [`MAX_SHOWN`] characters on screen, so that a relay cannot fill the
//! prompt with a message of its own and push the buttons out of the window. [`printable`] does the
//! same for other text from the relay or the peer (end reasons, close reasons).

use unicode_security::MixedScript;

/// Longest name shown, in characters (escapes count as one); longer ones end in "…".
pub const MAX_SHOWN: usize = 48;

/// A name ready for the user's screen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shown {
    /// The name itself when it is plain, otherwise with every non-ASCII or invisible character
    /// written as `\u{…}`.
    pub text: String,
    /// Whether the name was escaped because it could imitate another name.
    pub suspicious: bool,
}

/// The technician and organisation a session names (as the relay reported them, bound into the
/// PAKE), ready to show: "alice of ACME IT".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShownPeer {
    pub technician: Shown,
    pub organisation: Shown,
}

impl ShownPeer {
    /// The names to show: the certificate's when the agent verified the technician by the
    /// organisation's key, otherwise the relay's.
    pub fn of(peer: &crate::PeerInfo) -> ShownPeer {
        if let crate::OrgCheck::Verified(v) = &peer.org {
            return ShownPeer {
                technician: shown(&v.technician),
                organisation: shown(&v.organisation),
            };
        }
        ShownPeer {
            technician: shown(peer.technician.as_deref().unwrap_or_default()),
            organisation: shown(peer.organisation.as_deref().unwrap_or_default()),
        }
    }

    /// Whether either name was escaped.
    pub fn suspicious(&self) -> bool {
        self.technician.suspicious || self.organisation.suspicious
    }
}

impl std::fmt::Display for ShownPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of {}", self.technician.text, self.organisation.text)
    }
}

/// Bidirectional formatting characters (Unicode `Bidi_Control`).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Characters that draw nothing, or nothing visible, in ordinary text (a conservative subset of
/// `Default_Ignorable_Code_Point` plus the odd spaces used to pad names).
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{17B4}'
            | '\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200D}'
            | '\u{2060}'..='\u{2064}'
            | '\u{206A}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFFB}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    ) || (c.is_whitespace() && c != ' ')
}

/// Characters that never belong in text shown as one line.
fn is_hidden(c: char) -> bool {
    c.is_control() || is_bidi_control(c) || is_invisible(c)
}

/// Whether `name` could deceive a reader (see the module documentation).
pub fn is_deceptive(name: &str) -> bool {
    if name.trim().is_empty() || name.chars().any(is_hidden) {
        return true;
    }
    if name.is_ascii() {
        return false;
    }
    if !name.is_single_script() {
        return true;
    }
    // Whole-script confusable with an ASCII name: every letter has a Latin look-alike. Only the
    // letters count: a symbol such as "®" or "%" has a non-ASCII skeleton of its own and would
    // otherwise hide Cyrillic "АСМЕ" behind it.
    let letters: String = name.chars().filter(|c| c.is_alphabetic()).collect();
    if letters.is_ascii() {
        return false;
    }
    let skeleton: String = unicode_security::skeleton(&letters).collect();
    skeleton.is_ascii()
}

/// Cuts `text` to `max` characters, ending in "…" when it was longer.
fn cut(text: String, max: usize) -> String {
    if text.chars().count() <= max {
        return text;
    }
    let mut t: String = text.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

/// Writes `c` as `\u{…}`.
fn escape(c: char, out: &mut String) {
    out.push_str(&format!("\\u{{{:x}}}", c as u32));
}

/// Other text from the relay or the peer (a reason, an error) as one plain line of at most `max`
/// characters: control, bidirectional and invisible characters are escaped.
pub fn printable(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max * 4));
    for c in text.chars() {
        if is_hidden(c) {
            escape(c, &mut out);
        } else {
            out.push(c);
        }
    }
    cut(out, max)
}

/// The name as the agent shows it.
pub fn shown(name: &str) -> Shown {
    if name.trim().is_empty() {
        return Shown {
            text: "(no name)".into(),
            suspicious: true,
        };
    }
    if !is_deceptive(name) {
        return Shown {
            text: cut(name.to_owned(), MAX_SHOWN),
            suspicious: false,
        };
    }
    let mut text = String::with_capacity(name.len() * 2);
    for c in name.chars() {
        if c.is_ascii() && !c.is_ascii_control() {
            text.push(c);
        } else {
            escape(c, &mut text);
        }
    }
    Shown {
        text: cut(text, MAX_SHOWN * 2),
        suspicious: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_shown_as_they_are() {
        for n in [
            "Alice",
            "ACME IT",
            "Zoë Müller",
            "Łukasz Wiśniewski",
            "山田太郎",
            "Ольга Петрова",
            "O'Brien & Co. (GmbH)",
        ] {
            assert_eq!(
                shown(n),
                Shown {
                    text: n.into(),
                    suspicious: false
                },
                "{n}"
            );
        }
    }

    #[test]
    fn bidi_controls_and_invisible_characters_are_escaped() {
        let s = shown("Evil Ltd\u{202E}TI EMCA");
        assert!(s.suspicious);
        assert_eq!(s.text, "Evil Ltd\\u{202e}TI EMCA");
        assert!(shown("Al\u{200B}ice").suspicious);
        assert!(shown("Alice\u{2067}").suspicious);
        assert!(shown("Alice\nSupport").suspicious);
        assert!(shown("A\u{00A0}lice").suspicious);
    }

    #[test]
    fn mixed_script_and_whole_script_confusables_are_escaped() {
        // Latin with one Cyrillic "С" (U+0421).
        let s = shown("A\u{0421}ME IT");
        assert!(s.suspicious);
        assert_eq!(s.text, "A\\u{421}ME IT");
        // Entirely Cyrillic look-alikes of "ACME".
        assert!(shown("\u{0410}\u{0421}\u{041C}\u{0415}").suspicious);
        // Greek "Ο" for a Latin "O" in a Latin word.
        assert!(shown("M\u{039F}NEY").suspicious);
        // Symbols, digits and punctuation do not hide Cyrillic look-alike letters.
        for n in [
            "\u{0410}\u{0421}\u{041C}\u{0415} \u{0406}\u{0422}\u{00AE}",
            "\u{0410}\u{0421}\u{041C}\u{0415} \u{0406}\u{0422} \u{2713}",
            "\u{0410}\u{0421}\u{041C}\u{0415} \u{0406}\u{0422} 100%",
        ] {
            assert!(shown(n).suspicious, "{n}");
        }
    }

    #[test]
    fn empty_and_long_names() {
        assert!(shown("").suspicious);
        assert!(shown("   ").suspicious);
        let long = "Microsoft Security. Your PC is infected, call +1-800-000-0000 now. Alice";
        let s = shown(long);
        assert!(!s.suspicious);
        assert_eq!(s.text.chars().count(), MAX_SHOWN);
        assert!(s.text.ends_with('…'));
    }

    #[test]
    fn other_text_is_one_plain_line() {
        assert_eq!(
            printable("ended\n\u{1b}[31mcall us", 80),
            "ended\\u{a}\\u{1b}[31mcall us"
        );
        assert_eq!(printable("abcdef", 4), "abc…");
        assert_eq!(printable("fine", 80), "fine");
    }
}
