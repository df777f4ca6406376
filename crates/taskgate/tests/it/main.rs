//! Integration tests: the real server on 127.0.0.1:0 with a temp data dir, spoken to over HTTP.
#![allow(clippy::unwrap_used)]

mod smoke;
mod support;
