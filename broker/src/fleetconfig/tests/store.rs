use serde_json::json;

use super::*;
use crate::fleetconfig::{ConfigError, ConfigSource, MEMBERSHIP_COMMENT};
use crate::views::ConfigChangeKind;

#[test]
fn versions_rise_across_changes_and_survive_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("config");
    {
        let store = open(&dir);
        assert_eq!(store.version(), 0);
        let v1 = store
            .set(
                &Scope::Fleet,
                doc(json!({"payment.currency": "EUR"})),
                &[],
                "admin",
                "first",
            )
            .unwrap();
        assert_eq!(v1.version, 1);
        let v2 = store
            .set(
                &group("store-12"),
                doc(json!({"display.brightness": 70})),
                &[],
                "alice",
                "",
            )
            .unwrap();
        assert_eq!(v2.version, 2);
    }
    // What a kill during snapshot generation leaves behind must not stop the reopen.
    std::fs::write(dir.join("snap.00000000000000A0.generating"), b"x").unwrap();
    let store = open(&dir);
    assert_eq!(store.version(), 2);
    let fleet = store.get(&Scope::Fleet).unwrap();
    assert_eq!(fleet.document, doc(json!({"payment.currency": "EUR"})));
    assert_eq!((fleet.version, fleet.author.as_str()), (1, "admin"));
    let v3 = store
        .set(
            &Scope::Fleet,
            doc(json!({"display.brightness": 5})),
            &[],
            "admin",
            "",
        )
        .unwrap();
    assert_eq!(v3.version, 3, "the counter continues after a reopen");
    let list = store.list();
    assert_eq!(list.version, 3);
    let scopes: Vec<&str> = list.layers.iter().map(|l| l.scope.as_str()).collect();
    assert_eq!(scopes, ["fleet", "group/store-12"]);
    assert_eq!(list.layers[0].keys, 2);
}

#[test]
fn precedence_is_fleet_then_groups_by_name_then_device() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let set = |scope: &Scope, value: Value| {
        store.set(scope, doc(value), &[], "admin", "").unwrap();
    };
    set(
        &Scope::Fleet,
        json!({"display.brightness": 10, "payment.currency": "EUR", "store.name": "fleet"}),
    );
    set(
        &group("b"),
        json!({"display.brightness": 30, "store.name": "b"}),
    );
    set(
        &group("a"),
        json!({"display.brightness": 20, "payment.tips_enabled": true}),
    );
    set(
        &Scope::Device(device("T-1")),
        json!({"store.name": "device"}),
    );
    set(&group("unrelated"), json!({"payment.currency": "CHF"}));

    let (eff, sources) = store.effective_with_sources(&device("T-1"), &groups(&["b", "a"]));
    assert_eq!(
        eff.document,
        doc(json!({
            "display.brightness": 30,
            "payment.currency": "EUR",
            "payment.tips_enabled": true,
            "store.name": "device",
        }))
    );
    assert_eq!(sources["display.brightness"], group("b"));
    assert_eq!(sources["payment.currency"], Scope::Fleet);
    assert_eq!(sources["payment.tips_enabled"], group("a"));
    assert_eq!(sources["store.name"], Scope::Device(device("T-1")));
    assert_eq!(eff.version, 4, "the unrelated group (5) does not count");
    assert_eq!(
        ConfigSource::effective(&store, &device("T-1"), &groups(&["b", "a"])),
        eff
    );

    let other = store.effective(&device("T-2"), &groups(&["missing"]));
    assert_eq!(other.version, 1);
    assert_eq!(other.document.len(), 3);
}

#[test]
fn effective_version_rises_with_membership_touches_and_deletions() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let t1 = device("T-1");
    assert_eq!(store.effective(&t1, &groups(&[])).version, 0);
    store
        .set(
            &group("g"),
            doc(json!({"display.brightness": 1})),
            &[],
            "admin",
            "",
        )
        .unwrap();
    assert_eq!(store.effective(&t1, &groups(&[])).version, 0);
    assert_eq!(store.effective(&t1, &groups(&["g"])).version, 1);

    // Joining a group with an older layer: without the touch the version would not rise.
    let touched = store.touch_membership(&t1, "registry").unwrap();
    assert_eq!(touched, 2);
    assert_eq!(store.effective(&t1, &groups(&["g"])).version, 2);
    // The device layer did not appear: a touch changes no document.
    assert!(matches!(
        store.get(&Scope::Device(t1.clone())),
        Err(ConfigError::NotFound { .. })
    ));
    let entry = &store.history(None, 1, None).unwrap().entries[0];
    assert_eq!(entry.kind, ConfigChangeKind::Membership);
    assert_eq!(entry.comment, MEMBERSHIP_COMMENT);
    assert!(entry.diff.is_empty());

    // A touch of an existing device layer keeps its document.
    store
        .set(
            &Scope::Device(t1.clone()),
            doc(json!({"store.name": "x"})),
            &[],
            "admin",
            "",
        )
        .unwrap();
    assert_eq!(store.touch_membership(&t1, "registry").unwrap(), 4);
    let layer = store.get(&Scope::Device(t1.clone())).unwrap();
    assert_eq!((layer.version, layer.document.len()), (4, 1));

    // Deleting the group layer is a change of its own, after which its keys are gone.
    let deleted = store.delete_layer(&group("g"), "admin", "bye").unwrap();
    assert!(deleted.deleted);
    assert_eq!(deleted.version, 5);
    let eff = store.effective(&t1, &groups(&["g"]));
    assert_eq!(eff.version, 5);
    assert_eq!(eff.document, doc(json!({"store.name": "x"})));
    assert!(matches!(
        store.delete_layer(&group("g"), "admin", ""),
        Err(ConfigError::NotFound { .. })
    ));
    assert!(store.list().layers.iter().all(|l| l.scope != "group/g"));

    // Deletions and touches survive a reopen.
    drop(store);
    let store = open(tmp.path());
    assert_eq!(store.effective(&t1, &groups(&["g"])).version, 5);
    assert_eq!(store.effective(&device("T-9"), &groups(&["g"])).version, 5);
}

#[test]
fn no_op_changes_record_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let fleet = Scope::Fleet;
    store
        .set(
            &fleet,
            doc(json!({"display.brightness": 5})),
            &[],
            "admin",
            "",
        )
        .unwrap();
    let again = store
        .set(
            &fleet,
            doc(json!({"display.brightness": 5})),
            &["store.name".into()],
            "bob",
            "",
        )
        .unwrap();
    assert_eq!((again.version, again.author.as_str()), (1, "admin"));
    let replaced = store
        .replace(&fleet, doc(json!({"display.brightness": 5})), "bob", "")
        .unwrap();
    assert_eq!(replaced.version, 1);
    assert_eq!(store.version(), 1);
    assert_eq!(store.history(None, 10, None).unwrap().entries.len(), 1);
    // Creating an empty layer is a change (the layer now exists).
    let created = store
        .set(&group("empty"), doc(json!({})), &[], "admin", "")
        .unwrap();
    assert_eq!(created.version, 2);
}

#[test]
fn invalid_changes_change_nothing_and_report_every_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    store
        .set(
            &Scope::Fleet,
            doc(json!({"display.brightness": 5})),
            &[],
            "admin",
            "",
        )
        .unwrap();
    let mut rx = store.changes();
    rx.borrow_and_update();
    let err = store
        .set(
            &Scope::Fleet,
            doc(json!({"display.brightness": 500, "payment.currency": "EUR", "nope": 1})),
            &["a..b".into(), "payment.currency".into()],
            "admin",
            "",
        )
        .unwrap_err();
    let ConfigError::Invalid(fields) = err else {
        panic!("{err}");
    };
    let keys: Vec<&str> = fields.iter().map(|f| f.key.as_str()).collect();
    assert_eq!(
        keys,
        ["display.brightness", "nope", "a..b", "payment.currency"]
    );
    let err = store
        .replace(
            &Scope::Fleet,
            doc(json!({"store.name": 1})),
            "admin",
            &"c".repeat(501),
        )
        .unwrap_err();
    let ConfigError::Invalid(fields) = err else {
        panic!("{err}");
    };
    assert_eq!(fields.len(), 2);
    // Too many keys once merged with what the layer already holds.
    let mut many = Map::new();
    for i in 0..200 {
        many.insert(format!("custom.k{i}"), json!(i));
    }
    assert!(matches!(
        store.set(&Scope::Fleet, many, &[], "admin", ""),
        Err(ConfigError::Invalid(_))
    ));
    assert!(store.set(&Scope::Fleet, Map::new(), &[], "", "").is_err());

    assert_eq!(store.version(), 1);
    assert_eq!(store.get(&Scope::Fleet).unwrap().document.len(), 1);
    assert!(!rx.has_changed().unwrap(), "no change is announced");
}

#[tokio::test]
async fn changes_bump_the_watch_after_each_durable_change() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let mut rx = store.changes();
    assert_eq!(*rx.borrow_and_update(), 0);
    store
        .set(
            &Scope::Fleet,
            doc(json!({"display.brightness": 5})),
            &[],
            "admin",
            "",
        )
        .unwrap();
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), 1);
    store.touch_membership(&device("T-1"), "registry").unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), rx.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*rx.borrow_and_update(), 2);
    // A no-op is not announced.
    store
        .set(
            &Scope::Fleet,
            doc(json!({"display.brightness": 5})),
            &[],
            "admin",
            "",
        )
        .unwrap();
    assert!(!rx.has_changed().unwrap());
}

#[test]
fn history_pages_and_filters() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    for i in 0..5 {
        store
            .set(
                &Scope::Fleet,
                doc(json!({"display.brightness": i})),
                &[],
                "admin",
                &format!("c{i}"),
            )
            .unwrap();
        store
            .set(
                &group("g"),
                doc(json!({"display.brightness": i})),
                &[],
                "bob",
                "",
            )
            .unwrap();
    }
    let page = store.history(None, 3, None).unwrap();
    let versions: Vec<u64> = page.entries.iter().map(|e| e.version).collect();
    assert_eq!(versions, [10, 9, 8]);
    assert_eq!(page.next_before, Some(8));
    let fleet = store.history(Some(&Scope::Fleet), 2, Some(8)).unwrap();
    let versions: Vec<u64> = fleet.entries.iter().map(|e| e.version).collect();
    assert_eq!(versions, [7, 5]);
    assert_eq!(fleet.entries[0].comment, "c3");
    let first = &store.history(Some(&Scope::Fleet), 10, Some(2)).unwrap();
    assert_eq!(first.entries.len(), 1);
    assert_eq!(first.next_before, None);
    let change = &first.entries[0].diff[0];
    assert_eq!(
        (change.old.clone(), change.new.clone()),
        (None, Some(json!(0)))
    );
    assert!(store.history(None, 10, Some(0)).unwrap().entries.is_empty());
    assert!(
        store
            .history(Some(&group("none")), 10, None)
            .unwrap()
            .entries
            .is_empty()
    );
}

#[test]
fn diffs_fold_changes_between_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path());
    let fleet = Scope::Fleet;
    store
        .set(
            &fleet,
            doc(json!({"display.brightness": 1, "store.name": "a"})),
            &[],
            "admin",
            "",
        )
        .unwrap(); // 1
    store
        .set(
            &group("g"),
            doc(json!({"display.brightness": 9})),
            &[],
            "admin",
            "",
        )
        .unwrap(); // 2
    store
        .set(
            &fleet,
            doc(json!({"display.brightness": 2})),
            &["store.name".into()],
            "admin",
            "",
        )
        .unwrap(); // 3
    store
        .set(
            &fleet,
            doc(json!({"display.brightness": 1, "payment.currency": "EUR"})),
            &[],
            "admin",
            "",
        )
        .unwrap(); // 4
    store.delete_layer(&group("g"), "admin", "").unwrap(); // 5

    let d = store.diff(Some(&fleet), 1, 4).unwrap();
    let shown: Vec<(String, Option<Value>, Option<Value>)> = d
        .changes
        .iter()
        .map(|c| (c.key.clone(), c.old.clone(), c.new.clone()))
        .collect();
    // brightness went 1 → 2 → 1: no difference.
    assert_eq!(
        shown,
        [
            ("payment.currency".into(), None, Some(json!("EUR"))),
            ("store.name".into(), Some(json!("a")), None),
        ]
    );
    let all = store.diff(None, 0, 5).unwrap();
    let scopes: Vec<&str> = all.changes.iter().map(|c| c.scope.as_str()).collect();
    assert_eq!(
        scopes,
        ["fleet", "fleet"],
        "the group was created and deleted"
    );
    let g = store.diff(Some(&group("g")), 1, 2).unwrap();
    assert_eq!(g.changes.len(), 1);
    assert!(store.diff(None, 3, 3).unwrap().changes.is_empty());
    assert!(matches!(
        store.diff(None, 4, 3),
        Err(ConfigError::BadRange(_))
    ));
    assert!(matches!(
        store.diff(None, 0, 6),
        Err(ConfigError::BadRange(_))
    ));
}

#[test]
fn history_is_pruned_to_its_limit_and_diffs_say_so() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ConfigStoreConfig {
        cache_capacity: 1 << 20,
        max_history: 3,
        ..ConfigStoreConfig::new(tmp.path())
    };
    {
        let store = ConfigStore::open(cfg.clone()).unwrap();
        for i in 0..5 {
            store
                .set(
                    &Scope::Fleet,
                    doc(json!({"display.brightness": i})),
                    &[],
                    "admin",
                    "",
                )
                .unwrap();
        }
        assert_eq!(store.oldest_retained(), 3);
    }
    let store = ConfigStore::open(cfg).unwrap();
    assert_eq!(store.oldest_retained(), 3);
    let versions: Vec<u64> = store
        .history(Some(&Scope::Fleet), 10, None)
        .unwrap()
        .entries
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(versions, [5, 4, 3]);
    assert!(matches!(
        store.diff(None, 1, 5),
        Err(ConfigError::Pruned { oldest_from: 2, .. })
    ));
    assert_eq!(store.diff(None, 2, 5).unwrap().changes.len(), 1);
}
