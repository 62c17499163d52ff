//! A model-based property test: the registry against a plain `BTreeMap` model under random
//! operation sequences (presence, heartbeats, telemetry, sweeps, commits, restarts).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use proptest::prelude::*;

use super::super::test_support::sample;
use super::super::*;
use super::{DEFAULT_INTERVAL_S, HISTORY, config, heartbeat, id, versions};
use crate::views::{DeviceSummary, Lifecycle, VersionsView};

/// One step of the model test; device ids are indexes into `DEVICES`.
#[derive(Debug, Clone)]
enum Op {
    Online {
        dev: usize,
        dt: u64,
        device_at: u64,
        model: Option<u8>,
    },
    Offline {
        dev: usize,
        dt: u64,
        device_at: u64,
        graceful: bool,
    },
    Heartbeat {
        dev: usize,
        dt: u64,
        interval_s: u32,
        agent: Option<u8>,
    },
    Telemetry {
        dev: usize,
        dt: u64,
    },
    Sweep {
        dt: u64,
    },
    Commit {
        include_touched: bool,
    },
    Restart {
        dt: u64,
    },
}

const DEVICES: [&str; 4] = ["A-1", "B-2", "c.3", "d_4"];

fn op() -> impl Strategy<Value = Op> {
    let dev = 0..DEVICES.len();
    let dt = 0u64..40_000;
    prop_oneof![
        (
            dev.clone(),
            dt.clone(),
            0u64..100,
            proptest::option::of(0u8..3)
        )
            .prop_map(|(dev, dt, device_at, model)| Op::Online {
                dev,
                dt,
                device_at,
                model
            }),
        (dev.clone(), dt.clone(), 0u64..100, any::<bool>()).prop_map(
            |(dev, dt, device_at, graceful)| Op::Offline {
                dev,
                dt,
                device_at,
                graceful
            }
        ),
        (
            dev.clone(),
            dt.clone(),
            1u32..30,
            proptest::option::of(0u8..3)
        )
            .prop_map(|(dev, dt, interval_s, agent)| Op::Heartbeat {
                dev,
                dt,
                interval_s,
                agent
            }),
        (dev, dt.clone()).prop_map(|(dev, dt)| Op::Telemetry { dev, dt }),
        dt.clone().prop_map(|dt| Op::Sweep { dt }),
        any::<bool>().prop_map(|include_touched| Op::Commit { include_touched }),
        dt.prop_map(|dt| Op::Restart { dt }),
    ]
}

/// The model: what an admin should see, written as plainly as possible.
#[derive(Debug, Clone, Default)]
struct ModelDevice {
    summary: Option<DeviceSummary>,
    interval_s: Option<u32>,
    deadline: Option<u64>,
    online_since_device: u64,
    last_hb_seq: Option<u64>,
    telemetry: VecDeque<u64>,
}

#[derive(Debug, Default)]
struct Model {
    devices: BTreeMap<String, ModelDevice>,
}

impl Model {
    fn get(&mut self, name: &str, now: u64) -> &mut ModelDevice {
        let d = self.devices.entry(name.to_owned()).or_default();
        d.summary.get_or_insert_with(|| DeviceSummary {
            id: name.to_owned(),
            lifecycle: Lifecycle::Active,
            online: false,
            offline_reason: None,
            first_seen_ms: now,
            last_seen_ms: now,
            presence_changed_ms: now,
            last_heartbeat_ms: None,
            versions: VersionsView::default(),
            model: String::new(),
            serial: String::new(),
            groups: Default::default(),
            labels: Default::default(),
        });
        d
    }
}

impl ModelDevice {
    fn s(&mut self) -> &mut DeviceSummary {
        self.summary.as_mut().unwrap()
    }
    fn arm(&mut self, now: u64) {
        let interval = u64::from(self.interval_s.unwrap_or(DEFAULT_INTERVAL_S));
        self.deadline = Some(now + 3 * interval * 1000);
    }
    fn online(&mut self, now: u64) {
        if !self.s().online {
            let s = self.s();
            s.online = true;
            s.offline_reason = None;
            s.presence_changed_ms = now;
        }
    }
    fn offline(&mut self, now: u64, reason: &str) {
        if self.s().online {
            let s = self.s();
            s.online = false;
            s.offline_reason = Some(reason.to_owned());
            s.presence_changed_ms = now;
            self.deadline = None;
            self.online_since_device = 0;
        }
    }
}

fn apply(reg: &Registry, model: &mut Model, now: u64, op: &Op) {
    match *op {
        Op::Online {
            dev,
            device_at,
            model: m,
            ..
        } => {
            let info = DeviceInfo {
                versions: None,
                model: m.map(|m| format!("M{m}")).unwrap_or_default(),
                serial: String::new(),
            };
            reg.presence_online(&id(DEVICES[dev]), now, device_at, info.clone());
            let d = model.get(DEVICES[dev], now);
            if !info.model.is_empty() {
                d.s().model = info.model;
            }
            d.s().last_seen_ms = now;
            d.online_since_device = device_at;
            d.arm(now);
            d.online(now);
        }
        Op::Offline {
            dev,
            device_at,
            graceful,
            ..
        } => {
            let reason = if graceful {
                "shutdown"
            } else {
                "connection_lost"
            };
            let known = model.devices.contains_key(DEVICES[dev]);
            let result = reg.presence_offline(&id(DEVICES[dev]), now, device_at, reason.into());
            let d = model.get(DEVICES[dev], now);
            let stale = d.s().online && device_at != 0 && device_at < d.online_since_device;
            assert_eq!(result.is_err(), stale);
            if !known {
                d.s().offline_reason = Some(reason.to_owned());
            } else if !stale {
                d.offline(now, reason);
            }
        }
        Op::Heartbeat {
            dev,
            interval_s,
            agent,
            ..
        } => {
            let seq = now;
            let v = agent.map(|a| versions(&format!("{a}.0")));
            reg.heartbeat(
                &id(DEVICES[dev]),
                now,
                heartbeat(seq, interval_s, now),
                v.clone(),
            );
            let d = model.get(DEVICES[dev], now);
            if let Some(v) = v {
                d.s().versions = v;
            }
            d.interval_s = Some(interval_s);
            d.s().last_seen_ms = now;
            d.s().last_heartbeat_ms = Some(now);
            d.last_hb_seq = Some(seq);
            d.arm(now);
            d.online(now);
        }
        Op::Telemetry { dev, .. } => {
            reg.telemetry(&id(DEVICES[dev]), now, sample(now, now));
            let d = model.get(DEVICES[dev], now);
            d.s().last_seen_ms = now;
            d.telemetry.push_back(now);
            if d.telemetry.len() > HISTORY {
                d.telemetry.pop_front();
            }
            if !d.s().online {
                d.arm(now);
            }
            d.online(now);
        }
        Op::Sweep { .. } => {
            let swept = reg.sweep(now);
            let mut expected = Vec::new();
            for (name, d) in &mut model.devices {
                if d.s().online && d.deadline.is_some_and(|t| t <= now) {
                    d.offline(now, REASON_MISSED_HEARTBEATS);
                    expected.push(name.clone());
                }
            }
            let got: Vec<String> = swept.iter().map(|(i, _)| i.to_string()).collect();
            assert_eq!(got, expected);
        }
        Op::Commit { include_touched } => {
            reg.commit_pending(include_touched).unwrap();
        }
        Op::Restart { .. } => unreachable!("handled by the caller"),
    }
}

fn check(reg: &Registry, model: &Model) {
    let expected: Vec<DeviceSummary> = model
        .devices
        .values()
        .filter_map(|d| d.summary.clone())
        .collect();
    assert_eq!(reg.list(), expected);
    assert_eq!(reg.len(), expected.len());
    assert_eq!(
        reg.online_count(),
        expected.iter().filter(|s| s.online).count()
    );
    for (name, d) in &model.devices {
        let detail = reg.detail(&id(name)).unwrap();
        assert_eq!(detail.last_heartbeat.map(|h| h.seq), d.last_hb_seq);
        let history: Vec<u64> = detail
            .telemetry_history
            .iter()
            .map(|t| t.sent_at_ms)
            .collect();
        assert_eq!(history, Vec::from(d.telemetry.clone()));
    }
}

fn dt(op: &Op) -> u64 {
    match *op {
        Op::Online { dt, .. }
        | Op::Offline { dt, .. }
        | Op::Heartbeat { dt, .. }
        | Op::Telemetry { dt, .. }
        | Op::Sweep { dt }
        | Op::Restart { dt } => dt,
        Op::Commit { .. } => 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn registry_matches_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let tmp = tempfile::tempdir().unwrap();
        let mut now = 1_000u64;
        let mut reg: Arc<Registry> = Registry::open_at(config(tmp.path()), now).unwrap();
        let mut model = Model::default();
        for op in &ops {
            now += dt(op);
            if let Op::Restart { .. } = op {
                // A graceful restart: the committer's final commit, then open again.
                reg.commit_pending(true).unwrap();
                drop(reg);
                reg = Registry::open_at(config(tmp.path()), now).unwrap();
                for d in model.devices.values_mut() {
                    if d.s().online {
                        d.offline(now, REASON_CONTROLLER_RESTART);
                    }
                    d.deadline = None;
                    d.online_since_device = 0;
                    d.last_hb_seq = None;
                    d.telemetry.clear();
                }
            } else {
                apply(&reg, &mut model, now, op);
            }
            check(&reg, &model);
        }
    }
}
