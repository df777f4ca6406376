//! Integration tests: the real server on 127.0.0.1:0 with a temp data dir, spoken to over HTTP.
#![allow(clippy::unwrap_used)]

mod bad_input;
mod batch;
mod builtin;
mod cancel;
mod cli;
mod cluster;
mod command;
mod config;
mod connections;
mod dashboard;
mod dispatch;
mod faults;
mod hot_paths;
mod http_backend;
mod idempotency;
mod list;
mod metrics;
mod models;
mod observe;
mod openapi;
mod operate;
mod operator;
mod progress;
mod recovery;
mod retention;
mod s3;
mod scheduling;
mod signed_urls;
mod smoke;
mod support;
mod wait_stream;
mod webhook_events;
mod webhooks;
mod wire;
mod workers;
