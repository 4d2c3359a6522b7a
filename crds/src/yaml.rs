//! The YAML dialect of sidenet's files: manifests, hardware profiles, inventories, install
//! descriptors, template indexes, and the generated CRDs.
//!
//! Parsed with serde-saphyr (YAML 1.2; already in the tree through kube) with these rules:
//! - YAML 1.2 core booleans only: `true`/`false` (any case). `yes`, `no`, `on`, `off` are
//!   strings, so `approved: no` is an error naming the field instead of a silent `false`.
//! - Integers with redundant leading zeros (`0123`) are strings, never octal numbers.
//! - A key given twice in one mapping is an error.
//! - Merge keys (`<<: *base`) are merged.
//! - Anchors, aliases, nesting and sizes are budgeted (serde-saphyr's defaults), so an alias
//!   bomb is an error, not an out-of-memory.
//!
//! Errors are one line, with the line and column where the parser stopped.

use std::fmt;
use std::io::Cursor;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A YAML document that could not be read: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    /// Path of the field that could not be read (`hosts[0].port`), when known.
    pub path: Option<String>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong, without the location.
    pub message: String,
}

impl fmt::Display for YamlError {
    /// `PATH: MESSAGE (line L column C)` when the field is known, else
    /// `line L column C: MESSAGE`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = match (self.line, self.column) {
            (Some(l), Some(c)) => format!("line {l} column {c}"),
            (Some(l), None) => format!("line {l}"),
            _ => String::new(),
        };
        match (&self.path, at.is_empty()) {
            (Some(p), true) => write!(f, "{p}: {}", self.message),
            (Some(p), false) => write!(f, "{p}: {} ({at})", self.message),
            (None, true) => f.write_str(&self.message),
            (None, false) => write!(f, "{at}: {}", self.message),
        }
    }
}

impl std::error::Error for YamlError {}

impl From<serde_saphyr::Error> for YamlError {
    fn from(e: serde_saphyr::Error) -> Self {
        let loc = e.location().filter(|l| l.line() > 0);
        let mut message = e.to_string();
        // The message may repeat the location the fields below carry.
        if let Some(l) = &loc {
            for suffix in [
                format!(" at line {} column {}", l.line(), l.column()),
                format!(" at line {}, column {}", l.line(), l.column()),
            ] {
                if let Some(m) = message.strip_suffix(&suffix) {
                    message = m.to_string();
                }
            }
        }
        Self {
            path: None,
            line: loc.map(|l| l.line() as usize),
            column: loc.map(|l| l.column() as usize),
            message: message
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }
}

/// The parser options of the dialect (see the module docs).
pub fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        merge_keys: serde_saphyr::MergeKeyPolicy::Merge,
        with_snippet: false,
    }
}

/// One YAML document into `T`. An error names the field it is about, when it is about one.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    let mut path = None;
    serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            let p = e.path().to_string();
            if p != "." {
                path = Some(p);
            }
            e.into_inner()
        })
    })
    .map_err(|e| YamlError {
        path: path.take(),
        ..YamlError::from(e)
    })
}

/// Every document of a multi-document text (`---` between them), each as JSON-like data, in
/// order; empty documents are skipped. After a syntax error nothing more can be read.
pub fn documents(text: &str) -> Vec<Result<serde_json::Value, YamlError>> {
    let mut reader = Cursor::new(text.as_bytes());
    serde_saphyr::read_with_options::<_, serde_json::Value>(&mut reader, options())
        .map(|r| r.map_err(YamlError::from))
        .collect()
}

/// `value` as a YAML document.
pub fn to_string<T: Serialize>(value: &T) -> Result<String, YamlError> {
    serde_saphyr::to_string(value).map_err(|e| YamlError {
        path: None,
        line: None,
        column: None,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn the_dialect_is_yaml_1_2() {
        let v: serde_json::Value =
            from_str("a: no\nb: on\nc: 0123\nd: true\ne: 12\nf: 0x1F\ng: ~\n").unwrap();
        assert_eq!(
            v,
            json!({"a": "no", "b": "on", "c": "0123", "d": true, "e": 12, "f": 31, "g": null})
        );
    }

    #[test]
    fn typed_errors_name_the_field_and_the_place() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Host {
            host: String,
            port: Option<u16>,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Inv {
            hosts: Vec<Host>,
        }
        let e =
            from_str::<Inv>("hosts:\n  - { host: a }\n  - { host: b, port: 70000 }\n").unwrap_err();
        assert_eq!(e.path.as_deref(), Some("hosts[1].port"), "{e}");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.to_string().starts_with("hosts[1].port: "), "{e}");
    }

    #[test]
    fn duplicate_keys_are_refused_and_merge_keys_merge() {
        let e = from_str::<serde_json::Value>("a: 1\na: 2\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.to_lowercase().contains("duplicate"), "{e}");
        let v: serde_json::Value =
            from_str("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n").unwrap();
        assert_eq!(v["other"], json!({"x": 1, "y": 3}));
    }

    #[test]
    fn documents_are_split_and_errors_located() {
        let docs = documents("a: 1\n---\nb: 2\n---\n");
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].as_ref().unwrap(), &json!({"b": 2}));
        let docs = documents("a: 1\n---\nb: [1, 2\n");
        let e = docs.last().unwrap().as_ref().unwrap_err();
        assert!(e.line.is_some_and(|l| l >= 3), "{e}");
        assert!(!e.message.contains('\n'));
    }
}
