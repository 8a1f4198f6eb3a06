//! The tree's runtime: one task, on the arbiter the tree was started on, that starts the
//! children, watches them, and carries out the shutdown protocol.
//!
//! Everything that decides an order lives here, in one place and on one thread, so ordering is
//! plain sequential code rather than a negotiation between actors: the runtime tells a child
//! `Stopping` when the child's parent has been told and every child that depends on it has
//! finished; it finishes a supervisor when its last child has finished; it aborts whoever is
//! still pending at their deadline. Children talk to it only through [`Event`]s; callers only
//! through [`Command`]s and the [`Shared`] state behind a `TreeHandle`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use actix::prelude::*;
use parking_lot::{Condvar, Mutex};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::graph::{Graph, ROOT};
use crate::protocol::{Event, EventTx, Exit, Gen, NodeId, Outcome, Stopping};
use crate::report::{fmt_duration, ChildKind, ChildReport, ShutdownReport, TreeOutcome};
use crate::spec::Placement;

const LOG: &str = "actix_supervisor::runtime";

/// `arbiter_of` value for "the arbiter the runtime runs on".
const HOME: u32 = u32::MAX;

/// How far the tree is in its life. Readable from any thread, without blocking, through
/// [`TreeHandle::phase`](crate::TreeHandle::phase).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Children are being started.
    Starting = 0,
    /// Every child started; the tree serves.
    Running = 1,
    /// A shutdown was triggered; readiness is false from this instant.
    Draining = 2,
    /// The root acknowledged and the report is out.
    Stopped = 3,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Starting,
            1 => Phase::Running,
            2 => Phase::Draining,
            _ => Phase::Stopped,
        }
    }
}

/// Tree-wide settings, from the builder.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) deadline: Duration,
    pub(crate) grace: Duration,
    pub(crate) progress_interval: Duration,
    pub(crate) worker_budget: Duration,
    pub(crate) signals: bool,
    pub(crate) stop_system: bool,
    pub(crate) pools: HashMap<String, usize>,
}

/// What callers ask of the runtime.
#[derive(Debug)]
pub(crate) enum Command {
    Shutdown(String),
    /// Skip the remaining budgets: abort what is pending now.
    Force(String),
}

/// State shared between the runtime and every `TreeHandle`.
pub(crate) struct Shared {
    pub(crate) name: String,
    phase: AtomicU8,
    triggered: AtomicBool,
    commands: UnboundedSender<Command>,
    report: Mutex<Option<Arc<ShutdownReport>>>,
    report_ready: Condvar,
    report_watch: tokio::sync::watch::Sender<Option<Arc<ShutdownReport>>>,
    /// The tree's shape, for looking up children by path.
    pub(crate) graph: Arc<Graph>,
}

impl Shared {
    pub(crate) fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Starts the shutdown unless one was started already. True for the call that started it.
    pub(crate) fn trigger(&self, reason: String) -> bool {
        if self.triggered.swap(true, Ordering::AcqRel) {
            return false;
        }
        // Readiness turns false at once, not when the runtime gets to the command.
        self.phase
            .fetch_max(Phase::Draining as u8, Ordering::AcqRel);
        let _ = self.commands.send(Command::Shutdown(reason));
        true
    }

    pub(crate) fn force(&self, reason: String) {
        self.trigger(reason.clone());
        let _ = self.commands.send(Command::Force(reason));
    }

    pub(crate) async fn wait_report(&self) -> Arc<ShutdownReport> {
        let mut rx = self.report_watch.subscribe();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`, so this cannot happen while we hold `self`.
                std::future::pending::<()>().await;
            }
        }
    }

    pub(crate) fn wait_report_blocking(
        &self,
        timeout: Option<Duration>,
    ) -> Option<Arc<ShutdownReport>> {
        let mut slot = self.report.lock();
        let until = timeout.map(|t| Instant::now() + t);
        while slot.is_none() {
            match until {
                Some(until) => {
                    if self.report_ready.wait_until(&mut slot, until).timed_out() {
                        break;
                    }
                }
                None => self.report_ready.wait(&mut slot),
            }
        }
        slot.clone()
    }

    pub(crate) fn report(&self) -> Option<Arc<ShutdownReport>> {
        self.report.lock().clone()
    }

    fn publish(&self, report: Arc<ShutdownReport>) {
        *self.report.lock() = Some(report.clone());
        self.report_ready.notify_all();
        self.report_watch.send_replace(Some(report));
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Status {
    NotStarted,
    Running,
    /// Ended on its own before being told; the outcome is kept for the report.
    Exited(Outcome),
    Told,
    Done(Outcome),
}

/// An instant as nanoseconds since the runtime's creation: half the size of `Option<Instant>`,
/// which matters at 100,000 children.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Stamp(u64);

impl Stamp {
    const NONE: Stamp = Stamp(u64::MAX);

    fn of(base: Instant, t: Instant) -> Stamp {
        Stamp(u64::try_from(t.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX - 1))
    }

    fn at(self, base: Instant) -> Option<Instant> {
        (self != Stamp::NONE).then(|| base + Duration::from_nanos(self.0))
    }
}

struct NodeState {
    status: Status,
    told_at: Stamp,
    done_at: Stamp,
    deadline: Stamp,
    /// Dependents (and, stopping after a failed start, the next-started worker) not yet done.
    waiting: u32,
    pending_children: u32,
    drained: u64,
    /// Workers in this subtree whose start is not confirmed yet.
    unconfirmed: u32,
    /// A worker's current instance; events from others are stale.
    gen: Gen,
}

/// How the stop order is decided.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Dependents before dependencies, independent siblings concurrently.
    Dependencies,
    /// After a failed start: additionally one worker at a time, in reverse start order.
    ReverseStart,
}

struct Shutdown {
    reason: Arc<str>,
    started: Instant,
    started_wall: SystemTime,
    overall: Instant,
    grace_until: Option<Instant>,
    next_progress: Instant,
    forced: bool,
    /// `(deadline, parent)`: some children of `parent` must have acknowledged by `deadline`.
    /// Keyed by parent so that siblings told together share one entry.
    deadlines: BinaryHeap<Reverse<(Instant, NodeId)>>,
    last_deadline: Option<(Instant, NodeId)>,
    /// The last order made; siblings told together share it.
    last_order: Option<Arc<Stopping>>,
    /// In `ReverseStart` order: the worker started just before each worker.
    started_before: HashMap<NodeId, NodeId>,
}

impl Shutdown {
    /// The `Stopping` order for `deadline`, shared with the previous one when they agree.
    fn order(&mut self, deadline: Instant) -> Arc<Stopping> {
        match &self.last_order {
            Some(o) if o.deadline == deadline => o.clone(),
            _ => {
                let o = Arc::new(Stopping {
                    reason: self.reason.clone(),
                    deadline,
                });
                self.last_order = Some(o.clone());
                o
            }
        }
    }

    /// Makes sure the timer wakes at `deadline` to check `parent`'s children.
    fn watch(&mut self, deadline: Instant, parent: NodeId) {
        if self.last_deadline != Some((deadline, parent)) {
            self.last_deadline = Some((deadline, parent));
            self.deadlines.push(Reverse((deadline, parent)));
        }
    }
}

enum Step {
    Tell(NodeId),
    Done(NodeId, Outcome),
}

pub(crate) struct Runtime {
    g: Arc<Graph>,
    /// Origin of every [`Stamp`].
    base: Instant,
    cfg: Config,
    shared: Arc<Shared>,
    events_tx: EventTx,
    events: UnboundedReceiver<Event>,
    commands: UnboundedReceiver<Command>,
    st: Vec<NodeState>,
    /// Per worker: the arbiter it runs on (`None`: the runtime's own).
    /// Per node: index into `arbiters`, or [`HOME`] for the runtime's own arbiter.
    arbiter_of: Vec<u32>,
    arbiters: Vec<ArbiterHandle>,
    created: Vec<Arbiter>,
    shutdown: Option<Shutdown>,
    steps: Vec<Step>,
}

pub(crate) type StartResult = Result<(), (String, String, Arc<ShutdownReport>)>;

impl Runtime {
    pub(crate) fn new(g: Graph, cfg: Config, name: String) -> (Runtime, Arc<Shared>) {
        let (events_tx, events) = unbounded_channel();
        let (commands_tx, commands) = unbounded_channel();
        let g = Arc::new(g);
        let shared = Arc::new(Shared {
            name,
            phase: AtomicU8::new(Phase::Starting as u8),
            triggered: AtomicBool::new(false),
            commands: commands_tx,
            report: Mutex::new(None),
            report_ready: Condvar::new(),
            report_watch: tokio::sync::watch::channel(None).0,
            graph: g.clone(),
        });
        let st = (0..g.nodes.len())
            .map(|_| NodeState {
                status: Status::NotStarted,
                told_at: Stamp::NONE,
                done_at: Stamp::NONE,
                deadline: Stamp::NONE,
                waiting: 0,
                pending_children: 0,
                drained: 0,
                unconfirmed: 0,
                gen: 0,
            })
            .collect();
        let rt = Runtime {
            base: Instant::now(),
            arbiter_of: Vec::new(),
            g,
            cfg,
            shared: shared.clone(),
            events_tx,
            events,
            commands,
            st,
            arbiters: Vec::new(),
            created: Vec::new(),
            shutdown: None,
            steps: Vec::new(),
        };
        (rt, shared)
    }

    /// [`run`](Self::run), with a panic in the runtime itself (a bug in this crate) turned into
    /// a failed report, so that callers waiting for the report are not left waiting forever.
    pub(crate) fn run_guarded(
        self,
        started: tokio::sync::oneshot::Sender<StartResult>,
    ) -> impl std::future::Future<Output = ()> {
        let shared = self.shared.clone();
        let mut fut = Box::pin(self.run(started));
        std::future::poll_fn(move |cx| {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                std::future::Future::poll(fut.as_mut(), cx)
            })) {
                Ok(poll) => poll,
                Err(payload) => {
                    let msg = crate::protocol::panic_message(&*payload);
                    log::error!(target: LOG, "the tree's runtime panicked: {msg}");
                    let mut report = ShutdownReport::empty(
                        &shared.name,
                        &format!("the tree's runtime panicked: {msg}"),
                    );
                    report.outcome = TreeOutcome::Failed;
                    shared.set_phase(Phase::Stopped);
                    shared.publish(Arc::new(report));
                    std::task::Poll::Ready(())
                }
            }
        })
    }

    /// The runtime's whole life: start, then serve until the shutdown has finished.
    pub(crate) async fn run(mut self, started: tokio::sync::oneshot::Sender<StartResult>) {
        if let Err((child, cause)) = self.start().await {
            log::error!(target: LOG, "child `{child}` failed to start: {cause}; stopping what started");
            self.begin_shutdown(format!("start of `{child}` failed"), Order::ReverseStart);
            let report = self.serve().await;
            let _ = started.send(Err((child, cause, report)));
            return;
        }
        // A trigger during the start has already moved the phase on; keep it.
        let _ = self.shared.phase.compare_exchange(
            Phase::Starting as u8,
            Phase::Running as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        log::info!(target: LOG, "tree `{}` running", self.shared.name);
        let _ = started.send(Ok(()));
        self.serve().await;
    }

    // ----- start -------------------------------------------------------------------------

    fn place_workers(&mut self) {
        let mut named: HashMap<String, usize> = HashMap::new();
        let mut pools: HashMap<String, (Vec<usize>, usize)> = HashMap::new();
        // Placement of each node, inherited from the parent when `Parent`; ids are in
        // declaration order, so a parent is resolved before its children.
        let mut slot: Vec<u32> = vec![HOME; self.g.nodes.len()];
        for i in 1..self.g.nodes.len() {
            let node = &self.g.nodes[i];
            let inherited = node.parent.map_or(HOME, |p| slot[p.index()]);
            let placed: usize = match node.placement.as_deref() {
                None | Some(Placement::Parent) => {
                    slot[i] = inherited;
                    continue;
                }
                Some(Placement::Arbiter(handle)) => {
                    self.arbiters.push(handle.clone());
                    self.arbiters.len() - 1
                }
                Some(Placement::Named(name)) => *named.entry(name.clone()).or_insert_with(|| {
                    let arbiter = Arbiter::new();
                    self.arbiters.push(arbiter.handle());
                    self.created.push(arbiter);
                    self.arbiters.len() - 1
                }),
                Some(Placement::Pool(name)) => {
                    let size = self.cfg.pools.get(name).copied().unwrap_or(1).max(1);
                    let (members, next) = pools.entry(name.clone()).or_insert_with(|| {
                        let members = (0..size)
                            .map(|_| {
                                let arbiter = Arbiter::new();
                                self.arbiters.push(arbiter.handle());
                                self.created.push(arbiter);
                                self.arbiters.len() - 1
                            })
                            .collect();
                        (members, 0)
                    });
                    let pick = members[*next % members.len()];
                    *next += 1;
                    pick
                }
            };
            slot[i] = placed as u32;
        }
        self.arbiter_of = slot;
    }

    async fn start(&mut self) -> Result<(), (String, String)> {
        self.place_workers();
        for &w in &self.g.start_order {
            let mut cur = Some(w);
            while let Some(n) = cur {
                self.st[n.index()].unconfirmed += 1;
                cur = self.g.node(n).parent;
            }
        }
        let order = self.g.start_order.clone();
        for w in order {
            while !self.prerequisites_started(w) {
                self.next_start_event().await?;
            }
            self.spawn(w)?;
        }
        while self.st[ROOT.index()].unconfirmed > 0 {
            self.next_start_event().await?;
        }
        // Supervisors without workers below them are running too, once the tree is.
        for (i, node) in self.g.nodes.iter().enumerate() {
            if node.worker.is_none() && self.st[i].status == Status::NotStarted {
                self.st[i].status = Status::Running;
            }
        }
        Ok(())
    }

    /// True when every dependency of `w` and of its ancestors has confirmed its start.
    fn prerequisites_started(&self, w: NodeId) -> bool {
        let mut cur = Some(w);
        while let Some(n) = cur {
            if self
                .g
                .node(n)
                .deps
                .iter()
                .any(|d| self.st[d.index()].unconfirmed > 0)
            {
                return false;
            }
            cur = self.g.node(n).parent;
        }
        true
    }

    fn spawn(&mut self, w: NodeId) -> Result<(), (String, String)> {
        let Some(worker) = self.g.node(w).worker.clone() else {
            return Ok(());
        };
        // The worker, and the supervisors above it, are running from now on.
        let mut cur = Some(w);
        while let Some(n) = cur {
            if self.st[n.index()].status != Status::NotStarted {
                break;
            }
            self.st[n.index()].status = Status::Running;
            cur = self.g.node(n).parent;
        }
        let events = self.events_tx.clone();
        let gen = worker.new_instance();
        self.st[w.index()].gen = gen;
        let result = match self.arbiter_of[w.index()] {
            a if a == HOME || !worker.needs_arbiter() => worker.clone().start(w, gen, events),
            a => {
                let remote = worker.clone();
                let sent = self.arbiters[a as usize].spawn_fn(move || {
                    if let Err(cause) = remote.start(w, gen, events.clone()) {
                        let _ = events.send(Event::Exited(w, gen, Exit::Failed(cause)));
                    }
                });
                if sent {
                    Ok(())
                } else {
                    Err("its arbiter is not running".to_owned())
                }
            }
        };
        result.map_err(|cause| {
            worker.close();
            self.st[w.index()].status = Status::Exited(Outcome::Failed(cause.clone()));
            (self.g.path(w), cause)
        })
    }

    /// Waits for start events and handles every one already queued.
    async fn next_start_event(&mut self) -> Result<(), (String, String)> {
        let Some(event) = self.events.recv().await else {
            return Err(("(tree)".into(), "event channel closed".into()));
        };
        self.on_start_event(event)?;
        while let Ok(event) = self.events.try_recv() {
            self.on_start_event(event)?;
        }
        Ok(())
    }

    fn on_start_event(&mut self, event: Event) -> Result<(), (String, String)> {
        match event {
            Event::Started(id, gen) | Event::Exited(id, gen, _) | Event::Acked(id, gen, _)
                if gen != self.st[id.index()].gen =>
            {
                Ok(())
            }
            Event::Started(id, _) => {
                log::info!(target: LOG, "started {}", self.g.path(id));
                let mut cur = Some(id);
                while let Some(n) = cur {
                    self.st[n.index()].unconfirmed -= 1;
                    cur = self.g.node(n).parent;
                }
                Ok(())
            }
            Event::Exited(id, _, exit) => {
                let (outcome, cause) = match exit {
                    Exit::Panicked(m) => (Outcome::Panicked(m.clone()), format!("panicked: {m}")),
                    Exit::Failed(m) => (Outcome::Failed(m.clone()), m),
                    Exit::Stopped { .. } => (
                        Outcome::Failed("stopped during start".into()),
                        "stopped during start".into(),
                    ),
                };
                self.st[id.index()].status = Status::Exited(outcome);
                if let Some(w) = &self.g.node(id).worker {
                    w.close();
                }
                Err((self.g.path(id), cause))
            }
            Event::Acked(..) => Ok(()),
        }
    }

    // ----- serving and shutdown -----------------------------------------------------------

    /// Handles events and commands until the shutdown is complete; returns the report.
    async fn serve(&mut self) -> Arc<ShutdownReport> {
        loop {
            if let Some(report) = self.finished_report() {
                return self.finish(report).await;
            }
            let wake = self.next_wake();
            tokio::select! {
                Some(event) = self.events.recv() => {
                    self.on_event(event);
                    // Take what else is queued without a trip through select.
                    while let Ok(event) = self.events.try_recv() {
                        self.on_event(event);
                    }
                }
                Some(cmd) = self.commands.recv() => self.on_command(cmd),
                _ = sleep_until_opt(wake) => self.on_timer(),
            }
            self.run_steps();
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Started(id, gen) | Event::Exited(id, gen, _) | Event::Acked(id, gen, _)
                if gen != self.st[id.index()].gen => {}
            Event::Started(id, _) => {
                log::info!(target: LOG, "started {}", self.g.path(id));
            }
            Event::Acked(id, _, stats) => {
                if self.st[id.index()].status == Status::Told {
                    self.st[id.index()].drained = stats.drained;
                    self.steps.push(Step::Done(id, Outcome::Drained));
                }
            }
            Event::Exited(id, _, exit) => {
                let outcome = match exit {
                    Exit::Panicked(m) => {
                        log::error!(target: LOG, "{} panicked: {m}", self.g.path(id));
                        Outcome::Panicked(m)
                    }
                    Exit::Failed(m) => {
                        log::error!(target: LOG, "{} failed: {m}", self.g.path(id));
                        Outcome::Failed(m)
                    }
                    // Stopping on its own is normal for a running worker (it is then simply
                    // not running), but once it has begun draining it abandons the drain.
                    Exit::Stopped { draining: true } => {
                        log::warn!(target: LOG, "{} stopped without acknowledging", self.g.path(id));
                        Outcome::Failed(
                            "stopped itself while draining, without acknowledging".into(),
                        )
                    }
                    Exit::Stopped { draining: false } => {
                        log::warn!(target: LOG, "{} stopped on its own", self.g.path(id));
                        Outcome::NotRunning
                    }
                };
                if let Some(w) = &self.g.node(id).worker {
                    w.close();
                }
                match self.st[id.index()].status {
                    Status::Told => self.steps.push(Step::Done(id, outcome)),
                    Status::Running | Status::NotStarted => {
                        self.st[id.index()].status = Status::Exited(outcome)
                    }
                    _ => {}
                }
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Shutdown(reason) => {
                if self.shutdown.is_none() {
                    self.begin_shutdown(reason, Order::Dependencies);
                }
            }
            Command::Force(reason) => {
                if let Some(sd) = &mut self.shutdown {
                    if !sd.forced {
                        sd.forced = true;
                        sd.grace_until = None;
                        log::warn!(target: LOG, "shutdown forced ({reason}): aborting everything still pending");
                        self.abort_subtree(ROOT);
                    }
                }
            }
        }
    }

    fn begin_shutdown(&mut self, reason: String, order: Order) {
        self.shared.triggered.store(true, Ordering::Release);
        self.shared.set_phase(Phase::Draining);
        let now = Instant::now();
        log::info!(
            target: LOG,
            "tree `{}` draining: {reason} (deadline {})",
            self.shared.name,
            fmt_duration(self.cfg.deadline)
        );
        let mut started_before = HashMap::new();
        if order == Order::ReverseStart {
            let started: Vec<NodeId> = self
                .g
                .start_order
                .iter()
                .copied()
                .filter(|w| self.st[w.index()].status != Status::NotStarted)
                .collect();
            for pair in started.windows(2) {
                started_before.insert(pair[1], pair[0]);
                self.st[pair[0].index()].waiting += 1;
            }
        }
        for i in 0..self.g.nodes.len() {
            let node = &self.g.nodes[i];
            self.st[i].waiting += node.dependents.len() as u32;
            self.st[i].pending_children = node.children.len() as u32;
        }
        let grace = (!self.cfg.grace.is_zero()).then(|| now + self.cfg.grace);
        if grace.is_some() {
            log::info!(target: LOG, "readiness grace: {} before stopping anything", fmt_duration(self.cfg.grace));
        }
        self.shutdown = Some(Shutdown {
            reason: reason.into(),
            started: now,
            started_wall: SystemTime::now(),
            overall: now + self.cfg.deadline,
            grace_until: grace,
            next_progress: now + self.cfg.progress_interval,
            forced: false,
            deadlines: BinaryHeap::new(),
            last_deadline: None,
            last_order: None,
            started_before,
        });
        if grace.is_none() {
            self.steps.push(Step::Tell(ROOT));
            self.run_steps();
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let sd = self.shutdown.as_ref()?;
        let mut wake = sd.overall.min(sd.next_progress);
        if let Some(g) = sd.grace_until {
            wake = wake.min(g);
        }
        if let Some(Reverse((d, _))) = sd.deadlines.peek() {
            wake = wake.min(*d);
        }
        Some(wake)
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        let Some(sd) = self.shutdown.as_mut() else {
            return;
        };
        if sd.grace_until.is_some_and(|g| g <= now) {
            sd.grace_until = None;
            self.steps.push(Step::Tell(ROOT));
            return;
        }
        if sd.overall <= now {
            log::warn!(target: LOG, "overall deadline reached: aborting everything still pending");
            sd.deadlines.clear();
            self.abort_subtree(ROOT);
            return;
        }
        let mut expired = Vec::new();
        while let Some(Reverse((d, parent))) = sd.deadlines.peek().copied() {
            if d > now {
                break;
            }
            sd.deadlines.pop();
            expired.push(parent);
        }
        let progress_due = sd.next_progress <= now;
        if progress_due {
            sd.next_progress = now + self.cfg.progress_interval;
        }
        for parent in expired {
            let late: Vec<NodeId> = self
                .g
                .node(parent)
                .children
                .iter()
                .copied()
                .filter(|c| {
                    let s = &self.st[c.index()];
                    s.status == Status::Told && s.deadline.at(self.base).is_some_and(|d| d <= now)
                })
                .collect();
            for id in late {
                let took = self.st[id.index()]
                    .told_at
                    .at(self.base)
                    .map(|t| now - t)
                    .unwrap_or_default();
                log::warn!(
                    target: LOG,
                    "{} did not acknowledge within {}: aborting",
                    self.g.path(id),
                    fmt_duration(took)
                );
                self.abort_subtree(id);
            }
        }
        if progress_due {
            self.log_progress(now);
        }
    }

    fn log_progress(&self, now: Instant) {
        let Some(sd) = &self.shutdown else { return };
        if sd.grace_until.is_some() {
            log::info!(target: LOG, "readiness grace: nothing stopped yet");
            return;
        }
        // The pending children that hold the others up: told, not done, no pending child.
        let mut pending: Vec<NodeId> = (1..self.g.nodes.len())
            .map(|i| NodeId(i as u32))
            .filter(|&n| self.st[n.index()].status == Status::Told)
            .filter(|&n| {
                !self
                    .g
                    .node(n)
                    .children
                    .iter()
                    .any(|c| self.st[c.index()].status == Status::Told)
            })
            .collect();
        if pending.is_empty() {
            return;
        }
        pending.sort_by_key(|n| self.st[n.index()].told_at);
        const SHOWN: usize = 8;
        let mut line = format!("waiting on {}: ", pending.len());
        for (i, n) in pending.iter().take(SHOWN).enumerate() {
            let s = &self.st[n.index()];
            let spent = s.told_at.at(self.base).map(|t| now - t).unwrap_or_default();
            let budget = match (s.told_at.at(self.base), s.deadline.at(self.base)) {
                (Some(t), Some(d)) => fmt_secs(d - t),
                _ => "-".into(),
            };
            if i > 0 {
                line.push_str(", ");
            }
            line.push_str(&format!(
                "{} ({}/{})",
                self.g.path(*n),
                fmt_secs(spent),
                budget
            ));
        }
        if pending.len() > SHOWN {
            line.push_str(&format!(", … {} more", pending.len() - SHOWN));
        }
        log::info!(target: LOG, "{line}");
    }

    /// Carries out queued tells and completions until none is left.
    fn run_steps(&mut self) {
        // One instant for the whole pass: siblings told together share told time and deadline,
        // and a child released by an acknowledgement is never told "before" it.
        let now = Instant::now();
        while let Some(step) = self.steps.pop() {
            match step {
                Step::Tell(id) => self.tell(id, now),
                Step::Done(id, outcome) => {
                    if self.mark_done(id, outcome, now) {
                        self.propagate(id);
                    }
                }
            }
        }
    }

    fn tell(&mut self, id: NodeId, now: Instant) {
        let Some(sd) = &mut self.shutdown else { return };
        let node = self.g.node(id);
        let s = &mut self.st[id.index()];
        let previous = std::mem::replace(&mut s.status, Status::Told);
        if matches!(previous, Status::Told | Status::Done(_)) {
            s.status = previous;
            return;
        }
        let parent_deadline = node
            .parent
            .and_then(|p| self.st[p.index()].deadline.at(self.base))
            .unwrap_or(sd.overall);
        let s = &mut self.st[id.index()];
        let own = node
            .budget()
            .or(node.worker.as_ref().map(|_| self.cfg.worker_budget));
        let deadline = own.map_or(parent_deadline, |b| parent_deadline.min(now + b));
        s.told_at = Stamp::of(self.base, now);
        s.deadline = Stamp::of(self.base, deadline);
        match &node.worker {
            Some(worker) => match previous {
                Status::Running => {
                    if worker.tell(sd.order(deadline), true) {
                        log::info!(target: LOG, "{} draining", self.g.path(id));
                        sd.watch(deadline, node.parent.unwrap_or(ROOT));
                    } else {
                        self.steps.push(Step::Done(id, Outcome::NotRunning));
                    }
                }
                Status::Exited(outcome) => self.steps.push(Step::Done(id, outcome)),
                _ => self.steps.push(Step::Done(id, Outcome::NotRunning)),
            },
            None => {
                if id != ROOT {
                    log::info!(target: LOG, "stopping {}", self.g.path(id));
                }
                if deadline < parent_deadline {
                    sd.watch(deadline, node.parent.unwrap_or(ROOT));
                }
                if node.children.is_empty() {
                    self.steps.push(Step::Done(id, Outcome::Drained));
                }
                // Reverse so the stack pops them in declared order.
                for &c in node.children.iter().rev() {
                    if self.st[c.index()].waiting == 0 {
                        self.steps.push(Step::Tell(c));
                    }
                }
            }
        }
    }

    /// Records `id` as done. False when it already was.
    fn mark_done(&mut self, id: NodeId, outcome: Outcome, now: Instant) -> bool {
        let s = &mut self.st[id.index()];
        if matches!(s.status, Status::Done(_)) {
            return false;
        }
        s.done_at = Stamp::of(self.base, now);
        if outcome != Outcome::Drained {
            // A drained worker closed its own mailbox; any other end closes it here, so that
            // later sends fail at the sender.
            if let Some(w) = &self.g.node(id).worker {
                w.close();
            }
        }
        if id != ROOT && log::log_enabled!(target: LOG, log::Level::Info) {
            let path = self.g.path(id);
            let took = match (s.told_at.at(self.base), s.done_at.at(self.base)) {
                (Some(t), Some(d)) => format!("after {}", fmt_duration(d - t)),
                _ => "before being told".into(),
            };
            match &outcome {
                Outcome::Drained if self.g.node(id).worker.is_none() => {
                    log::info!(target: LOG, "{path} acknowledged {took}, all its children done")
                }
                Outcome::Drained => {
                    log::info!(target: LOG, "{path} acknowledged {took} (drained {})", s.drained)
                }
                Outcome::NotRunning => log::info!(target: LOG, "{path} was not running"),
                other => log::warn!(target: LOG, "{path}: {other} {took}"),
            }
        }
        s.status = Status::Done(outcome);
        true
    }

    /// After `id` is done: its dependencies and parent may proceed.
    fn propagate(&mut self, id: NodeId) {
        let reverse_prev = self
            .shutdown
            .as_ref()
            .and_then(|sd| sd.started_before.get(&id).copied());
        let node = self.g.node(id);
        for d in node.deps.iter().copied().chain(reverse_prev) {
            let s = &mut self.st[d.index()];
            s.waiting = s.waiting.saturating_sub(1);
            let parent_told = self
                .g
                .node(d)
                .parent
                .is_none_or(|p| self.st[p.index()].status == Status::Told);
            if self.st[d.index()].waiting == 0 && parent_told {
                self.steps.push(Step::Tell(d));
            }
        }
        if let Some(p) = node.parent {
            let s = &mut self.st[p.index()];
            s.pending_children = s.pending_children.saturating_sub(1);
            if s.pending_children == 0 && s.status == Status::Told {
                self.steps.push(Step::Done(p, Outcome::Drained));
            }
        }
    }

    /// Aborts `id` and everything under it that is not done; their parents and dependencies go on.
    fn abort_subtree(&mut self, id: NodeId) {
        let now = Instant::now();
        let mut subtree = vec![id];
        let mut i = 0;
        while i < subtree.len() {
            subtree.extend(self.g.node(subtree[i]).children.iter().copied());
            i += 1;
        }
        let mut finished = Vec::new();
        for &n in &subtree {
            let outcome = match &self.st[n.index()].status {
                Status::Done(_) => continue,
                Status::NotStarted => Outcome::NotRunning,
                Status::Exited(o) => o.clone(),
                Status::Running | Status::Told => {
                    if let Some(w) = &self.g.node(n).worker {
                        w.abort();
                    }
                    Outcome::TimedOut
                }
            };
            if self.mark_done(n, outcome, now) {
                finished.push(n);
            }
        }
        for n in finished {
            self.propagate(n);
        }
        self.run_steps();
    }

    /// The report, once the root is done.
    fn finished_report(&self) -> Option<ShutdownReport> {
        let sd = self.shutdown.as_ref()?;
        if !matches!(self.st[ROOT.index()].status, Status::Done(_)) {
            return None;
        }
        let children: Vec<ChildReport> = self
            .g
            .node(ROOT)
            .children
            .iter()
            .map(|&c| self.child_report(c, sd.started, ""))
            .collect();
        let mut outcome = TreeOutcome::Clean;
        for c in children.iter().flat_map(|c| c.iter()) {
            outcome = match (&c.outcome, outcome) {
                (Outcome::TimedOut, _) => TreeOutcome::TimedOut,
                (Outcome::Panicked(_) | Outcome::Failed(_), TreeOutcome::Clean) => {
                    TreeOutcome::Failed
                }
                (_, o) => o,
            };
        }
        if sd.forced {
            outcome = TreeOutcome::Forced;
        }
        Some(ShutdownReport {
            tree: self.shared.name.clone(),
            reason: sd.reason.to_string(),
            started_at: sd.started_wall,
            total: sd.started.elapsed(),
            outcome,
            children,
        })
    }

    fn child_report(&self, id: NodeId, origin: Instant, parent_path: &str) -> ChildReport {
        let node = self.g.node(id);
        let s = &self.st[id.index()];
        let path = crate::graph::join(parent_path, &node.name);
        let children: Vec<ChildReport> = node
            .children
            .iter()
            .map(|&c| self.child_report(c, origin, &path))
            .collect();
        let (drained, dropped) = match &node.worker {
            // Drained: everything accepted was handled, and the acknowledgement said how much.
            Some(_) if s.status == Status::Done(Outcome::Drained) => (s.drained, 0),
            Some(w) => {
                let (accepted, handled) = w.counts();
                (w.drained_since_told(), accepted.saturating_sub(handled))
            }
            None => (
                children.iter().map(|c| c.drained).sum(),
                children.iter().map(|c| c.dropped).sum(),
            ),
        };
        ChildReport {
            path,
            kind: node
                .worker
                .as_ref()
                .map_or(ChildKind::Supervisor, |w| w.kind()),
            outcome: match &s.status {
                Status::Done(o) | Status::Exited(o) => o.clone(),
                _ => Outcome::NotRunning,
            },
            told: s
                .told_at
                .at(self.base)
                .map(|t| t.saturating_duration_since(origin)),
            acknowledged: s
                .done_at
                .at(self.base)
                .filter(|_| s.told_at != Stamp::NONE)
                .map(|t| t.saturating_duration_since(origin)),
            drained,
            dropped,
            restarts: 0,
            last_failure: None,
            children,
        }
    }

    /// The end: stop and join the arbiters the tree created, publish the report.
    async fn finish(&mut self, report: ShutdownReport) -> Arc<ShutdownReport> {
        let created = std::mem::take(&mut self.created);
        if !created.is_empty() {
            for a in &created {
                a.stop();
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                for a in created {
                    let _ = a.join();
                }
                let _ = tx.send(());
            });
            // An arbiter blocked in a handler could keep its thread forever: do not hang on it.
            // Bounded by what is left of the overall deadline (at least a moment, at most 2 s).
            let left = self.shutdown.as_ref().map_or(Duration::ZERO, |sd| {
                sd.overall.saturating_duration_since(Instant::now())
            });
            let limit = left.clamp(Duration::from_millis(100), Duration::from_secs(2));
            if tokio::time::timeout(limit, rx).await.is_err() {
                log::warn!(target: LOG, "arbiters did not stop within {}; leaving them", fmt_duration(limit));
            }
        }
        self.shared.set_phase(Phase::Stopped);
        log::info!(target: LOG, "{}", report.summary());
        log::debug!(target: LOG, "report:\n{report}");
        let report = Arc::new(report);
        self.shared.publish(report.clone());
        if self.cfg.stop_system {
            System::current().stop_with_code(report.exit_code());
        }
        report
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Seconds to a tenth, without a trailing `.0`: `2.1s`, `5s` — as progress lines show them.
fn fmt_secs(d: Duration) -> String {
    let s = format!("{:.1}", d.as_secs_f64());
    format!("{}s", s.strip_suffix(".0").unwrap_or(&s))
}
