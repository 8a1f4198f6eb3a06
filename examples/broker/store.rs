//! The broker's store: the state that must survive a restart, kept in an append-only log.
//!
//! # Design
//!
//! **What it owns.** Everything the broker promises beyond one connection: persistent sessions
//! (their subscriptions, the messages they are owed, the QoS 1/2 deliveries in flight to them, the
//! QoS 2 packet ids their publishers sent and have not released yet) and retained messages. The
//! model is [`State`]; every change to it is an [`Op`], and [`State::apply`] is a pure function
//! of the two, so the state is exactly what replaying the log produces. A message body is stored
//! once ([`State::message`]) and referenced by id from every queue, in-flight slot and retained
//! topic that holds it, with a reference count: a message for 100 offline sessions is one body
//! on disk and in memory, freed when its last reference goes.
//!
//! **The log records effects, not decisions.** The one policy, the per-session quota
//! ([`Quota`]: messages and bytes waiting, and what a session over it loses), is applied *before*
//! writing, by [`State::admit`]: it turns a publication into the ops that carry it out
//! (`DropQueued` for each waiting entry pushed out, then the `Publish` with the recipients that
//! still get it). Only the result is logged, so replay does not depend on the quota the broker
//! runs with today.
//!
//! **Full queues.** When a new entry would take a session's queue over its quota, the oldest QoS 0
//! entry (already queued, or earlier in the same publication) makes room; a new QoS 0 message
//! with no older QoS 0 entry to displace is itself dropped. With no QoS 0 entry left, the quota's
//! [`Overflow`] decides: the new message is not queued for that session, or its oldest entries go.
//! A message bigger than the byte quota is never queued. Either way only that session loses
//! messages: a session over its quota never refuses or holds a publisher, whose other recipients
//! get the message as usual. Each loss is counted and logged once per episode, naming the session
//! ([`Drops`], shared with the router and the connections, which apply the same quota to
//! connected sessions). The quota is for *offline* sessions: a connected one
//! ([`StoreClient::set_online`]) has none here, because the router and its connection apply it to
//! what the connection has not sent yet, and an entry it was handed must stay until
//! acknowledged.
//!
//! **Expiry.** When a persistent session goes offline the router logs the time ([`Op::LastSeen`]),
//! so a session that stays away longer than `--persistent-client-expiration` is dropped however
//! often the broker restarts meanwhile.
//!
//! **A rejected op** is a broker bug (the ops contradict the state). The request stops there —
//! what follows may depend on it (the packet id of a QoS 2 message whose publication was
//! refused) — and the reply names it; the router then does not acknowledge the request (its
//! publisher sends it again) and restarts itself, reloading from the store, since its memory
//! (retained messages, routed before the store answered) may be ahead of what the store has.
//!
//! **A failed write** (a full disk, typically) *degrades* the store rather than ending it: the
//! file is cut back to its last durable byte, memory is put back to what the log holds (a
//! replay), the requests of the lost batch are answered [`StoreError::WriteFailed`], and from then
//! on every commit is refused up front ([`StoreError::NoDisk`], nothing applied) while reads go
//! on. The condition is logged once and shared ([`StoreStats::disk`]): the router refuses what
//! needs the disk before trying — persistent sessions, QoS 1/2 for them, retained messages — and
//! lets everything else flow. Every second the router asks the store to [`probe`](Store::probe)
//! with a record that changes nothing; the first that is written and synced ends the episode.
//! Only a failure the store cannot undo (the file cannot be cut back or read again, a record
//! cannot be encoded, a checked op does not apply) *poisons* it: every request is refused, and the
//! worker ends as failed ([`BlockingWorker::failed`]) so that the tree restarts it — and the
//! router, which reloads what is durable.
//!
//! **File format** (`<data dir>/store.log`, all integers little-endian):
//!
//! ```text
//! header   "MQTTSTOR" (8 bytes) | version: u32 = 1
//! record   len: u32 | crc: u32 = CRC32(len bytes ++ payload) | payload: len bytes
//! payload  postcard encoding of Vec<Op>: the ops of one commit request (or a snapshot chunk)
//! ```
//!
//! A record holds one request's ops, so a request is on disk whole or not at all: a torn write
//! can never leave a QoS 2 message routed but its packet id unrecorded. Why postcard: a serde
//! format whose wire format is specified and frozen for 1.x (a log written today must read in
//! years), compact (varints: a typical op is tens of bytes), maintained; bincode 1.x is in
//! maintenance only. The CRC is crc32fast's (IEEE CRC32, SIMD); it covers the length too, so a
//! flipped length bit is caught rather than followed.
//!
//! **Recovery.** Read records from the start; apply each. The first record that is torn or corrupt
//! (a length beyond the end of the file or beyond [`MAX_RECORD`], a CRC mismatch, a payload that
//! does not decode) ends the replay: a WARN names the offset and the number of bytes skipped, the
//! file is truncated there and synced, and the store opens with what came before. Records are
//! fsynced in order and a reply goes out only after its record's fsync, so a crash can only tear
//! records nobody was told were durable; anything after a corrupt record cannot be trusted to
//! follow it, so it goes too. A store never refuses to start over its log's tail. It does refuse
//! a file that is not its own (wrong magic or version), naming the path: that is not a crash
//! artefact, and truncating it could destroy someone's data.
//!
//! **Group commit.** [`Store::commit`] applies a request and stages its record in memory;
//! [`Store::sync`] writes everything staged with one `write` and one `fsync` (`sync_data`). The
//! tree child, [`StoreWorker`], replies to a request only after the sync that covers it, and
//! syncs only when no request is waiting right behind the one it just handled (or a batch
//! reached [`StoreConfig::max_batch`]): under load, requests pile up during each fsync and the
//! next sync covers them all; idle, a request is synced at once, with no timer and no added
//! latency. How the worker knows what is behind it is explained at [`StoreWorker`].
//!
//! **Compaction.** When the log is at least [`StoreConfig::compact_min_bytes`] and at least
//! [`StoreConfig::compact_ratio`] times the size of the last snapshot (or of the log at open), or
//! the stored messages have shrunk below `1/compact_ratio` of what they were then (a big queue was
//! delivered: the log would otherwise keep its size for good), the live state is written as ops
//! ([`State::snapshot`]) to `store.log.compact`, fsynced, renamed over `store.log` (atomic), and the directory fsynced. A crash before the rename leaves the old log
//! complete (and the temporary file, which the next open deletes); after it, the new one. A log at
//! least `compact_min_bytes` long is also compacted at open. The log is created the same way
//! (an empty snapshot renamed into place), so it never exists without its header. The rule is
//! the one Redis uses for its append-only file: relative growth bounds the space overhead to
//! the ratio, the minimum keeps a small store from rewriting itself on every batch.
//!
//! **Ownership.** One store per data dir: a lock on `<data dir>/LOCK` (held while the store is
//! open) keeps out a second broker process and a previous instance of this one still finishing
//! a write (an aborted worker's thread; opening waits [`StoreConfig::lock_wait`] for it). The
//! worker closes the store in `on_drained`, before it acknowledges, so after a graceful stop the
//! lock is free at once.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::future::Future;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_supervisor::{BlockingAddr, BlockingSpec, BlockingWorker, ChildSpec};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::quota::{Drops, Overflow, Quota};

/// The log target of everything the store says.
const LOG: &str = "broker::store";

/// The log's file name in the data dir.
pub const LOG_FILE: &str = "store.log";
/// Where a compaction writes the new log before renaming it over the old one.
pub const COMPACT_FILE: &str = "store.log.compact";
/// Locked while a store has the data dir open.
pub const LOCK_FILE: &str = "LOCK";

const MAGIC: &[u8; 8] = b"MQTTSTOR";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 12;
/// A record's frame: length and CRC before the payload.
const FRAME_LEN: u64 = 8;
/// The largest record payload accepted, a sanity bound against a corrupt length (an MQTT
/// payload is at most 256 MiB).
pub const MAX_RECORD: u32 = 512 << 20;
/// Snapshot records are cut at about this size, so recovery never needs one huge allocation.
const SNAPSHOT_CHUNK: usize = 1 << 20;

/// A message body's id, assigned by the broker (see [`State::next_message_id`]).
pub type MsgId = u64;
/// An MQTT packet identifier (non-zero for QoS 1 and 2).
pub type PacketId = u16;
/// An MQTT quality of service: 0, 1 or 2.
pub type Qos = u8;

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// A published message, stored once however many sessions it is queued for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub id: MsgId,
    pub topic: String,
    pub payload: Bytes,
    /// The QoS it was published with (each recipient's entry has its own, at most this).
    pub qos: Qos,
    /// Published with the retain flag: a [`Op::Publish`] of it also sets (or, with an empty
    /// payload, deletes) the retained message of its topic.
    pub retain: bool,
}

impl Message {
    /// What it costs against the byte quota (see [`Quota`]): its topic and its payload.
    pub fn size(&self) -> u64 {
        (self.topic.len() + self.payload.len()) as u64
    }
}

/// One recipient of a [`Op::Publish`]: a persistent session and the QoS it gets the message at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub client: String,
    pub qos: Qos,
}

/// A message owed to a session and not sent yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queued {
    pub msg: MsgId,
    pub qos: Qos,
    /// Send with the retain flag set (a retained message sent because of a new subscription).
    pub retain: bool,
}

/// A QoS 1 or 2 message sent to a session and not acknowledged yet (no PUBACK, or no PUBREC).
/// On reconnect it is sent again, with DUP, under the same packet id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unacked {
    pub pkid: PacketId,
    pub msg: MsgId,
    pub qos: Qos,
}

/// A persistent session (a client that connected with `clean_session = false`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Topic filter → granted QoS.
    subscriptions: BTreeMap<String, Qos>,
    /// Messages owed, oldest first.
    queue: VecDeque<Queued>,
    /// Outbound QoS 1/2 messages awaiting PUBACK/PUBREC, in the order they were sent (the order
    /// MQTT requires for resending them).
    unacked: Vec<Unacked>,
    /// Outbound QoS 2 packet ids whose PUBREC came and whose PUBCOMP has not: PUBREL is owed.
    /// In PUBREC order (the order MQTT requires for resending PUBREL).
    released: Vec<PacketId>,
    /// Inbound QoS 2 packet ids received from this client (routed, PUBREC sent) and not released
    /// by its PUBREL yet: a PUBLISH arriving again with one of them is not routed again.
    inbound: BTreeSet<PacketId>,
}

impl Session {
    pub fn subscriptions(&self) -> &BTreeMap<String, Qos> {
        &self.subscriptions
    }

    pub fn queue(&self) -> &VecDeque<Queued> {
        &self.queue
    }

    pub fn unacked(&self) -> &[Unacked] {
        &self.unacked
    }

    pub fn released(&self) -> &[PacketId] {
        &self.released
    }

    pub fn inbound(&self) -> &BTreeSet<PacketId> {
        &self.inbound
    }

    /// True if `pkid` names an outbound message in flight (so it cannot be reused yet).
    pub fn outbound_in_use(&self, pkid: PacketId) -> bool {
        self.unacked.iter().any(|u| u.pkid == pkid) || self.released.contains(&pkid)
    }

    /// The bodies this session holds a reference to, one per reference.
    fn references(&self) -> impl Iterator<Item = MsgId> + '_ {
        let queued = self.queue.iter().map(|q| q.msg);
        queued.chain(self.unacked.iter().map(|u| u.msg))
    }
}

/// A stored body and how many queue entries, in-flight slots and retained topics refer to it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Body {
    msg: Message,
    refs: u64,
}

/// Everything the store keeps: the result of applying the log's ops in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    sessions: BTreeMap<String, Session>,
    messages: BTreeMap<MsgId, Body>,
    /// Topic → the body of its retained message.
    retained: BTreeMap<String, MsgId>,
    /// Above every message id ever applied.
    next_message_id: MsgId,
    /// Per session, what the quota looks at in its queue. Derived from the queues, never logged.
    waiting: BTreeMap<String, Waiting>,
    /// When a session was last seen connected (Unix milliseconds), for expiry.
    last_seen: BTreeMap<String, u64>,
    /// Topic and payload bytes of the stored bodies: the bulk of what a snapshot writes, which
    /// tells compaction when the live state has shrunk.
    body_bytes: u64,
}

/// A change to the [`State`]: what one log record holds a list of.
///
/// The broker sends the ops of the first group; the second group is what a compaction writes
/// (a snapshot is the shortest log that rebuilds the live state). Ops on a session need it to
/// exist ([`Op::OpenSession`] first). A request's ops are applied in order, and a request is
/// logged whole or not at all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Creates a persistent session, or keeps the existing one (a resumed session); either way
    /// it is connected now, so when it was last seen is forgotten.
    OpenSession { client: String },
    /// Discards a session and everything it holds (a connect with `clean_session = true`).
    DropSession { client: String },
    /// Adds or replaces a subscription.
    Subscribe {
        client: String,
        filter: String,
        qos: Qos,
    },
    /// Removes a subscription (nothing happens if there is none).
    Unsubscribe { client: String, filter: String },
    /// Stores a message and queues it for each recipient, in order; with `msg.retain`, it also
    /// becomes its topic's retained message (an empty payload deletes that instead). The body is
    /// kept only while something refers to it. Goes through [`State::admit`] (the cap).
    Publish { msg: Message, to: Vec<Delivery> },
    /// Queues a stored message for one more session (a retained message for a new subscription
    /// of a persistent session, to be sent with `retain`). Goes through [`State::admit`].
    Enqueue {
        client: String,
        msg: MsgId,
        qos: Qos,
        retain: bool,
    },
    /// Removes a queue entry for `msg` from the session's queue — its oldest QoS 0 entry for
    /// `msg` if it has one, else its oldest — a drop for a session over its quota (written by
    /// [`State::admit`], or by a connection trimming what it has not sent).
    DropQueued { client: String, msg: MsgId },
    /// The oldest queue entry for `msg` was sent: a QoS 0 entry is done; a QoS 1/2 entry is now in
    /// flight under `pkid` (ignored for QoS 0), awaiting PUBACK or PUBREC.
    Sent {
        client: String,
        msg: MsgId,
        pkid: PacketId,
    },
    /// PUBREC for an outbound QoS 2 message: the subscriber has it, the body is released, PUBREL
    /// is owed until PUBCOMP. A repeated PUBREC changes nothing.
    Received { client: String, pkid: PacketId },
    /// PUBACK (QoS 1) or PUBCOMP (QoS 2): the outbound message `pkid` is done.
    Completed { client: String, pkid: PacketId },
    /// An inbound QoS 2 PUBLISH from this client was accepted (log it with the `Publish` that
    /// routes it, in the same request, and send PUBREC after the reply).
    InboundReceived { client: String, pkid: PacketId },
    /// PUBREL for an inbound QoS 2 packet id: forget it (then send PUBCOMP).
    InboundReleased { client: String, pkid: PacketId },

    /// Snapshot: message ids continue from here.
    NextMessageId { next: MsgId },
    /// Snapshot: a body, referenced by the `Retained` and `Session` ops that follow it.
    Message(Message),
    /// Snapshot: a stored body is its topic's retained message.
    Retained { msg: MsgId },
    /// Snapshot: a whole session (replacing any of that name); its bodies come before it.
    Session { client: String, session: Session },
    /// The session went offline at `at` (Unix milliseconds); its expiry counts from there. Also
    /// a snapshot op, after the session it names.
    LastSeen { client: String, at: u64 },
}

/// Why an op does not apply to the state. Applying it changed nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyError {
    UnknownSession(String),
    UnknownMessage(MsgId),
    /// A body with this id is stored already.
    DuplicateMessage(MsgId),
    NotQueued {
        client: String,
        msg: MsgId,
    },
    /// Outbound: in flight already; inbound: received already.
    PacketIdInUse {
        client: String,
        pkid: PacketId,
    },
    UnknownPacketId {
        client: String,
        pkid: PacketId,
    },
    /// PUBREC for a QoS 1 message.
    NotQos2 {
        client: String,
        pkid: PacketId,
    },
    /// Packet id 0 where QoS 1/2 needs one.
    ZeroPacketId {
        client: String,
    },
    InvalidQos(Qos),
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApplyError::UnknownSession(c) => write!(f, "no session `{c}`"),
            ApplyError::UnknownMessage(id) => write!(f, "no stored message {id}"),
            ApplyError::DuplicateMessage(id) => write!(f, "message {id} is stored already"),
            ApplyError::NotQueued { client, msg } => {
                write!(f, "message {msg} is not queued for `{client}`")
            }
            ApplyError::PacketIdInUse { client, pkid } => {
                write!(f, "packet id {pkid} of `{client}` is in use")
            }
            ApplyError::UnknownPacketId { client, pkid } => {
                write!(f, "packet id {pkid} of `{client}` is not in flight")
            }
            ApplyError::NotQos2 { client, pkid } => {
                write!(f, "packet id {pkid} of `{client}` is a QoS 1 message")
            }
            ApplyError::ZeroPacketId { client } => {
                write!(f, "packet id 0 for a QoS 1/2 message to `{client}`")
            }
            ApplyError::InvalidQos(q) => write!(f, "invalid QoS {q}"),
        }
    }
}

impl std::error::Error for ApplyError {}

/// What [`State::admit`] made of one requested op.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    /// The ops to apply and log, in order (empty when the op came to nothing, e.g. a message
    /// whose only recipient had no room).
    pub ops: Vec<Op>,
    /// Messages dropped per session over its quota (waiting ones pushed out, or new ones not
    /// queued).
    pub dropped: Vec<(String, usize)>,
}

/// A packet id about to be taken: not zero, not `in_use`.
fn check_new_pkid(client: &str, pkid: PacketId, in_use: bool) -> Result<(), ApplyError> {
    if pkid == 0 {
        Err(ApplyError::ZeroPacketId {
            client: client.to_owned(),
        })
    } else if in_use {
        Err(ApplyError::PacketIdInUse {
            client: client.to_owned(),
            pkid,
        })
    } else {
        Ok(())
    }
}

fn check_qos(qos: Qos) -> Result<(), ApplyError> {
    if qos <= 2 {
        Ok(())
    } else {
        Err(ApplyError::InvalidQos(qos))
    }
}

/// Adds a reference to a stored body.
fn hold(messages: &mut BTreeMap<MsgId, Body>, id: MsgId) {
    if let Some(body) = messages.get_mut(&id) {
        body.refs += 1;
    }
}

/// What a stored body costs against the byte quota (0 if it is not stored).
fn body_size(messages: &BTreeMap<MsgId, Body>, id: MsgId) -> u64 {
    messages.get(&id).map_or(0, |b| b.msg.size())
}

/// What the quota looks at in one session's queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Waiting {
    /// Topic and payload bytes of the entries.
    bytes: u64,
    /// Entries at QoS 0: the first to go when room is needed (none: no need to look for one).
    qos0: usize,
}

impl Waiting {
    fn add(&mut self, size: u64, qos: Qos) {
        self.bytes += size;
        self.qos0 += usize::from(qos == 0);
    }

    fn remove(&mut self, size: u64, qos: Qos) {
        self.bytes = self.bytes.saturating_sub(size);
        self.qos0 = self.qos0.saturating_sub(usize::from(qos == 0));
    }
}

fn waiting_mut<'a>(waiting: &'a mut BTreeMap<String, Waiting>, client: &str) -> &'a mut Waiting {
    waiting.entry(client.to_owned()).or_default()
}

/// Drops a reference to a stored body, and the body with its last one (its size leaves
/// `body_bytes`).
fn release(messages: &mut BTreeMap<MsgId, Body>, body_bytes: &mut u64, id: MsgId) {
    if let Some(body) = messages.get_mut(&id) {
        body.refs = body.refs.saturating_sub(1);
        if body.refs == 0 {
            if let Some(body) = messages.remove(&id) {
                *body_bytes = body_bytes.saturating_sub(body.msg.size());
            }
        }
    }
}

impl State {
    // --- queries -------------------------------------------------------------------------------

    pub fn session(&self, client: &str) -> Option<&Session> {
        self.sessions.get(client)
    }

    pub fn sessions(&self) -> impl Iterator<Item = (&str, &Session)> {
        self.sessions.iter().map(|(c, s)| (c.as_str(), s))
    }

    /// A stored body (referenced by some queue entry, in-flight slot or retained topic).
    pub fn message(&self, id: MsgId) -> Option<&Message> {
        self.messages.get(&id).map(|b| &b.msg)
    }

    /// How many references hold body `id` (0: not stored).
    pub fn references(&self, id: MsgId) -> u64 {
        self.messages.get(&id).map_or(0, |b| b.refs)
    }

    /// How many bodies are stored.
    pub fn message_count(&self) -> usize {
        self.messages.len()
    }

    /// Topic and payload bytes of the stored bodies.
    pub fn body_bytes(&self) -> u64 {
        self.body_bytes
    }

    /// The retained message of `topic`.
    pub fn retained(&self, topic: &str) -> Option<&Message> {
        self.retained.get(topic).and_then(|id| self.message(*id))
    }

    /// Every retained message, by topic.
    pub fn all_retained(&self) -> impl Iterator<Item = &Message> {
        self.retained.values().filter_map(|id| self.message(*id))
    }

    /// The bytes of `client`'s queue, as the byte quota counts them.
    pub fn queued_bytes(&self, client: &str) -> u64 {
        self.waiting.get(client).map_or(0, |w| w.bytes)
    }

    /// When `client`'s session was last seen connected (Unix milliseconds), if that was logged.
    pub fn last_seen(&self, client: &str) -> Option<u64> {
        self.last_seen.get(client).copied()
    }

    /// The first message id never used: the broker's id counter starts here after a restart.
    pub fn next_message_id(&self) -> MsgId {
        self.next_message_id
    }

    fn session_of(&self, client: &str) -> Result<&Session, ApplyError> {
        self.sessions
            .get(client)
            .ok_or_else(|| ApplyError::UnknownSession(client.to_owned()))
    }

    fn body(&self, id: MsgId) -> Result<&Body, ApplyError> {
        self.messages.get(&id).ok_or(ApplyError::UnknownMessage(id))
    }

    // --- applying ops --------------------------------------------------------------------------

    /// Applies `op`, or changes nothing and says why not. Pure: the state after depends only on
    /// the state before and the op, which is what makes the log replayable.
    pub fn apply(&mut self, op: &Op) -> Result<(), ApplyError> {
        self.check(op)?;
        self.apply_checked(op);
        Ok(())
    }

    /// Whether `op` applies, without applying it.
    fn check(&self, op: &Op) -> Result<(), ApplyError> {
        match op {
            Op::OpenSession { .. } | Op::DropSession { .. } | Op::NextMessageId { .. } => Ok(()),
            Op::Subscribe { client, qos, .. } => {
                self.session_of(client)?;
                check_qos(*qos)
            }
            Op::Unsubscribe { client, .. } => self.session_of(client).map(drop),
            Op::Publish { msg, to } => {
                check_qos(msg.qos)?;
                if self.messages.contains_key(&msg.id) {
                    return Err(ApplyError::DuplicateMessage(msg.id));
                }
                for d in to {
                    self.session_of(&d.client)?;
                    check_qos(d.qos)?;
                }
                Ok(())
            }
            Op::Enqueue {
                client, msg, qos, ..
            } => {
                self.session_of(client)?;
                self.body(*msg)?;
                check_qos(*qos)
            }
            Op::DropQueued { client, msg } => {
                let session = self.session_of(client)?;
                if session.queue.iter().any(|q| q.msg == *msg) {
                    Ok(())
                } else {
                    Err(ApplyError::NotQueued {
                        client: client.clone(),
                        msg: *msg,
                    })
                }
            }
            Op::Sent { client, msg, pkid } => {
                let session = self.session_of(client)?;
                let entry = session
                    .queue
                    .iter()
                    .find(|q| q.msg == *msg)
                    .ok_or_else(|| ApplyError::NotQueued {
                        client: client.clone(),
                        msg: *msg,
                    })?;
                if entry.qos == 0 {
                    Ok(())
                } else {
                    check_new_pkid(client, *pkid, session.outbound_in_use(*pkid))
                }
            }
            Op::Received { client, pkid } => {
                let session = self.session_of(client)?;
                match session.unacked.iter().find(|u| u.pkid == *pkid) {
                    Some(u) if u.qos == 2 => Ok(()),
                    Some(_) => Err(ApplyError::NotQos2 {
                        client: client.clone(),
                        pkid: *pkid,
                    }),
                    None if session.released.contains(pkid) => Ok(()), // a repeated PUBREC
                    None => Err(ApplyError::UnknownPacketId {
                        client: client.clone(),
                        pkid: *pkid,
                    }),
                }
            }
            Op::Completed { client, pkid } => {
                if self.session_of(client)?.outbound_in_use(*pkid) {
                    Ok(())
                } else {
                    Err(ApplyError::UnknownPacketId {
                        client: client.clone(),
                        pkid: *pkid,
                    })
                }
            }
            Op::InboundReceived { client, pkid } => {
                let session = self.session_of(client)?;
                check_new_pkid(client, *pkid, session.inbound.contains(pkid))
            }
            Op::InboundReleased { client, pkid } => {
                if self.session_of(client)?.inbound.contains(pkid) {
                    Ok(())
                } else {
                    Err(ApplyError::UnknownPacketId {
                        client: client.clone(),
                        pkid: *pkid,
                    })
                }
            }
            Op::Message(msg) => {
                check_qos(msg.qos)?;
                if self.messages.contains_key(&msg.id) {
                    Err(ApplyError::DuplicateMessage(msg.id))
                } else {
                    Ok(())
                }
            }
            Op::Retained { msg } => self.body(*msg).map(drop),
            Op::Session { session, .. } => {
                for id in session.references() {
                    self.body(id)?;
                }
                Ok(())
            }
            Op::LastSeen { client, .. } => self.session_of(client).map(drop),
        }
    }

    /// Applies an op that [`check`](Self::check) accepted.
    fn apply_checked(&mut self, op: &Op) {
        let messages = &mut self.messages;
        // Every op below that names a session was checked to have one.
        let sessions = &mut self.sessions;
        match op {
            Op::OpenSession { client } => {
                sessions.entry(client.clone()).or_default();
                // Connected again: its expiry counts from its next going away, not its last.
                self.last_seen.remove(client);
            }
            Op::DropSession { client } => {
                if let Some(session) = sessions.remove(client) {
                    session
                        .references()
                        .for_each(|id| release(messages, &mut self.body_bytes, id));
                }
                self.waiting.remove(client);
                self.last_seen.remove(client);
            }
            Op::Subscribe {
                client,
                filter,
                qos,
            } => {
                if let Some(s) = sessions.get_mut(client) {
                    s.subscriptions.insert(filter.clone(), *qos);
                }
            }
            Op::Unsubscribe { client, filter } => {
                if let Some(s) = sessions.get_mut(client) {
                    s.subscriptions.remove(filter);
                }
            }
            Op::Publish { msg, to } => {
                self.next_message_id = self.next_message_id.max(msg.id.saturating_add(1));
                let mut refs = 0;
                if msg.retain {
                    let previous = if msg.payload.is_empty() {
                        self.retained.remove(&msg.topic)
                    } else {
                        refs += 1;
                        self.retained.insert(msg.topic.clone(), msg.id)
                    };
                    if let Some(previous) = previous {
                        release(messages, &mut self.body_bytes, previous);
                    }
                }
                let size = msg.size();
                for d in to {
                    if let Some(s) = sessions.get_mut(&d.client) {
                        s.queue.push_back(Queued {
                            msg: msg.id,
                            qos: d.qos,
                            retain: false,
                        });
                        refs += 1;
                        waiting_mut(&mut self.waiting, &d.client).add(size, d.qos);
                    }
                }
                if refs > 0 {
                    let msg = msg.clone();
                    self.body_bytes += size;
                    messages.insert(msg.id, Body { msg, refs });
                }
            }
            Op::Enqueue {
                client,
                msg,
                qos,
                retain,
            } => {
                if let Some(s) = sessions.get_mut(client) {
                    s.queue.push_back(Queued {
                        msg: *msg,
                        qos: *qos,
                        retain: *retain,
                    });
                    hold(messages, *msg);
                    waiting_mut(&mut self.waiting, client).add(body_size(messages, *msg), *qos);
                }
            }
            Op::DropQueued { client, msg } => {
                if let Some(s) = sessions.get_mut(client) {
                    // The oldest entry for `msg`, unless it is not QoS 0 and a QoS 0 one is
                    // there too (looked for only when the session has QoS 0 entries at all).
                    let first = s.queue.iter().position(|q| q.msg == *msg);
                    let has_qos0 = self.waiting.get(client).is_some_and(|w| w.qos0 > 0);
                    let qos0 = match first {
                        Some(i) if s.queue[i].qos != 0 && has_qos0 => s
                            .queue
                            .iter()
                            .skip(i)
                            .position(|q| q.msg == *msg && q.qos == 0)
                            .map(|at| at + i),
                        _ => None,
                    };
                    if let Some(i) = qos0.or(first) {
                        if let Some(entry) = s.queue.remove(i) {
                            let size = body_size(messages, *msg);
                            waiting_mut(&mut self.waiting, client).remove(size, entry.qos);
                            release(messages, &mut self.body_bytes, *msg);
                        }
                    }
                }
            }
            Op::Sent { client, msg, pkid } => {
                if let Some(s) = sessions.get_mut(client) {
                    let Some(i) = s.queue.iter().position(|q| q.msg == *msg) else {
                        return;
                    };
                    let Some(entry) = s.queue.remove(i) else {
                        return;
                    };
                    let size = body_size(messages, *msg);
                    waiting_mut(&mut self.waiting, client).remove(size, entry.qos);
                    if entry.qos == 0 {
                        release(messages, &mut self.body_bytes, *msg);
                    } else {
                        // The queue's reference moves to the in-flight slot.
                        s.unacked.push(Unacked {
                            pkid: *pkid,
                            msg: *msg,
                            qos: entry.qos,
                        });
                    }
                }
            }
            Op::Received { client, pkid } => {
                if let Some(s) = sessions.get_mut(client) {
                    if let Some(i) = s.unacked.iter().position(|u| u.pkid == *pkid) {
                        let entry = s.unacked.remove(i);
                        release(messages, &mut self.body_bytes, entry.msg);
                        s.released.push(*pkid);
                    }
                }
            }
            Op::Completed { client, pkid } => {
                if let Some(s) = sessions.get_mut(client) {
                    if let Some(i) = s.unacked.iter().position(|u| u.pkid == *pkid) {
                        let entry = s.unacked.remove(i);
                        release(messages, &mut self.body_bytes, entry.msg);
                    } else {
                        s.released.retain(|p| p != pkid);
                    }
                }
            }
            Op::InboundReceived { client, pkid } => {
                if let Some(s) = sessions.get_mut(client) {
                    s.inbound.insert(*pkid);
                }
            }
            Op::InboundReleased { client, pkid } => {
                if let Some(s) = sessions.get_mut(client) {
                    s.inbound.remove(pkid);
                }
            }
            Op::NextMessageId { next } => {
                self.next_message_id = self.next_message_id.max(*next);
            }
            Op::Message(msg) => {
                self.next_message_id = self.next_message_id.max(msg.id.saturating_add(1));
                let msg = msg.clone();
                self.body_bytes += msg.size();
                messages.insert(msg.id, Body { msg, refs: 0 });
            }
            Op::Retained { msg } => {
                let topic = match messages.get(msg) {
                    Some(body) => body.msg.topic.clone(),
                    None => return,
                };
                hold(messages, *msg);
                if let Some(previous) = self.retained.insert(topic, *msg) {
                    release(messages, &mut self.body_bytes, previous);
                }
            }
            Op::Session { client, session } => {
                // Hold the new references before releasing the old ones, which may be the same.
                session.references().for_each(|id| hold(messages, id));
                let mut waiting = Waiting::default();
                for q in &session.queue {
                    waiting.add(body_size(messages, q.msg), q.qos);
                }
                self.waiting.insert(client.clone(), waiting);
                if let Some(old) = sessions.insert(client.clone(), session.clone()) {
                    old.references()
                        .for_each(|id| release(messages, &mut self.body_bytes, id));
                }
            }
            Op::LastSeen { client, at } => {
                self.last_seen.insert(client.clone(), *at);
            }
        }
    }

    /// Removes bodies nothing refers to and says how many there were. After a full replay there
    /// are none, unless the log ended inside a snapshot's bodies (it cannot: a snapshot is
    /// installed only once complete) or a broken log referred to nothing.
    pub fn collect_unreferenced(&mut self) -> usize {
        let before = self.messages.len();
        let body_bytes = &mut self.body_bytes;
        self.messages.retain(|_, body| {
            if body.refs == 0 {
                *body_bytes = body_bytes.saturating_sub(body.msg.size());
            }
            body.refs > 0
        });
        before - self.messages.len()
    }

    // --- the quota -----------------------------------------------------------------------------

    /// Turns a requested op into the ops that carry it out under the per-session `quota` (see
    /// the module docs): `Publish` and `Enqueue` may push out waiting entries (`DropQueued` ops
    /// before them) or leave out recipients over their quota; every other op passes as it is.
    /// Changes nothing itself; fails only for an op that does not apply.
    pub fn admit(&self, op: Op, quota: &Quota) -> Result<Admitted, ApplyError> {
        self.admit_with(op, &|_| *quota)
    }

    /// [`admit`](Self::admit) with a quota per session. The broker gives a connected session no
    /// quota here: its connection applies it to what it has not sent, and what it was handed
    /// must stay queued until it is acknowledged.
    pub fn admit_with(
        &self,
        op: Op,
        quota: &dyn Fn(&str) -> Quota,
    ) -> Result<Admitted, ApplyError> {
        // A recipient whose session is gone (dropped while the publication was on its way) gets
        // nothing; the others still get it.
        let op = match op {
            Op::Publish { msg, mut to } => {
                to.retain(|d| self.sessions.contains_key(&d.client));
                Op::Publish { msg, to }
            }
            op => op,
        };
        self.check(&op)?;
        match op {
            Op::Publish { msg, to } => {
                let wanted: Vec<(&str, Qos)> =
                    to.iter().map(|d| (d.client.as_str(), d.qos)).collect();
                let size = msg.size();
                let room = self.make_room(&wanted, size, quota);
                let to: Vec<Delivery> = to
                    .into_iter()
                    .zip(&room.keep)
                    .filter_map(|(d, keep)| keep.then_some(d))
                    .collect();
                let mut ops = room.drops;
                // A message nobody gets and that changes no retained topic is not worth a record.
                if !to.is_empty() || msg.retain {
                    ops.push(Op::Publish { msg, to });
                }
                Ok(Admitted {
                    ops,
                    dropped: room.dropped,
                })
            }
            Op::Enqueue {
                client,
                msg,
                qos,
                retain,
            } => {
                let size = body_size(&self.messages, msg);
                let room = self.make_room(&[(client.as_str(), qos)], size, quota);
                let mut ops = room.drops;
                if room.keep[0] {
                    ops.push(Op::Enqueue {
                        client,
                        msg,
                        qos,
                        retain,
                    });
                }
                Ok(Admitted {
                    ops,
                    dropped: room.dropped,
                })
            }
            op => Ok(Admitted {
                ops: vec![op],
                dropped: Vec::new(),
            }),
        }
    }

    /// Decides, for new queue entries of one message of `size` bytes (`(client, qos)`, in
    /// order), which are kept and which waiting entries go to make room.
    fn make_room(&self, wanted: &[(&str, Qos)], size: u64, quota: &dyn Fn(&str) -> Quota) -> Room {
        let mut keep = vec![true; wanted.len()];
        let mut drops = Vec::new();
        let mut dropped = Vec::new();
        let mut by_client: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, (client, _)) in wanted.iter().enumerate() {
            by_client.entry(client).or_default().push(i);
        }
        for (client, entries) in by_client {
            let Some(session) = self.sessions.get(client) else {
                continue; // `check` rejected the op already
            };
            let quota = quota(client);
            let waiting = self.waiting.get(client).copied().unwrap_or_default();
            let mut queue = Backlog {
                queue: &session.queue,
                gone: Vec::new(),
                next_qos0: 0,
                next_any: 0,
                len: session.queue.len(),
                bytes: waiting.bytes,
                qos0: waiting.qos0,
            };
            // The new entries kept so far, oldest first.
            let mut kept: VecDeque<usize> = VecDeque::new();
            let mut count = 0;
            for i in entries {
                let qos = wanted[i].1;
                let mut fits = size <= quota.bytes && quota.messages > 0;
                while fits && !quota.admits(queue.len, queue.bytes, size) {
                    // Room is made by the oldest QoS 0 entry, waiting or new; then by the policy.
                    let new_qos0 = kept.iter().position(|&j| wanted[j].1 == 0);
                    if let Some(victim) = queue.oldest_qos0() {
                        drops.push(queue.drop(client, victim, &self.messages));
                    } else if let Some(at) = new_qos0 {
                        if let Some(j) = kept.remove(at) {
                            keep[j] = false;
                            queue.len -= 1;
                            queue.bytes -= size;
                        }
                    } else if qos == 0 || quota.overflow == Overflow::DropNew {
                        fits = false;
                    } else if let Some(victim) = queue.oldest() {
                        drops.push(queue.drop(client, victim, &self.messages));
                    } else if let Some(j) = kept.pop_front() {
                        keep[j] = false;
                        queue.len -= 1;
                        queue.bytes -= size;
                    } else {
                        fits = false;
                    }
                    count += 1;
                }
                if fits {
                    queue.len += 1;
                    queue.bytes += size;
                    kept.push_back(i);
                } else {
                    keep[i] = false;
                    // Counted in the loop when it gave up there; counted here when it never
                    // could fit.
                    if size > quota.bytes || quota.messages == 0 {
                        count += 1;
                    }
                }
            }
            if count > 0 {
                dropped.push((client.to_owned(), count));
            }
        }
        Room {
            keep,
            drops,
            dropped,
        }
    }

    // --- snapshots -----------------------------------------------------------------------------

    /// The live state as ops: replayed into an empty state (followed by
    /// [`collect_unreferenced`](Self::collect_unreferenced), which then finds nothing) they
    /// rebuild exactly this state. Bodies come first, then what refers to them.
    pub fn snapshot(&self) -> impl Iterator<Item = Op> + '_ {
        let next = std::iter::once(Op::NextMessageId {
            next: self.next_message_id,
        });
        let bodies = self.messages.values().map(|b| Op::Message(b.msg.clone()));
        let retained = self.retained.values().map(|id| Op::Retained { msg: *id });
        let sessions = self.sessions.iter().map(|(client, session)| Op::Session {
            client: client.clone(),
            session: session.clone(),
        });
        let last_seen = self.last_seen.iter().map(|(client, at)| Op::LastSeen {
            client: client.clone(),
            at: *at,
        });
        next.chain(bodies)
            .chain(retained)
            .chain(sessions)
            .chain(last_seen)
    }
}

/// The outcome of [`State::make_room`].
struct Room {
    /// Per new entry: queued (true) or dropped.
    keep: Vec<bool>,
    drops: Vec<Op>,
    dropped: Vec<(String, usize)>,
}

/// One session's queue as [`State::make_room`] trims it: which waiting entries it has chosen
/// to drop, and the size of what is left.
///
/// Entries are dropped oldest first, so two cursors that only move forward find the next victim
/// (the oldest QoS 0 entry left, the oldest entry left): a publication to a full queue costs what
/// it drops, not the length of the queue.
struct Backlog<'a> {
    queue: &'a VecDeque<Queued>,
    /// Entries dropped so far (a few: one or two per new entry).
    gone: Vec<usize>,
    /// No QoS 0 entry is left before this index.
    next_qos0: usize,
    /// No entry is left before this index.
    next_any: usize,
    len: usize,
    bytes: u64,
    /// QoS 0 entries left among the waiting ones.
    qos0: usize,
}

impl Backlog<'_> {
    /// The oldest QoS 0 entry not dropped yet.
    fn oldest_qos0(&mut self) -> Option<usize> {
        if self.qos0 == 0 {
            return None;
        }
        while self.next_qos0 < self.queue.len() {
            let i = self.next_qos0;
            if self.queue[i].qos == 0 && !self.gone.contains(&i) {
                return Some(i);
            }
            self.next_qos0 += 1;
        }
        None
    }

    /// The oldest entry not dropped yet.
    fn oldest(&mut self) -> Option<usize> {
        while self.next_any < self.queue.len() {
            let i = self.next_any;
            if !self.gone.contains(&i) {
                return Some(i);
            }
            self.next_any += 1;
        }
        None
    }

    /// Drops waiting entry `i`, returning the op that says so.
    fn drop(&mut self, client: &str, i: usize, messages: &BTreeMap<MsgId, Body>) -> Op {
        let msg = self.queue[i].msg;
        self.gone.push(i);
        self.len -= 1;
        self.qos0 -= usize::from(self.queue[i].qos == 0);
        self.bytes = self.bytes.saturating_sub(body_size(messages, msg));
        Op::DropQueued {
            client: client.to_owned(),
            msg,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The store: the state and its log
// ---------------------------------------------------------------------------------------------

/// Why the store could not do something. Cloneable: one failed fsync answers a whole batch.
#[derive(Clone, Debug)]
pub enum StoreError {
    /// An I/O operation on a store file failed.
    Io {
        action: &'static str,
        path: PathBuf,
        error: Arc<io::Error>,
    },
    /// Another store has the data dir.
    Locked { dir: PathBuf },
    /// The log is not a store log this broker can read.
    Foreign { path: PathBuf, reason: String },
    /// A request's ops could not be encoded (a record over [`MAX_RECORD`]).
    Encode(String),
    /// An op the store had checked did not apply: a bug in the store.
    Inconsistent(ApplyError),
    /// A write failed (typically: the disk is full). The request was not made durable and is
    /// undone — the store's memory is back to what is on the disk — and the store refuses every
    /// commit until a write works again ([`StoreError::NoDisk`]). Whoever applied the request's
    /// effects elsewhere (the router's retained messages) must read them back.
    WriteFailed(Arc<StoreError>),
    /// Refused without being tried: writes fail since an earlier one did (see
    /// [`Store::probe`]). Nothing was applied.
    NoDisk(Arc<StoreError>),
    /// A failure after which the store cannot trust its own memory or file: it refuses everything
    /// until it is restarted (and recovers from the disk).
    Poisoned(Arc<StoreError>),
    /// The store worker is gone: its mailbox refused the request, or it ended without answering.
    Closed,
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Io {
                action,
                path,
                error,
            } => write!(f, "{action} {}: {error}", path.display()),
            StoreError::Locked { dir } => write!(
                f,
                "the data directory {} is in use by another store (another broker on the same \
                 directory, or a previous instance still finishing)",
                dir.display()
            ),
            StoreError::Foreign { path, reason } => write!(
                f,
                "{} is not a store log this broker can read ({reason}); move it away or use \
                 another data directory",
                path.display()
            ),
            StoreError::Encode(e) => write!(f, "cannot encode a log record: {e}"),
            StoreError::Inconsistent(e) => write!(f, "store bug: a checked op did not apply: {e}"),
            StoreError::WriteFailed(cause) => write!(f, "not written, undone: {cause}"),
            StoreError::NoDisk(cause) => write!(
                f,
                "refused: the store cannot write since an earlier failure ({cause})"
            ),
            StoreError::Poisoned(cause) => write!(
                f,
                "the store refuses requests since an earlier failure ({cause}); restart it"
            ),
            StoreError::Closed => write!(f, "the store is not running"),
        }
    }
}

impl std::error::Error for StoreError {}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |error| StoreError::Io {
        action,
        path: path.to_owned(),
        error: Arc::new(error),
    }
}

/// Where the store lives and how it behaves.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The data directory (created if missing).
    pub dir: PathBuf,
    /// What may wait for an offline session, and what it loses past that.
    pub quota: Quota,
    /// Compact only logs at least this big.
    pub compact_min_bytes: u64,
    /// Compact when the log is this many times the size of the last snapshot.
    pub compact_ratio: u64,
    /// How long opening waits for the data dir's lock (a previous instance may still be ending).
    pub lock_wait: Duration,
    /// The worker syncs after at most this many requests even if more are waiting, so a
    /// continuous stream cannot postpone replies indefinitely.
    pub max_batch: usize,
    /// For tests of what a failing disk does: the append that would be the store's fsync number
    /// `n` (counted across restarts) fails instead, once.
    pub fail_fsync: Option<u64>,
    /// For tests of a full disk where none can be made: while this file exists, every write to
    /// the log fails as on a full disk.
    pub fail_writes_while: Option<PathBuf>,
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            dir: dir.into(),
            quota: Quota {
                messages: 1000,
                bytes: 64 << 20,
                overflow: Overflow::DropNew,
            },
            compact_min_bytes: 16 << 20,
            compact_ratio: 4,
            lock_wait: Duration::from_secs(3),
            max_batch: 1024,
            fail_fsync: None,
            fail_writes_while: None,
        }
    }
}

/// Counters of what the store did: shared with whoever watches it (and across restarts of the
/// worker, since the spec's factory hands the same counters to every instance).
#[derive(Debug, Default)]
pub struct StoreStats {
    /// `fsync`s of appended records: one per batch.
    pub fsyncs: AtomicU64,
    /// Commit records appended (one per request that changed something).
    pub records: AtomicU64,
    pub compactions: AtomicU64,
    /// Messages dropped for sessions over their quota: by the store for offline sessions, by
    /// the router and the connections for connected ones (they share it).
    pub drops: Arc<Drops>,
    /// Persistent sessions dropped after `--persistent-client-expiration` (by the router).
    pub expired: AtomicU64,
    /// Whether the store can write (the router and the health endpoint read it).
    pub disk: DiskStatus,
    /// Messages owed to persistent sessions (queued or unacknowledged) when the store closed.
    pub owed_at_close: AtomicU64,
    /// Bytes cut from a torn or corrupt tail at open.
    pub skipped_bytes: AtomicU64,
}

impl StoreStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Whether the store's writes work, readable from any thread without asking the store.
#[derive(Debug, Default)]
pub struct DiskStatus {
    failing: AtomicBool,
    /// Writes undone so far: a reader that has caught up with one knows the next is new.
    undone: AtomicU64,
    /// Why, and since when.
    detail: parking_lot::Mutex<Option<(String, Instant)>>,
}

impl DiskStatus {
    /// True while writes work.
    pub fn ok(&self) -> bool {
        !self.failing.load(Ordering::Acquire)
    }

    /// Why writes fail and for how long, while they do.
    pub fn failing(&self) -> Option<(String, Duration)> {
        let detail = self.detail.lock();
        detail
            .as_ref()
            .map(|(why, since)| (why.clone(), since.elapsed()))
    }

    /// How many failed writes the store has undone since the broker started.
    pub fn undone(&self) -> u64 {
        self.undone.load(Ordering::Acquire)
    }

    /// A write failed and was undone; true if writes worked until now.
    fn fail(&self, cause: &StoreError) -> bool {
        self.undone.fetch_add(1, Ordering::AcqRel);
        let mut detail = self.detail.lock();
        let first = detail.is_none();
        if first {
            *detail = Some((cause.to_string(), Instant::now()));
        }
        self.failing.store(true, Ordering::Release);
        first
    }

    /// Writes work again; returns for how long they did not.
    fn recover(&self) -> Duration {
        let since = self.detail.lock().take().map(|(_, since)| since);
        self.failing.store(false, Ordering::Release);
        since.map_or(Duration::ZERO, |s| s.elapsed())
    }
}

/// The answer to one commit request, once it is durable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Commit {
    /// How many of the request's ops were applied (and are now durable): all of them, or those
    /// before the rejected one.
    pub applied: usize,
    /// The first op refused, by index; the ops after it were not tried.
    pub rejected: Option<Rejected>,
    /// Messages dropped for sessions over their quota.
    pub dropped: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub index: usize,
    pub reason: ApplyError,
}

/// The state and the log it is kept in. Used by one thread (the [`StoreWorker`]'s).
pub struct Store {
    config: StoreConfig,
    log_path: PathBuf,
    /// The log, positioned at its end.
    file: File,
    /// Locked for the store's life; unlocked when closed.
    _lock: File,
    state: State,
    /// Bytes in the log file.
    len: u64,
    /// Records staged by `commit`, written and synced by `sync`.
    staged: Vec<u8>,
    /// The log's size after the last compaction, or at open: the compaction rule's base.
    base: u64,
    /// The bodies' bytes then: when the live state shrinks well below it (a big queue
    /// delivered), compacting gives the space back.
    base_bodies: u64,
    /// Sessions with a connection now: no cap for them (see [`State::admit_with`]). Not logged:
    /// after a restart nobody is connected.
    online: HashSet<String>,
    stats: Arc<StoreStats>,
    poisoned: Option<Arc<StoreError>>,
    /// Writes fail since this one did: commits are refused until a probe writes.
    degraded: Option<Arc<StoreError>>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("log", &self.log_path)
            .field("len", &self.len)
            .field("staged", &self.staged.len())
            .finish()
    }
}

impl Store {
    /// Opens the store in `config.dir`, creating it if needed and recovering its state from the
    /// log (see the module docs). Fails, naming the path, if the directory cannot be created,
    /// read or locked, or holds a file that is not a store log; never over a torn or corrupt tail.
    pub fn open(config: StoreConfig, stats: Arc<StoreStats>) -> Result<Store, StoreError> {
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).map_err(io_error("cannot create the data directory", &dir))?;
        let lock = lock_dir(&dir, config.lock_wait)?;
        let log_path = dir.join(LOG_FILE);
        let compact_path = dir.join(COMPACT_FILE);

        match fs::remove_file(&compact_path) {
            Ok(()) => {
                log::warn!(
                    target: LOG,
                    "{}: removed an unfinished compaction (the log is complete without it)",
                    compact_path.display()
                );
                sync_dir(&dir)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("cannot remove", &compact_path)(e)),
        }
        match fs::metadata(&log_path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // A new log is an empty snapshot, installed like any other.
                let (file, _) = write_snapshot(&compact_path, &State::default())?;
                drop(file);
                fs::rename(&compact_path, &log_path)
                    .map_err(io_error("cannot create", &log_path))?;
                sync_dir(&dir)?;
                log::info!(target: LOG, "{}: created a new log", log_path.display());
            }
            Err(e) => return Err(io_error("cannot read", &log_path)(e)),
        }

        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&log_path)
            .map_err(io_error("cannot open", &log_path))?;
        let replayed = replay(&log_path, &file)?;
        let mut state = replayed.state;
        if let Some(damage) = &replayed.damage {
            let skipped = replayed.file_len - replayed.valid_len;
            log::warn!(
                target: LOG,
                "{}: {damage} at offset {}: skipping the {skipped} bytes from there to the end \
                 (a write cut short by a crash, or corruption) and truncating the log there",
                log_path.display(),
                replayed.valid_len,
            );
            file.set_len(replayed.valid_len)
                .and_then(|()| file.sync_all())
                .map_err(io_error("cannot truncate", &log_path))?;
            stats.skipped_bytes.fetch_add(skipped, Ordering::Relaxed);
        }
        file.seek(SeekFrom::Start(replayed.valid_len))
            .map_err(io_error("cannot seek in", &log_path))?;
        let unreferenced = state.collect_unreferenced();
        if unreferenced > 0 {
            log::warn!(
                target: LOG,
                "{}: {unreferenced} stored messages were referenced by nothing; removed",
                log_path.display()
            );
        }
        log::info!(
            target: LOG,
            "{}: recovered {} records ({} bytes): {} sessions, {} messages, {} retained",
            log_path.display(),
            replayed.records,
            replayed.valid_len,
            state.sessions.len(),
            state.messages.len(),
            state.retained.len(),
        );

        let base_bodies = state.body_bytes();
        let mut store = Store {
            log_path,
            file,
            _lock: lock,
            state,
            len: replayed.valid_len,
            staged: Vec::new(),
            base: replayed.valid_len,
            base_bodies,
            online: HashSet::new(),
            stats,
            poisoned: None,
            degraded: None,
            config,
        };
        if store.len >= store.config.compact_min_bytes {
            if let Err(e) = store.compact() {
                if store.poisoned.is_some() {
                    return Err(e);
                }
                // The old log is intact: a store that could not compact still works.
                log::error!(
                    target: LOG,
                    "{}: compaction failed, going on with the log as it is: {e}",
                    store.log_path.display()
                );
            }
        }
        // A new instance has not failed to write yet (a previous one may have).
        store.stats.disk.recover();
        Ok(store)
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn stats(&self) -> &Arc<StoreStats> {
        &self.stats
    }

    pub fn path(&self) -> &Path {
        &self.log_path
    }

    /// Bytes in the log file (not counting what is staged).
    pub fn log_len(&self) -> u64 {
        self.len
    }

    /// Bytes staged by [`commit`](Self::commit) and not yet written.
    pub fn staged_len(&self) -> usize {
        self.staged.len()
    }

    fn check_poisoned(&self) -> Result<(), StoreError> {
        match &self.poisoned {
            Some(cause) => Err(StoreError::Poisoned(cause.clone())),
            None => Ok(()),
        }
    }

    /// Records a failure after which memory and disk may disagree, and returns it.
    fn poison(&mut self, error: StoreError) -> StoreError {
        log::error!(
            target: LOG,
            "{}: {error}; refusing every request from now on",
            self.log_path.display()
        );
        self.poisoned = Some(Arc::new(error.clone()));
        error
    }

    /// Applies a request's ops in order (each through [`State::admit`]) until one is rejected,
    /// and stages one record with what they did. The record is durable, and the request may be
    /// acknowledged, only after the next [`sync`](Self::sync) succeeds.
    pub fn commit(&mut self, ops: Vec<Op>) -> Result<Commit, StoreError> {
        self.check_poisoned()?;
        self.check_disk()?;
        let mut commit = Commit::default();
        let mut effects = Vec::with_capacity(ops.len());
        for (index, op) in ops.into_iter().enumerate() {
            let admitted = match self.admit(op) {
                Ok(admitted) => admitted,
                Err(reason) => {
                    commit.rejected = Some(Rejected { index, reason });
                    break;
                }
            };
            for op in &admitted.ops {
                // `admit` checked the op, and its drops are entries it found in the state.
                if let Err(e) = self.state.apply(op) {
                    return Err(self.poison(StoreError::Inconsistent(e)));
                }
            }
            for (client, count) in &admitted.dropped {
                commit.dropped += count;
                let quota = self.config.quota;
                self.stats
                    .drops
                    .dropped(client, *count as u64, &quota, true);
            }
            effects.extend(admitted.ops);
            commit.applied += 1;
        }
        if !effects.is_empty() {
            match encode_record(&effects) {
                Ok(record) => self.staged.extend_from_slice(&record),
                Err(e) => return Err(self.poison(e)),
            }
            self.stats.records.fetch_add(1, Ordering::Relaxed);
        }
        Ok(commit)
    }

    /// Marks a session connected (no quota on its queue here) or not. Requests are handled in
    /// order, so this applies to every commit the broker sends after it.
    pub fn set_online(&mut self, client: &str, online: bool) {
        if online {
            self.online.insert(client.to_owned());
            // An episode over the quota ends when the session comes for what it is owed.
            self.stats.drops.recovered(client);
        } else {
            self.online.remove(client);
        }
    }

    /// [`State::admit_with`] under the broker's policy: connected sessions have no quota here
    /// (their connections apply it), offline ones the configured one.
    fn admit(&self, op: Op) -> Result<Admitted, ApplyError> {
        let quota = self.config.quota;
        let online = &self.online;
        self.state.admit_with(op, &|client: &str| {
            if online.contains(client) {
                Quota::UNLIMITED
            } else {
                quota
            }
        })
    }

    /// Writes everything staged with one `write` and one `fsync`. Returns whether there was
    /// anything to write. When the write fails the store *degrades* (see
    /// [`roll_back`](Self::roll_back)): the error is [`StoreError::WriteFailed`], and commits are
    /// refused until [`probe`](Self::probe) finds that writes work again.
    pub fn sync(&mut self) -> Result<bool, StoreError> {
        self.check_poisoned()?;
        if self.staged.is_empty() {
            return Ok(false);
        }
        let mut staged = std::mem::take(&mut self.staged);
        if let Err(e) = self.append(&staged) {
            let path = self.log_path.clone();
            let cause = io_error("cannot append to", &path)(e);
            return Err(self.roll_back(cause));
        }
        self.len += staged.len() as u64;
        // The buffer is kept for the next batch.
        staged.clear();
        self.staged = staged;
        Ok(true)
    }

    /// One `write` and one `fsync` of `bytes` at the end of the log, counted (or the failure
    /// `--fail-fsync` or `--fail-writes-while` injects).
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.config.fail_fsync == Some(StoreStats::get(&self.stats.fsyncs) + 1) {
            // Counted, so the next instance does not fail at the same number again.
            self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::other("injected failure (--fail-fsync)"));
        }
        if let Some(flag) = &self.config.fail_writes_while {
            if flag.exists() {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!(
                        "injected: no space left on device ({} exists)",
                        flag.display()
                    ),
                ));
            }
        }
        self.file.write_all(bytes)?;
        self.file.sync_data()?;
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Cuts the log back to its last durable byte (what a failed write may have left past it),
    /// and puts the handle there. If even that fails the store cannot trust its file: it is
    /// poisoned, and the error returned.
    fn cut_back(&mut self) -> Result<(), StoreError> {
        let cut = self
            .file
            .set_len(self.len)
            .and_then(|()| self.file.sync_all())
            .and_then(|()| self.file.seek(SeekFrom::Start(self.len)).map(drop));
        cut.map_err(|e| {
            let path = self.log_path.clone();
            self.poison(io_error("cannot cut back", &path)(e))
        })
    }

    /// After a failed write: cuts what may have reached the file past its last durable byte,
    /// puts memory back to what the log holds (a replay), drops what was staged, and refuses
    /// commits from now on — until [`probe`](Self::probe) succeeds. Returns the error for the
    /// requests whose records were lost. If the file cannot be cut back or read again, the store
    /// cannot trust itself: it is poisoned instead (and its worker restarted).
    fn roll_back(&mut self, cause: StoreError) -> StoreError {
        self.staged.clear();
        if let Err(e) = self.cut_back() {
            return e;
        }
        let replayed = File::open(&self.log_path)
            .map_err(io_error("cannot read", &self.log_path))
            .and_then(|file| replay(&self.log_path, &file));
        match replayed {
            Ok(replayed) if replayed.damage.is_none() && replayed.valid_len == self.len => {
                let mut state = replayed.state;
                state.collect_unreferenced();
                self.state = state;
            }
            Ok(replayed) => {
                let reason = replayed
                    .damage
                    .unwrap_or_else(|| "a different length".to_owned());
                return self.poison(StoreError::Foreign {
                    path: self.log_path.clone(),
                    reason: format!("read back after a failed write: {reason}"),
                });
            }
            Err(e) => return self.poison(e),
        }
        let cause = Arc::new(cause);
        if self.stats.disk.fail(&cause) {
            log::warn!(
                target: LOG,
                "{cause}: the store refuses what needs the disk (persistent sessions, QoS 1/2 \
                 messages for them, retained messages) until a write works again; it tries every \
                 second. QoS 0 and clean sessions go on."
            );
        }
        self.degraded = Some(cause.clone());
        StoreError::WriteFailed(cause)
    }

    /// Refuses a commit while writes fail.
    fn check_disk(&self) -> Result<(), StoreError> {
        match &self.degraded {
            Some(cause) => Err(StoreError::NoDisk(cause.clone())),
            None => Ok(()),
        }
    }

    /// While writes fail, tries one: a record that changes nothing (the message id counter as it
    /// is), written and synced. If it works the store takes commits again; if not, the file is
    /// cut back to its last durable byte. Returns whether the store can write now.
    pub fn probe(&mut self) -> bool {
        if self.poisoned.is_some() {
            return false;
        }
        let Some(cause) = self.degraded.clone() else {
            return true;
        };
        let record = match encode_record(&[Op::NextMessageId {
            next: self.state.next_message_id(),
        }]) {
            Ok(record) => record,
            Err(e) => {
                self.poison(e);
                return false;
            }
        };
        match self.append(&record) {
            Ok(()) => {
                self.len += record.len() as u64;
                self.degraded = None;
                let down = self.stats.disk.recover();
                log::info!(
                    target: LOG,
                    "{}: writes work again after {down:.1?} ({cause}); the store takes every \
                     request again",
                    self.log_path.display()
                );
                true
            }
            Err(e) => {
                log::debug!(target: LOG, "{}: still cannot write: {e}", self.log_path.display());
                // Poisoned if it fails: then no probe helps, only a restart.
                let _ = self.cut_back();
                false
            }
        }
    }

    /// Whether the compaction rule says the log should be compacted now.
    ///
    /// Two reasons: the log has grown to `compact_ratio` times its size after the last compaction
    /// (appends accumulate), or the stored messages have shrunk to less than `1/compact_ratio` of
    /// what they were then (a queue was delivered: the log still holds it, and would never grow
    /// enough to be compacted by the first reason).
    pub fn compaction_due(&self) -> bool {
        let ratio = self.config.compact_ratio;
        self.len >= self.config.compact_min_bytes
            && (self.len >= self.base.saturating_mul(ratio)
                || self.state.body_bytes().saturating_mul(ratio) < self.base_bodies)
    }

    /// Rewrites the log as a snapshot of the live state (syncing what is staged first). A failure
    /// before the new log is in place leaves the old one in use, and is only reported; after
    /// it, the store is poisoned.
    pub fn compact(&mut self) -> Result<(), StoreError> {
        self.sync()?;
        let (file, len) = self.write_snapshot()?;
        self.install_snapshot(file, len)
    }

    /// Compaction, steps 1–2: the snapshot in [`COMPACT_FILE`], synced.
    fn write_snapshot(&mut self) -> Result<(File, u64), StoreError> {
        let path = self.config.dir.join(COMPACT_FILE);
        write_snapshot(&path, &self.state).inspect_err(|_| {
            let _ = fs::remove_file(&path);
            // Do not try again before the log has grown, or the state shrunk, by the ratio once
            // more.
            self.rebase();
        })
    }

    /// The compaction rule's base is the log and the state as they are now.
    fn rebase(&mut self) {
        self.base = self.len;
        self.base_bodies = self.state.body_bytes();
    }

    /// Compaction, steps 3–4: rename the snapshot over the log, sync the directory.
    fn install_snapshot(&mut self, file: File, len: u64) -> Result<(), StoreError> {
        let path = self.config.dir.join(COMPACT_FILE);
        if let Err(e) = fs::rename(&path, &self.log_path) {
            let _ = fs::remove_file(&path);
            self.rebase();
            return Err(io_error(
                "cannot rename the compacted log to",
                &self.log_path,
            )(e));
        }
        let old = self.len;
        // The renamed file is the log now; its handle is at its end.
        self.file = file;
        self.len = len;
        self.rebase();
        // Until the rename is durable a crash may bring back the old log, which lacks whatever is
        // appended from now on: nothing may be appended before this succeeds.
        if let Err(e) = sync_dir(&self.config.dir) {
            return Err(self.poison(e));
        }
        self.stats.compactions.fetch_add(1, Ordering::Relaxed);
        log::info!(
            target: LOG,
            "{}: compacted from {old} to {len} bytes",
            self.log_path.display()
        );
        Ok(())
    }

    /// Syncs what is staged and closes the log (and the data dir's lock). Returns the log's size.
    pub fn close(mut self) -> Result<u64, StoreError> {
        self.sync()?;
        Ok(self.len)
    }
}

/// Takes the data dir's lock, waiting up to `wait` for a previous holder to let go.
fn lock_dir(dir: &Path, wait: Duration) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error("cannot open", &path))?;
    let deadline = Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    dir: dir.to_owned(),
                })
            }
            Err(TryLockError::Error(e)) => return Err(io_error("cannot lock", &path)(e)),
        }
    }
}

/// Makes the directory's entries (a created or renamed file) durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("cannot sync the directory", dir))?;
    Ok(())
}

/// CRC32 of a record's length bytes and payload.
fn checksum(len: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(len);
    hasher.update(payload);
    hasher.finalize()
}

/// One framed record holding `ops`.
fn encode_record(ops: &[Op]) -> Result<Vec<u8>, StoreError> {
    let payload = postcard::to_allocvec(ops).map_err(|e| StoreError::Encode(e.to_string()))?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|len| *len <= MAX_RECORD)
        .ok_or_else(|| StoreError::Encode(format!("{} bytes", payload.len())))?;
    let len = len.to_le_bytes();
    let mut record = Vec::with_capacity(FRAME_LEN as usize + payload.len());
    record.extend_from_slice(&len);
    record.extend_from_slice(&checksum(&len, &payload).to_le_bytes());
    record.extend_from_slice(&payload);
    Ok(record)
}

/// Decodes a record's payload; trailing bytes make it corrupt.
fn decode_record(payload: &[u8]) -> Result<Vec<Op>, String> {
    match postcard::take_from_bytes::<Vec<Op>>(payload) {
        Ok((ops, [])) => Ok(ops),
        Ok((_, rest)) => Err(format!("{} bytes after the ops", rest.len())),
        Err(e) => Err(e.to_string()),
    }
}

/// Writes the header and `state`'s snapshot to `path` (replacing the file) and syncs it.
/// Returns the file, positioned at its end, and its length.
fn write_snapshot(path: &Path, state: &State) -> Result<(File, u64), StoreError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_error("cannot create", path))?;
    let mut out = BufWriter::with_capacity(SNAPSHOT_CHUNK, file);
    let mut len = HEADER_LEN;
    let write = |out: &mut BufWriter<File>, bytes: &[u8]| {
        out.write_all(bytes).map_err(io_error("cannot write", path))
    };
    write(&mut out, MAGIC)?;
    write(&mut out, &VERSION.to_le_bytes())?;
    let mut chunk = Vec::new();
    let mut chunk_size = 0;
    for op in state.snapshot() {
        let size = postcard::experimental::serialized_size(&op)
            .map_err(|e| StoreError::Encode(e.to_string()))?;
        if !chunk.is_empty() && chunk_size + size > SNAPSHOT_CHUNK {
            let record = encode_record(&chunk)?;
            write(&mut out, &record)?;
            len += record.len() as u64;
            chunk.clear();
            chunk_size = 0;
        }
        chunk_size += size;
        chunk.push(op);
    }
    let record = encode_record(&chunk)?;
    write(&mut out, &record)?;
    len += record.len() as u64;
    let file = out
        .into_inner()
        .map_err(|e| io_error("cannot write", path)(e.into_error()))?;
    file.sync_all().map_err(io_error("cannot sync", path))?;
    Ok((file, len))
}

/// What reading a log found.
struct Replayed {
    state: State,
    records: u64,
    /// Up to here the log is sound.
    valid_len: u64,
    file_len: u64,
    /// What ended the replay before the end of the file.
    damage: Option<String>,
}

/// Reads the log and applies its records until the end or the first damaged record.
fn replay(path: &Path, file: &File) -> Result<Replayed, StoreError> {
    let read_error = io_error("cannot read", path);
    let file_len = file
        .metadata()
        .map_err(io_error("cannot read", path))?
        .len();
    let foreign = |reason: String| StoreError::Foreign {
        path: path.to_owned(),
        reason,
    };
    if file_len < HEADER_LEN {
        return Err(foreign(format!("{file_len} bytes, shorter than a header")));
    }
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut header = [0u8; HEADER_LEN as usize];
    reader.read_exact(&mut header).map_err(read_error)?;
    if &header[..8] != MAGIC {
        return Err(foreign("no store header".to_owned()));
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != VERSION {
        return Err(foreign(format!("format version {version}, not {VERSION}")));
    }

    let mut state = State::default();
    let mut offset = HEADER_LEN;
    let mut records = 0;
    let damage = loop {
        let left = file_len - offset;
        if left == 0 {
            break None;
        }
        if left < FRAME_LEN {
            break Some(format!(
                "an incomplete record header ({left} of {FRAME_LEN} bytes)"
            ));
        }
        let mut frame = [0u8; FRAME_LEN as usize];
        reader
            .read_exact(&mut frame)
            .map_err(io_error("cannot read", path))?;
        let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]);
        let crc = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        if len == 0 || len > MAX_RECORD {
            break Some(format!("an impossible record length ({len} bytes)"));
        }
        if u64::from(len) > left - FRAME_LEN {
            break Some(format!(
                "a record of {len} bytes with {} bytes left in the file",
                left - FRAME_LEN
            ));
        }
        let mut payload = vec![0u8; len as usize];
        reader
            .read_exact(&mut payload)
            .map_err(io_error("cannot read", path))?;
        if checksum(&frame[..4], &payload) != crc {
            break Some("a checksum mismatch".to_owned());
        }
        let ops = match decode_record(&payload) {
            Ok(ops) => ops,
            Err(e) => break Some(format!("an undecodable record ({e})")),
        };
        for (i, op) in ops.iter().enumerate() {
            // Only ops that applied were logged, so this is a bug; the rest of the log is sound.
            if let Err(e) = state.apply(op) {
                log::warn!(
                    target: LOG,
                    "{}: record at offset {offset}, op {i}: does not apply ({e}); skipped",
                    path.display()
                );
            }
        }
        records += 1;
        offset += FRAME_LEN + u64::from(len);
    };
    Ok(Replayed {
        state,
        records,
        valid_len: offset,
        file_len,
        damage,
    })
}

// ---------------------------------------------------------------------------------------------
// The store as a child of the tree
// ---------------------------------------------------------------------------------------------

/// A request to the store worker. Sent through a [`StoreClient`], which keeps the count the
/// worker batches by.
pub enum StoreRequest {
    /// Apply and log these ops; the reply comes once they are durable.
    Commit {
        ops: Vec<Op>,
        reply: oneshot::Sender<Result<Commit, StoreError>>,
    },
    /// Run this on the state, after syncing what is staged (so it sees only durable state).
    Read(ReadFn),
    /// A persistent session connected or went away (see [`Store::set_online`]).
    Presence { client: String, online: bool },
    /// Nobody is connected (a router starting: connections of a previous one are gone).
    NobodyOnline,
    /// While writes fail: try one (see [`Store::probe`]).
    Probe,
}

/// A read: run on the store's thread with the state (or why there is none).
pub type ReadFn = Box<dyn FnOnce(Result<&State, StoreError>) + Send>;

/// The store as a [`BlockingWorker`]: its own thread, where fsyncs may block.
///
/// **Group commit.** `BlockingWorker` hands the worker one message at a time and does not show
/// it its mailbox, so the worker cannot drain the queue itself. Instead [`StoreClient`] counts the
/// requests it has sent and the worker has not taken yet (`queued`, incremented before the send,
/// so the count is never below what is in the mailbox). After handling a request the worker
/// looks at the count: if another request is right behind, it leaves its reply waiting and
/// handles that one first; the last request of a run syncs once and answers them all. That is
/// the whole mechanism: no timer, no second channel, and every request still travels through the
/// tree's mailbox, so the shutdown protocol (drain everything accepted, count what was dropped)
/// covers it. [`StoreConfig::max_batch`] bounds a run. A request refused by a closed mailbox is
/// uncounted again by the client; one that a worker dies holding loses its reply, which the
/// caller sees as [`StoreError::Closed`] — it was never acknowledged.
pub struct StoreWorker {
    /// Open until the worker has drained: then closed, so the data dir's lock is free before the
    /// worker acknowledges (a restarted instance or the next broker can open it at once).
    store: Option<Store>,
    queued: Arc<AtomicUsize>,
    /// Commits applied and staged, waiting for the sync that makes them durable.
    waiting: Vec<(oneshot::Sender<Result<Commit, StoreError>>, Commit)>,
    max_batch: usize,
    stats: Arc<StoreStats>,
}

impl StoreWorker {
    pub fn new(store: Store, queued: Arc<AtomicUsize>) -> Self {
        StoreWorker {
            max_batch: store.config.max_batch.max(1),
            stats: store.stats.clone(),
            store: Some(store),
            queued,
            waiting: Vec::new(),
        }
    }

    /// Syncs what is staged and answers every waiting commit with the outcome; then compacts if
    /// the log has grown enough.
    fn flush(&mut self) {
        let Some(store) = &mut self.store else {
            return; // closed: nothing can be waiting (see `handle`)
        };
        if self.waiting.is_empty() && store.staged_len() == 0 {
            return;
        }
        let synced = store.sync();
        for (reply, commit) in self.waiting.drain(..) {
            let _ = reply.send(synced.clone().map(|_| commit));
        }
        if synced.is_ok() && store.compaction_due() {
            if let Err(e) = store.compact() {
                // Unless it poisoned the store, the old log is intact and in use.
                log::error!(
                    target: LOG,
                    "{}: compaction failed: {e}",
                    store.path().display()
                );
            }
        }
    }
}

impl BlockingWorker for StoreWorker {
    type Message = StoreRequest;
    type Reply = ();

    fn handle(&mut self, request: StoreRequest) {
        // How many requests were sent after this one and are not taken yet. Saturating: a
        // request sent around the client (through the spec's address) is not counted.
        let behind = match self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            }) {
            Ok(n) | Err(n) => n.saturating_sub(1),
        };
        // The tree hands a drained instance nothing more, so the store is open here; were it
        // not, the request is refused like one the mailbox refused.
        let Some(store) = &mut self.store else {
            match request {
                StoreRequest::Commit { reply, .. } => {
                    let _ = reply.send(Err(StoreError::Closed));
                }
                StoreRequest::Read(read) => read(Err(StoreError::Closed)),
                StoreRequest::Presence { .. }
                | StoreRequest::NobodyOnline
                | StoreRequest::Probe => {}
            }
            return;
        };
        match request {
            StoreRequest::Commit { ops, reply } => match store.commit(ops) {
                Ok(commit) => self.waiting.push((reply, commit)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            StoreRequest::Presence { client, online } => store.set_online(&client, online),
            StoreRequest::NobodyOnline => store.online.clear(),
            StoreRequest::Probe => {
                store.probe();
            }
            StoreRequest::Read(read) => {
                self.flush();
                if let Some(store) = &self.store {
                    match store.check_poisoned() {
                        Ok(()) => read(Ok(store.state())),
                        Err(e) => read(Err(e)),
                    }
                }
            }
        }
        if behind == 0 || self.waiting.len() >= self.max_batch {
            self.flush();
        }
    }

    fn failed(&mut self) -> Option<String> {
        // Memory is ahead of the disk: only a new instance, reading the log again, is right.
        // Every commit waiting was answered with the error (or is dropped with this instance,
        // which answers it `Closed`); the tree restarts the store and, rest-for-one, the router
        // and the sessions, which reload from what is durable.
        let cause = self.store.as_ref()?.check_poisoned().err()?;
        Some(cause.to_string())
    }

    fn on_drained(&mut self) {
        // Everything accepted has been handled: make it durable, answer it, close the log.
        self.flush();
        if let Some(store) = self.store.take() {
            let owed: usize = store
                .state()
                .sessions()
                .map(|(_, s)| s.queue().len() + s.unacked().len())
                .sum();
            self.stats
                .owed_at_close
                .store(owed as u64, Ordering::Relaxed);
            let path = store.path().display().to_string();
            let fsyncs = StoreStats::get(&self.stats.fsyncs);
            match store.close() {
                Ok(len) => log::info!(
                    target: LOG,
                    "{path}: drained and closed ({len} bytes; {fsyncs} fsyncs since the broker \
                     started)"
                ),
                Err(e) => log::error!(target: LOG, "{path}: closing: {e}"),
            }
        }
    }
}

/// The answer to a request, once the store has it: `.await` it, or [`wait`](Self::wait) for it
/// on a thread outside any async runtime.
pub struct Reply<T>(oneshot::Receiver<Result<T, StoreError>>);

impl<T> Future for Reply<T> {
    type Output = Result<T, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(StoreError::Closed)))
    }
}

impl<T> Reply<T> {
    /// Blocks the thread until the answer comes. Not for async code (it would block the runtime).
    pub fn wait(self) -> Result<T, StoreError> {
        self.0.blocking_recv().unwrap_or(Err(StoreError::Closed))
    }
}

/// How the broker talks to the store: cheap to clone, usable from any thread or actor. Requests
/// from one caller are handled in the order they were made (the send happens in the call, not
/// when the reply is awaited).
#[derive(Clone)]
pub struct StoreClient {
    addr: BlockingAddr<StoreWorker>,
    queued: Arc<AtomicUsize>,
    stats: Arc<StoreStats>,
}

impl StoreClient {
    /// Applies and logs `ops` as one request; the reply comes once they are durable. Acknowledge
    /// a publisher only after it.
    pub fn commit(&self, ops: Vec<Op>) -> Reply<Commit> {
        let (reply, rx) = oneshot::channel();
        self.send(StoreRequest::Commit { ops, reply });
        Reply(rx)
    }

    /// Runs `read` on the state (after everything requested before it is durable). It runs on the
    /// store's thread: keep it short, and never wait on the store inside it.
    pub fn read<R, F>(&self, read: F) -> Reply<R>
    where
        R: Send + 'static,
        F: FnOnce(&State) -> R + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        self.send(StoreRequest::Read(Box::new(move |state| {
            let _ = reply.send(state.map(read));
        })));
        Reply(rx)
    }

    /// Tells the store a persistent session connected (`true`) or went away: a connected one has
    /// no cap on its queue. In order with the commits around it.
    pub fn set_online(&self, client: &str, online: bool) {
        self.send(StoreRequest::Presence {
            client: client.to_owned(),
            online,
        });
    }

    /// Tells the store no session is connected: a (re)started router says so first, since the
    /// connections a previous router knew are gone with it.
    pub fn nobody_online(&self) {
        self.send(StoreRequest::NobodyOnline);
    }

    /// Whether the store can write now (see [`Store::probe`]): what needs the disk is refused up
    /// front while it cannot.
    pub fn disk_ok(&self) -> bool {
        self.stats.disk.ok()
    }

    /// Asks the store to try a write while writes fail; a no-op otherwise.
    pub fn probe(&self) {
        self.send(StoreRequest::Probe);
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// The counters, to read after the store is gone.
    pub fn stats_handle(&self) -> Arc<StoreStats> {
        self.stats.clone()
    }

    fn send(&self, request: StoreRequest) {
        // Counted before it can be taken (see `StoreWorker`).
        self.queued.fetch_add(1, Ordering::AcqRel);
        if self.addr.do_send(request).is_err() {
            // Refused: the request, and with it the reply's sender, is dropped, so the caller's
            // `Reply` resolves to `Closed`.
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The store as a child of the tree, named `name`, and the client to reach it. The factory
/// opens the store (recovery) on the worker's thread at every start; a failure to open fails the
/// start with an error that names the path.
pub fn spec(name: &str, config: StoreConfig) -> (BlockingSpec<StoreWorker>, StoreClient) {
    let queued = Arc::new(AtomicUsize::new(0));
    let stats = Arc::new(StoreStats::default());
    let spec = {
        let (queued, stats) = (queued.clone(), stats.clone());
        ChildSpec::try_blocking(name, move || {
            let store = Store::open(config.clone(), stats.clone())?;
            Ok(StoreWorker::new(store, queued.clone()))
        })
    };
    let client = StoreClient {
        addr: spec.addr(),
        queued,
        stats,
    };
    (spec, client)
}

#[cfg(test)]
mod tests;
