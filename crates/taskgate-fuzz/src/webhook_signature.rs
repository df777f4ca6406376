//! Target 3: Standard Webhooks signatures, as taskgate signs deliveries and as receivers
//! verify them (`taskgate_proto::webhook::verify` and the SDK's `verify_webhook`).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bolero::{check, TypeGenerator};
use taskgate_proto::webhook::{sign, sign_all, verify, Secret, SignedHeaders, DEFAULT_TOLERANCE};

/// A delivery as signed, one byte of one part changed, and headers as a stranger sends them.
#[derive(Debug, TypeGenerator)]
struct Delivery {
    key: Vec<u8>,
    other_key: Vec<u8>,
    id: String,
    timestamp: i64,
    /// The receiver's clock relative to the timestamp; within the tolerance when small.
    skew: i16,
    body: Vec<u8>,
    /// Which part is changed (body, id, timestamp, signature), where, and by which bits.
    part: u8,
    at: usize,
    flip: u8,
    /// Headers and secret as they arrive, unrelated to the rest.
    raw_id: Option<String>,
    raw_timestamp: Option<String>,
    raw_signature: Option<String>,
    /// When set, the timestamp header is this number: a stranger's clock, far off or not.
    raw_timestamp_number: Option<i64>,
    raw_secret: String,
    raw_now: i64,
    raw_tolerance: u64,
}

/// `bytes` with the byte at `at` (modulo its length) xored with a nonzero `flip`.
fn changed(bytes: &[u8], at: usize, flip: u8) -> Option<Vec<u8>> {
    if bytes.is_empty() {
        return None;
    }
    let mut out = bytes.to_vec();
    out[at % bytes.len()] ^= flip.max(1);
    Some(out)
}

fn check_delivery(d: &Delivery) {
    // Strangers' headers and secrets: answered, never a panic.
    let number = d.raw_timestamp_number.map(|n| n.to_string());
    let raw = SignedHeaders {
        id: d.raw_id.as_deref(),
        timestamp: number.as_deref().or(d.raw_timestamp.as_deref()),
        signature: d.raw_signature.as_deref(),
    };
    let tolerance = Duration::from_secs(d.raw_tolerance);
    if let Ok(secret) = Secret::parse(&d.raw_secret) {
        let _ = verify(&secret, &raw, &d.body, d.raw_now, tolerance);
    }
    let no_secrets: &[Secret] = &[];
    let _ = verify(no_secrets, &raw, &d.body, d.raw_now, tolerance);
    let stranger = Secret::from_bytes(d.key.clone());
    let _ = verify(&stranger, &raw, &d.body, d.raw_now, tolerance);
    let _ = verify(&stranger, &raw, &d.body, d.raw_now, DEFAULT_TOLERANCE);

    // What sign() made verifies, within the tolerance.
    if d.key.is_empty() {
        return;
    }
    let secret = Secret::from_bytes(d.key.clone());
    let now = d.timestamp.saturating_add(i64::from(d.skew) % 300);
    let signature = sign(&secret, &d.id, d.timestamp, &d.body);
    let timestamp = d.timestamp.to_string();
    let headers = SignedHeaders {
        id: Some(&d.id),
        timestamp: Some(&timestamp),
        signature: Some(&signature),
    };
    assert_eq!(
        verify(&secret, &headers, &d.body, now, DEFAULT_TOLERANCE),
        Ok(())
    );
    // During a rotation either secret verifies the header both signed.
    if !d.other_key.is_empty() {
        let other = Secret::from_bytes(d.other_key.clone());
        let both = sign_all(
            &[other.clone(), secret.clone()],
            &d.id,
            d.timestamp,
            &d.body,
        );
        let rotated = SignedHeaders {
            signature: Some(&both),
            ..headers
        };
        assert_eq!(
            verify(&secret, &rotated, &d.body, now, DEFAULT_TOLERANCE),
            Ok(())
        );
        assert_eq!(
            verify(&other, &rotated, &d.body, now, DEFAULT_TOLERANCE),
            Ok(())
        );
        // HMAC pads short keys with zeros, so only keys of one length are surely different.
        if d.other_key.len() == d.key.len() && d.other_key != d.key {
            assert!(verify(&other, &headers, &d.body, now, DEFAULT_TOLERANCE).is_err());
        }
    }

    // One byte changed anywhere signed, or in the signature, and it is refused.
    let part = d.part % 4;
    let source: &[u8] = match part {
        0 => &d.body,
        1 => d.id.as_bytes(),
        2 => timestamp.as_bytes(),
        _ => signature.as_bytes(),
    };
    let Some(bytes) = changed(source, d.at, d.flip) else {
        return;
    };
    if part == 0 {
        assert!(verify(&secret, &headers, &bytes, now, DEFAULT_TOLERANCE).is_err());
        return;
    }
    // A header that is not text never reaches verify: the lookup finds no header.
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return;
    };
    let tampered = match part {
        1 => SignedHeaders {
            id: Some(text),
            ..headers
        },
        2 => SignedHeaders {
            timestamp: Some(text),
            ..headers
        },
        _ => SignedHeaders {
            signature: Some(text),
            ..headers
        },
    };
    assert!(
        verify(&secret, &tampered, &d.body, now, DEFAULT_TOLERANCE).is_err(),
        "{tampered:?} verified"
    );
}

/// The SDK's `verify_webhook` on a header map: any map and secret answered without a panic,
/// and a delivery signed now verifies.
fn check_client(d: &Delivery) {
    use reqwest::header::{HeaderMap, HeaderValue};
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("webhook-id", &d.raw_id),
        ("webhook-timestamp", &d.raw_timestamp),
        ("webhook-signature", &d.raw_signature),
    ] {
        if let Some(v) = value
            .as_deref()
            .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
        {
            headers.insert(name, v);
        }
    }
    let _ = taskgate_client::verify_webhook(&headers, &d.body, &d.raw_secret);

    if d.key.is_empty() {
        return;
    }
    let secret = Secret::from_bytes(d.key.clone());
    let Ok(id) = HeaderValue::from_str(&d.id) else {
        return;
    };
    let now = taskgate_proto::webhook::unix_now();
    if id.to_str().is_err() {
        return;
    }
    let mut headers = HeaderMap::new();
    headers.insert("webhook-id", id);
    headers.insert("webhook-timestamp", HeaderValue::from(now));
    let signature = sign(&secret, &d.id, now, &d.body);
    headers.insert(
        "webhook-signature",
        HeaderValue::from_str(&signature).unwrap(),
    );
    let whsec = secret.to_whsec();
    assert_eq!(
        taskgate_client::verify_webhook(&headers, &d.body, &whsec),
        Ok(())
    );
    if let Some(body) = changed(&d.body, d.at, d.flip) {
        assert!(taskgate_client::verify_webhook(&headers, &body, &whsec).is_err());
    }
}

#[test]
fn signed_deliveries_verify_and_any_changed_byte_or_stranger_header_is_refused() {
    check!().with_type::<Delivery>().for_each(|d| {
        check_delivery(d);
        check_client(d);
    });
}
