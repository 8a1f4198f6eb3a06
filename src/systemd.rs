//! systemd notifications (feature `systemd`): a lifecycle [`Observer`] that tells the service
//! manager how the tree stands, for units with `Type=notify`.
//!
//! It owns the mapping from the tree's life to the `sd_notify(3)` protocol, and nothing else:
//!
//! | when | sent |
//! |---|---|
//! | every child has started (phase `Running`) | `READY=1`, `STATUS=running` |
//! | the shutdown begins (phase `Draining`) | `STOPPING=1`, `STATUS=draining: <reason>` |
//! | each progress line while draining | `STATUS=<the line>` (`waiting on 1: store (2.1s/5s)`) |
//! | the report is out | `STATUS=stopped: <report summary>` |
//!
//! Why: with `Type=notify`, systemd holds dependent units until `READY=1` (so "started" means
//! every child started, not "the process exists"), and `systemctl status` shows the `STATUS=`
//! line — so while a shutdown drains, an operator sees what holds it up without reading logs.
//!
//! The datagrams are sent by the `sd-notify` crate to the socket named by `NOTIFY_SOCKET`, which
//! it leaves set (unsetting it would race with other threads reading the environment). Outside
//! systemd, where `NOTIFY_SOCKET` is unset, every call is a no-op. A failed send is logged (the
//! first at WARN, later ones at DEBUG, so a missing socket does not flood the log once a second
//! while draining) and never fails or delays the tree beyond the one send.
//!
//! It reads nothing of the tree but what the observer calls hand it, and never calls back into it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use sd_notify::NotifyState;

use crate::report::ShutdownReport;
use crate::runtime::Observer;

const LOG: &str = "actix_supervisor::systemd";

/// Sends the tree's lifecycle to systemd. One per process (there is one `NOTIFY_SOCKET`), shared
/// by every tree that asks for it.
#[derive(Debug, Default)]
struct Notifier {
    /// A send has failed before: later failures are logged at DEBUG only.
    warned: AtomicBool,
}

impl Notifier {
    fn send(&self, states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(states) {
            let what = states
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ");
            if self.warned.swap(true, Ordering::Relaxed) {
                log::debug!(target: LOG, "cannot notify systemd ({what}): {e}");
            } else {
                log::warn!(target: LOG, "cannot notify systemd ({what}): {e} (further failures are logged at DEBUG)");
            }
        }
    }

    fn status(&self, text: &str) {
        self.send(&[NotifyState::Status(&one_line(text))]);
    }
}

impl Observer for Notifier {
    fn running(&self) {
        self.send(&[NotifyState::Ready, NotifyState::Status("running")]);
    }

    fn draining(&self, reason: &str) {
        let status = one_line(&format!("draining: {reason}"));
        self.send(&[NotifyState::Stopping, NotifyState::Status(&status)]);
    }

    fn progress(&self, line: &str) {
        self.status(line);
    }

    fn stopped(&self, report: &ShutdownReport) {
        self.status(&format!("stopped: {}", report.summary()));
    }
}

/// `STATUS=` is one line of the datagram: a newline in a reason or a child's name would end it
/// and make the rest read as another (bogus) assignment.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// Adds the process's notifier to `observers` (`yes`) or removes it (`!yes`); at most one copy,
/// however often the builder switch is flipped.
pub(crate) fn install(observers: &mut Vec<Arc<dyn Observer>>, yes: bool) {
    static NOTIFIER: OnceLock<Arc<dyn Observer>> = OnceLock::new();
    let notifier = NOTIFIER.get_or_init(|| Arc::new(Notifier::default()));
    observers.retain(|o| !Arc::ptr_eq(o, notifier));
    if yes {
        observers.push(notifier.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_keeps_one_copy_and_removes_it() {
        let mut observers = Vec::new();
        install(&mut observers, true);
        install(&mut observers, true);
        assert_eq!(observers.len(), 1);
        install(&mut observers, false);
        assert!(observers.is_empty());
    }

    #[test]
    fn status_text_stays_on_one_line() {
        assert_eq!(one_line("a\nb\r\nc"), "a b  c");
    }
}
