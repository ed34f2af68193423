//! Tandem's end-to-end session, the heart of its trust model.
//!
//! Agent and console each hold a QUIC connection to the relay (the *outer* link). Between them runs an
//! *inner* QUIC connection whose packets travel as opaque payloads through the relay ([`carrier`]),
//! with real TLS 1.3 end to end and fresh keys per session ([`inner`]). The inner TLS is authenticated
//! by SPAKE2 over the secret half of the one-time code, bound to the slot and to the inner TLS
//! exporter, with key confirmation both ways ([`pake`]). A relay that terminates the inner TLS to read
//! it ends up with two exporters, and the PAKE fails on both sides. Nothing but the PAKE runs on the
//! inner connection before it succeeds; a failed confirmation burns the code.
//!
//! * [`code`]: the session code (`417-382-905`): generation, dictation format, tolerant parsing.
//! * [`setup`]: [`AgentHost`] (the agent shows a code and waits) and [`join`] (the console joins).
//! * [`unattended`]: [`DeviceHost`] (an enrolled agent, online without a code) and
//!   [`connect_device`] (the console reaches it by the organisation's certificates, no PAKE).
//! * [`session`]: the confirmed [`Session`] with its channels and the relay-link supervisor.

pub mod carrier;
pub mod code;
pub mod direct;
pub mod inner;
pub mod limit;
pub mod names;
pub mod pake;
pub mod session;
pub mod setup;
pub mod unattended;

pub use carrier::Fallback;
pub use code::{CodeError, SessionCode};
pub use limit::{GuessLimit, Remembered};
pub use pake::RelayIdentity;
pub use session::{
    CAP_CHAT, CAP_CLIPBOARD, CAP_DIRECT, CAP_FILES, ClipFormat, ClipItem, Consent, ControlMsg,
    InputItem, InputSender, MAX_CHAT, MAX_CLIP_IMAGE, MAX_CLIP_TEXT, MAX_CURSOR_SIDE, MAX_MONITORS,
    MonitorInfo, OrgCheck, PeerInfo, Role, Session, SessionEnd, SessionError, SessionEvent,
    TransferStream, VideoFrame, VideoSender,
};
pub use setup::{AgentEvent, AgentHost, CodeChange, CodeRequester, SessionConfig, join, join_on};
pub use tandem_org;
pub use unattended::{
    DeviceEvent, DeviceHost, DeviceInfo, DeviceList, ListedDevice, UnattendedPolicy,
    connect_device, list_devices,
};
