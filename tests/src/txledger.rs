//! Exactly-once bookkeeping of transactions: what the payment applications were told
//! ([`AcceptedLedger`]), what the controller stored ([`StoredLedger`], read through the admin
//! API), and the comparison of the two ([`reconcile`]).
//!
//! The contract (ADR 0005): the store holds exactly the transactions that got 201 or 200 from
//! a terminal's local API, each once, under the seq the terminal answered, and every device's
//! seqs are 1..=N without a gap.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use anyhow::{Context, bail};
use posfleet_broker::views::{TransactionPage, TransactionSummary};
use reqwest::StatusCode;

use crate::api::Api;

/// Rows per page when reading the store back (the API's maximum).
const PAGE_LIMIT: usize = 1000;

/// What the terminals answered: per device, seq → txn id (201 and 200 alike).
#[derive(Debug, Clone, Default)]
pub struct AcceptedLedger {
    devices: BTreeMap<String, BTreeMap<u64, String>>,
    /// (device, txn id) → seq, to check that a repeat gets the original seq.
    seqs: HashMap<(String, String), u64>,
    /// Answers that contradict earlier ones (a txn id under two seqs, a seq given to two
    /// txn ids): each is a broken promise of the terminal, reported by [`reconcile`].
    contradictions: Vec<String>,
    /// Answers recorded (201 and 200).
    answers: u64,
}

impl AcceptedLedger {
    /// Records that `device` answered `seq` for `txn_id` (a 201, or a 200 for a repeat).
    pub fn record(&mut self, device: &str, txn_id: &str, seq: u64) {
        self.answers += 1;
        let key = (device.to_owned(), txn_id.to_owned());
        match self.seqs.get(&key) {
            Some(&known) if known != seq => {
                // The first answer stands; the contradiction is reported.
                self.contradictions.push(format!(
                    "{device}: txn {txn_id} answered with seq {seq}, earlier with seq {known}"
                ));
                return;
            }
            Some(_) => return,
            None => {}
        }
        self.seqs.insert(key, seq);
        let seqs = self.devices.entry(device.to_owned()).or_default();
        match seqs.get(&seq) {
            Some(other) if other != txn_id => self.contradictions.push(format!(
                "{device}: seq {seq} answered for txn {txn_id} and for txn {other}"
            )),
            _ => {
                seqs.insert(seq, txn_id.to_owned());
            }
        }
    }

    /// Distinct transactions accepted.
    pub fn len(&self) -> usize {
        self.devices.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Answers recorded, repeats included.
    pub fn answers(&self) -> u64 {
        self.answers
    }

    /// Devices with at least one accepted transaction.
    pub fn devices(&self) -> impl Iterator<Item = &str> {
        self.devices.keys().map(String::as_str)
    }

    /// seq → txn id of one device.
    pub fn device(&self, id: &str) -> Option<&BTreeMap<u64, String>> {
        self.devices.get(id)
    }

    /// Merges another ledger (e.g. one per terminal).
    pub fn merge(&mut self, other: &AcceptedLedger) {
        for (device, seqs) in &other.devices {
            for (seq, txn) in seqs {
                self.record(device, txn, *seq);
            }
        }
        self.contradictions
            .extend(other.contradictions.iter().cloned());
    }
}

/// One stored row as the list returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    pub device: String,
    pub seq: u64,
    pub txn_id: String,
}

/// What the controller's API says it stored.
#[derive(Debug, Clone, Default)]
pub struct StoredLedger {
    /// Every row of `GET /api/v1/transactions` (all pages), in list order.
    pub rows: Vec<StoredRow>,
    /// `GET /api/v1/devices/{id}/transactions/summary` of every device asked for or listed.
    pub summaries: BTreeMap<String, TransactionSummary>,
    /// Pages read.
    pub pages: usize,
}

impl StoredLedger {
    /// Reads every stored transaction (all pages, oldest first) and the summary of every
    /// device in `devices` or in the list.
    pub async fn fetch<'a>(
        api: &Api,
        devices: impl IntoIterator<Item = &'a str>,
    ) -> anyhow::Result<Self> {
        let mut ledger = Self::default();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/api/v1/transactions?order=asc&limit={PAGE_LIMIT}");
            if let Some(c) = &cursor {
                path.push_str("&cursor=");
                path.push_str(&percent_encode(c));
            }
            let page: TransactionPage = get_json(api, &path).await?;
            ledger.pages += 1;
            ledger
                .rows
                .extend(page.transactions.into_iter().map(|t| StoredRow {
                    device: t.device,
                    seq: t.seq,
                    txn_id: t.txn_id,
                }));
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let mut ids: BTreeSet<String> = devices.into_iter().map(str::to_owned).collect();
        ids.extend(ledger.rows.iter().map(|r| r.device.clone()));
        for id in ids {
            let path = format!("/api/v1/devices/{id}/transactions/summary");
            let summary: TransactionSummary = get_json(api, &path).await?;
            ledger.summaries.insert(id, summary);
        }
        Ok(ledger)
    }

    /// Stored transactions according to the summaries.
    pub fn summary_count(&self) -> u64 {
        self.summaries.values().map(|s| s.count).sum()
    }
}

/// The comparison of what was accepted with what was stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciliation {
    /// Distinct transactions the terminals accepted.
    pub accepted: usize,
    /// Rows the list returned.
    pub stored_rows: usize,
    /// Transactions stored according to the summaries.
    pub summary_count: u64,
    /// Accepted and stored under the same (device, seq).
    pub matched: usize,
    /// Accepted, not stored: (device, seq, txn id).
    pub missing: Vec<(String, u64, String)>,
    /// Stored, never accepted (device, seq, txn id).
    pub unexpected: Vec<(String, u64, String)>,
    /// Stored under an accepted (device, seq) but with another txn id: (device, seq,
    /// accepted txn, stored txn).
    pub mismatched: Vec<(String, u64, String, String)>,
    /// The same (device, seq) listed more than once.
    pub duplicate_rows: Vec<(String, u64)>,
    /// The same txn id stored under more than one seq of a device: (device, txn, seqs).
    pub duplicate_txn_ids: Vec<(String, String, Vec<u64>)>,
    /// Devices whose stored seqs are not exactly 1..=N, or whose summary disagrees with the
    /// list (count, last seq, durable-through, gaps, conflicts).
    pub sequence_problems: Vec<String>,
    /// Contradictory answers of the terminals (see [`AcceptedLedger::record`]).
    pub contradictions: Vec<String>,
}

impl Reconciliation {
    /// Every accepted transaction stored once, nothing else, every device gapless.
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.mismatched.is_empty()
            && self.duplicate_rows.is_empty()
            && self.duplicate_txn_ids.is_empty()
            && self.sequence_problems.is_empty()
            && self.contradictions.is_empty()
            && self.matched == self.accepted
            && self.stored_rows == self.accepted
            && self.summary_count == self.accepted as u64
    }

    /// Duplicates of any kind (rows listed twice, txn ids stored twice).
    pub fn duplicates(&self) -> usize {
        self.duplicate_rows.len() + self.duplicate_txn_ids.len()
    }
}

/// Compares the terminals' answers with the store (see [`Reconciliation`]).
pub fn reconcile(accepted: &AcceptedLedger, stored: &StoredLedger) -> Reconciliation {
    let mut out = Reconciliation {
        accepted: accepted.len(),
        stored_rows: stored.rows.len(),
        summary_count: stored.summary_count(),
        contradictions: accepted.contradictions.clone(),
        ..Reconciliation::default()
    };
    // device → seq → txn id, as stored.
    let mut by_device: BTreeMap<&str, BTreeMap<u64, &str>> = BTreeMap::new();
    for row in &stored.rows {
        let seqs = by_device.entry(row.device.as_str()).or_default();
        if seqs.insert(row.seq, row.txn_id.as_str()).is_some() {
            out.duplicate_rows.push((row.device.clone(), row.seq));
        }
    }
    for (device, seqs) in &by_device {
        let mut txns: HashMap<&str, Vec<u64>> = HashMap::new();
        for (seq, txn) in seqs {
            txns.entry(txn).or_default().push(*seq);
        }
        let mut twice: Vec<_> = txns
            .into_iter()
            .filter(|(_, seqs)| seqs.len() > 1)
            .map(|(txn, seqs)| ((*device).to_owned(), txn.to_owned(), seqs))
            .collect();
        twice.sort();
        out.duplicate_txn_ids.extend(twice);
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        let actual: Vec<u64> = seqs.keys().copied().collect();
        if actual != expected {
            out.sequence_problems.push(format!(
                "{device}: stored seqs are not 1..={}: {}",
                seqs.len(),
                describe_gaps(&actual)
            ));
        }
        match stored.summaries.get(*device) {
            None => out.sequence_problems.push(format!("{device}: no summary")),
            Some(s) => {
                let last = actual.last().copied().unwrap_or(0);
                if s.count != seqs.len() as u64
                    || s.last_seq != last
                    || s.durable_through_seq != last
                    || !s.gaps.is_empty()
                    || s.conflicts != 0
                {
                    out.sequence_problems.push(format!(
                        "{device}: summary count {} last_seq {} durable_through_seq {} gaps {:?} \
                         conflicts {}, but the list holds {} rows up to seq {last}",
                        s.count,
                        s.last_seq,
                        s.durable_through_seq,
                        s.gaps,
                        s.conflicts,
                        seqs.len()
                    ));
                }
            }
        }
    }
    for (device, summary) in &stored.summaries {
        if !by_device.contains_key(device.as_str()) && summary.count != 0 {
            out.sequence_problems.push(format!(
                "{device}: summary counts {} transactions, the list none",
                summary.count
            ));
        }
    }
    for (device, seqs) in &accepted.devices {
        let stored_seqs = by_device.get(device.as_str());
        for (seq, txn) in seqs {
            match stored_seqs.and_then(|s| s.get(seq)) {
                None => out.missing.push((device.clone(), *seq, txn.clone())),
                Some(stored_txn) if stored_txn != txn => out.mismatched.push((
                    device.clone(),
                    *seq,
                    txn.clone(),
                    (*stored_txn).to_owned(),
                )),
                Some(_) => out.matched += 1,
            }
        }
    }
    for (device, seqs) in &by_device {
        let accepted_seqs = accepted.devices.get(*device);
        for (seq, txn) in seqs {
            if accepted_seqs.is_none_or(|a| !a.contains_key(seq)) {
                out.unexpected
                    .push(((*device).to_owned(), *seq, (*txn).to_owned()));
            }
        }
    }
    out
}

/// `1..=5, 7, 9..=12` style description of a sorted seq list.
fn describe_gaps(seqs: &[u64]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let start = seqs[i];
        let mut end = start;
        while i + 1 < seqs.len() && seqs[i + 1] == end + 1 {
            i += 1;
            end = seqs[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}..={end}")
        });
        i += 1;
    }
    if parts.len() > 12 {
        let more = parts.len() - 12;
        parts.truncate(12);
        parts.push(format!("... ({more} more ranges)"));
    }
    parts.join(", ")
}

impl fmt::Display for Reconciliation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "accepted {} | stored rows {} (summaries {}) | matched {} | missing {} | unexpected {} | \
             mismatched {} | duplicate rows {} | txn ids stored twice {} | sequence problems {} | \
             contradictory answers {}",
            self.accepted,
            self.stored_rows,
            self.summary_count,
            self.matched,
            self.missing.len(),
            self.unexpected.len(),
            self.mismatched.len(),
            self.duplicate_rows.len(),
            self.duplicate_txn_ids.len(),
            self.sequence_problems.len(),
            self.contradictions.len()
        )?;
        let show = |f: &mut fmt::Formatter<'_>, name: &str, items: Vec<String>| {
            for item in items.iter().take(10) {
                writeln!(f, "  {name}: {item}")?;
            }
            if items.len() > 10 {
                writeln!(f, "  {name}: ... {} more", items.len() - 10)?;
            }
            Ok(())
        };
        show(
            f,
            "missing",
            self.missing.iter().map(|m| format!("{m:?}")).collect(),
        )?;
        show(
            f,
            "unexpected",
            self.unexpected.iter().map(|m| format!("{m:?}")).collect(),
        )?;
        show(
            f,
            "mismatched",
            self.mismatched.iter().map(|m| format!("{m:?}")).collect(),
        )?;
        show(
            f,
            "duplicate row",
            self.duplicate_rows
                .iter()
                .map(|m| format!("{m:?}"))
                .collect(),
        )?;
        show(
            f,
            "txn id stored twice",
            self.duplicate_txn_ids
                .iter()
                .map(|m| format!("{m:?}"))
                .collect(),
        )?;
        show(f, "sequence", self.sequence_problems.clone())?;
        show(f, "contradiction", self.contradictions.clone())
    }
}

async fn get_json<T: serde::de::DeserializeOwned>(api: &Api, path: &str) -> anyhow::Result<T> {
    let response = api.get(path).await?;
    let status = response.status();
    let text = response
        .text()
        .await
        .with_context(|| format!("reading GET {path}"))?;
    if status != StatusCode::OK {
        bail!("GET {path}: {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("GET {path}: unexpected JSON: {text}"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(device: &str, seq: u64, txn: &str) -> StoredRow {
        StoredRow {
            device: device.into(),
            seq,
            txn_id: txn.into(),
        }
    }

    fn summary(device: &str, count: u64) -> TransactionSummary {
        TransactionSummary {
            device: device.into(),
            count,
            approved_amount_minor: BTreeMap::new(),
            last_seq: count,
            durable_through_seq: count,
            gaps: Vec::new(),
            gaps_truncated: false,
            gap_since_ms: None,
            conflicts: 0,
            recent_conflicts: Vec::new(),
            first_received_ms: None,
            last_received_ms: None,
        }
    }

    #[test]
    fn an_exact_store_reconciles() {
        let mut accepted = AcceptedLedger::default();
        accepted.record("T-1", "a", 1);
        accepted.record("T-1", "b", 2);
        accepted.record("T-1", "a", 1); // a repeat, answered 200
        accepted.record("T-2", "c", 1);
        let stored = StoredLedger {
            rows: vec![row("T-1", 1, "a"), row("T-2", 1, "c"), row("T-1", 2, "b")],
            summaries: [
                ("T-1".into(), summary("T-1", 2)),
                ("T-2".into(), summary("T-2", 1)),
            ]
            .into(),
            pages: 1,
        };
        let r = reconcile(&accepted, &stored);
        assert!(r.is_exact(), "{r}");
        assert_eq!((r.accepted, r.matched, accepted.answers()), (3, 3, 4));
    }

    #[test]
    fn every_kind_of_difference_is_reported() {
        let mut accepted = AcceptedLedger::default();
        for (seq, txn) in [(1, "a"), (2, "b"), (3, "c"), (4, "d")] {
            accepted.record("T-1", txn, seq);
        }
        accepted.record("T-1", "a", 9); // a contradiction
        let stored = StoredLedger {
            rows: vec![
                row("T-1", 1, "a"),
                row("T-1", 2, "x"), // mismatched
                row("T-1", 2, "x"), // listed twice
                row("T-1", 4, "d"),
                row("T-1", 5, "d"), // stored twice, and never accepted
            ],
            summaries: [("T-1".into(), summary("T-1", 4))].into(),
            pages: 1,
        };
        let r = reconcile(&accepted, &stored);
        assert!(!r.is_exact());
        assert_eq!(r.missing, vec![("T-1".into(), 3, "c".into())]);
        assert_eq!(r.unexpected, vec![("T-1".into(), 5, "d".into())]);
        assert_eq!(r.mismatched.len(), 1);
        assert_eq!(r.duplicate_rows, vec![("T-1".into(), 2)]);
        assert_eq!(
            r.duplicate_txn_ids,
            vec![("T-1".into(), "d".into(), vec![4, 5])]
        );
        assert_eq!(r.sequence_problems.len(), 2, "{r}"); // the gap at 3, the summary
        assert_eq!(r.contradictions.len(), 1, "{r}");
        assert_eq!(r.duplicates(), 2);
    }

    #[test]
    fn gaps_are_described_as_ranges() {
        assert_eq!(describe_gaps(&[1, 2, 3, 5, 7, 8]), "1..=3, 5, 7..=8");
        assert_eq!(percent_encode("a+b/c="), "a%2Bb%2Fc%3D");
    }
}
