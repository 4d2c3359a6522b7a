//! The body of the `mqtt_codec` fuzz target (`fuzz/fuzz_targets/mqtt_codec.rs`), shared with the
//! corpus replay test (`broker/tests/fuzz_corpus.rs`), so CI runs exactly the code the fuzzer
//! ran. Not part of the broker's API.
//!
//! Input: `control (1 byte) ‖ the bytes a client sends`. The control byte chooses the packet
//! size limit (bits 0–1: 64 B, 4 KiB (the pre-CONNECT limit), 64 KiB, 512 KiB (the controller's
//! limit)) and the size of the reads the bytes arrive in (bits 2–7: 1 to 64 bytes).
//!
//! What must hold for every input (a violated check panics, like a crash):
//!
//! - [`codec::decode`] returns normally, on the whole input at once and on the same bytes fed in
//!   reads of the chosen size, and both give the same packets, the same error and the same
//!   leftover bytes (an incomplete packet).
//! - A decoded PUBLISH encodes ([`codec::publish`]) to bytes that decode to the same packet.
//! - The subscription index ([`SubIndex`]) and the retained index ([`RetainedIndex`]) built
//!   from the decoded SUBSCRIBE filters and PUBLISH topics (as the broker builds them: valid
//!   names only, an empty retained payload deletes) agree with a plain reading of MQTT 3.1.1's
//!   matching rules (4.7: `+` one level, `#` this level and all below, no wildcard at the first
//!   level for topics starting with `$`), before and after removing every other subscription.

use std::sync::Arc;

use bytes::BytesMut;

use crate::codec::{self, CodecError, Packet};
use crate::topic::{RetainedIndex, SubIndex, valid_client_id, valid_filter, valid_topic};

/// Packet size limits the control byte chooses from.
pub const LIMITS: [usize; 4] = [64, crate::DEFAULT_MAX_CONNECT_PACKET, 64 * 1024, 512 * 1024];

/// Filters and topics compared at most (the comparison is filters × topics).
const MAX_NAMES: usize = 64;

/// The fuzz target body.
pub fn mqtt_codec(data: &[u8]) {
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let limit = LIMITS[usize::from(control & 3)];
    let chunk = 1 + usize::from(control >> 2);

    let whole = decode_all(&mut BytesMut::from(stream), limit);
    let mut buf = BytesMut::new();
    let mut packets = Vec::new();
    let mut end = None;
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        let step = decode_all(&mut buf, limit);
        packets.extend(step.packets);
        if step.error.is_some() {
            end = step.error;
            break;
        }
    }
    let leftover = if end.is_some() { 0 } else { buf.len() };
    let chunked = Decoded {
        packets,
        error: end,
        leftover,
    };
    assert_eq!(whole, chunked, "decoding in reads of {chunk} bytes differs");

    let mut filters: Vec<(String, u8)> = Vec::new();
    let mut topics: Vec<(String, bool)> = Vec::new();
    for p in &whole.packets {
        match p {
            Packet::Publish(p) => {
                assert!(p.qos <= 2 && (p.qos == 0) == (p.pkid == 0), "{p:?}");
                let mut out = BytesMut::new();
                let encoded =
                    codec::publish(&mut out, &p.topic, &p.payload, p.qos, p.retain, p.pkid);
                assert!(encoded.is_ok(), "{encoded:?}");
                let again = codec::decode(&mut out, limit);
                let want = codec::Publish {
                    dup: false,
                    ..p.clone()
                };
                assert_eq!(again, Ok(Some(Packet::Publish(want))));
                assert!(out.is_empty());
                if valid_topic(&p.topic) && topics.len() < MAX_NAMES {
                    // A retained publish with an empty payload deletes.
                    topics.push((p.topic.clone(), p.retain && p.payload.is_empty()));
                }
            }
            Packet::Subscribe(_, fs) => {
                for (f, q) in fs {
                    assert!(*q <= 2);
                    if valid_filter(f) && filters.len() < MAX_NAMES {
                        filters.push((f.clone(), *q));
                    }
                }
            }
            Packet::Connect(c) => {
                let _ = valid_client_id(&c.client_id);
                if let Some(w) = &c.will {
                    assert!(w.qos <= 2);
                    if valid_topic(&w.topic) && topics.len() < MAX_NAMES {
                        topics.push((w.topic.clone(), false));
                    }
                }
            }
            _ => {}
        }
    }
    check_indexes(&filters, &topics);
}

/// What decoding a buffer gave: the packets, the error that ends the connection, and the bytes
/// left over (an incomplete packet; 0 after an error).
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    packets: Vec<Packet>,
    error: Option<CodecError>,
    leftover: usize,
}

fn decode_all(buf: &mut BytesMut, limit: usize) -> Decoded {
    let mut packets = Vec::new();
    loop {
        match codec::decode(buf, limit) {
            Ok(Some(p)) => packets.push(p),
            Ok(None) => {
                return Decoded {
                    packets,
                    error: None,
                    leftover: buf.len(),
                };
            }
            Err(e) => {
                // The connection closes: what is left (and what would have come) is not read.
                return Decoded {
                    packets,
                    error: Some(e),
                    leftover: 0,
                };
            }
        }
    }
}

/// MQTT 3.1.1 section 4.7, read plainly: does `filter` match the topic name `topic`?
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let t: Vec<&str> = topic.split('/').collect();
    for (i, f) in filter.split('/').enumerate() {
        if f == "#" {
            // `a/#` matches `a` as well as everything below it.
            return true;
        }
        match t.get(i) {
            Some(level) if f == "+" || f == *level => {}
            _ => return false,
        }
    }
    filter.split('/').count() == t.len()
}

fn check_indexes(filters: &[(String, u8)], topics: &[(String, bool)]) {
    let mut subs = SubIndex::<usize>::default();
    for (who, (f, q)) in filters.iter().enumerate() {
        subs.insert(f, who, *q);
    }
    assert_eq!(subs.len(), filters.len());
    let live: Vec<usize> = (0..filters.len()).collect();
    compare_subscriptions(&subs, filters, &live, topics);
    // Every other subscription removed: the rest still match exactly.
    for who in (0..filters.len()).step_by(2) {
        assert!(subs.remove(&filters[who].0, who), "{:?}", filters[who]);
        assert!(!subs.remove(&filters[who].0, who));
    }
    let live: Vec<usize> = (1..filters.len()).step_by(2).collect();
    assert_eq!(subs.len(), live.len());
    compare_subscriptions(&subs, filters, &live, topics);

    // Retained topics as the broker keeps them: set in order, an empty payload deletes.
    let mut retained = RetainedIndex::<Arc<str>>::default();
    let mut expected: Vec<&str> = Vec::new();
    for (t, delete) in topics {
        if *delete {
            let had = expected.contains(&t.as_str());
            assert_eq!(retained.remove(t), had, "{t:?}");
            expected.retain(|e| e != t);
        } else {
            let name: Arc<str> = t.as_str().into();
            retained.set(&name, name.clone());
            if !expected.contains(&t.as_str()) {
                expected.push(t);
            }
        }
    }
    assert_eq!(retained.len(), expected.len());
    for (f, _) in filters {
        let mut got: Vec<&str> = Vec::new();
        retained.for_each_match(f, |v| got.push(v));
        got.sort_unstable();
        let mut want: Vec<&str> = expected
            .iter()
            .copied()
            .filter(|t| filter_matches(f, t))
            .collect();
        want.sort_unstable();
        assert_eq!(got, want, "retained messages matching {f:?}");
    }
}

fn compare_subscriptions(
    subs: &SubIndex<usize>,
    filters: &[(String, u8)],
    live: &[usize],
    topics: &[(String, bool)],
) {
    for (t, _) in topics {
        let mut got: Vec<(usize, u8)> = Vec::new();
        subs.for_each_match(t, |who, q| got.push((who, q)));
        got.sort_unstable();
        let want: Vec<(usize, u8)> = live
            .iter()
            .filter(|w| filter_matches(&filters[**w].0, t))
            .map(|w| (*w, filters[*w].1))
            .collect();
        assert_eq!(got, want, "subscriptions matching {t:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_matching_rules() {
        for (f, t, m) in [
            ("a/b", "a/b", true),
            ("a/+", "a/b", true),
            ("a/+", "a", false),
            ("a/+", "a/", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("a/+/c", "a//c", true),
            ("+", "/a", false),
            ("+/+", "/a", true),
            ("/#", "/a", true),
            ("a", "a/b", false),
        ] {
            assert_eq!(filter_matches(f, t), m, "{f} vs {t}");
        }
    }
}
