//! The load generator: keep-alive HTTP/1.1 connections, each sending GraphQL requests one
//! after another for a fixed time, every response checked and timed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// What one run of the load measured.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Load {
    pub per_sec: f64,
    #[serde(flatten)]
    pub latency: Latency,
    pub requests: u64,
}

/// A latency distribution, in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// The p99 wrk would print for the same samples: wrk adds, for every response slower than
    /// the mean interval between a connection's requests, the responses that connection would
    /// have sent meanwhile (its coordinated-omission correction), so one stall of the whole
    /// machine turns into a tail of many samples.
    pub wrk_p99_ms: f64,
}

impl Latency {
    /// The distribution of `samples` from `connections` closed-loop connections over `elapsed`.
    pub fn of(mut samples: Vec<Duration>, connections: u64, elapsed: Duration) -> Self {
        samples.sort_unstable();
        let per_connection = samples.len() as u64 / connections.max(1);
        let interval = elapsed.checked_div(per_connection.max(1) as u32);
        let corrected =
            interval.map_or_else(Vec::new, |interval| wrk_corrected(&samples, interval));
        Self {
            p50_ms: percentile(&samples, 0.5),
            p99_ms: percentile(&samples, 0.99),
            p999_ms: percentile(&samples, 0.999),
            max_ms: percentile(&samples, 1.0),
            wrk_p99_ms: percentile(&corrected, 0.99),
        }
    }
}

/// The samples with wrk's synthetic ones added (wrk's `stats_correct`: a sample `L` above twice
/// the interval adds `L - interval`, `L - 2·interval`, … down to the interval), sorted.
fn wrk_corrected(sorted: &[Duration], interval: Duration) -> Vec<Duration> {
    let mut all = sorted.to_vec();
    if interval.is_zero() {
        return all;
    }
    for &sample in sorted.iter().filter(|&&s| s >= interval * 2) {
        let mut synthetic = sample - interval;
        while synthetic > interval {
            all.push(synthetic);
            synthetic -= interval;
        }
    }
    all.sort_unstable();
    all
}

/// The `p` quantile of sorted samples, in milliseconds.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    crate::stats::quantile(sorted, p).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Makes request `i` of client `client`: the JSON body of a GraphQL request.
pub type Body<'a> = &'a (dyn Fn(u64, u64) -> String + Sync);

/// `clients` connections to `127.0.0.1:port/graphql`, each sending its requests one after
/// another for `seconds`; any error in a response fails the run.
pub async fn run(
    port: u16,
    token: &str,
    clients: u64,
    seconds: u64,
    body: Body<'_>,
) -> anyhow::Result<Load> {
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    // Bodies are made up front so the load generator spends its time on the wire. Each
    // client has more than it can send in a run, so created identifiers never repeat.
    let per_client = 400_000 / clients.max(1);
    for client in 0..clients {
        let bodies: Vec<String> = (0..per_client).map(|i| body(client, i)).collect();
        let (stop, counter, token) = (stop.clone(), counter.clone(), token.to_owned());
        tasks.push(tokio::spawn(async move {
            client_loop(port, &token, bodies, stop, counter).await
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let requests = counter.load(Ordering::Relaxed);
    Ok(Load {
        per_sec: requests as f64 / elapsed.as_secs_f64(),
        latency: Latency::of(latencies, clients, elapsed),
        requests,
    })
}

/// Sends one request and checks its answer: what a server must answer before it is measured.
pub async fn probe(port: u16, token: &str, body: &str) -> anyhow::Result<()> {
    Connection::open(port).await?.request(token, body).await
}

async fn client_loop(
    port: u16,
    token: &str,
    bodies: Vec<String>,
    stop: Arc<AtomicBool>,
    counter: Arc<AtomicU64>,
) -> anyhow::Result<Vec<Duration>> {
    let mut connection = Connection::open(port).await?;
    let mut latencies = Vec::new();
    for body in bodies.iter().cycle() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let sent = Instant::now();
        connection.request(token, body).await?;
        latencies.push(sent.elapsed());
        counter.fetch_add(1, Ordering::Relaxed);
    }
    Ok(latencies)
}

/// One keep-alive connection.
struct Connection {
    read: BufReader<tokio::net::tcp::OwnedReadHalf>,
    write: tokio::net::tcp::OwnedWriteHalf,
    line: String,
}

impl Connection {
    async fn open(port: u16) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        Ok(Self {
            read: BufReader::new(read),
            write,
            line: String::new(),
        })
    }

    /// Posts `body` and reads the whole response; an HTTP error or a GraphQL `errors` entry
    /// is an error.
    async fn request(&mut self, token: &str, body: &str) -> anyhow::Result<()> {
        let request = format!(
            "POST /graphql HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nAccept: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.write.write_all(request.as_bytes()).await?;
        let (status_ok, framing) = self.read_head().await?;
        let response = match framing {
            Framing::Length(length) => {
                let mut response = vec![0; length];
                self.read.read_exact(&mut response).await?;
                response
            }
            Framing::Chunked => read_chunked(&mut self.read, &mut self.line).await?,
        };
        anyhow::ensure!(
            status_ok && !contains(&response, b"\"errors\""),
            "request failed: {}",
            String::from_utf8_lossy(&response)
        );
        Ok(())
    }

    /// The status line and headers: whether the status is 200, and how the body is framed.
    async fn read_head(&mut self) -> anyhow::Result<(bool, Framing)> {
        let mut status_ok = false;
        let mut framing = Framing::Length(0);
        loop {
            self.line.clear();
            if self.read.read_line(&mut self.line).await? == 0 {
                anyhow::bail!("the server closed the connection");
            }
            let lower = self.line.to_ascii_lowercase();
            if lower.starts_with("http/1.1 ") {
                status_ok = lower.starts_with("http/1.1 200");
            } else if let Some(value) = lower.strip_prefix("content-length:") {
                framing = Framing::Length(value.trim().parse()?);
            } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                framing = Framing::Chunked;
            } else if self.line == "\r\n" {
                return Ok((status_ok, framing));
            }
        }
    }
}

enum Framing {
    Length(usize),
    Chunked,
}

/// A chunked body (Node's servers send one when they stream a response).
async fn read_chunked(
    read: &mut (impl AsyncBufRead + Unpin),
    line: &mut String,
) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        line.clear();
        read.read_line(line).await?;
        let size_text = line.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| anyhow::anyhow!("bad chunk size line {line:?}"))?;
        if size == 0 {
            // Trailers, if any, end with an empty line.
            loop {
                line.clear();
                read.read_line(line).await?;
                if line == "\r\n" || line.is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size + 2, 0);
        read.read_exact(&mut body[start..]).await?;
        body.truncate(start + size);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
