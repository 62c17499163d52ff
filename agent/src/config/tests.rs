use std::path::Path;
use std::time::Duration;

use super::*;

const EXAMPLE: &str = include_str!("../../../deploy/agent/agent.example.toml");

const MINIMAL: &str = r#"
[broker]
url = "mqtts://127.0.0.1:8883"

[tls]
ca = "ca.crt"
cert = "device.crt"
key = "/etc/posfleet/device.key"
"#;

fn problems(text: &str) -> Vec<Problem> {
    match Config::parse(text, Path::new("/etc/posfleet")) {
        Err(ConfigError::Invalid { problems, .. }) => problems,
        other => panic!("expected invalid settings, got {other:?}"),
    }
}

#[test]
fn the_shipped_example_is_valid() {
    let cfg = Config::parse(EXAMPLE, Path::new("/etc/posfleet")).unwrap();
    assert_eq!(cfg.broker.port, 8883);
    assert_eq!(cfg.heartbeat_interval, Duration::from_secs(10));
    assert_eq!(cfg.telemetry_interval, Duration::from_secs(30));
    assert!(cfg.tls.key.is_absolute());
}

#[test]
fn minimal_file_gets_defaults_and_resolves_relative_paths() {
    let cfg = Config::parse(MINIMAL, Path::new("/etc/posfleet")).unwrap();
    assert_eq!(cfg.broker.host, "127.0.0.1");
    assert_eq!(cfg.tls.ca, Path::new("/etc/posfleet/ca.crt"));
    assert_eq!(cfg.tls.key, Path::new("/etc/posfleet/device.key"));
    assert_eq!(cfg.data_dir, Path::new(DEFAULT_DATA_DIR));
    assert_eq!(cfg.heartbeat_interval, DEFAULT_HEARTBEAT_INTERVAL);
    assert_eq!(cfg.telemetry_interval, DEFAULT_TELEMETRY_INTERVAL);
    assert_eq!(cfg.keep_alive, DEFAULT_KEEP_ALIVE);
    assert_eq!(cfg.backoff, Backoff::default());
    assert_eq!(cfg.sensors, SensorSource::None);
    assert_eq!(cfg.device, DeviceInfo::default());
}

#[test]
fn full_file_is_read() {
    let text = r#"
[broker]
url = "mqtts://fleet.example:9883"
keep_alive = "1m"
connect_timeout = "5s"
backoff_initial = "250ms"
backoff_max = "1m"

[tls]
ca = "/pki/ca.crt"
cert = "/pki/device.crt"
key = "/pki/device.key"

[agent]
data_dir = "state"
heartbeat_interval = "5s"
telemetry_interval = "1m"

[device]
model = "PX-500"
serial = "PX5-000123"
firmware_version = "1.4.2"
payment_app_version = "3.2.0"

[sensors]
provider = "simulated"
"#;
    let cfg = Config::parse(text, Path::new("/etc/posfleet")).unwrap();
    assert_eq!(cfg.broker.to_string(), "mqtts://fleet.example:9883");
    assert_eq!(cfg.keep_alive, Duration::from_secs(60));
    assert_eq!(cfg.backoff.initial, Duration::from_millis(250));
    assert_eq!(cfg.data_dir, Path::new("/etc/posfleet/state"));
    assert_eq!(cfg.heartbeat_interval, Duration::from_secs(5));
    assert_eq!(cfg.device.serial, "PX5-000123");
    assert_eq!(cfg.sensors, SensorSource::Simulated);
}

#[test]
fn unknown_fields_are_refused_with_their_name() {
    let text = format!("{MINIMAL}\n[device]\nid = \"T-1\"\n");
    match Config::parse(&text, Path::new("/")) {
        Err(ConfigError::Syntax { message, .. }) => {
            assert!(message.contains("unknown field `id`"), "{message}");
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
    assert!(matches!(
        Config::parse("colour = \"blue\"\n", Path::new("/")),
        Err(ConfigError::Syntax { .. })
    ));
}

#[test]
fn every_invalid_field_is_reported_at_once() {
    let text = r#"
[broker]
url = "mqtt://plaintext:1883"
keep_alive = "1s"
backoff_initial = "10m"
backoff_max = "1m"

[tls]
cert = ""

[agent]
heartbeat_interval = "10"
telemetry_interval = "0s"

[device]
model = "a\u0007bell"
serial = "0123456789012345678901234567890123456789012345678901234567890123456789"

[sensors]
provider = "real"
"#;
    let fields: Vec<&str> = problems(text).iter().map(|p| p.field).collect();
    assert_eq!(
        fields,
        [
            "broker.url",
            "broker.keep_alive",
            "broker.backoff_max",
            "tls.ca",
            "tls.cert",
            "tls.key",
            "agent.heartbeat_interval",
            "agent.telemetry_interval",
            "device.model",
            "device.serial",
            "sensors.provider",
        ]
    );
}

#[test]
fn empty_file_names_the_required_settings() {
    let fields: Vec<&str> = problems("").iter().map(|p| p.field).collect();
    assert_eq!(fields, ["broker.url", "tls.ca", "tls.cert", "tls.key"]);
}

#[test]
fn load_reports_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("agent.toml");
    let err = Config::load(&missing).unwrap_err();
    assert!(err.to_string().contains("agent.toml"), "{err}");

    std::fs::write(&missing, "[broker]\nurl = \"mqtt://x\"\n").unwrap();
    let err = Config::load(&missing).unwrap_err().to_string();
    assert!(
        err.contains("agent.toml") && err.contains("broker.url"),
        "{err}"
    );
    assert!(err.contains("invalid setting"), "{err}");
}
