//! GraphQL against pgbench, same machine, same concurrency: `createOrder` through walstream
//! against `SELECT fn_create_order(…)`, and `order(id)` against the `v_order` lookup.
//!
//! The lookup is also measured against a floor: a bare axum + tokio-postgres server answering
//! the same requests with the same statement and no GraphQL, in its own process on the same
//! runtime as `walstream serve`. What is between walstream and pgbench that any Rust HTTP
//! front end on this machine pays shows there.
//!
//! Run: `cargo bench --bench graphql` (WALSTREAM_BENCH_CLIENTS=8, WALSTREAM_BENCH_SECONDS=10;
//! WALSTREAM_BENCH_COMMAND=run measures the sidecar, streaming in the same process, instead
//! of `serve`; WALSTREAM_PG_BIN picks the PostgreSQL).
//! Starts its own PostgreSQL, nats-server and `walstream serve`; writes
//! `benches/results/graphql-latest.json`.

// Shared with the pipeline bench, which also uses what this one does not.
#[allow(dead_code)]
#[path = "common/cpu.rs"]
mod cpu;

use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpu::cpu_seconds;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use walstream::local::{free_port, wait_for_port, LocalNats, LocalPostgres};

const DATABASE: &str = "bench";
const SECRET: &str = "bench-secret";
const ORDERS: u64 = 10_000;
const EXAMPLE_SQL: &str = include_str!("../sql/example/schema.sql");

/// The UUID of pre-made order `k`, computable on both sides.
fn order_uuid(k: u64) -> String {
    format!("00000000-0000-0000-0000-{k:012}")
}

/// `serve` (GraphQL alone) or `run` (GraphQL and the pipeline in one process).
fn walstream_command() -> anyhow::Result<String> {
    let command = std::env::var("WALSTREAM_BENCH_COMMAND").unwrap_or_else(|_| "serve".into());
    match command.as_str() {
        "serve" | "run" => Ok(command),
        other => anyhow::bail!("WALSTREAM_BENCH_COMMAND={other}: expected serve or run"),
    }
}

fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, serde::Serialize)]
struct Comparison {
    workload: &'static str,
    clients: u64,
    seconds: u64,
    graphql_per_sec: f64,
    graphql_p50_ms: f64,
    graphql_p99_ms: f64,
    pgbench_per_sec: f64,
    /// pgbench running the transaction walstream sends (BEGIN, identity settings, statement,
    /// COMMIT): what the database alone allows for this request shape.
    pgbench_same_transaction_per_sec: f64,
    /// walstream's own CPU time (user + system) per GraphQL request: steadier than the rates
    /// on a shared machine, and the number to lower when walstream is the bottleneck.
    walstream_cpu_us_per_request: f64,
    ratio: f64,
    /// The bare axum + tokio-postgres server on the same requests (lookup only).
    floor: Option<Floor>,
}

#[derive(Debug, serde::Serialize)]
struct Floor {
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_request: f64,
    /// Of pgbench's rate.
    ratio: f64,
}

/// Argument that makes this binary the floor server instead of the benchmark.
const FLOOR_SERVER: &str = "--floor-server";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, port, url, pool_size] = args.as_slice() {
        if flag == FLOOR_SERVER {
            return floor::serve(port.parse()?, url, pool_size.parse()?);
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let clients = env_count("WALSTREAM_BENCH_CLIENTS", 8);
    let seconds = env_count("WALSTREAM_BENCH_SECONDS", 10);
    let dir = tempfile::Builder::new()
        .prefix("walstream-bench-gql-")
        .tempdir()?;
    let postgres = LocalPostgres::init(dir.path(), free_port()?)?;
    postgres.start()?;
    let _stop = StopPostgres(&postgres);
    postgres
        .execute("postgres", &format!("CREATE DATABASE {DATABASE}"))
        .await?;
    postgres.execute(DATABASE, EXAMPLE_SQL).await?;
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
    postgres
        .execute(DATABASE, "VACUUM ANALYZE tb_order")
        .await?;
    let mut nats = LocalNats::new(dir.path(), free_port()?, &[])?;
    nats.start()?;

    let port = free_port()?;
    let schema =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sql/example/schema.graphql");
    let config = dir.path().join("walstream.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{url}\"\n[replication]\ntables = [\"public.tb_order\"]\n\
             [nats]\nurl = \"{nats}\"\n[http]\nlisten = \"\"\n\
             [graphql]\nschema = \"{schema}\"\nlisten = \"127.0.0.1:{port}\"\npool_size = {clients}\n\
             [graphql.auth]\nhs256_secret = \"{SECRET}\"\n[log]\nlevel = \"warn\"\n",
            url = postgres.url(DATABASE),
            nats = nats.url(),
            schema = schema.display(),
        ),
    )?;
    let mut server = ServerProcess(
        Command::new(env!("CARGO_BIN_EXE_walstream"))
            .args([walstream_command()?.as_str(), "--config"])
            .arg(&config)
            .spawn()?,
    );
    wait_for_port(port, Duration::from_secs(30))?;
    // No role claim: the requests run as the pool's user, as pgbench does, so both sides ask
    // PostgreSQL for the same work (row-level security would add its own cost to ours only).
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "bench", "user_pk": 1, "exp": jsonwebtoken::get_current_timestamp() + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )?;
    // The npm builds of PostgreSQL ship no pgbench: any pgbench drives any server.
    let pgbench = Some(LocalPostgres::find_binaries()?.join("pgbench"))
        .filter(|path| path.exists())
        .unwrap_or_else(|| "pgbench".into());
    let pg_port = postgres
        .url(DATABASE)
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .unwrap_or("5432")
        .to_owned();

    let mut results = Vec::new();
    let lookup = |client: u64, i: u64| {
        serde_json::json!({"query": "query($id: ID!) { order(id: $id) { id identifier total status createdAt } }",
                           "variables": {"id": order_uuid(1 + spread(client, i))}})
        .to_string()
    };
    let create = |client: u64, i: u64| {
        serde_json::json!({"query": "mutation($i: CreateOrderInput!) { createOrder(input: $i) { id identifier total status createdAt } }",
                           "variables": {"i": {"identifier": format!("gql-{client}-{i}"), "total": "49.99"}}})
        .to_string()
    };
    let settings =
        "SELECT set_config('request.jwt.claims', '{\"sub\": \"bench\", \"user_pk\": 1}', true), \
                    set_config('role', 'none', true);";
    let floor_port = free_port()?;
    let mut floor_server = ServerProcess(
        Command::new(std::env::current_exe()?)
            .args([
                FLOOR_SERVER,
                &floor_port.to_string(),
                &postgres.url(DATABASE),
            ])
            .arg(clients.to_string())
            .spawn()?,
    );
    wait_for_port(floor_port, Duration::from_secs(30))?;
    for (workload, body, script, transaction) in [
        (
            "order(id) vs SELECT data FROM v_order WHERE id = $1",
            &lookup as &dyn Fn(u64, u64) -> String,
            format!(
                "\\set k random(1, {ORDERS})\nSELECT data FROM v_order WHERE id = ('00000000-0000-0000-0000-' || lpad(:k::text, 12, '0'))::uuid;\n"
            ),
            // A session that already carries the caller's identity reads with the one statement.
            format!(
                "\\set k random(1, {ORDERS})\nSELECT data FROM v_order WHERE id = ('00000000-0000-0000-0000-' || lpad(:k::text, 12, '0'))::uuid;\n"
            ),
        ),
        (
            "createOrder vs SELECT fn_create_order(...)",
            &create as &dyn Fn(u64, u64) -> String,
            "SELECT fn_create_order(gen_random_uuid()::text, 1, 49.99);\n".to_owned(),
            format!(
                "BEGIN;\n{settings}\nSELECT fn_create_order(gen_random_uuid()::text, 1, 49.99);\n\
                 SELECT data FROM v_order WHERE id = (SELECT id FROM tb_order ORDER BY pk_order DESC LIMIT 1);\nCOMMIT;\n"
            ),
        ),
    ] {
        let script_path = dir.path().join("script.sql");
        std::fs::write(&script_path, script)?;
        let pgbench_rate = run_pgbench(&pgbench, &pg_port, &script_path, clients, seconds)?;
        std::fs::write(&script_path, transaction)?;
        let same_transaction = run_pgbench(&pgbench, &pg_port, &script_path, clients, seconds)?;
        let cpu_before = cpu_seconds(server.0.id())?;
        let (graphql_rate, p50, p99) = run_graphql(port, &token, clients, seconds, body).await?;
        let cpu = cpu_seconds(server.0.id())? - cpu_before;
        let walstream_cpu_us_per_request = cpu * 1e6 / (graphql_rate * seconds as f64);
        let floor = if workload.starts_with("order(id)") {
            let cpu_before = cpu_seconds(floor_server.0.id())?;
            let (per_sec, p50_ms, p99_ms) =
                run_graphql(floor_port, &token, clients, seconds, body).await?;
            let cpu = cpu_seconds(floor_server.0.id())? - cpu_before;
            Some(Floor {
                per_sec,
                p50_ms,
                p99_ms,
                cpu_us_per_request: cpu * 1e6 / (per_sec * seconds as f64),
                ratio: per_sec / pgbench_rate,
            })
        } else {
            None
        };
        let comparison = Comparison {
            workload,
            clients,
            seconds,
            graphql_per_sec: graphql_rate,
            graphql_p50_ms: p50,
            graphql_p99_ms: p99,
            pgbench_per_sec: pgbench_rate,
            pgbench_same_transaction_per_sec: same_transaction,
            walstream_cpu_us_per_request,
            ratio: graphql_rate / pgbench_rate,
            floor,
        };
        println!(
            "{workload}: GraphQL {graphql_rate:.0}/s (p50 {p50:.2} ms, p99 {p99:.2} ms), \
             pgbench {pgbench_rate:.0}/s: {:.0}%; pgbench with walstream's transaction shape {same_transaction:.0}/s; \
             walstream CPU {walstream_cpu_us_per_request:.0} µs/request",
            comparison.ratio * 100.0
        );
        if let Some(floor) = &comparison.floor {
            println!(
                "  floor, bare axum + tokio-postgres: {:.0}/s (p50 {:.2} ms, p99 {:.2} ms): {:.0}% \
                 of pgbench; its CPU {:.0} µs/request",
                floor.per_sec,
                floor.p50_ms,
                floor.p99_ms,
                floor.ratio * 100.0,
                floor.cpu_us_per_request
            );
        }
        results.push(comparison);
    }
    floor_server.stop();
    server.stop();
    nats.kill();
    let out = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("graphql-latest.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    Ok(())
}

fn run_pgbench(
    pgbench: &std::path::Path,
    port: &str,
    script: &std::path::Path,
    clients: u64,
    seconds: u64,
) -> anyhow::Result<f64> {
    let output = Command::new(pgbench)
        .args([
            "-n",
            "-M",
            "prepared",
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-U",
            "postgres",
        ])
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            &seconds.to_string(),
            "-f",
        ])
        .arg(script)
        .arg(DATABASE)
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no tps in pgbench output: {text}"))
}

/// `clients` keep-alive connections, each sending requests one after another for `seconds`.
async fn run_graphql(
    port: u16,
    token: &str,
    clients: u64,
    seconds: u64,
    body: &dyn Fn(u64, u64) -> String,
) -> anyhow::Result<(f64, f64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    // Bodies are made up front so the load generator spends its time on the wire. Each
    // client has more than it can send in the run, so created identifiers never repeat.
    let per_client = 400_000 / clients.max(1);
    for client in 0..clients {
        let bodies: Vec<String> = (0..per_client).map(|i| body(client, i)).collect();
        let stop = stop.clone();
        let counter = counter.clone();
        let token = token.to_owned();
        tasks.push(tokio::spawn(async move {
            client_loop(port, &token, bodies, stop, counter).await
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d: &Duration| d.as_secs_f64() * 1000.0)
    };
    Ok((
        counter.load(Ordering::Relaxed) as f64 / elapsed,
        percentile(0.5),
        percentile(0.99),
    ))
}

/// Spreads lookups over the pre-made orders.
fn spread(client: u64, i: u64) -> u64 {
    (client * 7919 + i * 104_729) % ORDERS
}

async fn client_loop(
    port: u16,
    token: &str,
    bodies: Vec<String>,
    stop: Arc<AtomicBool>,
    counter: Arc<AtomicU64>,
) -> anyhow::Result<Vec<Duration>> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut latencies = Vec::new();
    let mut line = String::new();
    for body in bodies.iter().cycle() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let request = format!(
            "POST /graphql HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let sent = Instant::now();
        write.write_all(request.as_bytes()).await?;
        let mut length = 0;
        let mut status_ok = false;
        loop {
            line.clear();
            read.read_line(&mut line).await?;
            if line.starts_with("HTTP/1.1 ") {
                status_ok = line.starts_with("HTTP/1.1 200");
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse()?;
            }
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        let mut response = vec![0; length];
        read.read_exact(&mut response).await?;
        anyhow::ensure!(
            status_ok
                && !response.starts_with(b"{\"errors\"")
                && !contains(&response, b"\"errors\""),
            "request failed: {}",
            String::from_utf8_lossy(&response)
        );
        latencies.push(sent.elapsed());
        counter.fetch_add(1, Ordering::Relaxed);
    }
    Ok(latencies)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
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

/// The floor server: HTTP, the request's JSON, one pooled prepared statement, the row's `data`
/// as the response; no GraphQL, no identity.
mod floor {
    use axum::extract::State;
    use axum::http::{header, StatusCode};
    use axum::response::{IntoResponse, Response};
    use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
    use tokio_postgres::NoTls;

    pub fn serve(port: u16, url: &str, pool_size: usize) -> anyhow::Result<()> {
        let config: tokio_postgres::Config = url.parse()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let manager = Manager::from_config(
                config,
                NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            let pool = Pool::builder(manager).max_size(pool_size).build()?;
            let app = axum::Router::new()
                .route("/graphql", axum::routing::post(lookup))
                .with_state(pool);
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
            axum::serve(listener, app).await?;
            Ok(())
        })
    }

    async fn lookup(State(pool): State<Pool>, body: axum::body::Bytes) -> Response {
        match answer(&pool, &body).await {
            Ok(data) => (
                [(header::CONTENT_TYPE, "application/json")],
                format!("{{\"data\":{{\"order\":{data}}}}}"),
            )
                .into_response(),
            Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
        }
    }

    async fn answer(pool: &Pool, body: &[u8]) -> anyhow::Result<String> {
        let request: serde_json::Value = serde_json::from_slice(body)?;
        let id = request["variables"]["id"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no id"))?;
        let client = pool.get().await?;
        let statement = client
            .prepare_cached("SELECT data::text FROM v_order WHERE id = $1::text::uuid")
            .await?;
        let row = client.query_one(&statement, &[&id]).await?;
        Ok(row.get(0))
    }
}
