//! Automatic renewal of the terminal's certificate (issue 6, item 7).
//!
//! [`run`] checks the certificate when it starts and then every `tls.renew_check_interval`
//! (default 24 h). When fewer than `tls.renew_before` (default 30 days) remain it generates a
//! new key and CSR here, `POST {tls.device_url}/device/v1/renew` with the current identity,
//! installs the new pair (see [`files`]: staged, old pair kept as `.old`, a marker in the data
//! directory) and cancels its `renewed` token. The `run` command then stops the agent and
//! starts it again in-process with the new identity (`crate::terminal`). The next `run` task
//! finds the marker, waits until the MQTT session is connected (the new certificate is in
//! use), and `POST .../renew/confirm` with the new identity; the controller revokes the old
//! serial and the agent removes the `.old` pair and the marker.
//!
//! A crash at any step resumes: before the identity is read, [`IdentityFiles::recover`]
//! finishes a swap the marker announced, or drops a staging that has none (the controller
//! abandons the unconfirmed certificate at the next renewal). Each call is retried a bounded
//! number of times with jittered backoff; a renewal that keeps failing is tried again at the
//! next check, with the old identity untouched. Nothing here logs key material.

mod client;
pub mod files;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

use posfleet_proto::pki::{DeviceKeyRequest, PkiError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use files::{IdentityFiles, PendingRenewal};

use crate::config::Config;
use posfleet_runtime::backoff::{Backoff, Retry};
use posfleet_runtime::mqtt::MqttHandle;
use posfleet_runtime::tls::{TlsError, client_config_from_pem, device_id_from_cert_pem};

/// Default of `tls.renew_before`.
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default of `tls.renew_check_interval`.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Attempts of each call before giving up until the next check.
pub const DEFAULT_ATTEMPTS: u32 = 5;

/// Why a renewal step failed. Never holds key material.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("cannot access {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("renewal marker {}: {reason}; remove it only after checking tls.cert", path.display())]
    Marker { path: PathBuf, reason: String },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot reach the device endpoint: {0}")]
    Http(String),
    #[error("the controller refused ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the controller's answer is unusable: {0}")]
    Answer(String),
    #[error("renewal task failed: {0}")]
    Task(String),
}

impl RenewError {
    /// A refusal that retrying will not change (4xx other than 429).
    fn is_final(&self) -> bool {
        matches!(self, RenewError::Refused { status, .. } if (400..500).contains(status) && *status != 429)
    }
}

/// What the renewal task needs.
#[derive(Debug, Clone)]
pub struct RenewSettings {
    /// The device endpoint, `https://host:port` (no trailing slash).
    pub device_url: String,
    /// The CA bundle that signs the device endpoint's certificate.
    pub ca: PathBuf,
    /// The identity files and the marker.
    pub files: IdentityFiles,
    /// Renew when fewer than this remain before `not_after`.
    pub renew_before: Duration,
    /// Time between checks.
    pub check_interval: Duration,
    /// Delays between attempts of one call.
    pub retry: Backoff,
    /// Attempts of one call per check.
    pub attempts: u32,
}

impl RenewSettings {
    /// The settings of a config; `None` when `tls.device_url` is not set (renewal off).
    pub fn from_config(cfg: &Config) -> Option<Self> {
        let device_url = cfg.renewal.device_url.clone()?;
        Some(Self {
            device_url,
            ca: cfg.tls.ca.clone(),
            files: IdentityFiles::new(cfg.tls.cert.clone(), cfg.tls.key.clone(), &cfg.data_dir),
            renew_before: cfg.renewal.renew_before,
            check_interval: cfg.renewal.check_interval,
            retry: Backoff {
                initial: Duration::from_secs(5),
                max: Duration::from_secs(300),
            },
            attempts: DEFAULT_ATTEMPTS,
        })
    }
}

/// Runs `f` on the blocking pool (file I/O with fsync, key generation).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RenewError> + Send + 'static,
) -> Result<T, RenewError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RenewError::Task(e.to_string()))?
}

/// Whether the certificate in use needs renewing now (`now_s`: Unix seconds).
pub async fn due(settings: &RenewSettings, now_s: i64) -> Result<bool, RenewError> {
    let files = settings.files.clone();
    let facts = blocking(move || files.current()).await?;
    let remaining = facts.not_after.saturating_sub(now_s);
    let threshold = i64::try_from(settings.renew_before.as_secs()).unwrap_or(i64::MAX);
    debug!(
        serial = %facts.serial,
        remaining_s = remaining,
        threshold_s = threshold,
        "certificate validity checked"
    );
    Ok(remaining < threshold)
}

/// Renews now with the current identity and installs the new pair. On error the identity
/// files are as they were.
pub async fn renew_now(settings: &RenewSettings) -> Result<PendingRenewal, RenewError> {
    let files = settings.files.clone();
    let ca = settings.ca.clone();
    let (client, request, old_serial, id) = blocking(move || {
        let cert_pem = std::fs::read_to_string(&files.cert).map_err(|source| RenewError::Io {
            path: files.cert.clone(),
            source,
        })?;
        let id = device_id_from_cert_pem(cert_pem.as_bytes())?;
        let old = files.current()?;
        let client = client::device_client(&ca, &files.cert, &files.key)?;
        let request = DeviceKeyRequest::generate(&id)?;
        Ok((client, request, old.serial, id))
    })
    .await?;
    let renewed = client::renew(&client, &settings.device_url, &request.csr_pem).await?;

    let files = settings.files.clone();
    let ca = settings.ca.clone();
    blocking(move || {
        // Check the answer before anything is written: our device, a new serial, our key.
        let new_id = device_id_from_cert_pem(renewed.certificate_pem.as_bytes())?;
        if new_id != id {
            return Err(RenewError::Answer(format!(
                "certificate issued for {new_id}, not {id}"
            )));
        }
        let facts = posfleet_proto::pki::CertFacts::from_pem(&renewed.certificate_pem)?;
        if facts.serial == old_serial || facts.serial != renewed.serial.to_lowercase() {
            return Err(RenewError::Answer(format!(
                "unexpected serial {} (old {old_serial})",
                facts.serial
            )));
        }
        let ca_pem = std::fs::read(&ca).map_err(|source| RenewError::Io {
            path: ca.clone(),
            source,
        })?;
        client_config_from_pem(
            &ca_pem,
            renewed.certificate_pem.as_bytes(),
            request.key_pem.as_bytes(),
        )?;
        let pending = PendingRenewal {
            old_serial,
            new_serial: facts.serial,
        };
        files.install(&renewed.certificate_pem, &request.key_pem, &pending)?;
        Ok(pending)
    })
    .await
}

/// Confirms `pending` with the identity in use (which must be the new one), then removes
/// the old pair and the marker.
pub async fn confirm(settings: &RenewSettings, pending: &PendingRenewal) -> Result<(), RenewError> {
    let files = settings.files.clone();
    let ca = settings.ca.clone();
    let expected = pending.new_serial.clone();
    let client = blocking(move || {
        let current = files.current()?;
        if current.serial != expected {
            return Err(RenewError::Marker {
                path: files.marker.clone(),
                reason: format!(
                    "expects certificate {expected}, tls.cert is {}",
                    current.serial
                ),
            });
        }
        client::device_client(&ca, &files.cert, &files.key)
    })
    .await?;
    match client::confirm(&client, &settings.device_url).await {
        Ok(confirmed) => {
            info!(revoked_serial = %confirmed.revoked_serial, "old certificate revoked by the controller")
        }
        // Nothing pending on the controller for this certificate: a confirmation whose answer
        // was lost (a crash before the marker went). The new certificate works, so finish.
        Err(RenewError::Refused { status: 409, .. }) => {
            warn!(old_serial = %pending.old_serial, "the controller has no renewal to confirm; assuming it was confirmed before")
        }
        Err(e) => return Err(e),
    }
    let files = settings.files.clone();
    blocking(move || files.finish()).await
}

/// Retries `step` up to `settings.attempts` times with backoff; `None` when cancelled.
async fn retried<T, F, Fut>(
    settings: &RenewSettings,
    what: &'static str,
    cancel: &CancellationToken,
    mut step: F,
) -> Option<Result<T, RenewError>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RenewError>>,
{
    let mut retry = Retry::new(settings.retry);
    loop {
        let result = tokio::select! {
            () = cancel.cancelled() => return None,
            r = step() => r,
        };
        match result {
            Ok(v) => return Some(Ok(v)),
            Err(e) if e.is_final() || retry.attempt() + 1 >= settings.attempts => {
                return Some(Err(e));
            }
            Err(e) => {
                let delay = retry.next_delay();
                warn!(error = %e, attempt = retry.attempt(), ?delay, "certificate {what} failed; retrying");
                tokio::select! {
                    () = cancel.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// The renewal task of a running agent (see the module docs). `mqtt` is the session that
/// uses the identity in the files; `renewed` is cancelled once a new pair is installed (the
/// caller restarts the agent with it); the task ends then or when `cancel` is cancelled.
pub async fn run(
    settings: RenewSettings,
    mqtt: MqttHandle,
    renewed: CancellationToken,
    cancel: CancellationToken,
) {
    let mut pause = Duration::ZERO;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = settings.check_interval;
        let files = settings.files.clone();
        let pending = match blocking(move || files.pending()).await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot read the renewal marker; renewal paused until the next check");
                continue;
            }
        };
        if let Some(pending) = pending {
            // "In use": the session connected with the certificate the agent loaded.
            let mut connected = mqtt.connected();
            tokio::select! {
                () = cancel.cancelled() => return,
                r = connected.wait_for(|c| *c) => if r.is_err() { return },
            }
            match retried(&settings, "confirmation", &cancel, || {
                confirm(&settings, &pending)
            })
            .await
            {
                None => return,
                Some(Ok(())) => {
                    info!(new_serial = %pending.new_serial, "certificate renewal complete")
                }
                Some(Err(e)) => {
                    warn!(error = %e, "certificate renewal not confirmed; the old pair stays in .old, retrying at the next check")
                }
            }
            continue;
        }
        match due(&settings, posfleet_proto::now_ms() as i64 / 1000).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                warn!(error = %e, "cannot read the certificate's validity");
                continue;
            }
        }
        info!(renew_before = ?settings.renew_before, "certificate expires soon; renewing");
        match retried(&settings, "renewal", &cancel, || renew_now(&settings)).await {
            None => return,
            Some(Ok(pending)) => {
                info!(old_serial = %pending.old_serial, new_serial = %pending.new_serial, "renewed certificate installed; restarting the session with it");
                renewed.cancel();
                return;
            }
            Some(Err(e)) => {
                warn!(error = %e, next_check = ?settings.check_interval, "certificate renewal failed; the current certificate stays in use")
            }
        }
    }
}
