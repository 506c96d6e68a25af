//! Creating or updating walstream's stream, and reading where it ends.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::config::{JetStreamConfig, StorageKind};
use crate::event::{message_id_from_prefix, message_id_prefix, Position};
use crate::event::{HEADER_COMMIT_TIME, HEADER_LSN, HEADER_SEQ, HEADER_XID};
use crate::lsn::parse_lsn;
use crate::replay::ReplayHeaders;

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
}

/// A message walstream published: an event, or a replay's marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnMessage {
    pub sequence: u64,
    /// The event's WAL position (`None` for a replay's marker).
    pub position: Option<Position>,
    pub replay: Option<ReplayHeaders>,
}

/// How many messages the search for walstream's last message reads back from the stream's end
/// before it gives up, where resuming depends on it (another client publishing heavily while
/// walstream was down).
pub const RESUME_SEARCH_LIMIT: u64 = 100_000;
/// The same for a look at the stream (`check`, `status`), which must answer quickly.
pub const REPORT_SEARCH_LIMIT: u64 = 1_000;

/// Creates the stream, or updates it to the configured settings.
pub async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: Vec<String>,
    settings: &JetStreamConfig,
) -> anyhow::Result<stream::Info> {
    let wanted = stream::Config {
        name: name.to_owned(),
        subjects,
        duplicate_window: Duration::from_secs(settings.dedup_window_minutes * 60),
        max_age: Duration::from_secs(settings.max_age_days * 86_400),
        max_messages: settings.max_msgs,
        max_bytes: settings.max_bytes,
        num_replicas: settings.replicas,
        storage: match settings.storage {
            StorageKind::File => stream::StorageType::File,
            StorageKind::Memory => stream::StorageType::Memory,
        },
        ..Default::default()
    };
    match js.get_stream(name).await {
        Ok(mut existing) => {
            let current = existing.info().await?.config.clone();
            if current.storage != wanted.storage {
                anyhow::bail!(
                    "stream {name} exists with {:?} storage but nats.jetstream.storage asks for \
                     {:?}; JetStream cannot change storage in place. Set storage to match, or \
                     move the stream's data and delete it so walstream can recreate it",
                    current.storage,
                    wanted.storage
                );
            }
            if current.retention != wanted.retention {
                anyhow::bail!(
                    "stream {name} exists with {:?} retention; walstream needs limits retention \
                     (its consumers read at their own pace). Use another nats.stream_name",
                    current.retention
                );
            }
            let differs = current.subjects != wanted.subjects
                || current.duplicate_window != wanted.duplicate_window
                || current.max_age != wanted.max_age
                || current.max_messages != wanted.max_messages
                || current.max_bytes != wanted.max_bytes
                || current.num_replicas != wanted.num_replicas;
            if !differs {
                return Ok(existing.info().await?.clone());
            }
            tracing::info!(
                stream = name,
                "updating the stream to the configured settings"
            );
            js.update_stream(&wanted).await.map_err(|e| {
                anyhow::anyhow!(
                    "cannot update stream {name} to the configured settings: {e}. If its \
                     subjects overlap another stream's, change nats.subject_prefix or routes"
                )
            })
        }
        Err(error) if is_not_found(&error) => {
            tracing::info!(stream = name, subjects = ?wanted.subjects, "creating the stream");
            js.create_stream(wanted)
                .await
                .map(|s| s.cached_info().clone())
                .map_err(|e| {
                    anyhow::anyhow!(
                    "cannot create stream {name}: {e}. If its subjects overlap another stream's, \
                     change nats.subject_prefix or routes; is JetStream enabled (nats-server -js)?"
                )
                })
        }
        Err(error) => Err(anyhow::anyhow!(
            "cannot look up stream {name}: {error}; is JetStream enabled (nats-server -js)?"
        )),
    }
}

/// Opens a key-value bucket, creating it if missing. The bucket's stream is created here, with
/// the settings async-nats would use, because its own `create_key_value` first reads account
/// information that nats-server 2.9 answers in a form it cannot parse.
pub async fn ensure_key_value(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
    max_age: Duration,
    replicas: usize,
) -> anyhow::Result<jetstream::kv::Store> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    let created = js
        .create_stream(stream::Config {
            name: format!("KV_{bucket}"),
            description: Some(description.to_owned()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age,
            num_replicas: replicas.max(1),
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await;
    if let Err(error) = created {
        // Another process may have created it meanwhile.
        if js.get_key_value(bucket).await.is_err() {
            anyhow::bail!("cannot create the key-value bucket {bucket}: {error}");
        }
    }
    js.get_key_value(bucket)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the key-value bucket {bucket}: {e}"))
}

/// The stream, or `None` when it does not exist yet (walstream creates it at its first start).
pub async fn existing_stream(
    js: &jetstream::Context,
    name: &str,
) -> anyhow::Result<Option<jetstream::stream::Stream>> {
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream)),
        Err(error) if is_not_found(&error) => Ok(None),
        Err(error) => Err(anyhow::anyhow!("cannot look up stream {name}: {error}")),
    }
}

fn is_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(inner)
            if inner.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

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
    let id = headers.get(async_nats::header::NATS_MESSAGE_ID)?;
    let id = id.as_str();
    let local = id.strip_prefix(slot)?.strip_prefix(':')?;
    let replay = ReplayHeaders::read(headers).ok()?;
    if let Some(marker) = replay.filter(|r| r.from.is_some()) {
        let own = local == format!("replay:{}", marker.replay.id);
        return own.then_some(OwnMessage {
            sequence,
            position: None,
            replay,
        });
    }
    let header = |name: &str| headers.get(name).map(|v| v.as_str());
    let xid = header(HEADER_XID)?.parse().ok()?;
    let commit_lsn = parse_lsn(header(HEADER_LSN)?).ok()?;
    let seq = header(HEADER_SEQ)?.parse().ok()?;
    let prefix = message_id_prefix(slot, xid, commit_lsn);
    let expected = message_id_from_prefix(&prefix, seq, replay.map(|r| r.replay.id));
    (expected == id).then_some(OwnMessage {
        sequence,
        position: Some(Position { commit_lsn, seq }),
        replay,
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

/// The message at `sequence`; `None` when it is gone (expired, deleted) or was never stored.
/// Any other failure (a timeout during a leader election) says nothing about the message and
/// is an error, never taken for "gone".
pub async fn message_at(
    stream: &jetstream::stream::Stream,
    sequence: u64,
) -> anyhow::Result<Option<jetstream::message::StreamMessage>> {
    match stream.get_raw_message(sequence).await {
        Ok(message) => Ok(Some(message)),
        Err(error) if is_no_message(&error) => Ok(None),
        Err(error) => anyhow::bail!("reading message {sequence} of the stream: {error}"),
    }
}

fn is_no_message(error: &jetstream::stream::RawMessageError) -> bool {
    match error.kind() {
        jetstream::stream::RawMessageErrorKind::NoMessageFound => true,
        jetstream::stream::RawMessageErrorKind::JetStream(inner) => {
            inner.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND
        }
        _ => false,
    }
}
