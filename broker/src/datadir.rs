//! The controller's data directory: where `serve`/`demo` keep state and where `posctl` finds
//! what it needs to talk to them.
//!
//! ```text
//! DATA/pki/            fleet PKI (see posfleet_proto::pki::PkiDir)
//! DATA/admin.token     bootstrap admin API bearer token (0600), generated on first start
//! DATA/posctl.json     API URL, CA file and token file for posctl (written at every start)
//! DATA/accounts/       sled store of operator accounts and API tokens (ADR 0009)
//! DATA/registry/       sled store of the device registry
//! DATA/transactions/   sled store of the transactions (ADR 0006)
//! DATA/config/         sled store of the fleet configuration layers and history (ADR 0007)
//! DATA/commands/       sled store of commands and desired lock state (ADR 0007)
//! DATA/enrolment/    sled store of enrolment tokens, issued serials and revocations (CRL)
//! DATA/logs/           log uploads of collect_logs commands, one file per command id
//! DATA/artifacts/      signed software artifacts (ADR 0008):
//!   meta/              sled store of their metadata
//!   blobs/<sha256>     the bytes (0600), named by their SHA-256 hex (= artifact id)
//!   blobs/.upload-*.tmp  uploads in progress; removed on refusal and at start
//! ```
//!
//! The sled store is `artifacts/meta`, not `artifacts` itself, because sled 0.34 keeps its
//! own large values in `<store>/blobs` and its recovery deletes numerically named files there.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use posfleet_proto::pki::{PkiDir, PkiError, write_secret_file};
use serde::{Deserialize, Serialize};

/// Default data directory of `serve`, `demo` and `posctl`.
pub const DEFAULT_DATA_DIR: &str = "./posfleet-data";

/// Bytes of randomness in a generated admin token.
/// Prefix of generated bootstrap admin tokens (older data dirs hold 64 hex digits, which
/// keep working: the token is compared as text).
pub const ADMIN_TOKEN_PREFIX: &str = "pfa_";

/// A new bootstrap admin token: letters only, never a digit run a card-data scanner could
/// flag (`posfleet_proto::secret::token`).
pub fn new_admin_token() -> String {
    posfleet_proto::secret::token(ADMIN_TOKEN_PREFIX)
}

/// Why the data directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(
        "{path} is not a valid posctl client file: {source}; restart `posfleet-broker serve` to rewrite it"
    )]
    ClientFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path} is empty; delete it and restart `posfleet-broker serve` to generate a new token"
    )]
    EmptyToken { path: PathBuf },
}

/// What `posctl` needs to reach the admin API, as written by `serve` into `posctl.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// e.g. `https://127.0.0.1:8443`.
    pub api_url: String,
    /// CA certificate(s) that sign the API's server certificate (absolute path).
    pub ca_file: PathBuf,
    /// File holding the bearer token (absolute path).
    pub token_file: PathBuf,
    /// Where terminals connect, e.g. `mqtts://127.0.0.1:8883` (informational for people and
    /// test harnesses; posctl does not use it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_url: Option<String>,
    /// Where the device download endpoint listens (the bound address, e.g. `127.0.0.1:8884`;
    /// informational like `mqtt_url`: terminals are told `--device-url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_addr: Option<SocketAddr>,
}

/// A data directory (nothing is created until asked).
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn pki(&self) -> PkiDir {
        PkiDir::at(self.root.join("pki"))
    }

    pub fn admin_token_file(&self) -> PathBuf {
        self.root.join("admin.token")
    }

    pub fn client_file(&self) -> PathBuf {
        self.root.join("posctl.json")
    }

    /// The account store (ADR 0009).
    pub fn accounts_dir(&self) -> PathBuf {
        self.root.join("accounts")
    }

    pub fn registry_dir(&self) -> PathBuf {
        self.root.join("registry")
    }

    pub fn transactions_dir(&self) -> PathBuf {
        self.root.join("transactions")
    }

    pub fn config_dir(&self) -> PathBuf {
        self.root.join("config")
    }

    pub fn commands_dir(&self) -> PathBuf {
        self.root.join("commands")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    pub fn artifacts_dir(&self) -> PathBuf {
        self.root.join("artifacts")
    }

    /// The audit log's sled store.
    pub fn audit_dir(&self) -> PathBuf {
        self.root.join("audit")
    }

    /// The audit log's anchor: seq and hash of its newest entry (0600).
    pub fn audit_anchor(&self) -> PathBuf {
        self.root.join("audit.anchor")
    }

    /// Pending and decided two-person approvals.
    pub fn approvals_dir(&self) -> PathBuf {
        self.root.join("approvals")
    }

    /// The custody ledger (device issue register).
    pub fn custody_dir(&self) -> PathBuf {
        self.root.join("custody")
    }

    /// The custody ledger's signing key (0600).
    pub fn custody_key(&self) -> PathBuf {
        self.root.join("custody.key")
    }

    /// The rollout store (ADR 0008).
    pub fn enrolment_dir(&self) -> PathBuf {
        self.root.join("enrolment")
    }

    pub fn rollouts_dir(&self) -> PathBuf {
        self.root.join("rollouts")
    }

    /// Creates the directory (0700) if needed.
    pub fn create(&self) -> Result<(), DataDirError> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(|source| DataDirError::Io {
                path: self.root.clone(),
                source,
            })
    }

    /// Reads the admin token, generating it (0600) if there is none yet. Returns the token and
    /// whether it was created now.
    pub fn ensure_admin_token(&self) -> Result<(String, bool), DataDirError> {
        let path = self.admin_token_file();
        if path.exists() {
            return Ok((self.read_admin_token()?, false));
        }
        let token = new_admin_token();
        write_secret_file(&path, &format!("{token}\n"))?;
        Ok((token, true))
    }

    pub fn read_admin_token(&self) -> Result<String, DataDirError> {
        read_token_file(&self.admin_token_file())
    }

    /// Writes `posctl.json` with absolute paths.
    pub fn write_client_file(
        &self,
        api_url: &str,
        mqtt_url: Option<&str>,
        device_addr: Option<SocketAddr>,
    ) -> Result<ClientFile, DataDirError> {
        let root = fs::canonicalize(&self.root).map_err(|source| DataDirError::Io {
            path: self.root.clone(),
            source,
        })?;
        let data = DataDir::at(root);
        let file = ClientFile {
            api_url: api_url.to_owned(),
            ca_file: data.pki().ca_cert(),
            token_file: data.admin_token_file(),
            mqtt_url: mqtt_url.map(str::to_owned),
            device_addr,
        };
        let path = self.client_file();
        let json =
            serde_json::to_string_pretty(&file).map_err(|source| DataDirError::ClientFile {
                path: path.clone(),
                source,
            })?;
        // Not secret (paths and a URL), but written atomically like everything else.
        write_secret_file(&path, &json)?;
        Ok(file)
    }

    pub fn read_client_file(&self) -> Result<ClientFile, DataDirError> {
        let path = self.client_file();
        let text = fs::read_to_string(&path).map_err(|source| DataDirError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| DataDirError::ClientFile { path, source })
    }
}

/// Reads a bearer token file (trailing whitespace trimmed).
pub fn read_token_file(path: &Path) -> Result<String, DataDirError> {
    let text = fs::read_to_string(path).map_err(|source| DataDirError::Io {
        path: path.to_owned(),
        source,
    })?;
    let token = text.trim().to_owned();
    if token.is_empty() {
        return Err(DataDirError::EmptyToken {
            path: path.to_owned(),
        });
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn token_is_generated_once_with_mode_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::at(tmp.path().join("d"));
        data.create().unwrap();
        let (token, created) = data.ensure_admin_token().unwrap();
        assert!(created);
        let body = token.strip_prefix(ADMIN_TOKEN_PREFIX).unwrap();
        assert!(posfleet_proto::secret::is_token_body(body), "{token}");
        let mode = fs::metadata(data.admin_token_file())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, created) = data.ensure_admin_token().unwrap();
        assert!(!created);
        assert_eq!(again, token);
    }

    /// Issue 10 item 10: a bootstrap admin token never looks like a card number (100,000
    /// draws); one written by an older version (64 hex digits) is still read as it is.
    #[test]
    fn admin_tokens_never_look_like_card_numbers_and_old_ones_still_read() {
        let draws = 100_000;
        let flagged = (0..draws)
            .filter(|_| posfleet_proto::pan::contains_pan(&new_admin_token()))
            .count();
        assert_eq!(
            flagged, 0,
            "{flagged} of {draws} admin tokens look like a card number"
        );
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::at(tmp.path().join("d"));
        data.create().unwrap();
        let old = "0123abcd".repeat(8);
        write_secret_file(&data.admin_token_file(), &format!("{old}\n")).unwrap();
        assert_eq!(data.ensure_admin_token().unwrap(), (old, false));
    }

    #[test]
    fn client_file_round_trips_with_absolute_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::at(tmp.path());
        let written = data
            .write_client_file(
                "https://127.0.0.1:1",
                Some("mqtts://127.0.0.1:2"),
                Some(SocketAddr::from(([127, 0, 0, 1], 3))),
            )
            .unwrap();
        assert!(written.ca_file.is_absolute());
        assert_eq!(data.read_client_file().unwrap(), written);
    }
}
