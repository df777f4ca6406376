//! Fuzz targets for what a stranger's bytes reach first: generateTask and generateTasks bodies
//! (`request_body`), the TOML config (`config_file`), and webhook signature verification
//! (`webhook_signature`), issue 14.
//!
//! Each target is a [bolero](https://github.com/camshaft/bolero) `check!` in a test: under
//! `cargo test` it runs on random inputs (bolero's random engine, a bounded number of
//! iterations, about a second each), and `cargo bolero test NAME --engine libfuzzer` runs the
//! same closure coverage-guided for as long as it is given (docs/fuzzing.md). Every target
//! asserts properties, not only "no panic". Structured inputs (tokens rendered into JSON or
//! TOML) reach past the first syntax check even on the random engine; the raw-bytes targets
//! leave libFuzzer to find what the tokens miss.
//!
//! The crate has no code outside its tests; it is a crate of its own so that the coverage
//! build compiles one test binary, not every test target of the server.

#[cfg(test)]
mod config_file;
#[cfg(test)]
mod request_body;
#[cfg(test)]
mod webhook_signature;
