//! A blocking worker's mailbox against actix's `SyncArbiter`, in one process and one run.
//!
//! `cargo bench --bench blocking` prints one line per figure, in the format of
//! `benches/shutdown.rs`:
//!
//! ```text
//! RESULT name=<name> tree=<v><unit> actix=<v><unit> ratio=<r> target=<t> ratio_is=<def> better=<dir> pass=<yes|no>
//! ```
//!
//! Figures: messages per second through one worker thread. 1,000,000 `do_send` of a `u64` whose
//! handler adds it to a sum, then wait until the last one is handled; the time runs from the
//! first send to the handler of the last message. Tree: a blocking worker (`BlockingAddr`, the
//! crossbeam mailbox with its gate and counts) in a started tree. actix: `SyncArbiter::start(1,
//! ..)` with the same handler (`Addr::do_send`, which goes through the arbiter's actor to its
//! sync thread).
//! 1. `blocking_do_send_1m`: sent from the System's task (the arbiter the tree runs on).
//! 2. `blocking_do_send_1m_from_thread`: sent from a plain OS thread.
//!
//! Each measurement gets a fresh actix `System` (and a fresh tree or `SyncArbiter`); one warm-up
//! of each side, then the tree and actix runs alternate (which goes first alternates too), and
//! each figure is the median of `BENCH_RUNS` runs (default 7, at least 5).
//! `cargo bench --bench blocking -- NAME` runs only the figures whose name contains NAME.

mod common;
use common::median;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_supervisor::{BlockingWorker, ChildSpec, Outcome, Tree};
use tokio::sync::Notify;

const MESSAGES: u64 = 1_000_000;

// ----- the two workers ------------------------------------------------------------------------

/// The tree's side: sums what it is sent, says when it has seen `target` messages.
struct Summer {
    sum: u64,
    seen: u64,
    target: u64,
    done: Arc<Notify>,
}

impl BlockingWorker for Summer {
    type Message = u64;
    type Reply = ();

    fn handle(&mut self, x: u64) {
        self.sum = self.sum.wrapping_add(x);
        self.seen += 1;
        if self.seen == self.target {
            std::hint::black_box(self.sum);
            self.done.notify_one(); // stores a permit if nobody waits yet
        }
    }
}

/// actix's side: the same work in a `SyncContext`.
struct SyncSummer {
    sum: u64,
    seen: u64,
    target: u64,
    done: Arc<Notify>,
}

impl Actor for SyncSummer {
    type Context = SyncContext<Self>;
}

#[derive(Message)]
#[rtype(result = "()")]
struct Add(u64);

impl Handler<Add> for SyncSummer {
    type Result = ();

    fn handle(&mut self, m: Add, _: &mut SyncContext<Self>) {
        self.sum = self.sum.wrapping_add(m.0);
        self.seen += 1;
        if self.seen == self.target {
            std::hint::black_box(self.sum);
            self.done.notify_one();
        }
    }
}

// ----- one measurement each -------------------------------------------------------------------

/// Messages per second through a blocking worker in a tree.
fn tree_run(n: u64, from_thread: bool) -> f64 {
    System::new().block_on(async move {
        let done = Arc::new(Notify::new());
        let d = done.clone();
        let spec = ChildSpec::blocking("summer", move || Summer {
            sum: 0,
            seen: 0,
            target: n,
            done: d.clone(),
        });
        let addr = spec.addr();
        let handle = Tree::builder("bench")
            .child(spec)
            .build()
            .expect("tree")
            .start()
            .await
            .expect("start");
        let t0 = Instant::now();
        let sender = from_thread.then(|| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                for i in 0..n {
                    if addr.do_send(i).is_err() {
                        panic!("refused");
                    }
                }
            })
        });
        if sender.is_none() {
            for i in 0..n {
                if addr.do_send(i).is_err() {
                    panic!("refused");
                }
            }
        }
        done.notified().await;
        let took = t0.elapsed();
        if let Some(s) = sender {
            s.join().expect("sender");
        }
        let report = handle.shutdown("bench over").await;
        let entry = report.find("summer").expect("in the report");
        assert_eq!(entry.outcome, Outcome::Drained, "{report}");
        n as f64 / took.as_secs_f64()
    })
}

/// Messages per second through `SyncArbiter::start(1, ..)`.
fn actix_run(n: u64, from_thread: bool) -> f64 {
    System::new().block_on(async move {
        let done = Arc::new(Notify::new());
        let d = done.clone();
        let addr = SyncArbiter::start(1, move || SyncSummer {
            sum: 0,
            seen: 0,
            target: n,
            done: d.clone(),
        });
        let t0 = Instant::now();
        let sender = from_thread.then(|| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                for i in 0..n {
                    addr.do_send(Add(i));
                }
            })
        });
        if sender.is_none() {
            for i in 0..n {
                addr.do_send(Add(i));
            }
        }
        done.notified().await;
        let took = t0.elapsed();
        if let Some(s) = sender {
            s.join().expect("sender");
        }
        drop(addr);
        // Let the arbiter's actor see its last address go, so its thread ends.
        actix_rt::time::sleep(Duration::from_millis(10)).await;
        n as f64 / took.as_secs_f64()
    })
}

// ----- reporting ------------------------------------------------------------------------------

fn runs() -> usize {
    std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7)
        .max(5)
}

fn figure(name: &str, from_thread: bool) {
    // Warm-up: page in the code and the allocator's arenas for both sides.
    tree_run(MESSAGES, from_thread);
    actix_run(MESSAGES, from_thread);
    let (mut tree, mut actix) = (Vec::new(), Vec::new());
    for i in 0..runs() {
        if i % 2 == 0 {
            tree.push(tree_run(MESSAGES, from_thread));
            actix.push(actix_run(MESSAGES, from_thread));
        } else {
            actix.push(actix_run(MESSAGES, from_thread));
            tree.push(tree_run(MESSAGES, from_thread));
        }
    }
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{:.2}", x / 1e6))
            .collect::<Vec<_>>()
            .join(" ")
    };
    eprintln!("{name}: tree runs (M msg/s): {}", fmt(&tree));
    eprintln!("{name}: actix runs (M msg/s): {}", fmt(&actix));
    let (tree, actix) = (median(tree) / 1e6, median(actix) / 1e6);
    let ratio = tree / actix;
    let target = 0.95;
    println!(
        "RESULT name={name} tree={tree:.2}Mmsg/s actix={actix:.2}Mmsg/s ratio={ratio:.3} \
         target=>={target} ratio_is=tree/actix better=higher pass={}",
        if ratio >= target { "yes" } else { "no" }
    );
}

fn main() {
    // `cargo bench -- NAME` runs only the figures whose name contains NAME.
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .unwrap_or_default();
    for (name, from_thread) in [
        ("blocking_do_send_1m", false),
        ("blocking_do_send_1m_from_thread", true),
    ] {
        if name.contains(&filter) {
            figure(name, from_thread);
        }
    }
}
