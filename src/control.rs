//! The lifecycle of a running proxy, in one place: start (bind every listener on the calling
//! thread first, so a bind error fails fast with one message; size limits from the fd and
//! cgroup limits; spawn workers, health checker, access log and admin), reload, drain
//! (readiness off, `drain_delay`, listeners closed, `grace_period`, a second request stops at
//! once), the periodic traffic line, and the final summary. [`Proxy::serve`] runs that loop
//! for the binary and for embedders alike, driven by signals (SIGTERM/SIGINT drain, SIGHUP
//! reload) and/or a [`ShutdownHandle`]. Never touches a worker's loop directly: it only sends
//! commands through each worker's channel + waker.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
use signal_hook_mio::v1_0::Signals;

use crate::access_log;
use crate::admin::{AdminServer, Carried, LiveConnections, ProxyView};
use crate::backend::{AppRuntime, Retained};
use crate::config::{self, Config, DEFAULT_MAX_CONNS, Overrides, Workers};
use crate::error::Error;
use crate::health::{self, HealthTarget};
use crate::stats::{ConnInfo, Slots, Summary, WorkerStats};
use crate::upgrade::{
    self, ExecSpec, Inherited, Predecessor, SocketEntry, SocketKind, Successor, Totals, Upgrader,
};
use crate::worker::{Command, ListenKey, NewListener, Worker, WorkerSetup, token};
use crate::{net, sys};

/// How long an upgrade may spend moving live pairs before the rest drain in the old process.
const MIGRATE_BUDGET: Duration = Duration::from_millis(1500);
/// Pairs per batch (two descriptors each, within one SCM_RIGHTS message).
const MIGRATE_BATCH: usize = sys::MAX_FDS_PER_MESSAGE / 2;
/// How long the old process waits for the new one to answer a batch.
const MIGRATE_ANSWER_TIMEOUT: Duration = Duration::from_millis(500);

/// Kernel pipes per worker for `splice = "auto"` (2 fds each): bulk directions hold one only
/// while bytes sit in it, so this bounds concurrent bulk moves, not bulk pairs; the excess
/// relays through buffers.
pub const AUTO_PIPES_PER_WORKER: usize = 64;

/// File descriptors kept free for listeners, the poll, logging and the like.
const FD_RESERVE: u64 = 32;
/// How often the lifecycle loop checks for worker exit and periodic work.
pub const CONTROL_TICK: Duration = Duration::from_millis(100);

/// A way to reach one worker: its command channel and its poll's waker.
struct WorkerLink {
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

/// Every worker's link; answers the admin's live-connection queries.
struct WorkerLinks(Vec<WorkerLink>);

impl WorkerLinks {
    fn broadcast(&self, make: impl Fn() -> Command) -> usize {
        self.0.iter().filter(|l| l.send(make())).count()
    }
}

impl LiveConnections for WorkerLinks {
    /// Ask every worker for its live pairs (bounded wait).
    fn list(&self, timeout: Duration) -> Vec<ConnInfo> {
        let replies: Vec<_> = self
            .0
            .iter()
            .filter_map(|link| {
                let (tx, rx) = mpsc::sync_channel(1);
                link.send(Command::Connections(tx)).then_some(rx)
            })
            .collect();
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        for rx in replies {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok(list) = rx.recv_timeout(left) {
                out.extend(list);
            }
        }
        out
    }
}

/// The new process's side of moving live pairs: checks each against this configuration,
/// reserves its slots, and hands committed ones to the workers round-robin.
struct Adoption {
    view: Arc<ProxyView>,
    links: Arc<WorkerLinks>,
    buffer_size: usize,
    enabled: bool,
    next: usize,
}

impl upgrade::Adopter for Adoption {
    fn prepare(
        &mut self,
        record: crate::migrate::PairRecord,
        client: std::net::TcpStream,
        upstream: std::net::TcpStream,
    ) -> Result<crate::worker::migrate::Import, String> {
        if !self.enabled {
            return Err("upgrade_migrate = false in this configuration".into());
        }
        let apps = self.view.apps();
        let app = apps
            .iter()
            .find(|a| a.cfg.name == record.app)
            .ok_or_else(|| format!("app '{}' is not in the new configuration", record.app))?;
        let target = app
            .targets
            .iter()
            .position(|t| t.cfg.name == record.target)
            .ok_or_else(|| format!("target '{}' is not in app '{}'", record.target, record.app))?;
        let held = record
            .to_upstream
            .data
            .len()
            .max(record.to_client.data.len());
        if held > self.buffer_size.max(crate::worker::migrate::MAX_PIPED) {
            return Err(format!(
                "{held} buffered bytes do not fit buffer_size {}",
                self.buffer_size
            ));
        }
        for s in [&client, &upstream] {
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
        }
        if !self.view.global.try_take(Some(self.view.max_conns)) {
            return Err("max_conns reached".into());
        }
        if !app.counters.live.try_take(app.cfg.max_conns) {
            self.view.global.give();
            return Err(format!("app '{}' max_conns reached", record.app));
        }
        Ok(crate::worker::migrate::Import {
            record,
            app: app.clone(),
            target,
            client,
            upstream,
        })
    }

    fn adopt(&mut self, imports: Vec<crate::worker::migrate::Import>) {
        let n = self.links.0.len().max(1);
        let mut per: Vec<Vec<_>> = (0..n).map(|_| Vec::new()).collect();
        for imp in imports {
            per[self.next % n].push(imp);
            self.next += 1;
        }
        for (link, batch) in self.links.0.iter().zip(per) {
            if !batch.is_empty() && !link.send(Command::Adopt(batch)) {
                log::error!("upgrade: a worker is gone; its moved connections are lost");
            }
        }
    }

    fn release(&mut self, imports: Vec<crate::worker::migrate::Import>) {
        for imp in imports {
            imp.app.counters.live.give();
            self.view.global.give();
        }
    }
}

/// A running health checker: its stop flag and thread.
struct HealthThread(Arc<AtomicBool>, JoinHandle<()>);

impl HealthThread {
    /// Probe every target of `apps` that has active checks (`None`: no such target).
    fn start(apps: &[Arc<AppRuntime>]) -> Result<Option<HealthThread>, Error> {
        let targets = health_targets(apps);
        if targets.is_empty() {
            return Ok(None);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let t = health::spawn_checker(targets, stop.clone())
            .map_err(|e| Error::io("spawn health checker", e))?;
        Ok(Some(HealthThread(stop, t)))
    }

    fn stop(self) {
        self.0.store(true, Ordering::Release);
        let _ = self.1.join();
    }
}

/// One listener as bound: its identity in the config and its actual address.
#[derive(Debug, Clone, Copy)]
struct Bound {
    key: ListenKey,
    actual: SocketAddr,
}

/// A running proxy. Dropping it stops it immediately.
pub struct Proxy {
    workers: Vec<Option<JoinHandle<io::Result<()>>>>,
    links: Arc<WorkerLinks>,
    view: Arc<ProxyView>,
    /// Listeners in config order.
    bound: Vec<Bound>,
    config: Config,
    nworkers: usize,
    health: Option<HealthThread>,
    access_thread: Option<JoinHandle<()>>,
    admin: Option<AdminServer>,
    failed: Vec<String>,
    /// Started but not accepting yet (a new process before the hand-over): the listeners
    /// of each worker and the admin socket, given out by `activate`.
    held: Option<(PerWorker, Option<std::net::TcpListener>)>,
    /// A SIGUSR2 upgrade waiting for the new process to be ready.
    upgrading: Option<Upgrader>,
    /// After a hand-over: the new process, and the totals already sent to it.
    successor: Option<(Successor, Totals)>,
}

/// How a served proxy ended: the final totals and the workers that failed (empty = clean).
#[derive(Debug)]
pub struct Finished {
    pub summary: Summary,
    pub failures: Vec<String>,
}

/// The effective global limit and why: the configured one (or the default), lowered to what
/// the fd limit allows (2 fds per pair, plus a quarter pipe per pair with splice) and, inside
/// a cgroup with a memory limit, to what keeps worst-case buffer memory under half of it.
/// `reserved_fds`: fds held apart from pairs (listeners, the admin endpoint's budget).
pub fn effective_max_conns(
    cfg: &Config,
    nofile: u64,
    reserved_fds: usize,
    mem_limit: Option<u64>,
) -> (usize, Vec<String>) {
    let want = cfg.max_conns.unwrap_or(DEFAULT_MAX_CONNS);
    let splice = cfg.apps.iter().any(|a| a.splice);
    let reserve = FD_RESERVE + reserved_fds as u64;
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

/// Pipes per worker that `splice = "auto"` may hold (0 without it, or when some app has
/// `splice = true`, whose per-pair share in `effective_max_conns` covers them). Their fds are
/// set apart when `max_conns` is sized, like the admin's.
pub fn auto_pipes_per_worker(cfg: &Config) -> usize {
    if !cfg.apps.iter().any(|a| a.splice) && cfg.apps.iter().any(|a| a.splice_auto) {
        AUTO_PIPES_PER_WORKER
    } else {
        0
    }
}

/// Pipes per worker that may be enlarged to `relay::PIPE_SIZE`. Linux caps a user's pipe
/// capacity (`pipe-user-pages-soft`, 16384 pages by default, shared by every process of the
/// user); past it, new pipes get 2 pages and enlarging fails. This process keeps to half of
/// it, so an old and a new process during an upgrade fit together, split over the workers.
/// `None` (unreadable) allows none; 0 (no cap) allows a default pool's worth.
pub fn big_pipes_per_worker(soft_pages: Option<u64>, workers: usize) -> usize {
    let page = 4096u64;
    let per_pipe = (crate::worker::relay::PIPE_SIZE as u64 / page).max(1);
    match soft_pages {
        None => 0,
        Some(0) => AUTO_PIPES_PER_WORKER,
        Some(soft) => (soft / 2 / per_pipe / workers.max(1) as u64) as usize,
    }
}

/// The worker threads `w` means here (`auto`: usable CPUs and the cgroup CPU quota).
pub fn worker_count(w: Workers) -> usize {
    match w {
        Workers::Count(n) => n.max(1),
        Workers::Auto => {
            let cpus = sys::allowed_cpus().map(|c| c.len()).unwrap_or(1);
            auto_workers(cpus, sys::cgroup_cpu_quota())
        }
    }
}

/// `workers auto` for `cpus` usable CPUs and a CPU quota (in CPUs, rounded up), at least 1.
pub fn auto_workers(cpus: usize, quota: Option<f64>) -> usize {
    let cpus = cpus.max(1);
    match quota {
        Some(q) => cpus.min(q.ceil().max(1.0) as usize),
        None => cpus,
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

/// Every listen entry of `cfg` with its identity: the address as configured and how many
/// equal addresses came before it (two `127.0.0.1:0` entries are two listeners).
fn listen_keys(cfg: &Config) -> Vec<(ListenKey, usize)> {
    let mut out: Vec<(ListenKey, usize)> = Vec::new();
    for (app, a) in cfg.apps.iter().enumerate() {
        for &addr in &a.listen {
            let nth = out.iter().filter(|(k, _)| k.addr == addr).count();
            out.push((ListenKey { addr, nth }, app));
        }
    }
    out
}

/// Listeners to bind, one `Vec` per worker.
type PerWorker = Vec<Vec<NewListener>>;

/// Bind every key of `keys` not in `keep_from` (whose bound address is reused) and not in
/// `inherited` (sockets handed over by an old process or systemd, never rebound).
fn bind_new(
    keys: &[(ListenKey, usize)],
    keep_from: &[Bound],
    backlog: i32,
    nworkers: usize,
    inherited: &mut Inherited,
) -> Result<(Vec<Bound>, PerWorker), Error> {
    let mut per_worker: PerWorker = (0..nworkers).map(|_| Vec::new()).collect();
    let mut bound = Vec::with_capacity(keys.len());
    for &(key, app) in keys {
        if let Some(b) = keep_from.iter().find(|b| b.key == key) {
            bound.push(*b);
            continue;
        }
        let given = inherited.take_listen(key);
        let (actual, socks) = if given.is_empty() {
            bind_all(key.addr, backlog, nworkers)?
        } else {
            spread(key, given, nworkers)?
        };
        bound.push(Bound { key, actual });
        for (i, sock) in socks.into_iter().enumerate() {
            per_worker[i % nworkers].push(NewListener { sock, key, app });
        }
    }
    Ok((bound, per_worker))
}

/// Inherited sockets of one listener over `nworkers` workers: one each (a worker without
/// one shares a duplicate, which shares the accept queue); any extra go round-robin. Never
/// binds, so the accept queues of the old process carry over intact.
fn spread(
    key: ListenKey,
    mut given: Vec<std::net::TcpListener>,
    nworkers: usize,
) -> Result<(SocketAddr, Vec<std::net::TcpListener>), Error> {
    let err = |e| Error::io(format!("inherited listener {}", key.addr), e);
    let actual = given[0].local_addr().map_err(err)?;
    let m = given.len();
    for w in m..nworkers {
        let dup = given[w % m].try_clone().map_err(err)?;
        given.push(dup);
    }
    Ok((actual, given))
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

/// One "listening on" line per listener of `cfg` (only those in `only`, when given).
fn log_listeners(cfg: &Config, bound: &[Bound], only: Option<&[ListenKey]>) {
    for ((key, app), b) in listen_keys(cfg).into_iter().zip(bound) {
        if only.is_some_and(|o| !o.contains(&key)) {
            continue;
        }
        let a = &cfg.apps[app];
        let targets: Vec<&str> = a.targets.iter().map(|t| t.name.as_str()).collect();
        log::info!(
            "app '{}' listening on {} -> {} ({})",
            a.name,
            b.actual,
            targets.join(", "),
            a.balance.as_str()
        );
    }
}

fn build_apps(
    cfg: &Config,
    nworkers: usize,
    max_conns: usize,
    retained: &Retained,
) -> Vec<Arc<AppRuntime>> {
    cfg.apps
        .iter()
        .map(|a| Arc::new(AppRuntime::new(a.clone(), nworkers, max_conns, retained)))
        .collect()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Proxy {
    /// Bind, spawn and start serving `config`.
    pub fn start(config: Config) -> Result<Proxy, Error> {
        Proxy::start_with(config, Inherited::default(), false)
    }

    /// Like [`Proxy::start`], taking listening sockets from `inherited` (an upgrade's old
    /// process, or systemd socket activation) instead of binding them. With `hold`, nothing
    /// accepts (workers, admin) until [`Proxy::activate`].
    pub fn start_with(
        config: Config,
        mut inherited: Inherited,
        hold: bool,
    ) -> Result<Proxy, Error> {
        if config.apps.is_empty() {
            return Err(Error::config("no apps configured"));
        }
        let nofile = sys::raise_nofile_limit().unwrap_or(1024);
        let nworkers = worker_count(config.workers);
        let keys = listen_keys(&config);
        let mem_limit = sys::cgroup_memory_limit();
        // The admin's sockets come out of the reserve too, so it never eats into max_conns.
        let admin_fds = if config.admin.is_some() {
            crate::admin::FD_BUDGET as usize
        } else {
            0
        };
        let auto_pipes = auto_pipes_per_worker(&config);
        let (max_conns, notes) = effective_max_conns(
            &config,
            nofile,
            keys.len() * nworkers + admin_fds + 2 * auto_pipes * nworkers,
            mem_limit,
        );
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
            auto_pipes
        };
        let big_pipes = big_pipes_per_worker(sys::pipe_user_pages_soft(), nworkers);
        if !config.cpu_pin.is_empty() {
            let allowed = sys::allowed_cpus().unwrap_or_default();
            if let Some(cpu) = config.cpu_pin.iter().find(|c| !allowed.contains(c)) {
                return Err(Error::config(format!(
                    "cpu_pin: CPU {cpu} is not available to this process (allowed: {allowed:?})"
                )));
            }
        }

        let apps = build_apps(&config, nworkers, max_conns, &Retained::default());
        // Bind everything first: one socket per listen address per worker.
        let (bound, per_worker) = bind_new(&keys, &[], config.backlog, nworkers, &mut inherited)?;
        let admin_sock = match config.admin {
            Some(addr) => Some(match inherited.take_admin(addr) {
                Some(s) => s,
                None => crate::admin::server::bind(addr)?,
            }),
            None => None,
        };
        inherited.close_rest();
        let (per_worker, held) = if hold {
            let empty: PerWorker = (0..nworkers).map(|_| Vec::new()).collect();
            (empty, Some(per_worker))
        } else {
            (per_worker, None)
        };

        let any_access_log = config.apps.iter().any(|a| a.access_log);
        // With a config file the log thread runs always, so a reload can turn the log on.
        let (access_tx, access_thread) = if any_access_log || config.source.is_some() {
            let (tx, t) = access_log::spawn()?;
            (Some(tx), Some(t))
        } else {
            (None, None)
        };

        let global = Arc::new(Slots::default());
        let mut workers = Vec::with_capacity(nworkers);
        let mut stats = Vec::with_capacity(nworkers);
        let mut links = Vec::with_capacity(nworkers);
        for (id, listeners) in per_worker.into_iter().enumerate() {
            let wstats = Arc::new(WorkerStats::default());
            let (tx, rx) = mpsc::channel();
            let setup = WorkerSetup {
                id,
                listeners,
                apps: apps.clone(),
                max_conns,
                buffer_size: config.buffer_size,
                max_events: config.max_events,
                stats: wstats.clone(),
                global: global.clone(),
                commands: rx,
                access_log: access_tx.clone(),
                pipe_budget,
                big_pipes,
            };
            let (thread, waker) = spawn_worker(setup, config.cpu_pin.get(id).copied())?;
            workers.push(Some(thread));
            links.push(WorkerLink {
                tx: Mutex::new(tx),
                waker,
            });
            stats.push(wstats);
        }
        drop(access_tx);

        let health = HealthThread::start(&apps)?;
        let links = Arc::new(WorkerLinks(links));
        let view = Arc::new(ProxyView {
            apps: Mutex::new(apps),
            workers: stats,
            global,
            ready: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            reloads: Default::default(),
            upgrades: Default::default(),
            carried: Carried::new(nworkers),
            migration: Default::default(),
            started: Instant::now(),
            start_time: unix_now(),
            max_conns,
            live: links.clone(),
        });
        let (admin, held) = match held {
            Some(per_worker) => (None, Some((per_worker, admin_sock))),
            None => match admin_sock {
                Some(sock) => (Some(AdminServer::start_on(sock, view.clone())?), None),
                None => (None, None),
            },
        };

        log_listeners(&config, &bound, None);
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
            links,
            view,
            bound,
            config,
            nworkers,
            health,
            access_thread,
            admin,
            failed: Vec::new(),
            held,
            upgrading: None,
            successor: None,
        })
    }

    /// Start accepting what `start_with(.., hold = true)` held back: the listeners, then the
    /// admin endpoint. Nothing to do otherwise.
    pub fn activate(&mut self) -> Result<(), Error> {
        let Some((per_worker, admin_sock)) = self.held.take() else {
            return Ok(());
        };
        for (link, add) in self.links.0.iter().zip(per_worker) {
            link.send(Command::Listen(add));
        }
        if let Some(sock) = admin_sock {
            let a = AdminServer::start_on(sock, self.view.clone())?;
            log::info!("admin endpoint on http://{}/metrics", a.addr());
            self.admin = Some(a);
        }
        Ok(())
    }

    /// A new process started by an upgrade: say ready, wait for the old process to hand
    /// over, then accept and follow the old process's counter totals.
    pub fn take_over(&mut self, old: Predecessor) -> Result<(), Error> {
        old.handshake()?;
        self.activate()?;
        let pid = std::process::id();
        upgrade::notify(&[
            sd_notify::NotifyState::MainPid(pid),
            sd_notify::NotifyState::Ready,
        ]);
        log::info!("upgrade: PID {pid} now owns the listeners");
        let adopter = Box::new(Adoption {
            view: self.view.clone(),
            links: self.links.clone(),
            buffer_size: self.config.buffer_size,
            enabled: self.config.upgrade_migrate,
            next: 0,
        });
        if let Err(e) = old.follow(self.view.clone(), adopter) {
            log::warn!("upgrade: cannot follow the old process's counters: {e}");
        }
        Ok(())
    }

    /// The bound listener addresses (port 0 resolved), in config order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.bound.iter().map(|b| b.actual).collect()
    }

    /// The admin endpoint's address, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.addr())
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The read-only view the admin endpoint serves.
    pub fn view(&self) -> &Arc<ProxyView> {
        &self.view
    }

    /// Apply a new configuration: new listeners are bound and health checks restarted first
    /// (a failure leaves everything as it was), then every worker switches to the new apps;
    /// live pairs are untouched, removed listeners close, unchanged targets keep their health
    /// state and counters. Counted in `epoxy_config_reloads_total` either way.
    pub fn reload(&mut self, new: Config) -> Result<(), Error> {
        let res = self.apply(new);
        self.reload_done(res)
    }

    /// SIGHUP: re-read the file the configuration came from (with `overrides`, the flags it
    /// was started with) and apply it; on any error keep the running configuration.
    pub fn reload_from_source(&mut self, overrides: &Overrides) -> Result<(), Error> {
        let Some(path) = self.config.source.clone() else {
            log::warn!("reload: started without a config file (-c); nothing to reload");
            return Ok(());
        };
        log::info!("reloading {}", path.display());
        let res = config::load_file(&path, overrides)
            .map_err(Error::from)
            .and_then(|new| self.apply(new));
        self.reload_done(res)
    }

    /// The one place a reload's outcome is counted and logged.
    fn reload_done(&self, res: Result<(), Error>) -> Result<(), Error> {
        self.view.reloads.record(res.is_ok());
        if let Err(e) = &res {
            log::error!("reload failed: {e}; keeping the running configuration");
        }
        res
    }

    fn apply(&mut self, new: Config) -> Result<(), Error> {
        if self.view.draining.load(Ordering::Relaxed) {
            return Err(Error::runtime("shutting down; reload ignored"));
        }
        let retained = Retained::from_apps(&self.view.apps());
        let apps = build_apps(&new, self.nworkers, self.view.max_conns, &retained);
        // Listeners: keep those whose configured identity stays; bind the new ones now.
        let keys = listen_keys(&new);
        let (bound, per_worker) = bind_new(
            &keys,
            &self.bound,
            new.backlog,
            self.nworkers,
            &mut Inherited::default(),
        )?;
        // Health checks follow the new target set (states of unchanged targets retained),
        // before any worker balances over it.
        if let Some(h) = self.health.take() {
            h.stop();
        }
        match HealthThread::start(&apps) {
            Ok(h) => self.health = h,
            Err(e) => {
                self.health = HealthThread::start(&self.view.apps()).unwrap_or(None);
                return Err(e);
            }
        }
        // From here on nothing fails: switch the workers, then the view.
        let keep: Vec<(ListenKey, usize)> = keys
            .iter()
            .filter(|(k, _)| self.bound.iter().any(|b| b.key == *k))
            .copied()
            .collect();
        for (link, add) in self.links.0.iter().zip(per_worker) {
            link.send(Command::Reload {
                apps: apps.clone(),
                keep: keep.clone(),
                add,
            });
        }
        if let Ok(mut cur) = self.view.apps.lock() {
            *cur = apps;
        }
        let changed = [
            ("workers", new.workers != self.config.workers),
            ("max_conns", new.max_conns != self.config.max_conns),
            ("buffer_size", new.buffer_size != self.config.buffer_size),
            ("max_events", new.max_events != self.config.max_events),
        ];
        for (key, _) in changed.iter().filter(|(_, c)| *c) {
            log::warn!("reload: '{key}' changed; it takes effect only after a restart");
        }
        let added: Vec<ListenKey> = bound
            .iter()
            .map(|b| b.key)
            .filter(|k| !self.bound.iter().any(|o| o.key == *k))
            .collect();
        log_listeners(&new, &bound, Some(&added));
        for old in self
            .bound
            .iter()
            .filter(|o| !bound.iter().any(|b| b.key == o.key))
        {
            log::info!(
                "listener {} removed; its live connections continue",
                old.actual
            );
        }
        self.bound = bound;
        self.config = Config {
            workers: self.config.workers,
            max_conns: self.config.max_conns,
            buffer_size: self.config.buffer_size,
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

    /// Mark not ready (readyz 503) without closing anything yet: the start of a drain.
    pub fn begin_drain(&self) {
        self.view.draining.store(true, Ordering::Relaxed);
    }

    /// Stop accepting now; live pairs get the configured grace period. Returns once every
    /// worker has closed its listeners (or after one second).
    pub fn shutdown(&self) {
        let grace = self.close_listeners();
        log::info!(
            "shutting down: listeners closed; {} live connection(s) get up to {:?}",
            self.view.active(),
            grace
        );
    }

    /// Mark draining and have every worker close its listeners (their live pairs get
    /// `grace_period`); returns once all acknowledged (or after one second), with the grace.
    fn close_listeners(&self) -> Duration {
        self.begin_drain();
        let grace = self.config.grace;
        let (tx, rx) = mpsc::sync_channel(self.links.0.len());
        let sent = self.links.broadcast(|| Command::Drain {
            grace,
            ack: Some(tx.clone()),
        });
        let deadline = Instant::now() + Duration::from_secs(1);
        for _ in 0..sent {
            let left = deadline.saturating_duration_since(Instant::now());
            if rx.recv_timeout(left).is_err() {
                break;
            }
        }
        grace
    }

    /// Close everything now. Non-blocking.
    pub fn stop_now(&self) {
        self.begin_drain();
        self.links.broadcast(|| Command::Stop);
    }

    /// All workers have exited.
    pub fn is_finished(&self) -> bool {
        self.workers
            .iter()
            .all(|w| w.as_ref().is_none_or(|t| t.is_finished()))
    }

    /// Current totals.
    pub fn summary(&self) -> Summary {
        self.view.summary()
    }

    /// Drive the lifecycle until every worker has exited, then join everything. Requests come
    /// from `life` (signals and/or `ShutdownHandle`s): the first shutdown request turns
    /// readiness off, closes the listeners after `drain_delay` and gives live pairs
    /// `grace_period`; a second one closes everything at once. A reload request re-reads the
    /// config file with `overrides`. Logs the periodic traffic line every `log_interval`.
    pub fn serve(mut self, mut life: Lifecycle, overrides: &Overrides) -> Result<Finished, Error> {
        let mut draining = false;
        let mut close_listeners_at: Option<Instant> = None;
        let mut periodic = Periodic::new(self.summary());
        while !self.is_finished() {
            for req in life.wait(CONTROL_TICK)? {
                match req {
                    Request::Shutdown if draining => {
                        log::info!("second signal: closing all connections now");
                        self.stop_now();
                    }
                    Request::Shutdown => {
                        draining = true;
                        upgrade::notify(&[sd_notify::NotifyState::Stopping]);
                        self.begin_drain();
                        let delay = self.config.drain_delay;
                        if delay.is_zero() {
                            self.shutdown();
                        } else {
                            log::info!(
                                "shutting down: readyz now 503; listeners close in {delay:?}"
                            );
                            close_listeners_at = Some(Instant::now() + delay);
                        }
                    }
                    Request::Reload => {
                        // Logged and counted inside; the running configuration stays.
                        let _ = self.reload_from_source(overrides);
                    }
                    Request::Upgrade if draining => {
                        log::warn!(
                            "upgrade: shutting down or already handed over; SIGUSR2 ignored"
                        );
                    }
                    Request::Upgrade if self.upgrading.is_some() => {
                        log::warn!("upgrade: one is already in progress; SIGUSR2 ignored");
                    }
                    Request::Upgrade => self.begin_upgrade(&life),
                }
            }
            if let Some(res) = self.upgrading.as_mut().and_then(Upgrader::poll) {
                self.upgrading = None;
                match res {
                    Ok(succ) if draining => {
                        let how = succ.abandon();
                        log::warn!("upgrade: shutting down; the new process is sent away ({how})");
                    }
                    Ok(succ) => {
                        if self.hand_over(succ) {
                            draining = true;
                            close_listeners_at = None;
                        }
                    }
                    Err(why) => self.upgrade_failed(&why),
                }
            }
            if close_listeners_at.is_some_and(|t| Instant::now() >= t) {
                close_listeners_at = None;
                self.shutdown();
            }
            if let Some(every) = self.config.log_interval {
                periodic.maybe_log(&self.view, every);
            }
        }
        let successor = self.successor.take();
        let view = self.view.clone();
        let finished = self.finish();
        if let Some((succ, sent)) = successor {
            // What this process counted while draining, so the new one's totals are final.
            succ.send_counters(Totals::take(&view).minus(&sent));
            log::info!(
                "upgrade: drained; PID {} carries on, this process exits",
                succ.pid
            );
            succ.finish(upgrade::FINISH_PATIENCE);
        }
        Ok(finished)
    }

    /// SIGUSR2: start a new process from this binary and hand it every listening socket.
    fn begin_upgrade(&mut self, life: &Lifecycle) {
        let Some(spec) = life.exec.clone() else {
            log::warn!(
                "upgrade: this process was not started as the proxy binary; SIGUSR2 ignored"
            );
            return;
        };
        match self.handoff_sockets() {
            Ok(sockets) => match Upgrader::start(&spec, sockets, life.waker_fn()) {
                Ok(u) => self.upgrading = Some(u),
                Err(why) => self.upgrade_failed(&why),
            },
            Err(why) => self.upgrade_failed(&why),
        }
    }

    /// Duplicates of every listener of every worker, and of the admin socket.
    fn handoff_sockets(&self) -> Result<Vec<(SocketEntry, std::os::fd::OwnedFd)>, String> {
        let replies: Vec<_> = self
            .links
            .0
            .iter()
            .map(|link| {
                let (tx, rx) = mpsc::sync_channel(1);
                link.send(Command::ListenerFds(tx)).then_some(rx)
            })
            .collect();
        let mut out = Vec::new();
        for (worker, rx) in replies.into_iter().enumerate() {
            let fds = rx
                .ok_or_else(|| format!("worker {worker} is gone"))?
                .recv_timeout(Duration::from_secs(5))
                .map_err(|_| format!("worker {worker} did not answer"))?
                .map_err(|e| format!("duplicate the listeners of worker {worker}: {e}"))?;
            for (key, fd) in fds {
                let entry = SocketEntry {
                    kind: SocketKind::Listen,
                    addr: key.addr,
                    nth: key.nth,
                    worker,
                };
                out.push((entry, fd));
            }
        }
        if let (Some(a), Some(addr)) = (&self.admin, self.config.admin) {
            let fd = a
                .listener_fd()
                .map_err(|e| format!("duplicate the admin listener: {e}"))?;
            let entry = SocketEntry {
                kind: SocketKind::Admin,
                addr,
                nth: 0,
                worker: 0,
            };
            out.push((entry, fd));
        }
        Ok(out)
    }

    /// The new process is ready: let it take over, stop accepting and drain. `false`: it
    /// went away at the last moment; this process keeps serving.
    fn hand_over(&mut self, mut succ: Successor) -> bool {
        if let Err(why) = succ.go() {
            self.upgrade_failed(&why);
            return false;
        }
        self.view.upgrades.record(true);
        if let Some(a) = self.admin.take() {
            a.stop();
        }
        // Stop accepting first, then move what can move.
        let grace = self.close_listeners();
        if self.config.upgrade_migrate {
            self.migrate(&mut succ);
        }
        let sent_totals = Totals::take(&self.view);
        succ.send_counters(sent_totals.clone());
        log::info!(
            "upgrade: PID {} took over the listeners; {} live connection(s) here get up to {:?}",
            succ.pid,
            self.view.active(),
            grace
        );
        self.successor = Some((succ, sent_totals));
        true
    }

    /// Move established pairs to the new process in batches, within `MIGRATE_BUDGET`; pairs
    /// not movable in time (connecting, bytes in a pipe) or refused stay here and drain. Any
    /// failure of the channel aborts the batch in flight (its pairs resume here) and ends the
    /// move.
    fn migrate(&self, succ: &mut Successor) {
        let started = Instant::now();
        let deadline = started + MIGRATE_BUDGET;
        let mut batch = 0u64;
        let mut moved = 0usize;
        let mut kept = 0usize;
        let mut stalls: Vec<u64> = Vec::new();
        let mut failed: Option<String> = None;
        'rounds: loop {
            let mut found = false;
            let mut waiting = 0;
            for link in &self.links.0 {
                if Instant::now() >= deadline {
                    break 'rounds;
                }
                let (tx, rx) = mpsc::sync_channel(1);
                if !link.send(Command::Export {
                    max: MIGRATE_BATCH,
                    reply: tx,
                }) {
                    continue;
                }
                // A worker answers within one batch of its loop; the bound is generous
                // because an unanswered export would leave pairs parked.
                let Ok(ex) = rx.recv_timeout(Duration::from_secs(10)) else {
                    log::error!("upgrade: a worker did not answer the export");
                    continue;
                };
                waiting += ex.waiting;
                if ex.pairs.is_empty() {
                    continue;
                }
                found = true;
                batch += 1;
                let parked = Instant::now();
                let idxs: Vec<usize> = ex.pairs.iter().map(|p| p.idx).collect();
                let res = succ.offer(batch, &ex.pairs, MIGRATE_ANSWER_TIMEOUT);
                let (commit, abort): (Vec<usize>, Vec<usize>) = match res {
                    Ok(taken) => {
                        let stall = crate::worker::migrate::micros(parked.elapsed());
                        match succ.commit(batch, stall) {
                            Ok(()) => {
                                let (c, a): (Vec<_>, Vec<_>) =
                                    idxs.iter().zip(&taken).partition(|(_, t)| **t);
                                stalls.extend(std::iter::repeat_n(stall, c.len()));
                                (
                                    c.into_iter().map(|(i, _)| *i).collect(),
                                    a.into_iter().map(|(i, _)| *i).collect(),
                                )
                            }
                            Err(e) => {
                                failed = Some(e);
                                (Vec::new(), idxs)
                            }
                        }
                    }
                    Err(e) => {
                        succ.abort(batch);
                        failed = Some(e);
                        (Vec::new(), idxs)
                    }
                };
                drop(ex);
                moved += commit.len();
                kept += abort.len();
                let (dtx, drx) = mpsc::sync_channel(1);
                if link.send(Command::Settle {
                    commit,
                    abort,
                    done: dtx,
                }) {
                    let _ = drx.recv_timeout(Duration::from_secs(10));
                }
                if failed.is_some() {
                    break 'rounds;
                }
            }
            if !found && waiting == 0 {
                break;
            }
            if !found {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        stalls.sort_unstable();
        let pct = |p: usize| {
            stalls
                .get((stalls.len() * p / 100).min(stalls.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        log::info!(
            "upgrade: moved {moved} live connection(s) to PID {} in {batch} batch(es) in {:?} (parked p50 {} us, p99 {} us, max {} us); {kept} refused, {} stay here",
            succ.pid,
            started.elapsed(),
            pct(50),
            pct(99),
            stalls.last().copied().unwrap_or(0),
            self.view.active()
        );
        if let Some(why) = failed {
            log::warn!("upgrade: moving connections stopped: {why}; the rest drain here");
        }
    }

    /// The one place a failed upgrade is logged and counted; this process keeps serving.
    fn upgrade_failed(&self, why: &str) {
        self.view.upgrades.record(false);
        log::error!("upgrade failed: {why}; still serving");
        // With systemd, a new process may have claimed MAINPID before failing.
        upgrade::notify(&[sd_notify::NotifyState::MainPid(std::process::id())]);
    }

    /// Wait for every worker to exit, stop the helpers, and return the final totals.
    pub fn join(mut self) -> Summary {
        self.join_threads();
        self.summary()
    }

    /// Like `join`, also returning the workers' failures (empty = clean).
    pub fn finish(mut self) -> Finished {
        self.join_threads();
        Finished {
            summary: self.summary(),
            failures: std::mem::take(&mut self.failed),
        }
    }

    fn join_threads(&mut self) {
        for (i, w) in self.workers.iter_mut().enumerate() {
            if let Some(t) = w.take() {
                match t.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => self.failed.push(format!("worker {i}: {e}")),
                    Err(_) => self.failed.push(format!("worker {i}: panicked")),
                }
            }
        }
        self.view.ready.store(false, Ordering::Relaxed);
        if let Some(h) = self.health.take() {
            h.stop();
        }
        if let Some(a) = self.admin.take() {
            a.stop();
        }
        // Workers hold the only senders; with them gone the access-log thread drains and ends.
        if let Some(t) = self.access_thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.workers.iter().any(Option::is_some) {
            self.stop_now();
        }
        self.join_threads();
    }
}

/// Create a worker's poll and waker, build it, and start its thread (pinned to `cpu`).
fn spawn_worker(
    setup: WorkerSetup,
    cpu: Option<usize>,
) -> Result<(JoinHandle<io::Result<()>>, Arc<Waker>), Error> {
    let id = setup.id;
    let reserve_mib = (setup.max_conns * 2 * setup.buffer_size) >> 20;
    let poll = Poll::new().map_err(|e| Error::io("create poll", e))?;
    let waker = Arc::new(
        Waker::new(poll.registry(), token::WAKER).map_err(|e| Error::io("create waker", e))?,
    );
    let mut worker = Worker::new(setup, poll).map_err(|e| {
        Error::io(
            format!(
                "start worker {id} (register listeners, reserve {reserve_mib} MiB of buffer space)"
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
    Ok((thread, waker))
}

/// The periodic traffic line: rates since the last line; nothing while idle.
struct Periodic {
    at: Instant,
    last: Summary,
}

impl Periodic {
    fn new(now: Summary) -> Periodic {
        Periodic {
            at: Instant::now(),
            last: now,
        }
    }

    fn maybe_log(&mut self, view: &ProxyView, every: Duration) {
        if self.at.elapsed() < every {
            return;
        }
        let now = Instant::now();
        let s = view.summary();
        let secs = now.duration_since(self.at).as_secs_f64().max(1e-3);
        let last = &self.last;
        let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        let active = view.active();
        let idle = active == 0
            && s.accepted == last.accepted
            && s.bytes_client_to_upstream == last.bytes_client_to_upstream
            && s.bytes_upstream_to_client == last.bytes_upstream_to_client;
        if !idle {
            log::info!(
                "stats: active {} total {} ({:.1}/s), bytes client->upstream {} ({:.0} B/s), upstream->client {} ({:.0} B/s)",
                active,
                s.accepted,
                rate(s.accepted, last.accepted),
                s.bytes_client_to_upstream,
                rate(s.bytes_client_to_upstream, last.bytes_client_to_upstream),
                s.bytes_upstream_to_client,
                rate(s.bytes_upstream_to_client, last.bytes_upstream_to_client),
            );
        }
        self.at = now;
        self.last = s;
    }
}

/// What a lifecycle request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// SIGTERM/SIGINT: drain; a second one stops at once.
    Shutdown,
    /// SIGHUP: re-read the config file.
    Reload,
    /// SIGUSR2: start a new process from this binary and hand over the listeners.
    Upgrade,
}

const SIGNALS: Token = Token(0);
const HANDLES: Token = Token(1);

/// Where lifecycle requests come from: the process's signals (when installed) and any
/// number of [`ShutdownHandle`]s. Create it before [`Proxy::start`] so that a signal during
/// start-up is not lost to the default handler.
pub struct Lifecycle {
    poll: Poll,
    events: Events,
    signals: Option<Signals>,
    rx: Receiver<Request>,
    handle: ShutdownHandle,
    /// How to start a new process on SIGUSR2 (the binary, captured at start).
    exec: Option<ExecSpec>,
    /// Requests read early (see `forget_upgrades`), returned by the next `wait`.
    queued: Vec<Request>,
}

impl Lifecycle {
    /// Requests from SIGTERM, SIGINT, SIGHUP and SIGUSR2, and from handles. Remembers this
    /// process's binary path and arguments now, for SIGUSR2 (the file may be replaced later).
    pub fn with_signals() -> Result<Lifecycle, Error> {
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGUSR2])
            .map_err(|e| Error::io("install signal handlers", e))?;
        let life = Lifecycle::new()?;
        life.poll
            .registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(|e| Error::io("register signals", e))?;
        Ok(Lifecycle {
            signals: Some(signals),
            exec: ExecSpec::current(),
            ..life
        })
    }

    /// Requests from handles only (for programs that embed the proxy).
    pub fn new() -> Result<Lifecycle, Error> {
        let poll = Poll::new().map_err(|e| Error::io("create control poll", e))?;
        let waker = Arc::new(
            Waker::new(poll.registry(), HANDLES).map_err(|e| Error::io("create waker", e))?,
        );
        let (tx, rx) = mpsc::channel();
        Ok(Lifecycle {
            poll,
            events: Events::with_capacity(8),
            signals: None,
            rx,
            handle: ShutdownHandle { tx, waker },
            exec: None,
            queued: Vec::new(),
        })
    }

    /// A callback that wakes `wait` from another thread.
    fn waker_fn(&self) -> Box<dyn Fn() + Send> {
        let waker = self.handle.waker.clone();
        Box::new(move || {
            let _ = waker.wake();
        })
    }

    /// A handle that sends requests to this lifecycle from any thread.
    pub fn handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// A process started by an upgrade, once it owns the listeners: SIGUSR2 that arrived
    /// while it was starting belongs to the upgrade that started it (`systemctl kill`
    /// signals every process of the unit), so it is logged and dropped; other requests wait
    /// for `serve`.
    pub fn forget_upgrades(&mut self) -> Result<(), Error> {
        let early = self.wait(Duration::ZERO)?;
        for r in early {
            if r == Request::Upgrade {
                log::warn!(
                    "upgrade: SIGUSR2 during the upgrade that started this process; ignored"
                );
            } else {
                self.queued.push(r);
            }
        }
        Ok(())
    }

    /// The requests that arrived within `timeout`, in order.
    fn wait(&mut self, timeout: Duration) -> Result<Vec<Request>, Error> {
        let timeout = if self.queued.is_empty() {
            timeout
        } else {
            Duration::ZERO
        };
        if let Err(e) = self.poll.poll(&mut self.events, Some(timeout))
            && e.kind() != io::ErrorKind::Interrupted
        {
            return Err(Error::io("poll signals", e));
        }
        let mut out = std::mem::take(&mut self.queued);
        if let Some(signals) = self.signals.as_mut() {
            for sig in signals.pending() {
                match sig {
                    SIGINT | SIGTERM => out.push(Request::Shutdown),
                    SIGHUP => out.push(Request::Reload),
                    SIGUSR2 => out.push(Request::Upgrade),
                    _ => {}
                }
            }
        }
        out.extend(self.rx.try_iter());
        Ok(out)
    }
}

/// Sends lifecycle requests to a serving proxy, like the signals do. Cheap to clone.
#[derive(Clone)]
pub struct ShutdownHandle {
    tx: Sender<Request>,
    waker: Arc<Waker>,
}

impl ShutdownHandle {
    fn send(&self, r: Request) {
        if self.tx.send(r).is_ok() {
            let _ = self.waker.wake();
        }
    }

    /// As SIGTERM: drain (a second call closes everything at once).
    pub fn shutdown(&self) {
        self.send(Request::Shutdown);
    }

    /// As SIGHUP: re-read the config file.
    pub fn reload(&self) {
        self.send(Request::Reload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AppConfig, TargetConfig};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn big_pipes_keep_to_half_the_users_pipe_pages() {
        // 16384 pages (the Linux default): half is 8192 = 128 pipes of 256 KiB.
        assert_eq!(big_pipes_per_worker(Some(16384), 1), 128);
        assert_eq!(big_pipes_per_worker(Some(16384), 16), 8);
        assert_eq!(big_pipes_per_worker(Some(16384), 200), 0);
        assert_eq!(big_pipes_per_worker(Some(0), 4), AUTO_PIPES_PER_WORKER);
        assert_eq!(big_pipes_per_worker(None, 1), 0);
    }

    #[test]
    fn cpu_quota_sets_auto_workers() {
        assert_eq!(auto_workers(4, Some(1.5)), 2);
        assert_eq!(auto_workers(4, Some(0.2)), 1);
        assert_eq!(auto_workers(2, Some(8.0)), 2);
        assert_eq!(auto_workers(3, None), 3);
        assert_eq!(auto_workers(0, None), 1);
    }

    #[test]
    fn memory_limit_and_admin_budget_lower_max_conns() {
        let cfg = Config::default();
        // Unlimited: the default.
        assert_eq!(
            effective_max_conns(&cfg, 1 << 20, 1, None).0,
            DEFAULT_MAX_CONNS
        );
        // 64 MiB: 32 MiB for buffers of 2 x 8 KiB per pair.
        let (n, notes) = effective_max_conns(&cfg, 1 << 20, 1, Some(64 << 20));
        assert_eq!(n, 2048);
        assert!(notes[0].contains("cgroup memory limit 64 MiB"), "{notes:?}");
        // The fd limit, with the admin's budget held apart.
        let fds = 1000;
        let admin = crate::admin::FD_BUDGET as usize;
        let (n, _) = effective_max_conns(&cfg, fds, 1 + admin, None);
        assert_eq!(n as u64, (fds - FD_RESERVE - 1 - admin as u64) / 2);
    }

    fn wait_for(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The embedding API gets the binary's lifecycle: a first request turns readiness off but
    /// keeps listening through `drain_delay`; a second one closes everything at once.
    #[test]
    fn handle_drains_with_delay_and_second_request_stops() {
        // The upstream: a listener whose backlog completes handshakes (never accepted).
        let backend = TcpListener::bind("127.0.0.1:0").expect("bind backend");
        let target = TargetConfig::new(backend.local_addr().expect("addr"));
        let listen = "127.0.0.1:0".parse().expect("addr");
        let config = Config {
            apps: vec![AppConfig::new("t", vec![listen], vec![target])],
            drain_delay: Duration::from_secs(60),
            log_interval: None,
            ..Config::default()
        };
        let life = Lifecycle::new().expect("lifecycle");
        let handle = life.handle();
        let proxy = Proxy::start(config).expect("start");
        let addr = proxy.local_addrs()[0];
        let view = proxy.view().clone();
        let served = std::thread::spawn(move || proxy.serve(life, &Overrides::default()));

        let _c1 = TcpStream::connect(addr).expect("connect before drain");
        wait_for("the first pair", Duration::from_secs(10), || {
            view.active() == 1
        });
        handle.shutdown();
        wait_for("readiness off", Duration::from_secs(10), || !view.serving());
        // Still listening during the drain delay.
        let _c2 = TcpStream::connect(addr).expect("connect during drain delay");
        wait_for("the second pair", Duration::from_secs(10), || {
            view.active() == 2
        });

        let asked = Instant::now();
        handle.shutdown();
        wait_for("serve to return", Duration::from_secs(10), || {
            served.is_finished()
        });
        assert!(asked.elapsed() < Duration::from_secs(10));
        let finished = served.join().expect("serve thread").expect("serve");
        assert!(finished.failures.is_empty(), "{:?}", finished.failures);
        assert_eq!(finished.summary.accepted, 2);
        let shutdown = crate::outcome::CloseReason::Shutdown as usize;
        assert_eq!(finished.summary.closed[shutdown], 2);
    }
}
