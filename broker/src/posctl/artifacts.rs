//! `posctl artifact sign|upload|list|show|delete` (ADR 0008).
//!
//! `sign` is local (the release key never goes to the controller): it hashes the file in
//! chunks and writes `FILE.sig`, JSON `{"key_id", "sha256" (hex), "signature" (base64)}`.
//! `upload` streams the file to `POST /api/v1/artifacts` with the signature in headers; the
//! file is never read into memory whole.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use posfleet_proto::now_ms;
use posfleet_proto::pki::write_public_file;
use posfleet_proto::signing::CommandKey;
use reqwest::Method;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::io::ReaderStream;

use super::OutputFormat;
use super::client::ApiClient;
use super::devices::{print_json, print_view, typed};
use super::output::{Table, datetime, or_dash, printable, relative};
use crate::api::{KEY_ID_HEADER, SHA256_HEADER, SIGNATURE_HEADER};
use crate::views::{ArtifactList, ArtifactView};

/// Read buffer for hashing and uploading.
const CHUNK: usize = 256 * 1024;
/// Time allowed for an upload: this plus one second per MiB (a slow link still finishes, a
/// dead one does not hang forever).
const UPLOAD_BASE_TIMEOUT: Duration = Duration::from_secs(120);

/// The `.sig` file next to an artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignatureFile {
    pub(crate) key_id: String,
    /// SHA-256 of the file, lowercase hex.
    pub(crate) sha256: String,
    /// Ed25519 over `RELEASE_TAG || sha256`, base64.
    pub(crate) signature: String,
}

/// `FILE.sig` for `FILE`.
fn default_sig_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".sig");
    PathBuf::from(name)
}

/// SHA-256 and size of a file, read in chunks.
fn hash_file(path: &Path) -> anyhow::Result<([u8; 32], u64)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hasher.finalize().into(), size))
}

/// `posctl artifact sign --key KEY FILE [--out SIG]`.
pub(crate) fn sign(
    key_path: &Path,
    file: &Path,
    sig_out: Option<&Path>,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let pem = std::fs::read_to_string(key_path).map_err(|e| {
        anyhow!(
            "cannot read the release key {}: {e}; create one with `posctl pki release-key --out DIR`",
            key_path.display()
        )
    })?;
    // The key's content never appears in an error.
    let key = CommandKey::from_pem(&pem).map_err(|_| {
        anyhow!(
            "{} is not a release key (an Ed25519 PKCS#8 PEM private key as written by \
             `posctl pki release-key`)",
            key_path.display()
        )
    })?;
    let (sha256, size) = hash_file(file)?;
    if size == 0 {
        return Err(anyhow!(
            "{} is empty; the controller refuses empty artifacts",
            file.display()
        ));
    }
    let sig = SignatureFile {
        key_id: key.key_id().to_owned(),
        sha256: hex::encode(sha256),
        signature: BASE64.encode(key.sign_release(&sha256)),
    };
    let path = sig_out
        .map(Path::to_owned)
        .unwrap_or_else(|| default_sig_path(file));
    let json = serde_json::to_string_pretty(&sig)?;
    write_public_file(&path, &format!("{json}\n"))
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    match format {
        OutputFormat::Json => writeln!(
            out,
            "{}",
            serde_json::json!({"signature_file": path, "key_id": sig.key_id, "sha256": sig.sha256, "size_bytes": size})
        )?,
        OutputFormat::Table => {
            writeln!(out, "Signed {} ({size} bytes)", file.display())?;
            writeln!(out, "  sha256     {}", sig.sha256)?;
            writeln!(out, "  key id     {}", sig.key_id)?;
            writeln!(out, "  signature  {}", path.display())?;
            writeln!(
                out,
                "Next: posctl artifact upload {} --version VERSION --signature {}",
                file.display(),
                path.display()
            )?;
        }
    }
    Ok(())
}

/// Arguments of `posctl artifact upload`.
#[derive(Debug, Clone)]
pub(crate) struct UploadArgs {
    pub(crate) file: PathBuf,
    pub(crate) version: String,
    pub(crate) signature: Option<PathBuf>,
    pub(crate) component: Option<String>,
    pub(crate) min_version: Option<String>,
}

fn read_sig(path: &Path) -> anyhow::Result<SignatureFile> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow!(
            "cannot read the signature file {}: {e}; create it with `posctl artifact sign --key \
             release.key FILE`",
            path.display()
        )
    })?;
    serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "{} is not a signature file written by `posctl artifact sign` ({e})",
            path.display()
        )
    })
}

/// `posctl artifact upload FILE --version V [--signature SIG] [--component C] [--min-version M]`.
pub(crate) async fn upload(
    api: &ApiClient,
    args: &UploadArgs,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let sig_path = args
        .signature
        .clone()
        .unwrap_or_else(|| default_sig_path(&args.file));
    let sig = read_sig(&sig_path)?;
    let file = tokio::fs::File::open(&args.file)
        .await
        .with_context(|| format!("cannot open {}", args.file.display()))?;
    let size = file
        .metadata()
        .await
        .with_context(|| format!("cannot read {}", args.file.display()))?
        .len();
    let mut url = api.url(&["api", "v1", "artifacts"]);
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("version", &args.version);
        if let Some(c) = &args.component {
            q.append_pair("component", c);
        }
        if let Some(m) = &args.min_version {
            q.append_pair("min_version", m);
        }
    }
    let mut headers = HeaderMap::new();
    let header = |name: &str, value: &str| {
        HeaderValue::from_str(value).map_err(|_| {
            anyhow!(
                "{}: the {name} field holds characters that cannot be sent",
                sig_path.display()
            )
        })
    };
    headers.insert(SIGNATURE_HEADER, header("signature", &sig.signature)?);
    headers.insert(KEY_ID_HEADER, header("key_id", &sig.key_id)?);
    headers.insert(SHA256_HEADER, header("sha256", &sig.sha256)?);
    headers.insert(CONTENT_LENGTH, HeaderValue::from(size));
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let body = reqwest::Body::wrap_stream(ReaderStream::with_capacity(file, CHUNK));
    let timeout = UPLOAD_BASE_TIMEOUT + Duration::from_secs(size / (1024 * 1024));
    let (status, value) = api
        .send_stream(Method::POST, url.clone(), headers, body, timeout)
        .await?;
    match format {
        OutputFormat::Json => print_json(out, &value),
        OutputFormat::Table => {
            let view: ArtifactView = typed(&url, value)?;
            let what = if status == reqwest::StatusCode::CREATED {
                "Uploaded"
            } else {
                "Already stored (nothing changed)"
            };
            let text = format!("{what}:\n{}", render_view(&view, now_ms()));
            Ok(out.write_all(text.as_bytes())?)
        }
    }
}

/// `posctl artifact list`.
pub(crate) async fn list(
    api: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "artifacts"]);
    let value = api.get_json(url.clone()).await?;
    match format {
        OutputFormat::Json => print_json(out, &value),
        OutputFormat::Table => {
            let list: ArtifactList = typed(&url, value)?;
            if list.items.is_empty() {
                writeln!(
                    out,
                    "No artifacts. Upload one with `posctl artifact upload FILE --version V`."
                )?;
                return Ok(());
            }
            let now = now_ms();
            let mut table = Table::new(vec![
                "ID",
                "COMPONENT",
                "VERSION",
                "MIN",
                "SIZE",
                "KEY",
                "UPLOADED",
            ]);
            for a in &list.items {
                table.row(vec![
                    a.id.chars().take(16).collect(),
                    printable(&a.component).into_owned(),
                    printable(&a.version).into_owned(),
                    or_dash(a.min_version.as_deref().unwrap_or("")).to_owned(),
                    a.size_bytes.to_string(),
                    printable(&a.release_key_id).into_owned(),
                    relative(now, a.uploaded_at_ms),
                ]);
            }
            Ok(out.write_all(table.render().as_bytes())?)
        }
    }
}

/// `posctl artifact show ID`.
pub(crate) async fn show(
    api: &ApiClient,
    id: &str,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "artifacts", id]);
    let value = api.get_json(url.clone()).await?;
    print_view(out, format, &url, value, |view: &ArtifactView| {
        render_view(view, now_ms())
    })
}

/// `posctl artifact delete ID`.
pub(crate) async fn delete(
    api: &ApiClient,
    id: &str,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "artifacts", id]);
    let value = api.send_json(Method::DELETE, url, None).await?;
    match format {
        OutputFormat::Json => print_json(out, &value),
        OutputFormat::Table => Ok(writeln!(out, "Deleted artifact {}", printable(id))?),
    }
}

fn render_view(a: &ArtifactView, now: u64) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "  id           {}", printable(&a.id));
    let _ = writeln!(s, "  component    {}", printable(&a.component));
    let _ = writeln!(s, "  version      {}", printable(&a.version));
    let _ = writeln!(
        s,
        "  min_version  {}",
        or_dash(a.min_version.as_deref().unwrap_or(""))
    );
    let _ = writeln!(s, "  size         {} bytes", a.size_bytes);
    let _ = writeln!(s, "  key id       {}", printable(&a.release_key_id));
    let _ = writeln!(
        s,
        "  uploaded     {} ({}) by {}",
        datetime(a.uploaded_at_ms),
        relative(now, a.uploaded_at_ms),
        printable(&a.uploaded_by)
    );
    let _ = writeln!(s, "  download     {}", printable(&a.download_url));
    s
}
