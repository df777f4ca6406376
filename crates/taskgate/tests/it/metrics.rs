//! `GET /metrics`: after a known workload every counter, histogram count and gauge says exactly
//! what happened, by the labels docs/metrics.md names; the optional bearer token; queue depths
//! that are cluster-wide on PostgreSQL.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use taskgate_server::config::{Delays, FileConfig, MetricsToken};

use crate::support::*;

/// One sample of the text exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of an OpenMetrics/Prometheus text exposition, with label values unescaped.
/// Panics on a line that is not one, so a malformed exposition fails the test.
fn parse(text: &str) -> Vec<Sample> {
    assert!(text.trim_end().ends_with("# EOF"), "no EOF marker: {text}");
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let name = line[..name_end].to_owned();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(after) = rest.strip_prefix('{') {
            let mut chars = after.char_indices();
            let end = loop {
                // `}` or `,` or a label name up to `=`.
                let (i, c) = chars
                    .next()
                    .unwrap_or_else(|| panic!("unterminated {line:?}"));
                if c == '}' {
                    break i;
                }
                if c == ',' {
                    continue;
                }
                let mut key = String::from(c);
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line:?}");
                let mut value = String::new();
                loop {
                    let (_, c) = chars
                        .next()
                        .unwrap_or_else(|| panic!("unterminated {line:?}"));
                    match c {
                        '"' => break,
                        '\\' => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some(c) => value.push(c),
                            None => panic!("{line:?}"),
                        },
                        c => value.push(c),
                    }
                }
                labels.insert(key, value);
            };
            rest = &after[end + 1..];
        }
        let value = rest
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("no value {line:?}"));
        let value = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    samples
}

/// The exposition, parsed.
pub(crate) struct Scrape(Vec<Sample>);

impl Scrape {
    /// The value of `name` with exactly these labels; `None` when there is no such series.
    pub(crate) fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let found: Vec<&Sample> = self
            .0
            .iter()
            .filter(|s| s.name == name && s.labels == want)
            .collect();
        assert!(found.len() <= 1, "{name} {labels:?} appears twice");
        found.first().map(|s| s.value)
    }

    /// The sum of the series of `name` that carry at least these labels (0 when none does).
    pub(crate) fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Like `get`, asserting the series exists.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            let same: Vec<_> = self.0.iter().filter(|s| s.name == name).collect();
            panic!("no series {name} {labels:?}; series of that name: {same:?}")
        })
    }
}

async fn scrape_text(api: &Api) -> String {
    let resp = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    resp.text().await.unwrap()
}

async fn scrape(app: &TestApp) -> Scrape {
    scrape_api(&app.api).await
}

/// `GET /metrics` of the server `api` talks to, parsed (for servers run as child processes).
pub(crate) async fn scrape_api(api: &Api) -> Scrape {
    Scrape(parse(&scrape_text(api).await))
}

/// Scrapes until `cond` holds (counters move after the response that caused them: a delivery
/// is counted once its attempt is recorded, a queue depth is at most a second old).
async fn scrape_until(app: &TestApp, what: &str, cond: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = scrape(app).await;
        if cond(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never showed {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn with_worker_model(c: &mut taskgate_server::Config) {
    // `remote` is served by pull workers, and none runs: its tasks stay pending.
    c.models
        .extend(FileConfig::parse(WORKER_MODEL).unwrap().models.unwrap());
}

#[tokio::test]
async fn metrics_count_a_known_workload_by_model_state_fail_code_webhook_outcome_and_route() {
    let (hook, mut delivered) = callback_receiver().await;
    // The same receiver at a path it does not serve: 404, retried once, then failed for good.
    let broken_hook = hook.replace("/hook", "/missing");
    let app = TestApp::start_with(|c| {
        with_worker_model(c);
        c.webhooks.allow_private_callbacks = true;
        c.webhooks.retry_delays = Delays(vec![Duration::from_millis(50)]);
    })
    .await;
    let api = &app.api;

    // Before anything: configured models are there at 0.
    let s = scrape(&app).await;
    assert_eq!(
        s.value("taskgate_tasks_submitted_total", &[("model", "demo-image")]),
        0.0
    );
    assert_eq!(
        s.value("taskgate_tasks_pending", &[("model", "remote")]),
        0.0
    );

    // N = 5 successes (3 single submits, 2 in one batch), 2 with callbacks.
    let mut finals = Vec::new();
    for callback in [Some(&hook), Some(&broken_hook), None] {
        let mut body = json!({ "input": {} });
        if let Some(url) = callback {
            body["callback_url"] = json!(url);
        }
        let (status, created) = api.submit("echo", body).await;
        assert_eq!(status, StatusCode::OK, "{created}");
        finals.push(created["data"]["taskId"].as_str().unwrap().to_owned());
    }
    let (status, batch) = api
        .submit_batch(
            "echo",
            json!({ "tasks": [{ "input": {} }, { "input": {} }] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    for id in batch["data"]["taskIds"].as_array().unwrap() {
        finals.push(id.as_str().unwrap().to_owned());
    }
    // M = 2 failures, failCode GENERATION_FAILED.
    for _ in 0..2 {
        finals.push(api.submit_ok("echo", json!({ "fail": "boom" })).await);
    }
    // Held: one running (a long echo), two pending (no worker serves `remote`).
    let long = api.submit_ok("echo", json!({ "delay_ms": 600_000 })).await;
    for _ in 0..2 {
        api.submit_ok("remote", json!({})).await;
    }
    // One refusal on a matched route: an unknown model.
    let (status, _) = api.submit("no-such-model", json!({ "input": {} })).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for id in &finals {
        api.wait_final("echo", id, Duration::from_secs(20)).await;
    }
    api.wait_for("echo", &long, Duration::from_secs(20), |d| {
        d["state"] == "processing"
    })
    .await;

    // Known requests on routes nobody else calls.
    for _ in 0..3 {
        let resp = api
            .request(reqwest::Method::GET, "/api/v1/models")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    for path in ["/nope", "/api/v1/statusTask"] {
        let resp = api
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }

    // K = 3 webhook attempts: one delivered, and the broken one failing twice (then given up).
    delivered.recv().await.unwrap();
    let s = scrape_until(
        &app,
        "the broken callback given up and the held tasks counted",
        |s| {
            s.get("taskgate_webhook_attempts_total", &[("outcome", "failed")]) == Some(1.0)
                && s.get(
                    "taskgate_webhook_attempts_total",
                    &[("outcome", "delivered")],
                ) == Some(1.0)
                && s.get("taskgate_tasks_pending", &[("model", "remote")]) == Some(2.0)
                && s.get("taskgate_tasks_running", &[("model", "echo")]) == Some(1.0)
        },
    )
    .await;
    let attempts = |outcome| s.value("taskgate_webhook_attempts_total", &[("outcome", outcome)]);
    assert_eq!(attempts("delivered"), 1.0);
    assert_eq!(attempts("retrying"), 1.0);
    assert_eq!(attempts("failed"), 1.0);
    assert_eq!(attempts("deferred"), 0.0);
    assert_eq!(
        s.value("taskgate_webhook_delivery_latency_seconds_count", &[]),
        1.0
    );
    assert_eq!(s.value("taskgate_tasks_pending", &[("model", "echo")]), 0.0);
    assert_eq!(
        s.value("taskgate_tasks_running", &[("model", "remote")]),
        0.0
    );
    assert_eq!(
        s.value("taskgate_tasks_pending", &[("model", "demo-image")]),
        0.0
    );

    // The held running task is cancelled: a final state written by the API, not by an attempt.
    let (status, body) = api.cancel("echo", &long).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let s = scrape(&app).await;
    let submitted = |model| s.value("taskgate_tasks_submitted_total", &[("model", model)]);
    assert_eq!(submitted("echo"), 8.0);
    assert_eq!(submitted("remote"), 2.0);
    assert_eq!(submitted("demo-image"), 0.0);
    let finished = |state, code| {
        s.value(
            "taskgate_tasks_finished_total",
            &[("model", "echo"), ("state", state), ("fail_code", code)],
        )
    };
    assert_eq!(finished("success", ""), 5.0);
    assert_eq!(finished("failed", "GENERATION_FAILED"), 2.0);
    assert_eq!(finished("failed", "CANCELLED"), 1.0);
    assert_eq!(finished("failed", "other"), 0.0);
    assert_eq!(
        s.value(
            "taskgate_backend_errors_total",
            &[
                ("model", "echo"),
                ("kind", "fatal"),
                ("fail_code", "GENERATION_FAILED")
            ]
        ),
        2.0
    );
    assert_eq!(
        s.get(
            "taskgate_backend_errors_total",
            &[
                ("model", "echo"),
                ("kind", "retryable"),
                ("fail_code", "GENERATION_FAILED")
            ]
        ),
        None,
        "no retryable error happened"
    );
    let echo = [("model", "echo")];
    // Every echo task started once; the cancelled attempt never reported an outcome.
    assert_eq!(
        s.value("taskgate_task_queue_wait_seconds_count", &echo),
        8.0
    );
    assert_eq!(s.value("taskgate_task_run_seconds_count", &echo), 7.0);
    assert_eq!(
        s.value("taskgate_task_submit_to_final_seconds_count", &echo),
        8.0
    );
    assert_eq!(
        s.value(
            "taskgate_task_queue_wait_seconds_count",
            &[("model", "remote")]
        ),
        0.0
    );
    // A histogram's +Inf bucket holds every observation.
    assert_eq!(
        s.value(
            "taskgate_task_run_seconds_bucket",
            &[("model", "echo"), ("le", "+Inf")]
        ),
        7.0
    );
    assert!(s.value("taskgate_task_run_seconds_sum", &echo) >= 0.0);
    let requests = |route, status| {
        s.value(
            "taskgate_http_requests_total",
            &[("route", route), ("status", status)],
        )
    };
    assert_eq!(requests("/api/v1/models", "200"), 3.0);
    assert_eq!(requests("unmatched", "404"), 2.0);
    assert_eq!(requests("/api/v1/generateTask/{model}", "200"), 8.0);
    assert_eq!(requests("/api/v1/generateTask/{model}", "404"), 1.0);
    assert_eq!(requests("/api/v1/generateTasks/{model}", "200"), 1.0);
    assert_eq!(requests("/api/v1/cancelTask/{model}", "200"), 1.0);
    assert!(requests("/api/v1/statusTask/{model}", "200") >= 8.0);
    assert_eq!(
        s.value(
            "taskgate_http_request_duration_seconds_count",
            &[("route", "/api/v1/models")]
        ),
        3.0
    );
    assert_eq!(
        s.value(
            "taskgate_http_request_duration_seconds_count",
            &[("route", "/api/v1/generateTask/{model}")]
        ),
        9.0
    );

    // No series names a task or a tenant: labels are models, states, codes, routes, statuses.
    let text = scrape_text(&app.api).await;
    for id in finals.iter().chain([&long]) {
        assert!(
            !text.contains(id.as_str()),
            "task id {id} leaked into the metrics"
        );
    }
    for sample in parse(&text) {
        for key in sample.labels.keys() {
            assert!(
                [
                    "model",
                    "state",
                    "fail_code",
                    "kind",
                    "outcome",
                    "route",
                    "status",
                    "le"
                ]
                .contains(&key.as_str()),
                "unexpected label {key} on {sample:?}"
            );
        }
    }
}

#[tokio::test]
async fn metrics_ask_for_the_bearer_token_when_one_is_set() {
    const TOKEN: &str = "metrics-token-0123456789";
    let app = TestApp::start_with(|c| {
        c.server.metrics_token = Some(MetricsToken(TOKEN.to_owned()));
    })
    .await;
    let url = format!("{}/metrics", app.api.base);
    let http = &app.api.http;

    let (status, body) = envelope(http.get(&url).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_code(&body), "missing_api_key", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("/metrics"),
        "{body}"
    );

    // The API key is not the metrics token.
    let (status, body) = envelope(http.get(&url).bearer_auth(API_KEY).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(error_code(&body), "invalid_api_key", "{body}");

    let resp = http.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    let s = Scrape(parse(&text));
    assert_eq!(
        s.value("taskgate_tasks_submitted_total", &[("model", "echo")]),
        0.0
    );
    // The refusals were counted on the route, like any request.
    assert_eq!(
        s.value(
            "taskgate_http_requests_total",
            &[("route", "/metrics"), ("status", "401")]
        ),
        2.0
    );
}

#[tokio::test]
async fn a_short_metrics_token_is_refused_at_start_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = taskgate_server::Config::new(dir.path());
    config.server.metrics_token = Some(MetricsToken("short".into()));
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("metrics_token"), "{err}");
}

#[tokio::test]
async fn queue_depths_on_postgresql_count_every_nodes_tasks() {
    let Some(db) = create_db("metrics: cluster-wide queue depths").await else {
        return;
    };
    let a = TestApp::node_on(&db, with_worker_model).await;
    let b = TestApp::node_on(&db, with_worker_model).await;
    for _ in 0..3 {
        a.api.submit_ok("remote", json!({})).await;
    }
    let s = scrape_until(&b, "node A's tasks pending on node B", |s| {
        s.get("taskgate_tasks_pending", &[("model", "remote")]) == Some(3.0)
    })
    .await;
    assert_eq!(
        s.value("taskgate_tasks_running", &[("model", "remote")]),
        0.0
    );
    // Counters are the node's own: B accepted none of them.
    assert_eq!(
        s.value("taskgate_tasks_submitted_total", &[("model", "remote")]),
        0.0
    );
    let s = scrape(&a).await;
    assert_eq!(
        s.value("taskgate_tasks_submitted_total", &[("model", "remote")]),
        3.0
    );
    assert_eq!(
        s.value("taskgate_tasks_pending", &[("model", "remote")]),
        3.0
    );
    drop((a, b));
    db.drop_db().await;
}

#[tokio::test]
async fn a_fail_code_a_pull_worker_makes_up_is_counted_as_other() {
    use taskgate_client::proto::{WorkerFail, WorkerHeartbeat};
    let app = TestApp::start_with(with_worker_model).await;
    let token = worker_token(&app.data_dir, None).await;
    let worker = taskgate_client::WorkerClient::new(&app.api.base, token).unwrap();
    let id = app.api.submit_ok("remote", json!({})).await;
    let task = worker
        .claim(&["remote"], Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(task.task_id, id);
    let beat = WorkerHeartbeat {
        lease_token: task.lease_token.clone(),
        progress: None,
        logs: Vec::new(),
    };
    worker.heartbeat(&id, &beat).await.unwrap();
    // A code that would be a label value of its own, and a malformed one at that.
    let made_up = "OOM_\"}\nevil=\"1";
    let fail = WorkerFail {
        lease_token: task.lease_token,
        fail_code: Some(made_up.to_owned()),
        fail_msg: "out of memory".to_owned(),
        retryable: false,
    };
    worker.fail(&id, &fail).await.unwrap();
    let data = app
        .api
        .wait_final("remote", &id, Duration::from_secs(10))
        .await;
    assert_eq!(data["state"], "failed", "{data}");

    let text = scrape_text(&app.api).await;
    assert!(
        !text.contains("OOM_"),
        "the made-up code became a label value:\n{text}"
    );
    let s = Scrape(parse(&text));
    let remote = |kind: Option<&'static str>| {
        let mut labels = vec![("model", "remote")];
        match kind {
            Some(kind) => labels.extend([("kind", kind), ("fail_code", "other")]),
            None => labels.extend([("state", "failed"), ("fail_code", "other")]),
        }
        labels
    };
    assert_eq!(s.value("taskgate_tasks_finished_total", &remote(None)), 1.0);
    assert_eq!(
        s.value("taskgate_backend_errors_total", &remote(Some("fatal"))),
        1.0
    );
    assert_eq!(
        s.value(
            "taskgate_task_queue_wait_seconds_count",
            &[("model", "remote")]
        ),
        1.0
    );
    assert_eq!(
        s.value("taskgate_task_run_seconds_count", &[("model", "remote")]),
        1.0
    );
}
