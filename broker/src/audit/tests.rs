//! The audit chain: append and verify, every kind of tampering, truncation through the anchor,
//! reopen, retention and concurrent writers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::*;
use crate::controller::Clock;
use crate::views::AuditAnchor;

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
    // As stored, hashes and checkpoints hold no card-like digit runs (the API shows hex).
    let raw = log.tree().get(key(1)).unwrap().unwrap();
    let raw: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    for field in ["prev_hash", "hash", "mac"] {
        let text = raw[field].as_str().unwrap();
        assert!(
            posfleet_proto::pan::longest_digit_run(text) < 13,
            "{field}: {text}"
        );
    }
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
    // The keyed checkpoint names the edited entry itself (before audit keys, the next link
    // showed it, at 4).
    assert!(broken_at(&log, 3).contains("keyed checkpoint"));
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

    // An entry added behind the controller's back, even with correct hashes, has no keyed
    // checkpoint (and the anchor still names the old end).
    let f = Fixture::new();
    let log = f.open();
    fill(&log, 4);
    let four = stored(&log, 4);
    let forged = AuditEntry::new(5, four.at_ms, rec(5), &four.own().unwrap());
    put(&log, 5, &forged);
    assert!(broken_at(&log, 5).contains("no keyed checkpoint"));
    // Given the checkpoint of another entry, it still does not verify.
    let forged = AuditEntry {
        mac: four.mac.clone(),
        ..forged
    };
    put(&log, 5, &forged);
    assert!(broken_at(&log, 5).contains("does not verify"));
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
/// With `key` (read from the data directory), also recompute every keyed checkpoint.
fn rebuild(
    log: &AuditLog,
    anchor_path: &std::path::Path,
    from: u64,
    key: Option<(&AuditKey, &str)>,
) {
    use super::keyed::MacDomain;
    let newest = AuditQuery {
        limit: 1,
        ..AuditQuery::default()
    };
    let last = log.query(&newest, None).unwrap().entries[0].seq;
    let mut prev = super::entry::parse_hash(&stored(log, from).prev_hash).unwrap();
    for seq in from..=last {
        let mut e = stored(log, seq);
        if seq == from {
            e.detail = "nothing to see here".into();
        }
        e.prev_hash = hex::encode(prev);
        prev = e.compute_hash(&prev);
        e.hash = hex::encode(prev);
        if let Some((key, installation)) = key {
            e.mac = key.mac(MacDomain::Entry, installation, seq, &prev);
        }
        put(log, seq, &e);
    }
    log.tree().flush().unwrap();
    let mut anchor = serde_json::json!({"seq": last, "hash": hex::encode(prev)});
    if let Some((key, installation)) = key {
        anchor["mac"] = key.mac(MacDomain::Head, installation, last, &prev).into();
    }
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
        let exported = log.export_anchor(1);
        rebuild(&log, &anchor_path, 3, None);
        exported
    };
    let log = f.open();
    // Without the audit key the rebuilt entries carry checkpoints that do not verify.
    let plain = log.verify().unwrap();
    assert!(!plain.ok && plain.first_bad_seq == Some(3), "{plain:?}");
    assert!(plain.reason.unwrap().contains("keyed checkpoint"));
    let report = log.verify_anchored(&exported).unwrap().unwrap();
    assert!(
        !report.ok && report.first_bad_seq == Some(3),
        "a chain rebuilt from entry 3 passed verification: {report:?}"
    );
    assert_eq!(report.anchor_seq, Some(8));
}

#[test]
fn a_rebuild_by_someone_holding_the_audit_key_is_caught_by_the_anchor() {
    let f = Fixture::new();
    let (_, anchor_path) = paths(f.tmp.path());
    let exported = {
        let log = f.open();
        fill(&log, 8);
        let exported = log.export_anchor(1);
        fill(&log, 2);
        // The key lives in the data directory here: the attacker re-keys every checkpoint.
        let (key, _) = AuditKey::load_or_create(&f.config().key).unwrap();
        rebuild(&log, &anchor_path, 3, Some((&key, &exported.installation)));
        exported
    };
    let log = f.open();
    let plain = log.verify().unwrap();
    assert!(
        plain.ok,
        "the key holder's rebuild is self-consistent: {plain:?}"
    );
    let report = log.verify_anchored(&exported).unwrap().unwrap();
    assert!(!report.ok, "{report:?}");
    assert_eq!(report.first_bad_seq, Some(8), "{report:?}");
    assert!(report.reason.unwrap().contains("rebuilt at or before"));
}

#[test]
fn an_intact_chain_matches_its_anchors_and_a_cut_tail_does_not() {
    let f = Fixture::new();
    let log = f.open();
    fill(&log, 5);
    let anchor = log.export_anchor(1);
    fill(&log, 3);
    let report = log.verify_anchored(&anchor).unwrap().unwrap();
    assert!(report.ok && report.entries == 8, "{report:?}");
    let later = log.export_anchor(2);
    log.tree().remove(key(8)).unwrap();
    log.tree().remove(key(7)).unwrap();
    let report = log.verify_anchored(&later).unwrap().unwrap();
    assert_eq!(report.first_bad_seq, Some(7), "{report:?}");
    assert!(report.reason.unwrap().contains("removed"));
}

#[test]
fn anchors_altered_from_another_installation_or_key_are_refused() {
    let f = Fixture::new();
    let anchor = {
        let log = f.open();
        fill(&log, 3);
        let anchor = log.export_anchor(1);
        // Altered: the signature no longer verifies.
        for altered in [
            AuditAnchor {
                seq: 2,
                ..anchor.clone()
            },
            AuditAnchor {
                hash: "0".repeat(64),
                ..anchor.clone()
            },
            AuditAnchor {
                keyed_from: 9,
                ..anchor.clone()
            },
            AuditAnchor {
                installation: "someone-else".into(),
                ..anchor.clone()
            },
        ] {
            let err = log.verify_anchored(&altered).unwrap().unwrap_err();
            assert_eq!(err.field, "signature", "{err}");
        }
        let err = log
            .verify_anchored(&AuditAnchor {
                format: "x".into(),
                ..anchor.clone()
            })
            .unwrap()
            .unwrap_err();
        assert_eq!(err.field, "format");
        let err = log
            .verify_anchored(&AuditAnchor {
                public_key_pem: "junk".into(),
                ..anchor.clone()
            })
            .unwrap()
            .unwrap_err();
        assert_eq!(err.field, "public_key_pem");

        // Another installation's anchor, genuinely signed by its own key.
        let other = Fixture::new();
        let other_log = other.open();
        fill(&other_log, 3);
        let foreign = other_log.export_anchor(1);
        let err = log.verify_anchored(&foreign).unwrap().unwrap_err();
        assert_eq!(err.field, "installation", "{err}");
        assert!(err.message.contains("another installation"), "{err}");
        anchor
    };
    // The audit key replaced (same installation): old anchors name the old key.
    std::fs::remove_file(f.config().key).unwrap();
    let log = f.open();
    let err = log.verify_anchored(&anchor).unwrap().unwrap_err();
    assert_eq!(err.field, "key_id", "{err}");
    let newest = log
        .query(
            &AuditQuery {
                limit: 1,
                ..AuditQuery::default()
            },
            None,
        )
        .unwrap()
        .entries
        .remove(0);
    assert_eq!(newest.action, "audit.key_changed");
    // The log itself still verifies: entries before the change are chained, not keyed.
    let report = log.verify().unwrap();
    assert!(report.ok, "{report:?}");
}

#[test]
fn the_audit_key_is_0600_stable_kept_where_configured_and_never_in_the_log() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new();
    let elsewhere = tempfile::tempdir().unwrap();
    let key_path = elsewhere.path().join("keys/audit.key");
    let cfg = AuditConfig {
        key: key_path.clone(),
        ..f.config()
    };
    let first = {
        let log = AuditLog::open(cfg.clone(), f.clock()).unwrap();
        fill(&log, 2);
        log.key_id().to_owned()
    };
    assert!(
        !f.tmp.path().join("audit.key").exists(),
        "the key went to the data dir"
    );
    assert_eq!(
        std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let log = AuditLog::open(cfg, f.clock()).unwrap();
    assert_eq!(log.key_id(), first);
    assert!(log.verify().unwrap().ok);
    let pem = std::fs::read_to_string(&key_path).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    for e in log.after(0, 100).unwrap() {
        let json = serde_json::to_string(&e).unwrap();
        assert!(
            !json.contains("PRIVATE KEY") && !json.contains(&body),
            "{json}"
        );
    }
}

#[test]
fn a_rewritten_anchor_file_or_removed_metadata_is_caught_without_an_export() {
    let f = Fixture::new();
    let (_, anchor_path) = paths(f.tmp.path());
    {
        let log = f.open();
        fill(&log, 6);
        // Cut the tail and point the anchor file at the new end, without the key.
        let e4 = stored(&log, 4);
        log.tree().remove(key(6)).unwrap();
        log.tree().remove(key(5)).unwrap();
        std::fs::write(
            &anchor_path,
            serde_json::json!({"seq": 4, "hash": e4.hash}).to_string(),
        )
        .unwrap();
        let reason = broken_at(&log, 4);
        assert!(reason.contains("not signed by the audit key"), "{reason}");
    }
    // Removing the metadata (to pass the entries off as older than keyed checkpoints) is
    // recorded at the next start and reported from then on.
    {
        let log = f.open();
        log.tree().remove(b"m").unwrap();
        log.tree().flush().unwrap();
    }
    let log = f.open();
    let report = log.verify().unwrap();
    assert!(!report.ok, "{report:?}");
    assert!(
        report.reason.as_deref().unwrap_or("").contains("metadata"),
        "{report:?}"
    );
}
