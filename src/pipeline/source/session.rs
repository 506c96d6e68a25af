//! One replication connection to PostgreSQL before it streams: connects (TCP, a Unix socket,
//! TLS), logs in, and runs replication commands and SQL over the simple query protocol.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::protocol::{tag, Frame, ProtocolError, ServerError, HEADER_LEN};

/// Bytes asked of the socket at a time; a message longer than this gets room of its own.
pub(super) const READ_SIZE: usize = 64 * 1024;

/// Why a replication connection failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Server(#[from] ServerError),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("login: {0}")]
    Login(String),
    #[error("the server closed the connection")]
    Closed,
    #[error("{0}")]
    Unexpected(String),
}

/// Who walstream logs in as, and how the connection is set up.
#[derive(Clone)]
pub struct Login {
    pub user: String,
    pub password: String,
    pub database: String,
    pub application_name: String,
    /// Session settings (`-c name=value …`), as libpq's `options`.
    pub options: &'static str,
    /// The TLS client setup; `None` for plaintext (`sslmode=disable`).
    pub tls: Option<Arc<ClientConfig>>,
}

/// A socket, with or without TLS.
pub(super) trait Link: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Link for T {}

/// A logged-in replication connection, between commands.
pub struct Session {
    pub(super) link: Box<dyn Link>,
    /// Bytes read and not yet taken as messages.
    pub(super) input: BytesMut,
    output: BytesMut,
}

/// One row of a simple query's answer, each column as text (`None` for NULL).
pub type Row = Vec<Option<String>>;

/// A backend message, or the CopyBothResponse postgres-protocol does not know.
enum Reply {
    CopyBoth,
    Other(Message),
}

impl Session {
    /// Connects to `host` (a directory means a Unix socket there, as with libpq) and logs in.
    pub async fn connect(login: &Login, host: &str, port: u16) -> Result<Session, SessionError> {
        let link: Box<dyn Link> = if host.starts_with('/') {
            // libpq never uses TLS on a Unix socket either: the link does not leave the host.
            Box::new(UnixStream::connect(format!("{host}/.s.PGSQL.{port}")).await?)
        } else {
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            match &login.tls {
                Some(tls) => Box::new(start_tls(tcp, tls, host).await?),
                None => Box::new(tcp),
            }
        };
        let mut session = Session {
            link,
            input: BytesMut::with_capacity(READ_SIZE),
            output: BytesMut::new(),
        };
        session.log_in(login).await?;
        Ok(session)
    }

    async fn log_in(&mut self, login: &Login) -> Result<(), SessionError> {
        let parameters = [
            ("user", login.user.as_str()),
            ("database", login.database.as_str()),
            ("replication", "database"),
            ("client_encoding", "UTF8"),
            ("application_name", login.application_name.as_str()),
            ("options", login.options),
        ];
        frontend::startup_message(parameters, &mut self.output)?;
        self.send().await?;
        loop {
            match self.next_message().await? {
                Reply::Other(Message::AuthenticationOk) => {}
                Reply::Other(Message::AuthenticationCleartextPassword) => {
                    frontend::password_message(login.password.as_bytes(), &mut self.output)?;
                    self.send().await?;
                }
                Reply::Other(Message::AuthenticationMd5Password(body)) => {
                    let hash = md5_hash(
                        login.user.as_bytes(),
                        login.password.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.output)?;
                    self.send().await?;
                }
                Reply::Other(Message::AuthenticationSasl(body)) => {
                    let mut mechanisms = body.mechanisms();
                    let mut scram = false;
                    while let Some(mechanism) = mechanisms.next()? {
                        scram |= mechanism == sasl::SCRAM_SHA_256;
                    }
                    if !scram {
                        return Err(SessionError::Login(
                            "the server offers no SASL mechanism walstream knows (SCRAM-SHA-256)"
                                .into(),
                        ));
                    }
                    self.scram(login).await?;
                }
                Reply::Other(Message::ReadyForQuery(_)) => return Ok(()),
                Reply::Other(
                    Message::ParameterStatus(_)
                    | Message::BackendKeyData(_)
                    | Message::NoticeResponse(_),
                ) => {}
                Reply::Other(
                    Message::AuthenticationKerberosV5
                    | Message::AuthenticationScmCredential
                    | Message::AuthenticationGss
                    | Message::AuthenticationSspi,
                ) => {
                    return Err(SessionError::Login(
                        "the server asks for Kerberos, GSSAPI or SSPI, which walstream does not \
                         speak; use scram-sha-256, md5, password or cert in pg_hba.conf"
                            .into(),
                    ))
                }
                _ => return Err(unexpected("logging in")),
            }
        }
    }

    /// SCRAM-SHA-256 without channel binding (`n`): walstream verifies the server by its
    /// certificate instead (sslmode=verify-full).
    async fn scram(&mut self, login: &Login) -> Result<(), SessionError> {
        let mut scram = sasl::ScramSha256::new(
            login.password.as_bytes(),
            sasl::ChannelBinding::unsupported(),
        );
        frontend::sasl_initial_response(sasl::SCRAM_SHA_256, scram.message(), &mut self.output)?;
        self.send().await?;
        let Reply::Other(Message::AuthenticationSaslContinue(body)) = self.next_message().await?
        else {
            return Err(unexpected("SCRAM's first answer"));
        };
        scram
            .update(body.data())
            .map_err(|e| SessionError::Login(format!("SCRAM: {e}")))?;
        frontend::sasl_response(scram.message(), &mut self.output)?;
        self.send().await?;
        let Reply::Other(Message::AuthenticationSaslFinal(body)) = self.next_message().await?
        else {
            return Err(unexpected("SCRAM's last answer"));
        };
        scram
            .finish(body.data())
            .map_err(|e| SessionError::Login(format!("SCRAM: the server's proof: {e}")))
    }

    /// Runs `sql` (SQL, or a replication command) and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>, SessionError> {
        frontend::query(sql, &mut self.output)?;
        self.send().await?;
        let mut rows = Vec::new();
        let mut failed = None;
        loop {
            match self.next_message_or_error().await? {
                Err(error) => failed = Some(error),
                Ok(Reply::Other(Message::DataRow(row))) => {
                    let buffer = row.buffer();
                    let mut columns = row.ranges();
                    let mut values = Vec::new();
                    while let Some(range) = columns.next()? {
                        values
                            .push(range.map(|r| String::from_utf8_lossy(&buffer[r]).into_owned()));
                    }
                    rows.push(values);
                }
                // The session is ready for the next command, also after an error.
                Ok(Reply::Other(Message::ReadyForQuery(_))) => {
                    return failed.map_or(Ok(rows), |e| Err(e.into()))
                }
                Ok(Reply::CopyBoth) => return Err(unexpected(sql)),
                Ok(Reply::Other(_)) => {}
            }
        }
    }

    /// The server's current timeline (IDENTIFY_SYSTEM).
    pub async fn timeline(&mut self) -> Result<u32, SessionError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let timeline = rows.first().and_then(|row| row.get(1)).cloned().flatten();
        timeline
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| SessionError::Unexpected("IDENTIFY_SYSTEM named no timeline".into()))
    }

    /// The history file of `timeline` (TIMELINE_HISTORY; there is none for timeline 1).
    pub async fn timeline_history(&mut self, timeline: u32) -> Result<String, SessionError> {
        let rows = self
            .simple_query(&format!("TIMELINE_HISTORY {timeline}"))
            .await?;
        let content = rows.first().and_then(|row| row.get(1)).cloned().flatten();
        content.ok_or_else(|| {
            SessionError::Unexpected(format!("TIMELINE_HISTORY {timeline} returned no file"))
        })
    }

    /// Sends START_REPLICATION and waits until the server streams: from then on the slot is
    /// this connection's.
    pub(super) async fn start_replication(&mut self, command: &str) -> Result<(), SessionError> {
        frontend::query(command, &mut self.output)?;
        self.send().await?;
        loop {
            match self.next_message().await? {
                Reply::CopyBoth => return Ok(()),
                Reply::Other(Message::NoticeResponse(_) | Message::ParameterStatus(_)) => {}
                Reply::Other(_) => return Err(unexpected("START_REPLICATION")),
            }
        }
    }

    /// Ends the session politely.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.output);
        let _ = self.send().await;
    }

    async fn send(&mut self) -> Result<(), SessionError> {
        self.link.write_all(&self.output).await?;
        self.link.flush().await?;
        self.output.clear();
        Ok(())
    }

    /// The next message; an ErrorResponse is an error.
    async fn next_message(&mut self) -> Result<Reply, SessionError> {
        Ok(self.next_message_or_error().await??)
    }

    /// The next message, an ErrorResponse apart: the session goes on after one.
    async fn next_message_or_error(&mut self) -> Result<Result<Reply, ServerError>, SessionError> {
        loop {
            if let Some(frame) = Frame::peek(&self.input)? {
                if self.input.len() >= frame.len {
                    return self.take(frame);
                }
                self.input.reserve(frame.len - self.input.len());
            }
            self.fill().await?;
        }
    }

    fn take(&mut self, frame: Frame) -> Result<Result<Reply, ServerError>, SessionError> {
        match frame.tag {
            tag::COPY_BOTH_RESPONSE => {
                self.input.advance(frame.len);
                Ok(Ok(Reply::CopyBoth))
            }
            tag::ERROR_RESPONSE => {
                let error = ServerError::parse(&self.input[HEADER_LEN..frame.len]);
                self.input.advance(frame.len);
                Ok(Err(error))
            }
            _ => match Message::parse(&mut self.input)? {
                Some(message) => Ok(Ok(Reply::Other(message))),
                None => Err(unexpected("a message cut short")),
            },
        }
    }

    async fn fill(&mut self) -> Result<(), SessionError> {
        if self.input.capacity() - self.input.len() < READ_SIZE / 4 {
            self.input.reserve(READ_SIZE);
        }
        match self.link.read_buf(&mut self.input).await? {
            0 => Err(SessionError::Closed),
            _ => Ok(()),
        }
    }
}

/// Asks for TLS (SSLRequest) and verifies the server as the URL's sslmode says.
async fn start_tls(
    mut tcp: TcpStream,
    tls: &Arc<ClientConfig>,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, SessionError> {
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await?;
    match tcp.read_u8().await? {
        b'S' => {}
        b'N' => {
            return Err(SessionError::Tls(
                "the server does not offer TLS; turn ssl on in postgresql.conf, or set \
                 sslmode=disable on a trusted link"
                    .into(),
            ))
        }
        other => {
            return Err(SessionError::Tls(format!(
                "the server answered the TLS request with {:?}",
                other as char
            )))
        }
    }
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| SessionError::Tls(format!("`{host}` is not a host name: {e}")))?;
    tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| SessionError::Tls(e.to_string()))
}

fn unexpected(when: &str) -> SessionError {
    SessionError::Unexpected(format!("an unexpected message from the server: {when}"))
}
