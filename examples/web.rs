//! An actix-web service whose handlers talk to actors in a supervision tree, shut down
//! gracefully on SIGTERM without failing a single request it accepted.
//!
//! ```text
//! web
//! ├── workers         workers/0..N-1 do "N ms of work" (an async sleep), many jobs at once
//! └── http            actix-web: GET /work?ms=N, /readyz, /livez   (depends on workers)
//! ```
//!
//! `GET /work?ms=1500` hands the job to a worker (round-robin) and answers `200 worker 2 did
//! 1500 ms` when the worker is done. A bad `ms` (missing, not a number, more than 600000) gets a
//! `400` saying what is wrong. `/readyz` and `/livez` are the crate's [`health`] service: the
//! tree's phase as probes for a load balancer or Kubernetes.
//!
//! `http` depends on `workers`, so the tree starts the workers first and stops them last: the
//! handlers can count on a worker being there for as long as the server takes requests.
//!
//! # What SIGTERM does
//!
//! ```text
//! SIGTERM ─┬─ /readyz answers 503 {"phase":"draining",…} at once; everything still serves
//!          │  (--grace-ms: the load balancer takes this instance out of rotation meanwhile)
//!          ├─ after the grace, `http` is told to stop: it closes its listening socket (a new
//!          │  connection is refused) and waits for the requests in progress; each completes
//!          │  with its 200, within the server's --budget-ms
//!          ├─ once `http` has acknowledged, the workers are told: nothing can send them work
//!          │  any more, they finish what they hold (nothing, normally) and acknowledge
//!          └─ the report is printed on stderr and the process exits 0
//! ```
//!
//! The report's `http` line counts requests: `drained` is how many completed after the server
//! was told to stop, and `in flight when told=N` how many were in progress at that moment.
//!
//! A request still running at the end of the server's budget is cut: the report says `http`
//! `TIMED OUT` and the process exits 4. Its worker notices that nobody waits for the job any
//! more and drops it, so the workers still drain at once (see `JobWorker`).
//!
//! ```text
//! cargo run --example web --features web
//! curl -i 'localhost:8080/work?ms=1500'         # 200 worker 0 did 1500 ms
//! curl -i 'localhost:8080/work?ms=lots'         # 400 `ms` must be a whole number of milliseconds…
//! curl -i localhost:8080/readyz                 # 200 {"phase":"running","ready":true,"live":true}
//!
//! # a shutdown with requests in flight, from another terminal:
//! for i in $(seq 10); do curl -s 'localhost:8080/work?ms=5000' & done; sleep 0.5; kill -TERM <pid>
//!
//! cargo run --example web --features web -- --grace-ms 2000 --budget-ms 3000 --bind 127.0.0.1:0
//! RUST_LOG=info,web=debug cargo run --example web --features web   # a line per job
//! ```
//!
//! On start it prints `ready: http://ADDR (pid P)` on stdout, with the address the server
//! actually listens on (useful with `--bind 127.0.0.1:0`). Logging goes through `env_logger` to
//! stderr (INFO unless `RUST_LOG` says otherwise). Exit codes: 0 clean, 1 failed to start,
//! 2 bad command line or cannot listen on `--bind`, 3 failed or panicked, 4 timed out, 5 forced
//! (a second SIGTERM skips the remaining budgets; a third exits at once).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_supervisor::web::{health, HttpServerSpec};
use actix_supervisor::{ChildAddr, ChildSpec, InFlight, Stopping, SupervisorSpec, Tree, Worker};
use actix_web::{web, App, HttpRequest, HttpResponse};
use clap::Parser;
use tokio::sync::oneshot;

/// The longest job `/work` accepts: anything above is surely a typo.
const MAX_MS: u64 = 600_000;

#[derive(Parser, Debug)]
#[command(
    name = "web",
    about = "An actix-web app calling actors in a supervision tree; stop it with SIGTERM"
)]
struct Args {
    /// Where the server listens (port 0: any free port; the one chosen is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    bind: String,
    /// Readiness grace, in milliseconds: how long /readyz answers 503 before the server stops
    /// accepting.
    #[arg(long, default_value_t = 0)]
    grace_ms: u64,
    /// The tree's overall shutdown deadline, in milliseconds.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    deadline_ms: u64,
    /// The server's shutdown budget, in milliseconds: how long requests in flight may take to
    /// complete once it is told to stop.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    budget_ms: u64,
    /// Number of worker actors (workers/0..N-1).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    workers: u32,
    /// Number of the HTTP server's threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    http_workers: u32,
}

// ----- workers/N -----------------------------------------------------------------------------

/// "Do `ms` milliseconds of work": answered with a line saying who did it.
#[derive(Message)]
#[rtype(result = "String")]
struct Job {
    ms: u64,
    /// Resolves (with an error) when the requester is gone: the HTTP handler holds the sender,
    /// and actix-web drops the handler when the client disconnects or the server is stopped at
    /// the end of its budget. The worker then drops the job instead of finishing it for nobody.
    requester_gone: oneshot::Receiver<()>,
}

/// A worker that does its jobs asynchronously, so one worker runs many jobs at once.
struct JobWorker {
    id: u32,
    /// Jobs in progress. Their futures run beside the actor (actix spawns a `ResponseFuture` on
    /// the arbiter), so the worker could otherwise acknowledge `Stopping` — and the process
    /// exit — while they still run; the drain waits for this tracker to be idle first.
    jobs: InFlight,
    /// Jobs taken over this instance's life, for its last log line.
    taken: u64,
}

impl Actor for JobWorker {
    type Context = Context<Self>;
}

impl Handler<Job> for JobWorker {
    // A future: the handler returns at once and the worker takes its next message while this
    // one's work goes on.
    type Result = ResponseFuture<String>;

    fn handle(&mut self, job: Job, _: &mut Context<Self>) -> Self::Result {
        let id = self.id;
        let Job { ms, requester_gone } = job;
        self.taken += 1;
        log::debug!(
            "worker {id}: starting {ms} ms of work ({} jobs in progress)",
            self.jobs.count() + 1
        );
        // `track` counts the future as in flight until it completes (or is dropped).
        Box::pin(self.jobs.track(async move {
            let began = Instant::now();
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(ms)) => {
                    log::debug!("worker {id}: did {ms} ms");
                    format!("worker {id} did {ms} ms")
                }
                _ = requester_gone => {
                    log::info!(
                        "worker {id}: dropped a {ms} ms job after {:.2?}: its request is gone",
                        began.elapsed()
                    );
                    format!("worker {id} dropped a {ms} ms job") // nobody reads this
                }
            }
        }))
    }
}

impl Worker for JobWorker {
    fn in_flight(&self) -> Option<&InFlight> {
        Some(&self.jobs)
    }

    fn on_stopping(&mut self, _: &mut Context<Self>, _: &Stopping) {
        // The server stopped before us (it depends on us), so no new job can come: nothing to
        // close here. The jobs still running are waited for by the drain, through `jobs`.
        log::debug!(
            "worker {}: stopping, {} jobs in progress",
            self.id,
            self.jobs.count()
        );
    }

    fn on_drained(&mut self, _: &mut Context<Self>) -> Option<actix_supervisor::HookFuture<Self>> {
        log::debug!("worker {}: drained, {} jobs taken", self.id, self.taken);
        None
    }
}

// ----- http: the actix-web app ---------------------------------------------------------------

/// What the handlers share: the workers' addresses and a round-robin cursor.
struct Workers {
    /// Stable addresses from the tree: valid before the workers start and across restarts.
    addrs: Vec<ChildAddr<JobWorker>>,
    next: AtomicUsize,
}

impl Workers {
    fn pick(&self) -> (usize, &ChildAddr<JobWorker>) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.addrs.len();
        (i, &self.addrs[i])
    }
}

/// `GET /work?ms=N`.
async fn work(req: HttpRequest, workers: web::Data<Workers>) -> HttpResponse {
    let ms = match job_length(req.query_string()) {
        Ok(ms) => ms,
        Err(problem) => return HttpResponse::BadRequest().body(problem + "\n"),
    };
    let (i, worker) = workers.pick();
    // Held until this handler returns (or is dropped): see `Job::requester_gone`.
    let (_requester, requester_gone) = oneshot::channel();
    match worker.send(Job { ms, requester_gone }).await {
        Ok(reply) => HttpResponse::Ok().body(reply + "\n"),
        // Cannot happen while the server runs: the workers stop only after it has. Still, a
        // send can fail (the worker is gone for good), and the client deserves an answer.
        Err(e) => HttpResponse::ServiceUnavailable().body(format!("worker {i}: {e}\n")),
    }
}

/// The `ms` of a `/work` query string, or what is wrong with it.
fn job_length(query: &str) -> Result<u64, String> {
    let query = web::Query::<HashMap<String, String>>::from_query(query)
        .map_err(|e| format!("bad query string: {e}"))?;
    let raw = query
        .get("ms")
        .ok_or("missing `ms`: ask for /work?ms=N, N milliseconds of work")?;
    match raw.parse::<u64>() {
        Ok(ms) if ms <= MAX_MS => Ok(ms),
        Ok(ms) => Err(format!("`ms` is too large: {ms} > {MAX_MS} (10 minutes)")),
        Err(_) => Err(format!(
            "`ms` must be a whole number of milliseconds, not {raw:?}"
        )),
    }
}

// ----- the tree ------------------------------------------------------------------------------

#[actix_web::main]
async fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();

    let workers: Vec<_> = (0..args.workers)
        .map(|id| {
            ChildSpec::worker(id.to_string(), move || JobWorker {
                id,
                jobs: InFlight::new(),
                taken: 0,
            })
        })
        .collect();
    let pool = Arc::new(Workers {
        addrs: workers.iter().map(|w| w.addr()).collect(),
        next: AtomicUsize::new(0),
    });

    let builder = Tree::builder("web")
        .readiness_grace(Duration::from_millis(args.grace_ms))
        .deadline(Duration::from_millis(args.deadline_ms))
        // SIGTERM / SIGINT go to the tree, not to actix-web: the server child has actix-web's
        // own signal handling disabled, so the tree alone decides when and in which order
        // things stop.
        .handle_signals(true);
    // Under systemd (`Type=notify`, deploy/actix-supervisor-example.service): READY=1 once every
    // child has started, STOPPING=1 and progress lines as STATUS= while draining. Elsewhere a
    // no-op.
    #[cfg(feature = "systemd")]
    let builder = builder.notify_systemd(true);
    // The phase of the tree being built, for /readyz: the app is one of the tree's children.
    let phase = builder.phase_watch();
    // The factory runs on each of the server's threads, as with `HttpServer::new`.
    let http = HttpServerSpec::new("http", args.bind.clone(), move || {
        App::new()
            .app_data(web::Data::from(pool.clone()))
            .service(health(phase.clone()))
            .route("/work", web::get().to(work))
    })
    .workers(args.http_workers as usize)
    .budget(Duration::from_millis(args.budget_ms))
    // Stops first, so the workers are there for every request it still serves.
    .depends_on("workers");
    // Where it listens, known once it has started (with port 0, the port the system chose).
    let addrs = http.addrs();

    let tree = builder
        .child(SupervisorSpec::new("workers").children(workers))
        .child(http)
        .build()
        .expect("the example's tree is valid");
    let handle = match tree.start().await {
        Ok(handle) => handle,
        // The server binds when it starts, and that is the only way its start can fail: an
        // address in use (or not an address at all) fails the start, and the cause names the
        // address. Exit 2, like any other bad command line.
        Err(e) if e.child == "http" => {
            eprintln!("error: {}", e.cause);
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let shown: Vec<String> = addrs.get().iter().map(|a| format!("http://{a}")).collect();
    println!("ready: {} (pid {})", shown.join(" "), std::process::id());

    let report = handle.wait().await;
    eprintln!("{report}");
    std::process::exit(report.exit_code());
}
