//! Running a plain actix actor as a supervised worker.
//!
//! A worker is the user's actor in its own `Context<Self>`, plus two pieces the tree adds:
//!
//! * the **pump**, an actor future spawned into the worker's context, which feeds the worker
//!   from its [mailbox](crate::mailbox) and carries out the drain when `Stopping` comes out of
//!   it: `on_stopping`, then every message already accepted or arriving meanwhile, then the
//!   tracked in-flight work, then the gate closes, then `on_drained`, then the acknowledgement,
//!   then `ctx.stop()`. Because it runs inside the context it gets `&mut A` and the context, as a
//!   handler would, and `ctx.wait` pauses it like it pauses actix's own mailbox;
//! * the **cell**, the task future around the actor's `ContextFut`, which catches a panic
//!   anywhere in the actor (handler, hook, `started`), ends the task when the runtime aborts it,
//!   and reports an exit that came without an acknowledgement.
//!
//! actix's `ctx.stop()` drops whatever is still queued, so the worker stops only after its own
//! mailbox is closed and empty.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Waker};

use actix::dev::ContextFut;
use actix::fut::ActorFuture;
use actix::prelude::*;
use parking_lot::Mutex;

use crate::mailbox::{Envelope, Fetched, Mailbox};
use crate::protocol::{panic_message, DrainStats, Event, EventTx, Exit, Gen, NodeId, Stopping};

const LOG: &str = "actix_supervisor::worker";

/// Messages a worker handles in one go before it lets other tasks on its arbiter run.
const BATCH_LIMIT: usize = 256;

/// A future that runs inside the worker's context, with access to the actor.
pub type HookFuture<A> = Pin<Box<dyn ActorFuture<A, Output = ()>>>;

/// What turns an actix actor into a supervised worker: two hooks, both optional.
///
/// The drain guarantees (handled before the acknowledgement, or refused at the sender, or counted
/// as dropped) cover messages sent through the worker's [`ChildAddr`](crate::ChildAddr). Its raw
/// actix `Addr` (`ctx.address()`) still works — actix's mailbox is drained on every poll, before
/// the tree's — but actix drops whatever reaches it after the worker stopped, uncounted; give
/// other actors the `ChildAddr`.
///
/// ```
/// use actix::prelude::*;
/// use actix_supervisor::{Stopping, Worker};
///
/// struct Writer { buffered: Vec<String> }
/// impl Actor for Writer { type Context = Context<Self>; }
///
/// impl Worker for Writer {
///     fn on_stopping(&mut self, _ctx: &mut Context<Self>, stopping: &Stopping) {
///         log::info!("told to stop ({}), {:?} left", stopping.reason, stopping.remaining());
///     }
///     fn on_drained(&mut self, _ctx: &mut Context<Self>) -> Option<actix_supervisor::HookFuture<Self>> {
///         self.buffered.clear(); // flush
///         None                   // done synchronously
///     }
/// }
/// ```
pub trait Worker: Actor<Context = Context<Self>> {
    /// Called when `Stopping` comes out of the mailbox, after every message queued before it:
    /// stop intake here (close listeners, cancel timers, refuse new external work). Messages
    /// already accepted, and those that arrive while draining, are still handled afterwards.
    fn on_stopping(&mut self, ctx: &mut Context<Self>, stopping: &Stopping) {
        let _ = (ctx, stopping);
    }

    /// Called once the mailbox is empty and closed and tracked in-flight work has finished:
    /// flush and close. Return `Some(future)` to finish asynchronously; the acknowledgement
    /// waits for it (within the child's deadline).
    fn on_drained(&mut self, ctx: &mut Context<Self>) -> Option<HookFuture<Self>> {
        let _ = ctx;
        None
    }

    /// The tracker of this worker's own asynchronous work, if it keeps one. The drain waits until
    /// it is idle before closing the mailbox. See [`InFlight`].
    fn in_flight(&self) -> Option<&InFlight> {
        None
    }
}

/// Counts a worker's asynchronous work in progress, so the drain can wait for it.
///
/// actix cancels futures spawned in a context when the actor stops; a worker that answers
/// messages with futures keeps an `InFlight`, wraps each such future with [`InFlight::track`],
/// and returns it from [`Worker::in_flight`].
#[derive(Clone, Default)]
pub struct InFlight {
    inner: Arc<Mutex<InFlightState>>,
}

#[derive(Default)]
struct InFlightState {
    count: usize,
    idle_waker: Option<Waker>,
}

/// Held while one unit of tracked work is in progress; dropping it ends the unit.
pub struct InFlightGuard {
    inner: Arc<Mutex<InFlightState>>,
}

impl InFlight {
    /// Creates an idle tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts one unit of work; it ends when the guard is dropped.
    pub fn enter(&self) -> InFlightGuard {
        self.inner.lock().count += 1;
        InFlightGuard {
            inner: self.inner.clone(),
        }
    }

    /// Wraps a future so it counts as in flight until it completes or is dropped.
    pub fn track<F: Future>(&self, fut: F) -> impl Future<Output = F::Output> {
        let guard = self.enter();
        async move {
            let out = fut.await;
            drop(guard);
            out
        }
    }

    /// Units of work in progress.
    pub fn count(&self) -> usize {
        self.inner.lock().count
    }

    /// True when idle; otherwise remembers `waker` to wake when the count reaches zero.
    fn idle_or_register(&self, waker: &Waker) -> bool {
        let mut st = self.inner.lock();
        if st.count == 0 {
            true
        } else {
            st.idle_waker = Some(waker.clone());
            false
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let waker = {
            let mut st = self.inner.lock();
            st.count -= 1;
            if st.count == 0 {
                st.idle_waker.take()
            } else {
                None
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Where the pump is in the worker's life.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Handling messages; `Started` not yet reported.
    Starting,
    Running,
    /// `Stopping` was handled; draining what is accepted.
    Draining,
    /// The mailbox is closed; the drained hook runs (`Pump::hook`, if it returned a future).
    Flushing,
    Done,
}

/// Feeds the worker from its mailbox and carries out the drain. See the module docs.
pub(crate) struct Pump<A: Worker> {
    mailbox: Arc<Mailbox<A>>,
    batch: VecDeque<Envelope<A>>,
    phase: Phase,
    /// The drained hook's future, while it runs. Beside `phase` rather than inside it, which
    /// keeps the pump — allocated once per worker — small.
    hook: Option<HookFuture<A>>,
    /// Its instance. (The child's id is read from the mailbox: one field less keeps the pump,
    /// allocated once per worker, in a smaller size class.)
    gen: Gen,
    events: EventTx,
}

impl<A: Worker> Pump<A> {
    /// Handles the batch taken from the mailbox, up to `BATCH_LIMIT` messages per poll.
    /// `Ready` when the batch is empty; `Pending` when the context must run something else
    /// first (a `ctx.wait`, a stop, or other tasks on this arbiter).
    fn handle_batch(
        &mut self,
        act: &mut A,
        ctx: &mut Context<A>,
        task: &mut TaskContext<'_>,
        handled: &mut usize,
    ) -> Poll<()> {
        loop {
            if ctx.waiting() {
                // `ctx.wait` or a stop is in progress: the context polls us again after it.
                return Poll::Pending;
            }
            if !self.mailbox.inst.is_current(self.gen) {
                // Aborted while handling this batch (from another thread): stop here; the cell
                // ends the task at its next poll and the rest of the batch goes back.
                task.waker().wake_by_ref();
                return Poll::Pending;
            }
            if *handled >= BATCH_LIMIT {
                // Let the other tasks on this arbiter run; continue right after them.
                task.waker().wake_by_ref();
                return Poll::Pending;
            }
            match self.batch.pop_front() {
                None => return Poll::Ready(()),
                Some(Envelope::Message(job)) => {
                    job.run(act, ctx);
                    self.mailbox.inst.add_handled(1);
                    *handled += 1;
                }
                Some(Envelope::Stop) => {
                    if let Some(order) = self.mailbox.stop_order() {
                        self.begin_drain(act, ctx, &order);
                    }
                }
            }
        }
    }

    fn begin_drain(&mut self, act: &mut A, ctx: &mut Context<A>, order: &Stopping) {
        if self.phase != Phase::Draining {
            self.phase = Phase::Draining;
            self.mailbox.inst.mark_draining();
            act.on_stopping(ctx, order);
        }
    }
}

impl<A: Worker> ActorFuture<A> for Pump<A> {
    type Output = ();

    fn poll(
        mut self: Pin<&mut Self>,
        act: &mut A,
        ctx: &mut Context<A>,
        task: &mut TaskContext<'_>,
    ) -> Poll<()> {
        let this = &mut *self;
        if let Phase::Starting = this.phase {
            // First poll: `started` ran and any `ctx.wait` it set up has finished.
            let _ = this
                .events
                .send(Event::Started(this.mailbox.inst.node(), this.gen));
            this.phase = Phase::Running;
        }
        let mut handled = 0;
        loop {
            match this.phase {
                Phase::Starting | Phase::Running | Phase::Draining => {
                    if this.handle_batch(act, ctx, task, &mut handled).is_pending() {
                        return Poll::Pending;
                    }
                    // The drain may end once tracked in-flight work is idle too.
                    let may_close = this.phase == Phase::Draining
                        && act
                            .in_flight()
                            .is_none_or(|t| t.idle_or_register(task.waker()));
                    match this.mailbox.fetch(&mut this.batch, task.waker(), may_close) {
                        Fetched::Messages => {}
                        Fetched::Stop(order) => this.begin_drain(act, ctx, &order),
                        Fetched::Drained => {
                            this.hook = act.on_drained(ctx);
                            this.phase = Phase::Flushing;
                        }
                        Fetched::Nothing => return Poll::Pending,
                    }
                }
                Phase::Flushing => {
                    if let Some(fut) = &mut this.hook {
                        if fut.as_mut().poll(act, ctx, task).is_pending() {
                            return Poll::Pending;
                        }
                    }
                    let stats = DrainStats {
                        drained: this.mailbox.inst.drained_since_told(),
                    };
                    this.mailbox.inst.mark_acked();
                    let _ =
                        this.events
                            .send(Event::Acked(this.mailbox.inst.node(), this.gen, stats));
                    this.phase = Phase::Done;
                    ctx.stop();
                    return Poll::Ready(());
                }
                Phase::Done => return Poll::Ready(()),
            }
        }
    }
}

impl<A: Worker> Drop for Pump<A> {
    fn drop(&mut self) {
        // The instance is going away without handling these: keep them accepted-but-unhandled,
        // where the report counts them and a later instance could take them.
        self.mailbox.give_back(&mut self.batch);
    }
}

/// The task around one actor instance. See the module docs.
struct Cell<A: Worker> {
    fut: Option<ContextFut<A, Context<A>>>,
    /// The waker last handed to the mailbox; tokio gives a task the same one every poll, so
    /// the mailbox lock is taken only once.
    registered: Option<Waker>,
    mailbox: Arc<Mailbox<A>>,
    id: NodeId,
    gen: Gen,
    events: EventTx,
}

impl<A: Worker> Future for Cell<A> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, task: &mut TaskContext<'_>) -> Poll<()> {
        let this = &mut *self;
        let Some(fut) = this.fut.as_mut() else {
            return Poll::Ready(());
        };
        if !this.mailbox.inst.is_current(this.gen) {
            log::debug!(target: LOG, "{:?} instance {} aborted", this.id, this.gen);
            this.drop_instance();
            return Poll::Ready(());
        }
        match catch_unwind(AssertUnwindSafe(|| Pin::new(fut).poll(task))) {
            Ok(Poll::Pending) => {
                if !this
                    .registered
                    .as_ref()
                    .is_some_and(|w| w.will_wake(task.waker()))
                {
                    this.mailbox.register_waker(task.waker());
                    this.registered = Some(task.waker().clone());
                }
                Poll::Pending
            }
            Ok(Poll::Ready(())) => {
                this.fut = None;
                let inst = &this.mailbox.inst;
                if !inst.is_acked() && inst.is_current(this.gen) {
                    let draining = inst.is_draining();
                    let _ = this.events.send(Event::Exited(
                        this.id,
                        this.gen,
                        Exit::Stopped { draining },
                    ));
                }
                Poll::Ready(())
            }
            Err(payload) => {
                let msg = panic_message(&*payload);
                this.drop_instance();
                let _ = this
                    .events
                    .send(Event::Exited(this.id, this.gen, Exit::Panicked(msg)));
                Poll::Ready(())
            }
        }
    }
}

impl<A: Worker> Cell<A> {
    /// Drops the actor and its context. actix polls a live context once more while dropping it
    /// (running `stopping`/`stopped`); a panic there must not escape into the arbiter.
    fn drop_instance(&mut self) {
        if let Some(fut) = self.fut.take() {
            let _ = catch_unwind(AssertUnwindSafe(move || drop(fut)));
        }
    }
}

/// Creates instance `gen` with the mailbox's factory and runs it on the current thread's arbiter.
/// Returns the factory's error, if any; a panic in the factory is returned as an error too.
pub(crate) fn spawn_instance<A: Worker>(
    mailbox: Arc<Mailbox<A>>,
    id: NodeId,
    gen: Gen,
    events: EventTx,
) -> Result<(), String> {
    let act = match catch_unwind(AssertUnwindSafe(&*mailbox.factory)) {
        Ok(Ok(act)) => act,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(payload) => return Err(format!("factory panicked: {}", panic_message(&*payload))),
    };
    mailbox.inst.set_node(id);
    let mut ctx = Context::<A>::new();
    ctx.spawn(Pump {
        mailbox: mailbox.clone(),
        batch: VecDeque::new(),
        phase: Phase::Starting,
        hook: None,
        gen,
        events: events.clone(),
    });
    let cell = Cell {
        fut: Some(ctx.into_future(act)),
        registered: None,
        mailbox,
        id,
        gen,
        events,
    };
    actix_rt::spawn(cell);
    Ok(())
}
