//! Process-level tests of the `web` example: the built binary, a real HTTP client over loopback
//! (awc), real signals, exit codes.
//!
//! Each test starts the example on `127.0.0.1:0` with piped stdout/stderr (read on background
//! threads so the pipes never fill), reads the address it printed, and synchronises on what it
//! prints rather than on sleeps: the worker's debug line `starting N ms of work` says a request
//! has reached a worker, so it is inside the server's handler and counted as in flight; the
//! runtime's INFO lines say when the tree drains and when the server is told to stop. Every wait
//! is bounded and generous for a loaded 2-core machine; a process that outlives its bound is
//! killed (also when an assertion fails: the guard kills on drop) and the test fails with its
//! output.

#![cfg(all(unix, feature = "web"))]

mod common;
use common::output::Lines;

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const EXIT_CLEAN: i32 = 0;
const EXIT_BAD_ARGS: i32 = 2;
const EXIT_TIMED_OUT: i32 = 4;

/// How long the example may take to print its `ready:` line.
const READY_WITHIN: Duration = Duration::from_secs(20);
/// Bound on any one wait for an event that should come within milliseconds.
const SOON: Duration = Duration::from_secs(15);

// ----- locating the example ------------------------------------------------------------------

/// The `web` example, built if needed.
fn web_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| common::example::example_binary("web", &["web"]))
}

// ----- the child's output --------------------------------------------------------------------

// ----- one run of the example ----------------------------------------------------------------

/// A running `web` process. Dropping it kills the process if it is still running, so a failed
/// assertion never leaves it behind.
struct Web {
    child: Child,
    stdout: Arc<Lines>,
    stderr: Arc<Lines>,
    readers: Vec<JoinHandle<()>>,
}

/// What a finished run left behind.
struct Finished {
    code: Option<i32>,
    stdout: Vec<String>,
    stderr: Vec<String>,
    /// From the reference instant given to [`Web::finish`] to the exit being observed.
    elapsed: Duration,
}

impl Web {
    /// Starts the example with `args`, logging each job (`web=debug`) besides the INFO lines.
    fn spawn(args: &[&str]) -> Web {
        Web::spawn_with_env(args, &[])
    }

    fn spawn_with_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Web {
        let mut child = Command::new(web_binary())
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,web=debug")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the web example");
        let (stdout, out_reader) = Lines::collect(child.stdout.take().unwrap());
        let (stderr, err_reader) = Lines::collect(child.stderr.take().unwrap());
        Web {
            child,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
        }
    }

    /// Starts the example on a free loopback port and returns it with the address it printed.
    fn start(args: &[&str]) -> (Web, SocketAddr) {
        Web::start_with_env(args, &[])
    }

    fn start_with_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> (Web, SocketAddr) {
        let mut web = Web::spawn_with_env(&[&["--bind", "127.0.0.1:0"], args].concat(), env);
        let Some(ready) = web
            .stdout
            .wait_for_n(1, READY_WITHIN, |l| l.starts_with("ready:"))
        else {
            web.fail(&format!("no `ready:` line within {READY_WITHIN:?}"));
        };
        let addr = ready[0]
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http://"))
            .and_then(|a| a.parse::<SocketAddr>().ok());
        let Some(addr) = addr else {
            web.fail(&format!("no http://ADDR in {:?}", ready[0]));
        };
        (web, addr)
    }

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

    /// Waits for `n` stderr lines containing all of `needles`.
    fn wait_stderr_n(&mut self, n: usize, timeout: Duration, needles: &[&str]) -> Vec<String> {
        match self
            .stderr
            .wait_for_n(n, timeout, |l| needles.iter().all(|s| l.contains(s)))
        {
            Some(lines) => lines,
            None => self.fail(&format!(
                "not {n} stderr lines containing {needles:?} within {timeout:?}"
            )),
        }
    }

    fn wait_stderr(&mut self, timeout: Duration, needles: &[&str]) -> String {
        self.wait_stderr_n(1, timeout, needles).remove(0)
    }

    /// Waits for the process to exit, at most `bound` after `since`; a process still running
    /// then is killed and the test fails.
    fn finish(mut self, since: Instant, bound: Duration) -> Finished {
        let status = loop {
            match self.child.try_wait().expect("waiting for the web example") {
                Some(status) => break status,
                None if since.elapsed() > bound => {
                    self.fail(&format!("still running {bound:?} later"))
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let elapsed = since.elapsed();
        for reader in self.readers.drain(..) {
            reader.join().expect("an output reader thread");
        }
        Finished {
            code: status.code(),
            stdout: self.stdout.snapshot(),
            stderr: self.stderr.snapshot(),
            elapsed,
        }
    }

    /// Kills the process and fails the test, showing what it printed.
    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!(
            "web: {why}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.stdout.snapshot().join("\n"),
            self.stderr.snapshot().join("\n")
        );
    }
}

impl Drop for Web {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Finished {
    /// Context for assertion messages.
    fn dump(&self) -> String {
        format!(
            "exit {:?} after {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.code,
            self.elapsed,
            self.stdout.join("\n"),
            self.stderr.join("\n")
        )
    }

    /// Index of the first stderr line containing all of `needles`.
    fn line_index(&self, needles: &[&str]) -> usize {
        self.stderr
            .iter()
            .position(|l| needles.iter().all(|n| l.contains(n)))
            .unwrap_or_else(|| panic!("no stderr line with {needles:?}\n{}", self.dump()))
    }

    /// The printed report's row for the child called `name` (the report's lines are the only
    /// ones that start, after their indentation, with a child's name and then its outcome).
    fn report_row(&self, name: &str, outcome: &str) -> Row {
        let row = self.stderr.iter().find(|l| {
            let mut words = l.split_whitespace();
            words.next() == Some(name) && l.contains(outcome)
        });
        let Some(row) = row else {
            panic!("no report row `{name} {outcome}`\n{}", self.dump());
        };
        // `name  outcome  drain  drained  dropped  |timeline| extras`; the outcome may be two
        // words (`TIMED OUT`), so the columns are read after it.
        let after = &row[row.find(outcome).unwrap() + outcome.len()..];
        let cols: Vec<&str> = after.split_whitespace().collect();
        let count = |i: usize, what: &str| -> u64 {
            cols.get(i)
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("no {what} column in {row:?}\n{}", self.dump()))
        };
        Row {
            line: row.clone(),
            drained: count(1, "drained"),
            dropped: count(2, "dropped"),
        }
    }
}

/// One row of the printed report.
#[derive(Debug)]
struct Row {
    line: String,
    drained: u64,
    dropped: u64,
}

// ----- the HTTP client -----------------------------------------------------------------------

/// Status and body, or why there was none.
type Response = Result<(u16, String), String>;

async fn fetch(client: &awc::Client, url: &str) -> Response {
    let mut res = client.get(url).send().await.map_err(|e| e.to_string())?;
    let body = res.body().await.map_err(|e| e.to_string())?;
    Ok((
        res.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// One GET on a new connection, from this thread (in an actix System of its own).
fn get(addr: SocketAddr, path: &str) -> Response {
    let url = format!("http://{addr}{path}");
    actix_rt::System::new().block_on(async move {
        let client = awc::Client::builder().timeout(SOON).finish();
        fetch(&client, &url).await
    })
}

/// `n` concurrent GETs of `path`, made from a thread of their own.
struct Requests {
    results: mpsc::Receiver<Vec<Response>>,
    thread: JoinHandle<()>,
}

impl Requests {
    fn start(addr: SocketAddr, path: &str, n: usize) -> Requests {
        let url = format!("http://{addr}{path}");
        let (tx, results) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let responses = actix_rt::System::new().block_on(async move {
                let client = awc::Client::builder()
                    .timeout(Duration::from_secs(60))
                    .finish();
                let tasks: Vec<_> = (0..n)
                    .map(|_| {
                        let (client, url) = (client.clone(), url.clone());
                        actix_rt::spawn(async move { fetch(&client, &url).await })
                    })
                    .collect();
                let mut responses = Vec::new();
                for task in tasks {
                    responses.push(task.await.unwrap_or_else(|e| Err(e.to_string())));
                }
                responses
            });
            let _ = tx.send(responses);
        });
        Requests { results, thread }
    }

    /// Whether every response (or failure) is in.
    fn done(&self) -> bool {
        self.thread.is_finished()
    }

    fn wait(self, timeout: Duration) -> Vec<Response> {
        self.results
            .recv_timeout(timeout)
            .unwrap_or_else(|e| panic!("the requests did not end within {timeout:?}: {e}"))
    }
}

// ----- the tests -----------------------------------------------------------------------------

/// How long each of the in-flight requests works: longer than the readiness grace plus a wide
/// margin, so that all of them are still in progress when the server is told to stop.
const JOB_MS: u64 = 5_000;
const GRACE_MS: u64 = 1_500;
const REQUESTS: usize = 20;

#[test]
fn sigterm_refuses_new_connections_completes_requests_in_flight_and_exits_0() {
    let (mut web, addr) = Web::start(&["--grace-ms", &GRACE_MS.to_string()]);
    web.wait_stderr(
        SOON,
        &["actix_supervisor::web", &format!("listening on {addr}")],
    );
    assert_eq!(
        get(addr, "/readyz"),
        Ok((
            200,
            r#"{"phase":"running","ready":true,"live":true}"#.to_owned()
        ))
    );

    let requests = Requests::start(addr, &format!("/work?ms={JOB_MS}"), REQUESTS);
    // Each worker logs the job it takes: then the request is in the server's handler, counted
    // as in flight. All of them, and only then the signal.
    let starting = format!("starting {JOB_MS} ms of work");
    web.wait_stderr_n(REQUESTS, Duration::from_secs(30), &[&starting]);
    web.sigterm();
    let signalled = Instant::now();

    // Readiness turns false at once; the server still answers during the grace.
    web.wait_stderr(SOON, &["tree `web` draining: SIGTERM"]);
    let (status, body) = get(addr, "/readyz").expect("/readyz answers during the grace");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""phase":"draining""#), "{body}");
    assert_eq!(get(addr, "/livez").map(|r| r.0), Ok(200));

    // After the grace the server is told to stop: it stops accepting while the requests still
    // run. (Probing with bare connections: they carry no request, so they are not counted.)
    web.wait_stderr(SOON, &["http draining"]);
    let until = Instant::now() + SOON;
    let refused = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            // A probe that raced with the close (it was in the backlog when the listening
            // socket closed) is reset; the next one shows the socket gone.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => break e,
            Ok(probe) => drop(probe),
        }
        if Instant::now() > until {
            web.fail("still accepting connections after the server was told to stop");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    assert!(
        !requests.done(),
        "the requests ended before the server stopped accepting: the test proves nothing"
    );

    // Every request completes with its worker's answer, round-robin over the 4 workers.
    let responses = requests.wait(Duration::from_secs(60));
    let mut per_worker = [0; 4];
    for response in &responses {
        let Ok((200, body)) = response else {
            web.fail(&format!("a request in flight failed: {response:?}"));
        };
        let worker = body
            .strip_prefix("worker ")
            .and_then(|b| b.strip_suffix(&format!(" did {JOB_MS} ms\n")))
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|&i| i < 4);
        match worker {
            Some(i) => per_worker[i] += 1,
            None => web.fail(&format!("unexpected body {body:?}")),
        }
    }
    assert_eq!(per_worker, [REQUESTS / 4; 4], "{responses:?}");

    let done = web.finish(signalled, Duration::from_secs(30));
    assert_eq!(done.code, Some(EXIT_CLEAN), "{}", done.dump());
    assert!(
        done.stderr
            .iter()
            .any(|l| l.starts_with("shutdown of `web` (SIGTERM): clean in")),
        "{}",
        done.dump()
    );
    // The server drained: 20 requests in flight when told, 20 completed after, none dropped.
    let http = done.report_row("http", "drained");
    assert_eq!(
        (http.drained, http.dropped),
        (REQUESTS as u64, 0),
        "{http:?}\n{}",
        done.dump()
    );
    assert!(
        http.line
            .ends_with(&format!(" in flight when told={REQUESTS}")),
        "{http:?}\n{}",
        done.dump()
    );
    for name in ["workers", "0", "1", "2", "3"] {
        let row = done.report_row(name, "drained");
        assert_eq!(row.dropped, 0, "{row:?}\n{}", done.dump());
    }
    // The workers were told only after the server had acknowledged: every request it served
    // could reach its worker.
    let http_acked = done.line_index(&["http acknowledged", &format!("(drained {REQUESTS})")]);
    assert!(
        http_acked < done.line_index(&["stopping workers"]),
        "{}",
        done.dump()
    );
    for i in 0..4 {
        let told = done.line_index(&[&format!("workers/{i} draining")]);
        let acked = done.line_index(&[&format!("workers/{i} acknowledged")]);
        assert!(
            http_acked < told && told < acked,
            "workers/{i}\n{}",
            done.dump()
        );
    }
}

#[test]
fn a_request_longer_than_the_servers_budget_times_it_out_and_exits_4_before_the_deadline() {
    let deadline = Duration::from_millis(5_000);
    let (mut web, addr) = Web::start(&[
        "--budget-ms",
        "1000",
        "--deadline-ms",
        &deadline.as_millis().to_string(),
    ]);
    let request = Requests::start(addr, "/work?ms=20000", 1);
    web.wait_stderr(SOON, &["starting 20000 ms of work"]);
    web.sigterm();
    let signalled = Instant::now();

    let done = web.finish(signalled, Duration::from_secs(30));
    assert_eq!(done.code, Some(EXIT_TIMED_OUT), "{}", done.dump());
    // The server had its budget, and not much more: the overall deadline did not have to cut
    // anything (the worker dropped the job whose request was gone, and drained).
    assert!(
        done.elapsed >= Duration::from_millis(900),
        "exited before the server's budget ran out\n{}",
        done.dump()
    );
    assert!(
        done.elapsed < deadline - Duration::from_secs(1),
        "exited only around the overall deadline\n{}",
        done.dump()
    );
    assert!(
        done.stderr
            .iter()
            .any(|l| l.starts_with("shutdown of `web` (SIGTERM): TIMED OUT in")),
        "{}",
        done.dump()
    );
    let http = done.report_row("http", "TIMED OUT");
    assert_eq!((http.drained, http.dropped), (0, 1), "{}", done.dump());
    assert!(
        http.line.ends_with(" in flight when told=1"),
        "{http:?}\n{}",
        done.dump()
    );
    for name in ["workers", "0", "1", "2", "3"] {
        done.report_row(name, "drained");
    }
    done.line_index(&["worker 0: dropped a 20000 ms job", "its request is gone"]);
    // The cut request got no answer, certainly not a 200.
    let response = request.wait(Duration::from_secs(60));
    assert!(!matches!(response[0], Ok((200, _))), "{response:?}");
}

#[test]
fn an_address_in_use_exits_2_naming_it() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    let addr = taken.local_addr().unwrap().to_string();
    let web = Web::spawn(&["--bind", &addr]);
    let done = web.finish(Instant::now(), Duration::from_secs(20));
    assert_eq!(done.code, Some(EXIT_BAD_ARGS), "{}", done.dump());
    assert!(
        done.stderr
            .iter()
            .any(|l| l.starts_with("error: cannot listen on") && l.contains(&addr)),
        "{}",
        done.dump()
    );
    assert!(
        !done.stdout.iter().any(|l| l.starts_with("ready:")),
        "{}",
        done.dump()
    );
}

/// Under systemd (`Type=notify`), the example says when it is ready, when it starts stopping,
/// and what holds the stop up, on the socket `NOTIFY_SOCKET` names.
#[cfg(feature = "systemd")]
#[test]
fn under_systemd_it_notifies_ready_then_stopping_then_progress() {
    use std::os::unix::net::UnixDatagram;

    struct Socket(PathBuf);
    impl Drop for Socket {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let path = std::env::temp_dir().join(format!("web-notify-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let socket = Socket(path);
    let listener = UnixDatagram::bind(&socket.0).expect("a datagram socket in the temp dir");
    listener
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();

    let (mut web, addr) = Web::start_with_env(
        &["--grace-ms", "1500"],
        &[("NOTIFY_SOCKET", socket.0.as_os_str())],
    );
    // Long enough to still run a second or two after the grace, when progress lines name it.
    let request = Requests::start(addr, "/work?ms=4000", 1);
    web.wait_stderr(SOON, &["starting 4000 ms of work"]);
    web.sigterm();
    let done = web.finish(Instant::now(), Duration::from_secs(30));
    assert_eq!(done.code, Some(0), "{}", done.dump());
    assert!(matches!(request.wait(SOON)[0], Ok((200, _))));

    // Every datagram is queued in the socket by now; read them all (bounded).
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    while messages.len() < 1000 {
        match listener.recv(&mut buf) {
            Ok(n) => messages.extend(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_owned),
            ),
            Err(_) => break,
        }
    }
    let at = |what: &dyn Fn(&String) -> bool| messages.iter().position(what);
    let ready = at(&|m| m == "READY=1");
    let stopping = at(&|m| m == "STOPPING=1");
    let progress = messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.starts_with("STATUS=waiting on") && m.contains("http"))
        .map(|(i, _)| i)
        .next();
    assert!(
        matches!((ready, stopping, progress), (Some(r), Some(s), Some(p)) if r < s && s < p),
        "READY=1, then STOPPING=1, then a STATUS= progress line naming http: {messages:#?}"
    );
}
