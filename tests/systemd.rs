//! systemd notifications (feature `systemd`): what a `Type=notify` unit hears from a tree, read
//! from a datagram socket standing in for systemd's. This binary sets `NOTIFY_SOCKET` for the
//! whole process, so it holds only this test.
#![cfg(all(unix, feature = "systemd"))]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

use actix_supervisor::*;
use common::*;

/// Removes the socket file however the test ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The assignments (`READY=1`, `STATUS=…`) of every datagram waiting on `sock`, in order. Stops
/// at the final `STATUS=stopped: …`, or when nothing arrives within the socket's read timeout.
fn read_assignments(sock: &UnixDatagram) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    // Bounded: a handful of datagrams are expected (ready, stopping, a few progress lines, stopped).
    for _ in 0..1000 {
        let Ok(n) = sock.recv(&mut buf) else { break };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        out.extend(text.lines().map(str::to_owned));
        if text.contains("STATUS=stopped: ") {
            break;
        }
    }
    out
}

#[test]
fn a_notify_unit_hears_ready_stopping_progress_and_the_end() {
    init_log();
    let path = std::env::temp_dir().join(format!(
        "actix-supervisor-systemd-test-{}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).expect("bind the stand-in notify socket");
    let _cleanup = SocketFile(path.clone());
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("set a read timeout");
    // Before the System exists: no other thread of ours reads the environment yet.
    std::env::set_var("NOTIFY_SOCKET", &path);

    let assignments = actix::System::new().block_on(async {
        let log = Log::default();
        let slow = Behaviour {
            drained_delay: Some(Duration::from_millis(500)),
            ..Behaviour::default()
        };
        let tree = Tree::builder("notified")
            .child(probe("slow", "slow", &log, slow).0)
            .child(simple("quick", &log))
            .progress_interval(Duration::from_millis(100))
            .notify_systemd(true)
            .build()
            .unwrap();
        let handle = tree.start().await.unwrap();
        // READY=1 is sent before the start resolves: it is waiting already.
        let mut buf = [0u8; 1024];
        let n = sock
            .recv(&mut buf)
            .expect("a datagram once the tree has started");
        let first = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert_eq!(first, "READY=1\nSTATUS=running\n");

        let report = handle.shutdown("test").await;
        assert_eq!(report.outcome, TreeOutcome::Clean, "{report}");
        let mut all: Vec<String> = first.lines().map(str::to_owned).collect();
        all.extend(read_assignments(&sock));
        all
    });

    let pos = |pred: &dyn Fn(&str) -> bool| assignments.iter().position(|a| pred(a));
    let ready = pos(&|a| a == "READY=1").expect("READY=1");
    let stopping = pos(&|a| a == "STOPPING=1").expect("STOPPING=1");
    let draining = pos(&|a| a == "STATUS=draining: test").expect("the reason in a STATUS");
    let progress = pos(&|a| a.starts_with("STATUS=waiting on 1: slow (") && a.ends_with("/5s)"))
        .unwrap_or_else(|| panic!("a progress line naming the slow worker: {assignments:#?}"));
    let stopped = pos(&|a| a.starts_with("STATUS=stopped: shutdown of `notified` Clean"))
        .unwrap_or_else(|| panic!("the report summary: {assignments:#?}"));
    assert!(
        ready < stopping && stopping < draining && draining < progress && progress < stopped,
        "out of order: {assignments:#?}"
    );
    assert_eq!(stopped, assignments.len() - 1, "the summary comes last");
    assert_eq!(
        assignments.iter().filter(|a| *a == "READY=1").count(),
        1,
        "{assignments:#?}"
    );
}
