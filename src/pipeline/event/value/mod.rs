//! Text-format column values to JSON, typed by the column's type OID.
//!
//! Values are written straight into the outgoing message buffer. A value that does not look like
//! its type claims (which PostgreSQL never sends, but a fuzzer does) becomes a JSON string: the
//! output is always valid JSON and never loses the original text.

mod array;
mod json;

pub use json::is_json;

/// Builtin type OIDs (`pg_type.oid`), stable across PostgreSQL versions.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const NUMERIC: u32 = 1700;
    pub const JSONB: u32 = 3802;

    pub const JSON_ARRAY: u32 = 199;
    pub const BOOL_ARRAY: u32 = 1000;
    pub const BYTEA_ARRAY: u32 = 1001;
    pub const CHAR_ARRAY: u32 = 1002;
    pub const NAME_ARRAY: u32 = 1003;
    pub const INT2_ARRAY: u32 = 1005;
    pub const INT4_ARRAY: u32 = 1007;
    pub const TEXT_ARRAY: u32 = 1009;
    pub const BPCHAR_ARRAY: u32 = 1014;
    pub const VARCHAR_ARRAY: u32 = 1015;
    pub const INT8_ARRAY: u32 = 1016;
    pub const FLOAT4_ARRAY: u32 = 1021;
    pub const FLOAT8_ARRAY: u32 = 1022;
    pub const OID_ARRAY: u32 = 1028;
    pub const TIMESTAMP_ARRAY: u32 = 1115;
    pub const DATE_ARRAY: u32 = 1182;
    pub const TIME_ARRAY: u32 = 1183;
    pub const TIMESTAMPTZ_ARRAY: u32 = 1185;
    pub const INTERVAL_ARRAY: u32 = 1187;
    pub const NUMERIC_ARRAY: u32 = 1231;
    pub const TIMETZ_ARRAY: u32 = 1270;
    pub const UUID_ARRAY: u32 = 2951;
    pub const JSONB_ARRAY: u32 = 3807;
}

/// How the text of a scalar value maps to JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalarKind {
    /// int2/int4/int8/oid: a JSON number.
    Integer,
    /// float4/float8: a JSON number, or a string for NaN and ±Infinity.
    Float,
    /// bool: `t`/`f` to true/false.
    Bool,
    /// json/jsonb: embedded as JSON, its text kept exactly (`2.50` stays `2.50`).
    Json,
    /// Everything else, numeric included (lossless at any precision): a JSON string of the text.
    Text,
}

/// How a column's value maps to JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Scalar(ScalarKind),
    /// A PostgreSQL array whose elements are of the given kind.
    Array(ScalarKind),
}

impl ValueKind {
    /// The kind for a type OID. `type_name` is the name from a pgoutput Type message, known for
    /// non-builtin types only; a name starting with `_` is PostgreSQL's convention for an array.
    pub fn for_type(type_oid: u32, type_name: Option<&str>) -> Self {
        use oid::*;
        let scalar = |oid| match oid {
            INT2 | INT4 | INT8 | OID => Some(ScalarKind::Integer),
            FLOAT4 | FLOAT8 => Some(ScalarKind::Float),
            BOOL => Some(ScalarKind::Bool),
            JSON | JSONB => Some(ScalarKind::Json),
            _ => None,
        };
        if let Some(kind) = scalar(type_oid) {
            return Self::Scalar(kind);
        }
        let element = match type_oid {
            INT2_ARRAY | INT4_ARRAY | INT8_ARRAY | OID_ARRAY => Some(ScalarKind::Integer),
            FLOAT4_ARRAY | FLOAT8_ARRAY => Some(ScalarKind::Float),
            BOOL_ARRAY => Some(ScalarKind::Bool),
            JSON_ARRAY | JSONB_ARRAY => Some(ScalarKind::Json),
            BYTEA_ARRAY | CHAR_ARRAY | NAME_ARRAY | TEXT_ARRAY | BPCHAR_ARRAY | VARCHAR_ARRAY
            | TIMESTAMP_ARRAY | DATE_ARRAY | TIME_ARRAY | TIMESTAMPTZ_ARRAY | INTERVAL_ARRAY
            | NUMERIC_ARRAY | TIMETZ_ARRAY | UUID_ARRAY => Some(ScalarKind::Text),
            _ => None,
        };
        match element {
            Some(kind) => Self::Array(kind),
            None if type_name.is_some_and(|name| name.starts_with('_')) => {
                Self::Array(ScalarKind::Text)
            }
            None => Self::Scalar(ScalarKind::Text),
        }
    }
}

/// Appends the JSON for a text-format value of the given kind.
pub fn write_value(out: &mut Vec<u8>, kind: ValueKind, text: &[u8]) {
    match kind {
        ValueKind::Scalar(scalar) => write_scalar(out, scalar, text),
        ValueKind::Array(element) => {
            let start = out.len();
            if array::write_array(out, element, text).is_err() {
                out.truncate(start);
                write_string(out, text);
            }
        }
    }
}

/// Appends the JSON for one scalar value.
pub fn write_scalar(out: &mut Vec<u8>, kind: ScalarKind, text: &[u8]) {
    match kind {
        ScalarKind::Integer | ScalarKind::Float if is_json_number(text) => {
            out.extend_from_slice(text)
        }
        ScalarKind::Bool if text == b"t" => out.extend_from_slice(b"true"),
        ScalarKind::Bool if text == b"f" => out.extend_from_slice(b"false"),
        ScalarKind::Json if is_json(text) => out.extend_from_slice(text),
        _ => write_string(out, text),
    }
}

/// Appends a value pgoutput sent in binary format, as the `\x…` hex text bytea uses.
pub fn write_binary(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(b"\"\\\\x");
    for byte in bytes {
        out.push(HEX[usize::from(byte >> 4)]);
        out.push(HEX[usize::from(byte & 0xf)]);
    }
    out.push(b'"');
}

/// True when `text` is a number by JSON's grammar: `-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?`.
pub fn is_json_number(text: &[u8]) -> bool {
    number_len(text) == Some(text.len())
}

/// The length of the JSON number `text` starts with, or `None` when it starts with none.
fn number_len(text: &[u8]) -> Option<usize> {
    let digits_end = |mut at: usize| {
        while text.get(at).is_some_and(u8::is_ascii_digit) {
            at += 1;
        }
        at
    };
    let start = usize::from(text.first() == Some(&b'-'));
    let mut at = digits_end(start);
    if at == start || (at - start > 1 && text[start] == b'0') {
        return None;
    }
    if text.get(at) == Some(&b'.') {
        let end = digits_end(at + 1);
        if end == at + 1 {
            return None;
        }
        at = end;
    }
    if matches!(text.get(at), Some(b'e' | b'E')) {
        at += 1;
        if matches!(text.get(at), Some(b'+' | b'-')) {
            at += 1;
        }
        let end = digits_end(at);
        if end == at {
            return None;
        }
        at = end;
    }
    Some(at)
}

/// Appends `text` as a JSON string. Bytes that are not UTF-8 become U+FFFD.
pub fn write_string(out: &mut Vec<u8>, text: &[u8]) {
    out.push(b'"');
    let start = out.len();
    // ASCII is UTF-8: only text with other bytes, which the escaping pass notes, is checked.
    if write_escaped(out, text) && std::str::from_utf8(text).is_err() {
        out.truncate(start);
        write_escaped(out, String::from_utf8_lossy(text).as_bytes());
    }
    out.push(b'"');
}

/// Appends `bytes` with JSON's escapes; tells whether any of them is not ASCII.
fn write_escaped(out: &mut Vec<u8>, bytes: &[u8]) -> bool {
    let mut seen = 0u64;
    let mut clean_from = 0;
    loop {
        let end = clean_from + clean_run(&bytes[clean_from..], &mut seen);
        out.extend_from_slice(&bytes[clean_from..end]);
        let Some(&byte) = bytes.get(end) else {
            // Every byte that needs escaping is ASCII, so the words read saw all the others.
            return seen & HIGH_BITS != 0;
        };
        write_escape(out, byte);
        clean_from = end + 1;
    }
}

/// How many bytes `bytes` starts with that need no escaping, read eight at a time; every
/// byte read is ORed into `seen`. Text rarely needs escaping, and a byte at a time was most of
/// the cost of short values, so the last step reads the last eight bytes again (or, in a text
/// shorter than eight, a copy padded with spaces).
fn clean_run(bytes: &[u8], seen: &mut u64) -> usize {
    let mut index = 0;
    while let Some(word) = bytes.get(index..).and_then(<[u8]>::first_chunk::<8>) {
        let word = u64::from_le_bytes(*word);
        *seen |= word;
        let clean = clean_prefix(word);
        if clean < 8 {
            return index + clean;
        }
        index += 8;
    }
    if index == bytes.len() {
        return index;
    }
    // The bytes before the tail are clean, so the first mark of the last word is in it.
    let (word, from) = match bytes.last_chunk::<8>() {
        Some(last) => (u64::from_le_bytes(*last), bytes.len() - 8),
        None => {
            let mut padded = [b' '; 8];
            padded[..bytes.len()].copy_from_slice(bytes);
            (u64::from_le_bytes(padded), 0)
        }
    };
    *seen |= word;
    (from + clean_prefix(word)).min(bytes.len())
}

/// Appends JSON's escape for `byte`, one of those [`clean_prefix`] stops at.
#[cold]
fn write_escape(out: &mut Vec<u8>, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let escape: &[u8] = match byte {
        b'"' => b"\\\"",
        b'\\' => b"\\\\",
        b'\n' => b"\\n",
        b'\r' => b"\\r",
        b'\t' => b"\\t",
        0x08 => b"\\b",
        0x0c => b"\\f",
        _ => {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(byte >> 4)]);
            out.push(HEX[usize::from(byte & 0xf)]);
            return;
        }
    };
    out.extend_from_slice(escape);
}

const ONES: u64 = u64::from_le_bytes([1; 8]);
const HIGH_BITS: u64 = ONES * 0x80;

/// How many of the eight bytes in `word` (read little-endian) come before the first control
/// character, `"` or `\\`: 8 when there is none. The word tests of "Bit Twiddling Hacks" (a
/// byte below n; a byte equal to zero) mark such bytes by their high bit. A borrow carries
/// only upward, so a byte after a marked one may be marked wrongly, but the first mark is
/// exact.
const fn clean_prefix(word: u64) -> usize {
    const fn below(word: u64, n: u8) -> u64 {
        word.wrapping_sub(ONES * n as u64) & !word & HIGH_BITS
    }
    let marks = below(word, 0x20)
        | below(word ^ (ONES * b'"' as u64), 1)
        | below(word ^ (ONES * b'\\' as u64), 1);
    (marks.trailing_zeros() / 8) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(kind: ValueKind, text: &str) -> String {
        let mut out = Vec::new();
        write_value(&mut out, kind, text.as_bytes());
        String::from_utf8(out).expect("writer emits UTF-8")
    }

    const INT: ValueKind = ValueKind::Scalar(ScalarKind::Integer);
    const FLOAT: ValueKind = ValueKind::Scalar(ScalarKind::Float);
    const TEXT: ValueKind = ValueKind::Scalar(ScalarKind::Text);
    const JSONB: ValueKind = ValueKind::Scalar(ScalarKind::Json);
    const BOOL: ValueKind = ValueKind::Scalar(ScalarKind::Bool);

    #[test]
    fn integers_are_numbers() {
        assert_eq!(json(INT, "-9223372036854775808"), "-9223372036854775808");
        assert_eq!(json(INT, "0"), "0");
    }

    #[test]
    fn non_finite_floats_are_strings() {
        assert_eq!(json(FLOAT, "1e+308"), "1e+308");
        assert_eq!(json(FLOAT, "-0"), "-0");
        assert_eq!(json(FLOAT, "NaN"), "\"NaN\"");
        assert_eq!(json(FLOAT, "-Infinity"), "\"-Infinity\"");
    }

    #[test]
    fn numeric_stays_an_exact_string() {
        let kind = ValueKind::for_type(oid::NUMERIC, None);
        assert_eq!(
            json(kind, "12345678901234567890.123456789"),
            "\"12345678901234567890.123456789\""
        );
    }

    #[test]
    fn json_keeps_number_text() {
        assert_eq!(
            json(JSONB, r#"{"k": [1, 2.50, null]}"#),
            r#"{"k": [1, 2.50, null]}"#
        );
        assert_eq!(json(JSONB, "{broken"), r#""{broken""#);
    }

    #[test]
    fn bools_and_strings() {
        assert_eq!(json(BOOL, "t"), "true");
        assert_eq!(json(BOOL, "f"), "false");
        assert_eq!(json(TEXT, "a\"b\\c\n\u{1}"), r#""a\"b\\c\n\u0001""#);
        assert_eq!(json(TEXT, r"\xdeadbeef"), r#""\\xdeadbeef""#);
    }

    #[test]
    fn invalid_utf8_is_replaced_not_dropped() {
        let mut out = Vec::new();
        write_string(&mut out, b"a\xffb");
        assert_eq!(String::from_utf8(out).unwrap(), "\"a\u{fffd}b\"");
        // Anywhere in a word or its tail, beside a byte that needs escaping.
        for len in 1..20 {
            for place in 0..len {
                for bad in [&b"\xff"[..], b"\xc3", b"\xe2\x82"] {
                    let mut text = vec![b'a'; len];
                    text.splice(place..place + 1, bad.iter().copied());
                    text.push(b'"');
                    let mut out = Vec::new();
                    write_string(&mut out, &text);
                    let back: String = serde_json::from_slice(&out).expect("valid JSON");
                    assert_eq!(back, String::from_utf8_lossy(&text));
                }
            }
        }
    }

    /// Every byte that needs escaping, and some that do not, at every place of an eight-byte
    /// word and across two, among ASCII and multi-byte characters: read back as serde_json
    /// reads it, each string is itself.
    #[test]
    fn strings_read_back_whatever_the_escapes_place() {
        let specials: Vec<char> = (0u8..0x20)
            .map(char::from)
            .chain(['"', '\\', '\u{7f}', 'é', '€', '😀', '/', ' '])
            .collect();
        for len in 0..20 {
            for place in 0..len.max(1) {
                for &special in &specials {
                    let text: String = (0..len)
                        .map(|i| if i == place { special } else { 'a' })
                        .chain("ü\"x".chars().filter(|_| len % 3 == 0))
                        .collect();
                    let mut out = Vec::new();
                    write_string(&mut out, text.as_bytes());
                    let back: String = serde_json::from_slice(&out)
                        .unwrap_or_else(|e| panic!("{text:?} wrote {out:?}: {e}"));
                    assert_eq!(back, text);
                }
            }
        }
    }

    /// Every byte at every place, before and after another that needs escaping: the clean
    /// prefix ends exactly at the first byte that needs it.
    #[test]
    fn the_clean_prefix_ends_at_the_first_byte_to_escape() {
        let escaped = |byte: u8| byte < 0x20 || byte == b'"' || byte == b'\\';
        for byte in 0u8..=255 {
            for place in 0..8 {
                for (second, other) in [(None, 0), (Some(0), 0x01), (Some(7), b'"'), (Some(3), 0)] {
                    let mut word = *b"abcdefgh";
                    word[place] = byte;
                    if let Some(second) = second.filter(|&s| s != place) {
                        word[second] = other;
                    }
                    let first = word.iter().position(|&b| escaped(b)).unwrap_or(8);
                    assert_eq!(clean_prefix(u64::from_le_bytes(word)), first, "{word:?}");
                }
            }
        }
    }

    #[test]
    fn json_number_grammar() {
        for ok in ["0", "-1", "1.5", "1e5", "1E-5", "2.50"] {
            assert!(is_json_number(ok.as_bytes()), "{ok}");
        }
        for bad in ["", "-", "01", "1.", ".5", "1e", "+1", "NaN", "1 "] {
            assert!(!is_json_number(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn binary_values_are_hex() {
        let mut out = Vec::new();
        write_binary(&mut out, &[0xde, 0xad]);
        assert_eq!(String::from_utf8(out).unwrap(), r#""\\xdead""#);
    }

    #[test]
    fn unknown_array_types_by_name() {
        assert_eq!(
            ValueKind::for_type(99999, Some("_mood")),
            ValueKind::Array(ScalarKind::Text)
        );
        assert_eq!(
            ValueKind::for_type(99999, Some("mood")),
            ValueKind::Scalar(ScalarKind::Text)
        );
    }
}
