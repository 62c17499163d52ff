//! The audit chain: append and verify, every kind of tampering, truncation through the anchor,
//! reopen, retention and concurrent writers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::*;
use crate::controller::Clock;

const DAY_MS: u64 = 24 * 3600 * 1000;

struct Fixture {
    tmp: tempfile::TempDir,
    now: Arc<AtomicU64>,
}

impl Fixture {
    fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().unwrap(),
            now: Arc::new(AtomicU64::new(1_700_000_000_000)),
        }
    }

    fn config(&self) -> AuditConfig {
        let (dir, anchor) = paths(self.tmp.path());
        AuditConfig {
            cache_capacity: 1 << 20,
            retention: Duration::from_millis(30 * DAY_MS),
            ..AuditConfig::new(dir, anchor)
        }
    }

    fn clock(&self) -> Clock {
        let now = Arc::clone(&self.now);
        Arc::new(move || now.load(Ordering::SeqCst))
    }

    fn open(&self) -> AuditLog {
        AuditLog::open(self.config(), self.clock()).unwrap()
    }
}

fn rec(i: usize) -> AuditRecord {
    AuditRecord {
        actor: if i % 2 == 0 { "alice" } else { "bob" }.into(),
        source: "127.0.0.1".into(),
        action: "command.create".into(),
        target: format!("T-{i}"),
        outcome: Outcome::Success,
        detail: format!("lock #{i}"),
    }
}

fn fill(log: &AuditLog, n: usize) {
    for i in 1..=n {
        log.append(rec(i)).unwrap();
    }
}

fn key(seq: u64) -> Vec<u8> {
    let mut k = vec![b'e'];
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn stored(log: &AuditLog, seq: u64) -> AuditEntry {
    log.get(seq).unwrap().unwrap()
}

fn put(log: &AuditLog, seq: u64, entry: &AuditEntry) {
    log.tree()
        .insert(key(seq), serde_json::to_vec(entry).unwrap())
        .unwrap();
}

fn broken_at(log: &AuditLog, seq: u64) -> String {
    let report = log.verify().unwrap();
    assert!(!report.ok, "{report:?}");
    assert_eq!(report.first_bad_seq, Some(seq), "{report:?}");
    report.reason.unwrap()
}

#[test]
fn appends_form_a_verifiable_chain() {
    let f = Fixture::new();
    let log = f.open();
    let report = log.verify().unwrap();
    assert!(report.ok && report.entries == 0, "{report:?}");
    fill(&log, 5);
    let first = stored(&log, 1);
    assert_eq!(first.prev_hash, "0".repeat(64));
    for seq in 2..=5 {
        assert_eq!(stored(&log, seq).prev_hash, stored(&log, seq - 1).hash);
    }
    let report = log.verify().unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(
        (report.entries, report.first_seq, report.last_seq),
        (5, Some(1), Some(5))
    );
}

#[test]
fn an_edited_field_is_reported_at_its_seq() {
    let f = Fixture::new();
    let log = f.open();
    fill(&log, 6);
    let mut e = stored(&log, 4);
    e.outcome = Outcome::Denied;
    put(&log, 4, &e);
    assert!(broken_at(&log, 4).contains("edited"));
}

#[test]
fn an_edit_with_a_recomputed_hash_breaks_the_next_link() {
    let f = Fixture::new();
    let log = f.open();
    fill(&log, 6);
    let mut e = stored(&log, 3);
    e.actor = "mallory".into();
    let prev = e.prev().unwrap();
    e.hash = hex::encode(e.compute_hash(&prev));
    put(&log, 3, &e);
    assert!(broken_at(&log, 4).contains("prev_hash"));
}

#[test]
fn a_removed_entry_is_reported() {
    let f = Fixture::new();
    let log = f.open();
    fill(&log, 6);
    log.tree().remove(key(3)).unwrap();
    assert!(broken_at(&log, 3).contains("missing"));
}

#[test]
fn reordered_and_inserted_entries_are_reported() {
    let f = Fixture::new();
    let log = f.open();
    fill(&log, 6);
    let (two, five) = (stored(&log, 2), stored(&log, 5));
    put(&log, 2, &five);
    put(&log, 5, &two);
    assert!(broken_at(&log, 2).contains("reordered"));

    // An entry added behind the controller's back, even with correct hashes: the anchor
    // still names the old end.
    let f = Fixture::new();
    let log = f.open();
    fill(&log, 4);
    let four = stored(&log, 4);
    let forged = AuditEntry::new(5, four.at_ms, rec(5), &four.own().unwrap());
    put(&log, 5, &forged);
    assert!(broken_at(&log, 5).contains("continues"));
}

#[test]
fn a_truncated_tail_is_detected_through_the_anchor() {
    let f = Fixture::new();
    let log = f.open();
    fill(&log, 6);
    log.tree().remove(key(6)).unwrap();
    log.tree().remove(key(5)).unwrap();
    let reason = broken_at(&log, 5);
    assert!(reason.contains("anchor"), "{reason}");

    // The anchor file itself must exist and be private.
    use std::os::unix::fs::PermissionsExt;
    let (_, anchor) = paths(f.tmp.path());
    let mode = std::fs::metadata(anchor).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_truncation_found_at_open_is_recorded_in_the_chain() {
    let f = Fixture::new();
    {
        let log = f.open();
        fill(&log, 4);
        log.tree().remove(key(4)).unwrap();
        log.tree().flush().unwrap();
    }
    let log = f.open();
    let newest = log.query(
        &AuditQuery {
            limit: 1,
            ..AuditQuery::default()
        },
        None,
    );
    let newest = &newest.unwrap().entries[0];
    assert_eq!(newest.action, "audit.anchor_mismatch");
    assert_eq!(newest.seq, 4);
    assert!(newest.detail.contains("removed"), "{}", newest.detail);
    // The anchor now names the mismatch entry, but `verify` still reports the cut.
    let reason = broken_at(&log, 4);
    assert!(reason.contains("anchor"), "{reason}");
}

#[test]
fn a_missing_anchor_is_detected() {
    let f = Fixture::new();
    let log = f.open();
    fill(&log, 2);
    std::fs::remove_file(paths(f.tmp.path()).1).unwrap();
    assert!(broken_at(&log, 2).contains("missing"));
}

#[test]
fn reopening_continues_the_chain() {
    let f = Fixture::new();
    {
        let log = f.open();
        fill(&log, 3);
    }
    let log = f.open();
    let e = log.append(rec(4)).unwrap();
    assert_eq!(e.seq, 4);
    assert_eq!(e.prev_hash, stored(&log, 3).hash);
    let report = log.verify().unwrap();
    assert!(report.ok && report.entries == 4, "{report:?}");
}

#[test]
fn time_never_runs_backwards_along_the_chain() {
    let f = Fixture::new();
    let log = f.open();
    log.append(rec(1)).unwrap();
    f.now.fetch_sub(10_000, Ordering::SeqCst);
    let e = log.append(rec(2)).unwrap();
    assert_eq!(e.at_ms, stored(&log, 1).at_ms);
}

#[test]
fn retention_prunes_old_entries_and_the_chain_still_verifies() {
    let f = Fixture::new();
    let log = f.open();
    fill(&log, 5);
    f.now.fetch_add(20 * DAY_MS, Ordering::SeqCst);
    fill(&log, 3);
    let now = f.now.load(Ordering::SeqCst);
    assert_eq!(
        log.prune(now).unwrap(),
        0,
        "nothing is older than 30 days yet"
    );
    f.now.fetch_add(15 * DAY_MS, Ordering::SeqCst);
    let now = f.now.load(Ordering::SeqCst);
    assert_eq!(log.prune(now).unwrap(), 5);
    assert!(log.get(5).unwrap().is_none());
    let report = log.verify().unwrap();
    assert!(report.ok, "{report:?}");
    // Entries 6..=8 plus the audit.prune entry.
    assert_eq!((report.first_seq, report.last_seq), (Some(6), Some(9)));
    assert_eq!(stored(&log, 9).action, "audit.prune");
    // Removing the first kept entry is still detected.
    log.tree().remove(key(6)).unwrap();
    assert_eq!(log.verify().unwrap().first_bad_seq, Some(6));
}

#[test]
fn the_newest_entry_is_never_pruned_and_reopen_after_pruning_works() {
    let f = Fixture::new();
    {
        let log = f.open();
        fill(&log, 3);
        f.now.fetch_add(60 * DAY_MS, Ordering::SeqCst);
        let now = f.now.load(Ordering::SeqCst);
        assert_eq!(log.prune(now).unwrap(), 2);
    }
    let log = f.open();
    let report = log.verify().unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.first_seq, Some(3));
    assert_eq!(log.append(rec(9)).unwrap().seq, 5);
}

#[test]
fn concurrent_appends_stay_one_chain() {
    let f = Fixture::new();
    let log = Arc::new(f.open());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for i in 0..10 {
                    log.append(rec(t * 100 + i)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let report = log.verify().unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.entries, 40);
}

#[test]
fn queries_filter_and_page_newest_first() {
    let f = Fixture::new();
    let log = f.open();
    fill(&log, 10);
    log.append(AuditRecord {
        action: "config.set".into(),
        ..rec(11)
    })
    .unwrap();
    let q = |q: AuditQuery| log.query(&q, None).unwrap();
    let bob = q(AuditQuery {
        actor: Some("bob".into()),
        limit: 100,
        ..AuditQuery::default()
    });
    assert_eq!(bob.entries.len(), 6);
    assert!(bob.entries.iter().all(|e| e.actor == "bob"));
    assert_eq!(bob.entries[0].seq, 11, "newest first");
    let area = q(AuditQuery {
        action: Some("command".into()),
        limit: 100,
        ..AuditQuery::default()
    });
    assert_eq!(area.entries.len(), 10);
    let exact = q(AuditQuery {
        action: Some("config.set".into()),
        target: Some("T-11".into()),
        limit: 100,
        ..AuditQuery::default()
    });
    assert_eq!(exact.entries.len(), 1);
    let none = q(AuditQuery {
        action: Some("comm".into()),
        limit: 100,
        ..AuditQuery::default()
    });
    assert!(none.entries.is_empty(), "an area is a whole word");
    let page = q(AuditQuery {
        limit: 4,
        ..AuditQuery::default()
    });
    assert_eq!(page.entries.len(), 4);
    let cursor: u64 = page.next_cursor.unwrap().parse().unwrap();
    let next = log
        .query(
            &AuditQuery {
                limit: 100,
                ..AuditQuery::default()
            },
            Some(cursor),
        )
        .unwrap();
    assert_eq!(next.entries[0].seq, 7);
    assert_eq!(next.entries.len(), 7);
    assert!(next.next_cursor.is_none());
    assert_eq!(log.after(8, 100).unwrap().len(), 3);
}

/// What an attacker with write access to the data directory does (issue 10 item 11): edit
/// entry `from`, recompute the hash of it and of every later entry, rewrite the anchor file.
fn rebuild(log: &AuditLog, anchor_path: &std::path::Path, from: u64) {
    let last = log.verify().unwrap().last_seq.unwrap();
    let mut prev = super::entry::parse_hash(&stored(log, from).prev_hash).unwrap();
    for seq in from..=last {
        let mut e = stored(log, seq);
        if seq == from {
            e.detail = "nothing to see here".into();
        }
        e.prev_hash = hex::encode(prev);
        prev = e.compute_hash(&prev);
        e.hash = hex::encode(prev);
        put(log, seq, &e);
    }
    log.tree().flush().unwrap();
    let anchor = serde_json::json!({"seq": last, "hash": hex::encode(prev)});
    std::fs::write(anchor_path, anchor.to_string()).unwrap();
}

#[test]
fn a_rebuilt_chain_is_caught_by_an_exported_anchor() {
    let f = Fixture::new();
    let (_, anchor_path) = paths(f.tmp.path());
    let exported = {
        let log = f.open();
        fill(&log, 8);
        // The operator's off-host copy.
        let exported = std::fs::read(&anchor_path).unwrap();
        rebuild(&log, &anchor_path, 3);
        exported
    };
    let log = f.open();
    let _ = exported;
    let report = log.verify().unwrap();
    assert!(
        !report.ok && report.first_bad_seq == Some(3),
        "a chain rebuilt from entry 3 passed verification: {report:?}"
    );
}
