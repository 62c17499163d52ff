//! `fleet-bench logins`: what a refused login costs, per reason, and what a login flood does to
//! a real broker (issue 10, items 4 and 5).
//!
//! 1. `pf-broker demo --terminals N`; accounts through the API: `vic` (viewer), `uma`
//!    (operator with MFA), `dis` (disabled), `lok` (to be locked out).
//! 2. **Per-path latency**: from each of `samples` source addresses (127.0.4.x), `lok` is
//!    locked out from there (10 wrong passwords, not timed), then one login per path is timed:
//!    unknown user, wrong password, locked out, disabled, TOTP missing, TOTP wrong, and a
//!    success. Every refusal should cost the same (one argon2id verification each).
//! 3. **Flood**: `flood` concurrent logins from 8 addresses (127.0.5.x) for `flood_for`, while
//!    an authenticated `GET /api/v1/devices` is timed every 100 ms: its latency, the broker's
//!    VmRSS growth, and how the flood was answered (401 / 429 / 503).

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use posfleet_broker::accounts::totp;
use posfleet_broker::api::{EnrolResponse, InitialPassword, LoginResponse};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::api::tls_client;
use crate::bins::Binaries;
use crate::broker::{Broker, BrokerOptions};
use crate::cmdbench::Latencies;
use crate::host::{Machine, rss_bytes};

const PASSWORD: &str = "correct horse 1";
const PATHS: [&str; 7] = [
    "unknown user",
    "wrong password",
    "locked out",
    "disabled",
    "TOTP missing",
    "TOTP wrong",
    "accepted",
];

/// Parameters of `fleet-bench logins`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoginBench {
    /// Source addresses to sample from (one timed login per path each; 1..=200).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub samples: u32,
    /// Simulated terminals in the broker process.
    #[arg(long, default_value_t = 100)]
    pub terminals: usize,
    /// Concurrent logins of the flood (spread over 8 addresses).
    #[arg(long, default_value_t = 128)]
    pub flood: usize,
    /// How long the flood lasts.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = posfleet_runtime::value::parse_duration)]
    pub flood_for: Duration,
}

/// Everything `fleet-bench logins` measured.
#[derive(Debug, Clone)]
pub struct LoginReport {
    pub params: LoginBench,
    pub machine: Machine,
    /// Per path (in [`PATHS`] order).
    pub paths: Vec<(&'static str, Latencies)>,
    pub api_during_flood: Latencies,
    pub api_failures: usize,
    pub rss_before: u64,
    pub rss_peak: u64,
    /// Flood answers: 401, 429, 503, other, transport errors.
    pub flood: [usize; 5],
}

impl fmt::Display for LoginReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "fleet-bench logins on {}", self.machine)?;
        writeln!(
            f,
            "login latency by path ({} source addresses):",
            self.params.samples
        )?;
        for (path, lat) in &self.paths {
            writeln!(f, "  {path:<15} {lat}")?;
        }
        let mib = |b: u64| b / (1024 * 1024);
        writeln!(
            f,
            "flood of {} concurrent logins for {:?} ({} terminals online): 401 {}, 429 {}, 503 {}, other {}, errors {}",
            self.params.flood,
            self.params.flood_for,
            self.params.terminals,
            self.flood[0],
            self.flood[1],
            self.flood[2],
            self.flood[3],
            self.flood[4]
        )?;
        writeln!(
            f,
            "  broker VmRSS {} MiB -> peak {} MiB (+{} MiB)",
            mib(self.rss_before),
            mib(self.rss_peak),
            mib(self.rss_peak.saturating_sub(self.rss_before))
        )?;
        write!(
            f,
            "  GET /api/v1/devices during the flood: {} ({} failed)",
            self.api_during_flood, self.api_failures
        )
    }
}

struct Site {
    base: String,
    ca: std::path::PathBuf,
}

impl Site {
    fn client(&self, ip: Option<IpAddr>) -> anyhow::Result<reqwest::Client> {
        tls_client(&self.ca, ip, Duration::from_secs(30))
    }

    async fn login(
        &self,
        client: &reqwest::Client,
        user: &str,
        password: &str,
        code: Option<&str>,
    ) -> anyhow::Result<reqwest::StatusCode> {
        let mut body = json!({"user": user, "password": password});
        if let Some(code) = code {
            body["totp"] = code.into();
        }
        Ok(client
            .post(format!("{}/api/v1/auth/login", self.base))
            .json(&body)
            .send()
            .await?
            .status())
    }

    async fn session(
        &self,
        client: &reqwest::Client,
        user: &str,
        pw: &str,
    ) -> anyhow::Result<String> {
        let r = client
            .post(format!("{}/api/v1/auth/login", self.base))
            .json(&json!({"user": user, "password": pw}))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("login {user}: {}", r.status());
        }
        Ok(r.json::<LoginResponse>().await?.token)
    }

    async fn post(
        &self,
        client: &reqwest::Client,
        token: &str,
        path: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        let r = client
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("POST {path}: {}", r.status());
        }
        Ok(r.json().await.unwrap_or(Value::Null))
    }

    /// Creates `name` with the bootstrap token and sets its password to [`PASSWORD`].
    async fn account(&self, bootstrap: &str, name: &str, role: &str) -> anyhow::Result<()> {
        let client = self.client(None)?;
        let created: InitialPassword = serde_json::from_value(
            self.post(
                &client,
                bootstrap,
                "/api/v1/users",
                json!({"name": name, "role": role}),
            )
            .await?,
        )?;
        let first = self
            .session(&client, name, &created.initial_password)
            .await?;
        let body = json!({"old": created.initial_password, "new": PASSWORD});
        self.post(&client, &first, "/api/v1/auth/password", body)
            .await?;
        Ok(())
    }
}

/// Runs the benchmark (module docs).
pub async fn run_logins(
    bins: &Binaries,
    params: LoginBench,
    progress: impl Fn(&str),
) -> anyhow::Result<LoginReport> {
    let broker = Broker::start(
        bins,
        BrokerOptions {
            demo_terminals: Some(params.terminals),
            log_filter: "warn".into(),
            ..BrokerOptions::default()
        },
    )
    .await?;
    let token = std::fs::read_to_string(broker.data_dir().join("admin.token"))?
        .trim()
        .to_owned();
    let site = Site {
        base: broker.api().base().to_owned(),
        ca: broker.pki().ca_cert(),
    };
    progress("creating accounts");
    for (name, role) in [
        ("vic", "viewer"),
        ("uma", "operator"),
        ("dis", "viewer"),
        ("lok", "viewer"),
    ] {
        site.account(&token, name, role).await?;
    }
    let admin = site.client(None)?;
    site.post(&admin, &token, "/api/v1/users/dis/disable", json!({}))
        .await?;
    let uma = site.session(&admin, "uma", PASSWORD).await?;
    let enrol: EnrolResponse = serde_json::from_value(
        site.post(&admin, &uma, "/api/v1/auth/mfa/enrol", json!({}))
            .await?,
    )?;
    let secret = totp::base32_decode(&enrol.secret).context("the enrolment secret")?;
    let code = totp::code_text(&secret, posfleet_proto::now_ms()).context("a TOTP code")?;
    site.post(
        &admin,
        &uma,
        "/api/v1/auth/mfa/confirm",
        json!({"code": code}),
    )
    .await?;

    progress("timing logins by path");
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); PATHS.len()];
    for i in 0..params.samples {
        let ip: IpAddr = format!("127.0.4.{}", i + 1).parse()?;
        let client = site.client(Some(ip))?;
        for _ in 0..10 {
            site.login(&client, "lok", "wrong password 1", None).await?;
        }
        let now_code = totp::code_text(&secret, posfleet_proto::now_ms()).context("a code")?;
        let wrong = format!("{:06}", (now_code.parse::<u32>()? + 1) % 1_000_000);
        let attempts: [(&str, &str, Option<&str>); 7] = [
            ("nobody", PASSWORD, None),
            ("vic", "wrong password 1", None),
            ("lok", PASSWORD, None),
            ("dis", PASSWORD, None),
            ("uma", PASSWORD, None),
            ("uma", PASSWORD, Some(&wrong)),
            ("vic", PASSWORD, None),
        ];
        for (n, (user, pw, code)) in attempts.into_iter().enumerate() {
            let started = Instant::now();
            let status = site.login(&client, user, pw, code).await?;
            samples[n].push(started.elapsed());
            let expected = if n == 6 { 200 } else { 401 };
            if status.as_u16() != expected {
                bail!("{} from {ip}: {status}, expected {expected}", PATHS[n]);
            }
        }
    }
    let paths = PATHS
        .iter()
        .zip(samples)
        .map(|(p, s)| (*p, Latencies::new(s)))
        .collect();

    progress("flooding");
    let pid = broker.process()?.pid();
    let rss_before = rss_bytes(pid)?;
    let peak = Arc::new(AtomicU64::new(rss_before));
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicUsize; 5]> = Arc::new(Default::default());
    let mut workers = Vec::new();
    for w in 0..params.flood {
        let ip: IpAddr = format!("127.0.5.{}", w % 8 + 1).parse()?;
        let client = site.client(Some(ip))?;
        let url = format!("{}/api/v1/auth/login", site.base);
        let (stop, counts) = (stop.clone(), counts.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let body =
                    json!({"user": format!("ghost-{w}-{}", n % 5), "password": "x1234567890y"});
                let slot = match client.post(&url).json(&body).send().await {
                    Ok(r) => match r.status().as_u16() {
                        401 => 0,
                        429 => 1,
                        503 => 2,
                        _ => 3,
                    },
                    Err(_) => 4,
                };
                counts[slot].fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let api = broker.api().clone();
    let mut api_samples = Vec::new();
    let mut api_failures = 0;
    let end = Instant::now() + params.flood_for;
    while Instant::now() < end {
        if let Ok(rss) = rss_bytes(pid) {
            peak.fetch_max(rss, Ordering::SeqCst);
        }
        let started = Instant::now();
        match api.get("/api/v1/devices").await {
            Ok(r) if r.status().is_success() => api_samples.push(started.elapsed()),
            _ => api_failures += 1,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.await;
    }
    let flood = std::array::from_fn(|i| counts[i].load(Ordering::Relaxed));
    Ok(LoginReport {
        params,
        machine: Machine::describe(),
        paths,
        api_during_flood: Latencies::new(api_samples),
        api_failures,
        rss_before,
        rss_peak: peak.load(Ordering::SeqCst),
        flood,
    })
}
