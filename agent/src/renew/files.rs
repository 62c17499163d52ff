//! The identity files during a renewal, and the marker that makes a renewal resumable.
//!
//! ```text
//! KEY.new, CERT.new   the renewed pair, staged (0600 / 0644, temp + fsync + rename)
//! KEY.old, CERT.old   a copy of the pair in use before the renewal, kept until confirmed
//! DATA/renewal.json   the marker: written after staging and backup, before the swap;
//!                     removed after the controller confirmed (revoked the old serial)
//! ```
//!
//! Order: stage, back up, write the marker, rename `.new` over the live files (key first),
//! fsync the directory. [`IdentityFiles::recover`], run before the identity is read, finishes
//! an interrupted swap (marker present: rename what is still staged) or drops a staging that
//! never got its marker. The only working key is never deleted: the old pair stays in `.old`
//! until the controller revoked it.
//!
//! Everything here blocks (small files, fsync): call it from `spawn_blocking`.

use std::fs;
use std::path::{Path, PathBuf};

use posfleet_proto::pki::{CertFacts, write_public_file, write_secret_file};
use serde::{Deserialize, Serialize};

use super::RenewError;

/// File name of the marker in the agent's data directory.
pub const MARKER_FILE: &str = "renewal.json";

/// A renewal installed but not yet confirmed to the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRenewal {
    /// Serial (hex) of the certificate being replaced; revoked on confirmation.
    pub old_serial: String,
    /// Serial (hex) of the renewed certificate.
    pub new_serial: String,
}

/// Where the identity and the renewal's bookkeeping live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    /// `tls.cert`.
    pub cert: PathBuf,
    /// `tls.key`.
    pub key: PathBuf,
    /// `DATA/renewal.json`.
    pub marker: PathBuf,
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RenewError + '_ {
    move |source| RenewError::Io {
        path: path.to_owned(),
        source,
    }
}

impl IdentityFiles {
    pub fn new(cert: PathBuf, key: PathBuf, data_dir: &Path) -> Self {
        Self {
            cert,
            key,
            marker: data_dir.join(MARKER_FILE),
        }
    }

    pub fn staged_cert(&self) -> PathBuf {
        with_suffix(&self.cert, ".new")
    }
    pub fn staged_key(&self) -> PathBuf {
        with_suffix(&self.key, ".new")
    }
    pub fn old_cert(&self) -> PathBuf {
        with_suffix(&self.cert, ".old")
    }
    pub fn old_key(&self) -> PathBuf {
        with_suffix(&self.key, ".old")
    }

    /// Facts (serial, validity) of the certificate in use.
    pub fn current(&self) -> Result<CertFacts, RenewError> {
        let pem = fs::read_to_string(&self.cert).map_err(io(&self.cert))?;
        Ok(CertFacts::from_pem(&pem)?)
    }

    /// The renewal waiting for confirmation, if any.
    pub fn pending(&self) -> Result<Option<PendingRenewal>, RenewError> {
        match fs::read(&self.marker) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| RenewError::Marker {
                    path: self.marker.clone(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&self.marker)(e)),
        }
    }

    /// Installs a renewed pair (see the module docs for the order). `key_pem` is secret.
    pub fn install(
        &self,
        cert_pem: &str,
        key_pem: &str,
        pending: &PendingRenewal,
    ) -> Result<(), RenewError> {
        write_secret_file(&self.staged_key(), key_pem)?;
        write_public_file(&self.staged_cert(), cert_pem)?;
        let old_key = fs::read_to_string(&self.key).map_err(io(&self.key))?;
        let old_cert = fs::read_to_string(&self.cert).map_err(io(&self.cert))?;
        write_secret_file(&self.old_key(), &old_key)?;
        write_public_file(&self.old_cert(), &old_cert)?;
        let marker = serde_json::to_string(pending).map_err(|e| RenewError::Marker {
            path: self.marker.clone(),
            reason: e.to_string(),
        })?;
        if let Some(dir) = self.marker.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
        }
        write_secret_file(&self.marker, &marker)?;
        self.swap()
    }

    /// Finishes an interrupted installation, or drops a staging that has no marker. Run before
    /// the identity is loaded. Returns the pending renewal, if any.
    pub fn recover(&self) -> Result<Option<PendingRenewal>, RenewError> {
        let pending = self.pending()?;
        if pending.is_some() {
            self.swap()?;
        } else {
            remove_if_present(&self.staged_key())?;
            remove_if_present(&self.staged_cert())?;
        }
        Ok(pending)
    }

    /// The controller revoked the old certificate: the backup and the marker go.
    pub fn finish(&self) -> Result<(), RenewError> {
        remove_if_present(&self.old_key())?;
        remove_if_present(&self.old_cert())?;
        remove_if_present(&self.marker)?;
        sync_dir(&self.marker)
    }

    /// Renames what is staged over the live files, key first; idempotent.
    fn swap(&self) -> Result<(), RenewError> {
        for (staged, live) in [
            (self.staged_key(), &self.key),
            (self.staged_cert(), &self.cert),
        ] {
            if staged.exists() {
                fs::rename(&staged, live).map_err(io(live))?;
            }
        }
        sync_dir(&self.key)?;
        sync_dir(&self.cert)
    }
}

fn remove_if_present(path: &Path) -> Result<(), RenewError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

/// Makes the renames in `path`'s directory durable.
fn sync_dir(path: &Path) -> Result<(), RenewError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}
