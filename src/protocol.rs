//! The shutdown protocol's vocabulary: what a child is told, what it answers, and how it ended.
//!
//! Everything above this module (workers, the runtime, the report) speaks in these types, so they
//! depend on nothing else in the crate.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The order a child receives when it is stopped — the tree drains, or its supervisor restarts
/// it or gives up: stop intake, finish what was accepted, acknowledge before `deadline`.
/// [`restarting`](Stopping::restarting) tells a restart from a final stop.
///
/// A worker sees it in [`Worker::on_stopping`](crate::Worker::on_stopping), after every
/// message that was queued before it.
#[derive(Clone, Debug)]
pub struct Stopping {
    /// Why the child is stopped: why the tree is shutting down (`"SIGTERM"`, or the reason
    /// given to [`TreeHandle::shutdown`](crate::TreeHandle::shutdown)), or, for a restart or a
    /// supervisor giving up, what ended (`"restart: app/store failed: …"`).
    pub reason: Arc<str>,
    /// The instant by which this child must have acknowledged; after it the child is aborted.
    /// It is the earlier of the child's own budget and its parent's deadline.
    pub deadline: Instant,
    pub(crate) restarting: bool,
}

impl Stopping {
    /// True when, at the time it was told, the child was to be started again: it is stopped
    /// for a restart — of a supervisor above it, or of a sibling under one-for-all or
    /// rest-for-one — and a fresh instance from its factory follows once everything the restart
    /// stops has acknowledged (and after the backoff, if one is set).
    ///
    /// False when the stop is final: the tree shuts down, a supervisor gives up (exceeded its
    /// intensity; whatever its own parent decides next is a new decision), or the child is
    /// `Temporary` (or under a `Temporary` supervisor) and stopped only because a sibling
    /// restarts — temporary children are not started again.
    ///
    /// It says what was planned when the order was made; an order once given does not change.
    /// If the restart becomes a give-up (the intensity is exceeded while it stops), or the
    /// tree's shutdown begins meanwhile, children told before keep `true`, and those told after
    /// get `false`.
    ///
    /// A worker may shorten its drain on a restart: nothing is going away for good, and whoever
    /// waits for it (its clients, its dependents) waits for the restart to end. Its mailbox
    /// stays open across a restart: what is accepted meanwhile waits for the next instance.
    pub fn restarting(&self) -> bool {
        self.restarting
    }

    /// Time left until the deadline (zero once it has passed).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// How one child's life in the tree ended, as the report records it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(tag = "kind", content = "detail"))]
pub enum Outcome {
    /// Drained everything it had accepted and acknowledged in time.
    Drained,
    /// Did not acknowledge by its deadline (or the drain was forced) and was aborted.
    TimedOut,
    /// Panicked; the payload is the panic message.
    Panicked(String),
    /// Stopped with an error (for example its start failed).
    Failed(String),
    /// Was not running when the shutdown reached it (never started, or already stopped).
    NotRunning,
}

impl Outcome {
    /// A one-word label, as used in the printed report.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Drained => "drained",
            Outcome::TimedOut => "TIMED OUT",
            Outcome::Panicked(_) => "PANICKED",
            Outcome::Failed(_) => "FAILED",
            Outcome::NotRunning => "not running",
        }
    }

    /// True for the outcomes that make a shutdown unclean.
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            Outcome::TimedOut | Outcome::Panicked(_) | Outcome::Failed(_)
        )
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Panicked(msg) => write!(f, "panicked: {msg}"),
            Outcome::Failed(msg) => write!(f, "failed: {msg}"),
            other => f.write_str(other.label()),
        }
    }
}

/// What a worker reports with its acknowledgement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainStats {
    /// Messages handled between being told `Stopping` and acknowledging (the backlog it had,
    /// plus what arrived while it drained).
    pub drained: u64,
}

/// Index of a child in the runtime's arena; stable for the tree's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct NodeId(pub(crate) u32);

impl NodeId {
    pub(crate) fn index(self) -> usize {
        self.0 as usize
    }
}

/// How a child instance's task ended, when it ended without acknowledging a `Stopping`.
#[derive(Debug)]
pub(crate) enum Exit {
    /// The actor stopped on its own (it called `ctx.stop()`); `draining` when it had already
    /// begun its drain (run `on_stopping`), so the drain was abandoned.
    Stopped { draining: bool },
    /// A handler or hook panicked.
    Panicked(String),
    /// The instance could not be made (its factory failed).
    Failed(String),
}

/// Which instance of a worker: every start makes a new generation, so the runtime can tell what
/// the current instance says from what an aborted one still says.
pub(crate) type Gen = u32;

/// What children tell the runtime. One unbounded channel per tree carries them all.
#[derive(Debug)]
pub(crate) enum Event {
    /// The instance ran `started` (and any `ctx.wait` it set up there) and is handling messages.
    Started(NodeId, Gen),
    /// The instance finished draining and acknowledged.
    Acked(NodeId, Gen, DrainStats),
    /// The instance ended without an acknowledgement.
    Exited(NodeId, Gen, Exit),
}

pub(crate) type EventTx = tokio::sync::mpsc::UnboundedSender<Event>;

/// Turns a panic payload into the message a person would want to read.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}
