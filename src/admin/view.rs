//! The read-only view of the running proxy that the admin endpoint serves: the current
//! generation of apps (with their counters and health), every worker's counter cells, the
//! process-wide gauges and lifecycle flags. The control side writes it (reload, drain); the
//! admin only reads. Live pairs are asked for through [`LiveConnections`], which control
//! implements: the admin never sees a worker.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::AppRuntime;
use crate::stats::{ConnInfo, Slots, Summary, WorkerStats};

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
            self.workers.iter().map(|s| s.as_ref()),
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
}
