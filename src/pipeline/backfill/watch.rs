//! The pipeline's side of a backfill: which rows of a table live changes have touched since the
//! backfill started, so a chunk row older than its live change is dropped.

use std::collections::HashMap;

use super::{precedes, Header, MessageError, Snapshot};
use crate::lsn::Lsn;
use crate::pipeline::event::RelationInfo;
use crate::pipeline::pgoutput::{ColumnValue, TupleData};

/// The backfills under way, by `schema.table`.
#[derive(Debug, Default)]
pub struct Watches {
    tables: HashMap<String, Watch>,
}

#[derive(Debug)]
struct Watch {
    backfill: u64,
    key: Vec<String>,
    /// Row key → the transactions that changed the row, with their commit LSNs.
    changed: HashMap<Vec<u8>, Vec<(u32, Lsn)>>,
    /// Commit LSN of the last backfill message seen: decoding again from here rebuilds
    /// `changed` and finds the backfill under way.
    last_message: Lsn,
    /// Positions of the key columns in the live relation, by its oid.
    live_key: Option<(u32, Option<Vec<usize>>)>,
}

/// What to do with a chunk's rows.
#[derive(Debug)]
pub struct ChunkVerdict {
    /// One flag per row: publish it, or drop it because a live change overtook it.
    pub keep: Vec<bool>,
    pub dropped: usize,
}

impl Watches {
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    pub fn len(&self) -> usize {
        self.tables.len()
    }

    /// A backfill message committed at `commit_lsn`: starts, ends or feeds a watch.
    pub fn start(&mut self, header: &Header, commit_lsn: Lsn) {
        let watch = self
            .tables
            .entry(header.table.clone())
            .or_insert_with(|| Watch {
                backfill: header.backfill,
                key: header.key.clone(),
                changed: HashMap::new(),
                last_message: commit_lsn,
                live_key: None,
            });
        if watch.backfill != header.backfill || watch.key != header.key {
            // A new backfill of the same table replaces an abandoned one; the changes seen
            // since the old one started still count.
            watch.backfill = header.backfill;
            watch.key = header.key.clone();
            watch.live_key = None;
        }
        watch.last_message = commit_lsn;
    }

    pub fn end(&mut self, header: &Header) -> bool {
        self.tables.remove(&header.table).is_some()
    }

    /// Remembers which row a live change of `relation` touched (`tuples`: its old and new
    /// key), when a backfill of that table is under way.
    pub fn observe(
        &mut self,
        relation: &RelationInfo,
        tuples: &[&TupleData<'_>],
        xid: u32,
        commit_lsn: Lsn,
    ) {
        let Some(watch) = self.tables.get_mut(&relation.qualified) else {
            return;
        };
        let indexes = watch.live_key_indexes(relation);
        let Some(indexes) = indexes else { return };
        for tuple in tuples {
            if let Some(key) = row_key(tuple, &indexes) {
                let seen = watch.changed.entry(key).or_default();
                if !seen.iter().any(|(x, _)| *x == xid) {
                    seen.push((xid, commit_lsn));
                }
            }
        }
    }

    /// Decides which rows of a chunk to publish: a row whose key a change invisible to the
    /// chunk's snapshot touched is stale, and that change's event is already published. Then
    /// forgets changes every later snapshot will see.
    pub fn chunk(
        &mut self,
        header: &Header,
        rows: &[TupleData<'_>],
        commit_lsn: Lsn,
    ) -> Result<ChunkVerdict, MessageError> {
        let snapshot = Snapshot::parse(header.snapshot.as_deref().unwrap_or_default())?;
        self.start(header, commit_lsn);
        let watch = self
            .tables
            .get_mut(&header.table)
            .expect("start inserted the watch");
        let indexes: Option<Vec<usize>> = header
            .key
            .iter()
            .map(|name| header.columns.iter().position(|c| &c.name == name))
            .collect();
        let keep: Vec<bool> = rows
            .iter()
            .map(|row| {
                let key = indexes.as_ref().and_then(|i| row_key(row, i));
                let overtaken = key
                    .and_then(|key| watch.changed.get(&key))
                    .is_some_and(|changes| changes.iter().any(|(xid, _)| !snapshot.sees(*xid)));
                !overtaken
            })
            .collect();
        watch.changed.retain(|_, changes| {
            changes.retain(|(xid, _)| !precedes(*xid, snapshot.xmin()));
            !changes.is_empty()
        });
        let dropped = keep.iter().filter(|k| !**k).count();
        Ok(ChunkVerdict { keep, dropped })
    }

    /// The earliest LSN decoding must start from after a restart to know what the watches
    /// know; `None` when no backfill is under way.
    pub fn hold(&self) -> Option<Lsn> {
        self.tables
            .values()
            .flat_map(|watch| {
                let changes = watch.changed.values().flatten().map(|(_, lsn)| *lsn);
                changes.chain(std::iter::once(watch.last_message))
            })
            .min()
    }
}

impl Watch {
    fn live_key_indexes(&mut self, relation: &RelationInfo) -> Option<Vec<usize>> {
        match &self.live_key {
            Some((oid, indexes)) if *oid == relation.oid => indexes.clone(),
            _ => {
                let indexes: Option<Vec<usize>> = self
                    .key
                    .iter()
                    .map(|name| relation.columns.iter().position(|c| &c.name == name))
                    .collect();
                if indexes.is_none() {
                    tracing::warn!(
                        table = %relation.qualified,
                        key = ?self.key,
                        "a backfilled table's key columns are not in its relation; its live \
                         changes cannot be matched to backfilled rows"
                    );
                }
                self.live_key = Some((relation.oid, indexes.clone()));
                indexes
            }
        }
    }
}

/// The row's key columns, length-prefixed so `("a", "bc")` and `("ab", "c")` differ; `None`
/// when a key column is not in the tuple as text (a DELETE's old tuple has only the key).
fn row_key(tuple: &TupleData<'_>, indexes: &[usize]) -> Option<Vec<u8>> {
    let mut key = Vec::with_capacity(16 * indexes.len());
    for &index in indexes {
        match tuple.get(index)? {
            ColumnValue::Text(bytes) | ColumnValue::Binary(bytes) => {
                key.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
                key.extend_from_slice(bytes);
            }
            ColumnValue::Null => key.extend_from_slice(&u32::MAX.to_be_bytes()),
            ColumnValue::UnchangedToast => return None,
        }
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::super::{ColumnHeader, Kind};
    use super::*;
    use crate::pipeline::event::Naming;
    use crate::pipeline::pgoutput::encode_tuple;

    fn header(kind: Kind, snapshot: &str, rows: usize) -> Header {
        Header {
            backfill: 1,
            kind,
            table: "public.t".into(),
            key: vec!["id".into()],
            oid: 7,
            columns: ["id", "v"]
                .iter()
                .map(|name| ColumnHeader {
                    name: (*name).into(),
                    type_oid: 23,
                    type_name: None,
                    key: *name == "id",
                })
                .collect(),
            rows,
            snapshot: Some(snapshot.into()),
        }
    }

    fn tuples(rows: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (id, v) in rows {
            encode_tuple(
                &mut out,
                [Some(id.as_bytes()), Some(v.as_bytes())].into_iter(),
            )
            .unwrap();
        }
        out
    }

    fn relation() -> RelationInfo {
        let config = crate::config::Config::parse(
            "[database]\nurl = \"postgres://u@h/d\"\n[replication]\ntables = [\"public.t\"]\n",
            std::path::Path::new("."),
            &|_| None,
        )
        .unwrap();
        RelationInfo::new(
            &header(Kind::Chunk, "1:1:", 0).relation(),
            &Naming::from_config(&config),
            &HashMap::new(),
        )
    }

    #[test]
    fn a_row_changed_by_a_transaction_the_chunk_did_not_see_is_dropped() {
        let mut watches = Watches::default();
        watches.start(&header(Kind::Start, "", 0), Lsn(10));
        let relation = relation();
        let live = tuples(&[("2", "new")]);
        let live = TupleData::decode_many(&live, 1).unwrap();
        // xid 105 was running when the chunk's snapshot was taken; xid 90 was not.
        watches.observe(&relation, &[&live[0]], 105, Lsn(20));
        let seen = tuples(&[("1", "new")]);
        let seen = TupleData::decode_many(&seen, 1).unwrap();
        watches.observe(&relation, &[&seen[0]], 90, Lsn(15));
        assert_eq!(watches.hold(), Some(Lsn(10)));

        let chunk = header(Kind::Chunk, "100:110:105", 3);
        let rows = tuples(&[("1", "new"), ("2", "old"), ("3", "x")]);
        let rows = TupleData::decode_many(&rows, 3).unwrap();
        let verdict = watches.chunk(&chunk, &rows, Lsn(30)).unwrap();
        assert_eq!(verdict.keep, vec![true, false, true]);
        assert_eq!(verdict.dropped, 1);
        // xid 90 precedes the snapshot's xmin and is forgotten; 105 may still matter.
        assert_eq!(watches.hold(), Some(Lsn(20)));
        assert!(watches.end(&chunk));
        assert_eq!(watches.hold(), None);
    }

    #[test]
    fn changes_of_tables_not_being_backfilled_are_not_kept() {
        let mut watches = Watches::default();
        let live = tuples(&[("2", "new")]);
        let live = TupleData::decode_many(&live, 1).unwrap();
        watches.observe(&relation(), &[&live[0]], 105, Lsn(20));
        assert!(watches.is_empty());
        assert_eq!(watches.hold(), None);
    }
}
