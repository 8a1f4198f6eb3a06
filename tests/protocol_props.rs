//! The shutdown protocol's invariants, checked on random trees.
//!
//! Every case builds a random tree (up to 200 children; supervisors nested up to four levels,
//! workers as leaves; names that repeat across levels), random dependencies between any two
//! nodes that keep the stop order possible, and random worker behaviour: drain time, messages
//! sent before the shutdown, forwarding to a dependency while running and while draining,
//! senders that race the shutdown, and rare faults (panics in either hook, a hung drained hook
//! with a short budget, a panic on a message before the shutdown, a worker that stops itself
//! before the shutdown). The case runs in its own actix System; the workers log what they do
//! in one ordered log; the report and the log are then held to the protocol (see `check`).
//!
//! CI runs `CI_CASES` cases; set `PROPTEST_CASES` for more (and `PROPTEST_MAX_SHRINK_ITERS` to
//! shrink a failure further). `PROPS_STATS=1` (with `--nocapture`) prints one line per case:
//! size, edges, messages, outcomes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_supervisor::{
    BuildError, ChildKind, ChildReport, ChildSpec, HookFuture, Outcome, Phase, Placement, Restart,
    ShutdownReport, Stopping, SupervisorSpec, Tree, TreeOutcome, Worker,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Cases per run in CI (each takes 0.05–2.5 s, typically 0.15 s: about 20 s in all).
const CI_CASES: u32 = 128;
/// The tree's overall deadline.
const DEADLINE: Duration = Duration::from_secs(2);
/// Shutdown budget of workers without one of their own (hung workers have 150–300 ms).
const WORKER_BUDGET: Duration = Duration::from_secs(1);
/// How late, at most, an abort may come after the deadline that calls for it. Timers on a loaded
/// 2-core CI machine fire late; a hang past its budget would still be far beyond this.
const TIMER_SLACK: Duration = Duration::from_secs(1);
/// Deepest supervisor nesting (top-level children are at depth 1).
const MAX_DEPTH: usize = 4;
const NAMES: &[&str] = &["a", "b", "c", "db", "store", "api", "0", "1", "x", "y"];
/// Messages sent before the shutdown hop this many times along forwarding workers.
const TTL: u8 = 2;
const FAULT_MARK: &str = "injected fault";

// ---------------------------------------------------------------------------------------------
// What proptest generates. Indices are raw and interpreted by `Plan::new`, so that shrinking
// (removing nodes, lowering numbers) always yields a valid tree.

#[derive(Clone, Debug)]
struct NodeGen {
    parent_pick: u16,
    supervisor: bool,
    name: u8,
    deps: Vec<u16>,
    sup_budget_ms: Option<u16>,
    w: WorkerGen,
}

#[derive(Clone, Debug)]
struct WorkerGen {
    drain_ms: u8,
    msgs: u8,
    forward: bool,
    fwd_pick: u16,
    pool: bool,
    late_sender: bool,
    fault_roll: u16,
    fault_kind: u8,
    hang_budget_ms: u16,
    fault_pos: u8,
    /// Messages sent with `send` (awaiting the result) from tasks racing the shutdown.
    requests: u8,
}

#[derive(Clone, Debug)]
struct CaseGen {
    /// 0: no faults; 1: ~1% of workers; 2: ~4%.
    fault_level: u8,
    nodes: Vec<NodeGen>,
}

fn worker_gen() -> impl Strategy<Value = WorkerGen> {
    (
        0u8..=30,
        0u8..12,
        prop::bool::weighted(0.3),
        any::<u16>(),
        prop::bool::weighted(0.25),
        prop::bool::weighted(0.04),
        0u16..1000,
        0u8..5,
        150u16..=300,
        any::<u8>(),
        prop_oneof![3 => Just(0u8), 1 => 1u8..4],
    )
        .prop_map(
            |(
                drain_ms,
                msgs,
                forward,
                fwd_pick,
                pool,
                late_sender,
                fault_roll,
                fault_kind,
                hang_budget_ms,
                fault_pos,
                requests,
            )| WorkerGen {
                drain_ms,
                msgs,
                forward,
                fwd_pick,
                pool,
                late_sender,
                fault_roll,
                fault_kind,
                hang_budget_ms,
                fault_pos,
                requests,
            },
        )
}

fn node_gen() -> impl Strategy<Value = NodeGen> {
    let deps = prop_oneof![
        3 => Just(Vec::new()),
        1 => prop::collection::vec(any::<u16>(), 1..=3),
    ];
    (
        any::<u16>(),
        prop::bool::weighted(0.15),
        0..NAMES.len() as u8,
        deps,
        prop::option::weighted(0.08, 100u16..600),
        worker_gen(),
    )
        .prop_map(
            |(parent_pick, supervisor, name, deps, sup_budget_ms, w)| NodeGen {
                parent_pick,
                supervisor,
                name,
                deps,
                sup_budget_ms,
                w,
            },
        )
}

fn case_gen() -> impl Strategy<Value = CaseGen> {
    (0u8..3, prop::collection::vec(node_gen(), 1..=200))
        .prop_map(|(fault_level, nodes)| CaseGen { fault_level, nodes })
}

// ---------------------------------------------------------------------------------------------
// The plan: the generated case interpreted as a concrete tree.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    PanicInStopping,
    PanicInDrained,
    HangInDrained,
    /// Panics on a message handled before the shutdown.
    PanicOnMessage,
    /// Calls `ctx.stop()` on a message handled before the shutdown.
    StopsItself,
}

impl Fault {
    /// Faults that end the worker before the shutdown starts.
    fn before_shutdown(self) -> bool {
        matches!(self, Fault::PanicOnMessage | Fault::StopsItself)
    }
}

#[derive(Debug)]
struct PNode {
    name: String,
    path: String,
    parent: Option<usize>,
    depth: usize,
    supervisor: bool,
    children: Vec<usize>,
    /// Explicit budget (supervisors sometimes, hung workers always).
    budget: Option<Duration>,
    w: WorkerGen,
    fault: Fault,
    /// Declared dependencies (node indices).
    deps: Vec<usize>,
    /// The worker it forwards to, if any (in the subtree of a dependency of it or an ancestor).
    fwd: Option<usize>,
}

#[derive(Debug)]
struct Plan {
    nodes: Vec<PNode>,
    top: Vec<usize>,
    /// The first dependency candidate rejected because it would make the stop order impossible.
    rejected: Option<(usize, usize)>,
}

impl Plan {
    fn new(case: &CaseGen) -> Plan {
        let n = case.nodes.len();
        let fault_rate = [0u16, 10, 40][case.fault_level as usize % 3];
        let mut nodes: Vec<PNode> = Vec::with_capacity(n);
        let mut top = Vec::new();
        for (i, g) in case.nodes.iter().enumerate() {
            let candidates: Vec<usize> = (0..i)
                .filter(|&j| nodes[j].supervisor && nodes[j].depth < MAX_DEPTH)
                .collect();
            let pick = g.parent_pick as usize % (candidates.len() + 1);
            let parent = (pick > 0).then(|| candidates[pick - 1]);
            let siblings: &[usize] = match parent {
                Some(p) => &nodes[p].children,
                None => &top,
            };
            let base = NAMES[g.name as usize % NAMES.len()];
            let name = if siblings.iter().any(|&s| nodes[s].name == base) {
                format!("{base}.{i}")
            } else {
                base.to_owned()
            };
            let path = match parent {
                Some(p) => format!("{}/{name}", nodes[p].path),
                None => name.clone(),
            };
            let fault = if g.supervisor || g.w.fault_roll >= fault_rate {
                Fault::None
            } else {
                [
                    Fault::PanicInStopping,
                    Fault::PanicInDrained,
                    Fault::HangInDrained,
                    Fault::PanicOnMessage,
                    Fault::StopsItself,
                ][g.w.fault_kind as usize % 5]
            };
            let budget = if g.supervisor {
                g.sup_budget_ms.map(|ms| Duration::from_millis(ms as u64))
            } else if fault == Fault::HangInDrained {
                Some(Duration::from_millis(g.w.hang_budget_ms as u64))
            } else {
                None
            };
            nodes.push(PNode {
                name,
                path,
                parent,
                depth: parent.map_or(1, |p| nodes[p].depth + 1),
                supervisor: g.supervisor,
                children: Vec::new(),
                budget,
                w: g.w.clone(),
                fault,
                deps: Vec::new(),
                fwd: None,
            });
            match parent {
                Some(p) => nodes[p].children.push(i),
                None => top.push(i),
            }
        }

        // Dependencies: any candidate that keeps the stop-order event graph acyclic.
        let mut events = EventGraph::new(&nodes);
        let mut rejected = None;
        for (i, g) in case.nodes.iter().enumerate() {
            for &raw in &g.deps {
                let j = raw as usize % n;
                if j == i || nodes[i].deps.contains(&j) || dep_name(&nodes, &top, i, j).is_none() {
                    continue;
                }
                if events.try_add(i, j) {
                    nodes[i].deps.push(j);
                } else if rejected.is_none() {
                    rejected = Some((i, j));
                }
            }
        }

        // Forwarding targets: workers that stop after this one.
        for i in 0..n {
            if nodes[i].supervisor || !nodes[i].w.forward {
                continue;
            }
            let mut targets = Vec::new();
            let mut at = Some(i);
            while let Some(a) = at {
                for &d in &nodes[a].deps {
                    subtree(&nodes, d, &mut targets);
                }
                at = nodes[a].parent;
            }
            targets.retain(|&t| !nodes[t].supervisor);
            targets.sort_unstable();
            targets.dedup();
            if !targets.is_empty() {
                nodes[i].fwd = Some(targets[nodes[i].w.fwd_pick as usize % targets.len()]);
            }
        }
        Plan {
            nodes,
            top,
            rejected,
        }
    }

    fn workers(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| !self.nodes[i].supervisor)
    }

    fn subtree(&self, i: usize) -> Vec<usize> {
        let mut out = Vec::new();
        subtree(&self.nodes, i, &mut out);
        out
    }

    /// One line per node, for failure messages.
    fn describe(&self) -> String {
        let mut s = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.supervisor {
                s.push_str(&format!(
                    "  #{i} {} sup budget={:?} deps={:?}\n",
                    n.path, n.budget, n.deps
                ));
            } else {
                s.push_str(&format!(
                    "  #{i} {} drain={}ms msgs={} fault={:?} budget={:?} deps={:?} fwd={:?} pool={} late={}\n",
                    n.path,
                    n.w.drain_ms,
                    n.w.msgs,
                    n.fault,
                    n.budget,
                    n.deps,
                    n.fwd,
                    n.w.pool,
                    n.w.late_sender
                ));
            }
        }
        s
    }
}

fn subtree(nodes: &[PNode], i: usize, out: &mut Vec<usize>) {
    out.push(i);
    for &c in &nodes[i].children {
        subtree(nodes, c, out);
    }
}

/// How node `i` names its dependency `j`: a sibling by name, anything else by path from the
/// root. `None` when that path would resolve to a sibling of `i` instead (a one-segment path
/// equal to a sibling's name), which the library resolves as the sibling, by its rules.
fn dep_name(nodes: &[PNode], top: &[usize], i: usize, j: usize) -> Option<String> {
    if nodes[i].parent == nodes[j].parent {
        return Some(nodes[j].name.clone());
    }
    let path = &nodes[j].path;
    let siblings = match nodes[i].parent {
        Some(p) => &nodes[p].children[..],
        None => top,
    };
    if !path.contains('/') && siblings.iter().any(|&s| nodes[s].name == *path) {
        return None;
    }
    Some(path.clone())
}

/// The stop order as events: `told(k)` = 2k, `done(k)` = 2k+1 (the root is node `n`).
/// told(k) → done(k); told(parent) → told(child); done(child) → done(parent);
/// done(dependent) → told(dependency). A dependency is possible iff the graph stays acyclic.
struct EventGraph {
    succ: Vec<Vec<usize>>,
}

impl EventGraph {
    fn new(nodes: &[PNode]) -> Self {
        let n = nodes.len();
        let mut succ = vec![Vec::new(); 2 * (n + 1)];
        for (k, node) in nodes.iter().enumerate() {
            let p = node.parent.unwrap_or(n);
            succ[2 * k].push(2 * k + 1);
            succ[2 * p].push(2 * k);
            succ[2 * k + 1].push(2 * p + 1);
        }
        succ[2 * n].push(2 * n + 1);
        EventGraph { succ }
    }

    /// Adds "x depends on y" unless it closes a cycle (done(x) reachable from told(y)).
    fn try_add(&mut self, x: usize, y: usize) -> bool {
        let (from, to) = (2 * y, 2 * x + 1);
        let mut seen = vec![false; self.succ.len()];
        let mut queue = VecDeque::from([from]);
        seen[from] = true;
        while let Some(e) = queue.pop_front() {
            if e == to {
                return false;
            }
            for &s in &self.succ[e] {
                if !seen[s] {
                    seen[s] = true;
                    queue.push_back(s);
                }
            }
        }
        self.succ[to].push(from);
        true
    }
}

/// Builds the spec tree of `plan`, making each worker with `worker(index, declared deps)`.
fn assemble(
    plan: &Plan,
    extra_edge: Option<(usize, usize)>,
    worker: &mut dyn FnMut(usize, Vec<String>) -> ChildSpec,
) -> Vec<ChildSpec> {
    fn spec(
        plan: &Plan,
        i: usize,
        extra_edge: Option<(usize, usize)>,
        worker: &mut dyn FnMut(usize, Vec<String>) -> ChildSpec,
    ) -> ChildSpec {
        let node = &plan.nodes[i];
        let mut deps: Vec<String> = node
            .deps
            .iter()
            .map(|&j| dep_name(&plan.nodes, &plan.top, i, j).expect("checked in Plan::new"))
            .collect();
        if let Some((x, y)) = extra_edge {
            if x == i {
                deps.push(dep_name(&plan.nodes, &plan.top, x, y).expect("checked"));
            }
        }
        if node.supervisor {
            let mut s = SupervisorSpec::new(node.name.clone());
            for &c in &node.children {
                s = s.child(spec(plan, c, extra_edge, worker));
            }
            for d in deps {
                s = s.depends_on(d);
            }
            if let Some(b) = node.budget {
                s = s.budget(b);
            }
            s.into()
        } else {
            worker(i, deps)
        }
    }
    plan.top
        .iter()
        .map(|&i| spec(plan, i, extra_edge, worker))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The worker.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ev {
    Stopping,
    Handled(u64),
    DrainStart,
    DrainDone,
}

struct Shared {
    /// Every event of every worker, in the order it happened: (worker, event).
    log: Mutex<Vec<(usize, Ev)>>,
    next_msg: AtomicU64,
    /// Per worker: sends to it through its `ChildAddr` that returned `Ok`.
    accepted: Vec<AtomicU64>,
    /// Per worker: messages its handlers finished (a message that panics does not count).
    handled: Vec<AtomicU64>,
    /// Per worker: requests sent with `send`, and those answered `Ok`.
    requests: Vec<AtomicU64>,
    requests_ok: Vec<AtomicU64>,
    /// Every request: (worker, message id, answered `Ok`).
    request_results: Mutex<Vec<(usize, u64, bool)>>,
    /// Forwards refused at the sender: (from, to).
    refused_forwards: Mutex<Vec<(usize, usize)>>,
    /// Every worker's address, by node index (set before the tree starts).
    addrs: OnceLock<Vec<Option<actix_supervisor::ChildAddr<Probe>>>>,
}

impl Shared {
    fn new(n: usize) -> Self {
        Shared {
            log: Mutex::new(Vec::new()),
            next_msg: AtomicU64::new(0),
            accepted: (0..n).map(|_| AtomicU64::new(0)).collect(),
            handled: (0..n).map(|_| AtomicU64::new(0)).collect(),
            requests: (0..n).map(|_| AtomicU64::new(0)).collect(),
            requests_ok: (0..n).map(|_| AtomicU64::new(0)).collect(),
            request_results: Mutex::new(Vec::new()),
            refused_forwards: Mutex::new(Vec::new()),
            addrs: OnceLock::new(),
        }
    }

    fn log(&self, w: usize, ev: Ev) {
        self.log.lock().unwrap().push((w, ev));
    }

    /// Sends a `Msg` to worker `to`, counting it if accepted.
    fn send(&self, addr: &actix_supervisor::ChildAddr<Probe>, to: usize, ttl: u8) -> bool {
        let id = self.next_msg.fetch_add(1, Ordering::Relaxed);
        match addr.do_send(Msg { id, ttl }) {
            Ok(()) => {
                self.accepted[to].fetch_add(1, Ordering::SeqCst);
                true
            }
            Err(_) => false,
        }
    }
}

struct Probe {
    id: usize,
    shared: Arc<Shared>,
    fault: Fault,
    drain: Duration,
    /// (index, address) of the worker it forwards to.
    fwd: Option<(usize, actix_supervisor::ChildAddr<Probe>)>,
}

impl Probe {
    fn forward(&self, ttl: u8) {
        if let Some((to, addr)) = &self.fwd {
            if !self.shared.send(addr, *to, ttl) {
                self.shared
                    .refused_forwards
                    .lock()
                    .unwrap()
                    .push((self.id, *to));
            }
        }
    }
}

impl Actor for Probe {
    type Context = Context<Self>;
}

impl Worker for Probe {
    fn on_stopping(&mut self, _: &mut Context<Self>, _: &Stopping) {
        self.shared.log(self.id, Ev::Stopping);
        if self.fault == Fault::PanicInStopping {
            panic!("{FAULT_MARK}: panic in on_stopping");
        }
        self.forward(0);
    }

    fn on_drained(&mut self, _: &mut Context<Self>) -> Option<HookFuture<Self>> {
        self.shared.log(self.id, Ev::DrainStart);
        if self.fault == Fault::PanicInDrained {
            panic!("{FAULT_MARK}: panic in on_drained");
        }
        self.forward(0);
        if self.fault == Fault::HangInDrained {
            return Some(Box::pin(actix::fut::wrap_future(
                std::future::pending::<()>(),
            )));
        }
        if self.drain.is_zero() {
            self.shared.log(self.id, Ev::DrainDone);
            return None;
        }
        let (shared, id, drain) = (self.shared.clone(), self.id, self.drain);
        Some(Box::pin(actix::fut::wrap_future(async move {
            actix_rt::time::sleep(drain).await;
            shared.log(id, Ev::DrainDone);
        })))
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Msg {
    id: u64,
    ttl: u8,
}

impl Handler<Msg> for Probe {
    type Result = ();
    fn handle(&mut self, m: Msg, _: &mut Context<Self>) {
        self.shared.log(self.id, Ev::Handled(m.id));
        self.shared.handled[self.id].fetch_add(1, Ordering::SeqCst);
        if m.ttl > 0 {
            self.forward(m.ttl - 1);
        }
    }
}

/// The message that injects a fault before the shutdown: a panic, or `ctx.stop()`.
#[derive(Message)]
#[rtype(result = "()")]
struct Fatal {
    id: u64,
}

impl Handler<Fatal> for Probe {
    type Result = ();
    fn handle(&mut self, m: Fatal, ctx: &mut Context<Self>) {
        if self.fault == Fault::PanicOnMessage {
            panic!("{FAULT_MARK}: panic on a message");
        }
        self.shared.log(self.id, Ev::Handled(m.id));
        self.shared.handled[self.id].fetch_add(1, Ordering::SeqCst);
        ctx.stop();
    }
}

struct Dummy;
impl Actor for Dummy {
    type Context = Context<Self>;
}
impl Worker for Dummy {}

// ---------------------------------------------------------------------------------------------
// Running a case.

struct Run {
    report: Arc<ShutdownReport>,
    /// Around `handle.shutdown(..).await`.
    elapsed: Duration,
}

async fn drive(plan: &Plan, shared: Arc<Shared>) -> Result<Run, TestCaseError> {
    let mut specs: Vec<Option<actix_supervisor::ChildAddr<Probe>>> = vec![None; plan.nodes.len()];
    let children = assemble(plan, None, &mut |i, deps| {
        let node = &plan.nodes[i];
        let (sh, fault, drain, fwd) = (
            shared.clone(),
            node.fault,
            Duration::from_millis(node.w.drain_ms as u64),
            node.fwd,
        );
        let mut w = ChildSpec::worker(node.name.clone(), move || Probe {
            id: i,
            shared: sh.clone(),
            fault,
            drain,
            fwd: fwd.map(|t| {
                let addrs = sh.addrs.get().expect("addresses are set before the start");
                (t, addrs[t].clone().expect("forward targets are workers"))
            }),
        });
        for d in deps {
            w = w.depends_on(d);
        }
        if let Some(b) = node.budget {
            w = w.budget(b);
        }
        if node.w.pool {
            w = w.placement(Placement::Pool("p".into()));
        }
        if node.fault.before_shutdown() {
            // This test is about the shutdown: a child that ends before it stays down.
            w = w.restart(Restart::Temporary);
        }
        specs[i] = Some(w.addr());
        w.into()
    });
    let addrs = specs;
    let _ = shared.addrs.set(addrs.clone());
    let addr = |i: usize| addrs[i].as_ref().expect("a worker");

    let tree = Tree::builder("props")
        .children(children)
        .deadline(DEADLINE)
        .worker_budget(WORKER_BUDGET)
        .progress_interval(Duration::from_secs(60))
        .pool("p", 2)
        .build();
    let tree = match tree {
        Ok(t) => t,
        Err(e) => {
            return Err(TestCaseError::fail(format!(
                "build rejected an acyclic tree: {e}"
            )))
        }
    };

    // Half of each worker's messages are queued before the start.
    for i in plan.workers() {
        for _ in 0..plan.nodes[i].w.msgs / 2 {
            prop_assert!(
                shared.send(addr(i), i, TTL),
                "a send before the start was refused"
            );
        }
    }
    let handle = match tree.start().await {
        Ok(h) => h,
        Err(e) => return Err(TestCaseError::fail(format!("start failed: {e:?}"))),
    };
    prop_assert_eq!(handle.phase(), Phase::Running);
    // Lookups by path find the workers, and only with their type.
    for (i, node) in plan.nodes.iter().enumerate() {
        prop_assert_eq!(
            handle.addr::<Probe>(&node.path).is_some(),
            !node.supervisor,
            "addr lookup of {}",
            &node.path
        );
        if i % 16 == 0 {
            prop_assert!(handle.addr::<Dummy>(&node.path).is_none());
        }
    }

    // Requests (`send`, awaiting the answer) from tasks that race the shutdown.
    let mut requests = Vec::new();
    for i in plan.workers() {
        let node = &plan.nodes[i];
        if node.fault.before_shutdown() {
            continue;
        }
        for _ in 0..node.w.requests {
            let (sh, a) = (shared.clone(), addr(i).clone());
            let id = sh.next_msg.fetch_add(1, Ordering::Relaxed);
            sh.requests[i].fetch_add(1, Ordering::SeqCst);
            requests.push(actix_rt::spawn(async move {
                let ok = a.send(Msg { id, ttl: TTL }).await.is_ok();
                if ok {
                    sh.requests_ok[i].fetch_add(1, Ordering::SeqCst);
                }
                sh.request_results.lock().unwrap().push((i, id, ok));
            }));
        }
    }

    // The rest after it, with the fatal message of a fault-before-shutdown among them.
    for i in plan.workers() {
        let node = &plan.nodes[i];
        let rest = node.w.msgs - node.w.msgs / 2;
        let fatal_at = node.w.fault_pos % (rest + 1);
        for k in 0..=rest {
            if k == fatal_at && node.fault.before_shutdown() {
                let id = shared.next_msg.fetch_add(1, Ordering::Relaxed);
                let sent = addr(i).do_send(Fatal { id });
                prop_assert!(sent.is_ok(), "the fatal message was refused");
                shared.accepted[i].fetch_add(1, Ordering::SeqCst);
            }
            if k < rest {
                // Until the fatal message is handled, sends are accepted; afterwards they may
                // be refused, which is fine.
                shared.send(addr(i), i, TTL);
            }
        }
    }
    // "Before the shutdown": wait until the tree has seen those workers end.
    let t0 = Instant::now();
    for i in plan
        .workers()
        .filter(|&i| plan.nodes[i].fault.before_shutdown())
    {
        while addr(i).connected() {
            prop_assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{} ended ({:?}) but its address still accepts messages after 5 s",
                plan.nodes[i].path,
                plan.nodes[i].fault
            );
            actix_rt::time::sleep(Duration::from_millis(1)).await;
        }
    }

    // Senders that race the shutdown: they send until refused.
    let late: Vec<(usize, actix_supervisor::ChildAddr<Probe>)> = plan
        .workers()
        .filter(|&i| plan.nodes[i].w.late_sender)
        .map(|i| (i, addr(i).clone()))
        .collect();
    let stop_late = Arc::new(AtomicBool::new(false));
    let late_thread = {
        let (shared, stop) = (shared.clone(), stop_late.clone());
        std::thread::spawn(move || {
            let mut open: Vec<_> = late;
            let t0 = Instant::now();
            while !open.is_empty() && t0.elapsed() < Duration::from_secs(10) {
                open.retain(|(i, a)| shared.send(a, *i, 1));
                if stop.load(Ordering::Relaxed) {
                    // Everything is closed once the report is out: one more round shows it.
                    open.retain(|(i, a)| shared.send(a, *i, 1));
                    return open.len();
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            open.len()
        })
    };

    let t0 = Instant::now();
    let first = handle.shutdown("props");
    prop_assert!(!handle.is_ready(), "readiness is false once triggered");
    let second = handle.shutdown("again");
    let report = first.await;
    let elapsed = t0.elapsed();
    let report2 = second.await;
    prop_assert!(Arc::ptr_eq(&report, &report2), "one shutdown, one report");
    prop_assert_eq!(&report.reason, "props");
    prop_assert_eq!(handle.phase(), Phase::Stopped);
    stop_late.store(true, Ordering::Relaxed);
    let still_open = late_thread.join().expect("the late sender thread");
    prop_assert_eq!(
        still_open,
        0,
        "sends still accepted after the report was out"
    );
    // Every request gets its answer, or an error: none waits forever.
    let all = futures_join(requests);
    let joined = actix_rt::time::timeout(Duration::from_secs(3), all).await;
    prop_assert!(
        joined.is_ok(),
        "a `send` still waits 3 s after the shutdown"
    );
    for i in plan.workers() {
        prop_assert!(
            !addr(i).connected(),
            "{} still accepts messages after the shutdown",
            plan.nodes[i].path
        );
    }
    Ok(Run { report, elapsed })
}

/// Awaits every task (no `futures` dependency).
async fn futures_join(tasks: Vec<actix_rt::task::JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

fn run_case(case: &CaseGen) -> Result<(), TestCaseError> {
    let plan = Plan::new(case);

    // The library's cycle check agrees with ours on the first rejected candidate.
    if let Some((x, y)) = plan.rejected {
        let children = assemble(&plan, Some((x, y)), &mut |i, deps| {
            let mut w = ChildSpec::worker(plan.nodes[i].name.clone(), || Dummy);
            for d in deps {
                w = w.depends_on(d);
            }
            w.into()
        });
        let built = Tree::builder("cyclic").children(children).build();
        prop_assert!(
            matches!(built, Err(BuildError::Cycle(_))),
            "{} depending on {} makes the stop order impossible, but build gave {:?}\n{}",
            plan.nodes[x].path,
            plan.nodes[y].path,
            built.map(|_| ()),
            plan.describe()
        );
    }

    let shared = Arc::new(Shared::new(plan.nodes.len()));
    let run = System::new().block_on(drive(&plan, shared.clone()))?;
    if std::env::var("PROPS_STATS").is_ok() {
        let mut outcomes: HashMap<&str, usize> = HashMap::new();
        for c in run.report.iter() {
            *outcomes.entry(outcome_name(&c.outcome)).or_default() += 1;
        }
        let edges: usize = plan.nodes.iter().map(|n| n.deps.len()).sum();
        let fwd = plan.nodes.iter().filter(|n| n.fwd.is_some()).count();
        let acc: u64 = shared
            .accepted
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .sum();
        let dropped = run.report.dropped();
        eprintln!(
            "n={} edges={edges} rejected={} fwd={fwd} accepted={acc} dropped={dropped} refused_fwd={} elapsed={:?} outcomes={outcomes:?}",
            plan.nodes.len(),
            plan.rejected.is_some(),
            shared.refused_forwards.lock().unwrap().len(),
            run.elapsed
        );
    }
    check(&plan, &shared, &run).map_err(|e| {
        TestCaseError::fail(format!(
            "{e}\nplan:\n{}report:\n{}",
            plan.describe(),
            run.report
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// The invariants.

fn check(plan: &Plan, shared: &Shared, run: &Run) -> Result<(), TestCaseError> {
    let report = &*run.report;
    let n = plan.nodes.len();

    // 1. The report lists every declared child exactly once, with its kind, and one outcome.
    let entries: Vec<&ChildReport> = report.iter().collect();
    prop_assert_eq!(entries.len(), n, "report entries vs declared children");
    let by_path: HashMap<&str, &ChildReport> =
        entries.iter().map(|c| (c.path.as_str(), *c)).collect();
    prop_assert_eq!(by_path.len(), n, "a path appears twice in the report");
    let mut r: Vec<&ChildReport> = Vec::with_capacity(n);
    for node in &plan.nodes {
        let Some(c) = by_path.get(node.path.as_str()) else {
            return Err(TestCaseError::fail(format!(
                "{} not in the report",
                node.path
            )));
        };
        let kind = if node.supervisor {
            ChildKind::Supervisor
        } else {
            ChildKind::Worker
        };
        prop_assert_eq!(c.kind, kind, "kind of {}", node.path);
        prop_assert_eq!(
            c.children.len(),
            node.children.len(),
            "children of {}",
            node.path
        );
        prop_assert_eq!(c.restarts, 0);
        r.push(c);
    }
    // Whoever was told has an end time; nobody has an end time without being told.
    for (i, c) in r.iter().enumerate() {
        prop_assert_eq!(
            c.told.is_some(),
            c.acknowledged.is_some(),
            "{}: told {:?}, acknowledged {:?}",
            plan.nodes[i].path,
            c.told,
            c.acknowledged
        );
        if let (Some(t), Some(a)) = (c.told, c.acknowledged) {
            prop_assert!(
                t <= a,
                "{} acknowledged before being told",
                plan.nodes[i].path
            );
        }
    }
    // The verdict follows the entries.
    let expected_outcome = if r.iter().any(|c| c.outcome == Outcome::TimedOut) {
        TreeOutcome::TimedOut
    } else if r
        .iter()
        .any(|c| matches!(c.outcome, Outcome::Panicked(_) | Outcome::Failed(_)))
    {
        TreeOutcome::Failed
    } else {
        TreeOutcome::Clean
    };
    prop_assert_eq!(report.outcome, expected_outcome);

    // 2. For "x depends on y": everything under y was told no earlier than everything under x
    //    had ended (by the report's clock)...
    let edges: Vec<(usize, usize)> = (0..n)
        .flat_map(|x| plan.nodes[x].deps.iter().map(move |&y| (x, y)))
        .collect();
    for &(x, y) in &edges {
        let x_last = plan
            .subtree(x)
            .into_iter()
            .filter_map(|k| r[k].acknowledged.map(|a| (a, k)))
            .max();
        let y_first = plan
            .subtree(y)
            .into_iter()
            .filter_map(|k| r[k].told.map(|t| (t, k)))
            .min();
        if let (Some((a, ka)), Some((t, kt))) = (x_last, y_first) {
            prop_assert!(
                a <= t,
                "{} depends on {}, but {} was told at {:?}, before {} ended at {:?}",
                plan.nodes[x].path,
                plan.nodes[y].path,
                plan.nodes[kt].path,
                t,
                plan.nodes[ka].path,
                a
            );
        }
    }
    // ...and by the workers' own log: no stop hook under y ran before a worker under x that
    // drained (or panicked) had done everything it did.
    let log = shared.log.lock().unwrap().clone();
    let mut first_stopping: Vec<Option<usize>> = vec![None; n];
    let mut last_event: Vec<Option<usize>> = vec![None; n];
    let mut drain_start: Vec<Option<usize>> = vec![None; n];
    let mut drain_done: Vec<Option<usize>> = vec![None; n];
    let mut counts: Vec<[usize; 3]> = vec![[0; 3]; n];
    let mut seen_ids = HashSet::new();
    let mut handled_events = vec![0u64; n];
    for (pos, &(w, ev)) in log.iter().enumerate() {
        last_event[w] = Some(pos);
        match ev {
            Ev::Stopping => {
                counts[w][0] += 1;
                first_stopping[w].get_or_insert(pos);
            }
            Ev::DrainStart => {
                counts[w][1] += 1;
                drain_start[w] = Some(pos);
            }
            Ev::DrainDone => {
                counts[w][2] += 1;
                drain_done[w] = Some(pos);
            }
            Ev::Handled(id) => {
                handled_events[w] += 1;
                prop_assert!(seen_ids.insert(id), "message {id} handled twice");
                // 4. Nothing is handled once the drained hook has started.
                prop_assert!(
                    drain_start[w].is_none(),
                    "{} handled message {id} after its drained hook started",
                    plan.nodes[w].path
                );
            }
        }
    }
    for &(x, y) in &edges {
        let ends: Vec<(usize, usize)> = plan
            .subtree(x)
            .into_iter()
            .filter(|&k| !plan.nodes[k].supervisor)
            .filter_map(|k| match r[k].outcome {
                Outcome::Drained => drain_done[k].map(|p| (p, k)),
                Outcome::Panicked(_) => last_event[k].map(|p| (p, k)),
                _ => None,
            })
            .collect();
        for b in plan.subtree(y) {
            let Some(sb) = first_stopping[b] else {
                continue;
            };
            for &(p, k) in &ends {
                prop_assert!(
                    p < sb,
                    "{} depends on {}, but {} ran on_stopping before {} had finished",
                    plan.nodes[x].path,
                    plan.nodes[y].path,
                    plan.nodes[b].path,
                    plan.nodes[k].path
                );
            }
        }
    }

    // 3. Supervisors are told before their children and end after them.
    for (i, node) in plan.nodes.iter().enumerate() {
        for &c in &node.children {
            if let (Some(ts), Some(tc)) = (r[i].told, r[c].told) {
                prop_assert!(ts <= tc, "{} told after its child", node.path);
            }
            if let (Some(a_s), Some(a_c)) = (r[i].acknowledged, r[c].acknowledged) {
                prop_assert!(a_s >= a_c, "{} ended before its child", node.path);
            }
            if r[c].told.is_some() {
                prop_assert!(r[i].told.is_some(), "{}'s child told, not it", node.path);
            }
        }
        if node.supervisor {
            let drained: u64 = node.children.iter().map(|&c| r[c].drained).sum();
            let dropped: u64 = node.children.iter().map(|&c| r[c].dropped).sum();
            prop_assert_eq!(r[i].drained, drained, "{} drained sum", node.path);
            prop_assert_eq!(r[i].dropped, dropped, "{} dropped sum", node.path);
        }
    }

    // Per worker: hooks at most once and in order; outcomes that fit the behaviour.
    let no_hang = plan.nodes.iter().all(|n| n.fault != Fault::HangInDrained);
    let no_sup_budget = plan
        .nodes
        .iter()
        .all(|n| !n.supervisor || n.budget.is_none());
    let in_time = report.total < DEADLINE;
    for i in plan.workers() {
        let (node, c) = (&plan.nodes[i], r[i]);
        prop_assert!(
            counts[i].iter().all(|&k| k <= 1),
            "{}: hooks ran {:?} times",
            node.path,
            counts[i]
        );
        if first_stopping[i].is_some() {
            prop_assert!(c.told.is_some(), "{} ran on_stopping untold", node.path);
        }
        if let (Some(s), Some(d)) = (first_stopping[i], drain_start[i]) {
            prop_assert!(s < d, "{}: drained hook before stop hook", node.path);
        }
        prop_assert!(
            drain_start[i].is_none() || first_stopping[i].is_some(),
            "{}: drained hook without stop hook",
            node.path
        );
        if c.outcome == Outcome::Drained {
            prop_assert!(
                counts[i] == [1, 1, 1],
                "{} drained but its hooks ran {:?} times",
                node.path,
                counts[i]
            );
            // The report's drain count: at least what it handled after on_stopping, at most
            // what it handled at all.
            let after_stop = log[first_stopping[i].unwrap_or(0)..]
                .iter()
                .filter(|(w, e)| *w == i && matches!(e, Ev::Handled(_)))
                .count() as u64;
            prop_assert!(
                after_stop <= c.drained && c.drained <= handled_events[i],
                "{}: drained {} but handled {} after on_stopping, {} in all",
                node.path,
                c.drained,
                after_stop,
                handled_events[i]
            );
        }
        let allowed: &[&str] = match node.fault {
            Fault::None => &["Drained", "TimedOut"],
            Fault::PanicInStopping | Fault::PanicInDrained => &["Panicked", "TimedOut"],
            Fault::HangInDrained => &["TimedOut"],
            Fault::PanicOnMessage => &["Panicked"],
            Fault::StopsItself => &["NotRunning"],
        };
        let got = outcome_name(&c.outcome);
        prop_assert!(
            allowed.contains(&got),
            "{} with fault {:?} ended {:?}",
            node.path,
            node.fault,
            c.outcome
        );
        if let Outcome::Panicked(m) = &c.outcome {
            prop_assert!(m.contains(FAULT_MARK), "{}: panic message {m:?}", node.path);
        }
        // 7. Without hangs, tight supervisor budgets or the overall deadline, every fault-free
        //    worker drains, and every panic is reported as such.
        if no_hang && no_sup_budget && in_time {
            let expected = match node.fault {
                Fault::None => "Drained",
                Fault::PanicInStopping | Fault::PanicInDrained | Fault::PanicOnMessage => {
                    "Panicked"
                }
                Fault::StopsItself => "NotRunning",
                Fault::HangInDrained => unreachable!(),
            };
            prop_assert_eq!(got, expected, "{} with fault {:?}", node.path, node.fault);
        }

        // 5. Accounting: every accepted message was handled or is counted as dropped. A request
        //    answered with an error was refused or dropped, which the sender cannot tell apart.
        let accepted = shared.accepted[i].load(Ordering::SeqCst);
        let handled = shared.handled[i].load(Ordering::SeqCst);
        let (req, req_ok) = (
            shared.requests[i].load(Ordering::SeqCst),
            shared.requests_ok[i].load(Ordering::SeqCst),
        );
        prop_assert_eq!(handled, handled_events[i]);
        if req > 0 {
            prop_assert!(
                accepted + req_ok <= handled + c.dropped
                    && handled + c.dropped <= accepted + req,
                "{}: accepted {accepted} + {req_ok}..{req} requests, handled {handled}, dropped {} ({:?})",
                node.path,
                c.dropped,
                c.outcome
            );
        } else if c.outcome == Outcome::TimedOut && node.w.pool {
            // Aborted on another arbiter: it may finish the batch in hand after the report
            // was made, so the report can only overcount what it dropped.
            prop_assert!(
                accepted <= handled + c.dropped,
                "{}: accepted {accepted}, handled {handled}, dropped {}",
                node.path,
                c.dropped
            );
        } else {
            prop_assert_eq!(
                accepted,
                handled + c.dropped,
                "{}: accepted = handled + dropped ({:?})",
                &node.path,
                &c.outcome
            );
        }
    }
    for (i, node) in plan.nodes.iter().enumerate().filter(|(_, n)| n.supervisor) {
        let got = outcome_name(&r[i].outcome);
        prop_assert!(
            got == "Drained" || got == "TimedOut",
            "supervisor {} ended {:?}",
            node.path,
            r[i].outcome
        );
        if no_hang && no_sup_budget && in_time {
            prop_assert_eq!(got, "Drained", "supervisor {}", &node.path);
        }
    }

    // A request is answered `Ok` exactly when its message was handled.
    for &(w, id, ok) in shared.request_results.lock().unwrap().iter() {
        prop_assert_eq!(
            ok,
            seen_ids.contains(&id),
            "request {} to {}: answered ok = {}, handled = {}",
            id,
            &plan.nodes[w].path,
            ok,
            seen_ids.contains(&id)
        );
    }
    let answered = shared.request_results.lock().unwrap().len() as u64;
    let sent: u64 = shared
        .requests
        .iter()
        .map(|r| r.load(Ordering::SeqCst))
        .sum();
    prop_assert_eq!(answered, sent, "every request is answered");

    // The report prints and serialises whatever the tree.
    let text = report.to_string();
    prop_assert!(text.starts_with("shutdown of `props`"));
    let json: serde_json::Value = serde_json::from_str(&report.to_json())
        .map_err(|e| TestCaseError::fail(format!("report JSON: {e}")))?;
    prop_assert_eq!(
        json["children"].as_array().map(Vec::len),
        Some(plan.top.len())
    );

    // A refused forward means one of the two did not drain: a dependency stays open until its
    // dependents are done.
    for &(from, to) in shared.refused_forwards.lock().unwrap().iter() {
        prop_assert!(
            !(r[from].outcome == Outcome::Drained && r[to].outcome == Outcome::Drained),
            "{} could not forward to its dependency {} although both drained",
            plan.nodes[from].path,
            plan.nodes[to].path
        );
    }

    // Deadlines: a node's deadline is the earlier of its parent's and its own budget from when
    // it was told. Nobody ends much later than its deadline, and nobody is aborted before it.
    let mut deadline: Vec<Option<Duration>> = vec![None; n];
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| plan.nodes[i].depth);
    for i in order {
        let node = &plan.nodes[i];
        let Some(told) = r[i].told else { continue };
        let parent = node.parent.map_or(Some(DEADLINE), |p| deadline[p]);
        let Some(parent) = parent else {
            return Err(TestCaseError::fail(format!(
                "{} told before its parent",
                node.path
            )));
        };
        let own = node.budget.or((!node.supervisor).then_some(WORKER_BUDGET));
        let d = own.map_or(parent, |b| parent.min(told + b));
        deadline[i] = Some(d);
        let ack = r[i].acknowledged.unwrap_or_default();
        prop_assert!(
            ack <= d + TIMER_SLACK,
            "{} ended at {:?}, past its deadline {:?}",
            node.path,
            ack,
            d
        );
        if r[i].outcome == Outcome::TimedOut {
            prop_assert!(
                ack + Duration::from_millis(1) >= d,
                "{} aborted at {:?}, before its deadline {:?}",
                node.path,
                ack,
                d
            );
        }
    }

    // 6. The shutdown ends within the overall deadline, plus a margin.
    prop_assert!(
        report.total <= DEADLINE + TIMER_SLACK,
        "report total {:?}",
        report.total
    );
    prop_assert!(
        run.elapsed <= DEADLINE + TIMER_SLACK + Duration::from_secs(1),
        "shutdown took {:?}",
        run.elapsed
    );
    Ok(())
}

fn outcome_name(o: &Outcome) -> &'static str {
    match o {
        Outcome::Drained => "Drained",
        Outcome::TimedOut => "TimedOut",
        Outcome::Panicked(_) => "Panicked",
        Outcome::Failed(_) => "Failed",
        Outcome::NotRunning => "NotRunning",
    }
}

/// Injected panics are caught by the tree; keep them out of the test output.
fn quiet_injected_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if !msg.contains(FAULT_MARK) {
                default(info);
            }
        }));
    });
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CI_CASES);
    ProptestConfig {
        cases,
        // Nothing written into the source tree; a failure prints its minimal case.
        failure_persistence: None,
        // Cases take up to a few seconds each: keep shrinking bounded by default.
        max_shrink_iters: std::env::var("PROPTEST_MAX_SHRINK_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn shutdown_protocol_holds_on_random_trees(case in case_gen()) {
        quiet_injected_panics();
        run_case(&case)?;
    }
}
