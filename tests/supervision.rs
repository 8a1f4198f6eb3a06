//! Restarts, end to end: restart policies × strategies, intensity, backoff, panics in every hook,
//! the stable address across restarts, and what the report says about them.
//!
//! Every test drives `Sub`, a worker that records its life (which instance started, was told
//! `Stopping`, drained) in a shared log that tests can await, and that can be made to panic or
//! stop itself on demand.

mod common;

use std::collections::{HashMap, HashSet};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_supervisor::*;
use common::init_log;
use parking_lot::Mutex;

/// How long a test waits for something that should happen within milliseconds.
const LONG: Duration = Duration::from_secs(20);
/// The same, inside the matrix, where one broken case must not stall the others for long.
const CASE_WAIT: Duration = Duration::from_secs(10);
/// How long to look for something that must not happen (an extra restart) before concluding it
/// did not.
const SETTLE: Duration = Duration::from_millis(150);

// ----- the recording worker ---------------------------------------------------------------------

/// What the workers of a test did, in the order they did it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum E {
    /// Instance `n` (1 for the first) of the child at this path ran `started`.
    Started(String, u32),
    /// It ran `on_stopping`.
    Stopping(String, u32),
    /// It ran `on_drained`.
    Drained(String, u32),
    /// It is about to panic, or to stop itself, in a handler.
    Ending(String, u32),
    /// A point in the test.
    Mark(&'static str),
}

#[derive(Default)]
struct RecInner {
    events: Mutex<Vec<(Instant, E)>>,
    /// What each `Stopping` carried: (path, instance, reason, restarting).
    reasons: Mutex<Vec<(String, u32, String, bool)>>,
    notify: tokio::sync::Notify,
}

/// The shared, awaitable event log.
#[derive(Clone, Default)]
struct Rec(Arc<RecInner>);

impl Rec {
    fn push(&self, e: E) {
        self.0.events.lock().push((Instant::now(), e));
        self.0.notify.notify_waiters();
    }

    fn events(&self) -> Vec<E> {
        self.0
            .events
            .lock()
            .iter()
            .map(|(_, e)| e.clone())
            .collect()
    }

    fn has(&self, e: &E) -> bool {
        self.0.events.lock().iter().any(|(_, x)| x == e)
    }

    fn pos(&self, e: &E) -> Option<usize> {
        self.0.events.lock().iter().position(|(_, x)| x == e)
    }

    fn at(&self, e: &E) -> Instant {
        self.0
            .events
            .lock()
            .iter()
            .find(|(_, x)| x == e)
            .map(|(t, _)| *t)
            .unwrap_or_else(|| panic!("{e:?} not recorded: {:?}", self.events()))
    }

    /// The events strictly between two marks (or to the end, if the second is not there).
    fn between(&self, from: &'static str, to: &'static str) -> Vec<E> {
        let ev = self.events();
        let start = ev
            .iter()
            .position(|e| *e == E::Mark(from))
            .map_or(0, |p| p + 1);
        let end = ev
            .iter()
            .position(|e| *e == E::Mark(to))
            .unwrap_or(ev.len())
            .max(start);
        ev[start..end].to_vec()
    }

    fn reason(&self, path: &str, inst: u32) -> Option<String> {
        self.0
            .reasons
            .lock()
            .iter()
            .find(|(p, i, _, _)| p == path && *i == inst)
            .map(|(_, _, r, _)| r.clone())
    }

    /// Whether the `Stopping` instance `inst` of `path` got said a restart would follow.
    fn restarting(&self, path: &str, inst: u32) -> Option<bool> {
        self.0
            .reasons
            .lock()
            .iter()
            .find(|(p, i, _, _)| p == path && *i == inst)
            .map(|(_, _, _, r)| *r)
    }

    /// Waits until `pred` holds over the events, or `limit` passes.
    async fn wait(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&[E]) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.0.notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a push between the check and the await wakes us.
            notified.as_mut().enable();
            if pred(&self.events()) {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "timed out after {limit:?} waiting for {what}; events: {:?}",
                    self.events()
                ));
            }
            let _ = actix_rt::time::timeout(left, notified).await;
        }
    }

    /// Waits for one event; fails the test if it does not come.
    async fn expect(&self, e: E) {
        let what = format!("{e:?}");
        if let Err(m) = self.wait(&what, LONG, |ev| ev.contains(&e)).await {
            panic!("{m}");
        }
    }
}

/// Polls a condition no event announces (an address closing) until it holds or `limit` passes.
async fn until(what: &str, limit: Duration, cond: impl Fn() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() >= deadline {
            return Err(format!("timed out after {limit:?} waiting for {what}"));
        }
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// How a `Sub` misbehaves. Instances are numbered from 1 by its factory.
#[derive(Clone, Default)]
struct Faults {
    /// `started` panics in every instance from this one on.
    started_from: Option<u32>,
    /// `on_stopping` panics in this instance (0: in every instance).
    stopping_in: Option<u32>,
    /// `on_drained` panics in this instance (0: in every instance).
    drained_in: Option<u32>,
    /// `on_stopping` sends the worker a `Boom` through its `ChildAddr`, so a handler panics
    /// while it drains.
    boom_while_draining: bool,
    /// `Num(n)` panics when `n` is a multiple of this.
    num_panics_every: Option<u64>,
    /// The factory fails on these calls (counted from 1).
    factory_fails: Option<RangeInclusive<u32>>,
}

fn hits(fault: Option<u32>, inst: u32) -> bool {
    fault.is_some_and(|k| k == 0 || k == inst)
}

/// What all instances of one child share with the test.
#[derive(Default)]
struct SubShared {
    /// The child's own address, for `boom_while_draining`.
    me: OnceLock<ChildAddr<Sub>>,
    /// Every `Num` handled, in the order handled.
    nums: Mutex<Vec<u64>>,
    /// `Num`s that made it panic.
    panics: AtomicU64,
    /// Factory calls.
    calls: AtomicU32,
}

struct Sub {
    path: String,
    inst: u32,
    rec: Rec,
    faults: Faults,
    shared: Arc<SubShared>,
}

impl Actor for Sub {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        if self.faults.started_from.is_some_and(|k| self.inst >= k) {
            panic!("{} refuses to start (instance {})", self.path, self.inst);
        }
        self.rec.push(E::Started(self.path.clone(), self.inst));
    }
}

impl Worker for Sub {
    fn on_stopping(&mut self, _: &mut Context<Self>, stopping: &Stopping) {
        self.rec.0.reasons.lock().push((
            self.path.clone(),
            self.inst,
            stopping.reason.to_string(),
            stopping.restarting(),
        ));
        self.rec.push(E::Stopping(self.path.clone(), self.inst));
        if hits(self.faults.stopping_in, self.inst) {
            panic!(
                "{} panics in on_stopping (instance {})",
                self.path, self.inst
            );
        }
        if self.faults.boom_while_draining {
            let me = self.shared.me.get().expect("the address is set");
            assert!(me.do_send(Boom).is_ok(), "open while draining");
        }
    }

    fn on_drained(&mut self, _: &mut Context<Self>) -> Option<HookFuture<Self>> {
        if hits(self.faults.drained_in, self.inst) {
            panic!(
                "{} panics in on_drained (instance {})",
                self.path, self.inst
            );
        }
        self.rec.push(E::Drained(self.path.clone(), self.inst));
        None
    }
}

/// Panics in its handler.
#[derive(Message)]
#[rtype(result = "()")]
struct Boom;

/// Stops the worker normally (`ctx.stop()`).
#[derive(Message)]
#[rtype(result = "()")]
struct Quit;

/// Answers the number of the instance that handles it.
#[derive(Message, Debug, PartialEq, Eq)]
#[rtype(result = "u32")]
struct Ping;

/// A numbered message: recorded and echoed, or a panic (see `Faults::num_panics_every`).
#[derive(Message)]
#[rtype(result = "u64")]
struct Num(u64);

impl Handler<Boom> for Sub {
    type Result = ();
    fn handle(&mut self, _: Boom, _: &mut Context<Self>) {
        self.rec.push(E::Ending(self.path.clone(), self.inst));
        panic!("{} boom {}", self.path, self.inst);
    }
}

impl Handler<Quit> for Sub {
    type Result = ();
    fn handle(&mut self, _: Quit, ctx: &mut Context<Self>) {
        self.rec.push(E::Ending(self.path.clone(), self.inst));
        ctx.stop();
    }
}

impl Handler<Ping> for Sub {
    type Result = u32;
    fn handle(&mut self, _: Ping, _: &mut Context<Self>) -> u32 {
        self.inst
    }
}

impl Handler<Num> for Sub {
    type Result = u64;
    fn handle(&mut self, Num(n): Num, _: &mut Context<Self>) -> u64 {
        if self.faults.num_panics_every.is_some_and(|k| n % k == 0) {
            self.shared.panics.fetch_add(1, Ordering::SeqCst);
            panic!("{} refuses {n}", self.path);
        }
        self.shared.nums.lock().push(n);
        n
    }
}

/// A child's spec, with its stable address and what its instances share.
struct Kid {
    spec: WorkerSpec<Sub>,
    addr: ChildAddr<Sub>,
    shared: Arc<SubShared>,
}

impl SubShared {
    /// Factory calls so far (instances made, plus failed attempts).
    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

/// A `Sub` named `name` whose events carry `path`.
fn kid(name: &str, path: &str, rec: &Rec, faults: Faults) -> Kid {
    let shared = Arc::new(SubShared::default());
    let (p, r, f, s) = (path.to_owned(), rec.clone(), faults, shared.clone());
    let spec = ChildSpec::try_worker(name, move || {
        let inst = s.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if f.factory_fails.as_ref().is_some_and(|c| c.contains(&inst)) {
            return Err(format!("no database for {p} (attempt {inst})").into());
        }
        Ok(Sub {
            path: p.clone(),
            inst,
            rec: r.clone(),
            faults: f.clone(),
            shared: s.clone(),
        })
    });
    let addr = spec.addr();
    let _ = shared.me.set(addr.clone());
    Kid { spec, addr, shared }
}

fn plain(name: &str, path: &str, rec: &Rec) -> Kid {
    kid(name, path, rec, Faults::default())
}

fn entry<'a>(report: &'a ShutdownReport, path: &str) -> &'a ChildReport {
    report
        .find(path)
        .unwrap_or_else(|| panic!("{path} in the report:\n{report}"))
}

/// Polls a future once: its output if it is ready at once. (A `send` is pushed to the mailbox
/// at its first poll.)
async fn poll_once<F: std::future::Future + Unpin>(fut: F) -> Option<F::Output> {
    let mut fut = fut;
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut fut).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

async fn ping(addr: &ChildAddr<Sub>) -> u32 {
    actix_rt::time::timeout(LONG, addr.send(Ping))
        .await
        .expect("answered in time")
        .expect("answered")
}

/// The tree's report once it shut down on its own.
async fn ended_by_itself(handle: &TreeHandle) -> Arc<ShutdownReport> {
    actix_rt::time::timeout(LONG, handle.wait())
        .await
        .expect("the tree shut itself down")
}

// ----- 1. policy × strategy ---------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// A handler panics.
    Panic,
    /// The actor calls `ctx.stop()`.
    Stop,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    strategy: Strategy,
    /// Policy of the child that ends (the others are `Permanent`).
    policy: Restart,
    end: End,
    /// `c` depends on `b` depends on `a`, declared `c, b, a`; otherwise no dependencies,
    /// declared `a, b, c`. Either way the start order is `a, b, c`.
    chain: bool,
    /// The child that ends.
    failing: &'static str,
}

const START_ORDER: [&str; 3] = ["a", "b", "c"];

fn matrix_cases(strategy: Strategy) -> Vec<Case> {
    let mut cases = Vec::new();
    for policy in [Restart::Permanent, Restart::Transient, Restart::Temporary] {
        for end in [End::Panic, End::Stop] {
            cases.push(Case {
                strategy,
                policy,
                end,
                chain: false,
                failing: "b",
            });
        }
    }
    for failing in ["a", "b"] {
        cases.push(Case {
            strategy,
            policy: Restart::Permanent,
            end: End::Panic,
            chain: true,
            failing,
        });
    }
    cases
}

/// Runs one case: a supervisor `s` with `a`, `b`, `c` (and `other` beside `s`), makes
/// `case.failing` end, and checks who was stopped, who was started again, in which order, and
/// what the report says. Returns every discrepancy found.
async fn run_case(case: Case) -> Result<(), String> {
    let rec = Rec::default();
    let path = |n: &str| format!("s/{n}");
    let kids: Vec<(&str, Kid)> = START_ORDER
        .iter()
        .map(|n| (*n, plain(n, &path(n), &rec)))
        .collect();
    let addrs: HashMap<&str, ChildAddr<Sub>> =
        kids.iter().map(|(n, k)| (*n, k.addr.clone())).collect();
    let mut specs = Vec::new();
    for (n, k) in kids {
        let mut spec = k.spec;
        if n == case.failing {
            spec = spec.restart(case.policy);
        }
        if case.chain {
            spec = match n {
                "b" => spec.depends_on("a"),
                "c" => spec.depends_on("b"),
                _ => spec,
            };
        }
        specs.push(spec);
    }
    if case.chain {
        specs.reverse();
    }
    let other = plain("other", "other", &rec);
    let other_addr = other.addr.clone();
    let handle = Tree::builder("matrix")
        .child(
            SupervisorSpec::new("s")
                .strategy(case.strategy)
                .children(specs),
        )
        .child(other.spec)
        .build()
        .map_err(|e| format!("build: {e}"))?
        .start()
        .await
        .map_err(|e| format!("start: {e}"))?;

    let restarted = case.policy.restarts_after(case.end == End::Panic);
    let fpos = START_ORDER.iter().position(|n| *n == case.failing).unwrap();
    let affected: Vec<&str> = match (restarted, case.strategy) {
        (false, _) => vec![],
        (true, Strategy::OneForOne) => vec![case.failing],
        (true, Strategy::OneForAll) => START_ORDER.to_vec(),
        (true, Strategy::RestForOne) => START_ORDER[fpos..].to_vec(),
    };
    let stopped: Vec<&str> = affected
        .iter()
        .copied()
        .filter(|n| *n != case.failing)
        .collect();

    rec.push(E::Mark("trigger"));
    let failing = &addrs[case.failing];
    let sent = match case.end {
        End::Panic => failing.do_send(Boom).is_ok(),
        End::Stop => failing.do_send(Quit).is_ok(),
    };
    if !sent {
        return Err("the failing child refused its message".into());
    }

    let mut problems = Vec::new();
    if restarted {
        let wanted: Vec<E> = affected.iter().map(|n| E::Started(path(n), 2)).collect();
        if let Err(e) = rec
            .wait("the affected children's new instances", CASE_WAIT, |ev| {
                wanted.iter().all(|w| ev.contains(w))
            })
            .await
        {
            problems.push(e);
        }
    } else if let Err(e) = until(
        "the address of the child that stays down to refuse",
        CASE_WAIT,
        || !failing.connected(),
    )
    .await
    {
        problems.push(e);
    }
    for n in START_ORDER {
        if n == case.failing && !restarted {
            let refused = failing.do_send(Ping);
            if !matches!(refused, Err(SendError::Closed(Ping))) {
                problems.push(format!(
                    "{n} stays down, so a send must fail with Closed and the message handed \
                     back; got {refused:?}"
                ));
            }
            continue;
        }
        let want = if affected.contains(&n) { 2 } else { 1 };
        match actix_rt::time::timeout(CASE_WAIT, addrs[n].send(Ping)).await {
            Ok(Ok(got)) if got == want => {}
            got => problems.push(format!(
                "ping {n}: expected an answer from instance {want}, got {got:?}"
            )),
        }
    }
    match actix_rt::time::timeout(CASE_WAIT, other_addr.send(Ping)).await {
        Ok(Ok(1)) => {}
        got => problems.push(format!(
            "other (outside s) must be untouched, its ping got {got:?}"
        )),
    }
    // Anything restarted that should not have been shows up by now.
    actix_rt::time::sleep(SETTLE).await;
    rec.push(E::Mark("shutdown"));
    let report = handle.shutdown("test").await;

    // Who was stopped and started again between the failure and the shutdown.
    let window = rec.between("trigger", "shutdown");
    let pos = |e: &E| window.iter().position(|x| x == e);
    let starts: Vec<E> = window
        .iter()
        .filter(|e| matches!(e, E::Started(..)))
        .cloned()
        .collect();
    let want_starts: Vec<E> = affected.iter().map(|n| E::Started(path(n), 2)).collect();
    if starts != want_starts {
        problems.push(format!(
            "started again: expected {want_starts:?} (in start order), saw {starts:?}"
        ));
    }
    let mut stops: Vec<String> = window
        .iter()
        .filter(|e| matches!(e, E::Stopping(..) | E::Drained(..)))
        .map(|e| format!("{e:?}"))
        .collect();
    stops.sort();
    let mut want_stops: Vec<String> = stopped
        .iter()
        .flat_map(|n| [E::Stopping(path(n), 1), E::Drained(path(n), 1)])
        .map(|e| format!("{e:?}"))
        .collect();
    want_stops.sort();
    if stops != want_stops {
        problems.push(format!(
            "told Stopping and drained for the restart: expected {want_stops:?}, saw {stops:?}"
        ));
    }
    if let Some(first_start) = starts.first().and_then(pos) {
        for e in window
            .iter()
            .filter(|e| matches!(e, E::Stopping(..) | E::Drained(..)))
        {
            if pos(e) > Some(first_start) {
                problems.push(format!(
                    "{e:?} came after a new instance started: every stop must come before \
                     every start"
                ));
            }
        }
    }
    if case.chain {
        // Dependents first: a dependent's drain ends before its dependency is told.
        for (dependent, dependency) in [("c", "b"), ("c", "a"), ("b", "a")] {
            if stopped.contains(&dependent) && stopped.contains(&dependency) {
                let drained = pos(&E::Drained(path(dependent), 1));
                let told = pos(&E::Stopping(path(dependency), 1));
                if !(drained.is_some() && told.is_some() && drained < told) {
                    problems.push(format!(
                        "{dependent} depends on {dependency}: it must have drained before \
                         {dependency} was told (drained at {drained:?}, told at {told:?})"
                    ));
                }
            }
        }
    }
    for n in &stopped {
        match rec.reason(&path(n), 1) {
            Some(r) if r.to_lowercase().contains("restart") => {}
            r => problems.push(format!(
                "{n} was stopped for a restart; its Stopping reason must say so, got {r:?}"
            )),
        }
    }

    // The report.
    for n in START_ORDER {
        let Some(r) = report.find(&path(n)) else {
            problems.push(format!("{n} missing from the report"));
            continue;
        };
        let is_failing = n == case.failing;
        let want_restarts = affected.contains(&n) as u32;
        if r.restarts != want_restarts {
            problems.push(format!(
                "report: {n}.restarts = {}, expected {want_restarts}",
                r.restarts
            ));
        }
        let want_outcome = match (is_failing && !restarted, case.end) {
            (true, End::Panic) => Outcome::Panicked(format!("s/{n} boom 1")),
            (true, End::Stop) => Outcome::NotRunning,
            (false, _) => Outcome::Drained,
        };
        if r.outcome != want_outcome {
            problems.push(format!(
                "report: {n}.outcome = {:?}, expected {want_outcome:?}",
                r.outcome
            ));
        }
        let want_last =
            (is_failing && case.end == End::Panic).then(|| format!("panicked: s/{n} boom 1"));
        if r.last_failure != want_last {
            problems.push(format!(
                "report: {n}.last_failure = {:?}, expected {want_last:?}",
                r.last_failure
            ));
        }
        let want_dropped = (is_failing && case.end == End::Panic) as u64;
        if r.dropped != want_dropped {
            problems.push(format!(
                "report: {n}.dropped = {}, expected {want_dropped} (only the message being \
                 handled when it panicked is lost)",
                r.dropped
            ));
        }
    }
    for p in ["s", "other"] {
        match report.find(p) {
            Some(r) if r.restarts == 0 && r.outcome == Outcome::Drained => {}
            r => problems.push(format!(
                "report: {p} must be untouched (drained, 0 restarts), got {:?}",
                r.map(|r| (&r.outcome, r.restarts))
            )),
        }
    }
    let want_tree = if case.end == End::Panic && !restarted {
        TreeOutcome::Failed
    } else {
        TreeOutcome::Clean
    };
    if report.outcome != want_tree {
        problems.push(format!(
            "report: outcome {:?}, expected {want_tree:?}",
            report.outcome
        ));
    }

    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}\n    events after the trigger: {:?}\n{report}",
            problems.join("\n    "),
            rec.between("trigger", "none")
        ))
    }
}

async fn run_matrix(strategy: Strategy) {
    init_log();
    let cases = matrix_cases(strategy);
    let mut failures = Vec::new();
    for case in &cases {
        if let Err(e) = run_case(*case).await {
            failures.push(format!("{case:?}:\n    {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[actix::test]
async fn one_for_one_restarts_only_the_child_that_ended_as_its_policy_says() {
    run_matrix(Strategy::OneForOne).await;
}

#[actix::test]
async fn one_for_all_restarts_every_sibling_as_the_policy_of_the_ended_child_says() {
    run_matrix(Strategy::OneForAll).await;
}

#[actix::test]
async fn rest_for_one_restarts_the_child_and_those_started_after_it() {
    run_matrix(Strategy::RestForOne).await;
}

// ----- 2. intensity -----------------------------------------------------------------------------

#[actix::test]
async fn a_supervisor_over_its_intensity_gives_up_and_its_parent_restarts_it() {
    init_log();
    let rec = Rec::default();
    let w = plain("w", "s/w", &rec);
    let x = plain("x", "s/x", &rec);
    let other = plain("other", "other", &rec);
    let (wa, xa, oa) = (w.addr.clone(), x.addr.clone(), other.addr.clone());
    let handle = Tree::builder("escalate")
        .child(
            SupervisorSpec::new("s")
                .intensity(2, Duration::from_secs(10))
                .child(w.spec)
                .child(x.spec),
        )
        .child(other.spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    // Three failures in a row: the third is one more than `s` allows.
    for _ in 0..3 {
        wa.do_send(Boom).unwrap();
    }
    // `s` restarts w twice (instances 2 and 3); the third panic makes it give up: it drains x
    // and ends as failed; the root (Permanent `s`, within its own intensity) restarts `s`,
    // which starts fresh instances of both.
    rec.expect(E::Started("s/w".into(), 4)).await;
    rec.expect(E::Started("s/x".into(), 2)).await;
    assert_eq!(ping(&wa).await, 4);
    assert_eq!(ping(&xa).await, 2);
    assert_eq!(ping(&oa).await, 1, "the sibling of s is untouched");
    assert_eq!(handle.phase(), Phase::Running);
    let at = |e: E| {
        rec.pos(&e)
            .unwrap_or_else(|| panic!("{e:?}: {:?}", rec.events()))
    };
    assert!(at(E::Started("s/w".into(), 3)) < at(E::Ending("s/w".into(), 3)));
    assert!(
        at(E::Ending("s/w".into(), 3)) < at(E::Stopping("s/x".into(), 1)),
        "x is stopped only when s gives up"
    );
    assert!(at(E::Drained("s/x".into(), 1)) < at(E::Started("s/w".into(), 4)));
    assert!(at(E::Drained("s/x".into(), 1)) < at(E::Started("s/x".into(), 2)));
    assert!(!rec.has(&E::Stopping("other".into(), 1)));

    let report = handle.shutdown("test").await;
    assert_eq!(report.outcome, TreeOutcome::Clean, "{report}");
    let s = entry(&report, "s");
    assert_eq!(s.restarts, 1, "{report}");
    assert!(
        s.last_failure
            .as_deref()
            .is_some_and(|f| f.starts_with("failed")),
        "s gave up, which is a failure: {:?}",
        s.last_failure
    );
    let w = entry(&report, "s/w");
    assert_eq!(w.restarts, 3, "instances 2, 3 and 4: {report}");
    assert_eq!(w.last_failure.as_deref(), Some("panicked: s/w boom 3"));
    assert_eq!(
        w.dropped, 3,
        "each Boom was lost with the instance it killed"
    );
    assert_eq!(entry(&report, "s/x").restarts, 1, "{report}");
    assert_eq!(entry(&report, "other").restarts, 0);
}

#[actix::test]
async fn a_temporary_supervisor_that_gives_up_stays_down_with_its_children() {
    init_log();
    let rec = Rec::default();
    let w = plain("w", "s/w", &rec);
    let x = plain("x", "s/x", &rec);
    let other = plain("other", "other", &rec);
    let (wa, xa, oa) = (w.addr.clone(), x.addr.clone(), other.addr.clone());
    let handle = Tree::builder("gone")
        .child(
            SupervisorSpec::new("s")
                .restart(Restart::Temporary)
                .intensity(1, Duration::from_secs(10))
                .child(w.spec)
                .child(x.spec),
        )
        .child(other.spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wa.do_send(Boom).unwrap();
    wa.do_send(Boom).unwrap();
    until("s's children to refuse sends", LONG, || {
        !wa.connected() && !xa.connected()
    })
    .await
    .unwrap();
    assert!(matches!(xa.do_send(Ping), Err(SendError::Closed(Ping))));
    assert!(matches!(wa.do_send(Ping), Err(SendError::Closed(Ping))));
    assert!(matches!(xa.send(Ping).await, Err(MailboxError::Closed)));
    assert_eq!(ping(&oa).await, 1, "the rest of the tree runs on");
    assert_eq!(handle.phase(), Phase::Running);
    actix_rt::time::sleep(SETTLE).await;
    assert_eq!(x.shared.calls(), 1, "not restarted: {:?}", rec.events());
    assert_eq!(w.shared.calls(), 2, "restarted once, then s gave up");

    let report = handle.shutdown("test").await;
    let s = entry(&report, "s");
    assert!(matches!(s.outcome, Outcome::Failed(_)), "{report}");
    assert_eq!(s.restarts, 0);
    assert_eq!(
        entry(&report, "s/w").outcome,
        Outcome::Panicked("s/w boom 2".into()),
        "{report}"
    );
    assert_eq!(entry(&report, "s/w").restarts, 1);
    // s drained it when giving up; when the shutdown came it was not running.
    assert_eq!(
        entry(&report, "s/x").outcome,
        Outcome::NotRunning,
        "{report}"
    );
    assert_eq!(entry(&report, "other").outcome, Outcome::Drained);
    assert_eq!(report.outcome, TreeOutcome::Failed);
}

#[actix::test]
async fn a_root_over_its_intensity_shuts_the_tree_down_as_failed() {
    init_log();
    let rec = Rec::default();
    // w stops itself normally; as Permanent it is restarted each time, and each restart counts.
    let w = plain("w", "w", &rec);
    let x = plain("x", "x", &rec);
    let wa = w.addr.clone();
    let handle = Tree::builder("root-gives-up")
        .intensity(1, Duration::from_secs(10))
        .child(w.spec)
        .child(x.spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wa.do_send(Quit).unwrap();
    rec.expect(E::Started("w".into(), 2)).await;
    wa.do_send(Quit).unwrap();
    // Nobody calls shutdown: the root gives up and the tree shuts itself down.
    let report = ended_by_itself(&handle).await;
    assert!(
        report.reason.to_lowercase().contains("intensity"),
        "the reason names the intensity: {:?}",
        report.reason
    );
    assert!(
        report.iter().all(|c| !c.outcome.is_failure()),
        "every child ended cleanly: {report}"
    );
    assert_eq!(
        report.outcome,
        TreeOutcome::Failed,
        "giving up is a failure even if everything drained cleanly: {report}"
    );
    assert_eq!(report.exit_code(), EXIT_FAILED);
    assert_eq!(entry(&report, "w").outcome, Outcome::NotRunning);
    assert_eq!(entry(&report, "w").restarts, 1);
    assert_eq!(entry(&report, "x").outcome, Outcome::Drained);
    assert_eq!(entry(&report, "x").restarts, 0);
    assert!(!rec.has(&E::Started("w".into(), 3)));
    assert_eq!(handle.phase(), Phase::Stopped);
    assert!(matches!(wa.do_send(Ping), Err(SendError::Closed(Ping))));
}

#[actix::test]
async fn restarts_spread_wider_than_the_window_never_exhaust_the_intensity() {
    init_log();
    const WINDOW: Duration = Duration::from_millis(300);
    let rec = Rec::default();
    let w = plain("w", "s/w", &rec);
    let x = plain("x", "s/x", &rec);
    let (wa, xa) = (w.addr.clone(), x.addr.clone());
    let handle = Tree::builder("spread")
        .child(
            SupervisorSpec::new("s")
                .intensity(2, WINDOW)
                .child(w.spec)
                .child(x.spec),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    // Five failures, more than the 2 allowed, but each restart is at least two windows after
    // the previous one, so no window holds more than one.
    for i in 1..=5 {
        wa.do_send(Boom).unwrap();
        rec.expect(E::Started("s/w".into(), i + 1)).await;
        actix_rt::time::sleep(2 * WINDOW).await;
    }
    assert_eq!(ping(&wa).await, 6);
    assert_eq!(
        ping(&xa).await,
        1,
        "s never gave up: x is its first instance"
    );
    assert!(
        !rec.has(&E::Stopping("s/x".into(), 1)),
        "{:?}",
        rec.events()
    );
    assert_eq!(handle.phase(), Phase::Running);
    let report = handle.shutdown("test").await;
    assert_eq!(entry(&report, "s").restarts, 0, "{report}");
    assert_eq!(entry(&report, "s/w").restarts, 5, "{report}");
    assert_eq!(entry(&report, "s/x").restarts, 0, "{report}");
    assert_eq!(report.outcome, TreeOutcome::Clean, "{report}");
}

#[actix::test]
async fn a_one_for_all_restart_counts_once_against_the_intensity() {
    init_log();
    let rec = Rec::default();
    let kids = ["a", "b", "c"].map(|n| plain(n, &format!("s/{n}"), &rec));
    let addrs = kids.each_ref().map(|k| k.addr.clone());
    let [a, b, c] = kids;
    let handle = Tree::builder("counts-once")
        .child(
            SupervisorSpec::new("s")
                .strategy(Strategy::OneForAll)
                .intensity(1, Duration::from_secs(10))
                .child(a.spec)
                .child(b.spec)
                .child(c.spec),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    // One failure restarts three children: one restart decision, within the 1 allowed.
    addrs[0].do_send(Boom).unwrap();
    for n in ["a", "b", "c"] {
        rec.expect(E::Started(format!("s/{n}"), 2)).await;
    }
    actix_rt::time::sleep(SETTLE).await;
    for addr in &addrs {
        assert_eq!(ping(addr).await, 2, "{:?}", rec.events());
    }
    // A second one is one more than allowed: s gives up and the root restarts it.
    addrs[1].do_send(Boom).unwrap();
    for n in ["a", "b", "c"] {
        rec.expect(E::Started(format!("s/{n}"), 3)).await;
    }
    // The first restart said a restart would follow; the give-up (a and c stopped, then the
    // root's restart of s: a new decision) said the stop was final.
    assert_eq!(rec.restarting("s/b", 1), Some(true));
    assert_eq!(rec.restarting("s/a", 2), Some(false));
    assert_eq!(rec.restarting("s/c", 2), Some(false));
    let report = handle.shutdown("test").await;
    assert_eq!(entry(&report, "s").restarts, 1, "{report}");
    for n in ["a", "b", "c"] {
        assert_eq!(entry(&report, &format!("s/{n}")).restarts, 2, "{report}");
    }
}

#[actix::test]
async fn a_supervisor_giving_up_counts_against_its_parents_intensity() {
    init_log();
    let rec = Rec::default();
    // s gives up at its first failure; the root allows one restart of it.
    let w = plain("w", "s/w", &rec);
    let x = plain("x", "x", &rec);
    let wa = w.addr.clone();
    let handle = Tree::builder("escalates-twice")
        .intensity(1, Duration::from_secs(10))
        .child(
            SupervisorSpec::new("s")
                .intensity(0, Duration::from_secs(10))
                .child(w.spec),
        )
        .child(x.spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wa.do_send(Boom).unwrap();
    rec.expect(E::Started("s/w".into(), 2)).await;
    assert_eq!(handle.phase(), Phase::Running, "the root restarted s");
    wa.do_send(Boom).unwrap();
    let report = ended_by_itself(&handle).await;
    assert!(
        report.reason.to_lowercase().contains("intensity"),
        "{report}"
    );
    assert_eq!(report.outcome, TreeOutcome::Failed);
    assert_eq!(report.exit_code(), EXIT_FAILED);
    let s = entry(&report, "s");
    assert!(matches!(s.outcome, Outcome::Failed(_)), "{report}");
    assert_eq!(s.restarts, 1, "{report}");
    assert_eq!(entry(&report, "x").outcome, Outcome::Drained);
    assert!(!rec.has(&E::Started("s/w".into(), 3)));
}

#[actix::test]
async fn a_shutdown_during_a_backoff_restarts_nothing_and_counts_what_waited() {
    init_log();
    let rec = Rec::default();
    let w = plain("w", "s/w", &rec);
    let x = plain("x", "s/x", &rec);
    let (wa, xa) = (w.addr.clone(), x.addr.clone());
    let handle = Tree::builder("backoff-then-shutdown")
        .child(
            SupervisorSpec::new("s")
                .strategy(Strategy::OneForAll)
                .backoff(Duration::from_secs(3), Duration::from_secs(3))
                .child(w.spec)
                .child(x.spec),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wa.do_send(Boom).unwrap();
    // x is stopped for the restart; then the backoff keeps both down for 3 s.
    rec.expect(E::Drained("s/x".into(), 1)).await;
    // Sent while w is down: accepted, waiting for an instance that will never come.
    for n in 1..=3 {
        wa.do_send(Num(n)).unwrap();
    }
    let mut waiting = std::pin::pin!(wa.send(Num(4)));
    assert!(
        poll_once(waiting.as_mut()).await.is_none(),
        "accepted, waiting for the new instance"
    );
    let report = handle.shutdown("test").await;
    assert!(
        !rec.events()
            .iter()
            .any(|e| matches!(e, E::Started(_, n) if *n > 1)),
        "nothing restarts once the tree drains: {:?}",
        rec.events()
    );
    let wr = entry(&report, "s/w");
    assert_eq!(
        wr.outcome,
        Outcome::Panicked("s/w boom 1".into()),
        "{report}"
    );
    assert_eq!(wr.restarts, 0, "{report}");
    assert_eq!(
        wr.dropped, 5,
        "the Boom and the four messages that waited for a new instance: {report}"
    );
    let xr = entry(&report, "s/x");
    assert_eq!(xr.restarts, 0, "{report}");
    assert!(!xr.outcome.is_failure(), "{report}");
    for addr in [&wa, &xa] {
        assert!(matches!(addr.do_send(Ping), Err(SendError::Closed(Ping))));
    }
    // The request that waited for the new instance is answered, with an error: nothing hangs.
    let answer = actix_rt::time::timeout(LONG, waiting).await;
    assert_eq!(answer, Ok(Err(MailboxError::Closed)));
}

#[actix::test]
async fn a_request_queued_behind_a_temporary_childs_panic_fails_instead_of_hanging() {
    init_log();
    let rec = Rec::default();
    let t = plain("t", "t", &rec);
    let ta = t.addr.clone();
    let handle = Tree::builder("no-hang")
        .child(t.spec.restart(Restart::Temporary))
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    // Both accepted; the second waits behind the panic for an instance that will never come.
    ta.do_send(Boom).unwrap();
    let answer = actix_rt::time::timeout(LONG, ta.send(Num(1))).await;
    assert_eq!(answer, Ok(Err(MailboxError::Closed)));
    let report = handle.shutdown("test").await;
    assert_eq!(
        entry(&report, "t").dropped,
        2,
        "the Boom and the request: {report}"
    );
}

/// `request` queues its message when called (not when awaited), so it keeps its place before
/// messages sent after it; its answer can be awaited later; once the child is gone for good it
/// fails at the sender with the message handed back.
#[actix::test]
async fn a_request_is_queued_when_made_and_answered_when_awaited() {
    init_log();
    let rec = Rec::default();
    let t = plain("t", "t", &rec);
    let ta = t.addr.clone();
    let handle = Tree::builder("request")
        .child(t.spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let first = ta.request(Num(1)).unwrap();
    ta.do_send(Num(2)).unwrap();
    let second = ta.request(Num(3)).unwrap();
    // Awaited in the opposite order from the sends.
    assert_eq!(actix_rt::time::timeout(LONG, second).await, Ok(Ok(3)));
    assert_eq!(actix_rt::time::timeout(LONG, first).await, Ok(Ok(1)));
    assert_eq!(
        *t.shared.nums.lock(),
        vec![1, 2, 3],
        "handled in send order"
    );
    handle.shutdown("test").await;
    match ta.request(Num(4)) {
        Err(SendError::Closed(Num(4))) => {}
        Err(e) => panic!("expected Closed(Num(4)), got {e:?}"),
        Ok(_) => panic!("a request to a stopped tree's child was accepted"),
    }
}

/// A message the mailbox accepted is handled whatever the sender does with the answer: a
/// `request` whose future is dropped at once, and a `send` dropped after its first poll (when it
/// entered the mailbox), both take effect in their place among the messages around them. (actix's
/// own `send` skips such a message; a broker connection that queues SUBSCRIBE and then closes
/// relies on it not being skipped.)
#[actix::test]
async fn a_message_whose_answer_nobody_awaits_is_still_handled_in_its_place() {
    init_log();
    let rec = Rec::default();
    let t = plain("t", "t", &rec);
    let ta = t.addr.clone();
    let handle = Tree::builder("dropped-answers")
        .child(t.spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    drop(ta.request(Num(1)).unwrap());
    ta.do_send(Num(2)).unwrap();
    let mut sent = Box::pin(ta.send(Num(3)));
    assert!(poll_once(&mut sent).await.is_none(), "pushed, not answered");
    drop(sent);
    assert_eq!(
        actix_rt::time::timeout(LONG, ta.send(Num(4))).await,
        Ok(Ok(4))
    );
    assert_eq!(
        *t.shared.nums.lock(),
        vec![1, 2, 3, 4],
        "every accepted message handled, in order"
    );
    let report = handle.shutdown("test").await;
    assert_eq!(entry(&report, "t").dropped, 0, "{report}");
}

// ----- 3. backoff -------------------------------------------------------------------------------

#[actix::test]
async fn backoff_delays_every_restart_within_its_bounds() {
    init_log();
    const MIN: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_millis(400);
    let margin = MAX + Duration::from_secs(2);
    let rec = Rec::default();
    let w = plain("w", "s/w", &rec);
    let x = plain("x", "s/x", &rec);
    let wa = w.addr.clone();
    let handle = Tree::builder("backoff")
        .child(
            SupervisorSpec::new("s")
                .strategy(Strategy::OneForAll)
                .intensity(10, Duration::from_secs(60))
                .backoff(MIN, MAX)
                .child(w.spec)
                .child(x.spec),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    for i in 1..=3u32 {
        wa.do_send(Boom).unwrap();
        rec.expect(E::Ending("s/w".into(), i)).await;
        // Sent while w is down: it waits for the new instance.
        let during = actix_rt::spawn({
            let wa = wa.clone();
            async move { wa.send(Ping).await }
        });
        rec.expect(E::Started("s/w".into(), i + 1)).await;
        rec.expect(E::Started("s/x".into(), i + 1)).await;
        let w_down = rec.at(&E::Started("s/w".into(), i + 1)) - rec.at(&E::Ending("s/w".into(), i));
        let x_down =
            rec.at(&E::Started("s/x".into(), i + 1)) - rec.at(&E::Drained("s/x".into(), i));
        for (who, down) in [("w", w_down), ("x", x_down)] {
            assert!(
                down >= MIN && down <= margin,
                "restart {i}: {who} was down {down:?}, expected within [{MIN:?}, {MAX:?}] (+ margin)"
            );
        }
        assert_eq!(
            during.await.unwrap(),
            Ok(i + 1),
            "a message sent while the child was down is handled by the new instance"
        );
    }
    let report = handle.shutdown("test").await;
    assert_eq!(entry(&report, "s/w").restarts, 3, "{report}");
    assert_eq!(entry(&report, "s/x").restarts, 3, "{report}");
}

// ----- 4. panics in every place -----------------------------------------------------------------

#[actix::test]
async fn a_restarted_instance_that_panics_in_started_counts_against_the_intensity() {
    init_log();
    let rec = Rec::default();
    // From its second instance on, w panics in `started`: every restart fails again, until
    // the root's intensity (2) is exceeded and the tree shuts down.
    let w = kid(
        "w",
        "w",
        &rec,
        Faults {
            started_from: Some(2),
            ..Faults::default()
        },
    );
    let x = plain("x", "x", &rec);
    let wa = w.addr.clone();
    let handle = Tree::builder("started-panics")
        .intensity(2, Duration::from_secs(10))
        .child(w.spec)
        .child(x.spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    wa.do_send(Boom).unwrap();
    let report = ended_by_itself(&handle).await;
    assert!(
        report.reason.to_lowercase().contains("intensity"),
        "{report}"
    );
    assert_eq!(report.outcome, TreeOutcome::Failed);
    assert_eq!(report.exit_code(), EXIT_FAILED);
    assert_eq!(
        w.shared.calls(),
        3,
        "the first instance and two restarts, the second of which exceeds the intensity"
    );
    let wr = entry(&report, "w");
    assert_eq!(
        wr.outcome,
        Outcome::Panicked("w refuses to start (instance 3)".into()),
        "{report}"
    );
    assert_eq!(wr.restarts, 2, "{report}");
    assert_eq!(
        wr.last_failure.as_deref(),
        Some("panicked: w refuses to start (instance 3)")
    );
    assert_eq!(entry(&report, "x").outcome, Outcome::Drained);
    assert_eq!(entry(&report, "x").restarts, 0);
}

#[actix::test]
async fn panics_in_stop_hooks_during_a_restart_are_recorded_and_the_restart_happens() {
    init_log();
    let rec = Rec::default();
    // One-for-all: when a panics, b and c are stopped for the restart; b panics in on_stopping,
    // c in on_drained (their first instances only).
    let a = plain("a", "s/a", &rec);
    let b = kid(
        "b",
        "s/b",
        &rec,
        Faults {
            stopping_in: Some(1),
            ..Faults::default()
        },
    );
    let c = kid(
        "c",
        "s/c",
        &rec,
        Faults {
            drained_in: Some(1),
            ..Faults::default()
        },
    );
    let addrs = [a.addr.clone(), b.addr.clone(), c.addr.clone()];
    let handle = Tree::builder("restart-stop-panics")
        .child(
            SupervisorSpec::new("s")
                .strategy(Strategy::OneForAll)
                .intensity(10, Duration::from_secs(60))
                .child(a.spec)
                .child(b.spec)
                .child(c.spec),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    addrs[0].do_send(Boom).unwrap();
    for n in ["a", "b", "c"] {
        rec.expect(E::Started(format!("s/{n}"), 2)).await;
    }
    for addr in &addrs {
        assert_eq!(ping(addr).await, 2);
    }
    actix_rt::time::sleep(SETTLE).await;
    for (n, k) in [("a", &a.shared), ("b", &b.shared), ("c", &c.shared)] {
        assert_eq!(
            k.calls(),
            2,
            "{n} restarted exactly once: {:?}",
            rec.events()
        );
    }
    assert!(rec.has(&E::Stopping("s/b".into(), 1)));
    assert!(rec.has(&E::Stopping("s/c".into(), 1)));
    // Told that a restart follows (a itself panicked: it was never told).
    assert_eq!(rec.restarting("s/b", 1), Some(true));
    assert_eq!(rec.restarting("s/c", 1), Some(true));

    let report = handle.shutdown("test").await;
    // The shutdown is final: the second instances are told so.
    for n in ["a", "b", "c"] {
        assert_eq!(rec.restarting(&format!("s/{n}"), 2), Some(false), "{n}");
    }
    for n in ["a", "b", "c"] {
        let r = entry(&report, &format!("s/{n}"));
        assert_eq!(r.restarts, 1, "{n}: {report}");
        assert_eq!(r.outcome, Outcome::Drained, "{n}: {report}");
    }
    assert_eq!(
        entry(&report, "s/a").last_failure.as_deref(),
        Some("panicked: s/a boom 1")
    );
    // Their panics while being stopped for the restart are failures of their own: the report
    // keeps them (b's and c's own ends, not a's).
    assert_eq!(
        [
            entry(&report, "s/b").last_failure.as_deref(),
            entry(&report, "s/c").last_failure.as_deref(),
        ],
        [
            Some("panicked: s/b panics in on_stopping (instance 1)"),
            Some("panicked: s/c panics in on_drained (instance 1)"),
        ],
        "{report}"
    );
}

/// `Stopping::restarting` says whether the stopped child is started again: true for the
/// siblings a rest-for-one restart stops and starts, false for a temporary sibling it stops
/// for good (and for everything under a temporary supervisor), false at the tree's shutdown.
#[actix::test]
async fn a_restart_tells_whom_it_starts_again_and_a_temporary_sibling_that_its_stop_is_final() {
    init_log();
    let rec = Rec::default();
    let a = plain("a", "s/a", &rec);
    let b = plain("b", "s/b", &rec);
    let t = plain("t", "s/t", &rec);
    let w = plain("w", "s/ts/w", &rec);
    let c = plain("c", "s/c", &rec);
    let (aa, ba, ta, wa, ca) = (
        a.addr.clone(),
        b.addr.clone(),
        t.addr.clone(),
        w.addr.clone(),
        c.addr.clone(),
    );
    let handle = Tree::builder("restarting-flag")
        .child(
            SupervisorSpec::new("s")
                .strategy(Strategy::RestForOne)
                .intensity(10, Duration::from_secs(60))
                .child(a.spec)
                .child(b.spec)
                .child(t.spec.restart(Restart::Temporary))
                .child(
                    SupervisorSpec::new("ts")
                        .restart(Restart::Temporary)
                        .child(w.spec),
                )
                .child(c.spec),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    rec.expect(E::Started("s/c".into(), 1)).await;
    // b fails: rest-for-one stops t, ts (with w) and c, and starts b and c again.
    ba.do_send(Boom).unwrap();
    for n in ["b", "c"] {
        rec.expect(E::Started(format!("s/{n}"), 2)).await;
    }
    assert_eq!(ping(&ca).await, 2);
    until("the temporary ones to refuse sends", LONG, || {
        !ta.connected() && !wa.connected()
    })
    .await
    .unwrap();
    assert_eq!(rec.restarting("s/c", 1), Some(true), "{:?}", rec.events());
    assert_eq!(rec.restarting("s/t", 1), Some(false), "{:?}", rec.events());
    assert_eq!(
        rec.restarting("s/ts/w", 1),
        Some(false),
        "{:?}",
        rec.events()
    );
    assert!(
        rec.reason("s/c", 1).is_some_and(|r| r.contains("s/b")),
        "the reason names what ended: {:?}",
        rec.reason("s/c", 1)
    );
    assert!(!rec.has(&E::Stopping("s/a".into(), 1)), "a is before b");
    assert_eq!(t.shared.calls(), 1);
    assert_eq!(w.shared.calls(), 1);

    let report = handle.shutdown("test").await;
    assert_eq!(rec.restarting("s/a", 1), Some(false));
    assert_eq!(rec.restarting("s/b", 2), Some(false));
    assert_eq!(rec.restarting("s/c", 2), Some(false));
    assert_eq!(rec.reason("s/a", 1).as_deref(), Some("test"));
    assert!(matches!(aa.do_send(Ping), Err(SendError::Closed(Ping))));
    assert_eq!(entry(&report, "s/c").restarts, 1, "{report}");
}

#[actix::test]
async fn panics_while_the_tree_drains_are_recorded_and_nothing_restarts() {
    init_log();
    let rec = Rec::default();
    let all = |f: fn(&mut Faults)| {
        let mut faults = Faults::default();
        f(&mut faults);
        faults
    };
    let p = kid("p", "p", &rec, all(|f| f.stopping_in = Some(0)));
    let q = kid("q", "q", &rec, all(|f| f.drained_in = Some(0)));
    let r = kid("r", "r", &rec, all(|f| f.boom_while_draining = true));
    let base = plain("base", "base", &rec);
    let fine = plain("fine", "fine", &rec);
    let kids = [&p, &q, &r, &base, &fine].map(|k| (k.addr.clone(), k.shared.clone()));
    let handle = Tree::builder("drain-panics")
        .child(p.spec.depends_on("base"))
        .child(q.spec)
        .child(r.spec)
        .child(base.spec)
        .child(fine.spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let report = handle.shutdown("test").await;
    assert_eq!(
        entry(&report, "p").outcome,
        Outcome::Panicked("p panics in on_stopping (instance 1)".into()),
        "{report}"
    );
    assert_eq!(
        entry(&report, "q").outcome,
        Outcome::Panicked("q panics in on_drained (instance 1)".into()),
        "{report}"
    );
    assert_eq!(
        entry(&report, "r").outcome,
        Outcome::Panicked("r boom 1".into()),
        "{report}"
    );
    assert_eq!(
        entry(&report, "base").outcome,
        Outcome::Drained,
        "told after its dependent panicked, it drains normally: {report}"
    );
    assert_eq!(entry(&report, "fine").outcome, Outcome::Drained);
    for c in report.iter() {
        assert_eq!(c.restarts, 0, "{}: nothing restarts while draining", c.path);
    }
    for (addr, shared) in &kids {
        assert_eq!(shared.calls.load(Ordering::SeqCst), 1);
        assert!(!addr.connected());
    }
    assert!(
        !rec.events()
            .iter()
            .any(|e| matches!(e, E::Started(_, n) if *n > 1)),
        "{:?}",
        rec.events()
    );
    assert_eq!(report.outcome, TreeOutcome::Failed);
    assert_eq!(report.exit_code(), EXIT_FAILED);
}

// ----- 5. the stable address --------------------------------------------------------------------

#[actix::test]
async fn messages_queued_behind_a_panic_reach_the_new_instance() {
    init_log();
    let rec = Rec::default();
    let w = kid(
        "w",
        "w",
        &rec,
        Faults {
            num_panics_every: Some(10),
            ..Faults::default()
        },
    );
    let wa = w.addr.clone();
    let handle = Tree::builder("behind")
        .intensity(10, Duration::from_secs(60))
        .child(w.spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    // Queued all at once (the worker runs on this thread, so it sees them only when we await):
    // 10 kills the first instance, 20 the second; the others are handled, in order, by
    // whichever instance is current.
    for n in [1, 2, 10, 3, 4, 20, 11, 12, 13] {
        wa.do_send(Num(n)).unwrap();
    }
    // Queued behind them: kills the third instance; 21 goes to the fourth.
    let lost = wa.send(Num(30)).await;
    assert_eq!(
        lost,
        Err(MailboxError::Closed),
        "the sender of the message being handled when it panicked learns it was lost"
    );
    assert_eq!(wa.send(Num(21)).await, Ok(21));
    assert_eq!(ping(&wa).await, 4);
    assert_eq!(*w.shared.nums.lock(), vec![1, 2, 3, 4, 11, 12, 13, 21]);
    let report = handle.shutdown("test").await;
    let wr = entry(&report, "w");
    assert_eq!(wr.dropped, 3, "10, 20 and 30: {report}");
    assert_eq!(wr.restarts, 3, "{report}");
    assert_eq!(wr.outcome, Outcome::Drained);
}

#[actix::test]
async fn the_address_survives_restarts_and_every_message_is_handled_refused_or_dropped() {
    init_log();
    const K: u64 = 25;
    const THREAD_SENDS: u64 = 500;
    const TASK_SENDS: u64 = 100;
    let rec = Rec::default();
    let w = kid(
        "w",
        "s/w",
        &rec,
        Faults {
            num_panics_every: Some(K),
            ..Faults::default()
        },
    );
    let spec_addr = w.addr.clone();
    let shared = w.shared.clone();
    let handle = Tree::builder("stable")
        .child(
            SupervisorSpec::new("s")
                .intensity(1_000, Duration::from_secs(60))
                .child(w.spec.placement(Placement::Named("w".into()))),
        )
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    let handle_addr = handle.addr::<Sub>("s/w").expect("w's address by path");

    // From another thread, with do_send: 0..500, one panic every 25.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn({
        let addr = spec_addr.clone();
        move || {
            let (mut accepted, mut refused) = (Vec::new(), Vec::new());
            for n in 0..THREAD_SENDS {
                match addr.do_send(Num(n)) {
                    Ok(()) => accepted.push(n),
                    Err(_) => refused.push(n),
                }
                if n % 10 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            let _ = done_tx.send((accepted, refused));
        }
    });
    // From a task, with send().await through the address looked up by path: 1000..1100.
    let task = actix_rt::spawn(async move {
        let mut answers = Vec::new();
        for n in 1_000..1_000 + TASK_SENDS {
            // None: no answer at all (the sender would wait forever).
            let answer = actix_rt::time::timeout(LONG, handle_addr.send(Num(n)))
                .await
                .ok();
            let stuck = answer.is_none();
            answers.push((n, answer));
            if stuck {
                break;
            }
        }
        answers
    });
    let answers = task.await.unwrap();
    let (accepted, refused) = done_rx.await.unwrap();

    let panicking = (0..THREAD_SENDS)
        .chain(1_000..1_000 + TASK_SENDS)
        .filter(|n| n % K == 0)
        .count() as u64;
    assert!(
        refused.is_empty(),
        "the gate stays open across restarts: nothing is refused while the tree runs \
         (refused {refused:?})"
    );
    for (n, answer) in &answers {
        if n % K == 0 {
            assert_eq!(
                *answer,
                Some(Err(MailboxError::Closed)),
                "{n} killed the instance: its sender hears it was lost (None: no answer)"
            );
        } else {
            assert_eq!(
                *answer,
                Some(Ok(*n)),
                "{n} was handled and answered (None: no answer)"
            );
        }
    }
    assert_eq!(answers.len() as u64, TASK_SENDS, "every send was answered");
    // Everything accepted is handled or lost with a panic.
    let total = accepted.len() as u64 + TASK_SENDS;
    until("every accepted message to be handled or lost", LONG, || {
        shared.nums.lock().len() as u64 + shared.panics.load(Ordering::SeqCst) >= total
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {} handled, {} panics of {total}",
            shared.nums.lock().len(),
            shared.panics.load(Ordering::SeqCst)
        )
    });
    assert_eq!(ping(&spec_addr).await, panicking as u32 + 1);
    let report = handle.shutdown("test").await;

    let handled = shared.nums.lock().clone();
    let mut seen = HashSet::new();
    for n in &handled {
        assert!(seen.insert(*n), "{n} handled twice");
        assert!(n % K != 0, "{n} should have panicked");
    }
    for n in accepted.iter().chain(answers.iter().map(|(n, _)| n)) {
        assert!(
            seen.contains(n) || n % K == 0,
            "{n} was accepted, neither handled nor lost with a panic"
        );
    }
    // Each sender's messages are handled in the order sent, across restarts.
    let from_thread: Vec<u64> = handled.iter().copied().filter(|n| *n < 1_000).collect();
    let from_task: Vec<u64> = handled.iter().copied().filter(|n| *n >= 1_000).collect();
    assert!(
        from_thread.windows(2).all(|p| p[0] < p[1]),
        "{from_thread:?}"
    );
    assert!(from_task.windows(2).all(|p| p[0] < p[1]), "{from_task:?}");

    let wr = entry(&report, "s/w");
    assert_eq!(shared.panics.load(Ordering::SeqCst), panicking);
    assert_eq!(
        wr.dropped, panicking,
        "one message lost per panic: {report}"
    );
    assert_eq!(wr.restarts as u64, panicking, "{report}");
    assert_eq!(
        handled.len() as u64 + wr.dropped,
        total,
        "handled + dropped = accepted"
    );
    assert_eq!(wr.outcome, Outcome::Drained);
    assert!(matches!(
        spec_addr.do_send(Num(1)),
        Err(SendError::Closed(_))
    ));
}

// ----- 6. children that stay down ---------------------------------------------------------------

#[actix::test]
async fn a_temporary_child_that_panics_and_a_transient_one_that_stops_stay_down() {
    init_log();
    let rec = Rec::default();
    let t = plain("t", "t", &rec);
    let tr = plain("tr", "tr", &rec);
    let ok = plain("ok", "ok", &rec);
    let (ta, tra, oka) = (t.addr.clone(), tr.addr.clone(), ok.addr.clone());
    let handle = Tree::builder("down")
        .child(t.spec.restart(Restart::Temporary))
        .child(tr.spec.restart(Restart::Transient))
        .child(ok.spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    ta.do_send(Boom).unwrap();
    tra.do_send(Quit).unwrap();
    until("both to refuse sends", LONG, || {
        !ta.connected() && !tra.connected()
    })
    .await
    .unwrap();
    for addr in [&ta, &tra] {
        assert!(matches!(addr.do_send(Ping), Err(SendError::Closed(Ping))));
        assert!(matches!(addr.try_send(Ping), Err(SendError::Closed(Ping))));
        assert_eq!(addr.send(Ping).await, Err(MailboxError::Closed));
    }
    assert_eq!(ping(&oka).await, 1, "the sibling is untouched");
    actix_rt::time::sleep(SETTLE).await;
    assert_eq!(t.shared.calls(), 1);
    assert_eq!(tr.shared.calls(), 1);

    let report = handle.shutdown("test").await;
    let tr_ = entry(&report, "t");
    assert_eq!(
        tr_.outcome,
        Outcome::Panicked("t boom 1".into()),
        "{report}"
    );
    assert_eq!(tr_.restarts, 0);
    assert_eq!(tr_.last_failure.as_deref(), Some("panicked: t boom 1"));
    let trr = entry(&report, "tr");
    assert_eq!(trr.outcome, Outcome::NotRunning, "{report}");
    assert_eq!(trr.restarts, 0);
    assert_eq!(trr.last_failure, None, "stopping itself is not a failure");
    assert_eq!(entry(&report, "ok").outcome, Outcome::Drained);
    assert_eq!(entry(&report, "ok").restarts, 0);
    assert_eq!(report.outcome, TreeOutcome::Failed, "t panicked: {report}");
}

// ----- 7. the report ----------------------------------------------------------------------------

#[actix::test]
async fn the_report_counts_restarts_and_names_the_last_failure() {
    init_log();
    let rec = Rec::default();
    let w = plain("w", "s/w", &rec);
    let x = plain("x", "s/x", &rec);
    let y = plain("y", "y", &rec);
    let wa = w.addr.clone();
    let handle = Tree::builder("counted")
        .child(
            SupervisorSpec::new("s")
                .strategy(Strategy::OneForAll)
                .child(w.spec)
                .child(x.spec),
        )
        .child(y.spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    for i in 1..=2 {
        wa.do_send(Boom).unwrap();
        rec.expect(E::Started("s/w".into(), i + 1)).await;
        rec.expect(E::Started("s/x".into(), i + 1)).await;
    }
    let report = handle.shutdown("test").await;
    assert_eq!(report.outcome, TreeOutcome::Clean, "{report}");
    let w = entry(&report, "s/w");
    assert_eq!(
        (w.restarts, w.last_failure.as_deref()),
        (2, Some("panicked: s/w boom 2"))
    );
    let x = entry(&report, "s/x");
    assert_eq!(
        (x.restarts, x.last_failure.as_deref()),
        (2, None),
        "restarted with its sibling, it never failed itself"
    );
    let y = entry(&report, "y");
    assert_eq!((y.restarts, y.last_failure.as_deref()), (0, None));
    let s = entry(&report, "s");
    assert_eq!((s.restarts, s.last_failure.as_deref()), (0, None));

    let text = report.to_string();
    let line = |name: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("a line for {name}:\n{text}"))
            .to_owned()
    };
    assert!(line("w").contains("restarts=2"), "{text}");
    assert!(line("x").contains("restarts=2"), "{text}");
    assert!(!line("y").contains("restarts"), "{text}");

    #[cfg(feature = "serde")]
    {
        let v: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        let wj = &v["children"][0]["children"][0];
        assert_eq!(wj["path"], "s/w");
        assert_eq!(wj["restarts"], 2);
        assert_eq!(wj["last_failure"], "panicked: s/w boom 2");
        assert_eq!(
            v["children"][0]["children"][1]["last_failure"],
            serde_json::Value::Null
        );
    }
}

#[actix::test]
async fn a_restart_whose_factory_fails_is_a_failure_too() {
    init_log();
    let rec = Rec::default();
    // The factory fails once, on the first restart: that failure is retried, and the next
    // attempt succeeds.
    let once = kid(
        "once",
        "once",
        &rec,
        Faults {
            factory_fails: Some(2..=2),
            ..Faults::default()
        },
    );
    let oa = once.addr.clone();
    let handle = Tree::builder("factory-once")
        .child(once.spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    oa.do_send(Boom).unwrap();
    rec.expect(E::Started("once".into(), 3)).await;
    assert_eq!(ping(&oa).await, 3);
    let report = handle.shutdown("test").await;
    let r = entry(&report, "once");
    assert_eq!(r.outcome, Outcome::Drained, "{report}");
    assert!(
        r.last_failure
            .as_deref()
            .is_some_and(|f| f.starts_with("failed") && f.contains("no database for once")),
        "the latest failure was the factory's: {:?}",
        r.last_failure
    );

    // The factory fails from the first restart on: the failures count against the intensity
    // until the root gives up.
    let rec = Rec::default();
    let never = kid(
        "never",
        "never",
        &rec,
        Faults {
            factory_fails: Some(2..=u32::MAX),
            ..Faults::default()
        },
    );
    let x = plain("x", "x", &rec);
    let na = never.addr.clone();
    let handle = Tree::builder("factory-never")
        .intensity(2, Duration::from_secs(10))
        .child(never.spec)
        .child(x.spec)
        .build()
        .unwrap()
        .start()
        .await
        .unwrap();
    na.do_send(Boom).unwrap();
    let report = ended_by_itself(&handle).await;
    assert!(
        report.reason.to_lowercase().contains("intensity"),
        "{report}"
    );
    assert_eq!(report.exit_code(), EXIT_FAILED);
    assert_eq!(
        never.shared.calls(),
        3,
        "the first instance and two failed attempts"
    );
    let r = entry(&report, "never");
    assert!(
        matches!(&r.outcome, Outcome::Failed(m) if m.contains("no database for never (attempt 3)")),
        "{report}"
    );
    assert!(
        r.last_failure
            .as_deref()
            .is_some_and(|f| f.starts_with("failed") && f.contains("attempt 3")),
        "{:?}",
        r.last_failure
    );
    assert_eq!(entry(&report, "x").outcome, Outcome::Drained);
    assert!(matches!(na.do_send(Ping), Err(SendError::Closed(Ping))));
}
