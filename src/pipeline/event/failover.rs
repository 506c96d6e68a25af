//! The failover marker: after a promotion, the events walstream had published from the old
//! primary past the point where the promoted standby's history begins never happened for the
//! database. walstream marks them void with one message on `<prefix>._failover` and goes on
//! with the new primary's history after it.
//!
//! Like a replay's marker, the marker lives in the stream, so a restarted walstream reads it
//! from the stream's last message and does not mark the same events twice.

use async_nats::HeaderMap;

use crate::nats::wire::WriteHeaders;

use super::identity;
use super::replay::PositionText;
use super::Position;
use crate::lsn::{parse_lsn, Lsn};
use crate::op::CUSTOM_EVENT_TYPE;

/// On the marker: `<old timeline>:<switch LSN>`, the history the void events belong to and
/// where the new one parts from it.
pub const HEADER_FAILOVER: &str = "Walstream-Failover";

/// What a failover left in the stream that the new primary does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverMarker {
    /// The timeline the void events were read on.
    pub from_timeline: u32,
    /// The promoted server's timeline.
    pub timeline: u32,
    /// Where the promoted server's history parts from the old one: events committed at or
    /// after it on `from_timeline` are void.
    pub switch: Lsn,
    pub phantoms: Phantoms,
}

/// walstream's void events: stream sequences and positions, first and last, and how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phantoms {
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub count: u64,
    pub first: Position,
    pub last: Position,
}

impl FailoverMarker {
    /// Where the marker stands in WAL order for resuming: after every event committed before
    /// the switch point, which are in the stream, and before any of the new primary's.
    pub fn position(switch: Lsn) -> Position {
        Position::at(Lsn(switch.0.saturating_sub(1)), u64::MAX)
    }

    /// `{slot}:failover:{timeline}:{switch}`: the same marker re-sent after a crash is dropped
    /// by JetStream's duplicate window.
    pub fn message_id(slot: &str, timeline: u32, switch: Lsn) -> String {
        format!("{slot}:failover:{timeline}:{switch}")
    }

    pub fn write(&self, headers: &mut impl WriteHeaders) {
        headers.put(
            HEADER_FAILOVER,
            &format!("{}:{}", self.from_timeline, self.switch),
        );
    }

    /// `(old timeline, switch LSN)` from a marker's headers; `None` for any other message.
    pub fn read(headers: &HeaderMap) -> Option<(u32, Lsn)> {
        let value = headers.get(HEADER_FAILOVER)?;
        let (timeline, switch) = value.as_str().split_once(':')?;
        Some((timeline.parse().ok()?, parse_lsn(switch).ok()?))
    }

    /// The marker's JSON body: what a consumer needs to undo or flag the void events, with the
    /// fields FraiseQL's observers require of every message (a `CUSTOM` event of no entity).
    pub fn body(&self, message_id: &str, timestamp: &str) -> serde_json::Value {
        let p = &self.phantoms;
        let data = serde_json::json!({
            "from_timeline": self.from_timeline,
            "timeline": self.timeline,
            "switch_lsn": self.switch.to_string(),
            "void": {
                "first_sequence": p.first_sequence,
                "last_sequence": p.last_sequence,
                "events": p.count,
                "first": PositionText(p.first).to_string(),
                "last": PositionText(p.last).to_string(),
            },
        });
        let mut body = serde_json::json!({
            "event": "FAILOVER",
            "event_type": CUSTOM_EVENT_TYPE,
            "entity_type": FAILOVER_ENTITY_TYPE,
            "id": identity::event_id(message_id).to_string(),
            "entity_id": identity::NO_ENTITY.to_string(),
            "timestamp": timestamp,
        });
        if let (Some(body), serde_json::Value::Object(fields)) = (body.as_object_mut(), &data) {
            body.extend(fields.clone());
            body.insert("data".to_owned(), data.clone());
        }
        body
    }
}

/// `entity_type` of the failover marker, which no table is behind.
const FAILOVER_ENTITY_TYPE: &str = "_failover";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_the_marker_stands_before_the_switch() {
        let marker = FailoverMarker {
            from_timeline: 1,
            timeline: 2,
            switch: Lsn(0x3000158),
            phantoms: Phantoms {
                first_sequence: 10,
                last_sequence: 14,
                count: 5,
                first: Position::at(Lsn(0x3000200), 0),
                last: Position::at(Lsn(0x3000400), 1),
            },
        };
        let mut headers = HeaderMap::new();
        marker.write(&mut headers);
        assert_eq!(FailoverMarker::read(&headers), Some((1, Lsn(0x3000158))));
        assert_eq!(FailoverMarker::read(&HeaderMap::new()), None);
        let position = FailoverMarker::position(marker.switch);
        assert!(position < Position::at(Lsn(0x3000158), 0));
        assert!(position > Position::at(Lsn(0x3000157), 1_000_000));
        assert_eq!(marker.body("m", "t")["void"]["events"], 5);
        assert_eq!(marker.body("m", "t")["data"]["void"]["events"], 5);
    }
}
