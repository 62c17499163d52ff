//! `posctl pki init` and `posctl pki release-key` (local files only), and `posctl pki
//! issue-device`: the key is generated locally and the certificate issued and recorded by the
//! controller, through its API or, with `--dir DATA/pki` while it is stopped, in its data
//! directory.

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;

use anyhow::anyhow;
use posfleet_proto::DeviceId;
use posfleet_proto::pki::{
    DeviceBundle, DeviceKeyRequest, PkiDir, PkiError, write_public_file, write_secret_file,
};
use posfleet_proto::signing::CommandKey;
use reqwest::Method;
use serde_json::json;

use super::OutputFormat;
use super::client::ApiClient;
use super::devices::typed;
use crate::enrolment::OfflineIssueError;
use crate::views::IssuedCertificates;

/// Creates the fleet CA, server and controller certificates in `dir`.
pub(crate) fn init(
    dir: &Path,
    hosts: &[String],
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    for host in hosts {
        check_host(host)?;
    }
    let pki = PkiDir::at(dir);
    match pki.init(hosts) {
        Ok(_) => {}
        Err(PkiError::AlreadyInitialised { path }) => {
            return Err(anyhow!(
                "{} already holds a fleet CA ({}); refusing to overwrite it. Issue more \
                 certificates with `posctl pki issue-device --dir {}`; to start over, move the \
                 directory away first (terminals holding certificates from the old CA will no \
                 longer connect)",
                dir.display(),
                path.display(),
                dir.display()
            ));
        }
        Err(e) => {
            return Err(anyhow!(
                "cannot create the fleet PKI in {}: {e}",
                dir.display()
            ));
        }
    }
    let mut names = vec!["localhost", "127.0.0.1", "::1"];
    names.extend(hosts.iter().map(String::as_str));
    match format {
        OutputFormat::Json => writeln!(
            out,
            "{}",
            json!({
                "dir": dir,
                "ca_cert": pki.ca_cert(),
                "ca_key": pki.ca_key(),
                "server_cert": pki.server_cert(),
                "server_key": pki.server_key(),
                "server_names": names,
                "controller_cert": pki.controller_cert(),
                "controller_key": pki.controller_key(),
            })
        )?,
        OutputFormat::Table => {
            writeln!(out, "Created the fleet PKI in {}:", dir.display())?;
            for (path, what) in [
                (
                    pki.ca_cert(),
                    "fleet CA certificate (trusted by terminals and posctl)".to_owned(),
                ),
                (
                    pki.ca_key(),
                    "fleet CA key, 0600: whoever holds it can mint terminals; back it up \
                     offline"
                        .to_owned(),
                ),
                (
                    pki.server_cert(),
                    format!("broker server certificate for {}", names.join(", ")),
                ),
                (pki.server_key(), "broker server key, 0600".to_owned()),
                (
                    pki.controller_cert(),
                    "controller client certificate".to_owned(),
                ),
                (pki.controller_key(), "controller key, 0600".to_owned()),
            ] {
                writeln!(out, "  {:<40}  {what}", path.display())?;
            }
            writeln!(
                out,
                "Next: issue terminal bundles with `posctl pki issue-device --dir {} --id ID --out DIR`",
                dir.display()
            )?;
        }
    }
    Ok(())
}

/// Refuses to replace a bundle in `out_dir` unless `force`.
fn check_out_dir(out_dir: &Path, force: bool) -> anyhow::Result<()> {
    let existing = ["device.key", "device.crt"]
        .iter()
        .map(|name| out_dir.join(name))
        .find(|path| path.exists());
    if let (Some(path), false) = (existing, force) {
        return Err(anyhow!(
            "{} already exists; refusing to overwrite a device bundle. Choose another --out, or \
             pass --force to replace it (the old certificate stays valid until it expires or \
             is revoked)",
            path.display()
        ));
    }
    Ok(())
}

/// What both issue paths check first (the id is new to the fleet: no card number; the bundle
/// directory), and the key the bundle gets.
fn new_key(id: &DeviceId, out_dir: &Path, force: bool) -> anyhow::Result<DeviceKeyRequest> {
    super::check_new_device_id("--id", id)?;
    check_out_dir(out_dir, force)?;
    DeviceKeyRequest::generate(id).map_err(|e| anyhow!("cannot generate the device key: {e}"))
}

/// `posctl pki issue-device` (through the API): the key is generated here and never leaves
/// this machine; the controller signs its CSR and records the certificate (so it can be
/// revoked before the terminal ever connects), then the bundle is written into `out_dir`.
pub(crate) async fn issue_device(
    api: &ApiClient,
    id: &DeviceId,
    out_dir: &Path,
    force: bool,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let key = new_key(id, out_dir, force)?;
    let url = api.url(&["api", "v1", "pki", "certificates"]);
    let body =
        json!({"purpose": "cli", "requests": [{"device_id": id.as_str(), "csr_pem": key.csr_pem}]});
    let value = match api.send_json(Method::POST, url.clone(), Some(&body)).await {
        Ok(value) => value,
        Err(e @ super::client::ApiError::Connect { .. }) => {
            return Err(anyhow!(
                "{e}; with the controller stopped, issue offline into its data directory with \
                 --dir DATA/pki"
            ));
        }
        Err(e) => return Err(e.into()),
    };
    let issued: IssuedCertificates = typed(&url, value)?;
    let bundle = write_bundle(out_dir, id, &key.key_pem, &issued)?;
    print_bundle(id, &bundle, &issued, false, format, out)
}

/// `posctl pki issue-device --dir DATA/pki`: with the controller stopped, issues from the CA
/// in `dir` and records the certificate in `DATA/enrolment` (audited at the controller's next
/// start). Refuses while the controller runs, and for a PKI directory outside a data dir:
/// a certificate nobody records could not be revoked before first contact.
pub(crate) fn issue_device_offline(
    dir: &Path,
    id: &DeviceId,
    out_dir: &Path,
    force: bool,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let pki = PkiDir::at(dir);
    if !pki.exists() {
        return Err(anyhow!(
            "no fleet CA in {} ({} is missing): run `posctl pki init --dir {}` first, or pass \
             --dir with the server's PKI directory (DATA_DIR/pki)",
            dir.display(),
            pki.ca_key().display(),
            dir.display()
        ));
    }
    let data_root = match (dir.file_name(), dir.parent()) {
        (Some(name), Some(parent)) if name == "pki" => {
            if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            }
        }
        _ => {
            return Err(anyhow!(
                "--dir {} is not a controller's PKI directory (DATA/pki): every certificate \
                 must be recorded in the controller's data so it can be revoked before the \
                 terminal first connects. Issue through the running controller instead: \
                 `posctl --data-dir DATA pki issue-device --id {id} --out DIR`",
                dir.display()
            ));
        }
    };
    let key = new_key(id, out_dir, force)?;
    let issued = match crate::enrolment::issue_offline(
        data_root,
        id,
        &key.csr_pem,
        "posctl (offline)",
        posfleet_proto::now_ms(),
    ) {
        Ok(issued) => issued.certificate,
        Err(OfflineIssueError::Running { data }) => {
            return Err(anyhow!(
                "the controller is running on {0} and holds its enrolment store, where this \
                 certificate must be recorded; issue through its API instead: `posctl \
                 --data-dir {0} pki issue-device --id {id} --out {1}` (without --dir)",
                data.display(),
                out_dir.display()
            ));
        }
        Err(e) => return Err(anyhow!("cannot issue a certificate for {id}: {e}")),
    };
    let bundle = write_bundle(out_dir, id, &key.key_pem, &issued)?;
    print_bundle(id, &bundle, &issued, true, format, out)
}

/// Writes `device.crt`, `device.key` (0600), `ca.crt`, `command.pub` and, when the controller
/// has one, `release.pub` into `out_dir` (created 0700).
fn write_bundle(
    out_dir: &Path,
    id: &DeviceId,
    key_pem: &str,
    issued: &IssuedCertificates,
) -> anyhow::Result<DeviceBundle> {
    let cert = match issued.items.as_slice() {
        [one] if one.device_id == id.as_str() => one,
        _ => {
            return Err(anyhow!(
                "the controller answered with another certificate than {id}'s"
            ));
        }
    };
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(out_dir)
            .map_err(|e| anyhow!("cannot create {}: {e}", out_dir.display()))?;
    }
    let mut bundle = DeviceBundle {
        cert: out_dir.join("device.crt"),
        key: out_dir.join("device.key"),
        ca: out_dir.join("ca.crt"),
        command_pub: out_dir.join("command.pub"),
        release_pub: None,
    };
    let write = |path: &Path, text: &str, secret: bool| {
        let written = if secret {
            write_secret_file(path, text)
        } else {
            write_public_file(path, text)
        };
        written.map_err(|e| anyhow!("cannot write the bundle for {id}: {e}"))
    };
    write(&bundle.key, key_pem, true)?;
    write(&bundle.cert, &cert.certificate_pem, false)?;
    write(&bundle.ca, &issued.ca_pem, false)?;
    write(&bundle.command_pub, &issued.command_pub_pem, false)?;
    if let Some(release) = &issued.release_pub_pem {
        let path = out_dir.join("release.pub");
        write(&path, release, false)?;
        bundle.release_pub = Some(path);
    }
    Ok(bundle)
}

fn print_bundle(
    id: &DeviceId,
    bundle: &DeviceBundle,
    issued: &IssuedCertificates,
    offline: bool,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let serial = issued.items.first().map_or("", |c| c.serial.as_str());
    match format {
        OutputFormat::Json => writeln!(
            out,
            "{}",
            json!({ "device": id.as_str(), "serial": serial, "cert": bundle.cert, "key": bundle.key, "ca": bundle.ca, "release_pub": bundle.release_pub })
        )?,
        OutputFormat::Table => {
            writeln!(
                out,
                "Issued certificate {serial} for device {id}{}:",
                if offline {
                    " (recorded offline; audited at the controller's next start)"
                } else {
                    ""
                }
            )?;
            writeln!(out, "  {:<40}  device certificate", bundle.cert.display())?;
            writeln!(
                out,
                "  {:<40}  device key, 0600: copy it to the terminal over a secure channel, \
                 then delete this copy",
                bundle.key.display()
            )?;
            writeln!(out, "  {:<40}  fleet CA certificate", bundle.ca.display())?;
            if let Some(release) = &bundle.release_pub {
                writeln!(
                    out,
                    "  {:<40}  trusted release key(s) for software updates",
                    release.display()
                )?;
            }
            writeln!(
                out,
                "If the bundle is lost before the terminal is deployed: `posctl devices revoke \
                 {id} --reason ...`"
            )?;
        }
    }
    Ok(())
}

/// Creates a release key pair in `out_dir`: `release.key` (0600) and `release.pub`. Refuses
/// to replace either.
pub(crate) fn release_key(
    out_dir: &Path,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let key_path = out_dir.join("release.key");
    let pub_path = out_dir.join("release.pub");
    if let Some(existing) = [&key_path, &pub_path].into_iter().find(|p| p.exists()) {
        return Err(anyhow!(
            "{} already exists; refusing to overwrite a release key (terminals that pin it \
             would refuse every update signed by a new one). Choose another --out",
            existing.display()
        ));
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(out_dir)
            .map_err(|e| anyhow!("cannot create {}: {e}", out_dir.display()))?;
    }
    let key = CommandKey::generate();
    write_secret_file(&key_path, &key.to_pem())
        .map_err(|e| anyhow!("cannot write the release key: {e}"))?;
    write_public_file(&pub_path, &key.public_key().to_pem())
        .map_err(|e| anyhow!("cannot write the release public key: {e}"))?;
    match format {
        OutputFormat::Json => writeln!(
            out,
            "{}",
            json!({"key": key_path, "public_key": pub_path, "key_id": key.key_id()})
        )?,
        OutputFormat::Table => {
            writeln!(out, "Created release key {}:", key.key_id())?;
            writeln!(
                out,
                "  {:<40}  private key, 0600: keep it offline, never on the controller",
                key_path.display()
            )?;
            writeln!(
                out,
                "  {:<40}  public key: install as DATA/pki/release.pub on the controller \
                 (then restart it); device bundles issued afterwards carry it",
                pub_path.display()
            )?;
            writeln!(
                out,
                "Next: posctl artifact sign --key {} FILE",
                key_path.display()
            )?;
        }
    }
    Ok(())
}

/// A server certificate name must be an IP address or a DNS name.
fn check_host(host: &str) -> anyhow::Result<()> {
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() <= 253 && name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(anyhow!(
            "--host {host:?} is neither an IP address nor a DNS name (labels of letters, digits \
             and '-', separated by '.')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn text(out: Vec<u8>) -> String {
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn init_writes_0600_keys_reports_paths_not_keys_and_refuses_a_second_run() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let mut out = Vec::new();
        init(
            &dir,
            &["fleet.example".into()],
            OutputFormat::Table,
            &mut out,
        )
        .unwrap();
        let printed = text(out);
        let pki = PkiDir::at(&dir);
        for key in [pki.ca_key(), pki.server_key(), pki.controller_key()] {
            assert_eq!(mode(&key), 0o600, "{}", key.display());
            assert!(printed.contains(&key.display().to_string()), "{printed}");
        }
        assert!(
            printed.contains("localhost, 127.0.0.1, ::1, fleet.example"),
            "{printed}"
        );
        assert!(!printed.contains("PRIVATE KEY"), "{printed}");
        let ca_key_before = fs::read(pki.ca_key()).unwrap();

        let err = init(&dir, &[], OutputFormat::Table, &mut Vec::new()).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("already holds a fleet CA"), "{message}");
        assert!(message.contains("refusing to overwrite"), "{message}");
        assert_eq!(fs::read(pki.ca_key()).unwrap(), ca_key_before);
    }

    #[test]
    fn init_json_names_the_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let mut out = Vec::new();
        init(&dir, &[], OutputFormat::Json, &mut out).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["ca_key"], dir.join("ca.key").display().to_string());
    }

    #[test]
    fn init_refuses_bad_host_names_before_writing_anything() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let err = init(
            &dir,
            &["bad host".into()],
            OutputFormat::Table,
            &mut Vec::new(),
        );
        assert!(err.unwrap_err().to_string().contains("--host \"bad host\""));
        assert!(!dir.exists());
        for ok in [
            "10.0.0.5",
            "fe80::1",
            "broker.store-12.example",
            "*.example",
            "broker",
        ] {
            check_host(ok).unwrap();
        }
        for bad in ["", "-a.example", "a..b", "a_b.example", "a/b"] {
            assert!(check_host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn offline_issue_records_the_certificate_and_refuses_to_overwrite_a_bundle() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        init(&dir, &[], OutputFormat::Table, &mut Vec::new()).unwrap();
        let bundle = tmp.path().join("T-0001");
        let id = DeviceId::new("T-0001").unwrap();
        let mut out = Vec::new();
        issue_device_offline(&dir, &id, &bundle, false, OutputFormat::Table, &mut out).unwrap();
        let printed = text(out);
        assert!(printed.contains("device T-0001"), "{printed}");
        assert!(printed.contains("recorded offline"), "{printed}");
        assert!(!printed.contains("PRIVATE KEY"), "{printed}");
        assert_eq!(mode(&bundle.join("device.key")), 0o600);
        assert_eq!(
            fs::read(bundle.join("ca.crt")).unwrap(),
            fs::read(dir.join("ca.crt")).unwrap()
        );
        assert!(bundle.join("command.pub").exists());
        let key_before = fs::read(bundle.join("device.key")).unwrap();
        let serial = posfleet_proto::pki::CertFacts::from_pem(
            &fs::read_to_string(bundle.join("device.crt")).unwrap(),
        )
        .unwrap()
        .serial;
        assert!(printed.contains(&serial), "{printed}");

        let err = issue_device_offline(
            &dir,
            &id,
            &bundle,
            false,
            OutputFormat::Table,
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(fs::read(bundle.join("device.key")).unwrap(), key_before);

        issue_device_offline(
            &dir,
            &id,
            &bundle,
            true,
            OutputFormat::Table,
            &mut Vec::new(),
        )
        .unwrap();
        assert_ne!(fs::read(bundle.join("device.key")).unwrap(), key_before);
        assert_eq!(mode(&bundle.join("device.key")), 0o600);

        // Both certificates are recorded in the data dir's enrolment store, to be audited.
        let data = crate::datadir::DataDir::at(tmp.path());
        let store = crate::enrolment::EnrolmentStore::open(&data.enrolment_dir(), 1 << 20).unwrap();
        let serials = store.issued_serials("T-0001").unwrap();
        assert_eq!(serials.len(), 2, "{serials:?}");
        assert!(serials.contains(&serial), "{serials:?}");
    }

    #[test]
    fn offline_issue_refuses_while_the_controller_runs_and_outside_a_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        init(&dir, &[], OutputFormat::Table, &mut Vec::new()).unwrap();
        let id = DeviceId::new("T-1").unwrap();
        // The running controller holds DATA/enrolment.
        let data = crate::datadir::DataDir::at(tmp.path());
        let held = crate::enrolment::EnrolmentStore::open(&data.enrolment_dir(), 1 << 20).unwrap();
        let out = tmp.path().join("out");
        let err =
            issue_device_offline(&dir, &id, &out, false, OutputFormat::Table, &mut Vec::new())
                .unwrap_err()
                .to_string();
        assert!(err.contains("the controller is running"), "{err}");
        assert!(err.contains("without --dir"), "{err}");
        assert!(!out.exists());
        drop(held);

        // A PKI directory that is not DATA/pki: nobody would record the certificate.
        let elsewhere = tmp.path().join("offline-ca");
        init(&elsewhere, &[], OutputFormat::Table, &mut Vec::new()).unwrap();
        let err = issue_device_offline(
            &elsewhere,
            &id,
            &out,
            false,
            OutputFormat::Table,
            &mut Vec::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not a controller's PKI directory"), "{err}");
        assert!(!out.exists());
    }

    #[test]
    fn release_key_is_0600_loads_and_is_never_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let mut out = Vec::new();
        release_key(&dir, OutputFormat::Table, &mut out).unwrap();
        let printed = text(out);
        assert!(!printed.contains("PRIVATE KEY"), "{printed}");
        assert_eq!(mode(&dir.join("release.key")), 0o600);
        assert_eq!(mode(&dir), 0o700);
        let key =
            CommandKey::from_pem(&fs::read_to_string(dir.join("release.key")).unwrap()).unwrap();
        let public = posfleet_proto::pki::read_public_keys(&dir.join("release.pub")).unwrap();
        assert_eq!(public[0].key_id(), key.key_id());
        assert!(printed.contains(key.key_id()), "{printed}");

        let before = fs::read(dir.join("release.key")).unwrap();
        let err = release_key(&dir, OutputFormat::Table, &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(fs::read(dir.join("release.key")).unwrap(), before);
        // Only the public half present is refused too.
        let other = tmp.path().join("other");
        fs::create_dir(&other).unwrap();
        fs::write(other.join("release.pub"), "x").unwrap();
        assert!(release_key(&other, OutputFormat::Json, &mut Vec::new()).is_err());
        assert!(!other.join("release.key").exists());
    }

    #[test]
    fn issue_device_without_a_ca_says_to_run_init() {
        let tmp = tempfile::tempdir().unwrap();
        let id = DeviceId::new("T-1").unwrap();
        let err = issue_device_offline(
            &tmp.path().join("nope"),
            &id,
            &tmp.path().join("out"),
            false,
            OutputFormat::Table,
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("run `posctl pki init --dir"),
            "{err}"
        );
        assert!(!tmp.path().join("out").exists());
    }
}
