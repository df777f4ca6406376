//! A model's `input_schema`: the JSON Schema every submitted `input` must match.
//!
//! The file gives it as a TOML table (the schema written in TOML) or as the path of a JSON file
//! ([`SchemaSource`]). [`InputSchema::load`] reads and compiles it once, when the server starts;
//! submits then only run [`InputSchema::check`], which names every violation by its JSON pointer.
//!
//! Schemas are self-contained: a `$ref` may point only inside the schema itself (`#/$defs/…`)
//! or at the drafts' own meta-schemas, which the validator carries. Anything else (`https://…`,
//! `other.json`) is refused at load by [`RefuseRemote`], so a start never waits on the network and
//! a schema means the same on every node. The crate is built without its fetching features too.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Violations named in one refusal; past them the message says "and more" (they are not
/// walked: counting them all could take seconds on a large input).
pub const MAX_VIOLATIONS: usize = 20;
/// Longest text of one violation: the validator quotes the offending value, which may be a whole
/// 10 MB prompt.
const MAX_VIOLATION_CHARS: usize = 300;

/// Where a model's schema comes from, as the config file gives it.
#[derive(Debug, Clone, PartialEq)]
pub enum SchemaSource {
    /// The schema itself, written as a TOML table (or built in code).
    Inline(Map<String, Value>),
    /// A JSON file. `FileConfig::load` makes a relative path relative to the config file's
    /// directory; otherwise it is relative to the working directory.
    File(PathBuf),
}

impl<'de> Deserialize<'de> for SchemaSource {
    // By hand rather than `untagged`, whose error ("did not match any variant") names neither
    // form.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SourceVisitor;
        impl<'de> Visitor<'de> for SourceVisitor {
            type Value = SchemaSource;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table (the JSON Schema written in TOML) or a string (the path of a JSON Schema file)")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<SchemaSource, E> {
                if v.trim().is_empty() {
                    return Err(E::custom("input_schema is an empty path"));
                }
                Ok(SchemaSource::File(PathBuf::from(v)))
            }

            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<SchemaSource, A::Error> {
                Map::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(SchemaSource::Inline)
            }
        }
        d.deserialize_any(SourceVisitor)
    }
}

impl SchemaSource {
    /// A relative file path made relative to `dir` (the config file's directory).
    pub fn anchored_at(self, dir: &Path) -> Self {
        match self {
            SchemaSource::File(p) if p.is_relative() => SchemaSource::File(dir.join(p)),
            other => other,
        }
    }
}

/// Why a schema cannot be used. The messages are written to follow
/// `invalid setting models.NAME.input_schema: `.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("cannot read schema file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("schema file {path} is not JSON: {error}")]
    NotJson {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("a JSON Schema is an object (or true or false), not {0}")]
    NotASchema(&'static str),
    #[error("TOML dates have no JSON form; quote the date at {0} as a string")]
    TomlDate(String),
    #[error("not a valid JSON Schema: {0}")]
    Invalid(String),
}

/// A compiled schema and the document it came from (which `GET /api/v1/models` shows).
pub struct InputSchema {
    document: Value,
    validator: jsonschema::Validator,
}

impl fmt::Debug for InputSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InputSchema")
            .field("document", &self.document)
            .finish_non_exhaustive()
    }
}

/// Refuses every `$ref` that leaves the schema: the validator asks for a resource only when it
/// is neither inside the document nor one of the bundled meta-schemas.
struct RefuseRemote;

impl jsonschema::Retrieve for RefuseRemote {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        Err(format!(
            "taskgate does not fetch {uri}: a $ref must point inside the schema itself, e.g. \"#/$defs/size\" (copy the referenced schema under $defs)"
        )
        .into())
    }
}

impl InputSchema {
    /// Reads (for a file) and compiles a schema. Runs once per start; reading a file here is
    /// start-up work, like reading the config file.
    pub fn load(source: &SchemaSource) -> Result<Self, SchemaError> {
        let document = match source {
            SchemaSource::Inline(map) => Value::Object(map.clone()),
            SchemaSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| SchemaError::Read {
                    path: path.clone(),
                    error,
                })?;
                serde_json::from_str(&text).map_err(|error| SchemaError::NotJson {
                    path: path.clone(),
                    error,
                })?
            }
        };
        Self::compile(document)
    }

    /// Compiles a schema document (draft from its `$schema`, 2020-12 without one).
    pub fn compile(document: Value) -> Result<Self, SchemaError> {
        match &document {
            Value::Object(_) | Value::Bool(_) => {}
            Value::Null => return Err(SchemaError::NotASchema("null")),
            Value::Number(_) => return Err(SchemaError::NotASchema("a number")),
            Value::String(_) => return Err(SchemaError::NotASchema("a string")),
            Value::Array(_) => return Err(SchemaError::NotASchema("an array")),
        }
        if let Some(at) = toml_date(&document, String::new()) {
            return Err(SchemaError::TomlDate(at));
        }
        let validator = jsonschema::options()
            .with_retriever(RefuseRemote)
            .build(&document)
            .map_err(|e| {
                // A meta-schema violation says where in the schema it is; a bad $ref has no place.
                SchemaError::Invalid(match e.instance_path().as_str() {
                    "" => e.to_string(),
                    at => format!("at {at}: {e}"),
                })
            })?;
        Ok(InputSchema {
            document,
            validator,
        })
    }

    /// The schema as written (JSON), for clients.
    pub fn document(&self) -> &Value {
        &self.document
    }

    /// Every way `input` breaks the schema, up to [`MAX_VIOLATIONS`] of them.
    pub fn check(&self, input: &Value) -> Result<(), Violations> {
        // The common case, valid input, without collecting errors.
        if self.validator.is_valid(input) {
            return Ok(());
        }
        // Only the violations shown are walked (one more says there are more): counting them
        // all took 600 ms on a large array, on an async thread.
        let mut shown: Vec<String> = self
            .validator
            .iter_errors(input)
            .take(MAX_VIOLATIONS + 1)
            .map(|e| describe(&e))
            .collect();
        let more = shown.len() > MAX_VIOLATIONS;
        shown.truncate(MAX_VIOLATIONS);
        Err(Violations { shown, more })
    }
}

/// One violation as `POINTER: what is wrong`. A missing property is named by the pointer it
/// would have, so that every violation points at a field.
fn describe(error: &jsonschema::ValidationError<'_>) -> String {
    let mut pointer = error.instance_path().as_str().to_owned();
    if let jsonschema::error::ValidationErrorKind::Required {
        property: Value::String(name),
    } = error.kind()
    {
        // RFC 6901 escaping, so the pointer can be followed.
        pointer.push('/');
        pointer.push_str(&name.replace('~', "~0").replace('/', "~1"));
    }
    if pointer.is_empty() {
        pointer.push_str("(root)");
    }
    let mut text = format!("{pointer}: {error}");
    if let Some((cut, _)) = text.char_indices().nth(MAX_VIOLATION_CHARS) {
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// How an input breaks a schema: the first [`MAX_VIOLATIONS`] violations and how many there
/// were in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violations {
    pub shown: Vec<String>,
    /// Whether there are violations past those shown.
    pub more: bool,
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown.join("; "))?;
        if self.more {
            write!(f, "; and more (the first {MAX_VIOLATIONS} are shown)")?;
        }
        Ok(())
    }
}

/// Where a TOML date sits in a schema written in TOML: the `toml` crate hands dates to serde as
/// a one-key table, which would otherwise pass as a strange object.
fn toml_date(v: &Value, at: String) -> Option<String> {
    match v {
        Value::Object(map) => {
            if map.contains_key("$__toml_private_datetime") {
                return Some(if at.is_empty() { "/".into() } else { at });
            }
            map.iter()
                .find_map(|(k, v)| toml_date(v, format!("{at}/{k}")))
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| toml_date(v, format!("{at}/{i}"))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn sdxl() -> InputSchema {
        InputSchema::compile(json!({
            "type": "object",
            "required": ["prompt"],
            "properties": {
                "prompt": {"type": "string"},
                "width": {"type": "integer", "maximum": 4096}
            }
        }))
        .unwrap()
    }

    #[test]
    fn every_violation_is_named_by_its_pointer() {
        let v = sdxl().check(&json!({"width": 5000})).unwrap_err();
        assert_eq!((v.shown.len(), v.more), (2, false));
        let text = v.to_string();
        assert!(
            text.contains("/width: 5000 is greater than the maximum of 4096"),
            "{text}"
        );
        assert!(
            text.contains("/prompt: \"prompt\" is a required property"),
            "{text}"
        );
        sdxl().check(&json!({"prompt": "a fox"})).unwrap();
    }

    #[test]
    fn violations_past_the_cap_are_counted_not_listed() {
        let props: Map<String, Value> = (0..25)
            .map(|i| (format!("p{i}"), json!({"type": "string"})))
            .collect();
        let schema = InputSchema::compile(json!({"properties": props})).unwrap();
        let input: Map<String, Value> = (0..25).map(|i| (format!("p{i}"), json!(i))).collect();
        let v = schema.check(&Value::Object(input)).unwrap_err();
        assert_eq!((v.shown.len(), v.more), (MAX_VIOLATIONS, true));
        assert!(
            v.to_string()
                .ends_with("; and more (the first 20 are shown)"),
            "{v}"
        );
    }

    #[test]
    fn a_huge_offending_value_is_cut_short_in_the_message() {
        let schema = InputSchema::compile(json!({"properties": {"p": {"maxLength": 3}}})).unwrap();
        let v = schema
            .check(&json!({"p": "x".repeat(100_000)}))
            .unwrap_err();
        assert!(
            v.to_string().chars().count() <= MAX_VIOLATION_CHARS + 1,
            "{v}"
        );
    }

    #[test]
    fn remote_and_relative_refs_are_refused_at_compile() {
        let err = InputSchema::compile(json!({"$ref": "https://example.com/s.json"}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("https://example.com/s.json") && err.contains("must point inside"),
            "{err}"
        );
        // Without a base URI a relative reference cannot even be named as a resource.
        let err = InputSchema::compile(json!({"properties": {"x": {"$ref": "other.json"}}}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("other.json"), "{err}");
        InputSchema::compile(json!({
            "$defs": {"side": {"type": "integer"}},
            "properties": {"w": {"$ref": "#/$defs/side"}}
        }))
        .unwrap();
        InputSchema::compile(json!({"$schema": "http://json-schema.org/draft-07/schema#"}))
            .unwrap();
    }

    #[test]
    fn an_invalid_schema_is_refused_with_the_problem_named() {
        let err = InputSchema::compile(json!({"properties": {"w": {"type": 12}}}))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("not a valid JSON Schema: at /properties/w/type: 12 "),
            "{err}"
        );
        let err = InputSchema::compile(json!("x")).unwrap_err().to_string();
        assert!(err.contains("not a string"), "{err}");
    }

    #[test]
    fn a_toml_date_in_a_schema_is_refused_with_its_place() {
        let file = crate::config::FileConfig::parse(
            "[models.m]\nbackend = \"worker\"\n[models.m.input_schema]\nproperties.d.const = 1979-05-27\n",
        )
        .unwrap();
        let source = file.models.unwrap()["m"].input_schema.clone().unwrap();
        let err = InputSchema::load(&source).unwrap_err().to_string();
        assert!(err.contains("/properties/d/const"), "{err}");
    }
}
