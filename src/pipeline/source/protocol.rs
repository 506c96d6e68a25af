//! The replication protocol's bytes, apart from I/O: backend message frames, what the
//! walsender sends inside CopyData, the standby status update, and a server error's text.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::lsn::Lsn;

/// Backend message tags the replication session reads itself.
pub mod tag {
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const ERROR_RESPONSE: u8 = b'E';
}

/// A backend message's tag and length word.
pub const HEADER_LEN: usize = 5;

/// PostgreSQL builds no message larger than 1 GiB (MaxAllocSize); a length beyond that is a
/// broken stream, not a row to make room for.
pub const MAX_MESSAGE_LEN: usize = 1 << 30;

/// What the protocol's bytes can get wrong.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("a backend message claims {0} bytes, beyond PostgreSQL's limit of 1 GiB")]
    TooLong(usize),
    #[error("a backend message claims a length of {0}, shorter than its length word")]
    TooShort(u32),
    #[error("a replication message ({kind}) ends early: {len} bytes")]
    Truncated { kind: &'static str, len: usize },
    #[error("an unknown replication message, tag {0:?}")]
    UnknownMessage(char),
}

/// A backend message's header: its tag and how long it is, header included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub len: usize,
}

impl Frame {
    /// The header at the start of `buf`; `None` until its five bytes are there.
    pub fn peek(buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        let Some(header) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if length < 4 {
            return Err(ProtocolError::TooShort(length));
        }
        let body = length as usize - 4;
        if body > MAX_MESSAGE_LEN {
            return Err(ProtocolError::TooLong(body));
        }
        Ok(Some(Frame {
            tag: header[0],
            len: HEADER_LEN + body,
        }))
    }

    /// The body of this frame, taken whole from the front of `buf`.
    pub fn take_body(self, buf: &mut Bytes) -> Bytes {
        let mut message = buf.split_to(self.len);
        message.advance(HEADER_LEN);
        message
    }
}

/// What the walsender sends inside CopyData.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalMessage {
    /// XLogData: one pgoutput message.
    Data(Bytes),
    /// Primary keepalive: where the server's WAL ends, and whether it wants an answer now.
    KeepAlive { wal_end: Lsn, reply_requested: bool },
}

/// XLogData: `w`, the data's start and the WAL's end, the server's clock, then the data.
const XLOG_DATA_HEADER: usize = 1 + 8 + 8 + 8;
/// Primary keepalive: `k`, the WAL's end, the server's clock, the reply flag.
const KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;
/// Where a keepalive's reply flag is.
pub(super) const REPLY_FLAG: usize = KEEPALIVE_LEN - 1;

/// Decodes a CopyData body of the replication stream.
pub fn decode_copy_data(mut body: Bytes) -> Result<WalMessage, ProtocolError> {
    match body.first() {
        Some(b'w') if body.len() >= XLOG_DATA_HEADER => {
            body.advance(XLOG_DATA_HEADER);
            Ok(WalMessage::Data(body))
        }
        Some(b'k') if body.len() >= KEEPALIVE_LEN => Ok(WalMessage::KeepAlive {
            wal_end: Lsn(u64::from_be_bytes(word(&body[1..9]))),
            reply_requested: body[REPLY_FLAG] != 0,
        }),
        Some(b'w') => Err(truncated("XLogData", &body)),
        Some(b'k') => Err(truncated("keepalive", &body)),
        Some(&other) => Err(ProtocolError::UnknownMessage(other as char)),
        None => Err(truncated("empty", &body)),
    }
}

/// Whether a CopyData body is a keepalive that asks for an answer at once.
pub fn wants_reply(body: &[u8]) -> bool {
    body.len() >= KEEPALIVE_LEN && body[0] == b'k' && body[REPLY_FLAG] != 0
}

fn truncated(kind: &'static str, body: &[u8]) -> ProtocolError {
    ProtocolError::Truncated {
        kind,
        len: body.len(),
    }
}

fn word(bytes: &[u8]) -> [u8; 8] {
    let mut word = [0; 8];
    word.copy_from_slice(bytes);
    word
}

/// Appends a standby status update, in its CopyData frame, reporting `confirmed` as written,
/// flushed and applied: for a logical slot, the flush position is what PostgreSQL keeps as
/// the slot's confirmed position.
pub fn status_update(confirmed: Lsn, client_clock_pg_micros: i64, out: &mut BytesMut) {
    out.put_u8(tag::COPY_DATA);
    out.put_u32(4 + 1 + 8 * 4 + 1);
    out.put_u8(b'r');
    for _ in 0..3 {
        out.put_u64(confirmed.0);
    }
    out.put_i64(client_clock_pg_micros);
    // No reply wanted: PostgreSQL's keepalives come on their own.
    out.put_u8(0);
}

/// Appends CopyDone: walstream ends the stream.
pub fn copy_done(out: &mut BytesMut) {
    out.put_u8(tag::COPY_DONE);
    out.put_u32(4);
}

/// An ErrorResponse: what PostgreSQL refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ServerError {
    /// Reads the fields of an ErrorResponse body; the ones it lacks stay empty.
    pub fn parse(body: &[u8]) -> ServerError {
        let mut error = ServerError {
            severity: String::new(),
            code: String::new(),
            message: String::new(),
            detail: None,
            hint: None,
        };
        let mut fields = body;
        while let [kind, rest @ ..] = fields {
            if *kind == 0 {
                break;
            }
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            let value = String::from_utf8_lossy(&rest[..end]).into_owned();
            match kind {
                // V is the severity untranslated (9.6+); S may be in the server's language.
                b'V' => error.severity = value,
                b'S' if error.severity.is_empty() => error.severity = value,
                b'C' => error.code = value,
                b'M' => error.message = value,
                b'D' => error.detail = Some(value),
                b'H' => error.hint = Some(value),
                _ => {}
            }
            fields = rest.get(end + 1..).unwrap_or_default();
        }
        error
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = if self.severity.is_empty() {
            "ERROR"
        } else {
            &self.severity
        };
        write!(f, "{severity}: {}", self.message)?;
        if !self.code.is_empty() {
            write!(f, " (SQLSTATE {})", self.code)?;
        }
        if let Some(detail) = &self.detail {
            write!(f, "; {detail}")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "; hint: {hint}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod capture {
    //! Real bytes of a replication stream, for the tests of this module and of the reader.
    use bytes::Bytes;

    /// What PostgreSQL 18.4's walsender sent after CopyBothResponse for one committed INSERT
    /// (`INSERT INTO t VALUES (1, 'real bytes')`), read off the socket of pg_recvlogical with
    /// strace: a keepalive, XLogData holding Begin, Relation, Insert and Commit, a keepalive.
    pub const CAPTURED: [&str; 6] = [
        "64000000166b0000000001787cd80003050c7595603000",
        "6400000032770000000001787cd80000000001787cd80003050c759561fc420000000001787dc00003050c759484af000002f3",
        "640000004877000000000000000000000000000000000003050c75956252520000400a7075626c69630074006400020169640000000017ffffffff006e6f74650000000019ffffffff",
        "640000003a770000000001787cd80000000001787cd80003050c7595626a490000400a4e0002740000000131740000000a7265616c206279746573",
        "6400000037770000000001787df00000000001787df00003050c7595626e43000000000001787dc00000000001787df00003050c759484af",
        "64000000166b0000000001787df00003050c7595628100",
    ];

    use super::{decode_copy_data, tag, Frame, WalMessage};

    pub fn captured() -> Bytes {
        let hex: String = CAPTURED.concat();
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect::<Vec<u8>>();
        Bytes::from(bytes)
    }

    /// The capture's CopyData bodies, in order: a keepalive, four XLogData, a keepalive.
    pub fn bodies() -> Vec<Bytes> {
        let mut stream = captured();
        let mut bodies = Vec::new();
        while let Some(frame) = Frame::peek(&stream).unwrap() {
            assert_eq!(frame.tag, tag::COPY_DATA);
            bodies.push(frame.take_body(&mut stream));
        }
        assert!(stream.is_empty());
        bodies
    }

    /// The capture's first message, a keepalive, framed as it came.
    pub fn first_message() -> Bytes {
        captured().slice(..super::HEADER_LEN + bodies()[0].len())
    }

    /// Every message of the capture, in order, decoded.
    pub fn messages() -> Vec<WalMessage> {
        bodies()
            .into_iter()
            .map(|body| decode_copy_data(body).unwrap())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of a backend message: tag, length word, body.
    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn frames_are_found_whole_and_waited_for_when_partial() {
        let mut stream = message(b'd', b"wabc");
        stream.extend(message(b'N', b""));
        assert_eq!(Frame::peek(&stream[..4]).unwrap(), None);
        let first = Frame::peek(&stream).unwrap().unwrap();
        assert_eq!(first, Frame { tag: b'd', len: 9 });
        let second = Frame::peek(&stream[first.len..]).unwrap().unwrap();
        assert_eq!(second, Frame { tag: b'N', len: 5 });
        let mut bytes = Bytes::from(stream);
        assert_eq!(&first.take_body(&mut bytes)[..], b"wabc");
        assert_eq!(bytes.len(), 5);
    }

    #[test]
    fn impossible_lengths_are_refused() {
        assert!(matches!(
            Frame::peek(&[b'd', 0, 0, 0, 3]),
            Err(ProtocolError::TooShort(3))
        ));
        assert!(matches!(
            Frame::peek(&[b'd', 0x7f, 0xff, 0xff, 0xff]),
            Err(ProtocolError::TooLong(_))
        ));
    }

    #[test]
    fn a_captured_stream_decodes_into_keepalives_and_pgoutput_messages() {
        use crate::pipeline::pgoutput::{self, Message};
        let messages = capture::messages();
        assert_eq!(messages.len(), 6);
        assert_eq!(
            messages[0],
            WalMessage::KeepAlive {
                wal_end: Lsn(0x1787CD8),
                reply_requested: false
            }
        );
        let data: Vec<&Bytes> = messages[1..5]
            .iter()
            .map(|m| match m {
                WalMessage::Data(data) => data,
                other => panic!("not data: {other:?}"),
            })
            .collect();
        let Message::Begin(begin) = pgoutput::decode(data[0]).unwrap() else {
            panic!("not a Begin");
        };
        assert_eq!((begin.final_lsn, begin.xid), (Lsn(0x1787DC0), 755));
        assert!(matches!(
            pgoutput::decode(data[1]).unwrap(),
            Message::Relation(_)
        ));
        assert!(matches!(
            pgoutput::decode(data[2]).unwrap(),
            Message::Insert(_)
        ));
        assert!(data[2].ends_with(b"real bytes"));
        let Message::Commit(commit) = pgoutput::decode(data[3]).unwrap() else {
            panic!("not a Commit");
        };
        assert_eq!(commit.end_lsn, Lsn(0x1787DF0));
        assert_eq!(
            messages[5],
            WalMessage::KeepAlive {
                wal_end: Lsn(0x1787DF0),
                reply_requested: false
            }
        );
    }

    #[test]
    fn only_a_keepalive_that_asks_wants_a_reply() {
        let bodies = capture::bodies();
        let (keepalive, begin) = (&bodies[0], &bodies[1]);
        assert!(!wants_reply(keepalive));
        let mut asking = keepalive.to_vec();
        asking[REPLY_FLAG] = 1;
        assert!(wants_reply(&asking));
        assert!(!wants_reply(begin));
    }

    #[test]
    fn short_and_unknown_messages_are_errors() {
        let bodies = capture::bodies();
        let (keepalive, xlog_data) = (&bodies[0], &bodies[1]);
        for body in [&xlog_data[..10], &keepalive[..17], b"", b"x123"] {
            assert!(
                decode_copy_data(Bytes::copy_from_slice(body)).is_err(),
                "{body:?}"
            );
        }
    }

    #[test]
    fn the_status_update_is_the_documented_39_bytes() {
        let mut out = BytesMut::new();
        status_update(Lsn(0x1_0000_0002), 7, &mut out);
        let mut expected = vec![b'd', 0, 0, 0, 38, b'r'];
        for _ in 0..3 {
            expected.extend_from_slice(&0x1_0000_0002_u64.to_be_bytes());
        }
        expected.extend_from_slice(&7_i64.to_be_bytes());
        expected.push(0);
        assert_eq!(&out[..], &expected[..]);
        let frame = Frame::peek(&out).unwrap().unwrap();
        assert_eq!(frame.len, out.len());
    }

    #[test]
    fn server_errors_read_as_a_sentence() {
        let body = b"SERREUR\0VERROR\0C42704\0Mreplication slot \"w\" does not exist\0\
            Hcreate it with walstream setup\0\0";
        let error = ServerError::parse(body);
        assert_eq!(error.code, "42704");
        assert_eq!(
            error.to_string(),
            "ERROR: replication slot \"w\" does not exist (SQLSTATE 42704); \
             hint: create it with walstream setup"
        );
        assert_eq!(ServerError::parse(b"").to_string(), "ERROR: ");
    }
}
