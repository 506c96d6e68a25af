//! `walstream dev`: a local PostgreSQL (wal_level=logical) and NATS JetStream with the example
//! schema, and walstream streaming it and serving its GraphQL API, in one command.

use std::path::Path;
use std::process::Command;

use anyhow::Context as _;

use crate::commands::run;
use crate::config::Config;
use crate::local::{free_port, LocalNats, LocalPostgres};

const EXAMPLE_SCHEMA: &str = include_str!("../../sql/example/schema.sql");
const EXAMPLE_GRAPHQL: &str = include_str!("../../sql/example/schema.graphql");
const EXAMPLE_CONFIG: &str = include_str!("../../integration/choreography/walstream.toml");
/// Signs the tokens `walstream dev` prints; a local development secret, nothing more.
const DEV_SECRET: &str = "walstream-dev-secret";
const DATABASE: &str = "walstream_dev";

pub async fn run(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    install_if_missing()?;

    // Ports are chosen once a killed earlier run's servers are stopped and theirs are free.
    let mut postgres = LocalPostgres::init(&dir, 0)?;
    let mut nats = LocalNats::new(&dir, 0, &[])?;
    stop_leftovers(&postgres, &nats)?;
    postgres.port = port_or_free(55432)?;
    nats.port = port_or_free(14222)?;
    postgres.start()?;
    let _stop_postgres = StopOnDrop(&postgres);
    if postgres.execute(DATABASE, "SELECT 1").await.is_err() {
        postgres
            .execute("postgres", &format!("CREATE DATABASE {DATABASE}"))
            .await?;
    }
    if postgres
        .execute(DATABASE, "SELECT 'tb_order'::regclass")
        .await
        .is_err()
    {
        postgres
            .execute(DATABASE, EXAMPLE_SCHEMA)
            .await
            .context("loading the example schema")?;
    }

    nats.start()?;

    // The choreography's config (its tables and routes), with this machine's servers.
    let values = [
        ("DATABASE_URL", postgres.url(DATABASE)),
        ("NATS_URL", nats.url()),
        (
            "WALSTREAM_DATA",
            dir.join("checkpoint").display().to_string(),
        ),
        ("HTTP_LISTEN", format!("127.0.0.1:{}", port_or_free(9187)?)),
        (
            "GRAPHQL_LISTEN",
            format!("127.0.0.1:{}", port_or_free(8080)?),
        ),
        ("JWT_SECRET", DEV_SECRET.to_owned()),
    ];
    let lookup = |name: &str| {
        values
            .iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.clone())
    };
    let config_text = crate::config::interpolate(EXAMPLE_CONFIG, &lookup)
        .map_err(anyhow::Error::msg)?
        .replace(
            "\"../../sql/example/schema.graphql\"",
            &format!("\"{}\"", dir.join("schema.graphql").display()),
        );
    std::fs::write(dir.join("schema.graphql"), EXAMPLE_GRAPHQL)?;
    let config_path = dir.join("walstream.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = Config::parse(&config_text, &config_path, &|name| std::env::var(name).ok())?;

    println!(
        "\nwalstream dev is running.\n\
         \n  PostgreSQL  {db}   (wal_level=logical, data in {dir}/pgdata)\
         \n  NATS        {nats}   (JetStream, stream {stream}, subjects {prefix}.> and the choreography's events.*)\
         \n  GraphQL     http://{graphql}/graphql   (GraphiQL in a browser; schema {dir}/schema.graphql)\
         \n  health      http://{http}/health\
         \n  metrics     http://{http}/metrics\
         \n  config      {config}\
         \n\nMake a change, and it becomes an event:\
         \n  psql {db} -c \"INSERT INTO tb_order (identifier, fk_user, total) VALUES ('order-1', 1, 42.00)\"\
         \nWatch the events arrive, in another terminal:\
         \n  cargo run --release -- tail --config {config}\
         \nor count them: curl -s http://{http}/metrics | grep walstream_events_published_total\
         \n\nThe order choreography (README): start the services in another terminal,\
         \n  cargo run --release --bin order-services -- all --database {db} --nats {nats} \\\
         \n    --graphql http://{graphql}/graphql --jwt-secret {secret}\
         \nthen place an order as user 1 (alice) and watch it travel to `shipped`:\
         \n  curl -s http://{graphql}/graphql -H 'Authorization: Bearer {token}' \\\
         \n    -H 'Content-Type: application/json' \\\
         \n    -d '{{\"query\": \"mutation {{ placeOrder(input: {{identifier: \\\"ord-001\\\", items: [{{product: \\\"widget\\\", quantity: 2}}], cardToken: \\\"tok_visa\\\"}}) {{ id status }} }}\"}}'\
         \n  psql {db} -c \"SELECT event_type, recorded_at FROM tb_event_log ORDER BY pk_event_log\"\
         \n\nCtrl-C stops walstream, NATS and PostgreSQL; their data stays in {dir}.\n",
        db = postgres.url(DATABASE),
        dir = dir.display(),
        nats = nats.url(),
        stream = config.nats.stream_name,
        prefix = config.nats.subject_prefix,
        http = config.http.listen,
        config = config_path.display(),
        graphql = config.graphql()?.listen,
        token = dev_token()?,
        secret = DEV_SECRET,
    );
    let result = run::run_all(config, run::shutdown_on_signal()).await;
    nats.kill();
    result
}

/// Stops the servers an earlier `walstream dev` in the same directory left running when it
/// was killed, so their ports and data are free again (found by their data, not their port).
fn stop_leftovers(postgres: &LocalPostgres, nats: &LocalNats) -> anyhow::Result<()> {
    if let Some(pid) = postgres.stop_leftover()? {
        println!("stopped the PostgreSQL an earlier walstream dev left running (pid {pid})");
    }
    if let Some(pid) = nats.stop_leftover()? {
        println!("stopped the nats-server an earlier walstream dev left running (pid {pid})");
    }
    Ok(())
}

/// A token for the example's user 1 (alice), valid for 30 days.
fn dev_token() -> anyhow::Result<String> {
    let claims = serde_json::json!({
        "sub": "alice",
        "role": "app_user",
        "user_pk": 1,
        "exp": jsonwebtoken::get_current_timestamp() + 30 * 24 * 3600,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(DEV_SECRET.as_bytes()),
    )
    .context("signing the dev token")
}

struct StopOnDrop<'a>(&'a LocalPostgres);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.stop("fast");
    }
}

/// `preferred` when nothing listens there, else any free port.
fn port_or_free(preferred: u16) -> anyhow::Result<u16> {
    match std::net::TcpListener::bind(("127.0.0.1", preferred)) {
        Ok(_) => Ok(preferred),
        Err(_) => free_port(),
    }
}

/// Installs nats-server and the PostgreSQL server from Debian's packages when missing and we
/// may (root); otherwise says what to install.
fn install_if_missing() -> anyhow::Result<()> {
    let mut packages = Vec::new();
    if LocalNats::binary().is_err() {
        packages.push("nats-server");
    }
    if LocalPostgres::find_binaries().is_err() {
        packages.push("postgresql");
    }
    if packages.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!(
            "missing {}: install with sudo apt-get install -y {}",
            packages.join(" and "),
            packages.join(" ")
        );
    }
    println!("installing {} with apt-get…", packages.join(" "));
    let status = Command::new("apt-get")
        .args(["install", "-y", "-q"])
        .args(&packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("cannot run apt-get")?;
    if !status.success() {
        anyhow::bail!(
            "apt-get install {} failed; run apt-get update first?",
            packages.join(" ")
        );
    }
    Ok(())
}
