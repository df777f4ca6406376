//! The one error type of the SDK.

use std::path::PathBuf;
use std::time::Duration;

use taskgate_proto::{TaskState, TaskStatus};

/// Everything that can go wrong talking to an APIXO-compatible server.
///
/// The variants separate the cases a caller reacts to differently: the server said no
/// ([`Error::Api`], carrying the envelope's `code` and `message`), the server could not be reached
/// ([`Error::Transport`]), the task ended in `failed` ([`Error::TaskFailed`]), and waiting ran out
/// of time ([`Error::Timeout`]).
///
/// ```
/// # async fn demo(client: taskgate_client::Client) {
/// use taskgate_client::{Error, WaitOptions};
/// match client.wait("echo", "task_1", WaitOptions::default()).await {
///     Ok(status) => println!("done: {:?}", status.result()),
///     Err(Error::TaskFailed { fail_msg, .. }) => eprintln!("failed: {fail_msg:?}"),
///     Err(Error::Api { status: 401, message, .. }) => eprintln!("key refused: {message}"),
///     Err(e) => eprintln!("{e}"),
/// }
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The base URL (or a result URL) is not an absolute http(s) URL.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The server answered with an error envelope (or a non-2xx status without one).
    #[error("server answered HTTP {status}: {message}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Api {
        /// HTTP status of the response (or the envelope's code when a server answers errors with
        /// HTTP 200, which some APIXO-style gateways do).
        status: u16,
        /// The envelope's `code`.
        code: u16,
        /// The envelope's `message`.
        message: String,
        /// `data.error`, when the server gave one (e.g. "Missing required field: input.prompt").
        detail: Option<String>,
        /// `data.errorCode`, taskgate's machine-readable reason (APIXO itself sends none); kept
        /// as text so a code newer than this client still arrives. See [`Error::error_code`].
        error_code: Option<String>,
    },

    /// The request did not get an HTTP answer: refused connection, DNS failure, reset, TLS or
    /// request timeout.
    #[error("cannot reach {url}: {reason}")]
    Transport {
        /// The URL that was being requested.
        url: String,
        /// A short human reason, e.g. "connection refused".
        reason: String,
        /// The underlying error, with its full cause chain.
        #[source]
        source: reqwest::Error,
    },

    /// The server answered 2xx but not with something this client understands.
    #[error("unexpected response from {url}: {reason}")]
    Protocol {
        /// The URL that was requested.
        url: String,
        /// What was wrong with the answer.
        reason: String,
    },

    /// [`Client::wait`](crate::Client::wait) gave up before the task reached a final state.
    #[error("timed out after {} waiting for task {task_id} (last state: {})",
        humanize(*elapsed),
        last_state.map(TaskState::as_str).unwrap_or("unknown"))]
    Timeout {
        /// The task that was being waited on.
        task_id: String,
        /// How long the client waited.
        elapsed: Duration,
        /// The last state seen, if any poll succeeded.
        last_state: Option<TaskState>,
    },

    /// The task reached the `failed` state.
    #[error("task {task_id} failed: {}", describe_failure(fail_code.as_deref(), fail_msg.as_deref()))]
    TaskFailed {
        /// The task that failed.
        task_id: String,
        /// `failCode` from the status, if any.
        fail_code: Option<String>,
        /// `failMsg` from the status, if any.
        fail_msg: Option<String>,
        /// The full final status.
        status: Box<TaskStatus>,
    },

    /// The caller's input cannot be sent (e.g. `input` is not a JSON object).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// Writing a download to disk failed.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        /// The file or directory being written.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// Reading a file to upload failed ([`WorkerClient::upload`](crate::WorkerClient::upload)).
    #[error("cannot read {}: {source}", path.display())]
    ReadFile {
        /// The file being read.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether retrying the same request later could succeed: rate limiting (429), server-side
    /// errors (5xx) and transport failures.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Api { status, .. } => is_transient_status(*status),
            Error::Transport { .. } => true,
            _ => false,
        }
    }

    /// The server's machine-readable reason (`data.errorCode`), if it sent one this client
    /// knows. A taskgate server always sends one with an error; APIXO sends none, so decide by
    /// `status` when this is `None`.
    pub fn error_code(&self) -> Option<taskgate_proto::ErrorCode> {
        match self {
            Error::Api {
                error_code: Some(c),
                ..
            } => taskgate_proto::ErrorCode::parse(c),
            _ => None,
        }
    }
}

pub(crate) fn is_transient_status(status: u16) -> bool {
    status == 429 || (500..=599).contains(&status)
}

fn describe_failure(code: Option<&str>, msg: Option<&str>) -> String {
    match (code, msg) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.to_owned(),
        (None, Some(m)) => m.to_owned(),
        (None, None) => "no reason given".to_owned(),
    }
}

/// Whole seconds are enough precision for a person; sub-second waits show in milliseconds.
pub(crate) fn humanize(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

/// Reduces a reqwest error to the few words a person needs ("connection refused"), by finding the
/// innermost IO error in its cause chain; reqwest's own message only says "error sending request".
pub(crate) fn transport_reason(err: &reqwest::Error) -> String {
    if err.is_timeout() {
        return "the request timed out".to_owned();
    }
    let mut io: Option<&std::io::Error> = None;
    let mut innermost: &dyn std::error::Error = err;
    let mut cur: Option<&dyn std::error::Error> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = e.downcast_ref::<std::io::Error>() {
            io = Some(found);
        }
        innermost = e;
        cur = e.source();
    }
    if let Some(io) = io {
        use std::io::ErrorKind as K;
        return match io.kind() {
            K::ConnectionRefused => "connection refused".to_owned(),
            K::ConnectionReset => "connection reset by the server".to_owned(),
            K::ConnectionAborted => "connection aborted".to_owned(),
            K::TimedOut => "connection timed out".to_owned(),
            K::UnexpectedEof => "the server closed the connection".to_owned(),
            _ => io.to_string(),
        };
    }
    if err.is_connect() {
        return format!("connection failed ({innermost})");
    }
    innermost.to_string()
}
