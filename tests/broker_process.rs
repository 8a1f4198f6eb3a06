//! The example broker as a process, seen from outside: malformed input closes only the offending
//! connection; the command line's errors; SIGTERM and kill -9 under load lose no acknowledged
//! message; a client that does not read cannot hold the shutdown; what a socket costs before
//! its packets are whole (memory per half-open socket and per slow packet, the packet deadline,
//! the broker-wide bound on unfinished packets); the health endpoint.
//!
//! The `malformed_*` tests are about MQTT 3.1.1 itself and also run against mosquitto
//! (`BROKER_UNDER_TEST=mosquitto cargo test --all-features --test broker_process malformed`); the
//! others are about our process (its flags, signals, data dir, memory and report) and always run
//! ours.
//!
//! Raw clients (`common::mqtt::Raw`) are written with rumqttc's packet codec over a blocking
//! `TcpStream`, so a test controls every byte and every packet id (and records a message before
//! acknowledging it).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, PubComp, PubRec, PubRel, Publish};
use rumqttc::mqttbytes::QoS;

use common::broker::{run_ours, under_test, Broker, DataDir};
use common::mqtt::{encode, transient, Next, Raw};

/// How long a broker gets to answer a packet, on a loaded 2-core machine.
const REPLY_WITHIN: Duration = Duration::from_secs(15);
/// How long a broker gets to close a connection it must close.
const CLOSE_WITHIN: Duration = Duration::from_secs(15);
/// How long a command-line error may take to exit (the binary is already built).
const CLI_WITHIN: Duration = Duration::from_secs(60);

/// A message's payload: its sequence number, then padding up to `len` bytes.
fn payload(seq: u64, len: usize) -> Vec<u8> {
    let mut p = seq.to_be_bytes().to_vec();
    p.resize(len.max(8), b'.');
    p
}

fn seq_of(publish: &Publish) -> u64 {
    let bytes: [u8; 8] = publish.payload[..8]
        .try_into()
        .unwrap_or_else(|_| panic!("a payload without a sequence number: {publish:?}"));
    u64::from_be_bytes(bytes)
}

fn publish(topic: &str, qos: QoS, pkid: u16, body: Vec<u8>) -> Packet {
    let mut p = Publish::new(topic, qos, body);
    p.pkid = pkid;
    Packet::Publish(p)
}

/// Writes all of `buf`, giving up when `stop` is set (the socket has a short write timeout).
fn write_all_until(stream: &mut TcpStream, mut buf: &[u8], stop: &AtomicBool) -> io::Result<()> {
    while !buf.is_empty() {
        if stop.load(Ordering::Relaxed) {
            return Err(io::Error::other("stopped"));
        }
        match stream.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if transient(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Malformed input: the offending connection is closed, the others keep working
// ---------------------------------------------------------------------------------------------

/// A well-behaved client subscribed to its own topics (QoS 1), that checks the broker still
/// serves it: it publishes and gets its own message back, and nothing else.
struct Observer {
    raw: Raw,
    name: String,
    round: u16,
}

impl Observer {
    fn new(addr: SocketAddr, name: &str) -> Observer {
        let (mut raw, _) = Raw::connect(addr, &format!("observer-{name}"), true);
        raw.sub(&[(&format!("probe/{name}/#"), QoS::AtLeastOnce)]);
        let mut observer = Observer {
            raw,
            name: name.to_owned(),
            round: 0,
        };
        observer.round_trip("before the bad connection");
        observer
    }

    /// The topic a bad connection publishes to: the observer must never get its messages.
    fn bad_topic(&self) -> String {
        format!("probe/{}/bad", self.name)
    }

    /// Publishes a QoS 1 message on its own topic and waits for both the PUBACK and the message
    /// itself; panics if the connection is gone or a bad connection's message arrives.
    fn round_trip(&mut self, when: &str) {
        self.round += 1;
        let pkid = self.round + 1;
        let topic = format!("probe/{}/ok", self.name);
        // Bigger than a trivial packet, below the 1024-byte limit of the oversized test.
        let body = payload(u64::from(self.round), 900);
        self.raw
            .send(publish(&topic, QoS::AtLeastOnce, pkid, body.clone()));
        let until = Instant::now() + REPLY_WITHIN;
        let (mut acked, mut got) = (false, false);
        while !(acked && got) {
            let left = until.saturating_duration_since(Instant::now());
            match self.raw.recv_within(left) {
                Ok(Some(Packet::PubAck(ack))) if ack.pkid == pkid => acked = true,
                Ok(Some(Packet::Publish(p))) => {
                    assert_eq!(
                        p.topic, topic,
                        "{when}: the observer got a message it did not publish: {p:?}"
                    );
                    assert_eq!(&p.payload[..], &body[..], "{when}: a changed payload");
                    if p.qos != QoS::AtMostOnce {
                        self.raw.send(Packet::PubAck(PubAck::new(p.pkid)));
                    }
                    got = true;
                }
                Ok(Some(other)) => panic!("{when}: the observer got an unexpected {other:?}"),
                Ok(None) => panic!(
                    "{when}: the observer's message did not come back within {REPLY_WITHIN:?} \
                     (PUBACK: {acked}, message: {got})"
                ),
                Err(e) => panic!("{when}: the observer's connection broke: {e}"),
            }
        }
    }
}

/// A line of the broker's log that names `peer` (and not a longer port that starts the same).
fn names_peer(line: &str, peer: SocketAddr) -> bool {
    let peer = peer.to_string();
    line.match_indices(&peer).any(|(at, _)| {
        !line[at + peer.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// Asserts the broker closes `bad` within [`CLOSE_WITHIN`], and (ours) logs a line naming it.
fn assert_closed(broker: &Broker, bad: &mut Raw, peer: SocketAddr, what: &str, logged: bool) {
    match bad.closed_within(CLOSE_WITHIN) {
        Ok(took) => eprintln!("{what}: closed after {took:?}"),
        Err(e) => panic!("{what}: {e}; the broker's output:\n{}", broker.output()),
    }
    if logged {
        assert_logged(broker, peer, what);
    }
}

#[test]
fn malformed_garbage_before_connect_closes_only_that_connection() {
    let data = DataDir::new("malformed_garbage");
    let broker = Broker::start(&data);
    let mut observer = Observer::new(broker.addr, "garbage");

    let mut bad = Raw::tcp(broker.addr);
    let peer = bad.local();
    // 0xFF: the reserved packet type 15, then a remaining length that never ends (four
    // continuation bytes), then noise.
    let mut garbage = vec![0xFF; 5];
    garbage.extend((0u8..64).map(|i| i.wrapping_mul(37) ^ 0x5A));
    let _ = bad.try_send_bytes(&garbage); // the broker may close before it has read it all
    assert_closed(&broker, &mut bad, peer, "garbage before CONNECT", true);

    observer.round_trip("after garbage before CONNECT");
}

#[test]
fn malformed_reserved_packet_type_after_connect_closes_only_that_connection() {
    let data = DataDir::new("malformed_reserved");
    let broker = Broker::start(&data);
    let mut observer = Observer::new(broker.addr, "reserved");

    let (mut bad, _) = Raw::connect(broker.addr, "reserved-type", true);
    let peer = bad.local();
    // Packet type 15 is reserved in MQTT 3.1.1; then noise.
    let _ = bad.try_send_bytes(&[0xF0, 0x00, 0x13, 0x37, 0x00, 0x42]);
    assert_closed(&broker, &mut bad, peer, "a reserved packet type", true);

    observer.round_trip("after a reserved packet type");
}

#[test]
fn malformed_truncated_connect_then_half_close_is_closed() {
    let data = DataDir::new("malformed_truncated_eof");
    let broker = Broker::start(&data);
    let mut observer = Observer::new(broker.addr, "truncated-eof");

    let mut bad = Raw::tcp(broker.addr);
    let peer = bad.local();
    let connect = encode(&Packet::Connect(Connect::new("truncated-connect")));
    bad.try_send_bytes(&connect[..connect.len() / 2])
        .expect("send half a CONNECT");
    bad.stream.shutdown(Shutdown::Write).expect("half-close");
    assert_closed(&broker, &mut bad, peer, "half a CONNECT, then EOF", false);

    observer.round_trip("after half a CONNECT and EOF");
}

#[test]
fn malformed_truncated_publish_then_silence_is_closed_by_keep_alive() {
    let data = DataDir::new("malformed_truncated_silent");
    let broker = Broker::start(&data);
    let mut observer = Observer::new(broker.addr, "truncated-silent");

    // Keep-alive 1 s: a broker must close it 1.5 s after the last packet it got complete.
    let (mut bad, _) = Raw::connect_keep_alive(broker.addr, "truncated-silent", true, 1);
    let peer = bad.local();
    let packet = encode(&publish(
        &observer.bad_topic(),
        QoS::AtLeastOnce,
        7,
        payload(0, 200),
    ));
    bad.try_send_bytes(&packet[..packet.len() / 2])
        .expect("send half a PUBLISH");
    // ... and nothing else, not even a PINGREQ.
    assert_closed(
        &broker,
        &mut bad,
        peer,
        "half a PUBLISH, then silence",
        false,
    );

    observer.round_trip("after half a PUBLISH and silence");
}

#[test]
fn malformed_oversized_packet_closes_only_that_connection() {
    let data = DataDir::new("malformed_oversized");
    let broker = Broker::start_with(
        &data,
        &["--max-packet-size", "1024"],
        "max_packet_size 1024\n",
    );
    let mut observer = Observer::new(broker.addr, "oversized");

    let (mut bad, _) = Raw::connect(broker.addr, "oversized", true);
    let peer = bad.local();
    let big = encode(&publish(
        &observer.bad_topic(),
        QoS::AtLeastOnce,
        1,
        payload(0, 4096),
    ));
    // The broker may close as soon as it has read the fixed header.
    let _ = bad.try_send_bytes(&big);
    assert_closed(
        &broker,
        &mut bad,
        peer,
        "a 4 KiB PUBLISH over a 1 KiB limit",
        true,
    );

    observer.round_trip("after an oversized PUBLISH");
}

#[test]
fn malformed_publish_before_connect_closes_only_that_connection() {
    let data = DataDir::new("malformed_publish_first");
    let broker = Broker::start(&data);
    let mut observer = Observer::new(broker.addr, "publish-first");

    let mut bad = Raw::tcp(broker.addr);
    let peer = bad.local();
    let _ = bad.try_send_bytes(&encode(&publish(
        &observer.bad_topic(),
        QoS::AtMostOnce,
        0,
        payload(0, 16),
    )));
    assert_closed(&broker, &mut bad, peer, "a PUBLISH before CONNECT", true);

    observer.round_trip("after a PUBLISH before CONNECT");
}

#[test]
fn malformed_second_connect_closes_only_that_connection() {
    let data = DataDir::new("malformed_second_connect");
    let broker = Broker::start(&data);
    let mut observer = Observer::new(broker.addr, "second-connect");

    let (mut bad, _) = Raw::connect(broker.addr, "second-connect", true);
    let peer = bad.local();
    let _ = bad.try_send_bytes(&encode(&Packet::Connect(Connect::new("second-connect"))));
    assert_closed(&broker, &mut bad, peer, "a second CONNECT", true);

    observer.round_trip("after a second CONNECT");
}

/// Reserved bits set wrong make a packet malformed (MQTT-2.2.2-2 and the rules of each packet):
/// each of these closes its connection, and only that one. (mosquitto 2.0.11 lets a PINGREQ
/// with flags 0001 through.)
#[test]
fn malformed_reserved_bits_close_only_that_connection() {
    let data = DataDir::new("malformed_bits");
    let broker = Broker::start(&data);
    let mut observer = Observer::new(broker.addr, "bits");
    let with_flags = |packet: &Packet, flags: u8| {
        let mut bytes = encode(packet).to_vec();
        bytes[0] = (bytes[0] & 0xF0) | flags;
        bytes
    };
    // After CONNECT.
    let subscribe = Packet::Subscribe(rumqttc::mqttbytes::v4::Subscribe::new(
        "bits/x",
        QoS::AtMostOnce,
    ));
    let mut subscribe_qos_bits = encode(&subscribe).to_vec();
    *subscribe_qos_bits.last_mut().unwrap() |= 0b1000_0000;
    let after_connect = [
        ("SUBSCRIBE with flags 0000", with_flags(&subscribe, 0)),
        (
            "PUBREL with flags 0000",
            with_flags(&Packet::PubRel(PubRel::new(1)), 0),
        ),
        ("PINGREQ with flags 0001", with_flags(&Packet::PingReq, 1)),
        ("PUBLISH with QoS 3", vec![0x36, 5, 0, 1, b't', 0, 1]),
        ("SUBSCRIBE with reserved QoS bits", subscribe_qos_bits),
    ];
    for (what, bytes) in after_connect {
        let (mut bad, _) = Raw::connect(broker.addr, "bits-bad", true);
        let peer = bad.local();
        let _ = bad.try_send_bytes(&bytes);
        assert_closed(&broker, &mut bad, peer, what, true);
        observer.round_trip(&format!("after {what}"));
    }
    // In CONNECT: the connect flags are after the fixed header (2 bytes here), "MQTT" with its
    // length (6) and the level (1).
    let connect = encode(&Packet::Connect(Connect::new("bits-bad"))).to_vec();
    let mut reserved = connect.clone();
    reserved[9] |= 0b0000_0001;
    let mut login = Connect::new("bits-bad");
    login.login = Some(rumqttc::mqttbytes::v4::Login::new("user", "secret"));
    let mut password_only = encode(&Packet::Connect(login)).to_vec();
    password_only[9] &= !0b1000_0000;
    for (what, bytes) in [
        ("CONNECT with its reserved flag", reserved),
        ("CONNECT with a password and no user name", password_only),
    ] {
        let mut bad = Raw::tcp(broker.addr);
        let peer = bad.local();
        let _ = bad.try_send_bytes(&bytes);
        assert_closed(&broker, &mut bad, peer, what, true);
        observer.round_trip(&format!("after {what}"));
    }
}

/// Asserts a line of our broker's log names `peer` (mosquitto's log is not checked).
fn assert_logged(broker: &Broker, peer: SocketAddr, what: &str) {
    if under_test() == "ours" {
        assert!(
            broker
                .lines
                .wait_for(REPLY_WITHIN, |l| names_peer(l, peer))
                .is_some(),
            "{what}: no log line names the peer {peer}; the broker's output:\n{}",
            broker.output()
        );
    }
}

/// The first packet must be CONNECT (MQTT-3.1.0-1), and its first byte says whether it is: a
/// connection that starts with another packet type is closed at once — not once the 1 MiB its
/// header declares has come, nor at the CONNECT timeout (10 s).
#[test]
fn malformed_first_packet_not_connect_is_closed_at_once() {
    const AT_ONCE: Duration = Duration::from_secs(5);
    let data = DataDir::new("malformed_not_connect");
    let broker = Broker::start(&data);
    let mut observer = Observer::new(broker.addr, "not-connect");

    let mut bad = Raw::tcp(broker.addr);
    let peer = bad.local();
    // A PUBLISH's fixed header, remaining length 1 MiB, and none of the rest.
    bad.send_bytes(&[0x30, 0x80, 0x80, 0x40]);
    match bad.closed_within(AT_ONCE) {
        Ok(took) => eprintln!("a PUBLISH header first: closed after {took:?}"),
        Err(e) => panic!(
            "a PUBLISH header first: {e} (the CONNECT timeout is 10 s); the broker's output:\n{}",
            broker.output()
        ),
    }
    assert_logged(&broker, peer, "a PUBLISH header first");
    observer.round_trip("after a PUBLISH header first");
}

/// A CONNECT's fields must fill its remaining length exactly: bytes after its payload make it
/// malformed, and the connection is closed without a CONNACK.
#[test]
fn malformed_connect_with_bytes_after_its_payload_is_closed() {
    let data = DataDir::new("malformed_connect_trailing");
    let broker = Broker::start(&data);
    let mut observer = Observer::new(broker.addr, "connect-trailing");

    let mut connect = encode(&Packet::Connect(Connect::new("connect-trailing"))).to_vec();
    assert!(connect[1] < 120, "a one-byte remaining length");
    connect[1] += 3;
    connect.extend([0x00, 0x01, b'x']);
    let mut bad = Raw::tcp(broker.addr);
    let peer = bad.local();
    let _ = bad.try_send_bytes(&connect);
    bad.expect_closed("a CONNECT with 3 bytes after its payload");
    assert_logged(&broker, peer, "a CONNECT with 3 bytes after its payload");
    observer.round_trip("after a CONNECT with bytes after its payload");
}

/// A UTF-8 string in MQTT must not contain U+0000 (MQTT-1.5.3-2): a CONNECT whose client id or
/// user name does is closed without a CONNACK.
#[test]
fn malformed_nul_in_client_id_or_user_name_is_closed() {
    let data = DataDir::new("malformed_connect_nul");
    let broker = Broker::start(&data);
    let mut observer = Observer::new(broker.addr, "connect-nul");

    let mut user = Connect::new("nul-user");
    user.login = Some(rumqttc::mqttbytes::v4::Login::new("us\0er", "secret"));
    for (what, connect) in [
        ("a client id with U+0000", Connect::new("nul\0id")),
        ("a user name with U+0000", user),
    ] {
        let mut bad = Raw::tcp(broker.addr);
        let peer = bad.local();
        let _ = bad.try_send_bytes(&encode(&Packet::Connect(connect)));
        bad.expect_closed(what);
        assert_logged(&broker, peer, what);
        observer.round_trip(&format!("after {what}"));
    }
}

// ---------------------------------------------------------------------------------------------
// --max-queued (ours)
// ---------------------------------------------------------------------------------------------

/// Publishes QoS 1 messages on `topic` (sequence numbers 0, 1, …), one at a time, each waiting
/// for its PUBACK, until the broker closes the connection; returns what was acknowledged. Panics
/// past `limit` acknowledgements.
fn publish_until_closed(publisher: &mut Raw, topic: &str, limit: u64) -> BTreeSet<u64> {
    let mut acked = BTreeSet::new();
    loop {
        let seq = acked.len() as u64;
        assert!(
            seq <= limit,
            "{seq} messages acknowledged, the connection never closed"
        );
        let pkid = (seq % 65_535 + 1) as u16;
        publisher.send(publish(topic, QoS::AtLeastOnce, pkid, payload(seq, 8)));
        match publisher.next(REPLY_WITHIN) {
            Next::Packet(Packet::PubAck(ack)) => {
                assert_eq!(ack.pkid, pkid);
                acked.insert(seq);
            }
            Next::Closed => return acked,
            other => panic!("after PUBLISH {seq}: {other:?}"),
        }
    }
}

/// The one line that names `what` among the broker's output lines (panics on none or several).
fn one_line<'a>(out: &'a str, what: &str, pick: impl Fn(&str) -> bool) -> &'a str {
    let lines: Vec<&str> = out.lines().filter(|l| pick(l)).collect();
    assert_eq!(lines.len(), 1, "one line {what}; the output:\n{out}");
    lines[0]
}

/// One anonymous client parks a persistent session on `#` and goes away. Past its quota it
/// loses messages — logged once, naming it — while every other client's publications are
/// acknowledged and delivered as usual, before and after a restart; back, it gets what its
/// quota held, and the summary counts what it lost.
#[test]
fn a_parked_hash_session_over_its_quota_costs_nobody_else_anything() {
    const QUOTA: u64 = 5;
    const SENT: u64 = 40;
    let data = DataDir::new("parked_hash");
    let mut broker = Broker::ours(&data, &["--max-queued", &QUOTA.to_string()]);
    let (mut parked, _) = Raw::connect(broker.addr, "parked", false);
    parked.sub(&[("#", QoS::AtLeastOnce)]);
    parked.send(Packet::Disconnect);
    parked
        .closed_within(CLOSE_WITHIN)
        .expect("the broker closes the connection after DISCONNECT");

    let mut watcher = Raw::clean(broker.addr, "watcher");
    watcher.sub(&[("other/#", QoS::AtLeastOnce)]);
    let mut publisher = Raw::clean(broker.addr, "publisher");
    // Each one acknowledged (the raw client panics on a close or a timeout) and delivered.
    for seq in 0..SENT {
        publisher.publish("other/t", QoS::AtLeastOnce, &payload(seq, 8), false);
    }
    let got: Vec<u64> = (0..SENT).map(|_| seq_of(&watcher.recv_publish())).collect();
    assert_eq!(
        got,
        (0..SENT).collect::<Vec<_>>(),
        "the watcher gets everything"
    );
    let out = broker.lines.all(Duration::from_millis(200));
    one_line(&out, "saying `parked` is over its quota", |l| {
        l.contains("WARN") && l.contains("`parked`") && l.contains("over its quota")
    });

    // Stopped and started again, the parked session is still over its quota and still costs
    // the others nothing.
    let status = broker.stop(CLOSE_WITHIN);
    let out = broker.lines.all(REPLY_WITHIN);
    assert_eq!(status.code(), Some(0), "{out}");
    let numbers = summary_numbers(&out).expect("the summary line");
    assert_eq!(
        numbers[3],
        SENT - QUOTA,
        "the summary counts the messages dropped for `parked`:\n{out}"
    );
    assert!(
        out.contains("over their quota: 1 sessions lost") && out.contains("`parked` 35"),
        "the sessions over their quota, by name:\n{out}"
    );
    drop(watcher);
    drop(publisher);
    let broker = Broker::ours(&data, &["--max-queued", &QUOTA.to_string()]);
    let mut publisher = Raw::clean(broker.addr, "publisher");
    for seq in SENT..SENT + 10 {
        publisher.publish("other/t", QoS::AtLeastOnce, &payload(seq, 8), false);
    }

    let (mut parked, present) = Raw::connect(broker.addr, "parked", false);
    assert!(present, "the parked session is kept");
    let got: Vec<u64> = (0..QUOTA).map(|_| seq_of(&parked.recv_publish())).collect();
    assert_eq!(got, (0..QUOTA).collect::<Vec<_>>(), "what its quota held");
    parked.expect_silence("past its quota");
    let out = broker.lines.all(Duration::from_millis(200));
    one_line(&out, "ending `parked`'s episode", |l| {
        l.contains("`parked` is within its quota again") && l.contains("10 messages were dropped")
    });
}

/// With `--queue-overflow drop-oldest` a session over its byte quota keeps the latest messages.
#[test]
fn drop_oldest_keeps_the_latest_messages_within_the_byte_quota() {
    // Each message is 20 bytes (topic `q/t`, 17 bytes of payload): five fit.
    let data = DataDir::new("drop_oldest");
    let broker = Broker::ours(
        &data,
        &[
            "--max-queued-bytes",
            "100",
            "--queue-overflow",
            "drop-oldest",
        ],
    );
    let (mut sub, _) = Raw::connect(broker.addr, "latest", false);
    sub.sub(&[("q/#", QoS::AtLeastOnce)]);
    sub.disconnect();
    let mut publisher = Raw::clean(broker.addr, "publisher");
    for seq in 0..12 {
        publisher.publish("q/t", QoS::AtLeastOnce, &payload(seq, 17), false);
    }
    let (mut sub, present) = Raw::connect(broker.addr, "latest", false);
    assert!(present);
    let got: Vec<u64> = (0..5).map(|_| seq_of(&sub.recv_publish())).collect();
    assert_eq!(got, vec![7, 8, 9, 10, 11]);
    sub.expect_silence("past the five latest");
}

/// A connected subscriber that reads nothing, with `--queue-overflow drop-oldest`: its
/// connection drops its oldest unsent messages past its quota, so when it reads again it gets
/// the latest ones, up to the last.
#[test]
fn a_connected_subscriber_over_its_quota_with_drop_oldest_gets_the_latest() {
    const SENT: u64 = 3_000;
    let data = DataDir::new("connected_drop_oldest");
    let broker = Broker::ours(
        &data,
        &["--max-queued", "50", "--queue-overflow", "drop-oldest"],
    );
    let (mut sleeper, _) = Raw::connect_keep_alive(broker.addr, "sleeper", true, 0);
    sleeper.sub(&[("s/#", QoS::AtMostOnce)]);
    let mut publisher = Raw::clean(broker.addr, "publisher");
    for seq in 0..SENT {
        // Big enough that the socket's buffers cannot hold them all.
        publisher.publish("s/t", QoS::AtLeastOnce, &payload(seq, 16 * 1024), false);
    }
    let mut got = Vec::new();
    loop {
        let p = sleeper.recv_publish();
        let seq = seq_of(&p);
        got.push(seq);
        if seq == SENT - 1 {
            break;
        }
    }
    assert!(
        (got.len() as u64) < SENT,
        "nothing was dropped: the quota did not act"
    );
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "in order, without repeats"
    );
    let tail = &got[got.len() - 50..];
    assert_eq!(
        tail,
        &(SENT - 50..SENT).collect::<Vec<_>>()[..],
        "the latest 50 (its quota) came last"
    );
    let out = broker.lines.all(Duration::from_millis(200));
    assert!(
        out.contains("`sleeper` is over its quota"),
        "the drop is logged naming the session:\n{out}"
    );
}

/// The duration an expiry line says the session was away (`offline for 2.3s`).
fn away_in(line: &str) -> f64 {
    line.split("offline for ")
        .nth(1)
        .and_then(|rest| rest.split('s').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no duration in `{line}`"))
}

/// A persistent session that stays away longer than `--persistent-client-expiration` is dropped,
/// counted from when it went away — also across a restart.
#[test]
fn a_persistent_session_that_stays_away_expires_counted_from_when_it_left() {
    let data = DataDir::new("expiry");
    let mut broker = Broker::ours(&data, &["--persistent-client-expiration", "1s"]);
    let (mut raw, _) = Raw::connect(broker.addr, "leaver", false);
    raw.sub(&[("e/#", QoS::AtLeastOnce)]);
    raw.disconnect();
    let line = broker
        .lines
        .wait_for(REPLY_WITHIN, |l| l.contains("session `leaver` expired"))
        .unwrap_or_else(|| panic!("no expiry:\n{}", broker.output()));
    assert!(line.contains("--persistent-client-expiration"), "{line}");
    let (raw, present) = Raw::connect(broker.addr, "leaver", false);
    assert!(!present, "an expired session is gone");
    raw.disconnect();
    let status = broker.stop(CLOSE_WITHIN);
    let out = broker.lines.all(REPLY_WITHIN);
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(summary_numbers(&out).expect("the summary")[4] >= 1, "{out}");

    // A session gone before a restart, with a long expiration; 2 s later the broker starts again
    // with a short one: the session has been away since before the restart.
    let data = DataDir::new("expiry_restart");
    let mut broker = Broker::ours(&data, &["--persistent-client-expiration", "1h"]);
    let (mut raw, _) = Raw::connect(broker.addr, "returner", false);
    raw.sub(&[("e/#", QoS::AtLeastOnce)]);
    raw.disconnect();
    assert_eq!(broker.stop(CLOSE_WITHIN).code(), Some(0));
    // Time is the subject: away for 2 s before the broker starts again.
    std::thread::sleep(Duration::from_secs(2));
    let broker = Broker::ours(&data, &["--persistent-client-expiration", "1s"]);
    let line = broker
        .lines
        .wait_for(REPLY_WITHIN, |l| l.contains("session `returner` expired"))
        .unwrap_or_else(|| panic!("no expiry after the restart:\n{}", broker.output()));
    assert!(
        away_in(&line) >= 2.0,
        "away counted from the restart, not from when it left: {line}"
    );
}

/// A session connected when the broker is killed has no expiry left over from an earlier time
/// it went away: after the restart it is counted as away from then, not from before it last
/// connected.
#[test]
fn a_session_connected_at_a_crash_does_not_expire_on_an_old_absence() {
    let data = DataDir::new("expiry_crash");
    let args = ["--persistent-client-expiration", "3s"];
    let mut broker = Broker::ours(&data, &args);
    let (mut raw, _) = Raw::connect(broker.addr, "stayer", false);
    raw.sub(&[("s/#", QoS::AtLeastOnce)]);
    raw.disconnect();
    let (raw, present) = Raw::connect(broker.addr, "stayer", false);
    assert!(present);
    // Time is the subject: connected for longer than the expiration since it last went away.
    std::thread::sleep(Duration::from_millis(3500));
    broker.sigkill();
    drop(raw);
    let broker = Broker::ours(&data, &args);
    // Past the router's first expiry checks (every 750 ms), well within 3 s of the restart.
    std::thread::sleep(Duration::from_millis(1500));
    let (_raw, present) = Raw::connect(broker.addr, "stayer", false);
    assert!(
        present,
        "expired on an absence before it last connected:\n{}",
        broker.output()
    );
}

// ---------------------------------------------------------------------------------------------
// A failing disk (ours)
// ---------------------------------------------------------------------------------------------

/// Connects (clean or not), retrying while the broker restarts its listener; `None` past `until`.
fn connect_retrying(
    addr: SocketAddr,
    id: &str,
    clean: bool,
    until: Instant,
) -> Option<(Raw, bool)> {
    while Instant::now() < until {
        if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            let id = id.to_owned();
            // A connection the restarting broker accepts and closes makes `connect` panic.
            if let Ok(connected) = std::panic::catch_unwind(move || Raw::connect(addr, &id, clean))
            {
                return Some(connected);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// A failed fsync is a write the store undoes: the publisher whose message was not durable is
/// not acknowledged, the persistent sessions online are closed (the store forgot what their
/// connections logged), and the next write the store tries works — no restart of anything. Every
/// acknowledged message reaches the persistent subscriber afterwards.
#[test]
fn a_failing_fsync_is_undone_without_a_restart_and_loses_nothing_acknowledged() {
    let data = DataDir::new("fail_fsync");
    let mut broker = Broker::ours(&data, &["--fail-fsync", "40"]);
    // Subscribed, then never reading: its deliveries stay unacknowledged.
    let (mut sub, _) = Raw::connect(broker.addr, "fsync-sub", false);
    sub.sub(&[("fsync/#", QoS::AtLeastOnce)]);

    let mut publisher = Raw::clean(broker.addr, "fsync-pub");
    let mut acked = publish_until_closed(&mut publisher, "fsync/t", 400);
    let failed = Instant::now();
    let until = failed + Duration::from_secs(30);
    loop {
        let (mut publisher, _) = connect_retrying(broker.addr, "fsync-pub", true, until)
            .unwrap_or_else(|| panic!("no reconnect within 30 s; output:\n{}", broker.output()));
        publisher.send(publish("fsync/t", QoS::AtLeastOnce, 1, payload(1000, 8)));
        match publisher.next(REPLY_WITHIN) {
            Next::Packet(Packet::PubAck(_)) => break,
            Next::Closed => std::thread::sleep(Duration::from_millis(100)),
            other => panic!("after the failure, PUBLISH got {other:?}"),
        }
    }
    let outage = failed.elapsed();
    eprintln!(
        "fail-fsync: {} acknowledged before; service back after {outage:?}",
        acked.len()
    );
    assert!(
        outage < Duration::from_secs(10),
        "publishing resumed {outage:?} after the store failed; output:\n{}",
        broker.output()
    );
    sub.closed_within(CLOSE_WITHIN)
        .expect("the persistent session online is closed");
    let (mut sub, present) = connect_retrying(broker.addr, "fsync-sub", false, until)
        .expect("the subscriber reconnects");
    assert!(present, "the persistent session is kept");
    acked.insert(1000);
    let mut got = BTreeSet::new();
    while !acked.is_subset(&got) {
        let p = sub.recv_publish();
        got.insert(seq_of(&p));
    }
    let out = broker.lines.all(Duration::from_millis(200));
    for line in ["injected failure", "writes work again"] {
        assert!(out.contains(line), "no `{line}` in the output:\n{out}");
    }
    for line in ["restart: closing", "TIMED OUT"] {
        assert!(!out.contains(line), "`{line}`: something restarted:\n{out}");
    }
    drop(sub);
    broker.stop(CLOSE_WITHIN);
}

/// How a test fills the broker's disk and frees it again: a real small filesystem where this
/// machine can mount one, else the broker's own `--fail-writes-while` switch.
enum FullDisk {
    /// A file filling the broker's tmpfs, reached through its `/proc/<pid>/root`.
    Filler(std::path::PathBuf),
    /// The file whose existence makes the broker's writes fail.
    Flag(std::path::PathBuf),
}

impl FullDisk {
    fn fill(&self) {
        match self {
            FullDisk::Filler(path) => {
                let mut file = std::fs::File::create(path).expect("create the filler");
                let block = vec![0u8; 64 * 1024];
                // Until the filesystem is full: bounded by its size (a few MiB).
                loop {
                    match file.write(&block) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            }
            FullDisk::Flag(path) => {
                std::fs::write(path, b"full").expect("create the flag");
            }
        }
    }

    fn free(&self) {
        let path = match self {
            FullDisk::Filler(path) | FullDisk::Flag(path) => path,
        };
        std::fs::remove_file(path).expect("free the disk");
    }
}

/// A full disk takes down only what needs it. With the data dir on a full filesystem, a QoS 1
/// publication for a persistent session is refused (not acknowledged) and a persistent session
/// cannot connect (CONNACK 3); QoS 0 between clean clients
/// flows throughout, and so does QoS 1 that needs no disk; the condition is logged once and shown
/// by `/status`. When space frees the broker takes everything again by itself.
#[test]
fn a_full_disk_refuses_what_needs_it_keeps_the_rest_flowing_and_recovers() {
    let data = DataDir::new("full_disk");
    let flag = data.path().with_extension("full");
    // The small filesystem, where it can be made and this process can reach into it.
    let small = Broker::ours_on_small_fs(&data, "4m", &[]).and_then(|broker| {
        let filler = broker.own_fs_path(&data.path().join("filler"));
        std::fs::write(&filler, b"").ok()?;
        Some((broker, filler))
    });
    let (mut broker, disk) = match small {
        Some((broker, filler)) => (broker, FullDisk::Filler(filler)),
        None => {
            eprintln!("full-disk: no tmpfs can be mounted here; using --fail-writes-while");
            let flag_arg = flag.display().to_string();
            let broker = Broker::ours(&data, &["--fail-writes-while", &flag_arg]);
            (broker, FullDisk::Flag(flag))
        }
    };
    let health = broker.health.expect("a health address");
    let (mut keeper, _) = Raw::connect(broker.addr, "keeper", false);
    keeper.sub(&[("d/#", QoS::AtLeastOnce)]);
    keeper.disconnect();
    let mut publisher = Raw::clean(broker.addr, "publisher");
    publisher.publish("d/t", QoS::AtLeastOnce, &payload(0, 8), false);

    // QoS 0 between clean clients, all along.
    let mut watcher = Raw::clean(broker.addr, "watcher");
    watcher.sub(&[("z/#", QoS::AtMostOnce)]);
    let stop = Arc::new(AtomicBool::new(false));
    let flow = {
        let (addr, stop) = (broker.addr, stop.clone());
        std::thread::spawn(move || {
            let mut raw = Raw::clean(addr, "qos0");
            let mut sent = 0u64;
            // Bounded: the test stops it, or 60 s pass.
            let until = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                raw.send(publish("z/t", QoS::AtMostOnce, 0, payload(sent, 8)));
                sent += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            raw.disconnect();
            sent
        })
    };

    disk.fill();
    // Big enough to need new pages whatever the log's last page has left.
    let big = payload(1, 64 * 1024);
    publisher.send(publish("d/t", QoS::AtLeastOnce, 7, big));
    match publisher.next(REPLY_WITHIN) {
        Next::Closed => {}
        other => panic!("a publication for a persistent session on a full disk got {other:?}"),
    }
    let mut publisher = Raw::clean(broker.addr, "publisher");
    publisher.send(publish("d/t", QoS::AtLeastOnce, 8, payload(2, 8)));
    assert!(
        matches!(publisher.next(REPLY_WITHIN), Next::Closed),
        "refused while the disk is full"
    );
    let (_, ack) = Raw::handshake(broker.addr, rumqttc::mqttbytes::v4::Connect::new("keeper"));
    assert_eq!(
        ack.code,
        rumqttc::mqttbytes::v4::ConnectReturnCode::ServiceUnavailable,
        "a persistent session cannot connect while the disk is full"
    );
    let mut clean = Raw::clean(broker.addr, "clean-one");
    clean.sub(&[("c/#", QoS::AtLeastOnce)]);
    clean.publish("c/t", QoS::AtLeastOnce, b"no disk needed", false);
    assert_eq!(&clean.recv_publish().payload[..], b"no disk needed");
    let (code, body) = http_get(health, "/status", true).expect("GET /status");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"failing\""), "{body}");

    disk.free();
    let freed = Instant::now();
    let until = freed + Duration::from_secs(20);
    let resumed = loop {
        let mut publisher = Raw::clean(broker.addr, "publisher");
        publisher.send(publish("d/t", QoS::AtLeastOnce, 9, payload(3, 8)));
        match publisher.next(REPLY_WITHIN) {
            Next::Packet(Packet::PubAck(_)) => break Instant::now(),
            Next::Closed if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => panic!(
                "after space freed, PUBLISH got {other:?}:\n{}",
                broker.output()
            ),
        }
    };
    let (code, body) = http_get(health, "/status", true).expect("GET /status");
    assert_eq!(code, 200, "{body}");
    let (mut keeper, present) = Raw::connect(broker.addr, "keeper", false);
    assert!(present);
    let got: Vec<u64> = (0..2).map(|_| seq_of(&keeper.recv_publish())).collect();
    assert_eq!(
        got,
        vec![0, 3],
        "what was acknowledged, and nothing refused"
    );

    stop.store(true, Ordering::Relaxed);
    let sent = flow.join().expect("the QoS 0 publisher");
    let mut got = BTreeSet::new();
    let mut last = None;
    while last != Some(sent - 1) {
        let seq = seq_of(&watcher.recv_publish());
        got.insert(seq);
        last = Some(seq);
    }
    assert_eq!(
        got.len() as u64,
        sent,
        "every QoS 0 message reached the watcher"
    );
    let out = broker.lines.all(Duration::from_millis(200));
    assert_eq!(
        out.lines()
            .filter(|l| l.contains("until a write works again"))
            .count(),
        1,
        "the condition is logged once:\n{out}"
    );
    assert!(out.contains("writes work again"), "{out}");
    eprintln!(
        "full-disk: {sent} QoS 0 messages flowed throughout; writes back {:?} after space freed",
        resumed - freed
    );
    let status = broker.stop(CLOSE_WITHIN);
    assert_eq!(status.code(), Some(0), "{}", broker.output());
}

/// Connects `id` (clean or not), retrying while the broker refuses it (CONNACK 3 while its disk
/// is failing) or closes it; panics past `until`.
fn connect_when_served(addr: SocketAddr, id: &str, clean: bool, until: Instant) -> (Raw, bool) {
    loop {
        let (raw, ack) = Raw::handshake(addr, common::mqtt::connect_packet(id, clean));
        if ack.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success {
            return (raw, ack.session_present);
        }
        assert!(
            Instant::now() < until,
            "`{id}` refused until {until:?}: {ack:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A QoS 2 message from a persistent publisher whose write failed was delivered to a connected
/// subscriber but not recorded: when the publisher comes back and sends it again (DUP, same
/// packet id), it is not delivered a second time.
#[test]
fn a_qos2_message_whose_write_failed_is_not_delivered_twice() {
    let data = DataDir::new("qos2_undone");
    let flag = data.path().with_extension("full");
    let flag_arg = flag.display().to_string();
    let broker = Broker::ours(&data, &["--fail-writes-while", &flag_arg]);
    let mut subscriber = Raw::clean(broker.addr, "q2-sub");
    subscriber.sub(&[("q2/#", QoS::ExactlyOnce)]);
    let (mut publisher, _) = Raw::connect(broker.addr, "q2-pub", false);
    std::fs::write(&flag, b"full").expect("the flag");
    publisher.send(publish("q2/t", QoS::ExactlyOnce, 7, payload(1, 8)));
    assert!(
        matches!(publisher.next(REPLY_WITHIN), Next::Closed),
        "not acknowledged: its write failed"
    );
    let first = subscriber.recv_publish();
    std::fs::remove_file(&flag).expect("the flag");
    let until = Instant::now() + REPLY_WITHIN;
    let (mut publisher, present) = connect_when_served(broker.addr, "q2-pub", false, until);
    assert!(present);
    let mut again = Publish::new("q2/t", QoS::ExactlyOnce, payload(1, 8));
    again.pkid = 7;
    again.dup = true;
    publisher.send(Packet::Publish(again));
    match publisher.recv("PUBREC") {
        Packet::PubRec(rec) => assert_eq!(rec.pkid, 7),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    publisher.send(Packet::PubRel(PubRel::new(7)));
    assert!(matches!(publisher.recv("PUBCOMP"), Packet::PubComp(_)));
    // A sentinel from the same publisher comes next, not the message again.
    publisher.publish("q2/end", QoS::ExactlyOnce, b"end", false);
    let next = subscriber.recv_publish();
    assert_eq!(
        next.topic, "q2/end",
        "delivered twice: {first:?}, then {next:?}"
    );
}

/// A persistent session due to expire while the store cannot write is not dropped from the
/// router's books only: it expires once the store can record it, and never comes back half —
/// present without its queue, or gone with its queue still delivered.
#[test]
fn a_session_due_to_expire_while_writes_fail_expires_whole() {
    let data = DataDir::new("expiry_no_disk");
    let flag = data.path().with_extension("full");
    let flag_arg = flag.display().to_string();
    let broker = Broker::ours(
        &data,
        &[
            "--fail-writes-while",
            &flag_arg,
            "--persistent-client-expiration",
            "2s",
        ],
    );
    let (mut session, _) = Raw::connect(broker.addr, "exp", false);
    session.sub(&[("e/#", QoS::AtLeastOnce)]);
    session.disconnect();
    let mut publisher = Raw::clean(broker.addr, "pub");
    publisher.publish("e/t", QoS::AtLeastOnce, &payload(1, 8), false);
    std::fs::write(&flag, b"full").expect("the flag");
    publisher.send(publish("e/t", QoS::AtLeastOnce, 9, payload(2, 8)));
    assert!(matches!(publisher.next(REPLY_WITHIN), Next::Closed));
    // Time is the subject: past the expiration while writes fail.
    std::thread::sleep(Duration::from_millis(2500));
    std::fs::remove_file(&flag).expect("the flag");
    let until = Instant::now() + REPLY_WITHIN;
    let (mut session, present) = connect_when_served(broker.addr, "exp", false, until);
    match session.next(Duration::from_secs(1)) {
        Next::Packet(Packet::Publish(p)) => assert!(
            present,
            "an expired session got its old message: {p:?}\n{}",
            broker.output()
        ),
        Next::Timeout => assert!(!present, "a session present without its queue"),
        other => panic!("{other:?}"),
    }
}

/// One failed write is one reload of the router, however many requests it failed.
#[test]
fn one_failed_write_is_reloaded_once() {
    let data = DataDir::new("reload_once");
    let broker = Broker::ours(&data, &["--fail-fsync", "30"]);
    let (mut sub, _) = Raw::connect(broker.addr, "ro-sub", false);
    sub.sub(&[("r/#", QoS::AtLeastOnce)]);
    let publishers: Vec<LoadPublisher> = (0..8)
        .map(|i| LoadPublisher::start(broker.addr, &format!("ro-pub-{i}"), "r/t", 8, 16))
        .collect();
    broker
        .lines
        .wait_for(REPLY_WITHIN, |l| l.contains("writes work again"))
        .unwrap_or_else(|| panic!("no recovery:\n{}", broker.output()));
    for p in publishers {
        p.finish();
    }
    let out = broker.lines.all(Duration::from_millis(500));
    let reloads = out
        .lines()
        .filter(|l| l.contains("reloading retained messages and persistent sessions"))
        .count();
    assert_eq!(reloads, 1, "reloads after one failed write:\n{out}");
    drop(sub);
}

// ---------------------------------------------------------------------------------------------
// The command line (ours)
// ---------------------------------------------------------------------------------------------

/// Runs ours with `args` (plus a data dir and a free health port unless given), expecting it to
/// exit 2 at once; returns its output.
fn cli_error(data: &DataDir, args: &[&str]) -> String {
    let dir = data.path().display().to_string();
    let mut full: Vec<&str> = args.to_vec();
    if !args.contains(&"--data-dir") {
        full.extend(["--data-dir", &dir]);
    }
    if !args.contains(&"--health") {
        full.extend(["--health", "127.0.0.1:0"]);
    }
    let (status, output) = run_ours(&full, CLI_WITHIN);
    let Some(status) = status else {
        panic!("`broker {full:?}` was still running after {CLI_WITHIN:?}; output:\n{output}")
    };
    assert_eq!(
        status.code(),
        Some(2),
        "`broker {full:?}` should exit 2; output:\n{output}"
    );
    assert!(
        !output.contains("listening on "),
        "`broker {full:?}` said it was listening:\n{output}"
    );
    output
}

#[test]
fn cli_unknown_flag_exits_2_naming_it() {
    let data = DataDir::new("cli_unknown");
    let out = cli_error(&data, &["--bind", "127.0.0.1:0", "--frobnicate", "7"]);
    assert!(
        out.contains("--frobnicate"),
        "the message does not name the flag:\n{out}"
    );
}

#[test]
fn cli_bad_shutdown_timeout_exits_2_naming_it() {
    let data = DataDir::new("cli_bad_timeout");
    let out = cli_error(
        &data,
        &["--bind", "127.0.0.1:0", "--shutdown-timeout", "abc"],
    );
    assert!(
        out.contains("--shutdown-timeout") && out.contains("abc"),
        "the message does not name the flag and its value:\n{out}"
    );
}

#[test]
fn cli_bad_bind_address_exits_2_naming_it() {
    let data = DataDir::new("cli_bad_bind");
    let out = cli_error(&data, &["--bind", "not-an-address"]);
    assert!(
        out.contains("not-an-address"),
        "the message does not name the address:\n{out}"
    );
}

#[test]
fn cli_bind_address_in_use_exits_2_naming_it() {
    let data = DataDir::new("cli_bind_in_use");
    let taken = TcpListener::bind("127.0.0.1:0").expect("take a port");
    let addr = taken.local_addr().unwrap().to_string();
    let out = cli_error(&data, &["--bind", &addr]);
    assert!(
        out.contains(&addr) && out.to_lowercase().contains("in use"),
        "the message does not say {addr} is in use:\n{out}"
    );
    drop(taken);
}

#[test]
fn cli_health_address_in_use_exits_2() {
    let data = DataDir::new("cli_health_in_use");
    let taken = TcpListener::bind("127.0.0.1:0").expect("take a port");
    let addr = taken.local_addr().unwrap().to_string();
    let out = cli_error(&data, &["--bind", "127.0.0.1:0", "--health", &addr]);
    assert!(
        out.contains("health") && out.to_lowercase().contains("in use"),
        "the message does not say the health address is in use:\n{out}"
    );
    drop(taken);
}

#[test]
fn cli_max_incomplete_bytes_below_max_packet_size_exits_2() {
    let data = DataDir::new("cli_incomplete_below_packet");
    let out = cli_error(
        &data,
        &[
            "--bind",
            "127.0.0.1:0",
            "--max-packet-size",
            "100000",
            "--max-incomplete-bytes",
            "99999",
        ],
    );
    assert!(
        out.contains("--max-incomplete-bytes") && out.contains("--max-packet-size"),
        "the message does not name both flags:\n{out}"
    );
}

/// The numbers of the last line: `closed N connections, delivered M messages during the drain,
/// K messages stored for offline sessions`.
fn summary(output: &str) -> Option<(u64, u64, u64)> {
    let line = output.lines().rev().find(|l| !l.trim().is_empty())?;
    if !(line.contains("closed ")
        && line.contains("connections, delivered ")
        && line.contains("messages stored for offline sessions"))
    {
        return None;
    }
    let at = line.find("closed ")?;
    let n: Vec<u64> = line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    match n[..] {
        [a, b, c, ..] => Some((a, b, c)),
        _ => None,
    }
}

/// Every number of the summary line, in order: closed, delivered, stored, dropped over quota,
/// sessions expired.
fn summary_numbers(output: &str) -> Option<Vec<u64>> {
    summary(output)?;
    let line = output.lines().rev().find(|l| !l.trim().is_empty())?;
    let at = line.find("closed ")?;
    Some(
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|w| w.parse().ok())
            .collect(),
    )
}

#[test]
fn cli_normal_start_logs_one_listening_line_and_stops_with_the_summary() {
    let data = DataDir::new("cli_normal_start");
    let mut broker = Broker::ours(&data, &[]);
    // A client makes sure it is really serving, not just logging.
    let (_client, _) = Raw::connect(broker.addr, "cli-normal", true);
    let status = broker.stop(Duration::from_secs(30));
    let out = broker.lines.all(REPLY_WITHIN);
    assert_eq!(status.code(), Some(0), "output:\n{out}");
    let listening: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("listening on "))
        .collect();
    assert_eq!(listening.len(), 1, "`listening on` lines:\n{out}");
    assert!(
        names_peer(listening[0], broker.addr),
        "`{}` is not the address clients reach: {}",
        listening[0],
        broker.addr
    );
    assert!(
        out.lines()
            .filter(|l| l.contains("health on http://"))
            .count()
            == 1,
        "one `health on` line:\n{out}"
    );
    let Some((closed, _, _)) = summary(&out) else {
        panic!("the last line is not the summary:\n{out}")
    };
    assert_eq!(closed, 1, "one client was connected at SIGTERM:\n{out}");
}

// ---------------------------------------------------------------------------------------------
// Load: a raw QoS 1 publisher that knows which sequence numbers were acknowledged
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct PubState {
    /// pkid -> sequence number, for the publishes not acknowledged yet.
    inflight: HashMap<u16, u64>,
    acked: Vec<u64>,
    sent: u64,
    /// PUBACKs for a packet id that was not in flight.
    stray_acks: u64,
    closed: Option<String>,
}

struct PubShared {
    state: Mutex<PubState>,
    changed: Condvar,
    stop: AtomicBool,
}

/// Publishes QoS 1 messages with sequence numbers as fast as the broker takes them, at most
/// `window` unacknowledged, until stopped or disconnected.
struct LoadPublisher {
    shared: Arc<PubShared>,
    stream: TcpStream,
    threads: Vec<JoinHandle<()>>,
}

/// What a publisher did.
struct Published {
    acked: Vec<u64>,
    sent: u64,
    stray_acks: u64,
}

impl LoadPublisher {
    fn start(addr: SocketAddr, id: &str, topic: &str, len: usize, window: usize) -> LoadPublisher {
        assert!(window < 65_535);
        let (raw, _) = Raw::connect_keep_alive(addr, id, true, 0);
        let shared = Arc::new(PubShared {
            state: Mutex::new(PubState::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let stream = raw.stream.try_clone().expect("clone the socket");
        let mut writer = raw.stream.try_clone().expect("clone the socket");
        writer
            .set_write_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut reader = raw;
        // A hard bound, should the test forget to stop it.
        let deadline = Instant::now() + Duration::from_secs(300);

        let w = shared.clone();
        let topic = topic.to_owned();
        let write = std::thread::spawn(move || {
            let mut pkid: u16 = 0;
            loop {
                let (id, seq) = {
                    let mut s = w.state.lock().unwrap();
                    loop {
                        if w.stop.load(Ordering::Relaxed)
                            || s.closed.is_some()
                            || Instant::now() > deadline
                        {
                            return;
                        }
                        if s.inflight.len() < window {
                            break;
                        }
                        s = w
                            .changed
                            .wait_timeout(s, Duration::from_millis(100))
                            .unwrap()
                            .0;
                    }
                    loop {
                        pkid = pkid % 65_535 + 1;
                        if !s.inflight.contains_key(&pkid) {
                            break;
                        }
                    }
                    let seq = s.sent;
                    s.sent += 1;
                    s.inflight.insert(pkid, seq);
                    (pkid, seq)
                };
                let packet = encode(&publish(&topic, QoS::AtLeastOnce, id, payload(seq, len)));
                if let Err(e) = write_all_until(&mut writer, &packet, &w.stop) {
                    let mut s = w.state.lock().unwrap();
                    s.closed.get_or_insert(format!("write: {e}"));
                    w.changed.notify_all();
                    return;
                }
            }
        });

        let r = shared.clone();
        let read = std::thread::spawn(move || loop {
            if r.stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                return;
            }
            let got = reader.recv_within(Duration::from_millis(200));
            let mut s = r.state.lock().unwrap();
            match got {
                Ok(Some(Packet::PubAck(ack))) => match s.inflight.remove(&ack.pkid) {
                    Some(seq) => s.acked.push(seq),
                    None => s.stray_acks += 1,
                },
                Ok(_) => continue,
                Err(e) => {
                    s.closed.get_or_insert(format!("read: {e}"));
                    r.changed.notify_all();
                    return;
                }
            }
            r.changed.notify_all();
        });

        LoadPublisher {
            shared,
            stream,
            threads: vec![write, read],
        }
    }

    fn acked(&self) -> usize {
        self.shared.state.lock().unwrap().acked.len()
    }

    /// Waits until `n` messages are acknowledged, or at least one is after `soon`; bounded by
    /// `max`. Returns how many are.
    fn wait_acked(&self, n: usize, soon: Duration, max: Duration) -> usize {
        let start = Instant::now();
        let mut s = self.shared.state.lock().unwrap();
        loop {
            let elapsed = start.elapsed();
            if s.acked.len() >= n
                || (elapsed >= soon && !s.acked.is_empty())
                || elapsed >= max
                || s.closed.is_some()
            {
                return s.acked.len();
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap()
                .0;
        }
    }

    /// Waits (up to `timeout`) for the broker to close the connection; whether it did.
    fn wait_closed(&self, timeout: Duration) -> Option<String> {
        let until = Instant::now() + timeout;
        let mut s = self.shared.state.lock().unwrap();
        while s.closed.is_none() && Instant::now() < until {
            s = self
                .shared
                .changed
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap()
                .0;
        }
        s.closed.clone()
    }

    /// Stops both threads (bounded: they poll the flag every 100-200 ms) and says what happened.
    fn finish(mut self) -> Published {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.stream.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            t.join().expect("a publisher thread panicked");
        }
        let s = self.shared.state.lock().unwrap();
        Published {
            acked: s.acked.clone(),
            sent: s.sent,
            stray_acks: s.stray_acks,
        }
    }
}

impl Drop for LoadPublisher {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Reads `sub` until its connection closes (or `limit`), recording every message's sequence
/// number before acknowledging it.
fn spawn_collector(
    mut sub: Raw,
    received: Arc<Mutex<Vec<u64>>>,
    limit: Duration,
) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            match sub.recv_within(Duration::from_millis(200)) {
                Ok(Some(Packet::Publish(p))) => {
                    received.lock().unwrap().push(seq_of(&p));
                    if p.qos == QoS::AtLeastOnce
                        && sub
                            .try_send_bytes(&encode(&Packet::PubAck(PubAck::new(p.pkid))))
                            .is_err()
                    {
                        return "closed while acknowledging".to_owned();
                    }
                }
                Ok(_) => {}
                Err(e) => return format!("closed: {e}"),
            }
        }
        format!("still open after {limit:?}")
    })
}

/// Reads `sub` until every one of `want` has arrived (then until 1 s passes without a message)
/// or, if some never come, 10 s without a message; bounded by 120 s. Acknowledges each.
fn collect_until_idle(sub: &mut Raw, want: &BTreeSet<u64>, have: &BTreeSet<u64>) -> Vec<u64> {
    let mut missing: BTreeSet<u64> = want.difference(have).copied().collect();
    let mut got = Vec::new();
    let start = Instant::now();
    let mut last = Instant::now();
    loop {
        let idle = if missing.is_empty() {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(10)
        };
        if last.elapsed() >= idle || start.elapsed() >= Duration::from_secs(120) {
            return got;
        }
        match sub.recv_within(Duration::from_millis(100)) {
            Ok(Some(Packet::Publish(p))) => {
                let seq = seq_of(&p);
                missing.remove(&seq);
                got.push(seq);
                last = Instant::now();
                if p.qos == QoS::AtLeastOnce {
                    sub.send(Packet::PubAck(PubAck::new(p.pkid)));
                }
            }
            Ok(_) => {}
            Err(e) => panic!("the subscriber's connection broke after the restart: {e}"),
        }
    }
}

/// A persistent QoS 1 subscriber (connected and reading, or gone offline after subscribing) and a
/// flat-out QoS 1 publisher; the broker is stopped half-way (SIGTERM or SIGKILL), restarted on
/// the same data dir, and the subscriber reconnected: every acknowledged sequence number must
/// have reached it, before or after the restart.
fn stop_under_load(name: &str, kill: bool, online: bool) {
    const BUDGET: Duration = Duration::from_secs(10);
    let data = DataDir::new(name);
    // Room for everything in the offline session's queue: a full queue may leave out even an
    // acknowledged message (the contract), which is not what this test is about.
    let args = ["--shutdown-timeout", "10s", "--max-queued", "1000000"];
    let mut broker = Broker::ours(&data, &args);

    let sub_id = format!("{name}-sub");
    let (mut sub, present) = Raw::connect_keep_alive(broker.addr, &sub_id, false, 0);
    assert!(!present, "a fresh data dir has no session");
    sub.sub(&[("load/#", QoS::AtLeastOnce)]);
    let before = Arc::new(Mutex::new(Vec::new()));
    let collector = if online {
        spawn_collector(sub, before.clone(), Duration::from_secs(180))
    } else {
        sub.send(Packet::Disconnect);
        sub.closed_within(CLOSE_WITHIN)
            .expect("the broker closes the connection after DISCONNECT");
        std::thread::spawn(|| "offline".to_owned())
    };

    let publisher = LoadPublisher::start(broker.addr, &format!("{name}-pub"), "load/seq", 32, 1000);
    let acked_at_signal =
        publisher.wait_acked(2000, Duration::from_secs(1), Duration::from_secs(60));
    assert!(
        acked_at_signal > 0,
        "no PUBACK within 60 s; the broker's output:\n{}",
        broker.output()
    );

    let mut stored_at_exit = None;
    let signalled = Instant::now();
    if kill {
        broker.sigkill();
        broker
            .wait(REPLY_WITHIN)
            .expect("the broker survived SIGKILL");
    } else {
        broker.sigterm();
        let status = broker
            .wait(BUDGET + Duration::from_secs(3))
            .unwrap_or_else(|| {
                panic!(
                    "the broker did not exit within its {BUDGET:?} budget (+3 s) of SIGTERM; \
                 output:\n{}",
                    broker.output()
                )
            });
        let took = signalled.elapsed();
        let out = broker.lines.all(REPLY_WITHIN);
        assert_eq!(status.code(), Some(0), "exit after SIGTERM; output:\n{out}");
        let Some((closed, delivered, stored)) = summary(&out) else {
            panic!("the last line is not the summary:\n{out}")
        };
        eprintln!(
            "{name}: exited 0 {took:?} after SIGTERM; summary: closed {closed} connections, \
             delivered {delivered} during the drain, {stored} stored for offline sessions"
        );
        let connected = if online { 2 } else { 1 };
        assert_eq!(closed, connected, "connections open at SIGTERM:\n{out}");
        stored_at_exit = Some(stored);
    }
    let exit_time = signalled.elapsed();

    let why = publisher.wait_closed(REPLY_WITHIN);
    assert!(
        why.is_some(),
        "the publisher's connection outlived the broker"
    );
    let published = publisher.finish();
    let collector_end = collector.join().expect("the collector panicked");
    let before = std::mem::take(&mut *before.lock().unwrap());

    let mut broker = Broker::ours(&data, &args);
    let (mut sub, present) = Raw::connect_keep_alive(broker.addr, &sub_id, false, 0);
    assert!(
        present,
        "the persistent session did not survive the restart; output:\n{}",
        broker.output()
    );
    let acked: BTreeSet<u64> = published.acked.iter().copied().collect();
    let seen_before: BTreeSet<u64> = before.iter().copied().collect();
    let after = collect_until_idle(&mut sub, &acked, &seen_before);

    let mut all = seen_before.clone();
    all.extend(after.iter().copied());
    let missing: Vec<u64> = acked.difference(&all).copied().collect();
    let received = before.len() + after.len();
    let duplicates = received - all.len();
    let unsent: Vec<u64> = all.range(published.sent..).copied().collect();
    eprintln!(
        "{name}: {} sent, {acked_at_signal} acked at the signal, {} acked in all; subscriber got \
         {} before ({collector_end}) and {} after the restart, {duplicates} duplicates, \
         {} acked never delivered; broker gone {exit_time:?} after the signal",
        published.sent,
        acked.len(),
        before.len(),
        after.len(),
        missing.len(),
    );
    assert_eq!(
        published.stray_acks, 0,
        "PUBACKs for packet ids not in flight"
    );
    assert!(unsent.is_empty(), "delivered but never sent: {unsent:?}");
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged messages never reached the persistent subscriber (first: {:?}); \
         output after the restart:\n{}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(20)],
        broker.output()
    );
    if let (Some(stored), false) = (stored_at_exit, online) {
        assert!(
            stored >= acked.len() as u64,
            "the summary says {stored} messages stored for the offline session, but {} were \
             acknowledged for it",
            acked.len()
        );
    }
    let status = broker.stop(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "the restarted broker's exit");
}

#[test]
fn sigterm_under_load_loses_no_acknowledged_message() {
    stop_under_load("sigterm_under_load", false, true);
}

#[test]
fn sigterm_under_load_keeps_what_an_offline_session_is_owed() {
    stop_under_load("sigterm_offline", false, false);
}

#[test]
fn kill_9_under_load_keeps_what_an_offline_session_is_owed() {
    stop_under_load("kill9_offline", true, false);
}

#[test]
fn kill_9_under_load_loses_no_acknowledged_message() {
    stop_under_load("kill9_under_load", true, true);
}

// ---------------------------------------------------------------------------------------------
// A client that does not read
// ---------------------------------------------------------------------------------------------

/// Publishes `n` QoS 2 messages (sequence numbers 0..n) on `topic`, 100 at a time, each
/// through to its PUBCOMP.
fn publish_qos2(raw: &mut Raw, topic: &str, n: u64) {
    for first in (0..n).step_by(100) {
        let batch = first..(first + 100).min(n);
        for seq in batch.clone() {
            raw.send(publish(
                topic,
                QoS::ExactlyOnce,
                (seq % 65_535 + 1) as u16,
                payload(seq, 8),
            ));
        }
        let mut completed = 0;
        while completed < batch.end - batch.start {
            match raw.recv("PUBREC or PUBCOMP") {
                Packet::PubRec(rec) => raw.send(Packet::PubRel(PubRel::new(rec.pkid))),
                Packet::PubComp(_) => completed += 1,
                other => panic!("publishing QoS 2: unexpected {other:?}"),
            }
        }
    }
}

/// Exactly-once towards a persistent QoS 2 subscriber survives kill -9 in the middle of the
/// deliveries. The subscriber keeps what a QoS 2 receiver keeps across connections (MQTT 4.3.3):
/// the packet ids it has PUBRECed and not seen released, with their messages; a PUBLISH under
/// such an id is the same message again, any other PUBLISH is a new delivery. A broker that
/// lets a message out before its packet id is durable sends it again after the crash under a
/// new id, and one that sends PUBREL before it has durably seen the PUBREC sends the message
/// again after its release: the subscriber counts both as second deliveries.
#[test]
fn kill_9_while_delivering_qos2_delivers_each_message_exactly_once() {
    const K: u64 = 2_000;
    let data = DataDir::new("qos2_kill");
    let mut broker = Broker::ours(&data, &[]);
    let sub_id = "qos2-kill-sub";
    let (mut sub, _) = Raw::connect(broker.addr, sub_id, false);
    sub.sub(&[("x2/#", QoS::ExactlyOnce)]);
    sub.send(Packet::Disconnect);
    sub.closed_within(CLOSE_WITHIN)
        .expect("the broker closes the connection after DISCONNECT");
    publish_qos2(&mut Raw::clean(broker.addr, "qos2-kill-pub"), "x2/seq", K);

    let mut held: HashMap<u16, u64> = HashMap::new();
    let mut delivered: HashMap<u64, u32> = HashMap::new();
    let mut killed = false;
    let until = Instant::now() + Duration::from_secs(120);
    'session: loop {
        let (mut sub, present) = Raw::connect(broker.addr, sub_id, false);
        assert!(present, "the session survived");
        while delivered.len() as u64 != K || !held.is_empty() {
            assert!(
                Instant::now() < until,
                "after 120 s: {} of {K} delivered, {} not released",
                delivered.len(),
                held.len()
            );
            if !killed && delivered.len() as u64 >= K / 2 {
                broker.sigkill();
                broker
                    .wait(REPLY_WITHIN)
                    .expect("the broker survived SIGKILL");
                broker = Broker::ours(&data, &[]);
                killed = true;
                continue 'session;
            }
            match sub.next(Duration::from_secs(1)) {
                Next::Packet(Packet::Publish(p)) => {
                    assert_eq!(p.qos, QoS::ExactlyOnce, "{p:?}");
                    let seq = seq_of(&p);
                    if let Some(&was) = held.get(&p.pkid) {
                        assert_eq!(
                            was, seq,
                            "packet id {} reused for another message before its PUBREL",
                            p.pkid
                        );
                    } else {
                        held.insert(p.pkid, seq);
                        *delivered.entry(seq).or_default() += 1;
                    }
                    sub.send(Packet::PubRec(PubRec::new(p.pkid)));
                }
                Next::Packet(Packet::PubRel(rel)) => {
                    held.remove(&rel.pkid);
                    sub.send(Packet::PubComp(PubComp::new(rel.pkid)));
                }
                Next::Packet(other) => panic!("the subscriber got an unexpected {other:?}"),
                Next::Timeout => {}
                Next::Closed => panic!(
                    "the broker closed the subscriber's connection; output:\n{}",
                    broker.output()
                ),
            }
        }
        break;
    }
    let mut twice: Vec<(u64, u32)> = delivered.into_iter().filter(|&(_, n)| n > 1).collect();
    twice.sort();
    assert!(
        twice.is_empty(),
        "{} messages delivered more than once (sequence, times): {twice:?}",
        twice.len()
    );
    broker.stop(CLOSE_WITHIN);
}

/// The process's resident memory, in bytes.
fn rss(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A subscriber that stops reading costs the publishers nothing: they keep being acknowledged
/// (it is not waited for), its backlog stays within its quota (bounded memory; what it loses is
/// logged, naming it), and it cannot hold the shutdown up.
#[test]
fn a_client_that_does_not_read_costs_publishers_nothing_and_cannot_hold_the_shutdown() {
    const RSS_BOUND: u64 = 300 << 20;
    let data = DataDir::new("non_reader");
    let mut broker = Broker::ours(
        &data,
        &["--shutdown-timeout", "3s", "--max-queued-bytes", "16777216"],
    );
    let health = broker.health.expect("a health address");

    // Subscribes at QoS 0 (no inflight window: the broker writes until the socket is full),
    // then never reads again.
    let (mut sleeper, _) = Raw::connect_keep_alive(broker.addr, "non-reader", true, 0);
    sleeper.sub(&[("flood/#", QoS::AtMostOnce)]);

    let publisher = LoadPublisher::start(broker.addr, "flooder", "flood/big", 64 * 1024, 64);
    // Time is the subject: for 4 s the publisher must never wait 1.5 s for an acknowledgement,
    // while far more than the sleeper's quota (256 messages of 64 KiB) is published.
    let start = Instant::now();
    let (mut max_rss, mut last_count, mut last_change, mut longest) =
        (0u64, 0usize, Instant::now(), Duration::ZERO);
    while start.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(50));
        max_rss = max_rss.max(rss(broker.pid()).unwrap_or(0));
        let count = publisher.acked();
        if count != last_count {
            (last_count, last_change) = (count, Instant::now());
        }
        longest = longest.max(last_change.elapsed());
    }
    eprintln!(
        "non-reader: {last_count} messages of 64 KiB acknowledged in {:?}, the longest wait \
         {longest:?}; the broker's RSS at most {} MiB",
        start.elapsed(),
        max_rss >> 20
    );
    assert!(
        longest < Duration::from_millis(1500) && last_count > 1_000,
        "the publisher was held up by a client that does not read: {last_count} messages \
         acknowledged in 4 s, once none for {longest:?}"
    );
    assert!(
        max_rss < RSS_BOUND,
        "the broker grew to {} MiB holding messages for a client that does not read",
        max_rss >> 20
    );
    let out = broker.lines.all(Duration::from_millis(100));
    assert!(
        out.contains("`non-reader` is over its quota"),
        "what the sleeper loses is logged, naming it:\n{out}"
    );

    let signalled = Instant::now();
    broker.sigterm();
    // Readiness turns off at once (503, or the endpoint gone), while the drain goes on.
    let mut flipped = false;
    while signalled.elapsed() < Duration::from_secs(3) {
        if http_status(health, "/readyz").ok() != Some(200) {
            flipped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = broker.wait(Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "a client that does not read held the shutdown past 10 s (budget 3 s); output:\n{}",
            broker.output()
        )
    });
    let took = signalled.elapsed();
    let out = broker.lines.all(REPLY_WITHIN);
    eprintln!("non-reader: exited {status} {took:?} after SIGTERM");
    assert!(
        status.code().is_some(),
        "killed by a signal: {status}\n{out}"
    );
    assert!(flipped, "/readyz still said 200 3 s after SIGTERM");
    assert!(
        summary(&out).is_some(),
        "the last line is not the summary:\n{out}"
    );
    publisher.finish();
    drop(sleeper);
}

/// A client that writes and never reads — PINGREQ after PINGREQ, each owed a PINGRESP — cannot
/// make the broker buffer what it owes without bound: once a little is owed, the broker stops
/// reading that client, so TCP pushes back on its writes; other clients are served meanwhile.
#[test]
fn a_client_that_writes_and_never_reads_is_pushed_back() {
    /// What the client tries to write; a broker that keeps reading takes all of it.
    const LIMIT: u64 = 64 << 20;
    let data = DataDir::new("write_only");
    let mut broker = Broker::ours(&data, &[]);
    let (mut raw, _) = Raw::connect_keep_alive(broker.addr, "write-only", true, 0);
    let pings = [0xC0u8, 0x00].repeat(32 * 1024);
    raw.stream
        .set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let start = Instant::now();
    let (mut written, mut last_change) = (0u64, Instant::now());
    // Time is the subject: the writes must stall (nothing accepted for 1.5 s) before LIMIT.
    while written < LIMIT && last_change.elapsed() < Duration::from_millis(1500) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{written} bytes of PINGREQ written in 60 s, not stalled, not done"
        );
        match raw.stream.write(&pings) {
            Ok(0) => panic!("the broker closed the connection"),
            Ok(n) => (written, last_change) = (written + n as u64, Instant::now()),
            Err(e) if transient(&e) => {}
            Err(e) => panic!("write: {e}"),
        }
    }
    let rss = rss(broker.pid()).unwrap_or(0);
    eprintln!(
        "write-only: {written} bytes of PINGREQ taken before the broker pushed back; RSS {} MiB",
        rss >> 20
    );
    assert!(
        written < LIMIT / 2,
        "the broker took {written} bytes of PINGREQ from a client that reads none of its \
         PINGRESPs"
    );
    let mut observer = Observer::new(broker.addr, "write-only");
    observer.round_trip("while a client is pushed back");
    drop(raw);
    broker.stop(CLOSE_WITHIN);
}

// ---------------------------------------------------------------------------------------------
// Memory before a packet is whole (ours)
// ---------------------------------------------------------------------------------------------

/// Raises this process's limit of open files to its hard limit (a broker started after this, a
/// child, inherits it), and asserts it is at least `need`.
fn raise_fd_limit(need: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit on this process, with a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        }
    }
    assert!(
        limit.rlim_cur >= need,
        "this test needs {need} open files; the limit is {} (hard {})",
        limit.rlim_cur,
        limit.rlim_max
    );
}

/// How many files `pid` has open.
fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// Opens `n` connections to the broker, never more than 64 ahead of those it has accepted: its
/// accept queue holds 128, and past that the kernel drops a connection's SYN, which the client
/// sends again only a second later.
fn connect_many(broker: &Broker, n: usize) -> Vec<TcpStream> {
    let pid = broker.pid();
    let base = open_fds(pid);
    let start = Instant::now();
    let mut sockets = Vec::with_capacity(n);
    for i in 0..n {
        if i % 64 == 0 {
            while open_fds(pid) < base + i {
                assert!(
                    start.elapsed() < REPLY_WITHIN,
                    "the broker accepted {} of {i} connections in {REPLY_WITHIN:?}",
                    open_fds(pid).saturating_sub(base)
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        sockets.push(
            TcpStream::connect_timeout(&broker.addr, CLOSE_WITHIN).expect("connect to the broker"),
        );
    }
    sockets
}

/// An established IPv4 TCP socket of this machine, from `/proc/net/tcp`: its ports, and the
/// bytes in its send queue (not yet taken by the peer) and its receive queue (not yet read by
/// its process).
struct TcpSocket {
    local: u16,
    remote: u16,
    send_queue: u64,
    recv_queue: u64,
}

fn tcp_sockets() -> Vec<TcpSocket> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port = |addr: &str| {
        let hex = addr.rsplit(':').next()?;
        u16::from_str_radix(hex, 16).ok()
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // `st` 01: ESTABLISHED.
            if fields.len() < 5 || fields[3] != "01" {
                return None;
            }
            let (send, recv) = fields[4].split_once(':')?;
            Some(TcpSocket {
                local: port(fields[1])?,
                remote: port(fields[2])?,
                send_queue: u64::from_str_radix(send, 16).ok()?,
                recv_queue: u64::from_str_radix(recv, 16).ok()?,
            })
        })
        .collect()
}

/// The broker's connections (local port `port`): how many, and the bytes waiting in their
/// receive queues, that the broker has not read.
fn broker_unread(port: u16) -> (usize, u64) {
    let sockets: Vec<TcpSocket> = tcp_sockets()
        .into_iter()
        .filter(|s| s.local == port)
        .collect();
    (sockets.len(), sockets.iter().map(|s| s.recv_queue).sum())
}

/// The bytes a client (local port `client`) has written that the broker (port `broker`) has not
/// read: in the client's send queue or in the broker's receive queue.
fn unread_from(client: u16, broker: u16) -> u64 {
    tcp_sockets()
        .iter()
        .filter(|s| {
            (s.local == client && s.remote == broker) || (s.local == broker && s.remote == client)
        })
        .map(|s| {
            if s.local == client {
                s.send_queue
            } else {
                s.recv_queue
            }
        })
        .sum()
}

/// Waits until the broker has read everything sent to its `port` and holds at least `open`
/// connections to it (its receive queues are empty), within `within` of `start`.
fn wait_until_read(port: u16, open: usize, start: Instant, within: Duration, what: &str) {
    loop {
        let (sockets, unread) = broker_unread(port);
        if sockets >= open && unread == 0 {
            return;
        }
        assert!(
            start.elapsed() < within,
            "{what}: after {within:?}, {sockets} connections (of {open}) with {unread} bytes the \
             broker has not read"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A PUBLISH at QoS 1 to `topic` whose payload makes the whole packet `size` bytes.
fn publish_of_size(topic: &str, pkid: u16, size: usize) -> Vec<u8> {
    // Fixed header (4 bytes for a remaining length over 16 KiB), topic with its length, pkid.
    let overhead = 1 + 3 + 2 + topic.len() + 2;
    let packet = encode(&publish(
        topic,
        QoS::AtLeastOnce,
        pkid,
        vec![b'.'; size - overhead],
    ))
    .to_vec();
    assert_eq!(packet.len(), size);
    packet
}

/// 2,000 sockets that connected and sent nothing, or only the first bytes of a CONNECT, cost the
/// broker little memory each: it reserves nothing for bytes that have not arrived.
#[test]
fn memory_per_half_open_socket_is_at_most_4_kb() {
    const SOCKETS: usize = 2_000;
    /// Bytes of the broker's RSS per socket, at most.
    const BOUND: u64 = 4 * 1024;
    raise_fd_limit(3 * SOCKETS as u64);
    let data = DataDir::new("half_open");
    let mut broker = Broker::ours(&data, &[]);
    let pid = broker.pid();
    // Serving a connection once makes the allocations that happen only once.
    let mut observer = Observer::new(broker.addr, "half-open");
    let connect = encode(&Packet::Connect(Connect::new("half-open")));

    let fds = open_fds(pid);
    let before = rss(pid).expect("the broker's RSS");
    let start = Instant::now();
    let mut sockets = connect_many(&broker, SOCKETS);
    // Every other one sends 8 bytes of a CONNECT (fixed header, "MQTT" with its length), the
    // last one too: once its bytes are read, the broker has taken every socket before it.
    for socket in sockets.iter_mut().skip(1).step_by(2) {
        socket
            .write_all(&connect[..8])
            .expect("send the start of a CONNECT");
    }
    // Accepted (the broker holds a descriptor for each) and read — well before the CONNECT
    // timeout (10 s) closes the first ones.
    let port = broker.addr.port();
    loop {
        let accepted = open_fds(pid).saturating_sub(fds);
        let (_, unread) = broker_unread(port);
        if accepted >= SOCKETS && unread == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "after 8 s the broker has accepted {accepted} of {SOCKETS} sockets, with {unread} \
             bytes unread"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = rss(pid).expect("the broker's RSS");
    let per_socket = after.saturating_sub(before) / SOCKETS as u64;
    eprintln!(
        "half-open: {SOCKETS} sockets (half with 8 bytes of a CONNECT) took the broker from {} \
         to {} KiB of RSS: {per_socket} bytes per socket (bound {BOUND})",
        before >> 10,
        after >> 10
    );
    assert!(
        per_socket <= BOUND,
        "{per_socket} bytes of RSS per half-open socket (at most {BOUND})"
    );
    observer.round_trip("with 2,000 half-open sockets");
    drop(sockets);
    broker.stop(CLOSE_WITHIN);
}

/// 2,000 connected clients with keep-alive 0, each in the middle of a 1 MiB PUBLISH (its fixed
/// header and a few bytes sent), cost the broker little memory each: a buffer grows with what
/// arrives, not with what a header declares.
#[test]
fn memory_per_slow_packet_is_at_most_4_kb() {
    const CLIENTS: usize = 2_000;
    /// Bytes of the broker's RSS per slow packet, at most: what arrived (40 bytes) in a buffer
    /// sized by what arrives, with the allocator's overhead — below a page, which a buffer
    /// reserved for the declared 1 MiB (or for one 64 KiB read) would touch.
    const BOUND: u64 = 4 * 1024;
    /// Bytes of the broker's RSS per client, connection included, at most: a connection's task,
    /// mailbox and socket (about 4 KiB), and its slow packet.
    const CLIENT_BOUND: u64 = 8 * 1024;
    raise_fd_limit(3 * CLIENTS as u64);
    let data = DataDir::new("slow_packets");
    let mut broker = Broker::ours(&data, &[]);
    let pid = broker.pid();
    let mut observer = Observer::new(broker.addr, "slow-packets");
    let port = broker.addr.port();

    let idle = rss(pid).expect("the broker's RSS");
    let start = Instant::now();
    let mut clients = connect_many(&broker, CLIENTS);
    for (i, client) in clients.iter_mut().enumerate() {
        let mut connect = Connect::new(format!("slow-{i}"));
        connect.keep_alive = 0;
        client
            .write_all(&encode(&Packet::Connect(connect)))
            .expect("send CONNECT");
    }
    for client in &mut clients {
        client.set_read_timeout(Some(REPLY_WITHIN)).unwrap();
        let mut connack = [0u8; 4];
        client.read_exact(&mut connack).expect("CONNACK");
        assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK, accepted");
    }
    let connected = rss(pid).expect("the broker's RSS");

    let packet = publish_of_size("slow/packet", 1, 1 << 20);
    // The fixed header, the topic, the packet id and 28 bytes of the payload.
    let start_of_packet = &packet[..40];
    for client in &mut clients {
        client
            .write_all(start_of_packet)
            .expect("send the start of a PUBLISH");
    }
    wait_until_read(port, CLIENTS, start, REPLY_WITHIN, "slow packets");
    let after = rss(pid).expect("the broker's RSS");
    let per_connected = connected.saturating_sub(idle) / CLIENTS as u64;
    let per_packet = after.saturating_sub(connected) / CLIENTS as u64;
    let per_client = after.saturating_sub(idle) / CLIENTS as u64;
    eprintln!(
        "slow packets: {CLIENTS} clients connected took the broker from {} to {} KiB of RSS \
         ({per_connected} bytes each); 40 bytes of a 1 MiB PUBLISH from each, to {} KiB: \
         {per_packet} bytes per slow packet (bound {BOUND}), {per_client} per client (bound \
         {CLIENT_BOUND})",
        idle >> 10,
        connected >> 10,
        after >> 10
    );
    assert!(
        per_packet <= BOUND,
        "{per_packet} bytes of RSS per slow packet of 1 MiB with 40 bytes sent (at most {BOUND})"
    );
    assert!(
        per_client <= CLIENT_BOUND,
        "{per_client} bytes of RSS per client with a slow packet (at most {CLIENT_BOUND})"
    );
    observer.round_trip("with 2,000 slow packets in progress");
    drop(clients);
    broker.stop(CLOSE_WITHIN);
}

/// A packet in progress must be whole within --packet-timeout of its first byte, whatever the
/// keep-alive (0 here: none) and however steadily its bytes trickle in; a client with no packet
/// in progress is not concerned.
#[test]
fn a_packet_in_progress_is_closed_at_its_deadline_whatever_the_keep_alive() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let data = DataDir::new("packet_timeout");
    let mut broker = Broker::ours(&data, &["--packet-timeout", "1s"]);
    let mut observer = Observer::new(broker.addr, "packet-timeout");
    let (mut idle, _) = Raw::connect_keep_alive(broker.addr, "packet-timeout-idle", true, 0);
    let (mut slow, _) = Raw::connect_keep_alive(broker.addr, "packet-timeout-slow", true, 0);
    let peer = slow.local();

    let packet = publish_of_size("slow/packet", 1, 64 * 1024);
    slow.send_bytes(&packet[..40]);
    let start = Instant::now();
    // A byte every 100 ms: bytes arriving do not move the deadline, only a whole packet does.
    let took = loop {
        let sent = 40 + (start.elapsed().as_millis() / 100) as usize;
        if slow.stream.write_all(&packet[sent..sent + 1]).is_err() {
            break start.elapsed();
        }
        if slow.closed_within(Duration::from_millis(100)).is_ok() {
            break start.elapsed();
        }
        assert!(
            start.elapsed() < CLOSE_WITHIN,
            "a packet in progress for {CLOSE_WITHIN:?} (deadline {TIMEOUT:?}) is still open; \
             the broker's output:\n{}",
            broker.output()
        );
    };
    eprintln!("packet timeout {TIMEOUT:?}: closed after {took:?}");
    assert!(
        took >= TIMEOUT.mul_f64(0.8),
        "closed after {took:?}, before its deadline ({TIMEOUT:?})"
    );
    assert_logged(&broker, peer, "a packet past its deadline");
    // Idle since its CONNECT (longer than the deadline), it is still served.
    idle.send(Packet::PingReq);
    assert!(matches!(idle.recv("PINGRESP"), Packet::PingResp));
    observer.round_trip("after a packet past its deadline");
    broker.stop(CLOSE_WITHIN);
}

/// Bytes held by unfinished packets are bounded broker-wide (--max-incomplete-bytes): a packet
/// that would go past the bound is read no further than its connection's own 64 KiB until
/// another packet completes and frees room — meanwhile its keep-alive does not run out (the
/// silence is the broker's), and clients with small packets are served.
#[test]
fn a_packet_past_the_broker_wide_bound_waits_for_room() {
    /// What a connection reads of a packet without room in the bound.
    const ALLOWANCE: u64 = 64 * 1024;
    const SIZE: usize = 1 << 20;
    let data = DataDir::new("incomplete_bound");
    // Room for two 1 MiB packets beyond their first 64 KiB, not three.
    let bound = (2 * (SIZE as u64 - ALLOWANCE) + ALLOWANCE).to_string();
    let mut broker = Broker::ours(&data, &["--max-incomplete-bytes", &bound]);
    let port = broker.addr.port();
    let mut observer = Observer::new(broker.addr, "incomplete-bound");

    // Two packets half sent hold the room.
    let mut holders = Vec::new();
    for i in 0..2 {
        let (mut holder, _) =
            Raw::connect_keep_alive(broker.addr, &format!("bound-holder-{i}"), true, 0);
        let packet = publish_of_size("bound/holder", 1, SIZE);
        holder.send_bytes(&packet[..SIZE / 2]);
        holders.push((holder, packet));
    }
    let start = Instant::now();
    for (holder, _) in &holders {
        let local = holder.local().port();
        while unread_from(local, port) > 0 {
            assert!(
                start.elapsed() < REPLY_WITHIN,
                "the broker does not read a packet that has room"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // A third is sent whole, from a thread: the broker must leave most of it in the socket.
    let (mut late, _) = Raw::connect_keep_alive(broker.addr, "bound-late", true, 1);
    let waiting = Instant::now();
    let late_port = late.local().port();
    let packet = publish_of_size("bound/late", 1, SIZE);
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let mut stream = late.stream.try_clone().expect("clone the socket");
        let written = written.clone();
        std::thread::spawn(move || {
            stream.set_write_timeout(Some(CLOSE_WITHIN)).unwrap();
            for chunk in packet.chunks(16 * 1024) {
                stream.write_all(chunk).expect("write the late packet");
                written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        })
    };
    // Small packets go through meanwhile; the late packet gets no answer.
    observer.round_trip("while the bound is full");
    observer.round_trip("while the bound is full, again");
    late.expect_silence("a packet past the bound");
    // Sampled while the writer is still: what it wrote, less what waits in the sockets.
    let (read, unread) = loop {
        let before = written.load(Ordering::Relaxed);
        let unread = unread_from(late_port, port);
        if written.load(Ordering::Relaxed) == before {
            break (before.saturating_sub(unread), unread);
        }
    };
    eprintln!(
        "bound full: the broker read {read} bytes of a 1 MiB packet; {unread} wait in the socket"
    );
    assert!(
        unread > 0 && read <= ALLOWANCE,
        "the broker read {read} bytes of a packet with no room (its allowance is {ALLOWANCE}), \
         {unread} left in the socket"
    );
    // Time is the subject: past 1.5 × the late client's keep-alive, it is still connected.
    std::thread::sleep(Duration::from_secs(2).saturating_sub(waiting.elapsed()));

    // One holder completes its packet: its room goes to the late packet.
    let (mut holder, packet) = holders.remove(0);
    holder.send_bytes(&packet[SIZE / 2..]);
    assert!(matches!(holder.recv("PUBACK"), Packet::PubAck(_)));
    assert!(matches!(late.recv("PUBACK"), Packet::PubAck(_)));
    writer.join().expect("the late packet's writer");
    observer.round_trip("after the late packet");
    drop(holders);
    broker.stop(CLOSE_WITHIN);
}

// ---------------------------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------------------------

/// `GET path` (HTTP/1.1, `Connection: close`): the status code and what was read of the
/// response — all of it with `whole`, else up to the status line (a server that is stopping need
/// not finish its answer).
fn http_get(addr: SocketAddr, path: &str, whole: bool) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, REPLY_WITHIN)?;
    stream.set_read_timeout(Some(REPLY_WITHIN))?;
    stream.set_write_timeout(Some(REPLY_WITHIN))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 1024];
    let until = Instant::now() + REPLY_WITHIN;
    while (whole || !response.windows(2).any(|w| w == b"\r\n")) && Instant::now() < until {
        match stream.read(&mut chunk)? {
            0 => break,
            n => response.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("`{text}`")))?;
    Ok((code, text))
}

/// The status code of `GET path` (see [`http_get`]).
fn http_status(addr: SocketAddr, path: &str) -> io::Result<u16> {
    http_get(addr, path, false).map(|(code, _)| code)
}

#[test]
fn health_readyz_and_livez_are_200_while_running() {
    let data = DataDir::new("health");
    let mut broker = Broker::ours(&data, &[]);
    let health = broker.health.expect("a `health on` line");
    assert_eq!(http_status(health, "/readyz").expect("GET /readyz"), 200);
    assert_eq!(http_status(health, "/livez").expect("GET /livez"), 200);
    // And it is the MQTT side that is ready.
    let (_client, _) = Raw::connect(broker.addr, "health-check", true);
    let status = broker.stop(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0));
}
