//! The router: who is connected, who subscribes to what, the retained messages, and where each
//! publication goes.
//!
//! One actor owns all of it, so routing needs no locks and every decision is made in one order.
//! That order is also the store's: the router sends a publication's ops to the store *before* it
//! hands the message to connected subscribers, and a connection logs what it does with a stored
//! message (`Sent`, `Completed`) only after it got it, so the store always sees a message queued
//! before it sees it sent. The store is the truth for persistent sessions; the router keeps in
//! memory only what it needs to route (their subscriptions) and what clean sessions have.
//!
//! **Acknowledging publishers.** [`Route`] answers once the publications are durable for every
//! persistent session that gets them (the store's group commit), and once no connected subscriber
//! they went to is above its high-water mark — waiting at most [`HOLD_MAX`] for each, so a
//! subscriber that does not keep up paces nobody (see [`crate::outbox`]): the publisher's
//! connection sends PUBACK / PUBREC only then, and holds its further requests while answers are
//! outstanding (see [`crate::connection`]).
//!
//! **Quotas.** A connected session that does not keep up, over its quota, loses the new message
//! (`drop-new`: it is neither handed to its connection nor queued in the store for it) or its
//! connection drops its oldest unsent ones (`drop-oldest`); an offline one is held to it by the
//! store. Nobody else's traffic is refused or held for it (see [`crate::quota`]).
//!
//! **A store that cannot write** (a full disk): what needs the disk is refused before it is
//! routed — a QoS 1/2 publication for a persistent session or retained, a persistent CONNECT,
//! SUBSCRIBE or UNSUBSCRIBE ([`RouteError::NoDisk`]) — and everything else flows; QoS 0 goes to
//! connected subscribers only and replaces no retained message. The write that failed was undone
//! in the store, so the router reloads what it had applied ahead of it ([`Resync`]) and closes
//! the persistent sessions online; every second it asks the store to try a write again.
//!
//! **Expiry.** With `--persistent-client-expiration`, a persistent session offline for longer
//! is dropped on a timer, as a clean CONNECT would drop it; when it went offline is logged in the
//! store ([`Op::LastSeen`]), so a restart does not give it a new lease.
//!
//! **Takeover.** A CONNECT for a client id that is connected closes the old connection first
//! ([`ToConn::TakenOver`]); the new one is answered when the old one has reported
//! [`Disconnected`], after its last store ops, so the session the new one reads is complete.
//! CONNECTs that come while a takeover is under way wait behind it in the order they came, and
//! every one of them wins (MQTT-3.1.4-2): each is connected in turn — CONNACK 0, the session
//! handed over — and taken over at once by the next, which reads the session after it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_supervisor::{InFlight, Stopping, Worker};
use bytes::Bytes;
use tokio::sync::oneshot;

use crate::outbox::{ConnId, Deliver, Outbox, ToConn, HOLD_MAX};
use crate::quota::{Overflow, Quota};
use crate::store::{Delivery, Message, MsgId, Op, PacketId, Qos, State, StoreClient, StoreError};
use crate::topic::{self, Subscriptions, TopicFilter, TopicName};

const LOG: &str = "broker::router";

/// Why the router did not do what a connection asked. The request is not acknowledged (a
/// SUBSCRIBE gets failure return codes, a CONNECT return code 3), so the client asks again later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// It needs the disk, and the store cannot write now (typically: the disk is full).
    NoDisk,
    /// Anything else: the store failed or refused, or the router is gone.
    Failed(String),
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteError::NoDisk => write!(f, "it needs the disk, and the store cannot write now"),
            RouteError::Failed(why) => f.write_str(why),
        }
    }
}

impl From<&str> for RouteError {
    fn from(why: &str) -> Self {
        RouteError::Failed(why.to_owned())
    }
}

type Answer<T> = Pin<Box<dyn Future<Output = Result<T, RouteError>>>>;

/// A last will, published when its connection ends without DISCONNECT.
#[derive(Clone, Debug)]
pub struct Will {
    pub topic: TopicName,
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
}

/// A PUBLISH from a client, validated by its connection.
#[derive(Clone, Debug)]
pub struct Publication {
    pub topic: TopicName,
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
    /// The client's packet id (QoS 1, 2).
    pub pkid: PacketId,
}

/// A client connects (after CONNECT was validated).
#[derive(Message)]
#[rtype(result = "Result<Connected, RouteError>")]
pub struct Connect {
    pub client: String,
    pub clean: bool,
    pub outbox: Outbox,
}

/// The answer to [`Connect`].
pub struct Connected {
    pub session_present: bool,
    /// A persistent session's state, to resume from.
    pub restored: Option<Restored>,
}

/// What a persistent session is owed, read from the store when it connects.
#[derive(Default)]
pub struct Restored {
    /// Sent and not acknowledged: send again with DUP, under the same packet ids, in order.
    pub unacked: Vec<(PacketId, Deliver)>,
    /// QoS 2 whose PUBREC came: PUBREL is owed.
    pub released: Vec<PacketId>,
    /// Not sent yet.
    pub queue: Vec<Deliver>,
    /// Inbound QoS 2 packet ids received and not released by the client yet.
    pub inbound: BTreeSet<PacketId>,
}

/// Publications from one client, in the order it sent them. `reply` is answered once they may
/// be acknowledged (see the module docs). A reply channel rather than `send(..).await`: the
/// connection sends its next batch before this one is answered, in order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Route {
    pub from: String,
    pub publications: Vec<Publication>,
    pub reply: oneshot::Sender<Result<(), RouteError>>,
}

/// SUBSCRIBE, validated: the granted QoS is the requested one (the broker supports all three).
/// Answered once a persistent session's subscriptions are durable; the retained messages that
/// match are in the connection's mailbox by then.
#[derive(Message)]
#[rtype(result = "Result<(), RouteError>")]
pub struct Subscribe {
    pub client: String,
    pub filters: Vec<(TopicFilter, Qos)>,
}

#[derive(Message)]
#[rtype(result = "Result<(), RouteError>")]
pub struct Unsubscribe {
    pub client: String,
    pub filters: Vec<TopicFilter>,
}

/// A connection ended. `will` is its will if it must be published now.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnected {
    pub client: String,
    pub conn: ConnId,
    pub will: Option<Will>,
}

struct Online {
    conn: ConnId,
    outbox: Outbox,
    clean: bool,
}

/// A CONNECT waiting for the connection it takes over to end.
struct Parked {
    connect: Connect,
    reply: oneshot::Sender<Result<Connected, RouteError>>,
}

/// What the router reads from the store when it starts.
struct Loaded {
    next_id: MsgId,
    retained: Vec<Message>,
    sessions: Vec<StoredSession>,
}

/// A persistent session as the router loads it: its client id, its subscriptions, and when it
/// was last seen connected.
type StoredSession = (String, Vec<(String, Qos)>, Option<u64>);

/// The router's share of the broker's settings.
#[derive(Clone, Copy, Debug)]
pub struct RouterConfig {
    /// What may wait for one session (see [`crate::quota`]).
    pub quota: Quota,
    /// A persistent session offline longer than this is dropped (`None`: never).
    pub expiration: Option<Duration>,
}

pub struct Router {
    store: StoreClient,
    subscriptions: Subscriptions<String>,
    /// Keyed by the validated name, so a SUBSCRIBE matches without parsing every topic again.
    retained: BTreeMap<TopicName, Arc<Message>>,
    online: HashMap<String, Online>,
    /// Every persistent session, connected or not.
    persistent: HashSet<String>,
    parked: HashMap<String, VecDeque<Parked>>,
    next_id: MsgId,
    work: InFlight,
    /// Its own address, for the futures that find the store disagreeing (see `commit_checked`).
    me: Option<Addr<Router>>,
    /// Told to stop for a restart.
    restarting: bool,
    config: RouterConfig,
    /// Persistent sessions not connected, and since when (Unix milliseconds): for expiry.
    offline_since: HashMap<String, u64>,
    /// Commits sent through [`commit_checked`](Self::commit_checked), numbered from 0.
    commits: std::cell::Cell<u64>,
    /// The last reload read the store after every commit numbered below this …
    synced_through: u64,
    /// … and after this many failed writes had been undone.
    synced_undone: u64,
    /// QoS 2 packet ids of persistent publishers routed and then undone by a failed write:
    /// logged again when the publisher comes back, so a PUBLISH it sends again is not routed a
    /// second time to a subscriber that got it already.
    undone_inbound: HashMap<String, BTreeSet<PacketId>>,
}

impl Router {
    pub fn new(store: StoreClient, config: RouterConfig) -> Router {
        Router {
            config,
            offline_since: HashMap::new(),
            commits: std::cell::Cell::new(0),
            synced_through: 0,
            synced_undone: 0,
            undone_inbound: HashMap::new(),
            store,
            subscriptions: Subscriptions::new(),
            retained: BTreeMap::new(),
            online: HashMap::new(),
            persistent: HashSet::new(),
            parked: HashMap::new(),
            next_id: 0,
            work: InFlight::new(),
            me: None,
            restarting: false,
        }
    }

    /// Puts retained messages, persistent sessions and their subscriptions back to what the
    /// store has, after a write that failed undid what the router had applied before the store
    /// answered. Persistent sessions online are closed: their connections hold deliveries and
    /// packet ids the store has forgotten; they resume from what it has when they come back.
    /// Clean sessions and their subscriptions are untouched.
    fn reload(&mut self, loaded: Loaded) {
        let persistent = std::mem::take(&mut self.persistent);
        for client in &persistent {
            self.subscriptions.remove_client(client);
        }
        for (client, online) in &self.online {
            if !online.clean {
                online
                    .outbox
                    .send(ToConn::Evict("the store could not write what it was sent"));
                log::debug!(target: LOG, "client `{client}`: closed, its session reloaded");
            }
        }
        self.retained.clear();
        self.offline_since.clear();
        let next_id = self.next_id;
        self.load(loaded);
        // Ids handed out since the last durable one may be in connections' hands: never again.
        self.next_id = self.next_id.max(next_id);
        for client in self.online.keys() {
            self.offline_since.remove(client);
        }
    }

    fn load(&mut self, loaded: Loaded) {
        self.next_id = loaded.next_id;
        for msg in loaded.retained {
            match TopicName::parse(&msg.topic) {
                Ok(name) => {
                    self.retained.insert(name, Arc::new(msg));
                }
                Err(e) => log::warn!(
                    target: LOG,
                    "stored retained topic `{}` is invalid ({e}); skipped",
                    msg.topic
                ),
            }
        }
        let sessions = loaded.sessions.len();
        let now = unix_millis();
        for (client, filters, last_seen) in loaded.sessions {
            // Away since it was last seen, or — if that was never logged (its connection was
            // cut by a crash) — from now.
            self.offline_since
                .insert(client.clone(), last_seen.unwrap_or(now));
            for (filter, qos) in filters {
                match TopicFilter::parse(&filter) {
                    Ok(filter) => {
                        self.subscriptions
                            .subscribe(client.clone(), &filter, qos.min(2));
                    }
                    Err(e) => log::warn!(
                        target: LOG,
                        "session `{client}`: stored filter `{filter}` is invalid ({e}); skipped"
                    ),
                }
            }
            self.persistent.insert(client);
        }
        log::info!(
            target: LOG,
            "loaded {sessions} persistent sessions and {} retained messages",
            self.retained.len()
        );
    }

    fn connect(&mut self, connect: Connect, reply: oneshot::Sender<Result<Connected, RouteError>>) {
        if self.online.contains_key(&connect.client) {
            // Behind the takeovers already under way for this client id, if any: CONNECTs are
            // answered in the order they came. The connection online is told again even if a
            // takeover is under way: that is how one whose task is gone is found.
            let client = connect.client.clone();
            self.parked
                .entry(client.clone())
                .or_default()
                .push_back(Parked { connect, reply });
            self.take_over(&client);
            return;
        }
        let Connect {
            client,
            clean,
            outbox,
        } = connect;
        let existed = self.persistent.contains(&client);
        if (!clean || existed) && !self.store.disk_ok() {
            // A persistent session lives on the disk (resuming one logs what it is sent), and
            // dropping one is a write too: refused with "server unavailable" until it can write.
            let _ = reply.send(Err(RouteError::NoDisk));
            return;
        }
        self.offline_since.remove(&client);
        let mut ops = Vec::new();
        if clean {
            if existed {
                self.subscriptions.remove_client(&client);
                self.persistent.remove(&client);
                ops.push(Op::DropSession {
                    client: client.clone(),
                });
            }
        } else {
            // Also for a session that exists: connected, it forgets when it was last seen, so a
            // crash while it is connected does not leave it an old expiry.
            self.persistent.insert(client.clone());
            ops.push(Op::OpenSession {
                client: client.clone(),
            });
            // What a failed write undid of its QoS 2 publications (already routed) is logged
            // again before the session is read, so it resumes knowing those packet ids.
            for pkid in self.undone_inbound.remove(&client).into_iter().flatten() {
                ops.push(Op::InboundReceived {
                    client: client.clone(),
                    pkid,
                });
            }
        }
        if clean {
            self.undone_inbound.remove(&client);
        }
        let committed = (!ops.is_empty()).then(|| self.commit_checked(ops));
        let restored = (!clean).then(|| {
            self.store.set_online(&client, true);
            let name = client.clone();
            self.store.read(move |state| restore(state, &name))
        });
        self.online.insert(
            client,
            Online {
                conn: outbox.conn,
                outbox,
                clean,
            },
        );
        let session_present = !clean && existed;
        actix::spawn(self.work.track(async move {
            let answer = async {
                if let Some(committed) = committed {
                    committed.await?;
                }
                let restored = match restored {
                    Some(read) => Some(read.await.map_err(RouteError::from)?),
                    None => None,
                };
                Ok(Connected {
                    session_present,
                    restored,
                })
            };
            let _ = reply.send(answer.await);
        }));
    }

    /// Routes publications; returns what to wait for before they may be acknowledged: their
    /// commit, and the subscribers they left congested (each for at most [`HOLD_MAX`]).
    fn route(&mut self, from: &str, publications: Vec<Publication>) -> Answer<()> {
        let from_conn = self.online.get(from).map(|o| o.conn);
        let from_conn = from_conn.unwrap_or(ConnId::MAX);
        let mut ops = Vec::new();
        let mut must_wait = false;
        let mut congested: Vec<(String, Outbox)> = Vec::new();
        let from_persistent = self.persistent.contains(from);
        let disk = self.store.disk_ok();
        let mut refused = None;
        let mut inbound = Vec::new();
        for publication in publications {
            let qos = publication.qos;
            let pkid = publication.pkid;
            if !disk && qos > 0 && self.needs_disk(&publication, from_persistent) {
                // Not this one, nor those behind it: none is acknowledged, the client sends
                // them again.
                refused = Some(RouteError::NoDisk);
                break;
            }
            let (op, full) = self.route_one(publication, disk);
            if let Some(op) = op {
                must_wait |= qos > 0;
                ops.push(op);
            }
            for (client, outbox) in full {
                // Never hold a publisher on its own backlog: its connection would hold the very
                // requests behind which it might stop reading the acknowledgements that shrink it.
                if outbox.conn != from_conn && !congested.iter().any(|(_, o)| o.conn == outbox.conn)
                {
                    congested.push((client, outbox));
                }
            }
            // (A will has no packet id: nobody sends it again.)
            if qos == 2 && from_persistent && pkid != 0 {
                // Recorded with the publication, so a PUBLISH sent again after a crash is not
                // routed twice.
                ops.push(Op::InboundReceived {
                    client: from.to_owned(),
                    pkid,
                });
                inbound.push(pkid);
                must_wait = true;
            }
        }
        let mut committed = (!ops.is_empty()).then(|| self.commit_checked(ops));
        if !must_wait {
            // Nobody to acknowledge waits for it; its outcome is still checked.
            if let Some(committed) = committed.take() {
                actix::spawn(self.work.track(async move {
                    let _ = committed.await;
                }));
            }
        }
        let (me, from) = (self.me.clone(), from.to_owned());
        Box::pin(self.work.track(async move {
            if let Some(committed) = committed {
                if let Err(e) = committed.await {
                    if let (RouteError::NoDisk, Some(me)) = (&e, me) {
                        if !inbound.is_empty() {
                            // Routed, and not recorded: the publisher will send them again.
                            me.do_send(UndoneInbound {
                                client: from,
                                pkids: inbound,
                            });
                        }
                    }
                    return Err(e);
                }
            }
            if let Some(refused) = refused {
                return Err(refused);
            }
            // One deadline for all: a publisher waits at most HOLD_MAX however many
            // subscribers it left congested.
            let until = tokio::time::Instant::now() + HOLD_MAX;
            for (client, outbox) in congested {
                if outbox.backlog.hold_until(until).await {
                    log::warn!(
                        target: LOG,
                        "client `{client}` does not keep up ({} messages waiting for it after \
                         {HOLD_MAX:?}): publishers are no longer held for it until it catches up",
                        outbox.backlog.level().0
                    );
                }
            }
            Ok(())
        }))
    }

    /// Whether a connected session takes one more message of `size` bytes. Not keeping up and
    /// over its quota with [`Overflow::DropNew`], it does not: the message is dropped for it
    /// (counted, logged once per episode) and for nobody else. With [`Overflow::DropOldest`] it always does: its
    /// connection drops its oldest unsent messages instead.
    fn admits(&self, client: &str, outbox: &Outbox, size: u64) -> bool {
        let quota = &self.config.quota;
        if quota.overflow == Overflow::DropOldest || outbox.backlog.admits(quota, size) {
            return true;
        }
        outbox.backlog.mark_over();
        self.store.stats().drops.dropped(client, 1, quota, false);
        false
    }

    /// Whether a QoS 1/2 publication needs the disk: it is retained, its QoS 2 packet id is
    /// recorded for a persistent publisher, or a persistent session gets it at QoS 1/2.
    fn needs_disk(&self, publication: &Publication, from_persistent: bool) -> bool {
        publication.retain
            || (publication.qos == 2 && from_persistent && publication.pkid != 0)
            || self
                .subscriptions
                .route(&publication.topic)
                .into_iter()
                .any(|(client, granted)| granted > 0 && self.persistent.contains(&client))
    }

    /// Hands one publication to its connected subscribers; returns the store op it needs (if
    /// any) and the subscribers it left congested. Without the `disk`, only QoS 0 comes here
    /// with a need for it: its connected subscribers get it, offline sessions do not, and a
    /// retained one does not replace the retained message (at most once allows both).
    fn route_one(
        &mut self,
        publication: Publication,
        disk: bool,
    ) -> (Option<Op>, Vec<(String, Outbox)>) {
        let id = self.next_id;
        self.next_id += 1;
        let Publication {
            topic,
            payload,
            qos,
            retain,
            ..
        } = publication;
        let msg = Arc::new(Message {
            id,
            topic: topic.as_str().to_owned(),
            payload,
            qos,
            retain,
        });
        let size = msg.size();
        if retain && disk {
            if msg.payload.is_empty() {
                self.retained.remove(&topic);
            } else {
                self.retained.insert(topic.clone(), msg.clone());
            }
        }
        let mut to = Vec::new();
        let mut congested = Vec::new();
        for (client, granted) in self.subscriptions.route(&topic) {
            let qos = granted.min(qos);
            let online = self.online.get(&client);
            if let Some(online) = online {
                if !self.admits(&client, &online.outbox, size) {
                    continue;
                }
            }
            let stored = disk && self.persistent.contains(&client) && (qos > 0 || online.is_none());
            if stored {
                to.push(Delivery {
                    client: client.clone(),
                    qos,
                });
            }
            if let Some(online) = online {
                let deliver = Deliver {
                    msg: msg.clone(),
                    qos,
                    retain: false,
                    stored,
                };
                if online.outbox.deliver(deliver) {
                    congested.push((client, online.outbox.clone()));
                }
            }
        }
        let op = (!to.is_empty() || (retain && disk)).then(|| Op::Publish {
            msg: (*msg).clone(),
            to,
        });
        (op, congested)
    }

    fn subscribe(&mut self, client: String, filters: Vec<(TopicFilter, Qos)>) -> Answer<()> {
        let persistent = self.persistent.contains(&client);
        if persistent && !self.store.disk_ok() {
            return Box::pin(async { Err(RouteError::NoDisk) });
        }
        let mut ops = Vec::new();
        let mut retained = Vec::new();
        for (filter, qos) in filters {
            self.subscriptions.subscribe(client.clone(), &filter, qos);
            if persistent {
                ops.push(Op::Subscribe {
                    client: client.clone(),
                    filter: filter.as_str().to_owned(),
                    qos,
                });
            }
            // MQTT-3.3.1-6: the retained messages matching a new subscription go to it.
            for (_, msg) in topic::matching(&self.retained, &filter) {
                retained.push((msg.clone(), qos.min(msg.qos)));
            }
        }
        if let Some(online) = self.online.get(&client) {
            for (msg, qos) in retained {
                if !self.admits(&client, &online.outbox, msg.size()) {
                    continue;
                }
                let stored = persistent && qos > 0;
                if stored {
                    ops.push(Op::Enqueue {
                        client: client.clone(),
                        msg: msg.id,
                        qos,
                        retain: true,
                    });
                }
                online.outbox.deliver(Deliver {
                    msg,
                    qos,
                    retain: true,
                    stored,
                });
            }
        }
        self.commit_and_wait(ops)
    }

    fn unsubscribe(&mut self, client: String, filters: Vec<TopicFilter>) -> Answer<()> {
        let persistent = self.persistent.contains(&client);
        if persistent && !self.store.disk_ok() {
            return Box::pin(async { Err(RouteError::NoDisk) });
        }
        let mut ops = Vec::new();
        for filter in filters {
            self.subscriptions.unsubscribe(&client, &filter);
            if persistent {
                ops.push(Op::Unsubscribe {
                    client: client.clone(),
                    filter: filter.as_str().to_owned(),
                });
            }
        }
        self.commit_and_wait(ops)
    }

    fn commit_and_wait(&mut self, ops: Vec<Op>) -> Answer<()> {
        if ops.is_empty() {
            return Box::pin(async { Ok(()) });
        }
        let committed = self.commit_checked(ops);
        Box::pin(self.work.track(committed))
    }

    /// Commits `ops`; the answer is an error when the store failed or refused an op. A refused
    /// op is a broker bug: the router's memory (its retained messages, who is persistent) and
    /// the store disagree, so the router stops itself to be restarted — with the sessions and
    /// the listener, rest-for-one — and reloads from the store.
    ///
    /// A commit that was not made (undone by a failed write, or refused because writes fail)
    /// leaves the router's memory ahead of the store — it applies before the store answers — so
    /// the router reloads from the store ([`Resync`]), once for every commit sent before it.
    fn commit_checked(&self, ops: Vec<Op>) -> impl Future<Output = Result<(), RouteError>> {
        let seq = self.commits.get();
        self.commits.set(seq + 1);
        let committed = self.store.commit(ops);
        let me = self.me.clone();
        async move {
            let commit = committed.await.map_err(|e| {
                if let (StoreError::WriteFailed(_) | StoreError::NoDisk(_), Some(me)) = (&e, &me) {
                    me.do_send(Resync { after: Some(seq) });
                }
                RouteError::from(e)
            })?;
            match commit.rejected {
                None => Ok(()),
                Some(rejected) => {
                    log::error!(
                        target: LOG,
                        "the store refused an op ({rejected:?}): the router's memory and the \
                         store disagree; restarting the router to reload from the store"
                    );
                    if let Some(me) = me {
                        me.do_send(Reload);
                    }
                    Err(RouteError::Failed(format!(
                        "the store refused an op: {rejected:?}"
                    )))
                }
            }
        }
    }

    fn disconnected(&mut self, msg: Disconnected) {
        let Disconnected { client, conn, will } = msg;
        match self.online.get(&client) {
            Some(online) if online.conn == conn => {
                let online = self.online.remove(&client);
                let clean = online.is_some_and(|o| o.clean);
                let at = unix_millis();
                if !self.persistent.contains(&client) {
                    if clean {
                        self.subscriptions.remove_client(&client);
                    }
                } else if clean {
                    // A clean CONNECT whose drop of the persistent session was not made (the
                    // disk failed): the session, reloaded, is as it was, and offline.
                    self.offline_since.insert(client.clone(), at);
                } else {
                    self.store.set_online(&client, false);
                    self.offline_since.insert(client.clone(), at);
                    if self.store.disk_ok() {
                        // Logged so that expiry survives a restart; nobody waits for it (a
                        // session never logged goes away from the router's next start on).
                        drop(self.store.commit(vec![Op::LastSeen {
                            client: client.clone(),
                            at,
                        }]));
                    }
                }
            }
            _ => {}
        }
        if let Some(will) = will {
            log::debug!(target: LOG, "client `{client}`: publishing its will on `{}`", will.topic.as_str());
            let answer = self.route(
                &client,
                vec![Publication {
                    topic: will.topic,
                    payload: will.payload,
                    qos: will.qos,
                    retain: will.retain,
                    pkid: 0,
                }],
            );
            // Nobody to acknowledge; the work is tracked so the drain waits for it.
            let from = client.clone();
            actix::spawn(async move {
                if let Err(e) = answer.await {
                    log::warn!(target: LOG, "client `{from}`: its will was not stored: {e}");
                }
            });
        }
        self.resume_parked(&client);
    }

    /// Drops the persistent sessions offline for longer than `expiration`
    /// (`--persistent-client-expiration`), as a clean CONNECT would.
    fn expire(&mut self, expiration: Duration) {
        if !self.store.disk_ok() {
            // Dropping a session is a write: it waits, and so does the session.
            return;
        }
        let now = unix_millis();
        let limit = u64::try_from(expiration.as_millis()).unwrap_or(u64::MAX);
        let expired: Vec<String> = self
            .offline_since
            .iter()
            .filter(|(client, since)| {
                now.saturating_sub(**since) >= limit
                    && !self.online.contains_key(*client)
                    && !self.parked.contains_key(*client)
            })
            .map(|(client, _)| client.clone())
            .collect();
        if expired.is_empty() {
            return;
        }
        let mut ops = Vec::with_capacity(expired.len());
        for client in expired {
            let away = now.saturating_sub(self.offline_since.remove(&client).unwrap_or(now));
            self.subscriptions.remove_client(&client);
            self.persistent.remove(&client);
            self.undone_inbound.remove(&client);
            self.store.stats().drops.ended(&client);
            log::info!(
                target: LOG,
                "session `{client}` expired: offline for {:?}, more than \
                 --persistent-client-expiration {expiration:?}",
                Duration::from_millis(away)
            );
            ops.push(Op::DropSession { client });
        }
        self.store
            .stats()
            .expired
            .fetch_add(ops.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let committed = self.commit_checked(ops);
        actix::spawn(self.work.track(async move {
            let _ = committed.await;
        }));
    }

    /// Tells the connection online for `client` to close, for the CONNECTs parked behind it
    /// (its own log line says it was taken over). One whose task has ended cannot answer: its
    /// `Disconnected` is still on its way, or never comes (cancelled with a previous sessions
    /// supervisor before it knew it was connected). It is taken as disconnected now, which
    /// connects the next one; whatever it sent to the store went before its mailbox closed, so
    /// the next one still reads the session after its last op.
    fn take_over(&mut self, client: &str) {
        let Some(old) = self.online.get(client) else {
            return;
        };
        let conn = old.conn;
        let waiting = self.parked.get(client).map_or(0, VecDeque::len);
        if old.outbox.send(ToConn::TakenOver) {
            log::debug!(
                target: LOG,
                "client `{client}`: connection {conn} is taken over ({waiting} CONNECTs waiting)"
            );
        } else {
            self.disconnected(Disconnected {
                client: client.to_owned(),
                conn,
                will: None,
            });
        }
    }

    /// Connects the oldest CONNECT parked for `client` once nobody is online for it. Every
    /// parked CONNECT wins in turn, in the order they came (MQTT-3.1.4-2 holds for each): the
    /// one connected here is taken over at once by the next one parked, which is connected when
    /// this one has reported [`Disconnected`] — so each connection of the chain reads the
    /// session after the previous one's last store ops.
    fn resume_parked(&mut self, client: &str) {
        if self.online.contains_key(client) {
            return;
        }
        // A CONNECT refused (the disk cannot take its session) leaves nobody online: the next
        // one is tried.
        while !self.online.contains_key(client) {
            let Some(queue) = self.parked.get_mut(client) else {
                return;
            };
            let next = queue.pop_front();
            if queue.is_empty() {
                self.parked.remove(client);
            }
            let Some(parked) = next else {
                return;
            };
            if parked.reply.is_closed() {
                // Its connection is gone (cancelled while it waited): nobody to connect.
                continue;
            }
            self.connect(parked.connect, parked.reply);
        }
        if self.parked.contains_key(client) {
            self.take_over(client);
        }
    }
}

/// A persistent session's state as a connection resumes it.
fn restore(state: &State, client: &str) -> Restored {
    let Some(session) = state.session(client) else {
        return Restored::default();
    };
    let body = |id: MsgId| state.message(id).map(|m| Arc::new(m.clone()));
    let unacked = session
        .unacked()
        .iter()
        .filter_map(|u| {
            let msg = body(u.msg)?;
            let deliver = Deliver {
                msg,
                qos: u.qos,
                retain: false,
                stored: true,
            };
            Some((u.pkid, deliver))
        })
        .collect();
    let queue = session
        .queue()
        .iter()
        .filter_map(|q| {
            Some(Deliver {
                msg: body(q.msg)?,
                qos: q.qos,
                retain: q.retain,
                stored: true,
            })
        })
        .collect();
    Restored {
        unacked,
        released: session.released().to_vec(),
        queue,
        inbound: session.inbound().clone(),
    }
}

/// Now, in milliseconds since the Unix epoch (0 if the clock is before it).
fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl From<StoreError> for RouteError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::WriteFailed(_) | StoreError::NoDisk(_) => RouteError::NoDisk,
            e => RouteError::Failed(format!("the store failed: {e}")),
        }
    }
}

/// What the router reads from the store when it starts (or reloads).
fn read_loaded(store: &StoreClient) -> crate::store::Reply<Loaded> {
    store.read(|state| Loaded {
        next_id: state.next_message_id(),
        retained: state.all_retained().cloned().collect(),
        sessions: state
            .sessions()
            .map(|(client, s)| {
                let filters = s
                    .subscriptions()
                    .iter()
                    .map(|(f, q)| (f.clone(), *q))
                    .collect();
                (client.to_owned(), filters, state.last_seen(client))
            })
            .collect(),
    })
}

/// The store did not make a commit the router had already applied (`after`: the commit's
/// number), or undid writes of others (the connections') — `after: None`: read back what is
/// durable (see [`Router::reload`]). One reload covers every commit sent before it and every
/// write undone before it, so the others asking for the same failure are not reloaded again.
#[derive(Message)]
#[rtype(result = "()")]
struct Resync {
    after: Option<u64>,
}

impl Handler<Resync> for Router {
    type Result = ();

    fn handle(&mut self, resync: Resync, ctx: &mut Context<Self>) {
        let undone = self.store.stats().disk.undone();
        let stale = resync.after.is_some_and(|seq| seq >= self.synced_through);
        if !stale && undone == self.synced_undone {
            return;
        }
        self.synced_undone = undone;
        self.synced_through = self.commits.get();
        log::info!(
            target: LOG,
            "the store undid a write it could not make: reloading retained messages and \
             persistent sessions from it"
        );
        // Nothing is routed on what the store undid while the read is under way.
        ctx.wait(read_loaded(&self.store).into_actor(self).map(
            |loaded, router, ctx| match loaded {
                Ok(loaded) => router.reload(loaded),
                Err(e) => {
                    log::error!(target: LOG, "cannot read the store: {e}; restarting");
                    ctx.stop();
                }
            },
        ));
    }
}

/// QoS 2 packet ids of `client` that were routed in a commit the store did not make.
#[derive(Message)]
#[rtype(result = "()")]
struct UndoneInbound {
    client: String,
    pkids: Vec<PacketId>,
}

impl Handler<UndoneInbound> for Router {
    type Result = ();

    fn handle(&mut self, undone: UndoneInbound, _: &mut Context<Self>) {
        // Only a persistent session resumes its packet ids; a clean one forgets them anyway.
        if self.persistent.contains(&undone.client) {
            self.undone_inbound
                .entry(undone.client)
                .or_default()
                .extend(undone.pkids);
        }
    }
}

/// Tells the router to stop, so that the tree restarts it from what the store has.
#[derive(Message)]
#[rtype(result = "()")]
struct Reload;

impl Handler<Reload> for Router {
    type Result = ();

    fn handle(&mut self, _: Reload, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Actor for Router {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.me = Some(ctx.address());
        // Nothing is routed before the persistent sessions and retained messages are back.
        self.store.nobody_online();
        let read = read_loaded(&self.store);
        // While the store cannot write, it is asked to try every second. A failed write undoes
        // what connections logged too (packet ids, deliveries): a tick that finds a write undone
        // since the last reload reloads, closing the persistent sessions.
        ctx.run_interval(Duration::from_secs(1), |router, ctx| {
            if router.store.stats().disk.undone() != router.synced_undone {
                ctx.notify(Resync { after: None });
            }
            if !router.store.disk_ok() {
                router.store.probe();
            }
        });
        if let Some(expiration) = self.config.expiration {
            // Often enough that a session goes within a quarter of its expiration of its time.
            let every = (expiration / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
            ctx.run_interval(every, move |router, _| router.expire(expiration));
        }
        ctx.wait(
            read.into_actor(self)
                .map(|loaded, router, ctx| match loaded {
                    Ok(loaded) => router.load(loaded),
                    Err(e) => {
                        log::error!(target: LOG, "cannot read the store: {e}");
                        ctx.stop();
                    }
                }),
        );
    }
}

impl Worker for Router {
    fn on_stopping(&mut self, _: &mut Context<Self>, stopping: &Stopping) {
        self.restarting = stopping.restarting();
    }

    fn in_flight(&self) -> Option<&InFlight> {
        // In a restart the store is restarting too (its failure is the likely cause): the work
        // in flight waits for its answers, which the next store instance gives only once this
        // router is gone. Nobody waits for that work either — the connections are closed — so
        // the drain does not wait for it (it finishes, or fails, on its own).
        (!self.restarting).then_some(&self.work)
    }
}

impl Handler<Connect> for Router {
    type Result = ResponseFuture<Result<Connected, RouteError>>;

    fn handle(&mut self, connect: Connect, _: &mut Context<Self>) -> Self::Result {
        let (reply, answer) = oneshot::channel();
        self.connect(connect, reply);
        Box::pin(async move {
            answer
                .await
                .unwrap_or_else(|_| Err("the router stopped".into()))
        })
    }
}

impl Handler<Route> for Router {
    type Result = ();

    fn handle(&mut self, route: Route, _: &mut Context<Self>) {
        let answer = self.route(&route.from, route.publications);
        let reply = route.reply;
        actix::spawn(async move {
            let _ = reply.send(answer.await);
        });
    }
}

impl Handler<Subscribe> for Router {
    type Result = ResponseFuture<Result<(), RouteError>>;

    fn handle(&mut self, msg: Subscribe, _: &mut Context<Self>) -> Self::Result {
        self.subscribe(msg.client, msg.filters)
    }
}

impl Handler<Unsubscribe> for Router {
    type Result = ResponseFuture<Result<(), RouteError>>;

    fn handle(&mut self, msg: Unsubscribe, _: &mut Context<Self>) -> Self::Result {
        self.unsubscribe(msg.client, msg.filters)
    }
}

impl Handler<Disconnected> for Router {
    type Result = ();

    fn handle(&mut self, msg: Disconnected, _: &mut Context<Self>) {
        self.disconnected(msg);
    }
}
