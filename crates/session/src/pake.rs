//! SPAKE2 over the code's secret (RustCrypto `spake2` 0.4: Ed25519 group with python-spake2's M and
//! N, HKDF password scalar and SHA-256 transcript; the protocol of RFC 9382, not its cipher suites,
//! see SECURITY.md), bound to the slot, the names the relay gave each side and the inner TLS
//! connection, with explicit key confirmation both ways. Pure: no I/O.
//!
//! ```text
//! console (A)                                    agent (B)
//!   Start { pake_a }                      ──▶
//!                                         ◀──    Reply { pake_b, confirm_b }
//!   check confirm_b (else: wrong code)
//!   Confirm { confirm_a }                 ──▶    check confirm_a (else: wrong code, burn)
//! ```
//!
//! * **Binding.** Both identities include the slot, the technician and organisation as the relay
//!   reported them to each side, and the inner TLS exporter (RFC 5705/8446 keying material of *this*
//!   TLS connection). A relay in the middle terminates two TLS connections, so the two sides hold
//!   different exporters: their SPAKE2 transcripts, keys and confirmations differ and both sides
//!   fail, even though the relay forwarded every PAKE message faithfully. Likewise a relay that tells
//!   the agent "Alice of ACME IT" while the console authenticated as someone else fails: the name on
//!   the consent prompt is the name the console was told it holds. (A relay that lies to both sides
//!   alike is not caught here: that needs a key the relay does not hold, the organisation key.)
//! * **Confirmation.** `spake2`'s `finish()` returns a key even for a wrong password; the key is only
//!   trusted after the peer proves it holds the same one: HMAC-SHA256 over the transcript hash with
//!   keys derived by HKDF-SHA256 (salt = exporter) from the SPAKE2 key, one per direction. MACs are
//!   checked in constant time.
//! * **One guess.** An active attacker who does not know the secret learns only "wrong" per run
//!   (SPAKE2's security); the agent burns the code after one failure, so a guess succeeds with
//!   probability 10^-6 and there is no second try at the same code.

use ring::{digest, hkdf, hmac};
use serde::{Deserialize, Serialize};
use spake2::{Ed25519Group, Identity, Password, Spake2};
use tandem_proto::Slot;

use crate::code::CodeSecret;

/// TLS exporter label of the channel binding.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-tandem-session-pake-v1";
/// Exporter output length.
pub const EXPORTER_LEN: usize = 32;
/// Largest PAKE message accepted (SPAKE2-Ed25519 messages are 33 bytes; MACs 32).
pub const MAX_PAKE_MSG: usize = 256;
/// Version of this exchange.
/// Version of this exchange (2: technician and organisation are part of the identities).
pub const PAKE_VERSION: u16 = 2;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PakeError {
    /// The peer used another secret, or someone sits in the middle of the inner TLS connection.
    #[error("wrong session code (or the connection was tampered with)")]
    WrongCode,
    #[error("the peer speaks PAKE version {0}, this side {PAKE_VERSION}")]
    Version(u16),
    #[error("malformed PAKE message")]
    Malformed,
}

/// The messages of the exchange (postcard on the inner control stream).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PakeMsg {
    Start {
        version: u16,
        pake_a: Vec<u8>,
    },
    Reply {
        pake_b: Vec<u8>,
        confirm_b: Vec<u8>,
    },
    Confirm {
        confirm_a: Vec<u8>,
    },
    /// Sent instead of the next message when this side decided the code is wrong.
    Fail,
}

impl tandem_proto::Validate for PakeMsg {
    fn validate(&self) -> Result<(), tandem_proto::ProtoError> {
        let ok = match self {
            PakeMsg::Start { pake_a, .. } => pake_a.len() <= MAX_PAKE_MSG,
            PakeMsg::Reply { pake_b, confirm_b } => {
                pake_b.len() <= MAX_PAKE_MSG && confirm_b.len() <= MAX_PAKE_MSG
            }
            PakeMsg::Confirm { confirm_a } => confirm_a.len() <= MAX_PAKE_MSG,
            PakeMsg::Fail => true,
        };
        if ok {
            Ok(())
        } else {
            Err(tandem_proto::ProtoError::Malformed)
        }
    }
}

/// Who the relay says the technician is: the console learns it when it authenticates, the agent
/// when the console pairs with it. Both put it into the PAKE, so the two stories must agree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayIdentity {
    pub technician: String,
    pub organisation: String,
}

/// What both sides bind the exchange to.
#[derive(Clone, Debug)]
pub struct Binding {
    pub slot: Slot,
    pub who: RelayIdentity,
    pub exporter: [u8; EXPORTER_LEN],
}

impl Binding {
    /// The bound context, each part length-prefixed so that no two different contexts encode alike.
    fn context(&self) -> [&[u8]; 4] {
        [
            self.slot.as_str().as_bytes(),
            self.who.technician.as_bytes(),
            self.who.organisation.as_bytes(),
            &self.exporter[..],
        ]
    }

    fn identity(&self, role: &[u8]) -> Identity {
        let mut v = Vec::with_capacity(128);
        v.extend_from_slice(b"tandem/2 ");
        v.extend_from_slice(role);
        for part in self.context() {
            v.extend_from_slice(&(part.len() as u32).to_be_bytes());
            v.extend_from_slice(part);
        }
        Identity::new(&v)
    }
}

/// Keys both sides hold after a confirmed exchange.
pub struct Confirmed {
    /// A 256-bit key both sides share, bound to this TLS connection (for features that want an
    /// application-level key; the session itself is protected by the inner TLS).
    pub session_key: [u8; 32],
}

impl std::fmt::Debug for Confirmed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Confirmed(<keys redacted>)")
    }
}

struct Keys {
    confirm_a: hmac::Key,
    confirm_b: hmac::Key,
    session_key: [u8; 32],
}

struct Len32;
impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

fn expand(prk: &hkdf::Prk, info: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's output limit, so neither step can fail.
    if let Ok(okm) = prk.expand(&[info], Len32) {
        let _ = okm.fill(&mut out);
    }
    out
}

fn derive(key: &[u8], binding: &Binding) -> Keys {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &binding.exporter).extract(key);
    Keys {
        confirm_a: hmac::Key::new(hmac::HMAC_SHA256, &expand(&prk, b"tandem confirm console")),
        confirm_b: hmac::Key::new(hmac::HMAC_SHA256, &expand(&prk, b"tandem confirm agent")),
        session_key: expand(&prk, b"tandem session key"),
    }
}

fn transcript(pake_a: &[u8], pake_b: &[u8], binding: &Binding) -> digest::Digest {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let [slot, technician, organisation, exporter] = binding.context();
    for part in [pake_a, pake_b, slot, technician, organisation, exporter] {
        ctx.update(&(part.len() as u32).to_be_bytes());
        ctx.update(part);
    }
    ctx.finish()
}

/// The console's side (SPAKE2 role A).
pub struct ConsolePake {
    state: Spake2<Ed25519Group>,
    pake_a: Vec<u8>,
    binding: Binding,
}

impl ConsolePake {
    pub fn start(secret: &CodeSecret, binding: Binding) -> (ConsolePake, PakeMsg) {
        let (state, pake_a) = Spake2::<Ed25519Group>::start_a(
            &Password::new(secret.digits().as_bytes()),
            &binding.identity(b"console"),
            &binding.identity(b"agent"),
        );
        let msg = PakeMsg::Start {
            version: PAKE_VERSION,
            pake_a: pake_a.clone(),
        };
        (
            ConsolePake {
                state,
                pake_a,
                binding,
            },
            msg,
        )
    }

    /// Checks the agent's reply; on success returns the keys and the confirmation to send.
    pub fn finish(self, reply: PakeMsg) -> Result<(Confirmed, PakeMsg), PakeError> {
        let (pake_b, confirm_b) = match reply {
            PakeMsg::Reply { pake_b, confirm_b } => (pake_b, confirm_b),
            PakeMsg::Fail => return Err(PakeError::WrongCode),
            _ => return Err(PakeError::Malformed),
        };
        let key = self
            .state
            .finish(&pake_b)
            .map_err(|_| PakeError::WrongCode)?;
        let keys = derive(&key, &self.binding);
        let t = transcript(&self.pake_a, &pake_b, &self.binding);
        hmac::verify(&keys.confirm_b, t.as_ref(), &confirm_b).map_err(|_| PakeError::WrongCode)?;
        let confirm_a = hmac::sign(&keys.confirm_a, t.as_ref()).as_ref().to_vec();
        Ok((
            Confirmed {
                session_key: keys.session_key,
            },
            PakeMsg::Confirm { confirm_a },
        ))
    }
}

/// The agent's side (SPAKE2 role B), waiting for the console's confirmation.
pub struct AgentPake {
    keys: Keys,
    transcript: digest::Digest,
}

impl AgentPake {
    /// Answers the console's start message.
    pub fn respond(
        secret: &CodeSecret,
        binding: Binding,
        start: PakeMsg,
    ) -> Result<(AgentPake, PakeMsg), PakeError> {
        let pake_a = match start {
            PakeMsg::Start { version, pake_a } if version == PAKE_VERSION => pake_a,
            PakeMsg::Start { version, .. } => return Err(PakeError::Version(version)),
            _ => return Err(PakeError::Malformed),
        };
        let (state, pake_b) = Spake2::<Ed25519Group>::start_b(
            &Password::new(secret.digits().as_bytes()),
            &binding.identity(b"console"),
            &binding.identity(b"agent"),
        );
        let key = state.finish(&pake_a).map_err(|_| PakeError::WrongCode)?;
        let keys = derive(&key, &binding);
        let t = transcript(&pake_a, &pake_b, &binding);
        let confirm_b = hmac::sign(&keys.confirm_b, t.as_ref()).as_ref().to_vec();
        Ok((
            AgentPake {
                keys,
                transcript: t,
            },
            PakeMsg::Reply { pake_b, confirm_b },
        ))
    }

    /// Checks the console's confirmation.
    pub fn finish(self, confirm: PakeMsg) -> Result<Confirmed, PakeError> {
        let confirm_a = match confirm {
            PakeMsg::Confirm { confirm_a } => confirm_a,
            PakeMsg::Fail => return Err(PakeError::WrongCode),
            _ => return Err(PakeError::Malformed),
        };
        hmac::verify(&self.keys.confirm_a, self.transcript.as_ref(), &confirm_a)
            .map_err(|_| PakeError::WrongCode)?;
        Ok(Confirmed {
            session_key: self.keys.session_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::code::SessionCode;

    fn binding(slot: &str, exporter: u8) -> Binding {
        named(slot, exporter, "Alice", "ACME IT")
    }
    fn named(slot: &str, exporter: u8, technician: &str, organisation: &str) -> Binding {
        Binding {
            slot: Slot::new(slot).unwrap(),
            who: RelayIdentity {
                technician: technician.into(),
                organisation: organisation.into(),
            },
            exporter: [exporter; EXPORTER_LEN],
        }
    }
    fn secret(d: &str) -> CodeSecret {
        SessionCode::from_parts(Slot::new("417").unwrap(), d)
            .unwrap()
            .secret()
            .clone()
    }

    /// Runs the exchange; returns each side's result.
    fn run(
        console_secret: &str,
        console_binding: Binding,
        agent_secret: &str,
        agent_binding: Binding,
    ) -> (Result<[u8; 32], PakeError>, Result<[u8; 32], PakeError>) {
        let (c, start) = ConsolePake::start(&secret(console_secret), console_binding);
        let (a, reply) = match AgentPake::respond(&secret(agent_secret), agent_binding, start) {
            Ok(x) => x,
            Err(e) => return (Err(e.clone()), Err(e)),
        };
        match c.finish(reply) {
            Ok((ck, confirm)) => {
                let ak = a.finish(confirm).map(|k| k.session_key);
                (Ok(ck.session_key), ak)
            }
            Err(e) => {
                // The console tells the agent it failed.
                let ak = a.finish(PakeMsg::Fail).map(|k| k.session_key);
                (Err(e), ak)
            }
        }
    }

    #[test]
    fn same_secret_and_binding_agree() {
        let (c, a) = run("382905", binding("417", 1), "382905", binding("417", 1));
        assert_eq!(c.unwrap(), a.unwrap());
    }

    #[test]
    fn wrong_secret_fails_on_both_sides() {
        let (c, a) = run("382906", binding("417", 1), "382905", binding("417", 1));
        assert_eq!(c, Err(PakeError::WrongCode));
        assert_eq!(a, Err(PakeError::WrongCode));
    }

    #[test]
    fn different_tls_exporters_fail_even_with_the_right_secret() {
        // A relay in the middle: two TLS connections, two exporters, messages passed through.
        let (c, a) = run("382905", binding("417", 1), "382905", binding("417", 2));
        assert_eq!(c, Err(PakeError::WrongCode));
        assert_eq!(a, Err(PakeError::WrongCode));
    }

    #[test]
    fn different_slots_fail() {
        let (c, a) = run("382905", binding("417", 1), "382905", binding("418", 1));
        assert!(c.is_err() && a.is_err());
    }

    #[test]
    fn a_relay_that_tells_the_two_sides_different_names_fails_the_exchange() {
        // The console authenticated as mallory; the relay told the agent it is Alice of ACME IT.
        let (c, a) = run(
            "382905",
            named("417", 1, "mallory", "Evil Ltd"),
            "382905",
            named("417", 1, "Alice", "ACME IT"),
        );
        assert_eq!(c, Err(PakeError::WrongCode));
        assert_eq!(a, Err(PakeError::WrongCode));
        // Only the organisation differs.
        let (c, a) = run(
            "382905",
            named("417", 1, "Alice", "ACME IT Support"),
            "382905",
            named("417", 1, "Alice", "ACME IT"),
        );
        assert!(c.is_err() && a.is_err());
        // Moving bytes between the fields changes the identity (length-prefixed parts).
        let (c, a) = run(
            "382905",
            named("417", 1, "Alice A", "CME"),
            "382905",
            named("417", 1, "Alice", "A CME"),
        );
        assert!(c.is_err() && a.is_err());
    }

    #[test]
    fn altered_messages_fail() {
        let b = binding("417", 9);
        let (c, start) = ConsolePake::start(&secret("111111"), b.clone());
        let (a, reply) = AgentPake::respond(&secret("111111"), b, start).unwrap();
        // Flip a bit in the agent's confirmation.
        let PakeMsg::Reply {
            pake_b,
            mut confirm_b,
        } = reply
        else {
            panic!()
        };
        confirm_b[0] ^= 1;
        assert_eq!(
            c.finish(PakeMsg::Reply { pake_b, confirm_b }).unwrap_err(),
            PakeError::WrongCode
        );
        // A forged confirmation for the agent.
        assert_eq!(
            a.finish(PakeMsg::Confirm {
                confirm_a: vec![0; 32]
            })
            .unwrap_err(),
            PakeError::WrongCode
        );
    }

    #[test]
    fn garbage_and_version_mismatch() {
        let b = binding("417", 3);
        assert!(
            AgentPake::respond(
                &secret("111111"),
                b.clone(),
                PakeMsg::Start {
                    version: 1,
                    pake_a: vec![1, 2, 3]
                }
            )
            .is_err()
        );
        assert_eq!(
            AgentPake::respond(
                &secret("111111"),
                b.clone(),
                PakeMsg::Start {
                    version: 99,
                    pake_a: vec![]
                }
            )
            .err(),
            Some(PakeError::Version(99))
        );
        assert_eq!(
            AgentPake::respond(&secret("111111"), b, PakeMsg::Fail).err(),
            Some(PakeError::Malformed)
        );
    }
}
