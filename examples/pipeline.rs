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
//! acknowledges, then the workers drain, then the sink. Nothing accepted is lost, and the final
//! line says so:
//!
//! ```text
//! produced=P consumed=C lost=L
//! ```
//!
//! `P` counts the messages the router accepted, `C` those the sink counted, `L` those accepted
//! somewhere but never handled (dropped by an aborted or panicked child, or refused on a hop
//! after being accepted upstream). `P = C + L` always; after a clean shutdown `L = 0`.
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
//! It prints `ready` on stdout once every child has started, the shutdown report on stderr, and
//! exits with the report's code (0 clean, 3 failed or panicked, 4 timed out, 5 forced).
//! Logging goes through `env_logger` (INFO unless `RUST_LOG` says otherwise).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_supervisor::{
    ChildAddr, ChildSpec, HookFuture, Placement, ShutdownReport, Stopping, SupervisorSpec, Tree,
    Worker,
};
use clap::{CommandFactory, Parser};

/// How often a producer wakes up to send what its rate says is due.
const TICK: Duration = Duration::from_millis(10);

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
}

/// A numbered message from one producer.
#[derive(Message)]
#[rtype(result = "()")]
struct Item {
    producer: u32,
    seq: u64,
}

/// The faults `--hang` and `--panic-on-drain` inject into one child.
#[derive(Clone, Default)]
struct Fault {
    path: String,
    hang: bool,
    panic: bool,
    wedge: bool,
}

impl Fault {
    fn for_child(args: &Args, path: &str) -> Fault {
        Fault {
            path: path.to_owned(),
            hang: args.hang.as_deref() == Some(path),
            panic: args.panic_on_drain.as_deref() == Some(path),
            wedge: args.wedge.as_deref() == Some(path),
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
fn build_tree(args: &Args, counters: &Arc<Counters>) -> Tree {
    let c = counters.clone();
    let fault = Fault::for_child(args, "sink");
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
            let fault = Fault::for_child(args, &format!("workers/{i}"));
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
    let fault = Fault::for_child(args, "router");
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
            let fault = Fault::for_child(args, &format!("source/{i}"));
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

    Tree::builder("pipeline")
        .child(
            SupervisorSpec::new("source")
                .children(producers)
                .depends_on("router"),
        )
        .child(router.depends_on("workers"))
        .child(
            SupervisorSpec::new("workers")
                .children(processors)
                .depends_on("sink"),
        )
        .child(sink)
        .pool("workers", 2)
        .deadline(Duration::from_millis(args.deadline_ms))
        .worker_budget(Duration::from_millis(args.budget_ms))
        .handle_signals(true)
        .build()
        .expect("the pipeline's tree is valid")
}

/// Rejects a `--hang` or `--panic-on-drain` that names no worker.
fn check_fault_targets(args: &Args) {
    let known = |path: &str| {
        let index = |prefix: &str, n: u32| {
            path.strip_prefix(prefix)
                .and_then(|i| i.parse::<u32>().ok())
                .is_some_and(|i| i < n)
        };
        path == "router"
            || path == "sink"
            || index("source/", args.producers)
            || index("workers/", args.workers)
    };
    for (flag, value) in [
        ("--hang", &args.hang),
        ("--panic-on-drain", &args.panic_on_drain),
        ("--wedge", &args.wedge),
    ] {
        if let Some(path) = value.as_deref().filter(|p| !known(p)) {
            Args::command()
                .error(
                    clap::error::ErrorKind::InvalidValue,
                    format!(
                        "{flag} {path}: no such worker (try router, sink, source/0..{}, workers/0..{})",
                        args.producers - 1,
                        args.workers - 1
                    ),
                )
                .exit();
        }
    }
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

#[actix::main]
async fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    check_fault_targets(&args);

    let counters = Arc::new(Counters::default());
    let tree = build_tree(&args, &counters);
    let handle = match tree.start().await {
        Ok(handle) => handle,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    println!("ready (pid {})", std::process::id());

    let report = handle.wait().await;
    eprintln!("{report}");
    if let Some(path) = &args.report_json {
        write_json(&report, path);
    }

    let produced = counters.produced.load(Ordering::Relaxed);
    let consumed = counters.consumed.load(Ordering::Relaxed);
    let lost = counters.refused_downstream.load(Ordering::Relaxed) + report.dropped();
    if produced != consumed + lost {
        log::error!(
            "the books do not balance: produced {produced} != consumed {consumed} + lost {lost}"
        );
    }
    println!("produced={produced} consumed={consumed} lost={lost}");
    std::process::exit(report.exit_code());
}
