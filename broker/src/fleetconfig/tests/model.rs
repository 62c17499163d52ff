//! The store against a `BTreeMap` model under random sequences of set, unset, replace, delete,
//! membership touches, invalid changes and reopens.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::fleetconfig::{ConfigError, ConfigSource};

const SCOPES: [&str; 4] = ["fleet", "group/a", "group/b", "device/T-1"];
const KEYS: [&str; 4] = [
    "display.brightness",
    "store.name",
    "custom.a",
    "payment.tips_enabled",
];

#[derive(Debug, Clone)]
enum Op {
    Set {
        scope: usize,
        set: Vec<(usize, i64)>,
        unset: Vec<usize>,
    },
    Replace {
        scope: usize,
        doc: Vec<(usize, i64)>,
    },
    Delete {
        scope: usize,
    },
    Touch,
    Reopen,
}

/// The value for key `k` from a seed; `display.brightness` is invalid above 100.
fn value(k: usize, seed: i64) -> Value {
    match k {
        0 => json!(seed),
        1 => json!(format!("s{}", seed % 3)),
        2 => json!(seed % 3),
        _ => json!(seed % 2 == 0),
    }
}

/// Whether the schema accepts `doc` (only `display.brightness` can be out of range).
fn valid(doc: &Map<String, Value>) -> bool {
    doc.get(KEYS[0])
        .and_then(Value::as_i64)
        .is_none_or(|b| (0..=100).contains(&b))
}

fn op() -> impl Strategy<Value = Op> {
    let entry = (0..KEYS.len(), 0i64..104);
    prop_oneof![
        4 => (0..SCOPES.len(), prop::collection::vec(entry.clone(), 0..3), prop::collection::vec(0..KEYS.len(), 0..2))
            .prop_map(|(scope, set, unset)| Op::Set { scope, set, unset }),
        2 => (0..SCOPES.len(), prop::collection::vec(entry, 0..3))
            .prop_map(|(scope, doc)| Op::Replace { scope, doc }),
        1 => (0..SCOPES.len()).prop_map(|scope| Op::Delete { scope }),
        1 => Just(Op::Touch),
        1 => Just(Op::Reopen),
    ]
}

/// One layer of the model: version, and the document unless deleted.
type ModelLayer = (u64, Option<Map<String, Value>>);

#[derive(Debug, Default)]
struct Model {
    version: u64,
    layers: BTreeMap<usize, ModelLayer>,
}

impl Model {
    fn live(&self, scope: usize) -> Option<&Map<String, Value>> {
        self.layers.get(&scope).and_then(|(_, d)| d.as_ref())
    }

    /// Applies a valid document change; no-op on an existing layer with the same document.
    fn change(&mut self, scope: usize, new: Map<String, Value>) {
        if self.live(scope) == Some(&new) {
            return;
        }
        self.version += 1;
        self.layers.insert(scope, (self.version, Some(new)));
    }
}

fn to_doc(entries: &[(usize, i64)]) -> Map<String, Value> {
    entries
        .iter()
        .map(|(k, seed)| (KEYS[*k].to_owned(), value(*k, *seed)))
        .collect()
}

fn check(store: &ConfigStore, model: &Model) {
    assert_eq!(store.version(), model.version);
    for (i, name) in SCOPES.iter().enumerate() {
        let scope = Scope::parse(name).unwrap();
        match (store.get(&scope), model.live(i)) {
            (Ok(view), Some(doc)) => {
                assert_eq!(&view.document, doc, "{name}");
                assert_eq!(view.version, model.layers[&i].0, "{name}");
            }
            (Ok(view), None) => {
                assert_eq!(scope, Scope::Fleet, "{name} should be absent");
                assert!(view.document.is_empty());
            }
            (Err(ConfigError::NotFound { .. }), None) => {}
            (other, expected) => panic!("{name}: {other:?} vs {expected:?}"),
        }
    }
    let eff = store.effective(&device("T-1"), &groups(&["a", "b"]));
    let mut expected = Map::new();
    let mut version = 0;
    for i in 0..SCOPES.len() {
        if let Some((v, doc)) = model.layers.get(&i) {
            version = version.max(*v);
            if let Some(doc) = doc {
                expected.extend(doc.clone());
            }
        }
    }
    assert_eq!(eff.document, expected);
    assert_eq!(eff.version, version);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn the_store_behaves_like_the_model(ops in prop::collection::vec(op(), 1..30)) {
        let tmp = tempfile::tempdir().unwrap();
        let mut store = open(tmp.path());
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Set { scope, set, unset } => {
                    let set_doc = to_doc(&set);
                    let unset: Vec<String> = unset.iter().map(|k| KEYS[*k].to_owned()).collect();
                    let ok = valid(&set_doc)
                        && unset.iter().all(|k| !set_doc.contains_key(k));
                    let result = store.set(&Scope::parse(SCOPES[scope]).unwrap(), set_doc.clone(), &unset, "p", "");
                    prop_assert_eq!(result.is_ok(), ok, "{:?}", result);
                    if ok {
                        let mut new = model.live(scope).cloned().unwrap_or_default();
                        for k in &unset {
                            new.remove(k);
                        }
                        new.extend(set_doc);
                        model.change(scope, new);
                    }
                }
                Op::Replace { scope, doc } => {
                    let new = to_doc(&doc);
                    let ok = valid(&new);
                    let result = store.replace(&Scope::parse(SCOPES[scope]).unwrap(), new.clone(), "p", "");
                    prop_assert_eq!(result.is_ok(), ok);
                    if ok {
                        model.change(scope, new);
                    }
                }
                Op::Delete { scope } => {
                    let result = store.delete_layer(&Scope::parse(SCOPES[scope]).unwrap(), "p", "");
                    prop_assert_eq!(result.is_ok(), model.live(scope).is_some());
                    if result.is_ok() {
                        model.version += 1;
                        model.layers.insert(scope, (model.version, None));
                    }
                }
                Op::Touch => {
                    let v = store.touch_membership(&device("T-1"), "p").unwrap();
                    model.version += 1;
                    prop_assert_eq!(v, model.version);
                    let doc = model.live(3).cloned();
                    model.layers.insert(3, (model.version, doc));
                }
                Op::Reopen => {
                    drop(store);
                    store = open(tmp.path());
                }
            }
            check(&store, &model);
        }
        // The history tells the same story: one entry per version, contiguous.
        let history = store.history(None, 1000, None).unwrap();
        let versions: Vec<u64> = history.entries.iter().map(|e| e.version).collect();
        let expected: Vec<u64> = (1..=model.version).rev().collect();
        prop_assert_eq!(versions, expected);
        // And a diff from nothing to now is the current content of every live layer.
        let diff = store.diff(None, 0, model.version).unwrap();
        let live_keys: usize = (0..SCOPES.len()).filter_map(|i| model.live(i)).map(Map::len).sum();
        prop_assert_eq!(diff.changes.len(), live_keys);
    }
}
