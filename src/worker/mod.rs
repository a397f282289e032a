//! One worker: one thread, one `mio::Poll` (edge-triggered), one `Slab<Pair>`, one buffer
//! pool and its own listener sockets. The loop polls, dispatches events by token, runs the
//! coarse timer, resumes paused accepting, and frees the slots of pairs closed in the batch.
//! It must never block, never allocate between polls, and never panic on network input.

pub mod accept;
pub mod connect;
pub mod pair;
pub mod relay;
pub mod timer;
pub mod token;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Registry, Token};
use slab::Slab;

use crate::backend::AppRuntime;
use crate::balance::Balancer;
use crate::buffer::BufPool;
use crate::stats::{PauseCause, Shared, WorkerStats};
use pair::{CloseReason, Half, Pair, PairState};
use token::{Decoded, Side};

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
    /// Switch to a new generation of apps. Listeners whose configured address is in `keep`
    /// stay open and serve the app given there; the others close; `add` are new listeners.
    /// Live pairs are untouched.
    Reload {
        apps: Vec<Arc<AppRuntime>>,
        keep: Vec<(SocketAddr, usize)>,
        add: Vec<NewListener>,
    },
    /// Describe the live pairs (for the admin endpoint).
    Connections(SyncSender<Vec<ConnInfo>>),
}

/// A listener handed to a worker: the socket, the address as configured, and its app.
pub struct NewListener {
    pub sock: std::net::TcpListener,
    pub cfg_addr: SocketAddr,
    pub app: usize,
}

/// One live pair, as the admin endpoint shows it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub worker: usize,
    pub client: SocketAddr,
    pub app: String,
    pub target: Option<String>,
    pub state: &'static str,
    pub age: Duration,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// One closed pair, for the access log (formatted off the worker thread).
pub struct AccessRecord {
    pub app: Arc<AppRuntime>,
    pub client: SocketAddr,
    pub target: Option<usize>,
    pub duration: Duration,
    pub connect_time: Duration,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub reason: CloseReason,
}

/// A listening socket owned by this worker.
pub struct Listener {
    pub sock: mio::net::TcpListener,
    /// As configured (port 0 stays 0): the key a reload matches on.
    pub cfg_addr: SocketAddr,
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
    pub stats: Arc<WorkerStats>,
    pub shared: Arc<Shared>,
    pub commands: Receiver<Command>,
    /// Where closed pairs are reported when an app has the access log on.
    pub access_log: Option<SyncSender<AccessRecord>>,
    /// Most kernel pipes this worker may hold for splice (2 fds each).
    pub pipe_budget: usize,
}

pub struct Worker {
    pub(crate) id: usize,
    pub(crate) poll: Poll,
    pub(crate) pairs: Slab<Pair>,
    pub(crate) pool: BufPool,
    pub(crate) pipes: relay::PipePool,
    pub(crate) listeners: Vec<Option<Listener>>,
    pub(crate) apps: Vec<Arc<AppRuntime>>,
    pub(crate) balancers: Vec<Balancer>,
    /// Scratch for candidate lists; capacity = most targets of any app.
    pub(crate) scratch: Vec<u16>,
    /// Pairs closed in this batch; their slots are freed after it.
    pub(crate) closing: Vec<usize>,
    /// Scratch for the timer scan.
    pub(crate) expired: Vec<(usize, timer::Due)>,
    pub(crate) stats: Arc<WorkerStats>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) commands: Receiver<Command>,
    pub(crate) max_conns: usize,
    /// Global limit reached; accepting resumes at `resume_mark(max_conns)`.
    pub(crate) limit_paused: bool,
    /// Per-app limit reached.
    pub(crate) app_paused: Vec<bool>,
    /// Accepting paused after EMFILE/ENFILE until then.
    pub(crate) emfile_until: Option<Instant>,
    /// Draining: listeners closed; pairs closed at this deadline.
    pub(crate) grace_deadline: Option<Instant>,
    pub(crate) stop: bool,
    pub(crate) now: Instant,
    pub(crate) next_tick: Instant,
    /// Pairs in `Connecting` (the timer only needs to run while some are, or idle timeouts).
    pub(crate) connecting: usize,
    pub(crate) idle_timeouts: bool,
    pub(crate) max_events: usize,
    pub(crate) access_log: Option<SyncSender<AccessRecord>>,
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
            pool: BufPool::new(setup.max_conns * 2, setup.buffer_size)?,
            pipes: relay::PipePool::new(setup.pipe_budget),
            listeners,
            app_paused: vec![false; setup.apps.len()],
            apps: setup.apps,
            balancers,
            scratch: Vec::with_capacity(max_targets.max(pair::MAX_ATTEMPTS)),
            closing: Vec::with_capacity(setup.max_conns),
            expired: Vec::with_capacity(setup.max_conns),
            stats: setup.stats,
            shared: setup.shared,
            commands: setup.commands,
            max_conns: setup.max_conns,
            limit_paused: false,
            emfile_until: None,
            grace_deadline: None,
            stop: false,
            now,
            next_tick: now,
            connecting: 0,
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
        let needs_tick = self.connecting > 0
            || (self.idle_timeouts && !self.pairs.is_empty())
            || self.limit_paused
            || self.app_paused.iter().any(|p| *p)
            || self.emfile_until.is_some()
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
        if pair.state == PairState::Closed {
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
            half.hup = true;
        }
        if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
            half.writable = true;
        }
        match (pair.state, side) {
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
    pub(crate) fn set_interest(registry: &Registry, half: &mut Half, tok: Token, want: Interest) {
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

    /// Mark a pair closed: buffers returned, counters updated, sockets deregistered and closed;
    /// the slot itself is freed after the batch (`release_closed`).
    pub(crate) fn close(&mut self, idx: usize, reason: CloseReason) {
        let Some(pair) = self.pairs.get_mut(idx) else {
            return;
        };
        if pair.state == PairState::Closed {
            return;
        }
        let was_connecting = pair.state == PairState::Connecting;
        if was_connecting {
            self.connecting -= 1;
        }
        pair.reason = reason;
        pair.up.buf.release(&mut self.pool, true);
        pair.down.buf.release(&mut self.pool, true);
        for flow in [&mut pair.up, &mut pair.down] {
            if let Some(p) = flow.pipe.take() {
                self.pipes.give(p, flow.piped == 0);
                flow.piped = 0;
            }
        }
        let app = &pair.app;
        if pair.target_counted {
            pair.target_counted = false;
            if let Some(t) = app.targets.get(pair.target) {
                t.counters.active.fetch_sub(1, Relaxed);
            }
        }
        let c = &app.counters;
        c.active.fetch_sub(1, Relaxed);
        c.closed[reason as usize].fetch_add(1, Relaxed);
        self.shared.close();
        self.stats.closed[reason as usize].add(1);
        if pair.up.read != pair.up.written || pair.down.read != pair.down.written {
            c.truncated[reason as usize].fetch_add(1, Relaxed);
            log::warn!(
                "app '{}': connection {} closed ({}) with bytes read but not delivered: client->upstream {}/{}, upstream->client {}/{}",
                app.cfg.name,
                pair.client_addr,
                reason.as_str(),
                pair.up.written,
                pair.up.read,
                pair.down.written,
                pair.down.read
            );
        }
        pair.state = PairState::Closed;
        if app.cfg.access_log
            && let Some(tx) = &self.access_log
        {
            let rec = AccessRecord {
                app: app.clone(),
                client: pair.client_addr,
                target: (!was_connecting).then_some(pair.target),
                duration: self.now.saturating_duration_since(pair.started),
                connect_time: pair.connect_time,
                bytes_up: pair.up.written,
                bytes_down: pair.down.written,
                reason,
            };
            if let Err(TrySendError::Full(_)) = tx.try_send(rec) {
                self.stats.access_log_dropped.add(1);
            }
        }
        // Counters first, sockets last: whoever sees the close sees it counted.
        // A reset is passed on as a reset, so the other peer can tell a truncated stream from
        // a complete one (a plain close would look like a clean end).
        let abort_other = match reason {
            CloseReason::ClientReset | CloseReason::ClientError => Some(Side::Upstream),
            CloseReason::UpstreamReset | CloseReason::UpstreamError => Some(Side::Client),
            CloseReason::Done
            | CloseReason::NoBackend
            | CloseReason::IdleTimeout
            | CloseReason::Shutdown
            | CloseReason::Internal => None,
        };
        if let Some(side) = abort_other
            && let Some(sock) = pair.half(side).sock.as_ref()
        {
            let _ = socket2::SockRef::from(sock).set_linger(Some(Duration::ZERO));
        }
        // Closing an fd removes it from the epoll set, so no epoll_ctl(DEL) is spent; a
        // stale event for this slot in the current batch finds the pair `Closed`.
        for half in [&mut pair.client, &mut pair.upstream] {
            drop(half.sock.take());
            half.interest = None;
        }
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
        self.stats.set_active(self.pairs.len());
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

    pub(crate) fn count_pause(&self, cause: PauseCause) {
        self.stats.accept_pauses[cause as usize].add(1);
    }
}

fn register_listener(poll: &Poll, l: NewListener, i: usize) -> io::Result<Listener> {
    let mut sock = mio::net::TcpListener::from_std(l.sock);
    poll.registry()
        .register(&mut sock, token::listener(i), Interest::READABLE)?;
    Ok(Listener {
        sock,
        cfg_addr: l.cfg_addr,
        app: l.app,
        readable: true,
    })
}

fn make_balancers(worker: usize, apps: &[Arc<AppRuntime>]) -> Vec<Balancer> {
    let seed = (worker as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ std::process::id() as u64;
    apps.iter()
        .enumerate()
        .map(|(i, a)| {
            let weights: Vec<u32> = a.targets.iter().map(|t| t.cfg.weight).collect();
            let keys: Vec<u64> = a
                .targets
                .iter()
                .map(|t| fnv1a(t.cfg.name.as_bytes()))
                .collect();
            Balancer::with_keys(
                a.cfg.balance,
                &weights,
                &keys,
                seed ^ (i as u64).wrapping_mul(0x100_0000_01B3),
            )
        })
        .collect()
}

impl Worker {
    /// Install a new generation of apps (see `Command::Reload`). Allocates: reload is not the
    /// relay path.
    fn on_reload(
        &mut self,
        apps: Vec<Arc<AppRuntime>>,
        keep: Vec<(SocketAddr, usize)>,
        add: Vec<NewListener>,
    ) {
        for i in 0..self.listeners.len() {
            let Some(l) = self.listeners[i].as_mut() else {
                continue;
            };
            match keep.iter().find(|(a, _)| *a == l.cfg_addr) {
                Some(&(_, app)) => l.app = app,
                None => {
                    if let Some(mut l) = self.listeners[i].take() {
                        let _ = self.poll.registry().deregister(&mut l.sock);
                    }
                }
            }
        }
        for l in add {
            let i = self.listeners.len();
            let cfg_addr = l.cfg_addr;
            match register_listener(&self.poll, l, i) {
                Ok(l) => self.listeners.push(Some(l)),
                Err(e) => log::error!("worker {}: register listener {cfg_addr}: {e}", self.id),
            }
        }
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
            .map(|(_, p)| ConnInfo {
                worker: self.id,
                client: p.client_addr,
                app: p.app.cfg.name.clone(),
                target: (p.ncand > 0)
                    .then(|| p.app.targets.get(p.target).map(|t| t.cfg.name.clone()))
                    .flatten(),
                state: p.state.as_str(),
                age: self.now.saturating_duration_since(p.started),
                bytes_up: p.up.written,
                bytes_down: p.down.written,
            })
            .collect()
    }
}

/// FNV-1a: a stable hash of a target's name, so its source-hash ring points do not depend on
/// its position in the list.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
