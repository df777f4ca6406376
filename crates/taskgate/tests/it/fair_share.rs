//! Fair sharing between tenants within a model (docs/gateway.md): a tenant flooding a model
//! cannot starve another, on SQLite and on two PostgreSQL nodes sharing one database.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use taskgate_server::config::{Config, FileConfig};

use crate::support::*;

/// One task at a time, so the order in which tasks start is the claim order.
const ONE_AT_A_TIME: &str = r#"
[models.slow]
backend = "builtin"
builtin = "echo"
concurrency = 1
"#;

fn one_at_a_time(c: &mut Config) {
    c.models = FileConfig::parse(ONE_AT_A_TIME).unwrap().models.unwrap();
}

/// A client key of a new tenant named `tenant` (`taskgate keys create` names it after the
/// key), on the node's SQLite data dir or on the shared database.
async fn tenant_key(data_dir: &Path, database_url: Option<&str>, tenant: &str) -> String {
    let dir = data_dir.to_str().unwrap();
    let mut args = vec!["keys", "create", "--name", tenant, "--data-dir", dir];
    if let Some(url) = database_url {
        args.extend(["--database-url", url]);
    }
    let out = taskgate(&args).await;
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = stdout.split_whitespace().last().unwrap().to_owned();
    assert!(key.starts_with("tg_"), "{stdout}");
    key
}

/// How many of the tenant's tasks have started (running or finished).
async fn started(api: &Api) -> usize {
    let mut n = 0;
    for state in ["processing", "success", "failed"] {
        n += api
            .list_all_ids(&[("model", "slow"), ("state", state)])
            .await
            .len();
    }
    n
}

/// Tenant A submits 1000 short tasks; once they flow, tenant B submits one (long enough that no
/// other task of the one-slot model starts while it runs). B's task must start before more than
/// three of A's tasks that were still waiting at B's submit.
async fn a_flood_does_not_starve(flood: &Api, victim: &Api) {
    let tasks: Vec<Value> = (0..1000)
        .map(|i| json!({ "input": { "n": i, "delay_ms": 20 } }))
        .collect();
    let (status, body) = flood.submit_batch("slow", json!({ "tasks": tasks })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let first = body["data"]["taskIds"][0].as_str().unwrap().to_owned();
    flood
        .wait_for("slow", &first, Duration::from_secs(30), |d| {
            d["state"] != "pending"
        })
        .await;

    let before = started(flood).await;
    let b = victim
        .submit_ok("slow", json!({ "n": "b", "delay_ms": 2000 }))
        .await;
    victim
        .wait_for("slow", &b, Duration::from_secs(30), |d| {
            d["state"] != "pending"
        })
        .await;
    // While b runs nothing else of the model can start, so this counts a's claims up to b's.
    let after = started(flood).await;
    assert!(
        after - before <= 3,
        "b's task waited for {} of a's tasks submitted before it ({before} had started at b's submit)",
        after - before
    );
    assert!(
        after < 100,
        "a's flood was nearly drained before b's turn ({after} started)"
    );
    let done = victim.wait_final("slow", &b, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "success", "{done}");
}

#[tokio::test]
async fn a_tenants_single_task_starts_within_a_few_tasks_of_another_tenants_flood() {
    let app = TestApp::start_with(one_at_a_time).await;
    let flood = app
        .api
        .with_key(&tenant_key(&app.data_dir, None, "flood").await);
    let victim = app
        .api
        .with_key(&tenant_key(&app.data_dir, None, "victim").await);
    a_flood_does_not_starve(&flood, &victim).await;
}

#[tokio::test]
async fn a_flood_on_one_postgres_node_does_not_starve_a_tenant_submitting_to_another() {
    let Some(db) = create_db("fair sharing across two PostgreSQL nodes").await else {
        return;
    };
    let node_a = TestApp::node_on(&db, one_at_a_time).await;
    let node_b = TestApp::node_on(&db, one_at_a_time).await;
    let flood = node_a
        .api
        .with_key(&tenant_key(&node_a.data_dir, Some(&db.url), "flood").await);
    let victim = node_b
        .api
        .with_key(&tenant_key(&node_b.data_dir, Some(&db.url), "victim").await);
    a_flood_does_not_starve(&flood, &victim).await;
    drop((node_a, node_b));
    db.drop_db().await;
}
