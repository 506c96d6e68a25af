//! The NATS protocol frames walstream writes itself: a publish (`PUB`, or `HPUB` with its
//! header block), written straight into a send buffer.

use bytes::{BufMut, BytesMut};

const STATUS_LINE: &[u8] = b"NATS/1.0\r\n";

/// JetStream's duplicate-detection header: the id a message is stored under once per window.
pub const MESSAGE_ID: &str = "Nats-Msg-Id";

/// Something a message's headers can be written into: walstream's own [`HeaderBlock`], or
/// async-nats' map for the one-shot commands that publish through it.
pub trait WriteHeaders {
    fn put(&mut self, name: &str, value: &str);

    fn put_number(&mut self, name: &str, value: impl itoa::Integer) {
        self.put(name, itoa::Buffer::new().format(value));
    }
}

impl WriteHeaders for async_nats::HeaderMap {
    fn put(&mut self, name: &str, value: &str) {
        self.insert(name, value);
    }
}

/// A message's header block as the protocol carries it: the status line, then one
/// `Name: value` line a header. Names and values are walstream's own text (its constants,
/// numbers, LSNs, ids built from the slot name, which PostgreSQL limits to `a-z0-9_`), so
/// none holds a line break or a colon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderBlock {
    text: Vec<u8>,
}

impl Default for HeaderBlock {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderBlock {
    pub fn new() -> Self {
        let mut text = Vec::with_capacity(256);
        text.extend_from_slice(STATUS_LINE);
        Self { text }
    }

    /// Empties the block for the next message, keeping its memory.
    pub fn clear(&mut self) {
        self.text.truncate(STATUS_LINE.len());
    }

    /// Header lines rendered before (`Name: value\r\n` each), such as those a transaction's
    /// events share.
    pub fn put_lines(&mut self, lines: &HeaderLines) {
        self.text.extend_from_slice(&lines.0);
    }

    /// The block's size on the wire, its closing blank line included.
    pub fn wire_len(&self) -> usize {
        self.text.len() + 2
    }

    /// The first value of `name`.
    #[cfg(test)]
    pub fn get(&self, name: &str) -> Option<&str> {
        lines_of(&self.text[STATUS_LINE.len()..])
            .find(|(line_name, _)| *line_name == name)
            .map(|(_, value)| value)
    }

    /// The same headers in async-nats' map, as a consumer reads them.
    #[cfg(test)]
    pub fn to_map(&self) -> async_nats::HeaderMap {
        let mut map = async_nats::HeaderMap::new();
        for (name, value) in lines_of(&self.text[STATUS_LINE.len()..]) {
            map.append(name, value);
        }
        map
    }

    fn write_to(&self, out: &mut BytesMut) {
        out.put_slice(&self.text);
        out.put_slice(b"\r\n");
    }
}

impl WriteHeaders for HeaderBlock {
    fn put(&mut self, name: &str, value: &str) {
        put_line(&mut self.text, name, value);
    }
}

/// Header lines rendered once and copied into many blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderLines(Vec<u8>);

impl HeaderLines {
    /// Room for `bytes` of lines, so that a few puts do not grow it again and again.
    pub fn with_capacity(bytes: usize) -> Self {
        Self(Vec::with_capacity(bytes))
    }
}

impl WriteHeaders for HeaderLines {
    fn put(&mut self, name: &str, value: &str) {
        put_line(&mut self.0, name, value);
    }
}

fn put_line(text: &mut Vec<u8>, name: &str, value: &str) {
    debug_assert!(
        !value.contains(['\r', '\n']),
        "header {name} holds a line break"
    );
    text.reserve(name.len() + value.len() + 4);
    text.extend_from_slice(name.as_bytes());
    text.extend_from_slice(b": ");
    text.extend_from_slice(value.as_bytes());
    text.extend_from_slice(b"\r\n");
}

#[cfg(test)]
fn lines_of(text: &[u8]) -> impl Iterator<Item = (&str, &str)> {
    std::str::from_utf8(text)
        .unwrap_or_default()
        .split("\r\n")
        .filter_map(|line| line.split_once(": "))
}

/// The bytes of one publish: `PUB subject [reply] size`, or with headers `HPUB subject
/// [reply] header-size total-size`, then the headers and payload.
pub fn write_publish(
    out: &mut BytesMut,
    subject: &str,
    reply: Option<&str>,
    headers: Option<&HeaderBlock>,
    payload: &[u8],
) {
    let header_len = headers.map_or(0, HeaderBlock::wire_len);
    let mut numbers = itoa::Buffer::new();
    out.reserve(subject.len() + reply.map_or(0, str::len) + header_len + payload.len() + 40);
    out.put_slice(if headers.is_some() { b"HPUB " } else { b"PUB " });
    out.put_slice(subject.as_bytes());
    out.put_u8(b' ');
    if let Some(reply) = reply {
        out.put_slice(reply.as_bytes());
        out.put_u8(b' ');
    }
    if headers.is_some() {
        out.put_slice(numbers.format(header_len).as_bytes());
        out.put_u8(b' ');
    }
    out.put_slice(numbers.format(header_len + payload.len()).as_bytes());
    out.put_slice(b"\r\n");
    if let Some(headers) = headers {
        headers.write_to(out);
    }
    out.put_slice(payload);
    out.put_slice(b"\r\n");
}

/// Whether `subject` fits a protocol line: not empty, no whitespace or control bytes, which
/// would end or split the line. (walstream's subjects are valid beyond that: config checks the
/// prefix, and each token is made safe where it is made.)
pub fn fits_protocol_line(subject: &str) -> bool {
    // Branch-free, so that it runs many bytes a step: it runs for every message.
    !subject.is_empty()
        && subject
            .bytes()
            .fold(true, |fits, b| fits & (b > b' ') & (b != 0x7f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_with_headers_is_an_hpub_frame_with_both_sizes() {
        let mut headers = HeaderBlock::new();
        headers.put(MESSAGE_ID, "slot:7:0/16B3748:0");
        headers.put_number("Walstream-Seq", 12u64);
        let mut out = BytesMut::new();
        write_publish(&mut out, "cdc.t", Some("_INBOX.x.1"), Some(&headers), b"{}");
        let block = "NATS/1.0\r\nNats-Msg-Id: slot:7:0/16B3748:0\r\nWalstream-Seq: 12\r\n\r\n";
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            format!(
                "HPUB cdc.t _INBOX.x.1 {} {}\r\n{block}{{}}\r\n",
                block.len(),
                block.len() + 2
            )
        );
        assert_eq!(headers.wire_len(), block.len());
    }

    #[test]
    fn a_publish_without_headers_or_reply_is_a_pub_frame() {
        let mut out = BytesMut::new();
        write_publish(&mut out, "a.b", None, None, b"hello");
        assert_eq!(&out[..], b"PUB a.b 5\r\nhello\r\n");
        out.clear();
        write_publish(&mut out, "a.b", Some("r"), None, b"");
        assert_eq!(&out[..], b"PUB a.b r 0\r\n\r\n");
    }

    #[test]
    fn a_block_built_from_shared_lines_reads_back_in_order() {
        let mut shared = HeaderLines::default();
        shared.put("Walstream-Xid", "42");
        shared.put("Walstream-Lsn", "0/10");
        let mut block = HeaderBlock::new();
        block.put_lines(&shared);
        block.put("Walstream-Tx-Last", "true");
        assert_eq!(block.get("Walstream-Lsn"), Some("0/10"));
        assert_eq!(block.get("Walstream-Tx-Last"), Some("true"));
        assert_eq!(block.get("Walstream-Seq"), None);
        assert_eq!(
            block.text,
            b"NATS/1.0\r\nWalstream-Xid: 42\r\nWalstream-Lsn: 0/10\r\nWalstream-Tx-Last: true\r\n"
        );
        block.clear();
        assert_eq!(block, HeaderBlock::new());
    }

    #[test]
    fn subjects_that_would_break_the_protocol_line_are_refused() {
        assert!(fits_protocol_line("cdc.public.tb_order.insert"));
        for bad in ["", "a b", "a\r\nPUB x 0", "a\tb", "a\x7fb", "a\0b"] {
            assert!(!fits_protocol_line(bad), "{bad:?}");
        }
    }
}
