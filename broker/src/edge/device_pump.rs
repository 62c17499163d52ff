//! The packet pump of one terminal connection (docs/decisions/0013-edge-delivers-to-terminals.md):
//! the edge answers the terminal itself and reaches the router only through the shared
//! uplink lanes (`uplinks.rs`) and the one downlink subscription (`downlinks.rs`).
//!
//! Reads and writes run concurrently: the reader validates each packet, applies
//! subscriptions, PUBACKs and PINGREQs to the terminal's session (`devices.rs`) and hands
//! uplinks to their lane; the writer writes what the session owes the connection (answers,
//! then downlinks within the in-flight window) whenever it changes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use posfleet_proto::pki::Identity;
use posfleet_proto::{DeviceId, Filter, MAX_PACKET_SIZE};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{Error as ProtocolError, Packet, Protocol, Publish, QoS};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::acl;
use super::connection::{End, Shared};
use super::devices::{Answer, DeviceSession, encode_answer, encode_publish};
use super::pump::{accept_publish, qos1_pkid, violation};
use super::uplinks::{AckTo, Refused, Uplink};

/// Uplinks per second one terminal may send, and the burst it may send at once; beyond it
/// the edge stops reading the terminal until the rate allows more (nothing is dropped).
#[derive(Debug, Clone, Copy)]
pub struct UplinkRate {
    pub per_second: u32,
    pub burst: u32,
}

impl Default for UplinkRate {
    fn default() -> Self {
        Self {
            per_second: 50,
            burst: 200,
        }
    }
}

/// A token bucket over one connection's uplinks.
struct Bucket {
    rate: UplinkRate,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: UplinkRate) -> Self {
        Self {
            rate,
            tokens: f64::from(rate.burst),
            at: Instant::now(),
        }
    }

    /// Takes one token; returns how long to wait first when there is none.
    fn take(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let per_second = f64::from(self.rate.per_second.max(1));
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_second).min(f64::from(self.rate.burst.max(1)));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return None;
        }
        let wait = (1.0 - self.tokens) / per_second;
        self.tokens -= 1.0;
        Some(Duration::from_secs_f64(wait))
    }
}

/// One attached terminal connection.
pub(super) struct DevicePump<'a> {
    pub(super) device: &'a DeviceId,
    pub(super) identity: &'a Identity,
    pub(super) session: Arc<DeviceSession>,
    pub(super) generation: u64,
    pub(super) shared: &'a Shared,
}

impl DevicePump<'_> {
    /// Moves packets both ways until the connection ends.
    pub(super) async fn run<R, W>(
        &self,
        reader: &mut R,
        writer: &mut W,
        buf: BytesMut,
        idle: Duration,
        kicked: &CancellationToken,
        shutdown: &CancellationToken,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        tokio::select! {
            end = self.inbound(reader, buf, idle) => end,
            end = self.outbound(writer) => end,
            () = kicked.cancelled() => End::Kicked,
            () = shutdown.cancelled() => End::Kicked,
        }
    }

    /// Terminal → edge.
    async fn inbound<R: AsyncRead + Unpin>(
        &self,
        reader: &mut R,
        mut buf: BytesMut,
        idle: Duration,
    ) -> End {
        let mut bucket = Bucket::new(self.shared.limits.uplink_rate);
        loop {
            while !buf.is_empty() {
                let byte1 = buf[0];
                let pkid = qos1_pkid(&buf);
                let packet = match V4.read_mut(&mut buf, MAX_PACKET_SIZE) {
                    Ok(packet) => packet,
                    Err(ProtocolError::InsufficientBytes(_)) => break,
                    Err(ProtocolError::PayloadSizeLimitExceeded(size)) => {
                        warn!(device = %self.identity, size, "packet larger than the edge allows; closing");
                        return violation(self.shared, self.identity, "oversized_packet");
                    }
                    Err(error) => {
                        warn!(device = %self.identity, %error, "malformed MQTT packet; closing");
                        return violation(self.shared, self.identity, "malformed_packet");
                    }
                };
                // Boxed: the idle connection's future holds only the read below.
                if let Some(end) = Box::pin(self.handle(packet, byte1, pkid, &mut bucket)).await {
                    return end;
                }
            }
            match tokio::time::timeout(idle, read_more(reader, &mut buf)).await {
                Err(_) => return End::Lost("keep_alive_expired"),
                Ok(Ok(0)) => return End::Lost("eof"),
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    debug!(device = %self.identity, %error, "read failed");
                    return End::Lost("io_error");
                }
            }
        }
    }

    /// Handles one terminal packet; `Some` ends the connection.
    async fn handle(
        &self,
        packet: Packet,
        byte1: u8,
        pkid: Option<u16>,
        bucket: &mut Bucket,
    ) -> Option<End> {
        let owed_ok = match packet {
            Packet::Publish(publish, _) => {
                let publish = match accept_publish(publish, byte1, self.identity, self.shared) {
                    Ok(publish) => publish,
                    Err(reason) => return Some(violation(self.shared, self.identity, reason)),
                };
                if let Some(wait) = bucket.take() {
                    self.shared.metrics.edge_uplinks_throttled_total.inc();
                    tokio::time::sleep(wait).await;
                }
                return self.uplink(publish, pkid).await;
            }
            Packet::Subscribe(subscribe, _) => {
                let mut filters = Vec::with_capacity(subscribe.filters.len());
                for filter in &subscribe.filters {
                    match acl::check_subscribe(self.identity, &filter.path) {
                        Ok(parsed) => filters.push((parsed.channel(), qos_level(filter.qos))),
                        Err(denial) => {
                            warn!(device = %self.identity, reason = denial.reason(), filter = %filter.path, "subscribe refused");
                            return Some(violation(self.shared, self.identity, denial.reason()));
                        }
                    }
                }
                self.session
                    .subscribe(self.generation, subscribe.pkid, &filters)
            }
            // MQTT-3.10.3-2: at least one filter.
            Packet::Unsubscribe(unsubscribe, _) if unsubscribe.filters.is_empty() => {
                return Some(violation(self.shared, self.identity, "malformed_packet"));
            }
            Packet::Unsubscribe(unsubscribe, _) => {
                // A filter this terminal never could have subscribed removes nothing.
                let channels: Vec<_> = unsubscribe
                    .filters
                    .iter()
                    .filter_map(|f| Filter::parse(f).ok())
                    .filter(|f| f.device() == Some(self.device))
                    .map(|f| f.channel())
                    .collect();
                self.session
                    .unsubscribe(self.generation, unsubscribe.pkid, &channels)
            }
            Packet::PubAck(puback, _) => {
                if self.session.puback(self.generation, puback.pkid).is_err() {
                    return Some(violation(self.shared, self.identity, "unexpected_puback"));
                }
                true
            }
            Packet::PingReq(_) => self.session.answer(self.generation, Answer::PingResp),
            Packet::Disconnect(..) => return Some(End::Graceful),
            Packet::PubRec(..) | Packet::PubRel(..) | Packet::PubComp(..) => {
                return Some(violation(self.shared, self.identity, "qos2_not_supported"));
            }
            Packet::Connect(..) => {
                return Some(violation(self.shared, self.identity, "second_connect"));
            }
            Packet::ConnAck(..)
            | Packet::SubAck(..)
            | Packet::UnsubAck(..)
            | Packet::PingResp(..) => {
                return Some(violation(
                    self.shared,
                    self.identity,
                    "server_packet_from_client",
                ));
            }
        };
        if owed_ok {
            None
        } else {
            Some(violation(self.shared, self.identity, "ack_backlog"))
        }
    }

    /// Hands an accepted uplink to its lane; the PUBACK comes when the router took it.
    async fn uplink(&self, publish: Publish, pkid: Option<u16>) -> Option<End> {
        if self.session.owed() >= super::devices::MAX_OWED_ANSWERS {
            return Some(violation(self.shared, self.identity, "ack_backlog"));
        }
        let ack = pkid.map(|pkid| AckTo {
            session: self.session.clone(),
            generation: self.generation,
            pkid,
        });
        match self
            .shared
            .uplinks
            .send(self.device, Uplink { publish, ack })
            .await
        {
            Ok(()) => None,
            Err(refused) => {
                let reason = refused.reason();
                // The lag gate logs once per episode, not per terminal.
                if refused != Refused::ControllerBehind {
                    warn!(device = %self.identity, reason, "uplink refused (not acknowledged); closing so the terminal sends it again");
                }
                self.shared.metrics.uplink_refused(reason);
                Some(End::Lost("uplink_refused"))
            }
        }
    }

    /// Edge → terminal: whatever the session owes this connection.
    async fn outbound<W: AsyncWrite + Unpin>(&self, writer: &mut W) -> End {
        let mut out = BytesMut::new();
        loop {
            let owed = self.session.take(self.generation);
            if owed.is_empty() {
                self.session.changed().await;
                continue;
            }
            for answer in &owed.answers {
                encode_answer(&mut out, answer);
            }
            for (pkid, qos1, dup, downlink) in &owed.publishes {
                if !encode_publish(&mut out, *pkid, *qos1, *dup, downlink) {
                    warn!(device = %self.identity, "downlink could not be encoded; dropped");
                    self.shared.metrics.downlink_dropped("unencodable");
                }
            }
            let written = Box::pin(tokio::time::timeout(
                self.shared.limits.write_timeout,
                writer.write_all(&out),
            ))
            .await;
            if !matches!(written, Ok(Ok(()))) {
                return End::Lost("write_failed");
            }
            // An idle connection keeps no write buffer.
            out = BytesMut::new();
        }
    }
}

/// Reads more of the terminal's bytes into `buf`. While nothing has arrived, an empty `buf`
/// holds no memory: an idle connection keeps no read buffer (and a large packet's buffer is
/// released once handled).
async fn read_more<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(512);
        }
        let polled = tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *reader), cx, buf);
        if polled.is_pending() && buf.is_empty() {
            *buf = BytesMut::new();
        }
        polled
    })
    .await
}

fn qos_level(qos: QoS) -> u8 {
    match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce | QoS::ExactlyOnce => 1,
    }
}
