//! What a child's end means while the tree runs: its policy, its supervisor's strategy and
//! intensity, and the restart itself.
//!
//! A restart is a **wave** under one supervisor: its roots (the siblings the strategy picks) are
//! stopped by the shutdown rules (`stop.rs`, gates left open), then — after the backoff, if any —
//! every node under the roots gets reset and every worker a new instance, spawned in start order
//! (`start.rs`). One wave per supervisor at a time: a second failure under the same supervisor
//! joins the wave in progress; a wave of a parent that takes in a supervisor with a wave of its
//! own replaces that one. A supervisor that gives up runs a wave over all its children that ends
//! with the supervisor itself ending as failed, for its parent to handle. While the tree drains,
//! none of this happens (`cancel_restarts`).

use std::time::{Duration, Instant};

use super::stop::{Order, Orders};
use super::{Runtime, Stamp, Status, Step, LOG};
use crate::graph::ROOT;
use crate::protocol::{NodeId, Outcome};
use crate::report::fmt_duration;
use crate::supervision::{Restart, Strategy};

/// What the report keeps about a child that restarted or failed.
#[derive(Debug, Default)]
pub(super) struct Life {
    pub(super) restarts: u32,
    pub(super) last_failure: Option<String>,
}

/// What happens once a wave's roots have stopped.
enum Then {
    Restart,
    /// The supervisor gave up: it ends as failed, with this reason.
    GiveUp(String),
}

/// A restart under one supervisor, in progress.
pub(super) struct Wave {
    /// The children being restarted.
    roots: Vec<NodeId>,
    /// Roots not done stopping.
    pub(super) pending: u32,
    then: Then,
    pub(super) orders: Orders,
    delay: Duration,
    /// Once stopped: when the roots start again (the backoff's end).
    pub(super) start_at: Option<Instant>,
}

impl Runtime {
    /// The supervisor whose restart `n` is being stopped by, if any: the nearest ancestor with a
    /// wave whose roots include the branch `n` is on.
    pub(super) fn wave_of(&self, n: NodeId) -> Option<NodeId> {
        if self.waves.is_empty() {
            return None;
        }
        let mut child = n;
        while let Some(p) = self.g.node(child).parent {
            if self.waves.get(&p).is_some_and(|w| w.roots.contains(&child)) {
                return Some(p);
            }
            child = p;
        }
        None
    }

    /// `id` ended on its own (panic, error, or a normal stop) while not being stopped.
    pub(super) fn on_ended(&mut self, id: NodeId, outcome: Outcome) {
        match self.st[id.index()].status {
            Status::Done(_) | Status::Exited(_) => return,
            // Told in the meantime (the shutdown reached it): its end is its outcome.
            Status::Told => {
                self.steps.push(Step::Done(id, outcome));
                return;
            }
            Status::Running | Status::NotStarted => {}
        }
        let abnormal = outcome.is_failure();
        if abnormal {
            self.lives.entry(id).or_default().last_failure = Some(outcome.to_string());
        }
        self.st[id.index()].status = Status::Exited(outcome.clone());
        if self.shutdown.is_some() {
            // Nothing restarts while draining: it is recorded, and its address closes.
            self.close_subtree(id);
            return;
        }
        if self.wave_of(id).is_some() {
            return; // a restart already stopping it will start it again
        }
        let node = self.g.node(id);
        let Some(sup) = node.parent else { return };
        let path = self.g.path(id);
        let ended = ended(&outcome);
        let policy = self.g.restart(id);
        if !policy.restarts_after(abnormal) {
            log::warn!(target: LOG, "{path} {ended}; it is {policy:?}: not restarted");
            self.close_subtree(id);
            return;
        }
        let sv = self.g.supervision(sup);
        let now = Instant::now();
        let counted = self
            .histories
            .entry(sup)
            .or_default()
            .record(now, sv.intensity);
        let k = match counted {
            Ok(k) => k,
            Err(count) => {
                let reason = format!(
                    "{count} restarts within {} (at most {} allowed); the last: {path} {ended}",
                    fmt_duration(sv.intensity.window),
                    sv.intensity.max_restarts
                );
                self.give_up(sup, id, reason);
                return;
            }
        };
        let siblings = &self.g.node(sup).children;
        let roots: Vec<NodeId> = match sv.strategy {
            Strategy::OneForOne => vec![id],
            Strategy::OneForAll => siblings.to_vec(),
            Strategy::RestForOne => {
                let rank = self.g.start_rank[id.index()];
                siblings
                    .iter()
                    .copied()
                    .filter(|c| self.g.start_rank[c.index()] >= rank)
                    .collect()
            }
        };
        let delay = sv
            .backoff
            .map_or(Duration::ZERO, |b| b.delay(k, fastrand::f64()));
        log::info!(
            target: LOG,
            "restarting {path}{} ({:?}; restart {} of at most {} in {}){}",
            if roots.len() > 1 {
                format!(" and {} sibling(s)", roots.len() - 1)
            } else {
                String::new()
            },
            sv.strategy,
            k + 1,
            sv.intensity.max_restarts,
            fmt_duration(sv.intensity.window),
            if delay.is_zero() {
                String::new()
            } else {
                format!(", after a backoff of {}", fmt_duration(delay))
            }
        );
        self.extend_wave(sup, roots, None, &format!("restart: {path} {ended}"), delay);
    }

    /// `sup` exceeded its intensity (`child`'s end was one too many).
    fn give_up(&mut self, sup: NodeId, child: NodeId, reason: String) {
        if sup == ROOT {
            log::error!(target: LOG, "tree `{}`: {reason}; giving up", self.shared.name);
            self.escalated = true;
            if self.starting.is_some() && self.start_failure.is_none() {
                self.start_failure = Some((self.g.path(child), reason.clone()));
            }
            self.begin_shutdown(
                format!("restart intensity of the root exceeded: {reason}"),
                Order::Dependencies,
            );
            return;
        }
        log::error!(target: LOG, "{}: {reason}; giving up", self.g.path(sup));
        let children = self.g.node(sup).children.to_vec();
        let stopping = format!("{} gives up: {reason}", self.g.path(sup));
        self.extend_wave(sup, children, Some(reason), &stopping, Duration::ZERO);
    }

    /// Adds `roots` (children of `sup`) to `sup`'s wave, starting one if none is under way, and
    /// tells those that may be told now.
    fn extend_wave(
        &mut self,
        sup: NodeId,
        roots: Vec<NodeId>,
        give_up: Option<String>,
        reason: &str,
        delay: Duration,
    ) {
        let wave = self.waves.entry(sup).or_insert_with(|| Wave {
            roots: Vec::new(),
            pending: 0,
            then: Then::Restart,
            orders: Orders::restart(reason),
            delay,
            start_at: None,
        });
        if let Some(r) = give_up {
            wave.then = Then::GiveUp(r);
            wave.orders = Orders::new(reason);
        }
        wave.delay = delay;
        wave.start_at = None;
        let new_roots: Vec<NodeId> = roots
            .into_iter()
            .filter(|r| !wave.roots.contains(r))
            .collect();
        wave.roots.extend(&new_roots);
        wave.pending += new_roots.len() as u32;
        let members: Vec<NodeId> = new_roots.iter().flat_map(|&r| self.subtree(r)).collect();
        for &m in &members {
            // A restart under way below is taken over: this one starts everything again.
            self.waves.remove(&m);
            if self.st[m.index()].status == Status::NotStarted {
                self.unqueue(m);
            }
        }
        let done = |rt: &Runtime, n: NodeId| matches!(rt.st[n.index()].status, Status::Done(_));
        for &m in &members {
            let node = self.g.node(m);
            let pending = node.children.iter().filter(|&&c| !done(self, c)).count() as u32;
            let waiting = node
                .dependents
                .iter()
                .filter(|&&d| !done(self, d) && self.wave_of(d) == Some(sup))
                .count() as u32;
            let s = &mut self.st[m.index()];
            s.pending_children = pending;
            s.waiting = waiting;
        }
        // Members already in the wave that a new member depends on, and that were not told
        // yet, now wait for that new member too: dependents stop first.
        for &m in &members {
            if done(self, m) {
                continue;
            }
            for &d in self.g.node(m).deps.iter() {
                if !members.contains(&d)
                    && self.wave_of(d) == Some(sup)
                    && !self.st[d.index()].is_told_or_done()
                {
                    self.st[d.index()].waiting += 1;
                }
            }
        }
        for &r in new_roots.iter().rev() {
            if self.st[r.index()].waiting == 0 {
                self.steps.push(Step::Tell(r));
            }
        }
    }

    /// Every root of `sup`'s wave has stopped: give up, or start again (now or after the
    /// backoff).
    pub(super) fn wave_stopped(&mut self, sup: NodeId, now: Instant) {
        let Some(wave) = self.waves.get_mut(&sup) else {
            return;
        };
        if wave.pending > 0 {
            return;
        }
        match &wave.then {
            Then::GiveUp(reason) => {
                let reason = format!("gave up: {reason}");
                self.waves.remove(&sup);
                self.steps.push(Step::Ended(sup, Outcome::Failed(reason)));
            }
            Then::Restart if wave.delay.is_zero() => self.restart(sup),
            Then::Restart => wave.start_at = Some(now + wave.delay),
        }
    }

    /// Starts the waves whose backoff is over.
    pub(super) fn start_due_restarts(&mut self, now: Instant) {
        let due: Vec<NodeId> = self
            .waves
            .iter()
            .filter(|(_, w)| w.start_at.is_some_and(|t| t <= now))
            .map(|(&s, _)| s)
            .collect();
        for sup in due {
            self.restart(sup);
        }
    }

    /// The start half of `sup`'s wave: reset every node under the roots and queue every worker
    /// for a new instance. Temporary roots stay down, as in OTP.
    fn restart(&mut self, sup: NodeId) {
        let Some(wave) = self.waves.remove(&sup) else {
            return;
        };
        let mut roots = wave.roots;
        roots.sort_by_key(|r| self.g.start_rank[r.index()]);
        let mut workers = Vec::new();
        for &r in &roots {
            if self.g.restart(r) == Restart::Temporary {
                // Stopped with its siblings and not started again: not running.
                let outcome = match &self.st[r.index()].status {
                    Status::Done(o) | Status::Exited(o) if o.is_failure() => o.clone(),
                    _ => Outcome::NotRunning,
                };
                self.st[r.index()].status = Status::Exited(outcome);
                self.close_subtree(r);
                continue;
            }
            for m in self.subtree(r) {
                let s = &mut self.st[m.index()];
                s.status = Status::NotStarted;
                s.told_at = Stamp::NONE;
                s.done_at = Stamp::NONE;
                s.deadline = Stamp::NONE;
                s.waiting = 0;
                s.pending_children = 0;
                s.drained = 0;
                if self.g.node(m).worker.is_some() {
                    // Counted when its new instance is spawned: a restart taken over by another
                    // before that gives it one instance, not two.
                    workers.push(m);
                } else {
                    self.lives.entry(m).or_default().restarts += 1;
                    // A supervisor starts afresh, as in OTP: its earlier life's restarts do not
                    // count against its intensity.
                    self.histories.remove(&m);
                }
            }
        }
        workers.sort_by_key(|w| self.g.start_rank[w.index()]);
        self.queue_spawns(workers);
        for &r in &roots {
            self.mark_empty_supervisors_running(r);
        }
    }

    /// The shutdown began: no restart goes on. Children a restart is stopping finish their drain
    /// as part of the shutdown, and close their gates. (Those it had stopped already are closed
    /// by `begin_shutdown` with every other stopped child.)
    pub(super) fn cancel_restarts(&mut self) {
        let waves: Vec<(NodeId, Wave)> = self.waves.drain().collect();
        for (_, wave) in waves {
            for &r in &wave.roots {
                for m in self.subtree(r) {
                    if self.st[m.index()].status != Status::Told {
                        continue;
                    }
                    if let Some(w) = &self.g.node(m).worker {
                        w.close_when_drained();
                        self.close_when_done.insert(m);
                    }
                }
            }
        }
    }

    /// Closes the gates of every worker under `id`: it is gone for good.
    fn close_subtree(&mut self, id: NodeId) {
        for n in self.subtree(id) {
            if let Some(w) = &self.g.node(n).worker {
                w.close();
            }
        }
    }
}

/// How an end reads in a log line: `panicked: …`, `failed: …`, `stopped itself`.
fn ended(outcome: &Outcome) -> String {
    match outcome {
        Outcome::NotRunning => "stopped itself".to_owned(),
        other => other.to_string(),
    }
}
