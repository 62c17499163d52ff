//! The HTTPS admin API (axum over our own tokio-rustls accept loop).
//!
//! # Layout
//!
//! - `mod.rs`: [`ApiState`], [`ApiLimits`], [`router`] and the route table.
//! - `server.rs`: [`serve`] (accept loop: connection semaphore, per-connection task with a TLS
//!   handshake timeout, hyper HTTP/1.1, graceful stop) and [`server_tls_config`].
//! - `auth.rs`: bearer-token check (constant time) for every route except `/healthz`.
//! - `error.rs`: [`ApiError`] (JSON `ErrorBody` responses) and [`ServerTlsError`].
//! - one file per resource: `health.rs` (`GET /healthz`), `devices.rs`
//!   (`GET /api/v1/devices[/{id}]`, `.../desired`, `PUT .../groups`, `PUT .../labels`),
//!   `commands.rs` (`POST|GET /api/v1/commands`, `GET /api/v1/commands/{id}`,
//!   `POST .../cancel`, `GET .../logs`), `rollouts.rs` (`POST|GET /api/v1/rollouts`,
//!   `GET /api/v1/rollouts/{id}`, `POST .../pause|resume|abort`), `transactions.rs` (`GET /api/v1/transactions`,
//!   `GET /api/v1/devices/{id}/transactions/summary`), `stream.rs` (`GET /api/v1/stream`,
//!   server-sent events),
//!   `metrics.rs` (`GET /metrics`), `config.rs` (`/api/v1/config/...` layers, history, diff,
//!   schema; `GET /api/v1/devices/{id}/config`), `artifacts.rs` (`POST|GET /api/v1/artifacts`,
//!   `GET|DELETE /api/v1/artifacts/{id}`: signed software artifacts, ADR 0008).
//! - `tests/`: tests against a real TLS server on 127.0.0.1:0 with reqwest.

mod artifacts;
mod auth;
mod commands;
mod config;
mod devices;
mod enrolment;
mod error;
mod health;
mod metrics;
mod rollouts;
mod server;
mod stream;
#[cfg(test)]
mod tests;
mod transactions;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{MethodRouter, get, post, put};
use tokio_util::sync::CancellationToken;

pub(crate) use devices::parse_label;
pub use error::{ApiError, ServerTlsError};
pub use server::{PeerAddr, PeerCertificate, Site, serve, serve_site, server_tls_config};
pub(crate) use transactions::parse_time;

pub use artifacts::{KEY_ID_HEADER, SHA256_HEADER, SIGNATURE_HEADER};

use crate::artifacts::ArtifactCatalog;
use crate::artifacts::Artifacts;
use crate::commands::CommandsHandle;
use crate::events::EventBus;
use crate::fleetconfig::ConfigStore;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::rollouts::{NoArtifacts, RolloutsHandle};
use crate::txstore::TxStore;

/// Resource limits of the API server.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// Connections (handshaking or established) at most; `accept` waits beyond it.
    pub max_connections: usize,
    /// Time allowed for a TLS handshake; an idle or slow client is dropped after it.
    pub handshake_timeout: Duration,
    /// Time allowed for a client to send a request's headers.
    pub header_read_timeout: Duration,
    /// At shutdown, how long open requests (and streams) may take to finish.
    pub shutdown_grace: Duration,
    /// Interval of keep-alive comments on the live stream.
    pub sse_keep_alive: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            sse_keep_alive: Duration::from_secs(15),
        }
    }
}

/// The admin bearer token; never printed.
#[derive(Clone)]
pub(crate) struct AdminToken(Arc<str>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Everything the handlers need. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ApiState {
    /// Device state.
    pub(crate) registry: Arc<Registry>,
    /// Stored transactions.
    pub(crate) transactions: Arc<TxStore>,
    /// Fleet configuration layers.
    pub(crate) config: Arc<ConfigStore>,
    /// Commands, desired state, log uploads.
    pub(crate) commands: CommandsHandle,
    /// Live events for `/api/v1/stream`.
    pub(crate) events: EventBus,
    /// Rendered by `/metrics`; counts auth failures.
    pub(crate) metrics: Arc<Metrics>,
    /// The token every request except `/healthz` must present.
    pub(crate) token: AdminToken,
    /// Connection and timing limits.
    pub(crate) limits: ApiLimits,
    /// Cancelled when the server stops, so that endless responses (streams) end.
    pub(crate) shutdown: CancellationToken,
    /// Signed software artifacts; `None` answers 503 on `/api/v1/artifacts` (servers built
    /// without a data directory, e.g. some tests).
    pub(crate) artifacts: Option<Arc<Artifacts>>,
    /// The rollout engine (`None`: the rollout routes answer 503).
    pub(crate) rollouts: Option<RolloutsHandle>,
    /// Artifacts rollouts may use.
    pub(crate) catalog: Catalog,
    /// Enrolment, revocation and the CRL (`None`: those routes answer 503).
    pub(crate) enrolment: Option<Arc<crate::enrolment::Enrolment>>,
}

/// The artifact catalog (a trait object without `Debug`).
#[derive(Clone)]
pub(crate) struct Catalog(pub(crate) Arc<dyn ArtifactCatalog>);

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Catalog")
    }
}

impl ApiState {
    /// State with default limits. `admin_token` is the content of `DATA/admin.token`
    /// (`DataDir::ensure_admin_token`); an empty token refuses every request.
    pub fn new(
        registry: Arc<Registry>,
        transactions: Arc<TxStore>,
        config: Arc<ConfigStore>,
        commands: CommandsHandle,
        events: EventBus,
        metrics: Arc<Metrics>,
        admin_token: String,
    ) -> Self {
        Self {
            registry,
            transactions,
            config,
            commands,
            events,
            metrics,
            token: AdminToken(admin_token.into()),
            limits: ApiLimits::default(),
            shutdown: CancellationToken::new(),
            artifacts: None,
            rollouts: None,
            catalog: Catalog(Arc::new(NoArtifacts)),
            enrolment: None,
        }
    }

    /// The same state serving enrolment, revocation and the CRL from `enrolment`.
    pub fn with_enrolment(mut self, enrolment: Arc<crate::enrolment::Enrolment>) -> Self {
        self.enrolment = Some(enrolment);
        self
    }

    /// The same state serving artifacts from `artifacts`.
    pub fn with_artifacts(mut self, artifacts: Arc<Artifacts>) -> Self {
        self.artifacts = Some(artifacts);
        self
    }

    /// The same state serving rollouts with `rollouts`, checking artifacts in `catalog`.
    pub fn with_rollouts(
        mut self,
        rollouts: RolloutsHandle,
        catalog: Arc<dyn ArtifactCatalog>,
    ) -> Self {
        self.rollouts = Some(rollouts);
        self.catalog = Catalog(catalog);
        self
    }

    /// The same state with other limits.
    pub fn with_limits(mut self, limits: ApiLimits) -> Self {
        self.limits = limits;
        self
    }
}

/// Every route that requires the admin token. The router is built from this table, so the
/// test that walks it covers every protected route.
fn protected_routes() -> Vec<(&'static str, MethodRouter<ApiState>)> {
    vec![
        ("/api/v1/devices", get(devices::list)),
        ("/api/v1/devices/{id}", get(devices::detail)),
        ("/api/v1/devices/{id}/desired", get(devices::desired)),
        ("/api/v1/devices/{id}/groups", put(devices::set_groups)),
        ("/api/v1/devices/{id}/labels", put(devices::set_labels)),
        (
            "/api/v1/commands",
            get(commands::list).post(commands::create),
        ),
        ("/api/v1/commands/{id}", get(commands::detail)),
        ("/api/v1/commands/{id}/cancel", post(commands::cancel)),
        ("/api/v1/commands/{id}/logs", get(commands::logs)),
        (
            "/api/v1/devices/{id}/transactions/summary",
            get(transactions::summary),
        ),
        ("/api/v1/devices/{id}/config", get(config::device_config)),
        ("/api/v1/transactions", get(transactions::list)),
        ("/api/v1/config/layers", get(config::list_layers)),
        (
            "/api/v1/config/fleet",
            get(config::get_fleet)
                .patch(config::patch_fleet)
                .put(config::put_fleet)
                .delete(config::delete_fleet)
                .layer(DefaultBodyLimit::max(config::MAX_BODY_BYTES)),
        ),
        (
            "/api/v1/config/groups/{name}",
            get(config::get_group)
                .patch(config::patch_group)
                .put(config::put_group)
                .delete(config::delete_group)
                .layer(DefaultBodyLimit::max(config::MAX_BODY_BYTES)),
        ),
        (
            "/api/v1/config/devices/{id}",
            get(config::get_device)
                .patch(config::patch_device)
                .put(config::put_device)
                .delete(config::delete_device)
                .layer(DefaultBodyLimit::max(config::MAX_BODY_BYTES)),
        ),
        ("/api/v1/config/history", get(config::history)),
        ("/api/v1/config/diff", get(config::diff)),
        ("/api/v1/config/schema", get(config::schema)),
        (
            "/api/v1/artifacts",
            get(artifacts::list)
                .post(artifacts::upload)
                // The upload streams its body to disk under its own cap.
                .layer(DefaultBodyLimit::disable()),
        ),
        (
            "/api/v1/artifacts/{id}",
            get(artifacts::detail).delete(artifacts::delete),
        ),
        (
            "/api/v1/rollouts",
            get(rollouts::list).post(rollouts::create),
        ),
        ("/api/v1/rollouts/{id}", get(rollouts::detail)),
        ("/api/v1/rollouts/{id}/pause", post(rollouts::pause)),
        ("/api/v1/rollouts/{id}/resume", post(rollouts::resume)),
        ("/api/v1/rollouts/{id}/abort", post(rollouts::abort)),
        ("/api/v1/stream", get(stream::stream)),
        (
            "/api/v1/enrolment-tokens",
            get(enrolment::list_tokens).post(enrolment::create_token),
        ),
        (
            "/api/v1/enrolment-tokens/{id}",
            axum::routing::delete(enrolment::delete_token),
        ),
        ("/api/v1/devices/{id}/revoke", post(enrolment::revoke)),
        (
            "/api/v1/devices/{id}/decommission",
            post(enrolment::decommission),
        ),
        ("/api/v1/pki/crl", get(enrolment::crl)),
        ("/metrics", get(metrics::render)),
    ]
}

/// Routes that answer without a bearer token, besides `/healthz`: enrolment is authorised by
/// the one-time enrolment token in its body.
fn open_routes() -> Vec<(&'static str, MethodRouter<ApiState>)> {
    vec![(
        "/api/v1/enroll",
        post(enrolment::enroll).layer(DefaultBodyLimit::max(ENROLL_BODY_LIMIT)),
    )]
}

/// Largest enrolment request body (a CSR is under 1 KiB).
const ENROLL_BODY_LIMIT: usize = 16 * 1024;

/// The API's router: `/healthz` and [`open_routes`] open, everything else (including unknown routes, which get a
/// JSON 404) behind the bearer token.
pub fn router(state: ApiState) -> Router {
    let mut protected = Router::new();
    for (path, route) in protected_routes() {
        protected = protected.route(path, route);
    }
    let protected = protected
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    let mut open = Router::new().route("/healthz", get(health::healthz));
    for (path, route) in open_routes() {
        open = open.route(path, route);
    }
    open.merge(protected).with_state(state)
}
