//! The replay headers: `walstream reset-lsn` writes a marker naming a replay, and every event
//! the replay delivers again carries its id and how far it goes.
//!
//! The stream, not RocksDB, carries the replay's state, so a restarted walstream, or a standby
//! with an empty checkpoint, reads it from the stream's last message and carries on.

use std::fmt;

use async_nats::HeaderMap;

use crate::nats::wire::WriteHeaders;

use super::Position;
use crate::lsn::{parse_lsn, Lsn};

/// The replay's id, on the marker and on every replayed event.
pub const HEADER_REPLAY: &str = "Walstream-Replay";
/// The last event the replay covers (`<commit LSN>:<seq>`): later ones are first deliveries.
pub const HEADER_REPLAY_THROUGH: &str = "Walstream-Replay-Through";
/// On the marker only: where re-decoding starts.
pub const HEADER_REPLAY_FROM: &str = "Walstream-Replay-From";

/// A replay under way: events at or before `through` are delivered again, marked with `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replay {
    pub id: u64,
    pub through: Position,
}

impl Replay {
    pub fn covers(&self, position: Position) -> bool {
        position <= self.through
    }
}

/// What a stored message's headers say about a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayHeaders {
    pub replay: Replay,
    /// Set on the marker `reset-lsn` writes, absent on replayed events.
    pub from: Option<Lsn>,
}

impl ReplayHeaders {
    pub fn read(headers: &HeaderMap) -> Result<Option<Self>, String> {
        let Some(id) = headers.get(HEADER_REPLAY) else {
            return Ok(None);
        };
        let id = id
            .as_str()
            .parse()
            .map_err(|_| format!("bad {HEADER_REPLAY} `{}`", id.as_str()))?;
        let through = headers
            .get(HEADER_REPLAY_THROUGH)
            .ok_or_else(|| format!("{HEADER_REPLAY} without {HEADER_REPLAY_THROUGH}"))?;
        let through = parse_position(through.as_str())?;
        let from = headers
            .get(HEADER_REPLAY_FROM)
            .map(|from| parse_lsn(from.as_str()))
            .transpose()?;
        Ok(Some(Self {
            replay: Replay { id, through },
            from,
        }))
    }

    pub fn write(&self, headers: &mut impl WriteHeaders) {
        headers.put_number(HEADER_REPLAY, self.replay.id);
        headers.put(
            HEADER_REPLAY_THROUGH,
            &PositionText(self.replay.through).to_string(),
        );
        if let Some(from) = self.from {
            headers.put(HEADER_REPLAY_FROM, &from.to_string());
        }
    }
}

/// A position as `<commit LSN>:<seq>`, the form of [`HEADER_REPLAY_THROUGH`].
pub struct PositionText(pub Position);

impl fmt::Display for PositionText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.0.commit_lsn, self.0.seq)
    }
}

fn parse_position(text: &str) -> Result<Position, String> {
    let invalid = || format!("bad {HEADER_REPLAY_THROUGH} `{text}`");
    let (lsn, seq) = text.rsplit_once(':').ok_or_else(invalid)?;
    Ok(Position {
        commit_lsn: parse_lsn(lsn)?,
        seq: seq.parse().map_err(|_| invalid())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn at(lsn: u64, seq: u64) -> Position {
        Position::at(Lsn(lsn), seq)
    }

    #[test]
    fn headers_round_trip() {
        let written = ReplayHeaders {
            replay: Replay {
                id: 7,
                through: at(0x16B3748, 3),
            },
            from: Some(Lsn(0x100)),
        };
        let mut headers = HeaderMap::new();
        written.write(&mut headers);
        assert_eq!(ReplayHeaders::read(&headers), Ok(Some(written)));
        assert_eq!(ReplayHeaders::read(&HeaderMap::new()), Ok(None));
        let mut bad = HeaderMap::new();
        bad.insert(HEADER_REPLAY, "7");
        assert!(ReplayHeaders::read(&bad).is_err());
    }
}
