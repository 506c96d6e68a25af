//! PostgreSQL log sequence numbers: the crate-wide `Lsn` type and strict parsing of user input.

use std::fmt;

/// A position in PostgreSQL's write-ahead log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&lsn_text(*self))
    }
}

/// `lsn` as PostgreSQL prints it (`0/16B3748`): upper-case hex without leading zeros.
pub fn lsn_text(lsn: Lsn) -> String {
    let mut text = String::with_capacity(17);
    push_hex(&mut text, (lsn.0 >> 32) as u32);
    text.push('/');
    push_hex(&mut text, lsn.0 as u32);
    text
}

/// Upper-case hex without leading zeros, as `{:X}` writes it.
fn push_hex(out: &mut String, value: u32) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let digits = (32 - value.leading_zeros()).div_ceil(4).max(1) as usize;
    let mut hex = [0u8; 8];
    for (place, digit) in hex[..digits].iter_mut().rev().enumerate() {
        *digit = DIGITS[(value >> (place * 4)) as usize & 0xF];
    }
    // Every byte is one of DIGITS, so the text is ASCII.
    out.push_str(std::str::from_utf8(&hex[..digits]).unwrap_or_default());
}

/// Parses an LSN as PostgreSQL prints it (`0/16B3748`), refusing anything looser.
pub fn parse_lsn(text: &str) -> Result<Lsn, String> {
    let invalid =
        || format!("`{text}` is not an LSN; write it as PostgreSQL prints it, e.g. 0/16B3748");
    let (high, low) = text.trim().split_once('/').ok_or_else(invalid)?;
    let part = |s: &str| {
        if s.is_empty() || s.len() > 8 {
            return None;
        }
        u32::from_str_radix(s, 16).ok()
    };
    match (part(high), part(low)) {
        (Some(high), Some(low)) => Ok(Lsn((u64::from(high) << 32) | u64::from(low))),
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_postgres_format() {
        let lsn = parse_lsn("0/16B3748").unwrap();
        assert_eq!(lsn.to_string(), "0/16B3748");
        assert_eq!(parse_lsn("1A/0").unwrap().0, 0x1A_0000_0000);
    }

    #[test]
    fn text_is_what_format_writes() {
        let mut values = vec![
            0,
            1,
            0xF,
            0x10,
            0xFFFF_FFFF,
            0x1_0000_0000,
            u64::MAX,
            0x16B3748,
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        for _ in 0..10_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            values.push(state >> (state % 64));
        }
        for value in values {
            let expected = format!("{:X}/{:X}", value >> 32, value as u32);
            assert_eq!(lsn_text(Lsn(value)), expected, "{value:#x}");
            assert_eq!(Lsn(value).to_string(), expected, "{value:#x}");
        }
    }

    #[test]
    fn refuses_loose_input() {
        for bad in ["", "16B3748", "0/", "/1", "0/123456789", "g/1", "0/-1"] {
            assert!(parse_lsn(bad).is_err(), "{bad}");
        }
    }
}
