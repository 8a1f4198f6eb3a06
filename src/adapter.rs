//! Children that are not actors: an **adapter** runs something with a life of its own — an
//! actix-web server, with its accept thread and worker threads — under the tree's rules.
//!
//! The runtime drives every child through [`WorkerControl`]; this module implements it once for
//! any [`Adapter`], so that an integration at the edge (the HTTP server in `web/`) only says how
//! to start its thing, how to stop it (gracefully, or at once) and counts its units of work in a
//! [`WorkCounter`]. The slot keeps what the runtime needs: which instance is current (a
//! generation, as for workers), whether it was told, and the counts when it was told.
//!
//! Life of an instance: `start` runs on the child's arbiter and must leave the thing serving (a
//! server is bound by then, so a bind error fails the start). A task on that arbiter reports it
//! started, then waits for whichever comes first: the thing ending on its own (an exit, which
//! the runtime handles by the restart policy), or `Stopping` — then it asks for a graceful stop,
//! waits for the thing to end, and acknowledges with the work completed since. An abort (the
//! deadline passed) asks for an immediate stop and makes the instance stale, so nothing it says
//! afterwards counts.

use std::any::Any;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::protocol::{panic_message, DrainStats, Event, EventTx, Exit, Gen, NodeId, Stopping};
use crate::report::ChildKind;
use crate::spec::WorkerControl;

/// Asks a running instance to stop: `true` gracefully (finish the work in progress), `false` at
/// once. Callable from any thread, any number of times.
pub(crate) type StopFn = Arc<dyn Fn(bool) + Send + Sync>;

/// A started instance of an adapter.
pub(crate) struct Running {
    /// Resolves when the instance has stopped, on its own or after a stop; an error is why it
    /// failed.
    pub(crate) finished: Pin<Box<dyn Future<Output = Result<(), String>>>>,
    pub(crate) stop: StopFn,
}

/// What the tree needs from a child that is not an actor.
pub(crate) trait Adapter: Send + Sync + 'static {
    /// For the report.
    fn kind(&self) -> ChildKind;
    /// Starts an instance on the current arbiter. `budget` is the child's shutdown budget, so
    /// the thing's own stop timeout can be derived from it.
    fn start(&self, budget: Duration) -> Result<Running, String>;
    /// The units of work (requests) over the child's life.
    fn counter(&self) -> &WorkCounter;
    /// The child is gone for good: release what was kept for later instances (a listening
    /// socket handed over by the user, say).
    fn release(&self) {}
    /// A handle users look up by path ([`TreeHandle`](crate::TreeHandle)), boxed.
    fn handle_any(&self) -> Box<dyn Any + Send>;
}

/// Counts an adapter's units of work from any thread: begun, completed, and ended either way
/// (completed, or cut: the client went away, or the instance was aborted).
#[derive(Debug, Default)]
pub(crate) struct WorkCounter {
    accepted: AtomicU64,
    completed: AtomicU64,
    ended: AtomicU64,
}

impl WorkCounter {
    /// Counts one unit as begun; the guard counts its end.
    pub(crate) fn begin(self: &Arc<Self>) -> WorkGuard {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        WorkGuard {
            counter: self.clone(),
        }
    }

    pub(crate) fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Acquire)
    }

    pub(crate) fn completed(&self) -> u64 {
        self.completed.load(Ordering::Acquire)
    }

    /// Begun and not ended yet.
    pub(crate) fn in_flight(&self) -> u64 {
        // `ended` first: a unit counted in `ended` was counted in `accepted` before it.
        let ended = self.ended.load(Ordering::Acquire);
        self.accepted().saturating_sub(ended)
    }
}

/// One unit of work in progress. Dropped without [`complete`](Self::complete) it was cut.
pub(crate) struct WorkGuard {
    counter: Arc<WorkCounter>,
}

impl WorkGuard {
    pub(crate) fn complete(self) {
        self.counter.completed.fetch_add(1, Ordering::Release);
    }
}

impl Drop for WorkGuard {
    fn drop(&mut self) {
        self.counter.ended.fetch_add(1, Ordering::Release);
    }
}

/// The runtime's side of an adapter: the adapter, and its current instance.
pub(crate) struct AdapterSlot<A: Adapter> {
    adapter: A,
    /// The instance allowed to report; bumped by every new instance and every abort.
    gen: AtomicU32,
    current: Mutex<Option<Current>>,
    /// Work completed and work in flight when the current instance was told (`u64::MAX`: not
    /// told).
    completed_at_told: AtomicU64,
    in_flight_at_told: AtomicU64,
    closed: AtomicBool,
    /// When the current instance's drain ends, the child is gone for good (a shutdown) rather
    /// than waiting for its next instance (a restart).
    close_on_drain: AtomicBool,
    budget: Mutex<Duration>,
}

struct Current {
    gen: Gen,
    /// Taken by the first `tell`.
    told: Option<oneshot::Sender<()>>,
    stop: StopFn,
}

impl<A: Adapter> AdapterSlot<A> {
    pub(crate) fn new(adapter: A) -> Self {
        AdapterSlot {
            adapter,
            gen: AtomicU32::new(0),
            current: Mutex::new(None),
            completed_at_told: AtomicU64::new(u64::MAX),
            in_flight_at_told: AtomicU64::new(u64::MAX),
            closed: AtomicBool::new(false),
            close_on_drain: AtomicBool::new(true),
            budget: Mutex::new(Duration::from_secs(5)),
        }
    }

    fn is_current(&self, gen: Gen) -> bool {
        self.gen.load(Ordering::Acquire) == gen
    }

    /// Waits for the instance's end or its `Stopping`, and tells the runtime which.
    async fn watch(
        self: Arc<Self>,
        id: NodeId,
        gen: Gen,
        events: EventTx,
        mut finished: Pin<Box<dyn Future<Output = Result<(), String>>>>,
        told: oneshot::Receiver<()>,
        stop: StopFn,
    ) {
        let _ = events.send(Event::Started(id, gen));
        let ended_alone = tokio::select! {
            result = &mut finished => Some(result),
            told = told => match told {
                Ok(()) => None,
                Err(_) => {
                    // Aborted: the abort asked for the stop and made this instance stale. The
                    // thing may need polling to stop (a server's command loop is this future).
                    let _ = finished.await;
                    return;
                }
            },
        };
        let event = match ended_alone {
            Some(Ok(())) => Event::Exited(id, gen, Exit::Stopped { draining: false }),
            Some(Err(e)) => Event::Exited(id, gen, Exit::Failed(e)),
            None => {
                stop(true);
                match finished.await {
                    Ok(()) => Event::Acked(
                        id,
                        gen,
                        DrainStats {
                            drained: self.drained_since_told(),
                        },
                    ),
                    Err(e) => Event::Exited(id, gen, Exit::Failed(e)),
                }
            }
        };
        if matches!(event, Event::Acked(..)) && self.close_on_drain.load(Ordering::Acquire) {
            self.close();
        }
        if self.is_current(gen) {
            let _ = events.send(event);
        }
    }
}

impl<A: Adapter> WorkerControl for AdapterSlot<A> {
    fn kind(&self) -> ChildKind {
        self.adapter.kind()
    }

    fn needs_arbiter(&self) -> bool {
        true
    }

    fn set_budget(&self, budget: Duration) {
        *self.budget.lock() = budget;
    }

    fn new_instance(&self) -> Gen {
        self.completed_at_told.store(u64::MAX, Ordering::Release);
        self.in_flight_at_told.store(u64::MAX, Ordering::Release);
        self.closed.store(false, Ordering::Release);
        self.close_on_drain.store(true, Ordering::Release);
        self.gen.fetch_add(1, Ordering::AcqRel).wrapping_add(1)
    }

    fn start(self: Arc<Self>, id: NodeId, gen: Gen, events: EventTx) -> Result<(), String> {
        let budget = *self.budget.lock();
        let running = match catch_unwind(AssertUnwindSafe(|| self.adapter.start(budget))) {
            Ok(Ok(running)) => running,
            Ok(Err(e)) => return Err(e),
            Err(payload) => return Err(format!("start panicked: {}", panic_message(&*payload))),
        };
        let (told_tx, told_rx) = oneshot::channel();
        *self.current.lock() = Some(Current {
            gen,
            told: Some(told_tx),
            stop: running.stop.clone(),
        });
        actix_rt::spawn(self.watch(id, gen, events, running.finished, told_rx, running.stop));
        Ok(())
    }

    fn tell(&self, _order: Arc<Stopping>, close: bool) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let mut current = self.current.lock();
        let Some(told) = current
            .as_mut()
            .filter(|c| self.is_current(c.gen))
            .and_then(|c| c.told.take())
        else {
            return false;
        };
        self.close_on_drain.store(close, Ordering::Release);
        let counter = self.adapter.counter();
        self.completed_at_told
            .store(counter.completed(), Ordering::Release);
        self.in_flight_at_told
            .store(counter.in_flight(), Ordering::Release);
        told.send(()).is_ok()
    }

    fn close_when_drained(&self) {
        self.close_on_drain.store(true, Ordering::Release);
    }

    fn abort(&self) {
        self.gen.fetch_add(1, Ordering::AcqRel);
        // Dropping the `told` sender ends the instance's watch; the stop ends the thing.
        if let Some(current) = self.current.lock().take() {
            (current.stop)(false);
        }
    }

    fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.adapter.release();
        }
    }

    fn counts(&self) -> (u64, u64) {
        let counter = self.adapter.counter();
        (counter.accepted(), counter.completed())
    }

    fn drained_since_told(&self) -> u64 {
        match self.completed_at_told.load(Ordering::Acquire) {
            u64::MAX => 0,
            at => self.adapter.counter().completed().saturating_sub(at),
        }
    }

    fn in_flight_when_told(&self) -> Option<u64> {
        match self.in_flight_at_told.load(Ordering::Acquire) {
            u64::MAX => None,
            n => Some(n),
        }
    }

    fn addr_any(self: Arc<Self>) -> Box<dyn Any + Send> {
        self.adapter.handle_any()
    }
}
