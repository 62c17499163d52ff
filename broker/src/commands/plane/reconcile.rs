//! Desired state: reconciliation of lock and configuration against what terminals report,
//! configuration pushes with backoff after failures, and signed leases.

use std::time::Duration;

use posfleet_proto::signing::new_command_id;
use posfleet_proto::{DeviceId, pb};
use tracing::{debug, info, warn};

use super::{Plane, ms};
use crate::commands::record::transition;
use crate::fleetconfig::EffectiveConfig;
use crate::views::{CommandBody, CommandState, CommandView};

/// Longest the reconciler waits before pushing again a configuration version the terminal
/// failed or refused to apply (the wait doubles from `resend_interval` up to this).
const MAX_PUSH_BACKOFF: Duration = Duration::from_secs(3600);

/// A configuration version a terminal failed (or refused) to apply: pushed again only after
/// a backoff, so that a terminal whose apply hook always fails does not get (and run) a new
/// push at every heartbeat. A newer version is pushed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PushFailure {
    version: u64,
    /// Failed pushes of this version in a row.
    failures: u32,
    /// Controller clock, Unix ms: no push of this version before.
    retry_at_ms: u64,
}

pub(super) fn lock_body(locked: bool, reason: String, generation: u64) -> CommandBody {
    if locked {
        CommandBody::Lock { reason, generation }
    } else {
        CommandBody::Unlock { reason, generation }
    }
}

/// How long to wait before pushing a version again after `failures` failed pushes of it:
/// `base` doubled for each failure after the first, at most [`MAX_PUSH_BACKOFF`].
pub(in crate::commands) fn push_backoff(base: Duration, failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    base.saturating_mul(factor).min(MAX_PUSH_BACKOFF.max(base))
}

impl Plane {
    /// Remembers a failed or refused configuration push (for the backoff of
    /// [`Self::push_if_behind`]) and forgets it once a push succeeds.
    pub(super) fn note_push_outcome(&mut self, device: &DeviceId, cmd: &CommandView) {
        let CommandBody::ConfigPush { version, .. } = cmd.body else {
            return;
        };
        match cmd.status {
            CommandState::Succeeded => {
                self.push_failures.remove(device);
            }
            CommandState::Failed | CommandState::Rejected => {
                let failures = match self.push_failures.get(device) {
                    Some(f) if f.version == version => f.failures.saturating_add(1),
                    _ => 1,
                };
                let wait = push_backoff(self.d.cfg.resend_interval, failures);
                let retry_at_ms = (self.d.clock)().saturating_add(ms(wait));
                warn!(
                    device_id = %device, command_id = %cmd.id, version, failures,
                    retry_in_s = wait.as_secs(),
                    "configuration push not applied; pushed again after a backoff or on the next change"
                );
                self.push_failures.insert(
                    device.clone(),
                    PushFailure {
                        version,
                        failures,
                        retry_at_ms,
                    },
                );
            }
            _ => {}
        }
    }

    /// The device's current lock generation, including changes not yet committed.
    pub(super) fn generation(&self, device: &DeviceId) -> u64 {
        if let Some(d) = self.pending_desired.get(device) {
            return d.generation;
        }
        self.d
            .shared
            .desired_lock(device)
            .map_or(0, |d| d.generation)
    }

    /// Compares what `device` reported with what is desired and issues what is missing.
    pub(super) fn reconcile(&mut self, device: &DeviceId, now: u64) {
        let Some(rep) = self.reported.get(device).cloned() else {
            return;
        };
        if let Some(want) = self.d.shared.desired_lock(device) {
            if rep.lock_generation < want.generation {
                let carried = self.carries(device, |b| match b {
                    CommandBody::Lock { generation, .. }
                    | CommandBody::Unlock { generation, .. } => *generation >= want.generation,
                    _ => false,
                });
                if !carried {
                    let body = lock_body(want.locked, want.reason.clone(), want.generation);
                    self.issue(device, body, now);
                }
            } else if rep.lock_generation == want.generation && rep.locked != want.locked {
                // The same generation, another lock state: the terminal's own (offline
                // lease) lock. A Lock/Unlock of this generation would be refused as stale;
                // the lease states the desired lock and ends it.
                self.lease(device, now);
            }
        }
        let Some(groups) = self.d.registry.groups(device) else {
            return;
        };
        let eff = self.d.config.effective(device, &groups);
        self.effective.insert(device.clone(), eff.version);
        self.push_if_behind(device, eff, rep.config_version, now);
    }

    /// Issues a ConfigPush if `eff` is newer than `reported` and nothing live carries it.
    pub(super) fn push_if_behind(
        &mut self,
        device: &DeviceId,
        eff: EffectiveConfig,
        reported: u64,
        now: u64,
    ) {
        if eff.version == 0 || eff.version <= reported {
            return;
        }
        let version = eff.version;
        if self
            .push_failures
            .get(device)
            .is_some_and(|f| f.version == version && now < f.retry_at_ms)
        {
            return;
        }
        let carried = self.carries(
            device,
            |b| matches!(b, CommandBody::ConfigPush { version: v, .. } if *v >= version),
        );
        if carried {
            return;
        }
        let id = self.issue(
            device,
            CommandBody::ConfigPush {
                version,
                document: eff.document,
            },
            now,
        );
        // Supersede older pushes still pending.
        let older: Vec<String> = self
            .by_device
            .get(device)
            .into_iter()
            .flatten()
            .filter(|i| {
                self.live.get(*i).is_some_and(
                    |c| matches!(c.body, CommandBody::ConfigPush { version: v, .. } if v < version),
                )
            })
            .cloned()
            .collect();
        for old in older {
            if let Some(cmd) = self.live.get_mut(&old) {
                if transition(cmd, CommandState::Cancelled, now).is_ok() {
                    cmd.message = format!("superseded by {id} (version {version})");
                    let cmd = cmd.clone();
                    self.count_status(CommandState::Cancelled);
                    self.changed(cmd);
                }
            }
        }
    }

    /// True if a live or pending command of `device` matches.
    pub(super) fn carries(&self, device: &DeviceId, pred: impl Fn(&CommandBody) -> bool) -> bool {
        let live = self
            .by_device
            .get(device)
            .into_iter()
            .flatten()
            .filter_map(|id| self.live.get(id))
            .any(|c| pred(&c.body));
        live || self
            .pending
            .get(device)
            .is_some_and(|p| p.iter().any(|c| pred(&c.body)))
    }

    /// The effective versions of every device, so a later change wakes only those whose
    /// version moved.
    pub(super) fn prime_effective(&mut self) {
        for (device, groups) in self.d.registry.membership() {
            let eff = self.d.config.effective(&device, &groups);
            self.effective.insert(device, eff.version);
        }
    }

    /// The configuration store committed a change: push to the devices whose effective
    /// version moved.
    pub(super) fn config_changed(&mut self) {
        let now = (self.d.clock)();
        let mut pushed = 0usize;
        for (device, groups) in self.d.registry.membership() {
            let eff = self.d.config.effective(&device, &groups);
            let before = self.effective.insert(device.clone(), eff.version);
            if before == Some(eff.version) {
                continue;
            }
            let reported = self.reported.get(&device).map_or(0, |r| r.config_version);
            let had = self.pending.get(&device).map_or(0, Vec::len);
            self.push_if_behind(&device, eff, reported, now);
            pushed += self.pending.get(&device).map_or(0, Vec::len) - had;
        }
        if pushed > 0 {
            info!(pushed, "configuration change: pushes issued");
        }
    }

    /// Sends a signed lease (not stored, no result expected).
    pub(super) fn lease(&mut self, device: &DeviceId, now: u64) {
        let lock = self.d.shared.desired_lock(device);
        let config_version = self
            .d
            .registry
            .groups(device)
            .map_or(0, |groups| self.d.config.effective(device, &groups).version);
        let command = pb::Command {
            id: new_command_id(),
            target_device: device.to_string(),
            issued_at_ms: now,
            not_after_ms: now.saturating_add(ms(self.d.cfg.lease_validity)),
            body: Some(pb::command::Body::Lease(pb::Lease {
                locked: lock.as_ref().is_some_and(|l| l.locked),
                lock_generation: lock.as_ref().map_or(0, |l| l.generation),
                lock_reason: lock.map(|l| l.reason).unwrap_or_default(),
                config_version,
            })),
        };
        match self.d.downlink.send(device, &self.d.key.sign(&command)) {
            Ok(()) => {
                self.last_lease.insert(device.clone(), now);
                self.d.metrics.command_leases_sent_total.inc();
            }
            Err(e) => {
                debug!(device_id = %device, error = %e, "lease not sent; next heartbeat retries")
            }
        }
    }
}
