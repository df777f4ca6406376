//! Target 2: a config file's text, parsed, layered over the defaults and validated as `serve`
//! does before it starts.
#![allow(clippy::unwrap_used)]

use bolero::{check, TypeGenerator};
use taskgate_server::config::{self, ConfigError, FileConfig, Layers};

/// What `serve` does with a config file's text, short of starting: parse it, layer it over the
/// defaults and validate. Refusals say what to fix: a parse error has a message, and an invalid
/// setting names the setting.
fn check_config(text: &str) {
    // `serve` reads its config on the main thread, with 8 MiB of stack; a test thread has 2 MiB,
    // which toml's recursion (bounded by its limit of 80 levels) outgrows in an unoptimised
    // build: a stack overflow the fuzzer found here, where the binary answers "recursion limit
    // exceeded". So the check runs on a thread with the main thread's stack.
    let outcome = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .stack_size(8 << 20)
            .spawn_scoped(scope, || check_config_text(text))
            .unwrap()
            .join()
    });
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

fn check_config_text(text: &str) {
    let file = match FileConfig::parse(text) {
        Ok(file) => file,
        Err(message) => {
            assert!(
                !message.trim().is_empty(),
                "an empty parse error for {text:?}"
            );
            return;
        }
    };
    match config::layered(Layers::default(), file, None) {
        Ok(config) => assert!(config.validate().is_ok()),
        Err(ConfigError::Invalid { setting, message }) => {
            assert!(!setting.trim().is_empty(), "no setting named: {message}");
            assert!(!message.trim().is_empty(), "no message for {setting}");
        }
        Err(other) => panic!("a parsed text cannot fail to read: {other}"),
    }
}

/// One line of a TOML config: a table header, a known setting with a value of some kind, or
/// text as it comes.
#[derive(Debug, TypeGenerator)]
enum TomlLine {
    Table(u8),
    Setting(u8, TomlValue),
    Raw(String),
}

#[derive(Debug, TypeGenerator)]
enum TomlValue {
    Known(u8),
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Duration(u32, u8),
    List(Vec<u8>),
}

const TABLES: &[&str] = &[
    "[server]",
    "[webhooks]",
    "[storage]",
    "[limits]",
    "[models.m]",
    "[models.m.input_schema]",
    "[models.m.headers]",
    "[models.m.env]",
    "[[models.m.routes]]",
    "[tenants.t]",
    "[models.\"bad name\"]",
];
const SETTINGS: &[&str] = &[
    "listen",
    "data_dir",
    "max_body_bytes",
    "max_upload_bytes",
    "result_url_ttl",
    "shutdown_grace",
    "database_url",
    "public_url",
    "timeout",
    "retry_delays",
    "secret_overlap",
    "allow_private_callbacks",
    "requests_per_minute",
    "concurrent_tasks",
    "s3_bucket",
    "s3_region",
    "s3_endpoint",
    "s3_prefix",
    "backend",
    "builtin",
    "command",
    "working_dir",
    "url",
    "response",
    "url_pointers",
    "base64_pointers",
    "base64_content_type",
    "concurrency",
    "max_attempts",
    "poll_interval",
    "modes",
    "description",
    "model",
    "version",
    "api_key",
    "api_key_env",
    "name",
    "breaker_failures",
    "breaker_cooldown",
    "weight",
    "type",
    "required",
];
const TOML_KNOWN: &[&str] = &[
    "\"builtin\"",
    "\"echo\"",
    "\"demo-image\"",
    "\"command\"",
    "\"http\"",
    "\"worker\"",
    "\"apixo\"",
    "\"replicate\"",
    "\"fal\"",
    "\"json\"",
    "\"raw\"",
    "\"127.0.0.1:0\"",
    "\"http://127.0.0.1:9/x\"",
    "\"https://tasks.example.com\"",
    "\"postgres://u:p@127.0.0.1/db\"",
    "\"sqlite://x.db\"",
    "\"/images\"",
    "\"owner/name\"",
    "\"bucket\"",
    "[\"python3\", \"x.py\"]",
    "[{ backend = \"builtin\", builtin = \"echo\" }]",
    "{ A = \"b\" }",
    "0",
    "\"object\"",
];

fn render_toml(lines: &[TomlLine]) -> String {
    let mut out = String::new();
    for line in lines {
        match line {
            TomlLine::Table(t) => out.push_str(TABLES[*t as usize % TABLES.len()]),
            TomlLine::Raw(s) => out.push_str(s),
            TomlLine::Setting(k, value) => {
                out.push_str(SETTINGS[*k as usize % SETTINGS.len()]);
                out.push_str(" = ");
                match value {
                    TomlValue::Known(v) => out.push_str(TOML_KNOWN[*v as usize % TOML_KNOWN.len()]),
                    TomlValue::Str(s) => out.push_str(&toml::Value::from(s.as_str()).to_string()),
                    TomlValue::Int(i) => out.push_str(&i.to_string()),
                    TomlValue::Float(f) => out.push_str(&toml::Value::from(*f).to_string()),
                    TomlValue::Bool(b) => out.push_str(&b.to_string()),
                    TomlValue::Duration(n, unit) => {
                        let unit = ["ms", "s", "m", "h", "d", "y", ""][*unit as usize % 7];
                        out.push_str(&format!("\"{n}{unit}\""));
                    }
                    TomlValue::List(items) => {
                        let items: Vec<&str> = items
                            .iter()
                            .map(|v| TOML_KNOWN[*v as usize % TOML_KNOWN.len()])
                            .collect();
                        out.push_str(&format!("[{}]", items.join(", ")));
                    }
                }
            }
        }
        out.push('\n');
    }
    out
}

#[test]
fn any_config_text_is_refused_with_a_named_setting_or_accepted() {
    check!().for_each(|bytes: &[u8]| {
        if let Ok(text) = std::str::from_utf8(bytes) {
            check_config(text);
        }
    });
}

#[test]
fn config_files_of_known_settings_are_refused_with_a_named_setting_or_accepted() {
    check!()
        .with_type::<Vec<TomlLine>>()
        .for_each(|lines| check_config(&render_toml(lines)));
}
