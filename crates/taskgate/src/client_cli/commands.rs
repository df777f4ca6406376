//! Running `submit`, `status`, `wait`, `cancel`, `list` and `models`: the input they send, the calls they make
//! through `taskgate-client`, and which outcome counts as a failure (a `status` that finds the
//! task failed exits 1 like `wait` does; a `cancel` that leaves it failed, as asked, exits 0).

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Map, Value};
use taskgate_client::{Client, Error, ListQuery, SubmitOptions, TaskState};

use super::exit::{explain, failed_task, Action, Failure};
use super::listen::listen;
use super::output::{
    download_with_progress, show_list, show_models, show_status, wait_with_progress,
};
use super::{ClientCommand, Connection, WebhookCommand};

pub(super) async fn execute(conn: &Connection, cmd: ClientCommand) -> Result<(), Failure> {
    match cmd {
        ClientCommand::Submit {
            model,
            input,
            prompt,
            callback,
            idempotency_key,
            wait,
            out,
            timeout,
            conn: _,
        } => {
            let input = build_input(input.as_deref(), prompt)?;
            let client = connect(conn)?;
            let opts = SubmitOptions {
                callback_url: callback,
                idempotency_key,
            };
            let task_id = client
                .submit(&model, input, opts)
                .await
                .map_err(|e| explain(conn, Action::Submit { model: &model }, e))?;
            if !wait && out.is_none() {
                if conn.json {
                    println!("{}", json!({ "taskId": task_id }));
                } else {
                    println!("{task_id}");
                    if std::io::stderr().is_terminal() {
                        eprintln!("follow it with: taskgate wait {model} {task_id}");
                    }
                }
                return Ok(());
            }
            if !conn.json {
                eprintln!("submitted {task_id}");
            }
            wait_and_show(conn, &client, &model, &task_id, timeout, out, false).await
        }
        ClientCommand::Status { model, task_id, .. } => {
            let client = connect(conn)?;
            let status = client.status(&model, &task_id).await.map_err(|e| {
                explain(
                    conn,
                    Action::Task {
                        model: &model,
                        task_id: &task_id,
                    },
                    e,
                )
            })?;
            if status.state == TaskState::Failed {
                // The lookup worked, but a script asking about a failed task should see it fail.
                // In JSON mode the error object carries the status: one document on stdout.
                if !conn.json {
                    show_status(conn, &status, &[]);
                }
                return Err(failed_task(status, conn.json));
            }
            show_status(conn, &status, &[]);
            Ok(())
        }
        ClientCommand::Wait {
            model,
            task_id,
            timeout,
            out,
            conn: _,
        } => {
            let client = connect(conn)?;
            // The task may have finished long ago, so look once before the first interval.
            wait_and_show(conn, &client, &model, &task_id, timeout, out, true).await
        }
        ClientCommand::Cancel { model, task_id, .. } => {
            let client = connect(conn)?;
            let status = client.cancel(&model, &task_id).await.map_err(|e| {
                explain(
                    conn,
                    Action::Task {
                        model: &model,
                        task_id: &task_id,
                    },
                    e,
                )
            })?;
            // Failed with CANCELLED is what was asked for: a success, unlike `status` of it.
            show_status(conn, &status, &[]);
            Ok(())
        }
        ClientCommand::List {
            model,
            state,
            limit,
            cursor,
            conn: _,
        } => {
            let client = connect(conn)?;
            let query = ListQuery {
                model,
                // clap admits only the four names.
                state: state.as_deref().and_then(TaskState::parse),
                limit: Some(limit),
                cursor,
                ..ListQuery::default()
            };
            let page = client
                .list_tasks(&query)
                .await
                .map_err(|e| explain(conn, Action::List, e))?;
            show_list(conn, &page);
            Ok(())
        }
        ClientCommand::Models { .. } => {
            let client = connect(conn)?;
            let models = client
                .models()
                .await
                .map_err(|e| explain(conn, Action::Models, e))?;
            show_models(conn, &models);
            Ok(())
        }
        ClientCommand::Webhook(WebhookCommand::Listen { port, secret, .. }) => {
            listen(conn, port, secret).await
        }
    }
}

pub(super) fn connect(conn: &Connection) -> Result<Client, Failure> {
    Client::builder(&conn.url)
        .api_key(conn.api_key.clone().unwrap_or_default())
        .build()
        .map_err(|e| match e {
            Error::InvalidUrl { url, reason } => Failure::usage(format!(
                "--url {url:?} is not a usable server URL ({reason}); expected something like http://127.0.0.1:8080"
            )),
            other => Failure::usage(other.to_string()),
        })
}

fn build_input(input: Option<&str>, prompt: Option<String>) -> Result<Value, Failure> {
    let mut obj = match input {
        None => Map::new(),
        Some(raw) => {
            let (text, source) = match raw.strip_prefix('@') {
                Some("-") => {
                    let mut s = String::new();
                    std::io::stdin().read_to_string(&mut s).map_err(|e| {
                        Failure::usage(format!("cannot read --input from stdin: {e}"))
                    })?;
                    (s, "stdin".to_owned())
                }
                Some(path) => {
                    let s = std::fs::read_to_string(path).map_err(|e| {
                        Failure::usage(format!("cannot read --input file {path}: {e}"))
                    })?;
                    (s, path.to_owned())
                }
                None => (raw.to_owned(), "--input".to_owned()),
            };
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(map)) => map,
                Ok(_) => {
                    return Err(Failure::usage(format!(
                        "{source} must hold a JSON object, e.g. '{{\"prompt\": \"a red fox\"}}'"
                    )))
                }
                Err(e) => return Err(Failure::usage(format!("{source} is not valid JSON: {e}"))),
            }
        }
    };
    if let Some(p) = prompt {
        obj.insert("prompt".to_owned(), Value::String(p));
    }
    if obj.is_empty() && input.is_none() {
        return Err(Failure::usage(
            "nothing to submit: give --prompt TEXT or --input JSON (or --input @file.json)",
        ));
    }
    Ok(Value::Object(obj))
}

async fn wait_and_show(
    conn: &Connection,
    client: &Client,
    model: &str,
    task_id: &str,
    timeout: Duration,
    out: Option<PathBuf>,
    poll_immediately: bool,
) -> Result<(), Failure> {
    let action = || Action::Task { model, task_id };
    let status = wait_with_progress(client, model, task_id, timeout, poll_immediately)
        .await
        .map_err(|e| explain(conn, action(), e))?;
    let mut files = Vec::new();
    if let Some(dir) = out {
        let urls = match status.result() {
            Some(Ok(r)) => r.result_urls,
            Some(Err(e)) => {
                return Err(explain(
                    conn,
                    action(),
                    Error::Protocol {
                        url: conn.url.clone(),
                        reason: format!("resultJson is not valid: {e}"),
                    },
                ))
            }
            None => Vec::new(),
        };
        for url in urls {
            let path = download_with_progress(client, &url, &dir, conn.json)
                .await
                .map_err(|e| explain(conn, Action::Download, e))?;
            files.push(path);
        }
    }
    show_status(conn, &status, &files);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::client_cli::exit::EXIT_USAGE;

    #[test]
    fn prompt_is_merged_over_the_input_object() {
        let v = build_input(
            Some(r#"{"mode":"text-to-image","prompt":"old"}"#),
            Some("new".into()),
        )
        .map_err(|f| f.message)
        .unwrap();
        assert_eq!(v, json!({"mode": "text-to-image", "prompt": "new"}));
    }

    #[test]
    fn input_that_is_not_a_json_object_is_a_usage_error() {
        for bad in ["[1,2]", "{not json"] {
            let f = build_input(Some(bad), None).err().unwrap();
            assert_eq!(f.exit, EXIT_USAGE, "{bad}");
        }
        assert_eq!(build_input(None, None).err().unwrap().exit, EXIT_USAGE);
    }
}
