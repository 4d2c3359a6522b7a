//! Names that end up in MQTT topics, 802.11s mesh ids, hostnames and file names.
//!
//! Both mesh names and node ids are DNS-label-like: lowercase ASCII letters, digits and `-`,
//! starting with a letter or digit. That rules out the MQTT wildcards `+` and `#`, the level
//! separator `/`, control characters and anything a shell or UCI file would need to quote.

use std::fmt;

/// Longest mesh name: the 802.11s mesh id is at most 32 octets.
pub const MESH_NAME_MAX: usize = 32;
/// Longest node id (a DNS label).
pub const NODE_ID_MAX: usize = 63;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameError {
    /// What kind of name ("mesh name", "node id").
    pub what: &'static str,
    /// The offending value, escaped for display.
    pub value: String,
    /// What was expected.
    pub reason: String,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {} {:?}: {}", self.what, self.value, self.reason)
    }
}

impl std::error::Error for NameError {}

fn check_label(what: &'static str, value: &str, max: usize) -> Result<(), NameError> {
    let err = |reason: String| NameError {
        what,
        value: value.escape_debug().to_string(),
        reason,
    };
    if value.is_empty() {
        return Err(err("must not be empty".into()));
    }
    if value.len() > max {
        return Err(err(format!(
            "at most {max} characters, got {}",
            value.len()
        )));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(err(format!(
            "only lowercase letters a-z, digits 0-9 and '-' are allowed, found {:?}",
            c
        )));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(err("must start and end with a letter or digit".into()));
    }
    Ok(())
}

/// Checks a mesh name (the network name nodes join by).
pub fn check_mesh_name(value: &str) -> Result<(), NameError> {
    check_label("mesh name", value, MESH_NAME_MAX)
}

/// Checks a node id.
pub fn check_node_id(value: &str) -> Result<(), NameError> {
    check_label("node id", value, NODE_ID_MAX)
}

/// Levenshtein distance between two strings (by character), for "closest: …" hints in errors.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    #[test]
    fn accepts_plain_labels() {
        assert!(check_mesh_name("riverside").is_ok());
        assert!(check_mesh_name("oak-street-2").is_ok());
        assert!(check_node_id("abcdefghij234567").is_ok());
    }

    #[test]
    fn refuses_topic_metacharacters_and_controls() {
        for bad in [
            "", "a+b", "a#", "a/b", "+", "#", "/", "a\nb", "a\0", "A", "-a", "a-", "a b", "ä",
            "a.b",
        ] {
            assert!(check_mesh_name(bad).is_err(), "{bad:?} accepted");
            assert!(check_node_id(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_mesh_name(&"a".repeat(33)).is_err());
        assert!(check_node_id(&"a".repeat(64)).is_err());
    }

    #[test]
    fn error_names_the_value_and_reason() {
        let e = check_mesh_name("a/b").err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some(
                "invalid mesh name \"a/b\": only lowercase letters a-z, digits 0-9 and '-' are allowed, found '/'"
            )
        );
    }
}
