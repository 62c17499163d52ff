//! Hand-made MQTT clients for the bad-input tests: any certificate (or none), any client id,
//! any topic and payload; and raw TLS sockets that never speak MQTT.
//!
//! TLS configs come from `posfleet_runtime::tls`, the project's one place that builds client
//! configs, so a refusal here is the edge's doing, not a difference in TLS setup.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use posfleet_proto::pki::CertifiedKey;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet,
    Publish, QoS, TlsConfiguration, Transport,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Bound on each step of a client (connect, publish ack, subscribe ack, close).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Incoming PUBLISHes kept while the client waits for something else (oldest dropped).
const RECEIVED_CAPACITY: usize = 256;

/// A client TLS config trusting `ca_pem`, presenting `identity` if given.
pub fn tls_config(
    ca_pem: &[u8],
    identity: Option<&CertifiedKey>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    match identity {
        Some(id) => Ok(posfleet_runtime::tls::client_config_from_pem(
            ca_pem,
            id.cert_pem.as_bytes(),
            id.key_pem.as_bytes(),
        )?),
        None => {
            let roots = posfleet_runtime::tls::root_store_from_pem(ca_pem)?;
            Ok(Arc::new(
                rustls::ClientConfig::builder_with_provider(posfleet_runtime::tls::provider())
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            ))
        }
    }
}

/// An MQTT 3.1.1 client over TLS whose event loop the test drives step by step.
pub struct MqttClient {
    client: AsyncClient,
    eventloop: EventLoop,
    /// PUBLISHes that arrived while waiting for an ack, for [`MqttClient::next_publish`].
    received: VecDeque<Publish>,
}

impl std::fmt::Debug for MqttClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttClient").finish_non_exhaustive()
    }
}

/// How a connection attempt ended.
#[derive(Debug)]
pub enum Connect {
    /// CONNACK "accepted".
    Accepted(Box<MqttClient>),
    /// Anything else: TLS failure, CONNACK refusal, closed socket. The text says which.
    Refused(String),
}

impl Connect {
    /// The connected client, or an error saying why it was refused.
    pub fn accepted(self) -> anyhow::Result<MqttClient> {
        match self {
            Connect::Accepted(client) => Ok(*client),
            Connect::Refused(why) => Err(anyhow!("connection refused: {why}")),
        }
    }

    /// The refusal text, or an error if the connection was accepted.
    pub fn refused(self) -> anyhow::Result<String> {
        match self {
            Connect::Accepted(_) => Err(anyhow!("connection was accepted, expected a refusal")),
            Connect::Refused(why) => Ok(why),
        }
    }
}

impl MqttClient {
    /// Connects to `addr` as `client_id` with `tls` and waits for the CONNACK (or the
    /// refusal), at most [`STEP_TIMEOUT`]. Packets up to 1 MiB may be sent (so that the
    /// edge, not the client, decides what is too big).
    pub async fn connect(
        addr: SocketAddr,
        client_id: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<Connect> {
        Self::connect_within(addr, client_id, tls, None, STEP_TIMEOUT).await
    }

    /// [`MqttClient::connect`] with a last will in the CONNECT.
    pub async fn connect_with_will(
        addr: SocketAddr,
        client_id: &str,
        tls: Arc<rustls::ClientConfig>,
        will: Option<LastWill>,
    ) -> anyhow::Result<Connect> {
        Self::connect_within(addr, client_id, tls, will, STEP_TIMEOUT).await
    }

    /// [`MqttClient::connect_with_will`], waiting at most `limit` for the CONNACK. The
    /// whole attempt (TCP connect, TLS handshake, CONNECT, CONNACK) has that bound: rumqttc's
    /// own connection timeout (5 s unless set) is raised to it, so it cannot cut the attempt
    /// shorter than the caller asked.
    pub async fn connect_within(
        addr: SocketAddr,
        client_id: &str,
        tls: Arc<rustls::ClientConfig>,
        will: Option<LastWill>,
        limit: Duration,
    ) -> anyhow::Result<Connect> {
        let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        options.set_keep_alive(Duration::from_secs(10));
        options.set_max_packet_size(1024 * 1024, 1024 * 1024);
        if let Some(will) = will {
            options.set_last_will(will);
        }
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        let mut network = eventloop.network_options();
        network.set_connection_timeout(limit.as_secs().max(1));
        eventloop.set_network_options(network);
        let outcome = tokio::time::timeout(limit, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        return if ack.code == rumqttc::ConnectReturnCode::Success {
                            Ok(())
                        } else {
                            Err(format!("CONNACK {:?}", ack.code))
                        };
                    }
                    Ok(_) => {}
                    Err(error) => return Err(describe(&error)),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no CONNACK or error within {limit:?}"))?;
        Ok(match outcome {
            Ok(()) => Connect::Accepted(Box::new(Self {
                client,
                eventloop,
                received: VecDeque::new(),
            })),
            Err(why) => Connect::Refused(why),
        })
    }

    /// Publishes at QoS 1 and waits for the PUBACK. `Err` carries why the connection
    /// ended instead (the edge closes it on a refused publish).
    pub async fn publish(&mut self, topic: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .context("queueing the publish")?;
        self.until(|event| matches!(event, Event::Incoming(Packet::PubAck(_))))
            .await
    }

    /// Subscribes at QoS 1 and waits for the SUBACK. `Err` carries why the connection
    /// ended instead (the edge closes it on a refused subscribe).
    pub async fn subscribe(&mut self, filter: &str) -> anyhow::Result<()> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .context("queueing the subscribe")?;
        self.until(|event| matches!(event, Event::Incoming(Packet::SubAck(_))))
            .await
    }

    /// Polls until the connection ends; returns why (at most [`STEP_TIMEOUT`]).
    pub async fn closed(&mut self) -> anyhow::Result<String> {
        tokio::time::timeout(STEP_TIMEOUT, async {
            loop {
                if let Err(error) = self.eventloop.poll().await {
                    return describe(&error);
                }
            }
        })
        .await
        .map_err(|_| anyhow!("the connection was still open after {STEP_TIMEOUT:?}"))
    }

    /// Sends DISCONNECT and waits until it is written.
    pub async fn disconnect(mut self) -> anyhow::Result<()> {
        self.client
            .disconnect()
            .await
            .context("queueing DISCONNECT")?;
        self.until(|event| matches!(event, Event::Outgoing(Outgoing::Disconnect)))
            .await
    }

    /// The next PUBLISH the server delivers (to a subscription of this client), waiting at
    /// most `timeout`. QoS 1 deliveries are acknowledged by the event loop.
    pub async fn next_publish(&mut self, timeout: Duration) -> anyhow::Result<Publish> {
        if let Some(publish) = self.received.pop_front() {
            return Ok(publish);
        }
        tokio::time::timeout(timeout, async {
            loop {
                match self.eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(publish))) => return Ok(publish),
                    Ok(_) => {}
                    Err(error) => bail!("connection ended: {}", describe(&error)),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no PUBLISH within {timeout:?}"))?
    }

    async fn until(&mut self, done: impl Fn(&Event) -> bool) -> anyhow::Result<()> {
        let received = &mut self.received;
        let eventloop = &mut self.eventloop;
        tokio::time::timeout(STEP_TIMEOUT, async {
            loop {
                match eventloop.poll().await {
                    Ok(event) if done(&event) => return Ok(()),
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        if received.len() >= RECEIVED_CAPACITY {
                            received.pop_front();
                        }
                        received.push_back(publish);
                    }
                    Ok(_) => {}
                    Err(error) => bail!("connection ended: {}", describe(&error)),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no answer within {STEP_TIMEOUT:?}"))?
    }
}

fn describe(error: &ConnectionError) -> String {
    match error {
        ConnectionError::ConnectionRefused(code) => format!("CONNACK {code:?}"),
        other => other.to_string(),
    }
}

/// A TLS connection to the edge that has finished its handshake and never sends anything.
/// With TLS 1.3 the server checks the client certificate after the client considers the
/// handshake done, so a refusal may only show as the server closing the socket.
pub async fn tls_connect(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("TCP connect to {addr}"))?;
    let name = rustls::pki_types::ServerName::from(addr.ip());
    tokio::time::timeout(STEP_TIMEOUT, TlsConnector::from(tls).connect(name, tcp))
        .await
        .map_err(|_| anyhow!("TLS handshake with {addr} did not finish in {STEP_TIMEOUT:?}"))?
        .context("TLS handshake")
}

/// Waits until the peer closes `stream` (EOF, reset or TLS alert), at most `timeout`.
/// Returns what was read before, if anything.
pub async fn wait_closed<S>(stream: &mut S, timeout: Duration) -> anyhow::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    tokio::time::timeout(timeout, async {
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .map_err(|_| anyhow!("the server kept the connection open for {timeout:?}"))?;
    Ok(seen)
}
