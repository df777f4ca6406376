//! Integration tests of the client: against small scripted HTTP servers started by each test
//! (`support`), and against a real taskgate server in this process (`real_server`) where what
//! is tested is the meaning the server gives to a call, such as a worker's lease.
#![allow(clippy::unwrap_used)]

mod cancel;
mod download;
mod end_to_end;
mod real_server;
mod retry;
mod support;
mod tasks;
mod wait;
mod webhook;
mod worker;
