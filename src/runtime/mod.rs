//! The tree's runtime: one task, on the arbiter the tree was started on, that starts the
//! children, watches them, restarts what fails, and carries out the shutdown protocol.
//!
//! Everything that decides an order lives here, in one place and on one thread, so ordering is
//! plain sequential code rather than a negotiation between actors: the runtime tells a child
//! `Stopping` when the child's parent has been told and every child that depends on it has
//! finished; it finishes a supervisor when its last child has finished; it aborts whoever is
//! still pending at their deadline; it decides restarts by policy, strategy and intensity.
//! Children talk to it only through [`Event`]s; callers only through [`Command`]s and the
//! [`Shared`] state behind a `TreeHandle`.
//!
//! The work is split by concern: `start.rs` places and spawns workers in start order,
//! `stop.rs` stops sets of children by the shutdown rules (the whole tree on shutdown, some
//! siblings for a restart), `restart.rs` decides what an ended child means, `report.rs` turns
//! the final state into the report. This file holds the state they share and the event loop.

mod observer;
mod report;
mod restart;
mod shared;
mod start;
mod stop;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::graph::Graph;
use crate::protocol::{Event, EventTx, Exit, Gen, NodeId, Outcome};
use crate::report::{ShutdownReport, TreeOutcome};

pub(crate) use shared::{Command, Config, Shared};
pub use shared::{Phase, PhaseWatch};

use restart::{Life, Wave};
use stop::{Order, Shutdown};

// For the edge modules that follow the tree (systemd).
pub(crate) use observer::Observer;

const LOG: &str = "actix_supervisor::runtime";

#[derive(Clone, Debug, PartialEq)]
enum Status {
    /// Not running, and not yet told anything: before its (re)start.
    NotStarted,
    Running,
    /// Ended on its own before being told; the outcome is kept for the report (or for the stop
    /// of a restart it is part of).
    Exited(Outcome),
    Told,
    /// Finished: for the shutdown, or for the stop half of a restart.
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
    /// Workers in this subtree queued or spawned whose start is not confirmed yet.
    unconfirmed: u32,
    /// A worker's current instance; events from others are stale.
    gen: Gen,
}

impl NodeState {
    fn new() -> Self {
        NodeState {
            status: Status::NotStarted,
            told_at: Stamp::NONE,
            done_at: Stamp::NONE,
            deadline: Stamp::NONE,
            waiting: 0,
            pending_children: 0,
            drained: 0,
            unconfirmed: 0,
            gen: 0,
        }
    }

    fn is_told_or_done(&self) -> bool {
        matches!(self.status, Status::Told | Status::Done(_))
    }
}

enum Step {
    Tell(NodeId),
    Done(NodeId, Outcome),
    /// A child ended while running (outside any stop): apply its policy.
    Ended(NodeId, Outcome),
    /// Every root of a supervisor's restart has stopped.
    WaveStopped(NodeId),
}

/// The initial start, while it lasts.
struct Starting {
    reply: Option<tokio::sync::oneshot::Sender<StartResult>>,
    /// Commands that arrived during the start; handled once it is over.
    deferred: Vec<Command>,
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
    /// Per node: index into `arbiters`, or [`start::HOME`] for the runtime's own arbiter.
    arbiter_of: Vec<u32>,
    arbiters: Vec<ArbiterHandle>,
    created: Vec<Arbiter>,
    /// Some while the initial start runs.
    starting: Option<Starting>,
    /// The child whose failure stopped the initial start, and why.
    start_failure: Option<(String, String)>,
    /// Workers waiting to be spawned, one queue per start in progress (the initial start, each
    /// restart), each in start order.
    spawn_queues: Vec<VecDeque<NodeId>>,
    shutdown: Option<Shutdown>,
    /// Restarts in progress, by supervisor.
    waves: HashMap<NodeId, Wave>,
    /// Children that have restarted or failed: counts and last failure, for the report.
    lives: HashMap<NodeId, Life>,
    /// Per supervisor: recent restarts, for its intensity.
    histories: HashMap<NodeId, crate::supervision::RestartHistory>,
    /// The root gave up: the shutdown's reason, and the report must say it failed.
    escalated: bool,
    /// `(deadline, parent)`: some children of `parent` must have acknowledged by `deadline`.
    /// Keyed by parent so that siblings told together share one entry.
    deadlines: BinaryHeap<Reverse<(Instant, NodeId)>>,
    last_deadline: Option<(Instant, NodeId)>,
    /// Workers told to stop for a restart whose drain must now close their gate: the shutdown
    /// began while they drained.
    close_when_done: HashSet<NodeId>,
    steps: Vec<Step>,
}

pub(crate) type StartResult = Result<(), (String, String, Arc<ShutdownReport>)>;

impl Runtime {
    pub(crate) fn new(g: Graph, cfg: Config, name: String) -> (Runtime, Arc<Shared>) {
        let (events_tx, events) = unbounded_channel();
        let (commands_tx, commands) = unbounded_channel();
        let g = Arc::new(g);
        let shared = Arc::new(Shared::new(name, g.clone(), commands_tx, cfg.phase.clone()));
        for node in &g.nodes {
            if let Some(w) = &node.worker {
                w.set_budget(node.budget().unwrap_or(cfg.worker_budget));
            }
        }
        let st = (0..g.nodes.len()).map(|_| NodeState::new()).collect();
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
            starting: None,
            start_failure: None,
            spawn_queues: Vec::new(),
            shutdown: None,
            waves: HashMap::new(),
            lives: HashMap::new(),
            histories: HashMap::new(),
            escalated: false,
            deadlines: BinaryHeap::new(),
            last_deadline: None,
            close_when_done: HashSet::new(),
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
        // Observers hear about a runtime that panicked too (cloned only when there are some).
        let observers = self.cfg.observers.clone();
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
                    for o in &observers {
                        o.stopped(&report);
                    }
                    shared.publish(Arc::new(report));
                    std::task::Poll::Ready(())
                }
            }
        })
    }

    /// The runtime's whole life: start, serve, restart, shut down, report.
    pub(crate) async fn run(mut self, started: tokio::sync::oneshot::Sender<StartResult>) {
        self.starting = Some(Starting {
            reply: Some(started),
            deferred: Vec::new(),
        });
        self.begin_start();
        self.run_steps();
        let report = self.serve().await;
        if let Some(reply) = self.starting.take().and_then(|s| s.reply) {
            // The start never completed: it failed, and `report` is the shutdown of what started.
            let (child, cause) = self
                .start_failure
                .take()
                .unwrap_or_else(|| ("(tree)".into(), "the start did not complete".into()));
            let _ = reply.send(Err((child, cause, report)));
        }
    }

    /// Handles events, commands and timers until the shutdown is complete; returns the report.
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
        let (Event::Started(id, gen) | Event::Acked(id, gen, _) | Event::Exited(id, gen, _)) =
            event;
        let status = &self.st[id.index()].status;
        if gen != self.st[id.index()].gen || *status == Status::NotStarted {
            // From an instance that was aborted or replaced (a node waiting for its next
            // instance has none: whatever it hears is from the last one).
            return;
        }
        match event {
            Event::Started(id, _) => {
                self.unconfirm(id);
                match self.lives.get(&id).map_or(0, |l| l.restarts) {
                    0 => log::info!(target: LOG, "started {}", self.g.path(id)),
                    n => log::info!(target: LOG, "restarted {} (restart {n})", self.g.path(id)),
                }
            }
            Event::Acked(id, _, stats) => {
                if self.st[id.index()].status == Status::Told {
                    self.st[id.index()].drained = stats.drained;
                    self.steps.push(Step::Done(id, Outcome::Drained));
                }
            }
            Event::Exited(id, _, exit) => {
                let unconfirmed = self.st[id.index()].unconfirmed > 0;
                self.unconfirm(id);
                let outcome = self.exit_outcome(id, exit, unconfirmed);
                match self.st[id.index()].status {
                    Status::Told => {
                        if self.shutdown.is_none() && outcome.is_failure() {
                            // Stopped for a restart, it failed on the way: the restart goes
                            // on, and the report keeps the failure.
                            self.lives.entry(id).or_default().last_failure =
                                Some(outcome.to_string());
                        }
                        self.steps.push(Step::Done(id, outcome));
                    }
                    Status::Running => {
                        if unconfirmed && self.is_initial_start(id) {
                            self.fail_start(id, outcome);
                        } else {
                            self.steps.push(Step::Ended(id, outcome));
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// How an instance's end is recorded, logged with the child's path.
    fn exit_outcome(&self, id: NodeId, exit: Exit, during_start: bool) -> Outcome {
        let path = self.g.path(id);
        match exit {
            Exit::Panicked(m) => {
                log::error!(target: LOG, "{path} panicked: {m}");
                Outcome::Panicked(m)
            }
            Exit::Failed(m) => {
                log::error!(target: LOG, "{path} failed: {m}");
                Outcome::Failed(m)
            }
            Exit::Stopped { .. } if during_start => {
                log::warn!(target: LOG, "{path} stopped during its start");
                Outcome::Failed("stopped during start".into())
            }
            // Once it has begun draining it abandons the drain: a failure.
            Exit::Stopped { draining: true } => {
                log::warn!(target: LOG, "{path} stopped without acknowledging");
                Outcome::Failed("stopped itself while draining, without acknowledging".into())
            }
            // Stopping on its own is a normal end for a running worker.
            Exit::Stopped { draining: false } => {
                log::warn!(target: LOG, "{path} stopped on its own");
                Outcome::NotRunning
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        if let Some(starting) = &mut self.starting {
            // A shutdown asked for during the start waits for the start to be over.
            if self.shutdown.is_none() {
                starting.deferred.push(cmd);
                return;
            }
        }
        match cmd {
            Command::Shutdown(reason) => {
                if self.shutdown.is_none() {
                    self.begin_shutdown(reason, Order::Dependencies);
                }
            }
            Command::Force(reason) => self.force(reason),
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let mut wake: Option<Instant> = self.deadlines.peek().map(|Reverse((d, _))| *d);
        let mut consider = |t: Instant| wake = Some(wake.map_or(t, |w| w.min(t)));
        if let Some(sd) = &self.shutdown {
            consider(sd.overall);
            consider(sd.next_progress);
            if let Some(g) = sd.grace_until {
                consider(g);
            }
        }
        for w in self.waves.values() {
            if let Some(t) = w.start_at {
                consider(t);
            }
        }
        wake
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if self.shutdown.is_some() && self.on_shutdown_timer(now) {
            return;
        }
        self.abort_late(now);
        self.start_due_restarts(now);
        if let Some(sd) = &mut self.shutdown {
            if sd.next_progress <= now {
                sd.next_progress = now + self.cfg.progress_interval;
                self.log_progress(now);
            }
        }
    }

    /// Carries out queued steps, and the spawns they make possible, until none is left.
    fn run_steps(&mut self) {
        loop {
            // One instant for the whole pass: siblings told together share told time and
            // deadline, and a child released by an acknowledgement is never told "before" it.
            let now = Instant::now();
            while let Some(step) = self.steps.pop() {
                match step {
                    Step::Tell(id) => self.tell(id, now),
                    Step::Done(id, outcome) => {
                        if self.mark_done(id, outcome, now) {
                            self.propagate(id);
                        }
                    }
                    Step::Ended(id, outcome) => self.on_ended(id, outcome),
                    Step::WaveStopped(sup) => self.wave_stopped(sup, now),
                }
            }
            self.spawn_ready();
            self.check_started();
            if self.steps.is_empty() {
                break;
            }
        }
    }

    /// Marks `w`'s start as no longer pending (confirmed, or never going to be), up its chain.
    fn unconfirm(&mut self, w: NodeId) {
        if self.st[w.index()].unconfirmed == 0 || self.g.node(w).worker.is_none() {
            return;
        }
        let mut cur = Some(w);
        while let Some(n) = cur {
            let s = &mut self.st[n.index()];
            s.unconfirmed = s.unconfirmed.saturating_sub(1);
            cur = self.g.node(n).parent;
        }
    }

    /// `id` and everything below it, parents before children.
    fn subtree(&self, id: NodeId) -> Vec<NodeId> {
        let mut out = vec![id];
        let mut i = 0;
        while i < out.len() {
            out.extend(self.g.node(out[i]).children.iter().copied());
            i += 1;
        }
        out
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
