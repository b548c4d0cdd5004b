#!/usr/bin/env python3
"""Seeded random signed updates, each with the platform reference's verdict.

Used by tests/integration/signature.rs, which feeds the same texts to
`fly verify-sig` and requires the same verdict for every one:

    python3 scripts/signature_differential.py --reference PATH --seed 7 --count 400 --secret S --now 1700000000

prints one JSON object per case: {"text": signed update JSON, "verdict": "OK" |
"SIGNATURE_MISMATCH" | "REPLAY_WINDOW_EXCEEDED" | "INVALID_INPUT", "about": what
the case exercises}. The verdict comes from running the reference script's own
main() in this process (env, stdin and stdout swapped per case), so it is the
script's behaviour, crashes included, not a re-implementation of it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import random
import sys


def load_reference(path: str):
    spec = importlib.util.spec_from_file_location("reference_verify", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_verdict(reference, text: str) -> str:
    stdin, out = sys.stdin, io.StringIO()
    sys.stdin = io.StringIO(text)
    try:
        with contextlib.redirect_stdout(out):
            reference.main()
    except SystemExit as stop:
        message = str(stop.code)
        prefix = "Verify failed: "
        return message[len(prefix):] if message.startswith(prefix) else "INVALID_INPUT"
    except Exception:  # the script crashes: JSONDecodeError, TypeError, UnicodeEncodeError...
        return "INVALID_INPUT"
    finally:
        sys.stdin = stdin
    return "OK" if out.getvalue().strip() == "Verify OK" else "INVALID_INPUT"


def reference_signature(reference, update, secret: str):
    """The signature the platform would send, with the reference's functions;
    None when the reference cannot compute one for this update."""
    import hashlib
    import hmac

    try:
        payload = update.get("message") or update.get("callback_query") or {}
        signing = reference.build_signing_string(
            update_id=int(update.get("update_id") or 0),
            update_type=str(update.get("type") or ""),
            bot_id=str((update.get("bot") or {}).get("id") or ""),
            timestamp=int(update.get("timestamp") or 0),
            nonce=str(update.get("nonce") or ""),
            payload_sha256=reference.sha256_hex(reference.canonical_json(payload)),
        )
        return hmac.new(secret.encode("utf-8"), signing.encode("utf-8"), hashlib.sha256).hexdigest()
    except Exception:
        return None


class Generator:
    def __init__(self, rng: random.Random, now: int):
        self.rng = rng
        self.now = now

    def text(self, max_len: int = 10) -> str:
        rng = self.rng
        pools = [
            lambda: chr(rng.randrange(0x20, 0x7F)),
            lambda: chr(rng.randrange(0, 0x20)),
            lambda: chr(rng.randrange(0xA0, 0x3000)),
            lambda: chr(rng.randrange(0x10000, 0x110000)),
            lambda: rng.choice(['"', "\\", "/", "\u2028", "\ufeff", "\x7f", "😀", "é"]),
        ]
        return "".join(rng.choice(pools)() for _ in range(rng.randrange(0, max_len)))

    def number(self):
        rng = self.rng
        kind = rng.randrange(7)
        if kind == 0:
            return rng.randrange(-1000, 1000)
        if kind == 1:
            return rng.getrandbits(rng.randrange(64, 300)) * rng.choice([1, -1])
        if kind == 2:
            return rng.random() * 10 ** rng.randrange(-12, 30) * rng.choice([1, -1])
        if kind == 3:
            return rng.choice([0.0, -0.0, 1e16, 1e-5, 2.5e-7, 100.0, 1e15, 5e-324, 1.7976931348623157e308])
        if kind == 4:
            return rng.choice([float("nan"), float("inf"), float("-inf")])
        if kind == 5:
            return rng.randrange(2**52, 2**58) / 4
        return round(rng.uniform(-1e6, 1e6), rng.randrange(0, 8))

    def value(self, depth: int = 0):
        rng = self.rng
        kind = rng.randrange(9 if depth < 4 else 6)
        if kind == 0:
            return rng.choice([None, True, False])
        if kind in (1, 2):
            return self.number()
        if kind in (3, 4, 5):
            return self.text()
        if kind in (6, 7):
            return {self.text(6): self.value(depth + 1) for _ in range(rng.randrange(0, 5))}
        return [self.value(depth + 1) for _ in range(rng.randrange(0, 4))]

    def payload(self):
        rng = self.rng
        message = {
            "chat": {"type": rng.choice(["private", "group"]), "id": "u_%d" % rng.randrange(1000)},
            "msgType": rng.choice(["text", "image", "file"]),
            "data": {"content": self.text(20)},
        }
        for _ in range(rng.randrange(0, 4)):
            message[self.text(6)] = self.value(1)
        if rng.random() < 0.05:
            deep = self.value()
            for _ in range(rng.randrange(10, 60)):
                deep = [deep] if rng.random() < 0.5 else {"d": deep}
            message["deep"] = deep
        return message

    def case(self, reference, secret: str):
        rng = self.rng
        about = []
        update = {"update_id": rng.randrange(1, 10**6), "type": "message", "message": self.payload()}
        if rng.random() < 0.25:
            update["type"] = "callback_query"
            update["callback_query"] = {"data": self.text(), "from": {"id": rng.randrange(10**12)}}
            update["message"] = rng.choice([None, {}, [], "", 0, 0.0, False])
            about.append("falsy message")
        update["bot"] = {"id": rng.choice(["bot_%d" % rng.randrange(100), rng.randrange(1, 10**9)])}
        update["timestamp"] = self.now + rng.randrange(-250, 250)
        update["nonce"] = "%032x" % rng.getrandbits(128)
        self.mutate_fields(update, about)
        key = secret
        if rng.random() < 0.1:
            key = secret + "-old"
            about.append("wrong secret")
        signature = reference_signature(reference, update, key)
        update["signature"] = signature if signature is not None else "%064x" % rng.getrandbits(256)
        self.tamper(update, about)
        return update, about

    def mutate_fields(self, update, about):
        rng = self.rng
        roll = rng.random()
        choices = [
            ("update_id", lambda: str(update["update_id"])),
            ("update_id", lambda: " %d " % update["update_id"]),
            ("update_id", lambda: "+%d" % update["update_id"]),
            ("update_id", lambda: "1_000"),
            ("update_id", lambda: float(update["update_id"]) + 0.7),
            ("update_id", lambda: 1e20),
            ("update_id", lambda: True),
            ("update_id", lambda: "4.5"),
            ("update_id", lambda: [1]),
            ("update_id", lambda: []),
            ("update_id", lambda: float("nan")),
            ("update_id", lambda: rng.getrandbits(200)),
            ("type", lambda: True),
            ("type", lambda: 1.5),
            ("type", lambda: ["a", {"b": None}]),
            ("type", lambda: ["é"]),
            ("type", lambda: None),
            ("nonce", lambda: rng.randrange(10**30)),
            ("nonce", lambda: self.text()),
            ("nonce", lambda: "\ud800"),
            ("bot", lambda: "bot_1"),
            ("bot", lambda: {}),
            ("bot", lambda: None),
            ("bot", lambda: {"id": 0}),
            ("bot", lambda: {"id": 1e16}),
            ("bot", lambda: {"id": False, "name": "x"}),
            ("timestamp", lambda: str(update["timestamp"])),
            ("timestamp", lambda: float(update["timestamp"]) + 0.5),
            ("timestamp", lambda: self.now - rng.randrange(301, 10**7)),
            ("timestamp", lambda: self.now + rng.randrange(301, 10**7)),
            ("timestamp", lambda: self.now - 300),
            ("timestamp", lambda: self.now + 301),
            ("timestamp", lambda: 10**40),
            ("timestamp", lambda: None),
            ("timestamp", lambda: "soon"),
            ("message", lambda: "a string payload"),
            ("message", lambda: {"text": "x\ud800y"}),
            ("other", lambda: {"\udc00": "\ud800"}),
        ]
        if roll < 0.45:
            field, make = rng.choice(choices)
            update[field] = make()
            about.append("%s=%s" % (field, type(update[field]).__name__))

    def tamper(self, update, about):
        rng = self.rng
        roll = rng.random()
        if roll < 0.04 and isinstance(update.get("message"), dict):
            update["message"] = dict(update["message"], tampered=True)
        elif roll < 0.07:
            update["nonce"] = "tampered"
        elif roll < 0.09:
            update["signature"] = update["signature"].upper()
        elif roll < 0.11:
            update["signature"] = update["signature"][:-1]
        elif roll < 0.12:
            update["signature"] = "é" + update["signature"][1:]
        elif roll < 0.13:
            update["signature"] = {"sig": update["signature"]}
        elif roll < 0.14:
            update["signature"] = None
        else:
            return
        about.append("tampered")


class Writer:
    """Writes a value as JSON text in a randomly chosen style."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def document(self, value) -> str:
        rng = self.rng
        self.ascii = rng.random() < 0.3
        self.indent = rng.choice([None, None, None, 2, "\t"])
        self.spaced = rng.random() < 0.3
        self.duplicates = rng.random() < 0.2
        self.shuffle = rng.random() < 0.5
        return self.value(value, 0)

    def string(self, text: str) -> str:
        has_surrogate = any(0xD800 <= ord(c) < 0xE000 for c in text)
        return json.dumps(text, ensure_ascii=self.ascii or has_surrogate)

    def number(self, number) -> str:
        if isinstance(number, bool) or isinstance(number, int):
            return json.dumps(number)
        if number != number or number in (float("inf"), float("-inf")):
            return json.dumps(number)
        style = self.rng.randrange(4)
        if style == 0:
            return "%.17e" % number
        if style == 1:
            return ("%.25E" % number).replace("E+", "E")
        return json.dumps(number)

    def value(self, value, depth: int) -> str:
        if isinstance(value, dict):
            items = list(value.items())
            if self.shuffle:
                self.rng.shuffle(items)
            members = []
            for key, item in items:
                if self.duplicates and self.rng.random() < 0.3:
                    members.append((key, "\"decoy\""))  # an earlier duplicate: the last one wins
                members.append((key, self.value(item, depth + 1)))
            return self.container("{", "}", [self.string(k) + (": " if self.spaced or self.indent else ":") + v for k, v in members], depth)
        if isinstance(value, list):
            return self.container("[", "]", [self.value(item, depth + 1) for item in value], depth)
        if isinstance(value, str):
            return self.string(value)
        if value is None or isinstance(value, bool):
            return json.dumps(value)
        return self.number(value)

    def container(self, open_: str, close: str, parts, depth: int) -> str:
        if not parts:
            return open_ + close
        if self.indent is None:
            return open_ + (", " if self.spaced else ",").join(parts) + close
        unit = self.indent if isinstance(self.indent, str) else " " * self.indent
        inner = "\n" + unit * (depth + 1)
        return open_ + inner + ("," + inner).join(parts) + "\n" + unit * depth + close


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--secret", default="s3cret")
    parser.add_argument("--now", type=int, default=1_700_000_000)
    args = parser.parse_args()
    reference = load_reference(args.reference)
    os.environ["FLY_WEBHOOK_SECRET"] = args.secret
    os.environ["FLY_NOW_TS"] = str(args.now)
    rng = random.Random(args.seed)
    generator, writer = Generator(rng, args.now), Writer(rng)
    extra = [
        ("top-level list", "[1, 2]"),
        ("truncated", '{"update_id": 1, "message": {"a": '),
        ("empty object", "{}"),
        ("lone surrogate outside the payload", '{"x": "\\ud800", "timestamp": %d}' % args.now),
        ("lone surrogate removed by a duplicate key", '{"message": {"a": "\\ud800", "a": 1}, "timestamp": %d}' % args.now),
        ("NaN payload", '{"message": NaN, "timestamp": %d}' % args.now),
    ]
    out = sys.stdout
    for about, text in extra:
        out.write(json.dumps({"text": text, "verdict": reference_verdict(reference, text), "about": about}) + "\n")
    for _ in range(args.count - len(extra)):
        update, about = generator.case(reference, args.secret)
        text = writer.document(update)
        if rng.random() < 0.02:
            text = text[: rng.randrange(len(text))]
            about.append("cut short")
        verdict = reference_verdict(reference, text)
        out.write(json.dumps({"text": text, "verdict": verdict, "about": ", ".join(about) or "plain"}) + "\n")


if __name__ == "__main__":
    main()
