//! A small regulatory table: which channels a country allows per band, and which widths a band
//! supports. It covers the regulatory domains a community mesh is likely to sit in; a country
//! outside the table is refused with the list of the ones known, rather than guessed.
//!
//! Sources: the Linux wireless-regdb `db.txt` rules for the ETSI (EU/EFTA/UK), FCC (US),
//! ISED (CA), ACMA (AU/NZ) and MIC (JP) domains, reduced to channel numbers. DFS channels are
//! included where the regulator allows them (the radio then has to run radar detection).

use sidenet_crds::Band;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Domain {
    Etsi,
    Fcc,
    Mic,
    Acma,
}

const ETSI: &[&str] = &[
    "AT", "BE", "BG", "CH", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GB", "GR", "HR", "HU",
    "IE", "IS", "IT", "LI", "LT", "LU", "LV", "MT", "NL", "NO", "PL", "PT", "RO", "SE", "SI", "SK",
];
const FCC: &[&str] = &["US", "CA", "PR"];
const MIC: &[&str] = &["JP"];
const ACMA: &[&str] = &["AU", "NZ"];

fn domain(country: &str) -> Option<Domain> {
    if ETSI.contains(&country) {
        Some(Domain::Etsi)
    } else if FCC.contains(&country) {
        Some(Domain::Fcc)
    } else if MIC.contains(&country) {
        Some(Domain::Mic)
    } else if ACMA.contains(&country) {
        Some(Domain::Acma)
    } else {
        None
    }
}

/// Countries in the table, sorted.
pub fn known_countries() -> Vec<&'static str> {
    let mut all: Vec<&str> = ETSI
        .iter()
        .chain(FCC)
        .chain(MIC)
        .chain(ACMA)
        .copied()
        .collect();
    all.sort_unstable();
    all
}

/// Whether the country is in the table.
pub fn is_known(country: &str) -> bool {
    domain(country).is_some()
}

/// Whether `channel` on `band` is allowed in `country`. `None` when the country is unknown.
pub fn channel_allowed(country: &str, band: Band, channel: u32) -> Option<bool> {
    let d = domain(country)?;
    let ok = match band {
        Band::TwoG => match d {
            Domain::Fcc => (1..=11).contains(&channel),
            _ => (1..=13).contains(&channel),
        },
        Band::FiveG => {
            let low = matches!(channel, 36 | 40 | 44 | 48 | 52 | 56 | 60 | 64);
            let mid = (100..=140).contains(&channel) && channel.is_multiple_of(4);
            let ch144 = channel == 144;
            let high = matches!(channel, 149 | 153 | 157 | 161 | 165);
            match d {
                Domain::Etsi => low || mid,
                Domain::Fcc => low || mid || ch144 || high,
                Domain::Mic => low || mid || ch144,
                Domain::Acma => low || (mid && !(120..=128).contains(&channel)) || ch144 || high,
            }
        }
        Band::SixG => {
            let valid = channel % 4 == 1 && channel <= 233;
            match d {
                Domain::Fcc => valid,
                // 5945–6425 MHz (channels 1–93) for low-power indoor use.
                _ => valid && channel <= 93,
            }
        }
    };
    Some(ok)
}

/// Widths (MHz) a band supports.
pub fn widths(band: Band) -> &'static [u32] {
    match band {
        Band::TwoG => &[20, 40],
        Band::FiveG => &[20, 40, 80, 160],
        Band::SixG => &[20, 40, 80, 160],
    }
}

/// The best HT mode a radio supports for `width` on `band`: HE (Wi-Fi 6) before VHT before HT.
pub fn htmode(band: Band, width: u32, supported: &[String]) -> Option<String> {
    let families: &[&str] = match band {
        Band::TwoG => &["HE", "HT"],
        Band::FiveG => &["HE", "VHT", "HT"],
        Band::SixG => &["HE"],
    };
    families
        .iter()
        .map(|f| format!("{f}{width}"))
        .find(|m| supported.iter().any(|s| s.eq_ignore_ascii_case(m)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_rules() {
        assert_eq!(channel_allowed("DE", Band::TwoG, 13), Some(true));
        assert_eq!(channel_allowed("DE", Band::TwoG, 14), Some(false));
        assert_eq!(channel_allowed("US", Band::TwoG, 12), Some(false));
        assert_eq!(channel_allowed("DE", Band::FiveG, 36), Some(true));
        assert_eq!(channel_allowed("DE", Band::FiveG, 149), Some(false));
        assert_eq!(channel_allowed("US", Band::FiveG, 149), Some(true));
        assert_eq!(channel_allowed("DE", Band::FiveG, 37), Some(false));
        assert_eq!(channel_allowed("US", Band::SixG, 97), Some(true));
        assert_eq!(channel_allowed("DE", Band::SixG, 97), Some(false));
        assert_eq!(channel_allowed("ZZ", Band::TwoG, 1), None);
    }

    #[test]
    fn htmode_prefers_newest() {
        let modes = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            htmode(Band::FiveG, 80, &modes(&["HT20", "VHT80", "HE80"])),
            Some("HE80".into())
        );
        assert_eq!(
            htmode(Band::FiveG, 80, &modes(&["HT20", "VHT80"])),
            Some("VHT80".into())
        );
        assert_eq!(htmode(Band::TwoG, 40, &modes(&["HT20"])), None);
    }
}
