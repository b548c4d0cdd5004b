//! Python's truthiness, `int()` and `str()` over parsed JSON values: the
//! reference builds the signing string with `str(x or "")` and `int(x or 0)`.
//!
//! Where Python would raise (`int("4.5")`, `int([1])`, `int(float("nan"))`)
//! the result is a [`SignatureInputError`]. Where reproducing Python would
//! need its Unicode tables (`int("٤٢")` accepts any Unicode digit; `repr` of a
//! container keeps printable non-ASCII characters) the result is a "cannot
//! reproduce" error: an honest refusal instead of a guess.

use std::borrow::Cow;

use super::SignatureInputError;
use super::canonical::float_str;
use super::json::{MAX_INT_DIGITS, Value, lone_surrogate};

/// `bool(value)`.
pub fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(flag) => *flag,
        Value::Int(digits) => *digits != "0",
        // NaN is truthy in Python too: only 0.0 and -0.0 are false.
        Value::Float(number) => *number != 0.0,
        Value::Str(text) => !text.is_empty(),
        Value::Array(items) => !items.is_empty(),
        Value::Object(members) => !members.is_empty(),
    }
}

/// The result of `int(value or 0)`: the decimal digits `str()` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PyInt<'a>(pub Cow<'a, str>);

impl PyInt<'_> {
    /// The value if it fits an `i128` (a timestamp that does not is far
    /// outside any replay window anyway).
    pub fn as_i128(&self) -> Option<i128> {
        self.0.parse().ok()
    }
}

/// `int(value or 0)`, where `what` names the field for error messages.
pub fn py_int<'a>(value: Option<&Value<'a>>, what: &str) -> Result<PyInt<'a>, SignatureInputError> {
    let value = match value {
        Some(value) if truthy(value) => value,
        _ => return Ok(PyInt(Cow::Borrowed("0"))),
    };
    let refuse = |why: String| SignatureInputError(format!("{what}: {why}"));
    match value {
        Value::Bool(_) => Ok(PyInt(Cow::Borrowed("1"))),
        Value::Int(digits) => Ok(PyInt(Cow::Borrowed(digits))),
        Value::Float(number) if number.is_nan() => Err(refuse(
            "Python's int() cannot convert float NaN to integer".into(),
        )),
        Value::Float(number) if number.is_infinite() => Err(refuse(
            "Python's int() cannot convert float infinity to integer".into(),
        )),
        Value::Float(number) => Ok(PyInt(Cow::Owned(truncated_float_digits(*number)))),
        Value::Str(text) => {
            let text = std::str::from_utf8(text)
                .map_err(|_| refuse("string with a lone surrogate is not an integer".into()))?;
            int_from_str(text)
                .map(|digits| PyInt(Cow::Owned(digits)))
                .map_err(refuse)
        }
        Value::Array(_) | Value::Object(_) | Value::Null => Err(refuse(format!(
            "Python's int() does not accept a {} (TypeError)",
            type_name(value)
        ))),
    }
}

/// Python's `int(text)` for base 10, limited to ASCII: optional whitespace,
/// a sign, digits with single underscores between them, optional whitespace.
/// Returns the decimal digits `str(int(text))` would print.
pub fn int_from_str(text: &str) -> Result<String, String> {
    if !text.is_ascii() {
        return Err(format!(
            "cannot reproduce Python's int() of the non-ASCII string {}",
            super::canonical::json_string(text)
        ));
    }
    let invalid = || format!("invalid literal for int() with base 10: {:?}", text);
    // Python's int() skips exactly these ASCII whitespace characters.
    let trimmed = text.trim_matches(|c: char| matches!(c, ' ' | '\t'..='\r'));
    let (negative, unsigned) = match trimmed.as_bytes().first() {
        Some(b'-') => (true, &trimmed[1..]),
        Some(b'+') => (false, &trimmed[1..]),
        _ => (false, trimmed),
    };
    let well_formed = !unsigned.is_empty()
        && unsigned
            .split('_')
            .all(|group| !group.is_empty() && group.bytes().all(|b| b.is_ascii_digit()));
    if !well_formed {
        return Err(invalid());
    }
    let digits: String = unsigned.chars().filter(|c| *c != '_').collect();
    if digits.len() > MAX_INT_DIGITS {
        return Err(format!(
            "Python refuses to convert a string of {} digits to int (limit {MAX_INT_DIGITS})",
            digits.len()
        ));
    }
    let significant = digits.trim_start_matches('0');
    Ok(match (significant.is_empty(), negative) {
        (true, _) => "0".into(),
        (false, true) => format!("-{significant}"),
        (false, false) => significant.into(),
    })
}

/// The exact decimal digits of `int(number)`: truncation toward zero, exact
/// even above 2^64 (`int(1e20)` is `100000000000000000000`).
fn truncated_float_digits(number: f64) -> String {
    let truncated = number.trunc();
    if truncated.abs() < 1e18 {
        return format!("{}", truncated as i64);
    }
    // |number| >= 2^59 here, so it is an integer m * 2^e with e >= 0.
    let bits = truncated.abs().to_bits();
    let exponent = ((bits >> 52) & 0x7FF) as i32 - 1075;
    let mantissa = (bits & ((1 << 52) - 1)) | (1 << 52);
    // Little-endian base-1e9 limbs; doubling `exponent` times is plenty fast
    // for the at most 971 doublings a finite double needs.
    let mut limbs: Vec<u64> = vec![mantissa % 1_000_000_000, mantissa / 1_000_000_000];
    for _ in 0..exponent {
        let mut carry = 0;
        for limb in &mut limbs {
            let doubled = *limb * 2 + carry;
            *limb = doubled % 1_000_000_000;
            carry = doubled / 1_000_000_000;
        }
        if carry > 0 {
            limbs.push(carry);
        }
    }
    while limbs.len() > 1 && limbs.last() == Some(&0) {
        limbs.pop();
    }
    let mut digits = String::from(if number < 0.0 { "-" } else { "" });
    let mut limbs = limbs.iter().rev();
    if let Some(first) = limbs.next() {
        digits.push_str(&first.to_string());
    }
    for limb in limbs {
        digits.push_str(&format!("{limb:09}"));
    }
    digits
}

/// `str(value or "")`, where `what` names the field for error messages. The
/// result must become part of a UTF-8 signing string, so a lone surrogate is
/// an error here, as Python's `.encode("utf-8")` of that string would be.
pub fn py_str<'a>(
    value: Option<&'a Value<'a>>,
    what: &str,
) -> Result<Cow<'a, str>, SignatureInputError> {
    let value = match value {
        Some(value) if truthy(value) => value,
        _ => return Ok(Cow::Borrowed("")),
    };
    match value {
        Value::Str(text) => std::str::from_utf8(text).map(Cow::Borrowed).map_err(|_| {
            let code = lone_surrogate(text).unwrap_or(0xD800);
            SignatureInputError(format!(
                "{what} contains the lone surrogate \\u{code:04x}, which Python cannot encode as UTF-8"
            ))
        }),
        Value::Int(digits) => Ok(Cow::Borrowed(digits)),
        _ => {
            let mut repr = String::new();
            write_repr(value, &mut repr).map_err(|why| SignatureInputError(format!("{what}: {why}")))?;
            Ok(Cow::Owned(repr))
        }
    }
}

/// Python's `repr()`, for the scalars and for containers whose strings are
/// printable ASCII plus controls (Python escapes those as `\n`, `\x01`).
fn write_repr(value: &Value, out: &mut String) -> Result<(), String> {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Int(digits) => out.push_str(digits),
        Value::Float(number) => out.push_str(&float_str(*number)),
        Value::Str(text) => write_str_repr(text, out)?,
        Value::Array(items) => {
            out.push('[');
            for (position, item) in items.iter().enumerate() {
                if position > 0 {
                    out.push_str(", ");
                }
                write_repr(item, out)?;
            }
            out.push(']');
        }
        Value::Object(members) => {
            out.push('{');
            for (position, (key, item)) in members.iter().enumerate() {
                if position > 0 {
                    out.push_str(", ");
                }
                write_str_repr(key, out)?;
                out.push_str(": ");
                write_repr(item, out)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

/// Python's `repr(str)` for ASCII text: single quotes unless the text has a
/// single quote and no double quote.
fn write_str_repr(text: &[u8], out: &mut String) -> Result<(), String> {
    if !text.is_ascii() {
        return Err(
            "cannot reproduce Python's repr() of a container holding non-ASCII text".into(),
        );
    }
    let quote = if text.contains(&b'\'') && !text.contains(&b'"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for &byte in text {
        match byte {
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            _ if char::from(byte) == quote => {
                out.push('\\');
                out.push(quote);
            }
            0x20..=0x7E => out.push(char::from(byte)),
            control => out.push_str(&format!("\\x{control:02x}")),
        }
    }
    out.push(quote);
    Ok(())
}

/// Python's name for the type of a parsed value, for error messages.
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "None",
        Value::Bool(_) => "bool",
        Value::Int(_) => "int",
        Value::Float(_) => "float",
        Value::Str(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::parse;

    fn int_of(json: &str) -> Result<String, SignatureInputError> {
        let value = parse(json).unwrap();
        py_int(Some(&value), "x").map(|int| int.0.into_owned())
    }

    fn str_of(json: &str) -> Result<String, SignatureInputError> {
        let value = parse(json).unwrap();
        py_str(Some(&value), "x").map(Cow::into_owned)
    }

    #[test]
    fn int_follows_python() {
        let cases = [
            ("42", "42"),
            ("\"42\"", "42"),
            ("\" 42 \"", "42"),
            ("\"\\u000b-4_2\\f\"", "-42"),
            ("\"+0042\"", "42"),
            ("\"-000\"", "0"),
            ("true", "1"),
            ("false", "0"),
            ("null", "0"),
            ("\"\"", "0"),
            ("[]", "0"),
            ("42.9", "42"),
            ("-42.9", "-42"),
            ("1e20", "100000000000000000000"),
            ("-1.5e30", "-1499999999999999889089448902656"),
            (
                "1.7976931348623157e308",
                "179769313486231570814527423731704356798070567525844996598917476803157260780028538760589558632766878171540458953514382464234321326889464182768467546703537516986049910576551282076245490090389328944075868508455133942304583236903222948165808559332123348274797826204144723168738177180919299881250404026184124858368",
            ),
        ];
        for (json, expected) in cases {
            assert_eq!(int_of(json).unwrap(), expected, "{json}");
        }
        for bad in [
            "\"4.5\"",
            "\"4__2\"",
            "\"_4\"",
            "\" \"",
            "\"- 4\"",
            "\"\\u001c4\"",
            "[1]",
            "{\"a\":1}",
            "NaN",
            "Infinity",
            "\"٤\"",
        ] {
            assert!(int_of(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn str_follows_python() {
        let cases = [
            ("\"abc\"", "abc"),
            ("42", "42"),
            ("true", "True"),
            ("false", ""),
            ("0", ""),
            ("0.0", ""),
            ("1e16", "1e+16"),
            ("2.0", "2.0"),
            ("NaN", "nan"),
            ("-Infinity", "-inf"),
            (
                "[1, \"a'b\", null, 2.5, [], {\"k\": false}]",
                "[1, \"a'b\", None, 2.5, [], {'k': False}]",
            ),
            (
                "{\"a\\n\\u0001\\\\\": \"it's \\\"q\\\"\"}",
                "{'a\\n\\x01\\\\': 'it\\'s \"q\"'}",
            ),
        ];
        for (json, expected) in cases {
            assert_eq!(str_of(json).unwrap(), expected, "{json}");
        }
        assert!(
            str_of("[\"é\"]")
                .unwrap_err()
                .to_string()
                .contains("cannot reproduce")
        );
        assert!(
            str_of("\"\\udfff\"")
                .unwrap_err()
                .to_string()
                .contains("\\udfff")
        );
    }
}
