//! A minimal MQTT 3.1.1 broker for tests: one listener on 127.0.0.1:0 with mTLS, records
//! what clients send, answers CONNECT/SUBSCRIBE/PUBLISH/PINGREQ, and can kick clients or push
//! publishes to them. Not a router: it does not forward between clients.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, QoS, SubAck, SubscribeReasonCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::TestPki;

const MAX: usize = posfleet_proto::MAX_PACKET_SIZE;
const WAIT: Duration = Duration::from_secs(10);

/// What a client did, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    Connect {
        client_id: String,
        clean_session: bool,
        will: Option<(String, Bytes)>,
    },
    Subscribe(Vec<String>),
    Publish {
        topic: String,
        payload: Bytes,
        qos: QoS,
    },
    Disconnect,
    /// The connection ended without a DISCONNECT.
    Closed,
}

enum Cmd {
    Publish(Publish),
    Close,
}

/// Behaviour switches, changeable while running.
struct Control {
    session_present: AtomicBool,
    ack_publishes: AtomicBool,
    refuse: AtomicBool,
    next_pkid: AtomicU16,
    conns: Mutex<Vec<mpsc::Sender<Cmd>>>,
}

pub struct FakeBroker {
    pub addr: SocketAddr,
    seen: mpsc::Receiver<Seen>,
    control: Arc<Control>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl FakeBroker {
    pub async fn start(pki: &TestPki) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(pki.server_config());
        let (seen_tx, seen) = mpsc::channel(4096);
        let control = Arc::new(Control {
            session_present: AtomicBool::new(false),
            ack_publishes: AtomicBool::new(true),
            refuse: AtomicBool::new(false),
            next_pkid: AtomicU16::new(1),
            conns: Mutex::new(Vec::new()),
        });
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (c, t, ctl) = (cancel.clone(), tracker.clone(), control.clone());
        tracker.spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    () = c.cancelled() => return,
                    r = listener.accept() => r.unwrap(),
                };
                let (acceptor, seen_tx, ctl, c) =
                    (acceptor.clone(), seen_tx.clone(), ctl.clone(), c.clone());
                t.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let (cmd_tx, cmd_rx) = mpsc::channel(64);
                    ctl.conns.lock().unwrap().push(cmd_tx);
                    tokio::select! {
                        () = c.cancelled() => {}
                        () = serve(tls, &ctl, &seen_tx, cmd_rx) => {}
                    }
                });
            }
        });
        Self {
            addr,
            seen,
            control,
            cancel,
            tracker,
        }
    }

    /// The next thing a client did; panics after 10 s.
    pub async fn next(&mut self) -> Seen {
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("timed out waiting for the broker to see something")
            .expect("broker stopped")
    }

    /// Skips PINGs and such until `pred` matches; panics after 10 s.
    pub async fn next_matching(&mut self, pred: impl Fn(&Seen) -> bool) -> Seen {
        // One deadline for the whole search: other traffic (heartbeats) must not keep it
        // going for ever.
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let seen = tokio::time::timeout_at(deadline, self.next())
                .await
                .expect("timed out waiting for a matching message");
            if pred(&seen) {
                return seen;
            }
        }
    }

    pub fn set_session_present(&self, on: bool) {
        self.control.session_present.store(on, Ordering::SeqCst);
    }

    pub fn set_ack_publishes(&self, on: bool) {
        self.control.ack_publishes.store(on, Ordering::SeqCst);
    }

    /// Answer CONNECT with "not authorized".
    pub fn set_refuse(&self, on: bool) {
        self.control.refuse.store(on, Ordering::SeqCst);
    }

    /// Drops every open connection without a word (like a crash or a network cut).
    pub fn kick(&self) {
        for conn in self.control.conns.lock().unwrap().drain(..) {
            let _ = conn.try_send(Cmd::Close);
        }
    }

    /// Sends a QoS 1 publish on an arbitrary topic to every connected client.
    pub fn push(&self, topic: &str, payload: &[u8]) {
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        publish.pkid = self.control.next_pkid.fetch_add(1, Ordering::SeqCst).max(1);
        for conn in self.control.conns.lock().unwrap().iter() {
            let _ = conn.try_send(Cmd::Publish(publish.clone()));
        }
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.tracker.close();
    }
}

async fn serve<S>(
    mut stream: S,
    ctl: &Control,
    seen: &mpsc::Sender<Seen>,
    mut cmds: mpsc::Receiver<Cmd>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut input = BytesMut::with_capacity(4096);
    loop {
        let mut output = BytesMut::new();
        loop {
            let packet = match Packet::read(&mut input, MAX) {
                Ok(packet) => packet,
                Err(rumqttc::Error::InsufficientBytes(_)) => break,
                Err(_) => return,
            };
            let (record, reply) = answer(packet, ctl);
            if let Some(record) = record {
                let _ = seen.send(record).await;
            }
            match reply {
                Some(Packet::Disconnect) => return,
                Some(reply) => {
                    reply.write(&mut output, MAX).unwrap();
                }
                None => {}
            }
        }
        if !output.is_empty() && stream.write_all(&output).await.is_err() {
            let _ = seen.send(Seen::Closed).await;
            return;
        }
        tokio::select! {
            read = stream.read_buf(&mut input) => {
                if !matches!(read, Ok(n) if n > 0) {
                    let _ = seen.send(Seen::Closed).await;
                    return;
                }
            }
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Publish(publish)) => {
                    let mut out = BytesMut::new();
                    Packet::Publish(publish).write(&mut out, MAX).unwrap();
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                }
                Some(Cmd::Close) | None => return,
            },
        }
    }
}

/// What to record and what to answer for one packet. `Some(Packet::Disconnect)` as the answer
/// means "close the connection".
fn answer(packet: Packet, ctl: &Control) -> (Option<Seen>, Option<Packet>) {
    match packet {
        Packet::Connect(connect) => {
            let refuse = ctl.refuse.load(Ordering::SeqCst);
            let code = if refuse {
                ConnectReturnCode::NotAuthorized
            } else {
                ConnectReturnCode::Success
            };
            let session_present = !refuse && ctl.session_present.load(Ordering::SeqCst);
            let seen = Seen::Connect {
                client_id: connect.client_id,
                clean_session: connect.clean_session,
                will: connect.last_will.map(|w| (w.topic, w.message)),
            };
            (
                Some(seen),
                Some(Packet::ConnAck(ConnAck::new(code, session_present))),
            )
        }
        Packet::Subscribe(sub) => {
            let codes = sub
                .filters
                .iter()
                .map(|f| SubscribeReasonCode::Success(f.qos))
                .collect();
            let paths = sub.filters.into_iter().map(|f| f.path).collect();
            (
                Some(Seen::Subscribe(paths)),
                Some(Packet::SubAck(SubAck::new(sub.pkid, codes))),
            )
        }
        Packet::Publish(publish) => {
            let ack = (publish.qos == QoS::AtLeastOnce && ctl.ack_publishes.load(Ordering::SeqCst))
                .then(|| Packet::PubAck(PubAck::new(publish.pkid)));
            let seen = Seen::Publish {
                topic: publish.topic,
                payload: publish.payload,
                qos: publish.qos,
            };
            (Some(seen), ack)
        }
        Packet::PingReq => (None, Some(Packet::PingResp)),
        Packet::Disconnect => (Some(Seen::Disconnect), Some(Packet::Disconnect)),
        _ => (None, None),
    }
}
