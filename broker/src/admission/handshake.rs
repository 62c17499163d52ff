//! The TLS handshake of an admitted socket, under the listener's deadlines: first the wait
//! for the client's first byte (no TLS state, no slot), then the handshake itself through the
//! CPU gate, both cut short if the connection is evicted.

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::{Admission, CpuGated, Ticket};

/// Why an admitted socket did not complete its TLS handshake.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// It sent nothing within the silent timeout (counted as `silent`).
    #[error("sent nothing within the silent timeout")]
    Silent,
    /// The handshake was not over within the handshake timeout (counted as
    /// `handshake_timeout`).
    #[error("TLS handshake not over within the handshake timeout")]
    Timeout,
    /// A newer connection took its slot (counted as `evicted` when it happened).
    #[error("evicted for a newer connection")]
    Evicted,
    /// The client closed the socket before sending anything.
    #[error("closed by the client before the handshake")]
    Closed,
    /// The handshake failed (bad certificate, protocol error, I/O error); the listener maps
    /// it to its own refusal reasons.
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] std::io::Error),
}

impl Admission {
    /// Runs the TLS handshake of `tcp`, admitted as `ticket`, under the deadlines. The stream
    /// it returns no longer holds a handshake slot.
    pub(crate) async fn tls_handshake(
        &self,
        ticket: &Ticket,
        tcp: TcpStream,
        acceptor: &TlsAcceptor,
    ) -> Result<TlsStream<CpuGated>, HandshakeError> {
        let deadline = ticket.accepted_at() + self.limits.handshake_timeout;
        let silent_deadline = (ticket.accepted_at() + self.limits.silent_timeout).min(deadline);
        let mut first = [0u8; 1];
        let peeked = tokio::select! {
            () = ticket.evicted() => return Err(HandshakeError::Evicted),
            peeked = tokio::time::timeout_at(silent_deadline, tcp.peek(&mut first)) => peeked,
        };
        match peeked {
            Err(_elapsed) => {
                self.count("silent");
                return Err(HandshakeError::Silent);
            }
            Ok(Ok(0)) => return Err(HandshakeError::Closed),
            Ok(Err(e)) => return Err(HandshakeError::Tls(e)),
            Ok(Ok(_)) => {}
        }
        let gated = CpuGated::new(tcp, self.cpu.clone());
        let handshake = tokio::select! {
            () = ticket.evicted() => return Err(HandshakeError::Evicted),
            handshake = tokio::time::timeout_at(deadline, acceptor.accept(gated)) => handshake,
        };
        match handshake {
            Err(_elapsed) => {
                self.count("handshake_timeout");
                Err(HandshakeError::Timeout)
            }
            Ok(Err(e)) => Err(HandshakeError::Tls(e)),
            Ok(Ok(mut tls)) => {
                tls.get_mut().0.open_gate();
                Ok(tls)
            }
        }
    }
}
