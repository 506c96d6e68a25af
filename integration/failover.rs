//! A PostgreSQL failover under load (17+): a primary and a physical standby that synchronizes
//! walstream's failover slot, a writer committing all along, walstream given both hosts. The
//! standby falls behind, the primary dies, the standby is promoted and the writer moves to it.
//! The oracle is the promoted server itself: a `test_decoding` failover slot created before
//! the load (what it committed, in order), its tables, and its timeline history file read
//! from its data directory (where its history parts from the old primary's). Every change the
//! new primary has must be in the stream once, in order; anything else must be marked void by
//! walstream's failover marker.

mod harness;
#[allow(dead_code)]
#[path = "fault_suite/oracle.rs"]
mod oracle;
#[allow(dead_code)]
#[path = "fault_suite/other_publisher.rs"]
mod other_publisher;
#[allow(dead_code)]
#[path = "fault_suite/workload.rs"]
mod workload;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use harness::*;
use walstream::local::{free_port, LocalPostgres};
use walstream::lsn::{parse_lsn, Lsn};

/// The standby's physical slot on the primary.
const STANDBY_SLOT: &str = "standby1";

/// A primary (the cluster's PostgreSQL) and its standby, which reaches the primary through a
/// link the test can freeze.
struct Pair {
    cluster: Cluster,
    standby: LocalPostgres,
    link: Blackhole,
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = self.standby.stop("immediate");
    }
}

impl Pair {
    /// `None` where PostgreSQL has no failover slots (before 17). With `synchronized`, the
    /// primary holds logical walsenders back until the standby has the WAL.
    async fn start(synchronized: bool) -> anyhow::Result<Option<Self>> {
        let cluster = Cluster::start().await?;
        let version = cluster.postgres_version().await?;
        if version < walstream::postgres::FAILOVER_SLOTS_SINCE {
            eprintln!("not run: PostgreSQL {version} has no failover slots (17+)");
            return Ok(None);
        }
        cluster.allow(Duration::from_secs(420));
        cluster.sql(workload::TABLES).await?;
        cluster
            .postgres
            .execute(
                "postgres",
                &format!("SELECT pg_create_physical_replication_slot('{STANDBY_SLOT}')"),
            )
            .await?;
        // The npm builds have no pg_basebackup: a cleanly stopped primary's data directory is a
        // valid base for a standby.
        cluster.postgres.stop("fast")?;
        let standby_dir = cluster.dir.path().join("standby");
        std::fs::create_dir_all(&standby_dir)?;
        let standby_data = standby_dir.join("pgdata");
        let copied = Command::new("cp")
            .arg("-a")
            .arg(&cluster.postgres.data_dir)
            .arg(&standby_data)
            .status()?;
        anyhow::ensure!(
            copied.success(),
            "copying the primary's data directory failed"
        );
        for entry in std::fs::read_dir(standby_data.join("pg_replslot"))? {
            std::fs::remove_dir_all(entry?.path())?;
        }
        let _ = std::fs::remove_file(standby_data.join("postmaster.pid"));
        let link = Blackhole::start(cluster.postgres.port).await?;
        append(
            &standby_data.join("postgresql.auto.conf"),
            &format!(
                "primary_conninfo = 'host=127.0.0.1 port={} user=postgres dbname={DATABASE} \
                 application_name={STANDBY_SLOT}'\n\
                 primary_slot_name = '{STANDBY_SLOT}'\n\
                 hot_standby_feedback = on\n\
                 sync_replication_slots = on\n",
                link.port
            ),
        )?;
        std::fs::write(standby_data.join("standby.signal"), "")?;
        // Finds the copied directory and only hands it to the postgres user.
        let standby = LocalPostgres::init(&standby_dir, free_port()?)?;
        cluster.postgres.start()?;
        if synchronized {
            cluster
                .sql(&format!(
                    "ALTER SYSTEM SET synchronized_standby_slots = '{STANDBY_SLOT}'"
                ))
                .await?;
            cluster.sql("SELECT pg_reload_conf()").await?;
        }
        standby.start()?;
        let primary = cluster.client().await?;
        eventually(Duration::from_secs(30), "the standby streaming", || async {
            primary
                .query_one(
                    "SELECT count(*) FROM pg_stat_replication WHERE application_name = $1 \
                     AND state = 'streaming'",
                    &[&STANDBY_SLOT],
                )
                .await
                .is_ok_and(|row| row.get::<_, i64>(0) == 1)
        })
        .await?;
        Ok(Some(Self {
            cluster,
            standby,
            link,
        }))
    }

    /// `database.url` naming the primary first, then the standby.
    fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{DATABASE}",
            self.cluster.postgres.port, self.standby.port
        )
    }

    async fn standby_client(&self) -> anyhow::Result<tokio_postgres::Client> {
        walstream::postgres::connect(&self.standby.url(DATABASE)).await
    }

    /// Waits until the standby holds `slots` as synchronized, persistent slots (a synced slot
    /// stays temporary until the primary's slot passes a running-transactions record).
    async fn wait_synced(&self, slots: &[&str]) -> anyhow::Result<()> {
        let primary = self.cluster.client().await?;
        let standby = self.standby_client().await?;
        let names: Vec<String> = slots.iter().map(|s| s.to_string()).collect();
        eventually(
            Duration::from_secs(90),
            "the slots synchronized",
            || async {
                let _ = primary
                    .execute("SELECT pg_log_standby_snapshot()", &[])
                    .await;
                // The oracle slot is only ever peeked, so its catalog xmin would stay behind the
                // standby's and the standby would never take it over; before the load starts,
                // moving it to the WAL's end passes over nothing.
                let _ = primary
                    .execute(
                        "SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())",
                        &[&oracle::SLOT],
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(400)).await;
                standby
                    .query_one(
                        "SELECT count(*) FROM pg_replication_slots \
                     WHERE synced AND NOT temporary AND slot_name = ANY($1)",
                        &[&names],
                    )
                    .await
                    .is_ok_and(|row| row.get::<_, i64>(0) == names.len() as i64)
            },
        )
        .await
        .inspect_err(|_| {
            let log = std::fs::read_to_string(self.standby_dir().join("postgres.log"));
            let log = log.unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!(
                "--- the standby's log ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        })
    }

    fn standby_dir(&self) -> std::path::PathBuf {
        self.cluster.dir.path().join("standby")
    }

    /// Where the promoted standby's history parts from the primary's: its history file.
    fn switch_point(&self) -> anyhow::Result<Lsn> {
        let file = self.standby.data_dir.join("pg_wal/00000002.history");
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let line = text
            .lines()
            .find(|l| l.starts_with('1'))
            .context("no line for timeline 1")?;
        let lsn = line.split_whitespace().nth(1).context("no switch point")?;
        parse_lsn(lsn).map_err(anyhow::Error::msg)
    }
}

fn append(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

/// What the stream holds after the failover, judged against the promoted server.
struct Outcome {
    verdict: oracle::Verdict,
    /// Events of timeline 1 committed at or after the switch point: never on the new primary.
    phantoms: usize,
    /// Of them, inside a failover marker's void range.
    marked: usize,
    markers: Vec<serde_json::Value>,
}

/// The run: load, the standby frozen behind for a few seconds, the primary killed, the standby
/// promoted, load on it; with `restart`, walstream is SIGKILLed with the primary and started
/// again after the promotion (what it knows then comes from the stream and its checkpoint).
async fn failover(pair: &Pair, restart: bool) -> anyhow::Result<Outcome> {
    let cluster = &pair.cluster;
    let tables = ["public.t_a", "public.t_b", "public.t_c"];
    let config = cluster.config_with(
        &pair.url(),
        &tables,
        "receive_timeout_secs = 5\nfailover = true",
        "",
    )?;
    cluster
        .sql(&format!(
            "SELECT pg_create_logical_replication_slot('{}', 'test_decoding', failover => true)",
            oracle::SLOT
        ))
        .await?;
    setup(&config)?;
    let mut walstream = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(cluster).await?;
    pair.wait_synced(&["walstream", oracle::SLOT]).await?;
    let check = walstream_command(&["check"], &config)?;
    assert!(
        check.contains("slot walstream is a failover slot") && check.contains("standby standby1"),
        "{check}"
    );
    let sql = walstream_command(&["setup", "--print-sql"], &config)?;
    for needed in [
        "failover => true",
        "synchronized_standby_slots",
        "sync_replication_slots = on",
        "hot_standby_feedback = on",
        &format!("dbname={DATABASE}"),
    ] {
        assert!(
            sql.contains(needed),
            "setup --print-sql lacks {needed}:\n{sql}"
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(workload::write(pair.url(), fastrand::u64(..), stop.clone()));
    tokio::time::sleep(Duration::from_secs(5)).await;
    eprintln!("failover: the standby falls behind");
    pair.link.freeze();
    tokio::time::sleep(Duration::from_secs(3)).await;
    eprintln!("failover: the primary dies");
    cluster.postgres.stop("immediate")?;
    if restart {
        walstream.kill();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!("failover: the standby is promoted");
    pair.standby.promote()?;
    if restart {
        walstream = Walstream::start(&config, &cluster.log_path())?;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::SeqCst);
    let written = writer.await?;

    let client = pair.standby_client().await?;
    let committed = oracle::committed(&client)
        .await
        .context("reading the oracle slot on the promoted standby")?;
    let expected: usize = committed.iter().map(|t| t.changes.len()).sum();
    let switch = pair.switch_point()?;
    let js = cluster.jetstream().await?;
    let deadline = Instant::now() + Duration::from_secs(90);
    let (judged, outcome) = loop {
        let messages = read_stream(&js).await?;
        let split = split(&messages, switch);
        let kept = split.0.len();
        if kept >= expected || Instant::now() > deadline {
            break split;
        }
        if let Some(status) = walstream.try_wait() {
            dump_log(&cluster.log_path());
            anyhow::bail!("walstream exited during the failover: {status}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let verdict = oracle::judge(
        &committed,
        &judged,
        &workload::table_rows(&client).await?,
        &other_publisher::Published::default(),
    );
    let status = walstream.terminate(Duration::from_secs(60))?;
    let outcome = Outcome { verdict, ..outcome };
    eprintln!(
        "failover: writer {} transactions acknowledged of {}; switch point {switch}; {}; \
         phantom events {} (marked void {}); markers {:?}",
        written.acknowledged,
        written.attempted,
        outcome.verdict,
        outcome.phantoms,
        outcome.marked,
        outcome.markers
    );
    if !outcome.verdict.passed() {
        dump_log(&cluster.log_path());
    }
    assert!(status.success(), "walstream's SIGTERM: {status}");
    Ok(outcome)
}

/// Splits the stream into what the promoted server has (to judge) and the outcome: phantom
/// events (timeline 1, committed at or after `switch`), those inside a marker's void range,
/// and the markers.
fn split(messages: &[Stored], switch: Lsn) -> (Vec<Stored>, Outcome) {
    let markers: Vec<&Stored> = messages
        .iter()
        .filter(|m| m.subject.ends_with("._failover"))
        .collect();
    let void = |sequence: u64| {
        markers.iter().any(|m| {
            let range = &m.body["void"];
            let (first, last) = (
                range["first_sequence"].as_u64(),
                range["last_sequence"].as_u64(),
            );
            first
                .zip(last)
                .is_some_and(|(f, l)| (f..=l).contains(&sequence))
        })
    };
    let timeline = |m: &Stored| {
        m.headers
            .get("Walstream-Timeline")
            .map(|t| t.as_str().to_owned())
    };
    let mut kept = Vec::new();
    let (mut phantoms, mut marked) = (0, 0);
    for message in messages {
        if message.subject.ends_with("._failover") {
            continue;
        }
        let phantom =
            timeline(message).as_deref() == Some("1") && Lsn(message.position().0) >= switch;
        phantoms += usize::from(phantom);
        if void(message.sequence) {
            marked += 1;
            continue;
        }
        kept.push(message.clone());
    }
    let outcome = Outcome {
        verdict: oracle::Verdict::default(),
        phantoms,
        marked,
        markers: markers.iter().map(|m| m.body.clone()).collect(),
    };
    (kept, outcome)
}

/// `walstream <args>`'s stdout and stderr.
fn walstream_command(args: &[&str], config: &Path) -> anyhow::Result<String> {
    let output = walstream(args, config)?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn with_synchronized_standby_slots_a_failover_loses_duplicates_and_invents_nothing(
) -> anyhow::Result<()> {
    let Some(pair) = Pair::start(true).await? else {
        return Ok(());
    };
    let outcome = failover(&pair, false).await?;
    assert!(outcome.verdict.passed(), "{}", outcome.verdict);
    assert_eq!(outcome.phantoms, 0, "walstream ran ahead of the standby");
    assert!(outcome.markers.is_empty(), "{:?}", outcome.markers);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_them_the_events_the_promoted_standby_lacks_are_marked_void() -> anyhow::Result<()>
{
    let Some(pair) = Pair::start(false).await? else {
        return Ok(());
    };
    let outcome = failover(&pair, false).await?;
    assert_phantoms_marked(&outcome);
    let log = std::fs::read_to_string(pair.cluster.log_path())?;
    assert!(log.contains("never received"), "no error logged");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_walstream_killed_with_the_primary_marks_them_after_its_restart() -> anyhow::Result<()> {
    let Some(pair) = Pair::start(false).await? else {
        return Ok(());
    };
    let outcome = failover(&pair, true).await?;
    assert_phantoms_marked(&outcome);
    Ok(())
}

/// Phantoms were provoked, every one is inside the one marker's void range, and the rest of the
/// stream is the promoted server's history exactly.
fn assert_phantoms_marked(outcome: &Outcome) {
    assert!(
        outcome.phantoms > 0,
        "no phantom was provoked: the standby was not behind what walstream published"
    );
    assert_eq!(outcome.markers.len(), 1, "{:?}", outcome.markers);
    assert_eq!(
        outcome.marked, outcome.phantoms,
        "the void range is exactly the phantom events"
    );
    assert_eq!(
        outcome.markers[0]["void"]["events"].as_u64(),
        Some(outcome.phantoms as u64)
    );
    assert!(outcome.verdict.passed(), "{}", outcome.verdict);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_that_is_no_failover_slot_stops_walstream_at_the_promoted_standby(
) -> anyhow::Result<()> {
    let Some(pair) = Pair::start(false).await? else {
        return Ok(());
    };
    let cluster = &pair.cluster;
    let config =
        cluster.config_with(&pair.url(), &["public.t_a"], "receive_timeout_secs = 5", "")?;
    setup(&config)?;
    let mut walstream = Walstream::start(&config, &cluster.log_path())?;
    wait_for_slot(cluster).await?;
    cluster
        .sql("INSERT INTO t_a VALUES (1, 1, 'before')")
        .await?;
    let js = cluster.jetstream().await?;
    wait_for_messages(&js, 1, Duration::from_secs(30)).await?;
    cluster.postgres.stop("immediate")?;
    pair.standby.promote()?;
    let status = walstream.wait_exit(Duration::from_secs(60)).await?;
    assert!(!status.success());
    let log = std::fs::read_to_string(cluster.log_path())?;
    assert!(log.contains("no longer exists"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_slots_are_refused_before_postgresql_17() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let version = cluster.postgres_version().await?;
    if version >= walstream::postgres::FAILOVER_SLOTS_SINCE {
        eprintln!("not run: PostgreSQL {version} has failover slots");
        return Ok(());
    }
    cluster.sql(workload::TABLES).await?;
    let config = cluster.config(&["public.t_a"], "")?;
    let text = std::fs::read_to_string(&config)?.replace(
        "heartbeat_secs = 0\n",
        "heartbeat_secs = 0\nfailover = true\n",
    );
    std::fs::write(&config, text)?;
    let output = walstream(&["setup"], &config)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("replication.failover = true needs PostgreSQL 17"),
        "{stderr}"
    );
    let check = walstream_command(&["check"], &config)?;
    assert!(
        check.contains("FAIL replication.failover = true needs PostgreSQL 17"),
        "{check}"
    );
    Ok(())
}
