//! The custody ledger (device issue register, issue 6 item 8): every handover of a terminal
//! (from, to, location, who recorded it, when), and its lost and found reports.
//!
//! Each entry is signed by the controller with HMAC-SHA256 under a key of its own
//! (`DATA/custody.key`, 32 random bytes, 0600, never sent anywhere), over a canonical encoding
//! that includes the previous entry's signature of the same device, so entries form one
//! chain per device: an edited, removed or reordered entry no longer verifies. HMAC rather than
//! Ed25519: only the controller needs to check the ledger, and a dedicated key keeps it apart
//! from the command-signing key (no cross-protocol use). The operator is identified by the
//! authenticated principal the controller records (`recorded_by`); operators hold no keys.
//!
//! Store: one sled database (`DATA/custody`, through `posfleet_runtime::sledstore`),
//! `c/<device>\0<seq u64 BE>` → [`CustodyEntry`] (JSON); one writer (`lock`). Blocks.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use posfleet_proto::DeviceId;
use posfleet_runtime::sledstore::{self, OpenError};
use ring::hmac;

use crate::views::{CustodyEntry, CustodyHistory};

/// Domain separation of the signed bytes.
const DOMAIN: &[u8] = b"posfleet-custody-v1\0";

/// Why the custody ledger failed.
#[derive(Debug, thiserror::Error)]
pub enum CustodyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("custody ledger {path}: {detail}")]
    Store { path: PathBuf, detail: String },
}

/// What an entry records.
#[derive(Debug, Clone)]
pub struct NewEntry {
    /// `handover`, `lost` or `found`.
    pub kind: &'static str,
    pub recorded_by: String,
    pub from: String,
    pub to: String,
    pub location: String,
    pub note: String,
}

/// The open ledger.
pub struct CustodyLedger {
    dir: PathBuf,
    key: hmac::Key,
    _db: sled::Db,
    tree: sled::Tree,
    lock: Mutex<()>,
}

impl std::fmt::Debug for CustodyLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustodyLedger")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl CustodyLedger {
    /// Opens (creating) the ledger in `dir` with the signing key in `key_file` (created 0600
    /// if missing).
    pub fn open(dir: &Path, key_file: &Path, cache_capacity: u64) -> Result<Self, CustodyError> {
        let secret = read_or_create_key(key_file)?;
        let (db, tree) =
            sledstore::open_tree(dir, cache_capacity, "custody").map_err(|e| match e {
                OpenError::Io { path, source } => CustodyError::Io { path, source },
                OpenError::Sled { path, source } => CustodyError::Store {
                    path,
                    detail: source.to_string(),
                },
            })?;
        Ok(Self {
            dir: dir.to_owned(),
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            _db: db,
            tree,
            lock: Mutex::new(()),
        })
    }

    /// Appends a signed entry for `device` at `at_ms`, durably, and returns it.
    pub fn record(
        &self,
        device: &DeviceId,
        at_ms: u64,
        new: NewEntry,
    ) -> Result<CustodyEntry, CustodyError> {
        let _w = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let last = self
            .tree
            .scan_prefix(prefix(device))
            .next_back()
            .transpose()
            .map_err(|e| self.err(e))?;
        let (seq, prev_sig) = match last {
            None => (1, "0".repeat(64)),
            Some((_, v)) => {
                let e: CustodyEntry = serde_json::from_slice(&v).map_err(|e| self.err(e))?;
                (e.seq + 1, e.signature)
            }
        };
        let mut entry = CustodyEntry {
            device_id: device.to_string(),
            seq,
            at_ms,
            kind: new.kind.to_owned(),
            recorded_by: new.recorded_by,
            from: new.from,
            to: new.to,
            location: new.location,
            note: new.note,
            prev_signature: prev_sig,
            signature: String::new(),
        };
        entry.signature = hex::encode(hmac::sign(&self.key, &encode(&entry)).as_ref());
        let value = serde_json::to_vec(&entry).map_err(|e| self.err(e))?;
        self.tree
            .insert(entry_key(device, seq), value)
            .map_err(|e| self.err(e))?;
        sledstore::make_durable(&self.tree, &self.dir).map_err(|e| self.err(e))?;
        Ok(entry)
    }

    /// Every entry of `device`, oldest first, with the result of checking signatures and
    /// chain.
    pub fn history(&self, device: &DeviceId) -> Result<CustodyHistory, CustodyError> {
        let mut history = CustodyHistory {
            device_id: device.to_string(),
            ok: true,
            first_bad_seq: None,
            reason: None,
            entries: Vec::new(),
        };
        let mut prev = "0".repeat(64);
        let prefix = prefix(device);
        for (expected, item) in (1..).zip(self.tree.scan_prefix(&prefix)) {
            let (key, value) = item.map_err(|e| self.err(e))?;
            let key_seq = key
                .get(prefix.len()..)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map(u64::from_be_bytes);
            let problem = match serde_json::from_slice::<CustodyEntry>(&value) {
                Err(e) => Some((key_seq.unwrap_or(expected), format!("unreadable: {e}"))),
                Ok(entry) => {
                    let why = if key_seq != Some(expected) || entry.seq != expected {
                        Some(format!("entry {expected} is missing or moved"))
                    } else if entry.prev_signature != prev || entry.device_id != device.as_str() {
                        Some(format!(
                            "entry {expected} does not follow the entry before it"
                        ))
                    } else if !self.signature_ok(&entry) {
                        Some(format!(
                            "entry {expected}'s signature does not match (edited)"
                        ))
                    } else {
                        None
                    };
                    prev = entry.signature.clone();
                    history.entries.push(entry);
                    why.map(|w| (expected, w))
                }
            };
            if let Some((seq, reason)) = problem
                && history.ok
            {
                history.ok = false;
                history.first_bad_seq = Some(seq);
                history.reason = Some(reason);
            }
        }
        Ok(history)
    }

    fn signature_ok(&self, entry: &CustodyEntry) -> bool {
        hex::decode(&entry.signature)
            .map(|sig| hmac::verify(&self.key, &encode(entry), &sig).is_ok())
            .unwrap_or(false)
    }

    /// The raw tree, for tests that tamper with it.
    #[cfg(test)]
    pub(crate) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    fn err(&self, e: impl std::fmt::Display) -> CustodyError {
        CustodyError::Store {
            path: self.dir.clone(),
            detail: e.to_string(),
        }
    }
}

/// The signed bytes: domain, seq, time, then each text field length-prefixed, then the
/// previous signature.
fn encode(e: &CustodyEntry) -> Vec<u8> {
    let mut out = DOMAIN.to_vec();
    out.extend_from_slice(&e.seq.to_be_bytes());
    out.extend_from_slice(&e.at_ms.to_be_bytes());
    for field in [
        &e.device_id,
        &e.kind,
        &e.recorded_by,
        &e.from,
        &e.to,
        &e.location,
        &e.note,
        &e.prev_signature,
    ] {
        let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
    out
}

fn prefix(device: &DeviceId) -> Vec<u8> {
    let mut k = b"c/".to_vec();
    k.extend_from_slice(device.as_str().as_bytes());
    k.push(0);
    k
}

pub(crate) fn entry_key(device: &DeviceId, seq: u64) -> Vec<u8> {
    let mut k = prefix(device);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The 32-byte secret in `path` (hex), created 0600 if missing.
fn read_or_create_key(path: &Path) -> Result<Vec<u8>, CustodyError> {
    let bad = |detail: String| CustodyError::Store {
        path: path.to_owned(),
        detail,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = hex::decode(text.trim()).map_err(|e| bad(format!("not hex: {e}")))?;
            if key.len() != 32 {
                return Err(bad("expected 32 bytes".into()));
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Hex, as readers expect; drawn until its hex never looks like a card number.
            let key: [u8; 32] = posfleet_proto::secret::hex_key();
            posfleet_proto::pki::write_secret_file(path, &format!("{}\n", hex::encode(key)))
                .map_err(|e| bad(e.to_string()))?;
            Ok(key.to_vec())
        }
        Err(source) => Err(CustodyError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handover(to: &str) -> NewEntry {
        NewEntry {
            kind: "handover",
            recorded_by: "alice".into(),
            from: "depot".into(),
            to: to.into(),
            location: "Store 12".into(),
            note: String::new(),
        }
    }

    #[test]
    fn entries_chain_and_tampering_is_detected() {
        let tmp = tempfile::tempdir().unwrap();
        let open = || {
            CustodyLedger::open(
                &tmp.path().join("c"),
                &tmp.path().join("custody.key"),
                1 << 20,
            )
            .unwrap()
        };
        let dev = DeviceId::new("T-1").unwrap();
        {
            let ledger = open();
            for to in ["bob", "carol", "dave"] {
                ledger.record(&dev, 1_000, handover(to)).unwrap();
            }
            ledger
                .record(&DeviceId::new("T-2").unwrap(), 1_000, handover("x"))
                .unwrap();
        }
        // Reopened with the same key: still verifies.
        let ledger = open();
        let h = ledger.history(&dev).unwrap();
        assert!(h.ok, "{h:?}");
        assert_eq!(h.entries.len(), 3);
        assert_eq!(h.entries[1].prev_signature, h.entries[0].signature);

        let mut e = h.entries[1].clone();
        e.to = "mallory".into();
        ledger
            .tree()
            .insert(entry_key(&dev, 2), serde_json::to_vec(&e).unwrap())
            .unwrap();
        let h = ledger.history(&dev).unwrap();
        assert!(!h.ok);
        assert_eq!(h.first_bad_seq, Some(2));
        assert!(h.reason.unwrap().contains("signature"));

        ledger.tree().remove(entry_key(&dev, 2)).unwrap();
        let h = ledger.history(&dev).unwrap();
        assert_eq!(h.first_bad_seq, Some(2), "{h:?}");
        assert!(ledger.history(&DeviceId::new("T-2").unwrap()).unwrap().ok);
    }
}
