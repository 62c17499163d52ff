//! Layered, versioned fleet configuration (ADR 0007, "Configuration").
//!
//! This file fixes the interface the command plane uses ([`ConfigSource`]); the store behind
//! it (layers, schema validation, versions with author and diff, history) lives beside it.

use std::collections::BTreeSet;

use posfleet_proto::DeviceId;
use tokio::sync::watch;

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
