//! A log or report throttle: at most one event per interval, counting the ones left out.
//!
//! Anyone who can publish on the broker can send an agent as many refusable messages as they
//! like. What the agent does in answer to such a message (a log line, a signed and retained
//! status report) goes through a [`Throttle`], so a flood costs it one line or report a minute.

/// At most one event per `every` seconds (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Throttle {
    every: u64,
    last: Option<u64>,
    suppressed: u64,
}

impl Throttle {
    /// A throttle letting one event through per `every` seconds.
    pub const fn new(every: u64) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Whether an event at `now` may go through: `Some(n)` when it may, with `n` the events
    /// held back since the last one that went through; `None` when it is held back (counted).
    pub fn allow(&mut self, now: u64) -> Option<u64> {
        match self.last {
            Some(t) if now < t.saturating_add(self.every) => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// Events held back since the last one that went through.
    pub fn held_back(&self) -> u64 {
        self.suppressed
    }
}

/// " (N more not logged in the last S s)" for a count of held-back events, or nothing.
pub fn held_back_note(n: u64, every: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more like it not logged in the last {every}s)")
    }
}

/// At most `max` bytes of `text` (cut at a character boundary, with `…` when cut), with control
/// characters replaced by spaces: text that goes into a signed status report.
pub fn bounded(text: &str, max: usize) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.len() <= max {
        return clean;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !clean.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &clean[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_interval_and_the_rest_counted() {
        let mut t = Throttle::new(60);
        assert_eq!(t.allow(1000), Some(0));
        assert_eq!(t.allow(1000), None);
        assert_eq!(t.allow(1059), None);
        assert_eq!(t.held_back(), 2);
        assert_eq!(t.allow(1060), Some(2));
        assert_eq!(t.allow(1061), None);
        assert_eq!(t.allow(5000), Some(1));
    }

    #[test]
    fn bounded_text_is_short_and_clean() {
        assert_eq!(bounded("a\nb", 10), "a b");
        let long = "é".repeat(400);
        let b = bounded(&long, 300);
        assert!(b.len() <= 300, "{}", b.len());
        assert!(b.ends_with('…'));
        assert_eq!(bounded("short", 300), "short");
    }
}
