//! `taskgate webhook listen`: a receiver on 127.0.0.1 for developing against callbacks. It
//! verifies each delivery's Standard Webhooks signature with the given secret, or with the
//! tenant's current and previous secrets read from the server, answers 200 or 401, and prints the
//! delivery. Requests are handled concurrently by axum; the state they share is read-only.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use serde_json::{json, Value};
use taskgate_client::webhook::{self, Secret, SignedHeaders};

use super::commands::connect;
use super::exit::{explain, Action, Failure, EXIT_TRANSPORT};
use super::Connection;

struct ListenState {
    secrets: Vec<Secret>,
    json: bool,
}

pub(super) async fn listen(
    conn: &Connection,
    port: u16,
    secret: Option<String>,
) -> Result<(), Failure> {
    let raw: Vec<String> = match secret {
        // The server's secrets always carry the prefix; without it a mistyped value (any word
        // that happens to be base64) would be taken as a key and every delivery "forged".
        Some(s) if !s.trim().starts_with(webhook::SECRET_PREFIX) => {
            return Err(Failure::usage(format!(
                "--secret must be a webhook secret starting with {}, as GET /api/v1/webhookSecret returns it (or leave --secret out to read it from the server)",
                webhook::SECRET_PREFIX
            )))
        }
        Some(s) => vec![s],
        None => {
            let client = connect(conn)?;
            // Refused keys and unreachable servers exit as they do for every other command.
            let data = client
                .webhook_secret()
                .await
                .map_err(|e| explain(conn, Action::WebhookSecret, e))?;
            // During a rotation deliveries may still carry only the previous secret's signature.
            std::iter::once(data.secret)
                .chain(data.previous_secret)
                .collect()
        }
    };
    let secrets = raw
        .iter()
        .map(|s| Secret::parse(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::usage(format!("--secret is not a webhook secret: {e}")))?;

    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .map_err(|e| Failure::usage(format!("cannot listen on 127.0.0.1:{port}: {e}")))?;
    let addr = listener.local_addr().map_err(|e| Failure {
        exit: EXIT_TRANSPORT,
        kind: "io",
        message: format!("cannot read the listening address: {e}"),
        task: None,
    })?;
    eprintln!(
        "listening on http://{addr}/ (any path); submit with --callback http://{addr}/hook. \
         A taskgate server needs --allow-private-callbacks to call a loopback address. Ctrl-C stops."
    );

    let state = Arc::new(ListenState {
        secrets,
        json: conn.json,
    });
    let app = axum::Router::new().fallback(receive).with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| Failure {
            exit: EXIT_TRANSPORT,
            kind: "io",
            message: format!("the webhook listener stopped: {e}"),
            task: None,
        })
}

async fn receive(
    State(state): State<Arc<ListenState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    if method != Method::POST {
        return (StatusCode::METHOD_NOT_ALLOWED, "POST only\n".to_owned());
    }
    let signed = SignedHeaders::from_lookup(|name| headers.get(name).and_then(|v| v.to_str().ok()));
    let verdict = webhook::verify_now(state.secrets.as_slice(), &signed, &body);
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let id = signed.id.unwrap_or("-");

    match verdict {
        Ok(()) => {
            if state.json {
                println!(
                    "{}",
                    json!({
                        "valid": true,
                        "path": uri.path(),
                        "webhookId": id,
                        "webhookTimestamp": signed.timestamp,
                        "body": parsed.clone().unwrap_or_else(|| Value::String(String::from_utf8_lossy(&body).into_owned())),
                    })
                );
            } else {
                let summary = parsed
                    .as_ref()
                    .and_then(|v| v.get("data"))
                    .map(|d| {
                        format!(
                            " · task {} {}",
                            d.get("taskId").and_then(Value::as_str).unwrap_or("?"),
                            d.get("state").and_then(Value::as_str).unwrap_or("?")
                        )
                    })
                    .unwrap_or_default();
                let pretty = parsed
                    .as_ref()
                    .and_then(|v| serde_json::to_string_pretty(v).ok())
                    .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
                println!(
                    "valid signature · POST {} · {id}{summary}\n{pretty}\n",
                    uri.path()
                );
            }
            (StatusCode::OK, "ok\n".to_owned())
        }
        Err(e) => {
            if state.json {
                println!(
                    "{}",
                    json!({"valid": false, "path": uri.path(), "webhookId": id, "error": e.to_string()})
                );
            } else {
                eprintln!("rejected POST {} · {id}: {e}", uri.path());
            }
            (
                StatusCode::UNAUTHORIZED,
                format!("invalid signature: {e}\n"),
            )
        }
    }
}
