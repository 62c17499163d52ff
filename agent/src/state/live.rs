//! [`LiveState`]: the terminal's lock and configuration as the rest of the agent sees them.
//! The command executor is the only writer (after the state store has the change); the
//! transaction intake refuses transactions while locked, the local API shows it, the runtime
//! reports it (and publishes a `ReportedState` whenever it changes).

use std::sync::Arc;

use tokio::sync::watch;

use super::ConfigDocument;

/// What the terminal is right now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TerminalStatus {
    pub locked: bool,
    pub lock_reason: String,
    pub lock_generation: u64,
    /// The applied configuration version (0: none).
    pub config_version: u64,
    /// The applied configuration document (shared, read by `GET /v1/config`).
    pub config: Arc<ConfigDocument>,
    /// What the terminal runs: the configured versions with those installed by software
    /// updates put over them (reported in heartbeats, presence and `ReportedState`).
    pub versions: posfleet_proto::pb::SoftwareVersions,
}

/// A terminal's live status. Cheap to clone; clones share it.
#[derive(Debug, Clone)]
pub struct LiveState {
    status: Arc<watch::Sender<TerminalStatus>>,
}

impl Default for LiveState {
    fn default() -> Self {
        Self::new(TerminalStatus::default())
    }
}

impl LiveState {
    pub fn new(status: TerminalStatus) -> Self {
        Self {
            status: Arc::new(watch::Sender::new(status)),
        }
    }

    pub fn is_locked(&self) -> bool {
        self.status.borrow().locked
    }

    /// A copy of the current status.
    pub fn get(&self) -> TerminalStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<TerminalStatus> {
        self.status.subscribe()
    }

    /// Changes the status; receivers are woken only if something changed.
    pub fn update(&self, change: impl FnOnce(&mut TerminalStatus)) {
        self.status.send_if_modified(|status| {
            let before = status.clone();
            change(status);
            *status != before
        });
    }

    /// Locks or unlocks without a command (tests of the local API).
    #[cfg(test)]
    pub fn set_locked(&self, locked: bool) {
        self.update(|s| s.locked = locked);
    }
}
