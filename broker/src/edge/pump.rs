//! The packet pump of one attached connection: client → router (parse, validate, forward in
//! batches) and router → client (write notifications, answer `Unschedule` with a wake).
//!
//! Every packet from the client is checked here before the router sees it, because the router
//! disconnects (and, on a later stale wake, panics) on protocol errors it detects itself
//! (docs/rumqtt.md): QoS 2, unsolicited or out-of-order acks, non-UTF-8 topics and
//! `$` filters never reach it.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use posfleet_proto::MAX_PACKET_SIZE;
use posfleet_proto::pki::Identity;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{
    Error as ProtocolError, Packet, PingReq, Protocol, Publish, QoS, UnsubAck,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use super::acl;
use super::connection::{End, Shared};
use super::router::{LinkFailure, RouterHandle};

/// Most answers (PINGRESP, PUBACK, SUBACK) the router may owe one client. rumqttd queues a
/// connection's answers without bound while the edge cannot write them, so a client that sends
/// requests and never reads would grow the broker's memory (~380 bytes per PINGREQ). Real
/// clients are bounded by their in-flight window (posfleet's: 32) plus a PINGREQ or two.
pub(crate) const MAX_OWED_ANSWERS: usize = 1024;

/// What the two halves of a connection's pump tell each other (they run in one task).
#[derive(Debug, Default)]
pub(super) struct Ledger {
    /// PUBLISH ids written to the client at QoS 1, in order; its PUBACKs must match.
    inflight: VecDeque<u16>,
    /// Answers forwarded requests are owed by the router and not yet taken by `outbound`.
    owed: usize,
    /// One entry per PINGREQ forwarded, in order: `None` for the client's own, `Some(pkid)`
    /// for the marker sent behind an UNSUBSCRIBE. The router answers UNSUBSCRIBE with one
    /// UNSUBACK per filter it actually removed (none for a filter never subscribed, though
    /// MQTT-3.10.4-5 requires one), so the edge drops those and turns the marker's PINGRESP
    /// into the single UNSUBACK the client is owed, after the router applied it.
    pings: VecDeque<Option<u16>>,
}

fn lock(ledger: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    ledger.lock().unwrap_or_else(|e| e.into_inner())
}

/// Client → router: parse, validate, forward in batches.
pub(super) async fn inbound<R: AsyncRead + Unpin>(
    reader: &mut R,
    mut buf: BytesMut,
    idle: Duration,
    link_tx: &mut LinkTx,
    identity: &Identity,
    shared: &Shared,
    ledger: &Mutex<Ledger>,
) -> End {
    let mut batch = Vec::new();
    // A controller's uplink subscription opens the device gate once it is in the router.
    let mut opens_gate = false;
    loop {
        while !buf.is_empty() {
            let byte1 = buf[0];
            let packet = match V4.read_mut(&mut buf, MAX_PACKET_SIZE) {
                Ok(packet) => packet,
                Err(ProtocolError::InsufficientBytes(_)) => break,
                Err(ProtocolError::PayloadSizeLimitExceeded(size)) => {
                    warn!(device = %identity, size, "packet larger than the edge allows; closing");
                    return violation(shared, identity, "oversized_packet");
                }
                Err(error) => {
                    warn!(device = %identity, %error, "malformed MQTT packet; closing");
                    return violation(shared, identity, "malformed_packet");
                }
            };
            match check_inbound(packet, byte1, identity, shared, ledger) {
                Inbound::Forward(packet) => {
                    let unsubscribe = matches!(packet, Packet::Unsubscribe(..));
                    opens_gate |= matches!(identity, Identity::Controller(_))
                        && matches!(packet, Packet::Subscribe(..));
                    batch.push(packet);
                    if unsubscribe {
                        batch.push(Packet::PingReq(PingReq));
                    }
                }
                Inbound::Graceful => {
                    flush(shared, link_tx, &mut batch);
                    return End::Graceful;
                }
                Inbound::Refuse(reason) => {
                    flush(shared, link_tx, &mut batch);
                    return violation(shared, identity, reason);
                }
            }
        }
        if !flush(shared, link_tx, &mut batch) {
            return End::RouterGone;
        }
        if std::mem::take(&mut opens_gate) {
            shared.device_gate.open();
        }
        // Release the memory of a large packet once it has been handled.
        if buf.is_empty() && buf.capacity() > 16 * 1024 {
            buf = BytesMut::with_capacity(1024);
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(1024);
        }
        match tokio::time::timeout(idle, reader.read_buf(&mut buf)).await {
            Err(_) => return End::Lost("keep_alive_expired"),
            Ok(Ok(0)) => return End::Lost("eof"),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                debug!(device = %identity, %error, "read failed");
                return End::Lost("io_error");
            }
        }
    }
}

/// Sends a batch to the router; false (after raising fatal) if the router is gone.
fn flush(shared: &Shared, link_tx: &mut LinkTx, batch: &mut Vec<Packet>) -> bool {
    if batch.is_empty() {
        return true;
    }
    match send_to_router(&shared.router, link_tx, std::mem::take(batch)) {
        Ok(()) => true,
        Err(error) => {
            shared
                .fatal
                .raise(format!("router channel closed: {error}"));
            false
        }
    }
}

// Short-lived and moved once per packet; boxing would cost an allocation per packet.
#[allow(clippy::large_enum_variant)]
enum Inbound {
    Forward(Packet),
    Graceful,
    Refuse(&'static str),
}

/// Decides what happens to one client packet.
fn check_inbound(
    packet: Packet,
    byte1: u8,
    identity: &Identity,
    shared: &Shared,
    ledger: &Mutex<Ledger>,
) -> Inbound {
    let decision = validate(packet, byte1, identity, shared, ledger);
    if let Inbound::Forward(packet) = &decision {
        let ping = match packet {
            Packet::PingReq(..) => Some(None),
            Packet::Unsubscribe(unsubscribe, _) => Some(Some(unsubscribe.pkid)),
            _ => None,
        };
        let answered = match packet {
            Packet::Publish(..) => (byte1 >> 1) & 0b11 == 1,
            Packet::Subscribe(..) => true,
            _ => ping.is_some(),
        };
        if answered {
            let mut ledger = lock(ledger);
            if let Some(ping) = ping {
                ledger.pings.push_back(ping);
            }
            ledger.owed += 1;
            if ledger.owed > MAX_OWED_ANSWERS {
                return Inbound::Refuse("ack_backlog");
            }
        }
    }
    decision
}

/// Validates one client packet (ACL, protocol) and strips what the router must not see.
fn validate(
    packet: Packet,
    byte1: u8,
    identity: &Identity,
    shared: &Shared,
    ledger: &Mutex<Ledger>,
) -> Inbound {
    match packet {
        Packet::Publish(publish, _) => match accept_publish(publish, byte1, identity, shared) {
            Ok(publish) => Inbound::Forward(Packet::Publish(publish, None)),
            Err(reason) => Inbound::Refuse(reason),
        },
        Packet::Subscribe(mut subscribe, _) => {
            for filter in &mut subscribe.filters {
                if let Err(denial) = acl::check_subscribe(identity, &filter.path) {
                    warn!(device = %identity, reason = denial.reason(), filter = %filter.path, "subscribe refused");
                    return Inbound::Refuse(denial.reason());
                }
                if filter.qos == QoS::ExactlyOnce {
                    filter.qos = QoS::AtLeastOnce;
                }
            }
            Inbound::Forward(Packet::Subscribe(subscribe, None))
        }
        // MQTT-3.10.3-2: at least one filter.
        Packet::Unsubscribe(unsubscribe, _) if unsubscribe.filters.is_empty() => {
            Inbound::Refuse("malformed_packet")
        }
        Packet::Unsubscribe(unsubscribe, _) => {
            Inbound::Forward(Packet::Unsubscribe(unsubscribe, None))
        }
        Packet::PubAck(puback, _) => {
            let mut ledger = lock(ledger);
            if ledger.inflight.front() == Some(&puback.pkid) {
                ledger.inflight.pop_front();
                Inbound::Forward(Packet::PubAck(puback, None))
            } else {
                Inbound::Refuse("unexpected_puback")
            }
        }
        Packet::PingReq(ping) => Inbound::Forward(Packet::PingReq(ping)),
        Packet::Disconnect(..) => Inbound::Graceful,
        Packet::PubRec(..) | Packet::PubRel(..) | Packet::PubComp(..) => {
            Inbound::Refuse("qos2_not_supported")
        }
        Packet::Connect(..) => Inbound::Refuse("second_connect"),
        Packet::ConnAck(..) | Packet::SubAck(..) | Packet::UnsubAck(..) | Packet::PingResp(..) => {
            Inbound::Refuse("server_packet_from_client")
        }
    }
}

/// Checks a client PUBLISH (QoS, ACL, payload size) and clears its retain flag; counts it
/// by channel. `Err` is the refusal reason.
pub(super) fn accept_publish(
    mut publish: Publish,
    byte1: u8,
    identity: &Identity,
    shared: &Shared,
) -> Result<Publish, &'static str> {
    if (byte1 >> 1) & 0b11 == 2 {
        return Err("qos2_not_supported");
    }
    match acl::check_publish(identity, &publish.topic, publish.payload.len()) {
        Ok(topic) => {
            // posfleet keeps state in the registry, not in retained messages.
            publish.retain = false;
            // Detached from the connection's read buffer: the router's ring keeps a message
            // until it wraps, and a slice would keep the whole buffer alive with it (an idle
            // terminal's last heartbeat held ~3 KiB; docs/benchmarks.md, heap breakdown).
            publish.topic = Bytes::copy_from_slice(&publish.topic);
            publish.payload = Bytes::copy_from_slice(&publish.payload);
            shared
                .metrics
                .edge_publishes_total
                .get_or_create(&crate::metrics::ChannelLabel {
                    channel: topic.channel().name(),
                })
                .inc();
            Ok(publish)
        }
        Err(denial) => {
            warn!(device = %identity, reason = denial.reason(), topic = %String::from_utf8_lossy(&publish.topic), "publish refused");
            Err(denial.reason())
        }
    }
}

/// Router → client: write notifications in batches, answer `Unschedule` with a wake.
pub(super) async fn outbound<W: AsyncWrite + Unpin>(
    writer: &mut W,
    link_rx: &mut LinkRx,
    shared: &Shared,
    ledger: &Mutex<Ledger>,
) -> End {
    /// Notifications written per socket write.
    const BATCH: usize = 256;
    let mut out = BytesMut::with_capacity(256);
    loop {
        let first = match link_rx.next().await {
            Ok(Some(notification)) => notification,
            Ok(None) => continue,
            Err(_) => return End::RouterGone,
        };
        let mut unscheduled = false;
        let mut gone = false;
        let mut next = Some(first);
        let mut count = 0;
        while let Some(notification) = next.take() {
            count += 1;
            match notification {
                Notification::Unschedule => unscheduled = true,
                Notification::Disconnect(..) => gone = true,
                other => {
                    let packet = Option::<Packet>::from(other).and_then(|p| settle(p, ledger));
                    if let Some(packet) = packet {
                        let start = out.len();
                        if V4.write(strip_properties(packet), &mut out).is_err() {
                            continue;
                        }
                        if let Some(pkid) = qos1_pkid(&out[start..]) {
                            lock(ledger).inflight.push_back(pkid);
                        }
                    }
                }
            }
            if count < BATCH && !gone {
                next = match link_rx.next().now_or_never() {
                    Some(Ok(n)) => n,
                    Some(Err(_)) => {
                        gone = true;
                        None
                    }
                    None => None,
                };
            }
        }
        if !out.is_empty() {
            let written =
                tokio::time::timeout(shared.limits.write_timeout, writer.write_all(&out)).await;
            if !matches!(written, Ok(Ok(()))) {
                return End::Lost("write_failed");
            }
            out.clear();
            if out.capacity() > 64 * 1024 {
                out = BytesMut::with_capacity(256);
            }
        }
        if gone {
            return End::RouterGone;
        }
        if unscheduled && link_rx.wake().await.is_err() {
            shared.fatal.raise("router channel closed on wake");
            return End::RouterGone;
        }
    }
}

/// Settles a router answer in the ledger and maps it to what the client gets (`None`: nothing).
fn settle(packet: Packet, ledger: &Mutex<Ledger>) -> Option<Packet> {
    let mut ledger = lock(ledger);
    match packet {
        Packet::PingResp(resp) => {
            ledger.owed = ledger.owed.saturating_sub(1);
            match ledger.pings.pop_front().flatten() {
                Some(pkid) => Some(Packet::UnsubAck(
                    UnsubAck {
                        pkid,
                        reasons: Vec::new(),
                    },
                    None,
                )),
                None => Some(Packet::PingResp(resp)),
            }
        }
        Packet::PubAck(..) | Packet::SubAck(..) => {
            ledger.owed = ledger.owed.saturating_sub(1);
            Some(packet)
        }
        // Replaced by the edge's own UNSUBACK at the marker (see `Ledger::pings`).
        Packet::UnsubAck(..) => None,
        other => Some(other),
    }
}

/// `V4::write` panics on non-CONNACK packets that carry (MQTT 5) properties.
fn strip_properties(packet: Packet) -> Packet {
    match packet {
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::Disconnect(p, _) => Packet::Disconnect(p, None),
        Packet::ConnAck(p, _) => Packet::ConnAck(p, None),
        other => other,
    }
}

/// The packet id of an encoded QoS 1 PUBLISH (`Publish.pkid` is private in rumqttd).
pub(super) fn qos1_pkid(frame: &[u8]) -> Option<u16> {
    let byte1 = *frame.first()?;
    if byte1 >> 4 != 3 || (byte1 >> 1) & 0b11 != 1 {
        return None;
    }
    let mut i = 1;
    loop {
        let b = *frame.get(i)?;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return None;
        }
    }
    let topic_len = usize::from(u16::from_be_bytes([*frame.get(i)?, *frame.get(i + 1)?]));
    let at = i + 2 + topic_len;
    Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]))
}

/// Pushes packets into the link's buffer and notifies the router once.
///
/// `LinkTx::send` does a blocking send on the router's bounded channel (its async notify is
/// crate-private). It only blocks when that channel is nearly full, so it runs inline unless
/// the router is congested, and then under `block_in_place` so the runtime keeps going.
pub(super) fn send_to_router(
    router: &RouterHandle,
    link_tx: &mut LinkTx,
    mut packets: Vec<Packet>,
) -> Result<(), LinkFailure> {
    let Some(last) = packets.pop() else {
        return Ok(());
    };
    link_tx.buffer().extend(packets);
    // `send` has no await point: the first poll completes it.
    let send = || {
        link_tx
            .send(last)
            .now_or_never()
            .unwrap_or(Err(rumqttd::local::LinkError::NotConnectionAck))
            .map(|_| ())
            .map_err(LinkFailure::from)
    };
    if router.congested() {
        super::router::blocking(send)
    } else {
        send()
    }
}

pub(super) fn violation(shared: &Shared, identity: &Identity, reason: &'static str) -> End {
    warn!(device = %identity, reason, "protocol or ACL violation; closing connection");
    shared.metrics.acl_refuse(reason);
    End::Violation(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkid_is_read_from_encoded_qos1_publish() {
        // PUBLISH QoS 1, remaining length 9: topic "a/b" (2+3), pkid 0x1234, payload "hi".
        let frame = [0x32, 9, 0, 3, b'a', b'/', b'b', 0x12, 0x34, b'h', b'i'];
        assert_eq!(qos1_pkid(&frame), Some(0x1234));
        let qos0 = [0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i'];
        assert_eq!(qos1_pkid(&qos0), None);
        assert_eq!(qos1_pkid(&[0x32]), None);
        assert_eq!(qos1_pkid(&[0x32, 0x80, 0x80, 0x80, 0x80, 0x01]), None);
    }
}
