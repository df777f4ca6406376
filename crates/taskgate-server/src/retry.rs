//! The retry policy: one type for every "try again later" decision, task attempts and webhook
//! deliveries alike, so the schedule and its jitter live in one place.

use std::time::Duration;

use rand::Rng;

/// A schedule of delays: the delay before retry `n` (1-based) is `delays[n-1]`, spread by
/// ±`jitter` (a fraction) so that retries to one place do not arrive together. Past the end of
/// the schedule the policy either gives up or repeats its last delay.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    delays: Vec<Duration>,
    jitter: f64,
    after_last: AfterLast,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterLast {
    /// No more retries: the schedule's length is the number of retries.
    GiveUp,
    /// Keep retrying at the last delay (something else, like `max_attempts`, bounds the count).
    RepeatLast,
}

impl RetryPolicy {
    pub fn new(delays: Vec<Duration>, jitter: f64, after_last: AfterLast) -> Self {
        RetryPolicy {
            delays,
            jitter: jitter.clamp(0.0, 1.0),
            after_last,
        }
    }

    /// The delay before retry `retry` (1-based), or `None` when the policy gives up.
    pub fn delay(&self, retry: u32) -> Option<Duration> {
        let index = (retry.max(1) - 1) as usize;
        let base = match (self.delays.get(index), self.after_last) {
            (Some(d), _) => *d,
            (None, AfterLast::RepeatLast) => *self.delays.last()?,
            (None, AfterLast::GiveUp) => return None,
        };
        if self.jitter == 0.0 {
            return Some(base);
        }
        let factor = rand::thread_rng().gen_range(1.0 - self.jitter..=1.0 + self.jitter);
        Some(base.mul_f64(factor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_giving_up_schedule_stops_after_its_last_delay_with_bounded_jitter() {
        let p = RetryPolicy::new(
            vec![Duration::from_secs(10), Duration::from_secs(100)],
            0.1,
            AfterLast::GiveUp,
        );
        for _ in 0..50 {
            let d = p.delay(1).unwrap_or_default();
            assert!(
                d >= Duration::from_secs(9) && d <= Duration::from_secs(11),
                "{d:?}"
            );
            let d = p.delay(2).unwrap_or_default();
            assert!(
                d >= Duration::from_secs(90) && d <= Duration::from_secs(110),
                "{d:?}"
            );
        }
        assert_eq!(p.delay(3), None);
    }

    #[test]
    fn a_repeating_schedule_keeps_its_last_delay() {
        let p = RetryPolicy::new(
            vec![Duration::from_secs(1), Duration::from_secs(5)],
            0.0,
            AfterLast::RepeatLast,
        );
        assert_eq!(p.delay(1), Some(Duration::from_secs(1)));
        assert_eq!(p.delay(7), Some(Duration::from_secs(5)));
        let empty = RetryPolicy::new(Vec::new(), 0.0, AfterLast::RepeatLast);
        assert_eq!(empty.delay(1), None);
    }
}
