//! Retrying transient failures of a single request.

use std::time::{Duration, SystemTime};

use rand::Rng;

/// How a single request is retried when it fails transiently (429, 5xx, no connection).
///
/// Other 4xx answers are never retried: the same request would be refused again. The delay
/// doubles from `initial_backoff` up to `max_backoff`, with random jitter so that many clients
/// refused at once do not come back at once. A 429 or 503 carrying `Retry-After` waits exactly
/// that long instead, unless it is longer than `max_retry_after`, in which case the error is
/// returned rather than blocking the caller for an unbounded time.
///
/// ```
/// use std::time::Duration;
/// use taskgate_client::RetryPolicy;
/// let patient = RetryPolicy {
///     max_attempts: 8,
///     max_backoff: Duration::from_secs(30),
///     ..RetryPolicy::default()
/// };
/// let never = RetryPolicy::none();
/// assert_eq!(never.max_attempts, 1);
/// # let _ = patient;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (1 = no retries). Default 4.
    pub max_attempts: u32,
    /// Delay before the first retry, before jitter. Default 500 ms.
    pub initial_backoff: Duration,
    /// Upper bound of the exponential delay. Default 8 s.
    pub max_backoff: Duration,
    /// The longest `Retry-After` the client is willing to sleep through. Default 60 s.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// Never retry: every failure is returned at once.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// Delay after the `failures`-th consecutive failure (1-based): half the exponential step
    /// fixed, half random ("equal jitter"), so the delay never collapses to zero.
    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(20);
        let step = self
            .initial_backoff
            .saturating_mul(1u32 << exp)
            .min(self.max_backoff);
        let half = step / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        let extra = if jitter_ms == 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(rand::thread_rng().gen_range(0..=jitter_ms))
        };
        half + extra
    }
}

/// Parses `Retry-After`: either delta-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn backoff_doubles_and_stays_within_the_cap() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(400),
            ..RetryPolicy::default()
        };
        for _ in 0..50 {
            let d1 = p.backoff(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d2 = p.backoff(2);
            assert!(d2 >= Duration::from_millis(100) && d2 <= Duration::from_millis(200));
            let d9 = p.backoff(9);
            assert!(d9 >= Duration::from_millis(200) && d9 <= Duration::from_millis(400));
        }
        // A huge failure count neither overflows nor exceeds the cap.
        assert!(p.backoff(u32::MAX) <= Duration::from_millis(400));
    }

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        // A date in the past means "now".
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
