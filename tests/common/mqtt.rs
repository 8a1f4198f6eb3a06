//! A raw MQTT 3.1.1 client for the broker tests (`broker_mqtt`, `broker_process`).
//!
//! [`Raw`] is a blocking client over a plain `TcpStream` whose packets are encoded and decoded
//! by rumqttc's `mqttbytes::v4` codec, so that a test controls every byte, flag and packet id it
//! sends and sees every packet the broker answers with (the order of a QoS 2 handshake, a
//! message before it is acknowledged). Every wait is bounded: by [`WAIT`] where the broker must
//! answer or close, by [`QUIET`] where it must stay silent, or by the timeout a call is given.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, PubRel, Publish,
    Subscribe, SubscribeFilter, SubscribeReasonCode, Unsubscribe,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};

/// The largest packet the raw client encodes or decodes (MQTT's own limit, 256 MiB).
pub const MAX_PACKET: usize = 1 << 28;
/// How long the broker gets to answer a packet, or to close a connection it must close
/// (generous: a loaded 2-core CI machine).
pub const WAIT: Duration = Duration::from_secs(15);
/// The window in which a packet the test expects *not* to see must stay away, where no sentinel
/// can be used.
pub const QUIET: Duration = Duration::from_millis(700);

/// Whether a socket error only means "nothing yet" (a read or write timeout, a signal).
pub fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// A packet's bytes on the wire.
pub fn encode(packet: &Packet) -> BytesMut {
    let mut buf = BytesMut::new();
    packet.write(&mut buf, MAX_PACKET).expect("encode a packet");
    buf
}

/// A CONNECT with a long keep-alive (so that it never expires during a test) and no will.
pub fn connect_packet(id: &str, clean: bool) -> Connect {
    let mut c = Connect::new(id);
    c.clean_session = clean;
    c.keep_alive = 60;
    c
}

/// What reading the next packet gave.
#[derive(Debug)]
pub enum Next {
    Packet(Packet),
    Timeout,
    /// The broker closed the connection (EOF or reset).
    Closed,
}

/// A blocking MQTT client over a plain TCP stream, one packet (or any bytes) at a time.
pub struct Raw {
    /// The socket, for what the client does not wrap (cloning it, half-closing it).
    pub stream: TcpStream,
    /// Bytes read and not yet decoded.
    buf: BytesMut,
    /// Where a read lands before it joins `buf`.
    chunk: Box<[u8]>,
    /// Packets read while waiting for another one (e.g. a PUBLISH arriving between PUBREC and
    /// PUBREL), served before the socket.
    stash: VecDeque<Packet>,
    next_pkid: u16,
}

impl Raw {
    /// A TCP connection to the broker, nothing sent yet.
    pub fn tcp(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect_timeout(&addr, WAIT)
            .unwrap_or_else(|e| panic!("connect to the broker at {addr}: {e}"));
        stream.set_nodelay(true).expect("TCP_NODELAY");
        Raw {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            chunk: vec![0u8; 64 * 1024].into_boxed_slice(),
            stash: VecDeque::new(),
            next_pkid: 1,
        }
    }

    /// Sends `connect` and returns the CONNACK.
    pub fn handshake(addr: SocketAddr, connect: Connect) -> (Raw, ConnAck) {
        let mut raw = Raw::tcp(addr);
        raw.send(Packet::Connect(connect));
        match raw.recv("CONNACK") {
            Packet::ConnAck(ack) => (raw, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// A connected client (CONNACK 0 asserted); returns the CONNACK's session-present flag.
    pub fn connect_with(addr: SocketAddr, connect: Connect) -> (Raw, bool) {
        let id = connect.client_id.clone();
        let (raw, ack) = Raw::handshake(addr, connect);
        assert_eq!(
            ack.code,
            ConnectReturnCode::Success,
            "CONNACK for client `{id}`"
        );
        (raw, ack.session_present)
    }

    /// A connected client with id `id`, clean session or not, and a keep-alive of 60 s.
    pub fn connect(addr: SocketAddr, id: &str, clean: bool) -> (Raw, bool) {
        Raw::connect_with(addr, connect_packet(id, clean))
    }

    /// A connected client with id `id`, clean session or not, and `keep_alive` (seconds; 0: none).
    pub fn connect_keep_alive(
        addr: SocketAddr,
        id: &str,
        clean: bool,
        keep_alive: u16,
    ) -> (Raw, bool) {
        let mut connect = connect_packet(id, clean);
        connect.keep_alive = keep_alive;
        Raw::connect_with(addr, connect)
    }

    /// A connected clean-session client.
    pub fn clean(addr: SocketAddr, id: &str) -> Raw {
        Raw::connect(addr, id, true).0
    }

    /// The client's end of the connection, as the broker names the peer.
    pub fn local(&self) -> SocketAddr {
        self.stream.local_addr().expect("local address")
    }

    /// The next packet id (1, 2, ..., never 0).
    pub fn pkid(&mut self) -> u16 {
        let id = self.next_pkid;
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        id
    }

    /// Writes `bytes` (within [`WAIT`]); `Err` if the connection is gone.
    pub fn try_send_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.set_write_timeout(Some(WAIT))?;
        self.stream.write_all(bytes)
    }

    /// Writes `bytes`; panics if it cannot.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.try_send_bytes(bytes).expect("send bytes");
    }

    /// Sends `packet`; panics if it cannot.
    pub fn send(&mut self, packet: Packet) {
        self.try_send_bytes(&encode(&packet))
            .unwrap_or_else(|e| panic!("send {packet:?}: {e}"));
    }

    /// The next packet: `Ok(None)` if none came within `timeout`; `Err` if the connection closed
    /// or its bytes are not a packet (`ErrorKind::InvalidData`).
    pub fn recv_within(&mut self, timeout: Duration) -> io::Result<Option<Packet>> {
        if let Some(p) = self.stash.pop_front() {
            return Ok(Some(p));
        }
        let until = Instant::now() + timeout;
        loop {
            match Packet::read(&mut self.buf, MAX_PACKET) {
                Ok(packet) => return Ok(Some(packet)),
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut self.chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.buf.extend_from_slice(&self.chunk[..n]),
                Err(e) if transient(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The next packet, or a timeout after `timeout`, or the connection's close; panics if the
    /// broker sends a malformed packet.
    pub fn next(&mut self, timeout: Duration) -> Next {
        match self.recv_within(timeout) {
            Ok(Some(p)) => Next::Packet(p),
            Ok(None) => Next::Timeout,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                panic!("the broker sent a malformed packet: {e}")
            }
            Err(_) => Next::Closed,
        }
    }

    /// The next packet; panics (naming `what` was expected) on a timeout or a close.
    pub fn recv(&mut self, what: &str) -> Packet {
        match self.next(WAIT) {
            Next::Packet(p) => p,
            other => panic!("expected {what}, got {other:?}"),
        }
    }

    /// The next packet satisfying `pick`; other packets read meanwhile are kept for later.
    pub fn recv_matching(&mut self, what: &str, pick: impl Fn(&Packet) -> bool) -> Packet {
        let mut skipped = VecDeque::new();
        let until = Instant::now() + WAIT;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.next(left) {
                Next::Packet(p) if pick(&p) => {
                    // Put back what came before, in order, ahead of what is still stashed.
                    while let Some(s) = skipped.pop_back() {
                        self.stash.push_front(s);
                    }
                    return p;
                }
                Next::Packet(p) => skipped.push_back(p),
                other => panic!("expected {what}, got {other:?} (after {skipped:?})"),
            }
        }
    }

    /// Asserts nothing arrives for [`QUIET`].
    pub fn expect_silence(&mut self, context: &str) {
        match self.next(QUIET) {
            Next::Timeout => {}
            other => panic!("{context}: expected nothing, got {other:?}"),
        }
    }

    /// Asserts the broker closes the connection within [`WAIT`] (packets before the close fail
    /// the test too).
    pub fn expect_closed(&mut self, context: &str) {
        match self.next(WAIT) {
            Next::Closed => {}
            other => {
                panic!("{context}: expected the broker to close the connection, got {other:?}")
            }
        }
    }

    /// Waits until the broker closes this connection (EOF or reset), ignoring what it sends
    /// before; how long that took, or `Err` if it is still open after `timeout`.
    pub fn closed_within(&mut self, timeout: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        let until = start + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("the connection is still open after {timeout:?}"));
            }
            self.stream.set_read_timeout(Some(left)).expect("timeout");
            match self.stream.read(&mut self.chunk) {
                Ok(0) => return Ok(start.elapsed()),
                Ok(_) => {}
                Err(e) if transient(&e) => {}
                Err(_) => return Ok(start.elapsed()),
            }
        }
    }

    /// SUBSCRIBE to `filters`; returns the SUBACK's return codes (pkid checked).
    pub fn subscribe(&mut self, filters: &[(&str, QoS)]) -> Vec<SubscribeReasonCode> {
        let pkid = self.pkid();
        let mut sub = Subscribe::new_many(
            filters
                .iter()
                .map(|(f, q)| SubscribeFilter::new(f.to_string(), *q)),
        );
        sub.pkid = pkid;
        self.send(Packet::Subscribe(sub));
        match self.recv_matching("SUBACK", |p| matches!(p, Packet::SubAck(_))) {
            Packet::SubAck(ack) => {
                assert_eq!(ack.pkid, pkid, "SUBACK's packet id");
                ack.return_codes
            }
            _ => unreachable!(),
        }
    }

    /// SUBSCRIBE, asserting every filter is granted the QoS asked for.
    pub fn sub(&mut self, filters: &[(&str, QoS)]) {
        let granted = self.subscribe(filters);
        let wanted: Vec<_> = filters
            .iter()
            .map(|(_, q)| SubscribeReasonCode::Success(*q))
            .collect();
        assert_eq!(granted, wanted, "SUBACK for {filters:?}");
    }

    /// UNSUBSCRIBE from `filters`, waiting for the UNSUBACK (pkid checked).
    pub fn unsubscribe(&mut self, filters: &[&str]) {
        let pkid = self.pkid();
        let mut unsub = Unsubscribe::new(filters[0]);
        unsub.topics = filters.iter().map(|f| f.to_string()).collect();
        unsub.pkid = pkid;
        self.send(Packet::Unsubscribe(unsub));
        match self.recv_matching("UNSUBACK", |p| matches!(p, Packet::UnsubAck(_))) {
            Packet::UnsubAck(ack) => assert_eq!(ack.pkid, pkid, "UNSUBACK's packet id"),
            _ => unreachable!(),
        }
    }

    /// PUBLISH as a publisher, with the whole flow of its QoS (waits for PUBACK, or PUBREC then
    /// PUBREL/PUBCOMP): when it returns, the broker has taken responsibility for the message.
    pub fn publish(&mut self, topic: &str, qos: QoS, payload: &[u8], retain: bool) {
        let mut p = Publish::new(topic, qos, payload.to_vec());
        p.retain = retain;
        if qos != QoS::AtMostOnce {
            p.pkid = self.pkid();
        }
        let pkid = p.pkid;
        self.send(Packet::Publish(p));
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.recv_matching(
                    "PUBACK",
                    |p| matches!(p, Packet::PubAck(a) if a.pkid == pkid),
                );
            }
            QoS::ExactlyOnce => {
                self.recv_matching(
                    "PUBREC",
                    |p| matches!(p, Packet::PubRec(a) if a.pkid == pkid),
                );
                self.send(Packet::PubRel(PubRel::new(pkid)));
                self.recv_matching(
                    "PUBCOMP",
                    |p| matches!(p, Packet::PubComp(a) if a.pkid == pkid),
                );
            }
        }
    }

    /// The next PUBLISH, acknowledged as a well-behaved subscriber does (PUBACK; or PUBREC,
    /// then PUBREL from the broker, then PUBCOMP). Any other packet fails the test.
    pub fn recv_publish(&mut self) -> Publish {
        let p = match self.recv("PUBLISH") {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        };
        self.ack(&p);
        p
    }

    /// Acknowledges a received PUBLISH (completing a QoS 2 handshake).
    pub fn ack(&mut self, p: &Publish) {
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(Packet::PubAck(PubAck::new(p.pkid))),
            QoS::ExactlyOnce => {
                let pkid = p.pkid;
                self.send(Packet::PubRec(PubRec::new(pkid)));
                self.recv_matching(
                    "PUBREL",
                    |q| matches!(q, Packet::PubRel(r) if r.pkid == pkid),
                );
                self.send(Packet::PubComp(PubComp::new(pkid)));
            }
        }
    }

    /// Receives (and acknowledges) PUBLISH packets until one on `end`; returns those before it.
    pub fn publishes_until(&mut self, end: &str) -> Vec<Publish> {
        let mut got = Vec::new();
        loop {
            let p = self.recv_publish();
            if p.topic == end {
                return got;
            }
            got.push(p);
        }
    }

    /// Sends DISCONNECT and drops the connection.
    pub fn disconnect(mut self) {
        self.send(Packet::Disconnect);
    }
}
