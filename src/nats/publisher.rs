//! walstream's own NATS connection for publishing events: the protocol's handshake, then each
//! publish written straight into the send buffer. async-nats takes a publish's headers only as
//! a hash map (every name hashed, the map grown, each value its own `String`), which cost more
//! per event than all of walstream's own work (BENCHMARKS.md, session 23); async-nats still
//! carries everything else, the acknowledgements' subscriptions and JetStream's API included.
//!
//! A broken connection fails the publish that finds it so; the next publish connects again,
//! to the configured servers first, then to those the cluster announced (`connect_urls`), as
//! async-nats does. What was written but not yet acknowledged is the sink's to settle, as after
//! any failure.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::ServerAddr;
use base64::Engine as _;
use bytes::BytesMut;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::wire::{self, HeaderBlock};
use crate::config::NatsConfig;
use crate::secrets::redact_urls;

/// How long connecting to one server, and its handshake, may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Written but not yet on the socket beyond this, a publish waits for the socket.
const BUFFER_HIGH_WATER: usize = 4 << 20;
/// The longest protocol line walstream reads (an `INFO` with a cluster's URLs fits).
const MAX_LINE: usize = 1 << 20;

/// Why a publish could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("message of {size} bytes is larger than the server's max_payload of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("`{0}` is not a subject a message can be published to")]
    InvalidSubject(String),
    #[error("{0}")]
    Disconnected(String),
}

/// A connection for publishing, opened on first use and again after it broke.
pub struct Publisher {
    servers: Vec<ServerAddr>,
    /// The servers the cluster announced on the last connection, beyond `servers`.
    discovered: Vec<ServerAddr>,
    config: NatsConfig,
    connection: Option<Connection>,
}

impl Publisher {
    /// Connects to the first of `config`'s servers that answers, retrying with backoff until
    /// one does or `give_up_after` passes.
    pub async fn connect(config: &NatsConfig, give_up_after: Duration) -> anyhow::Result<Self> {
        let mut publisher = Self {
            servers: super::connect::parse_servers(&config.url)?,
            discovered: Vec::new(),
            config: config.clone(),
            connection: None,
        };
        let mut backoff = crate::backoff::Backoff::new();
        loop {
            match publisher.connection().await {
                Ok(_) => return Ok(publisher),
                Err(error) if backoff.elapsed() < give_up_after => {
                    tracing::warn!("NATS publisher: {error}; retrying in {:?}", backoff.peek());
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(error) => anyhow::bail!("NATS publisher: {error}"),
            }
        }
    }

    /// Publishes `payload`, optionally with `headers`, the answer (if any) to go to `reply`.
    /// Returns once the message is in the send buffer.
    pub async fn publish(
        &mut self,
        subject: &str,
        reply: Option<&str>,
        headers: Option<&HeaderBlock>,
        payload: &[u8],
    ) -> Result<(), PublishError> {
        if !wire::fits_protocol_line(subject) {
            return Err(PublishError::InvalidSubject(subject.to_owned()));
        }
        let connection = self.connection().await?;
        let size = headers.map_or(0, HeaderBlock::wire_len) + payload.len();
        if size > connection.max_payload {
            return Err(PublishError::TooLarge {
                size,
                max: connection.max_payload,
            });
        }
        let buffered = {
            let mut outbox = connection.shared.outbox();
            if let Some(why) = outbox.broken.clone() {
                drop(outbox);
                self.drop_connection();
                return Err(PublishError::Disconnected(why));
            }
            wire::write_publish(&mut outbox.pending, subject, reply, headers, payload);
            outbox.pending.len()
        };
        connection.shared.wake_writer.notify_one();
        if buffered > BUFFER_HIGH_WATER {
            connection.shared.drained().await;
        }
        Ok(())
    }

    /// The open connection, or a new one. One that broke is found so, and forgotten, by the
    /// publish that writes to it, under the lock it writes with.
    async fn connection(&mut self) -> Result<&Connection, PublishError> {
        if self.connection.is_none() {
            self.connection = Some(self.open_any().await?);
        }
        Ok(self
            .connection
            .as_ref()
            .unwrap_or_else(|| unreachable!("opened above")))
    }

    /// Forgets a broken connection, keeping the servers its cluster announced.
    fn drop_connection(&mut self) {
        if let Some(connection) = self.connection.take() {
            let announced = connection.shared.announced();
            self.discovered = announced
                .iter()
                .filter_map(|host_port| format!("nats://{host_port}").parse::<ServerAddr>().ok())
                .filter(|found| {
                    !self
                        .servers
                        .iter()
                        .any(|known| known.host() == found.host() && known.port() == found.port())
                })
                .collect();
        }
    }

    async fn open_any(&self) -> Result<Connection, PublishError> {
        let mut errors = Vec::new();
        for server in self.servers.iter().chain(&self.discovered) {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, open(server, &self.config)).await {
                Ok(Ok(connection)) => {
                    tracing::info!(
                        "NATS publisher connected to {}",
                        redact_urls(server.as_url_str())
                    );
                    return Ok(connection);
                }
                Ok(Err(e)) => errors.push(format!("{}: {e}", redact_urls(server.as_url_str()))),
                Err(_) => errors.push(format!(
                    "{}: no handshake within {HANDSHAKE_TIMEOUT:?}",
                    redact_urls(server.as_url_str())
                )),
            }
        }
        Err(PublishError::Disconnected(format!(
            "cannot connect to publish: {}",
            errors.join("; ")
        )))
    }
}

/// One open connection: the buffer publishes go into, and the tasks that write it to the
/// socket and answer the server's pings.
struct Connection {
    shared: Arc<Shared>,
    max_payload: usize,
    tasks: [AbortHandle; 2],
}

impl Drop for Connection {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct Shared {
    outbox: Mutex<Outbox>,
    wake_writer: Notify,
    drained: Notify,
    /// `host:port` of the cluster's servers, as its last `INFO` announced them.
    announced: Mutex<Vec<String>>,
}

struct Outbox {
    pending: BytesMut,
    /// Why the connection is unusable, once it is.
    broken: Option<String>,
}

impl Shared {
    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        // A panic while holding the lock leaves only bytes behind: still a buffer.
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn announced(&self) -> Vec<String> {
        self.announced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn announce(&self, info: ServerInfo) {
        if !info.connect_urls.is_empty() {
            *self.announced.lock().unwrap_or_else(|e| e.into_inner()) = info.connect_urls;
        }
    }

    fn break_with(&self, why: String) {
        self.outbox().broken.get_or_insert(why);
        self.drained.notify_waiters();
    }

    /// Until the buffer is below its high water mark, or the connection broke.
    async fn drained(&self) {
        loop {
            let drained = self.drained.notified();
            {
                let outbox = self.outbox();
                if outbox.pending.len() <= BUFFER_HIGH_WATER || outbox.broken.is_some() {
                    return;
                }
            }
            drained.await;
        }
    }
}

/// The server's `INFO`, what walstream reads of it.
#[derive(Debug, Deserialize)]
struct ServerInfo {
    #[serde(default)]
    max_payload: usize,
    #[serde(default)]
    tls_required: bool,
    #[serde(default)]
    headers: bool,
    nonce: Option<String>,
    #[serde(default)]
    connect_urls: Vec<String>,
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

async fn open(server: &ServerAddr, config: &NatsConfig) -> anyhow::Result<Connection> {
    if server.is_websocket() {
        anyhow::bail!("walstream publishes over the NATS protocol, not websockets: use nats://");
    }
    let tcp = TcpStream::connect((server.host(), server.port())).await?;
    tcp.set_nodelay(true)?;
    let mut plain = BufReader::new(tcp);
    let info = read_info(&mut plain).await?;
    anyhow::ensure!(
        info.headers,
        "the server does not take headers (nats-server 2.2 or later does)"
    );
    anyhow::ensure!(
        plain.buffer().is_empty(),
        "the server sent more than its INFO before the handshake"
    );
    let tls = info.tls_required || server.tls_required() || wants_tls(config);
    let (reader, mut writer): (Reader, Writer) = if tls {
        let connector = tokio_rustls::TlsConnector::from(Arc::new(crate::tls::nats_client(
            config.tls_ca_file.as_deref(),
            config.tls_client_cert.as_deref(),
            config.tls_client_key.as_deref(),
        )?));
        let name = rustls_pki_types::ServerName::try_from(server.host().to_owned())?;
        let stream = connector.connect(name, plain.into_inner()).await?;
        let (reader, writer) = tokio::io::split(stream);
        (Box::new(reader), Box::new(writer))
    } else {
        let (reader, writer) = plain.into_inner().into_split();
        (Box::new(reader), Box::new(writer))
    };
    let connect = connect_message(server, config, &info, tls)?;
    writer
        .write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
        .await?;
    writer.flush().await?;
    let mut reader = BufReader::new(reader);
    await_pong(&mut reader).await?;
    let shared = Arc::new(Shared {
        outbox: Mutex::new(Outbox {
            pending: BytesMut::with_capacity(64 * 1024),
            broken: None,
        }),
        wake_writer: Notify::new(),
        drained: Notify::new(),
        announced: Mutex::new(Vec::new()),
    });
    let max_payload = match info.max_payload {
        0 => 1 << 20,
        max => max,
    };
    shared.announce(info);
    let writing = tokio::spawn(write_loop(writer, shared.clone()));
    let reading = tokio::spawn(read_loop(reader, shared.clone()));
    Ok(Connection {
        shared,
        max_payload,
        tasks: [writing.abort_handle(), reading.abort_handle()],
    })
}

fn wants_tls(config: &NatsConfig) -> bool {
    config.tls_required || config.tls_ca_file.is_some() || config.tls_client_cert.is_some()
}

async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    line: &mut Vec<u8>,
) -> anyhow::Result<()> {
    line.clear();
    let read = (&mut *reader)
        .take(MAX_LINE as u64)
        .read_until(b'\n', line)
        .await?;
    anyhow::ensure!(read > 0, "the server closed the connection");
    anyhow::ensure!(
        line.ends_with(b"\n"),
        "the server sent a line longer than {MAX_LINE} bytes"
    );
    while line.last().is_some_and(|b| b.is_ascii_whitespace()) {
        line.pop();
    }
    Ok(())
}

async fn read_info<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> anyhow::Result<ServerInfo> {
    let mut line = Vec::new();
    read_line(reader, &mut line).await?;
    let json = line
        .strip_prefix(b"INFO ")
        .ok_or_else(|| anyhow::anyhow!("not a NATS server: it did not start with INFO"))?;
    Ok(serde_json::from_slice(json)?)
}

async fn await_pong<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> anyhow::Result<()> {
    let mut line = Vec::new();
    loop {
        read_line(reader, &mut line).await?;
        match line.as_slice() {
            b"PONG" => return Ok(()),
            err if err.starts_with(b"-ERR") => anyhow::bail!(
                "the server refused walstream: {}",
                String::from_utf8_lossy(&err[4..]).trim()
            ),
            // INFO updates and +OK before the PONG.
            _ => {}
        }
    }
}

/// The `CONNECT` JSON: no echo of `+OK`s, headers, and the configured credentials.
fn connect_message(
    server: &ServerAddr,
    config: &NatsConfig,
    info: &ServerInfo,
    tls: bool,
) -> anyhow::Result<String> {
    let mut connect = serde_json::json!({
        "verbose": false,
        "pedantic": false,
        "tls_required": tls,
        "name": "walstream-publisher",
        "lang": "rust",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": 1,
        "headers": true,
        "no_responders": true,
    });
    let fields = connect
        .as_object_mut()
        .unwrap_or_else(|| unreachable!("built as an object"));
    let sign = |seed: &str| -> anyhow::Result<(String, String)> {
        let key = nkeys::KeyPair::from_seed(seed)
            .map_err(|e| anyhow::anyhow!("not an nkey seed: {e}"))?;
        let nonce = info.nonce.as_deref().ok_or_else(|| {
            anyhow::anyhow!("the server sent no nonce to sign; it does not take nkeys")
        })?;
        let signature = key
            .sign(nonce.as_bytes())
            .map_err(|e| anyhow::anyhow!("cannot sign the server's nonce: {e}"))?;
        Ok((
            key.public_key(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature),
        ))
    };
    if let Some(path) = &config.credentials_file {
        let contents = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("nats.credentials_file {}: {e}", path.display()))?;
        let (jwt, seed) = credentials(&contents).ok_or_else(|| {
            anyhow::anyhow!(
                "nats.credentials_file {}: holds no user JWT and seed",
                path.display()
            )
        })?;
        let (_, signature) = sign(seed)?;
        fields.insert("jwt".into(), jwt.into());
        fields.insert("sig".into(), signature.into());
    }
    if let Some(seed) = &config.nkey_seed {
        let (public, signature) = sign(seed)?;
        fields.insert("nkey".into(), public.into());
        fields.insert("sig".into(), signature.into());
    }
    if let Some(token) = &config.token {
        fields.insert("auth_token".into(), token.as_str().into());
    }
    let user = config.user.as_deref().or(server.username());
    let password = config.password.as_deref().or(server.password());
    match (user, password) {
        (Some(user), Some(password)) => {
            fields.insert("user".into(), user.into());
            fields.insert("pass".into(), password.into());
        }
        // A URL's lone user name is a token, as async-nats reads it.
        (Some(token), None) if config.token.is_none() => {
            fields.insert("auth_token".into(), token.into());
        }
        _ => {}
    }
    Ok(connect.to_string())
}

/// The user JWT and nkey seed of a NATS credentials file: the first and second blocks
/// between `-----BEGIN …-----` and `------END …------` lines.
fn credentials(contents: &str) -> Option<(&str, &str)> {
    let mut lines = contents.lines().map(str::trim);
    let mut values = std::iter::from_fn(|| {
        lines
            .by_ref()
            .find(|line| is_delimiter(line) && line.contains("BEGIN"))?;
        lines
            .by_ref()
            .find(|line| !line.is_empty())
            .filter(|line| !is_delimiter(line))
    });
    Some((values.next()?, values.next()?))
}

fn is_delimiter(line: &str) -> bool {
    line.len() > 6 && line.starts_with("---") && line.ends_with("---")
}

/// Writes what publishes put in the buffer, as much as has gathered at a time.
async fn write_loop(mut writer: Writer, shared: Arc<Shared>) {
    let mut writing = BytesMut::with_capacity(64 * 1024);
    loop {
        {
            let mut outbox = shared.outbox();
            if outbox.broken.is_some() {
                return;
            }
            std::mem::swap(&mut outbox.pending, &mut writing);
        }
        if writing.is_empty() {
            shared.drained.notify_waiters();
            shared.wake_writer.notified().await;
            continue;
        }
        let written = async {
            writer.write_all(&writing).await?;
            writer.flush().await
        }
        .await;
        writing.clear();
        if let Err(e) = written {
            shared.break_with(format!("NATS connection lost while publishing: {e}"));
            return;
        }
    }
}

/// Answers the server's pings and notes why it closed the connection.
async fn read_loop(mut reader: BufReader<Reader>, shared: Arc<Shared>) {
    let mut line = Vec::new();
    let mut last_error = None;
    loop {
        if let Err(e) = read_line(&mut reader, &mut line).await {
            let why = match last_error {
                Some(error) => format!("the NATS server closed the connection: {error}"),
                None => format!("NATS connection lost: {e}"),
            };
            shared.break_with(why);
            shared.wake_writer.notify_one();
            return;
        }
        match line.as_slice() {
            b"PING" => {
                shared.outbox().pending.extend_from_slice(b"PONG\r\n");
                shared.wake_writer.notify_one();
            }
            err if err.starts_with(b"-ERR") => {
                let error = String::from_utf8_lossy(&err[4..]).trim().to_owned();
                tracing::warn!("NATS publisher: the server says {error}");
                last_error = Some(error);
            }
            info if info.starts_with(b"INFO ") => {
                if let Ok(info) = serde_json::from_slice(&info[5..]) {
                    shared.announce(info);
                }
            }
            // PONG, +OK: nothing to do. walstream subscribes to nothing here.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::credentials;

    #[test]
    fn a_credentials_file_gives_its_jwt_and_seed() {
        let file = "-----BEGIN NATS USER JWT-----\n\
                    eyJ0eXAi.payload.sig\n\
                    ------END NATS USER JWT------\n\
                    \n\
                    ************************* IMPORTANT *************************\n\
                    NKEY Seed printed below can be used to sign and prove identity.\n\
                    \n\
                    -----BEGIN USER NKEY SEED-----\n\
                    SUAIBDPBAUTWCWBKIO6XHQNINK5FWJW4OHLXC3HQ2KFE4PEJUA44CNHTC4\n\
                    ------END USER NKEY SEED------\n\
                    \n\
                    *************************************************************\n";
        assert_eq!(
            credentials(file),
            Some((
                "eyJ0eXAi.payload.sig",
                "SUAIBDPBAUTWCWBKIO6XHQNINK5FWJW4OHLXC3HQ2KFE4PEJUA44CNHTC4"
            ))
        );
    }

    #[test]
    fn a_file_without_both_blocks_gives_nothing() {
        assert_eq!(credentials(""), None);
        assert_eq!(credentials("just text\n"), None);
        assert_eq!(
            credentials("-----BEGIN NATS USER JWT-----\njwt\n------END NATS USER JWT------\n"),
            None
        );
    }
}
