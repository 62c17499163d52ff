//! The HTTPS admin API (axum over our own tokio-rustls accept loop).
//!
//! # Layout
//!
//! - `mod.rs`: [`ApiState`], [`ApiLimits`], [`router`] and the route table.
//! - `server.rs`: [`serve`] (accept loop: connection admission (`crate::admission`), a task
//!   per connection: TLS handshake under the admission deadlines, hyper HTTP/1.1 with header
//!   and body deadlines, graceful stop) and [`server_tls_config`]; `body.rs`: the minimum
//!   request body rate.
//! - `auth.rs`: authentication (sessions, API tokens, the bootstrap token) of every route
//!   except the open ones, and the per-route role check (ADR 0009).
//! - `accounts.rs`: `/api/v1/auth/...` (login, logout, password, MFA enrolment, whoami);
//!   `users.rs`: `/api/v1/users` and `/api/v1/tokens`.
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
//! - `audit.rs`: the audit middleware (every non-GET request that passed the role check: a
//!   `requested` entry before the handler, refused with 503 if it cannot be stored, and the
//!   outcome after), refusals counted for aggregated entries, and
//!   `GET /api/v1/audit[/verify|/export]`.
//! - `approvals.rs`: two-person approval (`GET /api/v1/approvals[/{id}]`,
//!   `POST .../approve|reject` by another account's MFA session; `POST /api/v1/commands` and
//!   `POST /api/v1/devices/{id}/lost` answer 202 `{approval}` for a wipe or a lock beyond the
//!   requester's window).
//! - `custody.rs`: `GET|POST /api/v1/devices/{id}/custody`, `POST .../lost`, `POST .../found`.
//! - `tests/`: tests against a real TLS server on 127.0.0.1:0 with reqwest.

mod accounts;
mod approvals;
mod artifacts;
mod audit;
pub(crate) mod auth;
mod body;
mod commands;
mod config;
mod custody;
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
mod users;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{MethodRouter, get, post, put};
use tokio_util::sync::CancellationToken;

pub use accounts::{EnrolResponse, LoginResponse, WhoAmI};
pub(crate) use auth::Actor;
pub(crate) use devices::parse_label;
pub use error::{ApiError, ServerTlsError};
pub use server::{PeerAddr, PeerCertificate, Site, serve, serve_site, server_tls_config};
pub(crate) use transactions::parse_time;
pub use users::{CreatedToken, InitialPassword, TokenList, UserList};

pub use artifacts::{KEY_ID_HEADER, SHA256_HEADER, SIGNATURE_HEADER};

use crate::accounts::{Accounts, Role};
use crate::admission::AdmissionLimits;
use crate::approvals::{ApprovalPolicy, ApprovalStore};
use crate::artifacts::ArtifactCatalog;
use crate::artifacts::Artifacts;
use crate::audit::{AuditLog, AuditSink, NoAudit};
use crate::commands::CommandsHandle;
use crate::controller::Clock;
use crate::custody::CustodyLedger;
use crate::events::EventBus;
use crate::fleetconfig::ConfigStore;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::rollouts::{NoArtifacts, RolloutsHandle};
use crate::txstore::TxStore;

/// Resource limits of an HTTPS listener (the admin API; the device endpoint uses the HTTP
/// ones).
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// Who gets a connection, and how long a silent or slow client keeps it
    /// (docs/decisions/0012-connection-admission.md).
    pub admission: AdmissionLimits,
    /// A request's headers must be complete this long after the connection became ready
    /// (TLS done) or idle (previous response sent): the header deadline and the keep-alive
    /// idle timeout in one.
    pub header_read_timeout: Duration,
    /// A request body must arrive at this many bytes per second at least, averaged from its
    /// first read, once `body_grace` has passed; a slower one fails and the connection closes.
    pub body_min_rate: u64,
    /// How long a request body may lag behind `body_min_rate`.
    pub body_grace: Duration,
    /// At shutdown, how long open requests (and streams) may take to finish.
    pub shutdown_grace: Duration,
    /// Interval of keep-alive comments on the live stream.
    pub sse_keep_alive: Duration,
    /// Live streams one principal may hold at once; 429 beyond.
    pub max_streams_per_principal: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            admission: AdmissionLimits::api(),
            header_read_timeout: Duration::from_secs(10),
            body_min_rate: 1024,
            body_grace: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            sse_keep_alive: Duration::from_secs(15),
            max_streams_per_principal: 8,
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
    /// The bootstrap token (used directly only when there is no account service).
    pub(crate) token: AdminToken,
    /// Operator accounts, sessions and API tokens (ADR 0009); `None`: only the bootstrap
    /// token is accepted and the account routes answer 503.
    pub(crate) accounts: Option<Arc<Accounts>>,
    /// Connection and timing limits.
    pub(crate) limits: ApiLimits,
    /// Live streams open per principal.
    pub(crate) streams: stream::StreamSlots,
    /// Cancelled when the server stops, so that endless responses (streams) end.
    pub(crate) shutdown: CancellationToken,
    /// Signed software artifacts; `None` answers 503 on `/api/v1/artifacts` (servers built
    /// without a data directory, e.g. some tests).
    pub(crate) artifacts: Option<Arc<Artifacts>>,
    /// The rollout engine (`None`: the rollout routes answer 503).
    pub(crate) rollouts: Option<RolloutsHandle>,
    /// Artifacts rollouts may use.
    pub(crate) catalog: Catalog,
    /// Where every login, refusal, change and command is recorded (`audit::record`);
    /// [`NoAudit`] unless set.
    pub(crate) audit: audit::Audit,
    /// The audit log the audit routes read (`None`: they answer 503).
    pub(crate) audit_log: Option<Arc<AuditLog>>,
    /// Pending two-person approvals (`None`: requests that need one answer 503).
    pub(crate) approvals: Option<Arc<ApprovalStore>>,
    /// The custody ledger (`None`: the custody, lost and found routes answer 503).
    pub(crate) custody: Option<Arc<CustodyLedger>>,
    /// Which command requests need a second principal.
    pub(crate) approval_policy: ApprovalPolicy,
    /// Wall clock (Unix ms) of approvals and custody entries; tests move it.
    pub(crate) clock: ClockFn,
    /// Enrolment, revocation and the CRL (`None`: those routes answer 503).
    pub(crate) enrolment: Option<Arc<crate::enrolment::Enrolment>>,
}

/// The wall clock (a closure without `Debug`).
#[derive(Clone)]
pub(crate) struct ClockFn(pub(crate) Clock);

impl std::fmt::Debug for ClockFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

impl std::ops::Deref for ClockFn {
    type Target = Clock;
    fn deref(&self) -> &Clock {
        &self.0
    }
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
            accounts: None,
            limits: ApiLimits::default(),
            streams: stream::StreamSlots::default(),
            shutdown: CancellationToken::new(),
            artifacts: None,
            rollouts: None,
            catalog: Catalog(Arc::new(NoArtifacts)),
            audit: audit::Audit::new(Arc::new(NoAudit), crate::controller::system_clock()),
            audit_log: None,
            approvals: None,
            custody: None,
            approval_policy: ApprovalPolicy::default(),
            clock: ClockFn(crate::controller::system_clock()),
            enrolment: None,
        }
    }

    /// The same state keeping two-person approvals in `store` under `policy`.
    pub fn with_approvals(mut self, store: Arc<ApprovalStore>, policy: ApprovalPolicy) -> Self {
        self.approvals = Some(store);
        self.approval_policy = policy;
        self
    }

    /// The same state keeping the custody ledger in `ledger`.
    pub fn with_custody(mut self, ledger: Arc<CustodyLedger>) -> Self {
        self.custody = Some(ledger);
        self
    }

    /// The same state with another approval policy (e.g. [`ApprovalPolicy::off`]).
    pub fn with_approval_policy(mut self, policy: ApprovalPolicy) -> Self {
        self.approval_policy = policy;
        self
    }

    /// The same state with another wall clock.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.audit = audit::Audit::new(Arc::clone(&self.audit.sink), clock.clone());
        self.clock = ClockFn(clock);
        self
    }

    /// The same state recording to `sink` (without the audit read routes). Spawn the flusher
    /// of its refusal counts ([`ApiState::refusals`]) once the state is complete.
    pub fn with_audit(mut self, sink: Arc<dyn AuditSink>) -> Self {
        self.audit = audit::Audit::new(sink, self.clock.0.clone());
        self
    }

    /// The same state recording to, and serving the audit routes from, `log`.
    pub fn with_audit_log(mut self, log: Arc<AuditLog>) -> Self {
        self.audit = audit::Audit::new(log.clone(), self.clock.0.clone());
        self.audit_log = Some(log);
        self
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

    /// The same state authenticating through `accounts` (sessions, API tokens, and the
    /// bootstrap token until it is revoked).
    pub fn with_accounts(mut self, accounts: Arc<Accounts>) -> Self {
        self.accounts = Some(accounts);
        self
    }

    /// The same state with other limits.
    pub fn with_limits(mut self, limits: ApiLimits) -> Self {
        self.limits = limits;
        self
    }
}

/// One route of the table: its path, the least role for reads (GET, HEAD) and for every other
/// method, and whether a restricted session (password change or MFA enrolment due) may call it.
pub(crate) struct Route {
    pub(crate) path: &'static str,
    pub(crate) read: Role,
    pub(crate) write: Role,
    pub(crate) restricted_ok: bool,
    pub(crate) methods: MethodRouter<ApiState>,
}

fn route(path: &'static str, read: Role, write: Role, methods: MethodRouter<ApiState>) -> Route {
    Route {
        path,
        read,
        write,
        restricted_ok: false,
        methods,
    }
}

/// A self-service route of any authenticated principal, restricted sessions included.
fn self_service(path: &'static str, methods: MethodRouter<ApiState>) -> Route {
    Route {
        restricted_ok: true,
        ..route(path, Role::Viewer, Role::Viewer, methods)
    }
}

/// Routes that answer without authentication. Everything else is in [`protected_routes`].
fn open_routes() -> Vec<(&'static str, MethodRouter<ApiState>)> {
    vec![
        ("/healthz", get(health::healthz)),
        (
            "/api/v1/auth/login",
            post(accounts::login).layer(DefaultBodyLimit::max(accounts::MAX_BODY_BYTES)),
        ),
        // Authorised by the one-time enrolment token in its body.
        (
            "/api/v1/enroll",
            post(enrolment::enroll).layer(DefaultBodyLimit::max(ENROLL_BODY_LIMIT)),
        ),
    ]
}

/// Every route that requires authentication, with the role it requires (ADR 0009). The
/// router is built from this table, so the tests that walk it cover every protected route.
fn protected_routes() -> Vec<Route> {
    use Role::{Admin, Operator, Viewer};
    vec![
        route("/api/v1/devices", Viewer, Operator, get(devices::list)),
        route(
            "/api/v1/devices/{id}",
            Viewer,
            Operator,
            get(devices::detail),
        ),
        route(
            "/api/v1/devices/{id}/desired",
            Viewer,
            Operator,
            get(devices::desired),
        ),
        route(
            "/api/v1/devices/{id}/groups",
            Viewer,
            Operator,
            put(devices::set_groups),
        ),
        route(
            "/api/v1/devices/{id}/labels",
            Viewer,
            Operator,
            put(devices::set_labels),
        ),
        // Wipe additionally needs admin (checked in the handler).
        route(
            "/api/v1/commands",
            Viewer,
            Operator,
            get(commands::list).post(commands::create),
        ),
        route(
            "/api/v1/commands/{id}",
            Viewer,
            Operator,
            get(commands::detail),
        ),
        route(
            "/api/v1/commands/{id}/cancel",
            Viewer,
            Operator,
            post(commands::cancel),
        ),
        // Terminal logs and transactions: need-to-know (PCI DSS 7.2), operators and up.
        route(
            "/api/v1/commands/{id}/logs",
            Operator,
            Operator,
            get(commands::logs),
        ),
        route(
            "/api/v1/devices/{id}/transactions/summary",
            Operator,
            Operator,
            get(transactions::summary),
        ),
        route(
            "/api/v1/devices/{id}/config",
            Viewer,
            Operator,
            get(config::device_config),
        ),
        route(
            "/api/v1/transactions",
            Operator,
            Operator,
            get(transactions::list),
        ),
        route(
            "/api/v1/config/layers",
            Viewer,
            Operator,
            get(config::list_layers),
        ),
        route(
            "/api/v1/config/fleet",
            Viewer,
            Operator,
            get(config::get_fleet)
                .patch(config::patch_fleet)
                .put(config::put_fleet)
                .delete(config::delete_fleet)
                .layer(DefaultBodyLimit::max(config::MAX_BODY_BYTES)),
        ),
        route(
            "/api/v1/config/groups/{name}",
            Viewer,
            Operator,
            get(config::get_group)
                .patch(config::patch_group)
                .put(config::put_group)
                .delete(config::delete_group)
                .layer(DefaultBodyLimit::max(config::MAX_BODY_BYTES)),
        ),
        route(
            "/api/v1/config/devices/{id}",
            Viewer,
            Operator,
            get(config::get_device)
                .patch(config::patch_device)
                .put(config::put_device)
                .delete(config::delete_device)
                .layer(DefaultBodyLimit::max(config::MAX_BODY_BYTES)),
        ),
        route(
            "/api/v1/config/history",
            Viewer,
            Operator,
            get(config::history),
        ),
        route("/api/v1/config/diff", Viewer, Operator, get(config::diff)),
        route(
            "/api/v1/config/schema",
            Viewer,
            Operator,
            get(config::schema),
        ),
        route(
            "/api/v1/artifacts",
            Viewer,
            Admin,
            get(artifacts::list)
                .post(artifacts::upload)
                // The upload streams its body to disk under its own cap.
                .layer(DefaultBodyLimit::disable()),
        ),
        route(
            "/api/v1/artifacts/{id}",
            Viewer,
            Admin,
            get(artifacts::detail).delete(artifacts::delete),
        ),
        route(
            "/api/v1/rollouts",
            Viewer,
            Admin,
            get(rollouts::list).post(rollouts::create),
        ),
        route(
            "/api/v1/rollouts/{id}",
            Viewer,
            Admin,
            get(rollouts::detail),
        ),
        route(
            "/api/v1/rollouts/{id}/pause",
            Viewer,
            Admin,
            post(rollouts::pause),
        ),
        route(
            "/api/v1/rollouts/{id}/resume",
            Viewer,
            Admin,
            post(rollouts::resume),
        ),
        route(
            "/api/v1/rollouts/{id}/abort",
            Viewer,
            Admin,
            post(rollouts::abort),
        ),
        route("/api/v1/stream", Viewer, Operator, get(stream::stream)),
        route("/metrics", Viewer, Operator, get(metrics::render)),
        self_service("/api/v1/auth/whoami", get(accounts::whoami)),
        self_service("/api/v1/auth/logout", post(accounts::logout)),
        self_service(
            "/api/v1/auth/password",
            post(accounts::change_password).layer(DefaultBodyLimit::max(accounts::MAX_BODY_BYTES)),
        ),
        self_service("/api/v1/auth/mfa/enrol", post(accounts::mfa_enrol)),
        self_service(
            "/api/v1/auth/mfa/confirm",
            post(accounts::mfa_confirm).layer(DefaultBodyLimit::max(accounts::MAX_BODY_BYTES)),
        ),
        route(
            "/api/v1/users",
            Admin,
            Admin,
            get(users::list_users).post(users::create_user),
        ),
        route(
            "/api/v1/users/{name}",
            Admin,
            Admin,
            axum::routing::delete(users::delete_user),
        ),
        route(
            "/api/v1/users/{name}/reset",
            Admin,
            Admin,
            post(users::reset_user),
        ),
        route(
            "/api/v1/users/{name}/disable",
            Admin,
            Admin,
            post(users::disable_user),
        ),
        route(
            "/api/v1/users/{name}/enable",
            Admin,
            Admin,
            post(users::enable_user),
        ),
        // Operators manage their own tokens; the role of a token is at most its creator's.
        route(
            "/api/v1/tokens",
            Operator,
            Operator,
            get(users::list_tokens).post(users::create_token),
        ),
        route(
            "/api/v1/tokens/{name}",
            Operator,
            Operator,
            axum::routing::delete(users::revoke_token),
        ),
        route(
            "/api/v1/devices/{id}/custody",
            Viewer,
            Operator,
            get(custody::history).post(custody::record),
        ),
        route(
            "/api/v1/devices/{id}/lost",
            Viewer,
            Operator,
            post(custody::lost),
        ),
        route(
            "/api/v1/devices/{id}/found",
            Viewer,
            Operator,
            post(custody::found),
        ),
        // Approving is an admin's second pair of eyes; listing is open to every role.
        route("/api/v1/approvals", Viewer, Admin, get(approvals::list)),
        route(
            "/api/v1/approvals/{id}",
            Viewer,
            Admin,
            get(approvals::detail),
        ),
        route(
            "/api/v1/approvals/{id}/approve",
            Viewer,
            Admin,
            post(approvals::approve),
        ),
        route(
            "/api/v1/approvals/{id}/reject",
            Viewer,
            Admin,
            post(approvals::reject),
        ),
        // The audit log: admins (PCI DSS 10.3.1: read access limited to a need to know).
        route("/api/v1/audit", Admin, Admin, get(audit::list)),
        route(
            "/api/v1/audit/verify",
            Admin,
            Admin,
            get(audit::verify)
                .post(audit::verify_anchored)
                .layer(DefaultBodyLimit::max(audit::ANCHOR_BODY_LIMIT)),
        ),
        route("/api/v1/audit/anchor", Admin, Admin, get(audit::anchor)),
        route("/api/v1/audit/export", Admin, Admin, get(audit::export)),
        // Enrolment tokens, revocation and decommission: admin. The CRL is public data.
        route(
            "/api/v1/enrolment-tokens",
            Admin,
            Admin,
            get(enrolment::list_tokens).post(enrolment::create_token),
        ),
        route(
            "/api/v1/enrolment-tokens/{id}",
            Admin,
            Admin,
            axum::routing::delete(enrolment::delete_token),
        ),
        route(
            "/api/v1/devices/{id}/revoke",
            Viewer,
            Admin,
            post(enrolment::revoke),
        ),
        route(
            "/api/v1/devices/{id}/decommission",
            Viewer,
            Admin,
            post(enrolment::decommission),
        ),
        route("/api/v1/pki/crl", Viewer, Admin, get(enrolment::crl)),
        // Every certificate the fleet CA issues is recorded (issue 10 item 8).
        route(
            "/api/v1/pki/certificates",
            Admin,
            Admin,
            post(enrolment::issue).layer(DefaultBodyLimit::max(enrolment::ISSUE_BODY_LIMIT)),
        ),
        route(
            "/api/v1/devices/{id}/certificates",
            Admin,
            Admin,
            get(enrolment::certificates),
        ),
    ]
}

/// Largest enrolment request body (a CSR is under 1 KiB).
const ENROLL_BODY_LIMIT: usize = 16 * 1024;

/// The API's router: the open routes, and everything else (including unknown routes, which
/// get a JSON 404) behind authentication and each route's role check.
pub fn router(state: ApiState) -> Router {
    let mut protected = Router::new();
    for r in protected_routes() {
        let need = auth::RouteAuth {
            state: state.clone(),
            read: r.read,
            write: r.write,
            restricted_ok: r.restricted_ok,
        };
        // The audit middleware inside the role check (a refusal by role is not a request to
        // record, but a counted refusal: `audit` module docs), on matched routes only (the
        // action and target come from the route).
        protected = protected.route(
            r.path,
            r.methods
                .layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    audit::record,
                ))
                .layer(axum::middleware::from_fn_with_state(need, auth::authorize)),
        );
    }
    let protected = protected
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    let mut open = Router::new();
    for (path, methods) in open_routes() {
        open = open.route(path, methods);
    }
    open.merge(protected).with_state(state)
}
