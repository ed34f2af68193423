//! Relay channels: after pairing, a session's end-to-end packets cross the relay as plain UDP
//! datagrams beside the outer QUIC connection, as TURN's channel data does, instead of as
//! DATAGRAM frames the relay must decrypt and encrypt again.
//!
//! # Wire format
//! `[RELAYED][token: 8 bytes, big-endian][payload]`. The first byte has QUIC's fixed bit (0x40)
//! clear, so a channel packet and a QUIC packet share the same socket and 5-tuple on both sides
//! (clients: [`crate::direct::TapSocket`]; the relay: [`crate::tunnel::PacketTap`]).
//!
//! # Who may send what
//! The relay gives each paired side a token of its own, on that side's authenticated QUIC link
//! (`RelayMsg::Channel`). It forwards a channel packet only when the token is one it gave *and*
//! the packet comes from the address of the QUIC connection it gave it on; it writes the peer's
//! token in place of the sender's and sends the packet to the peer's QUIC connection address,
//! nowhere else. A side accepts channel packets only from the relay's address and with its own
//! token. The payload is the inner QUIC connection's own packets, which authenticate themselves:
//! the relay stays blind, and what a stranger injects is dropped by the inner connection.

/// First byte of a channel packet.
pub const RELAYED: u8 = 0x04;
/// Bytes before the payload.
pub const HEADER: usize = 9;
/// Largest channel packet a side or the relay handles (larger ones are dropped): a session's inner
/// packets (at most 1,400 bytes on a channel) and the header. Small enough that the relay's
/// batched sends (GSO) fit any 1,500-byte path, IPv4 or IPv6.
pub const MAX_PACKET: usize = 1409;
/// The payload of a channel hello: a side says it takes channel packets (see the session's
/// carrier). Shorter than any QUIC packet, so never mistaken for one.
pub const HELLO: &[u8] = b"tandem-hello";
/// The answer to a [`HELLO`] (not answered itself). The same length.
pub const READY: &[u8] = b"tandem-ready";

/// The token and payload of a channel packet, if `p` is one.
pub fn parse(p: &[u8]) -> Option<(u64, &[u8])> {
    if p.len() <= HEADER || p.len() > MAX_PACKET || p[0] != RELAYED {
        return None;
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(&p[1..HEADER]);
    Some((u64::from_be_bytes(t), &p[HEADER..]))
}

/// Writes the header with `token` into the first [`HEADER`] bytes of `p`.
pub fn write_header(p: &mut [u8], token: u64) {
    if p.len() >= HEADER {
        p[0] = RELAYED;
        p[1..HEADER].copy_from_slice(&token.to_be_bytes());
    }
}

/// Payload bytes a channel packet may carry on a path whose outer QUIC connection allows DATAGRAM
/// frames of `max_datagram` bytes: the same path, so the same UDP size, less the header. (A QUIC
/// datagram frame spends at least 22 bytes on header, packet number and tag besides its payload;
/// 11 of them are left as margin.)
pub fn max_payload(max_datagram: usize) -> usize {
    (max_datagram + 22).saturating_sub(HEADER + 11)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_rejects() {
        let mut p = vec![0u8; HEADER + 3];
        p[HEADER..].copy_from_slice(&[7, 8, 9]);
        write_header(&mut p, 0x0102_0304_0506_0708);
        assert_eq!(parse(&p), Some((0x0102_0304_0506_0708, &[7u8, 8, 9][..])));
        assert!(crate::direct::is_direct_packet(&p), "fixed bit clear");
        assert_eq!(parse(&p[..HEADER]), None, "no payload");
        p[0] = 0x03;
        assert_eq!(parse(&p), None, "another kind");
        let big = [RELAYED; MAX_PACKET + 1];
        assert!(HELLO.len() < 20, "shorter than a QUIC packet");
        assert_eq!(parse(&big), None);
        assert_eq!(max_payload(1200), 1202);
    }
}
