//! The runtime: turns a `Config` into running threads. Binds every listener on the calling
//! thread first (so a bind error fails fast with one message), sizes limits from the fd limit,
//! spawns one worker per configured worker (each with its own poll, listeners and channel +
//! waker for commands) and the health checker, and collects the summary at the end. Never
//! touches a worker's loop directly: it only sends commands.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Poll, Waker};

use crate::backend::AppRuntime;
use crate::config::{Config, DEFAULT_MAX_CONNS, Workers};
use crate::error::Error;
use crate::health::{self, HealthTarget, TargetHealth};
use crate::stats::{Shared, Summary, WorkerStats};
use crate::worker::{Command, Worker, WorkerSetup, token};
use crate::{net, sys};

/// File descriptors kept free for listeners, the poll, logging and the like.
const FD_RESERVE: u64 = 32;

struct WorkerHandle {
    tx: Sender<Command>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

/// A running proxy. Dropping it stops it immediately.
pub struct Proxy {
    workers: Vec<WorkerHandle>,
    stats: Vec<Arc<WorkerStats>>,
    shared: Arc<Shared>,
    local_addrs: Vec<SocketAddr>,
    started: Instant,
    config: Config,
    health_stop: Arc<AtomicBool>,
    health_thread: Option<JoinHandle<()>>,
    failed: Mutex<Vec<String>>,
}

/// The effective global limit: the configured one (or the default), lowered to what the fd
/// limit allows. Returns (limit, note) where note explains a lowering.
fn effective_max_conns(cfg: &Config, nofile: u64, listeners: usize) -> (usize, Option<String>) {
    let want = cfg.max_conns.unwrap_or(DEFAULT_MAX_CONNS);
    let reserve = FD_RESERVE + listeners as u64;
    let fit = (nofile.saturating_sub(reserve) / 2).max(1) as usize;
    if want > fit {
        let note = format!(
            "max_conns {want} needs {} file descriptors but the limit is {nofile}; using max_conns {fit}",
            want as u64 * 2 + reserve
        );
        (fit, Some(note))
    } else {
        (want, None)
    }
}

fn worker_count(w: Workers) -> usize {
    match w {
        Workers::Count(n) => n.max(1),
        Workers::Auto => sys::allowed_cpus().map(|c| c.len()).unwrap_or(1).max(1),
    }
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
        let (max_conns, note) = effective_max_conns(&config, nofile, nlisten * nworkers);
        if let Some(note) = note {
            if config.max_conns.is_some() {
                log::warn!("{note}");
            } else {
                log::info!("{note}");
            }
        }
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

        // Shared per-app state and health.
        let mut health_targets = Vec::new();
        let apps: Vec<Arc<AppRuntime>> = config
            .apps
            .iter()
            .map(|a| {
                let mut mk = |t: &crate::config::TargetConfig| {
                    let st = Arc::new(TargetHealth::new());
                    if let Some(check) = a.health.active {
                        health_targets.push(HealthTarget {
                            app: a.name.clone(),
                            target: t.name.clone(),
                            addr: t.addr,
                            state: st.clone(),
                            check,
                        });
                    }
                    st
                };
                Arc::new(AppRuntime::new(a.clone(), &mut mk))
            })
            .collect();

        // Bind everything first: one socket per listen address per worker.
        let reuse_port = nworkers > 1;
        let mut per_worker: Vec<Vec<(std::net::TcpListener, usize)>> =
            (0..nworkers).map(|_| Vec::new()).collect();
        let mut local_addrs = Vec::new();
        for (app_idx, app) in config.apps.iter().enumerate() {
            for &addr in &app.listen {
                let mut actual = addr;
                for (w, list) in per_worker.iter_mut().enumerate() {
                    let l = net::bind_listener(actual, config.backlog, reuse_port)
                        .map_err(|e| Error::io(format!("bind {addr}"), e))?;
                    if w == 0 {
                        actual = l
                            .local_addr()
                            .map_err(|e| Error::io(format!("bind {addr}"), e))?;
                        local_addrs.push(actual);
                    }
                    list.push((l, app_idx));
                }
            }
        }

        let shared = Arc::new(Shared::default());
        let mut workers = Vec::with_capacity(nworkers);
        let mut stats = Vec::with_capacity(nworkers);
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
                cpu,
            };
            let max_events = config.max_events;
            let mut worker =
                Worker::new(setup, poll).map_err(|e| Error::io("register listeners", e))?;
            let thread = std::thread::Builder::new()
                .name(format!("epoxy-worker-{id}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        if let Err(e) = sys::pin_current_thread(cpu) {
                            log::warn!("worker {id}: pin to CPU {cpu}: {e}");
                        }
                    }
                    worker.run(max_events)
                })
                .map_err(|e| Error::io("spawn worker thread", e))?;
            workers.push(WorkerHandle {
                tx,
                waker,
                thread: Some(thread),
            });
            stats.push(wstats);
        }

        let health_stop = Arc::new(AtomicBool::new(false));
        let health_thread = if health_targets.is_empty() {
            None
        } else {
            Some(
                health::spawn_checker(health_targets, health_stop.clone())
                    .map_err(|e| Error::io("spawn health checker", e))?,
            )
        };

        let mut i = 0;
        for app in &config.apps {
            let targets: Vec<&str> = app.targets.iter().map(|t| t.name.as_str()).collect();
            for _ in &app.listen {
                log::info!(
                    "app '{}' listening on {} -> {} ({})",
                    app.name,
                    local_addrs[i],
                    targets.join(", "),
                    app.balance.as_str()
                );
                i += 1;
            }
        }
        log::info!(
            "epoxy {} started: {} worker(s), max_conns {}, buffer {} B (worst-case buffer memory {} MiB), fd limit {}",
            env!("CARGO_PKG_VERSION"),
            nworkers,
            max_conns,
            config.buffer_size,
            (max_conns * 2 * config.buffer_size) >> 20,
            nofile
        );

        Ok(Proxy {
            workers,
            stats,
            shared,
            local_addrs,
            started: Instant::now(),
            config,
            health_stop,
            health_thread,
            failed: Mutex::new(Vec::new()),
        })
    }

    /// The bound listener addresses (port 0 resolved), in config order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.local_addrs.clone()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn send(&self, make: impl Fn() -> Command) {
        for w in &self.workers {
            if w.tx.send(make()).is_ok() {
                let _ = w.waker.wake();
            }
        }
    }

    /// Stop accepting now; live pairs get the configured grace period. Non-blocking.
    pub fn shutdown(&self) {
        let grace = self.config.grace;
        self.send(|| Command::Drain { grace });
    }

    /// Close everything now. Non-blocking.
    pub fn stop_now(&self) {
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
        Summary::collect(
            self.stats.iter().map(|s| s.as_ref()),
            &self.shared,
            self.started.elapsed(),
        )
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
        self.health_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.health_thread.take() {
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
            self.join_threads();
        }
    }
}

/// How long `main` waits between checks of worker exit while handling signals.
pub const CONTROL_TICK: Duration = Duration::from_millis(100);
