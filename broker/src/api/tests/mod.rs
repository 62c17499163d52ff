//! API tests against a real TLS server on 127.0.0.1:0, with reqwest as the client.
//!
//! - `artifacts.rs`: uploads (good, tampered, unknown key, no release key, oversized, bad
//!   fields), list, detail, delete.
//! - `auth.rs`: the token on every route, 401 shape, failure counting.
//! - `config.rs`: configuration layers, history, diff, schema, effective configuration.
//! - `devices.rs`: list/detail after ingest, 400/404, health and metrics.
//! - `stream.rs`: server-sent events, device filter, lag, end at shutdown.
//! - `rollouts.rs`: rollout creation (field errors), list, detail, pause/resume/abort.
//! - `server.rs`: idle TCP clients, handshake timeout, connection cap.
//! - `transactions.rs`: transaction list (pagination, filters, cursors) and summary.

mod artifacts;
mod auth;
mod commands;
mod config;
mod devices;
mod rollouts;
mod server;
mod stream;
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

/// A running API server with its fleet state.
pub(super) struct TestServer {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    /// The client's TLS config, for raw TLS connections.
    pub tls: Arc<rustls::ClientConfig>,
    pub metrics: Arc<Metrics>,
    pub ingest: Ingest,
    pub transactions: Arc<TxStore>,
    pub config: Arc<ConfigStore>,
    pub registry: Arc<Registry>,
    /// The artifact service (trusting [`TestServer::release_key`] unless started without).
    pub artifacts: Arc<crate::artifacts::Artifacts>,
    /// A release key whose public half the server trusts.
    pub release_key: Arc<posfleet_proto::signing::CommandKey>,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
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
        let state = state
            .with_artifacts(Arc::clone(&artifacts))
            .with_rollouts(rollouts, catalog)
            .with_enrolment(enrolment);
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
            ingest,
            transactions,
            config,
            registry,
            artifacts,
            release_key,
            cancel,
            tracker,
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
