//! What a supervisor does when a child ends: the restart policy of each child, the strategy,
//! intensity and backoff of each supervisor, and the arithmetic behind them.
//!
//! The semantics are OTP's. When a child ends while the tree runs, its **policy** says whether it
//! is restarted; if it is, its supervisor's **strategy** says which siblings go with it
//! (one-for-one: none; one-for-all: all; rest-for-one: those started after it). The affected
//! siblings are stopped by the shutdown rules — told `Stopping`, drained, dependents first — and
//! then started again in start order. Each restart decision counts against the supervisor's
//! **intensity**: more than `max_restarts` within `window` and the supervisor gives up, drains its
//! remaining children and ends as failed, which its own parent handles by its own policy (at the
//! root: the tree shuts down). An optional **backoff** waits, between stopping and starting again,
//! a delay that doubles with every restart still inside the window.
//!
//! This module holds the vocabulary and the pure decisions; `runtime.rs` carries them out.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// When a child that ended is started again. The default is [`Restart::Permanent`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum Restart {
    /// Always restarted, whether it panicked, failed or stopped itself.
    #[default]
    Permanent,
    /// Restarted only after an abnormal end (a panic or an error); a child that stops itself
    /// normally (`ctx.stop()`) stays stopped.
    Transient,
    /// Never restarted; once it ends, its address refuses messages.
    Temporary,
}

impl Restart {
    /// Whether a child with this policy is restarted after ending; `abnormal` when it panicked
    /// or failed rather than stopping itself.
    pub fn restarts_after(self, abnormal: bool) -> bool {
        match self {
            Restart::Permanent => true,
            Restart::Transient => abnormal,
            Restart::Temporary => false,
        }
    }
}

/// Which siblings are restarted with a child that ended. The default is
/// [`Strategy::OneForOne`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Only the child that ended.
    #[default]
    OneForOne,
    /// Every child of the supervisor: all are stopped (dependents first), then all started
    /// again in start order. For children that cannot work without each other.
    OneForAll,
    /// The child that ended and every sibling started after it. For a chain where later children
    /// depend on earlier ones.
    RestForOne,
}

/// The most restarts a supervisor makes within a time window before giving up.
/// The default is 3 in 5 seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Intensity {
    /// Restarts allowed within `window`; one more and the supervisor gives up. Zero: the first
    /// failure gives up.
    pub max_restarts: u32,
    /// The sliding window the restarts are counted in.
    pub window: Duration,
}

impl Default for Intensity {
    fn default() -> Self {
        Intensity {
            max_restarts: 3,
            window: Duration::from_secs(5),
        }
    }
}

/// A delay between stopping a child and starting it again: exponential with jitter.
///
/// The `k`-th restart still inside the supervisor's intensity window (counting from 0) waits a
/// random time in `[max(min, d/2), d]` where `d = min(max, min × 2^k)`, so every delay lies within
/// `[min, max]`, restarts in a burst back off, and children restarted together do not all come
/// back in the same instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay, and the least any delay is.
    pub min: Duration,
    /// The most any delay is.
    pub max: Duration,
}

impl Backoff {
    /// The delay before the restart that is the `k`-th inside the window (from 0), with `unit`
    /// a uniform random number in `[0, 1)`.
    pub(crate) fn delay(&self, k: u32, unit: f64) -> Duration {
        let ceiling = self
            .min
            .checked_mul(1u32.checked_shl(k.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.max)
            .min(self.max);
        let floor = (ceiling / 2).max(self.min).min(ceiling);
        floor + (ceiling - floor).mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// A supervisor's settings, as declared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Supervision {
    pub(crate) strategy: Strategy,
    pub(crate) intensity: Intensity,
    pub(crate) backoff: Option<Backoff>,
}

/// The restarts a supervisor made recently, to enforce its intensity.
#[derive(Debug, Default)]
pub(crate) struct RestartHistory {
    times: VecDeque<Instant>,
}

impl RestartHistory {
    /// Records a restart at `now`. Returns how many restarts lie inside the window before this
    /// one, or `Err(count)` with the count including this one when it exceeds the intensity.
    pub(crate) fn record(&mut self, now: Instant, intensity: Intensity) -> Result<u32, u32> {
        while self
            .times
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= intensity.window)
        {
            self.times.pop_front();
        }
        let before = self.times.len() as u32;
        self.times.push_back(now);
        if before + 1 > intensity.max_restarts {
            Err(before + 1)
        } else {
            Ok(before)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_restart_as_in_otp() {
        assert!(Restart::Permanent.restarts_after(false));
        assert!(Restart::Permanent.restarts_after(true));
        assert!(!Restart::Transient.restarts_after(false));
        assert!(Restart::Transient.restarts_after(true));
        assert!(!Restart::Temporary.restarts_after(true));
    }

    #[test]
    fn intensity_allows_n_restarts_in_the_window_and_refuses_the_next() {
        let i = Intensity {
            max_restarts: 3,
            window: Duration::from_secs(5),
        };
        let t0 = Instant::now();
        let mut h = RestartHistory::default();
        assert_eq!(h.record(t0, i), Ok(0));
        assert_eq!(h.record(t0 + Duration::from_secs(1), i), Ok(1));
        assert_eq!(h.record(t0 + Duration::from_secs(2), i), Ok(2));
        assert_eq!(h.record(t0 + Duration::from_secs(3), i), Err(4));
        // Spread out, the same number never exceeds it.
        let mut h = RestartHistory::default();
        for k in 0..10 {
            assert!(h.record(t0 + Duration::from_secs(2 * k), i).is_ok());
        }
        // Zero allowed: the first one gives up.
        let zero = Intensity {
            max_restarts: 0,
            ..i
        };
        assert_eq!(RestartHistory::default().record(t0, zero), Err(1));
    }

    #[test]
    fn backoff_doubles_within_its_bounds() {
        let b = Backoff {
            min: Duration::from_millis(10),
            max: Duration::from_millis(100),
        };
        for k in 0..40 {
            for _ in 0..50 {
                let d = b.delay(k, fastrand::f64());
                assert!(d >= b.min && d <= b.max, "k={k}: {d:?}");
            }
        }
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(10));
        assert_eq!(b.delay(2, 1.0), Duration::from_millis(40));
        assert_eq!(b.delay(2, 0.0), Duration::from_millis(20));
        assert_eq!(b.delay(10, 1.0), Duration::from_millis(100));
        assert_eq!(b.delay(10, 0.0), Duration::from_millis(50));
    }
}
