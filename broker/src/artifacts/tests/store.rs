//! The artifact store on its own.

use super::{files, meta_for, put};
use crate::artifacts::{ArtifactStore, ArtifactUsers, DeleteError, InsertError, Inserted, NoUsers};

const CACHE: u64 = 1 << 20;

/// A rollout engine that uses every artifact.
struct Busy;

impl ArtifactUsers for Busy {
    fn rollouts_using(&self, _id: &str) -> Vec<String> {
        vec!["r-1".into()]
    }
}

#[test]
fn an_artifact_survives_a_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("artifacts");
    let bytes = b"firmware image v1".repeat(100);
    let id = {
        let store = ArtifactStore::open(&root, CACHE).unwrap();
        let (inserted, temp) = put(&store, &bytes, "1.0.0");
        let Ok(Inserted::Created(meta)) = inserted else {
            panic!("created expected: {inserted:?}");
        };
        assert!(!temp.exists(), "the temp file became the blob");
        meta.id
    };
    let store = ArtifactStore::open(&root, CACHE).unwrap();
    let meta = store.get(&id).unwrap().expect("still there");
    assert_eq!(meta, meta_for(&bytes, "1.0.0"));
    assert_eq!(std::fs::read(store.blob_path(&id)).unwrap(), bytes);
    assert_eq!(store.list().unwrap(), vec![meta]);
    assert_eq!(files(store.blobs_dir()), vec![id]);
}

#[test]
fn a_reupload_of_the_same_bytes_and_version_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ArtifactStore::open(tmp.path(), CACHE).unwrap();
    let (first, _) = put(&store, b"app", "2.0");
    let Ok(Inserted::Created(created)) = first else {
        panic!("{first:?}");
    };
    let (again, temp) = put(&store, b"app", "2.0");
    assert_eq!(again.unwrap(), Inserted::Existing(created.clone()));
    // The caller removes the temp file of an upload that was not needed.
    std::fs::remove_file(temp).unwrap();
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(files(store.blobs_dir()), vec![created.id]);
}

#[test]
fn the_same_bytes_as_another_version_or_another_build_as_the_same_version_conflict() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ArtifactStore::open(tmp.path(), CACHE).unwrap();
    put(&store, b"app", "2.0").0.unwrap();
    let (other_version, temp) = put(&store, b"app", "2.1");
    let Err(InsertError::Conflict(message)) = other_version else {
        panic!("{other_version:?}");
    };
    assert!(message.contains("payment_app 2.0"), "{message}");
    std::fs::remove_file(temp).unwrap();
    let (other_bytes, temp) = put(&store, b"app rebuilt", "2.0");
    let Err(InsertError::Conflict(message)) = other_bytes else {
        panic!("{other_bytes:?}");
    };
    assert!(message.contains("already artifact"), "{message}");
    std::fs::remove_file(temp).unwrap();
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(files(store.blobs_dir()).len(), 1);
}

#[test]
fn delete_removes_blob_and_record_durably_unless_a_rollout_uses_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("a");
    let id = {
        let store = ArtifactStore::open(&root, CACHE).unwrap();
        let Inserted::Created(meta) = put(&store, b"agent", "3").0.unwrap() else {
            panic!("created expected");
        };
        let refused = store.delete(&meta.id, &Busy);
        let Err(DeleteError::InUse { rollouts, .. }) = refused else {
            panic!("{refused:?}");
        };
        assert_eq!(rollouts, ["r-1"]);
        assert!(store.get(&meta.id).unwrap().is_some());
        assert!(store.blob_path(&meta.id).exists());

        assert_eq!(
            store.delete(&meta.id, &NoUsers).unwrap(),
            Some(meta.clone())
        );
        assert!(!store.blob_path(&meta.id).exists());
        assert_eq!(store.delete(&meta.id, &NoUsers).unwrap(), None);
        meta.id
    };
    let store = ArtifactStore::open(&root, CACHE).unwrap();
    assert!(store.get(&id).unwrap().is_none());
    assert!(files(store.blobs_dir()).is_empty());
    // The version is free again.
    assert!(matches!(
        put(&store, b"agent", "3").0,
        Ok(Inserted::Created(_))
    ));
}

#[test]
fn open_sweeps_interrupted_uploads_and_blobs_without_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("a");
    let kept = {
        let store = ArtifactStore::open(&root, CACHE).unwrap();
        let Inserted::Created(meta) = put(&store, b"kept", "1").0.unwrap() else {
            panic!("created expected");
        };
        std::fs::write(store.temp_path(), b"half an upload").unwrap();
        std::fs::write(store.blob_path(&meta_for(b"orphan", "9").id), b"orphan").unwrap();
        meta.id
    };
    let store = ArtifactStore::open(&root, CACHE).unwrap();
    assert_eq!(files(store.blobs_dir()), vec![kept]);
}
