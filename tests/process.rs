//! Process-level tests: the built `pipeline` example, driven with real signals.
//!
//! Each test starts the example binary with piped stdout/stderr (read on background threads so
//! the pipes never fill), waits for its `ready` line, sends SIGTERM with `libc::kill` (or, for a
//! tree that gives up by itself, sends nothing), and checks the exit code, the final
//! `produced=P consumed=C lost=L panics=N` line and the JSON report. Every wait is bounded,
//! synchronised on output lines rather than on sleeps where possible, and generous enough
//! for a loaded 2-core machine; a child that outlives its bound is killed and the test fails with
//! its output.

#![cfg(unix)]

mod common;
use common::output::Lines;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

const EXIT_CLEAN: i32 = 0;
const EXIT_FAILED: i32 = 3;
const EXIT_TIMED_OUT: i32 = 4;
const EXIT_FORCED: i32 = 5;

/// How long the example may take to print `ready`.
const READY_WITHIN: Duration = Duration::from_secs(20);

// ----- locating the example ------------------------------------------------------------------

/// The `pipeline` example, built if needed; `serde` is needed for `--report-json`.
fn pipeline_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| common::example::example_binary("pipeline", &["serde"]))
}

// ----- driving one run -----------------------------------------------------------------------

/// A running `pipeline` process.
struct Pipeline {
    child: Child,
    stdout: Arc<Lines>,
    stderr: Arc<Lines>,
    readers: Vec<JoinHandle<()>>,
    report_json: PathBuf,
}

/// What a finished run left behind.
struct Finished {
    code: Option<i32>,
    stdout: Vec<String>,
    stderr: String,
    report: Value,
    /// From [`Pipeline::finish`]'s reference instant to the exit being observed.
    elapsed: Duration,
}

impl Pipeline {
    /// Starts the example with `args` (plus `--report-json` to a fresh file) and waits for it to
    /// print `ready`.
    fn start(test: &str, args: &[&str]) -> Pipeline {
        let report_json =
            std::env::temp_dir().join(format!("pipeline-{}-{test}.json", std::process::id()));
        let _ = std::fs::remove_file(&report_json);
        let mut child = Command::new(pipeline_binary())
            .args(args)
            .arg("--report-json")
            .arg(&report_json)
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the pipeline example");
        let (stdout, out_reader) = Lines::collect(child.stdout.take().unwrap());
        let (stderr, err_reader) = Lines::collect(child.stderr.take().unwrap());
        let mut run = Pipeline {
            child,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
            report_json,
        };
        if run
            .stdout
            .wait_for(READY_WITHIN, |l| l.starts_with("ready"))
            .is_none()
        {
            run.fail(&format!("no `ready` line within {READY_WITHIN:?}"));
        }
        run
    }

    /// Sends SIGTERM.
    fn sigterm(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) with a pid we own and a valid signal number has no memory effects.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(
            rc,
            0,
            "kill(SIGTERM) failed: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits for a stderr line containing all of `needles`.
    fn wait_stderr(&mut self, timeout: Duration, needles: &[&str]) -> String {
        match self
            .stderr
            .wait_for(timeout, |l| needles.iter().all(|n| l.contains(n)))
        {
            Some(line) => line,
            None => self.fail(&format!(
                "no stderr line containing {needles:?} within {timeout:?}"
            )),
        }
    }

    /// Waits for the process to exit, at most `bound` after `since`; a process still running
    /// then is killed and the test fails. Returns the exit code, stdout lines, stderr, and the
    /// time from `since` to the exit.
    fn wait_exit(
        &mut self,
        since: Instant,
        bound: Duration,
    ) -> (Option<i32>, Vec<String>, String, Duration) {
        let status = loop {
            match self.child.try_wait().expect("waiting for the pipeline") {
                Some(status) => break status,
                None if since.elapsed() > bound => {
                    self.fail(&format!("still running {bound:?} after the signal"))
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let elapsed = since.elapsed();
        for reader in self.readers.drain(..) {
            reader.join().expect("an output reader thread");
        }
        let stdout = self.stdout.snapshot();
        let stderr = self.stderr.snapshot().join("\n");
        (status.code(), stdout, stderr, elapsed)
    }

    /// [`wait_exit`](Self::wait_exit), then reads the JSON report the run wrote.
    fn finish(mut self, since: Instant, bound: Duration) -> Finished {
        let (code, stdout, stderr, elapsed) = self.wait_exit(since, bound);
        let report = match std::fs::read_to_string(&self.report_json) {
            Ok(json) => serde_json::from_str(&json).unwrap_or_else(|e| {
                panic!("the report is not JSON ({e}):\n{json}\n--- stderr:\n{stderr}")
            }),
            Err(e) => panic!(
                "no report at {} ({e}); exit {code:?}\n--- stdout:\n{}\n--- stderr:\n{stderr}",
                self.report_json.display(),
                stdout.join("\n")
            ),
        };
        let _ = std::fs::remove_file(&self.report_json);
        Finished {
            code,
            stdout,
            stderr,
            report,
            elapsed,
        }
    }

    /// For a process that exits without a report: its exit code and everything it printed.
    fn finish_without_report(mut self, since: Instant, bound: Duration) -> (Option<i32>, String) {
        let (code, stdout, stderr, elapsed) = self.wait_exit(since, bound);
        let dump = format!(
            "exit {code:?} after {elapsed:?}\n--- stdout:\n{}\n--- stderr:\n{stderr}",
            stdout.join("\n")
        );
        (code, dump)
    }

    /// Kills the process and fails the test, showing what it printed.
    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.report_json);
        panic!(
            "pipeline: {why}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.stdout.snapshot().join("\n"),
            self.stderr.snapshot().join("\n")
        );
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // A failed assertion must not leave the process behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ----- reading the results -------------------------------------------------------------------

/// `produced=P consumed=C lost=L panics=N`.
#[derive(Debug)]
struct Books {
    produced: u64,
    consumed: u64,
    lost: u64,
    panics: u64,
}

impl Finished {
    /// Context for assertion messages.
    /// Each of `paths` drained.
    fn assert_drained<P: AsRef<str>>(&self, paths: impl IntoIterator<Item = P>) {
        for path in paths {
            let path = path.as_ref();
            assert_eq!(self.outcome(path), "Drained", "{path}\n{}", self.dump());
        }
    }

    /// `produced = consumed + lost`, and `lost` is exactly what the report counts as dropped.
    fn assert_books_balance(&self) {
        let books = self.books();
        assert_eq!(
            books.produced,
            books.consumed + books.lost,
            "{books:?}\n{}",
            self.dump()
        );
        assert_eq!(
            books.lost,
            self.report_dropped(),
            "{books:?}\n{}",
            self.dump()
        );
    }

    fn dump(&self) -> String {
        format!(
            "exit {:?} after {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.code,
            self.elapsed,
            self.stdout.join("\n"),
            self.stderr
        )
    }

    /// The books, from the last stdout line.
    fn books(&self) -> Books {
        let last = self.stdout.last().map(String::as_str).unwrap_or_default();
        let field = |name: &str| -> u64 {
            last.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| {
                    panic!("no `{name}=` in the last line {last:?}\n{}", self.dump())
                })
        };
        Books {
            produced: field("produced"),
            consumed: field("consumed"),
            lost: field("lost"),
            panics: field("panics"),
        }
    }

    /// Every child entry of the report, depth first.
    fn children(&self) -> Vec<&Value> {
        fn walk<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
            for c in v["children"].as_array().into_iter().flatten() {
                out.push(c);
                walk(c, out);
            }
        }
        let mut out = Vec::new();
        walk(&self.report, &mut out);
        out
    }

    /// The report entry at `path`.
    fn child(&self, path: &str) -> &Value {
        self.children()
            .into_iter()
            .find(|c| c["path"] == path)
            .unwrap_or_else(|| panic!("no `{path}` in the report\n{}", self.dump()))
    }

    /// The outcome kind (`Drained`, `TimedOut`, ...) of the child at `path`.
    fn outcome(&self, path: &str) -> &str {
        self.child(path)["outcome"]["kind"]
            .as_str()
            .unwrap_or_default()
    }

    /// Messages dropped across the tree, per the report (sum over the top-level children).
    fn report_dropped(&self) -> u64 {
        self.report["children"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["dropped"].as_u64().unwrap_or_default())
            .sum()
    }

    /// A non-negative integer field (`restarts`, `dropped`, ...) of the entry at `path`.
    fn count(&self, path: &str, field: &str) -> u64 {
        self.child(path)[field]
            .as_u64()
            .unwrap_or_else(|| panic!("`{path}` has no `{field}` count\n{}", self.dump()))
    }

    /// Milliseconds since the shutdown started when `path` was told / acknowledged.
    fn at(&self, path: &str, field: &str) -> f64 {
        self.child(path)[field]
            .as_f64()
            .unwrap_or_else(|| panic!("`{path}` has no `{field}` time\n{}", self.dump()))
    }
}

/// Every child of a pipeline with `producers` producers and `workers` workers.
fn all_paths(producers: usize, workers: usize) -> Vec<String> {
    let mut paths = vec!["source".to_owned()];
    paths.extend((0..producers).map(|i| format!("source/{i}")));
    paths.push("router".into());
    paths.push("workers".into());
    paths.extend((0..workers).map(|i| format!("workers/{i}")));
    paths.push("sink".into());
    paths
}

// ----- the tests -----------------------------------------------------------------------------

#[test]
fn sigterm_drains_everything_in_dependency_order() {
    let run = Pipeline::start(
        "clean",
        &["--producers", "3", "--workers", "4", "--rate", "2000"],
    );
    // Let messages flow for a moment (and wait for the first ones to reach the sink's side).
    std::thread::sleep(Duration::from_millis(500));
    run.sigterm();
    let sent = Instant::now();
    let done = run.finish(sent, Duration::from_secs(30));

    assert_eq!(done.code, Some(EXIT_CLEAN), "{}", done.dump());
    let books = done.books();
    assert!(books.produced > 0, "{books:?}\n{}", done.dump());
    assert_eq!(books.lost, 0, "{books:?}\n{}", done.dump());
    assert_eq!(books.produced, books.consumed, "{books:?}\n{}", done.dump());

    assert_eq!(done.report["outcome"], "Clean", "{}", done.dump());
    assert_eq!(done.report["reason"], "SIGTERM", "{}", done.dump());
    let listed: Vec<&str> = done
        .children()
        .iter()
        .map(|c| c["path"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(listed, all_paths(3, 4), "{}", done.dump());
    for path in all_paths(3, 4) {
        assert_eq!(done.outcome(&path), "Drained", "{path}\n{}", done.dump());
        assert_eq!(done.child(&path)["dropped"], 0, "{path}\n{}", done.dump());
        // The printed report names every child with its outcome too.
        let name = path.rsplit('/').next().unwrap();
        assert!(
            done.stderr
                .lines()
                .any(|l| l.split_whitespace().take(2).eq([name, "drained"])),
            "`{path}` is not listed as drained on stderr\n{}",
            done.dump()
        );
    }

    // The order told: each stage is told only after the one upstream of it acknowledged.
    for (upstream, downstream) in [
        ("source", "router"),
        ("router", "workers"),
        ("workers", "sink"),
    ] {
        let acked = done.at(upstream, "acknowledged");
        let told = done.at(downstream, "told");
        assert!(
            acked <= told,
            "{upstream} acknowledged at {acked} ms, after {downstream} was told at {told} ms\n{}",
            done.dump()
        );
    }
    // And a supervisor is told before its children and acknowledges after them.
    for (sup, n) in [("source", 3), ("workers", 4)] {
        for i in 0..n {
            let child = format!("{sup}/{i}");
            assert!(
                done.at(sup, "told") <= done.at(&child, "told"),
                "{child}\n{}",
                done.dump()
            );
            assert!(
                done.at(&child, "acknowledged") <= done.at(sup, "acknowledged"),
                "{child}\n{}",
                done.dump()
            );
        }
    }
}

#[test]
fn a_hung_worker_is_aborted_at_the_overall_deadline() {
    let run = Pipeline::start(
        "hang-deadline",
        &["--hang", "workers/1", "--deadline-ms", "1500"],
    );
    std::thread::sleep(Duration::from_millis(300));
    run.sigterm();
    let sent = Instant::now();
    // workers/1's own budget is the default 5 s: the 1.5 s overall deadline is what aborts it.
    let done = run.finish(sent, Duration::from_secs(20));

    assert_eq!(done.code, Some(EXIT_TIMED_OUT), "{}", done.dump());
    assert!(
        done.elapsed > Duration::from_millis(1400),
        "exited before the deadline could pass\n{}",
        done.dump()
    );
    assert!(
        done.elapsed < Duration::from_secs(6),
        "took too long after the deadline\n{}",
        done.dump()
    );
    assert_eq!(done.report["outcome"], "TimedOut", "{}", done.dump());
    assert_eq!(done.outcome("workers/1"), "TimedOut", "{}", done.dump());
    done.assert_drained([
        "source",
        "source/0",
        "source/1",
        "router",
        "workers/0",
        "workers/2",
        "workers/3",
    ]);
    assert!(
        done.stderr
            .lines()
            .any(|l| l.contains("TIMED OUT") && l.trim_start().starts_with('1')),
        "the printed report does not show workers/1 timed out\n{}",
        done.dump()
    );
    // The hung worker had handled everything before hanging in its flush: nothing is lost, and
    // whatever was dropped is exactly what the books say.
    done.assert_books_balance();
}

#[test]
fn a_second_sigterm_forces_the_shutdown() {
    let mut run = Pipeline::start("hang-forced", &["--hang", "workers/1"]);
    std::thread::sleep(Duration::from_millis(300));
    run.sigterm();
    let first = Instant::now();
    // The tree names what it is waiting for (progress line, every second).
    run.wait_stderr(Duration::from_secs(15), &["waiting on", "workers/1"]);
    assert!(
        first.elapsed() < Duration::from_secs(4),
        "the progress line should come before workers/1's 5 s budget runs out"
    );
    run.sigterm();
    let second = Instant::now();
    let done = run.finish(second, Duration::from_secs(20));

    assert_eq!(done.code, Some(EXIT_FORCED), "{}", done.dump());
    assert!(
        done.elapsed < Duration::from_secs(4),
        "a forced shutdown should not wait for budgets\n{}",
        done.dump()
    );
    assert_eq!(done.report["outcome"], "Forced", "{}", done.dump());
    assert_eq!(done.outcome("workers/1"), "TimedOut", "{}", done.dump());
    done.assert_drained([
        "source/0",
        "source/1",
        "router",
        "workers/0",
        "workers/2",
        "workers/3",
    ]);
    // Whatever the abort dropped is exactly what the books call lost.
    done.assert_books_balance();
}

#[test]
fn a_panic_while_draining_is_reported_and_the_siblings_still_drain() {
    let run = Pipeline::start("panic", &["--panic-on-drain", "workers/2"]);
    std::thread::sleep(Duration::from_millis(300));
    run.sigterm();
    let sent = Instant::now();
    let done = run.finish(sent, Duration::from_secs(30));

    assert_eq!(done.code, Some(EXIT_FAILED), "{}", done.dump());
    assert_eq!(done.report["outcome"], "Failed", "{}", done.dump());
    let outcome = &done.child("workers/2")["outcome"];
    assert_eq!(outcome["kind"], "Panicked", "{}", done.dump());
    assert!(
        outcome["detail"]
            .as_str()
            .is_some_and(|m| m.contains("injected panic on drain")),
        "the panic message is missing: {outcome}\n{}",
        done.dump()
    );
    assert!(
        done.stderr.contains("PANICKED") && done.stderr.contains("injected panic on drain"),
        "the printed report does not show the panic\n{}",
        done.dump()
    );
    done.assert_drained(all_paths(2, 4).iter().filter(|p| *p != "workers/2"));
    // workers/2 had handled everything queued before `Stopping` when it panicked.
    assert!(done.books().produced > 0, "{}", done.dump());
    done.assert_books_balance();
}

#[test]
fn a_third_sigterm_exits_at_once_even_when_the_tree_is_stuck() {
    // The router blocks the main thread (where the tree's runtime runs) when told to stop, so the
    // second signal cannot abort anything: only the third gets the process out.
    let mut run = Pipeline::start("wedged", &["--wedge", "router"]);
    std::thread::sleep(Duration::from_millis(300));
    run.sigterm();
    run.wait_stderr(
        Duration::from_secs(15),
        &["router: blocking this thread forever"],
    );
    run.sigterm();
    run.wait_stderr(Duration::from_secs(15), &["second signal"]);
    run.sigterm();
    let third = Instant::now();
    let done = run.finish_without_report(third, Duration::from_secs(20));
    assert_eq!(done.0, Some(EXIT_FORCED), "{}", done.1);
    assert!(
        third.elapsed() < Duration::from_secs(3),
        "the third signal exits at once\n{}",
        done.1
    );
}

#[test]
fn a_panicking_worker_is_restarted_and_loses_only_the_message_in_hand() {
    // workers/1 gets about 500 messages a second (2 producers × 1000/s over 4 workers): a panic
    // every 150 is 3 or so a second, far within 1000 restarts per 5 s.
    let mut run = Pipeline::start(
        "panic-every",
        &[
            "--panic-every",
            "150",
            "workers/1",
            "--max-restarts",
            "1000",
        ],
    );
    // The runtime's INFO line once the third fresh instance has started. The signal goes right
    // after it, so the next panic is some 150 messages (~300 ms) away: a panic in the instant
    // the shutdown begins would be recorded, not restarted (and the exit code be 3).
    run.wait_stderr(
        Duration::from_secs(30),
        &["restarted workers/1 (restart 3)"],
    );
    run.sigterm();
    let sent = Instant::now();
    let done = run.finish(sent, Duration::from_secs(30));

    // Panics while running are restarts, not failures: the shutdown itself is clean.
    assert_eq!(done.code, Some(EXIT_CLEAN), "{}", done.dump());
    assert_eq!(done.report["outcome"], "Clean", "{}", done.dump());
    assert_eq!(done.report["reason"], "SIGTERM", "{}", done.dump());
    done.assert_drained(all_paths(2, 4));

    let books = done.books();
    assert!(books.panics >= 3, "{books:?}\n{}", done.dump());
    assert!(books.consumed > 0, "{books:?}\n{}", done.dump());
    assert_eq!(
        books.produced,
        books.consumed + books.lost,
        "{books:?}\n{}",
        done.dump()
    );
    // The mailbox outlives each instance: only the message being handled is lost per panic.
    assert_eq!(books.lost, books.panics, "{books:?}\n{}", done.dump());
    done.assert_books_balance();

    // One restart and one dropped message per panic, for workers/1 and no one else.
    assert_eq!(
        done.count("workers/1", "restarts"),
        books.panics,
        "{books:?}\n{}",
        done.dump()
    );
    assert_eq!(
        done.count("workers/1", "dropped"),
        books.panics,
        "{books:?}\n{}",
        done.dump()
    );
    assert!(
        done.child("workers/1")["last_failure"]
            .as_str()
            .is_some_and(|f| f.contains("injected panic")),
        "workers/1's last failure should be the injected panic\n{}",
        done.dump()
    );
    for path in all_paths(2, 4).iter().filter(|p| *p != "workers/1") {
        assert_eq!(done.count(path, "restarts"), 0, "{path}\n{}", done.dump());
        // A supervisor's `dropped` sums its subtree's.
        let dropped = if path == "workers" { books.panics } else { 0 };
        assert_eq!(
            done.count(path, "dropped"),
            dropped,
            "{path}\n{}",
            done.dump()
        );
    }

    // The printed report: only workers/1's row shows restarts, with the count.
    let rows: Vec<&str> = done
        .stderr
        .lines()
        .filter(|l| l.contains("restarts="))
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}\n{}", done.dump());
    assert!(
        rows[0].split_whitespace().take(2).eq(["1", "drained"])
            && rows[0].contains(&format!("restarts={}", books.panics)),
        "{rows:?}\n{}",
        done.dump()
    );
}

#[test]
fn panics_beyond_the_restart_intensity_escalate_to_the_root_and_exit_3() {
    // A panic every 25 messages is about 20 a second, far beyond the default 3 restarts in 5 s:
    // `workers` gives up, the root restarts it (3 times, its own default), it gives up again,
    // and the root gives up: the tree shuts down by itself.
    let mut run = Pipeline::start("escalate", &["--panic-every", "25", "workers/1"]);
    let ready = Instant::now();
    run.wait_stderr(Duration::from_secs(30), &["workers: ", "giving up"]);
    run.wait_stderr(
        Duration::from_secs(30),
        &["tree `pipeline`: ", "restarts within", "giving up"],
    );
    // No signal: the process ends on its own.
    let done = run.finish(ready, Duration::from_secs(60));

    assert_eq!(done.code, Some(EXIT_FAILED), "{}", done.dump());
    assert_eq!(done.report["outcome"], "Failed", "{}", done.dump());
    let reason = done.report["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("restart intensity") && reason.contains("workers failed: gave up"),
        "the reason should name the root's restart intensity and the failure behind it: \
         {reason:?}\n{}",
        done.dump()
    );

    // `workers` gave up for good after the root had restarted it as often as allowed.
    let workers = &done.child("workers")["outcome"];
    assert_eq!(workers["kind"], "Failed", "{}", done.dump());
    assert!(
        workers["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("gave up") && d.contains("workers/1 panicked")),
        "{workers}\n{}",
        done.dump()
    );
    assert_eq!(done.count("workers", "restarts"), 3, "{}", done.dump());
    assert_eq!(done.outcome("workers/1"), "Panicked", "{}", done.dump());
    // Everything upstream and downstream still drained.
    done.assert_drained(["source", "source/0", "source/1", "router", "sink"]);
    assert!(
        done.stderr.contains("FAILED") && done.stderr.contains("restarts="),
        "the printed report should show the failure and the restarts\n{}",
        done.dump()
    );

    // Every panic lost its message; messages queued behind the last one were never handled
    // (workers/1 was not started again), and are counted too. The books still balance.
    let books = done.books();
    assert!(books.panics > 3, "{books:?}\n{}", done.dump());
    assert!(books.lost >= books.panics, "{books:?}\n{}", done.dump());
    assert_eq!(
        books.produced,
        books.consumed + books.lost,
        "{books:?}\n{}",
        done.dump()
    );
}

#[test]
fn panic_every_rejects_what_it_cannot_apply_to() {
    for (args, expect) in [
        (&["--panic-every", "5", "workers/9"][..], "no such child"),
        (
            &["--panic-every", "5", "source/0"][..],
            "producers handle no messages",
        ),
        (&["--panic-every", "5", "workers"][..], "no such child"),
        (&["--panic-every", "0", "router"][..], "at least 1"),
        (&["--panic-every", "x", "sink"][..], "at least 1"),
        (&["--panic-every", "5"][..], "--panic-every"),
    ] {
        let mut child = Command::new(pipeline_binary())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the pipeline example");
        let (stderr, reader) = Lines::collect(child.stderr.take().unwrap());
        let since = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for the pipeline") {
                break status;
            }
            if since.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{args:?}: still running after 20 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        reader.join().expect("the stderr reader thread");
        let stderr = stderr.snapshot().join("\n");
        assert_eq!(status.code(), Some(2), "{args:?}\n{stderr}");
        assert!(stderr.contains(expect), "{args:?}: {expect:?}\n{stderr}");
    }
}
