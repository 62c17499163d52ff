//! Where the simulator's certificates come from (issue 10 item 8).
//!
//! Every terminal's key is generated here and only its CSR leaves the process; a
//! [`CertIssuer`] returns the certificates. The controller records each one before it answers
//! (so a simulated terminal can be revoked like a real one): [`ApiIssuer`] asks the admin API
//! (`POST /api/v1/pki/certificates`, purpose `simulator`, in batches); `posfleet-broker demo`
//! passes an issuer that calls its enrolment service in-process. The simulator never holds the
//! fleet CA's key.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use posfleet_proto::DeviceId;
use serde::{Deserialize, Serialize};

use posfleet_runtime::tls::{provider, root_store_from_pem};

/// Most certificates one request to the controller asks for (its limit).
pub const MAX_ISSUE_BATCH: usize = 256;
/// Bound on one issue request.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(60);

/// One certificate to issue: the terminal's id and the CSR of its fresh key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertRequest {
    pub device_id: String,
    pub csr_pem: String,
}

/// Why certificates could not be issued (never holds a token or key).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct IssueError(pub String);

/// The future of [`CertIssuer::issue`].
pub type IssueFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<String>, IssueError>> + Send + 'a>>;

/// Issues and records certificates for keys the simulator generated.
pub trait CertIssuer: std::fmt::Debug + Send + Sync + 'static {
    /// One certificate (PEM) per request, in order; at most [`MAX_ISSUE_BATCH`] requests.
    fn issue(&self, requests: Vec<CertRequest>) -> IssueFuture<'_>;
}

/// The controller's admin API: `POST /api/v1/pki/certificates` with purpose `simulator`,
/// authenticated with an admin token.
pub struct ApiIssuer {
    url: String,
    client: reqwest::Client,
    /// Secret: never logged.
    token: String,
}

impl std::fmt::Debug for ApiIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiIssuer")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// The parts of a posctl client file (`DATA/posctl.json`, written by the controller) the
/// simulator needs.
#[derive(Deserialize)]
struct ClientFile {
    api_url: String,
    ca_file: PathBuf,
    token_file: PathBuf,
}

#[derive(Serialize)]
struct IssueBody<'a> {
    purpose: &'static str,
    requests: &'a [CertRequest],
}

/// `IssuedCertificates` on the controller (only what the simulator uses).
#[derive(Deserialize)]
struct Issued {
    items: Vec<IssuedItem>,
}

#[derive(Deserialize)]
struct IssuedItem {
    device_id: String,
    certificate_pem: String,
}

impl ApiIssuer {
    /// The API at `api_url` (https), trusting `ca_pem`, with the admin `token`.
    pub fn new(api_url: &str, ca_pem: &[u8], token: String) -> Result<Self, IssueError> {
        let base = api_url.trim_end_matches('/');
        if !base.starts_with("https://") {
            return Err(IssueError(format!(
                "the controller's API URL {api_url:?} must start with https://"
            )));
        }
        let roots = root_store_from_pem(ca_pem).map_err(|e| IssueError(e.to_string()))?;
        let tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| IssueError(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(ISSUE_TIMEOUT)
            .build()
            .map_err(|e| IssueError(e.to_string()))?;
        Ok(Self {
            url: format!("{base}/api/v1/pki/certificates"),
            client,
            token,
        })
    }

    /// From a posctl client file (`DATA/posctl.json`: `api_url`, `ca_file`, `token_file`;
    /// relative paths are relative to the file's directory). Blocks.
    pub fn from_client_file(path: &Path) -> Result<Self, IssueError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| IssueError(format!("cannot read {}: {e}", p.display())))
        };
        let file: ClientFile = serde_json::from_slice(&read(path)?).map_err(|e| {
            IssueError(format!(
                "{} is not a posctl client file (posctl.json): {e}",
                path.display()
            ))
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let ca = read(&dir.join(&file.ca_file))?;
        let token = String::from_utf8(read(&dir.join(&file.token_file))?)
            .map_err(|_| IssueError(format!("{} is not text", file.token_file.display())))?
            .trim()
            .to_owned();
        Self::new(&file.api_url, &ca, token)
    }

    async fn request(&self, requests: Vec<CertRequest>) -> Result<Vec<String>, IssueError> {
        let response = self
            .client
            .post(&self.url)
            .bearer_auth(&self.token)
            .json(&IssueBody {
                purpose: "simulator",
                requests: &requests,
            })
            .send()
            .await
            .map_err(|e| IssueError(format!("cannot reach {}: {e}", self.url)))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| IssueError(format!("reading the answer of {}: {e}", self.url)))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(2048)]).into_owned();
            return Err(IssueError(format!(
                "the controller refused to issue certificates ({status}): {text}"
            )));
        }
        let issued: Issued = serde_json::from_slice(&body)
            .map_err(|e| IssueError(format!("the controller's answer is unusable: {e}")))?;
        if issued.items.len() != requests.len()
            || issued
                .items
                .iter()
                .zip(&requests)
                .any(|(item, req)| item.device_id != req.device_id)
        {
            return Err(IssueError(
                "the controller answered with other certificates than asked for".into(),
            ));
        }
        Ok(issued
            .items
            .into_iter()
            .map(|item| item.certificate_pem)
            .collect())
    }
}

impl CertIssuer for ApiIssuer {
    fn issue(&self, requests: Vec<CertRequest>) -> IssueFuture<'_> {
        Box::pin(self.request(requests))
    }
}

/// Signs with a fleet CA in memory and records nothing: only for tests whose broker has no
/// controller behind it (their certificates never reach a controller's data).
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct UnrecordedCa(pub posfleet_proto::pki::Ca);

#[cfg(test)]
impl CertIssuer for UnrecordedCa {
    fn issue(&self, requests: Vec<CertRequest>) -> IssueFuture<'_> {
        Box::pin(async move {
            requests
                .iter()
                .map(|r| {
                    let id = DeviceId::new(r.device_id.as_str())
                        .map_err(|e| IssueError(e.to_string()))?;
                    let csr = posfleet_proto::pki::verify_csr(&r.csr_pem)
                        .map_err(|e| IssueError(e.to_string()))?;
                    self.0
                        .sign_device_csr(&id, &csr)
                        .map_err(|e| IssueError(e.to_string()))
                })
                .collect()
        })
    }
}

/// Keys and CSRs for `ids` (blocking: key generation).
pub fn key_requests(
    ids: &[DeviceId],
) -> Result<(Vec<String>, Vec<CertRequest>), posfleet_proto::pki::PkiError> {
    let mut keys = Vec::with_capacity(ids.len());
    let mut requests = Vec::with_capacity(ids.len());
    for id in ids {
        let request = posfleet_proto::pki::DeviceKeyRequest::generate(id)?;
        requests.push(CertRequest {
            device_id: id.to_string(),
            csr_pem: request.csr_pem,
        });
        keys.push(request.key_pem);
    }
    Ok((keys, requests))
}
