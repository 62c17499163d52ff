use clap::Parser;
use serde_json::json;

use super::*;
use crate::posctl::{ApiCommand, Cli, Command, ConfigCommand};
use crate::views::{ConfigHistoryEntry, ConfigKeyChange, ConfigScopedChange};

#[test]
fn key_value_pairs_split_at_the_first_equals_sign() {
    assert_eq!(
        parse_assignment("receipt.footer=a=b"),
        Ok(("receipt.footer".into(), "a=b".into()))
    );
    assert_eq!(
        parse_assignment("store.name="),
        Ok(("store.name".into(), String::new()))
    );
    assert!(parse_assignment("=5").is_err());
    assert!(parse_assignment("display.brightness").is_err());
}

#[test]
fn values_are_integers_booleans_or_strings() {
    assert_eq!(parse_value("80", false), Ok(json!(80)));
    assert_eq!(parse_value("-12", false), Ok(json!(-12)));
    assert_eq!(parse_value("0", false), Ok(json!(0)));
    assert_eq!(
        parse_value("9223372036854775807", false),
        Ok(json!(i64::MAX))
    );
    assert!(parse_value("9223372036854775808", false).is_err());
    assert_eq!(parse_value("true", false), Ok(json!(true)));
    assert_eq!(parse_value("false", false), Ok(json!(false)));
    // Not integers: strings (the server says which type the key wants).
    for s in [
        "1.5",
        "1e3",
        "+5",
        "-",
        "",
        "12a",
        "True",
        "EUR",
        "02:00-04:00",
    ] {
        assert_eq!(parse_value(s, false), Ok(json!(s)), "{s:?}");
    }
    assert!(parse_value("null", false).unwrap_err().contains("--unset"));
    for s in ["80", "true", "null"] {
        assert_eq!(parse_value(s, true), Ok(json!(s)));
    }
}

#[test]
fn assignments_refuse_duplicates() {
    let pairs = vec![
        ("display.brightness".to_owned(), "80".to_owned()),
        ("store.name".to_owned(), "123".to_owned()),
    ];
    let set = assignments(&pairs, false).unwrap();
    assert_eq!(set["display.brightness"], json!(80));
    assert_eq!(set["store.name"], json!(123));
    assert_eq!(
        assignments(&pairs, true).unwrap()["store.name"],
        json!("123")
    );
    let twice = vec![
        ("a.b".to_owned(), "1".to_owned()),
        ("a.b".to_owned(), "2".to_owned()),
    ];
    assert!(assignments(&twice, false).is_err());
    let null = vec![("a.b".to_owned(), "null".to_owned())];
    assert!(format!("{:#}", assignments(&null, false).unwrap_err()).starts_with("a.b: "));
}

fn parse(args: &[&str]) -> Result<ConfigCommand, clap::Error> {
    let cli = Cli::try_parse_from(std::iter::once("posctl").chain(args.iter().copied()))?;
    match cli.command {
        Command::Api(ApiCommand::Config(cmd)) => Ok(cmd),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_command_line_needs_exactly_one_scope() {
    let ConfigCommand::Set(set) = parse(&[
        "config",
        "set",
        "--group",
        "store-12",
        "display.brightness=80",
        "payment.currency=EUR",
        "--unset",
        "store.name",
        "--comment",
        "brighter",
    ])
    .unwrap() else {
        panic!()
    };
    assert_eq!(set.scope.scope(), Scope::Group("store-12".into()));
    assert_eq!(set.assignments.len(), 2);
    assert_eq!(set.unset, ["store.name"]);
    assert_eq!(set.comment.as_deref(), Some("brighter"));
    let ConfigCommand::Get(get) =
        parse(&["config", "get", "--device", "T-1", "--effective"]).unwrap()
    else {
        panic!()
    };
    assert!(get.effective);
    assert_eq!(get.scope.scope().to_string(), "device/T-1");
    let ConfigCommand::Get(get) = parse(&["config", "get", "--fleet"]).unwrap() else {
        panic!()
    };
    assert_eq!(get.scope.scope(), Scope::Fleet);

    for bad in [
        &["config", "set", "a.b=1"][..],
        &["config", "set", "--fleet", "--group", "g", "a.b=1"],
        &["config", "set", "--group", "a b", "a.b=1"],
        &["config", "set", "--device", "-x", "a.b=1"],
        &["config", "set", "--fleet", "novalue"],
        &["config", "history", "--scope", "groups/x"],
        &["config", "history", "--limit", "0"],
        &["config", "diff", "--to", "3"],
    ] {
        assert!(parse(bad).is_err(), "{bad:?}");
    }
    let ConfigCommand::Diff(diff) = parse(&[
        "config", "diff", "--from", "2", "--to", "5", "--scope", "group/a",
    ])
    .unwrap() else {
        panic!()
    };
    assert_eq!((diff.from, diff.to), (2, Some(5)));
    assert_eq!(diff.scope, Some(Scope::Group("a".into())));
}

#[test]
fn tables_show_values_as_json_and_escape_control_characters() {
    let layer = ConfigLayerView {
        scope: "group/north".into(),
        version: 7,
        document: serde_json::from_value(
            json!({"store.name": "123", "display.brightness": 80, "receipt.footer": "a\u{1b}[2J"}),
        )
        .unwrap(),
        author: "admin".into(),
        changed_at_ms: 1_709_211_909_000,
        deleted: false,
    };
    let text = render_layer(&layer);
    assert!(
        text.starts_with("Layer group/north: version 7, changed 2024-02-29"),
        "{text}"
    );
    assert!(text.contains("\"123\""), "{text}");
    assert!(text.contains("display.brightness  80"), "{text}");
    assert!(!text.contains('\u{1b}'), "{text}");

    let page = ConfigHistoryPage {
        entries: vec![ConfigHistoryEntry {
            version: 3,
            scope: "fleet".into(),
            kind: ConfigChangeKind::Set,
            author: "admin".into(),
            at_ms: 1_709_211_909_000,
            comment: "why".into(),
            diff: vec![
                ConfigKeyChange {
                    key: "a.b".into(),
                    old: None,
                    new: Some(json!(1)),
                },
                ConfigKeyChange {
                    key: "c.d".into(),
                    old: Some(json!(1)),
                    new: None,
                },
                ConfigKeyChange {
                    key: "e.f".into(),
                    old: Some(json!(1)),
                    new: Some(json!(2)),
                },
            ],
        }],
        next_before: Some(3),
    };
    let text = render_history(&page);
    assert!(text.contains("+a.b -c.d ~e.f"), "{text}");
    assert!(text.contains("--before 3"), "{text}");

    let diff = ConfigDiffView {
        from: 1,
        to: 3,
        scope: None,
        changes: vec![ConfigScopedChange {
            scope: "fleet".into(),
            key: "a.b".into(),
            old: None,
            new: Some(json!("x")),
        }],
    };
    let text = render_diff(&diff);
    assert!(text.contains("fleet  a.b  -    \"x\""), "{text}");
}
