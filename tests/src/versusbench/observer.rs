//! The heartbeat observer: one extra MQTT client with a controller certificate, subscribed to
//! every terminal's heartbeats (`posfleet/v1/d/+/up/hb`, QoS 1) on the broker under test, the
//! same way on posfleet and on Mosquitto. It records, per heartbeat, when it arrived and when
//! the terminal made it (`Heartbeat.sent_at_ms`; same host, same clock), and reconnects and
//! subscribes again on its own after a broker restart.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use posfleet_proto::pb;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, Request, Subscribe, SubscribeFilter,
    TlsConfiguration, Transport,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the observer subscribes to.
pub(crate) const HEARTBEATS: &str = "posfleet/v1/d/+/up/hb";
/// Pause before polling again after a connection error.
const RETRY: Duration = Duration::from_millis(50);

/// One heartbeat as the observer saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seen {
    /// Arrival at the observer, ms since the Unix epoch.
    pub(crate) received_ms: u64,
    /// `Heartbeat.sent_at_ms` of the terminal.
    pub(crate) sent_ms: u64,
}

impl Seen {
    pub(crate) fn delay_ms(&self) -> u64 {
        self.received_ms.saturating_sub(self.sent_ms)
    }
}

/// The running observer (stopped on drop).
pub(crate) struct Observer {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// SUBACKs received so far (one per (re)subscription).
    subscribed: watch::Receiver<u64>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Observer {
    /// Connects to `addr` as `client_id` with `tls` and keeps subscribing after every
    /// CONNACK; see [`Observer::subscribed`] to wait for the first SUBACK.
    pub(crate) fn start(addr: SocketAddr, client_id: &str, tls: Arc<rustls::ClientConfig>) -> Self {
        let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)))
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(
                posfleet_proto::MAX_PACKET_SIZE,
                posfleet_proto::MAX_PACKET_SIZE,
            );
        let (client, eventloop) = AsyncClient::new(options, 16);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (subscribed_tx, subscribed) = watch::channel(0);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(
            client,
            eventloop,
            Arc::clone(&seen),
            subscribed_tx,
            cancel.clone(),
        ));
        Self {
            seen,
            subscribed,
            cancel,
            task,
        }
    }

    /// Waits until the broker has acknowledged a subscription (at most `timeout`).
    pub(crate) async fn subscribed(&self, timeout: Duration) -> anyhow::Result<()> {
        let mut rx = self.subscribed.clone();
        tokio::time::timeout(timeout, rx.wait_for(|n| *n > 0))
            .await
            .map_err(|_| {
                anyhow::anyhow!("the heartbeat observer was not subscribed within {timeout:?}")
            })?
            .map_err(|_| anyhow::anyhow!("the heartbeat observer stopped"))?;
        Ok(())
    }

    /// Every heartbeat received with `received_ms` in `[from_ms, to_ms)`.
    pub(crate) fn received_between(&self, from_ms: u64, to_ms: u64) -> Vec<Seen> {
        self.lock()
            .iter()
            .filter(|s| (from_ms..to_ms).contains(&s.received_ms))
            .copied()
            .collect()
    }

    /// Every heartbeat the terminals sent in `[from_ms, to_ms)` that has arrived so far.
    pub(crate) fn sent_between(&self, from_ms: u64, to_ms: u64) -> Vec<Seen> {
        self.lock()
            .iter()
            .filter(|s| (from_ms..to_ms).contains(&s.sent_ms))
            .copied()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Seen>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the client (no DISCONNECT: the broker may be gone already).
    pub(crate) async fn stop(mut self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn run(
    _client: AsyncClient,
    mut eventloop: EventLoop,
    seen: Arc<Mutex<Vec<Seen>>>,
    subscribed: watch::Sender<u64>,
    cancel: CancellationToken,
) {
    loop {
        let polled = tokio::select! {
            () = cancel.cancelled() => return,
            polled = eventloop.poll() => polled,
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // Clean session: subscribe after every CONNACK, before anything queued.
                let filter = SubscribeFilter::new(HEARTBEATS.to_owned(), QoS::AtLeastOnce);
                eventloop
                    .pending
                    .push_front(Request::Subscribe(Subscribe::new_many([filter])));
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => subscribed.send_modify(|n| *n += 1),
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let received_ms = posfleet_proto::now_ms();
                // Anything that is not a heartbeat is not counted (it cannot be one of ours).
                if let Ok(hb) = posfleet_proto::decode::<pb::Heartbeat>(&publish.payload) {
                    seen.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
                        received_ms,
                        sent_ms: hb.sent_at_ms,
                    });
                }
            }
            Ok(_) => {}
            Err(_) => {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}
