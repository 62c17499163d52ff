//! Shared pieces of the e2e tests.

use std::time::Duration;

use posfleet_broker::views::DeviceDetail;
use posfleet_tests::{Agent, AgentOptions, Api, Binaries, Broker, BrokerOptions, eventually};

/// Bound for anything that should happen within a few heartbeat intervals.
pub const WAIT: Duration = Duration::from_secs(20);

/// The wrapper binaries Cargo built for this test binary.
pub fn bins() -> Binaries {
    Binaries {
        broker: env!("CARGO_BIN_EXE_pf-broker").into(),
        agent: env!("CARGO_BIN_EXE_pf-agent").into(),
        posctl: env!("CARGO_BIN_EXE_pf-posctl").into(),
    }
}

/// A `serve` broker with the default options.
pub async fn broker() -> Broker {
    broker_with(BrokerOptions::default()).await
}

pub async fn broker_with(opts: BrokerOptions) -> Broker {
    match Broker::start(&bins(), opts).await {
        Ok(broker) => broker,
        Err(error) => panic!("the broker did not start: {error:#}"),
    }
}

/// An agent with 1 s heartbeats and telemetry and simulated sensors.
pub fn agent(broker: &Broker, id: &str) -> Agent {
    match Agent::start(broker, id, &AgentOptions::default()) {
        Ok(agent) => agent,
        Err(error) => panic!("agent {id} did not start: {error:#}"),
    }
}

/// Waits until `id` is online with a heartbeat and a telemetry sample; returns its detail.
pub async fn online(api: &Api, id: &str) -> DeviceDetail {
    eventually(WAIT, || async {
        let device = api.device(id).await?;
        let Some(device) = device else {
            anyhow::bail!("{id} unknown to the API");
        };
        anyhow::ensure!(
            device.summary.online
                && device.last_heartbeat.is_some()
                && device.latest_telemetry.is_some(),
            "{id} not online with heartbeat and telemetry yet: {device:?}"
        );
        Ok(device)
    })
    .await
}

/// Waits until `id` is offline; returns its detail.
pub async fn offline(api: &Api, id: &str) -> DeviceDetail {
    eventually(WAIT, || async {
        let device = api.device(id).await?;
        let Some(device) = device else {
            anyhow::bail!("{id} unknown to the API");
        };
        anyhow::ensure!(!device.summary.online, "{id} still online: {device:?}");
        Ok(device)
    })
    .await
}

/// The sequence number of `id`'s last heartbeat (0 if none yet or unknown).
pub async fn heartbeat_seq(api: &Api, id: &str) -> u64 {
    match api.device(id).await {
        Ok(device) => device.and_then(|d| d.last_heartbeat).map_or(0, |hb| hb.seq),
        Err(error) => panic!("GET device {id}: {error:#}"),
    }
}

/// Waits until `id` is online and its heartbeat sequence has gone past `seq`: the terminal is
/// alive and being ingested *now*. Returns the new sequence number.
pub async fn heartbeats_after(api: &Api, id: &str, seq: u64) -> u64 {
    eventually(WAIT, || async {
        let device = api
            .device(id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("{id} unknown to the API"))?;
        let now = device.last_heartbeat.as_ref().map_or(0, |hb| hb.seq);
        anyhow::ensure!(
            device.summary.online && now > seq,
            "{id}: heartbeat seq {now} (waiting for > {seq}), online={}",
            device.summary.online
        );
        Ok(now)
    })
    .await
}
