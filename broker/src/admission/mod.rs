//! Connection admission, one mechanism for every listener of the process: the MQTT edge
//! (`edge/mod.rs`), the admin API and the device download endpoint (`api/server.rs`).
//! docs/decisions/0012-connection-admission.md explains the design.
//!
//! Every accepted socket asks its listener's [`Admission`] for a [`Ticket`] before anything
//! else happens. A connection is *pending* from accept until its listener calls
//! [`Establish::establish`] (the edge: mutual TLS done; HTTPS: the first request's headers
//! are in), *established* afterwards.
//!
//! - Per client address (IPv4 address, IPv6 /64): at most `max_per_address` open connections
//!   and `max_pending_per_address` pending ones; beyond, the socket is closed at once. Both
//!   are below the listener's total, so one address never takes every slot.
//! - At most `max_connections` open connections: a new one takes the slot of the *oldest
//!   pending* connection (closed at once), or is closed itself if nothing is pending.
//! - Deadlines ([`Admission::tls_handshake`]): a socket that sends nothing for
//!   `silent_timeout` is closed before any TLS state exists; the handshake must end
//!   `handshake_timeout` after accept.
//! - Handshake slots bound CPU work, not waiting: `gate.rs` holds a slot only while rustls
//!   processes bytes that have arrived, never while a handshake waits for the network.
//! - Every refusal is counted in `posfleet_admission_refusals_total{site, reason}`; open
//!   connections in `posfleet_admission_connections{site, state}`.
//!
//! # Layout
//!
//! - this file: [`AdmissionLimits`], [`Admission`] (the table of open connections by client
//!   address, caps, eviction, counters), [`Ticket`] and [`Establish`];
//! - `handshake.rs`: the TLS handshake of an admitted socket under the deadlines;
//! - `gate.rs`: [`CpuGated`], the socket wrapper that holds a handshake slot only while
//!   rustls works;
//! - `args.rs`: the command-line flags of every listener's limits.

mod args;
mod gate;
mod handshake;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use args::{AdmissionArgs, AdmissionOptions};
pub(crate) use gate::CpuGated;
pub(crate) use handshake::HandshakeError;

use crate::metrics::Metrics;

/// The admission limits of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Open connections at most, pending or established. A new connection beyond it takes the
    /// slot of the oldest pending one, or is closed if none is pending.
    pub max_connections: usize,
    /// Open connections of one client address (IPv6: one /64) at most; below
    /// `max_connections`, so others always find room.
    pub max_per_address: usize,
    /// Pending connections of one client address at most (at most `max_per_address`).
    pub max_pending_per_address: usize,
    /// A socket that has sent nothing this long after accept is closed; until its first byte
    /// it has no TLS state and holds no handshake slot.
    pub silent_timeout: Duration,
    /// The TLS handshake must be over this long after accept.
    pub handshake_timeout: Duration,
    /// Handshake steps doing CPU work at once (rustls processing a flight that has arrived);
    /// a handshake waiting for the network holds none.
    pub handshake_cpu_slots: usize,
}

/// Default of [`AdmissionLimits::silent_timeout`].
const SILENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of [`AdmissionLimits::handshake_timeout`].
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl AdmissionLimits {
    /// The admin API: operators, `posctl`, dashboards; a few addresses (bastions, offices).
    pub fn api() -> Self {
        Self {
            max_connections: 1024,
            max_per_address: 64,
            max_pending_per_address: 32,
            silent_timeout: SILENT_TIMEOUT,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            handshake_cpu_slots: default_cpu_slots(),
        }
    }

    /// The device download endpoint: terminals fetching artifacts during rollout waves.
    pub fn device() -> Self {
        Self::api()
    }

    /// The MQTT edge: the whole fleet, and many terminals behind one store or carrier NAT.
    pub fn mqtt() -> Self {
        Self {
            max_connections: 20_000,
            max_per_address: 10_000,
            max_pending_per_address: 256,
            silent_timeout: SILENT_TIMEOUT,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            handshake_cpu_slots: default_cpu_slots(),
        }
    }

    /// Checks the caps keep headroom for other addresses; the error names the offending
    /// field.
    pub fn check(&self) -> Result<(), String> {
        let counts = [
            ("max_connections", self.max_connections),
            ("max_per_address", self.max_per_address),
            ("max_pending_per_address", self.max_pending_per_address),
            ("handshake_cpu_slots", self.handshake_cpu_slots),
        ];
        if let Some((field, _)) = counts.iter().find(|(_, n)| *n == 0) {
            return Err(format!("{field} must be at least 1"));
        }
        if self.max_per_address >= self.max_connections {
            return Err(format!(
                "max_per_address ({}) must be below max_connections ({}), so that one address \
                 never takes every connection",
                self.max_per_address, self.max_connections
            ));
        }
        if self.max_pending_per_address > self.max_per_address {
            return Err(format!(
                "max_pending_per_address ({}) must not exceed max_per_address ({})",
                self.max_pending_per_address, self.max_per_address
            ));
        }
        if self.silent_timeout.is_zero() || self.handshake_timeout.is_zero() {
            return Err("silent_timeout and handshake_timeout must be longer than 0".to_owned());
        }
        Ok(())
    }
}

/// One handshake slot per core: handshakes may use every core, but never queue more CPU work
/// than there are cores to do it.
fn default_cpu_slots() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

/// Why a socket was not admitted (closed at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its address already holds `max_per_address` connections.
    PerAddress,
    /// Its address already holds `max_pending_per_address` pending connections.
    PendingPerAddress,
    /// `max_connections` are open and none of them is pending.
    Full,
}

impl Refusal {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refusal::PerAddress => "per_address",
            Refusal::PendingPerAddress => "pending_per_address",
            Refusal::Full => "full",
        }
    }
}

/// The key of the per-address caps: an IPv4 address (IPv4-mapped IPv6 included), or the /64
/// of an IPv6 address (one subscriber's allocation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum AddressKey {
    V4(u32),
    V6Prefix(u64),
}

impl AddressKey {
    pub(crate) fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => AddressKey::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey::V4(v4.into()),
                None => AddressKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// One open connection in the table.
#[derive(Debug)]
struct Conn {
    key: AddressKey,
    pending: bool,
    /// Cancelled when a newer connection takes this one's slot.
    evict: CancellationToken,
}

/// Open connections per address.
#[derive(Debug, Default, Clone, Copy)]
struct PerAddress {
    open: usize,
    pending: usize,
}

#[derive(Debug, Default)]
struct Table {
    conns: HashMap<u64, Conn>,
    by_address: HashMap<AddressKey, PerAddress>,
    /// Ids of pending connections, oldest first.
    pending: BTreeSet<u64>,
    next_id: u64,
}

impl Table {
    /// Removes connection `id` and its counts; `None` if it is no longer in the table
    /// (evicted).
    fn remove(&mut self, id: u64) -> Option<Conn> {
        let conn = self.conns.remove(&id)?;
        if conn.pending {
            self.pending.remove(&id);
        }
        if let Some(per) = self.by_address.get_mut(&conn.key) {
            per.open = per.open.saturating_sub(1);
            if conn.pending {
                per.pending = per.pending.saturating_sub(1);
            }
            if per.open == 0 {
                self.by_address.remove(&conn.key);
            }
        }
        Some(conn)
    }
}

/// The admission control of one listener. Cheap to share (`Arc`).
pub(crate) struct Admission {
    /// Metric label: `mqtt`, `api`, `device`.
    site: &'static str,
    limits: AdmissionLimits,
    table: Mutex<Table>,
    /// Handshake slots (see `gate.rs`).
    cpu: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("site", &self.site)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Admission {
    pub(crate) fn new(
        site: &'static str,
        limits: AdmissionLimits,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let admission = Arc::new(Self {
            site,
            limits,
            table: Mutex::new(Table::default()),
            cpu: Arc::new(Semaphore::new(limits.handshake_cpu_slots.max(1))),
            metrics,
        });
        admission.publish(&admission.lock());
        admission
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a refusal (or a connection closed by a deadline or an eviction).
    pub(crate) fn count(&self, reason: &'static str) {
        self.metrics.admission_refuse(self.site, reason);
    }

    /// Updates the connection gauges from the table.
    fn publish(&self, table: &Table) {
        let pending = table.pending.len();
        let established = table.conns.len().saturating_sub(pending);
        self.metrics
            .admission_connections(self.site, pending, established);
    }

    /// Admits a socket from `peer` as a pending connection, or says why not (counted). May
    /// evict the oldest pending connection to make room.
    pub(crate) fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Ticket, Refusal> {
        let key = AddressKey::of(peer.ip());
        let mut table = self.lock();
        let per = table.by_address.get(&key).copied().unwrap_or_default();
        let refusal = if per.open >= self.limits.max_per_address {
            Some(Refusal::PerAddress)
        } else if per.pending >= self.limits.max_pending_per_address {
            Some(Refusal::PendingPerAddress)
        } else if table.conns.len() >= self.limits.max_connections {
            match table.pending.first().copied() {
                Some(oldest) => {
                    if let Some(evicted) = table.remove(oldest) {
                        evicted.evict.cancel();
                        self.count("evicted");
                    }
                    None
                }
                None => Some(Refusal::Full),
            }
        } else {
            None
        };
        if let Some(refusal) = refusal {
            drop(table);
            self.count(refusal.reason());
            return Err(refusal);
        }
        let id = table.next_id;
        table.next_id += 1;
        let evict = CancellationToken::new();
        table.conns.insert(
            id,
            Conn {
                key,
                pending: true,
                evict: evict.clone(),
            },
        );
        table.pending.insert(id);
        let per = table.by_address.entry(key).or_default();
        per.open += 1;
        per.pending += 1;
        self.publish(&table);
        Ok(Ticket {
            admission: Arc::clone(self),
            id,
            accepted: Instant::now(),
            evicted: evict,
        })
    }

    /// Marks connection `id` established; false if it was evicted meanwhile.
    fn establish(&self, id: u64) -> bool {
        let mut table = self.lock();
        let Some(conn) = table.conns.get_mut(&id) else {
            return false;
        };
        if !conn.pending {
            return true;
        }
        conn.pending = false;
        let key = conn.key;
        table.pending.remove(&id);
        if let Some(per) = table.by_address.get_mut(&key) {
            per.pending = per.pending.saturating_sub(1);
        }
        self.publish(&table);
        true
    }

    fn is_pending(&self, id: u64) -> bool {
        self.lock().conns.get(&id).is_some_and(|conn| conn.pending)
    }

    fn release(&self, id: u64) {
        let mut table = self.lock();
        if table.remove(id).is_some() {
            self.publish(&table);
        }
    }

    /// Open and pending connections of the address of `ip` (tests).
    #[cfg(test)]
    pub(crate) fn address_counts(&self, ip: IpAddr) -> (usize, usize) {
        let table = self.lock();
        let per = table
            .by_address
            .get(&AddressKey::of(ip))
            .copied()
            .unwrap_or_default();
        (per.open, per.pending)
    }
}

/// One admitted connection; gives its slot back when dropped.
#[derive(Debug)]
pub(crate) struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    accepted: Instant,
    evicted: CancellationToken,
}

impl Ticket {
    /// When the socket was admitted (the handshake deadlines count from here).
    pub(crate) fn accepted_at(&self) -> Instant {
        self.accepted
    }

    /// Resolves when a newer connection has taken this (pending) connection's slot: close it.
    pub(crate) async fn evicted(&self) {
        self.evicted.cancelled().await;
    }

    /// A handle that marks this connection established (e.g. from inside a request handler).
    pub(crate) fn establisher(&self) -> Establish {
        Establish {
            admission: Arc::clone(&self.admission),
            id: self.id,
        }
    }

    /// Marks the connection established: no longer pending, never evicted. False if it was
    /// evicted already (close it).
    pub(crate) fn establish(&self) -> bool {
        self.admission.establish(self.id)
    }

    /// True while the connection is pending (admitted, not established, not evicted).
    pub(crate) fn is_pending(&self) -> bool {
        self.admission.is_pending(self.id)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.release(self.id);
    }
}

/// Marks a connection established (see [`Ticket::establish`]); cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Establish {
    admission: Arc<Admission>,
    id: u64,
}

impl Establish {
    pub(crate) fn establish(&self) -> bool {
        self.admission.establish(self.id)
    }
}
