//! Operator views: `walstream status` (slot, checkpoint, stream, lag) and `walstream seek`
//! (the stream sequence where an LSN or a commit time begins).

use anyhow::Context as _;
use async_nats::jetstream;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::Answer;
use crate::config::Config;
use crate::lsn::{parse_lsn, Lsn};
use crate::nats;
use crate::pipeline::checkpoint::Checkpoint;
use crate::pipeline::event::replay::PositionText;
use crate::pipeline::history::{self, StoredMeta};
use crate::{postgres, secrets};

#[derive(Debug, Serialize)]
pub struct Status {
    pub slot: Option<SlotStatus>,
    /// The NATS server's version and JetStream API level.
    pub nats: Option<nats::ServerFeatures>,
    pub checkpoint: CheckpointStatus,
    pub stream: StreamStatus,
    /// WAL the slot has not confirmed yet, in bytes (`pg_current_wal_lsn - confirmed_flush_lsn`).
    pub lag_bytes: Option<u64>,
    /// PostgreSQL's own measure of how far behind walstream's confirmations are.
    pub lag_seconds: Option<f64>,
    /// A replay asked for with `reset-lsn` that has not finished, read from the stream's end.
    pub replay: Option<ReplayStatus>,
}

#[derive(Debug, Serialize)]
pub struct ReplayStatus {
    pub id: u64,
    /// `requested` (the marker is the stream's last message) or `in progress`.
    pub state: &'static str,
    /// The last event the replay delivers again (`<commit LSN>:<seq>`).
    pub through: String,
}

#[derive(Debug, Serialize)]
pub struct SlotStatus {
    pub name: String,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub plugin: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
    pub restart_lsn: Option<String>,
    pub wal_status: Option<String>,
    /// WAL kept on the server for this slot (`pg_current_wal_lsn - restart_lsn`).
    pub wal_retained_bytes: Option<u64>,
    /// PostgreSQL 17+: a failover slot, synchronized to standbys that ask for it.
    pub failover: Option<bool>,
    /// PostgreSQL 17+: synchronized from the primary (on a standby).
    pub synced: Option<bool>,
    /// PostgreSQL 17+: since when no walsender streams the slot.
    pub inactive_since: Option<String>,
    /// PostgreSQL 17+: why the slot was invalidated, if it was.
    pub invalidation_reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CheckpointStatus {
    pub path: String,
    pub lsn: Option<String>,
    /// Where a restart decodes from while a backfill is under way.
    pub backfill_hold: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct StreamStatus {
    pub name: String,
    /// False until walstream's first start creates the stream.
    pub exists: bool,
    pub messages: u64,
    pub bytes: u64,
    pub first_sequence: u64,
    pub last_sequence: u64,
    pub first_lsn: Option<String>,
    pub last_lsn: Option<String>,
    pub first_time: Option<String>,
    pub last_time: Option<String>,
    /// Messages after walstream's last event that another client published.
    pub other_messages_after_last_event: u64,
}

pub async fn status(config: &Config) -> anyhow::Result<Status> {
    let client = postgres::connect(&config.database.url).await?;
    let slot_name = &config.replication.slot;
    let slot = postgres::slot_info(&client, slot_name)
        .await
        .map_err(|e| anyhow::anyhow!("reading slot {slot_name}: {e:#}"))?;
    let lag = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - s.confirmed_flush_lsn)::int8,
                    (SELECT extract(epoch FROM r.flush_lag)::float8
                     FROM pg_stat_replication r WHERE r.pid = s.active_pid)
             FROM pg_replication_slots s WHERE s.slot_name = $1",
            &[slot_name],
        )
        .await
        .map_err(|e| anyhow::anyhow!("reading slot {slot_name}: {}", postgres::db_error(&e)))?;
    let (lag_bytes, lag_seconds) = lag.map_or((None, None), |row| {
        (
            row.get::<_, Option<i64>>(0).map(|b| b.max(0) as u64),
            row.get::<_, Option<f64>>(1),
        )
    });
    let text = |lsn: Option<Lsn>| lsn.map(|lsn| lsn.to_string());
    let slot = slot.map(|slot| SlotStatus {
        name: slot_name.clone(),
        active: slot.active,
        active_pid: slot.active_pid,
        plugin: slot.plugin,
        confirmed_flush_lsn: text(slot.confirmed_flush_lsn),
        restart_lsn: text(slot.restart_lsn),
        wal_status: slot.wal_status,
        wal_retained_bytes: slot.wal_retained_bytes.map(|b| b.max(0) as u64),
        failover: slot.failover,
        synced: slot.synced,
        inactive_since: slot.inactive_since,
        invalidation_reason: slot.invalidation_reason,
    });
    let store = Checkpoint::open_read_only(&config.checkpoint.path)?;
    let checkpoint = CheckpointStatus {
        path: config.checkpoint.path.display().to_string(),
        lsn: text(
            store
                .as_ref()
                .map(|c| c.confirmed_lsn())
                .transpose()?
                .flatten(),
        ),
        backfill_hold: text(
            store
                .as_ref()
                .map(|c| c.backfill_hold())
                .transpose()?
                .flatten(),
        ),
    };
    let js = nats::jetstream_for_command(&config.nats).await?;
    let nats = nats::server_features(&js.client()).await.ok();
    let name = &config.nats.stream_name;
    let (stream, tail) = if let Some(stream) = nats::existing_stream(&js, name).await? {
        let tail = history::read_tail(&js, name, slot_name, history::REPORT_SEARCH_LIMIT).await?;
        (stream_status(stream, name, slot_name, &tail).await?, tail)
    } else {
        let missing = StreamStatus {
            name: name.clone(),
            ..Default::default()
        };
        (missing, history::StreamTail::default())
    };
    let replay = tail.replay().and_then(|headers| {
        let state = match (headers.from, tail.position()) {
            (Some(_), _) => "requested",
            (None, Some(last)) if last < headers.replay.through => "in progress",
            (None, _) => return None,
        };
        Some(ReplayStatus {
            id: headers.replay.id,
            state,
            through: PositionText(headers.replay.through).to_string(),
        })
    });
    Ok(Status {
        slot,
        nats,
        checkpoint,
        stream,
        lag_bytes,
        lag_seconds,
        replay,
    })
}

async fn stream_status(
    mut stream: jetstream::stream::Stream,
    name: &str,
    slot: &str,
    tail: &history::StreamTail,
) -> anyhow::Result<StreamStatus> {
    let state = stream.info().await?.state.clone();
    let (first, last) = match &tail.own {
        Some(own) if state.messages > 0 => (
            history::meta_at_or_after(&stream, slot, state.first_sequence, own.sequence).await?,
            history::meta_at_or_after(&stream, slot, own.sequence, own.sequence).await?,
        ),
        _ => (None, None),
    };
    let lsn = |m: &Option<StoredMeta>| m.as_ref().map(|m| m.position.commit_lsn.to_string());
    let when = |m: &Option<StoredMeta>| m.as_ref().and_then(|m| m.time.format(&Rfc3339).ok());
    Ok(StreamStatus {
        name: name.to_owned(),
        exists: true,
        messages: state.messages,
        bytes: state.bytes,
        first_sequence: state.first_sequence,
        last_sequence: state.last_sequence,
        first_lsn: lsn(&first),
        last_lsn: lsn(&last),
        first_time: when(&first),
        last_time: when(&last),
        other_messages_after_last_event: tail.others_after,
    })
}

impl Answer for Status {
    fn print_text(&self) {
        match &self.slot {
            Some(slot) => {
                let activity = match (slot.active, slot.active_pid) {
                    (true, Some(pid)) => format!("active (walsender pid {pid})"),
                    _ => "inactive".to_owned(),
                };
                println!(
                    "slot {}: {activity}, plugin {}, wal_status {}",
                    slot.name,
                    slot.plugin.as_deref().unwrap_or("?"),
                    slot.wal_status.as_deref().unwrap_or("?")
                );
                println!(
                    "  confirmed_flush_lsn {}, restart_lsn {}, WAL retained {}",
                    slot.confirmed_flush_lsn.as_deref().unwrap_or("-"),
                    slot.restart_lsn.as_deref().unwrap_or("-"),
                    slot.wal_retained_bytes.map_or("-".into(), human_bytes)
                );
                if let Some(failover) = slot.failover {
                    println!(
                        "  failover {failover}, synced {}, inactive since {}",
                        slot.synced.unwrap_or(false),
                        slot.inactive_since.as_deref().unwrap_or("-")
                    );
                }
                if let Some(reason) = &slot.invalidation_reason {
                    println!("  INVALIDATED: {reason} (walstream check says how to recover)");
                }
            }
            None => println!("slot: does not exist (walstream setup creates it)"),
        }
        println!(
            "checkpoint {}: {}",
            self.checkpoint.path,
            self.checkpoint.lsn.as_deref().unwrap_or("none yet")
        );
        if let Some(hold) = &self.checkpoint.backfill_hold {
            println!("  a backfill is under way: the slot is held at {hold}");
        }
        if let Some(replay) = &self.replay {
            println!(
                "replay {}: {}, through {}",
                replay.id, replay.state, replay.through
            );
        }
        if let Some(nats) = &self.nats {
            println!("NATS: {nats}");
        }
        self.stream.print();
        println!(
            "lag: {} behind the server's WAL, {}",
            self.lag_bytes.map_or("-".into(), human_bytes),
            self.lag_seconds
                .map_or("no lag reported by PostgreSQL".into(), |s| format!(
                    "{s:.1} s"
                ))
        );
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Where `seek` starts looking.
#[derive(Debug, Clone, Copy)]
pub enum SeekTarget {
    Lsn(Lsn),
    Time(OffsetDateTime),
}

impl SeekTarget {
    pub fn parse(lsn: Option<&str>, time: Option<&str>) -> anyhow::Result<Self> {
        match (lsn, time) {
            (Some(lsn), None) => parse_lsn(lsn)
                .map(SeekTarget::Lsn)
                .map_err(|e| anyhow::anyhow!("--lsn: {e}")),
            (None, Some(time)) => OffsetDateTime::parse(time, &Rfc3339)
                .map(SeekTarget::Time)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "--time `{time}`: not an RFC 3339 time such as 2026-11-22T08:00:00Z ({e})"
                    )
                }),
            _ => anyhow::bail!("give exactly one of --lsn and --time"),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SeekResult {
    pub stream: String,
    /// The first event at or after the target; `None` when every event is before it.
    pub sequence: Option<u64>,
    pub lsn: Option<String>,
    pub time: Option<String>,
    /// Whether older events have left the stream (retention), so events just before the
    /// target may be gone.
    pub older_events_purged: bool,
}

impl StreamStatus {
    fn print(&self) {
        let s = self;
        if !s.exists {
            println!(
                "stream {}: does not exist yet; walstream creates it at its first start \
             (stream, run or dev)",
                s.name
            );
            return;
        }
        println!(
            "stream {}: {} messages, {}, sequences {}..{}",
            s.name,
            s.messages,
            human_bytes(s.bytes),
            s.first_sequence,
            s.last_sequence
        );
        if s.messages > 0 {
            println!(
                "  first event LSN {} ({}), last event LSN {} ({})",
                s.first_lsn.as_deref().unwrap_or("-"),
                s.first_time.as_deref().unwrap_or("-"),
                s.last_lsn.as_deref().unwrap_or("-"),
                s.last_time.as_deref().unwrap_or("-")
            );
        }
        if s.other_messages_after_last_event > 0 {
            println!(
                "  {} messages after walstream's last event were published by another client",
                s.other_messages_after_last_event
            );
        }
    }
}

/// The stream sequence of the first event at or after `target`.
pub async fn seek(config: &Config, target: SeekTarget) -> anyhow::Result<SeekResult> {
    let js = nats::jetstream_for_command(&config.nats).await?;
    let name = &config.nats.stream_name;
    let mut stream = js
        .get_stream(name)
        .await
        .with_context(|| format!("stream {name}"))?;
    let state = stream.info().await?.state.clone();
    let reached = |meta: &StoredMeta| match target {
        SeekTarget::Lsn(lsn) => meta.position.commit_lsn >= lsn,
        SeekTarget::Time(time) => meta.time >= time,
    };
    let found = if state.messages == 0 {
        None
    } else {
        let slot = &config.replication.slot;
        history::first_where(
            &stream,
            slot,
            state.first_sequence,
            state.last_sequence,
            reached,
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "searching stream {name}: {}",
                secrets::redact_urls(&e.to_string())
            )
        })?
    };
    Ok(SeekResult {
        stream: name.clone(),
        sequence: found.as_ref().map(|m| m.sequence),
        lsn: found.as_ref().map(|m| m.position.commit_lsn.to_string()),
        time: found.as_ref().and_then(|m| m.time.format(&Rfc3339).ok()),
        older_events_purged: state.first_sequence > 1,
    })
}

impl Answer for SeekResult {
    fn print_text(&self) {
        match self.sequence {
            Some(sequence) => {
                println!(
                    "{sequence}\n  first event at or after the target in stream {}: LSN {}, committed {}",
                    self.stream,
                    self.lsn.as_deref().unwrap_or("-"),
                    self.time.as_deref().unwrap_or("-")
                );
                println!(
                    "  consume from here with DeliverPolicy::ByStartSequence {{ start_sequence: {sequence} }} \
                     (nats CLI: --deliver {sequence})"
                );
            }
            None => println!(
                "no event in stream {} is at or after the target",
                self.stream
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seek_targets_are_checked() {
        assert!(matches!(
            SeekTarget::parse(Some("0/16B3748"), None),
            Ok(SeekTarget::Lsn(_))
        ));
        assert!(matches!(
            SeekTarget::parse(None, Some("2026-11-22T08:00:00Z")),
            Ok(SeekTarget::Time(_))
        ));
        let bad_time = SeekTarget::parse(None, Some("yesterday"))
            .unwrap_err()
            .to_string();
        assert!(bad_time.contains("RFC 3339"), "{bad_time}");
        assert!(SeekTarget::parse(None, None).is_err());
        assert!(SeekTarget::parse(Some("0/1"), Some("2026-11-22T08:00:00Z")).is_err());
        assert!(SeekTarget::parse(Some("16B3748"), None).is_err());
    }

    #[test]
    fn bytes_read_like_a_human_wrote_them() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 kB");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MB");
    }
}
