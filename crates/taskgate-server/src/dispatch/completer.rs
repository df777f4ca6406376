//! The completer: settles how an attempt ended, wherever it ran (here or on a pull worker).
//!
//! Success and fatal errors end the task with the token-guarded final write, which is also what
//! publishes the attempt's staged outputs; a retryable error with attempts left goes back to
//! pending after the retry policy's delay. Outside text (failCodes, failMsgs) is cleaned first,
//! so no message can make the write fail. A write that fails is retried until it lands or the
//! lease it relies on has ended, and the caller learns which: a final state that was not
//! written is never reported as done. (The SQLite store group-commits these writes; see
//! `store::sqlite`.)

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::Dispatcher;
use crate::backends::BackendError;
use crate::domain::{clean_text, now_ms, scrub_secrets, MAX_FAIL_CODE, MAX_FAIL_MSG};
use crate::report::error_chain;
use crate::store::{AttemptEnd, Blob, Claim, Outcome, StoreError};

/// First pause between two tries of a failed write; doubles up to [`MAX_WRITE_PAUSE`].
pub(super) const FIRST_WRITE_PAUSE: Duration = Duration::from_millis(100);
const MAX_WRITE_PAUSE: Duration = Duration::from_secs(2);

/// What became of an outcome.
#[derive(Debug)]
pub enum Settled {
    /// Written: the task is final (or back to pending for a retry).
    Written,
    /// The claim was no longer ours (the task was handed on, cancelled, or is final): nothing
    /// written.
    NotOurs,
    /// The store kept failing until the lease ran out: nothing written; the lease's expiry will
    /// hand the task on.
    NotWritten(StoreError),
}

/// One write of an outcome.
enum Write {
    Final(Outcome),
    /// Back to pending; `ended` goes into the task's attempt history.
    Requeue {
        run_after: i64,
        ended: AttemptEnd,
    },
}

impl Dispatcher {
    /// Acts on how an attempt ended. `lease_until` is when the claim's lease ends as far as the
    /// caller knows: failed writes are retried until then.
    pub async fn settle(
        &self,
        model: &str,
        claim: &Claim,
        result: Result<(Vec<String>, Vec<Blob>), BackendError>,
        elapsed: Duration,
        lease_until: Instant,
    ) -> Settled {
        self.settle_as(model, claim, result, elapsed, lease_until, None, None)
            .await
    }

    /// [`Dispatcher::settle`], naming who ran the attempt (`worker:<name>`) for the task's
    /// attempt history when it is retried (`None`: the runner the task's row records), and
    /// the route of a routed model that ran it, which a final state records.
    #[allow(clippy::too_many_arguments)]
    pub async fn settle_as(
        &self,
        model: &str,
        claim: &Claim,
        result: Result<(Vec<String>, Vec<Blob>), BackendError>,
        elapsed: Duration,
        lease_until: Instant,
        runner: Option<String>,
        route: Option<Arc<str>>,
    ) -> Settled {
        let task = &claim.task;
        if let Err(e) = &result {
            let (retryable, code) = match e {
                BackendError::Retryable { code, .. } => (true, code),
                BackendError::Fatal { code, .. } => (false, code),
            };
            self.metrics.backend_error(model, retryable, code);
        }
        let write = match result {
            Ok((outputs, blobs)) => Write::Final(Outcome::Success { outputs, blobs }),
            Err(BackendError::Retryable { code, message }) if task.attempts < task.max_attempts => {
                let delay = self
                    .retry
                    .delay(task.attempts)
                    .unwrap_or(Duration::from_secs(1));
                let (fail_code, fail_msg) = cleaned(&code, &message);
                warn!(%code, reason = %fail_msg, retry_in = %humantime::format_duration(delay), "attempt failed; will retry");
                Write::Requeue {
                    run_after: now_ms() + delay.as_millis() as i64,
                    ended: AttemptEnd {
                        fail_code,
                        fail_msg,
                        runner,
                    },
                }
            }
            Err(BackendError::Retryable { code, message }) => Write::Final(failure(
                &code,
                &format!("{message} (gave up after {} attempts)", task.attempts),
            )),
            Err(BackendError::Fatal { code, message }) => Write::Final(failure(&code, &message)),
        };
        let settled = self
            .write(claim, &write, route.as_deref(), lease_until)
            .await;
        if matches!(settled, Settled::Written) {
            self.events.changed(&task.id);
            // Measured from the start the store stamped (on the clock the claim used), so an
            // attempt that failed before it ran anything counts as the instant it was.
            let now = now_ms();
            self.metrics.attempt_ended(
                model,
                Duration::from_millis(
                    task.start_time.map_or(0, |s| now.saturating_sub(s).max(0)) as u64
                ),
            );
            if let Write::Final(outcome) = &write {
                let fail_code = match outcome {
                    Outcome::Success { .. } => None,
                    Outcome::Failure { code, .. } => Some(code.as_str()),
                };
                self.metrics
                    .finished(model, fail_code, task.create_time, now);
            }
        }
        match (&settled, &write) {
            (Settled::Written, Write::Final(outcome)) => {
                if task.callback_url.is_some() {
                    self.webhook_wake.notify_one();
                }
                log_outcome(outcome, elapsed);
            }
            (Settled::Written, Write::Requeue { .. }) => {}
            (Settled::NotOurs, _) => {
                warn!("the task was handed on or cancelled before this attempt finished; outcome dropped")
            }
            (Settled::NotWritten(e), _) => {
                error!(error = %error_chain(e), "cannot record the outcome before the lease ends; the task will be handed on when it expires")
            }
        }
        // A slot of the model is free (or the task is due again): a loop or a pull worker
        // waiting on it may claim now.
        self.notify(model);
        settled
    }

    /// Tries `write` until it lands, the claim turns out not to be ours, or the lease ends.
    async fn write(
        &self,
        claim: &Claim,
        write: &Write,
        route: Option<&str>,
        lease_until: Instant,
    ) -> Settled {
        let mut pause = FIRST_WRITE_PAUSE;
        // A write that failed may have committed all the same (the connection dropped before
        // the reply): a later try then finds the token gone, which must not be taken for "not
        // ours" (the attempt would delete outputs the task now lists).
        let mut failed_once = false;
        loop {
            let r = match write {
                Write::Final(outcome) => {
                    self.store
                        .finish_routed(&claim.task.id, &claim.token, outcome, route, now_ms())
                        .await
                }
                Write::Requeue { run_after, ended } => {
                    self.store
                        .requeue_failed(&claim.task.id, &claim.token, *run_after, ended)
                        .await
                }
            };
            // After a failed try, "not ours" is checked by reading the task back; a read that
            // fails is no answer either, and is retried like the write.
            let r = match r {
                Ok(false) if failed_once => match self.landed(claim, write).await {
                    Ok(true) => Ok(true),
                    Ok(false) => Ok(false),
                    Err(e) => Err(e),
                },
                other => other,
            };
            match r {
                Ok(true) => return Settled::Written,
                Ok(false) => return Settled::NotOurs,
                Err(e) => {
                    failed_once = true;
                    if Instant::now() + pause >= lease_until {
                        return Settled::NotWritten(e);
                    }
                    warn!(error = %error_chain(&e), retry_in = ?pause, "cannot write the outcome; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_WRITE_PAUSE);
                }
            }
        }
    }
}

impl Dispatcher {
    /// Whether an earlier try of `write` that reported an error had in fact committed: the task
    /// is in the state it would have left it in, with this attempt's outputs or failure.
    async fn landed(&self, claim: &Claim, write: &Write) -> Result<bool, StoreError> {
        let Some(task) = self.store.get_task(&claim.task.id).await? else {
            return Ok(false);
        };
        Ok(match write {
            Write::Final(Outcome::Success { outputs, .. }) => {
                task.state == taskgate_proto::TaskState::Success && &task.outputs == outputs
            }
            Write::Final(Outcome::Failure { code, message }) => {
                task.state == taskgate_proto::TaskState::Failed
                    && task.fail_code.as_ref() == Some(code)
                    && task.fail_msg.as_ref() == Some(message)
            }
            // A requeue that landed leaves the task pending (or already claimed again); either
            // way nothing of this attempt is published, so "not ours" is harmless.
            Write::Requeue { .. } => false,
        })
    }
}

/// A failure outcome with its code and message made safe to store.
fn failure(code: &str, message: &str) -> Outcome {
    let (code, message) = cleaned(code, message);
    Outcome::Failure { code, message }
}

/// A failCode and failMsg made safe to store (an empty code becomes GENERATION_FAILED).
fn cleaned(code: &str, message: &str) -> (String, String) {
    let code = clean_text(code, MAX_FAIL_CODE);
    let code = if code.trim().is_empty() {
        crate::domain::fail_code::GENERATION_FAILED.to_owned()
    } else {
        code
    };
    (code, clean_text(&scrub_secrets(message), MAX_FAIL_MSG))
}

fn log_outcome(outcome: &Outcome, elapsed: Duration) {
    let elapsed_ms = elapsed.as_millis() as u64;
    match outcome {
        // Per-task success lines are debug: at info, logging was a measurable share of a drain.
        Outcome::Success { outputs, .. } => {
            debug!(outputs = outputs.len(), elapsed_ms, "succeeded")
        }
        Outcome::Failure { code, message } => info!(%code, reason = %message, elapsed_ms, "failed"),
    }
}
