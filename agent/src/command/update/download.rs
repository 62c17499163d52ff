//! Download and verification of an update's artifact (ADR 0008 "Delivery").
//!
//! The artifact goes to `<updates dir>/<prefix><sha256>.part`: HTTPS with the terminal's own
//! client certificate (its rustls config, ALPN `http/1.1`), no redirects. After a cut the
//! next attempt asks for `Range: bytes=N-` and appends only if the answer is a 206 whose
//! `Content-Range` starts at N; a 200 starts over at 0. Attempts that gain no byte count
//! towards `retry_attempts`, with jittered exponential delays in between. The file never grows
//! beyond `size_bytes`: more bytes stop the download, delete the file and fail the update
//! (`too_large`). Verification then checks the size, the streamed SHA-256 and the release
//! signature over it, and renames the file to `.artifact`; any mismatch deletes it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use posfleet_proto::signing::ReleaseError;
use rand::SeedableRng;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Outcome, Phase, UpdateJob, failed};

/// Bytes hashed per read while verifying.
const HASH_CHUNK: usize = 64 * 1024;
/// Progress is reported at least this many percent apart, or this long apart.
const PROGRESS_STEP: u32 = 10;
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// How one download attempt ended, when not with the whole file.
enum Attempt {
    /// Worth another attempt (network error, cut, 5xx).
    Retry(String),
    /// The update fails (or stops).
    Fatal(Outcome),
}

impl UpdateJob {
    /// The release signature over `digest`, checked with the pinned release keys.
    pub(super) fn check_signature(&self, digest: &[u8; 32]) -> Result<(), Outcome> {
        let keys = &self.settings.updates.release_keys;
        keys.verify_release(&self.update.key_id, digest, &self.update.signature)
            .map_err(|e| match e {
                ReleaseError::UnknownKey => failed(
                    "unknown_release_key",
                    "the artifact is signed by a release key this terminal does not trust",
                ),
                ReleaseError::BadSignature => failed(
                    "bad_release_signature",
                    "the release signature does not match the artifact",
                ),
            })
    }

    /// Downloads the artifact completely into the `.part` file (see the module docs).
    pub(super) async fn download(&self) -> Result<(), Outcome> {
        // A signature that cannot match fails before a byte is fetched (it is checked again
        // over the digest of the downloaded bytes).
        self.check_signature(&self.update.sha256)?;
        let part = self.part_path();
        let dir = self.files.updates_dir.clone();
        tokio::fs::create_dir_all(&dir).await.map_err(|e| {
            failed(
                "download_failed",
                format!("cannot create {}: {e}", dir.display()),
            )
        })?;
        // A restart after verification left the verified file: it is checked again.
        if tokio::fs::metadata(self.artifact_path()).await.is_ok() {
            let _ = tokio::fs::rename(self.artifact_path(), &part).await;
        }
        let size = self.update.size;
        let have = file_len(&part).await;
        let need = size.saturating_mul(2).saturating_sub(have);
        if let Some(free) = available_space(dir).await
            && free < need
        {
            return Err(failed(
                "no_space",
                format!(
                    "{free} bytes free in the update directory; {need} needed (twice the artifact)"
                ),
            ));
        }
        let client = self.client()?;
        let updates = &self.settings.updates;
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let mut failures = 0u32;
        loop {
            let before = file_len(&part).await;
            if before == size {
                return Ok(());
            }
            if before > size {
                truncate(&part).await?;
                continue;
            }
            let attempt = tokio::select! {
                a = self.fetch(&client, &part, before) => a,
                () = self.interrupted() => Err(Attempt::Fatal(self.interruption())),
            };
            let why = match attempt {
                Ok(()) if file_len(&part).await == size => return Ok(()),
                Ok(()) => "the body ended early".to_owned(),
                Err(Attempt::Fatal(outcome)) => return Err(outcome),
                Err(Attempt::Retry(why)) => why,
            };
            if file_len(&part).await > before {
                failures = 0;
            } else {
                failures += 1;
            }
            if failures >= updates.retry_attempts {
                return Err(failed(
                    "download_failed",
                    format!("download failed {failures} times in a row: {why}"),
                ));
            }
            let delay = updates.retry_backoff.delay(failures, &mut rng);
            warn!(reason = %why, failures, ?delay, "artifact download interrupted; retrying");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.interrupted() => return Err(self.interruption()),
            }
        }
    }

    /// An HTTPS client presenting the terminal's certificate.
    fn client(&self) -> Result<reqwest::Client, Outcome> {
        let mut tls = (*self.tls).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .http1_only()
            .connect_timeout(self.settings.updates.io_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| {
                failed(
                    "download_failed",
                    format!("cannot build the HTTPS client: {e}"),
                )
            })
    }

    /// One request from byte `have` on, appended to `part`.
    async fn fetch(&self, client: &reqwest::Client, part: &Path, have: u64) -> Result<(), Attempt> {
        let io = self.settings.updates.io_timeout;
        let size = self.update.size;
        let mut request = client.get(self.update.url.clone());
        if have > 0 {
            request = request.header(http::header::RANGE, format!("bytes={have}-"));
        }
        let mut response = match tokio::time::timeout(io, request.send()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(Attempt::Retry(format!("request failed: {e}"))),
            Err(_) => return Err(Attempt::Retry("no answer in time".into())),
        };
        let status = response.status().as_u16();
        let offset = match status {
            206 => match content_range_start(response.headers()) {
                Some(start) if start == have => have,
                _ => {
                    // Not the range asked for: start over.
                    truncate(part).await.map_err(Attempt::Fatal)?;
                    return Err(Attempt::Retry("unexpected Content-Range".into()));
                }
            },
            200 => 0,
            416 => {
                truncate(part).await.map_err(Attempt::Fatal)?;
                return Err(Attempt::Retry(
                    "range not satisfiable; starting over".into(),
                ));
            }
            404 | 410 => {
                return Err(Attempt::Fatal(failed(
                    "not_found",
                    format!("the artifact server answered {status}"),
                )));
            }
            408 | 429 | 500..=599 => {
                return Err(Attempt::Retry(format!(
                    "the artifact server answered {status}"
                )));
            }
            _ => {
                return Err(Attempt::Fatal(failed(
                    "download_failed",
                    format!("the artifact server answered {status}"),
                )));
            }
        };
        if let Some(len) = response.content_length()
            && offset.saturating_add(len) > size
        {
            return Err(Attempt::Fatal(self.too_large(part).await));
        }
        let mut file = open_at(part, offset).await.map_err(Attempt::Fatal)?;
        let mut written = offset;
        let mut reported = (percent(written, size), Instant::now());
        let outcome = loop {
            let chunk = match tokio::time::timeout(io, response.chunk()).await {
                Ok(Ok(Some(chunk))) => chunk,
                Ok(Ok(None)) => break Ok(()),
                Ok(Err(e)) => break Err(Attempt::Retry(format!("body: {e}"))),
                Err(_) => break Err(Attempt::Retry("the body stalled".into())),
            };
            let len = chunk.len() as u64;
            if written.saturating_add(len) > size {
                drop(file);
                return Err(Attempt::Fatal(self.too_large(part).await));
            }
            if let Err(e) = file.write_all(&chunk).await {
                break Err(Attempt::Fatal(failed(
                    "download_failed",
                    format!("cannot write the artifact: {e}"),
                )));
            }
            written += len;
            let now = percent(written, size);
            if now >= reported.0 + PROGRESS_STEP
                || (now > reported.0 && reported.1.elapsed() >= PROGRESS_EVERY)
            {
                reported = (now, Instant::now());
                self.report(self.progress_result(Phase::Downloading, now));
            }
        };
        // What arrived stays for the next attempt (or the next start), on disk for real.
        if let Err(e) = async {
            file.flush().await?;
            file.sync_data().await
        }
        .await
        {
            warn!(error = %e, "cannot sync the partial artifact");
        }
        debug!(from = offset, to = written, "artifact bytes received");
        outcome
    }

    async fn too_large(&self, part: &Path) -> Outcome {
        let _ = tokio::fs::remove_file(part).await;
        failed(
            "too_large",
            format!(
                "the server sent more than the announced {} bytes",
                self.update.size
            ),
        )
    }

    /// Size, SHA-256 and release signature of the downloaded file; renames it to the
    /// `.artifact` the install hook gets. Deletes it on any mismatch.
    pub(super) async fn verify(&self) -> Result<(), Outcome> {
        let part = self.part_path();
        let path = part.clone();
        let hashed = tokio::task::spawn_blocking(move || hash_file(&path))
            .await
            .map_err(|e| failed("verify_failed", format!("hashing panicked: {e}")))?;
        let checked = match hashed {
            Err(e) => Err(failed(
                "verify_failed",
                format!("cannot read the artifact: {e}"),
            )),
            Ok((len, _)) if len != self.update.size => Err(failed(
                "tampered",
                format!("the artifact has {len} bytes, not {}", self.update.size),
            )),
            Ok((_, digest)) if digest != self.update.sha256 => Err(failed(
                "tampered",
                "the artifact's SHA-256 does not match the command",
            )),
            Ok((_, digest)) => self.check_signature(&digest),
        };
        if let Err(outcome) = checked {
            let _ = tokio::fs::remove_file(&part).await;
            return Err(outcome);
        }
        tokio::fs::rename(&part, self.artifact_path())
            .await
            .map_err(|e| {
                failed(
                    "verify_failed",
                    format!("cannot keep the verified artifact: {e}"),
                )
            })?;
        info!(sha256 = %self.update.sha256_hex, "artifact verified");
        Ok(())
    }
}

fn percent(done: u64, size: u64) -> u32 {
    u32::try_from(done.saturating_mul(100) / size.max(1)).unwrap_or(100)
}

async fn file_len(path: &Path) -> u64 {
    tokio::fs::metadata(path).await.map_or(0, |m| m.len())
}

async fn truncate(path: &Path) -> Result<(), Outcome> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(failed(
            "download_failed",
            format!("cannot reset the partial artifact: {e}"),
        )),
    }
}

/// The partial file, positioned to write at `offset` (0: emptied).
async fn open_at(path: &Path, offset: u64) -> Result<tokio::fs::File, Outcome> {
    let mut options = tokio::fs::OpenOptions::new();
    options.create(true).write(true);
    if offset == 0 {
        options.truncate(true);
    } else {
        options.append(true);
    }
    let mut file = options.open(path).await.map_err(|e| {
        failed(
            "download_failed",
            format!("cannot open {}: {e}", path.display()),
        )
    })?;
    if offset > 0 {
        // Append mode writes at the end, which is `offset` (checked by the caller).
        file.flush()
            .await
            .map_err(|e| failed("download_failed", e.to_string()))?;
    }
    Ok(file)
}

/// `Content-Range: bytes START-END/TOTAL` → START.
fn content_range_start(headers: &http::HeaderMap) -> Option<u64> {
    let value = headers.get(http::header::CONTENT_RANGE)?.to_str().ok()?;
    let range = value.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

/// Length and SHA-256 of a file, read in pieces. Blocking.
fn hash_file(path: &Path) -> std::io::Result<(u64, [u8; 32])> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, hasher.finalize().into()))
}

/// Free bytes on the file system holding `dir` (`None`: unknown, not checked).
async fn available_space(dir: PathBuf) -> Option<u64> {
    // Reads the mount table and statvfs's each mount: blocking.
    tokio::task::spawn_blocking(move || {
        let dir = dir.canonicalize().ok()?;
        let disks = sysinfo::Disks::new_with_refreshed_list();
        disks
            .list()
            .iter()
            .filter(|d| dir.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len())
            .map(sysinfo::Disk::available_space)
    })
    .await
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_and_percent() {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::CONTENT_RANGE,
            "bytes 100-199/200".parse().unwrap(),
        );
        assert_eq!(content_range_start(&h), Some(100));
        h.insert(http::header::CONTENT_RANGE, "items 1-2/3".parse().unwrap());
        assert_eq!(content_range_start(&h), None);
        assert_eq!(
            (percent(0, 10), percent(5, 10), percent(10, 10)),
            (0, 50, 100)
        );
    }

    #[test]
    fn hashes_a_file_in_pieces() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        let data = vec![7u8; HASH_CHUNK * 2 + 3];
        std::fs::write(&path, &data).unwrap();
        let (len, digest) = hash_file(&path).unwrap();
        assert_eq!(len, data.len() as u64);
        assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(&data)));
    }
}
