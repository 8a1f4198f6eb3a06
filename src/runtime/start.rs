//! Starting workers: placing them on arbiters once, then spawning them in start order — every
//! worker after the dependencies of it and of its ancestors have confirmed their start — for the
//! initial start and for every restart alike.

use std::collections::{HashMap, VecDeque};

use actix::prelude::*;

use super::{Runtime, Starting, Status, LOG};
use crate::graph::ROOT;
use crate::protocol::{Event, Exit, NodeId, Outcome};
use crate::spec::Placement;

/// `arbiter_of` value for "the arbiter the runtime runs on".
pub(super) const HOME: u32 = u32::MAX;

impl Runtime {
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
    /// The initial start: places the workers, queues them all.
    pub(super) fn begin_start(&mut self) {
        self.place_workers();
        let order = self.g.start_order.clone();
        self.queue_spawns(order);
        // Supervisors without workers below them are running once the tree is; the others
        // become running when their first worker is spawned.
        self.mark_empty_supervisors_running(ROOT);
    }

    /// Queues workers (in start order) to be spawned as soon as their prerequisites allow.
    pub(super) fn queue_spawns(&mut self, workers: Vec<NodeId>) {
        for &w in &workers {
            let mut cur = Some(w);
            while let Some(n) = cur {
                self.st[n.index()].unconfirmed += 1;
                cur = self.g.node(n).parent;
            }
        }
        if !workers.is_empty() {
            self.spawn_queues.push(VecDeque::from(workers));
        }
    }

    /// Drops `w` from whatever spawn queue holds it (it is part of a stop now).
    pub(super) fn unqueue(&mut self, w: NodeId) {
        for q in &mut self.spawn_queues {
            if let Some(pos) = q.iter().position(|&x| x == w) {
                q.remove(pos);
                self.unconfirm(w);
                break;
            }
        }
        self.spawn_queues.retain(|q| !q.is_empty());
    }

    pub(super) fn mark_empty_supervisors_running(&mut self, top: NodeId) {
        for n in self.subtree(top) {
            let node = self.g.node(n);
            if node.worker.is_none()
                && self.st[n.index()].status == Status::NotStarted
                && self.st[n.index()].unconfirmed == 0
            {
                self.st[n.index()].status = Status::Running;
            }
        }
    }

    /// Spawns, queue by queue, every worker at the head whose prerequisites have started.
    /// A queue waits at its first worker that is not ready, so each start follows start order.
    pub(super) fn spawn_ready(&mut self) {
        if self.shutdown.is_some() {
            self.spawn_queues.clear();
            return;
        }
        let mut qi = 0;
        while qi < self.spawn_queues.len() {
            while let Some(&w) = self.spawn_queues[qi].front() {
                if !self.prerequisites_started(w) {
                    break;
                }
                self.spawn_queues[qi].pop_front();
                if let Err(cause) = self.spawn(w) {
                    self.unconfirm(w);
                    let outcome = Outcome::Failed(cause);
                    if self.is_initial_start(w) {
                        self.fail_start(w, outcome);
                        return;
                    }
                    log::error!(target: LOG, "{} failed to restart: {outcome}", self.g.path(w));
                    self.steps.push(super::Step::Ended(w, outcome));
                }
            }
            qi += 1;
        }
        self.spawn_queues.retain(|q| !q.is_empty());
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

    /// Makes a new instance of worker `w` and starts it where it is placed.
    fn spawn(&mut self, w: NodeId) -> Result<(), String> {
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
        if self.st[w.index()].gen != 0 {
            // It had an instance before: this one is a restart.
            self.lives.entry(w).or_default().restarts += 1;
        }
        let events = self.events_tx.clone();
        let gen = worker.new_instance();
        self.st[w.index()].gen = gen;
        match self.arbiter_of[w.index()] {
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
        }
    }

    /// True while `w`'s failure would be a failure of the initial start: the tree has not
    /// finished starting and this is `w`'s first instance.
    pub(super) fn is_initial_start(&self, w: NodeId) -> bool {
        self.starting.is_some() && self.lives.get(&w).is_none_or(|l| l.restarts == 0)
    }

    /// The initial start failed at `w`: stop what started, in reverse start order.
    pub(super) fn fail_start(&mut self, w: NodeId, outcome: Outcome) {
        let cause = match &outcome {
            Outcome::Panicked(m) => format!("panicked: {m}"),
            Outcome::Failed(m) => m.clone(),
            other => other.to_string(),
        };
        let path = self.g.path(w);
        log::error!(target: LOG, "child `{path}` failed to start: {cause}; stopping what started");
        if let Some(worker) = &self.g.node(w).worker {
            worker.close();
        }
        self.st[w.index()].status = Status::Exited(outcome);
        self.spawn_queues.clear();
        if self.start_failure.is_none() {
            self.start_failure = Some((path.clone(), cause));
        }
        if self.shutdown.is_none() {
            self.begin_shutdown(
                format!("start of `{path}` failed"),
                super::stop::Order::ReverseStart,
            );
        }
    }

    /// Ends the initial start once every worker has confirmed.
    pub(super) fn check_started(&mut self) {
        if self.starting.is_none()
            || self.shutdown.is_some()
            || self.st[ROOT.index()].unconfirmed > 0
            || !self.spawn_queues.is_empty()
        {
            return;
        }
        let Some(Starting { reply, deferred }) = self.starting.take() else {
            return;
        };
        // A trigger during the start has already moved the phase on; keep it.
        let running = self.shared.set_running();
        log::info!(target: LOG, "tree `{}` running", self.shared.name);
        // Only if the phase did become Running: after a trigger during the start, the
        // observers hear `draining` next, never `running`.
        if running {
            for o in &self.cfg.observers {
                o.running();
            }
        }
        if let Some(reply) = reply {
            let _ = reply.send(Ok(()));
        }
        for cmd in deferred {
            self.on_command(cmd);
        }
    }
}
