//! A reader of wireless-regdb's binary `regulatory.db` (format version 20), the file the Linux
//! kernel loads itself since 4.15. The format is written by wireless-regdb's `db2fw.py` and read
//! by the kernel's `net/wireless/reg.c`; all numbers are big-endian and every pointer is a 16-bit
//! offset in units of 4 bytes:
//!
//! ```text
//! header      magic u32 = 0x52474442 ("RGDB"), version u32 = 20
//! countries   { alpha2 [2]u8, collection u16 (offset / 4) } ..., ended by an entry whose
//!             collection pointer is 0 (4 zero bytes)
//! collection  len u8 (bytes before the rule list, >= 3), n_rules u8, dfs_region u8,
//!             padding to len rounded up to 2, then n_rules × rule u16 (offset / 4)
//! rule        len u8 (>= 16), flags u8, max_eirp u16 (mBm), start u32, end u32,
//!             max_bw u32 (kHz); optional from len 18: cac_timeout u16 (s); from len 20:
//!             wmm_ptr u16 (offset / 4)
//! ```
//!
//! Rule flags: bit 0 NO-OFDM, 1 NO-OUTDOOR, 2 DFS, 3 NO-IR, 4 AUTO-BW. `dfs_region`: 0 unset,
//! 1 FCC, 2 ETSI, 3 JP. The reader is stricter than the kernel where a silent misreading would
//! be unsafe: it refuses unknown flag bits, rules the kernel's `is_valid_reg_rule` refuses,
//! country codes that are not two capital letters (or `00`), and countries out of order.
//! The file's signature (`regulatory.db.p7s`) is not checked here: the file comes from a package
//! the package manager has verified.

use crate::{DfsRegion, KNOWN_FLAGS, Rule};

/// The magic number, "RGDB".
pub const MAGIC: u32 = 0x5247_4442;
/// The only format version the kernel (and this reader) accepts.
pub const VERSION: u32 = 20;

/// One country as read from the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCountry {
    /// Country code.
    pub alpha2: String,
    /// DFS region of its collection.
    pub dfs_region: DfsRegion,
    /// Its rules, in file order.
    pub rules: Vec<Rule>,
}

/// The file is not a valid `regulatory.db`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("regulatory.db: byte {offset}: {message}")]
pub struct ParseError {
    /// Where in the file.
    pub offset: usize,
    /// What is wrong.
    pub message: String,
}

fn fail<T>(offset: usize, message: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError {
        offset,
        message: message.into(),
    })
}

fn u8_at(d: &[u8], at: usize) -> Result<u8, ParseError> {
    match d.get(at) {
        Some(b) => Ok(*b),
        None => fail(at, "unexpected end of file"),
    }
}

fn u16_at(d: &[u8], at: usize) -> Result<u16, ParseError> {
    match d.get(at..at + 2) {
        Some(b) => Ok(u16::from_be_bytes([b[0], b[1]])),
        None => fail(at, "unexpected end of file"),
    }
}

fn u32_at(d: &[u8], at: usize) -> Result<u32, ParseError> {
    match d.get(at..at + 4) {
        Some(b) => Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        None => fail(at, "unexpected end of file"),
    }
}

/// Reads every country of a `regulatory.db`.
pub fn parse(d: &[u8]) -> Result<Vec<ParsedCountry>, ParseError> {
    let magic = u32_at(d, 0)?;
    if magic != MAGIC {
        return fail(
            0,
            format!("magic is {magic:#010x}, expected {MAGIC:#010x} (\"RGDB\")"),
        );
    }
    let version = u32_at(d, 4)?;
    if version != VERSION {
        return fail(
            4,
            format!("format version is {version}, expected {VERSION}"),
        );
    }
    let mut out: Vec<ParsedCountry> = Vec::new();
    let mut at = 8;
    loop {
        let coll = usize::from(u16_at(d, at + 2)?) << 2;
        if coll == 0 {
            break;
        }
        let code = [u8_at(d, at)?, u8_at(d, at + 1)?];
        let ok = code.iter().all(u8::is_ascii_uppercase) || code == *b"00";
        if !ok {
            return fail(
                at,
                format!("country code {code:?} is not two capital letters or 00"),
            );
        }
        let alpha2 = String::from_utf8_lossy(&code).into_owned();
        if let Some(prev) = out.last()
            && prev.alpha2 >= alpha2
        {
            return fail(
                at,
                format!(
                    "country {alpha2} follows {}: the list must be sorted",
                    prev.alpha2
                ),
            );
        }
        let (dfs_region, rules) = collection(d, coll, &alpha2)?;
        out.push(ParsedCountry {
            alpha2,
            dfs_region,
            rules,
        });
        at += 4;
    }
    if out.is_empty() {
        return fail(8, "no countries");
    }
    Ok(out)
}

fn collection(d: &[u8], at: usize, alpha2: &str) -> Result<(DfsRegion, Vec<Rule>), ParseError> {
    let len = usize::from(u8_at(d, at)?);
    let n_rules = usize::from(u8_at(d, at + 1)?);
    let dfs_region = DfsRegion::from_byte(u8_at(d, at + 2)?);
    if len < 3 {
        return fail(
            at,
            format!("collection of {alpha2} is {len} bytes long, expected >= 3"),
        );
    }
    let list = at + len.next_multiple_of(2);
    let mut rules = Vec::with_capacity(n_rules);
    for i in 0..n_rules {
        let ptr = usize::from(u16_at(d, list + 2 * i)?) << 2;
        rules.push(rule(d, ptr, alpha2)?);
    }
    Ok((dfs_region, rules))
}

fn rule(d: &[u8], at: usize, alpha2: &str) -> Result<Rule, ParseError> {
    let len = usize::from(u8_at(d, at)?);
    if len < 16 {
        return fail(
            at,
            format!("rule of {alpha2} is {len} bytes long, expected >= 16"),
        );
    }
    if at + len > d.len() {
        return fail(
            at,
            format!("rule of {alpha2} runs past the end of the file"),
        );
    }
    let flags = u8_at(d, at + 1)?;
    let r = Rule {
        flags,
        max_eirp_mbm: u16_at(d, at + 2)?,
        start_khz: u32_at(d, at + 4)?,
        end_khz: u32_at(d, at + 8)?,
        max_bw_khz: u32_at(d, at + 12)?,
    };
    if flags & !KNOWN_FLAGS != 0 {
        return fail(
            at + 1,
            format!(
                "rule {}-{} kHz of {alpha2} has flags {flags:#04x}; only NO-OFDM, NO-OUTDOOR, DFS, NO-IR and AUTO-BW ({KNOWN_FLAGS:#04x}) are known",
                r.start_khz, r.end_khz
            ),
        );
    }
    // The kernel's is_valid_reg_rule(): a non-empty range at least as wide as the bandwidth.
    if r.start_khz == 0 || r.end_khz <= r.start_khz || r.max_bw_khz > r.end_khz - r.start_khz {
        return fail(
            at + 4,
            format!(
                "rule {}-{} kHz @ {} kHz of {alpha2} is not a valid range",
                r.start_khz, r.end_khz, r.max_bw_khz
            ),
        );
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::{AUTO_BW, DFS};

    /// A file as db2fw.py lays it out: header, countries, rules, collections.
    fn file(
        countries: &[(&[u8; 2], u8)],
        rules: &[[u8; 16]],
        flags_override: Option<u8>,
    ) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&MAGIC.to_be_bytes());
        d.extend_from_slice(&VERSION.to_be_bytes());
        let table = d.len();
        for (code, _) in countries {
            d.extend_from_slice(&code[..]);
            d.extend_from_slice(&[0, 0]);
        }
        d.extend_from_slice(&[0; 4]);
        let mut rule_ptrs = Vec::new();
        for r in rules {
            rule_ptrs.push((d.len() >> 2) as u16);
            let mut r = *r;
            if let Some(f) = flags_override {
                r[1] = f;
            }
            d.extend_from_slice(&r);
        }
        for (i, (_, dfs)) in countries.iter().enumerate() {
            let ptr = (d.len() >> 2) as u16;
            d[table + 4 * i + 2..table + 4 * i + 4].copy_from_slice(&ptr.to_be_bytes());
            d.extend_from_slice(&[3, rule_ptrs.len() as u8, *dfs, 0]);
            for p in &rule_ptrs {
                d.extend_from_slice(&p.to_be_bytes());
            }
            if rule_ptrs.len() % 2 == 1 {
                d.extend_from_slice(&[0, 0]);
            }
        }
        d
    }

    fn rule_bytes(start: u32, end: u32, bw: u32, eirp: u16, flags: u8) -> [u8; 16] {
        let mut r = [0u8; 16];
        r[0] = 16;
        r[1] = flags;
        r[2..4].copy_from_slice(&eirp.to_be_bytes());
        r[4..8].copy_from_slice(&start.to_be_bytes());
        r[8..12].copy_from_slice(&end.to_be_bytes());
        r[12..16].copy_from_slice(&bw.to_be_bytes());
        r
    }

    #[test]
    fn reads_a_small_file() {
        let rules = [
            rule_bytes(5_150_000, 5_250_000, 80_000, 2301, AUTO_BW),
            rule_bytes(5_250_000, 5_350_000, 80_000, 2000, DFS | AUTO_BW),
        ];
        let d = file(&[(b"AA", 2), (b"BB", 1)], &rules, None);
        let got = parse(&d).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].alpha2, "AA");
        assert_eq!(got[0].dfs_region, DfsRegion::Etsi);
        assert_eq!(got[1].dfs_region, DfsRegion::Fcc);
        assert_eq!(
            got[1].rules[1],
            Rule {
                start_khz: 5_250_000,
                end_khz: 5_350_000,
                max_bw_khz: 80_000,
                max_eirp_mbm: 2000,
                flags: DFS | AUTO_BW
            }
        );
    }

    #[test]
    fn refuses_what_it_cannot_read_safely() {
        let rules = [rule_bytes(2_400_000, 2_483_500, 40_000, 2000, 0)];
        let good = file(&[(b"AA", 0)], &rules, None);
        assert!(parse(&good).is_ok());

        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(parse(&bad).unwrap_err().message.contains("magic"));

        let mut bad = good.clone();
        bad[7] = 19;
        assert!(parse(&bad).unwrap_err().message.contains("version is 19"));

        let bad = file(&[(b"AA", 0)], &rules, Some(1 << 5));
        assert!(parse(&bad).unwrap_err().message.contains("flags 0x20"));

        let bad = file(&[(b"BB", 0), (b"AA", 0)], &rules, None);
        assert!(parse(&bad).unwrap_err().message.contains("sorted"));

        let bad = file(&[(b"de", 0)], &rules, None);
        assert!(parse(&bad).unwrap_err().message.contains("capital"));

        let wide = [rule_bytes(2_400_000, 2_420_000, 40_000, 2000, 0)];
        let bad = file(&[(b"AA", 0)], &wide, None);
        assert!(
            parse(&bad)
                .unwrap_err()
                .message
                .contains("not a valid range")
        );

        // Inside the header, the country list, and a collection's rule pointer.
        for cut in [3, 9, good.len() - 3] {
            assert!(parse(&good[..cut]).is_err(), "cut at {cut}");
        }
    }
}
