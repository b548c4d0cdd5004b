//! A JSON parser that accepts exactly what CPython's `json.loads` accepts and
//! keeps what Python's re-encoding needs.
//!
//! Why not serde_json: the signature hashes Python's re-encoding of the parsed
//! payload, so the parse must produce the values Python's would. serde_json
//! rejects Python's `NaN`/`Infinity`/`-Infinity` literals, forgets integer
//! lexemes beyond 64 bits (or, with `arbitrary_precision`, keeps float lexemes
//! that are not Python's `repr`), and refuses lone surrogates (`"\ud800"`)
//! that Python accepts and only fails on when encoding. This recursive-descent
//! parser mirrors CPython's C scanner (`Modules/_json.c`) instead: the same
//! whitespace (` \t\n\r`), strict control characters in strings, the number
//! grammar `-?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?`, surrogate-pair joining,
//! duplicate keys with dict semantics, and the same error messages.
//!
//! Strings are kept as WTF-8 bytes: UTF-8, except that a lone surrogate from a
//! `\uD800`-style escape is stored as its 3-byte generalized UTF-8 form. That
//! keeps them comparable (two keys are equal exactly when Python's are) while
//! a lone surrogate only becomes an error where Python's encoding would fail.
//! Escape-free strings and number lexemes borrow from the input text.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;

use super::SignatureInputError;

/// Deepest container nesting accepted. CPython raises `RecursionError` while
/// decoding the 995th nested container when `json.loads` is called from the
/// reference script (recursion limit 1000 minus the frames above the scanner),
/// so 994 is where the platform's own verify stops.
pub const MAX_DEPTH: usize = 994;

/// CPython refuses to convert integer literals longer than this
/// (`sys.get_int_max_str_digits()`, 4300 by default since 3.11).
pub const MAX_INT_DIGITS: usize = 4300;

/// A string value or key: WTF-8 bytes (see the module header).
pub type Text<'a> = Cow<'a, [u8]>;

/// A parsed JSON value, as Python's `json.loads` would build it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    /// An integer as Python's `str(int)` prints it: an optional `-` and digits
    /// without leading zeros (`-0` is stored as `0`).
    Int(&'a str),
    Float(f64),
    Str(Text<'a>),
    Array(Vec<Value<'a>>),
    /// Members in Python dict order: a repeated key keeps the position of its
    /// first occurrence and takes the value of its last.
    Object(Vec<(Text<'a>, Value<'a>)>),
}

impl<'a> Value<'a> {
    /// The value of `key` if this is an object that has it (Python's `dict.get`).
    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        match self {
            Value::Object(members) => members
                .iter()
                .find(|(name, _)| name.as_ref() == key.as_bytes())
                .map(|(_, value)| value),
            _ => None,
        }
    }
}

/// Where one member of the top-level object sits in the input text: from the
/// key's opening quote to the end of its value. `fly sign` copies members
/// verbatim from these spans so every lexeme survives untouched.
#[derive(Debug, Clone)]
pub struct MemberSpan<'a> {
    pub key: Text<'a>,
    pub span: Range<usize>,
    /// The value alone (after the `:` and any whitespace).
    pub value_span: Range<usize>,
}

/// A parsed document and where some of its parts sit in the input text.
#[derive(Debug)]
pub struct Located<'a> {
    pub value: Value<'a>,
    /// The top-level object's members, duplicates included, in input order.
    pub members: Vec<MemberSpan<'a>>,
    /// The items of the array found at the key path asked for (the one
    /// Python would see: a repeated key's last value), in input order.
    pub items: Vec<Range<usize>>,
}

/// Parses a whole document, like `json.loads(text)`.
pub fn parse(text: &str) -> Result<Value<'_>, SignatureInputError> {
    Parser::new(text, false, &[])
        .document()
        .map(|located| located.value)
}

/// Parses a whole document and also returns the spans of the top-level
/// object's members, duplicates included, in input order.
pub fn parse_with_members(
    text: &str,
) -> Result<(Value<'_>, Vec<MemberSpan<'_>>), SignatureInputError> {
    Parser::new(text, true, &[])
        .document()
        .map(|located| (located.value, located.members))
}

/// Parses a whole document, recording the top-level members and the items
/// of the array at `items_at` (object keys from the top, e.g. `["data",
/// "updates"]`): how each update of a platform response keeps its exact bytes.
pub fn parse_located<'a>(
    text: &'a str,
    items_at: &'static [&'static str],
) -> Result<Located<'a>, SignatureInputError> {
    Parser::new(text, true, items_at).document()
}

/// `text` (a valid JSON document) without the whitespace between tokens:
/// every lexeme, escape and member stays exactly as written.
pub fn compact(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b' ' | b'\t' | b'\n' | b'\r' => at += 1,
            b'"' => {
                let end = string_end(bytes, at + 1);
                out.push_str(&text[at..end]);
                at = end;
            }
            _ => {
                let end = bytes[at..]
                    .iter()
                    .position(|byte| matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | b'"'))
                    .map_or(bytes.len(), |offset| at + offset);
                out.push_str(&text[at..end]);
                at = end;
            }
        }
    }
    out
}

/// One past the closing quote of the string whose body starts at `at`.
fn string_end(bytes: &[u8], mut at: usize) -> usize {
    loop {
        at = plain_run_end(bytes, at);
        match bytes.get(at) {
            Some(b'"') => return at + 1,
            Some(b'\\') => at += 2,
            Some(_) => at += 1,
            None => return bytes.len(),
        }
    }
}

/// Bytes that end the plain run of a string: the quote, the backslash, and
/// the control characters Python's strict mode rejects.
const STRING_SPECIAL: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = true;
        byte += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// Objects with more members than this find duplicate keys through a hash map
/// instead of a linear scan, so a hostile object cannot make parsing quadratic.
const LINEAR_DEDUP_LIMIT: usize = 16;

pub(crate) struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pub(crate) pos: usize,
    pub(crate) depth: usize,
    members: Option<Vec<MemberSpan<'a>>>,
    /// The key path whose array items are recorded, how many of its keys
    /// the value being parsed sits under, and the items recorded so far.
    items_at: &'static [&'static str],
    keys_matched: usize,
    items: Vec<Range<usize>>,
}

impl<'a> Parser<'a> {
    pub(crate) fn new(
        text: &'a str,
        record_members: bool,
        items_at: &'static [&'static str],
    ) -> Self {
        Parser {
            text,
            bytes: text.as_bytes(),
            pos: 0,
            depth: 0,
            members: record_members.then(Vec::new),
            items_at,
            keys_matched: 0,
            items: Vec::new(),
        }
    }

    fn document(mut self) -> Result<Located<'a>, SignatureInputError> {
        if self.text.starts_with('\u{feff}') {
            return Err(self.error("Unexpected UTF-8 BOM (decode using utf-8-sig)", 0));
        }
        self.skip_whitespace();
        let value = self.value()?;
        self.skip_whitespace();
        if self.pos != self.bytes.len() {
            return Err(self.error("Extra data", self.pos));
        }
        Ok(Located {
            value,
            members: self.members.unwrap_or_default(),
            items: self.items,
        })
    }

    /// Whether the member `key` of the object being parsed continues the
    /// recorded key path. The object sits at `self.depth`, under
    /// `self.depth - 1` keys.
    fn continues_items_path(&self, key: &[u8]) -> bool {
        let level = self.depth - 1;
        self.keys_matched == level
            && self
                .items_at
                .get(level)
                .is_some_and(|wanted| wanted.as_bytes() == key)
    }

    /// Whether the array being parsed is the one at the recorded key path.
    fn records_items(&self) -> bool {
        !self.items_at.is_empty()
            && self.keys_matched == self.items_at.len()
            && self.depth == self.items_at.len() + 1
    }

    /// A Python-style message: `Expecting value: line 1 column 5 (char 4)`,
    /// where columns and `char` count code points as Python's str indices do.
    fn error(&self, message: &str, at: usize) -> SignatureInputError {
        let before = &self.text[..floor_char_boundary(self.text, at)];
        let char_index = before.chars().count();
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |index| index + 1);
        let column = before[line_start..].chars().count() + 1;
        SignatureInputError(format!(
            "malformed JSON: {message}: line {line} column {column} (char {char_index})"
        ))
    }

    pub(crate) fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    pub(crate) fn skip_whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn eat_literal(&mut self, literal: &str) -> bool {
        let found = self.bytes[self.pos..].starts_with(literal.as_bytes());
        if found {
            self.pos += literal.len();
        }
        found
    }

    pub(crate) fn value(&mut self) -> Result<Value<'a>, SignatureInputError> {
        match self.peek() {
            Some(b'"') => {
                self.pos += 1;
                self.string().map(Value::Str)
            }
            Some(b'{') => self.nested(Self::object),
            Some(b'[') => self.nested(Self::array),
            Some(b'n') if self.eat_literal("null") => Ok(Value::Null),
            Some(b't') if self.eat_literal("true") => Ok(Value::Bool(true)),
            Some(b'f') if self.eat_literal("false") => Ok(Value::Bool(false)),
            Some(b'N') if self.eat_literal("NaN") => Ok(Value::Float(f64::NAN)),
            Some(b'I') if self.eat_literal("Infinity") => Ok(Value::Float(f64::INFINITY)),
            Some(b'-') if self.eat_literal("-Infinity") => Ok(Value::Float(f64::NEG_INFINITY)),
            _ => self.number(),
        }
    }

    /// Enters a container, refusing the depth at which Python would raise
    /// `RecursionError` (and well before our own stack could overflow).
    fn nested(
        &mut self,
        container: fn(&mut Self) -> Result<Value<'a>, SignatureInputError>,
    ) -> Result<Value<'a>, SignatureInputError> {
        if self.depth == MAX_DEPTH {
            return Err(SignatureInputError(format!(
                "JSON nested deeper than {MAX_DEPTH} levels (Python's json.loads raises RecursionError)"
            )));
        }
        self.depth += 1;
        self.pos += 1;
        let value = container(self);
        self.depth -= 1;
        value
    }

    fn number(&mut self) -> Result<Value<'a>, SignatureInputError> {
        let start = self.pos;
        let digits_from = |bytes: &[u8], mut at: usize| {
            while bytes.get(at).is_some_and(u8::is_ascii_digit) {
                at += 1;
            }
            at
        };
        let bytes = self.bytes;
        let negative = bytes.get(start) == Some(&b'-');
        let int_start = start + usize::from(negative);
        let mut end = match bytes.get(int_start) {
            Some(b'0') => int_start + 1,
            Some(b'1'..=b'9') => digits_from(bytes, int_start + 1),
            _ => return Err(self.error("Expecting value", start)),
        };
        let int_end = end;
        // Like the C scanner, a `.` or `e` not followed by digits is not part of
        // the number; whatever follows then fails as the next token.
        if bytes.get(end) == Some(&b'.') && bytes.get(end + 1).is_some_and(u8::is_ascii_digit) {
            end = digits_from(bytes, end + 1);
        }
        if matches!(bytes.get(end), Some(b'e' | b'E')) {
            let mut exponent = end + 1;
            if matches!(bytes.get(exponent), Some(b'+' | b'-')) {
                exponent += 1;
            }
            if bytes.get(exponent).is_some_and(u8::is_ascii_digit) {
                end = digits_from(bytes, exponent);
            }
        }
        self.pos = end;
        let lexeme = &self.text[start..end];
        if end != int_end {
            // Rust's float parsing is correctly rounded like Python's float(),
            // and also overflows to infinity and underflows to zero.
            return lexeme
                .parse::<f64>()
                .map(Value::Float)
                .map_err(|_| self.error("Invalid number", start));
        }
        let digits = int_end - int_start;
        if digits > MAX_INT_DIGITS {
            return Err(SignatureInputError(format!(
                "integer literal with {digits} digits: Python refuses integers over {MAX_INT_DIGITS} digits (ValueError)"
            )));
        }
        Ok(Value::Int(if lexeme == "-0" { "0" } else { lexeme }))
    }

    /// A string body without escapes or control characters, borrowed from
    /// the input (most strings are), or `None` with nothing read.
    /// `self.pos` is just past the opening quote.
    pub(crate) fn plain_string(&mut self) -> Option<&'a [u8]> {
        let start = self.pos;
        let end = plain_run_end(self.bytes, start);
        if self.bytes.get(end) != Some(&b'"') {
            return None;
        }
        self.pos = end + 1;
        Some(&self.bytes[start..end])
    }

    /// A string body; `self.pos` is just past the opening quote.
    pub(crate) fn string(&mut self) -> Result<Text<'a>, SignatureInputError> {
        if let Some(plain) = self.plain_string() {
            return Ok(Cow::Borrowed(plain));
        }
        // An escape, a control character or the end of the input.
        let start = self.pos;
        let bytes = self.bytes;
        let mut at = plain_run_end(bytes, start);
        // An escape, a control character or the end of the input.
        let mut out = Vec::with_capacity(at - start + 16);
        out.extend_from_slice(&bytes[start..at]);
        loop {
            match bytes.get(at) {
                None => return Err(self.error("Unterminated string starting at", start - 1)),
                Some(b'"') => {
                    self.pos = at + 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => at = self.escape(at, &mut out)?,
                Some(_) => return Err(self.error("Invalid control character at", at)),
            }
            let run_end = plain_run_end(bytes, at);
            out.extend_from_slice(&bytes[at..run_end]);
            at = run_end;
        }
    }

    /// Decodes the escape at `at` (a backslash) into `out`; returns the
    /// position after it.
    fn escape(&self, at: usize, out: &mut Vec<u8>) -> Result<usize, SignatureInputError> {
        let simple = match self.bytes.get(at + 1) {
            Some(b'"') => b'"',
            Some(b'\\') => b'\\',
            Some(b'/') => b'/',
            Some(b'b') => 0x08,
            Some(b'f') => 0x0c,
            Some(b'n') => b'\n',
            Some(b'r') => b'\r',
            Some(b't') => b'\t',
            Some(b'u') => {
                let mut code = self.hex4(at + 2)?;
                let mut next = at + 6;
                // A high surrogate escape directly followed by a low one is one
                // astral character; any other surrogate stays lone, as in CPython.
                if (0xD800..0xDC00).contains(&code)
                    && self.bytes[next..].starts_with(b"\\u")
                    && self.bytes.len() > next + 6
                {
                    let low = self.hex4(next + 2)?;
                    if (0xDC00..0xE000).contains(&low) {
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                        next += 6;
                    }
                }
                push_wtf8(out, code);
                return Ok(next);
            }
            _ => return Err(self.error("Invalid \\escape", at)),
        };
        out.push(simple);
        Ok(at + 2)
    }

    fn hex4(&self, at: usize) -> Result<u32, SignatureInputError> {
        let digits = self
            .bytes
            .get(at..at + 4)
            .filter(|digits| digits.iter().all(u8::is_ascii_hexdigit))
            .ok_or_else(|| self.error("Invalid \\uXXXX escape", at - 1))?;
        Ok(digits.iter().fold(0, |code, &digit| {
            code * 16 + (digit as char).to_digit(16).unwrap_or(0)
        }))
    }

    fn object(&mut self) -> Result<Value<'a>, SignatureInputError> {
        let record = self.depth == 1 && self.members.is_some();
        // Room for a typical object up front: growing 0 -> 4 -> 8 costs two
        // reallocations per object otherwise.
        let mut members: Vec<(Text<'a>, Value<'a>)> = Vec::with_capacity(8);
        let mut index: Option<HashMap<Text<'a>, usize>> = None;
        self.skip_whitespace();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Object(members));
        }
        loop {
            let member_start = self.pos;
            if self.peek() != Some(b'"') {
                return Err(self.error(
                    "Expecting property name enclosed in double quotes",
                    self.pos,
                ));
            }
            self.pos += 1;
            let key = self.string()?;
            self.skip_whitespace();
            if self.peek() != Some(b':') {
                return Err(self.error("Expecting ':' delimiter", self.pos));
            }
            self.pos += 1;
            self.skip_whitespace();
            let value_start = self.pos;
            let on_items_path = self.continues_items_path(&key);
            let value = if on_items_path {
                // A repeated key replaces the earlier value, as in Python:
                // forget the items recorded under the earlier one.
                self.items.clear();
                self.keys_matched += 1;
                let value = self.value();
                self.keys_matched -= 1;
                value?
            } else {
                self.value()?
            };
            if record && let Some(spans) = &mut self.members {
                spans.push(MemberSpan {
                    key: key.clone(),
                    span: member_start..self.pos,
                    value_span: value_start..self.pos,
                });
            }
            insert_member(&mut members, &mut index, key, value);
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_whitespace();
                }
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Object(members));
                }
                _ => return Err(self.error("Expecting ',' delimiter", self.pos)),
            }
        }
    }

    fn array(&mut self) -> Result<Value<'a>, SignatureInputError> {
        let mut items = Vec::new();
        let record = self.records_items();
        self.skip_whitespace();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            let item_start = self.pos;
            items.push(self.value()?);
            if record {
                self.items.push(item_start..self.pos);
            }
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.skip_whitespace();
                }
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.error("Expecting ',' delimiter", self.pos)),
            }
        }
    }
}

/// Where the run of ordinary string bytes starting at `at` ends. Eight
/// bytes at a time while none of them is special: string bodies are most
/// of a signed update, and this scan was the parser's hottest loop.
pub fn plain_run_end(bytes: &[u8], mut at: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let has_zero_byte = |word: u64| word.wrapping_sub(ONES) & !word & HIGHS;
    while let Some(chunk) = bytes.get(at..at + 8) {
        let word = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        let special = has_zero_byte(word ^ (ONES * u64::from(b'"')))
            | has_zero_byte(word ^ (ONES * u64::from(b'\\')))
            // A byte below 0x20 borrows; bytes >= 0x80 are excluded by `!word`.
            | (word.wrapping_sub(ONES * 0x20) & !word & HIGHS);
        if special != 0 {
            break;
        }
        at += 8;
    }
    while bytes
        .get(at)
        .is_some_and(|&byte| !STRING_SPECIAL[usize::from(byte)])
    {
        at += 1;
    }
    at
}

/// Python dict assignment: an existing key keeps its place and gets the new value.
fn insert_member<'a>(
    members: &mut Vec<(Text<'a>, Value<'a>)>,
    index: &mut Option<HashMap<Text<'a>, usize>>,
    key: Text<'a>,
    value: Value<'a>,
) {
    if index.is_none() && members.len() >= LINEAR_DEDUP_LIMIT {
        let positions = members
            .iter()
            .enumerate()
            .map(|(position, (name, _))| (name.clone(), position));
        *index = Some(positions.collect());
    }
    let existing = match index {
        Some(index) => index.get(&key).copied(),
        None => members.iter().position(|(name, _)| *name == key),
    };
    match existing {
        Some(position) => members[position].1 = value,
        None => {
            if let Some(index) = index {
                index.insert(key.clone(), members.len());
            }
            members.push((key, value));
        }
    }
}

/// Appends a code point as (generalized) UTF-8: surrogates get the 3-byte form.
fn push_wtf8(out: &mut Vec<u8>, code: u32) {
    match code {
        0..=0x7F => out.push(code as u8),
        0x80..=0x7FF => {
            out.extend_from_slice(&[0xC0 | (code >> 6) as u8, 0x80 | (code & 0x3F) as u8])
        }
        0x800..=0xFFFF => out.extend_from_slice(&[
            0xE0 | (code >> 12) as u8,
            0x80 | ((code >> 6) & 0x3F) as u8,
            0x80 | (code & 0x3F) as u8,
        ]),
        _ => out.extend_from_slice(&[
            0xF0 | (code >> 18) as u8,
            0x80 | ((code >> 12) & 0x3F) as u8,
            0x80 | ((code >> 6) & 0x3F) as u8,
            0x80 | (code & 0x3F) as u8,
        ]),
    }
}

/// The first lone surrogate in WTF-8 bytes, if any. Valid UTF-8 never has
/// 0xED followed by 0xA0..=0xBF, which is exactly how a surrogate encodes.
pub fn lone_surrogate(bytes: &[u8]) -> Option<u32> {
    bytes.windows(3).find_map(|window| match window {
        [0xED, second @ 0xA0..=0xBF, third] => {
            Some(0xD000 | (u32::from(second & 0x3F) << 6) | u32::from(third & 0x3F))
        }
        _ => None,
    })
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(value: &str) -> Value<'_> {
        Value::Str(Cow::Borrowed(value.as_bytes()))
    }

    #[test]
    fn parses_python_literals_and_keeps_int_lexemes() {
        let value =
            parse(r#"[NaN, Infinity, -Infinity, 18446744073709551617, -0, 1e400]"#).unwrap();
        let Value::Array(items) = value else {
            panic!("not an array")
        };
        assert!(matches!(items[0], Value::Float(f) if f.is_nan()));
        assert_eq!(items[1], Value::Float(f64::INFINITY));
        assert_eq!(items[2], Value::Float(f64::NEG_INFINITY));
        assert_eq!(items[3], Value::Int("18446744073709551617"));
        assert_eq!(items[4], Value::Int("0"));
        assert_eq!(items[5], Value::Float(f64::INFINITY));
    }

    #[test]
    fn duplicate_keys_keep_first_position_and_last_value() {
        let value = parse(r#"{"b":1,"a":2,"b":3}"#).unwrap();
        assert_eq!(
            value,
            Value::Object(vec![
                (Cow::Borrowed(&b"b"[..]), Value::Int("3")),
                (Cow::Borrowed(&b"a"[..]), Value::Int("2")),
            ])
        );
    }

    #[test]
    fn duplicate_keys_in_large_objects_use_the_index() {
        let members: Vec<String> = (0..40).map(|n| format!("\"k{}\":{n}", n % 20)).collect();
        let document = format!("{{{}}}", members.join(","));
        let Value::Object(parsed) = parse(&document).unwrap() else {
            panic!("not an object")
        };
        assert_eq!(parsed.len(), 20);
        assert_eq!(parsed[3], (Cow::Borrowed(&b"k3"[..]), Value::Int("23")));
    }

    #[test]
    fn escapes_decode_and_surrogate_pairs_join() {
        assert_eq!(parse(r#""a\n\u00e9\/""#).unwrap(), text("a\né/"));
        assert_eq!(parse(r#""\ud83d\ude00""#).unwrap(), text("😀"));
        let Value::Str(lone) = parse(r#""\ud800\ud83d\ude00""#).unwrap() else {
            panic!("not a string")
        };
        assert_eq!(lone_surrogate(&lone), Some(0xD800));
        assert_eq!(&lone[3..], "😀".as_bytes());
    }

    #[test]
    fn errors_read_like_python() {
        let cases = [
            ("", "Expecting value: line 1 column 1 (char 0)"),
            ("[1,]", "Expecting value: line 1 column 4 (char 3)"),
            (
                "{\"a\" 1}",
                "Expecting ':' delimiter: line 1 column 6 (char 5)",
            ),
            (
                "{\"a\":1,}",
                "Expecting property name enclosed in double quotes",
            ),
            ("[1 2]", "Expecting ',' delimiter"),
            (
                "\"a\tb\"",
                "Invalid control character at: line 1 column 3 (char 2)",
            ),
            ("\"\\x\"", "Invalid \\escape"),
            ("\"\\u12g4\"", "Invalid \\uXXXX escape"),
            (
                "\"abc",
                "Unterminated string starting at: line 1 column 1 (char 0)",
            ),
            ("1.", "Extra data: line 1 column 2 (char 1)"),
            ("01", "Extra data"),
            ("\u{feff}{}", "Unexpected UTF-8 BOM"),
            ("\n é x", "Expecting value: line 2 column 2 (char 2)"),
        ];
        for (input, expected) in cases {
            let error = parse(input).unwrap_err().to_string();
            assert!(error.contains(expected), "{input:?}: {error}");
        }
    }

    #[test]
    fn depth_limit_matches_python() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse(&ok).is_ok());
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(
            parse(&deep)
                .unwrap_err()
                .to_string()
                .contains("RecursionError")
        );
    }

    #[test]
    fn integer_digit_limit_matches_python() {
        assert!(parse(&"7".repeat(MAX_INT_DIGITS)).is_ok());
        assert!(parse(&format!("-{}", "7".repeat(MAX_INT_DIGITS))).is_ok());
        assert!(parse(&"7".repeat(MAX_INT_DIGITS + 1)).is_err());
        // Floats have no such limit in Python.
        assert!(parse(&format!("{}.5", "7".repeat(MAX_INT_DIGITS + 1))).is_ok());
    }

    #[test]
    fn member_spans_cover_duplicates_in_input_order() {
        let input = r#" { "a" : 1 , "b":[2], "a":3 } "#;
        let (_, members) = parse_with_members(input).unwrap();
        let spans: Vec<&str> = members.iter().map(|m| &input[m.span.clone()]).collect();
        assert_eq!(spans, [r#""a" : 1"#, r#""b":[2]"#, r#""a":3"#]);
    }
}
