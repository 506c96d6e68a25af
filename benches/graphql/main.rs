//! GraphQL side by side: walstream's front end against the servers users would pick instead
//! (FraiseQL's own server, PostGraphile 5), on one PostgreSQL 18 database holding the example
//! schema, the same three operations, the same token and the same connection pool size, in
//! one run; with pgbench sending each operation's SQL and a bare HTTP server (the floor) as
//! references that no GraphQL server reaches.
//!
//! Run: `cargo bench --bench graphql`. Installs PostgreSQL 18 (`scripts/install-servers`),
//! FraiseQL and PostGraphile (`scripts/install-peers`; FraiseQL is built from crates.io, ~20
//! minutes the first time) into caches outside the clone when missing; a peer that cannot be
//! installed or started is skipped with a line saying why. Settings: WALSTREAM_BENCH_CLIENTS
//! (8 connections), WALSTREAM_BENCH_SECONDS (10 per measurement), WALSTREAM_BENCH_ROUNDS (2,
//! the servers' order rotating), WALSTREAM_BENCH_GRAPHQL_PEERS (`fraiseql,postgraphile`;
//! `none` for walstream and the references only), WALSTREAM_BENCH_COMMAND=run (the sidecar,
//! streaming in the same process, instead of `serve`), WALSTREAM_PG_BIN (another PostgreSQL).
//! Writes `benches/results/graphql-latest.json`.

// Shared with the pipeline bench, which also uses what this one does not.
#[allow(dead_code)]
#[path = "../common/cpu.rs"]
mod cpu;
mod floor;
mod load;
mod peers;
#[path = "../common/stats.rs"]
mod stats;

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::Context as _;
use stats::env_count;
use walstream::local::{free_port, wait_for_port, LocalNats, LocalPostgres};

const DATABASE: &str = "bench";
const SECRET: &str = "bench-secret";
const AUDIENCE: &str = "bench";
const ORDERS: u64 = 10_000;
const EXAMPLE_SQL: &str = include_str!("../../sql/example/schema.sql");
/// Argument that makes this binary the floor server instead of the benchmark.
const FLOOR_SERVER: &str = "--floor-server";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, port, url, pool_size] = args.as_slice() {
        if flag == FLOOR_SERVER {
            return floor::serve(port.parse()?, url, pool_size.parse()?);
        }
    }
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing and expects no run.
    if !args.iter().any(|a| a == "--bench") {
        return Ok(());
    }
    use_postgres_18();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

/// FraiseQL 2.19 refuses PostgreSQL older than 18: unless WALSTREAM_PG_BIN names one, the
/// bench runs on PostgreSQL 18 from npm (scripts/install-servers), or on the machine's own
/// when that cannot be installed (FraiseQL is then skipped).
fn use_postgres_18() {
    if std::env::var_os("WALSTREAM_PG_BIN").is_some() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let installed = Command::new(root.join("scripts/install-servers"))
        .args(["postgres", "18"])
        .status();
    match installed {
        Ok(status) if status.success() => {
            let servers = std::env::var("WALSTREAM_SERVERS_DIR")
                .unwrap_or_else(|_| "/var/cache/walstream/servers".into());
            // Single-threaded still: no other thread reads the environment.
            std::env::set_var(
                "WALSTREAM_PG_BIN",
                Path::new(&servers).join("postgres-18/bin"),
            );
        }
        outcome => eprintln!(
            "graphql bench: PostgreSQL 18 could not be installed ({outcome:?}); running on the \
             machine's PostgreSQL"
        ),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
enum Operation {
    Lookup,
    List,
    Create,
}

const OPERATIONS: [Operation; 3] = [Operation::Lookup, Operation::List, Operation::Create];

impl Operation {
    fn name(self) -> &'static str {
        match self {
            Operation::Lookup => "order(id)",
            Operation::List => "orders(limit: 20)",
            Operation::Create => "createOrder",
        }
    }

    /// The SQL pgbench sends for the same work: what the database alone allows.
    fn pgbench_script(self) -> String {
        match self {
            Operation::Lookup => format!(
                "\\set k random(1, {ORDERS})\nSELECT data FROM v_order WHERE id = \
                 ('00000000-0000-0000-0000-' || lpad(:k::text, 12, '0'))::uuid;\n"
            ),
            Operation::List => "SELECT data FROM v_order LIMIT 20;\n".into(),
            Operation::Create => {
                "SELECT fn_create_order(gen_random_uuid()::text, 1, 49.99);\n".into()
            }
        }
    }
}

/// How a server spells the operations: each one's natural schema over the same tables.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dialect {
    /// sql/example/schema.graphql.
    Walstream,
    /// benches/peers/fraiseql_schema.py.
    Fraiseql,
    /// What PostGraphile's amber preset makes of `public` (a column `id` becomes `rowId`).
    Postgraphile,
    /// The floor answers the lookup only.
    Floor,
}

const FIELDS: &str = "identifier total status createdAt";

impl Dialect {
    /// The request body of `operation` for request `i` of `client`; `tag` keeps created
    /// identifiers unique across servers and rounds. None: the server does not serve it.
    fn request(self, operation: Operation, tag: &str, client: u64, i: u64) -> Option<String> {
        let id = order_uuid(1 + spread(client, i));
        let identifier = format!("gql-{tag}-{client}-{i}");
        let (query, variables) = match (self, operation) {
            (Dialect::Walstream | Dialect::Fraiseql | Dialect::Floor, Operation::Lookup) => (
                format!("query($id: ID!) {{ order(id: $id) {{ id {FIELDS} }} }}"),
                serde_json::json!({"id": id}),
            ),
            (Dialect::Walstream | Dialect::Fraiseql, Operation::List) => (
                format!("{{ orders(limit: 20) {{ id {FIELDS} }} }}"),
                serde_json::json!({}),
            ),
            (Dialect::Walstream, Operation::Create) => (
                format!(
                    "mutation($i: CreateOrderInput!) {{ createOrder(input: $i) {{ id {FIELDS} }} }}"
                ),
                serde_json::json!({"i": {"identifier": identifier, "total": "49.99"}}),
            ),
            (Dialect::Fraiseql, Operation::Create) => (
                format!(
                    "mutation($identifier: String!, $total: Decimal!) {{ createOrder(identifier: \
                     $identifier, total: $total) {{ id {FIELDS} }} }}"
                ),
                serde_json::json!({"identifier": identifier, "total": "49.99"}),
            ),
            (Dialect::Postgraphile, Operation::Lookup) => (
                format!("query($id: UUID!) {{ tbOrderByRowId(rowId: $id) {{ rowId {FIELDS} }} }}"),
                serde_json::json!({"id": id}),
            ),
            (Dialect::Postgraphile, Operation::List) => (
                format!("{{ allTbOrders(first: 20) {{ nodes {{ rowId {FIELDS} }} }} }}"),
                serde_json::json!({}),
            ),
            (Dialect::Postgraphile, Operation::Create) => (
                format!(
                    "mutation($identifier: String!, $total: BigFloat!) {{ createTbOrder(input: \
                     {{tbOrder: {{identifier: $identifier, fkUser: \"1\", total: $total}}}}) \
                     {{ tbOrder {{ rowId {FIELDS} }} }} }}"
                ),
                serde_json::json!({"identifier": identifier, "total": "49.99"}),
            ),
            (Dialect::Floor, _) => return None,
        };
        Some(serde_json::json!({"query": query, "variables": variables}).to_string())
    }
}

/// The UUID of pre-made order `k`, computable on both sides.
fn order_uuid(k: u64) -> String {
    format!("00000000-0000-0000-0000-{k:012}")
}

/// Spreads lookups over the pre-made orders.
fn spread(client: u64, i: u64) -> u64 {
    (client * 7919 + i * 104_729) % ORDERS
}

/// A server under load.
struct Server {
    name: &'static str,
    port: u16,
    process: ServerProcess,
    dialect: Dialect,
}

#[derive(Debug, serde::Serialize)]
struct Measurement {
    server: &'static str,
    operation: &'static str,
    round: u64,
    #[serde(flatten)]
    load: load::Load,
    /// The server's own CPU time (user + system) per request.
    cpu_us_per_request: f64,
    /// PostgreSQL's (postmaster and backends) per request: the work each server asks of it.
    postgres_cpu_us_per_request: f64,
}

#[derive(Debug, serde::Serialize)]
struct Results {
    clients: u64,
    seconds: u64,
    postgres: String,
    /// `kernel.sched_autogroup_enabled`, which decides the tails (`cpu::describe_scheduling`).
    sched_autogroup: Option<bool>,
    skipped: Vec<String>,
    pgbench: Vec<Reference>,
    measurements: Vec<Measurement>,
}

/// pgbench sending an operation's SQL: what PostgreSQL alone allows, its own tail included.
#[derive(Debug, serde::Serialize)]
struct Reference {
    operation: &'static str,
    round: u64,
    #[serde(flatten)]
    load: load::Load,
}

/// `serve` (GraphQL alone) or `run` (GraphQL and the pipeline in one process).
fn walstream_command() -> anyhow::Result<String> {
    let command = std::env::var("WALSTREAM_BENCH_COMMAND").unwrap_or_else(|_| "serve".into());
    match command.as_str() {
        "serve" | "run" => Ok(command),
        other => anyhow::bail!("WALSTREAM_BENCH_COMMAND={other}: expected serve or run"),
    }
}

/// The peers to run: WALSTREAM_BENCH_GRAPHQL_PEERS, a comma-separated list, or `none`.
fn wanted_peers() -> anyhow::Result<Vec<String>> {
    let value = std::env::var("WALSTREAM_BENCH_GRAPHQL_PEERS")
        .unwrap_or_else(|_| "fraiseql,postgraphile".into());
    let peers: Vec<String> = value
        .split(',')
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty() && p != "none")
        .collect();
    if let Some(unknown) = peers
        .iter()
        .find(|p| !["fraiseql", "postgraphile"].contains(&p.as_str()))
    {
        anyhow::bail!(
            "WALSTREAM_BENCH_GRAPHQL_PEERS: unknown peer {unknown:?} (fraiseql, postgraphile or none)"
        );
    }
    Ok(peers)
}

async fn run() -> anyhow::Result<()> {
    let clients = env_count("WALSTREAM_BENCH_CLIENTS", 8);
    let seconds = env_count("WALSTREAM_BENCH_SECONDS", 10);
    let rounds = env_count("WALSTREAM_BENCH_ROUNDS", 2).max(1);
    let peers = wanted_peers()?;
    println!("graphql bench: {}", cpu::describe_scheduling());
    let dir = tempfile::Builder::new()
        .prefix("walstream-bench-gql-")
        .tempdir()?;
    let postgres_port = free_port()?;
    let postgres = LocalPostgres::init(dir.path(), postgres_port)?;
    postgres.start()?;
    let _stop = StopPostgres(&postgres);
    let postgres_pid = postgres
        .pid()
        .ok_or_else(|| anyhow::anyhow!("PostgreSQL's postmaster has no pid file"))?;
    prepare_database(&postgres).await?;
    let version = server_version(&postgres).await?;
    let mut nats = LocalNats::new(dir.path(), free_port()?, &[])?;
    nats.start()?;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "bench", "user_pk": 1, "aud": AUDIENCE,
                            "exp": jsonwebtoken::get_current_timestamp() + 86_400}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )?;

    let mut servers = vec![
        start_walstream(dir.path(), &postgres, &nats, clients)?,
        start_floor(&postgres, clients)?,
    ];
    let mut skipped = Vec::new();
    let database_url = postgres.url(DATABASE);
    let setting = peers::Setting {
        database_url: &database_url,
        port: 0,
        pool_size: clients,
        secret: SECRET,
        audience: AUDIENCE,
        work: dir.path(),
    };
    for peer in &peers {
        let started = match peer.as_str() {
            "fraiseql" if version < 180_000 => Err(anyhow::anyhow!(
                "FraiseQL 2.19 needs PostgreSQL 18 or newer; this one is {version}"
            )),
            "fraiseql" => start_fraiseql(setting, &postgres).await,
            _ => start_postgraphile(setting),
        };
        match started {
            Ok(started) => servers.extend(started),
            Err(error) => {
                let line = format!("{peer} skipped: {error:#}");
                eprintln!("graphql bench: {line}");
                skipped.push(line);
            }
        }
    }
    let mut serving = Vec::new();
    for server in servers {
        let probe = server
            .dialect
            .request(Operation::Lookup, "probe", 0, 0)
            .unwrap_or_default();
        match wait_and_probe(&server, &token, &probe).await {
            Ok(()) => serving.push(server),
            Err(error) if server.dialect == Dialect::Walstream => return Err(error),
            Err(error) => {
                let line = format!("{} skipped: {error:#}", server.name);
                eprintln!("graphql bench: {line}");
                skipped.push(line);
            }
        }
    }

    let pgbench = pgbench_binary()?;
    let port = postgres_port.to_string();
    let mut references = Vec::new();
    let mut measurements = Vec::new();
    for round in 0..rounds {
        for operation in OPERATIONS {
            reset_orders(&postgres).await?;
            let load = run_pgbench(&pgbench, &port, dir.path(), operation, clients, seconds)?;
            println!(
                "round {round}, {}: pgbench {}",
                operation.name(),
                describe(&load)
            );
            references.push(Reference {
                operation: operation.name(),
                round,
                load,
            });
            // Rotated each round, so no server always runs first (or last) on a warming machine.
            let order = (0..serving.len()).map(|k| (k + round as usize) % serving.len());
            for index in order {
                let server = &serving[index];
                let tag = format!("{}-{round}", server.name);
                let body = |client, i| {
                    server
                        .dialect
                        .request(operation, &tag, client, i)
                        .unwrap_or_default()
                };
                if server.dialect.request(operation, &tag, 0, 0).is_none() {
                    continue;
                }
                reset_orders(&postgres).await?;
                let measurement = measure(
                    server,
                    postgres_pid,
                    operation,
                    round,
                    &token,
                    clients,
                    seconds,
                    &body,
                )
                .await
                .with_context(|| format!("{} on {}", operation.name(), server.name))?;
                println!(
                    "round {round}, {}: {} {}, CPU {:.0} µs/request (PostgreSQL {:.0})",
                    operation.name(),
                    server.name,
                    describe(&measurement.load),
                    measurement.cpu_us_per_request,
                    measurement.postgres_cpu_us_per_request
                );
                measurements.push(measurement);
            }
        }
    }
    for mut server in serving {
        server.process.stop();
    }
    nats.kill();
    report(&measurements, &references, rounds);
    let results = Results {
        clients,
        seconds,
        postgres: version.to_string(),
        sched_autogroup: cpu::autogroup_scheduling(),
        skipped,
        pgbench: references,
        measurements,
    };
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("graphql-latest.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    Ok(())
}

/// The example schema and 10,000 orders to look up.
async fn prepare_database(postgres: &LocalPostgres) -> anyhow::Result<()> {
    postgres
        .execute("postgres", &format!("CREATE DATABASE {DATABASE}"))
        .await?;
    postgres.execute(DATABASE, EXAMPLE_SQL).await?;
    seed_orders(postgres).await
}

async fn seed_orders(postgres: &LocalPostgres) -> anyhow::Result<()> {
    postgres
        .execute(
            DATABASE,
            &format!(
                "INSERT INTO tb_order (id, identifier, fk_user, total)
                 SELECT ('00000000-0000-0000-0000-' || lpad(k::text, 12, '0'))::uuid, 'seed-' || k, 1, k
                 FROM generate_series(1, {ORDERS}) k"
            ),
        )
        .await?;
    postgres.execute(DATABASE, "VACUUM ANALYZE tb_order").await
}

/// Takes `tb_order` back to the 10,000 seeded orders, so every measurement meets the same
/// table. Without it each createOrder ran on the rows of every one before it (pgbench alone
/// adds ~200,000 a round), and the last server of a round paid for the others: PostgreSQL's
/// CPU per createOrder rose from 180 to 250 µs between walstream's two rounds.
async fn reset_orders(postgres: &LocalPostgres) -> anyhow::Result<()> {
    postgres
        .execute(DATABASE, "TRUNCATE tb_order CASCADE")
        .await?;
    seed_orders(postgres).await?;
    caught_up(postgres).await
}

/// Waits until every replication slot has confirmed the WAL written so far (the sidecar,
/// `WALSTREAM_BENCH_COMMAND=run`, streams the reset's changes), so a measurement does not
/// share the machine with them.
async fn caught_up(postgres: &LocalPostgres) -> anyhow::Result<()> {
    let (client, connection) =
        tokio_postgres::connect(&postgres.url(DATABASE), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let target: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let behind: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots \
                 WHERE confirmed_flush_lsn IS NULL OR confirmed_flush_lsn < $1::text::pg_lsn",
                &[&target],
            )
            .await?
            .get(0);
        if behind == 0 {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("a replication slot has not confirmed {target} after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn server_version(postgres: &LocalPostgres) -> anyhow::Result<u32> {
    let (client, connection) =
        tokio_postgres::connect(&postgres.url(DATABASE), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?;
    Ok(row.get::<_, i32>(0).try_into()?)
}

fn start_walstream(
    dir: &Path,
    postgres: &LocalPostgres,
    nats: &LocalNats,
    clients: u64,
) -> anyhow::Result<Server> {
    let port = free_port()?;
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/example/schema.graphql");
    let config = dir.join("walstream.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{url}\"\n[replication]\ntables = [\"public.tb_order\"]\n\
             [nats]\nurl = \"{nats}\"\n[http]\nlisten = \"\"\n\
             [graphql]\nschema = \"{schema}\"\nlisten = \"127.0.0.1:{port}\"\npool_size = {clients}\n\
             [graphql.auth]\nhs256_secret = \"{SECRET}\"\naudience = \"{AUDIENCE}\"\n\
             [log]\nlevel = \"warn\"\n",
            url = postgres.url(DATABASE),
            nats = nats.url(),
            schema = schema.display(),
        ),
    )?;
    let process = Command::new(env!("CARGO_BIN_EXE_walstream"))
        .args([walstream_command()?.as_str(), "--config"])
        .arg(&config)
        .spawn()?;
    Ok(Server {
        name: "walstream",
        port,
        process: ServerProcess(process),
        dialect: Dialect::Walstream,
    })
}

fn start_floor(postgres: &LocalPostgres, clients: u64) -> anyhow::Result<Server> {
    let port = free_port()?;
    let process = Command::new(std::env::current_exe()?)
        .args([FLOOR_SERVER, &port.to_string(), &postgres.url(DATABASE)])
        .arg(clients.to_string())
        .spawn()?;
    Ok(Server {
        name: "floor (axum + tokio-postgres, no GraphQL)",
        port,
        process: ServerProcess(process),
        dialect: Dialect::Floor,
    })
}

/// FraiseQL twice: as it comes (its query result cache on) and with the cache off, which is
/// what every other server here does.
async fn start_fraiseql(
    setting: peers::Setting<'_>,
    postgres: &LocalPostgres,
) -> anyhow::Result<Vec<Server>> {
    let fraiseql = peers::install("fraiseql")?;
    let schema = peers::prepare_fraiseql(&fraiseql, &setting, postgres, DATABASE).await?;
    let mut servers = Vec::new();
    for (name, cache) in [
        ("fraiseql (defaults: result cache on)", true),
        ("fraiseql (result cache off)", false),
    ] {
        let port = free_port()?;
        let setting = peers::Setting { port, ..setting };
        let process = peers::start_fraiseql(&fraiseql, &schema, &setting, cache)?;
        servers.push(Server {
            name,
            port,
            process: ServerProcess(process),
            dialect: Dialect::Fraiseql,
        });
    }
    Ok(servers)
}

fn start_postgraphile(setting: peers::Setting<'_>) -> anyhow::Result<Vec<Server>> {
    let postgraphile = peers::install("postgraphile")?;
    let port = free_port()?;
    let setting = peers::Setting { port, ..setting };
    let process = peers::start_postgraphile(&postgraphile, &setting)?;
    Ok(vec![Server {
        name: "postgraphile 5 (one Node process)",
        port,
        process: ServerProcess(process),
        dialect: Dialect::Postgraphile,
    }])
}

/// Waits for the server's port, then for a first lookup to be answered without errors.
async fn wait_and_probe(server: &Server, token: &str, probe: &str) -> anyhow::Result<()> {
    wait_for_port(server.port, Duration::from_secs(60))
        .with_context(|| format!("{} did not open its port", server.name))?;
    load::probe(server.port, token, probe)
        .await
        .with_context(|| format!("{} did not answer a lookup", server.name))
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    server: &Server,
    postgres_pid: u32,
    operation: Operation,
    round: u64,
    token: &str,
    clients: u64,
    seconds: u64,
    body: load::Body<'_>,
) -> anyhow::Result<Measurement> {
    let pid = server.process.0.id();
    let (cpu_before, postgres_before) =
        (cpu::cpu_seconds(pid)?, cpu::tree_cpu_seconds(postgres_pid)?);
    let load = load::run(server.port, token, clients, seconds, body).await?;
    let cpu = cpu::cpu_seconds(pid)? - cpu_before;
    let postgres_cpu = cpu::tree_cpu_seconds(postgres_pid)? - postgres_before;
    let per_request = |seconds: f64| seconds * 1e6 / load.requests.max(1) as f64;
    Ok(Measurement {
        server: server.name,
        operation: operation.name(),
        round,
        load,
        cpu_us_per_request: per_request(cpu),
        postgres_cpu_us_per_request: per_request(postgres_cpu),
    })
}

/// One load's figures on a line.
fn describe(load: &load::Load) -> String {
    let l = &load.latency;
    format!(
        "{:.0}/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.1} ms (wrk's p99 {:.2} ms)",
        load.per_sec, l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms, l.wrk_p99_ms
    )
}

/// Each server's range over the rounds per operation, then walstream against the targets.
fn report(measurements: &[Measurement], references: &[Reference], rounds: u64) {
    println!("\n{rounds} round(s); ranges are min–max over the rounds; latencies in ms");
    println!("{}", cpu::describe_scheduling());
    for operation in OPERATIONS {
        let name = operation.name();
        println!("\n{name}");
        let pgbench: Vec<&load::Load> = references
            .iter()
            .filter(|r| r.operation == name)
            .map(|r| &r.load)
            .collect();
        print_row("pgbench (the same SQL, no HTTP)", &pgbench, None);
        let mut servers: Vec<&str> = measurements
            .iter()
            .filter(|m| m.operation == name)
            .map(|m| m.server)
            .collect();
        servers.sort_unstable();
        servers.dedup();
        for server in &servers {
            let of_server: Vec<&Measurement> = measurements
                .iter()
                .filter(|m| m.operation == name && m.server == *server)
                .collect();
            let loads: Vec<&load::Load> = of_server.iter().map(|m| &m.load).collect();
            print_row(server, &loads, Some(&of_server));
        }
        targets(measurements, name);
    }
}

fn print_row(name: &str, loads: &[&load::Load], cpu: Option<&[&Measurement]>) {
    let of = |field: fn(&load::Load) -> f64| loads.iter().map(|l| field(l)).collect::<Vec<_>>();
    let mut line = format!(
        "  {name:<42} {:>13} req/s  p50 {:>11}  p99 {:>11}  p99.9 {:>11}  max {:>11}  wrk p99 {:>11}",
        range(&of(|l| l.per_sec), 0),
        range(&of(|l| l.latency.p50_ms), 2),
        range(&of(|l| l.latency.p99_ms), 2),
        range(&of(|l| l.latency.p999_ms), 2),
        range(&of(|l| l.latency.max_ms), 1),
        range(&of(|l| l.latency.wrk_p99_ms), 2),
    );
    if let Some(measurements) = cpu {
        let of = |field: fn(&Measurement) -> f64| {
            measurements.iter().map(|m| field(m)).collect::<Vec<_>>()
        };
        line += &format!(
            "  CPU {:>9} µs/req  PostgreSQL {:>9}",
            range(&of(|m| m.cpu_us_per_request), 0),
            range(&of(|m| m.postgres_cpu_us_per_request), 0),
        );
    }
    println!("{line}");
}

/// walstream's ratios against each peer, round by round: ≥ 2× FraiseQL's req/s, ≥ 1.5×
/// PostGraphile's, p99 no worse than either's, CPU per request ≤ half of FraiseQL's.
fn targets(measurements: &[Measurement], operation: &str) {
    let round_of = |server: &str, round: u64| {
        measurements
            .iter()
            .find(|m| m.operation == operation && m.server == server && m.round == round)
    };
    for peer in measurements
        .iter()
        .filter(|m| m.operation == operation && m.round == 0)
        .map(|m| m.server)
        .filter(|s| s.starts_with("fraiseql") || s.starts_with("postgraphile"))
    {
        let wanted_rate = if peer.starts_with("fraiseql") {
            2.0
        } else {
            1.5
        };
        let mut lines = Vec::new();
        let mut round = 0;
        while let (Some(ours), Some(theirs)) = (round_of("walstream", round), round_of(peer, round))
        {
            let rate = ours.load.per_sec / theirs.load.per_sec;
            let cpu = ours.cpu_us_per_request / theirs.cpu_us_per_request;
            let mut checks = vec![
                format!(
                    "req/s {rate:.2}× ({})",
                    verdict(rate >= wanted_rate, &format!("≥ {wanted_rate}×"))
                ),
                format!(
                    "p99 {:.2} vs {:.2} ms ({})",
                    ours.load.latency.p99_ms,
                    theirs.load.latency.p99_ms,
                    verdict(
                        ours.load.latency.p99_ms <= theirs.load.latency.p99_ms,
                        "no worse"
                    )
                ),
            ];
            if peer.starts_with("fraiseql") {
                checks.push(format!("CPU {cpu:.2}× ({})", verdict(cpu <= 0.5, "≤ ½")));
            }
            lines.push(format!("round {round}: {}", checks.join(", ")));
            round += 1;
        }
        println!("  walstream vs {peer}: {}", lines.join("; "));
    }
}

fn verdict(met: bool, target: &str) -> String {
    format!("{} {target}", if met { "met" } else { "MISSED" })
}

fn range(values: &[f64], decimals: usize) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match values.len() {
        0 => "-".into(),
        _ if (max - min).abs() < f64::EPSILON => format!("{min:.decimals$}"),
        _ => format!("{min:.decimals$}–{max:.decimals$}"),
    }
}

/// The npm builds of PostgreSQL ship no pgbench: any pgbench drives any server.
fn pgbench_binary() -> anyhow::Result<std::path::PathBuf> {
    Ok(Some(LocalPostgres::find_binaries()?.join("pgbench"))
        .filter(|path| path.exists())
        .unwrap_or_else(|| "pgbench".into()))
}

/// pgbench sending `operation`'s SQL for `seconds`, with every transaction's latency from its
/// log (`-l`), so the database's own tail stands beside each server's.
fn run_pgbench(
    pgbench: &Path,
    port: &str,
    work: &Path,
    operation: Operation,
    clients: u64,
    seconds: u64,
) -> anyhow::Result<load::Load> {
    let logs = work.join("pgbench-logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs)?;
    let script = work.join("script.sql");
    std::fs::write(&script, operation.pgbench_script())?;
    let started = std::time::Instant::now();
    let output = Command::new(pgbench)
        .args(["-n", "-M", "prepared", "-h", "127.0.0.1", "-p", port])
        .args(["-U", "postgres", "-c", &clients.to_string(), "-j", "2"])
        .args(["-T", &seconds.to_string(), "-l", "--log-prefix"])
        .arg(logs.join("pgbench"))
        .arg("-f")
        .arg(&script)
        .arg(DATABASE)
        .output()
        .context("starting pgbench (apt-get install -y postgresql-client)")?;
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let per_sec = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no tps in pgbench output: {text}"))?;
    let samples = pgbench_latencies(&logs)?;
    Ok(load::Load {
        per_sec,
        requests: samples.len() as u64,
        latency: load::Latency::of(samples, clients, elapsed.min(Duration::from_secs(seconds))),
    })
}

/// The transaction latencies of pgbench's per-transaction logs: the third field of each line
/// (microseconds; "client_id transaction_no time script_no time_epoch time_us").
fn pgbench_latencies(logs: &Path) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::new();
    for entry in std::fs::read_dir(logs)? {
        let text = std::fs::read_to_string(entry?.path())?;
        for line in text.lines() {
            let micros: u64 = line
                .split_whitespace()
                .nth(2)
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("unreadable pgbench log line {line:?}"))?;
            samples.push(Duration::from_micros(micros));
        }
    }
    anyhow::ensure!(!samples.is_empty(), "pgbench wrote no transaction log");
    Ok(samples)
}

struct StopPostgres<'a>(&'a LocalPostgres);

impl Drop for StopPostgres<'_> {
    fn drop(&mut self) {
        let _ = self.0.stop("immediate");
    }
}

struct ServerProcess(Child);

impl ServerProcess {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
