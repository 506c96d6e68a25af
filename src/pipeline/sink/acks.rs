//! Acknowledgements of pipelined JetStream publishes: one inbox subscription receives them
//! all, each matched to its publish by the token ending its reply subject.
//!
//! async-nats' JetStream publish gives every message its own inbox, oneshot channel, boxed
//! future and timer, and parses each answer through an untagged enum; at tens of thousands of
//! events a second that was a large share of walstream's CPU. Here a publish costs its reply
//! subject, one entry in a queue, and an answer parsed without allocating.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use async_nats::{Client, Message, StatusCode, Subscriber};
use futures::{FutureExt as _, StreamExt};
use tokio::time::{Instant, Sleep};

use crate::nats::wire::HeaderBlock;
use crate::nats::{PublishError, Publisher};

/// JetStream stored the message at `sequence` (`duplicate`: it already held its id); for a
/// batch's commit, the batch's last message, the batch being `batch_count` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub sequence: u64,
    pub duplicate: bool,
    pub batch_count: Option<usize>,
}

/// Why one publish did not go through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishFailure {
    TooLarge,
    Failed { kind: &'static str, detail: String },
    Unexpected(String),
}

impl PublishFailure {
    pub fn kind(&self) -> &'static str {
        match self {
            PublishFailure::TooLarge => "too_large",
            PublishFailure::Failed { kind, .. } => kind,
            PublishFailure::Unexpected(_) => "unexpected_ack",
        }
    }

    /// The stream's end was not what the publish expected: something was stored before it.
    pub fn stream_moved(&self) -> bool {
        matches!(self.kind(), "wrong_last_sequence" | "wrong_last_msg_id")
    }

    /// The server is busy with what it has: re-sending at once would only meet the same answer.
    pub fn server_busy(&self) -> bool {
        matches!(
            self.kind(),
            "ingest_limit" | "duplicate_in_process" | "batches_in_flight"
        )
    }

    /// A refusal that re-sending cannot change, as the error walstream stops with.
    pub fn fatal_for(&self, stream: &str) -> Option<super::SinkError> {
        let PublishFailure::Failed { kind, detail } = self else {
            return None;
        };
        let why = match *kind {
            "atomic_disabled" => format!(
                "stream {stream} refused an atomic batch ({detail}): its allow_atomic setting \
                 was turned off while walstream ran. walstream publishes to replicated streams \
                 in atomic batches on nats-server 2.12.1+ and turns the setting on when it \
                 starts: restart walstream"
            ),
            "batch_too_large" => format!(
                "stream {stream} refused a batch as too large ({detail}): the server's \
                 jetstream.limits.batch.max_msgs is below nats.max_inflight. Lower \
                 nats.max_inflight to the server's limit, or raise the limit, and restart"
            ),
            "batch_header_refused" => format!(
                "stream {stream} refused a header inside an atomic batch ({detail}): this \
                 nats-server does not take message ids in batches (2.12.0 does not). Upgrade \
                 nats-server to 2.12.1 or later"
            ),
            "fast_ingest_disabled" => format!(
                "stream {stream} refused a fast-ingest batch ({detail}): its allow_batched \
                 setting was turned off while walstream ran. walstream publishes in fast-ingest \
                 batches on nats-server 2.14+ and turns the setting on when it starts: restart \
                 walstream, or set nats.fast_ingest = false"
            ),
            "fast_ingest_refused" => format!(
                "stream {stream} refused walstream's fast-ingest batch ({detail}). Set \
                 nats.fast_ingest = false to publish message by message, and report this \
                 with the nats-server version"
            ),
            _ => return None,
        };
        Some(super::SinkError::Fatal(why))
    }

    fn failed(kind: &'static str, detail: impl Into<String>) -> Self {
        PublishFailure::Failed {
            kind,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for PublishFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishFailure::TooLarge => f.write_str("message too large"),
            PublishFailure::Failed { detail, .. } => f.write_str(detail),
            PublishFailure::Unexpected(detail) => f.write_str(detail),
        }
    }
}

pub type AckResult = Result<Stored, PublishFailure>;

/// A publish waiting for its answer.
struct Waiting {
    token: u64,
    deadline: Instant,
    answer: Option<AckResult>,
}

/// Publishes with a reply subject of ours and hands out the answers in publish order.
pub struct Acks {
    subscriber: Subscriber,
    /// `{inbox}.`: a reply subject is this followed by the publish's token.
    prefix: String,
    /// The last reply subject, its prefix kept between publishes.
    reply: String,
    next_token: u64,
    timeout: Duration,
    /// Oldest first; tokens increase.
    waiting: VecDeque<Waiting>,
    /// Set to the oldest publish's deadline, or earlier: it is moved on only when it fires, not
    /// for every answer.
    timer: Pin<Box<Sleep>>,
}

impl Acks {
    /// Subscribes to a fresh inbox; an answer not received within `timeout` of its publish
    /// counts as a failure.
    pub async fn subscribe(client: &Client, timeout: Duration) -> Result<Self, String> {
        let inbox = client.new_inbox();
        let subscriber = subscribe_before_publishing(client, format!("{inbox}.*")).await?;
        Ok(Self {
            subscriber,
            prefix: format!("{inbox}."),
            reply: String::new(),
            next_token: 0,
            timeout,
            waiting: VecDeque::new(),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        })
    }

    /// Publishes to JetStream; its answer comes from [`Acks::next`] after those of every
    /// earlier publish.
    pub async fn publish(
        &mut self,
        publisher: &mut Publisher,
        subject: &str,
        headers: &HeaderBlock,
        payload: &[u8],
    ) -> Result<(), PublishFailure> {
        let token = self.next_token;
        self.reply.clear();
        self.reply.push_str(&self.prefix);
        self.reply.push_str(itoa::Buffer::new().format(token));
        publisher
            .publish(subject, Some(&self.reply), Some(headers), payload)
            .await
            .map_err(publish_failure)?;
        self.next_token += 1;
        self.waiting.push_back(Waiting {
            token,
            deadline: Instant::now() + self.timeout,
            answer: None,
        });
        Ok(())
    }

    /// Sends a message with no answer asked for: a batch's messages before its commit, whose
    /// fate the commit's answer tells.
    pub async fn send_unanswered(
        publisher: &mut Publisher,
        subject: &str,
        headers: &HeaderBlock,
        payload: &[u8],
    ) -> Result<(), PublishFailure> {
        publisher
            .publish(subject, None, Some(headers), payload)
            .await
            .map_err(publish_failure)
    }

    /// Publishes awaiting their answer.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// The answer to the oldest publish still waiting, or its time-out; `None` when none waits.
    /// Cancel-safe: an answer received before a cancellation is kept for the next call.
    pub async fn next(&mut self) -> Option<AckResult> {
        loop {
            let oldest = self.waiting.front_mut()?;
            if let Some(answer) = oldest.answer.take() {
                self.waiting.pop_front();
                return Some(answer);
            }
            let deadline = oldest.deadline;
            // An answer that arrived in time counts even if it is read late: the deadline is
            // judged only with nothing left to read.
            match self.subscriber.next().now_or_never() {
                Some(Some(message)) => {
                    self.record(&message);
                    continue;
                }
                Some(None) => return Some(Err(self.closed())),
                None => {}
            }
            // Checked here too: while answers to later publishes keep arriving, the biased
            // select below never gets to the timer.
            if Instant::now() >= deadline {
                return Some(Err(self.timed_out()));
            }
            tokio::select! {
                biased;
                message = self.subscriber.next() => match message {
                    Some(message) => self.record(&message),
                    None => return Some(Err(self.closed())),
                },
                () = self.timer.as_mut() => {
                    if self.timer.deadline() < deadline {
                        self.timer.as_mut().reset(deadline);
                    } else {
                        return Some(Err(self.timed_out()));
                    }
                }
            }
        }
    }

    /// The subscription ended: the client is closed, so the oldest publish will get no answer.
    fn closed(&mut self) -> PublishFailure {
        self.waiting.pop_front();
        PublishFailure::failed("broken_pipe", "the NATS connection closed")
    }

    /// The oldest publish got no answer in time.
    fn timed_out(&mut self) -> PublishFailure {
        self.waiting.pop_front();
        PublishFailure::failed(
            "timed_out",
            format!("no acknowledgement within {:?}", self.timeout),
        )
    }

    fn record(&mut self, message: &Message) {
        let token = message
            .subject
            .as_str()
            .strip_prefix(self.prefix.as_str())
            .and_then(|token| token.parse::<u64>().ok());
        // An answer to a publish already given up on (timed out) finds no one waiting.
        let Some(index) = token.and_then(|token| {
            self.waiting
                .binary_search_by_key(&token, |waiting| waiting.token)
                .ok()
        }) else {
            return;
        };
        self.waiting[index].answer = Some(answer(message));
    }
}

/// Why the publisher could not send a message.
pub fn publish_failure(error: PublishError) -> PublishFailure {
    match error {
        PublishError::TooLarge { .. } => PublishFailure::TooLarge,
        PublishError::InvalidSubject(_) => {
            PublishFailure::failed("invalid_subject", error.to_string())
        }
        PublishError::Disconnected(_) => PublishFailure::failed("broken_pipe", error.to_string()),
    }
}

/// Subscribes on `client`, and makes sure the server has the subscription before walstream's
/// publisher, another connection, sends anything answered there.
pub async fn subscribe_before_publishing(
    client: &Client,
    subject: String,
) -> Result<Subscriber, String> {
    let subscriber = client
        .subscribe(subject)
        .await
        .map_err(|e| format!("cannot subscribe to JetStream's answers: {e}"))?;
    client
        .flush()
        .await
        .map_err(|e| format!("cannot subscribe to JetStream's answers: {e}"))?;
    Ok(subscriber)
}

/// A JetStream API error refusing a message, by its `err_code`.
pub fn refusal(err_code: u64, description: String) -> PublishFailure {
    PublishFailure::failed(
        match err_code {
            10070 => "wrong_last_msg_id",
            // 10164: another write was in flight when a replicated stream's leader checked.
            10071 | 10164 => "wrong_last_sequence",
            10059 => "stream_not_found",
            // The same as a status 429, where a server answers in JSON.
            10167 => "ingest_limit",
            // 2.11+: a message with this id is being stored right now (a re-send racing its
            // original); it may yet land.
            10158 => "duplicate_in_process",
            // Atomic batches (2.12+): a message id the stream holds refuses the batch whole.
            10201 => "duplicate_in_batch",
            10176 => "batch_incomplete",
            // Too many atomic (10210) or fast (10211) batches in flight on the server.
            10210 | 10211 => "batches_in_flight",
            10174 => "atomic_disabled",
            10199 => "batch_too_large",
            10177 => "batch_header_refused",
            // Fast-ingest batches (2.14+).
            10205 => "fast_ingest_disabled",
            10206 | 10207 => "fast_ingest_refused",
            10208 => "batch_unknown",
            _ => "other",
        },
        description,
    )
}

/// JetStream's answer to a publish: `{"stream":…,"seq":…}`, with `"duplicate":true` when the
/// id was already stored, or `{"error":{…}}`; a 503 status when no stream takes the subject.
pub fn answer(message: &Message) -> AckResult {
    #[derive(serde::Deserialize)]
    struct Reply {
        seq: Option<u64>,
        #[serde(default)]
        duplicate: bool,
        /// A batch's size, in the answer to its commit.
        count: Option<usize>,
        error: Option<ApiError>,
    }
    #[derive(serde::Deserialize)]
    struct ApiError {
        #[serde(default)]
        err_code: u64,
        #[serde(default)]
        description: String,
    }
    if let Some(status) = message.status {
        return Err(if status == StatusCode::NO_RESPONDERS {
            PublishFailure::failed(
                "stream_not_found",
                "no stream takes the subject (no responders)",
            )
        } else if status.as_u16() == 429 {
            // nats-server 2.11+: the stream's ingest queue is full (jetstream.max_buffered_msgs
            // or max_buffered_size); the message was dropped unstored.
            PublishFailure::failed("ingest_limit", "status 429 Too Many Requests")
        } else {
            PublishFailure::failed(
                "other",
                format!(
                    "status {status} {}",
                    message.description.as_deref().unwrap_or("")
                ),
            )
        });
    }
    let reply: Reply = serde_json::from_slice(&message.payload)
        .map_err(|e| PublishFailure::failed("other", format!("unreadable acknowledgement: {e}")))?;
    match (reply.error, reply.seq) {
        (Some(error), _) => Err(refusal(error.err_code, error.description)),
        (None, Some(sequence)) => Ok(Stored {
            sequence,
            duplicate: reply.duplicate,
            batch_count: reply.count,
        }),
        (None, None) => Err(PublishFailure::failed(
            "other",
            format!(
                "acknowledgement without a sequence: {}",
                String::from_utf8_lossy(&message.payload)
            ),
        )),
    }
}

/// A message as JetStream answers on `subject`, for tests.
#[cfg(test)]
pub fn answer_on(subject: &str, payload: &str) -> Message {
    Message {
        subject: async_nats::Subject::from(subject.to_owned()),
        reply: None,
        payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
        headers: None,
        status: None,
        description: None,
        length: payload.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(payload: &str) -> Message {
        answer_on("_INBOX.x.1", payload)
    }

    #[test]
    fn answers_read_like_jetstream_writes_them() {
        assert_eq!(
            answer(&reply(r#"{"stream":"fraiseql_events","seq":42}"#)),
            Ok(Stored {
                sequence: 42,
                duplicate: false,
                batch_count: None
            })
        );
        assert_eq!(
            answer(&reply(
                r#"{"stream":"fraiseql_events","seq":42,"duplicate":true}"#
            )),
            Ok(Stored {
                sequence: 42,
                duplicate: true,
                batch_count: None
            })
        );
        // The answer to an atomic batch's commit (nats-server 2.12+).
        assert_eq!(
            answer(&reply(
                r#"{"stream":"fraiseql_events","seq":50,"batch":"b-1","count":8}"#
            )),
            Ok(Stored {
                sequence: 50,
                duplicate: false,
                batch_count: Some(8)
            })
        );
        let wrong = answer(&reply(
            r#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 41"},"stream":"s","seq":0}"#,
        ))
        .unwrap_err();
        assert_eq!(wrong.kind(), "wrong_last_sequence");
        assert_eq!(wrong.to_string(), "wrong last sequence: 41");
        // What nats-server 2.11+ answers when its ingest queue for the stream is full, and to
        // a re-send whose original is still being stored.
        let busy = answer(&reply(
            r#"{"error":{"code":429,"err_code":10167,"description":"too many requests"}}"#,
        ))
        .unwrap_err();
        assert_eq!((busy.kind(), busy.server_busy()), ("ingest_limit", true));
        // How nats-server 2.15 answers it: a status message.
        let mut full = reply("");
        full.status = Some(StatusCode::from_u16(429).expect("a status code"));
        full.description = Some("Too Many Requests".into());
        assert_eq!(answer(&full).unwrap_err().kind(), "ingest_limit");
        let racing = answer(&reply(
            r#"{"error":{"code":409,"err_code":10158,"description":"duplicate message id is in process"}}"#,
        ))
        .unwrap_err();
        assert_eq!(
            (racing.kind(), racing.server_busy()),
            ("duplicate_in_process", true)
        );
        assert!(!wrong.server_busy());
        assert_eq!(answer(&reply("not json")).unwrap_err().kind(), "other");
        assert_eq!(answer(&reply("{}")).unwrap_err().kind(), "other");
        let mut none = reply("");
        none.status = Some(StatusCode::NO_RESPONDERS);
        assert_eq!(answer(&none).unwrap_err().kind(), "stream_not_found");
    }
}
