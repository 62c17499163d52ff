//! Test support: terminal command setups. The fleet PKI and the fake MQTT broker are
//! `posfleet_runtime::testing` (the `testing` feature, enabled for this crate's tests).
//! Compiled for unit tests only.

use std::sync::Arc;

use posfleet_proto::DeviceId;

use crate::command::{CommandSettings, CommandSetup, TerminalFiles};
use crate::state::{DEFAULT_STATE_CACHE_CAPACITY, StateStore};

/// A command setup for terminal `id`: its part of `store`, `settings`, config file in `dir`.
pub(crate) fn command_setup_in(
    store: &StateStore,
    dir: &std::path::Path,
    id: &DeviceId,
    settings: CommandSettings,
) -> CommandSetup {
    let files = TerminalFiles {
        config: dir.join(format!("config-{id}.json")),
        identity: Vec::new(),
        updates_dir: dir.join("updates"),
        update_prefix: format!("{id}-"),
        api_socket: None,
    };
    CommandSetup::load(Arc::new(settings), store.device(id), files).unwrap()
}

/// A command setup with a fresh state store in `dir/state` and a random trusted key (for
/// tests that send no commands).
pub(crate) fn command_setup(dir: &std::path::Path, id: &DeviceId) -> CommandSetup {
    let store = StateStore::open(&dir.join("state"), DEFAULT_STATE_CACHE_CAPACITY).unwrap();
    let key = posfleet_proto::signing::CommandKey::generate();
    let settings = CommandSettings::new(posfleet_proto::signing::KeyRing::new(vec![
        key.public_key().clone(),
    ]));
    command_setup_in(&store, dir, id, settings)
}
