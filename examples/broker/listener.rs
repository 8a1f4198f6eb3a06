//! The listener: accepts TCP connections and hands them to the sessions supervisor.
//!
//! It is the first child told to stop, and stopping is all it does: it closes its socket, so a
//! client connecting during the drain is refused by the kernel instead of accepted and left
//! hanging. The socket is bound once by `main` (so a bad or busy address is a clear error before
//! anything starts); a restarted listener binds the same address again.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;

use actix::prelude::*;
use actix_supervisor::{ChildAddr, Stopping, Worker};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::sessions::{Accept, Sessions};

const LOG: &str = "broker::listener";

/// The socket `main` bound, for the first listener to take; later ones bind `addr` again.
pub struct Socket {
    pub addr: SocketAddr,
    pub bound: Mutex<Option<StdListener>>,
}

impl Socket {
    fn take(&self) -> std::io::Result<StdListener> {
        match self.bound.lock().take() {
            Some(listener) => Ok(listener),
            None => StdListener::bind(self.addr),
        }
    }
}

pub struct Listener {
    socket: Option<StdListener>,
    sessions: ChildAddr<Sessions>,
    accepting: Option<JoinHandle<()>>,
}

impl Listener {
    pub fn new(socket: &Arc<Socket>, sessions: ChildAddr<Sessions>) -> std::io::Result<Listener> {
        let socket = socket.take()?;
        socket.set_nonblocking(true)?;
        Ok(Listener {
            socket: Some(socket),
            sessions,
            accepting: None,
        })
    }
}

impl Actor for Listener {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(socket) = self.socket.take() else {
            return;
        };
        let listener = match TcpListener::from_std(socket) {
            Ok(listener) => listener,
            Err(e) => {
                log::error!(target: LOG, "cannot use the listening socket: {e}");
                ctx.stop();
                return;
            }
        };
        let sessions = self.sessions.clone();
        self.accepting = Some(actix::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        log::debug!(target: LOG, "accepted {peer}");
                        if sessions.do_send(Accept { stream, peer }).is_err() {
                            return; // the sessions supervisor is gone: the broker is stopping
                        }
                    }
                    Err(e) => {
                        // Out of file descriptors, typically: wait a little rather than spin.
                        log::warn!(target: LOG, "accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        if let Some(task) = self.accepting.take() {
            task.abort();
        }
    }
}

impl Worker for Listener {
    fn on_stopping(&mut self, _: &mut Context<Self>, _: &Stopping) {
        // Dropping the accept loop drops the socket: new connections are refused from now on.
        if let Some(task) = self.accepting.take() {
            task.abort();
            log::info!(target: LOG, "stopped accepting connections");
        }
    }
}
