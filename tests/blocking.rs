//! Blocking workers (their own OS thread, a crossbeam mailbox) under the shutdown protocol.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Waker};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_supervisor::*;
use common::*;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

/// What an accumulator instance did, tagged with its instance number (1 for the first start).
#[derive(Clone, Debug, PartialEq, Eq)]
enum E {
    Started(u32),
    Handled(u32, u64),
    Stopping(u32),
    Drained(u32),
}

/// Where something ran.
#[derive(Clone, Debug)]
struct Place {
    what: &'static str,
    thread: ThreadId,
    name: Option<String>,
}

fn here(what: &'static str) -> Place {
    let t = std::thread::current();
    Place {
        what,
        thread: t.id(),
        name: t.name().map(str::to_owned),
    }
}

/// How the test steers and watches an accumulator (shared by all its instances).
#[derive(Clone, Default)]
struct Ctl {
    name: String,
    events: Arc<Mutex<Vec<E>>>,
    instances: Arc<AtomicU32>,
    places: Arc<Mutex<Vec<Place>>>,
    /// `on_stopping` says so here ...
    stopping: Option<mpsc::UnboundedSender<u32>>,
    /// ... and then waits for a go here.
    go: Option<Arc<Mutex<std::sync::mpsc::Receiver<()>>>>,
    /// Lifecycle events also go here, to be ordered against actor probes.
    common: Option<Log>,
    /// Each instance says so here when it is dropped.
    gone: Option<mpsc::UnboundedSender<u32>>,
}

impl Ctl {
    fn new(name: &str) -> Self {
        Ctl {
            name: name.to_owned(),
            ..Ctl::default()
        }
    }

    fn events(&self) -> Vec<E> {
        self.events.lock().clone()
    }

    /// `on_stopping` reports on the returned receiver and waits for a go on the returned sender.
    fn hold_stopping(&mut self) -> (mpsc::UnboundedReceiver<u32>, std::sync::mpsc::Sender<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel();
        self.stopping = Some(tx);
        self.go = Some(Arc::new(Mutex::new(go_rx)));
        (rx, go_tx)
    }

    fn watch_drops(&mut self) -> mpsc::UnboundedReceiver<u32> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.gone = Some(tx);
        rx
    }
}

/// A blocking worker that sums what it is sent and records everything it does.
struct Acc {
    instance: u32,
    sum: u64,
    ctl: Ctl,
    /// Said by `failed` after the message that set it.
    failing: Option<String>,
}

enum Msg {
    /// Adds; replies with the sum.
    Add(u64),
    /// Says it entered, then blocks until released (or 30 s pass).
    Block {
        entered: oneshot::Sender<()>,
        release: std::sync::mpsc::Receiver<()>,
    },
    Panic(&'static str),
    /// Handled, then the worker says it failed, with this reason.
    Fail(&'static str),
    /// Records the thread the handler runs on.
    Where,
}

impl BlockingWorker for Acc {
    type Message = Msg;
    type Reply = u64;

    fn started(&mut self) {
        self.ctl.places.lock().push(here("started"));
        self.ctl.events.lock().push(E::Started(self.instance));
        if let Some(log) = &self.ctl.common {
            log.push(Ev::Started(self.ctl.name.clone()));
        }
    }

    fn handle(&mut self, msg: Msg) -> u64 {
        match msg {
            Msg::Add(n) => {
                self.sum += n;
                self.ctl.events.lock().push(E::Handled(self.instance, n));
            }
            Msg::Block { entered, release } => {
                let _ = entered.send(());
                let _ = release.recv_timeout(Duration::from_secs(30));
            }
            Msg::Panic(msg) => panic!("{msg}"),
            Msg::Fail(reason) => self.failing = Some(reason.to_owned()),
            Msg::Where => self.ctl.places.lock().push(here("handle")),
        }
        self.sum
    }

    fn on_stopping(&mut self, _: &Stopping) {
        self.ctl.events.lock().push(E::Stopping(self.instance));
        if let Some(log) = &self.ctl.common {
            log.push(Ev::Stopping(self.ctl.name.clone()));
        }
        if let Some(tx) = &self.ctl.stopping {
            let _ = tx.send(self.instance);
        }
        if let Some(go) = &self.ctl.go {
            let _ = go.lock().recv_timeout(Duration::from_secs(30));
        }
    }

    fn failed(&mut self) -> Option<String> {
        self.failing.take()
    }

    fn on_drained(&mut self) {
        self.ctl.events.lock().push(E::Drained(self.instance));
        if let Some(log) = &self.ctl.common {
            log.push(Ev::Drained(self.ctl.name.clone()));
        }
    }
}

impl Drop for Acc {
    fn drop(&mut self) {
        if let Some(gone) = &self.ctl.gone {
            let _ = gone.send(self.instance);
        }
    }
}

fn acc(ctl: &Ctl) -> BlockingSpec<Acc> {
    let ctl = ctl.clone();
    ChildSpec::blocking(ctl.name.clone(), move || {
        ctl.places.lock().push(here("factory"));
        Acc {
            instance: ctl.instances.fetch_add(1, Ordering::SeqCst) + 1,
            sum: 0,
            ctl: ctl.clone(),
            failing: None,
        }
    })
}

/// An actor worker that says when it is told `Stopping`.
struct Marker(mpsc::UnboundedSender<()>);
impl Actor for Marker {
    type Context = Context<Self>;
}
impl Worker for Marker {
    fn on_stopping(&mut self, _: &mut Context<Self>, _: &Stopping) {
        let _ = self.0.send(());
    }
}

fn marker(name: &str) -> (WorkerSpec<Marker>, mpsc::UnboundedReceiver<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (ChildSpec::worker(name, move || Marker(tx.clone())), rx)
}

/// Blocks the accumulator in a handler; returns when it has entered, with the release.
async fn block(addr: &BlockingAddr<Acc>) -> std::sync::mpsc::Sender<()> {
    let (entered, entered_rx) = oneshot::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    addr.do_send(Msg::Block {
        entered,
        release: release_rx,
    })
    .unwrap_or_else(|_| panic!("the block is accepted"));
    within(entered_rx)
        .await
        .expect("the worker entered the block");
    release
}

/// Awaits `fut`, failing the test after 20 s rather than hanging it.
async fn within<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("timed out waiting")
}

/// Polls a future once, so that a `send` has pushed its message when this returns.
fn poll_once<F: Future + Unpin>(fut: &mut F) {
    let mut cx = TaskContext::from_waker(Waker::noop());
    assert!(
        Pin::new(fut).poll(&mut cx).is_pending(),
        "still waiting for the reply"
    );
}

#[actix::test]
async fn drains_in_order_and_refuses_after_its_acknowledgement() {
    init_log();
    let mut ctl = Ctl::new("sink");
    let (mut stopping, go) = ctl.hold_stopping();
    let spec = acc(&ctl);
    let addr = spec.addr();
    let (mark, mut marked) = marker("marker");
    let handle = Tree::builder("order")
        .child(spec)
        .child(mark)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();

    // The worker is busy, so everything below queues behind the block.
    let release = block(&addr).await;
    for n in 0..100 {
        addr.do_send(Msg::Add(n))
            .unwrap_or_else(|_| panic!("accepted"));
    }
    let report = handle.shutdown("test");
    // The marker is told in the same pass as the sink: `Stopping` is queued behind the 100.
    within(marked.recv()).await;
    release.send(()).unwrap();
    assert_eq!(within(stopping.recv()).await, Some(1));
    // Sent while the worker drains: accepted and handled.
    for n in 100..150 {
        addr.do_send(Msg::Add(n))
            .unwrap_or_else(|_| panic!("accepted while draining"));
    }
    go.send(()).unwrap();
    let report = within(report).await;

    let mut expected = vec![E::Started(1)];
    expected.extend((0..100).map(|n| E::Handled(1, n)));
    expected.push(E::Stopping(1));
    expected.extend((100..150).map(|n| E::Handled(1, n)));
    expected.push(E::Drained(1));
    assert_eq!(ctl.events(), expected);

    assert_eq!(report.outcome, TreeOutcome::Clean, "{report}");
    let sink = report.find("sink").unwrap();
    assert_eq!(sink.kind, ChildKind::Blocking);
    assert_eq!(sink.outcome, Outcome::Drained);
    // Told while inside the block: the block, the 100 behind it and the 50 sent while draining.
    assert_eq!(sink.drained, 151, "{report}");
    assert_eq!(sink.dropped, 0);

    // After the acknowledgement sends fail at the sender, with the message handed back.
    assert!(matches!(
        addr.do_send(Msg::Add(999)),
        Err(SendError::Closed(Msg::Add(999)))
    ));
    assert!(matches!(
        addr.send(Msg::Add(1)).await,
        Err(MailboxError::Closed)
    ));
    assert!(!addr.connected());
}

#[actix::test]
async fn send_returns_the_reply_and_the_handle_finds_the_address() {
    init_log();
    let ctl = Ctl::new("sum");
    let spec = acc(&ctl);
    let early = spec.addr();
    // Accepted before the tree starts; handled once it has.
    early
        .do_send(Msg::Add(1))
        .unwrap_or_else(|_| panic!("accepted"));
    let handle = Tree::builder("reply")
        .child(SupervisorSpec::new("sup").child(spec))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let addr = handle
        .blocking_addr::<Acc>("sup/sum")
        .expect("a blocking worker of that type at that path");
    assert!(handle.addr::<Probe>("sup/sum").is_none(), "not an actor");
    assert!(handle.blocking_addr::<Acc>("sup/nothing").is_none());
    assert!(addr.connected());
    assert_eq!(addr.send(Msg::Add(2)).await.unwrap(), 3);
    assert_eq!(addr.send(Msg::Add(39)).await.unwrap(), 42);
    assert!(format!("{addr:?}").contains("sum"));

    let report = handle.shutdown("test").await;
    assert_eq!(report.find("sup/sum").unwrap().outcome, Outcome::Drained);
}

/// A `send` dropped after its message was accepted (while the worker is busy) is still handled:
/// accepted means handled, whatever the sender does with the reply.
#[actix::test]
async fn a_send_whose_reply_nobody_awaits_is_still_handled() {
    init_log();
    let ctl = Ctl::new("sum");
    let spec = acc(&ctl);
    let addr = spec.addr();
    let handle = Tree::builder("dropped-reply")
        .child(spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let release = block(&addr).await;
    let mut sent = Box::pin(addr.send(Msg::Add(5)));
    poll_once(&mut sent);
    drop(sent);
    release.send(()).unwrap();
    assert_eq!(within(addr.send(Msg::Add(1))).await.unwrap(), 6);
    let report = handle.shutdown("test").await;
    assert_eq!(report.find("sum").unwrap().dropped, 0, "{report}");
}

#[actix::test]
async fn a_handler_stuck_past_its_budget_is_timed_out_and_its_backlog_counted_dropped() {
    init_log();
    let mut ctl = Ctl::new("stuck");
    let mut gone = ctl.watch_drops();
    let budget = Duration::from_millis(300);
    let spec = acc(&ctl).budget(budget);
    let addr = spec.addr();
    let log = Log::default();
    let handle = Tree::builder("stuck")
        .child(spec)
        .child(simple("fine", &log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let release = block(&addr).await;
    for n in 0..10 {
        addr.do_send(Msg::Add(n))
            .unwrap_or_else(|_| panic!("accepted"));
    }
    let t0 = Instant::now();
    let report = within(handle.shutdown("test")).await;
    let took = t0.elapsed();

    let stuck = report.find("stuck").unwrap();
    assert_eq!(stuck.outcome, Outcome::TimedOut, "{report}");
    assert_eq!(report.outcome, TreeOutcome::TimedOut);
    assert!(
        took >= budget - Duration::from_millis(10) && took < budget + Duration::from_secs(3),
        "the shutdown ends at the budget, not when the handler does: {took:?}"
    );
    // Accepted, not handled: the message inside the stuck handler and the 10 behind it.
    assert_eq!(stuck.dropped, 11, "{report}");
    assert_eq!(report.find("fine").unwrap().outcome, Outcome::Drained);
    assert!(matches!(
        addr.do_send(Msg::Add(7)),
        Err(SendError::Closed(Msg::Add(7)))
    ));

    // Once the handler returns, the detached thread ends without handling anything more.
    release.send(()).unwrap();
    assert_eq!(within(gone.recv()).await, Some(1));
    assert_eq!(ctl.events(), vec![E::Started(1)]);
}

#[actix::test]
async fn a_panic_while_draining_is_recorded_and_siblings_still_drain() {
    init_log();
    let mut ctl = Ctl::new("fragile");
    let (mut stopping, go) = ctl.hold_stopping();
    let spec = acc(&ctl);
    let addr = spec.addr();
    let other = Ctl::new("other");
    let log = Log::default();
    let handle = Tree::builder("panic")
        .child(spec)
        .child(acc(&other))
        .child(simple("actor", &log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let report = handle.shutdown("test");
    assert_eq!(within(stopping.recv()).await, Some(1));
    let mut doomed = Box::pin(addr.send(Msg::Panic("boom while draining")));
    poll_once(&mut doomed);
    addr.do_send(Msg::Add(5))
        .unwrap_or_else(|_| panic!("accepted while draining"));
    go.send(()).unwrap();
    let report = within(report).await;

    let fragile = report.find("fragile").unwrap();
    assert_eq!(
        fragile.outcome,
        Outcome::Panicked("boom while draining".into()),
        "{report}"
    );
    assert_eq!(fragile.kind, ChildKind::Blocking);
    // The message that panicked and the one behind it: accepted, never handled.
    assert_eq!(fragile.dropped, 2, "{report}");
    assert!(matches!(within(doomed).await, Err(MailboxError::Closed)));
    assert_eq!(report.outcome, TreeOutcome::Failed);
    assert_eq!(report.find("other").unwrap().outcome, Outcome::Drained);
    assert_eq!(report.find("actor").unwrap().outcome, Outcome::Drained);
    assert!(!addr.connected());
}

#[actix::test]
async fn runs_on_its_own_thread_and_makes_its_instance_there() {
    init_log();
    let ctl = Ctl::new("disk");
    let spec = acc(&ctl);
    let addr = spec.addr();
    let handle = Tree::builder("threads")
        .child(spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    addr.send(Msg::Where).await.unwrap();
    let arbiter = std::thread::current().id();
    let places = ctl.places.lock().clone();
    assert_eq!(
        places.iter().map(|p| p.what).collect::<Vec<_>>(),
        ["factory", "started", "handle"]
    );
    for p in &places {
        assert_ne!(p.thread, arbiter, "{} ran on the arbiter's thread", p.what);
        assert_eq!(
            p.thread, places[0].thread,
            "{} ran on another thread",
            p.what
        );
        assert_eq!(
            p.name.as_deref(),
            Some("disk"),
            "the thread is named after the child"
        );
    }
    handle.shutdown("test").await;
}

#[actix::test]
async fn an_actor_that_depends_on_a_blocking_worker_stops_first() {
    init_log();
    let log = Log::default();
    let mut ctl = Ctl::new("store");
    ctl.common = Some(log.clone());
    let handle = Tree::builder("deps")
        .child(simple("front", &log).depends_on("store"))
        .child(acc(&ctl))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let report = handle.shutdown("test").await;
    assert_eq!(report.outcome, TreeOutcome::Clean, "{report}");

    let ev = |e: Ev| log.pos(&e).unwrap_or_else(|| panic!("{e:?} not logged"));
    assert!(
        ev(Ev::Started("store".into())) < ev(Ev::Started("front".into())),
        "the dependency starts first"
    );
    assert!(
        ev(Ev::Drained("front".into())) < ev(Ev::Stopping("store".into())),
        "the dependent drains before the dependency is told"
    );
    let front = report.find("front").unwrap();
    let store = report.find("store").unwrap();
    assert!(
        front.acknowledged.unwrap() <= store.told.unwrap(),
        "{report}"
    );
    assert_eq!(store.outcome, Outcome::Drained);
}

#[actix::test]
async fn a_failing_factory_or_started_stops_the_start_with_the_childs_name() {
    init_log();
    let err = Tree::builder("fails")
        .child(ChildSpec::try_blocking(
            "journal",
            || -> Result<Acc, BoxError> { Err("no disk".into()) },
        ))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap_err();
    assert_eq!(err.child, "journal");
    assert_eq!(err.cause, "no disk");

    let err = Tree::builder("panics")
        .child(ChildSpec::blocking("journal", || -> Acc {
            panic!("no disk either")
        }))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap_err();
    assert_eq!(err.child, "journal");
    assert!(err.cause.contains("no disk either"), "{}", err.cause);

    struct Grumpy;
    impl BlockingWorker for Grumpy {
        type Message = ();
        type Reply = ();
        fn started(&mut self) {
            panic!("will not start");
        }
        fn handle(&mut self, _: ()) {}
    }
    let log = Log::default();
    let err = Tree::builder("grumpy")
        .child(simple("first", &log))
        .child(ChildSpec::blocking("grumpy", || Grumpy))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap_err();
    assert_eq!(err.child, "grumpy");
    assert!(err.cause.contains("will not start"), "{}", err.cause);
    assert_eq!(
        err.report.find("first").unwrap().outcome,
        Outcome::Drained,
        "what had started is shut down"
    );
}

#[actix::test]
async fn every_send_racing_the_close_is_either_handled_or_refused() {
    init_log();
    let ctl = Ctl::new("raced");
    let spec = acc(&ctl);
    let addr = spec.addr();
    let handle = Tree::builder("race")
        .child(spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let (warm_tx, warm_rx) = std::sync::mpsc::channel();
    let senders: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.clone();
            let warm = warm_tx.clone();
            std::thread::spawn(move || {
                let mut accepted = 0u64;
                loop {
                    match addr.do_send(Msg::Add(1)) {
                        Ok(()) => accepted += 1,
                        Err(SendError::Closed(Msg::Add(1))) => return accepted,
                        Err(_) => panic!("refused with another message"),
                    }
                    if accepted == 2_000 {
                        let _ = warm.send(());
                    }
                    // Slower than the worker, or the drain (which handles what arrives while
                    // it drains) would never end.
                    if accepted.is_multiple_of(64) {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            })
        })
        .collect();
    for _ in 0..4 {
        warm_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("every sender is sending");
    }
    let report = within(handle.shutdown("test")).await;
    let accepted: u64 = senders.into_iter().map(|s| s.join().unwrap()).sum();
    let handled = ctl
        .events()
        .iter()
        .filter(|e| matches!(e, E::Handled(..)))
        .count() as u64;
    assert_eq!(handled, accepted, "every accepted message was handled");
    let raced = report.find("raced").unwrap();
    assert_eq!(raced.outcome, Outcome::Drained);
    assert_eq!(raced.dropped, 0);
}

#[actix::test]
async fn a_panic_while_running_restarts_it_on_a_new_thread_and_loses_only_that_message() {
    init_log();
    let ctl = Ctl::new("worker");
    let spec = acc(&ctl);
    let addr = spec.addr();
    let handle = Tree::builder("restart")
        .child(spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    // The first instance is held in a block, so the failing message and those behind it queue.
    let release = block(&addr).await;
    let mut doomed = Box::pin(addr.send(Msg::Panic("bad record")));
    poll_once(&mut doomed);
    for n in 1..=10 {
        addr.do_send(Msg::Add(n))
            .unwrap_or_else(|_| panic!("accepted"));
    }
    release.send(()).unwrap();
    assert!(
        matches!(within(doomed).await, Err(MailboxError::Closed)),
        "the message whose handler panicked is lost, and its sender told so"
    );
    // Handled by the new instance, behind the ten that waited for it.
    assert_eq!(within(addr.send(Msg::Add(100))).await.unwrap(), 155);

    let mut expected = vec![E::Started(1), E::Started(2)];
    expected.extend((1..=10).map(|n| E::Handled(2, n)));
    expected.push(E::Handled(2, 100));
    assert_eq!(ctl.events(), expected);
    let places = ctl.places.lock().clone();
    assert_eq!(
        places.iter().map(|p| p.what).collect::<Vec<_>>(),
        ["factory", "started", "factory", "started"]
    );
    assert_ne!(
        places[0].thread, places[2].thread,
        "the new instance has a new thread"
    );
    assert_eq!(places[2].thread, places[3].thread);
    assert_eq!(places[2].name.as_deref(), Some("worker"));

    let report = handle.shutdown("test").await;
    let entry = report.find("worker").unwrap();
    assert_eq!(entry.outcome, Outcome::Drained, "{report}");
    assert_eq!(entry.restarts, 1, "{report}");
    assert_eq!(entry.dropped, 1, "only the failing message: {report}");
    let failure = entry.last_failure.as_deref().unwrap_or_default();
    assert!(failure.contains("bad record"), "{failure}");
}

/// A worker that says it failed (rather than panicking) ends like a panic's instance: restarted
/// with the reason recorded — but the message it had handled is answered, not lost.
#[actix::test]
async fn a_worker_that_says_it_failed_is_restarted_and_keeps_what_queued_behind() {
    init_log();
    let ctl = Ctl::new("failing");
    let spec = acc(&ctl);
    let addr = spec.addr();
    let handle = Tree::builder("failed")
        .child(spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let release = block(&addr).await;
    let mut last = Box::pin(addr.send(Msg::Fail("the disk is gone")));
    poll_once(&mut last);
    for n in 1..=3 {
        addr.do_send(Msg::Add(n))
            .unwrap_or_else(|_| panic!("accepted"));
    }
    release.send(()).unwrap();
    assert_eq!(
        within(last).await,
        Ok(0),
        "the failing instance's last reply"
    );
    assert_eq!(within(addr.send(Msg::Add(10))).await.unwrap(), 16);
    let mut expected = vec![E::Started(1), E::Started(2)];
    expected.extend([1, 2, 3, 10].map(|n| E::Handled(2, n)));
    assert_eq!(ctl.events(), expected);

    let report = handle.shutdown("test").await;
    let entry = report.find("failing").unwrap();
    assert_eq!(entry.restarts, 1, "{report}");
    assert_eq!(entry.dropped, 0, "{report}");
    let failure = entry.last_failure.as_deref().unwrap_or_default();
    assert!(failure.contains("the disk is gone"), "{failure}");
}

#[actix::test]
async fn a_handler_stuck_during_a_one_for_all_restart_is_aborted_and_restarted() {
    init_log();
    let mut stuck_ctl = Ctl::new("stuck");
    let mut gone = stuck_ctl.watch_drops();
    let budget = Duration::from_millis(300);
    let stuck = acc(&stuck_ctl).budget(budget);
    let stuck_addr = stuck.addr();
    let crashy_ctl = Ctl::new("crashy");
    let crashy = acc(&crashy_ctl);
    let crashy_addr = crashy.addr();
    let handle = Tree::builder("one-for-all")
        .strategy(Strategy::OneForAll)
        .child(stuck)
        .child(crashy)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let release = block(&stuck_addr).await;
    for n in 1..=3 {
        stuck_addr
            .do_send(Msg::Add(n))
            .unwrap_or_else(|_| panic!("accepted"));
    }
    let t0 = Instant::now();
    crashy_addr
        .do_send(Msg::Panic("crash"))
        .unwrap_or_else(|_| panic!("accepted"));
    // The restart stops `stuck` too; it cannot drain inside its block, so it is aborted at its
    // budget and started again; the new instance takes what waited behind the block.
    assert_eq!(within(stuck_addr.send(Msg::Add(10))).await.unwrap(), 16);
    let took = t0.elapsed();
    assert!(
        took >= budget - Duration::from_millis(10) && took < budget + Duration::from_secs(3),
        "the restart waited for the budget, no longer: {took:?}"
    );
    assert_eq!(within(crashy_addr.send(Msg::Add(1))).await.unwrap(), 1);

    // The detached first thread ends when its handler returns, having handled nothing more.
    release.send(()).unwrap();
    assert_eq!(within(gone.recv()).await, Some(1));
    assert_eq!(
        stuck_ctl.events(),
        vec![
            E::Started(1),
            E::Started(2),
            E::Handled(2, 1),
            E::Handled(2, 2),
            E::Handled(2, 3),
            E::Handled(2, 10)
        ]
    );

    let report = handle.shutdown("test").await;
    let s = report.find("stuck").unwrap();
    assert_eq!(s.outcome, Outcome::Drained, "{report}");
    assert_eq!(s.restarts, 1, "{report}");
    assert_eq!(
        s.dropped, 1,
        "the message its aborted instance held: {report}"
    );
    let c = report.find("crashy").unwrap();
    assert_eq!(c.restarts, 1, "{report}");
    assert!(c
        .last_failure
        .as_deref()
        .unwrap_or_default()
        .contains("crash"));
}
