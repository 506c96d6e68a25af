//! JetStream streams: creating or updating one to the configured settings, finding one, and
//! reading a message at a sequence.

use std::time::Duration;

use async_nats::jetstream::context::{CreateStreamError, CreateStreamErrorKind};
use async_nats::jetstream::{self, stream, ErrorCode};

use crate::config::{JetStreamConfig, StorageKind};

/// The batch publishing a stream allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// Atomic batches (`allow_atomic`, nats-server 2.12+).
    pub atomic: bool,
    /// Fast-ingest batches (`allow_batched`, nats-server 2.14+).
    pub batched: bool,
}

/// Creates the stream, or updates it to the configured settings; `batches` turns on batch
/// publishing, which is never turned off once on (another walstream may rely on it).
pub async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: Vec<String>,
    settings: &JetStreamConfig,
    batches: BatchSettings,
) -> anyhow::Result<stream::Info> {
    let mut wanted = stream::Config {
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
        allow_atomic_publish: batches.atomic,
        allow_batch_publish: batches.batched,
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
            wanted.allow_atomic_publish |= current.allow_atomic_publish;
            wanted.allow_batch_publish |= current.allow_batch_publish;
            let differs = current.allow_atomic_publish != wanted.allow_atomic_publish
                || current.allow_batch_publish != wanted.allow_batch_publish
                || current.subjects != wanted.subjects
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
                    "cannot update stream {name} to the configured settings: {e}. {}",
                    refusal_hint(refusal_code(&e), settings)
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
                        "cannot create stream {name}: {e}. {}",
                        refusal_hint(refusal_code(&e), settings)
                    )
                })
        }
        Err(error) => Err(anyhow::anyhow!(
            "cannot look up stream {name}: {error}; is JetStream enabled (nats-server -js)?"
        )),
    }
}

/// The JetStream error code of the server's refusal, when it gave one.
fn refusal_code(error: &CreateStreamError) -> Option<ErrorCode> {
    match error.kind() {
        CreateStreamErrorKind::JetStream(error) => Some(error.error_code()),
        _ => None,
    }
}

/// What to do about the server refusing the stream, by its error code.
fn refusal_hint(code: Option<ErrorCode>, settings: &JetStreamConfig) -> String {
    let server_limit = match settings.storage {
        StorageKind::File => "max_file_store, by default three quarters of the disk space free",
        StorageKind::Memory => "max_memory_store, by default three quarters of the memory",
    };
    match code {
        Some(ErrorCode::STORAGE_RESOURCES_EXCEEDED | ErrorCode::INSUFFICIENT_RESOURCES) => {
            let wanted = match settings.max_bytes {
                bytes if bytes > 0 => format!("nats.jetstream.max_bytes ({bytes} bytes)"),
                _ => "the stream".to_owned(),
            };
            format!(
                "The server's JetStream has no room for {wanted}: lower max_bytes, or give \
                 the server more ({server_limit} when it started)"
            )
        }
        Some(ErrorCode::STREAM_SUBJECT_OVERLAP) => {
            "Its subjects overlap another stream's: change nats.subject_prefix or routes".to_owned()
        }
        _ => "If its subjects overlap another stream's, change nats.subject_prefix or routes; \
              is JetStream enabled (nats-server -js)?"
            .to_owned(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A refusal as the server sends it (nats-server 2.9 on a disk with less free space than
    /// three quarters of the stream's default max_bytes, seen in a test run).
    fn refusal(err_code: u64, description: &str) -> CreateStreamError {
        let error: jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 500, "err_code": err_code, "description": description
        }))
        .expect("the server's error object");
        CreateStreamError::new(CreateStreamErrorKind::JetStream(error))
    }

    #[test]
    fn a_server_without_room_for_the_stream_is_told_apart_from_an_overlap() {
        let settings = JetStreamConfig::default();
        let no_room = refusal(10047, "insufficient storage resources available");
        let hint = refusal_hint(refusal_code(&no_room), &settings);
        assert!(hint.contains("max_bytes (10737418240 bytes)"), "{hint}");
        assert!(hint.contains("max_file_store"), "{hint}");
        assert!(!hint.contains("overlap"), "{hint}");

        let overlap = refusal(10065, "subjects overlap with an existing stream");
        let hint = refusal_hint(refusal_code(&overlap), &settings);
        assert!(hint.contains("nats.subject_prefix"), "{hint}");
        assert!(!hint.contains("max_bytes"), "{hint}");

        let unlimited = JetStreamConfig {
            max_bytes: -1,
            storage: StorageKind::Memory,
            ..JetStreamConfig::default()
        };
        let hint = refusal_hint(refusal_code(&no_room), &unlimited);
        assert!(hint.contains("no room for the stream"), "{hint}");
        assert!(hint.contains("max_memory_store"), "{hint}");
    }
}
