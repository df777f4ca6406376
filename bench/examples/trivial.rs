//! The trivial axum baseline as a standalone server, for load tools such as wrk:
//! `cargo run --release -p taskgate-bench --example trivial -- 127.0.0.1:8090`.
//! It serves the same two routes as taskgate (`taskgate_bench::trivial_router`) until Ctrl-C.

use std::net::SocketAddr;

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".to_owned())
        .parse()
        .map_err(std::io::Error::other)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            eprintln!("trivial baseline listening on {addr}");
            axum::serve(listener, taskgate_bench::trivial_router())
                .with_graceful_shutdown(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await
        })
}
