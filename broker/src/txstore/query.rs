//! The read side: paginated lists over the time indexes, per-device summaries, and the
//! devices with gaps. Every request is bounded: at most `limit` rows and [`MAX_SCAN`] index
//! entries per page.

use std::ops::Bound;

use posfleet_proto::{DeviceId, pb};

use super::error::{QueryError, TxStoreError};
use super::keys;
use super::record::{self, StoredTx, split_value};
use super::{Ledger, TxStore};
use crate::views::{ConflictView, SeqRange, TransactionPage, TransactionSummary};

/// Rows per page when the query gives no limit.
pub(crate) const DEFAULT_LIMIT: usize = 100;
/// Most rows per page.
pub(crate) const MAX_LIMIT: usize = 1000;
/// Most index entries one page may scan (a selective status filter pages with fewer rows).
pub(crate) const MAX_SCAN: usize = 10_000;
/// Most records scanned above the watermark when listing a device's gaps.
const MAX_GAP_SCAN: usize = 10_000;
/// Most gap ranges listed in a summary.
const MAX_GAPS: usize = 100;
/// Most conflicts listed in a summary.
const MAX_RECENT_CONFLICTS: usize = 20;

/// Parses an index key into (device, seq).
type ParseKey = fn(&[u8]) -> Option<(DeviceId, u64)>;

/// Listing order (by transaction time, then device, then seq).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Order {
    Asc,
    /// Newest first.
    #[default]
    Desc,
}

/// A transaction list query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TxQuery {
    pub device: Option<DeviceId>,
    /// Transactions at or after this time (Unix ms, terminal clock).
    pub from_ms: Option<u64>,
    /// Transactions before this time (exclusive).
    pub to_ms: Option<u64>,
    pub status: Option<pb::TransactionStatus>,
    /// Rows per page (clamped to 1..=MAX_LIMIT).
    pub limit: usize,
    pub order: Order,
}

impl Default for TxQuery {
    fn default() -> Self {
        Self {
            device: None,
            from_ms: None,
            to_ms: None,
            status: None,
            limit: DEFAULT_LIMIT,
            order: Order::Desc,
        }
    }
}

/// A device that has had records waiting above a missing seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gap {
    pub device: DeviceId,
    /// The lowest missing seq.
    pub first_missing: u64,
    /// Highest seq stored.
    pub last_seq: u64,
    /// Since when, Unix ms (controller clock).
    pub since_ms: u64,
}

/// How a device's transactions in a time window ended (the rollout health gate).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Outcomes {
    pub approved: u64,
    pub declined: u64,
    /// Status `error` (the terminal or acquirer failed).
    pub errors: u64,
    /// True if the scan stopped at its bound (the counts cover the most recent records).
    pub truncated: bool,
}

impl Outcomes {
    /// Every transaction counted.
    pub(crate) fn total(&self) -> u64 {
        self.approved + self.declined + self.errors
    }
}

impl TxStore {
    /// Counts the outcomes of `device`'s transactions stamped at or after `from_ms` (terminal
    /// clock, the device time index), newest first, reading at most `max_scan` records.
    pub(crate) fn outcomes_since(
        &self,
        device: &DeviceId,
        from_ms: u64,
        max_scan: usize,
    ) -> Result<Outcomes, TxStoreError> {
        let prefix = keys::device_prefix(keys::BY_DEVICE_TIME, device);
        let mut lower = prefix.clone();
        lower.extend_from_slice(&from_ms.to_be_bytes());
        let upper = keys::prefix_end(&prefix).map_or(Bound::Unbounded, Bound::Excluded);
        let mut out = Outcomes::default();
        let range = self
            .tree
            .range::<Vec<u8>, _>((Bound::Included(lower), upper));
        for (scanned, item) in range.rev().enumerate() {
            if scanned == max_scan {
                out.truncated = true;
                break;
            }
            let (key, _) = item.map_err(|e| self.read_error(e))?;
            let (device, seq) = keys::parse_by_device_time(&key)
                .ok_or_else(|| self.corrupt(&key, "bad index key"))?;
            let record_key = keys::record(&device, seq);
            let value = self
                .tree
                .get(&record_key)
                .map_err(|e| self.read_error(e))?
                .ok_or_else(|| self.corrupt(&key, "index entry without its record"))?;
            let stored = StoredTx::decode(&value).map_err(|e| self.corrupt(&record_key, e))?;
            match pb::TransactionStatus::try_from(stored.tx.get().status) {
                Ok(pb::TransactionStatus::Approved) => out.approved += 1,
                Ok(pb::TransactionStatus::Declined) => out.declined += 1,
                _ => out.errors += 1,
            }
        }
        Ok(out)
    }

    /// One page of transactions matching `query`, after `cursor` (from a previous page of the
    /// same query).
    pub(crate) fn list(
        &self,
        query: &TxQuery,
        cursor: Option<&str>,
    ) -> Result<TransactionPage, QueryError> {
        let limit = query.limit.clamp(1, MAX_LIMIT);
        let (ns_prefix, parse): (Vec<u8>, ParseKey) = match &query.device {
            Some(d) => (
                keys::device_prefix(keys::BY_DEVICE_TIME, d),
                keys::parse_by_device_time,
            ),
            None => (vec![keys::BY_TIME], keys::parse_by_time),
        };
        let with_time = |ms: u64| {
            let mut k = ns_prefix.clone();
            k.extend_from_slice(&ms.to_be_bytes());
            k
        };
        let mut lower = Bound::Included(query.from_ms.map_or_else(|| ns_prefix.clone(), with_time));
        let mut upper = match query.to_ms {
            Some(to) => Bound::Excluded(with_time(to)),
            None => keys::prefix_end(&ns_prefix).map_or(Bound::Unbounded, Bound::Excluded),
        };
        if let Some(cursor) = cursor {
            let position = self.cursor_key.decode(query, cursor)?;
            match query.order {
                Order::Asc => lower = Bound::Excluded(position),
                Order::Desc => upper = Bound::Excluded(position),
            }
        }
        if empty_range(&lower, &upper) {
            return Ok(TransactionPage {
                transactions: Vec::new(),
                next_cursor: None,
            });
        }
        let range = self.tree.range::<Vec<u8>, _>((lower, upper));
        let mut entries: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
            match query.order {
                Order::Asc => Box::new(range),
                Order::Desc => Box::new(range.rev()),
            };
        let mut rows = Vec::new();
        let mut last_key = None;
        let mut more = false;
        for (scanned, item) in entries.by_ref().enumerate() {
            if rows.len() == limit || scanned == MAX_SCAN {
                more = true;
                break;
            }
            let (key, _) = item.map_err(|e| self.read_error(e))?;
            let (device, seq) = parse(&key).ok_or_else(|| self.corrupt(&key, "bad index key"))?;
            let record_key = keys::record(&device, seq);
            let value = self
                .tree
                .get(&record_key)
                .map_err(|e| self.read_error(e))?
                .ok_or_else(|| self.corrupt(&key, "index entry without its record"))?;
            let stored = StoredTx::decode(&value).map_err(|e| self.corrupt(&record_key, e))?;
            let wanted = query
                .status
                .is_none_or(|s| stored.tx.get().status == s as i32);
            if wanted {
                rows.push(record::view(&device, &stored.tx, stored.received_at_ms));
            }
            last_key = Some(key);
        }
        let next_cursor = match (more, last_key) {
            (true, Some(key)) => Some(self.cursor_key.encode(query, &key)),
            _ => None,
        };
        Ok(TransactionPage {
            transactions: rows,
            next_cursor,
        })
    }

    /// The summary of one device (`None` if it has stored nothing and had no conflict).
    pub(crate) fn summary(
        &self,
        device: &DeviceId,
    ) -> Result<Option<TransactionSummary>, TxStoreError> {
        let Some(ledger) = self.read().get(device).cloned() else {
            return Ok(None);
        };
        let (gaps, gaps_truncated) = self.gap_ranges(device, &ledger)?;
        let recent_conflicts = if ledger.conflicts > 0 {
            self.recent_conflicts(device)?
        } else {
            Vec::new()
        };
        Ok(Some(TransactionSummary {
            device: device.to_string(),
            count: ledger.count,
            approved_amount_minor: ledger.approved_amount_minor,
            last_seq: ledger.last_seq,
            durable_through_seq: ledger.durable_through_seq,
            gaps,
            gaps_truncated,
            gap_since_ms: ledger.gap_since_ms,
            conflicts: ledger.conflicts,
            recent_conflicts,
            first_received_ms: ledger.first_received_ms,
            last_received_ms: ledger.last_received_ms,
        }))
    }

    /// The watermark acknowledged for `device` (0 if nothing is stored).
    pub(crate) fn durable_through(&self, device: &DeviceId) -> u64 {
        self.read().get(device).map_or(0, |l| l.durable_through_seq)
    }

    /// Every device with records above a missing seq, by device id.
    pub(crate) fn gaps(&self) -> Vec<Gap> {
        self.read()
            .iter()
            .filter_map(|(device, l)| {
                l.gap_since_ms.filter(|_| l.has_gap()).map(|since_ms| Gap {
                    device: device.clone(),
                    first_missing: l.durable_through_seq + 1,
                    last_seq: l.last_seq,
                    since_ms,
                })
            })
            .collect()
    }

    /// Missing ranges between the watermark and the last seq (bounded scan).
    fn gap_ranges(
        &self,
        device: &DeviceId,
        ledger: &Ledger,
    ) -> Result<(Vec<SeqRange>, bool), TxStoreError> {
        if !ledger.has_gap() {
            return Ok((Vec::new(), false));
        }
        let prefix_len = keys::device_prefix(keys::RECORD, device).len();
        let start = keys::record(device, ledger.durable_through_seq + 1);
        let end = keys::record(device, ledger.last_seq);
        let mut gaps = Vec::new();
        let mut expected = ledger.durable_through_seq + 1;
        for (scanned, item) in self.tree.range(start..=end).enumerate() {
            if scanned == MAX_GAP_SCAN || gaps.len() == MAX_GAPS {
                return Ok((gaps, true));
            }
            let (key, _) = item.map_err(|e| self.read_error(e))?;
            let seq = keys::record_seq(&key, prefix_len)
                .ok_or_else(|| self.corrupt(&key, "bad record key"))?;
            if seq > expected {
                gaps.push(SeqRange {
                    first: expected,
                    last: seq - 1,
                });
            }
            expected = seq + 1;
        }
        Ok((gaps, false))
    }

    /// The most recent conflicts of a device (by seq; bounded).
    fn recent_conflicts(&self, device: &DeviceId) -> Result<Vec<ConflictView>, TxStoreError> {
        let prefix = keys::device_prefix(keys::CONFLICT, device);
        let mut out = Vec::new();
        for item in self
            .tree
            .scan_prefix(&prefix)
            .rev()
            .take(MAX_RECENT_CONFLICTS)
        {
            let (key, value) = item.map_err(|e| self.read_error(e))?;
            let seq = keys::record_seq(&key[..key.len().saturating_sub(4)], prefix.len())
                .ok_or_else(|| self.corrupt(&key, "bad conflict key"))?;
            let (received_at_ms, _) = split_value(&value).map_err(|e| self.corrupt(&key, e))?;
            let stored = StoredTx::decode(&value).map_err(|e| self.corrupt(&key, e))?;
            out.push(ConflictView {
                seq,
                txn_id: stored.tx.get().txn_id.clone(),
                received_at_ms,
            });
        }
        out.reverse();
        Ok(out)
    }
}

fn empty_range(lower: &Bound<Vec<u8>>, upper: &Bound<Vec<u8>>) -> bool {
    match (lower, upper) {
        (Bound::Included(l) | Bound::Excluded(l), Bound::Excluded(u)) => l >= u,
        (Bound::Excluded(l), Bound::Included(u)) => l >= u,
        (Bound::Included(l), Bound::Included(u)) => l > u,
        _ => false,
    }
}
