//! Ledger checkpoints (`commit.rs`): when a commit writes a device's stored ledger, and that
//! opening the store catches a stored ledger up to exactly what was in memory.

use std::path::Path;

use super::{id, open, submission};
use crate::txstore::commit::{CHECKPOINT_MS, CHECKPOINT_RECORDS};
use crate::txstore::{Ledger, TxStore, keys};

fn sales(seqs: impl IntoIterator<Item = u64>) -> Vec<posfleet_proto::pb::Transaction> {
    seqs.into_iter()
        .map(|s| crate::txstore::test_sale(s, 100 + i64::try_from(s).unwrap()))
        .collect()
}

/// The ledger as stored under its `l` key (not the one in memory).
fn stored_ledger(store: &TxStore, device: &str) -> Option<Ledger> {
    let value = store.tree.get(keys::ledger(&id(device))).unwrap()?;
    Some(serde_json::from_slice(&value).unwrap())
}

/// Everything a summary says, for comparing before and after a reopen.
fn summary(store: &TxStore, device: &str) -> String {
    format!("{:?}", store.summary(&id(device)).unwrap())
}

fn reopened(dir: &Path, store: std::sync::Arc<TxStore>) -> std::sync::Arc<TxStore> {
    drop(store);
    open(dir)
}

#[test]
fn a_steady_device_leaves_its_stored_ledger_behind_and_open_catches_up() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    store
        .commit(vec![submission("T-1", 1_000, sales([1]))])
        .unwrap();
    // A new device's ledger is written by its first commit.
    assert_eq!(stored_ledger(&store, "T-1").unwrap().last_seq, 1);

    store
        .commit(vec![submission("T-1", 1_010, sales([2, 3]))])
        .unwrap();
    store
        .commit(vec![submission("T-1", 1_020, sales([5, 4]))])
        .unwrap();
    assert_eq!(store.durable_through(&id("T-1")), 5);
    // No gap, nothing forced, not due: the stored copy is left behind.
    assert_eq!(stored_ledger(&store, "T-1").unwrap().last_seq, 1);

    let before = summary(&store, "T-1");
    let store = reopened(tmp.path(), store);
    assert_eq!(summary(&store, "T-1"), before);
    assert_eq!(store.durable_through(&id("T-1")), 5);
    let ledger = store.read().get(&id("T-1")).cloned().unwrap();
    assert_eq!(ledger.count, 5);
    assert_eq!(ledger.first_received_ms, Some(1_000));
    assert_eq!(ledger.last_received_ms, Some(1_020));

    // The caught-up ledger goes on from there: a resend of stored seqs is a duplicate, the
    // next seq is new.
    let outcome = store
        .commit(vec![submission("T-1", 1_030, sales([4, 5, 6]))])
        .unwrap();
    assert_eq!(outcome.duplicates(), 2);
    assert_eq!(outcome.stored(), 1);
    assert_eq!(store.durable_through(&id("T-1")), 6);
}

#[test]
fn a_stored_ledger_is_written_once_it_is_due() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    store
        .commit(vec![submission("T-1", 1_000, sales([1]))])
        .unwrap();
    store
        .commit(vec![submission("T-1", 1_001, sales([2]))])
        .unwrap();
    store
        .commit(vec![submission("T-1", 1_500, sales([3]))])
        .unwrap();
    assert_eq!(stored_ledger(&store, "T-1").unwrap().last_seq, 1);
    // CHECKPOINT_MS after the commit that first left it behind.
    store
        .commit(vec![submission("T-1", 1_001 + CHECKPOINT_MS, sales([4]))])
        .unwrap();
    assert_eq!(stored_ledger(&store, "T-1").unwrap().last_seq, 4);

    // CHECKPOINT_RECORDS behind, however soon.
    let next = 5..5 + CHECKPOINT_RECORDS - 1;
    let last = next.end;
    store
        .commit(vec![submission("T-1", 3_000, sales(next))])
        .unwrap();
    assert_eq!(stored_ledger(&store, "T-1").unwrap().last_seq, 4);
    store
        .commit(vec![submission("T-1", 3_001, sales([last]))])
        .unwrap();
    assert_eq!(stored_ledger(&store, "T-1").unwrap().last_seq, last);
}

#[test]
fn gaps_and_conflicts_are_written_by_the_commit_that_makes_them() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    store
        .commit(vec![submission("T-1", 1_000, sales([1]))])
        .unwrap();
    store
        .commit(vec![submission("T-1", 1_001, sales([2]))])
        .unwrap();
    assert_eq!(stored_ledger(&store, "T-1").unwrap().last_seq, 1);

    // A gap opens (3 missing): written.
    store
        .commit(vec![submission("T-1", 1_002, sales([4]))])
        .unwrap();
    let l = stored_ledger(&store, "T-1").unwrap();
    assert_eq!((l.durable_through_seq, l.last_seq), (2, 4));
    assert!(l.gap_since_ms.is_some());
    // The gap closes: written, although the commit is neither old nor large.
    store
        .commit(vec![submission("T-1", 1_003, sales([3]))])
        .unwrap();
    let l = stored_ledger(&store, "T-1").unwrap();
    assert_eq!((l.durable_through_seq, l.last_seq), (4, 4));
    assert_eq!(l.gap_since_ms, None);

    // A conflict (seq 2 with another content): written.
    store
        .commit(vec![submission("T-1", 1_004, sales([5]))])
        .unwrap();
    let mut other = crate::txstore::test_sale(2, 999_999);
    other.txn_id = "txn-other".into();
    let outcome = store
        .commit(vec![submission("T-1", 1_005, vec![other])])
        .unwrap();
    assert_eq!(outcome.conflicts(), 1);
    let l = stored_ledger(&store, "T-1").unwrap();
    assert_eq!((l.conflicts, l.last_seq), (1, 5));

    let before = summary(&store, "T-1");
    let store = reopened(tmp.path(), store);
    assert_eq!(summary(&store, "T-1"), before);
}

#[test]
fn open_refuses_a_record_whose_key_and_seq_disagree() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    store
        .commit(vec![submission("T-1", 1_000, sales([1]))])
        .unwrap();
    // A record above the stored ledger whose content claims another seq.
    let value = store
        .tree
        .get(keys::record(&id("T-1"), 1))
        .unwrap()
        .unwrap();
    store
        .tree
        .insert(keys::record(&id("T-1"), 2), value)
        .unwrap();
    store.tree.flush().unwrap();
    drop(store);
    let err = TxStore::open(crate::txstore::TxStoreConfig::new(tmp.path())).unwrap_err();
    assert!(
        err.to_string().contains("record key and seq disagree"),
        "{err}"
    );
}
