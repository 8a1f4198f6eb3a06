//! The mailbox of one connection: what the router and the sessions supervisor send it, and the
//! back-pressure gauge that lets the router slow publishers down when it reads too slowly.
//!
//! The channel is unbounded on purpose — the router must never block or drop — and bounded in
//! practice by the [`Backlog`]: each delivery counts until the connection has encoded it for its
//! socket. When a subscriber's backlog passes [`HIGH_WATER`], the router holds back the reply to
//! the publishers whose messages went there; a publisher's connection holds its further
//! requests while its replies are held, and stops reading its socket once it holds a few hundred
//! KiB of them (TCP then pushes back on the client). The subscriber wakes them when it is down to
//! [`LOW_WATER`]. So the memory a slow subscriber costs is about `HIGH_WATER` plus what the
//! publishers had in flight, never what they would like to send.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, Notify};

use crate::store::{Message, Qos};

/// A subscriber's backlog at which publishers to it are held back.
pub const HIGH_WATER: usize = 1_000;
/// The backlog at which they are let go again.
pub const LOW_WATER: usize = HIGH_WATER / 2;

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

/// What a connection's task receives besides its socket.
pub enum ToConn {
    Deliver(Deliver),
    /// Another connection has taken over the client id: close (the will is published).
    TakenOver,
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
    /// Someone waits for the backlog to fall (set by [`Backlog::below_low_water`]).
    waited_on: AtomicBool,
    /// The connection is gone: nobody should wait for it.
    closed: AtomicBool,
    drained: Notify,
}

impl Backlog {
    pub fn add(&self, n: usize) -> usize {
        self.queued.fetch_add(n, Ordering::AcqRel) + n
    }

    /// `n` deliveries were encoded for the socket.
    pub fn sent(&self, n: usize) {
        let left = self.queued.fetch_sub(n, Ordering::AcqRel).saturating_sub(n);
        if left <= LOW_WATER && self.waited_on.swap(false, Ordering::AcqRel) {
            self.drained.notify_waiters();
        }
    }

    /// The connection ended: wake everyone waiting on it.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.drained.notify_waiters();
    }

    /// Resolves once the backlog is at most [`LOW_WATER`] or the connection is gone.
    pub async fn below_low_water(&self) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.waited_on.store(true, Ordering::Release);
            if self.closed.load(Ordering::Acquire)
                || self.queued.load(Ordering::Acquire) <= LOW_WATER
            {
                return;
            }
            notified.await;
        }
    }
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

    /// Hands a delivery over; returns whether the connection is congested now. A connection that
    /// is gone loses it: if it was `stored`, the store still has it for the session.
    pub fn deliver(&self, deliver: Deliver) -> bool {
        if self.tx.send(ToConn::Deliver(deliver)).is_ok() {
            self.backlog.add(1) > HIGH_WATER
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
