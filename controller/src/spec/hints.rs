//! Clearer words for what the YAML parser, the JSON Schema and serde report about a manifest:
//! the field a YAML error is about, a value of the wrong type said as such, a number too large
//! for its field, a quoted merge key.

use serde_json::Value;
use sidenet_crds::yaml::YamlError;

/// What `v` is, for a message: `the number 5`, `the boolean true`, `a list`, `a mapping`.
pub fn describe(v: &Value) -> String {
    match v {
        Value::Null => "empty".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
    }
}

/// A field that must be a string holds `v`: what to say, and for a name, how to quote it.
pub fn not_a_string(v: &Value, what: &str, name: bool) -> String {
    match v {
        Value::Number(_) | Value::Bool(_) if name => format!(
            "{} is not a string; {what} (if {v} is meant, quote it: \"{v}\")",
            describe(v)
        ),
        _ => format!("{} is not a string; {what}", describe(v)),
    }
}

/// A YAML error said more plainly, and the field it is about when the parser stopped on a value
/// (a number too large to read, an alias to an unknown anchor): (field, message).
pub fn yaml_error(text: &str, doc: usize, e: &YamlError) -> (Option<String>, String) {
    let huge = e.message.starts_with("non-finite float");
    let alias = e.message.contains("unknown anchor");
    let field = if huge || alias {
        e.line
            .zip(e.column)
            .and_then(|(l, c)| field_at(text, doc, l, c))
    } else {
        None
    };
    let at = match (e.line, e.column) {
        (Some(l), Some(c)) => format!(" (line {l} column {c})"),
        (Some(l), None) => format!(" (line {l})"),
        _ => String::new(),
    };
    let message = if huge {
        let token = e.line.zip(e.column).and_then(|(l, c)| token_at(text, l, c));
        let shown = token.map_or_else(
            || "this number".to_string(),
            |(_, t)| {
                let chars: Vec<char> = t.chars().collect();
                if chars.len() > 24 {
                    let head: String = chars[..10].iter().collect();
                    let tail: String = chars[chars.len() - 6..].iter().collect();
                    format!("the number {head}…{tail} ({} digits)", chars.len())
                } else {
                    format!("the number {t}")
                }
            },
        );
        format!(
            "{shown} is too large to read{at}; expected a value within the field's range (integers fit in 64 bits)"
        )
    } else if alias {
        format!(
            "not valid YAML: {e}; an alias (*name) can only refer to an anchor (&name) defined before it in the same document: anchors do not reach across '---'"
        )
    } else {
        format!("not valid YAML: {e}")
    };
    (field, message)
}

/// The token (a plain scalar or an alias) starting at 1-based `line`, `column`: its byte
/// range in `text` and its text.
fn token_at(text: &str, line: usize, column: usize) -> Option<(std::ops::Range<usize>, &str)> {
    let mut start = 0;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        if i + 1 == line {
            let col = l.char_indices().nth(column.checked_sub(1)?)?.0;
            let from = start + col;
            let len = text[from..]
                .find(|c: char| c.is_whitespace() || matches!(c, ',' | ']' | '}' | '#'))
                .unwrap_or(text.len() - from);
            return (len > 0).then(|| (from..from + len, &text[from..from + len]));
        }
        start += l.len();
    }
    None
}

const SENTINEL: &str = "\"sidenet-field-marker-7f3a\"";

/// The field path of the value at `line`/`column` of document `doc` (1-based): the value is
/// replaced by a marker string, the text parsed again, and the marker looked for.
fn field_at(text: &str, doc: usize, line: usize, column: usize) -> Option<String> {
    let (range, _) = token_at(text, line, column)?;
    let mut marked = String::with_capacity(text.len() + SENTINEL.len());
    marked.push_str(&text[..range.start]);
    marked.push_str(SENTINEL);
    marked.push_str(&text[range.end..]);
    let docs = sidenet_crds::yaml::documents(&marked);
    let value = docs.get(doc.checked_sub(1)?)?.as_ref().ok()?;
    let mut path = Vec::new();
    find(value, SENTINEL.trim_matches('"'), &mut path).then(|| {
        let mut out = String::new();
        for p in path {
            match p {
                Step::Key(k) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(&k);
                }
                Step::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    })
}

enum Step {
    Key(String),
    Index(usize),
}

fn find(v: &Value, marker: &str, path: &mut Vec<Step>) -> bool {
    match v {
        Value::String(s) => s == marker,
        Value::Array(a) => a.iter().enumerate().any(|(i, x)| {
            path.push(Step::Index(i));
            let found = find(x, marker, path);
            if !found {
                path.pop();
            }
            found
        }),
        Value::Object(m) => m.iter().any(|(k, x)| {
            path.push(Step::Key(k.clone()));
            let found = find(x, marker, path);
            if !found {
                path.pop();
            }
            found
        }),
        _ => false,
    }
}

/// A serde decoding message said plainly: a number too large for an integer field is read as a
/// floating point number, and serde says "invalid type: floating point …, expected u64".
pub fn decode_error(message: &str) -> String {
    let Some(rest) = message.strip_prefix("invalid type: floating point `") else {
        return message.to_string();
    };
    let Some((number, expected)) = rest.split_once("`, expected ") else {
        return message.to_string();
    };
    let max = match expected {
        "u8" => u64::from(u8::MAX).to_string(),
        "u16" => u64::from(u16::MAX).to_string(),
        "u32" => u64::from(u32::MAX).to_string(),
        "u64" => u64::MAX.to_string(),
        "i8" | "i16" | "i32" | "i64" => {
            return format!(
                "{number} is not a whole number this field can hold; expected an integer ({expected})"
            );
        }
        _ => return message.to_string(),
    };
    let n: f64 = number.parse().unwrap_or(f64::NAN);
    if n.fract() == 0.0 && n > 0.0 {
        format!("{number} is too large; expected a whole number from 0 to {max}")
    } else {
        format!("{number} is not a whole number; expected one from 0 to {max}")
    }
}

/// A schema message with its numbers as written: jsonschema says "the minimum of 64.0" for an
/// integer field's minimum of 64.
pub fn schema_numbers(message: &str) -> String {
    let mut out = message.to_string();
    for word in ["minimum of ", "maximum of "] {
        if let Some(i) = out.find(word) {
            let from = i + word.len();
            let digits = out[from..]
                .find(|c: char| !c.is_ascii_digit() && c != '-')
                .map_or(out.len(), |n| from + n);
            if out[digits..].starts_with(".0")
                && !out[digits + 2..].starts_with(|c: char| c.is_ascii_digit())
            {
                out.replace_range(digits..digits + 2, "");
            }
        }
    }
    out
}

/// A schema message about an unknown field said in the admin's terms; a quoted `"<<"` is named
/// for what it is.
pub fn unknown_field(message: &str) -> String {
    if message.contains("('<<' was unexpected)") {
        return "\"<<\" is an ordinary key here, not a YAML merge key: a merge key is written <<: *anchor, without quotes".into();
    }
    format!("unknown field: {message}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_field_of_a_yaml_error() {
        let text = "a: 1\n---\nspec:\n  list:\n    - x: 1\n    - x: 99999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999\n";
        let docs = sidenet_crds::yaml::documents(text);
        let e = docs[1].as_ref().unwrap_err();
        let (field, message) = yaml_error(text, 2, e);
        assert_eq!(field.as_deref(), Some("spec.list[1].x"), "{message}");
        assert!(
            message.starts_with(
                "the number 9999999999…999999 (326 digits) is too large to read (line 6 column 10)"
            ),
            "{message}"
        );
        let text = "a: &x 1\n---\nb:\n  c: *x\n";
        let docs = sidenet_crds::yaml::documents(text);
        let (field, message) = yaml_error(text, 2, docs[1].as_ref().unwrap_err());
        assert_eq!(field.as_deref(), Some("b.c"), "{message}");
        assert!(
            message.contains("anchors do not reach across '---'"),
            "{message}"
        );
    }

    #[test]
    fn numbers_too_large() {
        assert_eq!(
            decode_error("invalid type: floating point `1.8446744073709552e19`, expected u64"),
            "1.8446744073709552e19 is too large; expected a whole number from 0 to 18446744073709551615"
        );
        assert_eq!(decode_error("missing field `x`"), "missing field `x`");
    }
}
