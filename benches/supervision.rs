//! What a restart costs: from a panic to the new instance having handled its first message,
//! against starting a fresh bare actix actor and having it handle its first message, in the same
//! run.
//!
//! `cargo bench --bench supervision` prints:
//!
//! ```text
//! RESULT name=restart_latency_p50 tree=<µs> actix=<µs> ratio=<tree/actix>
//! RESULT name=restart_latency_p99 tree=<µs> actix=<µs> ratio=<tree/actix>
//! RESULT name=panic_unwind_alone p50=<µs> p99=<µs>
//! ```
//!
//! The last line is for scale: a `catch_unwind` of a `panic!` on its own, which a restart
//! after a panic necessarily includes and the bare baseline does not.
//!
//! Tree: one worker under the root (one-for-one, intensity high enough never to give up). Each
//! round sends `Crash` (the handler notes the instant, then panics) and then `Ping` through the
//! worker's stable address; `Ping` waits in the kept mailbox and is the new instance's first
//! message, whose handler notes the instant. Latency: panic → `Ping` handled. It covers catching
//! the panic, the runtime's decision, the stop of the (already ended) child, the factory, the
//! new instance's `started` and its first message.
//!
//! Bare actix: `Actor::start()` on a fresh actor, then `send(Ping)`; latency: the call to
//! `start` → `Ping` handled.
//!
//! Rounds alternate between the two in blocks, `ROUNDS` (10,000) of each after a warm-up;
//! `BENCH_ROUNDS=N` changes the count. Both run on the System's arbiter.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_supervisor::{ChildSpec, Tree, Worker};
use parking_lot::Mutex;

const BLOCK: usize = 500;

/// Where the crashing handler leaves the instant it panicked.
type Slot = Arc<Mutex<Option<Instant>>>;

struct Crashy {
    slot: Slot,
}

impl Actor for Crashy {
    type Context = Context<Self>;
}

impl Worker for Crashy {}

#[derive(Message)]
#[rtype(result = "()")]
struct Crash;

impl Handler<Crash> for Crashy {
    type Result = ();
    fn handle(&mut self, _: Crash, _: &mut Context<Self>) {
        *self.slot.lock() = Some(Instant::now());
        panic!("bench crash");
    }
}

/// Answers with the instant it was handled.
#[derive(Message)]
#[rtype(result = "Instant")]
struct Ping;

impl Handler<Ping> for Crashy {
    type Result = MessageResult<Ping>;
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) -> Self::Result {
        MessageResult(Instant::now())
    }
}

struct Bare;

impl Actor for Bare {
    type Context = Context<Self>;
}

impl Handler<Ping> for Bare {
    type Result = MessageResult<Ping>;
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) -> Self::Result {
        MessageResult(Instant::now())
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    common::percentile(sorted, p).unwrap_or_default()
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    // 10,000 injected panics would each print a message and a backtrace.
    std::panic::set_hook(Box::new(|_| {}));
    let sys = System::new();
    let (tree_lat, bare_lat) = sys.block_on(async move {
        let slot: Slot = Arc::default();
        let factory_slot = slot.clone();
        let spec = ChildSpec::worker("crashy", move || Crashy {
            slot: factory_slot.clone(),
        });
        let addr = spec.addr();
        let handle = Tree::builder("bench")
            .intensity(u32::MAX, Duration::from_secs(1))
            .child(spec)
            .build()
            .expect("valid tree")
            .start()
            .await
            .expect("started");

        let mut tree_lat = Vec::with_capacity(rounds);
        let mut bare_lat = Vec::with_capacity(rounds);
        let mut done = 0;
        let mut first = true;
        while done < rounds {
            let n = BLOCK.min(rounds - done);
            for _ in 0..n {
                addr.do_send(Crash).expect("the mailbox stays open");
                let handled = addr.send(Ping).await.expect("the new instance answers");
                let crashed = slot.lock().take().expect("the crash was noted");
                if !first {
                    tree_lat.push(handled - crashed);
                }
            }
            for _ in 0..n {
                let t0 = Instant::now();
                let bare = Bare.start();
                let handled = bare.send(Ping).await.expect("a fresh actor answers");
                if !first {
                    bare_lat.push(handled - t0);
                }
            }
            if first {
                first = false; // the first block warms up both sides
                continue;
            }
            done += n;
        }
        let report = handle.shutdown("bench over").await;
        let restarts = report.find("crashy").map_or(0, |c| c.restarts);
        eprintln!(
            "tree: {restarts} restarts, {} dropped (one per panic)",
            report.dropped()
        );
        (tree_lat, bare_lat)
    });
    // For scale: what catching one panic costs on its own (unwinding is most of a restart).
    let mut unwind: Vec<Duration> = (0..rounds.min(10_000))
        .map(|_| {
            let t0 = Instant::now();
            let _ = std::panic::catch_unwind(|| panic!("bench unwind"));
            t0.elapsed()
        })
        .collect();
    unwind.sort();
    let _ = std::panic::take_hook();
    let mut tree_lat = tree_lat;
    let mut bare_lat = bare_lat;
    tree_lat.sort();
    bare_lat.sort();
    for (name, p) in [("p50", 0.50), ("p99", 0.99)] {
        let t = percentile(&tree_lat, p);
        let a = percentile(&bare_lat, p);
        println!(
            "RESULT name=restart_latency_{name} tree={:.1}µs actix={:.1}µs ratio={:.2} rounds={}",
            micros(t),
            micros(a),
            t.as_secs_f64() / a.as_secs_f64(),
            tree_lat.len()
        );
    }
    println!(
        "RESULT name=panic_unwind_alone p50={:.1}µs p99={:.1}µs",
        micros(percentile(&unwind, 0.50)),
        micros(percentile(&unwind, 0.99))
    );
}
