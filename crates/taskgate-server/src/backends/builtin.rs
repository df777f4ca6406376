//! Builtin backends: stand-ins that make the whole flow work with nothing installed.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{optional_u64, Backend, BackendError, Job, Produced};
use crate::domain::fail_code;

/// Longest `input.delay_ms` honoured by `echo`.
pub const MAX_ECHO_DELAY_MS: u64 = 600_000;
/// Largest side of a `demo-image`.
pub const MAX_IMAGE_SIDE: u64 = 4096;
const DEFAULT_IMAGE_SIDE: u64 = 512;

/// `echo`'s input as a JSON Schema: what [`Echo`]'s `validate` checks, so that
/// `GET /api/v1/models` shows it and a submit names every problem at once. (`validate` still runs
/// after it; a test keeps the two in agreement.)
pub fn echo_schema() -> Value {
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "description": "Any object; its result is the input as result.json.",
        "properties": {
            "delay_ms": {
                "type": ["integer", "null"],
                "minimum": 0,
                "description": format!("Milliseconds to sleep first (capped at {MAX_ECHO_DELAY_MS}).")
            },
            "fail": {
                "type": ["string", "null"],
                "description": "Fail the task with this message."
            }
        }
    })
}

/// `demo-image`'s input as a JSON Schema, what [`DemoImage`]'s `validate` checks.
pub fn demo_image_schema() -> Value {
    let side = |name: &str| {
        serde_json::json!({
            "type": ["integer", "null"],
            "minimum": 1,
            "maximum": MAX_IMAGE_SIDE,
            "default": DEFAULT_IMAGE_SIDE,
            "description": format!("{name} in pixels.")
        })
    };
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "prompt": {
                "type": ["string", "null"],
                "default": "",
                "description": "Decides the colours and rings of the picture."
            },
            "width": side("Width"),
            "height": side("Height")
        }
    })
}

/// `echo`: its result is one JSON file holding the input. `input.delay_ms` sleeps first (capped
/// at 10 minutes); `input.fail`, a string, fails the task with that message.
pub struct Echo;

#[async_trait]
impl Backend for Echo {
    fn reports(&self) -> bool {
        false
    }

    fn validate(&self, input: &Map<String, Value>) -> Result<(), String> {
        optional_u64(input, "delay_ms")?;
        match input.get("fail") {
            None | Some(Value::Null) | Some(Value::String(_)) => Ok(()),
            Some(v) => Err(format!(
                "input.fail must be a string (the failure message), got {v}"
            )),
        }
    }

    async fn run(&self, job: &Job) -> Result<Produced, BackendError> {
        let delay = optional_u64(&job.input, "delay_ms")
            .map_err(|m| BackendError::fatal(fail_code::INVALID_INPUT, m))?
            .unwrap_or(0)
            .min(MAX_ECHO_DELAY_MS);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if let Some(Value::String(msg)) = job.input.get("fail") {
            return Err(BackendError::fatal(
                fail_code::GENERATION_FAILED,
                msg.clone(),
            ));
        }
        let body = serde_json::to_vec_pretty(&Value::Object(job.input.clone()))
            .map_err(|e| BackendError::fatal(fail_code::INTERNAL_ERROR, e.to_string()))?;
        Ok(Produced::InMemory(vec![("result.json".to_owned(), body)]))
    }

    fn needs_output_dir(&self) -> bool {
        false
    }
}

/// `demo-image`: a PNG rendered deterministically from `input.prompt`, `input.width` by
/// `input.height` (default 512): a stand-in for a text-to-image model.
pub struct DemoImage;

fn image_size(input: &Map<String, Value>) -> Result<(u32, u32), String> {
    let side = |field| -> Result<u32, String> {
        let v = optional_u64(input, field)?.unwrap_or(DEFAULT_IMAGE_SIDE);
        if v == 0 || v > MAX_IMAGE_SIDE {
            return Err(format!(
                "input.{field} must be from 1 to {MAX_IMAGE_SIDE}, got {v}"
            ));
        }
        Ok(v as u32)
    };
    Ok((side("width")?, side("height")?))
}

fn prompt_of(input: &Map<String, Value>) -> Result<&str, String> {
    match input.get("prompt") {
        None | Some(Value::Null) => Ok(""),
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(format!("input.prompt must be a string, got {v}")),
    }
}

#[async_trait]
impl Backend for DemoImage {
    fn reports(&self) -> bool {
        false
    }

    fn validate(&self, input: &Map<String, Value>) -> Result<(), String> {
        image_size(input)?;
        prompt_of(input)?;
        Ok(())
    }

    async fn run(&self, job: &Job) -> Result<Produced, BackendError> {
        let invalid = |m| BackendError::fatal(fail_code::INVALID_INPUT, m);
        let (w, h) = image_size(&job.input).map_err(invalid)?;
        let prompt = prompt_of(&job.input).map_err(invalid)?.to_owned();
        // Rendering a large image is CPU work: keep it off the async threads.
        let png = tokio::task::spawn_blocking(move || render_png(&prompt, w, h))
            .await
            .map_err(|e| BackendError::fatal(fail_code::INTERNAL_ERROR, e.to_string()))?
            .map_err(|e| BackendError::fatal(fail_code::INTERNAL_ERROR, e.to_string()))?;
        Ok(Produced::InMemory(vec![("image.png".to_owned(), png)]))
    }

    fn needs_output_dir(&self) -> bool {
        false
    }
}

/// A gradient between two colours taken from the prompt's hash, with soft rings whose centres
/// also come from the hash: the same prompt and size always give the same bytes.
pub fn render_png(prompt: &str, width: u32, height: u32) -> Result<Vec<u8>, png::EncodingError> {
    let seed = Sha256::digest(prompt.as_bytes());
    let c0 = [seed[0], seed[1], seed[2]].map(f32::from);
    let c1 = [seed[3], seed[4], seed[5]].map(f32::from);
    let rings: Vec<(f32, f32, f32)> = (0..4)
        .map(|i| {
            let b = &seed[6 + i * 3..9 + i * 3];
            (
                f32::from(b[0]) / 255.0,
                f32::from(b[1]) / 255.0,
                4.0 + f32::from(b[2]) / 16.0,
            )
        })
        .collect();
    let mut pixels = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height {
        for x in 0..width {
            let u = x as f32 / width.max(1) as f32;
            let v = y as f32 / height.max(1) as f32;
            let t = (u + v) / 2.0;
            let mut glow = 0.0f32;
            for (cx, cy, freq) in &rings {
                let d = ((u - cx).powi(2) + (v - cy).powi(2)).sqrt();
                glow += (d * freq * std::f32::consts::TAU).cos() * 0.08;
            }
            for ch in 0..3 {
                let base = c0[ch] * (1.0 - t) + c1[ch] * t;
                pixels.push((base * (1.0 + glow)).clamp(0.0, 255.0) as u8);
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&pixels)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_same_prompt_renders_the_same_png_and_another_does_not() {
        let a = render_png("a cat", 32, 16).unwrap();
        assert_eq!(a, render_png("a cat", 32, 16).unwrap());
        assert_ne!(a, render_png("a dog", 32, 16).unwrap());
        assert_eq!(&a[..8], b"\x89PNG\r\n\x1a\n");
    }

    /// The schemas say what `validate` checks: each input below is accepted by both or refused
    /// by both. (`validate` alone refuses integers written as `5.0`.)
    #[test]
    fn the_builtin_schemas_agree_with_validate() {
        use crate::config::InputSchema;
        let cases: [(&dyn Backend, Value, &[Value]); 2] = [
            (
                &Echo,
                echo_schema(),
                &[
                    serde_json::json!({}),
                    serde_json::json!({"delay_ms": 5, "fail": "x", "other": [1]}),
                    serde_json::json!({"delay_ms": null, "fail": null}),
                    serde_json::json!({"delay_ms": -1}),
                    serde_json::json!({"delay_ms": "soon"}),
                    serde_json::json!({"fail": true}),
                ],
            ),
            (
                &DemoImage,
                demo_image_schema(),
                &[
                    serde_json::json!({}),
                    serde_json::json!({"prompt": "a fox", "width": 1, "height": 4096}),
                    serde_json::json!({"prompt": null, "width": null}),
                    serde_json::json!({"width": 0}),
                    serde_json::json!({"height": 4097}),
                    serde_json::json!({"width": "wide"}),
                    serde_json::json!({"prompt": 7}),
                ],
            ),
        ];
        for (backend, schema, inputs) in cases {
            let schema = InputSchema::compile(schema).unwrap();
            for input in inputs {
                let by_schema = schema.check(input).is_ok();
                let by_validate = backend.validate(input.as_object().unwrap()).is_ok();
                assert_eq!(by_schema, by_validate, "{input}");
            }
        }
    }

    #[test]
    fn image_sizes_outside_the_range_are_refused_with_the_field_named() {
        let input: Map<String, Value> = serde_json::from_str(r#"{"width": 0}"#).unwrap();
        assert!(DemoImage
            .validate(&input)
            .unwrap_err()
            .contains("input.width"));
        let input: Map<String, Value> = serde_json::from_str(r#"{"height": "big"}"#).unwrap();
        assert!(DemoImage
            .validate(&input)
            .unwrap_err()
            .contains("input.height"));
    }
}
