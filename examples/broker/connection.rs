//! One client connection: the MQTT 3.1.1 session protocol over its socket.
//!
//! A connection is an actor in the plain sense — a task with its own state and one mailbox
//! ([`ToConn`]), spawned and watched by the sessions supervisor — written as an async loop over
//! four event sources: the socket's bytes, its mailbox, the answers to its publications, and its
//! keep-alive timer. Packets are decoded and encoded with rumqttc's `mqttbytes::v4` codec.
//!
//! **Inbound requests.** PUBLISH, PUBREL, SUBSCRIBE and UNSUBSCRIBE ask the router or the store
//! for something, and their answers (PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK) go out in the
//! order the requests came (MQTT-4.6.0): consecutive PUBLISH packets go to the router as one
//! [`Route`], the others one by one, and each waits in `answers` for its answer. While
//! [`MAX_ROUTES`] answers are outstanding, further requests are *held* (decoded, not sent on):
//! this is how a slow subscriber slows its publishers down (the router holds their answers, see
//! [`crate::outbox`]). The socket is still read meanwhile, so the client's acknowledgements of
//! what it receives (and its PINGREQs) are handled at once — otherwise two clients publishing to
//! each other would each wait for the other's backlog, which waits for acknowledgements nobody
//! reads. Reading stops only when [`HELD_MAX`] bytes of requests are held, or when [`OUT_MAX`]
//! bytes wait for a client that does not read what it is sent.
//!
//! **Outbound PUBLISH.** Deliveries wait in `pending` until the client's window has room (at most
//! `max_inflight` QoS 1/2 messages unacknowledged) and the output buffer is below
//! [`OUT_HIGH`]; only then are they encoded, so a client that does not read holds its backlog
//! in the gauge the router watches, not in an ever-growing buffer. While the client keeps up,
//! pacing bounds that backlog; once it does not, the session's quota does (see [`crate::quota`]):
//! the router stops handing over new messages past it (`drop-new`), or the connection drops its
//! oldest pending ones (`drop-oldest`, with a `DropQueued` op for those the store holds).
//!
//! **Persistent sessions.** A delivery the store holds for the session (`stored`) is logged as
//! `Sent` when encoded and `Completed` when acknowledged, so after a restart the session resumes
//! exactly: unacknowledged messages again with DUP, PUBREL for QoS 2 half-done, the rest queued.
//! For QoS 2 the client sees a PUBLISH only once its `Sent` (its packet id) is durable, and a
//! PUBREL only once `Received` is: a crash in between could otherwise send the message again
//! under a new packet id, or again after its PUBREL — a duplicate the client cannot detect. Such
//! packets wait in `gates` (with everything encoded after them, to keep the order) until the
//! store answers.
//!
//! **Before a packet is whole.** A connection reserves nothing for bytes that have not arrived
//! ([`Input`]): it has no buffer until its socket is readable, its reads start at [`MIN_READ`]
//! bytes and double only while they come back full (up to [`READ_CHUNK`], what a publisher
//! streaming at full speed gets every time), its buffer grows with the packet in progress, never
//! past the size its header declares, and is let go when it is empty. The first byte must start
//! a CONNECT (anything else is refused at once), whole within 10 s of the connection; every
//! packet must be whole within `--packet-timeout` of its first byte, whatever the keep-alive
//! (the clock stops while the connection holds requests back for a slow subscriber). Bytes of
//! unfinished packets beyond each connection's first [`OWN_INCOMPLETE`] are bounded broker-wide
//! by `--max-incomplete-bytes` ([`Incomplete`]): a bigger packet takes room for all of its rest
//! before reading on, or its connection is not read until room is given back (or its deadline
//! closes it); clients whose packets fit in one read never wait.
//!
//! **Shutdown.** [`ToConn::Quiesce`]: PUBLISH packets from the client are no longer taken (not
//! acknowledged, so the client sends them again after reconnecting); the connection answers
//! once its outstanding publications are routed. [`ToConn::Close`]: it sends what it holds,
//! waits for the acknowledgements in flight, and closes by the deadline whatever happens, so a
//! client that does not read cannot hold the shutdown up.
//!
//! **Takeover.** [`ToConn::TakenOver`] (another connection with the same client id): the
//! connection ends and its will is published, but what it encoded for the client is written
//! first, within a short bound — one taken over right after its handshake still sends its
//! CONNACK, then closes.
//!
//! **Violations** (malformed packets, reserved bits set wrong — see [`crate::wire`] — a second
//! CONNECT, a packet a server never receives, a wildcard in a PUBLISH topic…) are logged with the peer's address and close this connection,
//! publishing its will (MQTT-4.8.0-1); nobody else notices.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_supervisor::ChildAddr;
use bytes::{BufMut, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, PubRel, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, Protocol, QoS};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::outbox::{Awaiting, ConnId, Deliver, Outbox, Outgoing, ToConn};
use crate::quota::{Overflow, Quota};
use crate::router::{
    Connect, Connected, Disconnected, Publication, Route, RouteError, Router, Subscribe,
    Unsubscribe, Will,
};
use crate::store::{Op, PacketId, Qos, StoreClient};
use crate::topic::{TopicFilter, TopicName};
use crate::wire;

const LOG: &str = "broker::connection";

/// Answers a connection may wait for before it holds further requests.
pub const MAX_ROUTES: usize = 4;
/// Bytes of held requests at which the socket is no longer read.
const HELD_MAX: usize = 256 * 1024;
/// Output bytes buffered for the socket before deliveries are left pending.
const OUT_HIGH: usize = 64 * 1024;
/// Output bytes at which the socket is no longer read: the client does not read what it is
/// sent, so what it sends (and the acknowledgements it earns) waits in its socket, not here.
const OUT_MAX: usize = 2 * OUT_HIGH;
/// How long a new connection has to send CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most bytes one read takes from the socket.
const READ_CHUNK: usize = 64 * 1024;
/// The first read of a connection, and the smallest: a typical CONNECT fits in it, and so do
/// acknowledgements and PINGREQ; reads grow from there as fast as bytes come.
const MIN_READ: usize = 128;
/// Bytes of a packet in progress a connection may hold without room in the broker-wide bound
/// ([`Incomplete`]): one read's worth, so that packets up to that size never wait for room.
const OWN_INCOMPLETE: usize = READ_CHUNK;

/// The broker's limits, from its command line.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_packet_size: usize,
    pub max_inflight: usize,
    /// What may wait for this client (see [`crate::quota`]).
    pub quota: Quota,
    /// How long a packet may take from its first byte to its last.
    pub packet_timeout: Duration,
}

/// Counters the broker prints when it stops.
#[derive(Default, Debug)]
pub struct Stats {
    /// Deliveries encoded for a socket after the drain began.
    pub delivered_in_drain: AtomicU64,
    /// Connections open when the drain began, closed by it.
    pub closed_in_drain: AtomicU64,
}

/// What every connection shares.
pub struct Shared {
    pub router: ChildAddr<Router>,
    pub store: StoreClient,
    pub limits: Limits,
    pub stats: Arc<Stats>,
    pub incomplete: Arc<Incomplete>,
}

/// The broker-wide bound on bytes of packets in progress beyond each connection's own
/// [`OWN_INCOMPLETE`]. A packet bigger than that share, once the share has arrived, takes room
/// for all the rest of it at once, before reading on, and gives it back when it is whole (or its
/// connection ends): a packet with room is read to its end whatever other packets do, so waits
/// for room never form a cycle. Connections waiting for room are not read; they are woken when
/// some is given back, and their packet's deadline runs meanwhile.
pub struct Incomplete {
    max: usize,
    used: AtomicUsize,
    freed: Notify,
}

impl Incomplete {
    pub fn new(max: usize) -> Incomplete {
        Incomplete {
            max,
            used: AtomicUsize::new(0),
            freed: Notify::new(),
        }
    }

    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.max)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::AcqRel);
            self.freed.notify_waiters();
        }
    }

    /// Resolves once `n` bytes are free (taking them is up to the caller, and may fail again).
    async fn room_for(&self, n: usize) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.used.load(Ordering::Acquire).saturating_add(n) <= self.max {
                return;
            }
            freed.await;
        }
    }
}

/// What a connection has read from its socket and not decoded yet, and how it reads.
///
/// Nothing is reserved for bytes that have not arrived: a connection waits for its socket to be
/// readable before it has a buffer, reads [`MIN_READ`] bytes at first, and doubles its reads only
/// while they come back full (up to [`READ_CHUNK`]); a packet that keeps arriving is read up to
/// its declared end at once. The buffer grows geometrically for a packet in progress, never past
/// the packet's size, and is let go whenever it is empty — an idle connection holds none.
struct Input {
    buf: BytesMut,
    /// The next read's size.
    chunk: usize,
    /// The last read filled what it was given: more is probably waiting.
    full: bool,
    /// Room taken in [`Incomplete`] for the packet in progress.
    room: usize,
    /// When the first byte of the packet in progress was read.
    since: Option<Instant>,
    /// The broker stopped reading (flow control) while a packet was in progress.
    stalled: bool,
    /// Not read until room is given back in [`Incomplete`].
    waiting: bool,
    incomplete: Arc<Incomplete>,
}

impl Drop for Input {
    fn drop(&mut self) {
        self.incomplete.give_back(self.room);
    }
}

impl Input {
    fn new(incomplete: Arc<Incomplete>) -> Input {
        Input {
            buf: BytesMut::new(),
            chunk: MIN_READ,
            full: false,
            room: 0,
            since: None,
            stalled: false,
            waiting: false,
            incomplete,
        }
    }

    /// Waits for bytes and reads some; `Ok(false)` at the socket's end. Cancel-safe: bytes and
    /// room are taken only between the awaits.
    async fn read(&mut self, reader: &OwnedReadHalf) -> std::io::Result<bool> {
        loop {
            // Polled, not `readable()`: that future is three times the size of this one, and a
            // connection's task is as large as its largest step.
            std::future::poll_fn(|cx| reader.as_ref().poll_read_ready(cx)).await?;
            let want = match self.next_read() {
                Ok(want) => want,
                Err(need) => {
                    self.waiting = true;
                    self.incomplete.room_for(need).await;
                    continue;
                }
            };
            self.waiting = false;
            let want = self.make_room(want);
            match reader.try_read_buf(&mut (&mut self.buf).limit(want)) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.full = n == want;
                    if self.full {
                        self.chunk = (self.chunk * 2).min(READ_CHUNK);
                    } else if n <= self.chunk / 4 {
                        self.chunk = (self.chunk / 2).max(MIN_READ);
                    }
                    return Ok(true);
                }
                // Readiness can be spurious (a new socket reports it at once): nothing is kept
                // for bytes that have not come.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.buf.is_empty() {
                        self.buf = BytesMut::new();
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// How many bytes to read next, or — when the packet in progress has its connection's own
    /// share and there is no room for the rest — `Err` with the room it waits for.
    fn next_read(&mut self) -> Result<usize, usize> {
        let len = self.buf.len();
        let mut want = self.chunk;
        let Some(frame) = wire::frame_length(&self.buf) else {
            return Ok(want);
        };
        if self.full {
            // The packet keeps coming: its declared rest in one read.
            want = want.max(frame.saturating_sub(len).min(READ_CHUNK));
        }
        if frame > OWN_INCOMPLETE && self.room == 0 {
            // Room is taken only once the connection's own share has arrived: a header alone
            // (what costs a client nothing) takes none.
            if len < OWN_INCOMPLETE {
                want = want.min(OWN_INCOMPLETE - len);
            } else {
                let need = frame - OWN_INCOMPLETE;
                if !self.incomplete.try_take(need) {
                    return Err(need);
                }
                self.room = need;
            }
        }
        Ok(want)
    }

    /// Makes room in the buffer for a read of `want` bytes; returns what to read.
    fn make_room(&mut self, want: usize) -> usize {
        let len = self.buf.len();
        let spare = self.buf.capacity() - len;
        let frame = wire::frame_length(&self.buf);
        if spare >= want {
            return want;
        }
        // The rest of the packet in progress fits: no copy for bytes that may never come.
        if let Some(frame) = frame {
            if spare > 0 && spare >= frame - len.min(frame) {
                return spare;
            }
        }
        // Geometric for a packet in progress (the copies stay linear in its size), never past
        // its end or what it may hold without room; a fresh buffer, not `reserve`, which may
        // double it and copy all of its capacity.
        let mut capacity = len + want;
        if let Some(frame) = frame {
            let end = if self.room > 0 {
                frame
            } else {
                frame.min(OWN_INCOMPLETE)
            };
            capacity = capacity.max((2 * len).min(end));
        }
        let mut fresh = BytesMut::with_capacity(capacity);
        fresh.extend_from_slice(&self.buf);
        self.buf = fresh;
        want
    }

    /// After decoding: `took` whole packets were taken from the buffer. Gives back the room of
    /// a packet that is whole, starts the clock of one that began, lets go of an empty buffer.
    fn settle(&mut self, took: bool) {
        if took {
            self.incomplete.give_back(std::mem::take(&mut self.room));
            self.since = None;
        }
        if self.buf.is_empty() {
            self.since = None;
            self.buf = BytesMut::new();
        } else if self.since.is_none() {
            self.since = Some(Instant::now());
        }
    }

    /// When the packet in progress must be whole, if one is; the clock stops while the broker
    /// does not read for flow control (`held`: requests wait for other clients), and starts over
    /// when it reads again.
    fn deadline(&mut self, timeout: Duration, held: bool) -> Option<tokio::time::Instant> {
        if held {
            self.stalled = true;
            return None;
        }
        if std::mem::take(&mut self.stalled) && self.since.is_some() {
            self.since = Some(Instant::now());
        }
        self.since
            .map(|since| tokio::time::Instant::from_std(since + timeout))
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// DISCONNECT: a normal end, no will.
    Disconnect,
    /// Closed by the broker's shutdown: no will (the client did nothing wrong).
    Shutdown,
    /// Another connection took the client id over: the will is published (as mosquitto does),
    /// and what was encoded for the client is still written — a connection taken over right
    /// after its handshake owes its client the CONNACK, without which the client would take the
    /// close for a failed CONNECT.
    TakenOver,
    /// Closed by the broker for a reason of its own (logged): no will.
    Evicted(&'static str),
    /// A request needed the disk, which the store cannot write now: not acknowledged, closed
    /// (DEBUG: the store logs the condition once), no will.
    NoDisk,
    /// Everything else publishes the will: the reason is logged.
    Abnormal(String),
}

type Answer = Pin<Box<dyn Future<Output = Result<(), RouteError>>>>;

/// A store commit the packets behind it wait for.
type Gate = Pin<Box<dyn Future<Output = Result<(), RouteError>>>>;

/// Packets owed to the client once an answer comes.
#[allow(clippy::enum_variant_names)] // MQTT's packet names
enum Ack {
    PubAck(PacketId),
    PubRec(PacketId),
    PubComp(PacketId),
    SubAck(PacketId, Vec<SubscribeReasonCode>),
    UnsubAck(PacketId),
}

impl Ack {
    /// The answer to a request the broker could not carry out: a SUBACK with failure codes.
    fn refused(self) -> Packet {
        match self {
            Ack::SubAck(pkid, codes) => Packet::SubAck(SubAck::new(
                pkid,
                vec![SubscribeReasonCode::Failure; codes.len()],
            )),
            other => other.packet(),
        }
    }

    fn packet(self) -> Packet {
        match self {
            Ack::PubAck(pkid) => Packet::PubAck(PubAck::new(pkid)),
            Ack::PubRec(pkid) => Packet::PubRec(PubRec::new(pkid)),
            Ack::PubComp(pkid) => Packet::PubComp(PubComp::new(pkid)),
            Ack::SubAck(pkid, codes) => Packet::SubAck(SubAck::new(pkid, codes)),
            Ack::UnsubAck(pkid) => Packet::UnsubAck(UnsubAck::new(pkid)),
        }
    }
}

/// A decoded packet that asks the router or the store for something, in the order it came.
enum Request {
    /// PUBLISH: the publication to route (`None`: a QoS 2 message sent again before PUBREL,
    /// not routed twice — MQTT-4.3.3-2) and its acknowledgement.
    Publish {
        publication: Option<Publication>,
        ack: Option<Ack>,
    },
    /// PUBREL; `known`: the packet id was one in flight (persistent sessions log its release).
    Release { pkid: PacketId, known: bool },
    Subscribe {
        pkid: PacketId,
        filters: Vec<(TopicFilter, Qos)>,
    },
    Unsubscribe {
        pkid: PacketId,
        filters: Vec<TopicFilter>,
    },
}

/// Serves one TCP connection to its end.
///
/// The connection is built before the returned future first runs, and its end is boxed when it
/// comes: a task's state is as large as its largest step, and a socket that has not connected
/// should hold one `Conn` and the handshake's state, not their copies in `finish` too.
pub fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    outbox: Outbox,
    mailbox: mpsc::UnboundedReceiver<ToConn>,
    shared: Arc<Shared>,
) -> impl Future<Output = ()> {
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.into_split();
    let input = Input::new(shared.incomplete.clone());
    let mut conn = Conn {
        id: outbox.conn,
        peer,
        shared,
        outbox,
        mailbox,
        reader,
        writer,
        input,
        // Allocated by the first packet encoded: a client that never connects costs nothing here.
        out: BytesMut::new(),
        client: String::new(),
        clean: true,
        keep_alive: None,
        will: None,
        registered: false,
        pending: VecDeque::new(),
        outgoing: HashMap::new(),
        next_pkid: 0,
        inbound: BTreeSet::new(),
        answers: VecDeque::new(),
        held: VecDeque::new(),
        held_bytes: 0,
        ops: Vec::new(),
        staged: BytesMut::new(),
        gates: VecDeque::new(),
        gated_bytes: 0,
        quiesced: None,
        closing: None,
        draining: false,
        last_packet: Instant::now(),
        finished: false,
    };
    async move {
        let end = match conn.handshake().await {
            // Clients may send packets right behind CONNECT without waiting for CONNACK (§3.1.4).
            Ok(true) => match conn.on_input() {
                Some(end) => end,
                None => conn.run().await,
            },
            Ok(false) => End::Disconnect,
            Err(end) => end,
        };
        Box::pin(conn.finish(end)).await;
    }
}

struct Conn {
    id: ConnId,
    peer: SocketAddr,
    shared: Arc<Shared>,
    outbox: Outbox,
    mailbox: mpsc::UnboundedReceiver<ToConn>,
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    input: Input,
    out: BytesMut,
    client: String,
    clean: bool,
    keep_alive: Option<Duration>,
    will: Option<Will>,
    /// The router knows this connection (it must hear when it ends).
    registered: bool,
    /// Deliveries not encoded yet, all counted in the backlog gauge.
    pending: VecDeque<Deliver>,
    /// Outbound QoS 1/2 flows in progress, by packet id.
    outgoing: HashMap<PacketId, Outgoing>,
    next_pkid: PacketId,
    /// Inbound QoS 2 packet ids routed and not released yet.
    inbound: BTreeSet<PacketId>,
    /// Answers awaited, oldest first, with the packets each releases.
    answers: VecDeque<(Answer, Vec<Ack>)>,
    /// Requests decoded and not sent on yet (`MAX_ROUTES` answers are outstanding), with their
    /// sizes on the wire; `held_bytes` is their sum.
    held: VecDeque<(Request, usize)>,
    held_bytes: usize,
    /// Store ops to send at the end of this turn of the loop.
    ops: Vec<Op>,
    /// Outbound PUBLISH and PUBREL packets encoded this turn that wait for this turn's `ops`
    /// (or for a gate before them).
    staged: BytesMut,
    /// Packets waiting for a store commit, oldest first; `gated_bytes` is their size.
    gates: VecDeque<(Gate, BytesMut)>,
    gated_bytes: usize,
    /// Told to quiesce: answer here once `answers` is empty.
    quiesced: Option<oneshot::Sender<()>>,
    /// Told to close, by this deadline.
    closing: Option<Instant>,
    /// The broker is draining: PUBLISH from the client is not taken.
    draining: bool,
    last_packet: Instant,
    /// `finish` ran; otherwise dropping the connection (a panic, or its task cancelled) does
    /// the part of it that others wait for.
    finished: bool,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.finished {
            self.outbox.backlog.close();
            if self.registered {
                let _ = self.shared.router.do_send(Disconnected {
                    client: std::mem::take(&mut self.client),
                    conn: self.id,
                    will: None,
                });
            }
        }
    }
}

impl Conn {
    /// Reads CONNECT and answers it. `Ok(true)`: the session runs; `Ok(false)`: refused with a
    /// CONNACK code (the connection ends, no will).
    async fn handshake(&mut self) -> Result<bool, End> {
        let until = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let max = self.shared.limits.max_packet_size;
        let packet_timeout = self.shared.limits.packet_timeout;
        let connect = loop {
            // Known from the first byte: nothing else of a packet that is not CONNECT is read.
            wire::check_first(&self.input.buf).map_err(violation)?;
            wire::check_next(&self.input.buf, max).map_err(violation)?;
            match Packet::read(&mut self.input.buf, max) {
                Ok(Packet::Connect(connect)) => {
                    self.input.settle(true);
                    break connect;
                }
                Ok(other) => {
                    return Err(violation(format!("{} before CONNECT", packet_name(&other))))
                }
                Err(CodecError::InsufficientBytes(_)) => self.input.settle(false),
                Err(CodecError::InvalidProtocolLevel(level)) => {
                    // MQTT-3.1.2-2: an unsupported level gets return code 0x01, then the close.
                    log::info!(
                        target: LOG,
                        "{}: protocol level {level} is not MQTT 3.1.1: refused",
                        self.peer
                    );
                    self.refuse(ConnectReturnCode::RefusedProtocolVersion).await;
                    return Ok(false);
                }
                Err(e) => return Err(violation(format!("bad CONNECT: {e}"))),
            }
            let by = match self.input.deadline(packet_timeout, false) {
                Some(packet) if packet < until => packet,
                _ => until,
            };
            let Conn {
                reader,
                input,
                mailbox,
                ..
            } = self;
            tokio::select! {
                more = tokio::time::timeout_at(by, input.read(reader)) => match more {
                    Ok(Ok(true)) => {}
                    Ok(Ok(false)) => return Err(End::Abnormal("closed before CONNECT".into())),
                    Ok(Err(e)) => return Err(End::Abnormal(format!("read: {e}"))),
                    Err(_) if by < until => return Err(packet_timed_out(packet_timeout)),
                    Err(_) => return Err(violation("no CONNECT within 10 s".into())),
                },
                // The broker is stopping (nothing else is sent to a connection without a client
                // id): a client that has not even connected is not waited for.
                _ = mailbox.recv() => return Err(End::Shutdown),
            }
        };
        if connect.protocol != Protocol::V4 {
            self.refuse(ConnectReturnCode::RefusedProtocolVersion).await;
            return Ok(false);
        }
        self.clean = connect.clean_session;
        self.client = connect.client_id;
        if self.client.is_empty() {
            if !self.clean {
                // MQTT-3.1.3-8: a zero-length id needs a clean session.
                self.refuse(ConnectReturnCode::BadClientId).await;
                return Ok(false);
            }
            // MQTT-3.1.3-6: the server assigns one, unique and unguessable.
            self.client = wire::random_client_id();
        }
        if let Some(will) = connect.last_will {
            let topic = TopicName::parse(&will.topic)
                .map_err(|e| violation(format!("will topic `{}`: {e}", will.topic)))?;
            self.will = Some(Will {
                topic,
                payload: will.message,
                qos: will.qos as Qos,
                retain: will.retain,
            });
        }
        self.keep_alive = (connect.keep_alive > 0)
            .then(|| Duration::from_millis(connect.keep_alive as u64 * 1500));
        // From the first poll of the send on, the router may have this connection in its books
        // (an accepted message is handled even if this task is cancelled while it waits): it
        // must hear when the connection ends, whichever way.
        self.registered = true;
        let answer = self
            .shared
            .router
            .send(Connect {
                client: self.client.clone(),
                clean: self.clean,
                outbox: self.outbox.clone(),
            })
            .await;
        let connected = match answer {
            Ok(Ok(connected)) => connected,
            Ok(Err(e)) => {
                // The store's failure to write is logged once, by the store.
                let level = match e {
                    RouteError::NoDisk => log::Level::Debug,
                    RouteError::Failed(_) => log::Level::Warn,
                };
                log::log!(target: LOG, level, "{} `{}`: cannot connect: {e}", self.peer, self.client);
                self.refuse(ConnectReturnCode::ServiceUnavailable).await;
                return Ok(false);
            }
            Err(_) => {
                self.refuse(ConnectReturnCode::ServiceUnavailable).await;
                return Ok(false);
            }
        };
        let Connected {
            session_present,
            restored,
        } = connected;
        self.encode(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            session_present,
        )));
        log::debug!(
            target: LOG,
            "{} connected as `{}` (clean session: {}, session present: {session_present})",
            self.peer,
            self.client,
            self.clean
        );
        if let Some(restored) = restored {
            // MQTT-4.4.0-1: unacknowledged PUBLISH again with DUP, and PUBREL, in order.
            for (pkid, deliver) in restored.unacked {
                let awaiting = if deliver.qos == 1 {
                    Awaiting::PubAck
                } else {
                    Awaiting::PubRec
                };
                let mut publish = publish_packet(&deliver, pkid);
                publish.dup = true;
                self.encode(Packet::Publish(publish));
                self.outgoing.insert(
                    pkid,
                    Outgoing {
                        awaiting,
                        stored: true,
                    },
                );
            }
            for pkid in restored.released {
                self.encode(Packet::PubRel(PubRel::new(pkid)));
                self.outgoing.insert(
                    pkid,
                    Outgoing {
                        awaiting: Awaiting::PubComp,
                        stored: true,
                    },
                );
            }
            // Counted like any delivery: what the session was owed is its backlog, under its
            // quota, and pacing its publishers until it is sent.
            for deliver in restored.queue {
                self.outbox.backlog.add(deliver.size());
                self.pending.push_back(deliver);
            }
            self.inbound = restored.inbound;
        }
        self.last_packet = Instant::now();
        Ok(true)
    }

    async fn refuse(&mut self, code: ConnectReturnCode) {
        self.encode(Packet::ConnAck(ConnAck::new(code, false)));
        let _ = tokio::time::timeout(Duration::from_secs(1), self.flush()).await;
    }

    /// The session's loop, until the connection ends.
    async fn run(&mut self) -> End {
        loop {
            self.dispatch(false);
            self.encode_pending();
            self.send_ops();
            if self.quiesced.is_some() && self.answers.is_empty() && self.held.is_empty() {
                if let Some(done) = self.quiesced.take() {
                    let _ = done.send(());
                }
            }
            if let Some(deadline) = self.closing {
                // Idle: nothing to send, nothing in flight either way (the acknowledgements for
                // what the client published are sent once the router answers).
                let idle = self.pending.is_empty()
                    && self.outgoing.is_empty()
                    && self.answers.is_empty()
                    && self.held.is_empty()
                    && self.gates.is_empty();
                if (idle && self.out.is_empty()) || Instant::now() >= deadline {
                    return End::Shutdown;
                }
            }
            let keep_alive = self
                .keep_alive
                .map(|ka| tokio::time::Instant::from_std(self.last_packet + ka));
            let close_at = self.closing.map(tokio::time::Instant::from_std);
            let held = self.held_bytes >= HELD_MAX;
            let read = !held && self.out.len() < OUT_MAX;
            // While the broker itself does not read (flow control, or a packet waiting for room
            // in the broker-wide bound), the client's packets wait in the socket: its silence is
            // ours, not its own. A packet in progress is not waited for while requests are held
            // for other clients' sake; a client that does not read what it is sent, or whose
            // packet waits for room, gets no such grace.
            let keep_alive = keep_alive.filter(|_| read && !self.input.waiting);
            let packet_by = self.input.deadline(self.shared.limits.packet_timeout, held);
            // One timer for both deadlines (a timer is a tenth of a connection's state).
            let (timer, packet_first) = match (keep_alive, packet_by) {
                (Some(ka), Some(by)) => (Some(ka.min(by)), by <= ka),
                (ka, by) => (ka.or(by), by.is_some()),
            };
            let event = {
                let Conn {
                    mailbox,
                    answers,
                    gates,
                    writer,
                    out,
                    reader,
                    input,
                    ..
                } = self;
                tokio::select! {
                    biased;
                    msg = mailbox.recv() => Event::Mail(msg),
                    answer = next_answer(answers), if !answers.is_empty() => Event::Answer(answer),
                    stored = next_gate(gates), if !gates.is_empty() => Event::Stored(stored),
                    written = writer.write_buf(out), if !out.is_empty() => Event::Written(written),
                    more = input.read(reader), if read => Event::Read(more),
                    () = sleep_until(timer), if timer.is_some() => {
                        if packet_first {
                            Event::PacketTimeout
                        } else {
                            Event::KeepAlive
                        }
                    }
                    () = sleep_until(close_at), if close_at.is_some() => Event::Deadline,
                }
            };
            match event {
                // Everyone who could write to it is gone: the broker is stopping.
                Event::Mail(None) => return End::Shutdown,
                Event::Mail(Some(msg)) => {
                    if let Some(end) = self.on_mail(msg) {
                        return end;
                    }
                }
                Event::Answer(answer) => {
                    let acks = self.answers.pop_front().map(|(_, acks)| acks);
                    match answer {
                        Ok(()) => {
                            for ack in acks.into_iter().flatten() {
                                self.encode(ack.packet());
                            }
                        }
                        // MQTT-3.9.3: a SUBSCRIBE the broker cannot carry out gets 0x80 for each
                        // filter; the connection goes on.
                        Err(RouteError::NoDisk)
                            if matches!(acks.as_deref(), Some([Ack::SubAck(..)])) =>
                        {
                            for ack in acks.into_iter().flatten() {
                                self.encode(ack.refused());
                            }
                        }
                        // Not acknowledged: the client sends it again after reconnecting.
                        Err(RouteError::NoDisk) => return End::NoDisk,
                        Err(e) => return End::Abnormal(format!("routing failed: {e}")),
                    }
                }
                Event::Stored(Ok(())) => {
                    if let Some((_, bytes)) = self.gates.pop_front() {
                        self.gated_bytes -= bytes.len();
                        self.out.extend_from_slice(&bytes);
                    }
                }
                // The broker's failure, not the client's: no will.
                Event::Stored(Err(RouteError::NoDisk)) => return End::NoDisk,
                Event::Stored(Err(e)) => return End::Abnormal(format!("the store failed: {e}")),
                Event::Written(Ok(_)) => {}
                Event::Written(Err(e)) => return End::Abnormal(format!("write: {e}")),
                Event::Read(Ok(true)) => {
                    self.last_packet = Instant::now();
                    if let Some(end) = self.on_input() {
                        return end;
                    }
                }
                Event::Read(Ok(false)) => {
                    // What came before the end is handled first: it may end with DISCONNECT.
                    if let Some(end) = self.on_input() {
                        return end;
                    }
                    self.dispatch(true);
                    return End::Abnormal(
                        "the client closed the connection without DISCONNECT".into(),
                    );
                }
                Event::Read(Err(e)) => return End::Abnormal(format!("read: {e}")),
                // Armed before the connection began to wait for room: not its silence.
                Event::KeepAlive if self.input.waiting => {}
                // MQTT-3.1.2-24: nothing from the client for 1.5 × its keep-alive.
                Event::KeepAlive => return End::Abnormal("keep-alive timed out".into()),
                Event::PacketTimeout => return packet_timed_out(self.shared.limits.packet_timeout),
                Event::Deadline => return End::Shutdown,
            }
        }
    }

    fn on_mail(&mut self, msg: ToConn) -> Option<End> {
        match msg {
            ToConn::Deliver(deliver) => {
                self.pending.push_back(deliver);
                if self.shared.limits.quota.overflow == Overflow::DropOldest {
                    self.trim_pending();
                }
            }
            ToConn::TakenOver => return Some(End::TakenOver),
            ToConn::Evict(reason) => return Some(End::Evicted(reason)),
            ToConn::Quiesce(done) => {
                self.draining = true;
                self.quiesced = Some(done);
            }
            ToConn::Close { deadline } => {
                self.draining = true;
                self.closing = Some(deadline);
            }
        }
        None
    }

    /// Handles every whole packet in the input buffer: acknowledgements of what the client
    /// receives and PINGREQ at once, requests into `held`.
    fn on_input(&mut self) -> Option<End> {
        let max = self.shared.limits.max_packet_size;
        let mut took = false;
        let end = loop {
            if let Err(reason) = wire::check_next(&self.input.buf, max) {
                break Some(violation(reason));
            }
            let before = self.input.buf.len();
            let packet = match Packet::read(&mut self.input.buf, max) {
                Ok(packet) => packet,
                Err(CodecError::InsufficientBytes(_)) => break None,
                Err(e) => break Some(violation(format!("malformed packet: {e}"))),
            };
            took = true;
            let size = before - self.input.buf.len();
            let request = match packet {
                Packet::Publish(publish) => match self.on_publish(publish) {
                    Ok(Some(request)) => request,
                    Ok(None) => continue,
                    Err(end) => break Some(end),
                },
                Packet::PubAck(ack) => {
                    self.acknowledged(ack.pkid, Awaiting::PubAck);
                    continue;
                }
                Packet::PubRec(rec) => {
                    self.received(rec.pkid);
                    continue;
                }
                Packet::PubComp(comp) => {
                    self.acknowledged(comp.pkid, Awaiting::PubComp);
                    continue;
                }
                Packet::PingReq => {
                    self.encode(Packet::PingResp);
                    continue;
                }
                Packet::PubRel(rel) => Request::Release {
                    pkid: rel.pkid,
                    // MQTT-4.3.3: the packet id is free from here on (a PUBLISH with it after
                    // this is a new message); its PUBCOMP waits until that is durable.
                    known: self.inbound.remove(&rel.pkid),
                },
                Packet::Subscribe(subscribe) => match subscribe_request(subscribe) {
                    Ok(request) => request,
                    Err(reason) => break Some(violation(reason)),
                },
                Packet::Unsubscribe(unsubscribe) => match unsubscribe_request(unsubscribe) {
                    Ok(request) => request,
                    Err(reason) => break Some(violation(reason)),
                },
                Packet::Disconnect => break Some(End::Disconnect),
                Packet::Connect(_) => break Some(violation("a second CONNECT".into())),
                other => {
                    break Some(violation(format!(
                        "{} is not a packet a client sends",
                        packet_name(&other)
                    )))
                }
            };
            self.held_bytes += size;
            self.held.push_back((request, size));
        };
        self.input.settle(took);
        if end.is_some() {
            // What was read before a violation or DISCONNECT is still routed (and acknowledged
            // if the connection lives long enough): the client sent it.
            self.dispatch(true);
        }
        end
    }

    /// The request a PUBLISH makes, if it is taken.
    fn on_publish(&mut self, publish: Publish) -> Result<Option<Request>, End> {
        let topic = TopicName::parse(&publish.topic)
            .map_err(|e| violation(format!("PUBLISH to `{}`: {e}", publish.topic)))?;
        if self.draining {
            // Not taken, not acknowledged: the client sends it again when it reconnects.
            log::debug!(target: LOG, "{}: PUBLISH while draining, not taken", self.peer);
            return Ok(None);
        }
        let qos = publish.qos as Qos;
        let ack = match qos {
            1 => Some(Ack::PubAck(publish.pkid)),
            2 => {
                if !self.inbound.insert(publish.pkid) {
                    // MQTT-4.3.3-2: a PUBLISH sent again before PUBREL is not routed twice.
                    return Ok(Some(Request::Publish {
                        publication: None,
                        ack: Some(Ack::PubRec(publish.pkid)),
                    }));
                }
                Some(Ack::PubRec(publish.pkid))
            }
            _ => None,
        };
        Ok(Some(Request::Publish {
            publication: Some(Publication {
                topic,
                payload: publish.payload,
                qos,
                retain: publish.retain,
                pkid: publish.pkid,
            }),
            ack,
        }))
    }

    /// Sends held requests on, oldest first, while fewer than [`MAX_ROUTES`] answers are
    /// outstanding — or all of them (`force`: the connection is ending).
    fn dispatch(&mut self, force: bool) {
        while force || self.answers.len() < MAX_ROUTES {
            let Some(request) = self.take_held() else {
                break;
            };
            let (answer, acks) = match request {
                Request::Publish { publication, ack } => {
                    let mut publications: Vec<Publication> = publication.into_iter().collect();
                    let mut acks: Vec<Ack> = ack.into_iter().collect();
                    // The PUBLISH packets right behind it go to the router with it.
                    while let Some((Request::Publish { .. }, _)) = self.held.front() {
                        if let Some(Request::Publish { publication, ack }) = self.take_held() {
                            publications.extend(publication);
                            acks.extend(ack);
                        }
                    }
                    (self.route(publications), acks)
                }
                Request::Release { pkid, known } => {
                    // Publications before it go to the store first (their InboundReceived
                    // before this InboundReleased): the store takes requests in order.
                    let answer: Answer = if known && !self.clean {
                        let committed = self.shared.store.commit(vec![Op::InboundReleased {
                            client: self.client.clone(),
                            pkid,
                        }]);
                        Box::pin(
                            async move { committed.await.map(|_| ()).map_err(RouteError::from) },
                        )
                    } else {
                        Box::pin(async { Ok(()) })
                    };
                    (answer, vec![Ack::PubComp(pkid)])
                }
                Request::Subscribe { pkid, filters } => {
                    // MQTT-3.9.3: every filter is granted the QoS it asked for.
                    let codes = filters
                        .iter()
                        .map(|(_, qos)| SubscribeReasonCode::Success(to_qos(*qos)))
                        .collect();
                    let client = self.client.clone();
                    let answer = self.ask_router(Subscribe { client, filters });
                    (answer, vec![Ack::SubAck(pkid, codes)])
                }
                Request::Unsubscribe { pkid, filters } => {
                    let client = self.client.clone();
                    let answer = self.ask_router(Unsubscribe { client, filters });
                    (answer, vec![Ack::UnsubAck(pkid)])
                }
            };
            self.answers.push_back((answer, acks));
        }
    }

    fn take_held(&mut self) -> Option<Request> {
        let (request, size) = self.held.pop_front()?;
        self.held_bytes -= size;
        Some(request)
    }

    /// Sends publications to the router; the answer comes once they are delivered or durable.
    fn route(&mut self, publications: Vec<Publication>) -> Answer {
        if publications.is_empty() {
            return Box::pin(async { Ok(()) });
        }
        let (reply, answer) = oneshot::channel();
        let route = Route {
            from: self.client.clone(),
            publications,
            reply,
        };
        match self.shared.router.do_send(route) {
            Ok(()) => Box::pin(async move {
                answer
                    .await
                    .unwrap_or_else(|_| Err("the router stopped".into()))
            }),
            Err(_) => Box::pin(async { Err("the router is not running".into()) }),
        }
    }

    /// Asks the router now (in order with the routes before it) and answers when it has.
    fn ask_router<M>(&self, msg: M) -> Answer
    where
        M: actix::Message<Result = Result<(), RouteError>> + Send + 'static,
        Router: actix::Handler<M>,
    {
        match self.shared.router.request(msg) {
            Ok(answer) => Box::pin(async move {
                answer
                    .await
                    .unwrap_or_else(|e| Err(RouteError::Failed(e.to_string())))
            }),
            Err(_) => Box::pin(async { Err("the router is not running".into()) }),
        }
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) for an outbound message.
    fn acknowledged(&mut self, pkid: PacketId, expected: Awaiting) {
        match self.outgoing.get(&pkid) {
            Some(out) if out.awaiting == expected => {
                if out.stored {
                    self.ops.push(Op::Completed {
                        client: self.client.clone(),
                        pkid,
                    });
                }
                self.outgoing.remove(&pkid);
            }
            // An acknowledgement for nothing we wait for: a duplicate, harmless.
            _ => log::debug!(target: LOG, "{}: stray {expected:?} for {pkid}", self.peer),
        }
    }

    /// PUBREC for an outbound QoS 2 message: PUBREL (again, if it is a duplicate).
    fn received(&mut self, pkid: PacketId) {
        let Some(out) = self.outgoing.get_mut(&pkid) else {
            log::debug!(target: LOG, "{}: stray PUBREC for {pkid}", self.peer);
            return;
        };
        match out.awaiting {
            Awaiting::PubRec => {
                out.awaiting = Awaiting::PubComp;
                let stored = out.stored;
                if stored {
                    self.ops.push(Op::Received {
                        client: self.client.clone(),
                        pkid,
                    });
                }
                self.emit(Packet::PubRel(PubRel::new(pkid)), stored);
            }
            Awaiting::PubComp => self.emit(Packet::PubRel(PubRel::new(pkid)), false),
            Awaiting::PubAck => {
                log::debug!(target: LOG, "{}: PUBREC for QoS 1 message {pkid}", self.peer)
            }
        }
    }

    /// Encodes pending deliveries while the client's window and the output buffer have room.
    fn encode_pending(&mut self) {
        let mut counted = 0;
        let mut counted_bytes = 0;
        while self.out.len() + self.staged.len() + self.gated_bytes < OUT_HIGH {
            let Some(deliver) = self.pending.front() else {
                break;
            };
            if deliver.qos > 0 && self.outgoing.len() >= self.shared.limits.max_inflight {
                break;
            }
            let Some(deliver) = self.pending.pop_front() else {
                break;
            };
            counted += 1;
            counted_bytes += deliver.size();
            let pkid = if deliver.qos == 0 {
                0
            } else {
                let pkid = self.free_pkid();
                let awaiting = if deliver.qos == 1 {
                    Awaiting::PubAck
                } else {
                    Awaiting::PubRec
                };
                self.outgoing.insert(
                    pkid,
                    Outgoing {
                        awaiting,
                        stored: deliver.stored,
                    },
                );
                pkid
            };
            if deliver.stored {
                self.ops.push(Op::Sent {
                    client: self.client.clone(),
                    msg: deliver.msg.id,
                    pkid,
                });
            }
            // A QoS 2 message's packet id must be durable before the client sees it.
            let durable = deliver.stored && deliver.qos == 2;
            self.emit(Packet::Publish(publish_packet(&deliver, pkid)), durable);
            if self.draining {
                self.shared
                    .stats
                    .delivered_in_drain
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        if counted > 0 {
            self.outbox.backlog.sent(counted, counted_bytes);
            if self.outbox.backlog.end_over(&self.shared.limits.quota) {
                self.shared.store.stats().drops.recovered(&self.client);
            }
        }
    }

    /// With `--queue-overflow drop-oldest`: drops the oldest deliveries not encoded yet while the
    /// backlog is over the quota (the router hands every message over; this is where the
    /// quota takes effect). A dropped delivery the store holds for the session is dropped there
    /// too, so that it is not sent after a reconnect either.
    fn trim_pending(&mut self) {
        let quota = self.shared.limits.quota;
        let mut dropped = 0;
        // Only a connection that does not keep up: one that does paces its publishers instead.
        while self.outbox.backlog.over(&quota) {
            let Some(deliver) = self.pending.pop_front() else {
                break;
            };
            self.outbox.backlog.sent(1, deliver.size());
            if deliver.stored {
                self.ops.push(Op::DropQueued {
                    client: self.client.clone(),
                    msg: deliver.msg.id,
                });
            }
            dropped += 1;
        }
        if dropped > 0 {
            self.outbox.backlog.mark_over();
            let drops = &self.shared.store.stats().drops;
            drops.dropped(&self.client, dropped, &quota, false);
        }
    }

    fn free_pkid(&mut self) -> PacketId {
        // The window is at most 65535 (checked at start), so a free id exists.
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1);
            if self.next_pkid != 0 && !self.outgoing.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// Sends this turn's store ops; the packets staged this turn wait for them.
    fn send_ops(&mut self) {
        let committed =
            (!self.ops.is_empty()).then(|| self.shared.store.commit(std::mem::take(&mut self.ops)));
        if self.staged.is_empty() {
            // Not awaited: these only record progress; the store takes them in order.
            drop(committed);
            return;
        }
        let staged = std::mem::take(&mut self.staged);
        self.gated_bytes += staged.len();
        match (committed, self.gates.back_mut()) {
            (Some(committed), _) => {
                let gate: Gate =
                    Box::pin(async move { committed.await.map(|_| ()).map_err(RouteError::from) });
                self.gates.push_back((gate, staged));
            }
            (None, Some((_, behind))) => behind.extend_from_slice(&staged),
            // Staged only behind a gate or for a commit, so one of them exists; if not, there
            // is nothing to wait for.
            (None, None) => {
                self.gated_bytes -= staged.len();
                self.out.extend_from_slice(&staged);
            }
        }
    }

    fn encode(&mut self, packet: Packet) {
        encode_into(&mut self.out, packet, self.peer);
    }

    /// Encodes an outbound PUBLISH or PUBREL: for the socket, or — if it must wait until this
    /// turn's ops are durable (`durable`), or packets before it wait — staged behind them.
    fn emit(&mut self, packet: Packet, durable: bool) {
        if durable || !self.staged.is_empty() || !self.gates.is_empty() {
            encode_into(&mut self.staged, packet, self.peer);
        } else {
            self.encode(packet);
        }
    }

    async fn flush(&mut self) {
        while !self.out.is_empty() {
            if self.writer.write_buf(&mut self.out).await.is_err() {
                return;
            }
        }
    }

    /// Ends the connection: a last flush (bounded), the will, the router told.
    async fn finish(mut self, end: End) {
        self.finished = true;
        self.send_ops();
        let will = match &end {
            End::Disconnect => {
                log::debug!(target: LOG, "{} `{}` disconnected", self.peer, self.client);
                None
            }
            End::Shutdown => None,
            End::TakenOver => {
                log::info!(
                    target: LOG,
                    "{} `{}`: taken over by a new connection with the same client id",
                    self.peer,
                    self.client
                );
                self.will.take()
            }
            End::NoDisk => {
                log::debug!(
                    target: LOG,
                    "{} `{}`: closed: a request needs the disk, which the store cannot write now",
                    self.peer,
                    self.client
                );
                None
            }
            End::Evicted(reason) => {
                log::info!(target: LOG, "{} `{}`: closed by the broker: {reason}", self.peer, self.client);
                None
            }
            End::Abnormal(reason) => {
                log::info!(target: LOG, "{} `{}`: connection closed: {reason}", self.peer, self.client);
                self.will.take()
            }
        };
        if !matches!(end, End::Abnormal(_)) {
            // A last flush, never past the drain's deadline. The connection taking over waits
            // for it too (it is connected on `Disconnected`, sent after): the bound keeps a
            // client that does not read from holding it up for long.
            let mut limit = Duration::from_millis(200);
            if let Some(deadline) = self.closing {
                limit = limit.min(deadline.saturating_duration_since(Instant::now()));
            }
            let _ = tokio::time::timeout(limit, self.flush()).await;
        }
        let _ = self.writer.shutdown().await;
        self.outbox.backlog.close();
        if self.registered {
            if self.clean {
                // A persistent session's episode goes on offline, in the store.
                self.shared.store.stats().drops.ended(&self.client);
            }
            let _ = self.shared.router.do_send(Disconnected {
                client: std::mem::take(&mut self.client),
                conn: self.id,
                will,
            });
        }
    }
}

/// What woke the connection's loop.
enum Event {
    Mail(Option<ToConn>),
    Answer(Result<(), RouteError>),
    /// The commit at the front of `gates` is durable (or failed).
    Stored(Result<(), RouteError>),
    Written(std::io::Result<usize>),
    Read(std::io::Result<bool>),
    KeepAlive,
    /// The packet in progress is not whole by `--packet-timeout`.
    PacketTimeout,
    Deadline,
}

async fn next_answer(answers: &mut VecDeque<(Answer, Vec<Ack>)>) -> Result<(), RouteError> {
    match answers.front_mut() {
        Some((answer, _)) => answer.as_mut().await,
        None => std::future::pending().await,
    }
}

async fn next_gate(gates: &mut VecDeque<(Gate, BytesMut)>) -> Result<(), RouteError> {
    match gates.front_mut() {
        Some((gate, _)) => gate.as_mut().await,
        None => std::future::pending().await,
    }
}

fn encode_into(buf: &mut BytesMut, packet: Packet, peer: SocketAddr) {
    // Outgoing packets are bounded by what the broker accepted, so this cannot fail for a
    // size; if it did, dropping the packet is all there is to do.
    if let Err(e) = packet.write(buf, usize::MAX) {
        log::error!(target: LOG, "{peer}: encoding {}: {e}", packet_name(&packet));
    }
}

/// SUBSCRIBE, checked: at least one filter (MQTT-3.8.3-3), each one valid.
fn subscribe_request(subscribe: rumqttc::mqttbytes::v4::Subscribe) -> Result<Request, String> {
    if subscribe.filters.is_empty() {
        return Err("SUBSCRIBE without a filter".into());
    }
    let mut filters = Vec::with_capacity(subscribe.filters.len());
    for f in subscribe.filters {
        let filter =
            TopicFilter::parse(&f.path).map_err(|e| format!("SUBSCRIBE to `{}`: {e}", f.path))?;
        filters.push((filter, f.qos as Qos));
    }
    Ok(Request::Subscribe {
        pkid: subscribe.pkid,
        filters,
    })
}

/// UNSUBSCRIBE, checked: at least one filter (MQTT-3.10.3-2), each one valid.
fn unsubscribe_request(
    unsubscribe: rumqttc::mqttbytes::v4::Unsubscribe,
) -> Result<Request, String> {
    if unsubscribe.topics.is_empty() {
        return Err("UNSUBSCRIBE without a filter".into());
    }
    let mut filters = Vec::with_capacity(unsubscribe.topics.len());
    for topic in unsubscribe.topics {
        let filter =
            TopicFilter::parse(&topic).map_err(|e| format!("UNSUBSCRIBE from `{topic}`: {e}"))?;
        filters.push(filter);
    }
    Ok(Request::Unsubscribe {
        pkid: unsubscribe.pkid,
        filters,
    })
}

fn violation(reason: String) -> End {
    End::Abnormal(format!("protocol violation: {reason}"))
}

fn packet_timed_out(timeout: Duration) -> End {
    End::Abnormal(format!(
        "a packet not whole {timeout:?} after its first byte (--packet-timeout)"
    ))
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn to_qos(qos: Qos) -> QoS {
    match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn publish_packet(deliver: &Deliver, pkid: PacketId) -> Publish {
    let mut publish = Publish::from_bytes(
        deliver.msg.topic.clone(),
        to_qos(deliver.qos),
        deliver.msg.payload.clone(),
    );
    publish.pkid = pkid;
    publish.retain = deliver.retain;
    publish
}

fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}
