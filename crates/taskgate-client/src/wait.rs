//! Waiting for a task with the polling practice APIXO recommends.
//!
//! The schedule is the one from APIXO's async-workflow guide: first poll after 3 s, each further
//! interval 1.5 times the previous, capped at 30 s, giving up after 5 minutes. Jitter (±10 % by
//! default) keeps a batch of tasks submitted together from polling in lockstep. Everything is
//! configurable because the same guide recommends other numbers for video (first poll after 60 s,
//! give up after 10 min).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use taskgate_proto::{TaskState, TaskStatus};
use tokio::time::Instant;

use crate::{Client, Error};

/// Callback invoked by [`Client::wait`] after every poll.
pub type ProgressFn = Arc<dyn Fn(&WaitProgress) + Send + Sync>;

/// What [`Client::wait`] reports to its progress callback.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitProgress {
    /// The task being waited on.
    pub task_id: String,
    /// State from the latest poll; `None` before the first poll.
    pub state: Option<TaskState>,
    /// Time since `wait` was called.
    pub elapsed: Duration,
    /// Delay until the next poll; `None` once the task is final.
    pub next_poll: Option<Duration>,
    /// Polls made so far.
    pub polls: u32,
    /// The task's `progress` (0..1) from the latest poll, when the server reports one (taskgate
    /// does for models that report it; APIXO does not).
    pub progress: Option<f64>,
}

/// How [`Client::wait`] polls. The default is APIXO's recommended practice.
///
/// ```
/// use std::time::Duration;
/// use taskgate_client::WaitOptions;
///
/// // A video model: start slower and wait longer.
/// let video = WaitOptions {
///     initial_interval: Duration::from_secs(15),
///     timeout: Duration::from_secs(600),
///     ..WaitOptions::default()
/// }
/// .on_progress(|p| eprintln!("{:?} after {:?}", p.state, p.elapsed));
/// # let _ = video;
/// ```
#[derive(Clone)]
pub struct WaitOptions {
    /// Delay before the first poll, and the first interval. Default 3 s.
    pub initial_interval: Duration,
    /// Growth of the interval after each poll. Default 1.5.
    pub multiplier: f64,
    /// Largest interval. Default 30 s.
    pub max_interval: Duration,
    /// Overall time limit, after which [`Error::Timeout`] is returned. Default 5 min.
    pub timeout: Duration,
    /// Random spread applied to each delay, as a fraction: 0.1 means ±10 %. Default 0.1.
    pub jitter: f64,
    /// Poll once right away before the first interval, for a task that may have finished long
    /// ago (this is what the CLI's `wait` does). Default `false`.
    pub poll_immediately: bool,
    /// Called after every poll (and once before the first), e.g. to draw a progress line.
    pub progress: Option<ProgressFn>,
}

impl Default for WaitOptions {
    fn default() -> Self {
        WaitOptions {
            initial_interval: Duration::from_secs(3),
            multiplier: 1.5,
            max_interval: Duration::from_secs(30),
            timeout: Duration::from_secs(5 * 60),
            jitter: 0.1,
            poll_immediately: false,
            progress: None,
        }
    }
}

impl fmt::Debug for WaitOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WaitOptions")
            .field("initial_interval", &self.initial_interval)
            .field("multiplier", &self.multiplier)
            .field("max_interval", &self.max_interval)
            .field("timeout", &self.timeout)
            .field("jitter", &self.jitter)
            .field("poll_immediately", &self.poll_immediately)
            .field("progress", &self.progress.as_ref().map(|_| "Fn"))
            .finish()
    }
}

impl WaitOptions {
    /// Sets the overall time limit.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets whether to poll once before the first interval.
    pub fn poll_immediately(mut self, yes: bool) -> Self {
        self.poll_immediately = yes;
        self
    }

    /// Sets the progress callback.
    pub fn on_progress(mut self, f: impl Fn(&WaitProgress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    /// The interval after `current`, before jitter.
    pub(crate) fn grow(&self, current: Duration) -> Duration {
        let factor = if self.multiplier.is_finite() && self.multiplier >= 1.0 {
            self.multiplier
        } else {
            1.0
        };
        let next = Duration::try_from_secs_f64(current.as_secs_f64() * factor)
            .unwrap_or(self.max_interval);
        next.min(self.max_interval)
    }

    pub(crate) fn jittered(&self, d: Duration) -> Duration {
        let j = if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        if j == 0.0 || d.is_zero() {
            return d;
        }
        let factor = rand::thread_rng().gen_range((1.0 - j)..=(1.0 + j));
        Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(d)
    }

    fn report(&self, p: WaitProgress) {
        if let Some(f) = &self.progress {
            f(&p);
        }
    }
}

impl Client {
    /// Polls `statusTask` until the task is final, following `opts` (APIXO's recommended schedule
    /// by default: 3 s, ×1.5, 30 s cap, 5 min limit, with jitter).
    ///
    /// Returns the final status on `success`, [`Error::TaskFailed`] on `failed`, and
    /// [`Error::Timeout`] when `opts.timeout` passes first; the last poll happens at the deadline
    /// rather than one interval before it. Each poll retries transient errors per the client's
    /// [`RetryPolicy`](crate::RetryPolicy); an error that survives those retries ends the wait.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), taskgate_client::Error> {
    /// use taskgate_client::{Client, SubmitOptions, WaitOptions};
    /// let client = Client::new("http://127.0.0.1:8080", "tg_key")?;
    /// let task_id = client
    ///     .submit("echo", serde_json::json!({"prompt": "hi"}), SubmitOptions::default())
    ///     .await?;
    /// let done = client.wait("echo", &task_id, WaitOptions::default()).await?;
    /// println!("{:?}", done.result());
    /// # Ok(()) }
    /// ```
    pub async fn wait(
        &self,
        model: &str,
        task_id: &str,
        opts: WaitOptions,
    ) -> Result<TaskStatus, Error> {
        let start = Instant::now();
        let deadline = start + opts.timeout;
        let mut interval = opts.initial_interval;
        let mut polls = 0u32;

        let mut next = if opts.poll_immediately {
            Duration::ZERO
        } else {
            opts.jittered(interval)
        };
        opts.report(WaitProgress {
            task_id: task_id.to_owned(),
            state: None,
            elapsed: Duration::ZERO,
            next_poll: Some(next.min(opts.timeout)),
            polls,
            progress: None,
        });

        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(next.min(remaining)).await;

            let status = self.status(model, task_id).await?;
            polls += 1;
            let last_state = Some(status.state);
            let elapsed = start.elapsed();

            if status.state.is_final() {
                opts.report(WaitProgress {
                    task_id: task_id.to_owned(),
                    state: last_state,
                    elapsed,
                    next_poll: None,
                    polls,
                    progress: status.progress,
                });
                if status.state == TaskState::Failed {
                    return Err(Error::TaskFailed {
                        task_id: task_id.to_owned(),
                        fail_code: status.fail_code.clone(),
                        fail_msg: status.fail_msg.clone(),
                        status: Box::new(status),
                    });
                }
                return Ok(status);
            }

            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::Timeout {
                    task_id: task_id.to_owned(),
                    elapsed,
                    last_state,
                });
            }

            // The immediate poll is extra: the schedule proper starts after it.
            if !(opts.poll_immediately && polls == 1) {
                interval = opts.grow(interval);
            }
            next = opts.jittered(interval);
            opts.report(WaitProgress {
                task_id: task_id.to_owned(),
                state: last_state,
                elapsed,
                next_poll: Some(next.min(remaining)),
                polls,
                progress: status.progress,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_schedule_is_three_seconds_times_one_and_a_half_capped_at_thirty() {
        let o = WaitOptions::default();
        let mut d = o.initial_interval;
        let mut seen = vec![d.as_millis()];
        for _ in 0..7 {
            d = o.grow(d);
            seen.push(d.as_millis());
        }
        assert_eq!(
            seen,
            vec![3000, 4500, 6750, 10125, 15187, 22781, 30000, 30000]
        );
        assert_eq!(o.timeout, Duration::from_secs(300));
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let o = WaitOptions::default();
        for _ in 0..100 {
            let d = o.jittered(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(9) && d <= Duration::from_secs(11),
                "{d:?}"
            );
        }
        let none = WaitOptions {
            jitter: 0.0,
            ..WaitOptions::default()
        };
        assert_eq!(
            none.jittered(Duration::from_secs(10)),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn a_nonsense_multiplier_keeps_the_interval_steady_instead_of_shrinking_it() {
        let o = WaitOptions {
            multiplier: 0.1,
            ..WaitOptions::default()
        };
        assert_eq!(o.grow(Duration::from_secs(3)), Duration::from_secs(3));
        let nan = WaitOptions {
            multiplier: f64::NAN,
            ..WaitOptions::default()
        };
        assert_eq!(nan.grow(Duration::from_secs(3)), Duration::from_secs(3));
    }
}
