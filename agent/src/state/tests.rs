use super::*;

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn entry(status: JournalStatus, not_after_ms: u64) -> JournalEntry {
    JournalEntry {
        status,
        not_after_ms,
        command: vec![1, 2, 3],
        result: vec![9, 9],
    }
}

#[test]
fn records_survive_a_reopen_and_terminals_are_separate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    {
        let store = StateStore::open(&dir, DEFAULT_STATE_CACHE_CAPACITY).unwrap();
        let a = store.device(&id("a"));
        let mut doc = ConfigDocument::new();
        doc.insert("x.y".into(), serde_json::json!(1));
        a.apply(
            Changes::durable()
                .journal("c-1", entry(JournalStatus::InProgress, 10))
                .journal("c-2", entry(JournalStatus::Final, 10))
                .lock(LockRecord {
                    locked: true,
                    reason: "stolen".into(),
                    generation: 3,
                    by_lease: false,
                })
                .config(AppliedConfig {
                    version: 7,
                    document: doc,
                    ..AppliedConfig::default()
                })
                .contact(42),
        )
        .unwrap();
    }
    let store = StateStore::open(&dir, DEFAULT_STATE_CACHE_CAPACITY).unwrap();
    let snap = store.device(&id("a")).load().unwrap();
    assert_eq!((snap.lock.generation, snap.lock.locked), (3, true));
    assert_eq!(snap.config.version, 7);
    assert_eq!(snap.last_contact_ms, Some(42));
    assert_eq!(snap.in_progress.len(), 1);
    assert_eq!(snap.in_progress[0].0, "c-1");
    assert_eq!(snap.in_progress[0].1, entry(JournalStatus::InProgress, 10));
    assert_eq!(store.device(&id("b")).load().unwrap(), Snapshot::default());
}

#[test]
fn pruning_removes_only_expired_final_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::open(tmp.path(), DEFAULT_STATE_CACHE_CAPACITY).unwrap();
    let a = store.device(&id("a"));
    a.apply(
        Changes::durable()
            .journal("old", entry(JournalStatus::Final, 10))
            .journal("young", entry(JournalStatus::Final, 100))
            .journal("busy", entry(JournalStatus::InProgress, 10)),
    )
    .unwrap();
    assert_eq!(a.prune_journal(50).unwrap(), 1);
    assert!(a.journal_entry("old").unwrap().is_none());
    assert!(a.journal_entry("young").unwrap().is_some());
    assert!(a.journal_entry("busy").unwrap().is_some());
}

#[test]
fn clear_keeps_one_entry_and_other_terminals() {
    let tmp = tempfile::tempdir().unwrap();
    let store = StateStore::open(tmp.path(), DEFAULT_STATE_CACHE_CAPACITY).unwrap();
    let (a, b) = (store.device(&id("a")), store.device(&id("ab")));
    for d in [&a, &b] {
        d.apply(
            Changes::durable()
                .journal("w", entry(JournalStatus::InProgress, 10))
                .journal("other", entry(JournalStatus::Final, 10))
                .contact(5),
        )
        .unwrap();
    }
    a.apply(
        Changes::durable()
            .clear_except("w")
            .journal("w", entry(JournalStatus::Final, 10))
            .lock(LockRecord {
                locked: true,
                reason: "wiped".into(),
                ..LockRecord::default()
            }),
    )
    .unwrap();
    assert_eq!(a.journal_len().unwrap(), 1);
    let snap = a.load().unwrap();
    assert_eq!(snap.last_contact_ms, None);
    assert_eq!(snap.lock.reason, "wiped");
    assert_eq!(
        b.journal_len().unwrap(),
        2,
        "another terminal keeps its state"
    );
}

#[test]
fn a_damaged_record_is_an_error_not_a_panic() {
    assert!(JournalEntry::decode(&[1, 2, 3]).is_err());
    assert!(JournalEntry::decode(&[]).is_err());
    let mut long = entry(JournalStatus::Final, 1).encode();
    long[13] = 200; // command length beyond the value
    assert!(JournalEntry::decode(&long).is_err());
    assert!(LockRecord::decode(b"{").is_err());
}
