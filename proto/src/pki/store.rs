//! The on-disk layout of a PKI directory and of device bundles.
//!
//! ```text
//! DIR/ca.crt          fleet CA certificate(s); more than one during a CA rotation
//! DIR/ca.key          fleet CA key (0600)
//! DIR/server.crt/.key broker server certificate (0600 key)
//! DIR/controller.crt/.key  controller client certificate (0600 key)
//! DIR/command.key     controller command-signing key, Ed25519 PKCS#8 (0600)
//! DIR/command.pub     its public key (SPKI PEM), pinned by every agent
//! DIR/release.pub     trusted release public key(s) (ADR 0008), installed by the admin; the
//!                     release private key never lives here
//!
//! OUT/device.crt, OUT/device.key (0600), OUT/ca.crt, OUT/command.pub   a device bundle
//! OUT/release.pub     also in the bundle when DIR/release.pub exists
//! ```

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::{Ca, CertifiedKey, PkiError};
use crate::DeviceId;

/// Name of the controller certificate `init` creates.
pub const DEFAULT_CONTROLLER_NAME: &str = "main";

/// A PKI directory (see the module docs for its layout).
#[derive(Debug, Clone)]
pub struct PkiDir {
    dir: PathBuf,
}

/// Paths of a device bundle written by [`PkiDir::write_device_bundle`].
#[derive(Debug, Clone)]
pub struct DeviceBundle {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// The controller's command-verification key(s), for the agent to pin.
    pub command_pub: PathBuf,
    /// The trusted release key(s), for the agent to pin in `[updates]`; `None` when the PKI
    /// directory has no `release.pub` yet.
    pub release_pub: Option<PathBuf>,
}

impl PkiDir {
    /// Names an existing or future PKI directory; nothing is read yet.
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// True if the directory already holds a fleet CA key.
    pub fn exists(&self) -> bool {
        self.ca_key().exists()
    }

    /// Creates the fleet CA, the broker server certificate (SANs: localhost, 127.0.0.1, ::1 and
    /// `extra_hosts`) and the controller certificate. Refuses to overwrite an existing CA.
    pub fn init(&self, extra_hosts: &[String]) -> Result<Ca, PkiError> {
        if self.exists() {
            return Err(PkiError::AlreadyInitialised {
                path: self.ca_key(),
            });
        }
        create_private_dir(&self.dir)?;
        let ca = Ca::generate("posfleet fleet CA")?;
        let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        for host in extra_hosts {
            if !hosts.contains(host) {
                hosts.push(host.clone());
            }
        }
        let server = ca.issue_server(&hosts)?;
        let controller = ca.issue_controller(DEFAULT_CONTROLLER_NAME)?;
        // The key goes last: `exists()` keys off it, so a crash midway lets `init` run again.
        write_public_file(&self.ca_cert(), ca.cert_pem())?;
        write_pair(&self.server_cert(), &self.server_key(), &server)?;
        write_pair(&self.controller_cert(), &self.controller_key(), &controller)?;
        self.ensure_command_key()?;
        write_secret_file(&self.ca_key(), ca.key_pem())?;
        Ok(ca)
    }

    /// Loads the command-signing key, creating it (and `command.pub`) if this directory has
    /// none yet (a PKI made before commands existed). `command.pub` is rewritten from the
    /// private key when it is missing.
    pub fn ensure_command_key(&self) -> Result<crate::signing::CommandKey, PkiError> {
        use crate::signing::CommandKey;
        let path = self.command_key();
        let key = if path.exists() {
            CommandKey::from_pem(&read(&path)?).map_err(|e| PkiError::Parse(e.to_string()))?
        } else {
            create_private_dir(&self.dir)?;
            let key = CommandKey::generate();
            write_secret_file(&path, &key.to_pem())?;
            key
        };
        if !self.command_public_key().exists() {
            write_public_file(&self.command_public_key(), &key.public_key().to_pem())?;
        }
        Ok(key)
    }

    /// The command-verification key(s) agents should pin (`command.pub`).
    pub fn load_command_public_keys(&self) -> Result<Vec<crate::signing::PublicKey>, PkiError> {
        read_public_keys(&self.command_public_key())
    }

    /// Loads the fleet CA (the first certificate of `ca.crt` with `ca.key`).
    pub fn load_ca(&self) -> Result<Ca, PkiError> {
        let cert = read(&self.ca_cert())?;
        let key = read(&self.ca_key())?;
        if parse_pem_certs(cert.as_bytes())?.is_empty() {
            return Err(PkiError::NoCertificate {
                path: self.ca_cert(),
            });
        }
        Ca::from_pem(&cert, &key)
    }

    /// Issues a device certificate and writes `device.crt`, `device.key` (0600) and `ca.crt`
    /// into `out`. Nothing records the certificate, so no controller can revoke it before the
    /// terminal first connects: the product issues through the controller
    /// (`posctl pki issue-device`); this is for fixtures that never reach a controller.
    pub fn write_device_bundle(
        &self,
        ca: &Ca,
        id: &DeviceId,
        out: &Path,
    ) -> Result<DeviceBundle, PkiError> {
        let issued = ca.issue_device(id)?;
        create_private_dir(out)?;
        let mut bundle = DeviceBundle {
            cert: out.join("device.crt"),
            key: out.join("device.key"),
            ca: out.join("ca.crt"),
            command_pub: out.join("command.pub"),
            release_pub: None,
        };
        write_pair(&bundle.cert, &bundle.key, &issued)?;
        write_public_file(&bundle.ca, &read(&self.ca_cert())?)?;
        self.ensure_command_key()?;
        write_public_file(&bundle.command_pub, &read(&self.command_public_key())?)?;
        let release = self.release_public_key();
        if release.exists() {
            let path = out.join("release.pub");
            write_public_file(&path, &read(&release)?)?;
            bundle.release_pub = Some(path);
        }
        Ok(bundle)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn controller_cert(&self) -> PathBuf {
        self.dir.join("controller.crt")
    }
    pub fn controller_key(&self) -> PathBuf {
        self.dir.join("controller.key")
    }
    pub fn command_key(&self) -> PathBuf {
        self.dir.join("command.key")
    }
    pub fn command_public_key(&self) -> PathBuf {
        self.dir.join("command.pub")
    }
    /// Trusted release public key(s) (ADR 0008); the admin installs this file.
    pub fn release_public_key(&self) -> PathBuf {
        self.dir.join("release.pub")
    }
}

/// Every Ed25519 public key in a PEM file (one per `PUBLIC KEY` block; several during a key
/// rotation).
pub fn read_public_keys(path: &Path) -> Result<Vec<crate::signing::PublicKey>, PkiError> {
    let text = read(path)?;
    let mut keys = Vec::new();
    let mut block = String::new();
    for line in text.lines() {
        block.push_str(line);
        block.push('\n');
        if line.starts_with("-----END") {
            keys.push(
                crate::signing::PublicKey::from_pem(&block)
                    .map_err(|e| PkiError::Parse(format!("{}: {e}", path.display())))?,
            );
            block.clear();
        }
    }
    if keys.is_empty() {
        return Err(PkiError::Parse(format!(
            "{}: no public key found",
            path.display()
        )));
    }
    Ok(keys)
}

/// Every certificate in a PEM text (a CA bundle may hold several).
pub fn parse_pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Parse(e.to_string()))
}

/// Writes a secret (key, token) atomically with mode 0600: a temp file created 0600 in the same
/// directory, synced, then renamed over `path`.
pub fn write_secret_file(path: &Path, contents: &str) -> Result<(), PkiError> {
    write_atomic(path, contents, 0o600)
}

/// Writes a public file (certificate, public key) atomically with mode 0644.
pub fn write_public_file(path: &Path, contents: &str) -> Result<(), PkiError> {
    write_atomic(path, contents, 0o644)
}

fn write_pair(cert: &Path, key: &Path, issued: &CertifiedKey) -> Result<(), PkiError> {
    write_secret_file(key, &issued.key_pem)?;
    write_public_file(cert, &issued.cert_pem)
}

fn write_atomic(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Io {
            path: dir.to_owned(),
            source,
        })
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Identity;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_writes_keys_0600_and_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = PkiDir::at(tmp.path().join("pki"));
        pki.init(&["broker.example".into()]).unwrap();
        for key in [pki.ca_key(), pki.server_key(), pki.controller_key()] {
            assert_eq!(mode(&key), 0o600, "{}", key.display());
        }
        assert!(matches!(
            pki.init(&[]),
            Err(PkiError::AlreadyInitialised { .. })
        ));
    }

    #[test]
    fn device_bundle_is_signed_by_the_stored_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = PkiDir::at(tmp.path().join("pki"));
        pki.init(&[]).unwrap();
        let ca = pki.load_ca().unwrap();
        let id = DeviceId::new("T-9").unwrap();
        let bundle = pki
            .write_device_bundle(&ca, &id, &tmp.path().join("dev"))
            .unwrap();
        assert_eq!(mode(&bundle.key), 0o600);
        let certs = parse_pem_certs(&fs::read(&bundle.cert).unwrap()).unwrap();
        assert_eq!(
            Identity::from_cert_der(&certs[0]).unwrap(),
            Identity::Device(id)
        );
        assert_eq!(
            fs::read(&bundle.ca).unwrap(),
            fs::read(pki.ca_cert()).unwrap()
        );
        assert!(bundle.release_pub.is_none());
        assert!(!tmp.path().join("dev/release.pub").exists());
    }

    #[test]
    fn device_bundle_carries_release_pub_when_installed() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = PkiDir::at(tmp.path().join("pki"));
        pki.init(&[]).unwrap();
        let key = crate::signing::CommandKey::generate();
        write_public_file(&pki.release_public_key(), &key.public_key().to_pem()).unwrap();
        let ca = pki.load_ca().unwrap();
        let id = DeviceId::new("T-8").unwrap();
        let bundle = pki
            .write_device_bundle(&ca, &id, &tmp.path().join("dev"))
            .unwrap();
        let path = bundle.release_pub.expect("release.pub copied");
        let keys = read_public_keys(&path).unwrap();
        assert_eq!(keys[0].key_id(), key.key_id());
    }
}
