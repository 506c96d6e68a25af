//! Configuration mistakes, `setup --print-sql`, `check`, and the least-privilege role.

mod harness;

use harness::output::*;
use harness::*;
use std::process::Output;
use std::time::Duration;

#[test]
fn config_mistakes_are_named_and_never_panic() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("walstream.toml");
    let base =
        "[database]\nurl = 'postgres://u@127.0.0.1:1/db'\n[replication]\ntables = ['public.t']\n";
    let cases = [
        ("", "missing field `database`"),
        ("[database\n", "not valid TOML"),
        (
            &format!("{base}[nats]\nstream_nam = 'x'\n") as &str,
            "stream_nam",
        ),
        (&format!("{base}[replication2]\n"), "replication2"),
        (&base.replace("public.t", "t"), "public.t"),
        (
            &format!("{base}[nats.jetstream]\nmax_age_days = 'week'\n"),
            "nats.jetstream.max_age_days",
        ),
        (
            &format!("{base}[[routes]]\ntable='t'\nevent='UPSERT'\nsubject='a'\n"),
            "UPSERT",
        ),
        (
            &base.replace("postgres://u@", "postgres://u:${WALSTREAM_TEST_UNSET}@"),
            "WALSTREAM_TEST_UNSET",
        ),
    ];
    for (config, expected) in cases {
        std::fs::write(&path, config)?;
        let output = walstream(&["check"], &path)?;
        let all = text(&output);
        assert!(!output.status.success(), "{config:?} was accepted");
        assert!(
            all.contains(expected),
            "{config:?}: expected {expected:?} in {all}"
        );
        assert!(!all.contains("panicked"), "{config:?}: {all}");
    }
    let missing_path = dir.path().join("nope.toml");
    let missing = text(&walstream(&["check"], &missing_path)?);
    assert!(missing.contains("cannot read config file"), "{missing}");
    // The reason the OS gave, once: the message carries it, so it is not also its source.
    assert_eq!(
        missing.matches("No such file or directory").count(),
        1,
        "{missing}"
    );
    // Where stderr cannot take the message (a full disk behind a log file), the exit is still
    // the error's, not a panic's 101.
    let unwritable = walstream_command(&["check"], &missing_path)
        .stderr(std::fs::OpenOptions::new().write(true).open("/dev/full")?)
        .status()?;
    assert_eq!(unwritable.code(), Some(1), "{unwritable}");
    Ok(())
}

#[test]
fn print_sql_shows_publication_slot_and_role_and_executes_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("walstream.toml");
    // Nothing listens on port 1: printing must not connect.
    std::fs::write(
        &path,
        "[database]\nurl = 'postgres://u@127.0.0.1:1/db'\n[replication]\nslot = 'orders_cdc'\n\
         publication = 'orders_pub'\ntables = ['public.tb_order', 'sales.tb_invoice']\n",
    )?;
    let output = walstream(&["setup", "--print-sql", "--role", "cdc_reader"], &path)?;
    assert!(output.status.success(), "{}", text(&output));
    let sql = String::from_utf8(output.stdout)?;
    for expected in [
        "CREATE PUBLICATION \"orders_pub\" FOR TABLE \"public\".\"tb_order\", \"sales\".\"tb_invoice\";",
        "pg_create_logical_replication_slot('orders_cdc', 'pgoutput')",
        "CREATE ROLE \"cdc_reader\" WITH LOGIN REPLICATION",
        "GRANT USAGE ON SCHEMA \"sales\" TO \"cdc_reader\"",
    ] {
        assert!(sql.contains(expected), "missing {expected:?} in\n{sql}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_each_problem_with_its_fix() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster
        .sql(
            "CREATE TABLE t_ok (id INT PRIMARY KEY);
             CREATE TABLE t_nokey (v TEXT);
             CREATE TABLE t_nothing (id INT PRIMARY KEY);
             ALTER TABLE t_nothing REPLICA IDENTITY NOTHING;
             CREATE PUBLICATION walstream FOR TABLE t_ok;",
        )
        .await?;
    let config = cluster.config(
        &[
            "public.t_ok",
            "public.t_nokey",
            "public.t_nothing",
            "public.t_missing",
        ],
        "",
    )?;
    let text_of = |output: &Output| text(output);
    // create_publication is on by default: missing tables are reported as to be added.
    let output = walstream(&["check"], &config)?;
    let report = text_of(&output);
    assert!(!output.status.success(), "{report}");
    for expected in [
        "ok   wal_level is logical",
        "ok   NATS reachable",
        "ok   JetStream enabled",
        "FAIL public.t_nokey has no primary key and REPLICA IDENTITY DEFAULT",
        "FAIL public.t_nothing has REPLICA IDENTITY NOTHING",
        "FAIL table public.t_missing does not exist",
        "ok   public.t_ok has a usable replica identity",
        "ok   stream fraiseql_events does not exist yet; walstream creates it at its first start",
    ] {
        assert!(
            report.contains(expected),
            "missing {expected:?} in\n{report}"
        );
    }
    // Before the first start a DBA sees what exists, and that the stream comes later.
    let output = walstream(&["status", "--json"], &config)?;
    assert!(output.status.success(), "{}", text_of(&output));
    let status: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    assert_eq!(status["stream"]["exists"], false, "{status}");
    assert_eq!(status["stream"]["name"], "fraiseql_events");
    let output = walstream(&["status"], &config)?;
    assert!(
        text_of(&output).contains("does not exist yet; walstream creates it at its first start"),
        "{}",
        text_of(&output)
    );

    // A slot in use by another consumer, a slot with another plugin.
    let client = cluster.client().await?;
    client
        .batch_execute("SELECT pg_create_logical_replication_slot('walstream', 'test_decoding')")
        .await?;
    let output = walstream(&["check"], &config)?;
    assert!(
        text_of(&output).contains("not a logical pgoutput slot"),
        "{}",
        text_of(&output)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn check_sees_a_slot_in_use_by_another_process() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster
        .sql("CREATE TABLE t_ok (id INT PRIMARY KEY);")
        .await?;
    let config = cluster.config(&["public.t_ok"], "")?;
    let _streaming = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    let client = cluster.client().await?;
    eventually(
        std::time::Duration::from_secs(30),
        "the slot to be active",
        || async {
            walstream::postgres::slot_info(&client, "walstream")
                .await
                .ok()
                .flatten()
                .is_some_and(|slot| slot.active)
        },
    )
    .await?;
    let output = walstream(&["check"], &config)?;
    let report = text(&output);
    assert!(!output.status.success());
    assert!(
        report.contains("slot walstream is in use by another process (PID"),
        "{report}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn check_names_a_role_that_cannot_replicate() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster
        .sql("CREATE TABLE t_ok (id INT PRIMARY KEY); CREATE ROLE app LOGIN;")
        .await?;
    let url = format!(
        "postgres://app@127.0.0.1:{}/{DATABASE}",
        cluster.postgres.port
    );
    let config = cluster.config_with(&url, &["public.t_ok"], "", "")?;
    let output = walstream(&["check"], &config)?;
    let report = text(&output);
    assert!(!output.status.success());
    for expected in [
        "FAIL role app lacks the REPLICATION attribute: ALTER ROLE app WITH REPLICATION",
        "FAIL cannot SELECT from public.t_ok",
    ] {
        assert!(
            report.contains(expected),
            "missing {expected:?} in\n{report}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_least_privilege_role_streams_and_backfills_and_can_do_nothing_else(
) -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster
        .sql(
            "CREATE TABLE tb_order (id INT PRIMARY KEY, note TEXT NOT NULL);
             CREATE TABLE tb_secret (id INT PRIMARY KEY, pin TEXT NOT NULL);
             INSERT INTO tb_order VALUES (1, 'from before')",
        )
        .await?;
    // What a DBA runs: the table owner's part and the role, as `setup --print-sql` prints it.
    let admin = cluster.config(&["public.tb_order"], "")?;
    let printed = walstream(&["setup", "--print-sql", "--role", "walstream_ro"], &admin)?;
    assert!(printed.status.success(), "{}", text(&printed));
    // One statement at a time, as psql would: a slot cannot be created in a transaction that
    // has written.
    let printed = String::from_utf8_lossy(&printed.stdout).into_owned();
    let sql: String = printed
        .lines()
        .filter(|line| !line.starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    for statement in sql.split(';').filter(|s| !s.trim().is_empty()) {
        cluster.sql(statement).await?;
    }
    let url = cluster.db_url().replacen(
        "postgres://postgres@",
        "postgres://walstream_ro:change-me@",
        1,
    );
    assert!(url.contains("walstream_ro"), "{url}");
    let config = cluster.config_with(
        &url,
        &["public.tb_order"],
        "receive_timeout_secs = 30\ncreate_publication = false",
        "",
    )?;

    let check = walstream(&["check"], &config)?;
    assert!(check.status.success(), "{}", text(&check));
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    cluster
        .sql("INSERT INTO tb_order VALUES (2, 'live')")
        .await?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 1, Duration::from_secs(30))
        .await
        .inspect_err(|_| dump_log(&cluster.log_path()))?;
    let backfill = walstream(&["backfill", "--table", "public.tb_order"], &config)?;
    assert!(backfill.status.success(), "{}", text(&backfill));
    wait_for_messages(&js, 3, Duration::from_secs(30))
        .await
        .inspect_err(|_| dump_log(&cluster.log_path()))?;
    let messages = read_stream(&js).await?;
    let events: Vec<(&str, i64)> = messages
        .iter()
        .map(|m| {
            (
                m.body["event"].as_str().unwrap_or_default(),
                m.body["data"]["id"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(events, [("INSERT", 2), ("BACKFILL", 1), ("BACKFILL", 2)]);

    // And nothing else: no other table, no writes, no new objects.
    let role = walstream::postgres::connect(&url).await?;
    for (statement, what) in [
        ("SELECT * FROM tb_secret", "reads an unwatched table"),
        (
            "INSERT INTO tb_order VALUES (3, 'x')",
            "writes a watched table",
        ),
        ("DELETE FROM tb_order", "deletes"),
        ("CREATE TABLE t_new (id INT)", "creates a table"),
        ("DROP PUBLICATION walstream", "drops the publication"),
    ] {
        let error = role
            .batch_execute(statement)
            .await
            .err()
            .unwrap_or_else(|| panic!("the role {what}"));
        let message = walstream::postgres::db_error(&error);
        assert!(
            message.contains("permission denied") || message.contains("must be owner"),
            "{what}: {message}"
        );
    }
    Ok(())
}
