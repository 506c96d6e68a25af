//! What walstream reports about itself: `/health`, `/metrics`, `status` and `seek`.

mod harness;

use harness::orders::*;
use harness::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn health_and_metrics_report_the_pipeline() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    cluster.sql(ORDERS).await?;
    let config = cluster.config(&["public.tb_order"], "")?;
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(&cluster).await?;
    cluster
        .sql("INSERT INTO tb_order (identifier, total) SELECT 'o-' || g, g FROM generate_series(1, 25) g")
        .await?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 25, Duration::from_secs(30)).await?;
    let port = cluster.http_port;
    eventually(Duration::from_secs(10), "the checkpoint metric", || async {
        http_get(port, "/metrics")
            .await
            .is_ok_and(|(_, body)| !body.contains("walstream_checkpoint_lsn 0\n"))
    })
    .await?;
    let (status, body) = http_get(port, "/health").await?;
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body)?;
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["replication"]["connected"], true);
    assert_eq!(
        health["nats"],
        json!({"connected": true, "stream": "fraiseql_events"})
    );
    assert_ne!(health["checkpoint_lsn"], "0/0");

    let (status, metrics) = http_get(port, "/metrics").await?;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(
            r#"walstream_events_published_total{op="INSERT",table="public.tb_order"} 25"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("walstream_commit_to_ack_seconds_count 25"),
        "{metrics}"
    );
    assert!(metrics.contains("walstream_inflight_acks"));
    assert!(metrics.contains("walstream_replication_lag_bytes"));
    assert!(
        metrics.contains(r#"walstream_connected{peer="nats"} 1"#)
            && metrics.contains(r#"walstream_connected{peer="postgres"} 1"#),
        "{metrics}"
    );
    // The slot watch polls at start: the slot's WAL is reserved and some of it retained.
    assert!(
        metrics.contains(r#"walstream_slot_wal_status{status="reserved"} 1"#)
            && metrics.contains(r#"walstream_slot_wal_status{status="lost"} 0"#),
        "{metrics}"
    );
    let retained = metrics
        .lines()
        .find_map(|l| l.strip_prefix("walstream_slot_wal_retained_bytes "))
        .and_then(|v| v.parse::<i64>().ok());
    assert!(retained.is_some_and(|bytes| bytes > 0), "{metrics}");

    cluster.nats.kill();
    eventually(Duration::from_secs(10), "/health to turn 503", || async {
        http_get(port, "/health").await.is_ok_and(|(status, body)| {
            status == 503 && body.contains(r#""nats":{"connected":false"#)
        })
    })
    .await?;
    // Unready, but alive: a liveness probe must not restart it for an outage it rides out.
    let (status, body) = http_get(port, "/health/live").await?;
    assert_eq!((status, body.as_str()), (200, "alive\n"));
    let (_, metrics) = http_get(port, "/metrics").await?;
    assert!(
        metrics.contains(r#"walstream_connected{peer="nats"} 0"#),
        "{metrics}"
    );
    Ok(())
}

/// `walstream <args>` with the config; returns the exit code and stdout parsed as JSON.
fn walstream_json(config: &std::path::Path, args: &[&str]) -> anyhow::Result<(i32, Value)> {
    let output = Command::new(walstream_binary())
        .args(args)
        .arg("--json")
        .arg("--config")
        .arg(config)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let value = serde_json::from_str(&stdout).map_err(|e| {
        anyhow::anyhow!(
            "{args:?}: {e}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    Ok((output.status.code().unwrap_or(-1), value))
}

#[tokio::test(flavor = "multi_thread")]
async fn status_and_seek_on_a_million_events() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    cluster
        .sql("CREATE TABLE t_many (id BIGINT PRIMARY KEY, batch INT NOT NULL)")
        .await?;
    let config = cluster.config(&["public.t_many"], "")?;
    setup(&config)?;
    // 1,000 transactions of 1,000 rows: a million events with 1,000 distinct commit LSNs.
    cluster
        .sql(
            "DO $$ BEGIN
                 FOR b IN 0..999 LOOP
                     INSERT INTO t_many SELECT b * 1000 + i, b FROM generate_series(1, 1000) i;
                     COMMIT;
                 END LOOP;
             END $$",
        )
        .await?;
    let _walstream = Walstream::start(&config, &cluster.log_path())?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 1_000_000, Duration::from_secs(240))
        .await
        .inspect_err(|_| dump_log(&cluster.log_path()))?;

    let (code, status) = walstream_json(&config, &["status"])?;
    assert_eq!(code, 0, "{status}");
    assert_eq!(status["stream"]["messages"], 1_000_000);
    assert_eq!(status["slot"]["active"], true, "{status}");
    assert!(status["stream"]["first_lsn"].is_string() && status["stream"]["last_lsn"].is_string());
    assert!(
        status["checkpoint"]["lsn"].is_string(),
        "read beside the running walstream: {status}"
    );
    assert!(status["slot"]["wal_retained_bytes"].is_u64(), "{status}");
    // PostgreSQL 17's slot columns, null before it.
    let newer = cluster.postgres_version().await? >= 170000;
    assert_eq!(status["slot"]["failover"].is_boolean(), newer, "{status}");
    assert_eq!(status["slot"]["synced"].is_boolean(), newer, "{status}");
    assert!(status["slot"]["invalidation_reason"].is_null(), "{status}");
    let nats = &status["nats"];
    assert!(nats["version"].is_string(), "{status}");
    assert_eq!(
        nats["api_level"].is_u64(),
        nats_server_version()? >= (2, 11),
        "{status}"
    );

    // A transaction in the middle: its first event is where `seek` must land.
    let stream = js.get_stream(STREAM).await?;
    let probe = stream.get_raw_message(500_500).await?;
    let header = |name: &str| {
        probe
            .headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    let seq_in_tx: u64 = header("Walstream-Seq").parse()?;
    let first_of_tx = 500_500 - seq_in_tx;
    let started = std::time::Instant::now();
    let (code, by_lsn) = walstream_json(&config, &["seek", "--lsn", &header("Walstream-Lsn")])?;
    let elapsed = started.elapsed();
    assert_eq!(code, 0, "{by_lsn}");
    assert_eq!(by_lsn["sequence"], first_of_tx, "{by_lsn}");
    println!("seek --lsn over 1M events: {elapsed:?} (process start included)");
    let (code, by_time) = walstream_json(
        &config,
        &["seek", "--time", &header("Walstream-Commit-Time")],
    )?;
    assert_eq!(code, 0, "{by_time}");
    assert_eq!(by_time["sequence"], first_of_tx, "{by_time}");

    let (code, beyond) = walstream_json(&config, &["seek", "--lsn", "FFFFFFFF/0"])?;
    assert_eq!(
        code, 2,
        "nothing at or after the target is exit code 2: {beyond}"
    );
    assert_eq!(beyond["sequence"], Value::Null);
    Ok(())
}
