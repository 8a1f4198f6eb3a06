//! The public face of a tree: [`TreeBuilder`] to declare and check it, [`Tree`] to start it,
//! [`TreeHandle`] to watch it, shut it down and await its report.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::addr::ChildAddr;
use crate::blocking::{BlockingAddr, BlockingWorker};
use crate::error::{BuildError, StartError};
use crate::graph::Graph;
use crate::report::ShutdownReport;
use crate::runtime::{Config, Runtime, Shared};
use crate::spec::ChildSpec;
use crate::supervision::{Backoff, Intensity, Strategy, Supervision};
use crate::worker::Worker;

pub use crate::runtime::{Phase, PhaseWatch};

/// Declares a tree: its top-level children and its tree-wide settings.
///
/// ```
/// use std::time::Duration;
/// use actix_supervisor::{ChildSpec, SupervisorSpec, Tree};
/// # use actix::prelude::*;
/// # struct Store; impl Actor for Store { type Context = Context<Self>; }
/// # impl actix_supervisor::Worker for Store {}
/// # struct Api; impl Actor for Api { type Context = Context<Self>; }
/// # impl actix_supervisor::Worker for Api {}
///
/// let tree = Tree::builder("service")
///     .child(ChildSpec::worker("store", || Store).budget(Duration::from_secs(10)))
///     .child(SupervisorSpec::new("api").child(ChildSpec::worker("http", || Api)).depends_on("store"))
///     .deadline(Duration::from_secs(25))
///     .build()
///     .expect("a valid tree");
/// ```
pub struct TreeBuilder {
    name: String,
    children: Vec<ChildSpec>,
    root: Supervision,
    cfg: Config,
}

impl TreeBuilder {
    /// Appends a top-level child.
    pub fn child(mut self, child: impl Into<ChildSpec>) -> Self {
        self.children.push(child.into());
        self
    }

    /// Appends several top-level children.
    pub fn children<I>(mut self, children: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<ChildSpec>,
    {
        self.children.extend(children.into_iter().map(Into::into));
        self
    }

    /// The overall shutdown deadline: whatever is still pending then is aborted.
    /// Default 30 s, Kubernetes' default grace period.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.cfg.deadline = deadline;
        self
    }

    /// Time between readiness turning false and the first `Stopping`, so load balancers stop
    /// sending traffic first. Default 0.
    pub fn readiness_grace(mut self, grace: Duration) -> Self {
        self.cfg.grace = grace;
        self
    }

    /// How often, while draining, a line names the children still pending. Default 1 s.
    pub fn progress_interval(mut self, interval: Duration) -> Self {
        self.cfg.progress_interval = interval;
        self
    }

    /// Shutdown budget of workers that set none. Default 5 s.
    pub fn worker_budget(mut self, budget: Duration) -> Self {
        self.cfg.worker_budget = budget;
        self
    }

    /// Whether the tree listens for SIGTERM and SIGINT (first: graceful shutdown; second: abort
    /// what is pending now; third: exit at once). Unix only; ignored elsewhere.
    ///
    /// Set it when the tree owns the process (its `main` is the tree): see [`Tree`]. The handlers
    /// are installed by the time [`Tree::start`] resolves and stay for the rest of the process
    /// (a signal handler cannot be taken back), so set it only when the tree's end is the
    /// process's end.
    ///
    /// Default false, for a tree embedded in an app that has its own signal handling (actix-web's
    /// server, or none): the tree installs no handler at all, SIGTERM keeps whatever disposition
    /// the app gave it, and the app shuts the tree down from its own code with
    /// [`TreeHandle::shutdown`].
    pub fn handle_signals(mut self, yes: bool) -> Self {
        self.cfg.signals = yes;
        self
    }

    /// Whether the tree stops the actix `System` when its shutdown is over, with the report's
    /// exit code ([`System::stop_with_code`](actix_rt::System::stop_with_code)), for a tree that
    /// owns the process and a `main` that runs the System with
    /// [`SystemRunner::run_with_code`](actix_rt::SystemRunner::run_with_code). (`#[actix::main]`
    /// runs `main`'s body to its end instead: there, end with
    /// `std::process::exit(report.exit_code())`.)
    ///
    /// Default false, for a tree embedded in an app: the tree never stops the System it runs
    /// in; after its report the System, its arbiters and the app's actors go on, and another
    /// tree can be started in it.
    pub fn stop_system(mut self, yes: bool) -> Self {
        self.cfg.stop_system = yes;
        self
    }

    /// Whether the tree reports its life to systemd (`sd_notify(3)`), for a unit with
    /// `Type=notify`. Default false. Feature `systemd`.
    ///
    /// - `READY=1` (and `STATUS=running`) once every child has started, so systemd starts the
    ///   units that wait for this one only when it serves;
    /// - `STOPPING=1` and `STATUS=draining: <reason>` the instant the shutdown begins;
    /// - `STATUS=<progress line>` every [progress interval](Self::progress_interval) while
    ///   draining (`waiting on 1: store (2.1s/5s)`), shown by `systemctl status`;
    /// - `STATUS=stopped: <report summary>` when the report is out.
    ///
    /// A no-op outside systemd (when `NOTIFY_SOCKET` is unset), so it can stay on everywhere. A
    /// failed send is logged (target `actix_supervisor::systemd`), never an error. Give the unit
    /// a `TimeoutStopSec` some seconds above the [deadline](Self::deadline), which runs from the
    /// trigger with the readiness grace included: systemd sends SIGKILL when it runs out (see
    /// `deploy/actix-supervisor-example.service`).
    #[cfg(feature = "systemd")]
    pub fn notify_systemd(mut self, yes: bool) -> Self {
        crate::systemd::install(&mut self.cfg.observers, yes);
        self
    }

    /// How the root restarts its children: which siblings go with a child that ended (default
    /// [`Strategy::OneForOne`]). See [`SupervisorSpec::strategy`](crate::SupervisorSpec::strategy).
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.root.strategy = strategy;
        self
    }

    /// The root's restart intensity: at most `max_restarts` within `window` (default 3 in 5 s).
    /// One more and the root gives up: the tree shuts down with that reason, and the report
    /// (and the exit code) say it failed.
    pub fn intensity(mut self, max_restarts: u32, window: Duration) -> Self {
        self.root.intensity = Intensity {
            max_restarts,
            window,
        };
        self
    }

    /// The root's restart backoff (see [`SupervisorSpec::backoff`](crate::SupervisorSpec::backoff)).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.root.backoff = Some(Backoff { min, max });
        self
    }

    /// Declares a pool of `arbiters` arbiters (threads) the tree creates, for children placed
    /// with [`Placement::Pool`](crate::Placement::Pool).
    pub fn pool(mut self, name: impl Into<String>, arbiters: usize) -> Self {
        self.cfg.pools.insert(name.into(), arbiters);
        self
    }

    /// A view of the phase of the tree this builder makes, usable before the tree exists: hand
    /// it to the code that answers health checks (for example
    /// `web::health` (feature `web`), mounted in an app that is itself one of the tree's
    /// children). It reads `Starting` until the tree starts.
    pub fn phase_watch(&self) -> PhaseWatch {
        self.cfg.phase.clone()
    }

    /// Checks the specification: names (non-empty, no `/`, unique among siblings), dependencies
    /// (known, acyclic), durations (non-zero), pools (declared, non-empty).
    pub fn build(self) -> Result<Tree, BuildError> {
        for (what, d) in [
            ("tree deadline", self.cfg.deadline),
            ("progress interval", self.cfg.progress_interval),
            ("worker budget", self.cfg.worker_budget),
        ] {
            if d.is_zero() {
                return Err(BuildError::ZeroDuration {
                    what: what.to_owned(),
                });
            }
        }
        if let Some((name, _)) = self.cfg.pools.iter().find(|(_, n)| **n == 0) {
            return Err(BuildError::EmptyPool(name.clone()));
        }
        let graph = Graph::build(&self.name, self.children, self.root, &self.cfg.pools)?;
        Ok(Tree {
            name: self.name,
            graph,
            cfg: self.cfg,
        })
    }
}

/// A checked tree, ready to start. See [`Tree::builder`].
///
/// A tree runs in one of two ways:
///
/// - **It owns the process** — a service whose `main` is the tree:
///   [`.handle_signals(true)`](TreeBuilder::handle_signals) (SIGTERM or SIGINT drains it, a
///   second signal forces, a third exits), and at the end either
///   [`.stop_system(true)`](TreeBuilder::stop_system) or, after
///   [`TreeHandle::wait`], `std::process::exit(report.exit_code())`.
/// - **It is embedded in an existing app** (`#[actix_web::main]`, or any running actix System):
///   keep the defaults. The tree installs no signal handler, never stops the System and stops
///   only the arbiters it created itself. The app starts it with [`Tree::start`] and, on its own
///   shutdown path (for example once actix-web's `HttpServer` has returned), awaits
///   [`TreeHandle::shutdown`], which resolves to the [`ShutdownReport`]. See [`Tree::start`] for
///   an example.
pub struct Tree {
    name: String,
    graph: Graph,
    cfg: Config,
}

impl fmt::Debug for Tree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tree")
            .field("name", &self.name)
            .field("children", &(self.graph.nodes.len() - 1))
            .finish()
    }
}

impl Tree {
    /// Starts declaring a tree called `name` (the name appears in logs and the report).
    pub fn builder(name: impl Into<String>) -> TreeBuilder {
        TreeBuilder {
            name: name.into(),
            children: Vec::new(),
            root: Supervision::default(),
            cfg: Config {
                deadline: Duration::from_secs(30),
                grace: Duration::ZERO,
                progress_interval: Duration::from_secs(1),
                worker_budget: Duration::from_secs(5),
                observers: Vec::new(),
                signals: false,
                stop_system: false,
                pools: HashMap::new(),
                phase: PhaseWatch::new(),
            },
        }
    }

    /// Starts every child in order and resolves once all have started (and, with
    /// [`handle_signals`](TreeBuilder::handle_signals), once the signal handlers are installed).
    /// Must be called inside a running actix `System`; the tree's runtime runs on the current
    /// arbiter. With the defaults it touches nothing else of the process: no signal handler, no
    /// System stop (see [`Tree`] for the two ways to run a tree).
    ///
    /// If a child fails to start, what had started is shut down (reverse start order) and the
    /// error names the child and the cause.
    ///
    /// Embedded in an app that owns the System and the signals:
    ///
    /// ```
    /// use actix::prelude::*;
    /// use actix_supervisor::{ChildSpec, Tree, TreeOutcome, Worker};
    ///
    /// struct Mailer;
    /// impl Actor for Mailer { type Context = Context<Self>; }
    /// impl Worker for Mailer {}
    ///
    /// #[derive(Message)]
    /// #[rtype(result = "()")]
    /// struct Deliver(&'static str);
    /// impl Handler<Deliver> for Mailer {
    ///     type Result = ();
    ///     fn handle(&mut self, _: Deliver, _: &mut Context<Self>) { /* send the mail */ }
    /// }
    ///
    /// #[actix::main] // or #[actix_web::main]
    /// async fn main() {
    ///     let mailer = ChildSpec::worker("mailer", || Mailer);
    ///     let addr = mailer.addr();
    ///     // The defaults: no signal handlers, the System left alone.
    ///     let tree = Tree::builder("background").child(mailer).build().expect("a valid tree");
    ///     let handle = tree.start().await.expect("started");
    ///
    ///     addr.do_send(Deliver("welcome")).unwrap();
    ///     // ... the app serves; with actix-web, `HttpServer::new(..).run().await` returns once
    ///     // the server has handled SIGTERM itself ...
    ///
    ///     // The app's own shutdown path: drain the tree and look at what happened.
    ///     let report = handle.shutdown("app shutting down").await;
    ///     assert_eq!(report.outcome, TreeOutcome::Clean);
    ///     eprintln!("{report}");
    ///     // The System still runs: actors, arbiters and timers of the app go on.
    /// }
    /// ```
    pub fn start(self) -> impl Future<Output = Result<TreeHandle, StartError>> {
        let setup = if actix_rt::Arbiter::try_current().is_none() {
            Err(StartError {
                child: String::new(),
                cause: "Tree::start must be called inside a running actix System, on one of its \
                        arbiters (for example in #[actix::main] or #[actix_web::main])"
                    .into(),
                report: Arc::new(ShutdownReport::empty(&self.name, "not started")),
            })
        } else {
            let signals = self.cfg.signals;
            let (runtime, shared) = Runtime::new(self.graph, self.cfg, self.name);
            let (tx, rx) = tokio::sync::oneshot::channel();
            let mut listening = None;
            if signals {
                // Before the start, so a signal during a slow start is not fatal: it is handled
                // once the start is over.
                listening = Some(crate::signals::listen(TreeHandle {
                    shared: shared.clone(),
                }));
            }
            actix_rt::spawn(runtime.run_guarded(tx));
            Ok((rx, shared, listening))
        };
        async move {
            let (rx, shared, listening) = setup?;
            if let Some(listening) = listening {
                // The listener installs its handlers on an arbiter of its own: resolve only
                // once it has, so a SIGTERM right after the start is the tree's, not fatal.
                let _ = listening.await;
            }
            let started = rx.await.map_err(|_| StartError {
                child: String::new(),
                cause: "the tree's runtime stopped before finishing the start".into(),
                report: shared.report().unwrap_or_else(|| {
                    Arc::new(ShutdownReport::empty(&shared.name, "runtime gone"))
                }),
            })?;
            match started {
                Ok(()) => Ok(TreeHandle { shared }),
                Err((child, cause, report)) => Err(StartError {
                    child,
                    cause,
                    report,
                }),
            }
        }
    }

    /// Starts the tree, waits for its shutdown (from a signal when
    /// [`handle_signals`](TreeBuilder::handle_signals) is set, or from a handle), and returns the
    /// report.
    pub async fn run(self) -> Result<Arc<ShutdownReport>, StartError> {
        let handle = self.start().await?;
        Ok(handle.wait().await)
    }
}

/// A cheap, cloneable, thread-safe handle on a running tree.
#[derive(Clone)]
pub struct TreeHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for TreeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TreeHandle")
            .field("name", &self.shared.name)
            .field("phase", &self.phase())
            .finish()
    }
}

impl TreeHandle {
    /// Starts the graceful shutdown (if none started yet) and resolves to its report. Any number
    /// of calls, from any thread or actor, start one shutdown and all get the same report.
    pub fn shutdown(
        &self,
        reason: impl Into<String>,
    ) -> impl Future<Output = Arc<ShutdownReport>> + 'static {
        self.shared.trigger(reason.into());
        let shared = self.shared.clone();
        async move { shared.wait_report().await }
    }

    /// Like [`shutdown`](Self::shutdown) but skips the remaining budgets: whatever is pending
    /// now is aborted (what a second SIGTERM does).
    pub fn force_shutdown(
        &self,
        reason: impl Into<String>,
    ) -> impl Future<Output = Arc<ShutdownReport>> + 'static {
        self.shared.force(reason.into());
        let shared = self.shared.clone();
        async move { shared.wait_report().await }
    }

    /// Resolves to the report once the tree has shut down, without triggering anything.
    pub fn wait(&self) -> impl Future<Output = Arc<ShutdownReport>> + 'static {
        let shared = self.shared.clone();
        async move { shared.wait_report().await }
    }

    /// Blocks the calling thread until the report is out, or `timeout` passes. Never call it on
    /// an arbiter's thread: the tree's own work would wait behind it.
    pub fn wait_blocking(&self, timeout: Option<Duration>) -> Option<Arc<ShutdownReport>> {
        self.shared.wait_report_blocking(timeout)
    }

    /// The report, if the shutdown is over.
    pub fn report(&self) -> Option<Arc<ShutdownReport>> {
        self.shared.report()
    }

    /// The tree's phase, read without blocking.
    pub fn phase(&self) -> Phase {
        self.shared.phase()
    }

    /// True while the tree serves (phase `Running`); false from the instant draining starts.
    pub fn is_ready(&self) -> bool {
        self.phase().is_ready()
    }

    /// A read-only view of the phase, to hand to code that must not hold the whole handle.
    pub fn phase_watch(&self) -> PhaseWatch {
        self.shared.phase_watch()
    }

    /// The stable address of the worker at `path` (like `workers/3`), if there is a worker of
    /// type `A` there.
    pub fn addr<A: Worker>(&self, path: &str) -> Option<ChildAddr<A>> {
        let graph = &self.shared.graph;
        let any = graph.node(graph.find(path)?).worker.clone()?.addr_any();
        any.downcast::<ChildAddr<A>>().ok().map(|b| *b)
    }

    /// The stable address of the [blocking worker](BlockingWorker) at `path`, if there is a
    /// blocking worker of type `W` there.
    pub fn blocking_addr<W: BlockingWorker>(&self, path: &str) -> Option<BlockingAddr<W>> {
        let graph = &self.shared.graph;
        let any = graph.node(graph.find(path)?).worker.clone()?.addr_any();
        any.downcast::<BlockingAddr<W>>().ok().map(|b| *b)
    }

    /// The tree's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }
}
