//! One MQTT connection after its TLS handshake: CONNECT, identity check, router link, the
//! packet pump (`pump.rs`) and teardown.
//!
//! Reads and writes run concurrently so a client that is slow to read cannot stall the intake
//! of its PUBACKs.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use posfleet_proto::MAX_PACKET_SIZE;
use posfleet_proto::pki::{CertFacts, Identity};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{
    ConnAck, ConnectReturnCode, Disconnect, DisconnectReasonCode, Error as ProtocolError, Packet,
    Protocol, Publish, QoS,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Fatal;
use super::acl;
use super::device_pump::{DevicePump, UplinkRate};
use super::devices::DeviceSessions;
use super::gate::DeviceGate;
use super::pump::{Ledger, inbound, outbound, send_to_router};
use super::router::RouterHandle;
use super::sessions::{ClaimError, SessionSlot, Sessions};
use super::uplinks::{Refused, Uplink, Uplinks};
use crate::enrolment::{Revocations, Standing};
use crate::metrics::Metrics;

/// Timeouts of one connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// CONNECT must arrive this soon after the TLS handshake.
    pub connect_timeout: Duration,
    /// Idle limit for clients that ask for keep-alive 0.
    pub max_idle: Duration,
    /// Bound on writing to a client and on the TLS close at the end.
    pub write_timeout: Duration,
    /// Uplink rate limit of each terminal connection.
    pub uplink_rate: UplinkRate,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            max_idle: Duration::from_secs(20 * 60),
            write_timeout: Duration::from_secs(30),
            uplink_rate: UplinkRate::default(),
        }
    }
}

/// What every connection task shares.
pub(crate) struct Shared {
    pub(crate) router: RouterHandle,
    pub(crate) sessions: Sessions,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) limits: ConnectionLimits,
    pub(crate) fatal: Fatal,
    /// Closed until the controller has subscribed (embedded setup).
    pub(crate) device_gate: DeviceGate,
    /// Revoked certificates and retired devices (see `EdgeConfig::revocations`).
    pub(crate) revocations: Option<Arc<Revocations>>,
    /// Terminal sessions, held by the edge (no router link per terminal).
    pub(crate) devices: Arc<DeviceSessions>,
    /// The shared links terminal uplinks reach the router through.
    pub(crate) uplinks: Uplinks,
}

impl Shared {
    /// The standing of a certificate; always good without a revocation view.
    fn standing(&self, identity: &Identity, cert: &CertFacts) -> Standing {
        self.revocations
            .as_ref()
            .map_or(Standing::Good, |r| r.check(identity, cert))
    }
}

/// How a connection ended, which decides the teardown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// The client sent DISCONNECT: no will.
    Graceful,
    /// The connection broke (EOF, I/O error, keep-alive expired): publish the will.
    Lost(&'static str),
    /// We refused a packet and close: publish the will, count the refusal.
    Violation(&'static str),
    /// Ended from outside (takeover, revocation, shutdown): no will.
    Kicked,
    /// The router removed the link itself: its id may already belong to someone else, so
    /// nothing more may be sent on it.
    RouterGone,
}

/// A will accepted at CONNECT, published by the edge if the connection is lost.
struct Will {
    topic: Bytes,
    payload: Bytes,
}

/// Runs one authenticated TLS connection to completion.
pub(crate) async fn run<S>(
    stream: S,
    peer: SocketAddr,
    identity: Identity,
    cert: CertFacts,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(1024);
    // Boxed, like every other step an idle connection has left behind: a future's size is
    // that of its largest state, and an idle terminal should hold only the pump's.
    let connect = Box::pin(tokio::time::timeout(
        shared.limits.connect_timeout,
        read_connect(&mut reader, &mut buf),
    ))
    .await;
    let packet = match connect {
        Err(_) => return refuse_silently(&shared, &identity, peer, "connect_timeout"),
        Ok(Err(UNSUPPORTED_LEVEL)) => {
            // MQTT-3.1.2-2: answer CONNACK 0x01 so the client can tell why.
            info!(device = %identity, %peer, "CONNECT with an unsupported protocol level; refused");
            shared.metrics.refuse(UNSUPPORTED_LEVEL);
            let _ = write_connack(&mut writer, ConnectReturnCode::RefusedProtocolVersion).await;
            return;
        }
        Ok(Err(reason)) => return refuse_silently(&shared, &identity, peer, reason),
        Ok(Ok(packet)) => packet,
    };
    let Packet::Connect(connect, _, will, _, _) = packet else {
        return refuse_silently(&shared, &identity, peer, "not_connect");
    };

    // Identity comes from the certificate; the client id must agree or be empty.
    let client_id = identity.client_id();
    if !connect.client_id.is_empty() && connect.client_id != client_id {
        warn!(device = %identity, %peer, presented = ?connect.client_id, "client id differs from certificate identity; refused");
        shared.metrics.refuse("client_id_mismatch");
        let _ = write_connack(&mut writer, ConnectReturnCode::ClientIdentifierNotValid).await;
        return;
    }
    let will = match will {
        None => None,
        Some(will) => {
            if will.qos == QoS::ExactlyOnce {
                return refuse_with(&shared, &mut writer, &identity, "will_qos2").await;
            }
            if let Err(denial) = acl::check_publish(&identity, &will.topic, will.message.len()) {
                warn!(device = %identity, reason = denial.reason(), "last will refused");
                return refuse_with(&shared, &mut writer, &identity, "will_not_allowed").await;
            }
            // Copied out of the read buffer, which it would otherwise keep alive for as long
            // as the connection lasts.
            Some(Will {
                topic: Bytes::copy_from_slice(&will.topic),
                payload: Bytes::copy_from_slice(&will.message),
            })
        }
    };

    // A resumed TLS session (stateless tickets, `tls.rs`) skips certificate verification,
    // so the validity period is checked here, for every connection.
    if !valid_at(&cert, posfleet_proto::now_ms() / 1000) {
        return refuse_with(&shared, &mut writer, &identity, "certificate_expired").await;
    }

    // Revoked certificates and retired terminals are refused before they use anything.
    let standing = shared.standing(&identity, &cert);
    if standing != Standing::Good {
        return refuse_with(&shared, &mut writer, &identity, standing.reason()).await;
    }

    // Before the rate limit: waiting for the controller must not use up a terminal's connects.
    if identity.device().is_some() && !shared.device_gate.is_open() {
        debug!(device = %identity, "controller not subscribed yet; terminal told to retry");
        shared.metrics.refuse("controller_not_ready");
        let _ = write_connack(&mut writer, ConnectReturnCode::ServiceUnavailable).await;
        return;
    }

    let mut slot = match shared.sessions.claim(&client_id).await {
        Ok(slot) => slot,
        Err(ClaimError::RateLimited) => {
            warn!(device = %identity, "connect rate limit exceeded; refused");
            shared.metrics.refuse("rate_limited");
            let _ = write_connack(&mut writer, ConnectReturnCode::ServiceUnavailable).await;
            return;
        }
        Err(ClaimError::TakeoverTimeout) => {
            warn!(device = %identity, "previous session did not end in time; refused");
            shared.metrics.refuse("takeover_timeout");
            let _ = write_connack(&mut writer, ConnectReturnCode::ServiceUnavailable).await;
            return;
        }
    };

    // A revocation between the check above and the claim found no session to close: check
    // again now that this session can be kicked.
    let standing = shared.standing(&identity, &cert);
    if standing != Standing::Good {
        slot.detached();
        shared.sessions.release(&slot);
        return refuse_with(&shared, &mut writer, &identity, standing.reason()).await;
    }
    if let Some(revocations) = &shared.revocations {
        revocations.note_connected(&identity, &cert);
    }

    if let Identity::Device(device) = &identity {
        let end = run_device(
            DeviceConnection {
                device,
                identity: &identity,
                peer,
                clean_session: connect.clean_session,
                keep_alive: connect.keep_alive,
                will,
                generation: slot.generation,
            },
            &mut reader,
            &mut writer,
            buf,
            &shared,
            &slot.cancel,
            &shutdown,
        )
        .await;
        slot.detached();
        shared.sessions.release(&slot);
        finish(&mut writer, &shared, &identity, peer, end).await;
        return;
    }

    // Boxed: controllers are few, and their path must not size every terminal's future.
    Box::pin(run_controller(
        ControllerConnection {
            identity: &identity,
            client_id,
            peer,
            clean_session: connect.clean_session,
            keep_alive: connect.keep_alive,
            will,
        },
        reader,
        writer,
        buf,
        slot,
        &shared,
        &shutdown,
    ))
    .await;
}

/// What a controller (or other non-terminal) connection brought from its CONNECT.
struct ControllerConnection<'a> {
    identity: &'a Identity,
    client_id: String,
    peer: SocketAddr,
    clean_session: bool,
    keep_alive: u16,
    will: Option<Will>,
}

/// A controller connection: its own router link, CONNACK, the pump, the will.
async fn run_controller<R, W>(
    conn: ControllerConnection<'_>,
    mut reader: R,
    mut writer: W,
    buf: BytesMut,
    mut slot: SessionSlot,
    shared: &Shared,
    shutdown: &CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let ControllerConnection {
        identity,
        client_id,
        peer,
        clean_session,
        keep_alive,
        will,
    } = conn;
    // LinkBuilder::build blocks until the router answers.
    let router = shared.router.clone();
    let (link_id, clean) = (client_id, clean_session);
    let built = tokio::task::spawn_blocking(move || router.build_link(&link_id, clean)).await;
    let (link_tx, link_rx, connack) = match built {
        Ok(Ok(link)) => link,
        Ok(Err(error)) => {
            warn!(device = %identity, %error, "router refused the connection");
            shared.metrics.refuse("router_refused");
            let _ = write_connack(&mut writer, ConnectReturnCode::ServiceUnavailable).await;
            if !shared.router.is_alive() {
                shared.fatal.raise("router thread is gone");
            }
            slot.detached();
            shared.sessions.release(&slot);
            return;
        }
        Err(join) => {
            shared
                .fatal
                .raise(format!("router link task failed: {join}"));
            slot.detached();
            shared.sessions.release(&slot);
            return;
        }
    };

    let mut out = BytesMut::with_capacity(64);
    if let Some(Packet::ConnAck(ack, _)) = Option::<Packet>::from(connack) {
        let _ = V4.write(Packet::ConnAck(ack, None), &mut out);
    }
    let attached = Attached {
        link_tx,
        link_rx,
        identity,
        shared,
        will,
    };
    let written = tokio::time::timeout(shared.limits.write_timeout, writer.write_all(&out)).await;
    let end = if matches!(written, Ok(Ok(()))) {
        shared.metrics.edge_connects_total.inc();
        shared.metrics.edge_connections.inc();
        info!(device = %identity, %peer, clean_session, keep_alive, "connected");
        let end = Box::pin(attached.pump(
            &mut reader,
            &mut writer,
            buf,
            keep_alive,
            &slot.cancel,
            shutdown,
        ))
        .await;
        shared.metrics.edge_connections.dec();
        end
    } else {
        // The client never saw its CONNACK: detach without a will.
        attached.teardown(End::Kicked);
        End::Lost("connack_write")
    };
    slot.detached();
    shared.sessions.release(&slot);
    finish(&mut writer, shared, identity, peer, end).await;
}

/// What a terminal connection brought from its CONNECT.
struct DeviceConnection<'a> {
    device: &'a posfleet_proto::DeviceId,
    identity: &'a Identity,
    peer: SocketAddr,
    clean_session: bool,
    keep_alive: u16,
    will: Option<Will>,
    generation: u64,
}

/// A terminal connection: its session in the edge, CONNACK, the pump, the will.
async fn run_device<R, W>(
    conn: DeviceConnection<'_>,
    reader: &mut R,
    writer: &mut W,
    buf: BytesMut,
    shared: &Shared,
    kicked: &CancellationToken,
    shutdown: &CancellationToken,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (session, present) =
        shared
            .devices
            .attach(conn.device, conn.generation, conn.clean_session);
    let mut out = BytesMut::with_capacity(4);
    let ack = ConnAck {
        session_present: present,
        code: ConnectReturnCode::Success,
    };
    let _ = V4.write(Packet::ConnAck(ack, None), &mut out);
    let written = tokio::time::timeout(shared.limits.write_timeout, writer.write_all(&out)).await;
    if !matches!(written, Ok(Ok(()))) {
        // The client never saw its CONNACK: no will.
        shared.devices.detach(conn.device, conn.generation);
        return End::Lost("connack_write");
    }
    drop(out);
    shared.metrics.edge_connects_total.inc();
    shared.metrics.edge_connections.inc();
    info!(device = %conn.identity, peer = %conn.peer, clean_session = conn.clean_session, keep_alive = conn.keep_alive, session_present = present, "connected");
    let pump = DevicePump {
        device: conn.device,
        identity: conn.identity,
        session,
        generation: conn.generation,
        shared,
    };
    let end = pump
        .run(
            reader,
            writer,
            buf,
            idle_limit(shared, conn.keep_alive),
            kicked,
            shutdown,
        )
        .await;
    shared.metrics.edge_connections.dec();
    shared.devices.detach(conn.device, conn.generation);
    if matches!(end, End::Lost(_) | End::Violation(_))
        && let Some(will) = conn.will
    {
        let publish = Publish::new(will.topic, will.payload, false);
        match shared
            .uplinks
            .try_send(conn.device, Uplink { publish, ack: None })
        {
            Ok(()) => {}
            Err(Refused::ControllerBehind) => {
                // Logged once per episode by the lag gate; the sweeper marks it offline.
                shared.metrics.uplink_refused("will_controller_behind");
            }
            Err(_) => {
                warn!(device = %conn.identity, "last will not published: the uplink lane is full");
                shared.metrics.uplink_refused("will_lane_full");
            }
        }
    }
    end
}

/// Whether `cert` is within its validity period at `now` (Unix seconds).
fn valid_at(cert: &CertFacts, now: u64) -> bool {
    let now = i64::try_from(now).unwrap_or(i64::MAX);
    cert.not_before <= now && now <= cert.not_after
}

/// How long a connection may stay silent.
fn idle_limit(shared: &Shared, keep_alive: u16) -> Duration {
    if keep_alive == 0 {
        shared.limits.max_idle
    } else {
        // MQTT 3.1.1 §3.1.2.10: one and a half keep-alive periods.
        Duration::from_millis(u64::from(keep_alive) * 1500)
    }
}

struct Attached<'a> {
    link_tx: LinkTx,
    link_rx: LinkRx,
    identity: &'a Identity,
    shared: &'a Shared,
    will: Option<Will>,
}

impl Attached<'_> {
    /// Moves packets both ways until the connection ends, then detaches from the router.
    async fn pump<R, W>(
        mut self,
        reader: &mut R,
        writer: &mut W,
        buf: BytesMut,
        keep_alive: u16,
        kicked: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let ledger = Mutex::new(Ledger::default());
        let idle = idle_limit(self.shared, keep_alive);
        let end = {
            let inbound = inbound(
                reader,
                buf,
                idle,
                &mut self.link_tx,
                self.identity,
                self.shared,
                &ledger,
            );
            let outbound = outbound(writer, &mut self.link_rx, self.shared, &ledger);
            tokio::select! {
                end = inbound => end,
                end = outbound => end,
                _ = kicked.cancelled() => End::Kicked,
                _ = shutdown.cancelled() => End::Kicked,
            }
        };
        self.teardown(end);
        end
    }

    /// Detaches from the router in-band: the will (if the connection was lost) and a
    /// DISCONNECT, in one batch. Never touches the link after the router dropped it.
    fn teardown(mut self, end: End) {
        let mut packets = Vec::with_capacity(2);
        match end {
            End::RouterGone => return,
            End::Lost(_) | End::Violation(_) => {
                if let Some(will) = self.will.take() {
                    packets.push(Packet::Publish(
                        Publish::new(will.topic, will.payload, false),
                        None,
                    ));
                }
            }
            End::Graceful | End::Kicked => {}
        }
        packets.push(Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
            },
            None,
        ));
        if let Err(error) = send_to_router(&self.shared.router, &mut self.link_tx, packets) {
            self.shared
                .fatal
                .raise(format!("router channel closed during teardown: {error}"));
        }
    }
}

/// Refusal reason of a CONNECT whose protocol level is not 4 (MQTT 3.1.1).
const UNSUPPORTED_LEVEL: &str = "unsupported_protocol_level";

/// Reads until one complete packet (the CONNECT) is buffered.
async fn read_connect<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<Packet, &'static str> {
    loop {
        if !buf.is_empty() {
            match V4.read_mut(buf, MAX_PACKET_SIZE) {
                Ok(packet) => return Ok(packet),
                Err(ProtocolError::InsufficientBytes(_)) => {}
                Err(ProtocolError::InvalidProtocolLevel(_)) => return Err(UNSUPPORTED_LEVEL),
                Err(_) => return Err("malformed_connect"),
            }
        }
        match reader.read_buf(buf).await {
            Ok(0) => return Err("eof_before_connect"),
            Ok(_) => {}
            Err(_) => return Err("io_before_connect"),
        }
    }
}

async fn write_connack<W: AsyncWrite + Unpin>(
    writer: &mut W,
    code: ConnectReturnCode,
) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(4);
    let ack = ConnAck {
        session_present: false,
        code,
    };
    if V4.write(Packet::ConnAck(ack, None), &mut out).is_ok() {
        tokio::time::timeout(Duration::from_secs(5), async {
            writer.write_all(&out).await?;
            writer.shutdown().await
        })
        .await
        .unwrap_or(Ok(()))?;
    }
    Ok(())
}

fn refuse_silently(shared: &Shared, identity: &Identity, peer: SocketAddr, reason: &'static str) {
    info!(device = %identity, %peer, reason, "connection closed before CONNECT");
    shared.metrics.refuse(reason);
}

async fn refuse_with<W: AsyncWrite + Unpin>(
    shared: &Shared,
    writer: &mut W,
    identity: &Identity,
    reason: &'static str,
) {
    warn!(device = %identity, reason, "CONNECT refused");
    shared.metrics.refuse(reason);
    let _ = write_connack(writer, ConnectReturnCode::NotAuthorized).await;
}

async fn finish<W: AsyncWrite + Unpin>(
    writer: &mut W,
    shared: &Shared,
    identity: &Identity,
    peer: SocketAddr,
    end: End,
) {
    info!(device = %identity, %peer, end = ?end, "disconnected");
    let _ = tokio::time::timeout(
        shared.limits.write_timeout.min(Duration::from_secs(2)),
        writer.shutdown(),
    )
    .await;
}

#[cfg(test)]
mod validity_tests {
    use super::*;

    #[test]
    fn certificates_are_valid_only_within_their_period() {
        let cert = CertFacts {
            serial: "0a".to_owned(),
            not_before: 1_000,
            not_after: 2_000,
        };
        assert!(!valid_at(&cert, 999), "not yet valid");
        assert!(valid_at(&cert, 1_000));
        assert!(valid_at(&cert, 2_000));
        assert!(!valid_at(&cert, 2_001), "expired");
        assert!(!valid_at(&cert, u64::MAX), "far future");
    }
}
