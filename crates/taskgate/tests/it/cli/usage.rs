//! What the command line answers before any command runs: each command's `--help` lists the
//! flags it takes and no others, and a command line clap refuses is, under `--json`, one JSON
//! error document like every other failure.

use super::cli_env;

/// The stdout of `taskgate ARGS --help`, which must succeed.
async fn help_of(args: &[&str]) -> String {
    let mut full = args.to_vec();
    full.push("--help");
    let run = cli_env(&[], &full).await;
    run.assert_exit(0);
    run.stdout
}

#[tokio::test]
async fn each_commands_help_lists_the_client_flags_only_where_they_apply() {
    for cmd in [
        &["submit"][..],
        &["status"],
        &["wait"],
        &["cancel"],
        &["webhook", "listen"],
    ] {
        let help = help_of(cmd).await;
        for flag in ["--url", "--api-key", "--json"] {
            assert!(help.contains(flag), "no {flag} in {cmd:?} --help:\n{help}");
        }
    }
    for cmd in [&[][..], &["keys"], &["serve"], &["worker"]] {
        let help = help_of(cmd).await;
        for flag in ["--url <", "--json"] {
            assert!(!help.contains(flag), "{flag} in {cmd:?} --help:\n{help}");
        }
    }
    for sub in ["create", "list", "revoke"] {
        let help = help_of(&["keys", sub]).await;
        assert!(help.contains("--json"), "keys {sub} --help:\n{help}");
        assert!(help.contains("--data-dir"), "keys {sub} --help:\n{help}");
        for flag in ["--url", "--api-key"] {
            assert!(!help.contains(flag), "{flag} in keys {sub} --help:\n{help}");
        }
    }
    // serve registers a key of its own; worker talks to a server as --server.
    let serve = help_of(&["serve"]).await;
    assert!(
        serve.contains("--api-key") && serve.contains("TASKGATE_API_KEY"),
        "{serve}"
    );
    let worker = help_of(&["worker"]).await;
    assert!(
        worker.contains("--server") && worker.contains("TASKGATE_URL"),
        "{worker}"
    );
    assert!(!worker.contains("--api-key"), "{worker}");
}

#[tokio::test]
async fn a_usage_error_under_json_prints_one_error_document_and_exits_2() {
    for args in [
        &["submit", "--json"][..],
        &["status", "echo", "--json", "--bogus"],
        &["wait", "echo", "task_x", "--timeout", "soon", "--json"],
        &["keys", "list", "--json", "--bogus"],
    ] {
        let run = cli_env(&[], args).await;

        run.assert_exit(2);
        let err = &run.json()["error"];
        assert_eq!(err["kind"], "usage", "{run}");
        assert_eq!(err["exitCode"], 2, "{run}");
        let message = err["message"].as_str().unwrap();
        // clap's own message stays on stderr; the document carries what it says.
        let first = run.error_line().trim_start_matches("error: ");
        assert!(
            !first.is_empty() && message.starts_with(first),
            "{args:?}:\n{run}"
        );
        assert!(run.stderr.contains("try '--help'"), "{run}");
    }
}

#[tokio::test]
async fn help_and_version_under_json_are_not_errors() {
    let help = cli_env(&[], &["submit", "--help", "--json"]).await;
    let version = cli_env(&[], &["--version", "--json"]).await;

    help.assert_exit(0);
    assert!(help.stdout.contains("Usage: taskgate submit"), "{help}");
    assert!(!help.stdout.contains("\"error\""), "{help}");
    version.assert_exit(0);
    assert!(version.stdout.starts_with("taskgate "), "{version}");
}

#[tokio::test]
async fn client_flags_before_the_subcommand_are_refused_with_a_pointer_to_after_it() {
    let run = cli_env(&[], &["--url", "http://127.0.0.1:1", "submit", "echo"]).await;

    run.assert_exit(2);
    assert!(run.stderr.contains("'submit --url' exists"), "{run}");
}
