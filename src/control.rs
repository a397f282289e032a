//! The runtime: turns a `Config` into running threads. Binds every listener on the calling
//! thread first (so a bind error fails fast with one message), sizes limits from the fd limit,
//! spawns one worker per configured worker (each with its own poll, listeners and channel +
//! waker for commands) and the health checker, and collects the summary at the end. Never
//! touches a worker's loop directly: it only sends commands.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Poll, Waker};

use crate::backend::{AppRuntime, Carry};
use crate::config::{Config, DEFAULT_MAX_CONNS, Workers};
use crate::error::Error;
use crate::health::{self, HealthTarget};
use crate::stats::{Shared, Summary, WorkerStats};
use crate::worker::{AccessRecord, Command, ConnInfo, NewListener, Worker, WorkerSetup, token};
use crate::{metrics, net, sys};

/// File descriptors kept free for listeners, the poll, logging and the like.
const FD_RESERVE: u64 = 32;

struct WorkerHandle {
    thread: Option<JoinHandle<io::Result<()>>>,
}

/// A way to reach one worker: its command channel and its poll's waker.
pub struct WorkerLink {
    tx: Mutex<Sender<Command>>,
    waker: Arc<Waker>,
}

impl WorkerLink {
    fn send(&self, cmd: Command) -> bool {
        let sent = self
            .tx
            .lock()
            .map(|tx| tx.send(cmd).is_ok())
            .unwrap_or(false);
        if sent {
            let _ = self.waker.wake();
        }
        sent
    }
}

/// What the control, admin and health threads share: read-mostly views of the running proxy.
/// Workers never read this; they get commands.
pub struct State {
    /// The current generation of apps (replaced on reload).
    pub apps: Mutex<Vec<Arc<AppRuntime>>>,
    pub workers: Vec<Arc<WorkerStats>>,
    pub links: Vec<WorkerLink>,
    pub shared: Arc<Shared>,
    /// Listeners are bound and serving.
    pub ready: AtomicBool,
    /// SIGTERM received: readyz answers 503.
    pub draining: AtomicBool,
    /// Config reloads: [success, failure].
    pub reloads: [AtomicU64; 2],
    pub started: Instant,
    /// Unix time of the start, seconds.
    pub start_time: f64,
    pub max_conns: usize,
}

impl State {
    pub fn apps(&self) -> Vec<Arc<AppRuntime>> {
        self.apps.lock().map(|a| a.clone()).unwrap_or_default()
    }

    pub fn summary(&self) -> Summary {
        Summary::collect(
            self.workers.iter().map(|s| s.as_ref()),
            &self.shared,
            self.started.elapsed(),
        )
    }

    /// Ask every worker for its live pairs (bounded wait).
    pub fn connections(&self, timeout: Duration) -> Vec<ConnInfo> {
        let mut out = Vec::new();
        let mut replies = Vec::new();
        for link in &self.links {
            let (tx, rx) = mpsc::sync_channel(1);
            if link.send(Command::Connections(tx)) {
                replies.push(rx);
            }
        }
        let deadline = Instant::now() + timeout;
        for rx in replies {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok(list) = rx.recv_timeout(left) {
                out.extend(list);
            }
        }
        out
    }
}

/// A running proxy. Dropping it stops it immediately.
pub struct Proxy {
    workers: Vec<WorkerHandle>,
    state: Arc<State>,
    /// Listen addresses as configured -> as bound (port 0 resolved), in config order.
    bound: Vec<(SocketAddr, SocketAddr)>,
    config: Config,
    nworkers: usize,
    health: Option<HealthThread>,
    access_thread: Option<JoinHandle<()>>,
    admin: Option<metrics::AdminServer>,
    failed: Mutex<Vec<String>>,
}

/// The effective global limit and why: the configured one (or the default), lowered to what
/// the fd limit allows (2 fds per pair, plus a quarter pipe per pair with splice) and, inside
/// a cgroup with a memory limit, to what keeps worst-case buffer memory under half of it.
fn effective_max_conns(
    cfg: &Config,
    nofile: u64,
    listeners: usize,
    mem_limit: Option<u64>,
) -> (usize, Vec<String>) {
    let want = cfg.max_conns.unwrap_or(DEFAULT_MAX_CONNS);
    let splice = cfg.apps.iter().any(|a| a.splice);
    let reserve = FD_RESERVE + listeners as u64;
    let usable = nofile.saturating_sub(reserve);
    // Per pair: 2 sockets; with splice also max_conns/4 pipes of 2 fds = 0.5 fd per pair.
    let fd_fit = if splice { usable * 2 / 5 } else { usable / 2 }.max(1) as usize;
    let mut notes = Vec::new();
    let mut limit = want;
    if limit > fd_fit {
        notes.push(format!(
            "max_conns {limit} does not fit the open-files limit {nofile} ({} fds per pair{}); using max_conns {fd_fit}",
            if splice { "2.5" } else { "2" },
            if splice { " with splice pipes" } else { "" }
        ));
        limit = fd_fit;
    }
    if let Some(mem) = mem_limit {
        let per_pair = 2 * cfg.buffer_size as u64;
        let mem_fit = ((mem / 2) / per_pair.max(1)).max(1) as usize;
        if limit > mem_fit {
            notes.push(format!(
                "cgroup memory limit {} MiB: worst-case buffer memory must stay under half of it ({} B per pair); using max_conns {mem_fit}",
                mem >> 20,
                per_pair
            ));
            limit = mem_fit;
        }
    }
    (limit, notes)
}

fn worker_count(w: Workers) -> usize {
    match w {
        Workers::Count(n) => n.max(1),
        Workers::Auto => {
            let cpus = sys::allowed_cpus().map(|c| c.len()).unwrap_or(1).max(1);
            match sys::cgroup_cpu_quota() {
                Some(q) => cpus.min(q.ceil().max(1.0) as usize),
                None => cpus,
            }
        }
    }
}

/// Bind `addr` once per worker (all on this thread, so errors surface at once).
fn bind_all(
    addr: SocketAddr,
    backlog: i32,
    nworkers: usize,
) -> Result<(SocketAddr, Vec<std::net::TcpListener>), Error> {
    let mut actual = addr;
    let mut out = Vec::with_capacity(nworkers);
    for w in 0..nworkers {
        let l = net::bind_listener(actual, backlog, nworkers > 1)
            .map_err(|e| Error::io(format!("bind {addr}"), e))?;
        if w == 0 {
            actual = l
                .local_addr()
                .map_err(|e| Error::io(format!("bind {addr}"), e))?;
        }
        out.push(l);
    }
    Ok((actual, out))
}

fn health_targets(apps: &[Arc<AppRuntime>]) -> Vec<HealthTarget> {
    let mut out = Vec::new();
    for a in apps {
        if let Some(check) = a.cfg.health.active {
            for t in &a.targets {
                out.push(HealthTarget {
                    app: a.cfg.name.clone(),
                    target: t.cfg.name.clone(),
                    addr: t.cfg.addr,
                    state: t.health.clone(),
                    check,
                });
            }
        }
    }
    out
}

/// A running health checker: its stop flag and thread.
type HealthThread = (Arc<AtomicBool>, JoinHandle<()>);

fn start_health(apps: &[Arc<AppRuntime>]) -> Result<Option<HealthThread>, Error> {
    let targets = health_targets(apps);
    if targets.is_empty() {
        return Ok(None);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let t = health::spawn_checker(targets, stop.clone())
        .map_err(|e| Error::io("spawn health checker", e))?;
    Ok(Some((stop, t)))
}

fn log_listeners(cfg: &Config, bound: &[(SocketAddr, SocketAddr)], only_new: &[SocketAddr]) {
    for app in &cfg.apps {
        let targets: Vec<&str> = app.targets.iter().map(|t| t.name.as_str()).collect();
        for addr in &app.listen {
            if !only_new.is_empty() && !only_new.contains(addr) {
                continue;
            }
            let actual = bound
                .iter()
                .find(|(c, _)| c == addr)
                .map_or(*addr, |(_, a)| *a);
            log::info!(
                "app '{}' listening on {} -> {} ({})",
                app.name,
                actual,
                targets.join(", "),
                app.balance.as_str()
            );
        }
    }
}

fn spawn_access_log() -> Result<(SyncSender<AccessRecord>, JoinHandle<()>), Error> {
    let (tx, rx) = mpsc::sync_channel::<AccessRecord>(8192);
    let t = std::thread::Builder::new()
        .name("epoxy-access-log".into())
        .spawn(move || {
            while let Ok(r) = rx.recv() {
                log::info!(target: "access", "{}", metrics::access_line(&r));
            }
        })
        .map_err(|e| Error::io("spawn access-log thread", e))?;
    Ok((tx, t))
}

impl Proxy {
    /// Bind, spawn and start serving `config`.
    pub fn start(config: Config) -> Result<Proxy, Error> {
        if config.apps.is_empty() {
            return Err(Error::config("no apps configured"));
        }
        let nofile = sys::raise_nofile_limit().unwrap_or(1024);
        let nworkers = worker_count(config.workers);
        let nlisten: usize = config.apps.iter().map(|a| a.listen.len()).sum();
        let mem_limit = sys::cgroup_memory_limit();
        let (max_conns, notes) =
            effective_max_conns(&config, nofile, nlisten * nworkers, mem_limit);
        for note in notes {
            log::warn!("{note}");
        }
        if matches!(config.workers, Workers::Auto) {
            log::info!(
                "workers auto: {nworkers} (usable CPUs {:?}, cgroup CPU quota {:?})",
                sys::allowed_cpus().map(|c| c.len()).ok(),
                sys::cgroup_cpu_quota()
            );
        }
        let pipe_budget = if config.apps.iter().any(|a| a.splice) {
            (max_conns / 4).max(16).div_ceil(nworkers)
        } else {
            0
        };
        if !config.cpu_pin.is_empty() {
            let allowed = sys::allowed_cpus().unwrap_or_default();
            for cpu in &config.cpu_pin {
                if !allowed.contains(cpu) {
                    return Err(Error::config(format!(
                        "cpu_pin: CPU {cpu} is not available to this process (allowed: {allowed:?})"
                    )));
                }
            }
        }

        let carry = Carry::default();
        let apps: Vec<Arc<AppRuntime>> = config
            .apps
            .iter()
            .map(|a| Arc::new(AppRuntime::new(a.clone(), nworkers, &carry)))
            .collect();

        // Bind everything first: one socket per listen address per worker.
        let mut per_worker: Vec<Vec<NewListener>> = (0..nworkers).map(|_| Vec::new()).collect();
        let mut bound = Vec::new();
        for (app_idx, app) in config.apps.iter().enumerate() {
            for &addr in &app.listen {
                let (actual, socks) = bind_all(addr, config.backlog, nworkers)?;
                bound.push((addr, actual));
                for (list, sock) in per_worker.iter_mut().zip(socks) {
                    list.push(NewListener {
                        sock,
                        cfg_addr: addr,
                        app: app_idx,
                    });
                }
            }
        }

        let any_access_log = config.apps.iter().any(|a| a.access_log);
        let (access_tx, access_thread) = if any_access_log || config.source.is_some() {
            let (tx, t) = spawn_access_log()?;
            (Some(tx), Some(t))
        } else {
            (None, None)
        };

        let shared = Arc::new(Shared::default());
        let mut workers = Vec::with_capacity(nworkers);
        let mut stats = Vec::with_capacity(nworkers);
        let mut links = Vec::with_capacity(nworkers);
        for (id, listeners) in per_worker.into_iter().enumerate() {
            let poll = Poll::new().map_err(|e| Error::io("create poll", e))?;
            let waker = Arc::new(
                Waker::new(poll.registry(), token::WAKER)
                    .map_err(|e| Error::io("create waker", e))?,
            );
            let (tx, rx) = mpsc::channel();
            let wstats = Arc::new(WorkerStats::default());
            let cpu = config.cpu_pin.get(id).copied();
            let setup = WorkerSetup {
                id,
                listeners,
                apps: apps.clone(),
                max_conns,
                buffer_size: config.buffer_size,
                max_events: config.max_events,
                stats: wstats.clone(),
                shared: shared.clone(),
                commands: rx,
                access_log: access_tx.clone(),
                pipe_budget,
            };
            let mut worker = Worker::new(setup, poll).map_err(|e| {
                Error::io(
                    format!(
                        "start worker {id} (register listeners, reserve {} MiB of buffer space)",
                        (max_conns * 2 * config.buffer_size) >> 20
                    ),
                    e,
                )
            })?;
            let thread = std::thread::Builder::new()
                .name(format!("epoxy-worker-{id}"))
                .spawn(move || {
                    if let Some(cpu) = cpu
                        && let Err(e) = sys::pin_current_thread(cpu)
                    {
                        log::warn!("worker {id}: pin to CPU {cpu}: {e}");
                    }
                    worker.run()
                })
                .map_err(|e| Error::io("spawn worker thread", e))?;
            workers.push(WorkerHandle {
                thread: Some(thread),
            });
            links.push(WorkerLink {
                tx: Mutex::new(tx),
                waker,
            });
            stats.push(wstats);
        }
        drop(access_tx);

        let health = start_health(&apps)?;
        let state = Arc::new(State {
            apps: Mutex::new(apps),
            workers: stats,
            links,
            shared,
            ready: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            reloads: Default::default(),
            started: Instant::now(),
            start_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            max_conns,
        });
        let admin = match config.admin {
            Some(addr) => Some(metrics::AdminServer::start(addr, state.clone())?),
            None => None,
        };

        log_listeners(&config, &bound, &[]);
        log::info!(
            "epoxy {} started: {} worker(s), max_conns {}, buffer {} B (worst-case buffer memory {} MiB), fd limit {}",
            env!("CARGO_PKG_VERSION"),
            nworkers,
            max_conns,
            config.buffer_size,
            (max_conns * 2 * config.buffer_size) >> 20,
            nofile
        );
        if let Some(a) = &admin {
            log::info!("admin endpoint on http://{}/metrics", a.addr());
        }

        Ok(Proxy {
            workers,
            state,
            bound,
            config,
            nworkers,
            health,
            access_thread,
            admin,
            failed: Mutex::new(Vec::new()),
        })
    }

    /// The bound listener addresses (port 0 resolved), in config order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.bound.iter().map(|(_, a)| *a).collect()
    }

    /// The admin endpoint's address, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.addr())
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Apply a new configuration (SIGHUP): new listeners are bound first (a failure leaves
    /// everything as it was), then every worker switches to the new apps; live pairs are
    /// untouched, removed listeners close, unchanged targets keep their health state.
    pub fn reload(&mut self, new: Config) -> Result<(), Error> {
        let res = self.try_reload(new);
        let slot = if res.is_ok() { 0 } else { 1 };
        self.state.reloads[slot].fetch_add(1, Ordering::Relaxed);
        res
    }

    /// Count a reload that failed before reaching the runtime (e.g. a config error).
    pub fn count_failed_reload(&self) {
        self.state.reloads[1].fetch_add(1, Ordering::Relaxed);
    }

    fn try_reload(&mut self, new: Config) -> Result<(), Error> {
        if self.state.draining.load(Ordering::Relaxed) {
            return Err(Error::runtime("shutting down; reload ignored"));
        }
        let carry = Carry::from_apps(&self.state.apps());
        let apps: Vec<Arc<AppRuntime>> = new
            .apps
            .iter()
            .map(|a| Arc::new(AppRuntime::new(a.clone(), self.nworkers, &carry)))
            .collect();
        // Listeners: keep those whose configured address stays; bind the new ones now.
        let mut keep = Vec::new();
        let mut per_worker: Vec<Vec<NewListener>> =
            (0..self.nworkers).map(|_| Vec::new()).collect();
        let mut bound = Vec::new();
        let mut added = Vec::new();
        for (app_idx, app) in new.apps.iter().enumerate() {
            for &addr in &app.listen {
                if let Some(&(c, a)) = self.bound.iter().find(|(c, _)| *c == addr) {
                    keep.push((addr, app_idx));
                    bound.push((c, a));
                    continue;
                }
                let (actual, socks) = bind_all(addr, new.backlog, self.nworkers)?;
                bound.push((addr, actual));
                added.push(addr);
                for (list, sock) in per_worker.iter_mut().zip(socks) {
                    list.push(NewListener {
                        sock,
                        cfg_addr: addr,
                        app: app_idx,
                    });
                }
            }
        }
        let removed: Vec<SocketAddr> = self
            .bound
            .iter()
            .filter(|(c, _)| !bound.iter().any(|(n, _)| n == c))
            .map(|(_, a)| *a)
            .collect();
        for (link, add) in self.state.links.iter().zip(per_worker) {
            link.send(Command::Reload {
                apps: apps.clone(),
                keep: keep.clone(),
                add,
            });
        }
        // Health checks follow the new target set (states of unchanged targets carried).
        if let Some((stop, t)) = self.health.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = t.join();
        }
        self.health = start_health(&apps)?;
        if let Ok(mut cur) = self.state.apps.lock() {
            *cur = apps;
        }
        for g in ["workers", "max_conns", "buffer_size", "max_events"] {
            let changed = match g {
                "workers" => new.workers != self.config.workers,
                "max_conns" => new.max_conns != self.config.max_conns,
                "buffer_size" => new.buffer_size != self.config.buffer_size,
                _ => new.max_events != self.config.max_events,
            };
            if changed {
                log::warn!("reload: '{g}' changed; it takes effect only after a restart");
            }
        }
        log_listeners(&new, &bound, &added);
        for r in &removed {
            log::info!("listener {r} removed; its live connections continue");
        }
        self.bound = bound;
        let keep_runtime = (
            self.config.workers,
            self.config.max_conns,
            self.config.buffer_size,
        );
        self.config = Config {
            workers: keep_runtime.0,
            max_conns: keep_runtime.1,
            buffer_size: keep_runtime.2,
            max_events: self.config.max_events,
            ..new
        };
        log::info!(
            "configuration reloaded: {} app(s), {} listener(s)",
            self.config.apps.len(),
            self.bound.len()
        );
        Ok(())
    }

    fn send(&self, make: impl Fn() -> Command) {
        for l in &self.state.links {
            l.send(make());
        }
    }

    /// Mark not ready (readyz 503) without closing anything yet: the start of a drain.
    pub fn begin_drain(&self) {
        self.state.draining.store(true, Ordering::Relaxed);
    }

    /// Stop accepting now; live pairs get the configured grace period. Returns once every
    /// worker has closed its listeners (or after one second).
    pub fn shutdown(&self) {
        self.begin_drain();
        let grace = self.config.grace;
        let (tx, rx) = mpsc::sync_channel(self.state.links.len());
        let mut sent = 0;
        for l in &self.state.links {
            if l.send(Command::Drain {
                grace,
                ack: Some(tx.clone()),
            }) {
                sent += 1;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        for _ in 0..sent {
            let left = deadline.saturating_duration_since(Instant::now());
            if rx.recv_timeout(left).is_err() {
                break;
            }
        }
    }

    /// Close everything now. Non-blocking.
    pub fn stop_now(&self) {
        self.begin_drain();
        self.send(|| Command::Stop);
    }

    /// All workers have exited.
    pub fn is_finished(&self) -> bool {
        self.workers
            .iter()
            .all(|w| w.thread.as_ref().is_none_or(|t| t.is_finished()))
    }

    /// Current totals.
    pub fn summary(&self) -> Summary {
        self.state.summary()
    }

    /// Errors of workers that stopped abnormally (after `join`).
    pub fn failures(&self) -> Vec<String> {
        self.failed.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// Wait for every worker to exit, stop the helpers, and return the final totals.
    pub fn join(mut self) -> Summary {
        self.join_threads();
        self.summary()
    }

    /// Like `join`, also returning the workers' failures (empty = clean).
    pub fn join_with_failures(mut self) -> (Summary, Vec<String>) {
        self.join_threads();
        (self.summary(), self.failures())
    }

    fn join_threads(&mut self) {
        let mut failed = Vec::new();
        for (i, w) in self.workers.iter_mut().enumerate() {
            if let Some(t) = w.thread.take() {
                match t.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => failed.push(format!("worker {i}: {e}")),
                    Err(_) => failed.push(format!("worker {i}: panicked")),
                }
            }
        }
        self.state.ready.store(false, Ordering::Relaxed);
        if let Some((stop, t)) = self.health.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = t.join();
        }
        if let Some(a) = self.admin.take() {
            a.stop();
        }
        // Workers hold the only senders; with them gone the access-log thread drains and ends.
        if let Some(t) = self.access_thread.take() {
            let _ = t.join();
        }
        if let Ok(mut f) = self.failed.lock() {
            f.extend(failed);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.workers.iter().any(|w| w.thread.is_some()) {
            self.stop_now();
        }
        self.join_threads();
    }
}

/// How often `main` checks for worker exit and periodic work while handling signals.
pub const CONTROL_TICK: Duration = Duration::from_millis(100);
