//! The sessions supervisor: starts a [connection](crate::connection) task for every accepted
//! socket, keeps their mailboxes, and drains them when the broker stops.
//!
//! Connections come and go with their clients, so they are not children declared in the tree
//! (whose children are fixed when it is built): this worker supervises them itself, like an OTP
//! `simple_one_for_one` supervisor of temporary children. A connection is never restarted — its
//! client reconnects — and one that ends, normally or by a panic, is removed and reported to the
//! router (the connection's own end, or its drop guard, does that). The worker's drain waits for
//! all of them ([`InFlight`]), so the tree tells the router to stop only after the last one.
//!
//! **Drain**, within the worker's deadline (within [`RESTART_DRAIN`] when the router or the
//! store failed and this worker is stopped to be restarted with them):
//! 1. every connection stops taking PUBLISH, and answers once what it took is routed — so every
//!    message a publisher was (or is about to be) acknowledged for has reached the subscribers'
//!    mailboxes (or the store, for persistent sessions);
//! 2. then every connection sends what it holds, waits for its acknowledgements in flight and
//!    closes, by a deadline a little before the worker's own. A client that does not read is cut
//!    off at that deadline; what it was owed, if its session is persistent, is in the store.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_supervisor::{InFlight, Stopping, Worker};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::AbortHandle;

use crate::connection::{self, Shared};
use crate::outbox::{ConnId, Outbox, ToConn};

const LOG: &str = "broker::sessions";

/// The most a drain for a restart takes (see [`Sessions::on_stopping`]).
const RESTART_DRAIN: Duration = Duration::from_secs(2);

/// A socket the listener accepted.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Accept {
    pub stream: TcpStream,
    pub peer: SocketAddr,
}

/// The connections alive, with what it takes to tell them something or cancel them.
type Live = Rc<RefCell<HashMap<ConnId, (Outbox, AbortHandle)>>>;

pub struct Sessions {
    shared: Arc<Shared>,
    max_connections: usize,
    live: Live,
    tasks: InFlight,
    draining: bool,
}

impl Sessions {
    pub fn new(shared: Arc<Shared>, max_connections: usize) -> Sessions {
        Sessions {
            shared,
            max_connections,
            live: Rc::default(),
            tasks: InFlight::new(),
            draining: false,
        }
    }
}

impl Actor for Sessions {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Context<Self>) {
        // Stopped without a drain (aborted at its deadline, or restarted): cut what is left.
        for (_, (_, task)) in self.live.borrow_mut().drain() {
            task.abort();
        }
    }
}

impl Handler<Accept> for Sessions {
    type Result = ();

    fn handle(&mut self, accept: Accept, _: &mut Context<Self>) {
        let Accept { stream, peer } = accept;
        if self.draining {
            // Accepted by the kernel before the listener closed; no MQTT was spoken: just close.
            return;
        }
        let open = self.live.borrow().len();
        if open >= self.max_connections {
            log::warn!(
                target: LOG,
                "{peer}: refused: {open} connections open (--max-connections)"
            );
            return;
        }
        // Numbers unique for the process, across restarts of this supervisor: the router may
        // still know a number from a previous instance.
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let (outbox, mailbox) = Outbox::new(id);
        let guard = self.tasks.enter();
        let live = self.live.clone();
        let shared = self.shared.clone();
        let task = actix::spawn({
            let outbox = outbox.clone();
            async move {
                // Dropped however the task ends (also by a panic or cancellation).
                let _entry = LiveEntry {
                    live,
                    id,
                    _guard: guard,
                };
                connection::serve(stream, peer, outbox, mailbox, shared).await;
            }
        });
        self.live
            .borrow_mut()
            .insert(id, (outbox, task.abort_handle()));
    }
}

/// A connection's place in `live` (and in the drain's count), given up when its task ends.
struct LiveEntry {
    live: Live,
    id: ConnId,
    _guard: actix_supervisor::InFlightGuard,
}

impl Drop for LiveEntry {
    fn drop(&mut self) {
        // `stopped` may hold the map while it cancels tasks; it empties it anyway.
        if let Ok(mut live) = self.live.try_borrow_mut() {
            live.remove(&self.id);
        }
    }
}

impl Worker for Sessions {
    fn in_flight(&self) -> Option<&InFlight> {
        Some(&self.tasks)
    }

    fn on_stopping(&mut self, _: &mut Context<Self>, stopping: &Stopping) {
        self.draining = true;
        // A quarter of the time to route what was taken; the rest, but a tenth, to deliver and
        // close; the last tenth is the margin for the closes themselves. For a restart (the
        // router or the store failed) the same steps, but short: nothing goes away for good —
        // persistent sessions are in the store, clients reconnect — and the broker is half down
        // until the connections are closed.
        let mut remaining = stopping.remaining();
        if stopping.restarting() {
            remaining = remaining.min(RESTART_DRAIN);
        }
        let quiesce_by = Instant::now() + remaining / 4;
        let close_by = Instant::now() + remaining.mul_f64(0.9);
        let outboxes: Vec<Outbox> = self
            .live
            .borrow()
            .values()
            .map(|(outbox, _)| outbox.clone())
            .collect();
        log::info!(
            target: LOG,
            "{} {} connections: no more PUBLISH taken; closing by {:.1?} from now",
            if stopping.restarting() {
                "restart: closing"
            } else {
                "draining"
            },
            outboxes.len(),
            close_by - Instant::now()
        );
        self.shared
            .stats
            .closed_in_drain
            .store(outboxes.len() as u64, Ordering::Relaxed);
        // Tracked: the worker's drain waits for this too.
        let guard = self.tasks.enter();
        actix::spawn(async move {
            let mut quiet = Vec::new();
            for outbox in &outboxes {
                let (done, wait) = oneshot::channel();
                if outbox.send(ToConn::Quiesce(done)) {
                    quiet.push(wait);
                }
            }
            let until = tokio::time::Instant::from_std(quiesce_by);
            for wait in quiet {
                // A connection that ends meanwhile drops its sender: that is an answer too.
                if tokio::time::timeout_at(until, wait).await.is_err() {
                    break;
                }
            }
            for outbox in &outboxes {
                outbox.send(ToConn::Close { deadline: close_by });
            }
            drop(guard);
        });
    }
}
