//! A message pipeline run as a supervision tree, shut down gracefully on SIGTERM.
//!
//! ```text
//! pipeline
//! ├── source          producers source/0..N-1 send numbered messages at --rate each
//! ├── router          hands every message round-robin to a worker
//! ├── workers         workers/0..M-1 pass each message on to the sink
//! └── sink            counts what arrives
//! ```
//!
//! `source` depends on `router`, `router` on `workers`, `workers` on `sink`, so the tree starts
//! `sink, workers, router, source` and stops in the opposite order: on SIGTERM (or Ctrl-C) the
//! producers cancel their timers (stop intake), the router forwards what it had accepted and
//! acknowledges, then the workers drain, then the sink. Nothing accepted is lost silently, and
//! the final line says so:
//!
//! ```text
//! produced=P consumed=C lost=L panics=N
//! ```
//!
//! `P` counts the messages the router accepted, `C` those the sink counted, `L` those accepted
//! somewhere but never handled: the message a child was handling when it panicked (one per
//! panic), messages dropped by an aborted child, and messages refused on a hop after being
//! accepted upstream. `N` counts the panics `--panic-every` injected. `P = C + L` always; after a
//! clean shutdown without injected panics `L = 0`, and with `--panic-every` (and nothing aborted)
//! `L = N`: a restarted child keeps its mailbox, so only the message in hand is lost.
//!
//! Run it, then stop it from another terminal with `kill -TERM <pid>` (or press Ctrl-C; a second
//! signal forces the shutdown, a third exits at once):
//!
//! ```text
//! cargo run --example pipeline
//! cargo run --example pipeline -- --producers 4 --workers 8 --rate 20000
//! cargo run --example pipeline -- --hang workers/1 --deadline-ms 1500    # exits 4: timed out
//! cargo run --example pipeline -- --panic-on-drain workers/2             # exits 3: panicked
//! cargo run --example pipeline -- --wedge router   # stuck: SIGTERM thrice, exits 5 at the third
//! cargo run --example pipeline -- --report-json /tmp/report.json
//! ```
//!
//! # Restarts
//!
//! `--panic-every K NAME` makes one child (`workers/N`, `router` or `sink`: the children that
//! handle messages) panic on every K-th message it handles. The count is kept outside the actor,
//! so it runs on across restarts: each panic is message K, 2K, 3K, … of that child's whole life.
//! Every child is `Permanent`, so its supervisor restarts it with a fresh instance, which takes
//! over the same mailbox: the messages queued behind the one that panicked, and those sent while
//! it restarts, are handled by the new instance. For each panic the runtime logs
//! `workers/1 panicked: …` (ERROR) and `restarted workers/1 (restart N)` (INFO), and the report
//! shows `restarts=N` and, as `dropped`, the one message lost to each panic.
//!
//! Whether that can go on is the supervisors' restart intensity: at most `--max-restarts N`
//! restarts within `--restart-window-ms T` (default 3 in 5000 ms, OTP's), applied to every
//! supervisor of the pipeline (`source`, `workers`, and the root). A worker handles about
//! `producers × rate / workers` messages per second (500 with the defaults), so it panics
//! `500 / K` times a second. Above the intensity, `workers` gives up: it drains its children and
//! ends as failed; the root restarts it with all its workers (one restart of the root's
//! allowance), and since `workers` keeps its recent restarts, one more panic within the window
//! makes it give up again, until the root's own intensity is exceeded: then the tree shuts down
//! by itself, the report's reason names the root's restart intensity, and the process exits 3.
//! Messages still queued for `workers/1` when it panicked for the last time are never handled
//! then: they are counted in `lost` too, so there `L ≥ N` (and still `P = C + L`).
//!
//! ```text
//! # 2 panics a second, 100 allowed per 5 s: restarts steadily until SIGTERM, exits 0
//! cargo run --example pipeline -- --panic-every 250 workers/1 --max-restarts 100
//! # 10 panics a second, 3 allowed per 5 s: workers gives up, then the root; exits 3 by itself
//! cargo run --example pipeline -- --panic-every 50 workers/1
//! ```
//!
//! The K-th-message rule applies while the tree runs (from `ready` until the shutdown begins).
//! Once the tree drains, the child passes every message on, so a SIGTERM after panics still
//! drains cleanly and exits 0. (A panic during the drain would not be restarted: nothing is
//! while the tree drains; the report would record the child as panicked and the exit code be 3,
//! which is what `--panic-on-drain` shows.)
//!
//! It prints `ready` on stdout once every child has started, the shutdown report on stderr, and
//! exits with the report's code (0 clean, 2 bad command line, 3 failed or panicked, 4 timed out,
//! 5 forced). Logging goes through `env_logger` (INFO unless `RUST_LOG` says otherwise).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_supervisor::{
    ChildAddr, ChildSpec, HookFuture, Placement, ShutdownReport, Stopping, SupervisorSpec, Tree,
    TreeHandle, Worker,
};
use clap::{CommandFactory, Parser};

/// How often a producer wakes up to send what its rate says is due.
const TICK: Duration = Duration::from_millis(10);

/// Marks the panics `--panic-every` injects (the panic hook leaves them to the runtime's log).
const INJECTED_PANIC: &str = "injected panic (--panic-every)";

#[derive(Parser, Debug)]
#[command(
    name = "pipeline",
    about = "A pipeline of actix actors under a supervision tree; stop it with SIGTERM"
)]
struct Args {
    /// Number of producers (source/0..N-1).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    producers: u32,
    /// Number of workers (workers/0..M-1).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    workers: u32,
    /// Messages per second, per producer.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    rate: u64,
    /// The tree's overall shutdown deadline, in milliseconds.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    deadline_ms: u64,
    /// Each worker's shutdown budget, in milliseconds.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    budget_ms: u64,
    /// Path of a child that never finishes draining (like `workers/1`).
    #[arg(long, value_name = "NAME")]
    hang: Option<String>,
    /// Path of a child that panics when told to stop (like `workers/2`).
    #[arg(long, value_name = "NAME")]
    panic_on_drain: Option<String>,
    /// Path of a child that blocks its thread forever when told to stop: a handler that never
    /// returns. On the main thread (`router`, `sink`, `source/N`) it stalls the tree itself, and
    /// only a third signal gets the process out.
    #[arg(long, value_name = "NAME")]
    wedge: Option<String>,
    /// Makes the child at NAME (`workers/N`, `router` or `sink`) panic on every K-th message
    /// it handles while the tree runs (K ≥ 1), counted across its restarts.
    #[arg(long, num_args = 2, value_names = ["K", "NAME"])]
    panic_every: Option<Vec<String>>,
    /// Restarts every supervisor (`source`, `workers`, the root) allows within the window;
    /// one more and it gives up.
    #[arg(long, value_name = "N", default_value_t = 3)]
    max_restarts: u32,
    /// The window of `--max-restarts`, in milliseconds.
    #[arg(
        long,
        value_name = "T",
        default_value_t = 5_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    restart_window_ms: u64,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "PATH")]
    report_json: Option<std::path::PathBuf>,
}

/// The pipeline's bookkeeping, shared by every actor.
#[derive(Default)]
struct Counters {
    /// Messages the router accepted from the producers.
    produced: AtomicU64,
    /// Messages the sink counted.
    consumed: AtomicU64,
    /// Messages handled by one hop but refused by the next (its mailbox had closed).
    refused_downstream: AtomicU64,
    /// Messages the `--panic-every` child handled (or panicked on), over all its instances.
    panic_child_handled: AtomicU64,
    /// Panics injected by `--panic-every`.
    panics: AtomicU64,
    /// The running tree, once started: `--panic-every` panics only while it runs. (The handle
    /// and the actors' factories keep each other alive; the process exits with them.)
    tree: OnceLock<TreeHandle>,
}

impl Counters {
    /// Whether the tree has started and is not draining.
    fn tree_running(&self) -> bool {
        self.tree.get().is_some_and(TreeHandle::is_ready)
    }
}

/// `--panic-every K NAME`, checked.
#[derive(Clone, Debug)]
struct PanicEvery {
    every: u64,
    path: String,
}

/// A numbered message from one producer.
#[derive(Message)]
#[rtype(result = "()")]
struct Item {
    producer: u32,
    seq: u64,
}

/// The faults `--hang`, `--panic-on-drain`, `--wedge` and `--panic-every` inject into one child.
#[derive(Clone, Default)]
struct Fault {
    path: String,
    hang: bool,
    panic: bool,
    wedge: bool,
    /// `--panic-every K` for this child.
    panic_every: Option<u64>,
}

impl Fault {
    fn for_child(args: &Args, panic_every: Option<&PanicEvery>, path: &str) -> Fault {
        Fault {
            path: path.to_owned(),
            hang: args.hang.as_deref() == Some(path),
            panic: args.panic_on_drain.as_deref() == Some(path),
            wedge: args.wedge.as_deref() == Some(path),
            panic_every: panic_every.filter(|p| p.path == path).map(|p| p.every),
        }
    }

    /// Called first thing in every handler: the `--panic-every` child panics on every K-th
    /// message while the tree runs, before doing anything with it, so that exactly that one
    /// message is lost (the tree counts it as dropped).
    fn on_message(&self, counters: &Counters) {
        let Some(every) = self.panic_every else {
            return;
        };
        let n = counters.panic_child_handled.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(every) && counters.tree_running() {
            let panics = counters.panics.fetch_add(1, Ordering::Relaxed) + 1;
            panic!(
                "{}: {INJECTED_PANIC} #{panics}, on its message {n}",
                self.path
            );
        }
    }

    /// Called from `on_stopping`.
    fn on_stopping(&self) {
        if self.panic {
            panic!("{}: injected panic on drain (--panic-on-drain)", self.path);
        }
        if self.wedge {
            log::warn!("{}: blocking this thread forever (--wedge)", self.path);
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }

    /// Called from `on_drained`: a hung child's flush never completes.
    fn on_drained<A: Worker>(&self) -> Option<HookFuture<A>> {
        if !self.hang {
            return None;
        }
        log::warn!("{}: hanging in on_drained (--hang)", self.path);
        Some(Box::pin(actix::fut::wrap_future::<_, A>(
            std::future::pending::<()>(),
        )))
    }
}

// ----- source/N: a producer -----------------------------------------------------------------

struct Producer {
    id: u32,
    rate: u64,
    router: ChildAddr<Router>,
    counters: Arc<Counters>,
    fault: Fault,
    since: Instant,
    next_seq: u64,
    timer: Option<SpawnHandle>,
}

impl Producer {
    /// Sends every message due by now at the configured rate.
    fn tick(&mut self) {
        let due = (self.since.elapsed().as_secs_f64() * self.rate as f64) as u64;
        while self.next_seq < due {
            let item = Item {
                producer: self.id,
                seq: self.next_seq,
            };
            // Counted only once the router has accepted it.
            if self.router.do_send(item).is_err() {
                log::warn!("{}: the router refused a message", self.fault.path);
                return;
            }
            self.counters.produced.fetch_add(1, Ordering::Relaxed);
            self.next_seq += 1;
        }
    }
}

impl Actor for Producer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.since = Instant::now();
        self.timer = Some(ctx.run_interval(TICK, |this, _| this.tick()));
    }
}

impl Worker for Producer {
    fn on_stopping(&mut self, ctx: &mut Context<Self>, _: &Stopping) {
        // Stop intake: no more ticks, hence no more messages.
        if let Some(timer) = self.timer.take() {
            ctx.cancel_future(timer);
        }
        log::debug!(
            "{}: stopped after {} messages",
            self.fault.path,
            self.next_seq
        );
        self.fault.on_stopping();
    }

    fn on_drained(&mut self, _: &mut Context<Self>) -> Option<HookFuture<Self>> {
        self.fault.on_drained()
    }
}

// ----- router --------------------------------------------------------------------------------

struct Router {
    workers: Vec<ChildAddr<Processor>>,
    next: usize,
    counters: Arc<Counters>,
    fault: Fault,
}

impl Actor for Router {
    type Context = Context<Self>;
}

impl Handler<Item> for Router {
    type Result = ();

    fn handle(&mut self, item: Item, _: &mut Context<Self>) {
        self.fault.on_message(&self.counters);
        let worker = &self.workers[self.next % self.workers.len()];
        self.next = self.next.wrapping_add(1);
        if worker.do_send(item).is_err() {
            self.counters
                .refused_downstream
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Worker for Router {
    fn on_stopping(&mut self, _: &mut Context<Self>, _: &Stopping) {
        self.fault.on_stopping();
    }

    fn on_drained(&mut self, _: &mut Context<Self>) -> Option<HookFuture<Self>> {
        self.fault.on_drained()
    }
}

// ----- workers/N: a processor -----------------------------------------------------------------

struct Processor {
    sink: ChildAddr<Sink>,
    counters: Arc<Counters>,
    fault: Fault,
    handled: u64,
}

impl Actor for Processor {
    type Context = Context<Self>;
}

impl Handler<Item> for Processor {
    type Result = ();

    fn handle(&mut self, item: Item, _: &mut Context<Self>) {
        self.fault.on_message(&self.counters);
        self.handled += 1;
        if self.sink.do_send(item).is_err() {
            self.counters
                .refused_downstream
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Worker for Processor {
    fn on_stopping(&mut self, _: &mut Context<Self>, _: &Stopping) {
        self.fault.on_stopping();
    }

    fn on_drained(&mut self, _: &mut Context<Self>) -> Option<HookFuture<Self>> {
        log::debug!("{}: handled {} messages", self.fault.path, self.handled);
        self.fault.on_drained()
    }
}

// ----- sink ----------------------------------------------------------------------------------

struct Sink {
    counters: Arc<Counters>,
    fault: Fault,
    /// The highest sequence number seen from each producer.
    last_seq: Vec<u64>,
}

impl Actor for Sink {
    type Context = Context<Self>;
}

impl Handler<Item> for Sink {
    type Result = ();

    fn handle(&mut self, item: Item, _: &mut Context<Self>) {
        self.fault.on_message(&self.counters);
        let last = &mut self.last_seq[item.producer as usize];
        *last = (*last).max(item.seq);
        self.counters.consumed.fetch_add(1, Ordering::Relaxed);
    }
}

impl Worker for Sink {
    fn on_stopping(&mut self, _: &mut Context<Self>, _: &Stopping) {
        self.fault.on_stopping();
    }

    fn on_drained(&mut self, _: &mut Context<Self>) -> Option<HookFuture<Self>> {
        log::info!(
            "sink: counted {} messages (last sequence numbers: {:?})",
            self.counters.consumed.load(Ordering::Relaxed),
            self.last_seq
        );
        self.fault.on_drained()
    }
}

// ----- the tree ------------------------------------------------------------------------------

/// Declares the tree. Built from the sink up, so each stage can be handed the stable address of
/// the next one before anything runs.
fn build_tree(args: &Args, panic_every: Option<&PanicEvery>, counters: &Arc<Counters>) -> Tree {
    let c = counters.clone();
    let fault = Fault::for_child(args, panic_every, "sink");
    let producers = args.producers as usize;
    let sink = ChildSpec::worker("sink", move || Sink {
        counters: c.clone(),
        fault: fault.clone(),
        last_seq: vec![0; producers],
    });
    let sink_addr = sink.addr();

    let processors: Vec<_> = (0..args.workers)
        .map(|i| {
            let (c, sink) = (counters.clone(), sink_addr.clone());
            let fault = Fault::for_child(args, panic_every, &format!("workers/{i}"));
            ChildSpec::worker(i.to_string(), move || Processor {
                sink: sink.clone(),
                counters: c.clone(),
                fault: fault.clone(),
                handled: 0,
            })
            .placement(Placement::Pool("workers".into()))
        })
        .collect();
    let processor_addrs: Vec<_> = processors.iter().map(|p| p.addr()).collect();

    let c = counters.clone();
    let fault = Fault::for_child(args, panic_every, "router");
    let router = ChildSpec::worker("router", move || Router {
        workers: processor_addrs.clone(),
        next: 0,
        counters: c.clone(),
        fault: fault.clone(),
    });
    let router_addr = router.addr();

    let rate = args.rate;
    let producers: Vec<_> = (0..args.producers)
        .map(|i| {
            let (c, router) = (counters.clone(), router_addr.clone());
            let fault = Fault::for_child(args, panic_every, &format!("source/{i}"));
            ChildSpec::worker(i.to_string(), move || Producer {
                id: i,
                rate,
                router: router.clone(),
                counters: c.clone(),
                fault: fault.clone(),
                since: Instant::now(),
                next_seq: 0,
                timer: None,
            })
        })
        .collect();

    // The same restart intensity for every supervisor, the root included.
    let (max_restarts, window) = (
        args.max_restarts,
        Duration::from_millis(args.restart_window_ms),
    );
    Tree::builder("pipeline")
        .child(
            SupervisorSpec::new("source")
                .children(producers)
                .intensity(max_restarts, window)
                .depends_on("router"),
        )
        .child(router.depends_on("workers"))
        .child(
            SupervisorSpec::new("workers")
                .children(processors)
                .intensity(max_restarts, window)
                .depends_on("sink"),
        )
        .child(sink)
        .intensity(max_restarts, window)
        .pool("workers", 2)
        .deadline(Duration::from_millis(args.deadline_ms))
        .worker_budget(Duration::from_millis(args.budget_ms))
        .handle_signals(true)
        .build()
        .expect("the pipeline's tree is valid")
}

/// Exits with clap's usage error (code 2), like any other bad command line.
fn usage_error(message: String) -> ! {
    Args::command()
        .error(clap::error::ErrorKind::InvalidValue, message)
        .exit()
}

/// Rejects a `--hang`, `--panic-on-drain`, `--wedge` or `--panic-every` that names no child
/// it can apply to, and a `--panic-every` count that is not a positive integer. Returns the
/// checked `--panic-every`.
fn check_fault_targets(args: &Args) -> Option<PanicEvery> {
    let index = |path: &str, prefix: &str, n: u32| {
        path.strip_prefix(prefix)
            .and_then(|i| i.parse::<u32>().ok())
            .is_some_and(|i| i < n)
    };
    let known = |path: &str| {
        path == "router"
            || path == "sink"
            || index(path, "source/", args.producers)
            || index(path, "workers/", args.workers)
    };
    for (flag, value) in [
        ("--hang", &args.hang),
        ("--panic-on-drain", &args.panic_on_drain),
        ("--wedge", &args.wedge),
    ] {
        if let Some(path) = value.as_deref().filter(|p| !known(p)) {
            usage_error(format!(
                "{flag} {path}: no such worker (try router, sink, source/0..{}, workers/0..{})",
                args.producers - 1,
                args.workers - 1
            ));
        }
    }
    let [every, path] = args.panic_every.as_deref()? else {
        unreachable!("clap takes exactly two values for --panic-every");
    };
    let every = match every.parse::<u64>() {
        Ok(k) if k >= 1 => k,
        _ => usage_error(format!(
            "--panic-every {every} {path}: K must be a whole number of messages, at least 1"
        )),
    };
    // Producers handle no messages (they send on a timer): only these can panic on one.
    let handles_messages =
        path == "router" || path == "sink" || index(path, "workers/", args.workers);
    if !handles_messages {
        let why = if index(path, "source/", args.producers) {
            "producers handle no messages"
        } else {
            "no such child"
        };
        usage_error(format!(
            "--panic-every {every} {path}: {why} (try router, sink, workers/0..{})",
            args.workers - 1
        ));
    }
    Some(PanicEvery {
        every,
        path: path.clone(),
    })
}

/// Writes the report as JSON (needs the crate's `serde` feature, on by default).
fn write_json(report: &ShutdownReport, path: &std::path::Path) {
    #[cfg(feature = "serde")]
    if let Err(e) = std::fs::write(path, report.to_json()) {
        log::error!("cannot write the report to {}: {e}", path.display());
    }
    #[cfg(not(feature = "serde"))]
    {
        let _ = report;
        log::error!(
            "cannot write the report to {}: built without the `serde` feature",
            path.display()
        );
    }
}

/// Leaves the panics `--panic-every` injects to the tree, which logs each one (`… panicked:
/// …`) and restarts the child; every other panic is printed as usual.
fn quiet_injected_panics() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let injected = info
            .payload()
            .downcast_ref::<String>()
            .is_some_and(|m| m.contains(INJECTED_PANIC));
        if !injected {
            default_hook(info);
        }
    }));
}

#[actix::main]
async fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let panic_every = check_fault_targets(&args);
    quiet_injected_panics();

    let counters = Arc::new(Counters::default());
    let tree = build_tree(&args, panic_every.as_ref(), &counters);
    let handle = match tree.start().await {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    // From here on the `--panic-every` child panics (while the tree runs).
    let _ = counters.tree.set(handle.clone());
    println!("ready (pid {})", std::process::id());

    let report = handle.wait().await;
    eprintln!("{report}");
    if let Some(path) = &args.report_json {
        write_json(&report, path);
    }

    let produced = counters.produced.load(Ordering::Relaxed);
    let consumed = counters.consumed.load(Ordering::Relaxed);
    let lost = counters.refused_downstream.load(Ordering::Relaxed) + report.dropped();
    let panics = counters.panics.load(Ordering::Relaxed);
    if produced != consumed + lost {
        log::error!(
            "the books do not balance: produced {produced} != consumed {consumed} + lost {lost}"
        );
    }
    println!("produced={produced} consumed={consumed} lost={lost} panics={panics}");
    std::process::exit(report.exit_code());
}
