//! One client connection: the MQTT 3.1.1 session protocol over its socket.
//!
//! A connection is an actor in the plain sense — a task with its own state and one mailbox
//! ([`ToConn`]), spawned and watched by the sessions supervisor — written as an async loop over
//! four event sources: the socket's bytes, its mailbox, the answers to its publications, and its
//! keep-alive timer. Packets are decoded and encoded with rumqttc's `mqttbytes::v4` codec.
//!
//! **Inbound PUBLISH.** Every PUBLISH decoded from one read goes to the router as one [`Route`];
//! its acknowledgements (PUBACK, PUBREC) are sent when the router answers, in the order the
//! PUBLISH packets came (MQTT-4.6.0). While [`MAX_ROUTES`] answers are outstanding the socket is
//! not read: this is how a slow subscriber slows its publishers down (see [`crate::outbox`]).
//!
//! **Outbound PUBLISH.** Deliveries wait in `pending` until the client's window has room (at most
//! `max_inflight` QoS 1/2 messages unacknowledged) and the output buffer is below
//! [`OUT_HIGH`]; only then are they encoded, so a client that does not read holds its backlog
//! in the gauge the router watches, not in an ever-growing buffer.
//!
//! **Persistent sessions.** A delivery the store holds for the session (`stored`) is logged as
//! `Sent` when encoded and `Completed` when acknowledged, so after a restart the session resumes
//! exactly: unacknowledged messages again with DUP, PUBREL for QoS 2 half-done, the rest queued.
//!
//! **Shutdown.** [`ToConn::Quiesce`]: PUBLISH packets from the client are no longer taken (not
//! acknowledged, so the client sends them again after reconnecting); the connection answers
//! once its outstanding publications are routed. [`ToConn::Close`]: it sends what it holds,
//! waits for the acknowledgements in flight, and closes by the deadline whatever happens, so a
//! client that does not read cannot hold the shutdown up.
//!
//! **Violations** (malformed packets, a second CONNECT, a packet a server never receives, a
//! wildcard in a PUBLISH topic…) are logged with the peer's address and close this connection,
//! publishing its will (MQTT-4.8.0-1); nobody else notices.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_supervisor::ChildAddr;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, PubRel, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, Protocol, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::outbox::{Awaiting, ConnId, Deliver, Outbox, Outgoing, ToConn};
use crate::router::{
    Connect, Connected, Disconnected, Publication, Route, RouteError, Router, Subscribe,
    Unsubscribe, Will,
};
use crate::store::{Op, PacketId, Qos, StoreClient};
use crate::topic::{TopicFilter, TopicName};

const LOG: &str = "broker::connection";

/// Route answers a connection may wait for before it stops reading its socket.
pub const MAX_ROUTES: usize = 4;
/// Output bytes buffered for the socket before deliveries are left pending.
const OUT_HIGH: usize = 64 * 1024;
/// How long a new connection has to send CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most bytes one read takes from the socket.
const READ_CHUNK: usize = 64 * 1024;

/// The broker's limits, from its command line.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_packet_size: usize,
    pub max_inflight: usize,
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
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// DISCONNECT: a normal end, no will.
    Disconnect,
    /// Closed by the broker's shutdown: no will (the client did nothing wrong).
    Shutdown,
    /// Everything else publishes the will: the reason is logged.
    Abnormal(String),
}

type Answer = Pin<Box<dyn Future<Output = Result<(), RouteError>>>>;

/// Acknowledgements owed once an answer comes.
#[allow(clippy::enum_variant_names)] // MQTT's packet names
enum Ack {
    PubAck(PacketId),
    PubRec(PacketId),
    PubComp(PacketId),
}

/// Serves one TCP connection to its end.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    outbox: Outbox,
    mailbox: mpsc::UnboundedReceiver<ToConn>,
    shared: Arc<Shared>,
) {
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.into_split();
    let mut conn = Conn {
        id: outbox.conn,
        peer,
        shared,
        outbox,
        mailbox,
        reader,
        writer,
        input: BytesMut::with_capacity(4096),
        out: BytesMut::with_capacity(4096),
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
        ops: Vec::new(),
        quiesced: None,
        closing: None,
        draining: false,
        last_packet: Instant::now(),
        finished: false,
    };
    let end = match conn.handshake().await {
        // Clients may send packets right behind CONNECT without waiting for CONNACK (§3.1.4).
        Ok(true) => match conn.on_input().await {
            Some(end) => end,
            None => conn.run().await,
        },
        Ok(false) => End::Disconnect,
        Err(end) => end,
    };
    conn.finish(end).await;
}

struct Conn {
    id: ConnId,
    peer: SocketAddr,
    shared: Arc<Shared>,
    outbox: Outbox,
    mailbox: mpsc::UnboundedReceiver<ToConn>,
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    input: BytesMut,
    out: BytesMut,
    client: String,
    clean: bool,
    keep_alive: Option<Duration>,
    will: Option<Will>,
    /// The router knows this connection (it must hear when it ends).
    registered: bool,
    /// Deliveries not encoded yet; `true` when counted in the backlog gauge.
    pending: VecDeque<(Deliver, bool)>,
    /// Outbound QoS 1/2 flows in progress, by packet id.
    outgoing: HashMap<PacketId, Outgoing>,
    next_pkid: PacketId,
    /// Inbound QoS 2 packet ids routed and not released yet.
    inbound: BTreeSet<PacketId>,
    /// Answers awaited, oldest first, with the acknowledgements each releases.
    answers: VecDeque<(Answer, Vec<Ack>)>,
    /// Store ops to send at the end of this turn of the loop.
    ops: Vec<Op>,
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
        let connect = loop {
            match Packet::read(&mut self.input, self.shared.limits.max_packet_size) {
                Ok(Packet::Connect(connect)) => break connect,
                Ok(other) => {
                    return Err(violation(format!("{} before CONNECT", packet_name(&other))))
                }
                Err(CodecError::InsufficientBytes(_)) => {}
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
            let Conn {
                reader,
                input,
                mailbox,
                ..
            } = self;
            tokio::select! {
                more = tokio::time::timeout_at(until, read_into(reader, input)) => match more {
                    Ok(Ok(true)) => {}
                    Ok(Ok(false)) => return Err(End::Abnormal("closed before CONNECT".into())),
                    Ok(Err(e)) => return Err(End::Abnormal(format!("read: {e}"))),
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
            // MQTT-3.1.3-6: the server assigns one, unique for this process.
            self.client = format!("auto-{}-{}", std::process::id(), self.id);
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
        let answer = self
            .shared
            .router
            .send(Connect {
                client: self.client.clone(),
                clean: self.clean,
                outbox: self.outbox.clone(),
            })
            .await;
        // From here on the router has this connection in its books (or had and let go of it).
        self.registered = true;
        let connected = match answer {
            Ok(Ok(connected)) => connected,
            Ok(Err(e)) => {
                log::warn!(target: LOG, "{} `{}`: cannot connect: {e}", self.peer, self.client);
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
            self.pending
                .extend(restored.queue.into_iter().map(|d| (d, false)));
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
            self.encode_pending();
            self.send_ops();
            if self.quiesced.is_some() && self.answers.is_empty() {
                if let Some(done) = self.quiesced.take() {
                    let _ = done.send(());
                }
            }
            if let Some(deadline) = self.closing {
                // Idle: nothing to send, nothing in flight either way (the acknowledgements for
                // what the client published are sent once the router answers).
                let idle =
                    self.pending.is_empty() && self.outgoing.is_empty() && self.answers.is_empty();
                if (idle && self.out.is_empty()) || Instant::now() >= deadline {
                    return End::Shutdown;
                }
            }
            let keep_alive = self
                .keep_alive
                .map(|ka| tokio::time::Instant::from_std(self.last_packet + ka));
            let close_at = self.closing.map(tokio::time::Instant::from_std);
            let read = self.answers.len() < MAX_ROUTES;
            // While the broker itself does not read (flow control), the client's packets wait in
            // the socket: its silence is ours, not its own.
            let keep_alive = keep_alive.filter(|_| read);
            let event = {
                let Conn {
                    mailbox,
                    answers,
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
                    written = writer.write_buf(out), if !out.is_empty() => Event::Written(written),
                    more = read_into(reader, input), if read => Event::Read(more),
                    () = sleep_until(keep_alive), if keep_alive.is_some() => Event::KeepAlive,
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
                    if let Err(e) = answer {
                        return End::Abnormal(format!("routing failed: {e}"));
                    }
                    for ack in acks.into_iter().flatten() {
                        self.encode(match ack {
                            Ack::PubAck(pkid) => Packet::PubAck(PubAck::new(pkid)),
                            Ack::PubRec(pkid) => Packet::PubRec(PubRec::new(pkid)),
                            Ack::PubComp(pkid) => Packet::PubComp(PubComp::new(pkid)),
                        });
                    }
                }
                Event::Written(Ok(_)) => {}
                Event::Written(Err(e)) => return End::Abnormal(format!("write: {e}")),
                Event::Read(Ok(true)) => {
                    self.last_packet = Instant::now();
                    if let Some(end) = self.on_input().await {
                        return end;
                    }
                }
                Event::Read(Ok(false)) => {
                    // What came before the end is handled first: it may end with DISCONNECT.
                    if let Some(end) = self.on_input().await {
                        return end;
                    }
                    return End::Abnormal(
                        "the client closed the connection without DISCONNECT".into(),
                    );
                }
                Event::Read(Err(e)) => return End::Abnormal(format!("read: {e}")),
                // MQTT-3.1.2-24: nothing from the client for 1.5 × its keep-alive.
                Event::KeepAlive => return End::Abnormal("keep-alive timed out".into()),
                Event::Deadline => return End::Shutdown,
            }
        }
    }

    fn on_mail(&mut self, msg: ToConn) -> Option<End> {
        match msg {
            ToConn::Deliver(deliver) => self.pending.push_back((deliver, true)),
            ToConn::TakenOver => {
                return Some(End::Abnormal(
                    "taken over by a new connection with the same client id".into(),
                ))
            }
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

    /// Handles every whole packet in the input buffer.
    async fn on_input(&mut self) -> Option<End> {
        let max = self.shared.limits.max_packet_size;
        let mut publications = Vec::new();
        let mut acks = Vec::new();
        let end = loop {
            let packet = match Packet::read(&mut self.input, max) {
                Ok(packet) => packet,
                Err(CodecError::InsufficientBytes(_)) => break None,
                Err(e) => break Some(violation(format!("malformed packet: {e}"))),
            };
            match packet {
                Packet::Publish(publish) => {
                    if let Err(end) = self.on_publish(publish, &mut publications, &mut acks) {
                        break Some(end);
                    }
                }
                Packet::PubAck(ack) => self.acknowledged(ack.pkid, Awaiting::PubAck),
                Packet::PubRec(rec) => self.received(rec.pkid),
                Packet::PubComp(comp) => self.acknowledged(comp.pkid, Awaiting::PubComp),
                Packet::PubRel(rel) => {
                    // MQTT-4.3.3: forget the packet id, then PUBCOMP; a persistent session
                    // makes that durable first, or a crash could take the id for a duplicate.
                    // Publications read before it go to the store first (their InboundReceived
                    // before this InboundReleased).
                    self.flush_publications(&mut publications, &mut acks);
                    let known = self.inbound.remove(&rel.pkid);
                    let answer: Answer = if known && !self.clean {
                        let committed = self.shared.store.commit(vec![Op::InboundReleased {
                            client: self.client.clone(),
                            pkid: rel.pkid,
                        }]);
                        Box::pin(
                            async move { committed.await.map(|_| ()).map_err(|e| e.to_string()) },
                        )
                    } else {
                        Box::pin(async { Ok(()) })
                    };
                    self.answers
                        .push_back((answer, vec![Ack::PubComp(rel.pkid)]));
                }
                Packet::Subscribe(subscribe) => {
                    self.flush_publications(&mut publications, &mut acks);
                    if let Err(end) = self.on_subscribe(subscribe).await {
                        break Some(end);
                    }
                }
                Packet::Unsubscribe(unsubscribe) => {
                    self.flush_publications(&mut publications, &mut acks);
                    if let Err(end) = self.on_unsubscribe(unsubscribe).await {
                        break Some(end);
                    }
                }
                Packet::PingReq => self.encode(Packet::PingResp),
                Packet::Disconnect => break Some(End::Disconnect),
                Packet::Connect(_) => break Some(violation("a second CONNECT".into())),
                other => {
                    break Some(violation(format!(
                        "{} is not a packet a client sends",
                        packet_name(&other)
                    )))
                }
            }
        };
        // What was read before a violation or DISCONNECT is still routed (and acknowledged if
        // the connection lives long enough): the client sent it.
        self.flush_publications(&mut publications, &mut acks);
        end
    }

    fn on_publish(
        &mut self,
        publish: Publish,
        publications: &mut Vec<Publication>,
        acks: &mut Vec<Ack>,
    ) -> Result<(), End> {
        let topic = TopicName::parse(&publish.topic)
            .map_err(|e| violation(format!("PUBLISH to `{}`: {e}", publish.topic)))?;
        if self.draining {
            // Not taken, not acknowledged: the client sends it again when it reconnects.
            log::debug!(target: LOG, "{}: PUBLISH while draining, not taken", self.peer);
            return Ok(());
        }
        let qos = publish.qos as Qos;
        match qos {
            1 => acks.push(Ack::PubAck(publish.pkid)),
            2 => {
                acks.push(Ack::PubRec(publish.pkid));
                if !self.inbound.insert(publish.pkid) {
                    // MQTT-4.3.3-2: a PUBLISH sent again before PUBREL is not routed twice.
                    return Ok(());
                }
            }
            _ => {}
        }
        publications.push(Publication {
            topic,
            payload: publish.payload,
            qos,
            retain: publish.retain,
            pkid: publish.pkid,
        });
        Ok(())
    }

    /// Sends the publications read so far to the router, with the acknowledgements they release.
    fn flush_publications(&mut self, publications: &mut Vec<Publication>, acks: &mut Vec<Ack>) {
        if publications.is_empty() && acks.is_empty() {
            return;
        }
        let acks = std::mem::take(acks);
        if publications.is_empty() {
            self.answers.push_back((Box::pin(async { Ok(()) }), acks));
            return;
        }
        let (reply, answer) = oneshot::channel();
        let route = Route {
            from: self.client.clone(),
            publications: std::mem::take(publications),
            reply,
        };
        let answer: Answer = match self.shared.router.do_send(route) {
            Ok(()) => Box::pin(async move {
                answer
                    .await
                    .unwrap_or_else(|_| Err("the router stopped".to_owned()))
            }),
            Err(_) => Box::pin(async { Err("the router is not running".to_owned()) }),
        };
        self.answers.push_back((answer, acks));
    }

    async fn on_subscribe(
        &mut self,
        subscribe: rumqttc::mqttbytes::v4::Subscribe,
    ) -> Result<(), End> {
        if subscribe.filters.is_empty() {
            return Err(violation("SUBSCRIBE without a filter".into()));
        }
        let mut filters = Vec::with_capacity(subscribe.filters.len());
        for f in subscribe.filters {
            let filter = TopicFilter::parse(&f.path)
                .map_err(|e| violation(format!("SUBSCRIBE to `{}`: {e}", f.path)))?;
            filters.push((filter, f.qos as Qos));
        }
        let codes = filters
            .iter()
            .map(|(_, qos)| SubscribeReasonCode::Success(to_qos(*qos)))
            .collect();
        let answer = self
            .shared
            .router
            .send(Subscribe {
                client: self.client.clone(),
                filters,
            })
            .await;
        router_done(answer, "subscribing")?;
        self.encode(Packet::SubAck(SubAck::new(subscribe.pkid, codes)));
        Ok(())
    }

    async fn on_unsubscribe(
        &mut self,
        unsubscribe: rumqttc::mqttbytes::v4::Unsubscribe,
    ) -> Result<(), End> {
        if unsubscribe.topics.is_empty() {
            return Err(violation("UNSUBSCRIBE without a filter".into()));
        }
        let mut filters = Vec::with_capacity(unsubscribe.topics.len());
        for topic in unsubscribe.topics {
            let filter = TopicFilter::parse(&topic)
                .map_err(|e| violation(format!("UNSUBSCRIBE from `{topic}`: {e}")))?;
            filters.push(filter);
        }
        let answer = self
            .shared
            .router
            .send(Unsubscribe {
                client: self.client.clone(),
                filters,
            })
            .await;
        router_done(answer, "unsubscribing")?;
        self.encode(Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)));
        Ok(())
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
                if out.stored {
                    self.ops.push(Op::Received {
                        client: self.client.clone(),
                        pkid,
                    });
                }
                self.encode(Packet::PubRel(PubRel::new(pkid)));
            }
            Awaiting::PubComp => self.encode(Packet::PubRel(PubRel::new(pkid))),
            Awaiting::PubAck => {
                log::debug!(target: LOG, "{}: PUBREC for QoS 1 message {pkid}", self.peer)
            }
        }
    }

    /// Encodes pending deliveries while the client's window and the output buffer have room.
    fn encode_pending(&mut self) {
        let mut counted = 0;
        while self.out.len() < OUT_HIGH {
            let Some((deliver, _)) = self.pending.front() else {
                break;
            };
            if deliver.qos > 0 && self.outgoing.len() >= self.shared.limits.max_inflight {
                break;
            }
            let Some((deliver, was_counted)) = self.pending.pop_front() else {
                break;
            };
            counted += was_counted as usize;
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
            self.encode(Packet::Publish(publish_packet(&deliver, pkid)));
            if self.draining {
                self.shared
                    .stats
                    .delivered_in_drain
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        if counted > 0 {
            self.outbox.backlog.sent(counted);
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

    fn send_ops(&mut self) {
        if !self.ops.is_empty() {
            // Not awaited: these only record progress; the store takes them in order.
            drop(self.shared.store.commit(std::mem::take(&mut self.ops)));
        }
    }

    fn encode(&mut self, packet: Packet) {
        // Outgoing packets are bounded by what the broker accepted, so this cannot fail for a
        // size; if it did, dropping the packet is all there is to do.
        if let Err(e) = packet.write(&mut self.out, usize::MAX) {
            log::error!(target: LOG, "{}: encoding {}: {e}", self.peer, packet_name(&packet));
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
            End::Abnormal(reason) => {
                log::info!(target: LOG, "{} `{}`: connection closed: {reason}", self.peer, self.client);
                self.will.take()
            }
        };
        if matches!(end, End::Shutdown | End::Disconnect) {
            // A last flush, never past the drain's deadline.
            let mut limit = Duration::from_millis(200);
            if let Some(deadline) = self.closing {
                limit = limit.min(deadline.saturating_duration_since(Instant::now()));
            }
            let _ = tokio::time::timeout(limit, self.flush()).await;
        }
        let _ = self.writer.shutdown().await;
        self.outbox.backlog.close();
        if self.registered {
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
    Written(std::io::Result<usize>),
    Read(std::io::Result<bool>),
    KeepAlive,
    Deadline,
}

async fn next_answer(answers: &mut VecDeque<(Answer, Vec<Ack>)>) -> Result<(), RouteError> {
    match answers.front_mut() {
        Some((answer, _)) => answer.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Reads what the socket has into `input`; `Ok(false)` at its end.
async fn read_into(reader: &mut OwnedReadHalf, input: &mut BytesMut) -> std::io::Result<bool> {
    input.reserve(READ_CHUNK);
    Ok(reader.read_buf(input).await? > 0)
}

/// The router's answer to a request the connection waited for: done, or why the connection ends.
fn router_done(
    answer: Result<Result<(), RouteError>, actix::MailboxError>,
    what: &str,
) -> Result<(), End> {
    match answer {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(End::Abnormal(format!("{what} failed: {e}"))),
        Err(e) => Err(End::Abnormal(format!("{what} failed: {e}"))),
    }
}

fn violation(reason: String) -> End {
    End::Abnormal(format!("protocol violation: {reason}"))
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
