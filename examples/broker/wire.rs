//! The rules of MQTT 3.1.1's wire format that the packet codec lets through.
//!
//! rumqttc's `mqttbytes::v4` decodes what a *client* needs to be lenient about; a server must be
//! strict: a packet whose reserved bits are wrong is malformed and the connection is closed
//! (MQTT-2.2.2-2). The codec already refuses a PUBLISH at QoS 3, a will QoS of 3, and will QoS or
//! will retain without a will (MQTT-3.1.2-11/13/14/15); [`check_next`] looks at the raw bytes of
//! the next whole packet, before it is decoded, for the rest:
//!
//! - the fixed header's flags: `0010` for PUBREL, SUBSCRIBE and UNSUBSCRIBE (MQTT-3.6.1-1,
//!   3.8.1-1, 3.10.1-1), `0000` for every other packet but PUBLISH (MQTT-2.2.2-2);
//! - CONNECT: the reserved connect flag (MQTT-3.1.2-3), a password without a user name
//!   (MQTT-3.1.2-22);
//! - SUBSCRIBE: reserved bits in a requested QoS byte (MQTT-3.8.3-4).
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

fn check_publish(flags: u8) -> Result<(), String> {
    if (flags >> 1) & 0b11 == 3 {
        return Err("PUBLISH with QoS 3 (MQTT-3.3.1-4)".into());
    }
    Ok(())
}

/// CONNECT's variable header: protocol name, level, connect flags.
fn check_connect(body: &[u8]) -> Result<(), String> {
    let Some(name_len) = read_u16(body, 0) else {
        return Ok(());
    };
    let Some(&connect_flags) = body.get(2 + name_len + 1) else {
        return Ok(());
    };
    if connect_flags & 0b0000_0001 != 0 {
        return Err("CONNECT with its reserved flag set (MQTT-3.1.2-3)".into());
    }
    let user_name = connect_flags & 0b1000_0000 != 0;
    let password = connect_flags & 0b0100_0000 != 0;
    if password && !user_name {
        return Err("CONNECT with a password and no user name (MQTT-3.1.2-22)".into());
    }
    Ok(())
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
