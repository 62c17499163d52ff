use std::os::unix::fs::PermissionsExt;

use posfleet_proto::DeviceId;
use posfleet_proto::pki::{Ca, CertFacts, write_public_file, write_secret_file};

use super::*;

struct Pairs {
    _dir: tempfile::TempDir,
    files: IdentityFiles,
    old: (String, String),
    new: (String, String),
    pending: PendingRenewal,
}

fn pairs() -> Pairs {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("test CA").unwrap();
    let id = DeviceId::new("T-1").unwrap();
    let old = ca.issue_device(&id).unwrap();
    let new = ca.issue_device(&id).unwrap();
    let files = IdentityFiles::new(
        dir.path().join("device.crt"),
        dir.path().join("device.key"),
        &dir.path().join("data"),
    );
    std::fs::create_dir(dir.path().join("data")).unwrap();
    write_public_file(&files.cert, &old.cert_pem).unwrap();
    write_secret_file(&files.key, &old.key_pem).unwrap();
    let pending = PendingRenewal {
        old_serial: CertFacts::from_pem(&old.cert_pem).unwrap().serial,
        new_serial: CertFacts::from_pem(&new.cert_pem).unwrap().serial,
    };
    Pairs {
        _dir: dir,
        files,
        old: (old.cert_pem, old.key_pem),
        new: (new.cert_pem, new.key_pem),
        pending,
    }
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn install_swaps_the_pair_and_keeps_the_old_one_until_finished() {
    let p = pairs();
    let f = &p.files;
    f.install(&p.new.0, &p.new.1, &p.pending).unwrap();
    assert_eq!(read(&f.cert), p.new.0);
    assert_eq!(read(&f.key), p.new.1);
    assert_eq!(mode(&f.key), 0o600);
    assert_eq!(read(&f.old_cert()), p.old.0);
    assert_eq!(read(&f.old_key()), p.old.1);
    assert_eq!(mode(&f.old_key()), 0o600);
    assert!(!f.staged_key().exists() && !f.staged_cert().exists());
    assert_eq!(f.pending().unwrap(), Some(p.pending.clone()));
    assert_eq!(f.current().unwrap().serial, p.pending.new_serial);

    f.finish().unwrap();
    assert_eq!(f.pending().unwrap(), None);
    assert!(!f.old_key().exists() && !f.old_cert().exists());
    assert_eq!(read(&f.key), p.new.1);
}

#[test]
fn recover_finishes_a_swap_interrupted_between_key_and_certificate() {
    let p = pairs();
    let f = &p.files;
    // The state after a crash: staged, backed up, marker written, only the key renamed.
    write_secret_file(&f.staged_key(), &p.new.1).unwrap();
    write_public_file(&f.staged_cert(), &p.new.0).unwrap();
    write_secret_file(&f.old_key(), &p.old.1).unwrap();
    write_public_file(&f.old_cert(), &p.old.0).unwrap();
    write_secret_file(&f.marker, &serde_json::to_string(&p.pending).unwrap()).unwrap();
    std::fs::rename(f.staged_key(), &f.key).unwrap();

    assert_eq!(f.recover().unwrap(), Some(p.pending.clone()));
    assert_eq!(read(&f.cert), p.new.0);
    assert_eq!(read(&f.key), p.new.1);
    assert_eq!(
        read(&f.old_key()),
        p.old.1,
        "the old key stays until confirmed"
    );
    // Recovering again changes nothing.
    assert_eq!(f.recover().unwrap(), Some(p.pending));
    assert_eq!(read(&f.key), p.new.1);
}

#[test]
fn recover_drops_a_staging_without_marker_and_keeps_the_identity() {
    let p = pairs();
    let f = &p.files;
    write_secret_file(&f.staged_key(), &p.new.1).unwrap();
    write_public_file(&f.staged_cert(), &p.new.0).unwrap();
    assert_eq!(f.recover().unwrap(), None);
    assert!(!f.staged_key().exists() && !f.staged_cert().exists());
    assert_eq!(read(&f.cert), p.old.0);
    assert_eq!(read(&f.key), p.old.1);
}

#[test]
fn a_corrupt_marker_is_reported_not_guessed() {
    let p = pairs();
    std::fs::write(&p.files.marker, "{not json").unwrap();
    let err = p.files.recover().unwrap_err();
    assert!(matches!(err, RenewError::Marker { .. }), "{err}");
    assert_eq!(read(&p.files.key), p.old.1);
}

#[tokio::test]
async fn due_compares_the_remaining_validity_with_the_threshold() {
    let p = pairs();
    let mut settings = RenewSettings {
        device_url: "https://127.0.0.1:1".into(),
        ca: p.files.cert.clone(),
        files: p.files.clone(),
        renew_before: DEFAULT_RENEW_BEFORE,
        check_interval: DEFAULT_CHECK_INTERVAL,
        retry: Backoff::default(),
        attempts: 1,
    };
    let not_after = p.files.current().unwrap().not_after;
    let day = 24 * 3600;
    assert!(!due(&settings, not_after - 31 * day).await.unwrap());
    assert!(due(&settings, not_after - 29 * day).await.unwrap());
    settings.renew_before = Duration::from_secs(400 * day as u64);
    assert!(due(&settings, not_after - 365 * day).await.unwrap());
}

#[test]
fn final_refusals_are_not_retried() {
    let refused = |status| RenewError::Refused {
        status,
        message: String::new(),
    };
    assert!(refused(403).is_final());
    assert!(refused(404).is_final());
    assert!(!refused(429).is_final());
    assert!(!refused(503).is_final());
    assert!(!RenewError::Http("reset".into()).is_final());
}
