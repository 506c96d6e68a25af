//! End-to-end benchmark: backlog drain of walstream against the two ceilings measured in the
//! same run on the same data: the raw slot read (pgwire-replication alone, no decoding) and the
//! raw JetStream publish of as many same-size messages with the same in-flight window; then
//! commit → ack latency at fixed write rates; then the peers (walstream, Debezium's connector
//! publishing to JetStream, the seeds' LISTEN/NOTIFY bridge) on one workload, each SIGKILLed
//! mid-run (pipeline/peers.rs). On nats-server 2.12.1+ the drain runs a second time with
//! `nats.transactions = "atomic"` (each transaction one atomic batch), from its own slot into its
//! own stream, after the first: its ratio to the first is quoted, the WAL warm for both.
//!
//! Run: `cargo bench --bench pipeline`. Sizes: WALSTREAM_BENCH_ROWS (1000000),
//! WALSTREAM_BENCH_TXS (200000), WALSTREAM_BENCH_RATES (1000,5000,20000),
//! WALSTREAM_BENCH_STEADY_SECS (10), WALSTREAM_BENCH_PEER_TXS (100000), WALSTREAM_BENCH_PEERS
//! (walstream,debezium,bridge; `none` skips them); WALSTREAM_BENCH_LATENCIES=path appends each
//! live event's reader, commit and stored (or arrival) times (Unix ns) there; WALSTREAM_BENCH_BINARY runs
//! another walstream build; WALSTREAM_BENCH_RESULTS writes the JSON elsewhere than
//! benches/results/pipeline-latest.json; WALSTREAM_BENCH_NATS_SERVERS=path,path runs every scenario and rate
//! on each nats-server binary in turn (2.9 and 2.15 side by side, say). Starts its own
//! PostgreSQL and nats-server for each scenario. Ceilings beside each drain: pgwire-replication
//! reading a slot, `pg_recvlogical` reading another (PostgreSQL's own client), async-nats
//! publishing with the same window and, on 2.14+, Synadia's fast publisher (jetstream-extra) in
//! one fast-ingest batch; on 2.14+ the drain runs again with `nats.fast_ingest = false`.

#[path = "common/cpu.rs"]
mod cpu;
#[path = "pipeline/live.rs"]
mod live;
#[path = "pipeline/peers.rs"]
mod peers;
#[path = "common/stats.rs"]
mod stats;

use std::future::IntoFuture;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::stream::FuturesOrdered;
use futures::{FutureExt as _, StreamExt};
use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent};
use stats::env_count;
use walstream::local::{free_port, LocalNats, LocalPostgres};

const DATABASE: &str = "bench";
const WINDOW: usize = 1024;
const TABLE: &str = "CREATE TABLE t_bench (id BIGINT PRIMARY KEY, amount NUMERIC(12,2), \
    name TEXT, created TIMESTAMPTZ, uid UUID, doc JSONB, tags TEXT[]);";
const ROW: &str = "g, g * 1.25, 'customer order number ' || g, now(), gen_random_uuid(), \
    jsonb_build_object('sku', 'W-' || g, 'qty', g % 7, 'price', 24.50), ARRAY['urgent', 'new']";

struct Servers {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    postgres: LocalPostgres,
    nats: LocalNats,
}

impl Drop for Servers {
    fn drop(&mut self) {
        let _ = self.postgres.stop("immediate");
    }
}

#[derive(Debug, serde::Serialize)]
struct Scenario {
    name: String,
    nats_server: String,
    changes: u64,
    walstream_per_sec: f64,
    walstream_peak_rss_mb: f64,
    raw_slot_read_per_sec: f64,
    /// PostgreSQL's own client reading a third slot to the same end, writing nothing.
    pg_recvlogical_per_sec: Option<f64>,
    /// The raw slot read of another slot that wakes for every message: how fast PostgreSQL
    /// sends to a reader with nothing else to do.
    raw_slot_read_waking_per_sec: f64,
    raw_publish_per_sec: f64,
    /// Synadia's fast publisher (jetstream-extra) storing as many messages in one fast-ingest
    /// batch (nats-server 2.14+).
    raw_fast_publish_per_sec: Option<f64>,
    mean_event_bytes: f64,
    /// CPU per change during walstream's drain, µs: the three processes share two cores, so
    /// their sum bounds the rate.
    cpu_us_per_change: DrainCpu,
    /// How walstream published in the main drain (`fast ingest` on nats-server 2.14+).
    publishing: &'static str,
    events_per_fast_batch: Option<f64>,
    /// The same drain with `nats.transactions = "atomic"` (nats-server 2.12.1+).
    atomic_per_sec: Option<f64>,
    atomic_cpu_us_per_change: Option<DrainCpu>,
    /// The same drain with `nats.fast_ingest = false` (nats-server 2.14+): every message
    /// acknowledged.
    classic_per_sec: Option<f64>,
    classic_cpu_us_per_change: Option<DrainCpu>,
}

/// The CPU a drain took: each process's per change (µs), and the share of the cores left idle
/// (the report's `cpu_us_per_change` keys, kept for the results already written).
#[derive(Debug, serde::Serialize)]
struct DrainCpu {
    walstream: f64,
    /// Of `walstream`, the time in the kernel (system calls, mostly socket reads and writes):
    /// what a leaner encoder or sink cannot reduce.
    walstream_kernel: f64,
    nats_server: f64,
    postgres: f64,
    /// Of all the cores' time during the drain, the share nothing used, %: a drain bound by
    /// the three processes' CPU leaves next to none; one that waits on itself leaves more.
    cores_idle_percent: f64,
}

async fn start_servers() -> anyhow::Result<Servers> {
    let dir = tempfile::Builder::new()
        .prefix("walstream-bench-")
        .tempdir()?;
    let postgres = LocalPostgres::init(dir.path(), free_port()?)?;
    postgres.start()?;
    postgres
        .execute("postgres", &format!("CREATE DATABASE {DATABASE}"))
        .await?;
    let mut nats = LocalNats::new(dir.path(), free_port()?, &[])?;
    nats.start()?;
    Ok(Servers {
        dir: dir.path().to_owned(),
        _dir: dir,
        postgres,
        nats,
    })
}

/// Sets up the table, walstream's slot and a second slot for the raw read, then commits the
/// backlog while nothing reads either slot.
async fn prepare(servers: &Servers, backlog: &[String]) -> anyhow::Result<()> {
    let setup = [
        TABLE,
        "CREATE PUBLICATION walstream FOR TABLE t_bench",
        "SELECT pg_create_logical_replication_slot('walstream', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('raw', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('atomic', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('classic', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('recvlogical', 'pgoutput')",
        "SELECT pg_create_logical_replication_slot('raw_waking', 'pgoutput')",
    ];
    // Vacuumed and checkpointed before anything is measured, so that autovacuum and the
    // backlog's checkpoint stay out of the drains' CPU. Not the whole story: with it, one
    // single-row drain in four still cost PostgreSQL 29 µs per change against 7 (session 20).
    let settle = ["VACUUM ANALYZE t_bench", "CHECKPOINT"];
    for statement in setup
        .iter()
        .copied()
        .chain(backlog.iter().map(String::as_str))
        .chain(settle)
    {
        servers.postgres.execute(DATABASE, statement).await?;
    }
    Ok(())
}

/// How walstream publishes in a drain, each from its own slot into its own stream.
#[derive(Clone, Copy)]
struct Mode {
    transactions: &'static str,
    fast_ingest: bool,
    slot: &'static str,
    stream: &'static str,
    prefix: &'static str,
}

const INDEPENDENT: Mode = Mode {
    transactions: "independent",
    fast_ingest: true,
    slot: "walstream",
    stream: "fraiseql_events",
    prefix: "fraiseql.mutation",
};

const ATOMIC: Mode = Mode {
    transactions: "atomic",
    fast_ingest: true,
    slot: "atomic",
    stream: "atomic_events",
    prefix: "atomic.mutation",
};

const CLASSIC: Mode = Mode {
    transactions: "independent",
    fast_ingest: false,
    slot: "classic",
    stream: "classic_events",
    prefix: "classic.mutation",
};

fn config(servers: &Servers, mode: Mode, metrics_port: u16) -> anyhow::Result<std::path::PathBuf> {
    let path = servers.dir.join(format!("walstream-{}.toml", mode.slot));
    std::fs::write(
        &path,
        format!(
            "[database]\nurl = \"{}\"\n[replication]\ntables = [\"public.t_bench\"]\n\
             slot = \"{slot}\"\nheartbeat_secs = 0\n[checkpoint]\npath = \"{}\"\n[nats]\n\
             url = \"{}\"\nstream_name = \"{stream}\"\nsubject_prefix = \"{prefix}\"\n\
             transactions = \"{transactions}\"\nfast_ingest = {fast_ingest}\n\
             max_inflight = {WINDOW}\n[nats.jetstream]\n\
             max_bytes = -1\nmax_msgs = -1\n[http]\nlisten = \"127.0.0.1:{metrics}\"\n[log]\n\
             level = \"warn\"\n",
            servers.postgres.url(DATABASE),
            servers
                .dir
                .join(format!("checkpoint-{}", mode.slot))
                .display(),
            servers.nats.url(),
            slot = mode.slot,
            stream = mode.stream,
            prefix = mode.prefix,
            transactions = mode.transactions,
            fast_ingest = mode.fast_ingest,
            metrics = metrics_port,
        ),
    )?;
    Ok(path)
}

fn peak_rss_mb(child: &Child) -> f64 {
    std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// `walstream stream` with the bench's config, its log in the servers' directory. The
/// binary is this build's, or `WALSTREAM_BENCH_BINARY` to compare another build on the same
/// run's servers and ceilings.
fn spawn_walstream(servers: &Servers, mode: Mode, metrics_port: u16) -> anyhow::Result<Child> {
    let config = config(servers, mode, metrics_port)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(servers.dir.join("walstream.log"))?;
    let binary = std::env::var_os("WALSTREAM_BENCH_BINARY")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_walstream").into());
    Ok(Command::new(binary)
        .args(["stream", "--config"])
        .arg(&config)
        .stderr(log)
        .spawn()?)
}

/// Kills a child process and reaps it.
fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The drain's numbers: changes/s, peak RSS, mean event size, CPU per change.
struct Drain {
    per_sec: f64,
    peak_rss_mb: f64,
    mean_bytes: f64,
    cpu: DrainCpu,
    /// Events per fast-ingest batch (`walstream_fast_batches_total`), when it published so.
    per_fast_batch: Option<f64>,
}

/// A counter's value from walstream's `/metrics` on `port`.
fn metric(port: u16, name: &str) -> anyhow::Result<f64> {
    use std::io::{Read, Write};
    let mut connection = std::net::TcpStream::connect(("127.0.0.1", port))?;
    connection.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut text = String::new();
    connection.read_to_string(&mut text)?;
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
        .ok_or_else(|| anyhow::anyhow!("walstream's /metrics has no {name}"))
}

/// CPU seconds so far of nats-server and of PostgreSQL (postmaster and backends).
fn server_cpu(servers: &Servers) -> anyhow::Result<(f64, f64)> {
    let nats = servers
        .nats
        .pid()
        .ok_or_else(|| anyhow::anyhow!("nats-server not running"))?;
    let postgres = servers
        .postgres
        .pid()
        .ok_or_else(|| anyhow::anyhow!("PostgreSQL not running"))?;
    Ok((cpu::cpu_seconds(nats)?, cpu::tree_cpu_seconds(postgres)?))
}

/// walstream from start to the last ack of `changes` events.
async fn run_walstream(servers: &Servers, changes: u64, mode: Mode) -> anyhow::Result<Drain> {
    let (nats_before, postgres_before) = server_cpu(servers)?;
    let machine_before = cpu::machine_ticks()?;
    let started = Instant::now();
    let metrics_port = free_port()?;
    let mut child = spawn_walstream(servers, mode, metrics_port)?;
    let js = jetstream::new(async_nats::connect(servers.nats.url()).await?);
    let (elapsed, bytes) = loop {
        if let Ok(mut stream) = js.get_stream(mode.stream).await {
            if let Ok(info) = stream.info().await {
                if info.state.messages >= changes {
                    break (started.elapsed(), info.state.bytes);
                }
            }
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!(
                "walstream exited early ({status}); see {}/walstream.log",
                servers.dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (nats_after, postgres_after) = server_cpu(servers)?;
    let machine_after = cpu::machine_ticks()?;
    let per_change = |seconds: f64| seconds * 1e6 / changes as f64;
    let busy = machine_after.0.saturating_sub(machine_before.0) as f64;
    let idle = machine_after.1.saturating_sub(machine_before.1) as f64;
    let cpu = DrainCpu {
        walstream: per_change(cpu::cpu_seconds(child.id())?),
        walstream_kernel: per_change(cpu::system_seconds(child.id())?),
        nats_server: per_change(nats_after - nats_before),
        postgres: per_change(postgres_after - postgres_before),
        cores_idle_percent: 100.0 * idle / (busy + idle).max(1.0),
    };
    let peak_rss_mb = peak_rss_mb(&child);
    let per_fast_batch = match metric(metrics_port, "walstream_fast_batches_total") {
        Ok(batches) if batches > 0.0 => Some(changes as f64 / batches),
        _ => None,
    };
    stop(&mut child);
    Ok(Drain {
        per_sec: changes as f64 / elapsed.as_secs_f64(),
        peak_rss_mb,
        mean_bytes: bytes as f64 / changes as f64,
        cpu,
        per_fast_batch,
    })
}

/// pgwire-replication alone: read `slot` until `changes` row messages, no decoding. With
/// `coalesce`, the thread rests 200 µs whenever nothing is ready, so PostgreSQL's messages
/// pile up in the socket and one read takes many; without, the reader wakes for every message
/// PostgreSQL sends, and the walsender pays a wake-up for each: with single-row transactions
/// that reader measured below walstream (and so does `pg_recvlogical`, which reads the same
/// way), 2–3 times slower than the coalescing one.
async fn raw_slot_read(
    servers: &Servers,
    slot: &str,
    changes: u64,
    coalesce: bool,
) -> anyhow::Result<f64> {
    let config = ReplicationConfig::new("127.0.0.1", "postgres", "", DATABASE, slot, "walstream")
        .with_port(servers.postgres.port)
        .with_tls(pgwire_replication::TlsConfig::disabled())
        .with_status_interval(Duration::from_secs(1));
    let started = Instant::now();
    let mut client = ReplicationClient::connect(config).await?;
    let mut rows = 0;
    let mut last_ack = Instant::now();
    while rows < changes {
        let next = match client.recv().now_or_never() {
            Some(next) => next,
            None if coalesce => {
                std::thread::sleep(Duration::from_micros(200));
                client.recv().await
            }
            None => client.recv().await,
        };
        match next? {
            Some(ReplicationEvent::XLogData { data, .. }) if data.first() == Some(&b'I') => {
                rows += 1
            }
            // Confirmed every 100 ms, as walstream does: each raise wakes the client's worker.
            Some(ReplicationEvent::Commit { end_lsn, .. })
                if last_ack.elapsed() > Duration::from_millis(100) =>
            {
                client.update_applied_lsn(end_lsn);
                last_ack = Instant::now();
            }
            Some(_) => {}
            None => anyhow::bail!("raw slot stream ended after {rows} rows"),
        }
    }
    let elapsed = started.elapsed();
    client.update_applied_lsn(pgwire_replication::Lsn(u64::MAX >> 1));
    let _ = client.shutdown().await;
    Ok(changes as f64 / elapsed.as_secs_f64())
}

/// The WAL's current insert position, as PostgreSQL writes an LSN.
async fn wal_end(servers: &Servers) -> anyhow::Result<String> {
    let (client, connection) =
        tokio_postgres::connect(&servers.postgres.url(DATABASE), tokio_postgres::NoTls).await?;
    let task = tokio::spawn(connection);
    let row = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?;
    drop(client);
    let _ = task.await;
    Ok(row.get(0))
}

/// `pg_recvlogical` reading the `recvlogical` slot to the WAL's current end, its output
/// thrown away; `None` when the machine has no pg_recvlogical.
fn pg_recvlogical_read(servers: &Servers, end: &str) -> anyhow::Result<Option<f64>> {
    let in_bin = std::env::var_os("WALSTREAM_PG_BIN")
        .map(|dir| Path::new(&dir).join("pg_recvlogical"))
        .filter(|path| path.exists());
    let Some(binary) = in_bin.or_else(|| {
        ["/usr/bin/pg_recvlogical"]
            .iter()
            .map(std::path::PathBuf::from)
            .find(|path| path.exists())
    }) else {
        eprintln!("no pg_recvlogical on this machine (apt install postgresql-client): skipped");
        return Ok(None);
    };
    let started = Instant::now();
    let status = Command::new(binary)
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", DATABASE])
        .args(["-p", &servers.postgres.port.to_string()])
        .args([
            "--slot",
            "recvlogical",
            "--start",
            "--no-loop",
            "-f",
            "/dev/null",
        ])
        .args(["-o", "proto_version=1", "-o", "publication_names=walstream"])
        .arg(format!("--endpos={end}"))
        .status()?;
    anyhow::ensure!(status.success(), "pg_recvlogical failed: {status}");
    Ok(Some(started.elapsed().as_secs_f64()))
}

/// jetstream-extra's `FastPublisher`: `changes` messages of `size` bytes, each with an id, in
/// one fast-ingest batch.
async fn raw_fast_publish(servers: &Servers, changes: u64, size: usize) -> anyhow::Result<f64> {
    use async_nats_for_jetstream_extra as nats;
    use jetstream_extra::batch_publish_fast::FastPublishExt;
    let js = nats::jetstream::new(nats::connect(servers.nats.url()).await?);
    js.create_stream(nats::jetstream::stream::Config {
        name: "raw_fast".into(),
        subjects: vec!["raw_fast.>".into()],
        max_bytes: -1,
        allow_batch_publish: true,
        ..Default::default()
    })
    .await?;
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    let mut batch = js.fast_publish().flow(u16::MAX).build()?;
    for n in 0..changes {
        let mut headers = nats::HeaderMap::new();
        headers.insert(
            walstream::nats::wire::MESSAGE_ID,
            format!("raw:{n}").as_str(),
        );
        batch
            .add_message(nats::jetstream::message::OutboundMessage {
                subject: "raw_fast.bench".into(),
                payload: payload.clone(),
                headers: Some(headers),
            })
            .await?;
    }
    let ack = batch.close().await?;
    anyhow::ensure!(
        ack.sequence == changes,
        "fast batch ended at {}",
        ack.sequence
    );
    Ok(changes as f64 / started.elapsed().as_secs_f64())
}

/// A stream `name` for subjects `name.>`, without limits.
async fn create_stream(
    js: &jetstream::Context,
    name: &str,
) -> anyhow::Result<jetstream::stream::Stream> {
    Ok(js
        .create_stream(jetstream::stream::Config {
            name: name.into(),
            subjects: vec![format!("{name}.>")],
            max_bytes: -1,
            ..Default::default()
        })
        .await?)
}

/// async-nats alone: `changes` messages of `size` bytes with `WINDOW` acks in flight.
async fn raw_publish(servers: &Servers, changes: u64, size: usize) -> anyhow::Result<f64> {
    let client = async_nats::connect(servers.nats.url()).await?;
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(WINDOW + 64)
        .build(client);
    create_stream(&js, "raw").await?;
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    let mut acks = FuturesOrdered::new();
    for n in 0..changes {
        if acks.len() >= WINDOW {
            acks.next().await.transpose()?;
        }
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.clone())
            .message_id(format!("raw:{n}"));
        acks.push_back(js.send_publish("raw.bench", publish).await?.into_future());
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    Ok(changes as f64 / started.elapsed().as_secs_f64())
}

async fn scenario(name: &str, changes: u64, backlog: Vec<String>) -> anyhow::Result<Scenario> {
    eprintln!("{name}: committing {changes} changes while nothing reads the slots…");
    let servers = start_servers().await?;
    prepare(&servers, &backlog).await?;
    // The raw read goes first, so that walstream, not the ceiling, meets the colder WAL.
    eprintln!("{name}: raw slot read…");
    let raw_slot_read_per_sec = raw_slot_read(&servers, "raw", changes, true).await?;
    let raw_slot_read_waking_per_sec =
        raw_slot_read(&servers, "raw_waking", changes, false).await?;
    let end = wal_end(&servers).await?;
    let pg_recvlogical_per_sec =
        pg_recvlogical_read(&servers, &end)?.map(|seconds| changes as f64 / seconds);
    eprintln!("{name}: walstream draining…");
    let drain = run_walstream(&servers, changes, INDEPENDENT).await?;
    let version = async_nats::connect(servers.nats.url())
        .await?
        .server_info()
        .version;
    let atomic = if walstream::nats::atomic_batches_with_ids(&version) {
        eprintln!("{name}: walstream draining again, atomic transactions…");
        Some(run_walstream(&servers, changes, ATOMIC).await?)
    } else {
        eprintln!("{name}: nats-server {version} has no atomic batches with ids: one drain");
        None
    };
    let classic = if walstream::nats::fast_ingest_batches(&version) {
        eprintln!("{name}: walstream draining again, every message acknowledged…");
        Some(run_walstream(&servers, changes, CLASSIC).await?)
    } else {
        None
    };
    eprintln!("{name}: raw JetStream publish…");
    let raw_publish_per_sec = raw_publish(&servers, changes, drain.mean_bytes as usize).await?;
    let raw_fast_publish_per_sec = if walstream::nats::fast_ingest_batches(&version) {
        eprintln!("{name}: raw fast-ingest publish…");
        Some(raw_fast_publish(&servers, changes, drain.mean_bytes as usize).await?)
    } else {
        None
    };
    Ok(Scenario {
        publishing: if walstream::nats::fast_ingest_batches(&version) {
            "fast ingest"
        } else {
            "chained"
        },
        events_per_fast_batch: drain.per_fast_batch,
        classic_per_sec: classic.as_ref().map(|c| c.per_sec),
        classic_cpu_us_per_change: classic.map(|c| c.cpu),
        nats_server: version,
        atomic_per_sec: atomic.as_ref().map(|a| a.per_sec),
        atomic_cpu_us_per_change: atomic.map(|a| a.cpu),
        name: name.to_owned(),
        changes,
        walstream_per_sec: drain.per_sec,
        walstream_peak_rss_mb: drain.peak_rss_mb,
        raw_slot_read_per_sec,
        pg_recvlogical_per_sec,
        raw_slot_read_waking_per_sec,
        raw_publish_per_sec,
        raw_fast_publish_per_sec,
        mean_event_bytes: drain.mean_bytes,
        cpu_us_per_change: drain.cpu,
    })
}

#[derive(serde::Serialize)]
struct Results {
    /// `kernel.sched_autogroup_enabled`, which decides the latency tails
    /// (`cpu::describe_scheduling`).
    sched_autogroup: Option<bool>,
    backlog: Vec<Scenario>,
    steady: Vec<live::Steady>,
    peers: Vec<peers::PeerRun>,
}

fn report(results: &Results) -> anyhow::Result<()> {
    println!("\n{}", cpu::describe_scheduling());
    println!("\n| scenario | nats-server | changes | walstream changes/s ({{publishing}}) | peak RSS | raw slot read/s | waking per message/s | pg_recvlogical/s | raw publish/s | raw fast-ingest publish/s | walstream / lower ceiling in its mode |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let rate = |r: Option<f64>| r.map_or_else(|| "–".to_owned(), |r| format!("{r:.0}"));
    for r in &results.backlog {
        let publish = r.raw_fast_publish_per_sec.unwrap_or(r.raw_publish_per_sec);
        let ceiling = r.raw_slot_read_per_sec.min(publish);
        println!(
            "| {} | {} | {} | {:.0} ({}) | {:.0} MB | {:.0} | {:.0} | {} | {:.0} | {} | {:.0}% |",
            r.name,
            r.nats_server,
            r.changes,
            r.walstream_per_sec,
            r.publishing,
            r.walstream_peak_rss_mb,
            r.raw_slot_read_per_sec,
            r.raw_slot_read_waking_per_sec,
            rate(r.pg_recvlogical_per_sec),
            r.raw_publish_per_sec,
            rate(r.raw_fast_publish_per_sec),
            100.0 * r.walstream_per_sec / ceiling
        );
    }
    println!("\n| scenario | nats-server | CPU per change during the drain: walstream | of which in the kernel | nats-server | PostgreSQL | sum | cores idle |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for r in &results.backlog {
        let c = &r.cpu_us_per_change;
        println!(
            "| {} | {} | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs | {:.0}% |",
            r.name,
            r.nats_server,
            c.walstream,
            c.walstream_kernel,
            c.nats_server,
            c.postgres,
            c.walstream + c.nats_server + c.postgres,
            c.cores_idle_percent
        );
    }
    println!("\n| scenario | nats-server | atomic transactions changes/s | atomic / independent | CPU per change, atomic: walstream | nats-server | PostgreSQL |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for r in &results.backlog {
        match (r.atomic_per_sec, &r.atomic_cpu_us_per_change) {
            (Some(rate), Some(c)) => println!(
                "| {} | {} | {rate:.0} | {:.0}% | {:.1} µs | {:.1} µs | {:.1} µs |",
                r.name,
                r.nats_server,
                100.0 * rate / r.walstream_per_sec,
                c.walstream,
                c.nats_server,
                c.postgres
            ),
            _ => println!(
                "| {} | {} | (no atomic batches before 2.12.1) | | | | |",
                r.name, r.nats_server
            ),
        }
    }
    println!("\n| scenario | nats-server | publishing | events per batch | changes/s | every message acknowledged: changes/s | ratio | nats-server CPU per change | every message acknowledged | walstream CPU per change | every message acknowledged |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &results.backlog {
        match (r.classic_per_sec, &r.classic_cpu_us_per_change) {
            (Some(rate), Some(c)) => println!(
                "| {} | {} | {} | {} | {:.0} | {rate:.0} | {:.0}% | {:.1} µs | {:.1} µs | {:.1} µs | {:.1} µs |",
                r.name,
                r.nats_server,
                r.publishing,
                r.events_per_fast_batch.map_or_else(|| "–".into(), |n| format!("{n:.1}")),
                r.walstream_per_sec,
                100.0 * r.walstream_per_sec / rate,
                r.cpu_us_per_change.nats_server,
                c.nats_server,
                r.cpu_us_per_change.walstream,
                c.walstream,
            ),
            _ => println!(
                "| {} | {} | {} | – | {:.0} | (no fast ingest before 2.14) | | | | | |",
                r.name, r.nats_server, r.publishing, r.walstream_per_sec
            ),
        }
    }
    println!("\n| reader | nats-server | writer rate | achieved | changes | bytes a message | commit → JetStream (raw: → read) p50 | p99 | p99.9 | max | peak RSS |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &results.steady {
        println!(
            "| {} | {} | {}/s | {:.0}/s | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.0} MB |",
            s.reader,
            s.nats_server,
            s.target_per_sec,
            s.achieved_per_sec,
            s.changes,
            s.bytes_per_message,
            s.p50_ms,
            s.p99_ms,
            s.p999_ms,
            s.max_ms,
            s.walstream_peak_rss_mb
        );
    }
    report_peers(&results.peers);
    // A run made for something else (a profile, say) keeps its figures out of the repo's.
    let file = match std::env::var_os("WALSTREAM_BENCH_RESULTS") {
        Some(path) => std::path::PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results/pipeline-latest.json"),
    };
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&file, serde_json::to_string_pretty(results)?)?;
    println!("\nwritten to {}", file.display());
    Ok(())
}

fn report_peers(runs: &[peers::PeerRun]) {
    let Some(first) = runs.first() else { return };
    println!(
        "\n| peer ({} single-row transactions, then {} more with a SIGKILL) | workload | changes/s | CPU per change: the peer | nats-server | PostgreSQL | peak RSS | lost | stored twice | a 10,000-byte row |",
        first.changes, first.committed_around_kill
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in runs {
        let c = &r.cpu_us_per_change;
        println!(
            "| {} | {} | {:.0} | {:.1} µs | {:.1} µs | {:.1} µs | {} | {} | {} | {} |",
            r.peer,
            r.workload,
            r.per_sec,
            c.peer,
            c.nats_server,
            c.postgres,
            r.peak_rss_mb
                .map_or_else(|| "–".to_owned(), |mb| format!("{mb:.0} MB")),
            r.lost,
            r.stored_twice,
            r.big_row
        );
    }
}

/// `WALSTREAM_BENCH_PEERS=walstream,debezium,bridge` (the default: all three); `none` skips them.
fn chosen_peers() -> anyhow::Result<Vec<peers::Peer>> {
    let Ok(list) = std::env::var("WALSTREAM_BENCH_PEERS") else {
        return Ok(peers::ALL.to_vec());
    };
    list.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty() && *name != "none")
        .map(|name| match name {
            "walstream" => Ok(peers::Peer::Walstream),
            "debezium" => Ok(peers::Peer::Debezium),
            "bridge" => Ok(peers::Peer::NotifyBridge),
            other => anyhow::bail!(
                "WALSTREAM_BENCH_PEERS: unknown peer {other:?}; the peers are walstream, debezium and bridge"
            ),
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing and expects no run.
    if !std::env::args().any(|arg| arg == "--bench") {
        return Ok(());
    }
    let rows = env_count("WALSTREAM_BENCH_ROWS", 1_000_000);
    let txs = env_count("WALSTREAM_BENCH_TXS", 200_000);
    // Single-threaded, as walstream runs: the ceilings get every advantage walstream has.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Several servers in one run: WALSTREAM_BENCH_NATS_SERVERS=path,path (each scenario and
    // rate on each), else the one the harness finds.
    let nats_servers: Vec<String> = std::env::var("WALSTREAM_BENCH_NATS_SERVERS")
        .map(|list| list.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    runtime.block_on(async {
        let mut backlog = Vec::new();
        let mut steady = Vec::new();
        for nats_server in nats_servers.iter().map(Some).chain(
            // The harness's own choice when no list is given.
            nats_servers.is_empty().then_some(None),
        ) {
            if let Some(path) = nats_server {
                // Read by LocalNats when each scenario starts its servers; nothing else runs
                // on another thread that reads the environment.
                std::env::set_var("WALSTREAM_NATS_SERVER", path);
            }
            run_on_one_server(rows, txs, &mut backlog, &mut steady).await?;
        }
        let mut peers = Vec::new();
        for peer in chosen_peers()? {
            peers.push(peers::run(peer, env_count("WALSTREAM_BENCH_PEER_TXS", 100_000)).await?);
        }
        report(&Results {
            sched_autogroup: cpu::autogroup_scheduling(),
            backlog,
            steady,
            peers,
        })
    })
}

/// Both backlog scenarios and every steady rate against the nats-server the harness finds.
async fn run_on_one_server(
    rows: u64,
    txs: u64,
    backlog: &mut Vec<Scenario>,
    steady: &mut Vec<live::Steady>,
) -> anyhow::Result<()> {
    {
        backlog.push(
            scenario(
                "one transaction",
                rows,
                vec![format!(
                    "INSERT INTO t_bench SELECT {ROW} FROM generate_series(1, {rows}) g"
                )],
            )
            .await?,
        );
        backlog.push(
            scenario(
                "single-row transactions",
                txs,
                vec![
                    format!(
                        "CREATE PROCEDURE fill() LANGUAGE plpgsql AS $$ BEGIN \
                         FOR g IN 1..{txs} LOOP INSERT INTO t_bench SELECT {ROW}; COMMIT; \
                         END LOOP; END $$"
                    ),
                    "CALL fill()".to_owned(),
                ],
            )
            .await?,
        );
        let seconds = env_count("WALSTREAM_BENCH_STEADY_SECS", 10);
        let rates =
            std::env::var("WALSTREAM_BENCH_RATES").unwrap_or_else(|_| "1000,5000,20000".into());
        let version = backlog
            .last()
            .map(|b| b.nats_server.clone())
            .unwrap_or_default();
        let rates: Vec<u64> = rates
            .split(',')
            .filter_map(|r| r.trim().parse().ok())
            .collect();
        if !rates.is_empty() {
            // The floors publish walstream's own event.
            let shape = live::event_shape().await?;
            for rate in rates {
                for mut measured in [
                    live::steady_raw(rate, seconds).await?,
                    live::steady_publish(rate, seconds, &shape).await?,
                    live::steady_relay(rate, seconds, &shape).await?,
                    live::steady(rate, seconds).await?,
                ] {
                    measured.nats_server = version.clone();
                    steady.push(measured);
                }
            }
        }
    }
    Ok(())
}
