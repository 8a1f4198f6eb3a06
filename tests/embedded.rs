//! A tree embedded in an application that owns its actix System and its signals (the way an
//! `#[actix_web::main]` app hosts one): started inside the running System with the defaults,
//! shut down from the app's own code, and gone without a trace — the System, its arbiters and
//! the process's signal dispositions are as the app left them.
//!
//! The signal tests re-execute this test binary as a child process (one test, selected with
//! `--exact`, in the mode named by [`CHILD_ENV`]), wait for its marker line, send it SIGTERM and
//! look at how it ended. Every wait is bounded; a child that outlives its bound is killed and the
//! test fails with its output.

#![cfg(unix)]

mod common;
use common::output::Lines;

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use actix::prelude::*;
use actix_supervisor::{
    ChildAddr, ChildSpec, Outcome, Phase, Placement, ShutdownReport, Stopping, Tree, TreeOutcome,
    Worker, EXIT_CLEAN,
};
use common::init_log;
use tokio::sync::{mpsc as tmpsc, oneshot};

/// Bound on any single await in the in-process tests.
const WITHIN: Duration = Duration::from_secs(20);

async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match actix_rt::time::timeout(WITHIN, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: not within {WITHIN:?}"),
    }
}

// ----- the app's workers -----------------------------------------------------------------------

/// A worker that adds up what it is sent, and says when it reaches its `Stopping`.
struct Counter {
    name: &'static str,
    total: Arc<AtomicU64>,
    told: tmpsc::UnboundedSender<&'static str>,
}

impl Actor for Counter {
    type Context = Context<Self>;
}

impl Worker for Counter {
    fn on_stopping(&mut self, _: &mut Context<Self>, _: &Stopping) {
        let _ = self.told.send(self.name);
    }
}

/// Adds to the total; answers the new total.
#[derive(Message)]
#[rtype(result = "u64")]
struct Add(u64);

impl Handler<Add> for Counter {
    type Result = u64;
    fn handle(&mut self, m: Add, _: &mut Context<Self>) -> u64 {
        self.total.fetch_add(m.0, Ordering::SeqCst) + m.0
    }
}

/// Keeps the worker busy (its context waits, as on a slow async call) until `release`, so that
/// what is sent behind it queues up. Says when the wait has begun: the hold itself has been
/// handled (and counted) by then.
#[derive(Message)]
#[rtype(result = "()")]
struct Hold {
    entered: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
}

impl Handler<Hold> for Counter {
    type Result = ();
    fn handle(&mut self, m: Hold, ctx: &mut Context<Self>) {
        ctx.wait(actix::fut::wrap_future(async move {
            let _ = m.entered.send(());
            let _ = m.release.await;
        }));
    }
}

/// A counter's spec, its address and its total.
fn counter(
    name: &'static str,
    told: &tmpsc::UnboundedSender<&'static str>,
) -> (
    actix_supervisor::WorkerSpec<Counter>,
    ChildAddr<Counter>,
    Arc<AtomicU64>,
) {
    let total = Arc::new(AtomicU64::new(0));
    let (t, told) = (total.clone(), told.clone());
    let spec = ChildSpec::worker(name, move || Counter {
        name,
        total: t.clone(),
        told: told.clone(),
    });
    let addr = spec.addr();
    (spec, addr, total)
}

/// An ordinary actix actor of the app, not supervised by any tree.
struct Echo;

impl Actor for Echo {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "u32")]
struct Ping(u32);

impl Handler<Ping> for Echo {
    type Result = u32;
    fn handle(&mut self, m: Ping, _: &mut Context<Self>) -> u32 {
        m.0 + 1
    }
}

/// SIGTERM's current disposition (handler address, or `SIG_DFL` / `SIG_IGN`) and flags.
fn sigterm_disposition() -> (libc::sighandler_t, libc::c_int) {
    // SAFETY: sigaction(2) with a null new action only reads the current one into `old`, a
    // zeroed plain C struct it fully initialises.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        let rc = libc::sigaction(libc::SIGTERM, std::ptr::null(), &mut old);
        assert_eq!(rc, 0, "sigaction: {}", std::io::Error::last_os_error());
        (old.sa_sigaction, old.sa_flags)
    }
}

/// Checks the things an app relies on after its embedded tree has stopped: the System is
/// current and the same, its arbiter runs tasks, timers and new actors, and an arbiter the app
/// owns does too.
async fn assert_system_still_serves(system_id: usize, app_arbiter: &Arbiter, round: u32) {
    let system = System::try_current().expect("System::current() still works");
    assert_eq!(system.id(), system_id, "still the app's own System");
    assert!(
        System::current().arbiter().spawn(async {}),
        "the System's arbiter accepts tasks"
    );

    let answer = within(
        "a task spawned on the System",
        actix_rt::spawn(async { 6 * 7 }),
    )
    .await;
    assert_eq!(answer.expect("the task ran to completion"), 42);

    let (tx, rx) = oneshot::channel();
    assert!(Arbiter::current().spawn(async move {
        actix_rt::time::sleep(Duration::from_millis(1)).await;
        let _ = tx.send(round);
    }));
    assert_eq!(
        within("a timer on the current arbiter", rx).await,
        Ok(round)
    );

    let echo = Echo.start();
    let reply = within("a new actor on the System", echo.send(Ping(round))).await;
    assert_eq!(reply.expect("the new actor answered"), round + 1);

    let echo = Echo::start_in_arbiter(&app_arbiter.handle(), |_| Echo);
    let reply = within("a new actor on the app's arbiter", echo.send(Ping(round))).await;
    assert_eq!(
        reply.expect("the app's arbiter still runs actors"),
        round + 1
    );
}

fn assert_clean(report: &ShutdownReport, reason: &str) {
    assert_eq!(report.reason, reason, "{report}");
    assert_eq!(report.outcome, TreeOutcome::Clean, "{report}");
    assert_eq!(report.exit_code(), EXIT_CLEAN, "{report}");
    assert_eq!(report.dropped(), 0, "{report}");
    for child in report.iter() {
        assert_eq!(child.outcome, Outcome::Drained, "{}\n{report}", child.path);
        assert_eq!(child.dropped, 0, "{}\n{report}", child.path);
        assert!(
            child.told.is_some() && child.acknowledged.is_some(),
            "{report}"
        );
    }
}

// ----- in process ------------------------------------------------------------------------------

#[test]
fn an_embedded_tree_shuts_down_from_code_and_the_system_goes_on() {
    init_log();
    let system = System::new();
    let signals_before = sigterm_disposition();
    // An arbiter of the app's own, created before the tree; one worker of the tree runs on it.
    let app_arbiter = Arbiter::new();
    let app_handle = app_arbiter.handle();

    system.block_on(async {
        let system_id = System::current().id();

        // ---- the first tree: two busy workers and one that only reports its `Stopping` ----
        let (told_tx, mut told) = tmpsc::unbounded_channel();
        let (orders, orders_addr, orders_total) = counter("orders", &told_tx);
        let (payments, payments_addr, payments_total) = counter("payments", &told_tx);
        let (health, _, _) = counter("health", &told_tx);
        let tree = Tree::builder("app")
            .child(orders)
            .child(payments.placement(Placement::Arbiter(app_handle.clone())))
            .child(health)
            .build()
            .expect("a valid tree");
        let handle = within("the start", tree.start()).await.expect("started");
        assert_eq!(handle.phase(), Phase::Running);

        // Messages through the tree's addresses reach the workers and come back with answers.
        assert_eq!(orders_addr.send(Add(5)).await.unwrap(), 5);
        assert_eq!(payments_addr.send(Add(7)).await.unwrap(), 7);

        // A backlog: each busy worker is held, with 100 messages queued behind the hold.
        const BACKLOG: u64 = 100;
        const WHILE_DRAINING: u64 = 20;
        let mut releases = Vec::new();
        for addr in [&orders_addr, &payments_addr] {
            let (entered_tx, entered) = oneshot::channel();
            let (release, release_rx) = oneshot::channel();
            addr.do_send(Hold {
                entered: entered_tx,
                release: release_rx,
            })
            .unwrap_or_else(|_| panic!("the hold is accepted"));
            for _ in 0..BACKLOG {
                addr.do_send(Add(1))
                    .unwrap_or_else(|_| panic!("the backlog is accepted"));
            }
            within("the hold to begin", entered)
                .await
                .expect("the worker took the hold");
            releases.push(release);
        }

        // The app shuts the tree down from its own code.
        let shutdown = handle.shutdown("app shutting down");
        assert!(!handle.is_ready(), "readiness turns false at the trigger");
        // `health`, idle, reaches its `Stopping` at once; its busy siblings were told in the
        // same pass, so their `Stopping` is queued behind the backlog.
        assert_eq!(
            within("health told", told.recv()).await,
            Some("health"),
            "the idle worker reaches its Stopping first"
        );
        // Still accepted while the workers drain, and handled.
        for addr in [&orders_addr, &payments_addr] {
            for _ in 0..WHILE_DRAINING {
                addr.do_send(Add(1))
                    .unwrap_or_else(|_| panic!("accepted while draining"));
            }
        }
        for release in releases {
            release.send(()).expect("the hold is waiting");
        }
        let report = within("the report", shutdown).await;

        assert_clean(&report, "app shutting down");
        assert_eq!(report.children.len(), 3, "{report}");
        for (path, total, first) in [
            ("orders", &orders_total, 5),
            ("payments", &payments_total, 7),
        ] {
            let entry = report.find(path).expect("in the report");
            assert_eq!(
                entry.drained,
                BACKLOG + WHILE_DRAINING,
                "{path}: the backlog and what came while draining\n{report}"
            );
            assert_eq!(
                total.load(Ordering::SeqCst),
                first + BACKLOG + WHILE_DRAINING,
                "{path}: every accepted message was handled"
            );
        }
        assert_eq!(report.find("health").unwrap().drained, 0, "{report}");
        let mut reached = vec![];
        while let Ok(name) = told.try_recv() {
            reached.push(name);
        }
        reached.sort_unstable();
        assert_eq!(reached, ["orders", "payments"], "each worker was told once");

        assert_eq!(handle.phase(), Phase::Stopped);
        assert!(Arc::ptr_eq(&report, &handle.report().expect("published")));
        assert!(
            Arc::ptr_eq(&report, &within("wait", handle.wait()).await),
            "a later wait gets the same report"
        );
        // The tree's addresses are closed; the app's are not affected.
        assert!(orders_addr.do_send(Add(1)).is_err());
        assert!(!payments_addr.connected());

        // ---- the System goes on ----
        assert_system_still_serves(system_id, &app_arbiter, 1).await;

        // ---- and hosts a second tree, on an arbiter of its own and the System's ----
        let (told_tx, _told) = tmpsc::unbounded_channel();
        let (ledger, ledger_addr, ledger_total) = counter("ledger", &told_tx);
        let (audit, audit_addr, _) = counter("audit", &told_tx);
        let second = Tree::builder("app-2")
            .child(ledger.placement(Placement::Named("ledger".into())))
            .child(audit.depends_on("ledger"))
            .build()
            .expect("a valid tree");
        let handle = within("the second start", second.start())
            .await
            .expect("a second tree starts in the same System");
        assert_eq!(handle.phase(), Phase::Running);
        assert_eq!(ledger_addr.send(Add(3)).await.unwrap(), 3);
        assert_eq!(audit_addr.send(Add(4)).await.unwrap(), 4);
        let report = within("the second report", handle.shutdown("second done")).await;
        assert_clean(&report, "second done");
        assert_eq!(ledger_total.load(Ordering::SeqCst), 3);
        assert_eq!(handle.phase(), Phase::Stopped);

        assert_system_still_serves(system_id, &app_arbiter, 2).await;

        // The app, not the tree, decides when the System ends.
        System::current().stop_with_code(42);
    });

    let code = system
        .run_with_code()
        .expect("the System ran until the app stopped it");
    assert_eq!(
        code, 42,
        "the System was stopped by the app (code 42), not by a tree"
    );
    assert_eq!(
        sigterm_disposition(),
        signals_before,
        "the embedded trees left SIGTERM's disposition as they found it"
    );
    app_arbiter.stop();
    app_arbiter.join().expect("the app's arbiter stops");
}

// ----- in a child process, with real signals ---------------------------------------------------

/// Set in a child process to the mode it runs in; unset in the test run itself.
const CHILD_ENV: &str = "ACTIX_SUPERVISOR_EMBEDDED_CHILD";
/// How long a child waits for the SIGTERM before giving up (and exiting 0 without it).
const CHILD_WAITS: Duration = Duration::from_secs(60);
/// How long the parent waits for the child's marker, and then for its exit.
const PARENT_WAITS: Duration = Duration::from_secs(30);

const EMBEDDED_MARKER: &str = "tree stopped; waiting for SIGTERM";
const OWNER_MARKER: &str = "tree running; waiting for SIGTERM";

/// This test binary, re-executed to run one test in child mode.
struct ChildRun {
    pid: libc::pid_t,
    status: mpsc::Receiver<ExitStatus>,
    exited: bool,
    stdout: Arc<Lines>,
    stderr: Arc<Lines>,
}

impl ChildRun {
    fn start(test: &str, mode: &str) -> ChildRun {
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut child = Command::new(exe)
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, mode)
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("re-executing the test binary");
        let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
        let (stdout, _reader) = Lines::collect(child.stdout.take().unwrap());
        let (stderr, _reader) = Lines::collect(child.stderr.take().unwrap());
        let (tx, status) = mpsc::channel();
        std::thread::spawn(move || {
            if let Ok(s) = child.wait() {
                let _ = tx.send(s);
            }
        });
        ChildRun {
            pid,
            status,
            exited: false,
            stdout,
            stderr,
        }
    }

    fn wait_marker(&mut self, marker: &str) {
        if self
            .stdout
            .wait_for(PARENT_WAITS, |l| l.contains(marker))
            .is_none()
        {
            self.fail(&format!(
                "no `{marker}` line: the child ended, or {PARENT_WAITS:?} passed"
            ));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid (not reaped yet: `exited` is false) has no
        // memory effects.
        let rc = unsafe { libc::kill(self.pid, sig) };
        assert_eq!(rc, 0, "kill({sig}): {}", std::io::Error::last_os_error());
    }

    /// Waits for the exit, at most [`PARENT_WAITS`]; kills the child and fails if it does not.
    fn wait_exit(&mut self) -> ExitStatus {
        match self.status.recv_timeout(PARENT_WAITS) {
            Ok(status) => {
                self.exited = true;
                status
            }
            Err(_) => self.fail(&format!("still running {PARENT_WAITS:?} after SIGTERM")),
        }
    }

    /// What the child printed.
    fn dump(&self) -> String {
        let grace = Duration::from_secs(5);
        format!(
            "--- stdout:\n{}\n--- stderr:\n{}",
            self.stdout.all(grace),
            self.stderr.all(grace)
        )
    }

    fn fail(&mut self, why: &str) -> ! {
        self.kill();
        panic!("child: {why}\n{}", self.dump());
    }

    /// Kills the child unless it has exited (it may have, unnoticed: a child that failed).
    fn kill(&mut self) {
        if self.exited || self.status.try_recv().is_ok() {
            self.exited = true;
            return;
        }
        // SAFETY: as in `signal`. Not checked: the child may exit (and be reaped) meanwhile.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let _ = self.status.recv_timeout(PARENT_WAITS);
        self.exited = true;
    }
}

impl Drop for ChildRun {
    fn drop(&mut self) {
        // A failed assertion must not leave the process behind.
        self.kill();
    }
}

/// Prints a line the parent waits for, at once.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").expect("stdout");
    out.flush().expect("stdout");
}

/// A child inherits its parent's ignored signals; make SIGTERM's disposition the default, as in a
/// freshly started service, before any tree exists.
fn default_sigterm() {
    // SAFETY: signal(2) with SIG_DFL on a catchable signal, before any handler is installed.
    unsafe { libc::signal(libc::SIGTERM, libc::SIG_DFL) };
}

/// Child mode: an app hosting a tree with the defaults starts it, shuts it down from its own
/// code, and goes on running (its System alive) until SIGTERM — which must end it by the default
/// action.
fn embedded_child() {
    init_log();
    default_sigterm();
    let system = System::new();
    system.block_on(async {
        let (told_tx, _told) = tmpsc::unbounded_channel();
        let (store, store_addr, _) = counter("store", &told_tx);
        let (api, api_addr, _) = counter("api", &told_tx);
        let tree = Tree::builder("embedded")
            .child(store)
            .child(api.depends_on("store"))
            .build()
            .expect("a valid tree");
        let handle = within("the start", tree.start()).await.expect("started");
        assert_eq!(store_addr.send(Add(1)).await.unwrap(), 1);
        assert_eq!(api_addr.send(Add(2)).await.unwrap(), 2);
        let report = within("the report", handle.shutdown("app shutting down")).await;
        assert_clean(&report, "app shutting down");
        assert_eq!(handle.phase(), Phase::Stopped);
        say(EMBEDDED_MARKER);
        // The app goes on, its System running, as an actix-web app's would.
        actix_rt::time::sleep(CHILD_WAITS).await;
        say("no SIGTERM came");
    });
    std::process::exit(0);
}

/// Child mode: a tree that owns the signals; SIGTERM shuts it down, and the process exits with
/// the report's code.
fn owner_child() {
    init_log();
    default_sigterm();
    let system = System::new();
    system.block_on(async {
        let (told_tx, _told) = tmpsc::unbounded_channel();
        let (store, store_addr, _) = counter("store", &told_tx);
        let tree = Tree::builder("owner")
            .child(store)
            .handle_signals(true)
            .build()
            .expect("a valid tree");
        let handle = within("the start", tree.start()).await.expect("started");
        assert_eq!(store_addr.send(Add(1)).await.unwrap(), 1);
        say(OWNER_MARKER);
        match actix_rt::time::timeout(CHILD_WAITS, handle.wait()).await {
            Ok(report) => {
                say(&format!(
                    "report: reason={} outcome={:?} code={}",
                    report.reason,
                    report.outcome,
                    report.exit_code()
                ));
                std::process::exit(report.exit_code());
            }
            Err(_) => {
                say("no SIGTERM came");
                std::process::exit(0);
            }
        }
    });
}

#[test]
fn sigterm_still_kills_a_process_whose_embedded_tree_has_stopped() {
    const NAME: &str = "sigterm_still_kills_a_process_whose_embedded_tree_has_stopped";
    if std::env::var(CHILD_ENV).as_deref() == Ok("embedded") {
        embedded_child();
        return;
    }
    let mut child = ChildRun::start(NAME, "embedded");
    child.wait_marker(EMBEDDED_MARKER);
    child.signal(libc::SIGTERM);
    let status = child.wait_exit();
    assert_eq!(
        status.signal(),
        Some(libc::SIGTERM),
        "the tree installed no SIGTERM handler: the default action ended the process \
         (exit status {status:?})\n{}",
        child.dump()
    );
}

#[test]
fn a_tree_owning_the_signals_turns_sigterm_into_a_shutdown_and_an_exit_code() {
    const NAME: &str = "a_tree_owning_the_signals_turns_sigterm_into_a_shutdown_and_an_exit_code";
    if std::env::var(CHILD_ENV).as_deref() == Ok("owner") {
        owner_child();
        return;
    }
    let mut child = ChildRun::start(NAME, "owner");
    child.wait_marker(OWNER_MARKER);
    child.signal(libc::SIGTERM);
    let status = child.wait_exit();
    assert_eq!(
        (status.signal(), status.code()),
        (None, Some(EXIT_CLEAN)),
        "the tree handled SIGTERM and the process exited with the report's code\n{}",
        child.dump()
    );
    let report = child
        .stdout
        .wait_for(PARENT_WAITS, |l| l.contains("report: "));
    assert!(
        report
            .as_deref()
            .is_some_and(|l| l.ends_with("report: reason=SIGTERM outcome=Clean code=0")),
        "{}",
        child.dump()
    );
}
