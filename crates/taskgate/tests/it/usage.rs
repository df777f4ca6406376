//! `GET /api/v1/usage` and `taskgate keys usage`: a known workload through HTTP, then the
//! report's figures checked against it exactly, the run time against the attempts the task
//! records show (`statusTask …&attempts=true`), another tenant's tasks never counted.

use std::collections::BTreeMap;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::support::*;

const DAY_MS: i64 = 86_400_000;

/// echo (builtin), broken (a command exiting 3: failed, not retried) and busy (exits 75 once,
/// then succeeds: two attempts).
fn models(counter: &str) -> String {
    format!(
        "[models.echo]\nbackend = \"builtin\"\nbuiltin = \"echo\"\n{}{}",
        command_model("broken", "fail.sh", &[], "max_attempts = 3"),
        command_model("busy", "tempfail.sh", &[counter, "1"], "max_attempts = 3"),
    )
}

async fn usage(api: &Api, query: &[(&str, &str)]) -> (StatusCode, Value) {
    envelope(
        api.request(reqwest::Method::GET, "/api/v1/usage")
            .query(query)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// A finished task as its records show it: model, createTime, and the ms its attempts ran.
struct Ran {
    model: &'static str,
    create_time: i64,
    run_ms: i64,
    attempts: usize,
}

async fn run(api: &Api, model: &'static str, input: Value) -> Ran {
    let id = api.submit_ok(model, input).await;
    api.wait_final(model, &id, std::time::Duration::from_secs(30))
        .await;
    let (_, status) = envelope(
        api.request(
            reqwest::Method::GET,
            &format!("/api/v1/statusTask/{model}?taskId={id}&attempts=true"),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    let data = &status["data"];
    let attempts = data["attempts"].as_array().unwrap();
    let run_ms = attempts
        .iter()
        .map(|a| a["endedAt"].as_i64().unwrap() - a["startedAt"].as_i64().unwrap())
        .sum();
    Ran {
        model,
        create_time: data["createTime"].as_i64().unwrap(),
        run_ms,
        attempts: attempts.len(),
    }
}

/// The workload of `api`'s tenant: 3 echo successes, 2 broken failures, 1 busy success after a
/// retry.
async fn workload(api: &Api) -> Vec<Ran> {
    let mut ran = Vec::new();
    for i in 0..3 {
        ran.push(run(api, "echo", json!({"prompt": format!("p{i}")})).await);
    }
    for _ in 0..2 {
        ran.push(run(api, "broken", json!({})).await);
    }
    ran.push(run(api, "busy", json!({})).await);
    ran
}

fn ms(seconds: &Value) -> i64 {
    (seconds.as_f64().unwrap() * 1000.0).round() as i64
}

fn utc_date(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
    humantime::format_rfc3339_seconds(t).to_string()[..10].to_owned()
}

#[tokio::test]
async fn usage_figures_match_a_known_workload_per_model_and_per_day_and_only_the_tenants_own() {
    let counter = tempfile::tempdir().unwrap();
    let counter = counter.path().join("runs");
    let app = TestApp::start_with_models(&models(counter.to_str().unwrap())).await;
    let other = app
        .api
        .with_key(&create_key(&app.data_dir, "other", None).await.key);
    let ran = workload(&app.api).await;
    let theirs = [
        run(&other, "echo", json!({})).await,
        run(&other, "echo", json!({})).await,
    ];
    let busy = ran.iter().find(|r| r.model == "busy").unwrap();
    assert_eq!(busy.attempts, 2, "its retried attempt counts too");

    let (status, body) = usage(&app.api, &[]).await;

    assert_eq!(status, StatusCode::OK, "{body}");
    let data = &body["data"];
    assert_eq!(data["groupBy"], "model");
    assert_eq!(
        data["to"].as_i64().unwrap() - data["from"].as_i64().unwrap(),
        30 * DAY_MS,
        "the default window is the last 30 days"
    );
    let mut expected_ms: BTreeMap<&str, i64> = BTreeMap::new();
    for r in &ran {
        *expected_ms.entry(r.model).or_default() += r.run_ms;
    }
    let rows = data["rows"].as_array().unwrap();
    let models: Vec<&str> = rows.iter().map(|r| r["model"].as_str().unwrap()).collect();
    assert_eq!(
        models,
        ["broken", "busy", "echo"],
        "sorted, one row per model"
    );
    for (row, (success, failed)) in rows.iter().zip([(0, 2), (1, 0), (3, 0)]) {
        let model = row["model"].as_str().unwrap();
        assert_fields(
            row,
            &[
                "model",
                "success",
                "failed",
                "pending",
                "processing",
                "total",
                "runSeconds",
            ],
        );
        assert_eq!(
            (
                &row["success"],
                &row["failed"],
                &row["pending"],
                &row["processing"]
            ),
            (&json!(success), &json!(failed), &json!(0), &json!(0)),
            "{row}"
        );
        assert_eq!(row["total"], success + failed, "{row}");
        assert_eq!(
            ms(&row["runSeconds"]),
            expected_ms[model],
            "{model}: the run time is the sum of its attempts' as statusTask shows them: {row}"
        );
    }
    let total = &data["total"];
    assert_eq!(
        (&total["success"], &total["failed"], &total["total"]),
        (&json!(4), &json!(2), &json!(6))
    );
    assert_eq!(
        ms(&total["runSeconds"]),
        ran.iter().map(|r| r.run_ms).sum::<i64>()
    );

    let (_, by_day) = usage(&app.api, &[("groupBy", "day")]).await;
    let days = by_day["data"]["rows"].as_array().unwrap();
    let dates: std::collections::BTreeSet<String> =
        ran.iter().map(|r| utc_date(r.create_time)).collect();
    assert_eq!(
        days.iter()
            .map(|d| d["day"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>(),
        dates.into_iter().collect::<Vec<_>>(),
        "one row per UTC date of creation (today's)"
    );
    assert_eq!(
        by_day["data"]["total"], *total,
        "the same tasks, grouped otherwise"
    );

    let (_, theirs_body) = usage(&other, &[]).await;
    let their_rows = theirs_body["data"]["rows"].as_array().unwrap();
    assert_eq!(their_rows.len(), 1, "{theirs_body}");
    assert_eq!(
        (
            &their_rows[0]["model"],
            &their_rows[0]["success"],
            &their_rows[0]["total"]
        ),
        (&json!("echo"), &json!(2), &json!(2))
    );
    assert_eq!(
        ms(&their_rows[0]["runSeconds"]),
        theirs.iter().map(|r| r.run_ms).sum::<i64>()
    );

    // Windows by creation time, [from, to), in either form.
    let first = ran.iter().map(|r| r.create_time).min().unwrap();
    let last = ran.iter().map(|r| r.create_time).max().unwrap();
    let before = first.to_string();
    let (_, none) = usage(&app.api, &[("to", before.as_str())]).await;
    assert_eq!(none["data"]["rows"], json!([]), "to is exclusive: {none}");
    assert_eq!(none["data"]["total"]["total"], 0);
    let after = (last + 1).to_string();
    let (_, none) = usage(&app.api, &[("from", after.as_str())]).await;
    assert_eq!(none["data"]["total"]["total"], 0, "{none}");
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(first as u64);
    let rfc = humantime::format_rfc3339_millis(t).to_string();
    let (_, from_first) = usage(&app.api, &[("from", rfc.as_str()), ("to", after.as_str())]).await;
    assert_eq!(
        from_first["data"]["from"], first,
        "RFC 3339 reads to the ms"
    );
    assert_eq!(from_first["data"]["total"], *total, "from is inclusive");
}

#[tokio::test]
async fn bad_usage_parameters_get_a_400_envelope_naming_them() {
    let app = TestApp::start().await;
    for (query, says) in [
        (
            vec![("groupBy", "tenant")],
            "groupBy must be one of model, day, key",
        ),
        (vec![("from", "yesterday")], "from must be an RFC 3339 time"),
        (
            vec![("to", "2025-02-30T00:00:00Z")],
            "to must be an RFC 3339 time",
        ),
        (vec![("from", "2000"), ("to", "1000")], "must be before to"),
        (
            vec![("from", "2024-01-01"), ("to", "2025-06-01")],
            "longer than 366 days",
        ),
        (vec![("since", "1")], "unknown query parameter \"since\""),
        (vec![("from", "1"), ("from", "2")], "given twice"),
    ] {
        let (status, body) = usage(&app.api, &query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query:?}: {body}");
        assert_eq!(error_code(&body), "invalid_input", "{body}");
        assert!(
            body["message"].as_str().unwrap().contains(says),
            "{query:?}: {body}"
        );
    }
    let (status, _) = envelope(
        reqwest::Client::new()
            .get(format!("http://{}/api/v1/usage", app.addr))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn keys_usage_prints_the_same_figures_as_the_endpoint_from_the_store() {
    let counter = tempfile::tempdir().unwrap();
    let counter = counter.path().join("runs");
    let app = TestApp::start_with_models(&models(counter.to_str().unwrap())).await;
    let acme = app
        .api
        .with_key(&create_key(&app.data_dir, "acme", None).await.key);
    let ran = workload(&acme).await;
    let from = (ran[0].create_time - 1).to_string();
    let to = (ran.last().unwrap().create_time + 1).to_string();
    let dir = app.data_dir.to_str().unwrap().to_owned();
    let cli = |extra: &[&str]| {
        let mut args = vec![
            "keys",
            "usage",
            "--tenant",
            "acme",
            "--data-dir",
            dir.as_str(),
        ];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };

    for group_by in ["model", "day"] {
        let (_, endpoint) = usage(
            &acme,
            &[("from", &from), ("to", &to), ("groupBy", group_by)],
        )
        .await;
        let args = cli(&[
            "--from",
            &from,
            "--to",
            &to,
            "--group-by",
            group_by,
            "--json",
        ]);
        let out = taskgate(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(printed, endpoint["data"], "{group_by}");
    }

    let args = cli(&["--from", &from, "--to", &to]);
    let out = taskgate(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let echo = text
        .lines()
        .find(|l| l.starts_with("echo "))
        .unwrap_or_else(|| panic!("{text}"));
    let cols: Vec<&str> = echo.split_whitespace().collect();
    assert_eq!(
        cols[1..6],
        ["3", "0", "0", "0", "3"],
        "success failed pending processing total: {text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("(total)") && l.split_whitespace().nth(5) == Some("6")),
        "{text}"
    );

    let args = cli(&["--group-by", "key", "--json"]);
    let out = taskgate(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let by_key: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(by_key["groupBy"], "key", "{by_key}");
    let out = taskgate(&[
        "keys",
        "usage",
        "--tenant",
        "nobody",
        "--data-dir",
        dir.as_str(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no tenant named \"nobody\""));
}

#[tokio::test]
async fn usage_per_key_counts_each_keys_own_tasks() {
    let app = TestApp::start().await;
    let first = create_key(&app.data_dir, "team", None).await;
    let second = create_key(&app.data_dir, "team-ci", Some("team")).await;
    let (a, b) = (app.api.with_key(&first.key), app.api.with_key(&second.key));
    for _ in 0..3 {
        run(&a, "echo", json!({})).await;
    }
    run(&b, "echo", json!({})).await;

    let (status, body) = usage(&a, &[("groupBy", "key")]).await;

    assert_eq!(status, StatusCode::OK, "{body}");
    let rows = body["data"]["rows"].as_array().unwrap();
    let per_key: BTreeMap<&str, i64> = rows
        .iter()
        .map(|r| (r["key"].as_str().unwrap(), r["total"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        per_key,
        BTreeMap::from([(first.id.as_str(), 3), (second.id.as_str(), 1)]),
        "{body}"
    );
    // The bootstrap key's tenant is another: none of its figures, none of theirs.
    let (_, mine) = usage(&app.api, &[("groupBy", "key")]).await;
    assert_eq!(mine["data"]["rows"].as_array().unwrap().len(), 0, "{mine}");
}
