//! Many nodes on one PostgreSQL database (`TEST_DATABASE_URL`; each test makes its own
//! database and drops it). Without the variable these tests say they were skipped.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sqlx::Connection;

use crate::support::*;

fn work_model(concurrency: usize) -> String {
    format!(
        r#"
[models.work]
backend = "command"
command = ["sh", "-c", "sleep 0.2; cat > \"$TASKGATE_OUTPUT_DIR/out.json\""]
concurrency = {concurrency}
timeout = "30s"
max_attempts = 5
"#
    )
}

#[tokio::test]
async fn three_nodes_lose_no_task_when_one_is_killed_and_never_exceed_concurrency() {
    let Some(db) = create_db("PostgreSQL cluster test").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.toml");
    std::fs::write(&config, work_model(2)).unwrap();
    // One data dir for all nodes: on one machine it stands in for shared storage of results.
    let data = dir.path().join("data");
    let flags = ["--database-url", &db.url, "--lease", "1s"];
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(ServerProcess::spawn_with(&data, Some(&config), &flags).await);
    }

    // Watch the database: never more than `concurrency` tasks processing.
    let max_seen = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (url, max_seen) = (db.url.clone(), max_seen.clone());
        tokio::spawn(async move {
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            loop {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM tasks WHERE model = 'work' AND state = 'processing'",
                )
                .fetch_one(&mut conn)
                .await
                .unwrap();
                max_seen.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let mut ids = Vec::new();
    for i in 0..24 {
        let node = &nodes[i % 3];
        ids.push(node.api.submit_ok("work", json!({ "n": i })).await);
    }
    // Kill a node while work is in flight.
    nodes[1]
        .api
        .wait_for("work", &ids[0], Duration::from_secs(20), |d| {
            d["state"] != "pending"
        })
        .await;
    let victim = nodes.remove(0);
    victim.kill9().await;

    let api = nodes[0].api.clone();
    for (i, id) in ids.iter().enumerate() {
        let data = api.wait_final("work", id, Duration::from_secs(60)).await;
        assert_eq!(data["state"], "success", "task {i}: {data}");
        let url = &result_urls(&data)[0];
        let body: serde_json::Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        assert_eq!(body, json!({ "n": i }), "task {i}'s output");
    }
    sampler.abort();
    assert!(
        max_seen.load(Ordering::SeqCst) <= 2,
        "saw {} processing at once",
        max_seen.load(Ordering::SeqCst)
    );
    assert!(max_seen.load(Ordering::SeqCst) >= 1);

    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let (finals, leased): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state IN ('success', 'failed')), \
                count(*) FILTER (WHERE lease_token IS NOT NULL) FROM tasks",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(finals, 24, "every accepted task reached one final state");
    assert_eq!(leased, 0, "no lease is held forever");
    conn.close().await.unwrap();
    for n in nodes {
        n.terminate().await;
    }
    db.drop_db().await;
}

async fn readyz(api: &Api) -> (u16, serde_json::Value) {
    let resp = api
        .http
        .get(format!("{}/readyz", api.base))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn while_postgres_is_unreachable_requests_get_503_and_the_node_recovers() {
    let Some(db) = create_db("PostgreSQL cluster test").await else {
        return;
    };
    let mut proxy = Proxy::start(0).await;
    let mut via_proxy = url::Url::parse(&db.url).unwrap();
    via_proxy.set_port(Some(proxy.port)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node =
        ServerProcess::spawn_with(dir.path(), None, &["--database-url", via_proxy.as_str()]).await;
    let before = node.api.submit_ok("echo", json!({ "delay_ms": 10 })).await;
    node.api
        .wait_final("echo", &before, Duration::from_secs(20))
        .await;

    proxy.cut();
    // Wait for the outage to show (pooled connections notice on their next use).
    let mut saw_503 = false;
    for _ in 0..100 {
        let (status, body) = node.api.submit("echo", json!({ "input": {} })).await;
        assert!(status == 200 || status == 503, "{status}: {body}");
        if status == 503 {
            assert!(
                body["message"]
                    .as_str()
                    .unwrap()
                    .contains("database is unavailable"),
                "{body}"
            );
            saw_503 = true;
            break;
        }
    }
    assert!(saw_503, "no 503 while the database was unreachable");
    // A finished task's view and its key may still be answered from memory for a moment; once
    // the node's key check finds the store unreachable (within a second), it vouches for no key
    // and answers 503 too.
    let mut status_503 = false;
    for _ in 0..100 {
        let (status, body) = node.api.status("echo", &before).await;
        match status.as_u16() {
            200 => assert_eq!(body["data"]["state"], "success", "{body}"),
            503 => {
                status_503 = true;
                break;
            }
            other => panic!("{other}: {body}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        status_503,
        "statusTask kept answering from memory through the outage"
    );
    // Readiness says so too, for the load balancer, without naming the database's address.
    let (status, body) = readyz(&node.api).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], 503, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("store cannot be read"), "{body}");
    assert!(!message.contains("127.0.0.1"), "{body}");

    let port = proxy.port;
    let _restored = Proxy::start(port).await;
    let mut accepted = None;
    for _ in 0..200 {
        let (status, body) = node
            .api
            .submit("echo", json!({ "input": { "after": true } }))
            .await;
        if status == 200 {
            accepted = Some(body["data"]["taskId"].as_str().unwrap().to_owned());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = accepted.expect("the node did not recover after the database came back");
    // Pooled connections that broke in the outage fail once each on their next use (no ping
    // before acquire), so a probe may still see one of them: ready within a few probes.
    let mut last = (0, serde_json::Value::Null);
    for _ in 0..100 {
        last = readyz(&node.api).await;
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        last.0, 200,
        "ready again once the database is back: {}",
        last.1
    );
    let data = node
        .api
        .wait_final("echo", &id, Duration::from_secs(30))
        .await;
    assert_eq!(data["state"], "success");
    let data = node
        .api
        .wait_final("echo", &before, Duration::from_secs(5))
        .await;
    assert_eq!(data["state"], "success");
    node.terminate().await;
    db.drop_db().await;
}

#[tokio::test]
async fn nodes_started_at_the_same_instant_on_a_fresh_database_all_start_and_accept_the_key() {
    for round in 0..5 {
        let Some(db) = create_db("PostgreSQL cluster test").await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        // Every node writes the same start-up rows (the key, its tenant, the URL signing key)
        // into an empty database at the same moment.
        let starts: Vec<_> = (0..4)
            .map(|i| {
                let data = dir.path().join(format!("node-{i}"));
                let url = db.url.clone();
                tokio::spawn(async move {
                    ServerProcess::spawn_with(&data, None, &["--database-url", &url]).await
                })
            })
            .collect();
        let mut nodes = Vec::new();
        let mut failed = Vec::new();
        for (i, start) in starts.into_iter().enumerate() {
            match start.await {
                Ok(node) => nodes.push(node),
                Err(_) => {
                    let log = dir.path().join(format!("node-{i}/server.log"));
                    failed.push(format!(
                        "node {i}: {}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    ));
                }
            }
        }
        assert!(failed.is_empty(), "round {round}: {}", failed.join("\n"));
        for node in &nodes {
            node.api.submit_ok("echo", json!({})).await;
        }
        for node in nodes {
            node.terminate().await;
        }
        db.drop_db().await;
    }
}
