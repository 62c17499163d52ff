//! A login flood against a real `pf-broker demo` process with simulated terminals (issue 10,
//! item 4): many concurrent logins with unknown user names and wrong passwords from several
//! 127.0.2.x addresses. The broker's resident memory (`VmRSS`) grows by less than 256 MiB
//! (a resource bound: one argon2id hash holds 19 MiB, so unbounded hashing grows by GBs), its
//! terminals stay online and an authenticated API request is answered while the flood runs.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use posfleet_tests::host::rss_bytes;
use posfleet_tests::{BrokerOptions, eventually};
use serde_json::json;

use crate::support::{WAIT, broker_with};

/// Simulated terminals in the broker process.
const TERMINALS: usize = 10;
/// Source addresses of the flood (127.0.2.1 ...).
const ADDRESSES: u8 = 8;
/// Concurrent logins per address.
const PER_ADDRESS: usize = 16;
/// Login requests sent in all (at least; the flood also lasts until the API was checked).
const REQUESTS: usize = 3000;
/// Growth of the broker's resident memory the flood may cause at most.
const BOUND: u64 = 256 * 1024 * 1024;
/// The flood stops after this long whatever happened (a hang, not a timing assertion).
const FLOOD_LIMIT: Duration = Duration::from_secs(60);

const MIB: u64 = 1024 * 1024;

/// How the flood's requests were answered.
#[derive(Debug, Default)]
struct Tally {
    sent: AtomicUsize,
    unauthorized: AtomicUsize,
    throttled: AtomicUsize,
    busy: AtomicUsize,
    other: AtomicUsize,
    errors: AtomicUsize,
}

async fn online_terminals(api: &posfleet_tests::Api) -> anyhow::Result<usize> {
    let list = api.devices().await?;
    Ok(list.devices.iter().filter(|d| d.online).count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_login_flood_keeps_memory_bounded_terminals_online_and_the_api_answering() {
    let broker = broker_with(BrokerOptions {
        demo_terminals: Some(TERMINALS),
        ..BrokerOptions::default()
    })
    .await;
    let api = broker.api().clone();
    eventually(WAIT, || async {
        let online = online_terminals(&api).await?;
        anyhow::ensure!(
            online == TERMINALS,
            "{online} of {TERMINALS} terminals online"
        );
        Ok(())
    })
    .await;
    // One real account, so that half of the flood is wrong passwords.
    let created = api
        .send(
            reqwest::Method::POST,
            "/api/v1/users",
            Some(&json!({"name": "vic", "role": "viewer"})),
        )
        .await
        .expect("POST /api/v1/users");
    assert_eq!(created.status(), reqwest::StatusCode::CREATED);

    let pid = broker.process().expect("the broker runs").pid();
    let baseline = rss_bytes(pid).expect("the broker's VmRSS");
    let stop = Arc::new(AtomicBool::new(false));
    let checked = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(baseline));
    let tally = Arc::new(Tally::default());

    // Samples VmRSS; past the bound the flood stops at once (the old code grew by GBs).
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(rss) = rss_bytes(pid) {
                    peak.fetch_max(rss, Ordering::SeqCst);
                    if rss.saturating_sub(baseline) >= BOUND {
                        stop.store(true, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let url = format!("{}/api/v1/auth/login", api.base());
    let ca = broker.pki().ca_cert();
    let mut workers = Vec::new();
    for a in 1..=ADDRESSES {
        let ip: IpAddr = format!("127.0.2.{a}").parse().expect("an address");
        let client = posfleet_tests::api::tls_client(&ca, Some(ip), Duration::from_secs(30))
            .expect("a flood client");
        for w in 0..PER_ADDRESS {
            let (client, url, stop, checked, tally) = (
                client.clone(),
                url.clone(),
                stop.clone(),
                checked.clone(),
                tally.clone(),
            );
            workers.push(tokio::spawn(async move {
                let mut n = 0usize;
                loop {
                    let sent = tally.sent.fetch_add(1, Ordering::SeqCst);
                    if stop.load(Ordering::SeqCst)
                        || (sent >= REQUESTS && checked.load(Ordering::SeqCst))
                    {
                        return;
                    }
                    n += 1;
                    let body = if n % 2 == 0 {
                        json!({"user": "vic", "password": format!("wrong password {w}")})
                    } else {
                        json!({"user": format!("ghost-{a}-{w}-{}", n % 7), "password": "x1234567890y"})
                    };
                    let counter = match client.post(&url).json(&body).send().await {
                        Ok(r) => match r.status().as_u16() {
                            401 => &tally.unauthorized,
                            429 => &tally.throttled,
                            503 => &tally.busy,
                            _ => &tally.other,
                        },
                        Err(_) => &tally.errors,
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
    }

    // While the flood runs: an authenticated request is answered and every terminal is online.
    let during = tokio::time::timeout(FLOOD_LIMIT, async {
        while tally.sent.load(Ordering::SeqCst) < 200 && !stop.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let answer = online_terminals(&api).await;
        checked.store(true, Ordering::SeqCst);
        answer
    })
    .await;
    let flooding = !stop.load(Ordering::SeqCst);
    let finished = tokio::time::timeout(FLOOD_LIMIT, async {
        for w in workers {
            let _ = w.await;
        }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let _ = sampler.await;
    let growth = peak.load(Ordering::SeqCst).saturating_sub(baseline);
    eprintln!(
        "login flood: VmRSS {} MiB -> peak {} MiB (+{} MiB); {tally:?}",
        baseline / MIB,
        peak.load(Ordering::SeqCst) / MIB,
        growth / MIB
    );
    assert!(
        growth < BOUND,
        "the broker's VmRSS grew by {} MiB (bound {} MiB) under the login flood; {tally:?}",
        growth / MIB,
        BOUND / MIB
    );
    assert!(
        finished.is_ok(),
        "the flood did not end within {FLOOD_LIMIT:?}"
    );
    match during {
        Ok(Ok(online)) => assert_eq!(online, TERMINALS, "terminals went offline during the flood"),
        Ok(Err(error)) => panic!("the API did not answer during the flood: {error:#}"),
        Err(_) => panic!("the API check did not finish within {FLOOD_LIMIT:?}"),
    }
    assert!(flooding, "the flood had stopped before the API was checked");
    // Throttling or the bounded queue refused part of the flood.
    assert!(
        tally.throttled.load(Ordering::SeqCst) + tally.busy.load(Ordering::SeqCst) > 0,
        "no login of the flood was refused with 429 or 503: {tally:?}"
    );
    eventually(WAIT, || async {
        let online = online_terminals(&api).await?;
        anyhow::ensure!(
            online == TERMINALS,
            "{online} of {TERMINALS} terminals online"
        );
        Ok(())
    })
    .await;
}
