//! Per-app runtime state shared by all workers: the app's settings, its live-pair count (for
//! the per-app limit), its counters, and per target the live-pair count (least-conn), connect
//! errors and health state. Shared atomics are written only on accept, connect and close; the
//! bytes relayed are counted in per-worker single-writer cells (`bytes[worker]`), so the relay
//! path never does a shared write. On reload, state of apps and targets with unchanged names
//! is carried over (`Carry`), so counters never go backwards and health is kept.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};

use crate::config::{AppConfig, TargetConfig};
use crate::health::TargetHealth;
use crate::stats::Counter;
use crate::worker::pair::{CloseReason, ConnectFail};

/// Counters of one target that survive reloads (shared; written on connect only).
#[derive(Debug, Default)]
pub struct TargetCounters {
    pub connect_errors: [AtomicU64; ConnectFail::COUNT],
    /// Live pairs connected or connecting to this target, over all workers.
    pub active: AtomicU32,
}

pub struct TargetRuntime {
    pub cfg: TargetConfig,
    pub counters: Arc<TargetCounters>,
    pub health: Arc<TargetHealth>,
}

impl TargetRuntime {
    pub fn active(&self) -> u32 {
        self.counters.active.load(Relaxed)
    }
}

/// Bytes relayed for one app by one worker (single writer: that worker).
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct BytesCell {
    pub up: Counter,
    pub down: Counter,
}

/// Counters of one app that survive reloads.
#[derive(Debug)]
pub struct AppCounters {
    /// Live pairs of this app, over all workers.
    pub active: AtomicUsize,
    pub total: AtomicU64,
    pub closed: [AtomicU64; CloseReason::COUNT],
    /// Pairs that closed with bytes read but never delivered, by close reason.
    pub truncated: [AtomicU64; CloseReason::COUNT],
    /// Indexed by worker id.
    pub bytes: Box<[BytesCell]>,
}

impl AppCounters {
    pub fn new(workers: usize) -> AppCounters {
        AppCounters {
            active: AtomicUsize::new(0),
            total: AtomicU64::new(0),
            closed: Default::default(),
            truncated: Default::default(),
            bytes: (0..workers.max(1)).map(|_| BytesCell::default()).collect(),
        }
    }
    pub fn bytes_up(&self) -> u64 {
        self.bytes.iter().map(|b| b.up.get()).sum()
    }
    pub fn bytes_down(&self) -> u64 {
        self.bytes.iter().map(|b| b.down.get()).sum()
    }
}

pub struct AppRuntime {
    pub cfg: AppConfig,
    pub counters: Arc<AppCounters>,
    pub targets: Vec<TargetRuntime>,
}

/// State carried from one generation of apps to the next, keyed by names.
#[derive(Default)]
pub struct Carry {
    apps: HashMap<String, Arc<AppCounters>>,
    targets: HashMap<(String, String), (Arc<TargetCounters>, Arc<TargetHealth>)>,
}

impl Carry {
    pub fn from_apps(apps: &[Arc<AppRuntime>]) -> Carry {
        let mut c = Carry::default();
        for a in apps {
            c.apps.insert(a.cfg.name.clone(), a.counters.clone());
            for t in &a.targets {
                c.targets.insert(
                    (a.cfg.name.clone(), t.cfg.name.clone()),
                    (t.counters.clone(), t.health.clone()),
                );
            }
        }
        c
    }
}

impl AppRuntime {
    /// Build the runtime of `cfg`, reusing carried state for names seen before.
    pub fn new(cfg: AppConfig, workers: usize, carry: &Carry) -> AppRuntime {
        let counters = carry
            .apps
            .get(&cfg.name)
            .filter(|c| c.bytes.len() == workers.max(1))
            .cloned()
            .unwrap_or_else(|| Arc::new(AppCounters::new(workers)));
        let targets = cfg
            .targets
            .iter()
            .map(|t| {
                let (counters, health) = carry
                    .targets
                    .get(&(cfg.name.clone(), t.name.clone()))
                    .cloned()
                    .unwrap_or_else(|| {
                        (
                            Arc::new(TargetCounters::default()),
                            Arc::new(TargetHealth::new()),
                        )
                    });
                TargetRuntime {
                    cfg: t.clone(),
                    counters,
                    health,
                }
            })
            .collect();
        AppRuntime {
            cfg,
            counters,
            targets,
        }
    }

    pub fn active(&self) -> usize {
        self.counters.active.load(Relaxed)
    }

    /// At or over the per-app limit.
    pub fn at_limit(&self) -> bool {
        self.cfg.max_conns.is_some_and(|m| self.active() >= m)
    }

    /// Far enough below the per-app limit to resume accepting (hysteresis).
    pub fn below_resume(&self) -> bool {
        self.cfg
            .max_conns
            .is_none_or(|m| self.active() <= resume_mark(m))
    }
}

/// Where accepting resumes after hitting `limit`: about 90% of it, and at least one below.
pub fn resume_mark(limit: usize) -> usize {
    limit.saturating_sub((limit / 10).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_mark_is_below_limit() {
        assert_eq!(resume_mark(10), 9);
        assert_eq!(resume_mark(1), 0);
        assert_eq!(resume_mark(10000), 9000);
    }
}
