//! The read-only view of the running proxy that the admin endpoint serves: the current
//! generation of apps (with their counters and health), every worker's counter cells, the
//! process-wide gauges and lifecycle flags. The control side writes it (reload, drain); the
//! admin only reads. Live pairs are asked for through [`LiveConnections`], which control
//! implements: the admin never sees a worker.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::AppRuntime;
use crate::stats::{ConnInfo, Counter, Slots, Summary, WorkerStats};

/// A source of the live pairs (control asks every worker, with a bounded wait).
pub trait LiveConnections: Send + Sync {
    fn list(&self, timeout: Duration) -> Vec<ConnInfo>;
}

/// Config reloads by result.
#[derive(Debug, Default)]
pub struct ReloadCounts {
    pub success: AtomicU64,
    pub failure: AtomicU64,
}

impl ReloadCounts {
    pub fn record(&self, ok: bool) {
        let c = if ok { &self.success } else { &self.failure };
        c.fetch_add(1, Relaxed);
    }
}

pub struct ProxyView {
    /// The current generation of apps (replaced on reload).
    pub apps: Mutex<Vec<Arc<AppRuntime>>>,
    pub workers: Vec<Arc<WorkerStats>>,
    /// Process-wide live pairs and their peak.
    pub global: Arc<Slots>,
    /// Listeners are bound and serving.
    pub ready: AtomicBool,
    /// A drain began: readyz answers 503.
    pub draining: AtomicBool,
    pub reloads: ReloadCounts,
    /// SIGUSR2 upgrades by result (counted by the old process, carried to the new one).
    pub upgrades: ReloadCounts,
    /// Totals carried over from the process this one replaced (an upgrade).
    pub carried: Carried,
    /// Live pairs moved here from the process this one replaced.
    pub migration: MigrationCounts,
    pub started: Instant,
    /// Unix time of the start, seconds.
    pub start_time: f64,
    /// The effective global limit of live pairs.
    pub max_conns: usize,
    pub live: Arc<dyn LiveConnections>,
}

impl ProxyView {
    pub fn apps(&self) -> Vec<Arc<AppRuntime>> {
        self.apps.lock().map(|a| a.clone()).unwrap_or_default()
    }

    pub fn summary(&self) -> Summary {
        Summary::collect(
            self.workers
                .iter()
                .map(|s| s.as_ref())
                .chain(std::iter::once(&self.carried.base)),
            &self.global,
            self.started.elapsed(),
        )
    }

    /// Serving: started and not draining (what `/readyz` and `epoxy_up` say).
    pub fn serving(&self) -> bool {
        self.ready.load(Relaxed) && !self.draining.load(Relaxed)
    }

    pub fn active(&self) -> usize {
        self.global.get()
    }

    /// Connections accepted by worker `i`, with what an upgrade carried over for it.
    pub fn worker_accepted(&self, i: usize) -> u64 {
        let own = self.workers.get(i).map_or(0, |w| w.accepted.get());
        own + self.carried.per_worker.get(i).map_or(0, Counter::get)
    }
}

/// Batches of live pairs moved here by an upgrade, and how long they were parked.
#[derive(Debug, Default)]
pub struct MigrationCounts {
    pub pairs: AtomicU64,
    pub batches: AtomicU64,
    pub stall_us_sum: AtomicU64,
    pub stall_us_max: AtomicU64,
}

impl MigrationCounts {
    pub fn record(&self, pairs: u64, stall_us: u64) {
        self.pairs.fetch_add(pairs, Relaxed);
        self.batches.fetch_add(1, Relaxed);
        self.stall_us_sum.fetch_add(stall_us, Relaxed);
        self.stall_us_max.fetch_max(stall_us, Relaxed);
    }
}

/// Counters carried over from an old process by an upgrade (single writer: the thread that
/// reads the upgrade channel). `base.active` stays 0.
#[derive(Debug, Default)]
pub struct Carried {
    pub base: WorkerStats,
    /// Accepted connections per worker index.
    pub per_worker: Box<[Counter]>,
}

impl Carried {
    pub fn new(workers: usize) -> Carried {
        Carried {
            base: WorkerStats::default(),
            per_worker: (0..workers).map(|_| Counter::default()).collect(),
        }
    }
}
