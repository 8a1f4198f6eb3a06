//! The example broker as a real process, for the broker tests: start it on a free loopback port
//! with its own data dir, learn its addresses from its log, signal it, restart it on the same
//! data dir, read its output and exit code.
//!
//! `BROKER_UNDER_TEST=mosquitto` runs the protocol tests against a `mosquitto` binary instead
//! (same tests, another broker): the check that a test asserts MQTT 3.1.1, not our broker's
//! quirks. Tests about our process (signals, durability, the report, flags) call
//! [`Broker::ours`] and always run against the example.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::example::example_binary;
use super::output::Lines;

/// How long a broker gets to say it is listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A data dir under the target dir, removed when dropped (unless the test failed, to look at).
pub struct DataDir(PathBuf);

impl DataDir {
    pub fn new(test: &str) -> DataDir {
        let exe = std::env::current_exe().expect("the test binary's path");
        let base = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps")
            .join("broker-test-data");
        let dir = base.join(format!("{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the test's data dir");
        DataDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A running broker process.
pub struct Broker {
    child: Child,
    /// Its MQTT address (from `listening on <addr>`).
    pub addr: SocketAddr,
    /// Its health endpoint's address, when it has one (ours; not mosquitto).
    pub health: Option<SocketAddr>,
    /// Everything it wrote to stderr and stdout, line by line (merged).
    pub lines: Arc<Lines>,
    status: Option<ExitStatus>,
}

/// Which broker the protocol tests run against.
pub fn under_test() -> &'static str {
    match std::env::var("BROKER_UNDER_TEST") {
        Ok(v) if v == "mosquitto" => "mosquitto",
        _ => "ours",
    }
}

impl Broker {
    /// The broker under test (ours, or mosquitto with `BROKER_UNDER_TEST=mosquitto`), with a
    /// fresh port and default settings. `data` is our broker's data dir.
    pub fn start(data: &DataDir) -> Broker {
        if under_test() == "mosquitto" {
            Broker::mosquitto(data)
        } else {
            Broker::ours(data, &[])
        }
    }

    /// Our example broker on `127.0.0.1:0` (and its health endpoint on another free port), with
    /// `args` added to the command line.
    pub fn ours(data: &DataDir, args: &[&str]) -> Broker {
        let mut cmd = Command::new(example_binary("broker", &["web"]));
        cmd.args(ours_args(data, args)).env_remove("RUST_LOG");
        // The broker's own default is INFO, with one `listening on` line; BROKER_LOG overrides.
        if let Ok(filter) = std::env::var("BROKER_LOG") {
            cmd.env("RUST_LOG", filter);
        }
        Broker::spawn(cmd, true)
    }

    /// [`ours`](Self::ours) with its data dir on a filesystem of its own of `size` (`4m`): a
    /// tmpfs mounted over the data dir in a mount namespace of the broker's own (`unshare -rm`:
    /// no root needed where user namespaces are allowed), gone with the process. `None` where
    /// this machine allows no such thing. The test reaches the filesystem through
    /// [`own_fs_path`](Self::own_fs_path).
    pub fn ours_on_small_fs(data: &DataDir, size: &str, args: &[&str]) -> Option<Broker> {
        let mount = format!("mount -t tmpfs -o size={size} tmpfs \"$0\" && exec \"$@\"");
        let probe = Command::new("unshare")
            .args(["-rm", "sh", "-c", &mount])
            .arg(data.path())
            .arg("true")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !probe.is_ok_and(|s| s.success()) {
            return None;
        }
        let mut cmd = Command::new("unshare");
        cmd.args(["-rm", "sh", "-c", &mount])
            .arg(data.path())
            .arg(example_binary("broker", &["web"]))
            .args(ours_args(data, args))
            .env_remove("RUST_LOG");
        if let Ok(filter) = std::env::var("BROKER_LOG") {
            cmd.env("RUST_LOG", filter);
        }
        Some(Broker::spawn(cmd, true))
    }

    /// `path` (absolute) as this broker process sees it: through `/proc/<pid>/root`, so that a
    /// filesystem mounted in its own namespace ([`ours_on_small_fs`](Self::ours_on_small_fs)) is
    /// the one reached.
    pub fn own_fs_path(&self, path: &Path) -> PathBuf {
        let relative = path.strip_prefix("/").unwrap_or(path);
        PathBuf::from(format!("/proc/{}/root", self.pid())).join(relative)
    }

    /// Like [`start`](Self::start), with `ours` added to our broker's command line, or `conf`
    /// (whole lines, e.g. `"max_packet_size 1024\n"`) added to mosquitto's configuration: the
    /// same setting said in each broker's terms.
    pub fn start_with(data: &DataDir, ours: &[&str], conf: &str) -> Broker {
        if under_test() == "mosquitto" {
            Broker::mosquitto_with(data, conf)
        } else {
            Broker::ours(data, ours)
        }
    }

    /// mosquitto on a free port, no persistence, with the settings our defaults mirror.
    pub fn mosquitto(data: &DataDir) -> Broker {
        Broker::mosquitto_with(data, "")
    }

    /// [`mosquitto`](Self::mosquitto) with `extra` appended to its configuration file.
    pub fn mosquitto_with(data: &DataDir, extra: &str) -> Broker {
        let port = free_port();
        let conf = data.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 log_dest stderr\nlog_type all\n{extra}"
            ),
        )
        .expect("write mosquitto.conf");
        let mut cmd = Command::new("mosquitto");
        cmd.arg("-c").arg(&conf);
        let mut broker = Broker::spawn(cmd, false);
        broker.addr = SocketAddr::from(([127, 0, 0, 1], port));
        // mosquitto has no "listening on" line in every version: wait until it accepts.
        let until = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect(broker.addr).is_err() {
            assert!(Instant::now() < until, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        broker
    }

    fn spawn(mut cmd: Command, ours: bool) -> Broker {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start the broker");
        let (lines, _) = Lines::collect_merged(
            child.stdout.take().expect("stdout"),
            child.stderr.take().expect("stderr"),
        );
        let mut broker = Broker {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            health: None,
            lines,
            status: None,
        };
        if ours {
            let Some(line) = broker
                .lines
                .wait_for(START_TIMEOUT, |l| l.contains("listening on "))
            else {
                panic!(
                    "the broker did not say `listening on`; its output:\n{}",
                    broker.output()
                );
            };
            broker.addr = addr_after(&line, "listening on ");
            if let Some(line) = broker
                .lines
                .wait_for(START_TIMEOUT, |l| l.contains("health on "))
            {
                broker.health = Some(addr_after(&line, "health on http://"));
            }
        }
        broker
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let until = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
                return self.status;
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then the exit status (panics, with the output, if it does not exit in `timeout`).
    pub fn stop(&mut self, timeout: Duration) -> ExitStatus {
        self.sigterm();
        match self.wait(timeout) {
            Some(status) => status,
            None => panic!(
                "the broker did not exit within {timeout:?} of SIGTERM; its output:\n{}",
                self.output()
            ),
        }
    }

    /// What it has printed so far.
    pub fn output(&self) -> String {
        self.lines.snapshot().join("\n")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs our example broker with exactly `args` (no defaults added) until it exits, for the
/// command-line tests: its exit status (`None` if it was still running after `timeout`, when it
/// is killed) and everything it printed.
pub fn run_ours(args: &[&str], timeout: Duration) -> (Option<ExitStatus>, String) {
    let mut cmd = Command::new(example_binary("broker", &["web"]));
    cmd.args(args).env_remove("RUST_LOG");
    if let Ok(filter) = std::env::var("BROKER_LOG") {
        cmd.env("RUST_LOG", filter);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start the broker");
    let (lines, _) = Lines::collect_merged(
        child.stdout.take().expect("stdout"),
        child.stderr.take().expect("stderr"),
    );
    let until = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status, lines.all(Duration::from_secs(5)))
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn addr_after(line: &str, marker: &str) -> SocketAddr {
    let at = line.find(marker).expect("marker in line") + marker.len();
    let text: String = line[at..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '/')
        .collect();
    text.parse()
        .unwrap_or_else(|e| panic!("`{text}` in `{line}` is not an address: {e}"))
}

/// Our broker's command line: a free port for MQTT and for health, `data` as its data dir, and
/// `args` (replacing ours where they name the same flag).
fn ours_args(data: &DataDir, args: &[&str]) -> Vec<String> {
    let mut full: Vec<String> = vec![
        "--bind".into(),
        "127.0.0.1:0".into(),
        "--health".into(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        data.path().display().to_string(),
    ];
    // Later flags win in clap only for options that allow it; let the caller's replace ours.
    for a in args {
        if let Some(pos) = full.iter().position(|f| f == a && a.starts_with("--")) {
            full.drain(pos..pos + 2);
        }
    }
    full.extend(args.iter().map(|s| s.to_string()));
    full
}
