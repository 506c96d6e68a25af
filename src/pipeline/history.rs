//! walstream's events as the stream holds them, beside other clients' messages: the last one
//! (where to resume), and the first at or after an LSN or a commit time (`seek`, `tail`, the
//! GraphQL feed).

use async_nats::jetstream;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::lsn::{lsn_text, parse_lsn};
use crate::nats::message_at;
use crate::nats::wire::MESSAGE_ID;
use crate::pipeline::event::failover::{FailoverMarker, Phantoms};
use crate::pipeline::event::replay::ReplayHeaders;
use crate::pipeline::event::{message_id_from_prefix, message_id_prefix, Position};
use crate::pipeline::event::{
    HEADER_COMMIT_TIME, HEADER_LSN, HEADER_SEQ, HEADER_TIMELINE, HEADER_XID,
};

/// Where the stream ends, and walstream's last message in it. Other clients may publish into
/// the stream too: their messages can follow walstream's last one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamTail {
    /// Last sequence assigned (0 for a stream that never held a message).
    pub sequence: u64,
    /// walstream's last message, when one was found.
    pub own: Option<OwnMessage>,
    /// Messages after it that walstream did not publish (or that are gone).
    pub others_after: u64,
    /// The search for walstream's last message stopped at its limit without reaching the
    /// stream's first message.
    pub search_cut_short: bool,
}

impl StreamTail {
    /// The WAL position of walstream's last event in the stream.
    pub fn position(&self) -> Option<Position> {
        self.own.as_ref().and_then(|own| own.position)
    }

    /// What walstream's last message says about a replay.
    pub fn replay(&self) -> Option<ReplayHeaders> {
        self.own.as_ref().and_then(|own| own.replay)
    }

    /// The PostgreSQL timeline walstream's last message was read on (`None` before walstream
    /// wrote it into its events).
    pub fn timeline(&self) -> Option<u32> {
        self.own.as_ref().and_then(|own| own.timeline)
    }
}

/// A message walstream published: an event, or a replay's marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnMessage {
    pub sequence: u64,
    /// The event's WAL position (`None` for a replay's marker).
    pub position: Option<Position>,
    pub replay: Option<ReplayHeaders>,
    /// The PostgreSQL timeline it was read on.
    pub timeline: Option<u32>,
}

/// How many messages the search for walstream's last message reads back from the stream's end
/// before it gives up, where resuming depends on it (another client publishing heavily while
/// walstream was down).
pub const RESUME_SEARCH_LIMIT: u64 = 100_000;
/// The same for a look at the stream (`check`, `status`), which must answer quickly.
pub const REPORT_SEARCH_LIMIT: u64 = 1_000;

/// Reads the stream's last sequence and finds walstream's last message (of `slot`), reading
/// back past at most `limit` messages other clients published after it.
pub async fn read_tail(
    js: &jetstream::Context,
    name: &str,
    slot: &str,
    limit: u64,
) -> anyhow::Result<StreamTail> {
    let mut stream = js.get_stream(name).await?;
    let info = stream.info().await?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut tail = StreamTail {
        sequence: last,
        ..Default::default()
    };
    let mut sequence = last;
    while sequence >= first.max(1) {
        if last - sequence >= limit {
            tail.search_cut_short = true;
            break;
        }
        // Gone (max_age, deleted) says nothing about who published it.
        let message = message_at(&stream, sequence).await?;
        if let Some(own) = message.and_then(|m| own_message(&m.headers, sequence, slot)) {
            tail.own = Some(own);
            break;
        }
        tail.others_after += 1;
        sequence -= 1;
    }
    Ok(tail)
}

/// The message as walstream published it for `slot`, or `None` when another client did. Its
/// `Nats-Msg-Id` must be the one walstream derives from its own headers: a message without an
/// id, with another id, or with walstream's headers under another id is not walstream's.
pub fn own_message(
    headers: &async_nats::HeaderMap,
    sequence: u64,
    slot: &str,
) -> Option<OwnMessage> {
    let id = headers.get(MESSAGE_ID)?;
    let id = id.as_str();
    let local = id.strip_prefix(slot)?.strip_prefix(':')?;
    let header = |name: &str| headers.get(name).map(|v| v.as_str());
    let timeline = header(HEADER_TIMELINE).and_then(|t| t.parse().ok());
    if let (Some((_, switch)), Some(timeline)) = (FailoverMarker::read(headers), timeline) {
        let own = id == FailoverMarker::message_id(slot, timeline, switch);
        return own.then_some(OwnMessage {
            sequence,
            position: Some(FailoverMarker::position(switch)),
            replay: None,
            timeline: Some(timeline),
        });
    }
    let replay = ReplayHeaders::read(headers).ok()?;
    if let Some(marker) = replay.filter(|r| r.from.is_some()) {
        let own = local == format!("replay:{}", marker.replay.id);
        return own.then_some(OwnMessage {
            sequence,
            position: None,
            replay,
            timeline,
        });
    }
    let xid = header(HEADER_XID)?.parse().ok()?;
    let commit_lsn = parse_lsn(header(HEADER_LSN)?).ok()?;
    let seq = header(HEADER_SEQ)?.parse().ok()?;
    let prefix = message_id_prefix(slot, xid, &lsn_text(commit_lsn));
    let expected = message_id_from_prefix(&prefix, seq, replay.map(|r| r.replay.id));
    (expected == id).then_some(OwnMessage {
        sequence,
        position: Some(Position { commit_lsn, seq }),
        replay,
        timeline,
    })
}

/// What a search of the stream sees of one of walstream's messages.
#[derive(Debug, Clone)]
pub struct StoredMeta {
    pub sequence: u64,
    /// Its place in WAL order. A replayed event (and a replay's marker) stands where the replay
    /// was asked for, after everything it replays, so positions never go backwards along
    /// walstream's messages.
    pub position: Position,
    /// The commit time walstream wrote, else the time JetStream stored the message (always,
    /// for a replayed event: its commit time is old news).
    pub time: time::OffsetDateTime,
}

/// walstream's first message in `first..=last` for which `reached` holds, where `reached`
/// holds for a suffix of walstream's messages (their order is WAL order, so "at or after an
/// LSN" and "at or after a commit time" are such suffixes). A binary search: about 20 reads on
/// a million messages. Other clients' messages are passed over. The caller gives the range
/// from the stream info it already read.
pub async fn first_where(
    stream: &jetstream::stream::Stream,
    slot: &str,
    first: u64,
    last: u64,
    reached: impl Fn(&StoredMeta) -> bool,
) -> anyhow::Result<Option<StoredMeta>> {
    let (mut low, mut high) = (first, last + 1);
    while low < high {
        let middle = low + (high - low) / 2;
        match meta_at_or_after(stream, slot, middle, last).await? {
            Some(meta) if reached(&meta) => high = middle,
            Some(meta) => low = meta.sequence + 1,
            None => high = middle,
        }
    }
    match meta_at_or_after(stream, slot, low, last).await? {
        Some(meta) if reached(&meta) => Ok(Some(meta)),
        _ => Ok(None),
    }
}

/// walstream's message at `sequence`, or its next one (messages can be deleted from the
/// middle of a stream, and other clients' messages are not walstream's); `None` past `last`.
pub async fn meta_at_or_after(
    stream: &jetstream::stream::Stream,
    slot: &str,
    mut sequence: u64,
    last: u64,
) -> anyhow::Result<Option<StoredMeta>> {
    while sequence <= last {
        let Some(message) = message_at(stream, sequence).await? else {
            sequence += 1;
            continue;
        };
        let Some(own) = own_message(&message.headers, sequence, slot) else {
            sequence += 1;
            continue;
        };
        let meta = match (own.replay, own.position) {
            (Some(replay), _) => StoredMeta {
                sequence,
                position: replay.replay.through,
                time: message.time,
            },
            (None, Some(position)) => StoredMeta {
                sequence,
                position,
                time: message
                    .headers
                    .get(HEADER_COMMIT_TIME)
                    .and_then(|v| OffsetDateTime::parse(v.as_str(), &Rfc3339).ok())
                    .unwrap_or(message.time),
            },
            // own_message gives every event a position; a marker has its replay.
            (None, None) => {
                sequence += 1;
                continue;
            }
        };
        return Ok(Some(meta));
    }
    Ok(None)
}

/// walstream's events committed at or after `lsn`, to the stream's end: the first, the last and
/// how many (`None` when there are none). After a failover these are the events the promoted
/// standby's history does not hold.
pub async fn events_since(
    js: &jetstream::Context,
    name: &str,
    slot: &str,
    lsn: crate::lsn::Lsn,
) -> anyhow::Result<Option<Phantoms>> {
    let mut stream = js.get_stream(name).await?;
    let info = stream.info().await?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let Some(start) =
        first_where(&stream, slot, first, last, |m| m.position.commit_lsn >= lsn).await?
    else {
        return Ok(None);
    };
    let mut events = Phantoms {
        first_sequence: start.sequence,
        last_sequence: start.sequence,
        count: 0,
        first: start.position,
        last: start.position,
    };
    let mut next = start.sequence;
    while let Some(meta) = meta_at_or_after(&stream, slot, next, last).await? {
        events.count += 1;
        (events.last_sequence, events.last) = (meta.sequence, meta.position);
        next = meta.sequence + 1;
    }
    Ok(Some(events))
}
