//! Errors as log text. Its own module because every layer logs errors, while `error` is the
//! HTTP side that only the API may use.

/// `outer: inner: innermost`, so a log line carries the whole cause chain.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
