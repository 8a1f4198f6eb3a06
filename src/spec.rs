//! Child specifications: what the user declares, before anything runs.
//!
//! A spec names a child and says how to make it (a factory, called for every start), how long it
//! may take to drain (its budget), what it depends on, and where it runs (its placement). Specs
//! nest: a [`SupervisorSpec`] holds an ordered list of children. The tree checks them all when it
//! is built (see [`crate::TreeBuilder::build`]).

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::addr::ChildAddr;
use crate::mailbox::Mailbox;
use crate::protocol::{EventTx, Gen, NodeId, Stopping};
use crate::report::ChildKind;
use crate::supervision::{Backoff, Intensity, Restart, Strategy, Supervision};
use crate::worker::{spawn_instance, Worker};
use crate::BoxError;

/// Where a child runs.
#[derive(Clone, Debug, Default)]
pub enum Placement {
    /// On its parent's arbiter (for a top-level child: the arbiter the tree was started on).
    #[default]
    Parent,
    /// On an arbiter the caller owns.
    Arbiter(ArbiterHandle),
    /// On a dedicated arbiter the tree creates under this name (one thread, shared by every child
    /// that names it), and stops and joins at the end.
    Named(String),
    /// Spread round-robin over a pool of arbiters the tree creates, declared with
    /// [`TreeBuilder::pool`](crate::TreeBuilder::pool).
    Pool(String),
}

/// The type-erased face of a worker, as the runtime drives it (implemented by its mailbox,
/// which also holds its factory). The slot outlives instances: the runtime calls
/// [`new_instance`](Self::new_instance) before every start.
pub(crate) trait WorkerControl: Send + Sync {
    /// What kind of child this is, for the report.
    fn kind(&self) -> ChildKind;
    /// Whether its instances run on an arbiter (actors) rather than a thread of their own.
    fn needs_arbiter(&self) -> bool;
    /// The child's shutdown budget, resolved when the tree starts (its own, or the tree's
    /// worker budget), for children whose own stop timeout is derived from it.
    fn set_budget(&self, _budget: Duration) {}
    /// Readies the slot for a new instance (gate open, earlier instances stale, drain state
    /// clear; whatever is queued stays for the new instance) and returns its generation.
    fn new_instance(&self) -> Gen;
    /// Makes instance `gen` with the factory and runs it: on the current thread's arbiter, or
    /// on a thread of its own. Errors are the factory's (or its panic's) message.
    fn start(self: Arc<Self>, id: NodeId, gen: Gen, events: EventTx) -> Result<(), String>;
    /// Queues `Stopping` behind everything accepted; when the drain ends the gate closes if
    /// `close` (a shutdown), else it stays open for the next instance (a restart). False when
    /// the mailbox is already closed.
    fn tell(&self, order: Arc<Stopping>, close: bool) -> bool;
    /// A drain already under way closes the gate when it ends (see [`tell`](Self::tell)).
    fn close_when_drained(&self);
    /// Ends the current instance at its next step, leaving the gate as it is.
    fn abort(&self);
    /// Closes the gate for good: the child is gone.
    fn close(&self);
    /// (accepted, handled) over the child's life.
    fn counts(&self) -> (u64, u64);
    /// Messages handled since `Stopping` was queued (0 if never told).
    fn drained_since_told(&self) -> u64;
    /// Units of work in progress when the current instance was told (requests, for a server);
    /// `None` for children that do not count them, or were not told.
    fn in_flight_when_told(&self) -> Option<u64> {
        None
    }
    /// The child's address (`ChildAddr<A>` or `BlockingAddr<W>`), boxed, for typed lookups.
    fn addr_any(self: Arc<Self>) -> Box<dyn Any + Send>;
}

impl<A: Worker> WorkerControl for Mailbox<A> {
    fn kind(&self) -> ChildKind {
        ChildKind::Worker
    }
    fn needs_arbiter(&self) -> bool {
        true
    }
    fn new_instance(&self) -> Gen {
        Mailbox::new_instance(self)
    }
    fn start(self: Arc<Self>, id: NodeId, gen: Gen, events: EventTx) -> Result<(), String> {
        spawn_instance(self, id, gen, events)
    }
    fn tell(&self, order: Arc<Stopping>, close: bool) -> bool {
        self.push_stop(order, close)
    }
    fn close_when_drained(&self) {
        Mailbox::close_when_drained(self);
    }
    fn abort(&self) {
        self.request_abort();
    }
    fn close(&self) {
        Mailbox::close(self);
    }
    fn counts(&self) -> (u64, u64) {
        (self.accepted(), self.inst.handled())
    }
    fn drained_since_told(&self) -> u64 {
        self.inst.drained_since_told()
    }
    fn addr_any(self: Arc<Self>) -> Box<dyn Any + Send> {
        Box::new(ChildAddr::new(self))
    }
}

/// Settings every child kind shares.
#[derive(Clone, Debug, Default)]
pub(crate) struct Common {
    pub(crate) name: String,
    pub(crate) budget: Option<Duration>,
    pub(crate) depends_on: Vec<String>,
    pub(crate) placement: Placement,
    pub(crate) restart: Restart,
}

/// A child of a supervisor: a worker or a supervisor. Made from a [`WorkerSpec`] or a
/// [`SupervisorSpec`] with `into()`.
pub struct ChildSpec {
    pub(crate) common: Common,
    pub(crate) kind: SpecKind,
}

pub(crate) enum SpecKind {
    Worker(Arc<dyn WorkerControl>),
    Supervisor(Vec<ChildSpec>, Supervision),
}

impl fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            SpecKind::Worker(w) => w.kind(),
            SpecKind::Supervisor(..) => ChildKind::Supervisor,
        };
        f.debug_struct("ChildSpec")
            .field("name", &self.common.name)
            .field("kind", &kind)
            .field("restart", &self.common.restart)
            .field("budget", &self.common.budget)
            .field("depends_on", &self.common.depends_on)
            .finish()
    }
}

impl ChildSpec {
    /// A worker made by `factory`, which is called on the worker's arbiter for every start.
    pub fn worker<A, F>(name: impl Into<String>, factory: F) -> WorkerSpec<A>
    where
        A: Worker,
        F: Fn() -> A + Send + Sync + 'static,
    {
        Self::try_worker(name, move || Ok(factory()))
    }

    /// A worker whose factory may fail; a failure stops the tree's start with an error naming
    /// the child and the cause.
    pub fn try_worker<A, F>(name: impl Into<String>, factory: F) -> WorkerSpec<A>
    where
        A: Worker,
        F: Fn() -> Result<A, BoxError> + Send + Sync + 'static,
    {
        WorkerSpec {
            common: Common {
                name: name.into(),
                ..Common::default()
            },
            mailbox: Arc::new(Mailbox::new(Box::new(factory))),
        }
    }

    /// A supervisor with no children yet; same as [`SupervisorSpec::new`].
    pub fn supervisor(name: impl Into<String>) -> SupervisorSpec {
        SupervisorSpec::new(name)
    }

    /// The child's name (unique among its siblings).
    pub fn name(&self) -> &str {
        &self.common.name
    }
}

/// The spec of one worker: an actix actor implementing [`Worker`].
pub struct WorkerSpec<A: Worker> {
    common: Common,
    mailbox: Arc<Mailbox<A>>,
}

/// Builder methods every spec kind has (and, with `placement`, those that run on arbiters).
macro_rules! common_setters {
    (placement) => {
        common_setters!();

        /// Where this child runs (default: its parent's arbiter).
        pub fn placement(mut self, placement: $crate::Placement) -> Self {
            self.common.placement = placement;
            self
        }
    };
    () => {
        /// How long this child may take from `Stopping` to its acknowledgement (default 5 s for
        /// a worker; for a supervisor, unbounded except by its parent). Zero is rejected at build.
        pub fn budget(mut self, budget: std::time::Duration) -> Self {
            self.common.budget = Some(budget);
            self
        }

        /// Declares that this child depends on another: the dependency starts first and stops
        /// last. `name` is a sibling's name, or a path from the root (`"store"`,
        /// `"broker/router"`) to depend on a child of another supervisor.
        pub fn depends_on(mut self, name: impl Into<String>) -> Self {
            self.common.depends_on.push(name.into());
            self
        }

        /// When this child is started again after it ends while the tree runs (default
        /// [`Restart::Permanent`](crate::Restart::Permanent): always).
        pub fn restart(mut self, restart: $crate::Restart) -> Self {
            self.common.restart = restart;
            self
        }
    };
}
pub(crate) use common_setters;

impl<A: Worker> WorkerSpec<A> {
    common_setters!(placement);

    /// Bounds the mailbox: `try_send` fails with `Full` and `send` waits while this many
    /// messages are waiting. `do_send` ignores the bound, as in actix. Default: unbounded.
    pub fn capacity(self, capacity: usize) -> Self {
        self.mailbox.set_capacity(capacity);
        self
    }

    /// The worker's stable address, usable before the tree starts (messages wait in the mailbox)
    /// and valid for the tree's whole life.
    pub fn addr(&self) -> ChildAddr<A> {
        ChildAddr::new(self.mailbox.clone())
    }
}

impl<A: Worker> From<WorkerSpec<A>> for ChildSpec {
    fn from(w: WorkerSpec<A>) -> Self {
        ChildSpec {
            common: w.common,
            kind: SpecKind::Worker(w.mailbox),
        }
    }
}

/// The spec of a supervisor: an ordered list of children, started in that order (dependencies
/// first) and stopped dependents-first.
#[derive(Debug)]
pub struct SupervisorSpec {
    common: Common,
    children: Vec<ChildSpec>,
    supervision: Supervision,
}

impl SupervisorSpec {
    /// A supervisor with no children yet.
    pub fn new(name: impl Into<String>) -> Self {
        SupervisorSpec {
            common: Common {
                name: name.into(),
                ..Common::default()
            },
            children: Vec::new(),
            supervision: Supervision::default(),
        }
    }

    common_setters!(placement);

    /// Which siblings are restarted with a child that ended (default
    /// [`Strategy::OneForOne`]).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.supervision.strategy = strategy;
        self
    }

    /// At most `max_restarts` restarts within `window`; one more and this supervisor gives up:
    /// it drains its children and ends as failed, for its parent to handle (default 3 in 5 s).
    pub fn intensity(mut self, max_restarts: u32, window: Duration) -> Self {
        self.supervision.intensity = Intensity {
            max_restarts,
            window,
        };
        self
    }

    /// Waits between stopping children and starting them again, exponentially longer for each
    /// restart inside the intensity window, with jitter, always within `[min, max]` (see
    /// [`Backoff`]). Default: no wait.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.supervision.backoff = Some(Backoff { min, max });
        self
    }

    /// Appends a child.
    pub fn child(mut self, child: impl Into<ChildSpec>) -> Self {
        self.children.push(child.into());
        self
    }

    /// Appends several children.
    pub fn children<I>(mut self, children: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<ChildSpec>,
    {
        self.children.extend(children.into_iter().map(Into::into));
        self
    }
}

impl From<SupervisorSpec> for ChildSpec {
    fn from(s: SupervisorSpec) -> Self {
        ChildSpec {
            common: s.common,
            kind: SpecKind::Supervisor(s.children, s.supervision),
        }
    }
}
