//! Encodes one row change into its NATS message: subject, headers and JSON body.

use std::io::Write as _;
use std::sync::Arc;

use async_nats::Subject;
use bytes::Bytes;

use super::failover::FailoverMarker;
use super::identity::{self, write_entity_id, write_uuid};
use super::replay::{Replay, ReplayHeaders};
use super::value::{is_json, write_binary, write_string, write_value};
use super::{message_id_from_prefix, message_id_prefix, Naming, Position, RelationInfo};
use crate::lsn::{lsn_text, Lsn};
use crate::nats::wire::{HeaderBlock, HeaderLines, WriteHeaders, MESSAGE_ID};
use crate::op::{Op, CUSTOM_EVENT_TYPE};
use crate::pipeline::pgoutput::{ColumnValue, LogicalMessage, OldKind, TupleData};

pub const HEADER_XID: &str = "Walstream-Xid";
pub const HEADER_LSN: &str = "Walstream-Lsn";
pub const HEADER_SEQ: &str = "Walstream-Seq";
pub const HEADER_COMMIT_TIME: &str = "Walstream-Commit-Time";
/// The server's timeline the change was read on: after a failover, what tells an event of the
/// old primary's history from one of the new primary's.
pub const HEADER_TIMELINE: &str = "Walstream-Timeline";
/// `true` on the last event of its transaction (and on an event that is a transaction of its
/// own: a non-transactional message, a failover marker): what lets a consumer group changes by
/// transaction without counting them.
pub const HEADER_TX_LAST: &str = "Walstream-Tx-Last";

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01), which commit times
/// count from.
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Now, in microseconds since PostgreSQL's epoch, as commit times and the replication
/// protocol's clocks are given.
pub fn pg_micros_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64 - PG_EPOCH_UNIX_MICROS)
}

/// The transaction being decoded: what every one of its events shares, formatted once.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub xid: u32,
    pub commit_lsn: Lsn,
    /// Microseconds since 2000-01-01 (PostgreSQL's epoch); none for a standalone message.
    pub commit_time_micros: Option<i64>,
    /// The server's timeline it was read on.
    pub timeline: u32,
    next_seq: u64,
    /// What its events share in their headers and envelopes.
    shared: Arc<SharedHeaders>,
    /// `{slot}:{xid}:{commit lsn}:`, the start of each of its events' `Nats-Msg-Id`.
    message_id_prefix: Option<String>,
}

/// What every event of a transaction shares, rendered once: the start of its envelopes'
/// transaction fields, and its header lines every event's block copies.
#[derive(Debug)]
struct SharedHeaders {
    /// The commit LSN as PostgreSQL prints it, which its message ids carry.
    lsn_text: String,
    /// `,"timestamp":…,"lsn":…,"xid":…,"seq":`, ready for each event's place. The timestamp is
    /// the commit time; for a standalone message, which has none, the time it was read, so
    /// every event has one.
    envelope_fields: Vec<u8>,
    /// Xid, LSN, commit time (`Walstream-Commit-Time`, when there is one) and timeline.
    lines: HeaderLines,
    /// Set while the transaction is delivered again by a replay, with its header lines.
    replay: Option<(Replay, HeaderLines)>,
}

impl SharedHeaders {
    /// The same values, for events delivered again by `replay` (or, `None`, first deliveries).
    fn with_replay(&self, replay: Option<Replay>) -> Self {
        Self {
            lsn_text: self.lsn_text.clone(),
            envelope_fields: self.envelope_fields.clone(),
            lines: self.lines.clone(),
            replay: replay.map(|replay| {
                let mut lines = HeaderLines::default();
                ReplayHeaders { replay, from: None }.write(&mut lines);
                (replay, lines)
            }),
        }
    }
}

impl Transaction {
    pub fn begin(xid: u32, commit_lsn: Lsn, commit_time_micros: i64, timeline: u32) -> Self {
        Self::new(xid, commit_lsn, Some(commit_time_micros), timeline)
    }

    /// A transaction of one non-transactional logical message: no xid, no commit time.
    pub fn standalone(lsn: Lsn, timeline: u32) -> Self {
        Self::new(0, lsn, None, timeline)
    }

    fn new(xid: u32, commit_lsn: Lsn, commit_time_micros: Option<i64>, timeline: u32) -> Self {
        let lsn_text = lsn_text(commit_lsn);
        let timestamp = commit_time_micros.map_or_else(now_timestamp, format_pg_timestamp);
        let mut envelope_fields = Vec::with_capacity(96);
        envelope_fields.extend_from_slice(b",\"timestamp\":");
        write_string(&mut envelope_fields, timestamp.as_bytes());
        envelope_fields.extend_from_slice(b",\"lsn\":\"");
        envelope_fields.extend_from_slice(lsn_text.as_bytes());
        envelope_fields.extend_from_slice(b"\",\"xid\":");
        envelope_fields.extend_from_slice(itoa::Buffer::new().format(xid).as_bytes());
        envelope_fields.extend_from_slice(b",\"seq\":");
        let mut lines = HeaderLines::with_capacity(160);
        lines.put_number(HEADER_XID, xid);
        lines.put(HEADER_LSN, &lsn_text);
        if commit_time_micros.is_some() {
            lines.put(HEADER_COMMIT_TIME, &timestamp);
        }
        lines.put_number(HEADER_TIMELINE, timeline);
        let shared = SharedHeaders {
            lsn_text,
            envelope_fields,
            lines,
            replay: None,
        };
        Self {
            xid,
            commit_lsn,
            commit_time_micros,
            timeline,
            next_seq: 0,
            shared: Arc::new(shared),
            message_id_prefix: None,
        }
    }

    /// Marks the transaction's next events as delivered again by `replay`, or, with `None`,
    /// as first deliveries.
    pub fn set_replay(&mut self, replay: Option<Replay>) {
        if self.replay() != replay {
            self.shared = Arc::new(self.shared.with_replay(replay));
        }
    }

    pub fn replay(&self) -> Option<Replay> {
        self.shared.replay.as_ref().map(|(replay, _)| *replay)
    }

    /// The position the next change of this transaction will take.
    pub fn peek_position(&self) -> Position {
        Position {
            commit_lsn: self.commit_lsn,
            seq: self.next_seq,
        }
    }

    /// Passes over a change that is not published (unwatched table, already in the stream), so
    /// the positions of the others stay the same on every replay.
    pub fn skip_change(&mut self) {
        self.next_seq += 1;
    }

    fn take_position(&mut self) -> Position {
        let position = self.peek_position();
        self.next_seq += 1;
        position
    }
}

/// PostgreSQL commit time (µs since 2000-01-01 UTC) as RFC 3339 UTC.
pub fn format_pg_timestamp(micros: i64) -> String {
    let nanos = (i128::from(micros) + i128::from(PG_EPOCH_UNIX_MICROS)) * 1000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("invalid timestamp ({micros} µs since 2000-01-01)"))
}

/// The current time as RFC 3339 UTC.
fn now_timestamp() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// One event ready to publish.
#[derive(Debug, Clone)]
pub struct EncodedEvent {
    pub subject: Subject,
    pub payload: Bytes,
    pub position: Position,
    /// Delivered again by a replay (`walstream reset-lsn`).
    pub replay: bool,
    /// Its `Nats-Msg-Id`.
    pub message_id: String,
    /// Its transaction's commit time (microseconds since 2000-01-01), for the commit → ack
    /// latency.
    pub commit_time_micros: Option<i64>,
    /// What its headers start from.
    base_headers: BaseHeaders,
    /// A change has a place in its transaction (`Walstream-Seq`); a marker has none.
    in_transaction: bool,
    /// The last event of its transaction (`Walstream-Tx-Last`): known only once the next
    /// event or the commit is read, so set by the pipeline then.
    pub last_in_transaction: bool,
}

impl EncodedEvent {
    /// Writes the message's headers into `block`: its transaction's, its id and its place in
    /// the transaction.
    pub fn write_headers(&self, block: &mut HeaderBlock) {
        match &self.base_headers {
            BaseHeaders::Transaction(shared) => {
                block.put_lines(&shared.lines);
                if let Some((_, replay)) = &shared.replay {
                    block.put_lines(replay);
                }
            }
            BaseHeaders::Own(lines) => block.put_lines(lines),
        }
        block.put(MESSAGE_ID, &self.message_id);
        if self.in_transaction {
            block.put_number(HEADER_SEQ, self.position.seq);
        }
        if self.last_in_transaction {
            block.put(HEADER_TX_LAST, "true");
        }
    }

    /// The message's headers in a block of their own.
    pub fn headers(&self) -> HeaderBlock {
        let mut block = HeaderBlock::new();
        self.write_headers(&mut block);
        block
    }
}

/// Where an event's headers start from.
#[derive(Debug, Clone)]
enum BaseHeaders {
    /// Its transaction's, shared by all its events.
    Transaction(Arc<SharedHeaders>),
    /// Its own: an event outside any transaction (a failover marker).
    Own(Arc<HeaderLines>),
}

/// The relation changed shape between its Relation message and a row: a protocol violation.
#[derive(Debug, thiserror::Error)]
#[error("{table}: row has {row} columns but the relation has {relation}")]
pub struct ColumnCountMismatch {
    pub table: String,
    pub row: usize,
    pub relation: usize,
}

/// Encodes changes into messages, remembering the typical message size to allocate once.
#[derive(Debug)]
pub struct Encoder {
    naming: Naming,
    size_hint: usize,
}

impl Encoder {
    pub fn new(naming: Naming) -> Self {
        Self {
            naming,
            size_hint: 512,
        }
    }

    pub fn naming(&self) -> &Naming {
        &self.naming
    }

    pub fn insert(
        &mut self,
        tx: &mut Transaction,
        relation: &RelationInfo,
        new: &TupleData<'_>,
    ) -> Result<EncodedEvent, ColumnCountMismatch> {
        self.whole_row(Op::Insert, tx, relation, new)
    }

    /// A row's current state, read by `walstream backfill`: shaped like an insert.
    pub fn backfill(
        &mut self,
        tx: &mut Transaction,
        relation: &RelationInfo,
        row: &TupleData<'_>,
    ) -> Result<EncodedEvent, ColumnCountMismatch> {
        self.whole_row(Op::Backfill, tx, relation, row)
    }

    /// An event carrying a whole row and no old values: an insert, or a backfilled row.
    fn whole_row(
        &mut self,
        op: Op,
        tx: &mut Transaction,
        relation: &RelationInfo,
        row: &TupleData<'_>,
    ) -> Result<EncodedEvent, ColumnCountMismatch> {
        check_columns(relation, row)?;
        let (mut out, started) = self.start(relation, op, tx);
        let mut unchanged = Vec::new();
        write_row(&mut out, relation, row, RowPart::All, None, &mut unchanged);
        write_entity_field(&mut out, relation, row);
        out.extend_from_slice(b",\"old\":null");
        write_unchanged(&mut out, relation, &unchanged);
        Ok(self.finish(out, relation.subject(op), tx, started))
    }

    pub fn update(
        &mut self,
        tx: &mut Transaction,
        relation: &RelationInfo,
        old: Option<&(OldKind, TupleData<'_>)>,
        new: &TupleData<'_>,
    ) -> Result<EncodedEvent, ColumnCountMismatch> {
        check_columns(relation, new)?;
        if let Some((_, old)) = old {
            check_columns(relation, old)?;
        }
        // Under REPLICA IDENTITY FULL the old row carries the real value of an unchanged TOAST
        // column, so the new row can be completed exactly rather than reported as partial.
        let full_old: Option<Vec<ColumnValue<'_>>> = match old {
            Some((OldKind::Full, old)) if new.iter().any(|v| v == ColumnValue::UnchangedToast) => {
                Some(old.iter().collect())
            }
            _ => None,
        };
        let (mut out, started) = self.start(relation, Op::Update, tx);
        let mut unchanged = Vec::new();
        write_row(
            &mut out,
            relation,
            new,
            RowPart::All,
            full_old.as_deref(),
            &mut unchanged,
        );
        write_entity_field(&mut out, relation, new);
        out.extend_from_slice(b",\"old\":");
        match old {
            Some((kind, old)) => {
                let mut ignored = Vec::new();
                write_object(
                    &mut out,
                    relation,
                    old,
                    RowPart::from(*kind),
                    None,
                    &mut ignored,
                );
            }
            None => out.extend_from_slice(b"null"),
        }
        write_unchanged(&mut out, relation, &unchanged);
        Ok(self.finish(out, relation.subject(Op::Update), tx, started))
    }

    pub fn delete(
        &mut self,
        tx: &mut Transaction,
        relation: &RelationInfo,
        kind: OldKind,
        old: &TupleData<'_>,
    ) -> Result<EncodedEvent, ColumnCountMismatch> {
        check_columns(relation, old)?;
        let (mut out, started) = self.start(relation, Op::Delete, tx);
        let mut unchanged = Vec::new();
        write_row(
            &mut out,
            relation,
            old,
            RowPart::from(kind),
            None,
            &mut unchanged,
        );
        write_entity_field(&mut out, relation, old);
        out.extend_from_slice(b",\"old\":null");
        write_unchanged(&mut out, relation, &unchanged);
        Ok(self.finish(out, relation.subject(Op::Delete), tx, started))
    }

    pub fn truncate(
        &mut self,
        tx: &mut Transaction,
        relation: &RelationInfo,
        cascade: bool,
        restart_identity: bool,
    ) -> EncodedEvent {
        let (mut out, started) = self.start(relation, Op::Truncate, tx);
        out.extend_from_slice(b",\"data\":null,\"entity_id\":");
        write_uuid(&mut out, identity::NO_ENTITY);
        out.extend_from_slice(b",\"old\":null,\"unchanged_toast\":[]");
        let _ = write!(
            out,
            ",\"truncate\":{{\"cascade\":{cascade},\"restart_identity\":{restart_identity}}}"
        );
        self.finish(out, relation.subject(Op::Truncate), tx, started)
    }

    /// A `pg_logical_emit_message` message: inside its transaction when transactional, else in
    /// a [`Transaction::standalone`] of its own.
    pub fn logical_message(
        &mut self,
        tx: &mut Transaction,
        message: &LogicalMessage<'_>,
    ) -> EncodedEvent {
        let subject = self.naming.message_subject(message.prefix);
        let mut out = Vec::with_capacity(self.size_hint.max(message.content.len() + 256));
        out.extend_from_slice(
            b"{\"event\":\"MESSAGE\",\"entity\":null,\"table\":null,\"subject\":",
        );
        write_string(&mut out, subject.as_bytes());
        out.extend_from_slice(b",\"event_type\":");
        write_string(&mut out, CUSTOM_EVENT_TYPE.as_bytes());
        out.extend_from_slice(b",\"entity_type\":");
        write_string(&mut out, MESSAGE_ENTITY_TYPE.as_bytes());
        let started = self.write_tx_fields(&mut out, tx);
        out.extend_from_slice(b",\"entity_id\":");
        write_uuid(&mut out, identity::NO_ENTITY);
        out.extend_from_slice(b",\"prefix\":");
        write_string(&mut out, message.prefix.as_bytes());
        let _ = write!(out, ",\"transactional\":{}", message.transactional);
        out.extend_from_slice(b",\"content\":");
        match std::str::from_utf8(message.content) {
            Ok(text) => {
                write_string(&mut out, text.as_bytes());
                out.extend_from_slice(b",\"data\":");
                if is_json(text.as_bytes()) {
                    out.extend_from_slice(text.as_bytes());
                } else {
                    out.extend_from_slice(b"null");
                }
            }
            Err(_) => {
                write_binary(&mut out, message.content);
                out.extend_from_slice(b",\"data\":null");
            }
        }
        out.push(b'}');
        self.event(out, Subject::from(subject), tx, started)
    }

    /// Starts the envelope: the relation's head, then the transaction fields, taking the
    /// transaction's next position.
    fn start(&self, relation: &RelationInfo, op: Op, tx: &mut Transaction) -> (Vec<u8>, Started) {
        let mut out = Vec::with_capacity(self.size_hint);
        out.extend_from_slice(relation.head(op));
        let started = self.write_tx_fields(&mut out, tx);
        (out, started)
    }

    /// Writes `,"timestamp":…,"lsn":…,"xid":…,"seq":…,"id":…`, consuming the transaction's
    /// next position and naming the event's message.
    fn write_tx_fields(&self, out: &mut Vec<u8>, tx: &mut Transaction) -> Started {
        let position = tx.take_position();
        out.extend_from_slice(&tx.shared.envelope_fields);
        out.extend_from_slice(itoa::Buffer::new().format(position.seq).as_bytes());
        if tx.replay().is_some() {
            out.extend_from_slice(b",\"replay\":true");
        }
        let replay_id = tx.replay().map(|replay| replay.id);
        let message_id = self.message_id(tx, position.seq, replay_id);
        out.extend_from_slice(b",\"id\":");
        write_uuid(out, identity::event_id(&message_id));
        Started {
            position,
            message_id,
        }
    }

    fn finish(
        &mut self,
        mut out: Vec<u8>,
        subject: &Subject,
        tx: &mut Transaction,
        started: Started,
    ) -> EncodedEvent {
        out.push(b'}');
        self.event(out, subject.clone(), tx, started)
    }

    fn event(
        &mut self,
        payload: Vec<u8>,
        subject: Subject,
        tx: &mut Transaction,
        Started {
            position,
            message_id,
        }: Started,
    ) -> EncodedEvent {
        self.size_hint = self
            .size_hint
            .max(payload.len().next_power_of_two().min(1 << 20));
        EncodedEvent {
            subject,
            payload: Bytes::from(payload),
            position,
            replay: tx.replay().is_some(),
            message_id,
            commit_time_micros: tx.commit_time_micros,
            base_headers: BaseHeaders::Transaction(tx.shared.clone()),
            in_transaction: true,
            last_in_transaction: false,
        }
    }

    /// The marker that voids the events a promoted standby does not have, on
    /// `<prefix>._failover`.
    pub fn failover_marker(&self, marker: &FailoverMarker) -> EncodedEvent {
        let mut headers = HeaderLines::default();
        headers.put_number(HEADER_TIMELINE, marker.timeline);
        marker.write(&mut headers);
        let message_id =
            FailoverMarker::message_id(self.naming.slot(), marker.timeline, marker.switch);
        let payload =
            serde_json::to_vec(&marker.body(&message_id, &now_timestamp())).unwrap_or_default();
        EncodedEvent {
            subject: Subject::from(self.naming.failover_subject()),
            payload: Bytes::from(payload),
            position: FailoverMarker::position(marker.switch),
            replay: false,
            message_id,
            commit_time_micros: None,
            base_headers: BaseHeaders::Own(Arc::new(headers)),
            in_transaction: false,
            last_in_transaction: true,
        }
    }

    /// The change's `Nats-Msg-Id`, with the part the transaction's events share formatted once.
    fn message_id(&self, tx: &mut Transaction, seq: u64, replay_id: Option<u64>) -> String {
        let (xid, shared) = (tx.xid, &tx.shared);
        let prefix = tx
            .message_id_prefix
            .get_or_insert_with(|| message_id_prefix(self.naming.slot(), xid, &shared.lsn_text));
        message_id_from_prefix(prefix, seq, replay_id)
    }
}

/// `entity_type` of a `pg_logical_emit_message` message, which no table is behind.
const MESSAGE_ENTITY_TYPE: &str = "_message";

/// An event's place, taken when its envelope is started.
struct Started {
    position: Position,
    message_id: String,
}

/// Which columns of a tuple an event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowPart {
    All,
    /// A key-only image: PostgreSQL sends the other columns as NULL, which would be invented.
    KeyOnly,
}

impl From<OldKind> for RowPart {
    fn from(kind: OldKind) -> Self {
        match kind {
            OldKind::Key => RowPart::KeyOnly,
            OldKind::Full => RowPart::All,
        }
    }
}

fn check_columns(
    relation: &RelationInfo,
    tuple: &TupleData<'_>,
) -> Result<(), ColumnCountMismatch> {
    if tuple.len() == relation.columns.len() {
        Ok(())
    } else {
        Err(ColumnCountMismatch {
            table: relation.qualified.clone(),
            row: tuple.len(),
            relation: relation.columns.len(),
        })
    }
}

/// Writes `,"data":{…}`.
fn write_row(
    out: &mut Vec<u8>,
    relation: &RelationInfo,
    tuple: &TupleData<'_>,
    part: RowPart,
    fill: Option<&[ColumnValue<'_>]>,
    unchanged: &mut Vec<usize>,
) {
    out.extend_from_slice(b",\"data\":");
    write_object(out, relation, tuple, part, fill, unchanged);
}

/// Writes a row as a JSON object. An unchanged TOAST column takes its value from `fill` when
/// that has one, and is otherwise left out and recorded in `unchanged`.
fn write_object(
    out: &mut Vec<u8>,
    relation: &RelationInfo,
    tuple: &TupleData<'_>,
    part: RowPart,
    fill: Option<&[ColumnValue<'_>]>,
    unchanged: &mut Vec<usize>,
) {
    out.push(b'{');
    let mut first = true;
    for (index, (column, value)) in relation.columns.iter().zip(tuple.iter()).enumerate() {
        if part == RowPart::KeyOnly && !column.is_key {
            continue;
        }
        let value = match value {
            ColumnValue::UnchangedToast => match fill.and_then(|f| f.get(index)) {
                Some(filled) if *filled != ColumnValue::UnchangedToast => *filled,
                _ => {
                    unchanged.push(index);
                    continue;
                }
            },
            value => value,
        };
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(&column.json_key);
        match value {
            ColumnValue::Null | ColumnValue::UnchangedToast => out.extend_from_slice(b"null"),
            ColumnValue::Text(text) => write_value(out, column.kind, text),
            ColumnValue::Binary(bytes) => write_binary(out, bytes),
        }
    }
    out.push(b'}');
}

/// Writes `,"entity_id":"…"`.
fn write_entity_field(out: &mut Vec<u8>, relation: &RelationInfo, tuple: &TupleData<'_>) {
    out.extend_from_slice(b",\"entity_id\":");
    write_entity_id(out, relation, tuple);
}

/// Writes `,"unchanged_toast":[names]`.
fn write_unchanged(out: &mut Vec<u8>, relation: &RelationInfo, unchanged: &[usize]) {
    out.extend_from_slice(b",\"unchanged_toast\":[");
    for (n, index) in unchanged.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        write_string(out, relation.columns[*index].name.as_bytes());
    }
    out.push(b']');
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::*;
    use crate::config::Config;
    use crate::pipeline::pgoutput::{captured_fixtures, decode, Message};

    fn naming() -> Naming {
        let config = Config::parse(
            "[database]\nurl='postgres://localhost/db'\n[replication]\ntables=['public.t_cap','public.t_full']\n",
            Path::new("test"),
            &|_| None,
        )
        .unwrap();
        Naming::from_config(&config)
    }

    /// Runs the captured scenario through the encoder, as the pipeline does.
    fn encoded_scenario() -> Vec<serde_json::Value> {
        let fixtures = captured_fixtures();
        let naming = naming();
        let mut encoder = Encoder::new(naming.clone());
        let mut relations = HashMap::new();
        let mut types = HashMap::new();
        let mut tx = None;
        let mut out = Vec::new();
        for (_, bytes) in &fixtures {
            let event = match decode(bytes).unwrap() {
                Message::Begin(b) => {
                    tx = Some(Transaction::begin(
                        b.xid,
                        b.final_lsn,
                        b.commit_time_micros,
                        1,
                    ));
                    None
                }
                Message::Type(t) => {
                    types.insert(t.oid, t.name);
                    None
                }
                Message::Relation(r) => {
                    relations.insert(r.oid, RelationInfo::new(&r, &naming, &types));
                    None
                }
                Message::Insert(i) => Some(
                    encoder
                        .insert(tx.as_mut().unwrap(), &relations[&i.relation_oid], &i.new)
                        .unwrap(),
                ),
                Message::Update(u) => Some(
                    encoder
                        .update(
                            tx.as_mut().unwrap(),
                            &relations[&u.relation_oid],
                            u.old.as_ref(),
                            &u.new,
                        )
                        .unwrap(),
                ),
                Message::Delete(d) => Some(
                    encoder
                        .delete(
                            tx.as_mut().unwrap(),
                            &relations[&d.relation_oid],
                            d.old_kind,
                            &d.old,
                        )
                        .unwrap(),
                ),
                Message::LogicalMessage(m) => Some(match (m.transactional, tx.as_mut()) {
                    (true, Some(tx)) => encoder.logical_message(tx, &m),
                    _ => encoder.logical_message(&mut Transaction::standalone(m.lsn, 1), &m),
                }),
                Message::Truncate(t) => {
                    for oid in &t.relation_oids {
                        let event = encoder.truncate(
                            tx.as_mut().unwrap(),
                            &relations[oid],
                            t.cascade,
                            t.restart_identity,
                        );
                        out.push(serde_json::from_slice(&event.payload).unwrap());
                    }
                    None
                }
                Message::Commit(_) => {
                    tx = None;
                    None
                }
                Message::Origin(_) => None,
            };
            if let Some(event) = event {
                let headers = event.headers();
                assert_eq!(
                    headers.get(MESSAGE_ID).unwrap(),
                    format!(
                        "{}:{}:{}:{}",
                        naming.slot(),
                        headers.get(HEADER_XID).unwrap(),
                        event.position.commit_lsn,
                        event.position.seq
                    )
                );
                out.push(serde_json::from_slice(&event.payload).expect("valid JSON"));
            }
        }
        out
    }

    #[test]
    fn the_captured_insert_becomes_the_seeds_envelope() {
        let events = encoded_scenario();
        let insert = &events[0];
        let big = "x".repeat(3000);
        assert_eq!(
            insert,
            &serde_json::json!({
                "event": "INSERT", "entity": "TCap", "table": "public.t_cap",
                "subject": "fraiseql.mutation.TCap.INSERT",
                "event_type": "INSERT", "entity_type": "TCap",
                "timestamp": insert["timestamp"], "lsn": insert["lsn"], "xid": insert["xid"],
                "seq": 0, "id": insert["id"],
                "data": {"id": 1, "name": "one", "amount": "1.50", "nums": [1, null],
                         "doc": serde_json::from_str::<serde_json::Value>("{\"k\": 2.50}").expect("json"), "m": "happy", "big": big},
                "entity_id": insert["entity_id"],
                "old": null, "unchanged_toast": []
            })
        );
        assert!(insert["timestamp"].as_str().unwrap().starts_with("20"));
        let message_id = format!(
            "walstream:{}:{}:0",
            insert["xid"],
            insert["lsn"].as_str().unwrap()
        );
        assert_eq!(
            insert["id"],
            identity::event_id(&message_id).to_string(),
            "the event's id is uuid5 of its Nats-Msg-Id"
        );
    }

    #[test]
    fn replayed_events_are_marked_and_get_their_own_message_ids() {
        let mut encoder = Encoder::new(naming());
        let message = LogicalMessage {
            transactional: true,
            lsn: Lsn(0x200),
            prefix: "audit",
            content: b"{}",
        };
        let mut tx = Transaction::begin(42, Lsn(0x300), 0, 1);
        let first = encoder.logical_message(&mut tx, &message);
        let replay = Replay {
            id: 7,
            through: Position {
                commit_lsn: Lsn(0x300),
                seq: 1,
            },
        };
        let mut tx = Transaction::begin(42, Lsn(0x300), 0, 1);
        tx.set_replay(Some(replay));
        let again = encoder.logical_message(&mut tx, &message);
        let id = |event: &EncodedEvent| event.headers().get(MESSAGE_ID).unwrap().to_string();
        assert_eq!(id(&again), format!("{}:r7", id(&first)));
        assert_eq!(
            again.message_id,
            format!("walstream:42:0/300:{}:r7", again.position.seq)
        );
        assert!(again.replay && !first.replay);
        let json = |event: &EncodedEvent| -> serde_json::Value {
            serde_json::from_slice(&event.payload).unwrap()
        };
        assert_eq!(json(&again)["replay"], true);
        assert!(json(&first).get("replay").is_none());
        assert_eq!(
            ReplayHeaders::read(&again.headers().to_map()).unwrap(),
            Some(ReplayHeaders { replay, from: None })
        );
        tx.set_replay(None);
        let after = encoder.logical_message(&mut tx, &message);
        assert!(
            !after.replay
                && after
                    .headers()
                    .get(super::super::replay::HEADER_REPLAY)
                    .is_none()
        );
    }

    /// The fields FraiseQL's observer runtime requires of a message (its `EntityEvent`,
    /// fraiseql-observers 2.19), as strictly as it reads them: a message missing one, or with
    /// one it cannot parse, is dropped by FraiseQL as undecodable.
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)] // read by Deserialize: the test is that they parse
    struct FraiseqlEntityEvent {
        id: String,
        event_type: FraiseqlEventKind,
        entity_type: String,
        entity_id: String,
        data: serde_json::Value,
        timestamp: String,
    }

    #[derive(Debug, serde::Deserialize)]
    enum FraiseqlEventKind {
        #[serde(rename = "INSERT")]
        Created,
        #[serde(rename = "UPDATE")]
        Updated,
        #[serde(rename = "DELETE")]
        Deleted,
        #[serde(rename = "CUSTOM")]
        Custom,
    }

    fn assert_fraiseql_reads(payload: &[u8]) {
        let event: FraiseqlEntityEvent = serde_json::from_slice(payload).unwrap_or_else(|e| {
            panic!(
                "FraiseQL cannot decode {}: {e}",
                String::from_utf8_lossy(payload)
            )
        });
        for uuid in [&event.id, &event.entity_id] {
            assert!(uuid::Uuid::parse_str(uuid).is_ok(), "not a UUID: {uuid}");
        }
        assert!(
            time::OffsetDateTime::parse(
                &event.timestamp,
                &time::format_description::well_known::Rfc3339
            )
            .is_ok(),
            "not RFC 3339: {}",
            event.timestamp
        );
    }

    #[test]
    fn fraiseqls_observers_can_decode_every_kind_of_event() {
        let events = encoded_scenario();
        for event in &events {
            assert_fraiseql_reads(&serde_json::to_vec(event).expect("json"));
        }
        let kinds: std::collections::BTreeSet<String> = events
            .iter()
            .map(|e| e["event"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            kinds.into_iter().collect::<Vec<_>>(),
            ["DELETE", "INSERT", "MESSAGE", "TRUNCATE", "UPDATE"]
        );
        let marker = FailoverMarker {
            from_timeline: 1,
            timeline: 2,
            switch: Lsn(0x300),
            phantoms: super::super::failover::Phantoms {
                first_sequence: 1,
                last_sequence: 2,
                count: 2,
                first: Position::at(Lsn(0x300), 0),
                last: Position::at(Lsn(0x300), 1),
            },
        };
        assert_fraiseql_reads(&Encoder::new(naming()).failover_marker(&marker).payload);
    }

    #[test]
    fn captured_updates_deletes_and_messages() {
        let events = encoded_scenario();
        let toast_update = &events[1];
        assert_eq!(toast_update["data"]["name"], "uno");
        assert!(
            toast_update["data"].get("big").is_none(),
            "unchanged TOAST must not be invented"
        );
        assert_eq!(toast_update["unchanged_toast"], serde_json::json!(["big"]));

        let key_change = &events[2];
        assert_eq!(key_change["old"], serde_json::json!({"id": 1}));
        assert_eq!(key_change["data"]["id"], 2);
        // t_cap's `id` is an integer key: the entity id is derived from it, the same for each
        // change of row 1, another once its key became 2, and that one again for the delete.
        assert_eq!(toast_update["entity_id"], events[0]["entity_id"]);
        assert_ne!(key_change["entity_id"], events[0]["entity_id"]);
        assert_eq!(events[4]["entity_id"], key_change["entity_id"]);

        let full_update = &events[3];
        assert_eq!(full_update["old"]["v"], "old");
        assert_eq!(full_update["data"]["v"], "new");
        assert_eq!(
            full_update["data"]["big"].as_str().map(str::len),
            Some(3000)
        );

        assert_eq!(events[4]["event"], "DELETE");
        assert_eq!(events[4]["data"], serde_json::json!({"id": 2}));
        assert_eq!(events[5]["data"]["v"], "new");

        let in_tx = &events[7];
        assert_eq!(in_tx["event"], "MESSAGE");
        assert_eq!(in_tx["seq"], 1);
        assert_eq!(in_tx["content"], "inside");
        assert_eq!(in_tx["subject"], "fraiseql.mutation._message.audit");
        assert_eq!(in_tx["event_type"], "CUSTOM");
        assert_eq!(in_tx["entity_id"], identity::NO_ENTITY.to_string());
        let outside = &events[8];
        assert_eq!(outside["transactional"], false);
        assert!(
            outside["timestamp"].as_str().is_some(),
            "a standalone message is stamped with the time it was read"
        );

        let truncates: Vec<&serde_json::Value> =
            events.iter().filter(|e| e["event"] == "TRUNCATE").collect();
        assert_eq!(truncates.len(), 2);
        assert_eq!(truncates[1]["seq"], 1);
        assert_eq!(truncates[1]["event_type"], "CUSTOM");
        assert_eq!(
            truncates[0]["truncate"],
            serde_json::json!({"cascade": true, "restart_identity": true})
        );
    }
}
