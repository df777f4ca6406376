//! Integration tests of the client against small local HTTP servers started by each test.
#![allow(clippy::unwrap_used)]

mod download;
mod retry;
mod support;
mod wait;
mod webhook;
