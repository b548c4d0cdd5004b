//! Property tests: canonical JSON does not depend on how a document is
//! written (whitespace, key order, escapes, number spellings), is idempotent,
//! and no input whatsoever makes the parser, the encoder or the verifier panic.

use proptest::prelude::*;

use super::canonical::{canonical_json, float_json};
use super::direct::{read_signed_parts, with_scratch};
use super::json::parse;
use super::v1::{Verifier, payload_of};

/// A JSON value to write out in many spellings. Keys are unique so that key
/// order is free to shuffle.
#[derive(Debug, Clone)]
enum Model {
    Null,
    Bool(bool),
    Int(String),
    Float(f64),
    Str(String),
    Array(Vec<Model>),
    Object(Vec<(String, Model)>),
}

fn model() -> impl Strategy<Value = Model> {
    let leaf = prop_oneof![
        Just(Model::Null),
        any::<bool>().prop_map(Model::Bool),
        any::<i64>().prop_map(|n| Model::Int(n.to_string())),
        "-?[1-9][0-9]{18,60}".prop_map(Model::Int),
        any::<f64>().prop_map(Model::Float),
        (-1e20f64..1e20).prop_map(Model::Float),
        any::<String>().prop_map(Model::Str),
        "[a-z\\u{0}-\\u{1f}\"\\\\/é😀\\u{ffff}]{0,8}".prop_map(Model::Str),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Model::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|members| Model::Object(members.into_iter().collect())),
        ]
    })
}

/// Writes `model` as JSON, every stylistic choice drawn from `rng`.
struct Writer {
    rng: u64,
    out: String,
}

impl Writer {
    fn write(model: &Model, seed: u64) -> String {
        let mut writer = Writer {
            rng: seed | 1,
            out: String::new(),
        };
        writer.space();
        writer.value(model);
        writer.space();
        writer.out
    }

    fn next(&mut self, below: u64) -> u64 {
        // xorshift64: reproducible from the seed proptest shrinks.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % below
    }

    fn space(&mut self) {
        for _ in 0..self.next(3) {
            let space = [" ", "\t", "\n", "\r"][self.next(4) as usize];
            self.out.push_str(space);
        }
    }

    fn value(&mut self, model: &Model) {
        match model {
            Model::Null => self.out.push_str("null"),
            Model::Bool(flag) => self.out.push_str(if *flag { "true" } else { "false" }),
            Model::Int(digits) => self.out.push_str(digits),
            Model::Float(number) if !number.is_finite() => self.out.push_str(&float_json(*number)),
            Model::Float(number) => {
                let spelled = match self.next(4) {
                    0 => float_json(*number),
                    1 => format!("{number:e}"),
                    2 => format!("{number:.25e}"),
                    _ => format!("{number:E}")
                        .replace("E", "E+")
                        .replace("E+-", "E-"),
                };
                // `{:e}` of an integral value has no dot and would read as an int.
                if spelled.contains(['.', 'e', 'E']) {
                    self.out.push_str(&spelled);
                } else {
                    self.out.push_str(&format!("{spelled}.0"));
                }
            }
            Model::Str(text) => self.string(text),
            Model::Array(items) => {
                self.out.push('[');
                for (position, item) in items.iter().enumerate() {
                    self.separator(position);
                    self.value(item);
                    self.space();
                }
                self.out.push(']');
            }
            Model::Object(members) => {
                let mut order: Vec<usize> = (0..members.len()).collect();
                for index in (1..order.len()).rev() {
                    order.swap(index, self.next(index as u64 + 1) as usize);
                }
                self.out.push('{');
                for (position, &index) in order.iter().enumerate() {
                    self.separator(position);
                    self.string(&members[index].0);
                    self.space();
                    self.out.push(':');
                    self.space();
                    self.value(&members[index].1);
                    self.space();
                }
                self.out.push('}');
            }
        }
    }

    fn separator(&mut self, position: usize) {
        if position > 0 {
            self.out.push(',');
        }
        self.space();
    }

    fn string(&mut self, text: &str) {
        self.out.push('"');
        for character in text.chars() {
            let must_escape = character < ' ' || character == '"' || character == '\\';
            if !must_escape && self.next(4) != 0 {
                self.out.push(character);
                continue;
            }
            let short = match character {
                '"' => Some("\\\""),
                '\\' => Some("\\\\"),
                '\n' => Some("\\n"),
                '\t' => Some("\\t"),
                '/' => Some("\\/"),
                _ => None,
            };
            match short {
                Some(escape) if self.next(2) == 0 => self.out.push_str(escape),
                _ => {
                    let mut units = [0u16; 2];
                    for unit in character.encode_utf16(&mut units) {
                        let escape = if self.next(2) == 0 {
                            format!("\\u{unit:04x}")
                        } else {
                            format!("\\u{unit:04X}")
                        };
                        self.out.push_str(&escape);
                    }
                }
            }
        }
        self.out.push('"');
    }
}

fn canonical(text: &str) -> Vec<u8> {
    let value = parse(text).unwrap_or_else(|error| panic!("{error}: {text}"));
    canonical_json(&value).unwrap_or_else(|error| panic!("{error}: {text}"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn canonical_form_ignores_formatting(model in model(), first in any::<u64>(), second in any::<u64>()) {
        let a = canonical(&Writer::write(&model, first));
        let b = canonical(&Writer::write(&model, second));
        prop_assert_eq!(String::from_utf8_lossy(&a), String::from_utf8_lossy(&b));
    }

    #[test]
    fn canonical_form_is_idempotent(model in model(), seed in any::<u64>()) {
        let once = canonical(&Writer::write(&model, seed));
        let twice = canonical(std::str::from_utf8(&once).unwrap());
        prop_assert_eq!(once, twice);
    }

    #[test]
    fn direct_route_writes_the_canonical_payload_of_the_tree_route(model in model(), seed in any::<u64>(), other in model(), order in 0..3usize) {
        let payload = Writer::write(&model, seed);
        let other = Writer::write(&other, seed.rotate_left(7));
        // The payload among the signed members, in a few orders, a repeated
        // key's last value winning and `callback_query` standing in when
        // `message` is falsy.
        let text = match order {
            0 => format!(r#"{{"update_id":1,"message":{payload},"bot":{{"id":"b"}},"timestamp":5,"nonce":"n","signature":"x"}}"#),
            1 => format!(r#"{{"signature":"x","message":{other},"other":{other},"callback_query":{payload},"message":{payload},"type":{other}}}"#),
            _ => format!(r#" {{ "message" : 0 , "callback_query" : {payload} , "timestamp" : {other} }} "#),
        };
        let tree = parse(&text).unwrap();
        let tree = payload_of(&tree).map(|(_, canonical)| canonical);
        let direct = with_scratch(|scratch| {
            read_signed_parts(&text, scratch).map(|parts| parts.canonical_payload(scratch).to_vec())
        });
        // The direct route answers whenever the payload can be written,
        // and then with the same bytes.
        prop_assert_eq!(tree.ok(), direct);
    }

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        exercise(&text);
    }

    #[test]
    fn json_like_text_never_panics(text in r#"[\[\]{}:,"\\u0-9a-fA-FeE.+\- \t\nNIa-z_\u{e9}\u{1F600}]{0,64}"#) {
        exercise(&text);
    }

    #[test]
    fn damaged_documents_never_panic(model in model(), seed in any::<u64>(), cut in any::<prop::sample::Index>(), insert in "[\\[\\]{}:,\"\\\\u0-9eE.+\\-]") {
        let text = Writer::write(&model, seed);
        let at = cut.index(text.len() + 1);
        let at = (0..=at).rev().find(|&at| text.is_char_boundary(at)).unwrap_or(0);
        exercise(&format!("{}{insert}{}", &text[..at], &text[at..]));
        exercise(&text[..at]);
    }
}

fn exercise(text: &str) {
    if let Ok(value) = parse(text) {
        let _ = canonical_json(&value);
    }
    routes_agree(text);
    let wrapped = format!(
        r#"{{"message":{text},"update_id":{text},"bot":{{"id":{text}}},"signature":{text}}}"#
    );
    routes_agree(&wrapped);
    let _ = super::sign_update_text(&wrapped, "secret", "bot", 0, "nonce");
}

/// When the direct route gives a verdict, the tree route gives the same one.
fn routes_agree(text: &str) {
    let verifier = Verifier::new(["secret"], 0, Some(300));
    let tree = parse(text).and_then(|update| verifier.check(&update)?.verdict());
    let direct = with_scratch(|scratch| verifier.verify_direct(text, scratch));
    if let Some(direct) = direct {
        assert_eq!(tree.ok(), Some(direct), "{text}");
    }
    let _ = verifier.verify_text(text);
}
