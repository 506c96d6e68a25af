//! TupleData: the column values of one row, validated once and then iterated without copying.

use super::reader::Reader;
use super::DecodeError;

/// One column of a row as pgoutput sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnValue<'a> {
    Null,
    /// An out-of-line TOAST value that did not change; PostgreSQL did not resend it.
    UnchangedToast,
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

/// The columns of a row. The bytes were checked to be well formed when decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TupleData<'a> {
    column_count: usize,
    columns: &'a [u8],
}

impl<'a> TupleData<'a> {
    pub(super) fn decode(reader: &mut Reader<'a>) -> Result<Self, DecodeError> {
        let column_count = reader.count_i16("tuple column count")?;
        let mut body = Reader::new(reader.rest());
        for _ in 0..column_count {
            read_column(&mut body)?;
        }
        let columns = reader.bytes(body.offset(), "tuple data")?;
        Ok(Self {
            column_count,
            columns,
        })
    }

    pub fn len(&self) -> usize {
        self.column_count
    }

    pub fn is_empty(&self) -> bool {
        self.column_count == 0
    }

    pub fn iter(&self) -> TupleIter<'a> {
        TupleIter {
            remaining: self.column_count,
            columns: self.columns,
        }
    }

    /// The value of column `index`, or `None` past the end.
    pub fn get(&self, index: usize) -> Option<ColumnValue<'a>> {
        self.iter().nth(index)
    }

    /// Decodes `count` tuples written back to back, in pgoutput's TupleData format (how
    /// `walstream backfill` ships rows through the WAL), refusing trailing bytes.
    pub fn decode_many(bytes: &'a [u8], count: usize) -> Result<Vec<Self>, DecodeError> {
        let mut reader = Reader::new(bytes);
        let tuples = (0..count)
            .map(|_| Self::decode(&mut reader))
            .collect::<Result<Vec<_>, _>>()?;
        if reader.remaining() != 0 {
            return Err(DecodeError::TrailingBytes {
                message: "backfill chunk",
                extra: reader.remaining(),
            });
        }
        Ok(tuples)
    }
}

/// Appends a row in pgoutput's TupleData format: text values, `None` for NULL.
pub fn encode_tuple<'v>(
    out: &mut Vec<u8>,
    values: impl ExactSizeIterator<Item = Option<&'v [u8]>>,
) -> Result<(), std::num::TryFromIntError> {
    out.extend_from_slice(&i16::try_from(values.len())?.to_be_bytes());
    for value in values {
        match value {
            None => out.push(b'n'),
            Some(text) => {
                out.push(b't');
                out.extend_from_slice(&i32::try_from(text.len())?.to_be_bytes());
                out.extend_from_slice(text);
            }
        }
    }
    Ok(())
}

pub struct TupleIter<'a> {
    remaining: usize,
    columns: &'a [u8],
}

impl<'a> Iterator for TupleIter<'a> {
    type Item = ColumnValue<'a>;

    /// Reads the next column without the checks and error context of decoding: every row is
    /// read two or three times per event, and was validated when decoded.
    fn next(&mut self) -> Option<Self::Item> {
        self.remaining = self.remaining.checked_sub(1)?;
        let (&kind, rest) = self.columns.split_first()?;
        let (value, rest) = match kind {
            b'n' => (ColumnValue::Null, rest),
            b'u' => (ColumnValue::UnchangedToast, rest),
            _ => {
                let (len, rest) = rest.split_first_chunk::<4>()?;
                let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
                let (value, rest) = rest.split_at_checked(len)?;
                let value = if kind == b'b' {
                    ColumnValue::Binary(value)
                } else {
                    ColumnValue::Text(value)
                };
                (value, rest)
            }
        };
        self.columns = rest;
        Some(value)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for TupleIter<'_> {}

fn read_column<'a>(reader: &mut Reader<'a>) -> Result<ColumnValue<'a>, DecodeError> {
    let offset = reader.offset();
    match reader.u8("column kind")? {
        b'n' => Ok(ColumnValue::Null),
        b'u' => Ok(ColumnValue::UnchangedToast),
        b't' => {
            let len = reader.count_i32("text value length")?;
            Ok(ColumnValue::Text(reader.bytes(len, "text value")?))
        }
        b'b' => {
            let len = reader.count_i32("binary value length")?;
            Ok(ColumnValue::Binary(reader.bytes(len, "binary value")?))
        }
        found => Err(DecodeError::Unexpected {
            what: "column kind",
            found,
            offset,
        }),
    }
}
