//! What the edge (and the device endpoint) asks at every connect: is this certificate still
//! good? An in-memory view of the enrolment store, updated by the enrolment service after each
//! durable change, so a check never touches the disk.
//!
//! A certificate is refused when
//! - its serial is revoked (so a device that got a new certificate later is not blocked by
//!   the revocation of an old one);
//! - its device id is decommissioned (every certificate of a retired terminal); or
//! - its device id is revoked and the certificate was issued before the revocation (this
//!   catches certificates whose serial the controller never saw: issued before issue records
//!   were kept, or outside the controller by someone holding the CA key).

use std::collections::{HashMap, HashSet};
use std::sync::{PoisonError, RwLock};

use posfleet_proto::pki::{BACKDATE_SECONDS, CertFacts, Identity};

/// The verdict on a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Good,
    Revoked,
    Decommissioned,
}

impl Standing {
    /// Metric reason of a refusal.
    pub fn reason(self) -> &'static str {
        match self {
            Standing::Good => "good",
            Standing::Revoked => "revoked",
            Standing::Decommissioned => "decommissioned",
        }
    }
}

#[derive(Debug, Default)]
struct State {
    serials: HashSet<String>,
    /// Revoked device id → revocation time (Unix seconds).
    revoked_ids: HashMap<String, i64>,
    decommissioned: HashSet<String>,
    /// Serial of each device's latest accepted connection since this start, so a revocation
    /// also lists the certificate in use even if the controller did not issue it.
    seen: HashMap<String, String>,
}

/// Revocation state shared by the enrolment service (writer) and the edge (reader).
#[derive(Debug, Default)]
pub struct Revocations {
    state: RwLock<State>,
}

impl Revocations {
    /// The standing of a certificate presented by `identity`.
    pub fn check(&self, identity: &Identity, facts: &CertFacts) -> Standing {
        let st = self.state.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(id) = identity.device()
            && st.decommissioned.contains(id.as_str())
        {
            return Standing::Decommissioned;
        }
        if st.serials.contains(&facts.serial) {
            return Standing::Revoked;
        }
        let Some(id) = identity.device() else {
            return Standing::Good;
        };
        if let Some(at) = st.revoked_ids.get(id.as_str()) {
            // Our profile backdates not_before; a certificate issued before `at` starts
            // before `at - BACKDATE`.
            if facts.not_before < at - BACKDATE_SECONDS {
                return Standing::Revoked;
            }
        }
        Standing::Good
    }

    /// Remembers the serial a device connected with (bounded by the fleet size).
    pub fn note_connected(&self, identity: &Identity, facts: &CertFacts) {
        if let Some(id) = identity.device() {
            let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
            if st.seen.get(id.as_str()) != Some(&facts.serial) {
                st.seen.insert(id.to_string(), facts.serial.clone());
            }
        }
    }

    /// The serial device `id` last connected with, if any since this start.
    pub(crate) fn seen_serial(&self, id: &str) -> Option<String> {
        let st = self.state.read().unwrap_or_else(PoisonError::into_inner);
        st.seen.get(id).cloned()
    }

    pub(crate) fn add_serials<'a>(&self, serials: impl IntoIterator<Item = &'a str>) {
        let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
        st.serials.extend(serials.into_iter().map(str::to_owned));
    }

    pub(crate) fn revoke_id(&self, id: &str, at_s: i64) {
        let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
        st.revoked_ids.entry(id.to_owned()).or_insert(at_s);
    }

    pub(crate) fn decommission_id(&self, id: &str) {
        let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
        st.decommissioned.insert(id.to_owned());
    }

    /// Is the serial revoked?
    pub fn is_revoked_serial(&self, serial: &str) -> bool {
        let st = self.state.read().unwrap_or_else(PoisonError::into_inner);
        st.serials.contains(serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use posfleet_proto::DeviceId;

    fn facts(serial: &str, not_before: i64) -> CertFacts {
        CertFacts {
            serial: serial.into(),
            not_before,
            not_after: not_before + 1000,
        }
    }

    #[test]
    fn revocation_by_serial_by_id_and_by_issue_time() {
        let r = Revocations::default();
        let dev = Identity::Device(DeviceId::new("T-1").unwrap());
        let other = Identity::Device(DeviceId::new("T-2").unwrap());
        assert_eq!(r.check(&dev, &facts("aa", 0)), Standing::Good);
        r.add_serials(["aa"]);
        assert_eq!(r.check(&dev, &facts("aa", 0)), Standing::Revoked);
        assert_eq!(r.check(&dev, &facts("bb", 0)), Standing::Good);

        // Revoked at t=10 000: older certificates of the id are refused, newer pass.
        r.revoke_id("T-1", 10_000);
        assert_eq!(
            r.check(&dev, &facts("cc", 10_000 - BACKDATE_SECONDS - 1)),
            Standing::Revoked
        );
        assert_eq!(
            r.check(&dev, &facts("dd", 10_001 - BACKDATE_SECONDS)),
            Standing::Good
        );
        assert_eq!(r.check(&other, &facts("ee", 0)), Standing::Good);

        r.decommission_id("T-2");
        assert_eq!(
            r.check(&other, &facts("ff", i64::MAX / 2)),
            Standing::Decommissioned
        );
    }
}
