//! Retention: finished tasks' files, then records, are deleted after their configured times by
//! the background sweeper; live tasks and owed callbacks are never touched.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::support::*;

const LONG: Duration = Duration::from_secs(30);

#[tokio::test]
async fn finished_tasks_lose_their_files_then_their_records() {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let models = format!(
        "{}\n[models.echo]\nbackend = \"builtin\"\nbuiltin = \"echo\"\n\n[models.demo-image]\nbackend = \"builtin\"\nbuiltin = \"demo-image\"\n",
        command_model(
            "slow",
            "gate.sh",
            &[gate.to_str().unwrap(), dir.path().to_str().unwrap()],
            ""
        )
    );
    let file = taskgate_server::config::FileConfig::parse(&models).unwrap();
    let app = TestApp::start_with(move |c| {
        c.models = file.models.unwrap();
        c.server.file_retention = Duration::from_secs(1);
        c.server.record_retention = Duration::from_secs(3);
    })
    .await;
    // Two finished tasks (their outputs kept in the database or as files) and a live one.
    let small = app.api.submit_ok("echo", json!({"prompt": "hi"})).await;
    let large = app
        .api
        .submit_ok("demo-image", json!({"width": 512, "height": 512}))
        .await;
    let live = app.api.submit_ok("slow", json!({})).await;
    let mut urls = Vec::new();
    for (model, id) in [("echo", &small), ("demo-image", &large)] {
        let data = app.api.wait_final(model, id, LONG).await;
        assert_eq!(data["state"], "success", "{data}");
        let url = result_urls(&data).pop().unwrap();
        assert_eq!(fetch_url(&url).await.0, StatusCode::OK, "{url}");
        urls.push(url);
    }

    // Files go first; the records still answer.
    for url in &urls {
        wait_until(LONG, &format!("{url} to be deleted"), || async {
            fetch_url(url).await.0 == StatusCode::NOT_FOUND
        })
        .await;
    }
    let (status, body) = app.api.status("echo", &small).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"]["state"], "success");

    // Then the records: statusTask answers 404 as for a task that never existed.
    for (model, id) in [("echo", &small), ("demo-image", &large)] {
        wait_until(
            LONG,
            &format!("task {id}'s record to be deleted"),
            || async { app.api.status(model, id).await.0 == StatusCode::NOT_FOUND },
        )
        .await;
        let (status, body) = app.api.status(model, id).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, &[id]);
    }
    // The running task is untouched, and finishes normally.
    let (status, body) = app.api.status("slow", &live).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    std::fs::write(&gate, "").unwrap();
    let data = app.api.wait_final("slow", &live, LONG).await;
    assert_eq!(data["state"], "success");
}

#[tokio::test]
async fn a_record_that_owes_a_callback_is_kept_until_it_is_settled() {
    // A receiver that refuses connections: the callback stays owed (retried an hour later).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    let app = TestApp::start_with(|c| {
        c.server.file_retention = Duration::from_millis(200);
        c.server.record_retention = Duration::from_millis(400);
        c.webhooks.allow_private_callbacks = true;
        c.webhooks.retry_delays = taskgate_server::config::Delays(vec![Duration::from_secs(3600)]);
    })
    .await;
    let (status, body) = app
        .api
        .submit("echo", json!({"input": {}, "callback_url": url}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let owed = body["data"]["taskId"].as_str().unwrap().to_owned();
    app.api.wait_final("echo", &owed, LONG).await;
    // Completed after the owed one: the sweep that deletes it has walked past the owed one,
    // whose retention had ended by then.
    let plain = app.api.submit_ok("echo", json!({})).await;
    wait_until(LONG, "the plain task's record to be deleted", || async {
        app.api.status("echo", &plain).await.0 == StatusCode::NOT_FOUND
    })
    .await;
    let deliveries = app
        .api
        .http
        .get(format!("{}/api/v1/webhookDeliveries", app.api.base))
        .query(&[("taskId", owed.as_str())])
        .bearer_auth(&app.api.key)
        .send()
        .await
        .unwrap();
    let (status, body) = envelope(deliveries).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app.api.status("echo", &owed).await;
    assert_eq!(status, StatusCode::OK, "the owed task was deleted: {body}");
    assert_eq!(body["data"]["state"], "success");
}

#[tokio::test]
async fn two_nodes_sweeping_one_postgres_database_delete_every_record_once() {
    let Some(db) = create_db("retention across PostgreSQL nodes").await else {
        return;
    };
    let short = |c: &mut taskgate_server::Config| {
        c.server.file_retention = Duration::from_millis(300);
        c.server.record_retention = Duration::from_millis(600);
    };
    let node_a = TestApp::node_on(&db, short).await;
    let node_b = TestApp::node_on(&db, short).await;
    // More than one batch (200), submitted through both nodes.
    let mut ids = Vec::new();
    for i in 0..450 {
        let node = if i % 2 == 0 { &node_a } else { &node_b };
        ids.push(node.api.submit_ok("echo", json!({ "n": i })).await);
    }
    let last = ids.last().unwrap().clone();
    node_a.api.wait_final("echo", &last, LONG).await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let count = |table: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}"))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    wait_until(LONG, "every task record to be deleted", || async {
        count("tasks").await == 0
    })
    .await;
    assert_eq!(count("output_blobs").await, 0, "blobs outlived their tasks");
    for node in [&node_a, &node_b] {
        for id in [&ids[0], &last] {
            let (status, body) = node.api.status("echo", id).await;
            assert_error(status, &body, StatusCode::NOT_FOUND, &[id]);
        }
    }
    pool.close().await;
    node_a.stop().await.unwrap();
    node_b.stop().await.unwrap();
    db.drop_db().await;
}
