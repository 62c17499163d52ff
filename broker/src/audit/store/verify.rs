//! Verification of the audit chain, alone ([`AuditLog::verify`]: hashes, links, keyed
//! checkpoints, the anchor file, the metadata) or against an exported anchor
//! ([`AuditLog::verify_anchored`]), and the export of signed anchors.

use super::{
    ANCHOR_MISMATCH, Anchor, AuditEntry, AuditLog, AuditStoreError, Base, ENTRY_PREFIX, Hash,
    META_MISSING, seq_of,
};
use crate::audit::keyed::{AnchorError, MacDomain, check_anchor};
use crate::views::{AuditAnchor, AuditVerifyView};

/// What one walk checks beyond the hash chain.
struct Walk {
    /// Entries (and a base) from this seq on must carry a valid keyed checkpoint.
    keyed_from: u64,
    /// An exported anchor: the entry (or base) at this seq must have this hash.
    anchored: Option<(u64, Hash)>,
}

/// The result of a walk.
struct Walked {
    report: AuditVerifyView,
    base: Base,
    /// The end of the chain (when the walk got there).
    last: Anchor,
    /// The first `audit.anchor_mismatch` entry: the anchor has moved on since, so the entry is
    /// the only evidence left that entries were cut off or the anchor replaced.
    mismatch: Option<(u64, String)>,
}

fn bad(report: &mut AuditVerifyView, seq: u64, reason: String) {
    report.ok = false;
    report.first_bad_seq = Some(seq);
    report.reason = Some(reason);
}

impl AuditLog {
    /// Walks the chain from the base (checking every keyed checkpoint) and compares its end
    /// with the anchor file.
    pub fn verify(&self) -> Result<AuditVerifyView, AuditStoreError> {
        // Hold the writer lock so the chain and the anchor are read as one state.
        let _head = self.lock();
        let keyed_from = self.meta.keyed_from;
        let mut walked = self.walk(&Walk {
            keyed_from,
            anchored: None,
        })?;
        let report = &mut walked.report;
        if !report.ok {
            return Ok(walked.report);
        }
        if !self.key.check_meta(&self.meta) {
            bad(
                report,
                keyed_from,
                "the audit log's metadata (installation, key, first keyed entry) is not \
                 signed by the audit key: it was altered"
                    .to_owned(),
            );
        } else if let Err((seq, reason)) = self.compare_anchor(&walked.base, &walked.last)? {
            bad(report, seq, reason);
        } else if let Some((seq, reason)) = self.unkeyed_anchor_file(keyed_from)? {
            bad(report, seq, reason);
        } else if let Some((seq, detail)) = walked.mismatch {
            bad(
                report,
                seq,
                format!(
                    "entry {seq} records that the log did not match its anchor or metadata at \
                     start-up ({detail}); compare with an exported copy or anchor"
                ),
            );
        }
        Ok(walked.report)
    }

    /// A signed anchor of the newest entry, to keep off this host.
    pub fn export_anchor(&self, now_ms: u64) -> AuditAnchor {
        let head = self.lock();
        self.key
            .anchor(&self.meta, head.last.seq, &head.last.hash, now_ms)
    }

    /// Checks the chain against an exported `anchor`: the anchor is refused (`Ok(Err)`) when
    /// its signature does not verify, or it is from another installation or key; otherwise
    /// the report names the first entry where the chain departs from it (a keyed checkpoint
    /// that fails, the anchored entry with another hash, entries missing).
    pub fn verify_anchored(
        &self,
        anchor: &AuditAnchor,
    ) -> Result<Result<AuditVerifyView, AnchorError>, AuditStoreError> {
        let hash = match check_anchor(anchor, &self.meta, &self.key) {
            Ok(hash) => hash,
            Err(e) => return Ok(Err(e)),
        };
        let _head = self.lock();
        let mut walked = self.walk(&Walk {
            // The anchor's own value: moving the stored one forward changes nothing.
            keyed_from: self.meta.keyed_from.min(anchor.keyed_from),
            anchored: Some((anchor.seq, hash)),
        })?;
        walked.report.anchor_seq = Some(anchor.seq);
        if walked.report.ok && anchor.seq > walked.last.seq {
            bad(
                &mut walked.report,
                walked.last.seq + 1,
                format!(
                    "the exported anchor names entry {} but the log ends at {} (entries \
                     removed from the end)",
                    anchor.seq, walked.last.seq
                ),
            );
        }
        Ok(Ok(walked.report))
    }

    /// The chain from the base, stopping at the first problem.
    fn walk(&self, checks: &Walk) -> Result<Walked, AuditStoreError> {
        let base = self.base()?;
        let installation = self.meta.installation.as_str();
        let mut report = AuditVerifyView {
            ok: true,
            entries: 0,
            first_seq: None,
            last_seq: None,
            first_bad_seq: None,
            reason: None,
            anchor_seq: None,
        };
        let walked = |report: AuditVerifyView, last: Anchor, mismatch| {
            Ok(Walked {
                report,
                base: base.clone(),
                last,
                mismatch,
            })
        };
        let mut last = Anchor {
            seq: base.seq,
            hash: base.hash,
        };
        if base.seq >= checks.keyed_from
            && base.seq > 0
            && !base.mac.as_deref().is_some_and(|mac| {
                self.key
                    .check(MacDomain::Base, installation, base.seq, &base.hash, mac)
            })
        {
            let reason = format!(
                "the base left by pruning (entry {}) is not signed by the audit key: entries \
                 were removed from the start",
                base.seq
            );
            bad(&mut report, base.seq + 1, reason);
            return walked(report, last, None);
        }
        if let Some((seq, hash)) = checks.anchored
            && seq == base.seq
            && hash != base.hash
        {
            bad(
                &mut report,
                seq,
                format!("entry {seq} does not have the hash of the exported anchor"),
            );
            return walked(report, last, None);
        }
        let mut mismatch: Option<(u64, String)> = None;
        for (expected, item) in (base.seq + 1..).zip(self.tree.scan_prefix([ENTRY_PREFIX])) {
            let (key, value) = item.map_err(|e| self.write_err("read", e))?;
            let Some(seq) = seq_of(&key) else {
                bad(&mut report, expected, format!("unexpected key {key:?}"));
                return walked(report, last, mismatch);
            };
            if seq != expected {
                let why = if seq > expected {
                    format!("entry {expected} is missing (the next stored entry is {seq})")
                } else {
                    format!("entry {seq} is stored before the base")
                };
                bad(&mut report, expected.min(seq), why);
                return walked(report, last, mismatch);
            }
            let entry: AuditEntry = match crate::audit::encoding::decode_entry(&value) {
                Ok(e) => e,
                Err(e) => {
                    bad(&mut report, seq, format!("entry {seq} is unreadable: {e}"));
                    return walked(report, last, mismatch);
                }
            };
            if let Err(reason) = check_entry(&entry, seq, &last.hash) {
                bad(&mut report, seq, reason);
                return walked(report, last, mismatch);
            }
            let own = entry.own().unwrap_or_default();
            if seq >= checks.keyed_from
                && !self
                    .key
                    .check(MacDomain::Entry, installation, seq, &own, &entry.mac)
            {
                let reason = if entry.mac.is_empty() {
                    format!("entry {seq} has no keyed checkpoint (removed, or the entry forged)")
                } else {
                    format!(
                        "entry {seq}'s keyed checkpoint does not verify: the chain was \
                         rebuilt from here by someone without the audit key"
                    )
                };
                bad(&mut report, seq, reason);
                return walked(report, last, mismatch);
            }
            if let Some((at, hash)) = checks.anchored
                && at == seq
                && hash != own
            {
                bad(
                    &mut report,
                    seq,
                    format!(
                        "entry {seq} does not have the hash of the exported anchor: the chain \
                         was rebuilt at or before it"
                    ),
                );
                return walked(report, last, mismatch);
            }
            if (entry.action == ANCHOR_MISMATCH || entry.action == META_MISSING)
                && mismatch.is_none()
            {
                mismatch = Some((seq, entry.detail.clone()));
            }
            report.entries += 1;
            report.first_seq.get_or_insert(seq);
            report.last_seq = Some(seq);
            last = Anchor { seq, hash: own };
        }
        walked(report, last, mismatch)
    }

    /// The anchor file's keyed checkpoint, when it names a keyed entry: `Some((seq, reason))`
    /// if it is missing or does not verify.
    fn unkeyed_anchor_file(
        &self,
        keyed_from: u64,
    ) -> Result<Option<(u64, String)>, AuditStoreError> {
        let Some(file) = self.read_anchor()? else {
            return Ok(None);
        };
        if file.seq < keyed_from {
            return Ok(None);
        }
        let ok = file.mac.as_deref().is_some_and(|mac| {
            self.key.check(
                MacDomain::Head,
                &self.meta.installation,
                file.seq,
                &file.hash,
                mac,
            )
        });
        Ok((!ok).then(|| {
            (
                file.seq,
                format!(
                    "the anchor file {} is not signed by the audit key (rewritten)",
                    self.anchor_path.display()
                ),
            )
        }))
    }

    /// Compares the anchor file with the end of the chain `last` (`Err((seq, reason))` on a
    /// mismatch; `Ok(Ok(()))` when they agree).
    #[allow(clippy::type_complexity)]
    pub(super) fn compare_anchor(
        &self,
        base: &Base,
        last: &Anchor,
    ) -> Result<Result<(), (u64, String)>, AuditStoreError> {
        let Some(anchor) = self.read_anchor()?.map(|a| a.anchor()) else {
            if last.seq == 0 {
                return Ok(Ok(()));
            }
            return Ok(Err((
                last.seq,
                format!("the anchor file {} is missing", self.anchor_path.display()),
            )));
        };
        if anchor.seq > last.seq {
            return Ok(Err((
                last.seq + 1,
                format!(
                    "the anchor names entry {} but the log ends at {} (entries removed from the end)",
                    anchor.seq, last.seq
                ),
            )));
        }
        let stored = if anchor.seq == last.seq {
            Some(last.hash)
        } else if anchor.seq == base.seq {
            Some(base.hash)
        } else {
            self.get(anchor.seq)?.and_then(|e| e.own())
        };
        if stored != Some(anchor.hash) {
            return Ok(Err((
                anchor.seq,
                format!(
                    "entry {} does not have the hash the anchor recorded",
                    anchor.seq
                ),
            )));
        }
        // Open brings a stale-by-one anchor (interrupted append) forward, and `verify` holds
        // the writer lock, so here the anchor must name the very last entry.
        if anchor.seq < last.seq {
            return Ok(Err((
                anchor.seq + 1,
                format!(
                    "the anchor names entry {} but the log continues to {}",
                    anchor.seq, last.seq
                ),
            )));
        }
        Ok(Ok(()))
    }
}

/// The chain checks of one entry stored at `seq` after an entry whose hash is `prev`.
fn check_entry(entry: &AuditEntry, seq: u64, prev: &Hash) -> Result<(), String> {
    if entry.seq != seq {
        return Err(format!(
            "the entry stored as {seq} says it is {} (moved or reordered)",
            entry.seq
        ));
    }
    if entry.prev() != Some(*prev) {
        return Err(format!(
            "entry {seq}'s prev_hash is not the hash of the entry before it"
        ));
    }
    if entry.own() != Some(entry.compute_hash(prev)) {
        return Err(format!("entry {seq} does not match its hash (edited)"));
    }
    Ok(())
}
