//! The ALTO routes (RFC 7285) of the HTTP service: the directory, the network map and the cost
//! maps answer `GET`/`HEAD`, the filtered cost map `POST`. The documents are built by
//! [`crate::reconcile::alto`] from the same topology snapshot as the map; docs/content.md
//! ("The topology guru") describes them.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;

use crate::reconcile::alto::{self, Metric, Policies};
use crate::reconcile::topology::Snapshot;

const TEXT: &str = "text/plain; charset=utf-8";

/// One answer, which the service sends as it is.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub code: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Body.
    pub body: Vec<u8>,
    /// Extra header lines, each ending in CRLF.
    pub extra: Cow<'static, str>,
}

fn reply(code: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Answer {
    Answer {
        code,
        content_type,
        body: body.into(),
        extra: Cow::Borrowed(""),
    }
}

/// Largest filtered cost map request body.
pub const MAX_BODY: usize = 64 * 1024;

/// Whether `path` is one of the ALTO routes.
pub fn is_route(path: &str) -> bool {
    path == alto::PATH_DIRECTORY
        || path == alto::PATH_NETWORKMAP
        || path == alto::PATH_FILTER
        || Metric::ALL.iter().any(|m| m.path() == path)
}

/// The value of header `name` in `head`.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        l.split_once(':')
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    })
}

/// Whether the request's `Accept` admits `media_type` (no `Accept`: anything goes).
fn accepts(head: &str, media_type: &str) -> bool {
    let Some(accept) = header(head, "accept") else {
        return true;
    };
    let (kind, _) = media_type.split_once('/').unwrap_or((media_type, ""));
    accept.split(',').any(|range| {
        let range = range
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        range == "*/*" || range == format!("{kind}/*") || range == media_type
    })
}

fn not_acceptable(media_type: &str) -> Answer {
    reply(
        406,
        TEXT,
        format!(
            "this resource answers {media_type} (and errors as {}): say so in Accept\n",
            alto::MT_ERROR
        ),
    )
}

fn document(media_type: &'static str, v: &serde_json::Value) -> Answer {
    match serde_json::to_vec(v) {
        Ok(b) => reply(200, media_type, b),
        Err(e) => reply(500, TEXT, format!("{e}\n")),
    }
}

/// `GET`/`HEAD` of an ALTO route (the caller checked the token); `snapshot` (the topology and
/// the policies) is asked only when the answer needs the topology.
pub async fn get<F, Fut>(path: &str, head: &str, snapshot: F) -> Answer
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(Snapshot, Arc<Policies>), String>>,
{
    if path == alto::PATH_FILTER {
        let mut r = reply(405, TEXT, "the filtered cost map takes POST\n");
        r.extra = "Allow: POST\r\n".into();
        return r;
    }
    let media_type = if path == alto::PATH_DIRECTORY {
        alto::MT_DIRECTORY
    } else if path == alto::PATH_NETWORKMAP {
        alto::MT_NETWORKMAP
    } else {
        alto::MT_COSTMAP
    };
    if !accepts(head, media_type) {
        return not_acceptable(media_type);
    }
    if path == alto::PATH_DIRECTORY {
        return document(media_type, &alto::directory());
    }
    let (s, policies) = match snapshot().await {
        Ok(s) => s,
        Err(e) => return reply(503, TEXT, format!("{e}\n")),
    };
    let metric = Metric::ALL.into_iter().find(|m| m.path() == path);
    let mut r = match metric {
        Some(m) => document(media_type, &alto::cost_map(&s, &policies, m, None)),
        None => document(media_type, &alto::network_map(&s)),
    };
    r.extra = last_modified(&s, metric).into();
    r
}

/// The `Last-Modified` header line of a network or cost map (RFC 9439 §6.2: the freshness of
/// the data the metrics come from): the newest status report of the snapshot's nodes; for the
/// rate cost, the snapshot's own time, at which the policies' windows were read. Empty when
/// there is no such time.
pub fn last_modified(s: &Snapshot, metric: Option<Metric>) -> String {
    let t = match metric {
        Some(Metric::Rate) => Some(s.generated),
        _ => s.nodes.iter().filter_map(|n| n.last_seen).max(),
    };
    t.and_then(|t| i64::try_from(t).ok())
        .and_then(|t| jiff::Timestamp::from_second(t).ok())
        .and_then(|t| {
            jiff::fmt::rfc2822::DateTimePrinter::new()
                .timestamp_to_rfc9110_string(&t)
                .ok()
        })
        .map(|d| format!("Last-Modified: {d}\r\n"))
        .unwrap_or_default()
}

/// `POST` of the filtered cost map with its `body` (the caller checked the token).
pub async fn post<F, Fut>(head: &str, body: &[u8], snapshot: F) -> Answer
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(Snapshot, Arc<Policies>), String>>,
{
    let ct = header(head, "content-type")
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    if ct.as_deref() != Some(alto::MT_COSTMAPFILTER) {
        return reply(
            415,
            TEXT,
            format!(
                "the filtered cost map takes Content-Type: {}\n",
                alto::MT_COSTMAPFILTER
            ),
        );
    }
    if !accepts(head, alto::MT_COSTMAP) && !accepts(head, alto::MT_ERROR) {
        return not_acceptable(alto::MT_COSTMAP);
    }
    let filter = match alto::parse_filter(body) {
        Ok(f) => f,
        Err(e) => return document_code(400, alto::MT_ERROR, &e.body()),
    };
    match snapshot().await {
        Ok((s, policies)) => {
            let mut r = document(
                alto::MT_COSTMAP,
                &alto::cost_map(&s, &policies, filter.metric, Some(&filter)),
            );
            r.extra = last_modified(&s, Some(filter.metric)).into();
            r
        }
        Err(e) => reply(503, TEXT, format!("{e}\n")),
    }
}

fn document_code(code: u16, media_type: &'static str, v: &serde_json::Value) -> Answer {
    let mut r = document(media_type, v);
    r.code = code;
    r
}
