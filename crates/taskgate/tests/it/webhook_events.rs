//! Webhook events beyond the final state (`webhook_events`: start, progress, completed), each a
//! signed delivery through the outbox, against a real local receiver.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::StatusCode;
use serde_json::{json, Value};
use taskgate_proto::webhook::{verify_now, Secret, SignedHeaders};

use crate::support::*;
use crate::webhooks::{deliveries, header, start_app, webhook_secret, Received, Receiver};

const LONG: Duration = Duration::from_secs(30);

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn event(r: &Received) -> &str {
    header(r, "taskgate-event")
}

fn payload(r: &Received) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

/// Checks the Standard Webhooks signature with the protocol crate's verifier (the SDK's).
fn assert_signed(secret: &str, r: &Received) {
    let secrets = [Secret::parse(secret).unwrap()];
    let signed =
        SignedHeaders::from_lookup(|name| r.headers.get(name).and_then(|v| v.to_str().ok()));
    if let Err(e) = verify_now(&secrets, &signed, &r.body) {
        panic!("{} delivery does not verify: {e}", event(r));
    }
}

/// The events of a task's deliveries, oldest first, as `GET /api/v1/webhookDeliveries` lists
/// them.
async fn events(api: &Api, task_id: &str) -> Vec<String> {
    deliveries(api, task_id)
        .await
        .iter()
        .map(|d| d["event"].as_str().unwrap().to_owned())
        .collect()
}

async fn submit_with_events(api: &Api, model: &str, url: &str, events: Value) -> String {
    let (status, body) = api
        .submit(
            model,
            json!({ "callback_url": url, "webhook_events": events, "input": {} }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"]["taskId"].as_str().unwrap().to_owned()
}

/// A call to the pull-worker API: its status, envelope, and when it was sent and answered.
async fn worker_call(
    api: &Api,
    token: &str,
    path: &str,
    body: Value,
) -> (StatusCode, Value, i64, i64) {
    let sent = unix_ms();
    let resp = api
        .http
        .post(format!("{}/api/v1/worker/{path}", api.base))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(resp).await;
    (status, body, sent, unix_ms())
}

#[tokio::test]
async fn a_worker_task_sends_one_start_progress_at_most_once_a_second_and_one_completed_all_signed()
{
    let mut rx = Receiver::start(vec![]).await;
    let app = start_app(|c| {
        let file = taskgate_server::config::FileConfig::parse(WORKER_MODEL).unwrap();
        c.models = file.models.unwrap();
    })
    .await;
    let token = worker_token(&app.data_dir, None).await;
    let secret = webhook_secret(&app.api).await["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let id = submit_with_events(
        &app.api,
        "remote",
        &rx.url,
        json!(["start", "progress", "completed"]),
    )
    .await;

    let (status, claim, claim_sent, claim_answered) = worker_call(
        &app.api,
        &token,
        "claim",
        json!({ "models": ["remote"], "waitMs": 5000 }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{claim}");
    assert_eq!(claim["data"]["taskId"], id.as_str());
    let lease = claim["data"]["leaseToken"].as_str().unwrap().to_owned();

    // Progress as fast as the worker API answers, until two progress deliveries are written:
    // more than a second of reports, most of which the limit holds back.
    let mut sent: Vec<(f64, i64, i64)> = Vec::new();
    for i in 1.. {
        let progress = f64::from(i) / 100_000.0;
        let (status, body, before, after) = worker_call(
            &app.api,
            &token,
            &format!("tasks/{id}/heartbeat"),
            json!({ "leaseToken": lease, "progress": progress }),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        sent.push((progress, before, after));
        let written = events(&app.api, &id).await;
        if written.iter().filter(|e| *e == "progress").count() >= 2 {
            break;
        }
        assert!(
            i < 99_999,
            "two progress deliveries never came: {written:?}"
        );
    }

    let resp = app
        .api
        .http
        .put(format!(
            "{}/api/v1/worker/tasks/{id}/outputs/out.json",
            app.api.base
        ))
        .bearer_auth(&token)
        .query(&[("leaseToken", &lease)])
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (status, body, ..) = worker_call(
        &app.api,
        &token,
        &format!("tasks/{id}/complete"),
        json!({ "leaseToken": lease, "outputs": ["out.json"] }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.api.wait_final("remote", &id, LONG).await;

    // The outbox, in the order the events happened.
    let listed = deliveries(&app.api, &id).await;
    let kinds: Vec<&str> = listed
        .iter()
        .map(|d| d["event"].as_str().unwrap())
        .collect();
    let progress_count = kinds.len() - 2;
    assert_eq!(kinds[0], "start", "{kinds:?}");
    assert_eq!(kinds[kinds.len() - 1], "completed", "{kinds:?}");
    assert!(
        kinds[1..kinds.len() - 1].iter().all(|k| *k == "progress"),
        "{kinds:?}"
    );
    // Never two progress deliveries of the task within a second...
    let progress_times: Vec<i64> = listed[1..=progress_count]
        .iter()
        .map(|d| d["createTime"].as_i64().unwrap())
        .collect();
    assert!(
        progress_times.windows(2).all(|w| w[1] - w[0] >= 1000),
        "{progress_times:?}"
    );
    // ...however many reports there were.
    let (first_sent, last_answered) = (sent[0].1, sent[sent.len() - 1].2);
    assert!(sent.len() > progress_count, "{} reports", sent.len());
    assert!(progress_count as i64 <= 1 + (last_answered - first_sent) / 1000);

    // Every delivery arrives, signed, naming its event, with the status of its moment.
    let got = rx.wait_for(listed.len(), LONG).await;
    assert_eq!(got.len(), listed.len(), "nothing is sent twice here");
    for r in &got {
        assert_signed(&secret, r);
        assert!(header(r, "webhook-id").starts_with("whk_"));
        let listed_as = listed
            .iter()
            .find(|d| d["id"] == header(r, "webhook-id"))
            .unwrap();
        assert_eq!(
            event(r),
            format!("task.{}", listed_as["event"].as_str().unwrap())
        );
    }
    let of = |name: &str| -> Vec<&Received> { got.iter().filter(|r| event(r) == name).collect() };
    let start = of("task.start");
    assert_eq!(start.len(), 1);
    let data = &payload(start[0])["data"];
    assert_fields(data, &["taskId", "state", "createTime"]);
    assert_eq!(
        (data["taskId"].as_str(), data["state"].as_str()),
        (Some(id.as_str()), Some("processing"))
    );
    let started = listed[0]["createTime"].as_i64().unwrap();
    assert!((claim_sent..=claim_answered).contains(&started));

    let progress = of("task.progress");
    assert_eq!(progress.len(), progress_count);
    for r in progress {
        let data = &payload(r)["data"];
        assert_fields(data, &["taskId", "state", "createTime", "progress"]);
        assert_eq!(data["state"], "processing");
        // The value of the report that made it, which was being answered at its createTime.
        let value = data["progress"].as_f64().unwrap();
        let (_, before, after) = sent.iter().find(|(p, ..)| *p == value).unwrap();
        let written = listed
            .iter()
            .find(|d| d["id"] == header(r, "webhook-id"))
            .unwrap()["createTime"]
            .as_i64()
            .unwrap();
        assert!(
            (*before..=*after).contains(&written),
            "{value} at {written}"
        );
    }
    assert_eq!(
        payload(of("task.progress")[0])["data"]["progress"],
        sent[0].0
    );

    let completed = of("task.completed");
    assert_eq!(completed.len(), 1);
    let (_, status) = app.api.status("remote", &id).await;
    assert_eq!(
        payload(completed[0]),
        status,
        "the final state, as statusTask gives it"
    );
}

#[tokio::test]
async fn without_webhook_events_or_with_completed_alone_only_the_final_state_is_sent() {
    let mut rx = Receiver::start(vec![]).await;
    let app = start_app(|_| {}).await;
    let (status, body) = app
        .api
        .submit("echo", json!({ "callback_url": rx.url, "input": {} }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let default = body["data"]["taskId"].as_str().unwrap().to_owned();
    let completed = submit_with_events(&app.api, "echo", &rx.url, json!(["completed"])).await;
    for id in [&default, &completed] {
        app.api.wait_final("echo", id, LONG).await;
    }
    // Both final now, so any start row would be listed already.
    assert_eq!(events(&app.api, &default).await, ["completed"]);
    assert_eq!(events(&app.api, &completed).await, ["completed"]);
    let got = rx.wait_for(2, LONG).await;
    for r in &got {
        assert_eq!(event(r), "task.completed");
        let data = &payload(r)["data"];
        let (_, status) = app
            .api
            .status("echo", data["taskId"].as_str().unwrap())
            .await;
        assert_eq!(payload(r), status);
    }
}

#[tokio::test]
async fn a_task_that_asked_for_start_alone_gets_a_start_and_no_final_state() {
    let mut rx = Receiver::start(vec![]).await;
    let app = start_app(|_| {}).await;
    let id = submit_with_events(&app.api, "echo", &rx.url, json!(["start"])).await;
    assert_eq!(
        app.api.wait_final("echo", &id, LONG).await["state"],
        "success"
    );
    let got = rx.wait_for(1, LONG).await;
    assert_eq!(event(&got[0]), "task.start");
    assert_eq!(payload(&got[0])["data"]["state"], "processing");
    let secret = webhook_secret(&app.api).await["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_signed(&secret, &got[0]);
    assert_eq!(events(&app.api, &id).await, ["start"]);
}

#[tokio::test]
async fn bad_webhook_events_are_refused_with_a_message_naming_the_problem() {
    let app = start_app(|_| {}).await;
    let url = "http://127.0.0.1:9/hook";
    let cases = [
        (json!("start"), "must be an array of event names"),
        (json!([]), "omit it for the default"),
        (
            json!(["start", 3]),
            "webhook_events[1] must be an event name",
        ),
        (
            json!(["begin"]),
            "webhook_events[0] is \"begin\", which is not an event",
        ),
        (
            json!(["progress", "progress"]),
            "names \"progress\" more than once",
        ),
    ];
    for (events, needle) in cases {
        let (status, body) = app
            .api
            .submit(
                "echo",
                json!({ "callback_url": url, "webhook_events": events, "input": {} }),
            )
            .await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, &[needle]);
    }
    // Events go to the callback URL: none, or one dropped by request_type "async", is refused.
    for body in [
        json!({ "webhook_events": ["start"], "input": {} }),
        json!({ "request_type": "async", "callback_url": url, "webhook_events": ["start"], "input": {} }),
    ] {
        let (status, body) = app.api.submit("echo", body).await;
        assert_error(
            status,
            &body,
            StatusCode::BAD_REQUEST,
            &["webhook_events needs a callback_url"],
        );
    }
    // A batch checks each item alike.
    let (status, body) = app
        .api
        .submit_batch(
            "echo",
            json!({ "tasks": [
                { "callback_url": url, "webhook_events": ["start"], "input": {} },
                { "callback_url": url, "webhook_events": ["stop"], "input": {} },
            ] }),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        &["tasks[1]", "\"stop\""],
    );
}
