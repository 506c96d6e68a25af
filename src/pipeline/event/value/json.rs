//! Checks that a json/jsonb value's text is one JSON value, as strictly as a consumer's parser.
//!
//! The text is embedded in events as it is, so it must be JSON to the letter: RFC 8259's
//! grammar, UTF-8 inside strings, and no `\u` escape of a lone surrogate (which a parser that
//! reads strings as Unicode refuses). serde_json, skipping a value, checks neither of the last
//! two and costs three to four times this single pass.

use super::{clean_prefix, number_len, HIGH_BITS};

/// Containers nested deeper than this are refused, as serde_json refuses them.
const MAX_DEPTH: u32 = 127;

/// Whether `text` is exactly one JSON value, with nothing but whitespace around it.
pub fn is_json(text: &[u8]) -> bool {
    Checker {
        text,
        at: 0,
        depth: 0,
        objects: 0,
    }
    .check()
    .is_some()
}

/// What [`Checker::value`] read.
#[derive(PartialEq, Eq)]
enum Read {
    Whole,
    Opened,
}

/// A cursor over the text and the containers it is inside.
struct Checker<'a> {
    text: &'a [u8],
    at: usize,
    depth: u32,
    /// One bit a level, the innermost lowest: set for an object, clear for an array.
    objects: u128,
}

impl Checker<'_> {
    /// `Some` when the whole text is one value.
    fn check(&mut self) -> Option<()> {
        loop {
            if self.value()? == Read::Opened {
                continue;
            }
            // After a value: close containers until a comma asks for the next value.
            loop {
                self.skip_whitespace();
                if self.depth == 0 {
                    return (self.at == self.text.len()).then_some(());
                }
                let in_object = self.objects & 1 == 1;
                match (self.next()?, in_object) {
                    (b',', true) => {
                        self.key()?;
                        break;
                    }
                    (b',', false) => break,
                    (b'}', true) | (b']', false) => self.close(),
                    _ => return None,
                }
            }
        }
    }

    /// A whole scalar or empty container, or the opening of a container (with its first key,
    /// for an object) whose contents `check`'s loop reads.
    fn value(&mut self) -> Option<Read> {
        self.skip_whitespace();
        match self.next()? {
            b'{' => return self.container(b'}', true),
            b'[' => return self.container(b']', false),
            b'"' => self.string()?,
            b't' => self.literal(b"rue")?,
            b'f' => self.literal(b"alse")?,
            b'n' => self.literal(b"ull")?,
            b'-' | b'0'..=b'9' => self.at += number_len(&self.text[self.at - 1..])? - 1,
            _ => return None,
        }
        Some(Read::Whole)
    }

    /// A container whose opening bracket was read: whole when empty, else opened (with its
    /// first key, for an object).
    fn container(&mut self, close: u8, object: bool) -> Option<Read> {
        self.skip_whitespace();
        if self.peek() == Some(close) && self.depth < MAX_DEPTH {
            self.at += 1;
            return Some(Read::Whole);
        }
        self.open(object)?;
        if object {
            self.key()?;
        }
        Some(Read::Opened)
    }

    /// An object's key and its colon.
    fn key(&mut self) -> Option<()> {
        self.skip_whitespace();
        (self.next()? == b'"').then_some(())?;
        self.string()?;
        self.skip_whitespace();
        (self.next()? == b':').then_some(())
    }

    fn open(&mut self, object: bool) -> Option<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return None;
        }
        self.objects = (self.objects << 1) | u128::from(object);
        Some(())
    }

    fn close(&mut self) {
        self.depth -= 1;
        self.objects >>= 1;
    }

    /// The rest of a string whose opening quote was read. Inlined: most strings are short
    /// keys, for which the call itself cost as much as the reading (callgrind).
    #[inline(always)]
    fn string(&mut self) -> Option<()> {
        let start = self.at;
        let mut seen = 0u64;
        loop {
            // Most text needs no escape: eight bytes a step, up to the first byte that does.
            // (Bytes past the string may be seen too, costing at most a needless UTF-8 check.)
            while let Some(word) = self.text.get(self.at..).and_then(<[u8]>::first_chunk::<8>) {
                let word = u64::from_le_bytes(*word);
                seen |= word;
                let clean = clean_prefix(word);
                self.at += clean;
                if clean < 8 {
                    break;
                }
            }
            let byte = self.next()?;
            seen |= u64::from(byte);
            match byte {
                b'"' => break,
                b'\\' => self.escape()?,
                0x00..=0x1f => return None,
                _ => {}
            }
        }
        // Outside strings the grammar admits ASCII alone, so only here can UTF-8 be broken.
        if seen & HIGH_BITS != 0 {
            std::str::from_utf8(&self.text[start..self.at - 1]).ok()?;
        }
        Some(())
    }

    /// The rest of an escape whose backslash was read. A `\u` surrogate must be a high one
    /// followed by an escaped low one.
    fn escape(&mut self) -> Option<()> {
        match self.next()? {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(()),
            b'u' => match self.hex4()? {
                0xd800..=0xdbff => {
                    (self.next()? == b'\\' && self.next()? == b'u').then_some(())?;
                    matches!(self.hex4()?, 0xdc00..=0xdfff).then_some(())
                }
                0xdc00..=0xdfff => None,
                _ => Some(()),
            },
            _ => None,
        }
    }

    fn hex4(&mut self) -> Option<u16> {
        let digits = self.text.get(self.at..self.at + 4)?;
        self.at += 4;
        let digits = std::str::from_utf8(digits).ok()?;
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u16::from_str_radix(digits, 16).ok()
    }

    fn literal(&mut self, rest: &[u8]) -> Option<()> {
        let found = self.text.get(self.at..self.at + rest.len())?;
        self.at += rest.len();
        (found == rest).then_some(())
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.at += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.at += 1;
        Some(byte)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a strict consumer accepts: serde_json reading the text into values, which checks
    /// UTF-8 and surrogates.
    fn strict(text: &[u8]) -> bool {
        serde_json::from_slice::<serde_json::Value>(text).is_ok()
    }

    #[test]
    fn values_and_documents() {
        for ok in [
            &br#"{"qty": 1, "sku": "W-1", "price": 24.50}"#[..],
            br#" [1, -2.5e+3, "x\u00e9\n\/", null, true, false, {"b": {}}, []] "#,
            b"0",
            b"\"\"",
            br#""\ud83d\ude00 \u20ac""#,
            "\"é€😀\"".as_bytes(),
            br#"{"a":[{"b":[{}]}]}"#,
        ] {
            assert!(is_json(ok), "{}", String::from_utf8_lossy(ok));
            assert!(strict(ok));
        }
    }

    #[test]
    fn what_a_strict_parser_refuses_is_refused() {
        for bad in [
            &b""[..],
            b" ",
            b"{broken",
            br#"{"a":1,}"#,
            b"[1,]",
            b"[1 2]",
            b"01",
            b"1.",
            b"-",
            b"+1",
            br#"{"a":1} x"#,
            br#"{"a" 1}"#,
            br#"{1:2}"#,
            br#"{"a":1]"#,
            b"[1}",
            b"\"a\tb\"",
            b"\"\xff\"",
            b"\"\xc3\"",
            br#""\ud800""#,
            br#""\udc00""#,
            br#""\ud800\u0041""#,
            br#""\x""#,
            br#""\u12g4""#,
            br#""\u12""#,
            b"tru",
            b"nul",
            b"\"abc",
            b"[",
            b"]",
            b"{\"a\":",
        ] {
            assert!(!is_json(bad), "{}", String::from_utf8_lossy(bad));
            assert!(!strict(bad), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn nesting_is_limited_as_serde_json_limits_it() {
        for depth in [1, 64, 127, 128, 129, 300] {
            let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            assert_eq!(is_json(text.as_bytes()), strict(text.as_bytes()), "{depth}");
            let text = format!("{}1{}", "{\"k\":".repeat(depth), "}".repeat(depth));
            assert_eq!(is_json(text.as_bytes()), strict(text.as_bytes()), "{depth}");
        }
    }

    /// Generated text over JSON's alphabet, escapes and broken UTF-8 included: accepted
    /// exactly when a strict parser accepts it.
    #[test]
    fn agrees_with_a_strict_parser_on_generated_text() {
        let pieces: &[&[u8]] = &[
            b"{",
            b"}",
            b"[",
            b"]",
            b",",
            b":",
            b"\"",
            b"\"k\"",
            b"\"v\":",
            b" ",
            b"\n",
            b"0",
            b"1",
            b"-",
            b".",
            b"e",
            b"+",
            b"12.5",
            b"true",
            b"false",
            b"null",
            b"\\",
            b"\\n",
            b"\\u00e9",
            b"\\ud83d",
            b"\\ude00",
            b"\\ud800",
            b"\xc3\xa9",
            b"\xff",
            b"\xe2\x82",
            b"\t",
            b"\x01",
            b"abcdefgh",
            b"x",
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let mut accepted = 0;
        for _ in 0..300_000 {
            let len = next() % 12;
            let text: Vec<u8> = (0..len)
                .flat_map(|_| {
                    pieces[(next() % pieces.len() as u64) as usize]
                        .iter()
                        .copied()
                })
                .collect();
            let expected = strict(&text);
            assert_eq!(
                is_json(&text),
                expected,
                "{}",
                String::from_utf8_lossy(&text)
            );
            accepted += usize::from(expected);
        }
        assert!(
            accepted > 1_000,
            "too few valid texts generated: {accepted}"
        );
    }
}
