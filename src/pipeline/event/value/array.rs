//! PostgreSQL array literals (`{1,2,NULL}`, `{{"a,b","c\"d"}}`, `[0:1]={1,2}`) to JSON arrays.

use super::{write_scalar, ScalarKind};

/// The text is not a well-formed array literal.
#[derive(Debug, PartialEq, Eq)]
pub struct MalformedArray;

/// Arrays deeper than this are refused (PostgreSQL's own limit is 6 dimensions).
const MAX_DEPTH: usize = 32;

/// Appends the JSON array for an array literal whose elements are of kind `element`.
/// On error, part of an array may have been written: the caller truncates.
pub fn write_array(
    out: &mut Vec<u8>,
    element: ScalarKind,
    text: &[u8],
) -> Result<(), MalformedArray> {
    let mut parser = Parser {
        text: skip_dimensions(text)?,
        position: 0,
        scratch: Vec::new(),
    };
    parser.array(out, element, 0)?;
    if parser.position == parser.text.len() {
        Ok(())
    } else {
        Err(MalformedArray)
    }
}

/// Skips an explicit bounds decoration such as `[0:2]=` or `[1:2][1:3]=`.
fn skip_dimensions(text: &[u8]) -> Result<&[u8], MalformedArray> {
    if text.first() != Some(&b'[') {
        return Ok(text);
    }
    let equals = text.iter().position(|b| *b == b'=').ok_or(MalformedArray)?;
    Ok(&text[equals + 1..])
}

struct Parser<'a> {
    text: &'a [u8],
    position: usize,
    scratch: Vec<u8>,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.position).copied()
    }

    fn expect(&mut self, byte: u8) -> Result<(), MalformedArray> {
        if self.peek() == Some(byte) {
            self.position += 1;
            Ok(())
        } else {
            Err(MalformedArray)
        }
    }

    fn array(
        &mut self,
        out: &mut Vec<u8>,
        element: ScalarKind,
        depth: usize,
    ) -> Result<(), MalformedArray> {
        if depth >= MAX_DEPTH {
            return Err(MalformedArray);
        }
        self.expect(b'{')?;
        out.push(b'[');
        if self.peek() == Some(b'}') {
            self.position += 1;
            out.push(b']');
            return Ok(());
        }
        loop {
            match self.peek() {
                Some(b'{') => self.array(out, element, depth + 1)?,
                Some(b'"') => {
                    self.quoted()?;
                    write_scalar(out, element, &self.scratch);
                }
                Some(_) => self.unquoted(out, element)?,
                None => return Err(MalformedArray),
            }
            match self.peek() {
                Some(b',') => {
                    self.position += 1;
                    out.push(b',');
                }
                Some(b'}') => {
                    self.position += 1;
                    out.push(b']');
                    return Ok(());
                }
                _ => return Err(MalformedArray),
            }
        }
    }

    /// A double-quoted element, unescaped into `scratch`.
    fn quoted(&mut self) -> Result<(), MalformedArray> {
        self.expect(b'"')?;
        self.scratch.clear();
        loop {
            match self.peek().ok_or(MalformedArray)? {
                b'"' => {
                    self.position += 1;
                    return Ok(());
                }
                b'\\' => {
                    let escaped = *self.text.get(self.position + 1).ok_or(MalformedArray)?;
                    self.scratch.push(escaped);
                    self.position += 2;
                }
                byte => {
                    self.scratch.push(byte);
                    self.position += 1;
                }
            }
        }
    }

    /// An unquoted element: `NULL` (any case) is SQL NULL, anything else is the element's text.
    fn unquoted(&mut self, out: &mut Vec<u8>, element: ScalarKind) -> Result<(), MalformedArray> {
        let start = self.position;
        while let Some(byte) = self.peek() {
            match byte {
                b',' | b'}' => break,
                b'{' | b'"' | b'\\' => return Err(MalformedArray),
                _ => self.position += 1,
            }
        }
        let text = self.text[start..self.position].trim_ascii();
        if text.is_empty() {
            return Err(MalformedArray);
        }
        if text.eq_ignore_ascii_case(b"NULL") {
            out.extend_from_slice(b"null");
        } else {
            write_scalar(out, element, text);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(element: ScalarKind, text: &str) -> Result<String, MalformedArray> {
        let mut out = Vec::new();
        write_array(&mut out, element, text.as_bytes())?;
        Ok(String::from_utf8(out).expect("UTF-8"))
    }

    #[test]
    fn integer_arrays_with_nulls() {
        assert_eq!(
            json(ScalarKind::Integer, "{1,2,NULL}").unwrap(),
            "[1,2,null]"
        );
        assert_eq!(json(ScalarKind::Integer, "{}").unwrap(), "[]");
    }

    #[test]
    fn quoted_text_elements_keep_their_type() {
        assert_eq!(
            json(ScalarKind::Text, r#"{"a,b","c\"d",NULL,"NULL",123,t}"#).unwrap(),
            r#"["a,b","c\"d",null,"NULL","123","t"]"#
        );
    }

    #[test]
    fn nested_and_bounded_arrays() {
        assert_eq!(
            json(ScalarKind::Integer, "{{1,2},{3,NULL}}").unwrap(),
            "[[1,2],[3,null]]"
        );
        assert_eq!(json(ScalarKind::Integer, "[0:1]={7,8}").unwrap(), "[7,8]");
    }

    #[test]
    fn json_and_float_elements() {
        assert_eq!(
            json(ScalarKind::Json, r#"{"{\"a\": 2.50}",NULL}"#).unwrap(),
            r#"[{"a": 2.50},null]"#
        );
        assert_eq!(
            json(ScalarKind::Float, "{1.5,NaN,-Infinity}").unwrap(),
            r#"[1.5,"NaN","-Infinity"]"#
        );
    }

    #[test]
    fn malformed_literals_are_refused() {
        for bad in [
            "", "{", "{1,", "{1,}", "1,2", "{1}}", "{\"a}", "[0:1]{1}", "{a\"b}",
        ] {
            assert_eq!(json(ScalarKind::Text, bad), Err(MalformedArray), "{bad}");
        }
        let deep = "{".repeat(100) + &"}".repeat(100);
        assert_eq!(json(ScalarKind::Text, &deep), Err(MalformedArray));
    }
}
