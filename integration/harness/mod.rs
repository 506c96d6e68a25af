//! Test harness: a real PostgreSQL and a real nats-server per test, walstream as a child process,
//! and readers that check the stream against what was committed.

#![allow(dead_code)]

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use serde_json::Value;
use walstream::local::{free_port, LocalNats, LocalPostgres};

pub mod browser;
pub mod load;
pub mod orders;
pub mod output;
mod subscriber;
mod watchdog;
#[allow(unused_imports)]
pub use subscriber::{sign_with, Subscriber};
use watchdog::Watchdog;

pub const DATABASE: &str = "walstream_test";
pub const STREAM: &str = "fraiseql_events";

/// One test's servers, in a temporary directory removed at the end.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub postgres: LocalPostgres,
    pub nats: LocalNats,
    /// walstream's `/health` and `/metrics` port.
    pub http_port: u16,
    watchdog: Watchdog,
}

impl Cluster {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_nats_args(&[]).await
    }

    pub async fn start_with_nats_args(nats_args: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("walstream-it-").tempdir()?;
        let postgres = LocalPostgres::init(dir.path(), free_port()?)?;
        postgres.start()?;
        postgres
            .execute("postgres", &format!("CREATE DATABASE {DATABASE}"))
            .await?;
        let mut nats = LocalNats::new(dir.path(), free_port()?, nats_args)?;
        nats.start()?;
        let logs = ["walstream.log", "postgres.log", "nats.log"]
            .map(|name| dir.path().join(name))
            .to_vec();
        let watchdog = Watchdog::arm(postgres.clone(), logs);
        Ok(Self {
            dir,
            postgres,
            nats,
            http_port: free_port()?,
            watchdog,
        })
    }

    /// Lets a test that is long by design run for `limit` before the watchdog stops it.
    pub fn allow(&self, limit: Duration) {
        self.watchdog.allow(limit);
    }

    pub fn db_url(&self) -> String {
        self.postgres.url(DATABASE)
    }

    pub async fn sql(&self, sql: &str) -> anyhow::Result<()> {
        self.postgres.execute(DATABASE, sql).await
    }

    pub async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        walstream::postgres::connect(&self.db_url()).await
    }

    /// The server's `server_version_num` (`180004` for 18.4).
    pub async fn postgres_version(&self) -> anyhow::Result<i32> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await?;
        Ok(row.get(0))
    }

    pub async fn jetstream(&self) -> anyhow::Result<jetstream::Context> {
        let client = async_nats::connect(self.nats.url()).await?;
        Ok(jetstream::new(client))
    }

    /// Writes a config for `tables` (plus `extra` TOML) and returns its path.
    pub fn config(&self, tables: &[&str], extra: &str) -> anyhow::Result<PathBuf> {
        self.config_with(&self.db_url(), tables, "receive_timeout_secs = 30", extra)
    }

    /// A config with its own database URL and `[replication]` keys.
    pub fn config_with(
        &self,
        url: &str,
        tables: &[&str],
        replication: &str,
        extra: &str,
    ) -> anyhow::Result<PathBuf> {
        let tables = tables
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!(
            r#"[database]
url = "{url}"

[replication]
tables = [{tables}]
status_interval_secs = 1
heartbeat_secs = 0
{replication}

[checkpoint]
path = "{checkpoint}"

[nats]
url = "{nats}"
ack_timeout_secs = 2

[http]
listen = "127.0.0.1:{http}"

{extra}
"#,
            checkpoint = self.dir.path().join("checkpoint").display(),
            nats = self.nats.url(),
            http = self.http_port,
        );
        let path = self.dir.path().join("walstream.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("walstream.log")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Before the temporary directory goes: a server must not outlive its test.
        let _ = self.postgres.stop("immediate");
    }
}

/// Runs `walstream <args> --config <config>` to completion (a one-shot command).
pub fn walstream(args: &[&str], config: &Path) -> anyhow::Result<std::process::Output> {
    Ok(walstream_command(args, config).output()?)
}

/// `walstream <args> --config <config>`, to be run as the test needs.
pub fn walstream_command(args: &[&str], config: &Path) -> Command {
    let mut command = Command::new(walstream_binary());
    command
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("WALSTREAM_CONFIG");
    command
}

/// `walstream setup`: the publication and the slot.
pub fn setup(config: &Path) -> anyhow::Result<()> {
    let output = walstream(&["setup"], config)?;
    anyhow::ensure!(
        output.status.success(),
        "walstream setup failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The walstream binary built by cargo for these tests.
pub fn walstream_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_walstream"))
}

/// A running walstream process.
pub struct Walstream {
    child: Child,
}

impl Walstream {
    /// `walstream stream`.
    pub fn start(config: &Path, log: &Path) -> anyhow::Result<Self> {
        Self::start_command("stream", config, log)
    }

    /// `walstream <command>` (`stream`, `serve`, `run`).
    pub fn start_command(command: &str, config: &Path, log: &Path) -> anyhow::Result<Self> {
        Self::start_with_env(command, config, log, &[])
    }

    /// `walstream <command>` with extra environment variables (for `${VAR}` in the config).
    pub fn start_with_env(
        command: &str,
        config: &Path,
        log: &Path,
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(walstream_binary())
            .args([command, "--config"])
            .arg(config)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "walstream=debug,info")
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("cannot start walstream")?;
        Ok(Self { child })
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.kill();
                bail!("walstream did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for walstream to exit on its own; an error if it still runs after `timeout`.
    pub async fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("walstream still runs after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Walstream {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One message read back from the stream.
#[derive(Debug, Clone)]
pub struct Stored {
    pub sequence: u64,
    pub subject: String,
    pub message_id: String,
    pub lsn: String,
    pub seq: u64,
    pub commit_time: String,
    pub xid: String,
    pub body: Value,
    pub headers: async_nats::HeaderMap,
}

impl Stored {
    pub fn position(&self) -> (u64, u64) {
        let lsn = walstream::lsn::parse_lsn(&self.lsn)
            .map(|l| l.0)
            .unwrap_or(0);
        (lsn, self.seq)
    }
}

/// Reads every message of the stream in order. When a consumer goes quiet before the end (a
/// JetStream cluster whose nodes just came back, still electing or catching up), the next
/// messages are read one by one from the stream leader, then a consumer is tried again, until
/// [`READ_PATIENCE`] has passed; each stall is reported with what the stream said of its
/// cluster then.
pub async fn read_stream(js: &jetstream::Context) -> anyhow::Result<Vec<Stored>> {
    let (mut stream, last) = open_stream(js).await?;
    let deadline = Instant::now() + READ_PATIENCE;
    let mut out = Vec::new();
    let mut next = 1;
    let mut stalled = false;
    while next <= last {
        let by_sequence_to = last.min(next + BY_SEQUENCE - 1);
        let read = if stalled {
            read_by_sequence(&stream, next, by_sequence_to, &mut out).await
        } else {
            read_from(&stream, next, last, &mut out).await
        };
        let reached = out.last().map_or(1, |m: &Stored| m.sequence + 1);
        match read {
            // Past the messages read by sequence even where the stream holds none.
            Ok(()) if stalled => {
                stalled = false;
                next = by_sequence_to + 1;
                continue;
            }
            Ok(()) => {}
            Err(error) if Instant::now() < deadline => {
                eprintln!(
                    "reading the stream from {next} again: {error:#}; {}",
                    cluster_state(&mut stream).await
                );
                stalled = true;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => {
                let state = cluster_state(&mut stream).await;
                return Err(error.context(format!(
                    "reading from sequence {next} of {last} for {READ_PATIENCE:?}; {state}"
                )));
            }
        }
        next = reached.max(next);
    }
    Ok(out)
}

/// How many messages are read one by one after a consumer stalled, before a consumer is
/// tried again.
const BY_SEQUENCE: u64 = 2_000;

/// How long [`read_stream`] goes on past consumers that stall. After a three-node cluster
/// lost its quorum and got it back, four consumers in a row delivered nothing for 10 s each in
/// one CI run (nats-server 2.9), some with every replica current.
const READ_PATIENCE: Duration = Duration::from_secs(120);

/// The stream's end and its cluster's leader and replicas as the stream reports them now.
async fn cluster_state(stream: &mut jetstream::stream::Stream) -> String {
    match stream.info().await {
        Ok(info) => {
            let cluster = info.cluster.as_ref().map_or_else(
                || "no cluster".to_owned(),
                |cluster| {
                    let replicas: Vec<String> = cluster
                        .replicas
                        .iter()
                        .map(|r| {
                            format!(
                                "{} (current: {}, lag {:?}, offline: {})",
                                r.name, r.current, r.lag, r.offline
                            )
                        })
                        .collect();
                    format!(
                        "leader {:?}, replicas [{}]",
                        cluster.leader,
                        replicas.join(", ")
                    )
                },
            );
            format!(
                "the stream holds {} messages up to sequence {}, {cluster}",
                info.state.messages, info.state.last_sequence
            )
        }
        Err(error) => format!("the stream's info: {error}"),
    }
}

/// The stream and its last sequence, retried for a while: a JetStream cluster whose nodes just
/// came back answers stream requests only once its groups have elected leaders again.
async fn open_stream(js: &jetstream::Context) -> anyhow::Result<(jetstream::stream::Stream, u64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let opened = async {
            let mut stream = js.get_stream(STREAM).await?;
            let last = stream.info().await?.state.last_sequence;
            anyhow::Ok((stream, last))
        }
        .await;
        match opened {
            Ok(opened) => return Ok(opened),
            Err(error) if Instant::now() < deadline => {
                eprintln!("opening the stream again: {error:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => return Err(error.context(format!("opening stream {STREAM} for 30 s"))),
        }
    }
}

/// Appends the stream's messages from `first` through `last` to `out`; an error unless it
/// reached `last`.
async fn read_from(
    stream: &jetstream::stream::Stream,
    first: u64,
    last: u64,
    out: &mut Vec<Stored>,
) -> anyhow::Result<()> {
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: first,
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    while let Some(message) = tokio::time::timeout(Duration::from_secs(10), messages.next())
        .await
        .context("timed out reading the stream")?
    {
        let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
        let sequence = message
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence;
        let headers = message.headers.clone().unwrap_or_default();
        out.push(stored(
            sequence,
            &message.subject,
            headers,
            &message.payload,
        )?);
        if sequence >= last {
            return Ok(());
        }
    }
    bail!("the consumer ended before sequence {last}")
}

/// Appends the messages from `first` through `last` to `out`, each asked of the stream leader
/// by its sequence; a sequence the stream does not hold is passed over.
async fn read_by_sequence(
    stream: &jetstream::stream::Stream,
    first: u64,
    last: u64,
    out: &mut Vec<Stored>,
) -> anyhow::Result<()> {
    for sequence in first..=last {
        let message = tokio::time::timeout(
            Duration::from_secs(5),
            walstream::nats::message_at(stream, sequence),
        )
        .await
        .with_context(|| format!("timed out reading message {sequence}"))??;
        if let Some(message) = message {
            out.push(stored(
                sequence,
                &message.subject,
                message.headers,
                &message.payload,
            )?);
        }
    }
    Ok(())
}

/// One message as the tests look at it.
fn stored(
    sequence: u64,
    subject: &str,
    headers: async_nats::HeaderMap,
    payload: &[u8],
) -> anyhow::Result<Stored> {
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    Ok(Stored {
        sequence,
        subject: subject.to_owned(),
        message_id: header("Nats-Msg-Id"),
        lsn: header("Walstream-Lsn"),
        seq: header("Walstream-Seq").parse().unwrap_or(u64::MAX),
        commit_time: header("Walstream-Commit-Time"),
        xid: header("Walstream-Xid"),
        body: serde_json::from_slice(payload)
            .with_context(|| format!("message {sequence} is not JSON"))?,
        headers,
    })
}

/// Waits until the stream holds at least `count` messages.
pub async fn wait_for_messages(
    js: &jetstream::Context,
    count: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut seen = 0;
    while Instant::now() < deadline {
        if let Ok(mut stream) = js.get_stream(STREAM).await {
            if let Ok(info) = stream.info().await {
                seen = info.state.messages;
                if seen >= count {
                    return Ok(());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("stream holds {seen} messages after {timeout:?}, expected {count}")
}

/// Checks the stream-wide invariants: unique message ids, positions strictly increasing, and
/// each message's headers agreeing with its body.
pub fn assert_exactly_once_in_order(messages: &[Stored]) {
    let mut ids = HashSet::new();
    let mut previous: Option<(u64, u64)> = None;
    for message in messages {
        assert!(
            ids.insert(message.message_id.clone()),
            "duplicate Nats-Msg-Id {} at sequence {}",
            message.message_id,
            message.sequence
        );
        let position = message.position();
        if let Some(previous) = previous {
            assert!(
                position > previous,
                "out of order at sequence {}: {position:?} after {previous:?}",
                message.sequence
            );
        }
        previous = Some(position);
        assert_eq!(
            message.body["lsn"], message.lsn,
            "body and header LSN differ"
        );
        assert_eq!(
            message.body["seq"], message.seq,
            "body and header seq differ"
        );
    }
}

/// A TCP proxy on loopback that can go silent like a dead network path: frozen, it forwards
/// nothing and closes nothing; thawed, it drops the connections it froze and forwards new ones.
pub struct Blackhole {
    pub port: u16,
    frozen: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    pub async fn start(target_port: u16) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let frozen = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let task = {
            let (frozen, generation) = (frozen.clone(), generation.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (frozen, generation) = (frozen.clone(), generation.clone());
                    tokio::spawn(async move {
                        if let Ok(server) =
                            tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                        {
                            forward(client, server, frozen, generation).await;
                        }
                    });
                }
            })
        };
        Ok(Self {
            port,
            frozen,
            generation,
            task,
        })
    }

    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    pub fn thaw(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.frozen.store(false, Ordering::SeqCst);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    mut client: tokio::net::TcpStream,
    mut server: tokio::net::TcpStream,
    frozen: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let born = generation.load(Ordering::SeqCst);
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        if generation.load(Ordering::SeqCst) != born {
            return;
        }
        if frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        tokio::select! {
            read = client.read(&mut up) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => if server.write_all(&up[..n]).await.is_err() { return },
            },
            read = server.read(&mut down) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => if client.write_all(&down[..n]).await.is_err() { return },
            },
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// A tmpfs of `size` mounted at a directory, unmounted when dropped even if the test failed
/// (mounting needs root, as CI runs).
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path)?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .context("cannot run mount")?;
        anyhow::ensure!(
            status.success(),
            "mount tmpfs at {}: {status}",
            path.display()
        );
        Ok(Self(path.to_owned()))
    }

    /// Fills the file system with `filler` until no space is left.
    pub fn fill(&self, filler: &Path) {
        let _ = Command::new("dd")
            .args([
                "if=/dev/zero",
                &format!("of={}", filler.display()),
                "bs=64k",
            ])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A plain HTTP/1.1 GET on 127.0.0.1: (status code, body).
pub async fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    http_request(port, "GET", path, &[], "").await
}

/// One HTTP/1.1 request; returns the status and the body.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .context("no status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Waits until the replication slot exists (walstream created it).
/// The version of the nats-server binary the tests use, as `(major, minor)`: `(2, 11)`.
pub fn nats_server_version() -> anyhow::Result<(u64, u64)> {
    let output = Command::new(LocalNats::binary()?)
        .arg("--version")
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    // `nats-server: v2.15.1`
    let version = text.trim().rsplit('v').next().unwrap_or("");
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    Ok((parts.next().unwrap_or(0), parts.next().unwrap_or(0)))
}

/// The value of the first line of walstream's `/metrics` that starts with `name` (0 if none).
pub async fn metric(cluster: &Cluster, name: &str) -> anyhow::Result<f64> {
    let (_, body) = http_get(cluster.http_port, "/metrics").await?;
    Ok(body
        .lines()
        .find(|line| line.starts_with(name))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0))
}

pub async fn wait_for_slot(cluster: &Cluster) -> anyhow::Result<()> {
    let client = cluster.client().await?;
    eventually(Duration::from_secs(30), "the replication slot", || async {
        walstream::postgres::slot_info(&client, "walstream")
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await
    .inspect_err(|_| dump_log(&cluster.log_path()))
}

/// Prints the walstream log, for a failing test.
pub fn dump_log(path: &Path) {
    if let Ok(text) = std::fs::read_to_string(path) {
        let tail: Vec<&str> = text.lines().rev().take(80).collect();
        eprintln!("--- walstream log (last lines) ---");
        for line in tail.into_iter().rev() {
            eprintln!("{line}");
        }
    }
}

/// Polls `condition` until true or the timeout.
pub async fn eventually<F, Fut>(
    timeout: Duration,
    what: &str,
    mut condition: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}
