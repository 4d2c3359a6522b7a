//! Regulatory checks of a mesh's radio settings against the Linux wireless-regdb
//! ([`sidenet_regdb`], every country the database has), and of a node's radio against them.
//!
//! What is checked, in order (docs/regulatory.md gives the same rules for users):
//! - the country is in the database;
//! - the channel is on the band's 20 MHz raster and the width exists on the band;
//! - the channel and width form a channel of the band's channelisation (the *block*: for 40, 80
//!   and 160 MHz on 5 GHz the IEEE 802.11 blocks 36-40, 36-48, 36-64, ...; on 6 GHz the blocks
//!   aligned to channel 1; on 2.4 GHz 40 MHz is the primary channel and the one 4 above it for
//!   channels 1-6, 4 below it for 7-13, as OpenWrt picks HT40+/HT40-);
//! - every 20 MHz channel of the block lies inside one rule of the country, the first that holds
//!   it in file order (as the kernel picks it), that rule allows OFDM and initiating radiation,
//!   and its maximum bandwidth (with `AUTO-BW`, the run of touching rules) is at least the width.
//!
//! A node's radio then has to list every channel of the block, support an HT mode for the width,
//! and be able to run radar detection (`dfs: true`) when any channel of the block needs it; a
//! `txPower` override must not exceed the radio's maximum nor the lowest EIRP limit of the
//! rules the block lies in.

use sidenet_crds::{Band, NodeOverrides, RadioProfile, RadioSpec};
use sidenet_regdb::generate::{dbm, describe, mhz};
use sidenet_regdb::{Country, DFS, NO_IR, NO_OFDM, NO_OUTDOOR, Rule};

/// The rules of `country`, if the database has it.
pub fn country(code: &str) -> Option<&'static Country> {
    sidenet_regdb::country(code)
}

/// Every country code in the database, sorted.
pub fn known_countries() -> Vec<&'static str> {
    sidenet_regdb::countries()
        .iter()
        .map(|c| c.alpha2)
        .collect()
}

/// Widths (MHz) a band supports.
pub fn widths(band: Band) -> &'static [u32] {
    match band {
        Band::TwoG => &[20, 40],
        Band::FiveG => &[20, 40, 80, 160],
        Band::SixG => &[20, 40, 80, 160],
    }
}

/// The centre frequency (MHz) of 20 MHz channel `channel` on `band`, when the channel is on the
/// band's raster: 2.4 GHz 1-13 (2407 + 5n) and 14 (2484); 5 GHz 32-144 and 149-177 in steps of 4
/// (5000 + 5n); 6 GHz 1-233 in steps of 4 (5950 + 5n).
pub fn frequency_mhz(band: Band, channel: u32) -> Option<u32> {
    match band {
        Band::TwoG => match channel {
            1..=13 => Some(2407 + 5 * channel),
            14 => Some(2484),
            _ => None,
        },
        Band::FiveG => {
            let on = ((32..=144).contains(&channel) && channel.is_multiple_of(4))
                || ((149..=177).contains(&channel) && (channel - 149).is_multiple_of(4));
            on.then_some(5000 + 5 * channel)
        }
        Band::SixG => {
            ((1..=233).contains(&channel) && channel % 4 == 1).then_some(5950 + 5 * channel)
        }
    }
}

fn raster(band: Band) -> &'static str {
    match band {
        Band::TwoG => "1-14",
        Band::FiveG => "32-144 or 149-177 in steps of 4",
        Band::SixG => "1-233 in steps of 4 (1, 5, 9, ...)",
    }
}

/// The 20 MHz channels a transmission on a primary channel and width occupies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The band.
    pub band: Band,
    /// The primary channel.
    pub primary: u32,
    /// The width in MHz.
    pub width: u32,
    /// Its 20 MHz channels, lowest first.
    pub channels: Vec<u32>,
}

impl Block {
    /// Lowest frequency of the block, MHz.
    pub fn start_mhz(&self) -> u32 {
        self.channels
            .first()
            .and_then(|c| frequency_mhz(self.band, *c))
            .map_or(0, |f| f - 10)
    }

    /// Highest frequency of the block, MHz.
    pub fn end_mhz(&self) -> u32 {
        self.channels
            .last()
            .and_then(|c| frequency_mhz(self.band, *c))
            .map_or(0, |f| f + 10)
    }

    /// Centre frequency of the block, MHz (`center_freq1` for `iw` and hostapd).
    pub fn center_mhz(&self) -> u32 {
        (self.start_mhz() + self.end_mhz()) / 2
    }

    /// `channels 132-144 (5650-5730 MHz)`, `channels 1 and 5 (2402-2442 MHz)`.
    pub fn describe(&self) -> String {
        format!(
            "{} ({}-{} MHz)",
            channel_list(&self.channels),
            self.start_mhz(),
            self.end_mhz()
        )
    }
}

fn channel_list(channels: &[u32]) -> String {
    match channels {
        [] => "no channels".into(),
        [one] => format!("channel {one}"),
        [a, b] => format!("channels {a} and {b}"),
        [first, .., last] => format!("channels {first}-{last}"),
    }
}

/// First channels of the 5 GHz 40, 80 and 160 MHz channels (IEEE 802.11 channelisation).
fn five_g_blocks(width: u32) -> &'static [u32] {
    match width {
        40 => &[
            36, 44, 52, 60, 100, 108, 116, 124, 132, 140, 149, 157, 165, 173,
        ],
        80 => &[36, 52, 100, 116, 132, 149, 165],
        160 => &[36, 100, 149],
        _ => &[],
    }
}

/// Which field of a channel setting a refusal is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// The channel (its own 20 MHz is the problem).
    Channel,
    /// The width (the channel is fine at 20 MHz; the wider block is not).
    Width,
}

/// Why a channel setting is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The field to point at.
    pub field: Field,
    /// What is wrong and what is allowed.
    pub message: String,
}

fn refuse<T>(field: Field, message: String) -> Result<T, Refusal> {
    Err(Refusal { field, message })
}

/// The block of `channel` at `width` MHz on `band`.
pub fn block(band: Band, channel: u32, width: u32) -> Result<Block, Refusal> {
    if frequency_mhz(band, channel).is_none() {
        return refuse(
            Field::Channel,
            format!(
                "channel {channel} is not a 20 MHz channel on {}; expected {}",
                band.as_str(),
                raster(band)
            ),
        );
    }
    if !widths(band).contains(&width) {
        return refuse(
            Field::Width,
            format!(
                "width {width} MHz is not possible on {}; expected one of {:?}",
                band.as_str(),
                widths(band)
            ),
        );
    }
    let n = width / 20;
    let channels: Option<Vec<u32>> = match (band, width) {
        (_, 20) => Some(vec![channel]),
        (Band::TwoG, _) => match channel {
            1..=6 => Some(vec![channel, channel + 4]),
            7..=13 => Some(vec![channel - 4, channel]),
            _ => None,
        },
        (Band::FiveG, _) => five_g_blocks(width)
            .iter()
            .find(|first| (**first..*first + 4 * n).contains(&channel))
            .map(|first| (0..n).map(|k| first + 4 * k).collect()),
        (Band::SixG, _) => {
            let first = (channel - 1) / (4 * n) * (4 * n) + 1;
            let last = first + 4 * (n - 1);
            (last <= 233).then(|| (0..n).map(|k| first + 4 * k).collect())
        }
    };
    match channels {
        Some(channels) => Ok(Block {
            band,
            primary: channel,
            width,
            channels,
        }),
        None => refuse(
            Field::Width,
            format!(
                "no {width} MHz channel on {} contains channel {channel}",
                band.as_str()
            ),
        ),
    }
}

/// A channel setting the country allows, with what it entails.
#[derive(Debug, Clone)]
pub struct Allowed {
    /// The country.
    pub country: &'static Country,
    /// The block.
    pub block: Block,
    /// Channels of the block that need radar detection (DFS).
    pub dfs_channels: Vec<u32>,
    /// Whether a rule of the block is indoor-only (`NO-OUTDOOR`).
    pub indoor_only: bool,
    /// The lowest EIRP limit of the block's rules, and that rule.
    pub limit: Rule,
}

impl Allowed {
    /// The power limit in mBm (100 × dBm EIRP).
    pub fn max_eirp_mbm(&self) -> u16 {
        self.limit.max_eirp_mbm
    }
}

fn band_range_mhz(band: Band) -> (u32, u32) {
    match band {
        Band::TwoG => (2400, 2500),
        Band::FiveG => (4900, 5925),
        Band::SixG => (5925, 7125),
    }
}

/// `DE's 5g rules: 5150-5250, 5250-5350, 5470-5725, 5725-5875 MHz`.
fn band_rules(c: &Country, band: Band) -> String {
    let (lo, hi) = band_range_mhz(band);
    let ranges: Vec<String> = c
        .rules
        .iter()
        .filter(|r| r.start_khz < hi * 1000 && r.end_khz > lo * 1000)
        .map(|r| format!("{}-{}", mhz(r.start_khz), mhz(r.end_khz)))
        .collect();
    if ranges.is_empty() {
        format!("{} has no rule on {}", c.alpha2, band.as_str())
    } else {
        format!(
            "{}'s {} rules: {} MHz",
            c.alpha2,
            band.as_str(),
            ranges.join(", ")
        )
    }
}

/// Whether `country` allows `channel` at `width` MHz on `band` for a mesh point (which starts
/// transmitting on its own, like an access point). The first problem found is returned.
pub fn check_channel(
    country: &str,
    band: Band,
    channel: u32,
    width: u32,
) -> Result<Allowed, Refusal> {
    let Some(c) = self::country(country) else {
        return refuse(
            Field::Channel,
            format!("{country:?} is not a country in wireless-regdb"),
        );
    };
    let block = block(band, channel, width)?;
    let mut dfs_channels = Vec::new();
    let mut indoor_only = false;
    let mut limit: Option<Rule> = None;
    // The primary channel first: its problems are the channel's, the others' the width's.
    // Messages are only formatted for a refusal (the reconcile checks every node each time).
    let others = block.channels.iter().copied().filter(|c| *c != channel);
    for ch in std::iter::once(channel).chain(others) {
        let field = if ch == channel {
            Field::Channel
        } else {
            Field::Width
        };
        let f = frequency_mhz(band, ch).unwrap_or_default();
        let what = || {
            let prefix = if ch == channel {
                String::new()
            } else {
                format!(
                    "{width} MHz on channel {channel} covers {}, and ",
                    block.describe()
                )
            };
            format!("{prefix}channel {ch} ({}-{} MHz)", f - 10, f + 10)
        };
        let (lo, hi) = ((f - 10) * 1000, (f + 10) * 1000);
        let Some((i, rule)) = c.rule_containing(lo, hi) else {
            let below = c.rules.iter().find(|r| r.start_khz <= lo && lo < r.end_khz);
            let above = c.rules.iter().find(|r| r.start_khz < hi && hi <= r.end_khz);
            let why = match (below, above) {
                (Some(a), Some(b)) if a != b && a.end_khz >= b.start_khz => format!(
                    "it straddles the rules {}-{} and {}-{} MHz, and no single rule holds it",
                    mhz(a.start_khz),
                    mhz(a.end_khz),
                    mhz(b.start_khz),
                    mhz(b.end_khz)
                ),
                _ => format!("no rule holds it ({})", band_rules(c, band)),
            };
            return refuse(
                field,
                format!("{} is not allowed in {}: {why}", what(), c.alpha2),
            );
        };
        if rule.has(NO_IR) {
            return refuse(
                field,
                format!(
                    "{} is no-initiate-radiation in {} (rule {}): a mesh point may not start transmitting there",
                    what(),
                    c.alpha2,
                    describe(rule)
                ),
            );
        }
        if rule.has(NO_OFDM) {
            return refuse(
                field,
                format!(
                    "{} allows only 802.11b in {} (rule {}); the mesh needs OFDM",
                    what(),
                    c.alpha2,
                    describe(rule)
                ),
            );
        }
        let max_bw = c.max_bandwidth_khz(i);
        if max_bw < width * 1000 {
            return refuse(
                Field::Width,
                format!(
                    "{} allows at most {} MHz in {} (rule {}), not {width} MHz",
                    what(),
                    mhz(max_bw),
                    c.alpha2,
                    describe(rule)
                ),
            );
        }
        if rule.has(DFS) {
            dfs_channels.push(ch);
        }
        indoor_only |= rule.has(NO_OUTDOOR);
        if limit.is_none_or(|l| rule.max_eirp_mbm < l.max_eirp_mbm) {
            limit = Some(*rule);
        }
    }
    dfs_channels.sort_unstable();
    let Some(limit) = limit else {
        return refuse(Field::Channel, format!("channel {channel} has no rule"));
    };
    Ok(Allowed {
        country: c,
        block,
        dfs_channels,
        indoor_only,
        limit,
    })
}

/// The country and channel settings of a Mesh (`spec.radio`): the field paths under `spec.radio`
/// and what is wrong with each. Empty when every band's channel is allowed.
pub fn check_mesh_radio(radio: &RadioSpec) -> Vec<(String, String)> {
    if country(&radio.country).is_none() {
        return vec![(
            "spec.radio.country".into(),
            format!(
                "{:?} is not a country in wireless-regdb {}; known: {}",
                radio.country,
                sidenet_regdb::source().version,
                known_countries().join(", ")
            ),
        )];
    }
    let mut out = Vec::new();
    for band in [Band::TwoG, Band::FiveG, Band::SixG] {
        let Some(ch) = radio.channels.get(band) else {
            continue;
        };
        if let Err(r) = check_channel(&radio.country, band, ch.channel, ch.width) {
            let leaf = match r.field {
                Field::Channel => "channel",
                Field::Width => "width",
            };
            out.push((
                format!("spec.radio.channels.{}.{leaf}", band.as_str()),
                r.message,
            ));
        }
    }
    out
}

/// What a node-level problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum About {
    /// The mesh's channel on the node's radio (`spec.radio.channels.<band>.channel`).
    MeshChannel,
    /// The mesh's width on the node's radio (`spec.radio.channels.<band>.width`).
    MeshWidth,
    /// The node's channel override (`spec.overrides.channel`).
    OverrideChannel,
    /// The node's transmit power override (`spec.overrides.txPower`).
    OverrideTxPower,
}

/// One node-level problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIssue {
    /// What it is about.
    pub about: About,
    /// What is wrong.
    pub message: String,
}

/// The mesh's radio settings with a node's overrides, on the node's mesh radio `radio` of
/// HardwareProfile `profile`. Problems of the mesh's own settings are not repeated here
/// ([`check_mesh_radio`] reports them); at most one problem per [`About`].
pub fn check_node(
    mesh: &RadioSpec,
    overrides: Option<&NodeOverrides>,
    profile: &str,
    radio: &RadioProfile,
) -> Vec<NodeIssue> {
    let band = mesh.mesh_band;
    let Some(spec) = mesh.channels.get(band) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut issue = |about, message| out.push(NodeIssue { about, message });
    let override_channel = overrides.and_then(|o| o.channel);
    let channel_about = if override_channel.is_some() {
        About::OverrideChannel
    } else {
        About::MeshChannel
    };
    let channel = override_channel.unwrap_or(spec.channel);
    let radio_name = || format!("radio {} of HardwareProfile/{profile}", radio.name);
    let allowed = if !radio.channels.contains(&channel) {
        issue(
            channel_about,
            format!("channel {channel} is not supported by {}", radio_name()),
        );
        None
    } else {
        match check_channel(&mesh.country, band, channel, spec.width) {
            Ok(a) => Some(a),
            Err(r) if override_channel.is_some() => {
                issue(About::OverrideChannel, r.message);
                None
            }
            // The mesh's own setting: reported on the Mesh by check_mesh_radio.
            Err(_) => None,
        }
    };
    if let Some(a) = &allowed {
        let missing: Vec<u32> = a
            .block
            .channels
            .iter()
            .filter(|c| !radio.channels.contains(c))
            .copied()
            .collect();
        if !missing.is_empty() {
            issue(
                About::MeshWidth,
                format!(
                    "{} MHz on channel {channel} covers {}, and {} does not support {}",
                    spec.width,
                    a.block.describe(),
                    radio_name(),
                    channel_list(&missing)
                ),
            );
        } else if htmode(band, spec.width, &radio.htmodes).is_none() {
            issue(
                About::MeshWidth,
                format!(
                    "{} supports no mode for {} MHz on {} (has {})",
                    radio_name(),
                    spec.width,
                    band.as_str(),
                    radio.htmodes.join(", ")
                ),
            );
        }
        if !a.dfs_channels.is_empty() && !radio.dfs {
            issue(
                channel_about,
                format!(
                    "{} need{} radar detection (DFS) in {}, and {} cannot do it (dfs: false)",
                    channel_list(&a.dfs_channels),
                    if a.dfs_channels.len() == 1 { "s" } else { "" },
                    a.country.alpha2,
                    radio_name()
                ),
            );
        }
    }
    if let Some(p) = overrides.and_then(|o| o.tx_power) {
        if p > radio.max_tx_power {
            issue(
                About::OverrideTxPower,
                format!(
                    "{p} dBm is above the maximum of radio {} ({} dBm)",
                    radio.name, radio.max_tx_power
                ),
            );
        } else if let Some(a) = &allowed
            && u64::from(p) * 100 > u64::from(a.max_eirp_mbm())
        {
            issue(
                About::OverrideTxPower,
                format!(
                    "{p} dBm is above the limit in {} for channel {channel} at {} MHz ({}): {} dBm EIRP (rule {})",
                    a.country.alpha2,
                    spec.width,
                    a.block.describe(),
                    dbm(a.max_eirp_mbm()),
                    describe(&a.limit)
                ),
            );
        }
    }
    out
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

    fn chans(band: Band, channel: u32, width: u32) -> Vec<u32> {
        block(band, channel, width)
            .map(|b| b.channels)
            .unwrap_or_default()
    }

    #[test]
    fn blocks_follow_the_channelisation() {
        assert_eq!(chans(Band::FiveG, 40, 40), vec![36, 40]);
        assert_eq!(chans(Band::FiveG, 140, 80), vec![132, 136, 140, 144]);
        assert_eq!(chans(Band::FiveG, 165, 80), vec![165, 169, 173, 177]);
        assert_eq!(
            chans(Band::FiveG, 64, 160),
            (0..8).map(|k| 36 + 4 * k).collect::<Vec<_>>()
        );
        assert_eq!(chans(Band::FiveG, 132, 160), Vec::<u32>::new());
        assert_eq!(chans(Band::TwoG, 6, 40), vec![6, 10]);
        assert_eq!(chans(Band::TwoG, 7, 40), vec![3, 7]);
        assert_eq!(chans(Band::TwoG, 14, 40), Vec::<u32>::new());
        assert_eq!(chans(Band::SixG, 37, 80), vec![33, 37, 41, 45]);
        assert_eq!(chans(Band::SixG, 233, 40), Vec::<u32>::new());
        let b = block(Band::FiveG, 36, 80).ok();
        assert_eq!(
            b.map(|b| (b.start_mhz(), b.center_mhz(), b.end_mhz())),
            Some((5170, 5210, 5250))
        );
        assert!(block(Band::FiveG, 38, 20).is_err());
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
