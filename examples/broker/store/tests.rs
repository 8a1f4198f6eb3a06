//! The store's tests: the model (`State::apply`, `State::admit`), the log (round trip, torn and
//! corrupt tails, compaction and crashes during it), and the worker (group commit, the tree).

use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, Once};

use actix_supervisor::{Outcome, Tree};

use super::*;

// --- helpers ---------------------------------------------------------------------------------

/// A fresh directory under the system's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("broker-store-{}-{n}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        TempDir(path)
    }

    /// A config for this dir that never waits for the lock.
    fn config(&self) -> StoreConfig {
        StoreConfig {
            lock_wait: Duration::ZERO,
            ..StoreConfig::new(&self.0)
        }
    }

    fn log(&self) -> PathBuf {
        self.0.join(LOG_FILE)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Keeps the store's log lines (all tests share it: filter by something unique to a test).
struct Capture;

static CAPTURED: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        // The store's lines, and the quota's (which the store's drops go through).
        metadata.target().starts_with("broker::")
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let line = record.args().to_string();
            CAPTURED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((record.level(), line));
        }
    }

    fn flush(&self) {}
}

fn capture_logs() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if log::set_logger(&Capture).is_ok() {
            log::set_max_level(log::LevelFilter::Debug);
        }
    });
}

/// Captured lines at `level` that contain `needle`.
fn logged(level: log::Level, needle: &str) -> Vec<String> {
    CAPTURED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(l, line)| *l == level && line.contains(needle))
        .map(|(_, line)| line.clone())
        .collect()
}

fn open_store(dir: &TempDir) -> Store {
    Store::open(dir.config(), Arc::default()).expect("open the store")
}

fn message(id: MsgId, topic: &str, qos: Qos, retain: bool, payload: &str) -> Message {
    Message {
        id,
        topic: topic.to_owned(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        qos,
        retain,
    }
}

fn open(client: &str) -> Op {
    Op::OpenSession {
        client: client.to_owned(),
    }
}

fn drop_session(client: &str) -> Op {
    Op::DropSession {
        client: client.to_owned(),
    }
}

fn subscribe(client: &str, filter: &str, qos: Qos) -> Op {
    Op::Subscribe {
        client: client.to_owned(),
        filter: filter.to_owned(),
        qos,
    }
}

fn publish(msg: Message, to: &[(&str, Qos)]) -> Op {
    Op::Publish {
        msg,
        to: to
            .iter()
            .map(|(client, qos)| Delivery {
                client: (*client).to_owned(),
                qos: *qos,
            })
            .collect(),
    }
}

/// A plain (not retained) message published at `qos` to `to`.
fn publish_to(id: MsgId, qos: Qos, to: &[(&str, Qos)]) -> Op {
    publish(message(id, "t/x", qos, false, "payload"), to)
}

fn last_seen(client: &str, at: u64) -> Op {
    Op::LastSeen {
        client: client.to_owned(),
        at,
    }
}

fn sent(client: &str, msg: MsgId, pkid: PacketId) -> Op {
    Op::Sent {
        client: client.to_owned(),
        msg,
        pkid,
    }
}

fn received(client: &str, pkid: PacketId) -> Op {
    Op::Received {
        client: client.to_owned(),
        pkid,
    }
}

fn completed(client: &str, pkid: PacketId) -> Op {
    Op::Completed {
        client: client.to_owned(),
        pkid,
    }
}

fn inbound(client: &str, pkid: PacketId) -> Op {
    Op::InboundReceived {
        client: client.to_owned(),
        pkid,
    }
}

fn inbound_released(client: &str, pkid: PacketId) -> Op {
    Op::InboundReleased {
        client: client.to_owned(),
        pkid,
    }
}

fn apply_all(state: &mut State, ops: &[Op]) {
    for op in ops {
        if let Err(e) = state.apply(op) {
            panic!("{op:?} does not apply: {e}");
        }
    }
}

fn queue_ids(state: &State, client: &str) -> Vec<MsgId> {
    let session = state.session(client).expect("the session");
    session.queue().iter().map(|q| q.msg).collect()
}

/// Requests touching every kind of op, every one applying.
fn scenario() -> Vec<Vec<Op>> {
    vec![
        vec![open("a"), open("b"), open("c")],
        vec![
            subscribe("a", "t/#", 2),
            subscribe("b", "t/+", 1),
            subscribe("c", "t/x", 0),
        ],
        vec![publish_to(1, 2, &[("a", 2), ("b", 1), ("c", 0)])],
        vec![publish(
            message(2, "t/y", 1, true, "retained one"),
            &[("a", 1), ("b", 1)],
        )],
        vec![sent("a", 1, 10), sent("b", 1, 11), sent("c", 1, 0)],
        vec![received("a", 10)],
        vec![completed("b", 11)],
        vec![inbound("a", 5), publish_to(3, 2, &[("b", 1)])],
        vec![Op::Enqueue {
            client: "c".to_owned(),
            msg: 2,
            qos: 0,
            retain: true,
        }],
        vec![publish(message(4, "t/z", 0, true, "z"), &[])],
        vec![
            Op::Unsubscribe {
                client: "c".to_owned(),
                filter: "t/x".to_owned(),
            },
            inbound_released("a", 5),
        ],
        vec![
            open("d"),
            subscribe("d", "t/d", 1),
            last_seen("d", 1),
            drop_session("d"),
        ],
        vec![last_seen("b", 1_700_000_000_000)],
        vec![sent("a", 2, 12), sent("b", 2, 13)],
        // Deletes t/z's retained message; b still gets the (empty) message.
        vec![publish(message(5, "t/z", 1, true, ""), &[("b", 1)])],
        vec![subscribe("b", "t/last", 1)],
    ]
}

fn scenario_state() -> State {
    let mut state = State::default();
    for request in scenario() {
        apply_all(&mut state, &request);
    }
    state
}

/// Commits a request and checks it applied whole.
fn commit_all(store: &mut Store, ops: Vec<Op>) {
    let n = ops.len();
    let commit = store.commit(ops).expect("commit");
    assert_eq!(commit.rejected, None);
    assert_eq!(commit.applied, n);
}

// --- the model ---------------------------------------------------------------------------------

#[test]
fn a_body_is_stored_once_and_freed_with_its_last_reference() {
    let mut state = State::default();
    apply_all(&mut state, &[open("a"), open("b"), open("c")]);
    apply_all(
        &mut state,
        &[publish_to(7, 1, &[("a", 1), ("b", 1), ("c", 1)])],
    );
    assert_eq!(state.message_count(), 1);
    assert_eq!(state.references(7), 3);
    for client in ["a", "b", "c"] {
        let q = state.session(client).unwrap().queue();
        assert_eq!(
            q.iter().copied().collect::<Vec<_>>(),
            vec![Queued {
                msg: 7,
                qos: 1,
                retain: false
            }]
        );
    }

    // Sending moves the reference from the queue to the in-flight slot.
    apply_all(&mut state, &[sent("a", 7, 1)]);
    assert_eq!(state.references(7), 3);
    let a = state.session("a").unwrap();
    assert!(a.queue().is_empty());
    assert_eq!(
        a.unacked(),
        &[Unacked {
            pkid: 1,
            msg: 7,
            qos: 1
        }]
    );
    apply_all(&mut state, &[completed("a", 1)]);
    assert_eq!(state.references(7), 2);
    assert!(state.session("a").unwrap().unacked().is_empty());

    apply_all(&mut state, &[drop_session("b")]);
    assert_eq!(state.references(7), 1);
    assert!(state.session("b").is_none());

    apply_all(&mut state, &[sent("c", 7, 9), completed("c", 9)]);
    assert_eq!(state.references(7), 0);
    assert_eq!(state.message(7), None);
    assert_eq!(state.message_count(), 0);
}

#[test]
fn qos0_entries_are_done_once_sent() {
    let mut state = State::default();
    apply_all(&mut state, &[open("a"), publish_to(1, 0, &[("a", 0)])]);
    apply_all(&mut state, &[sent("a", 1, 0)]);
    let a = state.session("a").unwrap();
    assert!(a.queue().is_empty() && a.unacked().is_empty());
    assert_eq!(state.message_count(), 0);
}

#[test]
fn qos2_outbound_releases_the_body_at_pubrec_and_ends_at_pubcomp() {
    let mut state = State::default();
    apply_all(&mut state, &[open("a"), publish_to(1, 2, &[("a", 2)])]);
    apply_all(&mut state, &[sent("a", 1, 42)]);
    assert!(state.session("a").unwrap().outbound_in_use(42));

    apply_all(&mut state, &[received("a", 42)]);
    let a = state.session("a").unwrap();
    assert!(a.unacked().is_empty());
    assert_eq!(a.released(), &[42]);
    assert_eq!(state.message_count(), 0, "PUBREL needs no body");
    // A repeated PUBREC changes nothing; the id stays in use until PUBCOMP.
    let before = state.clone();
    apply_all(&mut state, &[received("a", 42)]);
    assert_eq!(state, before);
    assert!(state.session("a").unwrap().outbound_in_use(42));

    apply_all(&mut state, &[completed("a", 42)]);
    assert!(state.session("a").unwrap().released().is_empty());
    assert_eq!(
        state.apply(&completed("a", 42)),
        Err(ApplyError::UnknownPacketId {
            client: "a".to_owned(),
            pkid: 42
        })
    );
}

#[test]
fn retained_messages_are_set_replaced_and_deleted_by_an_empty_payload() {
    let mut state = State::default();
    apply_all(&mut state, &[open("a")]);
    apply_all(
        &mut state,
        &[publish(message(1, "t/r", 1, true, "v1"), &[])],
    );
    assert_eq!(state.retained("t/r").map(|m| m.id), Some(1));
    assert_eq!(state.references(1), 1);

    // Replaced: the old body goes; the new one is shared with a's queue.
    apply_all(
        &mut state,
        &[publish(message(2, "t/r", 1, true, "v2"), &[("a", 1)])],
    );
    assert_eq!(state.message(1), None);
    assert_eq!(
        state.retained("t/r").map(|m| m.payload.as_ref()),
        Some(&b"v2"[..])
    );
    assert_eq!(state.references(2), 2);
    assert_eq!(state.message_count(), 1);

    // Deleted by an empty payload, which is still delivered but not retained.
    apply_all(
        &mut state,
        &[publish(message(3, "t/r", 1, true, ""), &[("a", 1)])],
    );
    assert_eq!(state.retained("t/r"), None);
    assert_eq!(state.references(2), 1, "a's queue still holds v2");
    assert_eq!(state.references(3), 1);
    assert_eq!(queue_ids(&state, "a"), vec![2, 3]);
    assert_eq!(state.all_retained().count(), 0);

    // Deleting what is not there, to nobody: nothing stored.
    apply_all(
        &mut state,
        &[publish(message(4, "t/none", 0, true, ""), &[])],
    );
    assert_eq!(state.message(4), None);
    assert_eq!(state.next_message_id(), 5);
}

#[test]
fn enqueue_adds_a_reference_to_a_stored_body() {
    let mut state = State::default();
    apply_all(
        &mut state,
        &[open("a"), publish(message(1, "t/r", 1, true, "r"), &[])],
    );
    let enqueue = Op::Enqueue {
        client: "a".to_owned(),
        msg: 1,
        qos: 1,
        retain: true,
    };
    apply_all(&mut state, &[enqueue]);
    assert_eq!(state.references(1), 2);
    let entry = state.session("a").unwrap().queue()[0];
    assert!(entry.retain);
    let missing = Op::Enqueue {
        client: "a".to_owned(),
        msg: 99,
        qos: 1,
        retain: true,
    };
    assert_eq!(state.apply(&missing), Err(ApplyError::UnknownMessage(99)));
}

#[test]
fn inbound_qos2_packet_ids_are_kept_until_released() {
    let mut state = State::default();
    apply_all(&mut state, &[open("p"), inbound("p", 3)]);
    assert!(state.session("p").unwrap().inbound().contains(&3));
    let pkid_in_use = ApplyError::PacketIdInUse {
        client: "p".to_owned(),
        pkid: 3,
    };
    assert_eq!(state.apply(&inbound("p", 3)), Err(pkid_in_use));
    assert_eq!(
        state.apply(&inbound("p", 0)),
        Err(ApplyError::ZeroPacketId {
            client: "p".to_owned()
        })
    );
    apply_all(&mut state, &[inbound_released("p", 3)]);
    assert!(state.session("p").unwrap().inbound().is_empty());
    assert!(state.apply(&inbound_released("p", 3)).is_err());
}

#[test]
fn an_op_that_does_not_apply_changes_nothing() {
    let mut state = State::default();
    apply_all(
        &mut state,
        &[
            open("a"),
            publish_to(1, 1, &[("a", 1)]),
            publish_to(2, 1, &[("a", 1)]),
            sent("a", 1, 5),
        ],
    );
    let cases = [
        (
            subscribe("nobody", "t", 0),
            ApplyError::UnknownSession("nobody".to_owned()),
        ),
        (subscribe("a", "t", 3), ApplyError::InvalidQos(3)),
        (
            publish_to(1, 1, &[("a", 1)]),
            ApplyError::DuplicateMessage(1),
        ),
        // The first recipient exists; the op is refused whole.
        (
            publish_to(3, 1, &[("a", 1), ("nobody", 1)]),
            ApplyError::UnknownSession("nobody".to_owned()),
        ),
        (
            sent("a", 2, 5),
            ApplyError::PacketIdInUse {
                client: "a".to_owned(),
                pkid: 5,
            },
        ),
        (
            sent("a", 2, 0),
            ApplyError::ZeroPacketId {
                client: "a".to_owned(),
            },
        ),
        (
            sent("a", 9, 6),
            ApplyError::NotQueued {
                client: "a".to_owned(),
                msg: 9,
            },
        ),
        (
            received("a", 5),
            ApplyError::NotQos2 {
                client: "a".to_owned(),
                pkid: 5,
            },
        ),
        (
            drop_queued("a", 9),
            ApplyError::NotQueued {
                client: "a".to_owned(),
                msg: 9,
            },
        ),
        (
            last_seen("nobody", 1),
            ApplyError::UnknownSession("nobody".to_owned()),
        ),
    ];
    for (op, error) in cases {
        let before = state.clone();
        assert_eq!(state.apply(&op), Err(error), "{op:?}");
        assert_eq!(state, before, "{op:?} changed the state");
    }
}

#[test]
fn dropping_a_session_releases_all_it_holds() {
    let mut state = State::default();
    apply_all(
        &mut state,
        &[
            open("a"),
            open("b"),
            publish(message(1, "t/r", 2, true, "r"), &[("a", 2), ("b", 2)]),
            publish_to(2, 1, &[("a", 1)]),
            publish_to(3, 2, &[("a", 2)]),
            sent("a", 1, 1),
            sent("a", 2, 2),
            sent("a", 3, 3),
            received("a", 3),
            inbound("a", 8),
        ],
    );
    assert_eq!(state.references(1), 3);
    apply_all(&mut state, &[drop_session("a")]);
    assert_eq!(state.references(1), 2, "retained and b's queue");
    assert_eq!(state.message(2), None);
    assert_eq!(state.message(3), None);
    // Dropping a session that does not exist is fine (a clean session for a new client).
    apply_all(&mut state, &[drop_session("a")]);
}

#[test]
fn a_snapshot_replays_to_the_same_state() {
    let state = scenario_state();
    // The scenario leaves something in every part of the state.
    let a = state.session("a").unwrap();
    assert!(!a.released().is_empty() && !a.unacked().is_empty());
    assert!(!state.session("b").unwrap().queue().is_empty());
    assert!(state.all_retained().count() > 0);
    assert_eq!(state.last_seen("b"), Some(1_700_000_000_000));
    assert_eq!(state.last_seen("d"), None, "forgotten with its session");
    assert!(state.queued_bytes("b") > 0);

    let mut rebuilt = State::default();
    for op in state.snapshot() {
        rebuilt.apply(&op).expect("a snapshot op applies");
    }
    assert_eq!(rebuilt.collect_unreferenced(), 0);
    assert_eq!(rebuilt, state);
}

// --- the quota ---------------------------------------------------------------------------------

/// A state where `a`'s queue holds these entries (ids 1, 2, …, QoS as given; each message is 10
/// bytes of topic and payload).
fn queue_of(qos: &[Qos]) -> State {
    let mut state = State::default();
    apply_all(&mut state, &[open("a"), open("b")]);
    for (i, q) in qos.iter().enumerate() {
        apply_all(&mut state, &[publish_to(i as MsgId + 1, *q, &[("a", *q)])]);
    }
    state
}

/// A quota of `messages` (bytes unbounded) and what happens past it.
fn messages(messages: usize, overflow: Overflow) -> Quota {
    Quota {
        messages,
        bytes: u64::MAX,
        overflow,
    }
}

fn drop_queued(client: &str, msg: MsgId) -> Op {
    Op::DropQueued {
        client: client.to_owned(),
        msg,
    }
}

#[test]
fn a_full_queue_drops_its_oldest_qos0_entry_first() {
    for overflow in [Overflow::DropNew, Overflow::DropOldest] {
        let state = queue_of(&[0, 1, 0]);
        let admitted = state
            .admit(publish_to(4, 1, &[("a", 1)]), &messages(3, overflow))
            .expect("room is made");
        assert_eq!(
            admitted.ops,
            vec![drop_queued("a", 1), publish_to(4, 1, &[("a", 1)])]
        );
        assert_eq!(admitted.dropped, vec![("a".to_owned(), 1)]);
        let mut state = state;
        apply_all(&mut state, &admitted.ops);
        assert_eq!(queue_ids(&state, "a"), vec![2, 3, 4]);
        assert_eq!(state.message(1), None);
    }
}

#[test]
fn a_new_qos0_message_with_no_older_qos0_entry_is_dropped_itself() {
    for overflow in [Overflow::DropNew, Overflow::DropOldest] {
        let quota = messages(3, overflow);
        let state = queue_of(&[1, 2, 1]);
        let admitted = state.admit(publish_to(4, 0, &[("a", 0)]), &quota).unwrap();
        assert_eq!(admitted.ops, vec![], "nobody gets it: nothing to log");
        assert_eq!(admitted.dropped, vec![("a".to_owned(), 1)]);
        // Another recipient with room still gets it.
        let admitted = state
            .admit(publish_to(4, 0, &[("a", 0), ("b", 0)]), &quota)
            .unwrap();
        assert_eq!(admitted.ops, vec![publish_to(4, 0, &[("b", 0)])]);
    }
}

#[test]
fn the_oldest_qos0_can_be_earlier_in_the_same_publication() {
    let state = queue_of(&[]);
    // Three entries for a (overlapping subscriptions), room for two: the first QoS 0 goes.
    let admitted = state
        .admit(
            publish_to(1, 1, &[("a", 0), ("a", 0), ("a", 1)]),
            &messages(2, Overflow::DropNew),
        )
        .unwrap();
    assert_eq!(admitted.ops, vec![publish_to(1, 1, &[("a", 0), ("a", 1)])]);
    assert_eq!(admitted.dropped, vec![("a".to_owned(), 1)]);
}

/// A session full of QoS 1/2 entries never refuses the publication: with drop-new only that
/// session goes without the new message; the other recipients get it.
#[test]
fn over_its_quota_with_drop_new_a_session_goes_without_the_new_message_and_nobody_else_does() {
    let quota = messages(3, Overflow::DropNew);
    let state = queue_of(&[1, 2, 1]);
    let admitted = state
        .admit(publish_to(4, 1, &[("b", 1), ("a", 1)]), &quota)
        .unwrap();
    assert_eq!(admitted.ops, vec![publish_to(4, 1, &[("b", 1)])]);
    assert_eq!(admitted.dropped, vec![("a".to_owned(), 1)]);
    let enqueue = Op::Enqueue {
        client: "a".to_owned(),
        msg: 1,
        qos: 1,
        retain: true,
    };
    let admitted = state.admit(enqueue, &quota).unwrap();
    assert_eq!(admitted.ops, vec![]);
    assert_eq!(admitted.dropped, vec![("a".to_owned(), 1)]);
    // Ops other than queueing are never touched by the quota.
    let admitted = state.admit(sent("a", 1, 1), &quota).unwrap();
    assert_eq!(admitted.ops, vec![sent("a", 1, 1)]);
}

#[test]
fn over_its_quota_with_drop_oldest_a_session_loses_its_oldest_entries() {
    let quota = messages(3, Overflow::DropOldest);
    let mut state = queue_of(&[1, 2, 1]);
    let admitted = state
        .admit(publish_to(4, 1, &[("b", 1), ("a", 1)]), &quota)
        .unwrap();
    assert_eq!(
        admitted.ops,
        vec![drop_queued("a", 1), publish_to(4, 1, &[("b", 1), ("a", 1)])]
    );
    assert_eq!(admitted.dropped, vec![("a".to_owned(), 1)]);
    apply_all(&mut state, &admitted.ops);
    assert_eq!(queue_ids(&state, "a"), vec![2, 3, 4]);
    // Two more for a in one publication (overlapping subscriptions): two of the oldest go.
    let admitted = state
        .admit(publish_to(5, 1, &[("a", 1), ("a", 2)]), &quota)
        .unwrap();
    assert_eq!(
        admitted.ops,
        vec![
            drop_queued("a", 2),
            drop_queued("a", 3),
            publish_to(5, 1, &[("a", 1), ("a", 2)])
        ]
    );
    apply_all(&mut state, &admitted.ops);
    assert_eq!(queue_ids(&state, "a"), vec![4, 5, 5]);
}

#[test]
fn the_byte_quota_counts_topic_and_payload_and_a_message_bigger_than_it_never_fits() {
    // Each message is 10 bytes: room for two.
    let bytes = |overflow| Quota {
        messages: 100,
        bytes: 25,
        overflow,
    };
    let state = queue_of(&[1, 1]);
    assert_eq!(state.queued_bytes("a"), 20);
    let admitted = state
        .admit(publish_to(3, 1, &[("a", 1)]), &bytes(Overflow::DropNew))
        .unwrap();
    assert_eq!(admitted.ops, vec![]);
    assert_eq!(admitted.dropped, vec![("a".to_owned(), 1)]);
    let admitted = state
        .admit(publish_to(3, 1, &[("a", 1)]), &bytes(Overflow::DropOldest))
        .unwrap();
    assert_eq!(
        admitted.ops,
        vec![drop_queued("a", 1), publish_to(3, 1, &[("a", 1)])]
    );
    // Bigger than the whole quota: not queued, and nothing is pushed out for it.
    let tiny = Quota {
        messages: 100,
        bytes: 5,
        overflow: Overflow::DropOldest,
    };
    let admitted = state.admit(publish_to(3, 1, &[("a", 1)]), &tiny).unwrap();
    assert_eq!(admitted.ops, vec![]);
    assert_eq!(admitted.dropped, vec![("a".to_owned(), 1)]);
}

#[test]
fn queued_bytes_follow_the_queue() {
    let mut state = queue_of(&[1, 0, 2]);
    assert_eq!(state.queued_bytes("a"), 30);
    apply_all(&mut state, &[sent("a", 1, 7), drop_queued("a", 2)]);
    assert_eq!(
        state.queued_bytes("a"),
        10,
        "sent and dropped entries no longer count"
    );
    apply_all(
        &mut state,
        &[Op::Enqueue {
            client: "a".to_owned(),
            msg: 1,
            qos: 1,
            retain: true,
        }],
    );
    assert_eq!(state.queued_bytes("a"), 20);
    let mut rebuilt = State::default();
    for op in state.snapshot() {
        rebuilt.apply(&op).unwrap();
    }
    assert_eq!(rebuilt.queued_bytes("a"), 20, "rebuilt from a snapshot");
    apply_all(&mut state, &[drop_session("a")]);
    assert_eq!(state.queued_bytes("a"), 0);
}

#[test]
fn a_commit_applies_ops_up_to_the_first_rejected_one() {
    let dir = TempDir::new("prefix");
    let config = dir.config();
    let mut store = Store::open(config.clone(), Arc::default()).unwrap();
    commit_all(&mut store, vec![open("a"), publish_to(1, 1, &[("a", 1)])]);
    let commit = store
        .commit(vec![
            subscribe("a", "first", 1),
            sent("nobody", 1, 1),
            subscribe("a", "never", 1),
        ])
        .unwrap();
    assert_eq!(commit.applied, 1);
    assert_eq!(
        commit.rejected,
        Some(Rejected {
            index: 1,
            reason: ApplyError::UnknownSession("nobody".to_owned())
        })
    );
    store.sync().unwrap();
    let expected = store.state().clone();
    let subscriptions = expected.session("a").unwrap().subscriptions().clone();
    assert!(subscriptions.contains_key("first"));
    assert!(!subscriptions.contains_key("never"));
    drop(store);
    let reopened = Store::open(config, Arc::default()).unwrap();
    assert_eq!(reopened.state(), &expected);
}

/// The store applies the quota to offline sessions only: a connected one (whose connection
/// applies it) keeps everything it was handed; an offline one over its quota loses the new
/// messages, counted for it alone, and connecting ends the episode.
#[test]
fn an_offline_session_over_its_quota_loses_messages_and_a_connected_one_has_no_quota_here() {
    let dir = TempDir::new("quota");
    let mut config = dir.config();
    config.quota = messages(1, Overflow::DropNew);
    let stats = Arc::new(StoreStats::default());
    let mut store = Store::open(config, stats.clone()).unwrap();
    commit_all(
        &mut store,
        vec![
            open("a"),
            open("b"),
            publish_to(1, 1, &[("a", 1), ("b", 1)]),
        ],
    );
    store.set_online("b", true);
    let commit = store
        .commit(vec![publish_to(2, 1, &[("a", 1), ("b", 1)])])
        .unwrap();
    assert_eq!(commit.dropped, 1);
    assert_eq!(
        queue_ids(store.state(), "a"),
        vec![1],
        "a is offline, at its quota"
    );
    assert_eq!(queue_ids(store.state(), "b"), vec![1, 2], "b is connected");
    assert_eq!(stats.drops.total(), 1);
    assert_eq!(stats.drops.worst(5), (1, vec![("a".to_owned(), 1)]));
    // Gone offline, b keeps what it has and is held to the quota from then on.
    store.set_online("b", false);
    commit_all(&mut store, vec![publish_to(3, 1, &[("b", 1)])]);
    assert_eq!(queue_ids(store.state(), "b"), vec![1, 2]);
    assert_eq!(stats.drops.total(), 2);
}

#[test]
fn a_poisoned_store_fails_its_worker_and_answers_every_waiting_commit_with_the_error() {
    let dir = TempDir::new("poisoned-worker");
    let mut store = open_store(&dir);
    commit_all(&mut store, vec![open("a")]);
    store.sync().unwrap();
    store.file = File::open(dir.log()).unwrap();
    let mut worker = StoreWorker::new(store, Arc::default());
    assert_eq!(worker.failed(), None);
    let (reply, answer) = oneshot::channel();
    worker.handle(StoreRequest::Commit {
        ops: vec![open("b")],
        reply,
    });
    let error = answer.blocking_recv().unwrap().unwrap_err();
    assert!(matches!(error, StoreError::Io { .. }), "{error:?}");
    let reason = worker.failed().expect("a poisoned store fails its worker");
    assert!(reason.contains("refuses requests"), "{reason}");
}

#[test]
fn drops_are_counted_and_logged_once_per_episode() {
    capture_logs();
    let dir = TempDir::new("drops");
    let mut config = dir.config();
    config.quota = messages(2, Overflow::DropOldest);
    let mut store = Store::open(config, Arc::default()).unwrap();
    let client = "drop-counting-client";
    commit_all(&mut store, vec![open(client)]);
    for id in 1..=7 {
        commit_all(&mut store, vec![publish_to(id, 0, &[(client, 0)])]);
    }
    store.sync().unwrap();
    // Two fit; each of the five after them pushes out the oldest.
    assert_eq!(store.stats().drops.total(), 5);
    assert_eq!(queue_ids(store.state(), client), vec![6, 7]);
    let warnings = logged(log::Level::Warn, client);
    assert_eq!(warnings.len(), 1, "one WARN for the episode: {warnings:#?}");
    assert!(warnings[0].contains("over its quota"), "{}", warnings[0]);
    assert_eq!(logged(log::Level::Debug, client).len(), 4);
    // Connecting ends the episode, with what it cost; the next loss starts another.
    store.set_online(client, true);
    let ended = logged(log::Level::Info, client);
    assert_eq!(ended.len(), 1, "{ended:#?}");
    assert!(ended[0].contains("5 messages were dropped"), "{}", ended[0]);
    store.set_online(client, false);
    commit_all(&mut store, vec![publish_to(8, 0, &[(client, 0)])]);
    assert_eq!(logged(log::Level::Warn, client).len(), 2);
}

// --- the log -----------------------------------------------------------------------------------

#[test]
fn a_reopened_store_has_the_same_state() {
    let dir = TempDir::new("round-trip");
    let mut store = open_store(&dir);
    for request in scenario() {
        commit_all(&mut store, request);
    }
    assert!(store.sync().unwrap());
    assert_eq!(store.state(), &scenario_state());
    let len = store.log_len();
    drop(store);

    for _ in 0..2 {
        let store = open_store(&dir);
        assert_eq!(store.state(), &scenario_state());
        assert_eq!(store.log_len(), len);
        assert_eq!(fs::metadata(dir.log()).unwrap().len(), len);
    }
}

#[test]
fn nothing_staged_is_durable_before_sync() {
    let dir = TempDir::new("staged");
    let mut store = open_store(&dir);
    commit_all(&mut store, vec![open("a")]);
    assert!(store.staged_len() > 0);
    drop(store); // a crash before the sync: the request was never acknowledged
    let store = open_store(&dir);
    assert!(store.state().session("a").is_none());
}

/// The log after the scenario, the length before its last record and the state before it.
fn scenario_log(dir: &TempDir) -> (Vec<u8>, u64, State) {
    let mut store = open_store(dir);
    let mut requests = scenario();
    let last = requests.pop().unwrap();
    for request in requests {
        commit_all(&mut store, request);
    }
    store.sync().unwrap();
    let (before_last, state_before) = (store.log_len(), store.state().clone());
    commit_all(&mut store, last);
    store.sync().unwrap();
    drop(store);
    (fs::read(dir.log()).unwrap(), before_last, state_before)
}

#[test]
fn a_torn_last_record_is_skipped_and_the_log_repaired_at_every_cut() {
    capture_logs();
    let dir = TempDir::new("torn");
    let (bytes, before_last, state_before) = scenario_log(&dir);
    let full = bytes.len() as u64;
    assert!(full - before_last > FRAME_LEN + 4);
    let path = dir.log().display().to_string();

    for cut in before_last + 1..full {
        fs::write(dir.log(), &bytes[..cut as usize]).unwrap();
        let stats = Arc::new(StoreStats::default());
        let store = Store::open(dir.config(), stats.clone()).expect("a torn tail never refuses");
        assert_eq!(store.state(), &state_before, "cut at {cut}");
        assert_eq!(store.log_len(), before_last);
        assert_eq!(StoreStats::get(&stats.skipped_bytes), cut - before_last);
        drop(store);
        assert_eq!(
            fs::metadata(dir.log()).unwrap().len(),
            before_last,
            "repaired"
        );
        let warning = format!(
            "at offset {before_last}: skipping the {} bytes",
            cut - before_last
        );
        assert_eq!(
            logged(log::Level::Warn, &path)
                .iter()
                .filter(|l| l.contains(&warning))
                .count(),
            1,
            "cut at {cut}: no warning with `{warning}`"
        );
        CAPTURED
            .lock()
            .unwrap()
            .retain(|(_, line)| !line.contains(&path));
    }
    // The repaired log opens cleanly and appends after the last sound record.
    let stats = Arc::new(StoreStats::default());
    let mut store = Store::open(dir.config(), stats.clone()).unwrap();
    assert_eq!(StoreStats::get(&stats.skipped_bytes), 0);
    commit_all(&mut store, vec![subscribe("c", "after", 0)]);
    store.sync().unwrap();
    let expected = store.state().clone();
    drop(store);
    assert_eq!(open_store(&dir).state(), &expected);
}

/// Offsets of the records in a log.
fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut at = HEADER_LEN as usize;
    while at < bytes.len() {
        offsets.push(at);
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        at += FRAME_LEN as usize + len as usize;
    }
    offsets
}

#[test]
fn a_flipped_byte_ends_the_replay_at_its_record() {
    capture_logs();
    let dir = TempDir::new("flipped");
    let (bytes, _, _) = scenario_log(&dir);
    // The first record is the new log's (empty) snapshot; then one per request.
    let offsets = record_offsets(&bytes)[1..].to_vec();
    assert_eq!(offsets.len(), scenario().len());
    let expected_at = |records: usize| {
        let mut state = State::default();
        for request in &scenario()[..records] {
            apply_all(&mut state, request);
        }
        state
    };
    let path = dir.log().display().to_string();

    // A flipped payload byte in the third record: it and everything after it are dropped (the
    // records after a corrupt one cannot be trusted to follow it).
    let mut corrupt = bytes.clone();
    corrupt[offsets[2] + FRAME_LEN as usize + 3] ^= 0x40;
    fs::write(dir.log(), &corrupt).unwrap();
    let store = open_store(&dir);
    assert_eq!(store.state(), &expected_at(2));
    assert_eq!(store.log_len(), offsets[2] as u64);
    drop(store);
    let warnings = logged(log::Level::Warn, &path);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("a checksum mismatch at offset")
                && w.contains(&offsets[2].to_string())),
        "{warnings:#?}"
    );

    // A length beyond any record, in the fifth record's frame.
    let mut corrupt = bytes.clone();
    corrupt[offsets[4]..offsets[4] + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    fs::write(dir.log(), &corrupt).unwrap();
    let store = open_store(&dir);
    assert_eq!(store.state(), &expected_at(4));
    assert_eq!(store.log_len(), offsets[4] as u64);
    drop(store);
    assert!(!logged(log::Level::Warn, "an impossible record length").is_empty());

    // A flipped bit in a length that still fits: the checksum covers the length too.
    let mut corrupt = bytes.clone();
    corrupt[offsets[1]] ^= 0x01;
    fs::write(dir.log(), &corrupt).unwrap();
    let store = open_store(&dir);
    assert_eq!(store.state(), &expected_at(1));
    assert_eq!(store.log_len(), offsets[1] as u64);
}

#[test]
fn a_file_that_is_not_a_log_is_refused_with_its_path() {
    let dir = TempDir::new("foreign");
    fs::create_dir_all(&dir.0).unwrap();
    fs::write(dir.log(), b"these are somebody's notes, not a log").unwrap();
    let error = Store::open(dir.config(), Arc::default()).unwrap_err();
    assert!(matches!(error, StoreError::Foreign { .. }), "{error:?}");
    assert!(
        error.to_string().contains(&dir.log().display().to_string()),
        "{error}"
    );
    // And it was left alone.
    assert_eq!(
        fs::read(dir.log()).unwrap(),
        b"these are somebody's notes, not a log"
    );
}

#[test]
fn an_unusable_data_dir_is_an_error_naming_it() {
    let dir = TempDir::new("not-a-dir");
    fs::write(&dir.0, b"a file where the directory should be").unwrap();
    let error = Store::open(dir.config(), Arc::default()).unwrap_err();
    assert!(
        error.to_string().contains(&dir.0.display().to_string()),
        "{error}"
    );
    fs::remove_file(&dir.0).unwrap();
}

#[test]
fn one_store_per_data_dir() {
    let dir = TempDir::new("locked");
    let store = open_store(&dir);
    let error = Store::open(dir.config(), Arc::default()).unwrap_err();
    assert!(matches!(error, StoreError::Locked { .. }), "{error:?}");
    assert!(error.to_string().contains(&dir.0.display().to_string()));
    drop(store);
    open_store(&dir);
}

#[test]
fn a_failed_append_poisons_the_store_until_it_is_reopened() {
    let dir = TempDir::new("poisoned");
    let mut store = open_store(&dir);
    commit_all(&mut store, vec![open("a")]);
    store.sync().unwrap();
    // A handle that cannot write stands in for a failing disk.
    store.file = File::open(dir.log()).unwrap();
    commit_all(&mut store, vec![open("b")]);
    let error = store.sync().unwrap_err();
    assert!(matches!(error, StoreError::Io { .. }), "{error:?}");
    assert!(error.to_string().contains(&dir.log().display().to_string()));
    // Memory is ahead of the disk now: everything is refused, with the cause.
    assert!(matches!(
        store.commit(vec![open("c")]),
        Err(StoreError::Poisoned(_))
    ));
    assert!(matches!(store.sync(), Err(StoreError::Poisoned(_))));
    drop(store);
    let store = open_store(&dir);
    assert!(store.state().session("a").is_some());
    assert!(
        store.state().session("b").is_none(),
        "never acknowledged, never durable"
    );
}

// --- compaction --------------------------------------------------------------------------------

/// A config that compacts small logs.
fn compacting(dir: &TempDir) -> StoreConfig {
    StoreConfig {
        compact_min_bytes: 16 << 10,
        compact_ratio: 4,
        ..dir.config()
    }
}

/// Churn: messages published to `a` and acknowledged, so the log grows and the state does not.
fn churn(store: &mut Store, ids: std::ops::Range<MsgId>) {
    for id in ids {
        let payload = "x".repeat(200);
        let msg = message(id, "t/churn", 1, false, &payload);
        commit_all(store, vec![publish(msg, &[("a", 1)])]);
        commit_all(store, vec![sent("a", id, 1), completed("a", 1)]);
        store.sync().unwrap();
        // What the worker does after each batch.
        if store.compaction_due() {
            store.compact().unwrap();
        }
    }
}

#[test]
fn compaction_keeps_the_state_and_bounds_the_log() {
    let dir = TempDir::new("compact");
    let mut store = Store::open(compacting(&dir), Arc::default()).unwrap();
    for request in scenario() {
        commit_all(&mut store, request);
    }
    churn(&mut store, 100..400);
    assert!(StoreStats::get(&store.stats().compactions) >= 2);
    // 300 × ~300 bytes were appended; the log stays below the threshold.
    assert!(store.log_len() < 16 << 10, "{} bytes", store.log_len());
    let expected = store.state().clone();
    assert_eq!(expected.session("b"), scenario_state().session("b"));

    // An explicit compaction shrinks it to the snapshot.
    let before = store.log_len();
    store.compact().unwrap();
    assert!(store.log_len() < before);
    assert_eq!(store.state(), &expected);
    drop(store);

    let store = open_store(&dir);
    assert_eq!(store.state(), &expected);
    assert_eq!(store.state().next_message_id(), 400);
    assert!(!dir.0.join(COMPACT_FILE).exists());
}

/// A queue delivered gives its space back: the log, grown while the queue was big, is
/// compacted once the stored messages have shrunk well below what they were at the last
/// compaction, although it never grows enough again to be compacted for its own growth.
#[test]
fn the_log_shrinks_once_a_big_queue_is_delivered() {
    let dir = TempDir::new("shrink");
    let mut store = Store::open(compacting(&dir), Arc::default()).unwrap();
    commit_all(&mut store, vec![open("a")]);
    let payload = "q".repeat(4096);
    for id in 0..400 {
        let msg = message(id, "t/queued", 1, false, &payload);
        commit_all(&mut store, vec![publish(msg, &[("a", 1)])]);
        store.sync().unwrap();
        if store.compaction_due() {
            store.compact().unwrap();
        }
    }
    let peak = store.log_len();
    assert!(peak > 1 << 20, "{peak} bytes queued");
    for id in 0..400 {
        let pkid = (id % 100 + 1) as PacketId;
        commit_all(&mut store, vec![sent("a", id, pkid), completed("a", pkid)]);
        store.sync().unwrap();
        if store.compaction_due() {
            store.compact().unwrap();
        }
    }
    assert_eq!(store.state().body_bytes(), 0);
    eprintln!(
        "shrink: the log peaked at {peak} bytes with the queue, {} bytes once it was delivered",
        store.log_len()
    );
    assert!(
        store.log_len() < peak / 10,
        "{} bytes left of {peak} after the queue was delivered",
        store.log_len()
    );
}

/// A write that fails (a full disk) is undone — memory back to what the log has — and commits
/// are refused, up front and applying nothing, until a probe finds writes working again; what
/// was refused never reaches the log.
#[test]
fn a_failed_write_is_undone_and_commits_are_refused_until_a_probe_writes() {
    let dir = TempDir::new("full");
    let flag = dir.0.with_extension("full");
    let mut config = dir.config();
    config.fail_writes_while = Some(flag.clone());
    let stats = Arc::new(StoreStats::default());
    let mut store = Store::open(config.clone(), stats.clone()).unwrap();
    commit_all(&mut store, vec![open("a"), subscribe("a", "kept", 1)]);
    store.sync().unwrap();
    let durable = store.state().clone();

    fs::write(&flag, b"full").unwrap();
    commit_all(&mut store, vec![subscribe("a", "lost", 1)]);
    let error = store.sync().unwrap_err();
    assert!(matches!(error, StoreError::WriteFailed(_)), "{error:?}");
    assert_eq!(store.state(), &durable, "undone");
    assert!(!stats.disk.ok());
    assert!(stats
        .disk
        .failing()
        .is_some_and(|(why, _)| why.contains("no space")));
    let refused = store
        .commit(vec![subscribe("a", "refused", 1)])
        .unwrap_err();
    assert!(matches!(refused, StoreError::NoDisk(_)), "{refused:?}");
    assert_eq!(store.state(), &durable, "a refused commit applies nothing");
    assert!(!store.probe(), "still full");

    fs::remove_file(&flag).unwrap();
    assert!(store.probe(), "space again");
    assert!(stats.disk.ok());
    commit_all(&mut store, vec![subscribe("a", "after", 1)]);
    store.sync().unwrap();
    let expected = store.state().clone();
    drop(store);
    let store = Store::open(config, Arc::default()).unwrap();
    assert_eq!(store.state(), &expected);
    let subscriptions = store.state().session("a").unwrap().subscriptions().clone();
    let filters: Vec<&str> = subscriptions.keys().map(String::as_str).collect();
    assert_eq!(filters, ["after", "kept"]);
}

#[test]
fn a_big_log_is_compacted_at_open() {
    let dir = TempDir::new("compact-at-open");
    let mut store = open_store(&dir); // never compacts on its own (16 MiB minimum)
    commit_all(&mut store, vec![open("a")]);
    churn(&mut store, 1..100);
    let (len, expected) = (store.log_len(), store.state().clone());
    drop(store);
    let store = Store::open(compacting(&dir), Arc::default()).unwrap();
    assert!(len > 16 << 10);
    assert!(
        store.log_len() < len / 10,
        "{} of {len} bytes",
        store.log_len()
    );
    assert_eq!(store.state(), &expected);
    assert_eq!(StoreStats::get(&store.stats().compactions), 1);
}

#[test]
fn a_crash_between_compaction_steps_recovers() {
    capture_logs();
    let dir = TempDir::new("compact-crash");
    let mut store = open_store(&dir);
    for request in scenario() {
        commit_all(&mut store, request);
    }
    churn(&mut store, 100..150);
    let (len, expected) = (store.log_len(), store.state().clone());

    // After steps 1–2 (snapshot written and synced, not renamed): the old log is used.
    let (file, _) = store.write_snapshot().unwrap();
    drop((file, store));
    assert!(dir.0.join(COMPACT_FILE).exists());
    let mut store = open_store(&dir);
    assert_eq!(store.state(), &expected);
    assert_eq!(store.log_len(), len);
    assert!(!dir.0.join(COMPACT_FILE).exists());
    let removed = format!(
        "{}: removed an unfinished compaction",
        dir.0.join(COMPACT_FILE).display()
    );
    assert_eq!(logged(log::Level::Warn, &removed).len(), 1);

    // During step 1 (a torn snapshot): the same.
    let (file, _) = store.write_snapshot().unwrap();
    drop((file, store));
    let compact_path = dir.0.join(COMPACT_FILE);
    let torn = fs::read(&compact_path).unwrap();
    fs::write(&compact_path, &torn[..torn.len() / 2]).unwrap();
    let store = open_store(&dir);
    assert_eq!(store.state(), &expected);
    assert_eq!(store.log_len(), len);

    // After step 3 (renamed, the directory not synced yet): the new log is complete.
    let mut store = store;
    let (file, snapshot_len) = store.write_snapshot().unwrap();
    fs::rename(&compact_path, dir.log()).unwrap();
    drop((file, store));
    let store = open_store(&dir);
    assert_eq!(store.state(), &expected);
    assert_eq!(store.log_len(), snapshot_len);
    assert!(snapshot_len < len);
}

// --- the worker --------------------------------------------------------------------------------

/// A worker on a store in `dir`, with the count a client would keep.
fn worker(config: StoreConfig) -> (StoreWorker, Arc<AtomicUsize>) {
    let store = Store::open(config, Arc::default()).unwrap();
    let queued = Arc::new(AtomicUsize::new(0));
    (StoreWorker::new(store, queued.clone()), queued)
}

type CommitRx = oneshot::Receiver<Result<Commit, StoreError>>;

fn commit_request(ops: Vec<Op>) -> (StoreRequest, CommitRx) {
    let (reply, rx) = oneshot::channel();
    (StoreRequest::Commit { ops, reply }, rx)
}

#[test]
fn a_run_of_queued_requests_is_synced_once_and_answered_after_it() {
    let dir = TempDir::new("worker-run");
    let (mut worker, queued) = worker(dir.config());
    let (request, rx) = commit_request(vec![open("a")]);
    queued.fetch_add(1, Ordering::AcqRel);
    worker.handle(request);
    assert!(rx.blocking_recv().unwrap().is_ok());
    let fsyncs = || StoreStats::get(&worker.stats.fsyncs);
    assert_eq!(fsyncs(), 1, "alone, a request is synced at once");

    // 50 requests in the mailbox: the count says so to each but the last.
    let requests: Vec<_> = (1..=50)
        .map(|id| commit_request(vec![publish_to(id, 1, &[("a", 1)])]))
        .collect();
    queued.fetch_add(requests.len(), Ordering::AcqRel);
    let mut replies = Vec::new();
    for (request, mut rx) in requests {
        worker.handle(request);
        if queued.load(Ordering::Acquire) > 0 {
            assert!(rx.try_recv().is_err(), "answered before its fsync");
        }
        replies.push(rx);
    }
    assert_eq!(StoreStats::get(&worker.stats.fsyncs), 2);
    for rx in replies {
        assert_eq!(rx.blocking_recv().unwrap().unwrap().applied, 1);
    }

    // A read syncs first, so it sees only durable state.
    let (first, first_rx) = commit_request(vec![subscribe("a", "t", 1)]);
    let (read_tx, read_rx) = oneshot::channel();
    let read = StoreRequest::Read(Box::new(move |state| {
        let subscribed = state.map(|s| s.session("a").unwrap().subscriptions().len());
        let _ = read_tx.send(subscribed);
    }));
    let (last, last_rx) = commit_request(vec![subscribe("a", "u", 1)]);
    queued.fetch_add(3, Ordering::AcqRel);
    worker.handle(first);
    worker.handle(read);
    assert_eq!(read_rx.blocking_recv().unwrap().unwrap(), 1);
    assert!(first_rx.blocking_recv().unwrap().is_ok());
    worker.handle(last);
    assert!(last_rx.blocking_recv().unwrap().is_ok());
    assert_eq!(StoreStats::get(&worker.stats.fsyncs), 4);
}

#[test]
fn max_batch_bounds_a_run() {
    let dir = TempDir::new("worker-batch");
    let mut config = dir.config();
    config.max_batch = 10;
    let (mut worker, queued) = worker(config);
    let requests: Vec<_> = (0..35)
        .map(|i| commit_request(vec![open(&format!("c{i}"))]))
        .collect();
    queued.fetch_add(requests.len(), Ordering::AcqRel);
    let replies: Vec<_> = requests
        .into_iter()
        .map(|(request, rx)| {
            worker.handle(request);
            rx
        })
        .collect();
    assert_eq!(StoreStats::get(&worker.stats.fsyncs), 4); // 10 + 10 + 10 + 5
    assert!(replies
        .into_iter()
        .all(|rx| rx.blocking_recv().unwrap().is_ok()));
}

#[test]
fn replies_waiting_when_the_worker_drains_are_synced_and_sent() {
    let dir = TempDir::new("worker-drain");
    let (mut worker, queued) = worker(dir.config());
    // The count says another request follows, but none comes (its sender was refused).
    let (request, rx) = commit_request(vec![open("a")]);
    queued.fetch_add(2, Ordering::AcqRel);
    worker.handle(request);
    worker.on_drained();
    assert!(rx.blocking_recv().unwrap().is_ok());
    drop(worker);
    assert!(open_store(&dir).state().session("a").is_some());
}

#[test]
fn many_threads_share_few_fsyncs_in_a_tree() {
    const THREADS: u64 = 8;
    const EACH: u64 = 25;
    let dir = TempDir::new("tree");
    let (spec, client) = spec("store", compacting(&dir));
    let stats_client = client.clone();
    actix_rt::System::new().block_on(async move {
        let tree = Tree::builder("store-test").child(spec).build().unwrap();
        let handle = tree.start().await.expect("the store starts");
        let setup = vec![open("a"), open("b")];
        assert_eq!(client.commit(setup).await.unwrap().applied, 2);

        let next_id = Arc::new(AtomicU64::new(1));
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let (client, next_id) = (client.clone(), next_id.clone());
                std::thread::spawn(move || {
                    for _ in 0..EACH {
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        let op = publish_to(id, 1, &[("a", 1), ("b", 1)]);
                        // Each thread waits for its reply: only other threads can fill a batch.
                        assert_eq!(client.commit(vec![op]).wait().unwrap().applied, 1);
                    }
                })
            })
            .collect();
        actix_rt::task::spawn_blocking(move || threads.into_iter().for_each(|t| t.join().unwrap()))
            .await
            .unwrap();

        let queued = client.read(|s| s.session("a").unwrap().queue().len());
        assert_eq!(queued.await.unwrap(), (THREADS * EACH) as usize);
        let report = handle.shutdown("test over").await;
        assert_eq!(report.find("store").unwrap().outcome, Outcome::Drained);
        // After the acknowledgement the store refuses, and says so.
        assert!(matches!(
            client.commit(vec![open("late")]).await,
            Err(StoreError::Closed)
        ));
    });
    let fsyncs = StoreStats::get(&stats_client.stats().fsyncs);
    let commits = THREADS * EACH + 1;
    assert!(
        fsyncs * 2 < commits,
        "{fsyncs} fsyncs for {commits} commits"
    );
    // The worker closed the store before acknowledging: the lock is free at once (no waiting).
    let store = open_store(&dir);
    assert_eq!(
        store.state().session("b").unwrap().queue().len(),
        (THREADS * EACH) as usize
    );
    assert_eq!(store.state().message_count(), (THREADS * EACH) as usize);
}

#[test]
fn an_unusable_data_dir_fails_the_start_naming_the_path() {
    let dir = TempDir::new("start-fails");
    fs::write(&dir.0, b"not a directory").unwrap();
    let (spec, _client) = spec("store", dir.config());
    let path = dir.0.display().to_string();
    actix_rt::System::new().block_on(async move {
        let tree = Tree::builder("store-test").child(spec).build().unwrap();
        let error = tree.start().await.unwrap_err().to_string();
        assert!(error.contains("store") && error.contains(&path), "{error}");
    });
    fs::remove_file(&dir.0).unwrap();
}
