//! Staged signal handling, for a tree that owns its process's signals.
//!
//! First SIGTERM or SIGINT: graceful shutdown. Second: skip the remaining budgets (abort what is
//! pending, print the report, exit). Third: exit at once. Installing a tokio listener removes the
//! default action (terminate), which is why the third stage exists.
//!
//! The listener runs on an arbiter of its own, so that the third signal still exits the process
//! when the tree's own thread is stuck in a handler that never returns.

use crate::report::EXIT_FORCED;
use crate::tree::TreeHandle;

const LOG: &str = "actix_supervisor::signals";

/// Listens, on a dedicated arbiter, until the process ends. The receiver resolves once the
/// handlers are installed (or installing them failed), so that the start can wait for it: until
/// then a SIGTERM still has its default action.
#[cfg(unix)]
pub(crate) fn listen(handle: TreeHandle) -> tokio::sync::oneshot::Receiver<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let (installed, rx) = tokio::sync::oneshot::channel();
    let arbiter = actix_rt::Arbiter::new();
    arbiter.spawn(async move {
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            (Err(e), _) | (_, Err(e)) => {
                log::error!(target: LOG, "cannot listen for signals: {e}");
                return;
            }
        };
        let _ = installed.send(());
        let mut count = 0u32;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            count += 1;
            match count {
                1 => {
                    log::info!(target: LOG, "{name}: shutting down gracefully (again to force, a third time to exit at once)");
                    drop(handle.shutdown(name));
                }
                2 => {
                    log::warn!(target: LOG, "second signal ({name}): aborting what is still pending");
                    drop(handle.force_shutdown(format!("second signal ({name})")));
                }
                _ => {
                    log::error!(target: LOG, "third signal ({name}): exiting now");
                    std::process::exit(EXIT_FORCED);
                }
            }
        }
    });
    rx
}

#[cfg(not(unix))]
pub(crate) fn listen(_handle: TreeHandle) -> tokio::sync::oneshot::Receiver<()> {
    log::warn!(target: LOG, "signal handling is only implemented on unix");
    tokio::sync::oneshot::channel().1
}
