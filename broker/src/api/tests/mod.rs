//! API tests against a real TLS server on 127.0.0.1:0, with reqwest as the client.
//!
//! - `accounts.rs`: logins, PCI DSS rules, MFA, roles, API and bootstrap tokens.
//! - `approvals.rs`: two-person approval with real principals; the per-account lock window.
//! - `artifacts.rs`: uploads (good, tampered, unknown key, no release key, oversized, bad
//!   fields), list, detail, delete.
//! - `auth.rs`: the token on every route, 401 shape, failure counting.
//! - `config.rs`: configuration layers, history, diff, schema, effective configuration.
//! - `devices.rs`: list/detail after ingest, 400/404, health and metrics.
//! - `login.rs`: one answer for every login refusal, lockout per address, throttling, the
//!   audit of refusals aggregated.
//! - `stream.rs`: server-sent events, device filter, lag, end at shutdown.
//! - `rollouts.rs`: rollout creation (field errors), list, detail, pause/resume/abort.
//! - `server.rs`: idle TCP clients, handshake timeout, connection cap.
//! - `transactions.rs`: transaction list (pagination, filters, cursors) and summary.

mod accounts;
mod approvals;
mod artifacts;
mod audit;
mod auth;
mod commands;
mod config;
mod devices;
mod login;
mod rollouts;
mod server;
mod stream;
mod text;
mod transactions;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use posfleet_proto::pki::PkiDir;
use posfleet_proto::{Channel, DeviceId, Topic, encode, pb};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ApiLimits, ApiState, serve, server_tls_config};
use crate::controller::Ingest;
use crate::events::EventBus;
use crate::fleetconfig::{ConfigStore, ConfigStoreConfig};
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryConfig};
use crate::txstore::{TxStore, TxStoreConfig};

pub(super) const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// How the test server's artifact service is set up.
#[derive(Debug, Clone, Copy)]
pub(super) struct ArtifactSetup {
    /// Install the test release key as `release.pub` (otherwise none is trusted).
    pub trust_release_key: bool,
    pub max_upload_bytes: u64,
}

impl Default for ArtifactSetup {
    fn default() -> Self {
        Self {
            trust_release_key: true,
            max_upload_bytes: 1 << 20,
        }
    }
}

/// How the test server's audit log and approvals are set up.
#[derive(Clone)]
pub(super) struct AuditSetup {
    /// Record here instead of the server's audit log (e.g. a failing sink).
    pub sink: Option<Arc<dyn crate::audit::AuditSink>>,
    pub approvals: crate::approvals::ApprovalPolicy,
}

impl Default for AuditSetup {
    fn default() -> Self {
        Self {
            sink: None,
            // Single-principal tests issue wipes directly; approval tests turn it on.
            approvals: crate::approvals::ApprovalPolicy::off(),
        }
    }
}

/// A running API server with its fleet state.
pub(super) struct TestServer {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    /// The client's TLS config, for raw TLS connections.
    pub tls: Arc<rustls::ClientConfig>,
    pub metrics: Arc<Metrics>,
    /// The live event bus the stream serves.
    pub events: EventBus,
    pub ingest: Ingest,
    pub transactions: Arc<TxStore>,
    pub config: Arc<ConfigStore>,
    pub registry: Arc<Registry>,
    /// The artifact service (trusting [`TestServer::release_key`] unless started without).
    pub artifacts: Arc<crate::artifacts::Artifacts>,
    /// A release key whose public half the server trusts.
    pub release_key: Arc<posfleet_proto::signing::CommandKey>,
    /// The account service (bootstrap token [`TOKEN`]).
    pub accounts: Arc<crate::accounts::Accounts>,
    /// Every audit record, in order (also passed on to [`TestServer::audit`]).
    pub recorded: Arc<RecordingAudit>,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
    /// The server's audit log.
    pub audit: Arc<crate::audit::AuditLog>,
    /// The server's custody ledger.
    pub custody: Arc<crate::custody::CustodyLedger>,
    /// The wall clock of approvals and audit entries (Unix ms); tests move it.
    pub now: Arc<std::sync::atomic::AtomicU64>,
    _tmp: tempfile::TempDir,
}

impl TestServer {
    /// `method path` with the token and an optional JSON body.
    pub(super) async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .request(method, self.url(path))
            .bearer_auth(TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().await.unwrap()
    }

    pub async fn start() -> Self {
        Self::start_with(ApiLimits::default(), 64).await
    }

    pub async fn start_with(limits: ApiLimits, event_capacity: usize) -> Self {
        Self::start_full(limits, event_capacity, ArtifactSetup::default()).await
    }

    pub async fn start_full(
        limits: ApiLimits,
        event_capacity: usize,
        setup: ArtifactSetup,
    ) -> Self {
        Self::start_audited(limits, event_capacity, setup, AuditSetup::default()).await
    }

    pub async fn start_audited(
        limits: ApiLimits,
        event_capacity: usize,
        setup: ArtifactSetup,
        audit_setup: AuditSetup,
    ) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let pki = PkiDir::at(tmp.path().join("pki"));
        pki.init(&[]).unwrap();
        let tls = server_tls_config(&pki.server_cert(), &pki.server_key()).unwrap();
        let registry = Registry::open(RegistryConfig {
            cache_capacity: 1 << 20,
            ..RegistryConfig::new(tmp.path().join("registry"))
        })
        .unwrap();
        let transactions = TxStore::open(TxStoreConfig {
            cache_capacity: 1 << 20,
            ..TxStoreConfig::new(tmp.path().join("transactions"))
        })
        .unwrap();
        let config = Arc::new(
            ConfigStore::open(ConfigStoreConfig {
                cache_capacity: 1 << 20,
                ..ConfigStoreConfig::new(tmp.path().join("config"))
            })
            .unwrap(),
        );
        let events = EventBus::new(event_capacity);
        let metrics = Arc::new(Metrics::new());
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        registry.spawn_committer(&tracker, cancel.child_token());
        let downlink = Arc::new(crate::commands::tests::Recorder::default());
        let (commands, inbox) = crate::commands::tests::plane(tmp.path()).spawn(
            downlink,
            Arc::clone(&registry),
            events.clone(),
            Arc::clone(&metrics),
            crate::controller::system_clock(),
            &tracker,
            cancel.child_token(),
        );
        let ingest = Ingest::new(Arc::clone(&registry), events.clone(), Arc::clone(&metrics))
            .with_commands(inbox);
        let rollout_store = Arc::new(
            crate::rollouts::RolloutStore::open(&tmp.path().join("rollouts"), 1 << 20).unwrap(),
        );
        let catalog: Arc<dyn crate::artifacts::ArtifactCatalog> =
            Arc::new(crate::rollouts::tests::FakeCatalog);
        let rollouts = crate::rollouts::Rollouts::load(
            crate::rollouts::RolloutsConfig::default(),
            rollout_store,
            commands.store(),
        )
        .unwrap()
        .spawn(
            commands.clone(),
            Arc::clone(&registry),
            Arc::clone(&transactions),
            Arc::clone(&catalog),
            events.clone(),
            Arc::clone(&metrics),
            crate::controller::system_clock(),
            &tracker,
            cancel.child_token(),
        );
        let state = ApiState::new(
            Arc::clone(&registry),
            Arc::clone(&transactions),
            Arc::clone(&config),
            commands.clone(),
            events.clone(),
            Arc::clone(&metrics),
            TOKEN.to_owned(),
        )
        .with_limits(limits);
        let release_key = Arc::new(posfleet_proto::signing::CommandKey::generate());
        if setup.trust_release_key {
            posfleet_proto::pki::write_public_file(
                &pki.release_public_key(),
                &release_key.public_key().to_pem(),
            )
            .unwrap();
        }
        let artifacts = {
            let store =
                crate::artifacts::ArtifactStore::open(&tmp.path().join("artifacts"), 1 << 20)
                    .unwrap();
            let keys = crate::artifacts::load_release_keys(&pki.release_public_key()).unwrap();
            let mut config =
                crate::artifacts::ArtifactsConfig::new("https://dl.example:8884".into());
            config.max_upload_bytes = setup.max_upload_bytes;
            Arc::new(crate::artifacts::Artifacts::new(
                Arc::new(store),
                keys,
                pki.release_public_key(),
                config,
                Arc::clone(&metrics),
            ))
        };
        let enrolment = {
            let (store, revocations) =
                crate::enrolment::open(&tmp.path().join("enrolment")).unwrap();
            Arc::new(
                crate::enrolment::Enrolment::new(
                    crate::enrolment::EnrolmentConfig::new(
                        "mqtts://127.0.0.1:8883".into(),
                        "https://127.0.0.1:8884".into(),
                    ),
                    store,
                    revocations,
                    pki.load_ca().unwrap(),
                    pki.clone(),
                    Arc::clone(&registry),
                    None,
                )
                .unwrap(),
            )
        };
        let now = Arc::new(std::sync::atomic::AtomicU64::new(posfleet_proto::now_ms()));
        let clock: crate::controller::Clock = {
            let now = Arc::clone(&now);
            Arc::new(move || now.load(std::sync::atomic::Ordering::SeqCst))
        };
        let audit = {
            let (dir, anchor) = crate::audit::paths(tmp.path());
            let cfg = crate::audit::AuditConfig {
                cache_capacity: 1 << 20,
                ..crate::audit::AuditConfig::new(dir, anchor)
            };
            Arc::new(crate::audit::AuditLog::open(cfg, Arc::clone(&clock)).unwrap())
        };
        let custody = Arc::new(
            crate::custody::CustodyLedger::open(
                &tmp.path().join("custody"),
                &tmp.path().join("custody.key"),
                1 << 20,
            )
            .unwrap(),
        );
        let approvals = Arc::new(
            crate::approvals::ApprovalStore::open(&tmp.path().join("approvals"), 1 << 20).unwrap(),
        );
        let accounts = Arc::new(
            crate::accounts::Accounts::open(
                &tmp.path().join("accounts"),
                1 << 20,
                TOKEN.to_owned(),
                Arc::clone(&clock),
            )
            .unwrap(),
        );
        // Every record is kept for the tests and passed on to the audit log (or to the sink
        // a test asked for).
        let inner: Arc<dyn crate::audit::AuditSink> = match audit_setup.sink {
            Some(sink) => sink,
            None => audit.clone(),
        };
        let recorded = Arc::new(RecordingAudit::forwarding(inner));
        let state = state
            .with_artifacts(Arc::clone(&artifacts))
            .with_rollouts(rollouts, catalog)
            .with_audit_log(Arc::clone(&audit))
            .with_approvals(approvals, audit_setup.approvals)
            .with_clock(clock)
            .with_custody(Arc::clone(&custody))
            .with_accounts(Arc::clone(&accounts))
            .with_audit(recorded.clone())
            .with_enrolment(enrolment);
        state
            .refusals()
            .spawn_flusher(&tracker, cancel.child_token());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tracker.spawn(serve(listener, tls, state, cancel.clone()));
        let client_tls = client_tls(&pki);
        Self {
            addr,
            client: reqwest::Client::builder()
                .use_preconfigured_tls((*client_tls).clone())
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            tls: client_tls,
            metrics,
            events,
            ingest,
            transactions,
            config,
            registry,
            artifacts,
            release_key,
            accounts,
            recorded,
            cancel,
            tracker,
            audit,
            custody,
            now,
            _tmp: tmp,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// GET with the right token.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
    }

    /// Feeds a heartbeat for `device` through ingest.
    pub fn heartbeat(&self, device: &str, at_ms: u64) {
        let hb = pb::Heartbeat {
            seq: 1,
            sent_at_ms: at_ms,
            interval_s: 10,
            uptime_s: 5,
            ..Default::default()
        };
        self.feed(device, Channel::Heartbeat, &encode(&hb).unwrap(), at_ms);
    }

    /// Feeds a Presence ONLINE or OFFLINE for `device` through ingest.
    pub fn presence(&self, device: &str, online: bool, at_ms: u64) {
        let state = if online {
            pb::PresenceState::Online
        } else {
            pb::PresenceState::Offline
        };
        let msg = pb::Presence {
            state: state as i32,
            at_ms,
            model: "X9".into(),
            reason: if online { "" } else { "shutdown" }.into(),
            ..Default::default()
        };
        self.feed(device, Channel::Presence, &encode(&msg).unwrap(), at_ms);
    }

    fn feed(&self, device: &str, channel: Channel, payload: &[u8], at_ms: u64) {
        let topic = Topic::for_device(&DeviceId::new(device).unwrap(), channel);
        self.ingest.handle(&topic, payload, at_ms).unwrap();
    }

    /// Cancels the server and waits (bounded) for it to stop.
    pub async fn stop(&self) {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(15), self.tracker.wait())
            .await
            .expect("the API server stops after cancel");
    }
}

/// An audit sink keeping every record in memory.
pub(super) struct RecordingAudit {
    seen: std::sync::Mutex<Vec<crate::audit::AuditRecord>>,
    inner: Arc<dyn crate::audit::AuditSink>,
}

impl crate::audit::AuditSink for RecordingAudit {
    fn record(&self, record: crate::audit::AuditRecord) -> Result<(), crate::audit::AuditError> {
        self.seen.lock().unwrap().push(record.clone());
        self.inner.record(record)
    }
}

impl RecordingAudit {
    pub(super) fn forwarding(inner: Arc<dyn crate::audit::AuditSink>) -> Self {
        Self {
            seen: std::sync::Mutex::new(Vec::new()),
            inner,
        }
    }

    pub(super) fn records(&self) -> Vec<crate::audit::AuditRecord> {
        self.seen.lock().unwrap().clone()
    }
}

/// A TLS client config trusting the test fleet CA (ring provider, no client cert).
fn client_tls(pki: &PkiDir) -> Arc<rustls::ClientConfig> {
    let ca = std::fs::read(pki.ca_cert()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in posfleet_proto::pki::parse_pem_certs(&ca).unwrap() {
        roots.add(cert).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(tls)
}
