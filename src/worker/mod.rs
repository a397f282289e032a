//! One worker: one thread, one `mio::Poll` (edge-triggered), one `Slab<Pair>`, one buffer
//! pool and its own listener sockets. The loop polls, dispatches events by token, runs the
//! coarse timer, resumes paused accepting, and frees the slots of pairs closed in the batch.
//! It must never block, never allocate between polls, and never panic on network input.

pub mod accept;
pub mod connect;
pub mod migrate;
pub mod pair;
pub mod preface;
pub mod relay;
pub mod timer;
pub mod token;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Registry, Token};
use slab::Slab;

use crate::access_log::AccessRecord;
use crate::backend::AppRuntime;
use crate::balance::Balancer;
use crate::buffer::BufPool;
use crate::outcome::{CloseReason, Side};
use crate::stats::{ConnInfo, Recorder, Slots, WorkerStats};
use pair::{Half, Pair, PairState};
use token::Decoded;

/// Messages from the control thread (delivered through the channel + the poll's waker).
pub enum Command {
    /// Stop accepting (close listeners); let live pairs finish for up to `grace`. `ack` is
    /// told once the listeners are closed.
    Drain {
        grace: Duration,
        ack: Option<SyncSender<()>>,
    },
    /// Close everything now and exit.
    Stop,
    /// Switch to a new generation of apps. Listeners whose key is in `keep` stay open and
    /// serve the app given there; the others close; `add` are new listeners. Live pairs are
    /// untouched.
    Reload {
        apps: Vec<Arc<AppRuntime>>,
        keep: Vec<(ListenKey, usize)>,
        add: Vec<NewListener>,
    },
    /// Describe the live pairs (for the admin endpoint).
    Connections(SyncSender<Vec<ConnInfo>>),
    /// Start accepting on these listeners (a new process after an upgrade's hand-over).
    Listen(Vec<NewListener>),
    /// Duplicates of every open listener, for an upgrade to hand over.
    ListenerFds(SyncSender<io::Result<Vec<(ListenKey, std::os::fd::OwnedFd)>>>),
    /// Park up to `max` established pairs for a move to a new process, and describe them.
    Export {
        max: usize,
        reply: SyncSender<migrate::Exported>,
    },
    /// Forget the parked pairs the new process took; resume the others. `done` is told after.
    Settle {
        commit: Vec<usize>,
        abort: Vec<usize>,
        done: SyncSender<()>,
    },
    /// Rebuild and serve pairs moved from an old process.
    Adopt(Vec<migrate::Import>),
}

/// Which listen entry of the config a listener is: the address as configured (port 0 stays
/// 0) and how many equal addresses come before it in config order. A reload matches on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenKey {
    pub addr: SocketAddr,
    pub nth: usize,
}

/// A listener handed to a worker: the socket, its key, and the index of its app.
pub struct NewListener {
    pub sock: std::net::TcpListener,
    pub key: ListenKey,
    pub app: usize,
}

/// A listening socket owned by this worker.
pub struct Listener {
    pub sock: mio::net::TcpListener,
    pub key: ListenKey,
    /// Index into the worker's `apps`.
    pub app: usize,
    /// Sticky readiness: set by an event, cleared only by `WouldBlock`.
    pub readable: bool,
}

/// What a worker needs to start.
pub struct WorkerSetup {
    pub id: usize,
    pub listeners: Vec<NewListener>,
    pub apps: Vec<Arc<AppRuntime>>,
    pub max_conns: usize,
    pub buffer_size: usize,
    pub max_events: usize,
    /// This worker's counter cells (read by the admin and the summary).
    pub stats: Arc<WorkerStats>,
    /// Process-wide live pairs, shared by all workers: the global `max_conns` is taken here.
    pub global: Arc<Slots>,
    pub commands: Receiver<Command>,
    /// Where closed pairs are reported when an app has the access log on.
    pub access_log: Option<SyncSender<AccessRecord>>,
    /// Most kernel pipes this worker may hold for splice (2 fds each).
    pub pipe_budget: usize,
    /// How many of those pipes may be enlarged to `relay::PIPE_SIZE`.
    pub big_pipes: usize,
}

/// One worker's loop state. Fields are private to `worker/` (its submodules share them);
/// each states the invariant that `check_invariants` verifies in debug builds after each batch.
pub struct Worker {
    id: usize,
    poll: Poll,
    /// Live pairs, plus pairs closed in this batch (state `Closed`, listed in `closing`).
    /// Capacity is `max_conns` and never grows.
    pairs: Slab<Pair>,
    pool: BufPool,
    pipes: relay::PipePool,
    /// Indexed by listener token; `None` = closed (drain, or removed by a reload).
    listeners: Vec<Option<Listener>>,
    /// The current generation of apps; `listeners[i].app` and `balancers` index it.
    apps: Vec<Arc<AppRuntime>>,
    /// Per app (same order as `apps`), one per route (route 0 = default).
    balancers: Vec<Vec<Balancer>>,
    /// The TLS server name of each pair slot (`NAME_MAX` bytes a slot, `Pair::sni_len` used);
    /// reserved at start, pages touched only by SNI-routed apps.
    names: Vec<u8>,
    /// Scratch for candidate lists; capacity = most targets of any app (no allocation).
    scratch: Vec<u16>,
    /// Pairs closed in this batch; their slots are freed after it (stale-event guard).
    closing: Vec<usize>,
    /// Scratch for the timer scan.
    expired: Vec<(usize, timer::Due)>,
    /// Every counter this worker writes.
    rec: Recorder,
    commands: Receiver<Command>,
    max_conns: usize,
    /// The global limit refused a slot; accepting resumes at `resume_mark(max_conns)`.
    limit_paused: bool,
    /// Per app (same order as `apps`): its own limit refused a slot.
    app_paused: Vec<bool>,
    /// Accepting is paused until then: an accept failed (resource exhaustion, counted as an
    /// `emfile` pause, or an unexpected error, logged), or an upstream socket found no free
    /// file descriptor.
    accept_backoff_until: Option<Instant>,
    /// Draining: listeners closed; pairs still open at this deadline are closed.
    grace_deadline: Option<Instant>,
    stop: bool,
    /// The time of the current batch (read once after `poll`).
    now: Instant,
    next_tick: Instant,
    /// Number of pairs in state `Preface` or `Connecting`, which have a deadline (the timer
    /// runs only while some are, or while idle timeouts apply).
    setting_up: usize,
    /// Some app of this generation, or some live pair, has an idle timeout.
    idle_timeouts: bool,
    max_events: usize,
    access_log: Option<SyncSender<AccessRecord>>,
}

/// How often the coarse timer scans pairs when it has work.
pub const TICK: Duration = Duration::from_millis(50);
/// How long accepting pauses after EMFILE/ENFILE.
pub const EMFILE_BACKOFF: Duration = Duration::from_millis(100);

impl Worker {
    pub fn new(setup: WorkerSetup, poll: Poll) -> io::Result<Worker> {
        let now = Instant::now();
        let max_targets = setup
            .apps
            .iter()
            .map(|a| a.targets.len())
            .max()
            .unwrap_or(1);
        let mut listeners = Vec::with_capacity(setup.listeners.len());
        for (i, l) in setup.listeners.into_iter().enumerate() {
            listeners.push(Some(register_listener(&poll, l, i)?));
        }
        let balancers = make_balancers(setup.id, &setup.apps);
        let idle_timeouts = setup.apps.iter().any(|a| a.cfg.idle_timeout.is_some());
        Ok(Worker {
            id: setup.id,
            poll,
            pairs: Slab::with_capacity(setup.max_conns),
            names: vec![0; setup.max_conns * preface::NAME_MAX],
            pool: BufPool::new(setup.max_conns * 2, setup.buffer_size)?,
            pipes: relay::PipePool::new(setup.pipe_budget, setup.big_pipes),
            listeners,
            app_paused: vec![false; setup.apps.len()],
            apps: setup.apps,
            balancers,
            scratch: Vec::with_capacity(max_targets.max(pair::MAX_ATTEMPTS)),
            closing: Vec::with_capacity(setup.max_conns),
            expired: Vec::with_capacity(setup.max_conns),
            rec: Recorder::new(setup.id, setup.stats, setup.global, setup.max_conns),
            commands: setup.commands,
            max_conns: setup.max_conns,
            limit_paused: false,
            accept_backoff_until: None,
            grace_deadline: None,
            stop: false,
            now,
            next_tick: now,
            setting_up: 0,
            idle_timeouts,
            max_events: setup.max_events.max(1),
            access_log: setup.access_log,
        })
    }

    /// Run until drained or stopped.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(self.max_events);
        // Listeners were bound before the poll existed: drain anything already queued.
        self.accept_all();
        self.release_closed();
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.now = Instant::now();
            for ev in events.iter() {
                match token::decode(ev.token()) {
                    Decoded::Pair(idx, side) => self.on_pair_event(idx, side, ev),
                    Decoded::Listener(i) => self.on_listener_event(i),
                    Decoded::Waker => self.on_commands(),
                    Decoded::Unknown => {}
                }
            }
            if self.now >= self.next_tick {
                self.on_tick();
            }
            // Free the slots first: admission must see them as free.
            self.release_closed();
            self.maybe_resume_accepting();
            self.release_closed();
            #[cfg(debug_assertions)]
            self.check_invariants();
            if self.stop {
                self.close_all(CloseReason::Shutdown);
                self.release_closed();
                return Ok(());
            }
            if self.grace_deadline.is_some() && self.pairs.is_empty() {
                return Ok(());
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        let needs_tick = self.setting_up > 0
            || (self.idle_timeouts && !self.pairs.is_empty())
            || self.limit_paused
            || self.app_paused.iter().any(|p| *p)
            || self.accept_backoff_until.is_some()
            || self.grace_deadline.is_some();
        if !needs_tick {
            return None;
        }
        let now = Instant::now();
        Some(self.next_tick.saturating_duration_since(now).min(TICK))
    }

    fn on_commands(&mut self) {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Drain { grace, ack }) => {
                    self.start_drain(grace);
                    if let Some(ack) = ack {
                        let _ = ack.try_send(());
                    }
                }
                Ok(Command::Stop) => self.stop = true,
                Ok(Command::Reload { apps, keep, add }) => self.on_reload(apps, keep, add),
                Ok(Command::Connections(reply)) => {
                    let _ = reply.try_send(self.connections());
                }
                Ok(Command::Listen(add)) => self.add_listeners(add),
                Ok(Command::ListenerFds(reply)) => {
                    let _ = reply.try_send(self.listener_fds());
                }
                Ok(Command::Export { max, reply }) => {
                    let _ = reply.try_send(self.export(max));
                }
                Ok(Command::Settle {
                    commit,
                    abort,
                    done,
                }) => {
                    self.settle(&commit, &abort);
                    let _ = done.try_send(());
                }
                Ok(Command::Adopt(imports)) => self.adopt(imports),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    // The control side is gone: behave as an immediate stop.
                    self.stop = true;
                    return;
                }
            }
        }
    }

    fn start_drain(&mut self, grace: Duration) {
        for slot in self.listeners.iter_mut() {
            if let Some(mut l) = slot.take() {
                let _ = self.poll.registry().deregister(&mut l.sock);
            }
        }
        let deadline = self.now + grace;
        self.grace_deadline = Some(self.grace_deadline.map_or(deadline, |d| d.min(deadline)));
    }

    fn on_pair_event(&mut self, idx: usize, side: Side, ev: &mio::event::Event) {
        let Some(pair) = self.pairs.get_mut(idx) else {
            return;
        };
        if pair.state == PairState::Closed || pair.parked {
            return;
        }
        let half = pair.half(side);
        if half.sock.is_none() {
            return;
        }
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            half.readable = true;
        }
        if ev.is_read_closed() || ev.is_error() {
            half.peer_closed = true;
        }
        if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
            half.writable = true;
        }
        match (pair.state, side) {
            (PairState::Preface, Side::Client) => self.on_preface(idx),
            (PairState::Preface, Side::Upstream) => {}
            (PairState::Connecting, Side::Upstream) => self.on_connect_event(idx),
            (PairState::Connecting, Side::Client) => {
                // Client bytes wait in the kernel until the upstream is connected; only a
                // reset is acted on now, so a dead client does not hold a connect slot.
                if ev.is_error() {
                    self.close(idx, CloseReason::ClientReset);
                }
            }
            (PairState::Open | PairState::HalfClosed, _) => self.relay(idx),
            (PairState::Closed, _) => {}
        }
    }

    /// Register or re-register `half` for `want`, skipping no-op changes.
    fn set_interest(registry: &Registry, half: &mut Half, tok: Token, want: Interest) {
        if half.interest == Some(want) {
            return;
        }
        let Some(sock) = half.sock.as_mut() else {
            return;
        };
        let res = if half.interest.is_some() {
            registry.reregister(sock, tok, want)
        } else {
            registry.register(sock, tok, want)
        };
        match res {
            Ok(()) => half.interest = Some(want),
            Err(e) => log::debug!("reregister failed: {e}"),
        }
    }

    /// Mark a pair closed: buffers and pipes returned, the close counted, the access record
    /// sent, sockets closed (with a reset toward the peer of a side that reset or failed). The
    /// slot itself is freed after the batch (`release_closed`).
    fn close(&mut self, idx: usize, reason: CloseReason) {
        let Some(pair) = self.pairs.get_mut(idx) else {
            return;
        };
        let connected = match pair.state {
            PairState::Closed => return,
            PairState::Preface | PairState::Connecting => {
                self.setting_up -= 1;
                false
            }
            PairState::Open | PairState::HalfClosed => true,
        };
        pair.state = PairState::Closed;
        for flow in [&mut pair.to_upstream, &mut pair.to_client] {
            flow.buf.release(&mut self.pool, true);
            if let Some(p) = flow.pipe.take() {
                self.pipes.give(p, flow.piped == 0);
                flow.piped = 0;
            }
        }
        let truncated = pair.truncated();
        if truncated {
            log::warn!(
                "app '{}': connection {} closed ({}) with bytes read but not delivered: client->upstream {}/{}, upstream->client {}/{}",
                pair.app.cfg.name,
                pair.client_addr,
                reason.as_str(),
                pair.to_upstream.written,
                pair.to_upstream.read,
                pair.to_client.written,
                pair.to_client.read
            );
        }
        // Counters first, sockets last: whoever sees the close sees it counted.
        if pair.source_counted
            && let Some(t) = &pair.app.sources
        {
            t.remove(pair.client_addr.ip());
            pair.source_counted = false;
        }
        self.rec.record_close(&pair.app.counters, reason, truncated);
        if pair.app.cfg.access_log
            && let Some(tx) = &self.access_log
        {
            let rec = AccessRecord {
                app: pair.app.clone(),
                client: pair.client_addr,
                target: connected.then_some(usize::from(pair.target)),
                duration: self.now.saturating_duration_since(pair.started),
                connect_time: pair.connect_time(),
                bytes_to_upstream: pair.to_upstream.written,
                bytes_to_client: pair.to_client.written,
                reason,
                server_name: copy_name(&self.names, idx, pair.sni_len),
            };
            if let Err(TrySendError::Full(_)) = tx.try_send(rec) {
                self.rec.record_access_log_drop();
            }
        }
        // A reset is passed on as a reset, so the other peer can tell a truncated stream from
        // a complete one (a plain close would look like a clean end).
        if let Some(side) = reason.aborts()
            && let Some(sock) = pair.half(side).sock.as_ref()
        {
            let _ = socket2::SockRef::from(sock).set_linger(Some(Duration::ZERO));
        }
        // A stale event for this slot in the current batch finds the pair `Closed`.
        pair.drop_upstream(&self.rec);
        drop(pair.client.sock.take());
        pair.client.interest = None;
        self.closing.push(idx);
    }

    fn release_closed(&mut self) {
        if self.closing.is_empty() {
            return;
        }
        for i in 0..self.closing.len() {
            let idx = self.closing[i];
            if self.pairs.contains(idx) {
                self.pairs.remove(idx);
            }
        }
        self.closing.clear();
        self.rec.set_active(self.pairs.len());
    }

    fn close_all(&mut self, reason: CloseReason) {
        let mut idx = 0;
        let cap = self.pairs.capacity();
        while idx < cap {
            if self.pairs.contains(idx) {
                self.close(idx, reason);
            }
            idx += 1;
        }
    }
}

fn register_listener(poll: &Poll, l: NewListener, i: usize) -> io::Result<Listener> {
    let mut sock = mio::net::TcpListener::from_std(l.sock);
    poll.registry()
        .register(&mut sock, token::listener(i), Interest::READABLE)?;
    Ok(Listener {
        sock,
        key: l.key,
        app: l.app,
        readable: true,
    })
}

/// One balancer per route of each app (`[app][route]`, route 0 = default).
fn make_balancers(worker: usize, apps: &[Arc<AppRuntime>]) -> Vec<Vec<Balancer>> {
    let seed = (worker as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ std::process::id() as u64;
    apps.iter()
        .enumerate()
        .map(|(i, a)| {
            a.routes
                .iter()
                .enumerate()
                .map(|(r, route)| {
                    let keys: Vec<u64> = route
                        .members
                        .iter()
                        .map(|&m| a.targets.get(m).map_or(0, |t| fnv1a(t.cfg.name.as_bytes())))
                        .collect();
                    let salt = (i as u64).wrapping_mul(0x100_0000_01B3) ^ (r as u64) << 48;
                    Balancer::with_keys(route.balance, &route.weights, &keys, seed ^ salt)
                })
                .collect()
        })
        .collect()
}

impl Worker {
    /// Register and start accepting on `add`.
    fn add_listeners(&mut self, add: Vec<NewListener>) {
        for l in add {
            let i = self.listeners.len();
            let addr = l.key.addr;
            match register_listener(&self.poll, l, i) {
                Ok(l) => self.listeners.push(Some(l)),
                Err(e) => log::error!("worker {}: register listener {addr}: {e}", self.id),
            }
        }
    }

    /// A duplicate of each open listener with its key (an error, e.g. EMFILE, fails the
    /// upgrade that asked).
    fn listener_fds(&self) -> io::Result<Vec<(ListenKey, std::os::fd::OwnedFd)>> {
        use std::os::fd::AsFd;
        self.listeners
            .iter()
            .flatten()
            .map(|l| Ok((l.key, l.sock.as_fd().try_clone_to_owned()?)))
            .collect()
    }

    /// Install a new generation of apps (see `Command::Reload`). Allocates: reload is not the
    /// relay path.
    fn on_reload(
        &mut self,
        apps: Vec<Arc<AppRuntime>>,
        keep: Vec<(ListenKey, usize)>,
        add: Vec<NewListener>,
    ) {
        for i in 0..self.listeners.len() {
            let Some(l) = self.listeners[i].as_mut() else {
                continue;
            };
            match keep.iter().find(|(k, _)| *k == l.key) {
                Some(&(_, app)) => l.app = app,
                None => {
                    if let Some(mut l) = self.listeners[i].take() {
                        let _ = self.poll.registry().deregister(&mut l.sock);
                    }
                }
            }
        }
        self.add_listeners(add);
        self.balancers = make_balancers(self.id, &apps);
        self.app_paused = vec![false; apps.len()];
        let max_targets = apps.iter().map(|a| a.targets.len()).max().unwrap_or(1);
        if self.scratch.capacity() < max_targets {
            self.scratch.reserve(max_targets - self.scratch.len());
        }
        self.idle_timeouts = apps.iter().any(|a| a.cfg.idle_timeout.is_some())
            || self
                .pairs
                .iter()
                .any(|(_, p)| p.app.cfg.idle_timeout.is_some());
        self.apps = apps;
        self.accept_all();
    }

    fn connections(&self) -> Vec<ConnInfo> {
        self.pairs
            .iter()
            .filter(|(_, p)| p.state != PairState::Closed)
            .map(|(i, p)| ConnInfo {
                worker: self.id,
                client: p.client_addr,
                app: p.app.cfg.name.clone(),
                target: (p.n_candidates > 0)
                    .then(|| {
                        p.app
                            .targets
                            .get(usize::from(p.target))
                            .map(|t| t.cfg.name.clone())
                    })
                    .flatten(),
                state: p.state.as_str(),
                age: self.now.saturating_duration_since(p.started),
                bytes_to_upstream: p.to_upstream.written,
                bytes_to_client: p.to_client.written,
                server_name: (p.sni_len > 0).then(|| {
                    String::from_utf8_lossy(name_of(&self.names, i, p.sni_len)).into_owned()
                }),
            })
            .collect()
    }
}

/// The server name kept for pair slot `idx`.
fn name_of(names: &[u8], idx: usize, len: u8) -> &[u8] {
    let start = idx * preface::NAME_MAX;
    names.get(start..start + len as usize).unwrap_or(&[])
}

/// The server name of pair slot `idx` as a fixed-size record field.
fn copy_name(names: &[u8], idx: usize, len: u8) -> ([u8; preface::NAME_MAX], u8) {
    let mut out = [0u8; preface::NAME_MAX];
    let n = name_of(names, idx, len);
    out[..n.len()].copy_from_slice(n);
    (out, n.len() as u8)
}

/// FNV-1a: a stable hash of a target's name, so its source-hash ring points do not depend on
/// its position in the list.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(debug_assertions)]
impl Worker {
    /// The invariants written next to the fields, checked after each batch in debug builds
    /// (O(pairs); release builds skip it). A violation is a bug: panic loudly in tests.
    fn check_invariants(&self) {
        assert!(
            self.closing.is_empty(),
            "closed slots freed after the batch"
        );
        assert!(self.pairs.capacity() <= self.max_conns.max(1));
        assert_eq!(self.balancers.len(), self.apps.len());
        assert_eq!(self.app_paused.len(), self.apps.len());
        assert!(
            self.pairs.len() <= self.rec.global_active(),
            "every pair holds a global slot"
        );
        let mut setting_up = 0;
        for (_, p) in self.pairs.iter() {
            for f in [&p.to_upstream, &p.to_client] {
                assert!(f.written <= f.read);
                assert!(!f.shut || (f.eof && f.pending() == 0));
                assert!(
                    f.buf.pending() == 0 || f.piped == 0,
                    "bytes in buffer or pipe"
                );
            }
            assert!(p.attempt <= p.n_candidates && p.n_candidates as usize <= pair::MAX_ATTEMPTS);
            assert!(p.client.sock.is_some() || p.client.interest.is_none());
            assert!(p.upstream.sock.is_some() || p.upstream.interest.is_none());
            match p.state {
                PairState::Preface => {
                    setting_up += 1;
                    assert!(p.client.sock.is_some() && p.upstream.sock.is_none());
                    assert!(!p.source_counted && p.to_upstream.header == 0);
                }
                PairState::Connecting => {
                    setting_up += 1;
                    assert!(p.client.sock.is_some());
                    assert_eq!(p.upstream.sock.is_none(), p.waiting_fd);
                }
                PairState::Open => {
                    assert!(p.client.sock.is_some() && p.upstream.sock.is_some());
                    assert!(!p.to_upstream.done() && !p.to_client.done());
                }
                PairState::HalfClosed => {
                    assert!(p.client.sock.is_some() && p.upstream.sock.is_some());
                    assert!(p.to_upstream.done() != p.to_client.done());
                }
                PairState::Closed => panic!("a closed pair outlived its batch"),
            }
        }
        assert_eq!(
            setting_up, self.setting_up,
            "`setting_up` counts Preface/Connecting"
        );
    }
}
