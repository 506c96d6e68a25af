//! Change events for subscriptions: live from the pipeline in the same process (`run`) or
//! from a JetStream consumer (`serve`), resumable from a cursor with no gap and no duplicate.

use std::sync::Arc;

use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use futures::StreamExt;
use tokio::sync::{broadcast, mpsc};

use crate::lsn::parse_lsn;
use crate::pipeline::event::Position;
use crate::pipeline::history::{first_where, meta_at_or_after, own_message};
use crate::pipeline::sink::StoredEvent;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum FeedError {
    #[error(
        "the subscription fell {0} events behind the change stream and was stopped; \
         subscribe again with `after` set to the last `_cursor` you received"
    )]
    Lagged(u64),
    #[error(
        "the events after cursor {0} are no longer in the stream (retention: \
         nats.jetstream.max_age_days / max_msgs); resubscribe without `after`"
    )]
    Expired(String),
    #[error("`{0}` is not a cursor; pass the `_cursor` value of an event you received")]
    BadCursor(String),
    #[error("reading the change stream: {0}")]
    Stream(String),
}

/// A subscription cursor: the WAL position of the last event the client saw, `LSN:seq`.
pub fn parse_cursor(text: &str) -> Result<Position, FeedError> {
    let bad = || FeedError::BadCursor(text.to_owned());
    let (lsn, seq) = text.rsplit_once(':').ok_or_else(bad)?;
    Ok(Position {
        commit_lsn: parse_lsn(lsn).map_err(|_| bad())?,
        seq: seq.parse().map_err(|_| bad())?,
    })
}

pub fn format_cursor(position: Position) -> String {
    format!("{}:{}", position.commit_lsn, position.seq)
}

/// Where subscriptions get their events.
#[derive(Clone)]
pub struct Feed {
    js: jetstream::Context,
    stream: String,
    /// The slot whose events these are: other clients' messages in the stream are not.
    slot: String,
    /// Events the in-process pipeline has stored, as they are acknowledged.
    live: Option<broadcast::Sender<Arc<StoredEvent>>>,
}

type Delivery = Result<Arc<StoredEvent>, FeedError>;

impl Feed {
    pub fn new(
        js: jetstream::Context,
        stream: String,
        slot: String,
        live: Option<broadcast::Sender<Arc<StoredEvent>>>,
    ) -> Self {
        Self {
            js,
            stream,
            slot,
            live,
        }
    }

    /// Events on subjects matching `filter` (all when `None`), after `after` or from now.
    pub fn subscribe(
        &self,
        filter: Option<String>,
        after: Option<Position>,
    ) -> mpsc::Receiver<Delivery> {
        let (tx, rx) = mpsc::channel(64);
        let feed = self.clone();
        // Subscribe to the live feed before anything is read from the stream, so that every
        // event stored from now on is seen by one of the two.
        let live = self.live.as_ref().map(broadcast::Sender::subscribe);
        tokio::spawn(async move {
            let result = match live {
                Some(live) => feed.relay_live(live, &filter, after, &tx).await,
                None => feed.relay_stream(&filter, after, &tx).await,
            };
            if let Err(error) = result {
                let _ = tx.send(Err(error)).await;
            }
        });
        rx
    }

    /// `run`: catch up from the stream when resuming, then follow the pipeline.
    async fn relay_live(
        &self,
        mut live: broadcast::Receiver<Arc<StoredEvent>>,
        filter: &Option<String>,
        after: Option<Position>,
        tx: &mpsc::Sender<Delivery>,
    ) -> Result<(), FeedError> {
        let mut last_sequence = 0;
        if let Some(after) = after {
            let stream = self.stream().await?;
            // `end` is read after the live subscription began: the live feed holds what follows.
            let (start, end) = start_after(&stream, &self.slot, after).await?;
            last_sequence = start.saturating_sub(1);
            if start <= end {
                // Unfiltered, so that the replay provably reaches `end`; the filter applies here.
                let policy = DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                };
                let mut messages = consumer(&stream, &None, policy).await?;
                while let Some(read) = next_stored(&mut messages, &self.slot).await? {
                    last_sequence = read.stream_sequence;
                    let wanted = read.event.filter(|event| {
                        filter
                            .as_deref()
                            .is_none_or(|f| subject_matches(f, &event.subject))
                    });
                    if let Some(event) = wanted {
                        if tx.send(Ok(Arc::new(event))).await.is_err() {
                            return Ok(());
                        }
                    }
                    if last_sequence >= end || read.pending == 0 {
                        break;
                    }
                }
            }
        }
        loop {
            let event = match live.recv().await {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    return Err(FeedError::Lagged(missed));
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            };
            if event.stream_sequence <= last_sequence {
                continue;
            }
            last_sequence = event.stream_sequence;
            if filter
                .as_deref()
                .is_some_and(|f| !subject_matches(f, &event.subject))
            {
                continue;
            }
            if tx.send(Ok(event)).await.is_err() {
                return Ok(());
            }
        }
    }

    /// `serve`: an ordered JetStream consumer from the cursor (or from now) onwards.
    async fn relay_stream(
        &self,
        filter: &Option<String>,
        after: Option<Position>,
        tx: &mpsc::Sender<Delivery>,
    ) -> Result<(), FeedError> {
        let stream = self.stream().await?;
        let policy = match after {
            Some(after) => DeliverPolicy::ByStartSequence {
                start_sequence: start_after(&stream, &self.slot, after).await?.0,
            },
            None => DeliverPolicy::New,
        };
        let mut messages = consumer(&stream, filter, policy).await?;
        while let Some(read) = next_stored(&mut messages, &self.slot).await? {
            let Some(event) = read.event else {
                continue;
            };
            if tx.send(Ok(Arc::new(event))).await.is_err() {
                return Ok(());
            }
        }
        Ok(())
    }

    async fn stream(&self) -> Result<jetstream::stream::Stream, FeedError> {
        self.js
            .get_stream(&self.stream)
            .await
            .map_err(|e| FeedError::Stream(format!("stream {}: {e}", self.stream)))
    }
}

/// An ordered consumer on `stream`, and its messages.
async fn consumer(
    stream: &jetstream::stream::Stream,
    filter: &Option<String>,
    deliver_policy: DeliverPolicy,
) -> Result<jetstream::consumer::pull::Ordered, FeedError> {
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: filter.clone().unwrap_or_default(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| FeedError::Stream(format!("creating a consumer: {e}")))?;
    consumer
        .messages()
        .await
        .map_err(|e| FeedError::Stream(format!("reading the consumer: {e}")))
}

/// A message read from the stream: walstream's event, unless subscriptions do not get it.
struct Read {
    /// `None` for a replayed event (subscriptions follow what happens now, not a replay of
    /// history) and for another client's message.
    event: Option<StoredEvent>,
    stream_sequence: u64,
    /// How many more the stream holds for the consumer.
    pending: u64,
}

/// The next message of the consumer.
async fn next_stored(
    messages: &mut jetstream::consumer::pull::Ordered,
    slot: &str,
) -> Result<Option<Read>, FeedError> {
    let Some(message) = messages.next().await else {
        return Ok(None);
    };
    let message = message.map_err(|e| FeedError::Stream(e.to_string()))?;
    let info = message
        .info()
        .map_err(|e| FeedError::Stream(e.to_string()))?;
    let (stream_sequence, pending) = (info.stream_sequence, info.pending);
    let delivered = message
        .headers
        .as_ref()
        .and_then(|headers| own_message(headers, stream_sequence, slot))
        .is_some_and(|own| own.replay.is_none());
    let event = delivered.then(|| StoredEvent {
        stream_sequence,
        subject: message.subject.to_string(),
        payload: message.payload.clone(),
    });
    Ok(Some(Read {
        event,
        stream_sequence,
        pending,
    }))
}

/// The first stream sequence whose event comes after `after` in WAL order, and the stream's
/// last sequence when it was looked at.
async fn start_after(
    stream: &jetstream::stream::Stream,
    slot: &str,
    after: Position,
) -> Result<(u64, u64), FeedError> {
    let failed = |e: anyhow::Error| FeedError::Stream(e.to_string());
    let state = stream
        .clone()
        .info()
        .await
        .map_err(|e| FeedError::Stream(e.to_string()))?
        .state
        .clone();
    let (first, last) = (state.first_sequence, state.last_sequence);
    if state.messages == 0 {
        return Ok((last + 1, last));
    }
    let oldest = meta_at_or_after(stream, slot, first, last)
        .await
        .map_err(failed)?;
    if let Some(oldest) = oldest.filter(|m| m.position > after) {
        // Everything stored is newer than the cursor: fine only if nothing was ever purged.
        if oldest.sequence > 1 {
            return Err(FeedError::Expired(format_cursor(after)));
        }
        return Ok((oldest.sequence, last));
    }
    let found = first_where(stream, slot, first, last, |m| m.position > after)
        .await
        .map_err(failed)?;
    Ok((found.map_or(last + 1, |m| m.sequence), last))
}

/// NATS subject matching: `*` is one token, `>` the rest.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for token in pattern.split('.') {
        match (token, subject_tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (literal, Some(actual)) if literal == actual => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_like_nats() {
        assert!(subject_matches(
            "events.order.created",
            "events.order.created"
        ));
        assert!(subject_matches(
            "fraiseql.mutation.Order.*",
            "fraiseql.mutation.Order.UPDATE"
        ));
        assert!(subject_matches(
            "fraiseql.>",
            "fraiseql.mutation.Order.UPDATE"
        ));
        assert!(!subject_matches(
            "fraiseql.mutation.Order.*",
            "fraiseql.mutation.Order"
        ));
        assert!(!subject_matches("events.order", "events.order.created"));
        assert!(!subject_matches("a.*.c", "a.b.d"));
    }

    #[test]
    fn cursors_round_trip() {
        let position = parse_cursor("0/16B3748:3").expect("valid");
        assert_eq!(format_cursor(position), "0/16B3748:3");
        assert!(matches!(
            parse_cursor("16B3748"),
            Err(FeedError::BadCursor(_))
        ));
        assert!(matches!(
            parse_cursor("0/1:x"),
            Err(FeedError::BadCursor(_))
        ));
    }
}
