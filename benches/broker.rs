//! The example MQTT broker under load, against mosquitto in the same run (issue 5, "Benchmarks").
//!
//! `cargo bench --bench broker` builds the example (`cargo build --release --example broker`),
//! starts it (`--bind 127.0.0.1:0 --health 127.0.0.1:0 --data-dir target/bench-broker-data/..`,
//! its address from its `listening on <addr>` log line) and, when `mosquitto` is on PATH, a
//! mosquitto on a free port with `listener PORT 127.0.0.1`, `allow_anonymous true`,
//! `persistence false` and its default limits otherwise (max_queued_messages 1000,
//! max_inflight_messages 20): the comparison issue 5 asks for. If our broker does not build or
//! does not start (the placeholder printed its usage and exited 2), the run goes on with
//! mosquitto alone and says so; without mosquitto it measures ours alone.
//!
//! **Shapes.** QoS 0 and QoS 1, `1->1` (one publisher, one subscriber) and `4->4` (four
//! publishers, each on its own topic `bench/pN`, and four subscribers, each subscribed to all four
//! topics: a fan-in *and* fan-out load, every message is delivered four times, each subscriber
//! receives four publishers' worth). Payloads of 64 bytes; every client has a clean session.
//! The subscription QoS is the shape's QoS.
//!
//! **A measurement** starts a fresh broker, connects the subscribers (CONNECT, SUBSCRIBE, SUBACK)
//! and then the publishers, and lets the publishers publish as fast as the broker takes them for
//! a warm-up (`BENCH_WARMUP_MS`, default 500) and a measured window (`BENCH_SECS`, default 4).
//! Then the publishers stop, wait for their last PUBACKs (QoS 1), and the subscribers go on
//! reading until they hold every message sent to them or nothing new has arrived for
//! `BENCH_DRAIN_MS` (default 2000; at most 60 s in all): the drain. Then everyone disconnects and
//! the broker is stopped (SIGTERM).
//! - **delivered msgs/s**: PUBLISH packets received by all subscribers inside the measured
//!   window, divided by its length (so `4->4` counts each message up to four times).
//! - **p50 / p99**: end-to-end latency of those deliveries: each payload carries the time the
//!   publisher encoded it (ns since the bench started, one clock in one process), the subscriber
//!   takes the time a read returns. Publishers are unthrottled, so this is latency at
//!   saturation: it includes the time a message waits in the socket buffers and the broker's
//!   queues, which is what a broker's flow control decides.
//! - **lost**: QoS 1: for every subscriber, the messages its publishers had PUBACKed that it never
//!   received by the end of the drain (acknowledged-but-not-delivered; the generator knows each
//!   publisher's sequence numbers). QoS 0: messages sent that were not delivered (QoS 0 may be
//!   dropped; shown as delivered/sent). Duplicates are counted apart.
//!
//! **Rounds.** `BENCH_RUNS` (default 3) rounds of every shape, the two brokers alternating
//! (ours, mosquitto; mosquitto, ours; ...) so that machine noise hits both alike; a figure is the
//! median of its rounds, the ratio is ours/mosquitto of those medians, losses are summed.
//! `cargo bench --bench broker -- NAME` runs the shapes whose name contains NAME (`qos0`,
//! `4->4`, `qos1 1->1`); `BENCH_BROKERS=ours` or `=mosquitto` runs one broker only.
//!
//! **Output.** A line per round (rate, p50/p99, sent, acked, delivered/owed, duplicates, lost,
//! drain time, CPU), then the table `shape | ours msgs/s | mosquitto msgs/s | ratio | ours p50/p99
//! | mosquitto p50/p99 | lost (ours / mosquitto)`, the machine, `RESULT` lines in the format of
//! the other benches, and whether issue 5's target (ratio >= 1.0 and p99 no worse for every
//! shape, no acknowledged message lost) is met; a miss is printed, never a failure.
//!
//! **The load generator** is this process: raw TCP on tokio, packets encoded and decoded with
//! rumqttc's `mqttbytes::v4` (`Packet::write` / `Packet::read` on `BytesMut`). Every connection is
//! one task driving its socket through `ready()` + `try_read` / `try_write`, so it never stops
//! reading while it waits to write (no deadlock against a broker that stops reading us). A
//! publisher encodes up to `BENCH_BATCH` (default 100) PUBLISH packets into one buffer and writes
//! it with as few writes as the socket takes; it encodes the next batch when the last one is
//! written, so it publishes exactly as fast as the broker takes bytes (TCP back-pressure). At QoS 1
//! at most `BENCH_WINDOW` (default 500) messages per publisher are unacknowledged: a full window
//! waits for PUBACKs until a whole batch fits again. Subscribers read in 256 KiB chunks and answer a whole chunk's PUBACKs with
//! one write.
//!
//! **Threads on a 2-core machine.** The generator runs on one current-thread tokio runtime on the
//! bench's main thread: at most one core, so the broker always has the other one (or more, when
//! the generator is idle); mosquitto is single-threaded, ours is an actix System thread plus the
//! store's thread and the health server's. Generator and broker share the machine's cores: each
//! round's line prints the CPU each used during the window (`/proc`, in % of one core) so that
//! one can see which is the bottleneck; a generator near 100% would mean the figure is the
//! generator's, not the broker's. `other` is what the rest of the machine took meanwhile
//! (another build, say): noise, when it is more than a few %. A multi-thread runtime would only
//! let the generator take the broker's core.

mod common;
use common::median;

use std::io::{BufRead, BufReader, ErrorKind};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, Subscribe, SubscribeFilter,
    SubscribeReasonCode,
};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

const PAYLOAD: usize = 64;
const MAX_PACKET: usize = 1 << 20;
const READ_CHUNK: usize = 256 * 1024;
/// Connecting, subscribing, and a broker's start must each take less than this.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// The drain never lasts longer than this, however slowly messages still trickle in.
const DRAIN_MAX: Duration = Duration::from_secs(60);
/// Below the 16-bit packet identifier space, so a free one is always found quickly.
const MAX_WINDOW: usize = 30_000;

// ----- settings ---------------------------------------------------------------------------------

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a whole number")),
        Err(_) => default,
    }
}

#[derive(Clone, Debug)]
struct Settings {
    warmup: Duration,
    window: Duration,
    drain_quiet: Duration,
    runs: usize,
    batch: usize,
    qos1_window: usize,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            warmup: Duration::from_millis(env_u64("BENCH_WARMUP_MS", 500)),
            window: Duration::from_secs_f64(
                std::env::var("BENCH_SECS")
                    .ok()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(4.0)
                    .max(0.1),
            ),
            drain_quiet: Duration::from_millis(env_u64("BENCH_DRAIN_MS", 2000)),
            runs: env_u64("BENCH_RUNS", 3).max(1) as usize,
            batch: env_u64("BENCH_BATCH", 100).max(1) as usize,
            qos1_window: (env_u64("BENCH_WINDOW", 500) as usize).clamp(1, MAX_WINDOW),
        }
    }
}

// ----- shapes -----------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct Shape {
    qos: QoS,
    publishers: usize,
    subscribers: usize,
}

impl Shape {
    fn name(&self) -> String {
        format!(
            "qos{} {}->{}",
            self.qos as u8, self.publishers, self.subscribers
        )
    }
}

const SHAPES: [Shape; 4] = [
    Shape {
        qos: QoS::AtMostOnce,
        publishers: 1,
        subscribers: 1,
    },
    Shape {
        qos: QoS::AtMostOnce,
        publishers: 4,
        subscribers: 4,
    },
    Shape {
        qos: QoS::AtLeastOnce,
        publishers: 1,
        subscribers: 1,
    },
    Shape {
        qos: QoS::AtLeastOnce,
        publishers: 4,
        subscribers: 4,
    },
];

fn topic(publisher: usize) -> String {
    format!("bench/p{publisher}")
}

// ----- the brokers ------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ours,
    Mosquitto,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Ours => "ours",
            Kind::Mosquitto => "mosquitto",
        }
    }
}

/// A broker process, killed if still running when dropped.
struct BrokerProcess {
    child: Child,
    addr: SocketAddr,
    /// Every line it printed (stderr and stdout), collected by a thread.
    lines: Arc<Mutex<Vec<String>>>,
    dir: Option<PathBuf>,
}

impl BrokerProcess {
    fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// SIGTERM, then up to 15 s for it to exit (killed after that); its exit code, if any.
    fn stop(mut self) -> (Option<i32>, Vec<String>) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let until = Instant::now() + Duration::from_secs(15);
        let mut code = None;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                code = status.code();
                break;
            }
            if Instant::now() >= until {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Let the reader threads take the last lines.
        std::thread::sleep(Duration::from_millis(50));
        (code, self.output())
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Collects the lines of `from` into `lines`, and sends each on `tx` (if anyone listens).
fn collect<R: std::io::Read + Send + 'static>(
    from: R,
    lines: Arc<Mutex<Vec<String>>>,
    tx: mpsc::Sender<String>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            lines.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });
}

/// Lines a process printed, shared with the threads that read them.
type Lines = Arc<Mutex<Vec<String>>>;

fn spawn_collected(mut cmd: Command) -> std::io::Result<(Child, Lines, mpsc::Receiver<String>)> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    collect(child.stdout.take().unwrap(), lines.clone(), tx.clone());
    collect(child.stderr.take().unwrap(), lines.clone(), tx);
    Ok((child, lines, rx))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// `cargo build --release --example broker`; the binary's path, or why there is none.
fn build_ours() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let t0 = Instant::now();
    let out = Command::new(&cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--release", "--example", "broker"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        return Err(format!(
            "cargo build --release --example broker failed:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    let binary = target_dir()
        .join("release")
        .join("examples")
        .join(format!("broker{}", std::env::consts::EXE_SUFFIX));
    if !binary.exists() {
        return Err(format!("no binary at {}", binary.display()));
    }
    println!(
        "info: built our broker ({}) in {:.1}s",
        binary.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(binary)
}

static STARTS: AtomicU64 = AtomicU64::new(0);

fn start_ours(binary: &Path) -> Result<BrokerProcess, String> {
    let n = STARTS.fetch_add(1, Ordering::Relaxed);
    let dir = target_dir()
        .join("bench-broker-data")
        .join(format!("{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let mut cmd = Command::new(binary);
    cmd.args([
        "--bind",
        "127.0.0.1:0",
        "--health",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(&dir)
    .env_remove("RUST_LOG");
    // The broker's own log filter (INFO, and only its own `listening on` line, not actix-web's);
    // BROKER_LOG overrides it.
    if let Ok(filter) = std::env::var("BROKER_LOG") {
        cmd.env("RUST_LOG", filter);
    }
    let (mut child, lines, rx) =
        spawn_collected(cmd).map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let until = Instant::now() + SETUP_TIMEOUT;
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => {
                if let Some(at) = line.find("listening on ") {
                    let text = line[at + "listening on ".len()..].trim();
                    let text = text.split_whitespace().next().unwrap_or("");
                    let addr: SocketAddr = text
                        .parse()
                        .map_err(|e| format!("`{line}`: not an address: {e}"))?;
                    return Ok(BrokerProcess {
                        child,
                        addr,
                        lines,
                        dir: Some(dir),
                    });
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if let Ok(Some(status)) = child.try_wait() {
            std::thread::sleep(Duration::from_millis(50));
            let _ = std::fs::remove_dir_all(&dir);
            let out = lines.lock().unwrap().join("\n");
            return Err(format!("it exited ({status}) without listening:\n{out}"));
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&dir);
            let out = lines.lock().unwrap().join("\n");
            return Err(format!(
                "no `listening on` within {SETUP_TIMEOUT:?}:\n{out}"
            ));
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn start_mosquitto() -> Result<BrokerProcess, String> {
    let n = STARTS.fetch_add(1, Ordering::Relaxed);
    let dir = target_dir()
        .join("bench-broker-data")
        .join(format!("{}-{n}-mosquitto", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             log_dest stderr\n"
        ),
    )
    .map_err(|e| format!("write {}: {e}", conf.display()))?;
    let mut cmd = Command::new("mosquitto");
    cmd.arg("-c").arg(&conf);
    let (mut child, lines, _rx) =
        spawn_collected(cmd).map_err(|e| format!("cannot start mosquitto: {e}"))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let until = Instant::now() + SETUP_TIMEOUT;
    while std::net::TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let out = lines.lock().unwrap().join("\n");
            return Err(format!("mosquitto exited ({status}):\n{out}"));
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            return Err("mosquitto did not accept connections".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(BrokerProcess {
        child,
        addr,
        lines,
        dir: Some(dir),
    })
}

fn mosquitto_version() -> Option<String> {
    let out = Command::new("mosquitto").arg("-h").output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find(|l| l.contains("version"))
        .map(|l| l.trim().to_owned())
}

// ----- CPU accounting ---------------------------------------------------------------------------

/// utime + stime of a `/proc/.../stat` file (zero if it cannot be read).
fn proc_cpu(path: &str) -> Duration {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return Duration::ZERO;
    };
    // The fields after the command name (which may hold spaces): state is the first.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// CPU time of this whole process (the generator, whatever runtime it runs on).
fn own_cpu() -> Duration {
    proc_cpu("/proc/self/stat")
}

/// CPU time every process on the machine has used (all cores; `/proc/stat`, not idle or
/// iowait).
fn machine_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return Duration::ZERO;
    };
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|&(i, _)| i != 3 && i != 4)
        .map(|(_, t)| t)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(busy * 1_000_000_000 / hz)
}

// ----- one measurement --------------------------------------------------------------------------

/// The clock the payload timestamps are taken on.
fn base() -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn nanos_since_base(at: Instant) -> u64 {
    at.saturating_duration_since(base()).as_nanos() as u64
}

/// What a publisher did.
#[derive(Default)]
struct PubResult {
    sent: u64,
    /// `acked[seq]`: the broker PUBACKed sequence number `seq` (QoS 1).
    acked: Vec<bool>,
    acked_count: u64,
    /// Why it stopped early, if it did.
    error: Option<String>,
}

/// What a subscriber saw.
#[derive(Default)]
struct SubResult {
    /// `received[publisher][seq]`: how many times (saturating).
    received: Vec<Vec<u8>>,
    unique: u64,
    duplicates: u64,
    /// Deliveries inside the measured window, and their latencies in ns.
    in_window: u64,
    latencies: Vec<u64>,
    malformed: u64,
    /// Deliveries by the QoS they came with (a subscription at QoS q to publications at QoS q
    /// must deliver at q).
    by_qos: [u64; 3],
    error: Option<String>,
}

/// The outcome of one broker under one shape for one round.
#[derive(Default, Clone)]
struct Sample {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    sent: u64,
    acked: u64,
    /// Messages that should have been delivered (sent × subscribers that get them).
    expected: u64,
    delivered_unique: u64,
    duplicates: u64,
    /// Acknowledged messages × the subscribers that must get each (QoS 1).
    owed: u64,
    /// QoS 1: acknowledged but not delivered; QoS 0: sent but not delivered.
    lost: u64,
    drain: Duration,
    broker_cpu: f64,
    gen_cpu: f64,
    other_cpu: f64,
    errors: Vec<String>,
    /// mosquitto's "Outgoing messages are being dropped" lines.
    drop_warnings: usize,
}

struct Clock {
    window_start: Instant,
    window_end: Instant,
}

async fn write_packet(stream: &mut TcpStream, packet: &Packet) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    packet
        .write(&mut buf, MAX_PACKET)
        .map_err(|e| std::io::Error::other(format!("encode: {e}")))?;
    stream.write_all(&buf).await
}

async fn read_packet(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<Packet> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(p) => return Ok(p),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(std::io::Error::other(format!("decode: {e}"))),
        }
        buf.reserve(4096);
        if stream.read_buf(buf).await? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
    }
}

/// TCP connect, CONNECT (clean session), CONNACK; the stream and what it read past the CONNACK.
async fn connect(addr: SocketAddr, id: &str) -> std::io::Result<(TcpStream, BytesMut)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut connect = Connect::new(id);
    connect.keep_alive = 600;
    connect.clean_session = true;
    write_packet(&mut stream, &Packet::Connect(connect)).await?;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    match read_packet(&mut stream, &mut buf).await? {
        Packet::ConnAck(ConnAck {
            code: ConnectReturnCode::Success,
            ..
        }) => Ok((stream, buf)),
        other => Err(std::io::Error::other(format!(
            "{id}: expected a successful CONNACK, got {other:?}"
        ))),
    }
}

async fn subscribe(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    topics: &[String],
    qos: QoS,
) -> std::io::Result<()> {
    let filters = topics.iter().map(|t| SubscribeFilter::new(t.clone(), qos));
    let mut sub = Subscribe::new_many(filters);
    sub.pkid = 1;
    write_packet(stream, &Packet::Subscribe(sub)).await?;
    match read_packet(stream, buf).await? {
        Packet::SubAck(ack)
            if ack.pkid == 1
                && ack.return_codes.len() == topics.len()
                && ack
                    .return_codes
                    .iter()
                    .all(|c| !matches!(c, SubscribeReasonCode::Failure)) =>
        {
            Ok(())
        }
        other => Err(std::io::Error::other(format!(
            "expected a SUBACK granting {topics:?}, got {other:?}"
        ))),
    }
}

/// The payload: send time (ns since `base`), publisher, sequence number, padding to 64 bytes.
fn payload(index: usize, seq: u64) -> Bytes {
    let mut p = BytesMut::with_capacity(PAYLOAD);
    p.put_u64(nanos_since_base(Instant::now()));
    p.put_u32(index as u32);
    p.put_u64(seq);
    p.resize(PAYLOAD, 0xab);
    p.freeze()
}

/// One publisher: publishes as fast as the socket takes until the window ends, then (QoS 1)
/// waits for its last PUBACKs until `give_up`.
async fn publisher(
    mut stream: TcpStream,
    mut inbuf: BytesMut,
    index: usize,
    qos: QoS,
    settings: Settings,
    stop_at: Instant,
    give_up: Instant,
) -> PubResult {
    let mut r = PubResult::default();
    let topic = topic(index);
    let qos1 = qos == QoS::AtLeastOnce;
    // pkid -> seq + 1 (0: free).
    let mut pkids: Vec<u64> = vec![0; 65_536];
    let mut next_pkid: u16 = 1;
    let mut inflight = 0usize;
    let mut out = BytesMut::with_capacity(settings.batch * 128);
    let mut loading = true;
    let stop_at_tokio = tokio::time::Instant::from_std(stop_at);
    let give_up_tokio = tokio::time::Instant::from_std(give_up);
    loop {
        if loading && Instant::now() >= stop_at {
            loading = false;
        }
        // At QoS 1 a batch waits until a whole batch fits in the window (or nothing is in
        // flight), so that acknowledgements trickling in one by one do not turn into one small
        // write each.
        let room = if qos1 {
            settings.qos1_window - inflight
        } else {
            settings.batch
        };
        if loading
            && out.is_empty()
            && (room >= settings.batch.min(settings.qos1_window) || inflight == 0)
        {
            for _ in 0..room.min(settings.batch) {
                let seq = r.sent;
                let mut publish = Publish::from_bytes(topic.as_str(), qos, payload(index, seq));
                if qos1 {
                    while pkids[next_pkid as usize] != 0 {
                        next_pkid = next_pkid.wrapping_add(1).max(1);
                    }
                    publish.pkid = next_pkid;
                    pkids[next_pkid as usize] = seq + 1;
                    next_pkid = next_pkid.wrapping_add(1).max(1);
                    inflight += 1;
                    r.acked.push(false);
                }
                publish.write(&mut out).expect("encode PUBLISH");
                r.sent += 1;
            }
        }
        if !loading && out.is_empty() && inflight == 0 {
            break;
        }
        let interest = if out.is_empty() {
            Interest::READABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        };
        let deadline = if loading {
            stop_at_tokio
        } else {
            give_up_tokio
        };
        let ready = tokio::select! {
            ready = stream.ready(interest) => match ready {
                Ok(ready) => ready,
                Err(e) => { r.error = Some(format!("publisher {index}: {e}")); break; }
            },
            _ = tokio::time::sleep_until(deadline) => {
                if Instant::now() >= give_up {
                    r.error = Some(format!(
                        "publisher {index}: gave up with {inflight} unacknowledged, {} bytes unwritten",
                        out.len()
                    ));
                    break;
                }
                continue;
            }
        };
        if ready.is_readable() {
            inbuf.reserve(READ_CHUNK);
            match stream.try_read_buf(&mut inbuf) {
                Ok(0) => {
                    r.error = Some(format!(
                        "publisher {index}: the broker closed the connection"
                    ));
                    break;
                }
                Ok(_) => loop {
                    match Packet::read(&mut inbuf, MAX_PACKET) {
                        Ok(Packet::PubAck(PubAck { pkid })) => {
                            let slot = &mut pkids[pkid as usize];
                            if *slot != 0 {
                                let seq = (*slot - 1) as usize;
                                *slot = 0;
                                inflight -= 1;
                                r.acked[seq] = true;
                                r.acked_count += 1;
                            }
                        }
                        Ok(_) => {}
                        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                        Err(e) => {
                            r.error = Some(format!("publisher {index}: decode: {e}"));
                            return r;
                        }
                    }
                },
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => {
                    r.error = Some(format!("publisher {index}: read: {e}"));
                    break;
                }
            }
        }
        if ready.is_writable() && !out.is_empty() {
            match stream.try_write(&out) {
                Ok(n) => out.advance(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => {
                    r.error = Some(format!("publisher {index}: write: {e}"));
                    break;
                }
            }
        }
    }
    if r.error.is_none() {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            write_packet(&mut stream, &Packet::Disconnect),
        )
        .await;
    }
    r
}

/// One subscriber: reads until told to stop, PUBACKing (QoS 1) each chunk's messages in one write.
async fn subscriber(
    mut stream: TcpStream,
    mut inbuf: BytesMut,
    index: usize,
    publishers: usize,
    clock: Arc<Clock>,
    progress: Arc<AtomicU64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> SubResult {
    let mut r = SubResult {
        received: vec![Vec::new(); publishers],
        ..SubResult::default()
    };
    let topics: Vec<String> = (0..publishers).map(topic).collect();
    let window_start = nanos_since_base(clock.window_start);
    let window_end = nanos_since_base(clock.window_end);
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut pending_read = !inbuf.is_empty();
    loop {
        let interest = if out.is_empty() {
            Interest::READABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        };
        let (readable, writable) = if pending_read {
            pending_read = false;
            (true, false)
        } else {
            tokio::select! {
                ready = stream.ready(interest) => match ready {
                    Ok(ready) => (ready.is_readable(), ready.is_writable()),
                    Err(e) => { r.error = Some(format!("subscriber {index}: {e}")); break; }
                },
                _ = stop.changed() => break,
            }
        };
        if readable {
            inbuf.reserve(READ_CHUNK);
            match stream.try_read_buf(&mut inbuf) {
                Ok(0) => {
                    r.error = Some(format!(
                        "subscriber {index}: the broker closed the connection"
                    ));
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => {
                    r.error = Some(format!("subscriber {index}: read: {e}"));
                    break;
                }
            }
            let now = nanos_since_base(Instant::now());
            let mut fresh = 0;
            loop {
                match Packet::read(&mut inbuf, MAX_PACKET) {
                    Ok(Packet::Publish(p)) => {
                        r.by_qos[p.qos as usize] += 1;
                        if p.qos == QoS::AtLeastOnce {
                            PubAck::new(p.pkid).write(&mut out).expect("encode PUBACK");
                        }
                        let mut body = &p.payload[..];
                        if body.len() != PAYLOAD {
                            r.malformed += 1;
                            continue;
                        }
                        let sent = body.get_u64();
                        let from = body.get_u32() as usize;
                        let seq = body.get_u64() as usize;
                        if from >= publishers || p.topic != topics[from] {
                            r.malformed += 1;
                            continue;
                        }
                        let seen = &mut r.received[from];
                        if seen.len() <= seq {
                            seen.resize((seq + 1).max(seen.len() * 2), 0);
                        }
                        if seen[seq] == 0 {
                            r.unique += 1;
                            fresh += 1;
                        } else {
                            r.duplicates += 1;
                        }
                        seen[seq] = seen[seq].saturating_add(1);
                        if now >= window_start && now < window_end {
                            r.in_window += 1;
                            r.latencies.push(now.saturating_sub(sent));
                        }
                    }
                    Ok(_) => {}
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                    Err(e) => {
                        r.error = Some(format!("subscriber {index}: decode: {e}"));
                        return r;
                    }
                }
            }
            if fresh > 0 {
                progress.fetch_add(fresh, Ordering::Relaxed);
            }
        }
        // Acknowledgements are tried at once (the socket is almost always writable); if it is
        // full they wait for `writable`.
        let _ = writable;
        if !out.is_empty() {
            match stream.try_write(&out) {
                Ok(n) => out.advance(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => {
                    r.error = Some(format!("subscriber {index}: write: {e}"));
                    break;
                }
            }
        }
    }
    // The last acknowledgements, then DISCONNECT.
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&out).await?;
        write_packet(&mut stream, &Packet::Disconnect).await
    })
    .await;
    r
}

/// Runs one client's set-up (connect, subscribe) within [`SETUP_TIMEOUT`]; the error names the
/// client and what it was waiting for.
async fn set_up<T>(
    id: &str,
    waiting_for: &str,
    setup: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(format!("{id}: {e}")),
        Err(_) => Err(format!("{id}: no {waiting_for} in {SETUP_TIMEOUT:?}")),
    }
}

/// The load of `shape` against the broker at `addr`; `cpu` reads the broker's CPU time.
async fn load(
    shape: Shape,
    addr: SocketAddr,
    settings: Settings,
    cpu: impl Fn() -> Duration,
) -> Sample {
    let mut sample = Sample::default();
    let run = STARTS.load(Ordering::Relaxed);
    let topics: Vec<String> = (0..shape.publishers).map(topic).collect();

    // Subscribers first, then publishers, all before the clock starts.
    let mut subs = Vec::new();
    for i in 0..shape.subscribers {
        let id = format!("bench-{run}-sub-{i}");
        let setup = async {
            let (mut stream, mut buf) = connect(addr, &id).await?;
            subscribe(&mut stream, &mut buf, &topics, shape.qos).await?;
            Ok::<_, std::io::Error>((stream, buf))
        };
        match set_up(&id, "CONNACK/SUBACK", setup).await {
            Ok(s) => subs.push(s),
            Err(e) => {
                sample.errors.push(e);
                return sample;
            }
        }
    }
    let mut pubs = Vec::new();
    for i in 0..shape.publishers {
        let id = format!("bench-{run}-pub-{i}");
        match set_up(&id, "CONNACK", connect(addr, &id)).await {
            Ok(s) => pubs.push(s),
            Err(e) => {
                sample.errors.push(e);
                return sample;
            }
        }
    }

    let start = Instant::now();
    let clock = Arc::new(Clock {
        window_start: start + settings.warmup,
        window_end: start + settings.warmup + settings.window,
    });
    let stop_at = clock.window_end;
    let give_up = stop_at + DRAIN_MAX;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let progress = Arc::new(AtomicU64::new(0));
    let sub_tasks: Vec<_> = subs
        .into_iter()
        .enumerate()
        .map(|(i, (stream, buf))| {
            tokio::spawn(subscriber(
                stream,
                buf,
                i,
                shape.publishers,
                clock.clone(),
                progress.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();
    let pub_tasks: Vec<_> = pubs
        .into_iter()
        .enumerate()
        .map(|(i, (stream, buf))| {
            tokio::spawn(publisher(
                stream,
                buf,
                i,
                shape.qos,
                settings.clone(),
                stop_at,
                give_up,
            ))
        })
        .collect();

    // CPU over the measured window.
    tokio::time::sleep_until(tokio::time::Instant::from_std(clock.window_start)).await;
    let (b0, g0, m0, t0) = (cpu(), own_cpu(), machine_cpu(), Instant::now());
    tokio::time::sleep_until(tokio::time::Instant::from_std(clock.window_end)).await;
    let (b1, g1, m1, t1) = (cpu(), own_cpu(), machine_cpu(), Instant::now());
    let secs = (t1 - t0).as_secs_f64();
    sample.broker_cpu = (b1 - b0).as_secs_f64() / secs * 100.0;
    sample.gen_cpu = g1.saturating_sub(g0).as_secs_f64() / secs * 100.0;
    // What the rest of the machine took meanwhile (other processes; the kernel's interrupt
    // work): noise, when it is more than a few %.
    sample.other_cpu =
        (m1.saturating_sub(m0).as_secs_f64() / secs * 100.0 - sample.broker_cpu - sample.gen_cpu)
            .max(0.0);

    let mut pub_results = Vec::new();
    for t in pub_tasks {
        pub_results.push(t.await.expect("publisher task"));
    }
    let drain_start = Instant::now();
    let expected_per_sub: u64 = pub_results.iter().map(|p| p.sent).sum();
    let expected = expected_per_sub * shape.subscribers as u64;
    // Drain: until every subscriber has everything sent, or nothing new for `drain_quiet`.
    let mut last = progress.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    loop {
        let now_count = progress.load(Ordering::Relaxed);
        if now_count >= expected {
            break;
        }
        if now_count != last {
            last = now_count;
            last_change = Instant::now();
        } else if last_change.elapsed() >= settings.drain_quiet {
            break;
        }
        if drain_start.elapsed() >= DRAIN_MAX {
            break;
        }
        if sub_tasks.iter().all(|t| t.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sample.drain = drain_start.elapsed();
    let _ = stop_tx.send(true);
    let mut sub_results = Vec::new();
    for t in sub_tasks {
        sub_results.push(t.await.expect("subscriber task"));
    }

    // Figures.
    let qos1 = shape.qos == QoS::AtLeastOnce;
    sample.sent = pub_results.iter().map(|p| p.sent).sum();
    sample.acked = pub_results.iter().map(|p| p.acked_count).sum();
    sample.expected = expected;
    // Every subscriber is subscribed to every publisher's topic, in both shapes.
    sample.owed = sample.acked * shape.subscribers as u64;
    let mut latencies = Vec::new();
    let mut in_window = 0;
    for s in &sub_results {
        sample.delivered_unique += s.unique;
        sample.duplicates += s.duplicates;
        in_window += s.in_window;
        latencies.extend_from_slice(&s.latencies);
        let wrong_qos: u64 = (0..3)
            .filter(|&q| q != shape.qos as usize)
            .map(|q| s.by_qos[q])
            .sum();
        if wrong_qos > 0 {
            sample.errors.push(format!(
                "{wrong_qos} deliveries at another QoS than {} (by QoS 0/1/2: {:?})",
                shape.qos as u8, s.by_qos
            ));
        }
        if s.malformed > 0 {
            sample
                .errors
                .push(format!("{} malformed deliveries", s.malformed));
        }
        if qos1 {
            for (p, pr) in pub_results.iter().enumerate() {
                let got = &s.received[p];
                sample.lost += pr
                    .acked
                    .iter()
                    .enumerate()
                    .filter(|&(seq, &acked)| acked && got.get(seq).copied().unwrap_or(0) == 0)
                    .count() as u64;
            }
        }
    }
    if !qos1 {
        sample.lost = expected.saturating_sub(sample.delivered_unique);
    }
    latencies.sort_unstable();
    sample.rate = in_window as f64 / settings.window.as_secs_f64();
    let micros = |q| common::percentile(&latencies, q).map_or(f64::NAN, |ns| ns as f64 / 1e3);
    sample.p50_us = micros(0.50);
    sample.p99_us = micros(0.99);
    for e in pub_results
        .iter()
        .filter_map(|p| p.error.clone())
        .chain(sub_results.iter().filter_map(|s| s.error.clone()))
    {
        sample.errors.push(e);
    }
    sample
}

/// One round of `shape` against a fresh broker of `kind`.
fn measure(
    rt: &tokio::runtime::Runtime,
    kind: Kind,
    ours: &Option<PathBuf>,
    shape: Shape,
    settings: &Settings,
) -> Sample {
    let broker = match kind {
        Kind::Ours => start_ours(ours.as_ref().expect("ours is available")),
        Kind::Mosquitto => start_mosquitto(),
    };
    let broker = match broker {
        Ok(b) => b,
        Err(e) => {
            return Sample {
                errors: vec![format!("{} did not start: {e}", kind.label())],
                ..Sample::default()
            }
        }
    };
    let pid_stat = format!("/proc/{}/stat", broker.child.id());
    let mut sample = rt.block_on(load(shape, broker.addr, settings.clone(), move || {
        proc_cpu(&pid_stat)
    }));
    let (code, lines) = broker.stop();
    sample.drop_warnings = lines
        .iter()
        .filter(|l| l.contains("Outgoing messages are being dropped"))
        .count();
    if kind == Kind::Ours && code != Some(0) {
        let tail: Vec<&String> = lines.iter().rev().take(10).collect();
        sample.errors.push(format!(
            "ours exited with {code:?} after SIGTERM; its last lines:\n{}",
            tail.into_iter()
                .rev()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    sample
}

// ----- output -----------------------------------------------------------------------------------

/// The medians of a broker's rounds, and its totals.
struct Summary {
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    sent: u64,
    acked: u64,
    owed: u64,
    expected: u64,
    delivered: u64,
    duplicates: u64,
    lost: u64,
    broker_cpu: f64,
    gen_cpu: f64,
    other_cpu: f64,
    drain_max: Duration,
    drop_warnings: usize,
}

fn summarise(samples: &[Sample]) -> Summary {
    let m = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    Summary {
        rate: m(|s| s.rate),
        p50_us: m(|s| s.p50_us),
        p99_us: m(|s| s.p99_us),
        sent: samples.iter().map(|s| s.sent).sum(),
        acked: samples.iter().map(|s| s.acked).sum(),
        owed: samples.iter().map(|s| s.owed).sum(),
        expected: samples.iter().map(|s| s.expected).sum(),
        delivered: samples.iter().map(|s| s.delivered_unique).sum(),
        duplicates: samples.iter().map(|s| s.duplicates).sum(),
        lost: samples.iter().map(|s| s.lost).sum(),
        broker_cpu: m(|s| s.broker_cpu),
        gen_cpu: m(|s| s.gen_cpu),
        other_cpu: m(|s| s.other_cpu),
        drain_max: samples.iter().map(|s| s.drain).max().unwrap_or_default(),
        drop_warnings: samples.iter().map(|s| s.drop_warnings).sum(),
    }
}

fn fmt_rate(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        let v = v.round() as u64;
        let s = v.to_string();
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    }
}

fn fmt_us(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v >= 10_000.0 {
        format!("{:.0}ms", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.1}ms", v / 1000.0)
    } else {
        format!("{v:.0}us")
    }
}

fn fmt_lost(qos: QoS, s: &Summary) -> String {
    if qos == QoS::AtLeastOnce {
        let pct = 100.0 * s.lost as f64 / s.owed.max(1) as f64;
        format!("{} ({pct:.1}%)", s.lost)
    } else {
        let pct = 100.0 * s.delivered as f64 / s.expected.max(1) as f64;
        format!("dlv {pct:.1}%")
    }
}

fn machine() -> String {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default();
    format!("{nproc} CPUs (nproc), {model}; load average before the run {load}")
}

fn main() {
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .unwrap_or_default();
    let settings = Settings::from_env();
    let wanted = std::env::var("BENCH_BROKERS").unwrap_or_default();
    let t0 = Instant::now();
    base();

    println!("machine: {}", machine());
    println!(
        "generator: this process, one current-thread tokio runtime on the main thread (at most \
         one core); generator and broker share the machine's cores"
    );
    println!(
        "load: 64-byte payloads, clean sessions, warm-up {} ms, window {:.1} s, {} round(s) per \
         broker, drain ends {} ms after the last new delivery (at most {} s); publishers batch {} \
         PUBLISH per write, QoS 1 window {} unacknowledged per publisher; 4->4 = four publishers \
         on their own topics, four subscribers each subscribed to all four topics (fan-in and \
         fan-out: each message delivered 4 times)",
        settings.warmup.as_millis(),
        settings.window.as_secs_f64(),
        settings.runs,
        settings.drain_quiet.as_millis(),
        DRAIN_MAX.as_secs(),
        settings.batch,
        settings.qos1_window,
    );

    let mut kinds = Vec::new();
    let ours = if wanted.is_empty() || wanted == "ours" {
        match build_ours().and_then(|b| {
            // One start to see that it runs at all (the placeholder exits 2).
            start_ours(&b).map(|p| {
                let _ = p.stop();
                b
            })
        }) {
            Ok(b) => {
                kinds.push(Kind::Ours);
                Some(b)
            }
            Err(e) => {
                println!("ours: UNAVAILABLE ({})", e.lines().next().unwrap_or(""));
                for l in e.lines().skip(1).take(12) {
                    println!("  | {l}");
                }
                None
            }
        }
    } else {
        None
    };
    if wanted.is_empty() || wanted == "mosquitto" {
        match mosquitto_version() {
            Some(v) if which("mosquitto") => {
                println!("mosquitto: {v}, default limits (max_queued_messages 1000, max_inflight_messages 20)");
                kinds.push(Kind::Mosquitto);
            }
            _ => println!("mosquitto: not on PATH (apt-get install mosquitto); ours alone"),
        }
    }
    if kinds.is_empty() {
        println!("no broker to measure");
        return;
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");

    let shapes: Vec<Shape> = SHAPES
        .iter()
        .copied()
        .filter(|s| filter.is_empty() || s.name().contains(&filter))
        .collect();
    let mut rows = Vec::new();
    for shape in shapes {
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); kinds.len()];
        for round in 0..settings.runs {
            let mut order: Vec<usize> = (0..kinds.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for k in order {
                let s = measure(&rt, kinds[k], &ours, shape, &settings);
                println!(
                    "  {:<10} {:<9} round {}: {:>9} msgs/s  p50 {:>7}  p99 {:>7}  sent {} acked {} \
                     delivered {}/{} dup {} lost {}  drain {:.1}s  cpu broker {:.0}% generator {:.0}% other {:.0}%{}",
                    shape.name(),
                    kinds[k].label(),
                    round + 1,
                    fmt_rate(s.rate),
                    fmt_us(s.p50_us),
                    fmt_us(s.p99_us),
                    s.sent,
                    s.acked,
                    s.delivered_unique,
                    s.expected,
                    s.duplicates,
                    s.lost,
                    s.drain.as_secs_f64(),
                    s.broker_cpu,
                    s.gen_cpu,
                    s.other_cpu,
                    if s.drop_warnings > 0 {
                        format!("  ({} 'Outgoing messages are being dropped' lines)", s.drop_warnings)
                    } else {
                        String::new()
                    }
                );
                for e in &s.errors {
                    println!("    error: {e}");
                }
                samples[k].push(s);
            }
        }
        rows.push((
            shape,
            samples.iter().map(|s| summarise(s)).collect::<Vec<_>>(),
        ));
    }

    let col = |k: Kind| kinds.iter().position(|&x| x == k);
    let (io, im) = (col(Kind::Ours), col(Kind::Mosquitto));
    println!();
    println!(
        "| shape | ours msgs/s | mosquitto msgs/s | ratio | ours p50/p99 | mosquitto p50/p99 | lost (ours / mosquitto) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (shape, sums) in &rows {
        let get = |i: Option<usize>| i.map(|i| &sums[i]);
        let (o, m) = (get(io), get(im));
        let rate = |s: Option<&Summary>| s.map_or("unavailable".into(), |s| fmt_rate(s.rate));
        let lat = |s: Option<&Summary>| {
            s.map_or("-".into(), |s| {
                format!("{} / {}", fmt_us(s.p50_us), fmt_us(s.p99_us))
            })
        };
        let lost = |s: Option<&Summary>| s.map_or("-".into(), |s| fmt_lost(shape.qos, s));
        let ratio = match (o, m) {
            (Some(o), Some(m)) => format!("{:.2}", o.rate / m.rate),
            _ => "-".into(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} / {} |",
            shape.name(),
            rate(o),
            rate(m),
            ratio,
            lat(o),
            lat(m),
            lost(o),
            lost(m)
        );
    }
    println!();
    println!(
        "machine: {}; generator and broker share its cores (the generator: one current-thread \
         runtime, at most one core); ours built from {}",
        machine(),
        git_head()
    );
    println!(
        "cpu: in % of one core over the measured window (the machine has {} in all): the broker \
         process, this process (the generator), and everything else on the machine (noise)",
        std::thread::available_parallelism().map_or(0, |n| n.get()) * 100
    );
    println!(
        "lost: QoS 1 = PUBACKed but never delivered to a subscriber that should get it, summed over \
         the rounds (in % of the deliveries owed); QoS 0 = dlv: delivered / (sent x subscribers)."
    );
    for (shape, sums) in &rows {
        for (k, s) in kinds.iter().zip(sums) {
            println!(
                "info: {} {}: sent {} acked {} delivered {}/{} duplicates {} lost {}  cpu broker {:.0}% generator {:.0}% other {:.0}% (of one core, medians)  longest drain {:.1}s{}",
                shape.name(),
                k.label(),
                s.sent,
                s.acked,
                s.delivered,
                s.expected,
                s.duplicates,
                s.lost,
                s.broker_cpu,
                s.gen_cpu,
                s.other_cpu,
                s.drain_max.as_secs_f64(),
                if s.drop_warnings > 0 {
                    format!("  mosquitto logged 'Outgoing messages are being dropped' {} times", s.drop_warnings)
                } else {
                    String::new()
                }
            );
        }
    }
    // Lines in the format of the other benches, and issue 5's targets: ratio >= 1.0 for every
    // shape, p99 no worse, no acknowledged message lost.
    if let (Some(io), Some(im)) = (io, im) {
        let mut met = true;
        for (shape, sums) in &rows {
            let (o, m) = (&sums[io], &sums[im]);
            let name = format!(
                "broker_qos{}_{}to{}",
                shape.qos as u8, shape.publishers, shape.subscribers
            );
            let ratio = o.rate / m.rate;
            let p99 = o.p99_us / m.p99_us;
            let qos1 = shape.qos == QoS::AtLeastOnce;
            let pass = ratio >= 1.0 && p99 <= 1.0 && (!qos1 || o.lost == 0);
            met &= pass;
            println!(
                "RESULT name={name}_rate ours={:.0}msgs/s mosquitto={:.0}msgs/s ratio={ratio:.3} \
                 target=>=1.0 ratio_is=ours/mosquitto better=higher pass={}",
                o.rate,
                m.rate,
                if ratio >= 1.0 { "yes" } else { "no" }
            );
            for (q, a, b) in [("p50", o.p50_us, m.p50_us), ("p99", o.p99_us, m.p99_us)] {
                println!(
                    "RESULT name={name}_{q} ours={a:.0}us mosquitto={b:.0}us ratio={:.3} \
                     ratio_is=ours/mosquitto better=lower",
                    a / b
                );
            }
            if qos1 {
                println!(
                    "RESULT name={name}_lost ours={} mosquitto={} target=0 pass={}",
                    o.lost,
                    m.lost,
                    if o.lost == 0 { "yes" } else { "no" }
                );
            }
        }
        println!(
            "target (ratio >= 1.0, p99 no worse, no acknowledged message lost, every shape): {}",
            if met { "met" } else { "NOT met" }
        );
    }
    if io.is_none() {
        println!("note: our broker was unavailable: mosquitto alone was measured");
    }
    println!("info: bench wall time {:.1}s", t0.elapsed().as_secs_f64());
}

/// The commit the bench (and our broker) was built from, `+dirty` with local changes.
fn git_head() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--", "examples/broker", "src"])
        .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head}+dirty")
    } else {
        head
    }
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
