//! What a DBA says in the publication (PostgreSQL 15+): `[[replication.table]]` column lists and
//! row filters reach `CREATE PUBLICATION`; a column left out never appears in an event or a
//! backfill; a row outside the filter produces no event; an UPDATE that moves a row across the
//! filter arrives as PostgreSQL documents it (an INSERT or a DELETE); `check` and the streamer
//! refuse a live publication that publishes more than the config says.

mod harness;

use std::time::Duration;

use harness::*;
use serde_json::Value;

// The row filter's column must be in the replica identity, and the column list must hold it:
// an identity on (id, country), without `email`.
const CUSTOMERS: &str = "CREATE TABLE tb_customer (id INT PRIMARY KEY, name TEXT NOT NULL,
        email TEXT NOT NULL, country TEXT NOT NULL);
    CREATE UNIQUE INDEX tb_customer_identity ON tb_customer (id, country);
    ALTER TABLE tb_customer REPLICA IDENTITY USING INDEX tb_customer_identity;";

const FILTER: &str = "[[replication.table]]
name = \"public.tb_customer\"
columns = [\"id\", \"name\", \"country\"]
where = \"country <> 'internal'\"
";

fn summary(message: &Stored) -> (String, Value, Value) {
    let row = if message.body["data"].is_null() {
        message.body["old"].clone()
    } else {
        message.body["data"].clone()
    };
    (
        message.body["event"].as_str().unwrap_or("").to_owned(),
        row["id"].clone(),
        row["country"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn column_lists_and_row_filters_keep_columns_and_rows_out_of_the_stream() -> anyhow::Result<()>
{
    let cluster = Cluster::start().await?;
    if cluster.postgres_version().await? < 150000 {
        eprintln!("not run: publication column lists and row filters are PostgreSQL 15's");
        return Ok(());
    }
    cluster.sql(CUSTOMERS).await?;
    let config = cluster.config(&["public.tb_customer"], FILTER)?;
    let mut streamer = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    cluster
        .sql(
            "INSERT INTO tb_customer VALUES (1, 'Ann', 'ann@example.com', 'fr'),
                                            (2, 'Bob', 'bob@example.com', 'internal');
             UPDATE tb_customer SET name = 'Anne' WHERE id = 1;
             UPDATE tb_customer SET country = 'de' WHERE id = 2;
             UPDATE tb_customer SET country = 'internal' WHERE id = 1;",
        )
        .await?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 4, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let messages = read_stream(&js).await?;
    let seen: Vec<(String, Value, Value)> = messages.iter().map(summary).collect();
    let expected = [
        ("INSERT", 1, "fr"),
        ("UPDATE", 1, "fr"),
        // Into the filter: an INSERT; out of it: a DELETE (PostgreSQL's row filter rules).
        ("INSERT", 2, "de"),
        ("DELETE", 1, "fr"),
    ];
    let expected: Vec<(String, Value, Value)> = expected
        .iter()
        .map(|(op, id, country)| (op.to_string(), Value::from(*id), Value::from(*country)))
        .collect();
    assert_eq!(seen, expected);
    for message in &messages {
        let text = message.body.to_string();
        assert!(
            !text.contains("email") && !text.contains("@example.com"),
            "a column left out was published: {text}"
        );
    }

    // A backfill emits what the publication publishes: the rows inside the filter, without
    // the column left out.
    let backfill = walstream(&["backfill", "--table", "public.tb_customer"], &config)?;
    assert!(
        backfill.status.success(),
        "{}",
        String::from_utf8_lossy(&backfill.stderr)
    );
    wait_for_messages(&js, 5, Duration::from_secs(30)).await?;
    let messages = read_stream(&js).await?;
    let backfilled: Vec<&Stored> = messages
        .iter()
        .filter(|m| m.body["event"] == "BACKFILL")
        .collect();
    assert_eq!(backfilled.len(), 1, "only Bob is inside the filter now");
    assert_eq!(backfilled[0].body["data"]["id"], 2);
    assert!(backfilled[0].body["data"].get("email").is_none());

    streamer.terminate(Duration::from_secs(30))?;
    let check = walstream(&["check"], &config)?;
    let said = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(check.status.success(), "{said}");
    assert!(said.contains("publishes the columns and rows"), "{said}");

    // A publication changed by hand to publish more: check names it, and walstream refuses to
    // stream rather than publish a column the config leaves out.
    cluster
        .sql("ALTER PUBLICATION walstream SET TABLE public.tb_customer")
        .await?;
    let check = walstream(&["check"], &config)?;
    let said = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(!check.status.success(), "{said}");
    assert!(
        said.contains("publishes columns [id, name, email, country]")
            && said.contains("ALTER PUBLICATION"),
        "{said}"
    );
    let restart_log = cluster.dir.path().join("restart.log");
    let mut restarted = Walstream::start(&config, &restart_log)?;
    let status = restarted
        .wait_exit(Duration::from_secs(30))
        .await
        .map_err(|e| anyhow::anyhow!("{e}: it streamed a publication wider than its config"))?;
    assert!(!status.success());
    let log = std::fs::read_to_string(&restart_log)?;
    assert!(log.contains("where [[replication.table]] says"), "{log}");
    Ok(())
}
