//! An actix-web server as a child of the tree against the same app on a bare `HttpServer`, in
//! one process and one run (issue 4).
//!
//! `cargo bench --bench web --features web` prints a table (per variant: requests/s, p50, p99,
//! errors) and lines in the format of `benches/shutdown.rs`:
//!
//! ```text
//! RESULT name=web_work_ms0_rps tree=<v>req/s actix=<v>req/s ratio=<r> target=>=0.95 ratio_is=tree/actix better=higher pass=<yes|no>
//! RESULT name=web_work_ms0_p50 tree=<v>us actix=<v>us ratio=<r> ratio_is=tree/actix better=lower
//! RESULT name=web_work_ms0_p99 tree=<v>us actix=<v>us ratio=<r> ratio_is=tree/actix better=lower
//! ```
//!
//! followed by a line saying whether the target (requests/s ratio >= 0.95) is met; a miss is
//! printed, never a failure of the process.
//!
//! **The work.** `GET /work?ms=0`: the handler parses `ms` from the query string, sends
//! `Work { ms }` to a backend actor with `send(..).await`, and answers 200 with the actor's reply
//! (a running count) as the body. With `ms > 0` the actor replies after that many milliseconds
//! without blocking its thread.
//! - **tree**: a tree with the backend as a worker (`ChildSpec::worker`) and an
//!   [`HttpServerSpec`] child that `depends_on` it; the handler holds the worker's `ChildAddr`.
//!   Every request also goes through the server child's counting middleware.
//! - **actix** (bare): `HttpServer::new(..).disable_signals()` serving the same app, whose
//!   handler holds the `Addr` of the same actor type started with `Actor::start()`.
//!
//! The handler is one generic function (`work::<T>`), so the two differ only in the address type
//! (and in what the tree adds around the app). The listener is bound to `127.0.0.1:0` first and
//! handed over (`HttpServerSpec::new`, `HttpServer::listen`).
//!
//! **Threads on a 2-core machine.** Both sides: one server worker thread (actix-web's own;
//! `BENCH_SERVER_WORKERS`, default 1), the load generator on an OS thread of its own, and the
//! System's thread (the main one) running the backend actor — plus, idle during the measurement,
//! the tree's runtime and the server child's task, or bare actix-web's server command task. Per
//! request the server worker spends ~14 µs of CPU (HTTP, loopback TCP), the generator ~9.5 µs
//! and the System's thread ~2.5 µs, the same within a few percent on both sides: the server
//! worker and the generator each take most of a core and the actor's thread fits in between,
//! and the server worker — not the generator — is the bottleneck. A second server worker would
//! only share the same two cores with the generator. The table shows this split for every run
//! (`CPU us/request: system / server / generator`, from `/proc/self/task/*/stat` over the
//! measured window; "server" is every thread of actix's, "system" the main thread).
//!
//! Unpinned (the default) the kernel places these three threads on the two cores, and rounds
//! fall in two modes. When the System's thread shares a core with the generator, the tree and
//! bare actix run at the same rate (~90k req/s here). When it shares the server worker's core,
//! every message to the actor tends to cost a wake-up and a pair of context switches, and bare
//! actix's actor pays that more often than the tree's worker, whose pump takes the whole queue
//! per visit (measured: ~0.9 against ~0.3-0.5 context switches per request on the System's
//! thread; ~47k against ~70k req/s). The default figure is what a user's scheduler gives, so it
//! counts both modes as they come. `BENCH_PIN=1` fixes the first placement (server workers on
//! CPU 0; the System's thread, and the generator, on CPU 1), measuring the per-request cost
//! without the scheduler's choice; pinned threads cannot move away from other load, so on a
//! shared machine that is noisier in its own way.
//!
//! **The load generator** is closed-loop: `BENCH_CONNS` (default 64) keep-alive connections, all
//! open before the clock starts, each sending its next request as soon as the previous response
//! is read, for a 0.5 s warm-up and then `BENCH_SECS` (default 3) measured seconds. A request
//! counts when its response completes inside the measured window; its latency is from the write
//! of the request to the last byte of the response. requests/s = counted / window.
//! It is a minimal HTTP/1.1 client over tokio's `TcpStream` on a current-thread runtime, rather
//! than `awc`: a constant request written in one `write`, a response read until its head and
//! `content-length` body are in. `awc` would add a connection pool, header maps and a response
//! type per request on the generator's core, making the client a larger share of each round trip
//! and diluting the server-side difference this figure is about; the raw client costs the same,
//! and little, for both variants.
//!
//! **Rounds.** Each round starts its variant in a fresh actix `System` (fresh tree or server and
//! actor, fresh listener), runs the generator, then tears down: the tree is shut down (its report
//! must be clean), the bare server is stopped gracefully. One warm-up round of each, then
//! `BENCH_RUNS` (default 7, at least 3) rounds of each, alternating (tree, actix, actix, tree, …)
//! so machine noise hits both alike; every figure is the median of its rounds, and the ratios are
//! of those medians. The median of the per-round ratios (each tree round against the actix round
//! next to it in time) is printed too: on a shared machine it is the steadier of the two.
//!
//! Groups (`cargo bench --bench web --features web -- NAME` runs the groups whose name contains
//! NAME; with no name only `work_ms0` runs):
//! - `work_ms0`: the figure above, the target.
//! - `work_ms1`: the same with `ms=1` (the actor replies after 1 ms), for scale.
//! - `breakdown`: where the tree's cost is, with `ms=0` — the bare server with a copy of the
//!   child's counting middleware (`Addr`), the bare server (no middleware) calling a worker of a
//!   tree through its `ChildAddr`, and the bare server calling an actor whose actix mailbox
//!   capacity is raised from its default 16 (so `Addr::send` never parks), against the two main
//!   variants.

mod common;
use common::median;

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::dev::{MessageResponse, OneshotSender};
use actix::prelude::*;
use actix_supervisor::web::HttpServerSpec;
use actix_supervisor::{ChildAddr, ChildSpec, Outcome, Tree, Worker};
use actix_web::dev::{Service, ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TARGET: f64 = 0.95;
const WARMUP: Duration = Duration::from_millis(500);
/// Opening the connections, and any one request, must take less than this.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// A bound on one connection's requests in a round, far above what a round can do.
const MAX_REQUESTS_PER_CONN: usize = 10_000_000;
/// A response longer than this is an error (ours are ~150 bytes).
const MAX_RESPONSE: usize = 64 * 1024;

// ----- the backend actor ----------------------------------------------------------------------

/// Counts the work it is given; the count is the reply.
#[derive(Default)]
struct Backend {
    served: u64,
    /// Raise actix's mailbox capacity (default 16) so that `Addr::send` never parks the sender
    /// (the `breakdown` group only).
    wide: bool,
}

impl Actor for Backend {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.wide {
            ctx.set_mailbox_capacity(1 << 20);
        }
    }
}

impl Worker for Backend {}

#[derive(Message)]
#[rtype(result = "u64")]
struct Work {
    ms: u64,
}

/// The reply at once, or after a delay without holding the actor; no allocation for the first.
enum Reply {
    Now(u64),
    After(Duration, u64),
}

impl MessageResponse<Backend, Work> for Reply {
    fn handle(self, _: &mut Context<Backend>, tx: Option<OneshotSender<u64>>) {
        match self {
            Reply::Now(n) => {
                if let Some(tx) = tx {
                    let _ = tx.send(n);
                }
            }
            Reply::After(delay, n) => {
                actix_rt::spawn(async move {
                    actix_rt::time::sleep(delay).await;
                    if let Some(tx) = tx {
                        let _ = tx.send(n);
                    }
                });
            }
        }
    }
}

impl Handler<Work> for Backend {
    type Result = Reply;

    fn handle(&mut self, work: Work, _: &mut Context<Self>) -> Reply {
        self.served += 1;
        match work.ms {
            0 => Reply::Now(self.served),
            ms => Reply::After(Duration::from_millis(ms), self.served),
        }
    }
}

// ----- the app: one handler, generic over the address -----------------------------------------

/// An address the handler can ask the backend through.
trait Ask: Clone + Send + 'static {
    fn ask(&self, work: Work) -> impl Future<Output = Result<u64, MailboxError>>;
}

impl Ask for Addr<Backend> {
    fn ask(&self, work: Work) -> impl Future<Output = Result<u64, MailboxError>> {
        self.send(work)
    }
}

impl Ask for ChildAddr<Backend> {
    fn ask(&self, work: Work) -> impl Future<Output = Result<u64, MailboxError>> {
        self.send(work)
    }
}

/// `ms` from a query string like `ms=0` (0 when absent or malformed).
fn query_ms(query: &str) -> u64 {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn work<T: Ask>(req: HttpRequest, backend: web::Data<T>) -> HttpResponse {
    let ms = query_ms(req.query_string());
    match backend.ask(Work { ms }).await {
        Ok(n) => HttpResponse::Ok().body(n.to_string()),
        Err(_) => HttpResponse::ServiceUnavailable().finish(),
    }
}

/// The app both variants serve (the tree's child wraps it in its middleware).
fn app<T: Ask>(
    backend: T,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    // The factory runs on each of the server's worker threads.
    pin(Role::Server);
    App::new()
        .app_data(web::Data::new(backend))
        .route("/work", web::get().to(work::<T>))
}

// ----- the variants ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    /// `HttpServerSpec` + `ChildAddr`, in a tree.
    Tree,
    /// `HttpServer` + `Addr`.
    Bare,
    /// `HttpServer` with a copy of the child's counting middleware + `Addr`.
    BareCounted,
    /// `HttpServer` + the `ChildAddr` of a worker in a tree that has only the worker.
    BareChildAddr,
    /// `HttpServer` + `Addr` of an actor whose actix mailbox capacity is raised from 16.
    BareWide,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::Tree => "tree   (HttpServerSpec + ChildAddr)",
            Variant::Bare => "actix  (HttpServer + Addr)",
            Variant::BareCounted => "HttpServer + counting middleware + Addr",
            Variant::BareChildAddr => "HttpServer + ChildAddr",
            Variant::BareWide => "HttpServer + Addr (mailbox capacity 2^20)",
        }
    }
}

fn loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("a free loopback port")
}

fn server_workers() -> usize {
    env_usize("BENCH_SERVER_WORKERS", 1).max(1)
}

/// One round of `variant` under `load`, in a fresh System, torn down before it returns.
fn round(variant: Variant, load: &Load) -> Sample {
    let load = load.clone();
    let sys = System::new();
    let sample = sys.block_on(async move {
        match variant {
            Variant::Tree => tree_round(load).await,
            Variant::Bare => bare_round(Backend::default().start(), false, load).await,
            Variant::BareCounted => bare_round(Backend::default().start(), true, load).await,
            Variant::BareWide => {
                let backend = Backend {
                    wide: true,
                    ..Backend::default()
                };
                bare_round(backend.start(), false, load).await
            }
            Variant::BareChildAddr => {
                let spec = ChildSpec::worker("backend", Backend::default);
                let addr = spec.addr();
                let handle = Tree::builder("bench")
                    .readiness_grace(Duration::ZERO)
                    .child(spec)
                    .build()
                    .expect("tree")
                    .start()
                    .await
                    .expect("start");
                let sample = bare_round(addr, false, load).await;
                let report = handle.shutdown("round over").await;
                assert_eq!(report.exit_code(), 0, "{report}");
                sample
            }
        }
    });
    drop(sys);
    sample
}

async fn tree_round(load: Load) -> Sample {
    let listener = loopback();
    let addr = listener.local_addr().expect("local addr");
    let backend = ChildSpec::worker("backend", Backend::default);
    let to_backend = backend.addr();
    let http = HttpServerSpec::new("http", listener, move || app(to_backend.clone()))
        .workers(server_workers())
        .depends_on("backend");
    let handle = Tree::builder("bench")
        .readiness_grace(Duration::ZERO)
        .child(backend)
        .child(http)
        .build()
        .expect("tree")
        .start()
        .await
        .expect("start");
    let sample = drive(addr, load).await;
    let report = handle.shutdown("round over").await;
    assert_eq!(report.exit_code(), 0, "{report}");
    for name in ["http", "backend"] {
        let child = report.find(name).expect("in the report");
        assert_eq!(child.outcome, Outcome::Drained, "{report}");
        assert_eq!(child.dropped, 0, "{report}");
    }
    sample
}

/// A copy of the counting middleware's counter (`adapter::WorkCounter`, crate-private).
#[derive(Default)]
struct Counts {
    accepted: AtomicU64,
    completed: AtomicU64,
    ended: AtomicU64,
}

struct Guard(Arc<Counts>);

impl Guard {
    fn begin(counts: &Arc<Counts>) -> Guard {
        counts.accepted.fetch_add(1, Ordering::Relaxed);
        Guard(counts.clone())
    }
    fn complete(self) {
        self.0.completed.fetch_add(1, Ordering::Release);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::Release);
    }
}

async fn bare_round<T: Ask>(backend: T, counted: bool, load: Load) -> Sample {
    let listener = loopback();
    let addr = listener.local_addr().expect("local addr");
    let server = if counted {
        let counts = Arc::new(Counts::default());
        // The same shape as `web/server.rs`: the user's app, wrapped with `wrap_fn`.
        HttpServer::new(move || {
            let counts = counts.clone();
            app(backend.clone()).wrap_fn(move |req, srv| {
                let work = Guard::begin(&counts);
                let response = srv.call(req);
                async move {
                    let response = response.await;
                    work.complete();
                    response
                }
            })
        })
        .workers(server_workers())
        .disable_signals()
        .listen(listener)
        .expect("listen")
        .run()
    } else {
        HttpServer::new(move || app(backend.clone()))
            .workers(server_workers())
            .disable_signals()
            .listen(listener)
            .expect("listen")
            .run()
    };
    let stop = server.handle();
    let running = actix_rt::spawn(server);
    let sample = drive(addr, load).await;
    stop.stop(true).await;
    running.await.expect("server task").expect("server");
    sample
}

/// Runs the generator on a thread of its own and waits for it without blocking the System.
async fn drive(addr: SocketAddr, load: Load) -> Sample {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let limit = load.warmup + load.measure + IO_TIMEOUT * 2;
    let generator = std::thread::Builder::new()
        .name("load-generator".into())
        .spawn(move || {
            let _ = tx.send(generate(addr, &load));
        })
        .expect("spawn the generator");
    let sample = actix_rt::time::timeout(limit, rx)
        .await
        .expect("the generator overran its time bound")
        .expect("the generator panicked");
    generator.join().expect("generator thread");
    sample
}

// ----- the load generator ---------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Load {
    conns: usize,
    warmup: Duration,
    measure: Duration,
    request: Arc<[u8]>,
}

impl Load {
    fn new(ms: u64) -> Load {
        let secs = std::env::var("BENCH_SECS")
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|s| *s > 0.0 && *s <= 60.0)
            .unwrap_or(3.0);
        Load {
            conns: env_usize("BENCH_CONNS", 64).clamp(1, 1024),
            warmup: WARMUP,
            measure: Duration::from_secs_f64(secs),
            request: format!("GET /work?ms={ms} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                .into_bytes()
                .into(),
        }
    }
}

/// One round's figures.
#[derive(Clone, Debug)]
struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Requests that failed: I/O error, timeout or a status other than 200.
    errors: u64,
    /// CPU time per counted request, by thread (see [`Cpu`]), in microseconds.
    cpu_us: [f64; ROLES],
}

/// Whose CPU time: the System's thread (the backend actor; in the tree also the runtime and the
/// server child's supervision task), actix's threads (the server's worker threads, its accept
/// thread), the load generator.
const ROLES: usize = 3;
const ROLE_NAMES: [&str; ROLES] = ["system", "server", "generator"];

/// Where a thread runs with `BENCH_PIN=1`.
#[derive(Clone, Copy)]
enum Role {
    System,
    Server,
    Generator,
}

fn pinned() -> bool {
    std::env::var("BENCH_PIN").is_ok_and(|v| v == "1")
}

/// With `BENCH_PIN=1`, binds the calling thread to its role's CPU: the server's workers to CPU 0,
/// the System's thread and the generator to CPU 1. A no-op otherwise, and off Linux.
fn pin(role: Role) {
    if !pinned() {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        let cpu = match role {
            Role::Server => 0,
            Role::System | Role::Generator => 1,
        };
        // SAFETY: a zeroed `cpu_set_t` is the empty set; `CPU_SET` stays within it (cpu < 2);
        // `sched_setaffinity(0, ..)` only changes the calling thread's mask.
        let ok = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
        };
        if !ok {
            eprintln!("warning: cannot pin a thread to CPU {cpu}");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = role;
}

/// CPU time (user + system, in clock ticks) of this process's threads by role, from
/// `/proc/self/task/*/stat` (Linux; all zero elsewhere).
fn cpu_ticks() -> [u64; ROLES] {
    let mut by_role = [0; ROLES];
    let pid = std::process::id().to_string();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return by_role;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`: the name may hold spaces, so split after its ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map_or("", |(_, c)| c);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the ')'.
        let ticks: u64 = fields[11..13]
            .iter()
            .filter_map(|f| f.parse::<u64>().ok())
            .sum();
        let role = if task.file_name().to_str() == Some(pid.as_str()) {
            0
        } else if comm == "load-generator" {
            2
        } else {
            1
        };
        by_role[role] += ticks;
    }
    by_role
}

/// The closed loop: `load.conns` connections, each request after the previous response.
fn generate(addr: SocketAddr, load: &Load) -> Sample {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("generator runtime");
    pin(Role::Generator);
    rt.block_on(async {
        let mut streams = Vec::with_capacity(load.conns);
        for _ in 0..load.conns {
            let stream = tokio::time::timeout(IO_TIMEOUT, tokio::net::TcpStream::connect(addr))
                .await
                .expect("connect timed out")
                .expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            streams.push(stream);
        }
        let t0 = Instant::now();
        let window = (t0 + load.warmup, t0 + load.warmup + load.measure);
        let tasks: Vec<_> = streams
            .into_iter()
            .map(|stream| tokio::spawn(connection(stream, load.request.clone(), window)))
            .collect();
        // CPU time over the measured window, read at its two ends.
        let cpu = tokio::spawn(async move {
            tokio::time::sleep_until(window.0.into()).await;
            let before = cpu_ticks();
            tokio::time::sleep_until(window.1.into()).await;
            let after = cpu_ticks();
            std::array::from_fn::<u64, ROLES, _>(|i| after[i].saturating_sub(before[i]))
        });
        let mut latencies = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (l, e) = t.await.expect("connection task");
            latencies.extend(l);
            errors += e;
        }
        latencies.sort_unstable();
        let cpu = cpu.await.expect("cpu task");
        // SAFETY: sysconf has no preconditions.
        let tick_us = 1e6 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let n = latencies.len().max(1) as f64;
        Sample {
            cpu_us: std::array::from_fn(|i| cpu[i] as f64 * tick_us / n),
            rps: latencies.len() as f64 / load.measure.as_secs_f64(),
            p50_us: percentile(&latencies, 0.50),
            p99_us: percentile(&latencies, 0.99),
            errors,
        }
    })
}

/// One connection's loop: the latencies (ns) of the responses completed inside `window`, and
/// the count of failed requests. An I/O error or a timeout ends the connection.
async fn connection(
    mut stream: tokio::net::TcpStream,
    request: Arc<[u8]>,
    (from, to): (Instant, Instant),
) -> (Vec<u64>, u64) {
    let mut latencies = Vec::with_capacity(64 * 1024);
    let mut errors = 0;
    let mut buf = Vec::with_capacity(1024);
    for _ in 0..MAX_REQUESTS_PER_CONN {
        let sent = Instant::now();
        if sent >= to {
            break;
        }
        match tokio::time::timeout(IO_TIMEOUT, round_trip(&mut stream, &request, &mut buf)).await {
            Ok(Ok(status)) => {
                let done = Instant::now();
                if status != 200 {
                    errors += 1;
                } else if done >= from && done <= to {
                    latencies.push((done - sent).as_nanos() as u64);
                }
            }
            Ok(Err(_)) | Err(_) => {
                errors += 1;
                break;
            }
        }
    }
    (latencies, errors)
}

/// Writes the request, reads one response (head, then `content-length` bytes of body); its
/// status.
async fn round_trip(
    stream: &mut tokio::net::TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> std::io::Result<u16> {
    use std::io::{Error, ErrorKind};
    stream.write_all(request).await?;
    buf.clear();
    let mut scanned: usize = 0;
    let (head_len, status, body_len) = loop {
        if buf.len() > MAX_RESPONSE {
            return Err(Error::new(ErrorKind::InvalidData, "response head too long"));
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        // Resume the search for the blank line a little before where the last one stopped.
        let from = scanned.saturating_sub(3);
        if let Some(i) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            let head_len = from + i + 4;
            let (status, body_len) = parse_head(&buf[..head_len])
                .ok_or_else(|| Error::new(ErrorKind::InvalidData, "malformed response head"))?;
            break (head_len, status, body_len);
        }
        scanned = buf.len();
    };
    let total = head_len + body_len;
    if total > MAX_RESPONSE {
        return Err(Error::new(ErrorKind::InvalidData, "response too long"));
    }
    while buf.len() < total {
        if stream.read_buf(buf).await? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
    }
    if buf.len() != total {
        // One request at a time: nothing may follow the response.
        return Err(Error::new(
            ErrorKind::InvalidData,
            "bytes after the response",
        ));
    }
    Ok(status)
}

/// The status and the `content-length` of a response head.
fn parse_head(head: &[u8]) -> Option<(u16, usize)> {
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let len = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())
            .flatten()
    })?;
    Some((status, len))
}

/// The `q` quantile of sorted nanoseconds, in microseconds.
fn percentile(sorted: &[u64], q: f64) -> f64 {
    common::percentile(sorted, q).map_or(f64::NAN, |ns| ns as f64 / 1e3)
}

// ----- reporting ------------------------------------------------------------------------------

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn runs() -> usize {
    env_usize("BENCH_RUNS", 7).clamp(3, 100)
}

/// Medians of a variant's rounds.
struct Summary {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    cpu_us: [f64; ROLES],
}

fn summarise(name: &str, variant: Variant, samples: &[Sample]) -> Summary {
    let list = |f: fn(&Sample) -> f64, prec: usize| {
        samples
            .iter()
            .map(|s| format!("{:.prec$}", f(s)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "info: {name} {}: req/s [{}] p50 us [{}] p99 us [{}]",
        variant.label(),
        list(|s| s.rps, 0),
        list(|s| s.p50_us, 1),
        list(|s| s.p99_us, 1)
    );
    Summary {
        rps: median(samples.iter().map(|s| s.rps).collect()),
        p50_us: median(samples.iter().map(|s| s.p50_us).collect()),
        p99_us: median(samples.iter().map(|s| s.p99_us).collect()),
        errors: samples.iter().map(|s| s.errors).sum(),
        cpu_us: std::array::from_fn(|i| median(samples.iter().map(|s| s.cpu_us[i]).collect())),
    }
}

/// Rounds of `variants`, alternating (the order reverses every round), after one warm-up round
/// of each; each variant's samples in `variants`' order.
fn measure(variants: &[Variant], load: &Load) -> Vec<Vec<Sample>> {
    for &v in variants {
        round(v, load);
    }
    let mut samples = vec![Vec::new(); variants.len()];
    for r in 0..runs() {
        let mut order: Vec<usize> = (0..variants.len()).collect();
        if r % 2 == 1 {
            order.reverse();
        }
        for i in order {
            samples[i].push(round(variants[i], load));
        }
    }
    samples
}

fn header(name: &str, load: &Load) {
    println!(
        "{name}: {} connections, {} server worker thread(s){}, {} rounds of {:.1} s after a \
         {:.1} s warm-up, alternating; medians of rounds",
        load.conns,
        server_workers(),
        if pinned() {
            " (pinned: server on CPU 0, System's thread and generator on CPU 1)"
        } else {
            ""
        },
        runs(),
        load.measure.as_secs_f64(),
        load.warmup.as_secs_f64()
    );
    println!(
        "  {:<44} {:>10} {:>9} {:>9} {:>7}   CPU us/request: {}",
        "variant",
        "req/s",
        "p50 us",
        "p99 us",
        "errors",
        ROLE_NAMES.join(" / ")
    );
}

fn row(variant: Variant, s: &Summary) {
    println!(
        "  {:<44} {:>10.0} {:>9.1} {:>9.1} {:>7}   {:.2} / {:.2} / {:.2}",
        variant.label(),
        s.rps,
        s.p50_us,
        s.p99_us,
        s.errors,
        s.cpu_us[0],
        s.cpu_us[1],
        s.cpu_us[2]
    );
}

/// The tree against bare actix-web with `GET /work?ms={ms}`.
fn figure(ms: u64) {
    let name = format!("web_work_ms{ms}");
    let load = Load::new(ms);
    let variants = [Variant::Tree, Variant::Bare];
    let samples = measure(&variants, &load);
    let tree = summarise(&name, Variant::Tree, &samples[0]);
    let bare = summarise(&name, Variant::Bare, &samples[1]);
    let pair_ratios: Vec<f64> = samples[0]
        .iter()
        .zip(&samples[1])
        .map(|(t, b)| t.rps / b.rps)
        .collect();
    header(&name, &load);
    row(Variant::Tree, &tree);
    row(Variant::Bare, &bare);
    let ratio = tree.rps / bare.rps;
    println!(
        "RESULT name={name}_rps tree={:.0}req/s actix={:.0}req/s ratio={ratio:.3} \
         target=>={TARGET} ratio_is=tree/actix better=higher pass={}",
        tree.rps,
        bare.rps,
        if ratio >= TARGET { "yes" } else { "no" }
    );
    for (q, t, b) in [
        ("p50", tree.p50_us, bare.p50_us),
        ("p99", tree.p99_us, bare.p99_us),
    ] {
        println!(
            "RESULT name={name}_{q} tree={t:.1}us actix={b:.1}us ratio={:.3} \
             ratio_is=tree/actix better=lower",
            t / b
        );
    }
    println!(
        "info: {name}: per-round tree/actix req/s ratios [{}], median {:.3}",
        pair_ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(" "),
        median(pair_ratios.clone())
    );
    if ms == 0 {
        println!(
            "target: tree/actix req/s = {ratio:.3} {} {TARGET}: {}",
            if ratio >= TARGET { ">=" } else { "<" },
            if ratio >= TARGET { "met" } else { "NOT met" }
        );
    }
    if tree.errors + bare.errors > 0 {
        println!(
            "warning: {name}: failed requests: tree {}, actix {}",
            tree.errors, bare.errors
        );
    }
}

/// What each part of the tree's path costs: the four combinations of server × address.
fn breakdown() {
    let name = "web_breakdown_ms0";
    let load = Load::new(0);
    let variants = [
        Variant::Bare,
        Variant::BareCounted,
        Variant::BareChildAddr,
        Variant::BareWide,
        Variant::Tree,
    ];
    let samples = measure(&variants, &load);
    let sums: Vec<Summary> = variants
        .iter()
        .zip(&samples)
        .map(|(&v, s)| summarise(name, v, s))
        .collect();
    header(name, &load);
    for (&v, s) in variants.iter().zip(&sums) {
        row(v, s);
    }
    for (&v, s) in variants.iter().zip(&sums).skip(1) {
        println!(
            "RESULT name={name} variant=\"{}\" ratio_to_actix={:.3} p99_ratio={:.3}",
            v.label().trim(),
            s.rps / sums[0].rps,
            s.p99_us / sums[0].p99_us
        );
    }
}

fn main() {
    // `cargo bench --bench web --features web -- NAME` runs the groups whose name contains NAME.
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .unwrap_or_default();
    // Threads inherit the mask: actix-server's accept thread (idle once the connections are
    // open) stays with the System's thread; its workers re-pin themselves in `app`.
    pin(Role::System);
    let t0 = Instant::now();
    let groups: [(&str, fn(), bool); 3] = [
        ("work_ms0", || figure(0), true),
        ("work_ms1", || figure(1), false),
        ("breakdown", breakdown, false),
    ];
    for (name, f, by_default) in groups {
        if (filter.is_empty() && by_default) || (!filter.is_empty() && name.contains(&filter)) {
            f();
        }
    }
    println!("info: bench wall time {:.1}s", t0.elapsed().as_secs_f64());
}
