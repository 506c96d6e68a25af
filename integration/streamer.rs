//! The streamer against a real PostgreSQL and NATS: what reaches the stream, and in what shape.

mod harness;

use harness::orders::*;
use harness::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn row_changes_reach_the_stream_in_commit_order() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.sql(ORDERS).await?;
    let config = cluster.config(
        &["public.tb_order", "public.tb_order_item"],
        "[[routes]]\ntable = \"tb_order\"\nevent = \"INSERT\"\nsubject = \"events.order.created\"\n",
    )?;
    setup(&config)?;
    // Committed while walstream is not running: the slot keeps them. One call, one transaction
    // (a multi-statement call would be one implicit transaction).
    for statement in [
        "INSERT INTO tb_order (identifier, total) VALUES ('o-1', 10.50), ('o-2', 2.50)",
        "UPDATE tb_order SET status = 'paid' WHERE identifier = 'o-1'",
        "DELETE FROM tb_order WHERE identifier = 'o-2'",
        "BEGIN;
         INSERT INTO tb_order (identifier, total) VALUES ('o-3', 99.99);
         INSERT INTO tb_order_item VALUES (1, 3, 2), (2, 3, 5);
         SELECT pg_logical_emit_message(true, 'audit', '{\"who\": \"alice\"}');
         COMMIT;",
        "TRUNCATE tb_order_item",
    ] {
        cluster.sql(statement).await?;
    }
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    let js = cluster.jetstream().await?;
    let result = async {
        wait_for_messages(&js, 9, Duration::from_secs(30)).await?;
        read_stream(&js).await
    }
    .await;
    let messages = result.inspect_err(|_| dump_log(&cluster.log_path()))?;
    assert_eq!(messages.len(), 9, "{messages:#?}");
    assert_exactly_once_in_order(&messages);
    // Where each transaction ends: the two-row INSERT, the UPDATE, the DELETE, the
    // order-items-message transaction, the TRUNCATE.
    let last: Vec<bool> = messages
        .iter()
        .map(|m| {
            m.headers
                .get(walstream::pipeline::event::HEADER_TX_LAST)
                .is_some_and(|v| v.as_str() == "true")
        })
        .collect();
    assert_eq!(
        last,
        [false, true, true, true, false, false, false, true, true],
        "Walstream-Tx-Last"
    );

    let orders = events(&messages, "public.tb_order");
    let ops: Vec<&str> = orders
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["INSERT", "INSERT", "UPDATE", "DELETE", "INSERT"]);
    let first = orders[0];
    assert_eq!(first["entity"], "Order");
    assert_eq!(first["subject"], "events.order.created");
    assert_eq!(first["data"]["identifier"], "o-1");
    assert_eq!(
        first["data"]["total"], "10.50",
        "numeric stays an exact string"
    );
    assert_eq!(first["data"]["pk_order"], 1);
    assert_eq!(first["old"], Value::Null);
    assert_eq!(first["unchanged_toast"], json!([]));
    assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
    // Both rows of the first INSERT statement share a transaction: same xid and LSN, seq 0 and 1.
    assert_eq!(orders[0]["xid"], orders[1]["xid"]);
    assert_eq!(orders[0]["lsn"], orders[1]["lsn"]);
    assert_eq!(
        (orders[0]["seq"].as_u64(), orders[1]["seq"].as_u64()),
        (Some(0), Some(1))
    );

    let update = orders[2];
    assert_eq!(update["subject"], "fraiseql.mutation.Order.UPDATE");
    assert_eq!(update["data"]["status"], "paid");
    let delete = orders[3];
    assert_eq!(delete["subject"], "fraiseql.mutation.Order.DELETE");
    assert_eq!(
        delete["data"],
        json!({"pk_order": 2}),
        "a key-only image reports only the key"
    );

    // The multi-table transaction: order, two items, then the message, in one transaction.
    let tx_lsn = &orders[4]["lsn"];
    let in_tx: Vec<&Value> = messages
        .iter()
        .map(|m| &m.body)
        .filter(|b| &b["lsn"] == tx_lsn)
        .collect();
    assert_eq!(in_tx.len(), 4);
    assert_eq!(in_tx[1]["entity"], "OrderItem");
    assert_eq!(
        in_tx[2]["data"],
        json!({"pk_order_item": 2, "fk_order": 3, "quantity": 5})
    );
    assert_eq!(in_tx[3]["event"], "MESSAGE");
    assert_eq!(in_tx[3]["subject"], "fraiseql.mutation._message.audit");
    assert_eq!(in_tx[3]["data"], json!({"who": "alice"}));

    let truncate = messages.last().unwrap();
    assert_eq!(truncate.subject, "fraiseql.mutation.OrderItem.TRUNCATE");
    assert_eq!(truncate.body["data"], Value::Null);

    let first_id = &messages[0].message_id;
    let parts: Vec<&str> = first_id.split(':').collect();
    assert_eq!(parts[0], "walstream");
    assert_eq!(parts[1], first["xid"].to_string());
    assert_eq!(parts[2], first["lsn"].as_str().unwrap());
    assert_eq!(parts[3], "0");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn values_become_typed_json() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster
        .sql(
            "CREATE TYPE mood AS ENUM ('happy', 'sad');
             CREATE TABLE t_types (
                id INT PRIMARY KEY, i2 SMALLINT, i8 BIGINT, f4 REAL, f8 DOUBLE PRECISION,
                fnan DOUBLE PRECISION, finf DOUBLE PRECISION, n NUMERIC, b BOOLEAN, t TEXT,
                vc VARCHAR(10), c CHAR(3), u UUID, j JSON, jb JSONB, ba BYTEA, d DATE,
                tm TIME, ts TIMESTAMP, tstz TIMESTAMPTZ, iv INTERVAL, ia INT[], ta TEXT[],
                na NUMERIC[], nested INT[][], ja JSONB[], m mood, ma mood[], ip INET
             );",
        )
        .await?;
    let config = cluster.config(&["public.t_types"], "")?;
    setup(&config)?;
    cluster
        .sql(
            "SET TIME ZONE 'Asia/Tehran';
             INSERT INTO t_types VALUES (
                1, -32768, 9223372036854775807, 1.5, 1e308, 'NaN', '-Infinity',
                12345678901234567890.123456789, true, 'a \"quoted\" line\nbreak', 'vc', 'ab',
                'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"k\": [1, 2.50, null]}',
                '{\"k\": [1, 2.50, null]}', '\\xdeadbeef', '2024-02-29', '13:45:00',
                '2024-02-29 11:04:56.789', '2024-02-29 11:04:56.789+03:30', '1 day 2 hours 3 minutes 4 seconds',
                '{1,2,NULL}', '{\"a,b\",\"c\\\"d\",NULL,\"NULL\"}', '{1.10,NULL}', '{{1,2},{3,4}}',
                ARRAY['{\"x\": 1.0}'::jsonb], 'happy', '{happy,sad}', '10.0.0.1/8'
             );",
        )
        .await?;
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 1, Duration::from_secs(30))
        .await
        .inspect_err(|_| dump_log(&cluster.log_path()))?;
    let messages = read_stream(&js).await?;
    let data = &messages[0].body["data"];
    let expected = json!({
        "id": 1, "i2": -32768, "i8": 9223372036854775807_i64, "f4": 1.5, "f8": 1e308,
        "fnan": "NaN", "finf": "-Infinity", "n": "12345678901234567890.123456789", "b": true,
        "t": "a \"quoted\" line\nbreak", "vc": "vc", "c": "ab ",
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "j": {"k": [1, 2.5, null]}, "jb": {"k": [1, 2.5, null]}, "ba": "\\xdeadbeef",
        "d": "2024-02-29", "tm": "13:45:00", "ts": "2024-02-29 11:04:56.789",
        "tstz": "2024-02-29 07:34:56.789+00", "iv": "P1DT2H3M4S", "ia": [1, 2, null],
        "ta": ["a,b", "c\"d", null, "NULL"], "na": ["1.10", null], "nested": [[1, 2], [3, 4]],
        "ja": [{"x": 1.0}], "m": "happy", "ma": ["happy", "sad"], "ip": "10.0.0.1/8"
    });
    // serde_json keeps each number's text (arbitrary_precision); compare values here, and the
    // exact text below.
    assert_eq!(numbers_as_values(data), numbers_as_values(&expected));
    // Numbers inside JSON keep their exact text: 2.50 stays 2.50, 1.0 stays 1.0.
    let js_payload = read_raw_payload(&js, messages[0].sequence).await?;
    assert!(
        js_payload.contains(r#""jb":{"k": [1, 2.50, null]}"#),
        "{js_payload}"
    );
    assert!(js_payload.contains(r#""ja":[{"x": 1.0}]"#), "{js_payload}");
    Ok(())
}

async fn read_raw_payload(
    js: &async_nats::jetstream::Context,
    sequence: u64,
) -> anyhow::Result<String> {
    let stream = js.get_stream(STREAM).await?;
    let message = stream.get_raw_message(sequence).await?;
    Ok(String::from_utf8(message.payload.to_vec())?)
}

#[tokio::test(flavor = "multi_thread")]
async fn unchanged_toast_columns_are_never_invented() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster
        .sql(
            "CREATE TABLE t_doc (id INT PRIMARY KEY, title TEXT, body TEXT);
             ALTER TABLE t_doc ALTER COLUMN body SET STORAGE EXTERNAL;
             CREATE TABLE t_full (id INT PRIMARY KEY, title TEXT, body TEXT);
             ALTER TABLE t_full ALTER COLUMN body SET STORAGE EXTERNAL;
             ALTER TABLE t_full REPLICA IDENTITY FULL;",
        )
        .await?;
    let config = cluster.config(&["public.t_doc", "public.t_full"], "")?;
    setup(&config)?;
    cluster
        .sql(
            "INSERT INTO t_doc VALUES (1, 'a', repeat('x', 100000));
             UPDATE t_doc SET title = 'b' WHERE id = 1;
             INSERT INTO t_full VALUES (1, 'a', repeat('y', 100000));
             UPDATE t_full SET title = 'b' WHERE id = 1;",
        )
        .await?;
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 4, Duration::from_secs(30))
        .await
        .inspect_err(|_| dump_log(&cluster.log_path()))?;
    let messages = read_stream(&js).await?;
    let update = &messages[1].body;
    assert_eq!(update["data"], json!({"id": 1, "title": "b"}));
    assert_eq!(update["unchanged_toast"], json!(["body"]));
    // Under REPLICA IDENTITY FULL the old row has the value, so the new row is complete.
    let full = &messages[3].body;
    assert_eq!(full["data"]["body"].as_str().map(str::len), Some(100000));
    assert_eq!(full["unchanged_toast"], json!([]));
    assert_eq!(full["old"]["title"], "a");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn alter_table_mid_stream_is_followed() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster
        .sql("CREATE TABLE t_evolve (id INT PRIMARY KEY, a TEXT);")
        .await?;
    let config = cluster.config(&["public.t_evolve"], "")?;
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    cluster
        .sql(
            "INSERT INTO t_evolve VALUES (1, 'one');
             ALTER TABLE t_evolve ADD COLUMN b INT DEFAULT 7;
             INSERT INTO t_evolve VALUES (2, 'two', 8);
             ALTER TABLE t_evolve DROP COLUMN a;
             INSERT INTO t_evolve VALUES (3, 9);",
        )
        .await?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 3, Duration::from_secs(30))
        .await
        .inspect_err(|_| dump_log(&cluster.log_path()))?;
    let messages = read_stream(&js).await?;
    let rows: Vec<&Value> = messages.iter().map(|m| &m.body["data"]).collect();
    assert_eq!(
        rows,
        [
            &json!({"id": 1, "a": "one"}),
            &json!({"id": 2, "a": "two", "b": 8}),
            &json!({"id": 3, "b": 9})
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_gets_every_configured_setting() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.sql(ORDERS).await?;
    let config = cluster.config(
        &["public.tb_order"],
        "[nats.jetstream]\ndedup_window_minutes = 3\nmax_age_days = 2\nmax_msgs = 5000\n\
         max_bytes = 50000000\n\n[[routes]]\ntable = \"tb_order\"\nevent = \"INSERT\"\n\
         subject = \"events.order.created\"\n",
    )?;
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    let js = cluster.jetstream().await?;
    let mut stream = js.get_stream(STREAM).await?;
    let settings = stream.info().await?.config.clone();
    assert_eq!(settings.duplicate_window, Duration::from_secs(180));
    assert_eq!(settings.max_age, Duration::from_secs(2 * 86_400));
    assert_eq!(settings.max_messages, 5000);
    assert_eq!(settings.max_bytes, 50_000_000);
    assert_eq!(
        settings.subjects,
        ["events.order.created", "fraiseql.mutation.>"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_cannot_be_updated_stops_walstream_clearly() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.sql(ORDERS).await?;
    let js = cluster.jetstream().await?;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["fraiseql.mutation.>".into()],
        storage: async_nats::jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await?;
    let config = cluster.config(&["public.tb_order"], "")?;
    let output = Command::new(walstream_binary())
        .args(["stream", "--config"])
        .arg(&config)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("exists with Memory storage but nats.jetstream.storage asks for File"),
        "{stderr}"
    );
    Ok(())
}

/// `value` with every number rewritten from its value, so `2.50` and `2.5` compare equal.
fn numbers_as_values(value: &Value) -> Value {
    match value {
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => json!(i),
            (None, Some(u), _) => json!(u),
            (None, None, Some(f)) => json!(f),
            _ => value.clone(),
        },
        Value::Array(items) => Value::Array(items.iter().map(numbers_as_values).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), numbers_as_values(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_with_the_most_columns_postgresql_allows_streams_whole() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    // 1,600 columns is PostgreSQL's limit; 1,599 integers and the key.
    cluster
        .sql(
            "DO $$ BEGIN EXECUTE 'CREATE TABLE t_wide (id INT PRIMARY KEY, ' ||
                 (SELECT string_agg(format('c%s INT', g), ', ') FROM generate_series(1, 1599) g)
                 || ')'; END $$;",
        )
        .await?;
    let config = cluster.config(&["public.t_wide"], "")?;
    setup(&config)?;
    cluster
        .sql(
            "DO $$ BEGIN EXECUTE 'INSERT INTO t_wide VALUES (1, ' ||
                 (SELECT string_agg(g::text, ', ') FROM generate_series(1, 1599) g) || ')'; END $$;
             UPDATE t_wide SET c1599 = -1 WHERE id = 1;",
        )
        .await?;
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 2, Duration::from_secs(30))
        .await
        .inspect_err(|_| dump_log(&cluster.log_path()))?;
    let messages = read_stream(&js).await?;
    let inserted = messages[0].body["data"]
        .as_object()
        .ok_or_else(|| anyhow::anyhow!("no data: {}", messages[0].body))?;
    assert_eq!(inserted.len(), 1600);
    assert_eq!(inserted["c1"], 1);
    assert_eq!(inserted["c1599"], 1599);
    assert_eq!(messages[1].body["data"]["c1599"], -1);
    assert_eq!(messages[1].body["data"]["c1598"], 1598);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn tables_added_to_and_dropped_from_the_publication_while_streaming() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster
        .sql(
            "CREATE TABLE tb_order (id INT PRIMARY KEY, note TEXT);
             CREATE TABLE tb_refund (id INT PRIMARY KEY, note TEXT);",
        )
        .await?;
    let config = cluster.config(&["public.tb_order"], "")?;
    let mut walstream = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    cluster
        .sql("INSERT INTO tb_order VALUES (1, 'before')")
        .await?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 1, Duration::from_secs(30)).await?;
    let client = cluster.client().await?;

    // A DBA adds a table by hand: `replication.tables` decides what is published, so its
    // changes are passed over while the watched table's go on.
    cluster
        .sql("ALTER PUBLICATION walstream ADD TABLE tb_refund")
        .await?;
    cluster
        .sql("INSERT INTO tb_refund VALUES (2, 'added'); INSERT INTO tb_order VALUES (2, 'after')")
        .await?;
    wait_for_messages(&js, 2, Duration::from_secs(30))
        .await
        .inspect_err(|_| dump_log(&cluster.log_path()))?;

    // And drops the watched table: PostgreSQL stops sending its changes, walstream carries
    // on (and confirms past them).
    cluster
        .sql("ALTER PUBLICATION walstream DROP TABLE tb_order")
        .await?;
    cluster
        .sql("INSERT INTO tb_order VALUES (3, 'while out of the publication')")
        .await?;
    let written: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    eventually(
        Duration::from_secs(30),
        "the slot to pass the write",
        || async {
            client
                .query_one(
                    "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots
                 WHERE slot_name = 'walstream'",
                    &[&written],
                )
                .await
                .is_ok_and(|row| row.get::<_, bool>(0))
        },
    )
    .await?;
    assert!(walstream.try_wait().is_none(), "walstream stopped");

    // At its next start walstream adds the watched table back (create_publication) and
    // streams it again; the change made while it was out is not in its stream.
    walstream.terminate(Duration::from_secs(30))?;
    let _restarted = Walstream::start(&config, &cluster.dir.path().join("restart.log"))?;
    eventually(
        Duration::from_secs(30),
        "tb_order back in the publication",
        || async {
            client
                .query_one(
                    "SELECT count(*) FROM pg_publication_tables
                 WHERE pubname = 'walstream' AND tablename = 'tb_order'",
                    &[],
                )
                .await
                .is_ok_and(|row| row.get::<_, i64>(0) == 1)
        },
    )
    .await?;
    cluster
        .sql("INSERT INTO tb_order VALUES (4, 'back')")
        .await?;
    wait_for_messages(&js, 3, Duration::from_secs(30)).await?;
    let messages = read_stream(&js).await?;
    let seen: Vec<(&str, &str)> = messages
        .iter()
        .map(|m| {
            (
                m.subject.as_str(),
                m.body["data"]["note"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("fraiseql.mutation.Order.INSERT", "before"),
            ("fraiseql.mutation.Order.INSERT", "after"),
            ("fraiseql.mutation.Order.INSERT", "back"),
        ]
    );
    assert_exactly_once_in_order(&messages);
    Ok(())
}

// PostgreSQL 18 publishes stored generated columns when the publication says so
// (`publish_generated_columns = stored`); they then arrive like any column.
#[tokio::test(flavor = "multi_thread")]
async fn stored_generated_columns_arrive_when_the_publication_publishes_them() -> anyhow::Result<()>
{
    let cluster = Cluster::start().await?;
    if cluster.postgres_version().await? < 180000 {
        eprintln!("not run: publish_generated_columns is PostgreSQL 18's (scripts/test-matrix runs it there)");
        return Ok(());
    }
    cluster
        .sql(
            "CREATE TABLE t_gen (id INT PRIMARY KEY, price NUMERIC NOT NULL, qty INT NOT NULL,
                 total NUMERIC GENERATED ALWAYS AS (price * qty) STORED);
             CREATE PUBLICATION walstream FOR TABLE t_gen
                 WITH (publish_generated_columns = stored)",
        )
        .await?;
    let config = cluster.config(&["public.t_gen"], "")?;
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    cluster
        .sql("INSERT INTO t_gen (id, price, qty) VALUES (1, 2.50, 4)")
        .await?;
    cluster.sql("UPDATE t_gen SET qty = 5 WHERE id = 1").await?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 2, Duration::from_secs(30)).await?;
    let messages = read_stream(&js).await?;
    // numeric arrives as its exact text, as for any numeric column.
    let totals: Vec<&Value> = messages.iter().map(|m| &m.body["data"]["total"]).collect();
    assert_eq!(totals, [&json!("10.00"), &json!("12.50")]);
    Ok(())
}

/// The publish mode follows the server and `nats.fast_ingest`: fast-ingest batches on
/// nats-server 2.14+ (walstream turning on the stream's `allow_batched`), every message
/// acknowledged on its own when told so or on older servers; the same events either way.
#[tokio::test(flavor = "multi_thread")]
async fn fast_ingest_where_the_server_has_it_unless_turned_off() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster.sql(ORDERS).await?;
    let js = cluster.jetstream().await?;
    let version = js.client().server_info().version;
    let fast = walstream::nats::fast_ingest_batches(&version);
    let config = cluster.config(&["public.tb_order"], "")?;
    setup(&config)?;
    let text = std::fs::read_to_string(&config)?;
    let mut stored: u64 = 0;
    for (fast_ingest, mode) in [
        (true, if fast { "fast ingest" } else { "chained" }),
        (false, "chained"),
    ] {
        std::fs::write(
            &config,
            text.replace(
                "ack_timeout_secs = 2\n",
                &format!("ack_timeout_secs = 2\nfast_ingest = {fast_ingest}\n"),
            ),
        )?;
        let check = walstream(&["check"], &config)?;
        let said = String::from_utf8_lossy(&check.stdout).to_string()
            + &String::from_utf8_lossy(&check.stderr);
        assert!(said.contains(&format!("publishing: {mode} (")), "{said}");
        let log = cluster
            .log_path()
            .with_extension(format!("{fast_ingest}.log"));
        let mut walstream = Walstream::start(&config, &log)?;
        // A burst (one 40-row transaction) and lone single-row transactions.
        cluster
            .sql("INSERT INTO tb_order (identifier, total) SELECT 'b-' || g, g FROM generate_series(1, 40) g")
            .await?;
        for n in 0..5 {
            cluster
                .sql(&format!(
                    "INSERT INTO tb_order (identifier, total) VALUES ('s-{fast_ingest}-{n}', 1)"
                ))
                .await?;
        }
        stored += 45;
        wait_for_messages(&js, stored, Duration::from_secs(30))
            .await
            .inspect_err(|_| dump_log(&log))?;
        walstream.terminate(Duration::from_secs(30))?;
        let said = std::fs::read_to_string(&log)?;
        assert!(said.contains(&format!("publishing=\"{mode}\"")), "{said}");
    }
    let messages = read_stream(&js).await?;
    assert_eq!(messages.len() as u64, stored);
    assert_exactly_once_in_order(&messages);
    let allowed = js
        .get_stream("fraiseql_events")
        .await?
        .info()
        .await?
        .config
        .allow_batch_publish;
    assert_eq!(allowed, fast, "allow_batched on nats-server {version}");
    Ok(())
}
