//! Transaction store tests.
//!
//! - `model.rs`: random commits (duplicates, conflicts, out of order) and reopens against a
//!   `BTreeMap` model.
//! - `store.rs`: ledger checkpoints: when the stored ledger is written, catching up at open.
//! - `bench.rs`: commit throughput by group size (ignored).
//! - `crash.rs`: a child process committing batches is killed with SIGKILL; every
//!   acknowledged (device, seq) must survive reopen.

mod bench;
mod crash;
mod model;
mod store;

use std::path::Path;
use std::sync::Arc;

use posfleet_proto::{DeviceId, pb};

use super::{Submission, TxStore, TxStoreConfig, ValidTx};

pub(crate) fn open(dir: &Path) -> Arc<TxStore> {
    TxStore::open(TxStoreConfig {
        cache_capacity: 1 << 20,
        ..TxStoreConfig::new(dir)
    })
    .unwrap()
}

pub(crate) fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

pub(crate) fn submission(device: &str, at_ms: u64, txs: Vec<pb::Transaction>) -> Submission {
    Submission {
        device: id(device),
        received_at_ms: at_ms,
        records: txs
            .into_iter()
            .map(|t| ValidTx::try_from(t).unwrap())
            .collect(),
    }
}
