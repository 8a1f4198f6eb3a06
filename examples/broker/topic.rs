//! MQTT 3.1.1 topic names, topic filters and the subscription index (OASIS standard, §4.7).
//!
//! # What it owns
//!
//! * [`TopicName`]: the topic a PUBLISH is sent to. Validated by [`TopicName::parse`]: non-empty,
//!   no wildcard (`+`, `#`), no U+0000, at most 65535 bytes of UTF-8 (the length prefix of an
//!   MQTT string is a `u16`).
//! * [`TopicFilter`]: what a SUBSCRIBE asks for. Validated by [`TopicFilter::parse`]: non-empty,
//!   no U+0000, at most 65535 bytes, `+` only as a whole level, `#` only as a whole level and only
//!   as the last one. [`TopicFilter::matches`] is the reference definition of matching.
//! * [`Subscriptions`]: who is subscribed to what, and [`Subscriptions::route`]: who gets a
//!   message published to a given topic, and at which QoS.
//!
//! # Matching
//!
//! Topics are split into levels at `/`; empty levels are levels (`/finance` has two: `""` and
//! `finance`). `+` matches exactly one level, empty included (`sport/+` matches `sport/` but not
//! `sport`). `#` matches the parent level and any number of child levels (`sport/#` matches
//! `sport`, `sport/tennis` and `sport/tennis/player1`; `#` alone matches every topic).
//!
//! **The `$` rule** (§4.7.2): topics starting with `$` (`$SYS/...`) are the server's own; a filter
//! whose *first* level is a wildcard (`#`, `+`, `+/...`) does not match them. A filter naming the
//! first level does: `$SYS/#` matches `$SYS/broker/load`, `$SYS/+` matches `$SYS/x`.
//!
//! # Why a trie
//!
//! A broker routes every publication, so the index is a trie keyed by filter level: each node has
//! literal children (a map from level to node), an optional `+` child, the clients whose filter
//! ends in `#` right below it and the clients whose filter ends at it. Routing a topic of `L`
//! levels walks the trie level by level, following at each node at most two children (the topic's
//! literal level and `+`) and collecting the `#` subscribers on the way. The work is bounded by
//! the trie nodes whose path matches a prefix of the topic — at most `L + 1` without `+` filters,
//! at most `2^(L + 1)` in the worst case of `+` at every level, and never more than the trie's
//! size — plus the size of the result. It does not grow with the number of subscriptions that do
//! *not* match: a million clients on `a/b/...` cost nothing to a publication on `x/y`. A
//! subscribe or unsubscribe is `O(L)` map operations (empty nodes are pruned on unsubscribe). A
//! per-client map of filters makes [`Subscriptions::remove_client`] cost `O(filters × L)` of that
//! client only.
//!
//! # One delivery, at the maximum QoS
//!
//! A client may hold several subscriptions matching one topic (`sport/#` at QoS 0 and
//! `sport/tennis` at QoS 2). §3.3.5 lets the server deliver once per matching subscription or once
//! with the maximum QoS of them; this broker delivers **once, at the highest QoS** — so
//! [`Subscriptions::route`] yields each client at most once, with the maximum granted QoS of its
//! matching subscriptions (the broker then caps it by the publication's own QoS).

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::Hash;
use std::ops::Bound;

/// The longest MQTT string: its length prefix is a `u16`.
pub const MAX_TOPIC_LEN: usize = 65_535;

/// Why a string is not a valid topic name (the topic of a PUBLISH).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicNameError {
    /// A topic name must be at least one character long (§4.7.3).
    Empty,
    /// Wildcards (`+`, `#`) are for filters only (§4.7.1); this is the byte offset of the first.
    Wildcard { at: usize },
    /// U+0000 is not allowed in MQTT strings (§1.5.3); this is its byte offset.
    Null { at: usize },
    /// Longer than 65535 bytes of UTF-8; this is the length.
    TooLong { len: usize },
    /// More than [`MAX_LEVELS`] levels; this is how many.
    TooDeep { levels: usize },
}

/// The most levels a topic name or filter may have. MQTT sets no limit; the broker does, because
/// the subscription trie is walked recursively and a topic of 65,535 `/` would exhaust the stack.
pub const MAX_LEVELS: usize = 128;

impl fmt::Display for TopicNameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "topic name is empty"),
            Self::Wildcard { at } => {
                write!(f, "topic name has a wildcard (+ or #) at byte {at}")
            }
            Self::Null { at } => write!(f, "topic name has a NUL character at byte {at}"),
            Self::TooDeep { levels } => {
                write!(f, "topic name has {levels} levels (at most {MAX_LEVELS})")
            }
            Self::TooLong { len } => {
                write!(
                    f,
                    "topic name is {len} bytes long (at most {MAX_TOPIC_LEN})"
                )
            }
        }
    }
}

impl std::error::Error for TopicNameError {}

/// Why a string is not a valid topic filter (the topic of a SUBSCRIBE or UNSUBSCRIBE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicFilterError {
    /// A topic filter must be at least one character long (§4.7.3).
    Empty,
    /// `#` shares its level with other characters (`sport/tennis#`); `level` counts from 0.
    HashNotAlone { level: usize },
    /// `#` is not the last level (`sport/#/ranking`); `level` counts from 0.
    HashNotLast { level: usize },
    /// `+` shares its level with other characters (`sport+`); `level` counts from 0.
    PlusNotAlone { level: usize },
    /// U+0000 is not allowed in MQTT strings (§1.5.3); this is its byte offset.
    Null { at: usize },
    /// Longer than 65535 bytes of UTF-8; this is the length.
    TooLong { len: usize },
    /// More than [`MAX_LEVELS`] levels; this is how many.
    TooDeep { levels: usize },
}

impl fmt::Display for TopicFilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => write!(f, "topic filter is empty"),
            Self::HashNotAlone { level } => {
                write!(f, "'#' must be a whole level, level {level} has more")
            }
            Self::HashNotLast { level } => {
                write!(f, "'#' must be the last level, it is level {level} of more")
            }
            Self::PlusNotAlone { level } => {
                write!(f, "'+' must be a whole level, level {level} has more")
            }
            Self::Null { at } => write!(f, "topic filter has a NUL character at byte {at}"),
            Self::TooDeep { levels } => {
                write!(f, "topic filter has {levels} levels (at most {MAX_LEVELS})")
            }
            Self::TooLong { len } => {
                write!(
                    f,
                    "topic filter is {len} bytes long (at most {MAX_TOPIC_LEN})"
                )
            }
        }
    }
}

impl std::error::Error for TopicFilterError {}

/// A valid topic name: where a message is published.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(String);

impl TopicName {
    /// Validates `s` as a topic name (§4.7.1, §4.7.3).
    pub fn parse(s: &str) -> Result<Self, TopicNameError> {
        if s.is_empty() {
            return Err(TopicNameError::Empty);
        }
        if s.len() > MAX_TOPIC_LEN {
            return Err(TopicNameError::TooLong { len: s.len() });
        }
        if let Some(at) = s.find(['+', '#']) {
            return Err(TopicNameError::Wildcard { at });
        }
        if let Some(at) = s.find('\0') {
            return Err(TopicNameError::Null { at });
        }
        let levels = s.split('/').count();
        if levels > MAX_LEVELS {
            return Err(TopicNameError::TooDeep { levels });
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The levels, split at `/` (empty levels included).
    pub fn levels(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Whether this is a server topic (`$SYS/...`), which wildcards at the first level skip.
    pub fn is_system(&self) -> bool {
        self.0.starts_with('$')
    }
}

// Ordered and hashed as its text, so maps keyed by names can be searched by `&str` ranges.
impl Borrow<str> for TopicName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The entries of `map` whose topic names match `filter`, looking only at the names that start
/// with its literal prefix (a retained message per topic can be many: a SUBSCRIBE to `a/b/+`
/// should not read those under `x/`).
pub fn matching<'a, V>(
    map: &'a BTreeMap<TopicName, V>,
    filter: &'a TopicFilter,
) -> impl Iterator<Item = (&'a TopicName, &'a V)> + 'a {
    let prefix = filter.literal_prefix();
    map.range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(move |(name, _)| name.as_str().starts_with(prefix))
        .filter(move |(name, _)| filter.matches(name))
}

/// A valid topic filter: what a client subscribes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter(String);

impl TopicFilter {
    /// Validates `s` as a topic filter (§4.7.1, §4.7.3).
    pub fn parse(s: &str) -> Result<Self, TopicFilterError> {
        if s.is_empty() {
            return Err(TopicFilterError::Empty);
        }
        if s.len() > MAX_TOPIC_LEN {
            return Err(TopicFilterError::TooLong { len: s.len() });
        }
        if let Some(at) = s.find('\0') {
            return Err(TopicFilterError::Null { at });
        }
        let count = s.split('/').count();
        if count > MAX_LEVELS {
            return Err(TopicFilterError::TooDeep { levels: count });
        }
        for (level, text) in s.split('/').enumerate() {
            if text.contains('#') {
                if text != "#" {
                    return Err(TopicFilterError::HashNotAlone { level });
                }
                if level + 1 != count {
                    return Err(TopicFilterError::HashNotLast { level });
                }
            }
            if text.contains('+') && text != "+" {
                return Err(TopicFilterError::PlusNotAlone { level });
            }
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The levels, split at `/` (empty levels included).
    pub fn levels(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The text every matching topic name starts with: the levels before the first wildcard
    /// (`a/b` for `a/b/+/c` and for `a/b/#` — which matches `a/b` itself; empty for `+/x`).
    pub fn literal_prefix(&self) -> &str {
        let end = self
            .0
            .split('/')
            .take_while(|level| !matches!(*level, "+" | "#"))
            .map(|level| level.len() + 1)
            .sum::<usize>();
        // The `/` after the last literal level, if any, is not part of every match.
        &self.0[..end.saturating_sub(1).min(self.0.len())]
    }

    /// Whether a message published to `name` matches this filter (§4.7.1, §4.7.2).
    ///
    /// This is the reference definition; [`Subscriptions::route`] must agree with it.
    pub fn matches(&self, name: &TopicName) -> bool {
        let mut filter = self.levels();
        let mut topic = name.levels();
        if name.is_system() && matches!(self.levels().next(), Some("+" | "#")) {
            return false;
        }
        loop {
            match (filter.next(), topic.next()) {
                // `#` matches the parent level and any number of children, so also "no more".
                (Some("#"), _) => return true,
                (Some(_), None) => return false,
                (None, t) => return t.is_none(),
                (Some("+"), Some(_)) => {}
                (Some(f), Some(t)) => {
                    if f != t {
                        return false;
                    }
                }
            }
        }
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One trie node: the filters that have the node's path as a prefix.
#[derive(Debug)]
struct Node<C> {
    /// Literal next levels.
    children: HashMap<String, Node<C>>,
    /// The `+` next level.
    plus: Option<Box<Node<C>>>,
    /// Clients whose filter is this node's path followed by `#`, with their QoS.
    hash: HashMap<C, u8>,
    /// Clients whose filter ends exactly at this node, with their QoS.
    exact: HashMap<C, u8>,
}

impl<C> Default for Node<C> {
    fn default() -> Self {
        Self {
            children: HashMap::new(),
            plus: None,
            hash: HashMap::new(),
            exact: HashMap::new(),
        }
    }
}

impl<C: Clone + Eq + Hash> Node<C> {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_empty()
            && self.exact.is_empty()
    }

    /// Removes `client`'s subscription on `levels` below this node; prunes nodes left empty.
    /// Returns whether there was one.
    fn remove(&mut self, levels: &[&str], client: &C) -> bool {
        match levels {
            [] => self.exact.remove(client).is_some(),
            ["#"] => self.hash.remove(client).is_some(),
            ["+", rest @ ..] => {
                let Some(plus) = self.plus.as_mut() else {
                    return false;
                };
                let removed = plus.remove(rest, client);
                if plus.is_empty() {
                    self.plus = None;
                }
                removed
            }
            [level, rest @ ..] => {
                let Some(child) = self.children.get_mut(*level) else {
                    return false;
                };
                let removed = child.remove(rest, client);
                if child.is_empty() {
                    self.children.remove(*level);
                }
                removed
            }
        }
    }

    /// Adds to `out` the subscribers below this node matching `levels` (the rest of the topic).
    /// `skip_wildcards` is set at the root for `$` topics.
    fn collect(&self, levels: &[&str], skip_wildcards: bool, out: &mut HashMap<C, u8>) {
        if !skip_wildcards {
            add_all(out, &self.hash);
        }
        let Some((level, rest)) = levels.split_first() else {
            add_all(out, &self.exact);
            return;
        };
        if let Some(child) = self.children.get(*level) {
            child.collect(rest, false, out);
        }
        if !skip_wildcards {
            if let Some(plus) = &self.plus {
                plus.collect(rest, false, out);
            }
        }
    }
}

/// Merges `subscribers` into `out`, keeping each client's maximum QoS.
fn add_all<C: Clone + Eq + Hash>(out: &mut HashMap<C, u8>, subscribers: &HashMap<C, u8>) {
    for (client, &qos) in subscribers {
        out.entry(client.clone())
            .and_modify(|q| *q = (*q).max(qos))
            .or_insert(qos);
    }
}

/// The subscription index: which client (`C`, its client id) is subscribed to which filter at
/// which QoS, and who gets a message published to a topic. See the module doc.
#[derive(Debug)]
pub struct Subscriptions<C> {
    root: Node<C>,
    /// Each client's filters, for [`Self::remove_client`] and [`Self::of_client`].
    by_client: HashMap<C, HashMap<TopicFilter, u8>>,
}

impl<C> Default for Subscriptions<C> {
    fn default() -> Self {
        Self {
            root: Node::default(),
            by_client: HashMap::new(),
        }
    }
}

impl<C: Clone + Eq + Hash> Subscriptions<C> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Subscribes `client` to `filter` at `qos` (0, 1 or 2), replacing an existing subscription
    /// to the same filter (§3.8.4). Returns the QoS of the one replaced, if any.
    pub fn subscribe(&mut self, client: C, filter: &TopicFilter, qos: u8) -> Option<u8> {
        assert!(qos <= 2, "QoS {qos} is not 0, 1 or 2");
        let mut node = &mut self.root;
        let mut levels = filter.levels();
        let subscribers = loop {
            match levels.next() {
                None => break &mut node.exact,
                Some("#") => break &mut node.hash,
                Some("+") => node = node.plus.get_or_insert_with(Box::default),
                Some(level) => node = node.children.entry(level.to_owned()).or_default(),
            }
        };
        let previous = subscribers.insert(client.clone(), qos);
        self.by_client
            .entry(client)
            .or_default()
            .insert(filter.clone(), qos);
        previous
    }

    /// Removes `client`'s subscription to `filter` (the exact filter, not the topics it covers).
    /// Returns whether it had one.
    pub fn unsubscribe(&mut self, client: &C, filter: &TopicFilter) -> bool {
        let Some(filters) = self.by_client.get_mut(client) else {
            return false;
        };
        if filters.remove(filter).is_none() {
            return false;
        }
        if filters.is_empty() {
            self.by_client.remove(client);
        }
        let levels: Vec<&str> = filter.levels().collect();
        let removed = self.root.remove(&levels, client);
        debug_assert!(removed, "the trie and the per-client index disagree");
        true
    }

    /// Removes all of `client`'s subscriptions (a clean session ending, or a session expiring).
    /// Returns how many there were.
    pub fn remove_client(&mut self, client: &C) -> usize {
        let Some(filters) = self.by_client.remove(client) else {
            return 0;
        };
        for filter in filters.keys() {
            let levels: Vec<&str> = filter.levels().collect();
            let removed = self.root.remove(&levels, client);
            debug_assert!(removed, "the trie and the per-client index disagree");
        }
        filters.len()
    }

    /// `client`'s subscriptions, filter → QoS.
    pub fn of_client(&self, client: &C) -> Option<&HashMap<TopicFilter, u8>> {
        self.by_client.get(client)
    }

    /// The number of clients with at least one subscription.
    pub fn clients(&self) -> usize {
        self.by_client.len()
    }

    /// Who gets a message published to `name`: each client with a matching subscription,
    /// once, with the maximum QoS of its matching subscriptions. In no particular order.
    pub fn route(&self, name: &TopicName) -> Vec<(C, u8)> {
        let levels: Vec<&str> = name.levels().collect();
        let mut out = HashMap::new();
        self.root.collect(&levels, name.is_system(), &mut out);
        out.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_deeper_than_the_limit_are_refused_not_walked() {
        let deep = "a/".repeat(MAX_LEVELS); // MAX_LEVELS + 1 levels (the last one empty)
        assert_eq!(
            TopicName::parse(&deep),
            Err(TopicNameError::TooDeep {
                levels: MAX_LEVELS + 1
            })
        );
        assert_eq!(
            TopicFilter::parse(&deep),
            Err(TopicFilterError::TooDeep {
                levels: MAX_LEVELS + 1
            })
        );
        let ok = "a/".repeat(MAX_LEVELS - 1) + "#";
        assert!(TopicFilter::parse(&ok).is_ok());
    }
    use proptest::prelude::*;

    fn name(s: &str) -> TopicName {
        TopicName::parse(s).unwrap()
    }

    fn filter(s: &str) -> TopicFilter {
        TopicFilter::parse(s).unwrap()
    }

    fn matches(f: &str, n: &str) -> bool {
        filter(f).matches(&name(n))
    }

    fn sorted(mut v: Vec<(&'static str, u8)>) -> Vec<(&'static str, u8)> {
        v.sort();
        v
    }

    #[test]
    fn topic_names() {
        assert_eq!(TopicName::parse(""), Err(TopicNameError::Empty));
        assert_eq!(
            TopicName::parse("a/+"),
            Err(TopicNameError::Wildcard { at: 2 })
        );
        assert_eq!(
            TopicName::parse("#"),
            Err(TopicNameError::Wildcard { at: 0 })
        );
        assert_eq!(
            TopicName::parse("a\0b"),
            Err(TopicNameError::Null { at: 1 })
        );
        let long = "a".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(
            TopicName::parse(&long),
            Err(TopicNameError::TooLong {
                len: MAX_TOPIC_LEN + 1
            })
        );
        assert!(TopicName::parse(&long[1..]).is_ok());
        // Empty levels and spaces are fine; "/" is a topic of two empty levels.
        for ok in ["/", "a//b", "/finance", "sport/", " ", "$SYS/x", "ü/日本"] {
            assert_eq!(name(ok).as_str(), ok);
        }
        assert_eq!(
            name("/finance").levels().collect::<Vec<_>>(),
            ["", "finance"]
        );
    }

    #[test]
    fn topic_filters() {
        assert_eq!(TopicFilter::parse(""), Err(TopicFilterError::Empty));
        // The spec's invalid examples (§4.7.1.2, §4.7.1.3).
        assert_eq!(
            TopicFilter::parse("sport/tennis#"),
            Err(TopicFilterError::HashNotAlone { level: 1 })
        );
        assert_eq!(
            TopicFilter::parse("sport/tennis/#/ranking"),
            Err(TopicFilterError::HashNotLast { level: 2 })
        );
        assert_eq!(
            TopicFilter::parse("sport/#/ranking"),
            Err(TopicFilterError::HashNotLast { level: 1 })
        );
        assert_eq!(
            TopicFilter::parse("sport+"),
            Err(TopicFilterError::PlusNotAlone { level: 0 })
        );
        assert_eq!(
            TopicFilter::parse("a/b+/c"),
            Err(TopicFilterError::PlusNotAlone { level: 1 })
        );
        assert_eq!(
            TopicFilter::parse("##"),
            Err(TopicFilterError::HashNotAlone { level: 0 })
        );
        assert_eq!(
            TopicFilter::parse("a/\0"),
            Err(TopicFilterError::Null { at: 2 })
        );
        assert!(matches!(
            TopicFilter::parse(&"a".repeat(MAX_TOPIC_LEN + 1)),
            Err(TopicFilterError::TooLong { .. })
        ));
        // The spec's valid examples.
        for ok in [
            "#",
            "sport/#",
            "sport/tennis/#",
            "+",
            "+/tennis/#",
            "sport/+/player1",
            "/+",
            "+/+",
            "/",
            "$SYS/#",
        ] {
            assert_eq!(filter(ok).as_str(), ok);
        }
    }

    #[test]
    fn spec_multi_level_wildcard() {
        // §4.7.1.2
        let f = "sport/tennis/player1/#";
        assert!(matches(f, "sport/tennis/player1"));
        assert!(matches(f, "sport/tennis/player1/ranking"));
        assert!(matches(f, "sport/tennis/player1/score/wimbledon"));
        assert!(!matches(f, "sport/tennis/player2"));
        assert!(!matches(f, "sport/tennis"));
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/#", "sport/"));
        assert!(!matches("sport/#", "sports"));
        assert!(matches("#", "sport/tennis"));
        assert!(matches("#", "/"));
    }

    #[test]
    fn spec_single_level_wildcard() {
        // §4.7.1.3
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(matches("sport/tennis/+", "sport/tennis/player2"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("+", "finance"));
        assert!(matches("+/tennis/#", "sport/tennis/player1"));
        assert!(matches("+/tennis/#", "sport/tennis"));
        assert!(!matches("+/tennis/#", "sport/golf"));
        // Literal levels are case sensitive and match exactly.
        assert!(!matches("ACCOUNTS", "Accounts"));
        assert!(matches("/", "/"));
        assert!(!matches("a", "a/"));
    }

    #[test]
    fn spec_dollar_topics() {
        // §4.7.2
        assert!(!matches("#", "$SYS"));
        assert!(!matches("#", "$SYS/monitor/Clients"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(!matches("+", "$SYS"));
        assert!(!matches("+/#", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/+", "$SYS/x"));
        // Only the first level counts: `$` further in is an ordinary character.
        assert!(matches("+/$x", "a/$x"));
        assert!(matches("a/+", "a/$x"));
        assert!(matches("#", "a/$x"));

        let mut subs = Subscriptions::new();
        subs.subscribe("all", &filter("#"), 0);
        subs.subscribe("plus", &filter("+/monitor/Clients"), 0);
        subs.subscribe("sys", &filter("$SYS/#"), 1);
        assert_eq!(subs.route(&name("$SYS/monitor/Clients")), vec![("sys", 1)]);
        assert_eq!(
            sorted(subs.route(&name("a/monitor/Clients"))),
            [("all", 0), ("plus", 0)]
        );
    }

    #[test]
    fn literal_prefixes() {
        for (f, prefix) in [
            ("a/b/+/c", "a/b"),
            ("a/b/#", "a/b"),
            ("a/b", "a/b"),
            ("+/x", ""),
            ("#", ""),
            ("/+", ""),
            ("a//+", "a/"),
            ("$SYS/#", "$SYS"),
        ] {
            assert_eq!(filter(f).literal_prefix(), prefix, "filter {f}");
        }
    }

    #[test]
    fn overlapping_subscriptions_are_delivered_once_at_the_maximum_qos() {
        let mut subs = Subscriptions::new();
        assert_eq!(subs.subscribe("c1", &filter("sport/#"), 0), None);
        assert_eq!(subs.subscribe("c1", &filter("sport/tennis/+"), 2), None);
        assert_eq!(
            subs.subscribe("c1", &filter("sport/tennis/player1"), 1),
            None
        );
        assert_eq!(subs.subscribe("c2", &filter("+/tennis/player1"), 1), None);
        assert_eq!(subs.subscribe("c2", &filter("#"), 0), None);
        assert_eq!(subs.subscribe("c3", &filter("sport/golf"), 2), None);

        assert_eq!(
            sorted(subs.route(&name("sport/tennis/player1"))),
            [("c1", 2), ("c2", 1)]
        );
        assert_eq!(
            sorted(subs.route(&name("sport/golf"))),
            [("c1", 0), ("c2", 0), ("c3", 2)]
        );
        assert_eq!(sorted(subs.route(&name("news"))), [("c2", 0)]);

        // Subscribing again to the same filter replaces the QoS (§3.8.4).
        assert_eq!(subs.subscribe("c1", &filter("sport/tennis/+"), 0), Some(2));
        assert_eq!(
            sorted(subs.route(&name("sport/tennis/player1"))),
            [("c1", 1), ("c2", 1)]
        );
        assert_eq!(subs.of_client(&"c1").unwrap().len(), 3);
    }

    #[test]
    fn unsubscribe_and_remove_client() {
        let mut subs = Subscriptions::new();
        subs.subscribe("c1", &filter("a/+"), 1);
        subs.subscribe("c1", &filter("a/#"), 0);
        subs.subscribe("c2", &filter("a/b"), 2);
        assert_eq!(subs.clients(), 2);

        // Unsubscribing is by exact filter, not by the topics it covers.
        assert!(!subs.unsubscribe(&"c1", &filter("a/b")));
        assert!(!subs.unsubscribe(&"nobody", &filter("a/b")));
        assert!(subs.unsubscribe(&"c1", &filter("a/+")));
        assert!(!subs.unsubscribe(&"c1", &filter("a/+")));
        assert_eq!(sorted(subs.route(&name("a/b"))), [("c1", 0), ("c2", 2)]);

        assert_eq!(subs.remove_client(&"c1"), 1);
        assert_eq!(subs.remove_client(&"c1"), 0);
        assert_eq!(subs.route(&name("a/b")), vec![("c2", 2)]);
        assert!(subs.route(&name("a")).is_empty());

        assert!(subs.unsubscribe(&"c2", &filter("a/b")));
        assert_eq!(subs.clients(), 0);
        // Every node was pruned.
        assert!(subs.root.is_empty());
    }

    fn level() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just("a"), Just("b"), Just(""), Just("$s")]
    }

    fn topic_name() -> impl Strategy<Value = TopicName> {
        // A single empty level is the empty string, which is not a topic.
        prop::collection::vec(level(), 1..5)
            .prop_filter("empty topic", |levels| levels != &[""])
            .prop_map(|levels| name(&levels.join("/")))
    }

    fn topic_filter() -> impl Strategy<Value = TopicFilter> {
        let filter_level = prop_oneof![3 => level(), 2 => Just("+")];
        (prop::collection::vec(filter_level, 0..4), any::<bool>()).prop_map(|(mut levels, hash)| {
            // A filter of one empty level would be the empty string; make it `#` or `/#`.
            if hash || levels.is_empty() || levels == [""] {
                levels.push("#");
            }
            filter(&levels.join("/"))
        })
    }

    #[derive(Debug, Clone)]
    enum Op {
        Subscribe(u8, TopicFilter, u8),
        Unsubscribe(u8, TopicFilter),
        RemoveClient(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..4u8, topic_filter(), 0..3u8).prop_map(|(c, f, q)| Op::Subscribe(c, f, q)),
            2 => (0..4u8, topic_filter()).prop_map(|(c, f)| Op::Unsubscribe(c, f)),
            1 => (0..4u8).prop_map(Op::RemoveClient),
        ]
    }

    proptest! {
        /// The trie routes exactly like a brute-force scan of every subscription with `matches`,
        /// taking each client's maximum QoS.
        #[test]
        fn route_equals_brute_force(
            ops in prop::collection::vec(op(), 0..40),
            names in prop::collection::vec(topic_name(), 1..10),
        ) {
            let mut subs = Subscriptions::new();
            let mut model: BTreeMap<(u8, TopicFilter), u8> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Subscribe(c, f, q) => {
                        let previous = model.insert((c, f.clone()), q);
                        prop_assert_eq!(subs.subscribe(c, &f, q), previous);
                    }
                    Op::Unsubscribe(c, f) => {
                        let had = model.remove(&(c, f.clone())).is_some();
                        prop_assert_eq!(subs.unsubscribe(&c, &f), had);
                    }
                    Op::RemoveClient(c) => {
                        let before = model.len();
                        model.retain(|(client, _), _| *client != c);
                        prop_assert_eq!(subs.remove_client(&c), before - model.len());
                    }
                }
            }
            for n in &names {
                let mut expected: BTreeMap<u8, u8> = BTreeMap::new();
                for ((c, f), &q) in &model {
                    if f.matches(n) {
                        let e = expected.entry(*c).or_insert(q);
                        *e = (*e).max(q);
                    }
                }
                let mut routed = subs.route(n);
                routed.sort();
                prop_assert_eq!(routed, expected.into_iter().collect::<Vec<_>>(), "topic {}", n);
            }
            // Removing what is left prunes the trie back to an empty root.
            for c in 0..4u8 {
                subs.remove_client(&c);
            }
            prop_assert!(subs.root.is_empty());
            prop_assert_eq!(subs.clients(), 0);
        }

        /// `matching` finds exactly what a scan of every name with `matches` finds.
        #[test]
        fn matching_equals_a_full_scan(
            names in prop::collection::vec(topic_name(), 0..20),
            f in topic_filter(),
        ) {
            let map: BTreeMap<TopicName, ()> = names.into_iter().map(|n| (n, ())).collect();
            let found: Vec<&TopicName> = matching(&map, &f).map(|(n, _)| n).collect();
            let scanned: Vec<&TopicName> = map.keys().filter(|n| f.matches(n)).collect();
            prop_assert_eq!(found, scanned, "filter {}", f);
        }

        /// `parse` never panics, and accepts exactly the strings it should.
        #[test]
        fn parse_total(s in "[ab/+#$\0]{0,8}") {
            let name_ok = !s.is_empty() && !s.contains(['+', '#', '\0']);
            prop_assert_eq!(TopicName::parse(&s).is_ok(), name_ok);
            let filter_ok = !s.is_empty()
                && !s.contains('\0')
                && {
                    let levels: Vec<&str> = s.split('/').collect();
                    levels.iter().enumerate().all(|(i, l)| {
                        (!l.contains('+') || *l == "+")
                            && (!l.contains('#') || (*l == "#" && i + 1 == levels.len()))
                    })
                };
            prop_assert_eq!(TopicFilter::parse(&s).is_ok(), filter_ok);
        }
    }
}
