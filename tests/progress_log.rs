//! While draining, the log says who holds the shutdown up. This binary installs its own logger to
//! read the lines, so it holds only this test.

mod common;

use std::time::Duration;

use actix_supervisor::*;
use common::*;
use parking_lot::Mutex;

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;
impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.target().starts_with("actix_supervisor")
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            LINES.lock().push(format!("{} {}", r.level(), r.args()));
        }
    }
    fn flush(&self) {}
}

#[actix::test]
async fn progress_lines_name_the_pending_children_with_time_and_budget() {
    log::set_logger(&Capture).unwrap();
    log::set_max_level(log::LevelFilter::Info);
    let log = Log::default();
    let slow = Behaviour {
        drained_delay: Some(Duration::from_millis(900)),
        ..Behaviour::default()
    };
    let tree = Tree::builder("progress")
        .child(
            SupervisorSpec::new("store").child(
                probe("disk", "store/disk", &log, slow)
                    .0
                    .budget(Duration::from_secs(7)),
            ),
        )
        .child(simple("quick", &log))
        .progress_interval(Duration::from_millis(200))
        .build()
        .unwrap();
    let handle = tree.start().await.unwrap();
    let report = handle.shutdown("test").await;
    assert_eq!(report.outcome, TreeOutcome::Clean, "{report}");

    let lines = LINES.lock().clone();
    let waiting: Vec<&String> = lines.iter().filter(|l| l.contains("waiting on")).collect();
    assert!(
        waiting.len() >= 2,
        "a progress line every 200 ms while the 900 ms drain runs: {lines:#?}"
    );
    // Only the child holding things up is named (not its supervisor), with time spent and budget.
    assert!(
        waiting
            .iter()
            .all(|l| l.starts_with("INFO waiting on 1: store/disk (")),
        "{waiting:#?}"
    );
    assert!(waiting.iter().all(|l| l.ends_with("/7s)")), "{waiting:#?}");
    // Lifecycle lines at INFO: start, draining, acknowledgement, report.
    for needle in [
        "started store/disk",
        "draining: test",
        "store/disk draining",
        "store/disk acknowledged",
        "shutdown of `progress` Clean",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("INFO") && l.contains(needle)),
            "no INFO line with {needle:?}: {lines:#?}"
        );
    }
}
