//! Decoder micro-benchmark: a pgoutput Insert captured from PostgreSQL 15 (bigint, numeric,
//! text, timestamptz, uuid, jsonb, text[]), decoded and encoded into its NATS message, on one
//! core, then with the headers of its message. Run: `cargo bench --bench decode`.

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use walstream::config::Config;
use walstream::lsn::Lsn;
use walstream::pipeline::event::{Encoder, Naming, RelationInfo, Transaction};
use walstream::pipeline::pgoutput::{decode, parse_captured, Message};

fn bench_row() -> (RelationInfo, Vec<u8>, Naming) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/pipeline/pgoutput/testdata/pg15.txt"
    );
    let text = std::fs::read_to_string(path).expect("captured fixtures");
    let config = Config::parse(
        "[database]\nurl='postgres://localhost/db'\n[replication]\ntables=['public.t_bench']\n",
        Path::new("bench"),
        &|_| None,
    )
    .expect("config");
    let naming = Naming::from_config(&config);
    let mut relation = None;
    let mut insert = None;
    for (_, bytes) in parse_captured(&text) {
        match decode(&bytes).expect("captured message") {
            Message::Relation(r) if r.name == "t_bench" => {
                relation = Some(RelationInfo::new(&r, &naming, &HashMap::new()))
            }
            Message::Insert(_) if relation.is_some() => insert = Some(bytes.clone()),
            _ => {}
        }
    }
    (
        relation.expect("t_bench relation"),
        insert.expect("t_bench insert"),
        naming,
    )
}

fn decode_and_encode(c: &mut Criterion) {
    let (relation, insert, naming) = bench_row();
    let mut encoder = Encoder::new(naming);
    let mut tx = Transaction::begin(771, Lsn(0x16B_3748), 817_027_201_123_456, 1);
    let sample = match decode(&insert).expect("insert") {
        Message::Insert(i) => encoder.insert(&mut tx, &relation, &i.new).expect("encode"),
        _ => unreachable!("an insert"),
    };
    eprintln!(
        "pgoutput message {} bytes → event {} bytes: {}",
        insert.len(),
        sample.payload.len(),
        String::from_utf8_lossy(&sample.payload)
    );
    let mut group = c.benchmark_group("pgoutput");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode", |b| {
        b.iter(|| black_box(decode(black_box(&insert)).is_ok()))
    });
    group.bench_function("decode+encode", |b| {
        b.iter(|| match decode(black_box(&insert)) {
            Ok(Message::Insert(i)) => black_box(encoder.insert(&mut tx, &relation, &i.new).is_ok()),
            _ => false,
        })
    });
    // What walstream adds to each change before its publisher sends it: the envelope and the
    // header block, alone in a transaction and among many.
    let mut headers = walstream::nats::wire::HeaderBlock::new();
    group.bench_function("encode+headers, single-row transaction", |b| {
        b.iter(|| match decode(black_box(&insert)) {
            Ok(Message::Insert(i)) => {
                let mut tx = Transaction::begin(772, Lsn(0x16B_3750), 817_027_201_123_456, 1);
                let mut event = encoder.insert(&mut tx, &relation, &i.new).expect("encode");
                event.last_in_transaction = true;
                headers.clear();
                event.write_headers(&mut headers);
                black_box(headers.wire_len())
            }
            _ => 0,
        })
    });
    group.bench_function("encode+headers, large transaction", |b| {
        b.iter(|| match decode(black_box(&insert)) {
            Ok(Message::Insert(i)) => {
                let event = encoder.insert(&mut tx, &relation, &i.new).expect("encode");
                headers.clear();
                event.write_headers(&mut headers);
                black_box(headers.wire_len())
            }
            _ => 0,
        })
    });
    group.finish();
}

criterion_group!(benches, decode_and_encode);
criterion_main!(benches);
