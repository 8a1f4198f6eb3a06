//! The mailbox the tree keeps in front of each worker, with the factory that makes the actor
//! instances it feeds.
//!
//! actix's own mailbox cannot be closed from the inside, has no length, and dies with the actor.
//! This one is owned by the tree instead, which is what lets it promise the protocol's rules:
//! `Stopping` is queued behind everything accepted before it; the gate closes atomically, so a
//! send either is accepted (and will be handled or counted as dropped) or fails at the sender;
//! and `accepted - handled` is exact, so the report can count what an abort dropped. Because it
//! outlives any one actor instance, the address handed out for a child stays the same for the
//! tree's whole life.
//!
//! The worker side takes the whole queue in one swap and handles the batch without locking, so a
//! busy worker pays for one lock per batch, a sender for one uncontended lock per message.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Waker;

use actix::Actor;
use parking_lot::Mutex;

use crate::error::BoxError;
use crate::instance::InstanceState;
use crate::protocol::Stopping;

/// Makes a fresh actor instance for every start of the worker.
pub(crate) type Factory<A> = dyn Fn() -> Result<A, BoxError> + Send + Sync;

/// One accepted message, already bound to the handler that will run it.
pub(crate) type Job<A> = Box<dyn Runnable<A>>;

/// A message boxed with the knowledge of how to handle it, so one queue holds every message type.
pub(crate) trait Runnable<A: Actor>: Send {
    fn run(self: Box<Self>, act: &mut A, ctx: &mut A::Context);
    /// Hands the box back as `Any`, so a refused sender can recover its message.
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any>;
}

/// What travels through a worker's mailbox.
pub(crate) enum Envelope<A: Actor> {
    /// A user message.
    Message(Job<A>),
    /// The tree's `Stopping` order; its details wait in [`State::stop_order`].
    Stop,
}

pub(crate) struct Mailbox<A: Actor> {
    state: Mutex<State<A>>,
    pub(crate) factory: Box<Factory<A>>,
    /// Which instance is current, its drain state, and the counts.
    pub(crate) inst: InstanceState,
    /// Bound on queued messages for `try_send`/`send`; 0 means unbounded.
    capacity: AtomicUsize,
    /// Senders waiting in `send` for room in a full mailbox. Made on first use: most mailboxes
    /// are unbounded and never need it.
    room: std::sync::OnceLock<Box<tokio::sync::Notify>>,
}

struct State<A: Actor> {
    queue: VecDeque<Envelope<A>>,
    /// Messages ever accepted (pushed while open).
    accepted: u64,
    closed: bool,
    /// The worker found the queue empty and waits for a push to wake it.
    parked: bool,
    waker: Option<Waker>,
    /// Shared by the siblings told in the same pass.
    stop_order: Option<Arc<Stopping>>,
    /// `Stopping` came while the queue was empty, so it goes before anything queued since,
    /// without an envelope (an idle worker's queue then never allocates).
    stop_first: bool,
    senders_waiting_for_room: u32,
}

/// What [`Mailbox::fetch`] found.
pub(crate) enum Fetched {
    /// `Stopping`, ahead of anything queued.
    Stop(Arc<Stopping>),
    /// Messages, now in the worker's batch (possibly with a `Stop` envelope among them).
    Messages,
    /// Nothing queued and the drain may end: the gate is now closed, or — when the instance is
    /// stopped for a restart — left open for the next instance.
    Drained,
    /// Nothing queued; the worker is parked.
    Nothing,
}

/// Why a push was refused; the caller gets its message back.
pub(crate) enum Refused<T> {
    Closed(T),
    Full(T),
}

impl<A: Actor> Mailbox<A> {
    pub(crate) fn new(factory: Box<Factory<A>>) -> Self {
        Mailbox {
            factory,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                accepted: 0,
                closed: false,
                parked: false,
                waker: None,
                stop_order: None,
                stop_first: false,
                senders_waiting_for_room: 0,
            }),
            inst: InstanceState::default(),
            capacity: AtomicUsize::new(0),
            room: std::sync::OnceLock::new(),
        }
    }

    /// Accepts a message unless the mailbox is closed, or full and `respect_capacity` is set.
    pub(crate) fn push(&self, job: Job<A>, respect_capacity: bool) -> Result<(), Refused<Job<A>>> {
        let mut st = self.state.lock();
        if st.closed {
            return Err(Refused::Closed(job));
        }
        if respect_capacity && self.is_full(&st) {
            return Err(Refused::Full(job));
        }
        st.queue.push_back(Envelope::Message(job));
        st.accepted += 1;
        st.wake_if_parked();
        Ok(())
    }

    /// Waits until the mailbox has room (or is closed). Used by `send` on a bounded mailbox.
    pub(crate) async fn wait_for_room(&self) {
        loop {
            let notified = self.room.get_or_init(Box::default).notified();
            {
                let mut st = self.state.lock();
                if st.closed || !self.is_full(&st) {
                    return;
                }
                st.senders_waiting_for_room += 1;
            }
            notified.await;
            self.state.lock().senders_waiting_for_room -= 1;
        }
    }

    /// Queues the `Stopping` order behind everything accepted so far; when the drain ends the
    /// gate closes if `close`, else it stays open for the next instance. Returns false when the
    /// mailbox is already closed (the worker acknowledged or is gone).
    pub(crate) fn push_stop(&self, order: Arc<Stopping>, close: bool) -> bool {
        let mut st = self.state.lock();
        if st.closed || st.stop_order.is_some() {
            return false;
        }
        st.stop_order = Some(order);
        self.inst.mark_told(close);
        if st.queue.is_empty() {
            st.stop_first = true;
        } else {
            st.queue.push_back(Envelope::Stop);
        }
        st.wake_if_parked();
        true
    }

    /// The `Stopping` order, once queued.
    pub(crate) fn stop_order(&self) -> Option<Arc<Stopping>> {
        self.state.lock().stop_order.clone()
    }

    /// Makes a drain already under way close the gate when it ends (the tree began shutting
    /// down while the worker was stopping for a restart). Under the lock, so the worker's last
    /// visit to the mailbox either sees it or finished before it.
    pub(crate) fn close_when_drained(&self) {
        let _st = self.state.lock();
        self.inst.set_close_on_drain();
    }

    /// Readies the mailbox for a new instance and returns its generation: the gate reopens, a
    /// `Stopping` meant for an earlier instance is forgotten, and whatever is queued waits for
    /// the new one.
    pub(crate) fn new_instance(&self) -> u32 {
        let mut st = self.state.lock();
        st.closed = false;
        st.parked = false;
        st.stop_order = None;
        st.stop_first = false;
        st.queue.retain(|e| matches!(e, Envelope::Message(_)));
        self.inst.new_generation()
    }

    /// The worker's one trip to the mailbox when its batch (which must be empty) runs out:
    /// a `Stopping` that goes first, else everything queued (moved into `batch`), else — when
    /// `may_close` (draining, nothing in flight) — the gate closes, else the worker is parked
    /// and `waker` will be woken by the next push.
    pub(crate) fn fetch(
        &self,
        batch: &mut VecDeque<Envelope<A>>,
        waker: &Waker,
        may_close: bool,
    ) -> Fetched {
        debug_assert!(batch.is_empty());
        let mut st = self.state.lock();
        if std::mem::take(&mut st.stop_first) {
            if let Some(order) = st.stop_order.clone() {
                return Fetched::Stop(order);
            }
        }
        if !st.queue.is_empty() {
            std::mem::swap(&mut st.queue, batch);
            let waiting = st.senders_waiting_for_room > 0;
            drop(st);
            if waiting {
                self.notify_room();
            }
            return Fetched::Messages;
        }
        if may_close {
            if self.inst.close_on_drain() {
                self.close_locked(st);
            }
            return Fetched::Drained;
        }
        st.parked = true;
        st.set_waker(waker);
        Fetched::Nothing
    }

    /// Closes the gate for good (the child is gone): later sends fail at the sender, and what is
    /// still queued will never be handled, so it is dropped now — it stays counted (`accepted -
    /// handled`), and a `send` waiting for its answer learns at once that none will come.
    pub(crate) fn close(&self) {
        let mut st = self.state.lock();
        let leftovers = std::mem::take(&mut st.queue);
        self.close_locked(st);
        // Outside the lock: dropping a message runs the user's `Drop`.
        drop(leftovers);
    }

    fn close_locked(&self, mut st: parking_lot::MutexGuard<'_, State<A>>) {
        st.closed = true;
        let waiting = st.senders_waiting_for_room > 0;
        drop(st);
        if waiting {
            // Senders waiting for room learn that there will be none.
            self.notify_room();
        }
    }

    /// Puts back messages a dying instance took but did not handle, ahead of newer ones.
    /// If the gate closed for good meanwhile, they are dropped instead (see [`close`]).
    ///
    /// [`close`]: Mailbox::close
    pub(crate) fn give_back(&self, batch: &mut VecDeque<Envelope<A>>) {
        if batch.is_empty() {
            return;
        }
        let mut st = self.state.lock();
        if st.closed {
            drop(st);
            batch.clear();
            return;
        }
        while let Some(env) = batch.pop_back() {
            st.queue.push_front(env);
        }
        // The next instance may already be parked, waiting for a push.
        st.wake_if_parked();
    }

    /// Records the task's current waker so that an abort can wake it wherever it waits.
    pub(crate) fn register_waker(&self, waker: &Waker) {
        self.state.lock().set_waker(waker);
    }

    /// Makes the current instance stale, so its task ends at its next poll, and wakes it for
    /// that. The gate is left as it is: the runtime closes it when the child is gone for good.
    pub(crate) fn request_abort(&self) {
        self.inst.retire();
        let waker = self.state.lock().waker.clone();
        if let Some(w) = waker {
            w.wake();
        }
    }

    pub(crate) fn accepted(&self) -> u64 {
        self.state.lock().accepted
    }

    fn notify_room(&self) {
        if let Some(room) = self.room.get() {
            room.notify_waiters();
        }
    }

    fn is_full(&self, st: &State<A>) -> bool {
        let cap = self.capacity.load(Ordering::Relaxed);
        cap != 0 && st.queue.len() >= cap
    }

    pub(crate) fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity, Ordering::Relaxed);
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state.lock().closed
    }
}

impl<A: Actor> State<A> {
    /// Wakes the worker if it waits for messages. Under the lock, by reference: cloning the
    /// waker to wake it after unlocking would cost two more atomic operations per wake.
    fn wake_if_parked(&mut self) {
        if self.parked {
            self.parked = false;
            if let Some(w) = &self.waker {
                w.wake_by_ref();
            }
        }
    }

    fn set_waker(&mut self, waker: &Waker) {
        match &self.waker {
            Some(w) if w.will_wake(waker) => {}
            _ => self.waker = Some(waker.clone()),
        }
    }
}
