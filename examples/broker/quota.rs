//! Per-session quotas: how much may wait for one session, what happens past it, and the count of
//! what that cost.
//!
//! A session's *backlog* is what waits to be sent to its client: for a connected client, the
//! deliveries its connection has not written yet (see [`crate::outbox::Backlog`]); for an offline
//! persistent session, its queue in the store. One [`Quota`] bounds both, in messages and in
//! bytes — for a connected client once it does not keep up: until then its publishers are paced,
//! which bounds its backlog without losing anything. Past it, the session loses messages — never
//! anyone else: a session over its quota does not refuse, hold or slow other clients' traffic. Which messages it loses is the operator's
//! choice ([`Overflow`]) — for an offline session a QoS 0 message waiting goes before any QoS 1/2
//! one; a connected session loses the new message or its oldest unsent ones as they are — and
//! every loss is counted ([`Drops`]) and logged once per *episode* (from the first loss until the
//! session is within its quota again, or connects), naming the session. "No acknowledged message
//! is lost" holds for every session within its quota.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

const LOG: &str = "broker::quota";

/// What a session over its quota loses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Overflow {
    /// The new message is not queued for it (mosquitto's behaviour): what it has stays.
    DropNew,
    /// Its oldest waiting messages go to make room: it gets the latest.
    DropOldest,
}

impl Overflow {
    fn describe(self) -> &'static str {
        match self {
            Overflow::DropNew => "new messages for it are dropped",
            Overflow::DropOldest => "its oldest messages are dropped to make room",
        }
    }
}

/// How much may wait for one session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub messages: usize,
    /// Topic and payload bytes of the messages waiting.
    pub bytes: u64,
    pub overflow: Overflow,
}

impl Quota {
    /// No bound: what a connected session has in the store (its connection bounds it).
    pub const UNLIMITED: Quota = Quota {
        messages: usize::MAX,
        bytes: u64::MAX,
        overflow: Overflow::DropNew,
    };

    /// Whether a backlog of `messages` and `bytes` has room for one more message of `size`.
    pub fn admits(&self, messages: usize, bytes: u64, size: u64) -> bool {
        messages < self.messages && bytes.saturating_add(size) <= self.bytes
    }

    /// Whether a backlog of `messages` and `bytes` is over the quota.
    pub fn exceeded_by(&self, messages: usize, bytes: u64) -> bool {
        messages > self.messages || bytes > self.bytes
    }

    /// Whether a backlog is back well within the quota (half of it), which ends an episode: a
    /// session hovering at its quota is one episode, not one per message.
    pub fn recovered(&self, messages: usize, bytes: u64) -> bool {
        messages <= self.messages / 2 && bytes <= self.bytes / 2
    }
}

/// The losses of sessions over their quota: a total, and per session its total and its current
/// episode. Shared by the store (offline sessions), the router and the connections (connected
/// ones), and read for the summary when the broker stops.
///
/// A session is kept here while it exists; one that ends (a clean session's connection closes, a
/// persistent session expires) leaves only its count behind, so the table is bounded by the
/// sessions alive.
#[derive(Default, Debug)]
pub struct Drops {
    total: AtomicU64,
    sessions: Mutex<HashMap<String, SessionDrops>>,
    /// Sessions that lost messages and have ended since.
    ended: AtomicU64,
}

#[derive(Default, Debug)]
struct SessionDrops {
    total: u64,
    /// Lost in the episode under way; `None` when the session is within its quota.
    episode: Option<u64>,
}

impl Drops {
    /// `n` messages for `client` were dropped (`offline`: from its queue in the store). The
    /// first loss of an episode is a WARN naming the session; the rest are DEBUG.
    pub fn dropped(&self, client: &str, n: u64, quota: &Quota, offline: bool) {
        if n == 0 {
            return;
        }
        self.total.fetch_add(n, Ordering::Relaxed);
        let mut sessions = self.sessions.lock();
        let session = sessions.entry(client.to_owned()).or_default();
        session.total += n;
        match &mut session.episode {
            Some(episode) => {
                *episode += n;
                log::debug!(
                    target: LOG,
                    "session `{client}`: {n} more dropped ({episode} in this episode)"
                );
            }
            None => {
                session.episode = Some(n);
                log::warn!(
                    target: LOG,
                    "session `{client}` is over its quota ({} messages or {} bytes waiting for \
                     it{}): {}; counted, and logged again when it is within its quota",
                    quota.messages,
                    quota.bytes,
                    if offline { " while it is offline" } else { "" },
                    quota.overflow.describe()
                );
            }
        }
    }

    /// `client` is within its quota again (it caught up, or connected): the episode, if one was
    /// under way, ends with an INFO line giving what it cost.
    pub fn recovered(&self, client: &str) {
        let mut sessions = self.sessions.lock();
        let Some(episode) = sessions.get_mut(client).and_then(|s| s.episode.take()) else {
            return;
        };
        log::info!(
            target: LOG,
            "session `{client}` is within its quota again; {episode} messages were dropped for it \
             while it was over"
        );
    }

    /// `client`'s session ended (a clean session's connection closed): an episode under way ends
    /// with it, with an INFO line giving what it cost, so that the next session of that id
    /// starts afresh.
    pub fn ended(&self, client: &str) {
        let Some(session) = self.sessions.lock().remove(client) else {
            return;
        };
        self.ended.fetch_add(1, Ordering::Relaxed);
        let Some(episode) = session.episode else {
            return;
        };
        log::info!(
            target: LOG,
            "session `{client}` ended; {episode} messages were dropped for it while it was over \
             its quota"
        );
    }

    /// Messages dropped for sessions over their quota since the broker started.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// How many sessions lost messages since the broker started (those that ended included).
    pub fn sessions(&self) -> usize {
        self.sessions.lock().len() + self.ended.load(Ordering::Relaxed) as usize
    }

    /// How many sessions lost messages, and the `n` alive that lost the most, most first.
    pub fn worst(&self, n: usize) -> (usize, Vec<(String, u64)>) {
        let count = self.sessions();
        let sessions = self.sessions.lock();
        let mut all: Vec<(String, u64)> =
            sessions.iter().map(|(c, s)| (c.clone(), s.total)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        (count, all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota() -> Quota {
        Quota {
            messages: 4,
            bytes: 100,
            overflow: Overflow::DropNew,
        }
    }

    #[test]
    fn a_quota_bounds_messages_and_bytes() {
        let q = quota();
        assert!(q.admits(3, 90, 10));
        assert!(!q.admits(4, 0, 1), "a fifth message");
        assert!(!q.admits(0, 91, 10), "one byte too many");
        assert!(
            !q.admits(0, 0, 101),
            "a message bigger than the quota never fits"
        );
        assert!(q.exceeded_by(5, 0) && q.exceeded_by(0, 101) && !q.exceeded_by(4, 100));
        assert!(q.recovered(2, 50) && !q.recovered(3, 0) && !q.recovered(0, 51));
    }

    #[test]
    fn drops_are_counted_per_session_in_episodes() {
        let drops = Drops::default();
        drops.dropped("a", 3, &quota(), true);
        drops.dropped("a", 2, &quota(), true);
        drops.dropped("b", 1, &quota(), false);
        drops.recovered("a");
        drops.dropped("a", 1, &quota(), false);
        assert_eq!(drops.total(), 7);
        assert_eq!(
            drops.worst(1),
            (2, vec![("a".to_owned(), 6)]),
            "two sessions lost messages; a the most"
        );
        // An ended session leaves its count, not its entry.
        drops.ended("b");
        assert_eq!(drops.worst(5), (2, vec![("a".to_owned(), 6)]));
        assert_eq!(drops.total(), 7);
    }
}
