//! The two calls of a renewal on the controller's device endpoint, over mutual TLS with the
//! identity read from files at the moment of the call.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::RenewError;
use posfleet_runtime::tls::client_config_from_files;

/// Bound on each request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Serialize)]
struct RenewBody<'a> {
    csr_pem: &'a str,
}

/// `views::RenewResponse` on the controller.
#[derive(Debug, Deserialize)]
pub struct Renewed {
    pub certificate_pem: String,
    /// Serial of the new certificate (hex).
    pub serial: String,
}

/// `views::RenewConfirmed` on the controller.
#[derive(Debug, Deserialize)]
pub struct Confirmed {
    pub revoked_serial: String,
}

/// An HTTPS client presenting the pair in `cert`/`key`, trusting `ca`. Blocking (reads files).
pub fn device_client(ca: &Path, cert: &Path, key: &Path) -> Result<reqwest::Client, RenewError> {
    let tls = client_config_from_files(ca, cert, key)?;
    reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| RenewError::Http(e.to_string()))
}

/// `POST {device_url}/device/v1/renew`.
pub async fn renew(
    client: &reqwest::Client,
    device_url: &str,
    csr_pem: &str,
) -> Result<Renewed, RenewError> {
    let response = client
        .post(format!("{device_url}/device/v1/renew"))
        .json(&RenewBody { csr_pem })
        .send()
        .await
        .map_err(|e| RenewError::Http(e.without_url().to_string()))?;
    answer(response).await
}

/// `POST {device_url}/device/v1/renew/confirm` (with the new identity).
pub async fn confirm(client: &reqwest::Client, device_url: &str) -> Result<Confirmed, RenewError> {
    let response = client
        .post(format!("{device_url}/device/v1/renew/confirm"))
        .send()
        .await
        .map_err(|e| RenewError::Http(e.without_url().to_string()))?;
    answer(response).await
}

async fn answer<T: serde::de::DeserializeOwned>(
    response: reqwest::Response,
) -> Result<T, RenewError> {
    let status = response.status();
    if !status.is_success() {
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let message = body
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("no reason given")
            .to_owned();
        return Err(RenewError::Refused {
            status: status.as_u16(),
            message,
        });
    }
    response
        .json()
        .await
        .map_err(|e| RenewError::Answer(e.to_string()))
}
