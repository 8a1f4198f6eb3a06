//! Library bugs found by the property test (`tests/protocol_props.rs`), each reduced to a small
//! deterministic case that states the promise it broke. All are fixed; these keep them fixed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_supervisor::{
    ChildAddr, ChildSpec, Outcome, Restart, Strategy, SupervisorSpec, Tree, Worker, WorkerSpec,
};

/// A worker that counts what it handles and panics on `Boom`.
struct Counter {
    handled: Arc<AtomicU64>,
}

impl Actor for Counter {
    type Context = Context<Self>;
}

impl Worker for Counter {}

#[derive(Message)]
#[rtype(result = "()")]
struct Msg;

impl Handler<Msg> for Counter {
    type Result = ();
    fn handle(&mut self, _: Msg, _: &mut Context<Self>) {
        self.handled.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Boom;

impl Handler<Boom> for Counter {
    type Result = ();
    fn handle(&mut self, _: Boom, _: &mut Context<Self>) {
        panic!("boom (injected)");
    }
}

/// A worker spec, its address, and its count of messages handled (over all its instances).
fn counter(name: &str) -> (WorkerSpec<Counter>, ChildAddr<Counter>, Arc<AtomicU64>) {
    let handled = Arc::new(AtomicU64::new(0));
    let h = handled.clone();
    let spec = ChildSpec::worker(name, move || Counter { handled: h.clone() });
    let addr = spec.addr();
    (spec, addr, handled)
}

fn quiet_injected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let injected = info
                .payload()
                .downcast_ref::<&str>()
                .is_some_and(|m| m.ends_with("(injected)"));
            if !injected {
                default(info);
            }
        }));
    });
}

const LONG: Duration = Duration::from_secs(600);

/// OTP starts a restarted supervisor afresh, with an empty restart history. Here a supervisor
/// restarted by its parent keeps the restarts of its previous life: at its first failure after
/// the restart it gives up again, with a reason counting restarts it did not make.
#[actix_rt::test]
async fn a_restarted_supervisor_starts_with_a_fresh_restart_history() {
    quiet_injected_panics();
    let (a, a_addr, _) = counter("a");
    let handle = Tree::builder("history")
        .child(SupervisorSpec::new("s").intensity(1, LONG).child(a))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    // 1st: `s` restarts `a` (1 of 1 allowed). 2nd: one too many, `s` gives up and the root
    // restarts it. 3rd: the new `s` has made no restart yet, so it restarts `a`.
    for _ in 0..3 {
        a_addr.do_send(Boom).unwrap();
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    let report = handle.shutdown("end").await;
    let s = report.find("s").unwrap();
    assert_eq!(
        s.restarts, 1,
        "`s` gave up again at its first failure after its restart:\n{report}"
    );
    assert_eq!(report.find("s/a").unwrap().restarts, 3);
}

/// When a supervisor gives up and the root gives up in turn, the supervisor's children keep
/// their mailboxes open after the tree has shut down — the one whose panic made it give up as
/// well as those it drained: a send is accepted, never handled, and (for a child that had not
/// failed before) the report says nothing was dropped. (The drained ones are also reported as
/// `drained`, told and acknowledged at 0 ms, although the shutdown never reached them.)
#[actix_rt::test]
async fn children_of_a_supervisor_that_gave_up_refuse_messages_once_the_tree_is_down() {
    quiet_injected_panics();
    let (a, a_addr, _) = counter("a");
    let (b, b_addr, b_handled) = counter("b");
    let handle = Tree::builder("escalation")
        .intensity(0, LONG)
        .child(
            SupervisorSpec::new("s")
                .intensity(0, LONG)
                .child(a)
                .child(b),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    a_addr.do_send(Boom).unwrap();
    let report = handle.wait().await;
    assert!(report
        .reason
        .contains("restart intensity of the root exceeded"));
    assert!(
        !a_addr.connected(),
        "s/a (it panicked) accepts messages after the report:\n{report}"
    );
    let accepted = b_addr.do_send(Msg).is_ok();
    actix_rt::time::sleep(Duration::from_millis(50)).await;
    let b = report.find("s/b").unwrap();
    assert!(
        !accepted && !b_addr.connected(),
        "s/b accepted a message after the report (handled: {}, reported dropped: {}):\n{report}",
        b_handled.load(Ordering::SeqCst),
        b.dropped
    );
}

/// A temporary child stopped for a sibling's restart is never started again, but its mailbox
/// stays open until the restart starts the others (here: through the backoff). What it accepts
/// meanwhile is never handled, and the report counts none of it as dropped.
#[actix_rt::test]
async fn a_temporary_child_stopped_for_a_restart_counts_what_it_accepted_as_dropped() {
    quiet_injected_panics();
    let (a, a_addr, _) = counter("a");
    let (b, b_addr, b_handled) = counter("b");
    let handle = Tree::builder("temporary")
        .strategy(Strategy::OneForAll)
        .backoff(Duration::from_millis(200), Duration::from_millis(200))
        .child(a)
        .child(b.restart(Restart::Temporary))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    a_addr.do_send(Boom).unwrap();
    actix_rt::time::sleep(Duration::from_millis(50)).await; // in the backoff
    let accepted = u64::from(b_addr.do_send(Msg).is_ok());
    actix_rt::time::sleep(Duration::from_millis(300)).await; // `a` is back, `b` is not
    let report = handle.shutdown("end").await;
    let b = report.find("b").unwrap();
    assert_eq!(
        accepted,
        b_handled.load(Ordering::SeqCst) + b.dropped,
        "b: accepted != handled + dropped:\n{report}"
    );
}

/// The report's `restarts` is the number of instances started after the first. A restart taken
/// over by another before the child's new instance started is counted all the same: here `b`
/// (which waits for `a` to start) is counted twice for the one instance it got.
#[actix_rt::test]
async fn restarts_count_the_instances_started() {
    quiet_injected_panics();
    let started = Arc::new(AtomicU64::new(0));
    let (a, a_addr, _) = counter("a");
    let b_started = started.clone();
    let b = ChildSpec::worker("b", move || {
        b_started.fetch_add(1, Ordering::SeqCst);
        Counter {
            handled: Arc::default(),
        }
    })
    .depends_on("a");
    let handle = Tree::builder("overlap")
        .strategy(Strategy::OneForAll)
        .child(a)
        .child(b)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    // The second `Boom` waits in the mailbox: `a`'s next instance panics on it at once, while
    // `b`'s restart is still waiting for `a` to start.
    a_addr.do_send(Boom).unwrap();
    a_addr.do_send(Boom).unwrap();
    actix_rt::time::sleep(Duration::from_millis(100)).await;
    let report = handle.shutdown("end").await;
    let b = report.find("b").unwrap();
    assert_eq!(report.find("a").unwrap().restarts, 2);
    assert_eq!(
        u64::from(b.restarts) + 1,
        started.load(Ordering::SeqCst),
        "b: report restarts vs instances made:\n{report}"
    );
}

/// A request (`send`) whose message the child accepted is answered, or fails, but never waits
/// forever. When the child then ends for good with the message still queued (here: a temporary
/// child that panics on the message before it), the message stays in the closed mailbox and the
/// request never resolves — not even after the tree has shut down.
#[actix_rt::test]
async fn a_request_to_a_child_that_ends_for_good_fails_rather_than_hangs() {
    quiet_injected_panics();
    let (a, a_addr, _) = counter("a");
    let handle = Tree::builder("request")
        .child(a.restart(Restart::Temporary))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    a_addr.do_send(Boom).unwrap();
    let mut request = Box::pin(a_addr.send(Msg));
    // Poll it once, so that its message is queued behind `Boom` before `a` runs.
    std::future::poll_fn(|cx| {
        assert!(std::future::Future::poll(request.as_mut(), cx).is_pending());
        std::task::Poll::Ready(())
    })
    .await;
    actix_rt::time::sleep(Duration::from_millis(50)).await;
    assert!(!a_addr.connected(), "`a` is down for good");
    let report = handle.shutdown("end").await;
    assert!(matches!(
        report.find("a").unwrap().outcome,
        Outcome::Panicked(_)
    ));
    assert_eq!(
        report.find("a").unwrap().dropped,
        2,
        "`Boom` and the request's message"
    );
    let answer = actix_rt::time::timeout(Duration::from_secs(1), request).await;
    assert!(
        matches!(answer, Ok(Err(_))),
        "the request is still waiting 1 s after the report:\n{report}"
    );
}

/// A worker that records its hooks and takes `drain` to finish its drained hook.
struct Slow {
    name: &'static str,
    drain: Duration,
    log: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Actor for Slow {
    type Context = Context<Self>;
}

impl Worker for Slow {
    fn on_stopping(&mut self, _: &mut Context<Self>, stopping: &actix_supervisor::Stopping) {
        let why = if stopping.reason.starts_with("restart:") {
            "restart"
        } else {
            "shutdown"
        };
        self.log
            .lock()
            .unwrap()
            .push(format!("{} told ({why})", self.name));
    }

    fn on_drained(&mut self, _: &mut Context<Self>) -> Option<actix_supervisor::HookFuture<Self>> {
        let (log, name, drain) = (self.log.clone(), self.name, self.drain);
        Some(Box::pin(actix::fut::wrap_future(async move {
            actix_rt::time::sleep(drain).await;
            log.lock().unwrap().push(format!("{name} done"));
        })))
    }
}

impl Handler<Boom> for Slow {
    type Result = ();
    fn handle(&mut self, _: Boom, _: &mut Context<Self>) {
        panic!("boom (injected)");
    }
}

/// `x` depends on `x_dep` (`p/t`, or its parent `p`); `f` fails so that `p`'s one-for-all restart
/// stops `t`, whose `w2` drains slowly; the shutdown begins meanwhile. `p/t/w1` must not be told
/// before `x` has finished.
async fn shutdown_during_a_restart_waits_for(x_dep: &str) {
    quiet_injected_panics();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let slow = |name: &'static str, drain_ms: u64| {
        let log = log.clone();
        ChildSpec::worker(name, move || Slow {
            name,
            drain: Duration::from_millis(drain_ms),
            log: log.clone(),
        })
    };
    let f = slow("f", 0);
    let f_addr = f.addr();
    let handle = Tree::builder("race")
        .child(slow("x", 300).depends_on(x_dep))
        .child(
            SupervisorSpec::new("p")
                .strategy(Strategy::OneForAll)
                .child(f)
                .child(
                    SupervisorSpec::new("t")
                        .child(slow("w1", 0))
                        // `w2` stops before `w1`, and takes 300 ms.
                        .child(slow("w2", 300).depends_on("w1")),
                ),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    // `f` fails: `p` restarts `f` and `t`; `t/w2` drains (300 ms), `t/w1` waits for it.
    f_addr.do_send(Boom).unwrap();
    actix_rt::time::sleep(Duration::from_millis(50)).await;
    let report = handle.shutdown("end").await;
    let log = log.lock().unwrap().clone();
    let pos = |e: &str| log.iter().position(|l| l == e);
    let (x_done, w1_told) = (pos("x done"), pos("w1 told (shutdown)"));
    assert!(
        x_done.is_some() && w1_told.is_some() && x_done < w1_told,
        "x depends on {x_dep}, but p/t/w1 was told before x had finished: {log:?}\n{report}"
    );
}

/// When the shutdown begins while a restart is stopping a supervisor's children, the children
/// the restart had not told yet are told by the shutdown as soon as their siblings allow —
/// without waiting for the children (outside the restart) that depend on their supervisor.
/// Here `x` depends on `p/t`, yet `p/t/w1` is told `Stopping` for the shutdown while `x` is
/// still draining.
#[actix_rt::test]
async fn the_shutdown_waits_for_dependents_of_a_supervisor_a_restart_is_stopping() {
    shutdown_during_a_restart_waits_for("p/t").await;
}

/// The same, one level up: `x` depends on `p`, the supervisor whose restart stops `t`. The
/// shutdown must not let `t` go on telling its children before `x` has finished.
#[actix_rt::test]
async fn the_shutdown_waits_for_dependents_of_the_parent_of_a_supervisor_a_restart_is_stopping() {
    shutdown_during_a_restart_waits_for("p").await;
}
