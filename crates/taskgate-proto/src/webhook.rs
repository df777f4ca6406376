//! Standard Webhooks signing and verification, shared by the server (which signs deliveries) and
//! the client (which verifies them).
//!
//! The format is the one in the [Standard Webhooks specification](https://www.standardwebhooks.com),
//! so any existing Standard Webhooks library can verify what taskgate sends:
//!
//! * three headers, [`HEADER_ID`] (`webhook-id`, stable across retries of one delivery),
//!   [`HEADER_TIMESTAMP`] (`webhook-timestamp`, Unix seconds of this attempt) and
//!   [`HEADER_SIGNATURE`] (`webhook-signature`);
//! * the signature is `v1,` followed by the base64 HMAC-SHA256 of `"{id}.{timestamp}.{body}"`,
//!   keyed with the secret's bytes;
//! * secrets are presented as `whsec_` + base64 of the key bytes;
//! * during a key rotation the signature header carries several space-separated signatures, and a
//!   receiver accepts the delivery if any of them matches any secret it trusts.
//!
//! Everything here is pure computation: no IO, no clock (callers pass `now`), so the functions are
//! safe to call from any thread or task.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Header holding the delivery id, identical on every attempt of one delivery.
pub const HEADER_ID: &str = "webhook-id";
/// Header holding the attempt's Unix timestamp in seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// Header holding one or more space-separated `v1,<base64>` signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// Header naming what a delivery reports (taskgate's own, outside the signature like the
/// other headers; the body is signed): `task.start`, `task.progress` or `task.completed`
/// ([`crate::WebhookEvent::header_value`]).
pub const HEADER_EVENT: &str = "taskgate-event";
/// Prefix of a serialized symmetric secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// How far a delivery's timestamp may be from the receiver's clock, in either direction, before it
/// is refused. Five minutes, as the specification's reference libraries use.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// Length of a generated key. The specification asks for at least 24 bytes; 32 matches the
/// HMAC-SHA256 block of output and costs nothing extra.
const GENERATED_KEY_LEN: usize = 32;
const SIGNATURE_VERSION: &str = "v1";

type HmacSha256 = Hmac<Sha256>;

/// Generates a new random secret, serialized as `whsec_<base64 of 32 bytes>`.
///
/// ```
/// let s = taskgate_proto::webhook::generate_secret();
/// assert!(s.starts_with("whsec_"));
/// assert!(s.parse::<taskgate_proto::webhook::Secret>().is_ok());
/// ```
pub fn generate_secret() -> String {
    Secret::generate().to_whsec()
}

/// A symmetric signing key.
///
/// Parsed from `whsec_<base64>` or from bare base64 (other providers hand out keys without the
/// prefix). `Debug` never shows the key, so a secret can sit in a config struct that gets logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    key: Vec<u8>,
}

/// Why a string is not a usable secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// The string (after the optional `whsec_` prefix) is empty.
    #[error("the webhook secret is empty")]
    Empty,
    /// The part after `whsec_` is not standard base64.
    #[error("the webhook secret is not valid base64 after the whsec_ prefix: {0}")]
    Base64(#[source] base64::DecodeError),
}

impl Secret {
    /// Parses `whsec_<base64>` or bare base64.
    ///
    /// ```
    /// use taskgate_proto::webhook::Secret;
    /// let a = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    /// let b = Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    /// assert_eq!(a, b);
    /// assert!(Secret::parse("whsec_").is_err());
    /// ```
    pub fn parse(s: &str) -> Result<Self, SecretError> {
        let s = s.trim();
        let encoded = s.strip_prefix(SECRET_PREFIX).unwrap_or(s);
        if encoded.is_empty() {
            return Err(SecretError::Empty);
        }
        let key = BASE64.decode(encoded).map_err(SecretError::Base64)?;
        if key.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Secret { key })
    }

    /// Wraps raw key bytes.
    pub fn from_bytes(key: impl Into<Vec<u8>>) -> Self {
        Secret { key: key.into() }
    }

    /// A fresh random 32-byte key from the operating system's generator.
    pub fn generate() -> Self {
        let mut key = vec![0u8; GENERATED_KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Secret { key }
    }

    /// Serializes as `whsec_<base64>`, the form shown to users.
    pub fn to_whsec(&self) -> String {
        format!("{SECRET_PREFIX}{}", BASE64.encode(&self.key))
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.key
    }

    fn mac(&self, msg_id: &str, timestamp_secs: i64, body: &[u8]) -> [u8; 32] {
        // HMAC accepts keys of any length, so this cannot fail; the fallback only exists to keep
        // the non-test code free of unwrap.
        let mut mac = match HmacSha256::new_from_slice(&self.key) {
            Ok(mac) => mac,
            Err(_) => return [0; 32],
        };
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp_secs.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }
}

impl std::str::FromStr for Secret {
    type Err = SecretError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Secret::parse(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Lets [`verify`] take one secret or a slice of them.
impl AsRef<[Secret]> for Secret {
    fn as_ref(&self) -> &[Secret] {
        std::slice::from_ref(self)
    }
}

/// Signs one delivery attempt: `v1,<base64 HMAC-SHA256 of "{msg_id}.{timestamp_secs}.{body}">`.
///
/// The body must be the exact bytes sent; re-serialized JSON will not verify.
///
/// ```
/// use taskgate_proto::webhook::{sign, Secret};
/// let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
/// let sig = sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
/// assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
/// ```
pub fn sign(secret: &Secret, msg_id: &str, timestamp_secs: i64, body: &[u8]) -> String {
    let mac = secret.mac(msg_id, timestamp_secs, body);
    format!("{SIGNATURE_VERSION},{}", BASE64.encode(mac))
}

/// Signs with every secret and joins the signatures with spaces, which is the value of the
/// `webhook-signature` header while a secret is being rotated (old and new both sign).
///
/// ```
/// use taskgate_proto::webhook::{sign_all, Secret};
/// let header = sign_all(&[Secret::generate(), Secret::generate()], "msg_1", 1_700_000_000, b"{}");
/// assert_eq!(header.split(' ').count(), 2);
/// ```
pub fn sign_all(secrets: &[Secret], msg_id: &str, timestamp_secs: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|s| sign(s, msg_id, timestamp_secs, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The three header values of a delivery, as received. `None` means the header was absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SignedHeaders<'a> {
    /// Value of `webhook-id`.
    pub id: Option<&'a str>,
    /// Value of `webhook-timestamp`.
    pub timestamp: Option<&'a str>,
    /// Value of `webhook-signature`.
    pub signature: Option<&'a str>,
}

impl<'a> SignedHeaders<'a> {
    /// Builds the set from a header lookup function (names are passed in lowercase), so callers
    /// can adapt any header map without this crate depending on an HTTP library.
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use taskgate_proto::webhook::SignedHeaders;
    /// let map: HashMap<&str, &str> = [("webhook-id", "msg_1")].into_iter().collect();
    /// let h = SignedHeaders::from_lookup(|name| map.get(name).copied());
    /// assert_eq!(h.id, Some("msg_1"));
    /// assert_eq!(h.signature, None);
    /// ```
    pub fn from_lookup(mut get: impl FnMut(&str) -> Option<&'a str>) -> Self {
        SignedHeaders {
            id: get(HEADER_ID),
            timestamp: get(HEADER_TIMESTAMP),
            signature: get(HEADER_SIGNATURE),
        }
    }
}

/// Why a delivery was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// One of the three `webhook-*` headers is absent (the value is the header name).
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// `webhook-timestamp` is not an integer number of seconds.
    #[error("webhook-timestamp {0:?} is not a Unix timestamp in seconds")]
    BadTimestamp(String),
    /// The timestamp is further in the past than the tolerance: possibly a replay.
    #[error("webhook-timestamp is {age_secs} s old, beyond the {tolerance_secs} s tolerance")]
    TooOld {
        /// Seconds between the timestamp and now.
        age_secs: i64,
        /// The tolerance that was applied.
        tolerance_secs: i64,
    },
    /// The timestamp is further in the future than the tolerance: a clock is wrong.
    #[error(
        "webhook-timestamp is {ahead_secs} s in the future, beyond the {tolerance_secs} s tolerance"
    )]
    TooNew {
        /// Seconds between now and the timestamp.
        ahead_secs: i64,
        /// The tolerance that was applied.
        tolerance_secs: i64,
    },
    /// No `v1` signature in the header matches any of the secrets.
    #[error("no signature matches the webhook secret")]
    NoMatchingSignature,
    /// The secret given to the verifier is unusable (or no secret was given at all).
    #[error(transparent)]
    BadSecret(#[from] SecretError),
}

/// Verifies a delivery against one secret or several (during a rotation).
///
/// Checks, in order: the three headers are present, the timestamp is an integer within
/// `tolerance` of `now_secs` in either direction (replay protection), and at least one `v1`
/// signature in the header equals the HMAC under at least one of `secrets`, compared in constant
/// time. Entries with other versions (e.g. `v1a`, asymmetric) are skipped, as the specification
/// asks.
///
/// ```
/// use taskgate_proto::webhook::{sign, verify, Secret, SignedHeaders, DEFAULT_TOLERANCE};
/// let secret = Secret::generate();
/// let body = br#"{"code":200}"#;
/// let sig = sign(&secret, "msg_1", 1_700_000_000, body);
/// let headers = SignedHeaders {
///     id: Some("msg_1"),
///     timestamp: Some("1700000000"),
///     signature: Some(&sig),
/// };
/// assert!(verify(&secret, &headers, body, 1_700_000_010, DEFAULT_TOLERANCE).is_ok());
/// assert!(verify(&secret, &headers, b"tampered", 1_700_000_010, DEFAULT_TOLERANCE).is_err());
/// ```
pub fn verify<S>(
    secrets: &S,
    headers: &SignedHeaders<'_>,
    body: &[u8],
    now_secs: i64,
    tolerance: Duration,
) -> Result<(), VerifyError>
where
    S: AsRef<[Secret]> + ?Sized,
{
    let secrets = secrets.as_ref();
    if secrets.is_empty() {
        return Err(VerifyError::BadSecret(SecretError::Empty));
    }
    let id = headers.id.ok_or(VerifyError::MissingHeader(HEADER_ID))?;
    let timestamp = headers
        .timestamp
        .ok_or(VerifyError::MissingHeader(HEADER_TIMESTAMP))?;
    let signature = headers
        .signature
        .ok_or(VerifyError::MissingHeader(HEADER_SIGNATURE))?;

    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| VerifyError::BadTimestamp(timestamp.to_owned()))?;
    let tolerance_secs = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    let age = now_secs.saturating_sub(ts);
    if age > tolerance_secs {
        return Err(VerifyError::TooOld {
            age_secs: age,
            tolerance_secs,
        });
    }
    // Not `-age`: with a clock near i64::MIN the age saturates there, and its negation
    // overflows (a panic in debug builds, a far-future timestamp let through in release).
    let ahead = ts.saturating_sub(now_secs);
    if ahead > tolerance_secs {
        return Err(VerifyError::TooNew {
            ahead_secs: ahead,
            tolerance_secs,
        });
    }

    // Decode the candidates once; a malformed entry is just one that cannot match.
    let candidates: Vec<Vec<u8>> = signature
        .split(' ')
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == SIGNATURE_VERSION)
        .filter_map(|(_, sig)| BASE64.decode(sig).ok())
        .collect();

    // Every comparison runs to the end so timing does not reveal which secret or entry matched.
    let mut matched = subtle::Choice::from(0u8);
    for secret in secrets {
        let expected = secret.mac(id, ts, body);
        for candidate in &candidates {
            matched |= expected.as_slice().ct_eq(candidate.as_slice());
        }
    }
    if bool::from(matched) {
        Ok(())
    } else {
        Err(VerifyError::NoMatchingSignature)
    }
}

/// [`verify`] against the system clock with the [`DEFAULT_TOLERANCE`] of five minutes.
pub fn verify_now<S>(
    secrets: &S,
    headers: &SignedHeaders<'_>,
    body: &[u8],
) -> Result<(), VerifyError>
where
    S: AsRef<[Secret]> + ?Sized,
{
    verify(secrets, headers, body, unix_now(), DEFAULT_TOLERANCE)
}

/// Current Unix time in seconds (0 if the clock is before 1970, which then fails verification
/// loudly as "too new" rather than panicking).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    // Published by the Standard Webhooks project: the JavaScript, PHP and Python libraries'
    // "sign function works" tests.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TS: i64 = 1614265330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn secret(s: &str) -> Secret {
        Secret::parse(s).unwrap()
    }

    fn headers<'a>(id: &'a str, ts: &'a str, sig: &'a str) -> SignedHeaders<'a> {
        SignedHeaders {
            id: Some(id),
            timestamp: Some(ts),
            signature: Some(sig),
        }
    }

    #[test]
    fn signing_reproduces_the_specifications_published_test_vector() {
        assert_eq!(
            sign(&secret(SPEC_SECRET), SPEC_ID, SPEC_TS, SPEC_BODY),
            SPEC_SIG
        );
    }

    #[test]
    fn signing_reproduces_the_reference_rust_librarys_test_vector() {
        // From the Standard Webhooks repository's Rust library (`test_sign`).
        let s = secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD");
        assert_eq!(
            sign(
                &s,
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1649367553,
                br#"{"email":"test@example.com","username":"test_user"}"#
            ),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
    }

    #[test]
    fn the_published_test_vector_verifies_at_its_own_timestamp() {
        let h = headers(SPEC_ID, "1614265330", SPEC_SIG);
        verify(
            &secret(SPEC_SECRET),
            &h,
            SPEC_BODY,
            SPEC_TS,
            DEFAULT_TOLERANCE,
        )
        .unwrap();
    }

    #[test]
    fn a_secret_without_the_whsec_prefix_is_the_same_key() {
        assert_eq!(
            secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            secret(SPEC_SECRET)
        );
    }

    #[test]
    fn a_tampered_body_is_refused() {
        let h = headers(SPEC_ID, "1614265330", SPEC_SIG);
        let err = verify(
            &secret(SPEC_SECRET),
            &h,
            br#"{"test": 2432232315}"#,
            SPEC_TS,
            DEFAULT_TOLERANCE,
        )
        .unwrap_err();
        assert_eq!(err, VerifyError::NoMatchingSignature);
    }

    #[test]
    fn a_changed_id_or_timestamp_is_refused() {
        let s = secret(SPEC_SECRET);
        let other_id = headers("msg_other", "1614265330", SPEC_SIG);
        assert_eq!(
            verify(&s, &other_id, SPEC_BODY, SPEC_TS, DEFAULT_TOLERANCE),
            Err(VerifyError::NoMatchingSignature)
        );
        let other_ts = headers(SPEC_ID, "1614265331", SPEC_SIG);
        assert_eq!(
            verify(&s, &other_ts, SPEC_BODY, SPEC_TS, DEFAULT_TOLERANCE),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn a_timestamp_older_than_the_tolerance_is_refused() {
        let h = headers(SPEC_ID, "1614265330", SPEC_SIG);
        let err = verify(
            &secret(SPEC_SECRET),
            &h,
            SPEC_BODY,
            SPEC_TS + 301,
            DEFAULT_TOLERANCE,
        )
        .unwrap_err();
        assert_eq!(
            err,
            VerifyError::TooOld {
                age_secs: 301,
                tolerance_secs: 300
            }
        );
        // Exactly at the edge is still accepted.
        verify(
            &secret(SPEC_SECRET),
            &h,
            SPEC_BODY,
            SPEC_TS + 300,
            DEFAULT_TOLERANCE,
        )
        .unwrap();
    }

    #[test]
    fn a_timestamp_further_ahead_than_the_tolerance_is_refused() {
        let h = headers(SPEC_ID, "1614265330", SPEC_SIG);
        let err = verify(
            &secret(SPEC_SECRET),
            &h,
            SPEC_BODY,
            SPEC_TS - 301,
            DEFAULT_TOLERANCE,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            VerifyError::TooNew {
                ahead_secs: 301,
                ..
            }
        ));
    }

    /// Found by the fuzz target (crates/taskgate-fuzz): `now` and the timestamp so far apart
    /// that their difference saturates, which the ahead-check once negated with overflow.
    #[test]
    fn timestamps_at_the_ends_of_i64_are_refused_without_overflow() {
        let h = headers(SPEC_ID, "4589893755219370950", SPEC_SIG);
        let err = verify(
            &secret(SPEC_SECRET),
            &h,
            SPEC_BODY,
            -7097850744398201412,
            Duration::ZERO,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::TooNew {
                    ahead_secs: i64::MAX,
                    ..
                }
            ),
            "{err:?}"
        );
        let min = i64::MIN.to_string();
        let h = headers(SPEC_ID, &min, SPEC_SIG);
        let err = verify(
            &secret(SPEC_SECRET),
            &h,
            SPEC_BODY,
            i64::MAX,
            DEFAULT_TOLERANCE,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::TooOld {
                    age_secs: i64::MAX,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_rotated_header_with_two_signatures_verifies_with_either_secret() {
        let old = Secret::generate();
        let new = Secret::generate();
        let header = sign_all(&[new.clone(), old.clone()], "msg_rot", 1_700_000_000, b"{}");
        let h = headers("msg_rot", "1700000000", &header);
        verify(&old, &h, b"{}", 1_700_000_000, DEFAULT_TOLERANCE).unwrap();
        verify(&new, &h, b"{}", 1_700_000_000, DEFAULT_TOLERANCE).unwrap();
        // A receiver that trusts both keys while it rotates also accepts a single signature.
        let only_new = sign(&new, "msg_rot", 1_700_000_000, b"{}");
        let h = headers("msg_rot", "1700000000", &only_new);
        verify(&[old, new], &h, b"{}", 1_700_000_000, DEFAULT_TOLERANCE).unwrap();
        let stranger = Secret::generate();
        assert_eq!(
            verify(&stranger, &h, b"{}", 1_700_000_000, DEFAULT_TOLERANCE),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn garbage_and_other_versions_in_the_signature_header_are_skipped() {
        let sig = format!(
            "v1a,AAAA v2,{} v1,!!notbase64 v1, {SPEC_SIG}",
            &SPEC_SIG[3..]
        );
        let h = headers(SPEC_ID, "1614265330", &sig);
        verify(
            &secret(SPEC_SECRET),
            &h,
            SPEC_BODY,
            SPEC_TS,
            DEFAULT_TOLERANCE,
        )
        .unwrap();
        // The same signature under another version tag does not count.
        let wrong_version = format!("v2,{}", &SPEC_SIG[3..]);
        let h = headers(SPEC_ID, "1614265330", &wrong_version);
        assert_eq!(
            verify(
                &secret(SPEC_SECRET),
                &h,
                SPEC_BODY,
                SPEC_TS,
                DEFAULT_TOLERANCE
            ),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn a_truncated_signature_is_refused() {
        let h = headers(SPEC_ID, "1614265330", &SPEC_SIG[..8]);
        assert_eq!(
            verify(
                &secret(SPEC_SECRET),
                &h,
                SPEC_BODY,
                SPEC_TS,
                DEFAULT_TOLERANCE
            ),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn each_missing_header_is_named() {
        let s = secret(SPEC_SECRET);
        let full = headers(SPEC_ID, "1614265330", SPEC_SIG);
        for (h, name) in [
            (SignedHeaders { id: None, ..full }, HEADER_ID),
            (
                SignedHeaders {
                    timestamp: None,
                    ..full
                },
                HEADER_TIMESTAMP,
            ),
            (
                SignedHeaders {
                    signature: None,
                    ..full
                },
                HEADER_SIGNATURE,
            ),
        ] {
            assert_eq!(
                verify(&s, &h, SPEC_BODY, SPEC_TS, DEFAULT_TOLERANCE),
                Err(VerifyError::MissingHeader(name))
            );
        }
    }

    #[test]
    fn a_non_numeric_timestamp_is_refused() {
        let h = headers(SPEC_ID, "hello", SPEC_SIG);
        assert_eq!(
            verify(
                &secret(SPEC_SECRET),
                &h,
                SPEC_BODY,
                SPEC_TS,
                DEFAULT_TOLERANCE
            ),
            Err(VerifyError::BadTimestamp("hello".into()))
        );
    }

    #[test]
    fn verifying_without_any_secret_is_an_error_not_a_pass() {
        let h = headers(SPEC_ID, "1614265330", SPEC_SIG);
        let none: [Secret; 0] = [];
        assert_eq!(
            verify(&none, &h, SPEC_BODY, SPEC_TS, DEFAULT_TOLERANCE),
            Err(VerifyError::BadSecret(SecretError::Empty))
        );
    }

    #[test]
    fn malformed_secrets_are_refused() {
        assert_eq!(Secret::parse(""), Err(SecretError::Empty));
        assert_eq!(Secret::parse("whsec_"), Err(SecretError::Empty));
        assert!(matches!(
            Secret::parse("whsec_not base64!"),
            Err(SecretError::Base64(_))
        ));
    }

    #[test]
    fn generated_secrets_are_whsec_with_32_random_bytes() {
        let a = generate_secret();
        let b = generate_secret();
        assert_ne!(a, b);
        assert!(a.starts_with("whsec_"));
        assert_eq!(secret(&a).as_bytes().len(), 32);
        assert_eq!(secret(&a).to_whsec(), a);
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let s = secret(SPEC_SECRET);
        let shown = format!("{s:?}");
        assert!(!shown.contains("MfKQ9r8"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn header_lookup_uses_the_lowercase_standard_names() {
        let h = SignedHeaders::from_lookup(|name| match name {
            "webhook-id" => Some("a"),
            "webhook-timestamp" => Some("b"),
            "webhook-signature" => Some("c"),
            _ => None,
        });
        assert_eq!(h, headers("a", "b", "c"));
    }
}
