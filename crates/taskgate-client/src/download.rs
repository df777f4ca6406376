//! Streaming result files to disk.
//!
//! Result URLs expire after 24 hours, so callers are expected to keep their outputs. The body is
//! written chunk by chunk (memory stays flat for large videos) to a hidden `.part` file that is
//! renamed only once complete, so an interrupted download never looks like a finished one.

use std::path::{Path, PathBuf};

use reqwest::header::AUTHORIZATION;
use tokio::io::AsyncWriteExt;
use url::Url;

use crate::{api_failure, transport_failure, Client, Error};

/// Bytes written so far, reported by [`Client::download_with_progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadProgress {
    /// Bytes received and written.
    pub downloaded: u64,
    /// Total size from `Content-Length`, when the server sent one.
    pub total: Option<u64>,
}

impl Client {
    /// Downloads `result_url` into the directory `dir` (created if missing) and returns the path
    /// written. The file name is the last segment of the URL's path; a file of that name already
    /// in `dir` is kept, and the new one is saved as `name-1.ext` (then `-2`, …).
    ///
    /// The API key is sent only when the URL is on the API's own origin (taskgate serving its
    /// artifacts), never to a third-party CDN.
    ///
    /// ```no_run
    /// # async fn demo(client: taskgate_client::Client) -> Result<(), taskgate_client::Error> {
    /// let path = client.download("https://cdn.example.com/output/fox.png", "out").await?;
    /// assert_eq!(path, std::path::Path::new("out/fox.png"));
    /// # Ok(()) }
    /// ```
    pub async fn download(
        &self,
        result_url: &str,
        dir: impl AsRef<Path>,
    ) -> Result<PathBuf, Error> {
        self.download_with_progress(result_url, dir, |_| {}).await
    }

    /// [`Client::download`], calling `progress` after every chunk written.
    ///
    /// ```no_run
    /// # async fn demo(client: taskgate_client::Client) -> Result<(), taskgate_client::Error> {
    /// client
    ///     .download_with_progress("https://cdn.example.com/output/clip.mp4", "out", |p| {
    ///         eprint!("\r{} / {:?} bytes", p.downloaded, p.total);
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn download_with_progress(
        &self,
        result_url: &str,
        dir: impl AsRef<Path>,
        mut progress: impl FnMut(DownloadProgress) + Send,
    ) -> Result<PathBuf, Error> {
        let url = Url::parse(result_url).map_err(|e| Error::InvalidUrl {
            url: result_url.to_owned(),
            reason: e.to_string(),
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::InvalidUrl {
                url: result_url.to_owned(),
                reason: "the scheme must be http or https".into(),
            });
        }
        let name = file_name_from_url(&url);
        let dir = dir.as_ref();
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| Error::Io {
                path: dir.to_owned(),
                source,
            })?;
        let mut resp = self.open_download(&url).await?;
        let total = resp.content_length();
        let (part, mut file) = new_part_file(dir, &name).await?;
        let mut downloaded = 0u64;
        let result = async {
            loop {
                let chunk = resp.chunk().await.map_err(|e| Error::Transport {
                    url: url.to_string(),
                    reason: crate::error::transport_reason(&e),
                    source: e,
                })?;
                let Some(chunk) = chunk else { break };
                file.write_all(&chunk).await.map_err(|source| Error::Io {
                    path: part.clone(),
                    source,
                })?;
                downloaded += chunk.len() as u64;
                progress(DownloadProgress { downloaded, total });
            }
            file.flush().await.map_err(|source| Error::Io {
                path: part.clone(),
                source,
            })?;
            drop(file);
            place_without_clobbering(&part, dir, &name).await
        }
        .await;
        if result.is_err() {
            // Best effort: a leftover .part file is harmless, and the original error matters more.
            let _ = tokio::fs::remove_file(&part).await;
        }
        result
    }

    /// Sends the GET, retrying transient failures before any byte of the body is read.
    async fn open_download(&self, url: &Url) -> Result<reqwest::Response, Error> {
        let mut failures = 0u32;
        loop {
            let mut req = self.http.get(url.clone());
            if self.same_origin(url) {
                if let Some(auth) = &self.auth {
                    req = req.header(AUTHORIZATION, auth.clone());
                }
            }
            let outcome = match req.send().await {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) => {
                    let status = resp.status();
                    let headers = resp.headers().clone();
                    let body = resp.bytes().await.unwrap_or_default();
                    api_failure(status, &body, &headers)
                }
                Err(e) => transport_failure(url, e, true),
            };
            failures += 1;
            self.pause_before_retry(outcome, failures).await?;
        }
    }
}

/// The last non-empty path segment, percent-decoded, reduced to characters that are safe in a
/// file name on every platform; `download` when nothing usable is left. A URL can never name a
/// file outside the target directory.
pub(crate) fn file_name_from_url(url: &Url) -> String {
    let raw = url
        .path_segments()
        .and_then(|mut segs| segs.rfind(|s| !s.is_empty()))
        .unwrap_or("");
    let decoded = percent_decode(raw);
    let cleaned: String = decoded
        .chars()
        .map(|c| match c {
            '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|' => '_',
            c if c.is_control() => '_',
            c => c,
        })
        .collect();
    let cleaned = cleaned.trim_matches(|c: char| c == '.' || c.is_whitespace());
    if cleaned.is_empty() {
        "download".to_owned()
    } else {
        cleaned.to_owned()
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A hidden file of this download's own (`.fox.png.<random>.part`, created new): two downloads
/// of one name into one directory must never write into the same file.
async fn new_part_file(dir: &Path, name: &str) -> Result<(PathBuf, tokio::fs::File), Error> {
    loop {
        let part = dir.join(format!(".{name}.{:016x}.part", rand::random::<u64>()));
        match tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&part)
            .await
        {
            Ok(file) => return Ok((part, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => return Err(Error::Io { path: part, source }),
        }
    }
}

/// Gives the finished `part` its name in `dir`, keeping any file already there: `fox.png`, else
/// `fox-1.png`, `fox-2.png`, … (two tasks' results, or two runs into one directory, often share a
/// name). A hard link claims the name atomically, so two downloads cannot take the same one.
async fn place_without_clobbering(part: &Path, dir: &Path, name: &str) -> Result<PathBuf, Error> {
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => name.split_at(i),
        _ => (name, ""),
    };
    for n in 0u32..10_000 {
        let candidate = if n == 0 {
            name.to_owned()
        } else {
            format!("{stem}-{n}{ext}")
        };
        let dest = dir.join(candidate);
        match tokio::fs::hard_link(part, &dest).await {
            Ok(()) => {
                // A part file left behind (removal refused) is this download's own, never
                // reopened, so it cannot touch the result.
                let _ = tokio::fs::remove_file(part).await;
                return Ok(dest);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            // A filesystem without hard links: check, then rename (a race with another writer
            // of the same name is then possible, but nothing earlier is overwritten knowingly).
            Err(_) if !tokio::fs::try_exists(&dest).await.unwrap_or(true) => {
                return tokio::fs::rename(part, &dest)
                    .await
                    .map(|()| dest.clone())
                    .map_err(|source| Error::Io { path: dest, source });
            }
            Err(source) => return Err(Error::Io { path: dest, source }),
        }
    }
    Err(Error::Io {
        path: dir.join(name),
        source: std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "10,000 files of this name are already in the directory",
        ),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn name(u: &str) -> String {
        file_name_from_url(&Url::parse(u).unwrap())
    }

    #[test]
    fn the_file_name_is_the_last_path_segment() {
        assert_eq!(name("https://cdn.apixo.ai/output/abc.png"), "abc.png");
        assert_eq!(
            name("https://cdn.apixo.ai/output/abc.png?sig=1#x"),
            "abc.png"
        );
        assert_eq!(name("https://cdn.apixo.ai/output/dir/"), "dir");
        assert_eq!(name("https://cdn.apixo.ai/my%20file.mp4"), "my file.mp4");
    }

    #[test]
    fn a_url_cannot_name_a_file_outside_the_directory() {
        assert_eq!(name("https://h/a/%2e%2e"), "download");
        assert_eq!(name("https://h/a/..%2f..%2fetc%2fpasswd"), "_.._etc_passwd");
        assert_eq!(name("https://h/"), "download");
        assert_eq!(name("https://h/.hidden"), "hidden");
    }
}
