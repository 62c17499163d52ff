//! kill -9 harness (docs/storage.md rule 7), small: a child process (this test binary,
//! running the ignored test `child_accepts_until_killed`) accepts transactions from several
//! concurrent writers and acknowledges old ones, printing every accept the moment it returns
//! (and every ack before it is applied);
//! the parent kills it with SIGKILL at a random moment, reopens the store and checks that
//! every accepted transaction is there (or was acknowledged before), with gapless seqs.
//! Several rounds use the same store, so a kill can also hit a store that is recovering.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::tests::dev;
use super::*;
use crate::transaction::fixtures::valid;

const DIR_VAR: &str = "POSFLEET_OUTBOX_CRASH_DIR";
const ROUND_VAR: &str = "POSFLEET_OUTBOX_CRASH_ROUND";
/// Kills per run; `POSFLEET_OUTBOX_CRASH_KILLS` raises it for a longer soak.
const KILLS: usize = 4;
const WRITERS: usize = 6;

/// The child: accepts until killed. Does nothing unless started by the parent.
#[test]
#[ignore = "started by kill_9_never_loses_an_accepted_transaction"]
fn child_accepts_until_killed() {
    let (Some(dir), Some(round)) = (std::env::var_os(DIR_VAR), std::env::var_os(ROUND_VAR)) else {
        return;
    };
    let round = round.to_string_lossy().into_owned();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let outbox = tokio::task::spawn_blocking(move || {
            Outbox::open(std::path::Path::new(&dir), OutboxSettings::default())
        })
        .await
        .unwrap()
        .unwrap();
        let t = outbox.device(&dev("T-crash")).unwrap();
        println!("READY");
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..WRITERS {
            let (t, round) = (t.clone(), round.clone());
            writers.spawn(async move {
                for i in 0.. {
                    let id = format!("r{round}w{w}n{i}");
                    if let Ok(AcceptOutcome::Stored { seq }) = t.accept(valid(&id, 7)).await {
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "ACCEPTED {id} {seq}");
                        let _ = out.flush();
                    }
                }
            });
        }
        // Acknowledge all but the newest 20 now and then (removals race the accepts).
        loop {
            tokio::time::sleep(Duration::from_millis(3)).await;
            // Announced before it is applied: a kill may fall between the two.
            let through = t.last_seq().saturating_sub(20);
            {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "ACKING {through}");
                let _ = out.flush();
            }
            let _ = t.ack(through, vec![]).await;
        }
    });
}

#[test]
fn kill_9_never_loses_an_accepted_transaction() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    // seq → txn id of every accept a child reported, over all rounds.
    let mut accepted: BTreeMap<u64, String> = BTreeMap::new();
    let mut acked_through = 0;
    let kills = std::env::var("POSFLEET_OUTBOX_CRASH_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(KILLS);
    for round in 0..kills {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "outbox::crash_tests::child_accepts_until_killed",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_VAR, tmp.path())
            .env(ROUND_VAR, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let kill_after = 50 + rand::random_range(0..400usize);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = 0;
        let mut lines = BufReader::new(stdout).lines();
        // Read until the random moment, then kill -9 (the reader keeps draining what the
        // child printed before it died: those accepts returned too).
        while let Some(Ok(line)) = lines.next() {
            if let Some(rest) = line.strip_prefix("ACCEPTED ") {
                let (id, seq) = rest.split_once(' ').unwrap();
                let seq: u64 = seq.parse().unwrap();
                let before = accepted.insert(seq, id.to_owned());
                assert!(before.is_none(), "seq {seq} handed out twice");
                seen += 1;
            } else if let Some(through) = line.strip_prefix("ACKING ") {
                acked_through = acked_through.max(through.parse::<u64>().unwrap());
            }
            if seen == kill_after {
                child.kill().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "the child did not accept in time"
            );
        }
        let _ = child.wait();
        assert!(
            seen >= kill_after,
            "the child died on its own after {seen} accepts"
        );

        // Reopen in this process: every accepted transaction is there or was acknowledged.
        // The store alone (no committer thread), so that dropping it closes it at once.
        let store = store::Store::open(tmp.path(), 1 << 20).unwrap();
        let id = dev("T-crash");
        let entries = store.entries(&id).unwrap();
        let last_seq = store.snapshot(&id).unwrap().last_seq;
        let max_accepted = accepted.keys().next_back().copied().unwrap_or(0);
        assert!(
            last_seq >= max_accepted,
            "last seq {last_seq} < accepted {max_accepted}"
        );
        let stored: BTreeMap<u64, String> = entries
            .iter()
            .map(|e| (e.seq, e.transaction().unwrap().txn_id))
            .collect();
        // Gapless: the entries are one run ending at the last seq.
        if let (Some(first), Some(last)) = (stored.keys().next(), stored.keys().next_back()) {
            assert_eq!(*last, last_seq);
            assert_eq!(stored.len() as u64, last - first + 1, "a gap in the outbox");
        }
        for (seq, txn_id) in &accepted {
            match stored.get(seq) {
                Some(found) => assert_eq!(found, txn_id, "seq {seq} holds another transaction"),
                None => assert!(
                    *seq <= acked_through,
                    "accepted {txn_id} (seq {seq}) is lost after kill -9"
                ),
            }
        }
        drop(store);
    }
}
