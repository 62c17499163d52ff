//! The admin API as a test (or the benchmark) sees it: HTTPS trusting the fleet CA, bearer
//! token, JSON views from `posfleet_broker::views`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures_util::StreamExt;
use posfleet_broker::views::{
    CommandView, CommandsCreated, ConfigLayerView, DeviceDetail, DeviceList, FleetEvent,
};
use posfleet_proto::pki::parse_pem_certs;
use reqwest::StatusCode;

use crate::scrape::Scrape;

/// Bound on one request (connect, TLS, response).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTPS client trusting the CA certificate(s) in `ca_file`, without connection pooling
/// unless `local` is set: then its connections come from that address (any 127.x.y.z on
/// loopback, to act as many clients) and are kept alive.
pub fn tls_client(
    ca_file: &Path,
    local: Option<std::net::IpAddr>,
    timeout: Duration,
) -> anyhow::Result<reqwest::Client> {
    let pem = std::fs::read(ca_file)
        .with_context(|| format!("cannot read the CA file {}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in parse_pem_certs(&pem)? {
        roots.add(cert)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let builder = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none());
    let builder = match local {
        Some(ip) => builder.local_address(ip),
        None => builder.pool_max_idle_per_host(0),
    };
    builder.build().context("cannot build the HTTP client")
}

/// An admin API client.
#[derive(Debug, Clone)]
pub struct Api {
    /// No connection pooling: the server is killed and restarted under the tests' feet, and a
    /// pooled connection to the dead process would fail the next request for no good reason.
    http: reqwest::Client,
    /// e.g. `https://127.0.0.1:40123` (no trailing slash).
    base: String,
    /// Content of `DATA/admin.token`.
    token: String,
}

impl Api {
    /// A client for `base` trusting the CA certificate(s) in `ca_file`.
    pub fn new(base: &str, ca_file: &Path, token: String) -> anyhow::Result<Self> {
        let http = tls_client(ca_file, None, REQUEST_TIMEOUT)?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET path` with the token; the response whatever its status.
    pub async fn get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        self.http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("GET {url}"))
    }

    /// `GET path` without any token.
    pub async fn get_anonymous(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        self.http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))
    }

    /// `method path` with the token and an optional JSON body; the response whatever its
    /// status.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        request
            .send()
            .await
            .with_context(|| format!("{method} {url}"))
    }

    /// `method path` with the token and `body` sent as is with `content_type` (for requests
    /// that are not JSON, or not valid JSON); the response whatever its status.
    pub async fn send_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        self.http
            .request(method.clone(), &url)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body)
            .send()
            .await
            .with_context(|| format!("{method} {url}"))
    }

    /// `method path` with the token, extra `headers` and a raw body.
    pub async fn send_bytes(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(600))
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        request
            .send()
            .await
            .with_context(|| format!("{method} {url}"))
    }

    /// `POST /api/v1/commands` with `body`; the created commands (error on any non-2xx).
    pub async fn create_commands(
        &self,
        body: &serde_json::Value,
    ) -> anyhow::Result<Vec<CommandView>> {
        let response = self
            .send(reqwest::Method::POST, "/api/v1/commands", Some(body))
            .await?;
        let created: CommandsCreated = json(response).await?;
        Ok(created.commands)
    }

    /// `GET /api/v1/commands/{id}`.
    pub async fn command(&self, id: &str) -> anyhow::Result<CommandView> {
        json(self.get(&format!("/api/v1/commands/{id}")).await?).await
    }

    /// `PATCH /api/v1/config/{layer}` (`fleet`, `groups/G`, `devices/ID`) setting `set`.
    pub async fn config_set(
        &self,
        layer: &str,
        set: serde_json::Value,
    ) -> anyhow::Result<ConfigLayerView> {
        let body = serde_json::json!({ "set": set });
        let response = self
            .send(
                reqwest::Method::PATCH,
                &format!("/api/v1/config/{layer}"),
                Some(&body),
            )
            .await?;
        json(response).await
    }

    /// `GET /healthz` status.
    pub async fn healthz(&self) -> anyhow::Result<StatusCode> {
        Ok(self.get_anonymous("/healthz").await?.status())
    }

    /// `GET /api/v1/devices`.
    pub async fn devices(&self) -> anyhow::Result<DeviceList> {
        json(self.get("/api/v1/devices").await?).await
    }

    /// `GET /api/v1/devices/{id}`; `None` on 404.
    pub async fn device(&self, id: &str) -> anyhow::Result<Option<DeviceDetail>> {
        let response = self.get(&format!("/api/v1/devices/{id}")).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        json(response).await.map(Some)
    }

    /// `GET /metrics`, parsed.
    pub async fn metrics(&self) -> anyhow::Result<Scrape> {
        let response = self.get("/metrics").await?;
        let status = response.status();
        let text = response.text().await.context("reading /metrics")?;
        if !status.is_success() {
            bail!("GET /metrics: {status}: {text}");
        }
        Ok(Scrape::parse(&text))
    }

    /// Opens `GET /api/v1/stream[?device=ID]` and returns a reader of its events.
    pub async fn stream(&self, device: Option<&str>) -> anyhow::Result<EventStream> {
        let path = match device {
            Some(id) => format!("/api/v1/stream?device={id}"),
            None => "/api/v1/stream".to_owned(),
        };
        // The stream is endless: no overall request timeout, only for the response head.
        let url = format!("{}{path}", self.base);
        let response = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.http
                .get(&url)
                .bearer_auth(&self.token)
                .timeout(Duration::from_secs(24 * 3600))
                .send(),
        )
        .await
        .map_err(|_| anyhow!("GET {url}: no response head within {REQUEST_TIMEOUT:?}"))?
        .with_context(|| format!("GET {url}"))?;
        if !response.status().is_success() {
            bail!("GET {url}: {}", response.status());
        }
        Ok(EventStream {
            body: Box::pin(response.bytes_stream()),
            buf: String::new(),
        })
    }
}

type Body =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// Server-sent events of `/api/v1/stream`, decoded as [`FleetEvent`]s.
pub struct EventStream {
    body: Body,
    buf: String,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}

impl EventStream {
    /// The next event, waiting at most `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<FleetEvent> {
        tokio::time::timeout(timeout, self.next_event())
            .await
            .map_err(|_| anyhow!("no stream event within {timeout:?}"))?
    }

    async fn next_event(&mut self) -> anyhow::Result<FleetEvent> {
        loop {
            // An event ends with a blank line; only its `data:` lines matter here.
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let data: Vec<&str> = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                let json = data.join("\n");
                return serde_json::from_str(&json)
                    .with_context(|| format!("stream event is not a FleetEvent: {json}"));
            }
            let chunk = self
                .body
                .next()
                .await
                .ok_or_else(|| anyhow!("the stream ended"))?
                .context("reading the stream")?;
            self.buf
                .push_str(&String::from_utf8_lossy(&chunk).replace("\r\n", "\n"));
        }
    }
}

async fn json<T: serde::de::DeserializeOwned>(response: reqwest::Response) -> anyhow::Result<T> {
    let status = response.status();
    let url = response.url().clone();
    let text = response
        .text()
        .await
        .with_context(|| format!("reading {url}"))?;
    if !status.is_success() {
        bail!("{url}: {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("{url}: unexpected JSON: {text}"))
}
