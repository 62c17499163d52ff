//! Model-based property test: the store against a `BTreeMap` model under random commits
//! (duplicates, conflicts, out-of-order seqs) and reopens.

use std::collections::{BTreeMap, BTreeSet};

use posfleet_proto::pb;
use proptest::prelude::*;

use super::{id, open, submission};
use crate::txstore::{Order, TxQuery};
use crate::views::SeqRange;

const DEVICES: [&str; 3] = ["T-1", "T-1-2", "T-9"];

/// A record's content: variant 0 is what the terminal "really" sent; others conflict with it.
fn tx(seq: u64, variant: u8) -> pb::Transaction {
    let mut t =
        crate::txstore::test_sale(seq, i64::try_from(seq).unwrap() * 100 + i64::from(variant));
    // Times out of seq order, so the time index order differs from seq order.
    t.timestamp_ms = 1_700_000_000_000 + (seq * 7919 % 13) * 1000 + seq;
    if seq % 3 == 0 {
        t.status = pb::TransactionStatus::Declined as i32;
    }
    if seq % 4 == 0 {
        t.currency = "USD".into();
    }
    t
}

#[derive(Debug, Clone)]
enum Op {
    /// One commit of several batches: (device index, [(seq, variant)]).
    Commit(Vec<(usize, Vec<(u64, u8)>)>),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let record = (
        1u64..=16,
        prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
    );
    let batch = (0..DEVICES.len(), prop::collection::vec(record, 0..6));
    prop_oneof![
        9 => prop::collection::vec(batch, 1..4).prop_map(Op::Commit),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Default)]
struct Model {
    /// (device, seq) → variant stored.
    stored: BTreeMap<(usize, u64), u8>,
    /// (device, seq) → conflicting variants recorded.
    conflicts: BTreeMap<(usize, u64), BTreeSet<u8>>,
}

impl Model {
    fn watermark(&self, d: usize) -> u64 {
        let mut n = 0;
        while self.stored.contains_key(&(d, n + 1)) {
            n += 1;
        }
        n
    }

    fn last_seq(&self, d: usize) -> u64 {
        self.stored
            .keys()
            .filter(|(x, _)| *x == d)
            .map(|(_, s)| *s)
            .max()
            .unwrap_or(0)
    }

    fn gaps(&self, d: usize) -> Vec<SeqRange> {
        let mut gaps = Vec::new();
        let mut expected = self.watermark(d) + 1;
        for (_, s) in self.stored.keys().filter(|(x, _)| *x == d) {
            if *s < expected {
                continue;
            }
            if *s > expected {
                gaps.push(SeqRange {
                    first: expected,
                    last: s - 1,
                });
            }
            expected = s + 1;
        }
        gaps
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_store_matches_the_model(ops in prop::collection::vec(op(), 1..24)) {
        let tmp = tempfile::tempdir().unwrap();
        let mut store = open(tmp.path());
        let mut model = Model::default();
        let mut clock = 1_000u64;
        for op in ops {
            match op {
                Op::Reopen => {
                    drop(store);
                    store = open(tmp.path());
                }
                Op::Commit(batches) => {
                    clock += 1;
                    // Expected per device: rejected seqs, stored count, duplicates.
                    let mut expect: BTreeMap<usize, (BTreeSet<u64>, usize, u64)> = BTreeMap::new();
                    let mut subs = Vec::new();
                    for (d, records) in &batches {
                        let e = expect.entry(*d).or_default();
                        for (seq, variant) in records {
                            match model.stored.get(&(*d, *seq)) {
                                None => {
                                    model.stored.insert((*d, *seq), *variant);
                                    e.1 += 1;
                                }
                                Some(v) if v == variant => e.2 += 1,
                                Some(_) => {
                                    e.0.insert(*seq);
                                    model.conflicts.entry((*d, *seq)).or_default().insert(*variant);
                                }
                            }
                        }
                        subs.push(submission(
                            DEVICES[*d],
                            clock,
                            records.iter().map(|(s, v)| tx(*s, *v)).collect(),
                        ));
                    }
                    let outcome = store.commit(subs).unwrap();
                    prop_assert_eq!(outcome.devices.len(), expect.len());
                    for out in &outcome.devices {
                        let d = DEVICES.iter().position(|x| *x == out.device.as_str()).unwrap();
                        let (rejected, stored, dups) = &expect[&d];
                        prop_assert_eq!(out.durable_through_seq, model.watermark(d));
                        prop_assert_eq!(&out.rejected_seqs, &rejected.iter().copied().collect::<Vec<_>>());
                        prop_assert_eq!(out.stored.len(), *stored);
                        prop_assert_eq!(out.duplicates, *dups);
                    }
                }
            }
            // Summaries and lists agree with the model after every step.
            for (d, name) in DEVICES.iter().enumerate() {
                let device = id(name);
                let count = model.stored.keys().filter(|(x, _)| *x == d).count() as u64;
                let summary = store.summary(&device).unwrap();
                if count == 0 {
                    prop_assert!(summary.is_none());
                    continue;
                }
                let summary = summary.unwrap();
                prop_assert_eq!(summary.count, count);
                prop_assert_eq!(summary.durable_through_seq, model.watermark(d));
                prop_assert_eq!(store.durable_through(&device), model.watermark(d));
                prop_assert_eq!(summary.last_seq, model.last_seq(d));
                prop_assert_eq!(&summary.gaps, &model.gaps(d));
                prop_assert_eq!(summary.gap_since_ms.is_some(), !model.gaps(d).is_empty());
                let conflicts: usize = model.conflicts.iter().filter(|((x, _), _)| *x == d).map(|(_, v)| v.len()).sum();
                prop_assert_eq!(summary.conflicts, conflicts as u64);
                let mut approved: BTreeMap<String, i64> = BTreeMap::new();
                for ((_, seq), variant) in model.stored.iter().filter(|((x, _), _)| *x == d) {
                    let t = tx(*seq, *variant);
                    if t.status == pb::TransactionStatus::Approved as i32 {
                        *approved.entry(t.currency).or_default() += t.amount_minor;
                    }
                }
                prop_assert_eq!(&summary.approved_amount_minor, &approved);

                // Paging through the device's list (small pages, ascending) yields exactly
                // the stored records, in (time, seq) order, with the stored content.
                let query = TxQuery { device: Some(device.clone()), limit: 3, order: Order::Asc, ..TxQuery::default() };
                let mut listed = Vec::new();
                let mut cursor = None;
                loop {
                    let page = store.list(&query, cursor.as_deref()).unwrap();
                    listed.extend(page.transactions);
                    match page.next_cursor {
                        Some(c) => cursor = Some(c),
                        None => break,
                    }
                }
                let mut expected: Vec<(u64, u64, i64)> = model.stored.iter()
                    .filter(|((x, _), _)| *x == d)
                    .map(|((_, seq), v)| { let t = tx(*seq, *v); (t.timestamp_ms, *seq, t.amount_minor) })
                    .collect();
                expected.sort_unstable();
                let got: Vec<(u64, u64, i64)> = listed.iter().map(|t| (t.timestamp_ms, t.seq, t.amount_minor)).collect();
                prop_assert_eq!(got, expected);
                prop_assert!(listed.iter().all(|t| t.device == *name));
            }
        }
    }
}
