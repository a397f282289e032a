//! The admin HTTP endpoint: a tiny_http server on its own thread (`mod.rs`), the routes
//! (`routes.rs`), the Prometheus/JSON rendering (`render.rs`) of the read-only view it serves
//! (`view.rs`). Reads counters only; never touches a worker's loop (live pairs come through
//! the `LiveConnections` that control hands it).

pub mod render;
pub mod routes;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::Error;
pub use view::{LiveConnections, ProxyView, ReloadCounts};

/// The running admin endpoint.
pub struct AdminServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    pub fn start(addr: SocketAddr, view: Arc<ProxyView>) -> Result<AdminServer, Error> {
        let server = tiny_http::Server::http(addr)
            .map_err(|e| Error::runtime(format!("bind admin {addr}: {e}")))?;
        let bound = server.server_addr().to_ip().unwrap_or(addr);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("epoxy-admin".into())
            .spawn(move || {
                while !stop2.load(Relaxed) {
                    match server.recv_timeout(Duration::from_millis(100)) {
                        Ok(Some(req)) => routes::handle(req, &view),
                        Ok(None) => {}
                        Err(e) => {
                            log::debug!("admin: {e}");
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })
            .map_err(|e| Error::io("spawn admin thread", e))?;
        Ok(AdminServer {
            addr: bound,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
