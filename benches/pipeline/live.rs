//! Live workloads: commit → JetStream latency with a writer at fixed rates, beside the raw
//! floors (slot read, publish, relay); and the helpers the peers share (servers streaming,
//! the fill procedure, counting what a stream holds).

use std::future::Future;
use std::io::Write as _;
use std::process::Child;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use futures::{FutureExt, StreamExt};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::oneshot;
use walstream::nats::wire::{HeaderBlock, WriteHeaders as _, MESSAGE_ID};
use walstream::pipeline::event::HEADER_COMMIT_TIME;

use super::{
    create_stream, peak_rss_mb, spawn_walstream, start_servers, stop, Servers, DATABASE,
    INDEPENDENT, ROW, TABLE, WINDOW,
};

/// Writer connections; each commits single-row transactions one after another.
const WRITERS: u64 = 4;
pub const STREAM: &str = "fraiseql_events";
const INSERT: &str = "INSERT INTO t_bench SELECT {ROW} FROM (SELECT $1::bigint AS g) s";

#[derive(Debug, serde::Serialize)]
pub struct Steady {
    /// `walstream`, or `raw slot read` for the floor: pgwire-replication alone reading the
    /// slot, latency taken when the commit arrives.
    pub reader: &'static str,
    /// The nats-server version, filled in by the caller.
    pub nats_server: String,
    pub target_per_sec: u64,
    pub achieved_per_sec: f64,
    pub changes: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub walstream_peak_rss_mb: f64,
    /// Payload and header bytes per stored message, less the `Nats-*` headers (0 for the raw
    /// slot read).
    pub bytes_per_message: usize,
}

pub async fn setup_streaming(servers: &Servers) -> anyhow::Result<()> {
    for statement in [
        TABLE,
        "CREATE PUBLICATION walstream FOR TABLE t_bench",
        "SELECT pg_create_logical_replication_slot('walstream', 'pgoutput')",
    ] {
        servers.postgres.execute(DATABASE, statement).await?;
    }
    Ok(())
}

/// Messages stored in `stream` from now on, in order.
async fn new_messages(
    stream: &jetstream::stream::Stream,
) -> anyhow::Result<jetstream::consumer::pull::Ordered> {
    Ok(stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await?
        .messages()
        .await?)
}

pub async fn jetstream_context(servers: &Servers) -> anyhow::Result<jetstream::Context> {
    Ok(jetstream::new(
        async_nats::connect(servers.nats.url()).await?,
    ))
}

pub async fn stored(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut stream) => stream.info().await.map_or(0, |info| info.state.messages),
        Err(_) => 0,
    }
}

/// Waits until `stream` holds `count` messages; false after `timeout`.
pub async fn wait_stored(
    js: &jetstream::Context,
    stream: &str,
    count: u64,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if stored(js, stream).await >= count {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A stored walstream event of the live workload, less the headers JetStream acts on
/// (`Nats-*`): what the raw publisher and relay send in its place, so that the floors store
/// the same payload and header block per change as walstream and differ from it only by
/// walstream's own work. nats-server's cost per message, its stalls included, grows with the
/// bytes it stores.
#[derive(Clone)]
pub struct EventShape {
    payload: bytes::Bytes,
    headers: async_nats::HeaderMap,
}

impl EventShape {
    fn of(message: &jetstream::Message) -> Self {
        let mut headers = async_nats::HeaderMap::new();
        for (name, values) in message.headers.iter().flat_map(|h| h.iter()) {
            if AsRef::<str>::as_ref(name).starts_with("Nats-") {
                continue;
            }
            for value in values {
                headers.append(name.clone(), value.clone());
            }
        }
        Self {
            payload: message.payload.clone(),
            headers,
        }
    }

    /// Writes the event's headers with `committed` as its commit time and `id` as its message
    /// id.
    fn write_headers(
        &self,
        block: &mut HeaderBlock,
        committed: OffsetDateTime,
        id: &str,
    ) -> anyhow::Result<()> {
        for (name, values) in self.headers.iter() {
            if AsRef::<str>::as_ref(name) != HEADER_COMMIT_TIME {
                for value in values {
                    block.put(name.as_ref(), value.as_str());
                }
            }
        }
        block.put(HEADER_COMMIT_TIME, &committed.format(&Rfc3339)?);
        block.put(MESSAGE_ID, id);
        Ok(())
    }

    /// Payload and header bytes (names, values, separators) of one message.
    pub fn bytes(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, values)| {
                values
                    .iter()
                    .map(|value| AsRef::<[u8]>::as_ref(name).len() + value.as_str().len() + 4)
                    .sum::<usize>()
            })
            .sum();
        self.payload.len() + headers
    }
}

/// Fresh servers with the bench table published, and walstream streaming it.
async fn streaming() -> anyhow::Result<(Servers, jetstream::Context, Child)> {
    let servers = start_servers().await?;
    setup_streaming(&servers).await?;
    let js = jetstream_context(&servers).await?;
    let walstream = walstream_streaming(&servers, &js).await?;
    Ok((servers, js, walstream))
}

/// Starts walstream and waits until it is streaming: its stream created and its slot read by
/// a walsender, as the raw readers and the Debezium peer are before their writer starts.
/// Waiting for the stream alone let the writer start while walstream was still opening its
/// replication session.
pub async fn walstream_streaming(
    servers: &Servers,
    js: &jetstream::Context,
) -> anyhow::Result<Child> {
    let child = spawn_walstream(servers, INDEPENDENT, walstream::local::free_port()?)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while js.get_stream(STREAM).await.is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "walstream did not create its stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for_slot_reader(servers, child, INDEPENDENT.slot, "walstream", deadline).await
}

/// Waits until a walsender reads `slot` for `child` (`name` in errors); stops the child and
/// fails if it exits first or `deadline` passes. Its log is `{name}.log` in the servers'
/// directory.
pub async fn wait_for_slot_reader(
    servers: &Servers,
    mut child: Child,
    slot: &str,
    name: &str,
    deadline: Instant,
) -> anyhow::Result<Child> {
    let (client, connection) =
        tokio_postgres::connect(&servers.postgres.url(DATABASE), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let log = servers.dir.join(format!("{name}.log"));
    loop {
        let active: bool = client
            .query_one(
                "SELECT coalesce(bool_or(active), false) FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .get(0);
        if active {
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("{name} exited ({status}); see {}", log.display());
        }
        if Instant::now() > deadline {
            stop(&mut child);
            anyhow::bail!(
                "{name} did not read its slot in time; see {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `WRITERS` connections committing single-row inserts at `rate` in total for `duration`;
/// ids start at `first_id`. Returns how many rows were committed.
async fn write_at_rate(
    servers: &Servers,
    rate: u64,
    duration: Duration,
    first_id: u64,
) -> anyhow::Result<u64> {
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let url = servers.postgres.url(DATABASE);
        writers.push(tokio::spawn(async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            let insert = client.prepare(&INSERT.replace("{ROW}", ROW)).await?;
            let per_writer = rate as f64 / WRITERS as f64;
            let started = Instant::now();
            let mut committed = 0u64;
            while started.elapsed() < duration {
                let due = (per_writer * started.elapsed().as_secs_f64()) as u64;
                if committed < due {
                    let id = (first_id + writer + committed * WRITERS) as i64;
                    client.execute(&insert, &[&id]).await?;
                    committed += 1;
                } else {
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
            }
            anyhow::Ok(committed)
        }));
    }
    let mut total = 0;
    for writer in writers {
        total += writer.await??;
    }
    Ok(total)
}

fn commit_time(message: &jetstream::Message) -> Option<OffsetDateTime> {
    let value = message.headers.as_ref()?.get(HEADER_COMMIT_TIME)?;
    OffsetDateTime::parse(value.as_str(), &Rfc3339).ok()
}

/// The next message of an ordered consumer and the time JetStream stored it.
async fn next_stored(
    messages: &mut jetstream::consumer::pull::Ordered,
    within: Duration,
) -> anyhow::Result<(jetstream::Message, OffsetDateTime)> {
    let message = tokio::time::timeout(within, messages.next())
        .await
        .map_err(|_| anyhow::anyhow!("no message within {within:?}"))?
        .ok_or_else(|| anyhow::anyhow!("the consumer ended"))??;
    let stored = message
        .info()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .published;
    Ok((message, stored))
}

/// One event of the live workload as walstream stores it: walstream streaming on fresh
/// servers, one row committed, its event read back.
pub async fn event_shape() -> anyhow::Result<EventShape> {
    let (servers, js, mut walstream) = streaming().await?;
    let mut messages = new_messages(&js.get_stream(STREAM).await?).await?;
    let (client, connection) =
        tokio_postgres::connect(&servers.postgres.url(DATABASE), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .execute(&INSERT.replace("{ROW}", ROW), &[&1i64])
        .await?;
    let read = next_stored(&mut messages, Duration::from_secs(30)).await;
    stop(&mut walstream);
    Ok(EventShape::of(&read?.0))
}

/// Commit → stored-in-JetStream latency at a fixed write rate. The stored time is the one
/// JetStream records when it persists the message (and acks the publish), read back from
/// each message; the commit time is PostgreSQL's, carried in the event.
pub async fn steady(rate: u64, seconds: u64) -> anyhow::Result<Steady> {
    eprintln!("steady state at {rate} changes/s for {seconds} s…");
    let (servers, js, mut walstream) = streaming().await?;
    let mut messages = new_messages(&js.get_stream(STREAM).await?).await?;
    let started = Instant::now();
    let written = write_at_rate(&servers, rate, Duration::from_secs(seconds), 1).await?;
    let achieved = written as f64 / started.elapsed().as_secs_f64();
    let mut latencies = Vec::with_capacity(written as usize);
    let mut log = LatencyLog::open("walstream")?;
    let mut last = None;
    while (latencies.len() as u64) < written {
        let (message, stored) = next_stored(&mut messages, Duration::from_secs(30))
            .await
            .map_err(|e| anyhow::anyhow!("after {} of {written} events: {e}", latencies.len()))?;
        let committed =
            commit_time(&message).ok_or_else(|| anyhow::anyhow!("an event without commit time"))?;
        latencies.push((stored - committed).as_seconds_f64() * 1000.0);
        log.record(committed, stored)?;
        last = Some(message);
    }
    let rss = peak_rss_mb(&walstream);
    stop(&mut walstream);
    let mut measured = summarize("walstream", rate, achieved, latencies, rss);
    measured.bytes_per_message = last.map_or(0, |message| EventShape::of(&message).bytes());
    Ok(measured)
}

/// Where `WALSTREAM_BENCH_LATENCIES` names a file, each event's reader, commit and stored
/// times (Unix ns) are appended to it, to line late events up with a scheduler trace.
struct LatencyLog {
    reader: &'static str,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl LatencyLog {
    fn open(reader: &'static str) -> anyhow::Result<Self> {
        let file = match std::env::var_os("WALSTREAM_BENCH_LATENCIES") {
            Some(path) => Some(std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )),
            None => None,
        };
        Ok(Self { reader, file })
    }

    fn record(&mut self, committed: OffsetDateTime, stored: OffsetDateTime) -> anyhow::Result<()> {
        if let Some(file) = self.file.as_mut() {
            let (committed, stored) = (
                committed.unix_timestamp_nanos(),
                stored.unix_timestamp_nanos(),
            );
            writeln!(file, "{}\t{committed}\t{stored}", self.reader)?;
        }
        Ok(())
    }
}

fn summarize(
    reader: &'static str,
    rate: u64,
    achieved: f64,
    mut latencies: Vec<f64>,
    rss: f64,
) -> Steady {
    latencies.sort_by(f64::total_cmp);
    let percentile = |p: f64| crate::stats::quantile(&latencies, p).unwrap_or(0.0);
    Steady {
        reader,
        nats_server: String::new(),
        target_per_sec: rate,
        achieved_per_sec: achieved,
        changes: latencies.len() as u64,
        p50_ms: percentile(0.5),
        p99_ms: percentile(0.99),
        p999_ms: percentile(0.999),
        max_ms: latencies.last().copied().unwrap_or(0.0),
        walstream_peak_rss_mb: rss,
        bytes_per_message: 0,
    }
}

/// Runs a raw reader on a thread and runtime of its own, as walstream runs in a process of its
/// own. On the bench's one thread it competed with the writers, which then fell behind their
/// rate (12–14k of 20k changes/s beside the raw relay). `reader` gets a sender to call once it
/// reads the slot; the returned pair resolves when it has, and with the reader's result.
fn on_own_thread<T, F, Fut>(
    reader: F,
) -> (
    oneshot::Receiver<()>,
    impl Future<Output = anyhow::Result<T>>,
)
where
    T: Send + 'static,
    F: FnOnce(oneshot::Sender<()>) -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let (reading, connected) = oneshot::channel();
    let (done, result) = oneshot::channel();
    std::thread::spawn(move || {
        let outcome = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| runtime.block_on(reader(reading)));
        let _ = done.send(outcome);
    });
    let result = async move {
        result
            .await
            .map_err(|_| anyhow::anyhow!("a raw reader's thread panicked"))?
    };
    (connected, result)
}

/// The writer at `rate` for `seconds` once the reader reads the slot; or the reader's error if
/// it ended before that.
async fn write_when_reading<T>(
    servers: &Servers,
    rate: u64,
    seconds: u64,
    connected: oneshot::Receiver<()>,
    reader: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(u64, T)> {
    if connected.await.is_err() {
        reader.await?;
        anyhow::bail!("the raw reader stopped before it read the slot");
    }
    let written = write_at_rate(servers, rate, Duration::from_secs(seconds), 1).await?;
    Ok((written, reader.await?))
}

/// The next commit of the raw slot read, with its commit time; `None` once the slot has been
/// quiet for two seconds after the writer's `seconds` since `started`, or the stream ended.
async fn next_commit(
    client: &mut pgwire_replication::ReplicationClient,
    started: Instant,
    seconds: u64,
) -> anyhow::Result<Option<OffsetDateTime>> {
    use pgwire_replication::ReplicationEvent;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), client.recv()).await {
            Ok(Ok(Some(ReplicationEvent::Commit {
                end_lsn,
                commit_time_micros,
                ..
            }))) => {
                client.update_applied_lsn(end_lsn);
                let micros = PG_EPOCH_MICROS + i128::from(commit_time_micros);
                return Ok(Some(OffsetDateTime::from_unix_timestamp_nanos(
                    micros * 1000,
                )?));
            }
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) | Ok(Err(_)) => return Ok(None),
            Err(_) if started.elapsed() > Duration::from_secs(seconds) => return Ok(None),
            Err(_) => {}
        }
    }
}

/// The floor under walstream's latency: the same writer, and the slot read by
/// pgwire-replication alone; a transaction's latency is its commit's arrival minus its commit
/// time.
pub async fn steady_raw(rate: u64, seconds: u64) -> anyhow::Result<Steady> {
    eprintln!("raw slot read at {rate} changes/s for {seconds} s…");
    let servers = start_servers().await?;
    setup_streaming(&servers).await?;
    let config = raw_replication_config(&servers);
    let (connected, reader) = on_own_thread(move |reading| async move {
        let mut client = pgwire_replication::ReplicationClient::connect(config).await?;
        let _ = reading.send(());
        let started = Instant::now();
        let mut latencies = Vec::new();
        let mut log = LatencyLog::open("raw slot read")?;
        while let Some(committed) = next_commit(&mut client, started, seconds).await? {
            let arrived = OffsetDateTime::now_utc();
            latencies.push((arrived - committed).as_seconds_f64() * 1000.0);
            log.record(committed, arrived)?;
        }
        let _ = client.shutdown().await;
        anyhow::Ok(latencies)
    });
    let (written, latencies) =
        write_when_reading(&servers, rate, seconds, connected, reader).await?;
    anyhow::ensure!(
        latencies.len() as u64 >= written,
        "the raw reader saw {} of {written} commits",
        latencies.len()
    );
    let achieved = written as f64 / seconds as f64;
    Ok(summarize("raw slot read", rate, achieved, latencies, 0.0))
}

/// What the floors publish with: walstream's own publishing connection, its answers counted on
/// one inbox with `WINDOW` in flight — the path walstream's events take, less all walstream
/// does to a change before it.
struct FloorPublisher {
    publisher: walstream::nats::Publisher,
    headers: HeaderBlock,
    answers: async_nats::Subscriber,
    inbox: String,
    in_flight: usize,
}

impl FloorPublisher {
    async fn connect(url: String) -> anyhow::Result<Self> {
        let client = async_nats::connect(url.clone()).await?;
        let inbox = client.new_inbox();
        let answers = client.subscribe(inbox.clone()).await?;
        client.flush().await?;
        let config = walstream::config::NatsConfig {
            url,
            ..Default::default()
        };
        let publisher =
            walstream::nats::Publisher::connect(&config, Duration::from_secs(10)).await?;
        Ok(Self {
            publisher,
            headers: HeaderBlock::new(),
            answers,
            inbox,
            in_flight: 0,
        })
    }

    /// Publishes `shape` with `committed` as its commit time, after an answer if the window is
    /// full.
    async fn publish(
        &mut self,
        subject: &str,
        shape: &EventShape,
        committed: OffsetDateTime,
        id: &str,
    ) -> anyhow::Result<()> {
        while self.in_flight >= WINDOW {
            let answer = self.answers.next().await;
            self.take(answer)?;
        }
        self.headers.clear();
        shape.write_headers(&mut self.headers, committed, id)?;
        self.publisher
            .publish(
                subject,
                Some(&self.inbox),
                Some(&self.headers),
                &shape.payload,
            )
            .await?;
        self.in_flight += 1;
        Ok(())
    }

    /// Counts one answer of JetStream's; a refusal is an error.
    fn take(&mut self, answer: Option<async_nats::Message>) -> anyhow::Result<()> {
        let answer = answer.ok_or_else(|| anyhow::anyhow!("the answers' inbox closed"))?;
        anyhow::ensure!(
            !answer.payload.starts_with(b"{\"error\"") && answer.status.is_none(),
            "JetStream refused a floor's message: {}",
            String::from_utf8_lossy(&answer.payload)
        );
        self.in_flight -= 1;
        Ok(())
    }

    async fn answered_all(&mut self) -> anyhow::Result<()> {
        while self.in_flight > 0 {
            let answer = self.answers.next().await;
            self.take(answer)?;
        }
        Ok(())
    }
}

/// The floor under the combined load: the same writer, the slot read by pgwire-replication and
/// each commit relayed to JetStream as one message of walstream's event shape with the same
/// in-flight window — walstream without decoding, encoding or checkpoint. Latency is measured
/// as walstream's is: the time JetStream stored the message minus the commit time.
pub async fn steady_relay(rate: u64, seconds: u64, shape: &EventShape) -> anyhow::Result<Steady> {
    eprintln!("raw relay (slot → JetStream) at {rate} changes/s for {seconds} s…");
    let servers = start_servers().await?;
    setup_streaming(&servers).await?;
    let js = jetstream_context(&servers).await?;
    let stream = create_stream(&js, "relay").await?;
    let mut messages = new_messages(&stream).await?;
    let (config, url, relayed_shape) = (
        raw_replication_config(&servers),
        servers.nats.url(),
        shape.clone(),
    );
    let (connected, relay) = on_own_thread(move |reading| async move {
        let mut floor = FloorPublisher::connect(url).await?;
        let mut client = pgwire_replication::ReplicationClient::connect(config).await?;
        let _ = reading.send(());
        let started = Instant::now();
        let mut relayed = 0u64;
        let mut id = String::new();
        loop {
            tokio::select! {
                answer = floor.answers.next(), if floor.in_flight > 0 => floor.take(answer)?,
                commit = next_commit(&mut client, started, seconds) => {
                    let Some(committed) = commit? else { break };
                    id.clear();
                    id.push_str("relay:");
                    id.push_str(itoa::Buffer::new().format(relayed));
                    floor.publish("relay.bench", &relayed_shape, committed, &id).await?;
                    relayed += 1;
                }
            }
        }
        floor.answered_all().await?;
        let _ = client.shutdown().await;
        anyhow::Ok(relayed)
    });
    let (written, relayed) = write_when_reading(&servers, rate, seconds, connected, relay).await?;
    anyhow::ensure!(
        relayed >= written,
        "the relay saw {relayed} of {written} commits"
    );
    let mut latencies = Vec::with_capacity(relayed as usize);
    let mut log = LatencyLog::open("raw relay")?;
    for _ in 0..relayed {
        let (message, stored) = next_stored(&mut messages, Duration::from_secs(10)).await?;
        let committed = commit_time(&message)
            .ok_or_else(|| anyhow::anyhow!("a message without commit time"))?;
        latencies.push((stored - committed).as_seconds_f64() * 1000.0);
        log.record(committed, stored)?;
    }
    let achieved = written as f64 / seconds as f64;
    let mut measured = summarize("raw relay", rate, achieved, latencies, 0.0);
    measured.bytes_per_message = shape.bytes();
    Ok(measured)
}

fn raw_replication_config(servers: &Servers) -> pgwire_replication::ReplicationConfig {
    pgwire_replication::ReplicationConfig::new(
        "127.0.0.1",
        "postgres",
        "",
        DATABASE,
        "walstream",
        "walstream",
    )
    .with_port(servers.postgres.port)
    .with_tls(pgwire_replication::TlsConfig::disabled())
    .with_status_interval(Duration::from_secs(1))
}

/// The other floor: JetStream alone, a publisher at `rate` messages/s of walstream's event
/// shape with message ids, latency from the publish call to the time JetStream stored the
/// message.
pub async fn steady_publish(rate: u64, seconds: u64, shape: &EventShape) -> anyhow::Result<Steady> {
    eprintln!("raw JetStream publish at {rate} messages/s for {seconds} s…");
    let servers = start_servers().await?;
    let js = jetstream_context(&servers).await?;
    let stream = create_stream(&js, "raw").await?;
    let mut messages = new_messages(&stream).await?;
    let mut floor = FloorPublisher::connect(servers.nats.url()).await?;
    let started = Instant::now();
    let duration = Duration::from_secs(seconds);
    let mut sent = 0u64;
    let mut sent_at = Vec::new();
    while started.elapsed() < duration {
        let due = (rate as f64 * started.elapsed().as_secs_f64()) as u64;
        if sent < due {
            let published = OffsetDateTime::now_utc();
            sent_at.push(published);
            floor
                .publish("raw.bench", shape, published, &format!("raw:{sent}"))
                .await?;
            sent += 1;
        } else {
            while let Some(answer) = floor.answers.next().now_or_never() {
                floor.take(answer)?;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
    }
    floor.answered_all().await?;
    let mut latencies = Vec::with_capacity(sent as usize);
    for published in &sent_at {
        let (_, stored) = next_stored(&mut messages, Duration::from_secs(10)).await?;
        latencies.push((stored - *published).as_seconds_f64() * 1000.0);
    }
    let achieved = sent as f64 / seconds as f64;
    let mut measured = summarize("raw JetStream publish", rate, achieved, latencies, 0.0);
    measured.bytes_per_message = shape.bytes();
    Ok(measured)
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i128 = 946_684_800_000_000;

/// The procedure both sides are measured with: `count` single-row transactions from `first`.
pub fn fill(first: u64, count: u64) -> String {
    format!(
        "DO $$ BEGIN FOR g IN {first}..{last} LOOP INSERT INTO t_bench SELECT {ROW}; COMMIT; \
         END LOOP; END $$",
        last = first + count - 1
    )
}
