//! The JetStream sink: publishes events pipelined yet in WAL order, and counts those JetStream
//! has acknowledged.
//!
//! Order under failure, beside other publishers, in one of three ways ([`PublishMode`]):
//! - **Chained** (single-replica streams; servers before 2.12.1): every publish carries
//!   `Nats-Expected-Last-Sequence` and, after the first of a chain, its predecessor's id as
//!   `Nats-Expected-Last-Msg-Id`. JetStream stores an event only when its predecessor is the
//!   stream's last message, so walstream's stored events sit one after another from the end it
//!   knew, and anything another client publishes in between breaks the chain instead of taking
//!   a place in it.
//! - **Atomic batches** (replicated streams on nats-server 2.12.1+): a replicated stream's
//!   leader checks `Nats-Expected-Last-Msg-Id` only when it applies a message, after later ones
//!   were accepted, and nats-server 2.15 takes a failed check there for a critical write error
//!   that stops the stream. So the events go out as atomic batches, one in flight at a time,
//!   the first message of each expecting the last sequence the previous batch's
//!   acknowledgement named: a batch is stored whole, right after walstream's last event, or not
//!   at all, and nothing is sent before the fate of what precedes it is known. Events handed
//!   over while a batch is in flight form the next one, so batches grow with the load.
//! - **Fast ingest** (nats-server 2.14+): each event carries the chained mode's expectations
//!   and is appended to an open fast-ingest batch ([`fast_ingest`]), which ends when the
//!   driver has nothing more for the moment; the server acknowledges every few hundred
//!   messages, and a message lost or refused ends the batch, so an acknowledged count is a
//!   count of events stored in their places. On a replicated stream, without the id
//!   expectation (checked only when replicas apply it, as above) and one batch at a time.
//!
//! Any failure makes every later publish fail too; the sink then counts how many of its events
//! the stream holds (by their ids, never by sequence numbers alone), takes the other messages
//! as another publisher's, and re-sends the rest in order, with the same `Nats-Msg-Id`s, after
//! the stream's end.

mod acks;
mod fast_ingest;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use prometheus::IntCounter;
use tokio::sync::{broadcast, watch};

use acks::{AckResult, Acks, PublishFailure};
use fast_ingest::{FastBatches, Progress};

use crate::backoff::Backoff;
use crate::config::{NatsConfig, TransactionMode};
use crate::metrics::Metrics;
use crate::nats::wire::{HeaderBlock, WriteHeaders, MESSAGE_ID};
use crate::nats::{message_at, BatchSettings, Publisher};
use crate::pipeline::event::{pg_micros_now, EncodedEvent, Position};
use crate::pipeline::history::StreamTail;

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
        "stream {stream} holds walstream's event {found:?} at sequence {sequence}, where the \
         chain of its publishes allows only {expected:?}: the server did not honour \
         Nats-Expected-Last-Msg-Id, or messages were deleted from the stream. walstream stops \
         rather than confirm what it cannot account for; its checkpoint holds the last commit \
         it knows stored"
    )]
    ChainBroken {
        stream: String,
        sequence: u64,
        found: String,
        expected: String,
    },
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

/// What a publish expects of the stream, checked by JetStream before storing it.
const EXPECTED_LAST_SEQUENCE: &str = "Nats-Expected-Last-Sequence";
const EXPECTED_LAST_MESSAGE_ID: &str = "Nats-Expected-Last-Msg-Id";
/// Headers of an atomic batch (ADR-50).
const BATCH_ID: &str = "Nats-Batch-Id";
const BATCH_SEQUENCE: &str = "Nats-Batch-Sequence";
const BATCH_COMMIT: &str = "Nats-Batch-Commit";

/// How many messages nats-server takes in one atomic batch unless configured otherwise
/// (`jetstream.limits.batch.max_msgs`).
pub const SERVER_BATCH_LIMIT: usize = 1000;

/// The header on every event of a transaction stored in more than one atomic batch
/// (`nats.transactions = "atomic"`, a transaction larger than a batch may be).
pub const HEADER_TX_SPLIT: &str = "Walstream-Tx-Split";

/// How the sink keeps walstream's events in WAL order on the stream (see the module's text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishMode {
    Chained,
    /// At most `max` events a batch; with `whole_transactions`, a batch ends only where a
    /// transaction does, unless one transaction alone is more than `max`.
    AtomicBatches {
        max: usize,
        whole_transactions: bool,
    },
    /// Fast-ingest batches; on a `replicated` stream one at a time, without message id
    /// expectations.
    FastIngest {
        replicated: bool,
    },
}

/// What decides the publish mode besides walstream's settings: the stream and its server.
#[derive(Debug, Clone, Copy)]
pub struct StreamFacts<'a> {
    pub replicas: usize,
    pub server_version: &'a str,
    /// The stream's `allow_atomic` and `allow_batched` settings.
    pub atomic_allowed: bool,
    pub batched_allowed: bool,
}

impl PublishMode {
    /// The batch settings walstream needs on a stream of `replicas` on a server announcing
    /// `server_version`.
    pub fn stream_needs(replicas: usize, server_version: &str, nats: &NatsConfig) -> BatchSettings {
        let atomic_transactions = nats.transactions == TransactionMode::Atomic;
        let batched = nats.fast_ingest
            && !atomic_transactions
            && crate::nats::fast_ingest_batches(server_version);
        let atomic = crate::nats::atomic_batches_with_ids(server_version)
            && (atomic_transactions || (replicas > 1 && !batched));
        BatchSettings { atomic, batched }
    }

    /// The mode for the stream `facts` describe.
    pub fn for_stream(facts: StreamFacts<'_>, nats: &NatsConfig) -> Result<Self, SinkError> {
        let StreamFacts {
            replicas,
            server_version,
            ..
        } = facts;
        let whole_transactions = nats.transactions == TransactionMode::Atomic;
        if whole_transactions && !crate::nats::atomic_batches_with_ids(server_version) {
            return Err(SinkError::Fatal(format!(
                "nats.transactions = \"atomic\" needs nats-server 2.12.1 or later (atomic \
                 batches with message ids); this one is {server_version}. Upgrade it, or set \
                 nats.transactions = \"independent\""
            )));
        }
        let needs = Self::stream_needs(replicas, server_version, nats);
        if needs.batched {
            if !facts.batched_allowed {
                return Err(SinkError::Fatal(format!(
                    "the stream does not allow fast-ingest batches (nats-server \
                     {server_version}), which walstream publishes in and turns on when it \
                     starts: allow them (allow_batched: true in the stream's configuration), \
                     let walstream update the stream, or set nats.fast_ingest = false"
                )));
            }
            return Ok(PublishMode::FastIngest {
                replicated: replicas > 1,
            });
        }
        if !needs.atomic {
            return Ok(PublishMode::Chained);
        }
        if !facts.atomic_allowed {
            return Err(SinkError::Fatal(format!(
                "the stream ({replicas} replicas, nats-server {server_version}) does not allow \
                 atomic publishing, which walstream needs here (replicated streams, and \
                 nats.transactions = \"atomic\") and turns on when it starts: allow it \
                 (allow_atomic: true in the stream's configuration), or let walstream update \
                 the stream"
            )));
        }
        Ok(PublishMode::AtomicBatches {
            max: nats.max_inflight.clamp(1, SERVER_BATCH_LIMIT),
            whole_transactions,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            PublishMode::Chained => "chained",
            PublishMode::AtomicBatches {
                whole_transactions: false,
                ..
            } => "atomic batches",
            PublishMode::AtomicBatches {
                whole_transactions: true,
                ..
            } => "atomic transactions",
            PublishMode::FastIngest { replicated: false } => "fast ingest",
            PublishMode::FastIngest { replicated: true } => "fast ingest, one batch at a time",
        }
    }
}

/// An event sent to JetStream and not yet acknowledged.
struct Unacked {
    event: EncodedEvent,
    /// The stream sequence it is expected to get.
    sequence: u64,
    published: IntCounter,
    /// Of a transaction stored in more than one atomic batch.
    split: bool,
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
    /// walstream's own connection its events go out on.
    publisher: Publisher,
    /// The header block of the message being sent, its memory kept between messages.
    headers: HeaderBlock,
    stream_name: String,
    window: usize,
    mode: PublishMode,
    /// How many of the oldest `unacked` were sent; the rest wait for the batch in flight.
    sent: usize,
    /// Batch ids are this and a counter: unique per sink.
    batch_prefix: String,
    batches: u64,
    /// The next send is one message on its own: a batch was refused for an id JetStream
    /// already holds, and only a single publish gets the duplicate's acknowledgement.
    send_single: bool,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    unacked: VecDeque<Unacked>,
    /// The answers still awaited, one per sent entry of `unacked`, in the same order.
    acks: Acks,
    /// The stream's last sequence as far as walstream has accounted for it.
    end: u64,
    /// What the next publish after the acknowledged ones is chained to.
    chain: Chain,
    /// WAL position of the last event known to be in the stream.
    last_position: Option<Position>,
    /// Events acknowledged since start.
    acked_count: u64,
    /// How long to wait before re-sending after the server said it is busy, growing while it
    /// keeps saying so; reset by the next acknowledgement.
    busy: Option<Backoff>,
    /// In-process subscribers (`walstream run`), told of each event once it is stored.
    stored: Option<broadcast::Sender<Arc<StoredEvent>>>,
    /// In fast-ingest mode, the batches, and how many events of the oldest one in flight
    /// were acknowledged.
    fast: Option<FastBatches>,
    fast_acknowledged: u64,
}

/// An answer from JetStream, as [`Sink::next_ack_result`] hands it out.
pub struct Answer(AnswerKind);

enum AnswerKind {
    Publish(AckResult),
    Fast(Progress),
}

/// What the sink does next with the events it has not sent, in fast-ingest mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FastStep {
    Append,
    Single,
    Close,
}

impl Sink {
    /// A sink publishing after `tail`; a publish not acknowledged within `ack_timeout` counts
    /// as failed.
    #[allow(clippy::too_many_arguments)]
    pub async fn new(
        js: jetstream::Context,
        publisher: Publisher,
        stream_name: String,
        window: usize,
        mode: PublishMode,
        ack_timeout: Duration,
        tail: &StreamTail,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, SinkError> {
        let acks = Acks::subscribe(&js.client(), ack_timeout)
            .await
            .map_err(SinkError::Fatal)?;
        let fast = match mode {
            // Asked to acknowledge a quarter of the window at a time, the server answers
            // twice before the window fills.
            PublishMode::FastIngest { .. } => Some(
                FastBatches::subscribe(&js.client(), (window / 4).max(1) as u64, ack_timeout)
                    .await
                    .map_err(SinkError::Fatal)?,
            ),
            _ => None,
        };
        let batch_prefix = js
            .client()
            .new_inbox()
            .rsplit('.')
            .next()
            .unwrap_or("walstream")
            .to_owned();
        Ok(Self {
            js,
            publisher,
            headers: HeaderBlock::new(),
            stream_name,
            window,
            mode,
            sent: 0,
            batch_prefix,
            batches: 0,
            send_single: false,
            metrics,
            shutdown,
            unacked: VecDeque::new(),
            acks,
            end: tail.sequence,
            chain: Chain::Start,
            last_position: tail.position(),
            acked_count: 0,
            busy: None,
            stored: None,
            fast,
            fast_acknowledged: 0,
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
    ) -> Result<(), SinkError> {
        while self.unacked.len() >= self.window {
            if !self.next_ack().await? {
                // Nothing in flight (batch modes only): send what waits.
                if let Err(failure) = self.send_waiting(true).await {
                    self.recover(failure).await?;
                }
            }
        }
        let sequence = self.end + self.unacked.len() as u64 + 1;
        self.unacked.push_back(Unacked {
            event,
            sequence,
            published,
            split: false,
        });
        let sent = match self.mode {
            PublishMode::Chained => self.send(self.unacked.len() - 1).await,
            // Joins the next batch, which goes out when the one in flight is acknowledged.
            PublishMode::AtomicBatches { .. } if self.sent > 0 => Ok(()),
            PublishMode::AtomicBatches { .. } => self.send_batch().await,
            PublishMode::FastIngest { .. } => self.pump(false).await,
        };
        if let Err(error) = sent {
            self.recover(error).await?;
        }
        self.metrics.inflight_acks.set(self.unacked.len() as i64);
        Ok(())
    }

    /// True when every event handed to the sink is acknowledged.
    pub fn is_idle(&self) -> bool {
        self.unacked.is_empty()
    }

    /// How many events JetStream has acknowledged since start, the oldest first.
    pub fn acknowledged(&self) -> u64 {
        self.acked_count
    }

    /// Waits for the next ack. Cancel-safe: use it in `select!`, then pass the result to
    /// [`Sink::handle_ack`], which must run to completion.
    pub async fn next_ack_result(&mut self) -> Option<Answer> {
        match &mut self.fast {
            Some(fast) => fast.next().await.map(AnswerKind::Fast),
            None => self.acks.next().await.map(AnswerKind::Publish),
        }
        .map(Answer)
    }

    /// Waits for one ack and handles it. Returns false when nothing is in flight.
    pub async fn next_ack(&mut self) -> Result<bool, SinkError> {
        match self.next_ack_result().await {
            Some(result) => {
                self.handle_ack(result).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Handles an answer from [`Sink::next_ack_result`]; on any failure, re-syncs and
    /// re-sends.
    pub async fn handle_ack(&mut self, answer: Answer) -> Result<(), SinkError> {
        match answer.0 {
            AnswerKind::Publish(result) => self.handle_publish_ack(result).await?,
            AnswerKind::Fast(progress) => self.handle_progress(progress).await?,
        }
        self.metrics.inflight_acks.set(self.unacked.len() as i64);
        Ok(())
    }

    /// The driver has nothing more to hand over for now: the open fast-ingest batch ends, so
    /// that its answer comes without waiting for more events.
    pub async fn end_burst(&mut self) -> Result<(), SinkError> {
        if let Err(failure) = self.pump(true).await {
            self.recover(failure).await?;
        }
        Ok(())
    }

    /// Whether [`Sink::end_burst`] has anything to do.
    pub fn burst_open(&self) -> bool {
        self.fast_step(true).is_some()
    }

    /// Handles the answer to the oldest publish in flight (an event, or a batch's commit).
    async fn handle_publish_ack(&mut self, result: AckResult) -> Result<(), SinkError> {
        // In chained mode every answer is for one event; in batch mode for all those sent.
        let count = match self.mode {
            PublishMode::AtomicBatches { .. } => std::mem::take(&mut self.sent),
            _ => 1,
        };
        let expected = count
            .checked_sub(1)
            .and_then(|last| self.unacked.get(last))
            .map(|u| u.sequence)
            .ok_or_else(|| SinkError::Fatal("an ack arrived with nothing unacknowledged".into()))?;
        match result {
            Ok(ack) if ack.sequence == expected && ack.batch_count.unwrap_or(1) == count => {
                let acked_at = pg_micros_now();
                for _ in 0..count {
                    let sequence = self.unacked.front().map_or(expected, |u| u.sequence);
                    self.acknowledge_front(sequence, acked_at);
                }
                if let Err(failure) = self.send_waiting(false).await {
                    self.recover(failure).await?;
                }
            }
            // A duplicate of a message stored before the end walstream knows: the event was
            // published already (by an earlier run), and JetStream says where.
            Ok(ack) if count == 1 && ack.duplicate && ack.sequence <= self.end => {
                self.acknowledge_front(ack.sequence, pg_micros_now());
                if let Err(failure) = self.send_waiting(false).await {
                    self.recover(failure).await?;
                }
            }
            Ok(ack) => {
                let error = format!(
                    "ack for stream sequence {} (duplicate: {}, batch of {:?}) where {expected} \
                     for {count} was expected",
                    ack.sequence, ack.duplicate, ack.batch_count
                );
                self.recover(PublishFailure::Unexpected(error)).await?;
            }
            Err(failure) => self.recover(failure).await?,
        }
        Ok(())
    }

    /// What fast-ingest batches said of the oldest one in flight.
    async fn handle_progress(&mut self, progress: Progress) -> Result<(), SinkError> {
        match progress {
            Progress::Stored(count) => {
                let acked_at = pg_micros_now();
                for _ in 0..count {
                    let sequence = self.unacked.front().map_or(self.end, |u| u.sequence);
                    self.acknowledge_front(sequence, acked_at);
                }
                self.sent = self.sent.saturating_sub(count as usize);
                self.fast_acknowledged += count;
            }
            Progress::Ended {
                sequence,
                count,
                sent,
            } => {
                let acknowledged = std::mem::take(&mut self.fast_acknowledged);
                let rest = sent.saturating_sub(acknowledged) as usize;
                let expected = match rest {
                    0 => Some(self.end),
                    _ => self.unacked.get(rest - 1).map(|u| u.sequence),
                };
                if count != sent || expected != Some(sequence) {
                    let error = format!(
                        "a fast batch of {sent} ended with {count} taken, the last at stream \
                         sequence {sequence}, where {expected:?} was expected"
                    );
                    return self.recover(PublishFailure::Unexpected(error)).await;
                }
                let acked_at = pg_micros_now();
                for _ in 0..rest {
                    let sequence = self.unacked.front().map_or(self.end, |u| u.sequence);
                    self.acknowledge_front(sequence, acked_at);
                }
                self.sent = self.sent.saturating_sub(rest);
            }
            Progress::Failed(failure) => return self.recover(failure).await,
        }
        if let Err(failure) = self.pump(false).await {
            self.recover(failure).await?;
        }
        Ok(())
    }

    /// Sends what waited: in batch mode, for the batch in flight to be acknowledged; in
    /// fast-ingest mode, for room in the batch (or, `idle`, for the end of a burst).
    async fn send_waiting(&mut self, idle: bool) -> Result<(), PublishFailure> {
        match self.mode {
            PublishMode::AtomicBatches { .. } if !self.unacked.is_empty() && self.sent == 0 => {
                self.send_batch().await
            }
            PublishMode::FastIngest { .. } => self.pump(idle).await,
            _ => Ok(()),
        }
    }

    /// The next thing to do with the events not sent yet in fast-ingest mode: append them to
    /// the open batch while it has room; open a batch for two or more (a lone event waits for
    /// company or for the end of the burst, then goes as a plain publish); end the open batch
    /// when the burst ends. On a replicated stream a batch opens only once the previous one
    /// ended: a message lost in a leader election is caught by the batch's own sequence, not
    /// across batches.
    fn fast_step(&self, idle: bool) -> Option<FastStep> {
        let (PublishMode::FastIngest { replicated }, Some(fast)) = (self.mode, &self.fast) else {
            return None;
        };
        let unsent = self.unacked.len() - self.sent;
        if fast.has_open() {
            return match unsent {
                0 => idle.then_some(FastStep::Close),
                _ => (!fast.stalled()).then_some(FastStep::Append),
            };
        }
        if unsent == 0 || (replicated && fast.in_flight() > 0) {
            return None;
        }
        match unsent {
            1 => idle.then_some(FastStep::Single),
            _ => Some(FastStep::Append),
        }
    }

    /// Does what [`Sink::fast_step`] says until it says nothing.
    async fn pump(&mut self, idle: bool) -> Result<(), PublishFailure> {
        while let Some(step) = self.fast_step(idle) {
            let fast = self
                .fast
                .as_mut()
                .unwrap_or_else(|| unreachable!("fast-ingest mode has its batches"));
            if step == FastStep::Close {
                return fast.close(&mut self.publisher).await;
            }
            let replicated = matches!(self.mode, PublishMode::FastIngest { replicated: true });
            let index = self.sent;
            self.headers.clear();
            write_expectations(
                &mut self.headers,
                &self.unacked,
                &self.chain,
                index,
                !replicated,
            );
            self.sent += 1;
            if step == FastStep::Append && !fast.has_open() {
                self.metrics.fast_batches.inc();
            }
            let event = &self.unacked[index].event;
            match step {
                FastStep::Single => {
                    fast.single(
                        &mut self.publisher,
                        &event.subject,
                        &self.headers,
                        &event.payload,
                    )
                    .await?
                }
                _ => {
                    fast.append(
                        &mut self.publisher,
                        &event.subject,
                        &self.headers,
                        &event.payload,
                    )
                    .await?
                }
            }
        }
        Ok(())
    }

    /// Sends the oldest unacknowledged events as one atomic batch whose first message expects
    /// the stream's end where walstream knows it; a single event goes as a plain publish.
    async fn send_batch(&mut self) -> Result<(), PublishFailure> {
        let PublishMode::AtomicBatches {
            max,
            whole_transactions,
        } = self.mode
        else {
            return Err(PublishFailure::Unexpected("a batch in chained mode".into()));
        };
        let (count, split) = if whole_transactions {
            self.whole_transactions(max)
        } else {
            (self.unacked.len().min(max), 0)
        };
        let count = if count > 0 && std::mem::take(&mut self.send_single) {
            1
        } else {
            count
        };
        if count == 0 {
            return Ok(());
        }
        for entry in self.unacked.iter_mut().take(split.min(count)) {
            entry.split = true;
        }
        if count == 1 {
            let entry = &self.unacked[0];
            let headers = &mut self.headers;
            headers.clear();
            entry.event.write_headers(headers);
            headers.put_number(EXPECTED_LAST_SEQUENCE, self.end);
            if entry.split {
                headers.put(HEADER_TX_SPLIT, "true");
            }
            let event = &entry.event;
            self.acks
                .publish(&mut self.publisher, &event.subject, headers, &event.payload)
                .await?;
            self.sent = 1;
            return Ok(());
        }
        self.batches += 1;
        let batch_id = format!("{}-{}", self.batch_prefix, self.batches);
        for index in 0..count {
            let entry = &self.unacked[index];
            let headers = &mut self.headers;
            headers.clear();
            write_batch_headers(headers, &entry.event, &batch_id, index, count, self.end);
            if entry.split {
                headers.put(HEADER_TX_SPLIT, "true");
            }
            let event = &entry.event;
            if index + 1 < count {
                Acks::send_unanswered(&mut self.publisher, &event.subject, headers, &event.payload)
                    .await?;
            } else {
                self.acks
                    .publish(&mut self.publisher, &event.subject, headers, &event.payload)
                    .await?;
            }
        }
        self.sent = count;
        Ok(())
    }

    /// Waits until every event handed to the sink is acknowledged.
    pub async fn flush(&mut self) -> Result<(), SinkError> {
        loop {
            self.end_burst().await?;
            if !self.next_ack().await? && self.fast_step(true).is_none() {
                return Ok(());
            }
        }
    }

    /// WAL position of the last event known to be in the stream.
    pub fn last_position(&self) -> Option<Position> {
        self.last_position
    }

    /// The next batch of whole transactions: how many events, and how many of the first
    /// belong to a transaction split across batches.
    fn whole_transactions(&mut self, max: usize) -> (usize, usize) {
        let Some(front) = self.unacked.front() else {
            return (0, 0);
        };
        // The stream holds the first part of the front event's transaction already (stored
        // by an earlier batch, or before a restart).
        let continuing = self
            .last_position
            .is_some_and(|last| last.commit_lsn == front.event.position.commit_lsn);
        let ends: Vec<bool> = self
            .unacked
            .iter()
            .take(max)
            .map(|entry| entry.event.last_in_transaction)
            .collect();
        let (count, split) = batch_of_transactions(&ends, self.unacked.len(), max, continuing);
        if split == count && count > 0 && !continuing {
            self.metrics.split_transactions.inc();
            tracing::warn!(
                max,
                "a transaction has more changes than an atomic batch may hold: it is stored in \
                 several batches, each atomic, its events marked {HEADER_TX_SPLIT}"
            );
        }
        (count, split)
    }

    /// Forgets the events not sent yet of a transaction that will be read again from its
    /// start (a lost session); returns how many. Only atomic transactions hold such events.
    pub fn withdraw_unsent(&mut self) -> u64 {
        if !matches!(
            self.mode,
            PublishMode::AtomicBatches {
                whole_transactions: true,
                ..
            }
        ) {
            return 0;
        }
        let keep = self
            .unacked
            .iter()
            .rposition(|entry| entry.event.last_in_transaction)
            .map_or(0, |last| last + 1)
            .max(self.sent);
        let withdrawn = self.unacked.len().saturating_sub(keep);
        self.unacked.truncate(keep);
        withdrawn as u64
    }

    /// Number of answers awaited (events in chained mode, batches in batch modes).
    pub fn in_flight(&self) -> usize {
        match &self.fast {
            Some(fast) => fast.in_flight(),
            None => self.acks.len(),
        }
    }

    /// Counts the oldest unacknowledged event as stored at `sequence`: where it was sent to
    /// go, or earlier (a duplicate of an earlier run's message). `acked_at` (PostgreSQL's
    /// epoch, µs) is read once for all the events an answer acknowledges.
    fn acknowledge_front(&mut self, sequence: u64, acked_at: i64) {
        let Some(done) = self.unacked.pop_front() else {
            return;
        };
        done.published.inc();
        if let Some(commit_micros) = done.event.commit_time_micros {
            let latency = (acked_at - commit_micros).max(0) as f64 / 1e6;
            self.metrics.commit_to_ack_seconds.observe(latency);
        }
        self.last_position = Some(done.event.position);
        self.acked_count += 1;
        self.busy = None;
        if sequence != done.sequence {
            // Not at the stream's end: the next publish starts a new chain.
            self.chain = Chain::Start;
            return;
        }
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
        self.end = sequence;
        // The event itself is kept, not its id: the id is needed only by the next publish,
        // and copying it here would allocate for every ack.
        self.chain = Chain::After(done.event);
    }

    /// Sends `unacked[index]` expecting it to land directly after its predecessor: the
    /// stream's last sequence must be the one before it and, unless it starts a chain, the
    /// stream's last message its predecessor (by id, so another client's message between them
    /// fails it rather than standing in for the predecessor).
    async fn send(&mut self, index: usize) -> Result<(), PublishFailure> {
        self.headers.clear();
        write_expectations(&mut self.headers, &self.unacked, &self.chain, index, true);
        let event = &self.unacked[index].event;
        self.acks
            .publish(
                &mut self.publisher,
                &event.subject,
                &self.headers,
                &event.payload,
            )
            .await
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
        if failure.kind() == "duplicate_in_batch" {
            self.send_single = true;
        }
        if let Some(fatal) = failure.fatal_for(&self.stream_name) {
            return Err(fatal);
        }
        if failure.server_busy() {
            // Re-sent at once, the events would meet the same full queue (or the same original
            // still being stored): give the server time, longer each time in a row.
            let delay = self.busy.get_or_insert_with(Backoff::new).next_delay();
            tracing::info!(
                stream = %self.stream_name,
                unacked = self.unacked.len(),
                "the server is busy ({failure}); re-syncing and re-sending in {delay:?}"
            );
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => {}
            }
        } else if failure.stream_moved() {
            // Usually another client publishing into the stream: expected, not a fault.
            tracing::info!(
                stream = %self.stream_name,
                unacked = self.unacked.len(),
                "the stream moved under walstream ({failure}); re-syncing and re-sending"
            );
        } else {
            tracing::warn!(
                stream = %self.stream_name,
                unacked = self.unacked.len(),
                "publish failed ({failure}); re-syncing with the stream and re-sending"
            );
        }
        let mut backoff = Backoff::new();
        // Since when every answer put the stream's end before what JetStream acknowledged.
        let mut behind_since: Option<Instant> = None;
        loop {
            // Let every outstanding ack resolve so nothing sent earlier lands after the re-sync.
            match &mut self.fast {
                Some(fast) => fast.settle(&mut self.publisher).await,
                None => while self.acks.next().await.is_some() {},
            }
            self.sent = 0;
            self.fast_acknowledged = 0;
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
                            acknowledged: self.end,
                            found,
                            limit: STREAM_BEHIND_LIMIT,
                        });
                    }
                    tracing::warn!(
                        stream = %self.stream_name,
                        acknowledged = self.end,
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
        let retry = |e: &dyn std::fmt::Display| ResyncError::Retry(e.to_string());
        let mut stream = self
            .js
            .get_stream(&self.stream_name)
            .await
            .map_err(|e| retry(&e))?;
        let last = stream
            .info()
            .await
            .map_err(|e| retry(&e))?
            .state
            .last_sequence;
        if last < self.end {
            return Err(ResyncError::Behind { found: last });
        }
        let ids: Vec<&str> = self
            .unacked
            .iter()
            .map(|u| u.event.message_id.as_str())
            .collect();
        let end = self.end;
        let stored = stored_count(&ids, last - end, |offset| {
            let stream = &stream;
            async move { id_at(stream, end + 1 + offset as u64).await }
        })
        .await
        .map_err(ResyncError::Retry)?;
        let stored = match stored {
            Count::Stored(count) => count,
            Count::Broken { offset, found } => {
                return Err(ResyncError::Fatal(SinkError::ChainBroken {
                    stream: self.stream_name.clone(),
                    sequence: end + 1 + offset as u64,
                    found,
                    expected: ids.get(offset).map_or_else(String::new, |s| s.to_string()),
                }))
            }
        };
        tracing::debug!(
            stream = %self.stream_name,
            end,
            last,
            stored,
            unacked = self.unacked.len(),
            "re-sync counted walstream's events in the stream"
        );
        let acked_at = pg_micros_now();
        for _ in 0..stored {
            let sequence = self.end + 1;
            if let Some(front) = self.unacked.front_mut() {
                front.sequence = sequence;
            }
            self.acknowledge_front(sequence, acked_at);
        }
        let others = last - self.end;
        if others > 0 {
            self.metrics.other_publishers_messages.inc_by(others);
            tracing::info!(
                stream = %self.stream_name,
                messages = others,
                after = self.end,
                "messages another client published into the stream; walstream's events go on \
                 after them"
            );
            self.end = last;
            self.chain = Chain::Start;
        }
        let resend = self.unacked.len();
        for (offset, entry) in self.unacked.iter_mut().enumerate() {
            entry.sequence = last + offset as u64 + 1;
        }
        if resend > 0 {
            self.metrics.publish_retries.inc_by(resend as u64);
            tracing::info!(stream = %self.stream_name, resend, "re-sending unacknowledged events");
        }
        let sent = match self.mode {
            PublishMode::Chained => {
                let mut sent = Ok(());
                for index in 0..resend {
                    sent = self.send(index).await;
                    if sent.is_err() {
                        break;
                    }
                }
                sent
            }
            PublishMode::AtomicBatches { .. } if resend > 0 => self.send_batch().await,
            PublishMode::AtomicBatches { .. } => Ok(()),
            PublishMode::FastIngest { .. } => self.pump(true).await,
        };
        match sent {
            Ok(()) => Ok(()),
            Err(PublishFailure::TooLarge) => Err(ResyncError::Fatal(self.too_large())),
            Err(other) => Err(ResyncError::Retry(other.to_string())),
        }
    }

    fn too_large(&self) -> SinkError {
        let max = self.js.client().server_info().max_payload;
        let over = self
            .unacked
            .iter()
            .find(|entry| entry.event.payload.len() + headers_len(&entry.event) > max);
        match over.or(self.unacked.back()) {
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

/// What a re-sync finds of the unacknowledged events in the stream.
#[derive(Debug, PartialEq, Eq)]
enum Count {
    /// The stream holds this many of them, the oldest first.
    Stored(usize),
    /// The message at this offset after the known end has the id of a later event than the
    /// chain allows there.
    Broken { offset: usize, found: String },
}

/// How many of the unacknowledged events (`ids`, oldest first) the stream holds, `appended`
/// messages having been stored after the end walstream knew; `id_at(offset)` reads the
/// `Nats-Msg-Id` of the message `offset` places after that end (`None`: none, or gone).
///
/// The chain of expectations puts walstream's stored events right after that end, one after
/// another, so "the message at offset i is event i" holds for a prefix of the offsets: the
/// last candidate is read first (the usual case: nobody else published), else a binary search
/// finds the prefix. Only an id seen in its place counts; a message without one, with
/// another id, or gone, never does.
async fn stored_count<F, Fut>(ids: &[&str], appended: u64, id_at: F) -> Result<Count, String>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Option<String>, String>>,
{
    let candidates = ids
        .len()
        .min(usize::try_from(appended).unwrap_or(usize::MAX));
    if candidates == 0 {
        return Ok(Count::Stored(0));
    }
    let holds = |offset: usize| {
        let future = id_at(offset);
        async move {
            let found: Option<String> = future.await?;
            let verdict = match found {
                Some(found) if found == ids[offset] => Ok(true),
                // A later event of the window where an earlier one belongs.
                Some(found) if ids[offset..].contains(&found.as_str()) => {
                    Err(Count::Broken { offset, found })
                }
                _ => Ok(false),
            };
            Ok::<_, String>(verdict)
        }
    };
    match holds(candidates - 1).await? {
        Ok(true) => return Ok(Count::Stored(candidates)),
        Ok(false) => {}
        Err(broken) => return Ok(broken),
    }
    let (mut low, mut high) = (0, candidates - 1);
    while low < high {
        let middle = low + (high - low) / 2;
        match holds(middle).await? {
            Ok(true) => low = middle + 1,
            Ok(false) => high = middle,
            Err(broken) => return Ok(broken),
        }
    }
    Ok(Count::Stored(low))
}

/// The `Nats-Msg-Id` of the message at `sequence`; `None` when it has none or is gone.
async fn id_at(
    stream: &jetstream::stream::Stream,
    sequence: u64,
) -> Result<Option<String>, String> {
    let message = message_at(stream, sequence)
        .await
        .map_err(|e| e.to_string())?;
    Ok(message.and_then(|m| m.headers.get(MESSAGE_ID).map(|v| v.as_str().to_owned())))
}

/// What the next publish after the acknowledged events is chained to.
enum Chain {
    /// A new chain: the stream's end is not walstream's last acknowledged event (at start,
    /// after another client's message); the next publish expects only the last sequence.
    Start,
    /// walstream's event stored at the stream's end: the next publish expects its id too.
    After(EncodedEvent),
}

enum ResyncError {
    Retry(String),
    /// The stream reports an end before the last message known stored.
    Behind {
        found: u64,
    },
    Fatal(SinkError),
}

/// The next batch of whole transactions among `waiting` events whose first `max` end their
/// transaction where `ends` says: how many events, and how many of the first belong to a
/// transaction split across batches (`continuing`: the stream holds the first part of the
/// first one's). None until a transaction ends, unless one alone fills a batch: then it is
/// split, `max` events a batch.
fn batch_of_transactions(
    ends: &[bool],
    waiting: usize,
    max: usize,
    continuing: bool,
) -> (usize, usize) {
    match ends.iter().take(max).rposition(|&end| end) {
        Some(last) => {
            let split = match continuing {
                true => ends.iter().position(|&end| end).map_or(0, |end| end + 1),
                false => 0,
            };
            (last + 1, split)
        }
        None if waiting >= max => (max, max),
        None => (0, 0),
    }
}

/// Writes the headers of `unacked[index]` with what it expects of the stream: the last
/// sequence the one before its own, and, `with_id`, unless it starts a chain, its
/// predecessor's id.
fn write_expectations(
    headers: &mut HeaderBlock,
    unacked: &VecDeque<Unacked>,
    chain: &Chain,
    index: usize,
    with_id: bool,
) {
    let entry = &unacked[index];
    entry.event.write_headers(headers);
    headers.put_number(EXPECTED_LAST_SEQUENCE, entry.sequence - 1);
    let predecessor = match index {
        0 => match chain {
            Chain::After(event) => Some(event),
            Chain::Start => None,
        },
        _ => Some(&unacked[index - 1].event),
    };
    if let Some(predecessor) = predecessor.filter(|_| with_id) {
        headers.put(EXPECTED_LAST_MESSAGE_ID, &predecessor.message_id);
    }
}

/// Writes an event's headers as message `index` of `count` in batch `batch_id`; the first
/// expects the stream's last sequence to be `end`.
fn write_batch_headers(
    headers: &mut HeaderBlock,
    event: &EncodedEvent,
    batch_id: &str,
    index: usize,
    count: usize,
    end: u64,
) {
    event.write_headers(headers);
    headers.put(BATCH_ID, batch_id);
    headers.put_number(BATCH_SEQUENCE, index + 1);
    if index == 0 {
        headers.put_number(EXPECTED_LAST_SEQUENCE, end);
    }
    if index + 1 == count {
        headers.put(BATCH_COMMIT, "1");
    }
}

fn headers_len(event: &EncodedEvent) -> usize {
    event.headers().wire_len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts with the stream's messages after the known end given by their ids.
    fn count(ids: &[&str], stream: &[Option<&str>]) -> Count {
        let stream: Vec<Option<String>> = stream.iter().map(|id| id.map(str::to_owned)).collect();
        let reads = std::cell::Cell::new(0);
        let result = futures::executor::block_on(stored_count(ids, stream.len() as u64, |i| {
            reads.set(reads.get() + 1);
            let found = stream[i].clone();
            async move { Ok(found) }
        }));
        assert!(
            reads.get() <= 2 + ids.len().max(1).ilog2() as usize,
            "too many reads"
        );
        result.expect("no read fails here")
    }

    fn nats(window: usize, transactions: TransactionMode, fast_ingest: bool) -> NatsConfig {
        NatsConfig {
            max_inflight: window,
            transactions,
            fast_ingest,
            ..NatsConfig::default()
        }
    }

    fn facts(replicas: usize, server_version: &str, allowed: bool) -> StreamFacts<'_> {
        StreamFacts {
            replicas,
            server_version,
            atomic_allowed: allowed,
            batched_allowed: allowed,
        }
    }

    #[test]
    fn replicated_streams_on_2_12_1_and_later_take_atomic_batches() {
        let classic = nats(4096, TransactionMode::Independent, false);
        let mode = |replicas, version, allowed| {
            PublishMode::for_stream(facts(replicas, version, allowed), &classic)
        };
        assert_eq!(mode(1, "2.15.1", true).ok(), Some(PublishMode::Chained));
        assert_eq!(mode(3, "2.9.10", false).ok(), Some(PublishMode::Chained));
        assert_eq!(mode(3, "2.12.0", false).ok(), Some(PublishMode::Chained));
        assert_eq!(
            mode(3, "2.12.8", true).ok(),
            Some(PublishMode::AtomicBatches {
                max: SERVER_BATCH_LIMIT,
                whole_transactions: false
            })
        );
        assert_eq!(
            PublishMode::for_stream(
                facts(3, "2.15.1", true),
                &nats(64, TransactionMode::Independent, false)
            )
            .ok(),
            Some(PublishMode::AtomicBatches {
                max: 64,
                whole_transactions: false
            })
        );
        // A replicated stream that refuses atomic batches is not published to in chained mode
        // there: a failed id check would stop the stream.
        let refused = mode(3, "2.15.1", false).unwrap_err().to_string();
        assert!(refused.contains("allow_atomic"), "{refused}");
    }

    #[test]
    fn servers_with_fast_ingest_take_it_unless_told_not_to() {
        let fast = nats(1024, TransactionMode::Independent, true);
        let mode = |replicas, version, allowed| {
            PublishMode::for_stream(facts(replicas, version, allowed), &fast)
        };
        assert_eq!(
            mode(1, "2.14.0", true).ok(),
            Some(PublishMode::FastIngest { replicated: false })
        );
        assert_eq!(
            mode(3, "2.15.1", true).ok(),
            Some(PublishMode::FastIngest { replicated: true })
        );
        // Older servers keep their modes.
        assert_eq!(mode(1, "2.12.8", true).ok(), Some(PublishMode::Chained));
        assert!(matches!(
            mode(3, "2.12.8", true),
            Ok(PublishMode::AtomicBatches { .. })
        ));
        let refused = mode(1, "2.15.1", false).unwrap_err().to_string();
        assert!(refused.contains("allow_batched"), "{refused}");
        // What the stream must allow: fast ingest, and atomic batches only where they serve.
        let needs = |replicas, version, config: &NatsConfig| {
            PublishMode::stream_needs(replicas, version, config)
        };
        assert_eq!(
            needs(3, "2.15.1", &fast),
            BatchSettings {
                atomic: false,
                batched: true
            }
        );
        assert_eq!(
            needs(
                3,
                "2.15.1",
                &nats(1024, TransactionMode::Independent, false)
            ),
            BatchSettings {
                atomic: true,
                batched: false
            }
        );
        assert_eq!(
            needs(1, "2.11.11", &fast),
            BatchSettings {
                atomic: false,
                batched: false
            }
        );
        // Atomic transactions need atomic batches, fast ingest or not.
        assert_eq!(
            needs(1, "2.15.1", &nats(1024, TransactionMode::Atomic, true)),
            BatchSettings {
                atomic: true,
                batched: false
            }
        );
    }

    #[test]
    fn atomic_transactions_take_atomic_batches_on_any_stream_of_a_server_that_has_them() {
        let config = nats(4096, TransactionMode::Atomic, true);
        let atomic =
            |replicas, version| PublishMode::for_stream(facts(replicas, version, true), &config);
        assert_eq!(
            atomic(1, "2.12.8").ok(),
            Some(PublishMode::AtomicBatches {
                max: SERVER_BATCH_LIMIT,
                whole_transactions: true
            })
        );
        assert_eq!(
            atomic(1, "2.15.1").ok(),
            Some(PublishMode::AtomicBatches {
                max: SERVER_BATCH_LIMIT,
                whole_transactions: true
            })
        );
        assert!(atomic(3, "2.15.1").is_ok());
        for old in ["2.9.10", "2.11.11", "2.12.0"] {
            let refused = atomic(1, old).unwrap_err().to_string();
            assert!(refused.contains("2.12.1"), "{refused}");
        }
    }

    #[test]
    fn a_batch_expects_the_end_on_its_first_message_and_commits_on_its_last() {
        let config = crate::config::Config::parse(
            "[database]\nurl='postgres://localhost/db'\n[replication]\ntables=['public.t']\n",
            std::path::Path::new("test"),
            &|_| None,
        )
        .expect("a valid config");
        let encoder = crate::pipeline::event::Encoder::new(
            crate::pipeline::event::Naming::from_config(&config),
        );
        let event = encoder.failover_marker(&crate::pipeline::event::failover::FailoverMarker {
            from_timeline: 1,
            timeline: 2,
            switch: crate::lsn::Lsn(0x100),
            phantoms: crate::pipeline::event::failover::Phantoms {
                first_sequence: 1,
                last_sequence: 1,
                count: 1,
                first: Position::at(crate::lsn::Lsn(0x100), 0),
                last: Position::at(crate::lsn::Lsn(0x100), 0),
            },
        });
        let batch_headers = |index| {
            let mut headers = HeaderBlock::new();
            write_batch_headers(&mut headers, &event, "b-1", index, 3, 41);
            headers
        };
        let first = batch_headers(0);
        assert_eq!(first.get(BATCH_ID), Some("b-1"));
        assert_eq!(first.get(BATCH_SEQUENCE), Some("1"));
        assert_eq!(first.get(EXPECTED_LAST_SEQUENCE), Some("41"));
        assert_eq!(first.get(BATCH_COMMIT), None);
        assert_eq!(first.get(MESSAGE_ID), Some(event.message_id.as_str()));
        let last = batch_headers(2);
        assert_eq!(last.get(BATCH_SEQUENCE), Some("3"));
        assert_eq!(last.get(BATCH_COMMIT), Some("1"));
        assert_eq!(last.get(EXPECTED_LAST_SEQUENCE), None);
        // Never the id chain: a replicated stream checks it only when applying.
        assert_eq!(last.get(EXPECTED_LAST_MESSAGE_ID), None);
    }

    #[test]
    fn batches_of_atomic_transactions_end_where_a_transaction_ends() {
        // Transactions of 1, 3 and 2 events; at most 5 a batch.
        let ends = [true, false, false, true, false, true];
        assert_eq!(batch_of_transactions(&ends, 6, 5, false), (4, 0));
        assert_eq!(batch_of_transactions(&ends, 6, 6, false), (6, 0));
        // The last transaction has not ended yet: it waits.
        assert_eq!(batch_of_transactions(&[false, false], 2, 5, false), (0, 0));
        assert_eq!(batch_of_transactions(&[true, false], 2, 5, false), (1, 0));
        // One transaction larger than a batch: split, a full batch at a time.
        assert_eq!(batch_of_transactions(&[false; 5], 7, 5, false), (5, 5));
        assert_eq!(batch_of_transactions(&[false; 5], 12, 5, true), (5, 5));
        // Its last part, then whole transactions after it.
        assert_eq!(
            batch_of_transactions(&[false, true, true], 3, 5, true),
            (3, 2)
        );
        assert_eq!(batch_of_transactions(&[], 0, 5, false), (0, 0));
    }

    #[test]
    fn nothing_appended_means_nothing_stored() {
        assert_eq!(count(&["a", "b"], &[]), Count::Stored(0));
        assert_eq!(count(&[], &[Some("x")]), Count::Stored(0));
    }

    #[test]
    fn a_prefix_of_the_window_in_its_places_is_stored() {
        let ids = ["a", "b", "c", "d"];
        assert_eq!(
            count(&ids, &[Some("a"), Some("b"), Some("c"), Some("d")]),
            Count::Stored(4)
        );
        assert_eq!(count(&ids, &[Some("a"), Some("b")]), Count::Stored(2));
        assert_eq!(count(&ids, &[Some("a")]), Count::Stored(1));
    }

    // The silent loss of issue 16: another client's message took the place of the first event,
    // and a sequence number alone made it look stored.
    #[test]
    fn another_clients_message_is_never_taken_for_an_event() {
        let ids = ["a", "b", "c"];
        assert_eq!(count(&ids, &[None]), Count::Stored(0));
        assert_eq!(count(&ids, &[Some("foreign")]), Count::Stored(0));
        assert_eq!(count(&ids, &[Some("a"), None, None]), Count::Stored(1));
        assert_eq!(
            count(
                &ids,
                &[Some("a"), Some("b"), Some("x"), Some("y"), Some("z")]
            ),
            Count::Stored(2)
        );
        // A copy of an event's id in another place is not the event.
        assert_eq!(count(&ids, &[None, Some("a"), Some("b")]), Count::Stored(0));
    }

    // JetStream stored "b" only with "a" as the stream's last message: a message gone from
    // before it (deleted, expired) was "a".
    #[test]
    fn an_event_in_its_place_vouches_for_its_predecessors() {
        assert_eq!(
            count(&["a", "b", "c"], &[None, Some("b")]),
            Count::Stored(2)
        );
    }

    #[test]
    fn a_later_event_where_an_earlier_belongs_breaks_the_chain() {
        assert_eq!(
            count(&["a", "b", "c"], &[None, Some("c")]),
            Count::Broken {
                offset: 1,
                found: "c".into()
            }
        );
        assert_eq!(
            count(&["a", "b", "c"], &[Some("c")]),
            Count::Broken {
                offset: 0,
                found: "c".into()
            }
        );
    }

    #[test]
    fn a_failed_read_is_an_error_not_an_answer() {
        let result = futures::executor::block_on(stored_count(&["a"], 1, |_| async {
            Err::<Option<String>, _>("timeout".to_owned())
        }));
        assert_eq!(result, Err("timeout".to_owned()));
    }
}
