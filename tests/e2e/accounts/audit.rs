//! `posctl audit verify` before and after an entry is edited in the store on disk.

use posfleet_broker::datadir::DataDir;
use posfleet_tests::Posctl;

use super::{create_user, ok, run};
use crate::support::broker;

/// The entry the test edits (an early one, so that entries after it chain over it).
const EDITED_SEQ: u64 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_audit_verify_detects_an_edited_entry() {
    let mut broker = broker().await;
    let posctl = Posctl::new(&broker);
    create_user(&posctl, "vic", "viewer").await;
    create_user(&posctl, "val", "viewer").await;
    ok(&posctl, &["enroll", "token", "create", "--expires", "1h"]).await;
    let intact = ok(&posctl, &["audit", "verify"]).await;
    assert!(intact.stdout.contains("audit log intact"), "{intact}");
    let report: posfleet_broker::views::AuditVerifyView =
        ok(&posctl, &["-o", "json", "audit", "verify"])
            .await
            .json()
            .expect("a verify report");
    assert!(
        report.ok && report.last_seq.is_some_and(|s| s > EDITED_SEQ),
        "{report:?}"
    );

    // Stop the controller and change one entry's target in DATA/audit, as someone with
    // access to the disk would.
    broker.terminate().await.expect("the broker stops");
    let dir = DataDir::at(broker.data_dir()).audit_dir();
    let before = tokio::task::spawn_blocking(move || edit_entry(&dir, EDITED_SEQ))
        .await
        .expect("the edit task ran")
        .expect("entry edited");
    broker.restart().await.expect("the broker starts again");

    let broken = run(&posctl, &["audit", "verify"], None).await;
    assert!(
        !broken.status.success()
            && broken
                .stdout
                .contains(&format!("AUDIT LOG BROKEN at entry {EDITED_SEQ}")),
        "the edit of entry {EDITED_SEQ} ({before}) went unnoticed:\n{broken}"
    );
    let report: posfleet_broker::views::AuditVerifyView =
        run(&posctl, &["-o", "json", "audit", "verify"], None)
            .await
            .json()
            .expect("a verify report");
    assert!(
        !report.ok && report.first_bad_seq == Some(EDITED_SEQ),
        "{report:?}"
    );
}

/// Rewrites entry `seq` of the stopped controller's audit store with another target;
/// returns the original entry.
fn edit_entry(dir: &std::path::Path, seq: u64) -> anyhow::Result<String> {
    let db = posfleet_runtime::sledstore::open(dir, 1 << 20)?;
    let tree = db.open_tree("audit")?;
    let mut key = vec![b'e'];
    key.extend_from_slice(&seq.to_be_bytes());
    let Some(value) = tree.get(&key)? else {
        anyhow::bail!("no audit entry {seq} in {}", dir.display());
    };
    let original = String::from_utf8_lossy(&value).into_owned();
    let mut entry: serde_json::Value = serde_json::from_slice(&value)?;
    anyhow::ensure!(entry["seq"] == seq, "entry {seq} is {original}");
    entry["target"] = "someone-else".into();
    tree.insert(key, serde_json::to_vec(&entry)?)?;
    db.flush()?;
    Ok(original)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_audit_verify_detects_entries_cut_off_the_end_across_a_restart() {
    let mut broker = broker().await;
    let posctl = Posctl::new(&broker);
    create_user(&posctl, "vic", "viewer").await;
    create_user(&posctl, "val", "viewer").await;
    ok(&posctl, &["audit", "verify"]).await;

    // Remove the two newest entries while the controller is down.
    broker.terminate().await.expect("the broker stops");
    let dir = DataDir::at(broker.data_dir()).audit_dir();
    let removed = tokio::task::spawn_blocking(move || cut_newest(&dir, 2))
        .await
        .expect("the removal task ran")
        .expect("entries removed");
    broker.restart().await.expect("the broker starts again");

    // The chain that is left is consistent, but the anchor knew it was longer: `verify`
    // must not call the log intact after the restart.
    let broken = run(&posctl, &["audit", "verify"], None).await;
    assert!(
        !broken.status.success()
            && broken.stdout.contains("AUDIT LOG BROKEN")
            && broken.stdout.contains("anchor"),
        "entries {removed:?} were cut off the end unnoticed:\n{broken}"
    );
}

/// Removes the `n` newest entries from the stopped controller's audit store; returns their
/// sequence numbers.
fn cut_newest(dir: &std::path::Path, n: usize) -> anyhow::Result<Vec<u64>> {
    let db = posfleet_runtime::sledstore::open(dir, 1 << 20)?;
    let tree = db.open_tree("audit")?;
    let keys: Vec<_> = tree
        .scan_prefix([b'e'])
        .keys()
        .rev()
        .take(n)
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(
        keys.len() == n,
        "fewer than {n} entries in {}",
        dir.display()
    );
    let mut seqs = Vec::new();
    for key in keys {
        let seq: [u8; 8] = key[1..].try_into()?;
        seqs.push(u64::from_be_bytes(seq));
        tree.remove(key)?;
    }
    db.flush()?;
    Ok(seqs)
}
