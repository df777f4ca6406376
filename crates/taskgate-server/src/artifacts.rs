//! Result files: where outputs are kept and the signed URLs that fetch them.
//!
//! An artifact key is `{task_id}/{attempt tag}/{file name}`: each attempt stages its outputs
//! under its own tag (derived from its claim token, see `domain::attempt_tag`), and they become
//! the task's outputs only through the token-guarded write of `success`, so a stale attempt can
//! never overwrite the files of the attempt that won. (Keys `{task_id}/{name}` of tasks finished
//! before attempts were tagged are still served.) The local store keeps a key under
//! `DATA_DIR/files/{last two characters of the task id}/{task_id}@{tag}.{name}` and serves it at
//! `/files/{task_id}/{tag}/{name}?expires=&sig=`,
//! where `sig` is an HMAC-SHA256 over the key and the expiry with a server-wide secret kept in
//! the store (so every node of a cluster signs alike). URLs need no API key: like APIXO's CDN
//! links they are meant to be handed to browsers, and they stop working at `expires`.
//!
//! The S3 store ([`S3Artifacts`]) uploads to a bucket instead and answers with presigned GET
//! URLs, so that the bucket, not taskgate, serves the bytes.

mod s3;

pub use s3::S3Artifacts;

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use sha2::Sha256;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact key {0:?} is not of the form TASK_ID/TAG/NAME")]
    BadKey(String),
    #[error("cannot store artifact {key}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot upload artifact {key} to object storage")]
    Upload {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot presign a URL for artifact {key}")]
    Sign {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot set up object storage for bucket {bucket}")]
    Setup {
        bucket: String,
        #[source]
        source: object_store::Error,
    },
}

/// Where result files live: a local directory, or an S3-compatible bucket.
#[async_trait]
pub trait ArtifactStore: Send + Sync + 'static {
    /// Moves (or copies, or uploads) the file at `src` in under `key`.
    async fn put_file(&self, key: &str, src: &Path) -> Result<(), ArtifactError>;
    /// Stores `content` under `key`.
    async fn put_bytes(&self, key: &str, content: Vec<u8>) -> Result<(), ArtifactError>;
    /// Whether `url` gives the same URL for the same key and expiry every time, so a rendered
    /// view can be kept and sent again. Presigned URLs of a bucket depend on the credentials in
    /// force when signing (temporary ones expire before the URL would), so they are not.
    fn stable_urls(&self) -> bool {
        false
    }
    /// Largest in-memory output kept in the database instead of here (served through this
    /// node's signed `/files` URLs); 0 where results must be served by the store itself.
    fn inline_max(&self) -> usize {
        0
    }
    /// An absolute URL that fetches `key` until `expires_at` (Unix seconds). Async because
    /// presigning may first have to fetch or refresh cloud credentials.
    async fn url(&self, key: &str, expires_at: i64) -> Result<String, ArtifactError>;
    /// Whether `key` holds a file.
    async fn exists(&self, key: &str) -> Result<bool, ArtifactError>;
    /// Removes `key`; removing a key that holds nothing is not an error.
    async fn delete(&self, key: &str) -> Result<(), ArtifactError>;
}

/// Largest output the local store keeps in the database (`output_blobs`) rather than as a file:
/// an inode per small output was the largest cost of a short task on ext4.
pub const INLINE_MAX: usize = 64 * 1024;

/// The key of output `name` staged by the attempt tagged `tag` of `task_id`.
pub fn staged_key(task_id: &str, tag: &str, name: &str) -> String {
    format!("{task_id}/{tag}/{name}")
}

/// Splits a key into task id, attempt tag (absent in keys made before attempts were tagged)
/// and name, if every part is a plain name we could have made.
pub fn split_key(key: &str) -> Option<(&str, Option<&str>, &str)> {
    let mut parts = key.split('/');
    let (task_id, second, third) = (parts.next()?, parts.next()?, parts.next());
    if parts.next().is_some() || task_id.contains('.') || !is_safe_name(task_id) {
        return None;
    }
    let (tag, name) = match third {
        Some(name) => (Some(second), name),
        None => (None, second),
    };
    let tag_ok = tag.is_none_or(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_hexdigit()));
    (tag_ok && is_safe_name(name)).then_some((task_id, tag, name))
}

/// Renders a task's status with result URLs valid until completion + the URL lifetime; the same
/// view serves statusTask and callback payloads, so both carry identical URLs.
#[derive(Clone)]
pub struct ResultLinks {
    pub store: std::sync::Arc<dyn ArtifactStore>,
    pub ttl_secs: i64,
}

impl ResultLinks {
    pub async fn status_of(
        &self,
        task: &crate::domain::Task,
    ) -> Result<taskgate_proto::TaskStatus, ArtifactError> {
        let expires =
            task.complete_time.unwrap_or_else(crate::domain::now_ms) / 1000 + self.ttl_secs;
        // URLs are made first because `Task::status` takes a sync closure; only a success shows
        // them, so nothing is signed for other states.
        let mut urls = std::collections::HashMap::new();
        if task.state == taskgate_proto::TaskState::Success {
            for key in &task.outputs {
                urls.insert(key.as_str(), self.store.url(key, expires).await?);
            }
        }
        Ok(task.status(|key| urls.get(key).cloned().unwrap_or_default()))
    }
}

/// Signs and checks `/files/...` links.
#[derive(Clone)]
pub struct UrlSigner {
    key: Vec<u8>,
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UrlSigner(<redacted>)")
    }
}

impl UrlSigner {
    pub fn new(key: Vec<u8>) -> Self {
        UrlSigner { key }
    }

    fn mac(&self, key: &str, expires_at: i64) -> Hmac<Sha256> {
        // new_from_slice only fails for fixed-size MACs; HMAC takes any key length.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(key.as_bytes());
        mac.update(b"\n");
        mac.update(expires_at.to_string().as_bytes());
        mac
    }

    pub fn sign(&self, key: &str, expires_at: i64) -> String {
        hex::encode(self.mac(key, expires_at).finalize().into_bytes())
    }

    /// Constant-time check of a signature given as hex.
    pub fn verify(&self, key: &str, expires_at: i64, sig_hex: &str) -> bool {
        match hex::decode(sig_hex) {
            Ok(sig) => self.mac(key, expires_at).verify_slice(&sig).is_ok(),
            Err(_) => false,
        }
    }
}

pub struct LocalArtifacts {
    root: PathBuf,
    public_url: String,
    signer: UrlSigner,
}

impl LocalArtifacts {
    pub fn new(root: PathBuf, public_url: String, signer: UrlSigner) -> Self {
        LocalArtifacts {
            root,
            public_url: public_url.trim_end_matches('/').to_owned(),
            signer,
        }
    }

    pub fn signer(&self) -> &UrlSigner {
        &self.signer
    }

    /// The file behind an artifact key, if it is one we could have made (no path tricks).
    ///
    /// Files live flat in one of 1024 bucket directories named by the task id's last two
    /// characters (random in a ULID), as `{task_id}@{tag}.{name}` (`{task_id}.{name}` for keys
    /// without a tag): a directory per task would cost an inode allocation per task, which
    /// dominated short tasks on ext4. Task ids and tags contain neither `.` nor `@`, so the file
    /// name is unambiguous.
    pub fn path_of(&self, key: &str) -> Option<PathBuf> {
        let (task_id, tag, name) = split_key(key)?;
        let bucket = task_id
            .get(task_id.len().saturating_sub(2)..)
            .filter(|b| b.len() == 2)
            .unwrap_or("00");
        let file = match tag {
            Some(tag) => format!("{task_id}@{tag}.{name}"),
            None => format!("{task_id}.{name}"),
        };
        Some(self.root.join(bucket).join(file))
    }

    fn path_or_bad_key(&self, key: &str) -> Result<PathBuf, ArtifactError> {
        self.path_of(key)
            .ok_or_else(|| ArtifactError::BadKey(key.to_owned()))
    }
}

/// A single path component we produced ourselves: no separators, no leading dot.
pub fn is_safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// The names under which an attempt's files are stored: each made safe ([`sanitize_name`]) and
/// made distinct (`a b.png` and `a_b.png` would collide; the later one gets a `_` prefix), so
/// no output silently replaces another. Used for local attempts and by `taskgate worker`.
pub fn output_names<T>(files: Vec<(String, T)>) -> Vec<(String, T)> {
    let mut used = std::collections::HashSet::new();
    files
        .into_iter()
        .map(|(relative, path)| {
            let mut name = sanitize_name(&relative);
            while !used.insert(name.clone()) {
                name = format!("_{name}");
            }
            (name, path)
        })
        .collect()
}

/// Makes a backend's file name safe to serve: other characters become `_`.
pub fn sanitize_name(raw: &str) -> String {
    let mut s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    while s.starts_with('.') {
        s.replace_range(0..1, "_");
    }
    if s.is_empty() {
        s.push_str("output");
    }
    if s.len() > 200 {
        // Keep the extension, which decides the Content-Type.
        let ext = Path::new(&s)
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| format!(".{}", &e[..e.len().min(16)]))
            .unwrap_or_default();
        s.truncate(200 - ext.len());
        s.push_str(&ext);
    }
    s
}

#[async_trait]
impl ArtifactStore for LocalArtifacts {
    async fn put_file(&self, key: &str, src: &Path) -> Result<(), ArtifactError> {
        let dest = self.path_or_bad_key(key)?;
        let io = |source| ArtifactError::Io {
            key: key.to_owned(),
            source,
        };
        let src = src.to_path_buf();
        // One blocking call for the directory and the move: each tokio::fs step is a thread hop.
        tokio::task::spawn_blocking(move || {
            if let Some(dir) = dest.parent() {
                std::fs::create_dir_all(dir)?;
            }
            // The work dir is on the same file system, so this is a rename; copy if it is not.
            if std::fs::rename(&src, &dest).is_err() {
                std::fs::copy(&src, &dest)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| io(std::io::Error::other(e)))?
        .map_err(io)
    }

    async fn put_bytes(&self, key: &str, content: Vec<u8>) -> Result<(), ArtifactError> {
        let dest = self.path_or_bad_key(key)?;
        let io = |source| ArtifactError::Io {
            key: key.to_owned(),
            source,
        };
        tokio::task::spawn_blocking(move || {
            if let Some(dir) = dest.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&dest, content)
        })
        .await
        .map_err(|e| io(std::io::Error::other(e)))?
        .map_err(io)
    }

    fn inline_max(&self) -> usize {
        INLINE_MAX
    }

    fn stable_urls(&self) -> bool {
        true
    }

    async fn url(&self, key: &str, expires_at: i64) -> Result<String, ArtifactError> {
        Ok(format!(
            "{}/files/{key}?expires={expires_at}&sig={}",
            self.public_url,
            self.signer.sign(key, expires_at)
        ))
    }

    async fn exists(&self, key: &str) -> Result<bool, ArtifactError> {
        let path = self.path_or_bad_key(key)?;
        tokio::fs::try_exists(&path)
            .await
            .map_err(|source| ArtifactError::Io {
                key: key.to_owned(),
                source,
            })
    }

    async fn delete(&self, key: &str) -> Result<(), ArtifactError> {
        let path = self.path_or_bad_key(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ArtifactError::Io {
                key: key.to_owned(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_fails_for_another_key_expiry_or_secret() {
        let s = UrlSigner::new(b"secret".to_vec());
        let sig = s.sign("task_1/a.png", 100);
        assert!(s.verify("task_1/a.png", 100, &sig));
        assert!(!s.verify("task_1/b.png", 100, &sig));
        assert!(!s.verify("task_1/a.png", 101, &sig));
        assert!(!UrlSigner::new(b"other".to_vec()).verify("task_1/a.png", 100, &sig));
        assert!(!s.verify("task_1/a.png", 100, "zz"));
    }

    #[test]
    fn local_files_live_flat_in_buckets_and_refuse_ambiguous_keys() {
        let store = LocalArtifacts::new(
            PathBuf::from("/d/files"),
            "http://h".into(),
            UrlSigner::new(b"k".to_vec()),
        );
        assert_eq!(
            store.path_of("task_01abcz/0a1b/image.png"),
            Some(PathBuf::from("/d/files/cz/task_01abcz@0a1b.image.png"))
        );
        assert_eq!(
            store.path_of("task_01abcz/image.png"),
            Some(PathBuf::from("/d/files/cz/task_01abcz.image.png"))
        );
        assert_eq!(store.path_of("task.x/png"), None);
        assert_eq!(store.path_of("../x"), None);
        assert_eq!(store.path_of("t/not-hex/x"), None);
        assert_eq!(store.path_of("t/ab/x/y"), None);
        assert_eq!(store.path_of("t/x"), Some(PathBuf::from("/d/files/00/t.x")));
    }

    #[test]
    fn output_names_that_collide_once_made_safe_stay_distinct() {
        let names: Vec<String> = output_names(vec![
            ("a b.png".into(), PathBuf::from("/x/1")),
            ("a_b.png".into(), PathBuf::from("/x/2")),
        ])
        .into_iter()
        .map(|(n, _)| n)
        .collect();
        assert_eq!(names, ["a_b.png", "_a_b.png"]);
    }

    #[test]
    fn names_are_made_safe_and_keep_their_extension() {
        assert_eq!(sanitize_name("../etc/passwd"), "_._etc_passwd");
        assert_eq!(sanitize_name(".hidden"), "_hidden");
        assert_eq!(sanitize_name("a b.png"), "a_b.png");
        assert!(sanitize_name(&format!("{}.png", "x".repeat(300))).ends_with(".png"));
        assert!(is_safe_name(&sanitize_name("ü/../../x")));
    }
}
