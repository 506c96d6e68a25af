//! Captures pgoutput messages from a real PostgreSQL into `src/pipeline/pgoutput/testdata/`, the bytes
//! the decoder's unit tests run on. Run by hand when the fixtures need renewing:
//! `cargo test --release --test capture -- --ignored`.

mod harness;

use std::fmt::Write as _;

use harness::*;

const SETUP: &str = "
    CREATE TYPE mood AS ENUM ('happy', 'sad');
    CREATE TABLE t_cap (id INT PRIMARY KEY, name TEXT, amount NUMERIC(10,2),
                        nums INT[], doc JSONB, m mood, big TEXT);
    ALTER TABLE t_cap ALTER COLUMN big SET STORAGE EXTERNAL;
    CREATE TABLE t_full (id INT PRIMARY KEY, v TEXT, big TEXT);
    ALTER TABLE t_full ALTER COLUMN big SET STORAGE EXTERNAL;
    ALTER TABLE t_full REPLICA IDENTITY FULL;
    INSERT INTO t_full VALUES (1, 'old', repeat('z', 3000));
    CREATE TABLE t_bench (id BIGINT PRIMARY KEY, amount NUMERIC(12,2), name TEXT,
                          created TIMESTAMPTZ, uid UUID, doc JSONB, tags TEXT[]);
    CREATE PUBLICATION cap FOR TABLE t_cap, t_full, t_bench;
    SELECT pg_create_logical_replication_slot('cap', 'pgoutput');
";

const SCENARIO: &str = "
    SET TIME ZONE 'UTC';
    INSERT INTO t_cap VALUES (1, 'one', 1.50, '{1,NULL}', '{\"k\": 2.50}', 'happy', repeat('x', 3000));
    UPDATE t_cap SET name = 'uno' WHERE id = 1;
    UPDATE t_cap SET id = 2 WHERE id = 1;
    UPDATE t_full SET v = 'new' WHERE id = 1;
    DELETE FROM t_cap WHERE id = 2;
    DELETE FROM t_full WHERE id = 1;
    BEGIN;
    INSERT INTO t_full VALUES (2, 'in tx', repeat('y', 3000));
    SELECT pg_logical_emit_message(true, 'audit', 'inside');
    COMMIT;
    SELECT pg_logical_emit_message(false, 'heartbeat', 'outside');
    TRUNCATE t_cap, t_full RESTART IDENTITY CASCADE;
    INSERT INTO t_bench VALUES (9000000001, 1234.56, 'Widget order for a returning customer',
        '2026-11-22 08:00:01.123456+00', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
        '{\"sku\": \"W-1\", \"qty\": 3, \"price\": 24.50, \"gift\": false}', '{urgent,\"new customer\"}');
";

#[tokio::test(flavor = "multi_thread")]
#[ignore = "writes fixtures into the source tree; run by hand"]
async fn capture_pgoutput_fixtures() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let client = cluster.client().await?;
    // One statement per call, as psql runs a file: each is its own transaction unless an
    // explicit BEGIN … COMMIT (on this same connection) groups them.
    for statement in SETUP.split(";\n").chain(SCENARIO.split(";\n")) {
        let statement = statement.trim();
        if !statement.is_empty() {
            client.batch_execute(statement).await?;
        }
    }
    let rows = client
        .query(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes('cap', NULL, NULL,
                'proto_version', '1', 'publication_names', 'cap', 'messages', 'true')",
            &[],
        )
        .await?;
    let mut out = String::from(
        "# pgoutput v1 messages captured from PostgreSQL 15 by integration/capture.rs.\n\
         # One message a line: its tag, then its bytes in hex.\n",
    );
    for row in rows {
        let data: Vec<u8> = row.get(1);
        let mut hex = String::with_capacity(data.len() * 2);
        for byte in &data {
            let _ = write!(hex, "{byte:02x}");
        }
        let _ = writeln!(out, "{} {hex}", data[0] as char);
    }
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/pipeline/pgoutput/testdata/pg15.txt"
    );
    std::fs::create_dir_all(std::path::Path::new(path).parent().expect("parent"))?;
    std::fs::write(path, out)?;
    Ok(())
}
