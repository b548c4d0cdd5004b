//! Python's `json.dumps(obj, ensure_ascii=False, separators=(",", ":"),
//! sort_keys=True).encode("utf-8")`, byte for byte, over values from
//! [`super::json`].
//!
//! The parts that differ from a generic JSON writer: floats print as Python's
//! `repr` (`1e-05`, `1e+16`, `100.0`) and non-finite ones as `NaN`/`Infinity`;
//! keys sort by code point (which byte order on UTF-8 is); only `"`, `\` and
//! U+0000..U+001F are escaped; and a lone surrogate is an error, because
//! Python's final `.encode("utf-8")` raises on it.

use super::SignatureInputError;
use super::json::{Text, Value, lone_surrogate, plain_run_end};

/// The canonical encoding of `value`.
pub fn canonical_json(value: &Value) -> Result<Vec<u8>, SignatureInputError> {
    let mut out = Vec::with_capacity(256);
    write_value(value, &mut out)?;
    Ok(out)
}

pub(crate) fn write_value(value: &Value, out: &mut Vec<u8>) -> Result<(), SignatureInputError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Int(digits) => out.extend_from_slice(digits.as_bytes()),
        Value::Float(number) => out.extend_from_slice(float_json(*number).as_bytes()),
        Value::Str(text) => write_string(text, out)?,
        Value::Array(items) => {
            out.push(b'[');
            for (position, item) in items.iter().enumerate() {
                if position > 0 {
                    out.push(b',');
                }
                write_value(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(members) => {
            out.push(b'{');
            // Keys are unique after parsing, so an unstable sort is exact.
            // Most objects arrive sorted already; skip the allocation then.
            if members.is_sorted_by(|a, b| a.0 <= b.0) {
                write_members(members.iter(), out)?;
            } else {
                let mut sorted: Vec<&(Text, Value)> = members.iter().collect();
                sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                write_members(sorted.into_iter(), out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn write_members<'v, 'a: 'v>(
    members: impl Iterator<Item = &'v (Text<'a>, Value<'a>)>,
    out: &mut Vec<u8>,
) -> Result<(), SignatureInputError> {
    for (position, (key, value)) in members.enumerate() {
        if position > 0 {
            out.push(b',');
        }
        write_string(key, out)?;
        out.push(b':');
        write_value(value, out)?;
    }
    Ok(())
}

/// A JSON string as Python writes it with `ensure_ascii=False`: only `"`,
/// `\` and U+0000..U+001F are escaped, the very bytes that end a plain run
/// for the parser too.
pub fn write_string(text: &[u8], out: &mut Vec<u8>) -> Result<(), SignatureInputError> {
    // Only strings decoded from `\u` escapes can hold a lone surrogate, and
    // its lead byte 0xED is rare: look closer only when it is there.
    if text.contains(&0xED)
        && let Some(code) = lone_surrogate(text)
    {
        return Err(SignatureInputError(format!(
            "a string contains the lone surrogate \\u{code:04x}, which Python cannot encode as UTF-8"
        )));
    }
    out.push(b'"');
    write_string_body(text, out);
    out.push(b'"');
    Ok(())
}

/// JSON text of a parsed value as it goes back on the wire (a forwarded
/// message's `data`): members in their order, numbers as Python prints them,
/// and strings as UTF-8 except that a lone surrogate is written as its
/// `\udXXX` escape, as Python's `json.dumps` sends it (UTF-8 cannot carry one).
pub fn wire_json(value: &Value) -> String {
    let mut out = Vec::with_capacity(128);
    write_wire_value(value, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

fn write_wire_value(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Array(items) => {
            out.push(b'[');
            for (position, item) in items.iter().enumerate() {
                if position > 0 {
                    out.push(b',');
                }
                write_wire_value(item, out);
            }
            out.push(b']');
        }
        Value::Object(members) => {
            out.push(b'{');
            for (position, (key, item)) in members.iter().enumerate() {
                if position > 0 {
                    out.push(b',');
                }
                write_wire_string(key, out);
                out.push(b':');
                write_wire_value(item, out);
            }
            out.push(b'}');
        }
        Value::Str(text) => write_wire_string(text, out),
        // Scalars have one form; the canonical writer cannot fail on them.
        scalar => {
            let _ = write_value(scalar, out);
        }
    }
}

/// A JSON string for the wire from WTF-8 text (see [`wire_json`]): the
/// escapes of [`write_string`], plus `\udXXX` for each lone surrogate.
pub fn write_wire_string(text: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    let mut rest = text;
    while let Some(at) = rest
        .windows(3)
        .position(|window| window[0] == 0xED && (0xA0..=0xBF).contains(&window[1]))
    {
        write_string_body(&rest[..at], out);
        let code = 0xD000 | (u32::from(rest[at + 1] & 0x3F) << 6) | u32::from(rest[at + 2] & 0x3F);
        out.extend_from_slice(format!("\\u{code:04x}").as_bytes());
        rest = &rest[at + 3..];
    }
    write_string_body(rest, out);
    out.push(b'"');
}

/// The inside of a JSON string: only `"`, `\` and U+0000..U+001F escaped.
fn write_string_body(text: &[u8], out: &mut Vec<u8>) {
    let mut at = 0;
    loop {
        let run_end = plain_run_end(text, at);
        out.extend_from_slice(&text[at..run_end]);
        let Some(&byte) = text.get(run_end) else {
            break;
        };
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            control => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(control >> 4)]);
                out.push(HEX[usize::from(control & 0xF)]);
            }
        }
        at = run_end + 1;
    }
}

/// A Rust string as a JSON string literal (for verdict lines and `fly sign`).
pub fn json_string(text: &str) -> String {
    let mut out = Vec::with_capacity(text.len() + 2);
    // A `str` is valid UTF-8, so it holds no lone surrogate and cannot fail.
    let _ = write_string(text.as_bytes(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// A float as `json.dumps` writes it.
pub fn float_json(number: f64) -> String {
    match number {
        _ if number.is_nan() => "NaN".into(),
        f64::INFINITY => "Infinity".into(),
        f64::NEG_INFINITY => "-Infinity".into(),
        _ => float_repr(number),
    }
}

/// A float as Python's `str()`/`repr()` writes it.
pub fn float_str(number: f64) -> String {
    match number {
        _ if number.is_nan() => "nan".into(),
        f64::INFINITY => "inf".into(),
        f64::NEG_INFINITY => "-inf".into(),
        _ => float_repr(number),
    }
}

/// Python's `repr` of a finite float: the shortest digits that round-trip,
/// in positional form when the decimal exponent is in -4..16, else as
/// `d.ddde±XX` with at least two exponent digits.
fn float_repr(number: f64) -> String {
    let scientific = shortest_scientific(number);
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if !(-4..16).contains(&exponent) {
        let (first, rest) = digits.split_at(1);
        let fraction = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exponent_sign = if exponent < 0 { '-' } else { '+' };
        return format!(
            "{sign}{first}{fraction}e{exponent_sign}{:02}",
            exponent.abs()
        );
    }
    if exponent < 0 {
        let zeros = "0".repeat((-exponent - 1) as usize);
        return format!("{sign}0.{zeros}{digits}");
    }
    let int_len = exponent as usize + 1;
    if digits.len() > int_len {
        let (integer, fraction) = digits.split_at(int_len);
        format!("{sign}{integer}.{fraction}")
    } else {
        let zeros = "0".repeat(int_len - digits.len());
        format!("{sign}{digits}{zeros}.0")
    }
}

/// The shortest round-tripping digits as `d.ddde±x`. Rust's `{:e}` finds the
/// same length as Python's dtoa, but when the exact value lies halfway
/// between two shortest candidates it may take the upper one, where Python
/// takes the even one (-1237641267491529.25 is `...529.2` in Python). Rust's
/// fixed-precision formatting rounds the exact value half-to-even, so it
/// gives Python's choice whenever that one round-trips too.
fn shortest_scientific(number: f64) -> String {
    let shortest = format!("{number:e}");
    let digits = shortest
        .split('e')
        .next()
        .unwrap_or_default()
        .bytes()
        .filter(u8::is_ascii_digit)
        .count();
    let nearest = format!(
        "{number:.precision$e}",
        precision = digits.saturating_sub(1)
    );
    if nearest != shortest && nearest.parse::<f64>() == Ok(number) {
        nearest
    } else {
        shortest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::parse;

    fn canonical(text: &str) -> String {
        String::from_utf8(canonical_json(&parse(text).unwrap()).unwrap()).unwrap()
    }

    #[test]
    fn floats_print_as_python_repr() {
        let cases = [
            (1e-5, "1e-05"),
            (2.5e-7, "2.5e-07"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (100.0, "100.0"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (0.0001, "0.0001"),
            (123.456, "123.456"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (-1.5e300, "-1.5e+300"),
            (-1237641267491529.2, "-1237641267491529.2"),
            (848724618916486.2, "848724618916486.2"),
        ];
        for (number, expected) in cases {
            assert_eq!(float_json(number), expected, "{number:e}");
        }
        assert_eq!(float_json(f64::NAN), "NaN");
        assert_eq!(float_str(f64::NEG_INFINITY), "-inf");
    }

    #[test]
    fn objects_sort_by_code_point_and_strings_escape_like_python() {
        assert_eq!(
            canonical(r#"{"b":1,"a":[true,null],"😀":2,"\uffff":3,"é":"\u0001\u007f\"\\\/\n"}"#),
            "{\"a\":[true,null],\"b\":1,\"é\":\"\\u0001\u{7f}\\\"\\\\/\\n\",\"\u{ffff}\":3,\"😀\":2}"
        );
    }

    #[test]
    fn lone_surrogates_are_errors() {
        let value = parse(r#"{"a":"x\udc00"}"#).unwrap();
        let error = canonical_json(&value).unwrap_err().to_string();
        assert!(error.contains("\\udc00"), "{error}");
    }
}
