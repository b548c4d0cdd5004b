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
