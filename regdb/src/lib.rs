//! The Linux wireless regulatory database as data.
//!
//! The rules are the Linux wireless-regdb's (the database the kernel loads as
//! `/lib/firmware/regulatory.db`), for every country it has. They are not typed by hand:
//! `regulatory.db` is committed next to this crate (with `regulatory.db.source`, the package and
//! version it came from), and [`regdbgen`](../regdbgen/index.html) turns it into `src/data.rs`.
//! CI runs `regdbgen --check`, which regenerates the table from the committed file and fails when
//! it differs; it does not depend on the machine's package version.
//!
//! This crate holds facts only: the rules of a country, and the two ways the kernel reads them
//! (which rule holds a frequency range, [`Country::rule_containing`], and how wide a rule lets a
//! channel be, [`Country::max_bandwidth_khz`]). Channel numbers and what sidenet refuses live in
//! the controller (`sidenet_controller::spec::regdb`).
//!
//! Layout:
//! - [`parse`]: a reader of the binary `regulatory.db` format (version 20).
//! - [`generate`]: the Rust source of `src/data.rs` from a parsed database.
//! - `data` (generated): [`countries`] and [`source`].

pub mod generate;
pub mod parse;

#[rustfmt::skip]
mod data;

/// Only 802.11b (DSSS/CCK) may be used: no OFDM, hence no HT/VHT/HE (`NO-OFDM` in db.txt).
pub const NO_OFDM: u8 = 1 << 0;
/// Indoor use only (`NO-OUTDOOR`).
pub const NO_OUTDOOR: u8 = 1 << 1;
/// Radar detection (DFS) is required (`DFS`).
pub const DFS: u8 = 1 << 2;
/// No initiating radiation: a device may not beacon or start a network here, only answer one
/// (`NO-IR`; older files said `PASSIVE-SCAN` and `NO-IBSS`).
pub const NO_IR: u8 = 1 << 3;
/// The maximum bandwidth is computed from this rule and the rules it touches (`AUTO-BW`).
pub const AUTO_BW: u8 = 1 << 4;
/// Every flag bit the format defines (`regulatory.db` version 20).
pub const KNOWN_FLAGS: u8 = NO_OFDM | NO_OUTDOOR | DFS | NO_IR | AUTO_BW;

/// One rule of a country: a frequency range, the widest channel allowed in it, the power limit
/// and flags. Frequencies are in kHz, as in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Start of the range, kHz.
    pub start_khz: u32,
    /// End of the range, kHz.
    pub end_khz: u32,
    /// Widest channel allowed inside the range, kHz (before `AUTO-BW`).
    pub max_bw_khz: u32,
    /// Maximum EIRP in mBm (100 × dBm). The file stores no antenna gain: EIRP is the limit.
    pub max_eirp_mbm: u16,
    /// [`NO_OFDM`], [`NO_OUTDOOR`], [`DFS`], [`NO_IR`], [`AUTO_BW`].
    pub flags: u8,
}

impl Rule {
    /// Whether the rule has `flag`.
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Whether `[lo_khz, hi_khz]` lies inside the rule's range.
    pub fn contains(&self, lo_khz: u32, hi_khz: u32) -> bool {
        self.start_khz <= lo_khz && hi_khz <= self.end_khz
    }

    /// The flags as db.txt writes them (`NO-OUTDOOR, DFS, AUTO-BW`), empty when there are none.
    pub fn flag_names(&self) -> Vec<&'static str> {
        [
            (NO_OFDM, "NO-OFDM"),
            (NO_OUTDOOR, "NO-OUTDOOR"),
            (DFS, "DFS"),
            (NO_IR, "NO-IR"),
            (AUTO_BW, "AUTO-BW"),
        ]
        .into_iter()
        .filter(|(f, _)| self.has(*f))
        .map(|(_, n)| n)
        .collect()
    }
}

/// Which radar-detection rules (DFS region) a country follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DfsRegion {
    /// None given.
    Unset,
    /// FCC (United States and others).
    Fcc,
    /// ETSI (Europe and others).
    Etsi,
    /// Japan.
    Jp,
    /// A value this reader does not know (kept as read).
    Other(u8),
}

impl DfsRegion {
    /// From the byte in the file (`dfs_region` of a collection).
    pub fn from_byte(b: u8) -> Self {
        match b {
            0 => Self::Unset,
            1 => Self::Fcc,
            2 => Self::Etsi,
            3 => Self::Jp,
            other => Self::Other(other),
        }
    }

    /// The byte in the file.
    pub fn byte(self) -> u8 {
        match self {
            Self::Unset => 0,
            Self::Fcc => 1,
            Self::Etsi => 2,
            Self::Jp => 3,
            Self::Other(b) => b,
        }
    }

    /// As db.txt writes it after the country (`DFS-ETSI`), empty when unset.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unset => "",
            Self::Fcc => "DFS-FCC",
            Self::Etsi => "DFS-ETSI",
            Self::Jp => "DFS-JP",
            Self::Other(_) => "DFS-?",
        }
    }
}

/// The rules of one country, in the order of the file (the order the kernel searches them in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Country {
    /// ISO 3166-1 alpha-2 code, or `00` for the world domain.
    pub alpha2: &'static str,
    /// Its DFS region.
    pub dfs_region: DfsRegion,
    /// Its rules.
    pub rules: &'static [Rule],
}

impl Country {
    /// The first rule (in file order) whose range holds all of `[lo_khz, hi_khz]`, as the kernel's
    /// `freq_reg_info` picks it for a 20 MHz channel.
    pub fn rule_containing(&self, lo_khz: u32, hi_khz: u32) -> Option<(usize, &'static Rule)> {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.contains(lo_khz, hi_khz))
    }

    /// The widest channel rule `index` allows, in kHz. Without `AUTO-BW` it is the rule's own
    /// maximum; with `AUTO-BW` it is the width of the run of rules that touch or overlap it,
    /// walking the list in file order in both directions (the kernel's
    /// `reg_get_max_bandwidth`). `0` for an index out of range.
    pub fn max_bandwidth_khz(&self, index: usize) -> u32 {
        let Some(rule) = self.rules.get(index) else {
            return 0;
        };
        if !rule.has(AUTO_BW) {
            return rule.max_bw_khz;
        }
        let mut start = rule.start_khz;
        for r in self.rules[..index].iter().rev() {
            if r.end_khz < start {
                break;
            }
            start = r.start_khz;
        }
        let mut end = rule.end_khz;
        for r in &self.rules[index + 1..] {
            if r.start_khz > end {
                break;
            }
            end = r.end_khz;
        }
        end - start
    }
}

/// Where the table came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    /// Package name (`wireless-regdb`).
    pub package: &'static str,
    /// Package version (Debian's, e.g. `2026.09.03-1~deb12u1`).
    pub version: &'static str,
    /// SHA-256 of the `regulatory.db` the table was generated from (hex).
    pub sha256: &'static str,
}

/// Every country in the database, sorted by code.
pub fn countries() -> &'static [Country] {
    data::COUNTRIES
}

/// The rules of `alpha2` (exact match: uppercase letters, or `00`).
pub fn country(alpha2: &str) -> Option<&'static Country> {
    data::COUNTRIES
        .binary_search_by(|c| c.alpha2.cmp(alpha2))
        .ok()
        .and_then(|i| data::COUNTRIES.get(i))
}

/// Where the table came from.
pub fn source() -> &'static Source {
    &data::SOURCE
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// The committed `regulatory.db`, read by [`parse`], is exactly the generated table: the
    /// same check CI's `regdbgen --check` makes, run by `cargo test` too.
    #[test]
    fn generated_table_matches_the_committed_database() {
        let bytes = include_bytes!("../regulatory.db");
        let parsed = parse::parse(bytes).unwrap();
        assert_eq!(parsed.len(), countries().len());
        for (p, c) in parsed.iter().zip(countries()) {
            assert_eq!(p.alpha2, c.alpha2);
            assert_eq!(p.dfs_region, c.dfs_region, "{}", c.alpha2);
            assert_eq!(p.rules, c.rules, "{}", c.alpha2);
        }
        assert_eq!(source().sha256, generate::sha256_hex(bytes));
    }

    #[test]
    fn countries_are_sorted_and_found() {
        let all = countries();
        assert!(all.windows(2).all(|w| w[0].alpha2 < w[1].alpha2));
        assert!(all.len() > 150, "only {} countries", all.len());
        for c in all {
            assert_eq!(country(c.alpha2).map(|x| x.alpha2), Some(c.alpha2));
        }
        assert!(country("ZZ").is_none());
        assert!(country("de").is_none());
    }

    fn khz(mhz: f64) -> u32 {
        (mhz * 1000.0) as u32
    }

    /// Facts from wireless-regdb's db.txt for Germany (`country DE: DFS-ETSI`).
    #[test]
    fn germany() {
        let de = country("DE").unwrap();
        assert_eq!(de.dfs_region, DfsRegion::Etsi);
        // (5250 - 5350 @ 80), (100 mW), NO-OUTDOOR, DFS, AUTO-BW
        let (i, r) = de.rule_containing(khz(5250.0), khz(5270.0)).unwrap();
        assert_eq!((r.start_khz, r.end_khz), (khz(5250.0), khz(5350.0)));
        assert_eq!(r.max_eirp_mbm, 2000);
        assert_eq!(r.flag_names(), vec!["NO-OUTDOOR", "DFS", "AUTO-BW"]);
        // AUTO-BW joins it with (5150 - 5250 @ 80): 200 MHz.
        assert_eq!(de.max_bandwidth_khz(i), khz(200.0));
        // (5470 - 5725 @ 160), (500 mW), DFS: 500 mW is 26.98 dBm.
        let (i, r) = de.rule_containing(khz(5490.0), khz(5510.0)).unwrap();
        assert_eq!(r.max_eirp_mbm, 2698);
        assert_eq!(de.max_bandwidth_khz(i), khz(160.0));
        // Channel 144 (5710-5730 MHz) is in no single rule.
        assert!(de.rule_containing(khz(5710.0), khz(5730.0)).is_none());
        // Channel 14 (2474-2494 MHz) neither.
        assert!(de.rule_containing(khz(2474.0), khz(2494.0)).is_none());
    }
}
