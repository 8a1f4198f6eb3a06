//! Blocking workers: children that run on an OS thread of their own, fed by a crossbeam-channel
//! mailbox, for work that blocks (file I/O with `fsync`, a synchronous database driver).
//!
//! This module owns the whole kind: the [`BlockingWorker`] trait, its spec ([`BlockingSpec`]), its
//! address ([`BlockingAddr`]), the mailbox the tree keeps for it (`BlockingMailbox`, which is also
//! how the runtime drives it) and the loop its thread runs. The contract is the actor workers':
//! `Stopping` is queued behind everything accepted, the worker drains (including what arrives
//! while it drains), runs its drained hook and acknowledges with its drain statistics; a send is
//! either accepted — then handled, or counted as dropped — or refused at the sender with the
//! message handed back.
//!
//! Why a separate kind rather than an actor on an arbiter of its own: a handler that blocks an
//! arbiter also blocks everything else scheduled there (the pump, timers, the tree's runtime if it
//! shares the thread), and actix's `SyncArbiter` gives no way to drain, count or close. Here the
//! thread blocks only on the worker's own channel.
//!
//! Why the gate is an atomic rather than a lock (as in `mailbox.rs`): crossbeam's channel is
//! already a concurrent queue; all the gate must add is "no send slips in after the close". One
//! word holds a CLOSED bit and the number of senders between their check and their push. A sender
//! registers, checks the bit, pushes, counts itself accepted, deregisters; the closer sets the
//! bit and waits (briefly: a push never blocks) until no sender is registered. After that every
//! accepted message is in the channel and counted, and every later send is refused.
//!
//! A thread cannot be cancelled. When the runtime aborts a blocking worker (its deadline passed),
//! it retires the instance's generation and wakes the thread if it waits for messages; a thread
//! stuck inside a handler notices only when the handler returns, then ends without touching
//! anything more. Until then it is detached: the report records the child as timed out and the
//! tree goes on without it.

use std::collections::VecDeque;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::{MailboxError, SendError};
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::error::BoxError;
use crate::instance::InstanceState;
use crate::protocol::{panic_message, DrainStats, Event, EventTx, Exit, Gen, NodeId, Stopping};
use crate::report::ChildKind;
use crate::spec::{common_setters, ChildSpec, Common, SpecKind, WorkerControl};

const LOG: &str = "actix_supervisor::blocking";

/// The gate's CLOSED bit; the bits below count senders between their check and their push.
const CLOSED: u64 = 1 << 63;

/// A worker that runs on an OS thread of its own and may block in its handler.
///
/// Each start of the child calls the factory given to [`ChildSpec::blocking`] **on the worker's
/// thread** (so it may open files or connections there), then [`started`](Self::started), then
/// feeds it messages one at a time, in the order they were accepted. When the tree shuts down,
/// [`on_stopping`](Self::on_stopping) runs after every message queued before the `Stopping`;
/// every message accepted before the mailbox closes is still handled; then
/// [`on_drained`](Self::on_drained) runs, and the worker acknowledges.
///
/// A blocking thread cannot be pre-empted. If the worker has not acknowledged by its deadline
/// (a handler that blocks too long), the tree records it as timed out, counts what it had not
/// handled as dropped, and goes on without it: the thread is detached, and ends at its next step
/// (when the handler returns) without handling anything more. A panic in the factory, a hook or a
/// handler is caught and reported as the end of that instance: while the tree runs, the child
/// is restarted by its [restart policy](crate::Restart) with a fresh instance from the factory,
/// on a new thread, and the messages queued behind the failing one wait for it; while the tree
/// drains, the report records the panic. The message whose handler panicked is lost (a
/// [`send`](BlockingAddr::send) waiting for it gets [`MailboxError::Closed`]) and counted as
/// dropped.
///
/// ```
/// use std::io::Write;
/// use actix_supervisor::{BlockingWorker, ChildKind, ChildSpec, Outcome, Tree};
///
/// /// Appends lines to a file; syncs it to disk before acknowledging the shutdown.
/// struct Journal {
///     file: std::fs::File,
///     lines: u64,
/// }
///
/// impl BlockingWorker for Journal {
///     type Message = String;
///     type Reply = u64; // lines written so far
///
///     fn handle(&mut self, line: String) -> u64 {
///         if let Err(e) = writeln!(self.file, "{line}") {
///             log::error!("journal: {e}");
///         }
///         self.lines += 1;
///         self.lines
///     }
///
///     fn on_drained(&mut self) {
///         let _ = self.file.sync_all(); // everything accepted is written: make it durable
///     }
/// }
///
/// let path = std::env::temp_dir().join(format!("journal-doc-{}.log", std::process::id()));
/// let file_path = path.clone();
/// // The factory runs on the worker's own thread, for every start.
/// let journal = ChildSpec::try_blocking("journal", move || {
///     let file = std::fs::OpenOptions::new().create(true).append(true).open(&file_path)?;
///     Ok(Journal { file, lines: 0 })
/// });
/// let addr = journal.addr();
///
/// actix_rt::System::new().block_on(async move {
///     let tree = Tree::builder("doc").child(journal).build().unwrap();
///     let handle = tree.start().await.unwrap();
///     addr.do_send("first".to_owned()).unwrap();
///     assert_eq!(addr.send("second".to_owned()).await.unwrap(), 2);
///     addr.do_send("third".to_owned()).unwrap();
///
///     let report = handle.shutdown("done").await;
///     let entry = report.find("journal").unwrap();
///     assert_eq!((entry.kind, &entry.outcome), (ChildKind::Blocking, &Outcome::Drained));
///     // After the acknowledgement the address refuses, handing the message back.
///     assert!(addr.do_send("late".to_owned()).is_err());
/// });
/// assert_eq!(std::fs::read_to_string(&path).unwrap(), "first\nsecond\nthird\n");
/// let _ = std::fs::remove_file(&path);
/// ```
pub trait BlockingWorker: Send + 'static {
    /// What the worker is sent.
    type Message: Send + 'static;
    /// What [`handle`](Self::handle) answers; `()` for a fire-and-forget worker.
    type Reply: Send + 'static;

    /// Called on the worker's thread after the factory, before the first message.
    fn started(&mut self) {}

    /// Handles one message. It may block: the worker has the thread to itself.
    fn handle(&mut self, msg: Self::Message) -> Self::Reply;

    /// Called when `Stopping` comes out of the mailbox, after every message queued before it:
    /// stop intake here. Messages already accepted, and those that arrive while draining, are
    /// still handled afterwards.
    fn on_stopping(&mut self, stopping: &Stopping) {
        let _ = stopping;
    }

    /// Called once the mailbox is empty (and, in a shutdown, closed), before the acknowledgement:
    /// flush, `fsync`, close.
    fn on_drained(&mut self) {}

    /// Asked after every message: `Some(reason)` ends this instance as failed — a worker that
    /// finds it cannot go on (its disk failed) says so here rather than panicking. The end is
    /// handled like a panic's: recorded as [`Outcome::Failed`](crate::Outcome::Failed) with the
    /// reason, the child restarted by its policy while the tree runs, and the messages queued
    /// behind it kept for the next instance.
    fn failed(&mut self) -> Option<String> {
        None
    }
}

/// Makes a fresh blocking worker for every start; called on the worker's thread.
type Factory<W> = dyn Fn() -> Result<W, BoxError> + Send + Sync;

type ReplyTx<W> = oneshot::Sender<<W as BlockingWorker>::Reply>;

/// What travels through a blocking worker's channel.
enum Envelope<W: BlockingWorker> {
    /// A user message and, for `send`, where the reply goes.
    Message(W::Message, Option<ReplyTx<W>>),
    /// The `Stopping` order for the instance of that generation; other instances ignore it.
    Stop(Gen, Arc<Stopping>),
    /// Nothing: wakes a thread blocked on the channel so it looks at its state (an abort, or
    /// envelopes given back by a stale instance).
    Wake,
}

/// A blocking worker's permanent slot: its channel, gate and counts, and the factory. One `Arc`
/// per child, shared by every [`BlockingAddr`] and by the runtime, outliving the instances.
pub(crate) struct BlockingMailbox<W: BlockingWorker> {
    tx: Sender<Envelope<W>>,
    rx: Receiver<Envelope<W>>,
    /// CLOSED bit | senders in progress. See the module docs.
    gate: AtomicU64,
    /// Messages ever accepted (pushed while the gate was open).
    accepted: AtomicU64,
    /// Which instance is current, its drain state, the `handled` counts.
    inst: InstanceState,
    /// The generation of the newest instance, which a `Stop` is addressed to. Unlike the
    /// instance state's generation it does not move on an abort.
    newest: AtomicU32,
    /// The newest instance was told `Stopping` already.
    told: AtomicBool,
    /// Serialises the end of a drain (deciding whether to close the gate) with
    /// `close_when_drained` and `new_instance`, so each either sees the other's effect or
    /// happens entirely before it.
    drain_end: Mutex<()>,
    /// Envelopes a stale instance had taken from the channel but not handled, for the current
    /// instance to take first. `has_returned` keeps the common path lock-free.
    returned: Mutex<VecDeque<Envelope<W>>>,
    has_returned: AtomicBool,
    factory: Box<Factory<W>>,
    /// The worker thread's name.
    thread_name: String,
}

/// What the worker thread got when it looked for its next envelope.
enum Next<W: BlockingWorker> {
    Envelope(Envelope<W>),
    /// Nothing queued (only when not waiting).
    Empty,
    /// This instance is no longer current: end without doing anything more.
    Stale,
}

impl<W: BlockingWorker> BlockingMailbox<W> {
    fn new(name: &str, factory: Box<Factory<W>>) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        BlockingMailbox {
            tx,
            rx,
            gate: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            inst: InstanceState::default(),
            newest: AtomicU32::new(0),
            told: AtomicBool::new(false),
            drain_end: Mutex::new(()),
            returned: Mutex::new(VecDeque::new()),
            has_returned: AtomicBool::new(false),
            factory,
            // `std::thread::Builder::spawn` refuses names with a NUL byte.
            thread_name: name.replace('\0', "?"),
        }
    }

    /// Accepts a message unless the gate is closed; a refused message comes back.
    fn push(
        &self,
        msg: W::Message,
        reply: Option<ReplyTx<W>>,
    ) -> Result<(), (W::Message, Option<ReplyTx<W>>)> {
        if self.gate.fetch_add(1, Ordering::AcqRel) & CLOSED != 0 {
            self.gate.fetch_sub(1, Ordering::Release);
            return Err((msg, reply));
        }
        let sent = self.tx.send(Envelope::Message(msg, reply));
        if sent.is_ok() {
            // Before leaving the gate: once a closer sees no sender in progress, the count is final.
            self.accepted.fetch_add(1, Ordering::Relaxed);
        }
        self.gate.fetch_sub(1, Ordering::Release);
        match sent {
            Ok(()) => Ok(()),
            Err(e) => match e.into_inner() {
                Envelope::Message(msg, reply) => Err((msg, reply)),
                // The envelope is the one made above.
                _ => unreachable!("a refused envelope is the message that was sent"),
            },
        }
    }

    fn is_closed(&self) -> bool {
        self.gate.load(Ordering::Acquire) & CLOSED != 0
    }

    /// Closes the gate and waits until no sender is between its check and its push, so that
    /// every accepted message is in the channel and counted.
    fn close_gate(&self) {
        self.gate.fetch_or(CLOSED, Ordering::AcqRel);
        let mut spins = 0u32;
        while self.gate.load(Ordering::Acquire) & !CLOSED != 0 {
            // A sender in progress only has an unbounded push left to do; it is done at once
            // unless its thread was descheduled, which yielding lets it finish.
            if spins < 64 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// The worker thread's next envelope: one a stale instance gave back, else the channel's.
    fn next(&self, gen: Gen, wait: bool) -> Next<W> {
        loop {
            if !self.inst.is_current(gen) {
                return Next::Stale;
            }
            if let Some(env) = self.take_returned() {
                return Next::Envelope(env);
            }
            let env = if wait {
                match self.rx.recv() {
                    Ok(env) => env,
                    // The mailbox holds a sender as long as it exists.
                    Err(_) => return Next::Stale,
                }
            } else {
                match self.rx.try_recv() {
                    Ok(env) => env,
                    Err(TryRecvError::Empty) => return Next::Empty,
                    Err(TryRecvError::Disconnected) => return Next::Stale,
                }
            };
            if !self.inst.is_current(gen) {
                // Aborted while waiting: this envelope may be the current instance's.
                self.give_back(env);
                return Next::Stale;
            }
            if let Envelope::Wake = env {
                continue;
            }
            return Next::Envelope(env);
        }
    }

    fn take_returned(&self) -> Option<Envelope<W>> {
        if !self.has_returned.load(Ordering::Acquire) {
            return None;
        }
        let mut returned = self.returned.lock();
        let env = returned.pop_front();
        if returned.is_empty() {
            self.has_returned.store(false, Ordering::Release);
        }
        env
    }

    /// Hands an envelope a stale instance took back to whichever instance is current, and
    /// wakes it in case it waits on the channel.
    fn give_back(&self, env: Envelope<W>) {
        if self.is_closed() {
            return; // gone for good: dropped, and counted (see `close`)
        }
        if !matches!(env, Envelope::Wake) {
            let mut returned = self.returned.lock();
            returned.push_back(env);
            self.has_returned.store(true, Ordering::Release);
        }
        let _ = self.tx.send(Envelope::Wake);
    }
}

impl<W: BlockingWorker> WorkerControl for BlockingMailbox<W> {
    fn kind(&self) -> ChildKind {
        ChildKind::Blocking
    }

    fn needs_arbiter(&self) -> bool {
        false
    }

    fn new_instance(&self) -> Gen {
        let _end = self.drain_end.lock();
        let gen = self.inst.new_generation();
        self.newest.store(gen, Ordering::Release);
        self.told.store(false, Ordering::Release);
        self.gate.fetch_and(!CLOSED, Ordering::AcqRel);
        gen
    }

    /// Spawns the instance's thread and returns at once; the thread reports `Started` (or how it
    /// failed) through `events`.
    fn start(self: Arc<Self>, id: NodeId, gen: Gen, events: EventTx) -> Result<(), String> {
        let name = self.thread_name.clone();
        let mailbox = self;
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                Instance {
                    mailbox,
                    id,
                    gen,
                    events,
                }
                .run()
            })
            .map(|_detached| ())
            .map_err(|e| format!("could not spawn thread `{name}`: {e}"))
    }

    fn tell(&self, order: Arc<Stopping>, close: bool) -> bool {
        if self.is_closed() || self.told.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.inst.mark_told(close);
        let gen = self.newest.load(Ordering::Acquire);
        self.tx.send(Envelope::Stop(gen, order)).is_ok()
    }

    fn close_when_drained(&self) {
        let _end = self.drain_end.lock();
        self.inst.set_close_on_drain();
    }

    /// Retires the instance and wakes its thread if it waits for messages. A thread inside a
    /// handler cannot be interrupted: it ends when the handler returns.
    fn abort(&self) {
        self.inst.retire();
        let _ = self.tx.send(Envelope::Wake);
    }

    /// Closes the gate for good (the child is gone): what is still queued will never be
    /// handled, so it is dropped now — it stays counted (`accepted - handled`), and a `send`
    /// waiting for its answer learns at once that none will come.
    fn close(&self) {
        self.close_gate();
        let leftovers: Vec<Envelope<W>> = self.rx.try_iter().collect();
        let returned = std::mem::take(&mut *self.returned.lock());
        self.has_returned.store(false, Ordering::Release);
        drop((leftovers, returned));
    }

    fn counts(&self) -> (u64, u64) {
        (self.accepted.load(Ordering::Acquire), self.inst.handled())
    }

    fn drained_since_told(&self) -> u64 {
        self.inst.drained_since_told()
    }

    fn addr_any(self: Arc<Self>) -> Box<dyn std::any::Any + Send> {
        Box::new(BlockingAddr { mailbox: self })
    }
}

/// One instance of a blocking worker: what its thread runs.
struct Instance<W: BlockingWorker> {
    mailbox: Arc<BlockingMailbox<W>>,
    id: NodeId,
    gen: Gen,
    events: EventTx,
}

/// Why an instance's thread ends early.
enum End {
    /// A user call panicked (the message).
    Panicked(String),
    /// The worker said it failed (the reason).
    Failed(String),
    /// The instance was aborted or replaced: end without a word.
    Stale,
}

impl<W: BlockingWorker> Instance<W> {
    fn run(self) {
        let name = &self.mailbox.thread_name;
        let mut worker = match catch_unwind(AssertUnwindSafe(&*self.mailbox.factory)) {
            Ok(Ok(worker)) => worker,
            Ok(Err(e)) => return self.exit(Exit::Failed(e.to_string())),
            Err(payload) => {
                let msg = format!("factory panicked: {}", panic_message(&*payload));
                return self.exit(Exit::Failed(msg));
            }
        };
        log::info!(target: LOG, "{name}: instance {} running on its own thread", self.gen);
        let end = self.serve(&mut worker).err();
        // The worker's own drop may panic too; it must not take the thread's report with it.
        let dropped = catch_unwind(AssertUnwindSafe(move || drop(worker)));
        match end {
            None => {
                if let Err(payload) = dropped {
                    log::warn!(
                        target: LOG,
                        "{name}: dropping the worker after its acknowledgement panicked: {}",
                        panic_message(&*payload)
                    );
                }
            }
            Some(End::Panicked(msg)) => {
                log::info!(target: LOG, "{name}: instance {} panicked; its thread ends", self.gen);
                self.exit(Exit::Panicked(msg));
            }
            Some(End::Failed(reason)) => {
                log::info!(target: LOG, "{name}: instance {} failed; its thread ends", self.gen);
                self.exit(Exit::Failed(reason));
            }
            Some(End::Stale) => {
                log::info!(
                    target: LOG,
                    "{name}: instance {} was aborted; its thread ends",
                    self.gen
                );
            }
        }
    }

    /// Runs the instance from `started` to its acknowledgement.
    fn serve(&self, worker: &mut W) -> Result<(), End> {
        guard(|| worker.started())?;
        if !self.mailbox.inst.is_current(self.gen) {
            return Err(End::Stale);
        }
        let _ = self.events.send(Event::Started(self.id, self.gen));
        loop {
            match self.mailbox.next(self.gen, true) {
                Next::Envelope(Envelope::Message(msg, reply)) => self.handle(worker, msg, reply)?,
                Next::Envelope(Envelope::Stop(gen, order)) if gen == self.gen => {
                    return self.drain(worker, &order)
                }
                // A `Stopping` meant for an earlier instance.
                Next::Envelope(_) | Next::Empty => {}
                Next::Stale => return Err(End::Stale),
            }
        }
    }

    /// The worker's side of the shutdown protocol, from its `Stopping` to its acknowledgement.
    fn drain(&self, worker: &mut W, order: &Stopping) -> Result<(), End> {
        let mb = &*self.mailbox;
        let name = &mb.thread_name;
        mb.inst.mark_draining();
        log::info!(target: LOG, "{name}: draining ({})", order.reason);
        guard(|| worker.on_stopping(order))?;
        self.handle_queued(worker)?;
        let closing = {
            let _end = mb.drain_end.lock();
            if !mb.inst.is_current(self.gen) {
                return Err(End::Stale);
            }
            let closing = mb.inst.close_on_drain();
            if closing {
                mb.close_gate();
            }
            closing
        };
        if closing {
            // Whatever was accepted between the empty channel and the closed gate.
            self.handle_queued(worker)?;
        }
        // When not closing (a restart), later messages wait in the channel for the next instance.
        guard(|| worker.on_drained())?;
        if !mb.inst.is_current(self.gen) {
            return Err(End::Stale);
        }
        let stats = DrainStats {
            drained: mb.inst.drained_since_told(),
        };
        mb.inst.mark_acked();
        log::info!(target: LOG, "{name}: drained {} messages, acknowledging", stats.drained);
        let _ = self.events.send(Event::Acked(self.id, self.gen, stats));
        Ok(())
    }

    /// Handles messages until the channel is empty.
    fn handle_queued(&self, worker: &mut W) -> Result<(), End> {
        loop {
            match self.mailbox.next(self.gen, false) {
                Next::Envelope(Envelope::Message(msg, reply)) => self.handle(worker, msg, reply)?,
                Next::Envelope(_) => {}
                Next::Empty => return Ok(()),
                Next::Stale => return Err(End::Stale),
            }
        }
    }

    fn handle(
        &self,
        worker: &mut W,
        msg: W::Message,
        reply: Option<ReplyTx<W>>,
    ) -> Result<(), End> {
        let inst = &self.mailbox.inst;
        log::debug!(target: LOG, "{}: handling a message", self.mailbox.thread_name);
        // On a panic the message is lost; dropping `reply` tells a waiting `send` so.
        let out = guard(|| worker.handle(msg))?;
        // An aborted instance is no longer the counts' only writer: it leaves them alone, so
        // a message it finished after its abort stays counted as dropped.
        if !inst.is_current(self.gen) {
            return Err(End::Stale);
        }
        inst.add_handled(1);
        if let Some(reply) = reply {
            let _ = reply.send(out);
        }
        match guard(|| worker.failed())? {
            Some(reason) => Err(End::Failed(reason)),
            None => Ok(()),
        }
    }

    /// Reports how the instance ended without acknowledging, unless it is stale.
    fn exit(&self, exit: Exit) {
        if self.mailbox.inst.is_current(self.gen) {
            let _ = self.events.send(Event::Exited(self.id, self.gen, exit));
        }
    }
}

/// Runs a user call, turning a panic into its message.
fn guard<T>(f: impl FnOnce() -> T) -> Result<T, End> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| End::Panicked(panic_message(&*payload)))
}

/// The stable, counted address of a blocking worker of type `W`.
///
/// Obtain it from [`BlockingSpec::addr`] while building the tree, or from
/// [`TreeHandle::blocking_addr`](crate::TreeHandle::blocking_addr) later. Like
/// [`ChildAddr`](crate::ChildAddr) it points at the child's mailbox, not at one instance: it is
/// valid before the tree starts (messages wait) and across restarts, and every send is either
/// accepted — then handled, or counted as dropped in the report — or refused at the sender with
/// the message handed back.
pub struct BlockingAddr<W: BlockingWorker> {
    mailbox: Arc<BlockingMailbox<W>>,
}

impl<W: BlockingWorker> Clone for BlockingAddr<W> {
    fn clone(&self) -> Self {
        BlockingAddr {
            mailbox: self.mailbox.clone(),
        }
    }
}

impl<W: BlockingWorker> fmt::Debug for BlockingAddr<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockingAddr")
            .field("worker", &std::any::type_name::<W>())
            .field("thread", &self.mailbox.thread_name)
            .field("closed", &self.mailbox.is_closed())
            .finish()
    }
}

impl<W: BlockingWorker> BlockingAddr<W> {
    /// Sends a message without waiting for the reply. Never blocks (the mailbox is unbounded).
    /// Fails with [`SendError::Closed`], handing the message back, once the worker has
    /// acknowledged its `Stopping` or is gone for good.
    pub fn do_send(&self, msg: W::Message) -> Result<(), SendError<W::Message>> {
        self.mailbox
            .push(msg, None)
            .map_err(|(msg, _)| SendError::Closed(msg))
    }

    /// Sends a message and waits for the handler's reply. Fails with [`MailboxError::Closed`]
    /// when the message is refused, or when it was accepted but not handled (the worker was
    /// aborted, or its handler panicked on this message). Once accepted the message is handled
    /// even if the caller stops waiting for the reply (actix would skip it): an accepted message
    /// is handled or counted as dropped, never silently skipped.
    pub async fn send(&self, msg: W::Message) -> Result<W::Reply, MailboxError> {
        let (tx, rx) = oneshot::channel();
        self.mailbox
            .push(msg, Some(tx))
            .map_err(|_| MailboxError::Closed)?;
        rx.await.map_err(|_| MailboxError::Closed)
    }

    /// True while the worker accepts messages.
    pub fn connected(&self) -> bool {
        !self.mailbox.is_closed()
    }
}

/// The spec of one blocking worker. Made with [`ChildSpec::blocking`] or
/// [`ChildSpec::try_blocking`]; it has no placement, since it runs on a thread of its own.
///
/// Its [budget](Self::budget) bounds the drain like any child's, with one difference: a thread
/// cannot be cancelled, so a handler still running at the deadline is not interrupted. The child
/// is reported [`TimedOut`](crate::Outcome::TimedOut), what it had not handled is counted as
/// dropped, and its thread is detached: it ends when the handler returns, without handling
/// anything more.
pub struct BlockingSpec<W: BlockingWorker> {
    common: Common,
    mailbox: Arc<BlockingMailbox<W>>,
}

impl<W: BlockingWorker> fmt::Debug for BlockingSpec<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockingSpec")
            .field("name", &self.common.name)
            .field("worker", &std::any::type_name::<W>())
            .field("restart", &self.common.restart)
            .field("budget", &self.common.budget)
            .field("depends_on", &self.common.depends_on)
            .finish()
    }
}

impl<W: BlockingWorker> BlockingSpec<W> {
    common_setters!();

    /// The worker's stable address, usable before the tree starts (messages wait in the mailbox)
    /// and valid for the tree's whole life.
    pub fn addr(&self) -> BlockingAddr<W> {
        BlockingAddr {
            mailbox: self.mailbox.clone(),
        }
    }
}

impl<W: BlockingWorker> From<BlockingSpec<W>> for ChildSpec {
    fn from(b: BlockingSpec<W>) -> Self {
        ChildSpec {
            common: b.common,
            kind: SpecKind::Worker(b.mailbox),
        }
    }
}

impl ChildSpec {
    /// A [blocking worker](BlockingWorker) made by `factory`, which is called on the worker's
    /// own thread (named `name`) for every start.
    pub fn blocking<W, F>(name: impl Into<String>, factory: F) -> BlockingSpec<W>
    where
        W: BlockingWorker,
        F: Fn() -> W + Send + Sync + 'static,
    {
        Self::try_blocking(name, move || Ok(factory()))
    }

    /// A [blocking worker](BlockingWorker) whose factory may fail (opening a file, connecting to
    /// a database); a failure stops the tree's start with an error naming the child and the
    /// cause.
    pub fn try_blocking<W, F>(name: impl Into<String>, factory: F) -> BlockingSpec<W>
    where
        W: BlockingWorker,
        F: Fn() -> Result<W, BoxError> + Send + Sync + 'static,
    {
        let name = name.into();
        BlockingSpec {
            mailbox: Arc::new(BlockingMailbox::new(&name, Box::new(factory))),
            common: Common {
                name,
                ..Common::default()
            },
        }
    }
}
