//! The canonical JSON vectors generated from CPython by
//! `scripts/gen_canonical_vectors.py`: every one must come out byte-identical,
//! or fail where Python fails (with Python's message for malformed JSON).

use serde_json::Value as Json;

use super::canonical::canonical_json;
use super::json::parse;

#[test]
fn every_cpython_vector_matches() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/canonical_vectors.json"
    );
    let fixture = std::fs::read_to_string(path).expect("read the vector fixture");
    let vectors: Vec<Json> = serde_json::from_str(&fixture).expect("parse the vector fixture");
    assert!(
        vectors.len() > 300,
        "the fixture has only {} vectors",
        vectors.len()
    );
    let mut failures = Vec::new();
    for vector in &vectors {
        let name = vector["name"].as_str().unwrap_or("?");
        let input = vector["input"].as_str().unwrap_or_default();
        let ours = parse(input).and_then(|value| canonical_json(&value));
        let agrees = match (&ours, vector["canonical"].as_str()) {
            (Ok(bytes), Some(expected)) => bytes.as_slice() == expected.as_bytes(),
            (Err(error), None) => match vector["error"].as_str() {
                Some("JSONDecodeError") => {
                    let python = vector["message"].as_str().unwrap_or_default();
                    error.0.strip_prefix("malformed JSON: ") == Some(python)
                }
                _ => true,
            },
            _ => false,
        };
        if !agrees {
            let ours = match &ours {
                Ok(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                Err(error) => format!("error: {error}"),
            };
            let python = vector.get("canonical").unwrap_or(&vector["message"]);
            failures.push(format!("{name}:\n  python: {python}\n  fly:    {ours}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} vectors differ:\n{}",
        failures.len(),
        vectors.len(),
        failures.join("\n")
    );
}

/// The direct route (`Verifier::verify_text`, `verify-sig --lines`) writes
/// each vector as an update's payload exactly as the tree route does, hence
/// as CPython does, and gives way to the tree route where that one refuses.
#[test]
fn every_cpython_vector_matches_as_a_payload_by_the_direct_route() {
    use super::direct::{read_signed_parts, with_scratch};
    use super::v1::payload_of;

    // Valid, but the direct route leaves them to the tree route: a lone
    // surrogate is an error unless a later duplicate key replaces it.
    let gives_way = ["lone surrogate removed by a duplicate key"];
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/canonical_vectors.json"
    );
    let fixture = std::fs::read_to_string(path).expect("read the vector fixture");
    let vectors: Vec<Json> = serde_json::from_str(&fixture).expect("parse the vector fixture");
    let mut failures = Vec::new();
    for vector in &vectors {
        let name = vector["name"].as_str().unwrap_or("?");
        let input = vector["input"].as_str().unwrap_or_default();
        // A falsy payload gives way to callback_query.
        let update = format!("{{\"message\":{input},\"callback_query\":[7]}}");
        let tree = parse(&update)
            .and_then(|value| payload_of(&value))
            .map(|(_, canonical)| String::from_utf8_lossy(&canonical).into_owned());
        let direct = with_scratch(|scratch| {
            read_signed_parts(&update, scratch)
                .map(|parts| String::from_utf8_lossy(parts.canonical_payload(scratch)).into_owned())
        });
        let agrees = match (&direct, &tree) {
            (Some(direct), Ok(tree)) => direct == tree,
            (None, Err(_)) => true,
            (None, Ok(_)) => gives_way.contains(&name),
            (Some(_), Err(_)) => false,
        };
        // And the tree route is CPython's: the payload alone, when truthy.
        let cpython = vector["canonical"].as_str();
        let as_cpython = match (&direct, cpython) {
            (Some(direct), Some(cpython)) => direct == cpython || direct == "[7]",
            _ => true,
        };
        if !agrees || !as_cpython {
            failures.push(format!(
                "{name}: {input:?}: direct {direct:?}, tree {tree:?}, CPython {cpython:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
