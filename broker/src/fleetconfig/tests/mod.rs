//! Store tests: durability across reopen, precedence, effective versions, history and diff,
//! and a model-based property test (`model.rs`).

mod model;
mod store;

use std::collections::BTreeSet;
use std::path::Path;

use posfleet_proto::DeviceId;
use serde_json::{Map, Value};

use super::{ConfigStore, ConfigStoreConfig, Scope};

pub(super) fn open(dir: &Path) -> ConfigStore {
    ConfigStore::open(ConfigStoreConfig {
        cache_capacity: 1 << 20,
        ..ConfigStoreConfig::new(dir)
    })
    .unwrap()
}

pub(super) fn doc(value: Value) -> Map<String, Value> {
    serde_json::from_value(value).unwrap()
}

pub(super) fn device(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

pub(super) fn group(name: &str) -> Scope {
    Scope::group(name).unwrap()
}

pub(super) fn groups(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}
