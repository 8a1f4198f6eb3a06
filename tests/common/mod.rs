//! A configurable worker that records what happens to it, shared by the integration tests.
#![allow(dead_code)]

pub mod broker;
pub mod example;
pub mod mqtt;
pub mod output;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_supervisor::{ChildSpec, HookFuture, Stopping, Worker, WorkerSpec};
use parking_lot::Mutex;

/// What a probe saw, in the order it happened across all probes of a test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ev {
    Started(String),
    Stopping(String),
    Drained(String),
}

/// The shared event log.
#[derive(Clone, Default)]
pub struct Log(pub Arc<Mutex<Vec<(Instant, Ev)>>>);

impl Log {
    pub fn push(&self, ev: Ev) {
        self.0.lock().push((Instant::now(), ev));
    }

    pub fn events(&self) -> Vec<Ev> {
        self.0.lock().iter().map(|(_, e)| e.clone()).collect()
    }

    /// Position of an event in the log.
    pub fn pos(&self, ev: &Ev) -> Option<usize> {
        self.events().iter().position(|e| e == ev)
    }

    pub fn at(&self, ev: &Ev) -> Option<Instant> {
        self.0.lock().iter().find(|(_, e)| e == ev).map(|(t, _)| *t)
    }
}

/// How a probe misbehaves.
#[derive(Clone, Default)]
pub struct Behaviour {
    pub hang_in_drained: bool,
    pub panic_in_stopping: bool,
    pub panic_in_drained: bool,
    pub panic_in_started: bool,
    /// `on_drained` finishes asynchronously after this long.
    pub drained_delay: Option<Duration>,
    /// Each message takes this long (blocking the arbiter, as a CPU-bound handler would).
    pub work: Option<Duration>,
}

impl Behaviour {
    /// Its drained hook never completes: it has to be aborted.
    pub fn hanging() -> Self {
        Behaviour {
            hang_in_drained: true,
            ..Behaviour::default()
        }
    }
}

/// A probe that hangs in its drained hook, with a shutdown budget.
pub fn stuck(name: &str, path: &str, log: &Log, budget: Duration) -> WorkerSpec<Probe> {
    probe(name, path, log, Behaviour::hanging())
        .0
        .budget(budget)
}

pub struct Probe {
    pub path: String,
    pub log: Log,
    pub handled: Arc<AtomicU64>,
    pub behaviour: Behaviour,
}

impl Actor for Probe {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Context<Self>) {
        if self.behaviour.panic_in_started {
            panic!("{} refuses to start", self.path);
        }
        self.log.push(Ev::Started(self.path.clone()));
    }
}

impl Worker for Probe {
    fn on_stopping(&mut self, _: &mut Context<Self>, _: &Stopping) {
        if self.behaviour.panic_in_stopping {
            panic!("{} panics in on_stopping", self.path);
        }
        self.log.push(Ev::Stopping(self.path.clone()));
    }

    fn on_drained(&mut self, _: &mut Context<Self>) -> Option<HookFuture<Self>> {
        if self.behaviour.panic_in_drained {
            panic!("{} panics in on_drained", self.path);
        }
        if self.behaviour.hang_in_drained {
            return Some(Box::pin(actix::fut::wrap_future(
                std::future::pending::<()>(),
            )));
        }
        let log = self.log.clone();
        let path = self.path.clone();
        match self.behaviour.drained_delay {
            Some(d) => Some(Box::pin(actix::fut::wrap_future(async move {
                actix_rt::time::sleep(d).await;
                log.push(Ev::Drained(path));
            }))),
            None => {
                log.push(Ev::Drained(path));
                None
            }
        }
    }
}

#[derive(Message)]
#[rtype(result = "u64")]
pub struct Work;

impl Handler<Work> for Probe {
    type Result = u64;
    fn handle(&mut self, _: Work, _: &mut Context<Self>) -> u64 {
        if let Some(d) = self.behaviour.work {
            std::thread::sleep(d);
        }
        self.handled.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// A probe spec named `name` whose events carry `path`.
pub fn probe(
    name: &str,
    path: &str,
    log: &Log,
    behaviour: Behaviour,
) -> (WorkerSpec<Probe>, Arc<AtomicU64>) {
    let handled = Arc::new(AtomicU64::new(0));
    let (log, path, h) = (log.clone(), path.to_owned(), handled.clone());
    let spec = ChildSpec::worker(name, move || Probe {
        path: path.clone(),
        log: log.clone(),
        handled: h.clone(),
        behaviour: behaviour.clone(),
    });
    (spec, handled)
}

/// A well-behaved probe whose path equals its name.
pub fn simple(name: &str, log: &Log) -> WorkerSpec<Probe> {
    probe(name, name, log, Behaviour::default()).0
}

pub fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// Blocks the probe's arbiter thread for a while (stands for a long CPU-bound handler), and
/// says when it has begun, so a test can act while the probe is surely busy.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Block {
    pub time: Duration,
    pub entered: std::sync::mpsc::Sender<()>,
}

/// A `Block` for `time`, and the receiver that hears when it begins.
pub fn block(time: Duration) -> (Block, std::sync::mpsc::Receiver<()>) {
    let (entered, rx) = std::sync::mpsc::channel();
    (Block { time, entered }, rx)
}

impl Handler<Block> for Probe {
    type Result = ();
    fn handle(&mut self, m: Block, _: &mut Context<Self>) {
        let _ = m.entered.send(());
        std::thread::sleep(m.time);
    }
}
