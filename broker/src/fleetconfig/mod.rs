//! Layered, versioned fleet configuration (ADR 0007, "Configuration").
//!
//! This file fixes the interface the command plane uses ([`ConfigSource`]); the store behind
//! it (layers, schema validation, versions with author and diff, history) lives beside it.
//!
//! # Layout
//!
//! - `mod.rs`: [`ConfigSource`] and [`EffectiveConfig`] (the command plane's view).
//! - `scope.rs`: [`Scope`]: `fleet`, `group/<name>`, `device/<id>`.
//! - `schema.rs`: the keys a layer may hold and their rules (table below).
//! - `store.rs`: [`ConfigStore`]: layers in memory, changes (set, replace, delete, membership
//!   touch), effective configuration, the [`ConfigSource`] implementation.
//! - `history.rs`: history pages and diffs between versions.
//! - `disk.rs`: the sled database `DATA/config` (one batch per change, flush + fsync).
//! - `error.rs`: [`ConfigError`].
//!
//! # Model
//!
//! A layer is a flat JSON object of dotted keys to scalars (string, i64, bool). Effective
//! configuration of a device = fleet layer, overridden by its groups' layers in name order,
//! overridden by its device layer. Every change takes the next value of one fleet-wide counter
//! as its version and is kept as a history entry `{version, scope, kind, author, at_ms,
//! comment, diff: [{key, old, new}]}`; a layer's version is that of its last change. A
//! device's effective version is the highest version among the layers that apply to it,
//! including *tombstones*: deleting a layer is a change with its own version, and so is a
//! membership touch (a device-layer change with comment "membership" and no document change),
//! so the effective version rises whenever the effective content may have changed.
//!
//! Choices: a `set`/`replace` that leaves an existing layer unchanged records nothing and
//! answers the current version (so retries are harmless); one that creates a layer is always
//! a change, even if empty. Diffs are per layer (or of every layer), not of a device's
//! effective configuration, whose past group memberships are not recorded. The history keeps
//! the latest `max_history` entries (default 100,000).
//!
//! # Keys
//!
//! | key | type | rule |
//! |---|---|---|
//! | `agent.heartbeat_interval_s` | integer | 5..=3600 |
//! | `agent.max_offline_s` | integer | 5..=2,592,000 |
//! | `agent.telemetry_interval_s` | integer | 5..=86,400 |
//! | `display.brightness` | integer | 0..=100 |
//! | `display.language` | string | `^[a-z]{2}(-[A-Z]{2})?$` |
//! | `maintenance.window` | string | `HH:MM-HH:MM`, valid 24 h times, start ≠ end |
//! | `network.ntp_server` | string | host name (labels of letters, digits, `-`), ≤ 253 |
//! | `payment.contactless_limit_minor` | integer | 0..=1,000,000,000 |
//! | `payment.currency` | string | `^[A-Z]{3}$` |
//! | `payment.max_amount_minor` | integer | 1..=1,000,000,000,000 |
//! | `payment.tips_enabled` | boolean | |
//! | `receipt.footer`, `receipt.header` | string | ≤ 200 characters, no control characters |
//! | `store.name` | string | ≤ 100 characters, no control characters |
//! | `store.timezone` | string | `Area/City` or `Area/Region/City` (IANA style) |
//! | `custom.*` | any scalar | strings ≤ 256 characters |
//!
//! Keys are ≤ 128 bytes; a layer holds ≤ 200 keys and ≤ 64 KiB of JSON. Anything else is
//! refused with one message per key.

mod disk;
mod error;
mod history;
pub mod schema;
mod scope;
mod store;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;

use posfleet_proto::DeviceId;
use tokio::sync::watch;

pub use error::ConfigError;
pub use history::{DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT};
pub use scope::{SCOPE_HINT, Scope, ScopeError, validate_group_name};
pub use store::{ConfigStore, ConfigStoreConfig, MEMBERSHIP_COMMENT};

/// A device's effective configuration: fleet layer, overridden by its groups (in name order),
/// overridden by its device layer.
#[derive(Debug, Clone, PartialEq)]
pub struct EffectiveConfig {
    /// The highest version among the layers that apply to the device (0: none ever set).
    pub version: u64,
    /// Flat object of dotted keys to scalars.
    pub document: serde_json::Map<String, serde_json::Value>,
}

/// What the command plane needs from the configuration store.
pub trait ConfigSource: Send + Sync + 'static {
    /// The effective configuration of `device`, member of `groups`.
    fn effective(&self, device: &DeviceId, groups: &BTreeSet<String>) -> EffectiveConfig;

    /// A counter that rises after every committed change (any layer, any membership touch);
    /// the reconciler wakes on it.
    fn changes(&self) -> watch::Receiver<u64>;

    /// Records that `device`'s group membership changed (a new version of its device layer
    /// with the same document and the comment "membership"), durably, so its effective
    /// version rises. Called by the registry's group update before it answers.
    fn touch_membership(&self, device: &DeviceId, author: &str) -> Result<u64, ConfigSourceError>;
}

/// The store could not record a change.
#[derive(Debug, thiserror::Error)]
#[error("configuration store: {0}")]
pub struct ConfigSourceError(pub String);
