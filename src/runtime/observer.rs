//! The lifecycle observer hook: how integrations at the edge of the crate (systemd, and whatever
//! else wants to follow a tree) hear about the tree's life without the runtime knowing them.
//!
//! The runtime calls every observer in [`Config::observers`](super::Config) at four moments, on
//! its own task and in order; the hook is crate-internal, so each edge module installs its own
//! observer through a builder switch. With no observers installed nothing is formatted and
//! nothing is called.

use std::fmt;

use crate::report::ShutdownReport;

/// Follows one tree's life. Every method has a default that does nothing, so an observer
/// implements only what it needs.
///
/// Calls come from the runtime's task, between two steps of the protocol: an observer must
/// return quickly and must not block (a datagram send is fine; a network round trip is not),
/// must not panic, and must not call back into the tree. `Debug` so that `Config` can print.
pub(crate) trait Observer: Send + Sync + fmt::Debug {
    /// The initial start is over and the phase became `Running`: every child has started.
    /// Not called when a shutdown was triggered during the start (the phase goes straight on to
    /// `Draining`).
    fn running(&self) {}

    /// The shutdown has begun (phase `Draining`), for `reason`. Called once per tree, also
    /// when the shutdown follows a failed start or the root giving up.
    fn draining(&self, reason: &str) {
        let _ = reason;
    }

    /// A progress line while draining, exactly the text the runtime logs (`waiting on 2: store
    /// (2.1s/5s), …`, or the readiness-grace line), one per progress interval.
    fn progress(&self, line: &str) {
        let _ = line;
    }

    /// The report is complete and the phase is `Stopped`. Called just before the report is
    /// published (so before anyone waiting for it can end the process), and also with the
    /// failed report made when the runtime itself panicked.
    fn stopped(&self, report: &ShutdownReport) {
        let _ = report;
    }
}
