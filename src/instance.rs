//! The part of a worker's slot that follows its instances: which instance is current, where it is
//! in its drain, and the counts the report is made of. Shared by both mailbox kinds (the actor
//! mailbox in `mailbox.rs`, the blocking one in `blocking.rs`).
//!
//! A slot outlives its instances: a restart makes a new **generation**, and an instance whose
//! generation is no longer current (it was aborted, or replaced) ends at its next step without
//! handling anything more. Events carry the generation, so the runtime ignores what a stale
//! instance still says.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::protocol::NodeId;

#[derive(Debug)]
pub(crate) struct InstanceState {
    /// The generation allowed to run. Bumped by every new instance and by every abort.
    gen: AtomicU32,
    /// The child's id in the runtime, for the events its instances send.
    node: AtomicU32,
    /// Messages handled over the child's life, by all its instances. One instance runs at a
    /// time, on one thread, so it has one writer.
    handled: AtomicU64,
    /// `handled` when the current instance was told `Stopping` (`u64::MAX` before).
    handled_at_told: AtomicU64,
    /// The current instance took `Stopping` and ran its stop hook.
    draining: AtomicBool,
    /// The current instance acknowledged.
    acked: AtomicBool,
    /// When the current instance's drain ends, the gate closes (a shutdown) rather than staying
    /// open for the next instance (a restart).
    close_on_drain: AtomicBool,
}

impl Default for InstanceState {
    fn default() -> Self {
        InstanceState {
            gen: AtomicU32::new(0),
            node: AtomicU32::new(0),
            handled: AtomicU64::new(0),
            handled_at_told: AtomicU64::new(u64::MAX),
            draining: AtomicBool::new(false),
            acked: AtomicBool::new(false),
            close_on_drain: AtomicBool::new(true),
        }
    }
}

impl InstanceState {
    /// Starts a new generation with a clean drain state; returns it.
    pub(crate) fn new_generation(&self) -> u32 {
        self.handled_at_told.store(u64::MAX, Ordering::Release);
        self.draining.store(false, Ordering::Release);
        self.acked.store(false, Ordering::Release);
        self.close_on_drain.store(true, Ordering::Release);
        self.gen.fetch_add(1, Ordering::AcqRel).wrapping_add(1)
    }

    /// Records the child's id (the same for every instance; set before the first start).
    pub(crate) fn set_node(&self, id: NodeId) {
        self.node.store(id.0, Ordering::Relaxed);
    }

    pub(crate) fn node(&self) -> NodeId {
        NodeId(self.node.load(Ordering::Relaxed))
    }

    /// Makes the current instance stale, so it ends at its next step.
    pub(crate) fn retire(&self) {
        self.gen.fetch_add(1, Ordering::AcqRel);
    }

    /// True while `gen` is the instance allowed to run.
    pub(crate) fn is_current(&self, gen: u32) -> bool {
        self.gen.load(Ordering::Acquire) == gen
    }

    /// The current instance is told `Stopping`: the drain counts from here.
    pub(crate) fn mark_told(&self, close_on_drain: bool) {
        self.close_on_drain.store(close_on_drain, Ordering::Release);
        self.handled_at_told
            .store(self.handled(), Ordering::Release);
    }

    pub(crate) fn set_close_on_drain(&self) {
        self.close_on_drain.store(true, Ordering::Release);
    }

    pub(crate) fn close_on_drain(&self) -> bool {
        self.close_on_drain.load(Ordering::Acquire)
    }

    pub(crate) fn add_handled(&self, n: u64) {
        // Single writer: a load and a store avoid a locked instruction per message.
        let h = self.handled.load(Ordering::Relaxed);
        self.handled.store(h + n, Ordering::Release);
    }

    pub(crate) fn handled(&self) -> u64 {
        self.handled.load(Ordering::Acquire)
    }

    /// Messages handled since `Stopping` was queued (0 if it never was).
    pub(crate) fn drained_since_told(&self) -> u64 {
        match self.handled_at_told.load(Ordering::Acquire) {
            u64::MAX => 0,
            at => self.handled().saturating_sub(at),
        }
    }

    pub(crate) fn mark_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub(crate) fn mark_acked(&self) {
        self.acked.store(true, Ordering::Release);
    }

    pub(crate) fn is_acked(&self) -> bool {
        self.acked.load(Ordering::Acquire)
    }
}
