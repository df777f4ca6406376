//! `GET /openapi.json` and `/docs` against a real server: the document covers every route the
//! server registers, a maintained validator accepts it, every operation in it answers a request
//! built from it as it says, and the reference loads only from this origin.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use taskgate_server::config::FileConfig;

use crate::support::*;

/// Routes that are not API operations, by path prefix: the reference's own files and the
/// dashboard's assets. Everything else a router registers must be in the document.
const NOT_OPERATIONS: &[&str] = &["/docs", "/dashboard"];

fn allowed_outside_document(path: &str) -> bool {
    NOT_OPERATIONS
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
}

async fn document(api: &Api) -> Value {
    let resp = api
        .http
        .get(format!("{}/openapi.json", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    resp.json().await.unwrap()
}

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

/// Every (METHOD, path) of the document.
fn document_operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, _) in item.as_object().unwrap() {
            if METHODS.contains(&method.as_str()) {
                ops.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    ops
}

/// A route as a router of the server registers it.
#[derive(Debug)]
struct Registered {
    method: String,
    path: String,
    at: String,
}

/// Every `.route("PATH", METHOD(..).METHOD(..))` in the server crate's sources, read from the
/// text: axum cannot list a router's routes, and the sources are where a route is added (by us
/// or by a merge). A registration this reader cannot understand (a path that is not a literal,
/// a method router it does not know, `nest`, `route_service`) fails the test, so nothing is
/// skipped silently.
fn registered_routes() -> (Vec<Registered>, Vec<String>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../taskgate-server/src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() > 10, "found no server sources under {root:?}");
    let (mut routes, mut unreadable) = (Vec::new(), Vec::new());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        // Comments may mention `.route(`; no code line starts with `//`.
        let code: String = text
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("//") {
                    ""
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let name = file.strip_prefix(&root).unwrap().display().to_string();
        let line_of = |at: usize| code[..at].matches('\n').count() + 1;
        // These hide the routes behind them from this reader: only under a prefix that holds
        // no operation (the dashboard's assets) may they be used.
        for opaque in [
            ".nest(",
            ".nest_service(",
            ".route_service(",
            ".fallback_service(",
        ] {
            for (at, _) in code.match_indices(opaque) {
                let args = code[at + opaque.len()..].trim_start();
                let prefix = args
                    .strip_prefix('"')
                    .and_then(|rest| rest.find('"').map(|end| &rest[..end]));
                if prefix.is_some_and(allowed_outside_document) {
                    continue;
                }
                unreadable.push(format!(
                    "{name}:{}: {opaque} hides its routes from this test; register each with .route(\"PATH\", ..)",
                    line_of(at)
                ));
            }
        }
        for (at, _) in code.match_indices(".route(") {
            let place = format!("{name}:{}", line_of(at));
            match parse_route(&code[at + ".route(".len()..]) {
                Ok((path, methods)) => {
                    routes.extend(methods.into_iter().map(|method| Registered {
                        method,
                        path: path.clone(),
                        at: place.clone(),
                    }))
                }
                Err(why) => unreadable.push(format!("{place}: {why}")),
            }
        }
    }
    (routes, unreadable)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The path literal and the HTTP methods of the arguments of one `.route(`.
fn parse_route(args: &str) -> Result<(String, Vec<String>), String> {
    let rest = args.trim_start();
    let rest = rest
        .strip_prefix('"')
        .ok_or("the path is not a string literal")?;
    let end = rest.find('"').ok_or("an unterminated path literal")?;
    let path = rest[..end].to_owned();
    let rest = rest[end + 1..].trim_start();
    let rest = rest
        .strip_prefix(',')
        .ok_or("no method router after the path")?;
    // The method router: up to the `)` closing `.route(`, reading calls at the top level only
    // (`get(a).post(b)`, `routing::get(..)`); what is inside the calls is the handler's.
    let (mut depth, mut methods, mut ident, mut in_str) = (0i32, Vec::new(), String::new(), false);
    let mut prev = '\0';
    for c in rest.chars() {
        if in_str {
            if c == '"' && prev != '\\' {
                in_str = false;
            }
            prev = c;
            continue;
        }
        match c {
            '"' => in_str = true,
            '(' | '[' | '{' => {
                if depth == 0 && c == '(' && !ident.is_empty() {
                    let name = ident.rsplit("::").next().unwrap_or_default().to_owned();
                    if !METHODS.contains(&name.as_str()) {
                        return Err(format!("{name}(..) is not a method router this test knows"));
                    }
                    methods.push(name.to_uppercase());
                }
                depth += 1;
                ident.clear();
            }
            ')' | ']' | '}' => {
                if depth == 0 {
                    if methods.is_empty() {
                        return Err("no method in the method router".into());
                    }
                    return Ok((path, methods));
                }
                depth -= 1;
                ident.clear();
            }
            c if c.is_alphanumeric() || c == '_' || c == ':' => ident.push(c),
            _ => ident.clear(),
        }
        prev = c;
    }
    Err("no closing parenthesis".into())
}

fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| if seg.starts_with('{') { "x" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

#[test]
fn the_route_reader_understands_the_forms_routes_are_written_in() {
    assert_eq!(
        parse_route(r#""/a/{id}", get(h))"#).unwrap(),
        ("/a/{id}".into(), vec!["GET".into()])
    );
    assert_eq!(
        parse_route("\n  \"/a\",\n  routing::get(a).post(move |x: Path<(String, String)>| async move { f(x).await }),\n)").unwrap(),
        ("/a".into(), vec!["GET".into(), "POST".into()])
    );
    assert!(parse_route("&format!(\"/{p}\"), get(h))").is_err());
    assert!(parse_route(r#""/a", any(h))"#).is_err());
    assert!(parse_route(r#""/a", handler)"#).is_err());
}

#[tokio::test]
async fn every_route_the_server_registers_is_in_the_document_and_the_other_way_round() {
    let app = TestApp::start().await;
    let doc = document(&app.api).await;
    let documented = document_operations(&doc);
    let (routes, unreadable) = registered_routes();
    assert!(
        unreadable.is_empty(),
        "route registrations this test cannot read:\n{}",
        unreadable.join("\n")
    );
    assert!(routes.len() >= 20, "found only {routes:?}");

    let mut missing = Vec::new();
    let mut registered = BTreeSet::new();
    for r in &routes {
        if allowed_outside_document(&r.path) {
            continue;
        }
        registered.insert((r.method.clone(), r.path.clone()));
        if !documented.contains(&(r.method.clone(), r.path.clone())) {
            missing.push(format!("{} {} (registered at {})", r.method, r.path, r.at));
        }
    }
    assert!(
        missing.is_empty(),
        "routes missing from the OpenAPI document (annotate the handler with #[utoipa::path] and \
         list it in api::openapi::ApiDoc):\n{}",
        missing.join("\n")
    );
    let stale: Vec<_> = documented.difference(&registered).collect();
    assert!(
        stale.is_empty(),
        "the document names operations no router registers: {stale:?}"
    );

    // What was read is what the server serves: every route answers its method with something
    // other than the router's fallbacks (no key: the API's routes refuse with 401).
    for r in &routes {
        let resp = app
            .api
            .http
            .request(
                Method::from_bytes(r.method.as_bytes()).unwrap(),
                format!("{}{}", app.api.base, concrete(&r.path)),
            )
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        assert_ne!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{} {}: {body}",
            r.method,
            r.path
        );
        assert!(
            !(status == StatusCode::NOT_FOUND && body.contains("no such endpoint")),
            "{} {} is not served: {body}",
            r.method,
            r.path
        );
    }
}

#[tokio::test]
async fn a_maintained_validator_accepts_the_document() {
    let app = TestApp::start().await;
    let doc = document(&app.api).await;
    assert_eq!(doc["openapi"], "3.1.0");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let out = tokio::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator", "--schema", "3.1"])
        .arg(&file)
        .output()
        .await;
    let out = match out {
        Ok(o) => o,
        Err(e) => return validator_missing(&format!("python3 cannot run: {e}")),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No module named openapi_spec_validator") {
        return validator_missing(
            "the Python package openapi-spec-validator is not installed (pip install openapi-spec-validator)",
        );
    }
    assert!(
        out.status.success() && stdout.contains(": OK"),
        "openapi-spec-validator refused the document:\n{stdout}\n{stderr}"
    );
}

fn validator_missing(why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must validate the OpenAPI document, but {why}"
    );
    skip(&format!("validation of the OpenAPI document: {why}"));
}

/// A JSON Schema validator for `schema`, a schema of the document, with the document's
/// components beside it so that its `#/components/schemas/…` references resolve.
fn validator(doc: &Value, schema: &Value) -> jsonschema::Validator {
    let mut root = schema.clone();
    let obj = match root.as_object_mut() {
        Some(o) => o,
        None => panic!("a schema that is not an object: {schema}"),
    };
    obj.insert("components".into(), doc["components"].clone());
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&root)
        .unwrap_or_else(|e| panic!("the document's schema does not compile ({e}): {schema}"))
}

/// Follows a `$ref` into the document's components.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.strip_prefix("#/components/schemas/").unwrap();
            resolve(doc, &doc["components"]["schemas"][name])
        }
        None => schema,
    }
}

/// A value for a parameter: one the test made (`fixtures`, by operation then by name), else
/// the parameter's example, else a value of its schema's type.
fn parameter_value(
    doc: &Value,
    fixtures: &BTreeMap<(String, String), String>,
    op_id: &str,
    param: &Value,
) -> String {
    let name = param["name"].as_str().unwrap();
    if let Some(v) = fixtures
        .get(&(op_id.to_owned(), name.to_owned()))
        .or_else(|| fixtures.get(&("*".to_owned(), name.to_owned())))
    {
        return v.clone();
    }
    if let Some(example) = param
        .get("example")
        .or_else(|| param["schema"].get("example"))
    {
        return match example {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
    }
    let schema = resolve(doc, &param["schema"]);
    let ty = match &schema["type"] {
        Value::Array(types) => types
            .iter()
            .find(|t| *t != "null")
            .cloned()
            .unwrap_or_default(),
        t => t.clone(),
    };
    match ty.as_str() {
        Some("integer") | Some("number") => "1".into(),
        Some("boolean") => "true".into(),
        _ => match schema["enum"].get(0) {
            Some(Value::String(s)) => s.clone(),
            _ => "x".into(),
        },
    }
}

/// The body of a request from its schema's example, with the values only this run knows
/// (`fixtures` by operation, named `body.FIELD`) put in.
fn request_body(
    doc: &Value,
    fixtures: &BTreeMap<(String, String), String>,
    op_id: &str,
    op: &Value,
) -> Option<(String, Vec<u8>)> {
    let content = op["requestBody"]["content"].as_object()?;
    let (content_type, media) = content.iter().next().unwrap();
    if content_type != "application/json" {
        return Some((content_type.clone(), b"output bytes\n".to_vec()));
    }
    let schema = resolve(doc, &media["schema"]);
    let mut body = media
        .get("example")
        .or_else(|| schema.get("example"))
        .cloned()
        .unwrap_or_else(|| panic!("{op_id}: the request body's schema has no example"));
    for ((op, key), value) in fixtures {
        if let Some(field) = key.strip_prefix("body.") {
            if (op == op_id || op == "*") && body.get(field).is_some() {
                body[field] = Value::String(value.clone());
            }
        }
    }
    // Examples must be valid against their own schema, or clients copying them fail.
    let v = validator(doc, &media["schema"]);
    assert!(
        v.is_valid(&body),
        "{op_id}: the example body {body} breaks its schema"
    );
    Some((content_type.clone(), body.to_string().into_bytes()))
}

/// Event streams that do not end by themselves: the check reads their first event and hangs up.
const ENDLESS_STREAMS: &[&str] = &["streamTaskCounts"];

/// A stream's body up to the end of its first event with data.
async fn first_event(op_id: &str, mut resp: reqwest::Response) -> Vec<u8> {
    let mut buf = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&buf);
        let end = text
            .find("data:")
            .and_then(|at| text[at..].find("\n\n").map(|end| at + end + 2));
        if let Some(end) = end {
            buf.truncate(end);
            return buf;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(20), resp.chunk())
            .await
            .unwrap_or_else(|_| panic!("{op_id}: no event within 20 s"))
            .unwrap();
        match chunk {
            Some(c) => buf.extend_from_slice(&c),
            None => return buf,
        }
    }
}

/// The data lines of a Server-Sent Events body.
fn sse_data(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim_start()).unwrap())
        .collect()
}

#[tokio::test]
async fn every_operation_answers_a_request_built_from_the_document_as_the_document_says() {
    let remote = FileConfig::parse(WORKER_MODEL).unwrap().models.unwrap();
    let app = TestApp::start_with(move |c| {
        c.models.extend(remote);
        c.webhooks.allow_private_callbacks = true;
        // A refused delivery waits for its next attempt longer than the test runs.
        c.webhooks.retry_delays = taskgate_server::config::Delays(vec![Duration::from_secs(600)]);
    })
    .await;
    let api = &app.api;
    let worker = worker_token(&app.data_dir, None).await;
    let doc = document(api).await;

    // What the requests need that no schema can give: tasks that exist, in the states the
    // operations act on.
    let done = api.run_to_end("echo", json!({"prompt": "a fox"})).await;
    assert_eq!(done["state"], "success", "{done}");
    let done_id = done["taskId"].as_str().unwrap().to_owned();
    let file_url = url::Url::parse(&result_urls(&done)[0]).unwrap();
    let segs: Vec<String> = file_url
        .path_segments()
        .unwrap()
        .map(str::to_owned)
        .collect();
    assert_eq!((segs.len(), segs[0].as_str()), (4, "files"), "{file_url}");
    let query: BTreeMap<String, String> = file_url.query_pairs().into_owned().collect();
    let slow_id = api.submit_ok("echo", json!({"delay_ms": 600_000})).await;
    // A callback nobody answers (port 9 refuses): a delivery to list and retry.
    let (status, body) = api
        .submit(
            "echo",
            json!({"callback_url": "http://127.0.0.1:9/hook", "input": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let hooked_id = body["data"]["taskId"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let delivery_id = loop {
        let req = api
            .request(Method::GET, "/api/v1/webhookDeliveries")
            .query(&[("taskId", &hooked_id)]);
        let (_, body) = envelope(req.send().await.unwrap()).await;
        // Once its first attempt is over (refused) and it waits for the next: a retry now is
        // scheduled, not refused as in flight.
        let d = &body["data"]["deliveries"][0];
        if d["state"] == "pending" && d["attempts"].as_u64() >= Some(1) {
            break d["id"].as_str().unwrap().to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivery: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let remote_id = api.submit_ok("remote", json!({"prompt": "far away"})).await;

    let mut fixtures: BTreeMap<(String, String), String> = [
        ("*", "model", "echo"),
        ("*", "taskId", done_id.as_str()),
        ("cancelTask", "taskId", slow_id.as_str()),
        ("listWebhookDeliveries", "taskId", hooked_id.as_str()),
        ("retryWebhookDelivery", "id", delivery_id.as_str()),
        ("getFile", "task_id", segs[1].as_str()),
        ("getFile", "tag", segs[2].as_str()),
        ("getFile", "name", segs[3].as_str()),
        ("getUntaggedFile", "task_id", segs[1].as_str()),
        ("getUntaggedFile", "name", segs[3].as_str()),
        ("*", "expires", query["expires"].as_str()),
        ("*", "sig", query["sig"].as_str()),
        ("uploadOutput", "name", "out.png"),
    ]
    .into_iter()
    .map(|(op, k, v)| ((op.to_owned(), k.to_owned()), v.to_owned()))
    .collect();

    let mut answered: BTreeMap<String, u16> = BTreeMap::new();
    let mut operations = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if METHODS.contains(&method.as_str()) {
                operations.push((path.clone(), method.clone(), op.clone()));
            }
        }
    }
    // A worker's calls in the order a worker makes them: the claim's answer gives the others
    // their task and lease, and the completion ends the lease the failure then reports on.
    let worker_order = [
        "claimWork",
        "heartbeat",
        "uploadOutput",
        "completeTask",
        "failTask",
    ];
    operations.sort_by_key(|(_, _, op)| {
        worker_order
            .iter()
            .position(|id| op["operationId"] == *id)
            .map_or(0, |i| i + 1)
    });

    let creds = Credentials {
        api_key: api.key.clone(),
        worker_token: worker.clone(),
    };
    for (path, method, op) in &operations {
        let op_id = op["operationId"].as_str().unwrap().to_owned();
        let (status, body) = call(api, &doc, &fixtures, &creds, path, method, op, false).await;
        if op_id == "claimWork" {
            let task = &body["data"];
            assert_eq!(task["taskId"], remote_id.as_str(), "{body}");
            let token = task["leaseToken"].as_str().unwrap().to_owned();
            for op in ["heartbeat", "uploadOutput", "completeTask", "failTask"] {
                fixtures.insert((op.into(), "id".into()), remote_id.clone());
                fixtures.insert((op.into(), "leaseToken".into()), token.clone());
                fixtures.insert((op.into(), "body.leaseToken".into()), token.clone());
            }
        }
        answered.insert(op_id, status);
    }
    // The fixtures make each operation do its work, so a refusal here is a broken request or
    // a broken operation, not the document's fault: each answers 200, but for the few that
    // are meant to be refused.
    let refused: BTreeMap<&str, u16> = answered
        .iter()
        .filter(|(_, s)| **s != 200)
        .map(|(k, s)| (k.as_str(), *s))
        .collect();
    let expected: BTreeMap<&str, u16> = [
        // The signature covers the tagged path, not this one.
        ("getUntaggedFile", 403),
        // completeTask ran first and finished the task: the lease is gone.
        ("failTask", 409),
    ]
    .into_iter()
    .collect();
    assert_eq!(refused, expected, "all answers: {answered:?}");
    assert_eq!(answered.len(), operations.len());

    // Again with every optional parameter too, at its example or a value of its type: many
    // are refused now (a cancelled task cannot be cancelled again, `cursor=x` is not a
    // cursor), and each refusal must be one the document lists, in its schema.
    let mut again = BTreeMap::new();
    for (path, method, op) in &operations {
        let (status, _) = call(api, &doc, &fixtures, &creds, path, method, op, true).await;
        again.insert(op["operationId"].as_str().unwrap().to_owned(), status);
    }
    assert_eq!(again.len(), operations.len(), "{again:?}");
    // `Prefer: wait` was honoured where it is documented.
    assert_eq!(again["statusTask"], 200, "{again:?}");
}

struct Credentials {
    api_key: String,
    worker_token: String,
}

/// Sends `op` a request built from the document (its required parameters, all of them with
/// `optional`; its body's example; the credentials of its security scheme) and checks the
/// answer against the document: a listed status, the documented media type, and a body within
/// the documented schema (JSON), events within `x-event-data` (a stream), or a non-empty
/// body (a file). Returns the status and, for JSON, the body.
#[allow(clippy::too_many_arguments)]
async fn call(
    api: &Api,
    doc: &Value,
    fixtures: &BTreeMap<(String, String), String>,
    creds: &Credentials,
    path: &str,
    method: &str,
    op: &Value,
    optional: bool,
) -> (u16, Value) {
    let op_id = op["operationId"].as_str().unwrap().to_owned();
    let mut url = path.to_owned();
    let mut query = Vec::new();
    let mut headers = Vec::new();
    for param in op["parameters"].as_array().into_iter().flatten() {
        if param["required"] != true && !optional {
            continue;
        }
        let name = param["name"].as_str().unwrap();
        let value = parameter_value(doc, fixtures, &op_id, param);
        match param["in"].as_str().unwrap() {
            "path" => url = url.replace(&format!("{{{name}}}"), &value),
            "query" => query.push((name.to_owned(), value)),
            "header" => headers.push((name.to_owned(), value)),
            other => panic!("{op_id}: a parameter in {other}"),
        }
    }
    let mut req = api
        .http
        .request(
            Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
            format!("{}{url}", api.base),
        )
        .query(&query);
    for (k, v) in &headers {
        req = req.header(k, v);
    }
    // The first requirement; `{}` (or none) is no credential.
    match op["security"][0]
        .as_object()
        .and_then(|s| s.keys().next().cloned())
        .as_deref()
    {
        Some("apiKey") => req = req.bearer_auth(&creds.api_key),
        Some("workerToken") => req = req.bearer_auth(&creds.worker_token),
        None => {}
        Some(other) => {
            panic!("{op_id}: a security scheme this test has no credential for: {other}")
        }
    }
    if let Some((content_type, body)) = request_body(doc, fixtures, &op_id, op) {
        req = req.header("content-type", content_type).body(body);
    }
    let resp = tokio::time::timeout(Duration::from_secs(70), req.send())
        .await
        .unwrap_or_else(|_| panic!("{op_id} did not answer"))
        .unwrap();
    let status = resp.status().as_u16();
    let resp_headers = resp.headers().clone();
    let content_type = resp_headers
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = if status == 200 && ENDLESS_STREAMS.contains(&op_id.as_str()) {
        first_event(&op_id, resp).await
    } else {
        tokio::time::timeout(Duration::from_secs(20), resp.bytes())
            .await
            .unwrap_or_else(|_| panic!("{op_id}'s body did not end"))
            .unwrap()
            .to_vec()
    };
    let documented = &op["responses"][status.to_string()];
    assert!(
        documented.is_object(),
        "{op_id} ({method} {path}, headers {headers:?}, query {query:?}) answered {status}, \
         which the document does not list ({:?}): {}",
        op["responses"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        String::from_utf8_lossy(&bytes)
    );
    // Headers the document promises on this answer are there (Preference-Applied only when
    // a wait was asked for).
    for (name, _) in documented["headers"].as_object().into_iter().flatten() {
        if name == "Preference-Applied" && !headers.iter().any(|(k, _)| k == "Prefer") {
            continue;
        }
        assert!(
            resp_headers.contains_key(name.as_str()),
            "{op_id} answered {status} without its documented header {name}"
        );
    }
    let content = documented["content"].as_object().unwrap();
    let mut json_body = Value::Null;
    if let Some(media) = content.get("application/json") {
        assert!(
            content_type.starts_with("application/json"),
            "{op_id}: {content_type}"
        );
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        let v = validator(doc, &media["schema"]);
        let errors: Vec<String> = v
            .iter_errors(&body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{op_id} answered {status} with a body outside its schema: {errors:?}\n{body}"
        );
        if body["code"].is_u64() {
            assert_eq!(body["code"], status, "{op_id}: {body}");
        }
        json_body = body;
    } else if let Some(media) = content.get("text/event-stream") {
        assert!(
            content_type.starts_with("text/event-stream"),
            "{op_id}: {content_type}"
        );
        let event = media.get("x-event-data").unwrap_or_else(|| {
            panic!("{op_id}: a stream without x-event-data (api::openapi::EVENT_STREAMS)")
        });
        let v = validator(doc, event);
        let events = sse_data(std::str::from_utf8(&bytes).unwrap());
        assert!(!events.is_empty(), "{op_id}: no event");
        for e in &events {
            assert!(v.is_valid(e), "{op_id}: an event outside {event}: {e}");
        }
    } else if content.contains_key("application/octet-stream") {
        // A file: its type follows its name.
        assert!(!bytes.is_empty(), "{op_id}: an empty file");
    } else {
        assert!(
            content.keys().any(|k| content_type.starts_with(k.as_str())),
            "{op_id} answered {content_type}, not one of {:?}",
            content.keys().collect::<Vec<_>>()
        );
        assert!(!bytes.is_empty(), "{op_id}: an empty answer");
    }
    (status, json_body)
}

#[tokio::test]
async fn the_schema_check_above_fails_a_body_outside_the_schema() {
    let app = TestApp::start().await;
    let doc = document(&app.api).await;
    let op = &doc["paths"]["/api/v1/statusTask/{model}"]["get"];
    let ok = validator(
        &doc,
        &op["responses"]["200"]["content"]["application/json"]["schema"],
    );
    assert!(ok.is_valid(&json!({"code": 200, "message": "success", "data": {"taskId": "task_1", "state": "pending"}})));
    assert!(!ok.is_valid(
        &json!({"code": 200, "message": "success", "data": {"taskId": "task_1", "state": "done"}})
    ));
    assert!(!ok.is_valid(&json!({"code": 200, "message": "success", "data": {"state": "pending"}})));
    let not_found = validator(
        &doc,
        &op["responses"]["404"]["content"]["application/json"]["schema"],
    );
    assert!(not_found
        .is_valid(&json!({"code": 404, "message": "m", "data": {"errorCode": "task_not_found"}})));
    // A code this operation never answers with is outside its 404.
    assert!(!not_found.is_valid(
        &json!({"code": 404, "message": "m", "data": {"errorCode": "delivery_not_found"}})
    ));
    assert!(!not_found.is_valid(&json!({"code": 404, "message": "m"})));
}

#[tokio::test]
async fn every_example_in_the_document_is_valid_against_its_schema() {
    let app = TestApp::start().await;
    let doc = document(&app.api).await;
    let mut checked = 0;
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        if let Some(example) = schema.get("example") {
            assert!(
                validator(&doc, schema).is_valid(example),
                "the example of {name} breaks its schema: {example}"
            );
            checked += 1;
        }
    }
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for (status, response) in op["responses"].as_object().into_iter().flatten() {
                for (media, content) in response["content"].as_object().into_iter().flatten() {
                    for (name, example) in content["examples"].as_object().into_iter().flatten() {
                        let value = &example["value"];
                        assert!(
                            validator(&doc, &content["schema"]).is_valid(value),
                            "{method} {path} {status} {media}: example {name} breaks its schema: {value}"
                        );
                        if media == "application/json" && value["code"].is_u64() {
                            assert_eq!(value["code"].to_string(), *status, "{method} {path}");
                        }
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} examples");
}

#[tokio::test]
async fn docs_is_html_under_a_strict_policy_and_loads_only_from_this_origin() {
    let app = TestApp::start().await;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = no_redirects
        .get(format!("{}/docs", app.api.base))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_redirection(), "{}", resp.status());
    assert_eq!(resp.headers()["location"], "/docs/");

    let resp = app
        .api
        .http
        .get(format!("{}/docs/", app.api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
    assert_eq!(h["x-content-type-options"], "nosniff");
    let csp = h["content-security-policy"].to_str().unwrap().to_owned();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    let html = resp.text().await.unwrap();
    // Nothing inline for the policy to forbid.
    assert!(!html.contains("<style"), "{html}");
    assert!(!html.contains(" style="), "{html}");
    let assets = attribute_values(&html, &["src", "href"]);
    assert!(assets.len() >= 4, "{assets:?}");
    let scripts = html.matches("<script").count();
    assert_eq!(
        scripts,
        attribute_values(&html, &["src"]).len(),
        "an inline script: {html}"
    );
    for asset in &assets {
        assert!(
            !asset.contains("//") && !asset.contains(':'),
            "{asset} is not on this origin"
        );
        let url = format!("{}/docs/{}", app.api.base, asset.trim_start_matches("./"));
        let resp = app.api.http.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{url}");
        assert_eq!(resp.headers()["x-content-type-options"], "nosniff", "{url}");
        let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
        let want = match asset.rsplit('.').next().unwrap() {
            "js" => "javascript",
            "css" => "text/css",
            "png" => "image/png",
            other => panic!("an asset of an unexpected kind: {other}"),
        };
        assert!(ct.contains(want), "{url}: {ct}");
        let body = resp.bytes().await.unwrap();
        assert!(!body.is_empty(), "{url}");
        if asset.ends_with("swagger-initializer.js") {
            let text = String::from_utf8_lossy(&body);
            // The document of this server, and no validator badge fetched from elsewhere.
            assert!(text.contains(r#""url": "/openapi.json""#), "{text}");
            assert!(text.contains(r#""validatorUrl": "none""#), "{text}");
            // No top bar, whose box would load documents from elsewhere.
            assert!(text.contains(r#""layout": "BaseLayout""#), "{text}");
        }
    }
    let resp = app
        .api
        .http
        .get(format!("{}/docs/nothing.js", app.api.base))
        .send()
        .await
        .unwrap();
    let (status, _) = envelope(resp).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// The values of the named attributes in `html` (double-quoted, as Swagger UI writes them).
fn attribute_values(html: &str, names: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for name in names {
        let needle = format!(" {name}=\"");
        for (at, _) in html.match_indices(&needle) {
            let rest = &html[at + needle.len()..];
            out.push(rest[..rest.find('"').unwrap()].to_owned());
        }
    }
    out
}
