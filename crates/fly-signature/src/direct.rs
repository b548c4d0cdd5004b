//! A signed update's text read straight into what signature v1 needs, with
//! no value tree for the payload: the members the signing string names are
//! parsed as values, and `message` and `callback_query` are written out as
//! canonical JSON while they are read. Checking many updates (`verify-sig
//! --lines`) then costs no allocation per update, and the payload is read
//! once instead of parsed, built, walked and dropped.
//!
//! Same parser ([`super::json`]'s scanner: the same grammar, numbers,
//! escapes and depth), same encoder ([`super::canonical`]'s strings and
//! scalars), same field rules ([`super::v1`]). This route answers only when
//! all is well: on anything the tree route would refuse or report (malformed
//! JSON, a lone surrogate, a non-object update, ...) it gives up, and the
//! caller takes the tree route, which says exactly what is wrong. So it can
//! make a verdict faster, never different (the differential tests compare
//! the two).

use std::borrow::Cow;
use std::cell::RefCell;
use std::ops::Range;

use super::canonical::{write_string, write_value};
use super::json::{MAX_DEPTH, Parser, Text, Value};

/// Buffers reused from one update to the next (one set per thread).
#[derive(Default)]
pub(crate) struct Scratch {
    /// The canonical JSON of the payload members read so far.
    canonical: Vec<u8>,
    /// The members of the objects being written, innermost last.
    members: Vec<Member>,
    /// The decoded keys among them whose canonical JSON has escapes.
    escaped_keys: Vec<u8>,
    /// An object's members in key order, while they are put in place.
    sorted: Vec<u8>,
}

/// One member of an object being written: where its key and `"key":value`
/// are in `Scratch::canonical`, and its decoded key in
/// `Scratch::escaped_keys` if writing it took escapes.
struct Member {
    key: Range<usize>,
    escaped_key: Option<Range<usize>>,
    written: Range<usize>,
}

/// A scratch larger than this after an update is dropped rather than kept:
/// one huge line must not hold a thread's memory for the rest of the run.
const KEPT_CAPACITY: usize = 1 << 20;

/// Runs `read` with this thread's scratch buffers.
pub(crate) fn with_scratch<R>(read: impl FnOnce(&mut Scratch) -> R) -> R {
    thread_local! {
        static SCRATCH: RefCell<Scratch> = RefCell::default();
    }
    SCRATCH.with(|scratch| {
        // Only a re-entrant call could find it borrowed; it gets buffers of its own.
        let Ok(mut scratch) = scratch.try_borrow_mut() else {
            return read(&mut Scratch::default());
        };
        let result = read(&mut scratch);
        if scratch.canonical.capacity() > KEPT_CAPACITY
            || scratch.sorted.capacity() > KEPT_CAPACITY
            || scratch.escaped_keys.capacity() > KEPT_CAPACITY
            || scratch.members.capacity() > KEPT_CAPACITY / 64
        {
            *scratch = Scratch::default();
        }
        result
    })
}

/// What signature v1 reads from a signed update.
pub(crate) struct SignedParts<'a> {
    /// The top-level members named in `SIGNED_MEMBERS` that the update
    /// has, each with the value Python's dict keeps (a repeated key's last).
    members: [Option<Value<'a>>; SIGNED_MEMBERS.len()],
    /// The canonical JSON of the payload (`message or callback_query or
    /// {}`), in the scratch the parts were read with.
    payload: Range<usize>,
}

impl<'a> SignedParts<'a> {
    /// The update's `.get(key)`, for the members in `SIGNED_MEMBERS`.
    pub(crate) fn member(&self, key: &str) -> Option<&Value<'a>> {
        let slot = SIGNED_MEMBERS.iter().position(|name| *name == key)?;
        self.members[slot].as_ref()
    }

    pub(crate) fn canonical_payload<'s>(&self, scratch: &'s Scratch) -> &'s [u8] {
        if self.payload.is_empty() {
            b"{}"
        } else {
            &scratch.canonical[self.payload.clone()]
        }
    }
}

/// The top-level members besides the payload that signature v1 reads.
const SIGNED_MEMBERS: [&str; 6] = [
    "update_id",
    "type",
    "bot",
    "timestamp",
    "nonce",
    "signature",
];

/// Reads a signed update, or `None` when the tree route must (see the module
/// header): the text is not a well-formed JSON object as Python reads it, or
/// a payload member cannot be written as canonical JSON.
pub(crate) fn read_signed_parts<'a>(
    text: &'a str,
    scratch: &mut Scratch,
) -> Option<SignedParts<'a>> {
    scratch.canonical.clear();
    scratch.members.clear();
    scratch.escaped_keys.clear();
    if text.starts_with('\u{feff}') {
        return None;
    }
    let mut parser = Parser::new(text, false, &[]);
    parser.skip_whitespace();
    if parser.peek() != Some(b'{') {
        return None;
    }
    parser.pos += 1;
    parser.depth = 1;
    let mut members = [None, None, None, None, None, None];
    let (mut message, mut callback_query) = (None, None);
    parser.skip_whitespace();
    if parser.peek() == Some(b'}') {
        parser.pos += 1;
    } else {
        loop {
            let key = member_key(&mut parser)?;
            match key.as_ref() {
                b"message" | b"callback_query" => {
                    let start = scratch.canonical.len();
                    scratch.write_canonical(&mut parser)?;
                    let written = Some(start..scratch.canonical.len());
                    if key.as_ref() == b"message" {
                        message = written;
                    } else {
                        callback_query = written;
                    }
                }
                name => match SIGNED_MEMBERS
                    .iter()
                    .position(|signed| signed.as_bytes() == name)
                {
                    Some(slot) => members[slot] = Some(parser.value().ok()?),
                    // Read (so that malformed JSON is caught), then dropped.
                    None => drop(parser.value().ok()?),
                },
            }
            if !after_member(&mut parser, b'}')? {
                break;
            }
        }
    }
    parser.skip_whitespace();
    if parser.pos != text.len() {
        return None;
    }
    let truthy = |written: &Option<Range<usize>>| {
        written
            .as_ref()
            .is_some_and(|range| canonical_is_truthy(&scratch.canonical[range.clone()]))
    };
    let payload = if truthy(&message) {
        message
    } else if truthy(&callback_query) {
        callback_query
    } else {
        None
    };
    Some(SignedParts {
        members,
        payload: payload.unwrap_or(0..0),
    })
}

/// `bool()` of the value whose canonical JSON is `canonical`: Python's
/// falsy values each have exactly one canonical form.
fn canonical_is_truthy(canonical: &[u8]) -> bool {
    !matches!(
        canonical,
        b"{}" | b"[]" | b"\"\"" | b"null" | b"false" | b"0" | b"0.0" | b"-0.0"
    )
}

/// A member's key and its `:`, leaving the parser on the value.
fn member_key<'a>(parser: &mut Parser<'a>) -> Option<Text<'a>> {
    if parser.peek() != Some(b'"') {
        return None;
    }
    parser.pos += 1;
    let key = match parser.plain_string() {
        Some(plain) => Cow::Borrowed(plain),
        None => parser.string().ok()?,
    };
    parser.skip_whitespace();
    if parser.peek() != Some(b':') {
        return None;
    }
    parser.pos += 1;
    parser.skip_whitespace();
    Some(key)
}

/// After a member or item: `Some(true)` at a `,` (the parser then on the
/// next one), `Some(false)` at `close`, `None` at anything else.
fn after_member(parser: &mut Parser, close: u8) -> Option<bool> {
    parser.skip_whitespace();
    match parser.peek() {
        Some(b',') => {
            parser.pos += 1;
            parser.skip_whitespace();
            Some(true)
        }
        Some(byte) if byte == close => {
            parser.pos += 1;
            Some(false)
        }
        _ => None,
    }
}

impl Scratch {
    /// Reads one value and appends its canonical JSON to `self.canonical`.
    fn write_canonical(&mut self, parser: &mut Parser) -> Option<()> {
        match parser.peek()? {
            b'"' => {
                parser.pos += 1;
                match parser.plain_string() {
                    Some(plain) => self.write_plain_string(plain),
                    None => write_string(&parser.string().ok()?, &mut self.canonical).ok()?,
                }
                Some(())
            }
            open @ (b'{' | b'[') => {
                if parser.depth == MAX_DEPTH {
                    return None;
                }
                parser.depth += 1;
                parser.pos += 1;
                parser.skip_whitespace();
                if open == b'{' {
                    self.write_object(parser)?;
                } else {
                    self.write_array(parser)?;
                }
                parser.depth -= 1;
                Some(())
            }
            // A scalar: no allocation, and one canonical form.
            _ => write_value(&parser.value().ok()?, &mut self.canonical).ok(),
        }
    }

    /// A string as [`write_string`] writes it, for one read without escapes
    /// ([`Parser::plain_string`]): its bytes are valid UTF-8 (so no lone
    /// surrogate) with nothing to escape, and are copied as they are.
    fn write_plain_string(&mut self, plain: &[u8]) {
        self.canonical.reserve(plain.len() + 2);
        self.canonical.push(b'"');
        self.canonical.extend_from_slice(plain);
        self.canonical.push(b'"');
    }

    fn write_array(&mut self, parser: &mut Parser) -> Option<()> {
        self.canonical.push(b'[');
        if parser.peek() == Some(b']') {
            parser.pos += 1;
        } else {
            loop {
                self.write_canonical(parser)?;
                if !after_member(parser, b']')? {
                    break;
                }
                self.canonical.push(b',');
            }
        }
        self.canonical.push(b']');
        Some(())
    }

    /// Members are written in input order, then put in key order if they
    /// were not in it: most objects arrive sorted.
    fn write_object(&mut self, parser: &mut Parser) -> Option<()> {
        self.canonical.push(b'{');
        if parser.peek() == Some(b'}') {
            parser.pos += 1;
            self.canonical.push(b'}');
            return Some(());
        }
        let first = self.members.len();
        let body = self.canonical.len();
        let escaped_from = self.escaped_keys.len();
        loop {
            let start = self.canonical.len();
            let mut escaped_key = None;
            if parser.peek() != Some(b'"') {
                return None;
            }
            parser.pos += 1;
            match parser.plain_string() {
                Some(plain) => self.write_plain_string(plain),
                None => {
                    let key = parser.string().ok()?;
                    write_string(&key, &mut self.canonical).ok()?;
                    // Keys sort by their decoded bytes: the written ones
                    // stand in for them unless the key needed escapes.
                    if self.canonical.len() - start != key.len() + 2 {
                        let from = self.escaped_keys.len();
                        self.escaped_keys.extend_from_slice(&key);
                        escaped_key = Some(from..self.escaped_keys.len());
                    }
                }
            }
            let key = start + 1..self.canonical.len() - 1;
            parser.skip_whitespace();
            if parser.peek() != Some(b':') {
                return None;
            }
            parser.pos += 1;
            parser.skip_whitespace();
            self.canonical.push(b':');
            self.write_canonical(parser)?;
            self.members.push(Member {
                key,
                escaped_key,
                written: start..self.canonical.len(),
            });
            if !after_member(parser, b'}')? {
                break;
            }
            self.canonical.push(b',');
        }
        let (canonical, escaped_keys) = (&self.canonical, &self.escaped_keys);
        let members = &mut self.members[first..];
        let key = |member: &Member| match &member.escaped_key {
            None => &canonical[member.key.clone()],
            Some(decoded) => &escaped_keys[decoded.clone()],
        };
        if !members.is_sorted_by(|a, b| key(a) < key(b)) {
            // Stable: a repeated key's occurrences stay in input order, and
            // Python's dict keeps the last one's value.
            members.sort_by(|a, b| key(a).cmp(key(b)));
            self.sorted.clear();
            for (position, member) in members.iter().enumerate() {
                let repeated = members
                    .get(position + 1)
                    .is_some_and(|next| key(next) == key(member));
                if !repeated {
                    if !self.sorted.is_empty() {
                        self.sorted.push(b',');
                    }
                    self.sorted
                        .extend_from_slice(&canonical[member.written.clone()]);
                }
            }
            self.canonical.truncate(body);
            self.canonical.extend_from_slice(&self.sorted);
        }
        self.members.truncate(first);
        self.escaped_keys.truncate(escaped_from);
        self.canonical.push(b'}');
        Some(())
    }
}
