//! Change events: naming (entity, subject, message id) and the JSON envelope published to NATS.
//!
//! Everything that depends only on a relation (entity name, subjects, the envelope's head, the
//! JSON keys of its columns) is computed once when the relation is seen, so the per-row path only
//! copies bytes.

mod encode;
pub mod failover;
pub mod identity;
pub mod replay;
pub mod value;

pub use encode::{
    format_pg_timestamp, pg_micros_now, ColumnCountMismatch, EncodedEvent, Encoder, Transaction,
    HEADER_COMMIT_TIME, HEADER_LSN, HEADER_SEQ, HEADER_TIMELINE, HEADER_TX_LAST, HEADER_XID,
    PG_EPOCH_UNIX_MICROS,
};

use std::collections::HashMap;

use async_nats::Subject;

use crate::config::Config;
use crate::lsn::Lsn;
use crate::op::Op;
use crate::pipeline::pgoutput::{Relation, ReplicaIdentity};
use value::ValueKind;

/// Where an event stands in the WAL: stream order is the order of positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The transaction's commit LSN (a non-transactional message's own LSN).
    pub commit_lsn: Lsn,
    /// The change's index inside its transaction, from 0.
    pub seq: u64,
}

impl Position {
    pub const fn at(commit_lsn: Lsn, seq: u64) -> Self {
        Self { commit_lsn, seq }
    }
}

/// Turns tables into entity names and subjects, as configured.
#[derive(Debug, Clone)]
pub struct Naming {
    slot: String,
    subject_prefix: String,
    watched: Vec<String>,
    routes: HashMap<(String, Op), String>,
    entities: HashMap<String, String>,
}

impl Naming {
    pub fn from_config(config: &Config) -> Self {
        let resolve = |table: &str| {
            config
                .resolve_table(table)
                .unwrap_or_else(|_| table.to_owned())
        };
        let routes = config
            .routes
            .iter()
            .filter_map(|route| {
                let op = route.event.parse::<Op>().ok()?;
                Some(((resolve(&route.table), op), route.subject.clone()))
            })
            .collect();
        let entities = config
            .entities
            .iter()
            .map(|(table, entity)| (resolve(table), entity.clone()))
            .collect();
        Self {
            slot: config.replication.slot.clone(),
            subject_prefix: config.nats.subject_prefix.clone(),
            watched: config.replication.tables.clone(),
            routes,
            entities,
        }
    }

    pub fn slot(&self) -> &str {
        &self.slot
    }

    pub fn is_watched(&self, qualified_table: &str) -> bool {
        self.watched.iter().any(|t| t == qualified_table)
    }

    pub fn entity(&self, schema: &str, table: &str) -> String {
        self.entities
            .get(&format!("{schema}.{table}"))
            .cloned()
            .unwrap_or_else(|| entity_name(table))
    }

    pub fn subject(&self, qualified_table: &str, entity: &str, op: Op) -> String {
        match self.routes.get(&(qualified_table.to_owned(), op)) {
            Some(route) => route.clone(),
            None => format!("{}.{entity}.{op}", self.subject_prefix),
        }
    }

    /// Subject of the marker a failover leaves when the stream holds events the promoted
    /// standby does not have.
    pub fn failover_subject(&self) -> String {
        format!("{}._failover", self.subject_prefix)
    }

    /// Subject of a `pg_logical_emit_message` message with this prefix.
    pub fn message_subject(&self, prefix: &str) -> String {
        format!("{}._message.{}", self.subject_prefix, subject_token(prefix))
    }

    /// Subjects the stream must cover: the prefix and every route.
    pub fn stream_subjects(&self) -> Vec<String> {
        let wildcard = format!("{}.>", self.subject_prefix);
        let under_prefix = format!("{}.", self.subject_prefix);
        let mut subjects = vec![wildcard];
        for route in self.routes.values() {
            if !route.starts_with(&under_prefix) && !subjects.contains(route) {
                subjects.push(route.clone());
            }
        }
        subjects.sort();
        subjects
    }
}

/// `{slot}:{xid}:{commit lsn}:`, the start of every `Nats-Msg-Id` of a transaction's changes
/// (see [`message_id_from_prefix`]), the LSN given as PostgreSQL prints it.
pub fn message_id_prefix(slot: &str, xid: u32, commit_lsn: &str) -> String {
    let mut prefix = String::with_capacity(slot.len() + commit_lsn.len() + 12);
    prefix.push_str(slot);
    prefix.push(':');
    prefix.push_str(itoa::Buffer::new().format(xid));
    prefix.push(':');
    prefix.push_str(commit_lsn);
    prefix.push(':');
    prefix
}

/// A change's deterministic `Nats-Msg-Id` from its transaction's
/// [`Naming::message_id_prefix`]: the prefix, its place in the transaction, and a replay's own
/// suffix, so JetStream's dedup window does not swallow the second delivery.
pub fn message_id_from_prefix(prefix: &str, seq: u64, replay: Option<u64>) -> String {
    let mut number = itoa::Buffer::new();
    let mut id = String::with_capacity(prefix.len() + 24);
    id.push_str(prefix);
    id.push_str(number.format(seq));
    if let Some(replay) = replay {
        id.push_str(":r");
        id.push_str(number.format(replay));
    }
    id
}

/// `tb_order_item` → `OrderItem`: drop the `tb_` prefix, then PascalCase.
pub fn entity_name(table: &str) -> String {
    let base = table.strip_prefix("tb_").unwrap_or(table);
    let mut entity = String::with_capacity(base.len());
    for word in base.split('_').filter(|w| !w.is_empty()) {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            entity.extend(first.to_uppercase());
            entity.push_str(chars.as_str());
        }
    }
    if entity.is_empty() {
        subject_token(table)
    } else {
        subject_token(&entity)
    }
}

/// Makes text safe as subject tokens: whitespace and wildcards become `_`, and empty tokens
/// (from leading, trailing or doubled dots) are filled with `_`.
pub fn subject_token(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .map(|c| {
            if c.is_whitespace() || c == '*' || c == '>' || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect();
    let tokens: Vec<&str> = cleaned
        .split('.')
        .map(|t| if t.is_empty() { "_" } else { t })
        .collect();
    tokens.join(".")
}

/// A relation as the event encoder needs it, with its per-relation bytes precomputed.
#[derive(Debug, Clone)]
pub struct RelationInfo {
    pub oid: u32,
    pub schema: String,
    pub table: String,
    pub qualified: String,
    pub entity: String,
    pub replica_identity: ReplicaIdentity,
    pub watched: bool,
    pub columns: Vec<ColumnInfo>,
    /// The `uuid` column named `id`, whose value is the events' `entity_id`.
    pub entity_id_column: Option<usize>,
    /// Per op: `{"event":"…","entity":"…","table":"…","subject":"…","event_type":"…",
    /// "entity_type":"…"`.
    heads: [Vec<u8>; 5],
    subjects: [Subject; 5],
}

#[derive(Debug, Clone)]
pub struct ColumnInfo {
    pub name: String,
    /// `"name":`, escaped once.
    pub json_key: Vec<u8>,
    pub kind: ValueKind,
    pub is_key: bool,
}

impl RelationInfo {
    /// Builds the relation's metadata. `type_names` holds names from pgoutput Type messages.
    pub fn new(relation: &Relation, naming: &Naming, type_names: &HashMap<u32, String>) -> Self {
        let schema = if relation.namespace.is_empty() {
            "pg_catalog".to_owned()
        } else {
            relation.namespace.clone()
        };
        let qualified = format!("{schema}.{}", relation.name);
        let entity = naming.entity(&schema, &relation.name);
        let columns = relation
            .columns
            .iter()
            .map(|column| {
                let mut json_key = Vec::with_capacity(column.name.len() + 3);
                value::write_string(&mut json_key, column.name.as_bytes());
                json_key.push(b':');
                ColumnInfo {
                    name: column.name.clone(),
                    json_key,
                    kind: ValueKind::for_type(
                        column.type_oid,
                        type_names.get(&column.type_oid).map(String::as_str),
                    ),
                    is_key: column.is_key,
                }
            })
            .collect();
        let entity_id_column = relation
            .columns
            .iter()
            .position(|c| c.name == "id" && c.type_oid == identity::UUID_TYPE_OID);
        let subject_for = |op| naming.subject(&qualified, &entity, op);
        let head_for = |op: Op| {
            let mut head = Vec::new();
            head.extend_from_slice(b"{\"event\":");
            value::write_string(&mut head, op.as_str().as_bytes());
            head.extend_from_slice(b",\"entity\":");
            value::write_string(&mut head, entity.as_bytes());
            head.extend_from_slice(b",\"table\":");
            value::write_string(&mut head, qualified.as_bytes());
            head.extend_from_slice(b",\"subject\":");
            value::write_string(&mut head, subject_for(op).as_bytes());
            head.extend_from_slice(b",\"event_type\":");
            value::write_string(&mut head, op.event_type().as_bytes());
            head.extend_from_slice(b",\"entity_type\":");
            value::write_string(&mut head, entity.as_bytes());
            head
        };
        Self {
            oid: relation.oid,
            watched: naming.is_watched(&qualified),
            heads: Op::ALL.map(head_for),
            subjects: Op::ALL.map(|op| Subject::from(subject_for(op))),
            schema,
            table: relation.name.clone(),
            qualified,
            entity,
            replica_identity: relation.replica_identity,
            columns,
            entity_id_column,
        }
    }

    pub fn subject(&self, op: Op) -> &Subject {
        &self.subjects[op.index()]
    }

    fn head(&self, op: Op) -> &[u8] {
        &self.heads[op.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::lsn_text;

    #[test]
    fn message_ids_read_slot_xid_commit_lsn_and_place() {
        let prefix = message_id_prefix("walstream", 771, &lsn_text(Lsn(0x16B3748)));
        assert_eq!(prefix, "walstream:771:0/16B3748:");
        assert_eq!(
            message_id_from_prefix(&prefix, 0, None),
            "walstream:771:0/16B3748:0"
        );
        let prefix = message_id_prefix("s", u32::MAX, &lsn_text(Lsn(0x1A_0000_0000)));
        assert_eq!(
            message_id_from_prefix(&prefix, 12, Some(3)),
            "s:4294967295:1A/0:12:r3"
        );
    }

    #[test]
    fn entity_names_follow_the_seeds() {
        assert_eq!(entity_name("tb_order"), "Order");
        assert_eq!(entity_name("tb_order_item"), "OrderItem");
        assert_eq!(entity_name("orders"), "Orders");
        assert_eq!(entity_name("tb_"), "tb_");
        assert_eq!(entity_name("my table"), "My_table");
    }

    #[test]
    fn subject_tokens_are_made_safe() {
        assert_eq!(subject_token("audit.v1"), "audit.v1");
        assert_eq!(subject_token("a b>*"), "a_b__");
        assert_eq!(subject_token(".x..y."), "_.x._.y._");
    }
}
