//! The UUIDs an event carries for consumers that key on them (FraiseQL's observers): the
//! event's own, derived from its `Nats-Msg-Id`, and its entity's, read from or derived from the row.
//!
//! Both are name-based (RFC 9562 version 5) under one fixed namespace, so anyone can recompute
//! them: `uuid5(NAMESPACE, Nats-Msg-Id)` for `id`, and so a re-delivery of the same change
//! carries the same `id` (a receiver's dedup key) while a replay, which has its own message id,
//! carries a new one.

use sha1::{Digest, Sha1};
use uuid::Uuid;

use super::value::write_string;
use super::RelationInfo;
use crate::pipeline::pgoutput::{ColumnValue, TupleData};

/// walstream's namespace for name-based UUIDs.
pub const NAMESPACE: Uuid = Uuid::from_u128(0xee73_90b2_c50d_42dd_9034_48cd_b751_e1ec);

/// The `entity_id` of an event no single row is behind (TRUNCATE, MESSAGE, FAILOVER), and of a
/// row with neither a uuid `id` nor a key.
pub const NO_ENTITY: Uuid = Uuid::nil();

/// PostgreSQL's `uuid` type.
pub const UUID_TYPE_OID: u32 = 2950;

/// Separates the parts of a derived entity name; cannot occur in PostgreSQL text output.
const SEPARATOR: u8 = 0;

/// `uuid5(NAMESPACE, name)`, the name given in parts.
fn name_based_from<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Uuid {
    let mut hasher = Sha1::new();
    hasher.update(NAMESPACE.as_bytes());
    for part in parts {
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

/// `uuid5(NAMESPACE, name)`.
pub fn name_based(name: &[u8]) -> Uuid {
    name_based_from([name])
}

/// The event's `id`: `uuid5(NAMESPACE, its Nats-Msg-Id)`.
pub fn event_id(message_id: &str) -> Uuid {
    name_based(message_id.as_bytes())
}

/// Writes a UUID as a JSON string.
pub fn write_uuid(out: &mut Vec<u8>, uuid: Uuid) {
    const LENGTH: usize = uuid::fmt::Hyphenated::LENGTH;
    let mut quoted = [b'"'; LENGTH + 2];
    uuid.hyphenated().encode_lower(&mut quoted[1..=LENGTH]);
    out.extend_from_slice(&quoted);
}

/// Writes the entity's UUID: the row's `uuid` column named `id` when the tuple has its value;
/// otherwise one derived from the table and the replica identity key's values, which is the same
/// for every change of the row as long as its key stays; the nil UUID for a row with neither.
pub fn write_entity_id(out: &mut Vec<u8>, relation: &RelationInfo, tuple: &TupleData<'_>) {
    if let Some(index) = relation.entity_id_column {
        if let Some(ColumnValue::Text(text)) = tuple.get(index) {
            if Uuid::try_parse_ascii(text).is_ok() {
                write_string(out, text);
                return;
            }
        }
    }
    write_uuid(out, derived_entity_id(relation, tuple).unwrap_or(NO_ENTITY));
}

/// `uuid5(NAMESPACE, table ␀ key value ␀ …)` over the replica identity's key columns, or none
/// when the relation has no key (REPLICA IDENTITY NOTHING).
fn derived_entity_id(relation: &RelationInfo, tuple: &TupleData<'_>) -> Option<Uuid> {
    if !relation.columns.iter().any(|column| column.is_key) {
        return None;
    }
    let keys = relation
        .columns
        .iter()
        .zip(tuple.iter())
        .filter(|(column, _)| column.is_key)
        .flat_map(|(_, value)| {
            let text: &[u8] = match value {
                ColumnValue::Text(text) | ColumnValue::Binary(text) => text,
                ColumnValue::Null | ColumnValue::UnchangedToast => &[],
            };
            [&[SEPARATOR][..], text]
        });
    Some(name_based_from(
        std::iter::once(relation.qualified.as_bytes()).chain(keys),
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::*;
    use crate::config::Config;
    use crate::pipeline::event::Naming;
    use crate::pipeline::pgoutput::{encode_tuple, Relation, RelationColumn, ReplicaIdentity};

    /// `tb_order (pk_order bigint key, id uuid, total numeric)`, as pgoutput describes it.
    fn order_relation(id_type: u32) -> RelationInfo {
        let config = Config::parse(
            "[database]\nurl='postgres://localhost/db'\n[replication]\ntables=['public.tb_order']\n",
            Path::new("test"),
            &|_| None,
        )
        .expect("config");
        let column = |name: &str, type_oid, is_key| RelationColumn {
            is_key,
            name: name.to_owned(),
            type_oid,
            type_modifier: -1,
        };
        let relation = Relation {
            oid: 1,
            namespace: "public".into(),
            name: "tb_order".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                column("pk_order", 20, true),
                column("id", id_type, false),
                column("total", 1700, false),
            ],
        };
        RelationInfo::new(&relation, &Naming::from_config(&config), &HashMap::new())
    }

    fn entity_id(relation: &RelationInfo, values: &[Option<&str>]) -> String {
        let mut bytes = Vec::new();
        encode_tuple(&mut bytes, values.iter().map(|v| v.map(str::as_bytes))).expect("tuple");
        let tuple = TupleData::decode_many(&bytes, 1).expect("decodes")[0];
        let mut out = Vec::new();
        write_entity_id(&mut out, relation, &tuple);
        serde_json::from_slice(&out).expect("a JSON string")
    }

    const ORDER_ID: &str = "6f1c2f7e-1b7a-4a51-9b8e-2d0c1e9f3a10";

    #[test]
    fn the_uuid_id_column_is_the_entity_id() {
        let orders = order_relation(UUID_TYPE_OID);
        assert_eq!(
            entity_id(&orders, &[Some("7"), Some(ORDER_ID), Some("9.50")]),
            ORDER_ID
        );
    }

    #[test]
    fn without_the_uuid_the_key_names_the_entity_the_same_way_every_time() {
        let orders = order_relation(UUID_TYPE_OID);
        // A DELETE under REPLICA IDENTITY DEFAULT: only the key was sent.
        let deleted = entity_id(&orders, &[Some("7"), None, None]);
        assert_ne!(deleted, ORDER_ID);
        assert_eq!(deleted, entity_id(&orders, &[Some("7"), None, None]));
        assert_ne!(deleted, entity_id(&orders, &[Some("8"), None, None]));
        // An `id` that is not a uuid column is the table's business, not an entity id: every
        // change of row 7 gets the key's id.
        let text_ids = order_relation(25);
        let inserted = entity_id(&text_ids, &[Some("7"), Some(ORDER_ID), Some("9.50")]);
        assert_eq!(inserted, entity_id(&text_ids, &[Some("7"), None, None]));
        assert_eq!(
            inserted,
            name_based(b"public.tb_order\x007").to_string(),
            "uuid5(namespace, table NUL key values)"
        );
    }

    #[test]
    fn event_ids_are_rfc_9562_version_5_under_the_namespace() {
        // Python's `uuid.uuid5(uuid.UUID("ee7390b2-c50d-42dd-9034-48cdb751e1ec"),
        // "walstream:42:0/300:0")` gives the same value.
        let id = event_id("walstream:42:0/300:0");
        assert_eq!(id.get_version_num(), 5);
        assert_eq!(id.to_string(), "4f1b62c9-0b06-5dc5-bac9-2292a40caf42");
        assert_eq!(id, event_id("walstream:42:0/300:0"));
        assert_ne!(id, event_id("walstream:42:0/300:0:r1"));
        let mut out = Vec::new();
        write_uuid(&mut out, id);
        assert_eq!(out, format!("\"{id}\"").into_bytes());
    }
}
