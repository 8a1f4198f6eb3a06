//! The rules of MQTT 3.1.1's wire format that the packet codec lets through.
//!
//! rumqttc's `mqttbytes::v4` decodes what a *client* needs to be lenient about; a server must be
//! strict: a packet whose reserved bits are wrong is malformed and the connection is closed
//! (MQTT-2.2.2-2). The codec already refuses a PUBLISH at QoS 3, a will QoS of 3, and will QoS or
//! will retain without a will (MQTT-3.1.2-11/13/14/15), and a string that is not UTF-8; topic
//! names and filters are checked by [`crate::topic`] (U+0000 included). [`check_next`] looks at
//! the raw bytes of the next whole packet, before it is decoded, for the rest:
//!
//! - the fixed header's flags: `0010` for PUBREL, SUBSCRIBE and UNSUBSCRIBE (MQTT-3.6.1-1,
//!   3.8.1-1, 3.10.1-1), `0000` for every other packet but PUBLISH (MQTT-2.2.2-2);
//! - CONNECT: the reserved connect flag (MQTT-3.1.2-3), a password without a user name
//!   (MQTT-3.1.2-22), U+0000 in the client id or the user name (MQTT-1.5.3-2), and bytes after
//!   its last field (its fields must fill its remaining length exactly; the codec ignores what
//!   is left);
//! - SUBSCRIBE: reserved bits in a requested QoS byte (MQTT-3.8.3-4).
//!
//! [`check_first`] needs only the first byte a client sends: it must start a CONNECT
//! (MQTT-3.1.0-1), so anything else is refused at once, not once the packet its header declares
//! (up to the maximum packet size) has arrived. [`frame_length`] reads a packet's size from its
//! fixed header, for the connection to size its reads and its buffer by it.
//!
//! A PUBLISH at QoS 0 with DUP set breaks a rule for its sender (MQTT-3.3.1-2) but none for the
//! receiver: like mosquitto, the broker ignores the flag.
//!
//! Kept apart from the connection so the rules can be read, and tested, in one place.

use rumqttc::mqttbytes;

/// Checks the next packet in `input`, if it is whole; `Err` names the rule it breaks. Anything
/// the codec itself refuses (or a packet not whole yet) is left to the codec.
pub fn check_next(input: &[u8], max_packet_size: usize) -> Result<(), String> {
    let frame = match mqttbytes::check(input.iter(), max_packet_size) {
        Ok(header) => &input[..header.frame_length()],
        Err(_) => return Ok(()),
    };
    let kind = frame[0] >> 4;
    let flags = frame[0] & 0x0F;
    // The fixed header: byte 1, then 1 to 4 bytes of remaining length (the codec checked them).
    let body = match frame[1..].iter().position(|b| b & 0x80 == 0) {
        Some(i) => &frame[2 + i..],
        None => return Ok(()),
    };
    match (kind, flags) {
        (3, flags) => check_publish(flags),
        (6 | 8 | 10, 0b0010) => {
            if kind == 8 {
                check_subscribe(body)
            } else {
                Ok(())
            }
        }
        (6 | 8 | 10, flags) => Err(format!(
            "{} with fixed-header flags {flags:04b}, not 0010 (MQTT-{})",
            name(kind),
            match kind {
                6 => "3.6.1-1",
                8 => "3.8.1-1",
                _ => "3.10.1-1",
            }
        )),
        (1..=14, 0) => {
            if kind == 1 {
                check_connect(body)
            } else {
                Ok(())
            }
        }
        (1..=14, flags) => Err(format!(
            "{} with fixed-header flags {flags:04b}, not 0000 (MQTT-2.2.2-2)",
            name(kind)
        )),
        // Packet types 0 and 15: the codec refuses them.
        _ => Ok(()),
    }
}

/// Checks the first bytes a client sends, as soon as there is one: its first packet must be a
/// CONNECT (MQTT-3.1.0-1), with fixed-header flags `0000` (MQTT-2.2.2-2).
pub fn check_first(input: &[u8]) -> Result<(), String> {
    let Some(&byte1) = input.first() else {
        return Ok(());
    };
    let (kind, flags) = (byte1 >> 4, byte1 & 0x0F);
    match kind {
        1 if flags == 0 => Ok(()),
        1 => Err(format!(
            "CONNECT with fixed-header flags {flags:04b}, not 0000 (MQTT-2.2.2-2)"
        )),
        0 | 15 => Err(format!(
            "reserved packet type {kind} before CONNECT (MQTT-3.1.0-1)"
        )),
        _ => Err(format!("{} before CONNECT (MQTT-3.1.0-1)", name(kind))),
    }
}

/// The size of the next packet in `input` (fixed header included), once its fixed header is
/// there; `None` before, or if its remaining length is malformed (the codec refuses it).
pub fn frame_length(input: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for (i, &byte) in input.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(1 + (i + 1) + remaining);
        }
    }
    None
}

fn check_publish(flags: u8) -> Result<(), String> {
    if (flags >> 1) & 0b11 == 3 {
        return Err("PUBLISH with QoS 3 (MQTT-3.3.1-4)".into());
    }
    Ok(())
}

/// CONNECT's variable header (protocol name, level, connect flags, keep-alive) and payload
/// (client id, will topic and message, user name, password: those its flags announce). Fields
/// cut short are left to the codec, which refuses them.
fn check_connect(body: &[u8]) -> Result<(), String> {
    let mut at = 0;
    let Some(protocol) = field(body, &mut at) else {
        return Ok(());
    };
    let (Some(&level), Some(&connect_flags)) = (body.get(at), body.get(at + 1)) else {
        return Ok(());
    };
    if connect_flags & 0b0000_0001 != 0 {
        return Err("CONNECT with its reserved flag set (MQTT-3.1.2-3)".into());
    }
    let will = connect_flags & 0b0000_0100 != 0;
    let user_name = connect_flags & 0b1000_0000 != 0;
    let password = connect_flags & 0b0100_0000 != 0;
    if password && !user_name {
        return Err("CONNECT with a password and no user name (MQTT-3.1.2-22)".into());
    }
    // The payload's layout is MQTT 3.1.1's; another protocol is refused by the codec, or with a
    // CONNACK for another level (MQTT-3.1.2-2).
    if protocol != b"MQTT" || level != 4 {
        return Ok(());
    }
    at += 2 + 2; // level, connect flags, keep-alive
    let Some(client_id) = field(body, &mut at) else {
        return Ok(());
    };
    if client_id.contains(&0) {
        return Err("CONNECT with U+0000 in its client id (MQTT-1.5.3-2)".into());
    }
    if will && (field(body, &mut at).is_none() || field(body, &mut at).is_none()) {
        return Ok(());
    }
    if user_name {
        let Some(name) = field(body, &mut at) else {
            return Ok(());
        };
        if name.contains(&0) {
            return Err("CONNECT with U+0000 in its user name (MQTT-1.5.3-2)".into());
        }
    }
    if password && field(body, &mut at).is_none() {
        return Ok(());
    }
    if at < body.len() {
        return Err(format!(
            "CONNECT with {} bytes after its last field (its remaining length must be its \
             fields')",
            body.len() - at
        ));
    }
    Ok(())
}

/// The length-prefixed field (string or binary data) at `at`, which moves past it; `None` if
/// `bytes` ends first.
fn field<'a>(bytes: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
    let len = read_u16(bytes, *at)?;
    let value = bytes.get(*at + 2..*at + 2 + len)?;
    *at += 2 + len;
    Some(value)
}

/// SUBSCRIBE's payload: after the packet id, (filter, requested QoS byte) pairs.
fn check_subscribe(body: &[u8]) -> Result<(), String> {
    let mut at = 2;
    while at < body.len() {
        let Some(len) = read_u16(body, at) else {
            return Ok(());
        };
        let Some(&options) = body.get(at + 2 + len) else {
            return Ok(());
        };
        if options & 0b1111_1100 != 0 {
            return Err(format!(
                "SUBSCRIBE with reserved bits set in a requested QoS byte ({options:08b}; \
                 MQTT-3.8.3-4)"
            ));
        }
        at += 2 + len + 1;
    }
    Ok(())
}

fn read_u16(bytes: &[u8], at: usize) -> Option<usize> {
    let pair = bytes.get(at..at + 2)?;
    Some(usize::from(u16::from_be_bytes([pair[0], pair[1]])))
}

fn name(kind: u8) -> &'static str {
    match kind {
        1 => "CONNECT",
        2 => "CONNACK",
        4 => "PUBACK",
        5 => "PUBREC",
        6 => "PUBREL",
        7 => "PUBCOMP",
        8 => "SUBSCRIBE",
        9 => "SUBACK",
        10 => "UNSUBSCRIBE",
        11 => "UNSUBACK",
        12 => "PINGREQ",
        13 => "PINGRESP",
        14 => "DISCONNECT",
        _ => "PUBLISH",
    }
}

/// A client id for a client that sent none (MQTT-3.1.3-6): 128 bits from the process's random
/// hash keys, so that no other client can guess it and take the session over.
pub fn random_client_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let state = std::collections::hash_map::RandomState::new();
    let word = |i: u64| {
        let mut h = state.build_hasher();
        h.write_u64(i);
        h.finish()
    };
    format!("auto-{:016x}{:016x}", word(0), word(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use rumqttc::mqttbytes::v4::{Connect, Login, Packet, PubRel, Subscribe, Unsubscribe};
    use rumqttc::mqttbytes::QoS;

    const MAX: usize = 1 << 20;

    fn bytes(packet: Packet) -> Vec<u8> {
        let mut buf = BytesMut::new();
        packet.write(&mut buf, MAX).unwrap();
        buf.to_vec()
    }

    fn with_flags(mut packet: Vec<u8>, flags: u8) -> Vec<u8> {
        packet[0] = (packet[0] & 0xF0) | flags;
        packet
    }

    fn rule(input: &[u8]) -> String {
        check_next(input, MAX).expect_err("a broken rule")
    }

    #[test]
    fn well_formed_packets_pass() {
        let mut connect = Connect::new("c");
        connect.login = Some(Login::new("user", "secret"));
        for packet in [
            Packet::Connect(connect),
            Packet::PubRel(PubRel::new(7)),
            Packet::Subscribe(Subscribe::new("a/+", QoS::ExactlyOnce)),
            Packet::Unsubscribe(Unsubscribe::new("a/+")),
            Packet::PingReq,
            Packet::Disconnect,
        ] {
            assert_eq!(
                check_next(&bytes(packet.clone()), MAX),
                Ok(()),
                "{packet:?}"
            );
        }
        // QoS 1 and 2 with DUP, QoS 0 with RETAIN, and (leniently) QoS 0 with DUP: fine.
        let publish = [0x30, 3, 0, 1, b't'];
        for flags in [0b0001, 0b1010, 0b1100, 0b0011, 0b1000] {
            assert_eq!(
                check_next(&with_flags(publish.to_vec(), flags), MAX),
                Ok(())
            );
        }
        // Not whole yet, or not a packet at all: the codec's to say.
        assert_eq!(check_next(&[0x62], MAX), Ok(()));
        assert_eq!(check_next(&[0x60, 2, 0], MAX), Ok(()));
        assert_eq!(check_next(&[0xF0, 0], MAX), Ok(()));
    }

    #[test]
    fn pubrel_subscribe_unsubscribe_need_flags_0010() {
        let pubrel = bytes(Packet::PubRel(PubRel::new(7)));
        assert!(rule(&with_flags(pubrel, 0)).contains("MQTT-3.6.1-1"));
        let subscribe = bytes(Packet::Subscribe(Subscribe::new("a", QoS::AtMostOnce)));
        assert!(rule(&with_flags(subscribe, 0)).contains("MQTT-3.8.1-1"));
        let unsubscribe = bytes(Packet::Unsubscribe(Unsubscribe::new("a")));
        assert!(rule(&with_flags(unsubscribe, 0b0011)).contains("MQTT-3.10.1-1"));
    }

    #[test]
    fn other_packets_need_flags_0000() {
        for packet in [
            bytes(Packet::Connect(Connect::new("c"))),
            vec![0x40, 2, 0, 1], // PUBACK
            vec![0x50, 2, 0, 1], // PUBREC
            vec![0x70, 2, 0, 1], // PUBCOMP
            vec![0xC0, 0],       // PINGREQ
            vec![0xE0, 0],       // DISCONNECT
        ] {
            let reason = rule(&with_flags(packet.clone(), 0b0100));
            assert!(reason.contains("MQTT-2.2.2-2"), "{packet:?}: {reason}");
        }
    }

    #[test]
    fn publish_qos3() {
        let publish = vec![0x30, 3, 0, 1, b't'];
        assert!(rule(&with_flags(publish, 0b0110)).contains("MQTT-3.3.1-4"));
    }

    #[test]
    fn connect_reserved_flag_and_password_without_user_name() {
        let connect = bytes(Packet::Connect(Connect::new("c")));
        // Byte 1, one length byte, "MQTT" with its length, the level: the flags are next.
        let flags_at = 2 + 2 + 4 + 1;
        let mut reserved = connect.clone();
        reserved[flags_at] |= 0b0000_0001;
        assert!(rule(&reserved).contains("MQTT-3.1.2-3"));

        let mut with_login = Connect::new("c");
        with_login.login = Some(Login::new("user", "secret"));
        let mut password_only = bytes(Packet::Connect(with_login));
        password_only[flags_at] &= !0b1000_0000;
        assert!(rule(&password_only).contains("MQTT-3.1.2-22"));
    }

    #[test]
    fn the_first_packet_must_be_connect_from_its_first_byte() {
        assert_eq!(check_first(&[]), Ok(()));
        assert_eq!(check_first(&[0x10]), Ok(()));
        assert_eq!(
            check_first(&bytes(Packet::Connect(Connect::new("c")))),
            Ok(())
        );
        // A PUBLISH header declaring 1 MiB: refused before any of it.
        let reason = check_first(&[0x30, 0x80, 0x80, 0x40]).expect_err("not a CONNECT");
        assert!(reason.contains("PUBLISH before CONNECT"), "{reason}");
        assert!(reason.contains("MQTT-3.1.0-1"), "{reason}");
        for (byte1, what) in [
            (0xC0, "PINGREQ"),
            (0x82, "SUBSCRIBE"),
            (0x00, "reserved packet type 0"),
            (0xFF, "reserved packet type 15"),
        ] {
            let reason = check_first(&[byte1]).expect_err("not a CONNECT");
            assert!(reason.contains(what), "{byte1:#x}: {reason}");
        }
        assert!(check_first(&[0x12])
            .expect_err("flags")
            .contains("MQTT-2.2.2-2"));
    }

    #[test]
    fn frame_length_from_the_fixed_header() {
        assert_eq!(frame_length(&[]), None);
        assert_eq!(frame_length(&[0x30]), None);
        assert_eq!(frame_length(&[0xC0, 0]), Some(2));
        assert_eq!(frame_length(&[0x30, 127]), Some(129));
        assert_eq!(frame_length(&[0x30, 0x80]), None);
        assert_eq!(frame_length(&[0x30, 0x80, 0x01]), Some(3 + 128));
        assert_eq!(frame_length(&[0x30, 0x80, 0x80, 0x40]), Some(4 + (1 << 20)));
        assert_eq!(
            frame_length(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]),
            Some(5 + 268_435_455)
        );
        // A fifth length byte: malformed, the codec's to refuse.
        assert_eq!(frame_length(&[0x30, 0x80, 0x80, 0x80, 0x80, 0x01]), None);
        let publish = bytes(Packet::Publish(rumqttc::mqttbytes::v4::Publish::new(
            "t",
            QoS::AtMostOnce,
            vec![0; 300],
        )));
        assert_eq!(frame_length(&publish[..3]), Some(publish.len()));
    }

    /// A CONNECT with every field, for the walk through its payload.
    fn full_connect(id: &str, user: &str) -> Connect {
        let mut connect = Connect::new(id);
        connect.last_will = Some(rumqttc::mqttbytes::v4::LastWill::new(
            "will/topic",
            vec![0, 1, 0],
            QoS::AtLeastOnce,
            true,
        ));
        connect.login = Some(Login::new(user, "pass\0word"));
        connect
    }

    #[test]
    fn connect_fields_fill_its_remaining_length_exactly() {
        // Every field present (a NUL in the password, binary data, is fine), or none but the id.
        for connect in [
            full_connect("c", "user"),
            Connect::new("c"),
            Connect::new(""),
        ] {
            assert_eq!(
                check_next(&bytes(Packet::Connect(connect.clone())), MAX),
                Ok(()),
                "{connect:?}"
            );
        }
        for connect in [full_connect("c", "user"), Connect::new("c")] {
            let mut trailing = bytes(Packet::Connect(connect));
            trailing[1] += 2;
            trailing.extend([0, 0]);
            let reason = rule(&trailing);
            assert!(reason.contains("2 bytes after its last field"), "{reason}");
        }
        // A field running past the end is the codec's to refuse.
        let mut short = bytes(Packet::Connect(full_connect("c", "user")));
        short[1] -= 2;
        short.truncate(short.len() - 2);
        assert_eq!(check_next(&short, MAX), Ok(()));
        // Another protocol level has another layout: refused with a CONNACK, not here.
        let mut v5 = bytes(Packet::Connect(Connect::new("c")));
        v5[8] = 5;
        v5[1] += 1;
        v5.push(0);
        assert_eq!(check_next(&v5, MAX), Ok(()));
    }

    #[test]
    fn connect_client_id_and_user_name_without_nul() {
        let reason = rule(&bytes(Packet::Connect(Connect::new("a\0b"))));
        assert!(reason.contains("client id"), "{reason}");
        assert!(reason.contains("MQTT-1.5.3-2"), "{reason}");
        let reason = rule(&bytes(Packet::Connect(full_connect("c", "\0"))));
        assert!(reason.contains("user name"), "{reason}");
        assert!(reason.contains("MQTT-1.5.3-2"), "{reason}");
    }

    #[test]
    fn subscribe_reserved_qos_bits() {
        let mut subscribe = bytes(Packet::Subscribe(Subscribe::new("a", QoS::AtLeastOnce)));
        let last = subscribe.len() - 1;
        subscribe[last] |= 0b0100_0000;
        assert!(rule(&subscribe).contains("MQTT-3.8.3-4"));
    }

    #[test]
    fn random_client_ids_differ_and_are_long() {
        let (a, b) = (random_client_id(), random_client_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), "auto-".len() + 32);
    }
}
