//! Table backfill, the pipeline's side: `walstream backfill` (`commands::backfill`) reads a
//! table in primary-key chunks and writes each chunk into the WAL as a logical message; the
//! pipeline turns the chunk's rows into `BACKFILL` events in WAL order, dropping any row a live
//! change has overtaken.
//!
//! Why no row is ever delivered stale after its live change: each chunk is read and emitted in
//! one REPEATABLE READ transaction, and its message carries that transaction's snapshot. A live
//! change the snapshot does not see commits after the snapshot was taken: if its commit comes
//! after the chunk's in the WAL, its event follows the backfilled row; if before, the pipeline
//! has seen it (it watches the table's changes from the backfill's start, and the command waits
//! for the transactions running at the start to finish) and drops the row. What the snapshot
//! sees, the row already contains. The idea is DBLog's watermarks; the snapshot makes the window
//! exact without a watermark table.

mod watch;

pub use watch::Watches;

use serde::{Deserialize, Serialize};

use crate::pipeline::pgoutput::{Relation, RelationColumn, ReplicaIdentity, TupleData};

/// The logical-message prefix of backfill messages; the pipeline does not publish them as
/// `MESSAGE` events.
pub const PREFIX: &str = "walstream.backfill";

/// What a backfill message says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The pipeline starts watching the table's changes.
    Start,
    /// Rows follow the header.
    Chunk,
    /// The backfill finished or was cancelled.
    End,
}

/// The JSON head of a backfill message; a chunk's rows follow it after a newline, in
/// pgoutput's TupleData format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub backfill: u64,
    pub kind: Kind,
    /// `schema.table`.
    pub table: String,
    /// Primary-key columns, in key order.
    pub key: Vec<String>,
    #[serde(default)]
    pub oid: u32,
    #[serde(default)]
    pub columns: Vec<ColumnHeader>,
    #[serde(default)]
    pub rows: usize,
    /// The chunk transaction's snapshot, as `pg_current_snapshot()` prints it.
    #[serde(default)]
    pub snapshot: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnHeader {
    pub name: String,
    pub type_oid: u32,
    /// The type's name for non-builtin types, as pgoutput's Type message gives it.
    #[serde(default)]
    pub type_name: Option<String>,
    pub key: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("backfill message has no header line")]
    NoHeader,
    #[error("backfill message header: {0}")]
    Header(#[from] serde_json::Error),
    #[error("backfill chunk rows: {0}")]
    Rows(#[from] crate::pipeline::pgoutput::DecodeError),
    #[error("backfill chunk snapshot `{0}` is not xmin:xmax:xip")]
    Snapshot(String),
}

impl Header {
    /// The message content: the header, a newline, then `tuples` (already encoded).
    pub fn encode(&self, tuples: &[u8]) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).unwrap_or_default();
        out.push(b'\n');
        out.extend_from_slice(tuples);
        out
    }

    /// Splits a message into its header and its chunk's rows.
    pub fn decode(content: &[u8]) -> Result<(Self, Vec<TupleData<'_>>), MessageError> {
        let split = content
            .iter()
            .position(|b| *b == b'\n')
            .ok_or(MessageError::NoHeader)?;
        let header: Header = serde_json::from_slice(&content[..split])?;
        let rows = TupleData::decode_many(&content[split + 1..], header.rows)?;
        Ok((header, rows))
    }

    /// The relation a chunk's rows are shaped by, as pgoutput would describe it.
    pub fn relation(&self) -> Relation {
        let (namespace, name) = self
            .table
            .split_once('.')
            .unwrap_or(("public", &self.table));
        Relation {
            oid: self.oid,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            replica_identity: ReplicaIdentity::Default,
            columns: self
                .columns
                .iter()
                .map(|column| RelationColumn {
                    is_key: column.key,
                    name: column.name.clone(),
                    type_oid: column.type_oid,
                    type_modifier: -1,
                })
                .collect(),
        }
    }
}

/// A transaction snapshot, reduced to 32-bit xids as pgoutput reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    xmin: u32,
    xmax: u32,
    running: Vec<u32>,
}

impl Snapshot {
    /// Parses `pg_current_snapshot()`'s text: `xmin:xmax:xip,xip,…` (64-bit xids).
    pub fn parse(text: &str) -> Result<Self, MessageError> {
        let invalid = || MessageError::Snapshot(text.to_owned());
        let mut parts = text.split(':');
        let xid = |part: Option<&str>| -> Result<u32, MessageError> {
            let full: u64 = part.ok_or_else(invalid)?.parse().map_err(|_| invalid())?;
            Ok(full as u32)
        };
        let xmin = xid(parts.next())?;
        let xmax = xid(parts.next())?;
        let running = match parts.next() {
            Some("") | None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|x| xid(Some(x)))
                .collect::<Result<_, _>>()?,
        };
        Ok(Self {
            xmin,
            xmax,
            running,
        })
    }

    /// Whether a committed transaction's effects are in the snapshot.
    pub fn sees(&self, xid: u32) -> bool {
        precedes(xid, self.xmin) || (precedes(xid, self.xmax) && !self.running.contains(&xid))
    }

    /// Every transaction before this is seen by this snapshot and by any later one.
    pub fn xmin(&self) -> u32 {
        self.xmin
    }
}

/// PostgreSQL's `TransactionIdPrecedes` for normal xids: comparison modulo 2^32.
pub fn precedes(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_decide_visibility_like_postgres() {
        let snapshot = Snapshot::parse("100:110:102,105").unwrap();
        assert!(snapshot.sees(99) && snapshot.sees(101) && snapshot.sees(109));
        assert!(!snapshot.sees(102) && !snapshot.sees(105));
        assert!(!snapshot.sees(110) && !snapshot.sees(200));
        assert!(Snapshot::parse("5:5:").unwrap().sees(4));
        // 64-bit xids from pg_current_snapshot, across a wraparound of the 32-bit counter.
        let wrapped = Snapshot::parse("8589934590:8589934600:").unwrap();
        assert!(wrapped.sees(u32::MAX - 5) && !wrapped.sees(9));
        assert!(Snapshot::parse("1:x:").is_err());
    }

    #[test]
    fn messages_round_trip() {
        let header = Header {
            backfill: 9,
            kind: Kind::Chunk,
            table: "public.t".into(),
            key: vec!["id".into()],
            oid: 1234,
            columns: vec![ColumnHeader {
                name: "id".into(),
                type_oid: 23,
                type_name: None,
                key: true,
            }],
            rows: 2,
            snapshot: Some("1:2:".into()),
        };
        let mut tuples = Vec::new();
        for value in [Some(&b"1"[..]), None] {
            crate::pipeline::pgoutput::encode_tuple(&mut tuples, [value].into_iter()).unwrap();
        }
        let content = header.encode(&tuples);
        let (decoded, rows) = Header::decode(&content).unwrap();
        assert_eq!(decoded, header);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0].get(0),
            Some(crate::pipeline::pgoutput::ColumnValue::Text(b"1"))
        );
        assert_eq!(
            rows[1].get(0),
            Some(crate::pipeline::pgoutput::ColumnValue::Null)
        );
        assert!(Header::decode(b"{}").is_err());
        let mut short = content.clone();
        short.pop();
        assert!(Header::decode(&short).is_err());
    }
}
