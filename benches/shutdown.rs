//! The tree against bare actix doing the same work, in one process and one run.
//!
//! `cargo bench --bench shutdown` prints one line per figure:
//!
//! ```text
//! RESULT name=<name> tree=<v><unit> actix=<v><unit> ratio=<r> target=<t> ratio_is=<def> better=<dir> pass=<yes|no>
//! ```
//!
//! Figures (each: one warm-up, then the median of several runs; tree and actix runs alternate;
//! in figures 1-2 each iteration runs actix (countdown), the tree, then actix (`send`/await)):
//! 1. `shutdown_flat_100k`: `handle.shutdown(..)` → report, 100,000 idle workers under one
//!    supervisor; bare actix: 100,000 actors each sent `Halt` (acks through a shared countdown,
//!    then `ctx.stop()`), time until the last ack.
//!    `shutdown_flat_100k_vs_send_await`: the same tree runs against a second bare actix
//!    baseline, measured in the same iterations: `addr.send(Stop)` to each of the 100,000 actors
//!    (the handler calls `ctx.stop()` and returns `()`), then every response future awaited;
//!    time until the last response.
//! 2. `shutdown_10ary_5deep_100k`: the same with a 10-ary tree of supervisors 5 levels deep
//!    (10 → 100 → 1,000 → 10,000 supervisors, 100,000 leaf workers), against the same flat bare
//!    actix figure (bare actix has no hierarchy to stop: the work — 100k stop/ack — is the same).
//!    `shutdown_10ary_5deep_100k_vs_send_await`: the same deep tree runs against the
//!    `send`/await baseline.
//! 3. `start_flat_100k`: `tree.start().await` for the flat tree (building the specs and the tree
//!    is not counted, and is printed on its own); bare actix: 100,000 `Actor::start()` until every
//!    `started` has run.
//! 4. `rss_per_idle_worker`: RSS delta over 100,000 idle started workers / 100,000, each
//!    measurement in a fresh child process (this binary re-executed with `--mem-child`).
//! 5. `do_send_throughput_*`: 2,000,000 `do_send` to one worker (`ChildAddr`) vs one actor
//!    (`Addr`), from another OS thread and from the System task itself, until the handler has
//!    counted them all.
//! 6. `drain_1m_queued`: the worker, on an arbiter of its own, is blocked inside a handler;
//!    1,000,000 messages are queued behind the block, then `handle.shutdown(..)` (the runtime
//!    queues `Stopping` behind the backlog), then the block is released; time from the shutdown
//!    call to the report. Bare actix: the same actor on its own arbiter, blocked the same way,
//!    the same backlog then `Halt`; time from the release to its ack. Ratio is
//!    actix_time / tree_time.
//!
//! Both sides run on one arbiter (the System's), except the sender thread of figure 5 and the
//! worker's own arbiter in figure 6. Each measurement gets a fresh actix `System`.
//!
//! `cargo bench --bench shutdown -- GROUP` runs one group (`flat`, `deep`, `memory`,
//! `throughput`, `drain`); `BENCH_RUNS=N` sets the number of measured runs (default 7).

mod common;
use common::median;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_supervisor::{
    ChildSpec, Outcome, Placement, ShutdownReport, SupervisorSpec, Tree, Worker,
};
use tokio::sync::{oneshot, Notify};

const WORKERS: usize = 100_000;
const MESSAGES: u64 = 2_000_000;
const BACKLOG: u64 = 1_000_000;

// ----- actors -------------------------------------------------------------------------------

/// Counts down to zero and wakes the one waiter.
struct Countdown {
    left: AtomicUsize,
    done: Notify,
}

impl Countdown {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Countdown {
            left: AtomicUsize::new(n),
            done: Notify::new(),
        })
    }

    fn hit(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one(); // stores a permit if nobody waits yet
        }
    }

    async fn wait(&self) {
        self.done.notified().await;
    }
}

/// An idle actor. Bare actix gives it both countdowns; the tree gives it none (the tree signals
/// starts and acknowledgements itself), so both sides have the same actor size.
#[derive(Default)]
struct Idle {
    on_start: Option<Arc<Countdown>>,
    on_halt: Option<Arc<Countdown>>,
}

impl Actor for Idle {
    type Context = Context<Self>;
    fn started(&mut self, _: &mut Context<Self>) {
        if let Some(c) = &self.on_start {
            c.hit();
        }
    }
}

impl Worker for Idle {}

/// Bare actix's stop message: ack, then stop.
#[derive(Message)]
#[rtype(result = "()")]
struct Halt;

impl Handler<Halt> for Idle {
    type Result = ();
    fn handle(&mut self, _: Halt, ctx: &mut Context<Self>) {
        if let Some(c) = &self.on_halt {
            c.hit();
        }
        ctx.stop();
    }
}

/// The stop message as an actix user would typically write it: `addr.send(Stop)` and await the
/// response, which is the ack. No shared state: the ack is the `()` reply itself.
#[derive(Message)]
#[rtype(result = "()")]
struct Stop;

impl Handler<Stop> for Idle {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// Counts `Inc`s; signals when it reaches `target`; on `Halt` (bare) or when drained (tree)
/// publishes its count and signals `halted`.
struct Counter {
    n: u64,
    target: u64,
    done: Option<oneshot::Sender<()>>,
    halted: Option<oneshot::Sender<u64>>,
    out: Arc<AtomicU64>,
}

impl Counter {
    fn new(target: u64, done: Option<oneshot::Sender<()>>, out: Arc<AtomicU64>) -> Self {
        Counter {
            n: 0,
            target,
            done,
            halted: None,
            out,
        }
    }
}

impl Actor for Counter {
    type Context = Context<Self>;
}

impl Worker for Counter {
    fn on_drained(&mut self, _: &mut Context<Self>) -> Option<actix_supervisor::HookFuture<Self>> {
        self.out.store(self.n, Ordering::Release);
        None
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Inc;

impl Handler<Inc> for Counter {
    type Result = ();
    fn handle(&mut self, _: Inc, _: &mut Context<Self>) {
        self.n += 1;
        if self.n == self.target {
            if let Some(tx) = self.done.take() {
                let _ = tx.send(());
            }
        }
    }
}

impl Handler<Halt> for Counter {
    type Result = ();
    fn handle(&mut self, _: Halt, ctx: &mut Context<Self>) {
        self.out.store(self.n, Ordering::Release);
        if let Some(tx) = self.halted.take() {
            let _ = tx.send(self.n);
        }
        ctx.stop();
    }
}

// ----- helpers ------------------------------------------------------------------------------

/// Runs `f` in a fresh actix System and returns its output.
fn in_system<F, Fut, T>(f: F) -> T
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let sys = System::new();
    let out = sys.block_on(async move {
        let out = f().await;
        // Let stopped actors be dropped before the System goes.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        out
    });
    drop(sys);
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn fmt_list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.1}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Clone, Copy)]
enum Better {
    /// A time or a size: ratio = tree/actix, lower is better.
    Lower,
    /// A throughput: ratio = tree/actix, higher is better.
    Higher,
    /// A time where the target is stated as actix/tree, higher is better.
    HigherInverse,
}

fn result(name: &str, tree: f64, actix: f64, unit: &str, better: Better, target: f64) {
    let (ratio, def, dir, op, pass) = match better {
        Better::Lower => {
            let r = tree / actix;
            (r, "tree/actix", "lower", "<=", r <= target)
        }
        Better::Higher => {
            let r = tree / actix;
            (r, "tree/actix", "higher", ">=", r >= target)
        }
        Better::HigherInverse => {
            let r = actix / tree;
            (r, "actix/tree", "higher", ">=", r >= target)
        }
    };
    let prec = if unit == "B" { 0 } else { 1 };
    println!(
        "RESULT name={name} tree={tree:.prec$}{unit} actix={actix:.prec$}{unit} ratio={ratio:.3} \
         target={op}{target} ratio_is={def} better={dir} pass={}",
        if pass { "yes" } else { "no" }
    );
}

fn runs() -> usize {
    std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7)
}

// ----- figures 1-3: start and shutdown of 100k workers ---------------------------------------

fn flat_tree(n: usize) -> Tree {
    let sup = SupervisorSpec::new("sup")
        .children((0..n).map(|i| ChildSpec::worker(format!("w{i}"), Idle::default)));
    Tree::builder("bench")
        .child(sup)
        .build()
        .expect("flat tree")
}

/// `fanout`-ary supervisors `depth` levels deep, with `fanout` workers under each deepest one.
fn deep_tree(fanout: usize, depth: usize) -> Tree {
    fn level(fanout: usize, depth: usize) -> Vec<ChildSpec> {
        (0..fanout)
            .map(|i| {
                if depth == 0 {
                    ChildSpec::worker(format!("w{i}"), Idle::default).into()
                } else {
                    SupervisorSpec::new(format!("s{i}"))
                        .children(level(fanout, depth - 1))
                        .into()
                }
            })
            .collect()
    }
    Tree::builder("bench")
        .children(level(fanout, depth))
        .build()
        .expect("deep tree")
}

fn check_report(r: &ShutdownReport, workers: usize) {
    let drained = r
        .iter()
        .filter(|c| c.children.is_empty() && c.outcome == Outcome::Drained)
        .count();
    assert_eq!(r.exit_code(), 0, "unclean shutdown");
    assert_eq!(drained, workers, "not every worker drained");
}

/// (start, shutdown) of a tree, in a fresh System.
fn tree_run(tree: Tree, workers: usize) -> (Duration, Duration) {
    in_system(|| async move {
        let t0 = Instant::now();
        let handle = tree.start().await.expect("start");
        let start = t0.elapsed();
        let t1 = Instant::now();
        let report = handle.shutdown("bench").await;
        let stop = t1.elapsed();
        check_report(&report, workers);
        (start, stop)
    })
}

/// How bare actix tells its actors to stop and collects their acks.
#[derive(Clone, Copy)]
enum Ack {
    /// `do_send(Halt)` to each; each handler hits one shared atomic countdown: the cheapest
    /// possible fan-in.
    Countdown,
    /// `send(Stop)` to each, keeping every response future, then awaiting them all: what an
    /// actix user would typically write.
    SendAwait,
}

/// (start, stop) of `n` bare actix actors, in a fresh System.
fn actix_run(n: usize, ack: Ack) -> (Duration, Duration) {
    in_system(|| async move {
        let started = Countdown::new(n);
        let halted = Countdown::new(n);
        let on_halt = match ack {
            Ack::Countdown => Some(halted.clone()),
            Ack::SendAwait => None,
        };
        let t0 = Instant::now();
        let addrs: Vec<Addr<Idle>> = (0..n)
            .map(|_| {
                Idle {
                    on_start: Some(started.clone()),
                    on_halt: on_halt.clone(),
                }
                .start()
            })
            .collect();
        started.wait().await;
        let start = t0.elapsed();
        let t1 = Instant::now();
        match ack {
            Ack::Countdown => {
                for a in &addrs {
                    a.do_send(Halt);
                }
                halted.wait().await;
            }
            Ack::SendAwait => {
                // `send` queues the message at once (the mailboxes are empty, so none is full);
                // the futures only carry the replies. futures-util is in the dependency tree
                // (through actix) but not a dependency of this crate, so no `join_all`:
                // awaiting them in order also completes when the last reply is in. (Tried
                // outside this crate with futures-util 0.3.34 on this machine: `join_all` over
                // the same 100k replies was no faster, about 5-15% slower, so this loop is the
                // harder baseline of the two.)
                let replies: Vec<_> = addrs.iter().map(|a| a.send(Stop)).collect();
                for r in replies {
                    r.await.expect("stop acknowledged");
                }
            }
        }
        let stop = t1.elapsed();
        drop(addrs);
        (start, stop)
    })
}

/// Runs of the flat tree: a 100k flat build is slow while `Graph::build` checks names
/// quadratically, so the number of runs adapts to keep the bench within a few minutes.
fn flat_runs(build: Duration) -> usize {
    if build > Duration::from_secs(10) {
        2
    } else {
        runs()
    }
}

fn figure_flat() {
    // Figures 1 and 3. The first tree build doubles as the warm-up's.
    let mut build = Vec::new();
    let (mut ts, mut td, mut as_, mut ad) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut sd = Vec::new();
    let mut n = runs();
    let mut i = 0;
    while i <= n {
        let (a_start, a_stop) = actix_run(WORKERS, Ack::Countdown);
        let t = Instant::now();
        let tree = flat_tree(WORKERS);
        let b = t.elapsed();
        build.push(ms(b));
        if i == 0 {
            n = flat_runs(b);
            if n < runs() {
                println!(
                    "info: building a flat tree of 100k took {:.1}s: {n} runs instead of {}",
                    b.as_secs_f64(),
                    runs()
                );
            }
        }
        let (t_start, t_stop) = tree_run(tree, WORKERS);
        // The second baseline goes after the tree run, so that the countdown baseline and the
        // tree still run back to back exactly as before it was added.
        let (_, s_stop) = actix_run(WORKERS, Ack::SendAwait);
        if i > 0 {
            as_.push(ms(a_start));
            ad.push(ms(a_stop));
            sd.push(ms(s_stop));
            ts.push(ms(t_start));
            td.push(ms(t_stop));
        }
        i += 1;
    }
    println!(
        "info: flat 100k runs (ms): tree build [{}] start [{}] shutdown [{}]; actix start [{}] stop [{}]",
        fmt_list(&build),
        fmt_list(&ts),
        fmt_list(&td),
        fmt_list(&as_),
        fmt_list(&ad)
    );
    println!(
        "info: flat 100k runs (ms): actix send(Stop)+await stop [{}]",
        fmt_list(&sd)
    );
    let tree_stop = median(td);
    result(
        "shutdown_flat_100k",
        tree_stop,
        median(ad),
        "ms",
        Better::Lower,
        1.2,
    );
    // The same tree runs against the second baseline, measured in the same iterations: 100k
    // `addr.send(Stop)` (the handler calls `ctx.stop()`), every response future kept and then
    // awaited; time until the last reply. The line above compares with the cheapest possible
    // fan-in (a shared atomic countdown, no reply channel); this one with the way an actix user
    // would typically write "send each actor a stop message and collect an ack", which pays a
    // oneshot reply channel per actor. Both are printed so the ratio can be read against either.
    result(
        "shutdown_flat_100k_vs_send_await",
        tree_stop,
        median(sd),
        "ms",
        Better::Lower,
        1.2,
    );
    result(
        "start_flat_100k",
        median(ts),
        median(as_),
        "ms",
        Better::Lower,
        1.5,
    );
}

fn figure_deep() {
    // Figure 2, against bare actix (flat: the same 100k stop/ack) measured alongside.
    let n = runs();
    let (mut dts, mut dtd, mut dad, mut dbuild) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut dsd = Vec::new();
    for i in 0..=n {
        let (_, a_stop) = actix_run(WORKERS, Ack::Countdown);
        let t = Instant::now();
        let tree = deep_tree(10, 4);
        let b = t.elapsed();
        let (t_start, t_stop) = tree_run(tree, WORKERS);
        // After the tree run, as in `figure_flat`.
        let (_, s_stop) = actix_run(WORKERS, Ack::SendAwait);
        if i == 0 {
            continue;
        }
        dbuild.push(ms(b));
        dad.push(ms(a_stop));
        dsd.push(ms(s_stop));
        dts.push(ms(t_start));
        dtd.push(ms(t_stop));
    }
    println!(
        "info: 10-ary 5-deep runs (ms): tree build [{}] start [{}] shutdown [{}]; actix (flat) stop [{}]",
        fmt_list(&dbuild),
        fmt_list(&dts),
        fmt_list(&dtd),
        fmt_list(&dad)
    );
    println!(
        "info: 10-ary 5-deep runs (ms): actix (flat) send(Stop)+await stop [{}]",
        fmt_list(&dsd)
    );
    let tree_stop = median(dtd);
    result(
        "shutdown_10ary_5deep_100k",
        tree_stop,
        median(dad),
        "ms",
        Better::Lower,
        1.2,
    );
    // The same deep-tree runs against the `send(Stop)` + await baseline (see
    // `figure_flat`): the line above is against the cheapest possible fan-in (an atomic
    // countdown), this one against the way an actix user would typically collect 100k acks.
    result(
        "shutdown_10ary_5deep_100k_vs_send_await",
        tree_stop,
        median(dsd),
        "ms",
        Better::Lower,
        1.2,
    );
}

// ----- figure 4: memory, one child process per measurement ----------------------------------

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let resident: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("statm resident");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    resident * page
}

/// Bytes the allocator has handed out and not taken back.
fn heap_in_use() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let mi = unsafe { libc::mallinfo2() };
    (mi.uordblks + mi.hblkhd) as u64
}

/// Child process: start `WORKERS` idle actors the `kind` way, print the deltas per actor.
fn mem_child(kind: &str) -> ! {
    let kind = kind.to_owned();
    let sys = System::new();
    let (rss, heap, build) = sys.block_on(async move {
        let mut build = 0.0;
        tokio::task::yield_now().await;
        let (rss0, heap0) = (rss_bytes(), heap_in_use());
        let keep: Box<dyn std::any::Any> = match kind.as_str() {
            "tree" => {
                let t = Instant::now();
                let tree = flat_tree(WORKERS);
                build = t.elapsed().as_secs_f64();
                let handle = tree.start().await.expect("start");
                Box::new(handle)
            }
            "actix" => {
                let started = Countdown::new(WORKERS);
                let addrs: Vec<Addr<Idle>> = (0..WORKERS)
                    .map(|_| {
                        Idle {
                            on_start: Some(started.clone()),
                            on_halt: None,
                        }
                        .start()
                    })
                    .collect();
                started.wait().await;
                Box::new(addrs)
            }
            other => panic!("unknown kind {other}"),
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (rss1, heap1) = (rss_bytes(), heap_in_use());
        std::mem::forget(keep);
        (
            rss1.saturating_sub(rss0) as f64 / WORKERS as f64,
            heap1.saturating_sub(heap0) as f64 / WORKERS as f64,
            build,
        )
    });
    println!("MEM rss={rss} heap={heap} build={build}");
    std::process::exit(0);
}

/// (rss, heap, build seconds) per worker, from a child process.
fn mem_measure(kind: &str) -> (f64, f64, f64) {
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .args(["--mem-child", kind])
        .output()
        .expect("run child");
    assert!(out.status.success(), "memory child failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("MEM "))
        .expect("MEM line");
    let field = |key: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .expect("MEM field")
    };
    (field("rss="), field("heap="), field("build="))
}

fn figure_memory() {
    let n = runs().min(3);
    let (mut tr, mut th, mut ar, mut ah) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let (r, h, _) = mem_measure("actix");
        ar.push(r);
        ah.push(h);
        let (r, h, build) = mem_measure("tree");
        tr.push(r);
        th.push(h);
        if build > 10.0 {
            println!(
                "info: building a flat tree of 100k took {build:.1}s: one memory measurement each"
            );
            break;
        }
    }
    println!(
        "info: per-worker bytes: tree rss [{}] heap [{}]; actix rss [{}] heap [{}]",
        fmt_list(&tr),
        fmt_list(&th),
        fmt_list(&ar),
        fmt_list(&ah)
    );
    result(
        "rss_per_idle_worker",
        median(tr),
        median(ar),
        "B",
        Better::Lower,
        1.5,
    );
}

// ----- figure 5: do_send throughput ---------------------------------------------------------

/// Who sends.
#[derive(Clone, Copy, PartialEq)]
enum Src {
    Thread,
    SameTask,
}

fn tree_throughput(from: Src) -> Duration {
    let (tx, rx) = oneshot::channel();
    let slot = Mutex::new(Some(tx));
    let out = Arc::new(AtomicU64::new(0));
    let spec = ChildSpec::worker("counter", move || {
        Counter::new(MESSAGES, slot.lock().unwrap().take(), out.clone())
    });
    let addr = spec.addr();
    let tree = Tree::builder("bench").child(spec).build().expect("tree");
    in_system(|| async move {
        let handle = tree.start().await.expect("start");
        let t0 = Instant::now();
        let sender = match from {
            Src::Thread => Some(std::thread::spawn(move || {
                for _ in 0..MESSAGES {
                    addr.do_send(Inc).expect("accepted");
                }
            })),
            Src::SameTask => {
                for _ in 0..MESSAGES {
                    addr.do_send(Inc).expect("accepted");
                }
                None
            }
        };
        rx.await.expect("done");
        let took = t0.elapsed();
        if let Some(s) = sender {
            s.join().expect("sender");
        }
        let report = handle.shutdown("bench").await;
        assert_eq!(report.exit_code(), 0);
        took
    })
}

fn actix_throughput(from: Src) -> Duration {
    in_system(|| async move {
        let (tx, rx) = oneshot::channel();
        let addr = Counter::new(MESSAGES, Some(tx), Arc::new(AtomicU64::new(0))).start();
        let t0 = Instant::now();
        let sender = match from {
            Src::Thread => {
                let addr = addr.clone();
                Some(std::thread::spawn(move || {
                    for _ in 0..MESSAGES {
                        addr.do_send(Inc);
                    }
                }))
            }
            Src::SameTask => {
                for _ in 0..MESSAGES {
                    addr.do_send(Inc);
                }
                None
            }
        };
        rx.await.expect("done");
        let took = t0.elapsed();
        if let Some(s) = sender {
            s.join().expect("sender");
        }
        addr.do_send(Halt);
        took
    })
}

fn figure_throughput() {
    let n = runs();
    for (from, name) in [
        (Src::Thread, "do_send_throughput_other_thread_2m"),
        (Src::SameTask, "do_send_throughput_same_task_2m"),
    ] {
        let (mut t, mut a) = (Vec::new(), Vec::new());
        for i in 0..=n {
            let ad = actix_throughput(from);
            let td = tree_throughput(from);
            if i > 0 {
                a.push(MESSAGES as f64 / ad.as_secs_f64() / 1e6);
                t.push(MESSAGES as f64 / td.as_secs_f64() / 1e6);
            }
        }
        println!(
            "info: {name} (Mmsg/s): tree [{}] actix [{}]",
            fmt_list(&t),
            fmt_list(&a)
        );
        result(name, median(t), median(a), "Mmsg/s", Better::Higher, 0.95);
    }
}

// ----- figure 6: draining a backlog of 1M ---------------------------------------------------

/// Blocks the worker's arbiter thread until released, so that a backlog builds up behind it.
#[derive(Message)]
#[rtype(result = "()")]
struct Block {
    release: std::sync::mpsc::Receiver<()>,
    entered: Arc<AtomicBool>,
}

impl Handler<Block> for Counter {
    type Result = ();
    fn handle(&mut self, b: Block, _: &mut Context<Self>) {
        b.entered.store(true, Ordering::Release);
        let _ = b.release.recv();
    }
}

/// A blocker, its release, and a wait until the actor is inside it.
fn blocker() -> (Block, std::sync::mpsc::Sender<()>, Arc<AtomicBool>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let entered = Arc::new(AtomicBool::new(false));
    let block = Block {
        release: rx,
        entered: entered.clone(),
    };
    (block, tx, entered)
}

async fn until_blocked(entered: &AtomicBool) {
    while !entered.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The worker runs on an arbiter of its own, blocked; the backlog and `Stopping` queue up behind
/// the block; the clock starts at `handle.shutdown(..)`, the block is released once the runtime
/// (on this thread) has told the worker, and stops at the report.
fn tree_drain() -> (Duration, u64, u64) {
    let arbiter = Arbiter::new();
    let out = Arc::new(AtomicU64::new(0));
    let out2 = out.clone();
    let spec = ChildSpec::worker("counter", move || {
        Counter::new(u64::MAX, None, out2.clone())
    })
    .placement(Placement::Arbiter(arbiter.handle()));
    let addr = spec.addr();
    let tree = Tree::builder("bench").child(spec).build().expect("tree");
    let r = in_system(|| async move {
        let handle = tree.start().await.expect("start");
        let (block, release, entered) = blocker();
        addr.do_send(block).expect("accepted");
        until_blocked(&entered).await;
        for _ in 0..BACKLOG {
            addr.do_send(Inc).expect("accepted");
        }
        let t0 = Instant::now();
        let report = handle.shutdown("bench");
        // Let the runtime (on this thread) queue `Stopping` behind the backlog.
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        release.send(()).expect("release");
        let report = report.await;
        let took = t0.elapsed();
        assert_eq!(report.exit_code(), 0);
        let drained = report.find("counter").expect("counter in report").drained;
        (took, out.load(Ordering::Acquire), drained)
    });
    arbiter.stop();
    let _ = arbiter.join();
    r
}

/// The same backlog behind the same block, then `Halt`; the clock stops at its ack.
fn actix_drain() -> (Duration, u64) {
    in_system(|| async move {
        let arbiter = Arbiter::new();
        let (tx, rx) = oneshot::channel();
        let addr = Counter::start_in_arbiter(&arbiter.handle(), move |_| {
            let mut c = Counter::new(u64::MAX, None, Arc::new(AtomicU64::new(0)));
            c.halted = Some(tx);
            c
        });
        let (block, release, entered) = blocker();
        addr.do_send(block);
        until_blocked(&entered).await;
        for _ in 0..BACKLOG {
            addr.do_send(Inc);
        }
        addr.do_send(Halt);
        let t0 = Instant::now();
        release.send(()).expect("release");
        let handled = rx.await.expect("halted");
        let took = t0.elapsed();
        arbiter.stop();
        let _ = arbiter.join();
        (took, handled)
    })
}

fn figure_drain() {
    let n = runs();
    let (mut t, mut a) = (Vec::new(), Vec::new());
    let mut reported = Vec::new();
    for i in 0..=n {
        let (ad, a_handled) = actix_drain();
        assert_eq!(a_handled, BACKLOG, "bare actix did not handle the backlog");
        let (td, t_handled, t_reported) = tree_drain();
        assert_eq!(
            t_handled, BACKLOG,
            "the tree's worker did not handle the backlog"
        );
        if i > 0 {
            a.push(ms(ad));
            t.push(ms(td));
            reported.push(t_reported);
        }
    }
    // The blocking message completes after the tell, so it counts as drained too.
    let expected = BACKLOG + 1;
    println!(
        "info: drain 1M (ms): tree [{}] actix [{}]; the report's `drained` for the worker: {:?} (expected {expected}: the backlog and the blocker)",
        fmt_list(&t),
        fmt_list(&a),
        reported
    );
    if reported.iter().any(|&d| d != expected) {
        println!("warning: the report's `drained` differs from {expected}");
    }
    result(
        "drain_1m_queued",
        median(t),
        median(a),
        "ms",
        Better::HigherInverse,
        0.9,
    );
}

// ----- main ---------------------------------------------------------------------------------

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--mem-child") {
        mem_child(args.get(i + 1).map(String::as_str).unwrap_or("tree"));
    }
    // `cargo bench -- NAME` runs only the figures whose group name contains NAME.
    let filter = args
        .iter()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_default();
    let t0 = Instant::now();
    let groups: [(&str, fn()); 5] = [
        ("flat", figure_flat),
        ("deep", figure_deep),
        ("memory", figure_memory),
        ("throughput", figure_throughput),
        ("drain", figure_drain),
    ];
    for (name, f) in groups {
        if name.contains(&filter) {
            f();
        }
    }
    println!("info: bench wall time {:.1}s", t0.elapsed().as_secs_f64());
}
