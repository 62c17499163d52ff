//! Which devices a command targets (ADR 0007, "Groups, labels, selectors").

use std::collections::BTreeMap;

use posfleet_proto::DeviceId;

use crate::registry::{DeviceRecord, Registry};

/// Most devices a name (group, label key or value) may have in it: `[A-Za-z0-9._-]{1,64}`.
pub const MAX_NAME_LEN: usize = 64;

/// True for a valid group name, label key or label value.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A set of devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// These devices (each must exist).
    Devices(Vec<DeviceId>),
    /// Every member of the group.
    Group(String),
    /// Devices carrying every label; `model` and `firmware` also match the reported model
    /// and firmware version.
    Labels(BTreeMap<String, String>),
}

impl Selector {
    /// True if `record` is selected (for `Devices`: if it is one of them).
    pub(crate) fn matches(&self, record: &DeviceRecord) -> bool {
        match self {
            Selector::Devices(ids) => ids.iter().any(|id| id.as_str() == record.id),
            Selector::Group(g) => record.groups.contains(g),
            Selector::Labels(labels) => labels.iter().all(|(k, v)| {
                record.labels.get(k) == Some(v)
                    || (k == "model" && record.model == *v)
                    || (k == "firmware" && record.versions.firmware == *v)
            }),
        }
    }

    /// The selected devices, sorted. For `Devices`, the ones the registry does not know are
    /// returned as `Err`.
    pub(crate) fn resolve(&self, registry: &Registry) -> Result<Vec<DeviceId>, Vec<DeviceId>> {
        if let Selector::Devices(ids) = self {
            let unknown: Vec<DeviceId> = ids
                .iter()
                .filter(|id| registry.groups(id).is_none())
                .cloned()
                .collect();
            if !unknown.is_empty() {
                return Err(unknown);
            }
            let mut ids = ids.clone();
            ids.sort();
            ids.dedup();
            return Ok(ids);
        }
        Ok(registry.matching(|r| self.matches(r)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_label_matching() {
        assert!(valid_name("shop-12.north_A"));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(&"x".repeat(65)));
        let mut r = DeviceRecord::new("T-1", 0);
        r.model = "A920".into();
        r.versions.firmware = "fw-2".into();
        r.labels.insert("site".into(), "north".into());
        r.groups.insert("pilot".into());
        let labels = |pairs: &[(&str, &str)]| {
            Selector::Labels(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        assert!(labels(&[("site", "north"), ("model", "A920")]).matches(&r));
        assert!(labels(&[("firmware", "fw-2")]).matches(&r));
        assert!(!labels(&[("site", "north"), ("model", "X")]).matches(&r));
        assert!(Selector::Group("pilot".into()).matches(&r));
        assert!(!Selector::Group("other".into()).matches(&r));
    }
}
