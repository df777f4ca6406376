use reqwest::header::{HeaderMap, HeaderValue};
use taskgate_client::webhook::{self, SecretError};
use taskgate_client::{verify_webhook, VerifyError};

fn signed_headers(secret: &str, id: &str, ts: i64, body: &[u8]) -> HeaderMap {
    let sig = webhook::sign(&secret.parse().unwrap(), id, ts, body);
    let mut h = HeaderMap::new();
    h.insert("webhook-id", HeaderValue::from_str(id).unwrap());
    h.insert(
        "webhook-timestamp",
        HeaderValue::from_str(&ts.to_string()).unwrap(),
    );
    h.insert("webhook-signature", HeaderValue::from_str(&sig).unwrap());
    h
}

#[test]
fn verify_webhook_accepts_a_fresh_signed_delivery_and_refuses_a_tampered_one() {
    let secret = webhook::generate_secret();
    let body = br#"{"code":200,"message":"success","data":{"taskId":"task_1","state":"success"}}"#;
    let headers = signed_headers(&secret, "whk_1", webhook::unix_now(), body);

    verify_webhook(&headers, body, &secret).unwrap();
    assert_eq!(
        verify_webhook(&headers, br#"{"code":200}"#, &secret),
        Err(VerifyError::NoMatchingSignature)
    );
}

#[test]
fn verify_webhook_refuses_a_delivery_older_than_five_minutes() {
    let secret = webhook::generate_secret();
    let headers = signed_headers(&secret, "whk_1", webhook::unix_now() - 600, b"{}");

    assert!(matches!(
        verify_webhook(&headers, b"{}", &secret),
        Err(VerifyError::TooOld { .. })
    ));
}

#[test]
fn verify_webhook_names_a_missing_header_and_a_bad_secret() {
    let secret = webhook::generate_secret();
    let mut headers = signed_headers(&secret, "whk_1", webhook::unix_now(), b"{}");
    headers.remove("webhook-signature");

    assert_eq!(
        verify_webhook(&headers, b"{}", &secret),
        Err(VerifyError::MissingHeader("webhook-signature"))
    );
    assert_eq!(
        verify_webhook(&headers, b"{}", "whsec_"),
        Err(VerifyError::BadSecret(SecretError::Empty))
    );
}
