//! `posctl config ...` end to end against a real controller (`app::start` on loopback), so
//! the paths, bodies and views of posctl and the API are checked against each other.

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;
use crate::app::{SHUTDOWN_GRACE, ServeOptions, start};
use crate::views::{ConfigDiffView, ConfigHistoryPage, ConfigLayerView, EffectiveConfigView};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_commands_against_a_running_controller() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ServeOptions::loopback(tmp.path().join("data"));
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    start(&opts, &tracker, cancel.clone()).await.unwrap();
    let dir = opts.data_dir.display().to_string();
    let run = |args: Vec<&'static str>| {
        let dir = dir.clone();
        async move {
            let mut full = vec!["--data-dir", dir.as_str()];
            full.extend(args);
            posctl(&full, std::future::pending()).await
        }
    };

    let (result, out) = run(vec![
        "config",
        "set",
        "--fleet",
        "display.brightness=40",
        "payment.currency=EUR",
        "--comment",
        "defaults",
    ])
    .await;
    assert!(result.is_ok(), "{result:?}");
    assert!(out.starts_with("Layer fleet: version 1, changed "), "{out}");
    let (result, out) = run(vec![
        "config",
        "set",
        "--device",
        "T-1",
        "store.name=42",
        "--string",
        "-o",
        "json",
    ])
    .await;
    assert!(result.is_ok(), "{result:?}");
    let layer: ConfigLayerView = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (layer.version, &layer.document["store.name"]),
        (2, &Value::from("42"))
    );

    // Refused values: the field messages reach the operator; nothing changes.
    let (result, _) = run(vec![
        "config",
        "set",
        "--group",
        "north",
        "display.brightness=101",
        "payment.currency=eur",
    ])
    .await;
    let text = error_text(result);
    assert!(text.contains("422"), "{text}");
    assert!(
        text.contains("display.brightness: must be between 0 and 100"),
        "{text}"
    );
    assert!(
        text.contains("payment.currency: must be three capital letters"),
        "{text}"
    );
    let (result, _) = run(vec!["config", "get", "--group", "north"]).await;
    let text = error_text(result);
    assert!(text.contains("there is no group/north layer"), "{text}");

    let (result, out) = run(vec![
        "config",
        "get",
        "--device",
        "T-1",
        "--effective",
        "-o",
        "json",
    ])
    .await;
    assert!(result.is_ok(), "{result:?}");
    let eff: EffectiveConfigView = serde_json::from_str(&out).unwrap();
    assert_eq!(eff.version, 2);
    assert_eq!(eff.sources["display.brightness"], "fleet");
    let (result, out) = run(vec!["config", "get", "--device", "T-1", "--effective"]).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(
        out.contains("store.name          \"42\"   device/T-1"),
        "{out}"
    );

    let (result, out) = run(vec![
        "config",
        "set",
        "--fleet",
        "--unset",
        "payment.currency",
    ])
    .await;
    assert!(result.is_ok(), "{result:?}");
    assert!(out.contains("version 3"), "{out}");
    let (result, out) = run(vec!["config", "history", "--scope", "fleet", "-o", "json"]).await;
    assert!(result.is_ok(), "{result:?}");
    let page: ConfigHistoryPage = serde_json::from_str(&out).unwrap();
    let versions: Vec<u64> = page.entries.iter().map(|e| e.version).collect();
    assert_eq!(versions, [3, 1]);
    let (result, out) = run(vec!["config", "history"]).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(out.contains("-payment.currency"), "{out}");
    let (result, out) = run(vec![
        "config", "diff", "--from", "0", "--to", "3", "-o", "json",
    ])
    .await;
    assert!(result.is_ok(), "{result:?}");
    let diff: ConfigDiffView = serde_json::from_str(&out).unwrap();
    let keys: Vec<&str> = diff.changes.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["display.brightness", "store.name"]);
    let (result, out) = run(vec!["config", "diff", "--from", "1", "--scope", "fleet"]).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(out.contains("payment.currency  \"EUR\"  -"), "{out}");
    let (result, out) = run(vec!["config", "schema"]).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(out.contains("payment.max_amount_minor  (integer)"), "{out}");

    cancel.cancel();
    tracker.close();
    tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .expect("everything stops");
}
