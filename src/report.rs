//! The shutdown report: what happened to every child, how long it took, what was lost.
//!
//! Built by the runtime when the root has acknowledged; read by people (its `Display` is an
//! indented tree with a timeline bar per child) and by programs (`serde` feature: JSON), and it
//! decides the process exit code ([`ShutdownReport::exit_code`]).

use std::fmt;
use std::time::{Duration, SystemTime};

use crate::protocol::Outcome;

/// Exit code when every child drained cleanly.
pub const EXIT_CLEAN: i32 = 0;
/// Exit code when a child failed or panicked (and nothing was aborted).
pub const EXIT_FAILED: i32 = 3;
/// Exit code when a child was aborted at its deadline.
pub const EXIT_TIMED_OUT: i32 = 4;
/// Exit code when a second signal forced the shutdown (or a third one exited at once).
pub const EXIT_FORCED: i32 = 5;

/// How the shutdown went as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum TreeOutcome {
    /// Every child drained (or was not running).
    Clean,
    /// A child failed or panicked; nothing was aborted.
    Failed,
    /// A child was aborted at its deadline.
    TimedOut,
    /// A second signal cut the budgets short.
    Forced,
}

impl TreeOutcome {
    /// The process exit code for this outcome:
    ///
    /// | outcome    | code | constant           |
    /// |------------|------|--------------------|
    /// | `Clean`    | 0    | [`EXIT_CLEAN`]     |
    /// | `Failed`   | 3    | [`EXIT_FAILED`]    |
    /// | `TimedOut` | 4    | [`EXIT_TIMED_OUT`] |
    /// | `Forced`   | 5    | [`EXIT_FORCED`]    |
    ///
    /// (1 and 2 are left to panics and command-line errors.)
    pub fn exit_code(self) -> i32 {
        match self {
            TreeOutcome::Clean => EXIT_CLEAN,
            TreeOutcome::Failed => EXIT_FAILED,
            TreeOutcome::TimedOut => EXIT_TIMED_OUT,
            TreeOutcome::Forced => EXIT_FORCED,
        }
    }
}

/// What a child is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum ChildKind {
    /// An actor driven by its own mailbox.
    Worker,
    /// A supervisor of other children.
    Supervisor,
    /// A blocking worker, on an OS thread of its own.
    Blocking,
    /// An actix-web HTTP server (feature `web`); its drained and dropped counts are requests.
    Server,
}

/// One child's entry in the report.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ChildReport {
    /// Its path from the root, like `workers/3`; the last segment is its name
    /// ([`ChildReport::name`]).
    pub path: String,
    /// Worker or supervisor.
    pub kind: ChildKind,
    /// How it ended.
    pub outcome: Outcome,
    /// When it was told `Stopping`, counted from the start of the shutdown.
    #[cfg_attr(feature = "serde", serde(serialize_with = "ser::opt_millis"))]
    pub told: Option<Duration>,
    /// When it acknowledged (or was recorded as ended), counted from the start of the shutdown.
    #[cfg_attr(feature = "serde", serde(serialize_with = "ser::opt_millis"))]
    pub acknowledged: Option<Duration>,
    /// Messages it handled between being told and acknowledging (for a supervisor: the sum over
    /// its subtree).
    pub drained: u64,
    /// Messages it had accepted and never handled (aborted or panicked; subtree sum for a
    /// supervisor).
    pub dropped: u64,
    /// For a server: the requests in progress when it was told `Stopping` (those, and any
    /// still arriving on open connections, are what it then drained).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub in_flight: Option<u64>,
    /// Times it was restarted during the tree's life.
    pub restarts: u32,
    /// How its last abnormal end before the shutdown went (`panicked: …`, `failed: …`), if it
    /// had one: the reason for its latest restart, or for it not running.
    pub last_failure: Option<String>,
    /// Its children, in declared order (empty for a worker).
    pub children: Vec<ChildReport>,
}

impl ChildReport {
    /// The child's name among its siblings: the last segment of its path.
    pub fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }

    /// Time from being told to acknowledging, when both happened.
    pub fn drain_time(&self) -> Option<Duration> {
        Some(self.acknowledged?.saturating_sub(self.told?))
    }

    /// This entry and all below it, depth first, parents before children.
    pub fn iter(&self) -> impl Iterator<Item = &ChildReport> {
        let mut stack = vec![self];
        std::iter::from_fn(move || {
            let next = stack.pop()?;
            stack.extend(next.children.iter().rev());
            Some(next)
        })
    }
}

/// What a shutdown did, child by child. See the module docs.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ShutdownReport {
    /// The tree's name.
    pub tree: String,
    /// Why it shut down.
    pub reason: String,
    /// Wall-clock time the shutdown started.
    #[cfg_attr(feature = "serde", serde(serialize_with = "ser::unix_millis"))]
    pub started_at: SystemTime,
    /// From the trigger to the end.
    #[cfg_attr(feature = "serde", serde(serialize_with = "ser::millis"))]
    pub total: Duration,
    /// The verdict.
    pub outcome: TreeOutcome,
    /// The top-level children, in declared order.
    pub children: Vec<ChildReport>,
}

impl ShutdownReport {
    /// The process exit code; see [`TreeOutcome::exit_code`].
    pub fn exit_code(&self) -> i32 {
        self.outcome.exit_code()
    }

    /// Every child entry, depth first.
    pub fn iter(&self) -> impl Iterator<Item = &ChildReport> {
        self.children.iter().flat_map(|c| c.iter())
    }

    /// The entry for a path like `workers/3`.
    pub fn find(&self, path: &str) -> Option<&ChildReport> {
        self.iter().find(|c| c.path == path)
    }

    /// Messages dropped across the whole tree.
    pub fn dropped(&self) -> u64 {
        self.children.iter().map(|c| c.dropped).sum()
    }

    /// One line: the verdict and how many children ended which way.
    pub fn summary(&self) -> String {
        let mut counts = [0usize; 5];
        for c in self.iter() {
            counts[match c.outcome {
                Outcome::Drained => 0,
                Outcome::TimedOut => 1,
                Outcome::Panicked(_) => 2,
                Outcome::Failed(_) => 3,
                Outcome::NotRunning => 4,
            }] += 1;
        }
        let restarts: u64 = self
            .iter()
            .filter(|c| c.kind != ChildKind::Supervisor)
            .map(|c| u64::from(c.restarts))
            .sum();
        format!(
            "shutdown of `{}` {:?} in {}: {} drained, {} timed out, {} panicked, {} failed, {} not running; {} messages dropped; {restarts} worker restarts",
            self.tree,
            self.outcome,
            fmt_duration(self.total),
            counts[0],
            counts[1],
            counts[2],
            counts[3],
            counts[4],
            self.dropped()
        )
    }

    /// The report as pretty-printed JSON.
    #[cfg(feature = "serde")]
    pub fn to_json(&self) -> String {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// Children listed one by one under a supervisor before the rest are summarised.
const LISTED_CHILDREN: usize = 12;
const BAR_WIDTH: usize = 24;

impl fmt::Display for ShutdownReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "shutdown of `{}` ({}): {} in {}",
            self.tree,
            self.reason,
            match self.outcome {
                TreeOutcome::Clean => "clean",
                TreeOutcome::Failed => "FAILED",
                TreeOutcome::TimedOut => "TIMED OUT",
                TreeOutcome::Forced => "FORCED",
            },
            fmt_duration(self.total)
        )?;
        let name_width = self
            .iter()
            .take(10_000)
            .map(|c| depth(&c.path) * 2 + c.name().len())
            .max()
            .unwrap_or(4)
            .max(4);
        writeln!(
            f,
            "  {:name_width$}  {:11}  {:>8}  {:>8}  {:>7}  timeline 0…{}",
            "child",
            "outcome",
            "drain",
            "drained",
            "dropped",
            fmt_duration(self.total)
        )?;
        for child in &self.children {
            write_child(f, child, self.total, name_width)?;
        }
        Ok(())
    }
}

fn depth(path: &str) -> usize {
    path.matches('/').count()
}

fn write_child(
    f: &mut fmt::Formatter<'_>,
    c: &ChildReport,
    total: Duration,
    name_width: usize,
) -> fmt::Result {
    let indent = depth(&c.path) * 2;
    let label = format!("{:indent$}{}", "", c.name());
    let drain = c
        .drain_time()
        .map(fmt_duration)
        .unwrap_or_else(|| "-".into());
    write!(
        f,
        "  {label:name_width$}  {:11}  {drain:>8}  {:>8}  {:>7}  |{}|",
        c.outcome.label(),
        c.drained,
        c.dropped,
        bar(c.told, c.acknowledged, total)
    )?;
    if let Some(n) = c.in_flight {
        write!(f, " in flight when told={n}")?;
    }
    if c.restarts > 0 {
        write!(f, " restarts={}", c.restarts)?;
    }
    match (&c.outcome, &c.last_failure) {
        (Outcome::Panicked(m) | Outcome::Failed(m), _) => writeln!(f, "  {m}")?,
        (_, Some(last)) => writeln!(f, "  (last failure: {last})")?,
        _ => writeln!(f)?,
    }
    // Big supervisors: list the first few and every unclean child; summarise the rest.
    let mut hidden = 0usize;
    let mut slowest = Duration::ZERO;
    for (i, child) in c.children.iter().enumerate() {
        if i < LISTED_CHILDREN || child.outcome.is_failure() || !child.children.is_empty() {
            write_child(f, child, total, name_width)?;
        } else {
            hidden += 1;
            slowest = slowest.max(child.drain_time().unwrap_or_default());
        }
    }
    if hidden > 0 {
        writeln!(
            f,
            "  {:indent$}  … {hidden} more, all clean (slowest drain {})",
            "",
            fmt_duration(slowest),
            indent = indent + 2
        )?;
    }
    Ok(())
}

/// The span from told to acknowledged, drawn on a line standing for the whole shutdown.
fn bar(from: Option<Duration>, to: Option<Duration>, total: Duration) -> String {
    let (Some(from), Some(to)) = (from, to) else {
        return " ".repeat(BAR_WIDTH);
    };
    let total = total.as_secs_f64().max(1e-9);
    let pos = |d: Duration| ((d.as_secs_f64() / total) * BAR_WIDTH as f64).round() as usize;
    let start = pos(from).min(BAR_WIDTH - 1);
    let end = pos(to).clamp(start + 1, BAR_WIDTH);
    (0..BAR_WIDTH)
        .map(|i| if i >= start && i < end { '█' } else { '·' })
        .collect()
}

/// `850µs`, `12.3ms`, `2.10s`.
pub(crate) fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.2}s")
    } else if s >= 0.001 {
        format!("{:.1}ms", s * 1e3)
    } else {
        format!("{}µs", d.as_micros())
    }
}

#[cfg(feature = "serde")]
mod ser {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::Serializer;

    pub fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1e3)
    }

    pub fn opt_millis<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => millis(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn unix_millis<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
        s.serialize_u64(ms as u64)
    }
}

impl ShutdownReport {
    /// A report for a tree that had nothing to shut down.
    pub(crate) fn empty(tree: &str, reason: &str) -> Self {
        ShutdownReport {
            tree: tree.to_owned(),
            reason: reason.to_owned(),
            started_at: SystemTime::now(),
            total: Duration::ZERO,
            outcome: TreeOutcome::Clean,
            children: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn child(path: &str, outcome: Outcome, told_ms: u64, ack_ms: u64) -> ChildReport {
        ChildReport {
            path: path.to_owned(),
            kind: ChildKind::Worker,
            outcome,
            told: Some(Duration::from_millis(told_ms)),
            acknowledged: Some(Duration::from_millis(ack_ms)),
            drained: 7,
            dropped: 0,
            in_flight: None,
            restarts: 0,
            last_failure: None,
            children: Vec::new(),
        }
    }

    #[test]
    fn the_bar_spans_told_to_acknowledged_on_the_shutdown_timeline() {
        let total = Duration::from_millis(240);
        let b = bar(
            Some(Duration::from_millis(60)),
            Some(Duration::from_millis(120)),
            total,
        );
        assert_eq!(b.chars().count(), BAR_WIDTH);
        assert_eq!(
            b,
            format!("{}{}{}", "·".repeat(6), "█".repeat(6), "·".repeat(12))
        );
        // Instantaneous drains still show one cell; never-told children show none.
        let z = bar(Some(Duration::ZERO), Some(Duration::ZERO), total);
        assert_eq!(z.chars().filter(|c| *c == '█').count(), 1);
        assert_eq!(bar(None, None, total).trim(), "");
    }

    #[test]
    fn display_indents_children_and_summarises_big_supervisors() {
        let mut sup = child("pool", Outcome::Drained, 0, 200);
        sup.kind = ChildKind::Supervisor;
        sup.children = (0..100)
            .map(|i| child(&format!("pool/{i}"), Outcome::Drained, 10, 20 + i))
            .collect();
        sup.children[50].outcome = Outcome::Panicked("boom".into());
        let report = ShutdownReport {
            tree: "t".into(),
            reason: "SIGTERM".into(),
            started_at: SystemTime::now(),
            total: Duration::from_millis(200),
            outcome: TreeOutcome::Failed,
            children: vec![sup],
        };
        let text = report.to_string();
        assert!(
            text.starts_with("shutdown of `t` (SIGTERM): FAILED in 200.0ms"),
            "{text}"
        );
        assert!(text.contains("\n  pool "), "{text}");
        assert!(
            text.contains("\n    0 "),
            "children are indented under their parent: {text}"
        );
        assert!(
            text.contains("PANICKED") && text.contains("boom"),
            "failures are always listed: {text}"
        );
        // 12 listed + the panicked one; the other 87 summarised with the slowest drain.
        assert!(
            text.contains("… 87 more, all clean (slowest drain 109.0ms)"),
            "{text}"
        );
        assert!(text.lines().count() < 20, "{text}");
        assert_eq!(report.exit_code(), EXIT_FAILED);
        assert_eq!(
            report.find("pool/50").unwrap().outcome,
            Outcome::Panicked("boom".into())
        );
    }

    #[cfg(feature = "serde")]
    #[test]
    fn json_carries_outcomes_and_times_in_milliseconds() {
        let report = ShutdownReport {
            tree: "t".into(),
            reason: "test".into(),
            started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
            total: Duration::from_millis(30),
            outcome: TreeOutcome::TimedOut,
            children: vec![child("a", Outcome::TimedOut, 5, 25)],
        };
        let v: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(v["outcome"], "TimedOut");
        assert_eq!(v["started_at"], 1000);
        assert_eq!(v["children"][0]["outcome"]["kind"], "TimedOut");
        assert_eq!(v["children"][0]["told"], 5.0);
        assert_eq!(v["children"][0]["acknowledged"], 25.0);
        assert_eq!(v["children"][0]["path"], "a");
    }
}
