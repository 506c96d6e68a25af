//! Fast-ingest batches (nats-server 2.14+, ADR-50): events appended to an open batch whose
//! control travels in each message's reply subject, the server acknowledging every few
//! messages instead of every one.
//!
//! A reply subject reads `{inbox}.{batch}.{flow}.fail.{sequence}.{operation}.$FI`: the batch
//! is a counter of ours, `flow` how often we ask to be acknowledged, `fail` the gap mode (a
//! message lost on the way ends the batch rather than leaving a hole), the sequence the
//! message's place in the batch. The server answers on that subject: `{"type":"ack","seq":k,
//! "msgs":n}` once the batch's first k messages are stored (and every n from then on),
//! `{"type":"err"…}` or `{"type":"gap"…}` when one is refused, ending the batch, and a publish
//! acknowledgement with the batch's count when it ends. What each message expects of the
//! stream (`Nats-Expected-Last-Sequence`, `Nats-Msg-Id`) is checked as in a plain publish, so
//! a message stored is one stored in its place.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::{Client, Message, Subject, Subscriber};
use futures::{FutureExt as _, StreamExt};
use tokio::time::Instant;

use super::acks::{self, PublishFailure};
use crate::nats::wire::HeaderBlock;
use crate::nats::Publisher;

/// How many acknowledgement intervals may be outstanding before appending waits (ADR-50's
/// recommendation).
const OUTSTANDING_INTERVALS: u64 = 2;

/// What the server said of the oldest batch awaiting answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// `count` more of its messages are stored, in order, each where it expected to be.
    Stored(u64),
    /// It ended with its last message stored at `sequence`; `count` of its `sent` messages
    /// were taken (stored, or dropped as a duplicate of one stored).
    Ended {
        sequence: u64,
        count: u64,
        sent: u64,
    },
    Failed(PublishFailure),
}

/// One answer on a batch's reply subjects.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    /// The batch's first `stored` messages are stored; acknowledgements come every `every`.
    Flow { stored: u64, every: u64 },
    /// The batch ended: a publish acknowledgement, for its last stored message.
    Ended { sequence: u64, count: u64 },
    /// A message was refused (or lost on the way): the batch ends there.
    Refused(PublishFailure),
    /// A message of a batch the server no longer knows (it ended, timed out, or never began).
    Unknown,
}

/// Reads one answer: a flow message (`"type"`), or a publish acknowledgement or error.
fn reply(message: &Message) -> Reply {
    #[derive(serde::Deserialize)]
    struct Flow {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        seq: u64,
        #[serde(default)]
        msgs: u64,
        #[serde(default)]
        last_seq: u64,
        error: Option<FlowError>,
    }
    #[derive(serde::Deserialize)]
    struct FlowError {
        #[serde(default)]
        err_code: u64,
        #[serde(default)]
        description: String,
    }
    if message.status.is_none() {
        if let Ok(flow) = serde_json::from_slice::<Flow>(&message.payload) {
            return match flow.kind.as_str() {
                "ack" => Reply::Flow {
                    stored: flow.seq,
                    every: flow.msgs.max(1),
                },
                "gap" => Reply::Refused(PublishFailure::Failed {
                    kind: "batch_gap",
                    detail: format!(
                        "message {} of a fast batch arrived after {}: one was lost on the way",
                        flow.seq, flow.last_seq
                    ),
                }),
                _ => {
                    let error = flow.error.unwrap_or(FlowError {
                        err_code: 0,
                        description: String::from_utf8_lossy(&message.payload).into_owned(),
                    });
                    Reply::Refused(acks::refusal(error.err_code, error.description))
                }
            };
        }
    }
    match acks::answer(message) {
        Ok(stored) => Reply::Ended {
            sequence: stored.sequence,
            count: stored.batch_count.unwrap_or(1) as u64,
        },
        Err(failure) if failure.kind() == "batch_unknown" => Reply::Unknown,
        Err(failure) => Reply::Refused(failure),
    }
}

struct Batch {
    id: u64,
    /// `{inbox}.{batch}.{flow}.fail.`, the part its messages' reply subjects share.
    reply_prefix: String,
    /// The subject of its first message: an end-of-batch marker goes there, stored nowhere.
    first_subject: Subject,
    /// Messages sent in it (an end-of-batch marker not counted).
    sent: u64,
    /// Of those, how many the server said stored, and how many of those were reported.
    stored: u64,
    reported: u64,
    /// How often the server acknowledges.
    every: u64,
    /// No message is added any more; its end is awaited.
    closed: bool,
    ended: Option<(u64, u64)>,
    failure: Option<PublishFailure>,
    /// The failure was reported: only the batch's end is still of interest.
    failed: bool,
    /// When an answer is overdue; moved on by every send and answer.
    deadline: Instant,
}

impl Batch {
    fn new(inbox: &str, id: u64, flow: u64, first_subject: Subject, deadline: Instant) -> Self {
        Self {
            id,
            reply_prefix: format!("{inbox}.{id}.{flow}.fail."),
            first_subject,
            sent: 0,
            stored: 0,
            reported: 0,
            every: flow,
            closed: false,
            ended: None,
            failure: None,
            failed: false,
            deadline,
        }
    }

    /// The reply subject of its message `sequence`, sent as `operation`: one per message, so
    /// written without the formatting machinery.
    /// Writes into `reply` the reply subject of message `sequence`, doing `operation`.
    fn write_reply(&self, reply: &mut String, sequence: u64, operation: u8) {
        reply.clear();
        reply.push_str(&self.reply_prefix);
        reply.push_str(itoa::Buffer::new().format(sequence));
        reply.push('.');
        debug_assert!(operation <= 4, "ADR-50's operations are 0 to 4");
        reply.push(char::from(b'0' + operation));
        reply.push_str(".$FI");
    }

    fn awaits_answer(&self) -> bool {
        self.ended.is_none() && (self.closed || self.sent > self.stored || self.failed)
    }
}

/// The fast-ingest batches of one sink: at most one open, the older ones awaiting their end.
pub struct FastBatches {
    subscriber: Subscriber,
    /// `_INBOX.{unique}`, under which every batch's replies arrive.
    inbox: String,
    /// The acknowledgement interval asked for.
    flow: u64,
    /// The last reply subject, its memory kept between publishes.
    reply: String,
    /// The header block of a batch's closing marker, which carries none.
    no_headers: HeaderBlock,
    timeout: Duration,
    next_id: u64,
    /// Oldest first; an open batch is the last.
    batches: VecDeque<Batch>,
}

impl FastBatches {
    /// Subscribes to a fresh inbox; `flow` is the acknowledgement interval to ask for, and
    /// an answer overdue by `timeout` a failure.
    pub async fn subscribe(client: &Client, flow: u64, timeout: Duration) -> Result<Self, String> {
        let inbox = client.new_inbox();
        let subscriber = acks::subscribe_before_publishing(client, format!("{inbox}.>")).await?;
        Ok(Self {
            subscriber,
            inbox,
            flow: flow.clamp(1, u64::from(u16::MAX)),
            reply: String::new(),
            no_headers: HeaderBlock::new(),
            timeout,
            next_id: 0,
            batches: VecDeque::new(),
        })
    }

    /// Whether a batch takes more messages.
    pub fn has_open(&self) -> bool {
        self.batches.back().is_some_and(|batch| !batch.closed)
    }

    /// The open batch has as many messages unacknowledged as the server lets it.
    pub fn stalled(&self) -> bool {
        self.batches.back().is_some_and(|batch| {
            !batch.closed && batch.sent >= batch.stored + batch.every * OUTSTANDING_INTERVALS
        })
    }

    /// Batches awaiting an answer.
    pub fn in_flight(&self) -> usize {
        self.batches.iter().filter(|b| b.awaits_answer()).count()
    }

    /// Adds a message to the open batch, opening one if none is.
    pub async fn append(
        &mut self,
        publisher: &mut Publisher,
        subject: &Subject,
        headers: &HeaderBlock,
        payload: &[u8],
    ) -> Result<(), PublishFailure> {
        if !self.has_open() {
            self.open(subject.clone());
        }
        let operation = if self.open_batch().sent == 0 { 0 } else { 1 };
        self.send(publisher, subject, headers, payload, operation)
            .await
    }

    /// Sends one message as a plain publish, answered
    /// in turn with the batches: a batch of one costs the server more than a plain publish,
    /// and made a steady trickle of changes wait tens of milliseconds at the 99th percentile
    /// on nats-server 2.15.1 (the bench).
    pub async fn single(
        &mut self,
        publisher: &mut Publisher,
        subject: &Subject,
        headers: &HeaderBlock,
        payload: &[u8],
    ) -> Result<(), PublishFailure> {
        self.open(subject.clone());
        let id = self.open_batch().id;
        let mut reply = std::mem::take(&mut self.reply);
        reply.clear();
        reply.push_str(&self.inbox);
        reply.push('.');
        reply.push_str(itoa::Buffer::new().format(id));
        let sent = self
            .publish(publisher, subject, &reply, headers, payload)
            .await;
        self.reply = reply;
        self.open_batch().closed = true;
        sent
    }

    /// Ends the open batch with a marker stored nowhere; its answer tells how it ended.
    pub async fn close(&mut self, publisher: &mut Publisher) -> Result<(), PublishFailure> {
        if !self.has_open() {
            return Ok(());
        }
        let subject = self.open_batch().first_subject.clone();
        let no_headers = std::mem::take(&mut self.no_headers);
        let result = self.send(publisher, &subject, &no_headers, &[], 3).await;
        self.no_headers = no_headers;
        let batch = self.open_batch();
        batch.sent -= 1;
        batch.closed = true;
        result
    }

    fn open(&mut self, first_subject: Subject) {
        self.next_id += 1;
        let batch = Batch::new(
            &self.inbox,
            self.next_id,
            self.flow,
            first_subject,
            Instant::now() + self.timeout,
        );
        self.batches.push_back(batch);
    }

    fn open_batch(&mut self) -> &mut Batch {
        self.batches
            .back_mut()
            .unwrap_or_else(|| unreachable!("a batch was opened before"))
    }

    async fn send(
        &mut self,
        publisher: &mut Publisher,
        subject: &Subject,
        headers: &HeaderBlock,
        payload: &[u8],
        operation: u8,
    ) -> Result<(), PublishFailure> {
        let mut reply = std::mem::take(&mut self.reply);
        let batch = self.open_batch();
        batch.write_reply(&mut reply, batch.sent + 1, operation);
        let sent = self
            .publish(publisher, subject, &reply, headers, payload)
            .await;
        self.reply = reply;
        sent
    }

    /// Publishes one message of the open batch, answered on `reply`.
    async fn publish(
        &mut self,
        publisher: &mut Publisher,
        subject: &Subject,
        reply: &str,
        headers: &HeaderBlock,
        payload: &[u8],
    ) -> Result<(), PublishFailure> {
        let timeout = self.timeout;
        let batch = self.open_batch();
        batch.sent += 1;
        batch.deadline = Instant::now() + timeout;
        let sent = publisher
            .publish(subject.as_str(), Some(reply), Some(headers), payload)
            .await
            .map_err(acks::publish_failure);
        if sent.is_err() {
            // Never sent, so never answered: the batch ends here for walstream.
            let batch = self.open_batch();
            batch.closed = true;
            batch.failed = true;
        }
        sent
    }

    /// What the server said of the oldest batch awaiting answers; `None` when none awaits.
    /// Cancel-safe: an answer received before a cancellation is kept for the next call.
    pub async fn next(&mut self) -> Option<Progress> {
        loop {
            if let Some(progress) = self.progress() {
                return Some(progress);
            }
            let front = self.batches.front()?;
            if !front.awaits_answer() {
                return None;
            }
            let deadline = front.deadline;
            let message = match self.subscriber.next().now_or_never() {
                Some(message) => message,
                None if Instant::now() >= deadline => return Some(self.timed_out()),
                None => tokio::select! {
                    biased;
                    message = self.subscriber.next() => message,
                    () = tokio::time::sleep_until(deadline) => return Some(self.timed_out()),
                },
            };
            match message {
                Some(message) => self.record(&message),
                None => {
                    self.forget_front();
                    return Some(Progress::Failed(PublishFailure::Failed {
                        kind: "broken_pipe",
                        detail: "the NATS connection closed".into(),
                    }));
                }
            }
        }
    }

    /// Waits until every batch sent has ended or is overdue, then forgets them all: after a
    /// failure nothing sent before may land after walstream re-reads the stream's end.
    pub async fn settle(&mut self, publisher: &mut Publisher) {
        // Ended by the server only if one of its messages failed: ask for its end.
        let _ = self.close(publisher).await;
        while !self.batches.is_empty() {
            for batch in &mut self.batches {
                batch.closed = true;
                batch.failed = true;
            }
            while self.batches.front().is_some_and(|b| !b.awaits_answer()) {
                self.batches.pop_front();
            }
            let Some(deadline) = self.batches.front().map(|b| b.deadline) else {
                break;
            };
            tokio::select! {
                biased;
                message = self.subscriber.next() => match message {
                    Some(message) => self.record(&message),
                    None => self.batches.clear(),
                },
                () = tokio::time::sleep_until(deadline) => {
                    self.batches.pop_front();
                }
            }
        }
    }

    /// The next thing to report of the oldest batch, if known already.
    fn progress(&mut self) -> Option<Progress> {
        while self
            .batches
            .front()
            .is_some_and(|b| b.failed && b.ended.is_some())
        {
            self.batches.pop_front();
        }
        let front = self.batches.front_mut()?;
        if front.failed {
            return None;
        }
        if front.stored > front.reported {
            let count = front.stored - front.reported;
            front.reported = front.stored;
            return Some(Progress::Stored(count));
        }
        if let Some(failure) = front.failure.take() {
            front.failed = true;
            front.closed = true;
            return Some(Progress::Failed(failure));
        }
        let (sequence, count) = front.ended?;
        let sent = front.sent;
        self.batches.pop_front();
        Some(Progress::Ended {
            sequence,
            count,
            sent,
        })
    }

    fn timed_out(&mut self) -> Progress {
        self.forget_front();
        Progress::Failed(PublishFailure::Failed {
            kind: "timed_out",
            detail: format!("no answer to a fast batch within {:?}", self.timeout),
        })
    }

    fn forget_front(&mut self) {
        if let Some(front) = self.batches.front_mut() {
            front.failed = true;
            front.closed = true;
            front.ended.get_or_insert((0, 0));
        }
    }

    fn record(&mut self, message: &Message) {
        let id = message
            .subject
            .as_str()
            .strip_prefix(self.inbox.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|rest| rest.split('.').next())
            .and_then(|id| id.parse::<u64>().ok());
        // An answer for a batch already given up on finds none.
        let Some(index) = id.and_then(|id| self.batches.binary_search_by_key(&id, |b| b.id).ok())
        else {
            return;
        };
        let timeout = self.timeout;
        let batch = &mut self.batches[index];
        batch.deadline = Instant::now() + timeout;
        match reply(message) {
            Reply::Flow { stored, every } => {
                batch.stored = batch.stored.max(stored.min(batch.sent));
                batch.every = every;
            }
            Reply::Ended { sequence, count } => batch.ended = Some((sequence, count)),
            Reply::Refused(failure) => {
                if !batch.failed && batch.failure.is_none() {
                    batch.failure = Some(failure);
                }
            }
            // After a refusal the server forgets the batch: that is its end.
            Reply::Unknown if batch.failed || batch.failure.is_some() => {
                batch.ended.get_or_insert((0, 0));
            }
            Reply::Unknown => {
                if batch.ended.is_none() {
                    batch.failure = Some(PublishFailure::Failed {
                        kind: "batch_unknown",
                        detail: "the server no longer knows the fast batch (it timed out, or \
                                 the stream's leader changed)"
                            .into(),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: &str) -> Message {
        acks::answer_on("_INBOX.x.3.256.fail.12.1.$FI", payload)
    }

    #[test]
    fn reply_subjects_carry_batch_flow_gap_mode_sequence_and_operation() {
        let batch = Batch::new("_INBOX.x", 3, 256, Subject::from("s"), Instant::now());
        let reply = |sequence, operation| {
            let mut reply = String::from("left over");
            batch.write_reply(&mut reply, sequence, operation);
            reply
        };
        assert_eq!(reply(1, 0), "_INBOX.x.3.256.fail.1.0.$FI");
        assert_eq!(reply(12_345, 1), "_INBOX.x.3.256.fail.12345.1.$FI");
        assert_eq!(reply(12_346, 3), "_INBOX.x.3.256.fail.12346.3.$FI");
    }

    /// The answers nats-server 2.15.1 sent to batches of ours (recorded by hand).
    #[test]
    fn answers_read_like_nats_server_writes_them() {
        assert_eq!(
            reply(&message(r#"{"type":"ack","seq":20,"msgs":10}"#)),
            Reply::Flow {
                stored: 20,
                every: 10
            }
        );
        assert_eq!(
            reply(&message(
                r#"{"stream":"P","seq":25,"batch":"OP77cIouJinqa1McYx5OUq","count":25}"#
            )),
            Reply::Ended {
                sequence: 25,
                count: 25
            }
        );
        let Reply::Refused(wrong) = reply(&message(
            r#"{"type":"err","seq":12,"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 12"}}"#,
        )) else {
            panic!("a refusal")
        };
        assert_eq!(wrong.kind(), "wrong_last_sequence");
        let Reply::Refused(gap) = reply(&message(r#"{"type":"gap","last_seq":5,"seq":6}"#)) else {
            panic!("a refusal")
        };
        assert_eq!(gap.kind(), "batch_gap");
        // A message id check fails as in a plain publish, without "type".
        let Reply::Refused(id) = reply(&message(
            r#"{"error":{"code":400,"err_code":10070,"description":"wrong last msg ID: id11"},"stream":"P","seq":0}"#,
        )) else {
            panic!("a refusal")
        };
        assert_eq!(id.kind(), "wrong_last_msg_id");
        assert_eq!(
            reply(&message(
                r#"{"error":{"code":400,"err_code":10208,"description":"batch publish ID unknown"},"stream":"P","seq":0}"#
            )),
            Reply::Unknown
        );
        let Reply::Refused(off) = reply(&message(
            r#"{"error":{"code":400,"err_code":10205,"description":"batch publish not enabled"}}"#,
        )) else {
            panic!("a refusal")
        };
        assert_eq!(off.kind(), "fast_ingest_disabled");
    }
}
