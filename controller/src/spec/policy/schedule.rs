//! Policy windows in time: `hh:mm` times, weekly minute intervals in the Mesh's time zone, and
//! the table of UTC offsets that lets a node find local time without a time zone database.

use jiff::Timestamp;
use jiff::tz::TimeZone;
use sidenet_crds::{Day, Window};

/// Minutes in a week.
pub const WEEK: u32 = 7 * 1440;

/// The first and last instant the offset table covers (UTC, Unix seconds): 2024-01-01 and
/// 2060-01-01. Fixed, so a compiled config does not change with the day it is compiled.
pub const OFFSETS_FROM: i64 = 1_704_067_200;
/// See [`OFFSETS_FROM`].
pub const OFFSETS_UNTIL: i64 = 2_840_140_800;

/// Parses `hh:mm` (00:00 to 23:59, and 24:00 when `end`) into minutes after midnight.
pub fn parse_hhmm(s: &str, end: bool) -> Result<u32, String> {
    let bad = || {
        format!(
            "{s:?} is not a time; expected hh:mm on the 24-hour clock (00:00 to 23:59{})",
            if end { ", or 24:00" } else { "" }
        )
    };
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if m > 59 || h > 24 || (h == 24 && (m != 0 || !end)) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// The minute-of-week intervals `[start, end)` (Monday 00:00 local = 0) of one window, split at
/// the end of the week. The error names the field (`start`, `end`) and what is wrong.
pub fn window_minutes(w: &Window) -> Result<Vec<(u32, u32)>, (&'static str, String)> {
    let s = parse_hhmm(&w.start, false).map_err(|e| ("start", e))?;
    let e = parse_hhmm(&w.end, true).map_err(|e| ("end", e))?;
    if s == e {
        return Err((
            "end",
            format!(
                "the window starts and ends at {}; a window lasts at least a minute (for all day write start 00:00, end 24:00)",
                w.start
            ),
        ));
    }
    let days: Vec<Day> = if w.days.is_empty() {
        Day::ALL.to_vec()
    } else {
        w.days.clone()
    };
    let mut out = Vec::new();
    for d in days {
        let a = d.index() * 1440 + s;
        let b = d.index() * 1440 + e + if e < s { 1440 } else { 0 };
        if b <= WEEK {
            out.push((a, b));
        } else {
            out.push((a, WEEK));
            out.push((0, b - WEEK));
        }
    }
    Ok(out)
}

/// Whether minute-of-week `m` is inside any of `intervals`.
pub fn inside(intervals: &[(u32, u32)], m: u32) -> bool {
    intervals.iter().any(|&(a, b)| a <= m && m < b)
}

/// Finds an IANA time zone by name.
pub fn time_zone(name: &str) -> Result<TimeZone, String> {
    TimeZone::get(name).map_err(|_| {
        format!("{name:?} is not an IANA time zone name; expected one like Europe/Berlin or UTC")
    })
}

/// The UTC offsets of `tz` between [`OFFSETS_FROM`] and [`OFFSETS_UNTIL`]: `(from, seconds)`
/// pairs, sorted, the first one at [`OFFSETS_FROM`]. Local time = UTC + the offset of the last
/// pair whose `from` is not after it.
pub fn offsets(tz: &TimeZone) -> Vec<(i64, i32)> {
    let start = Timestamp::from_second(OFFSETS_FROM).unwrap_or(Timestamp::UNIX_EPOCH);
    let mut out = vec![(OFFSETS_FROM, tz.to_offset(start).seconds())];
    for t in tz.following(start) {
        let at = t.timestamp().as_second();
        if at >= OFFSETS_UNTIL {
            break;
        }
        let off = t.offset().seconds();
        if out.last().is_some_and(|&(_, o)| o == off) {
            continue;
        }
        out.push((at, off));
    }
    out
}

/// Minute of the local week (Monday 00:00 = 0) of Unix time `t` at UTC offset `offset` seconds.
pub fn week_minute(t: i64, offset: i32) -> u32 {
    let local_minutes = (t + i64::from(offset)).div_euclid(60);
    // 1970-01-01 was a Thursday: Monday 00:00 is three days before it.
    (local_minutes + 3 * 1440).rem_euclid(i64::from(WEEK)) as u32
}

/// Parses the `at` of a policy test or of `sidenetctl explain`: a day and local time
/// (`tue 23:30`) or an RFC 3339 time. Returns the minute of the local week.
pub fn parse_at(at: &str, tz: &TimeZone) -> Result<u32, String> {
    if let Some((day, time)) = at.trim().split_once(' ') {
        let day = Day::ALL
            .into_iter()
            .find(|d| d.as_str() == day.trim().to_ascii_lowercase());
        if let Some(day) = day {
            let m = parse_hhmm(time.trim(), false)?;
            return Ok(day.index() * 1440 + m);
        }
    }
    let ts: Timestamp = at.trim().parse().map_err(|_| {
        format!(
            "{at:?} is not a time; expected a day and local time like \"tue 23:30\" or an RFC 3339 time like 2026-12-01T22:30:00Z"
        )
    })?;
    Ok(week_minute(ts.as_second(), tz.to_offset(ts).seconds()))
}

/// `mon 23:30` for a minute of the week.
pub fn show_minute(m: u32) -> String {
    let day = Day::ALL[(m / 1440 % 7) as usize];
    format!("{} {:02}:{:02}", day.as_str(), m % 1440 / 60, m % 60)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn w(days: &[Day], s: &str, e: &str) -> Window {
        Window {
            days: days.to_vec(),
            start: s.into(),
            end: e.into(),
        }
    }

    #[test]
    fn times() {
        assert_eq!(parse_hhmm("00:00", false), Ok(0));
        assert_eq!(parse_hhmm("23:59", false), Ok(1439));
        assert_eq!(parse_hhmm("24:00", true), Ok(1440));
        assert!(parse_hhmm("24:00", false).is_err());
        assert!(parse_hhmm("7:00", false).is_err());
        assert!(parse_hhmm("07:60", false).is_err());
    }

    #[test]
    fn windows_past_midnight_and_week_end() {
        assert_eq!(
            window_minutes(&w(&[Day::Sun], "23:00", "07:00")).unwrap(),
            vec![(6 * 1440 + 1380, WEEK), (0, 420)]
        );
        assert_eq!(
            window_minutes(&w(&[Day::Mon], "00:00", "24:00")).unwrap(),
            vec![(0, 1440)]
        );
        assert!(window_minutes(&w(&[], "10:00", "10:00")).is_err());
    }

    #[test]
    fn berlin_offsets_and_week_minutes() {
        let tz = time_zone("Europe/Berlin").unwrap();
        let o = offsets(&tz);
        assert_eq!(o[0], (OFFSETS_FROM, 3600));
        // 2024-03-31 01:00 UTC: summer time.
        assert_eq!(o[1], (1_711_846_800, 7200));
        assert!(o.len() > 60);
        // 2026-12-01T22:30:00Z is Tuesday 23:30 in Berlin.
        assert_eq!(
            show_minute(parse_at("2026-12-01T22:30:00Z", &tz).unwrap()),
            "tue 23:30"
        );
        assert_eq!(parse_at("tue 23:30", &tz).unwrap(), 1440 + 1410);
        assert!(time_zone("Mars/Olympus").is_err());
    }
}
