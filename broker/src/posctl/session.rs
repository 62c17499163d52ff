//! The login sessions `posctl login` keeps, one per API URL, in
//! `CONFIG_DIR/session.json` (mode 0600). CONFIG_DIR is `--config-dir`, else
//! `$XDG_CONFIG_HOME/posfleet`, else `$HOME/.config/posfleet`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use posfleet_proto::pki::write_secret_file;
use serde::{Deserialize, Serialize};

/// File name inside the config directory.
const FILE: &str = "session.json";

/// One stored session.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredSession {
    pub(crate) user: String,
    pub(crate) token: String,
}

impl std::fmt::Debug for StoredSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredSession")
            .field("user", &self.user)
            .field("token", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionFile {
    /// By API URL.
    sessions: BTreeMap<String, StoredSession>,
}

/// The config directory: the flag, else the XDG default.
pub(crate) fn config_dir(flag: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = flag {
        return Some(dir.to_owned());
    }
    if let Some(xdg) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(xdg).join("posfleet"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|home| PathBuf::from(home).join(".config").join("posfleet"))
}

fn read(dir: &Path) -> anyhow::Result<SessionFile> {
    let path = dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| {
            anyhow!(
                "{} is not a posctl session file ({e}); delete it and log in again",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SessionFile::default()),
        Err(e) => Err(anyhow!("cannot read {}: {e}", path.display())),
    }
}

fn write(dir: &Path, file: &SessionFile) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let json = serde_json::to_string_pretty(file).context("cannot encode the session file")?;
    write_secret_file(&dir.join(FILE), &json)
        .with_context(|| format!("cannot write {}", dir.join(FILE).display()))
}

/// The session stored for `api_url`.
pub(crate) fn load(dir: &Path, api_url: &str) -> anyhow::Result<Option<StoredSession>> {
    Ok(read(dir)?.sessions.remove(api_url))
}

/// Stores (replacing) the session for `api_url`.
pub(crate) fn save(dir: &Path, api_url: &str, session: StoredSession) -> anyhow::Result<()> {
    let mut file = read(dir)?;
    file.sessions.insert(api_url.to_owned(), session);
    write(dir, &file)
}

/// Forgets the session for `api_url`; returns it.
pub(crate) fn forget(dir: &Path, api_url: &str) -> anyhow::Result<Option<StoredSession>> {
    let mut file = read(dir)?;
    let removed = file.sessions.remove(api_url);
    if removed.is_some() {
        write(dir, &file)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn sessions_are_kept_per_server_in_a_0600_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cfg");
        assert!(load(&dir, "https://a/").unwrap().is_none());
        let s = StoredSession {
            user: "alice".into(),
            token: "t1".into(),
        };
        save(&dir, "https://a/", s.clone()).unwrap();
        save(
            &dir,
            "https://b/",
            StoredSession {
                user: "bob".into(),
                token: "t2".into(),
            },
        )
        .unwrap();
        assert_eq!(load(&dir, "https://a/").unwrap(), Some(s.clone()));
        let mode = std::fs::metadata(dir.join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!format!("{s:?}").contains("t1"));
        assert_eq!(forget(&dir, "https://a/").unwrap(), Some(s));
        assert!(load(&dir, "https://a/").unwrap().is_none());
        assert!(load(&dir, "https://b/").unwrap().is_some());
        assert_eq!(config_dir(Some(&dir)), Some(dir.clone()));
    }
}
