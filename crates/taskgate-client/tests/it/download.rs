use std::sync::{Arc, Mutex};

use taskgate_client::Error;

use crate::support::{FakeServer, Reply};

#[tokio::test]
async fn download_streams_the_file_into_the_directory_named_after_the_url() {
    let server = FakeServer::start().await;
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    server.on_files([Reply::bytes(200, content.clone())]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nested/out");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();

    let path = server
        .client()
        .download_with_progress(
            &format!("{}/files/task_1/fox.png?sig=abc", server.base),
            &out,
            move |p| sink.lock().unwrap().push(p),
        )
        .await
        .unwrap();

    assert_eq!(path, out.join("fox.png"));
    assert_eq!(std::fs::read(&path).unwrap(), content);
    let seen = seen.lock().unwrap();
    let last = seen.last().unwrap();
    assert_eq!(last.downloaded, content.len() as u64);
    assert_eq!(last.total, Some(content.len() as u64));
    assert!(seen.windows(2).all(|w| w[0].downloaded <= w[1].downloaded));
    // Only the finished file is left: no .part file.
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
}

#[tokio::test]
async fn a_download_that_answers_404_is_an_api_error_and_leaves_no_file() {
    let server = FakeServer::start().await;
    server.on_files([Reply::error(404, "artifact expired")]);
    let dir = tempfile::tempdir().unwrap();

    let err = server
        .client()
        .download(&format!("{}/files/gone.png", server.base), dir.path())
        .await
        .unwrap_err();

    assert!(
        matches!(&err, Error::Api { status: 404, message, .. } if message == "artifact expired"),
        "{err:?}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn a_download_is_retried_after_a_503() {
    let server = FakeServer::start().await;
    server.on_files([Reply::error(503, "busy"), Reply::bytes(200, "hello")]);
    let dir = tempfile::tempdir().unwrap();

    let path = server
        .client()
        .download(&format!("{}/files/a.txt", server.base), dir.path())
        .await
        .unwrap();

    assert_eq!(std::fs::read_to_string(path).unwrap(), "hello");
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn the_api_key_goes_to_the_apis_own_origin_and_never_to_another_host() {
    let api = FakeServer::start().await;
    let cdn = FakeServer::start().await;
    api.on_files([Reply::bytes(200, "own")]);
    cdn.on_files([Reply::bytes(200, "cdn")]);
    let dir = tempfile::tempdir().unwrap();
    let client = api.client();

    client
        .download(&format!("{}/files/own.bin", api.base), dir.path())
        .await
        .unwrap();
    client
        .download(&format!("{}/output/cdn.bin", cdn.base), dir.path())
        .await
        .unwrap();

    assert_eq!(
        api.requests()[0].authorization.as_deref(),
        Some("Bearer tg_test_key")
    );
    assert_eq!(cdn.requests()[0].authorization, None);
}

#[tokio::test]
async fn a_second_download_of_the_same_name_keeps_the_first_file() {
    let server = FakeServer::start().await;
    server.on_files([
        Reply::bytes(200, b"first".to_vec()),
        Reply::bytes(200, b"second".to_vec()),
        Reply::bytes(200, b"third".to_vec()),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("{}/files/task_1/fox.png?sig=abc", server.base);
    let client = server.client();

    let a = client.download(&url, dir.path()).await.unwrap();
    let b = client.download(&url, dir.path()).await.unwrap();
    let c = client.download(&url, dir.path()).await.unwrap();

    assert_eq!(a, dir.path().join("fox.png"));
    assert_eq!(b, dir.path().join("fox-1.png"));
    assert_eq!(c, dir.path().join("fox-2.png"));
    assert_eq!(std::fs::read(&a).unwrap(), b"first");
    assert_eq!(std::fs::read(&b).unwrap(), b"second");
    assert_eq!(std::fs::read(&c).unwrap(), b"third");
    // No .part file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
}

#[tokio::test]
async fn two_downloads_of_one_name_at_once_keep_both_files_whole() {
    let server = FakeServer::start().await;
    let a: Vec<u8> = vec![b'a'; 400_000];
    let b: Vec<u8> = vec![b'b'; 400_000];
    server.on_files([Reply::bytes(200, a.clone()), Reply::bytes(200, b.clone())]);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("{}/files/task_1/out.bin", server.base);
    let client = server.client();

    let (x, y) = tokio::join!(
        client.download(&url, dir.path()),
        client.download(&url, dir.path())
    );
    let (x, y) = (x.unwrap(), y.unwrap());

    assert_ne!(x, y);
    let mut got = vec![std::fs::read(&x).unwrap(), std::fs::read(&y).unwrap()];
    got.sort();
    assert_eq!(got, vec![a, b], "each file is one whole answer");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        2,
        "no part file left"
    );
}
