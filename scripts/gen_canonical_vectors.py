#!/usr/bin/env python3
"""Regenerates crates/fly-signature/tests/fixtures/canonical_vectors.json from CPython itself.

Each vector is a JSON document (the input text) and what the platform's
canonical_json makes of it:

    json.dumps(json.loads(text), ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")

either {"canonical": <the UTF-8 output as a string>} or {"error": <Python's
exception class>, "message": <its message>}. The Rust test
(crates/fly-signature/src/vectors.rs) requires `fly`'s parser and encoder to agree on
every one. Deterministic: the same Python version writes the same file.

    python3 scripts/gen_canonical_vectors.py            # writes the fixture
    python3 scripts/gen_canonical_vectors.py --check    # exits 1 if it is stale
"""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "crates", "fly-signature", "tests", "fixtures", "canonical_vectors.json")
REFERENCE = os.path.join(ROOT, "..", "shared", "reference", "verify_webhook_signature_v1.py")
# fly's limit (crates/fly-signature/src/json.rs MAX_DEPTH): the depth at which the
# reference script's json.loads still succeeds.
MAX_DEPTH = 994


def canonical(text: str) -> dict:
    try:
        out = json.dumps(json.loads(text), ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode("utf-8")
    except (ValueError, RecursionError, UnicodeEncodeError) as error:
        return {"error": type(error).__name__, "message": str(error)}
    return {"canonical": out.decode("utf-8")}


HAND_WRITTEN = [
    # floats: Python repr, exponent form below 1e-4 and from 1e16
    ("float 1e-05 spellings", '[0.00001, 1e-5, 1E-5, 10e-6, 0.1e-4]'),
    ("float repr boundaries", '[0.0001, 0.00009999, 1e15, 9999999999999998.0, 1e16, 12345678901234567890.0]'),
    ("float 2.5e-07 and friends", '[2.5e-7, 1e-7, 1.5e-9, 3e-10, 1e-100]'),
    ("float integral values", '[100.0, 1e2, 1E+2, 100e0, 1.0, -1.0, 0.0, -0.0, 0e0, -0e-0]'),
    ("float exponent two-digit minimum", '[1e+16, 1e100, 1e-5, 1.5e300, 2e-300]'),
    ("float extremes", '[5e-324, 4.9e-324, 2.4e-324, 2.5e-324, 2.2250738585072014e-308, 1.7976931348623157e308]'),
    ("float overflow to Infinity", '[1.7976931348623159e308, 1e400, -1e400, 1e99999999999999999999]'),
    ("float underflow to zero", '[1e-400, -1e-400, 1e-99999999999999999999]'),
    ("float long mantissas round correctly", '[0.1000000000000000055511151231257827021181583404541015625, 9007199254740993.0, 9007199254740992.9999999999999999999, 0.30000000000000004, 2.2250738585072011e-308]'),
    ("float halfway cases", '[9007199254740993e0, 1.00000000000000011102230246251565404236316680908203125, 1.00000000000000011102230246251565404236316680908203124, 1.00000000000000011102230246251565404236316680908203126]'),
    ("float 17 digits", '[0.1, 0.2, 0.30000000000000004, 1.2345678901234567, 123456789012345680.0, 4.35]'),
    ("NaN and Infinity literals", '{"a": NaN, "b": Infinity, "c": -Infinity, "d": [NaN]}'),
    # integers
    ("big integers stay exact", '[18446744073709551617, -18446744073709551617, 9007199254740993, 170141183460469231731687303715884105728]'),
    ("minus zero integer", '[-0, 0, -0.0]'),
    ("integer of 4300 digits", "[" + "9" * 4300 + "]"),
    ("negative integer of 4300 digits", "-" + "9" * 4300),
    ("integer of 4301 digits", "[" + "9" * 4301 + "]"),
    ("float of 4400 digits has no limit", "1" + "0" * 4400 + ".5"),
    # strings
    ("control characters escaped as Python does", '"' + "".join("\\u%04x" % c for c in range(0x20)) + '\\u007f"'),
    ("short escapes", '"\\" \\\\ \\/ \\b \\f \\n \\r \\t"'),
    ("non-ASCII stays raw", '"h\\u00e9llo \u00e9 \u4e2d \u2028 \u2029 \ufeff \\ufffe"'),
    ("uppercase hex escapes", '"\\u00E9\\u00e9\\uABCD"'),
    ("astral characters raw and as pairs", '["\U0001F600", "\\ud83d\\ude00", "\\uD83D\\uDE00", "\U0010FFFF", "\\udbff\\udfff"]'),
    ("lone high surrogate", '"\\ud800"'),
    ("lone low surrogate", '"\\udc00"'),
    ("reversed pair is two lone surrogates", '"\\udc00\\ud800"'),
    ("high then pair", '"\\ud800\\ud83d\\ude00"'),
    ("lone surrogate in a key", '{"\\ud800": 1}'),
    ("lone surrogate removed by a duplicate key", '{"a": "\\ud800", "a": "ok"}'),
    ("lone surrogate kept by a duplicate key", '{"a": "ok", "a": "\\udfff"}'),
    ("raw DEL is not escaped", '"\x7f"'),
    ("raw control character is an error", '"a\tb"'),
    ("raw newline is an error", '"a\nb"'),
    ("invalid escape", '"\\x41"'),
    ("short unicode escape", '"\\u12"'),
    ("bad hex in unicode escape", '"\\u12G4"'),
    ("bad hex in second half of a pair", '"\\ud800\\u12G4"'),
    ("unterminated string", '["abc'),
    # keys
    ("keys sort by code point, not UTF-16", '{"\uffff": 1, "\U0001F600": 2, "\ue000": 3, "z": 4, "\u00e9": 5}'),
    ("keys sort case-sensitively", '{"b": 1, "B": 2, "a": 3, "A": 4, "": 5, "_": 6, "aa": 7}'),
    ("duplicate keys: last wins", '{"a": 1, "b": 2, "a": 3}'),
    ("duplicate keys in a large object", "{" + ", ".join('"k%d": %d' % (i % 25, i) for i in range(60)) + "}"),
    ("escaped and raw spellings of one key", '{"\\u00e9": 1, "\u00e9": 2, "\\u0061": 3, "a": 4}'),
    ("nested duplicate keys", '{"x": {"y": 1, "y": {"z": 2, "z": 3}}}'),
    # whitespace and structure
    ("JSON whitespace everywhere", ' \t\n\r{ \t\n\r"a" \t\n\r: \t\n\r[ \t\n\r1 \t\n\r, \t\n\r2 \t\n\r] \t\n\r} \t\n\r'),
    ("empty containers", '[{}, [], {"a": {}}, [[]], ""]'),
    ("scalars at the top", 'null'),
    ("true at the top", ' true '),
    ("string at the top", '"x"'),
    ("number at the top", '-12.5e3'),
    ("non-breaking space is not whitespace", '\u00a0[1]'),
    ("form feed is not whitespace", '\x0c[1]'),
    ("byte order mark", '\ufeff{}'),
    ("empty document", ''),
    ("only whitespace", ' \n '),
    ("trailing comma in object", '{"a": 1,}'),
    ("trailing comma in array", '[1,]'),
    ("single quotes", "{'a': 1}"),
    ("unquoted key", '{a: 1}'),
    ("missing colon", '{"a" 1}'),
    ("missing comma", '[1 2]'),
    ("extra data", '{} {}'),
    ("leading zero", '01'),
    ("leading zero in array", '[01]'),
    ("trailing dot", '1.'),
    ("leading dot", '.5'),
    ("plus sign", '+1'),
    ("lone minus", '-'),
    ("exponent without digits", '1e'),
    ("exponent sign without digits", '[1e+]'),
    ("double minus", '--1'),
    ("lowercase nan", 'nan'),
    ("minus NaN", '-NaN'),
    ("NaN followed by a digit", 'NaN1'),
    ("truncated literal", 'tru'),
    ("capitalised literal", 'True'),
    ("unclosed array", '[1, 2'),
    ("unclosed object", '{"a": 1'),
    ("close without open", ']'),
    ("comment", '[1] // no'),
    # nesting: the reference script's json.loads stops here
    ("nesting at the limit (arrays)", "[" * MAX_DEPTH + "]" * MAX_DEPTH),
    ("nesting beyond the limit (arrays)", "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)),
    ("nesting at the limit (objects)", '{"a":' * MAX_DEPTH + "1" + "}" * MAX_DEPTH),
    ("nesting beyond the limit (objects)", '{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1)),
    ("typical update payload", '{"chat": {"type": "group", "id": "g_1"}, "msgType": "text", "data": {"content": "hi \U0001F600", "ts": 1.7e9}}'),
]


def random_text(rng: random.Random) -> str:
    pools = [
        lambda: chr(rng.randrange(0x20, 0x7F)),
        lambda: chr(rng.randrange(0, 0x20)),
        lambda: chr(rng.randrange(0xA0, 0x800)),
        lambda: chr(rng.choice([rng.randrange(0x800, 0xD800), rng.randrange(0xE000, 0x10000)])),
        lambda: chr(rng.randrange(0x10000, 0x110000)),
        lambda: rng.choice(['"', "\\", "/", "\u2028", "\ufeff", "\x7f"]),
    ]
    return "".join(rng.choice(pools)() for _ in range(rng.randrange(0, 12)))


def random_float(rng: random.Random) -> float:
    kind = rng.randrange(5)
    if kind == 4:  # few fraction bits near 2**50..2**56: halfway cases for the shortest repr
        return rng.randrange(2**52, 2**58) / rng.choice([2, 4, 8]) * rng.choice([1, -1])
    if kind == 0:  # any finite bit pattern
        while True:
            value = struct.unpack("<d", struct.pack("<Q", rng.getrandbits(64)))[0]
            if value == value and abs(value) != float("inf"):
                return value
    if kind == 1:  # around the repr switch points
        return rng.choice([1, -1]) * rng.random() * 10 ** rng.randrange(-8, 20)
    if kind == 2:  # short decimals
        return round(rng.uniform(-1000, 1000), rng.randrange(0, 6))
    return float(rng.randrange(-(10**17), 10**17))


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(10 if depth < 4 else 7)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 1, 2**53 + 1, 2**64 + 1, -(2**70)]) + rng.randrange(-3, 3)
    if kind == 2:
        return rng.getrandbits(rng.randrange(1, 400)) * rng.choice([1, -1])
    if kind in (3, 4):
        return random_float(rng)
    if kind in (5, 6):
        return random_text(rng)
    if kind in (7, 8):
        return {random_text(rng): random_value(rng, depth + 1) for _ in range(rng.randrange(0, 6))}
    return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]


def random_number_lexeme(rng: random.Random) -> str:
    """Decimal spellings Python's float() must round: long, short, far exponents."""
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randrange(1, 40)))
    fraction = "".join(rng.choice("0123456789") for _ in range(rng.randrange(1, 30)))
    exponent = rng.choice(["", "e%d" % rng.randrange(-340, 330), "E+%d" % rng.randrange(0, 30), "e-%d" % rng.randrange(0, 30)])
    integer = digits.lstrip("0") or "0"
    return rng.choice(["", "-"]) + integer + "." + fraction + exponent


def main() -> None:
    # The reference script calls json.loads from main(); here canonical() adds
    # one frame, so one more level of recursion keeps json's depth limit the
    # script's (check_depth_limit_against_the_reference confirms the number).
    sys.setrecursionlimit(sys.getrecursionlimit() + 1)
    rng = random.Random(20240603)
    vectors = [{"name": name, "input": text} for name, text in HAND_WRITTEN]
    for index in range(300):
        value = random_value(rng)
        style = rng.randrange(4)
        if style == 0:
            text = json.dumps(value, ensure_ascii=True)
        elif style == 1:
            text = json.dumps(value, ensure_ascii=False, indent=rng.choice([None, 1, 2, "\t"]))
        elif style == 2:
            text = json.dumps(value, ensure_ascii=rng.random() < 0.5, separators=(",", ":"))
        else:
            text = json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True)
        vectors.append({"name": "random document %d" % index, "input": text})
    for index in range(50):
        floats = [random_float(rng) for _ in range(100)]
        vectors.append({"name": "random float reprs %d" % index, "input": json.dumps(floats)})
    for index in range(10):
        lexemes = [random_number_lexeme(rng) for _ in range(50)]
        vectors.append({"name": "random float lexemes %d" % index, "input": "[" + ", ".join(lexemes) + "]"})
    for vector in vectors:
        vector.update(canonical(vector["input"]))
    check_depth_limit_against_the_reference()
    rendered = json.dumps(vectors, ensure_ascii=True, indent=1) + "\n"
    if "--check" in sys.argv:
        with open(FIXTURE, encoding="utf-8") as existing:
            sys.exit(0 if existing.read() == rendered else 1)
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    with open(FIXTURE, "w", encoding="utf-8") as out:
        out.write(rendered)
    print("wrote %d vectors to %s" % (len(vectors), os.path.relpath(FIXTURE, ROOT)))


def check_depth_limit_against_the_reference() -> None:
    """MAX_DEPTH must be where the reference script itself stops."""
    if not os.path.exists(REFERENCE):
        print("note: %s not found, depth limit not re-measured" % REFERENCE, file=sys.stderr)
        return
    for depth, expect_recursion_error in ((MAX_DEPTH, False), (MAX_DEPTH + 1, True)):
        document = '{"x":' + "[" * (depth - 1) + "]" * (depth - 1) + "}"
        run = subprocess.run(
            [sys.executable, REFERENCE],
            input=document,
            capture_output=True,
            text=True,
            env={"FLY_WEBHOOK_SECRET": "s", "FLY_NOW_TS": "0", "PATH": os.environ.get("PATH", "")},
        )
        if ("RecursionError" in run.stderr) != expect_recursion_error:
            sys.exit("the reference script's nesting limit is no longer %d: update MAX_DEPTH here and in crates/fly-signature/src/json.rs" % MAX_DEPTH)


if __name__ == "__main__":
    main()
