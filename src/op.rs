//! The row operations an event reports (`INSERT`, `UPDATE`, …), as events and configured
//! routes name them.

use std::fmt;
use std::str::FromStr;

/// FraiseQL's `event_type` for an event that is not a row's insert, update or delete.
pub const CUSTOM_EVENT_TYPE: &str = "CUSTOM";

/// The row operation an event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
    /// A row's current state, emitted by `walstream backfill`.
    Backfill,
}

impl Op {
    pub const ALL: [Op; 5] = [
        Op::Insert,
        Op::Update,
        Op::Delete,
        Op::Truncate,
        Op::Backfill,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
            Op::Truncate => "TRUNCATE",
            Op::Backfill => "BACKFILL",
        }
    }

    /// The operation as FraiseQL's observers name it (`event_type`): a row's insert, update
    /// or delete, and `CUSTOM` for what is no single row's change (a truncate, a backfilled
    /// row, which must not fire an observer on inserts).
    pub fn event_type(self) -> &'static str {
        match self {
            Op::Insert | Op::Update | Op::Delete => self.as_str(),
            Op::Truncate | Op::Backfill => CUSTOM_EVENT_TYPE,
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Op {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Op::ALL
            .into_iter()
            .find(|op| op.as_str().eq_ignore_ascii_case(text))
            .ok_or_else(|| {
                format!("`{text}` is not one of INSERT, UPDATE, DELETE, TRUNCATE, BACKFILL")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_parse_case_insensitively() {
        assert_eq!("insert".parse::<Op>().unwrap(), Op::Insert);
        assert!("UPSERT".parse::<Op>().is_err());
    }
}
