//! The device gate: in the embedded setup, terminals are admitted only once the controller's
//! uplink subscription is in the router.
//!
//! After a restart every terminal reconnects at once, together with the controller's own
//! session. A terminal whose ONLINE presence reached the router before the controller had
//! subscribed would be published to nobody, and shown offline until its next heartbeat.
//! Until the gate opens, devices get CONNACK "server unavailable" and retry with their
//! backoff. The gate opens for good once a controller's uplink subscription is in the router
//! (the embedded controller's local link when its SUBACK is back, `crate::bus::local`; or a
//! controller's SUBSCRIBE over mTLS), or after a deadline so a controller that cannot attach
//! does not lock the fleet out.

use std::sync::atomic::{AtomicBool, Ordering};

use tracing::info;

#[derive(Debug)]
pub(crate) struct DeviceGate {
    open: AtomicBool,
}

impl DeviceGate {
    pub(crate) fn new(open: bool) -> Self {
        Self {
            open: AtomicBool::new(open),
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Opens the gate (idempotent).
    pub(crate) fn open(&self) {
        if !self.open.swap(true, Ordering::AcqRel) {
            info!("controller subscribed; admitting terminals");
        }
    }
}
