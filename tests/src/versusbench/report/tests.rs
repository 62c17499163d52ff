use super::*;

fn report(target: Target, connect_s: f64, rss_steady_kib_per_terminal: u64) -> TargetReport {
    let n = 1000;
    TargetReport {
        target,
        terminals: n,
        processes: 1,
        heartbeat_interval: Duration::from_secs(10),
        connect: Phase {
            took: Some(Duration::from_secs_f64(connect_s)),
            max_connected: n as u64,
            attempts: 1100,
        },
        rss_before: 10 << 20,
        rss_connected: (10 << 20) + n as u64 * 40 * 1024,
        rss_steady: (10 << 20) + n as u64 * rss_steady_kib_per_terminal * 1024,
        connect_cpu: 2.0,
        issuer_cpu: (target == Target::Mosquitto).then_some(0.5),
        simulator_cpu: 3.0,
        window: Window {
            wall: Duration::from_secs(20),
            observed: 2000,
            sent: 2000,
            delays: Delays::from_unsorted((1..=100).collect()),
            broker_cpu: 1.0,
        },
        storm: Storm {
            listening: Duration::from_millis(300),
            phase: Phase {
                took: None,
                max_connected: 990,
                attempts: 3000,
            },
            delays: Delays::default(),
        },
        clean_stop: true,
    }
}

fn value(r: &TargetReport, key: &str) -> Option<f64> {
    (figure(key).expect(key).value)(r)
}

#[test]
fn quantiles_are_nearest_rank() {
    let values: Vec<u64> = (1..=100).collect();
    assert_eq!(quantile(&values, 0.5), Some(50));
    assert_eq!(quantile(&values, 0.99), Some(99));
    assert_eq!(quantile(&values, 1.0), Some(100));
    assert_eq!(quantile(&[7], 0.99), Some(7));
    assert_eq!(quantile(&[], 0.5), None);
    let d = Delays::from_unsorted(vec![30, 10, 20]);
    assert_eq!(
        (d.count, d.p50_ms, d.p99_ms, d.max_ms),
        (3, Some(20), Some(30), Some(30))
    );
}

#[test]
fn ratios_need_both_sides_and_a_non_zero_divisor() {
    assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
    assert_eq!(ratio(Some(3.0), Some(0.0)), None);
    assert_eq!(ratio(None, Some(2.0)), None);
    assert_eq!(ratio(Some(3.0), None), None);
}

#[test]
fn per_terminal_figures_divide_by_the_fleet() {
    let r = report(Target::Posfleet, 1.5, 64);
    assert_eq!(value(&r, "connect_s"), Some(1.5));
    assert_eq!(value(&r, "attempts_per_terminal"), Some(1.1));
    assert_eq!(value(&r, "connect_cpu_ms_per_terminal"), Some(2.0));
    assert_eq!(value(&r, "rss_kib_per_terminal"), Some(64.0));
    assert_eq!(value(&r, "rss_kib_per_terminal_connected"), Some(40.0));
    assert_eq!(value(&r, "hb_per_s"), Some(100.0));
    assert_eq!(value(&r, "window_cpu_pct"), Some(5.0));
    assert_eq!(value(&r, "window_cpu_us_per_hb"), Some(500.0));
    assert_eq!(value(&r, "hb_p99_ms"), Some(99.0));
    assert_eq!(value(&r, "issuer_cpu_ms_per_terminal"), None);
    assert_eq!(value(&r, "reconnect_s"), None);
    assert_eq!(value(&r, "reconnect_attempts_per_terminal"), Some(3.0));
    assert_eq!(value(&r, "storm_hb_p99_ms"), None);
}

#[test]
fn table_and_key_values_show_both_brokers_and_their_ratio() {
    let run = VersusRun {
        terminals: 1000,
        processes: 1,
        results: vec![
            (Target::Posfleet, Ok(report(Target::Posfleet, 3.0, 64))),
            (Target::Mosquitto, Ok(report(Target::Mosquitto, 1.5, 16))),
        ],
    };
    let table = run.to_string();
    assert!(
        table
            .contains("| all terminals connected, from simulator start | 3.00 s | 1.50 s | 2.00 |"),
        "{table}"
    );
    assert!(
        table.contains(
            "| broker RSS per terminal, connected and idle (after the window) | 64.0 KiB | 16.0 KiB | 4.00 |"
        ),
        "{table}"
    );
    assert!(
        table.contains("| SIGKILL → all terminals connected again | - | - | - |"),
        "{table}"
    );
    let kv = run.key_values();
    assert!(kv.starts_with("versus terminals=1000 processes=1 "), "{kv}");
    for expected in [
        " posfleet_connect_s=3.00 ",
        " mosquitto_connect_s=1.50 ",
        " ratio_connect_s=2.000 ",
        " ratio_rss_kib_per_terminal=4.000 ",
        " mosquitto_issuer_cpu_ms_per_terminal=0.500 ",
    ] {
        assert!(kv.contains(expected), "{expected:?} missing in {kv}");
    }
    assert!(!kv.contains("reconnect_s="), "{kv}");
    assert!(!kv.contains("posfleet_issuer"), "{kv}");
}

#[test]
fn a_failed_run_is_shown_and_the_other_broker_still_reported() {
    let run = VersusRun {
        terminals: 1000,
        processes: 1,
        results: vec![
            (Target::Posfleet, Ok(report(Target::Posfleet, 3.0, 64))),
            (
                Target::Mosquitto,
                Err("mosquitto exited (exit status: 3)".into()),
            ),
        ],
    };
    let table = run.to_string();
    assert!(
        table.contains("mosquitto run failed: mosquitto exited"),
        "{table}"
    );
    assert!(table.contains("| 3.00 s | - | - |"), "{table}");
    let kv = run.key_values();
    assert!(kv.contains(" mosquitto_failed=1"), "{kv}");
    assert!(!kv.contains("ratio_"), "{kv}");

    let report = VersusReport {
        machine: Machine::default(),
        nofile: NofileLimit {
            soft_before: Some(1024),
            soft: Some(20_000),
            hard: Some(20_000),
        },
        heartbeat_interval: Duration::from_secs(10),
        window: Duration::from_secs(20),
        runs: vec![run.clone(), run],
    };
    let sizes = report.sizes_table();
    let rows: Vec<&str> = sizes.lines().collect();
    assert_eq!(rows.len(), 2 + 4, "{sizes}");
    assert!(
        rows[2].starts_with("| 1000 | posfleet | 3.00 s | 1.100 | 2.000 ms | 64.0 KiB |"),
        "{sizes}"
    );
    assert!(rows[3].starts_with("| 1000 | mosquitto | - |"), "{sizes}");
}
