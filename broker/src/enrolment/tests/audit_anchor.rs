//! Issue 10 item 11 through the real process and posctl: `posctl audit anchor export`, the
//! chain rebuilt in the data directory while the controller is stopped, then `posctl audit
//! verify` (plain, and `--anchor FILE`) after the restart.

use super::Fixture;
use super::issued::posctl;
use crate::audit::{AuditConfig, AuditLog, AuditQuery, paths};

/// Edits entry `from` of the stopped controller's audit log and recomputes every later hash
/// and the anchor file, as someone with write access to the data directory (but not the
/// audit key) would.
fn rebuild(data: &std::path::Path, from: u64) {
    let (dir, anchor) = paths(data);
    let log = AuditLog::open(
        AuditConfig::new(dir, anchor.clone()),
        crate::controller::system_clock(),
    )
    .unwrap();
    let newest = AuditQuery {
        limit: 1,
        ..AuditQuery::default()
    };
    let last = log.query(&newest, None).unwrap().entries[0].seq;
    let mut prev = log.get(from).unwrap().unwrap().prev().unwrap();
    for seq in from..=last {
        let mut e = log.get(seq).unwrap().unwrap();
        if seq == from {
            e.outcome = crate::audit::Outcome::Denied;
        }
        e.prev_hash = hex::encode(prev);
        prev = e.compute_hash(&prev);
        e.hash = hex::encode(prev);
        let mut key = vec![b'e'];
        key.extend_from_slice(&seq.to_be_bytes());
        log.tree()
            .insert(key, serde_json::to_vec(&e).unwrap())
            .unwrap();
    }
    log.tree().flush().unwrap();
    let file = serde_json::json!({"seq": last, "hash": hex::encode(prev)});
    std::fs::write(anchor, file.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posctl_verify_with_an_exported_anchor_finds_a_rebuilt_chain() {
    let f = Fixture::start().await;
    let anchor = f._tmp.path().join("offsite").join("anchor.json");
    std::fs::create_dir_all(anchor.parent().unwrap()).unwrap();
    let a = anchor.to_str().unwrap();
    // Some history, then the operator's off-host anchor.
    let _ = f.token(serde_json::json!({"expires_in": "1h"})).await;
    let printed = posctl(&f, &["audit", "anchor", "export", "--out", a])
        .await
        .unwrap();
    assert!(printed.contains("keep a copy off this host"), "{printed}");
    let printed = posctl(&f, &["audit", "verify", "--anchor", a])
        .await
        .unwrap();
    assert!(printed.contains("matches the anchor"), "{printed}");
    let exported: crate::views::AuditAnchor =
        serde_json::from_str(&std::fs::read_to_string(&anchor).unwrap()).unwrap();

    let tmp = f.stop_keep().await;
    rebuild(&tmp.path().join("data"), 2);
    let f = Fixture::start_in(tmp).await;
    let broken = posctl(&f, &["audit", "verify", "--anchor", a])
        .await
        .unwrap_err();
    assert!(broken.contains("AUDIT LOG BROKEN at entry 2"), "{broken}");
    let json = posctl(&f, &["-o", "json", "audit", "verify", "--anchor", a])
        .await
        .unwrap_err();
    let report: crate::views::AuditVerifyView = serde_json::from_str(&json).unwrap();
    assert_eq!(report.first_bad_seq, Some(2), "{report:?}");
    assert_eq!(report.anchor_seq, Some(exported.seq));

    // An anchor whose signature does not verify is refused with a clear error.
    let mut altered = serde_json::to_value(&exported).unwrap();
    altered["hash"] = "0".repeat(64).into();
    std::fs::write(&anchor, altered.to_string()).unwrap();
    let err = posctl(&f, &["audit", "verify", "--anchor", a])
        .await
        .unwrap_err();
    assert!(err.contains("signature does not verify"), "{err}");
    f.stop().await;
}
