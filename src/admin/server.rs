//! The admin's bounded HTTP server: one event thread (a `mio::Poll`) that accepts, reads
//! request heads and writes responses for at most [`MAX_CONNECTIONS`] connections at once,
//! and [`HANDLER_THREADS`] threads that only render responses (rendering `/connections` waits
//! up to a second on the workers, so it must not stall the event thread). Whatever clients
//! do, the admin holds a fixed number of threads, at most `MAX_CONNECTIONS` sockets
//! ([`FD_BUDGET`] fds in all) and `MAX_CONNECTIONS` head buffers of at most
//! [`http::MAX_HEAD`] bytes:
//!
//! - a request head must arrive within [`REQUEST_TIMEOUT`] (then 408 and close);
//! - a head over the limits gets 414/431, garbage 400, methods other than GET/HEAD 405;
//! - when all slots are taken, a new connection evicts the oldest one still sending its
//!   head (idle clients cannot lock out a scraper); when every slot is busy with a real
//!   request, the newcomer gets 503;
//! - a response must be taken within [`WRITE_TIMEOUT`]; then the connection is closed.
//!
//! The event thread also samples the traffic history once a second. It never touches a
//! worker's loop: it reads the [`ProxyView`], like the handlers.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::history::{self, History};
use super::http::{self, Parse, Request, Response};
use super::routes;
use super::view::ProxyView;
use crate::error::Error;

/// Admin connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Threads that render responses.
pub const HANDLER_THREADS: usize = 2;
/// File descriptors the admin may hold: its connections, the listener, the poll and waker.
pub const FD_BUDGET: u64 = MAX_CONNECTIONS as u64 + 4;
/// Time a client has to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take its response (and rendering has to finish).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection lingers after its response, discarding input, before it closes.
const LINGER: Duration = Duration::from_millis(500);
/// After an accept error (e.g. EMFILE), when to try again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;

/// Why the admin turned a connection away or cut it short (`epoxy_admin_rejected_total`).
#[derive(Debug, Default)]
pub struct AdminCounters {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Requests answered (any status).
    pub answered: AtomicU64,
    /// Idle connections closed to make room for a new one.
    pub evicted: AtomicU64,
    /// New connections answered 503 because every slot was busy.
    pub busy: AtomicU64,
    /// Request heads not complete within the request timeout.
    pub timeout: AtomicU64,
    /// Heads rejected as malformed (400/505).
    pub bad_request: AtomicU64,
    /// Heads rejected as too large (414/431).
    pub too_large: AtomicU64,
}

impl AdminCounters {
    /// `(reason, count)` of every way a connection was turned away.
    pub fn rejections(&self) -> [(&'static str, u64); 5] {
        [
            ("evicted", self.evicted.load(Relaxed)),
            ("busy", self.busy.load(Relaxed)),
            ("timeout", self.timeout.load(Relaxed)),
            ("bad_request", self.bad_request.load(Relaxed)),
            ("too_large", self.too_large.load(Relaxed)),
        ]
    }
}

/// What the handlers share: the view, the traffic history and the admin's own counters.
pub struct Shared {
    pub view: Arc<ProxyView>,
    pub history: Mutex<History>,
    pub counters: AdminCounters,
}

/// A request for a handler thread.
struct Job {
    key: usize,
    seq: u64,
    req: Request,
}

/// A rendered response for the event thread: connection key, its sequence number, bytes.
type Done = (usize, u64, Vec<u8>);

enum Phase {
    /// Reading the request head; `buf` holds what came so far.
    Reading,
    /// A handler is rendering the answer.
    Rendering,
    /// Writing `out[pos..]`.
    Writing { out: Vec<u8>, pos: usize },
    /// Response sent and write side shut: discard input until EOF or the deadline.
    Lingering,
}

struct Conn {
    stream: TcpStream,
    /// The head so far (at most `http::MAX_HEAD + READ_CHUNK` bytes).
    buf: Vec<u8>,
    phase: Phase,
    /// When this phase times out.
    deadline: Instant,
    /// Distinguishes this connection from a later one in the same slab slot.
    seq: u64,
    accepted: Instant,
}

const READ_CHUNK: usize = 4096;

/// The running admin endpoint.
pub struct AdminServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    threads: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    /// A second handle on the listening socket, for an upgrade to hand over.
    handoff: Option<std::net::TcpListener>,
}

impl AdminServer {
    /// Bind `addr` and start serving `view`.
    pub fn start(addr: SocketAddr, view: Arc<ProxyView>) -> Result<AdminServer, Error> {
        AdminServer::start_on(bind(addr)?, view)
    }

    /// Start serving `view` on a listening socket bound elsewhere (by [`bind`], or received
    /// from an old process or systemd).
    pub fn start_on(
        std_listener: std::net::TcpListener,
        view: Arc<ProxyView>,
    ) -> Result<AdminServer, Error> {
        let bind_err = |e: io::Error| Error::io("admin listener", e);
        std_listener.set_nonblocking(true).map_err(bind_err)?;
        let bound = std_listener.local_addr().map_err(bind_err)?;
        let handoff = std_listener.try_clone().ok();
        let mut listener = TcpListener::from_std(std_listener);
        let poll = Poll::new().map_err(|e| Error::io("create admin poll", e))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(|e| Error::io("register admin listener", e))?;
        let waker = Arc::new(
            Waker::new(poll.registry(), WAKER).map_err(|e| Error::io("create admin waker", e))?,
        );
        let shared = Arc::new(Shared {
            view,
            history: Mutex::new(History::default()),
            counters: AdminCounters::default(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(MAX_CONNECTIONS);
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut threads = Vec::with_capacity(HANDLER_THREADS + 1);
        for i in 0..HANDLER_THREADS {
            let (rx, tx, shared, waker) = (
                job_rx.clone(),
                done_tx.clone(),
                shared.clone(),
                waker.clone(),
            );
            let t = std::thread::Builder::new()
                .name(format!("epoxy-admin-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || handler(&rx, &tx, &shared, &waker))
                .map_err(|e| Error::io("spawn admin handler thread", e))?;
            threads.push(t);
        }
        drop(done_tx);
        let mut ev = EventLoop {
            poll,
            listener,
            conns: Slab::with_capacity(MAX_CONNECTIONS),
            jobs: job_tx,
            done: done_rx,
            shared: shared.clone(),
            seq: 0,
            accept_retry_at: None,
        };
        let stop2 = stop.clone();
        let t = std::thread::Builder::new()
            .name("epoxy-admin".into())
            .spawn(move || ev.run(&stop2))
            .map_err(|e| Error::io("spawn admin thread", e))?;
        threads.push(t);
        Ok(AdminServer {
            addr: bound,
            stop,
            waker,
            threads,
            shared,
            handoff,
        })
    }

    /// A duplicate of the listening socket, for an upgrade to hand over.
    pub fn listener_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        match &self.handoff {
            Some(l) => Ok(std::os::fd::OwnedFd::from(l.try_clone()?)),
            None => Err(io::Error::other("no handle on the admin listener")),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin's own counters.
    pub fn counters(&self) -> &AdminCounters {
        &self.shared.counters
    }

    /// Stop serving and join every admin thread.
    pub fn stop(self) {
        self.stop.store(true, Relaxed);
        let _ = self.waker.wake();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Bind the admin endpoint's listening socket.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
    std::net::TcpListener::bind(addr).map_err(|e| Error::io(format!("bind admin {addr}"), e))
}

/// A handler thread: render each job's response until the job channel closes.
fn handler(jobs: &Mutex<Receiver<Job>>, done: &mpsc::Sender<Done>, shared: &Shared, waker: &Waker) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let resp = routes::handle(&job.req, shared);
        let head_only = job.req.method == http::Method::Head;
        let bytes = http::encode(&resp, head_only);
        if done.send((job.key, job.seq, bytes)).is_err() {
            return;
        }
        let _ = waker.wake();
    }
}

struct EventLoop {
    poll: Poll,
    listener: TcpListener,
    /// At most `MAX_CONNECTIONS` entries.
    conns: Slab<Conn>,
    jobs: SyncSender<Job>,
    done: Receiver<Done>,
    shared: Arc<Shared>,
    seq: u64,
    /// Set after an accept error: accept again then (the listener may hold clients that no
    /// new edge will announce).
    accept_retry_at: Option<Instant>,
}

/// Write as much of `out[*pos..]` as the socket takes. `Ok(true)` when all is written.
fn write_some(stream: &mut TcpStream, out: &[u8], pos: &mut usize) -> io::Result<bool> {
    while *pos < out.len() {
        match stream.write(&out[*pos..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => *pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

impl EventLoop {
    fn run(&mut self, stop: &AtomicBool) {
        let mut events = Events::with_capacity(256);
        let mut next_sample = Instant::now();
        while !stop.load(Relaxed) {
            let now = Instant::now();
            if now >= next_sample {
                if let Ok(mut h) = self.shared.history.lock() {
                    h.sample(&self.shared.view, now);
                }
                next_sample = now + history::INTERVAL;
            }
            let mut wake_at = next_sample;
            for (_, c) in &self.conns {
                wake_at = wake_at.min(c.deadline);
            }
            if let Some(t) = self.accept_retry_at {
                wake_at = wake_at.min(t);
            }
            let timeout = wake_at.saturating_duration_since(now) + Duration::from_millis(1);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("admin: poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept_all(),
                    WAKER => {}
                    Token(t) => self.on_ready(t.wrapping_sub(FIRST_CONN)),
                }
            }
            self.take_done();
            let now = Instant::now();
            if self.accept_retry_at.is_some_and(|t| now >= t) {
                self.accept_retry_at = None;
                self.accept_all();
            }
            self.expire(now);
        }
        // Dropping the job sender ends the handler threads.
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("admin: accept: {e}");
                    self.accept_retry_at = Some(Instant::now() + ACCEPT_RETRY);
                    return;
                }
            }
        }
    }

    /// Take a new connection into a slot: evict the oldest idle one when full, or answer
    /// 503 when every slot is serving a request.
    fn admit(&mut self, mut stream: TcpStream) {
        let c = &self.shared.counters;
        c.accepted.fetch_add(1, Relaxed);
        if self.conns.len() >= MAX_CONNECTIONS {
            let oldest = self
                .conns
                .iter()
                .filter(|(_, c)| matches!(c.phase, Phase::Reading | Phase::Lingering))
                .min_by_key(|(_, c)| c.accepted)
                .map(|(k, _)| k);
            match oldest {
                Some(k) => {
                    if self
                        .conns
                        .get(k)
                        .is_some_and(|c| matches!(c.phase, Phase::Reading))
                    {
                        c.evicted.fetch_add(1, Relaxed);
                    }
                    self.close(k);
                }
                None => {
                    c.busy.fetch_add(1, Relaxed);
                    let out = http::encode(&Response::text(503, "admin busy"), false);
                    // Best effort: the socket's buffer takes this at once or not at all.
                    let _ = write_some(&mut stream, &out, &mut 0);
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(key + FIRST_CONN),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::debug!("admin: register connection: {e}");
            return;
        }
        self.seq += 1;
        let now = Instant::now();
        entry.insert(Conn {
            stream,
            buf: Vec::new(),
            phase: Phase::Reading,
            deadline: now + REQUEST_TIMEOUT,
            seq: self.seq,
            accepted: now,
        });
        // Data may already be waiting; the edge for it may have come before registration.
        self.on_ready(key);
    }

    fn close(&mut self, key: usize) {
        if let Some(mut c) = self.conns.try_remove(key) {
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }

    /// Readiness on connection `key` (a stale key is ignored).
    fn on_ready(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        match &mut c.phase {
            Phase::Reading => self.read_head(key),
            Phase::Rendering => {}
            Phase::Writing { out, pos } => match write_some(&mut c.stream, out, pos) {
                Ok(true) => self.finish(key),
                Ok(false) => {}
                Err(_) => self.close(key),
            },
            Phase::Lingering => {
                let mut scratch = [0u8; READ_CHUNK];
                loop {
                    match c.stream.read(&mut scratch) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                self.close(key);
            }
        }
    }

    fn read_head(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        let mut eof = false;
        let mut chunk = [0u8; READ_CHUNK];
        while c.buf.len() <= http::MAX_HEAD {
            match c.stream.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.close(key);
                    return;
                }
            }
        }
        let counters = &self.shared.counters;
        match http::parse(&c.buf) {
            Parse::Done(req) => {
                c.buf = Vec::new();
                c.phase = Phase::Rendering;
                c.deadline = Instant::now() + WRITE_TIMEOUT;
                let job = Job {
                    key,
                    seq: c.seq,
                    req,
                };
                match self.jobs.try_send(job) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                        counters.busy.fetch_add(1, Relaxed);
                        self.respond(key, &Response::text(503, "admin busy"));
                    }
                }
            }
            Parse::Reject(code, why) => {
                let counter = if matches!(code, 414 | 431) {
                    &counters.too_large
                } else {
                    &counters.bad_request
                };
                counter.fetch_add(1, Relaxed);
                self.respond(key, &Response::text(code, why));
            }
            Parse::Incomplete if eof && c.buf.is_empty() => self.close(key),
            Parse::Incomplete if eof => {
                counters.bad_request.fetch_add(1, Relaxed);
                self.respond(key, &Response::text(400, "incomplete request"));
            }
            Parse::Incomplete => {}
        }
    }

    /// Start writing `resp` on `key` (used for answers the event thread gives itself).
    fn respond(&mut self, key: usize, resp: &Response) {
        self.start_write(key, http::encode(resp, false));
    }

    fn start_write(&mut self, key: usize, out: Vec<u8>) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        self.shared.counters.answered.fetch_add(1, Relaxed);
        c.buf = Vec::new();
        c.deadline = Instant::now() + WRITE_TIMEOUT;
        let mut pos = 0;
        match write_some(&mut c.stream, &out, &mut pos) {
            Ok(true) => self.finish(key),
            Ok(false) => c.phase = Phase::Writing { out, pos },
            Err(_) => self.close(key),
        }
    }

    /// The response is out: shut the write side and linger briefly, so that unread input
    /// does not turn the close into a reset that could destroy the response in flight.
    fn finish(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if c.stream.shutdown(Shutdown::Write).is_err() {
            self.close(key);
            return;
        }
        c.phase = Phase::Lingering;
        c.deadline = Instant::now() + LINGER;
        self.on_ready(key);
    }

    /// Responses the handlers finished.
    fn take_done(&mut self) {
        while let Ok((key, seq, out)) = self.done.try_recv() {
            let current = self
                .conns
                .get(key)
                .is_some_and(|c| c.seq == seq && matches!(c.phase, Phase::Rendering));
            if current {
                self.start_write(key, out);
            }
        }
    }

    /// Close or answer every connection whose phase ran out of time.
    fn expire(&mut self, now: Instant) {
        let late: Vec<(usize, bool)> = self
            .conns
            .iter()
            .filter(|(_, c)| now >= c.deadline)
            .map(|(k, c)| (k, matches!(c.phase, Phase::Reading)))
            .collect();
        for (key, reading) in late {
            if reading {
                self.shared.counters.timeout.fetch_add(1, Relaxed);
                // One short answer, then close whether or not it was taken.
                if let Some(c) = self.conns.get_mut(key) {
                    let out = http::encode(&Response::text(408, "request timeout"), false);
                    let _ = write_some(&mut c.stream, &out, &mut 0);
                }
            }
            self.close(key);
        }
    }
}
