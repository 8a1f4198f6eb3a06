//! The mailbox of one connection: what the router and the sessions supervisor send it, and the
//! gauge of its backlog that the router reads to apply the session's quota and to pace
//! publishers.
//!
//! The channel is unbounded on purpose — the router must never block — and bounded in practice
//! by the [`Backlog`]: each delivery counts (one message, its topic and payload bytes) until the
//! connection has encoded it for its socket. Two limits act on it:
//!
//! - **Pacing.** When a subscriber's backlog passes [`HIGH_WATER`] messages (or
//!   [`HIGH_WATER_BYTES`]), the router holds back the reply to the publishers whose messages
//!   went there (their connections hold further requests meanwhile, and stop reading their
//!   sockets once they hold a few hundred KiB), until the subscriber is down to [`LOW_WATER`].
//!   A subscriber that keeps up paces its publishers and loses nothing. One that does not get
//!   there within [`HOLD_MAX`] is *slow*: it holds nobody from then on, until it is down to
//!   `LOW_WATER` again (WARN once per episode, naming it). So a client that stops reading costs
//!   each publisher at most `HOLD_MAX` once, not its traffic.
//! - **Quota.** While a subscriber keeps up, pacing bounds its backlog (the high-water mark plus
//!   what its publishers had in flight) and it loses nothing. Once it is slow, the session's
//!   [`Quota`](crate::quota::Quota) bounds the backlog in messages and bytes; past it, the
//!   session loses messages (the router drops new ones, or the connection its oldest unsent ones
//!   — counted and logged by [`Drops`](crate::quota::Drops)).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};

use crate::quota::Quota;
use crate::store::{Message, Qos};

/// A subscriber's backlog at which publishers to it are held back: this many messages, or …
pub const HIGH_WATER: usize = 1_000;
/// … this many bytes of them (big messages reach it first).
pub const HIGH_WATER_BYTES: u64 = 8 << 20;
/// The backlog at which they are let go again (in messages and in bytes).
pub const LOW_WATER: usize = HIGH_WATER / 2;
const LOW_WATER_BYTES: u64 = HIGH_WATER_BYTES / 2;
/// The longest a publisher is held for one subscriber's backlog; past it the subscriber is slow
/// and holds nobody until it is down to [`LOW_WATER`].
pub const HOLD_MAX: Duration = Duration::from_millis(250);

/// Which connection: a number unique for the broker process's life.
pub type ConnId = u64;

/// A message for a connection to send to its client.
#[derive(Clone, Debug)]
pub struct Deliver {
    pub msg: Arc<Message>,
    /// The QoS for this recipient: at most the message's and the subscription's.
    pub qos: Qos,
    /// Send with the retain flag (a retained message sent because of a new subscription).
    pub retain: bool,
    /// Queued in the store for this (persistent) session: the connection logs `Sent`,
    /// `Received` and `Completed` for it.
    pub stored: bool,
}

impl Deliver {
    /// What it costs against the byte quota.
    pub fn size(&self) -> u64 {
        self.msg.size()
    }
}

/// What a connection's task receives besides its socket.
pub enum ToConn {
    Deliver(Deliver),
    /// Another connection has taken over the client id: close (the will is published).
    TakenOver,
    /// The broker closes the connection, for this reason (logged; no will: the client did
    /// nothing wrong).
    Evict(&'static str),
    /// The broker is shutting down, step 1: stop taking PUBLISH from the client; answer once
    /// every publication already taken has been routed (its acknowledgement sent).
    Quiesce(oneshot::Sender<()>),
    /// Step 2: send what is queued, finish the flows in flight, close by `deadline` at the latest.
    Close {
        deadline: Instant,
    },
}

/// A connection's backlog gauge: deliveries handed to it and not yet encoded for its socket.
#[derive(Default)]
pub struct Backlog {
    queued: AtomicUsize,
    /// Topic and payload bytes of the queued deliveries.
    bytes: AtomicU64,
    /// Someone waits for the backlog to fall (set by [`Backlog::below_low_water`]).
    waited_on: AtomicBool,
    /// It kept a publisher waiting for [`HOLD_MAX`]: it holds nobody until it is down to
    /// [`LOW_WATER`].
    slow: AtomicBool,
    /// Messages were dropped for it over its quota, and it has not recovered yet.
    over: AtomicBool,
    /// The connection is gone: nobody should wait for it.
    closed: AtomicBool,
    drained: Notify,
}

impl Backlog {
    /// One more delivery of `size` bytes.
    pub fn add(&self, size: u64) {
        self.bytes.fetch_add(size, Ordering::AcqRel);
        self.queued.fetch_add(1, Ordering::AcqRel);
    }

    /// `n` deliveries of `bytes` in all were encoded for the socket (or dropped).
    pub fn sent(&self, n: usize, bytes: u64) {
        let left_bytes = self
            .bytes
            .fetch_sub(bytes, Ordering::AcqRel)
            .saturating_sub(bytes);
        let left = self.queued.fetch_sub(n, Ordering::AcqRel).saturating_sub(n);
        if at_low_water(left, left_bytes) {
            self.slow.store(false, Ordering::Release);
            if self.waited_on.swap(false, Ordering::AcqRel) {
                self.drained.notify_waiters();
            }
        }
    }

    /// Messages and bytes queued now.
    pub fn level(&self) -> (usize, u64) {
        (
            self.queued.load(Ordering::Acquire),
            self.bytes.load(Ordering::Acquire),
        )
    }

    /// Whether one more message of `size` may wait here: always while the connection keeps up
    /// (its publishers are paced, which bounds what waits), else if it fits in `quota`.
    pub fn admits(&self, quota: &Quota, size: u64) -> bool {
        if !self.quota_applies() {
            return true;
        }
        let (messages, bytes) = self.level();
        quota.admits(messages, bytes, size)
    }

    /// Whether what waits is over `quota` and the quota applies.
    pub fn over(&self, quota: &Quota) -> bool {
        let (messages, bytes) = self.level();
        self.quota_applies() && quota.exceeded_by(messages, bytes)
    }

    /// The quota applies from the moment the connection does not keep up (it kept a publisher
    /// waiting for [`HOLD_MAX`]) until it is well within its quota again (the episode over it
    /// ends): in between, pacing no longer bounds what waits.
    fn quota_applies(&self) -> bool {
        self.slow.load(Ordering::Acquire) || self.over.load(Ordering::Acquire)
    }

    /// Whether publishers are held for it now (past the high-water mark and not slow).
    fn congested(&self) -> bool {
        let (queued, bytes) = self.level();
        (queued > HIGH_WATER || bytes > HIGH_WATER_BYTES) && !self.slow.load(Ordering::Acquire)
    }

    /// Marks an episode over the quota (if one is not under way already).
    pub fn mark_over(&self) {
        self.over.store(true, Ordering::Release);
    }

    /// Ends the episode over the quota if one is under way and the backlog is well within
    /// `quota` again; true if it ended now.
    pub fn end_over(&self, quota: &Quota) -> bool {
        let (messages, bytes) = self.level();
        self.over.load(Ordering::Acquire)
            && quota.recovered(messages, bytes)
            && self.over.swap(false, Ordering::AcqRel)
    }

    /// The connection ended: wake everyone waiting on it.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.drained.notify_waiters();
    }

    /// Waits, until `deadline` at most, for the backlog to be down to [`LOW_WATER`] (or the
    /// connection gone, or marked slow by another publisher's wait). Returns true when this wait
    /// ran out and marked it slow: the caller logs that once. Marking it wakes the others
    /// waiting on it, who no longer wait either.
    pub async fn hold_until(&self, deadline: tokio::time::Instant) -> bool {
        if tokio::time::timeout_at(deadline, self.below_low_water())
            .await
            .is_ok()
        {
            return false;
        }
        let marked = !self.slow.swap(true, Ordering::AcqRel);
        self.drained.notify_waiters();
        marked
    }

    /// Resolves once the backlog is at most [`LOW_WATER`], it is slow, or the connection is gone.
    async fn below_low_water(&self) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.waited_on.store(true, Ordering::Release);
            let (queued, bytes) = self.level();
            if self.closed.load(Ordering::Acquire)
                || self.slow.load(Ordering::Acquire)
                || at_low_water(queued, bytes)
            {
                return;
            }
            notified.await;
        }
    }
}

/// Whether a backlog of `queued` messages and `bytes` is down to the low-water mark.
fn at_low_water(queued: usize, bytes: u64) -> bool {
    queued <= LOW_WATER && bytes <= LOW_WATER_BYTES
}

/// The sending side of a connection's mailbox, as the router and the sessions supervisor hold it.
#[derive(Clone)]
pub struct Outbox {
    pub conn: ConnId,
    tx: mpsc::UnboundedSender<ToConn>,
    pub backlog: Arc<Backlog>,
}

impl Outbox {
    pub fn new(conn: ConnId) -> (Outbox, mpsc::UnboundedReceiver<ToConn>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let outbox = Outbox {
            conn,
            tx,
            backlog: Arc::new(Backlog::default()),
        };
        (outbox, rx)
    }

    /// Hands a delivery over; returns whether publishers should be held for this connection now.
    /// A connection that is gone loses it: if it was `stored`, the store still has it for the
    /// session.
    pub fn deliver(&self, deliver: Deliver) -> bool {
        let size = deliver.size();
        if self.tx.send(ToConn::Deliver(deliver)).is_ok() {
            self.backlog.add(size);
            self.backlog.congested()
        } else {
            false
        }
    }

    pub fn send(&self, msg: ToConn) -> bool {
        self.tx.send(msg).is_ok()
    }
}

/// An outbound packet id in use, and what it is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // MQTT's packet names
pub enum Awaiting {
    /// QoS 1 sent: PUBACK.
    PubAck,
    /// QoS 2 sent: PUBREC.
    PubRec,
    /// QoS 2, PUBREC came and PUBREL was sent: PUBCOMP.
    PubComp,
}

/// An outbound QoS 1/2 flow in progress, kept by the connection under its packet id.
#[derive(Clone, Copy, Debug)]
pub struct Outgoing {
    pub awaiting: Awaiting,
    /// The store tracks it (a persistent session's stored message): log its progress.
    pub stored: bool,
}
