//! Topic names, topic filters and the two indexes built on them: subscriptions (which
//! connections want a published topic) and retained messages (which retained topics a new
//! subscription matches).
//!
//! Both indexes keep exact names in a hash map (one lookup whatever the number of entries) and
//! only wildcard filters, or the topics a wildcard subscription walks, in a trie of levels, so a
//! publish costs one hash lookup plus a walk of at most (levels × wildcard branches) trie nodes,
//! never a scan of all subscriptions.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

/// A topic name a client may publish to: not empty, no wildcard, no NUL (UTF-8 is checked by the
/// codec).
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// A topic filter: not empty, no NUL, `+` only as a whole level, `#` only as the whole last level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

/// A client id the broker accepts in strict mode: not empty, no `+`, `#`, `/`, no control
/// characters.
pub fn valid_client_id(id: &str) -> bool {
    !id.is_empty()
        && !id
            .chars()
            .any(|c| matches!(c, '+' | '#' | '/') || c.is_control())
}

fn is_wildcard(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

/// Subscriptions: filter → (subscriber → granted QoS).
#[derive(Debug)]
pub struct SubIndex<K> {
    exact: HashMap<String, HashMap<K, u8>>,
    wild: FilterNode<K>,
    len: usize,
}

#[derive(Debug)]
struct FilterNode<K> {
    /// Next levels; `+` and `#` are children like any other level (topic names cannot
    /// contain them).
    children: HashMap<String, FilterNode<K>>,
    /// Subscribers whose filter ends at this node.
    subs: HashMap<K, u8>,
}

impl<K> Default for FilterNode<K> {
    fn default() -> Self {
        Self {
            children: HashMap::new(),
            subs: HashMap::new(),
        }
    }
}

impl<K> Default for SubIndex<K> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            wild: FilterNode::default(),
            len: 0,
        }
    }
}

impl<K: Copy + Eq + Hash> SubIndex<K> {
    /// Number of (filter, subscriber) pairs.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True without subscriptions.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces `who`'s subscription to a valid filter.
    pub fn insert(&mut self, filter: &str, who: K, qos: u8) {
        let subs = if is_wildcard(filter) {
            let mut node = &mut self.wild;
            for level in filter.split('/') {
                node = node.children.entry(level.to_string()).or_default();
            }
            &mut node.subs
        } else {
            self.exact.entry(filter.to_string()).or_default()
        };
        if subs.insert(who, qos).is_none() {
            self.len += 1;
        }
    }

    /// Removes `who`'s subscription to `filter`; true if there was one.
    pub fn remove(&mut self, filter: &str, who: K) -> bool {
        let removed = if is_wildcard(filter) {
            let levels: Vec<&str> = filter.split('/').collect();
            remove_in(&mut self.wild, &levels, who)
        } else if let Some(subs) = self.exact.get_mut(filter) {
            let removed = subs.remove(&who).is_some();
            if subs.is_empty() {
                self.exact.remove(filter);
            }
            removed
        } else {
            false
        };
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Calls `f(subscriber, qos)` for every subscription matching a topic name (a subscriber
    /// with several matching filters is reported once per filter).
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(K, u8)) {
        if let Some(subs) = self.exact.get(topic) {
            for (k, q) in subs {
                f(*k, *q);
            }
        }
        if self.wild.children.is_empty() {
            return;
        }
        let levels: Vec<&str> = topic.split('/').collect();
        // Wildcards at the first level do not match topics starting with `$` (MQTT 4.7.2).
        let system = topic.starts_with('$');
        match_in(&self.wild, &levels, 0, system, &mut f);
    }
}

fn remove_in<K: Eq + Hash>(node: &mut FilterNode<K>, levels: &[&str], who: K) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return node.subs.remove(&who).is_some();
    };
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let removed = remove_in(child, rest, who);
    if child.subs.is_empty() && child.children.is_empty() {
        node.children.remove(*first);
    }
    removed
}

fn match_in<K: Copy>(
    node: &FilterNode<K>,
    levels: &[&str],
    depth: usize,
    system: bool,
    f: &mut impl FnMut(K, u8),
) {
    let wild_ok = !(system && depth == 0);
    if wild_ok && let Some(hash) = node.children.get("#") {
        // `a/#` matches `a` and everything below it.
        for (k, q) in &hash.subs {
            f(*k, *q);
        }
    }
    let Some(level) = levels.get(depth) else {
        for (k, q) in &node.subs {
            f(*k, *q);
        }
        return;
    };
    if let Some(child) = node.children.get(*level) {
        match_in(child, levels, depth + 1, system, f);
    }
    if wild_ok && let Some(child) = node.children.get("+") {
        match_in(child, levels, depth + 1, system, f);
    }
}

/// Retained messages: topic → message in a hash map (exact subscriptions look up one entry),
/// plus a trie of the retained topic names for wildcard subscriptions.
#[derive(Debug)]
pub struct RetainedIndex<V> {
    map: HashMap<Arc<str>, V>,
    tree: TopicNode,
}

#[derive(Debug, Default)]
struct TopicNode {
    children: HashMap<Box<str>, TopicNode>,
    topic: Option<Arc<str>>,
}

impl<V> Default for RetainedIndex<V> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            tree: TopicNode::default(),
        }
    }
}

impl<V> RetainedIndex<V> {
    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True without retained messages.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Stores (or replaces) the retained message of a topic.
    pub fn set(&mut self, topic: &Arc<str>, value: V) {
        if self.map.insert(topic.clone(), value).is_none() {
            let mut node = &mut self.tree;
            for level in topic.split('/') {
                node = node.children.entry(level.into()).or_default();
            }
            node.topic = Some(topic.clone());
        }
    }

    /// Deletes the retained message of a topic; true if there was one.
    pub fn remove(&mut self, topic: &str) -> bool {
        if self.map.remove(topic).is_none() {
            return false;
        }
        let levels: Vec<&str> = topic.split('/').collect();
        prune(&mut self.tree, &levels);
        true
    }

    /// The retained message of one topic.
    pub fn get(&self, topic: &str) -> Option<&V> {
        self.map.get(topic)
    }

    /// Calls `f` for every retained message matching a valid filter.
    pub fn for_each_match<'a>(&'a self, filter: &str, mut f: impl FnMut(&'a V)) {
        if !is_wildcard(filter) {
            if let Some(v) = self.map.get(filter) {
                f(v);
            }
            return;
        }
        let levels: Vec<&str> = filter.split('/').collect();
        let mut emit = |topic: &Arc<str>| {
            if let Some(v) = self.map.get(topic) {
                f(v);
            }
        };
        walk_filter(&self.tree, &levels, 0, &mut emit);
    }
}

fn prune(node: &mut TopicNode, levels: &[&str]) {
    let Some((first, rest)) = levels.split_first() else {
        node.topic = None;
        return;
    };
    if let Some(child) = node.children.get_mut(*first) {
        prune(child, rest);
        if child.topic.is_none() && child.children.is_empty() {
            node.children.remove(*first);
        }
    }
}

fn walk_filter(node: &TopicNode, levels: &[&str], depth: usize, emit: &mut impl FnMut(&Arc<str>)) {
    let Some(level) = levels.get(depth) else {
        if let Some(t) = &node.topic {
            emit(t);
        }
        return;
    };
    match *level {
        "#" => {
            // The parent level itself, then the whole subtree.
            if let Some(t) = &node.topic {
                emit(t);
            }
            for (name, child) in &node.children {
                if depth == 0 && name.starts_with('$') {
                    continue;
                }
                walk_all(child, emit);
            }
        }
        "+" => {
            for (name, child) in &node.children {
                if depth == 0 && name.starts_with('$') {
                    continue;
                }
                walk_filter(child, levels, depth + 1, emit);
            }
        }
        exact => {
            if let Some(child) = node.children.get(exact) {
                walk_filter(child, levels, depth + 1, emit);
            }
        }
    }
}

fn walk_all(node: &TopicNode, emit: &mut impl FnMut(&Arc<str>)) {
    if let Some(t) = &node.topic {
        emit(t);
    }
    for child in node.children.values() {
        walk_all(child, emit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(idx: &SubIndex<u32>, topic: &str) -> Vec<u32> {
        let mut v = Vec::new();
        idx.for_each_match(topic, |k, _| v.push(k));
        v.sort_unstable();
        v
    }

    #[test]
    fn validation() {
        assert!(valid_topic("a/b") && valid_topic("/") && valid_topic("a//b"));
        assert!(
            !valid_topic("") && !valid_topic("a/+") && !valid_topic("a/#") && !valid_topic("a\0")
        );
        for f in ["#", "+", "a/#", "a/+/c", "+/+", "/#", "a//b"] {
            assert!(valid_filter(f), "{f}");
        }
        for f in ["", "a#", "a/#/b", "a/b+", "#/a", "a\0"] {
            assert!(!valid_filter(f), "{f}");
        }
        assert!(valid_client_id("bhctvmiyz6ovk27g"));
        for id in ["", "a+", "a#", "a/b", "a\nb", "a\u{7f}"] {
            assert!(!valid_client_id(id), "{id:?}");
        }
    }

    #[test]
    fn subscriptions_match_like_mqtt() {
        let mut idx = SubIndex::default();
        idx.insert("a/b/c", 1, 1);
        idx.insert("a/+/c", 2, 1);
        idx.insert("a/#", 3, 0);
        idx.insert("#", 4, 0);
        idx.insert("+/+/+", 5, 0);
        idx.insert("a/b", 6, 0);
        idx.insert("$SYS/#", 7, 0);
        assert_eq!(matches(&idx, "a/b/c"), vec![1, 2, 3, 4, 5]);
        assert_eq!(matches(&idx, "a/b"), vec![3, 4, 6]);
        assert_eq!(matches(&idx, "a"), vec![3, 4]);
        assert_eq!(matches(&idx, "$SYS/x"), vec![7]);
        assert_eq!(matches(&idx, "b/x/c"), vec![4, 5]);
        assert_eq!(idx.len(), 7);
        assert!(idx.remove("a/+/c", 2));
        assert!(!idx.remove("a/+/c", 2));
        assert!(idx.remove("a/b/c", 1));
        assert_eq!(matches(&idx, "a/b/c"), vec![3, 4, 5]);
        for (f, k) in [
            ("a/#", 3),
            ("#", 4),
            ("+/+/+", 5),
            ("a/b", 6),
            ("$SYS/#", 7),
        ] {
            assert!(idx.remove(f, k));
        }
        assert!(idx.is_empty());
        assert!(idx.wild.children.is_empty() && idx.exact.is_empty());
    }

    #[test]
    fn retained_by_filter() {
        let mut r = RetainedIndex::default();
        for t in ["a", "a/b", "a/b/c", "a/x/c", "b/b/c", "$SYS/up"] {
            r.set(&Arc::from(t), t.to_string());
        }
        let get = |r: &RetainedIndex<String>, f: &str| {
            let mut v = Vec::new();
            r.for_each_match(f, |s| v.push(s.clone()));
            v.sort();
            v
        };
        assert_eq!(get(&r, "a/#"), ["a", "a/b", "a/b/c", "a/x/c"]);
        assert_eq!(get(&r, "+/+/c"), ["a/b/c", "a/x/c", "b/b/c"]);
        assert_eq!(get(&r, "a/b"), ["a/b"]);
        assert_eq!(get(&r, "#").len(), 5);
        assert_eq!(get(&r, "$SYS/#"), ["$SYS/up"]);
        assert!(r.remove("a/b/c"));
        assert!(!r.remove("a/b/c"));
        assert_eq!(get(&r, "a/#"), ["a", "a/b", "a/x/c"]);
        for t in ["a", "a/b", "a/x/c", "b/b/c", "$SYS/up"] {
            assert!(r.remove(t));
        }
        assert!(r.is_empty() && r.tree.children.is_empty());
    }
}
