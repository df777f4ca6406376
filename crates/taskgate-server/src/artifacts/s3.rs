//! Result files in an S3-compatible bucket (AWS S3, MinIO, R2, moto…), through `object_store`.
//!
//! A key `TASK_ID/NAME` is stored as `[PREFIX/]TASK_ID/NAME` with a `Content-Type` guessed from
//! the name (the same guess `/files` makes), and result URLs are SigV4 presigned GETs straight to
//! the bucket: taskgate never proxies the bytes, so any node (or none) can hand out a link.
//!
//! Concurrency: the store is shared by all dispatch loops; `object_store` clients are cheap to
//! share and pool their own connections. A large upload keeps at most
//! `PARTS_IN_FLIGHT` parts of `PART_SIZE` in memory at once, whatever the file's size.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{
    Attribute, Attributes, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, WriteMultipart,
};
use tokio::io::AsyncReadExt;

use super::{split_key, ArtifactError, ArtifactStore};
use crate::config::{S3Config, S3_MAX_URL_TTL};

/// Files up to this size go up in one PUT (read whole); larger ones as a multipart upload.
const SINGLE_PUT_MAX: u64 = 16 * 1024 * 1024;
/// Multipart part size: S3 needs at least 5 MiB for every part but the last.
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts uploading at once; bounds a large upload's memory to about this times `PART_SIZE`.
const PARTS_IN_FLIGHT: usize = 4;
/// Read buffer while streaming a large file into parts.
const READ_CHUNK: usize = 256 * 1024;

pub struct S3Artifacts {
    store: AmazonS3,
    bucket: String,
    prefix: ObjectPath,
}

impl std::fmt::Debug for S3Artifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Artifacts")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix.as_ref())
            .finish()
    }
}

impl S3Artifacts {
    /// Builds the client; no request is made until the first upload or URL.
    pub fn new(config: &S3Config) -> Result<Self, ArtifactError> {
        let setup = |source| ArtifactError::Setup {
            bucket: config.bucket.clone(),
            source,
        };
        // Explicit keys replace the environment entirely, so that a stray AWS_SESSION_TOKEN
        // or AWS_ENDPOINT cannot mix with them; otherwise the standard AWS variables apply.
        let mut builder = match &config.credentials {
            Some(c) => AmazonS3Builder::new()
                .with_access_key_id(&c.access_key_id)
                .with_secret_access_key(&c.secret_access_key),
            None => AmazonS3Builder::from_env(),
        }
        .with_bucket_name(&config.bucket)
        .with_region(&config.region);
        if let Some(endpoint) = &config.endpoint {
            // S3-compatible servers rarely have per-bucket host names, so path-style it is; plain
            // HTTP is allowed only because the operator wrote an http:// endpoint.
            builder = builder
                .with_endpoint(endpoint.trim_end_matches('/'))
                .with_virtual_hosted_style_request(false)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let store = builder.build().map_err(setup)?;
        let prefix = match config.prefix.as_deref().map(|p| p.trim_matches('/')) {
            None | Some("") => ObjectPath::default(),
            Some(p) => ObjectPath::parse(p).map_err(|e| setup(e.into()))?,
        };
        Ok(S3Artifacts {
            store,
            bucket: config.bucket.clone(),
            prefix,
        })
    }

    /// The object behind `TASK_ID/TAG/NAME` (or `TASK_ID/NAME`), refusing keys we did not make.
    fn location(&self, key: &str) -> Result<ObjectPath, ArtifactError> {
        let (task_id, tag, name) =
            split_key(key).ok_or_else(|| ArtifactError::BadKey(key.to_owned()))?;
        let base = self.prefix.child(task_id);
        Ok(match tag {
            Some(tag) => base.child(tag).child(name),
            None => base.child(name),
        })
    }

    /// One PUT of a whole object, stored with its content type so the bucket answers presigned
    /// GETs with the right one.
    async fn put_one(&self, key: &str, content: Vec<u8>) -> Result<(), ArtifactError> {
        let location = self.location(key)?;
        let content_type = mime_guess::from_path(key).first_or_octet_stream();
        let opts = PutOptions {
            attributes: Attributes::from_iter([(Attribute::ContentType, content_type.to_string())]),
            ..Default::default()
        };
        self.store
            .put_opts(&location, PutPayload::from(content), opts)
            .await
            .map_err(|source| ArtifactError::Upload {
                key: key.to_owned(),
                source,
            })?;
        Ok(())
    }

    async fn put_multipart(
        &self,
        key: &str,
        location: &ObjectPath,
        src: &Path,
        attributes: Attributes,
    ) -> Result<(), ArtifactError> {
        let upload_err = |source| ArtifactError::Upload {
            key: key.to_owned(),
            source,
        };
        let mut file = tokio::fs::File::open(src)
            .await
            .map_err(|source| ArtifactError::Io {
                key: key.to_owned(),
                source,
            })?;
        let opts = PutMultipartOptions {
            attributes,
            ..Default::default()
        };
        let upload = self
            .store
            .put_multipart_opts(location, opts)
            .await
            .map_err(upload_err)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        match stream_into(key, &mut file, &mut writer).await {
            Ok(()) => writer.finish().await.map(drop).map_err(upload_err),
            Err(e) => {
                // An unfinished multipart upload keeps its parts (and their cost) until aborted.
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(%key, error = %crate::report::error_chain(&abort),
                        "cannot abort a failed multipart upload; a bucket lifecycle rule will have to clean it up");
                }
                Err(e)
            }
        }
    }
}

/// Copies `file` into `writer`, waiting for part uploads so memory stays bounded.
async fn stream_into(
    key: &str,
    file: &mut tokio::fs::File,
    writer: &mut WriteMultipart,
) -> Result<(), ArtifactError> {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        writer
            .wait_for_capacity(PARTS_IN_FLIGHT)
            .await
            .map_err(|source| ArtifactError::Upload {
                key: key.to_owned(),
                source,
            })?;
        let n = file
            .read(&mut buf)
            .await
            .map_err(|source| ArtifactError::Io {
                key: key.to_owned(),
                source,
            })?;
        if n == 0 {
            return Ok(());
        }
        writer.write(&buf[..n]);
    }
}

/// How long a URL signed now must live to expire at `expires_at`, within what SigV4 allows:
/// at most 7 days, and at least 1 second (a presigned URL cannot be born expired).
pub(crate) fn presign_duration(expires_at: i64, now_secs: i64) -> Duration {
    let max = S3_MAX_URL_TTL.as_secs() as i64;
    Duration::from_secs(expires_at.saturating_sub(now_secs).clamp(1, max) as u64)
}

#[async_trait]
impl ArtifactStore for S3Artifacts {
    async fn put_file(&self, key: &str, src: &Path) -> Result<(), ArtifactError> {
        let location = self.location(key)?;
        let io = |source| ArtifactError::Io {
            key: key.to_owned(),
            source,
        };
        // Stored with the object, so the bucket answers presigned GETs with the right type.
        let content_type = mime_guess::from_path(key).first_or_octet_stream();
        let attributes =
            Attributes::from_iter([(Attribute::ContentType, content_type.to_string())]);
        let len = tokio::fs::metadata(src).await.map_err(io)?.len();
        if len > SINGLE_PUT_MAX {
            return self.put_multipart(key, &location, src, attributes).await;
        }
        let bytes = tokio::fs::read(src).await.map_err(io)?;
        self.put_one(key, bytes).await
    }

    async fn put_bytes(&self, key: &str, content: Vec<u8>) -> Result<(), ArtifactError> {
        self.put_one(key, content).await
    }

    async fn exists(&self, key: &str) -> Result<bool, ArtifactError> {
        let location = self.location(key)?;
        match self.store.head(&location).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(source) => Err(ArtifactError::Upload {
                key: key.to_owned(),
                source,
            }),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), ArtifactError> {
        let location = self.location(key)?;
        match self.store.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(ArtifactError::Upload {
                key: key.to_owned(),
                source,
            }),
        }
    }

    async fn url(&self, key: &str, expires_at: i64) -> Result<String, ArtifactError> {
        let location = self.location(key)?;
        let ttl = presign_duration(expires_at, crate::domain::now_ms() / 1000);
        let url = self
            .store
            .signed_url(reqwest::Method::GET, &location, ttl)
            .await
            .map_err(|source| ArtifactError::Sign {
                key: key.to_owned(),
                source,
            })?;
        Ok(url.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::S3Credentials;

    fn store(prefix: Option<&str>) -> S3Artifacts {
        S3Artifacts::new(&S3Config {
            endpoint: Some("http://127.0.0.1:9".into()),
            prefix: prefix.map(str::to_owned),
            credentials: Some(S3Credentials {
                access_key_id: "AKIDEXAMPLE".into(),
                secret_access_key: "secret".into(),
            }),
            ..S3Config::new("results")
        })
        .unwrap()
    }

    #[test]
    fn the_url_lifetime_is_what_remains_clamped_to_what_s3_allows() {
        assert_eq!(
            presign_duration(1_000 + 3600, 1_000),
            Duration::from_secs(3600)
        );
        assert_eq!(presign_duration(1_000 + 30 * 86_400, 1_000), S3_MAX_URL_TTL);
        assert_eq!(presign_duration(500, 1_000), Duration::from_secs(1));
    }

    #[test]
    fn keys_land_under_the_prefix_and_foreign_keys_are_refused() {
        let s = store(Some("/results/prod/"));
        assert_eq!(
            s.location("task_1/a.png").unwrap().as_ref(),
            "results/prod/task_1/a.png"
        );
        assert_eq!(
            store(None).location("task_1/a.png").unwrap().as_ref(),
            "task_1/a.png"
        );
        assert!(s.location("task_1/../x").is_err());
        assert!(s.location("no-slash").is_err());
    }

    #[tokio::test]
    async fn a_url_is_a_path_style_presigned_get_for_the_remaining_time() {
        let s = store(Some("p"));
        let expires_at = crate::domain::now_ms() / 1000 + 600;
        let url = url::Url::parse(&s.url("task_1/a.png", expires_at).await.unwrap()).unwrap();
        assert_eq!(url.path(), "/results/p/task_1/a.png");
        let q: std::collections::HashMap<_, _> = url.query_pairs().collect();
        assert_eq!(q["X-Amz-Algorithm"], "AWS4-HMAC-SHA256");
        let secs: i64 = q["X-Amz-Expires"].parse().unwrap();
        assert!((598..=600).contains(&secs), "{secs}");
        assert!(q["X-Amz-Credential"].starts_with("AKIDEXAMPLE/"));
        assert!(!url.as_str().contains("secret"));
    }
}
