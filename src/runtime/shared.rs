//! The state a tree shares between its runtime and every `TreeHandle`: the phase, the one-time
//! trigger, the command channel, and the report once it is out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::mpsc::UnboundedSender;

use crate::graph::Graph;
use crate::report::ShutdownReport;

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

    /// The phase in lower case (`"running"`), as health endpoints and logs show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Draining => "draining",
            Phase::Stopped => "stopped",
        }
    }

    /// Ready to serve: only while `Running` (false from the instant draining starts).
    pub fn is_ready(self) -> bool {
        self == Phase::Running
    }

    /// Alive: until the tree has stopped (starting and draining count as alive, so a probe does
    /// not kill a process that is busy shutting down cleanly).
    pub fn is_live(self) -> bool {
        self != Phase::Stopped
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A read-only view of a tree's phase, cheap to clone and to read from any thread, without
/// blocking. Unlike a [`TreeHandle`](crate::TreeHandle), it exists before the tree is built
/// ([`TreeBuilder::phase_watch`](crate::TreeBuilder::phase_watch)), so it can be handed to the
/// code that serves health checks — an actix-web app declared as one of the tree's own
/// children, for instance.
#[derive(Clone)]
pub struct PhaseWatch {
    phase: Arc<AtomicU8>,
}

impl PhaseWatch {
    pub(crate) fn new() -> Self {
        PhaseWatch {
            phase: Arc::new(AtomicU8::new(Phase::Starting as u8)),
        }
    }

    /// The phase now.
    pub fn get(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// See [`Phase::is_ready`].
    pub fn is_ready(&self) -> bool {
        self.get().is_ready()
    }

    /// See [`Phase::is_live`].
    pub fn is_live(&self) -> bool {
        self.get().is_live()
    }
}

impl std::fmt::Debug for PhaseWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PhaseWatch").field(&self.get()).finish()
    }
}

/// Tree-wide settings, from the builder.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) deadline: Duration,
    pub(crate) grace: Duration,
    pub(crate) progress_interval: Duration,
    pub(crate) worker_budget: Duration,
    /// Edge integrations following the tree's life (see `observer.rs`); usually empty.
    pub(crate) observers: Vec<Arc<dyn super::Observer>>,
    pub(crate) signals: bool,
    pub(crate) stop_system: bool,
    pub(crate) pools: HashMap<String, usize>,
    /// The phase cell, made with the builder so watches can be handed out before the start.
    pub(crate) phase: PhaseWatch,
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
    pub(super) phase: PhaseWatch,
    pub(super) triggered: AtomicBool,
    commands: UnboundedSender<Command>,
    report: Mutex<Option<Arc<ShutdownReport>>>,
    report_ready: Condvar,
    report_watch: tokio::sync::watch::Sender<Option<Arc<ShutdownReport>>>,
    /// The tree's shape, for looking up children by path.
    pub(crate) graph: Arc<Graph>,
}

impl Shared {
    pub(super) fn new(
        name: String,
        graph: Arc<Graph>,
        commands: UnboundedSender<Command>,
        phase: PhaseWatch,
    ) -> Self {
        Shared {
            name,
            phase,
            triggered: AtomicBool::new(false),
            commands,
            report: Mutex::new(None),
            report_ready: Condvar::new(),
            report_watch: tokio::sync::watch::channel(None).0,
            graph,
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase.get()
    }

    pub(crate) fn phase_watch(&self) -> PhaseWatch {
        self.phase.clone()
    }

    pub(super) fn set_phase(&self, phase: Phase) {
        self.phase.phase.store(phase as u8, Ordering::Release);
    }

    /// `Starting` → `Running`, unless a trigger has already moved the phase on. True when the
    /// phase did become `Running`.
    pub(super) fn set_running(&self) -> bool {
        self.phase
            .phase
            .compare_exchange(
                Phase::Starting as u8,
                Phase::Running as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Starts the shutdown unless one was started already. True for the call that started it.
    pub(crate) fn trigger(&self, reason: String) -> bool {
        if self.triggered.swap(true, Ordering::AcqRel) {
            return false;
        }
        // Readiness turns false at once, not when the runtime gets to the command.
        self.phase
            .phase
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

    pub(super) fn publish(&self, report: Arc<ShutdownReport>) {
        *self.report.lock() = Some(report.clone());
        self.report_ready.notify_all();
        self.report_watch.send_replace(Some(report));
    }
}
