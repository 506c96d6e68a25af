//! Secrets (passwords in URLs, tokens) never reach logs, `/health`, `/metrics`, `status` or
//! error messages.

mod harness;

use harness::output::*;
use harness::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_reach_logs_health_metrics_status_or_errors() -> anyhow::Result<()> {
    const PG_PASSWORD: &str = "pg-Pa55word-7f3a";
    const NATS_PASSWORD: &str = "nats-Pa55word-91c2";
    const JWT_SECRET: &str = "jwt-Secret-0d5e";
    let mut cluster =
        Cluster::start_with_nats_args(&["--user", "walstream", "--pass", NATS_PASSWORD]).await?;
    cluster
        .sql(include_str!("../sql/example/schema.sql"))
        .await?;
    // Trust authentication ignores the password, so the URL carries it without failing.
    let url = cluster
        .db_url()
        .replacen("postgres@", &format!("postgres:{PG_PASSWORD}@"), 1);
    let graphql_port = walstream::local::free_port()?;
    let schema =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/example/schema.graphql");
    let config_text = format!(
        r#"[database]
url = "{url}"
[replication]
tables = ["public.tb_order"]
status_interval_secs = 1
[checkpoint]
path = "{checkpoint}"
[nats]
url = "{nats}"
user = "walstream"
password = "{NATS_PASSWORD}"
[http]
listen = "127.0.0.1:{http}"
[graphql]
schema = "{schema}"
listen = "127.0.0.1:{graphql_port}"
[graphql.auth]
hs256_secret = "{JWT_SECRET}"
[log]
level = "debug"
"#,
        checkpoint = cluster.dir.path().join("checkpoint").display(),
        nats = cluster.nats.url(),
        http = cluster.http_port,
        schema = schema.display(),
    );
    let config = cluster.dir.path().join("walstream.toml");
    std::fs::write(&config, &config_text)?;
    let log = cluster.log_path();
    let walstream_run = Walstream::start_command("run", &config, &log)?;
    let port = cluster.http_port;
    health_turns(
        200,
        port,
        Duration::from_secs(30),
        "walstream to be healthy",
    )
    .await?;
    cluster
        .sql("INSERT INTO tb_order (identifier, fk_user, total) VALUES ('s-1', 1, 1)")
        .await?;
    // Error paths: a forged token, NATS gone and back, a database that cannot be reached.
    let forged = http_request(
        graphql_port,
        "POST",
        "/graphql",
        &[
            ("Authorization", "Bearer not.a.jwt"),
            ("Content-Type", "application/json"),
        ],
        r#"{"query": "{ orders { id } }"}"#,
    )
    .await?;
    cluster.nats.kill();
    health_turns(
        503,
        port,
        Duration::from_secs(10),
        "/health to see NATS gone",
    )
    .await?;
    let unhealthy = http_get(port, "/health").await?;
    cluster.nats.start()?;
    health_turns(200, port, Duration::from_secs(30), "walstream to reconnect").await?;
    let (_, health) = http_get(port, "/health").await?;
    let (_, metrics) = http_get(port, "/metrics").await?;
    let status = walstream(&["status", "--json"], &config)?;
    let check = walstream(&["check"], &config)?;
    let unreachable = cluster.dir.path().join("unreachable.toml");
    std::fs::write(
        &unreachable,
        config_text.replace(
            &url,
            &format!("postgres://postgres:{PG_PASSWORD}@127.0.0.1:1/app"),
        ),
    )?;
    // Stopped first: its checkpoint lock would fail the next start before the database does.
    drop(walstream_run);
    let failed = walstream(&["stream"], &unreachable)?;
    assert!(!failed.status.success());

    let log_text = std::fs::read_to_string(&log)?;
    let outputs = [
        ("the log", log_text),
        ("a refused request", forged.1),
        ("/health while NATS was down", unhealthy.1),
        ("/health", health),
        ("/metrics", metrics),
        ("status --json", text(&status)),
        ("check", text(&check)),
        ("a failed start", text(&failed)),
    ];
    for (place, output) in &outputs {
        assert!(
            !output.is_empty(),
            "{place} is empty: the test would prove nothing"
        );
        for secret in [PG_PASSWORD, NATS_PASSWORD, JWT_SECRET] {
            assert!(
                !output.contains(secret),
                "{place} shows a secret:\n{output}"
            );
        }
    }
    assert!(
        text(&failed).contains("127.0.0.1:1"),
        "the error still says where it failed: {}",
        text(&failed)
    );
    Ok(())
}

/// Waits until walstream's `/health` answers `status`.
async fn health_turns(status: u16, port: u16, within: Duration, what: &str) -> anyhow::Result<()> {
    eventually(within, what, || async {
        http_get(port, "/health")
            .await
            .is_ok_and(|(answered, _)| answered == status)
    })
    .await
}
