//! Model-based property test: random rounds of accepts and acks for two terminals, with
//! reopens in between, against a `BTreeMap` model of what ADR 0005 says the outbox holds.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use posfleet_proto::DeviceId;
use proptest::prelude::*;

use super::store::Store;
use super::writer::{AckOutcome, Op, Outcome, Writer};
use crate::transaction::fixtures::valid;

/// Small, so that pruning of the idempotency index is exercised.
const WINDOW: u64 = 6;
const DEVICES: [&str; 2] = ["T-a", "T-b"];

#[derive(Debug, Clone)]
enum Step {
    /// Txn id from a pool of 8, content variant 0..2 (same id, other content: a conflict).
    Accept { device: usize, id: u8, variant: u8 },
    /// `through` as a fraction of the last seq; rejected picks as fractions too.
    Ack {
        device: usize,
        through: u8,
        rejected: Vec<u8>,
    },
}

#[derive(Debug, Clone)]
enum Action {
    /// Ops committed as one round.
    Round(Vec<Step>),
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..2usize, 0..8u8, 0..2u8).prop_map(|(device, id, variant)| Step::Accept { device, id, variant }),
        1 => (0..2usize, any::<u8>(), proptest::collection::vec(any::<u8>(), 0..3))
            .prop_map(|(device, through, rejected)| Step::Ack { device, through, rejected }),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        8 => proptest::collection::vec(step(), 1..5).prop_map(Action::Round),
        1 => Just(Action::Reopen),
    ]
}

/// What one terminal's outbox should hold.
#[derive(Debug, Default, Clone)]
struct ModelDevice {
    last_seq: u64,
    /// seq → (txn id, variant)
    entries: BTreeMap<u64, (String, u8)>,
    dead: BTreeMap<u64, (String, u8)>,
    /// txn id → (seq, variant), for the last WINDOW seqs.
    idem: HashMap<String, (u64, u8)>,
    by_seq: BTreeMap<u64, String>,
}

impl ModelDevice {
    fn accept(&mut self, id: &str, variant: u8) -> Outcome {
        if let Some((seq, v)) = self.idem.get(id) {
            return if *v == variant {
                Outcome::Repeat { seq: *seq }
            } else {
                Outcome::Conflict { seq: *seq }
            };
        }
        self.last_seq += 1;
        let seq = self.last_seq;
        self.entries.insert(seq, (id.to_owned(), variant));
        self.idem.insert(id.to_owned(), (seq, variant));
        self.by_seq.insert(seq, id.to_owned());
        if seq > WINDOW {
            if let Some(old) = self.by_seq.remove(&(seq - WINDOW)) {
                self.idem.remove(&old);
            }
        }
        Outcome::Stored { seq }
    }

    fn ack(&mut self, through: u64, rejected: &[u64]) -> Outcome {
        let mut out = AckOutcome::default();
        let mut rejected: Vec<u64> = rejected.to_vec();
        rejected.sort_unstable();
        rejected.dedup();
        let covered: Vec<u64> = self
            .entries
            .keys()
            .copied()
            .filter(|s| *s <= through || rejected.contains(s))
            .collect();
        let mut found = 0;
        for seq in covered {
            let entry = self.entries.remove(&seq).expect("listed above");
            if rejected.contains(&seq) {
                self.dead.insert(seq, entry);
                out.dead_lettered += 1;
                found += 1;
            } else {
                out.removed += 1;
            }
        }
        out.late_rejections = rejected.len() as u64 - found;
        Outcome::Acked(out)
    }
}

fn content(id: &str, variant: u8) -> crate::transaction::ValidTransaction {
    valid(id, 100 + i64::from(variant))
}

fn open(dir: &std::path::Path) -> (Arc<Store>, Writer) {
    let store = Arc::new(Store::open(dir, 1 << 20).unwrap());
    let writer = Writer::new(store.clone(), WINDOW);
    (store, writer)
}

fn check(store: &Store, ids: &[DeviceId], model: &[ModelDevice]) -> Result<(), TestCaseError> {
    for (id, m) in ids.iter().zip(model) {
        let as_model = |entries: Vec<super::StoredEntry>| -> BTreeMap<u64, (String, u8)> {
            entries
                .into_iter()
                .map(|e| {
                    let t = e.transaction().unwrap();
                    prop_assert_eq!(t.seq, e.seq);
                    Ok((
                        e.seq,
                        (t.txn_id, u8::try_from(t.amount_minor - 100).unwrap()),
                    ))
                })
                .collect::<Result<_, TestCaseError>>()
                .unwrap()
        };
        prop_assert_eq!(&as_model(store.entries(id).unwrap()), &m.entries);
        prop_assert_eq!(&as_model(store.dead_letters(id).unwrap()), &m.dead);
        let snap = store.snapshot(id).unwrap();
        prop_assert_eq!(snap.last_seq, m.last_seq);
        prop_assert_eq!(snap.depth, m.entries.len() as u64);
        prop_assert_eq!(snap.dead, m.dead.len() as u64);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_store_behaves_like_the_model(actions in proptest::collection::vec(action(), 1..25)) {
        let tmp = tempfile::tempdir().unwrap();
        let ids: Vec<DeviceId> = DEVICES.iter().map(|d| DeviceId::new(*d).unwrap()).collect();
        let mut model = vec![ModelDevice::default(); DEVICES.len()];
        let (mut store, mut writer) = open(tmp.path());
        for action in actions {
            match action {
                Action::Reopen => {
                    drop(writer);
                    drop(store);
                    (store, writer) = open(tmp.path());
                }
                Action::Round(steps) => {
                    let mut ops = Vec::new();
                    let mut expected = Vec::new();
                    for step in steps {
                        match step {
                            Step::Accept { device, id, variant } => {
                                let txn_id = format!("t{id}");
                                ops.push(Op::Accept {
                                    device: ids[device].clone(),
                                    txn: Box::new(content(&txn_id, variant)),
                                    accepted_at_ms: 1,
                                });
                                expected.push(model[device].accept(&txn_id, variant));
                            }
                            Step::Ack { device, through, rejected } => {
                                // Acks only ever cover what was committed (the inbox's rule).
                                let m = &mut model[device];
                                let scale = |f: u8| m.last_seq * u64::from(f) / 255;
                                let through = scale(through);
                                let rejected: Vec<u64> = rejected
                                    .into_iter()
                                    .map(scale)
                                    .filter(|s| *s > 0)
                                    .collect();
                                ops.push(Op::Ack {
                                    device: ids[device].clone(),
                                    through,
                                    rejected: rejected.clone(),
                                });
                                expected.push(m.ack(through, &rejected));
                            }
                        }
                    }
                    let outcomes = writer.commit(&ops).unwrap();
                    prop_assert_eq!(outcomes, expected);
                }
            }
            check(&store, &ids, &model)?;
        }
    }
}
