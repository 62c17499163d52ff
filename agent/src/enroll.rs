//! `posfleet-agent enroll`: the terminal generates its key here, sends a CSR with a one-time
//! enrolment token to the controller over server-authenticated HTTPS (trusting only the CA
//! file it was given), and writes its identity and an `agent.toml`:
//!
//! ```text
//! OUT/device.key   ECDSA P-256 key (0600), written before the request; never sent
//! OUT/device.crt   the certificate the controller issued
//! OUT/ca.crt       the fleet CA bundle (trust for the broker and the device endpoint)
//! OUT/command.pub  command-verification key(s) to pin
//! OUT/release.pub  trusted release key(s), when the controller has them
//! OUT/agent.toml   (or --config-out) a config pointing at all of the above
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use posfleet_proto::DeviceId;
use posfleet_proto::pki::{DeviceKeyRequest, PkiError, write_public_file, write_secret_file};
use serde::{Deserialize, Serialize};

use posfleet_runtime::tls::{TlsError, provider, root_store_from_pem};

/// Bound on the whole enrolment request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What `enroll` needs.
#[derive(Clone)]
pub struct EnrollOptions {
    /// The controller's admin API, `https://host:port`.
    pub server: String,
    /// Secret: never logged or written.
    pub token: String,
    pub device_id: DeviceId,
    pub serial: String,
    /// The CA that signs the controller's server certificate.
    pub ca_file: PathBuf,
    pub out_dir: PathBuf,
    /// Default `OUT/agent.toml`.
    pub config_out: Option<PathBuf>,
}

impl std::fmt::Debug for EnrollOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollOptions")
            .field("server", &self.server)
            .field("token", &"<redacted>")
            .field("device_id", &self.device_id)
            .field("serial", &self.serial)
            .field("out_dir", &self.out_dir)
            .finish_non_exhaustive()
    }
}

/// Why enrolment failed. Never holds the token or the key.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("--server {0:?}: use https://host:port")]
    Server(String),
    /// The id looks like a card number (never echoed).
    #[error("--device-id: {0}")]
    DeviceId(posfleet_proto::NewDeviceIdError),
    /// The serial holds a card number or characters that are not text (never echoed).
    #[error("--serial: {0}")]
    Serial(posfleet_proto::text::TextProblem),
    #[error("cannot read the CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("cannot reach the controller: {0}")]
    Http(String),
    #[error("the controller refused the enrolment ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the controller's answer is unusable: {0}")]
    Answer(String),
}

#[derive(Serialize)]
struct Request<'a> {
    token: &'a str,
    device_id: &'a str,
    serial: &'a str,
    csr_pem: &'a str,
}

/// The controller's answer (`views::EnrollResponse` on the controller).
#[derive(Deserialize)]
struct Answer {
    device_id: String,
    certificate_pem: String,
    ca_pem: String,
    command_pub_pem: String,
    #[serde(default)]
    release_pub_pem: Option<String>,
    mqtt_url: String,
    /// The device endpoint (renewal), written to the config as `tls.device_url`.
    device_url: String,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub config: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub mqtt_url: String,
}

/// Enrols this terminal (see the module docs).
pub async fn enroll(opts: &EnrollOptions) -> Result<Enrolled, EnrollError> {
    // What this terminal is about to be known by, checked before a key or a request exists:
    // the controller would refuse an id or serial that looks like a card number too.
    DeviceId::new_for_issue(opts.device_id.as_str()).map_err(EnrollError::DeviceId)?;
    posfleet_proto::text::check_operator_text(&opts.serial).map_err(EnrollError::Serial)?;
    let server = opts.server.trim_end_matches('/');
    if !server.starts_with("https://") {
        return Err(EnrollError::Server(opts.server.clone()));
    }
    let ca_pem = std::fs::read(&opts.ca_file).map_err(|source| EnrollError::CaFile {
        path: opts.ca_file.clone(),
        source,
    })?;
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::from)?
        .with_root_certificates(root_store_from_pem(&ca_pem)?)
        .with_no_client_auth();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| EnrollError::Http(e.to_string()))?;

    let out = &opts.out_dir;
    create_dir(out)?;
    let key_path = out.join("device.key");
    // Key generation and file writes are short; this runs once per terminal, at install.
    let request = DeviceKeyRequest::generate(&opts.device_id)?;
    write_secret_file(&key_path, &request.key_pem)?;

    let response = client
        .post(format!("{server}/api/v1/enroll"))
        .json(&Request {
            token: &opts.token,
            device_id: opts.device_id.as_str(),
            serial: &opts.serial,
            csr_pem: &request.csr_pem,
        })
        .send()
        .await
        .map_err(|e| EnrollError::Http(e.without_url().to_string()))?;
    let status = response.status();
    if !status.is_success() {
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let message = body
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("no reason given")
            .to_owned();
        return Err(EnrollError::Refused {
            status: status.as_u16(),
            message,
        });
    }
    let answer: Answer = response
        .json()
        .await
        .map_err(|e| EnrollError::Answer(e.to_string()))?;
    if answer.device_id != opts.device_id.as_str() {
        return Err(EnrollError::Answer(format!(
            "issued for {:?}, asked for {}",
            answer.device_id, opts.device_id
        )));
    }
    let cert = out.join("device.crt");
    let ca = out.join("ca.crt");
    let command = out.join("command.pub");
    write_public_file(&cert, &answer.certificate_pem)?;
    write_public_file(&ca, &answer.ca_pem)?;
    write_public_file(&command, &answer.command_pub_pem)?;
    let release = match &answer.release_pub_pem {
        Some(pem) => {
            let path = out.join("release.pub");
            write_public_file(&path, pem)?;
            Some(path)
        }
        None => None,
    };
    let config = opts
        .config_out
        .clone()
        .unwrap_or_else(|| out.join("agent.toml"));
    let text = config_text(
        (&answer.mqtt_url, &answer.device_url),
        &ca,
        &cert,
        &key_path,
        &command,
        release.as_deref(),
        out,
        &opts.serial,
    );
    write_public_file(&config, &text)?;
    Ok(Enrolled {
        config,
        cert,
        key: key_path,
        mqtt_url: answer.mqtt_url,
    })
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// A TOML string literal (paths and URLs may hold quotes or backslashes).
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

#[allow(clippy::too_many_arguments)]
fn config_text(
    (mqtt_url, device_url): (&str, &str),
    ca: &Path,
    cert: &Path,
    key: &Path,
    command: &Path,
    release: Option<&Path>,
    out: &Path,
    serial: &str,
) -> String {
    let p = |path: &Path| quoted(&path.display().to_string());
    let mut text = format!(
        "# Written by `posfleet-agent enroll`; see deploy/agent/agent.example.toml for every \
         setting.\n\n[broker]\nurl = {}\n\n[tls]\nca = {}\ncert = {}\nkey = {}\ndevice_url = {}\n\n[agent]\n\
         data_dir = {}\n\n[device]\nserial = {}\n\n[local_api]\nsocket = {}\n\n[commands]\n\
         trusted_keys = [{}]\n",
        quoted(mqtt_url),
        p(ca),
        p(cert),
        p(key),
        quoted(device_url),
        p(&out.join("data")),
        quoted(serial),
        p(&out.join("api.sock")),
        p(command),
    );
    if let Some(release) = release {
        text.push_str(&format!(
            "\n[updates]\ntrusted_release_keys = [{}]\n",
            p(release)
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path, id: &str, serial: &str) -> EnrollOptions {
        EnrollOptions {
            // Nothing listens there: a refusal must come before any request.
            server: "https://127.0.0.1:9".into(),
            token: "pfe_000000000000_x".into(),
            device_id: DeviceId::new(id).unwrap(),
            serial: serial.into(),
            ca_file: dir.join("ca.crt"),
            out_dir: dir.join("out"),
            config_out: None,
        }
    }

    #[tokio::test]
    async fn a_card_like_device_id_or_serial_is_refused_before_anything_happens() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), "not read").unwrap();
        for (id, serial, flag) in [
            ("4111-1111-1111-1111", "SN-1", "--device-id"),
            ("4111.1111.1111.1111", "SN-1", "--device-id"),
            ("T-1", "4111-1111-1111-1111", "--serial"),
            ("T-1", "4111a1111b1111c1111", "--serial"),
        ] {
            let err = enroll(&options(dir.path(), id, serial))
                .await
                .expect_err("refused");
            let text = err.to_string();
            assert!(text.starts_with(flag), "{id} {serial}: {text}");
            assert!(!posfleet_proto::pan::contains_pan(&text), "{text}");
            assert!(!dir.path().join("out").exists(), "{text}");
        }
    }
}
