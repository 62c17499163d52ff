//! [`ConfigStore`]: the layers in memory (every read), sled underneath (every change).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard};

use posfleet_proto::DeviceId;
use serde_json::{Map, Value};
use tokio::sync::watch;
use tracing::{info, warn};

use super::disk::{Disk, LayerRecord, Write};
use super::error::ConfigError;
use super::schema::{self, check_entry, check_key_syntax, check_size};
use super::scope::Scope;
use super::{ConfigSource, ConfigSourceError, EffectiveConfig};
use crate::views::{
    ConfigChangeKind, ConfigHistoryEntry, ConfigKeyChange, ConfigLayerList, ConfigLayerSummary,
    ConfigLayerView, FieldMessage,
};

/// Longest change comment, in characters.
pub const MAX_COMMENT_CHARS: usize = 500;
/// Longest author name, in characters.
pub const MAX_AUTHOR_CHARS: usize = 128;
/// Comment of the change [`ConfigSource::touch_membership`] records.
pub const MEMBERSHIP_COMMENT: &str = "membership";

/// Where and how the store keeps its data.
#[derive(Debug, Clone)]
pub struct ConfigStoreConfig {
    /// Directory of the sled database (`DATA/config`).
    pub dir: PathBuf,
    /// sled page cache in bytes (storage rule 5).
    pub cache_capacity: u64,
    /// History entries kept; the oldest are dropped beyond it (diffs and history reach back
    /// this far). At least 1.
    pub max_history: u64,
}

impl ConfigStoreConfig {
    /// The defaults, storing in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            cache_capacity: 16 * 1024 * 1024,
            max_history: 100_000,
        }
    }
}

/// A layer in memory.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub version: u64,
    pub document: Map<String, Value>,
    pub author: String,
    pub changed_at_ms: u64,
    /// A tombstone: absent for reads, but its version counts for effective versions.
    pub deleted: bool,
}

/// Everything reads need, behind one lock.
#[derive(Debug, Default)]
pub(crate) struct State {
    /// The fleet-wide counter: version of the latest committed change (0: none).
    pub version: u64,
    /// Oldest retained history version (meaningful when `version > 0`).
    pub oldest: u64,
    pub layers: BTreeMap<Scope, Layer>,
}

/// The layered, versioned configuration store. Share it as `Arc<ConfigStore>`.
///
/// Reads (`get`, `list`, `effective`) are served from memory. Changes are validated
/// completely first (nothing is stored on any error), written as one sled batch with their
/// history entry, made durable (flush + fsync), and only then visible and announced on
/// [`ConfigSource::changes`]. Changes block on disk I/O: call them from a blocking thread.
///
/// A change that would leave an existing layer as it is (same document) records nothing and
/// returns the layer at its current version, so retries are harmless; only
/// [`ConfigSource::touch_membership`] records a change without a document change.
pub struct ConfigStore {
    cfg: ConfigStoreConfig,
    disk: Disk,
    /// Layers and counters. Held briefly, never across disk I/O.
    state: RwLock<State>,
    /// Serialises changes: one committer (storage rule 4), and the state read at the start
    /// of a change is still current when it is applied.
    writer: Mutex<()>,
    /// The version of the latest durable change, for the reconciler.
    changes: watch::Sender<u64>,
}

impl std::fmt::Debug for ConfigStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigStore")
            .field("dir", &self.cfg.dir)
            .finish_non_exhaustive()
    }
}

/// A new document for a layer, or its deletion.
enum Target {
    Document(Map<String, Value>),
    Deleted,
    /// The current document, at a new version.
    Same,
}

impl ConfigStore {
    /// Opens the store and loads every layer. Blocks: call at startup or on a blocking thread.
    pub fn open(cfg: ConfigStoreConfig) -> Result<Self, ConfigError> {
        let disk = Disk::open(&cfg.dir, cfg.cache_capacity)?;
        let loaded = disk.load()?;
        let mut state = State::default();
        for record in loaded.layers {
            let scope = Scope::parse(&record.scope).map_err(|e| ConfigError::Corrupt {
                path: cfg.dir.clone(),
                key: record.scope.clone(),
                detail: e.to_string(),
            })?;
            state.version = state.version.max(record.version);
            state.layers.insert(
                scope,
                Layer {
                    version: record.version,
                    document: record.document,
                    author: record.author,
                    changed_at_ms: record.changed_at_ms,
                    deleted: record.deleted,
                },
            );
        }
        if let Some((oldest, newest)) = loaded.history {
            state.version = state.version.max(newest);
            state.oldest = oldest;
        } else {
            state.oldest = state.version + 1;
        }
        info!(dir = %cfg.dir.display(), version = state.version, layers = state.layers.len(), "configuration store open");
        Ok(Self {
            changes: watch::Sender::new(state.version),
            state: RwLock::new(state),
            disk,
            writer: Mutex::new(()),
            cfg,
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fleet-wide version: that of the latest change (0: none yet).
    pub fn version(&self) -> u64 {
        self.read().version
    }

    /// Oldest version whose history is still kept.
    pub fn oldest_retained(&self) -> u64 {
        self.read().oldest
    }

    /// Every existing layer (tombstones are not listed), fleet first, then groups and devices.
    pub fn list(&self) -> ConfigLayerList {
        let state = self.read();
        ConfigLayerList {
            version: state.version,
            layers: state
                .layers
                .iter()
                .filter(|(_, l)| !l.deleted)
                .map(|(scope, l)| ConfigLayerSummary {
                    scope: scope.to_string(),
                    version: l.version,
                    keys: l.document.len(),
                    changed_at_ms: l.changed_at_ms,
                    author: l.author.clone(),
                })
                .collect(),
        }
    }

    /// One layer. The fleet layer always exists (empty at version 0 until set, empty with
    /// `deleted` after a deletion); a group or
    /// device layer that was never set, or was deleted, is [`ConfigError::NotFound`].
    pub fn get(&self, scope: &Scope) -> Result<ConfigLayerView, ConfigError> {
        let state = self.read();
        match state.layers.get(scope) {
            // A deleted fleet layer reads as empty, at the version of its deletion.
            Some(l) if !l.deleted || *scope == Scope::Fleet => Ok(view(scope, l)),
            _ if *scope == Scope::Fleet => Ok(ConfigLayerView {
                scope: scope.to_string(),
                version: 0,
                document: Map::new(),
                author: String::new(),
                changed_at_ms: 0,
                deleted: false,
            }),
            _ => Err(ConfigError::NotFound {
                scope: scope.to_string(),
            }),
        }
    }

    /// Sets the keys of `set` and removes those of `unset` in `scope`'s layer (created if
    /// needed). Every key and value is checked first; on any problem nothing changes and
    /// every problem is reported.
    pub fn set(
        &self,
        scope: &Scope,
        set: Map<String, Value>,
        unset: &[String],
        author: &str,
        comment: &str,
    ) -> Result<ConfigLayerView, ConfigError> {
        let mut errors = check_meta(author, comment);
        for (key, value) in &set {
            if let Err(e) = check_entry(key, value) {
                errors.push(e);
            }
        }
        for key in unset {
            if let Err(m) = check_key_syntax(key) {
                errors.push(schema::field(key, m));
            } else if set.contains_key(key) {
                errors.push(schema::field(key, "is both set and unset"));
            }
        }
        if !errors.is_empty() {
            return Err(ConfigError::Invalid(errors));
        }
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut document = self.current_document(scope);
        for key in unset {
            document.remove(key);
        }
        document.extend(set);
        if let Some(e) = check_size(&document) {
            return Err(ConfigError::Invalid(vec![e]));
        }
        self.commit(
            scope,
            ConfigChangeKind::Set,
            Target::Document(document),
            author,
            comment,
        )
    }

    /// Replaces `scope`'s layer with `document` (created if needed), checked as a whole.
    pub fn replace(
        &self,
        scope: &Scope,
        document: Map<String, Value>,
        author: &str,
        comment: &str,
    ) -> Result<ConfigLayerView, ConfigError> {
        let mut errors = check_meta(author, comment);
        errors.extend(schema::check_document(&document));
        if !errors.is_empty() {
            return Err(ConfigError::Invalid(errors));
        }
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        self.commit(
            scope,
            ConfigChangeKind::Replace,
            Target::Document(document),
            author,
            comment,
        )
    }

    /// Deletes `scope`'s layer: a tombstone change with its own version, so the effective
    /// version of the devices it applied to still rises. [`ConfigError::NotFound`] if the
    /// layer does not exist.
    pub fn delete_layer(
        &self,
        scope: &Scope,
        author: &str,
        comment: &str,
    ) -> Result<ConfigLayerView, ConfigError> {
        let errors = check_meta(author, comment);
        if !errors.is_empty() {
            return Err(ConfigError::Invalid(errors));
        }
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if self.read().layers.get(scope).is_none_or(|l| l.deleted) {
            return Err(ConfigError::NotFound {
                scope: scope.to_string(),
            });
        }
        self.commit(
            scope,
            ConfigChangeKind::Delete,
            Target::Deleted,
            author,
            comment,
        )
    }

    /// The effective configuration of `device` in `groups`, with the scope each key comes from.
    pub fn effective_with_sources(
        &self,
        device: &DeviceId,
        groups: &BTreeSet<String>,
    ) -> (EffectiveConfig, BTreeMap<String, Scope>) {
        let mut sources = BTreeMap::new();
        let effective = self.merge(device, groups, Some(&mut sources));
        (effective, sources)
    }

    /// Fleet, then groups in name order, then the device: later layers win. The version is the
    /// highest among those layers, tombstones included.
    fn merge(
        &self,
        device: &DeviceId,
        groups: &BTreeSet<String>,
        mut sources: Option<&mut BTreeMap<String, Scope>>,
    ) -> EffectiveConfig {
        let state = self.read();
        let mut version = 0;
        let mut document = Map::new();
        let scopes = std::iter::once(Scope::Fleet)
            .chain(groups.iter().map(|g| Scope::Group(g.clone())))
            .chain(std::iter::once(Scope::Device(device.clone())));
        for scope in scopes {
            let Some(layer) = state.layers.get(&scope) else {
                continue;
            };
            version = version.max(layer.version);
            if layer.deleted {
                continue;
            }
            for (key, value) in &layer.document {
                document.insert(key.clone(), value.clone());
                if let Some(sources) = sources.as_deref_mut() {
                    sources.insert(key.clone(), scope.clone());
                }
            }
        }
        EffectiveConfig { version, document }
    }

    /// The live document of `scope` (empty if absent or deleted).
    fn current_document(&self, scope: &Scope) -> Map<String, Value> {
        self.read()
            .layers
            .get(scope)
            .filter(|l| !l.deleted)
            .map(|l| l.document.clone())
            .unwrap_or_default()
    }

    /// Records one change of `scope`. The caller holds the writer lock and has validated it.
    fn commit(
        &self,
        scope: &Scope,
        kind: ConfigChangeKind,
        target: Target,
        author: &str,
        comment: &str,
    ) -> Result<ConfigLayerView, ConfigError> {
        let (version, oldest, current) = {
            let state = self.read();
            (
                state.version,
                state.oldest,
                state.layers.get(scope).cloned(),
            )
        };
        let exists = current.as_ref().is_some_and(|l| !l.deleted);
        let old = current
            .as_ref()
            .filter(|l| !l.deleted)
            .map(|l| l.document.clone())
            .unwrap_or_default();
        let (new, deleted) = match target {
            Target::Document(doc) => (doc, false),
            Target::Deleted => (Map::new(), true),
            Target::Same => (old.clone(), !exists),
        };
        let diff = key_diff(&old, &new);
        let no_op = matches!(kind, ConfigChangeKind::Set | ConfigChangeKind::Replace)
            && exists
            && diff.is_empty();
        if no_op {
            if let Some(layer) = &current {
                return Ok(view(scope, layer));
            }
        }
        let version = version + 1;
        let at_ms = posfleet_proto::now_ms();
        let mut prune = Vec::new();
        let mut new_oldest = oldest.min(version);
        while version - new_oldest + 1 > self.cfg.max_history.max(1) {
            // Versions are contiguous: each has exactly one entry.
            if let Some(entry) = self.disk.entry(new_oldest)? {
                prune.push((new_oldest, entry.scope));
            }
            new_oldest += 1;
        }
        let layer = Layer {
            version,
            document: new,
            author: author.to_owned(),
            changed_at_ms: at_ms,
            deleted,
        };
        let write = Write {
            layer: LayerRecord::new(
                scope.to_string(),
                version,
                layer.document.clone(),
                layer.author.clone(),
                at_ms,
                deleted,
            ),
            entry: ConfigHistoryEntry {
                version,
                scope: scope.to_string(),
                kind,
                author: author.to_owned(),
                at_ms,
                comment: comment.to_owned(),
                diff,
            },
            prune,
        };
        let durable = self.disk.commit(&write)?;
        // Applied to sled: the memory state must follow, durable or not, or the next change
        // would reuse this version.
        let shown = view(scope, &layer);
        {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            state.version = version;
            state.oldest = new_oldest;
            state.layers.insert(scope.clone(), layer);
        }
        match durable {
            Ok(()) => {
                self.changes.send_replace(version);
                info!(version, scope = %scope, kind = ?kind, author, "configuration changed");
                Ok(shown)
            }
            Err(detail) => {
                warn!(version, scope = %scope, error = %detail, "configuration change not durable");
                Err(ConfigError::NotDurable { version, detail })
            }
        }
    }

    pub(crate) fn disk(&self) -> &Disk {
        &self.disk
    }
}

impl ConfigSource for ConfigStore {
    fn effective(&self, device: &DeviceId, groups: &BTreeSet<String>) -> EffectiveConfig {
        self.merge(device, groups, None)
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Blocks on disk I/O (flush + fsync): call from a blocking thread.
    fn touch_membership(&self, device: &DeviceId, author: &str) -> Result<u64, ConfigSourceError> {
        let errors = check_meta(author, MEMBERSHIP_COMMENT);
        if let Some(e) = errors.first() {
            return Err(ConfigSourceError(format!("{}: {}", e.key, e.message)));
        }
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        self.commit(
            &Scope::Device(device.clone()),
            ConfigChangeKind::Membership,
            Target::Same,
            author,
            MEMBERSHIP_COMMENT,
        )
        .map(|layer| layer.version)
        .map_err(|e| ConfigSourceError(e.to_string()))
    }
}

fn view(scope: &Scope, layer: &Layer) -> ConfigLayerView {
    ConfigLayerView {
        scope: scope.to_string(),
        version: layer.version,
        document: if layer.deleted {
            Map::new()
        } else {
            layer.document.clone()
        },
        author: layer.author.clone(),
        changed_at_ms: layer.changed_at_ms,
        deleted: layer.deleted,
    }
}

/// Author and comment limits.
fn check_meta(author: &str, comment: &str) -> Vec<FieldMessage> {
    let mut errors = Vec::new();
    let author_chars = author.chars().count();
    if author_chars == 0 || author_chars > MAX_AUTHOR_CHARS || author.chars().any(char::is_control)
    {
        errors.push(schema::field(
            "author",
            format!("must be 1-{MAX_AUTHOR_CHARS} characters without control characters"),
        ));
    }
    let comment_chars = comment.chars().count();
    if comment_chars > MAX_COMMENT_CHARS {
        errors.push(schema::field(
            "comment",
            format!("is {comment_chars} characters long; the maximum is {MAX_COMMENT_CHARS}"),
        ));
    } else if let Err(problem) = posfleet_proto::text::check_operator_text(comment) {
        errors.push(schema::field("comment", problem.to_string()));
    }
    errors
}

/// The key-level changes from `old` to `new`, sorted by key.
pub(crate) fn key_diff(old: &Map<String, Value>, new: &Map<String, Value>) -> Vec<ConfigKeyChange> {
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter_map(|key| {
            let (o, n) = (old.get(key), new.get(key));
            (o != n).then(|| ConfigKeyChange {
                key: key.clone(),
                old: o.cloned(),
                new: n.cloned(),
            })
        })
        .collect()
}
