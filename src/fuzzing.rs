//! Entry points of the fuzz targets in `fuzz/`, also run on generated input by unit tests so
//! that CI exercises them without a fuzzer.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use crate::config::Config;
use crate::lsn::Lsn;
use crate::pipeline::event::value::{write_value, ScalarKind, ValueKind};
use crate::pipeline::event::{Encoder, Naming, RelationInfo, Transaction};
use crate::pipeline::pgoutput::{
    self, Message, Relation, RelationColumn, ReplicaIdentity, TupleData,
};

const KINDS: [ValueKind; 10] = [
    ValueKind::Scalar(ScalarKind::Integer),
    ValueKind::Scalar(ScalarKind::Float),
    ValueKind::Scalar(ScalarKind::Bool),
    ValueKind::Scalar(ScalarKind::Json),
    ValueKind::Scalar(ScalarKind::Text),
    ValueKind::Array(ScalarKind::Integer),
    ValueKind::Array(ScalarKind::Float),
    ValueKind::Array(ScalarKind::Bool),
    ValueKind::Array(ScalarKind::Json),
    ValueKind::Array(ScalarKind::Text),
];

/// Type OIDs whose kinds are `KINDS`, in the same order.
const KIND_OIDS: [u32; 10] = [23, 701, 16, 3802, 25, 1007, 1022, 1000, 3807, 1009];

fn naming() -> &'static Naming {
    static NAMING: OnceLock<Naming> = OnceLock::new();
    NAMING.get_or_init(|| {
        let config = Config::parse(
            "[database]\nurl='postgres://localhost/db'\n[replication]\ntables=['public.fuzz']\n",
            Path::new("fuzz"),
            &|_| None,
        )
        .unwrap_or_else(|e| unreachable!("static fuzz config: {e}"));
        Naming::from_config(&config)
    })
}

/// Decodes `data`; a row change is then encoded against a relation of matching width, and the
/// event must be valid JSON.
pub fn decode_and_encode(data: &[u8]) {
    let Ok(message) = pgoutput::decode(data) else {
        return;
    };
    let mut encoder = Encoder::new(naming().clone());
    let mut tx = Transaction::begin(1, Lsn(1), 0, 1);
    let event = match message {
        Message::Insert(insert) => encoder.insert(&mut tx, &relation_for(&insert.new), &insert.new),
        Message::Update(update) => encoder.update(
            &mut tx,
            &relation_for(&update.new),
            update.old.as_ref(),
            &update.new,
        ),
        Message::Delete(delete) => encoder.delete(
            &mut tx,
            &relation_for(&delete.old),
            delete.old_kind,
            &delete.old,
        ),
        Message::LogicalMessage(message) => {
            Ok(encoder.logical_message(&mut Transaction::standalone(message.lsn, 1), &message))
        }
        _ => return,
    };
    if let Ok(event) = event {
        assert_valid_json(&event.payload, "event");
    }
}

fn relation_for(tuple: &TupleData<'_>) -> RelationInfo {
    let relation = Relation {
        oid: 1,
        namespace: "public".into(),
        name: "fuzz".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: (0..tuple.len())
            .map(|i| RelationColumn {
                is_key: i % 2 == 0,
                name: format!("c\"{i}"),
                type_oid: KIND_OIDS[i % KIND_OIDS.len()],
                type_modifier: -1,
            })
            .collect(),
    };
    RelationInfo::new(&relation, naming(), &HashMap::new())
}

/// Writes `data[1..]` as a value of the kind chosen by `data[0]`; the result must be valid JSON.
pub fn encode_value_checked(data: &[u8]) {
    let Some((&selector, text)) = data.split_first() else {
        return;
    };
    let kind = KINDS[usize::from(selector) % KINDS.len()];
    let mut out = Vec::new();
    write_value(&mut out, kind, text);
    assert_valid_json(&out, "value");
}

/// Read as a strict consumer reads it: into values, so UTF-8 and escapes are checked too.
fn assert_valid_json(bytes: &[u8], what: &str) {
    if let Err(error) = serde_json::from_slice::<serde_json::Value>(bytes) {
        panic!(
            "{what} is not valid JSON ({error}): {}",
            String::from_utf8_lossy(bytes)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: deterministic, so a failure reproduces.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn bytes(&mut self, alphabet: &[u8], max_len: usize) -> Vec<u8> {
            let len = (self.next() as usize) % max_len;
            (0..len)
                .map(|_| alphabet[(self.next() as usize) % alphabet.len()])
                .collect()
        }
    }

    #[test]
    fn values_stay_valid_json_on_generated_input() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let alphabet = b"{}[]\",\\NULLnul 0123456789.-+eE:tf\x01\xff\xc3\xa9abc";
        for _ in 0..200_000 {
            encode_value_checked(&rng.bytes(alphabet, 40));
        }
    }

    #[test]
    fn the_decoder_never_panics_on_mutated_messages() {
        let fixtures: Vec<Vec<u8>> = crate::pipeline::pgoutput::captured_fixtures()
            .into_iter()
            .map(|(_, bytes)| bytes)
            .collect();
        assert!(!fixtures.is_empty());
        let mut rng = Rng(42);
        for round in 0..100_000 {
            let mut bytes = fixtures[round % fixtures.len()].clone();
            for _ in 0..(rng.next() % 4 + 1) {
                if bytes.is_empty() {
                    break;
                }
                let at = (rng.next() as usize) % bytes.len();
                match rng.next() % 3 {
                    0 => bytes[at] = rng.next() as u8,
                    1 => bytes.truncate(at),
                    _ => bytes.insert(at, rng.next() as u8),
                }
            }
            decode_and_encode(&bytes);
        }
    }
}
