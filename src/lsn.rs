//! PostgreSQL log sequence numbers: the crate-wide `Lsn` type and strict parsing of user input.

pub use pgwire_replication::Lsn;

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
    fn refuses_loose_input() {
        for bad in ["", "16B3748", "0/", "/1", "0/123456789", "g/1", "0/-1"] {
            assert!(parse_lsn(bad).is_err(), "{bad}");
        }
    }
}
