//! The records of the state store and their encodings.

use serde::{Deserialize, Serialize};

use super::StateError;

/// A configuration document: a flat JSON object of dotted keys to scalars.
pub type ConfigDocument = serde_json::Map<String, serde_json::Value>;

/// First byte of a journal value: the layout version.
const JOURNAL_FORMAT: u8 = 1;

/// Where a journaled command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalStatus {
    /// Accepted and acting (or interrupted by a restart, to be settled at start).
    InProgress,
    /// Its final result is stored; a re-delivery gets that result again.
    Final,
}

/// One journaled command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    pub status: JournalStatus,
    /// The command's `not_after_ms`: the entry may go after it (pruning).
    pub not_after_ms: u64,
    /// The verified `Command` bytes while in progress (to settle it after a restart); empty
    /// once final.
    pub command: Vec<u8>,
    /// The encoded `CommandResult`: the final one, or the last progress report.
    pub result: Vec<u8>,
}

impl JournalEntry {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(14 + self.command.len() + self.result.len());
        out.push(JOURNAL_FORMAT);
        out.push(match self.status {
            JournalStatus::InProgress => 1,
            JournalStatus::Final => 2,
        });
        out.extend_from_slice(&self.not_after_ms.to_be_bytes());
        let len = u32::try_from(self.command.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.command);
        out.extend_from_slice(&self.result);
        out
    }

    pub(super) fn decode(value: &[u8]) -> Result<Self, StateError> {
        let corrupt = || StateError::Corrupt {
            detail: "a journal entry has an unknown layout".into(),
        };
        if value.first() != Some(&JOURNAL_FORMAT) || value.len() < 14 {
            return Err(corrupt());
        }
        let status = match value[1] {
            1 => JournalStatus::InProgress,
            2 => JournalStatus::Final,
            _ => return Err(corrupt()),
        };
        let not_after_ms = u64::from_be_bytes(value[2..10].try_into().map_err(|_| corrupt())?);
        let len = u32::from_be_bytes(value[10..14].try_into().map_err(|_| corrupt())?) as usize;
        let command = value.get(14..14 + len).ok_or_else(corrupt)?.to_vec();
        let result = value[14 + len..].to_vec();
        Ok(Self {
            status,
            not_after_ms,
            command,
            result,
        })
    }
}

/// The terminal's lock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    pub locked: bool,
    /// Why (the command's reason, `offline_lease`, `wiped`); empty when unlocked.
    pub reason: String,
    /// Generation of the last Lock/Unlock applied (0: none). A lease self-lock keeps it.
    pub generation: u64,
    /// Locked by the offline lease (a lease saying `locked = false` ends it).
    pub by_lease: bool,
}

impl LockRecord {
    pub(super) fn encode(&self) -> Result<Vec<u8>, StateError> {
        serde_json::to_vec(self).map_err(|e| StateError::Corrupt {
            detail: format!("cannot encode the lock record: {e}"),
        })
    }

    pub(super) fn decode(value: &[u8]) -> Result<Self, StateError> {
        serde_json::from_slice(value).map_err(|e| StateError::Corrupt {
            detail: format!("the lock record does not decode: {e}"),
        })
    }
}

/// The configuration the terminal runs, and the one before it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AppliedConfig {
    /// 0: nothing applied yet.
    pub version: u64,
    pub document: ConfigDocument,
    /// The configuration replaced by the last push (for operators; rollback of a failed
    /// apply restores the file from memory).
    #[serde(default)]
    pub previous_version: u64,
    #[serde(default)]
    pub previous_document: ConfigDocument,
}

impl AppliedConfig {
    pub(super) fn encode(&self) -> Result<Vec<u8>, StateError> {
        serde_json::to_vec(self).map_err(|e| StateError::Corrupt {
            detail: format!("cannot encode the applied config: {e}"),
        })
    }

    pub(super) fn decode(value: &[u8]) -> Result<Self, StateError> {
        serde_json::from_slice(value).map_err(|e| StateError::Corrupt {
            detail: format!("the applied config record does not decode: {e}"),
        })
    }
}

/// Versions installed by software updates (issue 5), per `SoftwareVersions` component; a
/// component absent here reports what the agent's config (or build, for `agent`) says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledVersions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_app: Option<String>,
}

impl InstalledVersions {
    /// The slot of `component` (`agent`, `firmware` or `payment_app`).
    pub fn slot(&mut self, component: Component) -> &mut Option<String> {
        match component {
            Component::Agent => &mut self.agent,
            Component::Firmware => &mut self.firmware,
            Component::PaymentApp => &mut self.payment_app,
        }
    }

    /// `base` with every installed version put over it.
    pub fn over(
        &self,
        mut base: posfleet_proto::pb::SoftwareVersions,
    ) -> posfleet_proto::pb::SoftwareVersions {
        if let Some(v) = &self.agent {
            base.agent.clone_from(v);
        }
        if let Some(v) = &self.firmware {
            base.firmware.clone_from(v);
        }
        if let Some(v) = &self.payment_app {
            base.payment_app.clone_from(v);
        }
        base
    }

    pub(super) fn encode(&self) -> Result<Vec<u8>, StateError> {
        serde_json::to_vec(self).map_err(|e| StateError::Corrupt {
            detail: format!("cannot encode the installed versions: {e}"),
        })
    }

    pub(super) fn decode(value: &[u8]) -> Result<Self, StateError> {
        serde_json::from_slice(value).map_err(|e| StateError::Corrupt {
            detail: format!("the installed versions record does not decode: {e}"),
        })
    }
}

/// What a software update changes: a field of `SoftwareVersions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    PaymentApp,
    Firmware,
    Agent,
}

impl Component {
    /// From the wire name; empty means `payment_app` (ADR 0008).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "" | "payment_app" => Some(Self::PaymentApp),
            "firmware" => Some(Self::Firmware),
            "agent" => Some(Self::Agent),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::PaymentApp => "payment_app",
            Self::Firmware => "firmware",
            Self::Agent => "agent",
        }
    }

    /// This component's field of `versions`.
    pub fn of(self, versions: &posfleet_proto::pb::SoftwareVersions) -> &str {
        match self {
            Self::PaymentApp => &versions.payment_app,
            Self::Firmware => &versions.firmware,
            Self::Agent => &versions.agent,
        }
    }

    /// Sets this component's field of `versions`.
    pub fn set(self, versions: &mut posfleet_proto::pb::SoftwareVersions, version: &str) {
        let field = match self {
            Self::PaymentApp => &mut versions.payment_app,
            Self::Firmware => &mut versions.firmware,
            Self::Agent => &mut versions.agent,
        };
        version.clone_into(field);
    }
}
