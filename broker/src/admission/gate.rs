//! [`CpuGated`]: a TCP socket that, during the TLS handshake, holds a handshake slot only
//! while rustls works on bytes that have arrived.
//!
//! tokio-rustls drives the handshake by reading from the socket and then processing what it
//! read (`read_tls` + `process_new_packets`: key exchange, signature, certificate checks)
//! before it reads again. So the wrapper acquires a slot when data is ready to be read
//! (without consuming it first: the slot is taken before the bytes reach rustls) and gives it
//! back as soon as the socket has nothing more (a read or write would wait). A client that
//! sends nothing, trickles its ClientHello or goes silent after it holds no slot while it
//! does so; slots bound the CPU spent on handshakes, not the number of slow clients.
//! [`CpuGated::open_gate`] turns the wrapper into a plain socket once the handshake is over.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;

/// A TCP socket behind a handshake-slot gate (see the module docs).
#[derive(Debug)]
pub(crate) struct CpuGated {
    tcp: TcpStream,
    /// `None` once the handshake is over.
    gate: Option<Gate>,
}

#[derive(Debug)]
struct Gate {
    slots: PollSemaphore,
    /// Held while rustls processes what was read.
    held: Option<OwnedSemaphorePermit>,
}

impl CpuGated {
    pub(crate) fn new(tcp: TcpStream, slots: Arc<Semaphore>) -> Self {
        Self {
            tcp,
            gate: Some(Gate {
                slots: PollSemaphore::new(slots),
                held: None,
            }),
        }
    }

    /// The handshake is over: give the slot back and pass everything through from now on.
    pub(crate) fn open_gate(&mut self) {
        self.gate = None;
    }

    /// True while a handshake slot is held (tests).
    #[cfg(test)]
    pub(crate) fn holds_slot(&self) -> bool {
        self.gate.as_ref().is_some_and(|g| g.held.is_some())
    }

    /// Gives the slot back if the socket made the caller wait.
    fn release_if_pending<T>(&mut self, poll: Poll<T>) -> Poll<T> {
        if poll.is_pending() {
            if let Some(gate) = self.gate.as_mut() {
                gate.held = None;
            }
        }
        poll
    }
}

impl AsyncRead for CpuGated {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(gate) = this.gate.as_mut() {
            if gate.held.is_none() {
                // Wait for data without a slot, then take one before the data is read.
                ready!(this.tcp.poll_read_ready(cx))?;
                if let Some(permit) = ready!(gate.slots.poll_acquire(cx)) {
                    gate.held = Some(permit);
                }
            }
        }
        let poll = Pin::new(&mut this.tcp).poll_read(cx, buf);
        this.release_if_pending(poll)
    }
}

impl AsyncWrite for CpuGated {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.tcp).poll_write(cx, data);
        this.release_if_pending(poll)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.tcp).poll_flush(cx);
        this.release_if_pending(poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.tcp).poll_shutdown(cx);
        this.release_if_pending(poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        this.release_if_pending(poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}
