//! JetStream sink: owns the stream, publishes events pipelined yet in WAL order, and reports
//! which commits JetStream has fully acknowledged.
//!
//! Order under failure: every publish carries `Nats-Expected-Last-Sequence`, so JetStream stores
//! an event only directly after its predecessor. A publish that fails mid-window therefore makes
//! every later one in the window fail too; the sink then reads the stream's tail, drops what is
//! already stored and re-sends the rest, with the same `Nats-Msg-Id`s, in order. walstream must
//! be the only publisher into its stream for this to hold (and it checks that it is).

mod acks;
mod connect;
mod stream;

pub use connect::{connect, jetstream_for_command};
pub use stream::{
    ensure_key_value, ensure_stream, first_where, meta_at_or_after, read_tail, StoredMeta,
    StreamTail,
};

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::header::NATS_EXPECTED_LAST_SEQUENCE;
use async_nats::jetstream;
use bytes::Bytes;
use prometheus::IntCounter;
use tokio::sync::{broadcast, watch};

pub use acks::AckResult;
use acks::{Acks, PublishFailure};

use crate::event::{EncodedEvent, Position};
use crate::lsn::Lsn;
use crate::metrics::Metrics;

/// How long a stream may report an end before what JetStream acknowledged. A replica elected
/// leader answers from its log for a moment after a failover; longer than this is real loss.
const STREAM_BEHIND_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(
        "event for {subject} at {position} is {size} bytes, over the NATS server's max_payload \
         of {max} bytes; nothing after it is published. Raise max_payload in the nats-server \
         configuration (up to 64 MB), or leave the large column out of the publication's column \
         list, then restart walstream: it resumes at this event"
    )]
    TooLarge {
        subject: String,
        position: String,
        size: usize,
        max: usize,
    },
    #[error(
        "stream {stream} ends with message {found:?}, which walstream did not publish: another \
         publisher is writing into walstream's stream. walstream must be the stream's only \
         publisher; point other publishers at another stream"
    )]
    ForeignPublisher { stream: String, found: String },
    #[error(
        "stream {stream} has ended at sequence {found} for over {limit:?}, before sequence \
         {acknowledged} that JetStream had acknowledged: the stream was deleted and recreated, or \
         the JetStream cluster lost acknowledged messages. walstream stops rather than guess; its \
         checkpoint holds the last commit it knows stored. Restart walstream to publish from \
         that checkpoint onward (`walstream status` shows both ends)"
    )]
    StreamWentBack {
        stream: String,
        acknowledged: u64,
        found: u64,
        limit: Duration,
    },
    #[error("NATS JetStream: {0}")]
    Fatal(String),
    #[error("shutting down with publishes unconfirmed")]
    ShuttingDown,
}

/// An event sent to JetStream and not yet acknowledged.
struct Unacked {
    event: EncodedEvent,
    /// The stream sequence it is expected to get.
    sequence: u64,
    published: IntCounter,
    commit_time_micros: Option<i64>,
}

/// An event JetStream has stored, as in-process subscribers receive it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub stream_sequence: u64,
    pub subject: String,
    pub payload: Bytes,
}

pub struct Sink {
    js: jetstream::Context,
    stream_name: String,
    window: usize,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    unacked: VecDeque<Unacked>,
    /// The answers still awaited, one per sent entry of `unacked`, in the same order.
    acks: Acks,
    /// The stream's last message as far as walstream knows: sequence and `Nats-Msg-Id`.
    last_stored: (u64, LastId),
    /// WAL position of the last event known to be in the stream.
    last_position: Option<Position>,
    /// Events acknowledged since start.
    acked_count: u64,
    /// Events handed to `publish` since start.
    sent_count: u64,
    /// Commits waiting for their events: (events before and including the commit, end LSN).
    commits: VecDeque<(u64, Lsn)>,
    progress: Option<Lsn>,
    /// In-process subscribers (`walstream run`), told of each event once it is stored.
    stored: Option<broadcast::Sender<Arc<StoredEvent>>>,
}

impl Sink {
    /// A sink publishing after `tail`; a publish not acknowledged within `ack_timeout` counts
    /// as failed.
    pub async fn new(
        js: jetstream::Context,
        stream_name: String,
        window: usize,
        ack_timeout: Duration,
        tail: &StreamTail,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, SinkError> {
        let acks = Acks::subscribe(js.client(), ack_timeout)
            .await
            .map_err(SinkError::Fatal)?;
        Ok(Self {
            js,
            stream_name,
            window,
            metrics,
            shutdown,
            unacked: VecDeque::new(),
            acks,
            last_stored: (tail.sequence, LastId::Read(tail.message_id.clone())),
            last_position: tail.position,
            acked_count: 0,
            sent_count: 0,
            commits: VecDeque::new(),
            progress: None,
            stored: None,
        })
    }

    /// Tells `subscribers` of every event from now on, once JetStream has stored it.
    pub fn with_subscribers(
        mut self,
        subscribers: Option<broadcast::Sender<Arc<StoredEvent>>>,
    ) -> Self {
        self.stored = subscribers;
        self
    }

    /// Publishes an event, waiting for acks first when the window is full.
    pub async fn publish(
        &mut self,
        event: EncodedEvent,
        published: IntCounter,
        commit_time_micros: Option<i64>,
    ) -> Result<(), SinkError> {
        while self.acks.len() >= self.window {
            self.next_ack().await?;
        }
        let sequence = self.last_stored.0 + self.unacked.len() as u64 + 1;
        self.unacked.push_back(Unacked {
            event,
            sequence,
            published,
            commit_time_micros,
        });
        self.sent_count += 1;
        let index = self.unacked.len() - 1;
        if let Err(error) = self.send(index).await {
            self.recover(error).await?;
        }
        self.metrics.inflight_acks.set(self.acks.len() as i64);
        Ok(())
    }

    /// Records that a transaction ended after the events published so far.
    pub fn commit(&mut self, end_lsn: Lsn) {
        match self.commits.back_mut() {
            // Consecutive commits with no events between them: keep only the later one.
            Some((count, lsn)) if *count == self.sent_count => *lsn = end_lsn,
            _ => self.commits.push_back((self.sent_count, end_lsn)),
        }
        self.advance_commits();
    }

    /// True when every event handed to the sink is acknowledged.
    pub fn is_idle(&self) -> bool {
        self.unacked.is_empty()
    }

    /// The newest commit end LSN whose events are all acknowledged, once.
    pub fn take_progress(&mut self) -> Option<Lsn> {
        self.progress.take()
    }

    /// Waits for the next ack. Cancel-safe: use it in `select!`, then pass the result to
    /// [`Sink::handle_ack`], which must run to completion.
    pub async fn next_ack_result(&mut self) -> Option<AckResult> {
        self.acks.next().await
    }

    /// Waits for one ack and handles it. Returns false when nothing is in flight.
    pub async fn next_ack(&mut self) -> Result<bool, SinkError> {
        match self.acks.next().await {
            Some(result) => {
                self.handle_ack(result).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Handles the ack of the oldest unacknowledged event; on any failure, re-syncs and re-sends.
    pub async fn handle_ack(&mut self, result: AckResult) -> Result<(), SinkError> {
        let expected =
            self.unacked.front().map(|u| u.sequence).ok_or_else(|| {
                SinkError::Fatal("an ack arrived with nothing unacknowledged".into())
            })?;
        match result {
            Ok(ack) if !ack.duplicate && ack.sequence == expected => self.acknowledge_front(),
            Ok(ack) => {
                let error = format!(
                    "ack for stream sequence {} (duplicate: {}) where {expected} was expected",
                    ack.sequence, ack.duplicate
                );
                self.recover(PublishFailure::Unexpected(error)).await?;
            }
            Err(failure) => self.recover(failure).await?,
        }
        self.metrics.inflight_acks.set(self.acks.len() as i64);
        Ok(())
    }

    /// Waits until every event handed to the sink is acknowledged.
    pub async fn flush(&mut self) -> Result<(), SinkError> {
        while self.next_ack().await? {}
        Ok(())
    }

    /// WAL position of the last event known to be in the stream.
    pub fn last_position(&self) -> Option<Position> {
        self.last_position
    }

    /// Number of events awaiting an ack.
    pub fn in_flight(&self) -> usize {
        self.acks.len()
    }

    fn acknowledge_front(&mut self) {
        let Some(done) = self.unacked.pop_front() else {
            return;
        };
        done.published.inc();
        if let Some(commit_micros) = done.commit_time_micros {
            let now_micros = unix_micros_now() - 946_684_800_000_000;
            let latency = (now_micros - commit_micros).max(0) as f64 / 1e6;
            self.metrics.commit_to_ack_seconds.observe(latency);
        }
        self.last_position = Some(done.event.position);
        // Subscriptions follow what happens now; a replay re-delivers history to consumers
        // that asked for it through JetStream.
        let subscribers = self.stored.as_ref().filter(|s| s.receiver_count() > 0);
        if let Some(subscribers) = subscribers.filter(|_| !done.event.replay) {
            let _ = subscribers.send(Arc::new(StoredEvent {
                stream_sequence: done.sequence,
                subject: done.event.subject.to_string(),
                payload: done.event.payload.clone(),
            }));
        }
        // The event itself is kept, not its id: the id is needed only when re-syncing, and
        // reading it here would allocate for every ack.
        self.last_stored = (done.sequence, LastId::Acked(done.event));
        self.acked_count += 1;
        self.advance_commits();
    }

    fn advance_commits(&mut self) {
        while let Some(&(count, lsn)) = self.commits.front() {
            if count > self.acked_count {
                break;
            }
            self.commits.pop_front();
            self.progress = Some(lsn);
        }
    }

    /// Sends `unacked[index]` expecting it to land directly after its predecessor.
    async fn send(&mut self, index: usize) -> Result<(), PublishFailure> {
        let entry = &self.unacked[index];
        let mut headers = entry.event.headers();
        headers.insert(
            NATS_EXPECTED_LAST_SEQUENCE,
            (entry.sequence - 1).to_string(),
        );
        let (subject, payload) = (entry.event.subject.clone(), entry.event.payload.clone());
        self.acks.publish(subject, headers, payload).await
    }

    /// Brings the stream and `unacked` back in step after a failure, then re-sends.
    async fn recover(&mut self, failure: PublishFailure) -> Result<(), SinkError> {
        if let PublishFailure::TooLarge = failure {
            return Err(self.too_large());
        }
        self.metrics
            .publish_errors
            .with_label_values(&[failure.kind()])
            .inc();
        tracing::warn!(
            stream = %self.stream_name,
            unacked = self.unacked.len(),
            "publish failed ({failure}); re-syncing with the stream and re-sending"
        );
        let mut backoff = Backoff::new();
        // Since when every answer put the stream's end before what JetStream acknowledged.
        let mut behind_since: Option<Instant> = None;
        loop {
            // Let every outstanding ack resolve so nothing sent earlier lands after the re-sync.
            while self.acks.next().await.is_some() {}
            self.metrics.inflight_acks.set(0);
            let result = self.resync().await;
            if !matches!(result, Err(ResyncError::Behind { .. })) {
                behind_since = None;
            }
            match result {
                Ok(()) => return Ok(()),
                Err(ResyncError::Fatal(error)) => return Err(error),
                Err(ResyncError::Behind { found }) => {
                    let since = *behind_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > STREAM_BEHIND_LIMIT {
                        return Err(SinkError::StreamWentBack {
                            stream: self.stream_name.clone(),
                            acknowledged: self.last_stored.0,
                            found,
                            limit: STREAM_BEHIND_LIMIT,
                        });
                    }
                    tracing::warn!(
                        stream = %self.stream_name,
                        acknowledged = self.last_stored.0,
                        found,
                        "the stream reports an end before what JetStream acknowledged (a \
                         replica answering during a leader election?); reading it again in {:?}",
                        backoff.peek()
                    );
                }
                Err(ResyncError::Retry(reason)) => {
                    tracing::warn!(
                        stream = %self.stream_name,
                        "stream not reachable for re-sync ({reason}); retrying in {:?}",
                        backoff.peek()
                    );
                }
            }
            if *self.shutdown.borrow() {
                return Err(SinkError::ShuttingDown);
            }
            let delay = backoff.next_delay();
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    async fn resync(&mut self) -> Result<(), ResyncError> {
        let tail = read_tail(&self.js, &self.stream_name)
            .await
            .map_err(|e| ResyncError::Retry(e.to_string()))?;
        tracing::debug!(
            stream = %self.stream_name,
            tail_sequence = tail.sequence,
            tail_id = ?tail.message_id,
            last_sequence = self.last_stored.0,
            last_id = ?self.last_stored.1.message_id(),
            unacked = self.unacked.len(),
            first_unacked = ?self.unacked.front().map(|u| &u.event.message_id),
            "re-sync read the stream's tail"
        );
        let unacked: Vec<(u64, Option<String>)> = self
            .unacked
            .iter()
            .map(|u| (u.sequence, Some(u.event.message_id.clone())))
            .collect();
        let last = (self.last_stored.0, self.last_stored.1.message_id());
        let stored = match match_tail(&tail, &last, &unacked) {
            TailMatch::Stored(count) => count,
            TailMatch::Behind => {
                return Err(ResyncError::Behind {
                    found: tail.sequence,
                })
            }
            TailMatch::Foreign(found) => {
                return Err(ResyncError::Fatal(SinkError::ForeignPublisher {
                    stream: self.stream_name.clone(),
                    found,
                }))
            }
        };
        for _ in 0..stored {
            self.acknowledge_front();
        }
        // A tail with an id has been matched above, so it is the truth. Without one (expired
        // by max_age) only its sequence is: keep the id walstream knows for that sequence, or
        // the next re-sync could not recognise the message once it is readable again.
        if tail.message_id.is_some() || tail.sequence != self.last_stored.0 {
            self.last_stored = (tail.sequence, LastId::Read(tail.message_id));
        }
        let resend = self.unacked.len();
        for (offset, entry) in self.unacked.iter_mut().enumerate() {
            entry.sequence = tail.sequence + offset as u64 + 1;
        }
        if resend > 0 {
            self.metrics.publish_retries.inc_by(resend as u64);
            tracing::info!(stream = %self.stream_name, resend, "re-sending unacknowledged events");
        }
        for index in 0..resend {
            match self.send(index).await {
                Ok(()) => {}
                Err(PublishFailure::TooLarge) => return Err(ResyncError::Fatal(self.too_large())),
                Err(other) => return Err(ResyncError::Retry(other.to_string())),
            }
        }
        Ok(())
    }

    fn too_large(&self) -> SinkError {
        let max = self.js.client().server_info().max_payload;
        match self.unacked.back() {
            Some(entry) => SinkError::TooLarge {
                subject: entry.event.subject.to_string(),
                position: format!(
                    "commit LSN {} change #{}",
                    entry.event.position.commit_lsn, entry.event.position.seq
                ),
                size: entry.event.payload.len() + headers_len(&entry.event),
                max,
            },
            None => SinkError::Fatal("a publish was refused as too large".into()),
        }
    }
}

/// What a re-sync learns from the stream's tail.
#[derive(Debug, PartialEq, Eq)]
enum TailMatch {
    /// The stream holds this many of the unacknowledged events.
    Stored(usize),
    /// The tail is before the last message known stored: a stale answer, or loss.
    Behind,
    /// The tail is a message walstream did not publish (its id).
    Foreign(String),
}

/// Places the stream's `tail` against the last message known stored (`last`: sequence and id,
/// when known) and the unacknowledged events (expected sequence and id, oldest first).
fn match_tail(
    tail: &StreamTail,
    last: &(u64, Option<String>),
    unacked: &[(u64, Option<String>)],
) -> TailMatch {
    if tail.sequence < last.0 {
        return TailMatch::Behind;
    }
    let Some(found) = &tail.message_id else {
        // The tail message is gone (expired): sequences are all there is.
        return TailMatch::Stored(
            unacked
                .iter()
                .take_while(|(sequence, _)| *sequence <= tail.sequence)
                .count(),
        );
    };
    if last.1.as_ref() == Some(found) {
        return TailMatch::Stored(0);
    }
    if let Some(index) = unacked
        .iter()
        .position(|(_, id)| id.as_ref() == Some(found))
    {
        return TailMatch::Stored(index + 1);
    }
    // The last message known stored, whose id walstream could not read then (it had expired).
    if last.1.is_none() && tail.sequence == last.0 {
        return TailMatch::Stored(0);
    }
    TailMatch::Foreign(found.clone())
}

/// The `Nats-Msg-Id` of the stream's last message as walstream knows it.
enum LastId {
    /// Read from the stream (`None`: the message is gone, or the stream is empty).
    Read(Option<String>),
    /// The last event acknowledged.
    Acked(EncodedEvent),
}

impl LastId {
    fn message_id(&self) -> Option<String> {
        match self {
            LastId::Read(id) => id.clone(),
            LastId::Acked(event) => Some(event.message_id.clone()),
        }
    }
}

enum ResyncError {
    Retry(String),
    /// The stream reports an end before the last message known stored.
    Behind {
        found: u64,
    },
    Fatal(SinkError),
}

fn headers_len(event: &EncodedEvent) -> usize {
    event
        .headers()
        .iter()
        .map(|(name, values)| {
            values
                .iter()
                .map(|v| name.to_string().len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum()
}

fn unix_micros_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Exponential backoff from 100 ms to 10 s.
pub struct Backoff {
    next: Duration,
    started: Instant,
}

impl Backoff {
    pub fn new() -> Self {
        Self {
            next: Duration::from_millis(100),
            started: Instant::now(),
        }
    }

    pub fn peek(&self) -> Duration {
        self.next
    }

    pub fn next_delay(&mut self) -> Duration {
        let current = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(10));
        current
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail(sequence: u64, id: Option<&str>) -> StreamTail {
        StreamTail {
            sequence,
            message_id: id.map(str::to_owned),
            ..Default::default()
        }
    }

    fn unacked(first: u64, ids: &[&str]) -> Vec<(u64, Option<String>)> {
        (first..)
            .zip(ids)
            .map(|(sequence, id)| (sequence, Some(id.to_string())))
            .collect()
    }

    #[test]
    fn a_tail_among_the_unacknowledged_counts_what_is_stored() {
        let last = (10, Some("a".to_owned()));
        let sent = unacked(11, &["b", "c", "d"]);
        assert_eq!(
            match_tail(&tail(10, Some("a")), &last, &sent),
            TailMatch::Stored(0)
        );
        assert_eq!(
            match_tail(&tail(12, Some("c")), &last, &sent),
            TailMatch::Stored(2)
        );
        assert_eq!(
            match_tail(&tail(13, Some("d")), &last, &sent),
            TailMatch::Stored(3)
        );
    }

    #[test]
    fn a_tail_before_what_was_acknowledged_is_behind_not_foreign() {
        let last = (10, Some("a".to_owned()));
        assert_eq!(
            match_tail(&tail(7, Some("x")), &last, &[]),
            TailMatch::Behind
        );
        assert_eq!(match_tail(&tail(0, None), &last, &[]), TailMatch::Behind);
    }

    #[test]
    fn an_expired_tail_falls_back_to_sequences() {
        let last = (10, Some("a".to_owned()));
        let sent = unacked(11, &["b", "c", "d"]);
        assert_eq!(
            match_tail(&tail(12, None), &last, &sent),
            TailMatch::Stored(2)
        );
        assert_eq!(
            match_tail(&tail(10, None), &last, &sent),
            TailMatch::Stored(0)
        );
    }

    // The cluster-failover bug: a re-sync that could not read the tail's id, then a second one
    // that could, took walstream's own last message for another publisher's.
    #[test]
    fn the_last_message_known_only_by_its_sequence_is_recognised_once_readable() {
        let last = (10, None);
        let sent = unacked(11, &["b", "c"]);
        assert_eq!(
            match_tail(&tail(10, Some("a")), &last, &sent),
            TailMatch::Stored(0)
        );
        assert_eq!(
            match_tail(&tail(11, Some("b")), &last, &sent),
            TailMatch::Stored(1)
        );
    }

    #[test]
    fn a_message_walstream_did_not_send_is_foreign() {
        let last = (10, Some("a".to_owned()));
        let sent = unacked(11, &["b"]);
        assert_eq!(
            match_tail(&tail(11, Some("x")), &last, &sent),
            TailMatch::Foreign("x".to_owned())
        );
        assert_eq!(
            match_tail(&tail(10, Some("x")), &last, &sent),
            TailMatch::Foreign("x".to_owned())
        );
    }
}
