//! The end of the tree's life: the report assembled from the final state, the arbiters the tree
//! created stopped and joined, the report published.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use super::{Phase, Runtime, Stamp, Status, LOG};
use crate::graph::ROOT;
use crate::protocol::{NodeId, Outcome};
use crate::report::{fmt_duration, ChildKind, ChildReport, ShutdownReport, TreeOutcome};

impl Runtime {
    /// The report, once the root is done.
    pub(super) fn finished_report(&self) -> Option<ShutdownReport> {
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
        if self.escalated && outcome == TreeOutcome::Clean {
            // The root gave up: however cleanly the rest drained, the service failed.
            outcome = TreeOutcome::Failed;
        }
        if sd.forced {
            outcome = TreeOutcome::Forced;
        }
        Some(ShutdownReport {
            tree: self.shared.name.clone(),
            reason: sd.orders.reason().to_string(),
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
        let life = self.lives.get(&id);
        // Drained in its only life, by a drain that closed its gate: everything accepted was
        // handled, and the acknowledgement said how much (its mailbox, cold by now, is not
        // touched). A drain begun for a restart may have left messages behind (counted below).
        let clean = life.is_none()
            && (self.close_when_done.is_empty() || !self.close_when_done.contains(&id));
        let (drained, dropped) = match &node.worker {
            Some(_) if s.status == Status::Done(Outcome::Drained) && clean => (s.drained, 0),
            Some(w) if s.status == Status::Done(Outcome::Drained) => {
                let (accepted, handled) = w.counts();
                (s.drained, accepted.saturating_sub(handled))
            }
            Some(w) => {
                let (accepted, handled) = w.counts();
                // Never told in this shutdown (it was not running): it drained nothing in it.
                let drained = if s.told_at == Stamp::NONE {
                    0
                } else {
                    w.drained_since_told()
                };
                (drained, accepted.saturating_sub(handled))
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
            in_flight: node
                .worker
                .as_ref()
                .filter(|_| s.told_at != Stamp::NONE)
                .and_then(|w| w.in_flight_when_told()),
            restarts: life.map_or(0, |l| l.restarts),
            last_failure: life.and_then(|l| l.last_failure.clone()),
            children,
        }
    }

    /// The end: stop and join the arbiters the tree created, publish the report.
    pub(super) async fn finish(&mut self, report: ShutdownReport) -> Arc<ShutdownReport> {
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
        // Before publishing: a caller awaiting the report may end the process at once, and the
        // observers' last word (systemd's final status) must be out by then.
        for o in &self.cfg.observers {
            o.stopped(&report);
        }
        let report = Arc::new(report);
        self.shared.publish(report.clone());
        if self.cfg.stop_system {
            System::current().stop_with_code(report.exit_code());
        }
        report
    }
}
