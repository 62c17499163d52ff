//! Kill -9 test (storage rule 7, small for CI): a child process (this test binary, running
//! the ignored `crash_child`) commits batches in a loop and prints every acknowledgement
//! after its commit returned; the parent kills it with SIGKILL at a random point, reopens the
//! store and checks that every acknowledged (device, seq) is there with its content. Then it
//! starts the child again on the same store, a few times.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use posfleet_proto::pb;

use super::{id, open, submission};
use crate::txstore::{Order, TxQuery};

/// The child's store directory (set only on the child's command line environment).
const CHILD_DIR: &str = "POSFLEET_TXSTORE_CRASH_DIR";
const DEVICES: [&str; 4] = ["D-0", "D-1", "D-2", "D-3"];
/// Kill rounds (a release benchmark would use hundreds).
const ROUNDS: usize = 5;

/// What the terminal "really" sent for (device, seq).
fn content(device: usize, seq: u64) -> pb::Transaction {
    let amount = i64::try_from((seq * 37 + device as u64) % 100_000).unwrap_or(0);
    crate::txstore::test_sale(seq, amount)
}

#[test]
#[ignore = "the child process of kill9_never_loses_an_acknowledged_transaction"]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let store = open(Path::new(&dir));
    // Resume after what is durable, like an agent would.
    let mut next: Vec<u64> = DEVICES
        .iter()
        .map(|d| store.durable_through(&id(d)) + 1)
        .collect();
    let mut held: Vec<Option<u64>> = vec![None; DEVICES.len()];
    let stdout = std::io::stdout();
    for _ in 0..1_000_000 {
        let mut subs = Vec::new();
        for (d, name) in DEVICES.iter().enumerate() {
            if rand::random_range(0..3) == 0 {
                continue;
            }
            let k = rand::random_range(1..=20u64);
            let mut seqs: Vec<u64> = (next[d]..next[d] + k).collect();
            next[d] += k;
            // Out of order: hold one back for the next commit; resend one already sent.
            if let Some(seq) = held[d].take() {
                seqs.push(seq);
            } else if rand::random_range(0..4) == 0 {
                held[d] = Some(seqs.remove(0));
            }
            if let Some(first) = seqs.first().copied().filter(|s| *s > 1) {
                if rand::random_range(0..4) == 0 {
                    seqs.push(first - 1);
                }
            }
            subs.push(submission(
                name,
                1,
                seqs.iter().map(|s| content(d, *s)).collect(),
            ));
        }
        let outcome = store.commit(subs).expect("commit");
        let mut out = stdout.lock();
        for device in outcome.devices {
            // A closed pipe (the parent is gone) ends the child.
            if writeln!(out, "ACK {} {}", device.device, device.durable_through_seq).is_err() {
                return;
            }
        }
        if out.flush().is_err() {
            return;
        }
    }
}

#[test]
fn kill9_never_loses_an_acknowledged_transaction() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tx");
    let exe = std::env::current_exe().unwrap();
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "txstore::tests::crash::crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let target = rand::random_range(20..400);
        let mut seen = 0;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let Some(rest) = line.strip_prefix("ACK ") else {
                continue;
            };
            let (device, n) = rest.split_once(' ').unwrap();
            let n: u64 = n.parse().unwrap();
            let entry = acked.entry(device.to_owned()).or_default();
            assert!(n >= *entry, "acknowledgements never go backwards");
            *entry = n;
            seen += 1;
            if seen == target {
                break;
            }
        }
        assert_eq!(seen, target, "round {round}: the child stopped early");
        child.kill().unwrap(); // SIGKILL, mid-commit most of the time
        child.wait().unwrap();

        let store = open(&dir);
        for (d, name) in DEVICES.iter().enumerate() {
            let want = acked.get(*name).copied().unwrap_or(0);
            let device = id(name);
            let durable = store.durable_through(&device);
            assert!(
                durable >= want,
                "round {round}: {name} acknowledged through {want}, durable through {durable}"
            );
            // Every acknowledged seq is there, once, with the content that was sent.
            let mut cursor = None;
            let mut stored = BTreeMap::new();
            let query = TxQuery {
                device: Some(device.clone()),
                limit: 1000,
                order: Order::Asc,
                ..TxQuery::default()
            };
            loop {
                let page = store.list(&query, cursor.as_deref()).unwrap();
                for t in page.transactions {
                    assert!(
                        stored.insert(t.seq, t.amount_minor).is_none(),
                        "stored twice"
                    );
                }
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            for seq in 1..=want {
                assert_eq!(
                    stored.get(&seq),
                    Some(&content(d, seq).amount_minor),
                    "round {round}: {name} seq {seq} acknowledged but lost or altered"
                );
            }
            let summary = store.summary(&device).unwrap();
            assert_eq!(summary.map_or(0, |s| s.count), stored.len() as u64);
        }
    }
    assert!(acked.values().any(|n| *n > 0));
}
