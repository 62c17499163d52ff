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

[commands]
trusted_keys = ["command.pub"]
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
    assert_eq!(
        cfg.local_api.socket,
        Path::new("/run/posfleet-agent/api.sock")
    );
    assert_eq!(cfg.local_api.tcp, None);
    assert_eq!(cfg.outbox, crate::outbox::OutboxSettings::default());
    assert_eq!(
        cfg.commands.trusted_keys,
        [Path::new("/etc/posfleet/command.pub")]
    );
    assert_eq!(
        cfg.commands.max_offline,
        Some(Duration::from_secs(72 * 3600))
    );
    assert_eq!(cfg.hooks, crate::command::HookSettings::default());
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
    assert_eq!(
        cfg.local_api,
        crate::api::LocalApiSettings::new(Path::new(DEFAULT_DATA_DIR).join("api.sock"))
    );
    assert_eq!(cfg.outbox, crate::outbox::OutboxSettings::default());
    assert_eq!(
        cfg.commands.trusted_keys,
        [Path::new("/etc/posfleet/command.pub")]
    );
    assert_eq!(
        cfg.commands.max_offline,
        Some(crate::command::DEFAULT_MAX_OFFLINE)
    );
    assert_eq!(cfg.hooks, crate::command::HookSettings::default());
}

#[test]
fn commands_and_hooks_sections_are_read_and_checked() {
    let text = r#"
[broker]
url = "mqtts://127.0.0.1:8883"

[tls]
ca = "ca.crt"
cert = "device.crt"
key = "device.key"

[commands]
trusted_keys = ["command.pub", "/keys/next.pub"]
max_offline = "0s"

[hooks]
config_apply = "hooks/config-apply"
lock = "/usr/lib/posfleet/hooks/lock"
reboot = "hooks/reboot"
timeout = "5s"
"#;
    let cfg = Config::parse(text, Path::new("/etc/posfleet")).unwrap();
    assert_eq!(
        cfg.commands.trusted_keys,
        [
            Path::new("/etc/posfleet/command.pub"),
            Path::new("/keys/next.pub")
        ]
    );
    assert_eq!(cfg.commands.max_offline, None, "0s disables the lease");
    let h = &cfg.hooks;
    assert_eq!(
        h.config_apply.as_deref(),
        Some(Path::new("/etc/posfleet/hooks/config-apply"))
    );
    assert_eq!(
        h.lock.as_deref(),
        Some(Path::new("/usr/lib/posfleet/hooks/lock"))
    );
    assert_eq!((h.unlock.as_deref(), h.wipe.as_deref()), (None, None));
    assert_eq!(
        h.reboot.as_deref(),
        Some(Path::new("/etc/posfleet/hooks/reboot"))
    );
    assert_eq!(h.timeout, Duration::from_secs(5));

    let bad = text
        .replace(r#"["command.pub", "/keys/next.pub"]"#, "[]")
        .replace(r#""0s""#, r#""1y""#)
        .replace(r#""hooks/reboot""#, r#""""#)
        .replace(r#""5s""#, r#""0s""#);
    let fields: Vec<&str> = problems(&bad).iter().map(|p| p.field).collect();
    assert_eq!(
        fields,
        [
            "commands.trusted_keys",
            "commands.max_offline",
            "hooks.timeout",
            "hooks.reboot"
        ]
    );
}

#[test]
fn updates_section_and_update_hooks_are_read_and_checked() {
    let cfg = Config::parse(MINIMAL, Path::new("/etc/posfleet")).unwrap();
    let u = &cfg.updates;
    assert!(u.trusted_release_keys.is_empty(), "optional");
    assert_eq!(u.download_dir, Path::new(DEFAULT_DATA_DIR).join("updates"));
    assert_eq!(
        (u.confirm_timeout, u.retry_attempts, u.max_retry_delay),
        (Duration::from_secs(300), 8, Duration::from_secs(300))
    );
    let text = format!(
        r#"{MINIMAL}
[updates]
trusted_release_keys = ["release.pub"]
download_dir = "/var/tmp/updates"
confirm_timeout = "2m"
retry_attempts = 3
max_retry_delay = "30s"

[hooks]
install = "hooks/install"
rollback = "/usr/lib/posfleet/hooks/rollback"
health = "hooks/health"
"#
    );
    let cfg = Config::parse(&text, Path::new("/etc/posfleet")).unwrap();
    let u = &cfg.updates;
    assert_eq!(
        u.trusted_release_keys,
        [Path::new("/etc/posfleet/release.pub")]
    );
    assert_eq!(u.download_dir, Path::new("/var/tmp/updates"));
    assert_eq!(
        (u.confirm_timeout, u.retry_attempts, u.max_retry_delay),
        (Duration::from_secs(120), 3, Duration::from_secs(30))
    );
    let h = &cfg.hooks;
    assert_eq!(
        h.install.as_deref(),
        Some(Path::new("/etc/posfleet/hooks/install"))
    );
    assert_eq!(
        h.rollback.as_deref(),
        Some(Path::new("/usr/lib/posfleet/hooks/rollback"))
    );
    assert_eq!(
        h.health.as_deref(),
        Some(Path::new("/etc/posfleet/hooks/health"))
    );
    let bad = text
        .replace(r#""2m""#, r#""1s""#)
        .replace("retry_attempts = 3", "retry_attempts = 0")
        .replace(r#""30s""#, r#""2h""#)
        .replace(r#""hooks/health""#, r#""""#);
    let fields: Vec<&str> = problems(&bad).iter().map(|p| p.field).collect();
    assert_eq!(
        fields,
        [
            "hooks.health",
            "updates.confirm_timeout",
            "updates.retry_attempts",
            "updates.max_retry_delay"
        ]
    );
}

#[test]
fn local_api_and_outbox_sections_are_read_and_checked() {
    let text = format!(
        r#"{MINIMAL}
[local_api]
socket = "run/api.sock"
tcp = "127.0.0.1:8484"
request_timeout = "2s"
max_connections = 8

[outbox]
batch_max_transactions = 100
linger = "5ms"
resend_timeout = "30s"
max_in_flight_batches = 2
cache_capacity_bytes = 262144
max_pending = 5000
idempotency_window = 1000
"#
    );
    let cfg = Config::parse(&text, Path::new("/etc/posfleet")).unwrap();
    assert_eq!(
        cfg.local_api.socket,
        Path::new("/etc/posfleet/run/api.sock")
    );
    assert_eq!(cfg.local_api.tcp, Some("127.0.0.1:8484".parse().unwrap()));
    assert_eq!(cfg.local_api.request_timeout, Duration::from_secs(2));
    assert_eq!(cfg.local_api.max_connections, 8);
    let o = cfg.outbox;
    assert_eq!((o.batch_max_transactions, o.max_in_flight), (100, 2));
    assert_eq!(
        (o.linger, o.resend_timeout),
        (Duration::from_millis(5), Duration::from_secs(30))
    );
    assert_eq!(
        (o.cache_capacity, o.max_pending, o.idempotency_window),
        (262_144, 5000, 1000)
    );

    let bad = format!(
        r#"{MINIMAL}
[local_api]
socket = "/{long}"
tcp = "0.0.0.0:8484"
request_timeout = "1h"
max_connections = 0

[outbox]
batch_max_transactions = 0
linger = "1m"
resend_timeout = "10ms"
max_in_flight_batches = 1000
cache_capacity_bytes = 10
max_pending = 1
idempotency_window = 0
"#,
        long = "s".repeat(120)
    );
    let fields: Vec<&str> = problems(&bad).iter().map(|p| p.field).collect();
    assert_eq!(
        fields,
        [
            "local_api.socket",
            "local_api.tcp",
            "local_api.request_timeout",
            "local_api.max_connections",
            "outbox.batch_max_transactions",
            "outbox.linger",
            "outbox.resend_timeout",
            "outbox.max_in_flight_batches",
            "outbox.cache_capacity_bytes",
            "outbox.max_pending",
            "outbox.idempotency_window",
        ]
    );
    let not_an_address = format!("{MINIMAL}\n[local_api]\ntcp = \"localhost:80\"\n");
    assert_eq!(problems(&not_an_address)[0].field, "local_api.tcp");
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

[commands]
trusted_keys = ["/pki/command.pub"]
max_offline = "1h"
"#;
    let cfg = Config::parse(text, Path::new("/etc/posfleet")).unwrap();
    assert_eq!(cfg.commands.max_offline, Some(Duration::from_secs(3600)));
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
            "commands.trusted_keys",
        ]
    );
}

#[test]
fn empty_file_names_the_required_settings() {
    let fields: Vec<&str> = problems("").iter().map(|p| p.field).collect();
    assert_eq!(
        fields,
        [
            "broker.url",
            "tls.ca",
            "tls.cert",
            "tls.key",
            "commands.trusted_keys"
        ]
    );
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

#[test]
fn renewal_settings_default_off_and_are_validated() {
    let cfg = Config::parse(MINIMAL, Path::new("/etc/posfleet")).unwrap();
    assert_eq!(cfg.renewal.device_url, None);
    assert_eq!(cfg.renewal.renew_before, Duration::from_secs(30 * 86_400));
    assert_eq!(cfg.renewal.check_interval, Duration::from_secs(86_400));

    let on = MINIMAL.replacen(
        "[tls]\n",
        "[tls]\ndevice_url = \"https://fleet.example:8884/\"\nrenew_before = \"45d\"\nrenew_check_interval = \"6h\"\n",
        1,
    );
    let cfg = Config::parse(&on, Path::new("/etc/posfleet")).unwrap();
    assert_eq!(
        cfg.renewal.device_url.as_deref(),
        Some("https://fleet.example:8884")
    );
    assert_eq!(cfg.renewal.renew_before, Duration::from_secs(45 * 86_400));
    assert_eq!(cfg.renewal.check_interval, Duration::from_secs(6 * 3600));

    let bad = MINIMAL.replacen(
        "[tls]\n",
        "[tls]\ndevice_url = \"http://fleet.example:8884\"\nrenew_before = \"1s\"\nrenew_check_interval = \"1x\"\n",
        1,
    );
    let fields: Vec<&str> = problems(&bad).iter().map(|p| p.field).collect();
    assert_eq!(
        fields,
        [
            "tls.device_url",
            "tls.renew_before",
            "tls.renew_check_interval"
        ]
    );
}
