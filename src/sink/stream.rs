//! Creating or updating walstream's stream, and reading where it ends.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::config::{JetStreamConfig, StorageKind};
use crate::event::Position;
use crate::event::{HEADER_COMMIT_TIME, HEADER_LSN, HEADER_SEQ};
use crate::lsn::parse_lsn;
use crate::replay::ReplayHeaders;

/// The last message of the stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamTail {
    /// Last sequence assigned (0 for a stream that never held a message).
    pub sequence: u64,
    /// Its `Nats-Msg-Id`, when the message is still there.
    pub message_id: Option<String>,
    /// Its WAL position, read from walstream's headers.
    pub position: Option<Position>,
    /// Set when it is a replay's marker or a replayed event.
    pub replay: Option<ReplayHeaders>,
}

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

fn is_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(inner)
            if inner.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// Reads the stream's last sequence and, when the message is still stored, its headers.
pub async fn read_tail(js: &jetstream::Context, name: &str) -> anyhow::Result<StreamTail> {
    let mut stream = js.get_stream(name).await?;
    let sequence = stream.info().await?.state.last_sequence;
    if sequence == 0 {
        return Ok(StreamTail::default());
    }
    let message = match stream.get_raw_message(sequence).await {
        Ok(message) => message,
        // Expired (max_age) or deleted: the sequence is all there is.
        Err(error) if is_no_message(&error) => {
            return Ok(StreamTail {
                sequence,
                ..Default::default()
            })
        }
        // Anything else (a timeout during a leader election) says nothing about the message;
        // a tail without its id would be mistaken for one whose message is gone.
        Err(error) => anyhow::bail!("reading the stream's last message ({sequence}): {error}"),
    };
    Ok(StreamTail {
        sequence,
        message_id: message
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str().to_owned()),
        position: position_of(&message.headers, sequence)?,
        replay: ReplayHeaders::read(&message.headers)
            .map_err(|e| anyhow::anyhow!("message {sequence}: {e}"))?,
    })
}

/// The WAL position walstream wrote in a stored message's headers; `None` for a message
/// walstream did not publish.
pub fn position_of(
    headers: &async_nats::HeaderMap,
    sequence: u64,
) -> anyhow::Result<Option<Position>> {
    let header = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
    Ok(match (header(HEADER_LSN), header(HEADER_SEQ)) {
        (Some(lsn), Some(seq)) => Some(Position {
            commit_lsn: parse_lsn(&lsn).map_err(anyhow::Error::msg)?,
            seq: seq
                .parse()
                .map_err(|_| anyhow::anyhow!("message {sequence}: bad {HEADER_SEQ} `{seq}`"))?,
        }),
        _ => None,
    })
}

/// What a search of the stream sees of one stored message.
#[derive(Debug, Clone)]
pub struct StoredMeta {
    pub sequence: u64,
    /// Its place in WAL order; `None` for a message walstream did not publish. A replayed
    /// event (and a replay's marker) stands where the replay was asked for, after everything
    /// it replays, so positions never go backwards along the stream.
    pub position: Option<Position>,
    /// The commit time walstream wrote, else the time JetStream stored the message (always,
    /// for a replayed event: its commit time is old news).
    pub time: time::OffsetDateTime,
}

/// The first message in `first..=last` for which `reached` holds, where `reached` holds for a
/// suffix of the stream (stream order is WAL order, so "at or after an LSN" and "at or after a
/// commit time" are such suffixes). A binary search: about 20 reads on a million messages.
/// The caller gives the range from the stream info it already read.
pub async fn first_where(
    stream: &jetstream::stream::Stream,
    first: u64,
    last: u64,
    reached: impl Fn(&StoredMeta) -> bool,
) -> anyhow::Result<Option<StoredMeta>> {
    let (mut low, mut high) = (first, last + 1);
    while low < high {
        let middle = low + (high - low) / 2;
        match meta_at_or_after(stream, middle, last).await? {
            Some(meta) if reached(&meta) => high = middle,
            Some(meta) => low = meta.sequence + 1,
            None => high = middle,
        }
    }
    match meta_at_or_after(stream, low, last).await? {
        Some(meta) if reached(&meta) => Ok(Some(meta)),
        _ => Ok(None),
    }
}

/// The message at `sequence`, or the next stored one (messages can be deleted from the middle
/// of a stream); `None` past `last`.
pub async fn meta_at_or_after(
    stream: &jetstream::stream::Stream,
    mut sequence: u64,
    last: u64,
) -> anyhow::Result<Option<StoredMeta>> {
    while sequence <= last {
        let message = match stream.get_raw_message(sequence).await {
            Ok(message) => message,
            Err(error) if is_no_message(&error) => {
                sequence += 1;
                continue;
            }
            Err(error) => anyhow::bail!("reading message {sequence} of the stream: {error}"),
        };
        let replay = ReplayHeaders::read(&message.headers)
            .map_err(|e| anyhow::anyhow!("message {sequence}: {e}"))?;
        if let Some(replay) = replay {
            return Ok(Some(StoredMeta {
                sequence,
                position: Some(replay.replay.through),
                time: message.time,
            }));
        }
        let time = message
            .headers
            .get(HEADER_COMMIT_TIME)
            .and_then(|v| {
                time::OffsetDateTime::parse(
                    v.as_str(),
                    &time::format_description::well_known::Rfc3339,
                )
                .ok()
            })
            .unwrap_or(message.time);
        return Ok(Some(StoredMeta {
            sequence,
            position: position_of(&message.headers, sequence)?,
            time,
        }));
    }
    Ok(None)
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
