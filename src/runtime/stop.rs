//! Stopping children by the shutdown rules: a child is told `Stopping` once its parent has been
//! told and every child that depends on it has finished; a supervisor finishes when its last
//! child has; whoever is still pending at their deadline is aborted.
//!
//! The same rules stop two kinds of sets: the whole tree (the shutdown, [`Shutdown`]), and the
//! siblings a supervisor restarts (a restart's stop half, see `restart.rs`). A stop for a restart
//! leaves the stopped workers' gates open — their mailboxes wait for the next instance — while
//! the shutdown closes them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::{fmt_secs, Runtime, Stamp, Status, Step, LOG};
use crate::graph::ROOT;
use crate::protocol::{NodeId, Outcome, Stopping};
use crate::report::fmt_duration;
use crate::supervision::Restart;

/// How the shutdown's stop order is decided.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Order {
    /// Dependents before dependencies, independent siblings concurrently.
    Dependencies,
    /// After a failed start: additionally one worker at a time, in reverse start order.
    ReverseStart,
}

/// One stop's reason, and the `Stopping` order last made for it: siblings told together share
/// one order (one allocation for 100,000 workers).
pub(super) struct Orders {
    reason: Arc<str>,
    /// The orders are for a restart (see [`Stopping::restarting`]).
    restarting: bool,
    last: Option<Arc<Stopping>>,
}

impl Orders {
    /// Orders for a final stop.
    pub(super) fn new(reason: &str) -> Self {
        Orders {
            reason: reason.into(),
            restarting: false,
            last: None,
        }
    }

    /// Orders for a stop that a restart follows.
    pub(super) fn restart(reason: &str) -> Self {
        Orders {
            restarting: true,
            ..Orders::new(reason)
        }
    }

    pub(super) fn reason(&self) -> &Arc<str> {
        &self.reason
    }

    /// The order for a child told now with `deadline`. `stays_down`: the child is stopped with
    /// a restart's siblings but not started again (a temporary one), so its order is final.
    fn order(&mut self, deadline: Instant, stays_down: bool) -> Arc<Stopping> {
        let restarting = self.restarting && !stays_down;
        match &self.last {
            Some(o) if o.deadline == deadline && o.restarting == restarting => o.clone(),
            _ => {
                let o = Arc::new(Stopping {
                    reason: self.reason.clone(),
                    deadline,
                    restarting,
                });
                self.last = Some(o.clone());
                o
            }
        }
    }
}

pub(super) struct Shutdown {
    pub(super) orders: Orders,
    pub(super) started: Instant,
    pub(super) started_wall: SystemTime,
    pub(super) overall: Instant,
    pub(super) grace_until: Option<Instant>,
    pub(super) next_progress: Instant,
    pub(super) forced: bool,
    /// In `ReverseStart` order: the worker started just before each worker.
    started_before: HashMap<NodeId, NodeId>,
}

/// Which stop a child is part of.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    Shutdown,
    /// The stop half of a restart by this supervisor.
    Restart(NodeId),
}

impl Runtime {
    pub(super) fn begin_shutdown(&mut self, reason: String, order: Order) {
        self.shared
            .triggered
            .store(true, std::sync::atomic::Ordering::Release);
        self.shared.set_phase(super::Phase::Draining);
        let now = Instant::now();
        log::info!(
            target: LOG,
            "tree `{}` draining: {reason} (deadline {})",
            self.shared.name,
            fmt_duration(self.cfg.deadline)
        );
        for o in &self.cfg.observers {
            o.draining(&reason);
        }
        // Nothing restarts while draining; stops of restarts under way become part of this one.
        self.cancel_restarts();
        self.spawn_queues.clear();
        // Children a restart or a give-up had already stopped are not running now. Their gates
        // close, whatever waited for their next instance is dropped (and counted), and their
        // report entries say how they stand now rather than replay that earlier stop.
        for i in 0..self.g.nodes.len() {
            let s = &mut self.st[i];
            if let Status::Done(o) = &s.status {
                if *o == Outcome::Drained {
                    s.status = Status::Done(Outcome::NotRunning);
                }
                s.told_at = Stamp::NONE;
                s.done_at = Stamp::NONE;
                if let Some(w) = &self.g.nodes[i].worker {
                    w.close();
                }
            }
        }
        let done = |s: &super::NodeState| matches!(s.status, Status::Done(_));
        for i in 0..self.g.nodes.len() {
            let node = &self.g.nodes[i];
            let waiting = node
                .dependents
                .iter()
                .filter(|d| !done(&self.st[d.index()]))
                .count() as u32;
            let pending = node
                .children
                .iter()
                .filter(|c| !done(&self.st[c.index()]))
                .count() as u32;
            self.st[i].waiting = waiting;
            self.st[i].pending_children = pending;
        }
        // A supervisor a restart had told is told again by the shutdown's own rules — once its
        // parent has been told and its dependents have finished — so the children it has not
        // told yet wait for those, and for its ancestors' dependents. (Workers the restart had
        // told are draining already; that cannot be taken back.)
        for i in 1..self.g.nodes.len() {
            if self.g.nodes[i].worker.is_none() && self.st[i].status == Status::Told {
                self.st[i].status = Status::Running;
            }
        }
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
        let grace = (!self.cfg.grace.is_zero()).then(|| now + self.cfg.grace);
        if grace.is_some() {
            log::info!(target: LOG, "readiness grace: {} before stopping anything", fmt_duration(self.cfg.grace));
        }
        self.shutdown = Some(Shutdown {
            orders: Orders::new(&reason),
            started: now,
            started_wall: SystemTime::now(),
            overall: now + self.cfg.deadline,
            grace_until: grace,
            next_progress: now + self.cfg.progress_interval,
            forced: false,
            started_before,
        });
        if grace.is_none() {
            self.steps.push(Step::Tell(ROOT));
        }
    }

    /// A second signal, or `force_shutdown`: skip the remaining budgets.
    pub(super) fn force(&mut self, reason: String) {
        if let Some(sd) = &mut self.shutdown {
            if !sd.forced {
                sd.forced = true;
                sd.grace_until = None;
                log::warn!(target: LOG, "shutdown forced ({reason}): aborting everything still pending");
                self.abort_subtree(ROOT);
            }
        }
    }

    /// The shutdown's own timers: the end of the grace, the overall deadline. True when one
    /// fired and nothing else is to be checked in this turn.
    pub(super) fn on_shutdown_timer(&mut self, now: Instant) -> bool {
        let Some(sd) = self.shutdown.as_mut() else {
            return false;
        };
        if sd.grace_until.is_some_and(|g| g <= now) {
            sd.grace_until = None;
            self.steps.push(Step::Tell(ROOT));
            return true;
        }
        if sd.overall <= now {
            log::warn!(target: LOG, "overall deadline reached: aborting everything still pending");
            self.deadlines.clear();
            self.abort_subtree(ROOT);
            return true;
        }
        false
    }

    /// Aborts the told children whose deadline has passed.
    pub(super) fn abort_late(&mut self, now: Instant) {
        let mut expired = Vec::new();
        while let Some(Reverse((d, parent))) = self.deadlines.peek().copied() {
            if d > now {
                break;
            }
            self.deadlines.pop();
            expired.push(parent);
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
    }

    fn stop_of(&self, id: NodeId) -> Option<Stop> {
        if self.shutdown.is_some() {
            Some(Stop::Shutdown)
        } else {
            self.wave_of(id).map(Stop::Restart)
        }
    }

    /// True when `id`, stopped by `sup`'s restart, is on the branch of a temporary root: the
    /// restart does not start it again (see `restart.rs`, `restart`).
    fn stays_down(&self, id: NodeId, sup: NodeId) -> bool {
        let mut root = id;
        while let Some(p) = self.g.node(root).parent {
            if p == sup {
                return self.g.restart(root) == Restart::Temporary;
            }
            root = p;
        }
        false
    }

    pub(super) fn tell(&mut self, id: NodeId, now: Instant) {
        let Some(stop) = self.stop_of(id) else { return };
        if self.st[id.index()].is_told_or_done() {
            return;
        }
        let node = self.g.node(id);
        let parent_told = node
            .parent
            .filter(|p| self.st[p.index()].status == Status::Told);
        let parent_deadline = match (parent_told, stop) {
            (Some(p), _) => self.st[p.index()].deadline.at(self.base),
            (None, Stop::Shutdown) => self.shutdown.as_ref().map(|sd| sd.overall),
            (None, Stop::Restart(_)) => None,
        };
        let own = node
            .budget()
            .or(node.worker.as_ref().map(|_| self.cfg.worker_budget))
            .map(|b| now + b);
        let deadline = match (parent_deadline, own) {
            (Some(p), Some(o)) => Some(p.min(o)),
            (p, o) => p.or(o),
        };
        let s = &mut self.st[id.index()];
        let previous = std::mem::replace(&mut s.status, Status::Told);
        s.told_at = Stamp::of(self.base, now);
        s.deadline = deadline.map_or(Stamp::NONE, |d| Stamp::of(self.base, d));
        let watch_key = node.parent.unwrap_or(ROOT);
        match &node.worker {
            Some(worker) => match previous {
                Status::Running => {
                    let deadline = deadline.unwrap_or(now + self.cfg.worker_budget);
                    let order = match stop {
                        Stop::Shutdown => self
                            .shutdown
                            .as_mut()
                            .map(|sd| sd.orders.order(deadline, false)),
                        Stop::Restart(sup) => {
                            let stays_down = self.stays_down(id, sup);
                            self.waves
                                .get_mut(&sup)
                                .map(|w| w.orders.order(deadline, stays_down))
                        }
                    };
                    // A temporary child stopped for a sibling's restart will not start again:
                    // its gate closes when it has drained, as in a shutdown.
                    let close = match stop {
                        Stop::Shutdown => true,
                        Stop::Restart(sup) => {
                            node.parent == Some(sup) && self.g.restart(id) == Restart::Temporary
                        }
                    };
                    if order.is_some_and(|o| worker.tell(o, close)) {
                        if stop == Stop::Shutdown {
                            log::info!(target: LOG, "{} draining", self.g.path(id));
                        } else {
                            log::info!(target: LOG, "{} draining for a restart", self.g.path(id));
                        }
                        watch(
                            &mut self.deadlines,
                            &mut self.last_deadline,
                            deadline,
                            watch_key,
                        );
                    } else {
                        self.steps.push(Step::Done(id, Outcome::NotRunning));
                    }
                }
                Status::Exited(outcome) => self.steps.push(Step::Done(id, outcome)),
                _ => self.steps.push(Step::Done(id, Outcome::NotRunning)),
            },
            None => {
                if let Status::Exited(outcome) = previous {
                    // A supervisor that gave up: its children were stopped already.
                    self.steps.push(Step::Done(id, outcome));
                    return;
                }
                if id != ROOT {
                    log::info!(target: LOG, "stopping {}", self.g.path(id));
                }
                if let Some(d) = deadline {
                    if parent_deadline.is_none_or(|p| d < p) {
                        watch(&mut self.deadlines, &mut self.last_deadline, d, watch_key);
                    }
                }
                if self.st[id.index()].pending_children == 0 {
                    self.steps.push(Step::Done(id, Outcome::Drained));
                }
                // Reverse so the stack pops them in declared order.
                for &c in node.children.iter().rev() {
                    let cs = &self.st[c.index()];
                    if cs.waiting == 0 && !cs.is_told_or_done() {
                        self.steps.push(Step::Tell(c));
                    }
                }
            }
        }
    }

    /// Records `id` as done. False when it already was.
    pub(super) fn mark_done(&mut self, id: NodeId, outcome: Outcome, now: Instant) -> bool {
        if matches!(self.st[id.index()].status, Status::Done(_)) {
            return false;
        }
        if self.st[id.index()].unconfirmed > 0 {
            self.unconfirm(id);
        }
        let node = self.g.node(id);
        if let Some(w) = &node.worker {
            // A drained worker closed its own gate (when the stop closes it); any other end
            // closes it here, so that later sends fail at the sender.
            let shutdown_end = self.shutdown.is_some() && outcome != Outcome::Drained;
            let was_open = !self.close_when_done.is_empty() && self.close_when_done.contains(&id);
            if was_open || shutdown_end {
                w.close();
            }
        }
        let s = &mut self.st[id.index()];
        s.done_at = Stamp::of(self.base, now);
        if id != ROOT && log::log_enabled!(target: LOG, log::Level::Info) {
            let path = self.g.path(id);
            let took = match (s.told_at.at(self.base), s.done_at.at(self.base)) {
                (Some(t), Some(d)) => format!("after {}", fmt_duration(d - t)),
                _ => "before being told".into(),
            };
            // Done in the pass that told it: it had ended before, and that end was logged.
            let ended_before = s.told_at == s.done_at && outcome.is_failure();
            match &outcome {
                _ if ended_before => log::debug!(target: LOG, "{path}: had ended ({outcome})"),
                Outcome::Drained if node.worker.is_none() => {
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
    pub(super) fn propagate(&mut self, id: NodeId) {
        let Some(stop) = self.stop_of(id) else { return };
        let reverse_prev = self
            .shutdown
            .as_ref()
            .and_then(|sd| sd.started_before.get(&id).copied());
        let node = self.g.node(id);
        let top = match stop {
            Stop::Shutdown => None,
            Stop::Restart(sup) => Some(sup),
        };
        for d in node.deps.iter().copied().chain(reverse_prev) {
            if top.is_some() && self.stop_of(d) != Some(stop) {
                continue; // not part of this restart
            }
            let s = &mut self.st[d.index()];
            s.waiting = s.waiting.saturating_sub(1);
            let parent = self.g.node(d).parent;
            // A root of a restart is told without its parent (which keeps running).
            let parent_ready =
                parent.is_none_or(|p| top == Some(p) || self.st[p.index()].status == Status::Told);
            if self.st[d.index()].waiting == 0 && parent_ready {
                self.steps.push(Step::Tell(d));
            }
        }
        match (node.parent, top) {
            (Some(p), Some(sup)) if p == sup => {
                if let Some(w) = self.waves.get_mut(&sup) {
                    w.pending = w.pending.saturating_sub(1);
                    if w.pending == 0 {
                        self.steps.push(Step::WaveStopped(sup));
                    }
                }
            }
            (Some(p), _) => {
                let s = &mut self.st[p.index()];
                s.pending_children = s.pending_children.saturating_sub(1);
                if s.pending_children == 0 && s.status == Status::Told {
                    self.steps.push(Step::Done(p, Outcome::Drained));
                }
            }
            (None, _) => {}
        }
    }

    /// Aborts `id` and everything under it that is not done; their parents and dependencies go on.
    pub(super) fn abort_subtree(&mut self, id: NodeId) {
        let now = Instant::now();
        let mut finished = Vec::new();
        for n in self.subtree(id) {
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
    }

    pub(super) fn log_progress(&self, now: Instant) {
        let Some(sd) = &self.shutdown else { return };
        // The line is built only for someone: the log at INFO, or an observer.
        if self.cfg.observers.is_empty() && !log::log_enabled!(target: LOG, log::Level::Info) {
            return;
        }
        if sd.grace_until.is_some() {
            self.emit_progress("readiness grace: nothing stopped yet");
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
        self.emit_progress(&line);
    }

    /// One progress line, built once, to the log and to every observer.
    fn emit_progress(&self, line: &str) {
        log::info!(target: LOG, "{line}");
        for o in &self.cfg.observers {
            o.progress(line);
        }
    }
}

/// Makes sure the timer wakes at `deadline` to check `parent`'s children. (A function of the two
/// fields rather than a method, so `tell` can call it while it holds the node.)
fn watch(
    deadlines: &mut BinaryHeap<Reverse<(Instant, NodeId)>>,
    last: &mut Option<(Instant, NodeId)>,
    deadline: Instant,
    parent: NodeId,
) {
    if *last != Some((deadline, parent)) {
        *last = Some((deadline, parent));
        deadlines.push(Reverse((deadline, parent)));
    }
}
