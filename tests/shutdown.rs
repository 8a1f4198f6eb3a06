//! The shutdown protocol, end to end, on trees started inside an actix System.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_supervisor::*;
use common::*;

fn nested(name: &str, path: &str, log: &Log, names: &[&str]) -> SupervisorSpec {
    SupervisorSpec::new(name).children(
        names
            .iter()
            .map(|n| probe(n, &format!("{path}/{n}"), log, Behaviour::default()).0),
    )
}

/// Every edge "x depends on y": x (and its whole subtree) acknowledged before y (or anything in
/// its subtree) was told. Every supervisor: told before its children, acknowledged after them.
fn assert_protocol_order(report: &ShutdownReport, deps: &[(&str, &str)]) {
    for (x, y) in deps {
        let xr = report.find(x).unwrap_or_else(|| panic!("{x} in report"));
        let yr = report.find(y).unwrap_or_else(|| panic!("{y} in report"));
        let x_last_ack = xr.iter().filter_map(|c| c.acknowledged).max().unwrap();
        let y_first_told = yr.iter().filter_map(|c| c.told).min().unwrap();
        assert!(
            x_last_ack <= y_first_told,
            "{x} must have acknowledged ({x_last_ack:?}) before {y} was told ({y_first_told:?})"
        );
    }
    for sup in report.iter().filter(|c| c.kind == ChildKind::Supervisor) {
        for child in &sup.children {
            assert!(
                sup.told.unwrap() <= child.told.unwrap(),
                "{} told before its child {}",
                sup.path,
                child.path
            );
            assert!(
                sup.acknowledged.unwrap() >= child.acknowledged.unwrap(),
                "{} acknowledged after its child {}",
                sup.path,
                child.path
            );
        }
    }
}

#[actix::test]
async fn dependents_stop_first_and_parents_acknowledge_last() {
    init_log();
    let log = Log::default();
    // front ──depends on──▶ core;   core/db ──▶ logs (across supervisors);
    // front/cache ──▶ metrics (across);  core/index ──▶ core/db (siblings, three levels deep).
    let tree = Tree::builder("multi")
        .child(
            SupervisorSpec::new("front")
                .child(probe("api", "front/api", &log, Behaviour::default()).0)
                .child(
                    probe("cache", "front/cache", &log, Behaviour::default())
                        .0
                        .depends_on("metrics"),
                )
                .depends_on("core"),
        )
        .child(
            SupervisorSpec::new("core")
                .child(
                    probe("db", "core/db", &log, Behaviour::default())
                        .0
                        .depends_on("logs"),
                )
                .child(nested("index", "core/index", &log, &["0", "1", "2"]).depends_on("db")),
        )
        .child(simple("logs", &log))
        .child(simple("metrics", &log))
        .build()
        .unwrap();
    let handle = tree.start().await.unwrap();
    let report = handle.shutdown("test").await;
    assert_eq!(report.outcome, TreeOutcome::Clean, "{report}");
    assert!(
        report.iter().all(|c| c.outcome == Outcome::Drained),
        "{report}"
    );

    let deps = [
        ("front", "core"),
        ("core/db", "logs"),
        ("front/cache", "metrics"),
        ("core/index", "core/db"),
    ];
    assert_protocol_order(&report, &deps);
    // The same order as the workers themselves saw it: each dependent's drained hook ran before
    // its dependency's stopping hook.
    let ev = |e: Ev| log.pos(&e).unwrap_or_else(|| panic!("{e:?} not logged"));
    assert!(ev(Ev::Drained("front/cache".into())) < ev(Ev::Stopping("metrics".into())));
    assert!(ev(Ev::Drained("core/db".into())) < ev(Ev::Stopping("logs".into())));
    for i in 0..3 {
        assert!(ev(Ev::Drained(format!("core/index/{i}"))) < ev(Ev::Stopping("core/db".into())));
        assert!(ev(Ev::Drained("front/api".into())) < ev(Ev::Stopping(format!("core/index/{i}"))));
    }
    // Siblings with no dependency between them are told at once, before any of them finished.
    let index = report.find("core/index").unwrap();
    let last_told = index
        .children
        .iter()
        .map(|c| c.told.unwrap())
        .max()
        .unwrap();
    let first_ack = index
        .children
        .iter()
        .map(|c| c.acknowledged.unwrap())
        .min()
        .unwrap();
    assert!(last_told <= first_ack, "{report}");
}

#[actix::test]
async fn start_follows_dependencies_then_declaration_order() {
    init_log();
    let log = Log::default();
    let tree = Tree::builder("start")
        .child(simple("a", &log).depends_on("c"))
        .child(simple("b", &log))
        .child(simple("c", &log))
        .build()
        .unwrap();
    let handle = tree.start().await.unwrap();
    let started: Vec<Ev> = log.events();
    assert_eq!(
        started,
        vec![
            Ev::Started("b".into()),
            Ev::Started("c".into()),
            Ev::Started("a".into())
        ],
        "c before its dependent a; otherwise declared order"
    );
    handle.shutdown("test").await;
}

/// A sender that keeps sending until the child refuses, counting what was accepted.
fn spawn_sender(
    addr: ChildAddr<Probe>,
    pause: Duration,
) -> std::thread::JoinHandle<(u64, Option<SendError<Work>>)> {
    std::thread::spawn(move || {
        let mut accepted = 0u64;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            match addr.do_send(Work) {
                Ok(()) => accepted += 1,
                Err(e) => return (accepted, Some(e)),
            }
            if accepted.is_multiple_of(64) {
                std::thread::sleep(pause);
            }
        }
        (accepted, None)
    })
}

#[actix::test]
async fn everything_accepted_is_handled_and_later_sends_fail() {
    init_log();
    let log = Log::default();
    let behaviour = Behaviour {
        drained_delay: Some(Duration::from_millis(100)),
        ..Behaviour::default()
    };
    let (spec, handled) = probe("busy", "busy", &log, behaviour);
    let addr = spec.addr();
    // Queued before the start: accepted, so handled once it runs.
    for _ in 0..1_000 {
        addr.do_send(Work).unwrap();
    }
    let spec = spec.placement(Placement::Named("own".into()));
    let handle = Tree::builder("drain")
        .child(spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let sender = spawn_sender(addr.clone(), Duration::from_millis(1));
    actix_rt::time::sleep(Duration::from_millis(50)).await;
    // Queued behind a long handler, so still waiting when `Stopping` is queued behind them.
    let (blocker, entered) = block(Duration::from_millis(1_000));
    addr.do_send(blocker).unwrap();
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("the probe is busy");
    for _ in 0..5_000 {
        addr.do_send(Work).unwrap();
    }
    let report = handle.shutdown("test").await;
    let (sent_ok, refusal) = sender.join().unwrap();

    assert!(
        matches!(refusal, Some(SendError::Closed(_))),
        "the sender was refused once the child closed"
    );
    assert_eq!(
        handled.load(Ordering::SeqCst),
        6_000 + sent_ok,
        "every accepted message was handled"
    );
    let busy = report.find("busy").unwrap();
    assert_eq!(busy.outcome, Outcome::Drained);
    assert_eq!(busy.dropped, 0);
    assert!(
        busy.drained >= 5_000,
        "the backlog at the trigger counts as drained: {report}"
    );
    // After the acknowledgement every kind of send fails at the sender.
    assert!(matches!(addr.do_send(Work), Err(SendError::Closed(_))));
    assert!(matches!(addr.try_send(Work), Err(SendError::Closed(_))));
    assert!(addr.send(Work).await.is_err());
    assert!(!addr.connected());
}

#[actix::test]
async fn messages_sent_while_draining_are_handled() {
    init_log();
    // The sink drains slowly (its drained hook is async), the producer keeps sending to it from
    // its own on_stopping and while the sink drains: all of that must be handled.
    let log = Log::default();
    let (spec, handled) = probe(
        "sink",
        "sink",
        &log,
        Behaviour {
            work: Some(Duration::from_micros(50)),
            ..Behaviour::default()
        },
    );
    let addr = spec.addr();
    let handle = Tree::builder("during")
        .child(spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    for _ in 0..2_000 {
        addr.do_send(Work).unwrap();
    }
    let shutdown = handle.shutdown("test");
    // Sent after the trigger, while the 2,000 ahead of the Stopping are still being handled.
    let mut late_ok = 0;
    for _ in 0..500 {
        if addr.do_send(Work).is_ok() {
            late_ok += 1;
        }
    }
    let report = shutdown.await;
    assert_eq!(
        late_ok, 500,
        "the mailbox is open until the drain has emptied it"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 2_500);
    assert_eq!(report.find("sink").unwrap().dropped, 0);
}

#[actix::test]
async fn a_hung_child_is_aborted_at_its_budget_and_siblings_drain() {
    init_log();
    let log = Log::default();
    let tree = Tree::builder("hang")
        .child(
            SupervisorSpec::new("sup")
                .child(stuck(
                    "stuck",
                    "sup/stuck",
                    &log,
                    Duration::from_millis(400),
                ))
                .child(probe("fine", "sup/fine", &log, Behaviour::default()).0),
        )
        .child(simple("after", &log))
        .build()
        .unwrap();
    let handle = tree.start().await.unwrap();
    let t0 = Instant::now();
    let report = handle.shutdown("test").await;
    let took = t0.elapsed();

    let stuck = report.find("sup/stuck").unwrap();
    assert_eq!(stuck.outcome, Outcome::TimedOut, "{report}");
    let drain = stuck.drain_time().unwrap();
    assert!(
        drain >= Duration::from_millis(390) && drain < Duration::from_secs(3),
        "aborted at its budget: {drain:?}"
    );
    assert_eq!(report.find("sup/fine").unwrap().outcome, Outcome::Drained);
    assert_eq!(report.find("after").unwrap().outcome, Outcome::Drained);
    assert_eq!(report.outcome, TreeOutcome::TimedOut);
    assert_eq!(report.exit_code(), EXIT_TIMED_OUT);
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(format!("{report}").contains("TIMED OUT"));
}

#[actix::test]
async fn panics_while_draining_are_recorded_and_siblings_still_drain() {
    init_log();
    let log = Log::default();
    let tree = Tree::builder("panics")
        .child(
            probe(
                "a",
                "a",
                &log,
                Behaviour {
                    panic_in_stopping: true,
                    ..Behaviour::default()
                },
            )
            .0,
        )
        .child(
            probe(
                "b",
                "b",
                &log,
                Behaviour {
                    panic_in_drained: true,
                    ..Behaviour::default()
                },
            )
            .0,
        )
        .child(simple("c", &log).depends_on("a").depends_on("b"))
        .child(simple("d", &log))
        .build()
        .unwrap();
    let handle = tree.start().await.unwrap();
    let report = handle.shutdown("test").await;
    assert_eq!(
        report.find("a").unwrap().outcome,
        Outcome::Panicked("a panics in on_stopping".into())
    );
    assert_eq!(
        report.find("b").unwrap().outcome,
        Outcome::Panicked("b panics in on_drained".into())
    );
    assert_eq!(report.find("c").unwrap().outcome, Outcome::Drained);
    assert_eq!(report.find("d").unwrap().outcome, Outcome::Drained);
    assert_eq!(report.outcome, TreeOutcome::Failed);
    assert_eq!(report.exit_code(), EXIT_FAILED);
    let text = format!("{report}");
    assert!(text.contains("a panics in on_stopping"), "{text}");
}

#[actix::test]
async fn the_overall_deadline_aborts_everything_pending() {
    init_log();
    let log = Log::default();
    // `stuck` depends on `waits`, so `waits` is told only after `stuck` acknowledges — never.
    let tree = Tree::builder("overall")
        .child(stuck("stuck", "stuck", &log, Duration::from_secs(20)).depends_on("waits"))
        .child(simple("waits", &log).budget(Duration::from_secs(20)))
        .child(simple("free", &log))
        .deadline(Duration::from_millis(600))
        .build()
        .unwrap();
    let handle = tree.start().await.unwrap();
    let t0 = Instant::now();
    let report = handle.shutdown("test").await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(590) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(report.find("stuck").unwrap().outcome, Outcome::TimedOut);
    let waits = report.find("waits").unwrap();
    assert_eq!(
        waits.outcome,
        Outcome::TimedOut,
        "pending (never told) children are aborted too"
    );
    assert_eq!(waits.told, None);
    assert_eq!(report.find("free").unwrap().outcome, Outcome::Drained);
    assert!(
        log.pos(&Ev::Stopping("waits".into())).is_none(),
        "never told: its dependent never acknowledged"
    );
}

#[actix::test]
async fn a_thousand_concurrent_triggers_start_one_shutdown() {
    init_log();
    let log = Log::default();
    let handle = Tree::builder("idem")
        .child(simple("a", &log))
        .child(simple("b", &log).depends_on("a"))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let h = handle.clone();
            std::thread::spawn(move || {
                (0..125)
                    .map(|i| {
                        drop(h.shutdown(format!("thread {t} call {i}")));
                        h.wait_blocking(Some(Duration::from_secs(20)))
                            .expect("a report")
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    // And a few from actors on the System, awaiting the same report.
    let from_tasks: Vec<_> = (0..10)
        .map(|i| actix_rt::spawn(handle.shutdown(format!("task {i}"))))
        .collect();
    let mut reports = Vec::new();
    for t in from_tasks {
        reports.push(t.await.unwrap());
    }
    for t in threads {
        reports.extend(t.join().unwrap());
    }
    assert_eq!(reports.len(), 1_010);
    assert!(
        reports.iter().all(|r| Arc::ptr_eq(r, &reports[0])),
        "every caller gets the same report"
    );
    assert_eq!(
        log.events()
            .iter()
            .filter(|e| matches!(e, Ev::Stopping(_)))
            .count(),
        2,
        "each child told once"
    );
    assert_eq!(handle.phase(), Phase::Stopped);
}

#[actix::test]
async fn readiness_turns_false_at_once_and_the_grace_delays_stopping() {
    init_log();
    let log = Log::default();
    let handle = Tree::builder("grace")
        .child(simple("a", &log))
        .readiness_grace(Duration::from_millis(300))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(handle.is_ready());
    assert_eq!(handle.phase(), Phase::Running);
    let t0 = Instant::now();
    let shutdown = handle.shutdown("test");
    assert_eq!(
        handle.phase(),
        Phase::Draining,
        "readiness is false as soon as the trigger returns"
    );
    assert!(!handle.is_ready());
    let report = shutdown.await;
    let told = log.at(&Ev::Stopping("a".into())).unwrap();
    assert!(
        told - t0 >= Duration::from_millis(290),
        "nothing is stopped during the grace"
    );
    assert!(report.find("a").unwrap().told.unwrap() >= Duration::from_millis(290));
}

#[actix::test]
async fn in_flight_async_work_is_awaited_before_the_acknowledgement() {
    init_log();

    struct Slow {
        in_flight: InFlight,
    }
    impl Actor for Slow {
        type Context = Context<Self>;
    }
    impl Worker for Slow {
        fn in_flight(&self) -> Option<&InFlight> {
            Some(&self.in_flight)
        }
    }
    /// Doubles a number asynchronously; says when it began and records when it finished.
    #[derive(Message)]
    #[rtype(result = "u32")]
    struct Compute(
        u32,
        tokio::sync::oneshot::Sender<()>,
        Arc<parking_lot::Mutex<Option<Instant>>>,
    );
    impl Handler<Compute> for Slow {
        type Result = ResponseFuture<u32>;
        fn handle(&mut self, m: Compute, _: &mut Context<Self>) -> Self::Result {
            let Compute(n, began, finished) = m;
            let _ = began.send(());
            Box::pin(self.in_flight.track(async move {
                actix_rt::time::sleep(Duration::from_millis(300)).await;
                *finished.lock() = Some(Instant::now());
                n * 2
            }))
        }
    }

    let spec = ChildSpec::worker("slow", || Slow {
        in_flight: InFlight::new(),
    });
    let addr = spec.addr();
    let handle = Tree::builder("inflight")
        .child(spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let (began_tx, began) = tokio::sync::oneshot::channel();
    let finished = Arc::new(parking_lot::Mutex::new(None));
    let answer = actix_rt::spawn({
        let (addr, finished) = (addr.clone(), finished.clone());
        async move { addr.send(Compute(21, began_tx, finished)).await }
    });
    began.await.expect("the request is in flight");
    let report = handle.shutdown("test").await;
    let acknowledged = Instant::now();
    let finished = finished
        .lock()
        .expect("the in-flight work finished, not cancelled");
    assert!(
        finished <= acknowledged,
        "it finished before the worker acknowledged"
    );
    assert_eq!(
        answer.await.unwrap().unwrap(),
        42,
        "and its caller got the answer"
    );
    assert_eq!(report.find("slow").unwrap().outcome, Outcome::Drained);
}

#[actix::test]
async fn workers_run_on_the_arbiters_they_are_placed_on() {
    init_log();
    let log = Log::default();

    struct Where(
        &'static str,
        Arc<Mutex<Vec<(&'static str, std::thread::ThreadId)>>>,
    );
    impl Actor for Where {
        type Context = Context<Self>;
        fn started(&mut self, _: &mut Context<Self>) {
            self.1.lock().push((self.0, std::thread::current().id()));
        }
    }
    impl Worker for Where {}
    use parking_lot::Mutex;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let spec = |name: &'static str, p: Placement| {
        let seen = seen.clone();
        ChildSpec::worker(name, move || Where(name, seen.clone())).placement(p)
    };
    let tree = Tree::builder("placed")
        .pool("cpu", 2)
        .child(spec("home", Placement::Parent))
        .child(spec("io", Placement::Named("io".into())))
        .child(spec("p0", Placement::Pool("cpu".into())))
        .child(spec("p1", Placement::Pool("cpu".into())))
        .child(simple("probe", &log))
        .build()
        .unwrap();
    let handle = tree.start().await.unwrap();
    let threads = seen.lock().clone();
    assert_eq!(threads.len(), 4);
    let distinct: std::collections::HashSet<_> = threads.iter().map(|(_, t)| t).collect();
    assert_eq!(
        distinct.len(),
        4,
        "home, io and two pool arbiters are four threads"
    );
    let home = threads.iter().find(|(n, _)| *n == "home").unwrap();
    assert_eq!(
        home.1,
        std::thread::current().id(),
        "Parent placement at the root: the tree's own arbiter"
    );
    let report = handle.shutdown("test").await;
    assert_eq!(report.outcome, TreeOutcome::Clean, "{report}");
}

#[actix::test]
async fn children_are_found_by_path_with_their_type() {
    init_log();
    let log = Log::default();
    let (spec, handled) = probe("p", "s/p", &log, Behaviour::default());
    let handle = Tree::builder("lookup")
        .child(SupervisorSpec::new("s").child(spec))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let addr = handle.addr::<Probe>("s/p").expect("a Probe at s/p");
    assert_eq!(addr.send(Work).await.unwrap(), 1);
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    assert!(
        handle.addr::<Probe>("s").is_none(),
        "a supervisor has no address"
    );
    assert!(handle.addr::<Probe>("s/q").is_none());
    assert!(handle.addr::<Blocker>("s/p").is_none(), "wrong type");
    handle.shutdown("test").await;
}

struct Blocker;
impl Actor for Blocker {
    type Context = Context<Self>;
}
impl Worker for Blocker {}

#[actix::test]
async fn a_bounded_mailbox_refuses_try_send_when_full_and_send_waits_for_room() {
    init_log();
    let log = Log::default();
    let (spec, handled) = probe("small", "small", &log, Behaviour::default());
    let spec = spec.capacity(4).placement(Placement::Named("own".into()));
    let addr = spec.addr();
    let handle = Tree::builder("bounded")
        .child(spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    // Keep the worker busy so the mailbox fills up.
    let (blocker, entered) = block(Duration::from_millis(300));
    addr.do_send(blocker).unwrap();
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("the probe is busy");
    for _ in 0..4 {
        addr.try_send(Work).unwrap();
    }
    assert!(
        matches!(addr.try_send(Work), Err(SendError::Full(_))),
        "full at 4"
    );
    // `send` waits until the worker makes room, then gets its answer.
    let answer = addr.send(Work).await.unwrap();
    assert_eq!(answer, 5);
    let report = handle.shutdown("test").await;
    assert_eq!(handled.load(Ordering::SeqCst), 5);
    assert_eq!(report.find("small").unwrap().dropped, 0);
}

/// Stops itself: on `Quit` while running, or in `on_stopping` when told so.
struct Quitter {
    quit_when_told: bool,
}
impl Actor for Quitter {
    type Context = Context<Self>;
}
impl Worker for Quitter {
    fn on_stopping(&mut self, ctx: &mut Context<Self>, _: &Stopping) {
        if self.quit_when_told {
            ctx.stop();
        }
    }
}
#[derive(Message)]
#[rtype(result = "()")]
struct Quit;
impl Handler<Quit> for Quitter {
    type Result = ();
    fn handle(&mut self, _: Quit, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

#[actix::test]
async fn a_worker_that_stops_itself_is_not_running_or_failed_if_it_abandons_its_drain() {
    init_log();
    let log = Log::default();
    // Transient: a normal stop (`ctx.stop()`) is not restarted.
    let early = ChildSpec::worker("early", || Quitter {
        quit_when_told: false,
    })
    .restart(Restart::Transient);
    let early_addr = early.addr();
    let handle = Tree::builder("quitters")
        .child(early)
        .child(ChildSpec::worker("abandons", || Quitter {
            quit_when_told: true,
        }))
        .child(simple("fine", &log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let _ = early_addr.send(Quit).await; // answered or not, it is gone afterwards
                                         // Once the tree has seen it stop, sends fail at the sender instead of queueing for nobody.
    let t0 = Instant::now();
    while early_addr.connected() && t0.elapsed() < Duration::from_secs(10) {
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(matches!(
        early_addr.do_send(Quit),
        Err(SendError::Closed(_))
    ));

    let report = handle.shutdown("test").await;
    assert_eq!(report.find("early").unwrap().outcome, Outcome::NotRunning);
    assert!(
        matches!(&report.find("abandons").unwrap().outcome, Outcome::Failed(m) if m.contains("without acknowledging")),
        "{report}"
    );
    assert_eq!(report.find("fine").unwrap().outcome, Outcome::Drained);
    assert_eq!(report.exit_code(), EXIT_FAILED);
}

#[actix::test]
async fn a_worker_that_stops_itself_before_reaching_stopping_is_not_running() {
    init_log();
    // On its own thread, blocked, with a `Quit` queued behind the block: the shutdown queues
    // `Stopping` behind the `Quit`, so the worker stops on its own before it sees `Stopping`.
    let spec = ChildSpec::worker("q", || Quitter {
        quit_when_told: false,
    })
    .placement(Placement::Named("own".into()));
    let addr = spec.addr();
    let handle = Tree::builder("t")
        .child(spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let (entered_tx, entered) = std::sync::mpsc::channel();
    addr.do_send(Hold(Duration::from_millis(200), entered_tx))
        .unwrap();
    addr.do_send(Quit).unwrap();
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("holding");
    let report = handle.shutdown("test").await;
    assert_eq!(
        report.find("q").unwrap().outcome,
        Outcome::NotRunning,
        "{report}"
    );
    assert_eq!(report.exit_code(), EXIT_CLEAN);
}

#[derive(Message)]
#[rtype(result = "()")]
struct Hold(Duration, std::sync::mpsc::Sender<()>);
impl Handler<Hold> for Quitter {
    type Result = ();
    fn handle(&mut self, m: Hold, _: &mut Context<Self>) {
        let _ = m.1.send(());
        std::thread::sleep(m.0);
    }
}

#[actix::test]
async fn a_supervisor_aborted_before_being_told_timed_out_with_its_children() {
    init_log();
    let log = Log::default();
    // `s` has 100 ms; `front` needs 1 s and `inner` waits for it, so `inner` is still waiting to
    // be told when `s`'s deadline aborts everything under it.
    let slow = Behaviour {
        drained_delay: Some(Duration::from_secs(1)),
        ..Behaviour::default()
    };
    let tree = Tree::builder("t")
        .child(
            SupervisorSpec::new("s")
                .budget(Duration::from_millis(100))
                .child(probe("front", "s/front", &log, slow).0.depends_on("inner"))
                .child(nested("inner", "s/inner", &log, &["back"]))
                .child(SupervisorSpec::new("empty")),
        )
        .build()
        .unwrap();
    let handle = tree.start().await.unwrap();
    let report = handle.shutdown("test").await;
    for path in ["s", "s/front", "s/inner", "s/inner/back"] {
        assert_eq!(
            report.find(path).unwrap().outcome,
            Outcome::TimedOut,
            "{path}: {report}"
        );
    }
    // Told at once (no dependency), an empty supervisor acknowledges at once.
    assert_eq!(report.find("s/empty").unwrap().outcome, Outcome::Drained);
    assert_eq!(report.find("s/inner").unwrap().told, None);
}

#[actix::test]
async fn force_shutdown_aborts_what_is_pending_at_once() {
    init_log();
    let log = Log::default();
    let handle = Tree::builder("forced")
        .child(stuck("stuck", "stuck", &log, Duration::from_secs(20)))
        .child(simple("fine", &log))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let graceful = handle.shutdown("test");
    // Wait until the stuck worker is told and hanging, then force.
    let t0 = Instant::now();
    while log.pos(&Ev::Stopping("stuck".into())).is_none() && t0.elapsed() < Duration::from_secs(10)
    {
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    let forced_at = Instant::now();
    let forced = handle.force_shutdown("operator").await;
    assert!(
        forced_at.elapsed() < Duration::from_secs(3),
        "no waiting for the 20 s budget"
    );
    let report = graceful.await;
    assert!(Arc::ptr_eq(&report, &forced), "one shutdown, one report");
    assert_eq!(report.outcome, TreeOutcome::Forced);
    assert_eq!(report.exit_code(), EXIT_FORCED);
    assert_eq!(report.reason, "test", "the first trigger's reason");
    assert_eq!(report.find("stuck").unwrap().outcome, Outcome::TimedOut);
    assert_eq!(report.find("fine").unwrap().outcome, Outcome::Drained);
}

#[test]
fn a_tree_that_owns_the_system_stops_it_with_the_reports_exit_code() {
    let sys = actix::System::new();
    let log = Log::default();
    let tree = Tree::builder("owner")
        .child(stuck("stuck", "stuck", &log, Duration::from_millis(200)))
        .stop_system(true)
        .build()
        .unwrap();
    sys.runtime().spawn(async move {
        let handle = tree.start().await.unwrap();
        drop(handle.shutdown("test"));
    });
    let code = sys.run_with_code().expect("the System ran");
    assert_eq!(
        code, EXIT_TIMED_OUT,
        "the System stopped with the report's code"
    );
}

#[actix::test]
async fn workers_can_run_on_an_arbiter_the_caller_owns() {
    init_log();
    let log = Log::default();
    let arbiter = Arbiter::new();
    let (spec, handled) = probe("mine", "mine", &log, Behaviour::default());
    let addr = spec.addr();
    let handle = Tree::builder("owned")
        .child(spec.placement(Placement::Arbiter(arbiter.handle())))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    assert_eq!(addr.send(Work).await.unwrap(), 1);
    let report = handle.shutdown("test").await;
    assert_eq!(report.outcome, TreeOutcome::Clean);
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    // The tree stops only the arbiters it created: the caller's still runs tasks.
    let (tx, rx) = tokio::sync::oneshot::channel();
    assert!(arbiter.spawn(async move {
        let _ = tx.send(());
    }));
    rx.await.expect("the caller's arbiter is still running");
    arbiter.stop();
}
