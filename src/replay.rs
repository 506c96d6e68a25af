//! Replays: `walstream reset-lsn` asks for one with a marker at the end of the stream, the
//! pipeline re-delivers the events it covers, marked, and the slot keeps enough WAL behind the
//! checkpoint to make that possible (`replication.replay_retention`).
//!
//! The stream, not RocksDB, carries the replay's state: the marker, then every replayed event,
//! names the replay and how far it goes. A restarted walstream, or a standby with an empty
//! checkpoint, reads it from the stream's last message and carries on where the replay stood.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderMap;
use serde::Serialize;

use crate::config::Config;
use crate::event::{Position, Transaction};
use crate::lsn::{parse_lsn, Lsn};
use crate::{postgres, sink};

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

    pub fn write(&self, headers: &mut HeaderMap) {
        headers.insert(HEADER_REPLAY, self.replay.id.to_string());
        headers.insert(
            HEADER_REPLAY_THROUGH,
            PositionText(self.replay.through).to_string(),
        );
        if let Some(from) = self.from {
            headers.insert(HEADER_REPLAY_FROM, from.to_string());
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

/// Where the first replication session starts, as the stream's last message decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumePlan {
    /// Re-decode from here, whatever the checkpoint says (it may predate a reset).
    pub from: Option<Lsn>,
    /// Events at or before this are in the stream already.
    pub skip_through: Option<Position>,
    pub replay: Option<Replay>,
}

impl ResumePlan {
    /// `tail_position` and `tail_replay` are read from the stream's last message.
    pub fn from_tail(tail_position: Option<Position>, tail_replay: Option<ReplayHeaders>) -> Self {
        match (tail_replay, tail_position) {
            // The marker: nothing of the replay is published yet.
            (
                Some(ReplayHeaders {
                    replay,
                    from: Some(from),
                }),
                _,
            ) => Self {
                from: Some(from),
                skip_through: None,
                replay: Some(replay),
            },
            // A replayed event: the replay stopped there. The checkpoint may still hold the
            // position from before the reset, so resume from the event itself.
            (Some(ReplayHeaders { replay, from: None }), Some(last)) => Self {
                from: Some(last.commit_lsn),
                skip_through: Some(last),
                replay: (last < replay.through).then_some(replay),
            },
            (_, position) => Self {
                from: None,
                skip_through: position,
                replay: None,
            },
        }
    }
}

/// Decides, change by change in WAL order, whether an event is published (not already in the
/// stream) and whether as a replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Events at or before this position are already in the stream: a restart re-reads them
    /// from the slot, and they are not published twice.
    pub skip_through: Option<Position>,
    /// The replay under way, if any: events it covers are published again, marked.
    pub replay: Option<Replay>,
}

impl Delivery {
    pub fn new(plan: &ResumePlan) -> Self {
        Self {
            skip_through: plan.skip_through,
            replay: plan.replay,
        }
    }

    /// Whether the transaction's next change is published; if not, its position is passed
    /// over. A published change is marked as a replay exactly when the replay covers it.
    pub fn admit(&mut self, tx: &mut Transaction) -> bool {
        let position = tx.peek_position();
        if self.skip_through.is_some_and(|last| position <= last) {
            tx.skip_change();
            return false;
        }
        self.skip_through = None;
        let covering = self.replay.filter(|replay| replay.covers(position));
        if let (Some(ended), None) = (self.replay, covering) {
            tracing::info!(
                replay = ended.id,
                "replay finished: every event it covers is delivered again"
            );
            self.replay = None;
        }
        tx.set_replay(covering);
        true
    }
}

/// How much WAL the slot keeps behind walstream's checkpoint, so `reset-lsn` can go back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Retention {
    /// Confirm the checkpoint itself: nothing before it can be replayed.
    #[default]
    None,
    Bytes(u64),
    Time(Duration),
}

impl Retention {
    /// `"10GB"`, `"512MiB"` (a size ends in B) or `"2h"`, `"30min"`, `"7d"`; `"0"` for none.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let invalid = |why: String| {
            format!("`{text}` is neither a size such as \"10GB\" nor a time such as \"2h\" ({why})")
        };
        if text == "0" {
            return Ok(Self::None);
        }
        if text.ends_with(['b', 'B']) {
            let size: bytesize::ByteSize = text.parse().map_err(invalid)?;
            return Ok(if size.0 == 0 {
                Self::None
            } else {
                Self::Bytes(size.0)
            });
        }
        let time = humantime::parse_duration(text).map_err(|e| invalid(e.to_string()))?;
        Ok(if time.is_zero() {
            Self::None
        } else {
            Self::Time(time)
        })
    }
}

/// Decides which position walstream confirms to PostgreSQL, holding the slot `retention`
/// behind the durable checkpoint. What it confirms never goes backwards.
#[derive(Debug)]
pub struct Confirmer {
    retention: Retention,
    confirmed: Lsn,
    /// Durable positions not yet old enough to confirm (time retention only).
    aging: VecDeque<(Instant, Lsn)>,
}

impl Confirmer {
    /// `confirmed` is what the slot has confirmed already.
    pub fn new(retention: Retention, confirmed: Lsn) -> Self {
        Self {
            retention,
            confirmed,
            aging: VecDeque::new(),
        }
    }

    /// The position to confirm now that `durable` is in RocksDB.
    pub fn confirmable(&mut self, durable: Lsn, now: Instant) -> Lsn {
        let candidate = match self.retention {
            Retention::None => durable,
            Retention::Bytes(bytes) => Lsn(durable.0.saturating_sub(bytes)),
            Retention::Time(keep) => {
                // Sampled, so a week's retention is about a thousand entries, not millions;
                // the slot then keeps up to a thousandth of `keep` more than asked, never less.
                let every = keep / 1024;
                let sample = self.aging.back().is_none_or(|&(at, lsn)| {
                    lsn < durable && now.saturating_duration_since(at) >= every
                });
                if sample {
                    self.aging.push_back((now, durable));
                }
                let mut candidate = self.confirmed;
                while let Some(&(at, lsn)) = self.aging.front() {
                    if now.saturating_duration_since(at) < keep {
                        break;
                    }
                    candidate = lsn;
                    self.aging.pop_front();
                }
                candidate
            }
        };
        self.confirmed = self.confirmed.max(candidate);
        self.confirmed
    }

    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// What PostgreSQL shows the slot confirmed at: nothing below it needs holding back.
    pub fn slot_confirmed(&mut self, lsn: Lsn) {
        self.confirmed = self.confirmed.max(lsn);
    }
}

/// What `walstream reset-lsn` asked for.
#[derive(Debug, Serialize)]
pub struct ReplayRequest {
    pub replay: u64,
    pub stream: String,
    /// Events committed at or after this LSN are delivered again...
    pub from: String,
    /// ...through this one (`<commit LSN>:<seq>`); later ones are first deliveries.
    pub through: String,
    /// The stream sequence of the marker; replayed events follow it.
    pub marker_sequence: u64,
    /// The oldest LSN the slot can still replay from.
    pub slot_confirmed: String,
}

impl ReplayRequest {
    pub fn print(&self) {
        println!(
            "replay {} requested: at its next start walstream delivers again every event in \
             stream {} committed at or after {} through {}, after the marker at stream \
             sequence {}.",
            self.replay, self.stream, self.from, self.through, self.marker_sequence
        );
        println!(
            "  replayed events carry the header {HEADER_REPLAY}: {} and \"replay\": true in \
             their body, and message ids of their own; start walstream now.",
            self.replay
        );
    }
}

/// Asks for a replay from `from`: checks that the slot still holds that WAL and that no
/// walstream streams it, then writes the marker at the end of the stream.
pub async fn request(config: &Config, from: Lsn) -> anyhow::Result<ReplayRequest> {
    let slot_name = &config.replication.slot;
    let client = postgres::connect(&config.database.url).await?;
    let slot = postgres::slot_info(&client, slot_name)
        .await?
        .ok_or_else(|| anyhow::anyhow!("replication slot {slot_name} does not exist"))?;
    if slot.active {
        anyhow::bail!(
            "slot {slot_name} is being streamed (PostgreSQL backend pid {}): stop every \
             walstream instance that streams it (with HA, the standby too), then run reset-lsn \
             again",
            slot.active_pid.unwrap_or_default()
        );
    }
    let confirmed = slot.confirmed_flush_lsn.unwrap_or(Lsn(0));
    if from < confirmed {
        anyhow::bail!(
            "cannot replay from {from}: slot {slot_name} is confirmed up to {confirmed}, and \
             PostgreSQL cannot decode a slot from before its confirmed position (that WAL may \
             be gone). Events committed at or after {confirmed} can be replayed. To re-deliver \
             older rows, re-emit a table's current rows with `walstream backfill --table …`; \
             to keep history replayable, set replication.replay_retention (\"2h\", \"10GB\"): \
             the slot then stays that far behind walstream's checkpoint"
        );
    }
    let js = sink::jetstream_for_command(&config.nats).await?;
    let name = &config.nats.stream_name;
    let tail = sink::read_tail(&js, name, slot_name, sink::RESUME_SEARCH_LIMIT)
        .await
        .with_context(|| format!("cannot read the end of stream {name}"))?;
    let through = match (tail.replay(), tail.position()) {
        (Some(earlier), _) => earlier.replay.through,
        (None, Some(position)) => position,
        (None, None) => anyhow::bail!(
            "stream {name} holds no walstream event of slot {slot_name} (searched back from \
             sequence {}): nothing to replay",
            tail.sequence
        ),
    };
    if from > through.commit_lsn {
        anyhow::bail!(
            "nothing to replay: the last event in stream {name} was committed at {}, before {from}",
            through.commit_lsn
        );
    }
    let now_millis = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    let id = (now_millis as u64).max(tail.replay().map_or(0, |t| t.replay.id + 1));
    let marker = ReplayHeaders {
        replay: Replay { id, through },
        from: Some(from),
    };
    let mut headers = HeaderMap::new();
    marker.write(&mut headers);
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("{slot_name}:replay:{id}"),
    );
    let payload = serde_json::json!({
        "event": "REPLAY",
        "replay": id,
        "from": from.to_string(),
        "through": {"lsn": through.commit_lsn.to_string(), "seq": through.seq},
    });
    let publish = PublishMessage::build()
        .headers(headers)
        .payload(serde_json::to_vec(&payload)?.into())
        .expected_last_sequence(tail.sequence);
    let subject = format!("{}._replay", config.nats.subject_prefix);
    let ack = js
        .send_publish(subject, publish)
        .await
        .map_err(|e| anyhow::anyhow!("cannot write the replay marker: {e}"))?
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot write the replay marker: {e}. If the stream moved on meanwhile, \
                 another client published into it (run reset-lsn again) or a walstream is \
                 streaming the slot (stop it first)"
            )
        })?;
    Ok(ReplayRequest {
        replay: id,
        stream: name.clone(),
        from: from.to_string(),
        through: PositionText(through).to_string(),
        marker_sequence: ack.sequence,
        slot_confirmed: confirmed.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lsn: u64, seq: u64) -> Position {
        Position {
            commit_lsn: Lsn(lsn),
            seq,
        }
    }

    #[test]
    fn retention_reads_sizes_and_times() {
        assert_eq!(Retention::parse("0"), Ok(Retention::None));
        assert_eq!(
            Retention::parse("10GB"),
            Ok(Retention::Bytes(10_000_000_000))
        );
        assert_eq!(Retention::parse("1 MiB"), Ok(Retention::Bytes(1 << 20)));
        assert_eq!(
            Retention::parse("2h"),
            Ok(Retention::Time(Duration::from_secs(7200)))
        );
        let error = Retention::parse("lots").unwrap_err();
        assert!(
            error.contains("\"10GB\"") && error.contains("\"2h\""),
            "{error}"
        );
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

    #[test]
    fn the_tail_decides_where_to_resume() {
        let replay = Replay {
            id: 1,
            through: at(500, 2),
        };
        // An ordinary tail: resume from the checkpoint, skip what is stored.
        let plain = ResumePlan::from_tail(Some(at(500, 2)), None);
        assert_eq!(plain.from, None);
        assert_eq!(plain.skip_through, Some(at(500, 2)));
        // The marker: re-decode from its LSN, skip nothing.
        let marker = ReplayHeaders {
            replay,
            from: Some(Lsn(100)),
        };
        let requested = ResumePlan::from_tail(None, Some(marker));
        assert_eq!(requested.from, Some(Lsn(100)));
        assert_eq!(requested.skip_through, None);
        assert_eq!(requested.replay, Some(replay));
        // Stopped mid-replay: carry on after the last replayed event.
        let replayed = ReplayHeaders { replay, from: None };
        let midway = ResumePlan::from_tail(Some(at(300, 0)), Some(replayed));
        assert_eq!(midway.from, Some(Lsn(300)));
        assert_eq!(midway.skip_through, Some(at(300, 0)));
        assert_eq!(midway.replay, Some(replay));
        // Stopped on the replay's last event: the replay is over.
        let done = ResumePlan::from_tail(Some(at(500, 2)), Some(replayed));
        assert_eq!(done.replay, None);
    }

    #[test]
    fn delivery_skips_what_is_stored_and_marks_what_the_replay_covers() {
        let replay = Replay {
            id: 3,
            through: at(200, 1),
        };
        let mut delivery = Delivery {
            skip_through: Some(at(200, 0)),
            replay: Some(replay),
        };
        let mut tx = Transaction::begin(7, Lsn(200), 0);
        assert!(!delivery.admit(&mut tx), "already in the stream");
        assert!(delivery.admit(&mut tx), "the next one is not");
        assert_eq!(tx.replay(), Some(replay));
        assert_eq!(delivery.skip_through, None);
        tx.skip_change();
        assert!(delivery.admit(&mut tx), "past the replay's end");
        assert_eq!((tx.replay(), delivery.replay), (None, None));
    }

    #[test]
    fn confirmations_stay_behind_by_bytes_and_never_go_back() {
        let now = Instant::now();
        let mut confirmer = Confirmer::new(Retention::Bytes(1000), Lsn(50));
        assert_eq!(confirmer.confirmable(Lsn(600), now), Lsn(50));
        assert_eq!(confirmer.confirmable(Lsn(5000), now), Lsn(4000));
        // A reset moves the checkpoint back; the slot's confirmation stays.
        assert_eq!(confirmer.confirmable(Lsn(100), now), Lsn(4000));
    }

    #[test]
    fn confirmations_stay_behind_by_time() {
        let start = Instant::now();
        let mut confirmer = Confirmer::new(Retention::Time(Duration::from_secs(60)), Lsn(0));
        assert_eq!(confirmer.confirmable(Lsn(100), start), Lsn(0));
        let later = start + Duration::from_secs(30);
        assert_eq!(confirmer.confirmable(Lsn(200), later), Lsn(0));
        let minute = start + Duration::from_secs(61);
        assert_eq!(confirmer.confirmable(Lsn(300), minute), Lsn(100));
        let two = start + Duration::from_secs(125);
        assert_eq!(confirmer.confirmable(Lsn(300), two), Lsn(300));
    }

    #[test]
    fn no_retention_confirms_the_checkpoint() {
        let mut confirmer = Confirmer::new(Retention::None, Lsn(0));
        assert_eq!(confirmer.confirmable(Lsn(42), Instant::now()), Lsn(42));
    }
}
