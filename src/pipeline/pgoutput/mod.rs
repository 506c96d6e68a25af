//! Decoder for the `pgoutput` logical replication protocol, version 1.
//!
//! Every message borrows from the bytes it was decoded from; nothing here allocates per row.
//! Message layouts follow PostgreSQL's "Logical Replication Message Formats" chapter.

mod reader;
mod tuple;

pub use tuple::{encode_tuple, ColumnValue, TupleData, TupleIter};

use crate::lsn::Lsn;
use reader::Reader;

/// A decoding failure: the bytes are not a well-formed pgoutput v1 message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput message is empty")]
    Empty,
    #[error("pgoutput message truncated while reading {what} at byte {offset}")]
    Truncated { what: &'static str, offset: usize },
    #[error("unknown pgoutput message tag {:?} (0x{tag:02x})", char::from(*.tag))]
    UnknownTag { tag: u8 },
    #[error("unexpected byte {:?} (0x{found:02x}) for {what} at byte {offset}", char::from(*.found))]
    Unexpected {
        what: &'static str,
        found: u8,
        offset: usize,
    },
    #[error("{what} at byte {offset} is not valid UTF-8")]
    InvalidUtf8 { what: &'static str, offset: usize },
    #[error("negative {what} {value} at byte {offset}")]
    Negative {
        what: &'static str,
        value: i64,
        offset: usize,
    },
    #[error("{extra} trailing bytes after a complete {message} message")]
    TrailingBytes { message: &'static str, extra: usize },
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message<'a> {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin<'a>),
    Relation(Relation),
    Type(TypeInfo),
    Insert(Insert<'a>),
    Update(Update<'a>),
    Delete(Delete<'a>),
    Truncate(Truncate),
    LogicalMessage(LogicalMessage<'a>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// The commit LSN of the transaction (equal to the Commit message's `commit_lsn`).
    pub final_lsn: Lsn,
    /// Microseconds since 2000-01-01 00:00:00 UTC.
    pub commit_time_micros: i64,
    pub xid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub commit_lsn: Lsn,
    /// The end of the commit record: the position to confirm once the transaction is durable.
    pub end_lsn: Lsn,
    pub commit_time_micros: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    pub commit_lsn: Lsn,
    pub name: &'a str,
}

/// `REPLICA IDENTITY` setting of a relation, which decides what old-row data PostgreSQL sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    Default,
    Nothing,
    Full,
    Index,
}

impl ReplicaIdentity {
    fn from_byte(byte: u8, offset: usize) -> Result<Self, DecodeError> {
        match byte {
            b'd' => Ok(Self::Default),
            b'n' => Ok(Self::Nothing),
            b'f' => Ok(Self::Full),
            b'i' => Ok(Self::Index),
            found => Err(DecodeError::Unexpected {
                what: "replica identity",
                found,
                offset,
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity key (every column is flagged under REPLICA IDENTITY FULL).
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    /// Empty for `pg_catalog`, as pgoutput sends it.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn>,
}

/// A non-builtin type used by a relation (pgoutput sends its name once per session).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Insert<'a> {
    pub relation_oid: u32,
    pub new: TupleData<'a>,
}

/// Which before-image an Update or Delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// Only the replica identity key columns ('K').
    Key,
    /// The whole old row, under REPLICA IDENTITY FULL ('O').
    Full,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Update<'a> {
    pub relation_oid: u32,
    pub old: Option<(OldKind, TupleData<'a>)>,
    pub new: TupleData<'a>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Delete<'a> {
    pub relation_oid: u32,
    pub old_kind: OldKind,
    pub old: TupleData<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    pub cascade: bool,
    pub restart_identity: bool,
    pub relation_oids: Vec<u32>,
}

/// A message written by `pg_logical_emit_message`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogicalMessage<'a> {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: &'a str,
    pub content: &'a [u8],
}

const TRUNCATE_CASCADE: u8 = 1;
const TRUNCATE_RESTART_IDENTITY: u8 = 2;

/// Decodes one pgoutput message (the payload of one XLogData record).
pub fn decode(bytes: &[u8]) -> Result<Message<'_>, DecodeError> {
    let mut reader = Reader::new(bytes);
    let tag = reader.u8("message tag").map_err(|_| DecodeError::Empty)?;
    let (message, name) = match tag {
        b'B' => (Message::Begin(decode_begin(&mut reader)?), "Begin"),
        b'C' => (Message::Commit(decode_commit(&mut reader)?), "Commit"),
        b'O' => (
            Message::Origin(Origin {
                commit_lsn: Lsn(reader.u64("origin commit LSN")?),
                name: reader.cstr("origin name")?,
            }),
            "Origin",
        ),
        b'R' => (Message::Relation(decode_relation(&mut reader)?), "Relation"),
        b'Y' => (
            Message::Type(TypeInfo {
                oid: reader.u32("type OID")?,
                namespace: reader.cstr("type namespace")?.to_owned(),
                name: reader.cstr("type name")?.to_owned(),
            }),
            "Type",
        ),
        b'I' => (Message::Insert(decode_insert(&mut reader)?), "Insert"),
        b'U' => (Message::Update(decode_update(&mut reader)?), "Update"),
        b'D' => (Message::Delete(decode_delete(&mut reader)?), "Delete"),
        b'T' => (Message::Truncate(decode_truncate(&mut reader)?), "Truncate"),
        b'M' => (
            Message::LogicalMessage(decode_logical_message(&mut reader)?),
            "Message",
        ),
        tag => return Err(DecodeError::UnknownTag { tag }),
    };
    match reader.remaining() {
        0 => Ok(message),
        extra => Err(DecodeError::TrailingBytes {
            message: name,
            extra,
        }),
    }
}

fn decode_begin(reader: &mut Reader<'_>) -> Result<Begin, DecodeError> {
    Ok(Begin {
        final_lsn: Lsn(reader.u64("Begin final LSN")?),
        commit_time_micros: reader.i64("Begin commit time")?,
        xid: reader.u32("Begin xid")?,
    })
}

fn decode_commit(reader: &mut Reader<'_>) -> Result<Commit, DecodeError> {
    let _flags = reader.u8("Commit flags")?;
    Ok(Commit {
        commit_lsn: Lsn(reader.u64("Commit LSN")?),
        end_lsn: Lsn(reader.u64("Commit end LSN")?),
        commit_time_micros: reader.i64("Commit time")?,
    })
}

fn decode_relation(reader: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let oid = reader.u32("relation OID")?;
    let namespace = reader.cstr("relation namespace")?.to_owned();
    let name = reader.cstr("relation name")?.to_owned();
    let identity_offset = reader.offset();
    let replica_identity =
        ReplicaIdentity::from_byte(reader.u8("replica identity")?, identity_offset)?;
    let column_count = reader.count_i16("relation column count")?;
    let mut columns = Vec::with_capacity(column_count.min(reader.remaining()));
    for _ in 0..column_count {
        let flags = reader.u8("column flags")?;
        columns.push(RelationColumn {
            is_key: flags & 1 == 1,
            name: reader.cstr("column name")?.to_owned(),
            type_oid: reader.u32("column type OID")?,
            type_modifier: reader.i32("column type modifier")?,
        });
    }
    Ok(Relation {
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn decode_insert<'a>(reader: &mut Reader<'a>) -> Result<Insert<'a>, DecodeError> {
    let relation_oid = reader.u32("Insert relation OID")?;
    reader.expect(b'N', "Insert new-tuple marker")?;
    Ok(Insert {
        relation_oid,
        new: TupleData::decode(reader)?,
    })
}

fn decode_update<'a>(reader: &mut Reader<'a>) -> Result<Update<'a>, DecodeError> {
    let relation_oid = reader.u32("Update relation OID")?;
    let offset = reader.offset();
    let old = match reader.u8("Update tuple marker")? {
        b'N' => None,
        marker @ (b'K' | b'O') => {
            let kind = if marker == b'K' {
                OldKind::Key
            } else {
                OldKind::Full
            };
            let old = TupleData::decode(reader)?;
            reader.expect(b'N', "Update new-tuple marker")?;
            Some((kind, old))
        }
        found => {
            return Err(DecodeError::Unexpected {
                what: "Update tuple marker",
                found,
                offset,
            })
        }
    };
    Ok(Update {
        relation_oid,
        old,
        new: TupleData::decode(reader)?,
    })
}

fn decode_delete<'a>(reader: &mut Reader<'a>) -> Result<Delete<'a>, DecodeError> {
    let relation_oid = reader.u32("Delete relation OID")?;
    let offset = reader.offset();
    let old_kind = match reader.u8("Delete tuple marker")? {
        b'K' => OldKind::Key,
        b'O' => OldKind::Full,
        found => {
            return Err(DecodeError::Unexpected {
                what: "Delete tuple marker",
                found,
                offset,
            })
        }
    };
    Ok(Delete {
        relation_oid,
        old_kind,
        old: TupleData::decode(reader)?,
    })
}

fn decode_truncate(reader: &mut Reader<'_>) -> Result<Truncate, DecodeError> {
    let count = reader.count_i32("Truncate relation count")?;
    let options = reader.u8("Truncate options")?;
    let mut relation_oids = Vec::with_capacity(count.min(reader.remaining() / 4));
    for _ in 0..count {
        relation_oids.push(reader.u32("Truncate relation OID")?);
    }
    Ok(Truncate {
        cascade: options & TRUNCATE_CASCADE != 0,
        restart_identity: options & TRUNCATE_RESTART_IDENTITY != 0,
        relation_oids,
    })
}

fn decode_logical_message<'a>(reader: &mut Reader<'a>) -> Result<LogicalMessage<'a>, DecodeError> {
    let flags = reader.u8("Message flags")?;
    let lsn = Lsn(reader.u64("Message LSN")?);
    let prefix = reader.cstr("Message prefix")?;
    let length = reader.count_i32("Message content length")?;
    Ok(LogicalMessage {
        transactional: flags & 1 == 1,
        lsn,
        prefix,
        content: reader.bytes(length, "Message content")?,
    })
}

#[cfg(test)]
mod tests;

/// Parses captured messages as `testdata/pg15.txt` stores them: a line per message, its tag,
/// a space, its bytes in hex; `#` starts a comment. Malformed lines are skipped.
pub fn parse_captured(text: &str) -> Vec<(char, Vec<u8>)> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (tag, hex) = line.split_once(' ')?;
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| {
                    hex.get(i..i + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                })
                .collect::<Option<Vec<u8>>>()?;
            Some((tag.chars().next()?, bytes))
        })
        .collect()
}

/// The messages captured from PostgreSQL 15 in `testdata/pg15.txt`.
#[cfg(test)]
pub(crate) fn captured_fixtures() -> Vec<(char, Vec<u8>)> {
    parse_captured(include_str!("testdata/pg15.txt"))
}
