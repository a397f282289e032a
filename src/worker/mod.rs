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
use std::sync::mpsc::{Receiver, TryRecvError};
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
    /// Stop accepting (close listeners); let live pairs finish for up to `grace`.
    Drain { grace: Duration },
    /// Close everything now and exit.
    Stop,
}

/// A listening socket owned by this worker.
pub struct Listener {
    pub sock: mio::net::TcpListener,
    pub addr: SocketAddr,
    pub app: usize,
    /// Sticky readiness: set by an event, cleared only by `WouldBlock`.
    pub readable: bool,
}

/// What a worker needs to start.
pub struct WorkerSetup {
    pub id: usize,
    pub listeners: Vec<(std::net::TcpListener, usize)>,
    pub apps: Vec<Arc<AppRuntime>>,
    pub max_conns: usize,
    pub buffer_size: usize,
    pub max_events: usize,
    pub stats: Arc<WorkerStats>,
    pub shared: Arc<Shared>,
    pub commands: Receiver<Command>,
    pub cpu: Option<usize>,
}

pub struct Worker {
    pub(crate) id: usize,
    pub(crate) poll: Poll,
    pub(crate) pairs: Slab<Pair>,
    pub(crate) pool: BufPool,
    pub(crate) listeners: Vec<Option<Listener>>,
    pub(crate) apps: Vec<Arc<AppRuntime>>,
    pub(crate) balancers: Vec<Balancer>,
    /// Scratch for candidate lists; capacity = most targets of any app.
    pub(crate) scratch: Vec<u16>,
    /// Pairs closed in this batch; their slots are freed after it.
    pub(crate) closing: Vec<usize>,
    /// Scratch for the timer scan.
    pub(crate) expired: Vec<(usize, bool)>,
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
}

/// How often the coarse timer scans pairs when it has work.
pub const TICK: Duration = Duration::from_millis(50);
/// How long accepting pauses after EMFILE/ENFILE.
pub const EMFILE_BACKOFF: Duration = Duration::from_millis(100);

impl Worker {
    pub fn new(setup: WorkerSetup, poll: Poll) -> io::Result<Worker> {
        let now = Instant::now();
        let max_targets = setup.apps.iter().map(|a| a.targets.len()).max().unwrap_or(1);
        let mut listeners = Vec::with_capacity(setup.listeners.len());
        for (i, (l, app)) in setup.listeners.into_iter().enumerate() {
            let addr = l.local_addr()?;
            let mut sock = mio::net::TcpListener::from_std(l);
            poll.registry()
                .register(&mut sock, token::listener(i), Interest::READABLE)?;
            listeners.push(Some(Listener {
                sock,
                addr,
                app,
                readable: true,
            }));
        }
        let seed = (setup.id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ now.elapsed().as_nanos() as u64
            ^ std::process::id() as u64;
        let balancers = setup
            .apps
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let weights: Vec<u32> = a.targets.iter().map(|t| t.cfg.weight).collect();
                Balancer::new(a.cfg.balance, &weights, seed ^ i as u64)
            })
            .collect();
        let idle_timeouts = setup.apps.iter().any(|a| a.cfg.idle_timeout.is_some());
        Ok(Worker {
            id: setup.id,
            poll,
            pairs: Slab::with_capacity(setup.max_conns),
            pool: BufPool::new(setup.max_conns * 2, setup.buffer_size),
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
        })
    }

    /// Run until drained or stopped.
    pub fn run(&mut self, max_events: usize) -> io::Result<()> {
        let mut events = Events::with_capacity(max_events);
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
                Ok(Command::Drain { grace }) => self.start_drain(grace),
                Ok(Command::Stop) => self.stop = true,
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

    /// Mark a pair closed: sockets deregistered and closed, buffers returned, counters updated;
    /// the slot itself is freed after the batch (`release_closed`).
    pub(crate) fn close(&mut self, idx: usize, reason: CloseReason) {
        let Some(pair) = self.pairs.get_mut(idx) else {
            return;
        };
        if pair.state == PairState::Closed {
            return;
        }
        if pair.state == PairState::Connecting {
            self.connecting -= 1;
        }
        pair.state = PairState::Closed;
        pair.reason = reason;
        for half in [&mut pair.client, &mut pair.upstream] {
            if let Some(mut sock) = half.sock.take() {
                if half.interest.take().is_some() {
                    let _ = self.poll.registry().deregister(&mut sock);
                }
            }
        }
        pair.up.buf.release(&mut self.pool, true);
        pair.down.buf.release(&mut self.pool, true);
        let app = &self.apps[pair.app];
        if pair.target_counted {
            pair.target_counted = false;
            if let Some(t) = app.targets.get(pair.target) {
                t.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        app.active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.shared.close();
        self.stats.closed[reason as usize].add(1);
        if pair.up.read != pair.up.written || pair.down.read != pair.down.written {
            log::debug!(
                "pair {} closed ({}) with undelivered bytes: up {}/{} down {}/{}",
                pair.client_addr,
                reason.as_str(),
                pair.up.written,
                pair.up.read,
                pair.down.written,
                pair.down.read
            );
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
