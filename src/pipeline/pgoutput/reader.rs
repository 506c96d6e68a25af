//! A bounds-checked big-endian cursor over a pgoutput message.

use super::DecodeError;

pub(super) struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, offset: 0 }
    }

    pub(super) fn offset(&self) -> usize {
        self.offset
    }

    pub(super) fn remaining(&self) -> usize {
        self.bytes.len() - self.offset
    }

    /// Everything not yet read, without consuming it.
    pub(super) fn rest(&self) -> &'a [u8] {
        &self.bytes[self.offset..]
    }

    pub(super) fn bytes(
        &mut self,
        len: usize,
        what: &'static str,
    ) -> Result<&'a [u8], DecodeError> {
        let end = self
            .offset
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(DecodeError::Truncated {
                what,
                offset: self.offset,
            })?;
        let slice = &self.bytes[self.offset..end];
        self.offset = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let slice = self.bytes(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    pub(super) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(super) fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }

    pub(super) fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    pub(super) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    pub(super) fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    pub(super) fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// A non-negative Int16 count.
    pub(super) fn count_i16(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let offset = self.offset;
        let value = self.i16(what)?;
        usize::try_from(value).map_err(|_| DecodeError::Negative {
            what,
            value: value.into(),
            offset,
        })
    }

    /// A non-negative Int32 count or length.
    pub(super) fn count_i32(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let offset = self.offset;
        let value = self.i32(what)?;
        usize::try_from(value).map_err(|_| DecodeError::Negative {
            what,
            value: value.into(),
            offset,
        })
    }

    /// A NUL-terminated UTF-8 string.
    pub(super) fn cstr(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        let start = self.offset;
        let len =
            self.bytes[start..]
                .iter()
                .position(|b| *b == 0)
                .ok_or(DecodeError::Truncated {
                    what,
                    offset: start,
                })?;
        let text = std::str::from_utf8(&self.bytes[start..start + len]).map_err(|_| {
            DecodeError::InvalidUtf8 {
                what,
                offset: start,
            }
        })?;
        self.offset = start + len + 1;
        Ok(text)
    }

    pub(super) fn expect(&mut self, byte: u8, what: &'static str) -> Result<(), DecodeError> {
        let offset = self.offset;
        match self.u8(what)? {
            found if found == byte => Ok(()),
            found => Err(DecodeError::Unexpected {
                what,
                found,
                offset,
            }),
        }
    }
}
