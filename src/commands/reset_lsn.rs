//! `walstream reset-lsn`: asks for a replay with a marker at the end of the stream; the
//! pipeline re-delivers the events it covers, marked, at its next start.

use anyhow::Context as _;
use async_nats::jetstream::message::PublishMessage;
use async_nats::HeaderMap;
use serde::Serialize;

use super::Answer;
use crate::config::Config;
use crate::lsn::Lsn;
use crate::pipeline::event::replay::{PositionText, Replay, ReplayHeaders, HEADER_REPLAY};
use crate::pipeline::history;
use crate::{nats, postgres};

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

impl Answer for ReplayRequest {
    fn print_text(&self) {
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
    let js = nats::jetstream_for_command(&config.nats).await?;
    let name = &config.nats.stream_name;
    let tail = history::read_tail(&js, name, slot_name, history::RESUME_SEARCH_LIMIT)
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
        crate::nats::wire::MESSAGE_ID,
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
