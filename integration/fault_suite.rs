//! The randomized fault suite: a seeded writer commits a random workload over three tables
//! while walstream, nats-server, PostgreSQL, the links between them and walstream's disk fail
//! at random moments; then an oracle checks the whole stream against what PostgreSQL committed.
//!
//! `WALSTREAM_FAULT_SECS` (default 60) sets how long faults are injected and
//! `WALSTREAM_FAULT_SEED` replays a run; a soak by hand:
//! `WALSTREAM_FAULT_SECS=1800 cargo test --release --test fault_suite -- --nocapture`.

mod harness;
#[path = "fault_suite/oracle.rs"]
mod oracle;
#[path = "fault_suite/other_publisher.rs"]
mod other_publisher;
#[path = "fault_suite/workload.rs"]
mod workload;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream;
use harness::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillWalstream,
    StopWalstream,
    KillNats,
    RestartPostgresFast,
    RestartPostgresImmediate,
    CutPostgresLink,
    CutNatsLink,
    FillCheckpointDisk,
    DamageCheckpoint,
}

const FAULTS: [Fault; 9] = [
    Fault::KillWalstream,
    Fault::StopWalstream,
    Fault::KillNats,
    Fault::RestartPostgresFast,
    Fault::RestartPostgresImmediate,
    Fault::CutPostgresLink,
    Fault::CutNatsLink,
    Fault::FillCheckpointDisk,
    Fault::DamageCheckpoint,
];

/// How often each fault is drawn, out of the sum: walstream's own death is the commonest.
fn weight(fault: Fault) -> u32 {
    match fault {
        Fault::KillWalstream => 4,
        Fault::CutPostgresLink | Fault::CutNatsLink | Fault::KillNats => 2,
        _ => 1,
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// walstream restarted the way a supervisor (systemd, Kubernetes) would whenever it exits on
/// its own; a checkpoint it refuses as damaged is moved away first, as its error tells the
/// operator to.
struct Supervised {
    walstream: Walstream,
    config: PathBuf,
    log: PathBuf,
    checkpoint: PathBuf,
    exits: Vec<String>,
}

impl Supervised {
    fn start(config: PathBuf, log: PathBuf, checkpoint: PathBuf) -> anyhow::Result<Self> {
        Ok(Self {
            walstream: Walstream::start(&config, &log)?,
            config,
            log,
            checkpoint,
            exits: Vec::new(),
        })
    }

    fn restart(&mut self) -> anyhow::Result<()> {
        self.walstream = Walstream::start(&self.config, &self.log)?;
        Ok(())
    }

    /// Waits `duration`, restarting walstream whenever it has exited.
    async fn supervise_for(&mut self, duration: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + duration;
        loop {
            if let Some(status) = self.walstream.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let last = log
                    .lines()
                    .rev()
                    .find(|l| l.contains("ERROR"))
                    .unwrap_or("");
                self.exits.push(format!("{status}: {last:.200}"));
                if last.contains("Move the directory away") {
                    std::fs::remove_dir_all(&self.checkpoint)?;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                self.restart()?;
            }
            if Instant::now() >= until {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the stream holds `count` messages, or has stopped growing for `quiet`
    /// (the oracle then counts what is missing).
    async fn catch_up(
        &mut self,
        js: &jetstream::Context,
        count: u64,
        quiet: Duration,
    ) -> anyhow::Result<()> {
        let (mut last, mut since) = (0, Instant::now());
        loop {
            let stored = match js.get_stream(STREAM).await {
                Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
                Err(_) => 0,
            };
            if stored >= count {
                return Ok(());
            }
            if stored != last {
                (last, since) = (stored, Instant::now());
            } else if since.elapsed() > quiet {
                eprintln!("fault suite: the stream stopped at {stored} of {count} messages");
                return Ok(());
            }
            self.supervise_for(Duration::from_millis(500)).await?;
        }
    }
}

/// Servers with the three tables, walstream's config (database and NATS URLs as given, the
/// checkpoint at `checkpoint`) and the oracle's slot beside walstream's.
async fn prepare(
    cluster: &Cluster,
    database_url: &str,
    nats_url: &str,
    checkpoint: &std::path::Path,
    extra: &str,
) -> anyhow::Result<Supervised> {
    cluster.sql(workload::TABLES).await?;
    let config = cluster.config_with(
        database_url,
        &["public.t_a", "public.t_b", "public.t_c"],
        "receive_timeout_secs = 5",
        extra,
    )?;
    let text = std::fs::read_to_string(&config)?
        .replace(&cluster.nats.url(), nats_url)
        .replace(
            &cluster.dir.path().join("checkpoint").display().to_string(),
            &checkpoint.display().to_string(),
        );
    std::fs::write(&config, text)?;
    let walstream = Supervised::start(config, cluster.log_path(), checkpoint.to_owned())?;
    wait_for_slot(cluster).await?;
    cluster
        .sql(&format!(
            "SELECT pg_create_logical_replication_slot('{}', 'test_decoding')",
            oracle::SLOT
        ))
        .await?;
    Ok(walstream)
}

/// After the faults: lets walstream catch up, judges the whole stream against the oracle
/// slot and what the other publisher published, prints what happened, and stops walstream,
/// which must exit cleanly.
async fn verify(
    cluster: &Cluster,
    js: &jetstream::Context,
    walstream: &mut Supervised,
    written: &workload::Written,
    others: &other_publisher::Published,
) -> anyhow::Result<(oracle::Verdict, std::process::ExitStatus)> {
    let client = cluster.client().await?;
    let committed = oracle::committed(&client)
        .await
        .context("reading the oracle slot")?;
    let expected: usize = committed.iter().map(|t| t.changes.len()).sum();
    walstream
        .catch_up(
            js,
            (expected + others.stored.len()) as u64,
            Duration::from_secs(60),
        )
        .await?;
    // A duplicate, if one were coming, would land in these seconds.
    walstream.supervise_for(Duration::from_secs(3)).await?;
    let mut messages = read_stream(js).await.context("reading the stream")?;
    // The other publisher's unanswered messages may be there too, and count above.
    let own = |messages: &[Stored]| {
        messages
            .iter()
            .filter(|m| m.headers.get(other_publisher::MARK).is_none())
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while own(&messages) < expected && Instant::now() < deadline {
        walstream.supervise_for(Duration::from_secs(3)).await?;
        messages = read_stream(js).await.context("reading the stream")?;
    }
    let verdict = oracle::judge(
        &committed,
        &messages,
        &workload::table_rows(&client).await?,
        others,
    );
    let status = walstream
        .walstream
        .terminate(Duration::from_secs(60))
        .context("stopping walstream")?;
    eprintln!(
        "fault suite: walstream exited on its own {} times{}",
        walstream.exits.len(),
        walstream
            .exits
            .iter()
            .map(|e| format!("\n  {e}"))
            .collect::<String>()
    );
    eprintln!(
        "fault suite: writer attempted {} transactions, {} acknowledged, {} failed; \
         {} messages in the stream",
        written.attempted,
        written.acknowledged,
        written.failed,
        messages.len()
    );
    eprintln!(
        "fault suite: another publisher published {:?}; {} acknowledged as stored, {} copies \
         of walstream's messages dropped by JetStream as duplicates",
        others.kinds,
        others.stored.len(),
        others.copies_dropped
    );
    eprintln!("fault suite: walstream's log: {}", evidence(cluster));
    eprintln!("fault suite: {verdict}");
    if !verdict.passed() || std::env::var_os("WALSTREAM_FAULT_KEEP_LOG").is_some() {
        keep_log(cluster, "verified");
    }
    Ok((verdict, status))
}

fn seed() -> u64 {
    let seed = env_u64("WALSTREAM_FAULT_SEED").unwrap_or_else(|| fastrand::u64(..));
    eprintln!("fault suite: seed {seed} (replay: WALSTREAM_FAULT_SEED={seed})");
    seed
}

/// The servers, the two cuttable links, walstream's checkpoint disk, and walstream.
struct Chaos {
    /// First, as fields drop in order: unmounted before the cluster's directory is removed,
    /// which fails on a mounted disk and then leaves the whole directory behind.
    disk: Option<Tmpfs>,
    cluster: Cluster,
    postgres_link: Blackhole,
    nats_link: Blackhole,
    walstream: Supervised,
    rng: fastrand::Rng,
    injected: BTreeMap<Fault, u32>,
}

impl Chaos {
    async fn start(seed: u64) -> anyhow::Result<Self> {
        let cluster = Cluster::start().await?;
        let postgres_link = Blackhole::start(cluster.postgres.port).await?;
        let nats_link = Blackhole::start(cluster.nats.port).await?;
        // The checkpoint on its own small disk, to fill; without root (no mount) that fault
        // is left out and the run says so.
        let disk_dir = cluster.dir.path().join("checkpoint-disk");
        let disk = Tmpfs::mount(&disk_dir, "64m")
            .inspect_err(|e| eprintln!("fault suite: no checkpoint disk to fill ({e:#})"))
            .ok();
        let walstream = prepare(
            &cluster,
            &format!(
                "postgres://postgres@127.0.0.1:{}/{DATABASE}",
                postgres_link.port
            ),
            &format!("nats://127.0.0.1:{}", nats_link.port),
            &disk_dir.join("checkpoint"),
            "",
        )
        .await?;
        Ok(Self {
            cluster,
            disk,
            postgres_link,
            nats_link,
            walstream,
            rng: fastrand::Rng::with_seed(seed),
            injected: BTreeMap::new(),
        })
    }

    fn available(&self) -> Vec<Fault> {
        FAULTS
            .into_iter()
            .filter(|f| *f != Fault::FillCheckpointDisk || self.disk.is_some())
            .collect()
    }

    /// Every available fault once in a seeded order, then weighted draws until `deadline`.
    async fn inject_until(&mut self, deadline: Instant) -> anyhow::Result<()> {
        let mut first_round = self.available();
        self.rng.shuffle(&mut first_round);
        while Instant::now() < deadline {
            let pause = Duration::from_millis(self.rng.u64(800..2500));
            self.walstream.supervise_for(pause).await?;
            let fault = match first_round.pop() {
                Some(fault) => fault,
                None => self.draw(),
            };
            self.inject(fault).await?;
            *self.injected.entry(fault).or_default() += 1;
        }
        Ok(())
    }

    fn draw(&mut self) -> Fault {
        let available = self.available();
        let total: u32 = available.iter().map(|f| weight(*f)).sum();
        let mut pick = self.rng.u32(0..total);
        for fault in &available {
            if pick < weight(*fault) {
                return *fault;
            }
            pick -= weight(*fault);
        }
        Fault::KillWalstream
    }

    fn pause(&mut self, ms: std::ops::Range<u64>) -> Duration {
        Duration::from_millis(self.rng.u64(ms))
    }

    async fn inject(&mut self, fault: Fault) -> anyhow::Result<()> {
        match fault {
            Fault::KillWalstream => {
                self.walstream.walstream.kill();
                tokio::time::sleep(self.pause(0..1000)).await;
                self.walstream.restart()?;
            }
            Fault::StopWalstream => {
                let status = self
                    .walstream
                    .walstream
                    .terminate(Duration::from_secs(60))?;
                if !status.success() {
                    self.walstream.exits.push(format!("SIGTERM: {status}"));
                }
                self.walstream.restart()?;
            }
            Fault::KillNats => {
                self.cluster.nats.kill();
                let down = self.pause(500..5000);
                self.walstream.supervise_for(down).await?;
                self.cluster.nats.start()?;
            }
            Fault::RestartPostgresFast | Fault::RestartPostgresImmediate => {
                let mode = if fault == Fault::RestartPostgresFast {
                    "fast"
                } else {
                    "immediate"
                };
                self.cluster.postgres.stop(mode)?;
                let down = self.pause(200..2000);
                self.walstream.supervise_for(down).await?;
                self.cluster.postgres.start()?;
            }
            Fault::CutPostgresLink | Fault::CutNatsLink => {
                let link = if fault == Fault::CutPostgresLink {
                    &self.postgres_link
                } else {
                    &self.nats_link
                };
                link.freeze();
                // Past the receive watchdog (5 s) now and then.
                let cut = self.pause(1000..9000);
                let result = self.walstream.supervise_for(cut).await;
                self.postgres_link.thaw();
                self.nats_link.thaw();
                result?;
            }
            Fault::FillCheckpointDisk => {
                let filler = self.walstream.checkpoint.with_file_name("filler");
                if let Some(disk) = &self.disk {
                    disk.fill(&filler);
                }
                // Half the time walstream also restarts into the full disk: it cannot open its
                // store and exits until there is space again.
                if self.rng.bool() {
                    self.walstream.walstream.kill();
                    self.walstream.restart()?;
                }
                let full = self.pause(1000..4000);
                let result = self.walstream.supervise_for(full).await;
                std::fs::remove_file(&filler)?;
                result?;
            }
            Fault::DamageCheckpoint => {
                self.walstream.walstream.kill();
                let checkpoint = &self.walstream.checkpoint;
                if checkpoint.exists() {
                    std::fs::write(checkpoint.join("CURRENT"), b"garbage\n")?;
                }
                self.walstream.restart()?;
            }
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn random_faults_lose_duplicate_and_reorder_nothing() -> anyhow::Result<()> {
    let seed = seed();
    let seconds = env_u64("WALSTREAM_FAULT_SECS").unwrap_or(60);
    let mut chaos = Chaos::start(seed).await?;
    chaos
        .cluster
        .allow(Duration::from_secs(seconds) + Duration::from_secs(600));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(workload::write(chaos.cluster.db_url(), seed, stop.clone()));
    // Straight to nats-server, not through walstream's cuttable link.
    let other = tokio::spawn(other_publisher::publish(
        chaos.cluster.nats.url(),
        seed,
        stop.clone(),
    ));
    let started = Instant::now();
    chaos
        .inject_until(started + Duration::from_secs(seconds))
        .await?;
    stop.store(true, Ordering::SeqCst);
    let written = writer.await?;
    let others = other.await?;
    eprintln!("fault suite: {seconds} s of faults: {:?}", chaos.injected);
    let js = chaos.cluster.jetstream().await?;
    let (verdict, status) =
        verify(&chaos.cluster, &js, &mut chaos.walstream, &written, &others).await?;
    assert!(
        verdict.passed(),
        "{verdict}\nreplay with WALSTREAM_FAULT_SEED={seed}"
    );
    assert!(status.success(), "walstream's final SIGTERM: {status}");
    assert_published_as_the_server_calls_for(&js, &chaos.cluster.log_path(), false)?;
    let kinds = chaos.injected.len();
    assert!(
        kinds >= chaos.available().len(),
        "only {kinds} kinds of fault were injected; give it more time (WALSTREAM_FAULT_SECS)"
    );
    Ok(())
}

/// Three nats-server processes clustered on loopback.
struct NatsCluster {
    nodes: Vec<walstream::local::LocalNats>,
    names: Vec<String>,
}

impl NatsCluster {
    fn start(dir: &std::path::Path) -> anyhow::Result<Self> {
        let cluster_ports = (0..3)
            .map(|_| walstream::local::free_port())
            .collect::<Result<Vec<_>, _>>()?;
        let mut nodes = Vec::new();
        let mut names = Vec::new();
        for (i, port) in cluster_ports.iter().enumerate() {
            let routes = cluster_ports
                .iter()
                .filter(|p| *p != port)
                .map(|p| format!("nats://127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(",");
            let name = format!("n{i}");
            let node_dir = dir.join(&name);
            std::fs::create_dir_all(&node_dir)?;
            let listen = format!("nats://127.0.0.1:{port}");
            let mut node = walstream::local::LocalNats::new(
                &node_dir,
                walstream::local::free_port()?,
                &[
                    "-n",
                    &name,
                    "--cluster_name",
                    "walstream",
                    "--cluster",
                    &listen,
                    "--routes",
                    &routes,
                ],
            )?;
            node.start()?;
            nodes.push(node);
            names.push(name);
        }
        Ok(Self { nodes, names })
    }

    fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn jetstream(&self) -> anyhow::Result<jetstream::Context> {
        let servers: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .map(|n| n.url().parse())
            .collect::<Result<_, _>>()?;
        Ok(jetstream::new(async_nats::connect(servers).await?))
    }

    /// Waits until JetStream can place a stream on all three nodes.
    async fn wait_ready(&self, js: &jetstream::Context) -> anyhow::Result<()> {
        let config = jetstream::stream::Config {
            name: "probe".into(),
            subjects: vec!["probe.>".into()],
            num_replicas: 3,
            ..Default::default()
        };
        eventually(Duration::from_secs(60), "a JetStream cluster", || async {
            js.create_stream(config.clone()).await.is_ok()
        })
        .await?;
        js.delete_stream("probe").await?;
        Ok(())
    }

    /// The node leading `stream` now, once it has a leader (newer servers report a replicated
    /// stream's leader only once its group has elected one).
    async fn leader(&self, js: &jetstream::Context, stream: &str) -> anyhow::Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let leader = loop {
            let info = js.get_stream(stream).await?.info().await?.clone();
            match info.cluster.and_then(|c| c.leader) {
                Some(leader) => break leader,
                None if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                None => anyhow::bail!("stream {stream} has no leader after 30 s"),
            }
        };
        self.names
            .iter()
            .position(|n| *n == leader)
            .ok_or_else(|| anyhow::anyhow!("unknown leader {leader}"))
    }
}

/// Three nodes streamed to by walstream (a replicated stream), with the workload and another
/// publisher running.
struct ClusterRun {
    seed: u64,
    cluster: Cluster,
    nats: NatsCluster,
    js: jetstream::Context,
    walstream: Supervised,
    stop: Arc<AtomicBool>,
    writer: tokio::task::JoinHandle<workload::Written>,
    other: tokio::task::JoinHandle<other_publisher::Published>,
    verified: bool,
}

/// A run that failed before its verdict (a node that would not start, a leader never elected,
/// walstream stopping) keeps walstream's log, as a failed verdict does.
impl Drop for ClusterRun {
    fn drop(&mut self) {
        if !self.verified || std::thread::panicking() {
            keep_log(&self.cluster, &format!("seed-{}", self.seed));
        }
    }
}

impl ClusterRun {
    /// Starts it all, walstream given the URLs `given` picks.
    async fn start(given: impl FnOnce(&NatsCluster) -> String) -> anyhow::Result<Self> {
        let seed = seed();
        let cluster = Cluster::start().await?;
        let nats = NatsCluster::start(&cluster.dir.path().join("nats-cluster"))?;
        let js = nats.jetstream().await?;
        nats.wait_ready(&js)
            .await
            .context("the NATS cluster did not form")?;
        let walstream = prepare(
            &cluster,
            &cluster.db_url(),
            &given(&nats),
            &cluster.dir.path().join("checkpoint"),
            "[nats.jetstream]\nreplicas = 3",
        )
        .await?;
        let stop = Arc::new(AtomicBool::new(false));
        let writer = tokio::spawn(workload::write(cluster.db_url(), seed, stop.clone()));
        let other = tokio::spawn(other_publisher::publish(nats.url(), seed, stop.clone()));
        Ok(Self {
            seed,
            cluster,
            nats,
            js,
            walstream,
            stop,
            writer,
            other,
            verified: false,
        })
    }

    /// Stops the load and walstream, and checks the stream against what PostgreSQL committed.
    async fn verify(&mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        let written = (&mut self.writer).await.context("the workload's writer")?;
        let others = (&mut self.other).await.context("the other publisher")?;
        let (verdict, status) = verify(
            &self.cluster,
            &self.js,
            &mut self.walstream,
            &written,
            &others,
        )
        .await
        .context("verifying the stream")?;
        assert!(
            verdict.passed(),
            "{verdict}\nreplay with WALSTREAM_FAULT_SEED={}",
            self.seed
        );
        assert!(status.success(), "walstream's final SIGTERM: {status}");
        self.verified = true;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_three_node_jetstream_cluster_losing_its_leader_then_a_second_node_loses_nothing(
) -> anyhow::Result<()> {
    let mut run = ClusterRun::start(NatsCluster::url).await?;
    let (nats, js, walstream) = (&mut run.nats, &run.js, &mut run.walstream);
    walstream
        .supervise_for(Duration::from_secs(5))
        .await
        .context("streaming before the faults")?;
    let leader = nats
        .leader(js, STREAM)
        .await
        .context("finding the stream's leader")?;
    eprintln!(
        "fault suite: killing the stream's leader {}",
        nats.names[leader]
    );
    nats.nodes[leader].kill();
    walstream
        .supervise_for(Duration::from_secs(8))
        .await
        .context("streaming without the leader")?;
    let second = (leader + 1) % 3;
    eprintln!(
        "fault suite: killing a second node {}: no quorum",
        nats.names[second]
    );
    nats.nodes[second].kill();
    walstream
        .supervise_for(Duration::from_secs(8))
        .await
        .context("streaming without a quorum")?;
    eprintln!("fault suite: restarting both");
    for node in [leader, second] {
        nats.nodes[node]
            .start()
            .with_context(|| format!("restarting node {}", nats.names[node]))?;
    }
    walstream
        .supervise_for(Duration::from_secs(8))
        .await
        .context("streaming after the restarts")?;
    run.verify().await?;
    assert_published_as_the_server_calls_for(&run.js, &run.cluster.log_path(), true)?;
    let replicas = run
        .js
        .get_stream(STREAM)
        .await?
        .info()
        .await?
        .config
        .num_replicas;
    assert_eq!(replicas, 3);
    Ok(())
}

/// Given one node's URL, walstream follows the servers the cluster announces: with that node
/// killed, both its connections (async-nats' and its own publisher's) go on through the others.
#[tokio::test(flavor = "multi_thread")]
async fn given_one_node_of_a_three_node_cluster_walstream_goes_on_through_the_others_when_it_dies(
) -> anyhow::Result<()> {
    let mut run = ClusterRun::start(|nats| nats.nodes[0].url()).await?;
    run.walstream
        .supervise_for(Duration::from_secs(5))
        .await
        .context("streaming before the fault")?;
    eprintln!("fault suite: killing n0, the only node walstream was given");
    run.nats.nodes[0].kill();
    run.walstream
        .supervise_for(Duration::from_secs(12))
        .await
        .context("streaming without the node it was given")?;
    run.verify().await?;
    let log = std::fs::read_to_string(run.cluster.log_path())?;
    let elsewhere = [&run.nats.nodes[1], &run.nats.nodes[2]]
        .map(|node| format!("NATS publisher connected to {}", node.url()));
    assert!(
        elsewhere.iter().any(|line| log.contains(line.as_str())),
        "walstream's publisher never connected to another node: {elsewhere:?}"
    );
    Ok(())
}

/// Copies walstream's log out of the test's temporary directory, which a failed test removes.
/// The mode the server calls for, not another one passing by luck: fast ingest on 2.14+,
/// atomic batches for a replicated stream on 2.12.1+ (chained publishes there stop nats-server
/// 2.15, README "Guarantees"), chained otherwise.
fn assert_published_as_the_server_calls_for(
    js: &jetstream::Context,
    log: &std::path::Path,
    replicated: bool,
) -> anyhow::Result<()> {
    let version = js.client().server_info().version;
    let wanted = match (
        walstream::nats::fast_ingest_batches(&version),
        walstream::nats::atomic_batches_with_ids(&version),
    ) {
        (true, _) if replicated => "fast ingest, one batch at a time",
        (true, _) => "fast ingest",
        (false, true) if replicated => "atomic batches",
        _ => "chained",
    };
    let wanted = format!("publishing=\"{wanted}\"");
    let log = std::fs::read_to_string(log)?;
    assert!(
        log.contains(&wanted),
        "walstream did not publish with {wanted} on nats-server {version}"
    );
    Ok(())
}

fn keep_log(cluster: &Cluster, why: &str) {
    let kept =
        std::env::temp_dir().join(format!("walstream-fault-{}-{why}.log", std::process::id()));
    match std::fs::copy(cluster.log_path(), &kept) {
        Ok(_) => eprintln!(
            "fault suite: walstream's whole log is kept in {}",
            kept.display()
        ),
        Err(error) => eprintln!("fault suite: could not keep walstream's log: {error}"),
    }
}

/// What walstream's log says it went through: proof the faults reached it.
fn evidence(cluster: &Cluster) -> String {
    let log = std::fs::read_to_string(cluster.log_path()).unwrap_or_default();
    [
        ("replication sessions", "starting replication"),
        (
            "resumed past events already in the stream",
            "skip_through=Some",
        ),
        (
            "replication connections lost",
            "replication connection lost",
        ),
        (
            "dead links found by the receive watchdog",
            "receive watchdog",
        ),
        ("NATS disconnections", "NATS disconnected"),
        ("publish failures re-synced", "re-syncing with the stream"),
        (
            "re-syncs after another publisher's message",
            "the stream moved under walstream",
        ),
        (
            "re-syncs that found the stream unreadable",
            "not reachable for re-sync",
        ),
        (
            "stale stream ends waited out",
            "reports an end before what JetStream acknowledged",
        ),
        (
            "checkpoint store refused",
            "cannot open the checkpoint store",
        ),
        ("disk full", "No space left"),
    ]
    .iter()
    .map(|(what, needle)| format!("{} {what}", log.matches(needle).count()))
    .collect::<Vec<_>>()
    .join(", ")
}

/// The oracle itself must fail on each kind of damage, or the suite proves nothing.
#[test]
fn the_oracle_catches_loss_duplication_reordering_and_wrong_rows() {
    use serde_json::json;
    let committed = vec![
        oracle::Committed {
            xid: 10,
            end_lsn: 0x200,
            changes: vec![
                ("public.t_a".into(), "INSERT".into()),
                ("public.t_a".into(), "UPDATE".into()),
            ],
        },
        oracle::Committed {
            xid: 11,
            end_lsn: 0x300,
            changes: vec![("public.t_c".into(), "INSERT".into())],
        },
    ];
    let event = |sequence: u64, xid: u32, lsn: &str, seq: u64, table: &str, op: &str, data| {
        Stored {
            sequence,
            subject: String::new(),
            message_id: format!("walstream:{xid}:{lsn}:{seq}"),
            lsn: lsn.into(),
            seq,
            commit_time: String::new(),
            xid: xid.to_string(),
            body: json!({"table": table, "event": op, "data": data, "old": null, "unchanged_toast": []}),
            headers: Default::default(),
        }
    };
    let none = other_publisher::Published::default();
    let judge =
        |stream: &[Stored], tables: &HashMap<&'static str, BTreeMap<String, serde_json::Value>>| {
            oracle::judge(&committed, stream, tables, &none)
        };
    let last = |mut message: Stored| {
        message
            .headers
            .insert(walstream::pipeline::event::HEADER_TX_LAST, "true");
        message
    };
    let stream = vec![
        event(
            1,
            10,
            "0/1F0",
            0,
            "public.t_a",
            "INSERT",
            json!({"id": 1, "n": 1, "note": null}),
        ),
        last(event(
            2,
            10,
            "0/1F0",
            1,
            "public.t_a",
            "UPDATE",
            json!({"id": 1, "n": 2, "note": null}),
        )),
        last(event(
            3,
            11,
            "0/2F0",
            0,
            "public.t_c",
            "INSERT",
            json!({"k": "k1", "v": 5, "flag": true}),
        )),
    ];
    let tables: HashMap<&'static str, BTreeMap<String, serde_json::Value>> = HashMap::from([
        (
            "public.t_a",
            BTreeMap::from([("1".to_owned(), json!({"id": 1, "n": 2, "note": null}))]),
        ),
        ("public.t_b", BTreeMap::new()),
        (
            "public.t_c",
            BTreeMap::from([("k1".to_owned(), json!({"k": "k1", "v": 5, "flag": true}))]),
        ),
    ]);
    let verdict = judge(&stream, &tables);
    assert!(verdict.passed(), "{verdict}");
    assert_eq!(verdict.changes_checked, 3);

    let lost = judge(&[stream[0].clone(), stream[2].clone()], &tables);
    assert_eq!((lost.lost, lost.table_mismatches), (1, 1), "{lost}");
    let mut twice = stream.clone();
    twice.push(stream[2].clone());
    let duplicated = judge(&twice, &tables);
    assert_eq!(duplicated.duplicated, 1, "{duplicated}");
    let swapped = vec![stream[1].clone(), stream[0].clone(), stream[2].clone()];
    let reordered = judge(&swapped, &tables);
    assert_eq!(
        (reordered.out_of_order, reordered.table_mismatches),
        (1, 1),
        "{reordered}"
    );
    let mut wrong = stream.clone();
    wrong[1].body["event"] = json!("DELETE");
    assert!(judge(&wrong, &tables).wrong_content >= 1);
    let mut unmarked = stream.clone();
    unmarked[1].headers = Default::default();
    assert_eq!(judge(&unmarked, &tables).wrong_content, 1);
    let mut early = stream.clone();
    early[0] = last(early[0].clone());
    assert_eq!(judge(&early, &tables).wrong_content, 1);
    let mut outside = stream.clone();
    outside[2].message_id = "walstream:11:0/1F8:0".into();
    assert_eq!(judge(&outside, &tables).wrong_content, 1);
    let mut stranger = stream.clone();
    stranger.push(event(
        4,
        12,
        "0/3F0",
        0,
        "public.t_c",
        "DELETE",
        json!({"k": "k1"}),
    ));
    let unexpected = judge(&stranger, &tables);
    assert_eq!(
        (unexpected.unexpected, unexpected.table_mismatches),
        (1, 1),
        "{unexpected}"
    );

    // The other publisher's messages: a copy of an event with its mark is not the event; one
    // it never sent, one twice, or one acknowledged and missing fails.
    let other = |sequence: u64, number: &str, copy_of: Option<&Stored>| {
        let mut message = copy_of.cloned().unwrap_or_else(|| Stored {
            sequence,
            subject: String::new(),
            message_id: String::new(),
            lsn: String::new(),
            seq: u64::MAX,
            commit_time: String::new(),
            xid: String::new(),
            body: json!({"other": number}),
            headers: Default::default(),
        });
        message.sequence = sequence;
        message.headers.insert(other_publisher::MARK, number);
        message
    };
    let mut published = other_publisher::Published::default();
    published.attempted.extend([1, 2, 3]);
    published.stored.extend([1, 2]);
    let mut beside = stream.clone();
    beside.insert(1, other(10, "1", None));
    beside.push(other(11, "2", Some(&stream[0])));
    let fine = oracle::judge(&committed, &beside, &tables, &published);
    assert!(fine.passed(), "{fine}");
    assert_eq!(fine.others_found, 2);
    let mut missing = stream.clone();
    missing.push(other(10, "1", None));
    assert_eq!(
        oracle::judge(&committed, &missing, &tables, &published).others_lost,
        1
    );
    let mut twice = beside.clone();
    twice.push(other(12, "1", None));
    assert_eq!(
        oracle::judge(&committed, &twice, &tables, &published).others_wrong,
        1
    );
    // Without an id JetStream stores a message at least once: twice is no fault of walstream.
    published.without_id.insert(1);
    let repeated = oracle::judge(&committed, &twice, &tables, &published);
    assert!(repeated.passed(), "{repeated}");
    let mut unknown = beside.clone();
    unknown.push(other(12, "9", None));
    assert_eq!(
        oracle::judge(&committed, &unknown, &tables, &published).others_wrong,
        1
    );
}
