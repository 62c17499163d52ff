//! `posctl pki init`, `posctl pki issue-device` and `posctl pki release-key`: local files
//! only, no server involved.

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;

use anyhow::anyhow;
use posfleet_proto::DeviceId;
use posfleet_proto::pki::{PkiDir, PkiError, write_public_file, write_secret_file};
use posfleet_proto::signing::CommandKey;
use serde_json::json;

use super::OutputFormat;

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

/// Issues a device bundle into `out_dir`, refusing to replace one unless `force`.
pub(crate) fn issue_device(
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
    let ca = pki
        .load_ca()
        .map_err(|e| anyhow!("cannot load the fleet CA from {}: {e}", dir.display()))?;
    let bundle = pki
        .write_device_bundle(&ca, id, out_dir)
        .map_err(|e| anyhow!("cannot write the bundle for {id}: {e}"))?;
    match format {
        OutputFormat::Json => writeln!(
            out,
            "{}",
            json!({ "device": id.as_str(), "cert": bundle.cert, "key": bundle.key, "ca": bundle.ca, "release_pub": bundle.release_pub })
        )?,
        OutputFormat::Table => {
            writeln!(out, "Issued a certificate for device {id}:")?;
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
    fn issue_device_writes_a_bundle_and_refuses_to_overwrite_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        init(&dir, &[], OutputFormat::Table, &mut Vec::new()).unwrap();
        let bundle = tmp.path().join("T-0001");
        let id = DeviceId::new("T-0001").unwrap();
        let mut out = Vec::new();
        issue_device(&dir, &id, &bundle, false, OutputFormat::Table, &mut out).unwrap();
        let printed = text(out);
        assert!(printed.contains("device T-0001"), "{printed}");
        assert!(!printed.contains("PRIVATE KEY"), "{printed}");
        assert_eq!(mode(&bundle.join("device.key")), 0o600);
        assert_eq!(
            fs::read(bundle.join("ca.crt")).unwrap(),
            fs::read(dir.join("ca.crt")).unwrap()
        );
        let key_before = fs::read(bundle.join("device.key")).unwrap();

        let err = issue_device(
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

        issue_device(
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
        let err = issue_device(
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
