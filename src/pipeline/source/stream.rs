//! The slot's stream, read by a task of its own: it hands the driver whole messages a socket
//! read at a time (not one channel message per change), and keeps PostgreSQL hearing from
//! walstream, status updates on time and answers to keepalives, also while the driver waits
//! on NATS.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::protocol::{self, tag, Frame, ProtocolError, ServerError, WalMessage, HEADER_LEN};
use super::session::{Link, Session, SessionError, READ_SIZE};
use crate::lsn::Lsn;
use crate::pipeline::event::pg_micros_now;

/// Socket reads handed over and not yet taken by the driver: with 64 KiB reads, about 1 MiB.
const READS_IN_FLIGHT: usize = 16;
/// How long closing waits for the last status update and CopyDone to be written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the driver and the reader task share.
struct Shared {
    /// The position the next status update confirms.
    confirmed: AtomicU64,
    /// Asks for a status update now rather than at the next interval.
    report_now: Notify,
}

/// A slot being streamed. Dropping it drops the connection.
pub struct ReplicationStream {
    reads: mpsc::Receiver<Result<Bytes, SessionError>>,
    /// What is left of the read being taken apart: whole backend messages.
    pending: Bytes,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    reader: JoinHandle<()>,
}

impl ReplicationStream {
    /// Sends `command` (START_REPLICATION) on `session` and, once the server streams, hands
    /// the connection to a reader task that confirms `confirmed` until told more.
    pub(super) async fn start(
        mut session: Session,
        command: &str,
        confirmed: Lsn,
        status_interval: Duration,
    ) -> Result<ReplicationStream, SessionError> {
        session.start_replication(command).await?;
        Ok(Self::over(
            session.link,
            session.input,
            confirmed,
            status_interval,
        ))
    }

    /// Streams over `link`, once the server streams on it; `input` holds what was read of it
    /// already.
    fn over(
        link: Box<dyn Link>,
        input: BytesMut,
        confirmed: Lsn,
        status_interval: Duration,
    ) -> ReplicationStream {
        let shared = Arc::new(Shared {
            confirmed: AtomicU64::new(confirmed.0),
            report_now: Notify::new(),
        });
        let (handed, reads) = mpsc::channel(READS_IN_FLIGHT);
        let (stop, stopped) = oneshot::channel();
        let reader = Reader {
            link,
            input,
            output: BytesMut::new(),
            shared: shared.clone(),
            status_interval,
            handed,
        };
        ReplicationStream {
            reads,
            pending: Bytes::new(),
            shared,
            stop: Some(stop),
            reader: tokio::spawn(reader.run(stopped)),
        }
    }

    /// The walsender's next message; `None` once the reader has stopped. Cancel-safe: a
    /// message is taken only when it is returned.
    pub async fn recv(&mut self) -> Result<Option<WalMessage>, SessionError> {
        loop {
            if let Some(message) = self.next_pending()? {
                return Ok(Some(message));
            }
            match self.reads.recv().await {
                Some(Ok(read)) => self.pending = read,
                Some(Err(error)) => return Err(error),
                None => return Ok(None),
            }
        }
    }

    fn next_pending(&mut self) -> Result<Option<WalMessage>, SessionError> {
        while let Some(frame) = Frame::peek(&self.pending)? {
            if frame.len > self.pending.len() {
                return Err(ProtocolError::Truncated {
                    kind: "handed over",
                    len: self.pending.len(),
                }
                .into());
            }
            let body = frame.take_body(&mut self.pending);
            if frame.tag == tag::COPY_DATA {
                return Ok(Some(protocol::decode_copy_data(body)?));
            }
            // A notice or a changed parameter between messages: nothing to stream.
        }
        Ok(None)
    }

    /// Confirms `lsn` to PostgreSQL with the next status update.
    pub fn confirm(&self, lsn: Lsn) {
        self.shared.confirmed.fetch_max(lsn.0, Ordering::Relaxed);
    }

    /// Confirms `lsn` with a status update sent now.
    pub fn confirm_now(&self, lsn: Lsn) {
        self.confirm(lsn);
        self.shared.report_now.notify_one();
    }

    /// Sends the last status update and CopyDone, and closes the connection.
    pub async fn close(mut self) -> Result<(), SessionError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(CLOSE_TIMEOUT, &mut self.reader).await {
            Ok(_) => Ok(()),
            Err(_) => Err(SessionError::Unexpected(format!(
                "the connection did not close within {CLOSE_TIMEOUT:?}"
            ))),
        }
    }
}

impl Drop for ReplicationStream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// How the reader's pumping ended without an error.
enum Ended {
    /// The driver asked it to stop: close politely.
    Stopped,
    /// The driver is gone.
    Abandoned,
}

/// The reader task: owns the connection once it streams.
struct Reader {
    link: Box<dyn Link>,
    /// Bytes read; whole messages are handed over from its front.
    input: BytesMut,
    output: BytesMut,
    shared: Arc<Shared>,
    status_interval: Duration,
    handed: mpsc::Sender<Result<Bytes, SessionError>>,
}

impl Reader {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        match self.pump(&mut stop).await {
            Ok(Ended::Stopped) => self.finish().await,
            Ok(Ended::Abandoned) => {}
            Err(error) => {
                let _ = self.handed.send(Err(error)).await;
            }
        }
    }

    async fn pump(&mut self, stop: &mut oneshot::Receiver<()>) -> Result<Ended, SessionError> {
        // The first status update goes out at once, as a standby's does.
        let mut next_status = Instant::now();
        // The session may have read the first messages with the answer to START_REPLICATION.
        if let Some(ended) = self.pass_on(stop, &mut next_status).await? {
            return Ok(ended);
        }
        loop {
            tokio::select! {
                biased;
                _ = &mut *stop => return Ok(Ended::Stopped),
                () = self.shared.report_now.notified() => self.report(&mut next_status).await?,
                () = tokio::time::sleep_until(next_status) => self.report(&mut next_status).await?,
                read = self.link.read_buf(&mut self.input) => {
                    if read? == 0 {
                        return Err(SessionError::Closed);
                    }
                    if let Some(ended) = self.pass_on(stop, &mut next_status).await? {
                        return Ok(ended);
                    }
                }
            }
        }
    }

    /// Answers a keepalive that asks for it, and hands the whole messages read to the driver.
    async fn pass_on(
        &mut self,
        stop: &mut oneshot::Receiver<()>,
        next_status: &mut Instant,
    ) -> Result<Option<Ended>, SessionError> {
        let (messages, reply_now) = self.whole_messages()?;
        if reply_now {
            self.report(next_status).await?;
        }
        match messages {
            Some(messages) => self.hand_over(messages, stop, next_status).await,
            None => Ok(None),
        }
    }

    /// Splits off the whole messages at the front of the input, and tells whether one is a
    /// keepalive that wants an answer now. An ErrorResponse or CopyDone ends the stream.
    fn whole_messages(&mut self) -> Result<(Option<Bytes>, bool), SessionError> {
        let (mut end, mut room_needed, mut reply_now) = (0, 0, false);
        while let Some(frame) = Frame::peek(&self.input[end..])? {
            let available = self.input.len() - end;
            if available < frame.len {
                room_needed = frame.len - available;
                break;
            }
            let body = &self.input[end + HEADER_LEN..end + frame.len];
            match frame.tag {
                tag::COPY_DATA => reply_now |= protocol::wants_reply(body),
                tag::ERROR_RESPONSE => return Err(ServerError::parse(body).into()),
                tag::COPY_DONE => {
                    return Err(SessionError::Unexpected(
                        "the server ended the stream (CopyDone)".into(),
                    ))
                }
                _ => {}
            }
            end += frame.len;
        }
        let messages = (end > 0).then(|| self.input.split_to(end).freeze());
        let spare = self.input.capacity() - self.input.len();
        if spare < room_needed.max(READ_SIZE / 4) {
            self.input.reserve(room_needed.max(READ_SIZE));
        }
        Ok((messages, reply_now))
    }

    /// Hands a read's messages to the driver, waiting for room while status updates go on.
    async fn hand_over(
        &mut self,
        messages: Bytes,
        stop: &mut oneshot::Receiver<()>,
        next_status: &mut Instant,
    ) -> Result<Option<Ended>, SessionError> {
        match self.handed.try_reserve() {
            Ok(room) => {
                room.send(Ok(messages));
                return Ok(None);
            }
            Err(mpsc::error::TrySendError::Closed(())) => return Ok(Some(Ended::Abandoned)),
            Err(mpsc::error::TrySendError::Full(())) => {}
        }
        loop {
            // The room borrows the sender: the status update waits until the select is over.
            tokio::select! {
                biased;
                _ = &mut *stop => return Ok(Some(Ended::Stopped)),
                room = self.handed.reserve() => {
                    return Ok(match room {
                        Ok(room) => {
                            room.send(Ok(messages));
                            None
                        }
                        Err(_) => Some(Ended::Abandoned),
                    });
                }
                () = tokio::time::sleep_until(*next_status) => {}
            }
            self.report(next_status).await?;
        }
    }

    /// A standby status update with what the driver confirmed.
    async fn report(&mut self, next_status: &mut Instant) -> Result<(), SessionError> {
        self.queue_status_update();
        self.send().await?;
        *next_status = Instant::now() + self.status_interval;
        Ok(())
    }

    /// Stopping: the last status update, CopyDone, Terminate.
    async fn finish(&mut self) {
        self.queue_status_update();
        protocol::copy_done(&mut self.output);
        frontend::terminate(&mut self.output);
        if let Err(error) = self.send().await {
            tracing::debug!("closing the replication stream: {error}");
        }
        let _ = self.link.shutdown().await;
    }

    fn queue_status_update(&mut self) {
        let confirmed = Lsn(self.shared.confirmed.load(Ordering::Relaxed));
        protocol::status_update(confirmed, pg_micros_now(), &mut self.output);
    }

    async fn send(&mut self) -> Result<(), SessionError> {
        self.link.write_all(&self.output).await?;
        self.link.flush().await?;
        self.output.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;
    use crate::pipeline::source::protocol::capture;

    /// A stream over an in-memory link confirming `confirmed`, and the server's end of it.
    fn over_memory(confirmed: Lsn) -> (ReplicationStream, DuplexStream) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let stream = ReplicationStream::over(
            Box::new(client),
            BytesMut::new(),
            confirmed,
            Duration::from_secs(3600),
        );
        (stream, server)
    }

    /// The next status update the reader wrote: the position it confirms.
    async fn next_status_update(server: &mut DuplexStream) -> Lsn {
        let mut frame = [0; 39];
        let read = tokio::time::timeout(Duration::from_secs(10), server.read_exact(&mut frame));
        read.await.expect("a status update within 10 s").unwrap();
        assert_eq!(&frame[..6], &[b'd', 0, 0, 0, 38, b'r']);
        Lsn(u64::from_be_bytes(frame[6..14].try_into().unwrap()))
    }

    /// The captured stream, written in pieces cut anywhere (inside headers too), arrives as
    /// the same messages; keepalives asking for it get a status update at once, with what the
    /// driver confirmed; closing confirms, ends the stream and terminates the session.
    #[tokio::test]
    async fn messages_cut_anywhere_arrive_whole_and_keepalives_are_answered() {
        let bytes = capture::captured();
        let expected = capture::messages();
        for cut in [1, 2, 3, 5, 7, 64, bytes.len()] {
            let (mut stream, mut server) = over_memory(Lsn(7));
            // A standby's first status update goes out at once.
            assert_eq!(next_status_update(&mut server).await, Lsn(7));
            // The reader takes each piece before the next is written: a read that ends
            // inside a message.
            for piece in bytes.chunks(cut) {
                server.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            let mut received = Vec::new();
            while received.len() < expected.len() {
                received.push(stream.recv().await.unwrap().unwrap());
            }
            assert_eq!(received, expected, "cut every {cut} bytes");

            stream.confirm(Lsn(0x1787DF0));
            let mut asking = capture::first_message().to_vec();
            asking[HEADER_LEN + protocol::REPLY_FLAG] = 1;
            server.write_all(&asking).await.unwrap();
            assert_eq!(next_status_update(&mut server).await, Lsn(0x1787DF0));
            assert!(matches!(
                stream.recv().await.unwrap(),
                Some(WalMessage::KeepAlive {
                    reply_requested: true,
                    ..
                })
            ));

            stream.close().await.unwrap();
            assert_eq!(next_status_update(&mut server).await, Lsn(0x1787DF0));
            let mut ending = Vec::new();
            server.read_to_end(&mut ending).await.unwrap();
            assert_eq!(ending, [b'c', 0, 0, 0, 4, b'X', 0, 0, 0, 4]);
        }
    }

    /// An ErrorResponse ends the stream with the server's words, after the messages before it.
    #[tokio::test]
    async fn a_server_error_ends_the_stream_with_its_words() {
        let (mut stream, mut server) = over_memory(Lsn(0));
        let mut bytes = capture::first_message().to_vec();
        let body =
            b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0";
        bytes.push(b'E');
        bytes.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        bytes.extend_from_slice(body);
        server.write_all(&bytes).await.unwrap();
        let error = loop {
            match stream.recv().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("ended without the error"),
                Err(error) => break error,
            }
        };
        assert_eq!(
            error.to_string(),
            "FATAL: terminating connection due to administrator command (SQLSTATE 57P01)"
        );
    }
}
