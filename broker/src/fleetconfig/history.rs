//! Reading the past: the history of changes and the key-level diff between two versions.

use std::collections::BTreeMap;

use serde_json::Value;

use super::error::ConfigError;
use super::scope::Scope;
use super::store::ConfigStore;
use crate::views::{ConfigDiffView, ConfigHistoryPage, ConfigScopedChange};

/// History entries per page unless asked otherwise.
pub const DEFAULT_HISTORY_LIMIT: usize = 50;
/// Most history entries per page.
pub const MAX_HISTORY_LIMIT: usize = 1000;
/// Most history entries one diff reads; a wider range must be narrowed or scoped.
pub const MAX_DIFF_ENTRIES: u64 = 20_000;

impl ConfigStore {
    /// Changes newest first: of `scope` only if given, with versions below `before` if given,
    /// at most `limit` (clamped to 1..=[`MAX_HISTORY_LIMIT`]). Blocks on disk reads.
    pub fn history(
        &self,
        scope: Option<&Scope>,
        limit: usize,
        before: Option<u64>,
    ) -> Result<ConfigHistoryPage, ConfigError> {
        let limit = limit.clamp(1, MAX_HISTORY_LIMIT);
        let newest = match before {
            Some(0) => {
                return Ok(ConfigHistoryPage {
                    entries: Vec::new(),
                    next_before: None,
                });
            }
            Some(before) => before - 1,
            None => self.version(),
        };
        let scope = scope.map(Scope::to_string);
        // One more than asked, to know whether there is a next page.
        let mut entries = self
            .disk()
            .entries_desc(scope.as_deref(), 1..=newest, limit + 1)?;
        let next_before = if entries.len() > limit {
            entries.truncate(limit);
            entries.last().map(|e| e.version)
        } else {
            None
        };
        Ok(ConfigHistoryPage {
            entries,
            next_before,
        })
    }

    /// The keys whose value at version `to` differs from their value at version `from`, in
    /// `scope`'s layer, or in every layer when `scope` is `None`. Version 0 is the empty store;
    /// a deleted layer reads as empty. Needs the history of `from + 1 ..= to`. Blocks on disk
    /// reads.
    ///
    /// Diffs are per layer, not of a device's effective configuration: a device's past group
    /// memberships are not recorded, so its past effective configuration cannot be rebuilt.
    pub fn diff(
        &self,
        scope: Option<&Scope>,
        from: u64,
        to: u64,
    ) -> Result<ConfigDiffView, ConfigError> {
        let current = self.version();
        if from > to {
            return Err(ConfigError::BadRange(format!(
                "from ({from}) must not be after to ({to})"
            )));
        }
        if to > current {
            return Err(ConfigError::BadRange(format!(
                "to ({to}) is after the latest version ({current})"
            )));
        }
        let oldest = self.oldest_retained();
        if from < to && from + 1 < oldest {
            return Err(ConfigError::Pruned {
                oldest,
                oldest_from: oldest - 1,
            });
        }
        if scope.is_none() && to - from > MAX_DIFF_ENTRIES {
            return Err(ConfigError::BadRange(format!(
                "a diff of every layer spans at most {MAX_DIFF_ENTRIES} versions; narrow the \
                 range or give a scope"
            )));
        }
        let scope_name = scope.map(Scope::to_string);
        let entries = if from < to {
            self.disk()
                .entries_desc(scope_name.as_deref(), from + 1..=to, usize::MAX)?
        } else {
            Vec::new()
        };
        // Oldest first: the first change of a key gives its old value, the last its new one.
        let mut folded: BTreeMap<(Scope, String), (Option<Value>, Option<Value>)> = BTreeMap::new();
        for entry in entries.into_iter().rev() {
            let entry_scope = Scope::parse(&entry.scope).map_err(|e| ConfigError::Corrupt {
                path: std::path::PathBuf::new(),
                key: format!("history {}", entry.version),
                detail: e.to_string(),
            })?;
            for change in entry.diff {
                folded
                    .entry((entry_scope.clone(), change.key))
                    .and_modify(|(_, new)| new.clone_from(&change.new))
                    .or_insert((change.old, change.new));
            }
        }
        let changes = folded
            .into_iter()
            .filter(|(_, (old, new))| old != new)
            .map(|((scope, key), (old, new))| ConfigScopedChange {
                scope: scope.to_string(),
                key,
                old,
                new,
            })
            .collect();
        Ok(ConfigDiffView {
            from,
            to,
            scope: scope_name,
            changes,
        })
    }
}
