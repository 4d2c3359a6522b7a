//! The agent's log lines on stderr, one line per `tracing` event (docs/agents.md, "Logs").
//!
//! A small [`tracing::Subscriber`] of its own instead of `tracing-subscriber`'s formatter: the
//! agent logs events only (no spans), at one level chosen by `RUST_LOG`, and the formatter with
//! its registry cost about 40 KB of a binary meant for 16 MB of flash.
//!
//! Text (the default):
//!
//! ```text
//! 2026-12-02T14:20:01.123456Z  INFO sidenet_agent::shell: finished confirming an interrupted apply rev=3
//! ```
//!
//! the time in UTC with microseconds, the level right-aligned in five columns, the event's
//! target (the module), the message, then each other field as `name=value` (strings quoted).
//! JSON lines (`--log-json`): one object per line,
//! `{"timestamp":"…","level":"INFO","target":"…","fields":{"message":"…","rev":3}}`, where
//! numbers and booleans stay numbers and booleans and every other value is a string.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::{Event, Level, Metadata, Subscriber, span};

/// The subscriber: events at `max` and above, as text or JSON lines.
#[derive(Debug)]
pub struct Logger {
    max: Level,
    json: bool,
}

impl Logger {
    /// Events at `max` and more severe, as JSON lines when `json`.
    pub fn new(max: Level, json: bool) -> Self {
        Self { max, json }
    }

    /// The level `RUST_LOG` names (`trace`, `debug`, `info`, `warn`, `error`); anything else is
    /// `info`. A level, not a filter expression: a filter's regex engine would double the binary.
    pub fn level_from(value: &str) -> Level {
        match value {
            "trace" => Level::TRACE,
            "debug" => Level::DEBUG,
            "warn" => Level::WARN,
            "error" => Level::ERROR,
            _ => Level::INFO,
        }
    }

    /// One event's line, without its newline, at Unix time `secs` and `micros`.
    pub fn line(&self, event: &Event<'_>, secs: u64, micros: u32) -> String {
        let meta = event.metadata();
        let mut fields = Fields {
            json: self.json,
            message: String::new(),
            rest: String::new(),
        };
        event.record(&mut fields);
        let stamp = timestamp(secs, micros);
        let level = meta.level().as_str();
        if self.json {
            let mut out = format!(
                "{{\"timestamp\":\"{stamp}\",\"level\":\"{level}\",\"target\":{},\"fields\":{{",
                quoted(meta.target())
            );
            let mut sep = "";
            if !fields.message.is_empty() {
                out.push_str("\"message\":");
                out.push_str(&quoted(&fields.message));
                sep = ",";
            }
            if !fields.rest.is_empty() {
                out.push_str(sep);
                out.push_str(&fields.rest);
            }
            out.push_str("}}");
            out
        } else {
            let mut out = format!("{stamp} {level:>5} {}: {}", meta.target(), fields.message);
            if !fields.rest.is_empty() {
                if !fields.message.is_empty() {
                    out.push(' ');
                }
                out.push_str(&fields.rest);
            }
            out
        }
    }
}

impl Subscriber for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= &self.max
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::from_level(self.max))
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut line = self.line(event, now.as_secs(), now.subsec_micros());
        line.push('\n');
        // One write per line, so lines from two threads never interleave; a log that cannot
        // be written is not worth failing for.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

/// `s` as a JSON string.
fn quoted(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// The message, and the other fields already formatted (`a=1 b="x"`, or `"a":1,"b":"x"`).
struct Fields {
    json: bool,
    message: String,
    rest: String,
}

impl Fields {
    /// Adds one field whose value is already text: `raw` as it goes into the line.
    fn push(&mut self, field: &Field, raw: &str) {
        if self.json {
            if !self.rest.is_empty() {
                self.rest.push(',');
            }
            let _ = write!(self.rest, "{}:{raw}", quoted(field.name()));
        } else {
            if !self.rest.is_empty() {
                self.rest.push(' ');
            }
            let _ = write!(self.rest, "{}={raw}", field.name());
        }
    }

    /// A string value: quoted in both forms.
    fn string(&mut self, field: &Field, value: &str) {
        let raw = if self.json {
            quoted(value)
        } else {
            format!("{value:?}")
        };
        self.push(field, &raw);
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.message = text;
        } else if self.json {
            self.push(field, &quoted(&text));
        } else {
            self.push(field, &text);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.string(field, value);
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, &value.to_string());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, &value.to_string());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, if value { "true" } else { "false" });
    }
}

/// RFC 3339 in UTC with microseconds: `2026-12-02T14:20:01.123456Z`.
pub fn timestamp(secs: u64, micros: u32) -> String {
    // Days since 1970-01-01 to a civil date (the proleptic Gregorian calendar).
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3_600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn timestamps_are_utc_civil_dates() {
        assert_eq!(timestamp(0, 0), "1970-01-01T00:00:00.000000Z");
        // 2026-12-02T14:20:01Z, and the leap days of 2000 and 2024.
        assert_eq!(timestamp(1_796_221_201, 42), "2026-12-02T14:20:01.000042Z");
        assert_eq!(timestamp(951_782_400, 0), "2000-02-29T00:00:00.000000Z");
        assert_eq!(
            timestamp(1_709_251_199, 999_999),
            "2024-02-29T23:59:59.999999Z"
        );
        assert_eq!(timestamp(4_102_444_800, 0), "2100-01-01T00:00:00.000000Z");
    }

    /// Formats every event at a fixed time into `lines`.
    struct Capture {
        logger: Logger,
        lines: Arc<Mutex<Vec<String>>>,
    }

    impl Subscriber for Capture {
        fn enabled(&self, m: &Metadata<'_>) -> bool {
            self.logger.enabled(m)
        }
        fn new_span(&self, a: &span::Attributes<'_>) -> span::Id {
            self.logger.new_span(a)
        }
        fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
        fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
        fn event(&self, e: &Event<'_>) {
            let line = self.logger.line(e, 1_796_221_201, 5);
            self.lines.lock().unwrap().push(line);
        }
        fn enter(&self, _: &span::Id) {}
        fn exit(&self, _: &span::Id) {}
    }

    fn capture(json: bool, max: Level, f: impl FnOnce()) -> Vec<String> {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sub = Capture {
            logger: Logger::new(max, json),
            lines: lines.clone(),
        };
        tracing::subscriber::with_default(sub, f);
        lines.lock().unwrap().clone()
    }

    #[test]
    fn text_lines_carry_time_level_target_message_and_fields() {
        let lines = capture(false, Level::INFO, || {
            tracing::info!(revision = 3u64, node = "kitchen", "applied");
            tracing::warn!(error = %"no route", "broker unreachable");
            tracing::debug!("not at info");
            tracing::error!(ok = false, delta = -2i64, "plain \"quoted\"");
        });
        let target = module_path!();
        assert_eq!(
            lines,
            vec![
                format!(
                    "2026-12-02T14:20:01.000005Z  INFO {target}: applied revision=3 node=\"kitchen\""
                ),
                format!(
                    "2026-12-02T14:20:01.000005Z  WARN {target}: broker unreachable error=no route"
                ),
                format!(
                    "2026-12-02T14:20:01.000005Z ERROR {target}: plain \"quoted\" ok=false delta=-2"
                ),
            ]
        );
    }

    #[test]
    fn json_lines_are_objects_with_typed_fields() {
        let lines = capture(true, Level::DEBUG, || {
            tracing::debug!(revision = 3u64, node = "a\"b", ok = true, "applied \u{1}");
            tracing::info!(error = %"x", "");
        });
        let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(
            first,
            serde_json::json!({
                "timestamp": "2026-12-02T14:20:01.000005Z",
                "level": "DEBUG",
                "target": module_path!(),
                "fields": {"message": "applied \u{1}", "revision": 3, "node": "a\"b", "ok": true},
            })
        );
        let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["fields"], serde_json::json!({"error": "x"}));
    }

    #[test]
    fn levels_come_from_rust_log() {
        assert_eq!(Logger::level_from("debug"), Level::DEBUG);
        assert_eq!(Logger::level_from("warn"), Level::WARN);
        assert_eq!(Logger::level_from("sidenet=debug"), Level::INFO);
        let l = Logger::new(Level::WARN, false);
        assert_eq!(l.max_level_hint(), Some(LevelFilter::WARN));
    }
}
