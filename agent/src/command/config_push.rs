//! ConfigPush: the terminal's configuration document (ADR 0007).
//!
//! - The document must be a JSON object of at most [`MAX_DOCUMENT_BYTES`] whose keys match
//!   `[a-z0-9_.-]+` and whose values are strings, numbers or booleans; `agent.max_offline_s`,
//!   when present, a whole number of seconds. Otherwise: `REJECTED`, reason `malformed`.
//! - Version rule: higher than the applied one → apply; equal → `SUCCEEDED`, nothing to do;
//!   lower → `REJECTED`, reason `stale`.
//! - Apply: `{"version": N, "document": {...}}` is written atomically to the terminal's
//!   config file (temp file, fsync, rename, directory fsync); then the optional
//!   `config_apply` hook runs with `POSFLEET_CONFIG_FILE` and `POSFLEET_CONFIG_VERSION`
//!   (after an `IN_PROGRESS` result). If the hook fails, times out or cannot start, the
//!   previous file is restored and the result is `FAILED` with `details.hook_exit`; the
//!   applied state is only changed after success.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use posfleet_proto::pb;
use posfleet_proto::signing::RejectReason;
use serde_json::Value;
use tracing::{info, warn};

use super::{Executor, MAX_OFFLINE_KEY, hooks, result};
use crate::state::{AppliedConfig, Changes, ConfigDocument};

/// Largest accepted `document_json`.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;
/// Longest key.
const MAX_KEY_LEN: usize = 128;

/// Checks a pushed document; the error lists every problem (keys only, never values).
pub(crate) fn validate_document(json: &str) -> Result<ConfigDocument, String> {
    if json.len() > MAX_DOCUMENT_BYTES {
        return Err(format!(
            "the document has {} bytes; at most {MAX_DOCUMENT_BYTES} are accepted",
            json.len()
        ));
    }
    let value: Value =
        serde_json::from_str(json).map_err(|e| format!("the document is not JSON: {e}"))?;
    let Value::Object(document) = value else {
        return Err("the document is not a JSON object".into());
    };
    let mut problems = Vec::new();
    for (key, value) in &document {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_KEY_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
        if !key_ok {
            problems.push(format!(
                "key {:?} is not 1-{MAX_KEY_LEN} characters of [a-z0-9_.-]",
                key.chars().take(40).collect::<String>()
            ));
            continue;
        }
        if !matches!(value, Value::String(_) | Value::Number(_) | Value::Bool(_)) {
            problems.push(format!("{key}: not a string, number or boolean"));
        } else if key == MAX_OFFLINE_KEY && value.as_u64().is_none() {
            problems.push(format!("{key}: not a whole number of seconds"));
        }
    }
    if problems.is_empty() {
        Ok(document)
    } else {
        Err(format!(
            "invalid configuration document: {}",
            problems.join("; ")
        ))
    }
}

impl Executor {
    pub(super) async fn config_push(
        &mut self,
        cmd: &pb::Command,
        bytes: &[u8],
        push: &pb::ConfigPush,
    ) {
        let document = match validate_document(&push.document_json) {
            Ok(document) => document,
            Err(message) => {
                let r = result::rejected(&cmd.id, RejectReason::Malformed, message);
                self.finish(cmd, r, crate::state::Changes::durable()).await;
                return;
            }
        };
        let (version, applied) = (push.version, self.config.version);
        if version < applied {
            let r = result::rejected(
                &cmd.id,
                RejectReason::Stale,
                format!("configuration version {version} is older than the applied {applied}"),
            );
            self.finish(cmd, r, Changes::durable()).await;
            return;
        }
        if version == applied {
            let r = result::with(
                result::succeeded(
                    &cmd.id,
                    format!("configuration version {version} is already applied"),
                ),
                "version",
                version,
            );
            self.finish(cmd, r, Changes::durable()).await;
            return;
        }
        let progress =
            result::in_progress(&cmd.id, format!("applying configuration version {version}"));
        if !self.begin(cmd, bytes, &progress, Changes::durable()).await {
            return;
        }
        let previous = self.config.clone();
        let path = self.files.config.clone();
        if let Err(e) = write_blocking(path.clone(), Some((version, document.clone()))).await {
            warn!(error = %e, "cannot write the configuration file");
            self.restore(&previous).await;
            let r = result::failed(&cmd.id, format!("cannot write the configuration file: {e}"));
            self.finish(cmd, r, Changes::durable()).await;
            return;
        }
        if let Some(hook) = self.settings.hooks.config_apply.clone() {
            self.publish_result(progress).await;
            let mut env = self.hook_env();
            env.push(("POSFLEET_CONFIG_FILE", path.display().to_string()));
            env.push(("POSFLEET_CONFIG_VERSION", version.to_string()));
            let run = hooks::run(&hook, &env, self.settings.hooks.timeout, 0).await;
            if !run.succeeded() {
                warn!(outcome = %run.describe(), version, "config_apply hook failed; rolling back");
                self.restore(&previous).await;
                let r = result::with(
                    result::failed(
                        &cmd.id,
                        format!(
                            "the config_apply hook {}; configuration version {} stays applied",
                            run.describe(),
                            previous.version
                        ),
                    ),
                    "hook_exit",
                    run.exit_detail(),
                );
                self.finish(cmd, r, Changes::durable()).await;
                return;
            }
        }
        let applied = AppliedConfig {
            version,
            document,
            previous_version: previous.version,
            previous_document: previous.document,
        };
        let r = result::with(
            result::succeeded(&cmd.id, format!("configuration version {version} applied")),
            "version",
            version,
        );
        self.settle(
            &cmd.id,
            cmd.not_after_ms,
            &r,
            Changes::durable().config(applied.clone()),
        )
        .await;
        info!(version, "configuration applied");
        self.set_config(applied);
        self.publish_result(r).await;
    }

    /// Puts the previous configuration file back (or removes the file if there was none).
    async fn restore(&self, previous: &AppliedConfig) {
        let content = (previous.version > 0).then(|| (previous.version, previous.document.clone()));
        if let Err(e) = write_blocking(self.files.config.clone(), content).await {
            warn!(error = %e, "cannot restore the previous configuration file");
        }
    }
}

/// Writes (or, with `None`, removes) the config file on the blocking pool.
async fn write_blocking(
    path: PathBuf,
    content: Option<(u64, ConfigDocument)>,
) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || match content {
        Some((version, document)) => write_config_file(&path, version, &document),
        None => remove_file_durably(&path),
    })
    .await
    .map_err(std::io::Error::other)?
}

/// `{"version": N, "document": {...}}`, atomically: temp file (0640), fsync, rename, fsync of
/// the directory. Blocking.
pub(crate) fn write_config_file(
    path: &Path,
    version: u64,
    document: &ConfigDocument,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let body = serde_json::json!({ "version": version, "document": document });
    let bytes = serde_json::to_vec_pretty(&body).map_err(std::io::Error::other)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("config.json");
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Removes a file (absent is fine) and fsyncs its directory. Blocking.
pub(crate) fn remove_file_durably(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_checked() {
        let ok = validate_document(r#"{"pos.tip_percent": 10, "ui.lang": "de", "x-y_z": true}"#);
        assert_eq!(ok.unwrap().len(), 3);
        assert!(validate_document("{}").unwrap().is_empty());
        for bad in [
            "[]",
            "\"x\"",
            "{",
            r#"{"Upper": 1}"#,
            r#"{"a b": 1}"#,
            r#"{"": 1}"#,
            r#"{"a": null}"#,
            r#"{"a": [1]}"#,
            r#"{"a": {"b": 1}}"#,
            r#"{"agent.max_offline_s": -1}"#,
            r#"{"agent.max_offline_s": "3600"}"#,
        ] {
            assert!(validate_document(bad).is_err(), "{bad}");
        }
        let big = format!(r#"{{"a": "{}"}}"#, "x".repeat(MAX_DOCUMENT_BYTES));
        assert!(validate_document(&big).unwrap_err().contains("bytes"));
        let both = validate_document(r#"{"A": 1, "b": null}"#).unwrap_err();
        assert!(both.contains("\"A\"") && both.contains("b:"), "{both}");
    }

    #[test]
    fn the_file_is_replaced_atomically_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sub/config.json");
        let mut doc = ConfigDocument::new();
        doc.insert("a".into(), Value::from(1));
        write_config_file(&path, 3, &doc).unwrap();
        let read: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            read,
            serde_json::json!({"version": 3, "document": {"a": 1}})
        );
        write_config_file(&path, 4, &ConfigDocument::new()).unwrap();
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temp file left");
        remove_file_durably(&path).unwrap();
        remove_file_durably(&path).unwrap();
        assert!(!path.exists());
    }
}
