//! The driver's journal: what each simulated payment application submitted and what its
//! terminal answered, written so that a SIGKILL of the driver loses nothing that matters.
//!
//! One JSON object per line, appended with one `write` each (the kernel keeps it when the
//! process dies; a power cut is not what these tests simulate):
//!
//! - `intent`: the whole request, written **before** the accept is called;
//! - `accepted`: the answer (seq, and whether it was new: 201, or a repeat: 200);
//! - `refused`: a definitive refusal (nothing stored).
//!
//! An intent without an answer is **in doubt**: the process died between the two lines, and
//! the terminal may or may not have stored it. A restarted driver resubmits every such request
//! unchanged (same txn id, same content) before anything else, as a payment application
//! retries after losing an answer; the terminal then answers 200 with the original seq if it
//! had stored it, or 201. So when every driver has finished, the journal's answers are exactly
//! what the terminals accepted: the ground truth the store is compared with.
//!
//! A line torn by a SIGKILL mid-write is skipped (it was an intent whose accept never started,
//! or an answer whose intent is then resubmitted).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use posfleet_agent::TransactionRequest;
use serde::{Deserialize, Serialize};

use crate::txledger::AcceptedLedger;

/// One journal line. Lines are built, written and dropped one at a time, so the size
/// difference between variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Entry {
    Intent {
        /// Device id.
        d: String,
        /// The request as submitted.
        r: TransactionRequest,
    },
    Accepted {
        d: String,
        /// Txn id.
        t: String,
        /// The seq the terminal answered.
        s: u64,
        /// 201 (true) or 200 (false).
        new: bool,
    },
    Refused {
        d: String,
        t: String,
        why: String,
    },
}

/// An open journal (append only).
#[derive(Debug)]
pub struct Journal {
    file: Mutex<File>,
}

impl Journal {
    /// Opens `path` for appending (created if missing). A line torn by an earlier SIGKILL is
    /// terminated first, so that it cannot swallow the next one.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the journal {}", path.display()))?;
        let len = file.metadata()?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
            }
        }
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    /// Appends one line with a single `write` (a page-cache append: microseconds, so it is
    /// done in place rather than on another thread, which would add a round trip per
    /// transaction).
    pub fn write(&self, entry: &Entry) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(entry).context("encoding a journal line")?;
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(&line).context("writing the journal")
    }
}

/// What a journal says, read back.
#[derive(Debug, Default)]
pub struct JournalReplay {
    /// Every answer (201 and 200), as the payment applications recorded them.
    pub accepted: AcceptedLedger,
    /// In-doubt requests per device, in submission order.
    pub unresolved: HashMap<String, Vec<TransactionRequest>>,
    /// Definitive refusals: (device, txn id, why).
    pub refused: Vec<(String, String, String)>,
    /// Requests submitted.
    pub intents: u64,
    /// Lines that did not parse (torn by a SIGKILL).
    pub torn: u64,
}

impl JournalReplay {
    /// Reads `path` (an absent file is an empty journal).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", path.display()));
            }
        };
        let mut replay = Self::default();
        // (device, txn) → (order, request) of intents without an answer yet.
        let mut open: HashMap<(String, String), (u64, TransactionRequest)> = HashMap::new();
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(entry) = serde_json::from_slice::<Entry>(line) else {
                replay.torn += 1;
                continue;
            };
            match entry {
                Entry::Intent { d, r } => {
                    replay.intents += 1;
                    open.insert((d, r.txn_id.clone()), (replay.intents, r));
                }
                Entry::Accepted { d, t, s, .. } => {
                    replay.accepted.record(&d, &t, s);
                    open.remove(&(d, t));
                }
                Entry::Refused { d, t, why } => {
                    open.remove(&(d.clone(), t.clone()));
                    replay.refused.push((d, t, why));
                }
            }
        }
        let mut pending: Vec<_> = open.into_iter().collect();
        pending.sort_by_key(|(_, (order, _))| *order);
        for ((device, _), (_, request)) in pending {
            replay.unresolved.entry(device).or_default().push(request);
        }
        Ok(replay)
    }

    /// In-doubt requests of every device.
    pub fn unresolved_count(&self) -> usize {
        self.unresolved.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use posfleet_agent::simulate::transactions::TxnGenerator;

    #[test]
    fn answers_in_doubt_requests_and_torn_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.jsonl");
        let mut till = TxnGenerator::new(0, 1);
        let (a, b, c) = (
            till.next_transaction(1_764_242_400_000),
            till.next_transaction(1_764_242_401_000),
            till.next_transaction(1_764_242_402_000),
        );
        {
            let journal = Journal::open(&path).expect("open");
            for (r, seq) in [(&a, Some(1)), (&b, None), (&c, Some(2))] {
                journal
                    .write(&Entry::Intent {
                        d: "T-1".into(),
                        r: r.clone(),
                    })
                    .expect("intent");
                if let Some(s) = seq {
                    journal
                        .write(&Entry::Accepted {
                            d: "T-1".into(),
                            t: r.txn_id.clone(),
                            s,
                            new: true,
                        })
                        .expect("answer");
                }
            }
        }
        // A SIGKILL in the middle of a line, then a restarted driver appends.
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(br#"{"k":"accepted","d":"T-1","t":"#)
            .expect("torn");
        drop(file);
        Journal::open(&path)
            .expect("reopen")
            .write(&Entry::Refused {
                d: "T-1".into(),
                t: "x".into(),
                why: "locked".into(),
            })
            .expect("write");

        let replay = JournalReplay::load(&path).expect("load");
        assert_eq!((replay.intents, replay.torn), (3, 1));
        assert_eq!(replay.accepted.len(), 2);
        assert_eq!(replay.unresolved_count(), 1);
        assert_eq!(replay.unresolved["T-1"][0], b);
        assert_eq!(replay.refused.len(), 1);
    }
}
