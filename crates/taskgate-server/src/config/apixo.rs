//! `backend = "apixo"`: a model served by another APIXO-compatible service (APIXO itself, or
//! another taskgate). Its settings, the upstream key's resolution, and their validation.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, ConfigError};

/// The keys of an `apixo` model table besides the common ones (`check_model_keys`).
pub(super) const KEYS: &[&str] = &[
    "url",
    "api_key_env",
    "api_key",
    "model",
    "max_output_bytes",
    "first_poll",
    "max_poll",
];

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApixoBackendConfig {
    /// Base URL of the service (`https://api.apixo.ai`; a trailing `/api/v1` is accepted).
    pub url: String,
    /// The environment variable holding the upstream's API key, read at start.
    pub api_key_env: Option<String>,
    /// The upstream's API key itself (for tests and local use; prefer `api_key_env`).
    pub api_key: Option<String>,
    /// The upstream's model name; by default the local model's name.
    pub model: Option<String>,
    /// Largest output copied from the upstream, in bytes.
    pub max_output_bytes: Option<u64>,
    /// First status poll after the submit (then ×1.5 per poll, up to `max_poll`).
    #[serde(default, with = "humantime_serde::option")]
    pub first_poll: Option<Duration>,
    /// Longest interval between two status polls.
    #[serde(default, with = "humantime_serde::option")]
    pub max_poll: Option<Duration>,
}

// The key never reaches a log line or an error message.
impl fmt::Debug for ApixoBackendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApixoBackendConfig")
            .field("url", &self.url)
            .field("api_key_env", &self.api_key_env)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .field("max_output_bytes", &self.max_output_bytes)
            .field("first_poll", &self.first_poll)
            .field("max_poll", &self.max_poll)
            .finish()
    }
}

impl ApixoBackendConfig {
    /// The upstream key: `api_key`, else the variable `api_key_env` names. The error says which
    /// setting to fix (never the key).
    pub fn resolve_key(&self, model: &str) -> Result<String, ConfigError> {
        let at = |k: &str| format!("models.{model}.{k}");
        match (&self.api_key, &self.api_key_env) {
            (Some(_), Some(_)) => Err(invalid(
                at("api_key"),
                "set either api_key or api_key_env, not both",
            )),
            (None, None) => Err(invalid(
                at("api_key_env"),
                format!(
                    "the upstream {} needs a key: set api_key_env = \"NAME\", the environment variable holding it",
                    self.url
                ),
            )),
            (Some(key), None) => Ok(key.clone()),
            (None, Some(var)) => match std::env::var(var) {
                Ok(key) if !key.trim().is_empty() => Ok(key.trim().to_owned()),
                _ => Err(invalid(
                    at("api_key_env"),
                    format!(
                        "the environment variable {var} is not set (or empty); it must hold the API key for {}",
                        self.url
                    ),
                )),
            },
        }
    }

    /// Checks every setting, the key's presence included, so that a bad one stops the start.
    pub(super) fn validate(&self, model: &str) -> Result<(), ConfigError> {
        let at = |k: &str| format!("models.{model}.{k}");
        let parsed = url::Url::parse(&self.url).map_err(|e| {
            invalid(
                at("url"),
                format!(
                    "{:?} is not an absolute URL ({e}); example: https://api.apixo.ai",
                    self.url
                ),
            )
        })?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(invalid(
                at("url"),
                "must be an http:// or https:// URL with a host",
            ));
        }
        let key = self.resolve_key(model)?;
        if reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")).is_err() {
            return Err(invalid(
                at(if self.api_key.is_some() {
                    "api_key"
                } else {
                    "api_key_env"
                }),
                "the key holds characters an HTTP header cannot carry",
            ));
        }
        if let Some(name) = &self.model {
            if name.trim().is_empty() || name.len() > 256 {
                return Err(invalid(
                    at("model"),
                    "must name the upstream's model (1 to 256 characters)",
                ));
            }
        }
        if self.max_output_bytes == Some(0) {
            return Err(invalid(at("max_output_bytes"), "must be greater than 0"));
        }
        if self.first_poll.is_some_and(|d| d.is_zero()) {
            return Err(invalid(at("first_poll"), "must be longer than 0s"));
        }
        if let (Some(first), Some(max)) = (self.first_poll, self.max_poll) {
            if max < first {
                return Err(invalid(
                    at("max_poll"),
                    "must not be shorter than first_poll",
                ));
            }
        }
        if self.max_poll.is_some_and(|d| d.is_zero()) {
            return Err(invalid(at("max_poll"), "must be longer than 0s"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parsed(extra: &str) -> ApixoBackendConfig {
        let text = format!("url = \"http://127.0.0.1:9\"\n{extra}");
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn a_missing_key_variable_stops_the_start_naming_the_setting_and_the_variable() {
        let cfg = parsed("api_key_env = \"TASKGATE_TEST_APIXO_KEY_THAT_IS_NEVER_SET\"");
        let err = cfg.validate("up").unwrap_err().to_string();
        assert!(err.contains("models.up.api_key_env"), "{err}");
        assert!(
            err.contains("TASKGATE_TEST_APIXO_KEY_THAT_IS_NEVER_SET"),
            "{err}"
        );
    }

    #[test]
    fn a_model_without_any_key_or_with_both_is_refused() {
        let none = parsed("").validate("up").unwrap_err().to_string();
        assert!(none.contains("models.up.api_key_env"), "{none}");
        let both = parsed("api_key = \"k\"\napi_key_env = \"X\"")
            .validate("up")
            .unwrap_err()
            .to_string();
        assert!(both.contains("not both"), "{both}");
    }

    #[test]
    fn bad_settings_are_named() {
        for (extra, setting) in [
            ("api_key = \"k\"\nmax_output_bytes = 0", "max_output_bytes"),
            (
                "api_key = \"k\"\nfirst_poll = \"2s\"\nmax_poll = \"1s\"",
                "max_poll",
            ),
            ("api_key = \"k\"\nmodel = \" \"", "model"),
            ("api_key = \"bad\\nkey\"", "api_key"),
        ] {
            let err = parsed(extra).validate("up").unwrap_err().to_string();
            assert!(
                err.contains(&format!("models.up.{setting}")),
                "{extra}: {err}"
            );
        }
        let err = toml::from_str::<ApixoBackendConfig>("url = \"ftp://h\"\napi_key = \"k\"")
            .unwrap()
            .validate("up")
            .unwrap_err()
            .to_string();
        assert!(err.contains("models.up.url"), "{err}");
    }

    #[test]
    fn the_key_never_appears_in_debug_output() {
        let cfg = parsed("api_key = \"sk-secret-123\"");
        assert!(!format!("{cfg:?}").contains("sk-secret-123"));
        assert!(cfg.validate("up").is_ok());
    }
}
