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

/// A disk-full error told on to several callers by its text alone (the SQLite writer answers
/// every write of a failed round with one error), kept recognisable by [`storage_full`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StorageFull(pub String);

/// Whether `e`, or anything in its cause chain, says that the disk is full: `ENOSPC` or
/// `EDQUOT` from a file write, `SQLITE_FULL`, PostgreSQL's `disk_full` (53100). These are
/// answered 507 rather than 500 or 503: nothing was stored, and it will not get better by
/// itself until someone frees space, which the operator must be told apart from a fault.
pub fn storage_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.is::<StorageFull>() {
            return true;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io_full(io) {
                return true;
            }
        }
        if let Some(r) = c.downcast_ref::<rusqlite::Error>() {
            if r.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
                return true;
            }
        }
        if let Some(s) = c.downcast_ref::<sqlx::Error>() {
            match s {
                sqlx::Error::Io(io) if io_full(io) => return true,
                sqlx::Error::Database(db)
                    if matches!(db.code().as_deref(), Some("13" | "53100")) =>
                {
                    return true
                }
                _ => {}
            }
        }
        cur = c.source();
    }
    false
}

fn io_full(e: &std::io::Error) -> bool {
    // std decodes ENOSPC and EDQUOT into these kinds.
    use std::io::ErrorKind::{QuotaExceeded, StorageFull};
    matches!(e.kind(), StorageFull | QuotaExceeded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_and_edquot_are_a_full_disk_down_the_cause_chain_and_other_errors_are_not() {
        for errno in [nix::errno::Errno::ENOSPC, nix::errno::Errno::EDQUOT] {
            let io = std::io::Error::from_raw_os_error(errno as i32);
            assert!(storage_full(&io), "{errno}");
            let wrapped = sqlx::Error::Io(std::io::Error::from_raw_os_error(errno as i32));
            assert!(storage_full(&wrapped), "{errno} inside sqlx");
        }
        assert!(storage_full(&StorageFull(
            "database or disk is full".into()
        )));
        let other = std::io::Error::from_raw_os_error(nix::errno::Errno::EACCES as i32);
        assert!(!storage_full(&other));
    }
}
