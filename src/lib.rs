//! Supervision trees for [actix](https://docs.rs/actix) actors: start in order, restart what
//! fails, shut down gracefully, report what happened.
//!
//! A [`Tree`] holds supervisors and workers. Workers are plain actix actors (`Context<Self>`)
//! that implement [`Worker`], whose two hooks are optional. On shutdown — a signal, or
//! [`TreeHandle::shutdown`] from anywhere — every worker is sent [`Stopping`] through its mailbox,
//! after everything queued before it; it stops intake, handles every message it accepted, flushes,
//! and acknowledges. Dependents stop before their dependencies, supervisors after their
//! children, each within its budget — and a [`ShutdownReport`] says who drained, who timed out,
//! who panicked, and what was dropped.
//!
//! While the tree runs, a child that panics (in a handler, a hook or `started`) or stops is
//! handled by its [`Restart`] policy and its supervisor's [`Strategy`], within an intensity
//! (more than N restarts in T and the supervisor gives up, for its parent to decide) and an
//! optional backoff. A restarted worker keeps its address and its mailbox. Work that blocks runs
//! in a [`BlockingWorker`], on a thread of its own, under the same rules.
//!
//! ```no_run
//! use actix::prelude::*;
//! use actix_supervisor::{ChildSpec, Worker, Tree};
//!
//! struct Counter(u64);
//! impl Actor for Counter { type Context = Context<Self>; }
//! impl Worker for Counter {}
//!
//! #[derive(Message)]
//! #[rtype(result = "()")]
//! struct Add(u64);
//! impl Handler<Add> for Counter {
//!     type Result = ();
//!     fn handle(&mut self, m: Add, _: &mut Context<Self>) { self.0 += m.0; }
//! }
//!
//! #[actix::main]
//! async fn main() {
//!     let counter = ChildSpec::worker("counter", || Counter(0));
//!     let addr = counter.addr();
//!     let tree = Tree::builder("demo").child(counter).handle_signals(true).build().unwrap();
//!     let handle = tree.start().await.unwrap();
//!     addr.do_send(Add(1)).unwrap();
//!     let report = handle.shutdown("done").await; // or wait for SIGTERM: handle.wait().await
//!     eprintln!("{report}");
//!     std::process::exit(report.exit_code());
//! }
//! ```
//!
//! # Features
//!
//! - `serde` (default): the report serialises to JSON ([`ShutdownReport::to_json`]).
//! - `web`: an actix-web `HttpServer` as a child of the tree, and `/readyz` + `/livez` for any
//!   actix-web app (the `web` module).
//! - `systemd`: `READY=1`, `STOPPING=1` and `STATUS=` progress lines to systemd
//!   (`TreeBuilder::notify_systemd`); a no-op outside systemd.
//!
//! See `ARCHITECTURE.md` for how it works, `examples/pipeline.rs` for a whole service and
//! `examples/web.rs` for an actix-web app built on a tree.

#![warn(missing_docs)]

#[cfg_attr(not(feature = "web"), allow(dead_code))]
mod adapter;
mod addr;
mod blocking;
mod error;
mod graph;
mod instance;
mod mailbox;
mod protocol;
mod report;
mod runtime;
mod signals;
mod spec;
mod supervision;
#[cfg(feature = "systemd")]
mod systemd;
mod tree;
#[cfg(feature = "web")]
pub mod web;
mod worker;

pub use addr::ChildAddr;
pub use blocking::{BlockingAddr, BlockingSpec, BlockingWorker};
pub use error::{BoxError, BuildError, StartError};
pub use protocol::{DrainStats, Outcome, Stopping};
pub use report::{
    ChildKind, ChildReport, ShutdownReport, TreeOutcome, EXIT_CLEAN, EXIT_FAILED, EXIT_FORCED,
    EXIT_TIMED_OUT,
};
pub use spec::{ChildSpec, Placement, SupervisorSpec, WorkerSpec};
pub use supervision::{Backoff, Intensity, Restart, Strategy};
pub use tree::{Phase, PhaseWatch, Tree, TreeBuilder, TreeHandle};
pub use worker::{HookFuture, InFlight, InFlightGuard, Worker};

/// Compiles the README's quickstart as a doctest, so it cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
