//! A raw MQTT 3.1.1 client over mTLS: it writes whatever bytes a test asks for (what rumqttc
//! would never send) and reads frames back without interpreting them.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::super::tests::{Fixture, WAIT};

/// One frame read from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Frame {
    pub(super) byte1: u8,
    pub(super) body: Vec<u8>,
}

impl Frame {
    pub(super) fn kind(&self) -> u8 {
        self.byte1 >> 4
    }

    /// The packet id of an ack, or of a QoS 1 PUBLISH.
    pub(super) fn pkid(&self) -> u16 {
        let at = if self.kind() == PUBLISH {
            2 + usize::from(u16::from_be_bytes([self.body[0], self.body[1]]))
        } else {
            0
        };
        u16::from_be_bytes([self.body[at], self.body[at + 1]])
    }

    /// Topic and payload of a PUBLISH.
    pub(super) fn publish(&self) -> (String, Vec<u8>) {
        assert_eq!(self.kind(), PUBLISH, "{self:?}");
        let len = usize::from(u16::from_be_bytes([self.body[0], self.body[1]]));
        let topic = String::from_utf8(self.body[2..2 + len].to_vec()).unwrap();
        let skip = if (self.byte1 >> 1) & 0b11 == 0 { 0 } else { 2 };
        (topic, self.body[2 + len + skip..].to_vec())
    }
}

pub(super) const CONNACK: u8 = 2;
pub(super) const PUBLISH: u8 = 3;
pub(super) const PUBACK: u8 = 4;
pub(super) const SUBACK: u8 = 9;
pub(super) const UNSUBACK: u8 = 11;
pub(super) const PINGRESP: u8 = 13;

type Tls = TlsStream<TcpStream>;

/// A TLS session with a device certificate, speaking raw bytes.
pub(super) struct Raw {
    reader: RawReader,
    writer: RawWriter,
}

/// The reading half of a [`Raw`] session.
pub(super) struct RawReader {
    tls: ReadHalf<Tls>,
    buf: BytesMut,
}

/// The writing half of a [`Raw`] session.
pub(super) struct RawWriter {
    tls: WriteHalf<Tls>,
}

impl Raw {
    /// TLS handshake only, with a certificate for device `id`.
    pub(super) async fn tls(fx: &Fixture, id: &str) -> Self {
        let tcp = TcpStream::connect(fx.edge.local_addr()).await.unwrap();
        Self::tls_over(fx, id, tcp).await
    }

    /// TLS handshake over a socket the test prepared.
    pub(super) async fn tls_over(fx: &Fixture, id: &str, tcp: TcpStream) -> Self {
        let connector = fx.tls_connector(&fx.device_cert(id));
        let name = ServerName::try_from("localhost").unwrap();
        let tls = tokio::time::timeout(WAIT, connector.connect(name, tcp))
            .await
            .expect("handshake in bounded time")
            .expect("handshake succeeds");
        let (reader, writer) = tokio::io::split(tls);
        Self {
            reader: RawReader {
                tls: reader,
                buf: BytesMut::new(),
            },
            writer: RawWriter { tls: writer },
        }
    }

    /// TLS plus CONNECT (clean session, keep-alive 30 s) and a successful CONNACK.
    pub(super) async fn connected(fx: &Fixture, id: &str) -> Self {
        let mut raw = Self::tls(fx, id).await;
        raw.send(&connect(id, true, 30)).await.unwrap();
        let ack = raw.connack().await.expect("CONNACK");
        assert_eq!(ack, (false, 0), "connection accepted");
        raw
    }

    pub(super) fn split(self) -> (RawReader, RawWriter) {
        (self.reader, self.writer)
    }

    pub(super) async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.send(bytes).await
    }

    pub(super) async fn next(&mut self) -> Option<Frame> {
        self.reader.next().await
    }

    pub(super) async fn next_within(&mut self, limit: Duration) -> Result<Option<Frame>, ()> {
        self.reader.next_within(limit).await
    }

    /// Reads the CONNACK: (session present, return code); `None` if closed without one.
    pub(super) async fn connack(&mut self) -> Option<(bool, u8)> {
        let frame = self.next().await?;
        assert_eq!(frame.kind(), CONNACK, "{frame:?}");
        Some((frame.body[0] & 1 == 1, frame.body[1]))
    }

    /// The next frame of `kind`, skipping others (PINGRESP, acks).
    pub(super) async fn expect(&mut self, kind: u8) -> Frame {
        self.reader.expect(kind).await
    }

    /// Waits until the server closes the connection; returns what it sent before.
    pub(super) async fn expect_closed(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(frame) = self.next().await {
            frames.push(frame);
        }
        frames
    }

    /// Proves the connection still works: PINGREQ answered by PINGRESP.
    pub(super) async fn expect_open(&mut self) {
        self.send(&pingreq()).await.expect("connection still open");
        self.expect(PINGRESP).await;
    }
}

impl RawWriter {
    pub(super) async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        tokio::time::timeout(WAIT, async {
            self.tls.write_all(bytes).await?;
            self.tls.flush().await
        })
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    }
}

impl RawReader {
    /// The next frame; `None` once the server closed the connection.
    pub(super) async fn next(&mut self) -> Option<Frame> {
        self.next_within(WAIT)
            .await
            .expect("a frame or the close within bounded time")
    }

    /// `Err` if nothing arrived within `limit`.
    pub(super) async fn next_within(&mut self, limit: Duration) -> Result<Option<Frame>, ()> {
        tokio::time::timeout(limit, async {
            loop {
                if let Some(frame) = parse(&mut self.buf) {
                    return Some(frame);
                }
                match self.tls.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .map_err(|_| ())
    }

    pub(super) async fn expect(&mut self, kind: u8) -> Frame {
        loop {
            match self.next().await {
                Some(frame) if frame.kind() == kind => return frame,
                Some(_) => {}
                None => panic!("connection closed while waiting for packet type {kind}"),
            }
        }
    }
}

/// Decodes one complete frame from `buf`.
fn parse(buf: &mut BytesMut) -> Option<Frame> {
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        assert!(i <= 4, "server sent a malformed remaining length");
    }
    if buf.len() < i + len {
        return None;
    }
    let byte1 = buf[0];
    buf.advance(i);
    let body = buf.split_to(len).to_vec();
    Some(Frame { byte1, body })
}

/// Encodes a remaining length (up to 4 bytes).
pub(super) fn remaining_length(mut len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            return out;
        }
    }
}

pub(super) fn frame(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    out.extend(remaining_length(body.len()));
    out.extend_from_slice(body);
    out
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend((s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A will in a raw CONNECT.
pub(super) struct Will<'a> {
    pub(super) topic: &'a [u8],
    pub(super) payload: &'a [u8],
    pub(super) qos: u8,
    pub(super) retain: bool,
}

/// CONNECT with every field chosen by the test.
pub(super) fn connect_raw(
    name: &str,
    level: u8,
    clean: bool,
    keep_alive: u16,
    client_id: &str,
    will: Option<Will<'_>>,
) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, name.as_bytes());
    body.push(level);
    let mut flags = if clean { 0b10 } else { 0 };
    if let Some(will) = &will {
        flags |= 0b100 | (will.qos << 3) | if will.retain { 0x20 } else { 0 };
    }
    body.push(flags);
    body.extend(keep_alive.to_be_bytes());
    string(&mut body, client_id.as_bytes());
    if let Some(will) = will {
        string(&mut body, will.topic);
        string(&mut body, will.payload);
    }
    frame(0x10, &body)
}

/// A well-formed MQTT 3.1.1 CONNECT.
pub(super) fn connect(client_id: &str, clean: bool, keep_alive: u16) -> Vec<u8> {
    connect_raw("MQTT", 4, clean, keep_alive, client_id, None)
}

/// PUBLISH with any QoS bits (0..=3); `pkid` is written for QoS > 0.
pub(super) fn publish(qos: u8, topic: &[u8], pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, topic);
    if qos > 0 {
        body.extend(pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    frame(0x30 | (qos << 1), &body)
}

/// SUBSCRIBE with raw (filter, options byte) pairs.
pub(super) fn subscribe(pkid: u16, filters: &[(&[u8], u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    for (filter, options) in filters {
        string(&mut body, filter);
        body.push(*options);
    }
    frame(0x82, &body)
}

pub(super) fn unsubscribe(pkid: u16, filters: &[&[u8]]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    for filter in filters {
        string(&mut body, filter);
    }
    frame(0xA2, &body)
}

/// An ack-shaped packet (PUBACK 0x40, PUBREC 0x50, PUBREL 0x62, PUBCOMP 0x70, ...).
pub(super) fn ack(byte1: u8, pkid: u16) -> Vec<u8> {
    frame(byte1, &pkid.to_be_bytes())
}

pub(super) fn puback(pkid: u16) -> Vec<u8> {
    ack(0x40, pkid)
}

pub(super) fn pingreq() -> Vec<u8> {
    vec![0xC0, 0x00]
}

pub(super) fn disconnect() -> Vec<u8> {
    vec![0xE0, 0x00]
}
