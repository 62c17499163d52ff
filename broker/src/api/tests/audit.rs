//! The audit trail through the API: every mutating route records the request and its outcome
//! with actor, source and action; a failing audit log refuses the change; list, verify and
//! export; two-person approval.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::http::StatusCode;
use reqwest::Method;
use serde_json::{Value, json};

use super::{AuditSetup, TOKEN, TestServer};
use crate::api::ApiLimits;
use crate::api::auth::TEST_PRINCIPAL_HEADER;
use crate::approvals::ApprovalPolicy;
use crate::audit::{AuditError, AuditRecord, AuditSink, Outcome};
use crate::views::{
    ApprovalDecided, ApprovalList, ApprovalRequired, ApprovalState, AuditEntry, AuditPage,
    AuditVerifyView, CommandPage, CommandsCreated, ErrorBody,
};

fn now() -> u64 {
    posfleet_proto::now_ms()
}

impl TestServer {
    /// Every stored entry, oldest first.
    fn entries(&self) -> Vec<AuditEntry> {
        self.audit.after(0, 100_000).unwrap()
    }

    async fn as_principal(
        &self,
        who: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .request(method, self.url(path))
            .bearer_auth(TOKEN)
            .header(TEST_PRINCIPAL_HEADER, who);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.unwrap()
    }

    async fn command_count(&self) -> usize {
        let page: CommandPage = self
            .get("/api/v1/commands?limit=1000")
            .await
            .json()
            .await
            .unwrap();
        page.items.len()
    }
}

async fn approvals_server() -> TestServer {
    TestServer::start_audited(
        ApiLimits::default(),
        64,
        super::ArtifactSetup::default(),
        AuditSetup {
            sink: None,
            approvals: ApprovalPolicy {
                lock_threshold: 2,
                ..ApprovalPolicy::default()
            },
        },
    )
    .await
}

#[tokio::test]
async fn every_mutating_route_records_request_and_outcome() {
    let server = TestServer::start().await;
    for d in ["T-1", "T-2"] {
        server.heartbeat(d, now());
    }
    let reboot: CommandsCreated = server
        .send(
            Method::POST,
            "/api/v1/commands",
            Some(json!({"kind": "reboot", "target": {"devices": ["T-2"]}})),
        )
        .await
        .json()
        .await
        .unwrap();
    let reboot_id = reboot.commands[0].id.clone();
    type Case<'a> = (Method, String, Option<Value>, &'a str, &'a str, Outcome);
    let requests: Vec<Case> = vec![
        (
            Method::POST,
            "/api/v1/commands".into(),
            Some(json!({"kind": "lock", "target": {"devices": ["T-1"]}, "reason": "test"})),
            "command.create",
            "T-1",
            Outcome::Success,
        ),
        (
            Method::POST,
            format!("/api/v1/commands/{reboot_id}/cancel"),
            None,
            "command.cancel",
            &reboot_id,
            Outcome::Success,
        ),
        (
            Method::PUT,
            "/api/v1/devices/T-1/groups".into(),
            Some(json!({"groups": ["north"]})),
            "device.set_groups",
            "T-1",
            Outcome::Success,
        ),
        (
            Method::PUT,
            "/api/v1/devices/T-1/labels".into(),
            Some(json!({"labels": {"site": "a"}})),
            "device.set_labels",
            "T-1",
            Outcome::Success,
        ),
        (
            Method::PATCH,
            "/api/v1/config/fleet".into(),
            Some(json!({"set": {"telemetry.interval_s": 30}})),
            "config.set",
            "fleet",
            Outcome::Failure,
        ),
        (
            Method::DELETE,
            "/api/v1/config/groups/north".into(),
            None,
            "config.delete",
            "group:north",
            Outcome::Failure,
        ),
        (
            Method::DELETE,
            "/api/v1/artifacts/00".into(),
            None,
            "artifact.delete",
            "00",
            Outcome::Failure,
        ),
        (
            Method::POST,
            "/api/v1/rollouts".into(),
            Some(json!({})),
            "rollout.create",
            "-",
            Outcome::Failure,
        ),
        (
            Method::POST,
            "/api/v1/rollouts/r-1/pause".into(),
            None,
            "rollout.pause",
            "r-1",
            Outcome::Failure,
        ),
    ];
    for (method, path, body, action, target, outcome) in requests {
        let before = server.entries().len();
        let response = server.send(method.clone(), &path, body).await;
        let status = response.status();
        let new: Vec<AuditEntry> = server.entries().split_off(before);
        assert_eq!(new.len(), 2, "{method} {path} ({status}): {new:?}");
        let (req, out) = (&new[0], &new[1]);
        for e in [req, out] {
            assert_eq!(e.action, action, "{method} {path}");
            assert_eq!(e.actor, "admin");
            assert_eq!(e.source, "127.0.0.1");
        }
        assert_eq!(req.outcome, Outcome::Requested);
        assert_eq!(
            req.target,
            if action == "command.create" {
                "-"
            } else {
                target
            }
        );
        assert_eq!(out.target, target, "{method} {path}");
        // A config body the schema refuses is a failure; these outcomes follow the status.
        let expected = if status.is_success() {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        assert_eq!(out.outcome, expected, "{method} {path} {status}");
        if outcome == Outcome::Success {
            assert!(status.is_success(), "{method} {path}: {status}");
        }
        assert!(out.detail.contains(&status.as_u16().to_string()));
    }
    // Reads are not recorded, except reads of the audit log itself.
    let before = server.entries().len();
    server.get("/api/v1/devices").await;
    assert_eq!(server.entries().len(), before);
    server.get("/api/v1/audit/verify").await;
    assert_eq!(server.entries().last().unwrap().action, "audit.verify");
    server.stop().await;
}

/// Each of `principals` in turn sets T-1's label `by` to its name (one audited change each).
async fn label_t1_as(server: &TestServer, principals: &[&str]) {
    for who in principals {
        let r = server
            .as_principal(
                who,
                Method::PUT,
                "/api/v1/devices/T-1/labels",
                Some(json!({"labels": {"by": who}})),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn audit_routes_list_verify_and_export() {
    let server = TestServer::start().await;
    server.heartbeat("T-1", now());
    label_t1_as(&server, &["alice", "bob", "alice"]).await;
    let page: AuditPage = server
        .get("/api/v1/audit?actor=alice&action=device&target=T-1&limit=10")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page.entries.len(), 4, "{page:?}");
    assert!(page.entries.windows(2).all(|w| w[0].seq > w[1].seq));
    let page: AuditPage = server
        .get("/api/v1/audit?limit=2")
        .await
        .json()
        .await
        .unwrap();
    let cursor = page.next_cursor.unwrap();
    let next: AuditPage = server
        .get(&format!("/api/v1/audit?limit=2&cursor={cursor}"))
        .await
        .json()
        .await
        .unwrap();
    assert!(next.entries[0].seq < page.entries[1].seq);
    let bad = server.get("/api/v1/audit?limit=0").await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let future = server
        .get(&format!("/api/v1/audit?from={}", now() + 3_600_000))
        .await
        .json::<AuditPage>()
        .await
        .unwrap();
    assert!(future.entries.is_empty());

    let report: AuditVerifyView = server
        .get("/api/v1/audit/verify")
        .await
        .json()
        .await
        .unwrap();
    assert!(report.ok, "{report:?}");

    let export = server.get("/api/v1/audit/export").await;
    assert_eq!(
        export.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let text = export.text().await.unwrap();
    let lines: Vec<AuditEntry> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 12, "{}", lines.len());
    assert!(lines.windows(2).all(|w| w[1].seq == w[0].seq + 1));

    // Tamper with one stored entry: verify reports it.
    let mut e = server.audit.get(3).unwrap().unwrap();
    e.actor = "mallory".into();
    let mut key = vec![b'e'];
    key.extend_from_slice(&3u64.to_be_bytes());
    server
        .audit
        .tree()
        .insert(key, serde_json::to_vec(&e).unwrap())
        .unwrap();
    let report: AuditVerifyView = server
        .get("/api/v1/audit/verify")
        .await
        .json()
        .await
        .unwrap();
    assert!(!report.ok);
    assert_eq!(report.first_bad_seq, Some(3));
    server.stop().await;
}

/// A sink that refuses everything.
struct BrokenSink;

impl AuditSink for BrokenSink {
    fn record(&self, _record: AuditRecord) -> Result<(), AuditError> {
        Err(AuditError("disk full".into()))
    }
}

#[tokio::test]
async fn a_change_that_cannot_be_audited_is_refused_and_nothing_is_done() {
    let server = TestServer::start_audited(
        ApiLimits::default(),
        64,
        super::ArtifactSetup::default(),
        AuditSetup {
            sink: Some(Arc::new(BrokenSink)),
            ..AuditSetup::default()
        },
    )
    .await;
    server.heartbeat("T-1", now());
    let response = server
        .send(
            Method::POST,
            "/api/v1/commands",
            Some(json!({"kind": "lock", "target": {"devices": ["T-1"]}, "reason": "x"})),
        )
        .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: ErrorBody = response.json().await.unwrap();
    assert!(body.error.contains("nothing was done"), "{body:?}");
    assert_eq!(server.command_count().await, 0);
    let response = server
        .send(
            Method::PUT,
            "/api/v1/devices/T-1/labels",
            Some(json!({"labels": {"a": "b"}})),
        )
        .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let detail: crate::views::DeviceDetail = server
        .get("/api/v1/devices/T-1")
        .await
        .json()
        .await
        .unwrap();
    assert!(detail.summary.labels.is_empty());
    // Reads still work.
    assert_eq!(server.get("/api/v1/devices").await.status(), StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn a_wipe_needs_a_second_principal() {
    let server = approvals_server().await;
    server.heartbeat("T-1", now());
    let response = server
        .as_principal(
            "alice",
            Method::POST,
            "/api/v1/commands",
            Some(json!({"kind": "wipe", "target": {"devices": ["T-1"]}})),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let ApprovalRequired { approval } = response.json().await.unwrap();
    assert_eq!(approval.state, ApprovalState::Pending);
    assert_eq!(approval.requested_by, "alice");
    assert_eq!(server.command_count().await, 0, "nothing issued yet");
    let path = format!("/api/v1/approvals/{}/approve", approval.id);

    let own = server
        .as_principal("alice", Method::POST, &path, None)
        .await;
    assert_eq!(own.status(), StatusCode::FORBIDDEN);
    assert_eq!(server.command_count().await, 0);

    let ok = server.as_principal("bob", Method::POST, &path, None).await;
    assert_eq!(ok.status(), StatusCode::OK);
    let decided: ApprovalDecided = ok.json().await.unwrap();
    assert_eq!(decided.approval.state, ApprovalState::Approved);
    assert_eq!(decided.commands.len(), 1);
    assert_eq!(
        decided.approval.commands,
        vec![decided.commands[0].id.clone()]
    );
    assert_eq!(server.command_count().await, 1);

    let again = server
        .as_principal("carol", Method::POST, &path, None)
        .await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert_eq!(server.command_count().await, 1, "created once");

    let list: ApprovalList = server.get("/api/v1/approvals").await.json().await.unwrap();
    assert_eq!(list.approvals.len(), 1);
    let actions: Vec<(String, String, Outcome)> = server
        .entries()
        .into_iter()
        .filter(|e| e.outcome != Outcome::Requested)
        .map(|e| (e.action, e.actor, e.outcome))
        .collect();
    assert!(actions.contains(&("command.create".into(), "alice".into(), Outcome::Success)));
    assert!(actions.contains(&("approval.approve".into(), "alice".into(), Outcome::Denied)));
    assert!(actions.contains(&("approval.approve".into(), "bob".into(), Outcome::Success)));
    assert!(actions.contains(&("approval.approve".into(), "carol".into(), Outcome::Failure)));
    server.stop().await;
}

#[tokio::test]
async fn large_locks_need_approval_and_approvals_expire_or_are_rejected() {
    let server = approvals_server().await;
    for d in ["T-1", "T-2", "T-3"] {
        server.heartbeat(d, now());
    }
    let lock =
        |devices: Vec<&str>| json!({"kind": "lock", "target": {"devices": devices}, "reason": "x"});
    // At the threshold (2): issued at once.
    let direct = server
        .as_principal(
            "alice",
            Method::POST,
            "/api/v1/commands",
            Some(lock(vec!["T-1", "T-2"])),
        )
        .await;
    assert!(direct.json::<CommandsCreated>().await.is_ok());
    assert_eq!(server.command_count().await, 2);
    let expiring = request_big_lock(&server).await;
    server.now.fetch_add(3_600_001, Ordering::SeqCst);
    let late = server
        .as_principal(
            "bob",
            Method::POST,
            &format!("/api/v1/approvals/{}/approve", expiring.id),
            None,
        )
        .await;
    assert_eq!(late.status(), StatusCode::CONFLICT);
    assert!(late.text().await.unwrap().contains("expired"));

    let rejected = request_big_lock(&server).await;
    let r = server
        .as_principal(
            "bob",
            Method::POST,
            &format!("/api/v1/approvals/{}/reject", rejected.id),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = server
        .as_principal(
            "carol",
            Method::POST,
            &format!("/api/v1/approvals/{}/approve", rejected.id),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(server.command_count().await, 2, "nothing more was issued");
    server.stop().await;
}

async fn request_big_lock(server: &TestServer) -> crate::views::ApprovalView {
    let body = json!({"kind": "lock", "target": {"devices": ["T-1", "T-2", "T-3"]}, "reason": "x"});
    let r = server
        .as_principal("alice", Method::POST, "/api/v1/commands", Some(body))
        .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    r.json::<ApprovalRequired>().await.unwrap().approval
}

#[tokio::test]
async fn custody_is_recorded_signed_and_tampering_shows() {
    let server = TestServer::start().await;
    server.heartbeat("T-1", now());
    let path = "/api/v1/devices/T-1/custody";
    for (from, to) in [("depot", "alice"), ("alice", "Store 7")] {
        let r = server
            .as_principal(
                "carol",
                Method::POST,
                path,
                Some(json!({"from": from, "to": to, "location": "Leeds", "note": "boxed"})),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let bad = server
        .send(Method::POST, path, Some(json!({"from": "a", "to": ""})))
        .await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let unknown = server
        .send(
            Method::POST,
            "/api/v1/devices/NOPE/custody",
            Some(json!({"from": "a", "to": "b", "location": "c"})),
        )
        .await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let h: crate::views::CustodyHistory = server.get(path).await.json().await.unwrap();
    assert!(h.ok, "{h:?}");
    assert_eq!(h.entries.len(), 2);
    assert_eq!(h.entries[0].recorded_by, "carol");
    assert_eq!(h.entries[1].to, "Store 7");
    assert!(
        server
            .entries()
            .iter()
            .any(|e| e.action == "custody.record" && e.actor == "carol" && e.target == "T-1")
    );

    let mut e = h.entries[0].clone();
    e.to = "mallory".into();
    let dev = posfleet_proto::DeviceId::new("T-1").unwrap();
    server
        .custody
        .tree()
        .insert(
            crate::custody::entry_key(&dev, 1),
            serde_json::to_vec(&e).unwrap(),
        )
        .unwrap();
    let h: crate::views::CustodyHistory = server.get(path).await.json().await.unwrap();
    assert!(!h.ok);
    assert_eq!(h.first_bad_seq, Some(1));
    server.stop().await;
}

#[tokio::test]
async fn a_lost_device_is_locked_and_found_again() {
    let server = TestServer::start().await;
    server.heartbeat("T-1", now());
    let r = server
        .send(
            Method::POST,
            "/api/v1/devices/T-1/lost",
            Some(json!({"reason": "stolen from till 3"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let view: crate::views::LostFoundView = r.json().await.unwrap();
    assert_eq!(view.lifecycle, crate::views::Lifecycle::Lost);
    assert_eq!(view.commands.len(), 1);
    assert_eq!(view.custody.kind, "lost");
    let detail: crate::views::DeviceDetail = server
        .get("/api/v1/devices/T-1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(detail.summary.lifecycle, crate::views::Lifecycle::Lost);
    let desired = detail.desired.unwrap().lock.unwrap();
    assert!(desired.locked, "{desired:?}");
    assert!(
        server
            .entries()
            .iter()
            .any(|e| e.action == "device.lost" && e.outcome == Outcome::Success)
    );

    let r = server
        .send(Method::POST, "/api/v1/devices/T-1/found", Some(json!({})))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let detail: crate::views::DeviceDetail = server
        .get("/api/v1/devices/T-1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(detail.summary.lifecycle, crate::views::Lifecycle::Active);
    assert!(
        detail.desired.unwrap().lock.unwrap().locked,
        "found does not unlock"
    );
    let again = server
        .send(Method::POST, "/api/v1/devices/T-1/found", Some(json!({})))
        .await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let h: crate::views::CustodyHistory = server
        .get("/api/v1/devices/T-1/custody")
        .await
        .json()
        .await
        .unwrap();
    assert!(h.ok);
    assert_eq!(
        h.entries
            .iter()
            .map(|e| e.kind.as_str())
            .collect::<Vec<_>>(),
        ["lost", "found"]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_anchor_finds_a_rebuilt_chain_through_the_api() {
    let server = TestServer::start().await;
    server.heartbeat("T-1", now());
    label_t1_as(&server, &["alice", "bob", "carol"]).await;
    let r = server.get("/api/v1/audit/anchor").await;
    assert_eq!(r.status(), StatusCode::OK);
    let anchor: crate::views::AuditAnchor = r.json().await.unwrap();
    assert_eq!(anchor.format, crate::audit::ANCHOR_FORMAT);
    assert!(!anchor.public_key_pem.contains("PRIVATE"));
    let verify = |body: Value| server.send(Method::POST, "/api/v1/audit/verify", Some(body));
    let report: AuditVerifyView = verify(json!(anchor)).await.json().await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.anchor_seq, Some(anchor.seq));

    // An altered anchor is refused naming the field; so is garbage.
    let mut altered = json!(anchor);
    altered["seq"] = json!(anchor.seq - 1);
    let r = verify(altered).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let err: ErrorBody = r.json().await.unwrap();
    assert_eq!(err.fields[0].key, "anchor.signature", "{err:?}");
    let r = verify(json!({"seq": 1})).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Someone with write access to the store edits entry 2 and recomputes every later hash.
    let entries = server.entries();
    let mut prev = entries[0].own().unwrap();
    for (i, e) in entries.iter().enumerate().skip(1) {
        let mut e = e.clone();
        if i == 1 {
            e.actor = "nobody".into();
        }
        e.prev_hash = hex::encode(prev);
        prev = e.compute_hash(&prev);
        e.hash = hex::encode(prev);
        let mut key = vec![b'e'];
        key.extend_from_slice(&e.seq.to_be_bytes());
        server
            .audit
            .tree()
            .insert(key, serde_json::to_vec(&e).unwrap())
            .unwrap();
    }
    let report: AuditVerifyView = verify(json!(anchor)).await.json().await.unwrap();
    assert!(!report.ok, "{report:?}");
    assert_eq!(report.first_bad_seq, Some(entries[1].seq), "{report:?}");
    assert_eq!(report.anchor_seq, Some(anchor.seq));
    // The verifications are audited like every read of the log.
    assert!(
        server
            .recorded
            .records()
            .iter()
            .any(|r| r.action == "audit.anchor_export")
    );
    server.stop().await;
}
